//! podroute's speaker against real BGP daemons: BIRD 2 and GoBGP, each started with its own
//! config and control socket in a temp dir on a unique loopback address and non-179 port
//! (see `support`). For each daemon: Established with podroute active and passive, iBGP and
//! eBGP; podroute's IPv4 /26 and IPv6 /122 appear in the daemon's table and the daemon's in
//! podroute's Loc-RIB; withdrawals both ways; the daemon killed and restarted brings the
//! session and routes back; a wrong peer AS gives an OPEN error both sides report.
//! podroute as the route reflector of two BIRDs and a GoBGP: each client gets the others'
//! routes with ORIGINATOR_ID and CLUSTER_LIST, none gets its own back.
//! Connection collisions with both sides active, staged through relays (`support::proxy`),
//! over several rounds with our BGP ID lower, higher and equal (eBGP) to the daemon's.

mod support;

use podroute_bgp::fsm::State;
use podroute_bgp::rib::BestRoute;
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use support::bird::{Bird, BirdConfig, PeerCfg};
use support::gobgp::{Gobgp, GobgpConfig, NeighborCfg};
use support::{Endpoint, IpNet, require_daemons, wait_until};

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
}

impl Pod {
    fn start(ep: Endpoint, asn: u32) -> Pod {
        Pod::start_with_id(ep, asn, ep.router_id())
    }

    fn start_with_id(ep: Endpoint, asn: u32, router_id: Ipv4Addr) -> Pod {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = SpeakerConfig::new(asn, router_id);
        cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
        cfg.connect_retry = Duration::from_secs(1);
        cfg.hold_time = 30;
        let (speaker, _best) = rt
            .block_on(Speaker::start(cfg))
            .expect("podroute speaker starts");
        // The best-path stream is unbounded; this test reads the Loc-RIB instead.
        std::mem::forget(_best);
        Pod { rt, speaker, ep }
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

    fn withdraw(&self, p: IpNet) {
        self.rt.block_on(self.speaker.withdraw(p)).unwrap();
    }

    fn peer(&self, addr: std::net::Ipv4Addr) -> PeerStatus {
        let peers = self.rt.block_on(self.speaker.peers()).unwrap();
        peers
            .into_iter()
            .find(|p| p.addr == IpAddr::V4(addr))
            .expect("peer configured")
    }

    fn route(&self, prefix: IpNet) -> Option<BestRoute> {
        let rib = self.rt.block_on(self.speaker.loc_rib()).unwrap();
        rib.into_iter()
            .find(|(p, b)| *p == prefix && b.peer != podroute_bgp::rib::LOCAL)
            .map(|(_, b)| b)
    }

    fn wait_established(&self, addr: std::net::Ipv4Addr) {
        wait_until(
            T,
            "podroute session Established",
            || (self.peer(addr).state == State::Established).then_some(()),
            || format!("{:?}", self.peer(addr)),
        )
        .unwrap();
    }

    fn wait_route(&self, prefix: IpNet) -> BestRoute {
        wait_until(
            T,
            &format!("{prefix} in podroute's Loc-RIB"),
            || self.route(prefix),
            || format!("{:?}", self.rt.block_on(self.speaker.loc_rib())),
        )
        .unwrap()
    }

    fn wait_no_route(&self, prefix: IpNet) {
        wait_until(
            T,
            &format!("{prefix} gone from podroute's Loc-RIB"),
            || self.route(prefix).is_none().then_some(()),
            || format!("{:?}", self.route(prefix)),
        )
        .unwrap();
    }
}

/// The daemon under test, behind one interface.
trait Daemon {
    fn ep(&self) -> Endpoint;
    fn asn(&self) -> u32;
    fn wait_established(&self, pod: &Endpoint);
    fn announce(&mut self, p: IpNet);
    fn withdraw(&mut self, p: IpNet);
    /// (next hop, AS path) of the route learned from podroute.
    fn wait_route(&self, p: IpNet, pod: &Endpoint) -> (Option<IpAddr>, Vec<u32>);
    fn wait_no_route(&self, p: IpNet, pod: &Endpoint);
    fn kill_and_restart(&mut self);
    fn last_error_mentions_bad_as(&self, pod: &Endpoint) -> bool;
    /// Close the session with a NOTIFICATION and let it start again (Cease / Administrative
    /// Reset).
    fn reset_session(&mut self, pod: &Endpoint);
}

impl Daemon for Bird {
    fn ep(&self) -> Endpoint {
        self.endpoint()
    }
    fn asn(&self) -> u32 {
        self.cfg.local_as
    }
    fn wait_established(&self, _pod: &Endpoint) {
        Bird::wait_established(self, "pod", T).unwrap();
    }
    fn announce(&mut self, p: IpNet) {
        self.add_static(p).unwrap();
    }
    fn withdraw(&mut self, p: IpNet) {
        self.remove_static(p).unwrap();
    }
    fn wait_route(&self, p: IpNet, _pod: &Endpoint) -> (Option<IpAddr>, Vec<u32>) {
        let r = Bird::wait_route(self, p, "pod", T).unwrap();
        (r.next_hop, r.as_path)
    }
    fn wait_no_route(&self, p: IpNet, _pod: &Endpoint) {
        Bird::wait_no_route(self, p, "pod", T).unwrap();
    }
    fn kill_and_restart(&mut self) {
        self.kill();
        self.restart().unwrap();
    }
    fn last_error_mentions_bad_as(&self, _pod: &Endpoint) -> bool {
        self.last_error("pod")
            .is_some_and(|e| e.contains("Bad peer AS"))
    }
    fn reset_session(&mut self, _pod: &Endpoint) {
        let out = self.birdc(&["restart", "pod"]).unwrap();
        assert!(out.contains("restarted"), "birdc restart pod: {out}");
    }
}

impl Daemon for Gobgp {
    fn ep(&self) -> Endpoint {
        self.endpoint()
    }
    fn asn(&self) -> u32 {
        self.cfg.local_as
    }
    fn wait_established(&self, pod: &Endpoint) {
        Gobgp::wait_established(self, pod.addr, T).unwrap();
    }
    fn announce(&mut self, p: IpNet) {
        self.add_route(p, None, &[]).unwrap();
    }
    fn withdraw(&mut self, p: IpNet) {
        self.del_route(p).unwrap();
    }
    fn wait_route(&self, p: IpNet, pod: &Endpoint) -> (Option<IpAddr>, Vec<u32>) {
        let r = Gobgp::wait_route(self, p, &pod.addr.to_string(), T).unwrap();
        (r.next_hop, r.as_path)
    }
    fn wait_no_route(&self, p: IpNet, pod: &Endpoint) {
        Gobgp::wait_no_route(self, p, &pod.addr.to_string(), T).unwrap();
    }
    fn kill_and_restart(&mut self) {
        self.kill();
        self.restart().unwrap();
    }
    fn last_error_mentions_bad_as(&self, pod: &Endpoint) -> bool {
        // GoBGP logs no code for a NOTIFICATION it receives in OpenSent; it counts it.
        self.notifications(pod.addr).1 > 0
    }
    fn reset_session(&mut self, pod: &Endpoint) {
        self.cli(&["neighbor", &pod.addr.to_string(), "reset"])
            .unwrap();
    }
}

fn bird(pod: &Endpoint, bird_as: u32, pod_as: u32, bird_passive: bool) -> Bird {
    let mut p = PeerCfg::new("pod", pod, pod_as);
    p.passive = bird_passive;
    Bird::start(BirdConfig::new(Endpoint::alloc(), bird_as).peer(p)).unwrap()
}

fn gobgp(pod: &Endpoint, gobgp_as: u32, pod_as: u32, gobgp_passive: bool) -> Gobgp {
    let mut n = NeighborCfg::new(pod, pod_as);
    n.passive = gobgp_passive;
    Gobgp::start(GobgpConfig::new(Endpoint::alloc(), gobgp_as).neighbor(n)).unwrap()
}

/// Routes both ways for both families, then withdrawals both ways.
fn exchange(pod: &Pod, d: &mut dyn Daemon, ebgp: bool) {
    let d_ep = d.ep();
    pod.wait_established(d_ep.addr);
    d.wait_established(&pod.ep);

    let p4 = net("172.16.241.64/26");
    let p6 = net("fd00:16:241::40/122");
    pod.announce(p4);
    pod.announce(p6);
    let (nh, path) = d.wait_route(p4, &pod.ep);
    assert_eq!(
        nh,
        Some(IpAddr::V4(pod.ep.nh_v4)),
        "IPv4 next hop the daemon sees"
    );
    let (nh6, path6) = d.wait_route(p6, &pod.ep);
    assert_eq!(
        nh6,
        Some(IpAddr::V6(pod.ep.nh_v6)),
        "IPv6 next hop the daemon sees"
    );
    let expected_path = if ebgp { vec![POD_AS] } else { vec![] };
    assert_eq!(path, expected_path);
    assert_eq!(path6, expected_path);

    let d4 = net("172.16.196.128/26");
    let d6 = net("fd00:16:196::80/122");
    d.announce(d4);
    d.announce(d6);
    let r = pod.wait_route(d4);
    assert_eq!(r.next_hop, IpAddr::V4(d_ep.nh_v4));
    let r6 = pod.wait_route(d6);
    assert_eq!(r6.next_hop, IpAddr::V6(d_ep.nh_v6));
    let first_as = r.attrs.path.as_path.as_ref().and_then(|p| p.first_as());
    assert_eq!(first_as, if ebgp { Some(d.asn()) } else { None });
    let st = pod.peer(d_ep.addr);
    assert!(
        st.prefixes_received >= 2 && st.prefixes_accepted >= 2,
        "{st:?}"
    );
    assert_eq!(st.prefixes_advertised, 2, "{st:?}");

    pod.withdraw(p4);
    d.wait_no_route(p4, &pod.ep);
    d.withdraw(d6);
    pod.wait_no_route(d6);
    // What was not withdrawn stays.
    assert!(pod.route(d4).is_some());
    d.wait_route(p6, &pod.ep);
}

/// Kill the daemon and restart it: the session and the routes come back both ways.
fn restart(pod: &Pod, d: &mut dyn Daemon) {
    let d_ep = d.ep();
    let before = pod.peer(d_ep.addr).established_count;
    d.kill_and_restart();
    wait_until(
        T,
        "podroute re-establishes after the daemon restart",
        || {
            let p = pod.peer(d_ep.addr);
            (p.established_count > before && p.state == State::Established).then_some(())
        },
        || format!("{:?}", pod.peer(d_ep.addr)),
    )
    .unwrap();
    d.wait_established(&pod.ep);
    // podroute re-sends its table on the new session.
    d.wait_route(net("fd00:16:241::40/122"), &pod.ep);
    // The daemon's routes come back (the harness re-adds GoBGP's API routes; BIRD's statics
    // are in its config).
    d.announce(net("172.16.5.0/26"));
    pod.wait_route(net("172.16.5.0/26"));
}

fn wrong_as(pod: &Pod, d: &dyn Daemon) {
    let d_ep = d.ep();
    // The NOTIFICATION is reported first ("sent NOTIFICATION ... Bad Peer AS"), then the
    // session's down reason, which names the AS the peer sent: wait for the latter.
    let asn = d.asn().to_string();
    wait_until(
        T,
        "podroute reports Bad Peer AS naming the AS the peer sent",
        || {
            let e = pod.peer(d_ep.addr).last_error?;
            (e.contains("Bad Peer AS") && e.contains(&asn)).then_some(e)
        },
        || format!("{:?}", pod.peer(d_ep.addr)),
    )
    .unwrap();
    wait_until(
        T,
        "the daemon reports the OPEN error",
        || d.last_error_mentions_bad_as(&pod.ep).then_some(()),
        || "daemon did not report it".to_string(),
    )
    .unwrap();
}

#[test]
fn bird_ibgp_podroute_active() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let mut b = bird(&pod.ep, POD_AS, POD_AS, true);
    pod.add_peer(pod.peer_cfg(&b.endpoint(), POD_AS, false));
    exchange(&pod, &mut b, false);
    restart(&pod, &mut b);
}

#[test]
fn bird_ebgp_podroute_passive() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let mut b = bird(&pod.ep, 65001, POD_AS, false);
    pod.add_peer(pod.peer_cfg(&b.endpoint(), 65001, true));
    exchange(&pod, &mut b, true);
    restart(&pod, &mut b);
}

#[test]
fn bird_wrong_peer_as() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let b = bird(&pod.ep, 65001, POD_AS, true);
    // podroute expects 65099; BIRD is 65001.
    pod.add_peer(pod.peer_cfg(&b.endpoint(), 65099, false));
    wrong_as(&pod, &b);
}

#[test]
fn gobgp_ibgp_podroute_passive() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let mut g = gobgp(&pod.ep, POD_AS, POD_AS, false);
    pod.add_peer(pod.peer_cfg(&g.endpoint(), POD_AS, true));
    exchange(&pod, &mut g, false);
    restart(&pod, &mut g);
}

#[test]
fn gobgp_ebgp_podroute_active() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let mut g = gobgp(&pod.ep, 65002, POD_AS, true);
    pod.add_peer(pod.peer_cfg(&g.endpoint(), 65002, false));
    exchange(&pod, &mut g, true);
    restart(&pod, &mut g);
}

#[test]
fn gobgp_wrong_peer_as() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let g = gobgp(&pod.ep, 65002, POD_AS, true);
    pod.add_peer(pod.peer_cfg(&g.endpoint(), 65098, false));
    wrong_as(&pod, &g);
}

/// The value of a BGP attribute in `birdc show route for P all` (e.g. `BGP.originator_id`).
fn bird_attr(b: &Bird, prefix: IpNet, attr: &str) -> Option<String> {
    let out = b
        .birdc(&["show", "route", "for", &prefix.to_string(), "all"])
        .ok()?;
    out.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix(attr)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

#[test]
fn route_reflector_with_bird_and_gobgp_clients() {
    if !require_daemons() {
        return;
    }
    let pod = Pod::start(Endpoint::alloc(), POD_AS);
    let p_a = net("172.16.10.0/26");
    let p_b = net("172.16.11.0/26");
    let p_c = net("172.16.12.0/26");
    let mut birds = Vec::new();
    for (name, prefix) in [("a", p_a), ("b", p_b)] {
        let mut p = PeerCfg::new("pod", &pod.ep, POD_AS);
        p.passive = true;
        p.ipv6 = false;
        let mut cfg = BirdConfig::new(Endpoint::alloc(), POD_AS).peer(p);
        cfg.static_v4.push(prefix);
        let b = Bird::start(cfg).unwrap_or_else(|e| panic!("bird {name}: {e:?}"));
        birds.push(b);
    }
    let mut n = NeighborCfg::new(&pod.ep, POD_AS);
    n.passive = true;
    n.ipv6 = false;
    let mut g = Gobgp::start(GobgpConfig::new(Endpoint::alloc(), POD_AS).neighbor(n)).unwrap();
    let clients: Vec<Endpoint> = birds
        .iter()
        .map(|b| b.endpoint())
        .chain([g.endpoint()])
        .collect();
    for c in &clients {
        let mut p = pod.peer_cfg(c, POD_AS, false);
        p.rr_client = true;
        p.families = vec![podroute_bgp::wire::Family::IPV4_UNICAST];
        pod.add_peer(p);
    }
    for c in &clients {
        pod.wait_established(c.addr);
    }
    g.add_route(p_c, None, &[]).unwrap();
    let (a, b) = (&birds[0], &birds[1]);
    let (ea, eb, ec) = (clients[0], clients[1], clients[2]);

    // BIRD b has a's route and the GoBGP's, reflected: next hop kept, ORIGINATOR_ID the
    // originator, CLUSTER_LIST our cluster ID (our router ID).
    let r = b.wait_route(p_a, "pod", T).unwrap();
    assert_eq!(r.next_hop, Some(IpAddr::V4(ea.nh_v4)));
    assert_eq!(
        bird_attr(b, p_a, "BGP.originator_id").as_deref(),
        Some(ea.router_id().to_string().as_str())
    );
    assert_eq!(
        bird_attr(b, p_a, "BGP.cluster_list").as_deref(),
        Some(pod.ep.router_id().to_string().as_str())
    );
    b.wait_route(p_c, "pod", T).unwrap();
    a.wait_route(p_b, "pod", T).unwrap();
    a.wait_route(p_c, "pod", T).unwrap();
    let r = g.wait_route(p_a, &pod.ep.addr.to_string(), T).unwrap();
    assert_eq!(r.next_hop, Some(IpAddr::V4(ea.nh_v4)));
    g.wait_route(p_b, &pod.ep.addr.to_string(), T).unwrap();
    // Each client is sent the two others' routes, not its own.
    for c in [ea, eb, ec] {
        wait_until(
            T,
            &format!("podroute advertises 2 routes to {}", c.addr),
            || (pod.peer(c.addr).prefixes_advertised == 2).then_some(()),
            || format!("{:?}", pod.peer(c.addr)),
        )
        .unwrap();
    }
    // And BIRD agrees: a route carrying its own ORIGINATOR_ID would be counted as a received
    // (and ignored) withdrawal. Our route, sent after everything else, marks the point by
    // which a's own route would have arrived.
    let marker = net("172.16.99.0/26");
    pod.announce(marker);
    a.wait_route(marker, "pod", T).unwrap();
    let stats = a.birdc(&["show", "protocols", "all", "pod"]).unwrap();
    let withdraws_received = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("Import withdraws:"))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string);
    assert_eq!(
        withdraws_received.as_deref(),
        Some("0"),
        "BIRD a was sent its own route back:\n{stats}"
    );

    // A client withdrawing: the others lose it.
    birds[0].remove_static(p_a).unwrap();
    birds[1].wait_no_route(p_a, "pod", T).unwrap();
    g.wait_no_route(p_a, &pod.ep.addr.to_string(), T).unwrap();
    for (c, n) in [(eb, 2), (ec, 2), (ea, 3)] {
        wait_until(
            T,
            &format!("podroute advertises {n} routes to {}", c.addr),
            || (pod.peer(c.addr).prefixes_advertised == n).then_some(()),
            || format!("{:?}", pod.peer(c.addr)),
        )
        .unwrap();
    }
}

// ---- connection collision (RFC 4271 §6.8, RFC 6286 §2.3) ----

/// Router IDs for a collision: ours below or above the daemon's, or both the same.
#[derive(Clone, Copy, Debug)]
enum Ids {
    PodLower,
    PodHigher,
    Equal,
}

impl Ids {
    fn pod_and_daemon(self) -> (Ipv4Addr, Ipv4Addr) {
        let (low, high) = (Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
        match self {
            Ids::PodLower => (low, high),
            Ids::PodHigher => (high, low),
            Ids::Equal => (low, low),
        }
    }
}

/// Both sides active, with every round's two connections staged to exist before either
/// carries an OPEN: a relay per direction, joined by a gate that forwards nothing until both
/// have a connection (see `support::proxy`). Round 1 is the first start; each further round
/// starts with a reset (BIRD: `birdc restart`, a Cease to podroute; GoBGP: podroute removes
/// and re-adds the peer, since GoBGP holds off 30 s after its own `neighbor reset`), after
/// which both reconnect. Each round: exactly one connection stays open, podroute counts
/// exactly one more Established session, and routes flow both ways on it. With BIRD, which
/// resolves collisions as RFC 4271 §6.8 and RFC 6286 §2.3 say, the survivor must be the
/// connection opened by the higher BGP ID (equal IDs: the larger AS). This caught a podroute
/// bug, now and then and only where podroute's connection wins: podroute answered the
/// daemon's OPEN on the connection it was about to close with a KEEPALIVE before the Cease;
/// BIRD, in OpenConfirm there, went Established on it and closed podroute's connection when
/// podroute's OPEN arrived next (BIRD's `bgp_rx_open` gives up any new connection against an
/// Established one), and the Cease closed the other; the session then came up on BIRD's
/// next connection alone (see tests/collision_wire.rs). GoBGP 3.10 does not
/// resolve collisions by BGP ID: it closes (without a NOTIFICATION) any connection it
/// accepts while its own is past Active, so which one survives depends on who acts first.
fn collision_rounds(daemon: &str, daemon_as: u32, ids: Ids, rounds: u32) {
    use support::proxy::{Gate, Relay};
    let (pod_ep, d_ep) = (Endpoint::alloc(), Endpoint::alloc());
    let (pod_id, d_id) = ids.pod_and_daemon();
    let bird = daemon == "bird";
    let gate = Gate::new(2, Duration::from_secs(30));
    let pod_opened = Relay::start(
        "podroute",
        SocketAddr::new(IpAddr::V4(d_ep.addr), 0),
        SocketAddr::new(IpAddr::V4(d_ep.addr), d_ep.port),
        IpAddr::V4(pod_ep.addr),
        Some((gate.clone(), 0)),
    );
    let d_opened = Relay::start(
        "daemon",
        SocketAddr::new(IpAddr::V4(pod_ep.addr), 0),
        SocketAddr::new(IpAddr::V4(pod_ep.addr), pod_ep.port),
        IpAddr::V4(d_ep.addr),
        Some((gate.clone(), 1)),
    );
    // Each speaker reaches the other through the relay of its own direction.
    let pod_via = Endpoint {
        port: d_opened.listen.port(),
        ..pod_ep
    };
    let d_via = Endpoint {
        port: pod_opened.listen.port(),
        ..d_ep
    };
    let pod = Pod::start_with_id(pod_ep, POD_AS, pod_id);
    let mut d: Box<dyn Daemon> = match daemon {
        "bird" => {
            let mut cfg =
                BirdConfig::new(d_ep, daemon_as).peer(PeerCfg::new("pod", &pod_via, POD_AS));
            cfg.router_id = d_id;
            Box::new(Bird::start(cfg).unwrap())
        }
        _ => {
            let mut cfg =
                GobgpConfig::new(d_ep, daemon_as).neighbor(NeighborCfg::new(&pod_via, POD_AS));
            cfg.router_id = d_id;
            Box::new(Gobgp::start(cfg).unwrap())
        }
    };
    pod.add_peer(pod.peer_cfg(&d_via, daemon_as, false));
    let expected = match ids {
        Ids::PodLower => "daemon",
        Ids::PodHigher => "podroute",
        Ids::Equal if POD_AS > daemon_as => "podroute",
        Ids::Equal => "daemon",
    };
    let links = |r: &Relay| r.open_links().len();
    for round in 1..=u64::from(rounds) {
        let count = if bird { round } else { 1 };
        if round > 1 {
            gate.next_round();
            if bird {
                d.reset_session(&pod_ep);
            } else {
                pod.rt
                    .block_on(pod.speaker.remove_peer(IpAddr::V4(d_ep.addr)))
                    .unwrap();
                pod.add_peer(pod.peer_cfg(&d_via, daemon_as, false));
            }
        }
        wait_until(
            T,
            &format!("round {round}: podroute's session {round} Established"),
            || {
                let p = pod.peer(d_ep.addr);
                (p.state == State::Established && p.established_count >= count).then_some(())
            },
            || format!("{:?}", pod.peer(d_ep.addr)),
        )
        .unwrap();
        d.wait_established(&pod_ep);
        assert!(
            gate.all_arrived(),
            "round {round}: both speakers connected (a collision was staged); arrived \
             (podroute, daemon): {:?}",
            gate.arrived()
        );
        wait_until(
            T,
            &format!("round {round}: one connection left"),
            || (links(&pod_opened) + links(&d_opened) == 1).then_some(()),
            || {
                format!(
                    "open: podroute-opened {}, daemon-opened {}",
                    links(&pod_opened),
                    links(&d_opened)
                )
            },
        )
        .unwrap();
        let survivor = if links(&pod_opened) == 1 {
            "podroute"
        } else {
            "daemon"
        };
        if bird {
            assert_eq!(
                survivor, expected,
                "round {round} ({ids:?}): the connection the RFC keeps survives"
            );
        } else {
            eprintln!("round {round} ({ids:?}): the connection {survivor} opened survives");
        }
        let st = pod.peer(d_ep.addr);
        assert_eq!(st.state, State::Established, "{st:?}");
        assert_eq!(
            st.established_count, count,
            "round {round}: exactly one more Established session: {st:?}"
        );
        // Routes both ways over the surviving connection.
        let p = net(&format!("172.16.{}.0/26", 60 + round));
        let q = net(&format!("172.16.{}.64/26", 60 + round));
        pod.announce(p);
        d.wait_route(p, &pod_ep);
        d.announce(q);
        pod.wait_route(q);
    }
    // Still one connection, the same.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(links(&pod_opened) + links(&d_opened), 1);
    let last = if bird { u64::from(rounds) } else { 1 };
    assert_eq!(pod.peer(d_ep.addr).established_count, last);
}

#[test]
fn bird_collision_podroute_id_lower() {
    if !require_daemons() {
        return;
    }
    collision_rounds("bird", 65001, Ids::PodLower, 4);
}

#[test]
fn bird_collision_podroute_id_higher() {
    if !require_daemons() {
        return;
    }
    collision_rounds("bird", 65001, Ids::PodHigher, 4);
}

#[test]
fn gobgp_collision_podroute_id_lower() {
    if !require_daemons() {
        return;
    }
    collision_rounds("gobgp", 65002, Ids::PodLower, 3);
}

#[test]
fn gobgp_collision_podroute_id_higher() {
    if !require_daemons() {
        return;
    }
    collision_rounds("gobgp", 65002, Ids::PodHigher, 3);
}

/// RFC 6286: equal BGP IDs are legal on eBGP, and the larger AS's connection survives.
#[test]
fn bird_collision_equal_ids_daemon_as_larger() {
    if !require_daemons() {
        return;
    }
    collision_rounds("bird", 65001, Ids::Equal, 3);
}

#[test]
fn bird_collision_equal_ids_podroute_as_larger() {
    if !require_daemons() {
        return;
    }
    collision_rounds("bird", 64000, Ids::Equal, 3);
}

#[test]
fn gobgp_collision_equal_ids_podroute_as_larger() {
    if !require_daemons() {
        return;
    }
    collision_rounds("gobgp", 64000, Ids::Equal, 2);
}
