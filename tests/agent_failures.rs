//! Failures, end to end (issue 7): real `podroute agent` processes in the lab cluster
//! (`podroute::lab`) while something goes wrong around them.
//!
//! 1. Agents killed (SIGKILL) and restarted, then a rolling SIGTERM restart of every node,
//!    under a 10 ms ping between two pods: not one reply may be lost, and no route of
//!    podroute's may leave any kernel table (sampled every 20 ms, plus the kernel's route
//!    notifications in between). Pod traffic across the router through tunl0 is measured
//!    too; `agent_restart_loses_no_ping_across_the_router` asserts it and is ignored: a
//!    userspace tunl0 drops everything during the restarting agent's selection deferral.
//! 2. A node's cable pulled (its bridge port down) with a 3 s hold time: its peers drop its
//!    routes within hold time + 1 s; plugged back, everything returns.
//! 3. The Kubernetes API server (the in-repo fake, in its own namespace on the nodes' subnet)
//!    goes away: no route is removed during the outage; changes made meanwhile are applied
//!    after the agents reconnect (and relist after 410 Gone), and still-valid routes stay.
//! 4. BIRD 2 as a global BGPPeer restarts gracefully: the agents keep its routes in the kernel
//!    through the restart and, after BIRD's End-of-RIB, remove only the one it no longer has.
//! 5. A raw TCP "BGP peer" of node01 sends an UPDATE with a malformed ORIGIN (RFC 7606:
//!    treat-as-withdraw: the session stays, the prefix goes) and then garbage (bad marker,
//!    bad length): node01 answers with the right NOTIFICATION and closes that session only;
//!    the mesh stays up and every other route stays in every kernel.
//! 6. Two agents restart together: the one that comes back first must keep the other's
//!    routes until that one has re-announced them. Ignored: the agent does not (yet); see
//!    `a_restarting_agent_keeps_the_routes_of_a_peer_restarting_with_it`.
//!
//! Root only: without root the tests print a loud SKIP, and with `CI=true` they fail instead.
//! Each test builds its own lab under a unique namespace prefix and removes it when it ends,
//! also when it fails. Packets go only between namespaces these tests create.
//!
//! The measured figures (ping loss, time to ready, detection time, ...) are printed to stderr
//! (`cargo nextest run --test agent_failures --no-capture` shows them).

mod support;

mod agent_guard;

use agent_guard::{in_path, tool_works};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use podroute::lab::{
    BgpPeerSpec, ClusterSpec, Lab, LabConfig, LabError, RouteRecord, WaitError, wait_until,
};
use podroute::model::crd::{BGPConfiguration, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use podroute::model::{Object, decode_documents};
use support::apiserver::FakeApiServer;

const CONVERGE: Duration = Duration::from_secs(60);
const CHANGE: Duration = Duration::from_secs(20);

const MASTER01: &str = "master01";
const NODE01: &str = "node01";
const NODE02: &str = "node02";
const BLOCK_NODE01: &str = "172.16.196.128/26";

static COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------
// Running or skipping
// ---------------------------------------------------------------------------------------

fn cannot_run(test: &str, why: &str, need: &str) {
    agent_guard::cannot_run("failure", test, why, need);
}

/// Root and `ip` are there (else SKIP, or panic with `CI=true`).
fn can_run(test: &str) -> bool {
    if !podroute::lab::is_root() {
        cannot_run(
            test,
            "not running as root",
            "These tests need root (network namespaces, veth, routes, raw ICMP sockets).",
        );
        return false;
    }
    if !tool_works("ip", "-V") {
        cannot_run(test, "iproute2 `ip` is missing", "Install iproute2.");
        return false;
    }
    true
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

// ---------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------

/// A lab (not started) with a prefix unique to this test and process.
fn lab(tag: &str, spec: ClusterSpec, tweak: impl FnOnce(&mut LabConfig)) -> Lab {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("fail{}{n}-{tag}", std::process::id());
    let mut cfg = LabConfig::new(prefix, env!("CARGO_BIN_EXE_podroute"));
    tweak(&mut cfg);
    let mut lab = Lab::build(cfg, spec).expect("build the lab");
    if std::env::var_os("PODROUTE_KEEP_LOGS").is_some() {
        eprintln!("keeping the logs in {}", lab.workdir().display());
        lab.keep_workdir();
    }
    lab
}

/// The seed cluster without node02: master01 and node01 on one subnet.
fn two_nodes() -> ClusterSpec {
    let mut spec = ClusterSpec::seed();
    spec.nodes.retain(|n| n.name != NODE02);
    spec
}

fn start_converged(lab: &mut Lab) -> Duration {
    lab.start_agents().expect("start the agents");
    converged(lab)
}

fn converged(lab: &Lab) -> Duration {
    lab.wait_converged(CONVERGE)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)))
}

/// The tail of every log of the lab (agents, also their earlier runs, and daemons).
fn logs(lab: &Lab) -> String {
    let dir = lab.workdir().join("logs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {}:\n{}",
                dir.join(name).display(),
                lines[lines.len().saturating_sub(25)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `check` until it holds; panics with the last reason and the logs.
fn eventually<T>(
    lab: &Lab,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    match wait_until(what, timeout, || check().map_err(WaitError::Pending)) {
        Ok(v) => v,
        Err(e) => panic!("{e}\n{}", logs(lab)),
    }
}

/// Polls `check` every 10 ms until it holds; the time it took from `since`.
fn measure(
    lab: &Lab,
    what: &str,
    since: Instant,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Duration {
    let mut last = String::new();
    while since.elapsed() < timeout {
        match check() {
            Ok(()) => return since.elapsed(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "{what}: not within {timeout:?}; last: {last}\n{}",
        logs(lab)
    );
}

fn pod_ip(lab: &Lab, node: &str) -> Ipv4Addr {
    lab.spec.node(node).unwrap().pods[0].ip
}

fn pod_name(lab: &Lab, node: &str) -> String {
    lab.spec.node(node).unwrap().pods[0].name.clone()
}

fn kernel(lab: &Lab, node: &str) -> Vec<String> {
    lab.kernel_routes(node)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)))
}

fn has_prefix(routes: &BTreeSet<String>, prefix: &str) -> bool {
    routes
        .iter()
        .any(|r| r.split_whitespace().any(|w| w == prefix))
}

/// Waits until the agent's current log contains `line`; the time from `since`.
fn wait_log(lab: &Lab, node: &str, line: &str, since: Instant, timeout: Duration) -> Duration {
    measure(
        lab,
        &format!("{node} logs {line:?}"),
        since,
        timeout,
        || {
            let text = std::fs::read_to_string(lab.log_path(node)).unwrap_or_default();
            if text.contains(line) {
                Ok(())
            } else {
                Err(format!("not in {}", lab.log_path(node).display()))
            }
        },
    )
}

/// One sample of the text exposition: the value of the series `name{labels}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn metric_of(lab: &Lab, node: &str, series: &str) -> Option<f64> {
    metric(&lab.metrics(node).ok()?, series)
}

/// Every route record is clean: no sampling error and none of `must[node]` ever missing.
fn assert_never_missing(records: &[RouteRecord], must: &[(String, Vec<String>)], lab: &Lab) {
    let mut problems = Vec::new();
    for (node, want) in must {
        let Some(r) = records.iter().find(|r| &r.node == node) else {
            problems.push(format!("no record of {node}"));
            continue;
        };
        problems.extend(r.errors.iter().map(|e| format!("{node}: watch error: {e}")));
        problems.extend(r.missing(want));
    }
    assert!(
        problems.is_empty(),
        "routes went missing:\n{}\nrecords:\n{}\n{}",
        problems.join("\n"),
        describe_records(records),
        logs(lab)
    );
}

fn describe_records(records: &[RouteRecord]) -> String {
    let mut s = String::new();
    for r in records {
        s += &format!(
            "{}: {} samples, longest gap between samples {:?}, {} table versions, removals {:?}\n",
            r.node,
            r.samples,
            r.max_interval,
            r.tables.len(),
            r.removed
        );
        for (at, table) in &r.tables {
            s += &format!("  {at:.3?}: {table:?}\n");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// 1. Continuous ping through agent restarts
// ---------------------------------------------------------------------------------------

/// What a [`Prober`] saw.
#[derive(Debug, Default)]
struct ProbeResult {
    sent: usize,
    received: usize,
    /// Send times (since the prober started) of the requests without a reply.
    lost: Vec<Duration>,
    max_rtt: Duration,
    /// The longest time between two requests (how steady the 10 ms really were).
    max_send_gap: Duration,
    error: Option<String>,
}

/// ICMP echo requests every `interval` from a thread inside a pod's namespace (raw socket),
/// with every reply matched by sequence number.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ProbeResult, LabError>>>,
}

impl Drop for Prober {
    /// A test that fails midway leaves no prober behind.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Prober {
    fn start(ns: &str, to: Ipv4Addr, interval: Duration) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread =
            podroute::lab::spawn_in_namespace(ns, "prober", move || probe(to, interval, &flag))
                .expect("start the prober");
        Prober {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sending, waits a second for the last replies, returns the result.
    fn stop(mut self) -> ProbeResult {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("prober thread")
            .expect("prober entered the pod's namespace")
    }
}

fn probe(to: Ipv4Addr, interval: Duration, stop: &AtomicBool) -> ProbeResult {
    let mut result = ProbeResult::default();
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        result.error = Some(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
        return result;
    }
    let id = (std::process::id() as u16) ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u16);
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let started = Instant::now();
    let mut sent_at: Vec<Duration> = Vec::new();
    let mut replied: Vec<bool> = Vec::new();
    let mut next = Instant::now();
    let mut stop_at: Option<Instant> = None;
    let mut last_send: Option<Instant> = None;
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if stop_at.is_none() && stop.load(Ordering::SeqCst) {
            stop_at = Some(now + Duration::from_secs(1));
        }
        if let Some(end) = stop_at
            && (now >= end || replied.iter().all(|r| *r))
        {
            break;
        }
        if stop_at.is_none() && now >= next && sent_at.len() < 65_000 {
            let seq = sent_at.len() as u16;
            let mut packet = vec![8u8, 0, 0, 0];
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(&seq.to_be_bytes());
            packet.extend_from_slice(b"podroute-failure");
            let sum = checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
            // SAFETY: the buffer and the address are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&dest as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if let Some(prev) = last_send {
                result.max_send_gap = result.max_send_gap.max(now.duration_since(prev));
            }
            last_send = Some(now);
            sent_at.push(now.duration_since(started));
            // A failed send (e.g. no route) is a lost probe.
            replied.push(false);
            if n < 0 {
                result.error.get_or_insert_with(|| {
                    format!(
                        "sendto at {:?}: {}",
                        now.duration_since(started),
                        std::io::Error::last_os_error()
                    )
                });
            }
            next += interval;
            if next < now {
                next = now + interval;
            }
        }
        let wait = if stop_at.is_some() {
            Duration::from_millis(10)
        } else {
            next.saturating_duration_since(Instant::now())
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(0, 100) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready <= 0 {
            continue;
        }
        loop {
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            let data = &buf[..n as usize];
            let ihl = usize::from(data[0] & 0x0f) * 4;
            let Some(icmp) = data.get(ihl..ihl + 8) else {
                continue;
            };
            if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != id {
                continue;
            }
            let seq = usize::from(u16::from_be_bytes([icmp[6], icmp[7]]));
            if let Some(r) = replied.get_mut(seq)
                && !*r
            {
                *r = true;
                result.received += 1;
                let rtt = started.elapsed().saturating_sub(sent_at[seq]);
                result.max_rtt = result.max_rtt.max(rtt);
            }
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    result.sent = sent_at.len();
    result.lost = replied
        .iter()
        .zip(&sent_at)
        .filter(|(r, _)| !**r)
        .map(|(_, at)| *at)
        .collect();
    result
}

/// Lost probes as windows of consecutive losses: (first send time, last send time, count).
fn loss_windows(lost: &[Duration]) -> Vec<(Duration, Duration, usize)> {
    let mut out: Vec<(Duration, Duration, usize)> = Vec::new();
    for at in lost {
        match out.last_mut() {
            Some((_, end, n)) if *at - *end <= Duration::from_millis(50) => {
                *end = *at;
                *n += 1;
            }
            _ => out.push((*at, *at, 1)),
        }
    }
    out
}

/// One restart, as measured.
struct Restart {
    what: String,
    /// From the signal to the process having exited.
    exit: Duration,
    /// From the new process's start to `/readyz` answering 200.
    ready: Duration,
    /// From the new process's start to "graceful restart: peers resynchronised".
    resynced: Duration,
    /// From the new process's start to every node converged again.
    converged: Duration,
}

const RESYNCED: &str = "graceful restart: peers resynchronised";

fn restart(lab: &mut Lab, node: &str, signal: i32, name: &str) -> Restart {
    let exit = lab
        .stop_agent(node, signal, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("stopping {node}: {e}\n{}", logs(lab)));
    let started = Instant::now();
    lab.start_agent(node).expect("start the agent again");
    let ready = lab
        .wait_ready(node, CONVERGE)
        .unwrap_or_else(|e| panic!("{node} ready again: {e}\n{}", logs(lab)));
    let resynced = wait_log(lab, node, RESYNCED, started, CONVERGE);
    let log = std::fs::read_to_string(lab.log_path(node)).unwrap_or_default();
    assert!(
        log.contains("restarting gracefully"),
        "{node} found its routes in the kernel and restarts gracefully:\n{log}"
    );
    lab.wait_converged(CONVERGE)
        .unwrap_or_else(|e| panic!("after restarting {node}: {e}\n{}", logs(lab)));
    Restart {
        what: format!("{name} {node}"),
        exit,
        ready,
        resynced,
        converged: started.elapsed(),
    }
}

#[test]
fn agent_restarts_lose_no_ping_and_no_route() {
    const TEST: &str = "agent_restarts_lose_no_ping_and_no_route";
    if !can_run(TEST) {
        return;
    }
    let mut lab = lab("restart", ClusterSpec::seed(), |_| {});
    let first = start_converged(&mut lab);
    let nodes = [MASTER01, NODE01, NODE02];
    // Every route the kernels hold now must stay all along.
    let must: Vec<(String, Vec<String>)> = nodes
        .iter()
        .map(|n| {
            let have = kernel(&lab, n);
            assert_eq!(have, lab.expected_kernel_routes(n).unwrap(), "{n}");
            (n.to_string(), have)
        })
        .collect();
    let watch = lab
        .watch_kernel_routes(&nodes, Duration::from_millis(20))
        .unwrap();
    for (node, want) in &must {
        let seen: Vec<String> = watch.record(node).unwrap().last().into_iter().collect();
        assert_eq!(
            &seen, want,
            "the watch reads {node}'s table as `ip route` does"
        );
    }
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, MASTER01)),
        pod_ip(&lab, NODE01),
        Duration::from_millis(10),
    );
    // Across the router, through tunl0, when both ends have one. A userspace tunl0 is
    // forwarded by the agent itself: while it is down, nothing crosses (measured, not
    // asserted); a kernel tunl0 must lose nothing.
    let tunnel = lab.has_tunnel_device(MASTER01) && lab.has_tunnel_device(NODE02);
    let cross = tunnel.then(|| {
        Prober::start(
            &lab.pod_ns(&pod_name(&lab, MASTER01)),
            pod_ip(&lab, NODE02),
            Duration::from_millis(10),
        )
    });
    std::thread::sleep(Duration::from_millis(500));

    let mut restarts = vec![restart(&mut lab, MASTER01, libc::SIGKILL, "SIGKILL")];
    for node in nodes {
        restarts.push(restart(&mut lab, node, libc::SIGTERM, "rolling SIGTERM"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let probes = prober.stop();
    let cross = cross.map(Prober::stop);
    let records = watch.stop();

    let mut report = format!(
        "\n=== {TEST}: first convergence {first:.2?}; ping pod {} -> pod {} every 10 ms: sent {}, \
         replies {}, lost {} (longest send gap {:.1?}, max RTT {:.1?})\n",
        pod_ip(&lab, MASTER01),
        pod_ip(&lab, NODE01),
        probes.sent,
        probes.received,
        probes.lost.len(),
        probes.max_send_gap,
        probes.max_rtt
    );
    match &cross {
        Some(c) => {
            report += &format!(
                "  ping pod {} -> pod {} (tunl0, {}): sent {}, replies {}, lost {} in {:?}\n",
                pod_ip(&lab, MASTER01),
                pod_ip(&lab, NODE02),
                if lab.ipip_available() {
                    "kernel ipip"
                } else {
                    "userspace tunl0 forwarded by the agents"
                },
                c.sent,
                c.received,
                c.lost.len(),
                loss_windows(&c.lost)
            )
        }
        None => report += "  no tunl0 on master01 and node02: no ping across the router\n",
    }
    for r in &restarts {
        report += &format!(
            "  {:<26} exit {:>8.1?}  ready (/readyz 200) {:>8.2?}  \"{RESYNCED}\" {:>8.2?}  all converged {:>8.2?}\n",
            r.what, r.exit, r.ready, r.resynced, r.converged
        );
    }
    for r in &records {
        report += &format!(
            "  kernel watch {:<9} {} dumps (longest gap {:.1?}), {} table versions, {} removals of podroute routes\n",
            r.node,
            r.samples,
            r.max_interval,
            r.tables.len(),
            r.removed.len()
        );
    }
    eprintln!("{report}");

    assert!(probes.error.is_none(), "{:?}\n{report}", probes.error);
    assert!(
        probes.sent > 500,
        "the prober sent too little: {probes:?}\n{report}"
    );
    assert!(
        probes.lost.is_empty(),
        "lost ping replies, sent at {:?}\n{report}\n{}",
        probes.lost,
        logs(&lab)
    );
    if let Some(c) = &cross
        && lab.ipip_available()
    {
        assert!(
            c.lost.is_empty(),
            "kernel ipip: lost replies across the router {:?}\n{report}",
            loss_windows(&c.lost)
        );
    }
    assert_never_missing(&records, &must, &lab);
    for r in &records {
        assert_eq!(
            r.tables.len(),
            1,
            "{} table changed:\n{}",
            r.node,
            describe_records(&records)
        );
    }
}

/// Pod traffic across the router (master01 -> node02, through tunl0) while master01's agent
/// restarts (SIGTERM). With the kernel's ipip device this must lose nothing. With the
/// userspace tunl0 the forwarder lives in the agent process: from the old process's exit
/// until the new one has opened the TUN device again (a few ms; the new forwarder starts
/// with the previous run's tunnel routes, before the selection deferral ends) packets into
/// tunl0 are dropped. The test allows at most 3 lost replies (30 ms) in that case and prints
/// the measured loss; before the table was seeded from the adopted routes it lost ~100.
#[test]
fn agent_restart_loses_no_ping_across_the_router() {
    const TEST: &str = "agent_restart_loses_no_ping_across_the_router";
    if !can_run(TEST) {
        return;
    }
    let mut lab = lab("cross", ClusterSpec::seed(), |_| {});
    start_converged(&mut lab);
    if !(lab.has_tunnel_device(MASTER01) && lab.has_tunnel_device(NODE02)) {
        cannot_run(
            TEST,
            "master01 and node02 have no tunl0",
            "Needs the kernel's ipip module or the userspace tunl0.",
        );
        return;
    }
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, MASTER01)),
        pod_ip(&lab, NODE02),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let r = restart(&mut lab, MASTER01, libc::SIGTERM, "SIGTERM");
    std::thread::sleep(Duration::from_millis(500));
    let probes = prober.stop();
    eprintln!(
        "\n=== {TEST} ({}): ping pod {} -> pod {} every 10 ms through master01's restart \
         (ready after {:.2?}): sent {}, lost {} in {:?}\n",
        if lab.ipip_available() {
            "kernel ipip"
        } else {
            "userspace tunl0"
        },
        pod_ip(&lab, MASTER01),
        pod_ip(&lab, NODE02),
        r.ready,
        probes.sent,
        probes.lost.len(),
        loss_windows(&probes.lost)
    );
    let allowed = if lab.ipip_available() { 0 } else { 3 };
    assert!(
        probes.lost.len() <= allowed,
        "lost {} replies across the router (allowed {allowed}): {:?}\n{}",
        probes.lost.len(),
        loss_windows(&probes.lost),
        logs(&lab)
    );
}

/// The pid of the userspace IPIP forwarder process of `node` (asked over its control
/// socket inside the node's namespace); `None` when none answers.
fn forwarder_pid(lab: &Lab, node: &str) -> Option<u32> {
    use podroute::dataplane::ipip_user::process::{Request, request};
    podroute::lab::in_namespace(&lab.node_ns(node), || {
        request("tunl0", &Request::Counters, Duration::from_secs(2))
    })
    .ok()?
    .ok()
    .map(|r| r.pid)
}

/// A cross-router pod pair with the userspace tunnel between them, or `None` (reported as
/// not runnable) when this kernel has the `ipip` module (then the kernel forwards and there
/// is no forwarder process to test).
fn userspace_tunnel_lab(test: &str, tag: &str) -> Option<Lab> {
    if !can_run(test) {
        return None;
    }
    let mut lab = lab(tag, ClusterSpec::seed(), |_| {});
    start_converged(&mut lab);
    if lab.ipip_available() || !lab.has_tunnel_device(MASTER01) {
        cannot_run(
            test,
            "the kernel has the ipip module (or no tunl0 was made)",
            "Covers the userspace tunnel's forwarder process: run on a kernel without ipip.",
        );
        return None;
    }
    Some(lab)
}

/// issue 13: the userspace IPIP forwarder is its own process. A SIGKILLed agent that stays
/// down for 10 s loses no ping through the tunnel (before: the forwarder died with the
/// agent and every ping of the pause was lost), and the restarted agent adopts the running
/// forwarder instead of starting another.
#[test]
fn agent_sigkill_and_10s_pause_lose_no_ping_through_the_userspace_tunnel() {
    const TEST: &str = "agent_sigkill_and_10s_pause_lose_no_ping_through_the_userspace_tunnel";
    let Some(mut lab) = userspace_tunnel_lab(TEST, "fwdkill") else {
        return;
    };
    let forwarder = forwarder_pid(&lab, MASTER01)
        .unwrap_or_else(|| panic!("master01's forwarder answers\n{}", logs(&lab)));
    let agent = lab.pid(MASTER01).expect("master01's agent runs");
    assert_ne!(forwarder, agent, "the forwarder is a process of its own");
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, MASTER01)),
        pod_ip(&lab, NODE02),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent(MASTER01, libc::SIGKILL, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("stopping master01: {e}\n{}", logs(&lab)));
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        forwarder_pid(&lab, MASTER01),
        Some(forwarder),
        "the forwarder outlived its agent"
    );
    let started = Instant::now();
    lab.start_agent(MASTER01).expect("start the agent again");
    lab.wait_ready(MASTER01, CONVERGE)
        .unwrap_or_else(|e| panic!("master01 ready again: {e}\n{}", logs(&lab)));
    lab.wait_converged(CONVERGE)
        .unwrap_or_else(|e| panic!("after restarting master01: {e}\n{}", logs(&lab)));
    wait_log(
        &lab,
        MASTER01,
        "userspace IPIP forwarder process running",
        started,
        CHANGE,
    );
    std::thread::sleep(Duration::from_millis(500));
    let probes = prober.stop();
    eprintln!(
        "\n=== {TEST}: ping pod {} -> pod {} every 10 ms, master01's agent SIGKILLed, 10 s \
         down, restarted (back in {:.2?}): sent {}, lost {} in {:?}\n",
        pod_ip(&lab, MASTER01),
        pod_ip(&lab, NODE02),
        started.elapsed(),
        probes.sent,
        probes.lost.len(),
        loss_windows(&probes.lost)
    );
    assert!(probes.error.is_none(), "prober: {:?}", probes.error);
    assert!(
        probes.sent > 1000,
        "the prober ran through the pause: {}",
        probes.sent
    );
    assert!(
        probes.lost.is_empty(),
        "lost {} replies through the userspace tunnel: {:?}\n{}",
        probes.lost.len(),
        loss_windows(&probes.lost),
        logs(&lab)
    );
    assert_eq!(
        forwarder_pid(&lab, MASTER01),
        Some(forwarder),
        "the restarted agent adopted the forwarder instead of starting another"
    );
    let log = std::fs::read_to_string(lab.log_path(MASTER01)).unwrap_or_default();
    assert!(
        log.contains("adopted=true"),
        "the restarted agent says it adopted the forwarder:\n{log}"
    );
}

/// issue 13: a rolling SIGTERM restart of every node's agent (as a DaemonSet rollout does)
/// loses no ping through the userspace tunnel across the router, in both directions of the
/// tunnel (master01 -> node02 and back), and every node keeps its forwarder process.
#[test]
fn rolling_sigterm_restart_of_every_node_loses_no_ping_through_the_userspace_tunnel() {
    const TEST: &str =
        "rolling_sigterm_restart_of_every_node_loses_no_ping_through_the_userspace_tunnel";
    let Some(mut lab) = userspace_tunnel_lab(TEST, "fwdroll") else {
        return;
    };
    let nodes = [MASTER01, NODE01, NODE02];
    let forwarders: Vec<(&str, u32)> = nodes
        .iter()
        .map(|n| {
            let pid = forwarder_pid(&lab, n)
                .unwrap_or_else(|| panic!("{n}'s forwarder answers\n{}", logs(&lab)));
            (*n, pid)
        })
        .collect();
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, MASTER01)),
        pod_ip(&lab, NODE02),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let restarts: Vec<Restart> = nodes
        .iter()
        .map(|n| restart(&mut lab, n, libc::SIGTERM, "rolling SIGTERM"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let probes = prober.stop();
    let mut report = format!(
        "\n=== {TEST}: ping pod {} -> pod {} every 10 ms through the userspace tunnel while \
         every agent restarts (SIGTERM, one after the other): sent {}, lost {} in {:?}\n",
        pod_ip(&lab, MASTER01),
        pod_ip(&lab, NODE02),
        probes.sent,
        probes.lost.len(),
        loss_windows(&probes.lost)
    );
    for r in &restarts {
        report += &format!(
            "  {:<26} exit {:>8.1?}  ready {:>8.2?}  all converged {:>8.2?}\n",
            r.what, r.exit, r.ready, r.converged
        );
    }
    eprintln!("{report}");
    assert!(probes.error.is_none(), "prober: {:?}", probes.error);
    assert!(
        probes.sent > 300,
        "the prober ran through the restarts: {}",
        probes.sent
    );
    assert!(
        probes.lost.is_empty(),
        "lost {} replies through the userspace tunnel: {:?}\n{report}\n{}",
        probes.lost.len(),
        loss_windows(&probes.lost),
        logs(&lab)
    );
    for (node, pid) in forwarders {
        assert_eq!(
            forwarder_pid(&lab, node),
            Some(pid),
            "{node}'s restarted agent adopted its forwarder instead of starting another"
        );
    }
}

/// A SIGKILLed forwarder process is started again by the running agent with the agent's
/// table: pings through the tunnel resume.
#[test]
fn a_killed_forwarder_is_restarted_by_the_agent() {
    const TEST: &str = "a_killed_forwarder_is_restarted_by_the_agent";
    let Some(lab) = userspace_tunnel_lab(TEST, "fwdcrash") else {
        return;
    };
    let old = forwarder_pid(&lab, MASTER01)
        .unwrap_or_else(|| panic!("master01's forwarder answers\n{}", logs(&lab)));
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, MASTER01)),
        pod_ip(&lab, NODE02),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    // SAFETY: kill has no memory-safety preconditions; the pid answered on the lab node's
    // own control socket just now.
    assert_eq!(
        unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) },
        0,
        "SIGKILL the forwarder"
    );
    let new = eventually(&lab, "a new forwarder answers", CHANGE, || {
        forwarder_pid(&lab, MASTER01)
            .filter(|p| *p != old)
            .ok_or_else(|| "no forwarder, or still the old one".to_string())
    });
    let restarted = killed.elapsed();
    // Pings resume: poll until a second's worth of pings goes through without a loss.
    let deadline = Instant::now() + CHANGE;
    let clean = loop {
        let check = Prober::start(
            &lab.pod_ns(&pod_name(&lab, MASTER01)),
            pod_ip(&lab, NODE02),
            Duration::from_millis(10),
        );
        std::thread::sleep(Duration::from_secs(1));
        let r = check.stop();
        if r.lost.is_empty() && r.received > 50 {
            break Some(r);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let probes = prober.stop();
    eprintln!(
        "\n=== {TEST}: forwarder {old} SIGKILLed, forwarder {new} answered after {restarted:.2?}; \
         10 ms pings: sent {}, lost {} in {:?}\n",
        probes.sent,
        probes.lost.len(),
        loss_windows(&probes.lost)
    );
    assert!(
        clean.is_some(),
        "pings through the new forwarder resume without loss: {:?}\n{}",
        loss_windows(&probes.lost),
        logs(&lab)
    );
    let log = std::fs::read_to_string(lab.log_path(MASTER01)).unwrap_or_default();
    assert!(
        log.contains("userspace IPIP forwarder stopped"),
        "the agent noticed the forwarder's death:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Peer loss by hold timer
// ---------------------------------------------------------------------------------------

#[test]
fn hold_timer_expiry_removes_a_lost_peers_routes() {
    const TEST: &str = "hold_timer_expiry_removes_a_lost_peers_routes";
    if !can_run(TEST) {
        return;
    }
    const HOLD: u16 = 3;
    let mut lab = lab("hold", ClusterSpec::seed(), |cfg| cfg.hold_time = HOLD);
    start_converged(&mut lab);
    let master_before = kernel(&lab, MASTER01);
    let direct = format!("{BLOCK_NODE01} via 192.168.92.129 dev ens33");
    assert!(master_before.contains(&direct), "{master_before:?}");
    let watch = lab
        .watch_kernel_routes(&[MASTER01, NODE02], Duration::from_millis(20))
        .unwrap();
    let established_before = metric_of(
        &lab,
        MASTER01,
        "podroute_bgp_session_establishments_total{peer=\"192.168.92.129\",peer_type=\"mesh\"}",
    );

    let down_at = watch.now();
    let down = Instant::now();
    lab.set_node_link(NODE01, false).unwrap();
    // node02 routes to node01's block through tunl0 (not in the kernel while there is no
    // tunl0): its agent's route report says when it dropped it.
    let node02_took = measure(
        &lab,
        "node02 drops node01's block",
        down,
        Duration::from_secs(15),
        || {
            let report = lab.routes(NODE02).map_err(|e| e.to_string())?;
            if report.routes.iter().any(|r| r.prefix == BLOCK_NODE01) {
                Err("still planned".into())
            } else {
                Ok(())
            }
        },
    );
    let master_took = measure(
        &lab,
        "master01's kernel drops node01's block",
        down,
        Duration::from_secs(15),
        || {
            let last = watch.record(MASTER01).unwrap().last();
            if has_prefix(&last, BLOCK_NODE01) {
                Err(format!("{last:?}"))
            } else {
                Ok(())
            }
        },
    );
    let record = watch.record(MASTER01).unwrap();
    let master_removal = record
        .first_removal(&format!("{BLOCK_NODE01} "), down_at)
        .map(|at| at - down_at);
    // The status is republished at least once a second.
    let peer = eventually(&lab, "master01's status shows node01 down", CHANGE, || {
        let status = lab.node_status(MASTER01).map_err(|e| e.to_string())?;
        match status.peers.iter().find(|p| p.address == "192.168.92.129") {
            Some(p) if p.state != "Established" => Ok(p.clone()),
            other => Err(format!("{other:?}")),
        }
    });
    let status_took = down.elapsed();
    let notif_sent = eventually(
        &lab,
        "master01 counts the NOTIFICATION it sent",
        CHANGE,
        || match metric_of(
            &lab,
            MASTER01,
            "podroute_bgp_notifications_sent_total{peer=\"192.168.92.129\",peer_type=\"mesh\"}",
        ) {
            Some(v) if v >= 1.0 => Ok(v),
            other => Err(format!("{other:?}")),
        },
    );

    // Plugged back: the sessions come back and so do the routes, everywhere.
    let up = Instant::now();
    lab.set_node_link(NODE01, true).unwrap();
    let back = converged(&lab);
    let records = watch.stop();
    for node in [MASTER01, NODE01, NODE02] {
        assert_eq!(
            kernel(&lab, node),
            lab.expected_kernel_routes(node).unwrap(),
            "{node} after the link came back"
        );
    }
    // Only node01's block left master01's table, and it came back.
    let m = records.iter().find(|r| r.node == MASTER01).unwrap();
    let others: Vec<String> = master_before
        .iter()
        .filter(|r| !r.starts_with(BLOCK_NODE01))
        .cloned()
        .collect();
    assert!(
        m.missing(&others).is_empty(),
        "{:?}\n{}",
        m.missing(&others),
        describe_records(&records)
    );
    let n2 = records.iter().find(|r| r.node == NODE02).unwrap();
    let n2_must: Vec<String> = lab
        .expected_kernel_routes(NODE02)
        .unwrap()
        .into_iter()
        .filter(|r| !r.starts_with(BLOCK_NODE01))
        .collect();
    // With a tunl0 (kernel or userspace), node02's route to node01's block is in its kernel.
    let node02_removal = n2
        .first_removal(&format!("{BLOCK_NODE01} "), down_at)
        .map(|at| at - down_at);
    assert!(
        n2.missing(&n2_must).is_empty(),
        "{:?}",
        n2.missing(&n2_must)
    );

    eprintln!(
        "\n=== {TEST}: hold time {HOLD} s; node01's cable pulled: master01's kernel lost node01's \
         block after {master_took:.2?} (netlink removal at {master_removal:.2?}), node02's plan \
         after {node02_took:.2?} (its kernel: {node02_removal:.2?}); master01's status (seen {status_took:.2?} after the cable was \
         pulled): state {} info {:?}; NOTIFICATIONs \
         sent to node01: {notif_sent}; session establishments before: {established_before:?}; \
         plugged back: all converged after {back:.2?} ({:.2?} since the link came up)\n",
        peer.state,
        peer.info,
        up.elapsed()
    );
    let limit = Duration::from_secs(u64::from(HOLD) + 1);
    assert!(
        master_took <= limit,
        "master01 took {master_took:?} (> hold {HOLD} s + 1 s)\n{}",
        logs(&lab)
    );
    assert!(
        node02_took <= limit,
        "node02 took {node02_took:?} (> hold {HOLD} s + 1 s)\n{}",
        logs(&lab)
    );
}

// ---------------------------------------------------------------------------------------
// 3. API server outage
// ---------------------------------------------------------------------------------------

const API_ADDR: &str = "192.168.92.240";
const API_PORT: u16 = 6443;

fn decode(text: &str) -> Vec<Object> {
    decode_documents(text)
        .unwrap()
        .into_iter()
        .map(|o| o.unwrap())
        .collect()
}

fn apply_object(server: &FakeApiServer, object: &Object) {
    match object {
        Object::Node(o) => server.apply(o.as_ref()),
        Object::IPPool(o) => server.apply(o),
        Object::IPAMBlock(o) => server.apply(o),
        Object::BlockAffinity(o) => server.apply(o),
        Object::BGPPeer(o) => server.apply(o),
        Object::BGPConfiguration(o) => server.apply(o),
        Object::BGPFilter(o) => server.apply(o),
        Object::Service(o) => server.apply(o.as_ref()),
        Object::EndpointSlice(o) => server.apply(o.as_ref()),
    };
}

fn delete_object(server: &FakeApiServer, object: &Object) {
    let name = object.name().to_string();
    let found = match object {
        Object::Node(_) => server.delete::<Node>(&name),
        Object::IPPool(_) => server.delete::<IPPool>(&name),
        Object::IPAMBlock(_) => server.delete::<IPAMBlock>(&name),
        Object::BlockAffinity(_) => server.delete::<BlockAffinity>(&name),
        Object::BGPPeer(_) => server.delete::<BGPPeer>(&name),
        Object::BGPConfiguration(_) => server.delete::<BGPConfiguration>(&name),
        Object::BGPFilter(_) => server.delete::<podroute::model::crd::BGPFilter>(&name),
        Object::Service(_) => server.delete::<k8s_openapi::api::core::v1::Service>(&name),
        Object::EndpointSlice(_) => {
            server.delete::<k8s_openapi::api::discovery::v1::EndpointSlice>(&name)
        }
    };
    assert!(found, "{name} was on the server");
}

/// An empty block (no pods) of `node`, with its BlockAffinity.
fn empty_block(cidr: &str, node: &str) -> Vec<Object> {
    let name = cidr.replace(['.', '/'], "-");
    decode(&format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  name: {name}\n\
         spec:\n  affinity: host:{node}\n  cidr: {cidr}\n  deleted: false\n  \
         strictAffinity: false\n---\n\
         apiVersion: crd.projectcalico.org/v1\nkind: BlockAffinity\nmetadata:\n  \
         name: {node}-{name}\nspec:\n  cidr: {cidr}\n  deleted: \"false\"\n  node: {node}\n  \
         state: confirmed\n"
    ))
}

/// A listener on the API address, made inside the API namespace.
fn api_listener(ns: &str) -> TcpListener {
    let addr: SocketAddr = format!("{API_ADDR}:{API_PORT}").parse().unwrap();
    podroute::lab::in_namespace(ns, move || TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr} in the API namespace: {e}"))
}

#[test]
fn api_server_outage_keeps_routes_and_applies_changes_after_reconnect() {
    const TEST: &str = "api_server_outage_keeps_routes_and_applies_changes_after_reconnect";
    if !can_run(TEST) {
        return;
    }
    let mut lab = lab("api", two_nodes(), |_| {});
    let api_ns = lab
        .attach_host("api", format!("{API_ADDR}/24").parse().unwrap())
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut server = {
        let listener = api_listener(&api_ns);
        rt.block_on(async { FakeApiServer::start_with(listener) })
    };
    server.serve::<Node>();
    server.serve::<IPPool>();
    server.serve::<IPAMBlock>();
    server.serve::<BlockAffinity>();
    server.serve::<BGPPeer>();
    server.serve::<BGPConfiguration>();
    for (_, text) in lab.spec.datastore_files() {
        for object in decode(&text) {
            apply_object(&server, &object);
        }
    }
    let kubeconfig = lab.workdir().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    \
             server: http://{API_ADDR}:{API_PORT}\nusers:\n- name: fake\n  user: {{}}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    let env = vec![("KUBECONFIG".to_string(), kubeconfig.display().to_string())];
    for node in [MASTER01, NODE01] {
        let args: Vec<String> = lab
            .agent_args(node)
            .unwrap()
            .into_iter()
            .map(|a| {
                if a.starts_with("dir:") {
                    "kubernetes".to_string()
                } else {
                    a
                }
            })
            .collect();
        lab.start_agent_with(node, &args, &env).unwrap();
    }
    converged(&lab);
    for node in [MASTER01, NODE01] {
        let s = lab.node_status(node).unwrap();
        assert_eq!(s.datastore.source, "kubernetes", "{node}");
    }

    // A second, empty block for node01 (the one to be released during the outage).
    let doomed = "172.16.196.192/26";
    let doomed_objects = empty_block(doomed, NODE01);
    for o in &doomed_objects {
        apply_object(&server, o);
    }
    let doomed_master = format!("{doomed} via 192.168.92.129 dev ens33");
    let doomed_node01 = format!("blackhole {doomed}");
    eventually(&lab, "node01's second block everywhere", CHANGE, || {
        let m = kernel(&lab, MASTER01);
        let n = kernel(&lab, NODE01);
        if m.contains(&doomed_master) && n.contains(&doomed_node01) {
            Ok(())
        } else {
            Err(format!("{m:?} {n:?}"))
        }
    });
    let before: Vec<(String, Vec<String>)> = [MASTER01, NODE01]
        .iter()
        .map(|n| (n.to_string(), kernel(&lab, n)))
        .collect();
    let watch = lab
        .watch_kernel_routes(&[MASTER01, NODE01], Duration::from_millis(20))
        .unwrap();

    // The outage.
    let outage_at = watch.now();
    rt.block_on(server.stop());
    std::thread::sleep(Duration::from_secs(3));
    let during: Vec<String> = [MASTER01, NODE01]
        .iter()
        .map(|n| {
            let s = lab.node_status(n).unwrap();
            format!(
                "{n}: ready {} {:?}, datastore synced {} errors {:?}",
                s.health.ready, s.health.not_ready, s.datastore.synced, s.datastore.errors
            )
        })
        .collect();
    // The agents go on, alive: an API outage is no reason for the kubelet to restart them.
    for node in [MASTER01, NODE01] {
        lab.check_running(node).unwrap();
        let (code, body) = lab.agent_get(node, "/livez").unwrap();
        assert_eq!(code, 200, "{node} /livez during the outage: {body}");
    }
    // Changed meanwhile: node01's second block released, a new block for master01; and the
    // history compacted, so the watches that resume get 410 Gone and must relist.
    for o in &doomed_objects {
        delete_object(&server, o);
    }
    let added = "172.16.241.128/26";
    for o in empty_block(added, MASTER01) {
        apply_object(&server, &o);
    }
    server.compact();
    std::thread::sleep(Duration::from_secs(2));
    let restart_at = watch.now();
    let restarted = Instant::now();
    let listener = api_listener(&api_ns);
    rt.block_on(server.restart_with(listener));

    let added_master = format!("blackhole {added}");
    let added_node01 = format!("{added} via 192.168.92.128 dev ens33");
    let applied = measure(
        &lab,
        "the outage's changes applied",
        restarted,
        Duration::from_secs(60),
        || {
            let m = watch.record(MASTER01).unwrap().last();
            let n = watch.record(NODE01).unwrap().last();
            let done = m.contains(&added_master)
                && n.contains(&added_node01)
                && !m.contains(&doomed_master)
                && !n.contains(&doomed_node01);
            if done {
                Ok(())
            } else {
                Err(format!("master01 {m:?}; node01 {n:?}"))
            }
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let records = watch.stop();

    eprintln!(
        "\n=== {TEST}: API server stopped for {:.2?}; during the outage:\n  {}\n  changes \
         (block {doomed} released, block {added} added, history compacted) applied \
         {applied:.2?} after the server came back\n",
        restart_at - outage_at,
        during.join("\n  ")
    );
    // Nothing changed while the server was away.
    for r in &records {
        let changed: Vec<&Duration> = r
            .tables
            .iter()
            .skip(1)
            .map(|(at, _)| at)
            .filter(|at| **at < restart_at)
            .collect();
        assert!(
            changed.is_empty() && r.removed.iter().all(|(at, _)| *at >= restart_at),
            "{}'s table changed during the outage:\n{}",
            r.node,
            describe_records(&records)
        );
    }
    // Every still-valid route stayed; only the released block's route was removed.
    let must: Vec<(String, Vec<String>)> = before
        .iter()
        .map(|(n, routes)| {
            (
                n.clone(),
                routes
                    .iter()
                    .filter(|r| !r.contains(doomed))
                    .cloned()
                    .collect(),
            )
        })
        .collect();
    assert_never_missing(&records, &must, &lab);
    for r in &records {
        let removed: Vec<&String> = r.removed.iter().map(|(_, route)| route).collect();
        let want = if r.node == MASTER01 {
            &doomed_master
        } else {
            &doomed_node01
        };
        assert_eq!(
            removed,
            vec![want],
            "{}: {}",
            r.node,
            describe_records(&records)
        );
    }
    for node in [MASTER01, NODE01] {
        let s = lab.node_status(node).unwrap();
        assert!(s.health.ready, "{node}: {:?}", s.health);
    }
    drop(server);
    drop(rt);
}

// ---------------------------------------------------------------------------------------
// 4. BIRD 2 restarts gracefully
// ---------------------------------------------------------------------------------------

const TOR_ADDR: &str = "192.168.92.250";
const TOR_AS: u32 = 65001;
const EXT_KEPT: &str = "10.200.0.0/26";
const EXT_GONE: &str = "10.200.0.64/26";

fn tor_conf(lab: &Lab, log: &Path, statics: &[&str]) -> String {
    let mut s = format!(
        "log \"{}\" all;\nrouter id {TOR_ADDR};\ngraceful restart wait 15;\n\
         protocol device {{ scan time 2; }}\nprotocol static ext {{\n  ipv4;\n",
        log.display()
    );
    for p in statics {
        s += &format!("  route {p} blackhole;\n");
    }
    s += "}\n";
    for n in &lab.spec.nodes {
        s += &format!(
            "protocol bgp {name} {{\n  local {TOR_ADDR} as {TOR_AS};\n  neighbor {ip} as {asn};\n  \
             direct;\n  hold time 9;\n  connect delay time 1;\n  connect retry time 1;\n  \
             error wait time 1, 5;\n  graceful restart on;\n  \
             ipv4 {{ import all; export where source = RTS_STATIC; }};\n}}\n",
            name = n.name,
            ip = n.ip(),
            asn = lab.spec.as_number,
        );
    }
    s
}

fn birdc(ns: &str, socket: &Path, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-s", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    match podroute::lab::exec(ns, "birdc", &all) {
        Ok((true, out)) => Ok(out),
        Ok((false, out)) => Err(out),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn bird_graceful_restart_keeps_its_routes_until_end_of_rib() {
    const TEST: &str = "bird_graceful_restart_keeps_its_routes_until_end_of_rib";
    if !can_run(TEST) || !have_bird(TEST) {
        return;
    }
    let mut lab = lab("birdgr", two_nodes(), |_| {});
    start_converged(&mut lab);
    let ns = lab
        .attach_host("tor", format!("{TOR_ADDR}/24").parse().unwrap())
        .unwrap();
    let dir = lab.workdir().join("tor");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("bird.conf");
    let socket = dir.join("bird.ctl");
    let bird_log = dir.join("bird.log");
    std::fs::write(&conf, tor_conf(&lab, &bird_log, &[EXT_KEPT, EXT_GONE])).unwrap();
    let (ok, out) =
        podroute::lab::exec(&ns, "bird", &["-p", "-c", conf.to_str().unwrap()]).unwrap();
    assert!(ok, "bird.conf does not parse:\n{out}");
    let bird_args = |recover: bool| {
        let mut a = vec![
            "-f".to_string(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            socket.display().to_string(),
        ];
        if recover {
            a.push("-R".into());
        }
        a
    };
    lab.spawn("bird", &ns, Path::new("bird"), &bird_args(false))
        .unwrap();
    lab.update_spec(|spec| {
        spec.peers.push(BgpPeerSpec {
            name: "tor".into(),
            peer_ip: TOR_ADDR.parse().unwrap(),
            as_number: TOR_AS,
        })
    })
    .unwrap();
    let kept = format!("{EXT_KEPT} via {TOR_ADDR} dev ens33");
    let gone = format!("{EXT_GONE} via {TOR_ADDR} dev ens33");
    let nodes = [MASTER01, NODE01];
    eventually(&lab, "BIRD's two routes in both kernels", CONVERGE, || {
        for n in nodes {
            let k = kernel(&lab, n);
            if !(k.contains(&kept) && k.contains(&gone)) {
                return Err(format!("{n}: {k:?}"));
            }
        }
        Ok(())
    });
    let gr_negotiated = birdc(&ns, &socket, &["show", "protocols", "all", MASTER01])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Graceful restart") || l.contains("Restart"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    let must: Vec<(String, Vec<String>)> = nodes
        .iter()
        .map(|n| (n.to_string(), kernel(&lab, n)))
        .collect();
    let watch = lab
        .watch_kernel_routes(&nodes, Duration::from_millis(20))
        .unwrap();

    // BIRD exits for a graceful restart: no NOTIFICATION, its peers keep its routes (stale).
    let out = birdc(&ns, &socket, &["graceful", "restart"]).unwrap();
    assert!(out.contains("Graceful restart"), "birdc: {out}");
    let exit_at = watch.now();
    eventually(&lab, "BIRD exits", Duration::from_secs(10), || {
        match lab.check_running("bird") {
            Err(LabError::Exited { .. }) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let stale = eventually(
        &lab,
        "the agents hold BIRD's routes as stale",
        CHANGE,
        || {
            let mut stale = Vec::new();
            for n in nodes {
                let s = lab.node_status(n).map_err(|e| e.to_string())?;
                let p = s
                    .peers
                    .iter()
                    .find(|p| p.address == TOR_ADDR)
                    .ok_or("no tor peer")?;
                if p.state == "Established" || p.stale_prefixes != 2 {
                    return Err(format!("{n}: {p:?}"));
                }
                stale.push(format!("{n}: {} stale, {}", p.stale_prefixes, p.state));
            }
            Ok(stale)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let bird_back_at = watch.now();
    std::fs::write(&conf, tor_conf(&lab, &bird_log, &[EXT_KEPT])).unwrap();
    lab.stop_agent("bird", libc::SIGKILL, Duration::from_secs(5))
        .unwrap();
    lab.spawn("bird", &ns, Path::new("bird"), &bird_args(true))
        .unwrap();
    let back = Instant::now();
    let swept = measure(
        &lab,
        "the agents drop the route BIRD no longer has",
        back,
        Duration::from_secs(40),
        || {
            for n in nodes {
                let last = watch.record(n).unwrap().last();
                if last.contains(&gone) || !last.contains(&kept) {
                    return Err(format!("{n}: {last:?}"));
                }
            }
            Ok(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let records = watch.stop();
    let reestablished: Vec<String> = nodes
        .iter()
        .map(|n| {
            let s = lab.node_status(n).unwrap();
            let p = s.peers.iter().find(|p| p.address == TOR_ADDR).unwrap();
            format!("{n}: {} stale {}", p.state, p.stale_prefixes)
        })
        .collect();
    eprintln!(
        "\n=== {TEST}: BIRD's GR ({gr_negotiated}); BIRD exited at {exit_at:.2?}; agents then: \
         {stale:?}; bird -R started at {bird_back_at:.2?}; {EXT_GONE} swept {swept:.2?} later \
         (after End-of-RIB); tor sessions now {reestablished:?}\n"
    );
    // Until BIRD came back, both routes (and everything else) stayed in both kernels; after,
    // everything but the swept route.
    for r in &records {
        let early = RouteRecord {
            tables: r
                .tables
                .iter()
                .filter(|(at, _)| *at < bird_back_at)
                .cloned()
                .collect(),
            removed: r
                .removed
                .iter()
                .filter(|(at, _)| *at < bird_back_at)
                .cloned()
                .collect(),
            ..r.clone()
        };
        let want = &must.iter().find(|(n, _)| *n == r.node).unwrap().1;
        assert!(
            early.missing(want).is_empty(),
            "before BIRD came back: {:?}\n{}",
            early.missing(want),
            describe_records(&records)
        );
        let rest: Vec<String> = want.iter().filter(|l| **l != gone).cloned().collect();
        assert!(
            r.missing(&rest).is_empty(),
            "{:?}\n{}",
            r.missing(&rest),
            describe_records(&records)
        );
        let removed: Vec<&String> = r.removed.iter().map(|(_, l)| l).collect();
        assert_eq!(removed, vec![&gone], "{}", describe_records(&records));
    }
}

// ---------------------------------------------------------------------------------------
// 5. Garbage and truncated BGP messages from a test peer
// ---------------------------------------------------------------------------------------

const RAW_ADDR: &str = "192.168.92.251";
const RAW_AS: u32 = 65002;
// Inside the lab's pool (172.16.0.0/16): node01 passes them on over the mesh only because
// they are pool routes (Calico's export rule; an external prefix would stay on node01).
const RAW_A: &str = "172.16.201.0/26";
const RAW_B: &str = "172.16.201.64/26";

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;

fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xffu8; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(msg_type);
    m.extend_from_slice(body);
    m
}

/// OPEN: version 4, AS, hold 9, identifier, capabilities IPv4 unicast and 4-octet AS.
fn open_body(asn: u32, router_id: Ipv4Addr) -> Vec<u8> {
    let mut caps = vec![1, 4, 0, 1, 0, 1];
    caps.extend_from_slice(&[65, 4]);
    caps.extend_from_slice(&asn.to_be_bytes());
    let mut b = vec![4];
    b.extend_from_slice(&(asn as u16).to_be_bytes());
    b.extend_from_slice(&9u16.to_be_bytes());
    b.extend_from_slice(&router_id.octets());
    b.push((caps.len() + 2) as u8);
    b.push(2);
    b.push(caps.len() as u8);
    b.extend_from_slice(&caps);
    b
}

/// UPDATE announcing `prefixes` (/26s) with ORIGIN `origin` (0 = IGP; anything above 2 is
/// malformed), AS_PATH [RAW_AS] (4-octet), NEXT_HOP the raw peer.
fn update_body(origin: u8, prefixes: &[&str]) -> Vec<u8> {
    let mut attrs = vec![0x40, 1, 1, origin];
    attrs.extend_from_slice(&[0x40, 2, 6, 2, 1]);
    attrs.extend_from_slice(&RAW_AS.to_be_bytes());
    attrs.extend_from_slice(&[0x40, 3, 4]);
    attrs.extend_from_slice(&RAW_ADDR.parse::<Ipv4Addr>().unwrap().octets());
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(&attrs);
    for p in prefixes {
        let net: ipnet::Ipv4Net = p.parse().unwrap();
        b.push(net.prefix_len());
        let octets = usize::from(net.prefix_len()).div_ceil(8);
        b.extend_from_slice(&net.network().octets()[..octets]);
    }
    b
}

/// A NOTIFICATION received: code, subcode, data.
type Notif = (u8, u8, Vec<u8>);

/// One BGP session of the raw peer: a reader thread collects what the agent sends, a
/// keepalive thread keeps the session up, writes go through a shared handle.
struct RawSession {
    writer: Arc<Mutex<TcpStream>>,
    received: mpsc::Receiver<Result<(u8, Vec<u8>), String>>,
    stop: Arc<AtomicBool>,
}

fn read_message(s: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let mut hdr = [0u8; 19];
    s.read_exact(&mut hdr).map_err(|e| format!("header: {e}"))?;
    let len = usize::from(u16::from_be_bytes([hdr[16], hdr[17]]));
    if len < 19 {
        return Err(format!("bad length {len}"));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok((hdr[18], body))
}

impl RawSession {
    /// Accepts node01's connection and completes OPEN / KEEPALIVE.
    fn accept(listener: &TcpListener, timeout: Duration) -> Result<RawSession, String> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!("no connection from node01 within {timeout:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let (t, body) = read_message(&mut stream)?;
        if t != OPEN {
            return Err(format!("expected OPEN, got type {t}: {body:?}"));
        }
        let peer_as = u16::from_be_bytes([body[1], body[2]]);
        stream
            .write_all(&frame(OPEN, &open_body(RAW_AS, RAW_ADDR.parse().unwrap())))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&frame(KEEPALIVE, &[]))
            .map_err(|e| e.to_string())?;
        match read_message(&mut stream)? {
            (KEEPALIVE, _) => {}
            (t, body) => return Err(format!("expected KEEPALIVE, got {t}: {body:?}")),
        }
        if u32::from(peer_as) != 64512 {
            return Err(format!("node01's OPEN says AS {peer_as}"));
        }
        let writer = Arc::new(Mutex::new(stream.try_clone().unwrap()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, received) = mpsc::channel();
        let mut reader = stream;
        std::thread::spawn(move || {
            loop {
                let m = read_message(&mut reader);
                let end = m.is_err();
                if tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let (w, s) = (writer.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let sent = w.lock().unwrap().write_all(&frame(KEEPALIVE, &[]));
                if sent.is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Ok(RawSession {
            writer,
            received,
            stop,
        })
    }

    fn send_raw(&self, bytes: &[u8]) {
        self.writer.lock().unwrap().write_all(bytes).unwrap();
    }

    fn send(&self, msg_type: u8, body: &[u8]) {
        self.send_raw(&frame(msg_type, body));
    }

    /// Every message received so far (the reader's errors, e.g. EOF, included).
    fn drain(&self) -> Vec<Result<(u8, Vec<u8>), String>> {
        self.received.try_iter().collect()
    }

    /// Waits for a NOTIFICATION and then the end of the connection: (code, subcode, data)
    /// and what else came before it.
    fn notification(&self, timeout: Duration) -> Result<(Notif, bool), String> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut found = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.received.recv_timeout(left) {
                Ok(Ok((NOTIFICATION, body))) if found.is_none() => {
                    found = Some((body[0], body[1], body[2..].to_vec()));
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return found
                        .map(|n| (n, true))
                        .ok_or_else(|| "the connection ended without a NOTIFICATION".to_string());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return found
                        .map(|n| (n, false))
                        .ok_or_else(|| format!("no NOTIFICATION within {timeout:?}"));
                }
            }
        }
    }
}

impl Drop for RawSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self
            .writer
            .lock()
            .unwrap()
            .shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn garbage_from_a_peer_resets_only_that_session() {
    const TEST: &str = "garbage_from_a_peer_resets_only_that_session";
    if !can_run(TEST) {
        return;
    }
    let mut lab = lab("garbage", two_nodes(), |_| {});
    start_converged(&mut lab);
    let ns = lab
        .attach_host("raw", format!("{RAW_ADDR}/24").parse().unwrap())
        .unwrap();
    let addr: SocketAddr = format!("{RAW_ADDR}:179").parse().unwrap();
    let listener = podroute::lab::in_namespace(&ns, move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let nodes = [MASTER01, NODE01];
    let mesh_before: Vec<(String, Vec<String>)> = nodes
        .iter()
        .map(|n| (n.to_string(), kernel(&lab, n)))
        .collect();
    let mesh_est = |lab: &Lab| -> Vec<Option<f64>> {
        [(MASTER01, "192.168.92.129"), (NODE01, "192.168.92.128")]
            .iter()
            .map(|(n, peer)| {
                metric_of(
                    lab,
                    n,
                    &format!(
                        "podroute_bgp_session_establishments_total{{peer=\"{peer}\",peer_type=\"mesh\"}}"
                    ),
                )
            })
            .collect()
    };
    let est_before = mesh_est(&lab);
    let watch = lab
        .watch_kernel_routes(&nodes, Duration::from_millis(20))
        .unwrap();
    lab.update_spec(|spec| {
        spec.extra_files.insert(
            "bgppeer-raw-node01.yaml".into(),
            format!(
                "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  \
                 name: raw-node01\nspec:\n  node: {NODE01}\n  peerIP: {RAW_ADDR}\n  \
                 asNumber: {RAW_AS}\n"
            ),
        );
    })
    .unwrap();
    let session =
        RawSession::accept(&listener, CHANGE).unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let raw_status = |lab: &Lab| {
        lab.node_status(NODE01)
            .ok()
            .and_then(|s| s.peers.into_iter().find(|p| p.address == RAW_ADDR))
    };
    eventually(
        &lab,
        "node01 Established with the raw peer",
        CHANGE,
        || match raw_status(&lab) {
            Some(p) if p.state == "Established" && p.peer_type == "node specific" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // Two good routes: installed on node01 and, over the mesh, on master01.
    session.send(UPDATE, &update_body(0, &[RAW_A, RAW_B]));
    let route_a = format!("{RAW_A} via {RAW_ADDR} dev ens33");
    let route_b = format!("{RAW_B} via {RAW_ADDR} dev ens33");
    eventually(
        &lab,
        "the raw peer's routes in both kernels",
        CHANGE,
        || {
            for n in nodes {
                let k = kernel(&lab, n);
                if !(k.contains(&route_a) && k.contains(&route_b)) {
                    return Err(format!("{n}: {k:?}"));
                }
            }
            Ok(())
        },
    );

    // (a) RFC 7606 §7.1: an undefined ORIGIN value is treat-as-withdraw: A goes, the session
    // and B stay.
    let malformed_at = Instant::now();
    session.send(UPDATE, &update_body(7, &[RAW_A]));
    let withdrawn = measure(&lab, "A treated as withdrawn", malformed_at, CHANGE, || {
        for n in nodes {
            let last = watch.record(n).unwrap().last();
            if last.contains(&route_a) || !last.contains(&route_b) {
                return Err(format!("{n}: {last:?}"));
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let after_a = session.drain();
    assert!(
        after_a
            .iter()
            .all(|m| matches!(m, Ok((t, _)) if *t != NOTIFICATION)),
        "node01 must not reset the session over a treat-as-withdraw error: {after_a:?}\n{}",
        logs(&lab)
    );
    let p = raw_status(&lab).unwrap();
    assert_eq!(p.state, "Established", "{p:?}");
    assert_eq!(p.prefixes_accepted, 1, "{p:?}");
    // The refusal is counted for that peer and by reason.
    eventually(&lab, "the treat-as-withdraw counted", CHANGE, || {
        let p = raw_status(&lab).ok_or("no raw peer")?;
        let m = metric_of(
            &lab,
            NODE01,
            "podroute_bgp_routes_rejected_total{reason=\"malformed\"}",
        );
        if p.routes_rejected_malformed == 1 && m == Some(1.0) {
            Ok(())
        } else {
            Err(format!("{p:?} metric {m:?}"))
        }
    });

    // (b) A message with a broken marker: Message Header Error / Connection Not Synchronized,
    // then the connection closes and the peer's routes go at once.
    let mut garbage = frame(KEEPALIVE, &[]);
    garbage[..16].copy_from_slice(&[0u8; 16]);
    let garbage_at = Instant::now();
    session.send_raw(&garbage);
    let ((code, subcode, data), closed) = session
        .notification(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert_eq!((code, subcode), (1, 1), "data {data:?}");
    assert!(
        closed,
        "node01 closes the connection after its NOTIFICATION"
    );
    drop(session);
    let b_gone = measure(
        &lab,
        "B removed after the reset",
        garbage_at,
        CHANGE,
        || {
            for n in nodes {
                let last = watch.record(n).unwrap().last();
                if last.contains(&route_b) {
                    return Err(format!("{n}: {last:?}"));
                }
            }
            Ok(())
        },
    );

    // (c) node01 connects again; this time a header whose length is below the minimum:
    // Message Header Error / Bad Message Length, the bad length as data.
    let session =
        RawSession::accept(&listener, CHANGE).unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    eventually(
        &lab,
        "node01 Established with the raw peer again",
        CHANGE,
        || match raw_status(&lab) {
            Some(p) if p.state == "Established" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let mut short = frame(KEEPALIVE, &[]);
    short[16..18].copy_from_slice(&18u16.to_be_bytes());
    session.send_raw(&short);
    let ((code2, subcode2, data2), closed2) = session
        .notification(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert_eq!((code2, subcode2, data2.as_slice()), (1, 2, &[0u8, 18][..]));
    assert!(closed2);
    drop(session);

    let sent = eventually(
        &lab,
        "node01's metrics count both NOTIFICATIONs",
        CHANGE,
        || match metric_of(
            &lab,
            NODE01,
            &format!(
                "podroute_bgp_notifications_sent_total{{peer=\"{RAW_ADDR}\",peer_type=\"node\"}}"
            ),
        ) {
            Some(v) if v >= 2.0 => Ok(v),
            other => Err(format!("{other:?}")),
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let records = watch.stop();
    let est_after = mesh_est(&lab);
    let mesh_now: Vec<String> = nodes
        .iter()
        .map(|n| {
            let s = lab.node_status(n).unwrap();
            s.peers
                .iter()
                .map(|p| format!("{n}->{} {}", p.name, p.state))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    eprintln!(
        "\n=== {TEST}: malformed ORIGIN -> {RAW_A} withdrawn in {withdrawn:.2?}, session kept; \
         bad marker -> NOTIFICATION {code}/{subcode}, {RAW_B} gone {b_gone:.2?} later; \
         bad length -> NOTIFICATION {code2}/{subcode2} data {data2:?}; node01's \
         notifications_sent to the raw peer: {sent}; mesh establishments before {est_before:?} \
         after {est_after:?}; peers now: {}\n",
        mesh_now.join("; ")
    );
    assert_eq!(est_before, est_after, "the mesh sessions never flapped");
    assert!(est_after.iter().all(|v| *v == Some(1.0)), "{est_after:?}");
    for n in nodes {
        let s = lab.node_status(n).unwrap();
        let mesh = s
            .peers
            .iter()
            .find(|p| p.peer_type == "node-to-node mesh")
            .unwrap();
        assert_eq!(mesh.state, "Established", "{n}: {mesh:?}");
    }
    assert_never_missing(&records, &mesh_before, &lab);
}

// ---------------------------------------------------------------------------------------
// 6. Two agents restarting at once: the selection deferral must wait for every mesh peer
// ---------------------------------------------------------------------------------------

/// The seed cluster with node02 moved onto master01's and node01's subnet (192.168.92.130):
/// every block route is a direct one, in the kernel even without ipip.
fn one_subnet() -> ClusterSpec {
    let mut spec = ClusterSpec::seed();
    spec.node_mut(NODE02).unwrap().addr = "192.168.92.130/24".parse().unwrap();
    spec
}

/// node01 and node02 restart together (a rolling update with more than one node at a time, or
/// two nodes rebooting). node01 also has a BGPPeer that never answers, so its own selection
/// deferral runs its full 5 s; node02 must keep node01's routes until node01 has re-announced
/// them.
///
/// node02's speaker ends its own deferral as soon as node01's session is up (RFC 4724 §4.1
/// excludes peers with the Restart State bit from the End-of-RIB wait), so the agent holds
/// the kernel update until every configured peer's End-of-RIB (or `--selection-deferral`
/// + 2 s). Before that gate, node02 deleted the adopted route and lost ~400 of ~550 pings.
#[test]
fn a_restarting_agent_keeps_the_routes_of_a_peer_restarting_with_it() {
    const TEST: &str = "a_restarting_agent_keeps_the_routes_of_a_peer_restarting_with_it";
    if !can_run(TEST) {
        return;
    }
    let mut spec = one_subnet();
    spec.extra_files.insert(
        "bgppeer-silent-node01.yaml".into(),
        format!(
            "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  \
             name: silent-node01\nspec:\n  node: {NODE01}\n  peerIP: 192.168.92.252\n  \
             asNumber: 65003\n"
        ),
    );
    let mut lab = lab("defer", spec, |_| {});
    start_converged(&mut lab);
    let to_node01 = format!("{BLOCK_NODE01} via 192.168.92.129 dev ens33");
    let node02_before = kernel(&lab, NODE02);
    assert!(node02_before.contains(&to_node01), "{node02_before:?}");
    let watch = lab
        .watch_kernel_routes(&[NODE02], Duration::from_millis(20))
        .unwrap();
    let prober = Prober::start(
        &lab.pod_ns(&pod_name(&lab, NODE02)),
        pod_ip(&lab, NODE01),
        Duration::from_millis(10),
    );
    lab.stop_agent(NODE01, libc::SIGTERM, Duration::from_secs(10))
        .unwrap();
    lab.stop_agent(NODE02, libc::SIGTERM, Duration::from_secs(10))
        .unwrap();
    let node02_start = watch.now();
    lab.start_agent(NODE02).unwrap();
    lab.start_agent(NODE01).unwrap();
    converged(&lab);
    std::thread::sleep(Duration::from_millis(300));
    let probes = prober.stop();
    let records = watch.stop();
    let log = std::fs::read_to_string(lab.log_path(NODE02)).unwrap_or_default();
    let deferral: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("configuring BGP peer")
                || l.contains("session established")
                || l.contains("selection deferral over")
                || l.contains("graceful restart:")
                || (l.contains("routes reconciled") && !l.contains("added=0 replaced=0 deleted=0"))
        })
        .collect();
    let r = &records[0];
    let gone = r
        .first_removal(&format!("{BLOCK_NODE01} "), Duration::ZERO)
        .map(|at| at - node02_start);
    let back = r
        .added
        .iter()
        .find(|(_, l)| l.starts_with(&format!("{BLOCK_NODE01} ")))
        .map(|(at, _)| *at - node02_start);
    eprintln!(
        "\n=== {TEST}: node02's route to node01's block removed {gone:?} and re-added {back:?} \
         after node02 started; ping pod node02 -> pod node01: sent {}, lost {}\n  {}\n",
        probes.sent,
        probes.lost.len(),
        deferral.join("\n  ")
    );
    assert!(
        r.missing(&node02_before).is_empty() && probes.lost.is_empty(),
        "node02 dropped node01's routes while node01 was still restarting: {:?}; {} pings lost\n\
         node02's log:\n  {}\n{}",
        r.missing(&node02_before),
        probes.lost.len(),
        deferral.join("\n  "),
        describe_records(&records)
    );
}
