//! IPIP without the kernel's `ipip` module: a TUN device named `tunl0` and a userspace
//! forwarder that speaks standard IPv4-in-IPv4 (RFC 2003, IP protocol 4) on the wire,
//! interoperable with a kernel `tunl0` on the other side.
//!
//! The routing table is the same as in kernel mode: `BLOCK via NODE dev tunl0 onlink`. The
//! kernel hands packets routed that way to the TUN device; the gateway of the route is lost
//! on the way, so the forwarder finds the node again by longest prefix match of the inner
//! destination over a [`TunnelTable`] built from the same plan ([`TunnelTable::from_plan`]).
//!
//! # Pieces
//! - [`IpipDataplane`] (`auto|kernel|userspace`) and [`kernel_ipip_supported`]: the choice.
//! - [`UserspaceIpip`] ([`TunnelDevice`]): makes `tunl0` a persistent TUN device
//!   (`IFF_TUN | IFF_NO_PI`) with MTU = NIC MTU − 20, the node's tunnel address `/32`, up.
//!   Persistent, so routes through it survive a restart of the agent.
//! - [`spawn`]: attaches to `tunl0` and opens the two raw sockets in the calling thread's
//!   network namespace, then forwards in both directions until stopped:
//!   - out: read a packet from `tunl0`, look up the node, write the outer header in front
//!     (source = the node's address, TTL 64, TOS and DF copied from the inner header; see
//!     [`packet`]) and send it on an `IPPROTO_RAW` socket (`IP_HDRINCL`, send only), batched
//!     with `sendmmsg`. Building the header ourselves rather than letting a protocol-4
//!     socket add it gives per-packet DF and TOS without a `setsockopt` per packet.
//!   - in: receive on a raw socket of protocol 4 bound to the node's address (batched with
//!     `recvmmsg`; each packet arrives with its outer header), accept only known node
//!     sources, check the inner header and pools, write the inner packet to `tunl0`.
//!   - offloads ([`ForwarderConfig::offload`], on by default; see [`offload`]): `tunl0`
//!     offers TSO and checksum offload, so the kernel hands over TCP packets of up to
//!     64 KiB, cut into MTU-sized segments here; received segments of one TCP flow are
//!     coalesced into one GSO write; packets merged by the underlay NIC's GRO (bigger than
//!     the MTU) are handed on as GSO packets. 1.8–1.9x the TCP throughput of packet by
//!     packet in `benches/ipip_throughput.rs`.
//!   - Drops are counted by reason in [`IpipCounters`] and logged at most every 10 s per
//!     reason; nothing is sent back for a dropped packet (no ICMP).
//! - Driver: two dedicated threads blocking in `poll(2)` ([`ForwarderDriver::Threads`], the
//!   default: packet work stays off the tokio runtime, and it moved more TCP in every run of
//!   `benches/ipip_throughput.rs`, e.g. 1.8 vs 1.6 Gbit/s with offloads), or two tokio
//!   tasks on `AsyncFd` ([`ForwarderDriver::Tokio`]). Round trips were alike (60–100 µs
//!   median pod to pod, noisy on the shared bench machine). Neither blocks a tokio worker.
//!
//! - [`process`]: the forwarder as its own process (`podroute ipip-forwarder`), started
//!   detached by the agent and adopted by the agent's next run; tables go to it over an
//!   abstract unix socket. The agent's dataplane uses this ([`super::tunnels::ipip`] decides
//!   when to make `tunl0`, start or adopt the forwarder and publish its table), so tunnelled
//!   traffic survives the agent.
//!
//! # Wiring (in-process, as the tests and `podroute ipip-forwarder` use it)
//! 1. At start, in the node's namespace on the runtime: `--ipip-dataplane` parsed as
//!    [`IpipDataplane`]; `mode.resolve().await?` turns `auto` into `kernel` or `userspace`.
//! 2. Userspace: `UserspaceIpip::connect()?.ensure(&spec).await?` wherever the kernel mode
//!    calls `KernelIpip::ensure` (same [`TunnelSpec`]); then once
//!    `spawn(ForwarderConfig::new(node_ipv4), table_rx, counters)` with a
//!    `watch::channel(Arc::new(TunnelTable::default()))` and an `Arc<IpipCounters>`.
//! 3. For every new plan: `table_tx.send_replace(Arc::new(TunnelTable::from_plan(&plan.routes,
//!    other_node_ipv4s, pool_cidrs)))`, best before the routes reach the kernel, so that
//!    packets of a new route find their node.
//! 4. Metrics: `counters.snapshot()`; `IpipForwarder::exited().await` reports a failure
//!    (e.g. `tunl0` deleted; the other direction stops too): ensure the device again and
//!    spawn again. At exit, `forwarder.shutdown().await` (or just drop it).
//!
//! # Limits
//! - While the agent is down the forwarder process forwards with its last table: a block
//!   that moved meanwhile is tunnelled to its old node until the agent is back. While the
//!   forwarder process is down (until the agent starts it again) `tunl0` has no reader.
//! - Packets larger than the path MTU of the underlay are dropped (`too_big`), not answered
//!   with ICMP "fragmentation needed"; `tunl0`'s MTU (NIC MTU − 20) avoids them on a uniform
//!   underlay, as with the kernel device.
//! - A kernel with `ipip` loaded already has a kernel `tunl0` in every namespace; then
//!   [`UserspaceIpip::ensure`] refuses with [`TunnelError::WrongKind`]: use kernel mode.
//! - Inner sources are checked against the pools only, not against the block of the sending
//!   node.
//! - Every underlay packet costs a raw-socket send and receive (the kernel cannot segment
//!   IPIP for a raw socket): on the two-core bench machine the tunnel moves 10–14% of the
//!   direct path's TCP throughput, and each forwarding hop adds a thread wake-up of latency.
//! - A TCP packet larger than the MTU from a known node (GRO on its way) is trusted to have
//!   been checksum-verified by that GRO: it is handed on with a partial checksum.

mod forward;
pub mod offload;
pub mod packet;
pub mod process;
mod sys;
mod table;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::watch;

use super::tunnel::{
    IPIP_OVERHEAD, KernelIpip, TunnelDevice, TunnelError, TunnelSpec, TunnelState,
};
pub use forward::{IpipCounters, IpipCountersSnapshot, MAX_BATCH};
pub use packet::DropReason;
pub use table::TunnelTable;

/// Which IPIP implementation the agent uses (`--ipip-dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpipDataplane {
    /// Kernel `ipip` when [`kernel_ipip_supported`], else userspace.
    #[default]
    Auto,
    /// The kernel's `ipip` device ([`KernelIpip`]).
    Kernel,
    /// TUN device + userspace forwarder ([`UserspaceIpip`], [`spawn`]).
    Userspace,
}

impl IpipDataplane {
    /// Resolves `Auto` by probing the kernel ([`kernel_ipip_supported`]); returns `Kernel`
    /// or `Userspace`. Logs the choice once. Runs in the calling thread's namespace and needs
    /// a tokio runtime (rtnetlink).
    pub async fn resolve(self) -> Result<IpipDataplane, TunnelError> {
        match self {
            IpipDataplane::Auto => {
                let chosen = if kernel_ipip_supported().await? {
                    IpipDataplane::Kernel
                } else {
                    IpipDataplane::Userspace
                };
                tracing::info!(
                    ipip_dataplane = %chosen,
                    "--ipip-dataplane auto: {}",
                    if chosen == IpipDataplane::Kernel {
                        "the kernel supports ipip devices"
                    } else {
                        "the kernel has no ipip support (EOPNOTSUPP); using the userspace tunnel"
                    }
                );
                Ok(chosen)
            }
            other => Ok(other),
        }
    }
}

impl fmt::Display for IpipDataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpipDataplane::Auto => "auto",
            IpipDataplane::Kernel => "kernel",
            IpipDataplane::Userspace => "userspace",
        })
    }
}

impl FromStr for IpipDataplane {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(IpipDataplane::Auto),
            "kernel" => Ok(IpipDataplane::Kernel),
            "userspace" => Ok(IpipDataplane::Userspace),
            _ => Err(format!(
                "unknown IPIP dataplane {s:?}: expected auto, kernel or userspace"
            )),
        }
    }
}

/// Can the kernel create `ipip` devices here? See [`KernelIpip::probe_ipip`]. Runs in the
/// calling thread's network namespace; needs a tokio runtime and `CAP_NET_ADMIN` (an error
/// means the answer is unknown, e.g. no permission).
pub async fn kernel_ipip_supported() -> Result<bool, TunnelError> {
    KernelIpip::connect()?.probe_ipip().await
}

/// The userspace `tunl0`: a persistent TUN device configured like the kernel device.
#[derive(Debug, Clone)]
pub struct UserspaceIpip {
    netlink: KernelIpip,
}

impl UserspaceIpip {
    /// Opens an rtnetlink connection in the calling thread's network namespace (see
    /// [`KernelIpip::connect`]); [`ensure`](TunnelDevice::ensure) creates the TUN device in
    /// that thread's namespace too.
    pub fn connect() -> Result<Self, TunnelError> {
        Ok(Self {
            netlink: KernelIpip::connect()?,
        })
    }

    /// Removes the TUN device `name` (when it exists and is a TUN device), e.g. when
    /// switching to kernel mode. Shut the forwarder down first (its queue holds the device;
    /// attaching fails with `EBUSY` meanwhile).
    pub async fn remove(&self, name: &str) -> Result<bool, TunnelError> {
        match self.netlink.link_details(name).await? {
            Some(l) if l.kind.as_deref() == Some("tun") => {
                let tun = sys::Tun::attach(name, false)
                    .map_err(|e| TunnelError::io(format!("attaching to TUN device {name}"), e))?;
                tun.set_persist(false)
                    .map_err(|e| TunnelError::io(format!("making {name} not persistent"), e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Turns IPv6 off on the device (best effort): without it the kernel would send neighbour
/// discovery into the tunnel, which only carries IPv4.
fn disable_ipv6(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(%path, error = %e, "cannot disable IPv6 on the userspace tunnel");
    }
}

impl TunnelDevice for UserspaceIpip {
    async fn ensure(&self, spec: &TunnelSpec) -> Result<TunnelState, TunnelError> {
        let (_, nic_mtu) = self
            .netlink
            .link(&spec.nic)
            .await?
            .ok_or_else(|| TunnelError::NicNotFound(spec.nic.clone()))?;
        let mtu = nic_mtu.saturating_sub(IPIP_OVERHEAD);
        let mut created = false;
        let index = match self.netlink.link_details(&spec.name).await? {
            Some(l) if l.kind.as_deref() == Some("tun") => l.index,
            Some(l) => {
                return Err(TunnelError::WrongKind {
                    name: spec.name.clone(),
                    kind: l.kind.unwrap_or_else(|| "unknown".into()),
                    wanted: "tun (userspace IPIP)".into(),
                });
            }
            None => {
                let tun = sys::Tun::attach(&spec.name, false).map_err(|e| {
                    TunnelError::io(format!("creating TUN device {}", spec.name), e)
                })?;
                tun.set_persist(true)
                    .map_err(|e| TunnelError::io(format!("making {} persistent", spec.name), e))?;
                drop(tun);
                created = true;
                self.netlink
                    .link(&spec.name)
                    .await?
                    .map(|(i, _)| i)
                    .ok_or_else(|| TunnelError::Io {
                        what: format!("creating TUN device {}", spec.name),
                        error: "device missing after creation".into(),
                    })?
            }
        };
        disable_ipv6(&spec.name);
        self.netlink
            .configure(&spec.name, index, mtu, spec.address)
            .await?;
        tracing::info!(device = %spec.name, index, mtu, created, address = ?spec.address,
            "userspace tunnel device ready");
        Ok(TunnelState {
            index,
            mtu,
            created,
        })
    }
}

/// How the forwarder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwarderDriver {
    /// Two dedicated OS threads (`podroute-ipip-out`, `podroute-ipip-in`) blocking in `poll`.
    #[default]
    Threads,
    /// Two tasks on the current tokio runtime, waiting with `AsyncFd`.
    Tokio,
}

/// Settings of [`spawn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// The TUN device, `tunl0` (made by [`UserspaceIpip::ensure`]; attached if missing
    /// it is created non-persistent).
    pub device: String,
    /// The node's address: source of outer headers; only packets to it are received.
    pub local: Ipv4Addr,
    pub driver: ForwarderDriver,
    /// Packets per batch, 1..=[`MAX_BATCH`].
    pub batch: usize,
    /// Receive and send buffer of the raw sockets, bytes.
    pub socket_buffer: usize,
    /// Exchange up to 64 KiB TCP packets with the kernel (virtio-net header, TSO and
    /// checksum offload on `tunl0`; see [`offload`]); falls back to packet by packet when
    /// the kernel refuses.
    pub offload: bool,
}

impl ForwarderConfig {
    /// Defaults for `local`: `tunl0`, threads, batch 32, 4 MiB buffers, offloads on.
    pub fn new(local: Ipv4Addr) -> Self {
        Self {
            device: crate::plan::TUNNEL_DEVICE.to_string(),
            local,
            driver: ForwarderDriver::Threads,
            batch: 32,
            socket_buffer: 4 << 20,
            offload: true,
        }
    }
}

/// How the forwarder ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwarderExit {
    /// [`IpipForwarder::stop`] was called.
    Stopped,
    /// A direction failed (e.g. `tunl0` was deleted); the other one was stopped too.
    Failed(TunnelError),
}

/// The running forwarder. Dropping it stops it (without waiting).
#[derive(Debug)]
pub struct IpipForwarder {
    stop: Arc<forward::StopSignal>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The runtime of the tasks ([`ForwarderDriver::Tokio`]).
    runtime: Option<tokio::runtime::Handle>,
    exit: watch::Receiver<Option<ForwarderExit>>,
}

/// Records the first way the forwarder ended.
fn record_exit(tx: &watch::Sender<Option<ForwarderExit>>, outcome: ForwarderExit) {
    tx.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(outcome);
            true
        } else {
            false
        }
    });
}

impl IpipForwarder {
    /// Asks both directions to stop; returns at once.
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Stops and waits until both directions have ended and closed the TUN queue and the
    /// sockets (so that [`spawn`] can attach again).
    pub async fn shutdown(mut self) {
        self.stop();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let threads: Vec<_> = self.threads.drain(..).collect();
        if !threads.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
        }
    }

    /// [`shutdown`](Self::shutdown) for callers outside any tokio runtime (with
    /// [`ForwarderDriver::Tokio`] it blocks on the forwarder's runtime; it panics when
    /// called from within a runtime).
    pub fn shutdown_blocking(mut self) {
        self.stop();
        let tasks: Vec<_> = self.tasks.drain(..).collect();
        if let Some(rt) = &self.runtime
            && !tasks.is_empty()
        {
            rt.block_on(async {
                for t in tasks {
                    let _ = t.await;
                }
            });
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// `None` while both directions run.
    pub fn exit(&self) -> Option<ForwarderExit> {
        self.exit.borrow().clone()
    }

    /// Waits until the forwarder ends (after [`stop`](Self::stop) or a failure).
    pub async fn exited(&mut self) -> ForwarderExit {
        match self.exit.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(ForwarderExit::Stopped),
            Err(_) => ForwarderExit::Stopped,
        }
    }
}

impl Drop for IpipForwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts forwarding between the TUN device `config.device` and the wire.
///
/// Call it on a thread in the node's network namespace: the TUN queue and the raw sockets
/// are opened there (what runs them afterwards may be anywhere). With
/// [`ForwarderDriver::Tokio`] it must be called within a tokio runtime. `table` is read
/// once per batch: publish a new [`TunnelTable`] whenever the plan changes; after the sender
/// is dropped the last table stays in use. Needs `CAP_NET_ADMIN` and `CAP_NET_RAW`.
pub fn spawn(
    config: ForwarderConfig,
    table: watch::Receiver<Arc<TunnelTable>>,
    counters: Arc<IpipCounters>,
) -> Result<IpipForwarder, TunnelError> {
    let name = config.device.as_str();
    let attach = |vnet| {
        sys::Tun::attach(name, vnet)
            .map_err(|e| TunnelError::io(format!("attaching to TUN device {name}"), e))
    };
    let (tun, vnet) = if config.offload {
        match attach(true) {
            Ok(t) => (t, true),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offloads unavailable; forwarding packet by packet");
                (attach(false)?, false)
            }
        }
    } else {
        (attach(false)?, false)
    };
    let tun = Arc::new(tun);
    let rx = sys::RawSocket::ipip_receiver(config.local, config.socket_buffer).map_err(|e| {
        TunnelError::io(
            format!("opening the IP protocol 4 socket on {}", config.local),
            e,
        )
    })?;
    let tx = sys::RawSocket::sender(config.local, config.socket_buffer).map_err(|e| {
        TunnelError::io(
            format!("opening the raw send socket on {}", config.local),
            e,
        )
    })?;
    let encap = forward::Encap::new(
        tun.clone(),
        tx,
        config.local,
        table.clone(),
        counters.clone(),
        config.batch,
        vnet,
    );
    let decap = forward::Decap::new(
        rx,
        tun,
        config.device.clone(),
        table,
        counters,
        config.batch,
        vnet,
    );
    let stop = Arc::new(
        forward::StopSignal::new().map_err(|e| TunnelError::io("creating an eventfd", e))?,
    );
    let (exit_tx, exit) = watch::channel(None);
    let exit_tx = Arc::new(exit_tx);
    let report = {
        let stop = stop.clone();
        let exit_tx = exit_tx.clone();
        move |dir: &'static str, r: std::io::Result<()>| {
            let outcome = match r {
                Ok(()) => ForwarderExit::Stopped,
                Err(e) => {
                    tracing::error!(direction = dir, error = %e, "userspace IPIP forwarder failed");
                    ForwarderExit::Failed(TunnelError::io(format!("IPIP forwarding ({dir})"), e))
                }
            };
            stop.stop();
            record_exit(&exit_tx, outcome);
        }
    };
    let mut forwarder = IpipForwarder {
        stop: stop.clone(),
        threads: Vec::new(),
        tasks: Vec::new(),
        runtime: None,
        exit,
    };
    match config.driver {
        ForwarderDriver::Threads => {
            for (dir, pump) in [
                ("out", Box::new(encap) as Box<dyn forward::Pump + Send>),
                ("in", Box::new(decap)),
            ] {
                let stop = stop.clone();
                let report = report.clone();
                let t = std::thread::Builder::new()
                    .name(format!("podroute-ipip-{dir}"))
                    .spawn(move || report(dir, forward::run_thread(pump, &stop)))
                    .map_err(|e| TunnelError::io("starting a forwarding thread", e))?;
                forwarder.threads.push(t);
            }
        }
        ForwarderDriver::Tokio => {
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| TunnelError::Io {
                what: "starting the forwarding tasks".into(),
                error: e.to_string(),
            })?;
            let (r, s) = (report.clone(), stop.clone());
            forwarder.tasks.push(runtime.spawn(async move {
                r("out", forward::run_task(encap, true, &s).await);
            }));
            let s = stop.clone();
            forwarder.tasks.push(runtime.spawn(async move {
                report("in", forward::run_task(decap, false, &s).await);
            }));
            forwarder.runtime = Some(runtime);
        }
    }
    tracing::info!(device = %config.device, local = %config.local, driver = ?config.driver,
        offload = vnet, "userspace IPIP forwarder started");
    Ok(forwarder)
}
