//! The BGP router ID, as calico/node chooses it (`CALICO_ROUTER_ID`): the node's IPv4
//! address by default; `hash` for a stable ID derived from the node name (what IPv6-only
//! nodes use, having no IPv4 address); or an explicit ID in IPv4 form.

use std::net::Ipv4Addr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// `CALICO_ROUTER_ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterIdChoice {
    /// Unset: the node's IPv4 address (on an IPv6-only node, [`RouterIdChoice::Hash`]).
    #[default]
    NodeAddress,
    /// `hash`: [`hash_router_id`] of the node name.
    Hash,
    /// An explicit ID in IPv4 form.
    Explicit(Ipv4Addr),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouterIdError {
    #[error(
        "CALICO_ROUTER_ID={0:?} is neither `hash` nor a router ID in IPv4 form (e.g. 10.0.0.5); \
         0.0.0.0 is not a valid router ID"
    )]
    Bad(String),
}

impl FromStr for RouterIdChoice {
    type Err = RouterIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let t = text.trim();
        if t.is_empty() {
            return Ok(RouterIdChoice::NodeAddress);
        }
        if t.eq_ignore_ascii_case("hash") {
            return Ok(RouterIdChoice::Hash);
        }
        match t.parse::<Ipv4Addr>() {
            Ok(id) if !id.is_unspecified() => Ok(RouterIdChoice::Explicit(id)),
            _ => Err(RouterIdError::Bad(text.to_string())),
        }
    }
}

/// Calico's `hashToIPv4` (confd's template function): the first four bytes of SHA-256 of
/// the node name, the first one moved out of the multicast/reserved range (> 223 → − 32).
pub fn hash_router_id(node_name: &str) -> Ipv4Addr {
    let digest = Sha256::digest(node_name.as_bytes());
    let [a, b, c, d] = [digest[0], digest[1], digest[2], digest[3]];
    let a = if a > 223 { a - 32 } else { a };
    Ipv4Addr::new(a, b, c, d)
}

/// The router ID for node `node_name` with IPv4 address `ipv4` (none on an IPv6-only node).
pub fn router_id(choice: RouterIdChoice, node_name: &str, ipv4: Option<Ipv4Addr>) -> Ipv4Addr {
    match (choice, ipv4) {
        (RouterIdChoice::Explicit(id), _) => id,
        (RouterIdChoice::NodeAddress, Some(ip)) => ip,
        (RouterIdChoice::Hash, _) | (RouterIdChoice::NodeAddress, None) => {
            hash_router_id(node_name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_calicos_sha256_prefix_out_of_the_class_d_range() {
        // Reference values: sha256(name)[..4], computed independently (Python hashlib).
        assert_eq!(hash_router_id("master01"), Ipv4Addr::new(183, 242, 83, 136));
        assert_eq!(hash_router_id("node01"), Ipv4Addr::new(5, 91, 198, 229));
        // sha256("node05") starts with 229: moved down to 197.
        assert_eq!(hash_router_id("node05"), Ipv4Addr::new(197, 207, 114, 93));
        assert_eq!(hash_router_id("node01"), hash_router_id("node01"), "stable");
    }

    #[test]
    fn choice_and_resolution() {
        let addr = Ipv4Addr::new(10, 0, 0, 5);
        let v4 = Some(addr);
        assert_eq!("".parse(), Ok(RouterIdChoice::NodeAddress));
        assert_eq!("HASH".parse(), Ok(RouterIdChoice::Hash));
        assert_eq!(
            "192.0.2.7".parse(),
            Ok(RouterIdChoice::Explicit(Ipv4Addr::new(192, 0, 2, 7)))
        );
        for bad in ["0.0.0.0", "fd00::1", "random"] {
            assert!(bad.parse::<RouterIdChoice>().is_err(), "{bad}");
        }
        assert_eq!(router_id(RouterIdChoice::NodeAddress, "node01", v4), addr);
        assert_eq!(
            router_id(RouterIdChoice::NodeAddress, "node01", None),
            hash_router_id("node01"),
            "an IPv6-only node hashes its name"
        );
        assert_eq!(
            router_id(RouterIdChoice::Hash, "node01", v4),
            hash_router_id("node01")
        );
        assert_eq!(
            router_id(
                RouterIdChoice::Explicit(Ipv4Addr::new(1, 2, 3, 4)),
                "x",
                None
            ),
            Ipv4Addr::new(1, 2, 3, 4)
        );
    }
}
