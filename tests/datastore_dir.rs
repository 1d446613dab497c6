//! The YAML-directory datastore: files added, changed, removed, broken.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use podroute::model::{EncapMode, Kind};
use podroute::state::{ClusterState, StateRx};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// Writes atomically (hidden temp file + rename), as editors and `kubectl` users would.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn wait_for(
    rx: &mut StateRx,
    what: &str,
    pred: impl FnMut(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: not reached; last state: {:#?}", rx.latest()),
    }
}

/// `kubectl get ippools,ipamblocks -o yaml` output: a `kind: List`.
const LIST: &str = r#"apiVersion: v1
items:
- apiVersion: crd.projectcalico.org/v1
  kind: IPPool
  metadata:
    name: default-ipv4-ippool
    resourceVersion: "732"
  spec:
    blockSize: 26
    cidr: 172.16.0.0/16
    ipipMode: Always
    natOutgoing: true
- apiVersion: crd.projectcalico.org/v1
  kind: IPAMBlock
  metadata:
    name: 172-16-241-64-26
  spec:
    Deleted: false
    affinity: host:master01
    allocations: [null, 0]
    attributes:
    - handle_id: k8s-pod-network.1
      secondary: {namespace: kube-system, pod: busybox-b8ffb94c4-c84gp, node: master01}
    cidr: 172.16.241.64/31
    strictAffinity: false
    unallocated: [0]
kind: List
metadata:
  resourceVersion: ""
"#;

const NODES: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: master01
  annotations:
    projectcalico.org/IPv4Address: 192.168.92.128/24
---
apiVersion: v1
kind: Node
metadata:
  name: node01
  annotations:
    projectcalico.org/IPv4Address: 192.168.92.129/24
---
"#;

#[tokio::test]
async fn files_added_changed_removed_and_broken() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "cluster.yaml", LIST);
    write(dir, "nodes.yml", NODES);
    std::fs::write(dir.join("README.txt"), "not read").unwrap();

    let mut ds = podroute::datastore::dir::spawn(dir, "master01", POLL);
    let s = tokio::time::timeout(WAIT, ds.state.synced())
        .await
        .unwrap()
        .unwrap();
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(s.pools["default-ipv4-ippool"].ipip_mode, EncapMode::Always);
    assert!(s.pools["default-ipv4-ippool"].nat_outgoing);
    let local = s.local_blocks().next().unwrap();
    assert_eq!(local.allocations[0].ip.to_string(), "172.16.241.65");
    assert_eq!(
        local.allocations[0].interface_name().as_deref(),
        Some("cali67beaa0e9f4")
    );
    assert_eq!(s.nodes.keys().collect::<Vec<_>>(), ["master01", "node01"]);

    // Added: a new file with a block of node01.
    write(
        dir,
        "node01-block.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata: {name: 172-16-196-128-26}\nspec: {affinity: \"host:node01\"}\n",
    );
    let s = wait_for(&mut ds.state, "added file", |s| s.blocks.len() == 2).await;
    assert_eq!(s.blocks_of("node01").count(), 1);

    // Changed: the seed's edit to CrossSubnet.
    write(
        dir,
        "cluster.yaml",
        &LIST.replace("ipipMode: Always", "ipipMode: CrossSubnet"),
    );
    wait_for(&mut ds.state, "changed file", |s| {
        s.pools["default-ipv4-ippool"].ipip_mode == EncapMode::CrossSubnet
    })
    .await;

    // Broken: invalid YAML is reported; its objects and every other file's stay.
    write(
        dir,
        "node01-block.yaml",
        "kind: IPAMBlock\nspec: [unclosed\n",
    );
    let s = wait_for(&mut ds.state, "broken file reported", |s| {
        !s.source_errors.is_empty()
    })
    .await;
    assert!(
        s.source_errors[0].contains("node01-block.yaml: not valid YAML"),
        "{:?}",
        s.source_errors
    );
    assert_eq!(
        s.blocks.len(),
        2,
        "the broken file's last objects stay in force"
    );
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(ds.counters.unreadable(), 1);

    // One bad document among good ones: that one is skipped and counted, the others used.
    write(
        dir,
        "extra.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: bad}\nspec: {cidr: 10.0.0.0/8, blockSize: 40}\n---\napiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: \"fd00:10::/64\"}\n",
    );
    let s = wait_for(&mut ds.state, "second file", |s| s.pools.contains_key("v6")).await;
    assert_eq!(
        s.rejected.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        [r#"IPPool "bad": blockSize 40 is outside 20..=32"#]
    );
    assert_eq!(ds.counters.get(Kind::IPPool), 1);

    // Fixed, then removed: the objects go away with the file.
    write(
        dir,
        "node01-block.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata: {name: 172-16-196-128-26}\nspec: {affinity: \"host:node01\"}\n",
    );
    wait_for(&mut ds.state, "fixed file", |s| s.source_errors.is_empty()).await;
    std::fs::remove_file(dir.join("node01-block.yaml")).unwrap();
    let s = wait_for(&mut ds.state, "removed file", |s| s.blocks.len() == 1).await;
    assert_eq!(s.blocks_of("node01").count(), 0);
    ds.shutdown().await;
}

#[tokio::test]
async fn a_document_of_the_wrong_shape_keeps_its_last_valid_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "pool.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16}\n",
    );
    let mut ds = podroute::datastore::dir::spawn(dir, "n1", POLL);
    tokio::time::timeout(WAIT, ds.state.synced())
        .await
        .unwrap()
        .unwrap();
    // blockSize must be a number: the document cannot be read at all.
    write(
        dir,
        "pool.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16, blockSize: big}\n",
    );
    let s = wait_for(&mut ds.state, "rejection", |s| !s.rejected.is_empty()).await;
    let message = s.rejected[0].to_string();
    assert!(
        message.starts_with(r#"IPPool "p": cannot be read: "#) && message.contains("pool.yaml"),
        "{message}"
    );
    assert_eq!(s.pools["p"].cidr, "10.0.0.0/16".parse().unwrap());
}

#[tokio::test]
async fn a_missing_directory_is_not_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let ds = podroute::datastore::dir::spawn(&missing, "n1", POLL);
    tokio::time::sleep(POLL * 5).await;
    assert!(!ds.state.is_synced());
    std::fs::create_dir(&missing).unwrap();
    let mut rx = ds.state.clone();
    let s = tokio::time::timeout(WAIT, rx.synced())
        .await
        .unwrap()
        .unwrap();
    assert!(s.pools.is_empty());
}

const POOL: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: pool}\nspec: {cidr: 172.16.0.0/16}\n";

fn block_doc(cidr: &str, host: &str) -> String {
    let name = cidr.replace(['.', '/'], "-");
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, affinity: \"host:{host}\"}}\n"
    )
}

/// The seed cluster in four files: pool, nodes, one block file per node.
fn cluster(dir: &Path) {
    write(dir, "pool.yaml", POOL);
    write(dir, "nodes.yaml", NODES);
    write(
        dir,
        "master01.yaml",
        &block_doc("172.16.241.64/26", "master01"),
    );
    write(
        dir,
        "node01.yaml",
        &block_doc("172.16.196.128/26", "node01"),
    );
}

fn options(wipe_confirm: Duration) -> podroute::datastore::dir::DirOptions {
    podroute::datastore::dir::DirOptions {
        poll: POLL,
        wipe_confirm,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_file_deleted_is_held_back_until_confirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let confirm = Duration::from_secs(2);
    let mut ds = podroute::datastore::dir::spawn_with(dir, "master01", options(confirm));
    let s = wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    assert!(s.suspect.is_empty(), "{:?}", s.suspect);

    for name in ["pool.yaml", "nodes.yaml", "master01.yaml", "node01.yaml"] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let started = std::time::Instant::now();
    let s = wait_for(&mut ds.state, "wipe held back", |s| !s.suspect.is_empty()).await;
    // Everything stays in force: the blocks (routes), the nodes (mesh peers), the pool.
    assert_eq!(s.blocks.len(), 2);
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.pools.len(), 1);
    let messages: Vec<_> = s.suspect.iter().map(|s| s.message.as_str()).collect();
    for kind in ["Node", "IPPool", "IPAMBlock"] {
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with(&format!("every {kind} vanished"))),
            "{messages:?}"
        );
    }

    let s = wait_for(&mut ds.state, "wipe applied", |s| s.blocks.is_empty()).await;
    assert!(
        started.elapsed() >= confirm,
        "applied before the confirm time"
    );
    assert!(s.nodes.is_empty() && s.pools.is_empty());
    assert!(s.suspect.is_empty(), "{:?}", s.suspect);
    ds.shutdown().await;
}

#[tokio::test]
async fn a_wipe_that_is_undone_in_time_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let mut ds =
        podroute::datastore::dir::spawn_with(dir, "master01", options(Duration::from_secs(600)));
    wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    std::fs::remove_file(dir.join("nodes.yaml")).unwrap();
    let s = wait_for(&mut ds.state, "nodes held back", |s| !s.suspect.is_empty()).await;
    assert_eq!(s.nodes.len(), 2);
    write(dir, "nodes.yaml", NODES);
    let s = wait_for(&mut ds.state, "back", |s| s.suspect.is_empty()).await;
    assert_eq!(s.nodes.len(), 2);
    ds.shutdown().await;
}

#[tokio::test]
async fn own_node_missing_is_held_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let mut ds =
        podroute::datastore::dir::spawn_with(dir, "master01", options(Duration::from_secs(600)));
    wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    // node01 stays, master01 (this node) goes.
    let only_node01 = NODES.split("---\n").nth(1).unwrap();
    write(dir, "nodes.yaml", only_node01);
    let s = wait_for(&mut ds.state, "own node held back", |s| {
        !s.suspect.is_empty()
    })
    .await;
    assert!(s.local().is_some(), "this node's Node is kept");
    assert_eq!(s.suspect.len(), 1, "{:?}", s.suspect);
    assert!(
        s.suspect[0]
            .message
            .starts_with("this node's Node \"master01\" vanished"),
        "{:?}",
        s.suspect
    );
    ds.shutdown().await;
}

#[tokio::test]
async fn a_truncated_block_file_does_not_withdraw_its_block() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let mut ds =
        podroute::datastore::dir::spawn_with(dir, "master01", options(Duration::from_secs(600)));
    wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    let path = dir.join("node01.yaml");
    let full = block_doc("172.16.196.128/26", "node01");

    // Truncated to nothing (in place, as `>` in a shell does) for many polls.
    std::fs::write(&path, "").unwrap();
    let s = wait_for(&mut ds.state, "emptied file held back", |s| {
        !s.suspect.is_empty()
    })
    .await;
    assert_eq!(s.blocks_of("node01").count(), 1);
    assert!(
        s.suspect[0]
            .message
            .contains("node01.yaml suddenly holds no objects"),
        "{:?}",
        s.suspect
    );
    tokio::time::sleep(POLL * 10).await;
    let s = ds.state.latest().unwrap();
    assert_eq!(s.blocks_of("node01").count(), 1);

    // Cut in the middle of a document: not valid YAML, the block stays.
    std::fs::write(&path, &full[..full.len() - 12]).unwrap();
    let s = wait_for(&mut ds.state, "truncated file reported", |s| {
        !s.source_errors.is_empty()
    })
    .await;
    assert_eq!(s.blocks_of("node01").count(), 1, "{:?}", s.source_errors);

    // Written completely again: back to normal.
    std::fs::write(&path, &full).unwrap();
    let s = wait_for(&mut ds.state, "restored", |s| {
        s.suspect.is_empty() && s.source_errors.is_empty()
    })
    .await;
    assert_eq!(s.blocks_of("node01").count(), 1);
    ds.shutdown().await;
}

#[tokio::test]
async fn a_file_over_the_size_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let mut ds = podroute::datastore::dir::spawn_with(
        dir,
        "master01",
        podroute::datastore::dir::DirOptions {
            max_file_size: 4096,
            ..options(Duration::from_secs(600))
        },
    );
    wait_for(&mut ds.state, "initial", |s| s.blocks.len() == 2).await;
    let mut big = block_doc("172.16.0.0/26", "node01");
    big.push_str(&format!("# {}\n", "x".repeat(5000)));
    write(dir, "big.yaml", &big);
    let s = wait_for(&mut ds.state, "refused", |s| !s.source_errors.is_empty()).await;
    assert!(
        s.source_errors[0].contains("big.yaml: 5")
            && s.source_errors[0].contains("is over the limit of 4096 bytes"),
        "{:?}",
        s.source_errors
    );
    assert_eq!(s.blocks.len(), 2, "the big file's block is not taken");
    ds.shutdown().await;
}

#[tokio::test]
async fn unknown_kinds_are_skipped_and_a_block_outside_every_pool_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    let mut junk = String::new();
    for i in 0..300 {
        junk.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}}}\ndata: {{k: v}}\n"
        ));
    }
    junk.push_str(&format!("---\n{}", block_doc("10.99.0.0/26", "node01")));
    write(dir, "junk.yaml", &junk);
    let mut ds = podroute::datastore::dir::spawn_with(dir, "master01", options(Duration::ZERO));
    let s = tokio::time::timeout(WAIT, ds.state.synced())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ds.counters.unreadable(), 300);
    assert!(s.source_errors.is_empty(), "{:?}", s.source_errors);
    assert_eq!(s.blocks.len(), 2, "{:?}", s.blocks.keys());
    assert_eq!(
        s.rejected.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        [
            r#"IPAMBlock "10-99-0-0-26": cidr 10.99.0.0/26 is inside no IPPool: the block is ignored (no blackhole, no route); create a pool that contains it or delete the block"#
        ]
    );
    ds.shutdown().await;
}

const SERVICE_CONFIG: &str = r#"apiVersion: crd.projectcalico.org/v1
kind: BGPConfiguration
metadata: {name: default}
spec:
  serviceClusterIPs: [{cidr: 10.96.0.0/12}, {cidr: "fd00:96::/112"}]
  serviceExternalIPs: [{cidr: 198.51.100.0/24}]
  serviceLoadBalancerIPs: [{cidr: 203.0.113.0/24}]
"#;

/// A Service (`kubectl get svc -o yaml` shape, with fields podroute ignores) and its
/// EndpointSlice with one endpoint per `(node, ready)`.
fn service_docs(name: &str, spec: &str, endpoints: &[(&str, bool)]) -> String {
    let mut eps = String::new();
    for (i, (node, ready)) in endpoints.iter().enumerate() {
        eps.push_str(&format!(
            "- addresses: [172.16.0.{i}]\n  nodeName: {node}\n  conditions: {{ready: {ready}}}\n"
        ));
    }
    if eps.is_empty() {
        eps.push_str("[]\n");
    } else {
        eps.insert(0, '\n');
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, uid: abc}}\n\
         spec:\n  ports: [{{port: 80, protocol: TCP}}]\n  selector: {{app: {name}}}\n{spec}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  \
         namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{port: 80}}]\nendpoints: {eps}"
    )
}

fn service_prefixes(s: &ClusterState) -> Vec<String> {
    podroute::agent::services::service_prefixes(s)
        .keys()
        .map(ToString::to_string)
        .collect()
}

const RANGES: [&str; 4] = [
    "10.96.0.0/12",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "fd00:96::/112",
];

fn with_ranges(extra: &[&str]) -> Vec<String> {
    let mut all: Vec<ipnet::IpNet> = RANGES
        .iter()
        .chain(extra)
        .map(|p| p.parse().unwrap())
        .collect();
    all.sort();
    all.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn services_and_endpoint_slices_decide_the_service_prefixes_advertised() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    write(dir, "bgp.yaml", SERVICE_CONFIG);
    // Local, dual-stack, LoadBalancer with an external IP: a ready endpoint on master01.
    write(
        dir,
        "web.yaml",
        &service_docs(
            "web",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  \
             externalIPs: [198.51.100.5, 172.31.0.1]\n  externalTrafficPolicy: Local\n\
             status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.9}]",
            &[("master01", true), ("node01", true)],
        ),
    );
    // Cluster policy: only the ranges.
    write(
        dir,
        "api.yaml",
        &service_docs(
            "api",
            "  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Cluster",
            &[("master01", true)],
        ),
    );
    // Local, but its only endpoint is on node01.
    write(
        dir,
        "db.yaml",
        &service_docs(
            "db",
            "  type: NodePort\n  clusterIP: 10.96.0.30\n  externalTrafficPolicy: Local",
            &[("node01", true)],
        ),
    );
    // internalTrafficPolicy Local with a ready endpoint here: its cluster IP.
    write(
        dir,
        "cache.yaml",
        &service_docs(
            "cache",
            "  clusterIP: 10.96.0.40\n  internalTrafficPolicy: Local",
            &[("master01", true)],
        ),
    );
    let want = with_ranges(&[
        "10.96.0.10/32",
        "10.96.0.40/32",
        "198.51.100.5/32",
        "203.0.113.9/32",
        "fd00:96::10/128",
    ]);
    let mut ds = podroute::datastore::dir::spawn_with(dir, "master01", options(WAIT));
    let s = wait_for(&mut ds.state, "services read", |s| {
        s.services.len() == 4 && s.endpoint_slices.len() == 4
    })
    .await;
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(service_prefixes(&s), want);
    // Only this node's endpoints are kept.
    assert!(
        s.endpoint_slices.values().all(|e| e
            .endpoints
            .iter()
            .all(|e| e.node.as_deref() == Some("master01"))),
        "{:?}",
        s.endpoint_slices
    );

    // The local endpoint of web turns not ready: its /32s go, the others stay.
    write(
        dir,
        "web.yaml",
        &service_docs(
            "web",
            "  type: LoadBalancer\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  \
             externalIPs: [198.51.100.5]\n  externalTrafficPolicy: Local\n\
             status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.9}]",
            &[("master01", false), ("node01", true)],
        ),
    );
    let want = with_ranges(&["10.96.0.40/32"]);
    let s = wait_for(&mut ds.state, "web not ready", |s| {
        service_prefixes(s) == want
    })
    .await;
    assert_eq!(s.services.len(), 4);

    // db's endpoint moves here: advertised; then db is deleted: withdrawn.
    write(
        dir,
        "db.yaml",
        &service_docs(
            "db",
            "  type: NodePort\n  clusterIP: 10.96.0.30\n  externalTrafficPolicy: Local",
            &[("master01", true)],
        ),
    );
    let want = with_ranges(&["10.96.0.30/32", "10.96.0.40/32"]);
    wait_for(&mut ds.state, "db here", |s| service_prefixes(s) == want).await;
    std::fs::remove_file(dir.join("db.yaml")).unwrap();
    let want = with_ranges(&["10.96.0.40/32"]);
    let s = wait_for(&mut ds.state, "db deleted", |s| service_prefixes(s) == want).await;
    assert!(!s.services.contains_key("shop/db"));
    assert!(s.suspect.is_empty(), "{:?}", s.suspect);

    // The CIDRs go: nothing is advertised any more.
    write(
        dir,
        "bgp.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512}\n",
    );
    wait_for(&mut ds.state, "ranges gone", |s| {
        service_prefixes(s).is_empty()
    })
    .await;
}

#[tokio::test]
async fn every_service_vanishing_at_once_is_held_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cluster(dir);
    write(dir, "bgp.yaml", SERVICE_CONFIG);
    write(
        dir,
        "web.yaml",
        &service_docs(
            "web",
            "  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local",
            &[("master01", true)],
        ),
    );
    let mut ds = podroute::datastore::dir::spawn_with(dir, "master01", options(WAIT));
    wait_for(&mut ds.state, "web", |s| {
        service_prefixes(s).contains(&"10.96.0.10/32".to_string())
    })
    .await;
    std::fs::remove_file(dir.join("web.yaml")).unwrap();
    let s = wait_for(&mut ds.state, "held back", |s| !s.suspect.is_empty()).await;
    let kinds: Vec<_> = s.suspect.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [Some(Kind::Service), Some(Kind::EndpointSlice)]);
    assert!(service_prefixes(&s).contains(&"10.96.0.10/32".to_string()));
}
