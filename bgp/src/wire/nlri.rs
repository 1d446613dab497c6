//! Address families (RFC 4760) and the prefix encoding shared by NLRI, Withdrawn Routes,
//! MP_REACH_NLRI and MP_UNREACH_NLRI (RFC 4271 §4.3):
//!
//! ```text
//! +---------------------------+
//! |   Length (1 octet, bits)  |
//! +---------------------------+
//! |   Prefix (ceil(Length/8)) |
//! +---------------------------+
//! ```

use bytes::{BufMut, BytesMut};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// An (AFI, SAFI) pair. Unknown families are representable so capabilities round-trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family {
    pub afi: u16,
    pub safi: u8,
}

impl Family {
    pub const IPV4_UNICAST: Family = Family { afi: 1, safi: 1 };
    pub const IPV6_UNICAST: Family = Family { afi: 2, safi: 1 };

    pub fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::IPV4_UNICAST,
            IpNet::V6(_) => Family::IPV6_UNICAST,
        }
    }

    /// Whether podroute can carry routes of this family.
    pub fn is_supported(self) -> bool {
        self == Family::IPV4_UNICAST || self == Family::IPV6_UNICAST
    }

    /// Maximum prefix length in bits for the family's AFI, if known.
    pub fn max_len(self) -> Option<u8> {
        match self.afi {
            1 => Some(32),
            2 => Some(128),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.afi, self.safi) {
            (1, 1) => f.write_str("ipv4-unicast"),
            (2, 1) => f.write_str("ipv6-unicast"),
            (afi, safi) => write!(f, "afi {afi}/safi {safi}"),
        }
    }
}

/// Why a prefix field could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixError {
    /// The length octet is larger than the address size.
    BadLength(u8),
    /// The field ends inside a prefix.
    Truncated,
    /// The family is not IPv4 or IPv6.
    UnsupportedFamily,
}

/// Decode a run of prefixes of one family, appending to `out`.
///
/// Host bits beyond the prefix length are cleared (RFC 4271 says trailing bits are
/// irrelevant), so `10.0.0.1/24` on the wire becomes `10.0.0.0/24`.
pub fn decode_prefixes(
    family: Family,
    mut buf: &[u8],
    out: &mut Vec<IpNet>,
) -> Result<(), PrefixError> {
    let max = family.max_len().ok_or(PrefixError::UnsupportedFamily)?;
    // Room for the field as typically packed (/24-/26 IPv4: 4-5 octets, /64-/122 IPv6: 9-17),
    // so a full UPDATE does not regrow the vector a dozen times.
    out.reserve(buf.len() / if max == 32 { 5 } else { 9 });
    while let Some((&len, rest)) = buf.split_first() {
        if len > max {
            return Err(PrefixError::BadLength(len));
        }
        let n = (len as usize).div_ceil(8);
        if rest.len() < n {
            return Err(PrefixError::Truncated);
        }
        let (bytes, rest) = rest.split_at(n);
        let net = if max == 32 {
            let mut a = [0u8; 4];
            a[..n].copy_from_slice(bytes);
            IpNet::V4(v4_net(u32::from_be_bytes(a), len))
        } else {
            let mut a = [0u8; 16];
            a[..n].copy_from_slice(bytes);
            IpNet::V6(v6_net(u128::from_be_bytes(a), len))
        };
        out.push(net);
        buf = rest;
    }
    Ok(())
}

fn v4_net(addr: u32, len: u8) -> Ipv4Net {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    // `len <= 32` was checked by the caller, so `new` cannot fail; fall back defensively.
    Ipv4Net::new(Ipv4Addr::from(addr & mask), len).unwrap_or_default()
}

fn v6_net(addr: u128, len: u8) -> Ipv6Net {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    Ipv6Net::new(Ipv6Addr::from(addr & mask), len).unwrap_or_default()
}

/// Encode one prefix (length octet and the significant octets).
pub fn encode_prefix(prefix: &IpNet, out: &mut BytesMut) {
    let len = prefix.prefix_len();
    let n = (len as usize).div_ceil(8);
    out.put_u8(len);
    match prefix {
        IpNet::V4(p) => out.put_slice(&p.network().octets()[..n]),
        IpNet::V6(p) => out.put_slice(&p.network().octets()[..n]),
    }
}

/// Encoded size of one prefix.
pub fn prefix_wire_len(prefix: &IpNet) -> usize {
    1 + (prefix.prefix_len() as usize).div_ceil(8)
}
