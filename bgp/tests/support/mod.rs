//! Test harness for interop against real BGP daemons (BIRD 2 and GoBGP).
//!
//! Use from an integration test with `mod support;`. Every daemon runs in its own temp dir
//! (config, control socket, pid file, log), listens on a unique loopback address in
//! 127.16.0.0-127.254.255.255 and a free non-179 port, never binds port 179 or a host
//! address, and never reads /etc/bird or a system socket. Daemons are killed on drop, and a
//! small shell watchdog kills them too if the test process dies without dropping them.
//!
//! Next hops: GoBGP treats a loopback NEXT_HOP as invalid (treat-as-withdraw, "invalid
//! nexthop address"), and neither daemon can carry IPv6 routes over an IPv4 session without
//! an explicit IPv6 next hop. So every endpoint also gets next-hop addresses that are only
//! BGP attributes, never bound or sent to: [`Endpoint::nh_v4`] in 198.18.0.0/15 (RFC 2544
//! benchmarking range) and [`Endpoint::nh_v6`] in 2001:db8::/32 (documentation range).
//!
//! Set `PODROUTE_KEEP_TMP=1` to keep the temp dirs (their paths are printed).
//!
//! What the daemons report (BIRD 2.0.12, GoBGP 3.10.0; checked by tests/harness_selftest.rs):
//!
//! | event | BIRD `last_error()` | GoBGP `error_lines()` |
//! |---|---|---|
//! | it sends OPEN error 2/2 (bad peer AS) | `BGP Error: Bad peer AS` (log: `Error: Bad peer AS: 65002`) | `msg="sent notification" Data="as number mismatch expected 65009, received 65001"` |
//! | it receives 2/2 | `Received: Bad peer AS` (log: `Received: Bad peer AS: 65010`, data decoded) | no code logged: `msg="state changed" new=BGP_FSM_IDLE old=BGP_FSM_OPENSENT` (or `OPENCONFIRM`) `reason=invalid-msg`; `notifications()` counts it |
//! | it receives Cease while Established | `Received: Peer de-configured` (GoBGP SIGTERM sends 6/3) | `msg="received notification" Code=6 Subcode=2` + `msg="Peer Down" Reason="notification-received code 6(cease) subcode 2(administrative shutdown)"` (BIRD SIGTERM sends 6/2) |
//! | peer crashed (TCP closed) | `Socket: Connection closed` | `msg="Peer Down" Reason=read-failed` |
//!
//! Timing: BIRD as the active side connects ~1 s after start (`connect delay time 1`);
//! GoBGP as the active side takes 5-10 s to (re)connect (its connect loop has a floor and
//! jitter), and 5 s of idle hold after a reset. Prefer BIRD/podroute active when speed matters.
#![allow(dead_code)]

pub mod bird;
pub mod gobgp;
mod proc;
pub mod proxy;
pub mod raw;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use ipnet::IpNet;

/// Error from the harness; `Debug` prints the message verbatim (multi-line, with log tails),
/// so `.unwrap()`/`.expect()` in a test shows it readably.
pub struct HarnessError(pub String);

impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for HarnessError {}

pub type Result<T> = std::result::Result<T, HarnessError>;

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(HarnessError(msg.into()))
}

/// One route as read from a daemon's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpNet,
    /// BGP NEXT_HOP (or MP_REACH next hop; the first, global one for IPv6). `None` for
    /// non-BGP routes (BIRD static) and for GoBGP local routes with an unspecified next hop.
    pub next_hop: Option<IpAddr>,
    /// AS numbers in order, segments flattened (AS_SET members included in their order).
    pub as_path: Vec<u32>,
    /// Standard communities as (asn, value).
    pub communities: Vec<(u16, u16)>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    /// BIRD: protocol name (peer name or static protocol, e.g. "s4"). GoBGP: the neighbor
    /// address the path came from, or "local" for paths added through the API.
    pub from_protocol: String,
    /// Best path in the daemon's table (BIRD `*`, GoBGP `best`).
    pub best: bool,
}

/// A unique loopback endpoint for one daemon or one podroute speaker in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Loopback address the daemon binds and connects from (127.A.B.C, A >= 16).
    pub addr: Ipv4Addr,
    /// Free TCP port on `addr` (never 179).
    pub port: u16,
    /// IPv4 next hop to announce with (198.18.0.0/15); GoBGP rejects loopback next hops.
    pub nh_v4: Ipv4Addr,
    /// IPv6 next hop to announce with (2001:db8::/96 + addr); needed for IPv6 over IPv4.
    pub nh_v6: Ipv6Addr,
}

impl Endpoint {
    /// Allocate a fresh endpoint: unique address per (process, call), free port on it.
    pub fn alloc() -> Endpoint {
        let addr = alloc_addr();
        let port = free_port(addr);
        let [_, a, b, c] = addr.octets();
        let nh_v4 = Ipv4Addr::new(198, 18 + (a & 1), b, c);
        let nh_v6 = Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(u32::from(addr)));
        Endpoint {
            addr,
            port,
            nh_v4,
            nh_v6,
        }
    }

    /// Router ID derived from the address (unique within a test).
    pub fn router_id(&self) -> Ipv4Addr {
        self.addr
    }
}

static ADDR_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A loopback address 127.A.B.C (A in 16..=254, B and C in 1..=254) that is unique per
/// process and call, derived from the pid and a counter, so parallel test processes
/// (cargo-nextest) don't collide.
pub fn alloc_addr() -> Ipv4Addr {
    const SPAN: u64 = 239 * 254 * 254;
    let n = ADDR_COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    let pid = std::process::id() as u64;
    // 64 addresses per process, pids spread over the space.
    let v = (pid * 64 + (n % 64) + (n / 64) * 7_919_993) % SPAN;
    let a = 16 + (v / (254 * 254)) as u8;
    let b = 1 + ((v / 254) % 254) as u8;
    let c = 1 + (v % 254) as u8;
    Ipv4Addr::new(127, a, b, c)
}

/// A TCP port that is free on `addr` right now (kernel-assigned, so never 179).
pub fn free_port(addr: Ipv4Addr) -> u16 {
    for _ in 0..20 {
        if let Ok(l) = TcpListener::bind((addr, 0)) {
            let port = l.local_addr().expect("local_addr").port();
            if port != 179 {
                return port;
            }
        }
    }
    panic!("no free TCP port on {addr}");
}

/// Locate a daemon or tool binary: PATH first, then the sbin directories Debian uses.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/sbin",
        "/sbin",
        "/usr/local/sbin",
        "/usr/bin",
        "/usr/local/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Path of a tool that must exist (after [`require_tool`] returned true).
pub(crate) fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{name} not found (call require_tool first)"))
}

/// True if `name` is installed. If it is missing, prints a loud message; with `CI=true` it
/// panics (a missing daemon is a failure in CI), otherwise returns false so the test can
/// return early. Install with `apt-get install bird2 gobgpd` (tests/run.sh does).
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    let msg = format!(
        "\n{bar}\n!!! INTEROP TEST SKIPPED: `{name}` not found in PATH or /usr/sbin, /sbin.\n\
         !!! Install it: apt-get install bird2 gobgpd   (tests/run.sh does this)\n{bar}\n",
        bar = "!".repeat(78)
    );
    eprintln!("{msg}");
    if std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
    {
        panic!("{msg}(CI=true: missing tools are a failure)");
    }
    false
}

/// [`require_tool`] for both daemons and their CLIs.
pub fn require_daemons() -> bool {
    // Evaluate all so every missing tool is reported.
    let r = ["bird", "birdc", "gobgpd", "gobgp"].map(require_tool);
    r.iter().all(|x| *x)
}

/// Poll `f` every 100 ms until it returns `Some`, or fail after `timeout` with an error
/// that says what was awaited and includes `diag()` (e.g. daemon state and log tail).
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    diag: impl FnOnce() -> String,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            return err(format!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diag()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Like [`wait_until`] for a boolean condition.
pub fn wait_for(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
    diag: impl FnOnce() -> String,
) -> Result<()> {
    wait_until(timeout, what, || f().then_some(()), diag)
}

/// Await `f` every 20 ms until it holds; panic naming `what` after 30 s (tests of podroute
/// speakers in the test's own runtime).
pub async fn wait_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The status of the peer at `addr` on a podroute speaker (it must be configured).
pub async fn peer_status(s: &podroute_bgp::Speaker, addr: IpAddr) -> podroute_bgp::PeerStatus {
    s.peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.addr == addr)
        .expect("peer configured")
}

/// Last `n` lines of a file (empty string if unreadable).
pub fn tail_file(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Temp dir for one daemon; kept (and its path printed) when `PODROUTE_KEEP_TMP` is set.
pub(crate) struct WorkDir {
    pub path: PathBuf,
    _guard: Option<tempfile::TempDir>,
}

impl WorkDir {
    pub fn new(prefix: &str) -> WorkDir {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create temp dir");
        if std::env::var_os("PODROUTE_KEEP_TMP").is_some() {
            let path = dir.keep();
            eprintln!("harness: keeping {}", path.display());
            return WorkDir { path, _guard: None };
        }
        WorkDir {
            path: dir.path().to_path_buf(),
            _guard: Some(dir),
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

pub(crate) fn prefix_of(s: &str) -> Option<IpNet> {
    s.trim().parse().ok()
}
