//! `podroute agent`: the datastore, the BGP speaker and the dataplane wired into one process.
//!
//! One event loop ([`Agent::run`]) coordinates and holds only the agent's view: the latest
//! [`ClusterState`], the sessions configured in the speaker, the prefixes announced, the BGP
//! best paths learned, the links the dataplane reported. After every change it recomputes
//! (pure functions in [`peers`] and [`intent`], then [`crate::plan`]) and hands the
//! differences on: `set_peer`/`remove_peer` and `announce`/`withdraw` to the speaker
//! (`sessions.rs`), plan updates to the dataplane (on its own thread and runtime,
//! [`crate::dataplane::thread`]). Nothing is withdrawn or deleted before the datastore's
//! initial sync: the loop starts only after it (`startup.rs`).
//!
//! Where things live: the tunnel devices (`tunl0`, its address and MTU, the userspace IPIP
//! forwarder and its table) are the dataplane's ([`crate::dataplane::tunnels`]), made from the
//! [`crate::plan::tunnels::TunnelPlan`] this loop sends ahead of the routes; link facts (the
//! pods' `cali*` interfaces, the host NIC's carrier) come from the dataplane's netlink monitor
//! ([`crate::dataplane::LinkFacts`]). This loop makes no system calls of its own.
//!
//! One plan per change: a datastore or interface change builds the plan's input once; when
//! only block-derived routes changed (a pod's /32, a block changing hands) the changed
//! prefixes go as a delta ([`crate::plan::Planner::changed_since`]), else the full plan. A
//! batch of BGP best-path changes only re-plans its prefixes
//! ([`crate::plan::Planner::route_for`]) and sends those routes as a delta, so the kernel
//! takes the first routes of a table while the rest is still arriving. The agent keeps no
//! copy of the plan: the best paths and the [`crate::plan::Planner`] give it again when `GET
//! /routes` asks (the report is built only then).
//!
//! Metrics, `/readyz` and the status API read what the loop publishes into a
//! [`status::StatusBoard`] (`publish.rs`) once a second and after every change.

pub mod annotate;
pub mod autodetect;
pub mod best_paths;
pub mod condition;
pub mod config;
pub mod flannel;
pub mod intent;
pub mod listen;
pub mod peers;
mod publish;
pub mod report;
pub mod router_id;
pub mod selector;
pub mod services;
mod sessions;
mod startup;
pub mod status;
pub mod tunnel_addr;
pub mod tunnels;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podroute_bgp::rib::BestChange;
use podroute_bgp::{PeerStatus, Speaker, SpeakerConfig};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use config::AgentArgs;
pub use startup::{node_name, run, start_datastore, wait_synced};

use crate::dataplane::ipip_user::IpipCounters;
use crate::dataplane::thread::{self, RuntimeThread};
use crate::dataplane::tunnels::TunnelsConfig;
use crate::dataplane::tunnels::ipip::IpipConfig;
use crate::dataplane::{
    Dataplane, DataplaneConfig, DataplaneStatus, LinkFacts, PlanMessage, PlanUpdate, RouteChange,
};
use crate::datastore::{self, DatastoreHandle};
use crate::metrics::Metrics;
use crate::plan::tunnels::{IpipAddressSource, TunnelPlan, tunnel_plan};
use crate::plan::{LocalNode, PlanWarning, Planner, WORKLOAD_IFACE_PREFIX};
use crate::state::ClusterState;
use best_paths::BestPaths;
use peers::{DesiredPeer, LocalIdentity};
use status::StatusBoard;

/// How long `/livez` tolerates silence from the event loop.
pub const LIVENESS_MAX_AGE: Duration = Duration::from_secs(30);

/// What the agent needs from its environment before the loop starts.
pub struct Startup {
    pub node: String,
    /// `None` on an IPv6-only node.
    pub address: Option<Ipv4Net>,
    /// `None` on an IPv4-only node.
    pub address6: Option<Ipv6Net>,
    pub nic: String,
    pub datastore: DatastoreHandle,
    pub datastore_source: String,
    /// The BGP listener opened before the datastore was read (see
    /// [`listen::early_listener`]); `None`: the speaker binds its own.
    pub early_listener: Option<podroute_bgp::EarlyListener>,
    pub metrics: Metrics,
    pub board: Arc<StatusBoard>,
    /// Where BGP passwords (`password.secretKeyRef`) are read.
    pub secrets: datastore::secrets::SecretSource,
    /// The Kubernetes API (kubernetes datastore): the Node condition and the tunnel address
    /// are written through it. `None` with the YAML-directory datastore.
    pub client: Option<kube::Client>,
    /// flannel mode (`--model flannel`): its config and state.
    pub flannel: Option<flannel::FlannelMode>,
}

/// Aborts a background task when dropped (with the agent).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per-peer message counts as last read, to turn them into Prometheus counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PeerCounts {
    pub(crate) updates_rx: u64,
    pub(crate) updates_tx: u64,
    pub(crate) notif_rx: u64,
    pub(crate) notif_tx: u64,
    pub(crate) established: u64,
    pub(crate) rejected_loop: u64,
    pub(crate) rejected_filter: u64,
    pub(crate) rejected_malformed: u64,
    /// Refusals not logged yet, and when the last WARN about this peer's refusals was.
    pub(crate) unlogged_rejections: u64,
    pub(crate) last_rejection_log: Option<std::time::Instant>,
}

/// A configured session and when it was configured (readiness grace).
#[derive(Debug, Clone)]
struct ConfiguredPeer {
    desired: DesiredPeer,
    since: Instant,
}

/// An update sent to the dataplane and the event that caused it (convergence histogram).
struct PendingPlan {
    seq: u64,
    event_at: Instant,
    trigger: &'static str,
}

/// The name of the dataplane's thread ([`crate::dataplane::thread`]).
pub const DATAPLANE_THREAD: &str = "dataplane";

/// The dataplane running on its thread; its output is why it stopped.
pub type DataplaneThread = RuntimeThread<anyhow::Result<()>>;

/// How long shutdown waits for the dataplane thread to end.
const DATAPLANE_STOP_WAIT: Duration = Duration::from_secs(2);

/// Plan updates queued towards the dataplane at most; the loop waits for room beyond.
const PLAN_QUEUE: usize = 64;

/// Most prefixes in one route delta from best-path changes (bounds the lists built per
/// delta; a burst goes as several).
const DELTA_CHUNK: usize = 4096;

/// Updates awaiting the dataplane kept for the convergence histogram (older ones are
/// dropped unobserved when the dataplane is far behind).
const MAX_PENDING: usize = 1024;

/// The event loop's state.
pub struct Agent {
    args: AgentArgs,
    node: String,
    /// The node's IPv4 address (`None` on an IPv6-only node).
    address: Option<Ipv4Net>,
    /// The node's IPv6 address found at start (`--ip6`); `None`: the Node's annotation.
    address6: Option<Ipv6Net>,
    nic: String,
    local_as: u32,
    router_id: Ipv4Addr,
    listen_port: u16,
    speaker: Speaker,
    best_rx: podroute_bgp::BestChanges,
    datastore: DatastoreHandle,
    datastore_source: String,
    state: Arc<ClusterState>,
    reject_seen: HashMap<&'static str, u64>,
    peers: BTreeMap<IpAddr, ConfiguredPeer>,
    peer_warnings: Vec<String>,
    /// BGP passwords read from Secrets.
    passwords: datastore::secrets::PasswordCache,
    /// The kernel's TCP-MD5 drop counters last seen.
    md5_counts: Option<[u64; 3]>,
    announced: BTreeSet<IpNet>,
    /// The service prefixes among `announced`, with their reasons (for `podroute status`).
    service_rows: Vec<status::ServicePrefixRow>,
    /// The export policy last given to the speaker.
    export_rules: Option<podroute_bgp::policy::ExportRules>,
    /// Next hop of the best learned path per prefix (host bits cleared).
    learned: BestPaths,
    /// The pods' `cali*` interfaces, as the dataplane's monitor last reported them.
    interfaces: BTreeSet<String>,
    /// Links as the dataplane's monitor sees them.
    links: watch::Receiver<LinkFacts>,
    plan_tx: mpsc::Sender<PlanMessage>,
    plan_seq: u64,
    /// The plan of the current cluster state and interfaces, without the learned routes.
    planner: Option<Planner>,
    /// The tunnel plan last sent to the dataplane.
    tunnel_plan: Option<TunnelPlan>,
    /// A full plan of `planner` went to the dataplane (after the start-up deferral): best-path
    /// changes can now go as deltas.
    streaming: bool,
    plan_warnings: BTreeSet<PlanWarning>,
    pending: VecDeque<PendingPlan>,
    dp_status: watch::Receiver<DataplaneStatus>,
    peer_status: Vec<PeerStatus>,
    peer_counts: HashMap<IpAddr, PeerCounts>,
    /// The userspace IPIP forwarder's counters (the dataplane copies them from its process),
    /// and what of them Prometheus has.
    ipip_counters: Arc<IpipCounters>,
    ipip_exported: report::ExportedIpip,
    metrics: Metrics,
    board: Arc<StatusBoard>,
    started: SystemTime,
    /// Until this deadline (or every peer's End-of-RIB) plans are computed but not applied,
    /// so a restart does not delete routes the peers are about to announce again.
    deferral: Option<Instant>,
    /// Started with routes of a previous run in the kernel.
    restarting: bool,
    /// The host NIC was seen without carrier (sessions over it were reset).
    nic_down: bool,
    /// `GET /routes` asks the loop for the report.
    route_requests: mpsc::Receiver<status::RoutesRequest>,
    /// The Node's `NetworkUnavailable` condition.
    condition: condition::ConditionReporter,
    /// Allocates/releases the tunnel address in IPAM (kubernetes datastore only); when set,
    /// `tunl0` takes only the annotated address, never a guessed one.
    tunnel_addr: Option<AbortOnDrop>,
    /// flannel mode: routes and tunnels from flannel's leases (see [`flannel`]).
    flannel: Option<flannel::FlannelMode>,
}

impl Agent {
    /// Starts the speaker and the dataplane (in the calling thread's network namespace) and
    /// returns the loop, ready to [`run`](Self::run), with the dataplane thread's handle.
    pub async fn start(
        args: AgentArgs,
        startup: Startup,
    ) -> anyhow::Result<(Self, DataplaneThread)> {
        let Startup {
            node,
            address,
            address6,
            nic,
            datastore,
            datastore_source,
            early_listener,
            metrics,
            board,
            secrets,
            client,
            flannel,
        } = startup;
        let state = datastore
            .state
            .latest()
            .context("the agent starts only after the datastore's initial sync")?;
        let mut dp = Dataplane::open(DataplaneConfig {
            protocol: args.route_protocol,
            tunnels: TunnelsConfig {
                ipip: IpipConfig {
                    dataplane: args.ipip_dataplane,
                    forwarder: args.ipip_forwarder,
                    log: args.log.clone(),
                    program: None,
                },
            },
            ..DataplaneConfig::default()
        })
        .context("opening the dataplane")?;
        let reconcile = metrics.reconcile_seconds.clone();
        dp.on_reconcile(move |elapsed, _| reconcile.observe(elapsed.as_secs_f64()));
        let links = dp.link_facts();
        let ipip_counters = dp.ipip_counters();
        // Routes of ours already in the kernel: this is a restart. The speaker then tells its
        // peers that forwarding state was kept (GR R and F bits) and defers its best-path
        // run until their End-of-RIB, and the first plan waits for it.
        let restarting = dp.status().installed_routes > 0;
        let local_as = peers::local_as(&state, args.as_number);
        let router_id = router_id::router_id(
            args.router_id.unwrap_or_default(),
            &node,
            address.map(|a| a.addr()),
        );
        let listen_port = state.bgp.listen_port;
        let mut cfg = SpeakerConfig::new(local_as, router_id);
        cfg.hold_time = args.hold_time;
        cfg.connect_retry = args.connect_retry;
        cfg.connect_retry_max = args.connect_retry_max.max(args.connect_retry);
        cfg.cluster_id = state.local().and_then(|n| n.route_reflector_cluster_id);
        cfg.restarting = restarting;
        cfg.selection_deferral = args.selection_deferral;
        // The first `apply_state` configures the synced datastore's whole peer set and our
        // blocks one call at a time; the deferral must not end on the first peers' End-of-RIB.
        cfg.initial_config_barrier = true;
        if restarting {
            info!(
                adopted = dp.status().installed_routes,
                deferral = ?args.selection_deferral,
                "kernel routes from a previous run adopted; restarting gracefully"
            );
        }
        let (speaker, best_rx) = listen::start_speaker(
            cfg,
            listen::listen_candidates(args.bgp_bind, listen_port),
            early_listener,
        )
        .await
        .context("starting the BGP speaker")?;
        info!(node, ?address, ?address6, nic, local_as, %router_id, listen_port, "BGP speaker started");

        let (plan_tx, plan_rx) = mpsc::channel(PLAN_QUEUE);
        let (status_tx, dp_status) = watch::channel(DataplaneStatus::default());
        // Its own thread and runtime: its netlink calls block while the kernel takes the
        // routes, and must not hold a worker of the speaker's and this loop's runtime.
        let dataplane_task = thread::spawn(DATAPLANE_THREAD, async move {
            dp.run(plan_rx, status_tx)
                .await
                .context("dataplane stopped")
        })
        .context("starting the dataplane thread")?;

        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics.datastore_synced.set(1);
        let (routes_tx, route_requests) = mpsc::channel(16);
        board.serve_routes(routes_tx);
        let node_for_condition = node.clone();
        let node_for_task = node.clone();
        let state_for_task = datastore.state.clone();
        let interfaces = links.borrow().named_with_prefix(WORKLOAD_IFACE_PREFIX);
        let agent = Agent {
            args,
            node,
            address,
            address6,
            nic,
            local_as,
            router_id,
            listen_port,
            speaker,
            best_rx,
            datastore,
            datastore_source,
            state,
            reject_seen: HashMap::new(),
            peers: BTreeMap::new(),
            peer_warnings: Vec::new(),
            passwords: datastore::secrets::PasswordCache::new(secrets),
            md5_counts: None,
            announced: BTreeSet::new(),
            service_rows: Vec::new(),
            export_rules: None,
            learned: BestPaths::new(),
            interfaces,
            links,
            plan_tx,
            plan_seq: 0,
            planner: None,
            tunnel_plan: None,
            streaming: false,
            plan_warnings: BTreeSet::new(),
            pending: VecDeque::new(),
            dp_status,
            peer_status: Vec::new(),
            peer_counts: HashMap::new(),
            ipip_counters,
            ipip_exported: report::ExportedIpip::default(),
            metrics,
            board,
            started: SystemTime::now(),
            deferral: None,
            restarting,
            nic_down: false,
            route_requests,
            condition: condition::ConditionReporter::new(client.clone(), node_for_condition),
            tunnel_addr: client.map(|client| {
                AbortOnDrop(tunnel_addr::spawn(client, node_for_task, state_for_task))
            }),
            flannel,
        };
        Ok((agent, dataplane_task))
    }

    fn identity(&self) -> LocalIdentity {
        let local = self.state.local();
        LocalIdentity {
            name: self.node.clone(),
            ipv4: self.address.map(|a| a.addr()),
            ipv6: self.ipv6().map(|n| n.addr()),
            as_number: self.local_as,
            route_reflector_cluster_id: local.and_then(|n| n.route_reflector_cluster_id),
            labels: local.map(|n| n.labels.clone()).unwrap_or_default(),
            multiprotocol: self.args.bgp_multiprotocol_sessions,
        }
    }

    /// The node's IPv6 address: found at start, else the Node's annotation.
    fn ipv6(&self) -> Option<Ipv6Net> {
        self.address6
            .or_else(|| self.state.local().and_then(|n| n.ipv6))
    }

    fn local_node(&self) -> LocalNode {
        LocalNode {
            name: self.node.clone(),
            ipv4: self.address,
            ipv6: self.ipv6(),
            nic: self.nic.clone(),
        }
    }

    /// Runs until the speaker, the datastore or the dataplane stops, or `shutdown` fires.
    pub async fn run(
        mut self,
        mut dataplane: DataplaneThread,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let now = Instant::now();
        if self.restarting {
            // The speaker ends its deferral itself; this deadline is only a safety net.
            self.deferral = Some(now + self.args.selection_deferral + Duration::from_secs(2));
        }
        self.apply_state(now).await?;
        // Every peer of the synced datastore and our own blocks are configured now.
        self.speaker
            .initial_config_done()
            .await
            .context("BGP speaker")?;
        // A NIC down before the start counts too.
        self.on_links().await?;
        let mut deferral_check = tokio::time::interval(Duration::from_millis(100));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state_rx = self.datastore.state.clone();
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down; routes stay in the kernel for the next start to adopt, \
                           and sessions close without NOTIFICATION so GR peers keep ours");
                    self.condition.shutdown(self.args.shutdown_condition).await;
                    let _ = self.speaker.shutdown_for_restart().await;
                    // The dataplane stops at its next await (a batch being sent completes);
                    // its thread is joined unless that takes long (then it is left to end).
                    let _ = tokio::time::timeout(DATAPLANE_STOP_WAIT, dataplane.stop()).await;
                    return Ok(());
                }
                changed = state_rx.changed() => {
                    let at = Instant::now();
                    self.state = changed.context("datastore stopped")?;
                    self.apply_state(at).await?;
                }
                batch = self.best_rx.recv_batch() => {
                    let at = Instant::now();
                    let Some(batch) = batch else { bail!("BGP speaker stopped") };
                    self.take_changes(at, batch).await;
                }
                Some(request) = self.route_requests.recv() => {
                    let _ = request.send(self.route_report());
                }
                changed = self.dp_status.changed() => {
                    if changed.is_err() {
                        return Err(dataplane_ended(&mut dataplane).await);
                    }
                    self.on_dataplane();
                }
                changed = self.links.changed() => {
                    if changed.is_err() {
                        return Err(dataplane_ended(&mut dataplane).await);
                    }
                    self.on_links().await?;
                }
                _ = tick.tick() => {
                    self.on_tick().await?;
                }
                _ = deferral_check.tick(), if self.deferral.is_some() => {
                    self.check_deferral().await?;
                }
            }
        }
    }

    /// Takes `batch` and every change queued after it (a burst of UPDATEs) into `learned`,
    /// and sends their routes to the dataplane in deltas of at most [`DELTA_CHUNK`] prefixes,
    /// so that no list of a whole burst is built on the way. Only the last delta is timed (the
    /// burst's convergence, as one delta of it all was).
    async fn take_changes(&mut self, at: Instant, batch: podroute_bgp::BestChangeBatch) {
        let mut held: Option<Vec<IpNet>> = None;
        let mut next = Some(batch);
        while let Some(batch) = next.take() {
            let mut changes = batch.into_iter().peekable();
            while changes.peek().is_some() {
                let chunk = self.absorb(changes.by_ref().take(DELTA_CHUNK));
                if let Some(previous) = held.replace(chunk) {
                    self.send_delta(None, previous).await;
                }
            }
            next = self.best_rx.try_recv_batch().ok();
        }
        if let Some(last) = held {
            self.send_delta(Some(at), last).await;
        }
    }

    /// Takes best-path changes into `learned`; returns the prefixes they touched.
    fn absorb(&mut self, batch: impl IntoIterator<Item = BestChange>) -> Vec<IpNet> {
        batch
            .into_iter()
            .map(|change| {
                let prefix = change.prefix.trunc();
                match change.best {
                    Some(best) => self.learned.insert(prefix, best.next_hop),
                    None => self.learned.remove(&prefix),
                }
                prefix
            })
            .collect()
    }

    /// Sends the routes of the prefixes whose best path changed (once a full plan was sent;
    /// before, the full plan at the end of the deferral carries them).
    /// `at`: the event the routes answer (`None`: not timed, a later delta is).
    async fn send_delta(&mut self, at: Option<Instant>, changed: Vec<IpNet>) {
        if !self.streaming || changed.is_empty() {
            return;
        }
        let Some(planner) = &self.planner else {
            return;
        };
        let mut warnings = BTreeSet::new();
        let changes = route_changes(planner, &self.learned, changed, &mut warnings);
        for w in warnings {
            if !self.plan_warnings.contains(&w) {
                warn!("plan: {w}");
                self.plan_warnings.insert(w);
            }
        }
        self.queue_plan(PlanUpdate::Delta(changes), at.map(|at| (at, "bgp")))
            .await;
    }

    async fn send_plan(&mut self, update: PlanUpdate, at: Instant, trigger: &'static str) {
        self.queue_plan(update, Some((at, trigger))).await
    }

    /// Sends `update`; `timed`: the event it answers and its trigger, for the convergence
    /// histogram.
    async fn queue_plan(&mut self, update: PlanUpdate, timed: Option<(Instant, &'static str)>) {
        self.plan_seq += 1;
        let seq = self.plan_seq;
        // Tunnel plans go ahead of routes; only route updates are timed.
        if !matches!(update, PlanUpdate::Tunnels(_))
            && let Some((at, trigger)) = timed
        {
            self.pending.push_back(PendingPlan {
                seq,
                event_at: at,
                trigger,
            });
            while self.pending.len() > MAX_PENDING {
                self.pending.pop_front();
            }
        }
        // Waits while the dataplane is [`PLAN_QUEUE`] updates behind (it never waits on the
        // loop). A closed channel means the dataplane ended; the loop learns why from
        // its handle.
        let _ = self.plan_tx.send(PlanMessage { seq, update }).await;
    }

    /// A new cluster state: sessions, announcements, plan.
    async fn apply_state(&mut self, at: Instant) -> anyhow::Result<()> {
        if let Some(f) = &self.flannel {
            self.state = f.adapt_state(self.state.clone());
        }
        let state = self.state.clone();
        self.metrics.datastore_revision.set(state.revision as i64);
        for kind in crate::model::Kind::ALL
            .map(|k| k.as_str())
            .into_iter()
            .chain(["File"])
        {
            let held = state
                .suspect
                .iter()
                .any(|s| s.kind.map_or("File", |k| k.as_str()) == kind);
            self.metrics
                .datastore_suspect
                .with_label_values(&[kind])
                .set(i64::from(held));
        }
        self.configure_speaker(&state, at).await?;
        self.count_rejections();
        self.replan(at, "datastore").await;
        self.publish();
        // A new state (the first above all: every peer configured at once) leaves much freed
        // memory in the heap; give it back.
        crate::datastore::trim_heap();
        Ok(())
    }

    /// Plans once for the current cluster state and interfaces (without the learned routes:
    /// their routes depend only on the part compared, and deltas keep them current), and
    /// sends what changed: the tunnel plan when it changed, then the routes — the changed
    /// prefixes when only block-derived routes changed, else the full plan (also when no full
    /// plan was sent yet). During the start-up deferral only the tunnels go.
    async fn replan(&mut self, at: Instant, trigger: &'static str) {
        let input = intent::plan_input(
            &self.state,
            &self.local_node(),
            &BTreeMap::new(),
            &self.interfaces,
        );
        let mut tunnels = tunnel_plan(
            &input,
            IpipAddressSource {
                annotation: self.state.local().and_then(|n| n.ipip_tunnel_addr),
                ipam: self.tunnel_addr.is_some(),
            },
        );
        // What this node announces (its blocks, service prefixes) is never routed to a peer
        // that announces it too: every node announces the service CIDRs.
        let mut planner = Planner::new(&input).originating(self.announced.iter().copied());
        if let Some(f) = self.flannel.as_mut() {
            // flannel mode: routes and VTEPs from flannel's leases, as flanneld computes them.
            let ipv6 = self
                .address6
                .or_else(|| self.state.local().and_then(|n| n.ipv6));
            let local = f.local(&self.state, &self.node, self.address, ipv6, &self.nic);
            let (routes, flannel_tunnels) = f.replan(&self.state, &local, &self.metrics);
            planner = planner.with_datastore_routes(routes);
            tunnels.vxlan.extend(flannel_tunnels.vxlan);
            tunnels.vxlan_peers.extend(flannel_tunnels.vxlan_peers);
        }
        // Devices and VTEP entries go before the routes through them.
        if self.tunnel_plan.as_ref() != Some(&tunnels) {
            debug!(ipip = ?tunnels.ipip, "new tunnel plan");
            self.tunnel_plan = Some(tunnels.clone());
            self.send_plan(PlanUpdate::Tunnels(tunnels), at, trigger)
                .await;
        }
        if self.streaming && self.planner.as_ref() == Some(&planner) {
            return;
        }
        let delta = match (&self.planner, self.streaming) {
            (Some(old), true) => planner
                .changed_since(old)
                .map(|p| (p, old.warnings().clone())),
            _ => None,
        };
        if let Some((prefixes, old_fixed)) = delta {
            let mut warnings = planner.warnings().clone();
            let changes = route_changes(&planner, &self.learned, prefixes, &mut warnings);
            // The learned routes' warnings stand (same rules); the blocks' are the new ones.
            warnings.extend(self.plan_warnings.difference(&old_fixed).cloned());
            self.note_warnings(warnings);
            debug!(changes = changes.len(), trigger, "route plan delta");
            self.planner = Some(planner);
            if !changes.is_empty() {
                self.send_plan(PlanUpdate::Delta(changes), at, trigger)
                    .await;
            }
            return;
        }
        let mut warnings = planner.warnings().clone();
        let routes: Vec<_> = planner.routes(self.learned.iter(), &mut warnings).collect();
        self.note_warnings(warnings);
        debug!(routes = routes.len(), trigger, "new route plan");
        self.planner = Some(planner);
        if self.deferral.is_none() {
            self.streaming = true;
            self.send_plan(PlanUpdate::Full(routes), at, trigger).await;
        }
    }

    /// Logs the plan's warnings that are new, and keeps them.
    fn note_warnings(&mut self, warnings: BTreeSet<PlanWarning>) {
        for w in &warnings {
            if !self.plan_warnings.contains(w) {
                warn!("plan: {w}");
            }
        }
        self.plan_warnings = warnings;
    }

    /// Ends the start-up deferral when the speaker's deferral is over (End-of-RIB from every
    /// peer, or its timer) and applies the plan built from the complete view.
    async fn check_deferral(&mut self) -> anyhow::Result<()> {
        let Some(deadline) = self.deferral else {
            return Ok(());
        };
        let converged = *self.speaker.converged().borrow();
        let expired = Instant::now() >= deadline;
        if !converged && !expired {
            return Ok(());
        }
        // The speaker's own deferral skips peers that restart too (RFC 4724 §4.1) and may end
        // before the agent configured every peer; the kernel waits for every configured
        // peer's End-of-RIB, or the deadline.
        self.peer_status = self.speaker.peers().await.context("BGP speaker")?;
        let synced = |addr: &IpAddr| {
            let family = match addr {
                IpAddr::V4(_) => podroute_bgp::wire::Family::IPV4_UNICAST,
                IpAddr::V6(_) => podroute_bgp::wire::Family::IPV6_UNICAST,
            };
            self.peer_status.iter().any(|s| {
                s.addr == *addr
                    && s.state.to_string() == "Established"
                    && s.end_of_rib.contains(&family)
            })
        };
        let waiting: Vec<String> = self
            .peers
            .keys()
            .filter(|a| !synced(a))
            .map(ToString::to_string)
            .collect();
        if !waiting.is_empty() && !expired {
            return Ok(());
        }
        // The speaker queued its deferred best paths before it said so: take them all.
        while let Ok(batch) = self.best_rx.try_recv_batch() {
            self.absorb(batch);
        }
        self.deferral = None;
        if waiting.is_empty() {
            info!(
                peers = self.peers.len(),
                learned = self.learned.len(),
                "graceful restart: peers resynchronised; applying the route plan"
            );
        } else {
            warn!(
                ?waiting,
                learned = self.learned.len(),
                "graceful restart: deferral over without End-of-RIB from every peer; applying the route plan"
            );
        }
        self.streaming = false;
        self.replan(Instant::now(), "startup").await;
        self.publish();
        Ok(())
    }

    /// The dataplane published a status: observe convergence, and republish ours (its
    /// dataplane summary and readiness go with the routes `GET /routes` reports now).
    fn on_dataplane(&mut self) {
        let applied = self.dp_status.borrow_and_update().applied;
        let now = Instant::now();
        while let Some(p) = self.pending.front() {
            if applied.is_none_or(|a| p.seq > a) {
                break;
            }
            self.metrics
                .convergence_seconds
                .with_label_values(&[p.trigger])
                .observe(now.duration_since(p.event_at).as_secs_f64());
            self.pending.pop_front();
        }
        self.publish();
    }

    /// `GET /routes`: the plan as it stands, with each route's kernel state. Built only when
    /// asked: the plan is not kept between requests.
    fn route_report(&self) -> status::RoutesReport {
        let dp = self.dp_status.borrow().clone();
        let routes = self.planner.as_ref().map(|planner| {
            let mut warnings = BTreeSet::new();
            planner
                .routes(self.learned.iter(), &mut warnings)
                .collect::<Vec<_>>()
        });
        let mut report = report::routes(&self.node, routes.as_deref(), &dp, &self.state);
        report.vxlan = tunnels::report(self.tunnel_plan.as_ref(), &dp.vxlan);
        report
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        self.board.beat("agent");
        self.peer_status = self.speaker.peers().await.context("BGP speaker")?;
        let summary = self.speaker.summary().await.context("BGP speaker")?;
        report::update_connect_metrics(&self.metrics, &summary);
        report::update_ipip_metrics(
            &self.metrics,
            &self.ipip_counters.snapshot(),
            &mut self.ipip_exported,
        );
        self.publish();
        Ok(())
    }

    /// The dataplane's monitor saw links change: the pods' interfaces decide their routes,
    /// and the host NIC's carrier the sessions over it.
    async fn on_links(&mut self) -> anyhow::Result<()> {
        let (interfaces, nic_carrier) = {
            let facts = self.links.borrow_and_update();
            (
                facts.named_with_prefix(WORKLOAD_IFACE_PREFIX),
                facts.has_carrier(&self.nic),
            )
        };
        if interfaces != self.interfaces {
            self.interfaces = interfaces;
            self.replan(Instant::now(), "interfaces").await;
            self.publish();
        }
        self.on_nic_carrier(nic_carrier).await
    }
}

/// The routes of `prefixes` (best paths in `learned`) by `planner`, as a delta.
fn route_changes(
    planner: &Planner,
    learned: &BestPaths,
    prefixes: Vec<IpNet>,
    warnings: &mut BTreeSet<PlanWarning>,
) -> Vec<RouteChange> {
    prefixes
        .into_iter()
        .map(
            |prefix| match planner.route_for(prefix, learned.get(&prefix), warnings) {
                Some(route) => RouteChange::Upsert(route),
                None => RouteChange::Remove(prefix),
            },
        )
        .collect()
}

/// Why the dataplane thread ended (its result).
async fn dataplane_ended(dataplane: &mut DataplaneThread) -> anyhow::Error {
    match dataplane.await {
        Ok(Ok(())) => anyhow::anyhow!("dataplane stopped"),
        Ok(Err(e)) => e,
        Err(e) => anyhow::anyhow!("dataplane failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_loop_ends_with_the_dataplane_threads_error_or_panic() {
        let mut failed: DataplaneThread = thread::spawn(DATAPLANE_THREAD, async {
            Err(anyhow::anyhow!("monitor socket closed")).context("dataplane stopped")
        })
        .unwrap();
        assert_eq!(
            format!("{:#}", dataplane_ended(&mut failed).await),
            "dataplane stopped: monitor socket closed"
        );
        let mut panicked: DataplaneThread =
            thread::spawn(DATAPLANE_THREAD, async { panic!("batch overflow") }).unwrap();
        assert_eq!(
            dataplane_ended(&mut panicked).await.to_string(),
            "dataplane failed: thread \"dataplane\" panicked: batch overflow"
        );
    }
}
