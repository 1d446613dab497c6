//! The cluster as the agent sees it: one immutable snapshot, replaced as a whole.
//!
//! A single datastore task builds each [`ClusterState`] from complete, validated object sets
//! and publishes it through a `tokio::sync::watch` channel. Consumers hold an
//! `Arc<ClusterState>` for as long as they like and never see a half-applied update.
//!
//! The kinds that grow with the cluster (Nodes, IPAMBlocks, BlockAffinities) are held in
//! [`ObjectMap`]s: each validated object is one `Arc`, shared by the datastore's store, the
//! builder's last valid versions and every published state that contains it, so a cluster
//! of 20,000 blocks costs one copy of each block, not one per holder.

use std::collections::{BTreeMap, btree_map};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use tokio::sync::watch;

use crate::model::{
    BgpConfig, Block, BlockClaim, EndpointSliceInfo, Filter, Kind, NodeInfo, Peer, Pool, Rejection,
    ServiceInfo,
};

/// One complete, validated picture of the cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterState {
    /// Increases by one with every published snapshot whose content changed.
    pub revision: u64,
    /// Name of the node this agent runs on.
    pub local_node: String,
    pub nodes: ObjectMap<NodeInfo>,
    /// Valid, non-overlapping pools by name.
    pub pools: BTreeMap<String, Pool>,
    pub blocks: ObjectMap<Block>,
    /// This node's valid `BlockAffinity`s (and none of the other nodes': whether another
    /// node holds a block is its IPAMBlock's affinity, so their claims decide nothing here
    /// and are not kept).
    pub affinities: ObjectMap<BlockClaim>,
    pub peers: BTreeMap<String, Peer>,
    /// The effective cluster-wide BGP configuration: `BGPConfiguration` `default`, or the
    /// defaults (AS 64512, mesh on, port 179) when there is none.
    pub bgp: BgpConfig,
    /// Every valid `BGPConfiguration` by name (`default`, `node.<name>`, ...).
    pub bgp_configurations: BTreeMap<String, BgpConfig>,
    /// Valid `BGPFilter`s by name.
    pub filters: BTreeMap<String, Filter>,
    /// Valid `Service`s by `namespace/name` (service IP advertisement).
    pub services: BTreeMap<String, ServiceInfo>,
    /// Valid `EndpointSlice`s by `namespace/name`, each with only its endpoints on this node.
    pub endpoint_slices: BTreeMap<String, EndpointSliceInfo>,
    /// Objects currently not taken as they are (skipped, or replaced by their last valid
    /// version), sorted by kind and name.
    pub rejected: Vec<Rejection>,
    /// Problems of the source that are not about one object (unreadable files).
    pub source_errors: Vec<String>,
    /// Changes held back as suspect (a whole kind or this node's `Node` vanished at once, a
    /// file emptied): the previous objects stay in force until the deletion is confirmed.
    /// Not empty = not ready.
    pub suspect: Vec<Suspect>,
    /// Index of the local node's `BlockAffinity`s (see [`ClusterState::local_claim`]).
    pub local_claims: ClaimIndex,
}

/// The local node's `BlockAffinity`s by block CIDR, built from [`ClusterState::affinities`]
/// on first use: answers "does this node hold that block" in O(log n) instead of a scan of
/// every affinity per block. Not content: it compares equal to any other index, and a clone
/// starts empty (a state built with `..other.clone()` may have another local node or other
/// affinities, and builds its own).
#[derive(Default)]
pub struct ClaimIndex(OnceLock<BTreeMap<IpNet, Arc<BlockClaim>>>);

impl Clone for ClaimIndex {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for ClaimIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ClaimIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimIndex")
    }
}

/// Validated objects of one kind by name, each behind an `Arc` that every holder shares
/// (see the module doc). Reads like a `BTreeMap<String, T>`; equality compares contents
/// (shared objects compare by pointer first).
#[derive(Debug)]
pub struct ObjectMap<T> {
    map: BTreeMap<String, Arc<T>>,
}

/// Shares the objects: a clone copies the map, not one object.
impl<T> Clone for ObjectMap<T> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
        }
    }
}

impl<T> Default for ObjectMap<T> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<T: PartialEq> PartialEq for ObjectMap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.map.len() == other.map.len()
            && self
                .map
                .iter()
                .zip(&other.map)
                .all(|((ka, a), (kb, b))| ka == kb && (Arc::ptr_eq(a, b) || a == b))
    }
}

impl<T> ObjectMap<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.map.get(name).map(|v| &**v)
    }

    /// The shared object named `name`.
    pub fn get_shared(&self, name: &str) -> Option<&Arc<T>> {
        self.map.get(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Inserts `value` (wrapped in a new `Arc`); returns whether `name` was there before.
    pub fn insert(&mut self, name: String, value: T) -> bool {
        self.map.insert(name, Arc::new(value)).is_some()
    }

    /// Inserts an object shared with other holders; returns whether `name` was there before.
    pub fn insert_shared(&mut self, name: String, value: Arc<T>) -> bool {
        self.map.insert(name, value).is_some()
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<T>> {
        self.map.remove(name)
    }

    pub fn keys(&self) -> btree_map::Keys<'_, String, Arc<T>> {
        self.map.keys()
    }

    /// The objects in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &T> + ExactSizeIterator + '_ {
        self.map.values().map(|v| &**v)
    }

    /// `(name, object)` in name order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&String, &T)> + ExactSizeIterator + '_ {
        self.map.iter().map(|(k, v)| (k, &**v))
    }

    /// `(name, shared object)` in name order.
    pub fn iter_shared(&self) -> btree_map::Iter<'_, String, Arc<T>> {
        self.map.iter()
    }

    /// Keeps the objects for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &T) -> bool) {
        self.map.retain(|k, v| keep(k, v));
    }

    /// Adds every object of `other` (shared), replacing those of the same name.
    pub fn extend(&mut self, other: ObjectMap<T>) {
        self.map.extend(other.map);
    }
}

impl<T> std::ops::Index<&str> for ObjectMap<T> {
    type Output = T;

    /// Panics when `name` is absent, like `BTreeMap`'s index (tests).
    fn index(&self, name: &str) -> &T {
        &self.map[name]
    }
}

impl<T> FromIterator<(String, T)> for ObjectMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(iter: I) -> Self {
        Self {
            map: iter.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        }
    }
}

impl<T> FromIterator<(String, Arc<T>)> for ObjectMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, Arc<T>)>>(iter: I) -> Self {
        Self {
            map: iter.into_iter().collect(),
        }
    }
}

/// A deletion held back until it is confirmed (see [`ClusterState::suspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    /// The kind whose objects are kept; `None` for a change not about one kind (a file).
    pub kind: Option<Kind>,
    /// What happened and what is kept, for `/readyz` and the log.
    pub message: String,
}

impl ClusterState {
    /// The local node, when its `Node` is known.
    pub fn local(&self) -> Option<&NodeInfo> {
        self.nodes.get(&self.local_node)
    }

    /// The local node's `BlockAffinity` for the block `cidr`, if it has one.
    pub fn local_claim(&self, cidr: &IpNet) -> Option<&BlockClaim> {
        self.local_claims
            .0
            .get_or_init(|| {
                let mut index = BTreeMap::new();
                for (_, claim) in self.affinities.iter_shared() {
                    if claim.node == self.local_node {
                        index.entry(claim.cidr).or_insert_with(|| claim.clone());
                    }
                }
                index
            })
            .get(cidr)
            .map(|c| &**c)
    }

    /// Blocks affine to `node` (`host:<node>`).
    pub fn blocks_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
        self.blocks.values().filter(move |b| b.host() == Some(node))
    }

    /// Blocks affine to the local node.
    pub fn local_blocks(&self) -> impl Iterator<Item = &Block> + '_ {
        self.blocks_of(&self.local_node)
    }

    /// The pool containing `net` (a block or an address as /32), if any.
    pub fn pool_containing(&self, net: &IpNet) -> Option<&Pool> {
        self.pools.values().find(|p| p.cidr.contains(net))
    }

    /// The pool containing `ip`, if any.
    pub fn pool_of_ip(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.values().find(|p| p.cidr.contains(&ip))
    }

    /// Same content, ignoring `revision` (without copying either state).
    pub fn same_content(&self, other: &ClusterState) -> bool {
        let ClusterState {
            revision: _,
            local_node,
            nodes,
            pools,
            blocks,
            affinities,
            peers,
            bgp,
            bgp_configurations,
            filters,
            services,
            endpoint_slices,
            rejected,
            source_errors,
            suspect,
            local_claims: _,
        } = self;
        *local_node == other.local_node
            && *nodes == other.nodes
            && *pools == other.pools
            && *blocks == other.blocks
            && *affinities == other.affinities
            && *peers == other.peers
            && *bgp == other.bgp
            && *bgp_configurations == other.bgp_configurations
            && *filters == other.filters
            && *services == other.services
            && *endpoint_slices == other.endpoint_slices
            && *rejected == other.rejected
            && *source_errors == other.source_errors
            && *suspect == other.suspect
    }
}

/// The datastore stopped and no newer state will come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the datastore task has stopped; no further cluster state will be published")]
pub struct DatastoreStopped;

/// Creates the channel a datastore publishes on.
pub fn state_channel() -> (StatePublisher, StateRx) {
    let (tx, rx) = watch::channel(None);
    (StatePublisher { tx }, StateRx { rx })
}

/// The writing end; held by the single task that builds snapshots.
#[derive(Debug)]
pub struct StatePublisher {
    tx: watch::Sender<Option<Arc<ClusterState>>>,
}

impl StatePublisher {
    /// Publishes `state` (the first publish also signals "initial sync done").
    pub fn publish(&self, state: Arc<ClusterState>) {
        self.tx.send_replace(Some(state));
    }

    /// The last published snapshot.
    pub fn latest(&self) -> Option<Arc<ClusterState>> {
        self.tx.borrow().clone()
    }

    /// A new reader.
    pub fn subscribe(&self) -> StateRx {
        StateRx {
            rx: self.tx.subscribe(),
        }
    }
}

/// The reading end; clone freely. Holds `None` until the datastore finished its initial
/// sync, then always the newest complete snapshot.
#[derive(Debug, Clone)]
pub struct StateRx {
    rx: watch::Receiver<Option<Arc<ClusterState>>>,
}

impl StateRx {
    /// The newest snapshot, `None` before the initial sync is done.
    pub fn latest(&self) -> Option<Arc<ClusterState>> {
        self.rx.borrow().clone()
    }

    /// Whether the initial sync is done (readiness).
    pub fn is_synced(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Waits for the initial sync and returns the newest snapshot.
    pub async fn synced(&mut self) -> Result<Arc<ClusterState>, DatastoreStopped> {
        let guard = self
            .rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| DatastoreStopped)?;
        guard.clone().ok_or(DatastoreStopped)
    }

    /// Waits until a snapshot newer than the last one this receiver saw is published.
    pub async fn changed(&mut self) -> Result<Arc<ClusterState>, DatastoreStopped> {
        loop {
            self.rx.changed().await.map_err(|_| DatastoreStopped)?;
            if let Some(state) = self.rx.borrow_and_update().clone() {
                return Ok(state);
            }
        }
    }

    /// Waits until a snapshot satisfies `pred` (checking the current one first).
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&ClusterState) -> bool,
    ) -> Result<Arc<ClusterState>, DatastoreStopped> {
        let guard = self
            .rx
            .wait_for(|s| s.as_deref().is_some_and(&mut pred))
            .await
            .map_err(|_| DatastoreStopped)?;
        guard.clone().ok_or(DatastoreStopped)
    }
}
