//! Two podroute nodes, each in its own network namespace (a veth between them, seed 001's
//! addresses plus fd00:92::/64), mesh exactly as the agent configures it: the sessions come
//! from `desired_peers` and the listener from the default `--bgp-bind` (`[::]`). As Calico's
//! bird and bird6 do, the IPv4 session carries IPv4 only and the IPv6 session, between the
//! nodes' IPv6 addresses, IPv6 only, with the node's global IPv6 address as next hop; with
//! `--bgp-multiprotocol-sessions` one IPv4 session carries both.
//!
//! Traffic rule: every address lives only inside the namespaces this test creates.

mod netns;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use netns::{Netns, can_run, veth};
use podroute::agent::listen::{listen_candidates, start_speaker};
use podroute::agent::peers::{LocalIdentity, desired_peers};
use podroute::bgp::SpeakerConfig;
use podroute::bgp::fsm::State;
use podroute::bgp::wire::Family;
use podroute::model::NodeInfo;
use podroute::state::ClusterState;

const NODES: [(&str, &str, &str, &str, &str); 2] = [
    (
        "master01",
        "192.168.92.128/24",
        "fd00:92::128/64",
        "172.16.241.64/26",
        "fd00:10:0:a::/122",
    ),
    (
        "node01",
        "192.168.92.129/24",
        "fd00:92::129/64",
        "172.16.196.128/26",
        "fd00:10:0:b::/122",
    ),
];

fn cluster(local: &str) -> ClusterState {
    let nodes = NODES
        .iter()
        .map(|(name, v4, v6, _, _)| {
            (
                name.to_string(),
                NodeInfo {
                    name: name.to_string(),
                    ipv4: Some(v4.parse().unwrap()),
                    ipv4_source: None,
                    ipv6: Some(v6.parse().unwrap()),
                    as_number: None,
                    route_reflector_cluster_id: None,
                    ipip_tunnel_addr: None,
                    labels: BTreeMap::new(),
                },
            )
        })
        .collect();
    ClusterState {
        local_node: local.into(),
        nodes,
        ..ClusterState::default()
    }
}

/// What one node saw once it had learned the other's blocks.
#[derive(Debug)]
struct NodeView {
    /// Per session: peer address → families that completed (End-of-RIB received), prefixes
    /// received.
    sessions: BTreeMap<IpAddr, (Vec<Family>, usize)>,
    /// Learned prefix → (next hop, session it came from).
    learned: BTreeMap<IpNet, (IpAddr, Option<IpAddr>)>,
    listen: Option<std::net::SocketAddr>,
}

/// Runs node `index`'s speaker on a thread inside `ns` until it has learned both of the
/// other node's blocks and both sides are done (`barrier`).
fn run_node(
    ns: &Netns,
    index: usize,
    multiprotocol: bool,
    barrier: Arc<tokio::sync::Barrier>,
) -> std::thread::JoinHandle<Result<NodeView, String>> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (name, _, _, v4_block, v6_block) = NODES[index];
            let (_, _, _, other_v4, other_v6) = NODES[1 - index];
            let state = cluster(name);
            let me = state.local().unwrap();
            let identity = LocalIdentity {
                name: name.into(),
                ipv4: me.ipv4_addr(),
                ipv6: me.ipv6.map(|n| n.addr()),
                as_number: 64512,
                route_reflector_cluster_id: None,
                labels: BTreeMap::new(),
                multiprotocol,
            };
            let mut cfg = SpeakerConfig::new(64512, me.ipv4_addr().unwrap());
            cfg.connect_retry = Duration::from_secs(1);
            let (speaker, _best) = start_speaker(cfg, listen_candidates(None, 179))
                .await
                .map_err(|e| e.to_string())?;
            for peer in desired_peers(&state, &identity).peers.into_values() {
                speaker
                    .add_peer(peer.config)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            speaker
                .announce(v4_block.parse().unwrap(), None)
                .await
                .map_err(|e| e.to_string())?;
            speaker
                .announce(v6_block.parse().unwrap(), None)
                .await
                .map_err(|e| e.to_string())?;
            let wanted: [IpNet; 2] = [other_v4.parse().unwrap(), other_v6.parse().unwrap()];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let rib = loop {
                let rib = speaker.loc_rib().await.map_err(|e| e.to_string())?;
                let complete = wanted.iter().all(|w| rib.iter().any(|(p, _)| p == w));
                let eor = speaker
                    .peers()
                    .await
                    .map_err(|e| e.to_string())?
                    .iter()
                    .all(|p| p.state == State::Established && !p.end_of_rib.is_empty());
                if complete && eor {
                    break rib;
                }
                if tokio::time::Instant::now() > deadline {
                    let peers = speaker.peers().await.map_err(|e| e.to_string())?;
                    return Err(format!(
                        "{name} did not learn {wanted:?}: rib {rib:?}, peers {peers:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let sessions = speaker
                .peers()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|p| {
                    let mut eor = p.end_of_rib.clone();
                    eor.sort_by_key(|f| f.to_string());
                    (p.addr, (eor, p.prefixes_received))
                })
                .collect();
            let view = NodeView {
                sessions,
                // Learned routes only (our own originated blocks have no peer).
                learned: rib
                    .into_iter()
                    .filter(|(_, best)| best.peer_addr.is_some())
                    .map(|(p, best)| (p, (best.next_hop, best.peer_addr)))
                    .collect(),
                listen: speaker.listen_addr(),
            };
            barrier.wait().await;
            let _ = speaker.shutdown().await;
            Ok(view)
        })
    })
}

fn two_nodes(tag: &str, multiprotocol: bool) -> Option<[NodeView; 2]> {
    if !can_run(tag) {
        return None;
    }
    let a = Netns::new("v6a");
    let b = Netns::new("v6b");
    veth(&a, "eth0", NODES[0].1, &b, "eth0", NODES[1].1);
    a.ip(&["addr", "add", NODES[0].2, "dev", "eth0", "nodad"]);
    b.ip(&["addr", "add", NODES[1].2, "dev", "eth0", "nodad"]);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let ha = run_node(&a, 0, multiprotocol, barrier.clone());
    let hb = run_node(&b, 1, multiprotocol, barrier);
    let va = ha.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    let vb = hb.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    Some([va, vb])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn dual_stack_nodes_mesh_as_bird_and_bird6_one_family_per_session() {
    let Some([master, node]) = two_nodes("dual_stack_nodes_mesh_as_bird_and_bird6", false) else {
        return;
    };
    // The default listener is dual-stack.
    assert_eq!(master.listen, Some("[::]:179".parse().unwrap()));
    // master01 has two sessions to node01: its IPv4 address carrying IPv4 only, its IPv6
    // address carrying IPv6 only, one prefix each.
    assert_eq!(
        master.sessions,
        BTreeMap::from([
            (ip("192.168.92.129"), (vec![Family::IPV4_UNICAST], 1)),
            (ip("fd00:92::129"), (vec![Family::IPV6_UNICAST], 1)),
        ])
    );
    assert_eq!(
        master.learned,
        BTreeMap::from([
            (
                net("172.16.196.128/26"),
                (ip("192.168.92.129"), Some(ip("192.168.92.129")))
            ),
            (
                net("fd00:10:0:b::/122"),
                (ip("fd00:92::129"), Some(ip("fd00:92::129")))
            ),
        ])
    );
    assert_eq!(
        node.learned.get(&net("fd00:10:0:a::/122")),
        Some(&(ip("fd00:92::128"), Some(ip("fd00:92::128")))),
        "the IPv6 next hop is master01's global address, learned over the IPv6 session"
    );
    assert_eq!(node.sessions.len(), 2);
}

#[test]
fn multiprotocol_sessions_carry_both_families_between_podroute_nodes() {
    let Some([master, _node]) = two_nodes("multiprotocol_sessions_carry_both_families", true)
    else {
        return;
    };
    let mut both = vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST];
    both.sort_by_key(|f| f.to_string());
    assert_eq!(
        master.sessions,
        BTreeMap::from([(ip("192.168.92.129"), (both, 2))])
    );
    assert_eq!(
        master.learned.get(&net("fd00:10:0:b::/122")),
        Some(&(ip("fd00:92::129"), Some(ip("192.168.92.129")))),
        "IPv6 rides the IPv4 session; its next hop is still node01's global IPv6 address"
    );
}
