//! Plan tests. The seed tables are copied verbatim from
//! `shared/seeds/001_7a55b52529396fb1.txt` (Calico IPIP, `route -n` on master01 and node01,
//! before and after `ipipMode: CrossSubnet`).

use super::*;

const MASTER01: &str = "master01";
const NODE01: &str = "node01";
const MASTER01_ADDR: &str = "192.168.92.128/24";
const NODE01_ADDR: &str = "192.168.92.129/24";
const MASTER01_BLOCK: &str = "172.16.241.64/26";
const NODE01_BLOCK: &str = "172.16.196.128/26";

const SEED_MASTER01_ALWAYS: &str = "\
0.0.0.0         192.168.92.2    0.0.0.0         UG    100    0        0 ens33
172.16.196.128  192.168.92.129  255.255.255.192 UG    0      0        0 tunl0
172.16.241.64   0.0.0.0         255.255.255.192 U     0      0        0 *
172.16.241.69   0.0.0.0         255.255.255.255 UH    0      0        0 cali68d0bd52ca7
172.16.241.70   0.0.0.0         255.255.255.255 UH    0      0        0 cali55ce5618d78
172.16.241.71   0.0.0.0         255.255.255.255 UH    0      0        0 cali6156df79841
172.16.241.72   0.0.0.0         255.255.255.255 UH    0      0        0 cali81d206a1716
172.17.0.0      0.0.0.0         255.255.0.0     U     0      0        0 docker0
192.168.92.0    0.0.0.0         255.255.255.0   U     100    0        0 ens33
192.168.241.64  0.0.0.0         255.255.255.192 U     0      0        0 *
";

const SEED_NODE01_ALWAYS: &str = "\
0.0.0.0         192.168.92.2    0.0.0.0         UG    100    0        0 ens33
172.16.196.128  0.0.0.0         255.255.255.192 U     0      0        0 *
172.16.196.129  0.0.0.0         255.255.255.255 UH    0      0        0 cali6321cd990f9
172.16.196.131  0.0.0.0         255.255.255.255 UH    0      0        0 cali63b1569e518
172.16.241.64   192.168.92.128  255.255.255.192 UG    0      0        0 tunl0
172.17.0.0      0.0.0.0         255.255.0.0     U     0      0        0 docker0
192.168.92.0    0.0.0.0         255.255.255.0   U     100    0        0 ens33
";

const SEED_MASTER01_CROSS_SUBNET: &str = "\
0.0.0.0         192.168.92.2    0.0.0.0         UG    100    0        0 ens33
172.16.196.128  192.168.92.129  255.255.255.192 UG    0      0        0 ens33
172.16.241.64   0.0.0.0         255.255.255.192 U     0      0        0 *
172.16.241.65   0.0.0.0         255.255.255.255 UH    0      0        0 cali99ba0e1a1c8
172.16.241.66   0.0.0.0         255.255.255.255 UH    0      0        0 cali3941b92be17
172.16.241.67   0.0.0.0         255.255.255.255 UH    0      0        0 cali0fd794bcf81
172.16.241.68   0.0.0.0         255.255.255.255 UH    0      0        0 cali291c708c629
172.16.241.69   0.0.0.0         255.255.255.255 UH    0      0        0 cali67beaa0e9f4
172.17.0.0      0.0.0.0         255.255.0.0     U     0      0        0 docker0
192.168.92.0    0.0.0.0         255.255.255.0   U     100    0        0 ens33
";

/// The seed does not show node01 after the change; this is the same rule applied to node01's
/// "before" table (the tunl0 row now leaves through ens33).
const EXPECTED_NODE01_CROSS_SUBNET: &str = "\
172.16.196.128  0.0.0.0         255.255.255.192 U     0      0        0 *
172.16.196.129  0.0.0.0         255.255.255.255 UH    0      0        0 cali6321cd990f9
172.16.196.131  0.0.0.0         255.255.255.255 UH    0      0        0 cali63b1569e518
172.16.241.64   192.168.92.128  255.255.255.192 UG    0      0        0 ens33
";

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A `route -n` row: destination, gateway, genmask, flags, iface. Workload interface names
/// are checked separately (the seed's pod names are unknown), so rows compare `cali*`.
type RouteNRow = (String, String, String, String, String);

/// Rows of a seed table that podroute owns: the foreign rows (default route and connected
/// subnet with metric 100 from DHCP/kernel, docker0) are dropped.
fn seed_rows(table: &str) -> Vec<RouteNRow> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 8, "bad seed row {line:?}");
            if f[4] != "0" || f[7] == "docker0" {
                return None;
            }
            let iface = if f[7].starts_with("cali") {
                "cali*"
            } else {
                f[7]
            };
            Some((
                f[0].into(),
                f[1].into(),
                f[2].into(),
                f[3].into(),
                iface.into(),
            ))
        })
        .collect()
}

/// Renders a plan as `route -n` would show it after the kernel installed it.
fn route_n(plan: &RoutePlan) -> Vec<RouteNRow> {
    plan.routes
        .iter()
        .map(|r| {
            let IpNet::V4(p) = r.prefix else {
                panic!("route -n shows IPv4 only: {r}")
            };
            let gateway = r.gateway.map_or("0.0.0.0".to_string(), |g| g.to_string());
            let mut flags = "U".to_string();
            if r.gateway.is_some() {
                flags.push('G');
            }
            if p.prefix_len() == 32 {
                flags.push('H');
            }
            let iface = match &r.device {
                Some(d) if d.starts_with("cali") => "cali*".to_string(),
                Some(d) => d.to_string(),
                None if r.is_blackhole() => "*".to_string(),
                None => panic!("{r}: the kernel would pick the device; not a seed row"),
            };
            (
                p.network().to_string(),
                gateway,
                p.netmask().to_string(),
                flags,
                iface,
            )
        })
        .collect()
}

fn pool(name: &str, cidr: &str, ipip: EncapMode) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        cidr: net(cidr),
        ipip,
        vxlan: EncapMode::Never,
        disabled: false,
    }
}

fn pod_alloc(addr: &str, namespace: &str, pod: &str, node: &str) -> Allocation {
    Allocation {
        ip: ip(addr),
        namespace: Some(namespace.into()),
        pod: Some(pod.into()),
        node: Some(node.into()),
    }
}

fn block(cidr: &str, host: &str, allocations: Vec<Allocation>) -> BlockSpec {
    BlockSpec {
        cidr: net(cidr),
        affinity: Some(host.into()),
        allocations,
    }
}

fn local(name: &str, addr: &str) -> LocalNode {
    LocalNode {
        name: name.into(),
        ipv4: Some(addr.parse().unwrap()),
        ipv6: None,
        nic: "ens33".into(),
    }
}

fn learned(prefix: &str, next_hop: &str) -> LearnedRoute {
    LearnedRoute {
        prefix: net(prefix),
        next_hop: ip(next_hop),
    }
}

fn nodes() -> Vec<PeerNode> {
    vec![
        PeerNode {
            name: MASTER01.into(),
            ipv4: Some("192.168.92.128".parse().unwrap()),
            ipv6: None,
        },
        PeerNode {
            name: NODE01.into(),
            ipv4: Some("192.168.92.129".parse().unwrap()),
            ipv6: None,
        },
    ]
}

/// Marks every pod of `blocks` that runs on `node` as having its cali interface.
fn interfaces_of(blocks: &[BlockSpec], node: &str) -> BTreeSet<String> {
    blocks
        .iter()
        .flat_map(|b| &b.allocations)
        .filter(|a| a.node.as_deref() == Some(node))
        .filter_map(|a| {
            Some(workload_interface_name(
                a.namespace.as_deref()?,
                a.pod.as_deref()?,
            ))
        })
        .collect()
}

/// Seed 001, before the change: pods .69-.72 on master01 (names unknown: synthetic), .129 and
/// .131 on node01, and master01's stale block 192.168.241.64/26 left from the default pool
/// 192.168.0.0/16 that the installer replaced by 172.16.0.0/16 (hence its blackhole).
fn seed_before() -> Vec<BlockSpec> {
    vec![
        block(
            MASTER01_BLOCK,
            MASTER01,
            (69..=72)
                .map(|i| {
                    pod_alloc(
                        &format!("172.16.241.{i}"),
                        "seed",
                        &format!("pod-{i}"),
                        MASTER01,
                    )
                })
                .collect(),
        ),
        block(
            NODE01_BLOCK,
            NODE01,
            vec![
                pod_alloc("172.16.196.129", "seed", "pod-129", NODE01),
                pod_alloc("172.16.196.131", "seed", "pod-131", NODE01),
            ],
        ),
        block("192.168.241.64/26", MASTER01, vec![]),
    ]
}

/// Seed 001, after the change: pods .65-.69 on master01, .69 being busybox-b8ffb94c4-c84gp;
/// the stale block is gone.
fn seed_after() -> Vec<BlockSpec> {
    let mut master: Vec<Allocation> = (65..=68)
        .map(|i| {
            pod_alloc(
                &format!("172.16.241.{i}"),
                "seed",
                &format!("pod-{i}"),
                MASTER01,
            )
        })
        .collect();
    master.push(pod_alloc(
        "172.16.241.69",
        "kube-system",
        "busybox-b8ffb94c4-c84gp",
        MASTER01,
    ));
    vec![
        block(MASTER01_BLOCK, MASTER01, master),
        block(
            NODE01_BLOCK,
            NODE01,
            vec![
                pod_alloc("172.16.196.129", "seed", "pod-129", NODE01),
                pod_alloc("172.16.196.131", "seed", "pod-131", NODE01),
            ],
        ),
    ]
}

fn seed_input(node: &str, ipip: EncapMode, blocks: Vec<BlockSpec>) -> PlanInput {
    let (addr, learned_routes) = if node == MASTER01 {
        (MASTER01_ADDR, vec![learned(NODE01_BLOCK, "192.168.92.129")])
    } else {
        (NODE01_ADDR, vec![learned(MASTER01_BLOCK, "192.168.92.128")])
    };
    PlanInput {
        local: local(node, addr),
        pools: vec![pool("default-ipv4-ippool", "172.16.0.0/16", ipip)],
        local_interfaces: interfaces_of(&blocks, node),
        vteps: Vec::new(),
        blocks,
        learned: learned_routes,
        nodes: nodes(),
    }
}

/// Every workload route leaves through the interface named after the pod at that IP.
fn assert_workload_names(input: &PlanInput, plan: &RoutePlan) {
    for route in plan.routes.iter().filter(|r| r.kind == RouteKind::Workload) {
        let alloc = input
            .blocks
            .iter()
            .flat_map(|b| &b.allocations)
            .find(|a| IpNet::from(a.ip) == route.prefix)
            .unwrap_or_else(|| panic!("workload route {route} has no allocation"));
        let want = workload_interface_name(
            alloc.namespace.as_deref().unwrap(),
            alloc.pod.as_deref().unwrap(),
        );
        assert_eq!(route.device.as_deref(), Some(want.as_str()), "{route}");
    }
}

#[test]
fn seed_001_tables() {
    let cases = [
        (
            "master01 Always",
            MASTER01,
            EncapMode::Always,
            seed_before(),
            SEED_MASTER01_ALWAYS,
        ),
        (
            "node01 Always",
            NODE01,
            EncapMode::Always,
            seed_before(),
            SEED_NODE01_ALWAYS,
        ),
        (
            "master01 CrossSubnet",
            MASTER01,
            EncapMode::CrossSubnet,
            seed_after(),
            SEED_MASTER01_CROSS_SUBNET,
        ),
        (
            "node01 CrossSubnet",
            NODE01,
            EncapMode::CrossSubnet,
            seed_after(),
            EXPECTED_NODE01_CROSS_SUBNET,
        ),
    ];
    for (name, node, mode, blocks, table) in cases {
        let input = seed_input(node, mode, blocks);
        let plan = plan(&input);
        assert_eq!(
            route_n(&plan),
            seed_rows(table),
            "{name}: {:#?}",
            plan.lines()
        );
        assert_workload_names(&input, &plan);
        assert!(plan.warnings.is_empty(), "{name}: {:?}", plan.warnings);
    }
}

#[test]
fn seed_001_exact_lines() {
    let plan = plan(&seed_input(MASTER01, EncapMode::Always, seed_before()));
    let lines = plan.lines();
    assert_eq!(
        lines[0],
        "172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink"
    );
    assert_eq!(lines[1], "blackhole 172.16.241.64/26");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("blackhole 192.168.241.64/26")
    );
    assert_eq!(plan.routes[0].kind, RouteKind::BlockIpip);

    let plan = super::plan(&seed_input(MASTER01, EncapMode::CrossSubnet, seed_after()));
    let lines = plan.lines();
    assert_eq!(lines[0], "172.16.196.128/26 via 192.168.92.129 dev ens33");
    assert_eq!(plan.routes[0].kind, RouteKind::BlockDirect);
    // The one pod whose name the seed reveals (kubectl get po -owide: busybox ... 172.16.241.69
    // master01) has exactly the seed's interface name.
    assert!(
        lines.contains(&"172.16.241.69 dev cali67beaa0e9f4 scope link".to_string()),
        "{lines:#?}"
    );
}

#[test]
fn cross_subnet_peer_in_another_subnet_uses_tunl0() {
    let mut input = seed_input(MASTER01, EncapMode::CrossSubnet, seed_after());
    input.learned.push(learned("172.16.10.0/26", "10.20.0.7"));
    let plan = plan(&input);
    let lines = plan.lines();
    assert!(
        lines.contains(&"172.16.10.0/26 via 10.20.0.7 dev tunl0 onlink".into()),
        "{lines:#?}"
    );
    assert!(lines.contains(&"172.16.196.128/26 via 192.168.92.129 dev ens33".into()));
    // A /25 local prefix would put .129 outside master01's subnet: tunnel again.
    input.local.ipv4 = Some("192.168.92.128/32".parse().unwrap());
    let lines = super::plan(&input).lines();
    assert!(lines.contains(&"172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink".into()));
}

#[test]
fn never_lets_the_kernel_resolve() {
    let plan = plan(&seed_input(MASTER01, EncapMode::Never, seed_after()));
    assert_eq!(
        plan.routes[0].to_string(),
        "172.16.196.128/26 via 192.168.92.129"
    );
    assert_eq!(plan.routes[0].kind, RouteKind::BlockNoEncap);
    assert_eq!(plan.routes[0].device, None);
    assert!(!plan.routes[0].onlink);
}

#[test]
fn workload_without_interface_or_pod_gets_no_route() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    let busybox = workload_interface_name("kube-system", "busybox-b8ffb94c4-c84gp");
    input.local_interfaces.remove(&busybox);
    // The IPIP tunnel address allocation has no pod.
    input.blocks[0].allocations.push(Allocation {
        ip: ip("172.16.241.64"),
        namespace: None,
        pod: None,
        node: Some(MASTER01.into()),
    });
    let plan = plan(&input);
    assert!(
        !plan
            .routes
            .iter()
            .any(|r| r.prefix == net("172.16.241.69/32"))
    );
    assert!(
        !plan
            .routes
            .iter()
            .any(|r| r.prefix == net("172.16.241.64/32"))
    );
    assert_eq!(
        plan.routes
            .iter()
            .filter(|r| r.kind == RouteKind::Workload)
            .count(),
        4
    );
}

#[test]
fn borrowed_ips() {
    let mut input = seed_input(MASTER01, EncapMode::CrossSubnet, seed_after());
    input.nodes.push(PeerNode {
        name: "node02".into(),
        ipv4: Some("10.20.0.7".parse().unwrap()),
        ipv6: None,
    });
    // node01 borrowed .80 of master01's block; node02 borrowed .90 of it.
    input.blocks[0]
        .allocations
        .push(pod_alloc("172.16.241.80", "ns", "on-node01", NODE01));
    input.blocks[0]
        .allocations
        .push(pod_alloc("172.16.241.90", "ns", "on-node02", "node02"));
    // master01 borrowed .140 of node01's block and runs that pod.
    input.blocks[1]
        .allocations
        .push(pod_alloc("172.16.196.140", "ns", "on-master01", MASTER01));
    input
        .local_interfaces
        .insert(workload_interface_name("ns", "on-master01"));
    // node02 borrowed .150 of node01's block.
    input.blocks[1]
        .allocations
        .push(pod_alloc("172.16.196.150", "ns", "b", "node02"));
    // A node nobody knows borrowed .160.
    input.blocks[1]
        .allocations
        .push(pod_alloc("172.16.196.160", "ns", "c", "ghost"));
    let plan = plan(&input);
    let lines = plan.lines();
    let want = [
        "172.16.241.80 via 192.168.92.129 dev ens33",
        "172.16.241.90 via 10.20.0.7 dev tunl0 onlink",
        "172.16.196.140 dev cali4ec7cf51f22 scope link",
        "172.16.196.150 via 10.20.0.7 dev tunl0 onlink",
    ];
    assert_eq!(
        workload_interface_name("ns", "on-master01"),
        "cali4ec7cf51f22"
    );
    for w in want {
        assert!(lines.contains(&w.to_string()), "missing {w}: {lines:#?}");
    }
    let kinds: BTreeMap<IpNet, RouteKind> =
        plan.routes.iter().map(|r| (r.prefix, r.kind)).collect();
    assert_eq!(kinds[&net("172.16.241.80/32")], RouteKind::BorrowedDirect);
    assert_eq!(kinds[&net("172.16.241.90/32")], RouteKind::BorrowedIpip);
    assert_eq!(kinds[&net("172.16.196.140/32")], RouteKind::Workload);
    assert!(!kinds.contains_key(&net("172.16.196.160/32")));
    assert_eq!(
        plan.warnings,
        vec![PlanWarning::BorrowedNodeUnknown {
            ip: ip("172.16.196.160"),
            node: "ghost".into()
        }]
    );
    // Never: the borrowed /32 is a plain via route.
    input.pools[0].ipip = EncapMode::Never;
    let plan = super::plan(&input);
    let r = plan
        .routes
        .iter()
        .find(|r| r.prefix == net("172.16.241.90/32"))
        .unwrap();
    assert_eq!(
        (r.kind, r.to_string().as_str()),
        (RouteKind::BorrowedNoEncap, "172.16.241.90 via 10.20.0.7")
    );
}

#[test]
fn block_changing_owner() {
    // node01's block moves to master01 while node01's BGP route is still learned.
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input.blocks[1].affinity = Some(MASTER01.into());
    let plan = plan(&input);
    let lines = plan.lines();
    assert!(
        lines.contains(&"blackhole 172.16.196.128/26".into()),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("172.16.196.128/26 via")),
        "{lines:#?}"
    );
    // Its pods still run on node01: each is now a borrowed /32 towards node01.
    assert!(lines.contains(&"172.16.196.129 via 192.168.92.129 dev tunl0 onlink".into()));
    assert!(lines.contains(&"172.16.196.131 via 192.168.92.129 dev tunl0 onlink".into()));

    // On node01 the block's blackhole disappears and master01's advertisement is used.
    let mut input = seed_input(NODE01, EncapMode::Always, seed_after());
    input.blocks[1].affinity = Some(MASTER01.into());
    input.blocks[1].allocations.clear();
    input.learned.push(learned(NODE01_BLOCK, "192.168.92.128"));
    let lines = super::plan(&input).lines();
    assert_eq!(
        lines,
        vec![
            "172.16.196.128/26 via 192.168.92.128 dev tunl0 onlink",
            "172.16.241.64/26 via 192.168.92.128 dev tunl0 onlink",
        ]
    );
}

#[test]
fn own_block_wins_over_learned_route_for_it() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input
        .learned
        .push(learned(MASTER01_BLOCK, "192.168.92.129"));
    let plan = plan(&input);
    let r = plan
        .routes
        .iter()
        .find(|r| r.prefix == net(MASTER01_BLOCK))
        .unwrap();
    assert!(r.is_blackhole(), "{r}");
}

#[test]
fn pools_removed_and_prefixes_outside_every_pool() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input.learned.push(learned("10.99.0.0/16", "192.168.92.1"));
    let plan = plan(&input);
    let ext = plan
        .routes
        .iter()
        .find(|r| r.prefix == net("10.99.0.0/16"))
        .unwrap();
    assert_eq!(
        (ext.kind, ext.to_string().as_str()),
        (RouteKind::External, "10.99.0.0/16 via 192.168.92.1")
    );

    input.pools.clear();
    let lines = super::plan(&input).lines();
    assert_eq!(lines[0], "10.99.0.0/16 via 192.168.92.1");
    assert_eq!(
        lines[1], "172.16.196.128/26 via 192.168.92.129",
        "no pool: plain via PEER"
    );
    assert_eq!(
        lines[2], "blackhole 172.16.241.64/26",
        "own blocks stay blackholed"
    );
}

#[test]
fn disabled_pool_still_routes_its_blocks() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input.pools[0].disabled = true;
    assert_eq!(
        plan(&input).lines()[0],
        "172.16.196.128/26 via 192.168.92.129 dev tunl0 onlink"
    );
}

#[test]
fn most_specific_pool_decides() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input
        .pools
        .push(pool("never-pool", "172.16.196.0/24", EncapMode::Never));
    assert_eq!(
        plan(&input).lines()[0],
        "172.16.196.128/26 via 192.168.92.129"
    );
}

#[test]
fn ipv6_pool_never() {
    let input = PlanInput {
        local: LocalNode {
            name: MASTER01.into(),
            ipv4: None,
            ipv6: Some("fd00:92::128/64".parse().unwrap()),
            nic: "ens33".into(),
        },
        pools: vec![pool(
            "default-ipv6-ippool",
            "fd00:10::/48",
            EncapMode::Never,
        )],
        blocks: vec![
            block(
                "fd00:10:0:1::/122",
                MASTER01,
                vec![pod_alloc("fd00:10:0:1::5", "ns", "p6", MASTER01)],
            ),
            block("fd00:10:0:2::/122", NODE01, vec![]),
        ],
        learned: vec![learned("fd00:10:0:2::/122", "fd00:92::129")],
        nodes: vec![],
        local_interfaces: [workload_interface_name("ns", "p6")].into(),
        vteps: Vec::new(),
    };
    let lines = plan(&input).lines();
    assert_eq!(
        lines,
        vec![
            "blackhole fd00:10:0:1::/122".to_string(),
            format!(
                "fd00:10:0:1::5 dev {} scope link",
                workload_interface_name("ns", "p6")
            ),
            "fd00:10:0:2::/122 via fd00:92::129".to_string(),
        ]
    );
}

#[test]
fn ipip_on_ipv6_pool_is_routed_as_never_with_a_warning() {
    let mut input = PlanInput {
        local: LocalNode {
            name: "n".into(),
            ipv4: None,
            ipv6: Some("fd00::1/64".parse().unwrap()),
            nic: "eth0".into(),
        },
        pools: vec![pool("v6", "fd00:10::/48", EncapMode::Always)],
        blocks: vec![],
        learned: vec![learned("fd00:10::/122", "fd00::2")],
        nodes: vec![],
        local_interfaces: BTreeSet::new(),
        vteps: Vec::new(),
    };
    let plan1 = plan(&input);
    assert_eq!(plan1.lines(), vec!["fd00:10::/122 via fd00::2"]);
    assert_eq!(
        plan1.warnings,
        vec![PlanWarning::IpipOnIpv6Pool { pool: "v6".into() }]
    );
    // A v4 next hop for a v6 prefix is refused.
    input.learned = vec![learned("fd00:10::/122", "192.168.92.1")];
    let plan2 = plan(&input);
    assert!(plan2.routes.is_empty());
    assert!(matches!(
        plan2.warnings[0],
        PlanWarning::NextHopFamilyMismatch { .. }
    ));
}

/// Seed 000's three-node VXLAN cluster (flannel there; the same shapes under Calico's
/// device name): master 192.168.0.39 owns 10.244.0.0/24, node1 192.168.0.22 owns
/// 10.244.1.0/24, node2 192.168.0.8 owns 10.244.2.0/24; each VTEP's address is the first of
/// its block, with the MACs the seed's `arp -n` and `bridge fdb` show.
fn seed000_input(me: &str, vxlan: EncapMode) -> PlanInput {
    let nodes = [
        ("master", "192.168.0.39", "10.244.0.0", "fe:be:87:93:06:e2"),
        ("node1", "192.168.0.22", "10.244.1.0", "0e:61:06:ff:7a:73"),
        ("node2", "192.168.0.8", "10.244.2.0", "0a:72:bf:3f:cd:40"),
    ];
    let (_, my_addr, _, _) = nodes.iter().find(|n| n.0 == me).unwrap();
    let mut p = pool("vxlan-pool", "10.244.0.0/16", EncapMode::Never);
    p.vxlan = vxlan;
    PlanInput {
        local: local(me, &format!("{my_addr}/24")),
        pools: vec![p],
        blocks: nodes
            .iter()
            .map(|(n, _, vtep, _)| block(&format!("{vtep}/24"), n, vec![]))
            .collect(),
        learned: vec![],
        nodes: nodes
            .iter()
            .map(|(n, addr, _, _)| PeerNode {
                name: (*n).into(),
                ipv4: Some(addr.parse().unwrap()),
                ipv6: None,
            })
            .collect(),
        local_interfaces: BTreeSet::new(),
        vteps: nodes
            .iter()
            .map(|(n, _, vtep, mac)| Vtep {
                node: (*n).into(),
                tunnel_ip: ip(vtep),
                mac: mac.parse().unwrap(),
            })
            .collect(),
    }
}

#[test]
fn vxlan_always_routes_every_remote_block_through_its_vtep_as_seed_000_shows() {
    // Seed 000, master's `route -n` (flannel.1 there, vxlan.calico here).
    let p = plan(&seed000_input("master", EncapMode::Always));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(
        p.lines(),
        [
            "blackhole 10.244.0.0/24",
            "10.244.1.0/24 via 10.244.1.0 dev vxlan.calico onlink",
            "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink",
        ]
    );
    assert!(
        p.routes[1..]
            .iter()
            .all(|r| r.kind == RouteKind::BlockVxlan)
    );
    // Node1's table in the seed.
    let p = plan(&seed000_input("node1", EncapMode::Always));
    assert_eq!(
        p.lines(),
        [
            "10.244.0.0/24 via 10.244.0.0 dev vxlan.calico onlink",
            "blackhole 10.244.1.0/24",
            "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink",
        ]
    );
}

#[test]
fn vxlan_devices_and_vteps_match_seed_000s_arp_and_fdb_tables() {
    let input = seed000_input("master", EncapMode::Always);
    let (devices, peers) = tunnels::vxlan_plan(&input);
    assert_eq!(
        devices,
        [tunnels::VxlanDevice {
            name: "vxlan.calico".into(),
            vni: 4096,
            port: 4789,
            mac: "fe:be:87:93:06:e2".parse().unwrap(),
            local: ip("192.168.0.39"),
            parent: "ens33".into(),
            mtu: None,
            address: Some(net("10.244.0.0/32")),
        }]
    );
    // `arp -n`: 10.244.1.0 ether 0e:61:06:ff:7a:73 ... flannel.1 ; `bridge fdb`:
    // 0e:61:06:ff:7a:73 dev flannel.1 dst 192.168.0.22 self permanent.
    let rows: Vec<String> = peers
        .iter()
        .map(|p| {
            format!(
                "{} {} {} dst {} ({})",
                p.device, p.tunnel_ip, p.mac, p.underlay, p.node
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            "vxlan.calico 10.244.1.0 0e:61:06:ff:7a:73 dst 192.168.0.22 (node1)",
            "vxlan.calico 10.244.2.0 0a:72:bf:3f:cd:40 dst 192.168.0.8 (node2)",
        ]
    );
    // No VXLAN pool, no device and no VTEP.
    let none = seed000_input("master", EncapMode::Never);
    assert_eq!(tunnels::vxlan_plan(&none), (vec![], vec![]));
}

#[test]
fn vxlan_cross_subnet_routes_same_subnet_owners_directly() {
    let mut input = seed000_input("master", EncapMode::CrossSubnet);
    // node2 moves to another subnet.
    input.nodes[2].ipv4 = Some("192.168.1.8".parse().unwrap());
    let p = plan(&input);
    assert_eq!(
        p.lines(),
        [
            "blackhole 10.244.0.0/24",
            "10.244.1.0/24 via 192.168.0.22 dev ens33",
            "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink",
        ]
    );
    assert_eq!(p.routes[1].kind, RouteKind::BlockDirect);
    // Felix programs every VTEP, the same-subnet one too.
    let (_, peers) = tunnels::vxlan_plan(&input);
    assert_eq!(peers.len(), 2);
}

#[test]
fn vxlan_routes_come_from_the_datastore_not_from_bgp() {
    // No learned route at all (every BGP session down): the routes stand.
    let input = seed000_input("master", EncapMode::Always);
    let without_bgp = plan(&input);
    // A learned route for a VXLAN block (even with another next hop) changes nothing, and
    // one inside the pool that no block has is not routed either.
    let mut with_bgp = input.clone();
    with_bgp.learned = vec![
        learned("10.244.1.0/24", "192.168.0.22"),
        learned("10.244.9.0/24", "192.168.0.8"),
    ];
    assert_eq!(plan(&with_bgp), without_bgp);
    let planner = Planner::new(&input);
    let mut w = BTreeSet::new();
    assert_eq!(
        planner
            .route_for(net("10.244.1.0/24"), None, &mut w)
            .map(|r| r.to_string()),
        Some("10.244.1.0/24 via 10.244.1.0 dev vxlan.calico onlink".into()),
        "a BGP withdraw does not remove it"
    );
    assert_eq!(
        planner.route_for(net("10.244.9.0/24"), Some(ip("192.168.0.8")), &mut w),
        None
    );
    // The owner's address changes in the datastore: the FDB entry follows, the route's VTEP
    // gateway stays.
    let mut moved = input.clone();
    moved.nodes[1].ipv4 = Some("192.168.0.99".parse().unwrap());
    let (_, peers) = tunnels::vxlan_plan(&moved);
    assert_eq!(peers[0].underlay, ip("192.168.0.99"));
}

#[test]
fn vxlan_block_of_a_node_without_vtep_is_left_out_and_said_so() {
    let mut input = seed000_input("master", EncapMode::Always);
    input.vteps.retain(|v| v.node != "node2");
    let p = plan(&input);
    assert!(
        !p.lines().iter().any(|l| l.starts_with("10.244.2.0")),
        "{:?}",
        p.lines()
    );
    assert_eq!(
        p.warnings,
        [PlanWarning::VxlanNoVtep {
            pool: "vxlan-pool".into(),
            prefix: net("10.244.2.0/24"),
            node: "node2".into(),
        }]
    );
    // The owner's address unknown: no route either, and a warning naming the node.
    let mut input = seed000_input("master", EncapMode::Always);
    input.nodes.retain(|n| n.name != "node1");
    let p = plan(&input);
    assert!(p.warnings.contains(&PlanWarning::BlockNodeUnknown {
        block: net("10.244.1.0/24"),
        node: "node1".into()
    }));
}

#[test]
fn vxlan_borrowed_ips_get_a_32_through_the_users_vtep() {
    let mut input = seed000_input("master", EncapMode::Always);
    // node2 uses 10.244.1.7 of node1's block; master's own 10.244.0.9 is used on node1.
    input.blocks[1]
        .allocations
        .push(pod_alloc("10.244.1.7", "ns", "borrower", "node2"));
    input.blocks[0]
        .allocations
        .push(pod_alloc("10.244.0.9", "ns", "lent", "node1"));
    let p = plan(&input);
    assert_eq!(
        p.lines(),
        [
            "blackhole 10.244.0.0/24",
            "10.244.0.9 via 10.244.1.0 dev vxlan.calico onlink",
            "10.244.1.0/24 via 10.244.1.0 dev vxlan.calico onlink",
            "10.244.1.7 via 10.244.2.0 dev vxlan.calico onlink",
            "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink",
        ]
    );
    assert_eq!(p.routes[1].kind, RouteKind::BorrowedVxlan);
    assert_eq!(p.routes[3].kind, RouteKind::BorrowedVxlan);
}

#[test]
fn ipip_vxlan_and_unencapsulated_pools_coexist() {
    let mut input = seed000_input("master", EncapMode::Always);
    input
        .pools
        .push(pool("ipip-pool", "172.16.0.0/16", EncapMode::Always));
    input
        .pools
        .push(pool("plain-pool", "10.10.0.0/16", EncapMode::Never));
    input.blocks.push(block("172.16.1.0/26", "node1", vec![]));
    input.blocks.push(block("10.10.2.0/26", "node2", vec![]));
    input.learned = vec![
        learned("172.16.1.0/26", "192.168.0.22"),
        learned("10.10.2.0/26", "192.168.0.8"),
    ];
    let p = plan(&input);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let kinds: Vec<(String, RouteKind)> =
        p.routes.iter().map(|r| (r.to_string(), r.kind)).collect();
    assert_eq!(
        kinds,
        [
            (
                "10.10.2.0/26 via 192.168.0.8".to_string(),
                RouteKind::BlockNoEncap
            ),
            ("blackhole 10.244.0.0/24".into(), RouteKind::Blackhole),
            (
                "10.244.1.0/24 via 10.244.1.0 dev vxlan.calico onlink".into(),
                RouteKind::BlockVxlan
            ),
            (
                "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico onlink".into(),
                RouteKind::BlockVxlan
            ),
            (
                "172.16.1.0/26 via 192.168.0.22 dev tunl0 onlink".into(),
                RouteKind::BlockIpip
            ),
        ]
    );
    // Switching the VXLAN pool to IPIP gives the same prefixes another route each (the
    // dataplane replaces them in place); back to VXLAN, the VXLAN routes return.
    let mut switched = input.clone();
    switched.pools[0].vxlan = EncapMode::Never;
    switched.pools[0].ipip = EncapMode::Always;
    switched
        .learned
        .push(learned("10.244.1.0/24", "192.168.0.22"));
    switched
        .learned
        .push(learned("10.244.2.0/24", "192.168.0.8"));
    let q = plan(&switched);
    let prefixes = |p: &RoutePlan| p.routes.iter().map(|r| r.prefix).collect::<Vec<_>>();
    assert_eq!(prefixes(&q), prefixes(&p));
    assert!(
        q.lines()
            .contains(&"10.244.1.0/24 via 192.168.0.22 dev tunl0 onlink".to_string())
    );
    assert_eq!(tunnels::vxlan_plan(&switched), (vec![], vec![]));

    input.pools[0].ipip = EncapMode::Always;
    let both = plan(&input);
    assert!(
        !both
            .lines()
            .iter()
            .any(|l| l.starts_with("10.244.1.0") || l.starts_with("10.244.2.0"))
    );
    assert!(both.warnings.contains(&PlanWarning::BothEncapsulations {
        pool: "vxlan-pool".into()
    }));
}

#[test]
fn ipv6_vxlan_uses_vxlan_v6_calico() {
    let mut input = dual_stack_input(MASTER01, EncapMode::Always);
    input.vteps = vec![
        Vtep {
            node: MASTER01.into(),
            tunnel_ip: ip("fd00:10:0:a::3"),
            mac: "66:00:00:00:00:01".parse().unwrap(),
        },
        Vtep {
            node: NODE01.into(),
            tunnel_ip: ip("fd00:10:0:b::3"),
            mac: "66:00:00:00:00:02".parse().unwrap(),
        },
    ];
    let p = plan(&input);
    let v6: Vec<String> = p
        .lines()
        .into_iter()
        .filter(|l| l.contains("fd00:10"))
        .collect();
    let cali = workload_interface_name("seed", "pod6-m");
    assert_eq!(
        v6,
        [
            "blackhole fd00:10:0:a::/122".to_string(),
            format!("fd00:10:0:a::1 dev {cali} scope link"),
            "fd00:10:0:a::2 via fd00:10:0:b::3 dev vxlan-v6.calico onlink".into(),
            "fd00:10:0:b::/122 via fd00:10:0:b::3 dev vxlan-v6.calico onlink".into(),
        ]
    );
    let (devices, peers) = tunnels::vxlan_plan(&input);
    assert_eq!(devices.len(), 1, "the IPv4 pool is IPIP: no vxlan.calico");
    assert_eq!(devices[0].name, "vxlan-v6.calico");
    assert_eq!(devices[0].local, ip("fd00:92::128"));
    assert_eq!(devices[0].address, Some(net("fd00:10:0:a::3/128")));
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].underlay, ip("fd00:92::129"));
    assert_eq!(peers[0].device, "vxlan-v6.calico");
}
#[test]
fn learned_route_to_self_is_ignored() {
    let mut input = seed_input(MASTER01, EncapMode::Always, seed_after());
    input
        .learned
        .push(learned("172.16.50.0/26", "192.168.92.128"));
    let plan = plan(&input);
    assert!(
        !plan
            .routes
            .iter()
            .any(|r| r.prefix == net("172.16.50.0/26"))
    );
    assert_eq!(
        plan.warnings,
        vec![PlanWarning::NextHopIsSelf {
            prefix: net("172.16.50.0/26")
        }]
    );
}

#[test]
fn output_is_sorted_unique_and_independent_of_input_order() {
    let input = seed_input(MASTER01, EncapMode::Always, seed_before());
    let mut reversed = input.clone();
    reversed.blocks.reverse();
    for b in &mut reversed.blocks {
        b.allocations.reverse();
    }
    reversed.learned.push(reversed.learned[0].clone());
    let a = plan(&input);
    assert_eq!(a, plan(&reversed));
    let prefixes: Vec<IpNet> = a.routes.iter().map(|r| r.prefix).collect();
    let mut sorted = prefixes.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(prefixes, sorted);
}

#[test]
fn tunnel_address_rule() {
    let input = seed_input(MASTER01, EncapMode::Always, seed_before());
    // Lowest own block in an IPIP pool: 172.16.241.64/26 (the stale 192.168.241.64/26 is in
    // no pool).
    assert_eq!(
        tunnel_address(&input, None),
        Some("172.16.241.64".parse().unwrap())
    );
    let annotated = "172.16.241.70".parse().unwrap();
    assert_eq!(tunnel_address(&input, Some(annotated)), Some(annotated));
    let mut none = input.clone();
    none.blocks
        .retain(|b| b.affinity.as_deref() != Some(MASTER01));
    assert_eq!(tunnel_address(&none, None), None);
}

#[test]
fn encap_mode_parses_calico_spelling() {
    assert_eq!(EncapMode::parse(""), Some(EncapMode::Never));
    assert_eq!(
        EncapMode::parse("CrossSubnet"),
        Some(EncapMode::CrossSubnet)
    );
    assert_eq!(EncapMode::parse("Always"), Some(EncapMode::Always));
    assert_eq!(EncapMode::parse("always"), None);
}

/// Incremental planning: random cluster inputs (pools of every mode, blocks of several owners
/// with workloads and borrowed IPs, IPv6) and random sequences of best-path changes. After
/// each change, the table kept by applying `route_for` to the changed prefix equals the full
/// plan of the new learned set, and so does `Planner::routes`.
mod incremental {
    use super::*;
    use proptest::prelude::*;

    const PREFIXES: [&str; 12] = [
        "172.16.0.0/26",
        "172.16.0.64/26",
        "172.16.16.0/26",
        "172.16.0.2/32",
        "172.16.0.66/32",
        "172.16.16.5/32",
        "192.0.2.0/26",
        "198.51.100.0/24",
        "10.0.0.0/24",
        "fd10::/122",
        "fd10::2/128",
        "fd99::/64",
    ];
    const NEXT_HOPS: [&str; 6] = [
        "10.0.0.2", // n1, local subnet
        "10.1.0.2", // n2, another subnet
        "10.0.0.1", // this node
        "10.0.0.9", // no node
        "fd00::2",  // IPv6 in the local subnet
        "fd01::2",  // IPv6 elsewhere
    ];
    const BLOCKS: [&str; 5] = [
        "172.16.0.0/26",
        "172.16.0.64/26",
        "172.16.16.0/26",
        "192.0.2.0/26",
        "fd10::/122",
    ];
    const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];
    const MODES: [EncapMode; 3] = [EncapMode::Never, EncapMode::Always, EncapMode::CrossSubnet];

    fn mode() -> impl Strategy<Value = EncapMode> {
        (0..MODES.len()).prop_map(|i| MODES[i])
    }

    fn pools() -> impl Strategy<Value = Vec<PoolSpec>> {
        let cidrs = ["172.16.0.0/16", "172.16.0.0/20", "fd10::/48"];
        proptest::collection::vec((0..cidrs.len(), mode(), mode(), any::<bool>()), 0..4).prop_map(
            move |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (c, ipip, vxlan, disabled))| PoolSpec {
                        name: format!("pool-{i}"),
                        cidr: net(cidrs[c]),
                        ipip,
                        vxlan,
                        disabled,
                    })
                    .collect()
            },
        )
    }

    /// Allocations: offset inside the block (or just outside it), node, has a pod name.
    fn blocks() -> impl Strategy<Value = Vec<BlockSpec>> {
        let alloc = (0u32..4, proptest::option::of(0..NODES.len()), any::<bool>());
        let block = (
            0..BLOCKS.len(),
            proptest::option::of(0..NODES.len()),
            proptest::collection::vec(alloc, 0..4),
        );
        proptest::collection::vec(block, 0..6).prop_map(|blocks| {
            blocks
                .into_iter()
                .map(|(b, affinity, allocs)| {
                    let cidr = net(BLOCKS[b]);
                    let allocations = allocs
                        .into_iter()
                        .enumerate()
                        .map(|(i, (offset, node, named))| {
                            // Offset 3 lands outside the block.
                            let host = if offset == 3 { 64 } else { offset + 1 };
                            let ip = match cidr.addr() {
                                IpAddr::V4(a) => IpAddr::V4((u32::from(a) + host).into()),
                                IpAddr::V6(a) => {
                                    IpAddr::V6((u128::from(a) + u128::from(host)).into())
                                }
                            };
                            Allocation {
                                ip,
                                namespace: named.then(|| "ns".to_string()),
                                pod: named.then(|| format!("pod-{b}-{i}")),
                                node: node.map(|n| NODES[n].to_string()),
                            }
                        })
                        .collect();
                    BlockSpec {
                        cidr,
                        affinity: affinity.map(|n| NODES[n].to_string()),
                        allocations,
                    }
                })
                .collect()
        })
    }

    fn input(pools: Vec<PoolSpec>, blocks: Vec<BlockSpec>) -> PlanInput {
        let mut interfaces = interfaces_of(&blocks, "n0");
        // One pod whose interface is missing.
        interfaces.remove(&workload_interface_name("ns", "pod-0-0"));
        PlanInput {
            local: LocalNode {
                name: "n0".into(),
                ipv4: Some("10.0.0.1/24".parse().unwrap()),
                ipv6: Some("fd00::1/64".parse().unwrap()),
                nic: "eth0".into(),
            },
            pools,
            blocks,
            learned: Vec::new(),
            nodes: vec![
                PeerNode {
                    name: "n1".into(),
                    ipv4: Some("10.0.0.2".parse().unwrap()),
                    ipv6: Some("fd00::2".parse().unwrap()),
                },
                PeerNode {
                    name: "n2".into(),
                    ipv4: Some("10.1.0.2".parse().unwrap()),
                    ipv6: None,
                },
                PeerNode {
                    name: "n3".into(),
                    ipv4: None,
                    ipv6: None,
                },
            ],
            local_interfaces: interfaces,
            vteps: Vec::new(),
        }
    }

    fn changes() -> impl Strategy<Value = Vec<(usize, Option<usize>)>> {
        proptest::collection::vec(
            (0..PREFIXES.len(), proptest::option::of(0..NEXT_HOPS.len())),
            1..40,
        )
    }

    fn learned_of(map: &BTreeMap<IpNet, IpAddr>) -> Vec<LearnedRoute> {
        map.iter()
            .map(|(prefix, next_hop)| LearnedRoute {
                prefix: *prefix,
                next_hop: *next_hop,
            })
            .collect()
    }

    proptest! {
        #[test]
        fn route_for_each_change_equals_the_full_plan(
            pools in pools(),
            blocks in blocks(),
            changes in changes(),
        ) {
            let mut input = input(pools, blocks);
            let planner = Planner::new(&input);
            let mut learned: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
            let mut table: BTreeMap<IpNet, DesiredRoute> = plan(&input)
                .routes
                .into_iter()
                .map(|r| (r.prefix, r))
                .collect();
            for (p, nh) in changes {
                let prefix = net(PREFIXES[p]);
                match nh {
                    Some(i) => learned.insert(prefix, ip(NEXT_HOPS[i])),
                    None => learned.remove(&prefix),
                };
                let mut warnings = BTreeSet::new();
                match planner.route_for(prefix, learned.get(&prefix).copied(), &mut warnings) {
                    Some(route) => {
                        prop_assert_eq!(route.prefix, prefix);
                        table.insert(prefix, route);
                    }
                    None => {
                        table.remove(&prefix);
                    }
                }
                input.learned = learned_of(&learned);
                let full = plan(&input);
                let incremental: Vec<DesiredRoute> = table.values().cloned().collect();
                prop_assert_eq!(&incremental, &full.routes);
                for w in &warnings {
                    prop_assert!(full.warnings.contains(w), "{} not in the full plan", w);
                }
                let mut streamed_warnings = planner.warnings().clone();
                let streamed: Vec<DesiredRoute> = planner
                    .routes(learned.iter().map(|(p, nh)| (*p, *nh)), &mut streamed_warnings)
                    .collect();
                prop_assert_eq!(&streamed, &full.routes);
                prop_assert_eq!(
                    streamed_warnings.into_iter().collect::<Vec<_>>(),
                    full.warnings
                );
            }
        }

        /// A change of the blocks only (pods, affinities) under the same pools: the
        /// prefixes `changed_since` names, planned again with `route_for`, turn the old
        /// plan into the new one.
        #[test]
        fn block_changes_as_a_delta_equal_the_full_plan(
            pools in pools(),
            before in blocks(),
            after in blocks(),
            changes in changes(),
        ) {
            let mut learned: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
            for (p, nh) in changes {
                if let Some(i) = nh {
                    learned.insert(net(PREFIXES[p]), ip(NEXT_HOPS[i]));
                }
            }
            let mut old_input = input(pools.clone(), before);
            old_input.learned = learned_of(&learned);
            let mut new_input = input(pools, after);
            new_input.learned = learned_of(&learned);
            let old = Planner::new(&old_input);
            let new = Planner::new(&new_input);
            let changed = new.changed_since(&old);
            prop_assert!(changed.is_some(), "same pools and local node: a delta");
            let mut table: BTreeMap<IpNet, DesiredRoute> = old
                .plan(&old_input.learned)
                .routes
                .into_iter()
                .map(|r| (r.prefix, r))
                .collect();
            for prefix in changed.unwrap_or_default() {
                let mut warnings = BTreeSet::new();
                match new.route_for(prefix, learned.get(&prefix).copied(), &mut warnings) {
                    Some(route) => table.insert(prefix, route),
                    None => table.remove(&prefix),
                };
            }
            let incremental: Vec<DesiredRoute> = table.into_values().collect();
            prop_assert_eq!(incremental, new.plan(&new_input.learned).routes);
        }
    }
}

#[test]
fn a_change_of_pools_or_originated_prefixes_needs_the_full_plan() {
    let input = seed_input(MASTER01, EncapMode::Always, seed_before());
    let planner = Planner::new(&input);
    assert_eq!(planner.changed_since(&planner), Some(Vec::new()));
    let cross = Planner::new(&seed_input(MASTER01, EncapMode::CrossSubnet, seed_before()));
    assert_eq!(cross.changed_since(&planner), None, "the rules changed");
    let services = planner.clone().originating([net("10.96.0.0/12")]);
    assert_eq!(
        services.changed_since(&planner),
        None,
        "originated prefixes changed"
    );
    // One pod fewer: its /32 alone.
    let mut fewer = input.clone();
    let gone = fewer
        .blocks
        .iter_mut()
        .find(|b| b.affinity.as_deref() == Some(MASTER01))
        .and_then(|b| b.allocations.pop())
        .expect("master01 has a pod");
    assert_eq!(
        Planner::new(&fewer).changed_since(&planner),
        Some(vec![IpNet::from(gone.ip)])
    );
}

/// A dual-stack seed 001: both nodes also have an IPv6 address in fd00:92::/64, and a
/// second pool fd00:10::/48 (blocks /122, Calico's default) sits beside the IPv4 pool. The
/// IPv4 rows stay seed 001's; the IPv6 rows follow the same rules: own block blackholed,
/// local pods /128 on their cali interface, remote blocks via the peer's global IPv6
/// address (learned over the IPv6 session), a borrowed /128 via the node that uses it.
fn dual_stack_input(node: &str, v6_vxlan: EncapMode) -> PlanInput {
    let mut input = seed_input(node, EncapMode::CrossSubnet, seed_after());
    let (me, peer) = if node == MASTER01 {
        ("fd00:92::128/64", "fd00:92::129")
    } else {
        ("fd00:92::129/64", "fd00:92::128")
    };
    input.local.ipv6 = Some(me.parse().unwrap());
    let mut v6_pool = pool("default-ipv6-ippool", "fd00:10::/48", EncapMode::Never);
    v6_pool.vxlan = v6_vxlan;
    input.pools.push(v6_pool);
    input.nodes[0].ipv6 = Some("fd00:92::128".parse().unwrap());
    input.nodes[1].ipv6 = Some("fd00:92::129".parse().unwrap());
    input.blocks.extend([
        block(
            "fd00:10:0:a::/122",
            MASTER01,
            vec![
                pod_alloc("fd00:10:0:a::1", "seed", "pod6-m", MASTER01),
                // Borrowed: master01's block, used on node01.
                pod_alloc("fd00:10:0:a::2", "seed", "pod6-borrowed", NODE01),
            ],
        ),
        block(
            "fd00:10:0:b::/122",
            NODE01,
            vec![pod_alloc("fd00:10:0:b::1", "seed", "pod6-n", NODE01)],
        ),
    ]);
    let remote6 = if node == MASTER01 {
        "fd00:10:0:b::/122"
    } else {
        "fd00:10:0:a::/122"
    };
    input.learned.push(learned(remote6, peer));
    input.local_interfaces = interfaces_of(&input.blocks, node);
    input
}

#[test]
fn dual_stack_tables_ipv6_blocks_blackholes_workloads_and_borrowed_128s() {
    let cali = |pod: &str| workload_interface_name("seed", pod);
    let master = dual_stack_input(MASTER01, EncapMode::Never);
    let plan_m = plan(&master);
    assert!(plan_m.warnings.is_empty(), "{:?}", plan_m.warnings);
    let v6: Vec<String> = plan_m
        .lines()
        .into_iter()
        .filter(|l| l.contains("fd00"))
        .collect();
    assert_eq!(
        v6,
        vec![
            "blackhole fd00:10:0:a::/122".to_string(),
            format!("fd00:10:0:a::1 dev {} scope link", cali("pod6-m")),
            "fd00:10:0:a::2 via fd00:92::129".to_string(),
            "fd00:10:0:b::/122 via fd00:92::129".to_string(),
        ]
    );
    // The IPv4 rows are seed 001's CrossSubnet table, untouched by the IPv6 pool.
    assert_eq!(v4_rows(&plan_m), seed_rows(SEED_MASTER01_CROSS_SUBNET));

    let node = dual_stack_input(NODE01, EncapMode::Never);
    let plan_n = plan(&node);
    let v6: Vec<String> = plan_n
        .lines()
        .into_iter()
        .filter(|l| l.contains("fd00"))
        .collect();
    assert_eq!(
        v6,
        vec![
            "fd00:10:0:a::/122 via fd00:92::128".to_string(),
            format!("fd00:10:0:a::2 dev {} scope link", cali("pod6-borrowed")),
            "blackhole fd00:10:0:b::/122".to_string(),
            format!("fd00:10:0:b::1 dev {} scope link", cali("pod6-n")),
        ]
    );
}

#[test]
fn ipv6_cross_subnet_is_decided_by_the_nodes_ipv6_prefix() {
    // vxlanMode CrossSubnet on the IPv6 pool: the peer in fd00:92::/64 is reached directly
    // out of the NIC.
    let mut input = dual_stack_input(MASTER01, EncapMode::CrossSubnet);
    let p = plan(&input);
    assert!(
        p.lines()
            .contains(&"fd00:10:0:b::/122 via fd00:92::129 dev ens33".to_string()),
        "{:?}",
        p.lines()
    );
    let route = p
        .routes
        .iter()
        .find(|r| r.prefix == net("fd00:10:0:b::/122"))
        .unwrap();
    assert_eq!(route.kind, RouteKind::BlockDirect);
    // With a /128 node address no peer shares the subnet: the route goes through the
    // peer's VTEP; without one it is left out and said so.
    input.local.ipv6 = Some("fd00:92::128/128".parse().unwrap());
    let p = plan(&input);
    assert!(
        p.routes
            .iter()
            .all(|r| r.prefix != net("fd00:10:0:b::/122")),
        "{:?}",
        p.lines()
    );
    assert!(
        p.warnings
            .iter()
            .any(|w| matches!(w, PlanWarning::VxlanNoVtep { .. })),
        "{:?}",
        p.warnings
    );
    input.vteps.push(Vtep {
        node: NODE01.into(),
        tunnel_ip: ip("fd00:10:0:b::3"),
        mac: "66:00:00:00:00:02".parse().unwrap(),
    });
    assert!(
        plan(&input).lines().contains(
            &"fd00:10:0:b::/122 via fd00:10:0:b::3 dev vxlan-v6.calico onlink".to_string()
        )
    );
    // The IPv4 CrossSubnet decision still uses the IPv4 prefix.
    assert!(
        p.lines()
            .contains(&"172.16.196.128/26 via 192.168.92.129 dev ens33".to_string())
    );
}

/// The IPv4 part of a plan as `route -n` rows.
fn v4_rows(plan: &RoutePlan) -> Vec<RouteNRow> {
    route_n(&RoutePlan {
        routes: plan
            .routes
            .iter()
            .filter(|r| r.prefix.addr().is_ipv4())
            .cloned()
            .collect(),
        warnings: Vec::new(),
    })
}
