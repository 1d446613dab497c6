//! The IPIP device `tunl0`: its lifecycle, address and MTU, its forwarding table and, on the
//! userspace path, its forwarder process.
//!
//! [`Ipip`] is fed from two sides by the dataplane task:
//! - the tunnel plan ([`IpipTunnel`], from [`crate::plan::tunnels::tunnel_plan`]): while one
//!   is planned the device is kept as specified ([`Ipip::apply`], again every 250 ms by
//!   [`Ipip::maintain`]: a failed set-up is retried every [`RETRY_INTERVAL`], a forwarder that
//!   died is started again). `--ipip-dataplane auto` is resolved on the first set-up (the
//!   kernel's `ipip` module, else the userspace tunnel). A plan without IPIP (the last pool
//!   moved to VXLAN or to no encapsulation) marks the device for removal
//!   ([`Ipip::pending_removal`]); the dataplane removes it ([`Ipip::remove`]) only once no
//!   route of ours needs it any more — no desired route names `tunl0`, no route of ours in
//!   the kernel goes through it, no destination is between its old and new route — the rule
//!   the VXLAN devices follow. Removing means: the userspace forwarder that the agent owns is
//!   asked to stop and the TUN device is deleted; the kernel `ipip` device (which cannot be
//!   deleted while the module is loaded) and a device whose forwarder another container runs
//!   (`--ipip-forwarder external`) lose the tunnel address, as Felix leaves `tunl0` when IPIP
//!   is off. Removing the address earlier would be a window: the kernel drops every route
//!   through a device whose last IPv4 address goes;
//! - the routes: every IPIP route ([`RouteKind::BlockIpip`], [`RouteKind::BorrowedIpip`])
//!   upserted into or removed from the desired routes updates the remote-block table at once
//!   ([`Ipip::route_upserted`], [`Ipip::route_removed`]); [`Ipip::publish`] hands the changed
//!   table to the userspace forwarder before the dataplane installs the routes that use it,
//!   and the dataplane waits until the forwarder confirms it ([`Ipip::delivered`]), so a
//!   packet of a new route finds its node. Until the first full plan the table is the
//!   previous run's routes through `tunl0` found in the kernel ([`Ipip::adopt`]), so a
//!   restarted agent does not empty the forwarder's table.
//!
//! The kernel side (device, mode probe, forwarder process) is behind [`IpipKernel`], so the
//! decisions are unit-tested without root; [`NetlinkIpip`] is the real one.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use tokio::sync::watch;

use crate::dataplane::ipip_user::process::{ForwarderOwner, RemoteForwarder, Request, request};
use crate::dataplane::ipip_user::{
    ForwarderConfig, IpipCounters, IpipDataplane, TunnelTable, UserspaceIpip,
};
use crate::dataplane::tunnel::{KernelIpip, TunnelDevice, TunnelError, TunnelSpec};
use crate::plan::RouteKind;
use crate::plan::tunnels::IpipTunnel;

/// Longest wait for the forwarder to confirm a new table before routes that need it go in.
pub const DELIVERY_WAIT: Duration = Duration::from_secs(2);

/// A failed set-up is tried again after this long.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// How `tunl0` is made (the agent's `--ipip-dataplane`, `--ipip-forwarder` and `--log`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpipConfig {
    /// Kernel device, userspace tunnel, or whichever the kernel supports.
    pub dataplane: IpipDataplane,
    /// Who starts the userspace forwarder process.
    pub forwarder: ForwarderOwner,
    /// The forwarder process's `--log` filter.
    pub log: String,
    /// The binary to start as `PROGRAM ipip-forwarder`; `None`: this process's own.
    pub program: Option<PathBuf>,
}

/// What the status reports about `tunl0`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpipStatus {
    /// `--ipip-dataplane` as resolved (`None` until the first set-up).
    pub mode: Option<IpipDataplane>,
    /// The device as last set up (`None`: not yet, or it must be set up again).
    pub ready: Option<TunnelSpec>,
    /// The last set-up error, until a set-up succeeds.
    pub error: Option<String>,
    /// The userspace forwarder's process id, while connected.
    pub forwarder_pid: Option<u32>,
}

/// The kernel side of [`Ipip`].
pub trait IpipKernel {
    /// A running forwarder (the connection to its process).
    type Forwarder: Send;

    /// Resolves `auto` (probing the kernel) into `kernel` or `userspace`.
    fn resolve(
        &mut self,
        mode: IpipDataplane,
    ) -> impl Future<Output = Result<IpipDataplane, TunnelError>> + Send;

    /// Makes the device `spec` names as `mode` (resolved) makes it: exists, up, MTU, address.
    fn ensure_device(
        &mut self,
        mode: IpipDataplane,
        spec: &TunnelSpec,
    ) -> impl Future<Output = Result<(), TunnelError>> + Send;

    /// Finds the running forwarder of the device, or starts one, and hands it every table
    /// published on `table`.
    fn start_forwarder(
        &mut self,
        local: Ipv4Addr,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
    ) -> impl Future<Output = Result<(Self::Forwarder, ForwarderInfo), TunnelError>> + Send;

    /// Why the forwarder stopped; `None` while it runs.
    fn forwarder_exit(forwarder: &Self::Forwarder) -> Option<String>;

    /// Does the forwarder use a table equal to `table` (it confirmed it)? `true` when it
    /// cannot tell.
    fn holds_table(_forwarder: &Self::Forwarder, _table: &TunnelTable) -> bool {
        true
    }

    /// Takes the device `spec` names out of service (see the module doc); the connection
    /// to its forwarder is already closed.
    fn remove_device(
        &mut self,
        mode: IpipDataplane,
        spec: &TunnelSpec,
    ) -> impl Future<Output = Result<(), TunnelError>> + Send;
}

/// What [`IpipKernel::start_forwarder`] tells about the forwarder it found or started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderInfo {
    pub pid: u32,
    /// Found running (an agent restart), not started.
    pub adopted: bool,
    /// Its podroute version (empty: older than the version check).
    pub version: String,
}

/// The real kernel: rtnetlink for the device, `podroute ipip-forwarder` for the forwarder.
#[derive(Debug, Clone, Default)]
pub struct NetlinkIpip {
    config: IpipConfig,
}

impl NetlinkIpip {
    pub fn new(config: IpipConfig) -> Self {
        Self { config }
    }
}

impl IpipKernel for NetlinkIpip {
    type Forwarder = RemoteForwarder;

    async fn resolve(&mut self, mode: IpipDataplane) -> Result<IpipDataplane, TunnelError> {
        mode.resolve().await
    }

    async fn ensure_device(
        &mut self,
        mode: IpipDataplane,
        spec: &TunnelSpec,
    ) -> Result<(), TunnelError> {
        match mode {
            IpipDataplane::Userspace => UserspaceIpip::connect()?.ensure(spec).await?,
            _ => KernelIpip::connect()?.ensure(spec).await?,
        };
        Ok(())
    }

    async fn start_forwarder(
        &mut self,
        local: Ipv4Addr,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
    ) -> Result<(RemoteForwarder, ForwarderInfo), TunnelError> {
        let program = match &self.config.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| TunnelError::io("finding the podroute binary", e))?,
        };
        let forwarder = RemoteForwarder::adopt_or_start(
            self.config.forwarder,
            &program,
            &ForwarderConfig::new(local),
            &self.config.log,
            table,
            counters,
        )
        .await?;
        let info = ForwarderInfo {
            pid: forwarder.pid,
            adopted: forwarder.adopted,
            version: forwarder.version.clone(),
        };
        Ok((forwarder, info))
    }

    fn forwarder_exit(forwarder: &RemoteForwarder) -> Option<String> {
        forwarder.exit().map(|exit| format!("{exit:?}"))
    }

    fn holds_table(forwarder: &RemoteForwarder, table: &TunnelTable) -> bool {
        forwarder.holds(table)
    }

    async fn remove_device(
        &mut self,
        mode: IpipDataplane,
        spec: &TunnelSpec,
    ) -> Result<(), TunnelError> {
        if mode == IpipDataplane::Userspace && self.config.forwarder == ForwarderOwner::Agent {
            // Ours: the forwarder stops (it holds the device's queue), then the device goes.
            let name = spec.name.clone();
            let asked = tokio::task::spawn_blocking(move || {
                request(&name, &Request::Stop, Duration::from_secs(2))
            })
            .await;
            if let Ok(Err(e)) = asked {
                tracing::debug!(error = %e, "no IPIP forwarder answered the stop request");
            }
            let device = UserspaceIpip::connect()?;
            let mut tries = 0;
            loop {
                match device.remove(&spec.name).await {
                    Ok(_) => return Ok(()),
                    // The forwarder is still letting go of the device.
                    Err(_) if tries < 40 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(address) = spec.address {
            KernelIpip::connect()?
                .remove_address(&spec.name, address)
                .await?;
        }
        Ok(())
    }
}

/// The remote blocks behind `tunl0`, kept route by route.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RemoteBlocks {
    /// Remote prefix → node address; bounded by the desired IPIP routes (or, before the
    /// first plan, the adopted ones).
    remotes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Changed since last published.
    dirty: bool,
}

/// `tunl0`: see the module doc.
pub struct Ipip<K: IpipKernel = NetlinkIpip> {
    kernel: K,
    /// `--ipip-dataplane` as asked.
    asked: IpipDataplane,
    /// The device last planned; `None` until a plan wants one. Kept when a later plan has
    /// none (its sources and pools stay in the forwarder's table).
    wanted: Option<IpipTunnel>,
    /// The last plan wants the device: it is set up, repaired and retried.
    active: bool,
    /// The device left the plan and waits for the dataplane to [`remove`](Self::remove) it.
    removal: bool,
    status: IpipStatus,
    last_attempt: Option<Instant>,
    forwarder: Option<K::Forwarder>,
    table: RemoteBlocks,
    /// The remotes were adopted from the kernel and not yet replaced by a full plan.
    adopted: bool,
    table_tx: watch::Sender<Arc<TunnelTable>>,
    counters: Arc<IpipCounters>,
}

impl Ipip<NetlinkIpip> {
    pub fn new(config: IpipConfig) -> Self {
        let asked = config.dataplane;
        Self::with_kernel(NetlinkIpip::new(config), asked)
    }
}

impl<K: IpipKernel> Ipip<K> {
    /// The module with `kernel` behind it (tests use a fake one).
    pub fn with_kernel(kernel: K, asked: IpipDataplane) -> Self {
        let (table_tx, _) = watch::channel(Arc::new(TunnelTable::default()));
        Self {
            kernel,
            asked,
            wanted: None,
            active: false,
            removal: false,
            status: IpipStatus::default(),
            last_attempt: None,
            forwarder: None,
            table: RemoteBlocks::default(),
            adopted: false,
            table_tx,
            counters: Arc::new(IpipCounters::new()),
        }
    }

    /// The forwarder's counters (copied from its process once a second).
    pub fn counters(&self) -> Arc<IpipCounters> {
        self.counters.clone()
    }

    pub fn status(&self) -> &IpipStatus {
        &self.status
    }

    /// The table the forwarder has (or gets when it starts).
    pub fn table(&self) -> watch::Receiver<Arc<TunnelTable>> {
        self.table_tx.subscribe()
    }

    /// Seeds the remote blocks with the routes through `tunl0` a previous run left in the
    /// kernel (destination, gateway); the first full plan replaces them
    /// ([`clear_routes`](Self::clear_routes)).
    pub fn adopt(&mut self, routes: impl IntoIterator<Item = (IpNet, IpAddr)>) {
        for (dst, gw) in routes {
            if let (IpNet::V4(dst), IpAddr::V4(gw)) = (dst, gw) {
                self.table.remotes.insert(dst.trunc(), gw);
                self.table.dirty = true;
                self.adopted = true;
            }
        }
    }

    /// The first full plan comes: the adopted remotes go (its routes are upserted next).
    pub fn clear_routes(&mut self) {
        if self.adopted {
            self.adopted = false;
            self.table.remotes.clear();
            self.table.dirty = true;
        }
    }

    /// The remote blocks as kept (published or not).
    #[cfg(test)]
    pub(crate) fn remotes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.table.remotes.iter().map(|(p, gw)| (*p, *gw)).collect()
    }

    /// The desired route for `dst` is now of `kind` via `gateway`: an IPIP route enters the
    /// table, any other route takes `dst` out of it.
    pub fn route_upserted(&mut self, dst: IpNet, kind: RouteKind, gateway: Option<IpAddr>) {
        match (kind, dst, gateway) {
            (
                RouteKind::BlockIpip | RouteKind::BorrowedIpip,
                IpNet::V4(dst),
                Some(IpAddr::V4(gw)),
            ) => {
                if self.table.remotes.insert(dst.trunc(), gw) != Some(gw) {
                    self.table.dirty = true;
                }
            }
            _ => self.route_removed(dst),
        }
    }

    /// No route is desired for `dst` any more.
    pub fn route_removed(&mut self, dst: IpNet) {
        if let IpNet::V4(dst) = dst
            && self.table.remotes.remove(&dst.trunc()).is_some()
        {
            self.table.dirty = true;
        }
    }

    /// Hands the changed table to the forwarder (before the routes that use it are
    /// installed). Without a forwarder (kernel mode, or not started yet) nothing is built:
    /// the forwarder gets the table when it starts.
    pub fn publish(&mut self) {
        if self.table.dirty && self.forwarder.is_some() {
            self.send_table();
        }
    }

    /// Waits until the forwarder uses the table last published, so that the routes the
    /// dataplane installs next find their node there (the table goes to the forwarder process
    /// over its control connection, from a task of this runtime). At most
    /// [`DELIVERY_WAIT`]: a forwarder that has not answered by then is left to
    /// [`maintain`](Self::maintain), and the routes go in anyway.
    pub async fn delivered(&self) {
        let Some(forwarder) = &self.forwarder else {
            return;
        };
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            let current = self.table_tx.borrow().clone();
            if K::holds_table(forwarder, &current) || K::forwarder_exit(forwarder).is_some() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    wait = ?DELIVERY_WAIT,
                    "the userspace IPIP forwarder has not confirmed its new table; routes go in"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn send_table(&mut self) {
        let (peers, pools) = match &self.wanted {
            Some(w) => (w.peers.clone(), w.pools.clone()),
            None => (Vec::new(), Vec::new()),
        };
        let table = TunnelTable::new(
            self.table.remotes.iter().map(|(p, gw)| (*p, *gw)),
            peers,
            pools,
        );
        self.table.dirty = false;
        if **self.table_tx.borrow() != table {
            self.table_tx.send_replace(Arc::new(table));
        }
    }

    /// A new tunnel plan: `Some` keeps the device as planned (set up now when it changed),
    /// `None` marks a device set up in this run for removal, which the dataplane does once
    /// no route needs it ([`pending_removal`](Self::pending_removal)).
    pub async fn apply(&mut self, planned: Option<IpipTunnel>) {
        self.active = planned.is_some();
        let Some(planned) = planned else {
            if self.wanted.is_some() && self.status.mode.is_some() && !self.removal {
                tracing::info!(
                    "no pool uses IPIP any more: tunl0 goes once no route of ours needs it"
                );
                self.removal = true;
            }
            return;
        };
        self.removal = false;
        if self
            .wanted
            .as_ref()
            .is_none_or(|w| w.peers != planned.peers || w.pools != planned.pools)
        {
            // Accepted sources and pools are part of the forwarder's table.
            self.table.dirty = true;
        }
        self.wanted = Some(planned);
        self.ensure().await;
        self.publish();
    }

    /// The device left the plan and is still there: the dataplane calls
    /// [`remove`](Self::remove) once no route of ours needs it.
    pub fn pending_removal(&self) -> bool {
        self.removal
            && (self.status.error.is_none()
                || self
                    .last_attempt
                    .is_none_or(|t| t.elapsed() >= RETRY_INTERVAL))
    }

    /// Removes the device that left the plan (see the module doc). Call it only when no
    /// route of ours goes through it; a failure is retried after [`RETRY_INTERVAL`].
    pub async fn remove(&mut self) {
        if !self.removal {
            return;
        }
        let (Some(wanted), Some(mode)) = (self.wanted.as_ref(), self.status.mode) else {
            self.removal = false;
            return;
        };
        let spec = TunnelSpec {
            name: wanted.name.clone(),
            nic: wanted.nic.clone(),
            address: wanted.address,
        };
        // The control connection closes; the forwarder is told to stop by `remove_device`.
        self.forwarder = None;
        self.status.forwarder_pid = None;
        self.status.ready = None;
        self.last_attempt = Some(Instant::now());
        match self.kernel.remove_device(mode, &spec).await {
            Ok(()) => {
                tracing::info!(device = spec.name, ?mode, "IPIP tunnel device removed");
                self.removal = false;
                self.wanted = None;
                self.status.error = None;
                self.table.dirty = true;
                self.send_table();
            }
            Err(e) => {
                let text = e.to_string();
                tracing::warn!(error = %text, "cannot remove the IPIP tunnel device; retrying in 30 s");
                self.status.error = Some(text);
            }
        }
    }

    /// Every 250 ms (the dataplane's tick): repairs a forwarder that died, retries a failed set-up.
    pub async fn maintain(&mut self) {
        self.ensure().await;
        self.publish();
    }

    /// Sets the planned device up when it is not as planned (retried every
    /// [`RETRY_INTERVAL`] while it fails).
    async fn ensure(&mut self) {
        let Some(wanted) = self.wanted.as_ref().filter(|_| self.active) else {
            return;
        };
        let spec = TunnelSpec {
            name: wanted.name.clone(),
            nic: wanted.nic.clone(),
            address: wanted.address,
        };
        let local = wanted.local;
        if let Some(exit) = self.forwarder.as_ref().and_then(K::forwarder_exit) {
            tracing::warn!(
                exit,
                "userspace IPIP forwarder stopped; setting tunl0 up again"
            );
            self.forwarder = None;
            self.status.forwarder_pid = None;
            self.status.ready = None;
        }
        if self.status.ready.as_ref() == Some(&spec) {
            return;
        }
        if self.status.error.is_some()
            && self
                .last_attempt
                .is_some_and(|t| t.elapsed() < RETRY_INTERVAL)
        {
            return;
        }
        self.last_attempt = Some(Instant::now());
        match self.set_up(&spec, local).await {
            Ok(()) => {
                self.status.ready = Some(spec);
                self.status.error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if self.status.error.as_deref() != Some(&text) {
                    match e {
                        TunnelError::IpipUnsupported { .. } => tracing::warn!("{text}"),
                        _ => tracing::warn!(
                            error = %text,
                            "cannot set up the IPIP tunnel device; retrying in 30 s"
                        ),
                    }
                }
                self.status.error = Some(text);
            }
        }
    }

    async fn set_up(
        &mut self,
        spec: &TunnelSpec,
        local: Option<Ipv4Addr>,
    ) -> Result<(), TunnelError> {
        let mode = match self.status.mode {
            Some(mode) => mode,
            None => {
                let mode = self.kernel.resolve(self.asked).await?;
                self.status.mode = Some(mode);
                mode
            }
        };
        self.kernel.ensure_device(mode, spec).await?;
        if mode != IpipDataplane::Userspace || self.forwarder.is_some() {
            return Ok(());
        }
        let Some(local) = local else {
            return Err(TunnelError::Io {
                what: "the userspace IPIP forwarder".into(),
                error: "this node has no IPv4 address (IPv6-only); IPIP pools need one".into(),
            });
        };
        // The forwarder starts with the current table (a restarted agent's adopted routes
        // until its first plan).
        self.send_table();
        let (forwarder, info) = self
            .kernel
            .start_forwarder(local, self.table_tx.subscribe(), self.counters.clone())
            .await?;
        tracing::info!(
            device = spec.name,
            %local,
            pid = info.pid,
            adopted = info.adopted,
            version = info.version,
            "userspace IPIP forwarder process running"
        );
        if info.adopted && info.version != env!("CARGO_PKG_VERSION") {
            // Adopted, never replaced: replacing it would stop tunnelled traffic.
            tracing::warn!(
                pid = info.pid,
                forwarder_version = if info.version.is_empty() {
                    "unknown"
                } else {
                    &info.version
                },
                agent_version = env!("CARGO_PKG_VERSION"),
                "the adopted userspace IPIP forwarder runs another podroute version; it keeps \
                 forwarding, but to upgrade it kill it (the agent starts its own binary's \
                 forwarder, about 0.4 s without tunnelled traffic)"
            );
        }
        self.forwarder = Some(forwarder);
        self.status.forwarder_pid = Some(info.pid);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the fake kernel was asked to do, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Resolve(IpipDataplane),
        Device(IpipDataplane, Option<Ipv4Addr>),
        Forwarder(Ipv4Addr),
        Remove(IpipDataplane, Option<Ipv4Addr>),
    }

    /// A kernel that records calls; the forwarder "dies" when its flag is set.
    #[derive(Clone)]
    struct Fake {
        calls: Arc<Mutex<Vec<Call>>>,
        resolves_to: IpipDataplane,
        device_error: Arc<Mutex<Option<TunnelError>>>,
        /// The table channel the last forwarder got.
        table: Arc<Mutex<Option<watch::Receiver<Arc<TunnelTable>>>>>,
    }

    struct FakeForwarder(Arc<Mutex<bool>>);

    impl Fake {
        fn new(resolves_to: IpipDataplane) -> Self {
            Self {
                calls: Arc::default(),
                resolves_to,
                device_error: Arc::default(),
                table: Arc::default(),
            }
        }

        fn calls(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn forwarder_table(&self) -> Arc<TunnelTable> {
            self.table
                .lock()
                .unwrap()
                .as_ref()
                .expect("a forwarder was started")
                .borrow()
                .clone()
        }
    }

    impl IpipKernel for Fake {
        type Forwarder = FakeForwarder;

        async fn resolve(&mut self, mode: IpipDataplane) -> Result<IpipDataplane, TunnelError> {
            self.calls.lock().unwrap().push(Call::Resolve(mode));
            Ok(self.resolves_to)
        }

        async fn ensure_device(
            &mut self,
            mode: IpipDataplane,
            spec: &TunnelSpec,
        ) -> Result<(), TunnelError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Device(mode, spec.address));
            match self.device_error.lock().unwrap().clone() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        async fn start_forwarder(
            &mut self,
            local: Ipv4Addr,
            table: watch::Receiver<Arc<TunnelTable>>,
            _counters: Arc<IpipCounters>,
        ) -> Result<(FakeForwarder, ForwarderInfo), TunnelError> {
            self.calls.lock().unwrap().push(Call::Forwarder(local));
            *self.table.lock().unwrap() = Some(table);
            Ok((
                FakeForwarder(Arc::default()),
                ForwarderInfo {
                    pid: 42,
                    adopted: false,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                },
            ))
        }

        fn forwarder_exit(forwarder: &FakeForwarder) -> Option<String> {
            (*forwarder.0.lock().unwrap()).then(|| "died".to_string())
        }

        async fn remove_device(
            &mut self,
            mode: IpipDataplane,
            spec: &TunnelSpec,
        ) -> Result<(), TunnelError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Remove(mode, spec.address));
            match self.device_error.lock().unwrap().clone() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn tunnel(address: &str) -> IpipTunnel {
        IpipTunnel {
            name: "tunl0".into(),
            nic: "ens33".into(),
            address: Some(a(address)),
            local: Some(a("192.168.92.128")),
            peers: vec![a("192.168.92.129"), a("192.168.93.130")],
            pools: vec!["172.16.0.0/16".parse().unwrap()],
        }
    }

    fn remotes(table: &TunnelTable) -> Vec<(String, Ipv4Addr)> {
        table
            .remotes()
            .iter()
            .map(|(p, gw)| (p.to_string(), *gw))
            .collect()
    }

    #[tokio::test]
    async fn userspace_device_and_forwarder_are_set_up_once_per_spec() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Auto);
        ipip.apply(None).await;
        assert_eq!(fake.calls(), vec![], "no IPIP pool: nothing is made");
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Resolve(IpipDataplane::Auto),
                Call::Device(IpipDataplane::Userspace, Some(a("172.16.241.64"))),
                Call::Forwarder(a("192.168.92.128")),
            ]
        );
        assert_eq!(ipip.status().forwarder_pid, Some(42));
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        ipip.maintain().await;
        assert_eq!(fake.calls(), vec![], "as planned: nothing to do");
        ipip.apply(Some(tunnel("172.16.241.70"))).await;
        assert_eq!(
            fake.calls(),
            vec![Call::Device(
                IpipDataplane::Userspace,
                Some(a("172.16.241.70"))
            )],
            "a new address: the device again, the same forwarder, no second probe"
        );
        // A plan without IPIP leaves the device alone until the dataplane removes it, and a
        // forwarder that dies then is not started again.
        ipip.apply(None).await;
        ipip.maintain().await;
        assert_eq!(fake.calls(), vec![]);
        assert!(ipip.pending_removal());
        if let Some(f) = &ipip.forwarder {
            *f.0.lock().unwrap() = true;
        }
        ipip.maintain().await;
        assert_eq!(fake.calls(), vec![]);
        // IPIP again: the device as planned, and a new forwarder for the dead one.
        ipip.apply(Some(tunnel("172.16.241.70"))).await;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Device(IpipDataplane::Userspace, Some(a("172.16.241.70"))),
                Call::Forwarder(a("192.168.92.128")),
            ]
        );
    }

    #[tokio::test]
    async fn a_dead_forwarder_is_started_again_with_the_current_table() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Userspace);
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        ipip.route_upserted(
            n("172.16.196.128/26"),
            RouteKind::BlockIpip,
            Some("192.168.93.130".parse().unwrap()),
        );
        ipip.publish();
        fake.calls();
        let FakeForwarder(dead) = ipip
            .forwarder
            .as_ref()
            .map(|f| FakeForwarder(f.0.clone()))
            .unwrap();
        *dead.lock().unwrap() = true;
        ipip.maintain().await;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Device(IpipDataplane::Userspace, Some(a("172.16.241.64"))),
                Call::Forwarder(a("192.168.92.128")),
            ]
        );
        assert_eq!(
            remotes(&fake.forwarder_table()),
            vec![("172.16.196.128/26".to_string(), a("192.168.93.130"))]
        );
    }

    #[tokio::test]
    async fn kernel_mode_starts_no_forwarder_and_failures_wait_for_the_retry_interval() {
        let fake = Fake::new(IpipDataplane::Kernel);
        *fake.device_error.lock().unwrap() = Some(TunnelError::IpipUnsupported {
            name: "tunl0".into(),
        });
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Auto);
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Resolve(IpipDataplane::Auto),
                Call::Device(IpipDataplane::Kernel, Some(a("172.16.241.64"))),
            ]
        );
        assert!(
            ipip.status()
                .error
                .as_deref()
                .is_some_and(|e| e.contains("modprobe ipip")),
            "{:?}",
            ipip.status()
        );
        assert_eq!(ipip.status().ready, None);
        ipip.maintain().await;
        assert_eq!(
            fake.calls(),
            vec![],
            "retried only after {RETRY_INTERVAL:?}"
        );
        // The retry interval passed: tried again, and now it works.
        *fake.device_error.lock().unwrap() = None;
        ipip.last_attempt = Instant::now().checked_sub(RETRY_INTERVAL);
        ipip.maintain().await;
        assert_eq!(
            fake.calls(),
            vec![Call::Device(
                IpipDataplane::Kernel,
                Some(a("172.16.241.64"))
            )]
        );
        assert_eq!(ipip.status().error, None);
        assert!(ipip.forwarder.is_none(), "the kernel forwards");
    }

    #[tokio::test]
    async fn an_ipv6_only_node_gets_a_clear_error_for_the_userspace_tunnel() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Userspace);
        let mut planned = tunnel("172.16.241.64");
        planned.local = None;
        ipip.apply(Some(planned)).await;
        assert!(
            ipip.status()
                .error
                .as_deref()
                .is_some_and(|e| e.contains("IPv6-only")),
            "{:?}",
            ipip.status()
        );
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Forwarder(_))));
    }

    #[tokio::test]
    async fn the_table_follows_upserts_and_removals_and_is_published_before_use() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Userspace);
        let gw = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Routes before the forwarder: kept, handed over when it starts.
        ipip.route_upserted(
            n("172.16.196.128/26"),
            RouteKind::BlockIpip,
            gw("192.168.93.130"),
        );
        ipip.route_upserted(
            n("172.16.10.0/26"),
            RouteKind::BlockDirect,
            gw("192.168.92.129"),
        );
        ipip.route_upserted(
            n("172.16.241.70/32"),
            RouteKind::BorrowedIpip,
            gw("192.168.93.131"),
        );
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        let first = fake.forwarder_table();
        assert_eq!(
            remotes(&first),
            vec![
                ("172.16.196.128/26".to_string(), a("192.168.93.130")),
                ("172.16.241.70/32".to_string(), a("192.168.93.131")),
            ],
            "IPIP routes only"
        );
        assert!(first.is_known_node(a("192.168.92.129")), "the plan's peers");
        assert!(first.in_pool(a("172.16.1.1")), "the plan's pools");
        // A route moves to the NIC (CrossSubnet), one is removed, one changes node.
        ipip.route_upserted(
            n("172.16.196.128/26"),
            RouteKind::BlockDirect,
            gw("192.168.92.129"),
        );
        ipip.route_removed(n("172.16.241.70/32"));
        ipip.route_upserted(
            n("172.16.9.0/26"),
            RouteKind::BlockIpip,
            gw("192.168.93.140"),
        );
        assert_eq!(
            remotes(&fake.forwarder_table()),
            remotes(&first),
            "nothing reaches the forwarder before publish"
        );
        ipip.publish();
        assert_eq!(
            remotes(&fake.forwarder_table()),
            vec![("172.16.9.0/26".to_string(), a("192.168.93.140"))]
        );
        ipip.route_upserted(
            n("172.16.9.0/26"),
            RouteKind::BlockIpip,
            gw("192.168.93.141"),
        );
        ipip.publish();
        assert_eq!(
            fake.forwarder_table().lookup(a("172.16.9.5")),
            Some(a("192.168.93.141"))
        );
        // IPv6 and gatewayless routes never enter the table.
        ipip.route_upserted(n("fd00:10::/122"), RouteKind::BlockIpip, gw("fd00::2"));
        ipip.route_upserted(n("172.16.8.0/26"), RouteKind::BlockIpip, None);
        ipip.publish();
        assert_eq!(remotes(&fake.forwarder_table()).len(), 1);
    }

    #[tokio::test]
    async fn adopted_routes_serve_until_the_first_full_plan() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Userspace);
        ipip.adopt([
            (n("172.16.196.128/26"), "192.168.93.130".parse().unwrap()),
            (n("fd00:10::/122"), "fd00::2".parse().unwrap()),
        ]);
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        assert_eq!(
            remotes(&fake.forwarder_table()),
            vec![("172.16.196.128/26".to_string(), a("192.168.93.130"))],
            "the previous run's routes keep the forwarder going"
        );
        ipip.clear_routes();
        ipip.route_upserted(
            n("172.16.200.0/26"),
            RouteKind::BlockIpip,
            Some("192.168.93.150".parse().unwrap()),
        );
        ipip.publish();
        assert_eq!(
            remotes(&fake.forwarder_table()),
            vec![("172.16.200.0/26".to_string(), a("192.168.93.150"))]
        );
        // Later full plans do not clear: their removals come route by route.
        ipip.clear_routes();
        ipip.publish();
        assert_eq!(remotes(&fake.forwarder_table()).len(), 1);
    }

    #[tokio::test]
    async fn a_device_that_leaves_the_plan_goes_only_when_removed() {
        let fake = Fake::new(IpipDataplane::Userspace);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Userspace);
        // Never planned in this run: nothing to remove.
        ipip.apply(None).await;
        assert!(!ipip.pending_removal());
        ipip.remove().await;
        assert_eq!(fake.calls(), vec![]);
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        fake.calls();
        // The pool moves to VXLAN: marked, but nothing is touched by the plan or the tick.
        ipip.apply(None).await;
        ipip.maintain().await;
        ipip.publish();
        assert!(ipip.pending_removal());
        assert_eq!(fake.calls(), vec![], "removal waits for the dataplane");
        // IPIP comes back before the routes moved: the removal is called off.
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        assert!(!ipip.pending_removal());
        ipip.remove().await;
        assert_eq!(fake.calls(), vec![], "as planned: nothing to do");
        assert_eq!(ipip.status().forwarder_pid, Some(42));
        // Gone for good: removed when the dataplane says no route needs it.
        ipip.apply(None).await;
        ipip.remove().await;
        assert_eq!(
            fake.calls(),
            vec![Call::Remove(
                IpipDataplane::Userspace,
                Some(a("172.16.241.64"))
            )]
        );
        assert!(!ipip.pending_removal());
        assert_eq!(ipip.status().forwarder_pid, None);
        assert_eq!(ipip.status().ready, None);
        ipip.remove().await;
        ipip.maintain().await;
        assert_eq!(fake.calls(), vec![], "removed once");
        // IPIP again: a new device and forwarder.
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Device(IpipDataplane::Userspace, Some(a("172.16.241.64"))),
                Call::Forwarder(a("192.168.92.128")),
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_removal_is_retried_after_the_interval() {
        let fake = Fake::new(IpipDataplane::Kernel);
        let mut ipip = Ipip::with_kernel(fake.clone(), IpipDataplane::Kernel);
        ipip.apply(Some(tunnel("172.16.241.64"))).await;
        ipip.apply(None).await;
        fake.calls();
        *fake.device_error.lock().unwrap() = Some(TunnelError::Io {
            what: "deleting".into(),
            error: "EBUSY".into(),
        });
        ipip.remove().await;
        assert_eq!(
            fake.calls(),
            vec![Call::Remove(
                IpipDataplane::Kernel,
                Some(a("172.16.241.64"))
            )]
        );
        assert!(ipip.status().error.is_some());
        assert!(!ipip.pending_removal(), "not before {RETRY_INTERVAL:?}");
        ipip.last_attempt = Instant::now().checked_sub(RETRY_INTERVAL);
        assert!(ipip.pending_removal());
        *fake.device_error.lock().unwrap() = None;
        ipip.remove().await;
        assert_eq!(
            fake.calls(),
            vec![Call::Remove(
                IpipDataplane::Kernel,
                Some(a("172.16.241.64"))
            )]
        );
        assert_eq!(ipip.status().error, None);
        assert!(!ipip.pending_removal());
    }
}
