//! Two podroute nodes, each in its own network namespace (a veth between them, seed 001's
//! addresses plus fd00:92::/64), mesh exactly as the agent configures it: the sessions come
//! from `desired_peers` and the listener from the default `--bgp-bind` (`[::]`). As Calico's
//! bird and bird6 do, the IPv4 session carries IPv4 only and the IPv6 session, between the
//! nodes' IPv6 addresses, IPv6 only, with the node's global IPv6 address as next hop; with
//! `--bgp-multiprotocol-sessions` one IPv4 session carries both.
//!
//! The last test puts BIRD 1.6's `bird6`, configured as Calico's confd renders it for the
//! IPv6 mesh, in node01's place: it connects to podroute's `[::]:179` (the "Connection
//! refused" of issue 18) and the /122 blocks go both ways over the IPv6 session. BIRD 1.6 is
//! where tests/run.sh unpacks it (`$PODROUTE_BIRD16_DIR`, see tests/calico_bird16.rs); without
//! it that test prints a loud SKIP (and fails with `CI=true`).
//!
//! Traffic rule: every address lives only inside the namespaces this test creates.

#[allow(dead_code)]
mod agent_guard;
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
                    internal_ipv6: None,
                    ipv6: Some(v6.parse().unwrap()),
                    as_number: None,
                    route_reflector_cluster_id: None,
                    ipip_tunnel_addr: None,
                    vxlan: Default::default(),
                    labels: BTreeMap::new(),
                    flannel: None,
                    ready: None,
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
            let (speaker, _best) = start_speaker(cfg, listen_candidates(None, 179), None)
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

fn bird16_dir() -> std::path::PathBuf {
    std::env::var_os("PODROUTE_BIRD16_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/cache/podroute-test/bird1"))
}

fn have_bird6(test: &str) -> bool {
    let bird6 = bird16_dir().join("usr/sbin/bird6");
    let text = std::process::Command::new(&bird6)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
        })
        .unwrap_or_default();
    if text.contains("BIRD version 1.6") {
        return true;
    }
    agent_guard::cannot_run(
        "BIRD 1.6 bird6 interop",
        test,
        &format!("BIRD 1.6's bird6 is not at {} ({text:?})", bird6.display()),
        "Run tests/run.sh (it unpacks Debian's `bird` package there), or set PODROUTE_BIRD16_DIR.",
    );
    false
}

/// Calico's confd `bird6.cfg` / `bird6_ipam.cfg` / `bird6_aggr.cfg` for node01
/// (fd00:92::129, block fd00:10:0:b::/122, pool fd00:10::/48), meshing with master01 at
/// fd00:92::128. The router ID is node01's IPv4 address, as Calico's bird6 template sets it.
fn calico_bird6_cfg(log: &std::path::Path) -> String {
    let (node_ip, peer_ip) = ("fd00:92::129", "fd00:92::128");
    // Calico: `{{if gt $onode_ip $node_ip}} passive on;` (string order); here the peer's
    // address is the smaller, so bird6 connects and podroute must be listening on IPv6.
    assert!(peer_ip < node_ip);
    format!(
        r#"# Rendered from calico confd's bird6_aggr.cfg.template
protocol static {{
   # IP blocks for this host.
   route fd00:10:0:b::/122 blackhole;
}}

function calico_aggr ()
{{
      if ( net = fd00:10:0:b::/122 ) then {{ accept; }}
      if ( net ~ fd00:10:0:b::/122 ) then {{ reject; }}
}}

# Rendered from bird6_ipam.cfg.template
filter calico_export_to_bgp_peers {{
  calico_aggr();
  if ( net ~ fd00:10::/48 ) then {{
    accept;
  }}
  reject;
}}

# Rendered from bird6.cfg.template
log "{log}" all;
router id 192.168.92.129;

protocol kernel {{
  learn;
  persist;
  scan time 2;
  import all;
  export none;       # the test reads BIRD's table, not node01's kernel
  graceful restart;
  merge paths on;
}}

protocol device {{
  debug {{ states }};
  scan time 2;
}}

protocol direct {{
  debug {{ states }};
  interface -"cali*", -"kube-ipvs*", "*";
}}

template bgp bgp_template {{
  debug {{ states }};
  description "Connection to BGP peer";
  local as 64512;
  multihop;
  gateway recursive;
  import all;
  export filter calico_export_to_bgp_peers;
  add paths on;
  graceful restart;
  connect delay time 2;
  connect retry time 5;
  error wait time 5,30;
}}

# ------------- Node-to-node mesh -------------
# For peer /host/master01/ip_addr_v6
protocol bgp Mesh_fd00_92__128 from bgp_template {{
  neighbor {peer_ip} as 64512;
  source address {node_ip};  # The local address we use for the TCP connection
  graceful restart time 120;
}}
"#,
        log = log.display(),
    )
}

/// Kills the child it holds (a process this test started) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn calico_bird6_connects_to_podroute_and_blocks_go_both_ways_over_ipv6() {
    let test = "calico_bird6_connects_to_podroute_and_blocks_go_both_ways_over_ipv6";
    if !can_run(test) || !have_bird6(test) {
        return;
    }
    let a = Netns::new("v6p");
    let b = Netns::new("v6b6");
    veth(&a, "eth0", NODES[0].1, &b, "eth0", NODES[1].1);
    a.ip(&["addr", "add", NODES[0].2, "dev", "eth0", "nodad"]);
    b.ip(&["addr", "add", NODES[1].2, "dev", "eth0", "nodad"]);

    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bird6.cfg");
    let socket = dir.path().join("bird6.ctl");
    std::fs::write(&conf, calico_bird6_cfg(&dir.path().join("bird6.log"))).unwrap();
    let bird6 = bird16_dir().join("usr/sbin/bird6");
    let birdc6 = bird16_dir().join("usr/sbin/birdc6");
    let (ok, out) = b.exec(
        bird6.to_str().unwrap(),
        &["-p", "-c", conf.to_str().unwrap()],
    );
    assert!(ok, "Calico's bird6.cfg does not parse in BIRD 1.6:\n{out}");
    let _bird = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &b.name])
            .arg(&bird6)
            .args([
                "-f",
                "-c",
                conf.to_str().unwrap(),
                "-s",
                socket.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("bird6 starts"),
    );

    // master01 runs podroute with the agent's defaults: dual-stack listener, one session per
    // family (the IPv4 one to node01 finds no IPv4 bird here and stays down).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let path = format!("/run/netns/{}", a.name);
    let podroute = std::thread::spawn(move || -> Result<NodeView, String> {
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
            let state = cluster("master01");
            let me = state.local().unwrap();
            let identity = LocalIdentity {
                name: "master01".into(),
                ipv4: me.ipv4_addr(),
                ipv6: me.ipv6.map(|n| n.addr()),
                as_number: 64512,
                route_reflector_cluster_id: None,
                labels: BTreeMap::new(),
                multiprotocol: false,
            };
            let mut cfg = SpeakerConfig::new(64512, me.ipv4_addr().unwrap());
            cfg.connect_retry = Duration::from_secs(1);
            let (speaker, _best) = start_speaker(cfg, listen_candidates(None, 179), None)
                .await
                .map_err(|e| e.to_string())?;
            let peers = desired_peers(&state, &identity).peers;
            let v6_peer = peers
                .get(&ip("fd00:92::129"))
                .ok_or("no IPv6 mesh session to node01")?;
            if !v6_peer.config.passive {
                return Err("podroute should wait for bird6 (string order)".into());
            }
            for peer in peers.into_values() {
                speaker
                    .add_peer(peer.config)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            speaker
                .announce(net("fd00:10:0:a::/122"), None)
                .await
                .map_err(|e| e.to_string())?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let view = loop {
                let rib = speaker.loc_rib().await.map_err(|e| e.to_string())?;
                let peers = speaker.peers().await.map_err(|e| e.to_string())?;
                let v6 = peers.iter().find(|p| p.addr == ip("fd00:92::129"));
                let learned = rib
                    .iter()
                    .any(|(p, b)| *p == net("fd00:10:0:b::/122") && b.peer_addr.is_some());
                if learned && v6.is_some_and(|p| !p.end_of_rib.is_empty()) {
                    break NodeView {
                        sessions: peers
                            .iter()
                            .filter(|p| p.state == State::Established)
                            .map(|p| (p.addr, (p.end_of_rib.clone(), p.prefixes_received)))
                            .collect(),
                        learned: rib
                            .into_iter()
                            .filter(|(_, b)| b.peer_addr.is_some())
                            .map(|(p, b)| (p, (b.next_hop, b.peer_addr)))
                            .collect(),
                        listen: speaker.listen_addr(),
                    };
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("no route from bird6: rib {rib:?}, peers {peers:?}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            // Keep the session up while the test reads bird6's table.
            let _ = done_rx.await;
            let _ = speaker.shutdown().await;
            Ok(view)
        })
    });

    // bird6 learns podroute's block over the IPv6 session, next hop master01's global address.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let bird_route = loop {
        let (ok, out) = b.exec(
            birdc6.to_str().unwrap(),
            &[
                "-s",
                socket.to_str().unwrap(),
                "show",
                "route",
                "fd00:10:0:a::/122",
                "all",
            ],
        );
        if ok && out.contains("fd00:10:0:a::/122") {
            break out;
        }
        if std::time::Instant::now() > deadline || podroute.is_finished() {
            let (_, protocols) = b.exec(
                birdc6.to_str().unwrap(),
                &[
                    "-s",
                    socket.to_str().unwrap(),
                    "show",
                    "protocols",
                    "all",
                    "Mesh_fd00_92__128",
                ],
            );
            let _ = done_tx.send(());
            let view = podroute.join();
            panic!(
                "bird6 has no route to podroute's block: {out}\n{protocols}\npodroute: {view:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = done_tx.send(());
    let master = podroute.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        bird_route.contains("via fd00:92::128") && bird_route.contains("Mesh_fd00_92__128"),
        "{bird_route}"
    );
    assert!(
        bird_route.contains("BGP.next_hop: fd00:92::128"),
        "{bird_route}"
    );
    assert!(
        !bird_route.contains("fe80"),
        "no link-local next hop: {bird_route}"
    );
    assert_eq!(master.listen, Some("[::]:179".parse().unwrap()));
    assert_eq!(
        master.sessions,
        BTreeMap::from([(ip("fd00:92::129"), (vec![Family::IPV6_UNICAST], 1))]),
        "only the IPv6 session is up (no IPv4 bird here), carrying IPv6 only"
    );
    assert_eq!(
        master.learned,
        BTreeMap::from([(
            net("fd00:10:0:b::/122"),
            (ip("fd00:92::129"), Some(ip("fd00:92::129")))
        )])
    );
}
