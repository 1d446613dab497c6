//! Which BGP sessions this node should have: the node-to-node mesh and the `BGPPeer`s that
//! apply to it, computed from one [`ClusterState`] (a pure function).
//!
//! The rules follow Calico's BIRD configuration (confd templates):
//! - **Mesh** (`nodeToNodeMeshEnabled`, default true): one iBGP-or-eBGP session to every other
//!   node, using its `ASNumber` annotation or the cluster's AS — as Calico runs `bird` and
//!   `bird6`, one session between the nodes' IPv4 addresses carrying IPv4 unicast only, and
//!   one between their IPv6 addresses (`projectcalico.org/IPv6Address`) carrying IPv6
//!   unicast only. With [`LocalIdentity::multiprotocol`] (every node is podroute) the IPv4
//!   session carries both families instead and the IPv6 mesh is only for nodes without IPv4.
//!   Route reflector nodes (`RouteReflectorClusterID` set) are left out of the mesh, and a
//!   route reflector does not mesh. The mesh is made one-directional exactly as Calico does:
//!   this node is passive towards a peer whose address is larger *as a string* than its own
//!   (`"10.0.0.5" > "10.0.0.10"`, and likewise for IPv6 text), so a mixed Calico/podroute
//!   cluster agrees on who connects.
//! - The IPv6 next hop announced is the node's global IPv6 address, never a link-local one
//!   (Calico #10321): a link-local node address gets no IPv6 session and a warning.
//! - **BGPPeer**: applies to this node when `node` names it, when `nodeSelector` matches its
//!   labels, or when neither is set (global). `peerIP` (`ip` or `ip:port`) gives one peer;
//!   `peerSelector` instead peers with every node it selects, at their addresses and AS
//!   numbers (IPv4 and IPv6, one session each, as bird and bird6 do). Remote AS: `asNumber`,
//!   else the selected node's AS, else the cluster's.
//!   An explicit BGPPeer for an address the mesh also covers replaces the mesh session.
//! - A route reflector (this node has a cluster ID) treats every peer node without the same
//!   cluster ID as a route-reflector client.
//!
//! Each session also says how likely the peer is to answer ([`connect_priority`]): the
//! speaker connects to likely peers first, and the agent configures them first
//! ([`in_connect_order`]), so that in a mesh with thousands of unreachable nodes the live ones
//! are not queued behind a pass of connect timeouts.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::sync::Arc;

use podroute_bgp::policy::PrefixFilter;
use podroute_bgp::wire::Family;
use podroute_bgp::{ConnectPriority, PeerConfig};

use super::selector::Selector;
use crate::datastore::secrets::Passwords;
use crate::model::bgp::NextHopMode;
use crate::model::crd::SecretKeyRef;
use crate::model::{NodeInfo, Peer};
use crate::state::ClusterState;

/// Where a session comes from; `calicoctl node status` wording in [`PeerType::display`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerType {
    Mesh,
    Global,
    Node,
}

impl PeerType {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            PeerType::Mesh => "mesh",
            PeerType::Global => "global",
            PeerType::Node => "node",
        }
    }

    /// As `calicoctl node status` prints it.
    pub fn display(self) -> &'static str {
        match self {
            PeerType::Mesh => "node-to-node mesh",
            PeerType::Global => "global",
            PeerType::Node => "node specific",
        }
    }

    pub fn from_label(label: &str) -> Option<PeerType> {
        match label {
            "mesh" => Some(PeerType::Mesh),
            "global" => Some(PeerType::Global),
            "node" => Some(PeerType::Node),
            _ => None,
        }
    }
}

/// This node's BGP identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    pub name: String,
    /// `None` on an IPv6-only node.
    pub ipv4: Option<Ipv4Addr>,
    /// `None` on an IPv4-only node.
    pub ipv6: Option<Ipv6Addr>,
    pub as_number: u32,
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    /// One session per peer carries both families (`--bgp-multiprotocol-sessions`), for
    /// clusters where every node is podroute; Calico's bird/bird6 need one session per family.
    pub multiprotocol: bool,
}

impl LocalIdentity {
    /// This node's IPv6 address if it can be an IPv6 next hop (global, not link-local).
    fn ipv6_next_hop(&self) -> Option<Ipv6Addr> {
        self.ipv6.filter(|a| !a.is_unicast_link_local())
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.ipv4 == Some(a),
            IpAddr::V6(a) => self.ipv6 == Some(a),
        }
    }
}

/// One session this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub config: PeerConfig,
    pub peer_type: PeerType,
    /// The peer node's name (mesh, peerSelector) or the BGPPeer's name.
    pub name: String,
}

/// The sessions, plus what could not be honoured (logged and shown in status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub peers: BTreeMap<IpAddr, DesiredPeer>,
    pub warnings: Vec<String>,
}

/// The AS number of this node: `--as`, else its annotation, else the cluster's.
pub fn local_as(state: &ClusterState, flag: Option<u32>) -> u32 {
    flag.or_else(|| state.local().and_then(|n| n.as_number))
        .unwrap_or(state.bgp.as_number)
}

fn node_as(state: &ClusterState, node: &NodeInfo) -> u32 {
    node.as_number.unwrap_or(state.bgp.as_number)
}

/// A session to `addr` from this node's address of the same family. An IPv4 session
/// carries IPv4 unicast (plus IPv6 unicast with [`LocalIdentity::multiprotocol`] when this
/// node has a global IPv6 address); an IPv6 session carries IPv6 unicast only.
fn base_config(local: &LocalIdentity, addr: IpAddr, remote_as: u32, kind: PeerType) -> PeerConfig {
    let mut cfg = PeerConfig::new(addr, remote_as);
    cfg.kind = kind.label().to_string();
    match addr {
        IpAddr::V4(_) => {
            cfg.local_addr = local.ipv4.map(IpAddr::V4);
            cfg.families = vec![Family::IPV4_UNICAST];
            cfg.local_v4_next_hop = local.ipv4;
            if local.multiprotocol
                && let Some(v6) = local.ipv6_next_hop()
            {
                cfg.families.push(Family::IPV6_UNICAST);
                cfg.local_v6_next_hop = Some(v6);
            }
        }
        IpAddr::V6(_) => {
            cfg.local_addr = local.ipv6.map(IpAddr::V6);
            cfg.families = vec![Family::IPV6_UNICAST];
            cfg.local_v6_next_hop = local.ipv6_next_hop();
        }
    }
    cfg
}

/// The addresses to open sessions to on `node` (mesh, peerSelector): its IPv4 address when
/// this node has one, its IPv6 address when this node has a usable one — except with
/// multiprotocol sessions, where IPv6 rides the IPv4 session when both have IPv4.
fn session_addrs(local: &LocalIdentity, node: &NodeInfo) -> Vec<IpAddr> {
    let v4 = node.ipv4_addr().filter(|_| local.ipv4.is_some());
    let v6 = node
        .ipv6
        .map(|n| n.addr())
        .filter(|_| local.ipv6_next_hop().is_some())
        .filter(|_| !(local.multiprotocol && v4.is_some()));
    v4.map(IpAddr::V4)
        .into_iter()
        .chain(v6.map(IpAddr::V6))
        .collect()
}

/// Whether this node waits for `peer` to connect (mesh): the larger address as a string is
/// passive, as Calico's templates decide it.
fn mesh_passive(local: &LocalIdentity, peer: IpAddr) -> bool {
    let own = match peer {
        IpAddr::V4(_) => local.ipv4.map(|a| a.to_string()),
        IpAddr::V6(_) => local.ipv6.map(|a| a.to_string()),
    };
    own.is_some_and(|own| peer.to_string() > own)
}

fn is_rr_client(local: &LocalIdentity, peer: Option<&NodeInfo>) -> bool {
    match (local.route_reflector_cluster_id, peer) {
        (Some(cid), Some(node)) => node.route_reflector_cluster_id != Some(cid),
        _ => false,
    }
}

/// Whether `peer` (a BGPPeer) applies to this node, or why it cannot be evaluated.
fn applies_to(peer: &Peer, local: &LocalIdentity) -> Result<bool, String> {
    if let Some(node) = &peer.node {
        return Ok(node == &local.name);
    }
    match &peer.node_selector {
        None => Ok(true),
        Some(text) => Selector::parse(text)
            .map(|s| s.matches(&local.labels))
            .map_err(|e| format!("BGPPeer {}: nodeSelector: {e}", peer.name)),
    }
}

/// The TCP-MD5 key a `secretKeyRef` names, or why there is none usable.
fn password_for(r: &SecretKeyRef, passwords: &Passwords) -> Result<Arc<[u8]>, String> {
    match passwords.get(&(r.name.clone(), r.key.clone())) {
        Some(Ok(key)) if key.len() <= podroute_bgp::sockopt::MD5_MAX_KEY_LEN => Ok(key.clone()),
        Some(Ok(key)) => Err(format!(
            "password {}/{} has {} bytes, TCP-MD5 allows at most {}",
            r.name,
            r.key,
            key.len(),
            podroute_bgp::sockopt::MD5_MAX_KEY_LEN
        )),
        Some(Err(e)) => Err(format!("password: {e}")),
        None => Err(format!("password {}/{} not read yet", r.name, r.key)),
    }
}

/// The per-peer settings of a `BGPPeer` that shape its session and what it is sent: BGPFilter
/// rules, next-hop mode, keepalive, local AS, allowas-in and source address. What cannot be
/// honoured is added to `warnings` (shown in `podroute status` and logged once).
fn apply_session_settings(
    state: &ClusterState,
    peer: &Peer,
    cfg: &mut PeerConfig,
    warnings: &mut Vec<String>,
) {
    if !peer.filters.is_empty() {
        let mut import = PrefixFilter::default();
        let mut export = PrefixFilter::default();
        for name in &peer.filters {
            match state.filters.get(name) {
                Some(f) => {
                    import.v4.extend(f.import.v4.iter().cloned());
                    import.v6.extend(f.import.v6.iter().cloned());
                    export.v4.extend(f.export.v4.iter().cloned());
                    export.v6.extend(f.export.v6.iter().cloned());
                    for line in &f.not_honoured {
                        warnings.push(format!("BGPPeer {}: BGPFilter {name}: {line}", peer.name));
                    }
                }
                None => warnings.push(format!(
                    "BGPPeer {}: BGPFilter {name:?} does not exist (or is invalid); its rules \
                     are not applied",
                    peer.name
                )),
            }
        }
        cfg.import_filter = (!import.is_empty()).then(|| Arc::new(import));
        cfg.export_filter = (!export.is_empty()).then(|| Arc::new(export));
    }
    match peer.next_hop_mode {
        NextHopMode::Auto => {}
        NextHopMode::SelfHop => cfg.next_hop_self = true,
        NextHopMode::Keep => cfg.next_hop_keep = true,
    }
    cfg.keepalive_time = peer.keepalive_time;
    cfg.local_as = peer.local_as_number;
    cfg.allow_own_as = peer.num_allowed_local_as;
    if peer.source_address_none {
        // The kernel picks the source; the next hop we announce stays the node's address.
        cfg.local_addr = None;
    }
    if let Some(hops) = peer.ttl_security {
        cfg.ttl_security = Some(hops);
    }
    if let Some(r) = &peer.reachable_by {
        warnings.push(format!(
            "BGPPeer {}: reachableBy {r:?} is not honoured (podroute adds no route to the peer; \
             the kernel's table must reach it)",
            peer.name
        ));
    }
}

/// How likely a peer is to answer: a node whose kubelet reports Ready, or a router that is
/// not a node of the cluster (a ToR or route reflector configured by a BGPPeer), first; a node
/// reported not Ready (or Unknown: its kubelet went silent) last; a node without a Ready
/// condition (a YAML datastore without status) in between.
pub fn connect_priority(node: Option<&NodeInfo>) -> ConnectPriority {
    match node.map(|n| n.ready) {
        None | Some(Some(true)) => ConnectPriority::High,
        Some(None) => ConnectPriority::Normal,
        Some(Some(false)) => ConnectPriority::Low,
    }
}

/// The sessions in the order to configure them: likely to answer first (see
/// [`connect_priority`]), by address within a priority.
pub fn in_connect_order(peers: BTreeMap<IpAddr, DesiredPeer>) -> Vec<(IpAddr, DesiredPeer)> {
    let mut order: Vec<(IpAddr, DesiredPeer)> = peers.into_iter().collect();
    // Stable: the map's address order stays within a priority.
    order.sort_by_key(|(_, p)| p.config.connect_priority);
    order
}

/// The sessions this node should have, without BGP passwords (a peer that needs one is left
/// out: see [`desired_peers_with`]).
pub fn desired_peers(state: &ClusterState, local: &LocalIdentity) -> PeerSet {
    desired_peers_with(state, local, &Passwords::new())
}

/// The sessions this node should have; `passwords` holds the `secretKeyRef`s' values. A
/// BGPPeer whose password cannot be read is not peered with (never without the key it asks
/// for) and says why in the warnings.
pub fn desired_peers_with(
    state: &ClusterState,
    local: &LocalIdentity,
    passwords: &Passwords,
) -> PeerSet {
    let mut set = PeerSet::default();
    if local.ipv6.is_some_and(|a| a.is_unicast_link_local()) {
        set.warnings.push(format!(
            "this node's IPv6 address {} is link-local; it cannot be a next hop, so there are \
             no IPv6 sessions (give the node a global IPv6 address)",
            local.ipv6.map(|a| a.to_string()).unwrap_or_default()
        ));
    }

    if state.bgp.node_to_node_mesh && local.route_reflector_cluster_id.is_none() {
        for node in state.nodes.values() {
            if node.name == local.name || node.route_reflector_cluster_id.is_some() {
                continue;
            }
            for ip in session_addrs(local, node) {
                if local.is_own(ip) {
                    set.warnings.push(format!(
                        "node {} has this node's address {ip}; not peering with it",
                        node.name
                    ));
                    continue;
                }
                let mut cfg = base_config(local, ip, node_as(state, node), PeerType::Mesh);
                cfg.passive = mesh_passive(local, ip);
                cfg.connect_priority = connect_priority(Some(node));
                // Every node listens on the cluster's listenPort.
                cfg.port = state.bgp.listen_port;
                cfg.max_restart_time = state.bgp.node_mesh_max_restart_time;
                if let Some(r) = &state.bgp.node_mesh_password {
                    match password_for(r, passwords) {
                        Ok(key) => cfg.password = Some(key),
                        Err(why) => {
                            set.warnings.push(format!(
                                "BGPConfiguration nodeMeshPassword: {why}; not meshing with {ip}"
                            ));
                            continue;
                        }
                    }
                }
                set.peers.insert(
                    cfg.addr,
                    DesiredPeer {
                        config: cfg,
                        peer_type: PeerType::Mesh,
                        name: node.name.clone(),
                    },
                );
            }
        }
    }

    for peer in state.peers.values() {
        match applies_to(peer, local) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(warning) => {
                set.warnings.push(warning);
                continue;
            }
        }
        let peer_type = if peer.node.is_some() {
            PeerType::Node
        } else {
            PeerType::Global
        };
        let mut targets: Vec<(IpAddr, String, Option<&NodeInfo>)> = Vec::new();
        if let Some(ip) = peer.peer_ip {
            let node = state.nodes.values().find(|n| match ip {
                IpAddr::V4(a) => n.ipv4_addr() == Some(a),
                IpAddr::V6(a) => n.ipv6.map(|n| n.addr()) == Some(a),
            });
            targets.push((ip, peer.name.clone(), node));
        } else if let Some(text) = &peer.peer_selector {
            match Selector::parse(text) {
                Ok(sel) => {
                    for node in state.nodes.values().filter(|n| sel.matches(&n.labels)) {
                        for ip in session_addrs(local, node) {
                            targets.push((ip, node.name.clone(), Some(node)));
                        }
                    }
                }
                Err(e) => {
                    set.warnings
                        .push(format!("BGPPeer {}: peerSelector: {e}", peer.name));
                    continue;
                }
            }
        }
        for (ip, name, node) in targets {
            if local.is_own(ip) || node.is_some_and(|n| n.name == local.name) {
                continue;
            }
            if ip.is_ipv6() && local.ipv6_next_hop().is_none() {
                set.warnings.push(format!(
                    "BGPPeer {}: peer {ip} is IPv6 but this node has no global IPv6 address",
                    peer.name
                ));
                continue;
            }
            if ip.is_ipv4() && local.ipv4.is_none() {
                set.warnings.push(format!(
                    "BGPPeer {}: peer {ip} is IPv4 but this node has no IPv4 address",
                    peer.name
                ));
                continue;
            }
            let remote_as = peer
                .as_number
                .or_else(|| node.map(|n| node_as(state, n)))
                .unwrap_or(state.bgp.as_number);
            let mut cfg = base_config(local, ip, remote_as, peer_type);
            cfg.connect_priority = connect_priority(node);
            cfg.port = peer.port.unwrap_or(state.bgp.listen_port);
            cfg.rr_client = is_rr_client(local, node);
            cfg.max_restart_time = peer.max_restart_time;
            apply_session_settings(state, peer, &mut cfg, &mut set.warnings);
            if let Some(r) = &peer.password {
                match password_for(r, passwords) {
                    Ok(key) => cfg.password = Some(key),
                    Err(why) => {
                        set.warnings.push(format!(
                            "BGPPeer {}: {why}; not peering with {ip} until it can be read",
                            peer.name
                        ));
                        continue;
                    }
                }
            }
            // An explicit peer wins over the mesh; between two BGPPeers the first by name.
            let replace = set
                .peers
                .get(&ip)
                .is_none_or(|existing| existing.peer_type == PeerType::Mesh);
            if replace {
                set.peers.insert(
                    ip,
                    DesiredPeer {
                        config: cfg,
                        peer_type,
                        name: if node.is_some() && peer.peer_ip.is_none() {
                            name
                        } else {
                            peer.name.clone()
                        },
                    },
                );
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BgpConfig;

    fn node(name: &str, ip: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ipv4: Some(ip.parse().unwrap()),
            ipv4_source: None,
            internal_ipv6: None,
            ipv6: None,
            as_number: None,
            route_reflector_cluster_id: None,
            ipip_tunnel_addr: None,
            vxlan: Default::default(),
            labels: BTreeMap::new(),
            flannel: None,
            ready: None,
        }
    }

    fn state(nodes: Vec<NodeInfo>) -> ClusterState {
        ClusterState {
            local_node: "master01".into(),
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            ..ClusterState::default()
        }
    }

    fn local(state: &ClusterState) -> LocalIdentity {
        let n = state.local().unwrap();
        LocalIdentity {
            name: n.name.clone(),
            ipv4: n.ipv4_addr(),
            ipv6: n.ipv6.map(|n| n.addr()),
            as_number: local_as(state, None),
            route_reflector_cluster_id: n.route_reflector_cluster_id,
            labels: n.labels.clone(),
            multiprotocol: false,
        }
    }

    fn bgp_peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            peer_ip: None,
            port: None,
            as_number: None,
            node: None,
            node_selector: None,
            peer_selector: None,
            password: None,
            max_restart_time: None,
            ..Peer::default()
        }
    }

    #[test]
    fn mesh_with_calico_string_order_for_passive() {
        let s = state(vec![
            node("master01", "10.0.0.10/24"),
            node("node01", "10.0.0.5/24"),
            node("node02", "10.0.0.100/24"),
            node("node03", "10.0.1.2/24"),
        ]);
        let set = desired_peers(&s, &local(&s));
        let passive: Vec<(String, bool)> = set
            .peers
            .values()
            .map(|p| (p.name.clone(), p.config.passive))
            .collect();
        // "10.0.0.5" > "10.0.0.10" as strings: we wait for node01. "10.0.0.100" > "10.0.0.10".
        assert_eq!(
            passive,
            vec![
                ("node01".to_string(), true),
                ("node02".to_string(), true),
                ("node03".to_string(), true),
            ]
        );
        let s2 = ClusterState {
            local_node: "node03".into(),
            ..s.clone()
        };
        let set2 = desired_peers(&s2, &local(&s2));
        assert!(
            set2.peers.values().all(|p| !p.config.passive),
            "node03 has the largest string"
        );
        for p in set.peers.values() {
            assert_eq!(p.peer_type, PeerType::Mesh);
            assert_eq!(p.config.remote_as, 64512);
            assert_eq!(p.config.local_addr, Some("10.0.0.10".parse().unwrap()));
            assert_eq!(p.config.port, 179);
        }
    }

    #[test]
    fn mesh_off_route_reflectors_and_as_numbers() {
        let mut rr = node("rr1", "10.0.0.3/24");
        rr.route_reflector_cluster_id = Some("224.0.0.1".parse().unwrap());
        let mut other = node("node01", "10.0.0.5/24");
        other.as_number = Some(65010);
        let mut s = state(vec![node("master01", "10.0.0.10/24"), rr, other]);
        let set = desired_peers(&s, &local(&s));
        assert_eq!(set.peers.len(), 1, "route reflector left out of the mesh");
        assert_eq!(set.peers.values().next().unwrap().config.remote_as, 65010);

        s.bgp = BgpConfig {
            node_to_node_mesh: false,
            ..BgpConfig::default()
        };
        assert!(desired_peers(&s, &local(&s)).peers.is_empty());
    }

    #[test]
    fn bgp_peers_global_node_selector_and_port() {
        let mut master = node("master01", "10.0.0.10/24");
        master.labels.insert("rack".into(), "r1".into());
        let mut s = state(vec![master, node("node01", "10.0.0.5/24")]);
        s.bgp.node_to_node_mesh = false;
        let mut tor = bgp_peer("tor");
        tor.peer_ip = Some("10.0.0.1".parse().unwrap());
        tor.port = Some(1179);
        tor.as_number = Some(65001);
        let mut other = bgp_peer("other-node");
        other.peer_ip = Some("10.0.0.2".parse().unwrap());
        other.node = Some("node01".into());
        let mut mine = bgp_peer("mine");
        mine.peer_ip = Some("10.0.0.3".parse().unwrap());
        mine.node = Some("master01".into());
        let mut rack = bgp_peer("rack-r1");
        rack.peer_ip = Some("10.0.0.4".parse().unwrap());
        rack.node_selector = Some("rack == 'r1'".into());
        let mut rack2 = bgp_peer("rack-r2");
        rack2.peer_ip = Some("10.0.0.6".parse().unwrap());
        rack2.node_selector = Some("rack == 'r2'".into());
        let mut broken = bgp_peer("broken");
        broken.peer_ip = Some("10.0.0.7".parse().unwrap());
        broken.node_selector = Some("rack ==".into());
        for p in [tor, other, mine, rack, rack2, broken] {
            s.peers.insert(p.name.clone(), p);
        }
        let set = desired_peers(&s, &local(&s));
        let got: Vec<(String, PeerType, u16, u32)> = set
            .peers
            .values()
            .map(|p| {
                (
                    p.name.clone(),
                    p.peer_type,
                    p.config.port,
                    p.config.remote_as,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("tor".to_string(), PeerType::Global, 1179, 65001),
                ("mine".to_string(), PeerType::Node, 179, 64512),
                ("rack-r1".to_string(), PeerType::Global, 179, 64512),
            ]
        );
        assert_eq!(set.warnings.len(), 1);
        assert!(set.warnings[0].contains("broken"), "{:?}", set.warnings);
    }

    #[test]
    fn peer_selector_and_route_reflector_clients() {
        let cid: Ipv4Addr = "224.0.0.1".parse().unwrap();
        let mut master = node("master01", "10.0.0.10/24");
        master.route_reflector_cluster_id = Some(cid);
        master
            .labels
            .insert("route-reflector".into(), "true".into());
        let mut rr2 = node("rr2", "10.0.0.11/24");
        rr2.route_reflector_cluster_id = Some(cid);
        rr2.labels.insert("route-reflector".into(), "true".into());
        let mut client = node("node01", "10.0.0.5/24");
        client.as_number = Some(64600);
        let mut s = state(vec![master, rr2, client]);
        let mut to_all = bgp_peer("peer-with-everyone");
        to_all.peer_selector = Some("all()".into());
        to_all.node_selector = Some("route-reflector == 'true'".into());
        s.peers.insert(to_all.name.clone(), to_all);
        let set = desired_peers(&s, &local(&s));
        let got: Vec<(String, bool, u32)> = set
            .peers
            .values()
            .map(|p| (p.name.clone(), p.config.rr_client, p.config.remote_as))
            .collect();
        assert_eq!(
            got,
            vec![
                ("node01".to_string(), true, 64600),
                ("rr2".to_string(), false, 64512),
            ]
        );
    }

    #[test]
    fn explicit_peer_replaces_the_mesh_session() {
        let mut s = state(vec![
            node("master01", "10.0.0.10/24"),
            node("node01", "10.0.0.5/24"),
        ]);
        let mut p = bgp_peer("explicit");
        p.peer_ip = Some("10.0.0.5".parse().unwrap());
        p.as_number = Some(65099);
        s.peers.insert(p.name.clone(), p);
        let set = desired_peers(&s, &local(&s));
        assert_eq!(set.peers.len(), 1);
        let only = set.peers.values().next().unwrap();
        assert_eq!(
            (only.peer_type, only.config.remote_as),
            (PeerType::Global, 65099)
        );
    }

    #[test]
    fn bgppeer_session_settings_and_filters_reach_the_speaker_config() {
        use crate::model::Filter;
        use crate::model::crd::{BGPFilter, BGPFilterRule, BGPFilterSpec};
        let mut s = state(vec![node("master01", "10.0.0.10/24")]);
        let rule = |cidr: &str, op: &str, action: &str| BGPFilterRule {
            cidr: Some(cidr.into()),
            match_operator: Some(op.into()),
            action: Some(action.into()),
            ..Default::default()
        };
        let f1 = Filter::from_resource(&BGPFilter::new(
            "f1",
            BGPFilterSpec {
                export_v4: Some(vec![rule("10.1.0.0/16", "In", "Reject")]),
                import_v4: Some(vec![rule("0.0.0.0/0", "Equal", "Reject")]),
                ..Default::default()
            },
        ))
        .unwrap();
        let f2 = Filter::from_resource(&BGPFilter::new(
            "f2",
            BGPFilterSpec {
                export_v4: Some(vec![rule("10.0.0.0/8", "In", "Accept")]),
                ..Default::default()
            },
        ))
        .unwrap();
        s.filters.insert("f1".into(), f1);
        s.filters.insert("f2".into(), f2);
        let mut p = bgp_peer("tor");
        p.peer_ip = Some("192.0.2.1".parse().unwrap());
        p.as_number = Some(65010);
        p.filters = vec!["f1".into(), "missing".into(), "f2".into()];
        p.next_hop_mode = NextHopMode::Keep;
        p.keepalive_time = Some(std::time::Duration::from_secs(10));
        p.local_as_number = Some(65100);
        p.num_allowed_local_as = 2;
        p.source_address_none = true;
        p.ttl_security = Some(1);
        p.reachable_by = Some("NextHop".into());
        s.peers.insert("tor".into(), p);
        let set = desired_peers(&s, &local(&s));
        let cfg = &set.peers[&"192.0.2.1".parse::<IpAddr>().unwrap()].config;
        let export = cfg.export_filter.as_ref().unwrap();
        // f1's rules first, then f2's: 10.1/16 is rejected before f2 accepts 10/8.
        assert_eq!(export.v4.len(), 2);
        assert_eq!(
            export.evaluate(&"10.1.2.0/24".parse().unwrap(), false),
            Some(podroute_bgp::policy::FilterAction::Reject)
        );
        assert_eq!(
            export.evaluate(&"10.2.0.0/24".parse().unwrap(), false),
            Some(podroute_bgp::policy::FilterAction::Accept)
        );
        assert_eq!(cfg.import_filter.as_ref().unwrap().v4.len(), 1);
        assert!(cfg.next_hop_keep && !cfg.next_hop_self);
        assert_eq!(cfg.keepalive_time, Some(std::time::Duration::from_secs(10)));
        assert_eq!(cfg.local_as, Some(65100));
        assert_eq!(cfg.allow_own_as, 2);
        assert_eq!(cfg.local_addr, None);
        assert_eq!(cfg.local_v4_next_hop, Some("10.0.0.10".parse().unwrap()));
        assert_eq!(cfg.ttl_security, Some(1));
        let w = set.warnings.join("\n");
        assert!(w.contains("BGPFilter \"missing\" does not exist"), "{w}");
        assert!(w.contains("reachableBy \"NextHop\" is not honoured"), "{w}");
    }

    #[test]
    fn mesh_password_keys_every_mesh_session_or_none() {
        use crate::model::crd::SecretKeyRef;
        let mut s = state(vec![
            node("master01", "10.0.0.10/24"),
            node("node01", "10.0.0.11/24"),
        ]);
        let r = SecretKeyRef {
            name: "bgp".into(),
            key: "mesh".into(),
            optional: None,
        };
        s.bgp.node_mesh_password = Some(r.clone());
        let mut passwords = Passwords::new();
        passwords.insert(("bgp".into(), "mesh".into()), Ok(Arc::from(&b"k"[..])));
        let set = desired_peers_with(&s, &local(&s), &passwords);
        let p = set.peers.values().next().unwrap();
        assert_eq!(p.config.password.as_deref(), Some(&b"k"[..]));
        // Unreadable: no mesh session at all, and a warning naming why.
        let set = desired_peers(&s, &local(&s));
        assert!(set.peers.is_empty());
        assert!(
            set.warnings[0].contains("nodeMeshPassword"),
            "{:?}",
            set.warnings
        );
    }
    fn dual(name: &str, v4: Option<&str>, v6: Option<&str>) -> NodeInfo {
        NodeInfo {
            ipv4: v4.map(|t| t.parse().unwrap()),
            ipv6: v6.map(|t| t.parse().unwrap()),
            ..node(name, "192.0.2.1/32")
        }
    }

    fn summary(set: &PeerSet) -> Vec<(String, String, Vec<Family>, bool)> {
        set.peers
            .values()
            .map(|p| {
                (
                    p.name.clone(),
                    p.config.addr.to_string(),
                    p.config.families.clone(),
                    p.config.passive,
                )
            })
            .collect()
    }

    #[test]
    fn dual_stack_mesh_is_one_session_per_family_as_bird_and_bird6() {
        let s = state(vec![
            dual("master01", Some("10.0.0.10/24"), Some("fd00::10/64")),
            dual("node01", Some("10.0.0.5/24"), Some("fd00::5/64")),
            dual("node02", Some("10.0.0.100/24"), None),
            dual("node03", None, Some("fd00::a/64")),
        ]);
        let set = desired_peers(&s, &local(&s));
        let v4 = vec![Family::IPV4_UNICAST];
        let v6 = vec![Family::IPV6_UNICAST];
        // "fd00::5" < "fd00::10"? No: '5' > '1', so we wait for node01 on IPv6 too;
        // "fd00::a" > "fd00::10" likewise.
        assert_eq!(
            summary(&set),
            vec![
                ("node01".into(), "10.0.0.5".into(), v4.clone(), true),
                ("node02".into(), "10.0.0.100".into(), v4.clone(), true),
                ("node01".into(), "fd00::5".into(), v6.clone(), true),
                ("node03".into(), "fd00::a".into(), v6.clone(), true),
            ]
        );
        let v6_session = &set.peers[&"fd00::5".parse::<IpAddr>().unwrap()].config;
        assert_eq!(v6_session.local_addr, Some("fd00::10".parse().unwrap()));
        assert_eq!(
            v6_session.local_v6_next_hop,
            Some("fd00::10".parse().unwrap())
        );
        assert_eq!(v6_session.local_v4_next_hop, None);
        let v4_session = &set.peers[&"10.0.0.5".parse::<IpAddr>().unwrap()].config;
        assert_eq!(
            v4_session.local_v6_next_hop, None,
            "no IPv6 in the IPv4 session"
        );

        // From node01 ("fd00::5"), the larger string, it connects.
        let s1 = ClusterState {
            local_node: "node01".into(),
            ..s.clone()
        };
        let set1 = desired_peers(&s1, &local(&s1));
        let to_master = &set1.peers[&"fd00::10".parse::<IpAddr>().unwrap()].config;
        assert!(!to_master.passive);
    }

    #[test]
    fn multiprotocol_sessions_carry_both_families_in_the_ipv4_session() {
        let s = state(vec![
            dual("master01", Some("10.0.0.10/24"), Some("fd00::10/64")),
            dual("node01", Some("10.0.0.5/24"), Some("fd00::5/64")),
            dual("node03", None, Some("fd00::a/64")),
        ]);
        let mut me = local(&s);
        me.multiprotocol = true;
        let set = desired_peers(&s, &me);
        assert_eq!(
            summary(&set),
            vec![
                (
                    "node01".into(),
                    "10.0.0.5".into(),
                    vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
                    true
                ),
                (
                    "node03".into(),
                    "fd00::a".into(),
                    vec![Family::IPV6_UNICAST],
                    true
                ),
            ]
        );
        let cfg = &set.peers[&"10.0.0.5".parse::<IpAddr>().unwrap()].config;
        assert_eq!(cfg.local_v6_next_hop, Some("fd00::10".parse().unwrap()));
    }

    #[test]
    fn ipv6_only_node_meshes_over_ipv6_only() {
        let s = state(vec![
            dual("master01", None, Some("fd00::10/64")),
            dual("node01", Some("10.0.0.5/24"), Some("fd00::20/64")),
            dual("node02", Some("10.0.0.6/24"), None),
        ]);
        let set = desired_peers(&s, &local(&s));
        assert_eq!(
            summary(&set),
            vec![(
                "node01".into(),
                "fd00::20".into(),
                vec![Family::IPV6_UNICAST],
                true
            )]
        );
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    }

    #[test]
    fn a_link_local_node_address_is_never_an_ipv6_next_hop() {
        let s = state(vec![
            dual("master01", Some("10.0.0.10/24"), Some("fe80::1/64")),
            dual("node01", Some("10.0.0.5/24"), Some("fd00::5/64")),
        ]);
        let mut me = local(&s);
        let set = desired_peers(&s, &me);
        assert_eq!(set.peers.len(), 1);
        assert!(
            set.peers
                .values()
                .all(|p| p.config.local_v6_next_hop.is_none())
        );
        assert!(set.warnings[0].contains("link-local"), "{:?}", set.warnings);
        me.multiprotocol = true;
        let set = desired_peers(&s, &me);
        let only = set.peers.values().next().unwrap();
        assert_eq!(only.config.families, vec![Family::IPV4_UNICAST]);
    }

    #[test]
    fn bgp_peers_with_ipv6_peer_ips_and_selectors() {
        let mut node01 = dual("node01", Some("10.0.0.5/24"), Some("fd00::5/64"));
        node01.as_number = Some(65005);
        let mut s = state(vec![
            dual("master01", Some("10.0.0.10/24"), Some("fd00::10/64")),
            node01,
        ]);
        s.bgp.node_to_node_mesh = false;
        let mut tor6 = bgp_peer("tor6");
        tor6.peer_ip = Some("fd00::1".parse().unwrap());
        tor6.as_number = Some(65001);
        let mut to_node = bgp_peer("to-node01-v6");
        to_node.peer_ip = Some("fd00::5".parse().unwrap());
        let mut all = bgp_peer("all");
        all.peer_selector = Some("all()".into());
        for p in [tor6, to_node] {
            s.peers.insert(p.name.clone(), p);
        }
        let set = desired_peers(&s, &local(&s));
        let tor = &set.peers[&"fd00::1".parse::<IpAddr>().unwrap()];
        assert_eq!(tor.config.families, vec![Family::IPV6_UNICAST]);
        assert_eq!(tor.config.remote_as, 65001);
        assert_eq!(tor.config.local_addr, Some("fd00::10".parse().unwrap()));
        let n1 = &set.peers[&"fd00::5".parse::<IpAddr>().unwrap()];
        assert_eq!(
            n1.config.remote_as, 65005,
            "matched to node01 by its IPv6 address"
        );

        s.peers.clear();
        s.peers.insert(all.name.clone(), all);
        let set = desired_peers(&s, &local(&s));
        let got: Vec<String> = set.peers.keys().map(|a| a.to_string()).collect();
        assert_eq!(got, vec!["10.0.0.5", "fd00::5"]);

        // An IPv4-only node cannot peer with an IPv6 address, and says so.
        let mut s4 = state(vec![node("master01", "10.0.0.10/24")]);
        let mut tor6 = bgp_peer("tor6");
        tor6.peer_ip = Some("fd00::1".parse().unwrap());
        s4.peers.insert(tor6.name.clone(), tor6);
        let set = desired_peers(&s4, &local(&s4));
        assert!(set.peers.is_empty());
        assert!(set.warnings[0].contains("is IPv6"), "{:?}", set.warnings);
    }

    /// Ready nodes and routers outside the cluster are configured (and connect) first, nodes
    /// without a Ready condition next, nodes reported not ready last; by address within each.
    /// In address order (the map's), the not-ready node 10.0.0.2 would come first.
    #[test]
    fn peers_likely_to_answer_are_configured_first() {
        let with = |name: &str, ip: &str, ready: Option<bool>| NodeInfo {
            ready,
            ..node(name, ip)
        };
        let mut s = state(vec![
            with("master01", "10.0.0.1/24", Some(true)),
            with("down", "10.0.0.2/24", Some(false)),
            with("silent", "10.0.0.3/24", None),
            with("up", "10.0.0.4/24", Some(true)),
            with("up2", "10.0.0.5/24", Some(true)),
        ]);
        let mut tor = bgp_peer("tor");
        tor.peer_ip = Some("10.0.0.254".parse().unwrap());
        s.peers.insert(tor.name.clone(), tor);
        let set = desired_peers(&s, &local(&s));
        let order: Vec<(String, ConnectPriority)> = in_connect_order(set.peers)
            .into_iter()
            .map(|(_, p)| (p.name, p.config.connect_priority))
            .collect();
        use ConnectPriority::{High, Low, Normal};
        assert_eq!(
            order,
            vec![
                ("up".to_string(), High),
                ("up2".to_string(), High),
                ("tor".to_string(), High),
                ("silent".to_string(), Normal),
                ("down".to_string(), Low),
            ]
        );
    }
}
