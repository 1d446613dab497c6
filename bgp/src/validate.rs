//! The peer-dependent half of UPDATE error handling.
//!
//! [`crate::wire`] decodes an UPDATE and records the RFC 7606 findings that need only the bytes
//! (malformed attributes, missing well-known attributes). What is wrong *for this peer* needs
//! the session: whether it is eBGP, its AS, our AS and identifier, our addresses. That is this
//! module, run by the session on every decoded UPDATE before the routes reach the Adj-RIB-In.
//! Findings are appended to [`Update::errors`] with the RFC 7606 action, exactly like the
//! decoder's, so one `update.treat_as_withdraw()` covers both.

use crate::wire::{AttrError, ErrorAction, NextHop, Update};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Attribute type codes named in findings (RFC 4271 §5, RFC 4456 §8).
mod code {
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const LOCAL_PREF: u8 = 5;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
}

/// What the session knows about the peer and us that UPDATE validation depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerContext {
    /// The peer is in another AS.
    pub ebgp: bool,
    /// The peer's AS (from configuration, confirmed by its OPEN).
    pub peer_as: u32,
    /// Our AS.
    pub local_as: u32,
    /// Our BGP Identifier.
    pub local_id: Ipv4Addr,
    /// Our cluster ID when we reflect routes (RFC 4456 §7; the router ID unless configured).
    pub cluster_id: Option<Ipv4Addr>,
    /// Our own addresses, at least the session's local address; a next hop equal to one of
    /// them cannot be used (RFC 4271 §6.3, §5.1.3).
    pub local_addrs: Vec<IpAddr>,
    /// Check that an eBGP peer put its own AS first in AS_PATH (RFC 4271 §6.3). Off only for
    /// route servers, which do not prepend (RFC 7947 §2.2.2.1).
    pub enforce_first_as: bool,
}

impl PeerContext {
    /// Context for a peer with the usual checks on.
    pub fn new(ebgp: bool, peer_as: u32, local_as: u32, local_id: Ipv4Addr) -> Self {
        PeerContext {
            ebgp,
            peer_as,
            local_as,
            local_id,
            cluster_id: None,
            local_addrs: Vec::new(),
            enforce_first_as: true,
        }
    }
}

/// Apply the peer-dependent RFC 4271 / RFC 4456 / RFC 7606 rules to a decoded UPDATE:
/// attributes that must be discarded are removed, and every finding is recorded in
/// `update.errors` with its action.
///
/// | rule | action |
/// |---|---|
/// | LOCAL_PREF from an eBGP peer (RFC 7606 §7.5, RFC 4271 §5.1.5) | attribute discard |
/// | ORIGINATOR_ID from an eBGP peer (RFC 7606 §7.9) | attribute discard |
/// | CLUSTER_LIST from an eBGP peer (RFC 7606 §7.10) | attribute discard |
/// | eBGP AS_PATH not starting with the peer AS (RFC 4271 §6.3 Malformed AS_PATH, handled per RFC 7606 §7.2) | treat-as-withdraw |
/// | our AS in an eBGP AS_PATH (RFC 4271 §9.1.2 AS loop detection) | treat-as-withdraw |
/// | ORIGINATOR_ID is our BGP Identifier (RFC 4456 §8) | treat-as-withdraw |
/// | CLUSTER_LIST holds our cluster ID (RFC 4456 §8) | treat-as-withdraw |
/// | NEXT_HOP 0.0.0.0, multicast, broadcast, class E or ours (RFC 4271 §6.3 semantic check) | treat-as-withdraw |
/// | MP_REACH next hop unspecified, multicast or ours (RFC 4760 §3 with RFC 4271 §6.3) | treat-as-withdraw |
///
/// The path checks only run when the UPDATE announces routes; a pure withdrawal is never
/// turned into anything else.
pub fn validate_update(update: &mut Update, ctx: &PeerContext) {
    let mut found = Vec::new();
    let mut finding = |attr: u8, action: ErrorAction, reason: &'static str| {
        found.push(AttrError {
            attr,
            action,
            reason,
        });
    };

    if ctx.ebgp {
        if update.attrs.local_pref.take().is_some() {
            finding(
                code::LOCAL_PREF,
                ErrorAction::AttributeDiscard,
                "LOCAL_PREF received from an external peer",
            );
        }
        if update.attrs.originator_id.take().is_some() {
            finding(
                code::ORIGINATOR_ID,
                ErrorAction::AttributeDiscard,
                "ORIGINATOR_ID received from an external peer",
            );
        }
        if !update.attrs.cluster_list.is_empty() {
            update.attrs.cluster_list.clear();
            finding(
                code::CLUSTER_LIST,
                ErrorAction::AttributeDiscard,
                "CLUSTER_LIST received from an external peer",
            );
        }
    }

    let announces =
        !update.nlri.is_empty() || update.mp_reach.as_ref().is_some_and(|r| !r.nlri.is_empty());
    if announces {
        let withdraw = ErrorAction::TreatAsWithdraw;
        if let Some(path) = &update.attrs.as_path {
            if ctx.ebgp && ctx.enforce_first_as && path.first_as() != Some(ctx.peer_as) {
                finding(
                    code::AS_PATH,
                    withdraw,
                    "AS_PATH from an external peer does not start with the peer's AS",
                );
            }
            if ctx.ebgp && path.contains(ctx.local_as) {
                finding(
                    code::AS_PATH,
                    withdraw,
                    "AS_PATH contains our own AS (loop)",
                );
            }
        }
        if !ctx.ebgp {
            if update.attrs.originator_id == Some(ctx.local_id) {
                finding(
                    code::ORIGINATOR_ID,
                    withdraw,
                    "ORIGINATOR_ID is our own BGP Identifier (reflection loop)",
                );
            }
            let cluster = ctx.cluster_id.unwrap_or(ctx.local_id);
            if ctx.cluster_id.is_some() && update.attrs.cluster_list.contains(&cluster) {
                finding(
                    code::CLUSTER_LIST,
                    withdraw,
                    "CLUSTER_LIST contains our cluster ID (reflection loop)",
                );
            }
        }
        if !update.nlri.is_empty()
            && let Some(nh) = update.attrs.next_hop
            && let Some(reason) = bad_v4_next_hop(nh, ctx)
        {
            finding(code::NEXT_HOP, withdraw, reason);
        }
        if let Some(reach) = update.mp_reach.as_ref().filter(|r| !r.nlri.is_empty())
            && let Some(reason) = bad_mp_next_hop(&reach.next_hop, ctx)
        {
            finding(code::MP_REACH_NLRI, withdraw, reason);
        }
    }
    update.errors.extend(found);
}

fn bad_v4_next_hop(nh: Ipv4Addr, ctx: &PeerContext) -> Option<&'static str> {
    if nh.is_unspecified() {
        Some("NEXT_HOP is 0.0.0.0")
    } else if nh.is_broadcast() {
        Some("NEXT_HOP is the limited broadcast address")
    } else if nh.is_multicast() {
        Some("NEXT_HOP is a multicast address")
    } else if nh.octets()[0] >= 240 {
        Some("NEXT_HOP is a class E (reserved) address")
    } else if ctx.local_addrs.contains(&IpAddr::V4(nh)) {
        Some("NEXT_HOP is our own address")
    } else {
        None
    }
}

fn bad_mp_next_hop(nh: &NextHop, ctx: &PeerContext) -> Option<&'static str> {
    match nh.addr {
        IpAddr::V4(a) => bad_v4_next_hop(a, ctx),
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some("MP_REACH_NLRI next hop is ::")
            } else if a.is_multicast() {
                Some("MP_REACH_NLRI next hop is a multicast address")
            } else if is_v6_link_local(a) {
                // RFC 2545 §3: the first next hop is the global address.
                Some("MP_REACH_NLRI global next hop is link-local")
            } else if ctx.local_addrs.contains(&IpAddr::V6(a)) {
                Some("MP_REACH_NLRI next hop is our own address")
            } else {
                None
            }
        }
    }
}

fn is_v6_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AsPath, AsSegment, Family, MpReach, Origin, PathAttrs};

    const PEER_AS: u32 = 65002;
    const LOCAL_AS: u32 = 65001;
    const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn ebgp() -> PeerContext {
        let mut c = PeerContext::new(true, PEER_AS, LOCAL_AS, LOCAL_ID);
        c.local_addrs.push("192.0.2.1".parse().unwrap());
        c.local_addrs.push("2001:db8::1".parse().unwrap());
        c
    }

    fn ibgp() -> PeerContext {
        let mut c = PeerContext::new(false, LOCAL_AS, LOCAL_AS, LOCAL_ID);
        c.local_addrs.push("192.0.2.1".parse().unwrap());
        c
    }

    /// A clean eBGP announcement of 10.0.0.0/26 from AS 65002 via 192.0.2.2.
    fn announcement() -> Update {
        Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::from_sequence(vec![PEER_AS, 64512])),
                next_hop: Some(Ipv4Addr::new(192, 0, 2, 2)),
                ..PathAttrs::default()
            },
            nlri: vec!["10.0.0.0/26".parse().unwrap()],
            ..Update::default()
        }
    }

    fn reasons(u: &Update) -> Vec<(u8, ErrorAction, &'static str)> {
        u.errors
            .iter()
            .map(|e| (e.attr, e.action, e.reason))
            .collect()
    }

    #[test]
    fn clean_ebgp_and_ibgp_updates_pass() {
        let mut u = announcement();
        validate_update(&mut u, &ebgp());
        assert_eq!(reasons(&u), vec![]);
        assert!(!u.treat_as_withdraw());

        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::from_sequence(vec![64512]));
        u.attrs.local_pref = Some(200);
        u.attrs.originator_id = Some(Ipv4Addr::new(192, 0, 2, 9));
        u.attrs.cluster_list = vec![Ipv4Addr::new(192, 0, 2, 8)];
        validate_update(&mut u, &ibgp());
        assert_eq!(reasons(&u), vec![]);
        assert_eq!(u.attrs.local_pref, Some(200));
    }

    #[test]
    fn ebgp_local_pref_originator_cluster_list_are_discarded() {
        let mut u = announcement();
        u.attrs.local_pref = Some(300);
        u.attrs.originator_id = Some(Ipv4Addr::new(192, 0, 2, 9));
        u.attrs.cluster_list = vec![Ipv4Addr::new(192, 0, 2, 8)];
        validate_update(&mut u, &ebgp());
        assert_eq!(
            reasons(&u),
            vec![
                (
                    5,
                    ErrorAction::AttributeDiscard,
                    "LOCAL_PREF received from an external peer"
                ),
                (
                    9,
                    ErrorAction::AttributeDiscard,
                    "ORIGINATOR_ID received from an external peer"
                ),
                (
                    10,
                    ErrorAction::AttributeDiscard,
                    "CLUSTER_LIST received from an external peer"
                ),
            ]
        );
        assert_eq!(u.attrs.local_pref, None);
        assert_eq!(u.attrs.originator_id, None);
        assert!(u.attrs.cluster_list.is_empty());
        // Attribute discard keeps the route.
        assert!(!u.treat_as_withdraw());
    }

    #[test]
    fn ebgp_first_as_must_be_the_peer() {
        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::from_sequence(vec![64999, PEER_AS]));
        validate_update(&mut u, &ebgp());
        assert_eq!(
            reasons(&u),
            vec![(
                2,
                ErrorAction::TreatAsWithdraw,
                "AS_PATH from an external peer does not start with the peer's AS"
            )]
        );
        assert!(u.treat_as_withdraw());

        // An empty AS_PATH from eBGP (the peer did not prepend) fails the same check; an
        // AS_SET first as well.
        for path in [
            AsPath::default(),
            AsPath {
                segments: vec![AsSegment::Set(vec![PEER_AS])],
            },
        ] {
            let mut u = announcement();
            u.attrs.as_path = Some(path);
            validate_update(&mut u, &ebgp());
            assert!(u.treat_as_withdraw(), "{:?}", u.attrs.as_path);
        }

        // A route server peer is exempt.
        let mut ctx = ebgp();
        ctx.enforce_first_as = false;
        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::from_sequence(vec![64999]));
        validate_update(&mut u, &ctx);
        assert_eq!(reasons(&u), vec![]);
    }

    #[test]
    fn ebgp_as_path_with_our_as_is_a_loop() {
        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::from_sequence(vec![PEER_AS, LOCAL_AS, 64512]));
        validate_update(&mut u, &ebgp());
        assert_eq!(
            reasons(&u),
            vec![(
                2,
                ErrorAction::TreatAsWithdraw,
                "AS_PATH contains our own AS (loop)"
            )]
        );
    }

    #[test]
    fn semantically_invalid_next_hops_withdraw() {
        let cases = [
            ("0.0.0.0", "NEXT_HOP is 0.0.0.0"),
            ("224.0.0.5", "NEXT_HOP is a multicast address"),
            (
                "255.255.255.255",
                "NEXT_HOP is the limited broadcast address",
            ),
            ("240.0.0.1", "NEXT_HOP is a class E (reserved) address"),
            ("192.0.2.1", "NEXT_HOP is our own address"),
        ];
        for (nh, reason) in cases {
            let mut u = announcement();
            u.attrs.next_hop = Some(nh.parse().unwrap());
            validate_update(&mut u, &ebgp());
            assert_eq!(
                reasons(&u),
                vec![(3, ErrorAction::TreatAsWithdraw, reason)],
                "{nh}"
            );
        }
    }

    #[test]
    fn invalid_mp_next_hops_withdraw() {
        let cases = [
            ("::", "MP_REACH_NLRI next hop is ::"),
            ("ff02::5", "MP_REACH_NLRI next hop is a multicast address"),
            ("fe80::1", "MP_REACH_NLRI global next hop is link-local"),
            ("2001:db8::1", "MP_REACH_NLRI next hop is our own address"),
        ];
        for (nh, reason) in cases {
            let mut u = announcement();
            u.nlri.clear();
            u.attrs.next_hop = None;
            u.mp_reach = Some(MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: NextHop::new(nh.parse().unwrap()),
                nlri: vec!["2001:db8:1::/122".parse().unwrap()],
            });
            validate_update(&mut u, &ebgp());
            assert_eq!(
                reasons(&u),
                vec![(14, ErrorAction::TreatAsWithdraw, reason)],
                "{nh}"
            );
        }
    }

    #[test]
    fn ibgp_reflection_loops_withdraw() {
        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::default());
        u.attrs.originator_id = Some(LOCAL_ID);
        validate_update(&mut u, &ibgp());
        assert_eq!(
            reasons(&u),
            vec![(
                9,
                ErrorAction::TreatAsWithdraw,
                "ORIGINATOR_ID is our own BGP Identifier (reflection loop)"
            )]
        );

        let mut ctx = ibgp();
        ctx.cluster_id = Some(Ipv4Addr::new(192, 0, 2, 100));
        let mut u = announcement();
        u.attrs.as_path = Some(AsPath::default());
        u.attrs.cluster_list = vec![Ipv4Addr::new(192, 0, 2, 7), Ipv4Addr::new(192, 0, 2, 100)];
        validate_update(&mut u, &ctx);
        assert_eq!(
            reasons(&u),
            vec![(
                10,
                ErrorAction::TreatAsWithdraw,
                "CLUSTER_LIST contains our cluster ID (reflection loop)"
            )]
        );
    }

    #[test]
    fn pure_withdrawals_are_left_alone() {
        let mut u = Update {
            withdrawn: vec!["10.0.0.0/26".parse().unwrap()],
            ..Update::default()
        };
        validate_update(&mut u, &ebgp());
        assert_eq!(reasons(&u), vec![]);
    }
}
