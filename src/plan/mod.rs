//! The route plan: a pure function from cluster state to the routes a node must have.
//!
//! Every Calico routing rule lives here and nowhere else (DESIGN.md, "plan is a pure
//! function"): which remote blocks go through `tunl0` (IPIP), which go directly out of the
//! host NIC, which are left to the kernel to resolve, which of the node's own blocks are
//! blackholed, which pod IPs get a `/32 dev caliXXXXXXXXXXX scope link`, and where borrowed IPs
//! go. The dataplane only makes the kernel's table equal to [`RoutePlan::routes`].
//!
//! The inputs are the plan's own small types ([`PlanInput`] and friends) so that this module
//! does not depend on how the cluster model is stored; the agent fills them from the model and
//! from the BGP speaker's best paths.
//!
//! # Decisions that go beyond the issue text
//! - **Remote blocks come from BGP.** As with Calico's BIRD, a remote block is routed only
//!   when a route for it was learned (prefix → next-hop node address). The blocks in the input
//!   decide ownership (blackholes), workloads and borrowed IPs.
//! - **One route per prefix.** When several sources give the same prefix, the precedence is
//!   workload `/32` > borrowed-IP `/32` (from IPAM) > own-block blackhole > learned route.
//! - **Disabled pools still route.** `disabled` stops new allocations, not traffic to blocks
//!   that already exist, so a disabled pool's encapsulation rules keep applying.
//! - **Removed pools.** A learned prefix inside no pool is an external route: plain
//!   `via PEER`. Own blocks are blackholed whether or not a pool still contains them (seed
//!   001's `192.168.241.64/26 *` row is such a block).
//! - **VXLAN pools are routed from the datastore, not from BGP**, as Felix does (Calico's
//!   BIRD does not program VXLAN pools' routes either): each remote block of a VXLAN pool
//!   (its IPAMBlock's `host:` affinity) is routed `BLOCK via VTEP_IP dev vxlan.calico onlink`
//!   (`vxlan-v6.calico` for IPv6), where VTEP_IP is the owner Node's VXLAN tunnel address
//!   ([`PlanInput::vteps`]); under `vxlanMode: CrossSubnet` an owner in the local subnet gets
//!   the direct route `BLOCK via NODE dev NIC`. Borrowed IPs get the same shapes as `/32`s
//!   (`/128`s). A learned route inside a VXLAN pool is ignored: the datastore has the
//!   block, so the route neither waits for BGP nor goes with a BGP session. An owner without
//!   a VTEP gets no route and a [`PlanWarning::VxlanNoVtep`]. A pool with both `ipipMode` and
//!   `vxlanMode` set (Calico's validation rejects it) gets no remote routes and a
//!   [`PlanWarning::BothEncapsulations`].
//! - **IPv6 pools** never use IPIP (Calico rejects `ipipMode` on them): with `ipipMode` set
//!   the route is `via PEER` as for `Never`, with a [`PlanWarning::IpipOnIpv6Pool`].

pub mod flannel;
mod ifname;
pub mod tunnels;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use ifname::{WORKLOAD_IFACE_PREFIX, workload_interface_name};
pub use tunnels::{VXLAN_DEVICE_V4, VXLAN_DEVICE_V6, Vtep};

/// Name of the IPIP tunnel device, as Calico names it.
pub const TUNNEL_DEVICE: &str = "tunl0";

/// An IPPool's `ipipMode` / `vxlanMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EncapMode {
    /// No encapsulation (also the empty string).
    #[default]
    Never,
    /// Always encapsulate towards remote blocks.
    Always,
    /// Encapsulate only when the peer is outside the local node's subnet.
    CrossSubnet,
}

impl EncapMode {
    /// Parses Calico's spelling: `Never`, `Always`, `CrossSubnet`; empty means `Never`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "Never" => Some(Self::Never),
            "Always" => Some(Self::Always),
            "CrossSubnet" => Some(Self::CrossSubnet),
            _ => None,
        }
    }
}

/// The node the plan is computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Kubernetes node name (the `host:<name>` of block affinities).
    pub name: String,
    /// IPv4 address with its prefix (`projectcalico.org/IPv4Address`, e.g. `10.0.0.5/24`):
    /// the prefix decides CrossSubnet.
    pub ipv4: Option<Ipv4Net>,
    /// IPv6 address with its prefix (`projectcalico.org/IPv6Address`).
    pub ipv6: Option<Ipv6Net>,
    /// Host NIC that direct routes leave through (`ens33` in seed 001).
    pub nic: String,
}

/// An IPPool, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Object name, for warnings.
    pub name: String,
    pub cidr: IpNet,
    pub ipip: EncapMode,
    pub vxlan: EncapMode,
    /// Disabled pools still route their existing blocks (see the module doc).
    pub disabled: bool,
}

/// One allocated address of an IPAM block (`attributes[i].secondary` of the allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// Node the address is used on; `None` means the block's host.
    pub node: Option<String>,
}

/// An IPAMBlock, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    pub cidr: IpNet,
    /// The node of `affinity: host:<node>`, without the `host:` prefix; `None` when the block
    /// has no host affinity.
    pub affinity: Option<String>,
    pub allocations: Vec<Allocation>,
}

/// A best path learned over BGP: `prefix` via the node (or external peer) at `next_hop`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

/// Addresses of another node, used to route IPs it borrowed from someone else's block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// Everything the plan depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    pub local: LocalNode,
    pub pools: Vec<PoolSpec>,
    pub blocks: Vec<BlockSpec>,
    pub learned: Vec<LearnedRoute>,
    /// The other nodes' addresses (for borrowed IPs).
    pub nodes: Vec<PeerNode>,
    /// Names of the `cali*` interfaces that exist on this node.
    pub local_interfaces: BTreeSet<String>,
    /// Every node's VXLAN tunnel endpoints (this node's too), from the Nodes' annotations:
    /// the gateways of VXLAN routes and the entries of [`tunnels::vxlan_plan`].
    pub vteps: Vec<Vtep>,
}

/// Why a route exists, and which rule produced its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// Remote block, CrossSubnet (or vxlan CrossSubnet) peer in the local subnet:
    /// `BLOCK via PEER dev NIC`.
    BlockDirect,
    /// Remote block through IPIP: `BLOCK via PEER dev tunl0 onlink`.
    BlockIpip,
    /// Remote block, pool `Never`: `BLOCK via PEER` (the kernel picks the device).
    BlockNoEncap,
    /// Remote block through VXLAN: `BLOCK via VTEP_IP dev vxlan.calico onlink` (flannel mode:
    /// a remote node's podCIDR, `dev flannel.1`), with a permanent neighbour and FDB entry for
    /// the VTEP in the [`tunnels::TunnelPlan`].
    BlockVxlan,
    /// One of this node's blocks: `blackhole BLOCK`.
    Blackhole,
    /// A local pod: `IP/32 dev caliXXXXXXXXXXX scope link`.
    Workload,
    /// An IP used on another node than its block's host, direct via NIC.
    BorrowedDirect,
    /// An IP used on another node than its block's host, through IPIP.
    BorrowedIpip,
    /// An IP used on another node than its block's host, pool `Never`.
    BorrowedNoEncap,
    /// An IP used on another node than its block's host, through VXLAN.
    BorrowedVxlan,
    /// A learned prefix outside every pool (external peers): `PREFIX via PEER`.
    External,
}

impl RouteKind {
    /// The name used in metrics (`kind` label) and `podroute routes`.
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::BlockDirect => "block-direct",
            RouteKind::BlockIpip => "block-ipip",
            RouteKind::BlockNoEncap => "block-noencap",
            RouteKind::BlockVxlan => "block-vxlan",
            RouteKind::Blackhole => "blackhole",
            RouteKind::Workload => "workload",
            RouteKind::BorrowedDirect => "borrowed-direct",
            RouteKind::BorrowedIpip => "borrowed-ipip",
            RouteKind::BorrowedNoEncap => "borrowed-noencap",
            RouteKind::BorrowedVxlan => "borrowed-vxlan",
            RouteKind::External => "external",
        }
    }

    /// The position of this kind in [`RouteKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Every kind, in label order of the metrics reference.
    pub const ALL: [RouteKind; 11] = [
        RouteKind::BlockDirect,
        RouteKind::BlockIpip,
        RouteKind::BlockNoEncap,
        RouteKind::BlockVxlan,
        RouteKind::Blackhole,
        RouteKind::Workload,
        RouteKind::BorrowedDirect,
        RouteKind::BorrowedIpip,
        RouteKind::BorrowedNoEncap,
        RouteKind::BorrowedVxlan,
        RouteKind::External,
    ];

    /// True for the kinds whose route goes through a VXLAN device.
    pub fn is_vxlan(self) -> bool {
        matches!(self, RouteKind::BlockVxlan | RouteKind::BorrowedVxlan)
    }
}

/// Route scope, as far as the plan needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteScope {
    /// `scope global` (kernel: universe).
    Universe,
    /// `scope link`: the destination is directly on the device.
    Link,
}

/// One route the node must have in its main table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DesiredRoute {
    pub prefix: IpNet,
    pub kind: RouteKind,
    /// Next hop, for `via` routes.
    pub gateway: Option<IpAddr>,
    /// Output device; `None` lets the kernel resolve it from the gateway. Shared: every route
    /// of a plan through the host NIC or `tunl0` points at one name.
    pub device: Option<Arc<str>>,
    /// `onlink`: the gateway is reachable on the device without a covering route.
    pub onlink: bool,
    pub scope: RouteScope,
}

impl DesiredRoute {
    /// True for `blackhole` routes.
    pub fn is_blackhole(&self) -> bool {
        self.kind == RouteKind::Blackhole
    }

    fn blackhole(prefix: IpNet) -> Self {
        Self {
            prefix,
            kind: RouteKind::Blackhole,
            gateway: None,
            device: None,
            onlink: false,
            scope: RouteScope::Universe,
        }
    }

    fn workload(prefix: IpNet, device: String) -> Self {
        Self {
            prefix,
            kind: RouteKind::Workload,
            gateway: None,
            device: Some(device.into()),
            onlink: false,
            scope: RouteScope::Link,
        }
    }
}

/// `ip route` syntax: `172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink`,
/// `blackhole 172.16.241.64/26`, `172.16.241.69 dev cali67beaa0e9f4 scope link`.
impl fmt::Display for DesiredRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_blackhole() {
            write!(f, "blackhole ")?;
        }
        if self.prefix.prefix_len() == self.prefix.max_prefix_len() {
            write!(f, "{}", self.prefix.addr())?;
        } else {
            write!(f, "{}", self.prefix)?;
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        if self.scope == RouteScope::Link {
            write!(f, " scope link")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// Something in the input the plan could not route as asked; the rest of the plan stands.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlanWarning {
    /// A block (or borrowed IP) of a VXLAN pool belongs to a node without a VXLAN tunnel
    /// address of the block's family: there is no VTEP to route it through.
    VxlanNoVtep {
        pool: String,
        prefix: IpNet,
        node: String,
    },
    /// A pool has both `ipipMode` and `vxlanMode` enabled; its remote routes are left out.
    BothEncapsulations { pool: String },
    /// `ipipMode` on an IPv6 pool is ignored: routed as `Never`.
    IpipOnIpv6Pool { pool: String },
    /// A learned route's next hop is of the other address family than its prefix.
    NextHopFamilyMismatch { prefix: IpNet, next_hop: IpAddr },
    /// An IP borrowed by `node` cannot be routed: the node's address is unknown.
    BorrowedNodeUnknown { ip: IpAddr, node: String },
    /// A learned route points at this node itself; ignored.
    NextHopIsSelf { prefix: IpNet },
    /// An allocation's IP lies outside its block; ignored.
    AllocationOutsideBlock { block: IpNet, ip: IpAddr },
    /// A VXLAN pool's block belongs to a node whose address (of the block's family) is
    /// unknown: no route for it.
    BlockNodeUnknown { block: IpNet, node: String },
}

impl fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VxlanNoVtep { pool, prefix, node } => write!(
                f,
                "IPPool {pool:?}: {prefix} is on node {node:?}, which has no VXLAN tunnel address \
                 of that family (projectcalico.org/IPv4VXLANTunnelAddr or IPv6VXLANTunnelAddr); \
                 route left out until the node's agent sets it"
            ),
            Self::BothEncapsulations { pool } => write!(
                f,
                "IPPool {pool:?}: ipipMode and vxlanMode are both enabled; set one of them to \
                 Never (remote routes of this pool are left out)"
            ),
            Self::IpipOnIpv6Pool { pool } => write!(
                f,
                "IPPool {pool:?}: ipipMode applies to IPv4 pools only; routing as Never"
            ),
            Self::NextHopFamilyMismatch { prefix, next_hop } => write!(
                f,
                "learned route {prefix} via {next_hop}: next hop family differs from the prefix; \
                 ignored"
            ),
            Self::BorrowedNodeUnknown { ip, node } => write!(
                f,
                "IP {ip} is used on node {node:?} whose address is unknown; no /32 route for it \
                 (check the node's projectcalico.org/IPv4Address annotation)"
            ),
            Self::NextHopIsSelf { prefix } => {
                write!(
                    f,
                    "learned route {prefix} points at this node itself; ignored"
                )
            }
            Self::BlockNodeUnknown { block, node } => write!(
                f,
                "IPAMBlock {block} is on node {node:?} whose address is unknown; no route for it \
                 (check the node's projectcalico.org/IPv4Address or IPv6Address annotation)"
            ),
            Self::AllocationOutsideBlock { block, ip } => {
                write!(
                    f,
                    "IPAMBlock {block}: allocation {ip} is outside the block; ignored"
                )
            }
        }
    }
}

/// The plan's result: the desired routes sorted by prefix (one per prefix) and the warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    pub routes: Vec<DesiredRoute>,
    pub warnings: Vec<PlanWarning>,
}

impl RoutePlan {
    /// The routes as `ip route` lines, in order.
    pub fn lines(&self) -> Vec<String> {
        self.routes.iter().map(ToString::to_string).collect()
    }
}

/// How a remote destination is reached.
enum Path {
    Direct,
    Ipip,
    NoEncap,
    /// Through the VXLAN device of the prefix's family, via this VTEP address.
    Vxlan(IpAddr),
}

/// Precedence of the sources of a route, lowest first (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Learned,
    /// Routes computed straight from the datastore: a remote block of a VXLAN pool, or
    /// flannel's leases.
    Datastore,
    OwnBlock,
    Borrowed,
    Workload,
}

/// Who announced a remote destination: a BGP next hop (no node known), or a node of the
/// datastore (VXLAN routes, borrowed IPs) with its address.
#[derive(Debug, Clone, Copy)]
struct Towards<'a> {
    peer: IpAddr,
    node: Option<&'a str>,
}

/// The encapsulation rules: how a remote prefix is reached from the local node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules {
    local: LocalNode,
    pools: Vec<PoolSpec>,
    /// `local.nic` and [`TUNNEL_DEVICE`], shared by every route through them.
    nic: Arc<str>,
    tunnel: Arc<str>,
    /// [`VXLAN_DEVICE_V4`] and [`VXLAN_DEVICE_V6`], shared likewise.
    vxlan4: Arc<str>,
    vxlan6: Arc<str>,
    /// VTEP address per (node, is IPv4).
    vteps: BTreeMap<(String, bool), IpAddr>,
}

impl Rules {
    fn new(input: &PlanInput) -> Self {
        Self {
            local: input.local.clone(),
            pools: input.pools.clone(),
            nic: Arc::from(input.local.nic.as_str()),
            tunnel: Arc::from(TUNNEL_DEVICE),
            vxlan4: Arc::from(VXLAN_DEVICE_V4),
            vxlan6: Arc::from(VXLAN_DEVICE_V6),
            vteps: input
                .vteps
                .iter()
                .map(|v| ((v.node.clone(), v.tunnel_ip.is_ipv4()), v.tunnel_ip))
                .collect(),
        }
    }

    /// The most specific pool that contains all of `prefix`.
    fn pool_of(&self, prefix: &IpNet) -> Option<&PoolSpec> {
        self.pools
            .iter()
            .filter(|p| p.cidr.contains(prefix))
            .max_by_key(|p| p.cidr.prefix_len())
    }

    fn in_local_subnet(&self, peer: IpAddr) -> bool {
        match peer {
            IpAddr::V4(a) => self.local.ipv4.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.local.ipv6.is_some_and(|n| n.contains(&a)),
        }
    }

    fn is_self(&self, peer: IpAddr) -> bool {
        match peer {
            IpAddr::V4(a) => self.local.ipv4.is_some_and(|n| n.addr() == a),
            IpAddr::V6(a) => self.local.ipv6.is_some_and(|n| n.addr() == a),
        }
    }

    /// True when routes of `prefix` are computed from the datastore (a VXLAN pool).
    fn routed_from_datastore(&self, prefix: &IpNet) -> bool {
        self.pool_of(prefix)
            .is_some_and(|p| p.vxlan != EncapMode::Never)
    }

    /// The encapsulation rule for `prefix` towards `to`; `None` when the route is left out.
    fn path(
        &self,
        pool: &PoolSpec,
        prefix: IpNet,
        to: Towards<'_>,
        warnings: &mut BTreeSet<PlanWarning>,
    ) -> Option<Path> {
        let ipip = if prefix.addr().is_ipv6() && pool.ipip != EncapMode::Never {
            warnings.insert(PlanWarning::IpipOnIpv6Pool {
                pool: pool.name.clone(),
            });
            EncapMode::Never
        } else {
            pool.ipip
        };
        match (ipip, pool.vxlan) {
            (EncapMode::Never, EncapMode::Never) => Some(Path::NoEncap),
            (EncapMode::Always, EncapMode::Never) => Some(Path::Ipip),
            (EncapMode::CrossSubnet, EncapMode::Never) => Some(if self.in_local_subnet(to.peer) {
                Path::Direct
            } else {
                Path::Ipip
            }),
            (EncapMode::Never, vxlan) => {
                // A BGP route of a VXLAN pool: the datastore routes the block (module doc).
                let node = to.node?;
                if vxlan == EncapMode::CrossSubnet && self.in_local_subnet(to.peer) {
                    return Some(Path::Direct);
                }
                match self.vteps.get(&(node.to_owned(), prefix.addr().is_ipv4())) {
                    Some(vtep) => Some(Path::Vxlan(*vtep)),
                    None => {
                        warnings.insert(PlanWarning::VxlanNoVtep {
                            pool: pool.name.clone(),
                            prefix,
                            node: node.to_owned(),
                        });
                        None
                    }
                }
            }
            _ => {
                warnings.insert(PlanWarning::BothEncapsulations {
                    pool: pool.name.clone(),
                });
                None
            }
        }
    }

    /// The route to a remote `prefix` at `to`, by the encapsulation rules of its pool.
    fn remote_route(
        &self,
        prefix: IpNet,
        to: Towards<'_>,
        borrowed: bool,
        warnings: &mut BTreeSet<PlanWarning>,
    ) -> Option<DesiredRoute> {
        let peer = to.peer;
        if prefix.addr().is_ipv4() != peer.is_ipv4() {
            warnings.insert(PlanWarning::NextHopFamilyMismatch {
                prefix,
                next_hop: peer,
            });
            return None;
        }
        if self.is_self(peer) {
            warnings.insert(PlanWarning::NextHopIsSelf { prefix });
            return None;
        }
        let via = |kind, gateway, device: Option<&Arc<str>>, onlink| DesiredRoute {
            prefix,
            kind,
            gateway: Some(gateway),
            device: device.cloned(),
            onlink,
            scope: RouteScope::Universe,
        };
        let Some(pool) = self.pool_of(&prefix) else {
            return Some(via(RouteKind::External, peer, None, false));
        };
        let (nic, tunnel) = (Some(&self.nic), Some(&self.tunnel));
        let vxlan = Some(if prefix.addr().is_ipv4() {
            &self.vxlan4
        } else {
            &self.vxlan6
        });
        Some(match (self.path(pool, prefix, to, warnings)?, borrowed) {
            (Path::Direct, false) => via(RouteKind::BlockDirect, peer, nic, false),
            (Path::Direct, true) => via(RouteKind::BorrowedDirect, peer, nic, false),
            (Path::Ipip, false) => via(RouteKind::BlockIpip, peer, tunnel, true),
            (Path::Ipip, true) => via(RouteKind::BorrowedIpip, peer, tunnel, true),
            (Path::NoEncap, false) => via(RouteKind::BlockNoEncap, peer, None, false),
            (Path::NoEncap, true) => via(RouteKind::BorrowedNoEncap, peer, None, false),
            (Path::Vxlan(vtep), false) => via(RouteKind::BlockVxlan, vtep, vxlan, true),
            (Path::Vxlan(vtep), true) => via(RouteKind::BorrowedVxlan, vtep, vxlan, true),
        })
    }

    /// A learned (BGP) route's route: none inside a VXLAN pool (the datastore's counts).
    fn learned_route(
        &self,
        prefix: IpNet,
        next_hop: IpAddr,
        warnings: &mut BTreeSet<PlanWarning>,
    ) -> Option<DesiredRoute> {
        let to = Towards {
            peer: next_hop,
            node: None,
        };
        self.remote_route(prefix, to, false, warnings)
    }
}

/// Routes by prefix, each with the source that won it.
type RouteMap = BTreeMap<IpNet, (Source, DesiredRoute)>;

fn insert(routes: &mut RouteMap, source: Source, route: DesiredRoute) {
    match routes.get(&route.prefix) {
        Some((existing, _)) if *existing >= source => {}
        _ => {
            routes.insert(route.prefix, (source, route));
        }
    }
}

/// The routes that come from IPAM blocks: own-block blackholes, workloads, borrowed IPs.
fn block_routes(
    input: &PlanInput,
    rules: &Rules,
    warnings: &mut BTreeSet<PlanWarning>,
) -> RouteMap {
    let mut routes = RouteMap::new();
    let local = input.local.name.as_str();
    let node_address = |node: &str, family_v4: bool| {
        let peer = input.nodes.iter().find(|n| n.name == node)?;
        if family_v4 {
            peer.ipv4.map(IpAddr::V4)
        } else {
            peer.ipv6.map(IpAddr::V6)
        }
    };
    for block in &input.blocks {
        let host = block.affinity.as_deref();
        if host == Some(local) {
            insert(
                &mut routes,
                Source::OwnBlock,
                DesiredRoute::blackhole(block.cidr.trunc()),
            );
        } else if let Some(owner) = host
            && rules.routed_from_datastore(&block.cidr)
        {
            // A remote block of a VXLAN pool: routed from the datastore, as Felix does.
            let prefix = block.cidr.trunc();
            match node_address(owner, prefix.addr().is_ipv4()) {
                Some(peer) => {
                    let to = Towards {
                        peer,
                        node: Some(owner),
                    };
                    if let Some(route) = rules.remote_route(prefix, to, false, warnings) {
                        insert(&mut routes, Source::Datastore, route);
                    }
                }
                None => {
                    warnings.insert(PlanWarning::BlockNodeUnknown {
                        block: prefix,
                        node: owner.to_owned(),
                    });
                }
            }
        }
        for alloc in &block.allocations {
            if !block.cidr.contains(&alloc.ip) {
                warnings.insert(PlanWarning::AllocationOutsideBlock {
                    block: block.cidr,
                    ip: alloc.ip,
                });
                continue;
            }
            let Some(node) = alloc.node.as_deref().or(host) else {
                continue;
            };
            let host_prefix = IpNet::from(alloc.ip);
            if node == local {
                let (Some(ns), Some(pod)) = (&alloc.namespace, &alloc.pod) else {
                    continue;
                };
                let iface = workload_interface_name(ns, pod);
                if input.local_interfaces.contains(&iface) {
                    insert(
                        &mut routes,
                        Source::Workload,
                        DesiredRoute::workload(host_prefix, iface),
                    );
                }
            } else if Some(node) != host {
                // Borrowed: used on `node`, but the block routes to its host.
                match node_address(node, alloc.ip.is_ipv4()) {
                    Some(peer) => {
                        let to = Towards {
                            peer,
                            node: Some(node),
                        };
                        if let Some(route) = rules.remote_route(host_prefix, to, true, warnings) {
                            insert(&mut routes, Source::Borrowed, route);
                        }
                    }
                    None => {
                        warnings.insert(PlanWarning::BorrowedNodeUnknown {
                            ip: alloc.ip,
                            node: node.to_owned(),
                        });
                    }
                }
            }
        }
    }
    routes
}

/// The plan prepared for incremental use.
///
/// Everything but the learned routes is computed once per input ([`Planner::new`]): the
/// routes from the IPAM blocks and the encapsulation rules. The route of a learned prefix
/// then depends only on that prefix, its best next hop and this part, so a BGP best-path
/// change of one prefix changes at most the route of that prefix ([`Planner::route_for`]).
/// `plan(input)` equals `Planner::new(input).plan(&input.learned)`, and applying
/// `route_for` to every changed prefix of a plan gives the plan of the new learned set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planner {
    rules: Rules,
    /// Routes from the blocks; they take precedence over learned routes.
    fixed: RouteMap,
    fixed_warnings: BTreeSet<PlanWarning>,
    /// Prefixes this node originates itself (service prefixes): the same prefix learned from
    /// a peer gets no route here (this node serves it; BIRD prefers its own static route).
    originated: BTreeSet<IpNet>,
}

impl Planner {
    /// Prepares the plan for `input`; `input.learned` is not looked at.
    pub fn new(input: &PlanInput) -> Self {
        let rules = Rules::new(input);
        let mut fixed_warnings = BTreeSet::new();
        let fixed = block_routes(input, &rules, &mut fixed_warnings);
        Self {
            rules,
            fixed,
            fixed_warnings,
            originated: BTreeSet::new(),
        }
    }

    /// Sets the prefixes this node originates besides its blocks (service prefixes): a
    /// learned route for one of them is not planned.
    pub fn originating(mut self, prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        self.originated = prefixes.into_iter().map(|p| p.trunc()).collect();
        self
    }

    /// The prefixes whose route may differ between the plans of `old` and `self` for the
    /// same learned routes, when only the routes from the blocks changed (a pod added or
    /// removed, a block changing hands): their routes are [`route_for`](Self::route_for)
    /// again. `None` when the encapsulation rules or the originated prefixes changed: then
    /// any learned route may change, and only the full plan says what the routes are.
    pub fn changed_since(&self, old: &Planner) -> Option<Vec<IpNet>> {
        if self.rules != old.rules || self.originated != old.originated {
            return None;
        }
        let mut changed = Vec::new();
        let mut new = self.fixed.iter().peekable();
        let mut was = old.fixed.iter().peekable();
        loop {
            match (new.peek(), was.peek()) {
                (None, None) => break,
                (Some((p, _)), None) => {
                    changed.push(**p);
                    new.next();
                }
                (None, Some((p, _))) => {
                    changed.push(**p);
                    was.next();
                }
                (Some((a, ra)), Some((b, rb))) => {
                    if a < b {
                        changed.push(**a);
                        new.next();
                    } else if b < a {
                        changed.push(**b);
                        was.next();
                    } else {
                        if ra != rb {
                            changed.push(**a);
                        }
                        new.next();
                        was.next();
                    }
                }
            }
        }
        Some(changed)
    }

    /// Adds routes computed straight from the datastore (flannel mode's remote podCIDRs):
    /// like the blocks' routes they win over a learned route for the same prefix (a ToR that
    /// reflects another node's podCIDR back does not pull it off the overlay), but lose to
    /// the blocks' own routes.
    pub fn with_datastore_routes(mut self, routes: impl IntoIterator<Item = DesiredRoute>) -> Self {
        for route in routes {
            insert(&mut self.fixed, Source::Datastore, route);
        }
        self
    }

    /// The warnings about the blocks (learned routes add theirs when planned).
    pub fn warnings(&self) -> &BTreeSet<PlanWarning> {
        &self.fixed_warnings
    }

    /// The plan's route for `prefix` (host bits cleared) when its best learned path is via
    /// `next_hop` (`None`: nothing learned): the blocks' route when they give one, else the
    /// learned route by the encapsulation rules, else none. Warnings about the learned route
    /// are added to `warnings`.
    pub fn route_for(
        &self,
        prefix: IpNet,
        next_hop: Option<IpAddr>,
        warnings: &mut BTreeSet<PlanWarning>,
    ) -> Option<DesiredRoute> {
        let prefix = prefix.trunc();
        let next_hop = next_hop.filter(|_| !self.originated.contains(&prefix));
        let learned = next_hop.and_then(|nh| self.rules.learned_route(prefix, nh, warnings));
        match self.fixed.get(&prefix) {
            Some((_, route)) => Some(route.clone()),
            None => learned,
        }
    }

    /// The complete plan with these learned routes (of two with the same prefix, the first
    /// counts).
    pub fn plan<'a>(&self, learned: impl IntoIterator<Item = &'a LearnedRoute>) -> RoutePlan {
        let mut routes = self.fixed.clone();
        let mut warnings = self.fixed_warnings.clone();
        for learned in learned {
            let prefix = learned.prefix.trunc();
            if self.originated.contains(&prefix) {
                continue;
            }
            if let Some(route) = self
                .rules
                .learned_route(prefix, learned.next_hop, &mut warnings)
            {
                insert(&mut routes, Source::Learned, route);
            }
        }
        RoutePlan {
            routes: routes.into_values().map(|(_, route)| route).collect(),
            warnings: warnings.into_iter().collect(),
        }
    }

    /// The plan's routes, in prefix order, for learned routes given in prefix order with
    /// host bits cleared and no prefix twice (a map's iteration): the same routes as
    /// [`plan`](Self::plan), produced one by one without building the table. Warnings about
    /// learned routes are added to `warnings`.
    pub fn routes<'a, L>(
        &'a self,
        learned: L,
        warnings: &'a mut BTreeSet<PlanWarning>,
    ) -> impl Iterator<Item = DesiredRoute> + 'a
    where
        L: IntoIterator<Item = (IpNet, IpAddr)>,
        L::IntoIter: 'a,
    {
        let mut fixed = self.fixed.values().map(|(_, r)| r).peekable();
        let mut learned = learned.into_iter().peekable();
        std::iter::from_fn(move || {
            loop {
                let take_fixed = match (fixed.peek(), learned.peek()) {
                    (None, None) => return None,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some(f), Some((p, _))) => f.prefix <= *p,
                };
                if take_fixed {
                    let route = fixed.next()?;
                    // A learned route for the same prefix loses, but is still checked.
                    if let Some((p, nh)) = learned.next_if(|(p, _)| *p == route.prefix) {
                        self.rules.learned_route(p, nh, warnings);
                    }
                    return Some(route.clone());
                }
                let (p, nh) = learned.next()?;
                if self.originated.contains(&p) {
                    continue;
                }
                if let Some(route) = self.rules.learned_route(p, nh, warnings) {
                    return Some(route);
                }
            }
        })
    }
}

/// Computes the routes this node must have. Pure: same input, same output.
pub fn plan(input: &PlanInput) -> RoutePlan {
    Planner::new(input).plan(&input.learned)
}

/// The address for `tunl0`: the node annotation `projectcalico.org/IPv4IPIPTunnelAddr` when
/// given, else the first address of the lowest of the node's own IPv4 blocks (preferring
/// blocks of pools with IPIP enabled), as Calico allocates it from the node's block.
pub fn tunnel_address(input: &PlanInput, annotation: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    if annotation.is_some() {
        return annotation;
    }
    let own: Vec<Ipv4Net> = input
        .blocks
        .iter()
        .filter(|b| b.affinity.as_deref() == Some(input.local.name.as_str()))
        .filter_map(|b| match b.cidr {
            IpNet::V4(n) => Some(n.trunc()),
            IpNet::V6(_) => None,
        })
        .collect();
    let ipip_pool = |n: &Ipv4Net| {
        input
            .pools
            .iter()
            .any(|p| p.ipip != EncapMode::Never && p.cidr.contains(&IpNet::V4(*n)))
    };
    own.iter()
        .filter(|n| ipip_pool(n))
        .min()
        .or_else(|| own.iter().min())
        .map(|n| n.network())
}

#[cfg(test)]
mod tests;
