//! `podroute lab --model flannel`: seed 000's flannel cluster (master 192.168.0.39, node1
//! 192.168.0.22, node2 192.168.0.8 on one /26, podCIDRs 10.244.0-2.0/24, the seed's VTEP
//! MACs), with one `podroute agent --model flannel` per node reading the objects flannel's
//! manifest and flanneld leave (ConfigMap `kube-flannel-cfg`, annotated Nodes) from a YAML
//! directory.
//!
//! ```text
//!           PREFIX-switch (bridge br0, 192.168.0.0/26)
//!        |                     |                     |
//!  PREFIX-master .39     PREFIX-node1 .22      PREFIX-node2 .8
//! ```
//!
//! It prints, per node, the tables podroute plans (in the seed's `route -n`, `arp -n` and
//! `bridge fdb` formats) and what the node's kernel holds, and checks `subnet.env` and the
//! routes. Without root it prints the planned tables only. Packets only go between the
//! namespaces the lab creates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

use super::{LabError, LabOptions, cleanup_prefix, is_root, netns};
use crate::agent::flannel::{FlannelMode, pod_mtu, subnet_env};
use crate::model::NodeInfo;
use crate::model::flannel::{FlannelNode, NetConf};
use crate::plan::flannel::{FlannelPlan, tables};
use crate::state::ClusterState;

/// Seed 000's nodes: name, address with the NIC's prefix (node1's `route -n`: eth0 is
/// 192.168.0.0/26), podCIDR, VTEP MAC.
pub const SEED000: [(&str, &str, &str, &str); 3] = [
    (
        "master",
        "192.168.0.39/26",
        "10.244.0.0/24",
        "fe:be:87:93:06:e2",
    ),
    (
        "node1",
        "192.168.0.22/26",
        "10.244.1.0/24",
        "0e:61:06:ff:7a:73",
    ),
    (
        "node2",
        "192.168.0.8/26",
        "10.244.2.0/24",
        "0a:72:bf:3f:cd:40",
    ),
];

/// The nodes' NIC, as in seed 000.
const NIC: &str = "eth0";

/// flannel's manifest config, as seed 000 applied it.
const NET_CONF: &str = r#"{
  "Network": "10.244.0.0/16",
  "Backend": {
    "Type": "vxlan"
  }
}"#;

/// The lab's objects as YAML: the ConfigMap and the Nodes as flanneld annotated them.
pub fn objects_yaml() -> String {
    let indented: String = NET_CONF.lines().map(|l| format!("    {l}\n")).collect();
    let mut text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube-flannel-cfg\n  \
         namespace: kube-flannel\ndata:\n  net-conf.json: |\n{indented}"
    );
    for (name, addr, cidr, mac) in SEED000 {
        let ip = addr.split('/').next().unwrap_or(addr);
        text += &format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    \
             flannel.alpha.coreos.com/backend-data: '{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}'\n    \
             flannel.alpha.coreos.com/backend-type: vxlan\n    \
             flannel.alpha.coreos.com/kube-subnet-manager: \"true\"\n    \
             flannel.alpha.coreos.com/public-ip: {ip}\nspec:\n  podCIDR: {cidr}\n  \
             podCIDRs: [{cidr}]\nstatus:\n  addresses:\n  - type: InternalIP\n    \
             address: {ip}\n"
        );
    }
    text
}

/// The state the agents build from [`objects_yaml`], for planning here.
fn lab_state(local: &str) -> Result<ClusterState, LabError> {
    let mut state = ClusterState {
        local_node: local.to_string(),
        ..ClusterState::default()
    };
    let bad = |e: String| LabError::Command {
        command: "lab objects".into(),
        output: e,
    };
    for document in objects_yaml().split("---\n").skip(1) {
        let node: Node = serde_yaml_ng::from_str(document).map_err(|e| bad(e.to_string()))?;
        let info = NodeInfo::from_node(&node).map_err(|e| bad(e.to_string()))?;
        state.nodes.insert(info.name.clone(), info);
    }
    Ok(state)
}

fn net_conf() -> Result<NetConf, LabError> {
    NetConf::parse(NET_CONF).map_err(|e| LabError::Command {
        command: "net-conf.json".into(),
        output: e.to_string(),
    })
}

/// What podroute plans for `node` from the lab's objects.
pub fn planned(node: &str) -> Result<(FlannelPlan, Option<String>), LabError> {
    let conf = net_conf()?;
    let state = lab_state(node)?;
    let addr: Option<Ipv4Net> = SEED000
        .iter()
        .find(|(n, ..)| *n == node)
        .and_then(|(_, a, ..)| a.parse().ok());
    let mut mode = FlannelMode::new(conf.clone(), "lab".into(), PathBuf::new(), false);
    let local = mode.local(&state, node, addr, None, NIC);
    let (plan, _) = mode.plan(&state, &local);
    let lease: Option<&FlannelNode> = mode.own_lease(&state);
    // The lab's veths have the kernel's default MTU, 1500, as seed 000's eth0.
    let env = subnet_env(&conf, lease, pod_mtu(&conf, &plan.tunnels, 1500), false);
    Ok((plan, env))
}

fn say(out: &mut dyn Write, text: &str) {
    let _ = writeln!(out, "{text}");
}

fn print_planned(out: &mut dyn Write, node: &str, plan: &FlannelPlan) {
    let (routes, arp, fdb) = tables(plan);
    say(
        out,
        &format!("--- {node}: planned (route -n | arp -n | bridge fdb)"),
    );
    for line in routes.iter().chain(&arp).chain(&fdb) {
        say(out, &format!("  {line}"));
    }
    for device in &plan.tunnels.vxlan {
        say(
            out,
            &format!(
                "  device {} vxlan id {} local {} dev {} dstport {} address {} mac {}",
                device.name,
                device.vni,
                device.local,
                device.parent,
                device.port,
                device.address.map(|a| a.to_string()).unwrap_or_default(),
                device.mac
            ),
        );
    }
}

/// Kills the agents it holds (processes the lab started) when dropped.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn build(prefix: &str) -> Result<(), LabError> {
    let switch = format!("{prefix}-switch");
    netns::add(&switch)?;
    netns::ip(&switch, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip(&switch, &["link", "set", "br0", "up"])?;
    for (name, addr, ..) in SEED000 {
        let ns = format!("{prefix}-{name}");
        netns::add(&ns)?;
        let port = format!("p-{name}");
        netns::veth(&ns, NIC, &switch, &port)?;
        netns::ip(&switch, &["link", "set", &port, "master", "br0"])?;
        netns::ip(&ns, &["addr", "add", addr, "dev", NIC])?;
    }
    for (name, _, cidr, _) in SEED000 {
        let (gateway, pod_addr) = pod_addresses(cidr)?;
        let ns = format!("{prefix}-{name}");
        let pod = format!("{prefix}-{name}-pod");
        // As the flannel CNI plugin (bridge + host-local IPAM) leaves a node with one pod:
        // `cni0` with the subnet's first address, the pod's eth0 behind it.
        netns::add(&pod)?;
        netns::ip(&ns, &["link", "add", "cni0", "type", "bridge"])?;
        netns::ip(&ns, &["addr", "add", &gateway.to_string(), "dev", "cni0"])?;
        netns::ip(&ns, &["link", "set", "cni0", "up"])?;
        netns::veth(&ns, "veth-pod", &pod, "eth0")?;
        netns::ip(&ns, &["link", "set", "veth-pod", "master", "cni0"])?;
        netns::ip(&pod, &["addr", "add", &pod_addr.to_string(), "dev", "eth0"])?;
        netns::ip(
            &pod,
            &[
                "route",
                "add",
                "default",
                "via",
                &gateway.addr().to_string(),
            ],
        )?;
        netns::sysctl(&ns, "net.ipv4.ip_forward=1")?;
    }
    Ok(())
}

/// The bridge's (`cni0`) and the pod's address in a node's podCIDR: its first and second
/// host addresses, with the podCIDR's length.
pub fn pod_addresses(cidr: &str) -> Result<(Ipv4Net, Ipv4Net), LabError> {
    let bad = || LabError::Spec(format!("podCIDR {cidr:?} has no two host addresses"));
    let net: Ipv4Net = cidr.parse().map_err(|_| bad())?;
    let mut hosts = net.hosts();
    let (Some(gateway), Some(pod)) = (hosts.next(), hosts.next()) else {
        return Err(bad());
    };
    let with_len = |a| Ipv4Net::new(a, net.prefix_len()).map_err(|_| bad());
    Ok((with_len(gateway)?, with_len(pod)?))
}

/// What of `plan`'s VXLAN device and VTEP entries the kernel's `ip -d link show DEV`, `ip
/// neigh show dev DEV` and `bridge fdb show dev DEV` outputs lack; empty when they hold all
/// of it (VNI, port, `nolearning`, MAC, MTU `mtu`, address; per peer the permanent
/// neighbour and the permanent FDB entry to its underlay address).
pub fn vtep_mismatches(
    plan: &FlannelPlan,
    mtu: u32,
    link: &str,
    addr: &str,
    neigh: &str,
    fdb: &str,
) -> Vec<String> {
    let words = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let link_words: Vec<String> = words(link).into_iter().flatten().collect();
    let has_pair = |key: &str, value: &str| {
        link_words
            .windows(2)
            .any(|w| w[0] == key && w[1].eq_ignore_ascii_case(value))
    };
    let mut missing = Vec::new();
    for device in &plan.tunnels.vxlan {
        for (key, value) in [
            ("id", device.vni.to_string()),
            ("dstport", device.port.to_string()),
            ("link/ether", device.mac.to_string()),
            ("mtu", mtu.to_string()),
            ("local", device.local.to_string()),
        ] {
            if !has_pair(key, &value) {
                missing.push(format!("{}: {key} {value}", device.name));
            }
        }
        if !link_words.iter().any(|w| w == "nolearning") {
            missing.push(format!("{}: nolearning", device.name));
        }
        if let Some(a) = device.address
            && !words(addr).iter().any(|l| {
                l.windows(2)
                    .any(|w| w[0] == "inet" && w[1] == a.to_string())
            })
        {
            missing.push(format!("{}: address {a}", device.name));
        }
    }
    let neigh = words(neigh);
    let fdb = words(fdb);
    for p in &plan.tunnels.vxlan_peers {
        let (ip, mac, dst) = (
            p.tunnel_ip.to_string(),
            p.mac.to_string(),
            p.underlay.to_string(),
        );
        let neigh_ok = neigh.iter().any(|l| {
            l.first() == Some(&ip)
                && l.windows(2)
                    .any(|w| w[0] == "lladdr" && w[1].eq_ignore_ascii_case(&mac))
                && l.iter().any(|w| w == "PERMANENT")
        });
        if !neigh_ok {
            missing.push(format!("neighbour {ip} lladdr {mac} PERMANENT"));
        }
        let fdb_ok = fdb.iter().any(|l| {
            l.first().is_some_and(|m| m.eq_ignore_ascii_case(&mac))
                && l.windows(2).any(|w| w[0] == "dst" && w[1] == dst)
                && l.iter().any(|w| w == "self")
                && l.iter().any(|w| w == "permanent")
        });
        if !fdb_ok {
            missing.push(format!("fdb {mac} dst {dst} self permanent"));
        }
    }
    missing
}

fn start_agent(
    prefix: &str,
    binary: &Path,
    workdir: &Path,
    node: &str,
    addr: &str,
) -> Result<Child, LabError> {
    let ns = format!("{prefix}-{node}");
    let log = std::fs::File::create(workdir.join(format!("{node}.log"))).map_err(|e| {
        LabError::Command {
            command: "create agent log".into(),
            output: e.to_string(),
        }
    })?;
    Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(binary)
        .args([
            "agent",
            "--model",
            "flannel",
            "--nodename",
            node,
            "--ip",
            addr,
        ])
        .args(["--nic", NIC, "--metrics-addr", "127.0.0.1:9091"])
        .arg("--datastore-type")
        .arg(format!("dir:{}", workdir.join("datastore").display()))
        .arg("--flannel-subnet-file")
        .arg(workdir.join(node).join("subnet.env"))
        .env_remove("PODROUTE_MODEL")
        .env_remove("IP")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| LabError::Command {
            command: format!("ip netns exec {ns} podroute agent"),
            output: e.to_string(),
        })
}

/// `podroute lab --model flannel`. `Ok(false)`: a check failed.
pub fn run(opts: &LabOptions, out: &mut dyn Write) -> Result<bool, LabError> {
    say(
        out,
        "seed 000's flannel cluster: master 192.168.0.39, node1 192.168.0.22, node2 192.168.0.8",
    );
    let mut plans = Vec::new();
    for (name, ..) in SEED000 {
        let (plan, env) = planned(name)?;
        print_planned(out, name, &plan);
        plans.push((name, plan, env));
    }
    if !is_root() {
        say(
            out,
            "not root: the planned tables only (run as root to build the cluster in network \
             namespaces and start the agents)",
        );
        return Ok(true);
    }
    if !netns::namespaces_with_prefix(&format!("{}-", opts.prefix)).is_empty() {
        return Err(LabError::Command {
            command: "podroute lab --model flannel".into(),
            output: format!(
                "network namespaces with the prefix {:?} exist already; remove them with \
                 `podroute lab --cleanup --prefix {}`",
                opts.prefix, opts.prefix
            ),
        });
    }
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| LabError::Command {
            command: "current_exe".into(),
            output: e.to_string(),
        })?,
    };
    let workdir = std::env::temp_dir().join(format!("{}-flannel", opts.prefix));
    let io = |e: std::io::Error| LabError::Command {
        command: format!("write {}", workdir.display()),
        output: e.to_string(),
    };
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(workdir.join("datastore")).map_err(io)?;
    std::fs::write(workdir.join("datastore/cluster.yaml"), objects_yaml()).map_err(io)?;
    let result = (|| {
        build(&opts.prefix)?;
        let mut agents = Agents(Vec::new());
        for (name, addr, ..) in SEED000 {
            agents
                .0
                .push(start_agent(&opts.prefix, &binary, &workdir, name, addr)?);
        }
        let deadline = Instant::now() + opts.timeout;
        let all_written = || {
            SEED000
                .iter()
                .all(|(n, ..)| workdir.join(n).join("subnet.env").exists())
        };
        while !all_written() && Instant::now() < deadline && !super::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The dataplane applies the first plan: wait (until the deadline) for every node's
        // routes; what is still missing then is reported below as FAIL.
        let routes_of = |name: &str| -> Vec<String> {
            netns::ip(
                &format!("{}-{name}", opts.prefix),
                &["route", "show", "proto", "157"],
            )
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
        };
        let all_routed = || {
            plans.iter().all(|(name, plan, _)| {
                routes_of(name)
                    == plan
                        .routes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
            })
        };
        while !all_routed() && Instant::now() < deadline && !super::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut ok = true;
        for (name, plan, env) in &plans {
            let ns = format!("{}-{name}", opts.prefix);
            say(out, &format!("--- {name}: kernel"));
            let routes = netns::ip(&ns, &["route", "show", "proto", "157"]).unwrap_or_default();
            let mut shown = Vec::new();
            for cmd in [
                vec!["ip", "-d", "link", "show", "flannel.1"],
                vec!["ip", "-4", "addr", "show", "dev", "flannel.1"],
                vec!["ip", "neigh", "show", "dev", "flannel.1"],
                vec!["bridge", "fdb", "show", "dev", "flannel.1"],
            ] {
                let (_, text) = netns::exec(&ns, cmd[0], &cmd[1..])?;
                say(out, &format!("  $ {}", cmd.join(" ")));
                for line in text.lines() {
                    say(out, &format!("    {line}"));
                }
                shown.push(text);
            }
            say(out, "  $ ip route show proto 157");
            for line in routes.lines() {
                say(out, &format!("    {line}"));
            }
            let written =
                std::fs::read_to_string(workdir.join(name).join("subnet.env")).unwrap_or_default();
            let env_ok = env.as_deref() == Some(written.as_str());
            say(
                out,
                &format!(
                    "  {}  subnet.env:\n{}",
                    if env_ok { "PASS" } else { "FAIL" },
                    written
                        .lines()
                        .map(|l| format!("          {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            );
            ok &= env_ok;
            let want: Vec<String> = plan.routes.iter().map(ToString::to_string).collect();
            let have: Vec<String> = routes.lines().map(|l| l.trim().to_string()).collect();
            let routes_ok = !want.is_empty() && want == have;
            say(
                out,
                &format!(
                    "  {}  kernel routes equal the plan ({} through flannel.1)",
                    if routes_ok { "PASS" } else { "FAIL" },
                    want.len()
                ),
            );
            ok &= routes_ok;
            // The lab's veths have the kernel's default MTU, 1500, as seed 000's eth0.
            let mtu = pod_mtu(&net_conf()?, &plan.tunnels, 1500);
            let missing = vtep_mismatches(plan, mtu, &shown[0], &shown[1], &shown[2], &shown[3]);
            if missing.is_empty() {
                say(
                    out,
                    &format!(
                        "  PASS  flannel.1 (VNI, port, nolearning, MAC, MTU {mtu}, address) and its {} neighbour and FDB entries as planned",
                        plan.tunnels.vxlan_peers.len()
                    ),
                );
            } else {
                say(
                    out,
                    &format!(
                        "  FAIL  flannel.1 and its entries; missing: {}",
                        missing.join("; ")
                    ),
                );
                ok = false;
            }
        }
        // Pod to pod across nodes, through flannel.1 (the lab's own ICMP echo).
        say(out, "--- pods (one per node behind cni0)");
        for (from, _, from_cidr, _) in SEED000 {
            let src = pod_addresses(from_cidr)?.1.addr();
            for (to, _, to_cidr, _) in SEED000.iter().filter(|(n, ..)| *n != from) {
                let dst = pod_addresses(to_cidr)?.1.addr();
                let report = super::echo(
                    &format!("{}-{from}-pod", opts.prefix),
                    dst.into(),
                    3,
                    Duration::from_millis(200),
                    Duration::from_secs(2),
                )?;
                let pass = report.all_answered();
                say(
                    out,
                    &format!(
                        "  {}  ping pod {from} ({src}) -> pod {to} ({dst}): {}",
                        if pass { "PASS" } else { "FAIL" },
                        report.summary()
                    ),
                );
                ok &= pass;
            }
        }
        say(out, &format!("agent logs: {}", workdir.display()));
        if opts.keep {
            // Left running (dropping a `Child` does not stop it): `podroute lab --cleanup`
            // stops them.
            drop(std::mem::take(&mut agents.0));
        }
        Ok(ok)
    })();
    if !opts.keep {
        cleanup_prefix(&opts.prefix)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Master's tables as iproute2 prints them when the kernel holds the plan.
    const LINK: &str = "5: flannel.1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc noqueue
    link/ether fe:be:87:93:06:e2 brd ff:ff:ff:ff:ff:ff promiscuity 0
    vxlan id 1 local 192.168.0.39 dev eth0 srcport 0 0 dstport 8472 nolearning ttl auto";
    const ADDR: &str = "5: flannel.1: <UP> mtu 1450\n    inet 10.244.0.0/32 scope global flannel.1";
    const NEIGH: &str = "10.244.2.0 lladdr 0a:72:bf:3f:cd:40 PERMANENT proto 157
10.244.1.0 lladdr 0e:61:06:ff:7a:73 PERMANENT proto 157";
    const FDB: &str = "0a:72:bf:3f:cd:40 dst 192.168.0.8 self permanent
0e:61:06:ff:7a:73 dst 192.168.0.22 self permanent";

    #[test]
    fn vtep_tables_are_checked_field_by_field() {
        let (plan, _) = planned("master").unwrap();
        assert_eq!(
            vtep_mismatches(&plan, 1450, LINK, ADDR, NEIGH, FDB),
            Vec::<String>::new()
        );
        // No device at all: everything is missing.
        let missing = vtep_mismatches(&plan, 1450, "", "", "", "");
        assert_eq!(missing.len(), 5 + 1 + 1 + 2 * 2, "{missing:?}");
        // One wrong field each.
        let base = || [LINK, ADDR, NEIGH, FDB].map(str::to_string);
        let changed = |which: usize, from: &str, to: &str| {
            let mut t = base();
            t[which] = t[which].replace(from, to);
            t
        };
        for (t, what) in [
            (changed(0, "dstport 8472", "dstport 4789"), "dstport 8472"),
            (changed(0, " nolearning", ""), "nolearning"),
            (changed(0, "mtu 1450", "mtu 1500"), "mtu 1450"),
            (changed(0, "fe:be", "fe:bf"), "link/ether"),
            (
                changed(1, "inet 10.244.0.0/32", ""),
                "address 10.244.0.0/32",
            ),
            (
                changed(2, "73 PERMANENT", "73 STALE"),
                "neighbour 10.244.1.0",
            ),
            (
                changed(3, "dst 192.168.0.8", "dst 192.168.0.9"),
                "fdb 0a:72:bf:3f:cd:40",
            ),
        ] {
            let missing = vtep_mismatches(&plan, 1450, &t[0], &t[1], &t[2], &t[3]);
            assert_eq!(missing.len(), 1, "{what}: {missing:?}");
            assert!(missing[0].contains(what), "{what}: {missing:?}");
        }
        let (gateway, pod) = pod_addresses("10.244.2.0/24").unwrap();
        assert_eq!(
            (gateway.to_string(), pod.to_string()),
            ("10.244.2.1/24".into(), "10.244.2.2/24".into())
        );
        assert!(pod_addresses("10.244.2.0/32").is_err());
    }

    #[test]
    fn the_lab_objects_plan_seed_000_s_tables() {
        let (plan, env) = planned("node2").unwrap();
        let (routes, arp, fdb) = tables(&plan);
        // Seed 000, `[root@node2 ~]# route -n`, its flannel.1 rows.
        assert_eq!(
            routes,
            [
                "10.244.0.0 10.244.0.0 255.255.255.0 UG 0 0 0 flannel.1",
                "10.244.1.0 10.244.1.0 255.255.255.0 UG 0 0 0 flannel.1",
            ]
        );
        assert_eq!(arp.len(), 2);
        assert!(
            fdb.contains(&"fe:be:87:93:06:e2 dev flannel.1 dst 192.168.0.39 self permanent".into())
        );
        assert!(env.unwrap().contains("FLANNEL_SUBNET=10.244.2.1/24"));
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }
}
