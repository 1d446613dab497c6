//! Three real agents in a 5,000-node cluster whose other 4,997 nodes never answer (issue 14,
//! root only).
//!
//! `cargo bench --bench mesh_scale` (env: `PODROUTE_BENCH_NODES=5000`,
//! `PODROUTE_BENCH_BLOCKS_PER_NODE=4`, `PODROUTE_BENCH_PODS_PER_BLOCK=3`,
//! `PODROUTE_BENCH_WARMUP_SECS=20`, `PODROUTE_BENCH_STEADY_SECS=30`,
//! `PODROUTE_BENCH_KEEP_LOGS=1` to keep the agents' logs, `PODROUTE_BENCH_GENERAL_YAML=1` to
//! quote the blocks' and affinities' kinds so that the general YAML parser reads them,
//! `PODROUTE_BENCH_GENERAL_NODES=1` to add a comment line to the Nodes (the fast reader
//! declines it: the general parser reads them, with one typed parse each, as before), `PODROUTE_BENCH_GHOSTS_READY=true|false`
//! to give the ghost Nodes a `Ready` condition of `True` or `Unknown`; without it they have none,
//! while the three real nodes are `Ready=True` as a kubelet reports them). A smoke run:
//! `PODROUTE_BENCH_NODES=200 PODROUTE_BENCH_WARMUP_SECS=2 PODROUTE_BENCH_STEADY_SECS=3`.
//!
//! The lab's cluster (`podroute::lab`: network namespaces, a bridge, one pod per node) with
//! its three nodes on one subnet (master01, node01, node02 on 192.168.92.0/24, pool
//! 172.16.0.0/16 `ipipMode: CrossSubnet`, so their routes are direct and need no `tunl0`), plus
//! `NODES - 3` ghost Nodes in the YAML datastore: each with `BLOCKS_PER_NODE` IPAMBlocks
//! (pool 100.64.0.0/10, `PODS_PER_BLOCK` allocations each, as Calico writes them) and their
//! BlockAffinities, at an address in 10.96.0.0/16. Those addresses compare smaller than the
//! real nodes' (192.168.92.x) as strings, so each real agent is the active side towards every
//! ghost (Calico's mesh rule: the smaller side waits) and keeps trying to connect. Inside each
//! node namespace 10.96.0.0/16 is routed to a gateway nobody answers for (see
//! [`blackhole_ghosts`]): SYNs go nowhere, never out of the lab's namespaces, and every attempt
//! stays half-open until the speaker's connect timeout. The agents run with the production timers
//! (connect retry 5 s backing off to 120 s, directory poll 1 s, hold time 240 s).
//!
//! Reports per agent: peak RSS (VmHWM) and steady RSS (VmRSS over the steady window: min and
//! max), CPU % of one core over the steady window, open file descriptors, `/metrics` size and
//! series, `/status` size, outbound connection attempts per second over the steady window
//! (`podroute_bgp_connect_attempts_total`) and the most attempts ever in flight, and the time
//! from the agent's start until the other two nodes' block routes are in its kernel table.
//! Targets: RSS <= 64 MiB, CPU <= 2 % of a core, /metrics <= 200 KB, routes <= 5 s. Figures,
//! not assertions: the machine may be shared.

#[path = "../tests/ghosts/mod.rs"]
mod ghosts;
mod support;

use std::time::{Duration, Instant};

use ghosts::{blackhole_ghosts, cluster_with_ready};
use podroute::lab::{Lab, LabConfig};
use support::{cpu_secs, env_usize, is_root, rss_kib};

/// One agent's figures.
#[derive(Default)]
struct Figures {
    routes_after: Option<Duration>,
    rss_peak_kib: u64,
    rss_steady_min_kib: u64,
    rss_steady_max_kib: u64,
    cpu_percent: f64,
    fds: usize,
    metrics_bytes: usize,
    metrics_series: usize,
    status_bytes: usize,
    attempts_per_s: f64,
    in_flight_max: f64,
    peers: String,
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    if !is_root("mesh_scale") {
        return;
    }
    let nodes = env_usize("PODROUTE_BENCH_NODES", 5000).max(4);
    let blocks = env_usize("PODROUTE_BENCH_BLOCKS_PER_NODE", 4);
    let pods = env_usize("PODROUTE_BENCH_PODS_PER_BLOCK", 3).min(64);
    let warmup = Duration::from_secs(env_usize("PODROUTE_BENCH_WARMUP_SECS", 20) as u64);
    let steady = Duration::from_secs(env_usize("PODROUTE_BENCH_STEADY_SECS", 30).max(1) as u64);
    let ghosts = nodes - 3;
    let ghosts_ready = match std::env::var("PODROUTE_BENCH_GHOSTS_READY").as_deref() {
        Ok("true") => Some(true),
        Ok("false") => Some(false),
        _ => None,
    };
    let (mut spec, bytes) = cluster_with_ready(ghosts, blocks, pods, ghosts_ready);
    // `PODROUTE_BENCH_GENERAL_YAML=1`: the same documents with their kind quoted, which the
    // fast reader of IPAMBlocks and BlockAffinities declines: every document takes the
    // general YAML parser (the start-up time before that reader).
    let general_yaml = std::env::var_os("PODROUTE_BENCH_GENERAL_YAML").is_some();
    if general_yaml {
        for text in spec.extra_files.values_mut() {
            *text = text
                .replace("\nkind: IPAMBlock\n", "\nkind: 'IPAMBlock'\n")
                .replace("\nkind: BlockAffinity\n", "\nkind: 'BlockAffinity'\n");
        }
    }
    // `PODROUTE_BENCH_GENERAL_NODES=1`: a comment line in each ghost Node, which the fast
    // reader declines, so that the general parser reads the Nodes as before that reader took
    // them (one typed parse each: the plain `kind:` line still names the kind).
    let general_nodes = std::env::var_os("PODROUTE_BENCH_GENERAL_NODES").is_some();
    if general_nodes {
        for text in spec.extra_files.values_mut() {
            *text = text.replace("\nkind: Node\n", "\nkind: Node\n# general parser\n");
        }
    }
    println!(
        "mesh_scale: {nodes} nodes ({ghosts} never answer, Ready condition {ghosts_ready:?}) x \
         {blocks} blocks x {pods} pods: {} blocks, {:.1} MB of YAML{}",
        nodes * blocks,
        bytes as f64 / 1e6,
        match (general_yaml, general_nodes) {
            (true, true) => " (general YAML parser for every document)",
            (true, false) => " (block and affinity kinds quoted: general YAML parser for them)",
            (false, true) => " (a comment in each Node: general YAML parser for Nodes)",
            (false, false) => "",
        }
    );

    let mut cfg = LabConfig::new(
        format!("msc{}", std::process::id()),
        env!("CARGO_BIN_EXE_podroute"),
    );
    // Production timers.
    cfg.hold_time = 240;
    cfg.connect_retry = Duration::from_secs(5);
    cfg.connect_retry_max = Duration::from_secs(120);
    cfg.dir_poll = Duration::from_secs(1);
    let mut lab = match Lab::build(cfg, spec) {
        Ok(lab) => lab,
        Err(e) => {
            println!("mesh_scale: cannot build the lab: {e}");
            return;
        }
    };
    let names: Vec<String> = lab.spec.nodes.iter().map(|n| n.name.clone()).collect();
    if let Err(e) = blackhole_ghosts(&lab, &names) {
        println!("mesh_scale: {e}");
        return;
    }
    // The other nodes' blocks, as the kernel table prints them.
    let real = lab.spec.nodes.clone();
    let wanted = |me: &str| -> Vec<String> {
        real.iter()
            .filter(|n| n.name != me)
            .filter_map(|n| n.block.map(|b| format!("{b} via {}", n.ip())))
            .collect()
    };
    let started = Instant::now();
    if let Err(e) = lab.start_agents() {
        println!("mesh_scale: cannot start the agents: {e}");
        return;
    }
    let pids: Vec<u32> = names.iter().filter_map(|n| lab.pid(n)).collect();
    let mut figures: Vec<Figures> = names.iter().map(|_| Figures::default()).collect();
    // Until the warm-up is over: the real routes, checked every 50 ms (and then every
    // 500 ms through the steady window).
    let check_routes = |figures: &mut [Figures]| {
        for (i, name) in names.iter().enumerate() {
            if figures[i].routes_after.is_some() {
                continue;
            }
            let routes = lab.kernel_routes(name).unwrap_or_default();
            if wanted(name)
                .iter()
                .all(|w| routes.iter().any(|r| r.starts_with(w.as_str())))
            {
                figures[i].routes_after = Some(started.elapsed());
            }
        }
    };
    while Instant::now() < started + warmup {
        check_routes(&mut figures);
        if let Some(dead) = names.iter().find(|n| lab.check_running(n).is_err()) {
            println!(
                "mesh_scale: the agent of {dead} stopped:\n{}",
                lab.log_tail(dead, 30)
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Steady window.
    let attempts = |name: &str| {
        lab.metrics(name)
            .ok()
            .and_then(|t| metric(&t, "podroute_bgp_connect_attempts_total"))
            .unwrap_or(f64::NAN)
    };
    let attempts0: Vec<f64> = names.iter().map(|n| attempts(n)).collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    for (f, pid) in figures.iter_mut().zip(&pids) {
        f.rss_steady_min_kib = rss_kib(*pid).1;
    }
    let window = Instant::now();
    while window.elapsed() < steady {
        check_routes(&mut figures);
        for (f, pid) in figures.iter_mut().zip(&pids) {
            let rss = rss_kib(*pid).1;
            f.rss_steady_min_kib = f.rss_steady_min_kib.min(rss);
            f.rss_steady_max_kib = f.rss_steady_max_kib.max(rss);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = window.elapsed().as_secs_f64();
    for (i, name) in names.iter().enumerate() {
        let pid = pids[i];
        let f = &mut figures[i];
        f.cpu_percent = (cpu_secs(pid) - cpu0[i]) / elapsed * 100.0;
        f.attempts_per_s = (attempts(name) - attempts0[i]) / elapsed;
        f.rss_peak_kib = rss_kib(pid).0;
        f.fds = fds(pid);
        if let Ok(text) = lab.metrics(name) {
            f.metrics_bytes = text.len();
            f.metrics_series = series(&text);
            f.in_flight_max =
                metric(&text, "podroute_bgp_connects_in_flight_max").unwrap_or(f64::NAN);
        }
        if let Ok((_, body)) = lab.agent_get(name, "/status") {
            f.status_bytes = body.len();
        }
        if let Ok(status) = lab.node_status(name) {
            f.peers = match &status.peer_summary {
                Some(s) => format!("{} peers {:?}", s.total, s.by_state),
                None => format!("{} peers", status.peers.len()),
            };
        }
    }

    println!(
        "\n{:<10} {:>9} {:>15} {:>7} {:>5} {:>10} {:>8} {:>9} {:>10} {:>9} {:>9}",
        "agent",
        "peak RSS",
        "steady RSS",
        "CPU %",
        "fds",
        "/metrics",
        "series",
        "/status",
        "attempts/s",
        "in flight",
        "routes"
    );
    for (name, f) in names.iter().zip(&figures) {
        println!(
            "{:<10} {:>5.1} MiB {:>5.1}-{:>5.1} MiB {:>7.2} {:>5} {:>8} B {:>8} {:>7} B {:>10.2} {:>9} {:>9}",
            name,
            mib(f.rss_peak_kib),
            mib(f.rss_steady_min_kib),
            mib(f.rss_steady_max_kib),
            f.cpu_percent,
            f.fds,
            f.metrics_bytes,
            f.metrics_series,
            f.status_bytes,
            f.attempts_per_s,
            f.in_flight_max,
            f.routes_after
                .map_or("not yet".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        );
    }
    for (name, f) in names.iter().zip(&figures) {
        println!("  {name}: {}", f.peers);
    }
    println!(
        "targets: RSS <= 64 MiB, CPU <= 2 % of a core, /metrics <= 200 KB, routes <= 5 s \
         (steady window {:.0} s after a {:.0} s warm-up)",
        elapsed,
        warmup.as_secs_f64()
    );
    if std::env::var_os("PODROUTE_BENCH_KEEP_LOGS").is_some() {
        lab.keep_workdir();
        println!("logs kept in {}", lab.workdir().join("logs").display());
    }
    for problem in lab.cleanup() {
        println!("mesh_scale: cleanup: {problem}");
    }
}
