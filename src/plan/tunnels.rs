//! The encapsulation devices a node must have, and their per-remote-node entries.
//!
//! This is the plan's half of "the dataplane owns the tunnels": the planner (Calico's pools
//! and nodes, or flannel's network config and nodes) decides *which* devices exist and what
//! each remote VTEP looks like; the dataplane makes the kernel match, device by device
//! (`tunl0`, `vxlan.calico`, `vxlan-v6.calico`, `flannel.1`, `flannel-v6.1`), and must have a
//! device and its neighbour/FDB entries in place before it installs routes that use them.
//!
//! A [`TunnelPlan`] is complete: a device or VTEP entry that was in the previous plan and is
//! not in this one is removed (only if podroute made it; a foreign device of that name is
//! reported, not destroyed).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use sha1::{Digest, Sha1};

use super::{EncapMode, PlanInput, TUNNEL_DEVICE};

/// Calico's IPv4 VXLAN device.
pub const VXLAN_DEVICE_V4: &str = "vxlan.calico";
/// Calico's IPv6 VXLAN device.
pub const VXLAN_DEVICE_V6: &str = "vxlan-v6.calico";
/// Calico's VNI (Felix's default `VXLANVNI`).
pub const CALICO_VXLAN_VNI: u32 = 4096;
/// Calico's UDP port (Felix's default `VXLANPort`).
pub const CALICO_VXLAN_PORT: u16 = 4789;
/// Bytes an IPv4 VXLAN encapsulation adds (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// Bytes an IPv6 VXLAN encapsulation adds (outer IPv6 40 + 8 + 8 + 14).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// An Ethernet address (`66:d4:9b:7c:1a:02`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast address derived from `seed` (for a VTEP whose
    /// node has no MAC annotation yet): the same node name always gives the same MAC, so a
    /// restart does not change what the other nodes have in their neighbour and FDB tables.
    pub fn from_seed(seed: &str) -> Self {
        let digest = Sha1::digest(seed.as_bytes());
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&digest[..6]);
        // Locally administered (bit 1 set), unicast (bit 0 clear).
        mac[0] = (mac[0] | 0x02) & 0xfe;
        MacAddr(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address: {0:?} (want six hex octets separated by ':')")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.trim().split([':', '-']);
        for octet in mac.iter_mut() {
            let part = parts.next().ok_or_else(|| MacParseError(s.into()))?;
            if part.is_empty() || part.len() > 2 {
                return Err(MacParseError(s.into()));
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.into()));
        }
        Ok(MacAddr(mac))
    }
}

/// The IPIP device (`tunl0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipTunnel {
    /// `tunl0`.
    pub name: String,
    /// Host NIC whose MTU the tunnel's derives from (MTU − 20).
    pub nic: String,
    /// The node's tunnel address (`/32`), see [`super::tunnel_address`].
    pub address: Option<Ipv4Addr>,
    /// The node's IPv4 address: the outer source of encapsulated packets (the userspace
    /// forwarder needs it; `None` on an IPv6-only node, where IPIP cannot work).
    pub local: Option<Ipv4Addr>,
    /// The other nodes' IPv4 addresses: outer sources the userspace forwarder accepts
    /// (besides the gateways of the routes through the device). Sorted, each once.
    pub peers: Vec<Ipv4Addr>,
    /// Every IPv4 pool: decapsulated packets need source and destination inside one of them.
    /// Sorted, each once.
    pub pools: Vec<Ipv4Net>,
}

/// A VXLAN device (VTEP) this node must have, as Felix or flanneld make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    /// `vxlan.calico`, `vxlan-v6.calico`, `flannel.1`, `flannel-v6.1`.
    pub name: String,
    /// VNI (Calico 4096, flannel 1 by default).
    pub vni: u32,
    /// Destination UDP port (Calico 4789, flannel 8472 by default).
    pub port: u16,
    /// The device's own MAC (the node's VTEP MAC).
    pub mac: MacAddr,
    /// Underlay source address: the node's address of the device's family.
    pub local: IpAddr,
    /// Host NIC the encapsulated packets leave through (`dev` of `ip link add ... vxlan`).
    pub parent: String,
    /// MTU; `None` = the parent's MTU minus [`VXLAN_OVERHEAD_V4`] / [`VXLAN_OVERHEAD_V6`].
    pub mtu: Option<u32>,
    /// Address on the device: Calico's VXLAN tunnel address (`/32`, `/128`), flannel's
    /// `<subnet>.0/32`.
    pub address: Option<IpNet>,
}

/// One remote VTEP as seen through one local device: a permanent neighbour entry
/// `tunnel_ip lladdr mac dev DEVICE` and a permanent FDB entry `mac dst underlay dev DEVICE
/// self`. The routes that use it are `BLOCK via tunnel_ip dev DEVICE onlink`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanPeer {
    /// Local device name the entries belong to.
    pub device: String,
    /// The remote node's name (for status and logs).
    pub node: String,
    /// The remote VTEP's address (its tunnel address); the routes' gateway.
    pub tunnel_ip: IpAddr,
    /// The remote VTEP's MAC.
    pub mac: MacAddr,
    /// The remote node's underlay address (outer destination).
    pub underlay: IpAddr,
}

/// A node's VXLAN tunnel endpoint as the datastore gives it: Felix's VTEP, from the Node's
/// `projectcalico.org/IPv4VXLANTunnelAddr` + `IPv4VXLANTunnelMACAddr` (or the IPv6 pair).
/// The node's underlay address is its `IPv4Address` / `IPv6Address`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vtep {
    pub node: String,
    /// The VXLAN tunnel address; its family says which device it belongs to.
    pub tunnel_ip: IpAddr,
    /// The annotation's MAC, else [`default_vtep_mac`].
    pub mac: MacAddr,
}

/// The VTEP MAC of a node that has no MAC annotation (yet): derived from the node name and
/// family, so every node computes the same one for it and its own agent uses it too.
pub fn default_vtep_mac(node: &str, ipv4: bool) -> MacAddr {
    if ipv4 {
        MacAddr::from_seed(node)
    } else {
        MacAddr::from_seed(&format!("{node}/ipv6"))
    }
}

/// The VXLAN devices and remote VTEPs of Calico's `vxlanMode` for `input` (pure), as Felix
/// makes them:
/// - `vxlan.calico` when an IPv4 pool has `vxlanMode` `Always` or `CrossSubnet` (and not
///   `ipipMode` too) and the node has an IPv4 address; `vxlan-v6.calico` likewise for IPv6.
///   VNI [`CALICO_VXLAN_VNI`], port [`CALICO_VXLAN_PORT`], parent = the host NIC, local = the
///   node's address, MTU = the NIC's minus the overhead (`mtu: None`), MAC and address from
///   the node's own [`Vtep`] (without one: [`default_vtep_mac`] and no address);
/// - one [`VxlanPeer`] per other node with a VTEP of the device's family and an underlay
///   address of that family (CrossSubnet neighbours too: Felix programs every VTEP; only
///   the routes differ).
pub fn vxlan_plan(input: &super::PlanInput) -> (Vec<VxlanDevice>, Vec<VxlanPeer>) {
    use super::EncapMode;
    let local = &input.local;
    let wants = |ipv4: bool| {
        input.pools.iter().any(|p| {
            p.cidr.addr().is_ipv4() == ipv4
                && p.vxlan != EncapMode::Never
                && p.ipip == EncapMode::Never
        })
    };
    let mut devices = Vec::new();
    let mut peers = Vec::new();
    let families = [
        (true, local.ipv4.map(|n| IpAddr::V4(n.addr()))),
        (false, local.ipv6.map(|n| IpAddr::V6(n.addr()))),
    ];
    for (ipv4, underlay) in families {
        let Some(underlay) = underlay.filter(|_| wants(ipv4)) else {
            continue;
        };
        let name = if ipv4 {
            VXLAN_DEVICE_V4
        } else {
            VXLAN_DEVICE_V6
        };
        let own = input
            .vteps
            .iter()
            .find(|v| v.node == local.name && v.tunnel_ip.is_ipv4() == ipv4);
        devices.push(VxlanDevice {
            name: name.to_owned(),
            vni: CALICO_VXLAN_VNI,
            port: CALICO_VXLAN_PORT,
            mac: own.map_or_else(|| default_vtep_mac(&local.name, ipv4), |v| v.mac),
            local: underlay,
            parent: local.nic.clone(),
            mtu: None,
            address: own.map(|v| IpNet::from(v.tunnel_ip)),
        });
        for vtep in input
            .vteps
            .iter()
            .filter(|v| v.node != local.name && v.tunnel_ip.is_ipv4() == ipv4)
        {
            let Some(node) = input.nodes.iter().find(|n| n.name == vtep.node) else {
                continue;
            };
            let remote = if ipv4 {
                node.ipv4.map(IpAddr::V4)
            } else {
                node.ipv6.map(IpAddr::V6)
            };
            let Some(remote) = remote.filter(|r| *r != underlay) else {
                continue;
            };
            peers.push(VxlanPeer {
                device: name.to_owned(),
                node: vtep.node.clone(),
                tunnel_ip: vtep.tunnel_ip,
                mac: vtep.mac,
                underlay: remote,
            });
        }
    }
    peers.sort();
    peers.dedup_by(|a, b| a.device == b.device && a.tunnel_ip == b.tunnel_ip);
    (devices, peers)
}

/// Every encapsulation device the node must have and every remote VTEP, for one plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelPlan {
    /// `tunl0`, when some pool needs IPIP from this node.
    pub ipip: Option<IpipTunnel>,
    /// VXLAN devices.
    pub vxlan: Vec<VxlanDevice>,
    /// Remote VTEPs, each through one of [`Self::vxlan`]'s devices.
    pub vxlan_peers: Vec<VxlanPeer>,
}

/// Where `tunl0`'s address may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpipAddressSource {
    /// The Node's `projectcalico.org/IPv4IPIPTunnelAddr` annotation.
    pub annotation: Option<Ipv4Addr>,
    /// IPAM allocates the address (the Kubernetes datastore): only the annotation is used,
    /// never a guess (a guess could be a pod's address). Without IPAM (the YAML directory),
    /// the node's first block address is the fallback ([`super::tunnel_address`]).
    pub ipam: bool,
}

/// The tunnels this node must have for `input`: `tunl0` when some IPv4 pool has `ipipMode`
/// `Always` or `CrossSubnet` (disabled pools too: they still route). VXLAN devices are not
/// planned yet (`vxlan` and `vxlan_peers` stay empty).
pub fn tunnel_plan(input: &PlanInput, address: IpipAddressSource) -> TunnelPlan {
    let needs_ipip = input
        .pools
        .iter()
        .any(|p| p.ipip != EncapMode::Never && p.cidr.addr().is_ipv4());
    let ipip = needs_ipip.then(|| {
        let mut peers: Vec<Ipv4Addr> = input.nodes.iter().filter_map(|n| n.ipv4).collect();
        peers.sort_unstable();
        peers.dedup();
        let mut pools: Vec<Ipv4Net> = input
            .pools
            .iter()
            .filter_map(|p| match p.cidr {
                IpNet::V4(v4) => Some(v4.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        pools.sort_unstable();
        pools.dedup();
        IpipTunnel {
            name: TUNNEL_DEVICE.to_string(),
            nic: input.local.nic.clone(),
            address: if address.ipam {
                address.annotation
            } else {
                super::tunnel_address(input, address.annotation)
            },
            local: input.local.ipv4.map(|n| n.addr()),
            peers,
            pools,
        }
    });
    let (vxlan, vxlan_peers) = vxlan_plan(input);
    TunnelPlan {
        ipip,
        vxlan,
        vxlan_peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BlockSpec, LocalNode, PeerNode, PoolSpec};

    fn pool(name: &str, cidr: &str, ipip: EncapMode) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            cidr: cidr.parse().unwrap(),
            ipip,
            vxlan: EncapMode::Never,
            disabled: false,
        }
    }

    fn input(pools: Vec<PoolSpec>) -> PlanInput {
        PlanInput {
            local: LocalNode {
                name: "master01".into(),
                ipv4: Some("192.168.92.128/24".parse().unwrap()),
                ipv6: None,
                nic: "ens33".into(),
            },
            pools,
            blocks: vec![BlockSpec {
                cidr: "172.16.241.64/26".parse().unwrap(),
                affinity: Some("master01".into()),
                allocations: Vec::new(),
            }],
            learned: Vec::new(),
            nodes: vec![
                PeerNode {
                    name: "node02".into(),
                    ipv4: Some("192.168.93.130".parse().unwrap()),
                    ipv6: None,
                },
                PeerNode {
                    name: "node01".into(),
                    ipv4: Some("192.168.92.129".parse().unwrap()),
                    ipv6: None,
                },
                PeerNode {
                    name: "v6only".into(),
                    ipv4: None,
                    ipv6: Some("fd00::9".parse().unwrap()),
                },
            ],
            local_interfaces: Default::default(),
            vteps: Vec::new(),
        }
    }

    const GUESS: IpipAddressSource = IpipAddressSource {
        annotation: None,
        ipam: false,
    };

    #[test]
    fn ipip_device_only_when_an_ipv4_pool_uses_ipip() {
        for mode in [EncapMode::Always, EncapMode::CrossSubnet] {
            let plan = tunnel_plan(&input(vec![pool("a", "172.16.0.0/16", mode)]), GUESS);
            let ipip = plan.ipip.expect("tunl0 planned");
            assert_eq!(ipip.name, "tunl0");
            assert_eq!(ipip.nic, "ens33");
            assert_eq!(ipip.local, Some("192.168.92.128".parse().unwrap()));
        }
        let never = tunnel_plan(
            &input(vec![pool("a", "172.16.0.0/16", EncapMode::Never)]),
            GUESS,
        );
        assert_eq!(never, TunnelPlan::default());
        // ipipMode on an IPv6 pool is routed as Never: no device for it.
        let v6 = tunnel_plan(
            &input(vec![pool("a", "fd00:10::/48", EncapMode::Always)]),
            GUESS,
        );
        assert_eq!(v6.ipip, None);
    }

    #[test]
    fn ipip_device_carries_the_forwarders_sources_and_pools() {
        let plan = tunnel_plan(
            &input(vec![
                pool("b", "10.9.0.0/16", EncapMode::Never),
                pool("a", "172.16.0.0/16", EncapMode::CrossSubnet),
                pool("c", "fd00:10::/48", EncapMode::Never),
            ]),
            GUESS,
        );
        let ipip = plan.ipip.unwrap();
        assert_eq!(
            ipip.peers,
            vec![
                "192.168.92.129".parse::<Ipv4Addr>().unwrap(),
                "192.168.93.130".parse().unwrap()
            ]
        );
        assert_eq!(
            ipip.pools,
            vec![
                "10.9.0.0/16".parse::<Ipv4Net>().unwrap(),
                "172.16.0.0/16".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ipip_address_from_annotation_ipam_or_first_block_address() {
        let input = input(vec![pool("a", "172.16.0.0/16", EncapMode::Always)]);
        let annotated: Ipv4Addr = "172.16.241.70".parse().unwrap();
        let address = |annotation, ipam| {
            tunnel_plan(&input, IpipAddressSource { annotation, ipam })
                .ipip
                .unwrap()
                .address
        };
        assert_eq!(address(None, false), Some("172.16.241.64".parse().unwrap()));
        assert_eq!(address(Some(annotated), false), Some(annotated));
        assert_eq!(address(Some(annotated), true), Some(annotated));
        assert_eq!(address(None, true), None, "with IPAM, never a guess");
    }

    #[test]
    fn mac_parse_and_display() {
        let mac: MacAddr = "66:D4:9b:7c:1a:02".parse().unwrap();
        assert_eq!(mac.to_string(), "66:d4:9b:7c:1a:02");
        assert!("66:d4:9b:7c:1a".parse::<MacAddr>().is_err());
        assert!("66:d4:9b:7c:1a:02:03".parse::<MacAddr>().is_err());
        assert!("66:d4:9b:7c:1a:zz".parse::<MacAddr>().is_err());
        assert!("".parse::<MacAddr>().is_err());
    }

    #[test]
    fn mac_from_seed_is_stable_local_unicast() {
        let a = MacAddr::from_seed("node01");
        assert_eq!(a, MacAddr::from_seed("node01"));
        assert_ne!(a, MacAddr::from_seed("node02"));
        assert_eq!(a.0[0] & 0x03, 0x02);
    }
}
