//! One tokio task per peer: it owns the TCP connection(s), runs the sans-IO [`Fsm`], frames
//! and decodes messages, and carries out the FSM's actions (connect, send, timers).
//!
//! A second, inbound connection while the main one has sent its OPEN gets an FSM of its own
//! from [`Fsm::accept`]. What becomes of the two (connection collision, RFC 4271 §6.8 and
//! RFC 6286 §2.3; a restarted peer's new session replacing the old one, RFC 4724 §4.2) is
//! decided sans-IO by [`collision::resolve`] after every event; this driver only carries the
//! [`Resolution`] out: Cease / Connection Collision Resolution through
//! [`Event::CollisionLost`], promotion of the extra connection, and a graceful `Down` for a
//! replaced session. The KEEPALIVE answering an OPEN that decides the collision against its
//! own connection is not sent ([`collision::withhold_from_loser`]).
//!
//! Outbound connection attempts take a turn from the speaker-wide [`ConnectLimiter`] (peers
//! wait by [`ConnectPriority`] while it is full) and are cut after the connect timeout; the FSM
//! backs off between failed attempts. A peer's connection trouble is logged when it starts,
//! when the backoff reaches its cap, when the error changes and when it ends, never once per
//! attempt.
//!
//! A session with nothing to do but wait out its ConnectRetry backoff (no connection, no
//! attempt, no second connection) *parks*: the task ends and hands the speaker core a
//! [`Parked`] record (failures in a row, when to retry, what was logged, and its command
//! receiver with anything queued meanwhile). The core keeps that compact record, queues the
//! peer for a connect turn when the backoff is over, and starts a new task with the turn in
//! hand ([`run`]'s `first_turn`) or when the peer connects to us. A mesh of thousands of
//! unreachable nodes thus holds a task only per attempt in flight.

use crate::collision::{self, Resolution};
use crate::connect::{ConnectLimiter, ConnectPriority, ConnectTurn};
use crate::fsm::{Action, DownReason, Event, Fsm, FsmConfig, Negotiated, OpenError, State, Timer};
use crate::rib::PeerId;
use crate::sockopt;
use crate::validate::{PeerContext, validate_update};
use crate::wire::{self, CodecContext, Family, GracefulRestartCap, Message, Notification, Update};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Commands from the speaker core to a session task.
#[derive(Debug)]
pub(crate) enum SessionCmd {
    /// An inbound TCP connection from this peer's address.
    Inbound(TcpStream),
    /// Encoded UPDATE messages for the session's n-th time in Established (counted from 1),
    /// in pieces (slices of buffers shared with other sessions); bytes meant for an earlier
    /// session are dropped.
    Send(u64, Vec<Bytes>),
    /// Administrative stop: Cease, then the task ends.
    Stop(Notification),
    /// Close every connection without a NOTIFICATION, as a crash would, and end: the peer
    /// sees the TCP session end, which is what lets it keep our routes (RFC 4724 §4.2).
    Abort,
    /// The graceful restart capability to announce in OPENs from now on.
    SetGracefulRestart(Option<GracefulRestartCap>),
    /// Where the next attempts queue for a turn.
    SetPriority(ConnectPriority),
}

/// Events from a session task to the speaker core.
// UPDATEs are moved once from the decoder to their consumer; boxing them would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum SessionEvent {
    StateChanged(State),
    Established {
        negotiated: Box<Negotiated>,
        local_addr: IpAddr,
    },
    Update(Update),
    EndOfRib(Family),
    RouteRefresh(Family),
    /// The Established session, or the attempt to get there, ended. `graceful`: without a
    /// NOTIFICATION sent or received (TCP closed or failed, or replaced by a new session the
    /// peer opened after a restart), so the peer's routes may be kept (RFC 4724 §4.2).
    Down {
        reason: String,
        graceful: bool,
    },
    NotificationSent(Notification),
    NotificationReceived(Notification),
    /// An outbound connection attempt ended: connected (`None`) or failed (refused, timed
    /// out, unreachable...).
    ConnectAttempt(Option<String>),
    /// The next outbound attempt waits `delay` (ConnectRetry backoff) after `failures`
    /// failures in a row.
    RetryScheduled {
        failures: u32,
        delay: Duration,
    },
    /// The task ended to wait out its backoff without a task (see the module docs).
    Parked(Box<Parked>),
}

/// What a parked session leaves to the speaker core.
#[derive(Debug)]
pub(crate) struct Parked {
    pub resume: Resume,
    /// When the ConnectRetry timer expires.
    pub retry_at: Instant,
    /// The task's command receiver: commands sent after it stopped reading are still there.
    pub cmds: mpsc::UnboundedReceiver<SessionCmd>,
}

/// What a new session task continues from.
#[derive(Clone, Debug, Default)]
pub(crate) struct Resume {
    /// Connection failures in a row (the backoff goes on from there).
    pub failures: u32,
    /// How many of them were refusals retried sooner (see [`crate::fsm`]).
    pub quick_retries: u32,
    /// How many times the peer's sessions reached Established (UPDATEs queued by the core
    /// name the session they are for by this count).
    pub established: u64,
    trouble: ConnectTrouble,
}

/// What the session task needs to know.
#[derive(Clone, Debug)]
pub(crate) struct SessionParams {
    pub id: PeerId,
    pub remote: SocketAddr,
    pub local_addr: Option<IpAddr>,
    pub fsm: FsmConfig,
    /// How long one outbound connection attempt may take once it has its turn.
    pub connect_timeout: Duration,
    pub limiter: Arc<ConnectLimiter>,
    /// Where the peer's attempts queue for a turn.
    pub priority: ConnectPriority,
    /// What the peer's previous session task left (see [`Parked`]).
    pub resume: Resume,
    /// TCP-MD5 key (RFC 2385) of the session's connections.
    pub md5_key: Option<Arc<[u8]>>,
    /// GTSM (RFC 5082): the peer is at most this many hops away.
    pub ttl_security: Option<u8>,
}

/// Socket options of a session's connection, set before connecting or on an accepted one.
#[derive(Clone)]
struct SocketSecurity {
    md5_key: Option<Arc<[u8]>>,
    ttl_security: Option<u8>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send + Sync>>;

struct Conn {
    reader: OwnedReadHalf,
    writer: OutQueue,
    rbuf: BytesMut,
    local_addr: IpAddr,
}

/// Bytes a connection may hold queued but not yet written to its socket. A peer that stops
/// reading (zero TCP window) while UPDATEs keep coming would otherwise grow the agent's
/// memory without bound; beyond this its connection is closed (as a TCP failure: the session
/// starts again, and the new session gets the full table once the peer reads again).
pub(crate) const MAX_UNSENT_BYTES: usize = 32 << 20;

/// A write to a peer's socket that makes no progress for this long ends the connection's
/// writer (and closes the socket), so a connection the session gave up on cannot keep its
/// queue forever.
const WRITE_STALL: Duration = Duration::from_secs(120);

/// The queue of a connection's writer task, bounded in bytes.
struct OutQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes queued and not written yet (the writer subtracts what it wrote).
    unsent: Arc<AtomicUsize>,
    limit: usize,
}

impl OutQueue {
    /// Queues `b`; `false` (and nothing queued) when that would exceed the limit.
    fn push(&self, b: Bytes) -> bool {
        let len = b.len();
        let before = self.unsent.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.limit {
            self.unsent.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        // A writer that ended (socket failed) is noticed by the reader.
        let _ = self.tx.send(b);
        true
    }
}

/// A connection's writer task and its queue.
fn spawn_writer(w: OwnedWriteHalf, limit: usize) -> OutQueue {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let unsent = Arc::new(AtomicUsize::new(0));
    tokio::spawn(write_queued(w, rx, unsent.clone()));
    OutQueue { tx, unsent, limit }
}

/// One FSM with its connection and timers.
struct Slot {
    fsm: Fsm,
    conn: Option<Conn>,
    timers: [Option<Instant>; 4],
    codec: CodecContext,
    /// Set when Established: what peer-dependent UPDATE checks (RFC 7606) need.
    peer_ctx: Option<PeerContext>,
}

fn timer_index(t: Timer) -> usize {
    match t {
        Timer::ConnectRetry => 0,
        Timer::Hold => 1,
        Timer::Keepalive => 2,
        Timer::IdleHold => 3,
    }
}

const TIMERS: [Timer; 4] = [
    Timer::ConnectRetry,
    Timer::Hold,
    Timer::Keepalive,
    Timer::IdleHold,
];

impl Slot {
    fn new(fsm: Fsm) -> Slot {
        Slot {
            fsm,
            conn: None,
            timers: [None; 4],
            codec: CodecContext::default(),
            peer_ctx: None,
        }
    }

    /// Encode `msg` with the slot's codec and queue it on its connection, if it has one.
    fn send(&self, msg: &Message) {
        if let Some(c) = self.conn.as_ref() {
            let mut out = BytesMut::new();
            wire::encode_message(msg, self.codec, &mut out);
            // Over the limit, the next UPDATE closes the connection (see `MAX_UNSENT_BYTES`).
            let _ = c.writer.push(out.freeze());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }

    fn attach(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let local_addr = stream
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let (reader, write_half) = stream.into_split();
        self.conn = Some(Conn {
            reader,
            writer: spawn_writer(write_half, MAX_UNSENT_BYTES),
            rbuf: BytesMut::with_capacity(65536),
            local_addr,
        });
    }
}

/// Most buffers handed to one `writev`.
const MAX_WRITE_PIECES: usize = 64;

/// The writer task of a connection: writes what is queued, as many buffers as are waiting in
/// one `writev` (a route reflector queues one piece per UPDATE burst and peer), until the
/// connection is dropped; then shuts the write side down. `unsent` goes down by what is
/// written. A write that makes no progress for [`WRITE_STALL`] ends it.
async fn write_queued(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    unsent: Arc<AtomicUsize>,
) {
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    while let Some(b) = rx.recv().await {
        queue.push_back(b);
        while let Ok(b) = rx.try_recv() {
            queue.push_back(b);
        }
        while !queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = queue
                .iter()
                .take(MAX_WRITE_PIECES)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = match tokio::time::timeout(WRITE_STALL, w.write_vectored(&slices)).await {
                Ok(Ok(0) | Err(_)) => return,
                Err(_) => {
                    debug!("peer reads nothing for {WRITE_STALL:?}; closing the connection");
                    return;
                }
                Ok(Ok(n)) => n,
            };
            unsent.fetch_sub(n, Ordering::Relaxed);
            while n > 0 {
                let Some(front) = queue.front_mut() else {
                    break;
                };
                if front.len() <= n {
                    n -= front.len();
                    queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
            // More may have arrived while writing: take it into the next writev.
            while let Ok(b) = rx.try_recv() {
                queue.push_back(b);
            }
        }
    }
    let _ = w.shutdown().await;
}

/// Read into the slot's buffer; pends forever when there is no connection.
async fn read_some(slot: &mut Option<Slot>) -> std::io::Result<usize> {
    match slot.as_mut().and_then(|s| s.conn.as_mut()) {
        Some(c) => {
            if c.rbuf.capacity() - c.rbuf.len() < 8192 {
                c.rbuf.reserve(65536);
            }
            c.reader.read_buf(&mut c.rbuf).await
        }
        None => std::future::pending().await,
    }
}

/// Where an attempt gets its turn: granted already, or from the limiter.
struct TurnSource {
    granted: Option<ConnectTurn>,
    limiter: Arc<ConnectLimiter>,
    priority: ConnectPriority,
    retrying: bool,
}

/// One outbound attempt: wait for a turn, then connect within `timeout`.
async fn connect_to(
    turn: TurnSource,
    remote: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
    security: SocketSecurity,
) -> std::io::Result<TcpStream> {
    let _turn = match turn.granted {
        Some(t) => t,
        None => turn.limiter.turn(turn.priority, turn.retrying).await?,
    };
    let socket = match remote {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(key) = &security.md5_key {
        sockopt::set_md5_key(&socket, remote.ip(), Some(key))
            .map_err(|e| std::io::Error::new(e.kind(), format!("TCP-MD5 key: {e}")))?;
    }
    if let Some(hops) = security.ttl_security {
        sockopt::set_gtsm(&socket, remote.is_ipv6(), hops)
            .map_err(|e| std::io::Error::new(e.kind(), format!("GTSM: {e}")))?;
    }
    if let Some(l) = local {
        socket.bind(SocketAddr::new(l, 0))?;
    }
    tokio::time::timeout(timeout, socket.connect(remote))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })?
}

/// What the driver remembers to log connection trouble once per change, not per attempt.
#[derive(Clone, Debug, Default)]
struct ConnectTrouble {
    /// The last attempt's error, if it failed.
    error: Option<String>,
    /// The error last logged at WARN/INFO.
    logged: Option<String>,
    /// Failures in a row as of the last backoff.
    failures: u32,
    /// The cap of the backoff was logged for this streak.
    at_cap: bool,
}

struct Driver {
    p: SessionParams,
    events: mpsc::Sender<(PeerId, SessionEvent)>,
    main: Option<Slot>,
    extra: Option<Slot>,
    connecting: Option<ConnectFuture>,
    stopping: bool,
    /// How many times the main slot reached Established.
    established: u64,
    trouble: ConnectTrouble,
    /// RFC 7606 findings not logged yet, and when the last WARN about them was.
    findings: FindingLog,
    /// The turn the core got for the first attempt.
    first_turn: Option<ConnectTurn>,
}

/// Rate-limited WARN lines for malformed or refused UPDATE contents (RFC 7606): at most one
/// per [`FINDING_LOG_INTERVAL`], with the count since the last one, so that a peer sending
/// garbage cannot flood the log.
#[derive(Default)]
struct FindingLog {
    unlogged: u64,
    last: Option<Instant>,
}

/// How often at most one peer's RFC 7606 findings are logged.
const FINDING_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl FindingLog {
    fn record(&mut self, first: &wire::AttrError, found: usize, peer_check: bool) {
        self.unlogged += found as u64;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < FINDING_LOG_INTERVAL)
        {
            return;
        }
        warn!(
            error = %first,
            findings = self.unlogged,
            kind = if peer_check { "peer check" } else { "malformed attribute" },
            "UPDATE attributes discarded or routes treated as withdrawn (RFC 7606); \
             logged at most once a minute per peer"
        );
        self.unlogged = 0;
        self.last = Some(now);
    }
}

/// The session task. Ends after a Stop command, when the core goes away, or when it parks
/// (see the module docs). `first_turn`: a connect turn the core already got for it.
pub(crate) async fn run(
    p: SessionParams,
    cmds: mpsc::UnboundedReceiver<SessionCmd>,
    events: mpsc::Sender<(PeerId, SessionEvent)>,
    first_turn: Option<ConnectTurn>,
) {
    // `instrument`, not `span.enter()`: a guard held across `.await` leaks the span into
    // whatever else runs on the worker thread meanwhile (other peers, the datastore, ...).
    let span = tracing::info_span!("bgp_peer", peer = %p.remote);
    tracing::Instrument::instrument(drive(p, cmds, events, first_turn), span).await
}

async fn drive(
    mut p: SessionParams,
    mut cmds: mpsc::UnboundedReceiver<SessionCmd>,
    events: mpsc::Sender<(PeerId, SessionEvent)>,
    first_turn: Option<ConnectTurn>,
) {
    let resume = std::mem::take(&mut p.resume);
    let mut d = Driver {
        main: Some(Slot::new(Fsm::new(p.fsm.clone()))),
        p,
        events,
        extra: None,
        connecting: None,
        stopping: false,
        established: resume.established,
        trouble: resume.trouble,
        findings: FindingLog::default(),
        first_turn,
    };
    Box::pin(d.handle(true, Event::ManualStart)).await;
    if let Some(s) = d.main.as_mut() {
        s.fsm.resume_connect_failures(resume.failures);
        s.fsm.resume_quick_retries(resume.quick_retries);
    }
    // A turn the first event did not use (a passive peer) goes back at once.
    d.first_turn = None;
    // Every handler below runs boxed: the task of an idle session (most of a large mesh's,
    // waiting to connect or back off) then holds only the driver and the select's own
    // futures, not room for the largest handler's state (about 7 KB per peer before).
    loop {
        let deadline = [d.main.as_ref(), d.extra.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(Slot::next_deadline)
            .min();
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(SessionCmd::Inbound(stream)) => Box::pin(d.inbound(stream)).await,
                Some(SessionCmd::Send(generation, pieces)) => {
                    if generation != d.established { continue; }
                    let mut overflow = false;
                    if let Some(c) = d.main.as_ref().filter(|s| s.fsm.state() == State::Established).and_then(|s| s.conn.as_ref()) {
                        overflow = !pieces.into_iter().all(|b| c.writer.push(b));
                    }
                    if overflow {
                        Box::pin(d.unsent_overflow()).await;
                    }
                }
                Some(SessionCmd::Stop(n)) => {
                    Box::pin(d.stop(n)).await;
                    return;
                }
                Some(SessionCmd::Abort) => {
                    info!("session closed without NOTIFICATION");
                    d.main = None;
                    d.extra = None;
                    d.connecting = None;
                    Box::pin(d.emit(SessionEvent::StateChanged(State::Idle))).await;
                    return;
                }
                Some(SessionCmd::SetGracefulRestart(cap)) => {
                    d.p.fsm.graceful_restart = cap.clone();
                    for s in [d.main.as_mut(), d.extra.as_mut()].into_iter().flatten() {
                        s.fsm.set_graceful_restart(cap.clone());
                    }
                }
                Some(SessionCmd::SetPriority(p)) => d.p.priority = p,
                None => {
                    Box::pin(d.stop(Notification::cease(wire::cease::ADMIN_SHUTDOWN))).await;
                    return;
                }
            },
            res = async { match d.connecting.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                d.connecting = None;
                match res {
                    Ok(stream) => {
                        Box::pin(d.emit(SessionEvent::ConnectAttempt(None))).await;
                        if let Some(s) = d.main.as_mut()
                            && s.conn.is_none() {
                                s.attach(stream);
                                Box::pin(d.handle(true, Event::TcpConnected)).await;
                            }
                    }
                    Err(e) => {
                        debug!(error = %e, "connect failed");
                        // Refused: the host answered and nothing listens (yet): retried sooner.
                        let ev = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            Event::TcpRefused
                        } else {
                            Event::TcpFailed
                        };
                        let e = e.to_string();
                        d.trouble.error = Some(e.clone());
                        Box::pin(d.emit(SessionEvent::ConnectAttempt(Some(e)))).await;
                        Box::pin(d.handle(true, ev)).await;
                    }
                }
            },
            r = read_some(&mut d.main) => Box::pin(d.on_read(true, r)).await,
            r = read_some(&mut d.extra) => Box::pin(d.on_read(false, r)).await,
            _ = async { match deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                Box::pin(d.fire_timers()).await;
            }
        }
        if d.stopping {
            return;
        }
        if let Some(retry_at) = d.parkable() {
            let parked = Parked {
                resume: Resume {
                    failures: d.main.as_ref().map_or(0, |s| s.fsm.connect_failures()),
                    quick_retries: d.main.as_ref().map_or(0, |s| s.fsm.quick_retries()),
                    established: d.established,
                    trouble: std::mem::take(&mut d.trouble),
                },
                retry_at,
                cmds,
            };
            debug!("backing off without a task");
            Box::pin(d.emit(SessionEvent::Parked(Box::new(parked)))).await;
            return;
        }
    }
}

impl Driver {
    /// When the ConnectRetry timer expires, if waiting for it is all the session does: one
    /// connection slot, in Active, without a connection or an attempt, and no other timer.
    fn parkable(&self) -> Option<Instant> {
        if self.extra.is_some() || self.connecting.is_some() {
            return None;
        }
        let s = self.main.as_ref()?;
        if s.fsm.state() != State::Active || s.conn.is_some() {
            return None;
        }
        let others_idle = TIMERS
            .iter()
            .filter(|t| **t != Timer::ConnectRetry)
            .all(|t| s.timers[timer_index(*t)].is_none());
        others_idle
            .then_some(s.timers[timer_index(Timer::ConnectRetry)])
            .flatten()
    }

    fn slot(&mut self, main: bool) -> Option<&mut Slot> {
        if main {
            self.main.as_mut()
        } else {
            self.extra.as_mut()
        }
    }

    async fn emit(&self, ev: SessionEvent) {
        let _ = self.events.send((self.p.id, ev)).await;
    }

    async fn stop(&mut self, n: Notification) {
        for main in [true, false] {
            if let Some(s) = self.slot(main)
                && s.conn.is_some()
                && matches!(
                    s.fsm.state(),
                    State::OpenSent | State::OpenConfirm | State::Established
                )
            {
                s.send(&Message::Notification(n.clone()));
                self.emit(SessionEvent::NotificationSent(n.clone())).await;
            }
        }
        // Dropping the connections lets the writer tasks flush the NOTIFICATION and close.
        self.main = None;
        self.extra = None;
        self.emit(SessionEvent::StateChanged(State::Idle)).await;
        self.stopping = true;
    }

    async fn inbound(&mut self, stream: TcpStream) {
        if let Some(hops) = self.p.ttl_security {
            // The handshake got through the listener; from here on the kernel drops the
            // peer's segments that have travelled more than `hops` hops.
            if let Err(e) = sockopt::set_gtsm(&stream, self.p.remote.is_ipv6(), hops) {
                warn!(error = %e, "GTSM on an inbound connection failed; refusing it");
                return;
            }
        }
        if self
            .main
            .as_ref()
            .is_some_and(|s| s.fsm.state() == State::Idle)
        {
            // In idle hold-down after an error: the peer is trying again, so start now rather
            // than refuse it. Refusing lets two speakers in alternating hold-downs keep turning
            // each other away.
            self.handle(true, Event::ManualStart).await;
        }
        let state = self.main.as_ref().map(|s| s.fsm.state());
        match state {
            Some(State::Idle) | None => {
                debug!("inbound connection refused in Idle");
            }
            Some(State::Connect) | Some(State::Active) => {
                self.connecting = None;
                if let Some(s) = self.main.as_mut() {
                    s.conn = None;
                    s.attach(stream);
                }
                self.handle(true, Event::TcpAccepted).await;
            }
            Some(_) => {
                if self.extra.is_some() {
                    debug!("third connection refused");
                    return;
                }
                // The main FSM has a connection: the peer's gets an FSM of its own, and the
                // collision layer decides between the two.
                let (fsm, actions) = Fsm::accept(self.p.fsm.clone());
                let mut slot = Slot::new(fsm);
                slot.attach(stream);
                self.extra = Some(slot);
                for a in actions {
                    self.act(false, a).await;
                }
                let _ = self.resolve_collision().await;
            }
        }
    }

    /// The main connection has [`MAX_UNSENT_BYTES`] unwritten: the peer does not read.
    /// Closed as a TCP failure would close it.
    async fn unsent_overflow(&mut self) {
        warn!(
            peer = %self.p.remote,
            limit_mib = MAX_UNSENT_BYTES >> 20,
            "the peer does not read what is sent to it (zero TCP window?): more than the limit \
             is unsent; closing the connection"
        );
        if let Some(s) = self.main.as_mut() {
            s.conn = None;
        }
        self.handle(true, Event::TcpFailed).await;
    }

    async fn on_read(&mut self, main: bool, r: std::io::Result<usize>) {
        match r {
            Ok(0) | Err(_) => {
                if let Some(s) = self.slot(main) {
                    s.conn = None;
                }
                self.handle(main, Event::TcpFailed).await;
            }
            Ok(_) => loop {
                let Some(s) = self.slot(main) else { return };
                let Some(c) = s.conn.as_mut() else { return };
                match wire::decode_message(&mut c.rbuf, s.codec) {
                    Ok(None) => return,
                    Ok(Some(msg)) => {
                        if let Message::Notification(n) = &msg {
                            self.emit(SessionEvent::NotificationReceived(n.clone()))
                                .await;
                        }
                        self.handle(main, Event::Message(msg)).await;
                    }
                    Err(e) => {
                        warn!(error = %e.notification, "malformed message from peer");
                        self.handle(main, Event::DecodeError(e.notification)).await;
                        return;
                    }
                }
            },
        }
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        for main in [true, false] {
            for t in TIMERS {
                let due = self
                    .slot(main)
                    .is_some_and(|s| s.timers[timer_index(t)].is_some_and(|d| d <= now));
                if due {
                    if let Some(s) = self.slot(main) {
                        s.timers[timer_index(t)] = None;
                    }
                    let ev = match t {
                        Timer::ConnectRetry => Event::ConnectRetryTimerExpires,
                        Timer::Hold => Event::HoldTimerExpires,
                        Timer::Keepalive => Event::KeepaliveTimerExpires,
                        Timer::IdleHold => Event::IdleHoldTimerExpires,
                    };
                    self.handle(main, ev).await;
                }
            }
        }
    }

    /// Feed one event to a slot's FSM and carry out the actions.
    async fn handle(&mut self, main: bool, ev: Event) {
        let Some(s) = self.slot(main) else { return };
        let mut actions = s.fsm.handle(ev);
        // A connection this event loses the collision for gets its Cease below, and no
        // KEEPALIVE before it (see `collision::withhold_from_loser`).
        if let (Some(m), Some(x)) = (self.main.as_ref(), self.extra.as_ref()) {
            let conn = if main {
                collision::Conn::Main
            } else {
                collision::Conn::Extra
            };
            collision::withhold_from_loser(&m.fsm, &x.fsm, conn, &mut actions);
        }
        for a in actions {
            self.act(main, a).await;
        }
        let _ = self.resolve_collision().await;
    }

    async fn act(&mut self, main: bool, a: Action) {
        let remote = self.p.remote;
        let local = self.p.local_addr;
        match a {
            Action::Connect => {
                if main && self.connecting.is_none() {
                    let timeout = self.p.connect_timeout;
                    let security = SocketSecurity {
                        md5_key: self.p.md5_key.clone(),
                        ttl_security: self.p.ttl_security,
                    };
                    let turn = TurnSource {
                        granted: self.first_turn.take(),
                        limiter: self.p.limiter.clone(),
                        priority: self.p.priority,
                        retrying: self
                            .main
                            .as_ref()
                            .is_some_and(|s| s.fsm.connect_failures() > 0),
                    };
                    self.connecting =
                        Some(Box::pin(connect_to(turn, remote, local, timeout, security)));
                }
            }
            Action::CloseConnection => {
                if main {
                    self.connecting = None;
                }
                if let Some(s) = self.slot(main) {
                    s.conn = None;
                }
            }
            Action::Send(msg) => {
                let Some(s) = self.slot(main) else { return };
                if s.conn.is_none() {
                    return;
                }
                s.send(&msg);
                if let Message::Notification(n) = msg {
                    self.emit(SessionEvent::NotificationSent(n)).await;
                }
            }
            Action::StartTimer(t, d) => {
                if let Some(s) = self.slot(main) {
                    s.timers[timer_index(t)] = Some(Instant::now() + d);
                }
                if main && t == Timer::ConnectRetry {
                    self.retry_scheduled(d).await;
                }
            }
            Action::StopTimer(t) => {
                if let Some(s) = self.slot(main) {
                    s.timers[timer_index(t)] = None;
                }
            }
            Action::Established(neg) => {
                let (local_as, local_id) = (self.p.fsm.local_as, self.p.fsm.local_id);
                let Some(s) = self.slot(main) else { return };
                s.codec = neg.codec;
                let local_addr = s
                    .conn
                    .as_ref()
                    .map(|c| c.local_addr)
                    .unwrap_or(IpAddr::from([0, 0, 0, 0]));
                let mut ctx = PeerContext::new(neg.ebgp, neg.peer_as, local_as, local_id);
                ctx.local_addrs = vec![local_addr];
                s.peer_ctx = Some(ctx);
                if !main {
                    // The extra connection came up: the collision layer says whether it
                    // replaces the main session (a restarted peer) or takes over from a main
                    // FSM without a connection; an Established session is reported only once
                    // it is the main one.
                    let r = Box::pin(self.resolve_collision()).await;
                    if !matches!(
                        r,
                        Resolution::Replace | Resolution::TakeOver | Resolution::CloseMain
                    ) {
                        return;
                    }
                }
                self.established += 1;
                let failures = std::mem::take(&mut self.trouble).failures;
                info!(
                    peer_as = neg.peer_as,
                    hold = neg.hold_time,
                    connect_failures = failures,
                    "session established"
                );
                self.emit(SessionEvent::Established {
                    negotiated: Box::new(neg),
                    local_addr,
                })
                .await;
            }
            Action::Deliver(mut u) => {
                if let Some(f) = u.end_of_rib_family() {
                    self.emit(SessionEvent::EndOfRib(f)).await;
                    return;
                }
                // Malformed attributes found by the decoder are worth a warning; what the
                // peer-dependent checks find (loops, our own next hop) is routine.
                let decoded = u.errors.len();
                if let Some(ctx) = self.slot(main).and_then(|s| s.peer_ctx.as_ref()) {
                    validate_update(&mut u, ctx);
                }
                if let Some(first) = u.errors.first() {
                    for e in &u.errors {
                        debug!(error = %e, "UPDATE finding (RFC 7606)");
                    }
                    self.findings.record(first, u.errors.len(), decoded == 0);
                }
                self.emit(SessionEvent::Update(u)).await;
            }
            Action::RouteRefreshRequested(f) => self.emit(SessionEvent::RouteRefresh(f)).await,
            Action::Down(reason) => {
                let text = reason.to_string();
                if main {
                    info!(reason = %text, "session down");
                    let graceful = matches!(reason, DownReason::TcpFailed);
                    self.emit(SessionEvent::Down {
                        reason: text,
                        graceful,
                    })
                    .await;
                } else {
                    debug!(reason = %text, "second connection closed");
                    self.extra = None;
                }
            }
            Action::StateChanged(_, to) => {
                if main {
                    self.emit(SessionEvent::StateChanged(to)).await;
                }
            }
        }
    }

    /// The FSM backs off before its next attempt: tell the core, and log when the trouble
    /// starts, changes or reaches the cap of the backoff (not on every attempt).
    async fn retry_scheduled(&mut self, delay: Duration) {
        let Some(s) = self.main.as_ref() else { return };
        let failures = s.fsm.connect_failures();
        let cfg = s.fsm.config();
        let capped = crate::fsm::connect_backoff(
            cfg.connect_retry,
            cfg.connect_retry_max,
            failures - s.fsm.quick_retries(),
        ) >= cfg.connect_retry_max;
        let max = cfg.connect_retry_max;
        let t = &mut self.trouble;
        // A connection closed before the peer's OPEN leaves no connect error.
        let error = t
            .error
            .take()
            .unwrap_or_else(|| "connection closed before the peer's OPEN".to_string());
        if failures <= 1 || t.logged.as_deref() != Some(error.as_str()) {
            warn!(
                error = %error,
                failures,
                retry_in = ?delay,
                "cannot connect to peer; retrying with backoff"
            );
            t.logged = Some(error);
        } else if capped && !t.at_cap {
            info!(
                error = %error,
                failures,
                retry_every = ?max,
                "peer still unreachable; retrying at the longest backoff"
            );
        } else {
            debug!(error = %error, failures, retry_in = ?delay, "connection retry scheduled");
        }
        t.at_cap = capped;
        t.failures = failures;
        self.emit(SessionEvent::RetryScheduled { failures, delay })
            .await;
    }

    /// Make the extra connection the main one, abandoning the main FSM's connect attempt. The
    /// new main FSM connects or waits as the peer is configured (it was passive while extra).
    async fn promote_extra(&mut self) {
        self.connecting = None;
        self.main = self.extra.take();
        if let Some(s) = self.main.as_mut() {
            s.fsm.set_passive(self.p.fsm.passive);
            let state = s.fsm.state();
            self.emit(SessionEvent::StateChanged(state)).await;
        }
    }

    /// Carries out what [`collision::resolve`] decides for the two connections, if there are
    /// two, and returns it.
    async fn resolve_collision(&mut self) -> Resolution {
        let (Some(m), Some(x)) = (self.main.as_ref(), self.extra.as_ref()) else {
            return Resolution::Wait;
        };
        let resolution = collision::resolve(&m.fsm, &x.fsm);
        match resolution {
            Resolution::Wait => {}
            Resolution::CloseExtra => {
                debug!("connection collision: closing the peer's new connection");
                if let Some(mut v) = self.extra.take() {
                    self.close_lost(&mut v).await;
                }
            }
            Resolution::CloseMain => {
                debug!("connection collision: closing the main connection");
                if let Some(mut v) = self.main.take() {
                    self.close_lost(&mut v).await;
                }
                self.promote_extra().await;
            }
            Resolution::TakeOver => {
                debug!("the peer's connection takes over from a main FSM without one");
                self.promote_extra().await;
            }
            Resolution::Replace => {
                // RFC 4724 §4.2: a new session from a restarted peer ends the old one as a TCP
                // failure would: the peer's routes are kept as graceful restart says.
                if let Some(mut v) = self.main.take() {
                    self.close_lost(&mut v).await;
                }
                let reason = "the peer restarted and opened a new session";
                info!(reason, "session down");
                self.emit(SessionEvent::Down {
                    reason: reason.to_string(),
                    graceful: true,
                })
                .await;
                self.promote_extra().await;
            }
            Resolution::BadBgpId(conn) => {
                let main = conn == collision::Conn::Main;
                let id = self
                    .slot(main)
                    .and_then(|s| s.fsm.negotiated().map(|n| n.peer_id));
                if let Some(id) = id {
                    let n = OpenError::BadBgpId(id).notification();
                    Box::pin(self.handle(main, Event::DecodeError(n))).await;
                }
            }
        }
        resolution
    }

    /// Close a connection that lost collision resolution: its FSM sends Cease / Connection
    /// Collision Resolution (event 23).
    async fn close_lost(&mut self, v: &mut Slot) {
        for a in v.fsm.handle(Event::CollisionLost) {
            if let (Action::Send(msg), true) = (&a, v.conn.is_some()) {
                v.send(msg);
                if let Message::Notification(n) = msg {
                    self.emit(SessionEvent::NotificationSent(n.clone())).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (client, peer)
    }

    /// A peer with a zero window: the queue refuses what would pass the limit, so memory
    /// stays bounded however much is offered.
    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_at_most_the_limit() {
        let (client, _peer_never_reads) = pair().await;
        let (_reader, w) = client.into_split();
        let limit = 1 << 20;
        let queue = spawn_writer(w, limit);
        let piece = Bytes::from(vec![0u8; 4096]);
        let mut refused = false;
        // 256 MiB offered: far more than the limit and every kernel buffer between.
        for _ in 0..65_536 {
            if !queue.push(piece.clone()) {
                refused = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refused, "the queue refused bytes beyond the limit");
        assert!(queue.unsent.load(Ordering::Relaxed) <= limit);
    }

    /// What is written leaves the count: a reading peer never fills it.
    #[tokio::test]
    async fn written_bytes_leave_the_count() {
        let (client, mut peer) = pair().await;
        let (_reader, w) = client.into_split();
        let queue = spawn_writer(w, 1 << 20);
        let piece = Bytes::from(vec![7u8; 4096]);
        for _ in 0..1024 {
            // 4 MiB in all, four times the limit, read as it comes.
            while !queue.push(piece.clone()) {
                let mut buf = vec![0u8; 65536];
                let n = peer.read(&mut buf).await.unwrap();
                assert!(n > 0);
            }
        }
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.unsent.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "the writer drains the queue");
            let _ = tokio::time::timeout(Duration::from_millis(50), peer.read(&mut buf)).await;
        }
    }
}
