//! Outbound connections to many unreachable peers (issue 14, "mesh at scale"), on loopback:
//! one speaker with 200 peers at 127.x.y.z ports where nothing listens (refused at once) and
//! 12 more whose listener never accepts and whose accept queue is full (the SYN goes
//! unanswered, so the attempt runs into the connect timeout).
//!
//! Checked through the speaker's own counters, never against wall-clock speed:
//! - every peer's attempts over the window stay within what the ConnectRetry backoff allows
//!   for the time that passed (a constant 100 ms retry would make several times as many);
//! - attempts in flight never exceed `max_connects_in_flight`, and the unanswered peers do
//!   fill it (so the bound is exercised);
//! - failures are visible: failures in a row, next retry, last error, the summary;
//! - a peer that starts listening later is connected, its failure count reset at Established,
//!   and after it goes away again the backoff starts over from the shortest delay.

mod support;

use podroute_bgp::fsm::{REFUSED_QUICK_RETRIES, State};
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::{Endpoint, peer_status as status, wait_async as wait_for};
use tokio::time::Instant;

const RETRY: Duration = Duration::from_millis(100);
/// The quicker retry after a refusal (the first `REFUSED_QUICK_RETRIES` in a row).
const REFUSED_RETRY: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(800);
const TIMEOUT: Duration = Duration::from_secs(1);
const IN_FLIGHT: usize = 8;
const REFUSING: usize = 200;
const SILENT: usize = 12;

fn speaker_config(ep: &Endpoint) -> SpeakerConfig {
    let mut cfg = SpeakerConfig::new(64512, ep.router_id());
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
    cfg.hold_time = 30;
    cfg.connect_retry = RETRY;
    cfg.refused_retry = REFUSED_RETRY;
    cfg.connect_retry_max = RETRY_MAX;
    cfg.connect_timeout = TIMEOUT;
    cfg.max_connects_in_flight = IN_FLIGHT;
    cfg.jitter_seed = Some(14);
    cfg
}

fn peer(from: &Endpoint, to: &Endpoint) -> PeerConfig {
    let mut p = PeerConfig::new(IpAddr::V4(to.addr), 64512);
    p.port = to.port;
    p.local_addr = Some(IpAddr::V4(from.addr));
    p.kind = "mesh".into();
    p
}

/// The most attempts a refusing peer can have made `elapsed` after it was added: the first
/// at once, each further one after a backoff of at least 75 % of its nominal delay (the
/// jitter cuts at most 25 %). Waiting for a turn and the attempts themselves only add time.
/// The first `REFUSED_QUICK_RETRIES` refusals wait `REFUSED_RETRY` doubled (at most `RETRY`),
/// then the backoff goes on from `RETRY`: a few attempts more than the backoff alone, no more.
fn most_attempts(elapsed: Duration) -> u64 {
    let quick = REFUSED_QUICK_RETRIES as u64;
    let (mut n, mut t) = (1u64, Duration::ZERO);
    loop {
        let nominal = if n <= quick {
            (REFUSED_RETRY * 2u32.pow(n as u32 - 1)).min(RETRY)
        } else {
            // The nominal delay after n failures, quick ones not counted: RETRY doubled, capped.
            (RETRY * 2u32.pow(((n - quick) as u32 - 1).min(16))).min(RETRY_MAX)
        };
        t += nominal * 3 / 4;
        if t > elapsed {
            return n;
        }
        n += 1;
    }
}

/// A listener that never accepts, its accept queue filled: SYNs to it go unanswered.
async fn silent_listener(ep: &Endpoint) -> (tokio::net::TcpListener, tokio::net::TcpStream) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(ep.addr), ep.port))
        .unwrap();
    let listener = sock.listen(0).unwrap();
    let filler = tokio::net::TcpStream::connect((ep.addr, ep.port))
        .await
        .unwrap();
    // The precondition of the test: a further connection gets no answer.
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect((ep.addr, ep.port)),
    )
    .await;
    assert!(
        probe.is_err(),
        "the full listener answered a connection: {probe:?}"
    );
    (listener, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peers_back_off_share_a_bounded_number_of_attempts_and_recover() {
    let s_ep = Endpoint::alloc();
    let s = Speaker::start(speaker_config(&s_ep)).await.unwrap().0;

    // Phase 1, the backoff: peers that refuse at once (ports where nothing listens:
    // Endpoint::alloc found them free and closed them again). Refusals take no time, so the
    // bound on attempts in flight hardly delays them: the backoff is what paces them.
    let refusing: Vec<Endpoint> = (0..REFUSING).map(|_| Endpoint::alloc()).collect();
    let started = Instant::now();
    for ep in &refusing {
        s.add_peer(peer(&s_ep, ep)).await.unwrap();
    }
    // The peer that comes up later: wait until it has backed off a few times.
    let late = refusing[0];
    let late_addr = IpAddr::V4(late.addr);
    wait_for("the late peer to fail 5 times in a row", || async {
        status(&s, late_addr).await.connect_failures >= 5
    })
    .await;
    let window = Duration::from_secs(3);
    if let Some(rest) = window.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let peers = s.peers().await.unwrap();
    let elapsed = started.elapsed();
    let most = most_attempts(elapsed);
    // A constant retry of 100 ms (75 ms at the least with jitter) would allow this many.
    let constant = elapsed.as_millis() as u64 / 75;
    assert!(
        most * 2 < constant,
        "the window is too short to tell backoff ({most}) from a constant retry ({constant})"
    );
    assert_eq!(peers.len(), REFUSING);
    let mut total = 0;
    for p in &peers {
        assert!(
            p.connect_attempts <= most,
            "{}: {} attempts in {elapsed:?}, the backoff allows {most}",
            p.addr,
            p.connect_attempts
        );
        assert!(p.connect_attempts >= 2, "{}: never retried: {p:?}", p.addr);
        assert!(p.connect_failures >= 1, "{p:?}");
        assert_ne!(p.state, State::Established, "{}", p.addr);
        assert!(
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused")),
            "{p:?}"
        );
        total += p.connect_attempts;
    }
    let sum = s.summary().await.unwrap();
    assert!(sum.connect_attempts >= total, "{sum:?} vs {total}");
    assert_eq!(sum.peers_by_state.values().sum::<usize>(), REFUSING);
    assert!(!sum.peers_by_state.contains_key(&State::Established));
    assert!(sum.peers_backing_off > 0, "{sum:?}");

    // The late peer starts listening: a podroute speaker waiting for us.
    let before = status(&s, late_addr).await;
    let mut l_cfg = speaker_config(&late);
    l_cfg.jitter_seed = Some(15);
    let l = Speaker::start(l_cfg).await.unwrap().0;
    let mut back = peer(&late, &s_ep);
    back.passive = true;
    l.add_peer(back).await.unwrap();
    wait_for("the late peer to be Established", || async {
        status(&s, late_addr).await.state == State::Established
    })
    .await;
    let up = status(&s, late_addr).await;
    assert_eq!(up.connect_failures, 0, "reset at Established: {up:?}");
    assert_eq!(up.next_retry, None);
    assert!(up.connect_attempts > before.connect_attempts);

    // It goes away again: the backoff starts over from the shortest delay, not where it
    // was before the session (5 failures and more).
    l.shutdown().await.unwrap();
    wait_for("a new connection failure of the late peer", || async {
        let p = status(&s, late_addr).await;
        p.established_count == 1 && p.connect_failures >= 1
    })
    .await;
    let again = status(&s, late_addr).await;
    assert!(
        again.connect_failures <= 2,
        "backoff not reset at Established: {again:?}"
    );

    // Phase 2, the bound on attempts in flight: peers whose SYN goes unanswered hold their
    // turn for the whole connect timeout; more of them than turns fill every turn.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        let ep = Endpoint::alloc();
        silent.push((ep, silent_listener(&ep).await));
    }
    for (ep, _) in &silent {
        s.add_peer(peer(&s_ep, ep)).await.unwrap();
    }
    // Sample while the silent peers hold their turns: never above the bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sum = s.summary().await.unwrap();
        assert!(sum.connects_in_flight <= IN_FLIGHT, "{sum:?}");
        if sum.connects_in_flight_peak == IN_FLIGHT && sum.connects_waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the turns never filled: {sum:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (ep, _) in &silent {
        wait_for("a silent peer's attempt to time out", || async {
            let p = status(&s, IpAddr::V4(ep.addr)).await;
            p.connect_failures >= 1
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("no answer"))
        })
        .await;
    }
    let sum = s.summary().await.unwrap();
    assert_eq!(sum.max_connects_in_flight, IN_FLIGHT);
    // Reached, and never passed over the whole run.
    assert_eq!(sum.connects_in_flight_peak, IN_FLIGHT, "{sum:?}");
    assert_eq!(
        sum.peers_by_state.values().sum::<usize>(),
        REFUSING + SILENT
    );
    s.shutdown().await.unwrap();
    drop(silent);
}

/// Dead peers backing off cannot keep a live one waiting: with every turn wanted by silent
/// peers retrying, a newly configured peer's first attempt starts after at most the retries
/// that already hold their half of the turns — not behind the whole queue of retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_is_not_queued_behind_dead_peers_retrying() {
    const MANY: usize = 24;
    let s_ep = Endpoint::alloc();
    let (s, _best) = Speaker::start(speaker_config(&s_ep)).await.unwrap();
    let mut silent = Vec::new();
    for _ in 0..MANY {
        let ep = Endpoint::alloc();
        silent.push((ep, silent_listener(&ep).await));
    }
    for (ep, _) in &silent {
        s.add_peer(peer(&s_ep, ep)).await.unwrap();
    }
    // Every silent peer has failed once (its next attempts are retries), and attempts are
    // queued for turns.
    wait_for(
        "every silent peer retrying with attempts queued",
        || async {
            let peers = s.peers().await.unwrap();
            let sum = s.summary().await.unwrap();
            peers.iter().all(|p| p.connect_failures >= 1) && sum.connects_waiting >= IN_FLIGHT
        },
    )
    .await;
    // A live peer: another speaker waiting for us.
    let l_ep = Endpoint::alloc();
    let (live, _lbest) = Speaker::start(speaker_config(&l_ep)).await.unwrap();
    let mut back = peer(&l_ep, &s_ep);
    back.passive = true;
    live.add_peer(back).await.unwrap();
    let before = s.summary().await.unwrap().connect_attempts;
    s.add_peer(peer(&s_ep, &l_ep)).await.unwrap();
    // Sampled until our first attempt shows: how many attempts started since we were added.
    let mut started_before_ours = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = status(&s, IpAddr::V4(l_ep.addr)).await;
        if p.connect_attempts >= 1 {
            break;
        }
        started_before_ours = s.summary().await.unwrap().connect_attempts - before;
        assert!(Instant::now() < deadline, "the live peer never got a turn");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        started_before_ours <= (IN_FLIGHT / 2) as u64,
        "{started_before_ours} retries of dead peers started before the new peer's first attempt"
    );
    wait_for("the live peer Established", || async {
        status(&s, IpAddr::V4(l_ep.addr)).await.state == State::Established
    })
    .await;
    for p in s.peers().await.unwrap() {
        assert!(p.connect_attempts >= 1);
    }
    let sum = s.summary().await.unwrap();
    assert!(sum.connects_in_flight_peak <= IN_FLIGHT, "{sum:?}");
    s.shutdown().await.unwrap();
    live.shutdown().await.unwrap();
    drop(silent);
}

/// Peers with nothing to do hold no session task (issue 14, memory at scale): passive peers
/// that never connect, and refusing peers while they back off, are records in the speaker's
/// core. A task exists for an attempt with its turn, and for a peer that connects to us, and
/// the backoff goes on across tasks. With a task per configured peer (as before),
/// `session_tasks` would be 80 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_work_hold_no_session_task() {
    let s_ep = Endpoint::alloc();
    let mut cfg = speaker_config(&s_ep);
    // Long enough that every refusing peer is backing off when we look (refusals too: no
    // quicker retry here).
    cfg.connect_retry = Duration::from_secs(20);
    cfg.refused_retry = Duration::from_secs(20);
    cfg.connect_retry_max = Duration::from_secs(20);
    let s = Speaker::start(cfg).await.unwrap().0;
    let passive: Vec<Endpoint> = (0..40).map(|_| Endpoint::alloc()).collect();
    let refusing: Vec<Endpoint> = (0..40).map(|_| Endpoint::alloc()).collect();
    for ep in &passive {
        let mut p = peer(&s_ep, ep);
        p.passive = true;
        s.add_peer(p).await.unwrap();
    }
    let sum = s.summary().await.unwrap();
    assert_eq!(
        sum.session_tasks, 0,
        "passive peers never connected to: {sum:?}"
    );
    assert_eq!(sum.peers_by_state.get(&State::Active), Some(&40), "{sum:?}");
    for ep in &refusing {
        s.add_peer(peer(&s_ep, ep)).await.unwrap();
    }
    wait_for("every refusing peer to fail once", || async {
        let peers = s.peers().await.unwrap();
        peers
            .iter()
            .filter(|p| p.connect_failures >= 1 && p.next_retry.is_some())
            .count()
            == refusing.len()
    })
    .await;
    wait_for("no session task while backing off", || async {
        s.summary().await.unwrap().session_tasks == 0
    })
    .await;
    let sum = s.summary().await.unwrap();
    assert_eq!(sum.peers_by_state.values().sum::<usize>(), 80, "{sum:?}");
    assert!(sum.peers_backing_off >= refusing.len(), "{sum:?}");

    // A passive peer connects to us: it gets a task and a session.
    let first = passive[0];
    let mut l_cfg = speaker_config(&first);
    l_cfg.jitter_seed = Some(16);
    let l = Speaker::start(l_cfg).await.unwrap().0;
    l.add_peer(peer(&first, &s_ep)).await.unwrap();
    let first_addr = IpAddr::V4(first.addr);
    wait_for("the passive peer to be Established", || async {
        status(&s, first_addr).await.state == State::Established
    })
    .await;
    let sum = s.summary().await.unwrap();
    assert_eq!(sum.session_tasks, 1, "{sum:?}");
    // The refusing peers' next attempts continue their backoff: still one failure each, and
    // none was tried again early.
    for ep in &refusing {
        let p = status(&s, IpAddr::V4(ep.addr)).await;
        assert_eq!((p.connect_attempts, p.connect_failures), (1, 1), "{p:?}");
    }
    l.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
}

/// A refused attempt (nothing listens: the peer is restarting) is retried sooner than the
/// normal ConnectRetry; an attempt that times out (the host does not answer) is not. With
/// the production delays (connect retry 5 s, refused retry 1 s) and a 1 s connect timeout,
/// the refused peer's next attempt is due within 1 s of its failure and comes well before
/// the silent peer's second attempt (at least 1 s timeout + 3.75 s); the bounds checked are
/// the scheduled delays, and the order of the retries, not wall-clock speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_attempt_is_retried_sooner_than_a_timed_out_one() {
    let s_ep = Endpoint::alloc();
    let mut cfg = speaker_config(&s_ep);
    cfg.connect_retry = Duration::from_secs(5);
    cfg.refused_retry = Duration::from_secs(1);
    cfg.connect_retry_max = Duration::from_secs(120);
    cfg.connect_timeout = Duration::from_secs(1);
    let s = Speaker::start(cfg).await.unwrap().0;
    let refusing = Endpoint::alloc();
    let silent_ep = Endpoint::alloc();
    let _silent = silent_listener(&silent_ep).await;
    let (r_addr, q_addr) = (IpAddr::V4(refusing.addr), IpAddr::V4(silent_ep.addr));
    s.add_peer(peer(&s_ep, &refusing)).await.unwrap();
    s.add_peer(peer(&s_ep, &silent_ep)).await.unwrap();

    // Right after each one's first failure: when is the next attempt due?
    let remaining = |p: &PeerStatus| {
        p.next_retry.map(|t| {
            t.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
        })
    };
    wait_for("the refused attempt", || async {
        status(&s, r_addr).await.connect_failures >= 1
    })
    .await;
    let r = status(&s, r_addr).await;
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "{r:?}"
    );
    if r.connect_failures == 1 {
        let due = remaining(&r).expect("a retry is scheduled");
        // At most 1 s (the quick retry), against 3.75-5 s for the normal backoff.
        assert!(
            due <= Duration::from_secs(1),
            "refused peer retried in {due:?}"
        );
    }
    wait_for("the silent peer's attempt to time out", || async {
        status(&s, q_addr).await.connect_failures >= 1
    })
    .await;
    let q = status(&s, q_addr).await;
    assert!(
        q.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no answer")),
        "{q:?}"
    );
    let due = remaining(&q).expect("a retry is scheduled");
    // The normal backoff: 3.75-5 s after the failure (generous margin for a slow look).
    assert!(
        due > Duration::from_secs(2),
        "silent peer retried in {due:?}"
    );

    // The refused peer is tried again (a second refusal) before the silent peer's retry.
    wait_for("the refused peer's second attempt", || async {
        status(&s, r_addr).await.connect_attempts >= 2
    })
    .await;
    let q = status(&s, q_addr).await;
    assert_eq!(q.connect_attempts, 1, "{q:?}");
    s.shutdown().await.unwrap();
}
