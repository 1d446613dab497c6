//! The cluster as the agent sees it: one immutable snapshot, replaced as a whole.
//!
//! A single datastore task builds each [`ClusterState`] from complete, validated object sets
//! and publishes it through a `tokio::sync::watch` channel. Consumers hold an
//! `Arc<ClusterState>` for as long as they like and never see a half-applied update.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

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
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Valid, non-overlapping pools by name.
    pub pools: BTreeMap<String, Pool>,
    pub blocks: BTreeMap<String, Block>,
    pub affinities: BTreeMap<String, BlockClaim>,
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
