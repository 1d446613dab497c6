//! The BGP session state machine (RFC 4271 §8), sans-IO: events in, actions out.
//!
//! One [`Fsm`] drives one TCP connection (or connection attempt) to one peer. It owns no socket
//! and no clock: the session driver feeds it [`Event`]s (timer expiries, TCP outcomes, decoded
//! messages, operator commands) and carries out the [`Action`]s it returns (connect, send,
//! close, start/stop a timer, hand an UPDATE to the RIB). That keeps every RFC rule testable
//! with plain event sequences.
//!
//! ```text
//!              ManualStart / AutomaticStart / IdleHoldTimerExpires
//!   +------+  -------------------------------------------------->  +---------+
//!   | Idle |                  (passive: straight to Active)         | Connect |
//!   +------+  <---- ManualStop, errors (Down + idle hold-down) ---- +---------+
//!      ^                                                   TcpFailed |  ^ ConnectRetry
//!      |                                                             v  |  expires
//!      |                       TcpAccepted (or TcpConnected)     +--------+
//!      |                    +----------------------------------- | Active |
//!      |                    v                                    +--------+
//!      |              +----------+  OPEN ok, send KEEPALIVE  +-------------+  KEEPALIVE
//!      +------------- | OpenSent | ------------------------> | OpenConfirm | ----------+
//!      |   errors     +----------+                           +-------------+           |
//!      |                                                                               v
//!      +------------------------------------------------------------------- +-------------+
//!         NOTIFICATION sent/received, hold timer expiry, TCP failure        | Established |
//!                                                                           +-------------+
//! ```
//!
//! Departures from the letter of RFC 4271 §8.2.2, all deliberate:
//!
//! - No DelayOpen, no AllowAutomaticStop, no DampPeerOscillations flags: instead every error
//!   that sends the FSM to Idle starts the IdleHold timer with exponential backoff
//!   ([`FsmConfig::idle_hold_base`] doubling up to [`FsmConfig::idle_hold_max`], reset once a
//!   session reaches Established); its expiry restarts the FSM like AutomaticStart.
//! - A TCP failure in Connect goes to Active with the ConnectRetry timer restarted (the RFC
//!   goes to Idle); the next attempt is made when the timer expires.
//! - Timer expiries for timers this FSM does not have running are ignored (the driver may
//!   deliver a tick that raced with a stop), as are messages in Idle, Connect and Active: no
//!   connection exists there, so such a message can only be a late one from a connection the
//!   FSM already dropped.
//! - Collision detection (§6.8) needs two connections, so it is done by the driver over two
//!   `Fsm`s with [`collision_check`] and [`collision_loser`]; the loser is told with
//!   [`Event::CollisionLost`].
//! - The hold timer is also restarted by ROUTE-REFRESH (any message shows the peer is alive).
//!
//! The driver's contract:
//!
//! - `StartTimer(t, d)` (re)arms timer `t` to fire once after `d`, replacing any running
//!   instance; `StopTimer(t)` disarms it. When a timer fires, deliver the matching
//!   `…TimerExpires` event.
//! - `Connect` starts an outbound TCP connection; report `TcpConnected` or `TcpFailed`.
//!   `CloseConnection` drops whatever connection or attempt belongs to this `Fsm` (a no-op if
//!   it is already gone). Actions come in the order they must be carried out: a NOTIFICATION
//!   is always sent before the connection is closed.
//! - A connection accepted from the peer is handed over with `TcpAccepted`. If this `Fsm`
//!   already has a connection (OpenSent or later), create a second `Fsm` for it with
//!   [`Fsm::accept`]; a second connection given to a busy `Fsm` is ignored. An FSM in Idle
//!   refuses it (`CloseConnection`). `TcpAccepted` in Connect wins over the outbound attempt:
//!   abandon the pending connect.
//! - Decode each received message with [`Negotiated::codec`] once the session is negotiated
//!   (the default context before); if the codec rejects a message, deliver
//!   [`Event::DecodeError`] with its NOTIFICATION.

use crate::wire::{
    Capability, CodecContext, Family, GracefulRestartCap, Message, Notification, Open, Update,
    cease, code, open_err,
};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Hold time we offer unless configured otherwise (seconds), as Calico's BIRD does.
pub const DEFAULT_HOLD_TIME: u16 = 240;
/// ConnectRetry timer unless configured otherwise.
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_secs(5);
/// First idle hold-down after an error unless configured otherwise.
pub const DEFAULT_IDLE_HOLD_BASE: Duration = Duration::from_secs(1);
/// Longest idle hold-down unless configured otherwise.
pub const DEFAULT_IDLE_HOLD_MAX: Duration = Duration::from_secs(60);
/// Hold timer while waiting for the peer's OPEN, seconds (RFC 4271 §8.2.2: "4 minutes is
/// suggested").
pub const OPEN_SENT_HOLD_SECS: u16 = 240;
/// [`OPEN_SENT_HOLD_SECS`] as a duration.
pub const OPEN_SENT_HOLD: Duration = Duration::from_secs(OPEN_SENT_HOLD_SECS as u64);

/// Finite State Machine Error subcodes (RFC 6608 §3).
pub mod fsm_err {
    pub const UNSPECIFIED: u8 = 0;
    pub const UNEXPECTED_IN_OPEN_SENT: u8 = 1;
    pub const UNEXPECTED_IN_OPEN_CONFIRM: u8 = 2;
    pub const UNEXPECTED_IN_ESTABLISHED: u8 = 3;
}

/// Session states (RFC 4271 §8.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    /// Whether a TCP connection to the peer exists in this state.
    pub fn has_connection(self) -> bool {
        matches!(
            self,
            State::OpenSent | State::OpenConfirm | State::Established
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        })
    }
}

/// The FSM's timers (RFC 4271 §10, plus the idle hold-down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
    IdleHold,
}

impl Timer {
    pub const ALL: [Timer; 4] = [
        Timer::ConnectRetry,
        Timer::Hold,
        Timer::Keepalive,
        Timer::IdleHold,
    ];

    fn index(self) -> usize {
        match self {
            Timer::ConnectRetry => 0,
            Timer::Hold => 1,
            Timer::Keepalive => 2,
            Timer::IdleHold => 3,
        }
    }
}

/// Which end opened a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionSide {
    /// We connected to the peer.
    Outbound,
    /// The peer connected to us.
    Inbound,
}

/// Connection collision resolution (RFC 4271 §6.8): which of the two connections to a peer to
/// close, given both BGP identifiers. The connection opened by the speaker with the higher
/// identifier survives: if ours is lower (compared as unsigned 32-bit numbers) close the one
/// we opened, otherwise the one the peer opened.
///
/// Equal identifiers are only legal between different ASes (RFC 6286 §2.2); use
/// [`collision_loser_with_as`] to break that tie as RFC 6286 §2.3 says.
pub fn collision_loser(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> ConnectionSide {
    if u32::from(local_id) < u32::from(remote_id) {
        ConnectionSide::Outbound
    } else {
        ConnectionSide::Inbound
    }
}

/// [`collision_loser`] with the RFC 6286 §2.3 tie-break: on equal identifiers the connection
/// opened by the speaker with the larger AS number survives.
pub fn collision_loser_with_as(
    local_id: Ipv4Addr,
    local_as: u32,
    remote_id: Ipv4Addr,
    remote_as: u32,
) -> ConnectionSide {
    if local_id == remote_id {
        if local_as < remote_as {
            ConnectionSide::Outbound
        } else {
            ConnectionSide::Inbound
        }
    } else {
        collision_loser(local_id, remote_id)
    }
}

/// What to do when a new connection to a peer reaches OpenConfirm while another connection to
/// the same peer is in `existing` state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollisionCheck {
    /// The other connection does not take part (Idle, Connect, Active, OpenSent): nothing to
    /// do yet; check again if it reaches OpenConfirm.
    NotApplicable,
    /// Both are in OpenConfirm: close the one [`collision_loser`] names.
    ByBgpId,
    /// The other connection is Established: the new one loses.
    NewConnectionLoses,
}

/// Whether a connection in `existing` state takes part in collision detection (RFC 4271 §6.8).
pub fn collision_check(existing: State) -> CollisionCheck {
    match existing {
        State::OpenConfirm => CollisionCheck::ByBgpId,
        State::Established => CollisionCheck::NewConnectionLoses,
        _ => CollisionCheck::NotApplicable,
    }
}

/// Configuration of one peer's session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsmConfig {
    pub local_as: u32,
    /// The AS the peer must announce; anything else is answered with Bad Peer AS.
    pub remote_as: u32,
    /// Our BGP identifier (router ID).
    pub local_id: Ipv4Addr,
    /// Hold time we offer, seconds: 0 (no keepalives) or at least 3. Default 240, like
    /// Calico's BIRD.
    pub hold_time: u16,
    /// ConnectRetry timer (default 5 s).
    pub connect_retry: Duration,
    /// Never connect; wait for the peer to connect to us.
    pub passive: bool,
    /// Families we announce with the multiprotocol capability. Empty means none is announced,
    /// which by RFC 4760 means IPv4 unicast only.
    pub families: Vec<Family>,
    /// Announce the route refresh capability (RFC 2918).
    pub route_refresh: bool,
    /// Announce graceful restart (RFC 4724) with this value.
    pub graceful_restart: Option<GracefulRestartCap>,
    /// First idle hold-down after an error; doubles with each further error.
    pub idle_hold_base: Duration,
    /// Upper bound of the idle hold-down.
    pub idle_hold_max: Duration,
}

impl Default for FsmConfig {
    /// Defaults for everything but the identities: `local_as`, `remote_as` and `local_id` are
    /// 0 and must be set (see [`FsmConfig::check`]).
    fn default() -> Self {
        FsmConfig {
            local_as: 0,
            remote_as: 0,
            local_id: Ipv4Addr::UNSPECIFIED,
            hold_time: DEFAULT_HOLD_TIME,
            connect_retry: DEFAULT_CONNECT_RETRY,
            passive: false,
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            route_refresh: true,
            graceful_restart: None,
            idle_hold_base: DEFAULT_IDLE_HOLD_BASE,
            idle_hold_max: DEFAULT_IDLE_HOLD_MAX,
        }
    }
}

/// A configuration the FSM cannot run with as the operator meant it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("local AS 0 is reserved (RFC 7607): configure this node's AS number")]
    LocalAsZero,
    #[error("remote AS 0 is reserved (RFC 7607): configure the peer's AS number")]
    RemoteAsZero,
    #[error("local BGP identifier 0.0.0.0 is not allowed: configure a non-zero router ID")]
    LocalIdZero,
    #[error("hold time {0} s is not allowed: use 0 (no keepalives) or 3 s or more (RFC 4271 §4.2)")]
    HoldTime(u16),
    #[error("idle hold base {base:?} is longer than idle hold max {max:?}: lower the base")]
    IdleHold { base: Duration, max: Duration },
}

impl FsmConfig {
    /// A configuration with the defaults of [`FsmConfig::default`] and these identities.
    pub fn new(local_as: u32, remote_as: u32, local_id: Ipv4Addr) -> Self {
        FsmConfig {
            local_as,
            remote_as,
            local_id,
            ..FsmConfig::default()
        }
    }

    /// Checks what the operator can get wrong. [`Fsm`] runs with any configuration (a hold
    /// time of 1 or 2 s is raised to 3 s), but one that fails this check is a mistake.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.local_as == 0 {
            return Err(ConfigError::LocalAsZero);
        }
        if self.remote_as == 0 {
            return Err(ConfigError::RemoteAsZero);
        }
        if self.local_id.is_unspecified() {
            return Err(ConfigError::LocalIdZero);
        }
        if matches!(self.hold_time, 1 | 2) {
            return Err(ConfigError::HoldTime(self.hold_time));
        }
        if self.idle_hold_base > self.idle_hold_max {
            return Err(ConfigError::IdleHold {
                base: self.idle_hold_base,
                max: self.idle_hold_max,
            });
        }
        Ok(())
    }

    /// Whether the peer is in another AS.
    pub fn is_ebgp(&self) -> bool {
        self.local_as != self.remote_as
    }

    /// The hold time we offer: the configured one, with the illegal 1 and 2 raised to 3.
    fn offered_hold_time(&self) -> u16 {
        match self.hold_time {
            1 | 2 => 3,
            h => h,
        }
    }

    /// The configured families without duplicates, in configured order.
    fn announced_families(&self) -> Vec<Family> {
        let mut v: Vec<Family> = Vec::with_capacity(self.families.len());
        for f in &self.families {
            if !v.contains(f) {
                v.push(*f);
            }
        }
        v
    }

    /// The families we support: the announced ones, or IPv4 unicast if none (RFC 4760 §8).
    fn local_families(&self) -> Vec<Family> {
        let v = self.announced_families();
        if v.is_empty() {
            vec![Family::IPV4_UNICAST]
        } else {
            v
        }
    }

    /// The OPEN we send: multiprotocol per family, route refresh, graceful restart if
    /// configured, and the 4-octet AS capability (added by [`Open::new`]).
    pub fn open(&self) -> Open {
        let mut caps: Vec<Capability> = self
            .announced_families()
            .into_iter()
            .map(Capability::Multiprotocol)
            .collect();
        if self.route_refresh {
            caps.push(Capability::RouteRefresh);
        }
        if let Some(gr) = &self.graceful_restart {
            caps.push(Capability::GracefulRestart(gr.clone()));
        }
        Open::new(self.local_as, self.offered_hold_time(), self.local_id, caps)
    }
}

/// Inputs to the FSM (the subset of RFC 4271 §8.1 events podroute needs).
#[derive(Clone, Debug, PartialEq, Eq)]
// `Message` is large because of UPDATE; boxing it would cost an allocation per UPDATE for no
// gain, since each event is moved once.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// Operator starts the peer (event 1; with `passive`, event 4).
    ManualStart,
    /// Operator stops the peer (event 2). The FSM stays in Idle until the next ManualStart.
    ManualStop,
    /// The system starts the peer (event 3); ignored after ManualStop and during idle hold-down.
    AutomaticStart,
    ConnectRetryTimerExpires,
    HoldTimerExpires,
    KeepaliveTimerExpires,
    /// The idle hold-down is over (event 13): restart as AutomaticStart would.
    IdleHoldTimerExpires,
    /// Our outbound connection succeeded (event 17).
    TcpConnected,
    /// An inbound connection from the peer is handed to this FSM (event 16).
    TcpAccepted,
    /// The connection or the connection attempt failed or was closed by the peer (event 18).
    TcpFailed,
    /// A message decoded from the connection.
    Message(Message),
    /// The codec rejected a message (header, OPEN or UPDATE error): the FSM sends this
    /// NOTIFICATION and closes.
    DecodeError(Notification),
    /// The driver resolved a connection collision against this connection (event 23,
    /// OpenCollisionDump): send Cease / Connection Collision Resolution and close.
    CollisionLost,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
// See `Event`: UPDATEs are moved once, boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Open an outbound TCP connection to the peer.
    Connect,
    /// Drop this FSM's connection or pending connection attempt.
    CloseConnection,
    /// Send a message on the connection.
    Send(Message),
    /// (Re)arm a timer, replacing any running instance.
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// The session is up (OpenConfirm → Established) with these parameters.
    Established(Negotiated),
    /// An UPDATE from the peer for the RIB, passed through unchanged (End-of-RIB markers
    /// included: see [`Update::end_of_rib_family`]).
    Deliver(Update),
    /// The peer asked us to re-advertise this family (RFC 2918).
    RouteRefreshRequested(Family),
    /// The FSM went to Idle; comes right after `StateChanged(_, Idle)`.
    Down(DownReason),
    /// `StateChanged(from, to)`.
    StateChanged(State, State),
}

/// What was agreed in the OPEN exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_open: Open,
    /// From the 4-octet AS capability if the peer sent one, else the 2-octet field.
    pub peer_as: u32,
    pub peer_id: Ipv4Addr,
    /// The smaller of both hold times, seconds; 0 means no keepalives and no hold timer.
    pub hold_time: u16,
    /// hold_time / 3 (zero when hold_time is 0).
    pub keepalive: Duration,
    /// How to read and write the rest of the session.
    pub codec: CodecContext,
    /// Families both announced, in our configured order (RFC 4760 §8: a speaker without
    /// multiprotocol capabilities supports IPv4 unicast only).
    pub families: Vec<Family>,
    /// Both sides announced route refresh.
    pub route_refresh: bool,
    pub peer_graceful_restart: Option<GracefulRestartCap>,
    pub ebgp: bool,
}

/// Why the peer's OPEN was rejected (RFC 4271 §6.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The peer's AS is not the configured remote AS.
    BadPeerAs {
        /// The AS the peer announced (4-octet capability, or the 2-octet field).
        peer_as: u32,
        /// The "My Autonomous System" field as received.
        my_as_field: u16,
        expected: u32,
    },
    /// Hold time 1 or 2 seconds.
    UnacceptableHoldTime(u16),
    /// BGP identifier 0.0.0.0, or ours on an iBGP session.
    BadBgpId(Ipv4Addr),
}

impl OpenError {
    /// The NOTIFICATION that answers this error.
    pub fn notification(&self) -> Notification {
        match self {
            OpenError::BadPeerAs { my_as_field, .. } => Notification::new(
                code::OPEN_MESSAGE,
                open_err::BAD_PEER_AS,
                my_as_field.to_be_bytes().to_vec(),
            ),
            OpenError::UnacceptableHoldTime(_) => Notification::new(
                code::OPEN_MESSAGE,
                open_err::UNACCEPTABLE_HOLD_TIME,
                Vec::new(),
            ),
            OpenError::BadBgpId(_) => {
                Notification::new(code::OPEN_MESSAGE, open_err::BAD_BGP_IDENTIFIER, Vec::new())
            }
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::BadPeerAs {
                peer_as, expected, ..
            } => write!(
                f,
                "peer announced AS {peer_as} but AS {expected} is configured for it: \
                 fix the peer's AS number on one side"
            ),
            OpenError::UnacceptableHoldTime(h) => write!(
                f,
                "peer proposed hold time {h} s; only 0 or 3 s and more are allowed"
            ),
            OpenError::BadBgpId(id) if id.is_unspecified() => {
                f.write_str("peer's BGP identifier is 0.0.0.0")
            }
            OpenError::BadBgpId(id) => write!(
                f,
                "peer's BGP identifier {id} is ours on an iBGP session: \
                 give each router a unique router ID"
            ),
        }
    }
}

/// Why the FSM went to Idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// ManualStop; Cease / Administrative Shutdown was sent if a connection existed.
    ManualStop,
    /// No message from the peer within the hold time; Hold Timer Expired was sent.
    HoldTimerExpired {
        /// The hold time that ran out, seconds (240 while waiting for the OPEN).
        hold_time: u16,
    },
    /// The connection failed or the peer closed it without a NOTIFICATION.
    TcpFailed,
    /// The driver closed this connection to resolve a collision; Cease / Connection
    /// Collision Resolution was sent.
    CollisionLost,
    /// The peer sent this NOTIFICATION.
    NotificationReceived(Notification),
    /// We sent this NOTIFICATION (FSM error, or an error the codec found).
    NotificationSent(Notification),
    /// We rejected the peer's OPEN and sent [`OpenError::notification`].
    OpenRejected(OpenError),
}

impl DownReason {
    /// Whether this is an error that starts the idle hold-down (not ManualStop and not a lost
    /// collision).
    pub fn is_error(&self) -> bool {
        !matches!(self, DownReason::ManualStop | DownReason::CollisionLost)
    }

    /// The NOTIFICATION we sent when going down, if any.
    pub fn notification_sent(&self) -> Option<Notification> {
        match self {
            DownReason::HoldTimerExpired { .. } => Some(hold_expired()),
            DownReason::CollisionLost => Some(Notification::cease(cease::CONNECTION_COLLISION)),
            DownReason::NotificationSent(n) => Some(n.clone()),
            DownReason::OpenRejected(e) => Some(e.notification()),
            DownReason::ManualStop
            | DownReason::TcpFailed
            | DownReason::NotificationReceived(_) => None,
        }
    }

    /// The NOTIFICATION the peer sent, if that is why we went down.
    pub fn notification_received(&self) -> Option<&Notification> {
        match self {
            DownReason::NotificationReceived(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::ManualStop => f.write_str("stopped by the operator"),
            DownReason::HoldTimerExpired { hold_time } => write!(
                f,
                "hold timer expired: nothing received from the peer for {hold_time} s \
                 (sent NOTIFICATION {})",
                hold_expired()
            ),
            DownReason::TcpFailed => f.write_str("TCP connection failed or closed by the peer"),
            DownReason::CollisionLost => write!(
                f,
                "closed to resolve a connection collision (sent NOTIFICATION {})",
                Notification::cease(cease::CONNECTION_COLLISION)
            ),
            DownReason::NotificationReceived(n) => write!(f, "received NOTIFICATION {n}"),
            DownReason::NotificationSent(n) => write!(f, "sent NOTIFICATION {n}"),
            DownReason::OpenRejected(e) => {
                write!(f, "sent NOTIFICATION {}: {e}", e.notification())
            }
        }
    }
}

fn hold_expired() -> Notification {
    Notification::new(code::HOLD_TIMER_EXPIRED, 0, Vec::new())
}

/// The session state machine of one connection to one peer. See the module docs.
#[derive(Clone, Debug)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    negotiated: Option<Negotiated>,
    side: Option<ConnectionSide>,
    running: [bool; 4],
    next_idle_hold: Duration,
    /// ManualStop was the last operator command: stay in Idle.
    stopped: bool,
}

impl Fsm {
    /// An FSM in Idle. Nothing happens until ManualStart or AutomaticStart.
    pub fn new(config: FsmConfig) -> Fsm {
        let next_idle_hold = config.idle_hold_base.min(config.idle_hold_max);
        Fsm {
            config,
            state: State::Idle,
            negotiated: None,
            side: None,
            running: [false; 4],
            next_idle_hold,
            stopped: false,
        }
    }

    /// An FSM for a connection the peer opened while another FSM for the same peer already
    /// has a connection (the collision case): passive, started, and handed the connection.
    /// Returns the FSM in OpenSent and the actions that got it there (OPEN sent, hold timer).
    pub fn accept(mut config: FsmConfig) -> (Fsm, Vec<Action>) {
        config.passive = true;
        let mut fsm = Fsm::new(config);
        let mut out = Vec::new();
        fsm.handle_into(Event::ManualStart, &mut out);
        fsm.handle_into(Event::TcpAccepted, &mut out);
        (fsm, out)
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// What the OPEN exchange agreed; `Some` in OpenConfirm and Established only.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    pub fn config(&self) -> &FsmConfig {
        &self.config
    }

    /// Which end opened the current connection; `None` without a connection.
    pub fn side(&self) -> Option<ConnectionSide> {
        self.side
    }

    /// Whether the FSM believes `timer` is running (it started it and has not stopped it or
    /// seen it expire).
    pub fn timer_running(&self, timer: Timer) -> bool {
        self.running[timer.index()]
    }

    /// The idle hold-down the next error will start.
    pub fn next_idle_hold(&self) -> Duration {
        self.next_idle_hold
    }

    /// Feeds one event; returns the actions to carry out, in order. Never panics.
    #[must_use = "the driver must carry out the actions"]
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle_into(ev, &mut out);
        out
    }

    /// [`Fsm::handle`], appending to `out` instead of allocating.
    pub fn handle_into(&mut self, ev: Event, out: &mut Vec<Action>) {
        match self.state {
            State::Idle => self.idle(ev, out),
            State::Connect => self.connect(ev, out),
            State::Active => self.active(ev, out),
            State::OpenSent => self.open_sent(ev, out),
            State::OpenConfirm => self.open_confirm(ev, out),
            State::Established => self.established(ev, out),
        }
    }

    fn idle(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::ManualStart => {
                self.stopped = false;
                self.next_idle_hold = self.idle_hold_base();
                self.stop(Timer::IdleHold, out);
                self.start_session(out);
            }
            Event::AutomaticStart => {
                if !self.stopped && !self.timer_running(Timer::IdleHold) {
                    self.start_session(out);
                }
            }
            Event::IdleHoldTimerExpires => {
                if self.expired(Timer::IdleHold) && !self.stopped {
                    self.start_session(out);
                }
            }
            Event::ManualStop => {
                self.stopped = true;
                self.stop(Timer::IdleHold, out);
            }
            // RFC 4271 §8.2.2 Idle: "refuses all incoming BGP connections".
            Event::TcpConnected | Event::TcpAccepted => out.push(Action::CloseConnection),
            _ => {}
        }
    }

    fn connect(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::ManualStop => {
                self.stopped = true;
                self.go_idle(None, true, DownReason::ManualStop, out);
            }
            Event::ConnectRetryTimerExpires => {
                if self.expired(Timer::ConnectRetry) {
                    out.push(Action::CloseConnection);
                    out.push(Action::Connect);
                    self.start(Timer::ConnectRetry, self.config.connect_retry, out);
                }
            }
            Event::TcpConnected => self.open_connection(ConnectionSide::Outbound, out),
            Event::TcpAccepted => self.open_connection(ConnectionSide::Inbound, out),
            Event::TcpFailed => {
                out.push(Action::CloseConnection);
                self.wait_active(out);
            }
            _ => {}
        }
    }

    fn active(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::ManualStop => {
                self.stopped = true;
                self.go_idle(None, false, DownReason::ManualStop, out);
            }
            Event::ConnectRetryTimerExpires => {
                if self.expired(Timer::ConnectRetry) && !self.config.passive {
                    out.push(Action::Connect);
                    self.start(Timer::ConnectRetry, self.config.connect_retry, out);
                    self.goto(State::Connect, out);
                }
            }
            Event::TcpAccepted => self.open_connection(ConnectionSide::Inbound, out),
            Event::TcpConnected if !self.config.passive => {
                self.open_connection(ConnectionSide::Outbound, out)
            }
            // A passive peer never asked for an outbound connection: refuse it.
            Event::TcpConnected => out.push(Action::CloseConnection),
            _ => {}
        }
    }

    fn open_sent(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::TcpFailed => {
                // RFC 4271 §8.2.2 OpenSent, event 18: close, restart ConnectRetry, Active.
                out.push(Action::CloseConnection);
                self.stop(Timer::Hold, out);
                self.side = None;
                self.wait_active(out);
            }
            Event::Message(Message::Open(open)) => match self.negotiate(open) {
                Ok(neg) => {
                    out.push(Action::Send(Message::Keepalive));
                    if neg.hold_time > 0 {
                        self.start(Timer::Hold, secs(neg.hold_time), out);
                        self.start(Timer::Keepalive, neg.keepalive, out);
                    } else {
                        self.stop(Timer::Hold, out);
                    }
                    self.negotiated = Some(neg);
                    self.goto(State::OpenConfirm, out);
                }
                Err(e) => {
                    let n = e.notification();
                    self.go_idle(Some(n), true, DownReason::OpenRejected(e), out);
                }
            },
            ev => self.connected(ev, fsm_err::UNEXPECTED_IN_OPEN_SENT, out),
        }
    }

    fn open_confirm(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::Message(Message::Keepalive) => {
                let Some(neg) = self.negotiated.clone() else {
                    // Unreachable by construction (OpenConfirm is entered with `negotiated`
                    // set); fail safe rather than panic.
                    let n = fsm_error(fsm_err::UNEXPECTED_IN_OPEN_CONFIRM);
                    self.go_idle(Some(n.clone()), true, DownReason::NotificationSent(n), out);
                    return;
                };
                self.restart_hold(out);
                self.next_idle_hold = self.idle_hold_base();
                self.goto(State::Established, out);
                out.push(Action::Established(neg));
            }
            ev => self.connected(ev, fsm_err::UNEXPECTED_IN_OPEN_CONFIRM, out),
        }
    }

    fn established(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::Message(Message::Keepalive) => self.restart_hold(out),
            Event::Message(Message::Update(u)) => {
                self.restart_hold(out);
                out.push(Action::Deliver(u));
            }
            Event::Message(Message::RouteRefresh(rr)) => {
                self.restart_hold(out);
                // RFC 2918 §4: ignore a request for a family not negotiated; RFC 7313
                // subtypes (BoRR/EoRR) are not negotiated by podroute and are ignored too.
                let wanted = self.config.route_refresh
                    && rr.subtype == 0
                    && self
                        .negotiated
                        .as_ref()
                        .is_some_and(|n| n.families.contains(&rr.family));
                if wanted {
                    out.push(Action::RouteRefreshRequested(rr.family));
                }
            }
            ev => self.connected(ev, fsm_err::UNEXPECTED_IN_ESTABLISHED, out),
        }
    }

    /// Events handled alike in OpenSent, OpenConfirm and Established. `unexpected` is the
    /// RFC 6608 subcode for a message this state does not expect.
    fn connected(&mut self, ev: Event, unexpected: u8, out: &mut Vec<Action>) {
        match ev {
            Event::ManualStop => {
                self.stopped = true;
                let n = Notification::cease(cease::ADMIN_SHUTDOWN);
                self.go_idle(Some(n), true, DownReason::ManualStop, out);
            }
            Event::HoldTimerExpires => {
                if self.expired(Timer::Hold) {
                    let hold_time = match &self.negotiated {
                        Some(n) => n.hold_time,
                        None => OPEN_SENT_HOLD_SECS,
                    };
                    let reason = DownReason::HoldTimerExpired { hold_time };
                    self.go_idle(Some(hold_expired()), true, reason, out);
                }
            }
            Event::KeepaliveTimerExpires => {
                if self.expired(Timer::Keepalive) {
                    if let Some(ka) = self.negotiated.as_ref().map(|n| n.keepalive) {
                        out.push(Action::Send(Message::Keepalive));
                        self.start(Timer::Keepalive, ka, out);
                    }
                }
            }
            Event::TcpFailed => self.go_idle(None, true, DownReason::TcpFailed, out),
            Event::Message(Message::Notification(n)) => {
                self.go_idle(None, true, DownReason::NotificationReceived(n), out);
            }
            Event::Message(_) => {
                let n = fsm_error(unexpected);
                self.go_idle(Some(n.clone()), true, DownReason::NotificationSent(n), out);
            }
            Event::DecodeError(n) => {
                self.go_idle(Some(n.clone()), true, DownReason::NotificationSent(n), out);
            }
            Event::CollisionLost => {
                let n = Notification::cease(cease::CONNECTION_COLLISION);
                self.go_idle(Some(n), true, DownReason::CollisionLost, out);
            }
            // Starts do nothing once started; a second connection needs its own FSM
            // (`Fsm::accept`); stale timer ticks are ignored.
            Event::ManualStart
            | Event::AutomaticStart
            | Event::TcpConnected
            | Event::TcpAccepted
            | Event::ConnectRetryTimerExpires
            | Event::IdleHoldTimerExpires => {}
        }
    }

    /// Idle → Connect (or Active when passive).
    fn start_session(&mut self, out: &mut Vec<Action>) {
        if self.config.passive {
            self.goto(State::Active, out);
        } else {
            out.push(Action::Connect);
            self.start(Timer::ConnectRetry, self.config.connect_retry, out);
            self.goto(State::Connect, out);
        }
    }

    /// To Active after a failed connection: wait for the peer, and retry ourselves when the
    /// ConnectRetry timer expires (unless passive).
    fn wait_active(&mut self, out: &mut Vec<Action>) {
        if !self.config.passive {
            self.start(Timer::ConnectRetry, self.config.connect_retry, out);
        }
        self.goto(State::Active, out);
    }

    /// A connection exists: send our OPEN, wait for the peer's (RFC 4271 §8.2.2 Connect,
    /// event 16/17).
    fn open_connection(&mut self, side: ConnectionSide, out: &mut Vec<Action>) {
        self.side = Some(side);
        self.stop(Timer::ConnectRetry, out);
        out.push(Action::Send(Message::Open(self.config.open())));
        self.start(Timer::Hold, OPEN_SENT_HOLD, out);
        self.goto(State::OpenSent, out);
    }

    /// Leave for Idle: send `notify` if any, close, stop timers, start the idle hold-down if
    /// `reason` is an error, report `Down(reason)`.
    fn go_idle(
        &mut self,
        notify: Option<Notification>,
        close: bool,
        reason: DownReason,
        out: &mut Vec<Action>,
    ) {
        if let Some(n) = notify {
            out.push(Action::Send(Message::Notification(n)));
        }
        if close {
            out.push(Action::CloseConnection);
        }
        for t in Timer::ALL {
            self.stop(t, out);
        }
        if reason.is_error() {
            let d = self.next_idle_hold.min(self.config.idle_hold_max);
            self.start(Timer::IdleHold, d, out);
            self.next_idle_hold = d.saturating_mul(2).min(self.config.idle_hold_max);
        }
        self.side = None;
        self.goto(State::Idle, out);
        out.push(Action::Down(reason));
    }

    fn goto(&mut self, to: State, out: &mut Vec<Action>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        if !matches!(to, State::OpenConfirm | State::Established) {
            self.negotiated = None;
        }
        out.push(Action::StateChanged(from, to));
    }

    fn restart_hold(&mut self, out: &mut Vec<Action>) {
        if let Some(h) = self.negotiated.as_ref().map(|n| n.hold_time) {
            if h > 0 {
                self.start(Timer::Hold, secs(h), out);
            }
        }
    }

    fn start(&mut self, t: Timer, d: Duration, out: &mut Vec<Action>) {
        self.running[t.index()] = true;
        out.push(Action::StartTimer(t, d));
    }

    fn stop(&mut self, t: Timer, out: &mut Vec<Action>) {
        if self.running[t.index()] {
            self.running[t.index()] = false;
            out.push(Action::StopTimer(t));
        }
    }

    /// Consumes a timer expiry: true if the timer was running (and now is not), false for a
    /// stale tick.
    fn expired(&mut self, t: Timer) -> bool {
        std::mem::replace(&mut self.running[t.index()], false)
    }

    fn idle_hold_base(&self) -> Duration {
        self.config.idle_hold_base.min(self.config.idle_hold_max)
    }

    /// Checks the peer's OPEN (RFC 4271 §6.2, in its order: AS, hold time, identifier;
    /// the version was checked by the codec) and works out the session parameters.
    ///
    /// 4-octet AS (RFC 6793): when the peer sends the capability its value is the peer's AS,
    /// whatever the 2-octet field says. RFC 6793 prescribes no error for a 2-octet field that
    /// is neither the AS nor AS_TRANS, and BIRD and GoBGP accept it too, so we do; the
    /// capability is authoritative. Without the capability the 2-octet field is the AS, so a
    /// peer configured with a 4-octet AS can never match.
    fn negotiate(&self, open: Open) -> Result<Negotiated, OpenError> {
        let peer_as = open.asn();
        if peer_as != self.config.remote_as {
            return Err(OpenError::BadPeerAs {
                peer_as,
                my_as_field: open.my_as,
                expected: self.config.remote_as,
            });
        }
        if matches!(open.hold_time, 1 | 2) {
            return Err(OpenError::UnacceptableHoldTime(open.hold_time));
        }
        let ebgp = self.config.is_ebgp();
        // RFC 6286 §2.2: identifiers must differ within an AS; 0 is never valid.
        if open.bgp_id.is_unspecified() || (!ebgp && open.bgp_id == self.config.local_id) {
            return Err(OpenError::BadBgpId(open.bgp_id));
        }
        let hold_time = self.config.offered_hold_time().min(open.hold_time);
        let peer_families = open.families();
        let families = self
            .config
            .local_families()
            .into_iter()
            .filter(|f| peer_families.contains(f))
            .collect();
        let four_octet_as = open.four_octet_as().is_some();
        Ok(Negotiated {
            peer_as,
            peer_id: open.bgp_id,
            hold_time,
            keepalive: secs(hold_time) / 3,
            codec: CodecContext { four_octet_as },
            families,
            route_refresh: self.config.route_refresh && open.route_refresh(),
            peer_graceful_restart: open.graceful_restart().cloned(),
            ebgp,
            peer_open: open,
        })
    }
}

fn secs(s: u16) -> Duration {
    Duration::from_secs(u64::from(s))
}

fn fsm_error(subcode: u8) -> Notification {
    Notification::new(code::FSM, subcode, Vec::new())
}
