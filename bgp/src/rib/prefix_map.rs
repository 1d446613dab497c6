//! Compact containers for per-prefix state, where almost all of the RIB's memory goes.
//!
//! - [`PrefixMap`] keys IPv4 and IPv6 prefixes in separate tables: an `IpNet` key takes 18
//!   bytes, an `Ipv4Net` 5, so a pod network's IPv4 routes cost less per entry. The tables
//!   are B-trees kept full ([`PackedBTreeMap`]): at 100,000 /26 routes about 2.3 MB where a
//!   hash table took 3.3 MB (131,072 buckets of 24 bytes), and no second table while one
//!   grows.
//! - [`Paths`] holds a prefix's candidate paths, best first, with the usual single path inline
//!   (16 bytes, no heap allocation per prefix) and a boxed vector only when there are more.

use super::{Candidate, PeerId};
use crate::packed_btree::PackedBTreeMap;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A map from prefixes to `V`, one table per family.
#[derive(Debug)]
pub(crate) struct PrefixMap<V> {
    v4: PackedBTreeMap<Ipv4Net, V>,
    v6: PackedBTreeMap<Ipv6Net, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: PackedBTreeMap::default(),
            v6: PackedBTreeMap::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn get(&self, prefix: &IpNet) -> Option<&V> {
        match prefix {
            IpNet::V4(p) => self.v4.get(p),
            IpNet::V6(p) => self.v6.get(p),
        }
    }

    pub fn get_mut(&mut self, prefix: &IpNet) -> Option<&mut V> {
        match prefix {
            IpNet::V4(p) => self.v4.get_mut(p),
            IpNet::V6(p) => self.v6.get_mut(p),
        }
    }

    pub fn insert(&mut self, prefix: IpNet, v: V) -> Option<V> {
        match prefix {
            IpNet::V4(p) => self.v4.insert(p, v),
            IpNet::V6(p) => self.v6.insert(p, v),
        }
    }

    pub fn remove(&mut self, prefix: &IpNet) -> Option<V> {
        match prefix {
            IpNet::V4(p) => self.v4.remove(p),
            IpNet::V6(p) => self.v6.remove(p),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        let v4 = self.v4.iter().map(|(p, v)| (IpNet::V4(*p), v));
        let v6 = self.v6.iter().map(|(p, v)| (IpNet::V6(*p), v));
        v4.chain(v6)
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.iter().map(|(p, _)| p)
    }
}

/// The candidate paths of one prefix (never empty), best first.
#[derive(Clone, Debug)]
pub(crate) enum Paths {
    One(Candidate),
    // Boxed on purpose: a `Vec` (24 bytes) would make every prefix's entry 8 bytes larger to
    // save an allocation only for the rare prefix with several paths.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Candidate>>),
}

impl Paths {
    pub fn as_slice(&self) -> &[Candidate] {
        match self {
            Paths::One(c) => std::slice::from_ref(c),
            Paths::Many(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [Candidate] {
        match self {
            Paths::One(c) => std::slice::from_mut(c),
            Paths::Many(v) => v,
        }
    }

    pub fn best(&self) -> &Candidate {
        &self.as_slice()[0]
    }

    pub fn position(&self, peer: PeerId) -> Option<usize> {
        self.as_slice().iter().position(|c| c.peer == peer)
    }

    pub fn push(&mut self, c: Candidate) {
        match self {
            Paths::Many(v) => v.push(c),
            Paths::One(first) => {
                let first = first.clone();
                *self = Paths::Many(Box::new(vec![first, c]));
            }
        }
    }

    /// Remove the path at `i` (order of the others not kept). Returns it, and whether any
    /// path is left; the caller drops the entry when none is.
    pub fn swap_remove(&mut self, i: usize) -> (Candidate, bool) {
        match self {
            Paths::One(c) => (c.clone(), false),
            Paths::Many(v) => {
                let c = v.swap_remove(i);
                if v.len() == 1 {
                    let last = v[0].clone();
                    *self = Paths::One(last);
                }
                (c, true)
            }
        }
    }

    /// Move the path at `i` to the front.
    pub fn make_best(&mut self, i: usize) {
        self.as_mut_slice().swap(0, i);
    }
}
