//! `podroute agent`: the datastore, the BGP speaker and the dataplane wired into one process.
//!
//! One event loop ([`Agent::run`]) owns the agent's view: the latest [`ClusterState`], the
//! sessions configured in the speaker, the prefixes announced, the BGP best paths learned.
//! After every change it recomputes (pure functions in [`peers`] and [`intent`], then
//! [`crate::plan::Planner`]) and hands the differences on: `set_peer`/`remove_peer` and
//! `announce`/`withdraw` to the speaker, route updates to the dataplane task. Nothing is
//! withdrawn or deleted before the datastore's initial sync: the loop starts only after it.
//!
//! Routes stream: a datastore or interface change re-plans everything and sends the full
//! plan, but a batch of BGP best-path changes only re-plans its prefixes
//! ([`crate::plan::Planner::route_for`]) and sends those routes as a delta, at once, so the
//! kernel takes the first routes of a table while the rest is still arriving. The agent keeps
//! no copy of the plan: the best paths and the [`crate::plan::Planner`] give it again when
//! `GET /routes` asks (the report is built only then).
//!
//! Metrics, `/readyz` and the status API read what the loop publishes into a
//! [`status::StatusBoard`] once a second and after every change.

pub mod annotate;
pub mod autodetect;
pub mod best_paths;
pub mod condition;
pub mod config;
pub mod intent;
pub mod listen;
pub mod peers;
pub mod report;
pub mod router_id;
pub mod selector;
pub mod services;
pub mod status;
pub mod tunnel_addr;

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

use crate::dataplane::ipip_user::{
    DropReason, ForwarderConfig, IpipCounters, IpipDataplane, TunnelTable, UserspaceIpip,
    process::RemoteForwarder,
};
use crate::dataplane::tunnel::{KernelIpip, TunnelDevice, TunnelError, TunnelSpec};
use crate::dataplane::{
    Dataplane, DataplaneConfig, DataplaneStatus, PlanMessage, PlanUpdate, RouteChange,
};
use crate::datastore::{self, DatastoreHandle, DatastoreSpec};
use crate::metrics::{Metrics, advance};
use crate::model::{AddressSource, NodeInfo};
use crate::plan::{
    self, DesiredRoute, LocalNode, PlanWarning, Planner, RouteKind, TUNNEL_DEVICE,
    WORKLOAD_IFACE_PREFIX,
};
use crate::state::{ClusterState, StateRx};
use best_paths::BestPaths;
use peers::{DesiredPeer, LocalIdentity, PeerType};
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
    pub metrics: Metrics,
    pub board: Arc<StatusBoard>,
    /// Where BGP passwords (`password.secretKeyRef`) are read.
    pub secrets: datastore::secrets::SecretSource,
    /// The Kubernetes API (kubernetes datastore): the Node condition and the tunnel address
    /// are written through it. `None` with the YAML-directory datastore.
    pub client: Option<kube::Client>,
}

/// Aborts a background task when dropped (with the agent).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The node name: `--nodename`/`NODENAME`, else the host name.
pub fn node_name(args: &AgentArgs) -> anyhow::Result<String> {
    if let Some(name) = args.nodename.as_deref().filter(|n| !n.trim().is_empty()) {
        return Ok(name.trim().to_string());
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!("no --nodename/NODENAME given and the host name cannot be read");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let host = String::from_utf8_lossy(&buf[..end]).to_string();
    // Kubernetes node names are the lowercase short or full host name.
    Ok(host.to_lowercase())
}

/// Starts the datastore the flags name; with `kubernetes` also returns the client (for the
/// node annotations).
pub async fn start_datastore(
    args: &AgentArgs,
    node: &str,
) -> anyhow::Result<(DatastoreHandle, Option<kube::Client>)> {
    let spec: DatastoreSpec = args.datastore_type.parse()?;
    Ok(match spec {
        DatastoreSpec::Kubernetes => {
            let client = kube::Client::try_default().await.context(
                "cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG); \
                 use --datastore-type dir:PATH to run without one",
            )?;
            (
                datastore::kube::spawn_with(client.clone(), node, args.datastore_wipe_confirm),
                Some(client),
            )
        }
        DatastoreSpec::Dir(path) => (
            datastore::dir::spawn_with(
                path,
                node,
                datastore::dir::DirOptions {
                    poll: args.dir_poll,
                    max_file_size: args.datastore_max_file_size,
                    wipe_confirm: args.datastore_wipe_confirm,
                },
            ),
            None,
        ),
    })
}

/// Waits for the datastore's first complete snapshot, beating the heartbeat meanwhile.
pub async fn wait_synced(
    state: &mut StateRx,
    board: &StatusBoard,
    source: &str,
) -> anyhow::Result<Arc<ClusterState>> {
    let mut waiting = tokio::time::interval(Duration::from_secs(1));
    let started = Instant::now();
    loop {
        tokio::select! {
            synced = state.synced() => return synced.context("datastore stopped before its initial sync"),
            _ = waiting.tick() => {
                board.beat("agent");
                let mut s = (*board.status()).clone();
                s.health.not_ready = vec![format!("datastore {source} not synced yet")];
                board.publish_status(s);
                if started.elapsed() > Duration::from_secs(10) && started.elapsed().as_secs().is_multiple_of(30) {
                    warn!(source, waited_s = started.elapsed().as_secs(), "still waiting for the datastore's initial sync");
                }
            }
        }
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
    best_rx: mpsc::UnboundedReceiver<Vec<BestChange>>,
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
    interfaces: BTreeSet<String>,
    plan_tx: mpsc::UnboundedSender<PlanMessage>,
    plan_seq: u64,
    /// The plan of the current cluster state and interfaces, without the learned routes.
    planner: Option<Planner>,
    /// A full plan of `planner` went to the dataplane (after the start-up deferral): best-path
    /// changes can now go as deltas.
    streaming: bool,
    plan_warnings: BTreeSet<PlanWarning>,
    pending: VecDeque<PendingPlan>,
    dp_status: watch::Receiver<DataplaneStatus>,
    peer_status: Vec<PeerStatus>,
    peer_counts: HashMap<IpAddr, PeerCounts>,
    tunnel: TunnelTracker,
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
}

/// Keeps `tunl0` in place while some pool uses IPIP.
struct TunnelTracker {
    /// `--ipip-dataplane` once resolved (auto probes the kernel the first time).
    mode: Option<IpipDataplane>,
    ready: Option<TunnelSpec>,
    /// Cluster-state revision `ready` was checked against.
    ready_revision: u64,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// The connection to the userspace forwarder process (which outlives the agent).
    forwarder: Option<RemoteForwarder>,
    table_tx: watch::Sender<Arc<TunnelTable>>,
    table_rx: watch::Receiver<Arc<TunnelTable>>,
    counters: Arc<IpipCounters>,
    /// Counter values already exported to Prometheus.
    exported: ExportedIpip,
}

#[derive(Default)]
struct ExportedIpip {
    encap_packets: u64,
    decap_packets: u64,
    encap_bytes: u64,
    decap_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Default for TunnelTracker {
    fn default() -> Self {
        let (table_tx, table_rx) = watch::channel(Arc::new(TunnelTable::default()));
        Self {
            mode: None,
            ready: None,
            ready_revision: 0,
            last_attempt: None,
            last_error: None,
            forwarder: None,
            table_tx,
            table_rx,
            counters: Arc::new(IpipCounters::new()),
            exported: ExportedIpip::default(),
        }
    }
}

impl Agent {
    /// Starts the speaker and the dataplane (in the calling thread's network namespace) and
    /// returns the loop, ready to [`run`](Self::run), with the dataplane task's handle.
    pub async fn start(
        args: AgentArgs,
        startup: Startup,
    ) -> anyhow::Result<(Self, JoinHandle<anyhow::Result<()>>)> {
        let Startup {
            node,
            address,
            address6,
            nic,
            datastore,
            datastore_source,
            metrics,
            board,
            secrets,
            client,
        } = startup;
        let state = datastore
            .state
            .latest()
            .context("the agent starts only after the datastore's initial sync")?;
        let mut dp = Dataplane::open(DataplaneConfig {
            protocol: args.route_protocol,
            ..DataplaneConfig::default()
        })
        .context("opening the dataplane")?;
        let reconcile = metrics.reconcile_seconds.clone();
        dp.on_reconcile(move |elapsed, _| reconcile.observe(elapsed.as_secs_f64()));
        // Routes of ours already in the kernel: this is a restart. The speaker then tells its
        // peers that forwarding state was kept (GR R and F bits) and defers its best-path
        // run until their End-of-RIB, and the first plan waits for it.
        let restarting = dp.status().installed_routes > 0;
        // The previous run's tunnel routes keep the userspace forwarder going until the first
        // plan of this run is applied.
        let adopted_tunnel_routes = dp.routes_via(TUNNEL_DEVICE);
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
        let (speaker, best_rx) =
            listen::start_speaker(cfg, listen::listen_candidates(args.bgp_bind, listen_port))
                .await
                .context("starting the BGP speaker")?;
        info!(node, ?address, ?address6, nic, local_as, %router_id, listen_port, "BGP speaker started");

        let (plan_tx, plan_rx) = mpsc::unbounded_channel();
        let (status_tx, dp_status) = watch::channel(DataplaneStatus::default());
        let dataplane_task = tokio::spawn(async move {
            dp.run(plan_rx, status_tx)
                .await
                .context("dataplane stopped")
        });

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
            interfaces: intent::interfaces_with_prefix(WORKLOAD_IFACE_PREFIX),
            plan_tx,
            plan_seq: 0,
            planner: None,
            streaming: false,
            plan_warnings: BTreeSet::new(),
            pending: VecDeque::new(),
            dp_status,
            peer_status: Vec::new(),
            peer_counts: HashMap::new(),
            tunnel: TunnelTracker::default(),
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
        };
        if !adopted_tunnel_routes.is_empty() {
            let remotes = adopted_tunnel_routes
                .iter()
                .filter_map(|(dst, gw)| match (dst, gw) {
                    (IpNet::V4(dst), IpAddr::V4(gw)) => Some((*dst, *gw)),
                    _ => None,
                });
            let table = TunnelTable::new(remotes, agent.other_node_addrs(), agent.v4_pools());
            agent.tunnel.table_tx.send_replace(Arc::new(table));
        }
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
        mut dataplane: JoinHandle<anyhow::Result<()>>,
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
                    return Ok(());
                }
                changed = state_rx.changed() => {
                    let at = Instant::now();
                    self.state = changed.context("datastore stopped")?;
                    self.apply_state(at).await?;
                }
                batch = self.best_rx.recv() => {
                    let at = Instant::now();
                    let Some(batch) = batch else { bail!("BGP speaker stopped") };
                    let mut changed = self.absorb(batch);
                    // Take everything already queued: one update for a burst of UPDATEs.
                    while let Ok(more) = self.best_rx.try_recv() {
                        changed.extend(self.absorb(more));
                    }
                    self.send_delta(at, changed);
                }
                Some(request) = self.route_requests.recv() => {
                    let _ = request.send(self.route_report());
                }
                changed = self.dp_status.changed() => {
                    if changed.is_err() {
                        // The dataplane task ended; its result says why.
                        return match (&mut dataplane).await {
                            Ok(Ok(())) => Err(anyhow::anyhow!("dataplane stopped")),
                            Ok(Err(e)) => Err(e),
                            Err(e) => Err(anyhow::anyhow!("dataplane task failed: {e}")),
                        };
                    }
                    self.on_dataplane();
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

    /// Takes best-path changes into `learned`; returns the prefixes they touched.
    fn absorb(&mut self, batch: Vec<BestChange>) -> Vec<IpNet> {
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
    fn send_delta(&mut self, at: Instant, changed: Vec<IpNet>) {
        if !self.streaming || changed.is_empty() {
            return;
        }
        let Some(planner) = &self.planner else {
            return;
        };
        let mut warnings = BTreeSet::new();
        let mut tunnel_affected = false;
        let tunnel_table = self.tunnel.table_rx.borrow().clone();
        let in_tunnel_table = |prefix: &IpNet| match prefix {
            IpNet::V4(p) => tunnel_table
                .remotes()
                .binary_search_by(|(r, _)| r.cmp(p))
                .is_ok(),
            IpNet::V6(_) => false,
        };
        let changes: Vec<RouteChange> = changed
            .into_iter()
            .map(|prefix| {
                let next_hop = self.learned.get(&prefix);
                let route = planner.route_for(prefix, next_hop, &mut warnings);
                tunnel_affected |= in_tunnel_table(&prefix)
                    || route.as_ref().is_some_and(|r| {
                        matches!(r.kind, RouteKind::BlockIpip | RouteKind::BorrowedIpip)
                    });
                match route {
                    Some(route) => RouteChange::Upsert(route),
                    None => RouteChange::Remove(prefix),
                }
            })
            .collect();
        for w in warnings {
            if !self.plan_warnings.contains(&w) {
                warn!("plan: {w}");
                self.plan_warnings.insert(w);
            }
        }
        if tunnel_affected {
            self.update_tunnel_table();
        }
        self.send_plan(PlanUpdate::Delta(changes), at, "bgp");
    }

    fn send_plan(&mut self, update: PlanUpdate, at: Instant, trigger: &'static str) {
        self.plan_seq += 1;
        let seq = self.plan_seq;
        self.pending.push_back(PendingPlan {
            seq,
            event_at: at,
            trigger,
        });
        while self.pending.len() > MAX_PENDING {
            self.pending.pop_front();
        }
        // A closed channel means the dataplane task ended; the loop learns why from its handle.
        let _ = self.plan_tx.send(PlanMessage { seq, update });
    }

    /// A new cluster state: sessions, announcements, plan.
    async fn apply_state(&mut self, at: Instant) -> anyhow::Result<()> {
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
        if let Some(flag_as) = self
            .args
            .as_number
            .or(state.local().and_then(|n| n.as_number))
            && flag_as != self.local_as
        {
            warn!(
                running = self.local_as,
                configured = flag_as,
                "the node's AS number changed; restart the agent to apply it"
            );
        }
        if state.bgp.listen_port != self.listen_port {
            warn!(
                running = self.listen_port,
                configured = state.bgp.listen_port,
                "BGP listenPort changed; restart the agent to apply it"
            );
        }

        // Export policy before sessions and announcements: nothing outside it is ever sent.
        let rules = intent::export_rules(&state);
        if self.export_rules.as_ref() != Some(&rules) {
            debug!(
                allow = rules.allow.len(),
                deny = rules.deny.len(),
                aggregates = rules.aggregates.len(),
                "export policy"
            );
            self.speaker
                .set_export_rules(Some(rules.clone()))
                .await
                .context("BGP speaker")?;
            self.export_rules = Some(rules);
        }

        // Sessions.
        let passwords = self
            .passwords
            .resolve(
                state
                    .peers
                    .values()
                    .filter_map(|p| p.password.as_ref())
                    .chain(state.bgp.node_mesh_password.as_ref()),
            )
            .await;
        let set = peers::desired_peers_with(&state, &self.identity(), &passwords);
        for w in &set.warnings {
            if !self.peer_warnings.contains(w) {
                warn!("{w}");
            }
        }
        self.peer_warnings = set.warnings;
        let gone: Vec<IpAddr> = self
            .peers
            .keys()
            .filter(|a| !set.peers.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(old) = self.peers.remove(&addr) {
                info!(peer = %addr, name = old.desired.name, "removing BGP peer");
                self.speaker
                    .remove_peer(addr)
                    .await
                    .context("BGP speaker")?;
                self.metrics
                    .remove_peer(&addr.to_string(), old.desired.peer_type.label());
                self.peer_counts.remove(&addr);
            }
        }
        for (addr, desired) in peers::in_connect_order(set.peers) {
            let unchanged = self.peers.get(&addr).is_some_and(|p| p.desired == desired);
            if unchanged {
                continue;
            }
            info!(peer = %addr, name = desired.name, peer_type = desired.peer_type.label(), remote_as = desired.config.remote_as, passive = desired.config.passive, "configuring BGP peer");
            self.speaker
                .set_peer(desired.config.clone())
                .await
                .context("BGP speaker")?;
            if let Some(old) = self.peers.get(&addr)
                && old.desired.peer_type != desired.peer_type
            {
                self.metrics
                    .remove_peer(&addr.to_string(), old.desired.peer_type.label());
            }
            let since = self.peers.get(&addr).map_or(at, |p| p.since);
            self.peers.insert(addr, ConfiguredPeer { desired, since });
        }

        // Announcements: the blocks, and the service prefixes (Calico's rules).
        let service_prefixes = services::service_prefixes(&state);
        for (kind, count) in services::count_by_kind(&service_prefixes) {
            self.metrics
                .service_prefixes
                .with_label_values(&[kind.label()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut wanted = intent::advertisements(&state);
        wanted.extend(service_prefixes.keys().copied());
        self.service_rows = service_prefixes
            .iter()
            .map(|(prefix, reasons)| status::ServicePrefixRow {
                prefix: prefix.to_string(),
                reasons: reasons.iter().map(ToString::to_string).collect(),
            })
            .collect();
        for prefix in self.announced.difference(&wanted) {
            debug!(%prefix, "withdrawing");
            self.speaker
                .withdraw(*prefix)
                .await
                .context("BGP speaker")?;
        }
        for prefix in wanted.difference(&self.announced) {
            debug!(%prefix, "announcing");
            self.speaker
                .announce(*prefix, None)
                .await
                .context("BGP speaker")?;
        }
        if wanted != self.announced {
            info!(
                prefixes = wanted.len(),
                services = service_prefixes.len(),
                "announcing this node's blocks and service prefixes"
            );
        }
        self.announced = wanted;

        self.count_rejections();
        self.replan(at, "datastore");
        if self.deferral.is_none() {
            self.update_tunnel_table();
        }
        self.ensure_tunnel().await;
        self.publish();
        // A new state (the first above all: every peer configured at once) leaves much freed
        // memory in the heap; give it back.
        crate::datastore::trim_heap();
        Ok(())
    }

    fn count_rejections(&mut self) {
        for (kind, count) in self.datastore.counters.snapshot() {
            let label = kind.as_str();
            let last = self.reject_seen.entry(label).or_insert(0);
            advance(
                &self.metrics.invalid_objects.with_label_values(&[label]),
                last,
                count,
            );
        }
    }

    /// Recomputes the plan without the learned routes; when that part changed (or no full
    /// plan was sent yet), sends the full plan to the dataplane. Learned routes need no
    /// re-plan here: their routes depend only on the part compared, and deltas keep them
    /// current.
    fn replan(&mut self, at: Instant, trigger: &'static str) {
        let input = intent::plan_input(
            &self.state,
            &self.local_node(),
            &BTreeMap::new(),
            &self.interfaces,
        );
        // What this node announces (its blocks, service prefixes) is never routed to a peer
        // that announces it too: every node announces the service CIDRs.
        let planner = Planner::new(&input).originating(self.announced.iter().copied());
        if self.streaming && self.planner.as_ref() == Some(&planner) {
            return;
        }
        let mut warnings = planner.warnings().clone();
        let routes: Vec<DesiredRoute> =
            planner.routes(self.learned.iter(), &mut warnings).collect();
        for w in &warnings {
            if !self.plan_warnings.contains(w) {
                warn!("plan: {w}");
            }
        }
        self.plan_warnings = warnings;
        debug!(routes = routes.len(), trigger, "new route plan");
        self.planner = Some(planner);
        if self.deferral.is_none() {
            self.update_tunnel_table();
            self.streaming = true;
            self.send_plan(PlanUpdate::Full(routes), at, trigger);
        }
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
        while let Ok(batch) = self.best_rx.try_recv() {
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
        self.replan(Instant::now(), "startup");
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
        report::routes(&self.node, routes.as_deref(), &dp, &self.state)
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        self.board.beat("agent");
        let interfaces = intent::interfaces_with_prefix(WORKLOAD_IFACE_PREFIX);
        if interfaces != self.interfaces {
            self.interfaces = interfaces;
            self.replan(Instant::now(), "interfaces");
        }
        self.check_link().await?;
        self.peer_status = self.speaker.peers().await.context("BGP speaker")?;
        let summary = self.speaker.summary().await.context("BGP speaker")?;
        report::update_connect_metrics(&self.metrics, &summary);
        self.ensure_tunnel().await;
        self.export_tunnel_counters();
        self.publish();
        Ok(())
    }

    /// When the host NIC loses its carrier (or is set down), the peers on its subnet are
    /// unreachable: their sessions are reset at once instead of waiting for the hold timer,
    /// so their routes go now (no graceful restart: the peer did not restart, we lost it).
    async fn check_link(&mut self) -> anyhow::Result<()> {
        let up = link_is_up(&self.nic);
        if up == Some(false) && !self.nic_down {
            self.nic_down = true;
            let lost: Vec<IpAddr> = self
                .peers
                .keys()
                .filter(|a| match a {
                    IpAddr::V4(v4) => self.address.is_some_and(|a| a.contains(v4)),
                    IpAddr::V6(v6) => self.ipv6().is_some_and(|a| a.contains(v6)),
                })
                .copied()
                .collect();
            warn!(nic = self.nic, peers = ?lost, "host NIC is down; resetting the sessions to peers on its subnet");
            for addr in lost {
                self.speaker
                    .remove_peer(addr)
                    .await
                    .context("BGP speaker")?;
                if let Some(p) = self.peers.get(&addr) {
                    self.speaker
                        .set_peer(p.desired.config.clone())
                        .await
                        .context("BGP speaker")?;
                }
            }
        } else if up == Some(true) && self.nic_down {
            self.nic_down = false;
            info!(nic = self.nic, "host NIC is up again");
        }
        Ok(())
    }

    /// Creates `tunl0` when a pool needs IPIP (retried every 30 s while it fails): the
    /// kernel's ipip device, or a TUN device plus the userspace forwarder
    /// (`--ipip-dataplane`).
    async fn ensure_tunnel(&mut self) {
        let needs = self
            .state
            .pools
            .values()
            .any(|p| p.ipip_mode.is_on() && p.cidr.addr().is_ipv4());
        if !needs {
            return;
        }
        let forwarder_failed = self
            .tunnel
            .forwarder
            .as_ref()
            .and_then(|f| f.exit())
            .map(|exit| format!("{exit:?}"));
        if let Some(exit) = forwarder_failed {
            warn!(
                exit,
                "userspace IPIP forwarder stopped; setting tunl0 up again"
            );
            self.tunnel.forwarder = None;
            self.tunnel.ready = None;
        }
        // The spec depends only on the cluster state: nothing to check at a tick when the
        // device was set up for this revision.
        if self.tunnel.ready.is_some() && self.tunnel.ready_revision == self.state.revision {
            return;
        }
        let input = intent::plan_input(
            &self.state,
            &self.local_node(),
            &BTreeMap::new(),
            &BTreeSet::new(),
        );
        let annotated = self.state.local().and_then(|n| n.ipip_tunnel_addr);
        let spec = TunnelSpec {
            name: TUNNEL_DEVICE.to_string(),
            nic: self.nic.clone(),
            // With the Kubernetes API the address comes from IPAM (annotated once allocated);
            // a guess could be a pod's address. Without it, the plan's fallback.
            address: if self.tunnel_addr.is_some() {
                annotated
            } else {
                plan::tunnel_address(&input, annotated)
            },
        };
        if self.tunnel.ready.as_ref() == Some(&spec) {
            self.tunnel.ready_revision = self.state.revision;
            return;
        }
        if self
            .tunnel
            .last_attempt
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            && self.tunnel.last_error.is_some()
        {
            return;
        }
        self.tunnel.last_attempt = Some(Instant::now());
        match self.setup_tunnel(&spec).await {
            Ok(()) => {
                self.tunnel.ready = Some(spec);
                self.tunnel.ready_revision = self.state.revision;
                self.tunnel.last_error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if self.tunnel.last_error.as_deref() != Some(&text) {
                    match e {
                        TunnelError::IpipUnsupported { .. } => warn!("{text}"),
                        _ => {
                            warn!(error = %text, "cannot set up the IPIP tunnel device; retrying in 30 s")
                        }
                    }
                }
                self.tunnel.last_error = Some(text);
            }
        }
    }

    async fn setup_tunnel(&mut self, spec: &TunnelSpec) -> Result<(), TunnelError> {
        let mode = match self.tunnel.mode {
            Some(mode) => mode,
            None => {
                let mode = self.args.ipip_dataplane.resolve().await?;
                self.tunnel.mode = Some(mode);
                mode
            }
        };
        match mode {
            IpipDataplane::Userspace => {
                UserspaceIpip::connect()?.ensure(spec).await?;
                if self.tunnel.forwarder.is_none() {
                    let Some(local) = self.address.map(|a| a.addr()) else {
                        return Err(TunnelError::Io {
                            what: "the userspace IPIP forwarder".into(),
                            error: "this node has no IPv4 address (IPv6-only); IPIP pools \
                                    need one"
                                .into(),
                        });
                    };
                    let program = std::env::current_exe()
                        .map_err(|e| TunnelError::io("finding the podroute binary", e))?;
                    let forwarder = RemoteForwarder::adopt_or_start(
                        self.args.ipip_forwarder,
                        &program,
                        &ForwarderConfig::new(local),
                        &self.args.log,
                        self.tunnel.table_rx.clone(),
                        self.tunnel.counters.clone(),
                    )
                    .await?;
                    info!(
                        device = spec.name,
                        %local,
                        pid = forwarder.pid,
                        adopted = forwarder.adopted,
                        "userspace IPIP forwarder process running"
                    );
                    self.tunnel.forwarder = Some(forwarder);
                    // During the start-up deferral the table seeded from the adopted routes
                    // stays; otherwise the current plan's.
                    if self.deferral.is_none() {
                        self.update_tunnel_table();
                    }
                }
            }
            _ => {
                KernelIpip::connect()?.ensure(spec).await?;
            }
        }
        Ok(())
    }

    /// Hands the remote-block table of the current plan to the userspace forwarder (when one
    /// runs).
    fn update_tunnel_table(&self) {
        if self.tunnel.forwarder.is_none() {
            return;
        }
        let Some(planner) = &self.planner else {
            return;
        };
        let mut warnings = BTreeSet::new();
        let routes = planner.routes(self.learned.iter(), &mut warnings);
        let pools = self.state.pools.values().map(|p| p.cidr);
        let table = TunnelTable::from_plan(routes, self.other_node_addrs(), pools);
        if **self.tunnel.table_tx.borrow() != table {
            self.tunnel.table_tx.send_replace(Arc::new(table));
        }
    }

    /// IPv4 addresses of the other nodes (sources the tunnel accepts).
    fn other_node_addrs(&self) -> Vec<Ipv4Addr> {
        self.state
            .nodes
            .values()
            .filter(|n| n.name != self.node)
            .filter_map(NodeInfo::ipv4_addr)
            .collect()
    }

    fn v4_pools(&self) -> Vec<Ipv4Net> {
        self.state
            .pools
            .values()
            .filter_map(|p| match p.cidr {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            })
            .collect()
    }

    fn export_tunnel_counters(&mut self) {
        let now = self.tunnel.counters.snapshot();
        let last = &mut self.tunnel.exported;
        let m = &self.metrics;
        advance(
            &m.ipip_packets.with_label_values(&["encap"]),
            &mut last.encap_packets,
            now.encap_packets,
        );
        advance(
            &m.ipip_packets.with_label_values(&["decap"]),
            &mut last.decap_packets,
            now.decap_packets,
        );
        advance(
            &m.ipip_bytes.with_label_values(&["encap"]),
            &mut last.encap_bytes,
            now.encap_bytes,
        );
        advance(
            &m.ipip_bytes.with_label_values(&["decap"]),
            &mut last.decap_bytes,
            now.decap_bytes,
        );
        for reason in DropReason::ALL {
            advance(
                &m.ipip_drops.with_label_values(&[reason.label()]),
                &mut last.drops[reason.index()],
                now.dropped(reason),
            );
        }
    }

    /// Refreshes metrics and the status board.
    fn publish(&mut self) {
        let dp = self.dp_status.borrow().clone();
        report::update_peer_metrics(
            &self.metrics,
            &self.peer_status,
            &self.peers_by_addr(),
            &mut self.peer_counts,
        );
        report::update_route_metrics(&self.metrics, &dp);
        let ready = self.readiness(&dp);
        self.metrics.ready.set(i64::from(ready.is_empty()));
        self.metrics
            .config_warnings
            .set(self.peer_warnings.len() as i64);
        // Only nodes with TCP-MD5 sessions read the kernel's counters (publish runs often).
        if self
            .peers
            .values()
            .any(|p| p.desired.config.password.is_some())
        {
            report::update_md5_metrics(&self.metrics, &mut self.md5_counts);
        }
        self.condition.observe(ready.is_empty());
        let mut status = status::AgentStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ipv4: self.address.map(|a| a.to_string()),
            ipv6: self.ipv6().map(|a| a.to_string()),
            nic: Some(self.nic.clone()),
            as_number: self.local_as,
            router_id: self.router_id.to_string(),
            started: report::unix_secs(self.started),
            health: status::Health {
                live: true,
                ready: ready.is_empty(),
                not_ready: ready,
            },
            datastore: status::DatastoreStatus {
                source: self.datastore_source.clone(),
                synced: true,
                revision: self.state.revision,
                rejected: self
                    .state
                    .rejected
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                errors: self.state.source_errors.clone(),
            },
            dataplane: status::DataplaneSummary {
                programmed: dp.programmed,
                desired_routes: dp.desired_routes,
                installed_routes: dp.installed_routes,
                failed_routes: dp.failures.len(),
            },
            peers: report::peer_rows(&self.peer_status, &self.peers_by_addr()),
            peer_summary: None,
            config_warnings: self.peer_warnings.clone(),
            service_prefixes: self.service_rows.clone(),
        };
        status
            .datastore
            .errors
            .extend(self.peer_warnings.iter().cloned());
        if let Some(e) = &self.tunnel.last_error {
            status.datastore.errors.push(e.clone());
        }
        if let Some(w) = self.tunnel_address_warning() {
            status.datastore.errors.push(w);
        }
        self.board.publish_status(status);
    }

    fn peers_by_addr(&self) -> BTreeMap<IpAddr, (String, PeerType, bool)> {
        self.peers
            .iter()
            .map(|(a, p)| {
                (
                    *a,
                    (
                        p.desired.name.clone(),
                        p.desired.peer_type,
                        p.desired.config.passive,
                    ),
                )
            })
            .collect()
    }

    /// With the YAML-directory datastore and an IPIP pool, a Node without
    /// `projectcalico.org/IPv4IPIPTunnelAddr` gets a tunnel address no IPAM reserved.
    fn tunnel_address_warning(&self) -> Option<String> {
        if self.tunnel_addr.is_some()
            || self
                .state
                .local()
                .and_then(|n| n.ipip_tunnel_addr)
                .is_some()
        {
            return None;
        }
        let address = self.tunnel.ready.as_ref()?.address?;
        Some(format!(
            "tunl0 uses {address}, which is not allocated in IPAM: the YAML-directory datastore \
             cannot allocate it; set the Node's projectcalico.org/IPv4IPIPTunnelAddr annotation"
        ))
    }

    /// Known blocks this node has no programmed route for, that should hold readiness back:
    /// every block (own or of another node, outside disabled and disableBGPExport pools)
    /// without a planned route or whose route failed, while the agent is younger than
    /// `--ready-grace` or its node's BGP session with us is Established (the route should
    /// come). A block of a node we have had no session with for the grace time does not hold
    /// readiness (a dead node must not make every other node unready).
    fn unrouted_blocks(&self, dp: &DataplaneStatus) -> Vec<String> {
        let Some(planner) = &self.planner else {
            return Vec::new();
        };
        let young = self
            .started
            .elapsed()
            .is_ok_and(|age| age < self.args.ready_grace);
        let states = report::PeerStates::new(&self.peer_status);
        let established = |node: &str| {
            let Some(addr) = self.state.nodes.get(node).and_then(NodeInfo::ipv4_addr) else {
                return false;
            };
            states.get(IpAddr::V4(addr)) == Some(podroute_bgp::fsm::State::Established)
        };
        let failed: BTreeSet<IpNet> = dp.failures.iter().map(|f| f.route.prefix).collect();
        let mut missing = Vec::new();
        let mut warnings = BTreeSet::new();
        for block in self.state.blocks.values() {
            let Some(host) = block.host() else { continue };
            if block.deleted {
                continue;
            }
            let own = host == self.node;
            let exported = self
                .state
                .pool_containing(&block.cidr)
                .is_some_and(|p| !p.disabled && !p.disable_bgp_export);
            if !own && !exported {
                continue;
            }
            let prefix = block.cidr.trunc();
            let routed = planner
                .route_for(prefix, self.learned.get(&prefix), &mut warnings)
                .is_some()
                && !failed.contains(&prefix);
            if routed || !(own || young || established(host)) {
                continue;
            }
            missing.push(format!("{prefix} ({host})"));
        }
        missing
    }

    /// Reasons the agent is not ready (empty = ready).
    fn readiness(&self, dp: &DataplaneStatus) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.deferral.is_some() {
            reasons.push(
                "waiting for End-of-RIB from BGP peers before the first route update".to_string(),
            );
        }
        reasons.extend(self.state.suspect.iter().map(|s| s.message.clone()));
        if !dp.programmed || dp.applied.is_none() {
            reasons.push("first route reconcile not applied yet".to_string());
        } else {
            let missing = self.unrouted_blocks(dp);
            if !missing.is_empty() {
                let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
                reasons.push(format!(
                    "{} known block(s) not routed yet: {}{}",
                    missing.len(),
                    shown.join(", "),
                    if missing.len() > 5 { ", ..." } else { "" }
                ));
            }
        }
        let states = report::PeerStates::new(&self.peer_status);
        for (addr, peer) in &self.peers {
            if peer.desired.peer_type != PeerType::Mesh
                || peer.since.elapsed() >= self.args.ready_grace
            {
                continue;
            }
            let state = states.get(*addr).map(|s| s.to_string());
            if state.as_deref() != Some("Established") {
                reasons.push(format!(
                    "mesh peer {addr} ({}) is {} (waiting up to {:?})",
                    peer.desired.name,
                    state.as_deref().unwrap_or("unknown"),
                    self.args.ready_grace
                ));
            }
        }
        reasons
    }
}

/// The node's addresses (with prefixes) and the interface holding the first of them.
struct NodeAddresses {
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    interface: Option<String>,
}

/// The node's addresses: `--ip` / `--ip6` and autodetection as calico/node does it; with
/// `none`, the address the Node object already carries. One of the two is needed.
fn resolve_addresses(args: &AgentArgs, state: &ClusterState) -> anyhow::Result<NodeAddresses> {
    let local = state.local();
    let internal_ip = local
        .filter(|n| n.ipv4_source == Some(AddressSource::InternalIp))
        .and_then(NodeInfo::ipv4_addr);
    let detected = autodetect::resolve(&args.ip, &args.ip_autodetection_method, internal_ip)?;
    let ifaces = || autodetect::list_interfaces().unwrap_or_default();
    let (v4, v4_interface) = match detected {
        Some(d) => (Some(d.address), d.interface),
        None => match local.and_then(|n| n.ipv4) {
            Some(net) => {
                let holder =
                    autodetect::interface_of(net.addr(), &ifaces()).map(|i| i.name.clone());
                (Some(net), holder)
            }
            None => (None, None),
        },
    };
    if let (Some(annotated), Some(address)) = (local.and_then(|n| n.ipv4), v4)
        && local.and_then(|n| n.ipv4_source) == Some(AddressSource::Annotation)
        && annotated != address
    {
        warn!(%annotated, %address, "the Node's projectcalico.org/IPv4Address differs from the address found here");
    }
    let detected6 = autodetect::resolve6(
        &args.ip6,
        &args.ip6_autodetection_method,
        local.and_then(|n| n.internal_ipv6),
    )?;
    let (v6, v6_interface) = match detected6 {
        Some(d) => {
            if let Some(annotated) = local.and_then(|n| n.ipv6)
                && annotated != d.address
            {
                warn!(%annotated, address = %d.address, "the Node's projectcalico.org/IPv6Address differs from the address found here");
            }
            (Some(d.address), d.interface)
        }
        None => match local.and_then(|n| n.ipv6) {
            Some(net) => {
                let holder =
                    autodetect::interface_of6(net.addr(), &ifaces()).map(|i| i.name.clone());
                (Some(net), holder)
            }
            None => (None, None),
        },
    };
    if v4.is_none() && v6.is_none() {
        bail!(
            "the Node {:?} has neither an IPv4 nor an IPv6 address (IP={:?}, IP6={:?}); podroute \
             needs one for BGP: set IP or IP6 (autodetect or an address)",
            state.local_node,
            args.ip,
            args.ip6
        );
    }
    let interface = v4_interface.or(v6_interface);
    info!(
        ipv4 = ?v4,
        ipv6 = ?v6,
        interface = interface.as_deref().unwrap_or("?"),
        method = args.ip_autodetection_method,
        method6 = args.ip6_autodetection_method,
        "node addresses"
    );
    Ok(NodeAddresses { v4, v6, interface })
}

/// Whether `name` is up with carrier (`IFF_UP` and `IFF_RUNNING`); `None` if unknown.
fn link_is_up(name: &str) -> Option<bool> {
    let cname = std::ffi::CString::new(name).ok()?;
    if cname.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) and is NUL-terminated;
    // the socket is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(cname.as_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        libc::close(fd);
        if rc < 0 {
            return None;
        }
        let flags = i32::from(req.ifr_ifru.ifru_flags);
        Some(flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0)
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// `podroute agent`: runs until SIGTERM/SIGINT or a fatal error.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let node = node_name(&args)?;
    let metrics =
        Metrics::with_peer_labels(args.metrics_peer_labels, args.metrics_peer_label_limit);
    let board = Arc::new(StatusBoard::new());
    board.beat("agent");
    info!(
        node,
        version = env!("CARGO_PKG_VERSION"),
        datastore = args.datastore_type,
        "podroute agent starting"
    );
    let _http = crate::http::start(
        &crate::http::HttpConfig {
            metrics_addr: args.metrics_addr,
            status_addr: args.status_addr,
            limits: crate::http::Limits {
                max_connections: args.http_max_connections,
                header_timeout: args.http_header_timeout,
                idle_timeout: args.http_idle_timeout,
            },
            live_max_age: LIVENESS_MAX_AGE,
        },
        board.clone(),
        metrics.clone(),
    )
    .await?;

    let (mut datastore, client) = start_datastore(&args, &node).await?;
    let source = args.datastore_type.clone();
    let state = tokio::select! {
        s = wait_synced(&mut datastore.state, &board, &source) => s?,
        _ = termination() => return Ok(()),
    };
    info!(
        revision = state.revision,
        nodes = state.nodes.len(),
        pools = state.pools.len(),
        blocks = state.blocks.len(),
        "datastore synced"
    );
    if state.local().is_none() {
        warn!(
            node,
            "no Node object named {node:?} in the datastore; is NODENAME right?"
        );
    }
    let addresses = resolve_addresses(&args, &state)?;
    let nic = match (&args.nic, addresses.interface) {
        (Some(nic), _) => nic.clone(),
        (None, Some(holder)) => holder,
        (None, None) => {
            bail!(
                "cannot tell which interface holds the node address ({}); set \
                 --nic/PODROUTE_NIC",
                addresses
                    .v4
                    .map(|a| a.to_string())
                    .or(addresses.v6.map(|a| a.to_string()))
                    .unwrap_or_default()
            )
        }
    };
    let secrets = match (&client, args.datastore_type.parse::<DatastoreSpec>()) {
        (Some(client), _) => datastore::secrets::SecretSource::Kube {
            client: client.clone(),
            namespace: datastore::secrets::own_namespace(),
        },
        (None, Ok(DatastoreSpec::Dir(path))) => datastore::secrets::SecretSource::Dir(path),
        _ => datastore::secrets::SecretSource::None,
    };
    if let Some(client) = client.clone()
        && !args.no_annotate
    {
        let wanted = annotate::wanted_annotations(addresses.v4, addresses.v6, args.as_number);
        match annotate::ensure_annotations(client, &node, &wanted).await {
            Ok(true) => info!(node, ?wanted, "node annotations written"),
            Ok(false) => debug!(node, "node annotations already right"),
            // Peers may still find this node by its InternalIP; keep running.
            Err(e) => warn!(error = %e, "cannot write the node's annotations"),
        }
    }
    let startup = Startup {
        node,
        address: addresses.v4,
        address6: addresses.v6,
        nic,
        datastore,
        datastore_source: source,
        metrics,
        board,
        secrets,
        client,
    };
    let (agent, dataplane) = Agent::start(args, startup).await?;
    agent.run(dataplane, termination()).await
}
