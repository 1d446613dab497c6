//! flannel's cluster model: the network config (`net-conf.json`) and what flanneld's
//! Kubernetes subnet manager keeps on each `Node` (`spec.podCIDR(s)` and the
//! `flannel.alpha.coreos.com/*` annotations).
//!
//! These are the validated forms the flannel planner ([`crate::plan::flannel`]) reads; there
//! is no separate plan-side copy of them: they are already reduced to what routing needs.
//!
//! Compatibility notes (flanneld's own parsing, which this follows):
//! - `net-conf.json` is read the way Go's `encoding/json` reads it: keys match without regard
//!   to case (`"network"` is `Network`), unknown keys are ignored.
//! - `EnableIPv4` defaults to true, `EnableIPv6` to false; `SubnetLen` defaults to 24 (or the
//!   network's prefix + 1 when the network is /24 or longer), `IPv6SubnetLen` to 64.
//! - A missing `Backend.Type` is flannel's `udp`, which podroute does not program: the config
//!   is rejected with that reason rather than guessed to be `vxlan`.
//! - VXLAN `VNI` defaults to 1, `Port` to 8472 (the Linux kernel's default, which flanneld
//!   uses when `Port` is 0).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use serde_json::Value;

use crate::plan::tunnels::MacAddr;

/// Prefix of every flannel Node annotation.
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
pub const ANNOTATION_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const ANNOTATION_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const ANNOTATION_PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub const ANNOTATION_PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";
pub const ANNOTATION_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const ANNOTATION_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANNOTATION_BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
pub const ANNOTATION_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// flannel's default VXLAN Network Identifier.
pub const DEFAULT_VNI: u32 = 1;
/// flannel's VXLAN UDP port (the Linux kernel's default for `vxlan` devices).
pub const DEFAULT_PORT: u16 = 8472;
/// flannel's default IPv4 subnet length.
pub const DEFAULT_SUBNET_LEN: u8 = 24;
/// flannel's default IPv6 subnet length.
pub const DEFAULT_IPV6_SUBNET_LEN: u8 = 64;
/// flannel's IPv4 VXLAN device.
pub const VXLAN_DEVICE_V4: &str = "flannel.1";
/// flannel's IPv6 VXLAN device.
pub const VXLAN_DEVICE_V6: &str = "flannel-v6.1";
/// The ConfigMap flannel's manifests create, and its key.
pub const CONFIGMAP_NAME: &str = "kube-flannel-cfg";
pub const CONFIGMAP_KEY: &str = "net-conf.json";

/// `Backend.Type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `vxlan`: the `flannel.1` VTEP.
    Vxlan(VxlanBackend),
    /// `host-gw`: `podCIDR via nodeIP dev NIC` to every node (they share one L2 segment).
    HostGw,
}

impl Backend {
    /// The `backend-type` annotation value.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan(_) => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

/// The VXLAN backend's settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VxlanBackend {
    pub vni: u32,
    pub port: u16,
    /// Nodes in the local subnet are routed directly (`host-gw` style), not encapsulated.
    pub direct_routing: bool,
    /// Explicit device MTU; `None`: the parent's MTU minus the encapsulation overhead.
    pub mtu: Option<u32>,
}

impl Default for VxlanBackend {
    fn default() -> Self {
        Self {
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            direct_routing: false,
            mtu: None,
        }
    }
}

/// A validated `net-conf.json`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetConf {
    /// `Network`, when IPv4 is enabled.
    pub network: Option<Ipv4Net>,
    /// `IPv6Network`, when IPv6 is enabled.
    pub ipv6_network: Option<Ipv6Net>,
    pub subnet_len: u8,
    pub ipv6_subnet_len: u8,
    pub backend: Backend,
}

/// Why a `net-conf.json` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetConfError {
    #[error("net-conf.json is not valid JSON: {0}")]
    Json(String),
    #[error("net-conf.json must be a JSON object")]
    NotAnObject,
    #[error("net-conf.json: {field} is {value}, expected {expected}")]
    BadField {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("net-conf.json: {field} is missing, and {needed_by} needs it")]
    Missing {
        field: &'static str,
        needed_by: &'static str,
    },
    #[error("net-conf.json: EnableIPv4 and EnableIPv6 are both false; enable at least one")]
    NoFamily,
    #[error(
        "net-conf.json: SubnetLen {len} does not fit Network {network} (want a length above the \
         network's prefix, at most {max})"
    )]
    SubnetLen { len: u8, network: IpNet, max: u8 },
    #[error(
        "net-conf.json: Backend.Type {0:?} is not supported by podroute (use \"vxlan\" or \
         \"host-gw\"; flannel takes a missing Backend.Type as \"udp\")"
    )]
    UnsupportedBackend(String),
}

/// A JSON object looked up as Go's `encoding/json` does: exact key first, then any key that
/// equals it without regard to case.
fn field<'a>(object: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn bool_field(
    object: &serde_json::Map<String, Value>,
    name: &'static str,
    default: bool,
) -> Result<bool, NetConfError> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(NetConfError::BadField {
            field: name,
            value: other.to_string(),
            expected: "true or false",
        }),
    }
}

fn uint_field(
    object: &serde_json::Map<String, Value>,
    name: &'static str,
    max: u64,
    expected: &'static str,
) -> Result<Option<u64>, NetConfError> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(NetConfError::BadField {
                field: name,
                value: v.to_string(),
                expected,
            }),
        },
    }
}

fn net_field<N: std::str::FromStr>(
    object: &serde_json::Map<String, Value>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<N>, NetConfError> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(|s| s.trim().parse::<N>().ok())
            .map(Some)
            .ok_or_else(|| NetConfError::BadField {
                field: name,
                value: v.to_string(),
                expected,
            }),
    }
}

/// flannel's rule for a missing `SubnetLen`: 24 for networks shorter than /24, else one bit
/// more than the network.
fn default_subnet_len(prefix: u8, default: u8, max: u8) -> u8 {
    if prefix < default {
        default
    } else {
        prefix.saturating_add(1).min(max)
    }
}

fn check_subnet_len(len: u8, network: IpNet, max: u8) -> Result<(), NetConfError> {
    if len <= network.prefix_len() || len > max {
        return Err(NetConfError::SubnetLen { len, network, max });
    }
    Ok(())
}

impl NetConf {
    /// Parses `net-conf.json` (the ConfigMap's `net-conf.json` key, or flanneld's
    /// `--net-config-path` file).
    pub fn parse(text: &str) -> Result<NetConf, NetConfError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| NetConfError::Json(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(NetConfError::NotAnObject);
        };
        let enable_v4 = bool_field(&object, "EnableIPv4", true)?;
        let enable_v6 = bool_field(&object, "EnableIPv6", false)?;
        if !enable_v4 && !enable_v6 {
            return Err(NetConfError::NoFamily);
        }
        let network = if enable_v4 {
            let net: Ipv4Net = net_field(&object, "Network", "an IPv4 CIDR such as 10.244.0.0/16")?
                .ok_or(NetConfError::Missing {
                    field: "Network",
                    needed_by: "EnableIPv4 (true unless set to false)",
                })?;
            Some(net.trunc())
        } else {
            None
        };
        let ipv6_network = if enable_v6 {
            let net: Ipv6Net = net_field(
                &object,
                "IPv6Network",
                "an IPv6 CIDR such as fd00:10:244::/56",
            )?
            .ok_or(NetConfError::Missing {
                field: "IPv6Network",
                needed_by: "EnableIPv6",
            })?;
            Some(net.trunc())
        } else {
            None
        };
        let subnet_len = match uint_field(&object, "SubnetLen", 32, "a prefix length 1..=32")? {
            Some(n) => n as u8,
            None => network.map_or(DEFAULT_SUBNET_LEN, |n| {
                default_subnet_len(n.prefix_len(), DEFAULT_SUBNET_LEN, 32)
            }),
        };
        if let Some(net) = network {
            check_subnet_len(subnet_len, IpNet::V4(net), 32)?;
        }
        let ipv6_subnet_len =
            match uint_field(&object, "IPv6SubnetLen", 128, "a prefix length 1..=128")? {
                Some(n) => n as u8,
                None => ipv6_network.map_or(DEFAULT_IPV6_SUBNET_LEN, |n| {
                    default_subnet_len(n.prefix_len(), DEFAULT_IPV6_SUBNET_LEN, 128)
                }),
            };
        if let Some(net) = ipv6_network {
            check_subnet_len(ipv6_subnet_len, IpNet::V6(net), 128)?;
        }
        let backend = match field(&object, "Backend") {
            None | Some(Value::Null) => {
                return Err(NetConfError::UnsupportedBackend("udp".into()));
            }
            Some(Value::Object(backend)) => parse_backend(backend)?,
            Some(other) => {
                return Err(NetConfError::BadField {
                    field: "Backend",
                    value: other.to_string(),
                    expected: "an object such as {\"Type\": \"vxlan\"}",
                });
            }
        };
        Ok(NetConf {
            network,
            ipv6_network,
            subnet_len,
            ipv6_subnet_len,
            backend,
        })
    }

    /// Whether `cidr` is a subnet flannel could have leased from this config.
    pub fn contains(&self, cidr: IpNet) -> bool {
        match cidr {
            IpNet::V4(c) => self.network.is_some_and(|n| n.contains(&c)),
            IpNet::V6(c) => self.ipv6_network.is_some_and(|n| n.contains(&c)),
        }
    }
}

fn parse_backend(backend: &serde_json::Map<String, Value>) -> Result<Backend, NetConfError> {
    let kind = match field(backend, "Type") {
        None | Some(Value::Null) => "udp".to_string(),
        Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(other) => {
            return Err(NetConfError::BadField {
                field: "Backend.Type",
                value: other.to_string(),
                expected: "a string such as \"vxlan\"",
            });
        }
    };
    match kind.as_str() {
        "vxlan" => {
            let vni = uint_field(backend, "VNI", 0x00ff_ffff, "a VNI in 0..=16777215")?
                .map_or(DEFAULT_VNI, |n| n as u32);
            let port = match uint_field(backend, "Port", 65535, "a UDP port in 0..=65535")? {
                None | Some(0) => DEFAULT_PORT,
                Some(p) => p as u16,
            };
            let direct_routing = bool_field(backend, "DirectRouting", false)?;
            let mtu = match uint_field(backend, "MTU", 65535, "an MTU in 68..=65535")? {
                None | Some(0) => None,
                Some(m) if m < 68 => {
                    return Err(NetConfError::BadField {
                        field: "MTU",
                        value: m.to_string(),
                        expected: "an MTU in 68..=65535",
                    });
                }
                Some(m) => Some(m as u32),
            };
            Ok(Backend::Vxlan(VxlanBackend {
                vni,
                port,
                direct_routing,
                mtu,
            }))
        }
        "host-gw" => Ok(Backend::HostGw),
        other => Err(NetConfError::UnsupportedBackend(other.to_string())),
    }
}

/// What flanneld's Kubernetes subnet manager keeps on one Node: its lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FlannelNode {
    /// IPv4 `spec.podCIDR(s)`.
    pub pod_cidr_v4: Option<Ipv4Net>,
    /// IPv6 `spec.podCIDRs`.
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// `public-ip-overwrite` when set, else `public-ip`: the underlay address.
    pub public_ip: Option<Ipv4Addr>,
    /// `public-ipv6-overwrite` when set, else `public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `backend-type` (`vxlan`, `host-gw`, ...), as written.
    pub backend_type: Option<String>,
    /// `VtepMAC` of `backend-data`.
    pub vtep_mac: Option<MacAddr>,
    /// `VtepMAC` of `backend-v6-data`.
    pub vtep_mac_v6: Option<MacAddr>,
    /// `kube-subnet-manager: "true"`.
    pub kube_subnet_manager: bool,
}

/// Why a Node's flannel fields cannot be used (the node is left out of the flannel plan).
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum FlannelNodeError {
    #[error("spec.podCIDR(s) entry {0:?} is not a CIDR")]
    BadPodCidr(String),
    #[error("annotation {annotation} {value:?} is not {expected}")]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// `VtepMAC` of a `backend-data` annotation: `null`/empty → none; `{"VtepMAC": "..."}`
/// (flanneld may add `"VNI"`, which is not needed here: the VNI is the config's).
fn vtep_mac(
    annotation: &'static str,
    value: Option<&String>,
) -> Result<Option<MacAddr>, FlannelNodeError> {
    let Some(text) = value.map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let bad = || FlannelNodeError::BadAnnotation {
        annotation,
        value: text.to_string(),
        expected: "null or a JSON object such as {\"VtepMAC\":\"0e:61:06:ff:7a:73\"}",
    };
    match serde_json::from_str::<Value>(text).map_err(|_| bad())? {
        Value::Null => Ok(None),
        Value::Object(object) => match field(&object, "VtepMAC") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(mac)) => mac.parse::<MacAddr>().map(Some).map_err(|_| bad()),
            Some(_) => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn parse_ip<A: std::str::FromStr>(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    overwrite: &'static str,
    expected: &'static str,
) -> Result<Option<A>, FlannelNodeError> {
    let value = annotations
        .get(overwrite)
        .filter(|v| !v.trim().is_empty())
        .map(|v| (overwrite, v))
        .or_else(|| {
            annotations
                .get(key)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (key, v))
        });
    match value {
        None => Ok(None),
        Some((annotation, v)) => {
            v.trim()
                .parse::<A>()
                .map(Some)
                .map_err(|_| FlannelNodeError::BadAnnotation {
                    annotation,
                    value: v.clone(),
                    expected,
                })
        }
    }
}

impl FlannelNode {
    /// Reads a Node's flannel lease. `Ok(None)`: the Node has neither a podCIDR nor a flannel
    /// annotation (nothing flannel-related to say about it).
    pub fn from_node(node: &Node) -> Result<Option<FlannelNode>, FlannelNodeError> {
        let empty = BTreeMap::new();
        let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<&String> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        if let Some(single) = spec.and_then(|s| s.pod_cidr.as_ref()) {
            cidrs.insert(0, single);
        }
        let has_flannel = annotations.keys().any(|k| k.starts_with(ANNOTATION_PREFIX));
        if cidrs.is_empty() && !has_flannel {
            return Ok(None);
        }
        let mut out = FlannelNode::default();
        for cidr in cidrs {
            match cidr.trim().parse::<IpNet>() {
                Ok(IpNet::V4(n)) => {
                    out.pod_cidr_v4.get_or_insert(n.trunc());
                }
                Ok(IpNet::V6(n)) => {
                    out.pod_cidr_v6.get_or_insert(n.trunc());
                }
                Err(_) => return Err(FlannelNodeError::BadPodCidr(cidr.clone())),
            }
        }
        out.public_ip = parse_ip(
            annotations,
            ANNOTATION_PUBLIC_IP,
            ANNOTATION_PUBLIC_IP_OVERWRITE,
            "an IPv4 address",
        )?;
        out.public_ipv6 = parse_ip(
            annotations,
            ANNOTATION_PUBLIC_IPV6,
            ANNOTATION_PUBLIC_IPV6_OVERWRITE,
            "an IPv6 address",
        )?;
        out.backend_type = annotations
            .get(ANNOTATION_BACKEND_TYPE)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        out.vtep_mac = vtep_mac(
            ANNOTATION_BACKEND_DATA,
            annotations.get(ANNOTATION_BACKEND_DATA),
        )?;
        out.vtep_mac_v6 = vtep_mac(
            ANNOTATION_BACKEND_V6_DATA,
            annotations.get(ANNOTATION_BACKEND_V6_DATA),
        )?;
        out.kube_subnet_manager = annotations
            .get(ANNOTATION_KUBE_SUBNET_MANAGER)
            .is_some_and(|v| v.trim() == "true");
        Ok(Some(out))
    }

    /// The underlay address of the IPv4 (`v4`) or IPv6 family.
    pub fn public_addr(&self, v4: bool) -> Option<IpAddr> {
        if v4 {
            self.public_ip.map(IpAddr::V4)
        } else {
            self.public_ipv6.map(IpAddr::V6)
        }
    }
}

/// The annotations flanneld writes on its own Node, for this node's lease: what the other
/// nodes (flanneld or podroute) read to reach it. `vtep_mac` / `vtep_mac_v6`: the VTEP MACs
/// (VXLAN backend only; `host-gw` writes `null`, as flanneld does).
pub fn own_annotations(
    backend: &Backend,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    vtep_mac: Option<MacAddr>,
    vtep_mac_v6: Option<MacAddr>,
) -> BTreeMap<String, String> {
    let data = |mac: Option<MacAddr>| match (backend, mac) {
        (Backend::Vxlan(v), Some(mac)) => {
            serde_json::json!({ "VNI": v.vni, "VtepMAC": mac.to_string() }).to_string()
        }
        _ => "null".to_string(),
    };
    let mut out = BTreeMap::new();
    out.insert(
        ANNOTATION_BACKEND_TYPE.to_string(),
        backend.type_name().to_string(),
    );
    out.insert(
        ANNOTATION_KUBE_SUBNET_MANAGER.to_string(),
        "true".to_string(),
    );
    if let Some(ip) = public_ip {
        out.insert(ANNOTATION_PUBLIC_IP.to_string(), ip.to_string());
        out.insert(ANNOTATION_BACKEND_DATA.to_string(), data(vtep_mac));
    }
    if let Some(ip) = public_ipv6 {
        out.insert(ANNOTATION_PUBLIC_IPV6.to_string(), ip.to_string());
        out.insert(ANNOTATION_BACKEND_V6_DATA.to_string(), data(vtep_mac_v6));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config of flannel's own manifest (`kube-flannel.yml`), as in seed 000's cluster.
    const KUBE_FLANNEL_YML: &str = r#"{
      "Network": "10.244.0.0/16",
      "Backend": {
        "Type": "vxlan"
      }
    }"#;

    #[test]
    fn flannel_manifest_config_gets_flannels_defaults() {
        let conf = NetConf::parse(KUBE_FLANNEL_YML).unwrap();
        assert_eq!(conf.network, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(conf.ipv6_network, None);
        assert_eq!(conf.subnet_len, 24);
        assert_eq!(
            conf.backend,
            Backend::Vxlan(VxlanBackend {
                vni: 1,
                port: 8472,
                direct_routing: false,
                mtu: None
            })
        );
    }

    #[test]
    fn all_fields_and_case_insensitive_keys() {
        let conf = NetConf::parse(
            r#"{"network": "10.0.0.0/16", "subnetlen": 26, "EnableIPv6": true,
                "IPv6Network": "fd00:10::/56", "IPv6SubnetLen": 64, "Unknown": [1],
                "Backend": {"type": "VXLAN", "VNI": 4, "Port": 4789, "DirectRouting": true,
                            "MTU": 1400}}"#,
        )
        .unwrap();
        assert_eq!(conf.subnet_len, 26);
        assert_eq!(conf.ipv6_network, Some("fd00:10::/56".parse().unwrap()));
        assert_eq!(
            conf.backend,
            Backend::Vxlan(VxlanBackend {
                vni: 4,
                port: 4789,
                direct_routing: true,
                mtu: Some(1400)
            })
        );
        let host_gw =
            NetConf::parse(r#"{"Network": "10.1.0.0/24", "Backend": {"Type": "host-gw"}}"#)
                .unwrap();
        assert_eq!(host_gw.backend, Backend::HostGw);
        // A /24 network: flannel's default is one bit longer.
        assert_eq!(host_gw.subnet_len, 25);
        let v6_only = NetConf::parse(
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48",
                "Backend": {"Type": "vxlan", "Port": 0}}"#,
        )
        .unwrap();
        assert_eq!(v6_only.network, None);
        assert_eq!(v6_only.ipv6_subnet_len, 64);
        assert!(matches!(v6_only.backend, Backend::Vxlan(ref v) if v.port == 8472));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = |text: &str| NetConf::parse(text).unwrap_err().to_string();
        assert!(err("{").starts_with("net-conf.json is not valid JSON"));
        assert_eq!(err("[]"), "net-conf.json must be a JSON object");
        assert!(err(r#"{"Backend": {"Type": "vxlan"}}"#).contains("Network is missing"));
        assert!(
            err(r#"{"Network": "10.244.0.0/33", "Backend": {"Type": "vxlan"}}"#)
                .contains("Network is \"10.244.0.0/33\", expected an IPv4 CIDR")
        );
        assert!(err(r#"{"Network": "10.244.0.0/16"}"#).contains("\"udp\" is not supported"));
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}"#)
                .contains("\"wireguard\" is not supported")
        );
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "SubnetLen": 16, "Backend": {"Type": "vxlan"}}"#)
                .contains("SubnetLen 16 does not fit Network 10.244.0.0/16")
        );
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}"#)
                .contains("VNI is -1")
        );
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}"#)
                .contains("Port is 70000")
        );
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "EnableIPv6": "yes", "Backend": {}}"#)
                .contains("EnableIPv6 is \"yes\", expected true or false")
        );
        assert!(
            err(r#"{"EnableIPv4": false, "Backend": {"Type": "vxlan"}}"#).contains("both false")
        );
        assert!(
            err(
                r#"{"EnableIPv6": true, "Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#
            )
            .contains("IPv6Network is missing")
        );
    }

    fn node(pod_cidr: Option<&str>, annotations: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("node1".into());
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: pod_cidr.map(Into::into),
            ..Default::default()
        });
        n
    }

    #[test]
    fn reads_the_lease_flanneld_writes() {
        // Seed 000's node1, annotated as flanneld annotates it.
        let n = node(
            Some("10.244.1.0/24"),
            &[
                (
                    ANNOTATION_BACKEND_DATA,
                    r#"{"VNI":1,"VtepMAC":"0e:61:06:ff:7a:73"}"#,
                ),
                (ANNOTATION_BACKEND_TYPE, "vxlan"),
                (ANNOTATION_KUBE_SUBNET_MANAGER, "true"),
                (ANNOTATION_PUBLIC_IP, "192.168.0.22"),
            ],
        );
        let lease = FlannelNode::from_node(&n).unwrap().unwrap();
        assert_eq!(lease.pod_cidr_v4, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(lease.public_ip, Some("192.168.0.22".parse().unwrap()));
        assert_eq!(
            lease.vtep_mac.map(|m| m.to_string()).as_deref(),
            Some("0e:61:06:ff:7a:73")
        );
        assert_eq!(lease.backend_type.as_deref(), Some("vxlan"));
        assert!(lease.kube_subnet_manager);
        assert_eq!(lease.vtep_mac_v6, None);
    }

    #[test]
    fn overwrite_dual_stack_and_absent() {
        let mut n = node(
            None,
            &[
                (ANNOTATION_PUBLIC_IP, "192.168.0.22"),
                (ANNOTATION_PUBLIC_IP_OVERWRITE, "203.0.113.9"),
                (ANNOTATION_PUBLIC_IPV6, "fd00::22"),
                (ANNOTATION_BACKEND_DATA, "null"),
                (
                    ANNOTATION_BACKEND_V6_DATA,
                    r#"{"VtepMAC":"fa:16:3e:d5:28:07"}"#,
                ),
            ],
        );
        n.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.42.20.0/24".into(), "fd00:42:20::/64".into()]);
        let lease = FlannelNode::from_node(&n).unwrap().unwrap();
        assert_eq!(lease.public_ip, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(lease.public_ipv6, Some("fd00::22".parse().unwrap()));
        assert_eq!(lease.pod_cidr_v6, Some("fd00:42:20::/64".parse().unwrap()));
        assert_eq!(lease.vtep_mac, None);
        assert!(lease.vtep_mac_v6.is_some());
        assert!(!lease.kube_subnet_manager);
        assert_eq!(FlannelNode::from_node(&node(None, &[])), Ok(None));
    }

    #[test]
    fn bad_leases_are_rejected_with_the_field() {
        let bad = |pod: Option<&str>, a: &[(&str, &str)]| {
            FlannelNode::from_node(&node(pod, a))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad(Some("10.244.1.0/33"), &[]),
            "spec.podCIDR(s) entry \"10.244.1.0/33\" is not a CIDR"
        );
        assert!(bad(None, &[(ANNOTATION_PUBLIC_IP, "node1")]).contains("is not an IPv4 address"));
        assert!(
            bad(None, &[(ANNOTATION_BACKEND_DATA, r#"{"VtepMAC":"zz"}"#)]).contains("backend-data")
        );
        assert!(bad(None, &[(ANNOTATION_BACKEND_DATA, "{not json")]).contains("backend-data"));
        assert!(bad(None, &[(ANNOTATION_BACKEND_DATA, "[1]")]).contains("backend-data"));
    }

    proptest::proptest! {
        /// Whatever the ConfigMap or a Node holds, parsing answers (a config, a lease or a
        /// reason) and never panics.
        #[test]
        fn arbitrary_input_never_panics(
            text in ".{0,80}",
            network in "[0-9a-f:./]{0,24}",
            len in proptest::num::i64::ANY,
            vni in proptest::num::i64::ANY,
            kind in "(vxlan|host-gw|udp|)",
        ) {
            let _ = NetConf::parse(&text);
            let json = serde_json::json!({
                "Network": network, "SubnetLen": len, "IPv6Network": network,
                "EnableIPv6": len % 2 == 0, "Backend": {"Type": kind, "VNI": vni, "Port": len},
            });
            let _ = NetConf::parse(&json.to_string());
            let n = node(
                Some(&network),
                &[
                    (ANNOTATION_BACKEND_DATA, &text),
                    (ANNOTATION_PUBLIC_IP, &network),
                    (ANNOTATION_PUBLIC_IPV6_OVERWRITE, &text),
                ],
            );
            let _ = FlannelNode::from_node(&n);
        }
    }

    #[test]
    fn own_annotations_are_flanneld_s() {
        let mac: MacAddr = "fe:be:87:93:06:e2".parse().unwrap();
        let conf = NetConf::parse(KUBE_FLANNEL_YML).unwrap();
        let a = own_annotations(
            &conf.backend,
            Some("192.168.0.39".parse().unwrap()),
            None,
            Some(mac),
            None,
        );
        assert_eq!(a[ANNOTATION_PUBLIC_IP], "192.168.0.39");
        assert_eq!(a[ANNOTATION_BACKEND_TYPE], "vxlan");
        assert_eq!(a[ANNOTATION_KUBE_SUBNET_MANAGER], "true");
        assert_eq!(
            a[ANNOTATION_BACKEND_DATA],
            r#"{"VNI":1,"VtepMAC":"fe:be:87:93:06:e2"}"#
        );
        assert!(!a.contains_key(ANNOTATION_PUBLIC_IPV6));
        // What podroute writes, another node reads back as the same lease.
        let mut n = node(Some("10.244.0.0/24"), &[]);
        n.metadata.annotations = Some(a);
        let lease = FlannelNode::from_node(&n).unwrap().unwrap();
        assert_eq!(lease.vtep_mac, Some(mac));
        assert_eq!(lease.public_ip, Some("192.168.0.39".parse().unwrap()));
        let hg = own_annotations(
            &Backend::HostGw,
            Some("192.168.0.39".parse().unwrap()),
            None,
            Some(mac),
            None,
        );
        assert_eq!(hg[ANNOTATION_BACKEND_DATA], "null");
        assert_eq!(hg[ANNOTATION_BACKEND_TYPE], "host-gw");
    }
}
