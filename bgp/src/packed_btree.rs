//! A `BTreeMap` that keeps its nodes full as keys arrive in order.
//!
//! A `BTreeMap` filled in key order (as routes arrive, sorted per UPDATE batch) leaves its
//! nodes a little over half full, since a node split keeps six of its eleven entries on the
//! left and nothing comes back to fill them; [`PackedBTreeMap`] rebuilds itself with full
//! nodes once a quarter of its entries are new since the last rebuild (heaptrack, 100,000
//! routes: the agent's best paths 2.1 → 1.1 MB). Used by the Loc-RIB here and by the agent's
//! tables.

use std::collections::BTreeMap;

/// Entries below which a [`PackedBTreeMap`] is never rebuilt (a few kilobytes at most).
const PACK_MIN: usize = 1024;

/// A `BTreeMap` that rebuilds itself with full nodes after many insertions of new keys; see
/// the module doc. Reads go to the map itself (`Deref`); writes through its own methods.
#[derive(Debug, Clone)]
pub struct PackedBTreeMap<K, V> {
    map: BTreeMap<K, V>,
    /// New keys inserted since the last rebuild.
    inserted: usize,
}

impl<K, V> Default for PackedBTreeMap<K, V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            inserted: 0,
        }
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for PackedBTreeMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Eq, V: Eq> Eq for PackedBTreeMap<K, V> {}

impl<K, V> std::ops::Deref for PackedBTreeMap<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<K: Ord + Clone, V> PackedBTreeMap<K, V> {
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.map.insert(key, value);
        if old.is_none() {
            self.inserted += 1;
            if self.inserted >= PACK_MIN && self.inserted * 4 >= self.map.len() {
                self.pack();
            }
        }
        old
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    pub fn values_mut(&mut self) -> std::collections::btree_map::ValuesMut<'_, K, V> {
        self.map.values_mut()
    }

    pub fn into_values(self) -> std::collections::btree_map::IntoValues<K, V> {
        self.map.into_values()
    }

    pub fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep)
    }

    /// Rebuilds the tree with full nodes. `BTreeMap::append` of two non-empty maps merges
    /// them into a tree built in key order with every node full, freeing the old nodes as it
    /// goes (no second copy of the table at any time); splitting off the last entry gives it
    /// two maps to merge.
    fn pack(&mut self) {
        self.inserted = 0;
        let Some(last) = self.map.last_key_value().map(|(k, _)| k.clone()) else {
            return;
        };
        let mut tail = self.map.split_off(&last);
        self.map.append(&mut tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Inserts (runs of ascending keys, as routes arrive, and scattered ones) and removals
        /// leave a packed map equal to a plain `BTreeMap` given the same operations, packing
        /// included.
        #[test]
        fn a_packed_map_behaves_like_a_btreemap(
            ops in proptest::collection::vec((0u8..4, 0u32..6000, 1u32..1500), 1..30)
        ) {
            let mut packed: PackedBTreeMap<u32, u32> = PackedBTreeMap::default();
            let mut reference: BTreeMap<u32, u32> = BTreeMap::new();
            for (i, (op, start, n)) in ops.into_iter().enumerate() {
                for k in start..start + n {
                    let v = i as u32;
                    match op {
                        0 | 1 => prop_assert_eq!(packed.insert(k, v), reference.insert(k, v)),
                        2 => prop_assert_eq!(packed.remove(&k), reference.remove(&k)),
                        _ => {
                            let k = k.wrapping_mul(2_654_435_761) % 10_000;
                            prop_assert_eq!(packed.insert(k, v), reference.insert(k, v));
                        }
                    }
                }
                prop_assert_eq!(&*packed, &reference);
            }
            if let Some(k) = reference.keys().next().copied() {
                *packed.get_mut(&k).unwrap() += 1;
                *reference.get_mut(&k).unwrap() += 1;
            }
            packed.retain(|k, _| k % 3 != 0);
            reference.retain(|k, _| k % 3 != 0);
            prop_assert_eq!(&*packed, &reference);
            let got: Vec<u32> = packed.into_values().collect();
            let want: Vec<u32> = reference.into_values().collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn packing_runs_once_a_quarter_of_the_entries_are_new() {
        let mut map: PackedBTreeMap<u32, ()> = PackedBTreeMap::default();
        for k in 0..PACK_MIN as u32 - 1 {
            map.insert(k, ());
        }
        assert_eq!(map.inserted, PACK_MIN - 1, "small maps are left alone");
        map.insert(u32::MAX, ());
        assert_eq!(map.inserted, 0, "packed");
        map.insert(u32::MAX, ());
        assert_eq!(map.inserted, 0, "a replaced value is no new key");
        for k in 0..PACK_MIN as u32 {
            map.insert(k + 1_000_000, ());
        }
        assert_eq!(map.inserted, 0, "2048 entries, 1024 new: packed again");
        assert_eq!(map.len(), 2 * PACK_MIN);
        assert_eq!(map.keys().copied().max(), Some(u32::MAX));
    }
}
