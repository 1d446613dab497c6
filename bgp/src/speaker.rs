//! The speaker: a listener, one session task per peer, and one core task that owns the RIB.
//!
//! Everything routing-related lives in the core task (no locks around routing state); the
//! agent talks to it through [`Speaker`], a cheap handle over a bounded command channel, and
//! consumes best-path changes from the receiver returned by [`Speaker::start`].

use crate::fsm::{FsmConfig, State};
use crate::rib::{BestChange, BestRoute, Export, LOCAL, PeerId, Rib, RibOutput, RibPeer};
use crate::session::{self, SessionCmd, SessionEvent, SessionParams};
use crate::wire::{
    CodecContext, Family, GrFamily, GracefulRestartCap, Notification, PathAttrs, UpdateEncoder,
    cease,
};
use bytes::BytesMut;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
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
    /// Graceful restart time to advertise (RFC 4724); `None` = no GR capability.
    pub graceful_restart_time: Option<u16>,
}

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
    /// The last reason the session went down or failed to come up.
    pub last_error: Option<String>,
    /// Families the peer has sent End-of-RIB for since the session came up.
    pub end_of_rib: Vec<Family>,
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
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    LocRib(oneshot::Sender<Vec<(IpNet, BestRoute)>>),
    Inbound(tokio::net::TcpStream, SocketAddr),
    Shutdown(oneshot::Sender<()>),
}

/// Handle to a running speaker.
#[derive(Clone, Debug)]
pub struct Speaker {
    tx: mpsc::Sender<Command>,
    listen: Option<SocketAddr>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Speaker {
    /// Start the listener and the core task. Returns the handle and the stream of best-path
    /// changes of learned routes.
    pub async fn start(
        cfg: SpeakerConfig,
    ) -> Result<(Speaker, mpsc::UnboundedReceiver<Vec<BestChange>>), SpeakerError> {
        let (tx, rx) = mpsc::channel(1024);
        // Unbounded so that an agent busy calling the API can never deadlock the core.
        let (best_tx, best_rx) = mpsc::unbounded_channel();
        let mut listen = None;
        if let Some(addr) = cfg.listen {
            let listener = bind(addr).map_err(|source| SpeakerError::Listen { addr, source })?;
            listen = listener.local_addr().ok();
            info!(addr = ?listen, "BGP listening");
            let tx = tx.clone();
            tokio::spawn(async move {
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
            });
        }
        let core = Core::new(cfg, best_tx);
        tokio::spawn(core.run(rx));
        Ok((Speaker { tx, listen }, best_rx))
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

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Peers(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// The Loc-RIB: best route per prefix (peer = [`LOCAL`] for our own).
    pub async fn loc_rib(&self) -> Result<Vec<(IpNet, BestRoute)>, SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::LocRib(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Stop every session with Cease / Administrative Shutdown and end the speaker.
    pub async fn shutdown(&self) -> Result<(), SpeakerError> {
        let (t, r) = oneshot::channel();
        self.send(Command::Shutdown(t)).await?;
        r.await.map_err(|_| SpeakerError::Stopped)
    }

    async fn send(&self, c: Command) -> Result<(), SpeakerError> {
        self.tx.send(c).await.map_err(|_| SpeakerError::Stopped)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

struct PeerEntry {
    cfg: PeerConfig,
    status: PeerStatus,
    session: mpsc::UnboundedSender<SessionCmd>,
    codec: CodecContext,
    families: Vec<Family>,
}

struct Core {
    cfg: SpeakerConfig,
    rib: Rib,
    peers: HashMap<PeerId, PeerEntry>,
    by_addr: HashMap<IpAddr, PeerId>,
    next_id: PeerId,
    best_tx: mpsc::UnboundedSender<Vec<BestChange>>,
    ev_tx: mpsc::Sender<(PeerId, SessionEvent)>,
    ev_rx: Option<mpsc::Receiver<(PeerId, SessionEvent)>>,
}

impl Core {
    fn new(cfg: SpeakerConfig, best_tx: mpsc::UnboundedSender<Vec<BestChange>>) -> Core {
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        Core {
            rib: Rib::new(cfg.local_as, cfg.router_id, cfg.cluster_id),
            cfg,
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: LOCAL + 1,
            best_tx,
            ev_tx,
            ev_rx: Some(ev_rx),
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let Some(mut events) = self.ev_rx.take() else {
            return;
        };
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c).await,
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some((id, ev)) = events.recv() => self.event(id, ev).await,
            }
        }
    }

    async fn shutdown(&mut self) {
        for (_, p) in self.peers.drain() {
            let _ = p
                .session
                .send(SessionCmd::Stop(Notification::cease(cease::ADMIN_SHUTDOWN)));
        }
        // Give the session tasks a moment to flush their NOTIFICATIONs.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn fsm_config(&self, p: &PeerConfig) -> FsmConfig {
        let mut f = FsmConfig::new(self.cfg.local_as, p.remote_as, self.cfg.router_id);
        f.hold_time = p.hold_time.unwrap_or(self.cfg.hold_time);
        f.connect_retry = self.cfg.connect_retry;
        f.passive = p.passive;
        f.families = p.families.clone();
        f.route_refresh = true;
        f.graceful_restart = self.cfg.graceful_restart_time.map(|t| GracefulRestartCap {
            restart_state: false,
            notification: false,
            restart_time: t,
            families: p
                .families
                .iter()
                .map(|&family| GrFamily {
                    family,
                    forwarding_state: false,
                })
                .collect(),
        });
        f
    }

    async fn command(&mut self, c: Command) {
        match c {
            Command::AddPeer(cfg, reply) => {
                let _ = reply.send(self.add_peer(cfg));
            }
            Command::SetPeer(cfg, reply) => {
                let unchanged = self
                    .by_addr
                    .get(&cfg.addr)
                    .and_then(|id| self.peers.get(id))
                    .is_some_and(|p| p.cfg == cfg);
                let r = if unchanged {
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
            }
            Command::Announce(prefix, nh, attrs) => {
                let out = self.rib.originate(prefix, nh, attrs);
                self.publish(out).await;
            }
            Command::Withdraw(prefix) => {
                let out = self.rib.withdraw_local(prefix);
                self.publish(out).await;
            }
            Command::Peers(reply) => {
                let mut v: Vec<PeerStatus> = self
                    .peers
                    .iter()
                    .map(|(id, p)| {
                        let mut s = p.status.clone();
                        let (r, a, adv) = self.rib.peer_counts(*id);
                        s.prefixes_received = r;
                        s.prefixes_accepted = a;
                        s.prefixes_advertised = adv;
                        s
                    })
                    .collect();
                v.sort_by_key(|a| a.addr);
                let _ = reply.send(v);
            }
            Command::LocRib(reply) => {
                let mut v: Vec<(IpNet, BestRoute)> =
                    self.rib.loc_rib().map(|(p, b)| (*p, b)).collect();
                v.sort_by_key(|a| a.0);
                let _ = reply.send(v);
            }
            Command::Inbound(stream, remote) => match self
                .by_addr
                .get(&remote.ip())
                .and_then(|id| self.peers.get(id))
            {
                Some(p) => {
                    let _ = p.session.send(SessionCmd::Inbound(stream));
                }
                None => debug!(%remote, "connection from an unconfigured address refused"),
            },
            Command::Shutdown(_) => {}
        }
    }

    /// Stop a peer's session with Cease / `subcode` and forget its routes.
    async fn remove(&mut self, addr: IpAddr, subcode: u8) -> bool {
        let Some(id) = self.by_addr.remove(&addr) else {
            return false;
        };
        if let Some(p) = self.peers.remove(&id) {
            let _ = p
                .session
                .send(SessionCmd::Stop(Notification::cease(subcode)));
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
        self.rib.add_peer(
            id,
            RibPeer {
                addr: cfg.addr,
                remote_as: cfg.remote_as,
                local_addr: cfg
                    .local_v4_next_hop
                    .map(IpAddr::V4)
                    .or(cfg.local_addr)
                    .unwrap_or(IpAddr::V4(self.cfg.router_id)),
                local_v6_next_hop: cfg.local_v6_next_hop,
                rr_client: cfg.rr_client,
                next_hop_self: cfg.next_hop_self,
            },
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let params = SessionParams {
            id,
            remote: SocketAddr::new(cfg.addr, cfg.port),
            local_addr: cfg.local_addr,
            fsm: self.fsm_config(&cfg),
        };
        tokio::spawn(session::run(params, rx, self.ev_tx.clone()));
        let status = PeerStatus {
            addr: cfg.addr,
            port: cfg.port,
            remote_as: cfg.remote_as,
            kind: cfg.kind.clone(),
            state: State::Idle,
            since: SystemTime::now(),
            established_count: 0,
            prefixes_received: 0,
            prefixes_accepted: 0,
            prefixes_advertised: 0,
            updates_received: 0,
            updates_sent: 0,
            notifications_received: 0,
            notifications_sent: 0,
            last_error: None,
            end_of_rib: Vec::new(),
        };
        self.by_addr.insert(cfg.addr, id);
        self.peers.insert(
            id,
            PeerEntry {
                cfg,
                status,
                session: tx,
                codec: CodecContext::default(),
                families: Vec::new(),
            },
        );
        Ok(())
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
            }
            SessionEvent::NotificationSent(n) => {
                p.status.notifications_sent += 1;
                p.status.last_error = Some(format!("sent NOTIFICATION {n}"));
            }
            SessionEvent::NotificationReceived(n) => {
                p.status.notifications_received += 1;
                p.status.last_error = Some(format!("received NOTIFICATION {n}"));
            }
            SessionEvent::Down(reason) => {
                p.status.last_error = Some(reason);
                p.status.end_of_rib.clear();
                let out = self.rib.peer_down(id);
                self.publish(out).await;
            }
            SessionEvent::Established {
                negotiated,
                local_addr,
            } => {
                p.status.state = State::Established;
                p.status.since = SystemTime::now();
                p.status.established_count += 1;
                p.status.end_of_rib.clear();
                p.codec = negotiated.codec;
                p.families = negotiated.families.clone();
                let mut rp = RibPeer {
                    addr: p.cfg.addr,
                    remote_as: p.cfg.remote_as,
                    local_addr: p
                        .cfg
                        .local_v4_next_hop
                        .map(IpAddr::V4)
                        .or(p.cfg.local_addr)
                        .unwrap_or(local_addr),
                    local_v6_next_hop: p.cfg.local_v6_next_hop,
                    rr_client: p.cfg.rr_client,
                    next_hop_self: p.cfg.next_hop_self,
                };
                if rp.local_addr.is_unspecified() {
                    rp.local_addr = local_addr;
                }
                self.rib.add_peer(id, rp);
                let families = negotiated.families.clone();
                let export = self.rib.peer_up(id, negotiated.peer_id, families.clone());
                self.send_export(id, &export, Some(&families));
            }
            SessionEvent::Update(u) => {
                p.status.updates_received += 1;
                let (out, _stats) = self.rib.apply_update(id, &u);
                self.publish(out).await;
            }
            SessionEvent::EndOfRib(f) => {
                if !p.status.end_of_rib.contains(&f) {
                    p.status.end_of_rib.push(f);
                }
            }
            SessionEvent::RouteRefresh(f) => {
                if p.families.contains(&f) {
                    let export = self.rib.refresh(id, f);
                    self.send_export(id, &export, Some(&[f]));
                }
            }
        }
    }

    /// Send best-path changes to the agent and exports to the peers.
    async fn publish(&mut self, out: RibOutput) {
        for (id, export) in &out.exports {
            self.send_export(*id, export, None);
        }
        let learned: Vec<BestChange> = out.changes;
        if !learned.is_empty() {
            let _ = self.best_tx.send(learned);
        }
    }

    /// Encode an export for one peer; `eor` = also send End-of-RIB for these families.
    fn send_export(&mut self, id: PeerId, export: &Export, eor: Option<&[Family]>) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let enc = UpdateEncoder::new(p.codec);
        let mut buf = BytesMut::new();
        let mut messages = 0;
        let mut withdraw_v4 = Vec::new();
        let mut withdraw_v6 = Vec::new();
        for w in &export.withdraw {
            match w {
                IpNet::V4(_) => withdraw_v4.push(*w),
                IpNet::V6(_) => withdraw_v6.push(*w),
            }
        }
        messages += enc.withdraw(&withdraw_v4, &mut buf);
        messages += enc.withdraw(&withdraw_v6, &mut buf);
        for (attrs, prefixes) in &export.announce {
            messages += enc.announce(&attrs.path, Some(attrs.next_hop), prefixes, &mut buf);
        }
        if let Some(fams) = eor {
            for f in fams {
                enc.end_of_rib(*f, &mut buf);
                messages += 1;
            }
        }
        p.status.updates_sent += messages as u64;
        if !buf.is_empty() {
            let _ = p
                .session
                .send(SessionCmd::Send(p.status.established_count, buf.freeze()));
        }
    }
}
