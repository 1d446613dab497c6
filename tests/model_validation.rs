//! Every validation rule, with the exact message a user sees in the log.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use podroute::datastore::{Inputs, RejectCounters, StateBuilder};
use podroute::model::crd::{BGPConfiguration, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use podroute::model::{
    AddressSource, BgpConfig, Block, BlockClaim, Kind, NodeInfo, Peer, Pool, resolve_overlaps,
};

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).unwrap()
}

fn pool(name: &str, spec: &str) -> IPPool {
    yaml(&format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n{spec}"
    ))
}

fn pool_error(spec: &str) -> String {
    Pool::from_resource(&pool("pool-a", spec))
        .unwrap_err()
        .to_string()
}

fn block(name: &str, spec: &str) -> IPAMBlock {
    yaml(&format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {name}\nspec:\n{spec}"
    ))
}

fn block_error(spec: &str) -> String {
    Block::from_resource(&block("10-0-0-0-30", spec))
        .unwrap_err()
        .to_string()
}

#[test]
fn pool_cidr_unparseable() {
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/33\n"),
        r#"IPPool "pool-a": cidr "172.16.0.0/33" is not a valid CIDR (expected e.g. 172.16.0.0/16)"#
    );
    assert_eq!(
        pool_error("  cidr: banana\n"),
        r#"IPPool "pool-a": cidr "banana" is not a valid CIDR (expected e.g. 172.16.0.0/16)"#
    );
}

#[test]
fn pool_cidr_missing() {
    assert_eq!(
        pool_error("  blockSize: 26\n"),
        r#"IPPool "pool-a": cidr is missing"#
    );
}

#[test]
fn pool_cidr_not_masked() {
    assert_eq!(
        pool_error("  cidr: 172.16.1.0/16\n"),
        r#"IPPool "pool-a": cidr 172.16.1.0/16 has host bits set; write the network address 172.16.0.0/16"#
    );
}

#[test]
fn pool_block_size_out_of_range_v4() {
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/16\n  blockSize: 33\n"),
        r#"IPPool "pool-a": blockSize 33 is outside 20..=32"#
    );
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/16\n  blockSize: 19\n"),
        r#"IPPool "pool-a": blockSize 19 is outside 20..=32"#
    );
}

#[test]
fn pool_block_size_out_of_range_v6() {
    assert_eq!(
        pool_error("  cidr: fd00:10::/64\n  blockSize: 112\n"),
        r#"IPPool "pool-a": blockSize 112 is outside 116..=128"#
    );
    assert_eq!(
        pool_error("  cidr: fd00:10::/64\n  blockSize: 129\n"),
        r#"IPPool "pool-a": blockSize 129 is outside 116..=128"#
    );
}

#[test]
fn pool_block_size_smaller_than_pool_prefix() {
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/24\n  blockSize: 22\n"),
        r#"IPPool "pool-a": blockSize 22 is smaller than the pool's prefix length 24: a block cannot be larger than its pool"#
    );
    // Equal is fine: the pool is one block.
    assert!(Pool::from_resource(&pool("p", "  cidr: 172.16.0.0/26\n")).is_ok());
}

#[test]
fn pool_ipip_and_vxlan_both_on() {
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/16\n  ipipMode: CrossSubnet\n  vxlanMode: Always\n"),
        r#"IPPool "pool-a": ipipMode CrossSubnet and vxlanMode Always are both on; enable at most one encapsulation"#
    );
    // Never on one side is fine.
    assert!(
        Pool::from_resource(&pool(
            "p",
            "  cidr: 172.16.0.0/16\n  ipipMode: Never\n  vxlanMode: Always\n"
        ))
        .is_ok()
    );
}

#[test]
fn pool_ipip_on_ipv6() {
    assert_eq!(
        pool_error("  cidr: fd00:10::/64\n  ipipMode: Always\n"),
        r#"IPPool "pool-a": ipipMode Always is not allowed on an IPv6 pool (IPIP carries IPv4 only); use Never"#
    );
}

#[test]
fn pool_unknown_encapsulation_mode() {
    assert_eq!(
        pool_error("  cidr: 172.16.0.0/16\n  vxlanMode: always\n"),
        r#"IPPool "pool-a": vxlanMode "always" is not one of Never, Always, CrossSubnet"#
    );
}

#[test]
fn pool_defaults_and_legacy_fields() {
    let p = Pool::from_resource(&pool(
        "p",
        "  cidr: fd00:10::/64\n  nat-outgoing: true\n  ipip: {enabled: false}\n  ipipMode: \"\"\n  futureField: 3\n",
    ))
    .unwrap();
    assert_eq!(p.block_size, 122);
    assert!(!p.nat_outgoing, "legacy nat-outgoing is not natOutgoing");
    let p = Pool::from_resource(&pool("p", "  cidr: 10.0.0.0/8\n  natOutgoing: true\n")).unwrap();
    assert_eq!(p.block_size, 26);
    assert!(p.nat_outgoing);
}

#[test]
fn overlapping_pools_keep_the_older_then_by_name() {
    let a = pool("zeta", "  cidr: 172.16.0.0/16\n");
    let mut a = a;
    a.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2021-03-30T04:16:40Z".parse().unwrap(),
    ));
    let b = pool("alpha", "  cidr: 172.16.4.0/24\n");
    let c = pool("beta", "  cidr: 172.16.128.0/17\n");
    let d = pool("other", "  cidr: 10.0.0.0/8\n");
    let pools = [&a, &b, &c, &d]
        .iter()
        .map(|p| Pool::from_resource(p).unwrap())
        .collect();
    let (kept, rejected) = resolve_overlaps(pools);
    let kept: Vec<_> = kept.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(kept, ["other", "zeta"]);
    let rejected: Vec<_> = rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        rejected,
        [
            r#"IPPool "alpha": cidr 172.16.4.0/24 overlaps IPPool "zeta" (172.16.0.0/16), which takes precedence (created earlier, or by name order); this pool is ignored"#,
            r#"IPPool "beta": cidr 172.16.128.0/17 overlaps IPPool "zeta" (172.16.0.0/16), which takes precedence (created earlier, or by name order); this pool is ignored"#,
        ]
    );
    // Without creation times, name order decides.
    let x = Pool::from_resource(&pool("b-pool", "  cidr: 10.1.0.0/16\n")).unwrap();
    let y = Pool::from_resource(&pool("a-pool", "  cidr: 10.1.0.0/24\n")).unwrap();
    let (kept, rejected) = resolve_overlaps(vec![x, y]);
    assert_eq!(kept[0].name, "a-pool");
    assert_eq!(
        rejected[0].to_string(),
        r#"IPPool "b-pool": cidr 10.1.0.0/16 overlaps IPPool "a-pool" (10.1.0.0/24), which takes precedence (created earlier, or by name order); this pool is ignored"#
    );
}

#[test]
fn block_cidr_unparseable_and_not_masked() {
    assert_eq!(
        block_error("  cidr: 10.0.0.0/300\n"),
        r#"IPAMBlock "10-0-0-0-30": cidr "10.0.0.0/300" is not a valid CIDR (expected e.g. 172.16.0.0/16)"#
    );
    assert_eq!(
        block_error("  cidr: 10.0.0.1/30\n"),
        r#"IPAMBlock "10-0-0-0-30": cidr 10.0.0.1/30 has host bits set; write the network address 10.0.0.0/30"#
    );
    assert_eq!(
        Block::from_resource(&block("my-block", "  affinity: host:n1\n"))
            .unwrap_err()
            .to_string(),
        r#"IPAMBlock "my-block": spec.cidr is missing and the name is not a CIDR written with dashes (e.g. 172-16-196-128-26)"#
    );
}

#[test]
fn block_affinity_must_be_host_or_virtual() {
    assert_eq!(
        block_error("  cidr: 10.0.0.0/30\n  affinity: node01\n"),
        r#"IPAMBlock "10-0-0-0-30": affinity "node01" must be "host:<node>" or "virtual:<name>""#
    );
    assert_eq!(
        block_error("  cidr: 10.0.0.0/30\n  affinity: \"host:\"\n"),
        r#"IPAMBlock "10-0-0-0-30": affinity "host:" must be "host:<node>" or "virtual:<name>""#
    );
    let b = Block::from_resource(&block("10-0-0-0-30", "  affinity: virtual:lb\n")).unwrap();
    assert_eq!(
        b.affinity,
        Some(podroute::model::Affinity::Virtual("lb".into()))
    );
    assert_eq!(b.host(), None);
}

#[test]
fn block_allocations_length_must_match_block_size() {
    assert_eq!(
        block_error("  cidr: 10.0.0.0/30\n  allocations: [null, null, null]\n  attributes: []\n"),
        r#"IPAMBlock "10-0-0-0-30": allocations has 3 entries but a /30 block has 4 addresses"#
    );
}

#[test]
fn block_allocation_index_must_point_into_attributes() {
    let spec = "  cidr: 10.0.0.0/30\n  allocations: [0, null, 2, null]\n  attributes:\n  - handle_id: a\n  - handle_id: b\n";
    assert_eq!(
        block_error(spec),
        r#"IPAMBlock "10-0-0-0-30": allocations[2] = 2 is out of range of attributes (2 entries)"#
    );
    let spec = "  cidr: 10.0.0.0/30\n  allocations: [-1, null, null, null]\n  attributes: []\n";
    assert_eq!(
        block_error(spec),
        r#"IPAMBlock "10-0-0-0-30": allocations[0] = -1 is out of range of attributes (0 entries)"#
    );
}

#[test]
fn block_allocations_give_pod_addresses_and_borrowed_ips() {
    let spec = r#"  cidr: 172.16.241.64/30
  affinity: host:master01
  strictAffinity: false
  sequenceNumber: 7
  sequenceNumberForAllocation: {"1": 3}
  unallocated: [0, 3]
  allocations: [null, 0, 1, null]
  attributes:
  - handle_id: k8s-pod-network.abc
    secondary:
      namespace: kube-system
      pod: busybox-b8ffb94c4-c84gp
      node: master01
      timestamp: "2021-03-30 04:20:00"
  - handle_id: k8s-pod-network.def
    secondary:
      namespace: default
      pod: web
      node: node01
"#;
    let b = Block::from_resource(&block("172-16-241-64-30", spec)).unwrap();
    assert_eq!(b.allocations.len(), 2);
    assert_eq!(b.allocations[0].ip.to_string(), "172.16.241.65");
    assert_eq!(
        b.allocations[0].interface_name().as_deref(),
        Some("cali67beaa0e9f4")
    );
    let borrowed: Vec<_> = b
        .borrowed()
        .map(|a| (a.ip.to_string(), a.node.clone()))
        .collect();
    assert_eq!(
        borrowed,
        [("172.16.241.66".to_string(), Some("node01".to_string()))]
    );
}

#[test]
fn block_affinity_objects() {
    let ok: BlockAffinity = yaml(
        "metadata: {name: node01-172-16-196-128-26}\nspec: {cidr: 172.16.196.128/26, node: node01, state: confirmed, deleted: \"false\"}\n",
    );
    let claim = BlockClaim::from_resource(&ok).unwrap();
    assert_eq!(claim.node, "node01");
    assert!(!claim.deleted);
    let legacy_bool: BlockAffinity =
        yaml("metadata: {name: x}\nspec: {cidr: 10.0.0.0/26, node: n, deleted: true}\n");
    assert!(BlockClaim::from_resource(&legacy_bool).unwrap().deleted);
    let bad: BlockAffinity = yaml("metadata: {name: x}\nspec: {cidr: 10.0.0.0/26}\n");
    assert_eq!(
        BlockClaim::from_resource(&bad).unwrap_err().to_string(),
        r#"BlockAffinity "x": node is missing"#
    );
}

#[test]
fn peers() {
    let peer =
        |spec: &str| -> BGPPeer { yaml(&format!("metadata: {{name: tor}}\nspec: {spec}\n")) };
    let p = Peer::from_resource(&peer(
        "{peerIP: \"192.168.92.1:1179\", asNumber: 65001, node: master01, maxRestartTime: 2m30s, keepOriginalNextHop: true, password: {secretKeyRef: {name: bgp, key: pw}}}",
    ))
    .unwrap();
    assert_eq!(p.peer_ip, Some("192.168.92.1".parse().unwrap()));
    assert_eq!(p.port, Some(1179));
    assert_eq!(p.as_number, Some(65001));
    assert_eq!(
        p.max_restart_time,
        Some(std::time::Duration::from_secs(150))
    );
    assert_eq!(p.next_hop_mode, podroute::model::bgp::NextHopMode::Keep);
    assert_eq!(p.password.unwrap().key, "pw");
    let p = Peer::from_resource(&peer("{peerIP: \"[fd00::1]:179\"}")).unwrap();
    assert_eq!(p.peer_ip, Some("fd00::1".parse().unwrap()));
    let err = |spec: &str| Peer::from_resource(&peer(spec)).unwrap_err().to_string();
    assert_eq!(
        err("{peerIP: 300.1.1.1}"),
        r#"BGPPeer "tor": peerIP "300.1.1.1" is not an IP address, IPv4:port or [IPv6]:port"#
    );
    assert_eq!(
        err("{peerIP: 10.0.0.1, peerSelector: all()}"),
        r#"BGPPeer "tor": peerIP and peerSelector are both set; use one of them"#
    );
    assert_eq!(
        err("{asNumber: 65000}"),
        r#"BGPPeer "tor": neither peerIP nor peerSelector is set"#
    );
    assert_eq!(
        err("{peerIP: 10.0.0.1, node: a, nodeSelector: all()}"),
        r#"BGPPeer "tor": node and nodeSelector are both set; use one of them"#
    );
    assert_eq!(
        err("{peerIP: 10.0.0.1, asNumber: 4294967296}"),
        r#"BGPPeer "tor": asNumber 4294967296 is outside 1..=4294967295"#
    );
    assert_eq!(
        err("{peerIP: 10.0.0.1, maxRestartTime: soon}"),
        r#"BGPPeer "tor": maxRestartTime "soon" is not a duration such as 120s or 2m30s"#
    );
}

#[test]
fn bgp_configuration_defaults_and_errors() {
    let cfg: BGPConfiguration = yaml("metadata: {name: default}\n");
    let c = BgpConfig::from_resource(&cfg).unwrap();
    assert_eq!(
        (c.as_number, c.node_to_node_mesh, c.listen_port),
        (64512, true, 179)
    );
    let cfg: BGPConfiguration = yaml(
        "metadata: {name: default}\nspec: {asNumber: 65010, nodeToNodeMeshEnabled: false, listenPort: 1790, serviceClusterIPs: [{cidr: 10.96.0.0/12}]}\n",
    );
    let c = BgpConfig::from_resource(&cfg).unwrap();
    assert_eq!(
        (c.as_number, c.node_to_node_mesh, c.listen_port),
        (65010, false, 1790)
    );
    assert_eq!(c.service_cluster_ips, vec!["10.96.0.0/12".parse().unwrap()]);
    let cfg: BGPConfiguration = yaml("metadata: {name: default}\nspec: {listenPort: 70000}\n");
    assert_eq!(
        BgpConfig::from_resource(&cfg).unwrap_err().to_string(),
        r#"BGPConfiguration "default": listenPort 70000 is outside 1..=65535"#
    );
}

fn node(text: &str) -> Node {
    yaml(text)
}

#[test]
fn nodes_read_calico_annotations_with_internal_ip_fallback() {
    let n = node(
        r#"apiVersion: v1
kind: Node
metadata:
  name: master01
  labels: {kubernetes.io/hostname: master01}
  annotations:
    projectcalico.org/IPv4Address: 192.168.92.128/24
    projectcalico.org/ASNumber: "65001"
    projectcalico.org/RouteReflectorClusterID: 224.0.0.1
    projectcalico.org/IPv4IPIPTunnelAddr: 172.16.241.64
status:
  addresses:
  - {type: InternalIP, address: 10.9.9.9}
"#,
    );
    let info = NodeInfo::from_node(&n).unwrap();
    assert_eq!(info.ipv4, Some("192.168.92.128/24".parse().unwrap()));
    assert_eq!(info.ipv4_addr(), Some("192.168.92.128".parse().unwrap()));
    assert_eq!(info.ipv4_source, Some(AddressSource::Annotation));
    assert_eq!(info.as_number, Some(65001));
    assert_eq!(
        info.route_reflector_cluster_id,
        Some("224.0.0.1".parse().unwrap())
    );
    assert_eq!(
        info.ipip_tunnel_addr,
        Some("172.16.241.64".parse().unwrap())
    );
    assert_eq!(
        info.labels
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("master01")
    );

    let n = node(
        "metadata: {name: node01}\nstatus:\n  addresses:\n  - {type: Hostname, address: node01}\n  - {type: InternalIP, address: 192.168.92.129}\n",
    );
    let info = NodeInfo::from_node(&n).unwrap();
    assert_eq!(info.ipv4, Some("192.168.92.129/32".parse().unwrap()));
    assert_eq!(info.ipv4_source, Some(AddressSource::InternalIp));
    assert_eq!(info.internal_ipv6, None);

    // A dual-stack Node: the IPv6 InternalIP is kept for IP6 autodetection only; without
    // projectcalico.org/IPv6Address the node has no IPv6 address for the mesh.
    let n = node(
        "metadata: {name: node02}\nstatus:\n  addresses:\n  - {type: InternalIP, address: \"fd00:92::130\"}\n  - {type: InternalIP, address: 192.168.92.130}\n",
    );
    let info = NodeInfo::from_node(&n).unwrap();
    assert_eq!(info.internal_ipv6, Some("fd00:92::130".parse().unwrap()));
    assert_eq!(info.ipv6, None);
    assert_eq!(info.ipv4, Some("192.168.92.130/32".parse().unwrap()));

    let n = node("metadata: {name: n3, annotations: {projectcalico.org/IPv4Address: not-an-ip}}\n");
    assert_eq!(
        NodeInfo::from_node(&n).unwrap_err().to_string(),
        r#"Node "n3": annotation projectcalico.org/IPv4Address "not-an-ip" is not an IPv4 address with prefix (e.g. 10.0.0.5/24)"#
    );
    let n = node("metadata: {name: n4, annotations: {projectcalico.org/ASNumber: \"0\"}}\n");
    assert_eq!(
        NodeInfo::from_node(&n).unwrap_err().to_string(),
        r#"Node "n4": annotation projectcalico.org/ASNumber "0" is not an AS number in 1..=4294967295"#
    );
}

/// A bad object is skipped and counted once, the others are untouched, and an edit that
/// breaks a valid object keeps its last valid version.
#[test]
fn builder_skips_bad_objects_and_keeps_last_good_versions() {
    let counters = Arc::new(RejectCounters::default());
    let mut builder = StateBuilder::new("master01", counters.clone());
    let good = Arc::new(pool("pool-a", "  cidr: 172.16.0.0/16\n"));
    let other = Arc::new(pool("pool-b", "  cidr: 10.0.0.0/16\n"));
    let bad_new = Arc::new(pool("pool-c", "  cidr: 192.168.0.0/16\n  blockSize: 33\n"));
    let mut inputs = Inputs {
        pools: vec![good.clone(), other.clone(), bad_new.clone()],
        ..Inputs::default()
    };
    let s1 = builder.build(&inputs);
    assert_eq!(s1.pools.keys().collect::<Vec<_>>(), ["pool-a", "pool-b"]);
    assert_eq!(
        s1.rejected
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        [r#"IPPool "pool-c": blockSize 33 is outside 20..=32"#]
    );
    assert_eq!(counters.get(Kind::IPPool), 1);

    // Rebuilding with the same inputs neither recounts nor publishes a new revision.
    let s2 = builder.build(&inputs);
    assert!(Arc::ptr_eq(&s1, &s2));
    assert_eq!(counters.get(Kind::IPPool), 1);

    // pool-a edited into an invalid version: its last valid version stays in force.
    inputs.pools[0] = Arc::new(pool(
        "pool-a",
        "  cidr: 172.16.0.0/16\n  ipipMode: Sometimes\n",
    ));
    let s3 = builder.build(&inputs);
    assert_eq!(s3.pools["pool-a"].cidr, "172.16.0.0/16".parse().unwrap());
    assert_eq!(s3.pools["pool-b"], s1.pools["pool-b"]);
    assert_eq!(s3.rejected.len(), 2);
    assert_eq!(counters.get(Kind::IPPool), 2);
    assert!(s3.revision > s1.revision);

    // Deleting pool-a drops it, including its last valid version.
    inputs.pools.remove(0);
    let s4 = builder.build(&inputs);
    assert_eq!(s4.pools.keys().collect::<Vec<_>>(), ["pool-b"]);
}
