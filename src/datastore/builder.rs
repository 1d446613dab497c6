//! Turns complete sets of stored objects into a validated [`ClusterState`].
//!
//! Both datastores hand every object of every kind to [`StateBuilder::build`] after each
//! change. The builder validates each object, keeps the last valid version of an object
//! whose new version is invalid (a typo in an edit must not withdraw routes), resolves
//! overlapping pools, logs each new rejection once and counts it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use crate::model::bgp::DEFAULT_BGP_CONFIGURATION;
use crate::model::crd::{BGPConfiguration, BGPFilter, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use crate::model::{
    BgpConfig, Block, BlockClaim, Filter, Kind, NodeInfo, Peer, Pool, Rejection, resolve_overlaps,
};
use crate::state::ClusterState;

/// Rejection counters by kind, readable by the metrics layer
/// (`podroute_objects_rejected_total{kind}`). A rejection is counted when it first
/// appears or its reason changes, not on every rebuild.
#[derive(Debug, Default)]
pub struct RejectCounters {
    by_kind: [AtomicU64; Kind::ALL.len()],
    unreadable: AtomicU64,
}

impl RejectCounters {
    pub fn record(&self, kind: Kind) {
        self.by_kind[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a document or file that could not be read at all.
    pub fn record_unreadable(&self) {
        self.unreadable.fetch_add(1, Ordering::Relaxed);
    }

    /// Rejections of `kind` so far.
    pub fn get(&self, kind: Kind) -> u64 {
        self.by_kind[kind.index()].load(Ordering::Relaxed)
    }

    /// Documents or files that could not be read at all (YAML-directory datastore).
    pub fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }

    /// `(kind, count)` for every kind.
    pub fn snapshot(&self) -> Vec<(Kind, u64)> {
        Kind::ALL.iter().map(|k| (*k, self.get(*k))).collect()
    }
}

/// Every stored object of every kind, as the source holds them now.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub nodes: Vec<Arc<Node>>,
    pub pools: Vec<Arc<IPPool>>,
    pub blocks: Vec<Arc<IPAMBlock>>,
    pub affinities: Vec<Arc<BlockAffinity>>,
    pub peers: Vec<Arc<BGPPeer>>,
    pub bgp_configurations: Vec<Arc<BGPConfiguration>>,
    pub filters: Vec<Arc<BGPFilter>>,
    /// Objects that exist but could not even be decoded (their last valid version is kept).
    pub unreadable: Vec<Rejection>,
    /// Problems not about one object, shown in [`ClusterState::source_errors`].
    pub source_errors: Vec<String>,
}

#[derive(Debug, Default)]
struct LastGood {
    nodes: HashMap<String, NodeInfo>,
    pools: HashMap<String, Pool>,
    blocks: HashMap<String, Block>,
    affinities: HashMap<String, BlockClaim>,
    peers: HashMap<String, Peer>,
    bgp_configurations: HashMap<String, BgpConfig>,
    filters: HashMap<String, Filter>,
}

/// Builds snapshots; owned by the single datastore task.
#[derive(Debug)]
pub struct StateBuilder {
    local_node: String,
    counters: Arc<RejectCounters>,
    last_good: LastGood,
    /// Rejections of the previous build, to log each one once.
    reported: HashMap<(Kind, String), Rejection>,
    current: Option<Arc<ClusterState>>,
}

/// Validates one kind: valid objects are taken, invalid ones are rejected and replaced by
/// their last valid version if there is one. Names no longer present are forgotten.
fn admit<R, T: Clone>(
    kind: Kind,
    objects: &[Arc<R>],
    name_of: impl Fn(&R) -> &str,
    validate: impl Fn(&R) -> Result<T, Rejection>,
    unreadable: &[Rejection],
    last_good: &mut HashMap<String, T>,
    rejections: &mut Vec<(Rejection, bool)>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let mut present = HashSet::new();
    let mut failed: Vec<(Rejection, String)> = Vec::new();
    for obj in objects {
        let name = name_of(obj).to_string();
        match validate(obj) {
            Ok(value) => {
                last_good.insert(name.clone(), value.clone());
                out.insert(name.clone(), value);
            }
            Err(rejection) => failed.push((rejection, name.clone())),
        }
        present.insert(name);
    }
    for rejection in unreadable.iter().filter(|r| r.kind == kind) {
        present.insert(rejection.name.clone());
        failed.push((rejection.clone(), rejection.name.clone()));
    }
    for (rejection, name) in failed {
        let kept = match last_good.get(&name) {
            Some(previous) if !name.is_empty() && !out.contains_key(&name) => {
                out.insert(name, previous.clone());
                true
            }
            _ => false,
        };
        rejections.push((rejection, kept));
    }
    last_good.retain(|name, _| present.contains(name));
    out
}

impl StateBuilder {
    pub fn new(local_node: impl Into<String>, counters: Arc<RejectCounters>) -> Self {
        Self {
            local_node: local_node.into(),
            counters,
            last_good: LastGood::default(),
            reported: HashMap::new(),
            current: None,
        }
    }

    /// The counters this builder increments.
    pub fn counters(&self) -> &Arc<RejectCounters> {
        &self.counters
    }

    /// Builds the snapshot for `inputs`. Returns the previous `Arc` unchanged when the
    /// content did not change, so callers can skip publishing (compare with `Arc::ptr_eq`).
    pub fn build(&mut self, inputs: &Inputs) -> Arc<ClusterState> {
        let mut rejections: Vec<(Rejection, bool)> = Vec::new();
        let lg = &mut self.last_good;
        let un = &inputs.unreadable;
        let nodes = admit(
            Kind::Node,
            &inputs.nodes,
            |n| n.metadata.name.as_deref().unwrap_or(""),
            NodeInfo::from_node,
            un,
            &mut lg.nodes,
            &mut rejections,
        );
        let pools = admit(
            Kind::IPPool,
            &inputs.pools,
            IPPool::name,
            Pool::from_resource,
            un,
            &mut lg.pools,
            &mut rejections,
        );
        let (pools, overlaps) = resolve_overlaps(pools.into_values().collect());
        rejections.extend(overlaps.into_iter().map(|r| (r, false)));
        let blocks = admit(
            Kind::IPAMBlock,
            &inputs.blocks,
            IPAMBlock::name,
            Block::from_resource,
            un,
            &mut lg.blocks,
            &mut rejections,
        );
        let affinities = admit(
            Kind::BlockAffinity,
            &inputs.affinities,
            BlockAffinity::name,
            BlockClaim::from_resource,
            un,
            &mut lg.affinities,
            &mut rejections,
        );
        let peers = admit(
            Kind::BGPPeer,
            &inputs.peers,
            BGPPeer::name,
            Peer::from_resource,
            un,
            &mut lg.peers,
            &mut rejections,
        );
        let bgp_configurations = admit(
            Kind::BGPConfiguration,
            &inputs.bgp_configurations,
            BGPConfiguration::name,
            BgpConfig::from_resource,
            un,
            &mut lg.bgp_configurations,
            &mut rejections,
        );
        let filters = admit(
            Kind::BGPFilter,
            &inputs.filters,
            BGPFilter::name,
            Filter::from_resource,
            un,
            &mut lg.filters,
            &mut rejections,
        );
        self.report(&rejections);

        let mut rejected: Vec<Rejection> = rejections.into_iter().map(|(r, _)| r).collect();
        rejected.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let state = ClusterState {
            revision: 0,
            local_node: self.local_node.clone(),
            nodes,
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
            blocks,
            affinities,
            peers,
            bgp: bgp_configurations
                .get(DEFAULT_BGP_CONFIGURATION)
                .cloned()
                .unwrap_or_default(),
            bgp_configurations,
            filters,
            rejected,
            source_errors: inputs.source_errors.clone(),
        };
        match &self.current {
            Some(current) if current.same_content(&state) => current.clone(),
            previous => {
                let revision = previous.as_ref().map_or(1, |p| p.revision + 1);
                let state = Arc::new(ClusterState { revision, ..state });
                info!(
                    revision,
                    nodes = state.nodes.len(),
                    pools = state.pools.len(),
                    blocks = state.blocks.len(),
                    peers = state.peers.len(),
                    rejected = state.rejected.len(),
                    "cluster state updated"
                );
                self.current = Some(state.clone());
                state
            }
        }
    }

    /// Logs and counts rejections that are new or whose reason changed.
    fn report(&mut self, rejections: &[(Rejection, bool)]) {
        let mut now = HashMap::with_capacity(rejections.len());
        for (rejection, kept) in rejections {
            let key = (rejection.kind, rejection.name.clone());
            if self.reported.get(&key) != Some(rejection) {
                self.counters.record(rejection.kind);
                if *kept {
                    warn!(
                        kind = %rejection.kind,
                        name = %rejection.name,
                        "{rejection}; keeping its last valid version"
                    );
                } else {
                    warn!(
                        kind = %rejection.kind,
                        name = %rejection.name,
                        "{rejection}; object skipped"
                    );
                }
            }
            now.insert(key, rejection.clone());
        }
        self.reported = now;
    }
}
