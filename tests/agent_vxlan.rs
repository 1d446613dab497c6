//! End-to-end VXLAN: three real agents (`podroute agent`, YAML-directory datastore) in the
//! lab cluster with `vxlanMode`: master01 and node01 on 192.168.92.0/24, node02 on
//! 192.168.93.0/24 behind a router. Routes come from the datastore, so they stay while
//! every BGP session is down; they follow a Node's address change; a pool switched between
//! VXLAN and IPIP never leaves a block without a route.

#[allow(dead_code)]
mod agent_guard;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agent_guard::tool_works;
use podroute::lab::{ClusterSpec, Lab, LabConfig, WaitError, wait_until};
use podroute::plan::EncapMode;

const CONVERGE: Duration = Duration::from_secs(45);
const CHANGE: Duration = Duration::from_secs(20);
const MASTER01: &str = "master01";
const NODE01: &str = "node01";
const NODE02: &str = "node02";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn can_run(test: &str) -> bool {
    let why = if !podroute::lab::is_root() {
        "not running as root"
    } else if !tool_works("ip", "-V") {
        "iproute2 `ip` is missing"
    } else if !tool_works("ping", "-V") {
        "`ping` is missing (install iputils-ping)"
    } else if !tool_works("bridge", "-V") {
        "`bridge` (iproute2) is missing"
    } else {
        return true;
    };
    agent_guard::cannot_run(
        "end-to-end",
        test,
        why,
        "These tests need root, iproute2 and ping.",
    );
    false
}

fn vxlan_lab(tag: &str, mode: EncapMode) -> Lab {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("vx{}{n}-{tag}", std::process::id());
    let cfg = LabConfig::new(prefix, env!("CARGO_BIN_EXE_podroute"));
    let mut lab = Lab::build(cfg, ClusterSpec::seed_vxlan(mode)).expect("build the lab");
    lab.start_agents().expect("start the agents");
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    lab
}

fn logs(lab: &Lab) -> String {
    lab.spec
        .nodes
        .iter()
        .map(|n| format!("--- {}:\n{}", n.name, lab.log_tail(&n.name, 30)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn pod(lab: &Lab, node: &str) -> (String, std::net::Ipv4Addr) {
    let p = &lab.spec.node(node).unwrap().pods[0];
    (p.name.clone(), p.ip)
}

fn assert_all_pods_ping(lab: &Lab) {
    for from in [MASTER01, NODE01, NODE02] {
        for to in [MASTER01, NODE01, NODE02]
            .into_iter()
            .filter(|t| *t != from)
        {
            let (name, _) = pod(lab, from);
            let (_, ip) = pod(lab, to);
            let (ok, out) = lab.ping(&name, ip).unwrap();
            assert!(
                ok,
                "pod on {from} -> pod on {to} ({ip}):\n{out}\n{}",
                logs(lab)
            );
        }
    }
}

/// `bridge fdb show dev vxlan.calico` of `node`, the entries with a destination.
fn fdb(lab: &Lab, node: &str) -> BTreeSet<String> {
    let (ok, out) = podroute::lab::exec(
        &lab.node_ns(node),
        "bridge",
        &["fdb", "show", "dev", "vxlan.calico"],
    )
    .unwrap();
    assert!(ok, "bridge fdb: {out}");
    out.lines()
        .map(str::trim)
        .filter(|l| l.contains(" dst "))
        .map(String::from)
        .collect()
}

fn established(lab: &Lab, node: &str) -> usize {
    lab.node_status(node)
        .map(|s| s.peers.iter().filter(|p| p.state == "Established").count())
        .unwrap_or(usize::MAX)
}

#[test]
fn vxlan_routes_from_the_datastore_survive_a_bgp_outage_and_follow_a_node_address() {
    const TEST: &str =
        "vxlan_routes_from_the_datastore_survive_a_bgp_outage_and_follow_a_node_address";
    if !can_run(TEST) {
        return;
    }
    let mut lab = vxlan_lab("out", EncapMode::Always);
    assert_all_pods_ping(&lab);
    // `podroute routes` and the metrics show the VTEPs and their entries.
    let report = lab.routes(MASTER01).unwrap();
    let vx = report.vxlan.expect("a VXLAN section in podroute routes");
    assert_eq!(vx.vteps.len(), 2, "{vx:?}");
    assert_eq!(
        (vx.neighbours_programmed, vx.fdb_programmed),
        (2, 2),
        "{vx:?}"
    );
    assert!(vx.devices[0].error.is_none(), "{vx:?}");
    assert_eq!(
        report
            .routes
            .iter()
            .filter(|r| r.kind == "block-vxlan")
            .count(),
        2
    );
    let metrics = lab.metrics(MASTER01).unwrap();
    for want in [
        "podroute_vxlan_vteps 2",
        "podroute_vxlan_devices_ready 1",
        "podroute_vxlan_entries_programmed{entry=\"fdb\"} 2",
        "podroute_vxlan_entries_programmed{entry=\"neighbour\"} 2",
        "podroute_vxlan_entries_failed{entry=\"fdb\"} 0",
        "podroute_routes_programmed{kind=\"block-vxlan\"} 2",
    ] {
        assert!(metrics.contains(want), "no {want:?} in\n{metrics}");
    }

    // Every BGP session down (the mesh turned off): the routes stay, traffic flows.
    let before: Vec<Vec<String>> = [MASTER01, NODE01, NODE02]
        .iter()
        .map(|n| lab.kernel_routes(n).unwrap())
        .collect();
    let watch = lab
        .watch_kernel_routes(&[MASTER01, NODE01, NODE02], Duration::from_millis(20))
        .unwrap();
    lab.update_spec(|s| {
        s.bgp_configuration_spec =
            Some("  asNumber: 64512\n  nodeToNodeMeshEnabled: false\n".into());
    })
    .unwrap();
    wait_until("every BGP session gone", CHANGE, || {
        if [MASTER01, NODE01, NODE02]
            .iter()
            .all(|n| established(&lab, n) == 0)
        {
            Ok(())
        } else {
            Err(WaitError::Pending("sessions still up".into()))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    std::thread::sleep(Duration::from_secs(2));
    assert_all_pods_ping(&lab);
    for (node, want) in [MASTER01, NODE01, NODE02].iter().zip(&before) {
        let missing = watch.record(node).unwrap().missing(want);
        assert!(missing.is_empty(), "{missing:#?}");
        assert_eq!(&lab.kernel_routes(node).unwrap(), want, "{node}");
    }
    drop(watch);

    // node02's Node gets another address: the others' FDB entries follow, the routes (via
    // the VTEP address) stay, and traffic goes to the new address.
    let node02_mac = podroute::plan::tunnels::default_vtep_mac(NODE02, true);
    let old = format!("{node02_mac} dst 192.168.93.130 self permanent");
    let new = format!("{node02_mac} dst 192.168.93.131 self permanent");
    assert!(
        fdb(&lab, MASTER01).contains(&old),
        "{:?}",
        fdb(&lab, MASTER01)
    );
    podroute::lab::ip(
        &lab.node_ns(NODE02),
        &["addr", "add", "192.168.93.131/24", "dev", "ens33"],
    )
    .unwrap();
    lab.update_spec(|s| {
        s.node_mut(NODE02).unwrap().addr = "192.168.93.131/24".parse().unwrap();
    })
    .unwrap();
    wait_until("FDB entries towards node02's new address", CHANGE, || {
        if [MASTER01, NODE01].iter().all(|n| {
            let f = fdb(&lab, n);
            f.contains(&new) && !f.contains(&old)
        }) {
            Ok(())
        } else {
            Err(WaitError::Pending(format!("{:?}", fdb(&lab, MASTER01))))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert_eq!(lab.kernel_routes(MASTER01).unwrap(), before[0]);
    let (name, _) = pod(&lab, MASTER01);
    let (_, ip) = pod(&lab, NODE02);
    let (ok, out) = lab.ping(&name, ip).unwrap();
    assert!(ok, "to node02's pod via its new address:\n{out}");
    lab.cleanup();
}

#[test]
fn switching_a_pool_between_vxlan_and_ipip_never_leaves_a_block_without_a_route() {
    const TEST: &str =
        "switching_a_pool_between_vxlan_and_ipip_never_leaves_a_block_without_a_route";
    if !can_run(TEST) {
        return;
    }
    let mut lab = vxlan_lab("sw", EncapMode::Always);
    let blocks: Vec<String> = lab
        .spec
        .nodes
        .iter()
        .filter_map(|n| n.block.map(|b| b.to_string()))
        .collect();
    let watch = lab
        .watch_kernel_routes(&[MASTER01, NODE01, NODE02], Duration::from_millis(10))
        .unwrap();
    let switch_to = |lab: &mut Lab, ipip: EncapMode, vxlan: EncapMode| {
        lab.update_spec(|s| {
            s.ipip_mode = ipip;
            s.vxlan_mode = vxlan;
        })
        .unwrap();
        if let Err(e) = lab.wait_converged(CONVERGE) {
            panic!("{e}\n{}", logs(lab));
        }
        assert_all_pods_ping(lab);
    };
    switch_to(&mut lab, EncapMode::Always, EncapMode::Never);
    assert!(
        lab.kernel_routes(MASTER01)
            .unwrap()
            .iter()
            .any(|r| r.contains("dev tunl0")),
        "IPIP routes now"
    );
    assert!(
        podroute::lab::ip(&lab.node_ns(MASTER01), &["link", "show", "vxlan.calico"]).is_err(),
        "vxlan.calico removed once no route uses it"
    );
    switch_to(&mut lab, EncapMode::Never, EncapMode::Always);
    // tunl0 left the plan: it is taken out of service once no route of ours goes through it
    // (and not before: the sampled tables below never lose a block). The userspace device
    // goes with its forwarder; the kernel's ipip device, which cannot go, loses its address.
    for node in [MASTER01, NODE01, NODE02] {
        let ns = lab.node_ns(node);
        let retired = || match podroute::lab::ip(&ns, &["-d", "link", "show", "tunl0"]) {
            Err(_) => Ok(()),
            Ok(link) if link.contains("ipip ") => {
                match podroute::lab::ip(&ns, &["-4", "addr", "show", "dev", "tunl0"]) {
                    Ok(a) if !a.contains("inet ") => Ok(()),
                    other => Err(WaitError::Pending(format!("kernel tunl0: {other:?}"))),
                }
            }
            Ok(link) => Err(WaitError::Pending(link)),
        };
        if let Err(e) = wait_until("tunl0 out of service", Duration::from_secs(10), retired) {
            panic!("{node}: {e}\n{}", logs(&lab));
        }
        assert!(
            !lab.kernel_routes(node)
                .unwrap()
                .iter()
                .any(|r| r.contains("dev tunl0")),
            "{node}: no route through tunl0"
        );
    }
    assert_all_pods_ping(&lab);
    let records = watch.stop();
    for record in &records {
        for block in &blocks {
            let with_space = format!("{block} ");
            for (at, table) in &record.tables {
                let own = format!("blackhole {block}");
                assert!(
                    table
                        .iter()
                        .any(|r| r.starts_with(&with_space) || *r == own),
                    "{}: at {at:?} no route for {block}: {table:?}\nremoved: {:?}\nadded: {:?}\n{}",
                    record.node,
                    record.removed,
                    record.added,
                    logs(&lab)
                );
            }
            let removed: Vec<_> = record
                .removed
                .iter()
                .filter(|(_, r)| r.starts_with(&with_space))
                .collect();
            assert!(removed.is_empty(), "{}: {removed:?}", record.node);
        }
        assert!(
            record.samples > 10,
            "{} sampled {} times",
            record.node,
            record.samples
        );
    }
    lab.cleanup();
}
