//! CIDR parsing shared by pools, blocks and affinities.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::error::Reason;

/// Parses `a.b.c.d/len` (or IPv6) and requires the host bits to be zero.
pub fn parse_masked_cidr(text: &str) -> Result<IpNet, Reason> {
    let net: IpNet = text.trim().parse().map_err(|_| Reason::CidrUnparseable {
        value: text.to_string(),
    })?;
    let masked = net.trunc();
    if masked != net {
        return Err(Reason::CidrNotMasked {
            value: net.to_string(),
            masked: masked.to_string(),
        });
    }
    Ok(net)
}

/// The CIDR that Calico encodes in an IPAMBlock's name: `172-16-196-128-26` is
/// 172.16.196.128/26, `fd00-10-244----122` style names are IPv6 with `:` written as `-`.
pub fn cidr_from_block_name(name: &str) -> Option<IpNet> {
    let (addr, prefix) = name.rsplit_once('-')?;
    let prefix: u8 = prefix.parse().ok()?;
    let v4 = addr.replace('-', ".");
    if let Ok(ip) = v4.parse::<Ipv4Addr>() {
        return IpNet::new(IpAddr::V4(ip), prefix).ok();
    }
    let v6 = addr.replace('-', ":");
    let ip = v6.parse::<Ipv6Addr>().ok()?;
    IpNet::new(IpAddr::V6(ip), prefix).ok()
}

/// The `index`-th address of `net` (no bounds check against the prefix).
pub fn nth_address(net: &IpNet, index: u32) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) => u32::from(n.network())
            .checked_add(index)
            .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        IpNet::V6(n) => u128::from(n.network())
            .checked_add(u128::from(index))
            .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_decode_to_cidrs() {
        assert_eq!(
            cidr_from_block_name("172-16-196-128-26"),
            Some("172.16.196.128/26".parse().unwrap())
        );
        assert_eq!(
            cidr_from_block_name("fd00-10-244---122"),
            Some("fd00:10:244::/122".parse().unwrap())
        );
        assert_eq!(cidr_from_block_name("node01"), None);
        assert_eq!(cidr_from_block_name("172-16-196-128"), None);
    }

    #[test]
    fn masked_cidr_rules() {
        assert_eq!(
            parse_masked_cidr("172.16.0.0/16").unwrap(),
            "172.16.0.0/16".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_masked_cidr("172.16.0.1/16").unwrap_err().to_string(),
            "cidr 172.16.0.1/16 has host bits set; write the network address 172.16.0.0/16"
        );
        assert_eq!(
            parse_masked_cidr("172.16.0.0").unwrap_err().to_string(),
            "cidr \"172.16.0.0\" is not a valid CIDR (expected e.g. 172.16.0.0/16)"
        );
    }
}
