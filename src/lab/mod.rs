//! `podroute lab`: seed 001's cluster (plus a node behind a router) built from network
//! namespaces on this machine, with one real `podroute agent` per node.
//!
//! ```text
//!   PREFIX-lan0 (bridge 192.168.92.0/24)          PREFIX-lan1 (bridge 192.168.93.0/24)
//!     |            |              |                    |               |
//!  master01      node01     PREFIX-router ---------------------------  node02
//!  .128/24       .129/24    .1 (lan0)   .1 (lan1)                     .130/24
//!     |            |                                                    |
//!   pod .65      pod .129                                             pod 172.16.10.1
//! ```
//!
//! Every node namespace has `ens33` on its subnet's bridge, a default route via the router,
//! and one pod: a namespace whose `eth0` holds a /32 with a default route via 169.254.1.1,
//! behind a host-side `cali…` veth with proxy ARP, as Calico's CNI plugin makes it. The
//! objects (IPPool `ipipMode: CrossSubnet`, IPAMBlocks naming the pods, BlockAffinities,
//! Nodes with `projectcalico.org/IPv4Address`, BGPConfiguration `default`) are written to a
//! YAML directory that every agent reads (`--datastore-type dir:PATH`).
//!
//! `--family dual` adds IPv6 to the same cluster (fd00:92::/64 and fd00:93::/64, the IPv6
//! pool fd00:172:16::/48 `Never`, a /122 block per node, an IPv6 address per pod with its
//! default route via fe80::ecee:eeff:feee:eeee as Calico's CNI plugin sets it); `--family ipv6`
//! keeps only the IPv6 part ([`Family`]). Pings are the lab's own ICMP/ICMPv6 echo
//! ([`echo()`]), so the lab runs no program but `ip`.
//!
//! [`Lab`] holds the building blocks (build, start the agents, wait for convergence, ask an
//! agent for its status, routes and metrics, ping from a pod, clean up) so that the
//! end-to-end tests use the same cluster as the command; [`run`] is the command itself.
//!
//! Packets only ever go between namespaces the lab created: the seed's addresses exist
//! nowhere else, and no interface is created in the caller's own namespace.

mod cluster;
mod echo;
pub mod flannel;
mod netns;
mod run;
mod spec;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use cluster::{
    Lab, LabConfig, PEER_TYPE_GLOBAL, PEER_TYPE_MESH, WaitError, is_root, route_row_line,
    same_route, wait_until,
};
pub use echo::{EchoReport, echo};
pub use netns::{exec, http_get, in_namespace, ip, namespaces_with_prefix, spawn_in_namespace};
pub use run::{LabEncap, LabOptions, run};
pub use spec::{
    BgpPeerSpec, CALI_MAC, ClusterSpec, Family, IpVersion, NIC, NodeSpec, POD_GATEWAY6, PodSpec,
    dashed, dashed_net,
};
pub use watch::{RouteRecord, RouteWatch};

/// Default namespace prefix of `podroute lab`.
pub const DEFAULT_PREFIX: &str = "podroute-lab";

/// What went wrong while building, running or asking the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "podroute lab must run as root: it creates network namespaces, veth pairs, bridges and \
         routes (try: sudo podroute lab)"
    )]
    NotRoot,
    #[error(
        "network namespaces with the prefix {prefix:?} exist already ({}): another lab is \
         running or was left behind; remove it with `podroute lab --cleanup --prefix {prefix}` \
         or pick another --prefix",
        namespaces.join(", ")
    )]
    Exists {
        prefix: String,
        namespaces: Vec<String>,
    },
    #[error("`{command}` failed: {}", output.trim())]
    Command { command: String, output: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {ns}: {source}")]
    Namespace { ns: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Http { what: String, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Spec(String),
    #[error(
        "{label} exited ({status}); its log is {}; last lines:\n{tail}",
        log.display()
    )]
    Exited {
        label: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("timed out after {after:?} waiting for {what}; last seen:\n{last}")]
    Timeout {
        what: String,
        after: Duration,
        last: String,
    },
    #[error("interrupted")]
    Interrupted,
    #[error(
        "podroute lab needs the `{tool}` program, which is not installed here ({why}); install \
         the {package} package (e.g. apt-get install {package})"
    )]
    MissingTool {
        tool: String,
        package: String,
        why: String,
    },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (SIGINT) or SIGTERM arrived and the lab is being removed.
fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once Ctrl-C was pressed: stops building while the handler cleans up.
fn check_interrupted() -> Result<(), LabError> {
    if interrupted() {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// On SIGINT or SIGTERM: stop every lab of this process (agents SIGTERM then SIGKILL,
/// namespaces and work directories removed), then exit with status 130.
pub fn install_signal_cleanup() -> std::io::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            let name = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                }
            });
            INTERRUPTED.store(true, Ordering::SeqCst);
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "\npodroute lab: {name}: stopping the agents and removing the lab"
            );
            for problem in cluster::release_all_labs() {
                let _ = writeln!(err, "  could not remove: {problem}");
            }
            let _ = writeln!(err, "podroute lab: removed");
            std::process::exit(130);
        })?;
    Ok(())
}

/// `podroute lab --cleanup`: stops the processes inside the namespaces `PREFIX-*` (SIGTERM,
/// then SIGKILL), deletes those namespaces and the lab's work directory. Returns what was
/// done, one line each.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>, LabError> {
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    let mut done = Vec::new();
    let names = namespaces_with_prefix(&format!("{prefix}-"));
    let mut pids: Vec<i32> = names.iter().flat_map(|ns| netns::pids(ns)).collect();
    pids.sort_unstable();
    pids.dedup();
    for pid in &pids {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(*pid, libc::SIGTERM) } == 0 {
            done.push(format!("sent SIGTERM to process {pid} ({})", comm(*pid)));
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
        done.push(format!("sent SIGKILL to process {pid}"));
    }
    for ns in &names {
        netns::delete(ns)?;
        done.push(format!("deleted network namespace {ns}"));
    }
    let note = cluster::workdir_note(prefix);
    if let Ok(text) = std::fs::read_to_string(&note) {
        let dir = PathBuf::from(text.trim());
        // Only a directory the lab made: in the temp dir, named after the prefix.
        let ours = dir.parent() == Some(std::env::temp_dir().as_path())
            && dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{prefix}-")));
        if ours && dir.is_dir() {
            std::fs::remove_dir_all(&dir).map_err(|source| LabError::Io {
                path: dir.clone(),
                source,
            })?;
            done.push(format!("removed {}", dir.display()));
        }
        let _ = std::fs::remove_file(&note);
    }
    Ok(done)
}

fn alive(pid: i32) -> bool {
    // A reaped or never-existing process has no /proc entry; a zombie is as good as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
