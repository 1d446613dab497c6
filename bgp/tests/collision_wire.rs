//! Connection collision (RFC 4271 §6.8) as the peer sees it on the wire, with a scripted raw
//! peer: both connections exist and podroute has sent its OPEN on both before the peer sends
//! its first OPEN. The connection podroute gives up must get its Cease / Connection Collision
//! Resolution *without a KEEPALIVE before it*.
//!
//! Why it matters (seen with BIRD 2 in `interop.rs`'s collision tests, several rounds in
//! ten): a KEEPALIVE acknowledges the peer's OPEN, so a peer in OpenConfirm on that
//! connection goes Established on it. BIRD (`bgp_rx_open`, proto/bgp/packets.c) then closes
//! any connection whose OPEN it receives next, whatever the BGP IDs ("collision with an
//! existing BGP connection that is in the Established state", §6.8), so it closed the
//! connection both sides meant to keep, and the Cease that followed closed the other: both
//! connections went, and the session came back on the next connection alone, the one §6.8
//! says must lose.

mod support;

use podroute_bgp::{PeerConfig, Speaker, SpeakerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;
use support::Endpoint;
use support::raw::{self, KEEPALIVE, NOTIFICATION, OPEN, RawPeer};

const POD_AS: u32 = 64512;
const PEER_AS: u32 = 65001;
const LOW: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const HIGH: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// The next message on `s`; `None` once the connection is closed.
fn next(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    raw::read_msg(s).ok()
}

/// Podroute (ID `pod_id`) connects to the raw peer (ID `peer_id`), the raw peer connects to
/// podroute, podroute sends its OPEN on both; then the raw peer sends its OPEN on the
/// connection podroute decides against first. Returns the types of the messages podroute sent
/// on that connection after its OPEN, until it closed it, and the raw peer's two streams
/// (podroute-opened, peer-opened). The other connection's OPEN gets its KEEPALIVE.
fn stage(pod_id: Ipv4Addr, peer_id: Ipv4Addr) -> (Vec<u8>, TcpStream, TcpStream) {
    let (pod_ep, peer_ep) = (Endpoint::alloc(), Endpoint::alloc());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = SpeakerConfig::new(POD_AS, pod_id);
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(pod_ep.addr), pod_ep.port));
    cfg.hold_time = 30;
    cfg.connect_retry = Duration::from_secs(60);
    let (speaker, best) = rt.block_on(Speaker::start(cfg)).unwrap();
    std::mem::forget(best);
    let raw_peer = RawPeer::listen(peer_ep).unwrap();
    let mut p = PeerConfig::new(IpAddr::V4(peer_ep.addr), PEER_AS);
    p.port = peer_ep.port;
    p.local_addr = Some(IpAddr::V4(pod_ep.addr));
    rt.block_on(speaker.add_peer(p)).unwrap();

    // Podroute's connection, and its OPEN on it: its main FSM is in OpenSent.
    let mut ours = raw_peer.accept(Duration::from_secs(10)).unwrap();
    assert_eq!(next(&mut ours).map(|m| m.0), Some(OPEN));
    // The peer's connection, and podroute's OPEN on it: a second FSM, also in OpenSent.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(peer_ep.addr), 0))
        .unwrap();
    let theirs = rt
        .block_on(sock.connect(SocketAddr::new(IpAddr::V4(pod_ep.addr), pod_ep.port)))
        .unwrap()
        .into_std()
        .unwrap();
    theirs.set_nonblocking(false).unwrap();
    theirs
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut theirs = theirs;
    assert_eq!(next(&mut theirs).map(|m| m.0), Some(OPEN));

    // The higher BGP ID's connection survives: the other is the one podroute gives up.
    let pod_wins = u32::from(pod_id) > u32::from(peer_id);
    let open = raw::open_body(PEER_AS, 90, peer_id);
    let loser = if pod_wins { &mut theirs } else { &mut ours };
    raw::write_msg(loser, OPEN, &open).unwrap();
    let mut sent = Vec::new();
    while let Some((t, body)) = next(loser) {
        sent.push(t);
        if t == NOTIFICATION {
            assert_eq!(body.get(..2), Some(&[6u8, 7][..]), "Cease / Collision");
        }
    }
    // The connection kept still answers the peer's OPEN with a KEEPALIVE.
    let winner = if pod_wins { &mut ours } else { &mut theirs };
    raw::write_msg(winner, OPEN, &open).unwrap();
    assert_eq!(
        next(winner).map(|m| m.0),
        Some(KEEPALIVE),
        "on the survivor"
    );
    // Keep the runtime (and the speaker) alive until the wire was read.
    drop(speaker);
    drop(rt);
    (sent, ours, theirs)
}

/// Our ID higher: the peer's connection loses, decided on the peer's OPEN on it.
#[test]
fn the_peer_opened_loser_gets_cease_without_keepalive() {
    let (sent, _ours, _theirs) = stage(HIGH, LOW);
    assert_eq!(
        sent,
        vec![NOTIFICATION],
        "podroute's messages after its OPEN on the connection it gives up ({KEEPALIVE} = \
         KEEPALIVE)"
    );
}

/// Our ID lower: our own connection loses, decided on the peer's OPEN on it.
#[test]
fn our_losing_connection_gets_cease_without_keepalive() {
    let (sent, _ours, _theirs) = stage(LOW, HIGH);
    assert_eq!(
        sent,
        vec![NOTIFICATION],
        "podroute's messages after its OPEN on the connection it gives up ({KEEPALIVE} = \
         KEEPALIVE)"
    );
}
