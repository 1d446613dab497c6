//! The Linux dataplane: makes the main routing table hold exactly the planned routes.
//!
//! Ownership: every route of the main table whose protocol is [`DataplaneConfig::protocol`]
//! belongs to podroute, and nothing else does. The default, [`DEFAULT_ROUTE_PROTOCOL`] = 157,
//! is in no RTPROT_* constant of the kernel's `rtnetlink.h`, not in iproute2's `rt_protos`, and
//! not used by BIRD (12), Felix (80), kube-router (17), keepalived (18), babel (42), OpenR (99)
//! or FRR (186–192). `ip route show proto 157` lists podroute's routes.
//!
//! Routes of other owners (any other protocol) are never replaced nor deleted. One of them at
//! the key (destination, TOS, metric) of a planned route:
//! - **identical to the plan** — same type, destination, gateway, device (when the plan names
//!   one) and scope, no ECMP — satisfies it: the destination counts as programmed, "by another
//!   owner (proto boot)", and podroute adds nothing. That is Calico's CNI plugin adding
//!   `POD/32 dev caliXXXX scope link` (protocol `boot`, the netlink default) for each pod, and
//!   Felix keeping such routes; the rule holds for any planned route, not only `/32`s;
//! - **different** (another device, another gateway, ...) holds the destination: it is
//!   reported failed ([`RouteError::Occupied`], with its protocol, in
//!   [`DataplaneStatus::failures`], `podroute_routes_failed`, and a WARN at most once a
//!   minute per destination) and left alone. This includes a route of ours overwritten with
//!   `ip route replace` by hand or by another daemon: it is not overwritten back.
//!
//! Either way, when the other owner's route goes away (the monitor sees it, or a re-read)
//! while the plan still wants the destination, podroute installs its own.
//!
//! How it works:
//! - [`Dataplane::open`] opens the route monitor first, then dumps links and the main table
//!   once into memory (our routes; other owners' only where a route is planned). Nothing is flushed: routes a previous run left are adopted, and the first
//!   reconcile changes only what differs.
//! - The desired routes are kept once, by prefix, each marked with whether the kernel has it
//!   as wanted; our other kernel routes (adopted, left over, added by hand) are kept apart
//!   until they are adopted into the plan or deleted.
//! - [`Dataplane::reconcile`] compares the desired routes with that mirror and sends the adds,
//!   replaces and deletes in batches of many messages per `sendto`, checking every answer
//!   ([`socket`]). Adds never overwrite a foreign route (`NLM_F_EXCL`); replaces are sent
//!   only where our route is known to be; deletes name our protocol, so the kernel cannot
//!   delete anyone else's route. An add refused with EEXIST is followed by a look at what holds
//!   the key (a dump of the routes of the planned device first, the table if needed), and the
//!   rule above decides.
//! - A BGP best-path change reaches the dataplane as a delta ([`PlanUpdate::Delta`]): only
//!   the prefixes in it are compared and changed, without a pass over the whole table; a full
//!   plan ([`PlanUpdate::Full`]) comes after datastore and interface changes.
//! - A route that fails (gateway unreachable, device missing) is recorded in
//!   [`DataplaneStatus::failures`], logged, counted and retried with backoff; it never holds
//!   up the other routes. A destination held by another owner's route is failed too, but not
//!   retried: it waits for that route to go.
//! - [`Dataplane::run`] is the long-running task: plan updates, monitor events (a hand-deleted or
//!   hand-changed route of ours that keeps our protocol is put back at once; other owners'
//!   routes at planned destinations are recorded, never fought over), retries, and
//!   a full re-read after lost notifications or link removals (the kernel drops IPv4 routes of
//!   a vanished device without notifying).
//!
//! - The tunnel devices are the dataplane's too ([`tunnels`]): the agent sends the
//!   planner's [`TunnelPlan`] ([`PlanUpdate::Tunnels`]) ahead of the routes that use it, and
//!   each device module makes its device (`tunl0`: [`tunnels::ipip`], with the userspace
//!   forwarder process and its table, which follows every IPIP route upserted or removed
//!   here and is published before those routes are reconciled).
//! - Link facts go the other way: the monitor's link notifications keep [`LinkFacts`] (every
//!   link with its carrier) current for the agent ([`Dataplane::link_facts`]): the pods'
//!   `cali*` interfaces and the host NIC's carrier, without polling.
//! - Plan updates come on a bounded channel ([`PlanSource`]): the dataplane never waits on the
//!   agent, so the agent waiting for room cannot deadlock.
//!
//! The netlink calls are blocking but never wait on the network: the kernel answers rtnetlink
//! requests synchronously inside `sendmsg`/`recvmsg`.

pub mod ipip_user;
pub mod kernel;
pub mod monitor;
pub mod socket;
pub mod thread;
pub mod tunnel;
pub mod tunnels;
pub mod vxlan;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkMessage;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::plan::tunnels::TunnelPlan;
use crate::plan::{DesiredRoute, RouteKind, RouteScope};
use crate::prefix_map::PrefixMap;
use kernel::{Change, KernelRoute, Protocol, RouteKey};
use monitor::{Event, LinkInfo, MonitorSocket};
use socket::{NetlinkError, RequestSocket};
use tunnels::{TunnelStatus, Tunnels, TunnelsConfig};

pub use socket::NetlinkError as KernelError;

/// podroute's route protocol number (see the module doc for why 157).
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 157;

/// Is `p` a protocol number the kernel or another routing daemon uses? Those are refused as
/// podroute's own: the kernel's RTPROT_* (0–4, 8–18, 42, 99, 186–192) and Felix's 80.
fn protocol_taken(p: u8) -> bool {
    matches!(p, 0..=4 | 8..=18 | 42 | 80 | 99 | 186..=192)
}

/// Tuning of the dataplane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// Route protocol number that marks podroute's routes.
    pub protocol: u8,
    /// Maximum netlink messages per `sendto` (further bounded by the socket buffer).
    pub batch_size: usize,
    /// First retry delay of a failed route; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Full re-read of the table at this interval, as a safety net for missed notifications.
    pub resync_interval: Duration,
    /// How the tunnel devices are made.
    pub tunnels: TunnelsConfig,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            protocol: DEFAULT_ROUTE_PROTOCOL,
            batch_size: 2048,
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            resync_interval: Duration::from_secs(300),
            tunnels: TunnelsConfig::default(),
        }
    }
}

/// Errors that stop the dataplane (per-route errors never do: see [`RouteFailure`]).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "route protocol {0} belongs to the kernel or another routing daemon (BIRD 12, \
         kube-router 17, Felix 80, FRR 186-192, ...); choose an unused number such as \
         {DEFAULT_ROUTE_PROTOCOL}"
    )]
    ProtocolTaken(u8),
    #[error("cannot open the netlink socket: {0} (the dataplane needs CAP_NET_ADMIN)")]
    Open(NetlinkError),
    #[error("cannot read the routing table: {0}")]
    Dump(NetlinkError),
    #[error("route monitor failed: {0}")]
    Monitor(String),
}

/// Why one route is not (yet) in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("device {0:?} does not exist")]
    MissingDevice(String),
    /// A route of another owner holds the destination (same key) and routes differently
    /// from the plan. podroute never overwrites it: it waits for the route to go away.
    /// `protocol` is the other route's; `None` when the kernel refused our route (EEXIST) but
    /// the route in the way was not found when looked for (it is retried).
    #[error("{}", occupied_text(*.protocol))]
    Occupied { protocol: Option<u8> },
    #[error("kernel refused the route: {0}")]
    Kernel(NetlinkError),
}

fn occupied_text(protocol: Option<u8>) -> String {
    match protocol {
        Some(p) => format!(
            "held by a route of another owner (proto {}) that differs from the planned one; \
             podroute leaves it alone and installs its own once it is removed",
            Protocol(p)
        ),
        None => "a route for this destination that podroute does not own is in the way \
                 (EEXIST); remove it, or leave the prefix to its owner"
            .to_string(),
    }
}

/// A route that could not be programmed, kept until it succeeds or is no longer wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFailure {
    pub route: DesiredRoute,
    pub error: RouteError,
    pub attempts: u32,
    pub first_failed: SystemTime,
    /// `None`: not retried on a timer; waits for the kernel (a foreign route that holds the
    /// destination going away, seen by the monitor or a re-read).
    next_retry: Option<Instant>,
    /// When it was last logged at WARN (see [`FAILURE_WARN_INTERVAL`]).
    warned: Option<Instant>,
}

impl RouteFailure {
    /// A first failure of `route`, not retried (report tests).
    #[cfg(test)]
    pub(crate) fn for_test(route: DesiredRoute, error: RouteError) -> Self {
        Self {
            route,
            error,
            attempts: 1,
            first_failed: SystemTime::UNIX_EPOCH,
            next_retry: None,
            warned: None,
        }
    }
}

/// A planned route that the kernel has from another owner, identical to the plan (the CNI
/// plugin's pod route): it counts as programmed, and podroute leaves it to its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherOwner {
    pub prefix: IpNet,
    /// The route's protocol (3 = `boot`, the netlink default); see [`Protocol`].
    pub protocol: u8,
}

/// A failed route is logged at WARN when it is new or changed, and as a reminder when it is
/// looked at again later, at most once per this interval per destination (a foreign route
/// replaced again and again makes one line, not one per replace).
const FAILURE_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataplaneCounters {
    pub routes_added: u64,
    pub routes_replaced: u64,
    pub routes_deleted: u64,
    /// Route requests the kernel refused, or that could not be sent (missing device).
    pub route_errors: u64,
    /// Route changes made because the kernel table drifted from the plan (monitor).
    pub drift_repairs: u64,
    /// Netlink route requests sent (adds + replaces + deletes, including failed ones).
    pub netlink_requests: u64,
    /// `sendto` calls on the request socket.
    pub netlink_sends: u64,
    /// Full re-reads of the table after start.
    pub resyncs: u64,
    pub reconciles: u64,
}

/// What the agent, metrics and health endpoints read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataplaneStatus {
    /// `true` once a full plan was received and reconciled.
    pub programmed: bool,
    pub desired_routes: usize,
    /// Routes with our protocol in the main table, as last seen.
    pub installed_routes: usize,
    /// Desired routes without a failure, per [`RouteKind::index`] (all 0 before the first
    /// plan).
    pub programmed_by_kind: [usize; RouteKind::ALL.len()],
    pub failures: Vec<RouteFailure>,
    /// Planned routes the kernel has from another owner, identical to the plan: counted in
    /// `programmed_by_kind`, never in `failures`.
    pub by_other_owner: Vec<OtherOwner>,
    pub counters: DataplaneCounters,
    /// The number of the last [`PlanMessage`] [`Dataplane::run`] applied (to learn when an
    /// update reached the kernel).
    pub applied: Option<u64>,
    /// The tunnel devices.
    pub tunnels: TunnelStatus,
    /// The VXLAN devices, VTEPs and their neighbour/FDB entries.
    pub vxlan: vxlan::VxlanStatus,
}

/// What the agent learns about the node's links from the monitor ([`Dataplane::link_facts`]):
/// every link by name, with whether it is up with carrier (`IFF_UP` and `IFF_RUNNING`).
/// Bounded by the node's links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkFacts {
    pub carrier: BTreeMap<String, bool>,
}

impl LinkFacts {
    /// Whether `name` is up with carrier; `None` when there is no such link.
    pub fn has_carrier(&self, name: &str) -> Option<bool> {
        self.carrier.get(name).copied()
    }

    /// The names of the links that start with `prefix` (`cali`: the pods' interfaces).
    pub fn named_with_prefix(&self, prefix: &str) -> BTreeSet<String> {
        self.carrier
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// The result of one reconcile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub replaced: usize,
    pub deleted: usize,
    pub failed: usize,
}

impl ApplyReport {
    /// Netlink route requests made.
    pub fn changes(&self) -> usize {
        self.added + self.replaced + self.deleted + self.failed
    }
}

/// One line per device that routes wait for.
fn warn_missing(missing: BTreeMap<Arc<str>, usize>) {
    for (dev, count) in missing {
        tracing::warn!(device = %dev, routes = count, "routes wait for a missing device");
    }
}

/// Do the sorted lists `a` and `b` share an element?
fn overlaps(a: &[IpNet], b: &[IpNet]) -> bool {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small.iter().any(|d| large.binary_search(d).is_ok())
}

/// Delay before the next attempt of a route that failed `attempts` times: `retry_min`
/// doubling per attempt, capped at `retry_max`.
fn backoff(config: &DataplaneConfig, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    config
        .retry_min
        .saturating_mul(1 << doublings)
        .min(config.retry_max)
}

/// Interface names and indexes of the namespace.
#[derive(Debug, Default)]
struct Links {
    by_name: HashMap<String, u32>,
    by_index: HashMap<u32, String>,
    /// Up with carrier, by index.
    carrier: HashMap<u32, bool>,
}

impl Links {
    fn update(&mut self, info: &LinkInfo) -> Option<String> {
        let name = info.name.clone()?;
        if let Some(old) = self.by_index.insert(info.index, name.clone())
            && old != name
        {
            self.by_name.remove(&old);
        }
        self.by_name.insert(name.clone(), info.index);
        self.carrier.insert(info.index, info.up && info.running);
        Some(name)
    }

    fn remove(&mut self, index: u32) {
        if let Some(name) = self.by_index.remove(&index) {
            self.by_name.remove(&name);
        }
        self.carrier.remove(&index);
    }

    fn facts(&self) -> LinkFacts {
        LinkFacts {
            carrier: self
                .by_index
                .iter()
                .map(|(i, name)| (name.clone(), self.carrier.get(i).copied().unwrap_or(false)))
                .collect(),
        }
    }
}

/// What the agent sends the dataplane task ([`Dataplane::run`]), numbered: the status
/// reports the number of the last update applied ([`DataplaneStatus::applied`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanMessage {
    pub seq: u64,
    pub update: PlanUpdate,
}

/// A change of the desired routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanUpdate {
    /// Every desired route; replaces the previous set. Until the first one the dataplane
    /// deletes nothing (the agent has no complete picture yet).
    Full(Vec<DesiredRoute>),
    /// The routes of single prefixes changed (BGP best-path changes): only these prefixes
    /// are reconciled.
    Delta(Vec<RouteChange>),
    /// The tunnel devices the routes of the following updates use (a complete
    /// [`TunnelPlan`]); see [`tunnels`]. Sent ahead of the routes.
    Tunnels(TunnelPlan),
}

/// Where [`Dataplane::run`] reads its plan updates: the agent's bounded channel (the agent
/// waits while it is full: back-pressure, and the dataplane never waits on the agent, so it
/// cannot deadlock), or an unbounded one (tests, benches).
pub trait PlanSource: Send {
    /// The next update; `None` when the sender is gone.
    fn recv(&mut self) -> impl std::future::Future<Output = Option<PlanMessage>> + Send;
    /// The next update if one is queued.
    fn try_recv(&mut self) -> Option<PlanMessage>;
}

impl PlanSource for mpsc::Receiver<PlanMessage> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<PlanMessage>> + Send {
        mpsc::Receiver::recv(self)
    }

    fn try_recv(&mut self) -> Option<PlanMessage> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

impl PlanSource for mpsc::UnboundedReceiver<PlanMessage> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<PlanMessage>> + Send {
        mpsc::UnboundedReceiver::recv(self)
    }

    fn try_recv(&mut self) -> Option<PlanMessage> {
        mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// One prefix of a [`PlanUpdate::Delta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// This route is wanted for its prefix (new or changed).
    Upsert(DesiredRoute),
    /// No route is wanted for this prefix any more.
    Remove(IpNet),
}

/// A device name held by desired routes; see [`Devices`].
type DeviceId = NonZeroU32;
/// A gateway held by desired routes; see [`Devices`].
type GatewayId = NonZeroU32;

/// The device names and the gateways of the desired routes, each held once however many
/// routes use it (100,000 routes through `tunl0` hold one name; a node's blocks, one
/// gateway), so that a [`Slot`] holds two 4-byte ids.
#[derive(Debug, Default)]
struct Devices {
    names: Interner<Arc<str>>,
    gateways: Interner<IpAddr>,
}

impl Devices {
    fn intern(&mut self, name: Arc<str>) -> DeviceId {
        self.names.intern(name)
    }

    fn release(&mut self, id: DeviceId) {
        self.names.release(id)
    }

    fn name(&self, id: DeviceId) -> Option<&Arc<str>> {
        self.names.get(id)
    }

    fn gateway(&self, id: GatewayId) -> Option<IpAddr> {
        self.gateways.get(id).copied()
    }
}

/// Values held once each, with a count of their users, by a 4-byte id.
#[derive(Debug)]
struct Interner<T> {
    /// Value and number of users, by id − 1; `None` = free.
    entries: Vec<Option<(T, u32)>>,
    by_name: HashMap<T, NonZeroU32>,
    free: Vec<NonZeroU32>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            by_name: HashMap::new(),
            free: Vec::new(),
        }
    }
}

impl<T: Clone + Eq + std::hash::Hash> Interner<T> {
    /// The id of `name`, counting one more user.
    fn intern(&mut self, name: T) -> NonZeroU32 {
        if let Some(id) = self.by_name.get(&name).copied() {
            if let Some(Some((_, users))) = self.entries.get_mut(Self::index(id)) {
                *users += 1;
            }
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[Self::index(id)] = Some((name.clone(), 1));
                id
            }
            None => {
                self.entries.push(Some((name.clone(), 1)));
                // Fewer than 2^32 devices or gateways exist; saturate rather than wrap.
                let n = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
            }
        };
        self.by_name.insert(name, id);
        id
    }

    /// One user of `id` fewer; the name goes with its last user.
    fn release(&mut self, id: NonZeroU32) {
        let index = Self::index(id);
        let Some(Some((name, users))) = self.entries.get_mut(index) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            self.by_name.remove(name);
            self.entries[index] = None;
            self.free.push(id);
        }
    }

    fn get(&self, id: NonZeroU32) -> Option<&T> {
        self.entries
            .get(Self::index(id))
            .and_then(|e| e.as_ref().map(|(name, _)| name))
    }

    fn index(id: NonZeroU32) -> usize {
        id.get() as usize - 1
    }
}

/// A destination the plan wants a route for: the desired route without its prefix (the key
/// it is stored under), in 12 bytes, and whether the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    gateway: Option<GatewayId>,
    device: Option<DeviceId>,
    kind: RouteKind,
    /// [`Slot::LINK_SCOPE`], [`Slot::ONLINK`], [`Slot::SYNCED`], [`Slot::BY_OTHER`].
    flags: u8,
}

impl Slot {
    const LINK_SCOPE: u8 = 1;
    const ONLINK: u8 = 2;
    /// The kernel holds our route for this destination as wanted: same key, and
    /// [`KernelRoute::satisfied_by`] (last installed by us, or seen in a dump or notification).
    const SYNCED: u8 = 4;
    /// The kernel holds an identical route of another owner for this destination (never
    /// together with [`Slot::SYNCED`]): the plan is satisfied without a route of ours.
    const BY_OTHER: u8 = 8;
    /// Flags that say what the kernel has, not what is wanted.
    const STATE: u8 = Self::SYNCED | Self::BY_OTHER;

    /// The slot of `route` (not synced), interning its device and gateway.
    fn new(route: DesiredRoute, devices: &mut Devices) -> (IpNet, Self) {
        let mut flags = 0;
        if route.scope == RouteScope::Link {
            flags |= Self::LINK_SCOPE;
        }
        if route.onlink {
            flags |= Self::ONLINK;
        }
        let slot = Self {
            gateway: route.gateway.map(|g| devices.gateways.intern(g)),
            device: route.device.map(|d| devices.intern(d)),
            kind: route.kind,
            flags,
        };
        (route.prefix.trunc(), slot)
    }

    /// Gives back its device and gateway (the slot is dropped).
    fn release(&self, devices: &mut Devices) {
        if let Some(device) = self.device {
            devices.release(device);
        }
        if let Some(gateway) = self.gateway {
            devices.gateways.release(gateway);
        }
    }

    fn gateway(&self, devices: &Devices) -> Option<IpAddr> {
        self.gateway.and_then(|g| devices.gateway(g))
    }

    fn synced(&self) -> bool {
        self.flags & Self::SYNCED != 0
    }

    fn by_other(&self) -> bool {
        self.flags & Self::BY_OTHER != 0
    }

    /// The same route wanted (whatever the kernel has).
    fn same_want(&self, other: &Slot) -> bool {
        self.gateway == other.gateway
            && self.device == other.device
            && self.kind == other.kind
            && self.flags & !Self::STATE == other.flags & !Self::STATE
    }

    fn route(&self, prefix: IpNet, devices: &Devices) -> DesiredRoute {
        DesiredRoute {
            prefix,
            kind: self.kind,
            gateway: self.gateway(devices),
            device: self.device.and_then(|d| devices.name(d).cloned()),
            onlink: self.flags & Self::ONLINK != 0,
            scope: if self.flags & Self::LINK_SCOPE != 0 {
                RouteScope::Link
            } else {
                RouteScope::Universe
            },
        }
    }

    /// The gateway to resolve through the kernel's table, as BIRD's `gateway recursive`: a
    /// route via a gateway that leaves the device to the kernel (pool `Never`, external
    /// prefixes) and is not onlink.
    fn recursive_gateway(&self, devices: &Devices) -> Option<IpAddr> {
        if self.device.is_some() || self.flags & Self::ONLINK != 0 {
            return None;
        }
        self.gateway(devices)
    }

    /// The kernel route for this slot; `oif` from the device name.
    fn kernel_route(
        &self,
        dst: IpNet,
        protocol: u8,
        oif: Option<u32>,
        devices: &Devices,
    ) -> KernelRoute {
        KernelRoute::wanted(
            dst,
            protocol,
            self.kind == RouteKind::Blackhole,
            self.flags & Self::LINK_SCOPE != 0,
            self.gateway(devices),
            oif,
            self.flags & Self::ONLINK != 0,
        )
    }
}

/// Which destinations a reconcile looks at.
enum Scope<'a> {
    All,
    /// Sorted, each once.
    Only(&'a [IpNet]),
}

/// How often the tunnel devices are checked (a dead forwarder, a failed set-up's retry);
/// a check of devices that are as planned costs a comparison.
const TUNNEL_MAINTENANCE: Duration = Duration::from_millis(250);

/// Destinations reconciled per round of requests: bounds the memory of one round.
const RECONCILE_CHUNK: usize = 4096;

/// Destinations in arrival order, an IPv4 one in 6 bytes instead of `IpNet`'s 18: a burst of
/// 100,000 best-path changes waits here while the kernel is programmed.
#[derive(Debug, Default)]
struct DstQueue {
    /// `None`: the next of `v6`.
    order: VecDeque<Option<Ipv4Net>>,
    v6: VecDeque<Ipv6Net>,
}

impl DstQueue {
    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn clear(&mut self) {
        self.order.clear();
        self.v6.clear();
    }

    fn extend(&mut self, dsts: impl IntoIterator<Item = IpNet>) {
        for dst in dsts {
            match dst {
                IpNet::V4(p) => self.order.push_back(Some(p)),
                IpNet::V6(p) => {
                    self.order.push_back(None);
                    self.v6.push_back(p);
                }
            }
        }
    }

    /// The first `n` destinations (all if fewer), in order.
    fn take(&mut self, n: usize) -> Vec<IpNet> {
        let n = n.min(self.order.len());
        let mut out = Vec::with_capacity(n);
        for d in self.order.drain(..n) {
            match d {
                Some(p) => out.push(IpNet::V4(p)),
                None => out.extend(self.v6.pop_front().map(IpNet::V6)),
            }
        }
        out
    }
}

/// Destinations of applied updates still to reconcile ([`Dataplane::stream`]).
#[derive(Debug, Default)]
struct Pending {
    dsts: DstQueue,
    /// A full update came: everything is to be reconciled.
    full: bool,
    /// Destinations taken from `dsts` so far.
    taken: u64,
    /// Of those, the ones whose reconcile is complete (the others are in flight: see
    /// [`Dataplane::reconcile_pipelined`]).
    done: u64,
    /// Each update's number with the value of `taken` at which all its destinations are
    /// reconciled.
    ends: VecDeque<(u64, u64)>,
}

/// A chunk of a stream whose requests the kernel is working on while the next chunk is
/// prepared ([`Dataplane::reconcile_pipelined`]).
struct InFlight {
    /// The chunk's destinations, sorted, each once.
    dsts: Vec<IpNet>,
    changes: Vec<Change>,
    submitted: socket::Submitted,
    /// What the chunk's preparation already reported (held back devices, foreign routes).
    report: ApplyReport,
    started: Instant,
    /// Destinations the caller took from its queue for this chunk (duplicates included).
    taken: u64,
}

/// A chunk taken out of flight with the kernel's answers ([`Dataplane::take_answered`]).
struct Answered {
    changes: Vec<Change>,
    results: socket::BatchResults,
    report: ApplyReport,
    started: Instant,
}

/// The dataplane state: the request socket, the monitor, the desired routes and what the
/// kernel holds of ours.
///
/// One map holds the desired routes; each entry also says whether the kernel has it
/// (`synced`). Our kernel routes that are not a synced desired route — adopted from a previous
/// run, left over after a change, added by hand with our protocol — are kept in `strays`
/// until they are promoted (they turn out to be what the plan wants) or deleted. In the
/// steady state `strays` is empty and every route is held once.
pub struct Dataplane<S: RouteSocket = RequestSocket> {
    config: DataplaneConfig,
    sock: S,
    monitor: Option<MonitorSocket>,
    links: Links,
    slots: PrefixMap<Slot>,
    devices: Devices,
    /// Our routes in the kernel (protocol = ours, main table) that no synced slot accounts
    /// for, kept current by the monitor.
    strays: BTreeMap<RouteKey, KernelRoute>,
    /// Slots with `synced` set.
    synced: usize,
    /// Desired routes per [`RouteKind::index`].
    desired_by_kind: [usize; RouteKind::ALL.len()],
    /// `false` until the first full plan: nothing is deleted before the agent has a full
    /// picture.
    programmed: bool,
    /// Routes of other owners (any protocol but ours) at the key our route for a planned
    /// destination would have, by destination: the CNI plugin's pod routes, a route put over
    /// ours with `ip route replace`, one that was there first. Kept current by the monitor and
    /// re-reads; bounded by the planned destinations (entries go with their slot). Such a
    /// route is never replaced nor deleted: identical to the plan, it satisfies it
    /// ([`Slot::BY_OTHER`]); different, the destination is failed
    /// ([`RouteError::Occupied`]) until it goes away.
    foreign: BTreeMap<IpNet, KernelRoute>,
    failures: BTreeMap<IpNet, RouteFailure>,
    counters: DataplaneCounters,
    last_resync: Instant,
    observer: Option<ReconcileObserver>,
    /// The number of the last [`PlanMessage`] [`run`](Self::run) applied.
    applied: Option<u64>,
    /// The chunk of a stream the kernel is working on ([`Self::reconcile_pipelined`]).
    inflight: Option<InFlight>,
    /// The tunnel devices; told of every desired route change.
    tunnels: Tunnels,
    /// Published after every link change.
    link_facts: watch::Sender<LinkFacts>,
    /// Recursive next hops ([`Slot::recursive_gateway`]): per gateway, the gateway and device
    /// of the kernel's route towards it when that route goes through a gateway itself (the
    /// peer is on another subnet: the route is installed via the router, as BIRD installs it
    /// with `gateway recursive`), `None` when the peer is on a connected subnet. Bounded by the
    /// plan's distinct gateways (the peers); looked up on first use, refreshed on every
    /// re-read and when a route of another owner (the underlay) changes.
    recursive: BTreeMap<IpAddr, Option<(IpAddr, u32)>>,
    /// The VXLAN devices and their neighbour/FDB entries ([`vxlan`]).
    vxlan: vxlan::VxlanTunnels,
    /// A monitor event touched a VXLAN device, its parent or their entries.
    vxlan_dirty: bool,
}

type ReconcileObserver = Box<dyn Fn(Duration, ApplyReport) + Send>;

/// The key our route for `dst` has in the kernel (priority as the kernel fills it in).
fn want_key(dst: IpNet) -> RouteKey {
    RouteKey {
        dst,
        priority: if dst.addr().is_ipv6() {
            kernel::IPV6_DEFAULT_PRIORITY
        } else {
            0
        },
        tos: 0,
    }
}

/// What a destination needs besides kernel requests.
enum Step {
    /// The slot is synced but still has a failure on record (its route got in another way,
    /// e.g. an answer was lost and the table re-read): the failure goes.
    InSync,
    /// The slot's route was found in `strays`, as wanted: no request needed.
    Promote(RouteKey),
    /// The slot's device does not exist.
    Missing(Arc<str>),
    /// No route of ours for the destination, but one of another owner ([`Dataplane::foreign`]):
    /// see [`Dataplane::settle_foreign`].
    Foreign,
}

/// What a planned destination needs when the kernel does not hold our route for it as
/// wanted: the ownership rule, without a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Our route is there as wanted (found by a dump or notification): take it.
    Promote,
    /// Our route is there but differs: replace it (it carries our protocol).
    Replace,
    /// Nothing is known at the key: add ours, exclusively (`NLM_F_EXCL`).
    Add,
    /// Another owner's route is identical to the plan: the destination is programmed by it.
    ByOther { protocol: u8 },
    /// Another owner's route differs from the plan: left alone, the destination failed.
    HeldByOther { protocol: u8 },
}

/// The ownership rule: only routes with our protocol are ever replaced; a route of another
/// owner at the same key is never touched, and satisfies the plan when it routes exactly as
/// planned ([`KernelRoute::same_route_as`]: type, destination, gateway, device, scope).
/// `ours` is our route at the wanted key, `theirs` another owner's.
fn decide(
    wanted: &KernelRoute,
    ours: Option<&KernelRoute>,
    theirs: Option<&KernelRoute>,
) -> Decision {
    match (ours, theirs) {
        (Some(have), _) if wanted.satisfied_by(have) => Decision::Promote,
        (Some(_), _) => Decision::Replace,
        (None, Some(other)) if wanted.same_route_as(other) => Decision::ByOther {
            protocol: other.protocol,
        },
        (None, Some(other)) => Decision::HeldByOther {
            protocol: other.protocol,
        },
        (None, None) => Decision::Add,
    }
}

/// At most this many device-filtered dumps look for the routes in the way of a reconcile's
/// refused adds before one dump of the whole table does ([`Dataplane::look_up_foreign`]).
const LOOKUP_DEVICE_DUMPS: usize = 8;

/// The kernel's side of the route reconcile: requests in batches, and dumps. The netlink
/// socket ([`RequestSocket`]) in production; the unit tests put a simulated routing table
/// behind it, so the reconcile decisions are tested without root.
pub trait RouteSocket: Send {
    /// Sends `requests` and returns one result per request, in order.
    fn execute(
        &mut self,
        requests: impl IntoIterator<Item = socket::Request>,
    ) -> Vec<Result<(), NetlinkError>>;
    /// Runs a dump request and hands each message of the answer to `each`.
    fn dump_each(
        &mut self,
        message: RouteNetlinkMessage,
        each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError>;
    /// Sends one request and returns the kernel's answer (`RTM_GETROUTE` of one address).
    fn get(&mut self, message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NetlinkError>;
    /// Datagrams sent so far (for measurements).
    fn sends(&self) -> u64;
    /// Starts `requests`; [`wait`](Self::wait) returns their results, and must be called
    /// before the next `submit`. Other calls in between are allowed (they wait for the batch
    /// first). This default runs them at once.
    fn submit(&mut self, requests: Vec<socket::Request>) -> socket::Submitted {
        let before = self.sends();
        let results = self.execute(requests);
        socket::Submitted::done(socket::BatchResults {
            results,
            sends: self.sends() - before,
        })
    }
    /// Is the last submitted batch answered (never waits)? This default runs batches at once.
    fn ready(&mut self) -> bool {
        true
    }
    /// The results of the batch `submitted`, one per request in order.
    fn wait(&mut self, submitted: socket::Submitted) -> socket::BatchResults {
        // Only a socket that runs batches elsewhere returns one that is not done, and it
        // overrides this.
        submitted.into_done().unwrap_or_default()
    }
}

impl RouteSocket for RequestSocket {
    fn submit(&mut self, requests: Vec<socket::Request>) -> socket::Submitted {
        RequestSocket::submit(self, requests)
    }

    fn wait(&mut self, submitted: socket::Submitted) -> socket::BatchResults {
        RequestSocket::wait(self, submitted)
    }

    fn ready(&mut self) -> bool {
        RequestSocket::ready(self)
    }

    fn execute(
        &mut self,
        requests: impl IntoIterator<Item = socket::Request>,
    ) -> Vec<Result<(), NetlinkError>> {
        RequestSocket::execute(self, requests)
    }

    fn dump_each(
        &mut self,
        message: RouteNetlinkMessage,
        each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        RequestSocket::dump_each(self, message, each)
    }

    fn get(&mut self, message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NetlinkError> {
        RequestSocket::get(self, message)
    }

    fn sends(&self) -> u64 {
        RequestSocket::sends(self)
    }
}

impl Dataplane {
    /// Opens the sockets in the calling thread's network namespace, then reads links and our
    /// routes once (adoption: nothing is changed).
    pub fn open(config: DataplaneConfig) -> Result<Self, DataplaneError> {
        if protocol_taken(config.protocol) {
            return Err(DataplaneError::ProtocolTaken(config.protocol));
        }
        let monitor = MonitorSocket::open().map_err(DataplaneError::Open)?;
        let sock = RequestSocket::open(config.batch_size).map_err(DataplaneError::Open)?;
        // Our own changes are known from the answers: the monitor need not read them back.
        monitor
            .ignore_sender(sock.port().map_err(DataplaneError::Open)?)
            .map_err(DataplaneError::Open)?;
        let batch = sock.batch();
        let dp = Self::with_socket(config, sock, Some(monitor))?;
        tracing::info!(
            protocol = dp.config.protocol,
            adopted = dp.strays.len(),
            batch,
            "dataplane opened; existing routes adopted"
        );
        Ok(dp)
    }
}

impl<S: RouteSocket> Dataplane<S> {
    /// The dataplane over `sock` (and `monitor`, which [`run`](Self::run) needs): reads links
    /// and our routes once (adoption: nothing is changed).
    pub fn with_socket(
        config: DataplaneConfig,
        sock: S,
        monitor: Option<MonitorSocket>,
    ) -> Result<Self, DataplaneError> {
        if protocol_taken(config.protocol) {
            return Err(DataplaneError::ProtocolTaken(config.protocol));
        }
        let config_tunnels = config.tunnels.clone();
        let config_protocol = config.protocol;
        let config_retry = (config.retry_min, config.retry_max);
        let mut dp = Self {
            config,
            sock,
            monitor,
            links: Links::default(),
            slots: PrefixMap::new(),
            devices: Devices::default(),
            strays: BTreeMap::new(),
            synced: 0,
            desired_by_kind: [0; RouteKind::ALL.len()],
            programmed: false,
            foreign: BTreeMap::new(),
            failures: BTreeMap::new(),
            counters: DataplaneCounters::default(),
            last_resync: Instant::now(),
            observer: None,
            applied: None,
            inflight: None,
            tunnels: Tunnels::new(config_tunnels),
            link_facts: watch::channel(LinkFacts::default()).0,
            recursive: BTreeMap::new(),
            vxlan: vxlan::VxlanTunnels::new(config_protocol, config_retry.0, config_retry.1),
            vxlan_dirty: false,
        };
        dp.read_kernel()?;
        dp.counters.resyncs = 0;
        // The previous run's tunnel routes keep the userspace forwarder going until the first
        // plan of this run is applied.
        let tunl0 = crate::plan::TUNNEL_DEVICE;
        dp.tunnels.adopt(tunl0, dp.routes_via(tunl0));
        Ok(dp)
    }

    /// The route protocol in use.
    pub fn protocol(&self) -> u8 {
        self.config.protocol
    }

    /// Re-reads links, our routes, and other owners' routes at planned destinations from the
    /// kernel.
    pub fn read_kernel(&mut self) -> Result<(), DataplaneError> {
        let mut links = Links::default();
        self.sock
            .dump_each(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                |msg| {
                    if let RouteNetlinkMessage::NewLink(m) = msg {
                        links.update(&LinkInfo::from_message(&m));
                    }
                },
            )
            .map_err(DataplaneError::Dump)?;
        self.links = links;
        self.publish_links();
        self.refresh_recursive();
        for slot in self.slots.values_mut() {
            slot.flags &= !Slot::SYNCED;
        }
        self.synced = 0;
        self.strays.clear();
        self.foreign.clear();
        let ours = self.config.protocol;
        let mut routes = Vec::new();
        let mut foreign = Vec::new();
        let slots = &self.slots;
        // The whole main table: ours, and other owners' routes at the key of a planned
        // destination (before the first plan there are none of those to keep).
        self.sock
            .dump_each(kernel::dump_request_filtered(None, None), |msg| {
                if let RouteNetlinkMessage::NewRoute(m) = msg
                    && let Some(route) = KernelRoute::from_message(&m)
                {
                    if route.protocol == ours {
                        routes.push(route);
                    } else if route.key == want_key(route.key.dst)
                        && slots.contains_key(&route.key.dst)
                    {
                        foreign.push(route);
                    }
                }
            })
            .map_err(DataplaneError::Dump)?;
        for route in foreign {
            self.foreign.insert(route.key.dst, route);
        }
        for route in routes {
            self.kernel_has(route);
        }
        self.counters.resyncs += 1;
        self.last_resync = Instant::now();
        Ok(())
    }

    /// Publishes the link facts when they changed.
    fn publish_links(&self) {
        let facts = self.links.facts();
        self.link_facts.send_if_modified(|old| {
            if *old == facts {
                false
            } else {
                *old = facts;
                true
            }
        });
    }

    /// The node's links as the monitor sees them, updated on every link change (for the
    /// agent: pods' interfaces, the host NIC's carrier).
    pub fn link_facts(&self) -> watch::Receiver<LinkFacts> {
        self.link_facts.subscribe()
    }

    /// The userspace IPIP forwarder's counters (copied from its process once a second).
    pub fn ipip_counters(&self) -> Arc<crate::dataplane::ipip_user::IpipCounters> {
        self.tunnels.ipip_counters()
    }

    /// Lowers a slot to the kernel route; `Err(device)` when its device is missing.
    fn lower(&self, dst: IpNet, slot: &Slot) -> Result<KernelRoute, Arc<str>> {
        let oif = match slot.device.and_then(|d| self.devices.name(d)) {
            Some(dev) => match self.links.by_name.get(&**dev) {
                Some(i) => Some(*i),
                None => return Err(dev.clone()),
            },
            None => None,
        };
        let mut route = slot.kernel_route(dst, self.config.protocol, oif, &self.devices);
        if let Some(Some((gateway, oif))) = slot
            .recursive_gateway(&self.devices)
            .and_then(|g| self.recursive.get(&g))
        {
            route.gateway = Some(*gateway);
            route.oif = Some(*oif);
        }
        Ok(route)
    }

    /// The kernel's next hop towards `gateway` when it is itself a gateway (see
    /// [`Dataplane::recursive`]); `None` when `gateway` is on a connected subnet or cannot be
    /// looked up (the route is then installed via `gateway`, and the kernel says why not).
    fn look_up_next_hop(&mut self, gateway: IpAddr) -> Option<(IpAddr, u32)> {
        match self.sock.get(kernel::get_route_request(gateway)) {
            Ok(answer) => kernel::next_hop_of(&answer).filter(|(via, _)| *via != gateway),
            Err(e) => {
                tracing::debug!(%gateway, error = %e, "no route towards the gateway");
                None
            }
        }
    }

    /// Looks up the gateways of `dsts` not resolved yet.
    fn resolve_gateways(&mut self, dsts: &[IpNet]) {
        for dst in dsts {
            let Some(gateway) = self
                .slots
                .get(dst)
                .and_then(|s| s.recursive_gateway(&self.devices))
            else {
                continue;
            };
            if !self.recursive.contains_key(&gateway) {
                let next_hop = self.look_up_next_hop(gateway);
                self.recursive.insert(gateway, next_hop);
            }
        }
    }

    /// Looks every known gateway up again; returns those whose next hop changed. Gateways no
    /// planned route uses any more are dropped.
    fn refresh_recursive(&mut self) -> BTreeSet<IpAddr> {
        let used: BTreeSet<IpAddr> = self
            .slots
            .values()
            .filter_map(|s| s.recursive_gateway(&self.devices))
            .collect();
        self.recursive.retain(|g, _| used.contains(g));
        let mut changed = BTreeSet::new();
        let gateways: Vec<IpAddr> = self.recursive.keys().copied().collect();
        for gateway in gateways {
            let next_hop = self.look_up_next_hop(gateway);
            if self.recursive.insert(gateway, next_hop) != Some(next_hop) {
                changed.insert(gateway);
            }
        }
        changed
    }

    /// Records that the kernel holds `route` (ours): it syncs its slot when it is what the
    /// slot wants, else it is a stray.
    fn kernel_has(&mut self, route: KernelRoute) {
        let dst = route.key.dst;
        let wanted = self
            .slots
            .get(&dst)
            .and_then(|slot| self.lower(dst, slot).ok());
        match wanted {
            Some(w) if w.key == route.key && w.satisfied_by(&route) => {
                self.strays.remove(&route.key);
                self.set_synced(dst, true);
                self.succeeded(dst);
            }
            Some(w) if w.key == route.key => {
                self.set_synced(dst, false);
                self.strays.insert(route.key, route);
            }
            _ => {
                self.strays.insert(route.key, route);
            }
        }
    }

    fn set_synced(&mut self, dst: IpNet, synced: bool) {
        if let Some(slot) = self.slots.get_mut(&dst)
            && slot.synced() != synced
        {
            if synced {
                slot.flags |= Slot::SYNCED;
                slot.flags &= !Slot::BY_OTHER;
                self.synced += 1;
            } else {
                slot.flags &= !Slot::SYNCED;
                self.synced -= 1;
            }
        }
    }

    /// Removes the slot of `dst`; a synced route becomes a stray (to be deleted).
    fn remove_slot(&mut self, dst: IpNet) -> Option<Slot> {
        let slot = self.slots.remove(&dst)?;
        self.tunnels.route_removed(dst);
        self.desired_by_kind[slot.kind.index()] -= 1;
        if slot.synced() {
            self.synced -= 1;
            // Deletes name key, type and protocol; the device does not matter.
            let route = slot.kernel_route(dst, self.config.protocol, None, &self.devices);
            self.strays.insert(route.key, route);
        }
        slot.release(&mut self.devices);
        Some(slot)
    }

    /// Sets the route wanted for its prefix; returns the prefix when anything changed.
    fn upsert_slot(&mut self, route: DesiredRoute) -> Option<IpNet> {
        let (dst, slot) = Slot::new(route, &mut self.devices);
        if self.slots.get(&dst).is_some_and(|s| s.same_want(&slot)) {
            slot.release(&mut self.devices);
            return None;
        }
        self.remove_slot(dst);
        self.desired_by_kind[slot.kind.index()] += 1;
        self.tunnels
            .route_upserted(dst, slot.kind, slot.gateway(&self.devices));
        self.slots.insert(dst, slot);
        Some(dst)
    }

    /// Sets the routes the kernel must have (all of them). The next
    /// [`reconcile`](Self::reconcile) applies them. Routes are keyed by prefix; a later
    /// duplicate wins.
    pub fn set_desired<'a>(&mut self, routes: impl IntoIterator<Item = &'a DesiredRoute>) {
        self.replace_desired(routes.into_iter().cloned());
    }

    fn replace_desired(&mut self, routes: impl IntoIterator<Item = DesiredRoute>) {
        self.tunnels.full_plan();
        let new: PrefixMap<DesiredRoute> =
            routes.into_iter().map(|r| (r.prefix.trunc(), r)).collect();
        let gone: Vec<IpNet> = self.slots.keys().filter(|d| !new.contains_key(d)).collect();
        for dst in gone {
            self.remove_slot(dst);
        }
        for route in new.into_values() {
            self.upsert_slot(route);
        }
        let slots = &self.slots;
        self.failures.retain(|dst, _| slots.contains_key(dst));
        self.foreign.retain(|dst, _| slots.contains_key(dst));
        self.programmed = true;
    }

    /// Applies single-prefix changes; returns the destinations to reconcile, sorted, each
    /// once.
    pub fn apply_delta(&mut self, changes: Vec<RouteChange>) -> Vec<IpNet> {
        let mut dirty = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                RouteChange::Upsert(route) => dirty.extend(self.upsert_slot(route)),
                RouteChange::Remove(prefix) => {
                    let dst = prefix.trunc();
                    if self.remove_slot(dst).is_some() {
                        self.failures.remove(&dst);
                        self.foreign.remove(&dst);
                        dirty.push(dst);
                    }
                }
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        dirty
    }

    /// Records a failure, retried with backoff when `retry`, else left until the kernel
    /// changes ([`RouteFailure::next_retry`]); returns true when it is new or changed.
    fn record_failure(&mut self, route: DesiredRoute, error: RouteError, retry: bool) -> bool {
        let now = Instant::now();
        let dst = route.prefix.trunc();
        match self.failures.get_mut(&dst) {
            Some(f) => {
                f.attempts += 1;
                f.next_retry = retry.then(|| now + backoff(&self.config, f.attempts));
                let changed = f.error != error || f.route != route;
                f.error = error;
                f.route = route;
                changed
            }
            None => {
                self.failures.insert(
                    dst,
                    RouteFailure {
                        route,
                        error,
                        attempts: 1,
                        first_failed: SystemTime::now(),
                        next_retry: retry.then(|| now + self.config.retry_min),
                        warned: None,
                    },
                );
                true
            }
        }
    }

    /// Whether the failure of `dst` may be logged at WARN now (at most once per
    /// [`FAILURE_WARN_INTERVAL`]); if so, records that it is.
    fn warn_due(&mut self, dst: IpNet) -> bool {
        let Some(f) = self.failures.get_mut(&dst) else {
            return false;
        };
        let now = Instant::now();
        if f.warned
            .is_some_and(|w| now.duration_since(w) < FAILURE_WARN_INTERVAL)
        {
            return false;
        }
        f.warned = Some(now);
        true
    }

    /// Applies the ownership rule to `dst`, whose route of ours is not in the kernel and for
    /// which another owner's route is known ([`Dataplane::foreign`]): identical to the plan,
    /// the destination is programmed by that owner; different, it is failed
    /// ([`RouteError::Occupied`], not retried: the monitor says when the route goes). Either
    /// way no request is made.
    fn settle_foreign(&mut self, dst: IpNet, report: &mut ApplyReport) {
        let Some(slot) = self.slots.get(&dst).copied() else {
            return;
        };
        let Ok(wanted) = self.lower(dst, &slot) else {
            return;
        };
        let Some(theirs) = self.foreign.get(&dst) else {
            return;
        };
        match decide(&wanted, None, Some(theirs)) {
            Decision::ByOther { protocol } => {
                if !slot.by_other() {
                    if let Some(s) = self.slots.get_mut(&dst) {
                        s.flags |= Slot::BY_OTHER;
                    }
                    tracing::info!(
                        route = %slot.route(dst, &self.devices),
                        owner = %Protocol(protocol),
                        "planned route is in the kernel from another owner, as planned; left to it"
                    );
                }
                self.succeeded(dst);
            }
            Decision::HeldByOther { protocol } => {
                if let Some(s) = self.slots.get_mut(&dst) {
                    s.flags &= !Slot::BY_OTHER;
                }
                let route = slot.route(dst, &self.devices);
                let error = RouteError::Occupied {
                    protocol: Some(protocol),
                };
                self.record_failure(route.clone(), error.clone(), false);
                report.failed += 1;
                if self.warn_due(dst) {
                    tracing::warn!(
                        route = %route,
                        owner = %Protocol(protocol),
                        error = %error,
                        "planned route held by another owner's route; left alone"
                    );
                }
            }
            Decision::Promote | Decision::Replace | Decision::Add => {}
        }
    }

    /// Makes the kernel match the desired routes (all of them). Does nothing before the first
    /// [`set_desired`](Self::set_desired).
    pub fn reconcile(&mut self) -> ApplyReport {
        self.reconcile_scope(Scope::All)
    }

    /// Makes the kernel match the desired routes for the destinations `dsts` only (after a
    /// [`apply_delta`](Self::apply_delta), a drift, a retry). Does nothing before the first
    /// [`set_desired`](Self::set_desired).
    pub fn reconcile_some(&mut self, dsts: &[IpNet]) -> ApplyReport {
        if dsts.is_sorted_by(|a, b| a < b) {
            return self.reconcile_scope(Scope::Only(dsts));
        }
        let mut dsts = dsts.to_vec();
        dsts.sort_unstable();
        dsts.dedup();
        self.reconcile_scope(Scope::Only(&dsts))
    }

    /// The next destinations of a full reconcile after `after`: those of slots and strays.
    fn next_destinations(&self, after: Option<IpNet>, out: &mut Vec<IpNet>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut slots = self.slots.iter_after(after).map(|(d, _)| d).peekable();
        let stray_lower = after.map_or(Unbounded, |d| {
            Excluded(RouteKey {
                dst: d,
                priority: u32::MAX,
                tos: u8::MAX,
            })
        });
        let mut strays = self
            .strays
            .range((stray_lower, Unbounded))
            .map(|(k, _)| k.dst)
            .peekable();
        while out.len() < RECONCILE_CHUNK {
            let next = match (slots.peek(), strays.peek()) {
                (Some(a), Some(b)) => *a.min(b),
                (Some(a), None) => *a,
                (None, Some(b)) => *b,
                (None, None) => break,
            };
            slots.next_if_eq(&next);
            while strays.next_if_eq(&next).is_some() {}
            out.push(next);
        }
    }

    fn reconcile_scope(&mut self, scope: Scope<'_>) -> ApplyReport {
        // Decided on the answers of a chunk in flight (none outside a stream).
        self.settle();
        if !self.programmed {
            return ApplyReport::default();
        }
        self.counters.reconciles += 1;
        let started = Instant::now();
        let mut report = ApplyReport::default();
        let mut missing: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        let mut chunk = Vec::with_capacity(RECONCILE_CHUNK);
        match scope {
            Scope::All => {
                let mut after = None;
                loop {
                    chunk.clear();
                    self.next_destinations(after, &mut chunk);
                    let Some(last) = chunk.last().copied() else {
                        break;
                    };
                    after = Some(last);
                    self.reconcile_chunk(&chunk, &mut report, &mut missing);
                }
            }
            Scope::Only(dsts) => {
                for part in dsts.chunks(RECONCILE_CHUNK) {
                    self.reconcile_chunk(part, &mut report, &mut missing);
                }
            }
        }
        warn_missing(missing);
        self.finish_report(started, report);
        report
    }

    /// Logs a reconcile that changed anything and tells the observer.
    fn finish_report(&self, started: Instant, report: ApplyReport) {
        if report.changes() > 0 {
            tracing::info!(
                added = report.added,
                replaced = report.replaced,
                deleted = report.deleted,
                failed = report.failed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "routes reconciled"
            );
        }
        if let Some(observer) = &self.observer {
            observer(started.elapsed(), report);
        }
    }

    /// Reconciles the destinations `dsts` (sorted, each once) of a stream, leaving their
    /// requests with the kernel: the socket's sender thread sends them while the caller takes
    /// the next updates and prepares the next chunk, and their answers are taken when the next
    /// chunk is sent (or at [`settle`](Self::settle)). The kernel's work, most of a large
    /// table's programming, thus overlaps ours. A destination of `dsts` still in flight is
    /// settled first: each destination is decided on what the answers said. `taken`: what
    /// the caller took from its queue for this chunk ([`Self::in_flight`] reports it).
    fn reconcile_pipelined(&mut self, dsts: Vec<IpNet>, taken: u64) {
        if !self.programmed {
            return;
        }
        if self
            .inflight
            .as_ref()
            .is_some_and(|f| overlaps(&f.dsts, &dsts))
        {
            self.settle();
        }
        self.counters.reconciles += 1;
        let started = Instant::now();
        let mut report = ApplyReport::default();
        let mut missing = BTreeMap::new();
        let changes = self.prepare_chunk(&dsts, &mut report, &mut missing);
        warn_missing(missing);
        // The kernel is done with the previous chunk once its answers are in; this chunk is
        // sent before those answers are handled.
        let previous = self.take_answered();
        if changes.is_empty() {
            self.finish_report(started, report);
        } else {
            let submitted = self
                .sock
                .submit(changes.iter().map(Change::request).collect());
            self.inflight = Some(InFlight {
                dsts,
                changes,
                submitted,
                report,
                started,
                taken,
            });
        }
        if let Some(answered) = previous {
            self.finish_chunk(answered);
        }
    }

    /// Takes the answers of the chunk in flight, if any.
    fn settle(&mut self) {
        if let Some(answered) = self.take_answered() {
            self.finish_chunk(answered);
        }
    }

    /// The chunk in flight, with its answers (waits for them).
    fn take_answered(&mut self) -> Option<Answered> {
        let InFlight {
            changes,
            submitted,
            report,
            started,
            ..
        } = self.inflight.take()?;
        let results = self.sock.wait(submitted);
        Some(Answered {
            changes,
            results,
            report,
            started,
        })
    }

    /// Takes a chunk's answers into the mirror and reports it.
    fn finish_chunk(&mut self, answered: Answered) {
        let mut report = answered.report;
        self.complete(answered.changes, answered.results, &mut report);
        self.finish_report(answered.started, report);
    }

    /// What the caller took for the chunk in flight (0 when none is).
    fn in_flight(&self) -> u64 {
        self.inflight.as_ref().map_or(0, |f| f.taken)
    }

    /// Does `update` change the wanted route of a destination in flight?
    fn touches_in_flight(&self, update: &PlanUpdate) -> bool {
        let Some(f) = &self.inflight else {
            return false;
        };
        match update {
            PlanUpdate::Delta(changes) => changes.iter().any(|c| {
                let dst = match c {
                    RouteChange::Upsert(route) => route.prefix.trunc(),
                    RouteChange::Remove(prefix) => prefix.trunc(),
                };
                f.dsts.binary_search(&dst).is_ok()
            }),
            PlanUpdate::Full(_) | PlanUpdate::Tunnels(_) => true,
        }
    }

    /// What destination `dst` needs: adds and replaces go to `upserts`, deletes to
    /// `deletes`, promotions and missing devices to `other`.
    fn steps(
        &self,
        dst: IpNet,
        upserts: &mut Vec<Change>,
        deletes: &mut Vec<Change>,
        other: &mut Vec<(IpNet, Step)>,
    ) {
        let strays = self.strays.range(RouteKey::range(dst));
        let Some(slot) = self.slots.get(&dst) else {
            deletes.extend(strays.map(|(_, r)| Change::Delete(r.clone())));
            return;
        };
        let wanted = match self.lower(dst, slot) {
            Ok(w) => w,
            Err(device) => {
                // Held back: nothing for this destination changes until the device exists.
                other.push((dst, Step::Missing(device)));
                return;
            }
        };
        let mut exact = None;
        for (key, have) in strays {
            if *key == wanted.key {
                exact = Some(have);
            } else {
                deletes.push(Change::Delete(have.clone()));
            }
        }
        if slot.synced() && exact.is_none() {
            if self.failures.contains_key(&dst) {
                other.push((dst, Step::InSync));
            }
            return;
        }
        match decide(&wanted, exact, self.foreign.get(&dst)) {
            Decision::Promote => other.push((dst, Step::Promote(wanted.key))),
            Decision::Replace => upserts.push(Change::Replace(wanted)),
            Decision::Add => upserts.push(Change::Add(wanted)),
            Decision::ByOther { .. } | Decision::HeldByOther { .. } => {
                other.push((dst, Step::Foreign))
            }
        }
    }

    fn reconcile_chunk(
        &mut self,
        dsts: &[IpNet],
        report: &mut ApplyReport,
        missing: &mut BTreeMap<Arc<str>, usize>,
    ) {
        let changes = self.prepare_chunk(dsts, report, missing);
        self.apply(changes, report);
    }

    /// Decides what the destinations `dsts` need: settles those that need no request and
    /// returns the requests of the others (adds and replaces before deletes).
    fn prepare_chunk(
        &mut self,
        dsts: &[IpNet],
        report: &mut ApplyReport,
        missing: &mut BTreeMap<Arc<str>, usize>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut deletes = Vec::new();
        let mut other = Vec::new();
        self.resolve_gateways(dsts);
        for dst in dsts {
            self.steps(*dst, &mut changes, &mut deletes, &mut other);
        }
        // Adds and replaces before deletes: traffic moving to a new route meets no gap.
        changes.append(&mut deletes);
        for (dst, step) in other {
            match step {
                Step::InSync => self.succeeded(dst),
                Step::Promote(key) => {
                    self.strays.remove(&key);
                    self.set_synced(dst, true);
                    self.succeeded(dst);
                }
                Step::Missing(device) => {
                    let Some(route) = self.slots.get(&dst).map(|s| s.route(dst, &self.devices))
                    else {
                        continue;
                    };
                    // A missing device is only news the first time; retries stay quiet.
                    let error = RouteError::MissingDevice(device.to_string());
                    if self.record_failure(route, error, true) {
                        *missing.entry(device).or_default() += 1;
                    }
                    report.failed += 1;
                    self.counters.route_errors += 1;
                }
                Step::Foreign => self.settle_foreign(dst, report),
            }
        }
        changes
    }

    /// Calls `observer` after every reconcile with its duration and result (metrics).
    pub fn on_reconcile(&mut self, observer: impl Fn(Duration, ApplyReport) + Send + 'static) {
        self.observer = Some(Box::new(observer));
    }

    fn apply(&mut self, changes: Vec<Change>, report: &mut ApplyReport) {
        if changes.is_empty() {
            return;
        }
        let submitted = self
            .sock
            .submit(changes.iter().map(Change::request).collect());
        let results = self.sock.wait(submitted);
        self.complete(changes, results, report);
    }

    /// Takes the answers to `changes` into the mirror, the failures and `report`.
    fn complete(
        &mut self,
        changes: Vec<Change>,
        batch: socket::BatchResults,
        report: &mut ApplyReport,
    ) {
        self.counters.netlink_sends += batch.sends;
        self.counters.netlink_requests += changes.len() as u64;
        let mut lost_acks = false;
        // Adds refused because a route is at the key: whose, and what it is, decides.
        let mut taken = Vec::new();
        // A request without an answer (a socket that lost the batch) failed.
        let results = batch.results.into_iter().chain(std::iter::repeat_with(|| {
            Err(NetlinkError::Io("no answer to the request".into()))
        }));
        for (change, result) in changes.into_iter().zip(results) {
            let dst = change.route().key.dst;
            match (change, result) {
                (Change::Add(r), Ok(())) => {
                    report.added += 1;
                    self.counters.routes_added += 1;
                    self.installed(r);
                }
                (Change::Replace(r), Ok(())) => {
                    report.replaced += 1;
                    self.counters.routes_replaced += 1;
                    self.installed(r);
                }
                (Change::Delete(r), result) => match result {
                    Err(NetlinkError::Kernel { errno, .. })
                        if errno != libc::ESRCH && errno != libc::ENOENT =>
                    {
                        report.failed += 1;
                        self.counters.route_errors += 1;
                        tracing::warn!(route = ?r.key, errno, "could not delete route");
                    }
                    Err(NetlinkError::Kernel { .. }) | Ok(()) => {
                        report.deleted += 1;
                        self.counters.routes_deleted += 1;
                        self.strays.remove(&r.key);
                    }
                    Err(e) => {
                        lost_acks |= e == NetlinkError::AckLost;
                        report.failed += 1;
                        self.counters.route_errors += 1;
                        tracing::warn!(route = ?r.key, error = %e, "could not delete route");
                    }
                },
                (Change::Add(_), Err(e)) if e.errno() == Some(libc::EEXIST) => taken.push(dst),
                (Change::Add(_) | Change::Replace(_), Err(e)) => {
                    lost_acks |= e == NetlinkError::AckLost;
                    report.failed += 1;
                    self.counters.route_errors += 1;
                    self.refused(dst, RouteError::Kernel(e));
                }
            }
        }
        if !taken.is_empty() {
            self.look_up_foreign(&taken);
            for dst in taken {
                if self.foreign.contains_key(&dst) {
                    self.settle_foreign(dst, report);
                    if self.failures.contains_key(&dst) {
                        self.counters.route_errors += 1;
                    }
                } else {
                    // Gone already, or the look-up failed: try again later.
                    report.failed += 1;
                    self.counters.route_errors += 1;
                    self.refused(dst, RouteError::Occupied { protocol: None });
                }
            }
        }
        if lost_acks {
            // The kernel state of the unanswered requests is unknown: read it again.
            if let Err(e) = self.read_kernel() {
                tracing::error!(error = %e, "re-reading the routing table failed");
            }
        }
    }

    /// The kernel refused the route of `dst` with `error`: failed, retried with backoff.
    fn refused(&mut self, dst: IpNet, error: RouteError) {
        if let Some(route) = self.slots.get(&dst).map(|s| s.route(dst, &self.devices))
            && self.record_failure(route.clone(), error.clone(), true)
        {
            tracing::warn!(route = %route, error = %error, "route not programmed; will retry");
        }
    }

    /// Finds the routes of other owners at the keys of `dsts` (adds the kernel refused with
    /// EEXIST) and records them in [`Dataplane::foreign`]. The routes of the devices the plan
    /// names are dumped first, device by device (a pod's `cali*` device holds one or two
    /// routes); what is still not found is looked for in one dump of the main table. A
    /// failed dump is logged: the destinations are then retried as occupied.
    fn look_up_foreign(&mut self, dsts: &[IpNet]) {
        let mut missing: BTreeSet<IpNet> = dsts.iter().copied().collect();
        let oifs: BTreeSet<u32> = missing
            .iter()
            .filter_map(|d| {
                let slot = self.slots.get(d)?;
                self.lower(*d, slot).ok()?.oif
            })
            .collect();
        let ours = self.config.protocol;
        let mut found = Vec::new();
        let mut dumps: Vec<Option<u32>> = Vec::new();
        if oifs.len() <= LOOKUP_DEVICE_DUMPS {
            dumps.extend(oifs.into_iter().map(Some));
        }
        dumps.push(None);
        for oif in dumps {
            if missing.is_empty() {
                break;
            }
            let result = self
                .sock
                .dump_each(kernel::dump_request_filtered(None, oif), |msg| {
                    if let RouteNetlinkMessage::NewRoute(m) = msg
                        && let Some(route) = KernelRoute::from_message(&m)
                        && route.protocol != ours
                        && route.key == want_key(route.key.dst)
                        && missing.remove(&route.key.dst)
                    {
                        found.push(route);
                    }
                });
            if let Err(e) = result {
                tracing::warn!(error = %e, oif, "could not look for the routes in the way");
            }
        }
        for route in found {
            self.foreign.insert(route.key.dst, route);
        }
    }

    /// The kernel accepted `route`, the lowered want of its slot.
    fn installed(&mut self, route: KernelRoute) {
        let dst = route.key.dst;
        // An exclusive add or a replace of ours succeeded: no other owner's route is at the
        // key (any record of one is stale).
        self.foreign.remove(&dst);
        self.strays.remove(&route.key);
        self.set_synced(dst, true);
        self.succeeded(dst);
    }

    fn succeeded(&mut self, dst: IpNet) {
        if let Some(f) = self.failures.remove(&dst) {
            tracing::info!(route = %f.route, attempts = f.attempts, "route programmed after failures");
        }
    }

    /// Whether the kernel holds our route `key` as far as we know.
    fn holds(&self, key: &RouteKey) -> bool {
        self.strays.contains_key(key)
            || (*key == want_key(key.dst) && self.slots.get(&key.dst).is_some_and(Slot::synced))
    }

    /// Applies monitor events to the mirror; returns the destinations to repair and whether
    /// a full re-read is needed.
    fn absorb(&mut self, events: Vec<Event>) -> (Vec<IpNet>, bool) {
        let mut dirty = BTreeSet::new();
        let mut resync = false;
        let mut links_changed = false;
        let mut underlay_changed = false;
        let ours = self.config.protocol;
        for event in events {
            // Another owner's route that is not at a planned destination (not a CNI pod
            // route, not in the way of one of ours): the underlay.
            if let Event::RouteAdded { route, .. } | Event::RouteRemoved(route) = &event
                && route.protocol != ours
                && !self.slots.contains_key(&route.key.dst)
            {
                underlay_changed = true;
            }
            match event {
                Event::RouteAdded { route, replaced } => {
                    let dst = route.key.dst;
                    if route.protocol == ours {
                        if replaced && self.foreign.get(&dst).is_some_and(|f| f.key == route.key) {
                            // Ours was put over the other owner's route (by hand).
                            self.foreign.remove(&dst);
                        }
                        self.kernel_has(route);
                        dirty.insert(dst);
                        continue;
                    }
                    if replaced && self.holds(&route.key) {
                        // Another owner's route overwrote ours (`ip route replace`): ours is
                        // gone, and theirs is left alone (below).
                        self.forget(&route.key);
                        dirty.insert(dst);
                    }
                    // Added behind a route of ours that stays in front (append) it changes
                    // nothing; else it holds the key of a planned destination.
                    if route.key == want_key(dst)
                        && self.slots.contains_key(&dst)
                        && !self.holds(&route.key)
                    {
                        self.foreign.insert(dst, route);
                        dirty.insert(dst);
                    }
                }
                Event::RouteRemoved(route) => {
                    let dst = route.key.dst;
                    if route.protocol == ours {
                        self.forget(&route.key);
                        dirty.insert(dst);
                    } else if self
                        .foreign
                        .get(&dst)
                        .is_some_and(|f| f.key == route.key && f.protocol == route.protocol)
                    {
                        // The other owner's route went away: the destination is ours to
                        // program again.
                        self.foreign.remove(&dst);
                        if let Some(slot) = self.slots.get_mut(&dst) {
                            slot.flags &= !Slot::BY_OTHER;
                        }
                        dirty.insert(dst);
                    } else if self.failures.contains_key(&dst) {
                        // A foreign route in our way went away: try now.
                        dirty.insert(dst);
                    }
                }
                Event::Neighbour { ifindex } => {
                    if self.vxlan.watches(ifindex) {
                        self.vxlan_dirty = true;
                    }
                }
                Event::LinkChanged(info) => {
                    links_changed = true;
                    if self.vxlan.watches(info.index)
                        || info
                            .name
                            .as_deref()
                            .is_some_and(|n| self.vxlan.plans_device(n))
                    {
                        self.vxlan_dirty = true;
                    }
                    if let Some(name) = self.links.update(&info) {
                        dirty.extend(self.failures.iter().filter_map(|(dst, f)| {
                            (f.error == RouteError::MissingDevice(name.clone())).then_some(*dst)
                        }));
                    }
                    if !info.up {
                        // IPv4 routes through a downed device vanish without notification.
                        resync = true;
                    }
                }
                Event::LinkRemoved(info) => {
                    links_changed = true;
                    if self.vxlan.watches(info.index) {
                        self.vxlan_dirty = true;
                    }
                    self.links.remove(info.index);
                    resync = true;
                }
                Event::Overrun => resync = true,
            }
        }
        if links_changed {
            self.publish_links();
        }
        // Another owner's route changed: a recursive next hop may have moved.
        if underlay_changed && !self.recursive.is_empty() {
            // What the kernel holds for the synced recursive routes, before the look-up.
            let held: Vec<(IpNet, IpAddr, KernelRoute)> = self
                .slots
                .iter()
                .filter(|(_, slot)| slot.synced())
                .filter_map(|(dst, slot)| {
                    let gateway = slot.recursive_gateway(&self.devices)?;
                    Some((dst, gateway, self.lower(dst, slot).ok()?))
                })
                .collect();
            let changed = self.refresh_recursive();
            for (dst, gateway, old) in held {
                if changed.contains(&gateway) {
                    // No longer what the slot wants: replaced by the next reconcile.
                    self.set_synced(dst, false);
                    self.strays.insert(old.key, old);
                    dirty.insert(dst);
                }
            }
        }
        // Only destinations we care about.
        dirty.retain(|d| {
            self.slots.contains_key(d) || self.strays.range(RouteKey::range(*d)).next().is_some()
        });
        (dirty.into_iter().collect(), resync)
    }

    /// The kernel no longer holds our route `key`.
    fn forget(&mut self, key: &RouteKey) {
        if self.strays.remove(key).is_none() && *key == want_key(key.dst) {
            self.set_synced(key.dst, false);
        }
    }

    /// Reconciles the failed routes whose retry time has come.
    pub fn retry_due(&mut self) -> ApplyReport {
        let now = Instant::now();
        let due: Vec<IpNet> = self
            .failures
            .iter()
            .filter(|(_, f)| f.next_retry.is_some_and(|t| t <= now))
            .map(|(d, _)| *d)
            .collect();
        if due.is_empty() {
            return ApplyReport::default();
        }
        self.reconcile_some(&due)
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failures.values().filter_map(|f| f.next_retry).min()
    }

    /// Our installed routes whose device is `device`, as (destination, gateway): after a
    /// restart, what the previous run routed through `tunl0`.
    pub fn routes_via(&self, device: &str) -> Vec<(IpNet, IpAddr)> {
        let Some(index) = self.links.by_name.get(device).copied() else {
            return Vec::new();
        };
        let strays = self
            .strays
            .values()
            .filter(|r| r.oif == Some(index))
            .filter_map(|r| r.gateway.map(|g| (r.key.dst, g)));
        let id = self.devices.names.by_name.get(device).copied();
        let devices = &self.devices;
        let synced = self
            .slots
            .iter()
            .filter(|(_, s)| s.synced() && id.is_some() && s.device == id)
            .filter_map(|(d, s)| s.gateway(devices).map(|g| (d, g)));
        strays.chain(synced).collect()
    }

    /// A snapshot for status readers.
    pub fn status(&self) -> DataplaneStatus {
        let mut programmed_by_kind = [0; RouteKind::ALL.len()];
        if self.programmed {
            programmed_by_kind = self.desired_by_kind;
            for f in self.failures.values() {
                let n = &mut programmed_by_kind[f.route.kind.index()];
                *n = n.saturating_sub(1);
            }
        }
        DataplaneStatus {
            programmed: self.programmed,
            desired_routes: self.slots.len(),
            installed_routes: self.synced + self.strays.len(),
            programmed_by_kind,
            failures: self.failures.values().cloned().collect(),
            by_other_owner: self
                .foreign
                .iter()
                .filter(|(dst, _)| self.slots.get(dst).is_some_and(Slot::by_other))
                .map(|(dst, r)| OtherOwner {
                    prefix: *dst,
                    protocol: r.protocol,
                })
                .collect(),
            counters: self.counters,
            applied: self.applied,
            tunnels: self.tunnels.status(),
            vxlan: self.vxlan.status().clone(),
        }
    }

    /// True while a route of ours may still need the device `name`: a desired route names
    /// it, a route of ours in the kernel goes through it, or a destination is between two
    /// routes (the old one, through the device perhaps, still in the kernel and the new one
    /// not in yet). The rule for removing a tunnel device that left the plan.
    fn device_needed(&self, name: &str) -> bool {
        self.devices.names.by_name.contains_key(name)
            || !self.routes_via(name).is_empty()
            || self.slots.iter().any(|(dst, slot)| {
                !slot.synced() && self.strays.range(RouteKey::range(dst)).next().is_some()
            })
    }

    /// Removes `tunl0` when it left the plan and no route of ours needs it any more
    /// ([`Self::device_needed`]); returns true when it did.
    async fn finish_ipip_removal(&mut self) -> bool {
        let tunl0 = crate::plan::TUNNEL_DEVICE;
        if !self.tunnels.ipip_pending_removal() || self.device_needed(tunl0) {
            return false;
        }
        self.tunnels.remove_ipip().await;
        true
    }

    /// Deletes the VXLAN devices that left the plan once their routes have moved.
    fn finish_tunnel_removal(&mut self) {
        if self.vxlan.pending_removal() && self.sync_tunnels().is_none() {
            self.reconcile();
        }
    }

    /// Makes the VXLAN devices and entries match their plan ([`vxlan`]) and tells the route
    /// half what changed: the devices' indexes, and the routes to try again now that a
    /// device exists. `None`: devices were deleted, whose routes the kernel removed without
    /// telling; the table was re-read and every destination must be reconciled.
    fn sync_tunnels(&mut self) -> Option<Vec<IpNet>> {
        self.vxlan_dirty = false;
        // A device that left the plan goes only once no route of ours needs it: no desired
        // route names it, and no destination is between two routes (the old one, through
        // the device perhaps, still in the kernel and the new one not yet: a pool moving
        // from VXLAN to IPIP while tunl0 comes up).
        let held_back = self.vxlan.active()
            && self.slots.iter().any(|(dst, slot)| {
                !slot.synced() && self.strays.range(RouteKey::range(dst)).next().is_some()
            });
        let devices = &self.devices;
        let report = self.vxlan.reconcile(&mut self.sock, |name| {
            !held_back && !devices.names.by_name.contains_key(name)
        });
        let mut names = Vec::new();
        for link in &report.links {
            if let Some(name) = self.links.update(link) {
                names.push(name);
            }
        }
        if report.deleted_devices {
            if let Err(e) = self.read_kernel() {
                tracing::warn!(error = %e, "cannot re-read the routing table after a VXLAN device change");
            }
            return None;
        }
        Some(
            self.failures
                .iter()
                .filter(
                    |(_, f)| matches!(&f.error, RouteError::MissingDevice(d) if names.contains(d)),
                )
                .map(|(dst, _)| *dst)
                .collect(),
        )
    }

    /// Applies `first` and every update queued behind it, and the ones that come while these
    /// are reconciled, until none is left to reconcile.
    ///
    /// Updates are taken into the desired routes as soon as they are read (a few bytes per
    /// route there, and the agent's messages freed), and their destinations are reconciled
    /// [`RECONCILE_CHUNK`] at a time with the queue read again between chunks: while a table
    /// streams in faster than the kernel takes it, the backlog waits as destinations to
    /// reconcile rather than as queued messages. The status goes out after each chunk.
    async fn stream(
        &mut self,
        first: PlanMessage,
        plans: &mut impl PlanSource,
        status: &watch::Sender<DataplaneStatus>,
    ) {
        let mut pending = Pending::default();
        let mut next = Some(first);
        loop {
            while let Some(PlanMessage { seq, update }) = next {
                // A destination's answers are in before its wanted route changes.
                if self.touches_in_flight(&update) {
                    self.settle();
                }
                match update {
                    // The devices first: routes of later updates use them.
                    PlanUpdate::Tunnels(plan) => {
                        self.vxlan
                            .set_plan(plan.vxlan.clone(), plan.vxlan_peers.clone());
                        self.tunnels.apply(plan).await;
                        // Routes held back for a missing VXLAN device are retried now.
                        match self.sync_tunnels() {
                            None => pending.full = true,
                            Some(dsts) => pending.dsts.extend(dsts),
                        }
                    }
                    update => match self.take_update(update) {
                        None => pending.full = true,
                        Some(dsts) => pending.dsts.extend(dsts),
                    },
                }
                pending
                    .ends
                    .push_back((seq, pending.taken + pending.dsts.len() as u64));
                // The kernel idle and routes to send: send them before taking more updates
                // (those queued are taken while the kernel works).
                if !pending.dsts.is_empty() && (self.inflight.is_none() || self.sock.ready()) {
                    break;
                }
                next = plans.try_recv();
            }
            // The tunnels' tables before the routes that use them: the userspace forwarder
            // confirms its table before they go in.
            self.tunnels.publish();
            self.tunnels.delivered().await;
            if pending.full {
                // Covers every destination queued so far (and settles the chunk in flight).
                self.reconcile();
                pending.taken += pending.dsts.len() as u64;
                pending.dsts.clear();
                pending.full = false;
            } else if !pending.dsts.is_empty() {
                let take = pending.dsts.len().min(RECONCILE_CHUNK);
                let mut chunk: Vec<IpNet> = pending.dsts.take(take);
                pending.taken += take as u64;
                chunk.sort_unstable();
                chunk.dedup();
                self.reconcile_pipelined(chunk, take as u64);
            }
            // Devices leave once no route needs them, which the answers tell.
            if self.vxlan.pending_removal() || self.tunnels.ipip_pending_removal() {
                self.settle();
            }
            self.finish_tunnel_removal();
            self.finish_ipip_removal().await;
            next = plans.try_recv();
            if next.is_none() && pending.dsts.is_empty() && self.inflight.is_some() {
                // Nothing else to do: the last chunk completes (updates may come meanwhile).
                self.settle();
                next = plans.try_recv();
            }
            pending.done = pending.taken - self.in_flight();
            while let Some((seq, end)) = pending.ends.front().copied()
                && end <= pending.done
            {
                self.applied = Some(seq);
                pending.ends.pop_front();
            }
            status.send_replace(self.status());
            if next.is_none() && pending.dsts.is_empty() {
                return;
            }
        }
    }

    /// Applies one update from the agent; returns the destinations to reconcile, or `None`
    /// for all of them.
    fn take_update(&mut self, update: PlanUpdate) -> Option<Vec<IpNet>> {
        match update {
            PlanUpdate::Full(routes) => {
                self.replace_desired(routes);
                None
            }
            PlanUpdate::Delta(changes) => Some(self.apply_delta(changes)),
            // Applied by `stream`, ahead of the routes (devices need the async tunnel code).
            PlanUpdate::Tunnels(_) => Some(Vec::new()),
        }
    }

    /// The long-running dataplane task. Applies each update from `plans` as it comes (until
    /// the first [`PlanUpdate::Full`] nothing is deleted: adopt, change nothing), repairs
    /// drift reported by the monitor, retries failed routes, and publishes
    /// [`DataplaneStatus`] to `status`. Updates queued while the kernel is busy are applied
    /// together. Returns when the plan sender is dropped. Needs a tokio runtime with IO
    /// enabled.
    pub async fn run(
        mut self,
        mut plans: impl PlanSource,
        status: watch::Sender<DataplaneStatus>,
    ) -> Result<(), DataplaneError> {
        let monitor = self
            .monitor
            .take()
            .ok_or_else(|| DataplaneError::Monitor("already running".into()))?;
        // SAFETY: `MonitorSocket` owns its netlink socket, which stays open for as long as the
        // `AsyncFd` holds it, and `as_raw_fd` always returns that same descriptor.
        let mut monitor = unsafe { AsyncFd::register_with_interest(monitor, Interest::READABLE) }
            .map_err(|e| DataplaneError::Monitor(e.to_string()))?;
        let mut events = Vec::new();
        status.send_replace(self.status());
        let mut tunnel_tick = tokio::time::interval(TUNNEL_MAINTENANCE);
        tunnel_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = match (self.next_retry(), self.vxlan.next_retry()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let resync_at = self.last_resync + self.config.resync_interval;
            let wake_at = retry_at.map_or(resync_at, |r| r.min(resync_at));
            tokio::select! {
                message = plans.recv() => {
                    let Some(first) = message else {
                        return Ok(());
                    };
                    self.stream(first, &mut plans, &status).await;
                }
                ready = monitor.readable_mut() => {
                    let mut guard = ready.map_err(|e| DataplaneError::Monitor(e.to_string()))?;
                    let drained = guard.get_inner_mut().drain(&mut events);
                    guard.clear_ready();
                    drained.map_err(|e| DataplaneError::Monitor(e.to_string()))?;
                    let (mut dirty, mut resync) = self.absorb(std::mem::take(&mut events));
                    let tunnels_synced = self.vxlan_dirty;
                    if self.vxlan_dirty {
                        // VXLAN first: a re-made device is there before its routes.
                        let before = self.vxlan.status().counters;
                        match self.sync_tunnels() {
                            None => resync = true,
                            Some(more) => dirty.extend(more),
                        }
                        let after = self.vxlan.status().counters;
                        let repaired = (after.entries_written - before.entries_written)
                            + (after.devices_created - before.devices_created);
                        if repaired > 0 {
                            self.counters.drift_repairs += repaired;
                            tracing::warn!(repaired, "VXLAN devices or entries drifted from the plan; repaired");
                        }
                        dirty.sort_unstable();
                        dirty.dedup();
                    }
                    // What the kernel did may have changed the mirror or cleared failures
                    // even when nothing needs repair.
                    let seen = resync || !dirty.is_empty() || tunnels_synced;
                    let report = if resync {
                        tracing::info!("re-reading the routing table");
                        self.read_kernel()?;
                        self.reconcile()
                    } else if !dirty.is_empty() {
                        self.reconcile_some(&dirty)
                    } else {
                        ApplyReport::default()
                    };
                    if seen {
                        // A device that appeared may have let the last held-back routes in.
                        self.finish_tunnel_removal();
                    }
                    let repaired = report.added + report.replaced + report.deleted;
                    if repaired > 0 {
                        self.counters.drift_repairs += repaired as u64;
                        tracing::warn!(repaired, "routing table drifted from the plan; repaired");
                    }
                    if seen {
                        status.send_replace(self.status());
                    }
                }
                _ = tunnel_tick.tick() => {
                    let before = self.tunnels.status();
                    self.tunnels.maintain().await;
                    // tunl0 that left the plan, once the last route through it moved (a
                    // replace that waited for its new device, a retry).
                    self.finish_ipip_removal().await;
                    if self.tunnels.status() != before {
                        status.send_replace(self.status());
                    }
                }
                _ = tokio::time::sleep_until(wake_at.into()) => {
                    let now = Instant::now();
                    let tunnels_due = self.vxlan.next_retry().is_some_and(|t| now >= t)
                        || (now >= resync_at && self.vxlan.active());
                    let tunnel_dsts = if tunnels_due { self.sync_tunnels() } else { Some(Vec::new()) };
                    if now >= resync_at || tunnel_dsts.is_none() {
                        self.read_kernel()?;
                        self.reconcile();
                    } else {
                        if let Some(dsts) = tunnel_dsts.filter(|d| !d.is_empty()) {
                            self.reconcile_some(&dsts);
                        }
                        self.retry_due();
                        self.finish_tunnel_removal();
                    }
                    status.send_replace(self.status());
                }
            }
        }
    }
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_queue_keeps_arrival_order_across_families() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/26",
            "fd00::/122",
            "10.0.0.64/26",
            "fd00::40/122",
            "fd00::80/122",
            "10.0.0.0/26",
            "192.168.0.1/32",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut q = DstQueue::default();
        assert!(q.is_empty());
        q.extend(nets.iter().copied());
        assert_eq!(q.len(), nets.len());
        assert_eq!(q.take(3), nets[..3]);
        q.extend(nets[..2].iter().copied());
        assert_eq!(q.len(), nets.len() - 3 + 2);
        let mut want = nets[3..].to_vec();
        want.extend_from_slice(&nets[..2]);
        assert_eq!(q.take(100), want, "more than waits: all of it");
        assert!(q.is_empty());
        q.extend(nets.iter().copied());
        q.clear();
        assert!(q.is_empty());
        q.extend(nets[1..2].iter().copied());
        assert_eq!(q.take(1), nets[1..2], "IPv6 queue emptied by clear");
    }

    #[test]
    fn protocols_of_other_daemons_are_refused() {
        for taken in [2u8, 3, 4, 12, 17, 80, 186, 188] {
            let config = DataplaneConfig {
                protocol: taken,
                ..DataplaneConfig::default()
            };
            match Dataplane::open(config) {
                Err(DataplaneError::ProtocolTaken(p)) => assert_eq!(p, taken),
                Err(e) => panic!("protocol {taken}: unexpected error {e}"),
                Ok(_) => panic!("protocol {taken} accepted"),
            }
        }
        assert!(!protocol_taken(DEFAULT_ROUTE_PROTOCOL));
    }

    #[test]
    fn device_names_are_shared_and_freed_with_their_last_route() {
        let mut devices = Devices::default();
        let tunl0 = devices.intern("tunl0".into());
        assert_eq!(devices.intern("tunl0".into()), tunl0, "one id per name");
        let cali = devices.intern("cali0123456789a".into());
        assert_ne!(cali, tunl0);
        devices.release(tunl0);
        assert_eq!(
            devices.name(tunl0).map(|n| &**n),
            Some("tunl0"),
            "one user left"
        );
        devices.release(tunl0);
        assert_eq!(devices.name(tunl0), None);
        // The freed id is reused for the next new name; the other name is untouched.
        let eth0 = devices.intern("eth0".into());
        assert_eq!(eth0, tunl0);
        assert_eq!(devices.name(eth0).map(|n| &**n), Some("eth0"));
        assert_eq!(devices.name(cali).map(|n| &**n), Some("cali0123456789a"));
        assert_eq!(devices.names.by_name.len(), 2);
    }

    #[test]
    fn slots_round_trip_desired_routes() {
        let mut devices = Devices::default();
        let route = DesiredRoute {
            prefix: "172.16.196.128/26".parse().unwrap(),
            kind: RouteKind::BlockIpip,
            gateway: Some("192.168.92.129".parse().unwrap()),
            device: Some("tunl0".into()),
            onlink: true,
            scope: RouteScope::Universe,
        };
        let workload = DesiredRoute {
            prefix: "172.16.241.65/32".parse().unwrap(),
            kind: RouteKind::Workload,
            gateway: None,
            device: Some("cali0123456789a".into()),
            onlink: false,
            scope: RouteScope::Link,
        };
        for r in [route.clone(), workload] {
            let (dst, mut slot) = Slot::new(r.clone(), &mut devices);
            assert_eq!(slot.route(dst, &devices), r);
            let same = slot;
            slot.flags |= Slot::SYNCED;
            assert!(slot.same_want(&same), "synced or not, the same route");
        }
        assert!(std::mem::size_of::<Slot>() <= 12);
        assert_eq!(devices.gateways.by_name.len(), 1, "one gateway, held once");
        let (_, slot) = Slot::new(route, &mut devices);
        assert_eq!(
            devices.gateways.by_name.len(),
            1,
            "the same gateway again: same id"
        );
        slot.release(&mut devices);
        slot.release(&mut devices);
        assert!(
            devices.gateways.by_name.is_empty(),
            "freed with its last route"
        );
    }

    /// The workload route of the plan, lowered for device index 7.
    fn workload_want() -> KernelRoute {
        KernelRoute::wanted(
            "172.16.241.65/32".parse().unwrap(),
            DEFAULT_ROUTE_PROTOCOL,
            false,
            true,
            None,
            Some(7),
            false,
        )
    }

    #[test]
    fn the_cni_plugins_identical_pod_route_satisfies_the_plan() {
        let want = workload_want();
        // `ip route add POD/32 dev caliXXX scope link`: protocol boot.
        let mut cni = want.clone();
        cni.protocol = 3;
        assert_eq!(
            decide(&want, None, Some(&cni)),
            Decision::ByOther { protocol: 3 }
        );
        // Felix's deviceRouteProtocol, or any other owner: the same rule.
        cni.protocol = 80;
        assert_eq!(
            decide(&want, None, Some(&cni)),
            Decision::ByOther { protocol: 80 }
        );
    }

    #[test]
    fn a_different_route_of_another_owner_is_never_replaced() {
        let want = workload_want();
        let mut other_device = want.clone();
        other_device.protocol = 3;
        other_device.oif = Some(8);
        let mut via = want.clone();
        via.protocol = 4;
        via.scope = 0;
        via.gateway = Some("192.168.92.1".parse().unwrap());
        for theirs in [other_device, via] {
            let protocol = theirs.protocol;
            assert_eq!(
                decide(&want, None, Some(&theirs)),
                Decision::HeldByOther { protocol },
                "{theirs:?}"
            );
        }
    }

    #[test]
    fn only_our_own_route_is_replaced_or_promoted() {
        let want = workload_want();
        assert_eq!(decide(&want, None, None), Decision::Add);
        assert_eq!(decide(&want, Some(&want), None), Decision::Promote);
        let mut ours_elsewhere = want.clone();
        ours_elsewhere.oif = Some(9);
        assert_eq!(
            decide(&want, Some(&ours_elsewhere), None),
            Decision::Replace
        );
        // An identical foreign route changes nothing when ours is there.
        let mut cni = want.clone();
        cni.protocol = 3;
        assert_eq!(decide(&want, Some(&want), Some(&cni)), Decision::Promote);
    }

    #[test]
    fn occupied_names_the_other_owner() {
        let text = RouteError::Occupied { protocol: Some(4) }.to_string();
        assert!(text.contains("another owner (proto static)"), "{text}");
        let unknown = RouteError::Occupied { protocol: None }.to_string();
        assert!(unknown.contains("EEXIST"), "{unknown}");
    }

    #[test]
    fn slot_state_flags_do_not_change_what_is_wanted() {
        let mut devices = Devices::default();
        let route = DesiredRoute {
            prefix: "172.16.241.65/32".parse().unwrap(),
            kind: RouteKind::Workload,
            gateway: None,
            device: Some("cali0123456789a".into()),
            onlink: false,
            scope: RouteScope::Link,
        };
        let (_, slot) = Slot::new(route, &mut devices);
        let mut by_other = slot;
        by_other.flags |= Slot::BY_OTHER;
        assert!(by_other.by_other() && !slot.by_other());
        assert!(by_other.same_want(&slot));
    }

    #[test]
    fn failures_back_off_up_to_the_maximum() {
        let config = DataplaneConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..DataplaneConfig::default()
        };
        let delays: Vec<u64> = (1..=6)
            .map(|a| backoff(&config, a).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&config, u32::MAX), config.retry_max);
    }
}
