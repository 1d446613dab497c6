//! IPv4-in-IPv4 (RFC 2003) header handling: building the outer header in front of an inner
//! packet, and checking a received packet before its inner packet is handed to the kernel.
//!
//! Pure functions over byte slices; nothing here panics on malformed input.
//!
//! Encapsulation rules (RFC 2003 §3.1, chosen where the RFC leaves a choice):
//! - outer TTL = [`OUTER_TTL`] (64, the IP default TTL; the kernel's fallback `tunl0` would
//!   inherit the inner TTL instead; both interoperate);
//! - outer TOS = inner TOS (DSCP and ECN copied, RFC 2003 and RFC 6040 normal mode);
//! - outer DF = inner DF: a packet its sender allows to be fragmented may be fragmented on the
//!   underlay; one with DF set stays unfragmented end to end;
//! - outer identification 0: the kernel picks one when it sends the header (`IP_HDRINCL`),
//!   and it also fills in the header checksum and total length.
//!
//! Decapsulation (RFC 6040 §4.2): outer CE with an ECN-capable inner packet marks the inner
//! packet CE; outer CE with a not-ECN-capable inner packet is dropped.

use std::net::Ipv4Addr;
use std::ops::Range;

use super::table::TunnelTable;

/// Length of the outer IPv4 header podroute writes (no options).
pub const OUTER_HEADER_LEN: usize = 20;
/// Outer TTL of encapsulated packets.
pub const OUTER_TTL: u8 = 64;
/// IP protocol number of IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// Largest IPv4 packet.
pub const MAX_PACKET: usize = 65_535;

const DF: u8 = 0x40;
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;
const ECN_NOT_ECT: u8 = 0x00;

/// Why a packet was dropped. [`label`](Self::label) is the metrics `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// From the TUN device: not an IPv4 packet (e.g. IPv6 neighbour discovery).
    NotIpv4,
    /// From the TUN device: no remote block covers the inner destination.
    NoRoute,
    /// From the TUN device: the packet plus the outer header exceeds 65535 bytes or the
    /// path MTU (`EMSGSIZE`).
    TooBig,
    /// The raw socket refused the encapsulated packet (unreachable node, buffer full, ...).
    SendError,
    /// Received: the outer source is not a known node.
    UnknownSource,
    /// Received: malformed outer header.
    BadOuterHeader,
    /// Received: truncated inner packet, version not 4, bad IHL, total length not matching
    /// the outer payload, or bad header checksum.
    BadInnerHeader,
    /// Received: inner source or destination outside every IPv4 pool.
    OutsidePool,
    /// Received: outer ECN CE with a not-ECN-capable inner packet (RFC 6040).
    EcnCeNotEct,
    /// Writing the inner packet to the TUN device failed.
    TunWriteError,
}

impl DropReason {
    /// Every reason, in label order of the metrics reference.
    pub const ALL: [DropReason; 10] = [
        DropReason::NotIpv4,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::SendError,
        DropReason::UnknownSource,
        DropReason::BadOuterHeader,
        DropReason::BadInnerHeader,
        DropReason::OutsidePool,
        DropReason::EcnCeNotEct,
        DropReason::TunWriteError,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::SendError => "send_error",
            DropReason::UnknownSource => "unknown_source",
            DropReason::BadOuterHeader => "bad_outer_header",
            DropReason::BadInnerHeader => "bad_inner_header",
            DropReason::OutsidePool => "outside_pool",
            DropReason::EcnCeNotEct => "ecn_ce_not_ect",
            DropReason::TunWriteError => "tun_write_error",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }
}

fn addr_at(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

/// The Internet checksum of `header` (its checksum field included).
pub fn header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = header.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The destination of an IPv4 packet read from the TUN device.
pub fn inner_destination(packet: &[u8]) -> Result<Ipv4Addr, DropReason> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    Ok(addr_at(packet, 16))
}

/// Writes the outer header into `buf[..20]` for the inner packet in `buf[20..]`.
/// `buf[20..]` must hold at least 20 bytes (checked by [`inner_destination`]).
pub fn write_outer_header(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), DropReason> {
    let total = buf.len();
    if total < 2 * OUTER_HEADER_LEN {
        return Err(DropReason::NotIpv4);
    }
    let (outer, inner) = buf.split_at_mut(OUTER_HEADER_LEN);
    let outer: &mut [u8; OUTER_HEADER_LEN] = outer.try_into().expect("20 bytes");
    outer_header(outer, inner, total, src, dst)
}

/// Writes the outer header for an encapsulated packet of `total` bytes (outer header
/// included) whose inner header starts with `inner` (at least 20 bytes).
pub fn outer_header(
    h: &mut [u8; OUTER_HEADER_LEN],
    inner: &[u8],
    total: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Result<(), DropReason> {
    if total > MAX_PACKET {
        return Err(DropReason::TooBig);
    }
    if inner.len() < 20 {
        return Err(DropReason::NotIpv4);
    }
    h[0] = 0x45;
    h[1] = inner[1];
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&[0, 0]);
    h[6] = inner[6] & DF;
    h[7] = 0;
    h[8] = OUTER_TTL;
    h[9] = IPPROTO_IPIP;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = header_checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The outer source of a received IPIP packet, if the header is sane.
pub fn outer_source(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4).then(|| addr_at(packet, 12))
}

/// Checks a received packet (outer IPv4 header + inner packet, as a raw socket delivers it)
/// and returns the range of the inner packet, ready to be written to the TUN device. May
/// rewrite the inner ECN field (and its checksum) per RFC 6040.
pub fn decapsulate(packet: &mut [u8], table: &TunnelTable) -> Result<Range<usize>, DropReason> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(DropReason::BadOuterHeader);
    }
    let outer_len = usize::from(packet[0] & 0x0f) * 4;
    if outer_len < 20 || outer_len > packet.len() || packet[9] != IPPROTO_IPIP {
        return Err(DropReason::BadOuterHeader);
    }
    if !table.is_known_node(addr_at(packet, 12)) {
        return Err(DropReason::UnknownSource);
    }
    let outer_ecn = packet[1] & ECN_MASK;
    let inner = &mut packet[outer_len..];
    check_inner(inner)?;
    if !table.in_pool(addr_at(inner, 12)) || !table.in_pool(addr_at(inner, 16)) {
        return Err(DropReason::OutsidePool);
    }
    if outer_ecn == ECN_CE {
        match inner[1] & ECN_MASK {
            ECN_NOT_ECT => return Err(DropReason::EcnCeNotEct),
            ECN_CE => {}
            _ => {
                inner[1] |= ECN_CE;
                let ihl = usize::from(inner[0] & 0x0f) * 4;
                inner[10..12].copy_from_slice(&[0, 0]);
                let sum = header_checksum(&inner[..ihl]);
                inner[10..12].copy_from_slice(&sum.to_be_bytes());
            }
        }
    }
    Ok(outer_len..packet.len())
}

/// Header checks of an inner packet: at least 20 bytes, version 4, 5 <= IHL <= length,
/// total length equal to the bytes present, valid header checksum.
pub fn check_inner(inner: &[u8]) -> Result<(), DropReason> {
    if inner.len() < 20 || inner[0] >> 4 != 4 {
        return Err(DropReason::BadInnerHeader);
    }
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    if ihl < 20 || ihl > inner.len() {
        return Err(DropReason::BadInnerHeader);
    }
    let total = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    if total != inner.len() {
        return Err(DropReason::BadInnerHeader);
    }
    if header_checksum(&inner[..ihl]) != 0 {
        return Err(DropReason::BadInnerHeader);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid IPv4/UDP packet from `src` to `dst` with `payload` bytes of payload.
    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
        let total = 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = DF;
        p[8] = 63;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let sum = header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn table() -> TunnelTable {
        TunnelTable::new(
            vec![(
                "172.16.196.128/26".parse().unwrap(),
                "192.168.93.130".parse().unwrap(),
            )],
            vec!["192.168.92.128".parse().unwrap()],
            vec!["172.16.0.0/16".parse().unwrap()],
        )
    }

    /// The inner packet (any bytes) wrapped by a node at `outer_src`.
    fn wrapped(outer_src: [u8; 4], inner: &[u8]) -> Vec<u8> {
        let total = 20 + inner.len();
        let mut buf = vec![0x45, 0];
        buf.extend_from_slice(&(total as u16).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 0, OUTER_TTL, 4, 0, 0]);
        buf.extend_from_slice(&outer_src);
        buf.extend_from_slice(&[192, 168, 93, 130]);
        let sum = header_checksum(&buf);
        buf[10..12].copy_from_slice(&sum.to_be_bytes());
        buf.extend_from_slice(inner);
        buf
    }

    fn encapsulated(inner: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 20];
        buf.extend_from_slice(inner);
        write_outer_header(
            &mut buf,
            Ipv4Addr::new(192, 168, 92, 128),
            Ipv4Addr::new(192, 168, 93, 130),
        )
        .unwrap();
        buf
    }

    fn fix_checksum(p: &mut [u8]) {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        p[10..12].copy_from_slice(&[0, 0]);
        let sum = header_checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn outer_header_follows_the_rules() {
        let mut inner = ipv4([172, 16, 241, 65], [172, 16, 196, 129], 100);
        inner[1] = 0xb8 | 0x02; // DSCP EF, ECT(0)
        fix_checksum(&mut inner);
        let buf = encapsulated(&inner);
        assert_eq!(buf.len(), 140);
        assert_eq!(buf[0], 0x45);
        assert_eq!(buf[1], 0xba, "TOS copied");
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 140);
        assert_eq!(buf[6] & DF, DF, "DF copied");
        assert_eq!(buf[8], OUTER_TTL);
        assert_eq!(buf[9], 4);
        assert_eq!(&buf[12..16], &[192, 168, 92, 128]);
        assert_eq!(&buf[16..20], &[192, 168, 93, 130]);
        assert_eq!(header_checksum(&buf[..20]), 0);
        assert_eq!(&buf[20..], &inner[..]);

        let mut no_df = inner.clone();
        no_df[6] = 0;
        fix_checksum(&mut no_df);
        assert_eq!(encapsulated(&no_df)[6], 0, "no DF inside, none outside");
    }

    #[test]
    fn oversized_packets_are_refused() {
        let mut buf = vec![0u8; MAX_PACKET + 1];
        buf[20] = 0x45;
        assert_eq!(
            write_outer_header(&mut buf, Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST),
            Err(DropReason::TooBig)
        );
        let mut short = vec![0u8; 30];
        assert_eq!(
            write_outer_header(&mut short, Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST),
            Err(DropReason::NotIpv4)
        );
    }

    #[test]
    fn tun_packets_need_ipv4() {
        let p = ipv4([172, 16, 241, 65], [172, 16, 196, 129], 0);
        assert_eq!(inner_destination(&p), Ok(Ipv4Addr::new(172, 16, 196, 129)));
        assert_eq!(inner_destination(&p[..19]), Err(DropReason::NotIpv4));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        assert_eq!(inner_destination(&v6), Err(DropReason::NotIpv4));
        assert_eq!(inner_destination(&[]), Err(DropReason::NotIpv4));
    }

    #[test]
    fn valid_packet_is_decapsulated() {
        let inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 64);
        let mut buf = encapsulated(&inner);
        let range = decapsulate(&mut buf, &table()).unwrap();
        assert_eq!(&buf[range], &inner[..]);
        let mut buf = wrapped([192, 168, 92, 128], &inner);
        let range = decapsulate(&mut buf, &table()).unwrap();
        assert_eq!(&buf[range], &inner[..]);
    }

    #[test]
    fn outer_options_are_skipped() {
        let inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        let mut buf = vec![0x46, 0, 0, 0, 0, 0, 0, 0, 64, 4, 0, 0, 192, 168, 92, 128];
        buf.extend_from_slice(&[192, 168, 93, 130, 1, 1, 1, 0]);
        buf.extend_from_slice(&inner);
        let range = decapsulate(&mut buf, &table()).unwrap();
        assert_eq!(range.start, 24);
        assert_eq!(&buf[range], &inner[..]);
    }

    #[test]
    fn unknown_source_is_dropped() {
        let inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        let mut buf = wrapped([192, 168, 92, 99], &inner);
        assert_eq!(
            decapsulate(&mut buf, &table()),
            Err(DropReason::UnknownSource)
        );
        // The gateway of a remote block is a known node too.
        let mut buf = wrapped([192, 168, 93, 130], &inner);
        assert!(decapsulate(&mut buf, &table()).is_ok());
    }

    #[test]
    fn bad_outer_headers_are_dropped() {
        let inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        let good = wrapped([192, 168, 92, 128], &inner);
        let t = table();
        for (what, mutate) in [
            (
                "truncated",
                Box::new(|b: &mut Vec<u8>| b.truncate(19)) as Box<dyn Fn(&mut Vec<u8>)>,
            ),
            ("version 6", Box::new(|b: &mut Vec<u8>| b[0] = 0x65)),
            ("IHL 4", Box::new(|b: &mut Vec<u8>| b[0] = 0x44)),
            (
                "IHL past the end",
                Box::new(|b: &mut Vec<u8>| {
                    b.truncate(40);
                    b[0] = 0x4f;
                }),
            ),
            ("protocol 41", Box::new(|b: &mut Vec<u8>| b[9] = 41)),
        ] {
            let mut b = good.clone();
            mutate(&mut b);
            assert_eq!(
                decapsulate(&mut b, &t),
                Err(DropReason::BadOuterHeader),
                "{what}"
            );
        }
    }

    #[test]
    fn bad_inner_headers_are_dropped() {
        let inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        let t = table();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", inner[..19].to_vec()),
            ("version 6", {
                let mut p = inner.clone();
                p[0] = 0x65;
                fix_checksum(&mut p);
                p
            }),
            ("IHL 4", {
                let mut p = inner.clone();
                p[0] = 0x44;
                p
            }),
            ("IHL past the end", {
                let mut p = inner.clone();
                p[0] = 0x4f;
                p
            }),
            ("total length too long", {
                let mut p = inner.clone();
                p[2..4].copy_from_slice(&29u16.to_be_bytes());
                fix_checksum(&mut p);
                p
            }),
            ("total length too short", {
                let mut p = inner.clone();
                p[2..4].copy_from_slice(&27u16.to_be_bytes());
                fix_checksum(&mut p);
                p
            }),
            ("trailing bytes", {
                let mut p = inner.clone();
                p.push(0);
                p
            }),
            ("bad checksum", {
                let mut p = inner.clone();
                p[8] ^= 1;
                p
            }),
        ];
        for (what, bad) in cases {
            let mut b = wrapped([192, 168, 92, 128], &bad);
            assert_eq!(
                decapsulate(&mut b, &t),
                Err(DropReason::BadInnerHeader),
                "{what}"
            );
        }
    }

    #[test]
    fn inner_addresses_must_be_in_a_pool() {
        let t = table();
        for (src, dst) in [
            ([10, 0, 0, 1], [172, 16, 241, 65]),
            ([172, 16, 196, 129], [10, 0, 0, 1]),
            ([172, 17, 0, 1], [172, 16, 241, 65]),
        ] {
            let mut b = wrapped([192, 168, 92, 128], &ipv4(src, dst, 8));
            assert_eq!(
                decapsulate(&mut b, &t),
                Err(DropReason::OutsidePool),
                "{src:?} -> {dst:?}"
            );
        }
    }

    #[test]
    fn congestion_experienced_is_propagated_or_dropped() {
        let t = table();
        let mut inner = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        inner[1] = 0x01; // ECT(1)
        fix_checksum(&mut inner);
        let mut b = wrapped([192, 168, 92, 128], &inner);
        b[1] = 0x03; // CE on the way
        let r = decapsulate(&mut b, &t).unwrap();
        assert_eq!(b[r.start + 1] & ECN_MASK, ECN_CE);
        assert_eq!(header_checksum(&b[r.start..r.start + 20]), 0);
        assert!(check_inner(&b[r]).is_ok());

        let plain = ipv4([172, 16, 196, 129], [172, 16, 241, 65], 8);
        let mut b = wrapped([192, 168, 92, 128], &plain);
        b[1] = 0x03;
        assert_eq!(decapsulate(&mut b, &t), Err(DropReason::EcnCeNotEct));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let t = table();
        let mut seed = 0x1234_5678u32;
        for len in 0..200 {
            for _ in 0..20 {
                let mut b: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        seed as u8
                    })
                    .collect();
                if len > 0 {
                    b[0] = 0x45;
                }
                if len > 9 {
                    b[9] = 4;
                }
                let _ = decapsulate(&mut b, &t);
                let _ = inner_destination(&b);
            }
        }
    }
}
