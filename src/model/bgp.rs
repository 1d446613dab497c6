//! BGP peers and the cluster-wide BGP configuration.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::cidr::parse_masked_cidr;
use super::crd::{BGPConfiguration, BGPPeer, SecretKeyRef, ServiceCidr};
use super::error::{Kind, Reason, Rejection};
use podroute_bgp::policy::Community;

/// Default cluster AS number when no `BGPConfiguration` sets one.
pub const DEFAULT_AS_NUMBER: u32 = 64512;
/// Default BGP port.
pub const DEFAULT_LISTEN_PORT: u16 = 179;
/// Name of the cluster-wide `BGPConfiguration`.
pub const DEFAULT_BGP_CONFIGURATION: &str = "default";

/// A validated `BGPPeer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    pub name: String,
    /// `peerIP`; `None` when the peer is chosen by `peer_selector`.
    pub peer_ip: Option<IpAddr>,
    /// Port given in `peerIP` (`ip:port`), if any.
    pub port: Option<u16>,
    pub as_number: Option<u32>,
    /// Only this node peers (`node`); `None` with no `node_selector` = every node.
    pub node: Option<String>,
    /// Calico selector text, not evaluated here.
    pub node_selector: Option<String>,
    /// Calico selector text, not evaluated here.
    pub peer_selector: Option<String>,
    pub password: Option<SecretKeyRef>,
    /// Graceful-restart time; `None` = BIRD's default of 120 s.
    pub max_restart_time: Option<Duration>,
    /// `nextHopMode`, or `Keep` from the older `keepOriginalNextHop: true`.
    pub next_hop_mode: NextHopMode,
    /// `keepaliveTime`.
    pub keepalive_time: Option<Duration>,
    /// `ttlSecurity`: the peer is at most this many hops away (GTSM, RFC 5082).
    pub ttl_security: Option<u8>,
    /// `sourceAddress: None`: let the kernel choose the source address.
    pub source_address_none: bool,
    /// `localASNumber`: our AS on this session.
    pub local_as_number: Option<u32>,
    /// `numAllowedLocalASNumbers`: our AS may appear this many times in a received AS_PATH.
    pub num_allowed_local_as: u8,
    /// `filters`: BGPFilter names, in order.
    pub filters: Vec<String>,
    /// `reachableBy` (not honoured; reported).
    pub reachable_by: Option<String>,
}

/// What next hop to announce to a peer (Calico's `nextHopMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NextHopMode {
    /// Calico's default: ourselves towards eBGP peers, unchanged towards iBGP peers (route
    /// reflection keeps the originator's next hop).
    #[default]
    Auto,
    /// Always ourselves (`next hop self`).
    SelfHop,
    /// Never change it (`next hop keep`, the third-party next hop of RFC 4271 §5.1.3).
    Keep,
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value.as_ref().filter(|s| !s.trim().is_empty()).cloned()
}

fn as_number(value: i64) -> Result<u32, Reason> {
    match u32::try_from(value) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Reason::AsNumberOutOfRange { value }),
    }
}

/// Parses `ip`, `ipv4:port` or `[ipv6]:port`.
pub fn parse_peer_ip(value: &str) -> Result<(IpAddr, Option<u16>), Reason> {
    let text = value.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Ok((sock.ip(), Some(sock.port())));
    }
    Err(Reason::BadPeerIp {
        value: value.to_string(),
    })
}

/// Parses a Go duration (`120s`, `2m30s`, `1.5h`, `500ms`).
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

impl Peer {
    /// Validates one `BGPPeer`.
    pub fn from_resource(obj: &BGPPeer) -> Result<Peer, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::BGPPeer, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let peer_selector = non_empty(&spec.peer_selector);
        let node = non_empty(&spec.node);
        let node_selector = non_empty(&spec.node_selector);
        let (peer_ip, port) = match non_empty(&spec.peer_ip) {
            Some(text) => {
                if peer_selector.is_some() {
                    return Err(reject(Reason::PeerIpAndSelector));
                }
                let (ip, port) = parse_peer_ip(&text).map_err(reject)?;
                (Some(ip), port)
            }
            None if peer_selector.is_none() => return Err(reject(Reason::NoPeerTarget)),
            None => (None, None),
        };
        if node.is_some() && node_selector.is_some() {
            return Err(reject(Reason::NodeAndNodeSelector));
        }
        let as_number = spec.as_number.map(as_number).transpose().map_err(reject)?;
        let max_restart_time = match non_empty(&spec.max_restart_time) {
            None => None,
            Some(text) => Some(parse_go_duration(&text).ok_or_else(|| {
                reject(Reason::BadDuration {
                    field: "maxRestartTime",
                    value: text.clone(),
                })
            })?),
        };
        let next_hop_mode = match non_empty(&spec.next_hop_mode).as_deref() {
            None | Some("Auto") if spec.keep_original_next_hop == Some(true) => NextHopMode::Keep,
            None | Some("Auto") => NextHopMode::Auto,
            Some("Self") => NextHopMode::SelfHop,
            Some("Keep") => NextHopMode::Keep,
            Some(other) => {
                return Err(reject(Reason::BadEnum {
                    field: "nextHopMode",
                    value: other.to_string(),
                    expected: "Auto, Self, Keep",
                }));
            }
        };
        let keepalive_time = match non_empty(&spec.keepalive_time) {
            None => None,
            Some(text) => Some(parse_go_duration(&text).ok_or_else(|| {
                reject(Reason::BadDuration {
                    field: "keepaliveTime",
                    value: text.clone(),
                })
            })?),
        };
        let ttl_security = match spec.ttl_security {
            None | Some(0) => None,
            Some(n) => Some(u8::try_from(n).ok().filter(|h| *h <= 254).ok_or_else(|| {
                reject(Reason::BadEnum {
                    field: "ttlSecurity",
                    value: n.to_string(),
                    expected: "a hop count 0..=254",
                })
            })?),
        };
        let source_address_none = match non_empty(&spec.source_address).as_deref() {
            None | Some("UseNodeIP") => false,
            Some("None") => true,
            Some(other) => {
                return Err(reject(Reason::BadEnum {
                    field: "sourceAddress",
                    value: other.to_string(),
                    expected: "UseNodeIP, None",
                }));
            }
        };
        let local_as_number = spec
            .local_as_number
            .map(self::as_number)
            .transpose()
            .map_err(reject)?;
        let num_allowed_local_as = match spec.num_allowed_local_as_numbers {
            None => 0,
            Some(n) => u8::try_from(n).ok().filter(|n| *n <= 10).ok_or_else(|| {
                reject(Reason::BadEnum {
                    field: "numAllowedLocalASNumbers",
                    value: n.to_string(),
                    expected: "0..=10",
                })
            })?,
        };
        Ok(Peer {
            next_hop_mode,
            keepalive_time,
            ttl_security,
            source_address_none,
            local_as_number,
            num_allowed_local_as,
            filters: spec
                .filters
                .iter()
                .flatten()
                .map(|f| f.trim().to_string())
                .filter(|f| !f.is_empty())
                .collect(),
            reachable_by: non_empty(&spec.reachable_by).filter(|r| r != "Auto"),
            name: name.to_string(),
            peer_ip,
            port,
            as_number,
            node,
            node_selector,
            peer_selector,
            password: spec
                .password
                .as_ref()
                .and_then(|p| p.secret_key_ref.clone()),
            max_restart_time,
        })
    }
}

/// A validated `BGPConfiguration`, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BgpConfig {
    pub as_number: u32,
    pub node_to_node_mesh: bool,
    pub listen_port: u16,
    pub log_severity_screen: Option<String>,
    /// `nodeMeshMaxRestartTime`: graceful-restart time of mesh sessions; `None` = 120 s.
    pub node_mesh_max_restart_time: Option<Duration>,
    /// `nodeMeshPassword`: TCP-MD5 password of the mesh sessions.
    pub node_mesh_password: Option<SecretKeyRef>,
    pub service_cluster_ips: Vec<IpNet>,
    pub service_external_ips: Vec<IpNet>,
    pub service_load_balancer_ips: Vec<IpNet>,
    /// `prefixAdvertisements`, names resolved: communities attached to exported routes
    /// inside each CIDR.
    pub prefix_advertisements: Vec<(IpNet, Vec<Community>)>,
}

/// Parses a community as Calico writes it: `aa:nn` (standard, 16-bit halves) or `aa:nn:mm`
/// (large, 32-bit parts).
pub fn parse_community(text: &str) -> Option<Community> {
    let parts: Vec<&str> = text.trim().split(':').collect();
    match parts.as_slice() {
        [a, b] => {
            let a: u16 = a.parse().ok()?;
            let b: u16 = b.parse().ok()?;
            Some(Community::Standard((u32::from(a) << 16) | u32::from(b)))
        }
        [a, b, c] => Some(Community::Large(
            a.parse().ok()?,
            b.parse().ok()?,
            c.parse().ok()?,
        )),
        _ => None,
    }
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            as_number: DEFAULT_AS_NUMBER,
            node_to_node_mesh: true,
            listen_port: DEFAULT_LISTEN_PORT,
            log_severity_screen: None,
            node_mesh_max_restart_time: None,
            node_mesh_password: None,
            service_cluster_ips: Vec::new(),
            service_external_ips: Vec::new(),
            service_load_balancer_ips: Vec::new(),
            prefix_advertisements: Vec::new(),
        }
    }
}

impl BgpConfig {
    /// Validates one `BGPConfiguration`.
    pub fn from_resource(obj: &BGPConfiguration) -> Result<BgpConfig, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::BGPConfiguration, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let as_number = spec
            .as_number
            .map(as_number)
            .transpose()
            .map_err(reject)?
            .unwrap_or(DEFAULT_AS_NUMBER);
        let listen_port = match spec.listen_port {
            None => DEFAULT_LISTEN_PORT,
            Some(value) => match u16::try_from(value) {
                Ok(port) if port > 0 => port,
                _ => return Err(reject(Reason::ListenPortOutOfRange { value })),
            },
        };
        let cidrs = |list: &Option<Vec<ServiceCidr>>| -> Result<Vec<IpNet>, Rejection> {
            list.iter()
                .flatten()
                .map(|c| parse_masked_cidr(&c.cidr).map_err(reject))
                .collect()
        };
        let node_mesh_max_restart_time = match non_empty(&spec.node_mesh_max_restart_time) {
            None => None,
            Some(text) => Some(parse_go_duration(&text).ok_or_else(|| {
                reject(Reason::BadDuration {
                    field: "nodeMeshMaxRestartTime",
                    value: text.clone(),
                })
            })?),
        };
        let named: Vec<(String, String)> = spec
            .communities
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.value.clone()))
            .collect();
        let mut prefix_advertisements = Vec::new();
        for adv in spec.prefix_advertisements.iter().flatten() {
            let cidr = parse_masked_cidr(&adv.cidr).map_err(reject)?;
            let mut communities = Vec::new();
            for c in &adv.communities {
                let value = named
                    .iter()
                    .find(|(n, _)| n == c)
                    .map_or(c.as_str(), |(_, v)| v.as_str());
                communities.push(parse_community(value).ok_or_else(|| {
                    reject(Reason::BadCommunity {
                        value: value.to_string(),
                    })
                })?);
            }
            prefix_advertisements.push((cidr, communities));
        }
        Ok(BgpConfig {
            node_mesh_password: spec
                .node_mesh_password
                .as_ref()
                .and_then(|p| p.secret_key_ref.clone()),
            prefix_advertisements,
            node_mesh_max_restart_time,
            as_number,
            node_to_node_mesh: spec.node_to_node_mesh_enabled.unwrap_or(true),
            listen_port,
            log_severity_screen: non_empty(&spec.log_severity_screen),
            service_cluster_ips: cidrs(&spec.service_cluster_ips)?,
            service_external_ips: cidrs(&spec.service_external_ips)?,
            service_load_balancer_ips: cidrs(&spec.service_load_balancer_ips)?,
        })
    }
}
