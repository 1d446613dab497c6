//! Graceful restart (RFC 4724) between podroute speakers on loopback, both roles: A is the
//! helper; B "crashes" (`shutdown_for_restart`: sessions closed without NOTIFICATION) and a
//! new speaker B2 starts on the same address and port, usually with `restarting: true`.
//!
//! What is checked, through A's Loc-RIB, A's peer status and A's best-change stream (what the
//! agent would program into the kernel):
//! - a TCP loss keeps B's routes, marked stale, with no withdrawal in the stream;
//! - B2 re-announces a subset and sends End-of-RIB: only the missing routes are withdrawn;
//! - the restart timer (capped by `max_restart_time`) removes everything if B2 never comes;
//! - a Cease removes everything at once;
//! - B2 without the Forwarding State bit (a cold start) makes A drop the stale routes at once;
//! - B2 going down again before its End-of-RIB keeps the routes stale, and the stale timer
//!   bounds the wait for End-of-RIB;
//! - a restarting B2 defers its best-change output and its advertisements until it has A's
//!   End-of-RIB (or its deferral timer ran out), then `converged()` turns true; with the
//!   initial configuration barrier it also waits for peers configured late, and sends its own
//!   prefixes before its End-of-RIB.
//!
//! With a hand-driven peer X: a restarted X whose new OPEN (R = 1) arrives while its old
//! session still looks alive replaces that session and is helped; a hold timer expiry (a
//! NOTIFICATION) removes X's routes at once.

mod support;

use ipnet::IpNet;
use podroute_bgp::fsm::State;
use podroute_bgp::gr::GrPhase;
use podroute_bgp::rib::BestChange;
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Endpoint;
use tokio::time::Instant;

type BestRx = podroute_bgp::BestChanges;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

async fn start(ep: &Endpoint, tweak: impl FnOnce(&mut SpeakerConfig)) -> (Speaker, BestRx) {
    let mut cfg = SpeakerConfig::new(64512, ep.router_id());
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
    cfg.connect_retry = Duration::from_secs(1);
    cfg.hold_time = 30;
    tweak(&mut cfg);
    // The previous speaker on this address has just closed its listener; retry briefly.
    for _ in 0..50 {
        match Speaker::start(cfg.clone()).await {
            Ok(s) => return s,
            Err(e) => {
                eprintln!("retrying speaker start: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("speaker on {} does not start", ep.addr);
}

fn peer(from: &Endpoint, to: &Endpoint) -> PeerConfig {
    let mut p = PeerConfig::new(IpAddr::V4(to.addr), 64512);
    p.port = to.port;
    p.local_addr = Some(IpAddr::V4(from.addr));
    p.kind = "mesh".into();
    p
}

/// Everything a best-change stream delivered, with arrival times.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(Instant, BestChange)>>>);

impl Log {
    fn record(mut rx: BestRx) -> Log {
        let log = Log::default();
        let l = log.clone();
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let now = Instant::now();
                l.0.lock()
                    .unwrap()
                    .extend(batch.into_iter().map(|c| (now, c)));
            }
        });
        log
    }

    /// (time, announced?) of every change of `prefix`.
    fn changes(&self, prefix: IpNet) -> Vec<(Instant, bool)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.prefix == prefix)
            .map(|(t, c)| (*t, c.best.is_some()))
            .collect()
    }

    fn withdrawn(&self, prefix: IpNet) -> bool {
        self.changes(prefix).iter().any(|(_, a)| !a)
    }

    /// Wait until the withdrawals are exactly `expected` (the stream is read by a task, so
    /// it may lag behind the Loc-RIB a little).
    async fn expect_withdrawals(&self, expected: Vec<IpNet>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.withdrawals() != expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.withdrawals(), expected);
    }

    /// Prefixes that were learned and then withdrawn (a `None` for a prefix never learned,
    /// such as a locally originated one, withdraws nothing).
    fn withdrawals(&self) -> Vec<IpNet> {
        let mut seen = std::collections::HashSet::new();
        let mut v = Vec::new();
        for (_, c) in self.0.lock().unwrap().iter() {
            if c.best.is_some() {
                seen.insert(c.prefix);
            } else if seen.contains(&c.prefix) {
                v.push(c.prefix);
            }
        }
        v.sort();
        v
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn status(s: &Speaker, ep: &Endpoint) -> PeerStatus {
    s.peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.addr == IpAddr::V4(ep.addr))
        .expect("peer configured")
}

/// Learned prefixes in the Loc-RIB with their stale marks.
async fn learned(s: &Speaker) -> Vec<(IpNet, bool)> {
    s.loc_rib()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, b)| b.peer != podroute_bgp::rib::LOCAL)
        .map(|(p, b)| (p, b.stale))
        .collect()
}

fn prefixes(v: &[(IpNet, bool)]) -> Vec<IpNet> {
    v.iter().map(|(p, _)| *p).collect()
}

const P1: &str = "172.16.1.0/26";
const P2: &str = "172.16.2.0/26";
const P3: &str = "172.16.3.0/26";
const P6: &str = "fd00:16:1::/122";

/// A (helper) and B peered, B announcing `routes`, A having learned them all.
async fn pair(
    max_restart_time: Option<Duration>,
    stale_routes_time: Option<Duration>,
    routes: &[&str],
) -> (Endpoint, Speaker, Log, Endpoint, Speaker) {
    let (a_ep, b_ep) = (Endpoint::alloc(), Endpoint::alloc());
    let (a, a_best) = start(&a_ep, |_| {}).await;
    let (b, _b_best) = start(&b_ep, |_| {}).await;
    let log = Log::record(a_best);
    let mut pb = peer(&a_ep, &b_ep);
    pb.max_restart_time = max_restart_time;
    pb.stale_routes_time = stale_routes_time;
    a.add_peer(pb).await.unwrap();
    b.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    for r in routes {
        b.announce(net(r), None).await.unwrap();
    }
    wait_for("A learns B's routes", || async {
        learned(&a).await.len() == routes.len()
    })
    .await;
    let st = status(&a, &b_ep).await;
    let gr = st.graceful_restart.expect("GR negotiated");
    assert_eq!(gr.phase, GrPhase::Normal);
    let cap = gr.peer_capability.unwrap();
    assert_eq!(cap.restart_time, 120);
    assert!(!cap.restart_state, "a cold start does not set R");
    assert!(
        cap.families.iter().all(|f| !f.forwarding_state),
        "a cold start does not set F: {cap:?}"
    );
    (a_ep, a, log, b_ep, b)
}

/// Crash B and wait until A has noticed.
async fn crash(b: Speaker, a: &Speaker, b_ep: &Endpoint) {
    b.shutdown_for_restart().await.unwrap();
    wait_for("A notices B is gone", || async {
        status(a, b_ep).await.state != State::Established
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_keeps_routes_until_end_of_rib_and_sweeps_only_the_missing() {
    let (a_ep, a, log, b_ep, b) = pair(None, None, &[P1, P2, P3, P6]).await;
    a.announce(net("172.16.100.0/26"), None).await.unwrap();
    crash(b, &a, &b_ep).await;

    let st = status(&a, &b_ep).await;
    let gr = st.graceful_restart.clone().unwrap();
    assert_eq!(gr.phase, GrPhase::Restarting, "{st:?}");
    assert_eq!(gr.stale_prefixes, 4);
    assert_eq!(gr.restart_time, Some(Duration::from_secs(120)));
    assert!(gr.restart_deadline.is_some());
    assert!(st.last_error.unwrap().contains("TCP"));
    // While B is away (1.5 s), A keeps all four routes, stale, and tells the agent nothing.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let l = learned(&a).await;
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l.iter().all(|(_, stale)| *stale), "{l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.withdrawals().is_empty(), "{:?}", log.withdrawals());

    // B2 restarts (R and F set), announcing P1 and P6 only.
    let started = Instant::now();
    let (b2, mut b2_best) = start(&b_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(15);
    })
    .await;
    let converged = b2.converged();
    assert!(!*converged.borrow());
    b2.announce(net(P1), None).await.unwrap();
    b2.announce(net(P6), None).await.unwrap();
    b2.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("A sweeps what B2 did not re-announce", || async {
        prefixes(&learned(&a).await) == vec![net(P1), net(P6)]
    })
    .await;
    let l = learned(&a).await;
    assert!(l.iter().all(|(_, stale)| !stale), "{l:?}");
    log.expect_withdrawals(vec![net(P2), net(P3)]).await;
    assert!(!log.withdrawn(net(P1)) && !log.withdrawn(net(P6)));
    let st = status(&a, &b_ep).await;
    let gr = st.graceful_restart.unwrap();
    assert_eq!(gr.phase, GrPhase::Normal);
    assert_eq!(gr.stale_prefixes, 0);
    let cap = gr.peer_capability.unwrap();
    assert!(cap.restart_state, "B2 set R: {cap:?}");
    assert!(cap.families.iter().all(|f| f.forwarding_state), "{cap:?}");

    // B2 ended its deferral on A's End-of-RIB, long before its 15 s timer, and handed its
    // agent A's route in one batch queued before `converged` turned true.
    let mut c = converged.clone();
    tokio::time::timeout(Duration::from_secs(10), c.wait_for(|c| *c))
        .await
        .expect("B2 converges")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let batch = b2_best.try_recv().expect("the deferred batch is queued");
    assert_eq!(
        batch.iter().map(|c| c.prefix).collect::<Vec<_>>(),
        vec![net("172.16.100.0/26")]
    );
    assert!(batch.iter().all(|c| c.best.is_some()));
    a.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_timer_expiry_removes_every_stale_route() {
    // B advertises 120 s; A caps it at 2 s.
    let (_a_ep, a, log, b_ep, b) = pair(Some(Duration::from_secs(2)), None, &[P1, P2]).await;
    crash(b, &a, &b_ep).await;
    let down = Instant::now();
    let gr = status(&a, &b_ep).await.graceful_restart.unwrap();
    assert_eq!(gr.restart_time, Some(Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(learned(&a).await.len(), 2, "still kept after 1 s");
    wait_for("A drops B's routes", || async {
        learned(&a).await.is_empty()
    })
    .await;
    let took = down.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "{took:?}"
    );
    log.expect_withdrawals(vec![net(P1), net(P2)]).await;
    let st = status(&a, &b_ep).await;
    let gr = st.graceful_restart.unwrap();
    assert_eq!((gr.phase, gr.stale_prefixes), (GrPhase::Normal, 0));
    assert!(gr.restart_deadline.is_none());
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cease_removes_routes_at_once() {
    let (_a_ep, a, log, b_ep, b) = pair(None, None, &[P1, P2]).await;
    b.shutdown().await.unwrap();
    let t = Instant::now();
    wait_for("A drops B's routes", || async {
        learned(&a).await.is_empty()
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(2));
    log.expect_withdrawals(vec![net(P1), net(P2)]).await;
    let st = status(&a, &b_ep).await;
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("Administrative Shutdown")),
        "{st:?}"
    );
    assert_eq!(st.graceful_restart.unwrap().stale_prefixes, 0);
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_state_not_preserved_drops_stale_routes_on_reconnect() {
    let (a_ep, a, log, b_ep, b) = pair(None, None, &[P1, P2]).await;
    crash(b, &a, &b_ep).await;
    assert_eq!(learned(&a).await.len(), 2);
    // A cold start (not `restarting`): F = 0, so A must not wait for End-of-RIB.
    let (b2, _b2_best) = start(&b_ep, |_| {}).await;
    b2.announce(net(P1), None).await.unwrap();
    b2.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("A has only what B2 announces", || async {
        learned(&a).await == vec![(net(P1), false)]
    })
    .await;
    // P1 was dropped at once on reconnection and learned again (with F = 1 it would have been
    // kept until End-of-RIB, never withdrawn).
    wait_for("the stream shows P1 three times", || async {
        log.changes(net(P1)).len() >= 3
    })
    .await;
    let p1 = log.changes(net(P1));
    assert_eq!(
        p1.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
        vec![true, false, true],
        "P1: learned, swept on reconnect, learned again"
    );
    assert!(log.withdrawn(net(P2)));
    let cap = status(&a, &b_ep)
        .await
        .graceful_restart
        .unwrap()
        .peer_capability
        .unwrap();
    assert!(!cap.restart_state && cap.families.iter().all(|f| !f.forwarding_state));
    a.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_restart_before_end_of_rib_keeps_routes_stale() {
    let (a_ep, a, log, b_ep, b) = pair(None, None, &[P1, P2, P3]).await;
    crash(b, &a, &b_ep).await;
    // B2 restarts but waits for a second peer that never comes: it holds back its updates
    // and its End-of-RIB, so A stays in the stale phase with B2 Established.
    let nobody = Endpoint::alloc();
    let (b2, _b2_best) = start(&b_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(30);
    })
    .await;
    b2.announce(net(P1), None).await.unwrap();
    // The ghost first, or A's End-of-RIB could end the deferral before it is configured.
    let mut ghost = peer(&b_ep, &nobody);
    ghost.passive = true;
    b2.add_peer(ghost).await.unwrap();
    b2.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("A waits for B2's End-of-RIB", || async {
        let st = status(&a, &b_ep).await;
        st.state == State::Established
            && st
                .graceful_restart
                .is_some_and(|g| g.phase == GrPhase::Recovering && g.stale_deadline.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let l = learned(&a).await;
    assert_eq!(l.len(), 3, "{l:?}");
    assert!(l.iter().all(|(_, s)| *s), "B2 sent nothing yet: {l:?}");
    assert!(!*b2.converged().borrow());

    // B2 crashes too: still stale, restart timer again.
    crash(b2, &a, &b_ep).await;
    let gr = status(&a, &b_ep).await.graceful_restart.unwrap();
    assert_eq!((gr.phase, gr.stale_prefixes), (GrPhase::Restarting, 3));
    assert_eq!(learned(&a).await.len(), 3);

    // B3 comes back for good with P1 only.
    let (b3, _b3_best) = start(&b_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(15);
    })
    .await;
    b3.announce(net(P1), None).await.unwrap();
    b3.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("A keeps P1 only", || async {
        learned(&a).await == vec![(net(P1), false)]
    })
    .await;
    log.expect_withdrawals(vec![net(P2), net(P3)]).await;
    assert!(!log.withdrawn(net(P1)));
    a.shutdown().await.unwrap();
    b3.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_timer_bounds_the_wait_for_end_of_rib() {
    // A waits at most 2 s for End-of-RIB once B2 is back.
    let (a_ep, a, log, b_ep, b) = pair(None, Some(Duration::from_secs(2)), &[P1, P2]).await;
    crash(b, &a, &b_ep).await;
    let nobody = Endpoint::alloc();
    let (b2, _b2_best) = start(&b_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(30);
    })
    .await;
    let mut ghost = peer(&b_ep, &nobody);
    ghost.passive = true;
    b2.add_peer(ghost).await.unwrap();
    b2.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("B2 Established with A", || async {
        status(&a, &b_ep).await.state == State::Established
    })
    .await;
    let up = Instant::now();
    wait_for("A's stale timer removes the routes", || async {
        learned(&a).await.is_empty()
    })
    .await;
    let took = up.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    log.expect_withdrawals(vec![net(P1), net(P2)]).await;
    a.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_speaker_defers_output_until_its_timer() {
    let (a_ep, b_ep, nobody) = (Endpoint::alloc(), Endpoint::alloc(), Endpoint::alloc());
    let (a, a_best) = start(&a_ep, |_| {}).await;
    let a_log = Log::record(a_best);
    a.announce(net(P1), None).await.unwrap();
    a.add_peer(peer(&a_ep, &b_ep)).await.unwrap();
    let started = Instant::now();
    let (b, mut b_best) = start(&b_ep, |c| {
        c.restarting = true;
        c.selection_deferral = Duration::from_secs(5);
    })
    .await;
    b.announce(net(P2), None).await.unwrap();
    // A peer that never comes up keeps B deferring until its timer.
    let mut ghost = peer(&b_ep, &nobody);
    ghost.passive = true;
    b.add_peer(ghost).await.unwrap();
    b.add_peer(peer(&b_ep, &a_ep)).await.unwrap();
    wait_for("B learns A's route", || async {
        learned(&b).await.len() == 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "too slow to test"
    );
    // Deferring: no best change for B's agent, nothing sent to A, not converged.
    assert!(b_best.try_recv().is_err());
    assert!(learned(&a).await.is_empty());
    assert_eq!(status(&b, &a_ep).await.updates_sent, 0);
    assert!(!*b.converged().borrow());
    let mut c = b.converged();
    c.wait_for(|c| *c).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4800) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let batch = b_best
        .try_recv()
        .expect("deferred batch queued before converged");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].prefix, net(P1));
    // Then B advertises (with End-of-RIB), and later changes flow as usual.
    wait_for("A learns B's route", || async {
        learned(&a).await == vec![(net(P2), false)]
    })
    .await;
    assert!(status(&a, &b_ep).await.end_of_rib.len() == 2);
    a.withdraw(net(P1)).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), b_best.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next[0].prefix, net(P1));
    assert!(next[0].best.is_none());
    assert!(a_log.withdrawals().is_empty());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A hand-driven BGP peer (podroute's codec, but every message chosen by the test): it can
/// restart while its old connection stays open, or go silent.
struct Scripted {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

const CTX: podroute_bgp::wire::CodecContext = podroute_bgp::wire::CodecContext {
    four_octet_as: true,
};

impl Scripted {
    /// Connect from `from` to the speaker at `to` and bring the session up with an OPEN
    /// carrying `gr` (IPv4 unicast only).
    async fn establish(
        from: &Endpoint,
        to: &Endpoint,
        hold: u16,
        gr: podroute_bgp::wire::GracefulRestartCap,
    ) -> Scripted {
        use podroute_bgp::wire::{Capability, Family, Message, Open};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(IpAddr::V4(from.addr), 0))
            .unwrap();
        let stream = sock
            .connect(SocketAddr::new(IpAddr::V4(to.addr), to.port))
            .await
            .unwrap();
        let mut s = Scripted {
            stream,
            buf: bytes::BytesMut::new(),
        };
        let caps = vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::GracefulRestart(gr),
        ];
        s.send(Message::Open(Open::new(
            64512,
            hold,
            from.router_id(),
            caps,
        )))
        .await;
        assert!(matches!(s.recv().await, Message::Open(_)));
        s.send(Message::Keepalive).await;
        assert!(matches!(s.recv().await, Message::Keepalive));
        s
    }

    async fn send(&mut self, m: podroute_bgp::wire::Message) {
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        podroute_bgp::wire::encode_message(&m, CTX, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> podroute_bgp::wire::Message {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(m) = podroute_bgp::wire::decode_message(&mut self.buf, CTX).unwrap() {
                return m;
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("the speaker answers")
                    .unwrap();
            assert!(n > 0, "connection closed");
        }
    }

    async fn announce(&mut self, prefixes: &[&str], nh: std::net::Ipv4Addr) {
        use podroute_bgp::wire::{AsPath, Message, Origin, PathAttrs, Update};
        let u = Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                next_hop: Some(nh),
                local_pref: Some(100),
                ..Default::default()
            },
            nlri: prefixes.iter().map(|p| net(p)).collect(),
            ..Default::default()
        };
        self.send(Message::Update(u)).await;
    }

    async fn end_of_rib(&mut self) {
        use podroute_bgp::wire::{Family, Message, Update};
        self.send(Message::Update(Update::end_of_rib(Family::IPV4_UNICAST)))
            .await;
    }
}

fn gr_cap(restart_state: bool, forwarding: bool) -> podroute_bgp::wire::GracefulRestartCap {
    podroute_bgp::wire::GracefulRestartCap {
        restart_state,
        notification: false,
        restart_time: 90,
        families: vec![podroute_bgp::wire::GrFamily {
            family: podroute_bgp::wire::Family::IPV4_UNICAST,
            forwarding_state: forwarding,
        }],
    }
}

/// A with a passive peer X that the test drives by hand.
async fn with_scripted_peer() -> (Endpoint, Speaker, Log, Endpoint) {
    let (a_ep, x_ep) = (Endpoint::alloc(), Endpoint::alloc());
    let (a, a_best) = start(&a_ep, |_| {}).await;
    let log = Log::record(a_best);
    let mut px = peer(&a_ep, &x_ep);
    px.passive = true;
    a.add_peer(px).await.unwrap();
    (a_ep, a, log, x_ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_restarting_before_its_old_session_dies_is_helped() {
    let (a_ep, a, log, x_ep) = with_scripted_peer().await;
    let mut old = Scripted::establish(&x_ep, &a_ep, 30, gr_cap(false, false)).await;
    old.announce(&[P1, P2], x_ep.nh_v4).await;
    old.end_of_rib().await;
    wait_for("A learns X's routes", || async {
        learned(&a).await.len() == 2
    })
    .await;
    // X restarts; A has not noticed (the old connection is still open and the hold timer is
    // far): the new OPEN with R = 1 replaces the old session (RFC 4724 §4.2).
    let mut new = Scripted::establish(&x_ep, &a_ep, 30, gr_cap(true, true)).await;
    wait_for("A keeps X's routes stale", || async {
        let st = status(&a, &x_ep).await;
        st.state == State::Established
            && st.established_count == 2
            && st
                .graceful_restart
                .is_some_and(|g| g.phase == GrPhase::Recovering && g.stale_prefixes == 2)
    })
    .await;
    assert_eq!(learned(&a).await, vec![(net(P1), true), (net(P2), true)]);
    new.announce(&[P1], x_ep.nh_v4).await;
    new.end_of_rib().await;
    wait_for("A sweeps P2", || async {
        learned(&a).await == vec![(net(P1), false)]
    })
    .await;
    log.expect_withdrawals(vec![net(P2)]).await;
    drop(old);
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timer_expiry_ends_graceful_restart() {
    let (a_ep, a, log, x_ep) = with_scripted_peer().await;
    // Hold time 3 s, then silence: A sends Hold Timer Expired. That is a NOTIFICATION, so
    // without RFC 8538 (not implemented) the routes go at once.
    let mut x = Scripted::establish(&x_ep, &a_ep, 3, gr_cap(false, true)).await;
    x.announce(&[P1, P2], x_ep.nh_v4).await;
    wait_for("A learns X's routes", || async {
        learned(&a).await.len() == 2
    })
    .await;
    let quiet = Instant::now();
    wait_for("A drops X's routes", || async {
        learned(&a).await.is_empty()
    })
    .await;
    assert!(
        quiet.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        quiet.elapsed()
    );
    log.expect_withdrawals(vec![net(P1), net(P2)]).await;
    let st = status(&a, &x_ep).await;
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("hold timer expired")),
        "{st:?}"
    );
    let gr = st.graceful_restart.unwrap();
    assert_eq!((gr.phase, gr.stale_prefixes), (GrPhase::Normal, 0));
    drop(x);
    a.shutdown().await.unwrap();
}

/// What a scripted peer receives until the speaker's IPv4 End-of-RIB: the prefixes announced
/// before it (KEEPALIVEs skipped). Fails on anything else.
async fn announced_before_end_of_rib(x: &mut Scripted) -> Vec<IpNet> {
    use podroute_bgp::wire::{Family, Message};
    let mut seen = Vec::new();
    loop {
        match x.recv().await {
            Message::Keepalive => {}
            Message::Update(u) if u.end_of_rib_family() == Some(Family::IPV4_UNICAST) => {
                return seen;
            }
            Message::Update(u) => seen.extend(u.nlri),
            m => panic!("unexpected message before End-of-RIB: {m:?}"),
        }
    }
}

/// The restart race of issue 14: a restarting speaker whose agent configures its second peer
/// and announces its own block only after the first peer's End-of-RIB (a slow start under
/// CPU load) must not end its deferral on that first End-of-RIB. With the initial
/// configuration barrier it waits until the barrier is passed and every peer configured by
/// then has sent End-of-RIB; then each peer gets our own prefix before our End-of-RIB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_speaker_waits_for_its_initial_configuration_before_end_of_rib() {
    for round in 0..3 {
        let (s_ep, a_ep, b_ep) = (Endpoint::alloc(), Endpoint::alloc(), Endpoint::alloc());
        let (s, mut s_best) = start(&s_ep, |c| {
            c.restarting = true;
            c.initial_config_barrier = true;
            // Far enough that only End-of-RIBs can end the deferral in this test.
            c.selection_deferral = Duration::from_secs(60);
        })
        .await;
        let passive = |to: &Endpoint| {
            let mut p = peer(&s_ep, to);
            p.passive = true;
            p.families = vec![podroute_bgp::wire::Family::IPV4_UNICAST];
            p
        };
        s.add_peer(passive(&a_ep)).await.unwrap();
        let mut a = Scripted::establish(&a_ep, &s_ep, 30, gr_cap(false, true)).await;
        a.announce(&[P1], a_ep.nh_v4).await;
        a.end_of_rib().await;
        wait_for("S has A's End-of-RIB", || async {
            !status(&s, &a_ep).await.end_of_rib.is_empty()
        })
        .await;
        // Every configured peer has sent End-of-RIB, but the configuration is not complete.
        assert!(
            !*s.converged().borrow(),
            "round {round}: deferral ended early"
        );
        assert!(s_best.try_recv().is_err());

        // The late part of the start: the second peer, our block, the barrier.
        s.add_peer(passive(&b_ep)).await.unwrap();
        s.announce(net(P3), None).await.unwrap();
        s.initial_config_done().await.unwrap();
        // B is configured but not up yet: still deferring.
        assert!(status(&s, &a_ep).await.updates_sent == 0);
        assert!(!*s.converged().borrow(), "round {round}: B not waited for");

        let mut b = Scripted::establish(&b_ep, &s_ep, 30, gr_cap(false, true)).await;
        b.end_of_rib().await;
        let mut c = s.converged();
        tokio::time::timeout(Duration::from_secs(10), c.wait_for(|c| *c))
            .await
            .expect("deferral ends on B's End-of-RIB")
            .unwrap();
        // Our block, then End-of-RIB, to both peers (A's route is not sent to B: iBGP routes
        // are not passed between peers that are not route-reflector clients).
        assert_eq!(
            announced_before_end_of_rib(&mut a).await,
            vec![net(P3)],
            "round {round}: A"
        );
        assert_eq!(
            announced_before_end_of_rib(&mut b).await,
            vec![net(P3)],
            "round {round}: B"
        );
        let batch = s_best.try_recv().expect("deferred batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].prefix, net(P1));
        s.shutdown().await.unwrap();
    }
}
