//! Dataplane throughput and drift-repair latency, measured in fresh network namespaces (root).
//!
//! `cargo bench --bench dataplane_apply` (env `PODROUTE_BENCH_ROUTES`, default 100000):
//! 1. baseline: `ip -batch` installs N /26 routes, then replaces 1% of them;
//! 2. podroute: a fresh namespace, `Dataplane::reconcile` installs the same N routes, then a
//!    plan with 1% of the gateways changed is reconciled;
//! 3. drift repair: with the dataplane task running, one of its routes is deleted over
//!    netlink and the time until the monitor sees it re-added is recorded (repeated).
//!
//! Prints routes/second for each and the podroute/`ip -batch` ratio. Addresses are used only
//! inside the namespaces created here.

#[path = "../tests/netns/mod.rs"]
mod netns;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netns::{Netns, can_run, sh, veth};
use podroute::dataplane::kernel::{Change, KernelRoute};
use podroute::dataplane::monitor::{Event, MonitorSocket};
use podroute::dataplane::socket::RequestSocket;
use podroute::dataplane::{
    DEFAULT_ROUTE_PROTOCOL, Dataplane, DataplaneConfig, DataplaneStatus, PlanMessage, PlanUpdate,
};
use podroute::plan::{DesiredRoute, RouteKind, RouteScope};
use tokio::sync::{mpsc, watch};

const PROTO: u8 = DEFAULT_ROUTE_PROTOCOL;

fn prefix(i: u32) -> IpNet {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i << 6);
    IpNet::new(IpAddr::V4(base.into()), 26).unwrap_or_default()
}

fn desired(n: u32, changed_every: Option<u32>) -> Vec<DesiredRoute> {
    (0..n)
        .map(|i| {
            let gw = match changed_every {
                Some(k) if i % k == 0 => "192.168.92.130",
                _ => "192.168.92.129",
            };
            DesiredRoute {
                prefix: prefix(i),
                kind: RouteKind::BlockDirect,
                gateway: gw.parse().ok(),
                device: Some("ens33".into()),
                onlink: false,
                scope: RouteScope::Universe,
            }
        })
        .collect()
}

fn node_pair(tag: &str) -> (Netns, Netns) {
    let node = Netns::new(tag);
    let peer = Netns::new("peer");
    veth(
        &node,
        "ens33",
        "192.168.92.128/24",
        &peer,
        "ens33",
        "192.168.92.129/24",
    );
    (node, peer)
}

fn ip_batch(ns: &Netns, lines: impl Iterator<Item = String>) -> Duration {
    let path = std::env::temp_dir().join(format!("{}.batch", ns.name));
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}")));
    for l in lines {
        let _ = writeln!(file, "{l}");
    }
    drop(file);
    let path_s = path.to_string_lossy().to_string();
    let start = Instant::now();
    sh("ip", &["-n", &ns.name, "-batch", &path_s]);
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(path);
    elapsed
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    if !can_run("bench dataplane_apply") {
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us without it: stay short.
    let full = std::env::args().any(|a| a == "--bench");
    let n: u32 = std::env::var("PODROUTE_BENCH_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let changed = (n / 100).max(1);
    println!("dataplane_apply: {n} /26 routes, {changed} changed (1%)");

    // Baseline: ip -batch.
    let (base, _base_peer) = node_pair("bb");
    let t_ip = ip_batch(
        &base,
        (0..n).map(|i| {
            format!(
                "route add {} via 192.168.92.129 dev ens33 proto {PROTO}",
                prefix(i)
            )
        }),
    );
    let t_ip_change = ip_batch(
        &base,
        (0..n).step_by(100).map(|i| {
            format!(
                "route replace {} via 192.168.92.130 dev ens33 proto {PROTO}",
                prefix(i)
            )
        }),
    );
    drop(base);

    // podroute.
    let (node, _peer) = node_pair("bp");
    let mut dp = node
        .run(|| Dataplane::open(DataplaneConfig::default()))
        .unwrap_or_else(|e| panic!("open dataplane: {e}"));
    let routes = desired(n, None);
    dp.set_desired(&routes);
    let start = Instant::now();
    let report = dp.reconcile();
    let t_pr = start.elapsed();
    assert_eq!((report.added, report.failed), (n as usize, 0), "{report:?}");
    let sends = dp.status().counters.netlink_sends;
    let routes_changed = desired(n, Some(100));
    dp.set_desired(&routes_changed);
    let start = Instant::now();
    let report = dp.reconcile();
    let t_pr_change = start.elapsed();
    assert_eq!(
        (report.replaced, report.failed),
        (changed as usize, 0),
        "{report:?}"
    );
    let installed = node.routes(PROTO).len();
    assert_eq!(installed, n as usize);

    println!(
        "  ip -batch install : {:>8.1} ms  {:>9.0} routes/s",
        t_ip.as_secs_f64() * 1e3,
        rate(n as usize, t_ip)
    );
    println!(
        "  podroute install  : {:>8.1} ms  {:>9.0} routes/s  ({sends} sendto calls)  ratio {:.2}x",
        t_pr.as_secs_f64() * 1e3,
        rate(n as usize, t_pr),
        t_ip.as_secs_f64() / t_pr.as_secs_f64()
    );
    println!(
        "  ip -batch 1% change: {:>7.1} ms  {:>9.0} routes/s",
        t_ip_change.as_secs_f64() * 1e3,
        rate(changed as usize, t_ip_change)
    );
    println!(
        "  podroute 1% change : {:>7.1} ms  {:>9.0} routes/s (incl. diff of {n})  ratio {:.2}x",
        t_pr_change.as_secs_f64() * 1e3,
        rate(changed as usize, t_pr_change),
        t_ip_change.as_secs_f64() / t_pr_change.as_secs_f64()
    );

    // Drift repair latency.
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    let _ = plan_tx.send(PlanMessage {
        seq: 1,
        update: PlanUpdate::Full(routes_changed),
    });
    let (status_tx, status_rx) = watch::channel(DataplaneStatus::default());
    let driver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        rt.map(|rt| rt.block_on(dp.run(plan_rx, status_tx)))
    });
    let (mut sock, mut mon) = node.run(|| (RequestSocket::open(16), MonitorSocket::open()));
    let (Ok(sock), Ok(mon)) = (sock.as_mut(), mon.as_mut()) else {
        panic!("netlink sockets");
    };
    // Let the task start and settle.
    std::thread::sleep(Duration::from_millis(200));
    let samples = if full { 200 } else { 20 };
    let mut latencies = Vec::with_capacity(samples);
    let mut events = Vec::new();
    for s in 0..samples {
        let dst = prefix((s as u32 * 7919) % n);
        let gw = "192.168.92.129".parse().ok();
        let victim = KernelRoute::wanted(dst, PROTO, false, false, gw, None, false);
        let _ = mon.drain(&mut events);
        events.clear();
        let start = Instant::now();
        let result = sock.execute(vec![Change::Delete(victim).request()]);
        assert!(result.iter().all(Result::is_ok), "{result:?}");
        loop {
            let _ = mon.drain(&mut events);
            if events.iter().any(|e| matches!(e, Event::RouteAdded { route, .. } if route.key.dst == dst && route.protocol == PROTO)) {
                latencies.push(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "route {dst} not repaired"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        events.clear();
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "  drift repair (delete -> re-added), {} samples: median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  drift repairs counted: {}",
        status_rx.borrow().counters.drift_repairs
    );
    drop(plan_tx);
    let _ = driver.join();
}
