//! The speaker: a listener, one session task per peer, and one core task that owns the RIB.
//!
//! Everything routing-related lives in the core task (no locks around routing state); the
//! agent talks to it through [`Speaker`], a cheap handle over a bounded command channel, and
//! consumes best-path changes from the receiver returned by [`Speaker::start`].
//!
//! # Graceful restart (RFC 4724)
//!
//! **As helper** (receiving speaker), per peer, with a [`GrHelper`]: when an Established
//! session with a peer that advertised the graceful restart capability ends *without a
//! NOTIFICATION* (TCP closed or reset, or the peer opened a new session with the Restart
//! State bit while the old one was still up), and we advertise the capability too
//! ([`SpeakerConfig::graceful_restart_time`]), the peer's routes of the families listed in its
//! capability stay in the Loc-RIB marked stale ([`BestRoute::stale`]). They remain best-path
//! candidates, so the best-change stream reports nothing and the agent keeps its kernel
//! routes. The restart timer runs for the peer's advertised restart time, capped by
//! [`PeerConfig::max_restart_time`]; if it expires first, every stale route goes. When the peer
//! is back, a family whose Forwarding State bit is clear in the new OPEN (or missing, or no
//! capability at all) is swept at once; the others wait for the peer's End-of-RIB, then what
//! was not re-announced is removed (bounded by [`PeerConfig::stale_routes_time`]). A session
//! that ends again meanwhile keeps everything stale and starts over. Any NOTIFICATION, sent or
//! received (Hold Timer Expired, Cease, errors), removes the routes at once: RFC 8538's N bit
//! is not implemented. A peer removed or reconfigured through the API loses its routes at once.
//! Sweeps are reported on the best-change stream like any withdrawal.
//!
//! **As restarting speaker**, with [`SpeakerConfig::restarting`] (the process restarted and
//! the kernel kept its routes): the OPENs carry the Restart State bit (R) while the selection
//! deferral lasts, and the Forwarding State bit (F) for every family. During the deferral
//! (RFC 4724 §4.1) the speaker learns routes but sends the agent no best-path change and the
//! peers no UPDATE; it ends when every configured peer is Established and each graceful
//! restart peer that is not restarting itself has sent End-of-RIB for all its families, or when
//! [`SpeakerConfig::selection_deferral`] runs out. With [`SpeakerConfig::initial_config_barrier`]
//! the deferral also waits for [`Speaker::initial_config_done`]: "every peer configured" then
//! means every peer of the caller's first full configuration, not only those added so far, and
//! our own originated routes (announced before the barrier) go out before our End-of-RIB. Then the agent gets one batch with the best
//! route of every prefix learned meanwhile, each Established peer gets our full table and
//! End-of-RIB, and [`Speaker::converged`] turns true. Without `restarting` there is no
//! deferral and `converged` is true from the start.
//!
//! The R bit thus means "this process has just restarted and is still deferring": it is set
//! in every OPEN sent before the deferral ends, normally only the first session with each
//! peer, and never after. The F bit is set when this process has kept forwarding state for the
//! peer: always with `restarting`, otherwise from the second session with a peer on (a session
//! that merely flapped; the first session after a cold start says F = 0, so a helper drops
//! whatever it kept from our previous life).
//!
//! # Connecting to many peers
//!
//! Outbound connection attempts are bounded speaker-wide
//! ([`SpeakerConfig::max_connects_in_flight`]; the others wait their turn, peers likely to
//! answer first: [`PeerConfig::connect_priority`], see [`crate::connect`]) and each is cut
//! after [`SpeakerConfig::connect_timeout`]. A peer that refuses or
//! does not answer is retried after an exponential backoff with jitter (the FSM's
//! ConnectRetry: [`SpeakerConfig::connect_retry`] doubling up to
//! [`SpeakerConfig::connect_retry_max`], reset when a session reaches Established). Its
//! status shows the failures in a row and the next attempt ([`PeerStatus::connect_failures`],
//! [`PeerStatus::next_retry`]); [`Speaker::summary`] counts peers by state and the attempts in
//! flight. A connection the peer opens to us is accepted at any time, backoff or not.
//!
//! A peer has a session task only while it has something to do: a connection, an attempt
//! with its turn, or a session that is up or coming up. A peer waiting for its first turn,
//! backing off after failures, or passive and never connected to, is a compact record in the
//! core; its task is started when its turn comes or when it connects to us, and ends again
//! (parks) when all it has left is to wait out a backoff ([`SpeakerSummary::session_tasks`]).
//!
//! To restart without the peers dropping our routes, stop with
//! [`Speaker::shutdown_for_restart`] (no NOTIFICATION) rather than [`Speaker::shutdown`]
//! (Cease, which ends graceful restart on the peers).
//!
//! # Many peers
//!
//! The core task imports every UPDATE the sessions have queued (up to a bound) and then
//! exports once: best-path changes to the agent in one message, and per update group (peers
//! with the same export policy, see [`crate::rib`]) one encoded buffer that every member's
//! session writes, minus the routes it sent us. A session task writes whatever is queued for
//! it with one `writev`. A route reflector with a thousand clients thus encodes each burst
//! once and makes a few system calls per client, not one per UPDATE per client.

use crate::best_changes::{BestChangeSender, BestChanges};
use crate::connect::{ConnectLimiter, ConnectPriority, ConnectTurn, WaitKey};
use crate::fsm::{FsmConfig, State};
use crate::gr::{
    DEFAULT_MAX_RESTART_TIME, DEFAULT_SELECTION_DEFERRAL, DeferralPeer, GrAction, GrEvent,
    GrHelper, GrHelperConfig, GrPhase, GrTimer, deferral_complete,
};
use crate::policy::{ExportRules, PrefixFilter};
use crate::rib::{
    BestChange, BestRoute, Export, GroupExport, LOCAL, PeerId, Pending, Rib, RibOutput, RibPeer,
};
use crate::session::{self, Parked, Resume, SessionCmd, SessionEvent, SessionParams};
use crate::wire::{
    CodecContext, Family, GrFamily, GracefulRestartCap, Notification, PathAttrs, UpdateEncoder,
    cease,
};
use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Speaker-wide settings.
#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Where to accept BGP connections (port 179 in production); `None` = no listener.
    pub listen: Option<SocketAddr>,
    /// Route-reflector cluster ID (defaults to the router ID).
    pub cluster_id: Option<Ipv4Addr>,
    /// Hold time offered to peers (Calico's BIRD: 240 s, keepalive 80 s).
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// Graceful restart time to advertise (RFC 4724), seconds (at most 4095); `None` = no
    /// graceful restart capability, which also means we keep no peer's routes across its
    /// restart. Calico: 120 s.
    pub graceful_restart_time: Option<u16>,
    /// This process restarted and the kernel kept its routes (RFC 4724 §4.1, restarting
    /// speaker): set R and F in the first OPENs and defer best-path output and
    /// advertisements (see the module docs). R and F need `graceful_restart_time`; the
    /// deferral happens either way. Default false.
    pub restarting: bool,
    /// Longest selection deferral when `restarting` (RFC 4724's Selection_Deferral_Timer).
    /// Default 5 s.
    pub selection_deferral: Duration,
    /// The selection deferral of a restarting speaker also waits for
    /// [`Speaker::initial_config_done`] (still bounded by `selection_deferral`). Set it when
    /// peers and own routes are configured one call at a time after the start, so that the
    /// deferral cannot end on the End-of-RIB of the first peers alone. Default false.
    pub initial_config_barrier: bool,
    /// Longest ConnectRetry backoff (the retry delay starts at `connect_retry` and doubles
    /// with each failure in a row). Default 120 s.
    pub connect_retry_max: Duration,
    /// How long one outbound connection attempt may take once it has its turn. Default 5 s.
    pub connect_timeout: Duration,
    /// Most outbound connection attempts in flight at once, all peers together (at least 1).
    /// Default 64.
    pub max_connects_in_flight: usize,
    /// Seed of the ConnectRetry jitter (each peer's own is derived from it and its address);
    /// `None`: from the clock. Set it for reproducible tests.
    pub jitter_seed: Option<u64>,
    /// First retry after a refused connection attempt (the host answered, nothing listens:
    /// typically a peer restarting), doubling for the first [`crate::fsm::REFUSED_QUICK_RETRIES`]
    /// refusals in a row, never longer than `connect_retry` (see [`crate::fsm`]). Default 1 s.
    pub refused_retry: Duration,
    /// Most connections held from addresses that are not configured peers, while the initial
    /// configuration comes in (see [`Speaker::start_on`]). Default
    /// [`HELD_INBOUND_MAX`].
    pub held_inbound_max: usize,
    /// How long such a connection is held at most. Default [`HELD_INBOUND_MAX_AGE`].
    pub held_inbound_max_age: Duration,
    /// How long after [`Speaker::initial_config_done`] connections from addresses that are
    /// not peers are still held (a peer configured just after the first configuration
    /// still gets its connection). Default [`HELD_INBOUND_GRACE`].
    pub held_inbound_grace: Duration,
}

/// Default of [`SpeakerConfig::held_inbound_max`].
pub const HELD_INBOUND_MAX: usize = 32;
/// Default of [`SpeakerConfig::held_inbound_max_age`].
pub const HELD_INBOUND_MAX_AGE: Duration = Duration::from_secs(30);
/// Default of [`SpeakerConfig::held_inbound_grace`].
pub const HELD_INBOUND_GRACE: Duration = Duration::from_secs(5);

impl SpeakerConfig {
    pub fn new(local_as: u32, router_id: Ipv4Addr) -> Self {
        SpeakerConfig {
            local_as,
            router_id,
            listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 179)),
            cluster_id: None,
            hold_time: 240,
            connect_retry: Duration::from_secs(5),
            graceful_restart_time: Some(120),
            restarting: false,
            selection_deferral: DEFAULT_SELECTION_DEFERRAL,
            initial_config_barrier: false,
            connect_retry_max: crate::fsm::DEFAULT_CONNECT_RETRY_MAX,
            connect_timeout: Duration::from_secs(5),
            max_connects_in_flight: 64,
            jitter_seed: None,
            refused_retry: crate::fsm::DEFAULT_REFUSED_RETRY,
            held_inbound_max: HELD_INBOUND_MAX,
            held_inbound_max_age: HELD_INBOUND_MAX_AGE,
            held_inbound_grace: HELD_INBOUND_GRACE,
        }
    }
}

/// One neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub addr: IpAddr,
    /// Remote TCP port (179 unless set).
    pub port: u16,
    pub remote_as: u32,
    /// Source address for outgoing connections.
    pub local_addr: Option<IpAddr>,
    /// Never connect; wait for the peer.
    pub passive: bool,
    /// Overrides the speaker's hold time.
    pub hold_time: Option<u16>,
    pub rr_client: bool,
    pub next_hop_self: bool,
    pub families: Vec<Family>,
    /// IPv4 next hop we announce when we are the next hop (eBGP, next-hop-self, our own
    /// routes); defaults to the session's local address.
    pub local_v4_next_hop: Option<Ipv4Addr>,
    /// IPv6 next hop we announce for IPv6 routes when we are the next hop; defaults to the
    /// session's local address (IPv4-mapped on an IPv4 session, which BIRD and GoBGP refuse:
    /// set it whenever IPv6 routes are exchanged).
    pub local_v6_next_hop: Option<Ipv6Addr>,
    /// A label for status output (mesh, global, node...).
    pub kind: String,
    /// Cap on the restart time the peer advertises: how long at most we keep its routes
    /// while it restarts (Calico's BGPPeer `maxRestartTime`). `None`: 120 s.
    pub max_restart_time: Option<Duration>,
    /// How long stale routes may wait for the peer's End-of-RIB once it is back. `None`: the
    /// same as `max_restart_time`.
    pub stale_routes_time: Option<Duration>,
    /// Rules for the peer's announcements (see [`crate::policy`]); `None`: accept all.
    pub import_filter: Option<Arc<PrefixFilter>>,
    /// Rules for what the peer is sent, before the speaker's [`ExportRules`].
    pub export_filter: Option<Arc<PrefixFilter>>,
    /// Our AS on this session when not the speaker's (BIRD `local as`): in our OPEN, in
    /// what we prepend, and in loop detection.
    pub local_as: Option<u32>,
    /// Pass the next hop on unchanged towards this (eBGP) peer.
    pub next_hop_keep: bool,
    /// How often our AS may appear in a received AS_PATH (allowas-in); 0 = never.
    pub allow_own_as: u8,
    /// Interval between our KEEPALIVEs when shorter than a third of the hold time.
    pub keepalive_time: Option<Duration>,
    /// TCP-MD5 password (RFC 2385) of the session, at most 80 bytes: set on our outgoing
    /// connections and, for connections from the peer, on the listener.
    pub password: Option<Arc<[u8]>>,
    /// GTSM (RFC 5082): the peer is at most this many hops away. We send with TTL 255 and
    /// the kernel drops the peer's packets that arrive with a TTL below 256 - hops
    /// (`IP_MINTTL` / `IPV6_MINHOPCOUNT`).
    pub ttl_security: Option<u8>,
    /// Where the peer's outbound attempts queue while the bound on attempts in flight is
    /// reached. A change is applied to the running session without restarting it.
    pub connect_priority: ConnectPriority,
}

impl PeerConfig {
    pub fn new(addr: IpAddr, remote_as: u32) -> Self {
        PeerConfig {
            addr,
            port: 179,
            remote_as,
            local_addr: None,
            passive: false,
            hold_time: None,
            rr_client: false,
            next_hop_self: false,
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            local_v4_next_hop: None,
            local_v6_next_hop: None,
            kind: String::new(),
            max_restart_time: None,
            stale_routes_time: None,
            import_filter: None,
            export_filter: None,
            local_as: None,
            next_hop_keep: false,
            allow_own_as: 0,
            keepalive_time: None,
            password: None,
            ttl_security: None,
            connect_priority: ConnectPriority::Normal,
        }
    }

    /// What the RIB needs of this peer; `default_local` is the next hop we announce when
    /// none is configured.
    fn rib_peer(&self, default_local: IpAddr) -> RibPeer {
        RibPeer {
            addr: self.addr,
            remote_as: self.remote_as,
            local_addr: self
                .local_v4_next_hop
                .map(IpAddr::V4)
                .or(self.local_addr)
                .unwrap_or(default_local),
            local_v6_next_hop: self.local_v6_next_hop,
            rr_client: self.rr_client,
            next_hop_self: self.next_hop_self,
            import_filter: self.import_filter.clone(),
            export_filter: self.export_filter.clone(),
            local_as: self.local_as,
            next_hop_keep: self.next_hop_keep,
            allow_own_as: self.allow_own_as,
        }
    }

    fn gr_helper_config(&self, enabled: bool) -> GrHelperConfig {
        let max_restart_time = self.max_restart_time.unwrap_or(DEFAULT_MAX_RESTART_TIME);
        GrHelperConfig {
            enabled,
            max_restart_time,
            stale_time: self.stale_routes_time.unwrap_or(max_restart_time),
        }
    }
}

/// A peer's state as the agent and `podroute status` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub addr: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub kind: String,
    pub state: State,
    /// When the state last changed.
    pub since: SystemTime,
    pub established_count: u64,
    pub prefixes_received: usize,
    pub prefixes_accepted: usize,
    pub prefixes_advertised: usize,
    pub updates_received: u64,
    pub updates_sent: u64,
    pub notifications_received: u64,
    pub notifications_sent: u64,
    /// Announcements refused since the peer was configured, by reason: loop detection
    /// (AS_PATH with our AS, our ORIGINATOR_ID or CLUSTER_ID)...
    pub routes_rejected_loop: u64,
    /// ... and the peer's import filter...
    pub routes_rejected_filter: u64,
    /// ... and RFC 7606 treat-as-withdraw (a malformed attribute, or a peer check such as a
    /// next hop of ours).
    pub routes_rejected_malformed: u64,
    /// The last reason the session went down or failed to come up.
    pub last_error: Option<String>,
    /// Families the peer has sent End-of-RIB for since the session came up.
    pub end_of_rib: Vec<Family>,
    /// Graceful restart with this peer: `Some` when we advertise the capability and the peer
    /// did in its last OPEN, or while its routes are stale.
    pub graceful_restart: Option<GrStatus>,
    /// Outbound connection attempts made (counted as each ends: connected, refused, timed
    /// out...).
    pub connect_attempts: u64,
    /// Connections or attempts that failed in a row since the last Established session.
    pub connect_failures: u32,
    /// When the next outbound attempt is due, while backing off.
    pub next_retry: Option<SystemTime>,
}

/// The speaker at a glance, for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpeakerSummary {
    /// Configured peers by session state.
    pub peers_by_state: BTreeMap<State, usize>,
    /// Peers waiting out a ConnectRetry backoff after at least one failure.
    pub peers_backing_off: usize,
    /// Outbound connection attempts in flight now, and the bound.
    pub connects_in_flight: usize,
    pub max_connects_in_flight: usize,
    /// Most attempts ever in flight at once (never above the bound).
    pub connects_in_flight_peak: usize,
    /// Attempts waiting for their turn.
    pub connects_waiting: usize,
    /// Outbound connection attempts started since the speaker started.
    pub connect_attempts: u64,
    /// Peers with a session task running (the others wait for a turn, back off, or wait for
    /// the peer as a compact record: see the module docs).
    pub session_tasks: usize,
}

/// Graceful restart (RFC 4724) with one peer, we being the helper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrStatus {
    pub phase: GrPhase,
    /// The peer's capability from its last OPEN: restart time, Restart State (R) and
    /// Notification (N) bits, and the families with their Forwarding State (F) bits.
    pub peer_capability: Option<GracefulRestartCap>,
    /// How long we wait for the peer to come back: its restart time, capped by
    /// [`PeerConfig::max_restart_time`].
    pub restart_time: Option<Duration>,
    /// The peer's routes kept stale (not re-announced since its restart).
    pub stale_prefixes: usize,
    pub stale_families: Vec<Family>,
    /// When the stale routes go if the peer is not back (restart timer), while it is down.
    pub restart_deadline: Option<SystemTime>,
    /// When the stale routes go if the peer's End-of-RIB has not come (stale timer).
    pub stale_deadline: Option<SystemTime>,
}

/// Errors from the speaker API.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("cannot listen for BGP on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer {0} is already configured")]
    PeerExists(IpAddr),
    #[error("peer {0} is not configured")]
    NoSuchPeer(IpAddr),
    #[error("the BGP speaker has stopped")]
    Stopped,
}

enum Command {
    AddPeer(PeerConfig, oneshot::Sender<Result<(), SpeakerError>>),
    SetPeer(PeerConfig, oneshot::Sender<Result<(), SpeakerError>>),
    RemovePeer(IpAddr, oneshot::Sender<Result<(), SpeakerError>>),
    Announce(IpNet, Option<IpAddr>, PathAttrs),
    Withdraw(IpNet),
    ExportRules(Option<ExportRules>),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    LocRib(oneshot::Sender<Vec<(IpNet, BestRoute)>>),
    Summary(oneshot::Sender<SpeakerSummary>),
    /// The caller's first full configuration is in (see `initial_config_barrier`).
    InitialConfigDone,
    Inbound(tokio::net::TcpStream, SocketAddr),
    /// `true`: close sessions without NOTIFICATION (for a restart).
    Shutdown(bool, oneshot::Sender<()>),
}

/// Handle to a running speaker.
#[derive(Clone, Debug)]
pub struct Speaker {
    tx: mpsc::Sender<Command>,
    listen: Option<SocketAddr>,
    converged: watch::Receiver<bool>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Speaker {
    /// Start the listener and the core task. Returns the handle and the stream of best-path
    /// changes of learned routes.
    pub async fn start(cfg: SpeakerConfig) -> Result<(Speaker, BestChanges), SpeakerError> {
        let listener = match cfg.listen {
            Some(addr) => Some(Arc::new(
                bind(addr).map_err(|source| SpeakerError::Listen { addr, source })?,
            )),
            None => None,
        };
        Ok(Self::start_with(cfg, listener, Vec::new()))
    }

    /// [`Speaker::start`] on a listener that was opened before the configuration was known
    /// ([`EarlyListener`]): the connections it holds are held on by the speaker until a
    /// configured peer has the address they come from (they are handed to its session), or
    /// until [`SpeakerConfig::held_inbound_grace`] after [`Speaker::initial_config_done`]
    /// (without [`SpeakerConfig::initial_config_barrier`]: after the start), or
    /// [`SpeakerConfig::held_inbound_max_age`] after they arrived; then they are closed.
    /// `cfg.listen` is ignored.
    pub async fn start_on(
        cfg: SpeakerConfig,
        early: EarlyListener,
    ) -> Result<(Speaker, BestChanges), SpeakerError> {
        let (listener, held) = early.into_parts().await;
        Ok(Self::start_with(cfg, Some(listener), held))
    }

    fn start_with(
        cfg: SpeakerConfig,
        listener: Option<Arc<TcpListener>>,
        held: Vec<HeldInbound>,
    ) -> (Speaker, BestChanges) {
        let (tx, rx) = mpsc::channel(1024);
        // Coalesced per prefix: never blocks the core (an agent busy calling the API can
        // never deadlock it), and bounded by the RIB's prefixes however slow the agent is.
        let (best_tx, best_rx) = crate::best_changes::channel();
        let mut listen = None;
        let mut listener_task = None;
        let listener_socket = listener.clone();
        if let Some(listener) = listener {
            listen = listener.local_addr().ok();
            info!(addr = ?listen, "BGP listening");
            let tx = tx.clone();
            listener_task = Some(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, remote)) => {
                            if tx.send(Command::Inbound(stream, remote)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
        let (converged_tx, converged) = watch::channel(!cfg.restarting);
        if cfg.restarting {
            info!(
                deferral = ?cfg.selection_deferral,
                "restarting: best-path selection and advertisements deferred (RFC 4724)"
            );
        }
        let mut core = Core::new(cfg, best_tx, converged_tx);
        core.listener = listener_task;
        core.listener_socket = listener_socket;
        if !held.is_empty() {
            info!(
                held = held.len(),
                "connections accepted before the start held until their peers are configured"
            );
            if core.config_complete {
                core.hold_until = Some(Instant::now() + core.cfg.held_inbound_grace);
            }
            core.held = held;
            core.held.truncate(core.cfg.held_inbound_max);
        }
        tokio::spawn(core.run(rx));
        (
            Speaker {
                tx,
                listen,
                converged,
            },
            best_rx,
        )
    }

    /// Whether the initial best-path selection is done: `false` while a restarting speaker
    /// defers it ([`SpeakerConfig::restarting`]), then `true` for good (always `true` without
    /// `restarting`). Every best-change batch of the deferred selection is queued in the
    /// best-change receiver before this turns `true`, so an agent that sees `true` and drains
    /// the receiver (`try_recv` until empty) has the complete post-restart view and may then
    /// remove the kernel routes that are not in it. Wait with `converged().wait_for(|c| *c)`.
    pub fn converged(&self) -> watch::Receiver<bool> {
        self.converged.clone()
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }

    pub async fn add_peer(&self, cfg: PeerConfig) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::AddPeer(cfg, t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)?
    }

    /// Add a peer or replace its configuration. An unchanged configuration leaves the session
    /// alone; a changed one restarts it (Cease / Other Configuration Change).
    pub async fn set_peer(&self, cfg: PeerConfig) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::SetPeer(cfg, t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)?
    }

    pub async fn remove_peer(&self, addr: IpAddr) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::RemovePeer(addr, t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)?
    }

    /// Originate `prefix` (next hop: ourselves unless given).
    pub async fn announce(
        &self,
        prefix: IpNet,
        next_hop: Option<IpAddr>,
    ) -> Result<(), SpeakerError> {
        self.send(Command::Announce(prefix, next_hop, PathAttrs::default()))
            .await
    }

    /// Originate `prefix` with the given attributes (origin, communities, MED...).
    pub async fn announce_with(
        &self,
        prefix: IpNet,
        next_hop: Option<IpAddr>,
        attrs: PathAttrs,
    ) -> Result<(), SpeakerError> {
        self.send(Command::Announce(prefix, next_hop, attrs)).await
    }

    pub async fn withdraw(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.send(Command::Withdraw(prefix)).await
    }

    /// Set the speaker-wide export policy (`None`: announce whatever the protocol's rules
    /// allow). Every peer is sent the difference at once.
    pub async fn set_export_rules(&self, rules: Option<ExportRules>) -> Result<(), SpeakerError> {
        self.send(Command::ExportRules(rules)).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Peers(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Peers by state and outbound connection attempts (see the module docs).
    pub async fn summary(&self) -> Result<SpeakerSummary, SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Summary(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Every peer the caller will have at start and its own routes are configured (call it
    /// after the last `set_peer`/`announce` of the first full configuration). With
    /// [`SpeakerConfig::initial_config_barrier`], a restarting speaker's selection deferral
    /// cannot end before this, except by its timer; otherwise this does nothing. Commands
    /// are handled in order, so everything announced before this call is sent before our
    /// End-of-RIB.
    pub async fn initial_config_done(&self) -> Result<(), SpeakerError> {
        self.send(Command::InitialConfigDone).await
    }

    /// The Loc-RIB: best route per prefix (peer = [`LOCAL`] for our own).
    pub async fn loc_rib(&self) -> Result<Vec<(IpNet, BestRoute)>, SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::LocRib(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Stop every session with Cease / Administrative Shutdown and end the speaker. The
    /// peers drop our routes at once.
    pub async fn shutdown(&self) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Shutdown(false, t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// End the speaker for a restart: close every session without a NOTIFICATION, as a
    /// crash would, so that peers doing graceful restart keep our routes until we are back
    /// (start the next speaker with [`SpeakerConfig::restarting`]). The listener is closed
    /// when this returns, so the next speaker can bind the same address.
    pub async fn shutdown_for_restart(&self) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Shutdown(true, t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    async fn send(&self, c: Command) -> Result<(), SpeakerError> {
        self.tx.send(c).await.map_err(|_| SpeakerError::Stopped)
    }
}

/// The address a connection came from as peers are configured: an IPv4 peer reaching a
/// dual-stack (`[::]`) listener shows up as `::ffff:a.b.c.d` and is the IPv4 peer.
fn peer_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address the listener's per-peer options (TCP-MD5) name a peer by: IPv4 peers in their
/// mapped form on an IPv6 (dual-stack) listener.
fn listener_ip(listener: &TcpListener, peer: IpAddr) -> IpAddr {
    match (listener.local_addr().map(|a| a.is_ipv6()), peer) {
        (Ok(true), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => peer,
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // Our SYN-ACKs go out with TTL 255 so that GTSM peers (RFC 5082) accept them; which
    // TTL a peer's segments must have is checked per connection once accepted.
    crate::sockopt::set_max_ttl(&socket, addr.is_ipv6())?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` takes IPv4 peers too (seen as `::ffff:a.b.c.d`, mapped back by `peer_ip`),
        // with TTL 255 for them as well.
        crate::sockopt::set_dual_stack(&socket)?;
        crate::sockopt::set_max_ttl(&socket, false)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A connection accepted from an address that is not (yet) a configured peer, held for a
/// while instead of being closed (see [`Speaker::start_on`]).
pub struct HeldInbound {
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    since: Instant,
}

/// The BGP listener opened before the speaker can start (the agent reads its datastore
/// first: local AS, router ID and peers come from there). Peers that connect meanwhile are
/// not refused: their connections are accepted and held (at most [`HELD_INBOUND_MAX`], each
/// for at most [`HELD_INBOUND_MAX_AGE`]; beyond the cap a connection is closed at once), and
/// [`Speaker::start_on`] takes the listener and the held connections over.
pub struct EarlyListener {
    listener: Arc<TcpListener>,
    held: Arc<std::sync::Mutex<Vec<HeldInbound>>>,
    /// The accept task; aborted when the listener is dropped or taken over.
    task: Option<JoinHandle<()>>,
}

impl Drop for EarlyListener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for EarlyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyListener")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl EarlyListener {
    /// Bind `addr` (with the socket options of the speaker's listener) and start holding the
    /// connections that arrive.
    pub fn bind(addr: SocketAddr) -> Result<EarlyListener, SpeakerError> {
        let listener =
            Arc::new(bind(addr).map_err(|source| SpeakerError::Listen { addr, source })?);
        let held: Arc<std::sync::Mutex<Vec<HeldInbound>>> = Arc::default();
        let (l, h) = (listener.clone(), held.clone());
        let task = tokio::spawn(async move {
            loop {
                let oldest = h.lock().map_or(None, |v| v.iter().map(|c| c.since).min());
                let expiry = oldest.map(|t| t + HELD_INBOUND_MAX_AGE);
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((stream, remote)) => {
                            let Ok(mut v) = h.lock() else { return };
                            if v.len() < HELD_INBOUND_MAX {
                                debug!(%remote, "connection held until the peers are configured");
                                v.push(HeldInbound { stream, remote, since: Instant::now() });
                            } else {
                                debug!(%remote, held = v.len(), "too many connections held: closed");
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    _ = sleep_until(expiry) => {
                        let now = Instant::now();
                        if let Ok(mut v) = h.lock() {
                            v.retain(|c| c.since + HELD_INBOUND_MAX_AGE > now);
                        }
                    }
                }
            }
        });
        Ok(EarlyListener {
            listener,
            held,
            task: Some(task),
        })
    }

    /// The address bound (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.held.lock().map_or(0, |v| v.len())
    }

    /// Close the listener and every connection held, and wait until the socket is closed.
    pub async fn close(self) {
        drop(self.into_parts().await);
    }

    async fn into_parts(mut self) -> (Arc<TcpListener>, Vec<HeldInbound>) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let held = self
            .held
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        (self.listener.clone(), held)
    }
}

struct PeerEntry {
    cfg: PeerConfig,
    status: PeerStatus,
    /// The session task's commands; `None` while the peer has no task (`dormant`).
    session: Option<mpsc::UnboundedSender<SessionCmd>>,
    /// Set exactly when `session` is `None`.
    dormant: Option<Dormant>,
    codec: CodecContext,
    families: Vec<Family>,
    /// A session is Established (set by the Established event, cleared by Down).
    up: bool,
    gr: GrHelper,
    /// Deadlines of the helper's timers, by [`GrTimer::index`].
    gr_timers: [Option<Instant>; 2],
    /// The graceful restart capability last given to the session task.
    gr_cap: Option<GracefulRestartCap>,
}

/// A peer without a session task: what the next task continues from, and its place in the
/// connect queue or the time its backoff ends.
struct Dormant {
    resume: Resume,
    retry_at: Option<Instant>,
    waiting: Option<WaitKey>,
}

struct Core {
    cfg: SpeakerConfig,
    rib: Rib,
    peers: HashMap<PeerId, PeerEntry>,
    by_addr: HashMap<IpAddr, PeerId>,
    next_id: PeerId,
    best_tx: BestChangeSender,
    ev_tx: mpsc::Sender<(PeerId, SessionEvent)>,
    ev_rx: Option<mpsc::Receiver<(PeerId, SessionEvent)>>,
    listener: Option<JoinHandle<()>>,
    /// The listening socket, for the per-peer TCP-MD5 keys of inbound connections.
    listener_socket: Option<Arc<TcpListener>>,
    /// Selection deferral of a restarting speaker is in progress.
    deferring: bool,
    deferral_deadline: Option<Instant>,
    /// Prefixes whose best path changed during the deferral.
    deferred: BTreeSet<IpNet>,
    converged_tx: watch::Sender<bool>,
    /// [`Speaker::initial_config_done`] was called, or no barrier is configured.
    config_complete: bool,
    limiter: Arc<ConnectLimiter>,
    /// Turns granted to dormant peers.
    grants_rx: Option<mpsc::UnboundedReceiver<(PeerId, ConnectTurn)>>,
    /// Dormant peers' backoff deadlines (entries of peers no longer waiting are skipped).
    retries: BTreeSet<(Instant, PeerId)>,
    /// Peers with a graceful restart timer running: the only ones the timer checks look at,
    /// so an event costs nothing per idle peer in a mesh of thousands.
    gr_armed: BTreeSet<PeerId>,
    /// Every peer's jitter seed is derived from this one.
    jitter_seed: u64,
    /// Connections from addresses that are not configured peers, held while the initial
    /// configuration comes in (see [`Speaker::start_on`]).
    held: Vec<HeldInbound>,
    /// Once the initial configuration is complete: until when such connections are held.
    hold_until: Option<Instant>,
}

/// The graceful restart capability we announce to a peer (see the module docs for R and F).
fn gr_capability(
    cfg: &SpeakerConfig,
    deferring: bool,
    families: &[Family],
    established_before: bool,
) -> Option<GracefulRestartCap> {
    cfg.graceful_restart_time.map(|t| GracefulRestartCap {
        restart_state: cfg.restarting && deferring,
        notification: false,
        restart_time: t.min(0x0fff),
        families: families
            .iter()
            .map(|&family| GrFamily {
                family,
                forwarding_state: cfg.restarting || established_before,
            })
            .collect(),
    })
}

/// A peer's jitter seed: the speaker's, mixed with the peer's address and port, so peers that
/// failed together spread their retries.
fn peer_seed(base: u64, addr: IpAddr, port: u16) -> u64 {
    let a = match addr {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    base ^ (a ^ (u64::from(port) << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A deadline as wall-clock time, for status output.
fn wall_clock(deadline: Option<Instant>) -> Option<SystemTime> {
    deadline.map(|d| SystemTime::now() + d.saturating_duration_since(Instant::now()))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Core {
    fn new(
        cfg: SpeakerConfig,
        best_tx: BestChangeSender,
        converged_tx: watch::Sender<bool>,
    ) -> Core {
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let (grants_tx, grants_rx) = mpsc::unbounded_channel();
        let deferring = cfg.restarting;
        Core {
            rib: Rib::new(cfg.local_as, cfg.router_id, cfg.cluster_id),
            deferral_deadline: deferring.then(|| Instant::now() + cfg.selection_deferral),
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: LOCAL + 1,
            best_tx,
            ev_tx,
            ev_rx: Some(ev_rx),
            listener: None,
            listener_socket: None,
            deferring,
            deferred: BTreeSet::new(),
            converged_tx,
            config_complete: !cfg.initial_config_barrier,
            limiter: Arc::new(ConnectLimiter::new(cfg.max_connects_in_flight, grants_tx)),
            grants_rx: Some(grants_rx),
            retries: BTreeSet::new(),
            gr_armed: BTreeSet::new(),
            held: Vec::new(),
            hold_until: None,
            jitter_seed: cfg.jitter_seed.unwrap_or_else(|| {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                (now.as_nanos() as u64) ^ (u64::from(u32::from(cfg.router_id)) << 32)
            }),
            cfg,
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let (Some(mut events), Some(mut grants)) = (self.ev_rx.take(), self.grants_rx.take())
        else {
            return;
        };
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown(for_restart, done)) => {
                        self.shutdown(for_restart).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c).await,
                    None => {
                        self.shutdown(false).await;
                        return;
                    }
                },
                Some(first) = events.recv() => self.events(first, &mut events).await,
                Some((id, turn)) = grants.recv() => self.granted(id, turn),
                _ = sleep_until(deadline) => self.fire_timers().await,
            }
        }
    }

    async fn shutdown(&mut self, for_restart: bool) {
        if let Some(l) = self.listener.take() {
            l.abort();
            let _ = l.await;
        }
        for (_, p) in self.peers.drain() {
            let cmd = if for_restart {
                SessionCmd::Abort
            } else {
                SessionCmd::Stop(Notification::cease(cease::ADMIN_SHUTDOWN))
            };
            if let Some(session) = &p.session {
                let _ = session.send(cmd);
            }
        }
        // Give the session tasks a moment to flush their NOTIFICATIONs (or close).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.gr_armed
            .iter()
            .filter_map(|id| self.peers.get(id))
            .flat_map(|p| p.gr_timers.iter().flatten())
            .chain(self.deferral_deadline.iter())
            .chain(self.retries.first().map(|(t, _)| t))
            .min()
            .copied()
            .into_iter()
            .chain(self.held_deadline())
            .min()
    }

    /// Whether a connection from an address that is not a peer is held now (else closed).
    fn holding(&self, now: Instant) -> bool {
        !self.config_complete || self.hold_until.is_some_and(|t| now < t)
    }

    /// When the next held connection is due to be closed.
    fn held_deadline(&self) -> Option<Instant> {
        let oldest = self.held.iter().map(|c| c.since).min()?;
        let by_age = oldest + self.cfg.held_inbound_max_age;
        Some(match self.hold_until {
            Some(t) if self.config_complete => by_age.min(t),
            _ => by_age,
        })
    }

    /// Close the held connections that are due.
    fn expire_held(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        let holding = self.holding(now);
        let max_age = self.cfg.held_inbound_max_age;
        self.held.retain(|c| {
            let keep = holding && c.since + max_age > now;
            if !keep {
                debug!(remote = %c.remote, "no peer configured for a held connection: closed");
            }
            keep
        });
    }

    /// A connection from an address that is not a configured peer: held while the initial
    /// configuration comes in (up to the cap), else closed.
    fn unknown_inbound(&mut self, stream: tokio::net::TcpStream, remote: SocketAddr) {
        let now = Instant::now();
        if self.holding(now) && self.held.len() < self.cfg.held_inbound_max {
            debug!(%remote, "connection from an address not configured yet: held");
            self.held.push(HeldInbound {
                stream,
                remote,
                since: now,
            });
        } else {
            debug!(%remote, "connection from an unconfigured address refused");
        }
    }

    /// Hand the held connections from a newly configured peer to its session.
    fn take_held(&mut self, id: PeerId, addr: IpAddr, md5: bool) {
        if self.held.is_empty() {
            return;
        }
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|c| peer_ip(c.remote.ip()) == addr);
        self.held = others;
        for c in mine {
            if md5 {
                // Accepted before the peer's TCP-MD5 key was on the listener: unauthenticated.
                debug!(remote = %c.remote, "held connection closed: the peer needs TCP-MD5");
                continue;
            }
            debug!(remote = %c.remote, "held connection handed to the newly configured peer");
            self.inbound(id, c.stream);
        }
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        self.expire_held(now);
        while let Some(&(t, id)) = self.retries.first() {
            if t > now {
                break;
            }
            self.retries.pop_first();
            self.request_turn(id, t);
        }
        if self.deferral_deadline.is_some_and(|d| d <= now) {
            if !self.config_complete {
                warn!(
                    deferral = ?self.cfg.selection_deferral,
                    "selection deferral timer expired before the initial configuration was \
                     complete: advertising what is configured so far"
                );
            }
            self.end_deferral("selection deferral timer expired").await;
        }
        let mut due = Vec::new();
        let mut disarmed = Vec::new();
        for &id in &self.gr_armed {
            let Some(p) = self.peers.get_mut(&id) else {
                disarmed.push(id);
                continue;
            };
            for t in GrTimer::ALL {
                if p.gr_timers[t.index()].is_some_and(|d| d <= now) {
                    p.gr_timers[t.index()] = None;
                    due.push((id, t));
                }
            }
            if p.gr_timers.iter().all(Option::is_none) {
                disarmed.push(id);
            }
        }
        for id in disarmed {
            self.gr_armed.remove(&id);
        }
        for (id, t) in due {
            let ev = match t {
                GrTimer::Restart => GrEvent::RestartTimerExpires,
                GrTimer::Stale => GrEvent::StaleTimerExpires,
            };
            if let Some(p) = self.peers.get(&id) {
                info!(peer = %p.cfg.addr, timer = ?t, stale = self.rib.stale_count(id),
                    "graceful restart timer expired: removing the peer's stale routes");
            }
            self.gr_event(id, ev).await;
        }
    }

    fn fsm_config(&self, p: &PeerConfig) -> FsmConfig {
        let mut f = FsmConfig::new(
            p.local_as.unwrap_or(self.cfg.local_as),
            p.remote_as,
            self.cfg.router_id,
        );
        f.keepalive_time = p.keepalive_time;
        f.hold_time = p.hold_time.unwrap_or(self.cfg.hold_time);
        f.connect_retry = self.cfg.connect_retry;
        f.connect_retry_max = self.cfg.connect_retry_max.max(self.cfg.connect_retry);
        f.refused_retry = self.cfg.refused_retry;
        f.jitter_seed = Some(peer_seed(self.jitter_seed, p.addr, p.port));
        f.passive = p.passive;
        f.families = p.families.clone();
        f.route_refresh = true;
        f.graceful_restart = gr_capability(&self.cfg, self.deferring, &p.families, false);
        f
    }

    async fn command(&mut self, c: Command) {
        match c {
            Command::AddPeer(cfg, reply) => {
                let _ = reply.send(self.add_peer(cfg));
            }
            Command::SetPeer(cfg, reply) => {
                let existing = self.by_addr.get(&cfg.addr).copied();
                let (unchanged, priority_only) = existing
                    .and_then(|id| self.peers.get(&id))
                    .map_or((false, false), |p| {
                        let mut same = cfg.clone();
                        same.connect_priority = p.cfg.connect_priority;
                        (p.cfg == cfg, p.cfg == same)
                    });
                let r = if unchanged {
                    Ok(())
                } else if let (true, Some(id)) = (priority_only, existing) {
                    self.set_priority(id, cfg.connect_priority);
                    Ok(())
                } else {
                    self.remove(cfg.addr, cease::OTHER_CONFIG_CHANGE).await;
                    self.add_peer(cfg)
                };
                let _ = reply.send(r);
            }
            Command::RemovePeer(addr, reply) => {
                let r = if self.remove(addr, cease::PEER_DECONFIGURED).await {
                    Ok(())
                } else {
                    Err(SpeakerError::NoSuchPeer(addr))
                };
                let _ = reply.send(r);
                self.check_deferral().await;
            }
            Command::Announce(prefix, nh, attrs) => {
                let out = self.rib.originate(prefix, nh, attrs);
                self.publish(out).await;
            }
            Command::Withdraw(prefix) => {
                let out = self.rib.withdraw_local(prefix);
                self.publish(out).await;
            }
            Command::ExportRules(rules) => {
                let out = self.rib.set_export_rules(rules);
                self.publish(out).await;
            }
            Command::Peers(reply) => {
                let mut v: Vec<PeerStatus> = self
                    .peers
                    .iter()
                    .map(|(id, p)| self.peer_status(*id, p))
                    .collect();
                v.sort_by_key(|a| a.addr);
                let _ = reply.send(v);
            }
            Command::LocRib(reply) => {
                let mut v: Vec<(IpNet, BestRoute)> = self.rib.loc_rib().collect();
                v.sort_by_key(|a| a.0);
                let _ = reply.send(v);
            }
            Command::Summary(reply) => {
                let _ = reply.send(self.summary());
            }
            Command::InitialConfigDone => {
                if !self.config_complete {
                    self.config_complete = true;
                    self.hold_until = Some(Instant::now() + self.cfg.held_inbound_grace);
                    info!(
                        peers = self.peers.len(),
                        deferring = self.deferring,
                        held = self.held.len(),
                        "initial configuration complete"
                    );
                    self.check_deferral().await;
                }
            }
            Command::Inbound(stream, remote) => match self.by_addr.get(&peer_ip(remote.ip())) {
                Some(&id) => self.inbound(id, stream),
                None => self.unknown_inbound(stream, remote),
            },
            Command::Shutdown(..) => {}
        }
    }

    fn summary(&self) -> SpeakerSummary {
        let mut s = SpeakerSummary::default();
        for p in self.peers.values() {
            *s.peers_by_state.entry(p.status.state).or_default() += 1;
            s.session_tasks += usize::from(p.session.is_some());
            if p.status.next_retry.is_some() && p.status.connect_failures > 0 {
                s.peers_backing_off += 1;
            }
        }
        let c = self.limiter.counts();
        s.connects_in_flight = c.in_flight;
        s.max_connects_in_flight = c.limit;
        s.connects_in_flight_peak = c.in_flight_max;
        s.connects_waiting = c.waiting;
        s.connect_attempts = c.attempts;
        s
    }

    fn peer_status(&self, id: PeerId, p: &PeerEntry) -> PeerStatus {
        let mut s = p.status.clone();
        let (r, a, adv) = self.rib.peer_counts(id);
        s.prefixes_received = r;
        s.prefixes_accepted = a;
        s.prefixes_advertised = adv;
        let stale = self.rib.stale_count(id);
        s.graceful_restart = (self.cfg.graceful_restart_time.is_some()
            && (p.gr.peer_cap().is_some() || stale > 0))
            .then(|| GrStatus {
                phase: p.gr.phase(),
                peer_capability: p.gr.peer_cap().cloned(),
                restart_time: p.gr.restart_time(),
                stale_prefixes: stale,
                stale_families: p.gr.stale_families().to_vec(),
                restart_deadline: wall_clock(p.gr_timers[GrTimer::Restart.index()]),
                stale_deadline: wall_clock(p.gr_timers[GrTimer::Stale.index()]),
            });
        s
    }

    /// Stop a peer's session with Cease / `subcode` and forget its routes (stale ones too).
    async fn remove(&mut self, addr: IpAddr, subcode: u8) -> bool {
        let Some(id) = self.by_addr.remove(&addr) else {
            return false;
        };
        self.gr_armed.remove(&id);
        if let Some(p) = self.peers.remove(&id) {
            if let Some(session) = &p.session {
                let _ = session.send(SessionCmd::Stop(Notification::cease(subcode)));
            }
            if let Some(key) = p.dormant.and_then(|d| d.waiting) {
                self.limiter.cancel(key);
            }
            if p.cfg.password.is_some()
                && let Some(l) = &self.listener_socket
                && let Err(e) = crate::sockopt::set_md5_key(l.as_ref(), listener_ip(l, addr), None)
            {
                warn!(peer = %addr, error = %e, "cannot remove the TCP-MD5 key from the listener");
            }
        }
        let out = self.rib.remove_peer(id);
        self.publish(out).await;
        true
    }

    fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), SpeakerError> {
        if self.by_addr.contains_key(&cfg.addr) {
            return Err(SpeakerError::PeerExists(cfg.addr));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.rib
            .add_peer(id, cfg.rib_peer(IpAddr::V4(self.cfg.router_id)));
        let gr_cap = gr_capability(&self.cfg, self.deferring, &cfg.families, false);
        // Connections from the peer need its key on the listener before they arrive.
        let mut key_error = None;
        if let (Some(key), Some(l)) = (&cfg.password, &self.listener_socket)
            && let Err(e) =
                crate::sockopt::set_md5_key(l.as_ref(), listener_ip(l, cfg.addr), Some(key))
        {
            warn!(peer = %cfg.addr, error = %e, "cannot set the TCP-MD5 key on the listener");
            key_error = Some(format!("TCP-MD5 key on the listener: {e}"));
        }
        let status = PeerStatus {
            addr: cfg.addr,
            port: cfg.port,
            remote_as: cfg.remote_as,
            kind: cfg.kind.clone(),
            // As a started FSM: waiting for its connect turn, or for the peer.
            state: if cfg.passive {
                State::Active
            } else {
                State::Connect
            },
            since: SystemTime::now(),
            established_count: 0,
            prefixes_received: 0,
            prefixes_accepted: 0,
            prefixes_advertised: 0,
            updates_received: 0,
            updates_sent: 0,
            notifications_received: 0,
            notifications_sent: 0,
            routes_rejected_loop: 0,
            routes_rejected_filter: 0,
            routes_rejected_malformed: 0,
            last_error: key_error,
            end_of_rib: Vec::new(),
            graceful_restart: None,
            connect_attempts: 0,
            connect_failures: 0,
            next_retry: None,
        };
        let gr = GrHelper::new(cfg.gr_helper_config(self.cfg.graceful_restart_time.is_some()));
        let (passive, addr, md5) = (cfg.passive, cfg.addr, cfg.password.is_some());
        self.by_addr.insert(cfg.addr, id);
        self.peers.insert(
            id,
            PeerEntry {
                cfg,
                status,
                session: None,
                dormant: Some(Dormant {
                    resume: Resume::default(),
                    retry_at: None,
                    waiting: None,
                }),
                codec: CodecContext::default(),
                families: Vec::new(),
                up: false,
                gr,
                gr_timers: [None; 2],
                gr_cap,
            },
        );
        if !passive {
            self.request_turn(id, Instant::now());
        }
        self.take_held(id, addr, md5);
        Ok(())
    }

    /// Queue a dormant peer for a connect turn (its backoff ended at `due`).
    fn request_turn(&mut self, id: PeerId, due: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(d) = p.dormant.as_mut() else { return };
        if d.retry_at.is_some_and(|t| t != due) || d.waiting.is_some() {
            // A stale deadline: the peer was given another one, or is queued already.
            return;
        }
        d.retry_at = None;
        d.waiting = Some(
            self.limiter
                .request(id, p.cfg.connect_priority, d.resume.failures > 0),
        );
    }

    /// A dormant peer's turn came: start its session with the turn in hand.
    fn granted(&mut self, id: PeerId, turn: ConnectTurn) {
        let queued = self
            .peers
            .get_mut(&id)
            .and_then(|p| p.dormant.as_mut())
            .and_then(|d| d.waiting.take())
            .is_some();
        if queued {
            self.spawn_session(id, Some(turn), None);
        }
        // Otherwise the peer went away or got a task meanwhile: the turn goes back.
    }

    /// A connection from the peer: to its task, or a new task for a dormant peer.
    fn inbound(&mut self, id: PeerId, stream: tokio::net::TcpStream) {
        let Some(p) = self.peers.get(&id) else { return };
        match &p.session {
            Some(session) => {
                let _ = session.send(SessionCmd::Inbound(stream));
            }
            None => self.spawn_session(id, None, Some(stream)),
        }
    }

    /// Where the peer's attempts queue from now on.
    fn set_priority(&mut self, id: PeerId, priority: ConnectPriority) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.cfg.connect_priority = priority;
        if let Some(session) = &p.session {
            let _ = session.send(SessionCmd::SetPriority(priority));
        }
        if let Some(key) = p.dormant.as_mut().and_then(|d| d.waiting.take()) {
            // Queue again at the new priority.
            self.limiter.cancel(key);
            self.request_turn(id, Instant::now());
        }
    }

    /// Start the session task of a dormant peer, with a connect turn or a connection from the
    /// peer.
    fn spawn_session(
        &mut self,
        id: PeerId,
        turn: Option<ConnectTurn>,
        inbound: Option<tokio::net::TcpStream>,
    ) {
        let Some(p) = self.peers.get(&id) else { return };
        if p.session.is_some() {
            return;
        }
        let mut fsm = self.fsm_config(&p.cfg);
        fsm.graceful_restart = p.gr_cap.clone();
        let mut params = SessionParams {
            id,
            remote: SocketAddr::new(p.cfg.addr, p.cfg.port),
            local_addr: p.cfg.local_addr,
            fsm,
            connect_timeout: self.cfg.connect_timeout,
            limiter: self.limiter.clone(),
            priority: p.cfg.connect_priority,
            resume: Resume::default(),
            md5_key: p.cfg.password.clone(),
            ttl_security: p.cfg.ttl_security,
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(dormant) = p.dormant.take() else {
            return;
        };
        if let Some(key) = dormant.waiting {
            self.limiter.cancel(key);
        }
        params.resume = dormant.resume;
        // Unbounded, but never long: the core must not wait on a session (the session waits
        // on the core's bounded event channel), and the session task moves each command on at
        // once; the bytes of UPDATEs then wait in the connection's writer queue, which is
        // bounded (`session::MAX_UNSENT_BYTES`: a peer that stops reading is disconnected).
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(stream) = inbound {
            let _ = tx.send(SessionCmd::Inbound(stream));
        }
        p.session = Some(tx);
        tokio::spawn(session::run(params, rx, self.ev_tx.clone(), turn));
    }

    /// A session task ended to back off without a task: keep the record, wake it at the end
    /// of the backoff (or at once for a connection that arrived meanwhile).
    fn parked(&mut self, id: PeerId, parked: Parked) {
        let Parked {
            resume,
            retry_at,
            mut cmds,
        } = parked;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.session = None;
        p.dormant = Some(Dormant {
            resume,
            retry_at: Some(retry_at),
            waiting: None,
        });
        let mut inbound = None;
        while let Ok(cmd) = cmds.try_recv() {
            // UPDATEs, Stop and Abort are for a session that is not up or a peer being
            // removed; the capability is given again at the next start.
            if let SessionCmd::Inbound(stream) = cmd {
                inbound = Some(stream);
            }
        }
        match inbound {
            Some(stream) => self.spawn_session(id, None, Some(stream)),
            None => {
                self.retries.insert((retry_at, id));
            }
        }
    }

    /// Handle `first` and whatever else the sessions have queued, up to a bound. Consecutive
    /// UPDATEs are imported one by one and exported together, once, so a burst from many peers
    /// costs one export per update group instead of one per UPDATE. Any other event exports
    /// what is pending first, so everything happens in arrival order as before.
    async fn events(
        &mut self,
        first: (PeerId, SessionEvent),
        events: &mut mpsc::Receiver<(PeerId, SessionEvent)>,
    ) {
        let mut pending = Pending::default();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some((id, ev)) = next.take() {
            handled += 1;
            match ev {
                SessionEvent::Update(u) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.status.updates_received += 1;
                        if u.treat_as_withdraw() {
                            let n = u.nlri.len() + u.mp_reach.as_ref().map_or(0, |r| r.nlri.len());
                            p.status.routes_rejected_malformed += n as u64;
                        }
                        let stats = self.rib.import_update(id, &u, &mut pending);
                        p.status.routes_rejected_loop += stats.rejected as u64;
                        p.status.routes_rejected_filter += stats.filtered as u64;
                        if stats.filtered > 0 {
                            debug!(peer = %p.cfg.addr, refused = stats.filtered, "routes refused by the import filter");
                        }
                    }
                    if pending.len() >= MAX_BATCH_CHANGES {
                        self.flush(std::mem::take(&mut pending)).await;
                        // Commands and timers get their turn between the flushes of a burst:
                        // the agent's API calls (its status tick) would otherwise wait for the
                        // whole burst, and with them its reading of the changes flushed.
                        break;
                    }
                }
                ev => {
                    if !pending.is_empty() {
                        self.flush(std::mem::take(&mut pending)).await;
                    }
                    self.event(id, ev).await;
                }
            }
            if handled < MAX_BATCH_EVENTS {
                next = events.try_recv().ok();
            }
        }
        if !pending.is_empty() {
            self.flush(pending).await;
        }
    }

    /// Export imported UPDATEs' changes and send them.
    async fn flush(&mut self, pending: Pending) {
        let out = self.rib.finish(pending);
        self.publish(out).await;
    }

    async fn event(&mut self, id: PeerId, ev: SessionEvent) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        match ev {
            SessionEvent::StateChanged(s) => {
                if p.status.state != s {
                    p.status.state = s;
                    p.status.since = SystemTime::now();
                }
                if s != State::Active {
                    p.status.next_retry = None;
                }
            }
            SessionEvent::ConnectAttempt(error) => {
                p.status.connect_attempts += 1;
                if let Some(e) = error {
                    p.status.last_error = Some(format!("connect: {e}"));
                }
            }
            SessionEvent::RetryScheduled { failures, delay } => {
                p.status.connect_failures = failures;
                p.status.next_retry = Some(SystemTime::now() + delay);
            }
            SessionEvent::Parked(parked) => self.parked(id, *parked),
            SessionEvent::NotificationSent(n) => {
                p.status.notifications_sent += 1;
                p.status.last_error = Some(format!("sent NOTIFICATION {n}"));
            }
            SessionEvent::NotificationReceived(n) => {
                p.status.notifications_received += 1;
                p.status.last_error = Some(format!("received NOTIFICATION {n}"));
            }
            SessionEvent::Down { reason, graceful } => {
                p.status.last_error = Some(reason);
                p.status.end_of_rib.clear();
                if std::mem::replace(&mut p.up, false) {
                    self.gr_event(id, GrEvent::SessionDown { graceful }).await;
                    if let Some(p) = self.peers.get(&id)
                        && p.gr.phase() == GrPhase::Restarting
                    {
                        info!(
                            peer = %p.cfg.addr,
                            stale = self.rib.stale_count(id),
                            restart_time = ?p.gr.restart_time(),
                            "peer session lost without NOTIFICATION: keeping its routes as stale \
                             (graceful restart)"
                        );
                    }
                }
            }
            SessionEvent::Established {
                negotiated,
                local_addr,
            } => {
                p.status.state = State::Established;
                p.status.since = SystemTime::now();
                p.status.established_count += 1;
                p.status.end_of_rib.clear();
                p.status.connect_failures = 0;
                p.status.next_retry = None;
                p.up = true;
                p.codec = negotiated.codec;
                p.families = negotiated.families.clone();
                let mut rp = p.cfg.rib_peer(local_addr);
                if rp.local_addr.is_unspecified() {
                    rp.local_addr = local_addr;
                }
                self.rib.add_peer(id, rp);
                let families = negotiated.families.clone();
                let export = self.rib.peer_up(id, negotiated.peer_id, families.clone());
                if self.deferring {
                    debug!("restarting: initial advertisement deferred");
                } else {
                    self.send_export(id, &export, Some(&families));
                }
                self.gr_event(
                    id,
                    GrEvent::SessionUp {
                        peer_cap: negotiated.peer_graceful_restart.clone(),
                        families,
                    },
                )
                .await;
                // From the second session on, our forwarding state for this peer survived.
                self.update_gr_capability(id);
                self.check_deferral().await;
            }
            SessionEvent::Update(u) => {
                // Normally batched by `events`.
                p.status.updates_received += 1;
                let (out, _stats) = self.rib.apply_update(id, &u);
                self.publish(out).await;
            }
            SessionEvent::EndOfRib(f) => {
                if !p.status.end_of_rib.contains(&f) {
                    p.status.end_of_rib.push(f);
                }
                self.gr_event(id, GrEvent::EndOfRib(f)).await;
                self.check_deferral().await;
            }
            SessionEvent::RouteRefresh(f) => {
                if self.deferring {
                    // Everything is sent when the deferral ends.
                } else if p.families.contains(&f) {
                    let export = self.rib.refresh(id, f);
                    self.send_export(id, &export, Some(&[f]));
                }
            }
        }
    }

    /// Feed one event to a peer's graceful restart helper and carry out its actions.
    async fn gr_event(&mut self, id: PeerId, ev: GrEvent) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        for a in p.gr.handle(ev) {
            match a {
                GrAction::PeerDown { retain } => {
                    let out = if retain.is_empty() {
                        self.rib.peer_down(id)
                    } else {
                        self.rib.peer_down_graceful(id, &retain)
                    };
                    self.publish(out).await;
                }
                GrAction::Sweep(families) => {
                    let before = self.rib.stale_count(id);
                    let out = self.rib.sweep_stale(id, &families);
                    let swept = before - self.rib.stale_count(id);
                    if swept > 0
                        && let Some(p) = self.peers.get(&id)
                    {
                        info!(peer = %p.cfg.addr, ?families, swept, "stale routes removed");
                    }
                    self.publish(out).await;
                }
                GrAction::StartTimer(t, d) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.gr_timers[t.index()] = Some(Instant::now() + d);
                        self.gr_armed.insert(id);
                    }
                }
                GrAction::StopTimer(t) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.gr_timers[t.index()] = None;
                        if p.gr_timers.iter().all(Option::is_none) {
                            self.gr_armed.remove(&id);
                        }
                    }
                }
            }
        }
    }

    /// Give the session task the capability for its next OPENs if it changed.
    fn update_gr_capability(&mut self, id: PeerId) {
        let deferring = self.deferring;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let cap = gr_capability(
            &self.cfg,
            deferring,
            &p.cfg.families,
            p.status.established_count > 0,
        );
        if cap != p.gr_cap {
            p.gr_cap = cap.clone();
            if let Some(session) = &p.session {
                let _ = session.send(SessionCmd::SetGracefulRestart(cap));
            }
        }
    }

    /// End the selection deferral if every peer is done (RFC 4724 §4.1).
    async fn check_deferral(&mut self) {
        if !self.deferring || !self.config_complete {
            return;
        }
        let done = deferral_complete(self.peers.values().map(|p| DeferralPeer {
            established: p.up,
            peer_cap: p.gr.peer_cap(),
            families: &p.families,
            end_of_rib: &p.status.end_of_rib,
        }));
        if done {
            self.end_deferral("End-of-RIB received from every peer")
                .await;
        }
    }

    /// The deferred selection is done: tell the agent, advertise to the peers, stop setting R.
    async fn end_deferral(&mut self, why: &str) {
        if !self.deferring {
            return;
        }
        self.deferring = false;
        self.deferral_deadline = None;
        let changes: Vec<BestChange> = std::mem::take(&mut self.deferred)
            .into_iter()
            .filter_map(|prefix| {
                self.rib.best(&prefix).map(|b| BestChange {
                    prefix,
                    best: Some(b),
                })
            })
            .collect();
        info!(
            reason = why,
            learned = changes.len(),
            "selection deferral over: advertising to peers"
        );
        if !changes.is_empty() {
            self.best_tx.send(changes);
        }
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(p) = self.peers.get(&id) else {
                continue;
            };
            if p.up {
                let families = p.families.clone();
                let export = self.rib.resync(id);
                self.send_export(id, &export, Some(&families));
            }
            self.update_gr_capability(id);
        }
        self.converged_tx.send_replace(true);
    }

    /// Send best-path changes to the agent and exports to the peers (both held back while a
    /// restarting speaker defers its selection).
    async fn publish(&mut self, out: RibOutput) {
        if self.deferring {
            // The RIB's Adj-RIB-Out bookkeeping is redone by `Rib::resync` at the end.
            self.deferred.extend(out.changes.iter().map(|c| c.prefix));
            return;
        }
        for export in &out.exports {
            self.send_group_export(export);
        }
        let learned: Vec<BestChange> = out.changes;
        if !learned.is_empty() {
            self.best_tx.send(learned);
        }
    }

    /// Encode an export for one peer; `eor` = also send End-of-RIB for these families.
    fn send_export(&mut self, id: PeerId, export: &Export, eor: Option<&[Family]>) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let enc = UpdateEncoder::new(p.codec);
        let mut buf = BytesMut::new();
        let mut messages = encode(&enc, &export.withdraw, &export.announce, &mut buf);
        if let Some(fams) = eor {
            for f in fams {
                enc.end_of_rib(*f, &mut buf);
                messages += 1;
            }
        }
        p.status.updates_sent += messages as u64;
        if !buf.is_empty()
            && let Some(session) = &p.session
        {
            let _ = session.send(SessionCmd::Send(
                p.status.established_count,
                vec![buf.freeze()],
            ));
        }
    }

    /// Send an update group's messages to its members: encoded once (per codec in use among
    /// the members), each member getting slices of the same buffer.
    fn send_group_export(&mut self, export: &GroupExport) {
        let mut encoded: Vec<EncodedGroup> = Vec::new();
        for &m in &export.members {
            let Some(p) = self.peers.get_mut(&m) else {
                continue;
            };
            if !p.up {
                continue;
            }
            let i = match encoded.iter().position(|e| e.codec == p.codec) {
                Some(i) => i,
                None => {
                    encoded.push(EncodedGroup::new(export, p.codec));
                    encoded.len() - 1
                }
            };
            let (mut pieces, mut messages) = encoded[i].for_member(m);
            if let Ok(w) = export.member_withdraw.binary_search_by_key(&m, |w| w.0) {
                let mut buf = BytesMut::new();
                messages += encode(
                    &UpdateEncoder::new(p.codec),
                    &export.member_withdraw[w].1,
                    &[],
                    &mut buf,
                );
                pieces.push(buf.freeze());
            }
            p.status.updates_sent += messages as u64;
            if !pieces.is_empty()
                && let Some(session) = &p.session
            {
                let _ = session.send(SessionCmd::Send(p.status.established_count, pieces));
            }
        }
    }
}

/// Most events handled in one go before commands and timers get a turn.
const MAX_BATCH_EVENTS: usize = 1024;
/// Most best-path changes imported before they are exported (bounds the latency of a batch
/// and the size of one best-change message to the agent); commands and timers get a turn
/// after each such export.
const MAX_BATCH_CHANGES: usize = 4096;

/// Encode withdrawals, then announcements, as UPDATE messages; returns how many.
fn encode(
    enc: &UpdateEncoder,
    withdraw: &[IpNet],
    announce: &[(crate::attrset::AttrSet, Vec<IpNet>)],
    buf: &mut BytesMut,
) -> usize {
    let mut messages = 0;
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
        withdraw.iter().partition(|w| matches!(w, IpNet::V4(_)));
    messages += enc.withdraw(&v4, buf);
    messages += enc.withdraw(&v6, buf);
    for (attrs, prefixes) in announce {
        messages += enc.announce(&attrs.path, Some(attrs.next_hop), prefixes, buf);
    }
    messages
}

/// A group export encoded for one codec: one buffer, segment by segment.
struct EncodedGroup {
    codec: CodecContext,
    bytes: Bytes,
    /// Per segment: the member it excludes, its byte range, its message count.
    segments: Vec<(PeerId, Range<usize>, usize)>,
    messages: usize,
}

impl EncodedGroup {
    fn new(export: &GroupExport, codec: CodecContext) -> EncodedGroup {
        let enc = UpdateEncoder::new(codec);
        let mut buf = BytesMut::new();
        let mut segments = Vec::with_capacity(export.segments.len());
        let mut messages = 0;
        for s in &export.segments {
            let start = buf.len();
            let n = encode(&enc, &s.withdraw, &s.announce, &mut buf);
            messages += n;
            segments.push((s.exclude, start..buf.len(), n));
        }
        EncodedGroup {
            codec,
            bytes: buf.freeze(),
            segments,
            messages,
        }
    }

    /// The pieces of the buffer `member` gets (everything but the segment excluding it), and
    /// how many messages they hold.
    fn for_member(&self, member: PeerId) -> (Vec<Bytes>, usize) {
        match self.segments.binary_search_by_key(&member, |s| s.0) {
            Ok(i) => {
                let (_, r, n) = &self.segments[i];
                let pieces = [self.bytes.slice(..r.start), self.bytes.slice(r.end..)]
                    .into_iter()
                    .filter(|b| !b.is_empty())
                    .collect();
                (pieces, self.messages - n)
            }
            Err(_) if self.bytes.is_empty() => (Vec::new(), 0),
            Err(_) => (vec![self.bytes.clone()], self.messages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrset::RouteAttrs;
    use crate::rib::Segment;
    use crate::wire::{AsPath, Message, NextHop, Origin, decode_message};
    use std::sync::Arc;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn attrs(nh: [u8; 4]) -> crate::attrset::AttrSet {
        Arc::new(RouteAttrs {
            path: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                next_hop: Some(Ipv4Addr::from(nh)),
                local_pref: Some(100),
                ..Default::default()
            },
            next_hop: NextHop::new(IpAddr::from(nh)),
        })
    }

    /// (announced, withdrawn) prefixes in `pieces`, sorted, and the message count.
    fn decode(pieces: &[Bytes]) -> (Vec<IpNet>, Vec<IpNet>, usize) {
        let mut buf = BytesMut::new();
        for p in pieces {
            buf.extend_from_slice(p);
        }
        let (mut ann, mut wd, mut n) = (Vec::new(), Vec::new(), 0);
        while let Some(m) = decode_message(&mut buf, CodecContext::default()).unwrap() {
            let Message::Update(u) = m else {
                panic!("not an UPDATE: {m:?}")
            };
            ann.extend(u.nlri);
            wd.extend(u.withdrawn);
            n += 1;
        }
        assert!(buf.is_empty());
        ann.sort_unstable();
        wd.sort_unstable();
        (ann, wd, n)
    }

    #[test]
    fn members_get_every_segment_but_their_own_from_one_buffer() {
        let export = GroupExport {
            group: 0,
            members: vec![1, 2, 3, 4],
            segments: vec![
                Segment {
                    exclude: LOCAL,
                    withdraw: vec![net("10.0.0.0/26")],
                    announce: vec![],
                },
                Segment {
                    exclude: 1,
                    withdraw: vec![],
                    announce: vec![(attrs([10, 0, 0, 1]), vec![net("10.1.0.0/26")])],
                },
                Segment {
                    exclude: 2,
                    withdraw: vec![net("10.2.1.0/26")],
                    announce: vec![(
                        attrs([10, 0, 0, 2]),
                        vec![net("10.2.0.0/26"), net("10.2.0.64/26")],
                    )],
                },
                Segment {
                    exclude: 4,
                    withdraw: vec![],
                    announce: vec![(attrs([10, 0, 0, 4]), vec![net("10.4.0.0/26")])],
                },
            ],
            member_withdraw: vec![(4, vec![net("10.9.0.0/26")])],
        };
        let enc = EncodedGroup::new(&export, CodecContext::default());
        for m in 1..=4 {
            let (pieces, messages) = enc.for_member(m);
            assert!(
                pieces.len() <= 2,
                "at most the parts before and after its segment"
            );
            let (ann, wd, n) = decode(&pieces);
            assert_eq!(n, messages, "member {m}");
            let mut want = export.for_member(m);
            // The member's own withdrawals are encoded apart (see send_group_export).
            if m == 4 {
                want.withdraw.retain(|p| *p != net("10.9.0.0/26"));
            }
            let mut want_ann: Vec<IpNet> =
                want.announce.iter().flat_map(|(_, p)| p.clone()).collect();
            want_ann.sort_unstable();
            want.withdraw.sort_unstable();
            assert_eq!((ann, wd), (want_ann, want.withdraw), "member {m}");
        }
        // Member 3 is excluded from nothing: the whole buffer, shared.
        let (pieces, _) = enc.for_member(3);
        assert_eq!(pieces, vec![enc.bytes.clone()]);
        let (ann, _, _) = decode(&pieces);
        assert_eq!(ann.len(), 4);
        let (ann, _, _) = decode(&enc.for_member(2).0);
        assert!(!ann.contains(&net("10.2.0.0/26")));
    }
}
