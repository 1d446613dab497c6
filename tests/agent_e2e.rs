//! End to end: real `podroute agent` processes, one per node namespace of the lab cluster
//! (`podroute::lab`, the same cluster `podroute lab` builds): master01 and node01 on
//! 192.168.92.0/24, node02 on 192.168.93.0/24 behind a router namespace; pool
//! 172.16.0.0/16 `ipipMode: CrossSubnet`; one pod per node; the YAML-directory datastore.
//!
//! Root only: without root the tests print a loud SKIP, and with `CI=true` they fail instead.
//! Each test builds its own lab under a unique namespace prefix (tests run in parallel) and
//! removes it when it ends, also when it fails.
//!
//! Every address used lives only inside namespaces these tests create; packets are sent only
//! between such namespaces.
//!
//! This kernel has no `ipip` module: `tunl0` cannot be made, so the routes through it are
//! expected to be reported as not installed, and pod traffic across the router is not
//! checked (a userspace tunl0 is issue 6). Where `ip link add type ipip` works, the tunnel
//! routes must be in the kernel instead.

mod agent_guard;

use agent_guard::{in_path, tool_works};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use podroute::agent::status::AgentStatus;
use podroute::lab::{
    BgpPeerSpec, ClusterSpec, Lab, LabConfig, PEER_TYPE_GLOBAL, PEER_TYPE_MESH, WaitError,
    wait_until,
};

/// Longest wait for a mesh to converge; typically 1-3 s.
const CONVERGE: Duration = Duration::from_secs(45);
/// Longest wait for a datastore change to reach every node's routes (the agents poll the
/// directory every 200 ms).
const CHANGE: Duration = Duration::from_secs(15);

const MASTER01: &str = "master01";
const NODE01: &str = "node01";
const NODE02: &str = "node02";
const BLOCK_MASTER01: &str = "172.16.241.64/26";
const BLOCK_NODE01: &str = "172.16.196.128/26";
const BLOCK_NODE02: &str = "172.16.10.0/26";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn cannot_run(test: &str, why: &str, need: &str) {
    agent_guard::cannot_run("end-to-end", test, why, need);
}

/// Root and `ip` are there (else SKIP, or panic with `CI=true`); the lab pings by itself.
fn can_run(test: &str) -> bool {
    if !podroute::lab::is_root() {
        cannot_run(
            test,
            "not running as root",
            "These tests need root (network namespaces, veth, routes).",
        );
        return false;
    }
    if !tool_works("ip", "-V") {
        cannot_run(test, "iproute2 `ip` is missing", "Install iproute2.");
        return false;
    }
    true
}

/// A lab of the seed cluster with a prefix unique to this test and process, agents started
/// and converged (every node: two Established mesh peers and exactly the planned routes).
/// On failure the agents' logs are in the panic message.
fn converged_lab(tag: &str) -> Lab {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("e2e{}{n}-{tag}", std::process::id());
    let cfg = LabConfig::new(prefix, env!("CARGO_BIN_EXE_podroute"));
    let mut lab = Lab::build(cfg, ClusterSpec::seed()).expect("build the lab");
    lab.start_agents().expect("start the agents");
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    lab
}

/// The tail of every agent's log, for failure messages.
fn logs(lab: &Lab) -> String {
    lab.spec
        .nodes
        .iter()
        .map(|n| {
            format!(
                "--- {} ({}):\n{}",
                n.name,
                lab.log_path(&n.name).display(),
                lab.log_tail(&n.name, 25)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn status(lab: &Lab, node: &str) -> AgentStatus {
    lab.node_status(node)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)))
}

fn cali(lab: &Lab, node: &str) -> String {
    lab.spec.node(node).unwrap().pods[0].interface()
}

fn pod_ip(lab: &Lab, node: &str) -> Ipv4Addr {
    lab.spec.node(node).unwrap().pods[0].ip
}

fn pod_name(lab: &Lab, node: &str) -> String {
    lab.spec.node(node).unwrap().pods[0].name.clone()
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

/// Polls `check` until it holds; panics with the last reason and the agents' logs.
fn eventually(
    lab: &Lab,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    if let Err(e) = wait_until(what, timeout, || check().map_err(WaitError::Pending)) {
        panic!("{e}\n{}", logs(lab));
    }
}

#[test]
fn three_agents_reach_a_full_mesh() {
    if !can_run("three_agents_reach_a_full_mesh") {
        return;
    }
    let lab = converged_lab("mesh");
    for node in &lab.spec.nodes {
        // The dataplane's blocking netlink calls run on their own thread, not on a worker of
        // the speaker's runtime.
        let pid = lab.pid(&node.name).expect("agent pid");
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("agent's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|comm| comm.trim().to_string())
            .collect();
        assert!(
            threads
                .iter()
                .any(|t| t == podroute::agent::DATAPLANE_THREAD),
            "{}: no dataplane thread among {threads:?}",
            node.name
        );
        let s = status(&lab, &node.name);
        assert_eq!(s.node, node.name);
        assert_eq!(s.ipv4.as_deref(), Some(node.addr.to_string().as_str()));
        assert_eq!(s.as_number, 64512);
        let mut mesh: Vec<(String, String, u32, String)> = s
            .peers
            .iter()
            .filter(|p| p.peer_type == PEER_TYPE_MESH)
            .map(|p| {
                (
                    p.name.clone(),
                    p.address.clone(),
                    p.remote_as,
                    p.state.clone(),
                )
            })
            .collect();
        mesh.sort();
        let mut want: Vec<(String, String, u32, String)> = lab
            .spec
            .nodes
            .iter()
            .filter(|o| o.name != node.name)
            .map(|o| {
                (
                    o.name.clone(),
                    o.ip().to_string(),
                    64512,
                    "Established".into(),
                )
            })
            .collect();
        want.sort();
        assert_eq!(mesh, want, "mesh peers of {}: {:#?}", node.name, s.peers);
        assert_eq!(s.peers.len(), 2, "no other peers: {:#?}", s.peers);
    }
    // Each side of a session has the other's block, one each way (iBGP: learned routes are
    // not passed on to other mesh peers). The counts are republished at least once a second.
    eventually(&lab, "one block each way on every session", CHANGE, || {
        let mut wrong = Vec::new();
        for node in &lab.spec.nodes {
            let s = lab.node_status(&node.name).map_err(|e| e.to_string())?;
            for p in &s.peers {
                if (
                    p.prefixes_received,
                    p.prefixes_accepted,
                    p.prefixes_advertised,
                ) != (1, 1, 1)
                {
                    wrong.push(format!(
                        "{} <-> {}: received {}, accepted {}, advertised {}",
                        node.name,
                        p.name,
                        p.prefixes_received,
                        p.prefixes_accepted,
                        p.prefixes_advertised
                    ));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("\n"))
        }
    });
}

#[test]
fn kernel_tables_are_the_plans_and_tunnel_routes_are_reported_honestly() {
    if !can_run("kernel_tables_are_the_plans_and_tunnel_routes_are_reported_honestly") {
        return;
    }
    let lab = converged_lab("routes");
    // `ip route show proto 157` per node, written out by hand (CrossSubnet: direct within
    // 192.168.92.0/24, tunl0 across the router).
    let tables = [
        (
            MASTER01,
            vec![
                format!("blackhole {BLOCK_MASTER01}"),
                format!("172.16.241.65 dev {} scope link", cali(&lab, MASTER01)),
                format!("{BLOCK_NODE01} via 192.168.92.129 dev ens33"),
                format!("{BLOCK_NODE02} via 192.168.93.130 dev tunl0 onlink"),
            ],
        ),
        (
            NODE01,
            vec![
                format!("blackhole {BLOCK_NODE01}"),
                format!("172.16.196.129 dev {} scope link", cali(&lab, NODE01)),
                format!("{BLOCK_MASTER01} via 192.168.92.128 dev ens33"),
                format!("{BLOCK_NODE02} via 192.168.93.130 dev tunl0 onlink"),
            ],
        ),
        (
            NODE02,
            vec![
                format!("blackhole {BLOCK_NODE02}"),
                format!("172.16.10.1 dev {} scope link", cali(&lab, NODE02)),
                format!("{BLOCK_MASTER01} via 192.168.92.128 dev tunl0 onlink"),
                format!("{BLOCK_NODE01} via 192.168.92.129 dev tunl0 onlink"),
            ],
        ),
    ];
    for (node, table) in tables {
        // The hand-written table is the plan's.
        let plan = lab.spec.expected_plan(node).unwrap();
        assert_eq!(
            sorted(plan.lines()),
            sorted(table.clone()),
            "plan of {node}"
        );

        // tunl0 is the kernel's where it can make ipip devices; elsewhere it is missing (or,
        // once there is one, the userspace tunnel's).
        let tunnel = lab.has_tunnel_device(node);
        if lab.ipip_available() {
            assert!(
                tunnel,
                "{node}: this kernel can make ipip devices, but no tunl0"
            );
        }
        let in_kernel: Vec<String> = table
            .iter()
            .filter(|l| tunnel || !l.contains("dev tunl0"))
            .cloned()
            .collect();
        assert_eq!(
            lab.kernel_routes(node).unwrap(),
            sorted(in_kernel),
            "kernel routes of {node} (tunl0 {})",
            if tunnel { "present" } else { "missing" }
        );

        let report = lab.routes(node).unwrap();
        assert_eq!(report.node, node);
        assert_eq!(report.routes.len(), 4, "{node}: {:#?}", report.routes);
        for row in &report.routes {
            let via_tunnel = row.device.as_deref() == Some("tunl0");
            if via_tunnel && !tunnel {
                assert!(!row.installed, "{node}: {row:?} cannot be in the kernel");
                let error = row.error.as_deref().unwrap_or_default();
                assert!(
                    error.contains("tunl0"),
                    "{node}: the error of {} names the missing device: {error:?}",
                    row.prefix
                );
                assert_eq!(row.kind, "block-ipip");
            } else {
                assert!(row.installed, "{node}: {row:?}");
                assert_eq!(row.error, None);
            }
        }
        let s = status(&lab, node);
        let failed = if tunnel {
            0
        } else {
            table.iter().filter(|l| l.contains("tunl0")).count()
        };
        assert_eq!(
            (
                s.dataplane.programmed,
                s.dataplane.desired_routes,
                s.dataplane.failed_routes
            ),
            (true, 4, failed),
            "{node}: {:?}",
            s.dataplane
        );
        assert_eq!(s.nic.as_deref(), Some("ens33"));
    }
}

#[test]
fn pods_on_one_subnet_ping_each_other() {
    if !can_run("pods_on_one_subnet_ping_each_other") {
        return;
    }
    let lab = converged_lab("ping");
    for (from, to) in [(MASTER01, NODE01), (NODE01, MASTER01)] {
        let (ok, out) = lab.ping(&pod_name(&lab, from), pod_ip(&lab, to)).unwrap();
        assert!(
            ok,
            "pod on {from} -> pod on {to} over the direct route:\n{out}"
        );
    }
    // The underlay across the router works: the path IPIP packets to node02 would take.
    let (ok, out) = lab
        .ping_from_node(MASTER01, lab.spec.node(NODE02).unwrap().ip())
        .unwrap();
    assert!(ok, "master01 -> node02 through the router:\n{out}");
    if lab.has_tunnel_device(MASTER01) && lab.has_tunnel_device(NODE02) {
        for (from, to) in [(MASTER01, NODE02), (NODE02, NODE01)] {
            let (ok, out) = lab.ping(&pod_name(&lab, from), pod_ip(&lab, to)).unwrap();
            assert!(ok, "pod on {from} -> pod on {to} through tunl0:\n{out}");
        }
    } else {
        eprintln!(
            "NOTE: pod traffic to and from node02 (across the router) is not tested: it needs \
             tunl0, and this kernel has no ipip module (userspace tunl0: issue 6)."
        );
    }
}

#[test]
fn removing_a_block_withdraws_its_routes_everywhere() {
    if !can_run("removing_a_block_withdraws_its_routes_everywhere") {
        return;
    }
    let mut lab = converged_lab("withdraw");
    let has = |lab: &Lab, node: &str, prefix: &str| -> bool {
        lab.kernel_routes(node)
            .unwrap()
            .iter()
            .any(|l| l.split_whitespace().any(|w| w == prefix))
    };
    let tunnel = lab.has_tunnel_device(NODE02);
    assert!(has(&lab, MASTER01, BLOCK_NODE01));
    assert!(has(&lab, NODE01, BLOCK_NODE01));

    // node01's IPAMBlock (and its BlockAffinity) leave the datastore.
    lab.remove_block(NODE01).unwrap();
    eventually(&lab, "node01's block withdrawn everywhere", CHANGE, || {
        let mut left = Vec::new();
        if has(&lab, MASTER01, BLOCK_NODE01) {
            left.push("master01 still routes it");
        }
        if has(&lab, NODE01, BLOCK_NODE01) {
            left.push("node01 still blackholes it");
        }
        let report = lab.routes(NODE02).map_err(|e| e.to_string())?;
        if report.routes.iter().any(|r| r.prefix == BLOCK_NODE01) {
            left.push("node02 still plans a route to it");
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join("; "))
        }
    });
    // Exactly that: every table is the plan of the smaller cluster (node01's pod lost its
    // address with the block, so its /32 went too).
    for node in [MASTER01, NODE01, NODE02] {
        assert_eq!(
            lab.kernel_routes(node).unwrap(),
            lab.expected_kernel_routes(node).unwrap(),
            "{node} after the withdrawal"
        );
        lab.routes_match_plan(node, &lab.routes(node).unwrap())
            .unwrap_or_else(|e| panic!("{node}: {e}"));
    }
    let mut expected: Vec<String> = vec![format!("{BLOCK_MASTER01} via 192.168.92.128 dev ens33")]
        .into_iter()
        .chain(tunnel.then(|| format!("{BLOCK_NODE02} via 192.168.93.130 dev tunl0 onlink")))
        .collect();
    expected.sort();
    assert_eq!(lab.kernel_routes(NODE01).unwrap(), expected);
    // The session stays up; only the block is withdrawn (the status is republished at
    // least once a second, so poll).
    eventually(&lab, "master01 shows no prefix from node01", CHANGE, || {
        let s = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
        match s.peers.iter().find(|p| p.name == NODE01) {
            Some(p) if p.state == "Established" && p.prefixes_received == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // Given back, it comes back everywhere.
    let block = ClusterSpec::seed().node(NODE01).unwrap().block;
    lab.update_spec(|spec| spec.node_mut(NODE01).unwrap().block = block)
        .unwrap();
    eventually(&lab, "node01's block back everywhere", CHANGE, || {
        let pending: Vec<String> = [MASTER01, NODE01, NODE02]
            .iter()
            .filter_map(|n| lab.node_converged(n).err())
            .collect();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.join("\n"))
        }
    });
    let (ok, out) = lab
        .ping(&pod_name(&lab, MASTER01), pod_ip(&lab, NODE01))
        .unwrap();
    assert!(ok, "pods talk again:\n{out}");
}

/// BIRD 2 as a ToR router on 192.168.92.0/24 (namespace `PREFIX-tor`, 192.168.92.250, AS
/// 65001), one eBGP session per node, importing everything and exporting nothing. node02 is
/// one router hop away: its session is `multihop`, its next hop resolved through a static
/// route to 192.168.93.0/24 in BIRD's own table (no kernel protocol: BIRD writes no routes).
struct Tor {
    ns: String,
    socket: PathBuf,
}

const TOR_ADDR: &str = "192.168.92.250";
const TOR_AS: u32 = 65001;

fn bird_conf(lab: &Lab, log: &Path) -> String {
    let mut s = format!(
        "log \"{}\" all;\nrouter id {TOR_ADDR};\nprotocol device {{ scan time 2; }}\n\
         protocol direct {{ ipv4; interface \"eth0\"; }}\n\
         protocol static {{ ipv4; route 192.168.93.0/24 via 192.168.92.1; }}\n",
        log.display()
    );
    for n in &lab.spec.nodes {
        let same = n.addr.trunc() == "192.168.92.0/24".parse().unwrap();
        s += &format!(
            "protocol bgp {name} {{\n  local {TOR_ADDR} as {TOR_AS};\n  neighbor {ip} as {asn};\n  \
             {hop}\n  hold time 9;\n  connect delay time 1;\n  connect retry time 1;\n  \
             error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n",
            name = n.name,
            ip = n.ip(),
            asn = lab.spec.as_number,
            hop = if same { "direct;" } else { "multihop;" },
        );
    }
    s
}

fn have_bird(test: &str) -> bool {
    let ok = tool_works("bird", "--version") && in_path("birdc");
    if !ok {
        cannot_run(
            test,
            "BIRD 2 (`bird`, `birdc`) is missing",
            "Install bird2 (tests/run.sh does).",
        );
    }
    ok
}

fn start_tor(lab: &mut Lab) -> Tor {
    let ns = lab
        .attach_host("tor", format!("{TOR_ADDR}/24").parse().unwrap())
        .unwrap();
    let dir = lab.workdir().join("tor");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("bird.conf");
    let socket = dir.join("bird.ctl");
    std::fs::write(&conf, bird_conf(lab, &dir.join("bird.log"))).unwrap();
    let (ok, out) =
        podroute::lab::exec(&ns, "bird", &["-p", "-c", conf.to_str().unwrap()]).unwrap();
    assert!(ok, "bird.conf does not parse:\n{out}");
    lab.spawn(
        "bird",
        &ns,
        Path::new("bird"),
        &[
            "-f".into(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            socket.display().to_string(),
        ],
    )
    .unwrap();
    // The global BGPPeer: every node peers with the ToR.
    lab.update_spec(|spec| {
        spec.peers.push(BgpPeerSpec {
            name: "tor".into(),
            peer_ip: TOR_ADDR.parse().unwrap(),
            as_number: TOR_AS,
        })
    })
    .unwrap();
    Tor { ns, socket }
}

fn birdc(tor: &Tor, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-s", tor.socket.to_str().unwrap()];
    all.extend_from_slice(args);
    match podroute::lab::exec(&tor.ns, "birdc", &all) {
        Ok((true, out)) => Ok(out),
        Ok((false, out)) => Err(out),
        Err(e) => Err(e.to_string()),
    }
}

/// Every node has the ToR as an Established `global` peer.
fn wait_tor_established(lab: &Lab) {
    eventually(lab, "every node Established with the ToR", CONVERGE, || {
        let mut pending = Vec::new();
        for n in &lab.spec.nodes {
            let s = lab.node_status(&n.name).map_err(|e| e.to_string())?;
            match s.peers.iter().find(|p| p.address == TOR_ADDR) {
                Some(p) if p.state == "Established" && p.peer_type == PEER_TYPE_GLOBAL => {}
                other => pending.push(format!("{}: {other:?}", n.name)),
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.join("\n"))
        }
    });
}

#[test]
fn a_global_bgppeer_makes_every_agent_peer_with_bird_which_learns_every_block() {
    const TEST: &str = "a_global_bgppeer_makes_every_agent_peer_with_bird_which_learns_every_block";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = converged_lab("bird");
    let tor = start_tor(&mut lab);
    wait_tor_established(&lab);
    // Over each node's session BIRD has that node's own block with the node's address as BGP
    // next hop (and, as eBGP goes, the blocks the node learned from its mesh peers).
    let own = [
        (MASTER01, BLOCK_MASTER01, "192.168.92.128"),
        (NODE01, BLOCK_NODE01, "192.168.92.129"),
        (NODE02, BLOCK_NODE02, "192.168.93.130"),
    ];
    eventually(
        &lab,
        "BIRD learns every block from its node",
        CHANGE,
        || {
            for (node, block, next_hop) in own {
                let out = birdc(&tor, &["show", "route", "all", "protocol", node])?;
                let Some(entry) = route_entry(&out, block) else {
                    return Err(format!("no {block} from {node}:\n{out}"));
                };
                if !entry.contains(&format!("BGP.next_hop: {next_hop}")) {
                    return Err(format!("{block} from {node} not via {next_hop}:\n{entry}"));
                }
                if !entry.contains("BGP.as_path: 64512\n") && !entry.ends_with("BGP.as_path: 64512")
                {
                    return Err(format!(
                        "{block} from {node}: AS path is not 64512:\n{entry}"
                    ));
                }
            }
            Ok(())
        },
    );
    let summary = birdc(&tor, &["show", "protocols"]).unwrap();
    for n in [MASTER01, NODE01, NODE02] {
        let line = summary
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_default();
        assert!(
            line.contains("Established"),
            "BIRD's session to {n}: {summary}"
        );
    }
    // What BIRD got over each session is what the agent says it advertised; BIRD exports
    // nothing, so the agents learned nothing from it and their tables are as before.
    for n in [MASTER01, NODE01, NODE02] {
        let s = status(&lab, n);
        let tor_row = s.peers.iter().find(|p| p.address == TOR_ADDR).unwrap();
        assert_eq!(tor_row.remote_as, TOR_AS);
        assert_eq!(tor_row.name, "tor");
        assert_eq!(tor_row.prefixes_received, 0);
        let count = birdc(&tor, &["show", "route", "count", "protocol", n]).unwrap();
        let bird_has = routes_in_count(&count);
        assert_eq!(
            tor_row.prefixes_advertised, bird_has,
            "{n} advertised to the ToR what BIRD holds from it:\n{count}"
        );
        assert!(tor_row.prefixes_advertised >= 1);
        assert_eq!(
            lab.kernel_routes(n).unwrap(),
            lab.expected_kernel_routes(n).unwrap()
        );
    }
}

/// The number of routes in `birdc show route count` output ("3 of 3 routes for 3 networks
/// in table master4").
fn routes_in_count(out: &str) -> usize {
    out.lines()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [n, "of", _, "routes", ..] => n.parse().ok(),
                _ => None,
            }
        })
        .unwrap_or(0)
}

/// The lines of one route in `birdc show route all` output: from the line naming `prefix`
/// to the next route.
fn route_entry(out: &str, prefix: &str) -> Option<String> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with(prefix));
    let first = lines.next()?;
    let rest: Vec<&str> = lines
        .take_while(|l| l.starts_with(' ') || l.starts_with('\t'))
        .collect();
    Some(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// One sample of the text exposition: the value of the series `name{labels}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_and_status_show_peers_and_routes() {
    const TEST: &str = "metrics_and_status_show_peers_and_routes";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = converged_lab("metrics");
    start_tor(&mut lab);
    wait_tor_established(&lab);
    let tunnel = lab.has_tunnel_device(MASTER01);

    let text = lab.metrics(MASTER01).unwrap();
    let get = |series: &str| {
        metric(&text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
    };
    for peer in ["192.168.92.129", "192.168.93.130"] {
        assert_eq!(
            get(&format!(
                "podroute_bgp_peer_up{{peer=\"{peer}\",peer_type=\"mesh\"}}"
            )),
            1.0
        );
        assert_eq!(
            get(&format!(
                "podroute_bgp_peer_state{{peer=\"{peer}\",peer_type=\"mesh\"}}"
            )),
            6.0
        );
        assert_eq!(
            get(&format!(
                "podroute_bgp_prefixes_received{{peer=\"{peer}\",peer_type=\"mesh\"}}"
            )),
            1.0
        );
        assert!(
            get(&format!(
                "podroute_bgp_session_establishments_total{{peer=\"{peer}\",peer_type=\"mesh\"}}"
            )) >= 1.0
        );
    }
    assert_eq!(
        get(&format!(
            "podroute_bgp_peer_up{{peer=\"{TOR_ADDR}\",peer_type=\"global\"}}"
        )),
        1.0
    );
    // Its own block and the two it learned from the mesh (eBGP passes learned routes on).
    assert_eq!(
        get(&format!(
            "podroute_bgp_prefixes_advertised{{peer=\"{TOR_ADDR}\",peer_type=\"global\"}}"
        )),
        3.0
    );
    assert_eq!(get("podroute_routes_programmed{kind=\"blackhole\"}"), 1.0);
    assert_eq!(get("podroute_routes_programmed{kind=\"workload\"}"), 1.0);
    assert_eq!(
        get("podroute_routes_programmed{kind=\"block-direct\"}"),
        1.0
    );
    assert_eq!(get("podroute_routes_desired"), 4.0);
    assert_eq!(
        get("podroute_routes_failed"),
        if tunnel { 0.0 } else { 1.0 }
    );
    if tunnel {
        assert_eq!(get("podroute_routes_programmed{kind=\"block-ipip\"}"), 1.0);
    }
    assert_eq!(get("podroute_datastore_synced"), 1.0);
    assert_eq!(get("podroute_ready"), 1.0);
    assert!(get("podroute_reconcile_duration_seconds_count") >= 1.0);

    // `podroute status --output json`, run inside the node as a user would.
    let (ok, out) = podroute::lab::exec(
        &lab.node_ns(MASTER01),
        env!("CARGO_BIN_EXE_podroute"),
        &["status", "--output", "json"],
    )
    .unwrap();
    assert!(ok, "podroute status --output json:\n{out}");
    let s: AgentStatus = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let mut types: Vec<(String, String, String)> = s
        .peers
        .iter()
        .map(|p| (p.address.clone(), p.peer_type.clone(), p.state.clone()))
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            (
                "192.168.92.129".into(),
                PEER_TYPE_MESH.into(),
                "Established".into()
            ),
            (
                TOR_ADDR.into(),
                PEER_TYPE_GLOBAL.into(),
                "Established".into()
            ),
            (
                "192.168.93.130".into(),
                PEER_TYPE_MESH.into(),
                "Established".into()
            ),
        ]
    );
    assert!(s.health.live && s.health.ready, "{:?}", s.health);
    assert!(
        s.datastore.synced && s.datastore.rejected.is_empty(),
        "{:?}",
        s.datastore
    );
    assert!(
        s.datastore.source.starts_with("dir:"),
        "{}",
        s.datastore.source
    );

    // The table forms print the same peers and routes.
    let (ok, table) = podroute::lab::exec(
        &lab.node_ns(MASTER01),
        env!("CARGO_BIN_EXE_podroute"),
        &["status"],
    )
    .unwrap();
    assert!(ok, "{table}");
    for want in ["node-to-node mesh", "global", "Established", TOR_ADDR] {
        assert!(
            table.contains(want),
            "podroute status lacks {want:?}:\n{table}"
        );
    }
    let (ok, routes) = podroute::lab::exec(
        &lab.node_ns(MASTER01),
        env!("CARGO_BIN_EXE_podroute"),
        &["routes"],
    )
    .unwrap();
    assert!(ok, "{routes}");
    for want in ["172.16.196.128", "192.168.92.129", &cali(&lab, MASTER01)] {
        assert!(
            routes.contains(want),
            "podroute routes lacks {want:?}:\n{routes}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// No transit (issue 15): node master01 peers eBGP with two ToRs; ToR-A sends a default route
// and an external /24. As with Calico's BIRD (`calico_export_to_bgp_peers`), ToR-B must get
// only pool routes from master01, and the mesh nodes must not get ToR-A's routes at all.

const TOR_A_ADDR: &str = "192.168.92.251";
const TOR_A_AS: u32 = 65010;
const TOR_B_ADDR: &str = "192.168.92.252";
const TOR_B_AS: u32 = 65020;
const EXTERNAL: &str = "198.51.100.0/24";

/// A BIRD 2 ToR peering with master01 only; `routes` are exported to it as static blackholes.
fn start_node_tor(lab: &mut Lab, name: &str, addr: &str, asn: u32, routes: &[&str]) -> Tor {
    start_node_tor_with(lab, name, addr, asn, routes, "", "")
}

/// [`start_node_tor`] with extra lines in BIRD's `protocol bgp` block and in the BGPPeer's
/// spec (indented by two spaces).
fn start_node_tor_with(
    lab: &mut Lab,
    name: &str,
    addr: &str,
    asn: u32,
    routes: &[&str],
    bird_extra: &str,
    peer_extra: &str,
) -> Tor {
    let ns = lab
        .attach_host(name, format!("{addr}/24").parse().unwrap())
        .unwrap();
    let dir = lab.workdir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("bird.conf");
    let socket = dir.join("bird.ctl");
    let master = lab.spec.node(MASTER01).unwrap().ip();
    let statics: String = routes
        .iter()
        .map(|r| format!("route {r} blackhole; "))
        .collect();
    let export = if routes.is_empty() { "none" } else { "all" };
    let text = format!(
        "log \"{log}\" all;\nrouter id {addr};\nprotocol device {{ scan time 2; }}\n\
         protocol static {{ ipv4; {statics}}}\n\
         protocol bgp {MASTER01} {{\n  local {addr} as {asn};\n  neighbor {master} as {cluster};\n  \
         direct;\n  hold time 9;\n  connect delay time 1;\n  connect retry time 1;\n  \
         error wait time 1, 5;\n  ipv4 {{ import all; export {export}; }};\n{bird_extra}}}\n",
        log = dir.join("bird.log").display(),
        cluster = lab.spec.as_number,
    );
    std::fs::write(&conf, text).unwrap();
    let (ok, out) =
        podroute::lab::exec(&ns, "bird", &["-p", "-c", conf.to_str().unwrap()]).unwrap();
    assert!(ok, "bird.conf does not parse:\n{out}");
    lab.spawn(
        name,
        &ns,
        Path::new("bird"),
        &[
            "-f".into(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            socket.display().to_string(),
        ],
    )
    .unwrap();
    let yaml = format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: {name}\n\
         spec:\n  asNumber: {asn}\n  peerIP: {addr}\n  node: {MASTER01}\n{peer_extra}"
    );
    lab.update_spec(|spec| {
        spec.extra_files
            .insert(format!("bgppeer-{name}.yaml"), yaml);
    })
    .unwrap();
    Tor { ns, socket }
}

#[test]
fn no_transit_between_tors_and_no_tor_route_reaches_the_mesh() {
    const TEST: &str = "no_transit_between_tors_and_no_tor_route_reaches_the_mesh";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = converged_lab("transit");
    let tor_a = start_node_tor(
        &mut lab,
        "tora",
        TOR_A_ADDR,
        TOR_A_AS,
        &["0.0.0.0/0", EXTERNAL],
    );
    let tor_b = start_node_tor(&mut lab, "torb", TOR_B_ADDR, TOR_B_AS, &[]);
    // master01 learned both routes from ToR-A (imports are Calico's `import all`)...
    eventually(&lab, "master01 learns ToR-A's two routes", CONVERGE, || {
        let s = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
        let row = |addr: &str| s.peers.iter().find(|p| p.address == addr).cloned();
        match (row(TOR_A_ADDR), row(TOR_B_ADDR)) {
            (Some(a), Some(b))
                if a.state == "Established"
                    && b.state == "Established"
                    && a.prefixes_received == 2 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    // ...and ToR-B gets exactly the three pool blocks: nothing of ToR-A's.
    let want = sorted(vec![
        BLOCK_MASTER01.to_string(),
        BLOCK_NODE01.to_string(),
        BLOCK_NODE02.to_string(),
    ]);
    eventually(&lab, "ToR-B holds the three blocks", CHANGE, || {
        let out = birdc(&tor_b, &["show", "route", "protocol", MASTER01])?;
        let mut got: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.contains('/'))
            .map(str::to_string)
            .collect();
        got.sort();
        if got == want {
            Ok(())
        } else {
            Err(format!("ToR-B has {got:?}:\n{out}"))
        }
    });
    let all = birdc(&tor_b, &["show", "route", "all"]).unwrap();
    assert!(
        !all.contains("0.0.0.0/0"),
        "ToR-B got the default route:\n{all}"
    );
    assert!(!all.contains(EXTERNAL), "ToR-B got ToR-A's /24:\n{all}");
    // ToR-A gets the blocks too, and never its own routes back.
    let a = birdc(&tor_a, &["show", "route", "protocol", MASTER01]).unwrap();
    assert!(a.contains(BLOCK_NODE01), "ToR-A:\n{a}");
    // The mesh nodes learn nothing from master01 but blocks: their kernels hold exactly the
    // plan (no default route via ToR-A, no external /24), and master01 advertised to them
    // only what the pool holds.
    for n in [NODE01, NODE02] {
        let routes = lab.kernel_routes(n).unwrap();
        assert!(
            !routes
                .iter()
                .any(|r| r.starts_with("default") || r.starts_with(EXTERNAL)),
            "{n} installed a ToR route: {routes:?}"
        );
        assert_eq!(routes, lab.expected_kernel_routes(n).unwrap(), "{n}");
        let s = status(&lab, n);
        let from_master = s
            .peers
            .iter()
            .find(|p| p.name.contains(MASTER01) || p.address == "192.168.92.128")
            .unwrap();
        assert_eq!(from_master.prefixes_received, 1, "{n}: {from_master:?}");
    }
    drop(tor_a);
}

/// A BGPPeer with a TCP-MD5 password from a Secret (in the YAML directory, as the lab's
/// datastore is one) and a BGPFilter: the session comes up only with the key, the filter's
/// import rule refuses one of the ToR's routes (counted in status), and its export rule keeps
/// one pool block from the ToR. A BGPPeer whose Secret key is missing is not peered with and
/// says so in `podroute status`.
#[test]
fn bgppeer_password_from_a_secret_and_a_bgpfilter() {
    const TEST: &str = "bgppeer_password_from_a_secret_and_a_bgpfilter";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = converged_lab("md5");
    lab.update_spec(|spec| {
        spec.extra_files.insert(
            "secret-bgp.yaml".into(),
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bgp-passwords\n  \
             namespace: podroute-system\nstringData:\n  tor-a: s3cret-key\n"
                .into(),
        );
        spec.extra_files.insert(
            "bgpfilter-tor.yaml".into(),
            format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPFilter\nmetadata:\n  name: tor\n\
                 spec:\n  importV4:\n  - action: Reject\n    matchOperator: Equal\n    \
                 cidr: {EXTERNAL}\n  exportV4:\n  - action: Reject\n    matchOperator: Equal\n    \
                 cidr: {BLOCK_NODE02}\n"
            ),
        );
    })
    .unwrap();
    let tor = start_node_tor_with(
        &mut lab,
        "tora",
        TOR_A_ADDR,
        TOR_A_AS,
        &["203.0.113.0/24", EXTERNAL],
        "  password \"s3cret-key\";\n",
        "  password:\n    secretKeyRef:\n      name: bgp-passwords\n      key: tor-a\n  \
         filters:\n  - tor\n",
    );
    // A second BGPPeer whose password key does not exist.
    lab.update_spec(|spec| {
        spec.extra_files.insert(
            "bgppeer-nokey.yaml".into(),
            format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: nokey\n\
                 spec:\n  asNumber: {TOR_B_AS}\n  peerIP: {TOR_B_ADDR}\n  node: {MASTER01}\n  \
                 password:\n    secretKeyRef:\n      name: bgp-passwords\n      key: missing\n"
            ),
        );
    })
    .unwrap();
    eventually(
        &lab,
        "master01 Established with ToR-A (TCP-MD5)",
        CONVERGE,
        || {
            let s = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
            match s.peers.iter().find(|p| p.address == TOR_A_ADDR) {
                Some(p)
                    if p.state == "Established"
                        && p.prefixes_accepted == 1
                        && p.routes_rejected_filter == 1 =>
                {
                    Ok(())
                }
                other => Err(format!(
                    "{other:?}\nrejected: {:?}\nwarnings: {:?}",
                    s.datastore.rejected, s.config_warnings
                )),
            }
        },
    );
    // The ToR has master01's own block and node01's, not node02's (export rule).
    eventually(
        &lab,
        "ToR-A holds exactly the allowed blocks",
        CHANGE,
        || {
            let out = birdc(&tor, &["show", "route", "protocol", MASTER01])?;
            let mut got: Vec<&str> = out
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| w.contains('/'))
                .collect();
            got.sort();
            let mut want = vec![BLOCK_MASTER01, BLOCK_NODE01];
            want.sort();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}\n{out}"))
            }
        },
    );
    let routes = lab.kernel_routes(MASTER01).unwrap();
    assert!(
        routes.iter().any(|r| r.starts_with("203.0.113.0/24")),
        "the accepted ToR route is installed: {routes:?}"
    );
    assert!(
        !routes.iter().any(|r| r.starts_with(EXTERNAL)),
        "the filtered ToR route is not: {routes:?}"
    );
    let s = status(&lab, MASTER01);
    assert!(
        s.peers.iter().all(|p| p.address != TOR_B_ADDR),
        "no session without the password it asks for: {:?}",
        s.peers
    );
    assert!(
        s.config_warnings
            .iter()
            .any(|w| w.contains("nokey") && w.contains("no key \"missing\"")),
        "{:?}",
        s.config_warnings
    );
    let metrics = lab.metrics(MASTER01).unwrap();
    assert_eq!(
        metric(&metrics, "podroute_config_warnings"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "podroute_bgp_routes_rejected_total{reason=\"import_filter\"}"
        ),
        Some(1.0)
    );
}

/// A lab Service: `(name, spec lines, status lines, [(endpoint node, ready)])`.
type LabService<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, bool)]);

/// Services and their EndpointSlices in the lab's datastore.
fn services_yaml(services: &[LabService]) -> String {
    let mut out = String::new();
    for (name, spec, status, endpoints) in services {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  ports: [{{port: 80}}]\n{spec}\n{status}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {name}-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nendpoints:\n"
        );
        for (i, (node, ready)) in endpoints.iter().enumerate() {
            out += &format!(
                "- addresses: [172.16.99.{i}]\n  nodeName: {node}\n  conditions: {{ready: {ready}}}\n"
            );
        }
    }
    out
}

const SERVICE_RANGES: [&str; 3] = ["10.96.0.0/12", "198.51.100.0/24", "203.0.113.0/24"];

/// The service prefixes BIRD holds from `node` (routes inside the service ranges).
fn bird_service_prefixes(tor: &Tor, node: &str) -> Result<Vec<String>, String> {
    let ranges: Vec<ipnet::Ipv4Net> = SERVICE_RANGES.iter().map(|r| r.parse().unwrap()).collect();
    let out = birdc(tor, &["show", "route", "protocol", node])?;
    let mut got: Vec<ipnet::Ipv4Net> = out
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next()?.parse::<ipnet::Ipv4Net>().ok())
        .filter(|p| ranges.iter().any(|r| r.contains(p)))
        .collect();
    got.sort();
    got.dedup();
    Ok(got.iter().map(ToString::to_string).collect())
}

#[test]
fn service_ips_reach_a_bird_tor_from_the_nodes_that_serve_them_and_are_withdrawn() {
    const TEST: &str =
        "service_ips_reach_a_bird_tor_from_the_nodes_that_serve_them_and_are_withdrawn";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = converged_lab("svc");
    let tor = start_tor(&mut lab);
    // The mesh off: each node's session to the ToR then carries only what that node
    // originates (with the mesh, a node passes its mesh peers' service routes on as well).
    let web = (
        "web",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [198.51.100.5, 192.0.2.99]\n  \
         externalTrafficPolicy: Local",
        "status:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.9}]",
        &[(MASTER01, true), (NODE01, false)][..],
    );
    let api = (
        "api",
        "  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Cluster",
        "",
        &[(NODE02, true)][..],
    );
    let cache = (
        "cache",
        "  clusterIP: 10.96.0.40\n  internalTrafficPolicy: Local",
        "",
        &[(NODE02, true)][..],
    );
    lab.update_spec(|spec| {
        spec.bgp_configuration_spec = Some(format!(
            "  asNumber: {}\n  nodeToNodeMeshEnabled: false\n  \
             serviceClusterIPs: [{{cidr: 10.96.0.0/12}}]\n  \
             serviceExternalIPs: [{{cidr: 198.51.100.0/24}}]\n  \
             serviceLoadBalancerIPs: [{{cidr: 203.0.113.0/24}}]",
            spec.as_number
        ));
        spec.extra_files
            .insert("services.yaml".into(), services_yaml(&[web, api, cache]));
    })
    .unwrap();
    wait_tor_established(&lab);
    let ranges: Vec<String> = SERVICE_RANGES.iter().map(|r| r.to_string()).collect();
    let with = |extra: &[&str]| -> Vec<String> {
        let mut all: Vec<ipnet::Ipv4Net> = ranges
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .map(|p| p.parse().unwrap())
            .collect();
        all.sort();
        all.iter().map(ToString::to_string).collect()
    };
    let expect = |lab: &Lab, what: &str, want: &[(&str, Vec<String>)]| {
        eventually(lab, what, CHANGE, || {
            for (node, prefixes) in want {
                let got = bird_service_prefixes(&tor, node)?;
                if &got != prefixes {
                    return Err(format!("from {node}: BIRD has {got:?}, want {prefixes:?}"));
                }
            }
            Ok(())
        });
    };
    expect(
        &lab,
        "BIRD learns the ranges from every node and web's /32s from master01 only",
        &[
            (
                MASTER01,
                with(&["10.96.0.10/32", "198.51.100.5/32", "203.0.113.9/32"]),
            ),
            (NODE01, with(&[])),
            (NODE02, with(&["10.96.0.40/32"])),
        ],
    );
    // The agent says what it advertises and why.
    let s = status(&lab, MASTER01);
    let row = s
        .service_prefixes
        .iter()
        .find(|r| r.prefix == "203.0.113.9/32")
        .unwrap_or_else(|| panic!("{:?}", s.service_prefixes));
    assert!(
        row.reasons.iter().any(|r| r.contains("shop/web")),
        "{row:?}"
    );
    // No node routes a service range it announces itself to another node.
    for n in [MASTER01, NODE01, NODE02] {
        let routes = lab.kernel_routes(n).unwrap();
        assert!(
            !routes.iter().any(|r| r.starts_with("10.96.0.0/12")),
            "{n}: {routes:#?}"
        );
    }

    // web is deleted: master01 withdraws its /32s; the others are unchanged.
    lab.update_spec(|spec| {
        spec.extra_files
            .insert("services.yaml".into(), services_yaml(&[api, cache]));
    })
    .unwrap();
    expect(
        &lab,
        "web's /32s withdrawn",
        &[
            (MASTER01, with(&[])),
            (NODE01, with(&[])),
            (NODE02, with(&["10.96.0.40/32"])),
        ],
    );
}
