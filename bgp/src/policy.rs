//! Route policy on top of the protocol's own export rules: which prefixes may be announced at
//! all (a speaker-wide [`ExportRules`], the shape of Calico's `calico_export_to_bgp_peers`
//! BIRD filter), per-peer prefix filters evaluated rule by rule (the shape of Calico's
//! `BGPFilter` rendered into BIRD), and communities attached to exported routes.
//!
//! Knows nothing of Kubernetes: the agent turns IPPools, blocks and BGPFilters into these.
//!
//! Evaluation towards one peer, as BIRD runs `export filter { peer_filters(); calico_export(); reject; }`:
//! 1. the peer's [`PrefixFilter`] rules in order: the first that matches decides (`Accept`
//!    announces the route as it is, without step 2);
//! 2. without a match, [`ExportRules::decide`]: `deny` rejects, an `aggregates` entry accepts
//!    itself and rejects everything more specific, `allow` accepts; anything else is rejected.
//!
//! Without `ExportRules` (the default) every route passes step 2: plain RFC 4271 behaviour.

use ipnet::IpNet;

/// One community attached on export: a standard community (RFC 1997, `aa:nn` as one u32) or a
/// large community (RFC 8092, `global:local1:local2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Community {
    Standard(u32),
    Large(u32, u32, u32),
}

/// Communities attached to exported routes inside `cidr` (BIRD: `if net ~ cidr then
/// bgp_community.add(...)`). Every matching entry adds its communities.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CommunityRule {
    pub cidr: IpNet,
    pub communities: Vec<Community>,
}

/// Which prefixes may be announced to any peer, and the communities they carry (see the module
/// doc for the order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExportRules {
    /// Never announced, nor anything inside (Calico: pools with `disableBGPExport`).
    pub deny: Vec<IpNet>,
    /// Announced as themselves; anything more specific is not (Calico: the node's own
    /// confirmed blocks, `calico_aggr`).
    pub aggregates: Vec<IpNet>,
    /// Announced, with everything inside (Calico: pools, service CIDRs, prefix
    /// advertisements).
    pub allow: Vec<IpNet>,
    /// Communities added to the routes this policy accepts.
    pub communities: Vec<CommunityRule>,
}

/// Why [`ExportRules`] refused a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExportRefusal {
    /// Inside a `deny` prefix.
    Denied,
    /// More specific than an aggregate.
    Aggregated,
    /// Outside every `allow` prefix.
    NotAllowed,
}

impl ExportRules {
    /// Whether `prefix` may be announced.
    pub fn decide(&self, prefix: &IpNet) -> Result<(), ExportRefusal> {
        if self.deny.iter().any(|d| d.contains(prefix)) {
            return Err(ExportRefusal::Denied);
        }
        for a in &self.aggregates {
            if a == prefix {
                return Ok(());
            }
            if a.contains(prefix) {
                return Err(ExportRefusal::Aggregated);
            }
        }
        if self.allow.iter().any(|a| a.contains(prefix)) {
            return Ok(());
        }
        Err(ExportRefusal::NotAllowed)
    }

    /// The communities a prefix accepted by [`ExportRules::decide`] is announced with, sorted
    /// and without duplicates (empty when none applies).
    pub fn communities_for(&self, prefix: &IpNet) -> Vec<Community> {
        let mut out: Vec<Community> = self
            .communities
            .iter()
            .filter(|r| r.cidr.contains(prefix))
            .flat_map(|r| r.communities.iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// How a rule's `cidr` is compared with the route's prefix (Calico's `matchOperator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatchOperator {
    /// The prefix is exactly `cidr` (BIRD `net = cidr`).
    Equal,
    /// The prefix is not `cidr` (`net != cidr`).
    NotEqual,
    /// The prefix is `cidr` or inside it (`net ~ cidr`), within the prefix-length range when one
    /// is given (`net ~ [cidr{min,max}]`).
    In,
    /// The negation of `In`.
    NotIn,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterAction {
    Accept,
    Reject,
}

/// One rule of a [`PrefixFilter`]; every condition given must hold for the rule to match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FilterRule {
    /// `None`: any prefix (of the rule's family).
    pub cidr: Option<IpNet>,
    pub operator: MatchOperator,
    /// Prefix-length range for `In`/`NotIn` (inclusive; `None` ends: the cidr's own length and
    /// the family's maximum).
    pub prefix_length: Option<(Option<u8>, Option<u8>)>,
    /// Only routes learned from a BGP peer (Calico `source: RemotePeers`); `false`: any source.
    pub only_remote_peers: bool,
    pub action: FilterAction,
}

impl FilterRule {
    /// Whether the rule matches `prefix`, a route learned from a peer when `from_peer`.
    pub fn matches(&self, prefix: &IpNet, from_peer: bool) -> bool {
        if self.only_remote_peers && !from_peer {
            return false;
        }
        let Some(cidr) = self.cidr else {
            return true;
        };
        if cidr.max_prefix_len() != prefix.max_prefix_len() {
            return false;
        }
        match self.operator {
            MatchOperator::Equal => *prefix == cidr,
            MatchOperator::NotEqual => *prefix != cidr,
            MatchOperator::In => self.within(&cidr, prefix),
            MatchOperator::NotIn => !self.within(&cidr, prefix),
        }
    }

    fn within(&self, cidr: &IpNet, prefix: &IpNet) -> bool {
        if !cidr.contains(prefix) {
            return false;
        }
        match self.prefix_length {
            None => true,
            Some((min, max)) => {
                let len = prefix.prefix_len();
                len >= min.unwrap_or(cidr.prefix_len())
                    && len <= max.unwrap_or(cidr.max_prefix_len())
            }
        }
    }
}

/// An ordered list of rules per address family: the first rule that matches decides. The
/// rules of several Calico `BGPFilter`s referenced by one peer are concatenated in the peer's
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixFilter {
    pub v4: Vec<FilterRule>,
    pub v6: Vec<FilterRule>,
}

impl PrefixFilter {
    /// The action of the first matching rule, `None` when none matches.
    pub fn evaluate(&self, prefix: &IpNet, from_peer: bool) -> Option<FilterAction> {
        let rules = match prefix {
            IpNet::V4(_) => &self.v4,
            IpNet::V6(_) => &self.v6,
        };
        rules
            .iter()
            .find(|r| r.matches(prefix, from_peer))
            .map(|r| r.action)
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Calico's export decision for node n1 holding 172.16.196.128/26 (confirmed) in pool
    /// 172.16.0.0/16, a pool 10.50.0.0/16 with disableBGPExport, service CIDR 10.96.0.0/12.
    fn calico_rules() -> ExportRules {
        ExportRules {
            deny: vec![n("10.50.0.0/16")],
            aggregates: vec![n("172.16.196.128/26")],
            allow: vec![n("172.16.0.0/16"), n("10.96.0.0/12")],
            communities: vec![],
        }
    }

    #[test]
    fn export_decision_table() {
        let r = calico_rules();
        let cases: &[(&str, Result<(), ExportRefusal>)] = &[
            // own confirmed block: announced
            ("172.16.196.128/26", Ok(())),
            // a pod /32 inside the own block: aggregated away
            ("172.16.196.130/32", Err(ExportRefusal::Aggregated)),
            // another node's block in the pool (route reflector): reflected
            ("172.16.5.0/26", Ok(())),
            // a borrowed /32 inside someone else's block: in the pool, announced
            ("172.16.5.7/32", Ok(())),
            // the pool itself
            ("172.16.0.0/16", Ok(())),
            // pool with disableBGPExport: never
            ("10.50.1.0/26", Err(ExportRefusal::Denied)),
            ("10.50.0.0/16", Err(ExportRefusal::Denied)),
            // service CIDR and a /32 in it
            ("10.96.0.0/12", Ok(())),
            ("10.96.0.10/32", Ok(())),
            // ToR's default route and an external /24: never (no transit)
            ("0.0.0.0/0", Err(ExportRefusal::NotAllowed)),
            ("192.0.2.0/24", Err(ExportRefusal::NotAllowed)),
            // a supernet of the pool is not inside it
            ("172.16.0.0/12", Err(ExportRefusal::NotAllowed)),
            // IPv6 outside every v6 pool
            ("fd00::/64", Err(ExportRefusal::NotAllowed)),
        ];
        for (p, want) in cases {
            assert_eq!(r.decide(&n(p)), *want, "{p}");
        }
    }

    #[test]
    fn deny_beats_aggregate_and_allow() {
        // A block of a pool that has disableBGPExport is not announced even if held.
        let r = ExportRules {
            deny: vec![n("10.50.0.0/16")],
            aggregates: vec![n("10.50.1.0/26")],
            allow: vec![n("10.0.0.0/8")],
            communities: vec![],
        };
        assert_eq!(r.decide(&n("10.50.1.0/26")), Err(ExportRefusal::Denied));
        assert_eq!(r.decide(&n("10.51.0.0/26")), Ok(()));
    }

    #[test]
    fn communities_of_every_matching_entry() {
        let r = ExportRules {
            allow: vec![n("172.16.0.0/16")],
            communities: vec![
                CommunityRule {
                    cidr: n("172.16.0.0/16"),
                    communities: vec![Community::Standard(0xfde8_0064)],
                },
                CommunityRule {
                    cidr: n("172.16.196.0/24"),
                    communities: vec![
                        Community::Large(64512, 1, 2),
                        Community::Standard(0xfde8_0064),
                    ],
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            r.communities_for(&n("172.16.196.128/26")),
            vec![
                Community::Standard(0xfde8_0064),
                Community::Large(64512, 1, 2)
            ]
        );
        assert_eq!(
            r.communities_for(&n("172.16.5.0/26")),
            vec![Community::Standard(0xfde8_0064)]
        );
        assert!(r.communities_for(&n("10.0.0.0/26")).is_empty());
    }

    fn rule(cidr: &str, op: MatchOperator, action: FilterAction) -> FilterRule {
        FilterRule {
            cidr: Some(n(cidr)),
            operator: op,
            prefix_length: None,
            only_remote_peers: false,
            action,
        }
    }

    #[test]
    fn operators() {
        use FilterAction::*;
        use MatchOperator::*;
        let p = n("77.0.1.0/24");
        assert!(rule("77.0.1.0/24", Equal, Accept).matches(&p, false));
        assert!(!rule("77.0.0.0/16", Equal, Accept).matches(&p, false));
        assert!(rule("77.0.0.0/16", NotEqual, Accept).matches(&p, false));
        assert!(!rule("77.0.1.0/24", NotEqual, Accept).matches(&p, false));
        assert!(rule("77.0.0.0/16", In, Accept).matches(&p, false));
        assert!(!rule("78.0.0.0/16", In, Accept).matches(&p, false));
        assert!(rule("78.0.0.0/16", NotIn, Accept).matches(&p, false));
        assert!(!rule("77.0.0.0/16", NotIn, Accept).matches(&p, false));
        // A v6 rule never matches a v4 prefix, whatever the operator.
        assert!(!rule("fd00::/8", NotIn, Accept).matches(&p, false));
    }

    #[test]
    fn prefix_length_range() {
        let mut r = rule("77.0.0.0/16", MatchOperator::In, FilterAction::Accept);
        r.prefix_length = Some((Some(20), Some(24)));
        assert!(r.matches(&n("77.0.1.0/24"), false));
        assert!(r.matches(&n("77.0.16.0/20"), false));
        assert!(!r.matches(&n("77.0.1.0/26"), false));
        assert!(!r.matches(&n("77.0.0.0/16"), false));
        r.operator = MatchOperator::NotIn;
        assert!(r.matches(&n("77.0.1.0/26"), false));
        assert!(!r.matches(&n("77.0.1.0/24"), false));
        // Only a maximum: the minimum is the cidr's own length.
        r.operator = MatchOperator::In;
        r.prefix_length = Some((None, Some(18)));
        assert!(r.matches(&n("77.0.0.0/16"), false));
        assert!(!r.matches(&n("77.0.0.0/19"), false));
    }

    #[test]
    fn first_match_decides_and_source() {
        let f = PrefixFilter {
            v4: vec![
                FilterRule {
                    cidr: None,
                    operator: MatchOperator::In,
                    prefix_length: None,
                    only_remote_peers: true,
                    action: FilterAction::Reject,
                },
                rule("10.0.0.0/8", MatchOperator::In, FilterAction::Accept),
                rule("10.1.0.0/16", MatchOperator::In, FilterAction::Reject),
            ],
            v6: vec![rule("fd00::/8", MatchOperator::NotIn, FilterAction::Reject)],
        };
        assert_eq!(
            f.evaluate(&n("10.1.2.0/24"), false),
            Some(FilterAction::Accept)
        );
        assert_eq!(
            f.evaluate(&n("10.1.2.0/24"), true),
            Some(FilterAction::Reject)
        );
        assert_eq!(f.evaluate(&n("192.0.2.0/24"), false), None);
        assert_eq!(
            f.evaluate(&n("2001:db8::/64"), false),
            Some(FilterAction::Reject)
        );
        assert_eq!(f.evaluate(&n("fd00:1::/64"), false), None);
    }
}
