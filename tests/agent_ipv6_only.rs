//! IPv6-only nodes end to end: two `podroute agent` processes, each in its own network
//! namespace with only an IPv6 address (fd00:92::/64 on `ens33`), read a YAML-directory
//! datastore with an IPv6 pool and one /122 block per node. Started with `IP=none` and no
//! IPv4 address anywhere, each must start (router ID hashed from its name, as Calico's
//! `CALICO_ROUTER_ID=hash`), mesh with the other over IPv6 and program the other's block via
//! its global IPv6 address, and its own as a blackhole. The dual-stack variant adds IPv4
//! addresses, an IPv4 pool and blocks: each node then has two sessions to the other, one per
//! family (as calico-node's bird and bird6), and both families' routes.
//!
//! Root only (network namespaces); otherwise a loud SKIP, and a failure with `CI=true`.
//! Every address lives only inside namespaces this test creates.

mod netns;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Netns, can_run, veth};
use podroute::agent::router_id::hash_router_id;
use podroute::agent::status::AgentStatus;

/// Kills the agent it holds (a process this test started) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn block_yaml(node: &str, cidr: &str, name: &str) -> String {
    let nulls = vec!["null"; 64].join(", ");
    let free: Vec<String> = (0..64).map(|i| i.to_string()).collect();
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {name}\n\
         spec:\n  affinity: host:{node}\n  allocations: [{nulls}]\n  attributes: []\n  \
         cidr: {cidr}\n  deleted: false\n  strictAffinity: false\n  unallocated: [{}]\n",
        free.join(", ")
    )
}

fn write_datastore(dir: &Path, dual: bool) {
    let mut text = String::from(
        "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\nmetadata:\n  \
         name: default\nspec:\n  asNumber: 64512\n  nodeToNodeMeshEnabled: true\n---\n\
         apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  \
         name: default-ipv6-ippool\nspec:\n  blockSize: 122\n  cidr: fd00:10::/48\n  \
         ipipMode: Never\n  vxlanMode: Never\n  nodeSelector: all()\n",
    );
    for (node, addr, addr4) in [
        ("v6-master", "fd00:92::128/64", "192.168.92.128/24"),
        ("v6-node", "fd00:92::129/64", "192.168.92.129/24"),
    ] {
        text += &format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  annotations:\n    \
             projectcalico.org/IPv6Address: {addr}\n"
        );
        if dual {
            text += &format!("    projectcalico.org/IPv4Address: {addr4}\n");
        }
    }
    if dual {
        text += "---\napiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  \
                 name: default-ipv4-ippool\nspec:\n  blockSize: 26\n  cidr: 172.16.0.0/16\n  \
                 ipipMode: Never\n  vxlanMode: Never\n  nodeSelector: all()\n---\n";
        text += &block_yaml("v6-master", "172.16.241.64/26", "172-16-241-64-26");
        text += "---\n";
        text += &block_yaml("v6-node", "172.16.196.128/26", "172-16-196-128-26");
    }
    text += "---\n";
    text += &block_yaml("v6-master", "fd00:10:0:a::/122", "fd00-10-0-a---122");
    text += "---\n";
    text += &block_yaml("v6-node", "fd00:10:0:b::/122", "fd00-10-0-b---122");
    std::fs::write(dir.join("cluster.yaml"), text).unwrap();
}

fn start(ns: &Netns, node: &str, datastore: &Path, log: &Path) -> Agent {
    let log = std::fs::File::create(log).unwrap();
    Agent(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_podroute"),
                "agent",
            ])
            .args(["--nodename", node, "--ip", "none", "--ip6", "none"])
            .arg("--datastore-type")
            .arg(format!("dir:{}", datastore.display()))
            .args(["--metrics-addr", "[::1]:9091", "--connect-retry", "1s"])
            .env_remove("IP")
            .env_remove("IP6")
            .env_remove("CALICO_ROUTER_ID")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podroute agent starts"),
    )
}

fn status(ns: &Netns) -> Option<AgentStatus> {
    let (ok, out) = ns.exec(
        env!("CARGO_BIN_EXE_podroute"),
        &["status", "--agent", "http://[::1]:9091", "--output", "json"],
    );
    if !ok {
        return None;
    }
    serde_json::from_str(&out).ok()
}

fn routes(ns: &Netns) -> Vec<String> {
    ns.routes(podroute::dataplane::DEFAULT_ROUTE_PROTOCOL)
}

/// Runs the two agents (IPv6-only, or dual-stack) until both kernels hold `want_a` and
/// `want_b` and v6-master is ready; returns v6-master's status.
fn run_cluster(tag: &str, dual: bool, want_a: &[&str], want_b: &[&str]) -> Option<AgentStatus> {
    if !can_run(tag) {
        return None;
    }
    let a = Netns::new("v6only-a");
    let b = Netns::new("v6only-b");
    let (a4, b4) = if dual {
        ("192.168.92.128/24", "192.168.92.129/24")
    } else {
        ("", "")
    };
    veth(&a, "ens33", a4, &b, "ens33", b4);
    a.ip(&["addr", "add", "fd00:92::128/64", "dev", "ens33", "nodad"]);
    b.ip(&["addr", "add", "fd00:92::129/64", "dev", "ens33", "nodad"]);
    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write_datastore(&datastore, dual);
    let _agents = [
        start(&a, "v6-master", &datastore, &dir.path().join("a.log")),
        start(&b, "v6-node", &datastore, &dir.path().join("b.log")),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ra, rb) = (routes(&a), routes(&b));
        let ready = status(&a).is_some_and(|s| s.health.ready);
        if ra == want_a && rb == want_b && ready {
            break;
        }
        if Instant::now() > deadline {
            let log = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
            panic!(
                "agents did not converge:\nA {ra:?}\nB {rb:?}\n--- A log\n{}\n--- B log\n{}",
                log("a.log"),
                log("b.log")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    status(&a)
}

fn peers(st: &AgentStatus) -> Vec<(String, String)> {
    let mut peers: Vec<(String, String)> = st
        .peers
        .iter()
        .map(|p| (p.address.clone(), p.state.clone()))
        .collect();
    peers.sort();
    peers
}

#[test]
fn ipv6_only_nodes_start_mesh_over_ipv6_and_route_each_others_blocks() {
    let Some(st) = run_cluster(
        "ipv6_only_nodes_start_mesh_over_ipv6_and_route_each_others_blocks",
        false,
        &[
            "blackhole fd00:10:0:a::/122 dev lo pref medium",
            "fd00:10:0:b::/122 via fd00:92::129 dev ens33 pref medium",
        ],
        &[
            "blackhole fd00:10:0:b::/122 dev lo pref medium",
            "fd00:10:0:a::/122 via fd00:92::128 dev ens33 pref medium",
        ],
    ) else {
        return;
    };
    assert_eq!(st.ipv4, None);
    assert_eq!(st.ipv6.as_deref(), Some("fd00:92::128/64"));
    assert_eq!(st.router_id, hash_router_id("v6-master").to_string());
    assert_eq!(
        peers(&st),
        vec![("fd00:92::129".to_string(), "Established".to_string())]
    );
}

#[test]
fn dual_stack_nodes_have_one_session_per_family_and_both_families_routes() {
    let Some(st) = run_cluster(
        "dual_stack_nodes_have_one_session_per_family_and_both_families_routes",
        true,
        &[
            "172.16.196.128/26 via 192.168.92.129 dev ens33",
            "blackhole 172.16.241.64/26",
            "blackhole fd00:10:0:a::/122 dev lo pref medium",
            "fd00:10:0:b::/122 via fd00:92::129 dev ens33 pref medium",
        ],
        &[
            "172.16.241.64/26 via 192.168.92.128 dev ens33",
            "blackhole 172.16.196.128/26",
            "blackhole fd00:10:0:b::/122 dev lo pref medium",
            "fd00:10:0:a::/122 via fd00:92::128 dev ens33 pref medium",
        ],
    ) else {
        return;
    };
    assert_eq!(st.ipv4.as_deref(), Some("192.168.92.128/24"));
    assert_eq!(st.ipv6.as_deref(), Some("fd00:92::128/64"));
    assert_eq!(st.router_id, "192.168.92.128");
    assert_eq!(
        peers(&st),
        vec![
            ("192.168.92.129".to_string(), "Established".to_string()),
            ("fd00:92::129".to_string(), "Established".to_string()),
        ]
    );
}
