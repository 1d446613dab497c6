//! The agent's copy of the BGP best paths: prefix → next hop, as compact as the common case
//! allows.
//!
//! Every full re-plan (a datastore or interface change) needs the next hop of every learned
//! prefix, so the agent keeps them. Nearly all are IPv4 prefixes via IPv4 next hops: those are
//! held in 9 bytes per entry (`Ipv4Net` → `Ipv4Addr`), the rest (IPv6, and mixed families,
//! which the plan ignores with a warning) in a [`PrefixMap`] of `IpAddr`.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::prefix_map::{PackedBTreeMap, PrefixMap};

/// Best next hop per prefix; see the module doc.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BestPaths {
    v4: PackedBTreeMap<Ipv4Net, Ipv4Addr>,
    other: PrefixMap<IpAddr>,
}

impl BestPaths {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, prefix: &IpNet) -> Option<IpAddr> {
        if let IpNet::V4(p) = prefix
            && let Some(nh) = self.v4.get(p)
        {
            return Some(IpAddr::V4(*nh));
        }
        self.other.get(prefix).copied()
    }

    pub fn insert(&mut self, prefix: IpNet, next_hop: IpAddr) {
        match (prefix, next_hop) {
            (IpNet::V4(p), IpAddr::V4(nh)) => {
                self.other.remove(&prefix);
                self.v4.insert(p, nh);
            }
            _ => {
                if let IpNet::V4(p) = prefix {
                    self.v4.remove(&p);
                }
                self.other.insert(prefix, next_hop);
            }
        }
    }

    pub fn remove(&mut self, prefix: &IpNet) {
        if let IpNet::V4(p) = prefix {
            self.v4.remove(p);
        }
        self.other.remove(prefix);
    }

    /// Every (prefix, next hop) in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, IpAddr)> + '_ {
        let mut v4 = self
            .v4
            .iter()
            .map(|(p, nh)| (IpNet::V4(*p), IpAddr::V4(*nh)))
            .peekable();
        let mut other = self.other.iter().map(|(p, nh)| (p, *nh)).peekable();
        // A prefix is in one of the two: merge by prefix.
        std::iter::from_fn(move || match (v4.peek(), other.peek()) {
            (Some(a), Some(b)) if a.0 < b.0 => v4.next(),
            (Some(_), Some(_)) | (None, Some(_)) => other.next(),
            (Some(_), None) => v4.next(),
            (None, None) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_like_a_btreemap_of_prefix_to_next_hop() {
        let prefixes = [
            "10.0.0.0/26",
            "10.0.0.64/26",
            "10.0.1.0/24",
            "fd00::/64",
            "0.0.0.0/0",
        ];
        let hops = ["192.168.0.1", "fd00::1", "192.168.0.2"];
        let mut paths = BestPaths::new();
        let mut reference: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        // Every prefix through every next hop (switching families), with removals between.
        for (step, (p, h)) in prefixes
            .iter()
            .flat_map(|p| hops.iter().map(move |h| (p, h)))
            .enumerate()
        {
            let prefix: IpNet = p.parse().unwrap();
            let hop: IpAddr = h.parse().unwrap();
            paths.insert(prefix, hop);
            reference.insert(prefix, hop);
            if step % 4 == 3 {
                paths.remove(&prefix);
                reference.remove(&prefix);
            }
            assert_eq!(paths.len(), reference.len());
            let got: Vec<(IpNet, IpAddr)> = paths.iter().collect();
            let want: Vec<(IpNet, IpAddr)> = reference.iter().map(|(p, h)| (*p, *h)).collect();
            assert_eq!(got, want, "after step {step}");
            for p in prefixes {
                let p: IpNet = p.parse().unwrap();
                assert_eq!(paths.get(&p), reference.get(&p).copied());
            }
        }
    }
}
