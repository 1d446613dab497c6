//! `BGPFilter` (Calico 3.26+): ordered accept/reject rules for what a peer is sent and what
//! is taken from it, referenced by `BGPPeer.spec.filters`. Validated into the BGP crate's
//! [`PrefixFilter`]s, one per direction.
//!
//! As Calico renders a filter into BIRD: `In` is `net ~ cidr` (with `prefixLength`,
//! `net ~ [cidr{min,max}]`), `NotIn` its negation, `Equal`/`NotEqual` compare the prefix
//! exactly; `source: RemotePeers` matches routes learned over BGP; the first matching rule
//! decides. A rule with `interface` matches routes of a kernel interface, which podroute's
//! speaker never exports nor imports: such a rule never matches, and the filter says so in
//! [`Filter::not_honoured`].

use ipnet::IpNet;
use podroute_bgp::policy::{FilterAction, FilterRule, MatchOperator, PrefixFilter};

use super::cidr::parse_masked_cidr;
use super::crd::{BGPFilter, BGPFilterRule};
use super::error::{Kind, Reason, Rejection};

/// A validated `BGPFilter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    pub name: String,
    /// `exportV4` and `exportV6` rules.
    pub export: PrefixFilter,
    /// `importV4` and `importV6` rules.
    pub import: PrefixFilter,
    /// What of the object podroute does not do, one line each (shown in `podroute status`).
    pub not_honoured: Vec<String>,
}

fn rule(
    list: &'static str,
    v6: bool,
    index: usize,
    r: &BGPFilterRule,
    not_honoured: &mut Vec<String>,
) -> Result<Option<FilterRule>, Reason> {
    let bad = |problem: String| Reason::BadFilterRule {
        list,
        index,
        problem,
    };
    let action = match r.action.as_deref().map(str::trim) {
        Some(a) if a.eq_ignore_ascii_case("accept") => FilterAction::Accept,
        Some(a) if a.eq_ignore_ascii_case("reject") => FilterAction::Reject,
        other => {
            return Err(bad(format!(
                "action {:?} is not Accept or Reject",
                other.unwrap_or("")
            )));
        }
    };
    let cidr: Option<IpNet> = match r.cidr.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(parse_masked_cidr(text).map_err(|e| bad(e.to_string()))?),
    };
    if let Some(c) = cidr
        && c.addr().is_ipv6() != v6
    {
        return Err(bad(format!(
            "cidr {c} is not an IPv{} prefix",
            if v6 { 6 } else { 4 }
        )));
    }
    let operator = match r.match_operator.as_deref().map(str::trim) {
        None | Some("") if cidr.is_none() => MatchOperator::In,
        Some("Equal") => MatchOperator::Equal,
        Some("NotEqual") => MatchOperator::NotEqual,
        Some("In") => MatchOperator::In,
        Some("NotIn") => MatchOperator::NotIn,
        other => {
            return Err(bad(format!(
                "matchOperator {:?} is not one of Equal, NotEqual, In, NotIn (required with cidr)",
                other.unwrap_or("")
            )));
        }
    };
    let max_len = if v6 { 128 } else { 32 };
    let prefix_length = match &r.prefix_length {
        None => None,
        Some(pl) => {
            if cidr.is_none() || !matches!(operator, MatchOperator::In | MatchOperator::NotIn) {
                return Err(bad(
                    "prefixLength needs a cidr and matchOperator In or NotIn".to_string(),
                ));
            }
            let floor = cidr.map_or(0, |c| c.prefix_len());
            let len = |v: Option<i64>, what: &str| -> Result<Option<u8>, Reason> {
                match v {
                    None => Ok(None),
                    Some(n) if (i64::from(floor)..=i64::from(max_len)).contains(&n) => {
                        Ok(u8::try_from(n).ok())
                    }
                    Some(n) => Err(bad(format!(
                        "prefixLength.{what} {n} is outside {floor}..={max_len}"
                    ))),
                }
            };
            let (min, max) = (len(pl.min, "min")?, len(pl.max, "max")?);
            if let (Some(a), Some(b)) = (min, max)
                && a > b
            {
                return Err(bad(format!("prefixLength.min {a} is above max {b}")));
            }
            Some((min, max))
        }
    };
    let only_remote_peers = match r.source.as_deref().map(str::trim) {
        None | Some("") => false,
        Some("RemotePeers") => true,
        Some(other) => return Err(bad(format!("source {other:?} is not RemotePeers"))),
    };
    if let Some(ifname) = r.interface.as_deref().filter(|i| !i.trim().is_empty()) {
        not_honoured.push(format!(
            "{list}[{index}]: interface {ifname:?} matches kernel routes of an interface, which \
             podroute's BGP speaker does not carry; the rule never matches"
        ));
        return Ok(None);
    }
    Ok(Some(FilterRule {
        cidr,
        operator,
        prefix_length,
        only_remote_peers,
        action,
    }))
}

fn rules(
    list: &'static str,
    v6: bool,
    given: &Option<Vec<BGPFilterRule>>,
    not_honoured: &mut Vec<String>,
) -> Result<Vec<FilterRule>, Reason> {
    let mut out = Vec::new();
    for (i, r) in given.iter().flatten().enumerate() {
        if let Some(rule) = rule(list, v6, i, r, not_honoured)? {
            out.push(rule);
        }
    }
    Ok(out)
}

impl Filter {
    /// Validates one `BGPFilter`: a rule that cannot be read rejects the whole object (its
    /// last valid version stays in force), since dropping one rule silently would change what
    /// the others mean.
    pub fn from_resource(obj: &BGPFilter) -> Result<Filter, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::BGPFilter, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let mut not_honoured = Vec::new();
        let mut read = |list, v6, given: &Option<Vec<BGPFilterRule>>| {
            rules(list, v6, given, &mut not_honoured).map_err(reject)
        };
        let export = PrefixFilter {
            v4: read("exportV4", false, &spec.export_v4)?,
            v6: read("exportV6", true, &spec.export_v6)?,
        };
        let import = PrefixFilter {
            v4: read("importV4", false, &spec.import_v4)?,
            v6: read("importV6", true, &spec.import_v6)?,
        };
        Ok(Filter {
            name: name.to_string(),
            export,
            import,
            not_honoured,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::{BGPFilterPrefixLength, BGPFilterSpec};

    fn r(cidr: &str, op: &str, action: &str) -> BGPFilterRule {
        BGPFilterRule {
            cidr: Some(cidr.into()),
            match_operator: Some(op.into()),
            action: Some(action.into()),
            ..Default::default()
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn calico_sample_reads() {
        let obj = BGPFilter::new(
            "my-filter",
            BGPFilterSpec {
                export_v4: Some(vec![r("77.0.0.0/16", "In", "Accept")]),
                import_v4: Some(vec![
                    r("44.0.0.0/16", "NotIn", "Reject"),
                    BGPFilterRule {
                        cidr: Some("44.0.0.0/16".into()),
                        match_operator: Some("In".into()),
                        prefix_length: Some(BGPFilterPrefixLength {
                            min: Some(24),
                            max: None,
                        }),
                        source: Some("RemotePeers".into()),
                        action: Some("Accept".into()),
                        ..Default::default()
                    },
                ]),
                export_v6: Some(vec![r("9000::0/64", "Equal", "Accept")]),
                import_v6: Some(vec![BGPFilterRule {
                    action: Some("Reject".into()),
                    ..Default::default()
                }]),
            },
        );
        let f = Filter::from_resource(&obj).unwrap();
        assert_eq!(
            f.export.evaluate(&net("77.0.3.0/24"), false),
            Some(FilterAction::Accept)
        );
        assert_eq!(
            f.import.evaluate(&net("10.0.0.0/8"), true),
            Some(FilterAction::Reject)
        );
        assert_eq!(
            f.import.evaluate(&net("44.0.1.0/24"), true),
            Some(FilterAction::Accept)
        );
        assert_eq!(f.import.evaluate(&net("44.0.0.0/20"), true), None);
        assert_eq!(
            f.export.evaluate(&net("9000::/64"), false),
            Some(FilterAction::Accept)
        );
        // A rule without cidr matches everything of its family.
        assert_eq!(
            f.import.evaluate(&net("fd00::/64"), true),
            Some(FilterAction::Reject)
        );
        assert!(f.not_honoured.is_empty());
    }

    #[test]
    fn bad_rules_reject_the_object_with_the_rule_named() {
        let cases: Vec<(BGPFilterSpec, &str)> = vec![
            (
                BGPFilterSpec {
                    export_v4: Some(vec![r("77.0.0.0/16", "In", "Allow")]),
                    ..Default::default()
                },
                "exportV4[0]: action \"Allow\" is not Accept or Reject",
            ),
            (
                BGPFilterSpec {
                    export_v4: Some(vec![r("77.0.0.0/16", "Contains", "Accept")]),
                    ..Default::default()
                },
                "exportV4[0]: matchOperator \"Contains\"",
            ),
            (
                BGPFilterSpec {
                    import_v6: Some(vec![r("10.0.0.0/8", "In", "Accept")]),
                    ..Default::default()
                },
                "importV6[0]: cidr 10.0.0.0/8 is not an IPv6 prefix",
            ),
            (
                BGPFilterSpec {
                    import_v4: Some(vec![BGPFilterRule {
                        prefix_length: Some(BGPFilterPrefixLength {
                            min: Some(8),
                            max: None,
                        }),
                        ..r("10.0.0.0/16", "In", "Accept")
                    }]),
                    ..Default::default()
                },
                "importV4[0]: prefixLength.min 8 is outside 16..=32",
            ),
        ];
        for (spec, want) in cases {
            let e = Filter::from_resource(&BGPFilter::new("f", spec)).unwrap_err();
            assert!(e.to_string().contains(want), "{e} / {want}");
            assert!(e.to_string().starts_with("BGPFilter \"f\": "), "{e}");
        }
    }

    #[test]
    fn interface_rules_are_reported_not_honoured() {
        let obj = BGPFilter::new(
            "f",
            BGPFilterSpec {
                export_v4: Some(vec![
                    BGPFilterRule {
                        interface: Some("eth*".into()),
                        action: Some("Accept".into()),
                        ..Default::default()
                    },
                    r("10.0.0.0/8", "In", "Reject"),
                ]),
                ..Default::default()
            },
        );
        let f = Filter::from_resource(&obj).unwrap();
        assert_eq!(f.export.v4.len(), 1);
        assert_eq!(f.not_honoured.len(), 1);
        assert!(f.not_honoured[0].contains("interface \"eth*\""));
    }
}
