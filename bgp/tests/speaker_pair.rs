//! Two podroute speakers peering on loopback: sessions, announcements, withdrawals,
//! collision resolution and peer removal, with no daemon other than podroute itself.
//! Equal BGP identifiers: on eBGP a staged collision keeps the larger AS's connection at both
//! ends (RFC 6286 §2.3); within one AS they are an OPEN error (RFC 6286 §2.2).

mod support;

use podroute_bgp::fsm::State;
use podroute_bgp::{PeerConfig, Speaker, SpeakerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Distinct loopback addresses per test and per process, so nextest can run tests in parallel.
fn loopback_pair() -> (Ipv4Addr, Ipv4Addr) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let b = (pid % 250) as u8 + 1;
    let c = ((pid / 250) % 250) as u8;
    let d = (n * 2 % 250) as u8 + 1;
    (Ipv4Addr::new(127, b, c, d), Ipv4Addr::new(127, b, c, d + 1))
}

async fn speaker(addr: Ipv4Addr, asn: u32) -> (Speaker, podroute_bgp::BestChanges) {
    speaker_with_id(addr, asn, addr).await
}

async fn speaker_with_id(
    addr: Ipv4Addr,
    asn: u32,
    router_id: Ipv4Addr,
) -> (Speaker, podroute_bgp::BestChanges) {
    let mut cfg = SpeakerConfig::new(asn, router_id);
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(addr), 0));
    cfg.connect_retry = Duration::from_secs(1);
    Speaker::start(cfg).await.expect("speaker starts")
}

fn peer(addr: Ipv4Addr, port: u16, asn: u32, local: Ipv4Addr) -> PeerConfig {
    let mut p = PeerConfig::new(IpAddr::V4(addr), asn);
    p.port = port;
    p.local_addr = Some(IpAddr::V4(local));
    p.kind = "mesh".into();
    p
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn established(s: &Speaker) -> bool {
    s.peers()
        .await
        .unwrap()
        .iter()
        .all(|p| p.state == State::Established)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_speakers_exchange_and_withdraw_blocks() {
    let (a_ip, b_ip) = loopback_pair();
    let (a, _a_best) = speaker(a_ip, 64512).await;
    let (b, mut b_best) = speaker(b_ip, 64512).await;
    let a_port = a.listen_addr().unwrap().port();
    let b_port = b.listen_addr().unwrap().port();
    // Both sides active: the collision is resolved and one session remains.
    a.add_peer(peer(b_ip, b_port, 64512, a_ip)).await.unwrap();
    b.add_peer(peer(a_ip, a_port, 64512, b_ip)).await.unwrap();
    wait_for("both sessions Established", || async {
        established(&a).await && established(&b).await
    })
    .await;

    let block: ipnet::IpNet = "172.16.241.64/26".parse().unwrap();
    let block6: ipnet::IpNet = "fd00:10:0:1::/122".parse().unwrap();
    a.announce(block, None).await.unwrap();
    a.announce(block6, None).await.unwrap();
    wait_for("B learns both blocks", || async {
        b.loc_rib().await.unwrap().len() == 2
    })
    .await;
    let rib = b.loc_rib().await.unwrap();
    let v4 = rib.iter().find(|(p, _)| *p == block).unwrap();
    assert_eq!(v4.1.next_hop, IpAddr::V4(a_ip));
    let v6 = rib.iter().find(|(p, _)| *p == block6).unwrap();
    assert_eq!(v6.1.next_hop, IpAddr::V6(a_ip.to_ipv6_mapped()));

    // The best-path stream tells the agent the same.
    let mut learned = Vec::new();
    while learned.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), b_best.recv())
            .await
            .unwrap()
            .unwrap();
        learned.extend(
            batch
                .into_iter()
                .filter(|c| c.best.is_some())
                .map(|c| c.prefix),
        );
    }
    learned.sort();
    assert_eq!(learned, vec![block, block6]);

    let st = b.peers().await.unwrap();
    assert_eq!(st[0].prefixes_received, 2);
    assert_eq!(st[0].prefixes_accepted, 2);
    assert!(
        st[0].end_of_rib.len() == 2,
        "EoR for both families: {:?}",
        st[0].end_of_rib
    );
    let sa = a.peers().await.unwrap();
    assert_eq!(sa[0].prefixes_advertised, 2);

    a.withdraw(block).await.unwrap();
    wait_for("B drops the withdrawn block", || async {
        b.loc_rib().await.unwrap().len() == 1
    })
    .await;

    // Removing the peer on A sends Cease / Peer De-configured; B reports it and drops routes.
    a.remove_peer(IpAddr::V4(b_ip)).await.unwrap();
    wait_for("B reports the Cease", || async {
        let p = b.peers().await.unwrap();
        p[0].state != State::Established
            && p[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Peer De-configured"))
    })
    .await;
    assert!(b.loc_rib().await.unwrap().is_empty());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_remote_as_is_reported_on_both_sides() {
    let (a_ip, b_ip) = loopback_pair();
    let (a, _) = speaker(a_ip, 64512).await;
    let (b, _) = speaker(b_ip, 64513).await;
    let b_port = b.listen_addr().unwrap().port();
    // A expects 65000 but B is 64513; B expects A correctly and is passive.
    a.add_peer(peer(b_ip, b_port, 65000, a_ip)).await.unwrap();
    let mut pb = peer(a_ip, 179, 64512, b_ip);
    pb.passive = true;
    b.add_peer(pb).await.unwrap();
    wait_for("A reports Bad Peer AS", || async {
        a.peers().await.unwrap()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("Bad Peer AS"))
    })
    .await;
    wait_for("B reports the NOTIFICATION it received", || async {
        b.peers().await.unwrap()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("received NOTIFICATION OPEN Message Error / Bad Peer AS"))
    })
    .await;
    let a_err = a.peers().await.unwrap()[0].last_error.clone().unwrap();
    assert!(
        a_err.contains("64513"),
        "A's error names the AS the peer sent: {a_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_change_at_runtime_without_touching_others() {
    let (a_ip, b_ip) = loopback_pair();
    let (c_ip, _) = loopback_pair();
    let (a, _) = speaker(a_ip, 64512).await;
    let (b, _) = speaker(b_ip, 64512).await;
    let (c, _) = speaker(c_ip, 64512).await;
    let b_port = b.listen_addr().unwrap().port();
    let c_port = c.listen_addr().unwrap().port();
    let mut pb = peer(b_ip, b_port, 64512, a_ip);
    a.add_peer(pb.clone()).await.unwrap();
    a.add_peer(peer(c_ip, c_port, 64512, a_ip)).await.unwrap();
    let mut from_a = peer(a_ip, 179, 64512, b_ip);
    from_a.passive = true;
    b.add_peer(from_a.clone()).await.unwrap();
    from_a.local_addr = Some(IpAddr::V4(c_ip));
    c.add_peer(from_a).await.unwrap();
    wait_for("A's two sessions Established", || async {
        let p = a.peers().await.unwrap();
        p.len() == 2 && p.iter().all(|p| p.state == State::Established)
    })
    .await;
    let count = |peers: &[podroute_bgp::PeerStatus], ip: Ipv4Addr| {
        peers
            .iter()
            .find(|p| p.addr == IpAddr::V4(ip))
            .unwrap()
            .established_count
    };

    // The same configuration again: nothing happens.
    a.set_peer(pb.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = a.peers().await.unwrap();
    assert_eq!((count(&p, b_ip), count(&p, c_ip)), (1, 1));
    assert!(p.iter().all(|p| p.state == State::Established));

    // A changed hold time restarts that session only, with Cease / Other Configuration Change.
    pb.hold_time = Some(90);
    a.set_peer(pb).await.unwrap();
    wait_for("B sees the Cease", || async {
        b.peers().await.unwrap()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("Other Configuration Change"))
    })
    .await;
    wait_for("the A-B session is back", || async {
        b.peers().await.unwrap()[0].state == State::Established
            && a.peers()
                .await
                .unwrap()
                .iter()
                .all(|p| p.state == State::Established)
    })
    .await;
    let p = a.peers().await.unwrap();
    assert_eq!(count(&p, c_ip), 1, "the A-C session was not touched");
    assert_eq!(c.peers().await.unwrap()[0].established_count, 1);
    for s in [a, b, c] {
        s.shutdown().await.unwrap();
    }
}

/// A speaker listening on `[::]` (dual-stack) accepts an IPv4 peer: the connection arrives
/// from `::ffff:a.b.c.d` and is matched to the peer configured as `a.b.c.d`, also with a
/// TCP-MD5 key (set on the listener in the mapped form).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_listener_accepts_ipv4_peers_with_and_without_md5() {
    for md5 in [false, true] {
        let (a_addr, b_addr) = loopback_pair();
        let mut cfg = SpeakerConfig::new(64512, a_addr);
        cfg.listen = Some(SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            0,
        ));
        cfg.connect_retry = Duration::from_secs(1);
        let (a, _a_best) = Speaker::start(cfg)
            .await
            .expect("dual-stack speaker starts");
        let a_port = a.listen_addr().unwrap().port();
        let (b, _b_best) = speaker(b_addr, 64512).await;
        // A only waits for B; B connects to A's port over IPv4.
        let mut pa = peer(b_addr, 1, 64512, a_addr);
        pa.local_addr = None;
        pa.passive = true;
        let mut pb = peer(a_addr, a_port, 64512, b_addr);
        if md5 {
            pa.password = Some(std::sync::Arc::from(&b"dual"[..]));
            pb.password = Some(std::sync::Arc::from(&b"dual"[..]));
        }
        a.add_peer(pa).await.unwrap();
        b.add_peer(pb).await.unwrap();
        wait_for("the IPv4 peer Established on the [::] listener", || async {
            established(&a).await && established(&b).await
        })
        .await;
        let row = a.peers().await.unwrap();
        assert_eq!(row[0].addr, IpAddr::V4(b_addr));
    }
}

/// Two speakers on IPv6 loopback with an IPv6-only session, as the agent makes the mesh
/// between two nodes' IPv6 addresses (Calico's bird6): IPv6 blocks go across with the
/// configured global next hop; an IPv4 block announced too stays home (the family was not
/// negotiated); End-of-RIB comes for IPv6 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_only_session_on_ipv6_loopback_carries_ipv6_only() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("!!! SKIPPED: this host has no IPv6 loopback");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: IPv6 loopback is required"
        );
        return;
    }
    let lo = std::net::Ipv6Addr::LOCALHOST;
    let start = |id: Ipv4Addr| async move {
        let mut cfg = SpeakerConfig::new(64512, id);
        cfg.listen = Some(SocketAddr::new(IpAddr::V6(lo), 0));
        cfg.connect_retry = Duration::from_secs(1);
        Speaker::start(cfg).await.expect("speaker starts")
    };
    let (a, _a_best) = start(Ipv4Addr::new(192, 0, 2, 1)).await;
    let (b, _b_best) = start(Ipv4Addr::new(192, 0, 2, 2)).await;
    let v6_peer = |port: u16, passive: bool| {
        let mut p = PeerConfig::new(IpAddr::V6(lo), 64512);
        p.port = port;
        p.local_addr = Some(IpAddr::V6(lo));
        p.families = vec![podroute_bgp::wire::Family::IPV6_UNICAST];
        p.local_v6_next_hop = Some("fd00:92::128".parse().unwrap());
        p.passive = passive;
        p.kind = "mesh".into();
        p
    };
    a.add_peer(v6_peer(b.listen_addr().unwrap().port(), false))
        .await
        .unwrap();
    b.add_peer(v6_peer(a.listen_addr().unwrap().port(), true))
        .await
        .unwrap();
    let block6: ipnet::IpNet = "fd00:10:0:a::/122".parse().unwrap();
    let block4: ipnet::IpNet = "172.16.241.64/26".parse().unwrap();
    a.announce(block6, None).await.unwrap();
    a.announce(block4, None).await.unwrap();
    wait_for("B learns the IPv6 block and IPv6 End-of-RIB", || async {
        let learned = b.loc_rib().await.unwrap().iter().any(|(p, _)| *p == block6);
        let eor = b
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| !p.end_of_rib.is_empty());
        learned && eor
    })
    .await;
    let rib = b.loc_rib().await.unwrap();
    assert_eq!(rib.len(), 1, "only the IPv6 block crosses: {rib:?}");
    assert_eq!(rib[0].1.next_hop, "fd00:92::128".parse::<IpAddr>().unwrap());
    let st = b.peers().await.unwrap();
    assert_eq!(st[0].state, State::Established);
    assert_eq!(
        st[0].end_of_rib,
        vec![podroute_bgp::wire::Family::IPV6_UNICAST]
    );
    assert_eq!(st[0].prefixes_received, 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Two podroute speakers with the same BGP ID in different ASes (legal, RFC 6286 §2.2), both
/// active, their connections staged to collide (relays that forward nothing until both
/// exist, `support::proxy`). Both ends close the same connection: the one opened by A, the
/// smaller AS (RFC 6286 §2.3); B's survives, once Established on each side, carrying routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_bgp_ids_on_ebgp_keep_the_connection_of_the_larger_as() {
    use support::proxy::{Gate, Relay};
    let (a_ip, b_ip) = loopback_pair();
    let id = Ipv4Addr::new(10, 9, 9, 9);
    let (a, _) = speaker_with_id(a_ip, 64512, id).await;
    let (b, _b_best) = speaker_with_id(b_ip, 64513, id).await;
    let (a_port, b_port) = (
        a.listen_addr().unwrap().port(),
        b.listen_addr().unwrap().port(),
    );
    let gate = Gate::new(2, Duration::from_secs(20));
    let a_opened = Relay::start(
        "A",
        SocketAddr::new(IpAddr::V4(b_ip), 0),
        SocketAddr::new(IpAddr::V4(b_ip), b_port),
        IpAddr::V4(a_ip),
        Some((gate.clone(), 0)),
    );
    let b_opened = Relay::start(
        "B",
        SocketAddr::new(IpAddr::V4(a_ip), 0),
        SocketAddr::new(IpAddr::V4(a_ip), a_port),
        IpAddr::V4(b_ip),
        Some((gate.clone(), 1)),
    );
    a.add_peer(peer(b_ip, a_opened.listen.port(), 64513, a_ip))
        .await
        .unwrap();
    b.add_peer(peer(a_ip, b_opened.listen.port(), 64512, b_ip))
        .await
        .unwrap();
    wait_for("both sessions Established", || async {
        established(&a).await && established(&b).await
    })
    .await;
    assert!(
        gate.all_arrived(),
        "both connections existed: {:?}",
        gate.arrived()
    );
    wait_for("one connection left", || async {
        a_opened.open_links().len() + b_opened.open_links().len() == 1
    })
    .await;
    assert_eq!(
        (a_opened.open_links().len(), b_opened.open_links().len()),
        (0, 1),
        "the connection opened by the larger AS (B) survives"
    );
    for s in [&a, &b] {
        let p = s.peers().await.unwrap();
        assert_eq!(p[0].established_count, 1, "{p:?}");
    }
    let block: ipnet::IpNet = "172.16.242.0/26".parse().unwrap();
    a.announce(block, None).await.unwrap();
    wait_for("B learns A's block", || async {
        b.loc_rib().await.unwrap().iter().any(|(p, _)| *p == block)
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The same BGP ID within one AS is an OPEN error (Bad BGP Identifier, RFC 6286 §2.2), not a
/// collision to tie-break: no session comes up and both sides say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_bgp_ids_within_an_as_are_refused() {
    let (a_ip, b_ip) = loopback_pair();
    let id = Ipv4Addr::new(10, 9, 9, 9);
    let (a, _) = speaker_with_id(a_ip, 64512, id).await;
    let (b, _) = speaker_with_id(b_ip, 64512, id).await;
    let a_port = a.listen_addr().unwrap().port();
    let b_port = b.listen_addr().unwrap().port();
    a.add_peer(peer(b_ip, b_port, 64512, a_ip)).await.unwrap();
    b.add_peer(peer(a_ip, a_port, 64512, b_ip)).await.unwrap();
    for s in [&a, &b] {
        wait_for("Bad BGP Identifier reported", || async {
            s.peers().await.unwrap()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Bad BGP Identifier"))
        })
        .await;
    }
    for s in [&a, &b] {
        let p = s.peers().await.unwrap();
        assert_eq!(p[0].established_count, 0, "{p:?}");
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
