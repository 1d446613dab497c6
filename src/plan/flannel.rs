//! flannel mode's routing rules: from (this node, `net-conf.json`, every Node's lease) to the
//! routes and the VXLAN devices and VTEP entries flanneld would program. Pure.
//!
//! The rules are flanneld's (`backend/vxlan`, `backend/hostgw`):
//! - `vxlan`: one device per family (`flannel.1`, `flannel-v6.1`) with the config's VNI and
//!   port, this node's VTEP MAC, its public IP as `local`, the NIC as parent, MTU = the
//!   NIC's MTU − 50 (IPv6: − 70) unless `Backend.MTU` is set, and the address
//!   `<own subnet>.0/32` (`/128`). Per remote node with a `vxlan` lease:
//!   `PODCIDR via PODCIDR.0 dev flannel.1 onlink`, a permanent neighbour
//!   `PODCIDR.0 lladdr VtepMAC` and a permanent FDB entry `VtepMAC dst PUBLIC_IP self`.
//!   With `DirectRouting`, a remote node in this node's subnet is routed as `host-gw` is.
//! - `host-gw`: per remote node `PODCIDR via PUBLIC_IP dev NIC`.
//! - Leases of another backend type are ignored, as flanneld ignores them ("ignoring
//!   non-vxlan subnet"); a lease without its public IP or VTEP MAC yet is left out until it
//!   has them. Nothing is routed for this node's own podCIDR (the CNI bridge has it).
//!
//! The inputs are the model's validated types ([`NetConf`], [`FlannelNode`]): they are
//! already just what these rules read, so no plan-side copy is made of them.
//!
//! Where flanneld asks the kernel (`DirectRouting`: "is the remote public IP reachable
//! without a gateway"), the plan asks the equivalent of the node's address and prefix: is
//! the remote public IP inside this node's subnet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::tunnels::{MacAddr, TunnelPlan, VxlanDevice, VxlanPeer};
use super::{DesiredRoute, RouteKind, RouteScope};
use crate::model::flannel::{
    Backend, FlannelNode, FlannelNodeError, NetConf, VXLAN_DEVICE_V4, VXLAN_DEVICE_V6,
};

/// The node the plan is computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelLocal {
    /// Kubernetes node name.
    pub name: String,
    /// Host NIC: the VXLAN devices' parent and the direct routes' device.
    pub nic: String,
    /// The node's public IPv4 address with its subnet prefix (the prefix decides
    /// `DirectRouting`).
    pub ipv4: Option<Ipv4Net>,
    /// The node's public IPv6 address with its subnet prefix.
    pub ipv6: Option<Ipv6Net>,
    /// This node's lease (its podCIDRs); `None` until the Node has a podCIDR.
    pub lease: Option<FlannelNode>,
    /// This node's VTEP MACs (from its own `backend-data` annotation when it has one, so a
    /// restart keeps what the other nodes hold; else derived from the node name).
    pub vtep_mac: MacAddr,
    pub vtep_mac_v6: MacAddr,
}

/// The routes and tunnels of one flannel plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlannelPlan {
    /// Sorted by prefix, one per prefix.
    pub routes: Vec<DesiredRoute>,
    pub tunnels: TunnelPlan,
    pub warnings: Vec<FlannelWarning>,
}

/// Something the plan left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlannelWarning {
    /// This node has no podCIDR of a family the config enables.
    LocalNoPodCidr { family: &'static str },
    /// This node has no address of a family the config enables.
    LocalNoAddress { family: &'static str },
    /// A Node's podCIDR lies outside the config's network.
    OutsideNetwork { node: String, cidr: IpNet },
    /// A Node's flannel fields cannot be read.
    Unreadable { node: String, reason: String },
    /// A Node's lease lacks what the rule needs (public IP, VTEP MAC): not yet annotated.
    Incomplete { node: String, missing: &'static str },
    /// A Node's lease is of another backend.
    OtherBackend { node: String, backend: String },
    /// Two Nodes hold the same podCIDR; the first by name is routed.
    DuplicateCidr {
        node: String,
        cidr: IpNet,
        holder: String,
    },
    /// `host-gw` needs every node in this node's subnet.
    HostGwNotInSubnet { node: String, public_ip: IpAddr },
}

impl fmt::Display for FlannelWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LocalNoPodCidr { family } => write!(
                f,
                "this node has no {family} spec.podCIDR yet (kube-controller-manager's \
                 --allocate-node-cidrs assigns it); no {family} flannel device or routes"
            ),
            Self::LocalNoAddress { family } => write!(
                f,
                "this node has no {family} address; no {family} flannel device or routes"
            ),
            Self::OutsideNetwork { node, cidr } => write!(
                f,
                "Node {node:?}: podCIDR {cidr} is outside net-conf.json's Network; not routed"
            ),
            Self::Unreadable { node, reason } => {
                write!(f, "Node {node:?}: {reason}; left out of the flannel plan")
            }
            Self::Incomplete { node, missing } => write!(
                f,
                "Node {node:?}: no {missing} yet (flanneld or podroute writes it when it starts \
                 there); not routed until it has one"
            ),
            Self::OtherBackend { node, backend } => write!(
                f,
                "Node {node:?}: backend-type {backend:?} differs from net-conf.json's; ignored, \
                 as flanneld ignores it"
            ),
            Self::DuplicateCidr { node, cidr, holder } => write!(
                f,
                "Node {node:?}: podCIDR {cidr} is also Node {holder:?}'s; routed to {holder:?}"
            ),
            Self::HostGwNotInSubnet { node, public_ip } => write!(
                f,
                "Node {node:?}: host-gw needs its public IP {public_ip} in this node's subnet; \
                 not routed (use the vxlan backend, or DirectRouting with vxlan)"
            ),
        }
    }
}

/// One address family's side of the plan.
struct Family {
    v4: bool,
    name: &'static str,
    network: IpNet,
    device: &'static str,
    local_addr: Option<IpNet>,
    local_cidr: Option<IpNet>,
    mac: MacAddr,
}

impl Family {
    fn cidr_of(&self, lease: &FlannelNode) -> Option<IpNet> {
        if self.v4 {
            lease.pod_cidr_v4.map(IpNet::V4)
        } else {
            lease.pod_cidr_v6.map(IpNet::V6)
        }
    }

    fn mac_of(&self, lease: &FlannelNode) -> Option<MacAddr> {
        if self.v4 {
            lease.vtep_mac
        } else {
            lease.vtep_mac_v6
        }
    }

    fn in_local_subnet(&self, addr: IpAddr) -> bool {
        self.local_addr.is_some_and(|n| n.contains(&addr))
    }
}

/// The flannel plan for `local` under `conf`, over every Node's lease (`None`: the Node has
/// no flannel fields; `Some(Err)`: they cannot be read). The local node's own entry, if
/// among `nodes`, is skipped (its lease is `local.lease`).
pub fn plan<'a>(
    local: &FlannelLocal,
    conf: &NetConf,
    nodes: impl IntoIterator<
        Item = (
            &'a str,
            Option<Result<&'a FlannelNode, &'a FlannelNodeError>>,
        ),
    >,
) -> FlannelPlan {
    let mut warnings = BTreeSet::new();
    let mut routes: BTreeMap<IpNet, (String, DesiredRoute)> = BTreeMap::new();
    let mut tunnels = TunnelPlan::default();
    let nic: Arc<str> = Arc::from(local.nic.as_str());

    let mut families = Vec::new();
    if let Some(net) = conf.network {
        families.push(Family {
            v4: true,
            name: "IPv4",
            network: IpNet::V4(net),
            device: VXLAN_DEVICE_V4,
            local_addr: local.ipv4.map(IpNet::V4),
            local_cidr: local
                .lease
                .as_ref()
                .and_then(|l| l.pod_cidr_v4.map(IpNet::V4)),
            mac: local.vtep_mac,
        });
    }
    if let Some(net) = conf.ipv6_network {
        families.push(Family {
            v4: false,
            name: "IPv6",
            network: IpNet::V6(net),
            device: VXLAN_DEVICE_V6,
            local_addr: local.ipv6.map(IpNet::V6),
            local_cidr: local
                .lease
                .as_ref()
                .and_then(|l| l.pod_cidr_v6.map(IpNet::V6)),
            mac: local.vtep_mac_v6,
        });
    }

    let mut nodes: Vec<_> = nodes
        .into_iter()
        .filter(|(name, _)| *name != local.name)
        .collect();
    nodes.sort_by(|a, b| a.0.cmp(b.0));

    for family in &families {
        let Some(local_cidr) = family.local_cidr else {
            warnings.insert(FlannelWarning::LocalNoPodCidr {
                family: family.name,
            });
            continue;
        };
        if !family.network.contains(&local_cidr) {
            warnings.insert(FlannelWarning::OutsideNetwork {
                node: local.name.clone(),
                cidr: local_cidr,
            });
        }
        let Some(local_addr) = family.local_addr else {
            warnings.insert(FlannelWarning::LocalNoAddress {
                family: family.name,
            });
            continue;
        };
        let device: Arc<str> = Arc::from(family.device);
        if let Backend::Vxlan(vxlan) = &conf.backend {
            tunnels.vxlan.push(VxlanDevice {
                name: family.device.to_string(),
                vni: vxlan.vni,
                port: vxlan.port,
                mac: family.mac,
                local: local_addr.addr(),
                parent: local.nic.clone(),
                mtu: vxlan.mtu,
                address: Some(IpNet::from(local_cidr.network())),
            });
        }
        for (name, lease) in &nodes {
            let lease = match lease {
                None => continue,
                Some(Err(reason)) => {
                    // Reported once, by the first family.
                    if family.v4 || conf.network.is_none() {
                        warnings.insert(FlannelWarning::Unreadable {
                            node: name.to_string(),
                            reason: reason.to_string(),
                        });
                    }
                    continue;
                }
                Some(Ok(lease)) => *lease,
            };
            let Some(cidr) = family.cidr_of(lease) else {
                continue;
            };
            if !family.network.contains(&cidr) {
                warnings.insert(FlannelWarning::OutsideNetwork {
                    node: name.to_string(),
                    cidr,
                });
                continue;
            }
            match lease.backend_type.as_deref() {
                None => {
                    warnings.insert(FlannelWarning::Incomplete {
                        node: name.to_string(),
                        missing: "flannel.alpha.coreos.com/backend-type",
                    });
                    continue;
                }
                Some(t) if t != conf.backend.type_name() => {
                    warnings.insert(FlannelWarning::OtherBackend {
                        node: name.to_string(),
                        backend: t.to_string(),
                    });
                    continue;
                }
                Some(_) => {}
            }
            let Some(public) = lease.public_addr(family.v4) else {
                warnings.insert(FlannelWarning::Incomplete {
                    node: name.to_string(),
                    missing: if family.v4 {
                        "flannel.alpha.coreos.com/public-ip"
                    } else {
                        "flannel.alpha.coreos.com/public-ipv6"
                    },
                });
                continue;
            };
            if cidr == local_cidr || public == local_addr.addr() {
                warnings.insert(FlannelWarning::DuplicateCidr {
                    node: name.to_string(),
                    cidr,
                    holder: local.name.clone(),
                });
                continue;
            }
            if let Some((holder, _)) = routes.get(&cidr) {
                warnings.insert(FlannelWarning::DuplicateCidr {
                    node: name.to_string(),
                    cidr,
                    holder: holder.clone(),
                });
                continue;
            }
            let direct = DesiredRoute {
                prefix: cidr,
                kind: RouteKind::BlockDirect,
                gateway: Some(public),
                device: Some(nic.clone()),
                onlink: false,
                scope: RouteScope::Universe,
            };
            let route = match &conf.backend {
                Backend::HostGw => {
                    if !family.in_local_subnet(public) {
                        warnings.insert(FlannelWarning::HostGwNotInSubnet {
                            node: name.to_string(),
                            public_ip: public,
                        });
                        continue;
                    }
                    direct
                }
                Backend::Vxlan(v) if v.direct_routing && family.in_local_subnet(public) => direct,
                Backend::Vxlan(_) => {
                    let Some(mac) = family.mac_of(lease) else {
                        warnings.insert(FlannelWarning::Incomplete {
                            node: name.to_string(),
                            missing: if family.v4 {
                                "VtepMAC in flannel.alpha.coreos.com/backend-data"
                            } else {
                                "VtepMAC in flannel.alpha.coreos.com/backend-v6-data"
                            },
                        });
                        continue;
                    };
                    let tunnel_ip = cidr.network();
                    tunnels.vxlan_peers.push(VxlanPeer {
                        device: family.device.to_string(),
                        node: name.to_string(),
                        tunnel_ip,
                        mac,
                        underlay: public,
                    });
                    DesiredRoute {
                        prefix: cidr,
                        kind: RouteKind::BlockVxlan,
                        gateway: Some(tunnel_ip),
                        device: Some(device.clone()),
                        onlink: true,
                        scope: RouteScope::Universe,
                    }
                }
            };
            routes.insert(cidr, (name.to_string(), route));
        }
    }
    tunnels.vxlan_peers.sort();
    FlannelPlan {
        routes: routes.into_values().map(|(_, r)| r).collect(),
        tunnels,
        warnings: warnings.into_iter().collect(),
    }
}

/// The MTU of a flannel VXLAN device over a parent of `parent_mtu`, as flanneld computes it.
pub fn device_mtu(device: &VxlanDevice, parent_mtu: u32) -> u32 {
    device.mtu.unwrap_or_else(|| {
        let overhead = if device.local.is_ipv4() {
            super::tunnels::VXLAN_OVERHEAD_V4
        } else {
            super::tunnels::VXLAN_OVERHEAD_V6
        };
        parent_mtu.saturating_sub(overhead)
    })
}

/// A route as `route -n` prints it (IPv4 only; columns separated by one space):
/// `10.244.1.0 10.244.1.0 255.255.255.0 UG 0 0 0 flannel.1`.
pub fn route_n_line(route: &DesiredRoute) -> Option<String> {
    let IpNet::V4(prefix) = route.prefix else {
        return None;
    };
    let gateway = match route.gateway {
        Some(IpAddr::V4(gw)) => gw,
        Some(IpAddr::V6(_)) => return None,
        None => Ipv4Addr::UNSPECIFIED,
    };
    let mut flags = String::from("U");
    if route.gateway.is_some() {
        flags.push('G');
    }
    if prefix.prefix_len() == 32 {
        flags.push('H');
    }
    let iface = route.device.as_deref().unwrap_or("*");
    Some(format!(
        "{} {} {} {} 0 0 0 {}",
        prefix.network(),
        gateway,
        prefix.netmask(),
        flags,
        iface
    ))
}

/// A VTEP's permanent neighbour entry as `arp -n` prints it (IPv4):
/// `10.244.1.0 ether 0e:61:06:ff:7a:73 CM flannel.1`.
pub fn arp_n_line(peer: &VxlanPeer) -> Option<String> {
    peer.tunnel_ip
        .is_ipv4()
        .then(|| format!("{} ether {} CM {}", peer.tunnel_ip, peer.mac, peer.device))
}

/// A VTEP's FDB entry as `bridge fdb` prints it:
/// `0a:72:bf:3f:cd:40 dev flannel.1 dst 192.168.0.8 self permanent`.
pub fn fdb_line(peer: &VxlanPeer) -> String {
    format!(
        "{} dev {} dst {} self permanent",
        peer.mac, peer.device, peer.underlay
    )
}

/// The plan's tables in the seeds' formats: `route -n` lines (by prefix), `arp -n` lines (by
/// address), `bridge fdb` lines (by MAC).
pub fn tables(plan: &FlannelPlan) -> (Vec<String>, Vec<String>, Vec<String>) {
    let routes = plan.routes.iter().filter_map(route_n_line).collect();
    let mut peers: Vec<&VxlanPeer> = plan.tunnels.vxlan_peers.iter().collect();
    peers.sort_by_key(|p| p.tunnel_ip);
    let arp = peers.iter().filter_map(|p| arp_n_line(p)).collect();
    peers.sort_by_key(|p| p.mac);
    let fdb = peers.iter().map(|p| fdb_line(p)).collect();
    (routes, arp, fdb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flannel::VxlanBackend;

    /// Collapses runs of whitespace, as the seeds print the tables.
    fn norm(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn lease(cidr: &str, ip: &str, mac: &str) -> FlannelNode {
        FlannelNode {
            pod_cidr_v4: Some(cidr.parse().unwrap()),
            public_ip: Some(ip.parse().unwrap()),
            vtep_mac: Some(mac.parse().unwrap()),
            backend_type: Some("vxlan".into()),
            kube_subnet_manager: true,
            ..FlannelNode::default()
        }
    }

    /// Seed 000's cluster: `master` 192.168.0.39 (10.244.0.0/24, fe:be:87:93:06:e2), `node1`
    /// 192.168.0.22 (10.244.1.0/24, 0e:61:06:ff:7a:73), `node2` 192.168.0.8 (10.244.2.0/24,
    /// 0a:72:bf:3f:cd:40); eth0 is 192.168.0.0/26 (node1's `route -n`).
    fn seed000() -> Vec<(&'static str, FlannelNode)> {
        vec![
            (
                "master",
                lease("10.244.0.0/24", "192.168.0.39", "fe:be:87:93:06:e2"),
            ),
            (
                "node1",
                lease("10.244.1.0/24", "192.168.0.22", "0e:61:06:ff:7a:73"),
            ),
            (
                "node2",
                lease("10.244.2.0/24", "192.168.0.8", "0a:72:bf:3f:cd:40"),
            ),
        ]
    }

    fn conf(text: &str) -> NetConf {
        NetConf::parse(text).unwrap()
    }

    /// flannel's manifest config (kube-flannel.yml), which seed 000 applied.
    const SEED000_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;

    fn plan_for(
        name: &str,
        nodes: &[(&'static str, FlannelNode)],
        conf: &NetConf,
        prefix: u8,
    ) -> FlannelPlan {
        let own = &nodes.iter().find(|(n, _)| *n == name).unwrap().1;
        let local = FlannelLocal {
            name: name.into(),
            nic: "eth0".into(),
            ipv4: Some(Ipv4Net::new(own.public_ip.unwrap(), prefix).unwrap()),
            ipv6: None,
            lease: Some(own.clone()),
            vtep_mac: own.vtep_mac.unwrap(),
            vtep_mac_v6: MacAddr::from_seed(name),
        };
        plan(&local, conf, nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))))
    }

    /// The `flannel.1` lines of a seed's `route -n` output.
    fn flannel_lines(text: &str) -> Vec<String> {
        norm(text)
            .into_iter()
            .filter(|l| l.ends_with(" flannel.1"))
            .collect()
    }

    #[test]
    fn seed000_master_tables() {
        let p = plan_for("master", &seed000(), &conf(SEED000_CONF), 26);
        let (routes, arp, fdb) = tables(&p);
        // Seed 000, `[root@master huazai]# route -n`, `arp -n`, `bridge fdb`.
        assert_eq!(
            routes,
            norm(
                "10.244.1.0 10.244.1.0 255.255.255.0 UG 0 0 0 flannel.1
                 10.244.2.0 10.244.2.0 255.255.255.0 UG 0 0 0 flannel.1"
            )
        );
        assert_eq!(
            arp,
            norm(
                "10.244.1.0 ether 0e:61:06:ff:7a:73 CM flannel.1
                 10.244.2.0 ether 0a:72:bf:3f:cd:40 CM flannel.1"
            )
        );
        assert_eq!(
            fdb,
            norm(
                "0a:72:bf:3f:cd:40 dev flannel.1 dst 192.168.0.8 self permanent
                 0e:61:06:ff:7a:73 dev flannel.1 dst 192.168.0.22 self permanent"
            )
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // `ip route` form: the onlink the kernel needs for a gateway on a /32 device.
        assert_eq!(
            p.routes[0].to_string(),
            "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink"
        );
    }

    #[test]
    fn seed000_master_device() {
        // Seed 000: `ip -d link show flannel.1`: mtu 1450, ether fe:be:87:93:06:e2,
        // `vxlan id 1 local 192.168.0.39 dev eth0 ... dstport 8472`; `ifconfig flannel.1`:
        // inet 10.244.0.0 netmask 255.255.255.255.
        let p = plan_for("master", &seed000(), &conf(SEED000_CONF), 26);
        let [device] = p.tunnels.vxlan.as_slice() else {
            panic!("one device expected: {:?}", p.tunnels.vxlan)
        };
        assert_eq!(device.name, "flannel.1");
        assert_eq!(device.vni, 1);
        assert_eq!(device.port, 8472);
        assert_eq!(device.mac.to_string(), "fe:be:87:93:06:e2");
        assert_eq!(device.local.to_string(), "192.168.0.39");
        assert_eq!(device.parent, "eth0");
        assert_eq!(device.address, Some("10.244.0.0/32".parse().unwrap()));
        assert_eq!(device_mtu(device, 1500), 1450);
        assert!(p.tunnels.ipip.is_none());
    }

    #[test]
    fn seed000_node1_and_node2_tables() {
        // Seed 000, `[root@node1 net.d]# route -n` (its flannel.1 rows), `arp -n`,
        // `bridge fdb`; `[root@node2 ~]# route -n`.
        let node1_route_n = "0.0.0.0 192.168.0.1 0.0.0.0 UG 0 0 0 eth0
            10.244.0.0 10.244.0.0 255.255.255.0 UG 0 0 0 flannel.1
            10.244.1.0 0.0.0.0 255.255.255.0 U 0 0 0 cni0
            10.244.2.0 10.244.2.0 255.255.255.0 UG 0 0 0 flannel.1
            172.17.0.0 0.0.0.0 255.255.0.0 U 0 0 0 docker0
            192.168.0.0 0.0.0.0 255.255.255.192 U 0 0 0 eth0";
        let p = plan_for("node1", &seed000(), &conf(SEED000_CONF), 26);
        let (routes, arp, fdb) = tables(&p);
        assert_eq!(routes, flannel_lines(node1_route_n));
        assert_eq!(
            arp,
            norm(
                "10.244.0.0 ether fe:be:87:93:06:e2 CM flannel.1
                 10.244.2.0 ether 0a:72:bf:3f:cd:40 CM flannel.1"
            )
        );
        assert_eq!(
            fdb,
            norm(
                "0a:72:bf:3f:cd:40 dev flannel.1 dst 192.168.0.8 self permanent
                 fe:be:87:93:06:e2 dev flannel.1 dst 192.168.0.39 self permanent"
            )
        );

        let node2_route_n = "0.0.0.0 192.168.0.1 0.0.0.0 UG 0 0 0 eth0
            10.244.0.0 10.244.0.0 255.255.255.0 UG 0 0 0 flannel.1
            10.244.1.0 10.244.1.0 255.255.255.0 UG 0 0 0 flannel.1
            10.244.2.0 0.0.0.0 255.255.255.0 U 0 0 0 cni0";
        let p = plan_for("node2", &seed000(), &conf(SEED000_CONF), 26);
        assert_eq!(tables(&p).0, flannel_lines(node2_route_n));
    }

    #[test]
    fn seed002_ip_route_and_fdb() {
        // Seed 002: config `{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type":
        // "vxlan"}}`; docker1 172.16.70.191 holds 10.0.65.0/24, docker2 172.16.70.192 holds
        // 10.0.32.0/24 with `{"PublicIP":"172.16.70.192","BackendType":"vxlan",
        // "BackendData":{"VtepMAC":"4e:75:5c:b8:d8:8e"}}` (docker1's MAC is not shown).
        let conf =
            conf(r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#);
        let nodes = vec![
            (
                "docker1",
                lease("10.0.65.0/24", "172.16.70.191", "02:00:00:00:00:01"),
            ),
            (
                "docker2",
                lease("10.0.32.0/24", "172.16.70.192", "4e:75:5c:b8:d8:8e"),
            ),
        ];
        let p = plan_for("docker1", &nodes, &conf, 24);
        // `ip route` on docker1 (its flannel.1 row).
        assert_eq!(p.routes.len(), 1);
        assert_eq!(
            p.routes[0].to_string(),
            "10.0.32.0/24 via 10.0.32.0 dev flannel.1 onlink"
        );
        // `bridge fdb show dev flannel.1` prints the entry without `dev flannel.1`.
        assert_eq!(
            fdb_line(&p.tunnels.vxlan_peers[0]).replace(" dev flannel.1", ""),
            "4e:75:5c:b8:d8:8e dst 172.16.70.192 self permanent"
        );
    }

    #[test]
    fn seed004_route_and_fdb() {
        // Seed 004 masks the pod network as `x.x`: Node B's subnet `x.x.16.0/24`, its VTEP MAC
        // 5e:f8:4f:00:e3:37, its address 10.168.0.3. Here `x.x` is 10.16 (the seed's own
        // node network is 10.168.0.0/24).
        let conf = conf(r#"{"Network": "10.16.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        let nodes = vec![
            (
                "node-a",
                lease("10.16.15.0/24", "10.168.0.2", "02:00:00:00:00:0a"),
            ),
            (
                "node-b",
                lease("10.16.16.0/24", "10.168.0.3", "5e:f8:4f:00:e3:37"),
            ),
        ];
        let p = plan_for("node-a", &nodes, &conf, 24);
        let (routes, _, fdb) = tables(&p);
        let seed_route =
            "x.x.16.0       x.x.16.0       255.255.255.0   UG    0      0        0 flannel.1";
        assert_eq!(routes, norm(&seed_route.replace("x.x", "10.16")));
        assert_eq!(
            fdb,
            norm("5e:f8:4f:00:e3:37 dev flannel.1 dst 10.168.0.3 self permanent")
        );
    }

    #[test]
    fn direct_routing_routes_same_subnet_nodes_through_the_nic() {
        let c = conf(
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#,
        );
        let mut nodes = seed000();
        nodes.push((
            "far",
            lease("10.244.9.0/24", "192.168.7.5", "02:11:22:33:44:55"),
        ));
        let p = plan_for("node1", &nodes, &c, 26);
        assert_eq!(
            p.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "10.244.0.0/24 via 192.168.0.39 dev eth0",
                "10.244.2.0/24 via 192.168.0.8 dev eth0",
                "10.244.9.0/24 via 10.244.9.0 dev flannel.1 onlink",
            ]
        );
        assert_eq!(p.routes[0].kind, RouteKind::BlockDirect);
        // Only the encapsulated node has VTEP entries.
        assert_eq!(p.tunnels.vxlan_peers.len(), 1);
        assert_eq!(p.tunnels.vxlan_peers[0].node, "far");
        // Without the subnet (a /32 address) every node is encapsulated.
        let p = plan_for("node1", &nodes, &c, 32);
        assert!(p.routes.iter().all(|r| r.kind == RouteKind::BlockVxlan));
    }

    #[test]
    fn host_gw_routes_via_public_ips_and_has_no_device() {
        let c = conf(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#);
        let mut nodes = seed000();
        for (_, l) in &mut nodes {
            l.backend_type = Some("host-gw".into());
            l.vtep_mac = None;
        }
        let own = nodes[0].1.clone();
        let local = FlannelLocal {
            name: "master".into(),
            nic: "eth0".into(),
            ipv4: Some("192.168.0.39/26".parse().unwrap()),
            ipv6: None,
            lease: Some(own),
            vtep_mac: MacAddr::from_seed("master"),
            vtep_mac_v6: MacAddr::from_seed("master6"),
        };
        let p = plan(&local, &c, nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))));
        assert_eq!(
            tables(&p).0,
            norm(
                "10.244.1.0 192.168.0.22 255.255.255.0 UG 0 0 0 eth0
                 10.244.2.0 192.168.0.8 255.255.255.0 UG 0 0 0 eth0"
            )
        );
        assert_eq!(p.tunnels, TunnelPlan::default());
        let local = FlannelLocal {
            ipv4: Some("192.168.0.39/30".parse().unwrap()),
            ..local
        };
        let p = plan(&local, &c, nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))));
        assert!(p.routes.is_empty());
        assert_eq!(p.warnings.len(), 2);
        assert!(matches!(
            p.warnings[0],
            FlannelWarning::HostGwNotInSubnet { .. }
        ));
    }

    #[test]
    fn incomplete_foreign_and_broken_leases_are_left_out_with_a_reason() {
        let c = conf(SEED000_CONF);
        let mut nodes = seed000();
        nodes[1].1.vtep_mac = None; // node1: flanneld not yet started there
        nodes[2].1.backend_type = Some("wireguard".into());
        nodes.push((
            "outside",
            lease("10.9.0.0/24", "192.168.0.40", "02:00:00:00:00:02"),
        ));
        nodes.push((
            "zz-dup",
            lease("10.244.2.0/24", "192.168.0.41", "02:00:00:00:00:03"),
        ));
        nodes[4].1.backend_type = Some("vxlan".into());
        nodes[2].1.backend_type = Some("vxlan".into());
        nodes.push(("nolease", FlannelNode::default()));
        let broken = FlannelNodeError::BadPodCidr("x".into());
        let own = nodes[0].1.clone();
        let local = FlannelLocal {
            name: "master".into(),
            nic: "eth0".into(),
            ipv4: Some("192.168.0.39/26".parse().unwrap()),
            ipv6: None,
            lease: Some(own),
            vtep_mac: MacAddr::from_seed("master"),
            vtep_mac_v6: MacAddr::from_seed("master6"),
        };
        let mut input: Vec<(&str, Option<Result<&FlannelNode, &FlannelNodeError>>)> =
            nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))).collect();
        input.push(("broken", Some(Err(&broken))));
        input.push(("plain", None));
        let p = plan(&local, &c, input);
        assert_eq!(
            p.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"],
            "node2 only; zz-dup's 10.244.2.0/24 loses by name order"
        );
        assert_eq!(p.tunnels.vxlan_peers.len(), 1);
        assert_eq!(p.tunnels.vxlan_peers[0].node, "node2");
        let text: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("Node \"node1\": no VtepMAC"), "{text:?}");
        assert!(
            has("Node \"outside\": podCIDR 10.9.0.0/24 is outside"),
            "{text:?}"
        );
        assert!(
            has("Node \"zz-dup\": podCIDR 10.244.2.0/24 is also Node \"node2\"'s"),
            "{text:?}"
        );
        assert!(
            has("Node \"broken\": spec.podCIDR(s) entry \"x\""),
            "{text:?}"
        );
        assert_eq!(p.warnings.len(), 4, "{text:?}");

        nodes[2].1.backend_type = Some("host-gw".into());
        let p = plan(&local, &c, nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))));
        assert!(
            p.warnings
                .iter()
                .any(|w| w.to_string().contains("backend-type \"host-gw\""))
        );
    }

    #[test]
    fn without_own_podcidr_nothing_is_planned() {
        let c = conf(SEED000_CONF);
        let nodes = seed000();
        let local = FlannelLocal {
            name: "new".into(),
            nic: "eth0".into(),
            ipv4: Some("192.168.0.50/26".parse().unwrap()),
            ipv6: None,
            lease: None,
            vtep_mac: MacAddr::from_seed("new"),
            vtep_mac_v6: MacAddr::from_seed("new6"),
        };
        let p = plan(&local, &c, nodes.iter().map(|(n, l)| (*n, Some(Ok(l)))));
        assert!(p.routes.is_empty() && p.tunnels.vxlan.is_empty());
        assert_eq!(
            p.warnings,
            [FlannelWarning::LocalNoPodCidr { family: "IPv4" }]
        );
    }

    #[test]
    fn dual_stack_adds_flannel_v6_1() {
        let c = NetConf {
            network: Some("10.244.0.0/16".parse().unwrap()),
            ipv6_network: Some("fd00:10:244::/56".parse().unwrap()),
            subnet_len: 24,
            ipv6_subnet_len: 64,
            backend: Backend::Vxlan(VxlanBackend::default()),
        };
        let mut a = lease("10.244.0.0/24", "192.168.0.39", "fe:be:87:93:06:e2");
        a.pod_cidr_v6 = Some("fd00:10:244::/64".parse().unwrap());
        a.public_ipv6 = Some("fd00:192::39".parse().unwrap());
        let mut b = lease("10.244.1.0/24", "192.168.0.22", "0e:61:06:ff:7a:73");
        b.pod_cidr_v6 = Some("fd00:10:244:1::/64".parse().unwrap());
        b.public_ipv6 = Some("fd00:192::22".parse().unwrap());
        b.vtep_mac_v6 = Some("0e:61:06:ff:7a:76".parse().unwrap());
        let local = FlannelLocal {
            name: "a".into(),
            nic: "eth0".into(),
            ipv4: Some("192.168.0.39/26".parse().unwrap()),
            ipv6: Some("fd00:192::39/64".parse().unwrap()),
            lease: Some(a.clone()),
            vtep_mac: a.vtep_mac.unwrap(),
            vtep_mac_v6: MacAddr::from_seed("a-v6"),
        };
        let p = plan(&local, &c, [("a", Some(Ok(&a))), ("b", Some(Ok(&b)))]);
        assert_eq!(
            p.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink",
                "fd00:10:244:1::/64 via fd00:10:244:1:: dev flannel-v6.1 onlink",
            ]
        );
        let v6 = &p.tunnels.vxlan[1];
        assert_eq!(v6.name, "flannel-v6.1");
        assert_eq!(v6.address, Some("fd00:10:244::/128".parse().unwrap()));
        assert_eq!(device_mtu(v6, 1500), 1430);
        let peer6 = p
            .tunnels
            .vxlan_peers
            .iter()
            .find(|p| p.device == "flannel-v6.1")
            .unwrap();
        assert_eq!(peer6.underlay.to_string(), "fd00:192::22");
        assert_eq!(peer6.mac.to_string(), "0e:61:06:ff:7a:76");
    }
}
