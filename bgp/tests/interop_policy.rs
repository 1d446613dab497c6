//! Route policy and per-peer session settings against real BIRD 2 and GoBGP (each test starts its own
//! BIRD on a unique loopback address and a non-179 port):
//! - TCP-MD5 (RFC 2385): Established with the right key, never with a wrong one;
//! - GTSM (RFC 5082): a BIRD with `ttl security on` accepts podroute only when podroute
//!   sends with TTL 255;
//! - the speaker-wide export rules (no transit) and communities / large communities as BIRD
//!   sees them;
//! - per-peer import and export filters (IPv4 and IPv6), third-party next hop (`Keep`),
//!   allowas-in and a local-AS override.

mod support;

use podroute_bgp::fsm::State;
use podroute_bgp::policy::{
    Community, CommunityRule, ExportRules, FilterAction, FilterRule, MatchOperator, PrefixFilter,
};
use podroute_bgp::rib::BestRoute;
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use support::bird::{Bird, BirdConfig, PeerCfg};
use support::gobgp::{Gobgp, GobgpConfig, NeighborCfg};
use support::{Endpoint, IpNet, require_tool, wait_until};

const T: Duration = Duration::from_secs(40);
const POD_AS: u32 = 64512;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn have_bird() -> bool {
    let r = ["bird", "birdc"].map(require_tool);
    r.iter().all(|x| *x)
}

struct Pod {
    rt: tokio::runtime::Runtime,
    speaker: Speaker,
    ep: Endpoint,
}

impl Pod {
    fn start(asn: u32) -> Pod {
        let ep = Endpoint::alloc();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = SpeakerConfig::new(asn, ep.router_id());
        cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
        cfg.connect_retry = Duration::from_secs(1);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.hold_time = 30;
        let (speaker, best) = rt.block_on(Speaker::start(cfg)).expect("speaker starts");
        std::mem::forget(best);
        Pod { rt, speaker, ep }
    }

    fn peer_cfg(&self, daemon: &Endpoint, remote_as: u32) -> PeerConfig {
        let mut p = PeerConfig::new(IpAddr::V4(daemon.addr), remote_as);
        p.port = daemon.port;
        p.local_addr = Some(IpAddr::V4(self.ep.addr));
        p.local_v4_next_hop = Some(self.ep.nh_v4);
        p.local_v6_next_hop = Some(self.ep.nh_v6);
        p
    }

    fn add_peer(&self, p: PeerConfig) {
        self.rt.block_on(self.speaker.add_peer(p)).unwrap();
    }

    fn announce(&self, p: IpNet) {
        self.rt.block_on(self.speaker.announce(p, None)).unwrap();
    }

    fn set_rules(&self, rules: ExportRules) {
        self.rt
            .block_on(self.speaker.set_export_rules(Some(rules)))
            .unwrap();
    }

    fn peer(&self, addr: Ipv4Addr) -> PeerStatus {
        let peers = self.rt.block_on(self.speaker.peers()).unwrap();
        peers
            .into_iter()
            .find(|p| p.addr == IpAddr::V4(addr))
            .expect("peer configured")
    }

    fn wait_established(&self, addr: Ipv4Addr) {
        wait_until(
            T,
            "podroute session Established",
            || (self.peer(addr).state == State::Established).then_some(()),
            || format!("{:?}", self.peer(addr)),
        )
        .unwrap();
    }

    fn route(&self, prefix: IpNet) -> Option<BestRoute> {
        let rib = self.rt.block_on(self.speaker.loc_rib()).unwrap();
        rib.into_iter()
            .find(|(p, b)| *p == prefix && b.peer != podroute_bgp::rib::LOCAL)
            .map(|(_, b)| b)
    }
}

/// A BIRD peering with `pod` (BIRD active and passive: either side may connect).
fn bird_with(
    pod: &Endpoint,
    bird_as: u32,
    pod_as: u32,
    tweak: impl FnOnce(&mut PeerCfg, &mut BirdConfig),
) -> Bird {
    let mut p = PeerCfg::new("pod", pod, pod_as);
    let mut cfg = BirdConfig::new(Endpoint::alloc(), bird_as);
    tweak(&mut p, &mut cfg);
    Bird::start(cfg.peer(p)).unwrap()
}

/// Watches a session that must not come up for `span`: it never reaches Established at
/// BIRD, nor (with `ours`) at podroute.
fn never_established(pod: &Pod, bird: &Bird, span: Duration, ours: bool) -> PeerStatus {
    let end = std::time::Instant::now() + span;
    while std::time::Instant::now() < end {
        let s = pod.peer(bird.endpoint().addr);
        if ours {
            assert_ne!(s.state, State::Established, "session came up: {s:?}");
        }
        let theirs = bird.protocol_state("pod");
        assert!(
            !theirs.contains("Established"),
            "BIRD: {theirs}; podroute: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    pod.peer(bird.endpoint().addr)
}

#[test]
fn tcp_md5_right_key_establishes_wrong_key_does_not() {
    if !have_bird() {
        return;
    }
    for (key, ok) in [("s3cret-key", true), ("not-the-key", false)] {
        let pod = Pod::start(POD_AS);
        let bird = bird_with(&pod.ep, 65001, POD_AS, |p, _| {
            p.extra = "  password \"s3cret-key\";\n".into();
        });
        let mut cfg = pod.peer_cfg(&bird.endpoint(), 65001);
        cfg.password = Some(Arc::from(key.as_bytes()));
        pod.add_peer(cfg);
        if ok {
            pod.wait_established(bird.endpoint().addr);
            pod.announce(net("10.61.0.0/26"));
            bird.wait_route(net("10.61.0.0/26"), "pod", T).unwrap();
        } else {
            let s = never_established(&pod, &bird, Duration::from_secs(8), true);
            // The kernel drops segments with a wrong signature: podroute sees no answer.
            assert!(
                s.connect_failures > 0 || s.last_error.is_some(),
                "the failure shows in the status: {s:?}"
            );
        }
    }
}

#[test]
fn a_session_without_the_key_bird_requires_fails() {
    if !have_bird() {
        return;
    }
    let pod = Pod::start(POD_AS);
    let bird = bird_with(&pod.ep, 65001, POD_AS, |p, _| {
        p.extra = "  password \"s3cret-key\";\n".into();
    });
    pod.add_peer(pod.peer_cfg(&bird.endpoint(), 65001));
    never_established(&pod, &bird, Duration::from_secs(6), true);
}

#[test]
fn gtsm_bird_with_ttl_security_accepts_only_ttl_255() {
    if !have_bird() {
        return;
    }
    for gtsm in [true, false] {
        let pod = Pod::start(POD_AS);
        // BIRD's multihop default (64 hops) makes it drop segments with TTL below 192; a
        // plain socket sends 64.
        // BIRD passive: podroute's own socket makes the connection (the listener sends with
        // TTL 255 for everyone, so an inbound session would pass BIRD's check either way).
        let bird = bird_with(&pod.ep, 65001, POD_AS, |p, _| {
            p.extra = "  ttl security on;\n".into();
            p.passive = true;
        });
        let mut cfg = pod.peer_cfg(&bird.endpoint(), 65001);
        if gtsm {
            cfg.ttl_security = Some(64);
        }
        pod.add_peer(cfg);
        if gtsm {
            pod.wait_established(bird.endpoint().addr);
        } else {
            // BIRD sets IP_MINTTL once it has accepted the connection, so podroute's OPEN can
            // slip in before it and podroute may see BIRD's OPEN and KEEPALIVE; every later
            // segment of ours (the KEEPALIVE BIRD waits for) is dropped, so BIRD never gets
            // past OpenConfirm.
            never_established(&pod, &bird, Duration::from_secs(6), false);
        }
    }
}

/// Two BIRD "ToRs": A sends a default route, an external /24 and a prefix inside the pool;
/// B gets only what the export rules allow, with the configured communities.
#[test]
fn export_rules_no_transit_and_communities_at_bird() {
    if !have_bird() {
        return;
    }
    let pod = Pod::start(POD_AS);
    pod.set_rules(ExportRules {
        deny: vec![net("10.99.0.0/16")],
        aggregates: vec![net("10.60.1.0/26")],
        allow: vec![net("10.60.0.0/16"), net("10.96.0.0/12")],
        communities: vec![CommunityRule {
            cidr: net("10.60.1.0/24"),
            communities: vec![
                Community::Standard((65000 << 16) | 100),
                Community::Large(64512, 7, 9),
            ],
        }],
    });
    let tor_a = bird_with(&pod.ep, 65010, POD_AS, |_, c| {
        c.static_v4 = vec![
            net("0.0.0.0/0"),
            net("198.51.100.0/24"),
            net("10.60.7.0/26"),
        ];
    });
    let tor_b = bird_with(&pod.ep, 65020, POD_AS, |_, _| {});
    pod.add_peer(pod.peer_cfg(&tor_a.endpoint(), 65010));
    pod.add_peer(pod.peer_cfg(&tor_b.endpoint(), 65020));
    for p in [
        "10.60.1.0/26",
        "10.60.1.7/32",
        "10.99.1.0/26",
        "10.96.0.10/32",
    ] {
        pod.announce(net(p));
    }
    pod.wait_established(tor_a.endpoint().addr);
    pod.wait_established(tor_b.endpoint().addr);
    // podroute learned all of A's routes (imports are not filtered)...
    wait_until(
        T,
        "podroute learns ToR-A's routes",
        || {
            pod.route(net("0.0.0.0/0"))
                .and(pod.route(net("10.60.7.0/26")))
        },
        || format!("{:?}", pod.peer(tor_a.endpoint().addr)),
    )
    .unwrap();
    // ...and ToR-B holds exactly what the rules allow.
    let own = tor_b.wait_route(net("10.60.1.0/26"), "pod", T).unwrap();
    tor_b.wait_route(net("10.60.7.0/26"), "pod", T).unwrap();
    tor_b.wait_route(net("10.96.0.10/32"), "pod", T).unwrap();
    let got: Vec<IpNet> = tor_b
        .routes_v4()
        .unwrap()
        .into_iter()
        .filter(|r| r.from_protocol == "pod")
        .map(|r| r.prefix)
        .collect();
    let mut got = got;
    got.sort();
    assert_eq!(
        got,
        vec![
            net("10.60.1.0/26"),
            net("10.60.7.0/26"),
            net("10.96.0.10/32")
        ],
        "ToR-B must get pool and service routes only"
    );
    assert_eq!(own.communities, vec![(65000, 100)]);
    let large = tor_b
        .birdc(&["show", "route", "for", "10.60.1.0/26", "all"])
        .unwrap();
    assert!(
        large.contains("BGP.large_community: (64512, 7, 9)"),
        "large community at BIRD:\n{large}"
    );
    // The reflected pool route from A carries no community (outside the /24).
    let other = tor_b.wait_route(net("10.60.7.0/26"), "pod", T).unwrap();
    assert!(other.communities.is_empty());
}

fn rule(cidr: &str, op: MatchOperator, action: FilterAction) -> FilterRule {
    FilterRule {
        cidr: Some(net(cidr)),
        operator: op,
        prefix_length: None,
        only_remote_peers: false,
        action,
    }
}

/// Per-peer filters v4 and v6, each operator; `Keep` next hop; allowas-in; local AS.
#[test]
fn peer_filters_next_hop_keep_allowas_in_and_local_as_at_bird() {
    if !have_bird() {
        return;
    }
    let pod = Pod::start(POD_AS);
    // ToR-A announces: 198.51.100.0/24 with a path holding our AS once (allowas-in), two v4
    // and two v6 prefixes that the import filter sorts. ToR-A knows podroute as AS 65100 (a
    // local-AS override on that session too): BIRD never sends a route whose path holds the
    // receiving neighbour's AS, so the path carries the speaker's own 64512 instead, which is
    // ours as well.
    let tor_a = bird_with(&pod.ep, 65010, 65100, |p, c| {
        c.static_v4 = vec![
            net("198.51.100.0/24"),
            net("203.0.113.0/24"),
            net("203.0.113.128/25"),
        ];
        c.static_v6 = vec![net("2001:db8:1::/48"), net("2001:db8:2::/48")];
        p.extra = format!(
            "  ipv4 {{ import all; export filter {{ if net = 198.51.100.0/24 then bgp_path = prepend(+empty+, {POD_AS}); accept; }}; next hop address {}; igp table igp4; }};\n",
            c.endpoint.nh_v4
        );
        p.ipv4 = false;
    });
    // ToR-B: eBGP with podroute seen as AS 65100 (local-AS override), next hop kept.
    let tor_b = bird_with(&pod.ep, 65020, 65100, |_, _| {});
    let mut a = pod.peer_cfg(&tor_a.endpoint(), 65010);
    a.local_as = Some(65100);
    a.allow_own_as = 1;
    a.import_filter = Some(Arc::new(PrefixFilter {
        v4: vec![rule(
            "203.0.113.128/25",
            MatchOperator::Equal,
            FilterAction::Reject,
        )],
        v6: vec![rule(
            "2001:db8:1::/48",
            MatchOperator::NotEqual,
            FilterAction::Reject,
        )],
    }));
    pod.add_peer(a);
    let mut b = pod.peer_cfg(&tor_b.endpoint(), 65020);
    b.local_as = Some(65100);
    b.next_hop_keep = true;
    b.export_filter = Some(Arc::new(PrefixFilter {
        v4: vec![
            rule("203.0.113.0/24", MatchOperator::In, FilterAction::Accept),
            rule("10.62.0.0/16", MatchOperator::NotIn, FilterAction::Reject),
        ],
        v6: vec![rule(
            "2001:db8::/32",
            MatchOperator::In,
            FilterAction::Reject,
        )],
    }));
    pod.add_peer(b);
    pod.announce(net("10.62.0.0/26"));
    pod.wait_established(tor_a.endpoint().addr);
    pod.wait_established(tor_b.endpoint().addr);
    // Import: allowas-in took the path with our AS once; the filter refused the /25 and
    // every v6 prefix but 2001:db8:1::/48.
    wait_until(
        T,
        "podroute learns 198.51.100.0/24 (allowas-in) and 2001:db8:1::/48",
        || {
            pod.route(net("198.51.100.0/24"))
                .and(pod.route(net("2001:db8:1::/48")))
        },
        || {
            format!(
                "{:?}\n{:?}\n{}",
                pod.peer(tor_a.endpoint().addr),
                tor_a.birdc(&["show", "route", "all", "export", "pod"]),
                support::tail_file(&tor_a.log_path(), 30)
            )
        },
    )
    .unwrap();
    assert!(pod.route(net("203.0.113.0/24")).is_some());
    assert!(pod.route(net("203.0.113.128/25")).is_none());
    assert!(pod.route(net("2001:db8:2::/48")).is_none());
    let sa = pod.peer(tor_a.endpoint().addr);
    assert_eq!(sa.routes_rejected_filter, 2, "{sa:?}");
    // Export to B: 203.0.113.0/24 accepted by its filter with ToR-A's next hop kept and
    // AS 65100 prepended; our 10.62.0.0/26 passes; 198.51.100.0/24 is rejected by NotIn; v6
    // in 2001:db8::/32 rejected.
    let r = tor_b.wait_route(net("203.0.113.0/24"), "pod", T).unwrap();
    assert_eq!(r.next_hop, Some(IpAddr::V4(tor_a.endpoint().nh_v4)));
    assert_eq!(r.as_path, vec![65100, 65010]);
    let own = tor_b.wait_route(net("10.62.0.0/26"), "pod", T).unwrap();
    assert_eq!(own.next_hop, Some(IpAddr::V4(pod.ep.nh_v4)));
    assert_eq!(own.as_path, vec![65100]);
    assert!(tor_b.route(net("198.51.100.0/24")).unwrap().is_empty());
    assert!(tor_b.route(net("2001:db8:1::/48")).unwrap().is_empty());
}

/// GoBGP: TCP-MD5 with the right key (and not without it), and the export rules'
/// communities and large communities as GoBGP sees them.
#[test]
fn gobgp_md5_and_communities() {
    let r = ["gobgpd", "gobgp"].map(require_tool);
    if !r.iter().all(|x| *x) {
        return;
    }
    for keyed in [true, false] {
        let pod = Pod::start(POD_AS);
        pod.set_rules(ExportRules {
            allow: vec![net("10.63.0.0/16")],
            communities: vec![CommunityRule {
                cidr: net("10.63.0.0/16"),
                communities: vec![
                    Community::Standard((65000 << 16) | 200),
                    Community::Large(64512, 3, 4),
                ],
            }],
            ..ExportRules::default()
        });
        let mut n = NeighborCfg::new(&pod.ep, POD_AS);
        n.auth_password = Some("gobgp-key".into());
        n.ipv6 = false;
        let gobgp = Gobgp::start(GobgpConfig::new(Endpoint::alloc(), 65003).neighbor(n)).unwrap();
        let mut cfg = pod.peer_cfg(&gobgp.endpoint(), 65003);
        if keyed {
            cfg.password = Some(Arc::from(&b"gobgp-key"[..]));
        }
        pod.add_peer(cfg);
        pod.announce(net("10.63.1.0/26"));
        pod.announce(net("10.64.1.0/26")); // outside the rules: never sent
        if !keyed {
            let end = std::time::Instant::now() + Duration::from_secs(6);
            while std::time::Instant::now() < end {
                let s = pod.peer(gobgp.endpoint().addr);
                assert_ne!(s.state, State::Established, "no key, no session: {s:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            continue;
        }
        pod.wait_established(gobgp.endpoint().addr);
        let r = gobgp
            .wait_route(net("10.63.1.0/26"), &pod.ep.addr.to_string(), T)
            .unwrap();
        assert_eq!(r.communities, vec![(65000, 200)]);
        let text = gobgp.cli(&["global", "rib", "-a", "ipv4"]).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("10.63.1.0/26"))
            .unwrap_or_default();
        assert!(
            line.contains("64512:3:4"),
            "large community at GoBGP:\n{text}"
        );
        assert!(
            !text.contains("10.64.1.0/26"),
            "outside the export rules:\n{text}"
        );
    }
}
