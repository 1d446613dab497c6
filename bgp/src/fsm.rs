//! The BGP session state machine (RFC 4271 §8), sans-IO: events in, actions out.
//!
//! One [`Fsm`] drives one TCP connection (or connection attempt) to one peer. It owns no socket
//! and no clock: the session driver feeds it [`Event`]s (timer expiries, TCP outcomes, decoded
//! messages, operator commands) and carries out the [`Action`]s it returns (connect, send,
//! close, start/stop a timer, hand an UPDATE to the RIB). That keeps every RFC rule testable
//! with plain event sequences.
//!
//! ```text
//! Idle        --ManualStart | AutomaticStart | IdleHold expiry-->  Connect (passive: Active)
//! Connect     --TcpConnected | TcpAccepted: send OPEN-->           OpenSent
//! Connect     --TcpFailed-->                                       Active (ConnectRetry runs
//!                                                                  for the backoff delay)
//! Active      --ConnectRetry expiry: connect-->                    Connect
//! Active      --TcpAccepted: send OPEN-->                          OpenSent
//! OpenSent    --acceptable OPEN: send KEEPALIVE-->                 OpenConfirm
//! OpenSent    --TcpFailed-->                                       Active
//! OpenConfirm --KEEPALIVE-->                                       Established
//! OpenSent | OpenConfirm | Established
//!             --NOTIFICATION sent or received, hold timer expiry,
//!               TcpFailed (not in OpenSent), ManualStop, CollisionLost-->  Idle + Down(reason)
//! Connect | Active --ManualStop-->                                 Idle + Down(ManualStop)
//! ```
//!
//! `Down` is emitted exactly when the FSM enters Idle. Every `Down` that is an error
//! ([`DownReason::is_error`]) also starts the idle hold-down.
//!
//! Departures from the letter of RFC 4271 §8.2.2, all deliberate:
//!
//! - No DelayOpen, no AllowAutomaticStop, no DampPeerOscillations flags: instead every error
//!   that sends the FSM to Idle starts the IdleHold timer with exponential backoff
//!   ([`FsmConfig::idle_hold_base`] doubling up to [`FsmConfig::idle_hold_max`], reset once a
//!   session reaches Established); its expiry restarts the FSM like AutomaticStart.
//! - A TCP failure in Connect goes to Active with the ConnectRetry timer restarted (the RFC
//!   goes to Idle); the next attempt is made when the timer expires.
//! - No ConnectRetry timer runs in Connect (the RFC restarts the attempt when it expires
//!   there): the driver bounds the attempt itself (a speaker-wide limit on attempts in
//!   flight, then a connect timeout) and always reports `TcpConnected` or `TcpFailed`. A
//!   connect timeout is thus a failure like a refusal, not a fresh attempt at once.
//! - The ConnectRetry timer is an exponential backoff, not a constant: after the n-th
//!   connection failure in a row (a failed attempt, or a connection closed before the
//!   peer's OPEN) it runs for [`FsmConfig::connect_retry`] × 2^(n-1), capped at
//!   [`FsmConfig::connect_retry_max`] (see [`connect_backoff`]), each delay then reduced by
//!   a random 0-25 % ([`FsmConfig::jitter_seed`]; RFC 4271 §10 asks for that jitter on
//!   ConnectRetry too). The count is reset when a session reaches Established (like the idle
//!   hold-down) and by ManualStart. An inbound connection is accepted during the backoff.
//! - A refused attempt ([`Event::TcpRefused`]: the host answered, nothing listens yet, as
//!   while a peer restarts) is retried sooner: the first [`REFUSED_QUICK_RETRIES`] refusals
//!   in a row wait [`FsmConfig::refused_retry`] × 2^(k-1) for the k-th of them (1, 2, 4 s by
//!   default), never longer than `connect_retry`; those quick retries do not count in the
//!   exponent of the backoff, which goes on from `connect_retry` after them (5, 10, 20 s ...
//!   up to `connect_retry_max`). Any further refusal, and every timeout or other failure,
//!   takes the normal backoff. A peer that keeps refusing thus makes at most
//!   [`REFUSED_QUICK_RETRIES`] attempts more than the normal backoff allows, whenever it
//!   refuses.
//! - Timer expiries for timers this FSM does not have running are ignored (the driver may
//!   deliver a tick that raced with a stop), as are messages in Idle, Connect and Active: no
//!   connection exists there, so such a message can only be a late one from a connection the
//!   FSM already dropped.
//! - Collision detection (§6.8) needs two connections, so it is decided over two `Fsm`s by
//!   [`crate::collision::resolve`] (with [`collision_loser_with_as`], RFC 6286 §2.3), as is
//!   a restarted peer's new session replacing the old one (RFC 4724 §4.2); the driver carries
//!   the decision out and tells the loser with [`Event::CollisionLost`].
//! - The hold timer is also restarted by ROUTE-REFRESH (any message shows the peer is alive).
//!
//! The driver's contract:
//!
//! - `StartTimer(t, d)` (re)arms timer `t` to fire once after `d`, replacing any running
//!   instance; `StopTimer(t)` disarms it. When a timer fires, deliver the matching
//!   `…TimerExpires` event.
//! - `Connect` starts an outbound TCP connection; report `TcpConnected` or `TcpFailed`,
//!   always (no FSM timer bounds the attempt: time it out and report `TcpFailed`).
//!   `CloseConnection` drops whatever connection or attempt belongs to this `Fsm` (a no-op if
//!   it is already gone). Actions come in the order they must be carried out: a NOTIFICATION
//!   is always sent before the connection is closed.
//! - A connection accepted from the peer is handed over with `TcpAccepted`. If this `Fsm`
//!   already has a connection (OpenSent or later), create a second `Fsm` for it with
//!   [`Fsm::accept`] and, after every event to either, carry out what
//!   [`crate::collision::resolve`] decides for the pair; a second connection given to a busy
//!   `Fsm` is ignored. An FSM in Idle
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
/// Longest ConnectRetry backoff unless configured otherwise: a peer that keeps refusing is
/// tried about every 90-120 s (with jitter) after its first few failures.
pub const DEFAULT_CONNECT_RETRY_MAX: Duration = Duration::from_secs(120);
/// First retry after a refused connection unless configured otherwise (see the module docs).
pub const DEFAULT_REFUSED_RETRY: Duration = Duration::from_secs(1);
/// Refusals in a row that are retried sooner than the normal backoff (see the module docs).
pub const REFUSED_QUICK_RETRIES: u32 = 3;
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
    pub const ALL: [State; 6] = [
        State::Idle,
        State::Connect,
        State::Active,
        State::OpenSent,
        State::OpenConfirm,
        State::Established,
    ];

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
    /// Both are in OpenConfirm: close the one [`collision_loser_with_as`] names.
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
    /// ConnectRetry timer after the first connection failure (default 5 s); doubles with
    /// each further failure in a row, up to `connect_retry_max`.
    pub connect_retry: Duration,
    /// Upper bound of the ConnectRetry backoff (default 120 s).
    pub connect_retry_max: Duration,
    /// First retry after a refused attempt (default 1 s; see the module docs).
    pub refused_retry: Duration,
    /// Seed of the ConnectRetry jitter (each delay reduced by a random 0-25 %); `None`: no
    /// jitter, every delay exactly as [`connect_backoff`] says. Give each peer its own seed,
    /// or peers that failed together retry together.
    pub jitter_seed: Option<u64>,
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
    /// Send KEEPALIVEs this often when that is shorter than a third of the negotiated hold
    /// time (BIRD `keepalive time`; Calico `keepaliveTime`). `None`: a third of it.
    pub keepalive_time: Option<Duration>,
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
            connect_retry_max: DEFAULT_CONNECT_RETRY_MAX,
            refused_retry: DEFAULT_REFUSED_RETRY,
            jitter_seed: None,
            passive: false,
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            route_refresh: true,
            graceful_restart: None,
            idle_hold_base: DEFAULT_IDLE_HOLD_BASE,
            idle_hold_max: DEFAULT_IDLE_HOLD_MAX,
            keepalive_time: None,
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
    #[error(
        "connect retry {base:?} is zero or longer than the connect retry max {max:?}: use a \
         non-zero connect retry no longer than the max"
    )]
    ConnectRetry { base: Duration, max: Duration },
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
        if self.connect_retry.is_zero() || self.connect_retry > self.connect_retry_max {
            return Err(ConfigError::ConnectRetry {
                base: self.connect_retry,
                max: self.connect_retry_max,
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
    /// The outbound connection attempt was refused (ECONNREFUSED: the host answered, nothing
    /// listens). As `TcpFailed`, with a quicker retry for the first refusals in a row (see
    /// the module docs); in any state but Connect exactly `TcpFailed`.
    TcpRefused,
    /// A message decoded from the connection.
    Message(Message),
    /// The codec rejected a message (header, OPEN or UPDATE error): the FSM sends this
    /// NOTIFICATION and closes.
    DecodeError(Notification),
    /// The driver resolved a connection collision against this connection (event 23,
    /// OpenCollisionDump): send Cease / Connection Collision Resolution and close.
    CollisionLost,
}

impl Event {
    /// The timer whose expiry this event reports, if it is one.
    pub fn expired_timer(&self) -> Option<Timer> {
        match self {
            Event::ConnectRetryTimerExpires => Some(Timer::ConnectRetry),
            Event::HoldTimerExpires => Some(Timer::Hold),
            Event::KeepaliveTimerExpires => Some(Timer::Keepalive),
            Event::IdleHoldTimerExpires => Some(Timer::IdleHold),
            _ => None,
        }
    }
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

/// The ConnectRetry delay after `failures` connection failures in a row, before jitter:
/// `base` × 2^(failures-1), capped at `max` (`base` for 0 or 1 failure).
pub fn connect_backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << doublings).min(max)
}

/// The delay after the `k`-th quick retry of a refusal streak, before jitter: `refused` ×
/// 2^(k-1), never longer than `connect_retry`.
pub fn refused_backoff(refused: Duration, connect_retry: Duration, k: u32) -> Duration {
    let doublings = k.saturating_sub(1).min(31);
    refused.saturating_mul(1u32 << doublings).min(connect_retry)
}

/// A small deterministic random source (SplitMix64) for the ConnectRetry jitter: seeded by
/// the driver, so the FSM stays free of I/O and its tests reproducible.
#[derive(Clone, Debug)]
struct Jitter(Option<u64>);

impl Jitter {
    /// `d` reduced by a random 0-25 % (unchanged without a seed).
    fn apply(&mut self, d: Duration) -> Duration {
        let Some(state) = self.0.as_mut() else {
            return d;
        };
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 16 random bits: cut 0..65535 / 262144 of the delay (just under 25 %).
        let nanos = d.as_nanos();
        let cut = nanos * u128::from(z >> 48) / (1u128 << 18);
        Duration::from_nanos(u64::try_from(nanos - cut).unwrap_or(u64::MAX))
    }
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
    /// Connections (or attempts) that failed in a row since the last Established.
    connect_failures: u32,
    /// How many of them were refusals retried sooner than the backoff.
    quick_retries: u32,
    jitter: Jitter,
    /// ManualStop was the last operator command: stay in Idle.
    stopped: bool,
}

impl Fsm {
    /// An FSM in Idle. Nothing happens until ManualStart or AutomaticStart.
    pub fn new(config: FsmConfig) -> Fsm {
        let next_idle_hold = config.idle_hold_base.min(config.idle_hold_max);
        let jitter = Jitter(config.jitter_seed);
        Fsm {
            config,
            connect_failures: 0,
            quick_retries: 0,
            jitter,
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
    /// Once it closes its connection without reaching Established, discard it.
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

    /// Replace the graceful restart capability announced in the OPENs this FSM sends from now
    /// on (RFC 4724: the Restart State and Forwarding State bits change once a restarted
    /// speaker has recovered). An OPEN already sent is not affected, and neither is the
    /// negotiated session: the capability only describes the next restart.
    pub fn set_graceful_restart(&mut self, cap: Option<GracefulRestartCap>) {
        self.config.graceful_restart = cap;
    }

    /// Whether this FSM connects to the peer itself from now on. An FSM from [`Fsm::accept`]
    /// is passive; once its connection becomes the peer's main session it takes the peer's
    /// configured mode, so that after the next failure it reconnects as the original would.
    pub fn set_passive(&mut self, passive: bool) {
        self.config.passive = passive;
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

    /// Connections or connection attempts that failed in a row (before reaching
    /// Established); 0 after Established and after ManualStart.
    pub fn connect_failures(&self) -> u32 {
        self.connect_failures
    }

    /// Continue the ConnectRetry backoff of an earlier FSM for the same peer (its driver
    /// ended while backing off and a new one took over): the next failure backs off as the
    /// `failures + 1`-th in a row, and the jitter draws a different value than the earlier
    /// FSM's first.
    pub fn resume_connect_failures(&mut self, failures: u32) {
        self.connect_failures = failures;
        self.quick_retries = self.quick_retries.min(failures);
        if let Some(state) = self.jitter.0.as_mut() {
            *state ^= u64::from(failures).wrapping_mul(0xd6e8_feb8_6659_fd93);
        }
    }

    /// Refusals of this streak that were retried sooner than the backoff (at most
    /// [`REFUSED_QUICK_RETRIES`]).
    pub fn quick_retries(&self) -> u32 {
        self.quick_retries
    }

    /// With [`Fsm::resume_connect_failures`]: how many of those failures were quick retries
    /// after a refusal (call it after that one).
    pub fn resume_quick_retries(&mut self, quick: u32) {
        self.quick_retries = quick.min(self.connect_failures).min(REFUSED_QUICK_RETRIES);
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
        // Only an outbound attempt (Connect) can be refused; elsewhere it is a failure.
        let ev = match ev {
            Event::TcpRefused if self.state != State::Connect => Event::TcpFailed,
            ev => ev,
        };
        if let Some(t) = ev.expired_timer() {
            // A timer that fires is no longer running; a tick for a timer that is not running
            // raced with its stop and is ignored.
            if !std::mem::replace(&mut self.running[t.index()], false) {
                return;
            }
        }
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
                self.connect_failures = 0;
                self.quick_retries = 0;
                self.stop(Timer::IdleHold, out);
                self.start_session(out);
            }
            Event::AutomaticStart if !self.stopped && !self.timer_running(Timer::IdleHold) => {
                self.start_session(out);
            }
            // Never running after ManualStop, so this is the end of an error's hold-down.
            Event::IdleHoldTimerExpires => self.start_session(out),
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
            // No ConnectRetry timer runs in Connect (see the module docs): the driver bounds
            // the attempt and reports its end.
            Event::TcpConnected => self.open_connection(ConnectionSide::Outbound, out),
            Event::TcpAccepted => self.open_connection(ConnectionSide::Inbound, out),
            Event::TcpFailed => {
                out.push(Action::CloseConnection);
                self.wait_active(out, false);
            }
            Event::TcpRefused => {
                out.push(Action::CloseConnection);
                self.wait_active(out, true);
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
            // Never running for a passive peer.
            Event::ConnectRetryTimerExpires if !self.config.passive => {
                out.push(Action::Connect);
                self.goto(State::Connect, out);
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
                self.wait_active(out, false);
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
                self.connect_failures = 0;
                self.quick_retries = 0;
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
                let hold_time = match &self.negotiated {
                    Some(n) => n.hold_time,
                    None => OPEN_SENT_HOLD_SECS,
                };
                let reason = DownReason::HoldTimerExpired { hold_time };
                self.go_idle(Some(hold_expired()), true, reason, out);
            }
            Event::KeepaliveTimerExpires => self.send_keepalive(out),
            Event::TcpFailed | Event::TcpRefused => {
                self.go_idle(None, true, DownReason::TcpFailed, out)
            }
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
            self.goto(State::Connect, out);
        }
    }

    /// To Active after a failed connection: wait for the peer, and retry ourselves when the
    /// ConnectRetry timer expires (unless passive), after the backoff for this many failures.
    /// `refused`: the attempt was refused (a quick retry for the first refusals in a row).
    fn wait_active(&mut self, out: &mut Vec<Action>, refused: bool) {
        self.connect_failures = self.connect_failures.saturating_add(1);
        if !self.config.passive {
            let d = if refused && self.quick_retries < REFUSED_QUICK_RETRIES {
                self.quick_retries += 1;
                refused_backoff(
                    self.config.refused_retry,
                    self.config.connect_retry,
                    self.quick_retries,
                )
            } else {
                // The quick retries do not count in the exponent: the backoff goes on from
                // `connect_retry` after them.
                connect_backoff(
                    self.config.connect_retry,
                    self.config.connect_retry_max,
                    self.connect_failures - self.quick_retries,
                )
            };
            let d = self.jitter.apply(d);
            self.start(Timer::ConnectRetry, d, out);
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
        if let Some(h) = self.negotiated.as_ref().map(|n| n.hold_time)
            && h > 0
        {
            self.start(Timer::Hold, secs(h), out);
        }
    }

    /// The keepalive timer fired (it only runs with a non-zero negotiated hold time).
    fn send_keepalive(&mut self, out: &mut Vec<Action>) {
        let Some(ka) = self.negotiated.as_ref().map(|n| n.keepalive) else {
            return;
        };
        out.push(Action::Send(Message::Keepalive));
        self.start(Timer::Keepalive, ka, out);
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
            keepalive: match self.config.keepalive_time {
                Some(k) if hold_time > 0 && !k.is_zero() => k.min(secs(hold_time) / 3),
                _ => secs(hold_time) / 3,
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        AS_TRANS, GrFamily, MpReach, NextHop, RouteRefresh, decode_message, encode_message,
    };
    use bytes::BytesMut;

    const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const V4: Family = Family::IPV4_UNICAST;
    const V6: Family = Family::IPV6_UNICAST;

    /// eBGP: we are AS 65001, the peer AS 65002.
    fn ebgp() -> FsmConfig {
        FsmConfig::new(65001, 65002, LOCAL_ID)
    }

    fn ibgp() -> FsmConfig {
        FsmConfig::new(65001, 65001, LOCAL_ID)
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// An OPEN as BIRD would send it: IPv4 and IPv6 unicast, route refresh, 4-octet AS.
    fn peer_open(asn: u32, hold: u16, id: Ipv4Addr) -> Open {
        Open::new(
            asn,
            hold,
            id,
            vec![
                Capability::Multiprotocol(V4),
                Capability::Multiprotocol(V6),
                Capability::RouteRefresh,
            ],
        )
    }

    /// An OPEN from an old speaker: no capabilities at all.
    fn bare_open(my_as: u16, hold: u16, id: Ipv4Addr) -> Open {
        Open {
            version: 4,
            my_as,
            hold_time: hold,
            bgp_id: id,
            capabilities: Vec::new(),
        }
    }

    fn open_ev(o: Open) -> Event {
        Event::Message(Message::Open(o))
    }

    fn keepalive() -> Event {
        Event::Message(Message::Keepalive)
    }

    fn notif_ev(code: u8, subcode: u8) -> Event {
        Event::Message(Message::Notification(Notification::new(
            code,
            subcode,
            Vec::new(),
        )))
    }

    fn send_notif(code: u8, subcode: u8, data: &[u8]) -> Action {
        Action::Send(Message::Notification(Notification::new(
            code,
            subcode,
            data.to_vec(),
        )))
    }

    fn run(fsm: &mut Fsm, events: impl IntoIterator<Item = Event>) -> Vec<Action> {
        let mut out = Vec::new();
        for ev in events {
            fsm.handle_into(ev, &mut out);
        }
        out
    }

    fn open_sent(cfg: FsmConfig) -> Fsm {
        let mut fsm = Fsm::new(cfg);
        let _ = run(&mut fsm, [Event::ManualStart, Event::TcpConnected]);
        assert_eq!(fsm.state(), State::OpenSent);
        fsm
    }

    fn open_confirm(cfg: FsmConfig, hold: u16) -> Fsm {
        let peer_as = cfg.remote_as;
        let mut fsm = open_sent(cfg);
        let _ = fsm.handle(open_ev(peer_open(peer_as, hold, PEER_ID)));
        assert_eq!(fsm.state(), State::OpenConfirm);
        fsm
    }

    fn established(cfg: FsmConfig, hold: u16) -> Fsm {
        let mut fsm = open_confirm(cfg, hold);
        let _ = fsm.handle(keepalive());
        assert_eq!(fsm.state(), State::Established);
        fsm
    }

    fn down_reason(actions: &[Action]) -> Option<&DownReason> {
        actions.iter().find_map(|a| match a {
            Action::Down(r) => Some(r),
            _ => None,
        })
    }

    fn idle_hold(actions: &[Action]) -> Option<Duration> {
        actions.iter().find_map(|a| match a {
            Action::StartTimer(Timer::IdleHold, d) => Some(*d),
            _ => None,
        })
    }

    fn encode(msg: &Message) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_message(msg, CodecContext::default(), &mut b);
        b.to_vec()
    }

    // ---- happy paths ----

    #[test]
    fn active_open_reaches_established_with_exact_actions() {
        let cfg = ebgp();
        let mut fsm = Fsm::new(cfg.clone());
        assert_eq!(fsm.state(), State::Idle);

        assert_eq!(
            fsm.handle(Event::ManualStart),
            vec![
                Action::Connect,
                Action::StateChanged(State::Idle, State::Connect),
            ]
        );
        assert_eq!(
            fsm.handle(Event::TcpConnected),
            vec![
                Action::Send(Message::Open(cfg.open())),
                Action::StartTimer(Timer::Hold, s(240)),
                Action::StateChanged(State::Connect, State::OpenSent),
            ]
        );
        assert_eq!(fsm.side(), Some(ConnectionSide::Outbound));
        assert_eq!(fsm.negotiated(), None);

        let theirs = peer_open(65002, 90, PEER_ID);
        assert_eq!(
            fsm.handle(open_ev(theirs.clone())),
            vec![
                Action::Send(Message::Keepalive),
                Action::StartTimer(Timer::Hold, s(90)),
                Action::StartTimer(Timer::Keepalive, s(30)),
                Action::StateChanged(State::OpenSent, State::OpenConfirm),
            ]
        );
        let expected = Negotiated {
            peer_open: theirs,
            peer_as: 65002,
            peer_id: PEER_ID,
            hold_time: 90,
            keepalive: s(30),
            codec: CodecContext {
                four_octet_as: true,
            },
            families: vec![V4, V6],
            route_refresh: true,
            peer_graceful_restart: None,
            ebgp: true,
        };
        assert_eq!(fsm.negotiated(), Some(&expected));

        assert_eq!(
            fsm.handle(keepalive()),
            vec![
                Action::StartTimer(Timer::Hold, s(90)),
                Action::StateChanged(State::OpenConfirm, State::Established),
                Action::Established(expected.clone()),
            ]
        );
        assert_eq!(fsm.state(), State::Established);
        assert_eq!(fsm.negotiated(), Some(&expected));
        assert!(fsm.timer_running(Timer::Hold) && fsm.timer_running(Timer::Keepalive));
        assert!(!fsm.timer_running(Timer::ConnectRetry) && !fsm.timer_running(Timer::IdleHold));
    }

    #[test]
    fn sent_open_has_our_capabilities_on_the_wire() {
        // RFC 4271 §4.2 + RFC 5492, all capabilities in one optional parameter as BIRD and
        // GoBGP send them: MP ipv4-unicast, MP ipv6-unicast, route refresh, 4-octet AS 65001.
        let bytes = encode(&Message::Open(ebgp().open()));
        let mut want = vec![0xff; 16];
        want.extend_from_slice(&[0x00, 51, 1]); // length 51, type OPEN
        want.extend_from_slice(&[4, 0xfd, 0xe9, 0x00, 0xf0, 10, 0, 0, 1, 22]);
        want.extend_from_slice(&[2, 20]);
        want.extend_from_slice(&[1, 4, 0, 1, 0, 1]);
        want.extend_from_slice(&[1, 4, 0, 2, 0, 1]);
        want.extend_from_slice(&[2, 0]);
        want.extend_from_slice(&[65, 4, 0, 0, 0xfd, 0xe9]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn passive_peer_waits_in_active_for_an_inbound_connection() {
        let cfg = FsmConfig {
            passive: true,
            ..ebgp()
        };
        let mut fsm = Fsm::new(cfg.clone());
        assert_eq!(
            fsm.handle(Event::ManualStart),
            vec![Action::StateChanged(State::Idle, State::Active)]
        );
        // No ConnectRetry timer runs, so a tick changes nothing; we never connect.
        assert_eq!(fsm.handle(Event::ConnectRetryTimerExpires), vec![]);
        assert_eq!(
            fsm.handle(Event::TcpConnected),
            vec![Action::CloseConnection]
        );
        assert_eq!(fsm.state(), State::Active);
        assert_eq!(
            fsm.handle(Event::TcpAccepted),
            vec![
                Action::Send(Message::Open(cfg.open())),
                Action::StartTimer(Timer::Hold, s(240)),
                Action::StateChanged(State::Active, State::OpenSent),
            ]
        );
        assert_eq!(fsm.side(), Some(ConnectionSide::Inbound));
        let _ = fsm.handle(open_ev(peer_open(65002, 240, PEER_ID)));
        let out = fsm.handle(keepalive());
        assert_eq!(fsm.state(), State::Established);
        assert!(matches!(out.last(), Some(Action::Established(n)) if n.hold_time == 240));
        assert!(!out.contains(&Action::Connect));
    }

    #[test]
    fn passive_peer_goes_back_to_active_without_connecting_after_tcp_failure_in_open_sent() {
        let mut fsm = Fsm::new(FsmConfig {
            passive: true,
            ..ebgp()
        });
        let _ = run(&mut fsm, [Event::ManualStart, Event::TcpAccepted]);
        assert_eq!(
            fsm.handle(Event::TcpFailed),
            vec![
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StateChanged(State::OpenSent, State::Active),
            ]
        );
    }

    #[test]
    fn inbound_connection_in_connect_wins_over_the_pending_attempt() {
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        let out = fsm.handle(Event::TcpAccepted);
        assert_eq!(out[0], Action::Send(Message::Open(ebgp().open())));
        assert_eq!(fsm.state(), State::OpenSent);
        assert_eq!(fsm.side(), Some(ConnectionSide::Inbound));
    }

    // ---- OPEN checks ----

    #[test]
    fn bad_peer_as_sends_open_error_2_2_with_the_as_field_and_closes() {
        let mut fsm = open_sent(ebgp());
        let out = fsm.handle(open_ev(peer_open(65003, 90, PEER_ID)));
        let err = OpenError::BadPeerAs {
            peer_as: 65003,
            my_as_field: 65003,
            expected: 65002,
        };
        assert_eq!(
            out,
            vec![
                send_notif(2, 2, &[0xfd, 0xeb]),
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StartTimer(Timer::IdleHold, s(1)),
                Action::StateChanged(State::OpenSent, State::Idle),
                Action::Down(DownReason::OpenRejected(err.clone())),
            ]
        );
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(fsm.negotiated(), None);
        // On the wire: header (length 23, type 3), code 2, subcode 2, data = AS field 65003.
        let Action::Send(n) = &out[0] else {
            unreachable!()
        };
        let mut want = vec![0xff; 16];
        want.extend_from_slice(&[0, 23, 3, 2, 2, 0xfd, 0xeb]);
        assert_eq!(encode(n), want);
        assert_eq!(
            DownReason::OpenRejected(err).to_string(),
            "sent NOTIFICATION OPEN Message Error / Bad Peer AS (2/2), data 0xfdeb: peer \
             announced AS 65003 but AS 65002 is configured for it: fix the peer's AS number \
             on one side"
        );
    }

    #[test]
    fn received_bad_peer_as_is_reported_clearly() {
        let mut fsm = open_sent(ebgp());
        let out = fsm.handle(notif_ev(2, 2));
        let reason = down_reason(&out).unwrap();
        assert_eq!(
            reason.to_string(),
            "received NOTIFICATION OPEN Message Error / Bad Peer AS (2/2)"
        );
        assert_eq!(
            reason.notification_received(),
            Some(&Notification::new(2, 2, Vec::new()))
        );
        assert_eq!(reason.notification_sent(), None);
        assert!(!out.iter().any(|a| matches!(a, Action::Send(_))));
    }

    #[test]
    fn hold_time_1_or_2_is_rejected_with_2_6_and_0_or_3_accepted() {
        for hold in [1, 2] {
            let mut fsm = open_sent(ebgp());
            let out = fsm.handle(open_ev(peer_open(65002, hold, PEER_ID)));
            assert_eq!(out[0], send_notif(2, 6, &[]), "hold {hold}");
            assert_eq!(
                down_reason(&out),
                Some(&DownReason::OpenRejected(OpenError::UnacceptableHoldTime(
                    hold
                )))
            );
            assert_eq!(fsm.state(), State::Idle);
        }
        for hold in [0, 3] {
            let mut fsm = open_sent(ebgp());
            let _ = fsm.handle(open_ev(peer_open(65002, hold, PEER_ID)));
            assert_eq!(fsm.state(), State::OpenConfirm, "hold {hold}");
            assert_eq!(fsm.negotiated().unwrap().hold_time, hold);
        }
    }

    #[test]
    fn bgp_identifier_zero_or_ours_on_ibgp_is_rejected_with_2_3() {
        let mut fsm = open_sent(ebgp());
        let out = fsm.handle(open_ev(peer_open(65002, 90, Ipv4Addr::UNSPECIFIED)));
        assert_eq!(out[0], send_notif(2, 3, &[]));
        assert_eq!(fsm.state(), State::Idle);

        let mut fsm = open_sent(ibgp());
        let out = fsm.handle(open_ev(peer_open(65001, 90, LOCAL_ID)));
        assert_eq!(out[0], send_notif(2, 3, &[]));
        assert_eq!(
            down_reason(&out).unwrap().to_string(),
            "sent NOTIFICATION OPEN Message Error / Bad BGP Identifier (2/3): peer's BGP \
             identifier 10.0.0.1 is ours on an iBGP session: give each router a unique router ID"
        );

        // RFC 6286 §2.2: the same identifier is fine between different ASes.
        let mut fsm = open_sent(ebgp());
        let _ = fsm.handle(open_ev(peer_open(65002, 90, LOCAL_ID)));
        assert_eq!(fsm.state(), State::OpenConfirm);
    }

    #[test]
    fn ibgp_session_is_flagged_not_ebgp() {
        let fsm = established(ibgp(), 90);
        assert!(!fsm.negotiated().unwrap().ebgp);
    }

    // ---- hold time negotiation ----

    #[test]
    fn hold_time_is_the_smaller_offer_and_keepalive_a_third() {
        for (ours, theirs, hold, ka) in [
            (240, 90, 90, s(30)),
            (60, 240, 60, s(20)),
            (240, 240, 240, s(80)),
            (240, 100, 100, Duration::from_secs(100) / 3),
            (3, 240, 3, s(1)),
        ] {
            let mut fsm = open_sent(FsmConfig {
                hold_time: ours,
                ..ebgp()
            });
            let out = fsm.handle(open_ev(peer_open(65002, theirs, PEER_ID)));
            let n = fsm.negotiated().unwrap();
            assert_eq!((n.hold_time, n.keepalive), (hold, ka), "{ours}/{theirs}");
            assert!(out.contains(&Action::StartTimer(Timer::Hold, s(u64::from(hold)))));
            assert!(out.contains(&Action::StartTimer(Timer::Keepalive, ka)));
        }
    }

    #[test]
    fn hold_time_zero_from_either_side_means_no_hold_and_no_keepalive_timers() {
        for (ours, theirs) in [(240, 0), (0, 90), (0, 0)] {
            let mut fsm = open_sent(FsmConfig {
                hold_time: ours,
                ..ebgp()
            });
            assert_eq!(
                fsm.handle(open_ev(peer_open(65002, theirs, PEER_ID))),
                vec![
                    Action::Send(Message::Keepalive),
                    Action::StopTimer(Timer::Hold),
                    Action::StateChanged(State::OpenSent, State::OpenConfirm),
                ],
                "{ours}/{theirs}"
            );
            let n = fsm.negotiated().unwrap().clone();
            assert_eq!((n.hold_time, n.keepalive), (0, Duration::ZERO));
            assert_eq!(
                fsm.handle(keepalive()),
                vec![
                    Action::StateChanged(State::OpenConfirm, State::Established),
                    Action::Established(n),
                ]
            );
            // Nothing is running, so nothing fires, and traffic restarts nothing.
            for ev in [
                Event::KeepaliveTimerExpires,
                Event::HoldTimerExpires,
                keepalive(),
            ] {
                assert_eq!(fsm.handle(ev), vec![]);
            }
            assert_eq!(fsm.state(), State::Established);
        }
    }

    #[test]
    fn configured_hold_time_1_or_2_is_offered_as_3() {
        let cfg = FsmConfig {
            hold_time: 2,
            ..ebgp()
        };
        assert_eq!(cfg.check(), Err(ConfigError::HoldTime(2)));
        assert_eq!(cfg.open().hold_time, 3);
    }

    // ---- timers ----

    #[test]
    fn hold_timer_expiry_in_open_sent_sends_4_0_and_closes() {
        let mut fsm = open_sent(ebgp());
        let out = fsm.handle(Event::HoldTimerExpires);
        assert_eq!(
            out,
            vec![
                send_notif(4, 0, &[]),
                Action::CloseConnection,
                Action::StartTimer(Timer::IdleHold, s(1)),
                Action::StateChanged(State::OpenSent, State::Idle),
                Action::Down(DownReason::HoldTimerExpired { hold_time: 240 }),
            ]
        );
        assert_eq!(
            down_reason(&out).unwrap().to_string(),
            "hold timer expired: nothing received from the peer for 240 s (sent NOTIFICATION \
             Hold Timer Expired (4/0))"
        );
    }

    #[test]
    fn hold_timer_expiry_in_open_confirm_and_established_sends_4_0_and_closes() {
        for mut fsm in [open_confirm(ebgp(), 90), established(ebgp(), 90)] {
            let from = fsm.state();
            assert_eq!(
                fsm.handle(Event::HoldTimerExpires),
                vec![
                    send_notif(4, 0, &[]),
                    Action::CloseConnection,
                    Action::StopTimer(Timer::Keepalive),
                    Action::StartTimer(Timer::IdleHold, s(1)),
                    Action::StateChanged(from, State::Idle),
                    Action::Down(DownReason::HoldTimerExpired { hold_time: 90 }),
                ]
            );
            assert_eq!(fsm.negotiated(), None);
        }
    }

    #[test]
    fn keepalive_timer_sends_keepalive_and_rearms() {
        for mut fsm in [open_confirm(ebgp(), 90), established(ebgp(), 90)] {
            assert_eq!(
                fsm.handle(Event::KeepaliveTimerExpires),
                vec![
                    Action::Send(Message::Keepalive),
                    Action::StartTimer(Timer::Keepalive, s(30)),
                ]
            );
        }
    }

    #[test]
    fn keepalive_and_update_restart_the_hold_timer_in_established() {
        let mut fsm = established(ebgp(), 90);
        assert_eq!(
            fsm.handle(keepalive()),
            vec![Action::StartTimer(Timer::Hold, s(90))]
        );
        let u = Update {
            nlri: vec!["10.65.0.0/26".parse().unwrap()],
            ..Update::default()
        };
        assert_eq!(
            fsm.handle(Event::Message(Message::Update(u.clone()))),
            vec![Action::StartTimer(Timer::Hold, s(90)), Action::Deliver(u)]
        );
    }

    #[test]
    fn stale_timer_ticks_are_ignored() {
        let mut fsm = Fsm::new(ebgp());
        for ev in [
            Event::ConnectRetryTimerExpires,
            Event::HoldTimerExpires,
            Event::KeepaliveTimerExpires,
            Event::IdleHoldTimerExpires,
        ] {
            assert_eq!(fsm.handle(ev), vec![]);
        }
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(fsm.handle(Event::HoldTimerExpires), vec![]);
        assert_eq!(fsm.handle(Event::KeepaliveTimerExpires), vec![]);
        let _ = fsm.handle(Event::TcpConnected);
        assert_eq!(fsm.handle(Event::ConnectRetryTimerExpires), vec![]);
        assert_eq!(fsm.handle(Event::KeepaliveTimerExpires), vec![]);
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn no_connect_retry_timer_bounds_an_attempt_in_connect() {
        // The driver times the attempt out and reports TcpFailed; a stale tick changes
        // nothing (the RFC would restart the attempt here).
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        assert!(!fsm.timer_running(Timer::ConnectRetry));
        assert_eq!(fsm.handle(Event::ConnectRetryTimerExpires), vec![]);
        assert_eq!(fsm.state(), State::Connect);
    }

    // ---- unexpected messages (RFC 6608) ----

    #[test]
    fn unexpected_messages_get_the_fsm_error_subcode_of_the_state() {
        let rr = || {
            Event::Message(Message::RouteRefresh(RouteRefresh {
                family: V4,
                subtype: 0,
            }))
        };
        let update = || Event::Message(Message::Update(Update::default()));
        let cases: Vec<(Fsm, Event, u8)> = vec![
            (open_sent(ebgp()), keepalive(), 1),
            (open_sent(ebgp()), update(), 1),
            (open_sent(ebgp()), rr(), 1),
            (open_confirm(ebgp(), 90), update(), 2),
            (open_confirm(ebgp(), 90), rr(), 2),
            (
                open_confirm(ebgp(), 90),
                open_ev(peer_open(65002, 90, PEER_ID)),
                2,
            ),
            (
                established(ebgp(), 90),
                open_ev(peer_open(65002, 90, PEER_ID)),
                3,
            ),
        ];
        for (mut fsm, ev, sub) in cases {
            let from = fsm.state();
            let out = fsm.handle(ev);
            assert_eq!(out[0], send_notif(5, sub, &[]), "{from}");
            assert_eq!(out[1], Action::CloseConnection);
            assert!(out.contains(&Action::StateChanged(from, State::Idle)));
            assert_eq!(
                down_reason(&out),
                Some(&DownReason::NotificationSent(Notification::new(
                    5,
                    sub,
                    Vec::new()
                )))
            );
            assert!(idle_hold(&out).is_some());
        }
    }

    #[test]
    fn update_in_open_confirm_is_an_fsm_error_and_not_delivered() {
        let mut fsm = open_confirm(ebgp(), 90);
        let out = fsm.handle(Event::Message(Message::Update(Update::default())));
        assert_eq!(
            out,
            vec![
                send_notif(5, 2, &[]),
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StopTimer(Timer::Keepalive),
                Action::StartTimer(Timer::IdleHold, s(1)),
                Action::StateChanged(State::OpenConfirm, State::Idle),
                Action::Down(DownReason::NotificationSent(Notification::new(
                    5,
                    2,
                    Vec::new()
                ))),
            ]
        );
        assert_eq!(
            down_reason(&out).unwrap().to_string(),
            "sent NOTIFICATION Finite State Machine Error / Receive Unexpected Message in \
             OpenConfirm State (5/2)"
        );
    }

    // ---- NOTIFICATION received, decode errors ----

    #[test]
    fn notification_received_closes_without_reply_in_every_connected_state() {
        for mut fsm in [
            open_sent(ebgp()),
            open_confirm(ebgp(), 90),
            established(ebgp(), 90),
        ] {
            let from = fsm.state();
            let out = fsm.handle(notif_ev(6, 2));
            assert_eq!(out[0], Action::CloseConnection, "{from}");
            assert!(!out.iter().any(|a| matches!(a, Action::Send(_))));
            assert_eq!(
                out[out.len() - 2..],
                [
                    Action::StateChanged(from, State::Idle),
                    Action::Down(DownReason::NotificationReceived(Notification::new(
                        6,
                        2,
                        Vec::new()
                    ))),
                ]
            );
            assert_eq!(idle_hold(&out), Some(s(1)));
            assert_eq!(fsm.state(), State::Idle);
        }
    }

    #[test]
    fn messages_without_a_connection_are_ignored() {
        let mut idle = Fsm::new(ebgp());
        let mut connect = Fsm::new(ebgp());
        let _ = connect.handle(Event::ManualStart);
        let mut active = Fsm::new(FsmConfig {
            passive: true,
            ..ebgp()
        });
        let _ = active.handle(Event::ManualStart);
        for fsm in [&mut idle, &mut connect, &mut active] {
            let before = fsm.state();
            for ev in [
                notif_ev(6, 2),
                keepalive(),
                open_ev(peer_open(65002, 90, PEER_ID)),
                Event::DecodeError(Notification::new(1, 1, Vec::new())),
                Event::CollisionLost,
            ] {
                assert_eq!(fsm.handle(ev), vec![], "{before}");
            }
            assert_eq!(fsm.state(), before);
        }
    }

    #[test]
    fn decode_error_is_sent_and_the_session_closed() {
        let mut fsm = established(ebgp(), 90);
        let n = Notification::new(3, 1, Vec::new());
        assert_eq!(
            fsm.handle(Event::DecodeError(n.clone())),
            vec![
                Action::Send(Message::Notification(n.clone())),
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StopTimer(Timer::Keepalive),
                Action::StartTimer(Timer::IdleHold, s(1)),
                Action::StateChanged(State::Established, State::Idle),
                Action::Down(DownReason::NotificationSent(n)),
            ]
        );
    }

    // ---- TCP failures ----

    #[test]
    fn tcp_failure_in_connect_waits_in_active_and_retries_on_the_timer() {
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(
            fsm.handle(Event::TcpFailed),
            vec![
                Action::CloseConnection,
                Action::StartTimer(Timer::ConnectRetry, s(5)),
                Action::StateChanged(State::Connect, State::Active),
            ]
        );
        // A late failure report in Active changes nothing.
        assert_eq!(fsm.handle(Event::TcpFailed), vec![]);
        assert_eq!(
            fsm.handle(Event::ConnectRetryTimerExpires),
            vec![
                Action::Connect,
                Action::StateChanged(State::Active, State::Connect),
            ]
        );
        // The peer may also connect to us while we wait.
        let _ = fsm.handle(Event::TcpFailed);
        let _ = fsm.handle(Event::TcpAccepted);
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn tcp_failure_in_open_sent_goes_to_active_as_rfc_4271_says() {
        let mut fsm = open_sent(ebgp());
        assert_eq!(
            fsm.handle(Event::TcpFailed),
            vec![
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StartTimer(Timer::ConnectRetry, s(5)),
                Action::StateChanged(State::OpenSent, State::Active),
            ]
        );
        assert_eq!(fsm.side(), None);
    }

    #[test]
    fn tcp_failure_in_established_goes_down_and_restarts_after_the_idle_hold() {
        let mut fsm = established(ebgp(), 90);
        assert_eq!(
            fsm.handle(Event::TcpFailed),
            vec![
                Action::CloseConnection,
                Action::StopTimer(Timer::Hold),
                Action::StopTimer(Timer::Keepalive),
                Action::StartTimer(Timer::IdleHold, s(1)),
                Action::StateChanged(State::Established, State::Idle),
                Action::Down(DownReason::TcpFailed),
            ]
        );
        // AutomaticStart does not cut the hold-down short...
        assert_eq!(fsm.handle(Event::AutomaticStart), vec![]);
        // ...its expiry restarts the session.
        assert_eq!(
            fsm.handle(Event::IdleHoldTimerExpires),
            vec![
                Action::Connect,
                Action::StateChanged(State::Idle, State::Connect),
            ]
        );
    }

    #[test]
    fn tcp_failure_in_open_confirm_goes_down() {
        let mut fsm = open_confirm(ebgp(), 90);
        let out = fsm.handle(Event::TcpFailed);
        assert_eq!(down_reason(&out), Some(&DownReason::TcpFailed));
        assert_eq!(fsm.state(), State::Idle);
    }

    // ---- idle hold-down backoff ----

    /// Drives one failed attempt from Idle (after the hold-down) and returns the hold-down the
    /// failure started.
    fn fail_once(fsm: &mut Fsm) -> Option<Duration> {
        let ev = if fsm.timer_running(Timer::IdleHold) {
            Event::IdleHoldTimerExpires
        } else {
            Event::ManualStart
        };
        let _ = fsm.handle(ev);
        let _ = fsm.handle(Event::TcpConnected);
        let out = fsm.handle(open_ev(peer_open(65009, 90, PEER_ID)));
        idle_hold(&out)
    }

    #[test]
    fn idle_hold_doubles_up_to_the_max_and_resets_after_established() {
        let mut fsm = Fsm::new(ebgp());
        let holds: Vec<u64> = (0..9)
            .map(|_| fail_once(&mut fsm).unwrap().as_secs())
            .collect();
        assert_eq!(holds, [1, 2, 4, 8, 16, 32, 60, 60, 60]);

        // A session that reaches Established resets the backoff.
        let _ = fsm.handle(Event::IdleHoldTimerExpires);
        let _ = fsm.handle(Event::TcpConnected);
        let _ = fsm.handle(open_ev(peer_open(65002, 90, PEER_ID)));
        let _ = fsm.handle(keepalive());
        assert_eq!(fsm.state(), State::Established);
        let out = fsm.handle(Event::TcpFailed);
        assert_eq!(idle_hold(&out), Some(s(1)));
        assert_eq!(fail_once(&mut fsm), Some(s(2)));
    }

    #[test]
    fn idle_hold_respects_configured_base_and_max() {
        let mut fsm = Fsm::new(FsmConfig {
            idle_hold_base: Duration::from_millis(300),
            idle_hold_max: s(1),
            ..ebgp()
        });
        let holds: Vec<Duration> = (0..4).map(|_| fail_once(&mut fsm).unwrap()).collect();
        assert_eq!(
            holds,
            [
                Duration::from_millis(300),
                Duration::from_millis(600),
                s(1),
                s(1)
            ]
        );
    }

    #[test]
    fn manual_start_during_idle_hold_starts_at_once_and_resets_backoff() {
        let mut fsm = Fsm::new(ebgp());
        let _ = fail_once(&mut fsm);
        let _ = fail_once(&mut fsm);
        assert_eq!(fsm.next_idle_hold(), s(4));
        assert_eq!(
            fsm.handle(Event::ManualStart),
            vec![
                Action::StopTimer(Timer::IdleHold),
                Action::Connect,
                Action::StateChanged(State::Idle, State::Connect),
            ]
        );
        assert_eq!(fsm.next_idle_hold(), s(1));
    }

    // ---- ConnectRetry backoff ----

    /// One failed attempt from Connect: the ConnectRetry delay it started; then the timer's
    /// expiry, which makes the next attempt.
    fn refused(fsm: &mut Fsm) -> Duration {
        failed_with(fsm, Event::TcpFailed)
    }

    /// As [`refused`], the attempt ending with `ev` (`TcpFailed` or `TcpRefused`).
    fn failed_with(fsm: &mut Fsm, ev: Event) -> Duration {
        let out = fsm.handle(ev);
        let d = out.iter().find_map(|a| match a {
            Action::StartTimer(Timer::ConnectRetry, d) => Some(*d),
            _ => None,
        });
        assert_eq!(fsm.state(), State::Active);
        assert_eq!(
            fsm.handle(Event::ConnectRetryTimerExpires),
            vec![
                Action::Connect,
                Action::StateChanged(State::Active, State::Connect)
            ]
        );
        d.expect("ConnectRetry started")
    }

    fn bring_up(fsm: &mut Fsm) {
        let _ = fsm.handle(Event::TcpConnected);
        let _ = fsm.handle(open_ev(peer_open(65002, 90, PEER_ID)));
        let _ = fsm.handle(keepalive());
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn connect_retry_backs_off_exponentially_to_the_cap_and_resets_at_established() {
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        let delays: Vec<u64> = (0..9).map(|_| refused(&mut fsm).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 120, 120, 120, 120]);
        assert_eq!(fsm.connect_failures(), 9);

        // A connection that closes before the peer's OPEN is a failure too.
        let _ = fsm.handle(Event::TcpConnected);
        let out = fsm.handle(Event::TcpFailed);
        assert!(out.contains(&Action::StartTimer(Timer::ConnectRetry, s(120))));
        let _ = fsm.handle(Event::ConnectRetryTimerExpires);
        assert_eq!(fsm.connect_failures(), 10);

        bring_up(&mut fsm);
        assert_eq!(fsm.connect_failures(), 0);
        // Down again: after the idle hold-down the backoff starts over.
        let _ = fsm.handle(Event::TcpFailed);
        let _ = fsm.handle(Event::IdleHoldTimerExpires);
        assert_eq!(fsm.state(), State::Connect);
        let delays: Vec<u64> = (0..3).map(|_| refused(&mut fsm).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20]);

        // ManualStart resets it as well.
        let _ = fsm.handle(Event::ManualStop);
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(fsm.connect_failures(), 0);
        assert_eq!(refused(&mut fsm), s(5));
    }

    #[test]
    fn refusals_are_retried_sooner_three_times_then_the_backoff_goes_on_from_its_base() {
        let ms = |d: Duration| d.as_millis() as u64;
        // Refused every time: 1, 2, 4 s, then 5, 10, 20 ... 120 s.
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        let delays: Vec<u64> = (0..9)
            .map(|_| ms(failed_with(&mut fsm, Event::TcpRefused)))
            .collect();
        assert_eq!(
            delays,
            [
                1000, 2000, 4000, 5000, 10_000, 20_000, 40_000, 80_000, 120_000
            ]
        );
        assert_eq!((fsm.connect_failures(), fsm.quick_retries()), (9, 3));

        // Timeouts keep the normal backoff; a refusal after them gets a quick retry (the
        // host is back, its BGP daemon not yet), the next failure goes on where the backoff was.
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        let mut delays: Vec<u64> = (0..3)
            .map(|_| ms(failed_with(&mut fsm, Event::TcpFailed)))
            .collect();
        delays.push(ms(failed_with(&mut fsm, Event::TcpRefused)));
        delays.push(ms(failed_with(&mut fsm, Event::TcpFailed)));
        assert_eq!(delays, [5000, 10_000, 20_000, 1000, 40_000]);

        // Reset at Established: the next refusals are quick again.
        bring_up(&mut fsm);
        assert_eq!(fsm.quick_retries(), 0);
        let _ = fsm.handle(Event::TcpFailed);
        let _ = fsm.handle(Event::IdleHoldTimerExpires);
        assert_eq!(ms(failed_with(&mut fsm, Event::TcpRefused)), 1000);

        // Never longer than `connect_retry`: with a short base the quick retries are the base.
        let mut fsm = Fsm::new(FsmConfig {
            connect_retry: Duration::from_millis(300),
            connect_retry_max: s(1),
            ..ebgp()
        });
        let _ = fsm.handle(Event::ManualStart);
        let delays: Vec<u64> = (0..6)
            .map(|_| ms(failed_with(&mut fsm, Event::TcpRefused)))
            .collect();
        assert_eq!(delays, [300, 300, 300, 300, 600, 1000]);

        // Resumed by a new task: the count of quick retries goes on.
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        fsm.resume_connect_failures(2);
        fsm.resume_quick_retries(2);
        assert_eq!(ms(failed_with(&mut fsm, Event::TcpRefused)), 4000);
        assert_eq!(ms(failed_with(&mut fsm, Event::TcpRefused)), 5000);

        // A refusal reported outside Connect is a plain failure.
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        let _ = fsm.handle(Event::TcpConnected);
        assert_eq!(fsm.state(), State::OpenSent);
        let out = fsm.handle(Event::TcpRefused);
        assert!(
            out.contains(&Action::StartTimer(Timer::ConnectRetry, s(5))),
            "{out:?}"
        );
    }

    #[test]
    fn connect_retry_backoff_respects_configured_base_and_cap() {
        let mut fsm = Fsm::new(FsmConfig {
            connect_retry: Duration::from_millis(300),
            connect_retry_max: s(1),
            ..ebgp()
        });
        let _ = fsm.handle(Event::ManualStart);
        let delays: Vec<Duration> = (0..4).map(|_| refused(&mut fsm)).collect();
        assert_eq!(
            delays,
            [
                Duration::from_millis(300),
                Duration::from_millis(600),
                s(1),
                s(1)
            ]
        );
        assert_eq!(connect_backoff(s(5), s(120), 0), s(5));
        assert_eq!(connect_backoff(s(5), s(120), u32::MAX), s(120));
    }

    #[test]
    fn connect_retry_jitter_cuts_up_to_a_quarter_and_is_reproducible_per_seed() {
        let delays = |seed| {
            let mut fsm = Fsm::new(FsmConfig {
                jitter_seed: Some(seed),
                ..ebgp()
            });
            let _ = fsm.handle(Event::ManualStart);
            (0..40).map(|_| refused(&mut fsm)).collect::<Vec<_>>()
        };
        let a = delays(1);
        for (i, d) in a.iter().enumerate() {
            let nominal = connect_backoff(s(5), s(120), i as u32 + 1);
            assert!(
                *d <= nominal && *d >= nominal * 3 / 4,
                "{i}: {d:?} of {nominal:?}"
            );
        }
        // Jittered, not constant: the capped delays differ from each other.
        let capped: std::collections::BTreeSet<Duration> = a[10..].iter().copied().collect();
        assert!(capped.len() > 20, "{capped:?}");
        assert_eq!(a, delays(1));
        assert_ne!(a, delays(2));
    }

    #[test]
    fn inbound_connection_is_accepted_during_the_backoff() {
        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        for _ in 0..5 {
            let _ = refused(&mut fsm);
        }
        let _ = fsm.handle(Event::TcpFailed);
        let out = fsm.handle(Event::TcpAccepted);
        assert_eq!(out[0], Action::StopTimer(Timer::ConnectRetry));
        assert_eq!(fsm.state(), State::OpenSent);
        let _ = fsm.handle(open_ev(peer_open(65002, 90, PEER_ID)));
        let _ = fsm.handle(keepalive());
        assert_eq!(fsm.state(), State::Established);
        assert_eq!(fsm.connect_failures(), 0);
    }

    #[test]
    fn config_check_rejects_a_connect_retry_above_its_cap_or_zero() {
        let bad = FsmConfig {
            connect_retry: s(10),
            connect_retry_max: s(5),
            ..ebgp()
        };
        assert!(matches!(bad.check(), Err(ConfigError::ConnectRetry { .. })));
        let zero = FsmConfig {
            connect_retry: Duration::ZERO,
            ..ebgp()
        };
        assert!(zero.check().is_err());
        assert_eq!(ebgp().check(), Ok(()));
    }

    // ---- ManualStop ----

    #[test]
    fn manual_stop_from_idle_connect_and_active() {
        let mut fsm = Fsm::new(ebgp());
        assert_eq!(fsm.handle(Event::ManualStop), vec![]);

        let mut fsm = Fsm::new(ebgp());
        let _ = fail_once(&mut fsm);
        assert_eq!(
            fsm.handle(Event::ManualStop),
            vec![Action::StopTimer(Timer::IdleHold)]
        );

        let mut fsm = Fsm::new(ebgp());
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(
            fsm.handle(Event::ManualStop),
            vec![
                Action::CloseConnection,
                Action::StateChanged(State::Connect, State::Idle),
                Action::Down(DownReason::ManualStop),
            ]
        );

        let mut fsm = Fsm::new(ebgp());
        let _ = run(&mut fsm, [Event::ManualStart, Event::TcpFailed]);
        assert_eq!(
            fsm.handle(Event::ManualStop),
            vec![
                Action::StopTimer(Timer::ConnectRetry),
                Action::StateChanged(State::Active, State::Idle),
                Action::Down(DownReason::ManualStop),
            ]
        );
    }

    #[test]
    fn manual_stop_with_a_connection_sends_cease_admin_shutdown_and_no_hold_down() {
        let cases: Vec<(Fsm, Vec<Action>)> = vec![
            (open_sent(ebgp()), vec![Action::StopTimer(Timer::Hold)]),
            (
                open_confirm(ebgp(), 90),
                vec![
                    Action::StopTimer(Timer::Hold),
                    Action::StopTimer(Timer::Keepalive),
                ],
            ),
            (
                established(ebgp(), 90),
                vec![
                    Action::StopTimer(Timer::Hold),
                    Action::StopTimer(Timer::Keepalive),
                ],
            ),
        ];
        for (mut fsm, stops) in cases {
            let from = fsm.state();
            let mut want = vec![send_notif(6, 2, &[]), Action::CloseConnection];
            want.extend(stops);
            want.push(Action::StateChanged(from, State::Idle));
            want.push(Action::Down(DownReason::ManualStop));
            assert_eq!(fsm.handle(Event::ManualStop), want, "{from}");
        }
    }

    #[test]
    fn after_manual_stop_the_fsm_stays_idle_until_manual_start() {
        let mut fsm = established(ebgp(), 90);
        let _ = fsm.handle(Event::ManualStop);
        for ev in [
            Event::AutomaticStart,
            Event::IdleHoldTimerExpires,
            Event::ConnectRetryTimerExpires,
            Event::HoldTimerExpires,
            Event::KeepaliveTimerExpires,
            keepalive(),
            Event::TcpFailed,
        ] {
            assert_eq!(fsm.handle(ev), vec![]);
        }
        // Connections are refused.
        assert_eq!(
            fsm.handle(Event::TcpAccepted),
            vec![Action::CloseConnection]
        );
        assert_eq!(fsm.state(), State::Idle);
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(fsm.state(), State::Connect);
    }

    // ---- collisions ----

    #[test]
    fn collision_loser_closes_the_connection_of_the_lower_identifier() {
        let low = Ipv4Addr::new(10, 0, 0, 1);
        let high = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(collision_loser(low, high), ConnectionSide::Outbound);
        assert_eq!(collision_loser(high, low), ConnectionSide::Inbound);
        // Compared as host-order u32, not octet by octet in the wrong order.
        assert_eq!(
            collision_loser(Ipv4Addr::new(1, 0, 0, 255), Ipv4Addr::new(2, 0, 0, 0)),
            ConnectionSide::Outbound
        );
        assert_eq!(
            collision_loser(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(10, 255, 255, 255)
            ),
            ConnectionSide::Inbound
        );
        assert_eq!(collision_loser(low, low), ConnectionSide::Inbound);
        // RFC 6286 §2.3: equal identifiers, the larger AS's connection survives.
        assert_eq!(
            collision_loser_with_as(low, 65001, low, 65002),
            ConnectionSide::Outbound
        );
        assert_eq!(
            collision_loser_with_as(low, 65002, low, 65001),
            ConnectionSide::Inbound
        );
        assert_eq!(
            collision_loser_with_as(low, 65002, high, 65001),
            ConnectionSide::Outbound
        );
    }

    #[test]
    fn collision_check_by_state() {
        for st in [State::Idle, State::Connect, State::Active, State::OpenSent] {
            assert_eq!(collision_check(st), CollisionCheck::NotApplicable);
        }
        assert_eq!(collision_check(State::OpenConfirm), CollisionCheck::ByBgpId);
        assert_eq!(
            collision_check(State::Established),
            CollisionCheck::NewConnectionLoses
        );
    }

    #[test]
    fn collision_between_two_fsms_resolved_the_way_a_driver_would() {
        for (peer_id, loser_side) in [
            (Ipv4Addr::new(10, 0, 0, 9), ConnectionSide::Outbound),
            (Ipv4Addr::new(10, 0, 0, 0), ConnectionSide::Inbound),
        ] {
            // Outbound connection reaches OpenConfirm.
            let mut out_fsm = open_sent(ebgp());
            let _ = out_fsm.handle(open_ev(peer_open(65002, 90, peer_id)));
            // The peer's own connection arrives and gets its own FSM.
            let (mut in_fsm, acts) = Fsm::accept(ebgp());
            assert_eq!(in_fsm.state(), State::OpenSent);
            assert_eq!(in_fsm.side(), Some(ConnectionSide::Inbound));
            assert!(acts.contains(&Action::Send(Message::Open(ebgp().open()))));
            let _ = in_fsm.handle(open_ev(peer_open(65002, 90, peer_id)));
            assert_eq!(in_fsm.state(), State::OpenConfirm);

            assert_eq!(collision_check(out_fsm.state()), CollisionCheck::ByBgpId);
            let remote = in_fsm.negotiated().unwrap().peer_id;
            let side = collision_loser(LOCAL_ID, remote);
            assert_eq!(side, loser_side);
            let (loser, winner) = if out_fsm.side() == Some(side) {
                (&mut out_fsm, &mut in_fsm)
            } else {
                (&mut in_fsm, &mut out_fsm)
            };
            let out = loser.handle(Event::CollisionLost);
            assert_eq!(
                out,
                vec![
                    send_notif(6, 7, &[]),
                    Action::CloseConnection,
                    Action::StopTimer(Timer::Hold),
                    Action::StopTimer(Timer::Keepalive),
                    Action::StateChanged(State::OpenConfirm, State::Idle),
                    Action::Down(DownReason::CollisionLost),
                ]
            );
            assert!(!DownReason::CollisionLost.is_error());
            let _ = winner.handle(keepalive());
            assert_eq!(winner.state(), State::Established);
            assert_eq!(
                winner.side(),
                Some(loser_side).map(|s| match s {
                    ConnectionSide::Outbound => ConnectionSide::Inbound,
                    ConnectionSide::Inbound => ConnectionSide::Outbound,
                })
            );
        }
    }

    // ---- 4-octet AS (RFC 6793) ----

    #[test]
    fn four_octet_as_both_sides() {
        let cfg = FsmConfig::new(4_200_000_001, 4_200_000_002, LOCAL_ID);
        let ours = cfg.open();
        assert_eq!(ours.my_as, AS_TRANS);
        assert_eq!(ours.four_octet_as(), Some(4_200_000_001));

        let mut fsm = open_sent(cfg);
        let theirs = peer_open(4_200_000_002, 90, PEER_ID);
        assert_eq!(theirs.my_as, AS_TRANS);
        let _ = fsm.handle(open_ev(theirs));
        let n = fsm.negotiated().unwrap();
        assert_eq!(n.peer_as, 4_200_000_002);
        assert!(n.codec.four_octet_as);
    }

    #[test]
    fn two_octet_only_peer_gets_two_octet_codec_and_ipv4_unicast_only() {
        let mut fsm = open_sent(ebgp());
        let _ = fsm.handle(open_ev(bare_open(65002, 90, PEER_ID)));
        let n = fsm.negotiated().unwrap();
        assert_eq!(n.peer_as, 65002);
        assert!(!n.codec.four_octet_as);
        assert_eq!(n.families, vec![V4]);
        assert!(!n.route_refresh);
    }

    #[test]
    fn four_octet_remote_as_cannot_match_a_two_octet_only_peer() {
        let mut fsm = open_sent(FsmConfig::new(65001, 4_200_000_002, LOCAL_ID));
        let out = fsm.handle(open_ev(bare_open(AS_TRANS, 90, PEER_ID)));
        assert_eq!(out[0], send_notif(2, 2, &AS_TRANS.to_be_bytes()));
    }

    #[test]
    fn four_octet_peer_with_wrong_as_gets_bad_peer_as_with_as_trans_in_the_data() {
        let mut fsm = open_sent(ebgp());
        let out = fsm.handle(open_ev(peer_open(4_200_000_002, 90, PEER_ID)));
        assert_eq!(out[0], send_notif(2, 2, &[0x5b, 0xa0]));
        assert!(
            down_reason(&out)
                .unwrap()
                .to_string()
                .contains("peer announced AS 4200000002 but AS 65002 is configured")
        );
    }

    #[test]
    fn capability_as_wins_over_an_inconsistent_two_octet_field() {
        // RFC 6793 prescribes no error here; BIRD and GoBGP accept it, so do we.
        let mut theirs = peer_open(65002, 90, PEER_ID);
        theirs.my_as = 65009;
        let mut fsm = open_sent(ebgp());
        let _ = fsm.handle(open_ev(theirs));
        assert_eq!(fsm.negotiated().unwrap().peer_as, 65002);
    }

    // ---- capabilities ----

    #[test]
    fn families_are_the_intersection_in_our_order() {
        let mut fsm = open_sent(FsmConfig {
            families: vec![V6, V4, V6],
            ..ebgp()
        });
        let _ = fsm.handle(open_ev(peer_open(65002, 90, PEER_ID)));
        assert_eq!(fsm.negotiated().unwrap().families, vec![V6, V4]);

        let mut fsm = open_sent(ebgp());
        let theirs = Open::new(65002, 90, PEER_ID, vec![Capability::Multiprotocol(V6)]);
        let _ = fsm.handle(open_ev(theirs));
        assert_eq!(fsm.negotiated().unwrap().families, vec![V6]);
    }

    #[test]
    fn no_configured_families_announces_no_multiprotocol_and_means_ipv4() {
        let cfg = FsmConfig {
            families: Vec::new(),
            ..ebgp()
        };
        assert!(
            !cfg.open()
                .capabilities
                .iter()
                .any(|c| matches!(c, Capability::Multiprotocol(_)))
        );
        let mut fsm = open_sent(cfg);
        let _ = fsm.handle(open_ev(peer_open(65002, 90, PEER_ID)));
        assert_eq!(fsm.negotiated().unwrap().families, vec![V4]);
    }

    #[test]
    fn graceful_restart_is_announced_and_the_peers_is_reported() {
        let gr = GracefulRestartCap {
            restart_state: false,
            notification: false,
            restart_time: 120,
            families: vec![GrFamily {
                family: V4,
                forwarding_state: true,
            }],
        };
        let cfg = FsmConfig {
            graceful_restart: Some(gr.clone()),
            ..ebgp()
        };
        assert!(
            cfg.open()
                .capabilities
                .contains(&Capability::GracefulRestart(gr.clone()))
        );
        let mut fsm = open_sent(cfg);
        let mut theirs = peer_open(65002, 90, PEER_ID);
        theirs
            .capabilities
            .push(Capability::GracefulRestart(gr.clone()));
        let _ = fsm.handle(open_ev(theirs));
        assert_eq!(fsm.negotiated().unwrap().peer_graceful_restart, Some(gr));
    }

    #[test]
    fn graceful_restart_capability_changes_apply_to_the_next_open() {
        let mut gr = GracefulRestartCap {
            restart_state: true,
            notification: false,
            restart_time: 120,
            families: vec![GrFamily {
                family: V4,
                forwarding_state: true,
            }],
        };
        let mut fsm = Fsm::new(FsmConfig {
            graceful_restart: Some(gr.clone()),
            ..ebgp()
        });
        let sent_open = |actions: Vec<Action>| {
            actions.into_iter().find_map(|a| match a {
                Action::Send(Message::Open(o)) => o.graceful_restart().cloned(),
                _ => None,
            })
        };
        let _ = fsm.handle(Event::ManualStart);
        assert_eq!(sent_open(fsm.handle(Event::TcpConnected)), Some(gr.clone()));
        let _ = fsm.handle(Event::TcpFailed);
        gr.restart_state = false;
        fsm.set_graceful_restart(Some(gr.clone()));
        let _ = fsm.handle(Event::ConnectRetryTimerExpires);
        assert_eq!(sent_open(fsm.handle(Event::TcpConnected)), Some(gr));
    }

    #[test]
    fn route_refresh_requests_for_negotiated_families_only() {
        let rr = |family, subtype| {
            Event::Message(Message::RouteRefresh(RouteRefresh { family, subtype }))
        };
        let mut fsm = established(ebgp(), 90);
        assert_eq!(
            fsm.handle(rr(V6, 0)),
            vec![
                Action::StartTimer(Timer::Hold, s(90)),
                Action::RouteRefreshRequested(V6),
            ]
        );
        // Not negotiated, or RFC 7313 BoRR: ignored (but the peer is alive).
        let l2vpn = Family { afi: 25, safi: 65 };
        assert_eq!(
            fsm.handle(rr(l2vpn, 0)),
            vec![Action::StartTimer(Timer::Hold, s(90))]
        );
        assert_eq!(
            fsm.handle(rr(V4, 1)),
            vec![Action::StartTimer(Timer::Hold, s(90))]
        );
        // We did not announce route refresh: ignored.
        let mut fsm = established(
            FsmConfig {
                route_refresh: false,
                ..ebgp()
            },
            90,
        );
        assert!(fsm.negotiated().is_some_and(|n| !n.route_refresh));
        assert_eq!(
            fsm.handle(rr(V4, 0)),
            vec![Action::StartTimer(Timer::Hold, s(90))]
        );
    }

    #[test]
    fn end_of_rib_is_delivered_unchanged() {
        let mut fsm = established(ebgp(), 90);
        for family in [V4, V6] {
            let eor = Update::end_of_rib(family);
            let out = fsm.handle(Event::Message(Message::Update(eor.clone())));
            let Some(Action::Deliver(got)) = out.last() else {
                panic!("no Deliver in {out:?}");
            };
            assert_eq!(got, &eor);
            assert_eq!(got.end_of_rib_family(), Some(family));
        }
        // An UPDATE with routes is not End-of-RIB.
        let u = Update {
            mp_reach: Some(MpReach {
                family: V6,
                next_hop: NextHop::new("fd00::1".parse().unwrap()),
                nlri: vec!["fd00:10::/122".parse().unwrap()],
            }),
            ..Update::default()
        };
        let out = fsm.handle(Event::Message(Message::Update(u)));
        assert!(matches!(out.last(), Some(Action::Deliver(u)) if u.end_of_rib_family().is_none()));
    }

    #[test]
    fn end_of_rib_from_the_wire_is_recognised_after_delivery() {
        // An IPv6 End-of-RIB as GoBGP sends it: UPDATE with only an empty MP_UNREACH_NLRI.
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&[0xff; 16]);
        wire.extend_from_slice(&[0, 29, 2, 0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1]);
        let msg = decode_message(&mut wire, CodecContext::default())
            .unwrap()
            .unwrap();
        let mut fsm = established(ebgp(), 90);
        let out = fsm.handle(Event::Message(msg));
        assert!(
            matches!(out.last(), Some(Action::Deliver(u)) if u.end_of_rib_family() == Some(V6))
        );
    }

    // ---- config, constructors ----

    #[test]
    fn config_check_names_what_is_wrong() {
        assert_eq!(ebgp().check(), Ok(()));
        let cases = [
            (
                FsmConfig {
                    local_as: 0,
                    ..ebgp()
                },
                "local AS 0 is reserved (RFC 7607): configure this node's AS number",
            ),
            (
                FsmConfig {
                    remote_as: 0,
                    ..ebgp()
                },
                "remote AS 0 is reserved (RFC 7607): configure the peer's AS number",
            ),
            (
                FsmConfig::new(65001, 65002, Ipv4Addr::UNSPECIFIED),
                "local BGP identifier 0.0.0.0 is not allowed: configure a non-zero router ID",
            ),
            (
                FsmConfig {
                    hold_time: 1,
                    ..ebgp()
                },
                "hold time 1 s is not allowed: use 0 (no keepalives) or 3 s or more \
                 (RFC 4271 §4.2)",
            ),
            (
                FsmConfig {
                    idle_hold_base: s(10),
                    idle_hold_max: s(5),
                    ..ebgp()
                },
                "idle hold base 10s is longer than idle hold max 5s: lower the base",
            ),
        ];
        for (cfg, msg) in cases {
            assert_eq!(cfg.check().unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn defaults_match_calico_bird() {
        let cfg = FsmConfig::default();
        assert_eq!(cfg.hold_time, 240);
        assert_eq!(cfg.connect_retry, s(5));
        assert_eq!((cfg.idle_hold_base, cfg.idle_hold_max), (s(1), s(60)));
        assert_eq!(cfg.families, vec![V4, V6]);
        assert!(cfg.route_refresh && !cfg.passive);
    }

    #[test]
    fn down_reasons_display_clearly() {
        assert_eq!(
            DownReason::ManualStop.to_string(),
            "stopped by the operator"
        );
        assert_eq!(
            DownReason::TcpFailed.to_string(),
            "TCP connection failed or closed by the peer"
        );
        assert_eq!(
            DownReason::CollisionLost.to_string(),
            "closed to resolve a connection collision (sent NOTIFICATION Cease / Connection \
             Collision Resolution (6/7))"
        );
        assert_eq!(
            DownReason::OpenRejected(OpenError::UnacceptableHoldTime(2)).to_string(),
            "sent NOTIFICATION OPEN Message Error / Unacceptable Hold Time (2/6): peer proposed \
             hold time 2 s; only 0 or 3 s and more are allowed"
        );
        assert_eq!(
            DownReason::OpenRejected(OpenError::BadBgpId(Ipv4Addr::UNSPECIFIED)).to_string(),
            "sent NOTIFICATION OPEN Message Error / Bad BGP Identifier (2/3): peer's BGP \
             identifier is 0.0.0.0"
        );
        assert_eq!(
            DownReason::HoldTimerExpired { hold_time: 9 }.notification_sent(),
            Some(Notification::new(4, 0, Vec::new()))
        );
        assert!(DownReason::TcpFailed.is_error() && !DownReason::ManualStop.is_error());
    }
}
