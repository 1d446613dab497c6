//! Memory of the YAML-directory datastore at scale: one agent's resident set while it holds
//! a cluster of many nodes (issue 14: "memory grows with the node's own routes and peers, not
//! with the size of the datastore's text").
//!
//! `cargo bench --bench datastore_memory` (env: `PODROUTE_BENCH_NODES=5000`,
//! `PODROUTE_BENCH_BLOCKS_PER_NODE=4`, `PODROUTE_BENCH_PODS_PER_BLOCK=20`,
//! `PODROUTE_BENCH_JUNK_MB=0` for an extra file of unrelated documents,
//! `PODROUTE_BENCH_GENERAL_NODES=1` to add a comment line to each Node, which the fast reader
//! declines, so that the general YAML parser reads them as before).
//!
//! Generates a directory as `kubectl get -o yaml` would print a Calico cluster: one file per
//! node holding its `Node`, its IPAMBlocks (a /26 each, every slot listed, some allocated
//! with Calico's attributes) and BlockAffinities, plus one IPPool. Then, in this process,
//! does what the agent's datastore task does: polls the directory and builds the cluster
//! state (twice, as after a change), and builds the plan input the agent loop derives from
//! it. Reports VmHWM (peak) and VmRSS (now) from /proc/self/status after each step; the
//! goal is <= 64 MiB for 5,000 nodes x 4 blocks. Memory figures, not wall times, are the
//! result (the machine may be shared).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use podroute::datastore::dir::DirSource;
use podroute::datastore::{RejectCounters, StateBuilder};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `(VmHWM, VmRSS)` in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn report(step: &str) {
    let (hwm, rss) = memory();
    println!(
        "{step:<40} VmHWM {:>7.1} MiB   VmRSS {:>7.1} MiB",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0
    );
}

fn node_name(n: usize) -> String {
    format!("node-{n:05}")
}

/// One node's file: its Node, blocks and affinities.
fn node_file(n: usize, blocks: usize, pods: usize) -> String {
    let name = node_name(n);
    let mut text = String::new();
    let _ = write!(
        text,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n  annotations:\n    projectcalico.org/IPv4Address: 10.{}.{}.{}/16\n    node.alpha.kubernetes.io/ttl: \"0\"\n    volumes.kubernetes.io/controller-managed-attach-detach: \"true\"\nstatus:\n  addresses:\n  - {{type: InternalIP, address: 10.{}.{}.{}}}\n  - {{type: Hostname, address: {name}}}\n",
        100 + n / 65536,
        (n / 256) % 256,
        n % 256,
        100 + n / 65536,
        (n / 256) % 256,
        n % 256,
    );
    for b in 0..blocks {
        // 100.64.0.0/10 holds 65536 /26 blocks: a running index.
        let index = n * blocks + b;
        let base = index * 64;
        let (o2, o3, o4) = (64 + base / 65536, (base / 256) % 256, base % 256);
        let cidr = format!("100.{o2}.{o3}.{o4}/26");
        let block_name = cidr.replace(['.', '/'], "-");
        let mut slots = Vec::with_capacity(64);
        for slot in 0..64 {
            slots.push(if slot < pods {
                slot.to_string()
            } else {
                "null".to_string()
            });
        }
        let mut attributes = String::new();
        for p in 0..pods {
            let _ = write!(
                attributes,
                "  - handle_id: k8s-pod-network.{index:08x}{p:04x}aaaabbbbccccdddd\n    secondary:\n      namespace: team-{ns}\n      node: {name}\n      pod: app-{index}-{p}-7d9f8b6c5d-x2x9z\n      timestamp: 2024-05-01 10:00:00.000000000 +0000 UTC\n",
                ns = p % 7,
            );
        }
        let unallocated: Vec<String> = (pods..64).map(|s| s.to_string()).collect();
        let _ = write!(
            text,
            "---\napiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {block_name}\n  resourceVersion: \"{index}\"\nspec:\n  affinity: host:{name}\n  allocations: [{}]\n  attributes:\n{attributes}  cidr: {cidr}\n  deleted: false\n  sequenceNumber: 1714557600000000000\n  strictAffinity: false\n  unallocated: [{}]\n---\napiVersion: crd.projectcalico.org/v1\nkind: BlockAffinity\nmetadata:\n  name: {name}-{block_name}\nspec:\n  cidr: {cidr}\n  deleted: \"false\"\n  node: {name}\n  state: confirmed\n",
            slots.join(", "),
            unallocated.join(", "),
        );
    }
    text
}

fn generate(dir: &Path, nodes: usize, blocks: usize, pods: usize, junk_mb: usize) -> u64 {
    let pool = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  cidr: 100.64.0.0/10\n  blockSize: 26\n  ipipMode: Always\n  natOutgoing: true\n";
    std::fs::write(dir.join("pool.yaml"), pool).unwrap();
    let mut total = pool.len() as u64;
    let general_nodes = std::env::var_os("PODROUTE_BENCH_GENERAL_NODES").is_some();
    for n in 0..nodes {
        let mut text = node_file(n, blocks, pods);
        if general_nodes {
            text = text.replacen("\nkind: Node\n", "\nkind: Node\n# general parser\n", 1);
        }
        total += text.len() as u64;
        std::fs::write(dir.join(format!("{}.yaml", node_name(n))), text).unwrap();
    }
    if junk_mb > 0 {
        let mut text = String::new();
        let mut i = 0;
        while text.len() < junk_mb << 20 {
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: junk-{i}\n  namespace: default\ndata:\n  key: \"{}\"\n",
                "x".repeat(100)
            );
            i += 1;
        }
        total += text.len() as u64;
        std::fs::write(dir.join("zz-junk.yaml"), text).unwrap();
    }
    total
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let nodes = env("PODROUTE_BENCH_NODES", 5000);
    let blocks = env("PODROUTE_BENCH_BLOCKS_PER_NODE", 4);
    let pods = env("PODROUTE_BENCH_PODS_PER_BLOCK", 20).min(64);
    let junk_mb = env("PODROUTE_BENCH_JUNK_MB", 0);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let bytes = generate(tmp.path(), nodes, blocks, pods, junk_mb);
    println!(
        "datastore_memory: {nodes} nodes x {blocks} blocks x {pods} pods, {:.1} MB of YAML in {} files (generated in {:.1?})",
        bytes as f64 / 1e6,
        nodes + 1 + usize::from(junk_mb > 0),
        started.elapsed()
    );
    report("start");

    let local = node_name(nodes / 2);
    let counters = Arc::new(RejectCounters::default());
    let mut source = DirSource::new(tmp.path(), counters.clone()).with_local_node(local.clone());
    let mut builder = StateBuilder::new(local.clone(), counters);
    let started = Instant::now();
    let _ = source.poll();
    // The directory datastore reads a file once it has stopped changing: poll again.
    let _ = source.poll();
    report("directory read");
    let state = builder.build(&source.inputs());
    report("cluster state built");
    println!(
        "  state: {} nodes, {} blocks, {} affinities, {} rejected ({:.1?})",
        state.nodes.len(),
        state.blocks.len(),
        state.affinities.len(),
        state.rejected.len(),
        started.elapsed()
    );
    // A change elsewhere: rebuild as the datastore task does after every poll with a change.
    let _ = source.poll();
    let again = builder.build(&source.inputs());
    report("rebuilt");
    let local_node = podroute::plan::LocalNode {
        name: local,
        ipv4: None,
        ipv6: None,
        nic: "eth0".into(),
    };
    let input = podroute::agent::intent::plan_input(
        &again,
        &local_node,
        &BTreeMap::new(),
        &BTreeSet::new(),
    );
    report("plan input derived");
    println!(
        "  plan input: {} blocks, {} nodes; local blocks hold {} allocations",
        input.blocks.len(),
        input.nodes.len(),
        again
            .local_blocks()
            .map(|b| b.allocations.len())
            .sum::<usize>()
    );
    drop(input);
    drop(state);
    report("steady state (state + datastore)");
    drop(again);
}
