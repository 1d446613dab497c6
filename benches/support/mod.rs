//! Shared pieces of the side-by-side benches (`bgp_to_kernel`, `many_peers`): a raw BGP
//! client (OPEN/KEEPALIVE handshake, then pre-encoded UPDATE streams), process accounting
//! (peak RSS, CPU time), a kernel route watcher on an `RTNLGRP_IPV4_ROUTE` netlink socket,
//! and statistics. Root only; every address lives inside namespaces the benches create.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipnet::IpNet;
use podroute_bgp::wire::{
    AsPath, Capability, CodecContext, Family, Message, Open, Origin, PathAttrs, UpdateEncoder,
    encode_message,
};

/// The receiver under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Podroute,
    Bird,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Podroute => "podroute",
            Kind::Bird => "bird",
        }
    }
}

pub const ASN: u32 = 64512;
pub const CTX: CodecContext = CodecContext {
    four_octet_as: true,
};

/// True when running as root; otherwise prints why the bench is skipped.
pub fn is_root(bench: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    println!(
        "{bench}: skipped: needs root (network namespaces, veth pairs, kernel routes, BIRD). \
         Run as root: cargo bench --bench {bench}"
    );
    false
}

/// Whether `bird` and `birdc` can be run.
pub fn have_bird() -> bool {
    std::process::Command::new("bird")
        .arg("--version")
        .output()
        .is_ok()
}

/// Raises RLIMIT_NOFILE (inherited by the daemons started afterwards).
pub fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: plain syscall with a valid struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }
}

/// The i-th /26 inside 10.0.0.0/8.
pub fn prefix(i: u32) -> IpNet {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i << 6);
    IpNet::new(IpAddr::V4(base.into()), 26).unwrap_or_default()
}

/// iBGP attributes: ORIGIN IGP, empty AS_PATH, LOCAL_PREF 100, NEXT_HOP `nh`.
pub fn attrs(nh: Ipv4Addr) -> PathAttrs {
    PathAttrs {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::default()),
        next_hop: Some(nh),
        local_pref: Some(100),
        ..PathAttrs::default()
    }
}

/// Pre-encoded UPDATEs announcing `prefixes` (as many per message as fit).
pub fn encode_announce(prefixes: &[IpNet], nh: Ipv4Addr) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let n = UpdateEncoder::new(CTX).announce(&attrs(nh), None, prefixes, &mut out);
    (out, n)
}

pub fn encode_withdraw(prefixes: &[IpNet]) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let n = UpdateEncoder::new(CTX).withdraw(prefixes, &mut out);
    (out, n)
}

pub fn open_bytes(router_id: Ipv4Addr) -> BytesMut {
    let open = Open::new(
        ASN,
        240,
        router_id,
        vec![Capability::Multiprotocol(Family::IPV4_UNICAST)],
    );
    let mut buf = BytesMut::new();
    encode_message(&Message::Open(open), CTX, &mut buf);
    buf
}

pub fn keepalive_bytes() -> BytesMut {
    let mut buf = BytesMut::new();
    encode_message(&Message::Keepalive, CTX, &mut buf);
    buf
}

/// Reads one BGP message: (type, body).
pub fn read_msg(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 19];
    s.read_exact(&mut hdr)?;
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    if len < 19 {
        return Err(io::Error::other(format!("bad BGP length {len}")));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body)?;
    Ok((hdr[18], body))
}

/// OPEN, wait for the peer's OPEN, KEEPALIVE, wait for its KEEPALIVE: Established.
pub fn handshake(s: &mut TcpStream, router_id: Ipv4Addr) -> io::Result<()> {
    s.write_all(&open_bytes(router_id))?;
    let mut sent_keepalive = false;
    loop {
        let (t, body) = read_msg(s)?;
        match t {
            1 => {
                s.write_all(&keepalive_bytes())?;
                sent_keepalive = true;
            }
            4 if sent_keepalive => return Ok(()),
            3 => {
                return Err(io::Error::other(format!(
                    "NOTIFICATION {}/{}",
                    body.first().copied().unwrap_or(0),
                    body.get(1).copied().unwrap_or(0)
                )));
            }
            _ => {}
        }
    }
}

/// Counts the distinct IPv4 prefixes announced (minus withdrawn) in a stream of UPDATE
/// bodies (plain IPv4 NLRI only, which is what both receivers send here).
#[derive(Default)]
pub struct NlriCounter {
    pub present: HashSet<(u32, u8)>,
}

impl NlriCounter {
    pub fn update(&mut self, body: &[u8]) {
        if body.len() < 4 {
            return;
        }
        let wlen = u16::from_be_bytes([body[0], body[1]]) as usize;
        let Some(w) = body.get(2..2 + wlen) else {
            return;
        };
        for p in parse_prefixes(w) {
            self.present.remove(&p);
        }
        let a = 2 + wlen;
        let Some(alen) = body.get(a..a + 2) else {
            return;
        };
        let alen = u16::from_be_bytes([alen[0], alen[1]]) as usize;
        let Some(nlri) = body.get(a + 2 + alen..) else {
            return;
        };
        for p in parse_prefixes(nlri) {
            self.present.insert(p);
        }
    }
}

fn parse_prefixes(mut b: &[u8]) -> Vec<(u32, u8)> {
    let mut v = Vec::new();
    while let Some(&len) = b.first() {
        let n = (len as usize).div_ceil(8);
        let Some(bytes) = b.get(1..1 + n) else {
            break;
        };
        let mut a = [0u8; 4];
        a[..n.min(4)].copy_from_slice(&bytes[..n.min(4)]);
        v.push((u32::from_be_bytes(a), len));
        b = &b[1 + n..];
    }
    v
}

/// Peak RSS (VmHWM) and current RSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let s = proc_status(pid);
    (status_kib(&s, "VmHWM:"), status_kib(&s, "VmRSS:"))
}

/// `/proc/PID/status` (empty once the process is gone).
pub fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// The kB value of the `name` line (e.g. `"RssAnon:"`) of a `/proc/PID/status` text; 0 if
/// absent.
pub fn status_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process so far (clock ticks → seconds).
pub fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm: state is field 3; utime 14, stime 15.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child.
pub fn stop(child: &mut Child, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Watches IPv4 route notifications in the namespace it was opened in and keeps the set of
/// /26 routes inside 10.0.0.0/8 of the main table. `arm(target)` then `wait()` returns the
/// instant the set size first equalled `target` (as seen by the watcher thread's `recv`).
pub struct RouteWatcher {
    inner: Arc<WatchState>,
    ns: String,
}

struct WatchState {
    count: AtomicUsize,
    target: AtomicUsize,
    hit: Mutex<Option<Instant>>,
    overflows: AtomicUsize,
    stop: AtomicBool,
    set: Mutex<HashSet<u32>>,
    /// (count, instant) after each read since the last `arm`: the progress curve.
    trace: Mutex<Vec<(usize, Instant)>>,
}

const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;

impl RouteWatcher {
    /// Opens the socket in `ns` (the thread enters it) and starts the reader thread there.
    pub fn start(ns: &str) -> RouteWatcher {
        let inner = Arc::new(WatchState {
            count: AtomicUsize::new(0),
            target: AtomicUsize::new(usize::MAX),
            hit: Mutex::new(None),
            overflows: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            set: Mutex::new(HashSet::new()),
            trace: Mutex::new(Vec::new()),
        });
        let st = inner.clone();
        let path = format!("/run/netns/{ns}");
        let ns_name = ns.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            let fd = open_monitor();
            let _ = ready_tx.send(());
            watch_loop(fd, &st, &ns_name);
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
        });
        let _ = ready_rx.recv();
        RouteWatcher {
            inner,
            ns: ns.to_string(),
        }
    }

    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::SeqCst)
    }

    pub fn overflows(&self) -> usize {
        self.inner.overflows.load(Ordering::SeqCst)
    }

    pub fn arm(&self, target: usize) {
        *self.inner.hit.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.inner
            .trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.inner.target.store(target, Ordering::SeqCst);
        if self.count() == target {
            *self.inner.hit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    /// When the count first moved away from `start` and when it first reached each of
    /// `fractions` of the way from `start` to the armed target (since the last `arm`).
    pub fn progress(&self, start: usize, fractions: &[f64]) -> Vec<Option<Instant>> {
        let target = self.inner.target.load(Ordering::SeqCst);
        let trace = self.inner.trace.lock().unwrap_or_else(|e| e.into_inner());
        let moved = |c: usize| c.abs_diff(start);
        let span = target.abs_diff(start) as f64;
        let mut out = vec![trace.iter().find(|(c, _)| *c != start).map(|(_, t)| *t)];
        for f in fractions {
            let need = (span * f).ceil() as usize;
            out.push(
                trace
                    .iter()
                    .find(|(c, _)| moved(*c) >= need)
                    .map(|(_, t)| *t),
            );
        }
        out
    }

    /// The instant the armed target was reached, or `None` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = *self.inner.hit.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

impl Drop for RouteWatcher {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = &self.ns;
    }
}

fn open_monitor() -> i32 {
    // SAFETY: plain socket syscalls on a fresh fd with valid arguments.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        assert!(fd >= 0, "netlink socket: {}", io::Error::last_os_error());
        let size: libc::c_int = 512 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = RTMGRP_IPV4_ROUTE;
        let rc = libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        assert_eq!(rc, 0, "netlink bind: {}", io::Error::last_os_error());
        fd
    }
}

/// How often a polling watcher reads its socket when it found nothing.
const POLL_INTERVAL: Duration = Duration::from_micros(250);

/// Does the watcher poll its socket (`PODROUTE_BENCH_WATCH=poll`) rather than block in
/// `recv` (the default, the method of the figures in issue 14 and earlier notes)?
///
/// A watcher blocked in `recv` is woken by every notification, and the kernel does that
/// wake-up (`sock_def_readable`, an inter-processor wake-up of the watcher's thread) in the
/// context of the thread that inserted the route: a `perf` profile of the podroute receiver
/// had 15 % of its dataplane thread there. That is the instrument's cost, charged to whichever
/// receiver is measured. Polling (non-blocking reads, and a [`POLL_INTERVAL`] sleep when there
/// is nothing to read) leaves no thread sleeping on the socket; the instants it records are
/// at most that interval late.
fn watch_polls() -> bool {
    std::env::var("PODROUTE_BENCH_WATCH").is_ok_and(|v| v == "poll")
}

fn watch_loop(fd: i32, st: &WatchState, ns: &str) {
    let mut buf = vec![0u8; 1 << 20];
    let flags = if watch_polls() { libc::MSG_DONTWAIT } else { 0 };
    while !st.stop.load(Ordering::SeqCst) {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && flags != 0 {
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                // Lost notifications: resynchronise from a dump.
                st.overflows.fetch_add(1, Ordering::SeqCst);
                let fresh = dump_set(ns);
                let mut set = st.set.lock().unwrap_or_else(|e| e.into_inner());
                *set = fresh;
                note(st, set.len());
            }
            continue;
        }
        let now = Instant::now();
        let mut set = st.set.lock().unwrap_or_else(|e| e.into_inner());
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                break;
            }
            if (ty == RTM_NEWROUTE || ty == RTM_DELROUTE)
                && let Some(dst) = parse_route(&buf[off + 16..off + len])
            {
                if ty == RTM_NEWROUTE {
                    set.insert(dst);
                } else {
                    set.remove(&dst);
                }
            }
            off += (len + 3) & !3;
        }
        let c = set.len();
        drop(set);
        st.count.store(c, Ordering::SeqCst);
        st.trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((c, now));
        if c == st.target.load(Ordering::SeqCst) {
            let mut hit = st.hit.lock().unwrap_or_else(|e| e.into_inner());
            if hit.is_none() {
                *hit = Some(now);
            }
        }
    }
}

fn note(st: &WatchState, c: usize) {
    st.count.store(c, Ordering::SeqCst);
    if c == st.target.load(Ordering::SeqCst) {
        let mut hit = st.hit.lock().unwrap_or_else(|e| e.into_inner());
        if hit.is_none() {
            *hit = Some(Instant::now());
        }
    }
}

/// rtmsg + attributes → the destination of a main-table /26 inside 10.0.0.0/8.
fn parse_route(m: &[u8]) -> Option<u32> {
    if m.len() < 12 || m[0] != libc::AF_INET as u8 || m[1] != 26 {
        return None;
    }
    let mut table = m[4] as u32;
    let mut dst = None;
    let mut off = 12;
    while off + 4 <= m.len() {
        let alen = u16::from_ne_bytes([m[off], m[off + 1]]) as usize;
        let aty = u16::from_ne_bytes([m[off + 2], m[off + 3]]) & 0x3fff;
        if alen < 4 || off + alen > m.len() {
            break;
        }
        let v = &m[off + 4..off + alen];
        match aty {
            RTA_DST if v.len() == 4 => dst = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            RTA_TABLE if v.len() == 4 => table = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    let d = dst?;
    (table == 254 && d >> 24 == 10).then_some(d)
}

/// The /26 routes inside 10.0.0.0/8 of `ns`'s main table, read with `ip route`.
pub fn dump_set(ns: &str) -> HashSet<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-4", "route", "show", "table", "main"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| p.parse::<ipnet::Ipv4Net>().ok())
        .filter(|p| p.prefix_len() == 26 && p.addr().octets()[0] == 10)
        .map(|p| u32::from(p.addr()))
        .collect()
}
