//! Ghost nodes for scale tests and benches: a lab cluster (`podroute::lab`) plus many Nodes
//! in its YAML datastore, each with Calico IPAMBlocks and BlockAffinities, whose addresses
//! never answer.
//!
//! The ghosts live at 10.96.0.0/16: those addresses compare smaller than the lab nodes'
//! (192.168.92.x) as strings, so each real agent is the active side towards every ghost
//! (Calico's mesh rule: the smaller side waits) and keeps trying to connect. Inside each node
//! namespace 10.96.0.0/16 is routed to a gateway nobody answers for ([`blackhole_ghosts`]):
//! SYNs go nowhere, never out of the lab's namespaces, and every attempt stays half-open
//! until the speaker's connect timeout.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use podroute::lab::{ClusterSpec, Lab, ip};

/// The ghosts' addresses: routed into a dummy device inside each node namespace.
pub const GHOST_NET: &str = "10.96.0.0/16";
pub const GHOST_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
/// The silent gateway of [`GHOST_NET`] (see [`blackhole_ghosts`]).
pub const GHOST_GW: &str = "10.96.255.254";
/// The ghosts' pool: 65,536 /26 blocks.
pub const GHOST_POOL: &str = "100.64.0.0/10";
pub const GHOST_POOL_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Ghost nodes per datastore file (each file well under the 4 MiB file limit).
pub const GHOSTS_PER_FILE: usize = 250;

pub fn ghost_name(n: usize) -> String {
    format!("ghost-{n:05}")
}

pub fn ghost_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(GHOST_BASE + 1 + n as u32)
}

/// One ghost's Node, IPAMBlocks and BlockAffinities, as `kubectl get -o yaml` prints them;
/// `ready`: the Node's `Ready` condition (`None`: no condition).
pub fn ghost_objects(text: &mut String, n: usize, blocks: usize, pods: usize, ready: Option<bool>) {
    let name = ghost_name(n);
    let addr = ghost_addr(n);
    let _ = write!(
        text,
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    \
         kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n    \
         kubernetes.io/arch: amd64\n  annotations:\n    projectcalico.org/IPv4Address: \
         {addr}/16\n    node.alpha.kubernetes.io/ttl: \"0\"\n    \
         volumes.kubernetes.io/controller-managed-attach-detach: \"true\"\nstatus:\n  \
         addresses:\n  - {{type: InternalIP, address: {addr}}}\n  - {{type: Hostname, address: \
         {name}}}\n"
    );
    if let Some(ready) = ready {
        let _ = write!(
            text,
            "  conditions:\n  - {{type: Ready, status: \"{}\"}}\n",
            if ready { "True" } else { "Unknown" }
        );
    }
    for b in 0..blocks {
        let index = (n * blocks + b) as u32;
        let cidr = format!("{}/26", Ipv4Addr::from(GHOST_POOL_BASE + index * 64));
        let block_name = cidr.replace(['.', '/'], "-");
        let slots: Vec<String> = (0..64)
            .map(|s| {
                if s < pods {
                    s.to_string()
                } else {
                    "null".into()
                }
            })
            .collect();
        let unallocated: Vec<String> = (pods..64).map(|s| s.to_string()).collect();
        let mut attributes = String::new();
        for p in 0..pods {
            let _ = write!(
                attributes,
                "  - handle_id: k8s-pod-network.{index:08x}{p:04x}aaaabbbbccccdddd\n    \
                 secondary:\n      namespace: team-{ns}\n      node: {name}\n      pod: \
                 app-{index}-{p}-7d9f8b6c5d-x2x9z\n      timestamp: 2024-05-01 \
                 10:00:00.000000000 +0000 UTC\n",
                ns = p % 7
            );
        }
        let _ = write!(
            text,
            "---\napiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: \
             {block_name}\n  resourceVersion: \"{index}\"\nspec:\n  affinity: host:{name}\n  \
             allocations: [{}]\n  attributes:\n{attributes}  cidr: {cidr}\n  deleted: false\n  \
             sequenceNumber: 1714557600000000000\n  strictAffinity: false\n  unallocated: \
             [{}]\n---\napiVersion: crd.projectcalico.org/v1\nkind: BlockAffinity\nmetadata:\n  \
             name: {name}-{block_name}\nspec:\n  cidr: {cidr}\n  deleted: \"false\"\n  node: \
             {name}\n  state: confirmed\n",
            slots.join(", "),
            unallocated.join(", "),
        );
    }
}

/// The lab's seed cluster with its three nodes on one subnet (master01, node01, node02 on
/// 192.168.92.0/24: their routes are direct and need no `tunl0`), plus the ghosts' pool
/// (100.64.0.0/10, `ipipMode: CrossSubnet`) and `ghosts` ghost Nodes with `blocks` blocks of
/// `pods` allocations each. Returns the spec and the bytes of ghost YAML.
pub fn cluster(ghosts: usize, blocks: usize, pods: usize) -> (ClusterSpec, usize) {
    cluster_with_ready(ghosts, blocks, pods, None)
}

/// [`cluster`] with the ghosts' `Ready` condition (see [`ghost_objects`]).
pub fn cluster_with_ready(
    ghosts: usize,
    blocks: usize,
    pods: usize,
    ready: Option<bool>,
) -> (ClusterSpec, usize) {
    let mut spec = ClusterSpec::seed();
    if let Some(node02) = spec.node_mut("node02") {
        node02.addr = "192.168.92.130/24".parse().expect("constant");
    }
    spec.extra_files.insert(
        "ghost-pool.yaml".into(),
        format!(
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: \
             ghost-pool\nspec:\n  cidr: {GHOST_POOL}\n  blockSize: 26\n  ipipMode: \
             CrossSubnet\n  natOutgoing: true\n"
        ),
    );
    let mut bytes = 0;
    for (file, start) in (0..ghosts).step_by(GHOSTS_PER_FILE).enumerate() {
        let mut text = String::new();
        for n in start..(start + GHOSTS_PER_FILE).min(ghosts) {
            ghost_objects(&mut text, n, blocks, pods, ready);
        }
        bytes += text.len();
        spec.extra_files
            .insert(format!("ghosts-{file:03}.yaml"), text);
    }
    (spec, bytes)
}

/// Routes the ghosts' addresses, in every node namespace, to a silent end: a veth `void0`
/// whose other end sits in an empty namespace of the lab (`PREFIX-void`, no address), via a
/// gateway with a permanent neighbour entry of a MAC that nobody has. Every SYN leaves as a
/// frame the other end drops (not addressed to it): no answer, no ICMP, nothing leaves the
/// lab's namespaces. (A `blackhole` route would fail each connect at once instead, and this
/// kernel may lack the `dummy` module.)
pub fn blackhole_ghosts(lab: &Lab, names: &[String]) -> Result<(), String> {
    let void = format!("{}-void", lab.cfg.prefix);
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    run(&["netns", "add", &void])?;
    run(&["-n", &void, "link", "set", "lo", "up"])?;
    for (i, name) in names.iter().enumerate() {
        let ns = lab.node_ns(name);
        let far = format!("v{i}");
        run(&[
            "-n", &ns, "link", "add", "void0", "type", "veth", "peer", "name", &far, "netns", &void,
        ])?;
        run(&["-n", &void, "link", "set", &far, "up"])?;
        for args in [
            &["link", "set", "void0", "up"][..],
            &[
                "neigh",
                "add",
                GHOST_GW,
                "lladdr",
                "02:00:5e:00:53:01",
                "dev",
                "void0",
                "nud",
                "permanent",
            ],
            &[
                "route", "add", GHOST_NET, "via", GHOST_GW, "dev", "void0", "onlink",
            ],
        ] {
            ip(&ns, args).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
