//! The `podroute lab` command: build, start, wait, show, check, summarize, clean up.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cluster::{Lab, LabConfig, PEER_TYPE_MESH, route_row_line, same_route};
use super::spec::{ClusterSpec, Family, IpVersion, NodeSpec};
use super::{LabError, netns};
use crate::plan::TUNNEL_DEVICE;

/// `podroute lab` options.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub prefix: String,
    /// Leave the lab running afterwards.
    pub keep: bool,
    /// The `podroute` binary the agents run (default: this executable).
    pub binary: Option<PathBuf>,
    /// How long to wait for the agents to converge.
    pub timeout: Duration,
    /// Which address families the cluster runs.
    pub family: Family,
    /// The IPv4 pool's encapsulation.
    pub encap: LabEncap,
}

/// `podroute lab --encap`: what the lab's IPv4 pool's encapsulation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LabEncap {
    /// `ipipMode: CrossSubnet` (seed 001 after its edit): `tunl0` across the router.
    #[default]
    Ipip,
    /// `vxlanMode: CrossSubnet`: the kernel's `vxlan.calico` across the router.
    Vxlan,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            prefix: super::DEFAULT_PREFIX.into(),
            keep: false,
            binary: None,
            timeout: Duration::from_secs(60),
            family: Family::Ipv4,
            encap: LabEncap::Ipip,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    /// Cannot work on this machine; not a failure.
    NotAvailable,
}

struct Check {
    outcome: Outcome,
    name: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, out: &mut dyn Write, outcome: Outcome, name: String, detail: String) {
        if super::interrupted() {
            // The Ctrl-C handler is removing the lab; what fails now says nothing.
            return;
        }
        let tag = match outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::NotAvailable => "N/A ",
        };
        say(out, &format!("  {tag}  {name}"));
        if !detail.is_empty() {
            say(out, &indent(&detail, "          "));
        }
        self.0.push(Check { outcome, name });
    }

    fn pass_if(&mut self, out: &mut dyn Write, ok: bool, name: String, detail: String) {
        let outcome = if ok { Outcome::Pass } else { Outcome::Fail };
        self.add(out, outcome, name, detail);
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.0.iter().filter(|c| c.outcome == outcome).count()
    }
}

fn say(out: &mut dyn Write, text: &str) {
    // The lab goes on (and cleans up) even when its output is gone.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| format!("{by}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the lab: returns `Ok(true)` when every check that should pass on this machine
/// passed. Output goes to `out`. Everything is removed before returning unless
/// `opts.keep`; on Ctrl-C see [`super::install_signal_cleanup`].
pub fn run(opts: &LabOptions, out: &mut dyn Write) -> Result<bool, LabError> {
    if !super::is_root() {
        return Err(LabError::NotRoot);
    }
    let binary = match &opts.binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(|source| LabError::Io {
            path: "/proc/self/exe".into(),
            source,
        })?,
    };
    check_tools()?;
    let cfg = LabConfig::new(&opts.prefix, &binary);
    let mut spec = ClusterSpec::seed_family(opts.family);
    let mode = match opts.encap {
        LabEncap::Ipip => "ipipMode",
        LabEncap::Vxlan => {
            spec.ipip_mode = crate::plan::EncapMode::Never;
            spec.vxlan_mode = crate::plan::EncapMode::CrossSubnet;
            "vxlanMode"
        }
    };
    let pools = match opts.family {
        Family::Ipv4 => format!("IPv4 pool {mode} CrossSubnet"),
        Family::Dual => format!("dual-stack: IPv4 pool {mode} CrossSubnet, IPv6 pool Never"),
        Family::Ipv6 => "IPv6-only: IPv6 pool Never, no IPv4 anywhere".to_string(),
    };
    say(
        out,
        &format!(
            "podroute lab --family {}: seed 001's cluster ({pools}) plus node02 behind a \
             router, in network namespaces {}-*",
            opts.family.name(),
            opts.prefix
        ),
    );
    let started = Instant::now();
    let mut lab = Lab::build(cfg, spec)?;
    say(
        out,
        &format!(
            "built {} namespaces in {:.1?}; work dir {} (datastore: datastore/, agent logs: logs/)",
            lab.namespaces().len(),
            started.elapsed(),
            lab.workdir().display()
        ),
    );
    say(out, &describe(&lab));
    say(out, "");

    let mut checks = Checks::default();
    let result = exercise(&mut lab, opts.timeout, out, &mut checks);
    if super::interrupted() {
        // The Ctrl-C handler removes the lab and exits the process; leave it the lab.
        loop {
            std::thread::park();
        }
    }
    if let Err(e) = &result {
        checks.add(out, Outcome::Fail, "lab run".into(), e.to_string());
    }

    let (pass, fail, na) = (
        checks.count(Outcome::Pass),
        checks.count(Outcome::Fail),
        checks.count(Outcome::NotAvailable),
    );
    say(out, "");
    say(
        out,
        &format!(
            "lab summary ({}): {pass} checks passed, {fail} failed, {na} not available here",
            opts.family.name()
        ),
    );
    for c in checks.0.iter().filter(|c| c.outcome == Outcome::Fail) {
        say(out, &format!("  failed: {}", c.name));
    }
    if fail > 0 && !opts.keep {
        lab.keep_workdir();
        say(
            out,
            &format!(
                "kept the agent logs and the datastore for a look: {}",
                lab.workdir().display()
            ),
        );
    }
    if opts.keep {
        lab.keep();
        say(out, &keep_instructions(&lab, &binary));
    } else {
        let namespaces = lab.namespaces().len();
        let problems = lab.cleanup();
        if problems.is_empty() {
            let workdir = if fail > 0 { "kept" } else { "deleted" };
            say(
                out,
                &format!(
                    "removed the lab: agents stopped, {namespaces} namespaces deleted, work dir \
                     {workdir}"
                ),
            );
        } else {
            say(out, "cleanup left something behind:");
            for p in &problems {
                say(out, &format!("  {p}"));
            }
            say(
                out,
                &format!("run `podroute lab --cleanup --prefix {}`", opts.prefix),
            );
        }
    }
    Ok(fail == 0)
}

/// The programs the lab runs: only iproute2's `ip` (namespaces, links, addresses, routes).
/// Pings are the lab's own ICMP echo and sysctls are written to `/proc/sys`.
fn check_tools() -> Result<(), LabError> {
    match std::process::Command::new("ip")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(LabError::MissingTool {
            tool: "ip".into(),
            package: "iproute2".into(),
            why: format!("`ip -V` exited with {status}"),
        }),
        Err(e) => Err(LabError::MissingTool {
            tool: "ip".into(),
            package: "iproute2".into(),
            why: e.to_string(),
        }),
    }
}

/// One line per switch, router and node.
fn describe(lab: &Lab) -> String {
    let family = lab.spec.family;
    let mut s = String::new();
    for (i, subnet) in lab.spec.subnets().iter().enumerate() {
        let mut nets = Vec::new();
        if family.has_ipv4() {
            nets.push(format!(
                "{subnet}, router {}",
                ClusterSpec::router_addr(*subnet)
            ));
        }
        if let Some(subnet6) = lab.spec.subnet6(*subnet) {
            nets.push(format!(
                "{subnet6}, router {}",
                ClusterSpec::router_addr6(subnet6)
            ));
        }
        let _ = writeln!(
            s,
            "  {:<24} bridge for {}",
            lab.switch_ns(i),
            nets.join("; ")
        );
    }
    let _ = writeln!(s, "  {:<24} forwards between the subnets", lab.router_ns());
    for n in &lab.spec.nodes {
        let pods: Vec<String> = n
            .pods
            .iter()
            .map(|p| {
                let ips: Vec<String> = p.ips(family).iter().map(ToString::to_string).collect();
                format!(
                    "pod {}/{} {} on {}",
                    p.namespace,
                    p.name,
                    ips.join(" "),
                    p.interface()
                )
            })
            .collect();
        let mut addrs = Vec::new();
        if family.has_ipv4() {
            addrs.push(n.addr.to_string());
        }
        if let Some(a6) = n.addr6.filter(|_| family.has_ipv6()) {
            addrs.push(a6.to_string());
        }
        let blocks: Vec<String> = n.blocks(family).iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "  {:<24} {} {} block {}, {}",
            lab.node_ns(&n.name),
            super::NIC,
            addrs.join(" "),
            if blocks.is_empty() {
                "-".to_string()
            } else {
                blocks.join(" ")
            },
            pods.join(", ")
        );
    }
    s.trim_end().to_string()
}

fn exercise(
    lab: &mut Lab,
    timeout: Duration,
    out: &mut dyn Write,
    checks: &mut Checks,
) -> Result<(), LabError> {
    if !lab.spec.family.has_ipv4() {
        say(out, "ipip: not used (no IPv4 pool)");
    } else if lab.spec.vxlan_mode != crate::plan::EncapMode::Never {
        say(
            out,
            "vxlan: the agents make vxlan.calico (VNI 4096, port 4789) with the kernel's vxlan \
             module; pods across the router reach each other through it",
        );
    } else if lab.ipip_available() {
        say(
            out,
            "ipip: this kernel can make IPIP devices; pods across the router must reach each other",
        );
    } else {
        say(
            out,
            "ipip: this kernel has no ipip module (`ip link add type ipip` fails); the agents make \
             tunl0 in userspace (TUN device + raw IP-protocol-4 socket, --ipip-dataplane auto)",
        );
    }
    lab.start_agents()?;
    let names: Vec<String> = lab.spec.nodes.iter().map(|n| n.name.clone()).collect();
    say(
        out,
        &format!(
            "started {} agents ({} agent --hold-time {} --connect-retry {:?} ...), waiting up to \
             {:?} for the mesh and the routes",
            names.len(),
            lab.cfg.binary.display(),
            lab.cfg.hold_time,
            lab.cfg.connect_retry,
            timeout
        ),
    );
    match lab.wait_routes_per_family(timeout) {
        Ok(times) => {
            for (version, took) in times {
                checks.add(
                    out,
                    Outcome::Pass,
                    format!(
                        "{} routes as planned in every node's kernel {took:.2?} after the agents \
                         started",
                        version.name()
                    ),
                    String::new(),
                );
            }
        }
        Err(LabError::Interrupted) => return Err(LabError::Interrupted),
        Err(e) => checks.add(
            out,
            Outcome::Fail,
            "kernel routes per family".into(),
            e.to_string(),
        ),
    }
    match lab.wait_converged(timeout) {
        Ok(took) => checks.add(
            out,
            Outcome::Pass,
            format!(
                "every agent converged (full mesh Established, routes as planned) in {took:.1?}"
            ),
            String::new(),
        ),
        Err(LabError::Interrupted) => return Err(LabError::Interrupted),
        Err(e) => {
            checks.add(out, Outcome::Fail, "agents converged".into(), e.to_string());
            for name in &names {
                say(out, &format!("--- last lines of {name}'s log:"));
                say(out, &lab.log_tail(name, 15));
            }
        }
    }
    say(out, "");

    for name in &names {
        show_node(lab, out, name);
    }

    say(out, "checks:");
    for name in &names {
        check_node(lab, out, checks, name);
    }
    if lab.spec.family.has_ipv4() {
        check_cross_subnet_routes(lab, out, checks);
    }
    if lab.spec.family.has_ipv6() {
        check_cross_subnet_routes6(lab, out, checks);
    }
    check_pings(lab, out, checks)?;
    Ok(())
}

/// `podroute status`, `podroute routes` and `ip route` of one node.
fn show_node(lab: &Lab, out: &mut dyn Write, name: &str) {
    let ns = lab.node_ns(name);
    let binary = lab.cfg.binary.to_string_lossy().into_owned();
    let agent = format!("http://127.0.0.1:{}", lab.cfg.metrics_port);
    for sub in ["status", "routes"] {
        say(
            out,
            &format!("=== {name}: podroute {sub}   (ip netns exec {ns} podroute {sub})"),
        );
        match netns::exec(&ns, &binary, &[sub, "--agent", &agent]) {
            Ok((true, text)) => say(out, text.trim_end()),
            Ok((false, text)) => say(out, &format!("(podroute {sub} failed: {})", text.trim())),
            Err(e) => say(out, &format!("(podroute {sub} failed: {e})")),
        }
    }
    let family = lab.spec.family;
    if family.has_ipv4() {
        say(out, &format!("=== {name}: ip route"));
        match lab.ip_route(name) {
            Ok(text) => say(out, text.trim_end()),
            Err(e) => say(out, &format!("({e})")),
        }
    }
    if family.has_ipv6() {
        say(out, &format!("=== {name}: ip -6 route"));
        match netns::ip(&ns, &["-6", "route"]) {
            Ok(text) => say(out, text.trim_end()),
            Err(e) => say(out, &format!("({e})")),
        }
    }
    say(out, "");
}

fn check_node(lab: &Lab, out: &mut dyn Write, checks: &mut Checks, name: &str) {
    let family = lab.spec.family;
    let others: Vec<&NodeSpec> = lab.spec.nodes.iter().filter(|n| n.name != name).collect();
    match lab.node_status(name) {
        Ok(status) => {
            let up: Vec<&crate::agent::status::PeerRow> = status
                .peers
                .iter()
                .filter(|p| p.peer_type == PEER_TYPE_MESH && p.state == "Established")
                .collect();
            for version in [IpVersion::V4, IpVersion::V6] {
                let want: Vec<String> = others
                    .iter()
                    .flat_map(|o| o.ips(family))
                    .filter(|a| IpVersion::of(*a) == version)
                    .map(|a| a.to_string())
                    .collect();
                if want.is_empty() {
                    continue;
                }
                let have: Vec<String> = up
                    .iter()
                    .filter(|p| want.contains(&p.address))
                    .map(|p| format!("{} {}", p.name, p.address))
                    .collect();
                let ok = have.len() == want.len();
                checks.pass_if(
                    out,
                    ok,
                    format!(
                        "{name}: {} {} mesh peers Established ({})",
                        have.len(),
                        version.name(),
                        have.join(", ")
                    ),
                    if ok {
                        String::new()
                    } else {
                        format!(
                            "expected all of {}; peers: {:?}",
                            want.join(", "),
                            status.peers
                        )
                    },
                );
            }
        }
        Err(e) => checks.add(out, Outcome::Fail, format!("{name}: status"), e.to_string()),
    }
    match (lab.kernel_routes(name), lab.expected_kernel_routes(name)) {
        (Ok(have), Ok(want)) => {
            let ok = have == want;
            checks.pass_if(
                out,
                ok,
                format!(
                    "{name}: kernel routes (ip route show proto 157, both families) are the \
                     plan's {} routes",
                    want.len()
                ),
                if ok {
                    String::new()
                } else {
                    format!(
                        "expected:\n{}\nkernel:\n{}",
                        indent(&want.join("\n"), "  "),
                        indent(&have.join("\n"), "  ")
                    )
                },
            );
        }
        (Err(e), _) | (_, Err(e)) => checks.add(
            out,
            Outcome::Fail,
            format!("{name}: kernel routes"),
            e.to_string(),
        ),
    }
    match lab.routes(name) {
        Ok(report) => {
            let result = lab.routes_match_plan(name, &report);
            checks.pass_if(
                out,
                result.is_ok(),
                format!(
                    "{name}: the agent reports the planned routes ({} routes)",
                    report.routes.len()
                ),
                result.err().unwrap_or_default(),
            );
        }
        Err(e) => checks.add(out, Outcome::Fail, format!("{name}: routes"), e.to_string()),
    }
}

/// Every node's route to each block across the router is `via NODE dev tunl0 onlink`.
fn check_cross_subnet_routes(lab: &Lab, out: &mut dyn Write, checks: &mut Checks) {
    for from in &lab.spec.nodes {
        let Ok(report) = lab.routes(&from.name) else {
            continue;
        };
        let plan = lab.spec.expected_plan(&from.name).unwrap_or_default();
        for to in lab
            .spec
            .nodes
            .iter()
            .filter(|to| !ClusterSpec::same_subnet(from, to))
        {
            let Some(block) = to.block else { continue };
            let want = match lab.spec.vtep(to) {
                Some((vtep, _)) => {
                    format!(
                        "{block} via {vtep} dev {} onlink",
                        crate::plan::VXLAN_DEVICE_V4
                    )
                }
                None => format!("{block} via {} dev {TUNNEL_DEVICE} onlink", to.ip()),
            };
            let planned = plan.routes.iter().find(|r| r.to_string() == want);
            let row = planned.and_then(|p| report.routes.iter().find(|r| same_route(r, p)));
            let state = match row {
                Some(r) if r.installed => "installed".to_string(),
                Some(r) => format!(
                    "not installed: {}",
                    r.error.as_deref().unwrap_or("no reason given")
                ),
                None => "missing".to_string(),
            };
            checks.pass_if(
                out,
                row.is_some(),
                format!(
                    "{} -> {} block: \"{want}\" planned and reported ({state})",
                    from.name, to.name
                ),
                if row.is_some() {
                    String::new()
                } else {
                    reported_routes(&report)
                },
            );
        }
    }
}

/// Every node's IPv6 route to each block across the router (pool `Never`): planned as
/// `BLOCK via NODE6` and installed via the router (the next hop resolved recursively).
fn check_cross_subnet_routes6(lab: &Lab, out: &mut dyn Write, checks: &mut Checks) {
    for from in &lab.spec.nodes {
        let Ok(report) = lab.routes(&from.name) else {
            continue;
        };
        let plan = lab.spec.expected_plan(&from.name).unwrap_or_default();
        for to in lab
            .spec
            .nodes
            .iter()
            .filter(|to| !ClusterSpec::same_subnet(from, to))
        {
            let (Some(block), Some(addr6)) = (to.block6, to.addr6) else {
                continue;
            };
            let want = format!("{block} via {}", addr6.addr());
            let planned = plan.routes.iter().find(|r| r.to_string() == want);
            let row = planned.and_then(|p| report.routes.iter().find(|r| same_route(r, p)));
            let state = match row {
                Some(r) if r.installed => "installed".to_string(),
                Some(r) => format!(
                    "not installed: {}",
                    r.error.as_deref().unwrap_or("no reason given")
                ),
                None => "missing".to_string(),
            };
            let ok = row.is_some_and(|r| r.installed);
            checks.pass_if(
                out,
                ok,
                format!(
                    "{} -> {} IPv6 block across the router: \"{want}\" planned and reported \
                     ({state})",
                    from.name, to.name
                ),
                if ok {
                    String::new()
                } else {
                    reported_routes(&report)
                },
            );
        }
    }
}

fn check_pings(lab: &Lab, out: &mut dyn Write, checks: &mut Checks) -> Result<(), LabError> {
    let nodes = lab.spec.nodes.clone();
    let family = lab.spec.family;
    // The underlay across the router, which IPIP packets (and BGP sessions) take.
    for from in &nodes {
        for to in nodes.iter().filter(|to| to.name != from.name) {
            if ClusterSpec::same_subnet(from, to) || from.name > to.name {
                continue;
            }
            for addr in to.ips(family) {
                let (ok, text) = lab.ping_from_node(&from.name, addr)?;
                checks.pass_if(
                    out,
                    ok,
                    format!(
                        "underlay: node {} pings node {} ({addr}) through the router",
                        from.name, to.name,
                    ),
                    if ok { String::new() } else { text },
                );
            }
        }
    }
    for from in &nodes {
        for to in nodes.iter().filter(|to| to.name != from.name) {
            for p in &from.pods {
                for q in &to.pods {
                    for (src, dst) in p.ips(family).into_iter().zip(q.ips(family)) {
                        let name = format!(
                            "ping pod {} ({src}, {}) -> pod {} ({dst}, {})",
                            p.name, from.name, q.name, to.name
                        );
                        let across = !ClusterSpec::same_subnet(from, to);
                        let tunnels =
                            lab.has_tunnel_device(&from.name) && lab.has_tunnel_device(&to.name);
                        // IPv6 (pool Never) is routed across the router, not tunnelled.
                        let tunnelled =
                            dst.is_ipv4() && lab.spec.ipip_mode != crate::plan::EncapMode::Never;
                        if across && tunnelled && !tunnels {
                            checks.add(
                                out,
                                Outcome::NotAvailable,
                                name,
                                "across the router: no tunl0 on one of the nodes (see the agent \
                                 logs)"
                                    .into(),
                            );
                            continue;
                        }
                        let (ok, text) = lab.ping(&p.name, dst)?;
                        checks.pass_if(out, ok, name, if ok { String::new() } else { text });
                    }
                }
            }
        }
    }
    Ok(())
}

fn keep_instructions(lab: &Lab, binary: &std::path::Path) -> String {
    let first = lab
        .spec
        .nodes
        .first()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let pod = lab
        .spec
        .nodes
        .first()
        .and_then(|n| n.pods.first())
        .map(|p| p.name.clone())
        .unwrap_or_default();
    format!(
        "\nthe lab keeps running (--keep). Explore it:\n  \
         ip netns list | grep {prefix}-\n  \
         ip netns exec {node_ns} {bin} status\n  \
         ip netns exec {node_ns} {bin} routes\n  \
         ip -n {node_ns} route\n  \
         ip netns exec {pod_ns} ping 172.16.196.129   (IPv6: ping fd00:172:16:196::81)\n  \
         edit the objects in {ds} (the agents re-read it every {poll:?})\n  \
         agent logs: {logs}\n\
         remove it:\n  {bin} lab --cleanup --prefix {prefix}",
        prefix = lab.cfg.prefix,
        node_ns = lab.node_ns(&first),
        pod_ns = lab.pod_ns(&pod),
        bin = binary.display(),
        ds = lab.datastore_dir().display(),
        poll = lab.cfg.dir_poll,
        logs = lab.workdir().join("logs").display(),
    )
}

/// The routes a node reported, indented, for a failed check's detail.
fn reported_routes(report: &crate::agent::status::RoutesReport) -> String {
    format!(
        "reported routes:\n{}",
        indent(
            &report
                .routes
                .iter()
                .map(route_row_line)
                .collect::<Vec<_>>()
                .join("\n"),
            "  "
        )
    )
}
