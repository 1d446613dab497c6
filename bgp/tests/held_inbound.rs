//! Connections that arrive before the peers are configured (issue 14, start-up race): the
//! agent opens its listener before reading the datastore ([`EarlyListener`]) and the speaker
//! holds connections from addresses it does not know yet while the initial configuration
//! comes in. A peer that connects early gets its session on that very connection (no failed
//! attempt, no connect retry); a connection from an address that never becomes a peer is
//! closed once the initial configuration is complete (plus a grace); the number held is
//! capped. On loopback, podroute speakers only.

mod support;

use podroute_bgp::fsm::State;
use podroute_bgp::{EarlyListener, PeerConfig, Speaker, SpeakerConfig};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::{Endpoint, alloc_addr, peer_status as status, wait_async as wait_for};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

fn speaker_config(ep: &Endpoint) -> SpeakerConfig {
    let mut cfg = SpeakerConfig::new(64512, ep.router_id());
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
    cfg.hold_time = 30;
    // Long retries: a connection that is refused or closed shows as a failure and is not
    // made good again by a retry within the test.
    cfg.connect_retry = Duration::from_secs(60);
    cfg.refused_retry = Duration::from_secs(60);
    cfg.jitter_seed = Some(7);
    cfg
}

fn peer(from: &Endpoint, to: &Endpoint, passive: bool) -> PeerConfig {
    let mut p = PeerConfig::new(IpAddr::V4(to.addr), 64512);
    p.port = to.port;
    p.local_addr = Some(IpAddr::V4(from.addr));
    p.passive = passive;
    p.kind = "mesh".into();
    p
}

/// A plain TCP connection to `to` from a fresh loopback address (not a peer).
async fn stranger(to: &Endpoint) -> tokio::net::TcpStream {
    connect_from(alloc_addr(), to).await
}

async fn connect_from(from: std::net::Ipv4Addr, to: &Endpoint) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    sock.connect(SocketAddr::new(IpAddr::V4(to.addr), to.port))
        .await
        .unwrap()
}

/// Whether the other side closed `c` (EOF or reset) within `within`.
async fn closed_within(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Whatever was sent (nothing is expected from a speaker that does not know us).
            Ok(Ok(_)) => continue,
        }
    }
}

/// Speaker B connects to A before A has configured any peer. A holds the connection and
/// hands it to B's peer entry when it is configured: the session comes up on B's first
/// attempt, without a failure. Without holding, A would close the connection and B would
/// wait its connect retry (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connecting_before_configuration_gets_its_session_on_that_connection() {
    let a_ep = Endpoint::alloc();
    let b_ep = Endpoint::alloc();
    let mut a_cfg = speaker_config(&a_ep);
    a_cfg.initial_config_barrier = true;
    a_cfg.held_inbound_grace = Duration::from_millis(300);
    let (a, _a_best) = Speaker::start(a_cfg).await.unwrap();
    let (b, _b_best) = Speaker::start(speaker_config(&b_ep)).await.unwrap();
    let a_addr = IpAddr::V4(a_ep.addr);
    let b_addr = IpAddr::V4(b_ep.addr);
    b.add_peer(peer(&b_ep, &a_ep, false)).await.unwrap();
    // B's connection is accepted and B waits in OpenSent for A's OPEN.
    wait_for("B to connect to A", || async {
        status(&b, a_addr).await.state == State::OpenSent
    })
    .await;
    // A stranger connects too, and stays open while A's configuration is not complete.
    let mut other = stranger(&a_ep).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = status(&b, a_addr).await;
    assert_eq!(waiting.state, State::OpenSent, "{waiting:?}");
    assert_eq!(waiting.connect_failures, 0, "{waiting:?}");

    a.add_peer(peer(&a_ep, &b_ep, true)).await.unwrap();
    a.initial_config_done().await.unwrap();
    wait_for("the session Established on both sides", || async {
        status(&a, b_addr).await.state == State::Established
            && status(&b, a_addr).await.state == State::Established
    })
    .await;
    let up = status(&b, a_addr).await;
    assert_eq!(up.connect_attempts, 1, "one attempt, no retry: {up:?}");
    assert_eq!(up.connect_failures, 0, "{up:?}");
    assert_eq!(up.established_count, 1, "{up:?}");

    // The stranger's connection is closed once the configuration is complete (+ grace).
    assert!(
        closed_within(&mut other, Duration::from_secs(20)).await,
        "a connection from an address that is not a peer was never closed"
    );
    // And a stranger after the grace is closed at once, as before.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut late = stranger(&a_ep).await;
    assert!(closed_within(&mut late, Duration::from_secs(20)).await);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The listener opened before the speaker's configuration is known: a peer's connection is
/// held there, then by the speaker started on it, and handed to the peer once configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_listener_holds_a_connection_until_the_speaker_configures_its_peer() {
    let a_ep = Endpoint::alloc();
    let b_ep = Endpoint::alloc();
    let early = EarlyListener::bind(SocketAddr::new(IpAddr::V4(a_ep.addr), a_ep.port)).unwrap();
    let (b, _b_best) = Speaker::start(speaker_config(&b_ep)).await.unwrap();
    let a_addr = IpAddr::V4(a_ep.addr);
    let b_addr = IpAddr::V4(b_ep.addr);
    b.add_peer(peer(&b_ep, &a_ep, false)).await.unwrap();
    wait_for("the early listener to hold B's connection", || async {
        early.held() == 1
    })
    .await;
    // B's connection is up and held: its OPEN goes out and waits for an answer.
    wait_for("B in OpenSent towards the held connection", || async {
        status(&b, a_addr).await.state == State::OpenSent
    })
    .await;

    let mut a_cfg = speaker_config(&a_ep);
    a_cfg.initial_config_barrier = true;
    let (a, _a_best) = Speaker::start_on(a_cfg, early).await.unwrap();
    assert_eq!(a.listen_addr(), Some(SocketAddr::new(a_addr, a_ep.port)));
    a.add_peer(peer(&a_ep, &b_ep, true)).await.unwrap();
    a.initial_config_done().await.unwrap();
    wait_for("the session Established on both sides", || async {
        status(&a, b_addr).await.state == State::Established
            && status(&b, a_addr).await.state == State::Established
    })
    .await;
    let up = status(&b, a_addr).await;
    assert_eq!((up.connect_attempts, up.connect_failures), (1, 0), "{up:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// At most `held_inbound_max` connections are held; further ones from unknown addresses are
/// closed at once, and a peer configured with a TCP-MD5 password does not get a connection
/// that was accepted before its key was on the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_capped() {
    const CAP: usize = 4;
    let a_ep = Endpoint::alloc();
    let mut a_cfg = speaker_config(&a_ep);
    a_cfg.initial_config_barrier = true;
    a_cfg.held_inbound_max = CAP;
    a_cfg.held_inbound_grace = Duration::from_millis(200);
    a_cfg.held_inbound_max_age = Duration::from_secs(120);
    let (a, _a_best) = Speaker::start(a_cfg).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        held.push(stranger(&a_ep).await);
    }
    let md5_ep = Endpoint::alloc();
    let mut md5_conn = connect_from(md5_ep.addr, &a_ep).await;
    // Let the core take them in before the next ones arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let mut extra = stranger(&a_ep).await;
        assert!(
            closed_within(&mut extra, Duration::from_secs(20)).await,
            "a connection beyond the cap was held"
        );
    }
    for c in &mut held {
        assert!(
            !closed_within(c, Duration::from_millis(200)).await,
            "a connection within the cap was closed before the configuration was complete"
        );
    }
    assert!(!closed_within(&mut md5_conn, Duration::from_millis(200)).await);
    // Configured with a password: its held connection was accepted without TCP-MD5 and is
    // closed at once (the others are held on until the configuration is complete).
    let mut with_key = peer(&a_ep, &md5_ep, true);
    with_key.password = Some(std::sync::Arc::from(&b"secret"[..]));
    a.add_peer(with_key).await.unwrap();
    assert!(
        closed_within(&mut md5_conn, Duration::from_secs(10)).await,
        "an unauthenticated connection was handed to a TCP-MD5 peer"
    );
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(100)).await);
    }
    a.initial_config_done().await.unwrap();
    for c in &mut held {
        assert!(closed_within(c, Duration::from_secs(20)).await);
    }
    a.shutdown().await.unwrap();
}
