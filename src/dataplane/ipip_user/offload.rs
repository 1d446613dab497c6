//! Segmentation and coalescing of TCP over the TUN device's virtio-net header
//! (`IFF_VNET_HDR`), so that the kernel and the forwarder exchange up to 64 KiB TCP packets
//! instead of one packet per MTU:
//!
//! - out: with `TUN_F_TSO4 | TUN_F_CSUM` the kernel hands the forwarder TCP packets of up to
//!   64 KiB (`gso_type` TCPv4) and packets with a partial checksum (`NEEDS_CSUM`);
//!   [`tcp_segments`] cuts the former into MSS-sized segments with complete headers and
//!   checksums (what a NIC's TSO does), [`complete_checksum`] finishes the latter.
//! - in: consecutive received segments of one TCP flow that [`Coalescer`] accepts are
//!   written as one packet with a TCPv4 GSO header (what GRO does); the kernel forwards it as
//!   one packet and segments it again only where needed. Every coalesced segment's TCP
//!   checksum is verified first, since the merged packet's is left to the kernel.
//! - in, large: the underlay NIC's GRO may hand the raw socket a merged IPIP packet bigger
//!   than `tunl0`'s MTU (the kernel's IPIP GRO is built in); such TCP packets are written with
//!   a GSO header too (or segmented here when the header is off), never dropped for size.

use std::ops::Range;

use super::packet::DropReason;

/// Size of `struct virtio_net_hdr` (the TUN default, `TUNSETVNETHDRSZ` unchanged).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN` (flag on `gso_type`).
pub const GSO_ECN: u8 = 0x80;
/// Longest IPv4 + TCP header.
pub const MAX_HEADERS: usize = 60 + 60;

const TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (legacy layout, native byte order as TUN uses it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// The header of a TCP packet (IPv4 header `ihl`, TCP header `thl` bytes) whose checksum
    /// the kernel is to complete, segmented at `gso_size` bytes of payload (`None`: one
    /// packet).
    pub fn tcp_partial(ihl: usize, thl: usize, gso_size: Option<u16>) -> Self {
        Self {
            flags: F_NEEDS_CSUM,
            gso_type: if gso_size.is_some() {
                GSO_TCPV4
            } else {
                GSO_NONE
            },
            hdr_len: (ihl + thl) as u16,
            gso_size: gso_size.unwrap_or(0),
            csum_start: ihl as u16,
            csum_offset: 16,
        }
    }
}

/// Ones'-complement sum of `data` (big-endian 16-bit words, odd tail padded), added to
/// `acc`; not folded. `data` must start at an even offset of the checksummed range.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        acc += u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the IPv4 pseudo-header of a TCP segment of `tcp_len` bytes in `ip` (not folded).
fn pseudo_sum(ip: &[u8], tcp_len: usize) -> u64 {
    let acc = sum(&ip[12..20], 0);
    acc + u64::from(TCP) + tcp_len as u64
}

fn set_ip_checksum(ip: &mut [u8], ihl: usize) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// IPv4 header length and TCP header length of a TCP packet that is no fragment; `None` if
/// it is not one (or its headers are not all there).
pub fn tcp_headers(p: &[u8]) -> Option<(usize, usize)> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != TCP {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    // MF or a fragment offset: a fragment.
    if ihl < 20 || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 || p.len() < ihl + 20 {
        return None;
    }
    let thl = usize::from(p[ihl + 12] >> 4) * 4;
    (thl >= 20 && p.len() >= ihl + thl).then_some((ihl, thl))
}

/// Does the TCP checksum of this IPv4/TCP packet verify?
pub fn tcp_checksum_ok(p: &[u8], ihl: usize) -> bool {
    let tcp = &p[ihl..];
    fold(sum(tcp, pseudo_sum(p, tcp.len()))) == 0xffff
}

/// Completes a partial checksum (`NEEDS_CSUM`, TCP or UDP): the field at `start + offset`
/// holds the pseudo-header sum; sums `packet[start..]` and stores the complement there.
pub fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), DropReason> {
    let at = start + offset;
    if !start.is_multiple_of(2) || at + 2 > packet.len() {
        return Err(DropReason::NotIpv4);
    }
    // A result of 0 is sent as 0xffff (equal in ones' complement): for UDP, 0 would mean
    // "no checksum".
    let c = match !fold(sum(&packet[start..], 0)) {
        0 => 0xffff,
        c => c,
    };
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Splits the IPv4/TCP packet `p` into segments of at most `mss` payload bytes, as TSO does:
/// identification +1 per segment, sequence numbers advanced, FIN and PSH only on the last,
/// CWR only on the first, IP and TCP checksums computed. `emit(headers, payload)` gets each
/// segment's headers (IP + TCP) and the range of its payload in `p`. Returns the segment
/// count.
pub fn tcp_segments(
    p: &[u8],
    mss: usize,
    mut emit: impl FnMut(&[u8], Range<usize>),
) -> Result<usize, DropReason> {
    let (ihl, thl) = tcp_headers(p).ok_or(DropReason::TooBig)?;
    if mss == 0 {
        return Err(DropReason::TooBig);
    }
    let hlen = ihl + thl;
    let mut h = [0u8; MAX_HEADERS];
    h[..hlen].copy_from_slice(&p[..hlen]);
    let id = u16::from_be_bytes([p[4], p[5]]);
    let seq = u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]]);
    let flags = p[ihl + 13];
    let payload = hlen..p.len();
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let start = payload.start + i * mss;
        let end = (start + mss).min(payload.end);
        let last = i + 1 == count;
        let tot = (hlen + end - start) as u16;
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        h[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        set_ip_checksum(&mut h, ihl);
        let s = seq.wrapping_add((i * mss) as u32);
        h[ihl + 4..ihl + 8].copy_from_slice(&s.to_be_bytes());
        let mut f = flags;
        if !last {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        h[ihl + 13] = f;
        h[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
        let tcp_len = thl + end - start;
        let acc = sum(&p[start..end], sum(&h[ihl..hlen], pseudo_sum(&h, tcp_len)));
        let c = !fold(acc);
        h[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        emit(&h[..hlen], start..end);
    }
    Ok(count)
}

/// Prepares a TCP packet larger than the MTU (merged by the underlay's GRO) to be written
/// with a GSO header: fills the TCP checksum field with the pseudo-header sum and returns
/// the header to write before it.
pub fn oversized_tcp_gso(p: &mut [u8], mtu: usize) -> Option<VnetHdr> {
    let (ihl, thl) = tcp_headers(p)?;
    let mss = mtu.checked_sub(ihl + thl).filter(|m| *m > 0)?;
    let tcp_len = p.len() - ihl;
    let c = fold(pseudo_sum(p, tcp_len));
    p[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    Some(VnetHdr::tcp_partial(ihl, thl, Some(mss as u16)))
}

/// What [`Coalescer`] keeps of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    ihl: usize,
    thl: usize,
    seq: u32,
    payload: usize,
    flags: u8,
}

/// Merges consecutive segments of one TCP flow into one GSO packet, under rules close to
/// the kernel's GRO: IPv4 without options, no fragments; same addresses, TOS, TTL, DF,
/// ports, ACK number, window and TCP options; flags exactly ACK except PSH on the last one;
/// contiguous sequence numbers; every segment but the last of the first one's size; valid
/// TCP checksums; at most 65535 bytes and [`Coalescer::MAX_SEGMENTS`] segments.
#[derive(Debug, Default)]
pub struct Coalescer {
    first: Option<Segment>,
    last: Option<Segment>,
    total: usize,
    segments: usize,
}

impl Coalescer {
    /// Segments merged into one packet at most.
    pub const MAX_SEGMENTS: usize = 62;

    /// A segment that may start a merge, if `p` is one.
    pub fn candidate(p: &[u8]) -> Option<Segment> {
        let (ihl, thl) = tcp_headers(p)?;
        if ihl != 20 || u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
            return None;
        }
        let flags = p[ihl + 13];
        let payload = p.len() - ihl - thl;
        if payload == 0 || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH) {
            return None;
        }
        if !tcp_checksum_ok(p, ihl) {
            return None;
        }
        Some(Segment {
            ihl,
            thl,
            seq: u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
            payload,
            flags,
        })
    }

    /// Starts a new merge with `seg` (of a packet of `len` bytes).
    pub fn start(&mut self, seg: Segment, len: usize) {
        self.first = Some(seg);
        self.last = Some(seg);
        self.total = len;
        self.segments = 1;
    }

    pub fn is_active(&self) -> bool {
        self.first.is_some()
    }

    /// Segments in the current merge.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Can `next` (of packet `np`) be appended to the merge whose first packet is `fp`?
    pub fn accepts(&self, fp: &[u8], next: &Segment, np: &[u8]) -> bool {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return false;
        };
        let thl = first.thl;
        last.flags == TCP_ACK
            && next.thl == thl
            && last.payload == first.payload
            && next.payload <= first.payload
            && next.seq == last.seq.wrapping_add(last.payload as u32)
            && self.total + next.payload <= 65_535
            && self.segments < Self::MAX_SEGMENTS
            // TOS, DF (flags byte), TTL, protocol, addresses.
            && fp[1] == np[1]
            && fp[6] & 0x40 == np[6] & 0x40
            && fp[8..10] == np[8..10]
            && fp[12..20] == np[12..20]
            // Ports; ACK number; window; options.
            && fp[20..24] == np[20..24]
            && fp[28..32] == np[28..32]
            && fp[34..36] == np[34..36]
            && fp[40..20 + thl] == np[40..20 + thl]
    }

    /// Appends `next` (checked with [`accepts`](Self::accepts)).
    pub fn push(&mut self, next: Segment) {
        self.last = Some(next);
        self.total += next.payload;
        self.segments += 1;
    }

    /// Ends the merge: rewrites the first packet's headers in `fp` for the merged length
    /// (total length, IP checksum, PSH of the last segment, TCP pseudo-header sum) and
    /// returns the GSO header, or `None` for a single segment (written as it is).
    pub fn finish(&mut self, fp: &mut [u8]) -> Option<VnetHdr> {
        let first = self.first.take()?;
        let last = self.last.take()?;
        let segments = std::mem::take(&mut self.segments);
        let total = std::mem::take(&mut self.total);
        if segments < 2 {
            return None;
        }
        let ihl = first.ihl;
        fp[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        set_ip_checksum(fp, ihl);
        fp[ihl + 13] |= last.flags & TCP_PSH;
        let c = fold(pseudo_sum(fp, total - ihl));
        fp[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        Some(VnetHdr::tcp_partial(
            ihl,
            first.thl,
            Some(first.payload as u16),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ipip_user::packet::header_checksum;

    /// A valid IPv4/TCP packet with a timestamp option.
    fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let thl = 32;
        let total = 20 + thl + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[172, 16, 196, 129]);
        p[16..20].copy_from_slice(&[172, 16, 241, 65]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&5201u16.to_be_bytes());
        t[2..4].copy_from_slice(&40000u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        t[32..].copy_from_slice(payload);
        fix(&mut p);
        p
    }

    /// Recomputes both checksums.
    fn fix(p: &mut [u8]) {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[36..38].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&p[20..], pseudo_sum(p, p.len() - 20)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 300) as u8).collect()
    }

    #[test]
    fn sum_matches_the_simple_checksum() {
        for len in [0, 1, 2, 3, 7, 8, 9, 20, 63, 1500] {
            let d = data(len);
            let simple = header_checksum(&d);
            assert_eq!(!fold(sum(&d, 0)), simple, "len {len}");
        }
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr::tcp_partial(20, 32, Some(1428));
        assert_eq!(VnetHdr::parse(&h.encode()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn segments_are_valid_tcp_with_contiguous_sequence_numbers() {
        let payload = data(5000);
        let mut big = tcp(1000, TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR, &payload);
        // The kernel hands a GSO packet with a partial checksum; segmenting ignores it.
        big[36] ^= 0x55;
        let mut segs = Vec::new();
        let n = tcp_segments(&big, 1448, |h, r| {
            let mut s = h.to_vec();
            s.extend_from_slice(&big[r]);
            segs.push(s);
        })
        .unwrap();
        assert_eq!(n, 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(header_checksum(&s[..20]), 0, "IP checksum {i}");
            assert!(tcp_checksum_ok(s, 20), "TCP checksum {i}");
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + (i * 1448) as u32);
            let last = i == 3;
            assert_eq!(
                s[33] & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH on the last only"
            );
            assert_eq!(s[33] & TCP_CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(&s[40..52], &big[40..52], "options copied");
            joined.extend_from_slice(&s[52..]);
        }
        assert_eq!(joined, payload);
        assert_eq!(segs[3].len(), 52 + 5000 - 3 * 1448);
    }

    #[test]
    fn a_packet_within_the_mss_is_one_segment() {
        let p = tcp(5, TCP_ACK, &data(100));
        let mut out = Vec::new();
        assert_eq!(
            tcp_segments(&p, 1448, |h, r| out.push((h.to_vec(), r))),
            Ok(1)
        );
        let mut s = out[0].0.clone();
        s.extend_from_slice(&p[out[0].1.clone()]);
        assert_eq!(s, p);
        // A pure ACK too.
        let ack = tcp(5, TCP_ACK, &[]);
        assert_eq!(
            tcp_segments(&ack, 1448, |_, r| assert!(r.is_empty())),
            Ok(1)
        );
    }

    #[test]
    fn non_tcp_and_fragments_are_not_segmented() {
        let mut udp = tcp(1, TCP_ACK, &data(10));
        udp[9] = 17;
        assert_eq!(tcp_segments(&udp, 100, |_, _| {}), Err(DropReason::TooBig));
        let mut frag = tcp(1, TCP_ACK, &data(10));
        frag[6] |= 0x20;
        assert_eq!(tcp_segments(&frag, 100, |_, _| {}), Err(DropReason::TooBig));
        assert_eq!(
            tcp_segments(&[0x45; 30], 100, |_, _| {}),
            Err(DropReason::TooBig)
        );
        let p = tcp(1, TCP_ACK, &data(10));
        assert_eq!(tcp_segments(&p, 0, |_, _| {}), Err(DropReason::TooBig));
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut p = tcp(9, TCP_ACK | TCP_PSH, &data(333));
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field.
        let c = fold(pseudo_sum(&p, p.len() - 20));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        assert!(!tcp_checksum_ok(&p, 20));
        complete_checksum(&mut p, 20, 16).unwrap();
        assert!(tcp_checksum_ok(&p, 20));
        assert!(complete_checksum(&mut p, 20, 5000).is_err());
        // A sum that folds to 0xffff is stored as 0xffff, never 0.
        let mut zero = vec![0u8; 8];
        zero[0..2].copy_from_slice(&0xffffu16.to_be_bytes());
        complete_checksum(&mut zero, 0, 6).unwrap();
        assert_eq!(&zero[6..8], &[0xff, 0xff]);
    }

    /// Runs the coalescer over `packets` the way the forwarder does: returns the written
    /// packets (GSO header, bytes).
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(Option<VnetHdr>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut c = Coalescer::default();
        let mut cur: Vec<u8> = Vec::new();
        for p in packets {
            let seg = Coalescer::candidate(p);
            if let Some(seg) = seg
                && c.is_active()
                && c.accepts(&cur, &seg, p)
            {
                c.push(seg);
                cur.extend_from_slice(&p[52..]);
                continue;
            }
            if c.is_active() {
                let h = c.finish(&mut cur);
                out.push((h, std::mem::take(&mut cur)));
            }
            match seg {
                Some(seg) => {
                    c.start(seg, p.len());
                    cur = p.clone();
                }
                None => out.push((None, p.clone())),
            }
        }
        if c.is_active() {
            let h = c.finish(&mut cur);
            out.push((h, cur));
        }
        out
    }

    /// Splits a merged packet again (as the kernel would) and checks every segment.
    fn resegment(h: &VnetHdr, p: &[u8]) -> Vec<Vec<u8>> {
        let mut fixed = p.to_vec();
        complete_checksum(&mut fixed, h.csum_start.into(), h.csum_offset.into()).unwrap();
        assert!(tcp_checksum_ok(&fixed, 20), "merged checksum");
        let mut segs = Vec::new();
        tcp_segments(p, h.gso_size.into(), |hd, r| {
            let mut s = hd.to_vec();
            s.extend_from_slice(&p[r]);
            segs.push(s);
        })
        .unwrap();
        segs
    }

    #[test]
    fn consecutive_segments_are_merged_and_split_back_identically() {
        let d = data(1448 * 5 + 100);
        let mut packets: Vec<Vec<u8>> = d
            .chunks(1448)
            .enumerate()
            .map(|(i, c)| tcp(100 + (i * 1448) as u32, TCP_ACK, c))
            .collect();
        let n = packets.len();
        packets[n - 1] = tcp(
            100 + ((n - 1) * 1448) as u32,
            TCP_ACK | TCP_PSH,
            &d[(n - 1) * 1448..],
        );
        let out = coalesce(&packets);
        assert_eq!(out.len(), 1);
        let (h, merged) = &out[0];
        let h = h.expect("GSO header");
        assert_eq!(
            (h.gso_type, h.gso_size, h.flags),
            (GSO_TCPV4, 1448, F_NEEDS_CSUM)
        );
        assert_eq!((h.hdr_len, h.csum_start, h.csum_offset), (52, 20, 16));
        assert_eq!(header_checksum(&merged[..20]), 0);
        assert_eq!(
            u16::from_be_bytes([merged[2], merged[3]]) as usize,
            merged.len()
        );
        assert_eq!(merged[33] & TCP_PSH, TCP_PSH);
        let again = resegment(&h, merged);
        assert_eq!(again.len(), n);
        for (a, b) in again.iter().zip(&packets) {
            // Identification differs (the kernel numbers segments itself); the rest matches.
            assert_eq!(a[20..], b[20..]);
        }
    }

    #[test]
    fn segments_that_must_not_merge_stay_apart() {
        let d = data(1448);
        let base = |seq: u32| tcp(seq, TCP_ACK, &d);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gap in sequence", base(1448 + 1 + 7)),
            ("other flow", {
                let mut p = base(1 + 1448);
                p[20] = 9;
                fix(&mut p);
                p
            }),
            ("other ack", {
                let mut p = base(1 + 1448);
                p[31] = 1;
                fix(&mut p);
                p
            }),
            ("FIN", tcp(1 + 1448, TCP_ACK | TCP_FIN, &d)),
            ("bad checksum", {
                let mut p = base(1 + 1448);
                p[60] ^= 1;
                p
            }),
            ("larger than the first", tcp(1 + 1448, TCP_ACK, &data(1449))),
            ("other TTL", {
                let mut p = base(1 + 1448);
                p[8] = 1;
                fix(&mut p);
                p
            }),
            ("other options", {
                let mut p = base(1 + 1448);
                p[47] = 10;
                fix(&mut p);
                p
            }),
        ];
        for (what, second) in cases {
            let out = coalesce(&[base(1), second.clone()]);
            assert_eq!(out.len(), 2, "{what}");
            assert!(out.iter().all(|(h, _)| h.is_none()), "{what}");
            assert_eq!(out[1].1, second, "{what}");
        }
        // After a PSH nothing more joins; a short segment ends the run too.
        let out = coalesce(&[
            tcp(1, TCP_ACK, &d),
            tcp(1449, TCP_ACK, &d[..100]),
            tcp(1549, TCP_ACK, &d),
        ]);
        assert_eq!(out.len(), 2);
        assert!(out[0].0.is_some());
        let out = coalesce(&[tcp(1, TCP_ACK | TCP_PSH, &d), tcp(1449, TCP_ACK, &d)]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn oversized_tcp_gets_a_gso_header() {
        let d = data(9000);
        let mut p = tcp(1, TCP_ACK, &d);
        let original = p.clone();
        let h = oversized_tcp_gso(&mut p, 1480).unwrap();
        assert_eq!(h.gso_size, 1480 - 52);
        let segs = resegment(&h, &p);
        assert_eq!(segs.len(), 9000usize.div_ceil(1428));
        let joined: Vec<u8> = segs.iter().flat_map(|s| s[52..].to_vec()).collect();
        assert_eq!(joined, original[52..]);
        let mut udp = original.clone();
        udp[9] = 17;
        assert_eq!(oversized_tcp_gso(&mut udp, 1480), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let good = tcp(1, TCP_ACK, &data(3000));
        for round in 0..3000 {
            let len = (next() % 200) as usize + if round % 3 == 0 { 2900 } else { 0 };
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often keep a plausible IPv4/TCP start so that deeper code runs.
            if round % 2 == 0 {
                let keep = p.len().min(good.len()).min((next() % 60) as usize);
                p[..keep].copy_from_slice(&good[..keep]);
            }
            let mss = (next() % 3000) as usize;
            let _ = tcp_segments(&p, mss, |h, r| {
                assert!(h.len() <= MAX_HEADERS && r.end <= p.len());
            });
            let _ = complete_checksum(&mut p, (next() % 80) as usize, (next() % 40) as usize);
            if let Some(seg) = Coalescer::candidate(&p) {
                let mut c = Coalescer::default();
                c.start(seg, p.len());
                let _ = c.accepts(&good, &seg, &p);
                let _ = c.finish(&mut p);
            }
            let _ = oversized_tcp_gso(&mut p, (next() % 2000) as usize);
            let _ = VnetHdr::parse(&p);
        }
    }
}
