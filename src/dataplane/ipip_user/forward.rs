//! The two forwarding directions and the drivers that run them.
//!
//! - [`Encap`]: reads inner packets from the TUN device (one `read` each, up to a batch until
//!   the queue is empty), finds the node by longest prefix match, writes the outer header in
//!   front of the packet in place and sends the batch with one `sendmmsg` on the
//!   `IPPROTO_RAW` socket.
//! - [`Decap`]: receives a batch with one `recvmmsg` on the protocol-4 socket, checks each
//!   packet ([`super::packet::decapsulate`]) and writes the inner packet to the TUN device.
//!
//! Each direction is a [`Pump`] that never blocks: it reports when its input is empty or its
//! output full, and the driver waits: [`run_thread`] with `poll(2)` on a dedicated thread,
//! [`run_task`] with tokio's `AsyncFd`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::packet::{self, DropReason, OUTER_HEADER_LEN};
use super::sys::{RawSocket, Ready, Tun, Waker, wait};
use super::table::TunnelTable;

/// Packets handled per batch at most (bounded by the 64 of [`RawSocket`]'s batch calls).
pub const MAX_BATCH: usize = 64;
/// Buffer per packet: the largest IPv4 packet plus the outer header.
const SLOT: usize = packet::MAX_PACKET + OUTER_HEADER_LEN;

/// Counters of the userspace tunnel since start; shared with the metrics exporter.
///
/// `*_bytes` count inner packet bytes (what `tunl0` sees), `*_packets` packets sent to the
/// wire (encapsulated) or written to `tunl0` (decapsulated); drops are counted per
/// [`DropReason`].
#[derive(Debug, Default)]
pub struct IpipCounters {
    encap_packets: AtomicU64,
    encap_bytes: AtomicU64,
    decap_packets: AtomicU64,
    decap_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// A copy of [`IpipCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpipCountersSnapshot {
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    /// Indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl IpipCountersSnapshot {
    /// Packets dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Every drop reason with its count, in [`DropReason::ALL`] order.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[r.index()]))
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

impl IpipCounters {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> IpipCountersSnapshot {
        let mut drops = [0; DropReason::ALL.len()];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Ordering::Relaxed);
        }
        IpipCountersSnapshot {
            encap_packets: self.encap_packets.load(Ordering::Relaxed),
            encap_bytes: self.encap_bytes.load(Ordering::Relaxed),
            decap_packets: self.decap_packets.load(Ordering::Relaxed),
            decap_bytes: self.decap_bytes.load(Ordering::Relaxed),
            drops,
        }
    }

    fn add(&self, t: &mut Tally, encap: bool) {
        let (p, b) = if encap {
            (&self.encap_packets, &self.encap_bytes)
        } else {
            (&self.decap_packets, &self.decap_bytes)
        };
        if t.packets > 0 {
            p.fetch_add(t.packets, Ordering::Relaxed);
            b.fetch_add(t.bytes, Ordering::Relaxed);
        }
        for (a, d) in self.drops.iter().zip(&t.drops) {
            if *d > 0 {
                a.fetch_add(*d, Ordering::Relaxed);
            }
        }
        *t = Tally::default();
    }
}

/// Counts of one batch, added to the shared atomics once per batch.
#[derive(Default)]
struct Tally {
    packets: u64,
    bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Tally {
    fn drop(&mut self, r: DropReason) {
        self.drops[r.index()] += 1;
    }
}

/// Warns about drops at most once per interval per reason, with the last example.
struct DropLog {
    last: [Option<Instant>; DropReason::ALL.len()],
}

impl DropLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self {
            last: [None; DropReason::ALL.len()],
        }
    }

    fn note(&mut self, reason: DropReason, detail: impl FnOnce() -> String) {
        let now = Instant::now();
        let slot = &mut self.last[reason.index()];
        if slot.is_none_or(|t| now.duration_since(t) >= Self::INTERVAL) {
            *slot = Some(now);
            tracing::warn!(
                reason = reason.label(),
                example = %detail(),
                "userspace IPIP dropped a packet (further drops of this reason are only counted \
                 for the next 10 s)"
            );
        }
    }
}

/// The current table, refreshed from the watch channel once per batch.
struct TableView {
    rx: watch::Receiver<Arc<TunnelTable>>,
    current: Arc<TunnelTable>,
}

impl TableView {
    fn new(mut rx: watch::Receiver<Arc<TunnelTable>>) -> Self {
        let current = rx.borrow_and_update().clone();
        Self { rx, current }
    }

    /// Takes a new table if one was published (keeps the last one after the sender is gone).
    fn refresh(&mut self) {
        if self.rx.has_changed().unwrap_or(false) {
            self.current = self.rx.borrow_and_update().clone();
        }
    }
}

/// One forwarding direction, driven by [`run_thread`] or [`run_task`].
pub trait Pump {
    /// Reads one batch of input and handles it. `Ok(false)`: no input was waiting.
    fn receive(&mut self) -> io::Result<bool>;
    /// Sends what [`receive`](Self::receive) queued. `Ok(false)`: the output is full; call
    /// again when it is writable.
    fn send(&mut self) -> io::Result<bool>;
    /// The descriptor to wait on for input.
    fn input_fd(&self) -> RawFd;
    /// The descriptor to wait on when [`send`](Self::send) is blocked.
    fn output_fd(&self) -> RawFd;
}

impl<P: Pump + ?Sized> Pump for Box<P> {
    fn receive(&mut self) -> io::Result<bool> {
        (**self).receive()
    }

    fn send(&mut self) -> io::Result<bool> {
        (**self).send()
    }

    fn input_fd(&self) -> RawFd {
        (**self).input_fd()
    }

    fn output_fd(&self) -> RawFd {
        (**self).output_fd()
    }
}

/// TUN → wire.
pub struct Encap {
    tun: Arc<Tun>,
    tx: RawSocket,
    local: Ipv4Addr,
    table: TableView,
    counters: Arc<IpipCounters>,
    batch: usize,
    slots: Vec<Vec<u8>>,
    /// (slot, outer packet length, node) of the packets to send, in order.
    queued: Vec<(usize, usize, Ipv4Addr)>,
    /// First entry of `queued` not yet sent.
    next: usize,
    tally: Tally,
    log: DropLog,
}

impl Encap {
    pub(crate) fn new(
        tun: Arc<Tun>,
        tx: RawSocket,
        local: Ipv4Addr,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
        batch: usize,
    ) -> Self {
        let batch = batch.clamp(1, MAX_BATCH);
        Self {
            tun,
            tx,
            local,
            table: TableView::new(table),
            counters,
            batch,
            slots: (0..batch).map(|_| vec![0u8; SLOT]).collect(),
            queued: Vec::with_capacity(batch),
            next: 0,
            tally: Tally::default(),
            log: DropLog::new(),
        }
    }
}

impl Pump for Encap {
    fn receive(&mut self) -> io::Result<bool> {
        self.table.refresh();
        self.queued.clear();
        self.next = 0;
        let table = &*self.table.current;
        let mut read = 0;
        for slot in 0..self.batch {
            let buf = &mut self.slots[slot];
            let n = match self.tun.read(&mut buf[OUTER_HEADER_LEN..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.add(&mut self.tally, true);
                    return Err(e);
                }
            };
            read += 1;
            let packet = &mut buf[..OUTER_HEADER_LEN + n];
            let result = packet::inner_destination(&packet[OUTER_HEADER_LEN..])
                .and_then(|dst| {
                    table
                        .lookup(dst)
                        .ok_or(DropReason::NoRoute)
                        .map(|gw| (dst, gw))
                })
                .and_then(|(dst, gw)| {
                    packet::write_outer_header(packet, self.local, gw).map(|()| (dst, gw))
                });
            match result {
                Ok((_, gw)) => self.queued.push((slot, packet.len(), gw)),
                Err(reason) => {
                    self.tally.drop(reason);
                    self.log.note(reason, || match reason {
                        DropReason::NoRoute => format!(
                            "no remote block for {}",
                            packet::inner_destination(&packet[OUTER_HEADER_LEN..])
                                .map_or_else(|_| "?".into(), |d| d.to_string())
                        ),
                        _ => format!("{n}-byte packet from tunl0"),
                    });
                }
            }
        }
        if read == 0 {
            return Ok(false);
        }
        if self.queued.is_empty() {
            self.counters.add(&mut self.tally, true);
        }
        Ok(true)
    }

    fn send(&mut self) -> io::Result<bool> {
        while self.next < self.queued.len() {
            let pending = &self.queued[self.next..];
            let mut packets: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            let mut dsts = [Ipv4Addr::UNSPECIFIED; MAX_BATCH];
            for (i, (slot, len, gw)) in pending.iter().enumerate() {
                packets[i] = &self.slots[*slot][..*len];
                dsts[i] = *gw;
            }
            let n = pending.len();
            match self.tx.send_batch(&packets[..n], &dsts[..n]) {
                Ok(0) => return Ok(false),
                Ok(sent) => {
                    for (_, len, _) in &pending[..sent] {
                        self.tally.packets += 1;
                        self.tally.bytes += (*len - OUTER_HEADER_LEN) as u64;
                    }
                    self.next += sent;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.counters.add(&mut self.tally, true);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                        DropReason::TooBig
                    } else {
                        DropReason::SendError
                    };
                    let gw = pending[0].2;
                    self.tally.drop(reason);
                    self.log.note(reason, || format!("to node {gw}: {e}"));
                    self.next += 1;
                }
            }
        }
        self.counters.add(&mut self.tally, true);
        Ok(true)
    }

    fn input_fd(&self) -> RawFd {
        self.tun.as_raw_fd()
    }

    fn output_fd(&self) -> RawFd {
        self.tx.as_raw_fd()
    }
}

/// Wire → TUN.
pub struct Decap {
    rx: RawSocket,
    tun: Arc<Tun>,
    table: TableView,
    counters: Arc<IpipCounters>,
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    tally: Tally,
    log: DropLog,
}

impl Decap {
    pub(crate) fn new(
        rx: RawSocket,
        tun: Arc<Tun>,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
        batch: usize,
    ) -> Self {
        let batch = batch.clamp(1, MAX_BATCH);
        Self {
            rx,
            tun,
            table: TableView::new(table),
            counters,
            bufs: (0..batch).map(|_| vec![0u8; packet::MAX_PACKET]).collect(),
            lens: vec![0; batch],
            tally: Tally::default(),
            log: DropLog::new(),
        }
    }
}

impl Pump for Decap {
    fn receive(&mut self) -> io::Result<bool> {
        self.table.refresh();
        let got = match self.rx.recv_batch(&mut self.bufs, &mut self.lens) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        let table = &*self.table.current;
        for i in 0..got {
            let packet = &mut self.bufs[i][..self.lens[i]];
            match packet::decapsulate(packet, table) {
                Ok(inner) => match self.tun.write(&packet[inner.clone()]) {
                    Ok(_) => {
                        self.tally.packets += 1;
                        self.tally.bytes += inner.len() as u64;
                    }
                    Err(e) => {
                        self.tally.drop(DropReason::TunWriteError);
                        self.log
                            .note(DropReason::TunWriteError, || format!("write to tunl0: {e}"));
                    }
                },
                Err(reason) => {
                    self.tally.drop(reason);
                    self.log.note(reason, || {
                        packet::outer_source(packet)
                            .map_or_else(|| "malformed".into(), |s| format!("from {s}"))
                    });
                }
            }
        }
        self.counters.add(&mut self.tally, false);
        Ok(true)
    }

    fn send(&mut self) -> io::Result<bool> {
        Ok(true)
    }

    fn input_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    fn output_fd(&self) -> RawFd {
        self.tun.as_raw_fd()
    }
}

/// Stop request shared by the forwarding threads.
#[derive(Debug)]
pub struct StopSignal {
    stopped: AtomicBool,
    waker: Waker,
}

impl StopSignal {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            stopped: AtomicBool::new(false),
            waker: Waker::new()?,
        })
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// Runs `pump` on the calling (dedicated) thread until `stop` or an I/O error.
pub fn run_thread(mut pump: impl Pump, stop: &StopSignal) -> io::Result<()> {
    loop {
        if stop.is_stopped() {
            return Ok(());
        }
        while !pump.send()? {
            if !wait(pump.output_fd(), Ready::Write, &stop.waker)? {
                return Ok(());
            }
        }
        if !pump.receive()? && !wait(pump.input_fd(), Ready::Read, &stop.waker)? {
            return Ok(());
        }
    }
}

/// A descriptor registered with tokio but owned elsewhere (by the pump, which outlives it).
struct Registered(RawFd);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Runs `pump` as a tokio task until an I/O error (stopped by aborting the task).
/// `wait_output`: register the output descriptor for writability (the TUN descriptor is
/// registered only once, for reading, by the encapsulating direction).
pub async fn run_task(pump: impl Pump, wait_output: bool) -> io::Result<()> {
    // Declared before the registrations, so dropped after them.
    let mut pump = pump;
    // SAFETY: the descriptors belong to `pump`, which outlives both registrations (locals
    // drop in reverse order), and `Registered` always returns the same descriptor.
    let input = unsafe {
        AsyncFd::register_with_interest(Registered(pump.input_fd()), Interest::READABLE)
    }?;
    let output = if wait_output {
        // SAFETY: as above.
        Some(unsafe {
            AsyncFd::register_with_interest(Registered(pump.output_fd()), Interest::WRITABLE)
        }?)
    } else {
        None
    };
    loop {
        match &output {
            Some(output) => loop {
                let mut guard = output.writable().await?;
                if pump.send()? {
                    break;
                }
                guard.clear_ready();
            },
            None => {
                while !pump.send()? {
                    tokio::task::yield_now().await;
                }
            }
        }
        let mut guard = input.readable().await?;
        if !pump.receive()? {
            guard.clear_ready();
        }
    }
}
