//! Dataplane tests in network namespaces (root): nodes are namespaces joined by veth, pods are
//! namespaces behind `cali*` veths. The kernel here has no `ipip` module, so a TUN device named
//! `tunl0` stands in for the IPIP device wherever onlink tunnel routes are installed.
//!
//! Every address used (192.168.92.x, 172.16.x, 10.x) lives only inside namespaces these tests
//! create; packets are sent only between such namespaces.

mod netns;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netns::{Netns, can_ping, can_run, pod, tun_tunl0, veth};
use podroute::dataplane::tunnel::{KernelIpip, TunnelDevice, TunnelError, TunnelSpec};
use podroute::dataplane::{
    Dataplane, DataplaneConfig, DataplaneStatus, PlanMessage, PlanUpdate, RouteChange, RouteError,
};
use podroute::plan::{
    Allocation, BlockSpec, DesiredRoute, EncapMode, LearnedRoute, LocalNode, PeerNode, PlanInput,
    PoolSpec, RouteKind, RouteScope, plan, workload_interface_name,
};
use tokio::sync::{mpsc, watch};

const PROTO: u8 = podroute::dataplane::DEFAULT_ROUTE_PROTOCOL;

fn config() -> DataplaneConfig {
    DataplaneConfig {
        retry_min: Duration::from_millis(50),
        ..DataplaneConfig::default()
    }
}

fn open(ns: &Netns) -> Dataplane {
    ns.run(|| Dataplane::open(config()).expect("open dataplane"))
}

fn alloc(ip: &str, pod: &str, node: &str) -> Allocation {
    Allocation {
        ip: ip.parse().unwrap(),
        namespace: Some("seed".into()),
        pod: Some(pod.into()),
        node: Some(node.into()),
    }
}

/// Seed 001's cluster as seen from `node`: master01 owns 172.16.241.64/26 with pods .65-.67,
/// node01 owns 172.16.196.128/26 with pods .129 and .131.
fn seed_input(node: &str, mode: EncapMode) -> PlanInput {
    let (addr, learned) = if node == "master01" {
        (
            "192.168.92.128/24",
            LearnedRoute {
                prefix: "172.16.196.128/26".parse().unwrap(),
                next_hop: "192.168.92.129".parse().unwrap(),
            },
        )
    } else {
        (
            "192.168.92.129/24",
            LearnedRoute {
                prefix: "172.16.241.64/26".parse().unwrap(),
                next_hop: "192.168.92.128".parse().unwrap(),
            },
        )
    };
    let blocks = vec![
        BlockSpec {
            cidr: "172.16.241.64/26".parse().unwrap(),
            affinity: Some("master01".into()),
            allocations: (65..=67)
                .map(|i| alloc(&format!("172.16.241.{i}"), &format!("p{i}"), "master01"))
                .collect(),
        },
        BlockSpec {
            cidr: "172.16.196.128/26".parse().unwrap(),
            affinity: Some("node01".into()),
            allocations: vec![
                alloc("172.16.196.129", "p129", "node01"),
                alloc("172.16.196.131", "p131", "node01"),
            ],
        },
    ];
    let local_interfaces = blocks
        .iter()
        .flat_map(|b| &b.allocations)
        .filter(|a| a.node.as_deref() == Some(node))
        .map(|a| workload_interface_name("seed", a.pod.as_deref().unwrap()))
        .collect();
    PlanInput {
        local: LocalNode {
            name: node.into(),
            ipv4: Some(addr.parse().unwrap()),
            ipv6: None,
            nic: "ens33".into(),
        },
        pools: vec![PoolSpec {
            name: "default-ipv4-ippool".into(),
            cidr: "172.16.0.0/16".parse().unwrap(),
            ipip: mode,
            vxlan: EncapMode::Never,
            disabled: false,
        }],
        blocks,
        learned: vec![learned],
        nodes: vec![
            PeerNode {
                name: "master01".into(),
                ipv4: Some("192.168.92.128".parse().unwrap()),
                ipv6: None,
            },
            PeerNode {
                name: "node01".into(),
                ipv4: Some("192.168.92.129".parse().unwrap()),
                ipv6: None,
            },
        ],
        local_interfaces,
        vteps: Vec::new(),
    }
}

/// Two nodes on one subnet, each with its pods (namespaces behind cali veths).
struct Cluster {
    master: Netns,
    node: Netns,
    pods: Vec<(String, Netns)>,
}

fn cluster() -> Cluster {
    let master = Netns::new("m");
    let node = Netns::new("n");
    veth(
        &master,
        "ens33",
        "192.168.92.128/24",
        &node,
        "ens33",
        "192.168.92.129/24",
    );
    let mut pods = Vec::new();
    for (ns, name, addr) in [
        (&master, "p65", "172.16.241.65"),
        (&master, "p66", "172.16.241.66"),
        (&master, "p67", "172.16.241.67"),
        (&node, "p129", "172.16.196.129"),
        (&node, "p131", "172.16.196.131"),
    ] {
        pods.push((addr.to_string(), seed_pod(ns, name, addr)));
    }
    for n in [&master, &node] {
        n.sysctl("net.ipv4.ip_forward=1");
        n.sysctl("net.ipv4.conf.all.rp_filter=0");
    }
    Cluster { master, node, pods }
}

impl Cluster {
    /// The namespace of the pod with address `addr`.
    fn pod(&self, addr: &str) -> &Netns {
        self.pods
            .iter()
            .find(|(a, _)| a == addr)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("no pod {addr}"))
    }
}

/// `ping -c 3 -W 2` from inside the namespace `from` to `to` succeeds with every reply.
fn assert_pings(from: &Netns, to: &str) {
    let (ok, out) = from.ping(to);
    assert!(
        ok && out.contains("3 packets transmitted, 3 received"),
        "ping {to} from namespace {} failed:\n{out}",
        from.name
    );
}

/// The pod `seed/NAME` with address `addr` on `node`, behind its cali veth.
fn seed_pod(node: &Netns, name: &str, addr: &str) -> Netns {
    let iface = workload_interface_name("seed", name);
    let p = pod(node, &iface, addr);
    // The pod reaches its node through 169.254.1.1, answered by proxy ARP on the cali side;
    // a permanent neighbour saves the nodes a default route.
    let link = node.ip(&["-o", "link", "show", "dev", &iface]);
    let mac = link
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
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

fn expected(plan_routes: &[DesiredRoute]) -> Vec<String> {
    let mut lines: Vec<String> = plan_routes.iter().map(ToString::to_string).collect();
    lines.sort();
    lines
}

/// Our routes without the `linkdown` flag a carrier-less TUN adds.
fn our_routes(ns: &Netns) -> Vec<String> {
    ns.routes(PROTO)
        .into_iter()
        .map(|l| l.replace(" linkdown", ""))
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends a UDP datagram from the pod at `from` to the pod at `to` and back.
fn udp_round_trip(c: &Cluster, from: &str, to: &str) -> Result<(), String> {
    let find = |a: &str| c.pod(a);
    let to_addr: IpAddr = to.parse().unwrap();
    let from_addr: IpAddr = from.parse().unwrap();
    let server = find(to).run(move || UdpSocket::bind(SocketAddr::new(to_addr, 7777)).unwrap());
    let client = find(from).run(move || UdpSocket::bind(SocketAddr::new(from_addr, 0)).unwrap());
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        client
            .send_to(b"ping", SocketAddr::new(to_addr, 7777))
            .map_err(|e| e.to_string())?;
        let Ok((n, peer)) = server.recv_from(&mut buf) else {
            continue;
        };
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", peer).map_err(|e| e.to_string())?;
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"pong");
            return Ok(());
        }
    }
    Err(format!("no UDP round trip {from} -> {to}"))
}

/// Two fresh namespaces, `name` (the node, 192.168.92.128/24) and `{name}p` (its peer,
/// .129/24), joined by a veth pair named `ens33` on both sides.
fn node_and_peer(name: &str) -> (Netns, Netns) {
    let node = Netns::new(name);
    let peer = Netns::new(&format!("{name}p"));
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

#[test]
fn seed_table_is_programmed_and_pods_talk_across_nodes() {
    if !can_run("seed_table_is_programmed_and_pods_talk_across_nodes") {
        return;
    }
    let c = cluster();
    let foreign_before = c.master.all_routes();

    // Always: tunnel routes (TUN stand-in for tunl0).
    tun_tunl0(&c.master);
    let always = plan(&seed_input("master01", EncapMode::Always));
    let mut dp = open(&c.master);
    dp.set_desired(&always.routes);
    let report = dp.reconcile();
    assert_eq!(report.failed, 0, "{:?}", dp.status().failures);
    assert_eq!(report.added, always.routes.len());
    assert_eq!(our_routes(&c.master), expected(&always.routes));
    assert!(
        our_routes(&c.master)
            .contains(&"172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink".to_string())
    );

    // CrossSubnet on both nodes: direct routes via ens33, and pods reach each other.
    let cross_m = plan(&seed_input("master01", EncapMode::CrossSubnet));
    dp.set_desired(&cross_m.routes);
    let report = dp.reconcile();
    assert_eq!(
        (report.replaced, report.added, report.deleted, report.failed),
        (1, 0, 0, 0),
        "only the block route changes"
    );
    assert_eq!(our_routes(&c.master), expected(&cross_m.routes));
    let cross_n = plan(&seed_input("node01", EncapMode::CrossSubnet));
    let mut dp_n = open(&c.node);
    dp_n.set_desired(&cross_n.routes);
    assert_eq!(dp_n.reconcile().failed, 0);
    assert_eq!(our_routes(&c.node), expected(&cross_n.routes));
    assert!(
        our_routes(&c.node).contains(&"172.16.241.64/26 via 192.168.92.128 dev ens33".to_string())
    );

    // Real ping (ICMP echo) from inside the source pod's namespace, both directions; the UDP
    // round trip also runs where ping is missing (outside CI) and covers a second protocol.
    if can_ping("seed_table_is_programmed_and_pods_talk_across_nodes") {
        assert_pings(c.pod("172.16.241.65"), "172.16.196.129");
        assert_pings(c.pod("172.16.196.131"), "172.16.241.67");
    }
    udp_round_trip(&c, "172.16.241.65", "172.16.196.129").unwrap();
    udp_round_trip(&c, "172.16.196.131", "172.16.241.67").unwrap();

    // Foreign routes (kernel connected routes) are untouched.
    let foreign_after: Vec<String> = c
        .master
        .all_routes()
        .into_iter()
        .filter(|l| !l.contains(&format!("proto {PROTO}")))
        .collect();
    let tunl0_connected = |l: &String| !l.contains("tunl0");
    assert_eq!(
        foreign_after
            .into_iter()
            .filter(tunl0_connected)
            .collect::<Vec<_>>(),
        foreign_before
            .into_iter()
            .filter(tunl0_connected)
            .collect::<Vec<_>>()
    );
}

/// One node of [`three_nodes`]: name, address with prefix, its block and its one pod.
struct NodeSpec {
    name: &'static str,
    addr: &'static str,
    block: &'static str,
    pod: &'static str,
    pod_addr: &'static str,
}

/// node-a and node-b share 192.168.92.0/24; node-c is alone on 192.168.93.0/24, one router hop
/// away.
const THREE: [NodeSpec; 3] = [
    NodeSpec {
        name: "node-a",
        addr: "192.168.92.10/24",
        block: "172.16.10.0/26",
        pod: "a1",
        pod_addr: "172.16.10.1",
    },
    NodeSpec {
        name: "node-b",
        addr: "192.168.92.11/24",
        block: "172.16.20.64/26",
        pod: "b1",
        pod_addr: "172.16.20.65",
    },
    NodeSpec {
        name: "node-c",
        addr: "192.168.93.12/24",
        block: "172.16.30.128/26",
        pod: "c1",
        pod_addr: "172.16.30.129",
    },
];

fn node_ip(spec: &NodeSpec) -> std::net::Ipv4Addr {
    spec.addr.split('/').next().unwrap().parse().unwrap()
}

/// The plan input of node `me` of [`THREE`]: every node's block with its one pod, the other
/// nodes' blocks learned over BGP with their node addresses as next hops.
fn three_node_input(me: usize, mode: EncapMode) -> PlanInput {
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
            ipip: mode,
            vxlan: EncapMode::Never,
            disabled: false,
        }],
        blocks: THREE
            .iter()
            .map(|n| BlockSpec {
                cidr: n.block.parse().unwrap(),
                affinity: Some(n.name.into()),
                allocations: vec![alloc(n.pod_addr, n.pod, n.name)],
            })
            .collect(),
        learned: THREE
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(_, n)| LearnedRoute {
                prefix: n.block.parse().unwrap(),
                next_hop: IpAddr::V4(node_ip(n)),
            })
            .collect(),
        nodes: THREE
            .iter()
            .map(|n| PeerNode {
                name: n.name.into(),
                ipv4: Some(node_ip(n)),
                ipv6: None,
            })
            .collect(),
        local_interfaces: [workload_interface_name("seed", local.pod)].into(),
        vteps: Vec::new(),
    }
}

/// Three nodes as namespaces: node-a and node-b on one L2 segment (a bridge in a switch
/// namespace), node-c behind a router namespace that forwards between 192.168.92.0/24 and
/// 192.168.93.0/24; each node has a static route to the other subnet via the router, a TUN
/// stand-in for tunl0, and one pod.
struct ThreeNodes {
    nodes: Vec<Netns>,
    pods: Vec<Netns>,
    _switch: Netns,
    _router: Netns,
}

fn three_nodes() -> ThreeNodes {
    let switch = Netns::new("sw");
    let router = Netns::new("rt");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let nodes: Vec<Netns> = ["a", "b", "c"].iter().map(|t| Netns::new(t)).collect();
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
        tun_tunl0(node);
        pods.push(seed_pod(node, spec.pod, spec.pod_addr));
    }
    ThreeNodes {
        nodes,
        pods,
        _switch: switch,
        _router: router,
    }
}

fn sorted(lines: &[String]) -> Vec<String> {
    let mut lines = lines.to_vec();
    lines.sort();
    lines
}

#[test]
fn three_nodes_same_subnet_direct_and_across_a_router_via_tunl0() {
    const TEST: &str = "three_nodes_same_subnet_direct_and_across_a_router_via_tunl0";
    if !can_run(TEST) {
        return;
    }
    let t = three_nodes();
    let cali = |i: usize| workload_interface_name("seed", THREE[i].pod);
    // What `ip route show proto <ours>` must print on each node, written out by hand.
    let cross_subnet = [
        vec![
            "blackhole 172.16.10.0/26".to_string(),
            format!("172.16.10.1 dev {} scope link", cali(0)),
            "172.16.20.64/26 via 192.168.92.11 dev ens33".to_string(),
            "172.16.30.128/26 via 192.168.93.12 dev tunl0 onlink".to_string(),
        ],
        vec![
            "172.16.10.0/26 via 192.168.92.10 dev ens33".to_string(),
            "blackhole 172.16.20.64/26".to_string(),
            format!("172.16.20.65 dev {} scope link", cali(1)),
            "172.16.30.128/26 via 192.168.93.12 dev tunl0 onlink".to_string(),
        ],
        vec![
            "172.16.10.0/26 via 192.168.92.10 dev tunl0 onlink".to_string(),
            "172.16.20.64/26 via 192.168.92.11 dev tunl0 onlink".to_string(),
            "blackhole 172.16.30.128/26".to_string(),
            format!("172.16.30.129 dev {} scope link", cali(2)),
        ],
    ];

    let mut dataplanes = Vec::new();
    for (i, node) in t.nodes.iter().enumerate() {
        let p = plan(&three_node_input(i, EncapMode::CrossSubnet));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let mut dp = open(node);
        dp.set_desired(&p.routes);
        let report = dp.reconcile();
        assert_eq!(
            (report.added, report.failed),
            (4, 0),
            "{}: {:?}",
            THREE[i].name,
            dp.status().failures
        );
        assert_eq!(
            our_routes(node),
            sorted(&cross_subnet[i]),
            "CrossSubnet table of {}",
            THREE[i].name
        );
        dataplanes.push(dp);
    }
    // The static underlay routes towards the router are not ours and stay.
    assert!(
        t.nodes[0]
            .all_routes()
            .contains(&"192.168.93.0/24 via 192.168.92.1 dev ens33".to_string())
    );

    // Same subnet: pod to pod over the direct routes, both ways.
    if can_ping(TEST) {
        assert_pings(&t.pods[0], THREE[1].pod_addr);
        assert_pings(&t.pods[1], THREE[0].pod_addr);
        // The underlay across the router works (what IPIP packets between A and C would use).
        assert_pings(&t.nodes[0], "192.168.93.12");
    }

    // Across the router the routes point into tunl0. The TUN stand-in has no reader, so no pod
    // traffic between A and C can flow until a userspace IPIP implementation (a later issue)
    // serves tunl0; check instead where the kernel would send it: into tunl0, to C's (resp.
    // A's) node address as the outer destination.
    eprintln!(
        "NOTE: pod traffic node-a <-> node-c (across the router) is not tested: it needs IPIP, \
         and this kernel has no ipip module (tunl0 is a TUN stand-in without a reader). \
         Checked instead: the onlink tunl0 routes and the kernel's route lookup."
    );
    let lookup = |ns: &Netns, dst: &str| ns.ip(&["route", "get", dst]);
    let a_to_c = lookup(&t.nodes[0], THREE[2].pod_addr);
    assert!(a_to_c.contains("via 192.168.93.12 dev tunl0"), "{a_to_c}");
    let c_to_a = lookup(&t.nodes[2], THREE[0].pod_addr);
    assert!(c_to_a.contains("via 192.168.92.10 dev tunl0"), "{c_to_a}");
    let a_to_b = lookup(&t.nodes[0], THREE[1].pod_addr);
    assert!(a_to_b.contains("via 192.168.92.11 dev ens33"), "{a_to_b}");

    // ipipMode Always: every remote block goes via tunl0, also between A and B; on C nothing
    // changes (its peers were already across the router).
    let always = [
        vec![
            "blackhole 172.16.10.0/26".to_string(),
            format!("172.16.10.1 dev {} scope link", cali(0)),
            "172.16.20.64/26 via 192.168.92.11 dev tunl0 onlink".to_string(),
            "172.16.30.128/26 via 192.168.93.12 dev tunl0 onlink".to_string(),
        ],
        vec![
            "172.16.10.0/26 via 192.168.92.10 dev tunl0 onlink".to_string(),
            "blackhole 172.16.20.64/26".to_string(),
            format!("172.16.20.65 dev {} scope link", cali(1)),
            "172.16.30.128/26 via 192.168.93.12 dev tunl0 onlink".to_string(),
        ],
        cross_subnet[2].clone(),
    ];
    for (i, dp) in dataplanes.iter_mut().enumerate() {
        dp.set_desired(&plan(&three_node_input(i, EncapMode::Always)).routes);
        let report = dp.reconcile();
        let replaced = if i == 2 { 0 } else { 1 };
        assert_eq!(
            (report.added, report.replaced, report.deleted, report.failed),
            (0, replaced, 0, 0),
            "Always on {}",
            THREE[i].name
        );
        assert_eq!(
            our_routes(&t.nodes[i]),
            sorted(&always[i]),
            "Always table of {}",
            THREE[i].name
        );
    }
    let a_to_b = lookup(&t.nodes[0], THREE[1].pod_addr);
    assert!(a_to_b.contains("via 192.168.92.11 dev tunl0"), "{a_to_b}");
}

#[test]
fn restart_adopts_routes_and_changes_nothing() {
    if !can_run("restart_adopts_routes_and_changes_nothing") {
        return;
    }
    let c = cluster();
    tun_tunl0(&c.master);
    let p = plan(&seed_input("master01", EncapMode::Always));
    let mut dp = open(&c.master);
    dp.set_desired(&p.routes);
    assert_eq!(dp.reconcile().failed, 0);
    drop(dp);
    // The routes survive the agent going away (no flush on exit either).
    assert_eq!(our_routes(&c.master), expected(&p.routes));

    let mut dp = open(&c.master);
    assert_eq!(
        dp.status().installed_routes,
        p.routes.len(),
        "adopted on open"
    );
    // Before the first plan nothing is touched, even on reconcile.
    assert_eq!(dp.reconcile().changes(), 0);
    dp.set_desired(&p.routes);
    let report = dp.reconcile();
    assert_eq!(report.changes(), 0, "{report:?}");
    assert_eq!(
        dp.status().counters.netlink_requests,
        0,
        "zero netlink route requests"
    );
    assert_eq!(our_routes(&c.master), expected(&p.routes));
}

#[test]
fn removing_a_block_removes_exactly_its_routes() {
    if !can_run("removing_a_block_removes_exactly_its_routes") {
        return;
    }
    let c = cluster();
    let mut input = seed_input("master01", EncapMode::CrossSubnet);
    input.learned.push(LearnedRoute {
        prefix: "172.16.50.0/26".parse().unwrap(),
        next_hop: "192.168.92.129".parse().unwrap(),
    });
    let full = plan(&input);
    let mut dp = open(&c.master);
    dp.set_desired(&full.routes);
    assert_eq!(dp.reconcile().failed, 0);
    let before = our_routes(&c.master);
    // The block 172.16.50.0/26 is withdrawn.
    input.learned.pop();
    let smaller = plan(&input);
    dp.set_desired(&smaller.routes);
    let report = dp.reconcile();
    assert_eq!((report.added, report.replaced, report.deleted), (0, 0, 1));
    let after = our_routes(&c.master);
    let gone: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
    assert_eq!(gone, vec!["172.16.50.0/26 via 192.168.92.129 dev ens33"]);
    assert_eq!(after, expected(&smaller.routes));
}

#[test]
fn per_route_errors_are_reported_and_retried_without_blocking_others() {
    if !can_run("per_route_errors_are_reported_and_retried_without_blocking_others") {
        return;
    }
    let c = cluster();
    // No tunl0 (this kernel has no ipip): the tunnel route waits for the device.
    let mut input = seed_input("master01", EncapMode::Always);
    // An external route whose gateway is not reachable yet.
    input.learned.push(LearnedRoute {
        prefix: "10.99.0.0/16".parse().unwrap(),
        next_hop: "10.98.0.1".parse().unwrap(),
    });
    // A foreign route already holds a prefix the plan wants, with another gateway (an
    // identical one would satisfy the plan: `cni_pod_routes_satisfy_the_plan_...`).
    input.learned.push(LearnedRoute {
        prefix: "10.60.0.0/26".parse().unwrap(),
        next_hop: "192.168.92.129".parse().unwrap(),
    });
    c.master.ip(&[
        "route",
        "add",
        "10.60.0.0/26",
        "via",
        "192.168.92.1",
        "proto",
        "static",
    ]);
    let p = plan(&input);
    let mut dp = open(&c.master);
    dp.set_desired(&p.routes);
    let report = dp.reconcile();
    assert_eq!(report.failed, 3, "{:?}", dp.status().failures);
    assert_eq!(report.added, p.routes.len() - 3);
    let status = dp.status();
    let err = |dst: &str| {
        status
            .failures
            .iter()
            .find(|f| f.route.prefix == dst.parse::<IpNet>().unwrap())
            .map(|f| f.error.clone())
    };
    assert_eq!(
        err("172.16.196.128/26"),
        Some(RouteError::MissingDevice("tunl0".into()))
    );
    match err("10.99.0.0/16") {
        Some(RouteError::Kernel(e)) => assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e}"),
        other => panic!("expected ENETUNREACH, got {other:?}"),
    }
    assert_eq!(
        err("10.60.0.0/26"),
        Some(RouteError::Occupied { protocol: Some(4) }),
        "held by a route of proto static"
    );
    let count = |kind: RouteKind| p.routes.iter().filter(|r| r.kind == kind).count();
    let programmed = status.programmed_by_kind;
    assert_eq!(
        programmed[RouteKind::BlockIpip.index()],
        count(RouteKind::BlockIpip) - 1,
        "the tunnel route waits for tunl0"
    );
    assert_eq!(
        programmed[RouteKind::External.index()],
        count(RouteKind::External) - 2
    );
    assert_eq!(
        programmed[RouteKind::Workload.index()],
        count(RouteKind::Workload)
    );
    assert!(
        c.master
            .all_routes()
            .contains(&"10.60.0.0/26 via 192.168.92.1 dev ens33 proto static".to_string()),
        "foreign route untouched"
    );
    // Every other route is in.
    let ours = our_routes(&c.master);
    assert!(
        ours.contains(&"blackhole 172.16.241.64/26".to_string()),
        "{ours:#?}"
    );

    // The causes go away; the running dataplane notices (link event) or retries (backoff).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    plan_tx
        .send(PlanMessage {
            seq: 1,
            update: PlanUpdate::Full(p.routes.clone()),
        })
        .unwrap();
    let (status_tx, mut status_rx) = watch::channel(DataplaneStatus::default());
    let task = rt.spawn(dp.run(plan_rx, status_tx));
    tun_tunl0(&c.master);
    c.master
        .ip(&["addr", "add", "10.98.0.2/24", "dev", "ens33"]);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if status_rx.borrow_and_update().failures.len() == 1 {
                    break;
                }
                status_rx.changed().await.unwrap();
            }
        })
        .await
        .expect("tunnel and unreachable-gateway routes installed after their causes were fixed");
    });
    let ours = our_routes(&c.master);
    assert!(
        ours.contains(&"172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink".to_string()),
        "{ours:#?}"
    );
    assert!(
        ours.contains(&"10.99.0.0/16 via 10.98.0.1 dev ens33".to_string()),
        "{ours:#?}"
    );
    let status = status_rx.borrow().clone();
    assert_eq!(
        status.failures[0].error,
        RouteError::Occupied { protocol: Some(4) },
        "the foreign route still wins"
    );
    assert!(
        c.master
            .all_routes()
            .contains(&"10.60.0.0/26 via 192.168.92.1 dev ens33 proto static".to_string()),
        "foreign route untouched"
    );
    // Its owner removes it: podroute's own goes in.
    c.master
        .ip(&["route", "del", "10.60.0.0/26", "proto", "static"]);
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(20),
            status_rx.wait_for(|s| s.failures.is_empty()),
        )
        .await
        .expect("our route installed once the foreign one is gone")
        .expect("dataplane running");
    });
    assert!(
        our_routes(&c.master).contains(&"10.60.0.0/26 via 192.168.92.129 dev ens33".to_string())
    );
    drop(plan_tx);
    rt.block_on(task).unwrap().unwrap();
}

#[test]
fn drift_is_repaired_and_foreign_routes_are_left_alone() {
    if !can_run("drift_is_repaired_and_foreign_routes_are_left_alone") {
        return;
    }
    let c = cluster();
    tun_tunl0(&c.master);
    let p = plan(&seed_input("master01", EncapMode::Always));
    let dp = open(&c.master);
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    plan_tx
        .send(PlanMessage {
            seq: 1,
            update: PlanUpdate::Full(p.routes.clone()),
        })
        .unwrap();
    let (status_tx, status_rx) = watch::channel(DataplaneStatus::default());
    // The dataplane runs on its own thread while this thread plays the disruptive admin.
    let driver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(dp.run(plan_rx, status_tx))
    });
    let want = expected(&p.routes);
    wait_until("initial programming", Duration::from_secs(10), || {
        our_routes(&c.master) == want
    });

    // A hand-deleted route of ours comes back.
    c.master.ip(&["route", "del", "172.16.196.128/26"]);
    wait_until("deleted route restored", Duration::from_secs(10), || {
        our_routes(&c.master) == want
    });
    // A hand-changed route of ours that keeps our protocol is put back. (One replaced with
    // another protocol is another owner's: see
    // `a_foreign_replace_of_our_route_is_left_alone_and_reported`.)
    c.master.ip(&[
        "route",
        "replace",
        "172.16.196.128/26",
        "via",
        "192.168.92.1",
        "dev",
        "ens33",
        "proto",
        &PROTO.to_string(),
    ]);
    wait_until("replaced route restored", Duration::from_secs(10), || {
        our_routes(&c.master) == want
    });
    c.master.ip(&["route", "del", "172.16.241.65/32"]);
    wait_until("workload route restored", Duration::from_secs(10), || {
        our_routes(&c.master) == want
    });
    // A foreign route is left alone, and a stray route with our protocol is removed.
    c.master.ip(&[
        "route",
        "add",
        "10.77.0.0/16",
        "via",
        "192.168.92.1",
        "proto",
        "static",
    ]);
    c.master.ip(&[
        "route",
        "add",
        "10.78.0.0/16",
        "via",
        "192.168.92.1",
        "proto",
        &PROTO.to_string(),
    ]);
    wait_until("stray route removed", Duration::from_secs(10), || {
        our_routes(&c.master) == want
    });
    assert!(
        c.master
            .all_routes()
            .contains(&"10.77.0.0/16 via 192.168.92.1 dev ens33 proto static".to_string())
    );
    let status = status_rx.borrow().clone();
    assert!(status.counters.drift_repairs >= 4, "{:?}", status.counters);
    assert!(status.failures.is_empty(), "{:?}", status.failures);

    drop(plan_tx);
    driver.join().unwrap().unwrap();
}

#[test]
fn ten_thousand_routes_in_batches() {
    if !can_run("ten_thousand_routes_in_batches") {
        return;
    }
    let (node, _peer) = node_and_peer("big");
    let routes: Vec<DesiredRoute> = (0..10_000u32)
        .map(|i| {
            let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0)) + (i << 6);
            DesiredRoute {
                prefix: IpNet::new(IpAddr::V4(base.into()), 26).unwrap(),
                kind: RouteKind::BlockDirect,
                gateway: Some("192.168.92.129".parse().unwrap()),
                device: Some("ens33".into()),
                onlink: false,
                scope: RouteScope::Universe,
            }
        })
        .collect();
    let mut dp = open(&node);
    dp.set_desired(&routes);
    let report = dp.reconcile();
    assert_eq!((report.added, report.failed), (10_000, 0));
    let counters = dp.status().counters;
    assert!(
        counters.netlink_sends <= 20,
        "batched: {} sends for 10k routes",
        counters.netlink_sends
    );
    assert_eq!(node.routes(PROTO).len(), 10_000);
    // Change 1%: the first 100 move to another gateway; the last 100 go.
    let mut changed = routes.clone();
    for r in changed.iter_mut().take(100) {
        r.gateway = Some("192.168.92.130".parse().unwrap());
    }
    changed.truncate(9_900);
    dp.set_desired(&changed);
    let report = dp.reconcile();
    assert_eq!(
        (report.added, report.replaced, report.deleted, report.failed),
        (0, 100, 100, 0)
    );
    let lines: BTreeSet<String> = node.routes(PROTO).into_iter().collect();
    assert_eq!(lines.len(), 9_900);
    assert!(lines.contains("172.16.0.0/26 via 192.168.92.130 dev ens33"));
}

/// BGP best-path changes arrive as deltas: the running dataplane changes exactly the
/// prefixes named, one request each, and leaves the rest of the table alone.
#[test]
fn deltas_change_only_their_prefixes() {
    if !can_run("deltas_change_only_their_prefixes") {
        return;
    }
    let (node, _peer) = node_and_peer("delta");
    let route = |i: u32, gw: &str| {
        let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0)) + (i << 6);
        DesiredRoute {
            prefix: IpNet::new(IpAddr::V4(base.into()), 26).unwrap(),
            kind: RouteKind::BlockDirect,
            gateway: Some(gw.parse().unwrap()),
            device: Some("ens33".into()),
            onlink: false,
            scope: RouteScope::Universe,
        }
    };
    let full: Vec<DesiredRoute> = (0..1000).map(|i| route(i, "192.168.92.129")).collect();
    let dp = open(&node);
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    let (status_tx, mut status_rx) = watch::channel(DataplaneStatus::default());
    let driver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(dp.run(plan_rx, status_tx))
    });
    let wait_applied = |rx: &mut watch::Receiver<DataplaneStatus>, seq: u64| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|s| s.applied >= Some(seq)),
            )
            .await
            .expect("update applied")
            .expect("dataplane running")
            .clone()
        })
    };
    plan_tx
        .send(PlanMessage {
            seq: 1,
            update: PlanUpdate::Full(full.clone()),
        })
        .unwrap();
    let after_full = wait_applied(&mut status_rx, 1);
    assert_eq!(node.routes(PROTO).len(), 1000);
    // One moved, one new, one withdrawn, one unchanged (no request), one removal of a prefix
    // that was never there.
    plan_tx
        .send(PlanMessage {
            seq: 2,
            update: PlanUpdate::Delta(vec![
                RouteChange::Upsert(route(5, "192.168.92.130")),
                RouteChange::Upsert(route(2000, "192.168.92.129")),
                RouteChange::Remove(route(7, "192.168.92.129").prefix),
                RouteChange::Upsert(route(9, "192.168.92.129")),
                RouteChange::Remove(route(3000, "192.168.92.129").prefix),
            ]),
        })
        .unwrap();
    let status = wait_applied(&mut status_rx, 2);
    let c = status.counters;
    let before = after_full.counters;
    assert_eq!(
        (
            c.routes_replaced - before.routes_replaced,
            c.routes_added - before.routes_added,
            c.routes_deleted - before.routes_deleted,
            c.netlink_requests - before.netlink_requests
        ),
        (1, 1, 1, 3),
        "{c:?}"
    );
    assert_eq!(
        (status.desired_routes, status.installed_routes),
        (1000, 1000)
    );
    let mut want: Vec<DesiredRoute> = full;
    want[5] = route(5, "192.168.92.130");
    want.remove(7);
    want.push(route(2000, "192.168.92.129"));
    assert_eq!(our_routes(&node), expected(&want));
    drop(plan_tx);
    driver.join().unwrap().unwrap();
}

/// A failed route that gets into the kernel another way (here: added by hand exactly as
/// planned, with our protocol) is taken as programmed from the notification: its failure is
/// cleared without waiting for a retry.
#[test]
fn a_failed_route_seen_in_the_kernel_is_no_longer_failed() {
    if !can_run("a_failed_route_seen_in_the_kernel_is_no_longer_failed") {
        return;
    }
    let (node, _peer) = node_and_peer("seen");
    let route = DesiredRoute {
        prefix: "10.99.0.0/16".parse().unwrap(),
        kind: RouteKind::External,
        gateway: Some("10.98.0.1".parse().unwrap()),
        device: None,
        onlink: false,
        scope: RouteScope::Universe,
    };
    // No retry within the test: only the notification can clear the failure.
    let mut dp = node.run(|| {
        Dataplane::open(DataplaneConfig {
            retry_min: Duration::from_secs(600),
            retry_max: Duration::from_secs(600),
            ..DataplaneConfig::default()
        })
        .expect("open dataplane")
    });
    dp.set_desired([&route]);
    assert_eq!(dp.reconcile().failed, 1, "gateway unreachable");
    let (plan_tx, plan_rx) = mpsc::unbounded_channel::<PlanMessage>();
    let (status_tx, mut status_rx) = watch::channel(DataplaneStatus::default());
    let driver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(dp.run(plan_rx, status_tx))
    });
    node.ip(&["addr", "add", "10.98.0.2/24", "dev", "ens33"]);
    node.ip(&[
        "route",
        "add",
        "10.99.0.0/16",
        "via",
        "10.98.0.1",
        "proto",
        &PROTO.to_string(),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            status_rx.wait_for(|s| s.failures.is_empty() && s.installed_routes == 1),
        )
        .await
        .expect("failure cleared by the notification")
        .expect("dataplane running")
        .clone()
    });
    assert_eq!(
        status.counters.netlink_requests, 1,
        "no second request: {status:?}"
    );
    drop(plan_tx);
    driver.join().unwrap().unwrap();
}

/// Only a datagram's last request is acknowledged; failures anywhere in it (including the
/// acknowledged last one) must still land on the right request, across datagrams.
#[test]
fn batched_requests_report_each_failure_at_its_position() {
    if !can_run("batched_requests_report_each_failure_at_its_position") {
        return;
    }
    use podroute::dataplane::kernel::{Change, KernelRoute};
    use podroute::dataplane::socket::RequestSocket;
    let (node, _peer) = node_and_peer("nack");
    let route = |i: u32, gw: &str| {
        let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0)) + (i << 6);
        KernelRoute::wanted(
            IpNet::new(IpAddr::V4(base.into()), 26).unwrap(),
            PROTO,
            false,
            false,
            Some(gw.parse().unwrap()),
            None,
            false,
        )
    };
    // 4 requests per datagram: 10 requests make datagrams of 4, 4 and 2. Failing: 1
    // (unreachable gateway), 3 (last of the first datagram), 6 (deleting a route that is
    // not there), 9 (the very last).
    let failing = [1usize, 3, 6, 9];
    let changes: Vec<Change> = (0..10u32)
        .map(|i| {
            let ok_gw = "192.168.92.129";
            match i {
                1 | 3 | 9 => Change::Add(route(i, "10.98.0.1")),
                6 => Change::Delete(route(i, ok_gw)),
                _ => Change::Add(route(i, ok_gw)),
            }
        })
        .collect();
    let (results, sends) = node.run(move || {
        let mut sock = RequestSocket::open(4).expect("socket");
        let results = sock.execute(changes.iter().map(Change::request));
        (results, sock.sends())
    });
    assert_eq!(sends, 3, "three datagrams");
    assert_eq!(results.len(), 10);
    for (i, r) in results.iter().enumerate() {
        if failing.contains(&i) {
            let errno = r.as_ref().err().and_then(|e| e.errno());
            let want = if i == 6 {
                libc::ESRCH
            } else {
                libc::ENETUNREACH
            };
            assert_eq!(errno, Some(want), "request {i}: {r:?}");
        } else {
            assert_eq!(r, &Ok(()), "request {i}");
        }
    }
    assert_eq!(
        node.routes(PROTO).len(),
        6,
        "the six good adds are in: {:?}",
        node.routes(PROTO)
    );
}

/// The monitor's filter drops the echoes of the request socket's own changes, and only those.
#[test]
fn monitor_skips_its_own_echoes_but_sees_everyone_else() {
    if !can_run("monitor_skips_its_own_echoes_but_sees_everyone_else") {
        return;
    }
    use podroute::dataplane::kernel::{Change, KernelRoute};
    use podroute::dataplane::monitor::{Event, MonitorSocket};
    use podroute::dataplane::socket::RequestSocket;
    let (node, _peer) = node_and_peer("echo");
    let (mut monitor, mut sock) = node.run(|| {
        let monitor = MonitorSocket::open().expect("monitor");
        let sock = RequestSocket::open(16).expect("socket");
        monitor
            .ignore_sender(sock.port().expect("port"))
            .expect("filter");
        (monitor, sock)
    });
    let ours = KernelRoute::wanted(
        "172.16.0.0/26".parse().unwrap(),
        PROTO,
        false,
        false,
        Some("192.168.92.129".parse().unwrap()),
        None,
        false,
    );
    let results = sock.execute([Change::Add(ours.clone()).request()]);
    assert_eq!(results, vec![Ok(())]);
    // Someone else adds a route with our protocol, and deletes ours.
    node.ip(&[
        "route",
        "add",
        "172.16.0.64/26",
        "via",
        "192.168.92.129",
        "proto",
        &PROTO.to_string(),
    ]);
    node.ip(&["route", "del", "172.16.0.0/26"]);
    let mut events = Vec::new();
    monitor.drain(&mut events).expect("drain");
    let routes: Vec<(String, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::RouteAdded { route, .. } => Some((route.key.dst.to_string(), true)),
            Event::RouteRemoved(route) => Some((route.key.dst.to_string(), false)),
            _ => None,
        })
        .collect();
    assert_eq!(
        routes,
        vec![
            ("172.16.0.64/26".to_string(), true),
            ("172.16.0.0/26".to_string(), false)
        ],
        "our own add is not echoed; the other changes are: {events:?}"
    );
}

#[test]
fn tunl0_device_is_configured_or_the_missing_ipip_is_named() {
    if !can_run("tunl0_device_is_configured_or_the_missing_ipip_is_named") {
        return;
    }
    let (node, _peer) = node_and_peer("tun");
    node.ip(&["link", "set", "ens33", "mtu", "1450"]);
    let spec = TunnelSpec {
        name: "tunl0".into(),
        nic: "ens33".into(),
        address: Some("172.16.241.64".parse().unwrap()),
    };
    let run = |spec: TunnelSpec| {
        node.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { KernelIpip::connect()?.ensure(&spec).await })
        })
    };
    let ipip_available = node.try_ip(&["link", "add", "probe0", "type", "ipip"]).0;
    if ipip_available {
        node.ip(&["link", "del", "probe0"]);
    }
    match run(spec.clone()) {
        Ok(state) => {
            assert!(
                ipip_available,
                "created an ipip device although `ip link add type ipip` fails"
            );
            assert_eq!(state.mtu, 1430);
        }
        Err(e @ TunnelError::IpipUnsupported { .. }) => {
            assert!(!ipip_available, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("no ipip support") && msg.contains("tunl0"),
                "{msg}"
            );
            eprintln!(
                "NOTE: this kernel has no ipip module; the kernel IPIP device could not be tested. \
                 Testing configuration of a TUN stand-in named tunl0 instead."
            );
        }
        Err(e) => panic!("unexpected tunnel error: {e}"),
    }
    // A pre-existing device named tunl0 (the TUN stand-in here, the userspace tunnel later) is
    // configured: MTU = NIC MTU - 20, tunnel address, up.
    if !ipip_available {
        node.ip(&["tuntap", "add", "dev", "tunl0", "mode", "tun"]);
    }
    let state = run(spec).expect("configure tunl0");
    assert_eq!(state.mtu, 1430);
    let link = node.ip(&["-o", "link", "show", "dev", "tunl0"]);
    assert!(link.contains("mtu 1430") && link.contains(",UP"), "{link}");
    let addr = node.ip(&["-o", "addr", "show", "dev", "tunl0"]);
    assert!(addr.contains("172.16.241.64/32"), "{addr}");
}

#[test]
fn ipv6_never_pool_is_programmed_and_adopted() {
    if !can_run("ipv6_never_pool_is_programmed_and_adopted") {
        return;
    }
    let node = Netns::new("v6");
    let peer = Netns::new("v6p");
    veth(&node, "ens33", "", &peer, "ens33", "");
    node.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:92::128/64",
        "dev",
        "ens33",
        "nodad",
    ]);
    peer.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:92::129/64",
        "dev",
        "ens33",
        "nodad",
    ]);
    let iface = workload_interface_name("ns", "p6");
    let _pod = pod_v6(&node, &iface);
    let input = PlanInput {
        local: LocalNode {
            name: "master01".into(),
            ipv4: None,
            ipv6: Some("fd00:92::128/64".parse().unwrap()),
            nic: "ens33".into(),
        },
        pools: vec![PoolSpec {
            name: "default-ipv6-ippool".into(),
            cidr: "fd00:10::/48".parse().unwrap(),
            ipip: EncapMode::Never,
            vxlan: EncapMode::Never,
            disabled: false,
        }],
        blocks: vec![BlockSpec {
            cidr: "fd00:10:0:1::/122".parse().unwrap(),
            affinity: Some("master01".into()),
            allocations: vec![Allocation {
                ip: "fd00:10:0:1::5".parse().unwrap(),
                namespace: Some("ns".into()),
                pod: Some("p6".into()),
                node: Some("master01".into()),
            }],
        }],
        learned: vec![LearnedRoute {
            prefix: "fd00:10:0:2::/122".parse().unwrap(),
            next_hop: "fd00:92::129".parse().unwrap(),
        }],
        nodes: vec![],
        local_interfaces: [iface.clone()].into(),
        vteps: Vec::new(),
    };
    let p = plan(&input);
    assert_eq!(p.routes.len(), 3, "{:#?}", p.lines());
    let mut dp = open(&node);
    dp.set_desired(&p.routes);
    let report = dp.reconcile();
    assert_eq!(
        (report.added, report.failed),
        (3, 0),
        "{:?}",
        dp.status().failures
    );
    let shown: Vec<String> = node
        .routes(PROTO)
        .into_iter()
        .map(|l| l.replace(" pref medium", "").replace(" dev lo", ""))
        .collect();
    assert_eq!(
        shown,
        vec![
            "blackhole fd00:10:0:1::/122".to_string(),
            format!("fd00:10:0:1::5 dev {iface}"),
            "fd00:10:0:2::/122 via fd00:92::129 dev ens33".to_string(),
        ]
    );
    drop(dp);
    let mut dp = open(&node);
    dp.set_desired(&p.routes);
    assert_eq!(
        dp.reconcile().changes(),
        0,
        "IPv6 routes adopted without changes"
    );
}

/// A pod namespace behind `iface` (no addresses needed for the host route).
fn pod_v6(node: &Netns, iface: &str) -> Netns {
    let pod = Netns::new("pod6");
    veth(node, iface, "", &pod, "eth0", "");
    pod
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

    /// Sends a full plan and waits until the dataplane has applied it.
    fn full(&mut self, routes: &[DesiredRoute]) -> DataplaneStatus {
        self.seq += 1;
        let seq = self.seq;
        self.plans
            .as_ref()
            .unwrap()
            .send(PlanMessage {
                seq,
                update: PlanUpdate::Full(routes.to_vec()),
            })
            .unwrap();
        self.wait(&format!("plan {seq} applied"), |s| s.applied >= Some(seq))
    }

    /// Waits for a published status that satisfies `cond` (the timeout only keeps a broken
    /// dataplane from hanging the test).
    fn wait(&mut self, what: &str, cond: impl FnMut(&DataplaneStatus) -> bool) -> DataplaneStatus {
        let rx = &mut self.status;
        let found = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), rx.wait_for(cond))
                .await
                .map(|r| r.expect("dataplane running").clone())
        });
        found.unwrap_or_else(|_| panic!("waiting for {what}: {:?}", *self.status.borrow()))
    }

    fn stop(mut self) {
        self.plans.take();
        if let Some(driver) = self.driver.take() {
            driver.join().unwrap().unwrap();
        }
    }
}

fn by_other_owner(status: &DataplaneStatus) -> Vec<(String, u8)> {
    status
        .by_other_owner
        .iter()
        .map(|o| (o.prefix.to_string(), o.protocol))
        .collect()
}

/// Adds `addr/32 dev IFACE scope link` exactly as Calico's CNI plugin does (netlink default
/// protocol: `boot`).
fn cni_route(node: &Netns, addr: &str, iface: &str) {
    node.ip(&[
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        iface,
        "scope",
        "link",
    ]);
}

/// A barrier on the monitor: deletes our route `dst` by hand and waits until podroute has put
/// it back. Notifications are read in order, so everything the kernel reported before the
/// deletion has been absorbed and reconciled by then.
fn monitor_round(node: &Netns, running: &mut Running, dst: &str, want: &[String]) {
    let before = running.status.borrow().counters.drift_repairs;
    node.ip(&["route", "del", dst, "proto", &PROTO.to_string()]);
    running.wait(&format!("{dst} repaired"), |s| {
        s.counters.drift_repairs > before
    });
    wait_until(&format!("{dst} back"), Duration::from_secs(10), || {
        our_routes(node) == want
    });
}

/// Issue 16: the CNI plugin's pod route (`POD/32 dev caliXXX scope link`, protocol boot) is
/// what the plan wants; podroute counts it as programmed by another owner, never as failed,
/// never fights over it, and installs its own once it is gone while the pod remains.
#[test]
fn cni_pod_routes_satisfy_the_plan_and_are_never_fought_over() {
    if !can_run("cni_pod_routes_satisfy_the_plan_and_are_never_fought_over") {
        return;
    }
    let c = cluster();
    let cali = |pod: &str| workload_interface_name("seed", pod);
    let mut input = seed_input("master01", EncapMode::CrossSubnet);
    let p = plan(&input);
    let count =
        |routes: &[DesiredRoute], kind: RouteKind| routes.iter().filter(|r| r.kind == kind).count();

    // Before podroute programs it: the CNI plugin added pod .65's route.
    cni_route(&c.master, "172.16.241.65", &cali("p65"));
    let mut dp = Running::start(open(&c.master));
    let status = dp.full(&p.routes);
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    assert_eq!(
        by_other_owner(&status),
        vec![("172.16.241.65/32".to_string(), 3)]
    );
    assert_eq!(
        status.programmed_by_kind[RouteKind::Workload.index()],
        count(&p.routes, RouteKind::Workload),
        "counted as programmed"
    );
    let cni_65 = format!("172.16.241.65 dev {} scope link", cali("p65"));
    assert!(c.master.all_routes().contains(&cni_65), "CNI route kept");
    let mut want: Vec<String> = expected(&p.routes)
        .into_iter()
        .filter(|l| !l.starts_with("172.16.241.65 "))
        .collect();
    assert_eq!(our_routes(&c.master), want, "no route of ours for .65");

    // After podroute programmed it: the route of pod .66 is put over ours with protocol boot
    // (as Felix does): another owner's, identical to the plan.
    let cni_66 = format!("172.16.241.66 dev {} scope link", cali("p66"));
    c.master.ip(&[
        "route",
        "replace",
        "172.16.241.66/32",
        "dev",
        &cali("p66"),
        "scope",
        "link",
    ]);
    let status = dp.wait(".66 programmed by another owner", |s| {
        by_other_owner(s).len() == 2
    });
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    want.retain(|l| !l.starts_with("172.16.241.66 "));
    // Several rounds of monitor events, a full re-read (a new, down link) and plans: nothing
    // is fought over.
    let resyncs = dp.status.borrow().counters.resyncs;
    for i in 0..3 {
        monitor_round(&c.master, &mut dp, "172.16.196.128/26", &want);
        if i == 1 {
            c.master
                .ip(&["link", "add", "xa", "type", "veth", "peer", "name", "xb"]);
            dp.wait("a re-read", |s| s.counters.resyncs > resyncs);
        }
        let status = dp.full(&p.routes);
        assert!(status.failures.is_empty(), "{:?}", status.failures);
        assert_eq!(by_other_owner(&status).len(), 2);
    }
    let routes = c.master.all_routes();
    assert!(
        routes.contains(&cni_65) && routes.contains(&cni_66),
        "{routes:#?}"
    );
    let status = dp.status.borrow().clone();
    assert_eq!(status.counters.routes_replaced, 0, "{:?}", status.counters);

    // A new pod whose CNI route is there before the plan has it (the usual order).
    let _p68 = seed_pod(&c.master, "p68", "172.16.241.68");
    cni_route(&c.master, "172.16.241.68", &cali("p68"));
    input.blocks[0]
        .allocations
        .push(alloc("172.16.241.68", "p68", "master01"));
    input
        .local_interfaces
        .insert(workload_interface_name("seed", "p68"));
    let p68 = plan(&input);
    let status = dp.full(&p68.routes);
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    assert_eq!(
        by_other_owner(&status),
        vec![
            ("172.16.241.65/32".to_string(), 3),
            ("172.16.241.66/32".to_string(), 3),
            ("172.16.241.68/32".to_string(), 3),
        ]
    );
    assert_eq!(
        status.programmed_by_kind[RouteKind::Workload.index()],
        count(&p68.routes, RouteKind::Workload)
    );

    // The CNI route of .65 goes while the pod remains: podroute installs its own.
    c.master.ip(&["route", "del", "172.16.241.65/32"]);
    let status = dp.wait(".65 no longer by another owner", |s| {
        by_other_owner(s).len() == 2
    });
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    wait_until("our route for .65", Duration::from_secs(10), || {
        our_routes(&c.master).contains(&format!("172.16.241.65 dev {} scope link", cali("p65")))
    });
    dp.stop();
}

/// Issue 14: a route of ours replaced by hand with another protocol and another gateway is
/// another owner's: left alone through monitor rounds, re-reads and plans, reported as
/// occupied with its protocol; when it is deleted podroute's own comes back.
#[test]
fn a_foreign_replace_of_our_route_is_left_alone_and_reported() {
    if !can_run("a_foreign_replace_of_our_route_is_left_alone_and_reported") {
        return;
    }
    let c = cluster();
    let p = plan(&seed_input("master01", EncapMode::CrossSubnet));
    let mut dp = Running::start(open(&c.master));
    let status = dp.full(&p.routes);
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    let all = expected(&p.routes);
    assert_eq!(our_routes(&c.master), all);
    let block = "172.16.196.128/26";
    assert!(all.contains(&format!("{block} via 192.168.92.129 dev ens33")));

    let static_route = format!("{block} via 192.168.92.1 dev ens33 proto static");
    c.master.ip(&[
        "route",
        "replace",
        block,
        "via",
        "192.168.92.1",
        "dev",
        "ens33",
        "proto",
        "static",
    ]);
    let status = dp.wait("the destination reported occupied", |s| {
        !s.failures.is_empty()
    });
    assert_eq!(status.failures.len(), 1, "{:?}", status.failures);
    assert_eq!(status.failures[0].route.prefix.to_string(), block);
    assert_eq!(
        status.failures[0].error,
        RouteError::Occupied { protocol: Some(4) }
    );
    assert!(
        status.failures[0]
            .error
            .to_string()
            .contains("another owner (proto static)"),
        "{}",
        status.failures[0].error
    );
    let want: Vec<String> = all
        .iter()
        .filter(|l| !l.starts_with(block))
        .cloned()
        .collect();
    // Replaced again and again (the issue: 20 of 20 were overwritten back), monitor rounds,
    // a full re-read (a new, down link) and plans: the foreign route stays.
    let resyncs = dp.status.borrow().counters.resyncs;
    for i in 0..5 {
        c.master.ip(&[
            "route",
            "replace",
            block,
            "via",
            "192.168.92.1",
            "dev",
            "ens33",
            "proto",
            "static",
        ]);
        monitor_round(&c.master, &mut dp, "172.16.241.67/32", &want);
        if i == 2 {
            c.master
                .ip(&["link", "add", "xa", "type", "veth", "peer", "name", "xb"]);
            dp.wait("a re-read", |s| s.counters.resyncs > resyncs);
        }
        let status = dp.full(&p.routes);
        assert_eq!(status.failures.len(), 1, "{:?}", status.failures);
        assert!(
            c.master.all_routes().contains(&static_route),
            "round {i}: {:#?}",
            c.master.all_routes()
        );
        assert_eq!(our_routes(&c.master), want, "round {i}");
    }
    let status = dp.status.borrow().clone();
    assert_eq!(status.counters.routes_replaced, 0, "{:?}", status.counters);
    assert!(status.by_other_owner.is_empty());

    // Its owner deletes it: podroute's own comes back.
    c.master.ip(&["route", "del", block, "proto", "static"]);
    dp.wait("failure cleared", |s| s.failures.is_empty());
    wait_until("our block route back", Duration::from_secs(10), || {
        our_routes(&c.master) == all
    });
    dp.stop();
}
