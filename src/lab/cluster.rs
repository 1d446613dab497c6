//! [`Lab`]: the lab cluster's namespaces, datastore and agent processes, and what can be asked
//! of them (status, routes, metrics, kernel tables, pings). Everything it creates is recorded
//! as it is created and released by [`Lab::cleanup`], on drop (also while unwinding from a
//! panic) and, for the `podroute lab` command, on Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use super::LabError;
use super::netns::{self, ip, sysctl, veth};
use super::spec::{CALI_MAC, ClusterSpec, IpVersion, NIC, POD_GATEWAY6};
use crate::agent::status::{AgentStatus, RouteRow, RoutesReport};
use crate::plan::{DesiredRoute, EncapMode, TUNNEL_DEVICE};

/// `peer_type` of node-to-node mesh peers in the status API (Calico's wording).
pub const PEER_TYPE_MESH: &str = "node-to-node mesh";
/// `peer_type` of global `BGPPeer`s.
pub const PEER_TYPE_GLOBAL: &str = "global";

/// How the lab is built and how its agents run.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Every namespace is named `PREFIX-...`.
    pub prefix: String,
    /// The `podroute` binary the agents run.
    pub binary: PathBuf,
    /// `--hold-time` (seconds).
    pub hold_time: u16,
    /// `--connect-retry`.
    pub connect_retry: Duration,
    /// `--connect-retry-max`.
    pub connect_retry_max: Duration,
    /// `--ready-grace`.
    pub ready_grace: Duration,
    /// `--dir-poll`.
    pub dir_poll: Duration,
    /// `--log` filter of the agents.
    pub log_filter: String,
    /// Port of each agent's HTTP server (`--metrics-addr 0.0.0.0:PORT`).
    pub metrics_port: u16,
}

impl LabConfig {
    /// Short timers so that a lab converges in seconds: hold 9 s, connect retry 1 s backing
    /// off to 4 s at most, ready grace 10 s, directory poll 200 ms.
    pub fn new(prefix: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        Self {
            prefix: prefix.into(),
            binary: binary.into(),
            hold_time: 9,
            connect_retry: Duration::from_secs(1),
            connect_retry_max: Duration::from_secs(4),
            ready_grace: Duration::from_secs(10),
            dir_poll: Duration::from_millis(200),
            log_filter: "info".into(),
            metrics_port: 9091,
        }
    }
}

/// A process the lab started (an agent, a BGP daemon).
#[derive(Debug)]
struct Process {
    label: String,
    child: Child,
}

/// What the lab created, in creation order: released in reverse.
#[derive(Debug, Default)]
pub(super) struct Resources {
    prefix: String,
    processes: Vec<Process>,
    namespaces: Vec<String>,
    workdir: Option<PathBuf>,
    keep_workdir: bool,
    /// Set once the lab was left running on purpose (`--keep`): nothing is released.
    kept: bool,
}

/// Every live lab's resources, for the Ctrl-C handler.
static LABS: Mutex<Vec<Weak<Mutex<Resources>>>> = Mutex::new(Vec::new());

impl Resources {
    /// Stops the processes (SIGTERM, then SIGKILL after `grace`), deletes the namespaces
    /// (also any other namespace with the prefix) and the work directory. Returns what could
    /// not be removed.
    fn release(&mut self, grace: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        if self.kept {
            return problems;
        }
        for p in &mut self.processes {
            if let Err(e) = stop_child(&mut p.child, grace) {
                problems.push(format!("{}: {e}", p.label));
            }
        }
        self.processes.clear();
        let mut names: Vec<String> = self.namespaces.drain(..).rev().collect();
        if !self.prefix.is_empty() {
            for extra in netns::namespaces_with_prefix(&format!("{}-", self.prefix)) {
                if !names.contains(&extra) {
                    names.push(extra);
                }
            }
        }
        // What the agents started and left running in the lab's namespaces: the userspace
        // IPIP forwarders (they outlive their agent by design).
        stop_namespace_processes(&names, grace);
        for ns in names {
            if let Err(e) = netns::delete(&ns) {
                problems.push(e.to_string());
            }
        }
        if let Some(dir) = self.workdir.take()
            && !self.keep_workdir
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
        problems
    }
}

/// SIGTERM to every process left in `namespaces` (not children of ours, e.g. the IPIP
/// forwarders the agents started), up to `grace` for them to exit, then SIGKILL.
fn stop_namespace_processes(namespaces: &[String], grace: Duration) {
    let pids: Vec<i32> = namespaces.iter().flat_map(|ns| netns::pids(ns)).collect();
    let signal_all = |signal| {
        for pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; the pids were just listed as
            // members of the lab's own namespaces.
            unsafe { libc::kill(*pid, signal) };
        }
    };
    signal_all(libc::SIGTERM);
    // A zombie (exited, not yet reaped by its new parent) counts as gone.
    let alive = || {
        pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let state = stat.rsplit_once(") ")?.1.chars().next()?;
                    Some(state != 'Z' && state != 'X')
                })
                .unwrap_or(false)
        })
    };
    let deadline = Instant::now() + grace;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        signal_all(libc::SIGKILL);
    }
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL; always reaps it.
fn stop_child(child: &mut Child, grace: Duration) -> std::io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child,
        // so it cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait().map(drop)
}

/// Releases every live lab of this process (the Ctrl-C path). Returns the problems.
pub(super) fn release_all_labs() -> Vec<String> {
    let labs: Vec<_> = LABS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut problems = Vec::new();
    for lab in labs {
        problems.extend(
            lab.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(Duration::from_secs(2)),
        );
    }
    problems
}

/// The lab cluster: namespaces (switches, a router, nodes, pods), the YAML datastore, and one
/// agent process per node.
#[derive(Debug)]
pub struct Lab {
    pub cfg: LabConfig,
    /// The cluster as last written to the datastore.
    pub spec: ClusterSpec,
    workdir: PathBuf,
    resources: Arc<Mutex<Resources>>,
    /// Nodes whose agent was started (the process label is the node name).
    agents: BTreeSet<String>,
    ipip: bool,
    /// When [`Self::start_agents`] last started the agents.
    agents_started: Option<Instant>,
}

/// True when running as root (namespaces, veths and routes need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The file that remembers a lab's work directory, for `podroute lab --cleanup`.
pub(super) fn workdir_note(prefix: &str) -> PathBuf {
    PathBuf::from("/run/podroute-lab").join(format!("{prefix}.workdir"))
}

impl Lab {
    /// Creates the namespaces and the datastore of `spec`; no agent runs yet.
    ///
    /// Refuses when not root and when namespaces named `PREFIX-*` exist already. Whatever was
    /// created is removed again when building fails.
    pub fn build(cfg: LabConfig, spec: ClusterSpec) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let existing = netns::namespaces_with_prefix(&format!("{}-", cfg.prefix));
        if !existing.is_empty() {
            return Err(LabError::Exists {
                prefix: cfg.prefix.clone(),
                namespaces: existing,
            });
        }
        let workdir = std::env::temp_dir().join(format!(
            "{}-{}-{}",
            cfg.prefix,
            std::process::id(),
            unique_salt()
        ));
        std::fs::create_dir_all(workdir.join("logs")).map_err(|e| io_error(&workdir, e))?;
        let note = workdir_note(&cfg.prefix);
        if let Some(parent) = note.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&note, workdir.to_string_lossy().as_bytes());
        let resources = Arc::new(Mutex::new(Resources {
            prefix: cfg.prefix.clone(),
            workdir: Some(workdir.clone()),
            ..Resources::default()
        }));
        LABS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&resources));
        let mut lab = Lab {
            cfg,
            spec,
            workdir,
            resources,
            agents: BTreeSet::new(),
            ipip: false,
            agents_started: None,
        };
        // On error, `lab` is dropped here and removes what was made.
        lab.build_topology()?;
        lab.spec
            .write_datastore(&lab.datastore_dir())
            .map_err(|e| io_error(&lab.datastore_dir(), e))?;
        lab.ipip = lab.probe_ipip();
        Ok(lab)
    }

    fn add_namespace(&self, name: &str) -> Result<String, LabError> {
        super::check_interrupted()?;
        netns::add(name)?;
        self.lock().namespaces.push(name.to_string());
        Ok(name.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.resources.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn build_topology(&mut self) -> Result<(), LabError> {
        let subnets = self.spec.subnets();
        let (v4, v6) = (self.spec.family.has_ipv4(), self.spec.family.has_ipv6());
        let router = self.add_namespace(&self.router_ns())?;
        if v4 {
            sysctl(&router, "net.ipv4.ip_forward=1")?;
        }
        if v6 {
            ipv6_namespace(&router)?;
            sysctl(&router, "net.ipv6.conf.all.forwarding=1")?;
        }
        for (i, subnet) in subnets.iter().enumerate() {
            let sw = self.add_namespace(&self.switch_ns(i))?;
            ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
            ip(&sw, &["link", "set", "br0", "up"])?;
            let lan = format!("lan{i}");
            veth(&router, &lan, &sw, "router")?;
            ip(&sw, &["link", "set", "router", "master", "br0"])?;
            if v4 {
                let gw = Ipv4Net::new(ClusterSpec::router_addr(*subnet), subnet.prefix_len())
                    .map_err(|e| LabError::Spec(e.to_string()))?;
                ip(&router, &["addr", "add", &gw.to_string(), "dev", &lan])?;
            }
            if let Some(subnet6) = self.spec.subnet6(*subnet) {
                let gw = Ipv6Net::new(ClusterSpec::router_addr6(subnet6), subnet6.prefix_len())
                    .map_err(|e| LabError::Spec(e.to_string()))?;
                ip(
                    &router,
                    &["addr", "add", &gw.to_string(), "dev", &lan, "nodad"],
                )?;
            }
        }
        for (index, node) in self.spec.nodes.clone().iter().enumerate() {
            let ns = self.add_namespace(&self.node_ns(&node.name))?;
            if v6 {
                ipv6_namespace(&ns)?;
            }
            let subnet = node.addr.trunc();
            let i = subnets
                .iter()
                .position(|s| *s == subnet)
                .ok_or_else(|| LabError::Spec(format!("no switch for {subnet}")))?;
            let sw = self.switch_ns(i);
            let port = format!("port{index}");
            veth(&ns, NIC, &sw, &port)?;
            ip(&sw, &["link", "set", &port, "master", "br0"])?;
            if v4 {
                ip(&ns, &["addr", "add", &node.addr.to_string(), "dev", NIC])?;
                let gw = ClusterSpec::router_addr(subnet).to_string();
                ip(&ns, &["route", "add", "default", "via", &gw, "dev", NIC])?;
                for kv in [
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ] {
                    sysctl(&ns, kv)?;
                }
            }
            if v6 && let Some(addr6) = node.addr6 {
                sysctl(&ns, "net.ipv6.conf.all.forwarding=1")?;
                ip(
                    &ns,
                    &["addr", "add", &addr6.to_string(), "dev", NIC, "nodad"],
                )?;
                let gw = ClusterSpec::router_addr6(addr6.trunc()).to_string();
                ip(
                    &ns,
                    &["-6", "route", "add", "default", "via", &gw, "dev", NIC],
                )?;
            }
            for pod in &node.pods {
                let pod_ns = self.add_namespace(&self.pod_ns(&pod.name))?;
                let cali = pod.interface();
                if v6 {
                    ipv6_namespace(&pod_ns)?;
                    // Calico's host side: every cali interface has ee:ee:ee:ee:ee:ee, so the
                    // pod's IPv6 gateway is the link-local address made from it.
                    ip(
                        &ns,
                        &[
                            "link", "add", &cali, "address", CALI_MAC, "type", "veth", "peer",
                            "name", "eth0", "netns", &pod_ns,
                        ],
                    )?;
                    ip(&ns, &["link", "set", &cali, "up"])?;
                    ip(&pod_ns, &["link", "set", "eth0", "up"])?;
                } else {
                    veth(&ns, &cali, &pod_ns, "eth0")?;
                }
                if v4 {
                    ip(
                        &pod_ns,
                        &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
                    )?;
                    // Calico's pod side: everything goes to 169.254.1.1, which the host
                    // answers through proxy ARP on the cali interface.
                    ip(
                        &pod_ns,
                        &[
                            "route",
                            "add",
                            "169.254.1.1",
                            "dev",
                            "eth0",
                            "scope",
                            "link",
                        ],
                    )?;
                    ip(
                        &pod_ns,
                        &[
                            "route",
                            "add",
                            "default",
                            "via",
                            "169.254.1.1",
                            "dev",
                            "eth0",
                        ],
                    )?;
                    sysctl(&ns, &format!("net.ipv4.conf.{cali}.proxy_arp=1"))?;
                    sysctl(&ns, &format!("net.ipv4.neigh.{cali}.proxy_delay=0"))?;
                }
                if v6 && let Some(ip6) = pod.ip6 {
                    ip(
                        &pod_ns,
                        &["addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"],
                    )?;
                    ip(
                        &pod_ns,
                        &[
                            "-6",
                            "route",
                            "add",
                            "default",
                            "via",
                            POD_GATEWAY6,
                            "dev",
                            "eth0",
                        ],
                    )?;
                }
            }
        }
        // A `Never` pool (the IPv6 one always, the IPv4 one when so set): across the router,
        // pod traffic is routed, not tunnelled, so the router must know those blocks (as a ToR
        // learns them over BGP from the nodes in a Calico cluster; here static routes).
        for node in &self.spec.nodes {
            let mut routes: Vec<(String, String)> = Vec::new();
            if v4 && self.spec.ipip_mode == EncapMode::Never {
                routes.extend(node.block.map(|b| (b.to_string(), node.ip().to_string())));
            }
            if v6 && let (Some(block6), Some(addr6)) = (node.block6, node.addr6) {
                routes.push((block6.to_string(), addr6.addr().to_string()));
            }
            for (block, via) in routes {
                ip(&router, &["route", "add", &block, "via", &via])?;
            }
        }
        Ok(())
    }

    /// Whether this kernel can make IPIP devices (`ip link add type ipip`), tried in a node
    /// namespace.
    fn probe_ipip(&self) -> bool {
        let Some(node) = self.spec.nodes.first() else {
            return false;
        };
        let ns = self.node_ns(&node.name);
        let made = ip(&ns, &["link", "add", "lab-ipip-probe", "type", "ipip"]).is_ok();
        if made {
            let _ = ip(&ns, &["link", "del", "lab-ipip-probe"]);
        }
        made
    }

    /// Whether IPIP devices can be made here; without them pod traffic between subnets
    /// cannot flow.
    pub fn ipip_available(&self) -> bool {
        self.ipip
    }

    pub fn router_ns(&self) -> String {
        format!("{}-router", self.cfg.prefix)
    }

    /// The switch (bridge) namespace of the `i`-th subnet.
    pub fn switch_ns(&self, i: usize) -> String {
        format!("{}-lan{i}", self.cfg.prefix)
    }

    pub fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.cfg.prefix)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{pod}", self.cfg.prefix)
    }

    /// Every namespace of the lab, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.clone()
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The YAML directory every agent reads (`--datastore-type dir:PATH`).
    pub fn datastore_dir(&self) -> PathBuf {
        self.workdir.join("datastore")
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.workdir.join("logs").join(format!("{label}.log"))
    }

    /// The last `lines` lines of a process's log.
    pub fn log_tail(&self, label: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(label)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Applies `change` to the spec and rewrites the datastore directory (atomically per
    /// file); the agents pick it up at their next poll.
    pub fn update_spec(&mut self, change: impl FnOnce(&mut ClusterSpec)) -> Result<(), LabError> {
        change(&mut self.spec);
        let dir = self.datastore_dir();
        self.spec
            .write_datastore(&dir)
            .map_err(|e| io_error(&dir, e))
    }

    /// Releases `node`'s IPAM block (its IPAMBlock and BlockAffinity leave the datastore).
    pub fn remove_block(&mut self, node: &str) -> Result<(), LabError> {
        if self.spec.node(node).is_none() {
            return Err(LabError::Spec(format!("no node {node:?}")));
        }
        self.update_spec(|spec| {
            if let Some(n) = spec.node_mut(node) {
                n.block = None;
            }
        })
    }

    /// A host namespace `PREFIX-NAME` on the switch of `subnet` with address `addr` (and a
    /// default route via the router), e.g. a ToR router running BIRD.
    pub fn attach_host(&self, name: &str, addr: Ipv4Net) -> Result<String, LabError> {
        let subnet = addr.trunc();
        let i = self
            .spec
            .subnets()
            .iter()
            .position(|s| *s == subnet)
            .ok_or_else(|| LabError::Spec(format!("no lab subnet contains {addr}")))?;
        let ns = self.add_namespace(&format!("{}-{name}", self.cfg.prefix))?;
        let sw = self.switch_ns(i);
        let port = format!("h-{}", name.chars().take(13).collect::<String>());
        veth(&ns, "eth0", &sw, &port)?;
        ip(&sw, &["link", "set", &port, "master", "br0"])?;
        ip(&ns, &["addr", "add", &addr.to_string(), "dev", "eth0"])?;
        let gw = ClusterSpec::router_addr(subnet).to_string();
        ip(&ns, &["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        Ok(ns)
    }

    /// Starts `program args...` inside namespace `ns` with stdout and stderr going to
    /// `logs/LABEL.log`; it is stopped with the lab.
    pub fn spawn(
        &self,
        label: &str,
        ns: &str,
        program: &Path,
        args: &[String],
    ) -> Result<u32, LabError> {
        self.spawn_with_env(label, ns, program, args, &[])
    }

    /// [`Self::spawn`] with extra environment variables (`ip netns exec` passes them on).
    pub fn spawn_with_env(
        &self,
        label: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<u32, LabError> {
        super::check_interrupted()?;
        let log_path = self.log_path(label);
        let log = File::create(&log_path).map_err(|e| io_error(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| io_error(&log_path, e))?;
        let mut cmd = Command::new("ip");
        // Its own process group: a Ctrl-C at the terminal reaches the lab, which stops its
        // processes in order, and `--keep` leaves them running after the lab exits.
        cmd.process_group(0)
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("ip netns exec {ns} {}", program.display()),
            source,
        })?;
        let pid = child.id();
        self.lock().processes.push(Process {
            label: label.to_string(),
            child,
        });
        Ok(pid)
    }

    /// The agent's command line for `node` (after the binary).
    pub fn agent_args(&self, node: &str) -> Result<Vec<String>, LabError> {
        let n = self
            .spec
            .node(node)
            .ok_or_else(|| LabError::Spec(format!("no node {node:?}")))?;
        let c = &self.cfg;
        let family = self.spec.family;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--nodename".into(),
            n.name.clone(),
            "--ip".into(),
            if family.has_ipv4() {
                n.addr.to_string()
            } else {
                "none".into()
            },
        ];
        if family.has_ipv6()
            && let Some(addr6) = n.addr6
        {
            args.extend(["--ip6".into(), addr6.to_string()]);
        }
        args.extend([
            "--nic".into(),
            NIC.into(),
            "--datastore-type".into(),
            format!("dir:{}", self.datastore_dir().display()),
            "--metrics-addr".into(),
            format!("0.0.0.0:{}", c.metrics_port),
            "--hold-time".into(),
            c.hold_time.to_string(),
            "--connect-retry".into(),
            format!("{}ms", c.connect_retry.as_millis()),
            "--connect-retry-max".into(),
            format!("{}ms", c.connect_retry_max.as_millis()),
            "--ready-grace".into(),
            format!("{}ms", c.ready_grace.as_millis()),
            "--dir-poll".into(),
            format!("{}ms", c.dir_poll.as_millis()),
            "--log".into(),
            c.log_filter.clone(),
        ]);
        Ok(args)
    }

    /// Starts one agent per node (`podroute agent` inside the node's namespace).
    pub fn start_agents(&mut self) -> Result<(), LabError> {
        self.agents_started = Some(Instant::now());
        let names: Vec<String> = self.spec.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            self.start_agent(&name)?;
        }
        Ok(())
    }

    /// Starts the agent of `node`; its log is `logs/NODE.log`.
    pub fn start_agent(&mut self, node: &str) -> Result<(), LabError> {
        let args = self.agent_args(node)?;
        let binary = self.cfg.binary.clone();
        self.spawn(node, &self.node_ns(node), &binary, &args)?;
        self.agents.insert(node.to_string());
        Ok(())
    }

    /// Starts the agent of `node` with this command line (after the binary) and these extra
    /// environment variables, e.g. the kubernetes datastore with a `KUBECONFIG`. It counts as
    /// the node's agent for [`Self::wait_converged`].
    pub fn start_agent_with(
        &mut self,
        node: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<(), LabError> {
        let binary = self.cfg.binary.clone();
        self.spawn_with_env(node, &self.node_ns(node), &binary, args, env)?;
        self.agents.insert(node.to_string());
        Ok(())
    }

    /// The process id of the running process `label` (an agent: its node's name).
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.lock()
            .processes
            .iter()
            .find(|p| p.label == label)
            .map(|p| p.child.id())
    }

    /// Sends `signal` (`libc::SIGTERM`, `libc::SIGKILL`, ...) to the agent of `node` and waits
    /// up to `timeout` for it to exit (then SIGKILL and an error). The agent's log is kept as
    /// `logs/NODE.runN.log` (N = 1, 2, ...), so that the next [`Self::start_agent`] writes a
    /// fresh `logs/NODE.log`. Returns how long the agent took to exit.
    pub fn stop_agent(
        &mut self,
        node: &str,
        signal: i32,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let mut process = {
            let mut res = self.lock();
            let pos = res
                .processes
                .iter()
                .position(|p| p.label == node)
                .ok_or_else(|| LabError::Spec(format!("no process {node:?} was started")))?;
            res.processes.remove(pos)
        };
        self.agents.remove(node);
        let started = Instant::now();
        let wait_error = |e: std::io::Error| LabError::Spec(format!("waiting for {node}: {e}"));
        if process.child.try_wait().map_err(wait_error)?.is_none()
            && let Ok(pid) = libc::pid_t::try_from(process.child.id())
        {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped
            // child, so it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
        let result = loop {
            if process.child.try_wait().map_err(wait_error)?.is_some() {
                break Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                let _ = process.child.kill();
                let _ = process.child.wait();
                break Err(LabError::Timeout {
                    what: format!("the agent of {node} to exit after signal {signal}"),
                    after: timeout,
                    last: self.log_tail(node, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let log = self.log_path(node);
        let kept = (1..)
            .map(|n| self.workdir.join("logs").join(format!("{node}.run{n}.log")))
            .find(|p| !p.exists())
            .unwrap_or_else(|| self.workdir.join("logs").join(format!("{node}.old.log")));
        std::fs::rename(&log, &kept).map_err(|e| io_error(&log, e))?;
        result
    }

    /// Polls `GET /readyz` of `node`'s agent every 20 ms until it answers 200; the time it
    /// took. Fails early when the agent exits.
    pub fn wait_ready(&self, node: &str, timeout: Duration) -> Result<Duration, LabError> {
        let started = Instant::now();
        loop {
            super::check_interrupted()?;
            self.check_running(node)?;
            let last = match self.agent_get(node, "/readyz") {
                Ok((200, _)) => return Ok(started.elapsed()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("{node}'s agent to be ready"),
                    after: timeout,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bridge port (in its switch's namespace) that `node`'s `ens33` is plugged into.
    pub fn switch_port(&self, node: &str) -> Result<(String, String), LabError> {
        let index = self
            .spec
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| LabError::Spec(format!("no node {node:?}")))?;
        let subnet = self.spec.nodes[index].addr.trunc();
        let i = self
            .spec
            .subnets()
            .iter()
            .position(|s| *s == subnet)
            .ok_or_else(|| LabError::Spec(format!("no switch for {subnet}")))?;
        Ok((self.switch_ns(i), format!("port{index}")))
    }

    /// Unplugs (`up = false`) or plugs back `node`'s cable: sets its bridge port down or up.
    /// The node's own `ens33` stays administratively up (it loses carrier).
    pub fn set_node_link(&self, node: &str, up: bool) -> Result<(), LabError> {
        let (sw, port) = self.switch_port(node)?;
        ip(&sw, &["link", "set", &port, if up { "up" } else { "down" }]).map(drop)
    }

    /// Starts following the kernel route tables (podroute's protocol) of `nodes`, dumped
    /// every `interval` and between dumps through route notifications; see [`super::RouteWatch`].
    pub fn watch_kernel_routes(
        &self,
        nodes: &[&str],
        interval: Duration,
    ) -> Result<super::RouteWatch, LabError> {
        let pairs: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.to_string(), self.node_ns(n)))
            .collect();
        super::RouteWatch::start(&pairs, crate::dataplane::DEFAULT_ROUTE_PROTOCOL, interval)
    }

    /// `Err` with the exit status and the log's tail when the process `label` has exited.
    pub fn check_running(&self, label: &str) -> Result<(), LabError> {
        let mut res = self.lock();
        let Some(p) = res.processes.iter_mut().find(|p| p.label == label) else {
            return Err(LabError::Spec(format!("no process {label:?} was started")));
        };
        match p.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                drop(res);
                Err(LabError::Exited {
                    label: label.to_string(),
                    status: status.to_string(),
                    log: self.log_path(label),
                    tail: self.log_tail(label, 30),
                })
            }
            Err(e) => Err(LabError::Spec(format!("waiting for {label}: {e}"))),
        }
    }

    fn agent_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.cfg.metrics_port)
    }

    /// `GET path` from the agent of `node`: status code and body.
    pub fn agent_get(&self, node: &str, path: &str) -> Result<(u16, String), LabError> {
        netns::http_get(
            &self.node_ns(node),
            self.agent_addr(),
            path,
            Duration::from_secs(3),
        )
    }

    fn agent_json<T: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        path: &str,
    ) -> Result<T, LabError> {
        let (code, body) = self.agent_get(node, path)?;
        if code != 200 {
            return Err(LabError::Http {
                what: format!("GET {path} of {node}"),
                message: format!("HTTP {code}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| LabError::Http {
            what: format!("GET {path} of {node}"),
            message: format!("not the expected JSON ({e}): {body}"),
        })
    }

    /// The agent's `GET /status`.
    pub fn node_status(&self, node: &str) -> Result<AgentStatus, LabError> {
        self.agent_json(node, "/status")
    }

    /// The agent's `GET /routes`.
    pub fn routes(&self, node: &str) -> Result<RoutesReport, LabError> {
        self.agent_json(node, "/routes")
    }

    /// The agent's `GET /metrics` text.
    pub fn metrics(&self, node: &str) -> Result<String, LabError> {
        match self.agent_get(node, "/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(LabError::Http {
                what: format!("GET /metrics of {node}"),
                message: format!("HTTP {code}: {body}"),
            }),
        }
    }

    /// `ip route show proto PROTO` of `node` (IPv4 and IPv6) as sorted lines, without the
    /// `proto`, `metric 1024` and `linkdown` words: comparable with the plan's lines.
    pub fn kernel_routes(&self, node: &str) -> Result<Vec<String>, LabError> {
        let ns = self.node_ns(node);
        let proto = crate::dataplane::DEFAULT_ROUTE_PROTOCOL.to_string();
        let v4 = ip(&ns, &["route", "show", "table", "main", "proto", &proto])?;
        let v6 = ip(
            &ns,
            &["-6", "route", "show", "table", "main", "proto", &proto],
        )?;
        let mut lines: Vec<String> = v4
            .lines()
            .chain(v6.lines())
            .map(|l| {
                let l = l
                    .replace(&format!(" proto {proto}"), "")
                    .replace(" metric 1024", "")
                    .replace(" linkdown", "")
                    .replace(" pref medium", "");
                // IPv6 blackholes are shown on `lo`.
                match l.trim().strip_prefix("blackhole ") {
                    Some(rest) => format!("blackhole {}", rest.trim_end_matches(" dev lo")),
                    None => l.trim().to_string(),
                }
            })
            .filter(|l| !l.is_empty())
            .collect();
        lines.sort();
        Ok(lines)
    }

    /// `ip route` of `node`, as printed.
    pub fn ip_route(&self, node: &str) -> Result<String, LabError> {
        ip(&self.node_ns(node), &["route"])
    }

    /// Whether `node` has its tunnel device: `tunl0`, or `vxlan.calico` with `vxlanMode`.
    pub fn has_tunnel_device(&self, node: &str) -> bool {
        let device = if self.spec.vxlan_mode == crate::plan::EncapMode::Never {
            TUNNEL_DEVICE
        } else {
            crate::plan::VXLAN_DEVICE_V4
        };
        ip(&self.node_ns(node), &["link", "show", device]).is_ok()
    }

    /// The routes the kernel of `node` should hold, as `ip route` shows them: the expected
    /// plan, less the routes the kernel cannot hold here ([`Self::not_installable`]); a route
    /// that leaves the device to the kernel shows the NIC it resolves to.
    pub fn expected_kernel_routes(&self, node: &str) -> Result<Vec<String>, LabError> {
        let plan = self
            .spec
            .expected_plan(node)
            .ok_or_else(|| LabError::Spec(format!("no node {node:?}")))?;
        let tunnel = self.has_tunnel_device(node);
        let mut lines: Vec<String> = plan
            .routes
            .iter()
            .filter(|r| self.not_installable(node, r, tunnel).is_none())
            .map(|r| self.kernel_line(node, r))
            .collect();
        lines.sort();
        Ok(lines)
    }

    /// The planned `route` of `node` as `ip route` shows it once installed: a route that leaves
    /// the device to the kernel shows `ens33`, and when its gateway is on another subnet, the
    /// router as the gateway (the next hop resolved recursively, as BIRD's `gateway
    /// recursive` installs it); IPv6 routes show no scope.
    fn kernel_line(&self, node: &str, route: &DesiredRoute) -> String {
        let mut line = route.to_string();
        if route.device.is_none()
            && let Some(gw) = route.gateway
        {
            let n = self.spec.node(node);
            let router = match gw {
                IpAddr::V4(a) => n
                    .filter(|n| !n.addr.contains(&a))
                    .map(|n| IpAddr::V4(ClusterSpec::router_addr(n.addr.trunc()))),
                IpAddr::V6(a) => n
                    .and_then(|n| n.addr6)
                    .filter(|n6| !n6.contains(&a))
                    .map(|n6| IpAddr::V6(ClusterSpec::router_addr6(n6.trunc()))),
            };
            if let Some(router) = router {
                line = line.replace(&format!(" via {gw}"), &format!(" via {router}"));
            }
            line.push_str(&format!(" dev {NIC}"));
        }
        if route.prefix.addr().is_ipv6() {
            // `ip -6 route` shows no scope.
            line = line.replace(" scope link", "");
        }
        line
    }

    /// Why the kernel of `node` cannot hold the planned `route` in this lab, when it cannot:
    /// a tunnel route while the node has no `tunl0` (`tunnel` says whether it has one).
    pub fn not_installable(
        &self,
        _node: &str,
        route: &DesiredRoute,
        tunnel: bool,
    ) -> Option<&'static str> {
        if !tunnel && route.device.as_deref() == Some(TUNNEL_DEVICE) {
            return Some("no tunl0 on this node");
        }
        None
    }

    /// Three echo requests (ICMP or ICMPv6, 200 ms apart, 2 s for each reply) from the pod
    /// named `from_pod` to `to`, sent by the lab itself (no `ping` program needed): whether
    /// every reply came, and a summary naming what was lost and why.
    pub fn ping(&self, from_pod: &str, to: impl Into<IpAddr>) -> Result<(bool, String), LabError> {
        if self.spec.pod(from_pod).is_none() {
            return Err(LabError::Spec(format!("no pod {from_pod:?}")));
        }
        ping_from(&self.pod_ns(from_pod), to.into())
    }

    /// As [`Self::ping`], from the node's own namespace.
    pub fn ping_from_node(
        &self,
        node: &str,
        to: impl Into<IpAddr>,
    ) -> Result<(bool, String), LabError> {
        ping_from(&self.node_ns(node), to.into())
    }

    /// Why `node` has not converged yet, or `Ok` once its agent shows every other node as an
    /// Established mesh peer and reports exactly the expected plan, installed except for
    /// tunnel routes on a node without `tunl0`.
    pub fn node_converged(&self, node: &str) -> Result<(), String> {
        let status = self.node_status(node).map_err(|e| e.to_string())?;
        let mut waiting = Vec::new();
        for other in self.spec.nodes.iter().filter(|n| n.name != node) {
            for addr in other.ips(self.spec.family) {
                let addr = addr.to_string();
                match status
                    .peers
                    .iter()
                    .find(|p| p.address == addr && p.peer_type == PEER_TYPE_MESH)
                {
                    Some(p) if p.state == "Established" => {}
                    Some(p) => waiting.push(format!(
                        "mesh peer {} ({addr}) is {} ({})",
                        other.name, p.state, p.info
                    )),
                    None => waiting.push(format!("no mesh peer {} ({addr})", other.name)),
                }
            }
        }
        if !status.dataplane.programmed {
            waiting.push("dataplane not programmed yet".into());
        }
        let routes = self.routes(node).map_err(|e| e.to_string())?;
        if let Err(e) = self.routes_match_plan(node, &routes) {
            waiting.push(e);
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("{node}: {}", waiting.join("; ")))
        }
    }

    /// Compares the agent's route report with the expected plan: the same routes, each
    /// installed, except tunnel routes while there is no `tunl0` (those must be reported as
    /// not installed, with an error).
    pub fn routes_match_plan(&self, node: &str, report: &RoutesReport) -> Result<(), String> {
        let plan = self
            .spec
            .expected_plan(node)
            .ok_or_else(|| format!("no node {node:?}"))?;
        let tunnel = self.has_tunnel_device(node);
        let mut problems = Vec::new();
        for want in &plan.routes {
            match report.routes.iter().find(|r| same_route(r, want)) {
                None => problems.push(format!("route {want} not reported")),
                Some(row) if row.installed => {}
                Some(row)
                    if self.not_installable(node, want, tunnel).is_some()
                        && row.error.is_some() => {}
                Some(row) => problems.push(format!(
                    "route {want} not installed ({})",
                    row.error.as_deref().unwrap_or("no error given")
                )),
            }
        }
        for row in &report.routes {
            if !plan.routes.iter().any(|want| same_route(row, want)) {
                problems.push(format!("unexpected route {}", route_row_line(row)));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Polls every node until [`Self::node_converged`] holds for all of them; the time it took.
    /// Fails early when an agent exits.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Duration, LabError> {
        let start = Instant::now();
        wait_until("every node converged", timeout, || {
            for node in &self.agents {
                self.check_running(node).map_err(WaitError::Fatal)?;
            }
            let pending: Vec<String> = self
                .agents
                .iter()
                .filter_map(|node| self.node_converged(node).err())
                .collect();
            if pending.is_empty() {
                Ok(())
            } else {
                Err(WaitError::Pending(pending.join("\n")))
            }
        })?;
        Ok(start.elapsed())
    }

    /// Convergence time per IP family: polls every agent's kernel table (every 20 ms) until,
    /// for each family the cluster runs, every node holds exactly that family's expected
    /// routes ([`Self::expected_kernel_routes`]); returns per family the time from
    /// [`Self::start_agents`] to the first poll that saw it complete. Fails early when an
    /// agent exits.
    pub fn wait_routes_per_family(
        &self,
        timeout: Duration,
    ) -> Result<BTreeMap<IpVersion, Duration>, LabError> {
        let started = self
            .agents_started
            .ok_or_else(|| LabError::Spec("the agents were not started".into()))?;
        let family = self.spec.family;
        let versions: Vec<IpVersion> = [IpVersion::V4, IpVersion::V6]
            .into_iter()
            .filter(|v| match v {
                IpVersion::V4 => family.has_ipv4(),
                IpVersion::V6 => family.has_ipv6(),
            })
            .collect();
        let of = |line: &String, v: IpVersion| {
            let dst = line.trim_start_matches("blackhole ");
            let v6 = dst
                .split_whitespace()
                .next()
                .is_some_and(|d| d.contains(':'));
            v6 == (v == IpVersion::V6)
        };
        let mut done: BTreeMap<IpVersion, Duration> = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        loop {
            super::check_interrupted()?;
            for node in &self.agents {
                self.check_running(node)?;
            }
            let mut pending = Vec::new();
            let open: Vec<IpVersion> = versions
                .iter()
                .copied()
                .filter(|v| !done.contains_key(v))
                .collect();
            for v in &open {
                let mut complete = true;
                for node in &self.agents {
                    // The expectation depends on tunl0, which the agent makes after a while.
                    let want: Vec<String> = self
                        .expected_kernel_routes(node)?
                        .into_iter()
                        .filter(|l| of(l, *v))
                        .collect();
                    let have: Vec<String> = self
                        .kernel_routes(node)?
                        .into_iter()
                        .filter(|l| of(l, *v))
                        .collect();
                    if have != want {
                        complete = false;
                        pending.push(format!("{node} {}: have {have:?}, want {want:?}", v.name()));
                        break;
                    }
                    // Tunnel routes are left out of `want` while there is no tunl0: until the
                    // agent made it (or reports that it could not), the node is not done.
                    if *v == IpVersion::V4
                        && let Err(why) = self.tunnel_routes_settled(node)
                    {
                        complete = false;
                        pending.push(format!("{node} IPv4: {why}"));
                        break;
                    }
                }
                if complete {
                    done.insert(*v, started.elapsed());
                }
            }
            if done.len() == versions.len() {
                return Ok(done);
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: "every node's kernel routes, per family".into(),
                    after: timeout,
                    last: pending.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Ok` when `node` has `tunl0`, or plans no tunnel route, or its agent reports every
    /// planned tunnel route as failed with a reason (this machine cannot make `tunl0`).
    fn tunnel_routes_settled(&self, node: &str) -> Result<(), String> {
        if self.has_tunnel_device(node) {
            return Ok(());
        }
        let plan = self
            .spec
            .expected_plan(node)
            .ok_or_else(|| format!("no node {node:?}"))?;
        let tunnel: Vec<&DesiredRoute> = plan
            .routes
            .iter()
            .filter(|r| r.device.as_deref() == Some(TUNNEL_DEVICE))
            .collect();
        if tunnel.is_empty() {
            return Ok(());
        }
        let report = self.routes(node).map_err(|e| e.to_string())?;
        for want in tunnel {
            match report.routes.iter().find(|r| same_route(r, want)) {
                Some(row) if row.error.is_some() => {}
                _ => return Err(format!("no {TUNNEL_DEVICE} yet for {want}")),
            }
        }
        Ok(())
    }

    /// Stops everything and removes the namespaces and the work directory; returns what could
    /// not be removed. Also done on drop.
    pub fn cleanup(&mut self) -> Vec<String> {
        let problems = self.lock().release(Duration::from_secs(3));
        let _ = std::fs::remove_file(workdir_note(&self.cfg.prefix));
        problems
    }

    /// Leaves the lab running (`--keep`): nothing is stopped or removed on drop.
    pub fn keep(&mut self) {
        let mut res = self.lock();
        res.kept = true;
        res.keep_workdir = true;
    }

    /// Keeps the work directory (logs, datastore) when the rest is removed.
    pub fn keep_workdir(&mut self) {
        self.lock().keep_workdir = true;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.lock().kept {
            return;
        }
        for problem in self.cleanup() {
            tracing::warn!("lab cleanup: {problem}");
        }
    }
}

/// Interfaces made in `ns` from now on skip duplicate address detection, so their IPv6
/// addresses (link-local ones too) are usable at once, as the lab's fixed addresses are
/// unique by construction.
fn ipv6_namespace(ns: &str) -> Result<(), LabError> {
    for kv in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        sysctl(ns, kv)?;
    }
    Ok(())
}

fn ping_from(ns: &str, to: IpAddr) -> Result<(bool, String), LabError> {
    let report = super::echo(
        ns,
        to,
        3,
        Duration::from_millis(200),
        Duration::from_secs(2),
    )?;
    Ok((report.all_answered(), report.summary()))
}

/// Whether a reported route has the planned shape.
pub fn same_route(row: &RouteRow, want: &DesiredRoute) -> bool {
    let prefix_ok = row.prefix == want.prefix.to_string()
        || (want.prefix.prefix_len() == want.prefix.max_prefix_len()
            && row.prefix == want.prefix.addr().to_string());
    prefix_ok
        && row.gateway == want.gateway.map(|g| g.to_string())
        && row.device.as_deref() == want.device.as_deref()
        && row.onlink == want.onlink
}

/// A reported route in `ip route` syntax.
pub fn route_row_line(row: &RouteRow) -> String {
    let mut s = String::new();
    if row.kind == "blackhole" {
        s.push_str("blackhole ");
    }
    s.push_str(row.prefix.strip_suffix("/32").unwrap_or(&row.prefix));
    if let Some(gw) = &row.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(dev) = &row.device {
        s.push_str(&format!(" dev {dev}"));
    }
    if row.kind == "workload" {
        s.push_str(" scope link");
    }
    if row.onlink {
        s.push_str(" onlink");
    }
    s
}

/// Why a polled condition does not hold.
pub enum WaitError {
    Pending(String),
    Fatal(LabError),
}

/// Polls `check` every 100 ms until it returns `Ok`, a fatal error, or `timeout` passes
/// (then the last reason it gave).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, WaitError>,
) -> Result<T, LabError> {
    let start = Instant::now();
    loop {
        super::check_interrupted()?;
        match check() {
            Ok(value) => return Ok(value),
            Err(WaitError::Fatal(e)) => return Err(e),
            Err(WaitError::Pending(last)) if start.elapsed() >= timeout => {
                return Err(LabError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    last,
                });
            }
            Err(WaitError::Pending(_)) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn io_error(path: &Path, source: std::io::Error) -> LabError {
    LabError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unique_salt() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
