//! A map keyed by IP prefix that holds IPv4 prefixes in 5 bytes instead of 18.
//!
//! `IpNet` is as large as its IPv6 variant (18 bytes), and a table of 100,000 IPv4 routes
//! keyed by it spends most of its key bytes on nothing. [`PrefixMap`] keeps one ordered map per
//! family (`Ipv4Net` keys for IPv4) and shows both as one map in `IpNet` order (every IPv4
//! prefix before every IPv6 one, as `IpNet`'s own order has it).
//!
//! Both tables are [`PackedBTreeMap`]s (kept full as routes arrive in key order).

use std::ops::Bound;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use podroute_bgp::packed_btree::PackedBTreeMap;

/// An ordered map from IP prefix to `V`; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMap<V> {
    v4: PackedBTreeMap<Ipv4Net, V>,
    v6: PackedBTreeMap<Ipv6Net, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        Self {
            v4: PackedBTreeMap::default(),
            v6: PackedBTreeMap::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn get(&self, key: &IpNet) -> Option<&V> {
        match key {
            IpNet::V4(k) => self.v4.get(k),
            IpNet::V6(k) => self.v6.get(k),
        }
    }

    pub fn get_mut(&mut self, key: &IpNet) -> Option<&mut V> {
        match key {
            IpNet::V4(k) => self.v4.get_mut(k),
            IpNet::V6(k) => self.v6.get_mut(k),
        }
    }

    pub fn contains_key(&self, key: &IpNet) -> bool {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: IpNet, value: V) -> Option<V> {
        match key {
            IpNet::V4(k) => self.v4.insert(k, value),
            IpNet::V6(k) => self.v6.insert(k, value),
        }
    }

    pub fn remove(&mut self, key: &IpNet) -> Option<V> {
        match key {
            IpNet::V4(k) => self.v4.remove(k),
            IpNet::V6(k) => self.v6.remove(k),
        }
    }

    /// Every entry in `IpNet` order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        self.iter_after(None)
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.v4.values().chain(self.v6.values())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.v4.values_mut().chain(self.v6.values_mut())
    }

    /// The values in key order, consuming the map.
    pub fn into_values(self) -> impl Iterator<Item = V> {
        self.v4.into_values().chain(self.v6.into_values())
    }

    /// The entries after `after` (all of them for `None`), in `IpNet` order.
    pub fn iter_after(&self, after: Option<IpNet>) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        // After an IPv6 prefix no IPv4 one is left.
        let v4_from = match after {
            None => Some(Bound::Unbounded),
            Some(IpNet::V4(k)) => Some(Bound::Excluded(k)),
            Some(IpNet::V6(_)) => None,
        };
        let v6_from = match after {
            Some(IpNet::V6(k)) => Bound::Excluded(k),
            _ => Bound::Unbounded,
        };
        let v4 = v4_from
            .map(|from| self.v4.range((from, Bound::Unbounded)))
            .into_iter()
            .flatten()
            .map(|(k, v)| (IpNet::V4(*k), v));
        let v6 = self
            .v6
            .range((v6_from, Bound::Unbounded))
            .map(|(k, v)| (IpNet::V6(*k), v));
        v4.chain(v6)
    }

    /// Keeps the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, &mut V) -> bool) {
        self.v4.retain(|k, v| keep(IpNet::V4(*k), v));
        self.v6.retain(|k, v| keep(IpNet::V6(*k), v));
    }
}

impl<V> FromIterator<(IpNet, V)> for PrefixMap<V> {
    fn from_iter<T: IntoIterator<Item = (IpNet, V)>>(iter: T) -> Self {
        let mut map = Self::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn behaves_like_a_btreemap_of_ipnet() {
        let keys = [
            "fd00::/64",
            "10.0.0.0/26",
            "10.0.0.0/24",
            "0.0.0.0/0",
            "::/0",
            "192.168.0.1/32",
            "fd00::1/128",
        ];
        let mut map = PrefixMap::new();
        let mut reference = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.insert(net(k), i), reference.insert(net(k), i));
        }
        assert_eq!(map.insert(net("10.0.0.0/24"), 99), Some(2));
        reference.insert(net("10.0.0.0/24"), 99);
        assert_eq!(map.len(), reference.len());
        let got: Vec<(IpNet, usize)> = map.iter().map(|(k, v)| (k, *v)).collect();
        let want: Vec<(IpNet, usize)> = reference.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got, want, "IpNet order");
        let afters = [
            None,
            Some(net("10.0.0.0/24")),
            Some(net("255.0.0.0/8")),
            Some(net("::/0")),
            Some(net("fd00::1/128")),
        ];
        for after in afters {
            let got: Vec<IpNet> = map.iter_after(after).map(|(k, _)| k).collect();
            let want: Vec<IpNet> = reference
                .keys()
                .filter(|k| after.is_none_or(|a| **k > a))
                .copied()
                .collect();
            assert_eq!(got, want, "after {after:?}");
        }
        assert_eq!(map.remove(&net("fd00::/64")), Some(0));
        assert!(!map.contains_key(&net("fd00::/64")));
        map.retain(|k, _| k.addr().is_ipv4());
        assert_eq!(map.len(), 4);
        assert_eq!(map.get(&net("192.168.0.1/32")), Some(&5));
        let values: Vec<usize> = map.into_values().collect();
        assert_eq!(values, vec![3, 99, 1, 5]);
    }
}
