//! What the lab cluster consists of: nodes with their addresses, blocks and pods, the pool,
//! extra BGP peers; the YAML-directory datastore written from it; and the route plan each
//! node is expected to end up with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use crate::plan::{
    Allocation, BlockSpec, EncapMode, LearnedRoute, LocalNode, PeerNode, PlanInput, PoolSpec,
    RoutePlan, plan, workload_interface_name,
};

/// Name of the host NIC in every lab node, as in seed 001.
pub const NIC: &str = "ens33";

/// A pod: its own namespace behind a `cali*` veth on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, ip: Ipv4Addr) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            ip,
        }
    }

    /// The host-side interface, `cali` + 11 hex digits of sha1("namespace.pod").
    pub fn interface(&self) -> String {
        workload_interface_name(&self.namespace, &self.name)
    }
}

/// A node: a namespace with `ens33` on its subnet's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// Address with the subnet prefix, as in `projectcalico.org/IPv4Address`.
    pub addr: Ipv4Net,
    /// The node's IPAM block; `None` once it was released.
    pub block: Option<Ipv4Net>,
    /// Pods on this node; their addresses lie in `block`.
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }
}

/// A global `BGPPeer` (no node selector): every node peers with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpPeerSpec {
    pub name: String,
    pub peer_ip: Ipv4Addr,
    pub as_number: u32,
}

/// The whole lab cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub pool_name: String,
    pub pool_cidr: Ipv4Net,
    pub block_size: u8,
    pub ipip_mode: EncapMode,
    /// Cluster AS (`BGPConfiguration` `default`).
    pub as_number: u32,
    pub nodes: Vec<NodeSpec>,
    pub peers: Vec<BgpPeerSpec>,
    /// More datastore files, written as given: `(file name, YAML)`, e.g. a node-specific
    /// BGPPeer. Not part of [`Self::expected_plan`].
    pub extra_files: BTreeMap<String, String>,
    /// When set, the body of `BGPConfiguration` `default`'s `spec` (YAML lines indented by
    /// two spaces), replacing `asNumber`, `logSeverityScreen` and `nodeToNodeMeshEnabled:
    /// true`: e.g. service CIDRs with the mesh off. Not part of [`Self::expected_plan`].
    pub bgp_configuration_spec: Option<String>,
}

fn net(text: &str) -> Ipv4Net {
    text.parse().expect("constant network is valid")
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().expect("constant address is valid")
}

impl ClusterSpec {
    /// Seed 001 after its edit to `ipipMode: CrossSubnet` (master01 and node01 on
    /// 192.168.92.0/24, their blocks 172.16.241.64/26 and 172.16.196.128/26), plus `node02`
    /// alone on 192.168.93.0/24 behind the router, with block 172.16.10.0/26. One pod each.
    pub fn seed() -> Self {
        let node = |name: &str, addr: &str, block: &str, pod_ip: &str| NodeSpec {
            name: name.into(),
            addr: net(addr),
            block: Some(net(block)),
            pods: vec![PodSpec::new("default", &format!("web-{name}"), ip(pod_ip))],
        };
        Self {
            pool_name: "default-ipv4-ippool".into(),
            pool_cidr: net("172.16.0.0/16"),
            block_size: 26,
            ipip_mode: EncapMode::CrossSubnet,
            as_number: 64512,
            nodes: vec![
                node(
                    "master01",
                    "192.168.92.128/24",
                    "172.16.241.64/26",
                    "172.16.241.65",
                ),
                node(
                    "node01",
                    "192.168.92.129/24",
                    "172.16.196.128/26",
                    "172.16.196.129",
                ),
                node(
                    "node02",
                    "192.168.93.130/24",
                    "172.16.10.0/26",
                    "172.16.10.1",
                ),
            ],
            peers: Vec::new(),
            extra_files: BTreeMap::new(),
            bgp_configuration_spec: None,
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeSpec> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// The node and pod of the pod named `pod`.
    pub fn pod(&self, pod: &str) -> Option<(&NodeSpec, &PodSpec)> {
        self.nodes
            .iter()
            .find_map(|n| n.pods.iter().find(|p| p.name == pod).map(|p| (n, p)))
    }

    /// The subnets of the nodes, in order of first appearance.
    pub fn subnets(&self) -> Vec<Ipv4Net> {
        let mut out: Vec<Ipv4Net> = Vec::new();
        for n in &self.nodes {
            let s = n.addr.trunc();
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// The router's address on `subnet`: its first host address (`192.168.92.1`).
    pub fn router_addr(subnet: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(subnet.network()) + 1)
    }

    /// Whether the two nodes share a subnet (CrossSubnet: direct route, no IPIP).
    pub fn same_subnet(a: &NodeSpec, b: &NodeSpec) -> bool {
        a.addr.trunc() == b.addr.trunc()
    }

    /// The route plan node `name` should end up with once every mesh session is up: the other
    /// nodes' blocks learned with their node address as next hop. `None` for an unknown node.
    pub fn expected_plan(&self, name: &str) -> Option<RoutePlan> {
        let local = self.node(name)?;
        let input = PlanInput {
            local: LocalNode {
                name: local.name.clone(),
                ipv4: Some(local.addr),
                ipv6: None,
                nic: NIC.into(),
            },
            pools: vec![PoolSpec {
                name: self.pool_name.clone(),
                cidr: IpNet::V4(self.pool_cidr),
                ipip: self.ipip_mode,
                vxlan: EncapMode::Never,
                disabled: false,
            }],
            blocks: self
                .nodes
                .iter()
                .filter_map(|n| {
                    Some(BlockSpec {
                        cidr: IpNet::V4(n.block?),
                        affinity: Some(n.name.clone()),
                        allocations: n
                            .pods
                            .iter()
                            .map(|p| Allocation {
                                ip: IpAddr::V4(p.ip),
                                namespace: Some(p.namespace.clone()),
                                pod: Some(p.name.clone()),
                                node: Some(n.name.clone()),
                            })
                            .collect(),
                    })
                })
                .collect(),
            learned: self
                .nodes
                .iter()
                .filter(|n| n.name != local.name)
                .filter_map(|n| {
                    Some(LearnedRoute {
                        prefix: IpNet::V4(n.block?),
                        next_hop: IpAddr::V4(n.ip()),
                    })
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| PeerNode {
                    name: n.name.clone(),
                    ipv4: Some(n.ip()),
                    ipv6: None,
                })
                .collect(),
            local_interfaces: local
                .pods
                .iter()
                .map(PodSpec::interface)
                .collect::<BTreeSet<_>>(),
        };
        Some(plan(&input))
    }

    /// The datastore as `(file name, YAML)` pairs: what `kubectl get -o yaml` would print for
    /// a Calico cluster with these objects.
    pub fn datastore_files(&self) -> Vec<(String, String)> {
        let mut files = vec![
            (
                "bgpconfiguration-default.yaml".to_string(),
                match &self.bgp_configuration_spec {
                    Some(body) => format!(
                        "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\n\
                         metadata:\n  name: default\nspec:\n{body}\n"
                    ),
                    None => format!(
                        "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\n\
                         metadata:\n  name: default\nspec:\n  asNumber: {}\n  \
                         logSeverityScreen: Info\n  nodeToNodeMeshEnabled: true\n",
                        self.as_number
                    ),
                },
            ),
            (
                format!("ippool-{}.yaml", self.pool_name),
                format!(
                    "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: {}\n\
                     spec:\n  blockSize: {}\n  cidr: {}\n  ipipMode: {}\n  natOutgoing: true\n  \
                     nodeSelector: all()\n  vxlanMode: Never\n",
                    self.pool_name,
                    self.block_size,
                    self.pool_cidr,
                    encap_name(self.ipip_mode)
                ),
            ),
        ];
        for n in &self.nodes {
            files.push((format!("node-{}.yaml", n.name), node_yaml(n)));
            if let Some(block) = n.block {
                let dashed = dashed(block);
                files.push((format!("ipamblock-{dashed}.yaml"), block_yaml(n, block)));
                files.push((
                    format!("blockaffinity-{}-{dashed}.yaml", n.name),
                    format!(
                        "apiVersion: crd.projectcalico.org/v1\nkind: BlockAffinity\nmetadata:\n  \
                         name: {}-{dashed}\nspec:\n  cidr: {block}\n  deleted: \"false\"\n  \
                         node: {}\n  state: confirmed\n",
                        n.name, n.name
                    ),
                ));
            }
        }
        for p in &self.peers {
            files.push((
                format!("bgppeer-{}.yaml", p.name),
                format!(
                    "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: {}\n\
                     spec:\n  asNumber: {}\n  peerIP: {}\n",
                    p.name, p.as_number, p.peer_ip
                ),
            ));
        }
        files.extend(
            self.extra_files
                .iter()
                .map(|(name, text)| (name.clone(), text.clone())),
        );
        files
    }

    /// Makes `dir` hold exactly [`Self::datastore_files`]: each file is written atomically
    /// (hidden temporary file, then rename) and YAML files of objects no longer in the spec
    /// are removed.
    pub fn write_datastore(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let files = self.datastore_files();
        for (name, text) in &files {
            let path = dir.join(name);
            if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && !files.iter().any(|(f, _)| *f == name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

fn encap_name(mode: EncapMode) -> &'static str {
    match mode {
        EncapMode::Never => "Never",
        EncapMode::Always => "Always",
        EncapMode::CrossSubnet => "CrossSubnet",
    }
}

/// `172.16.241.64/26` → `172-16-241-64-26`, the IPAMBlock's name.
pub fn dashed(block: Ipv4Net) -> String {
    block.to_string().replace(['.', '/'], "-")
}

fn node_yaml(n: &NodeSpec) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    \
         projectcalico.org/IPv4Address: {addr}\n  labels:\n    \
         kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\nstatus:\n  addresses:\n  \
         - address: {ip}\n    type: InternalIP\n  - address: {name}\n    type: Hostname\n  \
         conditions:\n  - type: Ready\n    status: \"True\"\n    reason: KubeletReady\n",
        name = n.name,
        addr = n.addr,
        ip = n.ip(),
    )
}

/// An IPAMBlock as Calico writes it: one `allocations` slot per address (null = free, else
/// an index into `attributes`), the pods' attributes naming namespace, pod and node.
fn block_yaml(n: &NodeSpec, block: Ipv4Net) -> String {
    let size = 1u32 << (32 - u32::from(block.prefix_len()));
    let base = u32::from(block.network());
    let mut slots = Vec::new();
    let mut unallocated = Vec::new();
    for ordinal in 0..size {
        let addr = Ipv4Addr::from(base + ordinal);
        match n.pods.iter().position(|p| p.ip == addr) {
            Some(i) => slots.push(i.to_string()),
            None => {
                slots.push("null".into());
                unallocated.push(ordinal.to_string());
            }
        }
    }
    // `allocations` slots index into `attributes`, which follow the pods' order.
    let mut attributes = String::from("  attributes:");
    if n.pods.is_empty() {
        attributes.push_str(" []");
    }
    attributes.push('\n');
    for p in &n.pods {
        let _ = write!(
            attributes,
            "  - handle_id: k8s-pod-network.{handle}\n    secondary:\n      \
             namespace: {ns}\n      node: {node}\n      pod: {pod}\n      \
             timestamp: 2021-03-30 04:20:00 +0000 UTC\n",
            handle = handle(&p.namespace, &p.name),
            ns = p.namespace,
            node = n.name,
            pod = p.name,
        );
    }
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {name}\n\
         spec:\n  affinity: host:{node}\n  allocations: [{slots}]\n{attributes}  cidr: {block}\n  \
         deleted: false\n  strictAffinity: false\n  unallocated: [{unallocated}]\n",
        name = dashed(block),
        node = n.name,
        slots = slots.join(", "),
        unallocated = unallocated.join(", "),
    )
}

/// A stable, container-id-like handle for a pod.
fn handle(namespace: &str, pod: &str) -> String {
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(format!("handle.{namespace}.{pod}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Object, decode_documents};

    #[test]
    fn seed_datastore_decodes_to_the_seed_objects() {
        let spec = ClusterSpec::seed();
        let mut kinds = Vec::new();
        for (name, text) in spec.datastore_files() {
            for doc in decode_documents(&text).unwrap() {
                let object = doc.unwrap_or_else(|e| panic!("{name}: {e}"));
                if let Object::IPAMBlock(b) = &object {
                    let block = crate::model::Block::from_resource(b).unwrap();
                    assert_eq!(block.allocations.len(), 1, "{name}");
                    let a = &block.allocations[0];
                    let node = spec.node(block.host().unwrap()).unwrap();
                    assert_eq!(a.ip, IpAddr::V4(node.pods[0].ip));
                    assert_eq!(a.interface_name(), Some(node.pods[0].interface()));
                }
                kinds.push(object.kind().as_str().to_string());
            }
        }
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "BGPConfiguration",
                "BlockAffinity",
                "BlockAffinity",
                "BlockAffinity",
                "IPAMBlock",
                "IPAMBlock",
                "IPAMBlock",
                "IPPool",
                "Node",
                "Node",
                "Node"
            ]
        );
    }

    #[test]
    fn expected_plan_of_master01_is_crosssubnet() {
        let spec = ClusterSpec::seed();
        let lines = spec.expected_plan("master01").unwrap().lines();
        let cali = spec.nodes[0].pods[0].interface();
        assert_eq!(
            lines,
            [
                "172.16.10.0/26 via 192.168.93.130 dev tunl0 onlink".to_string(),
                "172.16.196.128/26 via 192.168.92.129 dev ens33".to_string(),
                "blackhole 172.16.241.64/26".to_string(),
                format!("172.16.241.65 dev {cali} scope link"),
            ]
        );
    }

    #[test]
    fn writing_the_datastore_removes_objects_no_longer_in_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::seed();
        std::fs::write(dir.path().join("notes.txt"), "kept").unwrap();
        spec.write_datastore(dir.path()).unwrap();
        assert!(dir.path().join("ipamblock-172-16-196-128-26.yaml").exists());
        spec.node_mut("node01").unwrap().block = None;
        spec.write_datastore(dir.path()).unwrap();
        assert!(!dir.path().join("ipamblock-172-16-196-128-26.yaml").exists());
        assert!(
            !dir.path()
                .join("blockaffinity-node01-172-16-196-128-26.yaml")
                .exists()
        );
        assert!(dir.path().join("ipamblock-172-16-241-64-26.yaml").exists());
        assert!(dir.path().join("notes.txt").exists());
    }
}
