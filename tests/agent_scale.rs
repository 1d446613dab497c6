//! A mesh with a few hundred peers that never answer stays bounded (issue 14): three real
//! `podroute agent` processes in the lab's namespaces (`podroute::lab`) and 300 ghost Nodes
//! in the YAML datastore whose addresses are routed, inside each node namespace, to a
//! gateway nobody answers for (`tests/ghosts`): every connection attempt to them stays
//! half-open until the speaker's connect timeout.
//!
//! Checked in things that can be counted, never in wall times: the outbound attempts in
//! flight never exceed the speaker's bound (and do reach it: the ghosts keep it busy), the
//! sockets the agent holds stay near that bound, `/metrics` has no per-peer series beyond the
//! per-peer label threshold (and as many series as with a handful of peers), `/status` lists
//! at most its default page of peers, only peers with an attempt or a session hold a session
//! task, and the real nodes' sessions still come up.
//!
//! Root only: without root the test prints a loud SKIP, and with `CI=true` it fails instead.

#[allow(dead_code)]
mod agent_guard;
mod ghosts;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use podroute::lab::{Lab, LabConfig, WaitError, wait_until};

/// Ghost nodes: above the per-peer label threshold (100) and several times the connect bound.
const GHOSTS: usize = 300;
/// The agents' connect bound: the speaker's default.
const CONNECT_BOUND: usize = 64;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn can_run(test: &str) -> bool {
    if !podroute::lab::is_root() {
        agent_guard::cannot_run(
            "scale",
            test,
            "not running as root",
            "These tests need root (network namespaces, veth, routes).",
        );
        return false;
    }
    if !agent_guard::tool_works("ip", "-V") {
        agent_guard::cannot_run(
            "scale",
            test,
            "iproute2 `ip` is missing",
            "Install iproute2.",
        );
        return false;
    }
    true
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// TCP sockets of process `pid` (its fds that are sockets; the agent's other sockets are a
/// few netlink, HTTP and listening ones).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

#[test]
fn unreachable_mesh_peers_stay_bounded() {
    if !can_run("unreachable_mesh_peers_stay_bounded") {
        return;
    }
    assert_eq!(
        podroute_bgp::SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap())
            .max_connects_in_flight,
        CONNECT_BOUND,
        "the speaker's default bound changed: update CONNECT_BOUND"
    );
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("scl{}{n}", std::process::id());
    let (spec, _) = ghosts::cluster(GHOSTS, 1, 1);
    let mut lab = Lab::build(LabConfig::new(prefix, env!("CARGO_BIN_EXE_podroute")), spec)
        .expect("build the lab");
    let names: Vec<String> = lab.spec.nodes.iter().map(|n| n.name.clone()).collect();
    ghosts::blackhole_ghosts(&lab, &names).expect("route the ghosts nowhere");
    lab.start_agents().expect("start the agents");
    let logs = |lab: &Lab| {
        names
            .iter()
            .map(|n| format!("--- {n}:\n{}", lab.log_tail(n, 20)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Every agent has its peers configured and is trying the ghosts: the bound is reached.
    for name in &names {
        let result = wait_until(
            &format!("{name}: {CONNECT_BOUND} attempts in flight"),
            Duration::from_secs(20),
            || {
                let text = lab
                    .metrics(name)
                    .map_err(|e| WaitError::Pending(e.to_string()))?;
                match metric(&text, "podroute_bgp_connects_in_flight_max") {
                    Some(v) if v >= CONNECT_BOUND as f64 => Ok(()),
                    other => Err(WaitError::Pending(format!("in flight at most {other:?}"))),
                }
            },
        );
        if let Err(e) = result {
            panic!("{e}\n{}", logs(&lab));
        }
    }

    // Sample a while: the bound holds, sockets follow it, no per-peer series.
    for round in 0..10 {
        for name in &names {
            let text = lab.metrics(name).expect("GET /metrics");
            let in_flight = metric(&text, "podroute_bgp_connects_in_flight").expect("gauge");
            let most = metric(&text, "podroute_bgp_connects_in_flight_max").expect("gauge");
            assert!(
                in_flight <= CONNECT_BOUND as f64 && most <= CONNECT_BOUND as f64,
                "{name} round {round}: {in_flight} attempts in flight, at most {most}; bound \
                 {CONNECT_BOUND}"
            );
            // A peer has a session task only for an attempt with its turn or a session: the
            // ghosts waiting for a turn or backing off have none (a task per configured peer
            // would be 302).
            let tasks = metric(&text, "podroute_bgp_session_tasks").expect("gauge");
            assert!(
                tasks <= (CONNECT_BOUND + 2) as f64,
                "{name} round {round}: {tasks} session tasks for {} peers, {in_flight} attempts \
                 in flight",
                GHOSTS + 2
            );
            assert_eq!(
                metric(&text, "podroute_bgp_per_peer_series"),
                Some(0.0),
                "{name}: per-peer series on with {} peers",
                GHOSTS + 2
            );
            let lines = series(&text);
            let per_peer: Vec<&&str> = lines.iter().filter(|l| l.contains("peer=\"")).collect();
            assert!(
                per_peer.is_empty(),
                "{name}: per-peer series: {per_peer:#?}"
            );
            assert!(
                lines.len() < 250,
                "{name}: {} series with {} peers",
                lines.len(),
                GHOSTS + 2
            );
            let pid = lab.pid(name).expect("agent pid");
            let socks = sockets(pid);
            assert!(
                socks <= CONNECT_BOUND + 24,
                "{name}: {socks} sockets open with {} unreachable peers (bound {CONNECT_BOUND})",
                GHOSTS
            );
            let status = lab.node_status(name).expect("GET /status");
            let summary = status.peer_summary.as_ref().expect("peer summary");
            assert_eq!(summary.total, GHOSTS + 2, "{name}: peers configured");
            assert!(
                status.peers.len() <= podroute::http::STATUS_PEERS_DEFAULT,
                "{name}: /status lists {} peers",
                status.peers.len()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = round;
    }

    // The real nodes' sessions come up despite the ghosts: each agent's real peers reach
    // Established (the real Nodes are Ready, the ghosts have no Ready condition, so the real
    // peers' attempts go first).
    for name in &names {
        let result = wait_until(
            &format!("{name}: both real peers Established"),
            Duration::from_secs(60),
            || {
                let status = lab
                    .node_status(name)
                    .map_err(|e| WaitError::Pending(e.to_string()))?;
                let up = status
                    .peer_summary
                    .as_ref()
                    .and_then(|s| s.by_state.get("Established").copied())
                    .unwrap_or(0);
                if up == 2 {
                    Ok(())
                } else {
                    Err(WaitError::Pending(format!("{up} Established")))
                }
            },
        );
        if let Err(e) = result {
            panic!("{e}\n{}", logs(&lab));
        }
    }
    for problem in lab.cleanup() {
        eprintln!("cleanup: {problem}");
    }
}
