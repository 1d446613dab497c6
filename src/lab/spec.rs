//! What the lab cluster consists of: nodes with their addresses, blocks and pods, the pool,
//! extra BGP peers; the YAML-directory datastore written from it; and the route plan each
//! node is expected to end up with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::plan::{
    Allocation, BlockSpec, EncapMode, LearnedRoute, LocalNode, PeerNode, PlanInput, PoolSpec,
    RoutePlan, plan, workload_interface_name,
};

/// Name of the host NIC in every lab node, as in seed 001.
pub const NIC: &str = "ens33";

/// The MAC address Calico's CNI plugin gives the host side of every pod's veth; the pod's
/// IPv6 default route goes to the link-local address derived from it.
pub const CALI_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pod's IPv6 default gateway, as Calico's CNI plugin sets it (from [`CALI_MAC`]).
pub const POD_GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

/// The address families a lab cluster runs (`podroute lab --family`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Family {
    /// IPv4 only: seed 001 as the article shows it.
    #[default]
    Ipv4,
    /// Dual-stack: IPv4 and IPv6 node addresses, an IPv4 and an IPv6 pool, a block of each
    /// per node and an address of each per pod; one mesh per family (as bird and bird6).
    Dual,
    /// IPv6-only: no IPv4 address, pool or block anywhere; the agents run with `--ip none`.
    Ipv6,
}

impl Family {
    pub fn has_ipv4(self) -> bool {
        self != Family::Ipv6
    }

    pub fn has_ipv6(self) -> bool {
        self != Family::Ipv4
    }

    /// The `--family` value.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Dual => "dual",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// One IP family of routes, addresses and pings (a [`Family`] runs one or both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpVersion {
    V4,
    V6,
}

impl IpVersion {
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() {
            IpVersion::V4
        } else {
            IpVersion::V6
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IpVersion::V4 => "IPv4",
            IpVersion::V6 => "IPv6",
        }
    }
}

/// A pod: its own namespace behind a `cali*` veth on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (in its node's `block6`), when the cluster has IPv6.
    pub ip6: Option<Ipv6Addr>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, ip: Ipv4Addr) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            ip,
            ip6: None,
        }
    }

    /// The pod's addresses of the families `family` runs.
    pub fn ips(&self, family: Family) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if family.has_ipv4() {
            out.push(IpAddr::V4(self.ip));
        }
        if family.has_ipv6()
            && let Some(ip6) = self.ip6
        {
            out.push(IpAddr::V6(ip6));
        }
        out
    }

    /// The host-side interface, `cali` + 11 hex digits of sha1("namespace.pod").
    pub fn interface(&self) -> String {
        workload_interface_name(&self.namespace, &self.name)
    }
}

/// A node: a namespace with `ens33` on its subnet's switch.
///
/// The IPv4 fields are always filled in, the IPv6 ones when the spec was made for a family
/// with IPv6; [`ClusterSpec::family`] decides which of them are configured (an IPv6-only
/// cluster configures no IPv4 address, pool or block). The IPv4 fields stay plain values
/// because every IPv4 test reads them as such.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// Address with the subnet prefix, as in `projectcalico.org/IPv4Address`.
    pub addr: Ipv4Net,
    /// The node's IPAM block; `None` once it was released.
    pub block: Option<Ipv4Net>,
    /// IPv6 address with the subnet prefix, as in `projectcalico.org/IPv6Address`.
    pub addr6: Option<Ipv6Net>,
    /// The node's IPv6 IPAM block (/122).
    pub block6: Option<Ipv6Net>,
    /// Pods on this node; their addresses lie in `block`.
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }

    /// The node's addresses of the families `family` runs (IPv4 first).
    pub fn ips(&self, family: Family) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if family.has_ipv4() {
            out.push(IpAddr::V4(self.ip()));
        }
        if family.has_ipv6()
            && let Some(a) = self.addr6
        {
            out.push(IpAddr::V6(a.addr()));
        }
        out
    }

    /// The node's blocks of the families `family` runs.
    pub fn blocks(&self, family: Family) -> Vec<IpNet> {
        let mut out = Vec::new();
        if family.has_ipv4()
            && let Some(b) = self.block
        {
            out.push(IpNet::V4(b));
        }
        if family.has_ipv6()
            && let Some(b) = self.block6
        {
            out.push(IpNet::V6(b));
        }
        out
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
    /// Which families are configured (see [`NodeSpec`]).
    pub family: Family,
    pub pool_name: String,
    pub pool_cidr: Ipv4Net,
    pub block_size: u8,
    pub ipip_mode: EncapMode,
    /// The IPv4 pool's `vxlanMode` (`podroute lab --encap vxlan`; `ipip_mode` is then
    /// `Never`). With it on, every node with a block has a VXLAN tunnel address (the block's
    /// first address, allocated in its IPAMBlock to `vxlan-tunnel-addr-<node>` as calico-node
    /// does) and MAC in its Node annotations.
    pub vxlan_mode: EncapMode,
    /// The IPv6 pool (`ipipMode: Never`: IPIP carries IPv4 only), block size 122.
    pub pool6_name: String,
    pub pool6_cidr: Ipv6Net,
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

fn net6(text: &str) -> Ipv6Net {
    text.parse().expect("constant network is valid")
}

fn ip6(text: &str) -> Ipv6Addr {
    text.parse().expect("constant address is valid")
}

impl ClusterSpec {
    /// Seed 001 after its edit to `ipipMode: CrossSubnet` (master01 and node01 on
    /// 192.168.92.0/24, their blocks 172.16.241.64/26 and 172.16.196.128/26), plus `node02`
    /// alone on 192.168.93.0/24 behind the router, with block 172.16.10.0/26. One pod each.
    pub fn seed() -> Self {
        Self::seed_family(Family::Ipv4)
    }

    /// [`Self::seed`] for `family`. With IPv6 the same three nodes get `fd00:92::128/64`,
    /// `fd00:92::129/64` and `fd00:93::130/64` (the router `::1` on each), the IPv6 pool
    /// `fd00:172:16::/48` (`Never`: IPIP carries IPv4 only) has a /122 block per node
    /// (`fd00:172:16:241::40/122`, `fd00:172:16:196::80/122`, `fd00:172:16:10::/122`), and each
    /// pod an address in it. IPv6-only keeps the IPv4 values in the spec but configures none.
    pub fn seed_family(family: Family) -> Self {
        let with6 = family.has_ipv6();
        let node = |name: &str, addr: &str, block: &str, pod_ip: &str, v6: [&str; 3]| NodeSpec {
            name: name.into(),
            addr: net(addr),
            block: Some(net(block)),
            addr6: with6.then(|| net6(v6[0])),
            block6: with6.then(|| net6(v6[1])),
            pods: vec![PodSpec {
                ip6: with6.then(|| ip6(v6[2])),
                ..PodSpec::new("default", &format!("web-{name}"), ip(pod_ip))
            }],
        };
        Self {
            family,
            pool_name: "default-ipv4-ippool".into(),
            pool_cidr: net("172.16.0.0/16"),
            block_size: 26,
            ipip_mode: EncapMode::CrossSubnet,
            vxlan_mode: EncapMode::Never,
            pool6_name: "default-ipv6-ippool".into(),
            pool6_cidr: net6("fd00:172:16::/48"),
            as_number: 64512,
            nodes: vec![
                node(
                    "master01",
                    "192.168.92.128/24",
                    "172.16.241.64/26",
                    "172.16.241.65",
                    [
                        "fd00:92::128/64",
                        "fd00:172:16:241::40/122",
                        "fd00:172:16:241::41",
                    ],
                ),
                node(
                    "node01",
                    "192.168.92.129/24",
                    "172.16.196.128/26",
                    "172.16.196.129",
                    [
                        "fd00:92::129/64",
                        "fd00:172:16:196::80/122",
                        "fd00:172:16:196::81",
                    ],
                ),
                node(
                    "node02",
                    "192.168.93.130/24",
                    "172.16.10.0/26",
                    "172.16.10.1",
                    [
                        "fd00:93::130/64",
                        "fd00:172:16:10::/122",
                        "fd00:172:16:10::1",
                    ],
                ),
            ],
            peers: Vec::new(),
            extra_files: BTreeMap::new(),
            bgp_configuration_spec: None,
        }
    }

    /// The seed cluster with `vxlanMode: mode` instead of IPIP.
    pub fn seed_vxlan(mode: EncapMode) -> Self {
        Self {
            ipip_mode: EncapMode::Never,
            vxlan_mode: mode,
            ..Self::seed()
        }
    }

    /// The IPv4 VXLAN tunnel endpoint of node `n`: its block's first address and its MAC,
    /// when the IPv4 pool uses VXLAN.
    pub fn vtep(&self, n: &NodeSpec) -> Option<(Ipv4Addr, crate::plan::tunnels::MacAddr)> {
        if self.vxlan_mode == EncapMode::Never || !self.family.has_ipv4() {
            return None;
        }
        let block = n.block?;
        Some((
            block.network(),
            crate::plan::tunnels::default_vtep_mac(&n.name, true),
        ))
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

    /// The IPv6 subnet of the switch of IPv4 `subnet` (the prefix of the first node on it
    /// with an IPv6 address), when the cluster has IPv6.
    pub fn subnet6(&self, subnet: Ipv4Net) -> Option<Ipv6Net> {
        if !self.family.has_ipv6() {
            return None;
        }
        self.nodes
            .iter()
            .filter(|n| n.addr.trunc() == subnet)
            .find_map(|n| n.addr6.map(|a| a.trunc()))
    }

    /// The router's IPv6 address on `subnet`: `::1` (`fd00:92::1`).
    pub fn router_addr6(subnet: Ipv6Net) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(subnet.network()) + 1)
    }

    /// Whether the two nodes share a subnet (CrossSubnet: direct route, no IPIP).
    pub fn same_subnet(a: &NodeSpec, b: &NodeSpec) -> bool {
        a.addr.trunc() == b.addr.trunc()
    }

    /// The route plan node `name` should end up with once every mesh session is up: the other
    /// nodes' blocks learned with their node address as next hop. `None` for an unknown node.
    pub fn expected_plan(&self, name: &str) -> Option<RoutePlan> {
        let local = self.node(name)?;
        let (v4, v6) = (self.family.has_ipv4(), self.family.has_ipv6());
        let mut pools = Vec::new();
        if v4 {
            pools.push(PoolSpec {
                name: self.pool_name.clone(),
                cidr: IpNet::V4(self.pool_cidr),
                ipip: self.ipip_mode,
                vxlan: self.vxlan_mode,
                disabled: false,
            });
        }
        if v6 {
            pools.push(PoolSpec {
                name: self.pool6_name.clone(),
                cidr: IpNet::V6(self.pool6_cidr),
                ipip: EncapMode::Never,
                vxlan: EncapMode::Never,
                disabled: false,
            });
        }
        let mut blocks = Vec::new();
        let mut learned = Vec::new();
        for n in &self.nodes {
            for block in n.blocks(self.family) {
                blocks.push(BlockSpec {
                    cidr: block,
                    affinity: Some(n.name.clone()),
                    allocations: n
                        .pods
                        .iter()
                        .flat_map(|p| p.ips(self.family))
                        .filter(|ip| block.contains(ip))
                        .map(|ip| {
                            let p = n.pods.iter().find(|p| p.ips(self.family).contains(&ip));
                            Allocation {
                                ip,
                                namespace: p.map(|p| p.namespace.clone()),
                                pod: p.map(|p| p.name.clone()),
                                node: Some(n.name.clone()),
                            }
                        })
                        .collect(),
                });
                if n.name != local.name
                    && let Some(next_hop) = n
                        .ips(self.family)
                        .into_iter()
                        .find(|a| a.is_ipv4() == block.addr().is_ipv4())
                {
                    learned.push(LearnedRoute {
                        prefix: block,
                        next_hop,
                    });
                }
            }
        }
        let input = PlanInput {
            local: LocalNode {
                name: local.name.clone(),
                ipv4: v4.then_some(local.addr),
                ipv6: local.addr6.filter(|_| v6),
                nic: NIC.into(),
            },
            pools,
            blocks,
            learned,
            nodes: self
                .nodes
                .iter()
                .map(|n| PeerNode {
                    name: n.name.clone(),
                    ipv4: v4.then(|| n.ip()),
                    ipv6: n.addr6.filter(|_| v6).map(|a| a.addr()),
                })
                .collect(),
            local_interfaces: local
                .pods
                .iter()
                .map(PodSpec::interface)
                .collect::<BTreeSet<_>>(),
            vteps: self
                .nodes
                .iter()
                .filter_map(|n| {
                    let (tunnel_ip, mac) = self.vtep(n)?;
                    Some(crate::plan::Vtep {
                        node: n.name.clone(),
                        tunnel_ip: IpAddr::V4(tunnel_ip),
                        mac,
                    })
                })
                .collect(),
        };
        Some(plan(&input))
    }

    /// The datastore as `(file name, YAML)` pairs: what `kubectl get -o yaml` would print for
    /// a Calico cluster with these objects.
    pub fn datastore_files(&self) -> Vec<(String, String)> {
        let mut files = vec![(
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
        )];
        if self.family.has_ipv4() {
            files.push((
                format!("ippool-{}.yaml", self.pool_name),
                format!(
                    "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: {}\n\
                     spec:\n  blockSize: {}\n  cidr: {}\n  ipipMode: {}\n  natOutgoing: true\n  \
                     nodeSelector: all()\n  vxlanMode: {}\n",
                    self.pool_name,
                    self.block_size,
                    self.pool_cidr,
                    encap_name(self.ipip_mode),
                    encap_name(self.vxlan_mode)
                ),
            ));
        }
        if self.family.has_ipv6() {
            files.push((
                format!("ippool-{}.yaml", self.pool6_name),
                format!(
                    "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: {}\n\
                     spec:\n  blockSize: 122\n  cidr: {}\n  ipipMode: Never\n  \
                     natOutgoing: false\n  nodeSelector: all()\n  vxlanMode: Never\n",
                    self.pool6_name, self.pool6_cidr,
                ),
            ));
        }
        for n in &self.nodes {
            let vtep = self.vtep(n);
            files.push((
                format!("node-{}.yaml", n.name),
                node_yaml(n, self.family, vtep),
            ));
            for block in n.blocks(self.family) {
                let dashed = dashed_net(block);
                let vtep_ip = vtep
                    .map(|v| IpAddr::V4(v.0))
                    .filter(|ip| block.contains(ip));
                files.push((
                    format!("ipamblock-{dashed}.yaml"),
                    block_yaml(n, block, self.family, vtep_ip),
                ));
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
    dashed_net(IpNet::V4(block))
}

/// The IPAMBlock name of either family, as Calico makes it: `.`, `:` and `/` become `-`
/// (`fd00:172:16:241::40/122` → `fd00-172-16-241--40-122`).
pub fn dashed_net(block: IpNet) -> String {
    block.to_string().replace(['.', ':', '/'], "-")
}

fn node_yaml(
    n: &NodeSpec,
    family: Family,
    vtep: Option<(Ipv4Addr, crate::plan::tunnels::MacAddr)>,
) -> String {
    let mut annotations = String::new();
    if let Some((ip, mac)) = vtep {
        let _ = write!(
            annotations,
            "\n    projectcalico.org/IPv4VXLANTunnelAddr: {ip}\n    \
             projectcalico.org/IPv4VXLANTunnelMACAddr: {mac}"
        );
    }
    let mut addresses = String::new();
    if family.has_ipv4() {
        let _ = write!(
            annotations,
            "\n    projectcalico.org/IPv4Address: {}",
            n.addr
        );
        let _ = write!(addresses, "\n  - address: {}\n    type: InternalIP", n.ip());
    }
    if family.has_ipv6()
        && let Some(a6) = n.addr6
    {
        let _ = write!(annotations, "\n    projectcalico.org/IPv6Address: {a6}");
        let _ = write!(
            addresses,
            "\n  - address: {}\n    type: InternalIP",
            a6.addr()
        );
    }
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:{annotations}\n  \
         labels:\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\nstatus:\n  \
         addresses:{addresses}\n  - address: {name}\n    type: Hostname\n  \
         conditions:\n  - type: Ready\n    status: \"True\"\n    reason: KubeletReady\n",
        name = n.name,
    )
}

/// An IPAMBlock as Calico writes it: one `allocations` slot per address (null = free, else
/// an index into `attributes`), the pods' attributes naming namespace, pod and node.
fn block_yaml(n: &NodeSpec, block: IpNet, family: Family, vtep: Option<IpAddr>) -> String {
    let host_bits = u32::from(block.max_prefix_len() - block.prefix_len()).min(16);
    let size = 1u32 << host_bits;
    let pods: Vec<(&PodSpec, IpAddr)> = n
        .pods
        .iter()
        .flat_map(|p| p.ips(family).into_iter().map(move |ip| (p, ip)))
        .filter(|(_, ip)| block.contains(ip))
        .collect();
    let nth = |ordinal: u32| -> IpAddr {
        match block {
            IpNet::V4(b) => IpAddr::V4(Ipv4Addr::from(u32::from(b.network()) + ordinal)),
            IpNet::V6(b) => IpAddr::V6(Ipv6Addr::from(
                u128::from(b.network()) + u128::from(ordinal),
            )),
        }
    };
    let mut slots = Vec::new();
    let mut unallocated = Vec::new();
    for ordinal in 0..size {
        match pods.iter().position(|(_, ip)| *ip == nth(ordinal)) {
            Some(i) => slots.push(i.to_string()),
            // The VXLAN tunnel address: the attribute after the pods'.
            None if vtep == Some(nth(ordinal)) => slots.push(pods.len().to_string()),
            None => {
                slots.push("null".into());
                unallocated.push(ordinal.to_string());
            }
        }
    }
    // `allocations` slots index into `attributes`, which follow the pods' order.
    let mut attributes = String::from("  attributes:");
    if pods.is_empty() && vtep.is_none() {
        attributes.push_str(" []");
    }
    attributes.push('\n');
    for (p, _) in &pods {
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
    if vtep.is_some() {
        let _ = write!(
            attributes,
            "  - handle_id: vxlan-tunnel-addr-{node}\n    secondary:\n      node: {node}\n      \
             type: vxlanTunnelAddress\n",
            node = n.name,
        );
    }
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {name}\n\
         spec:\n  affinity: host:{node}\n  allocations: [{slots}]\n{attributes}  cidr: {block}\n  \
         deleted: false\n  strictAffinity: false\n  unallocated: [{unallocated}]\n",
        name = dashed_net(block),
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
    fn dual_stack_datastore_has_both_families_and_ipv6_only_has_no_ipv4() {
        for family in [Family::Dual, Family::Ipv6] {
            let spec = ClusterSpec::seed_family(family);
            let mut pools = Vec::new();
            let mut allocations = Vec::new();
            let mut annotations = Vec::new();
            for (name, text) in spec.datastore_files() {
                for doc in decode_documents(&text).unwrap() {
                    match doc.unwrap_or_else(|e| panic!("{name}: {e}")) {
                        Object::IPPool(p) => pools.push(p.spec.cidr.clone().unwrap_or_default()),
                        Object::IPAMBlock(b) => {
                            let block = crate::model::Block::from_resource(&b).unwrap();
                            for a in &block.allocations {
                                allocations.push((a.ip, a.interface_name()));
                            }
                        }
                        Object::Node(n) => annotations.extend(
                            n.metadata
                                .annotations
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| format!("{k}={v}")),
                        ),
                        _ => {}
                    }
                }
            }
            pools.sort();
            allocations.sort();
            annotations.sort();
            let cali = |n: usize| Some(spec.nodes[n].pods[0].interface());
            let v6: Vec<(IpAddr, Option<String>)> = vec![
                ("fd00:172:16:10::1".parse().unwrap(), cali(2)),
                ("fd00:172:16:196::81".parse().unwrap(), cali(1)),
                ("fd00:172:16:241::41".parse().unwrap(), cali(0)),
            ];
            if family == Family::Dual {
                assert_eq!(pools, ["172.16.0.0/16", "fd00:172:16::/48"]);
                assert_eq!(allocations.len(), 6, "{allocations:?}");
                assert!(allocations.ends_with(&v6), "{allocations:?}");
                assert_eq!(annotations.len(), 6, "{annotations:?}");
            } else {
                assert_eq!(pools, ["fd00:172:16::/48"]);
                assert_eq!(allocations, v6);
                assert_eq!(
                    annotations,
                    [
                        "projectcalico.org/IPv6Address=fd00:92::128/64",
                        "projectcalico.org/IPv6Address=fd00:92::129/64",
                        "projectcalico.org/IPv6Address=fd00:93::130/64",
                    ]
                );
            }
        }
    }

    #[test]
    fn expected_plan_of_master01_dual_stack_has_both_families() {
        let spec = ClusterSpec::seed_family(Family::Dual);
        let lines = spec.expected_plan("master01").unwrap().lines();
        let cali = spec.nodes[0].pods[0].interface();
        assert_eq!(
            lines,
            [
                "172.16.10.0/26 via 192.168.93.130 dev tunl0 onlink".to_string(),
                "172.16.196.128/26 via 192.168.92.129 dev ens33".to_string(),
                "blackhole 172.16.241.64/26".to_string(),
                format!("172.16.241.65 dev {cali} scope link"),
                "fd00:172:16:10::/122 via fd00:93::130".to_string(),
                "fd00:172:16:196::80/122 via fd00:92::129".to_string(),
                "blackhole fd00:172:16:241::40/122".to_string(),
                format!("fd00:172:16:241::41 dev {cali} scope link"),
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
