//! The Linux dataplane: makes the main routing table hold exactly the planned routes.
//!
//! Ownership: every route of the main table whose protocol is [`DataplaneConfig::protocol`]
//! belongs to podroute, and nothing else does. The default, [`DEFAULT_ROUTE_PROTOCOL`] = 157,
//! is in no RTPROT_* constant of the kernel's `rtnetlink.h`, not in iproute2's `rt_protos`, and
//! not used by BIRD (12), Felix (80), kube-router (17), keepalived (18), babel (42), OpenR (99)
//! or FRR (186–192). `ip route show proto 157` lists podroute's routes.
//!
//! How it works:
//! - [`Dataplane::open`] opens the route monitor first, then dumps links and our routes once
//!   into memory. Nothing is flushed: routes a previous run left are adopted, and the first
//!   reconcile changes only what differs.
//! - [`Dataplane::reconcile`] diffs the desired routes against that mirror and sends the adds,
//!   replaces and deletes in batches of many messages per `sendto`, checking every ACK
//!   ([`socket`]). Adds never overwrite a foreign route (`NLM_F_EXCL`); deletes name our
//!   protocol, so the kernel cannot delete anyone else's route.
//! - A route that fails (gateway unreachable, device missing, key taken by a foreign route)
//!   is recorded in [`DataplaneStatus::failures`], logged, counted and retried with backoff;
//!   it never holds up the other routes.
//! - [`Dataplane::run`] is the long-running task: new plans, monitor events (a hand-deleted or
//!   hand-changed route of ours is put back at once; foreign routes are ignored), retries, and
//!   a full re-read after lost notifications or link removals (the kernel drops IPv4 routes of
//!   a vanished device without notifying).
//!
//! The netlink calls are blocking but never wait on the network: the kernel answers rtnetlink
//! requests synchronously inside `sendmsg`/`recvmsg`.

pub mod ipip_user;
pub mod kernel;
pub mod monitor;
pub mod socket;
pub mod tunnel;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkMessage;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::plan::{DesiredRoute, RouteScope};
use kernel::{Change, KernelRoute, RouteKey};
use monitor::{Event, LinkInfo, MonitorSocket};
use socket::{NetlinkError, RequestSocket};

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
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            protocol: DEFAULT_ROUTE_PROTOCOL,
            batch_size: 2048,
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            resync_interval: Duration::from_secs(300),
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
    #[error(
        "a route for this destination that podroute does not own is in the way (EEXIST); \
         remove it, or leave the prefix to its owner"
    )]
    Occupied,
    #[error("kernel refused the route: {0}")]
    Kernel(NetlinkError),
}

/// A route that could not be programmed, kept until it succeeds or is no longer wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFailure {
    pub route: DesiredRoute,
    pub error: RouteError,
    pub attempts: u32,
    pub first_failed: SystemTime,
    next_retry: Instant,
}

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
    /// `true` once a plan was received and reconciled.
    pub programmed: bool,
    pub desired_routes: usize,
    /// Routes with our protocol in the main table, as last seen.
    pub installed_routes: usize,
    pub failures: Vec<RouteFailure>,
    pub counters: DataplaneCounters,
    /// The last plan [`Dataplane::run`] applied (compare with `Arc::ptr_eq` to learn when a
    /// plan reached the kernel).
    pub applied_plan: Option<Arc<Vec<DesiredRoute>>>,
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
        Some(name)
    }

    fn remove(&mut self, index: u32) {
        if let Some(name) = self.by_index.remove(&index) {
            self.by_name.remove(&name);
        }
    }
}

/// The dataplane state: the request socket, the monitor, the mirror of our kernel routes and
/// the desired routes.
pub struct Dataplane {
    config: DataplaneConfig,
    sock: RequestSocket,
    monitor: Option<MonitorSocket>,
    links: Links,
    /// Our routes in the kernel (protocol = ours, main table), kept current by the monitor.
    installed: BTreeMap<RouteKey, KernelRoute>,
    /// `None` until the first plan: nothing is deleted before the agent has a full picture.
    desired: Option<BTreeMap<IpNet, DesiredRoute>>,
    /// Destinations whose route of ours was overwritten by a foreign one (`ip route replace`):
    /// restored with a replace, unlike a foreign route that was there first.
    overwritten: BTreeSet<IpNet>,
    failures: BTreeMap<IpNet, RouteFailure>,
    counters: DataplaneCounters,
    last_resync: Instant,
    observer: Option<ReconcileObserver>,
    /// The plan [`run`](Self::run) applied last.
    applied_plan: Option<Arc<Vec<DesiredRoute>>>,
}

type ReconcileObserver = Box<dyn Fn(Duration, ApplyReport) + Send>;

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
        let mut dp = Self {
            config,
            sock,
            monitor: Some(monitor),
            links: Links::default(),
            installed: BTreeMap::new(),
            desired: None,
            overwritten: BTreeSet::new(),
            failures: BTreeMap::new(),
            counters: DataplaneCounters::default(),
            last_resync: Instant::now(),
            observer: None,
            applied_plan: None,
        };
        dp.read_kernel()?;
        dp.counters.resyncs = 0;
        tracing::info!(
            protocol = dp.config.protocol,
            adopted = dp.installed.len(),
            batch = dp.sock.batch(),
            "dataplane opened; existing routes adopted"
        );
        Ok(dp)
    }

    /// The route protocol in use.
    pub fn protocol(&self) -> u8 {
        self.config.protocol
    }

    /// Re-reads links and our routes from the kernel.
    pub fn read_kernel(&mut self) -> Result<(), DataplaneError> {
        let links = self
            .sock
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(DataplaneError::Dump)?;
        self.links = Links::default();
        for msg in &links {
            if let RouteNetlinkMessage::NewLink(m) = msg {
                self.links.update(&LinkInfo::from_message(m));
            }
        }
        let routes = self
            .sock
            .dump(kernel::dump_request(self.config.protocol))
            .map_err(DataplaneError::Dump)?;
        self.installed = routes
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => KernelRoute::from_message(r),
                _ => None,
            })
            .filter(|r| r.protocol == self.config.protocol)
            .map(|r| (r.key, r))
            .collect();
        self.counters.resyncs += 1;
        self.last_resync = Instant::now();
        Ok(())
    }

    /// Sets the routes the kernel must have. The next [`reconcile`](Self::reconcile) applies
    /// them. Routes are keyed by prefix; a later duplicate wins.
    pub fn set_desired<'a>(&mut self, routes: impl IntoIterator<Item = &'a DesiredRoute>) {
        let desired: BTreeMap<IpNet, DesiredRoute> = routes
            .into_iter()
            .map(|r| (r.prefix.trunc(), r.clone()))
            .collect();
        self.failures.retain(|dst, _| desired.contains_key(dst));
        self.desired = Some(desired);
    }

    /// Lowers the desired routes to kernel routes; routes whose device is missing are held
    /// back (and recorded as failures).
    fn wanted(
        &mut self,
        only: Option<&BTreeSet<IpNet>>,
    ) -> (BTreeMap<IpNet, KernelRoute>, BTreeSet<IpNet>, usize) {
        let mut wanted = BTreeMap::new();
        let mut held = BTreeSet::new();
        let mut missing = 0;
        let Some(desired) = &self.desired else {
            return (wanted, held, 0);
        };
        let iter: Box<dyn Iterator<Item = (&IpNet, &DesiredRoute)>> = match only {
            Some(set) => Box::new(set.iter().filter_map(|d| desired.get_key_value(d))),
            None => Box::new(desired.iter()),
        };
        let mut missing_devices = Vec::new();
        for (dst, route) in iter {
            let oif = match &route.device {
                Some(dev) => match self.links.by_name.get(dev) {
                    Some(i) => Some(*i),
                    None => {
                        held.insert(*dst);
                        missing_devices.push((route.clone(), dev.clone()));
                        continue;
                    }
                },
                None => None,
            };
            wanted.insert(
                *dst,
                KernelRoute::wanted(
                    *dst,
                    self.config.protocol,
                    route.is_blackhole(),
                    route.scope == RouteScope::Link,
                    route.gateway,
                    oif,
                    route.onlink,
                ),
            );
        }
        let mut by_device: BTreeMap<String, usize> = BTreeMap::new();
        for (route, dev) in missing_devices {
            // A missing device is only news the first time; retries stay quiet.
            if self.record_failure(route, RouteError::MissingDevice(dev.clone())) {
                *by_device.entry(dev).or_default() += 1;
            }
            missing += 1;
        }
        for (dev, count) in by_device {
            tracing::warn!(device = %dev, routes = count, "routes wait for a missing device");
        }
        (wanted, held, missing)
    }

    /// Records a failure; returns true when it is new or changed.
    fn record_failure(&mut self, route: DesiredRoute, error: RouteError) -> bool {
        let now = Instant::now();
        let dst = route.prefix.trunc();
        match self.failures.get_mut(&dst) {
            Some(f) => {
                f.attempts += 1;
                f.next_retry = now + backoff(&self.config, f.attempts);
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
                        next_retry: now + self.config.retry_min,
                    },
                );
                true
            }
        }
    }

    /// Makes the kernel match the desired routes (all of them). Does nothing before the first
    /// [`set_desired`](Self::set_desired).
    pub fn reconcile(&mut self) -> ApplyReport {
        self.reconcile_some(None)
    }

    fn reconcile_some(&mut self, only: Option<&BTreeSet<IpNet>>) -> ApplyReport {
        if self.desired.is_none() {
            return ApplyReport::default();
        }
        self.counters.reconciles += 1;
        let started = Instant::now();
        let (wanted, held, missing) = self.wanted(only);
        let mut changes = kernel::diff(&wanted, &self.installed, only, &held);
        for change in &mut changes {
            if let Change::Add(r) = change
                && self.overwritten.contains(&r.key.dst)
            {
                *change = Change::Replace(r.clone());
            }
        }
        let mut report = self.apply(changes);
        report.failed += missing;
        self.counters.route_errors += missing as u64;
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
        report
    }

    /// Calls `observer` after every reconcile with its duration and result (metrics).
    pub fn on_reconcile(&mut self, observer: impl Fn(Duration, ApplyReport) + Send + 'static) {
        self.observer = Some(Box::new(observer));
    }

    fn apply(&mut self, changes: Vec<Change>) -> ApplyReport {
        let mut report = ApplyReport::default();
        if changes.is_empty() {
            return report;
        }
        let sends_before = self.sock.sends;
        let results = self.sock.execute(changes.iter().map(Change::request));
        self.counters.netlink_sends += self.sock.sends - sends_before;
        self.counters.netlink_requests += changes.len() as u64;
        let mut lost_acks = false;
        for (change, result) in changes.into_iter().zip(results) {
            let dst = change.route().key.dst;
            match (change, result) {
                (Change::Add(r), Ok(())) => {
                    report.added += 1;
                    self.counters.routes_added += 1;
                    self.succeeded(r);
                }
                (Change::Replace(r), Ok(())) => {
                    report.replaced += 1;
                    self.counters.routes_replaced += 1;
                    self.succeeded(r);
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
                        self.installed.remove(&r.key);
                    }
                    Err(e) => {
                        lost_acks |= e == NetlinkError::AckLost;
                        report.failed += 1;
                        self.counters.route_errors += 1;
                        tracing::warn!(route = ?r.key, error = %e, "could not delete route");
                    }
                },
                (Change::Add(_) | Change::Replace(_), Err(e)) => {
                    lost_acks |= e == NetlinkError::AckLost;
                    report.failed += 1;
                    self.counters.route_errors += 1;
                    let error = match e.errno() {
                        Some(libc::EEXIST) => RouteError::Occupied,
                        _ => RouteError::Kernel(e),
                    };
                    if let Some(route) = self.desired.as_ref().and_then(|d| d.get(&dst)).cloned()
                        && self.record_failure(route.clone(), error.clone())
                    {
                        tracing::warn!(route = %route, error = %error, "route not programmed; will retry");
                    }
                }
            }
        }
        if lost_acks {
            // The kernel state of the unanswered requests is unknown: read it again.
            if let Err(e) = self.read_kernel() {
                tracing::error!(error = %e, "re-reading the routing table failed");
            }
        }
        report
    }

    fn succeeded(&mut self, route: KernelRoute) {
        let dst = route.key.dst;
        if let Some(f) = self.failures.remove(&dst) {
            tracing::info!(route = %f.route, attempts = f.attempts, "route programmed after failures");
        }
        self.overwritten.remove(&dst);
        self.installed.insert(route.key, route);
    }

    /// Applies monitor events to the mirror; returns the destinations to repair and whether
    /// a full re-read is needed.
    fn absorb(&mut self, events: Vec<Event>) -> (BTreeSet<IpNet>, bool) {
        let mut dirty = BTreeSet::new();
        let mut resync = false;
        let ours = self.config.protocol;
        for event in events {
            match event {
                Event::RouteAdded { route, replaced } => {
                    let dst = route.key.dst;
                    if route.protocol == ours {
                        self.installed.insert(route.key, route);
                        dirty.insert(dst);
                    } else if replaced && self.installed.remove(&route.key).is_some() {
                        // Our route was overwritten by hand: drift.
                        self.overwritten.insert(dst);
                        dirty.insert(dst);
                    }
                }
                Event::RouteRemoved(route) => {
                    let dst = route.key.dst;
                    if route.protocol == ours {
                        self.installed.remove(&route.key);
                        dirty.insert(dst);
                    } else if self.failures.contains_key(&dst) {
                        // A foreign route in our way went away: try now.
                        dirty.insert(dst);
                    }
                }
                Event::LinkChanged(info) => {
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
                    self.links.remove(info.index);
                    resync = true;
                }
                Event::Overrun => resync = true,
            }
        }
        // Only destinations we care about.
        let desired = self.desired.as_ref();
        dirty.retain(|d| {
            desired.is_some_and(|m| m.contains_key(d))
                || self
                    .installed
                    .range(
                        RouteKey {
                            dst: *d,
                            priority: 0,
                            tos: 0,
                        }..,
                    )
                    .next()
                    .is_some_and(|(k, _)| k.dst == *d)
        });
        (dirty, resync)
    }

    /// Reconciles the failed routes whose retry time has come.
    pub fn retry_due(&mut self) -> ApplyReport {
        let now = Instant::now();
        let due: BTreeSet<IpNet> = self
            .failures
            .iter()
            .filter(|(_, f)| f.next_retry <= now)
            .map(|(d, _)| *d)
            .collect();
        if due.is_empty() {
            return ApplyReport::default();
        }
        self.reconcile_some(Some(&due))
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failures.values().map(|f| f.next_retry).min()
    }

    /// Our installed routes whose device is `device`, as (destination, gateway): after a
    /// restart, what the previous run routed through `tunl0`.
    pub fn routes_via(&self, device: &str) -> Vec<(IpNet, std::net::IpAddr)> {
        let Some(index) = self.links.by_name.get(device).copied() else {
            return Vec::new();
        };
        self.installed
            .values()
            .filter(|r| r.oif == Some(index))
            .filter_map(|r| r.gateway.map(|g| (r.key.dst, g)))
            .collect()
    }

    /// A snapshot for status readers.
    pub fn status(&self) -> DataplaneStatus {
        DataplaneStatus {
            programmed: self.desired.is_some(),
            desired_routes: self.desired.as_ref().map_or(0, BTreeMap::len),
            installed_routes: self.installed.len(),
            failures: self.failures.values().cloned().collect(),
            counters: self.counters,
            applied_plan: self.applied_plan.clone(),
        }
    }

    /// The long-running dataplane task. Applies each new plan from `plans` (`None` = the
    /// agent has no complete picture yet: adopt, change nothing), repairs drift reported by
    /// the monitor, retries failed routes, and publishes [`DataplaneStatus`] to `status`.
    /// Returns when the plan sender is dropped. Needs a tokio runtime with IO enabled.
    pub async fn run(
        mut self,
        mut plans: watch::Receiver<Option<Arc<Vec<DesiredRoute>>>>,
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
        let mut plan_changed = true;
        loop {
            if plan_changed {
                plan_changed = false;
                let plan = plans.borrow_and_update().clone();
                if let Some(plan) = plan {
                    self.set_desired(plan.iter());
                    self.reconcile();
                    self.applied_plan = Some(plan);
                }
                status.send_replace(self.status());
            }
            let retry_at = self.next_retry();
            let resync_at = self.last_resync + self.config.resync_interval;
            let wake_at = retry_at.map_or(resync_at, |r| r.min(resync_at));
            tokio::select! {
                changed = plans.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    plan_changed = true;
                }
                ready = monitor.readable_mut() => {
                    let mut guard = ready.map_err(|e| DataplaneError::Monitor(e.to_string()))?;
                    let drained = guard.get_inner_mut().drain(&mut events);
                    guard.clear_ready();
                    drained.map_err(|e| DataplaneError::Monitor(e.to_string()))?;
                    let (dirty, resync) = self.absorb(std::mem::take(&mut events));
                    let report = if resync {
                        tracing::info!("re-reading the routing table");
                        self.read_kernel()?;
                        self.reconcile()
                    } else if !dirty.is_empty() {
                        self.reconcile_some(Some(&dirty))
                    } else {
                        ApplyReport::default()
                    };
                    let repaired = report.added + report.replaced + report.deleted;
                    if repaired > 0 {
                        self.counters.drift_repairs += repaired as u64;
                        tracing::warn!(repaired, "routing table drifted from the plan; repaired");
                    }
                    if report.changes() > 0 {
                        status.send_replace(self.status());
                    }
                }
                _ = tokio::time::sleep_until(wake_at.into()) => {
                    if Instant::now() >= resync_at {
                        self.read_kernel()?;
                        self.reconcile();
                    } else {
                        self.retry_due();
                    }
                    status.send_replace(self.status());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
