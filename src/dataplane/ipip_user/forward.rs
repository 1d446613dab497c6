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

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::offload;
use super::packet::{self, DropReason, OUTER_HEADER_LEN};
use super::sys::{RawSocket, Ready, Tun, Waker, wait};
use super::table::TunnelTable;

/// Packets handled per batch at most (one `recvmmsg`/`sendmmsg` call takes up to 64).
pub const MAX_BATCH: usize = 64;
/// Buffer per packet: the largest IPv4 packet plus the outer and virtio-net headers.
const SLOT: usize = packet::MAX_PACKET + OUTER_HEADER_LEN + offload::VNET_HDR_LEN;

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
    segmented: AtomicU64,
    coalesced: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// A copy of [`IpipCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpipCountersSnapshot {
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    /// Large TCP packets cut into segments here: read from `tunl0` (TSO), or received
    /// bigger than `tunl0`'s MTU with offloads off.
    pub segmented: u64,
    /// Writes to `tunl0` that carried several coalesced segments (or one packet larger than
    /// the MTU) as one GSO packet.
    pub coalesced: u64,
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

    /// Sets every counter to the values of `s` (the agent's copy of a forwarder process's
    /// counters, see [`super::process`]).
    pub fn store(&self, s: &IpipCountersSnapshot) {
        self.encap_packets.store(s.encap_packets, Ordering::Relaxed);
        self.encap_bytes.store(s.encap_bytes, Ordering::Relaxed);
        self.decap_packets.store(s.decap_packets, Ordering::Relaxed);
        self.decap_bytes.store(s.decap_bytes, Ordering::Relaxed);
        self.segmented.store(s.segmented, Ordering::Relaxed);
        self.coalesced.store(s.coalesced, Ordering::Relaxed);
        for (a, v) in self.drops.iter().zip(&s.drops) {
            a.store(*v, Ordering::Relaxed);
        }
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
            segmented: self.segmented.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
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
        if t.segmented > 0 {
            self.segmented.fetch_add(t.segmented, Ordering::Relaxed);
        }
        if t.coalesced > 0 {
            self.coalesced.fetch_add(t.coalesced, Ordering::Relaxed);
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
    segmented: u64,
    coalesced: u64,
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

/// Where one part of an outgoing packet lives.
#[derive(Debug, Clone)]
enum Part {
    /// `slots[slot][range]`.
    Slot(usize, Range<usize>),
    /// `headers[index][..len]`: outer + inner headers of a segment.
    Header(usize, usize),
}

/// One encapsulated packet waiting to be sent: its parts, the node, the inner length.
#[derive(Debug, Clone)]
struct Outgoing {
    parts: [Option<Part>; 2],
    node: Ipv4Addr,
    inner_len: usize,
}

type SegmentHeaders = [u8; OUTER_HEADER_LEN + offload::MAX_HEADERS];

/// Stop reading once this many packets wait to be sent (TSO packets yield up to ~45 each).
const MAX_QUEUED: usize = 512;

/// TUN → wire.
pub struct Encap {
    tun: Arc<Tun>,
    tx: RawSocket,
    local: Ipv4Addr,
    table: TableView,
    counters: Arc<IpipCounters>,
    batch: usize,
    /// Packets carry a virtio-net header (offloads on).
    vnet: bool,
    /// Read buffers: room for the outer header, then (virtio-net header and) the packet.
    slots: Vec<Vec<u8>>,
    /// Headers of segments cut from TSO packets; `headers_used` of them hold this batch's.
    headers: Vec<SegmentHeaders>,
    headers_used: usize,
    queued: Vec<Outgoing>,
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
        vnet: bool,
    ) -> Self {
        let batch = batch.clamp(1, MAX_BATCH);
        Self {
            tun,
            tx,
            local,
            table: TableView::new(table),
            counters,
            batch,
            vnet,
            slots: (0..batch).map(|_| vec![0u8; SLOT]).collect(),
            headers: Vec::new(),
            headers_used: 0,
            queued: Vec::with_capacity(MAX_QUEUED + 64),
            next: 0,
            tally: Tally::default(),
            log: DropLog::new(),
        }
    }

    /// Offset of the packet in a slot.
    fn packet_offset(&self) -> usize {
        if self.vnet {
            OUTER_HEADER_LEN + offload::VNET_HDR_LEN
        } else {
            OUTER_HEADER_LEN
        }
    }

    /// Queues the packet of `slot` (`len` bytes at the packet offset) for `node`.
    fn queue(&mut self, slot: usize, len: usize, node: Ipv4Addr) -> Result<(), DropReason> {
        let off = self.packet_offset();
        let vnet = if self.vnet {
            offload::VnetHdr::parse(&self.slots[slot][OUTER_HEADER_LEN..off])
        } else {
            None
        };
        match vnet {
            Some(h) if h.gso_type & !offload::GSO_ECN == offload::GSO_TCPV4 => {
                self.tally.segmented += 1;
                self.queue_segments(slot, off, len, usize::from(h.gso_size), node)
            }
            Some(h) if h.gso_type != offload::GSO_NONE => Err(DropReason::TooBig),
            other => {
                let packet = &mut self.slots[slot][off..off + len];
                if let Some(h) = other
                    && h.flags & offload::F_NEEDS_CSUM != 0
                {
                    offload::complete_checksum(
                        packet,
                        usize::from(h.csum_start),
                        usize::from(h.csum_offset),
                    )?;
                }
                let start = off - OUTER_HEADER_LEN;
                packet::write_outer_header(
                    &mut self.slots[slot][start..off + len],
                    self.local,
                    node,
                )?;
                self.queued.push(Outgoing {
                    parts: [Some(Part::Slot(slot, start..off + len)), None],
                    node,
                    inner_len: len,
                });
                Ok(())
            }
        }
    }

    /// Cuts a TSO packet into segments of `mss` and queues them (headers in `headers`,
    /// payloads left in the slot).
    fn queue_segments(
        &mut self,
        slot: usize,
        off: usize,
        len: usize,
        mss: usize,
        node: Ipv4Addr,
    ) -> Result<(), DropReason> {
        let packet = &self.slots[slot][off..off + len];
        let (local, headers, queued) = (self.local, &mut self.headers, &mut self.queued);
        let used = &mut self.headers_used;
        let mut error = None;
        offload::tcp_segments(packet, mss, |h, payload| {
            if error.is_some() {
                return;
            }
            let k = *used;
            if headers.len() <= k {
                headers.push([0; OUTER_HEADER_LEN + offload::MAX_HEADERS]);
            }
            let store = &mut headers[k];
            let (outer, rest) = store.split_at_mut(OUTER_HEADER_LEN);
            rest[..h.len()].copy_from_slice(h);
            let outer: &mut [u8; OUTER_HEADER_LEN] = outer.try_into().expect("20 bytes");
            let total = OUTER_HEADER_LEN + h.len() + payload.len();
            if let Err(e) = packet::outer_header(outer, h, total, local, node) {
                error = Some(e);
                return;
            }
            *used += 1;
            let payload = off + payload.start..off + payload.end;
            queued.push(Outgoing {
                parts: [
                    Some(Part::Header(k, OUTER_HEADER_LEN + h.len())),
                    (!payload.is_empty()).then_some(Part::Slot(slot, payload.clone())),
                ],
                node,
                inner_len: h.len() + payload.len(),
            });
        })?;
        error.map_or(Ok(()), Err)
    }

    fn part(&self, part: &Option<Part>) -> &[u8] {
        match part {
            Some(Part::Slot(slot, range)) => &self.slots[*slot][range.clone()],
            Some(Part::Header(index, len)) => &self.headers[*index][..*len],
            None => &[],
        }
    }
}

impl Pump for Encap {
    fn receive(&mut self) -> io::Result<bool> {
        self.table.refresh();
        self.queued.clear();
        self.next = 0;
        self.headers_used = 0;
        let table = self.table.current.clone();
        let off = self.packet_offset();
        let head = off - OUTER_HEADER_LEN;
        let mut read = 0;
        for slot in 0..self.batch {
            if self.queued.len() >= MAX_QUEUED {
                break;
            }
            let n = match self.tun.read(&mut self.slots[slot][OUTER_HEADER_LEN..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.add(&mut self.tally, true);
                    return Err(e);
                }
            };
            read += 1;
            let Some(len) = n.checked_sub(head) else {
                self.tally.drop(DropReason::NotIpv4);
                continue;
            };
            let dst = packet::inner_destination(&self.slots[slot][off..off + len]);
            let result = dst
                .and_then(|d| table.lookup(d).ok_or(DropReason::NoRoute))
                .and_then(|node| self.queue(slot, len, node));
            if let Err(reason) = result {
                self.tally.drop(reason);
                self.log.note(reason, || match (reason, dst) {
                    (DropReason::NoRoute, Ok(d)) => format!("no remote block for {d}"),
                    _ => format!("{len}-byte packet from tunl0"),
                });
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
            let n = pending.len().min(MAX_BATCH);
            let mut packets: [[&[u8]; 2]; MAX_BATCH] = [[&[], &[]]; MAX_BATCH];
            let mut nodes = [Ipv4Addr::UNSPECIFIED; MAX_BATCH];
            for (i, out) in pending[..n].iter().enumerate() {
                packets[i] = [self.part(&out.parts[0]), self.part(&out.parts[1])];
                nodes[i] = out.node;
            }
            match self.tx.send_batch(&packets[..n], &nodes[..n]) {
                Ok(0) => return Ok(false),
                Ok(sent) => {
                    for out in &pending[..sent] {
                        self.tally.packets += 1;
                        self.tally.bytes += out.inner_len as u64;
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
                    let node = pending[0].node;
                    self.tally.drop(reason);
                    self.log.note(reason, || format!("to node {node}: {e}"));
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

/// How often the decapsulating side re-reads `tunl0`'s MTU.
const MTU_REFRESH: Duration = Duration::from_secs(1);

/// Wire → TUN.
pub struct Decap {
    rx: RawSocket,
    out: TunOut,
    device: String,
    table: TableView,
    counters: Arc<IpipCounters>,
    /// Packets carry a virtio-net header: TCP segments are coalesced.
    vnet: bool,
    mtu: usize,
    mtu_read: Instant,
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// Inner packets of this batch: buffer index and range.
    inner: Vec<(usize, Range<usize>)>,
}

/// A run of coalesced packets: the first one whole, the others' payloads.
struct Run {
    coalescer: offload::Coalescer,
    first: Option<(usize, Range<usize>)>,
    payloads: Vec<(usize, Range<usize>)>,
}

impl Decap {
    pub(crate) fn new(
        rx: RawSocket,
        tun: Arc<Tun>,
        device: String,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
        batch: usize,
        vnet: bool,
    ) -> Self {
        let batch = batch.clamp(1, MAX_BATCH);
        let mut d = Self {
            rx,
            out: TunOut {
                tun,
                tally: Tally::default(),
                log: DropLog::new(),
            },
            device,
            table: TableView::new(table),
            counters,
            vnet,
            mtu: 1480,
            mtu_read: Instant::now(),
            bufs: (0..batch).map(|_| vec![0u8; packet::MAX_PACKET]).collect(),
            lens: vec![0; batch],
            inner: Vec::with_capacity(batch),
        };
        d.refresh_mtu();
        d
    }

    fn refresh_mtu(&mut self) {
        match self.rx.device_mtu(&self.device) {
            Ok(m) if m >= 68 => self.mtu = m as usize,
            Ok(_) => {}
            Err(e) => tracing::debug!(device = %self.device, error = %e, "cannot read the MTU"),
        }
        self.mtu_read = Instant::now();
    }

    /// A packet larger than the MTU (merged by the underlay's GRO): TCP is handed to the
    /// kernel as a GSO packet (header on) or cut into segments here (header off); anything
    /// else is written as it is, for the kernel to fragment or refuse.
    fn write_oversized(&mut self, buf: usize, range: Range<usize>) {
        let len = range.len() as u64;
        let out = &mut self.out;
        let packet = &mut self.bufs[buf][range];
        if self.vnet {
            if let Some(h) = offload::oversized_tcp_gso(packet, self.mtu) {
                let h = h.encode();
                out.tally.coalesced += 1;
                out.write(&[IoSlice::new(&h), IoSlice::new(packet)], 1, len);
                return;
            }
        } else if let Some((ihl, thl)) = offload::tcp_headers(packet)
            && let Some(mss) = self.mtu.checked_sub(ihl + thl).filter(|m| *m > 0)
        {
            let mut first = true;
            out.tally.segmented += 1;
            let _ = offload::tcp_segments(packet, mss, |h, r| {
                let (packets, bytes) = if first { (1, len) } else { (0, 0) };
                first = false;
                out.write(&[IoSlice::new(h), IoSlice::new(&packet[r])], packets, bytes);
            });
            return;
        }
        out.write_single(self.vnet, packet);
    }

    /// Writes the current run: merged with a GSO header, or its only packet as it is.
    fn flush_run(&mut self, run: &mut Run) {
        let Some((buf, range)) = run.first.take() else {
            return;
        };
        let (head, tail) = self.bufs.split_at_mut(buf);
        let (first, tail) = tail.split_first_mut().expect("index in range");
        let first_packet = &mut first[range.clone()];
        let Some(h) = run.coalescer.finish(first_packet) else {
            self.out.write_single(self.vnet, first_packet);
            return;
        };
        let h = h.encode();
        let headers = usize::from(offload::VnetHdr::parse(&h).map_or(0, |v| v.hdr_len));
        let mut parts = Vec::with_capacity(run.payloads.len() + 2);
        parts.push(IoSlice::new(&h));
        parts.push(IoSlice::new(first_packet));
        let mut bytes = range.len() as u64;
        for (b, r) in run.payloads.drain(..) {
            // Payloads come from later buffers than the first packet's.
            let src = if b < buf {
                &head[b]
            } else {
                &tail[b - buf - 1]
            };
            bytes += (headers + r.len()) as u64;
            parts.push(IoSlice::new(&src[r]));
        }
        let packets = parts.len() as u64 - 1;
        self.out.tally.coalesced += 1;
        self.out.write(&parts, packets, bytes);
    }
}

/// The TUN side of [`Decap`] with its counts.
struct TunOut {
    tun: Arc<Tun>,
    tally: Tally,
    log: DropLog,
}

impl TunOut {
    /// Writes `parts` (one packet) to the TUN device, counting `packets` inner packets of
    /// `bytes` bytes.
    fn write(&mut self, parts: &[IoSlice<'_>], packets: u64, bytes: u64) {
        match self.tun.write_parts(parts) {
            Ok(_) => {
                self.tally.packets += packets;
                self.tally.bytes += bytes;
            }
            Err(e) => {
                self.tally.drops[DropReason::TunWriteError.index()] += packets;
                self.log
                    .note(DropReason::TunWriteError, || format!("write to tunl0: {e}"));
            }
        }
    }

    /// Writes one inner packet as it is (after an empty virtio-net header when `vnet`).
    fn write_single(&mut self, vnet: bool, packet: &[u8]) {
        let len = packet.len() as u64;
        if vnet {
            let none = [0u8; offload::VNET_HDR_LEN];
            self.write(&[IoSlice::new(&none), IoSlice::new(packet)], 1, len);
        } else {
            self.write(&[IoSlice::new(packet)], 1, len);
        }
    }
}

impl Pump for Decap {
    fn receive(&mut self) -> io::Result<bool> {
        self.table.refresh();
        if self.mtu_read.elapsed() >= MTU_REFRESH {
            self.refresh_mtu();
        }
        let got = match self.rx.recv_batch(&mut self.bufs, &mut self.lens) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        let table = self.table.current.clone();
        self.inner.clear();
        for i in 0..got {
            let packet = &mut self.bufs[i][..self.lens[i]];
            match packet::decapsulate(packet, &table) {
                Ok(range) => self.inner.push((i, range)),
                Err(reason) => {
                    self.out.tally.drop(reason);
                    self.out.log.note(reason, || {
                        packet::outer_source(packet)
                            .map_or_else(|| "malformed".into(), |s| format!("from {s}"))
                    });
                }
            }
        }
        let mut run = Run {
            coalescer: offload::Coalescer::default(),
            first: None,
            payloads: Vec::new(),
        };
        let inner = std::mem::take(&mut self.inner);
        for (buf, range) in &inner {
            let (buf, range) = (*buf, range.clone());
            if range.len() > self.mtu {
                self.flush_run(&mut run);
                self.write_oversized(buf, range);
                continue;
            }
            if !self.vnet {
                self.out.write_single(false, &self.bufs[buf][range]);
                continue;
            }
            let packet = &self.bufs[buf][range.clone()];
            let packet_len = packet.len();
            let seg = offload::Coalescer::candidate(packet);
            if let (Some(seg), Some((fb, fr))) = (seg, &run.first)
                && run
                    .coalescer
                    .accepts(&self.bufs[*fb][fr.clone()], &seg, packet)
            {
                let (ihl, thl) = offload::tcp_headers(packet).expect("a candidate is TCP");
                run.coalescer.push(seg);
                run.payloads.push((buf, range.start + ihl + thl..range.end));
                continue;
            }
            self.flush_run(&mut run);
            match seg {
                Some(seg) => {
                    run.coalescer.start(seg, packet_len);
                    run.first = Some((buf, range));
                }
                None => self.out.write_single(true, &self.bufs[buf][range]),
            }
        }
        self.flush_run(&mut run);
        self.inner = inner;
        self.counters.add(&mut self.out.tally, false);
        Ok(true)
    }

    fn send(&mut self) -> io::Result<bool> {
        Ok(true)
    }

    fn input_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    fn output_fd(&self) -> RawFd {
        self.out.tun.as_raw_fd()
    }
}

/// Stop request shared by the forwarding threads.
#[derive(Debug)]
pub struct StopSignal {
    stopped: AtomicBool,
    /// Wakes threads blocked in `poll`.
    waker: Waker,
    /// Wakes tasks.
    notify: watch::Sender<bool>,
}

impl StopSignal {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            stopped: AtomicBool::new(false),
            waker: Waker::new()?,
            notify: watch::channel(false).0,
        })
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.waker.wake();
        self.notify.send_replace(true);
    }

    /// Resolves once [`stop`](Self::stop) was called.
    pub async fn stopped(&self) {
        let mut rx = self.notify.subscribe();
        let _ = rx.wait_for(|s| *s).await;
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

/// Runs `pump` as a tokio task until `stop` or an I/O error; the pump (and its
/// descriptors) is dropped before it returns. `wait_output`: register the output descriptor
/// for writability (the TUN descriptor is registered only once, for reading, by the
/// encapsulating direction).
pub async fn run_task(pump: impl Pump, wait_output: bool, stop: &StopSignal) -> io::Result<()> {
    tokio::select! {
        r = pump_task(pump, wait_output) => r,
        () = stop.stopped() => Ok(()),
    }
}

async fn pump_task(pump: impl Pump, wait_output: bool) -> io::Result<()> {
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
