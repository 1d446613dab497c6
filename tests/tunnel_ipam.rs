//! The IPIP tunnel address allocated in Calico IPAM, against the in-repo API server
//! (tests/support/apiserver.rs) with the real `kube::Client`: the block and the handle in
//! Calico's shape, a compare-and-swap conflict and its retry, a later pod allocation that
//! never gets the tunnel address, an existing annotation left alone, release when IPIP is off;
//! the VXLAN addresses (IPv4 and IPv6) with their own handles; and the agent-side decision on
//! a cluster state from the kube datastore.

mod support;

use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use podroute::agent::tunnel_addr::{self, TunnelAddrAction};
use podroute::datastore::tunnel_ipam::{self, Ensured};
use podroute::model::crd::{
    BGPConfiguration, BGPPeer, BlockAffinity, IPAMBlock, IPAMHandle, IPPool, IPPoolSpec,
};
use serde_json::{Value, json};
use support::apiserver::FakeApiServer;

const NODE: &str = "master01";
const TUNNEL_ANNOTATION: &str = "projectcalico.org/IPv4IPIPTunnelAddr";

/// A /29 block of `host` as Calico IPAM writes it, with ordinals `used` taken by pods.
fn block_json(cidr: &str, host: &str, used: &[usize]) -> Value {
    let mut allocations = vec![Value::Null; 8];
    let mut attributes = Vec::new();
    for (i, o) in used.iter().enumerate() {
        allocations[*o] = json!(i);
        attributes.push(json!({
            "handle_id": format!("k8s-pod-network.pod{o}"),
            "secondary": { "namespace": "default", "pod": format!("pod{o}"), "node": host },
        }));
    }
    let unallocated: Vec<usize> = (0..8).filter(|o| !used.contains(o)).collect();
    json!({
        "metadata": { "name": cidr.replace(['.', ':', '/'], "-") },
        "spec": {
            "cidr": cidr,
            "affinity": format!("host:{host}"),
            "allocations": allocations,
            "unallocated": unallocated,
            "attributes": attributes,
            "sequenceNumber": 3,
            "sequenceNumberForAllocation": {},
            "strictAffinity": false,
            "deleted": false,
        },
    })
}

fn node(name: &str, annotations: Value) -> Value {
    json!({ "metadata": { "name": name, "annotations": annotations } })
}

async fn server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve::<Node>();
    server.serve::<IPPool>();
    server.serve::<IPAMBlock>();
    server.serve::<IPAMHandle>();
    server.serve::<BlockAffinity>();
    server.serve::<BGPPeer>();
    server.serve::<BGPConfiguration>();
    server.apply_json::<Node>(node(
        NODE,
        json!({ "projectcalico.org/IPv4Address": "192.168.92.128/24" }),
    ));
    server
}

fn cidr(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn block_of(server: &FakeApiServer, name: &str) -> Value {
    server.get_json::<IPAMBlock>(name).expect("block exists")["spec"].clone()
}

fn annotation(server: &FakeApiServer) -> Option<String> {
    server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"][TUNNEL_ANNOTATION]
        .as_str()
        .map(str::to_string)
}

/// What Calico IPAM does for the next pod: the first ordinal of `unallocated`, checked against
/// the lowest free ordinal of `allocations` (both must skip the tunnel address).
fn next_pod_ordinal(spec: &Value) -> usize {
    let first_unallocated = spec["unallocated"][0].as_u64().unwrap() as usize;
    let lowest_free = spec["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .position(Value::is_null)
        .unwrap();
    assert_eq!(first_unallocated, lowest_free, "{spec:#}");
    first_unallocated
}

#[tokio::test]
async fn allocation_writes_block_handle_and_annotation_in_calicos_shape() {
    let server = server().await;
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0, 1]));
    let client = server.client();

    let done = tunnel_ipam::ensure(&client, NODE, &[cidr("172.16.241.64/29")])
        .await
        .unwrap();
    assert_eq!(done, Ensured::Allocated("172.16.241.66".parse().unwrap()));

    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(
        spec["allocations"],
        json!([0, 1, 2, null, null, null, null, null])
    );
    assert_eq!(spec["unallocated"], json!([3, 4, 5, 6, 7]));
    assert_eq!(
        spec["attributes"][2],
        json!({
            "handle_id": "ipip-tunnel-addr-master01",
            "secondary": { "node": "master01", "type": "ipipTunnelAddress" },
        })
    );
    assert_eq!(spec["sequenceNumber"], json!(4));
    assert_eq!(spec["sequenceNumberForAllocation"], json!({ "2": 3 }));
    // Untouched fields survive the write.
    assert_eq!(spec["affinity"], json!("host:master01"));
    assert_eq!(spec["strictAffinity"], json!(false));

    let handle = server
        .get_json::<IPAMHandle>("ipip-tunnel-addr-master01")
        .expect("handle created");
    assert_eq!(handle["apiVersion"], json!("crd.projectcalico.org/v1"));
    assert_eq!(handle["kind"], json!("IPAMHandle"));
    assert_eq!(
        handle["spec"],
        json!({
            "handleID": "ipip-tunnel-addr-master01",
            "block": { "172.16.241.64/29": 1 },
            "deleted": false,
        })
    );
    assert_eq!(annotation(&server).as_deref(), Some("172.16.241.66"));
    // The node's other annotations stay.
    assert_eq!(
        server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"]["projectcalico.org/IPv4Address"],
        json!("192.168.92.128/24")
    );

    // Calico IPAM's next pod gets the next address, never the tunnel's.
    assert_eq!(next_pod_ordinal(&spec), 3);

    // Running again changes nothing: the annotation is there.
    let rv = server.resource_version();
    let again = tunnel_ipam::ensure(&client, NODE, &[cidr("172.16.241.64/29")])
        .await
        .unwrap();
    assert_eq!(again, Ensured::Existing("172.16.241.66".into()));
    assert_eq!(server.resource_version(), rv);
}

#[tokio::test]
async fn a_concurrent_block_update_is_a_conflict_then_a_retry_on_the_new_version() {
    let server = server().await;
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0]));
    // Between our read and our write, the CNI plugin gives ordinal 1 (the one we picked) to a
    // pod.
    server.interfere_before_next_put::<IPAMBlock>(
        "172-16-241-64-29",
        json!({ "spec": {
            "allocations": [0, 1, null, null, null, null, null, null],
            "unallocated": [2, 3, 4, 5, 6, 7],
            "attributes": [
                { "handle_id": "k8s-pod-network.pod0", "secondary": { "pod": "pod0", "node": NODE } },
                { "handle_id": "k8s-pod-network.racer", "secondary": { "pod": "racer", "node": NODE } },
            ],
            "sequenceNumber": 4,
        }}),
    );
    let client = server.client();
    let done = tunnel_ipam::ensure(&client, NODE, &[cidr("172.16.241.64/29")])
        .await
        .unwrap();
    assert_eq!(
        server.conflicts::<IPAMBlock>(),
        1,
        "the first write must conflict"
    );
    // The retry read the racer's version: ordinal 1 stays the racer's, we got 2.
    assert_eq!(done, Ensured::Allocated("172.16.241.66".parse().unwrap()));
    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(
        spec["allocations"],
        json!([0, 1, 2, null, null, null, null, null])
    );
    assert_eq!(
        spec["attributes"][1]["handle_id"],
        json!("k8s-pod-network.racer")
    );
    assert_eq!(
        spec["attributes"][2]["handle_id"],
        json!("ipip-tunnel-addr-master01")
    );
    assert_eq!(spec["unallocated"], json!([3, 4, 5, 6, 7]));
    assert_eq!(annotation(&server).as_deref(), Some("172.16.241.66"));
    assert_eq!(next_pod_ordinal(&spec), 3);
}

#[tokio::test]
async fn a_full_block_is_skipped_and_an_existing_annotation_is_honoured() {
    let server = server().await;
    server.apply_json::<IPAMBlock>(block_json(
        "172.16.241.64/29",
        NODE,
        &[0, 1, 2, 3, 4, 5, 6, 7],
    ));
    server.apply_json::<IPAMBlock>(block_json("172.16.241.72/29", NODE, &[]));
    let client = server.client();
    let done = tunnel_ipam::ensure(
        &client,
        NODE,
        &[cidr("172.16.241.64/29"), cidr("172.16.241.72/29")],
    )
    .await
    .unwrap();
    assert_eq!(done, Ensured::Allocated("172.16.241.72".parse().unwrap()));
    assert_eq!(
        server
            .get_json::<IPAMHandle>("ipip-tunnel-addr-master01")
            .unwrap()["spec"]["block"],
        json!({ "172.16.241.72/29": 1 })
    );

    // calico-node's allocation on another node: annotation present, nothing is written.
    server.apply_json::<Node>(node(
        "node01",
        json!({ TUNNEL_ANNOTATION: "172.16.196.128" }),
    ));
    server.apply_json::<IPAMBlock>(block_json("172.16.196.128/29", "node01", &[]));
    let rv = server.resource_version();
    let done = tunnel_ipam::ensure(&client, "node01", &[cidr("172.16.196.128/29")])
        .await
        .unwrap();
    assert_eq!(done, Ensured::Existing("172.16.196.128".into()));
    assert_eq!(server.resource_version(), rv, "nothing written");
    assert_eq!(
        block_of(&server, "172-16-196-128-29")["allocations"],
        json!([null, null, null, null, null, null, null, null])
    );
}

#[tokio::test]
async fn release_frees_the_address_deletes_the_handle_and_the_annotation() {
    let server = server().await;
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0]));
    let client = server.client();
    tunnel_ipam::ensure(&client, NODE, &[cidr("172.16.241.64/29")])
        .await
        .unwrap();
    // A pod after the tunnel address.
    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(next_pod_ordinal(&spec), 2);

    assert!(
        tunnel_ipam::release(&client, NODE, &[cidr("172.16.241.64/29")])
            .await
            .unwrap()
    );
    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(
        spec["allocations"],
        json!([0, null, null, null, null, null, null, null])
    );
    assert_eq!(spec["unallocated"], json!([2, 3, 4, 5, 6, 7, 1]));
    assert_eq!(spec["attributes"].as_array().unwrap().len(), 1);
    assert_eq!(spec["sequenceNumberForAllocation"], json!({}));
    assert!(
        server
            .get_json::<IPAMHandle>("ipip-tunnel-addr-master01")
            .is_none()
    );
    assert_eq!(annotation(&server), None);
    // Nothing left: a second release is a no-op.
    assert!(
        !tunnel_ipam::release(&client, NODE, &[cidr("172.16.241.64/29")])
            .await
            .unwrap()
    );
}

/// The agent's task, fed by the kube datastore: allocates while a pool uses IPIP, releases
/// when the pool is switched to `ipipMode: Never`.
#[tokio::test]
async fn the_agent_task_allocates_with_ipip_and_releases_on_never() {
    let server = server().await;
    let pool = |mode: &str| {
        IPPool::new(
            "default-ipv4-ippool",
            IPPoolSpec {
                cidr: Some("172.16.0.0/16".into()),
                block_size: Some(29),
                ipip_mode: Some(mode.into()),
                ..IPPoolSpec::default()
            },
        )
    };
    server.apply(&pool("Always"));
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0]));
    let client = server.client();
    let mut ds = podroute::datastore::kube::spawn(client.clone(), NODE);
    let state = tokio::time::timeout(Duration::from_secs(30), ds.state.synced())
        .await
        .expect("initial sync")
        .unwrap();
    assert_eq!(
        tunnel_addr::wanted(&state),
        TunnelAddrAction::Allocate(vec![cidr("172.16.241.64/29")])
    );
    let task = tunnel_addr::spawn(client.clone(), NODE.into(), ds.state.clone());

    // The annotation comes back through the watch.
    let mut rx = ds.state.clone();
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.local().and_then(|n| n.ipip_tunnel_addr).is_some()),
    )
    .await
    .expect("annotation written and watched")
    .unwrap();
    assert_eq!(
        state.local().and_then(|n| n.ipip_tunnel_addr),
        Some("172.16.241.65".parse().unwrap())
    );
    assert_eq!(tunnel_addr::wanted(&state), TunnelAddrAction::Nothing);

    server.apply(&pool("Never"));
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.local().is_some_and(|n| n.ipip_tunnel_addr.is_none())),
    )
    .await
    .expect("annotation removed")
    .unwrap();
    assert_eq!(tunnel_addr::wanted(&state), TunnelAddrAction::Nothing);
    assert!(
        server
            .get_json::<IPAMHandle>("ipip-tunnel-addr-master01")
            .is_none()
    );
    assert_eq!(
        block_of(&server, "172-16-241-64-29")["allocations"],
        json!([0, null, null, null, null, null, null, null])
    );
    task.abort();
}

/// The VXLAN tunnel address, as calico-node allocates it: its own handle
/// `vxlan-tunnel-addr-<node>` and attribute type, `projectcalico.org/IPv4VXLANTunnelAddr`
/// with the VTEP MAC in `projectcalico.org/IPv4VXLANTunnelMACAddr`, next to an IPIP one in
/// the same block; released when no pool uses VXLAN any more.
#[tokio::test]
async fn vxlan_tunnel_address_has_its_own_handle_annotation_and_mac() {
    use tunnel_ipam::TunnelKind;
    let server = server().await;
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0]));
    let client = server.client();
    let blocks = [cidr("172.16.241.64/29")];
    let ipip = tunnel_ipam::ensure_kind(&client, NODE, &blocks, TunnelKind::Ipip)
        .await
        .unwrap();
    let vxlan = tunnel_ipam::ensure_kind(&client, NODE, &blocks, TunnelKind::Vxlan)
        .await
        .unwrap();
    assert_eq!(ipip, Ensured::Allocated("172.16.241.65".parse().unwrap()));
    assert_eq!(vxlan, Ensured::Allocated("172.16.241.66".parse().unwrap()));
    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(
        spec["attributes"][2],
        json!({
            "handle_id": "vxlan-tunnel-addr-master01",
            "secondary": { "node": "master01", "type": "vxlanTunnelAddress" },
        })
    );
    assert_eq!(next_pod_ordinal(&spec), 3);
    assert_eq!(
        server
            .get_json::<IPAMHandle>("vxlan-tunnel-addr-master01")
            .expect("handle created")["spec"]["block"],
        json!({ "172.16.241.64/29": 1 })
    );
    let annotations = server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"].clone();
    assert_eq!(
        annotations["projectcalico.org/IPv4VXLANTunnelAddr"],
        json!("172.16.241.66")
    );
    let mac = podroute::plan::tunnels::default_vtep_mac(NODE, true).to_string();
    assert_eq!(
        annotations["projectcalico.org/IPv4VXLANTunnelMACAddr"],
        json!(mac)
    );
    assert_eq!(annotations[TUNNEL_ANNOTATION], json!("172.16.241.65"));

    // No pool uses VXLAN: released (allocation, handle, both annotations); IPIP's stays.
    assert!(
        tunnel_ipam::release_kind(&client, NODE, &blocks, TunnelKind::Vxlan)
            .await
            .unwrap()
    );
    let spec = block_of(&server, "172-16-241-64-29");
    assert_eq!(spec["allocations"][2], Value::Null);
    assert_eq!(spec["allocations"][1], json!(1));
    assert!(
        server
            .get_json::<IPAMHandle>("vxlan-tunnel-addr-master01")
            .is_none()
    );
    let annotations = server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"].clone();
    assert!(
        annotations
            .get("projectcalico.org/IPv4VXLANTunnelAddr")
            .is_none()
    );
    assert!(
        annotations
            .get("projectcalico.org/IPv4VXLANTunnelMACAddr")
            .is_none()
    );
    assert_eq!(annotations[TUNNEL_ANNOTATION], json!("172.16.241.65"));
}

/// The IPv6 VXLAN tunnel address, as calico-node allocates it in a dual-stack cluster: in
/// one of the node's IPv6 blocks, handle `vxlan-v6-tunnel-addr-<node>`, attribute type
/// `vxlanV6TunnelAddress`, `projectcalico.org/IPv6VXLANTunnelAddr` with the VTEP MAC in
/// `projectcalico.org/IPv6VXLANTunnelMACAddr`; the IPv4 one beside it in an IPv4 block; the
/// IPv6 one released (and only it) when the IPv6 pool stops using VXLAN.
#[tokio::test]
async fn the_agent_task_allocates_the_ipv6_vxlan_address_and_releases_it_on_never() {
    let server = server().await;
    let pool = |name: &str, cidr: &str, block_size: i64, mode: &str| {
        IPPool::new(
            name,
            IPPoolSpec {
                cidr: Some(cidr.into()),
                block_size: Some(block_size),
                vxlan_mode: Some(mode.into()),
                ..IPPoolSpec::default()
            },
        )
    };
    server.apply(&pool("default-ipv4-ippool", "172.16.0.0/16", 29, "Always"));
    server.apply(&pool("default-ipv6-ippool", "fd00:10::/112", 125, "Always"));
    server.apply_json::<IPAMBlock>(block_json("172.16.241.64/29", NODE, &[0]));
    server.apply_json::<IPAMBlock>(block_json("fd00:10::/125", NODE, &[0]));
    // Another node's IPv6 block: never used for this node's address.
    server.apply_json::<IPAMBlock>(block_json("fd00:10::8/125", "node02", &[]));
    let client = server.client();
    let mut ds = podroute::datastore::kube::spawn(client.clone(), NODE);
    let state = tokio::time::timeout(Duration::from_secs(30), ds.state.synced())
        .await
        .expect("initial sync")
        .unwrap();
    use tunnel_ipam::TunnelKind;
    assert_eq!(
        tunnel_addr::wanted_for(&state, TunnelKind::VxlanV6),
        TunnelAddrAction::Allocate(vec![cidr("fd00:10::/125")]),
        "only the node's own IPv6 blocks"
    );
    assert_eq!(
        tunnel_addr::wanted_for(&state, TunnelKind::Vxlan),
        TunnelAddrAction::Allocate(vec![cidr("172.16.241.64/29")])
    );
    assert_eq!(
        tunnel_addr::wanted_for(&state, TunnelKind::Ipip),
        TunnelAddrAction::Nothing
    );
    let task = tunnel_addr::spawn(client.clone(), NODE.into(), ds.state.clone());
    let mut rx = ds.state.clone();
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| {
            s.local()
                .is_some_and(|n| n.vxlan.ipv6.is_some() && n.vxlan.ipv4.is_some())
        }),
    )
    .await
    .expect("both annotations written and watched")
    .unwrap();
    let local = state.local().unwrap();
    assert_eq!(local.vxlan.ipv6, Some("fd00:10::1".parse().unwrap()));
    assert_eq!(local.vxlan.ipv4, Some("172.16.241.65".parse().unwrap()));
    assert_eq!(
        tunnel_addr::wanted_for(&state, TunnelKind::VxlanV6),
        TunnelAddrAction::Nothing
    );
    let spec = block_of(&server, "fd00-10---125");
    assert_eq!(spec["allocations"][1], json!(1));
    assert_eq!(
        spec["attributes"][1],
        json!({
            "handle_id": "vxlan-v6-tunnel-addr-master01",
            "secondary": { "node": "master01", "type": "vxlanV6TunnelAddress" },
        })
    );
    assert_eq!(
        next_pod_ordinal(&spec),
        2,
        "the next pod skips the VTEP address"
    );
    assert_eq!(
        server
            .get_json::<IPAMHandle>("vxlan-v6-tunnel-addr-master01")
            .expect("handle created")["spec"]["block"],
        json!({ "fd00:10::/125": 1 })
    );
    assert_eq!(
        block_of(&server, "fd00-10--8-125")["allocations"],
        json!([null, null, null, null, null, null, null, null]),
        "another node's block is not touched"
    );
    let annotations = server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"].clone();
    assert_eq!(
        annotations["projectcalico.org/IPv6VXLANTunnelAddr"],
        json!("fd00:10::1")
    );
    let mac6 = podroute::plan::tunnels::default_vtep_mac(NODE, false).to_string();
    assert_ne!(
        mac6,
        podroute::plan::tunnels::default_vtep_mac(NODE, true).to_string()
    );
    assert_eq!(
        annotations["projectcalico.org/IPv6VXLANTunnelMACAddr"],
        json!(mac6)
    );

    // The IPv6 pool stops using VXLAN: its address goes, the IPv4 one stays.
    server.apply(&pool("default-ipv6-ippool", "fd00:10::/112", 125, "Never"));
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.local().is_some_and(|n| n.vxlan.ipv6.is_none())),
    )
    .await
    .expect("IPv6 annotation removed")
    .unwrap();
    assert_eq!(
        state.local().unwrap().vxlan.ipv4,
        Some("172.16.241.65".parse().unwrap())
    );
    assert!(
        server
            .get_json::<IPAMHandle>("vxlan-v6-tunnel-addr-master01")
            .is_none()
    );
    assert_eq!(
        block_of(&server, "fd00-10---125")["allocations"],
        json!([0, null, null, null, null, null, null, null])
    );
    let annotations = server.get_json::<Node>(NODE).unwrap()["metadata"]["annotations"].clone();
    assert!(
        annotations
            .get("projectcalico.org/IPv6VXLANTunnelMACAddr")
            .is_none()
    );
    assert!(
        server
            .get_json::<IPAMHandle>("vxlan-tunnel-addr-master01")
            .is_some()
    );
    task.abort();
}
