//! Nodes: their addresses and BGP identity, as Calico writes them into Kubernetes `Node`
//! annotations.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;

use super::error::{Kind, Reason, Rejection};
use crate::plan::tunnels::MacAddr;

pub const ANNOTATION_IPV4_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANNOTATION_IPV6_ADDRESS: &str = "projectcalico.org/IPv6Address";
pub const ANNOTATION_AS_NUMBER: &str = "projectcalico.org/ASNumber";
pub const ANNOTATION_RR_CLUSTER_ID: &str = "projectcalico.org/RouteReflectorClusterID";
pub const ANNOTATION_IPIP_TUNNEL_ADDR: &str = "projectcalico.org/IPv4IPIPTunnelAddr";
pub const ANNOTATION_VXLAN_TUNNEL_ADDR: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
pub const ANNOTATION_VXLAN_TUNNEL_MAC: &str = "projectcalico.org/IPv4VXLANTunnelMACAddr";
pub const ANNOTATION_VXLAN_TUNNEL_ADDR_V6: &str = "projectcalico.org/IPv6VXLANTunnelAddr";
pub const ANNOTATION_VXLAN_TUNNEL_MAC_V6: &str = "projectcalico.org/IPv6VXLANTunnelMACAddr";

/// A node's VXLAN tunnel endpoints, as Felix/calico-node annotate them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VxlanAnnotations {
    /// `projectcalico.org/IPv4VXLANTunnelAddr`.
    pub ipv4: Option<Ipv4Addr>,
    /// `projectcalico.org/IPv4VXLANTunnelMACAddr`.
    pub mac4: Option<MacAddr>,
    /// `projectcalico.org/IPv6VXLANTunnelAddr`.
    pub ipv6: Option<Ipv6Addr>,
    /// `projectcalico.org/IPv6VXLANTunnelMACAddr`.
    pub mac6: Option<MacAddr>,
}

/// Where a node's IPv4 address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSource {
    /// `projectcalico.org/IPv4Address`, with the node's real prefix length.
    Annotation,
    /// The Node's `InternalIP`; no subnet is known, so the prefix is /32.
    InternalIp,
}

/// What podroute needs to know about one Kubernetes node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub name: String,
    /// The node's address with its subnet prefix (`10.0.0.5/24`): the prefix decides which
    /// peers are in the same subnet (CrossSubnet).
    pub ipv4: Option<Ipv4Net>,
    pub ipv4_source: Option<AddressSource>,
    pub ipv6: Option<Ipv6Net>,
    /// The Node's IPv6 `InternalIP`, for `IP6_AUTODETECTION_METHOD=kubernetes-internal-ip`
    /// only (unlike IPv4, an IPv6 InternalIP does not stand in for the annotation: Calico's
    /// bird6 meshes only with nodes that have `projectcalico.org/IPv6Address`).
    pub internal_ipv6: Option<std::net::Ipv6Addr>,
    /// Per-node AS number overriding the cluster's.
    pub as_number: Option<u32>,
    /// Set on route reflectors.
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
    pub ipip_tunnel_addr: Option<Ipv4Addr>,
    /// The VXLAN tunnel addresses and MACs.
    pub vxlan: VxlanAnnotations,
    pub labels: BTreeMap<String, String>,
    /// flannel's lease on this Node (`spec.podCIDR(s)`, `flannel.alpha.coreos.com/*`):
    /// `None` when the Node has neither; `Some(Err)` when they cannot be read (the node is
    /// then left out of the flannel plan with that reason; Calico mode does not look).
    pub flannel: Option<Result<super::flannel::FlannelNode, super::flannel::FlannelNodeError>>,
    /// The kubelet's `Ready` condition: `Some(true)` when `True`, `Some(false)` when `False`
    /// or `Unknown` (the node controller sets `Unknown` when the kubelet stops reporting),
    /// `None` when the Node has no such condition (a YAML datastore without status). Orders
    /// the mesh's connection attempts: ready nodes first.
    pub ready: Option<bool>,
}

fn parse_ipv4_with_prefix(text: &str) -> Option<Ipv4Net> {
    let text = text.trim();
    if let Ok(net) = text.parse::<Ipv4Net>() {
        return Some(net);
    }
    text.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
}

fn parse_ipv6_with_prefix(text: &str) -> Option<Ipv6Net> {
    let text = text.trim();
    if let Ok(net) = text.parse::<Ipv6Net>() {
        return Some(net);
    }
    text.parse::<std::net::Ipv6Addr>().ok().map(Ipv6Net::from)
}

impl NodeInfo {
    /// Reads a Kubernetes `Node`.
    pub fn from_node(node: &Node) -> Result<NodeInfo, Rejection> {
        let name = node.metadata.name.as_deref().unwrap_or("");
        let reject = |reason| Rejection::new(Kind::Node, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let empty = BTreeMap::new();
        let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
        let get = |key: &str| annotations.get(key).filter(|v| !v.trim().is_empty());
        let bad = |annotation: &'static str, value: &str, expected: &'static str| {
            reject(Reason::BadAnnotation {
                annotation,
                value: value.to_string(),
                expected,
            })
        };

        let mut ipv4 = None;
        let mut ipv4_source = None;
        if let Some(v) = get(ANNOTATION_IPV4_ADDRESS) {
            let net = parse_ipv4_with_prefix(v).ok_or_else(|| {
                bad(
                    ANNOTATION_IPV4_ADDRESS,
                    v,
                    "an IPv4 address with prefix (e.g. 10.0.0.5/24)",
                )
            })?;
            ipv4 = Some(net);
            ipv4_source = Some(AddressSource::Annotation);
        } else if let Some(ip) = internal_ipv4(node) {
            ipv4 = Some(Ipv4Net::from(ip));
            ipv4_source = Some(AddressSource::InternalIp);
        }
        let ipv6 = match get(ANNOTATION_IPV6_ADDRESS) {
            None => None,
            Some(v) => Some(parse_ipv6_with_prefix(v).ok_or_else(|| {
                bad(
                    ANNOTATION_IPV6_ADDRESS,
                    v,
                    "an IPv6 address with prefix (e.g. fd00::5/64)",
                )
            })?),
        };
        let as_number =
            match get(ANNOTATION_AS_NUMBER) {
                None => None,
                Some(v) => Some(v.trim().parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(
                    || bad(ANNOTATION_AS_NUMBER, v, "an AS number in 1..=4294967295"),
                )?),
            };
        let rr = match get(ANNOTATION_RR_CLUSTER_ID) {
            None => None,
            Some(v) => Some(v.trim().parse::<Ipv4Addr>().map_err(|_| {
                bad(
                    ANNOTATION_RR_CLUSTER_ID,
                    v,
                    "a cluster ID in IPv4 form (e.g. 224.0.0.1)",
                )
            })?),
        };
        let tunnel = match get(ANNOTATION_IPIP_TUNNEL_ADDR) {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|_| bad(ANNOTATION_IPIP_TUNNEL_ADDR, v, "an IPv4 address"))?,
            ),
        };
        let mac = |key: &'static str| match get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<MacAddr>()
                .map(Some)
                .map_err(|_| bad(key, v, "a MAC address (e.g. 66:d4:9b:7c:1a:02)")),
        };
        let vxlan = VxlanAnnotations {
            ipv4: match get(ANNOTATION_VXLAN_TUNNEL_ADDR) {
                None => None,
                Some(v) => Some(
                    v.trim()
                        .parse::<Ipv4Addr>()
                        .map_err(|_| bad(ANNOTATION_VXLAN_TUNNEL_ADDR, v, "an IPv4 address"))?,
                ),
            },
            mac4: mac(ANNOTATION_VXLAN_TUNNEL_MAC)?,
            ipv6: match get(ANNOTATION_VXLAN_TUNNEL_ADDR_V6) {
                None => None,
                Some(v) => Some(
                    v.trim()
                        .parse::<Ipv6Addr>()
                        .map_err(|_| bad(ANNOTATION_VXLAN_TUNNEL_ADDR_V6, v, "an IPv6 address"))?,
                ),
            },
            mac6: mac(ANNOTATION_VXLAN_TUNNEL_MAC_V6)?,
        };
        Ok(NodeInfo {
            name: name.to_string(),
            vxlan,
            ipv4,
            ipv4_source,
            internal_ipv6: internal_ip(node).find_map(|ip| match ip {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            }),
            ipv6,
            as_number,
            route_reflector_cluster_id: rr,
            ipip_tunnel_addr: tunnel,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            flannel: super::flannel::FlannelNode::from_node(node).transpose(),
            ready: node_ready(node),
        })
    }

    /// The node's IPv4 address without prefix.
    pub fn ipv4_addr(&self) -> Option<Ipv4Addr> {
        self.ipv4.map(|n| n.addr())
    }
}

/// The `Ready` condition's status (see [`NodeInfo::ready`]).
pub(crate) fn node_ready(node: &Node) -> Option<bool> {
    node.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

/// The Node's `InternalIP` addresses, in order.
fn internal_ip(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
}

fn internal_ipv4(node: &Node) -> Option<Ipv4Addr> {
    internal_ip(node).find_map(|ip| match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(conditions: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn ready_reads_the_kubelets_ready_condition() {
        let ready = |status: &str| {
            NodeInfo::from_node(&node(serde_json::json!([
                {"type": "DiskPressure", "status": "True"},
                {"type": "Ready", "status": status},
            ])))
            .unwrap()
            .ready
        };
        assert_eq!(ready("True"), Some(true));
        assert_eq!(ready("False"), Some(false));
        assert_eq!(
            ready("Unknown"),
            Some(false),
            "the kubelet stopped reporting"
        );
        let no_ready = node(serde_json::json!([{"type": "DiskPressure", "status": "False"}]));
        assert_eq!(NodeInfo::from_node(&no_ready).unwrap().ready, None);
    }
}
