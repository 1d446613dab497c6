//! The Kubernetes datastore against a real socket: the real `kube::Client` and kube-rs
//! watchers talk to the in-repo fake API server (tests/support/apiserver.rs).

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use podroute::datastore::DatastoreHandle;
use podroute::model::crd::{
    BGPConfiguration, BGPConfigurationSpec, BGPPeer, BlockAffinity, IPAMBlock, IPAMBlockSpec,
    IPPool, IPPoolSpec,
};
use podroute::model::{EncapMode, Kind};
use podroute::state::{ClusterState, StateRx};
use support::apiserver::FakeApiServer;

const WAIT: Duration = Duration::from_secs(30);

fn pool(name: &str, cidr: &str, ipip: &str) -> IPPool {
    IPPool::new(
        name,
        IPPoolSpec {
            cidr: Some(cidr.into()),
            ipip_mode: Some(ipip.into()),
            ..IPPoolSpec::default()
        },
    )
}

fn block(cidr: &str, host: &str) -> IPAMBlock {
    let name = cidr.replace(['.', '/'], "-");
    IPAMBlock::new(
        &name,
        IPAMBlockSpec {
            cidr: Some(cidr.into()),
            affinity: Some(format!("host:{host}")),
            ..IPAMBlockSpec::default()
        },
    )
}

fn node(name: &str, address: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": { "projectcalico.org/IPv4Address": address },
        },
    }))
    .unwrap()
}

/// A server holding the seed-001 cluster: two nodes, the CrossSubnet pool, two blocks.
async fn seed_server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve::<Node>();
    server.serve::<IPPool>();
    server.serve::<IPAMBlock>();
    server.serve::<BlockAffinity>();
    server.serve::<BGPPeer>();
    server.serve::<BGPConfiguration>();
    server.apply(&node("master01", "192.168.92.128/24"));
    server.apply(&node("node01", "192.168.92.129/24"));
    server.apply(&pool("default-ipv4-ippool", "172.16.0.0/16", "CrossSubnet"));
    server.apply(&block("172.16.196.128/26", "node01"));
    server.apply(&block("172.16.241.64/26", "master01"));
    server
}

async fn wait_for(
    rx: &mut StateRx,
    what: &str,
    pred: impl FnMut(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!(
            "{what}: not reached within {WAIT:?}; last state: {:#?}",
            rx.latest()
        ),
    }
}

fn block_names(state: &ClusterState) -> Vec<&str> {
    state.blocks.keys().map(String::as_str).collect()
}

async fn start(server: &FakeApiServer) -> (DatastoreHandle, Arc<ClusterState>) {
    let mut ds = podroute::datastore::kube::spawn(server.client(), "master01");
    let state = tokio::time::timeout(WAIT, ds.state.synced())
        .await
        .expect("initial sync")
        .unwrap();
    (ds, state)
}

#[tokio::test]
async fn initial_sync_then_add_modify_delete_reach_the_state() {
    let server = seed_server().await;
    let (mut ds, state) = start(&server).await;
    assert!(ds.state.is_synced());
    assert_eq!(state.local_node, "master01");
    assert_eq!(
        state.local().and_then(|n| n.ipv4),
        Some("192.168.92.128/24".parse().unwrap())
    );
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(
        state.pools["default-ipv4-ippool"].ipip_mode,
        EncapMode::CrossSubnet
    );
    assert_eq!(
        block_names(&state),
        ["172-16-196-128-26", "172-16-241-64-26"]
    );
    assert_eq!(state.bgp.as_number, 64512);
    for kind in [
        server.list_count::<Node>(),
        server.list_count::<IPPool>(),
        server.list_count::<IPAMBlock>(),
        server.list_count::<BlockAffinity>(),
        server.list_count::<BGPPeer>(),
        server.list_count::<BGPConfiguration>(),
    ] {
        assert_eq!(kind, 1);
    }

    // Add.
    server.apply(&block("172.16.10.0/26", "node02"));
    let s = wait_for(&mut ds.state, "added block", |s| {
        s.blocks.contains_key("172-16-10-0-26")
    })
    .await;
    assert_eq!(s.blocks["172-16-10-0-26"].host(), Some("node02"));

    // Modify: the seed's switch from Always to CrossSubnet, the other way round here.
    server.apply(&pool("default-ipv4-ippool", "172.16.0.0/16", "Always"));
    wait_for(&mut ds.state, "modified pool", |s| {
        s.pools["default-ipv4-ippool"].ipip_mode == EncapMode::Always
    })
    .await;

    // A BGPConfiguration changes the effective configuration.
    server.apply(&BGPConfiguration::new(
        "default",
        BGPConfigurationSpec {
            as_number: Some(65010),
            ..BGPConfigurationSpec::default()
        },
    ));
    wait_for(&mut ds.state, "bgp configuration", |s| {
        s.bgp.as_number == 65010
    })
    .await;

    // Bookmarks change nothing.
    let before = ds.state.latest().unwrap();
    server.bookmark();

    // Delete.
    server.delete::<IPAMBlock>("172-16-196-128-26");
    let s = wait_for(&mut ds.state, "deleted block", |s| {
        !s.blocks.contains_key("172-16-196-128-26")
    })
    .await;
    assert_eq!(block_names(&s), ["172-16-10-0-26", "172-16-241-64-26"]);
    assert_eq!(
        s.revision,
        before.revision + 1,
        "exactly one new snapshot for the delete"
    );

    // A bad object is skipped and counted, the rest untouched.
    server.apply(&pool("broken", "10.0.0.1/8", "Never"));
    let s = wait_for(&mut ds.state, "rejection", |s| !s.rejected.is_empty()).await;
    assert_eq!(
        s.rejected[0].to_string(),
        r#"IPPool "broken": cidr 10.0.0.1/8 has host bits set; write the network address 10.0.0.0/8"#
    );
    assert_eq!(s.pools.keys().collect::<Vec<_>>(), ["default-ipv4-ippool"]);
    assert_eq!(ds.counters.get(Kind::IPPool), 1);
    ds.shutdown().await;
}

#[tokio::test]
async fn gone_410_forces_a_relist_without_lost_or_phantom_objects() {
    let server = seed_server().await;
    let (mut ds, _) = start(&server).await;
    let lists_before = server.list_count::<IPAMBlock>();

    // Changes the watch never delivers, then history compaction and 410 on every watch.
    server.delete_unseen::<IPAMBlock>("172-16-196-128-26");
    server.apply_unseen(&block("172.16.20.0/26", "node01"));
    server.expire_watches();

    let s = wait_for(&mut ds.state, "relisted state", |s| {
        s.blocks.contains_key("172-16-20-0-26")
    })
    .await;
    assert_eq!(
        block_names(&s),
        ["172-16-20-0-26", "172-16-241-64-26"],
        "the relist drops the block deleted unseen and adds the one created unseen"
    );
    assert_eq!(s.nodes.len(), 2, "other kinds are not lost");
    assert_eq!(s.pools.len(), 1);
    assert!(server.list_count::<IPAMBlock>() > lists_before);

    // The watch works again after the relist.
    server.apply(&block("172.16.30.0/26", "master01"));
    wait_for(&mut ds.state, "watch after relist", |s| {
        s.blocks.contains_key("172-16-30-0-26")
    })
    .await;
}

#[tokio::test]
async fn dropped_connections_are_resumed() {
    let server = seed_server().await;
    let (mut ds, _) = start(&server).await;
    let watches_before = server.watch_count::<IPAMBlock>();
    server.drop_connections();
    server.apply(&block("172.16.40.0/26", "node01"));
    wait_for(&mut ds.state, "change after disconnect", |s| {
        s.blocks.contains_key("172-16-40-0-26")
    })
    .await;
    assert!(server.watch_count::<IPAMBlock>() > watches_before);
}

#[tokio::test]
async fn api_server_down_keeps_the_last_state_and_restart_resyncs() {
    let mut server = seed_server().await;
    let (mut ds, synced) = start(&server).await;

    server.stop().await;
    // Long enough for several failed reconnects (the backoff starts at 0.8 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = ds.state.latest().expect("still synced");
    assert!(
        Arc::ptr_eq(&during, &synced),
        "no new snapshot while the API server is down"
    );
    assert_eq!(
        block_names(&during),
        ["172-16-196-128-26", "172-16-241-64-26"]
    );
    assert!(ds.state.is_synced());

    // Changes made while the agent could not see them.
    server.delete::<IPAMBlock>("172-16-196-128-26");
    server.apply(&block("172.16.50.0/26", "node01"));
    server.restart().await;
    let s = wait_for(&mut ds.state, "resync after restart", |s| {
        s.blocks.contains_key("172-16-50-0-26") && !s.blocks.contains_key("172-16-196-128-26")
    })
    .await;
    assert_eq!(block_names(&s), ["172-16-241-64-26", "172-16-50-0-26"]);

    // Down again, history compacted while down: the resumed watch gets 410 and relists.
    server.stop().await;
    server.apply(&block("172.16.60.0/26", "node01"));
    server.compact();
    let lists_before = server.list_count::<IPAMBlock>();
    server.restart().await;
    wait_for(&mut ds.state, "relist after compaction", |s| {
        s.blocks.contains_key("172-16-60-0-26")
    })
    .await;
    assert!(server.list_count::<IPAMBlock>() > lists_before);
}

#[tokio::test]
async fn every_block_deleted_is_held_back_until_confirmed() {
    let server = seed_server().await;
    let confirm = Duration::from_secs(2);
    let mut ds = podroute::datastore::kube::spawn_with(server.client(), "master01", confirm);
    wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    assert!(server.delete::<IPAMBlock>("172-16-196-128-26"));
    assert!(server.delete::<IPAMBlock>("172-16-241-64-26"));
    let started = std::time::Instant::now();
    let s = wait_for(&mut ds.state, "held back", |s| !s.suspect.is_empty()).await;
    // Deletions arrive one watch event at a time: the state built between them may already
    // lack the first block; the last one vanishing is what the guard holds back.
    assert!(!block_names(&s).is_empty());
    assert!(
        s.suspect[0].message.starts_with("every IPAMBlock vanished"),
        "{:?}",
        s.suspect
    );
    assert_eq!(s.suspect[0].kind, Some(Kind::IPAMBlock));
    let s = wait_for(&mut ds.state, "applied", |s| s.blocks.is_empty()).await;
    assert!(
        started.elapsed() >= confirm,
        "applied before the confirm time"
    );
    assert!(s.suspect.is_empty());
    ds.shutdown().await;
}

#[tokio::test]
async fn services_and_endpoint_slices_are_watched_with_only_this_nodes_endpoints() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let server = seed_server().await;
    server.serve::<Service>();
    server.serve::<EndpointSlice>();
    server.apply(&BGPConfiguration::new(
        "default",
        serde_json::from_value::<BGPConfigurationSpec>(serde_json::json!({
            "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
        }))
        .unwrap(),
    ));
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"big": "x"}},
        "spec": {"clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                 "ports": [{"port": 80}]},
    }))
    .unwrap();
    let slice = |ready: bool| -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["172.16.241.65"], "nodeName": "master01",
                 "conditions": {"ready": ready}},
                {"addresses": ["172.16.196.129"], "nodeName": "node01"},
            ],
        }))
        .unwrap()
    };
    server.apply(&svc);
    server.apply(&slice(true));
    let (mut ds, _) = start(&server).await;
    let local = "10.96.0.10/32".parse().unwrap();
    let s = wait_for(&mut ds.state, "web advertised", |s| {
        podroute::agent::services::service_prefixes(s).contains_key(&local)
    })
    .await;
    assert_eq!(s.services.keys().collect::<Vec<_>>(), ["shop/web"]);
    let kept: Vec<_> = s.endpoint_slices["shop/web-1"]
        .endpoints
        .iter()
        .map(|e| e.node.as_deref())
        .collect();
    assert_eq!(
        kept,
        [Some("master01")],
        "only this node's endpoints are kept"
    );

    // Not ready here: the /32 goes, the range stays.
    server.apply(&slice(false));
    let s = wait_for(&mut ds.state, "web not ready", |s| {
        !podroute::agent::services::service_prefixes(s).contains_key(&local)
    })
    .await;
    assert!(
        podroute::agent::services::service_prefixes(&s)
            .contains_key(&"10.96.0.0/12".parse().unwrap())
    );
}

#[tokio::test]
async fn a_cluster_that_refuses_services_still_syncs() {
    // seed_server serves no Service or EndpointSlice collection: the API answers 404.
    let server = seed_server().await;
    let (_ds, state) = start(&server).await;
    assert!(state.services.is_empty());
    assert_eq!(state.blocks.len(), 2);
}
