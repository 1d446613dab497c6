//! A mixed cluster during a migration: node01 of the lab runs BIRD 1.6 configured as Calico's
//! confd renders it for the node-to-node mesh (a calico-node that has not moved yet), master01
//! and node02 run podroute. Blocks go both ways, and each side's graceful restart keeps the
//! other's routes: a SIGKILLed podroute agent keeps its block in BIRD's table, a SIGKILLed and
//! restarted BIRD keeps its block in the podroute nodes' kernels.
//!
//! BIRD 1.6 is Debian's `bird` package, which conflicts with `bird2` as a package:
//! tests/run.sh downloads it (`apt-get download bird`) and unpacks it with `dpkg -x` into
//! `$PODROUTE_BIRD16_DIR` (default `/var/cache/podroute-test/bird1`), whose `usr/sbin/bird`
//! and `usr/sbin/birdc` this test runs. Root only; without root or BIRD 1.6 the test prints a
//! loud SKIP, and with `CI=true` it fails instead.
//!
//! The configuration is Calico's templates (`bird.cfg`, `bird_aggr.cfg`, `bird_ipam.cfg` of
//! confd) rendered for node01, with two departures that stock BIRD 1.6 needs: Calico's BIRD
//! fork has a `krt_tunnel` route attribute (the kernel filter sets it to `tunl0` for routes off
//! the node's subnet) that stock BIRD lacks, and `bfd graceful` is left out with BFD.
//!
//! Every address lives inside namespaces the test creates.

mod agent_guard;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podroute::lab::{ClusterSpec, Lab, LabConfig, PEER_TYPE_MESH, WaitError, wait_until};

const CONVERGE: Duration = Duration::from_secs(60);
const MASTER01: &str = "master01";
const NODE01: &str = "node01";
const NODE02: &str = "node02";
const BLOCK_MASTER01: &str = "172.16.241.64/26";
const BLOCK_NODE01: &str = "172.16.196.128/26";
const BLOCK_NODE02: &str = "172.16.10.0/26";
const LABEL: &str = "bird16";

fn bird16_dir() -> PathBuf {
    std::env::var_os("PODROUTE_BIRD16_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/podroute-test/bird1"))
}

fn can_run(test: &str) -> bool {
    let skip = |why: &str, need: &str| {
        agent_guard::cannot_run("BIRD 1.6 interop", test, why, need);
        false
    };
    if !podroute::lab::is_root() {
        return skip(
            "not running as root",
            "It needs root (network namespaces, veth, routes).",
        );
    }
    if !agent_guard::in_path("ip") || !agent_guard::tool_works("ip", "-V") {
        return skip("iproute2 `ip` is missing", "Install iproute2.");
    }
    let bird = bird16_dir().join("usr/sbin/bird");
    let version = std::process::Command::new(&bird).arg("--version").output();
    let text = version
        .as_ref()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
        })
        .unwrap_or_default();
    if !text.contains("BIRD version 1.6") {
        return skip(
            &format!("BIRD 1.6 is not at {} ({text:?})", bird.display()),
            "Run tests/run.sh (it unpacks Debian's `bird` package there), or set PODROUTE_BIRD16_DIR.",
        );
    }
    true
}

/// Calico's confd output for node01 (192.168.92.129, block 172.16.196.128/26) in the seed
/// cluster: pool 172.16.0.0/16 CrossSubnet, AS 64512, mesh to master01 and node02.
/// With `hold_back`, the export filter rejects everything (node01 peers but announces
/// nothing yet), to show that an Established session alone does not make a node ready.
fn calico_bird_cfg(lab: &Lab, log: &Path, hold_back: bool) -> String {
    let me = lab.spec.node(NODE01).unwrap();
    let node_ip = me.ip().to_string();
    let mut mesh = String::new();
    for other in lab.spec.nodes.iter().filter(|n| n.name != NODE01) {
        let ip = other.ip().to_string();
        // Calico: `{{if gt $onode_ip $node_ip}} passive on;` (string order).
        let passive = if ip > node_ip {
            "\n  passive on; # Mesh is unidirectional, peer will connect to us."
        } else {
            ""
        };
        mesh += &format!(
            "\n# For peer /host/{name}/ip_addr_v4\nprotocol bgp Mesh_{id} from bgp_template {{\n  \
             neighbor {ip} as {asn};\n  source address {node_ip};  # The local address we use \
             for the TCP connection{passive}\n  graceful restart time 120;\n}}\n",
            name = other.name,
            id = ip.replace('.', "_"),
            asn = lab.spec.as_number,
        );
    }
    format!(
        r#"# Rendered from calico confd's bird_aggr.cfg.template
protocol static {{
   # IP blocks for this host.
   route {BLOCK_NODE01} blackhole;
}}

# Aggregation of routes on this host; export the block, nothing beneath it.
function calico_aggr ()
{{
      # Block {BLOCK_NODE01} is confirmed
      if ( net = {BLOCK_NODE01} ) then {{ accept; }}
      if ( net ~ {BLOCK_NODE01} ) then {{ reject; }}
}}

# Rendered from bird_ipam.cfg.template
filter calico_export_to_bgp_peers {{{hold}
  calico_aggr();
  if ( net ~ 172.16.0.0/16 ) then {{
    accept;
  }}
  reject;
}}

filter calico_kernel_programming {{
  if ( net ~ 172.16.0.0/16 ) then {{
    # Calico's BIRD sets krt_tunnel here ("" on 192.168.92.0/24, else "tunl0").
    accept;
  }}
  accept;
}}

# Rendered from bird.cfg.template
log "{log}" all;
router id {node_ip};

# Configure synchronization between routing tables and kernel.
protocol kernel {{
  learn;             # Learn all alien routes from the kernel
  persist;           # Don't remove routes on bird shutdown
  scan time 2;       # Scan kernel routing table every 2 seconds
  import all;
  export filter calico_kernel_programming; # Default is export none
  graceful restart;
  merge paths on;
}}

# Watch interface up/down events.
protocol device {{
  debug {{ states }};
  scan time 2;    # Scan interfaces every 2 seconds
}}

protocol direct {{
  debug {{ states }};
  interface -"cali*", -"kube-ipvs*", "*";
}}

# Template for all BGP clients
template bgp bgp_template {{
  debug {{ states }};
  description "Connection to BGP peer";
  local as {asn};
  multihop;
  gateway recursive; # This should be the default, but just in case.
  import all;        # Import all routes, since we don't know what the upstream
                     # topology is and therefore have to trust the ToR/RR.
  export filter calico_export_to_bgp_peers;  # Only want to export routes for workloads.
  add paths on;
  graceful restart;  # See comment in kernel section about graceful restart.
  connect delay time 2;
  connect retry time 5;
  error wait time 5,30;
}}

# ------------- Node-to-node mesh -------------
{mesh}"#,
        log = log.display(),
        asn = lab.spec.as_number,
        hold = if hold_back {
            "\n  reject; # held back by the test"
        } else {
            ""
        },
    )
}

struct Bird16 {
    ns: String,
    conf: PathBuf,
    socket: PathBuf,
}

impl Bird16 {
    fn start(lab: &Lab, hold_back: bool) -> Bird16 {
        let ns = lab.node_ns(NODE01);
        let dir = lab.workdir().join("bird16");
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("bird.cfg");
        std::fs::write(
            &conf,
            calico_bird_cfg(lab, &dir.join("bird.log"), hold_back),
        )
        .unwrap();
        let bird = Bird16 {
            ns,
            conf,
            socket: dir.join("bird.ctl"),
        };
        let (ok, out) = podroute::lab::exec(
            &bird.ns,
            bird16_dir().join("usr/sbin/bird").to_str().unwrap(),
            &["-p", "-c", bird.conf.to_str().unwrap()],
        )
        .unwrap();
        assert!(ok, "Calico's bird.cfg does not parse in BIRD 1.6:\n{out}");
        bird.spawn(lab);
        bird
    }

    /// `bird -R -f -c CONF -s SOCKET` as calico-node runs it (`-R`: graceful restart recovery
    /// after start), in node01's namespace.
    fn spawn(&self, lab: &Lab) {
        lab.spawn(
            LABEL,
            &self.ns,
            &bird16_dir().join("usr/sbin/bird"),
            &[
                "-R".into(),
                "-f".into(),
                "-c".into(),
                self.conf.display().to_string(),
                "-s".into(),
                self.socket.display().to_string(),
            ],
        )
        .unwrap();
    }

    fn birdc(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-s", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        match podroute::lab::exec(
            &self.ns,
            bird16_dir().join("usr/sbin/birdc").to_str().unwrap(),
            &all,
        ) {
            Ok((true, out)) if !out.contains("Unable to connect") => Ok(out),
            Ok((_, out)) => Err(out),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Both mesh sessions Established and both podroute blocks in BIRD's table.
    fn has_podroute_blocks(&self) -> Result<(), String> {
        let protocols = self.birdc(&["show", "protocols"])?;
        for id in ["Mesh_192_168_92_128", "Mesh_192_168_93_130"] {
            let line = protocols
                .lines()
                .find(|l| l.starts_with(id))
                .ok_or_else(|| format!("no protocol {id}:\n{protocols}"))?;
            if !line.contains("Established") {
                return Err(format!("BIRD 1.6: {line}"));
            }
        }
        let routes = self.birdc(&["show", "route"])?;
        for block in [BLOCK_MASTER01, BLOCK_NODE02] {
            if !routes.lines().any(|l| l.starts_with(block)) {
                return Err(format!("BIRD 1.6 has no route to {block}:\n{routes}"));
            }
        }
        Ok(())
    }
}

fn logs(lab: &Lab) -> String {
    [MASTER01, NODE02, LABEL]
        .iter()
        .map(|l| format!("--- {l}:\n{}", lab.log_tail(l, 25)))
        .chain(std::iter::once(format!(
            "--- bird.log:\n{}",
            std::fs::read_to_string(lab.workdir().join("bird16/bird.log")).unwrap_or_default()
        )))
        .collect::<Vec<_>>()
        .join("\n")
}

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

/// The kernel route of `node` (a podroute node) to node01's block, as podroute programs it.
fn route_to_bird_block(lab: &Lab, node: &str) -> Option<String> {
    lab.kernel_routes(node)
        .ok()?
        .into_iter()
        .find(|l| l.starts_with(BLOCK_NODE01))
}

/// The podroute nodes' routes to node01's block are still `before`.
fn same_routes(lab: &Lab, before: &[Option<String>]) -> Result<(), String> {
    let now: Vec<Option<String>> = [MASTER01, NODE02]
        .map(|n| route_to_bird_block(lab, n))
        .into();
    if now == before {
        Ok(())
    } else {
        Err(format!("{now:?} (before: {before:?})"))
    }
}

/// Samples `check` every 20 ms for `how_long`; panics at the first miss.
fn holds_for(
    lab: &Lab,
    what: &str,
    how_long: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let start = Instant::now();
    while start.elapsed() < how_long {
        if let Err(e) = check() {
            panic!(
                "{what} stopped holding after {:?}: {e}\n{}",
                start.elapsed(),
                logs(lab)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn calico_bird16_node_and_podroute_nodes_exchange_blocks_and_survive_restarts() {
    const TEST: &str = "calico_bird16_node_and_podroute_nodes_exchange_blocks_and_survive_restarts";
    if !can_run(TEST) {
        return;
    }
    let prefix = format!("b16{}", std::process::id());
    let cfg = LabConfig::new(prefix, env!("CARGO_BIN_EXE_podroute"));
    let mut lab = Lab::build(cfg, ClusterSpec::seed()).expect("build the lab");
    let bird = Bird16::start(&lab, true);
    let agents_started = Instant::now();
    lab.start_agent(MASTER01).unwrap();
    lab.start_agent(NODE02).unwrap();

    // node01 peers but announces nothing: an Established session is not readiness. master01
    // stays not ready, naming node01's block, past the mesh peers' grace time.
    eventually(
        &lab,
        "master01 Established with node01, not ready for its block",
        CONVERGE,
        || {
            let s = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
            let up = s
                .peers
                .iter()
                .any(|p| p.address == "192.168.92.129" && p.state == "Established");
            let reason = s
                .health
                .not_ready
                .iter()
                .any(|r| r.contains(&format!("{BLOCK_NODE01} (node01)")));
            if up && !s.health.ready && reason {
                Ok(())
            } else {
                Err(format!("node01 Established: {up}; health: {:?}", s.health))
            }
        },
    );
    // Past the grace time (the lab's --ready-grace, 10 s) only the Established session keeps
    // the block counted.
    let grace = Duration::from_secs(11);
    std::thread::sleep(grace.saturating_sub(agents_started.elapsed()));
    let s = lab.node_status(MASTER01).unwrap();
    assert!(
        !s.health.ready && s.health.not_ready.iter().any(|r| r.contains(BLOCK_NODE01)),
        "after the grace time: {:?}",
        s.health
    );
    std::fs::write(
        &bird.conf,
        calico_bird_cfg(&lab, &lab.workdir().join("bird16/bird.log"), false),
    )
    .unwrap();
    let reconfigured = bird.birdc(&["configure"]).unwrap();
    assert!(reconfigured.contains("Reconfigured"), "{reconfigured}");

    // podroute side: both agents have node01 (BIRD) as an Established mesh peer and exactly
    // the plan, which routes node01's block as if node01 ran podroute.
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    // The counts are republished at least once a second.
    eventually(
        &lab,
        "node01's block received from BIRD 1.6",
        CONVERGE,
        || {
            for node in [MASTER01, NODE02] {
                let s = lab.node_status(node).map_err(|e| e.to_string())?;
                let peer = s
                    .peers
                    .iter()
                    .find(|p| p.address == "192.168.92.129")
                    .ok_or_else(|| format!("{node}: node01 is no peer"))?;
                let seen = (
                    peer.peer_type.as_str(),
                    peer.state.as_str(),
                    peer.prefixes_received,
                );
                if seen != (PEER_TYPE_MESH, "Established", 1) {
                    return Err(format!("{node}: node01 peer is {seen:?}"));
                }
            }
            Ok(())
        },
    );
    eventually(
        &lab,
        "master01 ready once node01's block is routed",
        CONVERGE,
        || {
            let s = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
            if s.health.ready {
                Ok(())
            } else {
                Err(format!("{:?}", s.health))
            }
        },
    );
    assert_eq!(
        route_to_bird_block(&lab, MASTER01).as_deref(),
        Some(format!("{BLOCK_NODE01} via 192.168.92.129 dev ens33").as_str())
    );
    // BIRD side: the podroute blocks in its table, master01's also in node01's kernel (BIRD's
    // kernel protocol, proto bird).
    eventually(
        &lab,
        "BIRD 1.6 learns both podroute blocks",
        CONVERGE,
        || bird.has_podroute_blocks(),
    );
    eventually(&lab, "BIRD 1.6 programs master01's block", CONVERGE, || {
        let table = podroute::lab::ip(&lab.node_ns(NODE01), &["route", "show", BLOCK_MASTER01])
            .map_err(|e| e.to_string())?;
        if table.contains("via 192.168.92.128") && table.contains("proto bird") {
            Ok(())
        } else {
            Err(format!("node01: {table:?}"))
        }
    });

    // SIGKILL of master01's agent: BIRD keeps master01's block (graceful restart helper), and
    // takes the restarted agent's routes back.
    lab.stop_agent(MASTER01, libc::SIGKILL, Duration::from_secs(5))
        .unwrap();
    holds_for(
        &lab,
        "BIRD 1.6 keeps master01's block",
        Duration::from_secs(3),
        || {
            let routes = bird.birdc(&["show", "route", BLOCK_MASTER01])?;
            if routes.lines().any(|l| l.starts_with(BLOCK_MASTER01)) {
                Ok(())
            } else {
                Err(routes)
            }
        },
    );
    let protocols = bird
        .birdc(&["show", "protocols", "Mesh_192_168_92_128"])
        .unwrap();
    assert!(
        !protocols.contains("Established"),
        "the session to the killed agent is down: {protocols}"
    );
    lab.start_agent(MASTER01).unwrap();
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("after the agent's restart: {e}\n{}", logs(&lab));
    }
    eventually(
        &lab,
        "BIRD 1.6 Established again with both blocks",
        CONVERGE,
        || bird.has_podroute_blocks(),
    );

    // SIGKILL of BIRD 1.6 and a restart as calico-node restarts it: the podroute nodes keep
    // node01's block in their kernels the whole time.
    let before: Vec<Option<String>> = [MASTER01, NODE02]
        .map(|n| route_to_bird_block(&lab, n))
        .into();
    assert!(before.iter().all(Option::is_some), "{before:?}");
    lab.stop_agent(LABEL, libc::SIGKILL, Duration::from_secs(5))
        .unwrap();
    holds_for(
        &lab,
        "podroute keeps node01's block while BIRD is down",
        Duration::from_secs(3),
        || same_routes(&lab, &before),
    );
    bird.spawn(&lab);
    let start = Instant::now();
    eventually(&lab, "BIRD 1.6 back with both sessions", CONVERGE, || {
        same_routes(&lab, &before)?;
        bird.has_podroute_blocks()
    });
    eprintln!("BIRD 1.6 resynchronised after {:?}", start.elapsed());
    // After BIRD's End-of-RIB the route is fresh again, not stale: still the same.
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("after BIRD's restart: {e}\n{}", logs(&lab));
    }
    holds_for(
        &lab,
        "node01's block stays after BIRD's restart",
        Duration::from_secs(2),
        || same_routes(&lab, &before),
    );

    // The migration step itself: calico-node's BIRD on node01 is SIGKILLed (its peers keep
    // node01's block as stale) and podroute starts in its place; the other nodes' routes to
    // node01's block never leave their kernels.
    lab.stop_agent(LABEL, libc::SIGKILL, Duration::from_secs(5))
        .unwrap();
    lab.start_agent(NODE01).unwrap();
    let start = Instant::now();
    loop {
        if let Err(e) = same_routes(&lab, &before) {
            panic!(
                "node01's block left a kernel while podroute replaced BIRD (after {:?}): {e}\n{}",
                start.elapsed(),
                logs(&lab)
            );
        }
        if [MASTER01, NODE02]
            .iter()
            .all(|n| lab.node_converged(n).is_ok())
        {
            break;
        }
        if start.elapsed() > CONVERGE {
            panic!(
                "master01 and node02 never converged with podroute on node01\n{}",
                logs(&lab)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // BIRD's kernel routes on node01: those identical to podroute's plan satisfy it, the
    // others hold their destinations until removed, as the README's migration says.
    podroute::lab::ip(&lab.node_ns(NODE01), &["route", "flush", "proto", "bird"]).unwrap();
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!(
            "podroute on node01 after `ip route flush proto bird`: {e}\n{}",
            logs(&lab)
        );
    }
    holds_for(
        &lab,
        "node01's block after the migration",
        Duration::from_secs(1),
        || same_routes(&lab, &before),
    );
}
