//! The Kubernetes datastore: one kube-rs `watcher` + `reflector` per kind, one task that
//! rebuilds the cluster state from the reflector stores.
//!
//! Robustness comes from kube-rs: the watcher relists after `410 Gone` or a lost
//! connection (with the default exponential backoff), and the reflector swaps a relisted
//! set in atomically on `InitDone`, so no object is lost or invented by a relist. While the
//! API server is unreachable the stores keep their contents, so the published state stays
//! what it was: an API outage never withdraws routes.
//!
//! The stores keep only what podroute reads ([`crate::model::compact`], applied in the
//! watcher's map step before an object is stored): a Node's name, labels, addresses and
//! `projectcalico.org/*` annotations; other nodes' IPAMBlocks without their local
//! allocations; no `managedFields`, status or other metadata. A whole kind (or this node's
//! `Node`) vanishing at once is held back by the builder until confirmed
//! (`--datastore-wipe-confirm`).

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::builder::DEFAULT_WIPE_CONFIRM;
use super::{DatastoreHandle, Input, Inputs, RejectCounters, StateBuilder};
use crate::model::Kind;
use crate::model::compact::{compact_block, slim_meta, slim_node};
use crate::model::crd::{BGPConfiguration, BGPFilter, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use crate::model::service::{slim_endpoint_slice, slim_service};
use crate::state::state_channel;

/// Shared between the per-kind watch tasks and the builder task.
#[derive(Debug, Default)]
struct Progress {
    synced: [AtomicBool; Kind::ALL.len()],
    changed: Notify,
}

impl Progress {
    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }
}

/// Starts watching `client`'s API server. The returned handle's `state` becomes `Some`
/// once every kind has been listed once (initial sync done).
pub fn spawn(client: Client, local_node: impl Into<String>) -> DatastoreHandle {
    spawn_with(client, local_node, DEFAULT_WIPE_CONFIRM)
}

/// [`spawn`] with the time a wipe must last before it is applied.
pub fn spawn_with(
    client: Client,
    local_node: impl Into<String>,
    wipe_confirm: Duration,
) -> DatastoreHandle {
    spawn_with_options(client, local_node, wipe_confirm, false)
}

/// [`spawn_with`]; `calico_crds_optional`: a Calico kind whose CRD is not installed counts as
/// empty instead of holding up the sync (flannel mode: a flannel cluster has no Calico CRDs,
/// and BGPPeers are optional there).
pub fn spawn_with_options(
    client: Client,
    local_node: impl Into<String>,
    wipe_confirm: Duration,
    calico_crds_optional: bool,
) -> DatastoreHandle {
    let local_node: String = local_node.into();
    let counters = Arc::new(RejectCounters::default());
    let progress = Arc::new(Progress::default());
    let (publisher, state) = state_channel();
    let mut tasks = Vec::new();

    let nodes = watch_kind::<Node>(
        Api::all(client.clone()),
        Kind::Node,
        slim_node,
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let pools = watch_kind::<IPPool>(
        Api::all(client.clone()),
        Kind::IPPool,
        |o| slim_meta(&mut o.metadata),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let local = local_node.clone();
    let blocks = watch_kind::<IPAMBlock>(
        Api::all(client.clone()),
        Kind::IPAMBlock,
        move |o| compact_block(o, &local),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let affinities = watch_kind::<BlockAffinity>(
        Api::all(client.clone()),
        Kind::BlockAffinity,
        |o| slim_meta(&mut o.metadata),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let peers = watch_kind::<BGPPeer>(
        Api::all(client.clone()),
        Kind::BGPPeer,
        |o| slim_meta(&mut o.metadata),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let configs = watch_kind::<BGPConfiguration>(
        Api::all(client.clone()),
        Kind::BGPConfiguration,
        |o| slim_meta(&mut o.metadata),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    // Calico before 3.26 has no BGPFilter CRD: its absence must not hold up the sync.
    let filters = watch_kind::<BGPFilter>(
        Api::all(client.clone()),
        Kind::BGPFilter,
        |o| slim_meta(&mut o.metadata),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );

    // Service IP advertisement: only the fields it reads, and of each EndpointSlice only the
    // endpoints on this node.
    let services = watch_kind::<Service>(
        Api::all(client.clone()),
        Kind::Service,
        slim_service,
        &progress,
        calico_crds_optional,
        &mut tasks,
    );
    let local = local_node.clone();
    let endpoint_slices = watch_kind::<EndpointSlice>(
        Api::all(client),
        Kind::EndpointSlice,
        move |o| slim_endpoint_slice(o, &local),
        &progress,
        calico_crds_optional,
        &mut tasks,
    );

    let mut builder =
        StateBuilder::new(local_node, counters.clone()).with_wipe_confirm(wipe_confirm);
    let progress_b = progress.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            // A held-back wipe is applied by a build once its time has come.
            match builder.next_deadline() {
                Some(deadline) => {
                    tokio::select! {
                        () = progress_b.changed.notified() => {}
                        () = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
                None => progress_b.changed.notified().await,
            }
            if !progress_b.all_synced() {
                continue;
            }
            let inputs = Inputs {
                nodes: Input::raw(nodes.state()),
                pools: pools.state(),
                blocks: Input::raw(blocks.state()),
                affinities: Input::raw(affinities.state()),
                peers: peers.state(),
                bgp_configurations: configs.state(),
                filters: filters.state(),
                services: services.state(),
                endpoint_slices: endpoint_slices.state(),
                unreadable: Vec::new(),
                source_errors: Vec::new(),
                suspect: Vec::new(),
            };
            let state = builder.build(&inputs);
            drop(inputs);
            let unchanged = publisher
                .latest()
                .is_some_and(|current| Arc::ptr_eq(&current, &state));
            if !unchanged {
                publisher.publish(state);
                super::trim_heap();
            }
        }
    }));
    DatastoreHandle::new(state, counters, tasks)
}

/// Spawns the watch task of one kind and returns the reader of its store.
fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    compact: impl Fn(&mut K) + Send + Sync + 'static,
    progress: &Arc<Progress>,
    calico_crds_optional: bool,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let progress = progress.clone();
    tasks.push(tokio::spawn(async move {
        let stream = watcher(api)
            .default_backoff()
            .modify(move |obj| compact(obj));
        let stream = reflector::reflector(writer, stream);
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init) => debug!(%kind, "listing"),
                Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone) => {
                    if !progress.synced[kind.index()].swap(true, Ordering::AcqRel) {
                        info!(%kind, "initial list done");
                    } else {
                        info!(%kind, "relisted");
                    }
                    progress.changed.notify_one();
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => progress.changed.notify_one(),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.code == 404
                        && (kind == Kind::BGPFilter
                            || (calico_crds_optional
                                && !matches!(
                                    kind,
                                    Kind::Node | Kind::Service | Kind::EndpointSlice
                                ))) =>
                {
                    // The kind is not installed: nothing of it exists. Counted as listed (the
                    // store stays empty); the watcher keeps retrying and picks the CRD up
                    // once it is installed.
                    if !progress.synced[kind.index()].swap(true, Ordering::AcqRel) {
                        info!(%kind, "this cluster has no {kind} CRD; treating it as empty");
                        progress.changed.notify_one();
                    }
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if matches!(status.code, 403 | 404)
                        && matches!(kind, Kind::Service | Kind::EndpointSlice) =>
                {
                    // Services only add advertisements: an RBAC without them (an upgrade
                    // that kept the old ClusterRole) must not hold up pod routing. Counted
                    // as listed and empty, loudly; the watcher keeps retrying.
                    if !progress.synced[kind.index()].swap(true, Ordering::AcqRel) {
                        warn!(
                            %kind,
                            code = status.code,
                            "cannot list {kind}s (apply manifests/rbac.yaml: podroute needs \
                             list/watch on services and discovery.k8s.io endpointslices); no \
                             service IP is advertised until it can"
                        );
                        progress.changed.notify_one();
                    }
                }
                Err(error) => warn!(
                    %kind,
                    %error,
                    "watch failed; keeping the last state and retrying with backoff"
                ),
            }
        }
    }));
    reader
}

fn watcher<K>(api: Api<K>) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}
