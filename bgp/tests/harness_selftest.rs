//! Proves the interop harness (tests/support) by making BIRD 2 and GoBGP peer with each
//! other: sessions both ways round, routes both ways for IPv4 /26 and IPv6 /122 over one
//! IPv4 session, withdrawals, kill/restart, and a wrong peer AS.

mod support;

use std::time::Duration;

use support::bird::{Bird, BirdConfig, PeerCfg};
use support::gobgp::{Gobgp, GobgpConfig, NeighborCfg};
use support::{Endpoint, IpNet};

const T: Duration = Duration::from_secs(30);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

struct Pair {
    bird: Bird,
    gobgp: Gobgp,
    b_ep: Endpoint,
    g_ep: Endpoint,
}

/// BIRD (AS bird_as, protocol "gobgp") <-> GoBGP (AS gobgp_as). `bird_passive` picks which
/// side waits for the other to connect.
fn pair(
    bird_as: u32,
    gobgp_as: u32,
    bird_passive: bool,
    tweak: impl FnOnce(&mut PeerCfg, &mut NeighborCfg),
) -> Pair {
    let b_ep = Endpoint::alloc();
    let g_ep = Endpoint::alloc();
    let mut bp = PeerCfg::new("gobgp", &g_ep, gobgp_as);
    bp.passive = bird_passive;
    let mut gn = NeighborCfg::new(&b_ep, bird_as);
    gn.passive = !bird_passive;
    tweak(&mut bp, &mut gn);
    let bird = Bird::start(BirdConfig::new(b_ep, bird_as).peer(bp)).unwrap();
    let gobgp = Gobgp::start(GobgpConfig::new(g_ep, gobgp_as).neighbor(gn)).unwrap();
    Pair {
        bird,
        gobgp,
        b_ep,
        g_ep,
    }
}

fn established(p: &Pair) {
    p.bird.wait_established("gobgp", T).unwrap();
    p.gobgp.wait_established(p.b_ep.addr, T).unwrap();
}

/// Routes both ways, both families, then withdrawals both ways.
fn exchange_routes(p: &mut Pair, ebgp: bool) {
    let b4 = net("10.100.1.0/26");
    let b6 = net("fd00:100:1::/122");
    let g4 = net("10.100.2.64/26");
    let g6 = net("fd00:100:2::40/122");
    p.bird.add_static(b4).unwrap();
    p.bird.add_static(b6).unwrap();
    p.gobgp
        .add_route(g4, None, &["community", "65000:100"])
        .unwrap();
    p.gobgp.add_route(g6, None, &[]).unwrap();

    let from_b = p.b_ep.addr.to_string();
    let r = p.gobgp.wait_route(b4, &from_b, T).unwrap();
    assert_eq!(r.next_hop, Some(p.b_ep.nh_v4.into()), "{r:?}");
    let r6 = p.gobgp.wait_route(b6, &from_b, T).unwrap();
    assert_eq!(r6.next_hop, Some(p.b_ep.nh_v6.into()), "{r6:?}");
    if ebgp {
        assert_eq!(r.as_path, vec![p.bird.cfg.local_as]);
        assert_eq!(r6.as_path, vec![p.bird.cfg.local_as]);
    } else {
        assert!(r.as_path.is_empty(), "{r:?}");
    }

    let r = p.bird.wait_route(g4, "gobgp", T).unwrap();
    assert_eq!(r.next_hop, Some(p.g_ep.nh_v4.into()), "{r:?}");
    assert_eq!(r.communities, vec![(65000, 100)]);
    let r6 = p.bird.wait_route(g6, "gobgp", T).unwrap();
    assert_eq!(r6.next_hop, Some(p.g_ep.nh_v6.into()), "{r6:?}");
    if ebgp {
        assert_eq!(r.as_path, vec![p.gobgp.cfg.local_as]);
    } else {
        assert!(r.as_path.is_empty(), "{r:?}");
        assert_eq!(r.local_pref, Some(100));
    }

    // Withdraw both ways.
    p.bird.remove_static(b6).unwrap();
    p.gobgp.del_route(g4).unwrap();
    p.gobgp.wait_no_route(b6, &from_b, T).unwrap();
    p.bird.wait_no_route(g4, "gobgp", T).unwrap();
    // The others stay.
    assert_eq!(p.gobgp.route(b4).unwrap().len(), 1);
    assert_eq!(
        p.bird
            .route(g6)
            .unwrap()
            .iter()
            .filter(|r| r.from_protocol == "gobgp")
            .count(),
        1
    );
}

#[test]
fn ebgp_bird_active_gobgp_passive() {
    if !support::require_daemons() {
        return;
    }
    let mut p = pair(65001, 65002, false, |_, _| {});
    established(&p);
    exchange_routes(&mut p, true);
}

#[test]
fn ebgp_gobgp_active_bird_passive() {
    if !support::require_daemons() {
        return;
    }
    let mut p = pair(65001, 65002, true, |_, _| {});
    established(&p);
    exchange_routes(&mut p, true);
}

#[test]
fn ibgp_both_families() {
    if !support::require_daemons() {
        return;
    }
    let mut p = pair(64512, 64512, false, |_, _| {});
    established(&p);
    exchange_routes(&mut p, false);
}

#[test]
fn kill_and_restart_gobgp() {
    if !support::require_daemons() {
        return;
    }
    // GR off on both sides: BIRD must drop GoBGP's routes as soon as the session dies.
    let mut p = pair(65001, 65002, false, |b, _| b.graceful_restart = false);
    established(&p);
    let g4 = net("10.100.3.0/26");
    let g6 = net("fd00:100:3::/122");
    p.gobgp.add_route(g4, None, &[]).unwrap();
    p.gobgp.add_route(g6, None, &[]).unwrap();
    p.bird.wait_route(g4, "gobgp", T).unwrap();
    p.bird.wait_route(g6, "gobgp", T).unwrap();

    p.gobgp.kill();
    assert!(!p.gobgp.is_running());
    support::wait_for(
        T,
        "BIRD to notice GoBGP died",
        || p.bird.protocol_state("gobgp") != "Established",
        || p.bird.diag(),
    )
    .unwrap();
    p.bird.wait_no_route(g4, "gobgp", T).unwrap();
    p.bird.wait_no_route(g6, "gobgp", T).unwrap();
    eprintln!(
        "BIRD after peer crash: state={:?} last_error={:?}",
        p.bird.protocol_state("gobgp"),
        p.bird.last_error("gobgp")
    );

    p.gobgp.restart().unwrap();
    established(&p);
    p.bird.wait_route(g4, "gobgp", T).unwrap();
    p.bird.wait_route(g6, "gobgp", T).unwrap();
}

#[test]
fn kill_and_restart_bird() {
    if !support::require_daemons() {
        return;
    }
    // BIRD passive: after its restart GoBGP has to reconnect.
    let mut p = pair(65001, 65002, true, |_, _| {});
    established(&p);
    let b4 = net("10.100.4.0/26");
    let b6 = net("fd00:100:4::/122");
    p.bird.add_static(b4).unwrap();
    p.bird.add_static(b6).unwrap();
    let from_b = p.b_ep.addr.to_string();
    p.gobgp.wait_route(b4, &from_b, T).unwrap();
    p.gobgp.wait_route(b6, &from_b, T).unwrap();

    p.bird.kill();
    support::wait_for(
        T,
        "GoBGP to notice BIRD died",
        || p.gobgp.neighbor_state(p.b_ep.addr) != "Established",
        || p.gobgp.diag(),
    )
    .unwrap();
    p.gobgp.wait_no_route(b4, &from_b, T).unwrap();
    eprintln!(
        "GoBGP after peer crash: {:?}",
        p.gobgp.last_error(p.b_ep.addr)
    );

    p.bird.restart().unwrap();
    established(&p);
    p.gobgp.wait_route(b4, &from_b, T).unwrap();
    p.gobgp.wait_route(b6, &from_b, T).unwrap();
}

#[test]
fn wrong_as_configured_in_bird() {
    if !support::require_daemons() {
        return;
    }
    // BIRD expects AS 65009 but GoBGP is 65002: BIRD sends NOTIFICATION 2/2 (Bad peer AS).
    let p = pair(65001, 65002, false, |b, _| b.remote_as = 65009);
    let e = support::wait_until(
        T,
        "BIRD last error",
        || p.bird.last_error("gobgp"),
        || p.bird.diag(),
    )
    .unwrap();
    eprintln!("BIRD (sender) last error: {e:?}");
    eprintln!("BIRD (sender) log: {}", p.bird.log_tail(8));
    // GoBGP is in OpenConfirm when BIRD's NOTIFICATION arrives: it logs no code, only a
    // fall back to Idle with reason=invalid-msg; the counter shows it was a NOTIFICATION.
    support::wait_for(
        T,
        "GoBGP to count the NOTIFICATION",
        || p.gobgp.notifications(p.b_ep.addr).1 > 0,
        || p.gobgp.diag(),
    )
    .unwrap();
    let g = p.gobgp.last_error(p.b_ep.addr).unwrap_or_default();
    eprintln!(
        "GoBGP (receiver) error lines:\n{}",
        p.gobgp.error_lines(p.b_ep.addr).join("\n")
    );
    assert!(e.contains("Bad peer AS"), "{e}");
    assert!(
        g.contains("reason=invalid-msg") || g.contains("Code=2"),
        "{g}"
    );
    assert_ne!(p.bird.protocol_state("gobgp"), "Established");
}

#[test]
fn wrong_as_configured_in_gobgp() {
    if !support::require_daemons() {
        return;
    }
    // GoBGP expects AS 65009 but BIRD is 65001: GoBGP sends NOTIFICATION 2/2.
    let p = pair(65001, 65002, true, |_, g| g.remote_as = 65009);
    let e = support::wait_until(
        T,
        "BIRD last error",
        || p.bird.last_error("gobgp"),
        || p.bird.diag(),
    )
    .unwrap();
    eprintln!("BIRD (receiver) last error: {e:?}");
    eprintln!("BIRD (receiver) log: {}", p.bird.log_tail(8));
    let g = support::wait_until(
        T,
        "GoBGP to log the NOTIFICATION it sent",
        || {
            p.gobgp
                .error_lines(p.b_ep.addr)
                .into_iter()
                .find(|l| l.contains("sent notification"))
        },
        || p.gobgp.diag(),
    )
    .unwrap();
    eprintln!(
        "GoBGP (sender) error lines:\n{}",
        p.gobgp.error_lines(p.b_ep.addr).join("\n")
    );
    assert!(e.contains("Bad peer AS"), "{e}");
    assert!(
        g.contains("as number mismatch expected 65009, received 65001"),
        "{g}"
    );
    assert!(p.gobgp.notifications(p.b_ep.addr).0 > 0);
}

#[test]
fn graceful_stop_sends_cease() {
    if !support::require_daemons() {
        return;
    }
    let mut p = pair(65001, 65002, false, |_, _| {});
    established(&p);
    p.gobgp.stop();
    let e = support::wait_until(
        T,
        "BIRD last error",
        || p.bird.last_error("gobgp"),
        || p.bird.diag(),
    )
    .unwrap();
    eprintln!("BIRD after GoBGP SIGTERM: {e:?}");
    p.gobgp.restart().unwrap();
    established(&p);
    p.bird.stop();
    let g = support::wait_until(
        T,
        "GoBGP to log the Cease",
        || {
            p.gobgp
                .error_lines(p.b_ep.addr)
                .into_iter()
                .find(|l| l.contains("notification"))
        },
        || p.gobgp.diag(),
    )
    .unwrap();
    eprintln!(
        "GoBGP after BIRD SIGTERM:\n{}",
        p.gobgp.error_lines(p.b_ep.addr).join("\n")
    );
    let _ = g;
}

#[test]
fn graceful_restart_keeps_routes_and_hold_time_negotiates() {
    if !support::require_daemons() {
        return;
    }
    // GR on both sides, hold 9 in BIRD vs 30 in GoBGP: the smaller one wins.
    let mut p = pair(65001, 65002, false, |b, g| {
        b.hold = 9;
        g.graceful_restart = true;
        g.gr_time = 60;
    });
    established(&p);
    assert_eq!(p.bird.negotiated_hold("gobgp"), Some(9));
    assert_eq!(p.gobgp.negotiated_hold(p.b_ep.addr), Some(9));
    assert!(p.bird.neighbor_has_capability("gobgp", "Graceful restart"));
    let g4 = net("10.100.5.0/26");
    p.gobgp.add_route(g4, None, &[]).unwrap();
    p.bird.wait_route(g4, "gobgp", T).unwrap();

    // Crash GoBGP: BIRD (GR helper) keeps its routes as stale while it restarts.
    p.gobgp.kill();
    support::wait_for(
        T,
        "BIRD to notice",
        || p.bird.protocol_state("gobgp") != "Established",
        || p.bird.diag(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        p.bird.route(g4).unwrap().len(),
        1,
        "stale route kept during GR"
    );
    p.gobgp.restart().unwrap();
    established(&p);
    p.bird.wait_route(g4, "gobgp", T).unwrap();
}

#[test]
fn bird_route_reflector_with_two_gobgp_clients() {
    if !support::require_daemons() {
        return;
    }
    const AS: u32 = 64512;
    let rr = Endpoint::alloc();
    let c1 = Endpoint::alloc();
    let c2 = Endpoint::alloc();
    let mut p1 = PeerCfg::new("c1", &c1, AS);
    p1.rr_client = true;
    p1.passive = true;
    let mut p2 = PeerCfg::new("c2", &c2, AS);
    p2.rr_client = true;
    p2.passive = true;
    let bird = Bird::start(BirdConfig::new(rr, AS).peer(p1).peer(p2)).unwrap();
    let mut g1 =
        Gobgp::start(GobgpConfig::new(c1, AS).neighbor(NeighborCfg::new(&rr, AS))).unwrap();
    let g2 = Gobgp::start(GobgpConfig::new(c2, AS).neighbor(NeighborCfg::new(&rr, AS))).unwrap();
    bird.wait_established("c1", T).unwrap();
    bird.wait_established("c2", T).unwrap();

    let r4 = net("10.100.6.0/26");
    let r6 = net("fd00:100:6::/122");
    g1.add_route(r4, None, &[]).unwrap();
    g1.add_route(r6, None, &[]).unwrap();
    let rr_from = rr.addr.to_string();
    // Reflected unchanged: client 1's next hop, empty AS path.
    let got = g2.wait_route(r4, &rr_from, T).unwrap();
    assert_eq!(got.next_hop, Some(c1.nh_v4.into()));
    assert!(got.as_path.is_empty());
    let got6 = g2.wait_route(r6, &rr_from, T).unwrap();
    assert_eq!(got6.next_hop, Some(c1.nh_v6.into()));
    g1.del_route(r4).unwrap();
    g2.wait_no_route(r4, &rr_from, T).unwrap();
}

#[test]
fn gobgp_route_reflector_with_bird_client() {
    if !support::require_daemons() {
        return;
    }
    const AS: u32 = 64512;
    let rr = Endpoint::alloc();
    let c1 = Endpoint::alloc();
    let c2 = Endpoint::alloc();
    let mut n1 = NeighborCfg::new(&c1, AS);
    n1.rr_client = true;
    let mut n2 = NeighborCfg::new(&c2, AS);
    n2.rr_client = true;
    let gob = Gobgp::start(GobgpConfig::new(rr, AS).neighbor(n1).neighbor(n2)).unwrap();
    let mut b1 =
        Bird::start(BirdConfig::new(c1, AS).peer(PeerCfg::new("reflector", &rr, AS))).unwrap();
    let b2 = Bird::start(BirdConfig::new(c2, AS).peer(PeerCfg::new("reflector", &rr, AS))).unwrap();
    gob.wait_established(c1.addr, T).unwrap();
    gob.wait_established(c2.addr, T).unwrap();
    let r4 = net("10.100.7.0/26");
    b1.add_static(r4).unwrap();
    let got = b2.wait_route(r4, "reflector", T).unwrap();
    assert_eq!(got.next_hop, Some(c1.nh_v4.into()));
    b1.remove_static(r4).unwrap();
    b2.wait_no_route(r4, "reflector", T).unwrap();
}

#[test]
fn ipv4_only_and_ipv6_only_sessions() {
    if !support::require_daemons() {
        return;
    }
    // IPv4-only session: an IPv6 route is not exchanged, IPv4 is.
    let mut p = pair(65001, 65002, false, |b, g| {
        b.ipv6 = false;
        g.ipv6 = false;
    });
    established(&p);
    p.gobgp.add_route(net("10.100.8.0/26"), None, &[]).unwrap();
    p.gobgp
        .add_route(net("fd00:100:8::/122"), None, &[])
        .unwrap();
    p.bird.wait_route(net("10.100.8.0/26"), "gobgp", T).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(p.bird.route(net("fd00:100:8::/122")).unwrap().is_empty());
    drop(p);

    let mut p = pair(65001, 65002, true, |b, g| {
        b.ipv4 = false;
        g.ipv4 = false;
    });
    established(&p);
    p.bird.add_static(net("fd00:100:9::/122")).unwrap();
    let from_b = p.b_ep.addr.to_string();
    p.gobgp
        .wait_route(net("fd00:100:9::/122"), &from_b, T)
        .unwrap();
}

/// What each daemon reports when its peer (podroute) sends it a NOTIFICATION 2/2 (Bad peer
/// AS) in OpenSent (before our OPEN) and in OpenConfirm (after our OPEN).
#[test]
fn daemons_report_received_open_error_notification() {
    use support::raw::{self, RawPeer};
    if !support::require_daemons() {
        return;
    }
    for after_open in [false, true] {
        let me = Endpoint::alloc();
        let peer = RawPeer::listen(me).unwrap();
        let b_ep = Endpoint::alloc();
        let bird =
            Bird::start(BirdConfig::new(b_ep, 65001).peer(PeerCfg::new("podroute", &me, 65010)))
                .unwrap();
        let mut s = peer.accept(T).unwrap();
        let (t, _) = raw::read_msg(&mut s).unwrap();
        assert_eq!(t, raw::OPEN);
        if after_open {
            raw::write_msg(&mut s, raw::OPEN, &raw::open_body(65010, 90, me.addr)).unwrap();
        }
        raw::write_msg(
            &mut s,
            raw::NOTIFICATION,
            &raw::notification_body(2, 2, &[0xfd, 0xf2]),
        )
        .unwrap();
        let e = support::wait_until(
            T,
            "BIRD last error",
            || bird.last_error("podroute"),
            || bird.diag(),
        )
        .unwrap();
        eprintln!("BIRD got NOTIFICATION 2/2 (after our OPEN: {after_open}): last_error={e:?}");
        eprintln!(
            "  log: {}",
            bird.log_tail(12)
                .lines()
                .filter(|l| l.contains("<RMT>") || l.contains("Error") || l.contains("Received"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        assert_eq!(e, "Received: Bad peer AS");
        drop(s);

        let me = Endpoint::alloc();
        let peer = RawPeer::listen(me).unwrap();
        let g_ep = Endpoint::alloc();
        let gobgp =
            Gobgp::start(GobgpConfig::new(g_ep, 65002).neighbor(NeighborCfg::new(&me, 65010)))
                .unwrap();
        let mut s = peer.accept(T).unwrap();
        let (t, _) = raw::read_msg(&mut s).unwrap();
        assert_eq!(t, raw::OPEN);
        if after_open {
            raw::write_msg(&mut s, raw::OPEN, &raw::open_body(65010, 90, me.addr)).unwrap();
        }
        raw::write_msg(
            &mut s,
            raw::NOTIFICATION,
            &raw::notification_body(2, 2, &[0xfd, 0xf2]),
        )
        .unwrap();
        support::wait_for(
            T,
            "GoBGP to count it",
            || gobgp.notifications(me.addr).1 > 0,
            || gobgp.diag(),
        )
        .unwrap();
        support::wait_for(
            T,
            "GoBGP to log it",
            || gobgp.last_error(me.addr).is_some(),
            || gobgp.diag(),
        )
        .unwrap();
        eprintln!(
            "GoBGP got NOTIFICATION 2/2 (after our OPEN: {after_open}):\n  {}",
            gobgp.error_lines(me.addr).join("\n  ")
        );
    }
}

#[test]
fn bird_lists_every_path_and_marks_the_best() {
    if !support::require_daemons() {
        return;
    }
    let b_ep = Endpoint::alloc();
    let g1 = Endpoint::alloc();
    let g2 = Endpoint::alloc();
    let bird = Bird::start(
        BirdConfig::new(b_ep, 65001)
            .peer(PeerCfg::new("g1", &g1, 65011))
            .peer(PeerCfg::new("g2", &g2, 65012)),
    )
    .unwrap();
    let mut gob1 =
        Gobgp::start(GobgpConfig::new(g1, 65011).neighbor(NeighborCfg::new(&b_ep, 65001))).unwrap();
    let mut gob2 =
        Gobgp::start(GobgpConfig::new(g2, 65012).neighbor(NeighborCfg::new(&b_ep, 65001))).unwrap();
    let r = net("10.100.10.0/26");
    // g2's path has a longer AS path, so g1's wins.
    gob1.add_route(r, None, &["community", "65011:1,65011:2"])
        .unwrap();
    gob2.add_route(r, None, &["aspath", "65099"]).unwrap();
    bird.wait_route(r, "g1", T).unwrap();
    bird.wait_route(r, "g2", T).unwrap();
    eprintln!(
        "{}",
        bird.birdc(&["show", "route", "all", "for", "10.100.10.0/26"])
            .unwrap()
    );
    let paths = bird.route(r).unwrap();
    assert_eq!(paths.len(), 2, "{paths:?}");
    let p1 = paths.iter().find(|p| p.from_protocol == "g1").unwrap();
    let p2 = paths.iter().find(|p| p.from_protocol == "g2").unwrap();
    assert!(p1.best && !p2.best, "{paths:?}");
    assert_eq!(p1.communities, vec![(65011, 1), (65011, 2)]);
    assert_eq!(p2.as_path, vec![65012, 65099]);
    // GoBGP side: both g1 and g2 get BIRD's best (g1's) path, g1 then has it from BIRD too?
    // No: BIRD does not send g1's path back to g1's AS (loop); g2 gets it with AS 65001 65011.
    let got = gob2.wait_route(r, &b_ep.addr.to_string(), T).unwrap();
    assert_eq!(got.as_path, vec![65001, 65011]);
    let all = gob2.route(r).unwrap();
    assert_eq!(all.iter().filter(|p| p.best).count(), 1, "{all:?}");
    let _ = gob1.del_route(r);
}
