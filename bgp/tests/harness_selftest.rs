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
fn pair(bird_as: u32, gobgp_as: u32, bird_passive: bool, tweak: impl FnOnce(&mut PeerCfg, &mut NeighborCfg)) -> Pair {
    let b_ep = Endpoint::alloc();
    let g_ep = Endpoint::alloc();
    let mut bp = PeerCfg::new("gobgp", &g_ep, gobgp_as);
    bp.passive = bird_passive;
    let mut gn = NeighborCfg::new(&b_ep, bird_as);
    gn.passive = !bird_passive;
    tweak(&mut bp, &mut gn);
    let bird = Bird::start(BirdConfig::new(b_ep, bird_as).peer(bp)).unwrap();
    let gobgp = Gobgp::start(GobgpConfig::new(g_ep, gobgp_as).neighbor(gn)).unwrap();
    Pair { bird, gobgp, b_ep, g_ep }
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
    p.gobgp.add_route(g4, None, &["community", "65000:100"]).unwrap();
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
    assert_eq!(p.bird.route(g6).unwrap().iter().filter(|r| r.from_protocol == "gobgp").count(), 1);
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
    support::wait_for(T, "BIRD to notice GoBGP died", || p.bird.protocol_state("gobgp") != "Established", || p.bird.diag()).unwrap();
    p.bird.wait_no_route(g4, "gobgp", T).unwrap();
    p.bird.wait_no_route(g6, "gobgp", T).unwrap();
    eprintln!("BIRD after peer crash: state={:?} last_error={:?}", p.bird.protocol_state("gobgp"), p.bird.last_error("gobgp"));

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
    support::wait_for(T, "GoBGP to notice BIRD died", || p.gobgp.neighbor_state(p.b_ep.addr) != "Established", || p.gobgp.diag()).unwrap();
    p.gobgp.wait_no_route(b4, &from_b, T).unwrap();
    eprintln!("GoBGP after peer crash: {:?}", p.gobgp.last_error(p.b_ep.addr));

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
    let e = support::wait_until(T, "BIRD last error", || p.bird.last_error("gobgp"), || p.bird.diag()).unwrap();
    eprintln!("BIRD (sender) last error: {e:?}");
    eprintln!("BIRD (sender) log: {}", p.bird.log_tail(8));
    // GoBGP is in OpenConfirm when BIRD's NOTIFICATION arrives: it logs no code, only a
    // fall back to Idle with reason=invalid-msg; the counter shows it was a NOTIFICATION.
    support::wait_for(T, "GoBGP to count the NOTIFICATION", || p.gobgp.notifications(p.b_ep.addr).1 > 0, || p.gobgp.diag()).unwrap();
    let g = p.gobgp.last_error(p.b_ep.addr).unwrap_or_default();
    eprintln!("GoBGP (receiver) error lines:\n{}", p.gobgp.error_lines(p.b_ep.addr).join("\n"));
    assert!(e.contains("Bad peer AS"), "{e}");
    assert!(g.contains("reason=invalid-msg") || g.contains("Code=2"), "{g}");
    assert_ne!(p.bird.protocol_state("gobgp"), "Established");
}

#[test]
fn wrong_as_configured_in_gobgp() {
    if !support::require_daemons() {
        return;
    }
    // GoBGP expects AS 65009 but BIRD is 65001: GoBGP sends NOTIFICATION 2/2.
    let p = pair(65001, 65002, true, |_, g| g.remote_as = 65009);
    let e = support::wait_until(T, "BIRD last error", || p.bird.last_error("gobgp"), || p.bird.diag()).unwrap();
    eprintln!("BIRD (receiver) last error: {e:?}");
    eprintln!("BIRD (receiver) log: {}", p.bird.log_tail(8));
    let g = support::wait_until(
        T,
        "GoBGP to log the NOTIFICATION it sent",
        || p.gobgp.error_lines(p.b_ep.addr).into_iter().find(|l| l.contains("sent notification")),
        || p.gobgp.diag(),
    )
    .unwrap();
    eprintln!("GoBGP (sender) error lines:\n{}", p.gobgp.error_lines(p.b_ep.addr).join("\n"));
    assert!(e.contains("Bad peer AS"), "{e}");
    assert!(g.contains("as number mismatch expected 65009, received 65001"), "{g}");
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
    let e = support::wait_until(T, "BIRD last error", || p.bird.last_error("gobgp"), || p.bird.diag()).unwrap();
    eprintln!("BIRD after GoBGP SIGTERM: {e:?}");
    p.gobgp.restart().unwrap();
    established(&p);
    p.bird.stop();
    let g = support::wait_until(
        T,
        "GoBGP to log the Cease",
        || p.gobgp.error_lines(p.b_ep.addr).into_iter().find(|l| l.contains("notification")),
        || p.gobgp.diag(),
    )
    .unwrap();
    eprintln!("GoBGP after BIRD SIGTERM:\n{}", p.gobgp.error_lines(p.b_ep.addr).join("\n"));
    let _ = g;
}
