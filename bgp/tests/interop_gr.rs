//! Graceful restart (RFC 4724) between podroute and BIRD 2, both roles, each daemon started
//! with its own config in a temp dir on a unique loopback address (see `support`).
//!
//! - BIRD restarts (`birdc graceful restart`, then `bird -R` with one static route less):
//!   podroute keeps BIRD's routes, stale, for the whole gap (sampled every 50 ms, and its
//!   best-change stream stays silent), then after BIRD's End-of-RIB withdraws only the route
//!   BIRD no longer announces.
//! - podroute restarts (sessions closed without NOTIFICATION, a new speaker with
//!   `restarting: true` on the same address with one route less): BIRD keeps podroute's
//!   routes during the gap (sampled with `birdc`), sees R and F in the new OPEN, and after
//!   podroute's End-of-RIB has exactly the routes podroute announces.
//! - The same restart of podroute against GoBGP as helper.
//! - BIRD restarts while podroute's session is still Established (its old connection frozen
//!   in a relay): the new session, Restart State bit set, replaces the old one with BIRD's
//!   routes kept.

mod support;

use podroute_bgp::fsm::State;
use podroute_bgp::gr::GrPhase;
use podroute_bgp::rib::{BestChange, LOCAL};
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::bird::{Bird, BirdConfig, PeerCfg};
use support::gobgp::{Gobgp, GobgpConfig, NeighborCfg};
use support::proxy::Relay;
use support::{Endpoint, IpNet, require_daemons, wait_for, wait_until};

const T: Duration = Duration::from_secs(40);
const POD_AS: u32 = 64512;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A podroute speaker on its own runtime, driven from the (blocking) test thread.
struct Pod {
    rt: tokio::runtime::Runtime,
    speaker: Speaker,
    ep: Endpoint,
    /// Every best-path change, in order.
    changes: Arc<Mutex<Vec<BestChange>>>,
}

impl Pod {
    fn start(ep: Endpoint, tweak: impl FnOnce(&mut SpeakerConfig)) -> Pod {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = SpeakerConfig::new(POD_AS, ep.router_id());
        cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
        cfg.connect_retry = Duration::from_secs(1);
        cfg.hold_time = 30;
        tweak(&mut cfg);
        let (speaker, mut best) = rt.block_on(async {
            // The previous speaker on this endpoint may have just released the port.
            for _ in 0..50 {
                match Speaker::start(cfg.clone()).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            panic!("podroute speaker does not start on {}", ep.addr)
        });
        let changes = Arc::new(Mutex::new(Vec::new()));
        let c = changes.clone();
        rt.spawn(async move {
            while let Some(batch) = best.recv().await {
                c.lock().unwrap().extend(batch);
            }
        });
        Pod {
            rt,
            speaker,
            ep,
            changes,
        }
    }

    fn peer_cfg(&self, daemon: &Endpoint, remote_as: u32, passive: bool) -> PeerConfig {
        let mut p = PeerConfig::new(IpAddr::V4(daemon.addr), remote_as);
        p.port = daemon.port;
        p.local_addr = Some(IpAddr::V4(self.ep.addr));
        p.passive = passive;
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

    fn peer(&self, addr: Ipv4Addr) -> PeerStatus {
        self.rt
            .block_on(self.speaker.peers())
            .unwrap()
            .into_iter()
            .find(|p| p.addr == IpAddr::V4(addr))
            .expect("peer configured")
    }

    /// Learned prefixes with their stale marks.
    fn learned(&self) -> Vec<(IpNet, bool)> {
        self.rt
            .block_on(self.speaker.loc_rib())
            .unwrap()
            .into_iter()
            .filter(|(_, b)| b.peer != LOCAL)
            .map(|(p, b)| (p, b.stale))
            .collect()
    }

    /// Wait until exactly `n` prefixes are learned, none of them stale.
    fn wait_learned(&self, n: usize, what: &str, bird: &Bird, peer: Ipv4Addr) {
        wait_until(
            T,
            what,
            || {
                let l = self.learned();
                (l.len() == n && l.iter().all(|(_, stale)| !stale)).then_some(())
            },
            || {
                format!(
                    "{:?}\n{:?}\n{}",
                    self.learned(),
                    self.peer(peer),
                    bird.diag()
                )
            },
        )
        .unwrap();
    }

    /// BIRD is back from its restart without `gone`: after its End-of-RIB the other three
    /// routes are learned and fresh, none of them went missing meanwhile (`watch`), `gone`
    /// alone was withdrawn, and graceful restart is over. Returns the peer's status.
    fn recovered_from(
        &self,
        bird: &Bird,
        peer: Ipv4Addr,
        watch: RibWatch,
        gone: IpNet,
    ) -> PeerStatus {
        self.wait_learned(
            3,
            &format!("podroute sweeps {gone} after BIRD's End-of-RIB"),
            bird,
            peer,
        );
        assert_eq!(
            watch.finish(),
            None,
            "a kept route went missing during the restart"
        );
        assert_eq!(self.withdrawals(), vec![gone]);
        let st = self.peer(peer);
        let gr = st.graceful_restart.clone().unwrap();
        assert_eq!(
            (gr.phase, gr.stale_prefixes),
            (GrPhase::Normal, 0),
            "{st:?}"
        );
        st
    }

    /// Prefixes learned and then withdrawn, per the best-change stream.
    fn withdrawals(&self) -> Vec<IpNet> {
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        for c in self.changes.lock().unwrap().iter() {
            if c.best.is_some() {
                seen.insert(c.prefix);
            } else if seen.contains(&c.prefix) {
                v.push(c.prefix);
            }
        }
        v
    }

    /// Sample the Loc-RIB every 50 ms in the background; the flag is set if one of `must`
    /// is ever missing. Stop by dropping the returned guard's flag (set `stop`).
    fn watch_rib(&self, must: Vec<IpNet>) -> RibWatch {
        let missing = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, sp) = (missing.clone(), stop.clone(), self.speaker.clone());
        self.rt.spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let rib = sp.loc_rib().await.unwrap_or_default();
                for p in &must {
                    if !rib.iter().any(|(q, b)| q == p && b.peer != LOCAL) {
                        m.lock().unwrap().get_or_insert(*p);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RibWatch { missing, stop }
    }
}

struct RibWatch {
    missing: Arc<Mutex<Option<IpNet>>>,
    stop: Arc<AtomicBool>,
}

impl RibWatch {
    /// Stop sampling; the first prefix that was ever missing, if any.
    fn finish(self) -> Option<IpNet> {
        self.stop.store(true, Ordering::Relaxed);
        *self.missing.lock().unwrap()
    }
}

#[test]
fn bird_restarts_and_podroute_keeps_its_routes_until_end_of_rib() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), |_| {});
    let (b1, b2, b3, b6) = (
        net("172.20.1.0/26"),
        net("172.20.2.0/26"),
        net("172.20.3.0/26"),
        net("fd00:20:1::/122"),
    );
    let mut cfg =
        BirdConfig::new(Endpoint::alloc(), 65001).peer(PeerCfg::new("pod", &pod.ep, POD_AS));
    cfg.static_v4 = vec![b1, b2, b3];
    cfg.static_v6 = vec![b6];
    // Bound BIRD's own recovery (selection deferral) after `bird -R`.
    cfg.global_extra = "graceful restart wait 15;\n".into();
    let mut bird = Bird::start(cfg).unwrap();
    let b_ep = bird.endpoint();
    pod.add_peer(pod.peer_cfg(&b_ep, 65001, false));
    pod.wait_learned(4, "podroute learns BIRD's four routes", &bird, b_ep.addr);
    let gr = pod.peer(b_ep.addr).graceful_restart.expect("GR negotiated");
    assert_eq!(gr.peer_capability.as_ref().unwrap().restart_time, 120);

    let watch = pod.watch_rib(vec![b1, b2, b6]);
    bird.graceful_restart_exit().unwrap();
    wait_for(
        T,
        "podroute notices BIRD is gone",
        || pod.peer(b_ep.addr).state != State::Established,
        || format!("{:?}", pod.peer(b_ep.addr)),
    )
    .unwrap();
    let st = pod.peer(b_ep.addr);
    let gr = st.graceful_restart.clone().unwrap();
    assert_eq!(gr.phase, GrPhase::Restarting, "{st:?}");
    assert_eq!(gr.stale_prefixes, 4, "{st:?}");
    // BIRD stays away for 2 s: everything is kept, stale.
    std::thread::sleep(Duration::from_secs(2));
    let l = pod.learned();
    assert_eq!(l.len(), 4, "{l:?}");
    assert!(l.iter().all(|(_, stale)| *stale), "{l:?}");
    assert!(pod.withdrawals().is_empty(), "{:?}", pod.withdrawals());

    // BIRD comes back in recovery, without b3.
    bird.cfg.static_v4.retain(|p| *p != b3);
    bird.start_recovering().unwrap();
    let st = pod.recovered_from(&bird, b_ep.addr, watch, b3);
    let cap = st.graceful_restart.unwrap().peer_capability.unwrap();
    assert!(cap.restart_state, "bird -R sets R: {cap:?}");
    assert!(
        cap.families.iter().all(|f| f.forwarding_state) && cap.families.len() == 2,
        "bird -R sets F for both families: {cap:?}"
    );
}

/// RFC 4724 §4.2 with a peer that restarts faster than its old session dies: BIRD's session
/// runs through a relay that is then frozen (silent, not closed, as after a crash whose FIN
/// never arrived), BIRD exits and comes back in recovery (`bird -R`) while podroute's session
/// is still Established. BIRD's new connection (Restart State bit set) replaces the old
/// session: podroute closes the old connection, keeps BIRD's routes stale throughout (the old
/// session goes down as a TCP failure would), and after BIRD's End-of-RIB withdraws only the
/// route BIRD no longer announces.
#[test]
fn bird_restarts_while_its_old_session_is_established_and_the_new_one_replaces_it() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), |_| {});
    let (b1, b2, b3, b6) = (
        net("172.22.1.0/26"),
        net("172.22.2.0/26"),
        net("172.22.3.0/26"),
        net("fd00:22:1::/122"),
    );
    let b_ep = Endpoint::alloc();
    let relay = Relay::start(
        "bird",
        SocketAddr::new(IpAddr::V4(pod.ep.addr), 0),
        SocketAddr::new(IpAddr::V4(pod.ep.addr), pod.ep.port),
        IpAddr::V4(b_ep.addr),
        None,
    );
    let pod_via = Endpoint {
        port: relay.listen.port(),
        ..pod.ep
    };
    let mut cfg = BirdConfig::new(b_ep, 65001).peer(PeerCfg::new("pod", &pod_via, POD_AS));
    cfg.static_v4 = vec![b1, b2, b3];
    cfg.static_v6 = vec![b6];
    cfg.global_extra = "graceful restart wait 15;\n".into();
    let mut bird = Bird::start(cfg).unwrap();
    // Passive: every connection of the session is BIRD's, through the relay.
    pod.add_peer(pod.peer_cfg(&b_ep, 65001, true));
    pod.wait_learned(4, "podroute learns BIRD's four routes", &bird, b_ep.addr);
    let old = relay.open_links();
    assert_eq!(old.len(), 1);
    let old = old[0].clone();
    assert_eq!(pod.peer(b_ep.addr).established_count, 1);

    let watch = pod.watch_rib(vec![b1, b2, b6]);
    old.freeze();
    bird.graceful_restart_exit().unwrap();
    // The old session has not noticed: podroute still sees it Established.
    std::thread::sleep(Duration::from_secs(1));
    let st = pod.peer(b_ep.addr);
    assert_eq!(
        (st.state, st.established_count),
        (State::Established, 1),
        "{st:?}"
    );
    assert!(!old.target_closed());

    bird.cfg.static_v4.retain(|p| *p != b3);
    bird.start_recovering().unwrap();
    wait_until(
        T,
        "BIRD's new session replaces the old one",
        || {
            let st = pod.peer(b_ep.addr);
            (st.state == State::Established && st.established_count == 2).then_some(())
        },
        || format!("{:?}\n{}", pod.peer(b_ep.addr), bird.diag()),
    )
    .unwrap();
    wait_for(
        T,
        "podroute closes the old connection",
        || old.target_closed(),
        || format!("{:?}", pod.peer(b_ep.addr)),
    )
    .unwrap();
    let st = pod.peer(b_ep.addr);
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("restarted and opened a new session")),
        "{st:?}"
    );
    let st = pod.recovered_from(&bird, b_ep.addr, watch, b3);
    assert_eq!(st.established_count, 2, "{st:?}");
    assert_eq!(
        relay.open_links().len(),
        1,
        "only the new connection is left"
    );
    assert!(
        st.graceful_restart
            .unwrap()
            .peer_capability
            .unwrap()
            .restart_state
    );
}

/// The routes of the podroute-restarts tests: all are announced before the restart, all but
/// `gone` after it.
struct PodRestart {
    routes: Vec<IpNet>,
    gone: IpNet,
}

impl PodRestart {
    fn new() -> PodRestart {
        PodRestart {
            routes: vec![
                net("172.21.1.0/26"),
                net("172.21.2.0/26"),
                net("172.21.3.0/26"),
                net("fd00:21:1::/122"),
            ],
            gone: net("172.21.3.0/26"),
        }
    }

    fn kept(&self) -> Vec<IpNet> {
        self.routes
            .iter()
            .copied()
            .filter(|p| *p != self.gone)
            .collect()
    }
}

#[test]
fn podroute_restarts_and_bird_keeps_its_routes() {
    if !require_daemons() {
        return;
    }
    let r = PodRestart::new();
    let pod_ep = Endpoint::alloc();
    let pod = Pod::start(pod_ep, |_| {});
    let bird_route = net("172.21.100.0/26");
    let mut cfg =
        BirdConfig::new(Endpoint::alloc(), 65001).peer(PeerCfg::new("pod", &pod_ep, POD_AS));
    cfg.static_v4 = vec![bird_route];
    let bird = Bird::start(cfg).unwrap();
    let b_ep = bird.endpoint();
    pod.add_peer(pod.peer_cfg(&b_ep, 65001, false));
    for p in &r.routes {
        pod.announce(*p);
    }
    let bird_has = |p: IpNet| {
        bird.route(p)
            .is_ok_and(|rs| rs.iter().any(|x| x.from_protocol == "pod"))
    };
    wait_for(
        T,
        "BIRD learns podroute's four routes",
        || r.routes.iter().all(|p| bird_has(*p)),
        || bird.diag(),
    )
    .unwrap();

    // Crash podroute: no NOTIFICATION, the process (runtime) is gone.
    pod.rt.block_on(pod.speaker.shutdown_for_restart()).unwrap();
    drop(pod);
    wait_for(
        T,
        "BIRD helps (keeps podroute's routes as stale)",
        || bird.helping("pod"),
        || bird.diag(),
    )
    .unwrap();
    let gap = Instant::now() + Duration::from_secs(2);
    while Instant::now() < gap {
        for p in &r.routes {
            assert!(
                bird_has(*p),
                "BIRD lost {p} while podroute was away\n{}",
                bird.diag()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // podroute comes back, restarting, without the `gone` route.
    let started = Instant::now();
    let pod = Pod::start(pod_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(20);
    });
    for p in r.kept() {
        pod.announce(p);
    }
    pod.add_peer(pod.peer_cfg(&b_ep, 65001, false));
    // Sample BIRD's table until the gone route is swept: the kept ones never disappear.
    wait_for(
        T,
        "BIRD drops the route podroute no longer announces",
        || {
            for p in r.kept() {
                assert!(
                    bird_has(p),
                    "BIRD lost {p} during podroute's restart\n{}",
                    bird.diag()
                );
            }
            !bird_has(r.gone)
        },
        || format!("{:?}\n{}", pod.peer(b_ep.addr), bird.diag()),
    )
    .unwrap();
    assert!(!bird.helping("pod"), "{}", bird.diag());
    let caps = bird.neighbor_capabilities("pod");
    assert!(caps.contains("Restart recovery"), "R bit: {caps}");
    assert!(caps.contains("AF preserved: ipv4 ipv6"), "F bits: {caps}");
    // BIRD's table is exactly what podroute announces now.
    let from_pod: BTreeSet<IpNet> = bird
        .routes_v4()
        .unwrap()
        .into_iter()
        .chain(bird.routes_v6().unwrap())
        .filter(|x| x.from_protocol == "pod")
        .map(|x| x.prefix)
        .collect();
    assert_eq!(from_pod, r.kept().into_iter().collect());
    // podroute ended its deferral on BIRD's End-of-RIB, not on its 20 s timer, and its agent
    // got BIRD's route.
    assert!(*pod.speaker.converged().borrow());
    assert!(started.elapsed() < Duration::from_secs(15));
    wait_for(
        T,
        "the deferred batch carries BIRD's route",
        || {
            pod.changes
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.prefix == bird_route && c.best.is_some())
        },
        || format!("{:?}", pod.changes.lock().unwrap()),
    )
    .unwrap();
}

#[test]
fn podroute_restarts_and_gobgp_keeps_its_routes() {
    if !require_daemons() {
        return;
    }
    let r = PodRestart::new();
    let pod_ep = Endpoint::alloc();
    let pod = Pod::start(pod_ep, |_| {});
    let mut n = NeighborCfg::new(&pod_ep, POD_AS);
    n.passive = true;
    n.graceful_restart = true;
    n.gr_time = 120;
    let g = Gobgp::start(GobgpConfig::new(Endpoint::alloc(), 65002).neighbor(n)).unwrap();
    let g_ep = g.endpoint();
    pod.add_peer(pod.peer_cfg(&g_ep, 65002, false));
    for p in &r.routes {
        pod.announce(*p);
    }
    let from = pod_ep.addr.to_string();
    let gobgp_has = |p: IpNet| {
        g.route(p)
            .is_ok_and(|rs| rs.iter().any(|x| x.from_protocol == from))
    };
    wait_for(
        T,
        "GoBGP learns podroute's four routes",
        || r.routes.iter().all(|p| gobgp_has(*p)),
        || g.diag(),
    )
    .unwrap();

    pod.rt.block_on(pod.speaker.shutdown_for_restart()).unwrap();
    drop(pod);
    wait_for(
        T,
        "GoBGP notices podroute is gone",
        || g.neighbor_state(pod_ep.addr) != "Established",
        || g.diag(),
    )
    .unwrap();
    let gap = Instant::now() + Duration::from_secs(2);
    while Instant::now() < gap {
        for p in &r.routes {
            assert!(
                gobgp_has(*p),
                "GoBGP lost {p} while podroute was away\n{}",
                g.diag()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let pod = Pod::start(pod_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(20);
    });
    for p in r.kept() {
        pod.announce(p);
    }
    pod.add_peer(pod.peer_cfg(&g_ep, 65002, false));
    wait_for(
        T,
        "GoBGP drops the route podroute no longer announces",
        || {
            for p in r.kept() {
                assert!(
                    gobgp_has(p),
                    "GoBGP lost {p} during podroute's restart\n{}",
                    g.diag()
                );
            }
            !gobgp_has(r.gone)
        },
        || format!("{:?}\n{}", pod.peer(g_ep.addr), g.diag()),
    )
    .unwrap();
    assert!(*pod.speaker.converged().borrow());
}
