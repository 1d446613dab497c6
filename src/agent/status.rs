//! What the running agent reports about itself: the JSON documents of the status API
//! (`GET /status`, `GET /routes`) that `podroute status` and `podroute routes` print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    /// The node's IPv4 address with prefix (`192.168.92.128/24`).
    pub ipv4: Option<String>,
    /// The node's IPv6 address with prefix (`fd00:92::128/64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Host NIC used for direct routes.
    pub nic: Option<String>,
    pub as_number: u32,
    pub router_id: String,
    /// Unix seconds when the agent started.
    pub started: u64,
    pub health: Health,
    pub datastore: DatastoreStatus,
    pub dataplane: DataplaneSummary,
    pub peers: Vec<PeerRow>,
    /// Present when `peers` lists only some of the peers (`GET /status` beyond
    /// [`crate::http::STATUS_PEERS_DEFAULT`] peers; `?peers=all` lists them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_summary: Option<PeerSummary>,
    /// Configuration podroute cannot honour as written, one line per object and field
    /// (a BGPPeer's unreadable password, a missing BGPFilter, `reachableBy`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_warnings: Vec<String>,
    /// The service prefixes this node advertises and why (BGPConfiguration
    /// `serviceClusterIPs`, `serviceExternalIPs`, `serviceLoadBalancerIPs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_prefixes: Vec<ServicePrefixRow>,
}

/// One advertised service prefix and its reasons (`podroute status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePrefixRow {
    pub prefix: String,
    pub reasons: Vec<String>,
}

/// All peers counted, when `AgentStatus::peers` lists only some.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// Peers configured.
    pub total: usize,
    /// Peers listed in `peers`: those not Established first, then by address.
    pub listed: usize,
    /// Every peer counted by BGP FSM state.
    pub by_state: BTreeMap<String, usize>,
}

impl AgentStatus {
    /// A copy that lists at most `limit` peers, the ones not Established first (they are what
    /// an operator looks for), with a [`PeerSummary`] of all; `None` when all fit.
    pub fn with_peer_limit(&self, limit: usize) -> Option<AgentStatus> {
        if self.peers.len() <= limit {
            return None;
        }
        let mut by_state = BTreeMap::new();
        for p in &self.peers {
            *by_state.entry(p.state.clone()).or_insert(0) += 1;
        }
        let (down, up): (Vec<&PeerRow>, Vec<&PeerRow>) =
            self.peers.iter().partition(|p| p.state != "Established");
        let peers: Vec<PeerRow> = down.into_iter().chain(up).take(limit).cloned().collect();
        Some(AgentStatus {
            node: self.node.clone(),
            version: self.version.clone(),
            ipv4: self.ipv4.clone(),
            ipv6: self.ipv6.clone(),
            nic: self.nic.clone(),
            as_number: self.as_number,
            router_id: self.router_id.clone(),
            started: self.started,
            health: self.health.clone(),
            datastore: self.datastore.clone(),
            dataplane: self.dataplane.clone(),
            config_warnings: self.config_warnings.iter().take(limit).cloned().collect(),
            service_prefixes: self.service_prefixes.clone(),
            peer_summary: Some(PeerSummary {
                total: self.peers.len(),
                listed: peers.len(),
                by_state,
            }),
            peers,
        })
    }
}

/// Liveness and readiness, with the reasons readiness is not (yet) given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub live: bool,
    pub ready: bool,
    /// Why `ready` is false (empty when ready), e.g. "datastore not synced".
    pub not_ready: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreStatus {
    /// `kubernetes` or `dir:PATH`.
    pub source: String,
    pub synced: bool,
    pub revision: u64,
    /// Objects skipped or held at their last valid version: "IPPool/name: reason".
    pub rejected: Vec<String>,
    /// Problems of the source itself (unreadable files, API errors).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneSummary {
    /// A plan was applied at least once.
    pub programmed: bool,
    pub desired_routes: usize,
    pub installed_routes: usize,
    pub failed_routes: usize,
}

/// One BGP peer, as in `calicoctl node status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub address: String,
    pub port: u16,
    /// `node-to-node mesh`, `global` or `node specific` (Calico's wording).
    pub peer_type: String,
    /// The peer node's name (mesh) or the BGPPeer's name.
    pub name: String,
    pub remote_as: u32,
    /// BGP FSM state: `Idle`, `Connect`, `Active`, `OpenSent`, `OpenConfirm`, `Established`.
    pub state: String,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// `Established`, or the last error ("Hold Timer Expired", "Connection refused", ...).
    pub info: String,
    pub passive: bool,
    pub prefixes_received: usize,
    pub prefixes_accepted: usize,
    pub prefixes_advertised: usize,
    /// Routes of a restarting peer kept (stale) under graceful restart.
    #[serde(default)]
    pub stale_prefixes: usize,
    /// Announcements refused since the peer was configured: by loop detection...
    #[serde(default)]
    pub routes_rejected_loop: u64,
    /// ... by BGPFilter import rules...
    #[serde(default)]
    pub routes_rejected_filter: u64,
    /// ... and by RFC 7606 treat-as-withdraw (malformed attributes, peer checks).
    #[serde(default)]
    pub routes_rejected_malformed: u64,
}

/// `GET /routes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesReport {
    pub node: String,
    pub routes: Vec<RouteRow>,
    /// The VXLAN devices and remote VTEPs, when the node has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanReport>,
}

/// The VXLAN part of `GET /routes`: devices, remote VTEPs and their entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanReport {
    pub devices: Vec<VxlanDeviceRow>,
    pub vteps: Vec<VtepRow>,
    pub neighbours_programmed: usize,
    pub neighbours_failed: usize,
    pub fdb_programmed: usize,
    pub fdb_failed: usize,
    /// Why a device or entry is not as planned.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// One VXLAN device (`ip -d link show vxlan.calico`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanDeviceRow {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub mac: String,
    pub local: String,
    pub parent: String,
    pub address: Option<String>,
    /// The MTU set, once the device is ours.
    pub mtu: Option<u32>,
    pub error: Option<String>,
}

/// One remote VTEP: its neighbour entry (`tunnel_ip lladdr mac`) and FDB entry (`mac dst
/// underlay`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepRow {
    pub device: String,
    pub node: String,
    pub tunnel_ip: String,
    pub mac: String,
    pub underlay: String,
}

/// One planned route and whether it is in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRow {
    /// `172.16.196.128/26`.
    pub prefix: String,
    /// Gateway address, `None` for blackhole and device routes.
    pub gateway: Option<String>,
    /// Output device; `None` for blackhole routes (route -n prints `*`) and `via` routes the
    /// kernel resolves.
    pub device: Option<String>,
    pub onlink: bool,
    /// `block-direct`, `block-ipip`, `block-noencap`, `block-vxlan`, `blackhole`, `workload`,
    /// `borrowed-direct`, `borrowed-ipip`, `borrowed-noencap`, `borrowed-vxlan`, `external`.
    pub kind: String,
    /// The node (or BGP peer address) the route leads to.
    pub peer: Option<String>,
    /// In the kernel as planned.
    pub installed: bool,
    /// Why it is not, when the kernel refused it.
    pub error: Option<String>,
    /// Who put it in the kernel when it was not podroute: `another owner (proto boot)` for an
    /// identical route of another owner (the CNI plugin's pod route), which satisfies the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_by: Option<String>,
}

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// A request for the route report, answered by the agent's loop.
pub type RoutesRequest = oneshot::Sender<RoutesReport>;

/// Where `GET /routes` gets its report.
#[derive(Debug)]
enum RoutesSource {
    /// A report published as it is (tests, before the agent runs).
    Published(Arc<RoutesReport>),
    /// The agent builds it on request: keeping a report of 100,000 routes current costs a
    /// copy of the table per change, for a page that is seldom read.
    Agent(mpsc::Sender<RoutesRequest>),
}

/// How long `GET /routes` waits for the agent's loop.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent publishes what the HTTP server (status API, health) reads. Cheap to read:
/// readers get the last published `Arc`.
#[derive(Debug)]
pub struct StatusBoard {
    status: RwLock<Arc<AgentStatus>>,
    routes: RwLock<RoutesSource>,
    /// Last sign of life of each event loop, by name.
    heartbeats: Mutex<BTreeMap<&'static str, Instant>>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusBoard {
    pub fn new() -> Self {
        Self {
            status: RwLock::new(Arc::new(AgentStatus::default())),
            routes: RwLock::new(RoutesSource::Published(Arc::default())),
            heartbeats: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn publish_status(&self, status: AgentStatus) {
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(status);
    }

    /// Publishes a fixed route report (replaces [`serve_routes`](Self::serve_routes)).
    pub fn publish_routes(&self, routes: RoutesReport) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) =
            RoutesSource::Published(Arc::new(routes));
    }

    /// From now on [`routes`](Self::routes) asks for the report over `requests`.
    pub fn serve_routes(&self, requests: mpsc::Sender<RoutesRequest>) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = RoutesSource::Agent(requests);
    }

    pub fn status(&self) -> Arc<AgentStatus> {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The route report: the published one, or one the agent builds now. `None` when the
    /// agent does not answer (stopped, or busy for longer than 10 s).
    pub async fn routes(&self) -> Option<Arc<RoutesReport>> {
        let requests = match &*self.routes.read().unwrap_or_else(|e| e.into_inner()) {
            RoutesSource::Published(report) => return Some(report.clone()),
            RoutesSource::Agent(requests) => requests.clone(),
        };
        let (tx, rx) = oneshot::channel();
        let asked = async {
            requests.send(tx).await.ok()?;
            rx.await.ok()
        };
        tokio::time::timeout(ROUTES_TIMEOUT, asked)
            .await
            .ok()
            .flatten()
            .map(Arc::new)
    }

    /// Records that the event loop `name` is alive.
    pub fn beat(&self, name: &'static str) {
        self.heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, Instant::now());
    }

    /// `Ok` when every loop that ever beat did so within `max_age`; else the stalled loops.
    pub fn live(&self, max_age: Duration) -> Result<(), Vec<String>> {
        let beats = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        if beats.is_empty() {
            return Err(vec!["no event loop has started".into()]);
        }
        let stalled: Vec<String> = beats
            .iter()
            .filter(|(_, at)| at.elapsed() > max_age)
            .map(|(name, at)| format!("{name} loop silent for {:.0?}", at.elapsed()))
            .collect();
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(stalled)
        }
    }

    /// `Ok` when the agent is ready; else why not (from the published status).
    pub fn ready(&self) -> Result<(), Vec<String>> {
        let status = self.status();
        if status.health.ready {
            Ok(())
        } else if status.health.not_ready.is_empty() {
            Err(vec!["starting".into()])
        } else {
            Err(status.health.not_ready.clone())
        }
    }
}
