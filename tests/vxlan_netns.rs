//! VXLAN dataplane tests in network namespaces (root; the kernel's `vxlan` module): the
//! devices, permanent neighbour and FDB entries and onlink routes of Calico's `vxlanMode`,
//! made by the dataplane from the plan, carrying pod traffic between namespaces.
//!
//! Three nodes on two subnets: node-a and node-b share 192.168.92.0/24 (a bridge), node-c is
//! on 192.168.93.0/24 behind a router namespace. Every address lives only inside namespaces
//! these tests create; packets are sent only between them.

mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Netns, can_ping, can_run, pod, veth};
use podroute::dataplane::{Dataplane, DataplaneConfig, DataplaneStatus, PlanMessage, PlanUpdate};
use podroute::plan::tunnels::{TunnelPlan, Vtep, default_vtep_mac, vxlan_plan};
use podroute::plan::{
    Allocation, BlockSpec, DesiredRoute, EncapMode, LocalNode, PeerNode, PlanInput, PoolSpec,
    RouteKind, plan, workload_interface_name,
};
use tokio::sync::{mpsc, watch};

const PROTO: u8 = podroute::dataplane::DEFAULT_ROUTE_PROTOCOL;

struct NodeSpec {
    name: &'static str,
    addr: &'static str,
    block: &'static str,
    /// The VTEP address: the first of the block, as Calico IPAM hands it out.
    vtep: &'static str,
    pod: &'static str,
    pod_addr: &'static str,
}

const THREE: [NodeSpec; 3] = [
    NodeSpec {
        name: "node-a",
        addr: "192.168.92.10/24",
        block: "172.16.10.0/26",
        vtep: "172.16.10.0",
        pod: "a1",
        pod_addr: "172.16.10.1",
    },
    NodeSpec {
        name: "node-b",
        addr: "192.168.92.11/24",
        block: "172.16.20.64/26",
        vtep: "172.16.20.64",
        pod: "b1",
        pod_addr: "172.16.20.65",
    },
    NodeSpec {
        name: "node-c",
        addr: "192.168.93.12/24",
        block: "172.16.30.128/26",
        vtep: "172.16.30.128",
        pod: "c1",
        pod_addr: "172.16.30.129",
    },
];

fn node_ip(spec: &NodeSpec) -> Ipv4Addr {
    spec.addr.split('/').next().unwrap().parse().unwrap()
}

fn mac_of(spec: &NodeSpec) -> String {
    default_vtep_mac(spec.name, true).to_string()
}

/// Node `me`'s plan input: a `vxlanMode` pool, every node's block with its pod and VTEP, and
/// no learned route at all (VXLAN routes come from the datastore).
fn input(me: usize, mode: EncapMode) -> PlanInput {
    let local = &THREE[me];
    PlanInput {
        local: LocalNode {
            name: local.name.into(),
            ipv4: Some(local.addr.parse().unwrap()),
            ipv6: None,
            nic: "ens33".into(),
        },
        pools: vec![PoolSpec {
            name: "default-ipv4-ippool".into(),
            cidr: "172.16.0.0/16".parse().unwrap(),
            ipip: EncapMode::Never,
            vxlan: mode,
            disabled: false,
        }],
        blocks: THREE
            .iter()
            .map(|n| BlockSpec {
                cidr: n.block.parse().unwrap(),
                affinity: Some(n.name.into()),
                allocations: vec![Allocation {
                    ip: n.pod_addr.parse().unwrap(),
                    namespace: Some("seed".into()),
                    pod: Some(n.pod.into()),
                    node: Some(n.name.into()),
                }],
            })
            .collect(),
        learned: vec![],
        nodes: THREE
            .iter()
            .map(|n| PeerNode {
                name: n.name.into(),
                ipv4: Some(node_ip(n)),
                ipv6: None,
            })
            .collect(),
        local_interfaces: [workload_interface_name("seed", local.pod)].into(),
        vteps: THREE
            .iter()
            .map(|n| Vtep {
                node: n.name.into(),
                tunnel_ip: n.vtep.parse().unwrap(),
                mac: default_vtep_mac(n.name, true),
            })
            .collect(),
    }
}

fn tunnel_plan(input: &PlanInput) -> TunnelPlan {
    let (vxlan, vxlan_peers) = vxlan_plan(input);
    TunnelPlan {
        ipip: None,
        vxlan,
        vxlan_peers,
    }
}

fn config() -> DataplaneConfig {
    DataplaneConfig {
        retry_min: Duration::from_millis(50),
        ..DataplaneConfig::default()
    }
}

fn open(ns: &Netns) -> Dataplane {
    ns.run(|| Dataplane::open(config()).expect("open dataplane"))
}

/// A dataplane running ([`Dataplane::run`]) on its own thread, fed plans by the test.
struct Running {
    plans: Option<mpsc::UnboundedSender<PlanMessage>>,
    status: watch::Receiver<DataplaneStatus>,
    driver: Option<std::thread::JoinHandle<Result<(), podroute::dataplane::DataplaneError>>>,
    rt: tokio::runtime::Runtime,
    seq: u64,
}

impl Running {
    fn start(dp: Dataplane) -> Self {
        let (plan_tx, plan_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(DataplaneStatus::default());
        let driver = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(dp.run(plan_rx, status_tx))
        });
        Self {
            plans: Some(plan_tx),
            status: status_rx,
            driver: Some(driver),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            seq: 0,
        }
    }

    fn send(&mut self, update: PlanUpdate) -> DataplaneStatus {
        self.seq += 1;
        let seq = self.seq;
        self.plans
            .as_ref()
            .unwrap()
            .send(PlanMessage { seq, update })
            .unwrap();
        self.wait(&format!("plan {seq} applied"), |s| s.applied >= Some(seq))
    }

    /// The tunnel plan, then the routes (the agent's order).
    fn apply(&mut self, input: &PlanInput) -> DataplaneStatus {
        let p = plan(input);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        self.send(PlanUpdate::Tunnels(tunnel_plan(input)));
        self.send(PlanUpdate::Full(p.routes))
    }

    fn wait(&mut self, what: &str, cond: impl FnMut(&DataplaneStatus) -> bool) -> DataplaneStatus {
        let rx = &mut self.status;
        let found = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), rx.wait_for(cond))
                .await
                .map(|r| r.expect("dataplane running").clone())
        });
        found.unwrap_or_else(|_| panic!("waiting for {what}: {:#?}", *self.status.borrow()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.plans.take();
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
}

/// The pod `seed/NAME` with address `addr` on `node`, behind its cali veth with proxy ARP.
fn seed_pod(node: &Netns, name: &str, addr: &str) -> Netns {
    let iface = workload_interface_name("seed", name);
    let p = pod(node, &iface, addr);
    let mac = link_mac(node, &iface);
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

fn link_mac(ns: &Netns, iface: &str) -> String {
    let link = ns.ip(&["-o", "link", "show", "dev", iface]);
    link.split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string()
}

struct Cluster {
    nodes: Vec<Netns>,
    pods: Vec<Netns>,
    _switch: Netns,
    router: Netns,
}

fn three_nodes() -> Cluster {
    let switch = Netns::new("vxsw");
    let router = Netns::new("vxrt");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let nodes: Vec<Netns> = ["vxa", "vxb", "vxc"]
        .iter()
        .map(|t| Netns::new(t))
        .collect();
    for (i, port) in [(0, "port-a"), (1, "port-b")] {
        veth(&nodes[i], "ens33", THREE[i].addr, &switch, port, "");
        switch.ip(&["link", "set", port, "master", "br0"]);
        nodes[i].ip(&["route", "add", "192.168.93.0/24", "via", "192.168.92.1"]);
    }
    veth(&router, "lan", "192.168.92.1/24", &switch, "port-r", "");
    switch.ip(&["link", "set", "port-r", "master", "br0"]);
    veth(
        &router,
        "wan",
        "192.168.93.1/24",
        &nodes[2],
        "ens33",
        THREE[2].addr,
    );
    nodes[2].ip(&["route", "add", "192.168.92.0/24", "via", "192.168.93.1"]);
    router.sysctl("net.ipv4.ip_forward=1");
    let mut pods = Vec::new();
    for (node, spec) in nodes.iter().zip(&THREE) {
        node.sysctl("net.ipv4.ip_forward=1");
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        pods.push(seed_pod(node, spec.pod, spec.pod_addr));
    }
    Cluster {
        nodes,
        pods,
        _switch: switch,
        router,
    }
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

fn our_routes(ns: &Netns) -> Vec<String> {
    ns.routes(PROTO)
}

fn expected_routes(routes: &[DesiredRoute]) -> Vec<String> {
    sorted(routes.iter().map(ToString::to_string).collect())
}

/// `ip neigh show dev DEV` as `IP MAC STATE` rows.
fn neighbours(ns: &Netns, dev: &str) -> Vec<String> {
    sorted(
        ns.ip(&["neigh", "show", "dev", dev])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let mac = f
                    .iter()
                    .position(|w| *w == "lladdr")
                    .and_then(|i| f.get(i + 1))
                    .copied()
                    .unwrap_or("-");
                let state = f
                    .iter()
                    .find(|w| w.chars().all(|c| c.is_ascii_uppercase()))
                    .unwrap_or(&"-");
                format!("{} {} {}", f[0], mac, state)
            })
            .collect(),
    )
}

/// `bridge fdb show dev DEV` rows (without the device's own entries).
fn fdb(ns: &Netns, dev: &str) -> Vec<String> {
    let (ok, out) = ns.exec("bridge", &["fdb", "show", "dev", dev]);
    assert!(ok, "bridge fdb: {out}");
    sorted(
        out.lines()
            .map(str::trim)
            .filter(|l| l.contains(" dst "))
            .map(String::from)
            .collect(),
    )
}

/// What the plan says node `me`'s neighbour and FDB tables hold.
fn planned_tables(me: usize) -> (Vec<String>, Vec<String>) {
    let (_, peers) = vxlan_plan(&input(me, EncapMode::Always));
    let neigh = sorted(
        peers
            .iter()
            .map(|p| format!("{} {} PERMANENT", p.tunnel_ip, p.mac))
            .collect(),
    );
    let fdb = sorted(
        peers
            .iter()
            .map(|p| format!("{} dst {} self permanent", p.mac, p.underlay))
            .collect(),
    );
    (neigh, fdb)
}

fn assert_pings(from: &Netns, to: &str) {
    let (ok, out) = from.ping(to);
    assert!(
        ok && out.contains("3 packets transmitted, 3 received"),
        "ping {to} from namespace {} failed:\n{out}",
        from.name
    );
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// Sends `total` bytes over TCP from the pod `from` to `to_addr` (a pod in `to`), checking
/// every byte; returns the elapsed time.
fn tcp_transfer(from: &Netns, to: &Netns, to_addr: &str, port: u16, total: usize) -> Duration {
    let to_ip: IpAddr = to_addr.parse().unwrap();
    let listener = to.run(move || TcpListener::bind((to_ip, port)).unwrap());
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + k), "byte {} corrupted", got + k);
            }
            got += n;
        }
        got
    });
    let start = Instant::now();
    let mut stream = from.run(move || {
        TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), Duration::from_secs(5))
            .expect("connect across the VXLAN tunnel")
    });
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data: Vec<u8> = (0..total).map(pattern).collect();
    for part in data.chunks(64 * 1024) {
        stream.write_all(part).expect("write");
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(receiver.join().expect("receiver"), total);
    start.elapsed()
}

/// A `tcpdump -w` of UDP port 4789 inside a namespace.
struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(ns: &Netns, iface: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vxlan.pcap");
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "tcpdump", "-Z", "root", "-n", "-U", "-i",
            ])
            .arg(iface)
            .arg("-w")
            .arg(&file)
            .args(["udp", "port", "4789"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (tests/run.sh installs it)");
        let mut line = String::new();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        err.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
        });
        Self {
            child,
            file,
            _dir: dir,
        }
    }

    fn stop(&mut self) -> &Path {
        // SAFETY: signals the tcpdump process this test started (its own pid).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        &self.file
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One VXLAN packet of a capture: outer addresses and port, VNI, inner IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VxlanPacket {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    dst_port: u16,
    vni: u32,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
}

fn read_pcap(path: &Path) -> Vec<VxlanPacket> {
    let data = std::fs::read(path).unwrap();
    assert!(data.len() >= 24, "pcap too short");
    let link = u32::from_le_bytes(data[20..24].try_into().unwrap());
    assert_eq!(link, 1, "expected Ethernet captures");
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into().unwrap()) as usize;
        let frame = &data[off + 16..(off + 16 + incl).min(data.len())];
        off += 16 + incl;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 + 8 + 14 + 20 {
            continue;
        }
        let udp = &ip[ihl..];
        let vxlan = &udp[8..];
        let inner_eth = &vxlan[8..];
        if inner_eth[12..14] != [0x08, 0x00] || vxlan[0] & 0x08 == 0 {
            continue;
        }
        let inner = &inner_eth[14..];
        out.push(VxlanPacket {
            outer_src: addr(&ip[12..16]),
            outer_dst: addr(&ip[16..20]),
            dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            vni: u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
            inner_src: addr(&inner[12..16]),
            inner_dst: addr(&inner[16..20]),
        });
    }
    out
}

fn tcpdump_text(path: &Path) -> String {
    let out = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vxlan_three_nodes_always_then_cross_subnet_with_traffic_capture_and_drift_repair() {
    const TEST: &str =
        "vxlan_three_nodes_always_then_cross_subnet_with_traffic_capture_and_drift_repair";
    if !can_run(TEST) || !can_ping(TEST) {
        return;
    }
    let c = three_nodes();
    let mut running: Vec<Running> = c.nodes.iter().map(|n| Running::start(open(n))).collect();
    for (i, r) in running.iter_mut().enumerate() {
        let status = r.apply(&input(i, EncapMode::Always));
        assert!(status.failures.is_empty(), "{:?}", status.failures);
        assert!(
            status.vxlan.failures.is_empty(),
            "{:?}",
            status.vxlan.failures
        );
        assert_eq!(status.vxlan.vteps, 2);
        assert_eq!(
            (
                status.vxlan.neighbours_programmed,
                status.vxlan.fdb_programmed
            ),
            (2, 2)
        );
        assert_eq!(status.programmed_by_kind[RouteKind::BlockVxlan.index()], 2);
    }
    let cali = |i: usize| workload_interface_name("seed", THREE[i].pod);
    // node-a's table, written out by hand.
    assert_eq!(
        our_routes(&c.nodes[0]),
        sorted(vec![
            "blackhole 172.16.10.0/26".into(),
            format!("172.16.10.1 dev {} scope link", cali(0)),
            "172.16.20.64/26 via 172.16.20.64 dev vxlan.calico onlink".into(),
            "172.16.30.128/26 via 172.16.30.128 dev vxlan.calico onlink".into(),
        ])
    );
    for (i, node) in c.nodes.iter().enumerate() {
        // `ip -d link`: the device as Felix makes it.
        let link = node.ip(&["-d", "link", "show", "dev", "vxlan.calico"]);
        for want in [
            "mtu 1450".to_string(),
            "state UNKNOWN".to_string(),
            format!("link/ether {}", mac_of(&THREE[i])),
            "vxlan id 4096".to_string(),
            format!("local {}", node_ip(&THREE[i])),
            "dev ens33".to_string(),
            "dstport 4789".to_string(),
            "nolearning".to_string(),
        ] {
            assert!(
                link.contains(&want),
                "{}: no {want:?} in\n{link}",
                THREE[i].name
            );
        }
        let addr = node.ip(&["-4", "-o", "addr", "show", "dev", "vxlan.calico"]);
        assert!(
            addr.contains(&format!("inet {}/32", THREE[i].vtep)),
            "{addr}"
        );
        let (neigh, fdb_rows) = planned_tables(i);
        assert_eq!(
            neighbours(node, "vxlan.calico"),
            neigh,
            "ip neigh of {}",
            THREE[i].name
        );
        assert_eq!(
            fdb(node, "vxlan.calico"),
            fdb_rows,
            "bridge fdb of {}",
            THREE[i].name
        );
        assert_eq!(
            our_routes(node),
            expected_routes(&plan(&input(i, EncapMode::Always)).routes)
        );
    }
    let proto = c.nodes[0].ip(&["neigh", "show", "dev", "vxlan.calico", "proto", "157"]);
    assert_eq!(
        proto.lines().count(),
        2,
        "our neighbour entries carry proto 157:\n{proto}"
    );

    // Pod to pod, same subnet and across the router; a capture on the router shows VXLAN.
    let mut cap = Capture::start(&c.router, "wan");
    assert_pings(&c.pods[0], THREE[2].pod_addr);
    assert_pings(&c.pods[2], THREE[1].pod_addr);
    assert_pings(&c.pods[0], THREE[1].pod_addr);
    let elapsed = tcp_transfer(&c.pods[0], &c.pods[2], THREE[2].pod_addr, 5301, 4 << 20);
    eprintln!("4 MiB pod a -> pod c through vxlan.calico across the router in {elapsed:?}");
    let path = cap.stop().to_path_buf();
    let packets = read_pcap(&path);
    let text = tcpdump_text(&path);
    assert!(
        !packets.is_empty(),
        "no VXLAN packet on the router:\n{text}"
    );
    assert!(
        packets.iter().all(|p| p.dst_port == 4789 && p.vni == 4096),
        "{packets:?}"
    );
    let a_to_c = VxlanPacket {
        outer_src: node_ip(&THREE[0]),
        outer_dst: node_ip(&THREE[2]),
        dst_port: 4789,
        vni: 4096,
        inner_src: THREE[0].pod_addr.parse().unwrap(),
        inner_dst: THREE[2].pod_addr.parse().unwrap(),
    };
    assert!(packets.contains(&a_to_c), "{packets:#?}\n{text}");
    assert!(
        packets.iter().any(|p| p.outer_src == node_ip(&THREE[2])
            && p.inner_src == THREE[2].pod_addr.parse::<Ipv4Addr>().unwrap()
            && p.inner_dst == THREE[1].pod_addr.parse::<Ipv4Addr>().unwrap()),
        "c -> b: {packets:#?}"
    );
    assert!(text.contains("VXLAN") || text.contains("4789"), "{text}");

    // Drift on node-a: a deleted FDB entry, neighbour entry, and the device itself return.
    let a = &c.nodes[0];
    let (neigh_a, fdb_a) = planned_tables(0);
    let c_mac = mac_of(&THREE[2]);
    a.exec(
        "bridge",
        &[
            "fdb",
            "del",
            &c_mac,
            "dev",
            "vxlan.calico",
            "dst",
            "192.168.93.12",
        ],
    );
    wait_until("FDB entry restored", Duration::from_secs(10), || {
        fdb(a, "vxlan.calico") == fdb_a
    });
    a.ip(&["neigh", "del", THREE[2].vtep, "dev", "vxlan.calico"]);
    wait_until("neighbour restored", Duration::from_secs(10), || {
        neighbours(a, "vxlan.calico") == neigh_a
    });
    let routes_a = expected_routes(&plan(&input(0, EncapMode::Always)).routes);
    a.ip(&["link", "del", "vxlan.calico"]);
    wait_until(
        "device, entries and routes restored",
        Duration::from_secs(15),
        || {
            our_routes(a) == routes_a
                && neighbours(a, "vxlan.calico") == neigh_a
                && fdb(a, "vxlan.calico") == fdb_a
        },
    );
    assert_pings(&c.pods[0], THREE[2].pod_addr);
    let status = running[0].wait("drift counted", |s| s.vxlan.counters.devices_created >= 2);
    assert!(status.counters.drift_repairs >= 3, "{:?}", status.counters);

    // vxlanMode CrossSubnet: node-a <-> node-b directly out of ens33 (the same prefixes,
    // replaced in place), node-c still through VXLAN.
    for (i, r) in running.iter_mut().enumerate() {
        let status = r.apply(&input(i, EncapMode::CrossSubnet));
        assert!(status.failures.is_empty(), "{:?}", status.failures);
    }
    assert_eq!(
        our_routes(&c.nodes[0]),
        sorted(vec![
            "blackhole 172.16.10.0/26".into(),
            format!("172.16.10.1 dev {} scope link", cali(0)),
            "172.16.20.64/26 via 192.168.92.11 dev ens33".into(),
            "172.16.30.128/26 via 172.16.30.128 dev vxlan.calico onlink".into(),
        ])
    );
    let mut cap = Capture::start(&c.router, "lan");
    assert_pings(&c.pods[0], THREE[1].pod_addr);
    assert_pings(&c.pods[1], THREE[2].pod_addr);
    tcp_transfer(&c.pods[1], &c.pods[0], THREE[0].pod_addr, 5302, 1 << 20);
    let path = cap.stop().to_path_buf();
    let packets = read_pcap(&path);
    assert!(
        packets.iter().any(
            |p| p.inner_src == THREE[1].pod_addr.parse::<Ipv4Addr>().unwrap()
                && p.inner_dst == THREE[2].pod_addr.parse::<Ipv4Addr>().unwrap()
        ),
        "b -> c still VXLAN: {packets:#?}"
    );
    // The a <-> b traffic does not cross the router at all (and is not VXLAN).
    assert!(
        !packets.iter().any(
            |p| p.inner_dst == THREE[0].pod_addr.parse::<Ipv4Addr>().unwrap()
                && p.inner_src == THREE[1].pod_addr.parse::<Ipv4Addr>().unwrap()
        ),
        "{packets:#?}"
    );
}

#[test]
fn vxlan_device_of_the_wrong_shape_is_recreated_and_a_foreign_one_left_alone() {
    const TEST: &str = "vxlan_device_of_the_wrong_shape_is_recreated_and_a_foreign_one_left_alone";
    if !can_run(TEST) {
        return;
    }
    let node = Netns::new("vxshape");
    let peer = Netns::new("vxshapep");
    veth(&node, "ens33", THREE[0].addr, &peer, "ens33", THREE[1].addr);
    // A VXLAN device of that name with flannel's VNI and port: recreated as planned.
    node.ip(&[
        "link",
        "add",
        "vxlan.calico",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "ens33",
    ]);
    let mut two = input(0, EncapMode::Always);
    two.blocks.truncate(2);
    two.vteps.truncate(2);
    two.nodes.truncate(2);
    let mut r = Running::start(open(&node));
    let status = r.apply(&two);
    assert!(
        status.vxlan.failures.is_empty(),
        "{:?}",
        status.vxlan.failures
    );
    let link = node.ip(&["-d", "link", "show", "dev", "vxlan.calico"]);
    assert!(
        link.contains("vxlan id 4096") && link.contains("dstport 4789"),
        "{link}"
    );
    assert_eq!(status.vxlan.counters.devices_recreated, 1);
    drop(r);

    // A bridge named vxlan.calico is someone else's: reported, never deleted.
    node.ip(&["link", "del", "vxlan.calico"]);
    node.ip(&["link", "add", "vxlan.calico", "type", "bridge"]);
    let mut r = Running::start(open(&node));
    r.send(PlanUpdate::Tunnels(tunnel_plan(&two)));
    let status = r.send(PlanUpdate::Full(plan(&two).routes));
    let failure = status.vxlan.failures.join("\n");
    assert!(
        failure.contains("is a bridge device, not vxlan"),
        "{failure}"
    );
    assert!(status.vxlan.devices[0].error.is_some());
    let link = node.ip(&["-d", "link", "show", "dev", "vxlan.calico"]);
    assert!(link.contains("bridge"), "{link}");
    assert_eq!(status.vxlan.neighbours_failed, 1);
    drop(r);

    // Pools without VXLAN: our device goes, with its entries.
    node.ip(&["link", "del", "vxlan.calico"]);
    let mut r = Running::start(open(&node));
    r.apply(&two);
    assert!(node.try_ip(&["link", "show", "vxlan.calico"]).0);
    let mut none = two.clone();
    none.pools[0].vxlan = EncapMode::Never;
    r.send(PlanUpdate::Tunnels(tunnel_plan(&none)));
    r.send(PlanUpdate::Full(plan(&none).routes));
    assert!(
        !node.try_ip(&["link", "show", "vxlan.calico"]).0,
        "device removed"
    );
}

/// IPv6 VXLAN between two nodes: `vxlan-v6.calico`, IPv6 pods.
#[test]
fn vxlan_ipv6_between_two_nodes() {
    const TEST: &str = "vxlan_ipv6_between_two_nodes";
    if !can_run(TEST) || !can_ping(TEST) {
        return;
    }
    let nodes = [Netns::new("vx6a"), Netns::new("vx6b")];
    veth(&nodes[0], "ens33", "", &nodes[1], "ens33", "");
    let spec = [
        (
            "v6-a",
            "fd00:92::10",
            "fd00:10:0:a::/122",
            "fd00:10:0:a::",
            "fd00:10:0:a::1",
            "p6a",
        ),
        (
            "v6-b",
            "fd00:92::11",
            "fd00:10:0:b::/122",
            "fd00:10:0:b::",
            "fd00:10:0:b::1",
            "p6b",
        ),
    ];
    let mut pods = Vec::new();
    for (node, (_, addr, _, _, pod_addr, pod_name)) in nodes.iter().zip(&spec) {
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "ens33",
            "nodad",
        ]);
        node.sysctl("net.ipv6.conf.all.forwarding=1");
        let iface = workload_interface_name("seed", pod_name);
        let p = Netns::new("vx6pod");
        veth(node, &iface, "", &p, "eth0", "");
        p.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{pod_addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let mac = link_mac(node, &iface);
        p.ip(&[
            "-6",
            "neigh",
            "replace",
            "fe80::1",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        p.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ]);
        pods.push(p);
    }
    let input6 = |me: usize| PlanInput {
        local: LocalNode {
            name: spec[me].0.into(),
            ipv4: None,
            ipv6: Some(format!("{}/64", spec[me].1).parse().unwrap()),
            nic: "ens33".into(),
        },
        pools: vec![PoolSpec {
            name: "default-ipv6-ippool".into(),
            cidr: "fd00:10::/48".parse().unwrap(),
            ipip: EncapMode::Never,
            vxlan: EncapMode::Always,
            disabled: false,
        }],
        blocks: spec
            .iter()
            .map(|s| BlockSpec {
                cidr: s.2.parse().unwrap(),
                affinity: Some(s.0.into()),
                allocations: vec![Allocation {
                    ip: s.4.parse().unwrap(),
                    namespace: Some("seed".into()),
                    pod: Some(s.5.into()),
                    node: Some(s.0.into()),
                }],
            })
            .collect(),
        learned: vec![],
        nodes: spec
            .iter()
            .map(|s| PeerNode {
                name: s.0.into(),
                ipv4: None,
                ipv6: Some(s.1.parse().unwrap()),
            })
            .collect(),
        local_interfaces: [workload_interface_name("seed", spec[me].5)].into(),
        vteps: spec
            .iter()
            .map(|s| Vtep {
                node: s.0.into(),
                tunnel_ip: s.3.parse().unwrap(),
                mac: default_vtep_mac(s.0, false),
            })
            .collect(),
    };
    let mut running: Vec<Running> = nodes.iter().map(|n| Running::start(open(n))).collect();
    for (i, r) in running.iter_mut().enumerate() {
        let status = r.apply(&input6(i));
        assert!(status.failures.is_empty(), "{:?}", status.failures);
        assert!(
            status.vxlan.failures.is_empty(),
            "{:?}",
            status.vxlan.failures
        );
    }
    let link = nodes[0].ip(&["-d", "link", "show", "dev", "vxlan-v6.calico"]);
    for want in [
        "mtu 1430",
        "vxlan id 4096",
        "local fd00:92::10",
        "dstport 4789",
        "nolearning",
    ] {
        assert!(link.contains(want), "no {want:?} in\n{link}");
    }
    let routes: Vec<String> = nodes[0]
        .routes(PROTO)
        .into_iter()
        .map(|l| l.replace(" pref medium", ""))
        .collect();
    assert!(
        routes.contains(
            &"fd00:10:0:b::/122 via fd00:10:0:b:: dev vxlan-v6.calico onlink".to_string()
        ),
        "{routes:#?}"
    );
    let neigh = nodes[0].ip(&["-6", "neigh", "show", "dev", "vxlan-v6.calico"]);
    assert!(
        neigh.contains(&format!(
            "fd00:10:0:b:: lladdr {} ",
            default_vtep_mac("v6-b", false)
        )),
        "{neigh}"
    );
    let fdb_rows = fdb(&nodes[0], "vxlan-v6.calico");
    assert_eq!(
        fdb_rows,
        [format!(
            "{} dst fd00:92::11 self permanent",
            default_vtep_mac("v6-b", false)
        )]
    );
    assert_pings(&pods[0], "fd00:10:0:b::1");
    assert_pings(&pods[1], "fd00:10:0:a::1");
    tcp_transfer(&pods[0], &pods[1], "fd00:10:0:b::1", 5303, 1 << 20);
}

/// A node set up by hand with the commands Felix issues, next to a podroute node: pod
/// traffic both ways.
#[test]
fn vxlan_interop_with_a_node_set_up_as_felix_does() {
    const TEST: &str = "vxlan_interop_with_a_node_set_up_as_felix_does";
    if !can_run(TEST) || !can_ping(TEST) {
        return;
    }
    let podroute_node = Netns::new("vxpr");
    let felix = Netns::new("vxfelix");
    veth(
        &podroute_node,
        "ens33",
        THREE[0].addr,
        &felix,
        "eth0",
        THREE[1].addr,
    );
    for n in [&podroute_node, &felix] {
        n.sysctl("net.ipv4.ip_forward=1");
    }
    let pod_a = seed_pod(&podroute_node, THREE[0].pod, THREE[0].pod_addr);
    let pod_b = seed_pod(&felix, THREE[1].pod, THREE[1].pod_addr);
    // Felix's way (felix/dataplane/linux/vxlan_mgr.go, as iproute2 commands).
    let felix_mac = "66:d4:9b:7c:1a:02";
    let sh = |args: &[&str]| felix.ip(args);
    sh(&[
        "link",
        "add",
        "vxlan.calico",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "nolearning",
        "dev",
        "eth0",
        "local",
        "192.168.92.11",
    ]);
    sh(&[
        "link",
        "set",
        "vxlan.calico",
        "address",
        felix_mac,
        "mtu",
        "1450",
        "up",
    ]);
    sh(&["addr", "add", "172.16.20.64/32", "dev", "vxlan.calico"]);
    let a_mac = mac_of(&THREE[0]);
    sh(&[
        "neigh",
        "replace",
        THREE[0].vtep,
        "lladdr",
        &a_mac,
        "dev",
        "vxlan.calico",
        "nud",
        "permanent",
    ]);
    let (ok, out) = felix.exec(
        "bridge",
        &[
            "fdb",
            "append",
            &a_mac,
            "dev",
            "vxlan.calico",
            "dst",
            "192.168.92.10",
        ],
    );
    assert!(ok, "{out}");
    sh(&[
        "route",
        "add",
        THREE[0].block,
        "via",
        THREE[0].vtep,
        "dev",
        "vxlan.calico",
        "onlink",
    ]);
    sh(&[
        "route",
        "add",
        THREE[1].pod_addr,
        "dev",
        &workload_interface_name("seed", THREE[1].pod),
        "scope",
        "link",
    ]);
    // The podroute node, with node-b's VTEP as Felix annotates it.
    let mut me = input(0, EncapMode::Always);
    me.blocks.truncate(2);
    me.nodes.truncate(2);
    me.vteps.truncate(2);
    me.vteps[1].mac = felix_mac.parse().unwrap();
    let mut r = Running::start(open(&podroute_node));
    let status = r.apply(&me);
    assert!(
        status.vxlan.failures.is_empty(),
        "{:?}",
        status.vxlan.failures
    );
    assert_pings(&pod_a, THREE[1].pod_addr);
    assert_pings(&pod_b, THREE[0].pod_addr);
    tcp_transfer(&pod_b, &pod_a, THREE[0].pod_addr, 5304, 1 << 20);
}
