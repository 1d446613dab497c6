//! Dual-stack and IPv6-only clusters end to end (issue 18): the lab cluster of
//! `podroute lab --family dual|ipv6` — master01 and node01 on 192.168.92.0/24 and
//! fd00:92::/64, node02 on 192.168.93.0/24 and fd00:93::/64 behind a router namespace; IPv4
//! pool 172.16.0.0/16 `ipipMode: CrossSubnet`, IPv6 pool fd00:172:16::/48 `Never`; one pod per
//! node with an address of each family — with one real `podroute agent` per node.
//!
//! Checked: both meshes (one session per family and peer, as calico-node's bird and bird6),
//! each kernel table equal to the plan for both families, pods pinging each other over IPv6
//! on one subnet and across the router (the IPv6 pool is `Never`: the route to a block of a
//! node on another subnet is planned `BLOCK via NODE6` and installed via the router, the next
//! hop resolved recursively as BIRD's `gateway recursive` does; the router knows the blocks, as
//! a ToR would from BGP), IPv4 across the router through tunl0, a node accepting inbound IPv4
//! and IPv6 sessions on its one listener at the same time, the IPv6-only cluster without any
//! IPv4 address, the seed with an IPv4 `Never` pool routed across the router the same way,
//! and the lab command itself on a machine without `ping` or `sysctl`. The time from agent
//! start to every kernel holding its routes is printed per family.
//!
//! Root only: without root a loud SKIP, with `CI=true` a failure. Each test uses its own
//! namespace prefix; every address lives only inside namespaces the test creates.

#[allow(dead_code)]
mod agent_guard;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agent_guard::tool_works;
use podroute::agent::router_id::hash_router_id;
use podroute::lab::{ClusterSpec, Family, IpVersion, Lab, LabConfig, PEER_TYPE_MESH};
use podroute::plan::EncapMode;

/// Longest wait for a mesh to converge; typically well under 2 s.
const CONVERGE: Duration = Duration::from_secs(45);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn can_run(test: &str) -> bool {
    if !podroute::lab::is_root() {
        agent_guard::cannot_run(
            "dual-stack",
            test,
            "not running as root",
            "These tests need root (network namespaces, veth, routes).",
        );
        return false;
    }
    if !tool_works("ip", "-V") {
        agent_guard::cannot_run(
            "dual-stack",
            test,
            "iproute2 `ip` is missing",
            "Install iproute2.",
        );
        return false;
    }
    true
}

fn prefix(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("ds{}{n}-{tag}", std::process::id())
}

fn logs(lab: &Lab) -> String {
    lab.spec
        .nodes
        .iter()
        .map(|n| format!("--- {}:\n{}", n.name, lab.log_tail(&n.name, 25)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A lab of `family` with its agents started and converged; prints the time from agent start
/// to every node's kernel holding its routes, per family.
fn converged_lab(tag: &str, family: Family) -> Lab {
    let cfg = LabConfig::new(prefix(tag), env!("CARGO_BIN_EXE_podroute"));
    let mut lab = Lab::build(cfg, ClusterSpec::seed_family(family)).expect("build the lab");
    lab.start_agents().expect("start the agents");
    let times = lab
        .wait_routes_per_family(CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    for (version, took) in &times {
        eprintln!(
            "convergence ({} cluster): {} routes in every kernel {took:.3?} after agent start",
            family.name(),
            version.name()
        );
    }
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    lab
}

fn pod_ip(lab: &Lab, node: &str, version: IpVersion) -> IpAddr {
    let pod = &lab.spec.node(node).unwrap().pods[0];
    pod.ips(lab.spec.family)
        .into_iter()
        .find(|a| IpVersion::of(*a) == version)
        .unwrap_or_else(|| panic!("{node}'s pod has no {} address", version.name()))
}

fn pod_name(lab: &Lab, node: &str) -> String {
    lab.spec.node(node).unwrap().pods[0].name.clone()
}

/// Every node's kernel table (podroute's protocol, both families) is the plan's, with routes
/// of both families in it; the IPv6 routes across the router are planned and reported with
/// the kernel's refusal.
fn kernel_tables_are_the_plans(lab: &Lab) {
    for node in ["master01", "node01", "node02"] {
        let have = lab.kernel_routes(node).unwrap();
        let want = lab.expected_kernel_routes(node).unwrap();
        assert_eq!(have, want, "{node}'s kernel table\n{}", logs(lab));
        // Not vacuous: the IPv6 blackhole and pod route everywhere, the IPv6 block of the
        // node on the same subnet on master01 and node01; IPv4 routes only when dual-stack.
        let me = lab.spec.node(node).unwrap();
        let mut must = vec![
            format!("blackhole {}", me.block6.unwrap()),
            format!("{} dev {}", me.pods[0].ip6.unwrap(), me.pods[0].interface()),
        ];
        let neighbour = match node {
            "master01" => Some("node01"),
            "node01" => Some("master01"),
            _ => None,
        };
        if let Some(other) = neighbour.and_then(|n| lab.spec.node(n)) {
            must.push(format!(
                "{} via {} dev ens33",
                other.block6.unwrap(),
                other.addr6.unwrap().addr()
            ));
        }
        for line in &must {
            assert!(want.contains(line), "{node}: {line:?} not in {want:#?}");
        }
        let v4 = want.iter().filter(|l| !l.contains(':')).count();
        assert_eq!(v4 > 0, lab.spec.family.has_ipv4(), "{node}: {want:#?}");
        let report = lab.routes(node).unwrap();
        lab.routes_match_plan(node, &report)
            .unwrap_or_else(|e| panic!("{node}: {e}"));
        // The routes left out of `want` (tunnel routes while there is no tunl0): planned,
        // reported, and not installed with a reason.
        let plan = lab.spec.expected_plan(node).unwrap();
        for r in plan.routes.iter().filter(|r| {
            lab.not_installable(node, r, lab.has_tunnel_device(node))
                .is_some()
        }) {
            let row = report
                .routes
                .iter()
                .find(|row| podroute::lab::same_route(row, r))
                .unwrap_or_else(|| panic!("{node}: {r} not reported"));
            assert!(
                row.error.is_some(),
                "{node}: {r} not installed and no reason given: {row:?}"
            );
        }
    }
    // The IPv6 blocks across the router: planned via the node, installed via the router.
    let kernel = |node: &str| lab.kernel_routes(node).unwrap();
    for node in ["master01", "node01"] {
        let line = "fd00:172:16:10::/122 via fd00:92::1 dev ens33".to_string();
        assert!(kernel(node).contains(&line), "{node}: {:#?}", kernel(node));
    }
    for line in [
        "fd00:172:16:241::40/122 via fd00:93::1 dev ens33",
        "fd00:172:16:196::80/122 via fd00:93::1 dev ens33",
    ] {
        let have = kernel("node02");
        assert!(have.contains(&line.to_string()), "node02: {have:#?}");
    }
}

/// Every pod pings every other pod over IPv6, across the router too.
fn pods_ping_over_ipv6(lab: &Lab) {
    for from in ["master01", "node01", "node02"] {
        for to in ["master01", "node01", "node02"] {
            if from == to {
                continue;
            }
            let dst = pod_ip(lab, to, IpVersion::V6);
            let (ok, out) = lab.ping(&pod_name(lab, from), dst).unwrap();
            assert!(ok, "{from}'s pod -> {to}'s pod {dst}: {out}\n{}", logs(lab));
        }
    }
}

/// The pods of master01 and node01 (one subnet) ping each other over `version`.
fn pods_on_one_subnet_ping(lab: &Lab, version: IpVersion) {
    for (from, to) in [("master01", "node01"), ("node01", "master01")] {
        let dst = pod_ip(lab, to, version);
        let (ok, out) = lab.ping(&pod_name(lab, from), dst).unwrap();
        assert!(ok, "{from}'s pod -> {to}'s pod {dst}: {out}\n{}", logs(lab));
    }
}

#[test]
fn dual_stack_three_agents_program_both_families_and_pods_ping_over_ipv6() {
    if !can_run("dual_stack_three_agents_program_both_families_and_pods_ping_over_ipv6") {
        return;
    }
    let lab = converged_lab("dual", Family::Dual);
    kernel_tables_are_the_plans(&lab);
    pods_ping_over_ipv6(&lab);
    pods_on_one_subnet_ping(&lab, IpVersion::V4);
    // IPv4 across the router (IPIP, CrossSubnet), where tunl0 exists on both ends.
    if lab.has_tunnel_device("master01") && lab.has_tunnel_device("node02") {
        let dst = pod_ip(&lab, "node02", IpVersion::V4);
        let (ok, out) = lab.ping(&pod_name(&lab, "master01"), dst).unwrap();
        assert!(ok, "master01's pod -> node02's pod {dst}: {out}");
    }

    // master01's addresses are the smallest in both families (string order, as Calico
    // compares them), so it is the passive side of all four of its sessions: it never
    // connects, and its one listener accepted the IPv4 and the IPv6 sessions at once.
    let st = lab.node_status("master01").unwrap();
    let mut inbound: Vec<(String, String, bool)> = st
        .peers
        .iter()
        .filter(|p| p.peer_type == PEER_TYPE_MESH)
        .map(|p| (p.address.clone(), p.state.clone(), p.passive))
        .collect();
    inbound.sort();
    let est = |a: &str| (a.to_string(), "Established".to_string(), true);
    assert_eq!(
        inbound,
        vec![
            est("192.168.92.129"),
            est("192.168.93.130"),
            est("fd00:92::129"),
            est("fd00:93::130"),
        ],
        "{:#?}",
        st.peers
    );
    assert_eq!(st.ipv4.as_deref(), Some("192.168.92.128/24"));
    assert_eq!(st.ipv6.as_deref(), Some("fd00:92::128/64"));
}

#[test]
fn ipv6_only_three_agents_route_without_any_ipv4_and_pods_ping() {
    if !can_run("ipv6_only_three_agents_route_without_any_ipv4_and_pods_ping") {
        return;
    }
    let lab = converged_lab("v6", Family::Ipv6);
    kernel_tables_are_the_plans(&lab);
    pods_ping_over_ipv6(&lab);
    for node in ["master01", "node01", "node02"] {
        let st = lab.node_status(node).unwrap();
        assert_eq!(st.ipv4, None, "{node}");
        assert_eq!(st.router_id, hash_router_id(node).to_string(), "{node}");
        let mut peers: Vec<String> = st
            .peers
            .iter()
            .filter(|p| p.state == "Established")
            .map(|p| p.address.clone())
            .collect();
        peers.sort();
        let want: Vec<String> = lab
            .spec
            .nodes
            .iter()
            .filter(|n| n.name != node)
            .map(|n| n.addr6.unwrap().addr().to_string())
            .collect();
        assert_eq!(peers, want, "{node}");
        // No IPv4 address on the node at all (lo's 127.0.0.1 aside).
        let v4 = podroute::lab::ip(
            &lab.node_ns(node),
            &["-4", "-o", "addr", "show", "dev", "ens33"],
        )
        .unwrap();
        assert!(v4.trim().is_empty(), "{node} has IPv4 on ens33: {v4}");
    }

    // The underlay changes: master01 reaches node02's subnet through node01 now. The route
    // to node02's block follows (its next hop is looked up again), and goes back when the
    // underlay route is removed.
    let ns = lab.node_ns("master01");
    let underlay = ["-6", "route", "add", "fd00:93::/64", "via", "fd00:92::129"];
    podroute::lab::ip(&ns, &underlay).unwrap();
    let block = "fd00:172:16:10::/122";
    let via = |gw: &str| format!("{block} via {gw} dev ens33");
    let wait_for = |line: String| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !lab.kernel_routes("master01").unwrap().contains(&line) {
            assert!(
                std::time::Instant::now() < deadline,
                "master01 never got {line:?}: {:#?}\n{}",
                lab.kernel_routes("master01").unwrap(),
                logs(&lab)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(via("fd00:92::129"));
    let dst = pod_ip(&lab, "node02", IpVersion::V6);
    let (ok, out) = lab.ping(&pod_name(&lab, "master01"), dst).unwrap();
    assert!(
        ok,
        "master01's pod -> node02's pod {dst} through node01: {out}"
    );
    podroute::lab::ip(&ns, &["-6", "route", "del", "fd00:93::/64"]).unwrap();
    wait_for(via("fd00:92::1"));
}

#[test]
fn an_ipv4_never_pool_is_routed_across_the_router_via_recursive_next_hops() {
    if !can_run("an_ipv4_never_pool_is_routed_across_the_router_via_recursive_next_hops") {
        return;
    }
    // The seed with `ipipMode: Never`: no tunnel; the router knows the blocks (as a ToR).
    let mut spec = ClusterSpec::seed();
    spec.ipip_mode = EncapMode::Never;
    let cfg = LabConfig::new(prefix("v4never"), env!("CARGO_BIN_EXE_podroute"));
    let mut lab = Lab::build(cfg, spec).expect("build the lab");
    lab.start_agents().expect("start the agents");
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    for node in ["master01", "node01", "node02"] {
        assert_eq!(
            lab.kernel_routes(node).unwrap(),
            lab.expected_kernel_routes(node).unwrap(),
            "{node}"
        );
    }
    let have = lab.kernel_routes("master01").unwrap();
    let line = "172.16.10.0/26 via 192.168.92.1 dev ens33".to_string();
    assert!(have.contains(&line), "{have:#?}");
    assert!(
        !lab.has_tunnel_device("master01"),
        "no tunl0 with a Never pool"
    );
    let dst = pod_ip(&lab, "node02", IpVersion::V4);
    let (ok, out) = lab.ping(&pod_name(&lab, "master01"), dst).unwrap();
    assert!(
        ok,
        "master01's pod -> node02's pod {dst} through the router: {out}"
    );
}

/// A `PATH` holding only `ip` (a symlink to the real one): no `ping`, no `sysctl`.
fn path_with_only_ip(dir: &Path) -> String {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("iproute2's ip is installed (checked by can_run)");
    std::os::unix::fs::symlink(ip, dir.join("ip")).unwrap();
    dir.display().to_string()
}

#[test]
fn the_lab_pings_without_a_ping_program_and_exits_2_without_ip() {
    if !can_run("the_lab_pings_without_a_ping_program_and_exits_2_without_ip") {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_podroute");
    // Without `ip`: nothing is built, exit 2 naming the package.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args(["lab", "--prefix", &prefix("noip")])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`ip`") && stderr.contains("iproute2"),
        "{stderr}"
    );

    // With `ip` only: the IPv6-only lab runs, and its pings (the lab's own ICMPv6 echo) pass.
    let only_ip = tempfile::tempdir().unwrap();
    let path = path_with_only_ip(only_ip.path());
    let out = Command::new(bin)
        .args(["lab", "--family", "ipv6", "--prefix", &prefix("noping")])
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let pings = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("PASS  ping pod"))
        .count();
    // Every pod to every other pod over IPv6, across the router too.
    assert_eq!(pings, 6, "{stdout}");
    assert!(
        stdout.contains("PASS  IPv6 routes as planned in every node's kernel"),
        "{stdout}"
    );
}
