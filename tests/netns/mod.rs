//! Network-namespace fixtures for dataplane tests: unique namespace names, removal on drop
//! (also on panic), `ip -n` helpers, and running code inside a namespace from a dedicated
//! thread.
//!
//! Traffic rule: packets only go to addresses inside namespaces created here.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns false (after a loud message) when the tests cannot run here; panics instead when
/// `CI=true`, so that CI never passes without running them.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip {
        return true;
    }
    let why = if root {
        "iproute2 `ip` is missing"
    } else {
        "not running as root"
    };
    cannot_run(
        test,
        why,
        "These tests need root (network namespaces, veth, routes).",
    );
    false
}

/// Returns false (after a loud message) when `ping` (iputils-ping, which tests/run.sh installs)
/// is missing; panics instead when `CI=true`, as [`can_run`] does for root.
pub fn can_ping(test: &str) -> bool {
    if Command::new("ping")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    cannot_run(
        test,
        "`ping` is missing",
        "Install iputils-ping (tests/run.sh does) to ping pod to pod.",
    );
    false
}

/// The loud "skipped" banner; a panic when `CI=true`, so that CI never passes without it.
fn cannot_run(test: &str, why: &str, need: &str) {
    let msg = format!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED netns dataplane test `{test}` (or part of it): {why}.\n\
         !!! {need}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}CI=true: a netns test that cannot run is a failure");
    }
    eprintln!("{msg}");
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`sh`] but returns success and combined output instead of panicking.
pub fn try_sh(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pr-{tag}-{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    pub fn try_ip(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        try_sh("ip", &all)
    }

    /// `ip netns exec NAME program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> (bool, String) {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        try_sh("ip", &all)
    }

    /// `ping -c 3 -W 2 -n TO` from inside this namespace: success and ping's output.
    pub fn ping(&self, to: &str) -> (bool, String) {
        self.exec("ping", &["-c", "3", "-W", "2", "-n", to])
    }

    pub fn sysctl(&self, key_value: &str) {
        let (ok, out) = self.exec("sysctl", &["-q", "-w", key_value]);
        assert!(ok, "sysctl {key_value}: {out}");
    }

    /// Our routes, as `ip route` prints them, without the `proto` word.
    pub fn routes(&self, protocol: u8) -> Vec<String> {
        let p = protocol.to_string();
        let mut lines: Vec<String> = self
            .ip(&["route", "show", "table", "main", "proto", &p])
            .lines()
            .chain(
                self.ip(&["-6", "route", "show", "table", "main", "proto", &p])
                    .lines(),
            )
            .map(|l| {
                l.replace(&format!(" proto {p}"), "")
                    .replace(" metric 1024", "")
                    .trim()
                    .to_string()
            })
            .collect();
        lines.sort();
        lines
    }

    /// All routes of the main table (IPv4).
    pub fn all_routes(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .ip(&["route", "show", "table", "main"])
            .lines()
            .map(|l| l.trim().to_string())
            .collect();
        lines.sort();
        lines
    }

    /// Runs `f` on a thread that has entered this namespace; sockets created there stay in
    /// the namespace wherever they are used afterwards.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Connects two namespaces with a veth pair.
pub fn veth(a: &Netns, a_name: &str, a_addr: &str, b: &Netns, b_name: &str, b_addr: &str) {
    let tmp_a = format!("va{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let tmp_b = format!("vb{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let tmp_a = format!("{tmp_a}{}", std::process::id() % 100000);
    let tmp_b = format!("{tmp_b}{}", std::process::id() % 100000);
    sh(
        "ip",
        &[
            "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
        ],
    );
    sh(
        "ip",
        &["link", "set", &tmp_a, "netns", &a.name, "name", a_name],
    );
    sh(
        "ip",
        &["link", "set", &tmp_b, "netns", &b.name, "name", b_name],
    );
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
    if !a_addr.is_empty() {
        a.ip(&["addr", "add", a_addr, "dev", a_name]);
    }
    if !b_addr.is_empty() {
        b.ip(&["addr", "add", b_addr, "dev", b_name]);
    }
}

/// A pod: its own namespace with `eth0` holding `addr/32`, a default route via 169.254.1.1
/// (Calico's trick), and the host side `cali*` in `node` with proxy ARP.
pub fn pod(node: &Netns, iface: &str, addr: &str) -> Netns {
    let pod = Netns::new("pod");
    veth(node, iface, "", &pod, "eth0", &format!("{addr}/32"));
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    node.sysctl(&format!("net.ipv4.conf.{iface}.proxy_arp=1"));
    pod
}

/// A TUN device named `tunl0`, standing in for the kernel IPIP device that this kernel lacks.
pub fn tun_tunl0(node: &Netns) {
    node.ip(&["tuntap", "add", "dev", "tunl0", "mode", "tun"]);
    node.ip(&["link", "set", "tunl0", "up"]);
}
