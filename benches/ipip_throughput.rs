//! Userspace IPIP tunnel and kernel VXLAN vs the direct routed path, in fresh network
//! namespaces (root).
//!
//! `cargo bench --bench ipip_throughput` (env `PODROUTE_BENCH_SECS`, default 2 s per run;
//! `PODROUTE_BENCH_RUNS`, default 3; `PODROUTE_BENCH_ECHOES`, default 5000;
//! `PODROUTE_BENCH_ONLY=text`: only the tunnel cases whose name contains it).
//!
//! Two nodes share one veth link (192.168.92.128/.129). Each node has two pods: one whose
//! block is routed directly (`BLOCK via NODE dev ens33`) and one whose block goes through the
//! userspace `tunl0` (`BLOCK via NODE dev tunl0 onlink`), and a third pod whose block goes
//! through the kernel's `vxlan.calico` made by podroute's VXLAN dataplane
//! (`BLOCK via VTEP dev vxlan.calico onlink`, permanent neighbour and FDB entries). Measured
//! for each path, over the same link in the same run:
//! - TCP throughput, pod to pod: one std `TcpStream`, 256 KiB writes for the run time;
//!   median of the runs in Gbit/s;
//! - UDP echo round trip, pod to pod, 32-byte datagrams one at a time: median and p99.
//!
//! The tunnel is measured with both forwarder drivers (threads, tokio; each node with its own
//! runtime), with and without TUN offloads. Addresses are used only inside the namespaces
//! created here.

#[path = "../tests/netns/mod.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netns::{Netns, can_run, pod, veth};
use podroute::dataplane::ipip_user::{
    ForwarderConfig, ForwarderDriver, IpipCounters, IpipForwarder, TunnelTable, UserspaceIpip,
    spawn,
};
use podroute::dataplane::socket::RequestSocket;
use podroute::dataplane::tunnel::{TunnelDevice, TunnelSpec};
use podroute::dataplane::vxlan::VxlanTunnels;
use podroute::plan::tunnels::{
    CALICO_VXLAN_PORT, CALICO_VXLAN_VNI, VxlanDevice, VxlanPeer, default_vtep_mac,
};
use tokio::sync::watch;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One node of the bench: address, tunnel address, the tunnelled block and its pod, the
/// directly routed block and its pod.
struct NodeSpec {
    tag: &'static str,
    addr: &'static str,
    tunnel_addr: &'static str,
    tunnel_block: &'static str,
    tunnel_pod: &'static str,
    direct_block: &'static str,
    direct_pod: &'static str,
    /// The VXLAN block (its first address is the node's VTEP) and its pod.
    vxlan_block: &'static str,
    vxlan_vtep: &'static str,
    vxlan_pod: &'static str,
}

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        tag: "ba",
        addr: "192.168.92.128",
        tunnel_addr: "172.16.241.64",
        tunnel_block: "172.16.241.64/26",
        tunnel_pod: "172.16.241.65",
        direct_block: "172.16.10.0/26",
        direct_pod: "172.16.10.1",
        vxlan_block: "172.16.30.0/26",
        vxlan_vtep: "172.16.30.0",
        vxlan_pod: "172.16.30.1",
    },
    NodeSpec {
        tag: "bb",
        addr: "192.168.92.129",
        tunnel_addr: "172.16.196.128",
        tunnel_block: "172.16.196.128/26",
        tunnel_pod: "172.16.196.129",
        direct_block: "172.16.20.0/26",
        direct_pod: "172.16.20.1",
        vxlan_block: "172.16.40.0/26",
        vxlan_vtep: "172.16.40.0",
        vxlan_pod: "172.16.40.1",
    },
];

/// A node: namespace, address, and its two pods (namespace, address).
struct Node {
    ns: Netns,
    addr: Ipv4Addr,
    tunnel_pod: (Netns, Ipv4Addr),
    direct_pod: (Netns, Ipv4Addr),
    vxlan_pod: (Netns, Ipv4Addr),
}

/// A pod behind `iface` on `node`, with a permanent neighbour entry for its gateway
/// 169.254.1.1 (the node has no default route, so proxy ARP would not answer).
fn pod_with_neighbour(node: &Netns, iface: &str, addr: &str) -> Netns {
    let p = pod(node, iface, addr);
    let link = node.ip(&["-o", "link", "show", "dev", iface]);
    let mac = link
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("mac of the cali veth")
        .to_string();
    p.ip(&[
        "neigh",
        "replace",
        "169.254.1.1",
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    p
}

fn setup() -> Vec<Node> {
    let a = Netns::new(NODES[0].tag);
    let b = Netns::new(NODES[1].tag);
    veth(
        &a,
        "ens33",
        &format!("{}/24", NODES[0].addr),
        &b,
        "ens33",
        &format!("{}/24", NODES[1].addr),
    );
    let mut nodes = Vec::new();
    for (i, ns) in [a, b].into_iter().enumerate() {
        let n = &NODES[i];
        ns.sysctl("net.ipv4.ip_forward=1");
        let spec = TunnelSpec {
            name: "tunl0".into(),
            nic: "ens33".into(),
            address: Some(n.tunnel_addr.parse().unwrap()),
        };
        ns.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async { UserspaceIpip::connect()?.ensure(&spec).await })
        })
        .expect("userspace tunl0");
        let (tdev, ddev, vdev) = (
            format!("calit{i}"),
            format!("calid{i}"),
            format!("caliv{i}"),
        );
        let tp = pod_with_neighbour(&ns, &tdev, n.tunnel_pod);
        let dp = pod_with_neighbour(&ns, &ddev, n.direct_pod);
        let vp = pod_with_neighbour(&ns, &vdev, n.vxlan_pod);
        ns.ip(&["route", "add", n.tunnel_pod, "dev", &tdev, "scope", "link"]);
        ns.ip(&["route", "add", n.direct_pod, "dev", &ddev, "scope", "link"]);
        ns.ip(&["route", "add", n.vxlan_pod, "dev", &vdev, "scope", "link"]);
        // vxlan.calico and the peer's VTEP entries, by podroute's VXLAN dataplane.
        let o = &NODES[1 - i];
        let device = VxlanDevice {
            name: "vxlan.calico".into(),
            vni: CALICO_VXLAN_VNI,
            port: CALICO_VXLAN_PORT,
            mac: default_vtep_mac(n.tag, true),
            local: n.addr.parse().unwrap(),
            parent: "ens33".into(),
            mtu: None,
            address: Some(format!("{}/32", n.vxlan_vtep).parse().unwrap()),
        };
        let peer = VxlanPeer {
            device: "vxlan.calico".into(),
            node: o.tag.into(),
            tunnel_ip: o.vxlan_vtep.parse().unwrap(),
            mac: default_vtep_mac(o.tag, true),
            underlay: o.addr.parse().unwrap(),
        };
        let status = ns.run(move || {
            let mut sock = RequestSocket::open(64).expect("netlink socket");
            let mut vx = VxlanTunnels::new(157, Duration::from_millis(50), Duration::from_secs(1));
            vx.set_plan(vec![device], vec![peer]);
            vx.reconcile(&mut sock, |_| true);
            vx.status().clone()
        });
        assert!(status.failures.is_empty(), "VXLAN: {:?}", status.failures);
        nodes.push(Node {
            ns,
            addr: n.addr.parse().unwrap(),
            tunnel_pod: (tp, n.tunnel_pod.parse().unwrap()),
            direct_pod: (dp, n.direct_pod.parse().unwrap()),
            vxlan_pod: (vp, n.vxlan_pod.parse().unwrap()),
        });
    }
    // Remote blocks: the tunnelled one via tunl0 onlink, the direct one via ens33.
    for (me, other) in [(0, 1), (1, 0)] {
        let o = &NODES[other];
        let ns = &nodes[me].ns;
        ns.ip(&[
            "route",
            "add",
            o.tunnel_block,
            "via",
            o.addr,
            "dev",
            "tunl0",
            "onlink",
        ]);
        ns.ip(&[
            "route",
            "add",
            o.direct_block,
            "via",
            o.addr,
            "dev",
            "ens33",
        ]);
        ns.ip(&[
            "route",
            "add",
            o.vxlan_block,
            "via",
            o.vxlan_vtep,
            "dev",
            "vxlan.calico",
            "onlink",
        ]);
    }
    nodes
}

/// Starts the forwarder of node `me` (its table: the peer's tunnelled block); tokio tasks
/// run on `rt`, the node's own runtime (as the node's agent would).
fn start_forwarder(
    nodes: &[Node],
    me: usize,
    driver: ForwarderDriver,
    offload: bool,
    rt: &tokio::runtime::Runtime,
) -> IpipForwarder {
    let peer = 1 - me;
    let table = TunnelTable::new(
        [(NODES[peer].tunnel_block.parse().unwrap(), nodes[peer].addr)],
        [],
        ["172.16.0.0/16".parse().unwrap()],
    );
    let (_tx, rx) = watch::channel(Arc::new(table));
    let config = ForwarderConfig {
        driver,
        offload,
        ..ForwarderConfig::new(nodes[me].addr)
    };
    let handle = rt.handle().clone();
    nodes[me]
        .ns
        .run(move || {
            let _guard = handle.enter();
            spawn(config, rx, Arc::new(IpipCounters::new()))
        })
        .expect("spawn forwarder")
}

/// Bytes per second of one TCP stream from `from` to `to` over `secs`.
fn tcp_throughput(from: &Netns, to: &Netns, to_addr: Ipv4Addr, secs: Duration, port: u16) -> f64 {
    let listener = to.run(move || TcpListener::bind((to_addr, port)).unwrap());
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        (got, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    let mut stream = from.run(move || {
        TcpStream::connect_timeout(&SocketAddr::from((to_addr, port)), Duration::from_secs(5))
            .unwrap()
    });
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    while start.elapsed() < secs {
        stream.write_all(&chunk).unwrap();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, took) = receiver.join().unwrap();
    got as f64 / took.as_secs_f64()
}

/// Round-trip times of `count` UDP echoes from `from` to `to`.
fn udp_echo(
    from: &Netns,
    from_addr: Ipv4Addr,
    to: &Netns,
    to_addr: Ipv4Addr,
    count: usize,
) -> Vec<Duration> {
    let server = to.run(move || UdpSocket::bind((to_addr, 7007)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = server.recv_from(&mut buf) {
            if &buf[..n] == b"stop" {
                break;
            }
            let _ = server.send_to(&buf[..n], peer);
        }
    });
    let client = from.run(move || UdpSocket::bind((from_addr, 0)).unwrap());
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let msg = [0x42u8; 32];
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(count);
    // Warm up (neighbour entries, caches).
    for _ in 0..20 {
        let _ = client.send_to(&msg, (to_addr, 7007));
        let _ = client.recv_from(&mut buf);
    }
    for _ in 0..count {
        let t = Instant::now();
        client.send_to(&msg, (to_addr, 7007)).unwrap();
        if client.recv_from(&mut buf).is_ok() {
            rtts.push(t.elapsed());
        }
    }
    let _ = client.send_to(b"stop", (to_addr, 7007));
    let _ = echo.join();
    rtts.sort();
    rtts
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

struct Measured {
    name: &'static str,
    gbits: f64,
    runs: Vec<f64>,
    rtt_median: Duration,
    rtt_p99: Duration,
    echoes: usize,
}

/// Which pods a measurement uses.
#[derive(Clone, Copy)]
enum PathKind {
    Direct,
    Ipip,
    Vxlan,
}

fn measure(
    name: &'static str,
    nodes: &[Node],
    path: PathKind,
    secs: Duration,
    runs: usize,
    echoes: usize,
    port: u16,
) -> Measured {
    fn pick(n: &Node, path: PathKind) -> &(Netns, Ipv4Addr) {
        match path {
            PathKind::Direct => &n.direct_pod,
            PathKind::Ipip => &n.tunnel_pod,
            PathKind::Vxlan => &n.vxlan_pod,
        }
    }
    let (pick_from, pick_to) = (pick(&nodes[0], path), pick(&nodes[1], path));
    let mut gbits: Vec<f64> = (0..runs)
        .map(|r| {
            tcp_throughput(&pick_from.0, &pick_to.0, pick_to.1, secs, port + r as u16) * 8.0 / 1e9
        })
        .collect();
    let runs_v = gbits.clone();
    let rtts = udp_echo(&pick_from.0, pick_from.1, &pick_to.0, pick_to.1, echoes);
    Measured {
        name,
        gbits: median(&mut gbits),
        runs: runs_v,
        rtt_median: pct(&rtts, 0.5),
        rtt_p99: pct(&rtts, 0.99),
        echoes: rtts.len(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it too: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !can_run("ipip_throughput") {
        return;
    }
    let secs = Duration::from_secs(env_or("PODROUTE_BENCH_SECS", 2));
    let runs = env_or("PODROUTE_BENCH_RUNS", 3).max(1) as usize;
    let echoes = env_or("PODROUTE_BENCH_ECHOES", 5000) as usize;
    // One runtime per node, two workers each (an agent on a two-core node).
    let runtimes: Vec<tokio::runtime::Runtime> = (0..2)
        .map(|_| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        })
        .collect();
    let nodes = setup();
    println!(
        "ipip_throughput: {runs} runs x {secs:?} TCP (median), {echoes} UDP echoes; {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut results = vec![measure(
        "direct (routed via ens33)",
        &nodes,
        PathKind::Direct,
        secs,
        runs,
        echoes,
        6000,
    )];
    let only =
        |name: &str| std::env::var("PODROUTE_BENCH_ONLY").map_or(true, |only| name.contains(&only));
    if only("vxlan.calico (kernel)") {
        results.push(measure(
            "vxlan.calico (kernel)",
            &nodes,
            PathKind::Vxlan,
            secs,
            runs,
            echoes,
            6500,
        ));
    }
    for (name, driver, offload, port) in [
        (
            "tunl0 threads+offload",
            ForwarderDriver::Threads,
            true,
            6100,
        ),
        ("tunl0 tokio+offload", ForwarderDriver::Tokio, true, 6200),
        (
            "tunl0 threads, no offload",
            ForwarderDriver::Threads,
            false,
            6300,
        ),
        (
            "tunl0 tokio, no offload",
            ForwarderDriver::Tokio,
            false,
            6400,
        ),
    ] {
        if !only(name) {
            continue;
        }
        let f: Vec<IpipForwarder> = (0..2)
            .map(|me| start_forwarder(&nodes, me, driver, offload, &runtimes[me]))
            .collect();
        results.push(measure(
            name,
            &nodes,
            PathKind::Ipip,
            secs,
            runs,
            echoes,
            port,
        ));
        for f in f {
            f.shutdown_blocking();
        }
    }

    let direct = &results[0];
    println!(
        "{:<28} {:>10} {:>26} {:>12} {:>12} {:>10}",
        "path", "TCP Gbit/s", "runs", "RTT median", "RTT p99", "ratio"
    );
    for r in &results {
        let runs = r
            .runs
            .iter()
            .map(|g| format!("{g:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<28} {:>10.2} {:>26} {:>10.1}us {:>10.1}us {:>9.1}%",
            r.name,
            r.gbits,
            runs,
            r.rtt_median.as_secs_f64() * 1e6,
            r.rtt_p99.as_secs_f64() * 1e6,
            r.gbits / direct.gbits * 100.0
        );
        assert!(r.echoes > 0, "{}: no UDP echo came back", r.name);
    }
    for r in &results[1..] {
        println!(
            "{}: throughput {:.1}% of direct; added latency median {:+.1}us, p99 {:+.1}us",
            r.name,
            r.gbits / direct.gbits * 100.0,
            (r.rtt_median.as_secs_f64() - direct.rtt_median.as_secs_f64()) * 1e6,
            (r.rtt_p99.as_secs_f64() - direct.rtt_p99.as_secs_f64()) * 1e6,
        );
    }
}
