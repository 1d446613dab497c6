//! BGP UPDATE → kernel route, podroute vs BIRD 2 side by side (root only).
//!
//! `cargo bench --bench bgp_to_kernel` (env: `PODROUTE_BENCH_SIZES=20000,100000`,
//! `PODROUTE_BENCH_ROUNDS=5`, `PODROUTE_BENCH_ONLY=podroute|bird`, `PODROUTE_BENCH_PERF=cpu|faults`,
//! `PODROUTE_BENCH_WATCH=poll`,
//! `PODROUTE_BENCH_WRAP`: a command that execs the podroute receiver, e.g. heaptrack's preload or
//! valgrind; `PODROUTE_BENCH_DEBUG`: print each phase's progress curve (first route, 10 %, 50 %, 90 %)
//! and the receiver's `Rss*` lines at the end of each run).
//!
//! Per run: two fresh namespaces joined by a veth pair, injector `100.64.0.1/24` and receiver
//! `100.64.0.2/24`. The receiver is a separate process: `podroute agent` (the release binary,
//! YAML-dir datastore holding its Node, BGPConfiguration and a BGPPeer for the injector) or
//! `bird -f` (`protocol device`, `protocol kernel { ipv4 { export all; }; }`, an iBGP
//! `protocol bgp` importing all with `gateway direct`). The injector is a raw BGP client in
//! this process: it connects to the receiver's port 179, does OPEN/KEEPALIVE, and writes a
//! pre-encoded UPDATE stream of N /26 routes in 10.0.0.0/8 (next hop 100.64.0.1, ~1000
//! prefixes per UPDATE), so its own cost is one `write_all`.
//!
//! Timing: **t0 = the instant just before the first UPDATE byte is written**, after the
//! session is Established on both sides (the injector has sent and received KEEPALIVE).
//! **t1 = the instant the last route is visible in the receiver's kernel**: a netlink socket
//! in the receiver namespace subscribed to RTNLGRP_IPV4_ROUTE keeps the set of 10/8 /26
//! routes of the main table (RTM_NEWROUTE adds, RTM_DELROUTE removes; on ENOBUFS it resyncs
//! with a dump and counts an overflow); t1 is when that set first reaches the target. The
//! watcher sleeps in `recv`, so the kernel wakes it for every route in the inserting thread's
//! time; `PODROUTE_BENCH_WATCH=poll` makes it poll every 250 µs instead (see
//! `support::watch_polls`), which takes that cost off both receivers.
//! Phases per run: announce N (target N), withdraw every 10th (target 0.9 N), re-announce them
//! (target N). Peak RSS is the receiver's VmHWM after the three phases (peak anon RSS, the
//! largest `RssAnon` sampled every 2 ms, is the part that is not code pages); CPU is its user+system
//! time over the whole run (start-up included).
//!
//! Rounds alternate the order (podroute first, then BIRD first, ...). Medians per size and the
//! ratio podroute ÷ BIRD are printed. The machine may be shared: wall times are noisy.

#[path = "../tests/netns/mod.rs"]
mod netns;
mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Netns, veth};
use support::*;

const INJ: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const RECV: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

#[derive(Clone, Debug, Default)]
struct RunResult {
    announce: f64,
    withdraw: f64,
    reannounce: f64,
    hwm_kib: u64,
    /// The largest `RssAnon` seen by sampling every 2 ms: the receiver's own memory (heap,
    /// stacks), without the code pages that VmHWM also counts.
    anon_peak_kib: u64,
    cpu: f64,
    overflows: usize,
}

fn podroute_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_podroute"))
}

fn write_datastore(dir: &Path) {
    let files = [
        (
            "bgpconfiguration-default.yaml",
            format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPConfiguration\nmetadata:\n  \
                 name: default\nspec:\n  asNumber: {ASN}\n  nodeToNodeMeshEnabled: false\n"
            ),
        ),
        (
            "node-recv.yaml",
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: recv\n  annotations:\n    \
                 projectcalico.org/IPv4Address: {RECV}/24\nstatus:\n  addresses:\n  \
                 - address: {RECV}\n    type: InternalIP\n"
            ),
        ),
        (
            "bgppeer-injector.yaml",
            format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  \
                 name: injector\nspec:\n  asNumber: {ASN}\n  peerIP: {INJ}\n"
            ),
        ),
    ];
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn bird_conf() -> String {
    format!(
        "router id {RECV};\n\
         log stderr {{ error, fatal }};\n\
         protocol device {{ scan time 60; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; scan time 60; }}\n\
         protocol bgp injector {{\n  local {RECV} as {ASN};\n  neighbor {INJ} as {ASN};\n  \
         direct;\n  passive on;\n  hold time 240;\n  ipv4 {{ import all; export none; gateway direct; }};\n}}\n"
    )
}

fn spawn_in(ns: &Netns, program: &Path, args: &[String], log: &Path, wrap: &str) -> Child {
    let log = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
    let log2 = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
    // `ip netns exec` execs the program (no fork), so the child's pid is the daemon's.
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(wrap.split_whitespace())
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
}

fn start_receiver(kind: Kind, ns: &Netns, dir: &Path) -> Child {
    match kind {
        Kind::Podroute => {
            let ds = dir.join("datastore");
            write_datastore(&ds);
            let args: Vec<String> = [
                "agent",
                "--nodename",
                "recv",
                "--ip",
                "100.64.0.2/24",
                "--nic",
                "eth0",
                "--datastore-type",
                &format!("dir:{}", ds.display()),
                "--metrics-addr",
                "127.0.0.1:9099",
                "--hold-time",
                "240",
                "--connect-retry",
                "1s",
                "--log",
                "warn",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // `PODROUTE_BENCH_WRAP` (e.g. `env LD_PRELOAD=... DUMP_HEAPTRACK_OUTPUT=...`): run
            // the podroute receiver under a tool (a command that execs it keeps its pid).
            let wrap = std::env::var("PODROUTE_BENCH_WRAP").unwrap_or_default();
            spawn_in(ns, &podroute_bin(), &args, &dir.join("receiver.log"), &wrap)
        }
        Kind::Bird => {
            let conf = dir.join("bird.conf");
            std::fs::write(&conf, bird_conf()).unwrap_or_else(|e| panic!("{e}"));
            let args = vec![
                "-f".to_string(),
                "-c".into(),
                conf.display().to_string(),
                "-s".into(),
                dir.join("bird.ctl").display().to_string(),
                "-P".into(),
                dir.join("bird.pid").display().to_string(),
            ];
            spawn_in(ns, Path::new("bird"), &args, &dir.join("receiver.log"), "")
        }
    }
}

/// Connects from the injector namespace and completes the handshake, retrying while the
/// receiver starts (or has not configured the peer yet).
fn connect(inj: &Netns, child: &mut Child, log: &Path) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "receiver exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let r = inj.run(|| -> std::io::Result<TcpStream> {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((RECV, 179)), Duration::from_secs(1))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            handshake(&mut s, INJ)?;
            s.set_read_timeout(None)?;
            Ok(s)
        });
        match r {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!(
                "no BGP session with the receiver: {e}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

/// `PODROUTE_BENCH_PERF=cpu|faults` (and optional `PODROUTE_BENCH_PERF_DIR`, default /tmp):
/// attach `perf record --call-graph dwarf` to the receiver for the whole run, sampling CPU
/// (`cpu`, 499 Hz) or page faults (`faults`: which code first touches the memory that makes
/// up the peak RSS). Files: `perf-{cpu|faults}-{kind}-{N}.data`.
fn perf_attach(kind: Kind, n: usize, pid: u32) -> Option<Child> {
    let mode = std::env::var("PODROUTE_BENCH_PERF").ok()?;
    let dir = std::env::var("PODROUTE_BENCH_PERF_DIR").unwrap_or_else(|_| "/tmp".into());
    let out = format!("{dir}/perf-{mode}-{}-{n}.data", kind.name());
    let mut args: Vec<String> = vec!["record".into(), "-q".into(), "-o".into(), out];
    match mode.as_str() {
        "faults" => args.extend(["-e", "page-faults", "-c", "4"].map(String::from)),
        _ => args.extend(["-F", "499"].map(String::from)),
    }
    args.extend(["--call-graph", "dwarf,16384", "-p"].map(String::from));
    args.push(pid.to_string());
    let child = Command::new("perf")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some(child)
}

/// Samples a process's `RssAnon` every 2 ms on a thread of its own and keeps the largest.
struct AnonSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl AnonSampler {
    fn start(pid: u32) -> AnonSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(&proc_status(pid), "RssAnon:"));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        AnonSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn run_once(kind: Kind, n: usize) -> RunResult {
    let inj = Netns::new("inj");
    let recv = Netns::new("recv");
    veth(
        &inj,
        "eth0",
        "100.64.0.1/24",
        &recv,
        "eth0",
        "100.64.0.2/24",
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("receiver.log");
    let watcher = RouteWatcher::start(&recv.name);

    let prefixes: Vec<_> = (0..n as u32).map(prefix).collect();
    let (announce, _) = encode_announce(&prefixes, INJ);
    let tenth: Vec<_> = prefixes.iter().step_by(10).copied().collect();
    let (withdraw, _) = encode_withdraw(&tenth);
    let (reannounce, _) = encode_announce(&tenth, INJ);

    let mut child = start_receiver(kind, &recv, dir.path());
    let pid = child.id();
    let mut perf = perf_attach(kind, n, pid);
    let anon = AnonSampler::start(pid);
    let mut s = connect(&inj, &mut child, &log);
    // Drain whatever the receiver sends (KEEPALIVEs, its own routes).
    let mut rd = s.try_clone().unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || while read_msg(&mut rd).is_ok() {});

    let timeout = Duration::from_secs(120);
    let debug = std::env::var("PODROUTE_BENCH_DEBUG").is_ok();
    let mut phase = |bytes: &[u8], target: usize, what: &str| -> f64 {
        let start = watcher.count();
        watcher.arm(target);
        let t0 = Instant::now();
        s.write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
        match watcher.wait(timeout) {
            Some(t1) => {
                if debug {
                    // The progress curve: first route, then 10 %, 50 %, 90 % of the phase.
                    let marks: Vec<String> = watcher
                        .progress(start, &[0.1, 0.5, 0.9])
                        .iter()
                        .map(|t| {
                            t.map_or("-".into(), |t| {
                                format!("{:.1}", t.duration_since(t0).as_secs_f64() * 1e3)
                            })
                        })
                        .collect();
                    println!("    {what}: first/10%/50%/90% at {} ms", marks.join("/"));
                }
                t1.duration_since(t0).as_secs_f64()
            }
            None => panic!(
                "{} {what}: {} of {target} routes after {timeout:?}\n{}",
                kind.name(),
                watcher.count(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    let t_ann = phase(&announce, n, "announce");
    let t_wd = phase(&withdraw, n - tenth.len(), "withdraw");
    let t_re = phase(&reannounce, n, "re-announce");
    let (hwm, _) = rss_kib(pid);
    if debug {
        let st = proc_status(pid);
        let f: Vec<&str> = st.lines().filter(|l| l.starts_with("Rss")).collect();
        println!("    end: {}", f.join("  "));
    }
    let anon_peak_kib = anon.stop();
    let cpu = cpu_secs(pid);
    if let Some(p) = perf.as_mut() {
        // SAFETY: signalling our own child (perf writes its file on SIGINT).
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
    }
    let comm = process_name(pid);
    assert!(
        comm.starts_with("bird")
            || comm.starts_with("podroute")
            // `PODROUTE_BENCH_WRAP` with valgrind (its tool runs as the process).
            || comm.starts_with("callgrind")
            || comm.starts_with("memcheck"),
        "pid {pid} is {comm:?}, not the receiver"
    );
    stop(&mut child, Duration::from_secs(5));
    drop(s);
    let r = RunResult {
        announce: t_ann,
        withdraw: t_wd,
        reannounce: t_re,
        hwm_kib: hwm,
        anon_peak_kib,
        cpu,
        overflows: watcher.overflows(),
    };
    drop(watcher);
    drop(recv);
    drop(inj);
    // Let the kernel tear the namespaces (and their routes) down before the next run.
    std::thread::sleep(Duration::from_millis(1500));
    r
}

fn main() {
    if !is_root("bgp_to_kernel") {
        return;
    }
    if !have_bird() {
        println!("bgp_to_kernel: skipped: `bird` (BIRD 2) is not installed");
        return;
    }
    // `cargo test --benches` runs benches without `--bench`: keep that short.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::var("PODROUTE_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or(if full {
            vec![20_000, 100_000]
        } else {
            vec![2_000]
        });
    let rounds = env_usize("PODROUTE_BENCH_ROUNDS", if full { 5 } else { 1 });
    let only = std::env::var("PODROUTE_BENCH_ONLY").ok();
    let kinds: Vec<Kind> = [Kind::Podroute, Kind::Bird]
        .into_iter()
        .filter(|k| only.as_deref().is_none_or(|o| o == k.name()))
        .collect();
    println!(
        "bgp_to_kernel: sizes {sizes:?}, {rounds} rounds alternating order; receiver = separate \
         process; t0 = first UPDATE written, t1 = last route seen on RTNLGRP_IPV4_ROUTE in the \
         receiver namespace (watcher {}). NOTE: shared 2-core machine, wall times are noisy.",
        if std::env::var("PODROUTE_BENCH_WATCH").is_ok_and(|v| v == "poll") {
            "polling every 250 us"
        } else {
            "blocking in recv"
        }
    );
    for &n in &sizes {
        let mut results: Vec<(Kind, RunResult)> = Vec::new();
        for r in 0..rounds {
            let mut order = kinds.clone();
            if r % 2 == 1 {
                order.reverse();
            }
            for k in order {
                let res = run_once(k, n);
                println!(
                    "  N={n:<6} round {r} {:<8}: announce {:>7.1} ms ({:>7.0} routes/s)  \
                     withdraw 10% {:>6.1} ms  re-announce {:>6.1} ms  peak RSS {:>6.1} MiB  \
                     (anon {:>5.1} MiB)  CPU {:>5.2} s{}",
                    k.name(),
                    res.announce * 1e3,
                    n as f64 / res.announce,
                    res.withdraw * 1e3,
                    res.reannounce * 1e3,
                    res.hwm_kib as f64 / 1024.0,
                    res.anon_peak_kib as f64 / 1024.0,
                    res.cpu,
                    if res.overflows > 0 {
                        format!("  ({} netlink overflows, resynced by dump)", res.overflows)
                    } else {
                        String::new()
                    }
                );
                results.push((k, res));
            }
        }
        let med = |k: Kind, f: &dyn Fn(&RunResult) -> f64| {
            let v: Vec<f64> = results
                .iter()
                .filter(|(kk, _)| *kk == k)
                .map(|(_, r)| f(r))
                .collect();
            median(&v)
        };
        println!("  N={n} medians over {rounds} rounds:");
        type Metric = (&'static str, fn(&RunResult) -> f64, f64, &'static str);
        let metrics: [Metric; 6] = [
            ("announce (ms)", |r| r.announce * 1e3, 0.6, "time"),
            ("withdraw 10% (ms)", |r| r.withdraw * 1e3, 0.0, ""),
            ("re-announce 10% (ms)", |r| r.reannounce * 1e3, 0.0, ""),
            (
                "peak RSS (MiB)",
                |r| r.hwm_kib as f64 / 1024.0,
                if n >= 100_000 { 1.5 } else { 0.0 },
                "RSS",
            ),
            (
                "peak anon RSS (MiB)",
                |r| r.anon_peak_kib as f64 / 1024.0,
                0.0,
                "",
            ),
            ("receiver CPU (s)", |r| r.cpu, 0.0, ""),
        ];
        println!(
            "    {:<22} {:>10} {:>10} {:>16}",
            "metric", "podroute", "bird", "podroute/bird"
        );
        for (name, f, target, label) in metrics {
            let p = med(Kind::Podroute, &|r| f(r));
            let b = med(Kind::Bird, &|r| f(r));
            let ratio = p / b;
            let verdict = if target > 0.0 && ratio.is_finite() {
                format!(
                    "  target {label} ratio <= {target}: {}",
                    if ratio <= target { "MET" } else { "MISSED" }
                )
            } else {
                String::new()
            };
            println!("    {name:<22} {p:>10.1} {b:>10.1} {ratio:>16.2}{verdict}");
        }
        let _ = std::io::stdout().flush();
    }
}
