//! Interned attribute sets: routes that share attributes share one `Arc` (as BIRD's
//! `rt-attr.c` and holo's `AttrSetsCxt` do), so a route costs a pointer, not a copy.

use crate::wire::{NextHop, PathAttrs};
use std::collections::HashSet;
use std::sync::Arc;

/// The attributes of a route as the RIB keeps them: path attributes plus the next hop that
/// applies to the route's family (NEXT_HOP for IPv4, the MP_REACH_NLRI next hop otherwise).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteAttrs {
    pub path: PathAttrs,
    pub next_hop: NextHop,
}

/// A shared, immutable attribute set.
pub type AttrSet = Arc<RouteAttrs>;

/// The intern table. Entries no route refers to any more are dropped by [`AttrInterner::gc`],
/// which runs on its own when the table has doubled since the last sweep.
#[derive(Debug, Default)]
pub struct AttrInterner {
    set: HashSet<AttrSet>,
    next_gc: usize,
}

impl AttrInterner {
    pub fn intern(&mut self, attrs: RouteAttrs) -> AttrSet {
        if let Some(existing) = self.set.get(&attrs) {
            return existing.clone();
        }
        if self.set.len() >= self.next_gc.max(1024) {
            self.gc();
        }
        let a = Arc::new(attrs);
        self.set.insert(a.clone());
        a
    }

    /// Drop entries held only by the table itself.
    pub fn gc(&mut self) {
        self.set.retain(|a| Arc::strong_count(a) > 1);
        self.next_gc = self.set.len() * 2;
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}
