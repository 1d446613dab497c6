//! Turns complete sets of stored objects into a validated [`ClusterState`].
//!
//! Both datastores hand every object of every kind to [`StateBuilder::build`] after each
//! change. The builder validates each object, keeps the last valid version of an object
//! whose new version is invalid (a typo in an edit must not withdraw routes), resolves
//! overlapping pools, logs each new rejection once and counts it.
//!
//! It also guards against datastore wipes: when every object of a kind vanishes at once
//! (all IPAMBlocks, all IPPools, all Nodes, ...) or this node's own `Node` does, the
//! previous objects stay in force and the state carries a [`Suspect`] (not ready, WARN,
//! `podroute_datastore_suspect{kind}`) until the objects have stayed gone for the confirm
//! time (`--datastore-wipe-confirm`, default 60 s); then the deletion is applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{info, warn};

use crate::model::bgp::DEFAULT_BGP_CONFIGURATION;
use crate::model::crd::{BGPConfiguration, BGPFilter, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use crate::model::service::object_key;
use crate::model::{
    BgpConfig, Block, BlockClaim, EndpointSliceInfo, Filter, Kind, NodeInfo, Peer, Pool, Reason,
    Rejection, ServiceInfo, resolve_overlaps,
};
use crate::state::{ClaimIndex, ClusterState, ObjectMap, Suspect};

/// How long a wipe (a whole kind, or this node's `Node`, gone at once) must last before it
/// is applied, unless told otherwise.
pub const DEFAULT_WIPE_CONFIRM: Duration = Duration::from_secs(60);

/// At most this many rejections are logged one per line in one build; the rest in one line.
const MAX_REJECTION_LINES: usize = 20;

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

/// One stored object of a kind that grows with the cluster: validated where the source read
/// it (the YAML directory keeps only the small validated form, shared with the states built
/// from it), or as stored (the Kubernetes watch's stores, and objects that do not validate,
/// so that the builder reports why).
#[derive(Debug)]
pub enum Input<R, T> {
    Valid(Arc<T>),
    Raw(Arc<R>),
}

impl<R, T> Clone for Input<R, T> {
    fn clone(&self) -> Self {
        match self {
            Input::Valid(v) => Input::Valid(v.clone()),
            Input::Raw(r) => Input::Raw(r.clone()),
        }
    }
}

impl<R, T> Input<R, T> {
    /// Objects as stored, to be validated by the builder.
    pub fn raw(objects: Vec<Arc<R>>) -> Vec<Self> {
        objects.into_iter().map(Input::Raw).collect()
    }
}

/// Every stored object of every kind, as the source holds them now.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub nodes: Vec<Input<Node, NodeInfo>>,
    pub pools: Vec<Arc<IPPool>>,
    pub blocks: Vec<Input<IPAMBlock, Block>>,
    pub affinities: Vec<Input<BlockAffinity, BlockClaim>>,
    pub peers: Vec<Arc<BGPPeer>>,
    pub bgp_configurations: Vec<Arc<BGPConfiguration>>,
    pub filters: Vec<Arc<BGPFilter>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Objects that exist but could not even be decoded (their last valid version is kept).
    pub unreadable: Vec<Rejection>,
    /// Problems not about one object, shown in [`ClusterState::source_errors`].
    pub source_errors: Vec<String>,
    /// Changes the source itself holds back (e.g. an emptied file), passed on to
    /// [`ClusterState::suspect`].
    pub suspect: Vec<Suspect>,
}

/// What a wipe guard watches: every object of a kind, or this node's own `Node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Watched {
    Kind(Kind),
    OwnNode,
}

/// The last valid version of each object of the few-objects kinds. Nodes, blocks and
/// affinities have theirs in the previous state (shared, not copied).
#[derive(Debug, Default)]
struct LastGood {
    pools: HashMap<String, Pool>,
    peers: HashMap<String, Peer>,
    bgp_configurations: HashMap<String, BgpConfig>,
    filters: HashMap<String, Filter>,
    services: HashMap<String, ServiceInfo>,
    endpoint_slices: HashMap<String, EndpointSliceInfo>,
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
    /// How long a wipe must last to be applied.
    wipe_confirm: Duration,
    /// Wipes being held back, since when.
    suspects: BTreeMap<Watched, Instant>,
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

/// [`admit`] for a namespaced kind: objects are keyed `namespace/name`
/// ([`object_key`]), which is also the name their rejections carry.
fn admit_namespaced<R, T: Clone>(
    kind: Kind,
    objects: &[Arc<R>],
    meta_of: impl Fn(&R) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    validate: impl Fn(&R) -> Result<T, Rejection>,
    unreadable: &[Rejection],
    last_good: &mut HashMap<String, T>,
    rejections: &mut Vec<(Rejection, bool)>,
) -> BTreeMap<String, T> {
    let keyed: Vec<(String, &Arc<R>)> = objects
        .iter()
        .map(|o| (object_key(meta_of(o)), o))
        .collect();
    let mut out = BTreeMap::new();
    let mut present = HashSet::new();
    for (key, obj) in keyed {
        match validate(obj) {
            Ok(value) => {
                last_good.insert(key.clone(), value.clone());
                out.insert(key.clone(), value);
            }
            Err(rejection) => {
                let kept = match last_good.get(&key) {
                    Some(previous) if !out.contains_key(&key) => {
                        out.insert(key.clone(), previous.clone());
                        true
                    }
                    _ => false,
                };
                rejections.push((rejection, kept));
            }
        }
        present.insert(key);
    }
    for rejection in unreadable.iter().filter(|r| r.kind == kind) {
        rejections.push((rejection.clone(), false));
    }
    last_good.retain(|key, _| present.contains(key));
    out
}

/// [`admit`] for the kinds that grow with the cluster: objects already validated by the
/// source are taken as they are (shared); raw ones are validated, and one equal to its
/// version in the previous state shares that one. An invalid object is replaced by its
/// version in `previous` (its last valid one) when there is one.
#[allow(clippy::too_many_arguments)]
fn admit_shared<R, T: PartialEq>(
    kind: Kind,
    objects: &[Input<R, T>],
    raw_name: impl Fn(&R) -> &str,
    name_of: impl Fn(&T) -> &str,
    validate: impl Fn(&R) -> Result<T, Rejection>,
    unreadable: &[Rejection],
    previous: Option<&ObjectMap<T>>,
    rejections: &mut Vec<(Rejection, bool)>,
) -> ObjectMap<T> {
    let mut out = ObjectMap::new();
    let mut failed: Vec<(Rejection, String)> = Vec::new();
    for obj in objects {
        match obj {
            Input::Valid(value) => {
                out.insert_shared(name_of(value).to_string(), value.clone());
            }
            Input::Raw(raw) => {
                let name = raw_name(raw);
                match validate(raw) {
                    Ok(value) => {
                        let shared = match previous.and_then(|p| p.get_shared(name)) {
                            Some(prev) if **prev == value => prev.clone(),
                            _ => Arc::new(value),
                        };
                        out.insert_shared(name.to_string(), shared);
                    }
                    Err(rejection) => failed.push((rejection, name.to_string())),
                }
            }
        }
    }
    for rejection in unreadable.iter().filter(|r| r.kind == kind) {
        failed.push((rejection.clone(), rejection.name.clone()));
    }
    for (rejection, name) in failed {
        let kept = match previous.and_then(|p| p.get_shared(&name)) {
            Some(last) if !name.is_empty() && !out.contains_key(&name) => {
                out.insert_shared(name, last.clone());
                true
            }
            _ => false,
        };
        rejections.push((rejection, kept));
    }
    out
}

/// What the wipe guard compares: a kind's objects by name.
trait Objects: Clone {
    fn count(&self) -> usize;
}

impl<T: Clone> Objects for BTreeMap<String, T> {
    fn count(&self) -> usize {
        self.len()
    }
}

impl<T> Objects for ObjectMap<T> {
    fn count(&self) -> usize {
        self.len()
    }
}

impl StateBuilder {
    pub fn new(local_node: impl Into<String>, counters: Arc<RejectCounters>) -> Self {
        Self {
            local_node: local_node.into(),
            counters,
            last_good: LastGood::default(),
            reported: HashMap::new(),
            current: None,
            wipe_confirm: DEFAULT_WIPE_CONFIRM,
            suspects: BTreeMap::new(),
        }
    }

    /// Sets how long a wipe must last before it is applied (zero: at once).
    pub fn with_wipe_confirm(mut self, confirm: Duration) -> Self {
        self.wipe_confirm = confirm;
        self
    }

    /// When the next held-back wipe is due to be applied: the caller builds again then even
    /// when nothing else changed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.suspects
            .values()
            .map(|since| *since + self.wipe_confirm)
            .min()
    }

    /// The counters this builder increments.
    pub fn counters(&self) -> &Arc<RejectCounters> {
        &self.counters
    }

    /// Builds the snapshot for `inputs`. Returns the previous `Arc` unchanged when the
    /// content did not change, so callers can skip publishing (compare with `Arc::ptr_eq`).
    pub fn build(&mut self, inputs: &Inputs) -> Arc<ClusterState> {
        self.build_at(inputs, Instant::now())
    }

    /// [`build`](Self::build) as of `now` (wipe confirmation times).
    pub fn build_at(&mut self, inputs: &Inputs, now: Instant) -> Arc<ClusterState> {
        let mut rejections: Vec<(Rejection, bool)> = Vec::new();
        let lg = &mut self.last_good;
        let un = &inputs.unreadable;
        let previous = self.current.clone();
        let prev = previous.as_deref();
        let nodes = admit_shared(
            Kind::Node,
            &inputs.nodes,
            |n| n.metadata.name.as_deref().unwrap_or(""),
            |n| &n.name,
            NodeInfo::from_node,
            un,
            prev.map(|p| &p.nodes),
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
        let blocks = admit_shared(
            Kind::IPAMBlock,
            &inputs.blocks,
            IPAMBlock::name,
            |b| &b.name,
            Block::from_resource,
            un,
            prev.map(|p| &p.blocks),
            &mut rejections,
        );
        let mut affinities = admit_shared(
            Kind::BlockAffinity,
            &inputs.affinities,
            BlockAffinity::name,
            |c| &c.name,
            BlockClaim::from_resource,
            un,
            prev.map(|p| &p.affinities),
            &mut rejections,
        );
        // Other nodes' claims decide nothing here (see `ClusterState::affinities`).
        affinities.retain(|_, claim| claim.node == self.local_node);
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
        let services = admit_namespaced(
            Kind::Service,
            &inputs.services,
            |s: &Service| &s.metadata,
            ServiceInfo::from_service,
            un,
            &mut lg.services,
            &mut rejections,
        );
        let endpoint_slices = admit_namespaced(
            Kind::EndpointSlice,
            &inputs.endpoint_slices,
            |s: &EndpointSlice| &s.metadata,
            EndpointSliceInfo::from_endpoint_slice,
            un,
            &mut lg.endpoint_slices,
            &mut rejections,
        );
        let mut suspect = inputs.suspect.clone();
        let mut nodes = nodes;
        self.guard(
            Watched::Kind(Kind::Node),
            prev.map(|p| &p.nodes),
            &mut nodes,
            now,
            &mut suspect,
        );
        // Only this node's Node gone (others still there): every Node gone is the kind's
        // guard above, and a confirmed wipe of all Nodes takes this one along.
        if let Some(p) = prev
            && let Some(own) = p.nodes.get_shared(&self.local_node)
            && !nodes.is_empty()
            && !nodes.contains_key(&self.local_node)
        {
            let mut mine = ObjectMap::new();
            let own_before: ObjectMap<NodeInfo> =
                std::iter::once((own.name.clone(), own.clone())).collect();
            self.guard(
                Watched::OwnNode,
                Some(&own_before),
                &mut mine,
                now,
                &mut suspect,
            );
            nodes.extend(mine);
        } else {
            self.suspects.remove(&Watched::OwnNode);
        }
        let mut pools: BTreeMap<String, Pool> =
            pools.into_iter().map(|p| (p.name.clone(), p)).collect();
        self.guard(
            Watched::Kind(Kind::IPPool),
            prev.map(|p| &p.pools),
            &mut pools,
            now,
            &mut suspect,
        );
        let mut blocks = blocks;
        self.guard(
            Watched::Kind(Kind::IPAMBlock),
            prev.map(|p| &p.blocks),
            &mut blocks,
            now,
            &mut suspect,
        );
        // A block inside no pool has no encapsulation and is nobody's to blackhole.
        blocks.retain(|_, block| {
            let inside = pools.values().any(|p| p.cidr.contains(&block.cidr));
            if !inside {
                rejections.push((
                    Rejection::new(
                        Kind::IPAMBlock,
                        block.name.clone(),
                        Reason::BlockOutsidePools {
                            cidr: block.cidr.to_string(),
                        },
                    ),
                    false,
                ));
            }
            inside
        });
        self.guard(
            Watched::Kind(Kind::BlockAffinity),
            prev.map(|p| &p.affinities),
            &mut affinities,
            now,
            &mut suspect,
        );
        let mut peers = peers;
        self.guard(
            Watched::Kind(Kind::BGPPeer),
            prev.map(|p| &p.peers),
            &mut peers,
            now,
            &mut suspect,
        );
        let mut bgp_configurations = bgp_configurations;
        self.guard(
            Watched::Kind(Kind::BGPConfiguration),
            prev.map(|p| &p.bgp_configurations),
            &mut bgp_configurations,
            now,
            &mut suspect,
        );
        let mut filters = filters;
        self.guard(
            Watched::Kind(Kind::BGPFilter),
            prev.map(|p| &p.filters),
            &mut filters,
            now,
            &mut suspect,
        );
        // Services and EndpointSlices are guarded like the Calico kinds: a cluster always has
        // the `default/kubernetes` Service and its slice, so all of them vanishing at once is
        // a datastore problem, not a deletion (it would withdraw every service prefix). No
        // Service at all from the start is normal (nothing was there to vanish).
        let mut services = services;
        self.guard(
            Watched::Kind(Kind::Service),
            prev.map(|p| &p.services),
            &mut services,
            now,
            &mut suspect,
        );
        let mut endpoint_slices = endpoint_slices;
        self.guard(
            Watched::Kind(Kind::EndpointSlice),
            prev.map(|p| &p.endpoint_slices),
            &mut endpoint_slices,
            now,
            &mut suspect,
        );
        self.report(&rejections);

        let mut rejected: Vec<Rejection> = rejections.into_iter().map(|(r, _)| r).collect();
        rejected.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let state = ClusterState {
            revision: 0,
            local_node: self.local_node.clone(),
            nodes,
            pools,
            blocks,
            affinities,
            peers,
            bgp: bgp_configurations
                .get(DEFAULT_BGP_CONFIGURATION)
                .cloned()
                .unwrap_or_default(),
            bgp_configurations,
            filters,
            services,
            endpoint_slices,
            rejected,
            source_errors: inputs.source_errors.clone(),
            suspect,
            local_claims: ClaimIndex::default(),
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
                    suspect = state.suspect.len(),
                    "cluster state updated"
                );
                self.current = Some(state.clone());
                state
            }
        }
    }

    /// Holds back a wipe of `watched`: when `now_objects` is empty but the previous state had
    /// objects, those stay (and a [`Suspect`] is added) until the wipe has lasted the confirm
    /// time; then it is applied.
    fn guard<M: Objects>(
        &mut self,
        watched: Watched,
        previous: Option<&M>,
        now_objects: &mut M,
        now: Instant,
        suspect: &mut Vec<Suspect>,
    ) {
        let (kind, what) = match watched {
            Watched::Kind(kind) => (kind, format!("every {kind}")),
            Watched::OwnNode => (
                Kind::Node,
                format!("this node's Node {:?}", self.local_node),
            ),
        };
        let wiped = match previous {
            Some(previous) => now_objects.count() == 0 && previous.count() != 0,
            None => false,
        };
        let (true, Some(previous)) = (wiped, previous) else {
            if self.suspects.remove(&watched).is_some() {
                info!(%kind, "{what} is back in the datastore; the held-back deletion is void");
            }
            return;
        };
        let since = *self.suspects.entry(watched).or_insert_with(|| {
            warn!(
                %kind,
                objects = previous.count(),
                confirm_s = self.wipe_confirm.as_secs_f64(),
                "{what} vanished from the datastore at once; keeping the previous objects \
                 until the deletion is confirmed"
            );
            now
        });
        if now.saturating_duration_since(since) >= self.wipe_confirm {
            warn!(
                %kind,
                objects = previous.count(),
                "{what} has stayed gone for {:?}; applying the deletion",
                self.wipe_confirm
            );
            self.suspects.remove(&watched);
            return;
        }
        *now_objects = previous.clone();
        suspect.push(Suspect {
            kind: Some(kind),
            message: format!(
                "{what} vanished from the datastore at once ({} objects); keeping them until \
                 the deletion is confirmed ({:?} gone)",
                previous.count(),
                self.wipe_confirm
            ),
        });
    }

    /// Logs and counts rejections that are new or whose reason changed; after
    /// [`MAX_REJECTION_LINES`] lines in one build, the rest are summed up in one line.
    fn report(&mut self, rejections: &[(Rejection, bool)]) {
        let mut now = HashMap::with_capacity(rejections.len());
        let mut lines = 0;
        let mut unlogged = 0;
        for (rejection, kept) in rejections {
            let key = (rejection.kind, rejection.name.clone());
            if self.reported.get(&key) != Some(rejection) {
                self.counters.record(rejection.kind);
                lines += 1;
                if lines > MAX_REJECTION_LINES {
                    unlogged += 1;
                } else if *kept {
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
        if unlogged > 0 {
            warn!(
                more = unlogged,
                "{unlogged} more objects rejected; `podroute status` lists them all"
            );
        }
        self.reported = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::{IPAMBlockSpec, IPPoolSpec};

    fn node(name: &str) -> Arc<Node> {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        Arc::new(n)
    }

    fn inputs(nodes: &[&str], blocks: &[(&str, &str)]) -> Inputs {
        Inputs {
            nodes: nodes.iter().map(|n| Input::Raw(node(n))).collect(),
            pools: vec![Arc::new(IPPool::new(
                "pool",
                IPPoolSpec {
                    cidr: Some("10.0.0.0/16".into()),
                    ..IPPoolSpec::default()
                },
            ))],
            blocks: blocks
                .iter()
                .map(|(cidr, host)| {
                    Input::Raw(Arc::new(IPAMBlock::new(
                        &cidr.replace(['.', '/'], "-"),
                        IPAMBlockSpec {
                            cidr: Some(cidr.to_string()),
                            affinity: Some(format!("host:{host}")),
                            ..IPAMBlockSpec::default()
                        },
                    )))
                })
                .collect(),
            ..Inputs::default()
        }
    }

    #[test]
    fn own_node_and_all_blocks_vanishing_are_held_back_until_confirmed() {
        let confirm = Duration::from_secs(60);
        let mut builder = StateBuilder::new("n1", Arc::default()).with_wipe_confirm(confirm);
        let t0 = Instant::now();
        let full = inputs(
            &["n1", "n2"],
            &[("10.0.0.0/26", "n1"), ("10.0.1.0/26", "n2")],
        );
        let s = builder.build_at(&full, t0);
        assert!(s.suspect.is_empty());

        let wiped = inputs(&["n2"], &[]);
        let s = builder.build_at(&wiped, t0 + Duration::from_secs(1));
        assert_eq!(s.blocks.len(), 2, "blocks kept");
        assert!(s.local().is_some(), "own Node kept");
        let kinds: Vec<_> = s.suspect.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [Some(Kind::Node), Some(Kind::IPAMBlock)]);
        assert_eq!(
            builder.next_deadline(),
            Some(t0 + Duration::from_secs(1) + confirm)
        );

        // Still gone just before the confirm time: still held back.
        let s = builder.build_at(&wiped, t0 + Duration::from_secs(60));
        assert_eq!(s.blocks.len(), 2);
        // Gone for the confirm time: applied.
        let s = builder.build_at(&wiped, t0 + Duration::from_secs(61));
        assert!(s.blocks.is_empty());
        assert!(s.local().is_none());
        assert!(s.suspect.is_empty(), "{:?}", s.suspect);
        assert_eq!(builder.next_deadline(), None);
    }

    #[test]
    fn unchanged_objects_are_shared_and_an_invalid_edit_keeps_the_shared_last_version() {
        let mut builder = StateBuilder::new("n1", Arc::default());
        let full = inputs(&["n1"], &[("10.0.0.0/26", "n1"), ("10.0.1.0/26", "n2")]);
        let s1 = builder.build(&full);
        // Equal content in new raw objects: the same shared block, not a copy.
        let mut again = inputs(
            &["n1", "n3"],
            &[("10.0.0.0/26", "n1"), ("10.0.1.0/26", "n2")],
        );
        let s2 = builder.build(&again);
        assert!(s2.revision > s1.revision);
        let shared = |s: &ClusterState| s.blocks.get_shared("10-0-1-0-26").cloned().unwrap();
        assert!(Arc::ptr_eq(&shared(&s1), &shared(&s2)));
        // A broken edit keeps the previous state's version (shared), and says so.
        again.blocks[1] = Input::Raw(Arc::new(IPAMBlock::new(
            "10-0-1-0-26",
            IPAMBlockSpec {
                cidr: Some("10.0.1.0/26".into()),
                affinity: Some("nobody".into()),
                ..IPAMBlockSpec::default()
            },
        )));
        let s3 = builder.build(&again);
        assert!(Arc::ptr_eq(&shared(&s2), &shared(&s3)));
        assert_eq!(s3.rejected.len(), 1, "{:?}", s3.rejected);
        assert_eq!(s3.rejected[0].name, "10-0-1-0-26");
        // Validated inputs are taken as they are.
        let valid = Arc::new(
            Block::from_resource(&IPAMBlock::new(
                "10-0-2-0-26",
                IPAMBlockSpec {
                    cidr: Some("10.0.2.0/26".into()),
                    affinity: Some("host:n2".into()),
                    ..IPAMBlockSpec::default()
                },
            ))
            .unwrap(),
        );
        again.blocks.push(Input::Valid(valid.clone()));
        let s4 = builder.build(&again);
        assert!(Arc::ptr_eq(
            s4.blocks.get_shared("10-0-2-0-26").unwrap(),
            &valid
        ));
    }

    #[test]
    fn only_this_nodes_affinities_are_kept() {
        let mut builder = StateBuilder::new("n1", Arc::default());
        let claim = |name: &str, node: &str| {
            Input::Raw(Arc::new(BlockAffinity::new(
                name,
                crate::model::crd::BlockAffinitySpec {
                    cidr: Some("10.0.0.0/26".into()),
                    node: Some(node.into()),
                    state: Some("confirmed".into()),
                    ..Default::default()
                },
            )))
        };
        let mut i = inputs(&["n1"], &[("10.0.0.0/26", "n1")]);
        i.affinities = vec![claim("mine", "n1"), claim("theirs", "n2")];
        let s = builder.build(&i);
        assert_eq!(s.affinities.keys().collect::<Vec<_>>(), ["mine"]);
        assert!(s.local_claim(&"10.0.0.0/26".parse().unwrap()).is_some());
    }

    #[test]
    fn a_block_outside_every_pool_is_rejected_not_kept() {
        let mut builder = StateBuilder::new("n1", Arc::default());
        let s = builder.build(&inputs(
            &["n1"],
            &[("10.0.0.0/26", "n1"), ("192.168.0.0/26", "n1")],
        ));
        assert_eq!(s.blocks.keys().collect::<Vec<_>>(), ["10-0-0-0-26"]);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.rejected[0].name, "192-168-0-0-26");
        assert!(matches!(
            s.rejected[0].reason,
            Reason::BlockOutsidePools { .. }
        ));
        assert_eq!(builder.counters().get(Kind::IPAMBlock), 1);
    }
}
