//! A real `podroute agent` on an IPv6-only node peering with GoBGP and with BIRD 2 over an
//! IPv6 session (a `BGPPeer` whose `peerIP` is IPv6), IPv6 routes both ways (issue 18).
//!
//! The agent (node `v6-master`, `fd00:92::128/64` on `ens33`, no IPv4 at all, block
//! `fd00:10:0:a::/122` of pool `fd00:10::/48`) and the daemon (`fd00:92::129`, AS 64513, in
//! its own namespace on the other end of the veth) connect over IPv6 on port 179. Checked:
//! the daemon learns the block with the node's global address as next hop and AS path
//! [64512]; the agent installs the daemon's `fd00:99::/64` via `fd00:92::129`, and removes it
//! when the daemon withdraws it; the agent's status lists the peer as an Established global
//! peer in its IPv6 table.
//!
//! Root only (namespaces); gobgpd/gobgp and bird/birdc from Debian (tests/run.sh installs
//! them). Without them a loud SKIP, and a failure with `CI=true`. Every address lives only in
//! the namespaces this test creates.

#[allow(dead_code)]
mod agent_guard;
mod netns;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_guard::{cannot_run, in_path};
use netns::{Netns, veth};
use podroute::agent::status::AgentStatus;

const WAIT: Duration = Duration::from_secs(40);
const BLOCK: &str = "fd00:10:0:a::/122";
const DAEMON_ROUTE: &str = "fd00:99::/64";

/// Kills the process it holds (one this test started) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn can_run(test: &str, tools: &[(&str, &str)]) -> bool {
    if !netns::can_run(test) {
        return false;
    }
    for (tool, package) in tools {
        if !in_path(tool) {
            cannot_run(
                "IPv6 interop",
                test,
                &format!("`{tool}` is missing"),
                &format!("Install {package} (tests/run.sh does)."),
            );
            return false;
        }
    }
    true
}

fn write_datastore(dir: &Path) {
    let nulls = vec!["null"; 64].join(", ");
    let free: Vec<String> = (0..64).map(|i| i.to_string()).collect();
    let text = format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\nmetadata:\n  \
         name: default\nspec:\n  asNumber: 64512\n  nodeToNodeMeshEnabled: true\n---\n\
         apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  \
         name: default-ipv6-ippool\nspec:\n  blockSize: 122\n  cidr: fd00:10::/48\n  \
         ipipMode: Never\n  vxlanMode: Never\n  nodeSelector: all()\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: v6-master\n  annotations:\n    \
         projectcalico.org/IPv6Address: fd00:92::128/64\n---\n\
         apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: tor6\n\
         spec:\n  asNumber: 64513\n  peerIP: fd00:92::129\n---\n\
         apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  \
         name: fd00-10-0-a---122\nspec:\n  affinity: host:v6-master\n  \
         allocations: [{nulls}]\n  attributes: []\n  cidr: {BLOCK}\n  deleted: false\n  \
         strictAffinity: false\n  unallocated: [{}]\n",
        free.join(", ")
    );
    std::fs::write(dir.join("cluster.yaml"), text).unwrap();
}

fn start_agent(ns: &Netns, datastore: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_podroute")])
            .args(["agent", "--nodename", "v6-master", "--ip", "none"])
            .args(["--ip6", "none", "--nic", "ens33"])
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
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

fn kernel_routes(ns: &Netns) -> Vec<String> {
    ns.routes(podroute::dataplane::DEFAULT_ROUTE_PROTOCOL)
}

/// Polls `check` every 200 ms until it gives a value; panics with `diag()` after [`WAIT`].
fn wait<T>(what: &str, mut check: impl FnMut() -> Option<T>, diag: impl Fn() -> String) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", diag());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a daemon in namespace B is asked in these tests.
trait Daemon {
    /// The daemon's route for `prefix`: (next hop, AS path words), if it has one.
    fn route(&self, prefix: &str) -> Option<(String, String)>;
    fn withdraw(&self, prefix: &str);
    fn diag(&self) -> String;
}

/// Two namespaces on a veth, IPv6 only: A (the agent) `fd00:92::128/64`, B (the daemon)
/// `fd00:92::129/64`; DAD off so the addresses are usable at once.
fn namespaces() -> (Netns, Netns) {
    let a = Netns::new("v6ia");
    let b = Netns::new("v6ib");
    for ns in [&a, &b] {
        ns.sysctl("net.ipv6.conf.default.accept_dad=0");
    }
    veth(&a, "ens33", "", &b, "eth0", "");
    a.ip(&["addr", "add", "fd00:92::128/64", "dev", "ens33", "nodad"]);
    b.ip(&["addr", "add", "fd00:92::129/64", "dev", "eth0", "nodad"]);
    (a, b)
}

/// The agent and the daemon exchange IPv6 routes over their IPv6 session, and a withdrawal
/// reaches the agent's kernel.
fn routes_both_ways(a: &Netns, d: &dyn Daemon, agent_log: &Path) {
    let diag = || {
        format!(
            "--- daemon\n{}\n--- agent log\n{}\n--- agent kernel {:?}",
            d.diag(),
            std::fs::read_to_string(agent_log).unwrap_or_default(),
            kernel_routes(a)
        )
    };
    // The daemon learns the block, next hop the node's global address, AS path [64512].
    let (nh, path) = wait("the daemon to learn the block", || d.route(BLOCK), diag);
    assert_eq!(nh, "fd00:92::128", "{}", diag());
    assert_eq!(path, "64512", "{}", diag());
    // The agent installs the daemon's route via the daemon's address.
    let want = vec![
        "blackhole fd00:10:0:a::/122 dev lo pref medium".to_string(),
        format!("{DAEMON_ROUTE} via fd00:92::129 dev ens33 pref medium"),
    ];
    wait(
        "the agent to install the daemon's route",
        || (kernel_routes(a) == want).then_some(()),
        diag,
    );
    // The status snapshot follows the session: it is published after the state change,
    // typically ~10 ms after the routes are in the kernel, at times up to ~1 s.
    let st = wait(
        "the agent's status to show the peer Established",
        || {
            status(a).filter(|st| {
                st.peers
                    .iter()
                    .any(|p| p.address == "fd00:92::129" && p.state == "Established")
            })
        },
        || format!("{:?}\n{}", status(a).map(|s| s.peers), diag()),
    );
    let peer = st
        .peers
        .iter()
        .find(|p| p.address == "fd00:92::129")
        .unwrap_or_else(|| panic!("no peer fd00:92::129 in {:?}", st.peers));
    assert_eq!(
        (peer.peer_type.as_str(), peer.remote_as),
        ("global", 64513),
        "{peer:?}"
    );
    assert_eq!(st.ipv4, None);
    assert_eq!(st.ipv6.as_deref(), Some("fd00:92::128/64"));

    d.withdraw(DAEMON_ROUTE);
    wait(
        "the withdrawal to reach the agent's kernel",
        || (kernel_routes(a) == want[..1]).then_some(()),
        diag,
    );
}

struct Gobgp {
    _proc: Proc,
    socket: String,
    log: std::path::PathBuf,
}

impl Gobgp {
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("gobgp")
            .arg(format!("--target=unix://{}", self.socket))
            .args(args)
            .output()
            .expect("gobgp runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Daemon for Gobgp {
    fn route(&self, prefix: &str) -> Option<(String, String)> {
        let (ok, out) = self.cli(&["-j", "global", "rib", "-a", "ipv6", prefix]);
        if !ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
        let path = v.get(prefix)?.as_array()?.first()?.clone();
        let mut nh = None;
        let mut as_path = Vec::new();
        for attr in path.get("attrs")?.as_array()? {
            match attr.get("type").and_then(|t| t.as_u64()) {
                // MP_REACH_NLRI: the next hop.
                Some(14) => nh = attr.get("nexthop")?.as_str().map(str::to_string),
                // AS_PATH: the segments' ASes.
                Some(2) => {
                    for seg in attr.get("as_paths")?.as_array()? {
                        for asn in seg.get("asns")?.as_array()? {
                            as_path.push(asn.as_u64()?.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Some((nh?, as_path.join(" ")))
    }

    fn withdraw(&self, prefix: &str) {
        let (ok, out) = self.cli(&["global", "rib", "del", "-a", "ipv6", prefix]);
        assert!(ok, "gobgp global rib del: {out}");
    }

    fn diag(&self) -> String {
        format!(
            "{}\n{}",
            self.cli(&["neighbor"]).1,
            std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

#[test]
fn gobgp_over_an_ipv6_session_exchanges_ipv6_routes_with_an_ipv6_only_agent() {
    let test = "gobgp_over_an_ipv6_session_exchanges_ipv6_routes_with_an_ipv6_only_agent";
    if !can_run(test, &[("gobgpd", "gobgpd"), ("gobgp", "gobgp")]) {
        return;
    }
    let (a, b) = namespaces();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gobgpd.toml");
    std::fs::write(
        &conf,
        "[global.config]\n  as = 64513\n  router-id = \"10.0.0.2\"\n  \
         local-address-list = [\"fd00:92::129\"]\n\n[[neighbors]]\n  [neighbors.config]\n    \
         neighbor-address = \"fd00:92::128\"\n    peer-as = 64512\n  \
         [neighbors.timers.config]\n    connect-retry = 1\n  [[neighbors.afi-safis]]\n    \
         [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv6-unicast\"\n",
    )
    .unwrap();
    let socket = dir.path().join("gobgpd.sock").display().to_string();
    let log = dir.path().join("gobgpd.log");
    let proc = Proc(
        Command::new("ip")
            .args(["netns", "exec", &b.name, "gobgpd", "-f"])
            .arg(&conf)
            .args(["-p", "--pprof-disable", "-l", "info"])
            .arg(format!("--api-hosts=unix://{socket}"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("gobgpd starts"),
    );
    let gobgp = Gobgp {
        _proc: proc,
        socket,
        log,
    };
    wait(
        "the gobgpd API",
        || gobgp.cli(&["global"]).0.then_some(()),
        || gobgp.diag(),
    );
    let (ok, out) = gobgp.cli(&[
        "global",
        "rib",
        "add",
        "-a",
        "ipv6",
        DAEMON_ROUTE,
        "nexthop",
        "fd00:92::129",
    ]);
    assert!(ok, "gobgp global rib add: {out}");

    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write_datastore(&datastore);
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(&a, &datastore, &agent_log);
    routes_both_ways(&a, &gobgp, &agent_log);
}

struct Bird {
    _proc: Proc,
    socket: String,
    log: std::path::PathBuf,
}

impl Bird {
    fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc")
            .args(["-s", &self.socket])
            .args(args)
            .output()
            .expect("birdc runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Daemon for Bird {
    fn route(&self, prefix: &str) -> Option<(String, String)> {
        let out = self.birdc(&["show", "route", "for", prefix, "protocol", "pod", "all"]);
        if !out.contains(prefix) {
            return None;
        }
        let attr = |name: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
        };
        // `BGP.next_hop: fd00:92::128 fe80::...` (global first, then link-local).
        let nh = attr("BGP.next_hop:")?
            .split_whitespace()
            .next()?
            .to_string();
        Some((nh, attr("BGP.as_path:")?))
    }

    fn withdraw(&self, _prefix: &str) {
        let out = self.birdc(&["disable", "s6"]);
        assert!(out.contains("disabled"), "birdc disable s6: {out}");
    }

    fn diag(&self) -> String {
        format!(
            "{}\n{}",
            self.birdc(&["show", "protocols", "all", "pod"]),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

#[test]
fn bird2_over_an_ipv6_session_exchanges_ipv6_routes_with_an_ipv6_only_agent() {
    let test = "bird2_over_an_ipv6_session_exchanges_ipv6_routes_with_an_ipv6_only_agent";
    if !can_run(test, &[("bird", "bird2"), ("birdc", "bird2")]) {
        return;
    }
    let (a, b) = namespaces();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bird.conf");
    let log = dir.path().join("bird.log");
    std::fs::write(
        &conf,
        format!(
            "log \"{}\" all;\nrouter id 10.0.0.3;\nprotocol device {{ }}\n\
             protocol static s6 {{ ipv6; route {DAEMON_ROUTE} unreachable; }}\n\
             protocol bgp pod {{\n  local fd00:92::129 as 64513;\n  \
             neighbor fd00:92::128 as 64512;\n  connect retry time 1;\n  \
             ipv6 {{ import all; export all; next hop self; }};\n}}\n",
            log.display()
        ),
    )
    .unwrap();
    let socket = dir.path().join("bird.ctl").display().to_string();
    let proc = Proc(
        Command::new("ip")
            .args(["netns", "exec", &b.name, "bird", "-f", "-c"])
            .arg(&conf)
            .args(["-s", &socket])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird starts"),
    );
    let bird = Bird {
        _proc: proc,
        socket,
        log,
    };
    wait(
        "bird's control socket",
        || {
            bird.birdc(&["show", "status"])
                .contains("Daemon is up")
                .then_some(())
        },
        || bird.diag(),
    );
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write_datastore(&datastore);
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(&a, &datastore, &agent_log);
    routes_both_ways(&a, &bird, &agent_log);
}
