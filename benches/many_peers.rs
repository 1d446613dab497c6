//! Route reflector with many clients, podroute speaker vs BIRD 2 side by side (root only).
//!
//! `cargo bench --bench many_peers` (env: `PODROUTE_BENCH_PEERS=1000`,
//! `PODROUTE_BENCH_ROUTES_PER_PEER=20`, `PODROUTE_BENCH_ROUNDS=3`,
//! `PODROUTE_BENCH_CONNECT_CONCURRENCY=8`, `PODROUTE_BENCH_ONLY=podroute|bird`).
//!
//! Per run: one fresh namespace (lo up, and a veth `d0` to an empty namespace holding 10.201.0.254/16 only so
//! that the routes' next hop 10.201.0.1 is on a connected subnet). The reflector listens on
//! 127.0.0.1:179: either `podroute_bgp::Speaker` in this process (its own 2-worker tokio
//! runtime; every peer passive + `rr_client`) or `bird -f` as a separate process (a template
//! with `rr client`, `passive on`, one `protocol bgp` per client). P injector clients, each a
//! TCP socket bound to its own 127.1.x.y, plus one listening client 127.2.0.1 (also an RR
//! client, announces nothing) run as tasks on a single-threaded tokio runtime in this process.
//!
//! Phases: (a) **establish**: from the first connect to all P+1 sessions Established (at most
//! `CONNECT_CONCURRENCY` handshakes in flight, because BIRD listens with a backlog of 8);
//! (b) **reflect**: t0 = the moment every injector is released to write its one pre-encoded
//! UPDATE (20 /26 routes, next hop 10.201.0.1); t1 = the listening client has received all
//! P×20 distinct prefixes. Every client drains what the reflector sends it (each gets the
//! other clients' routes: P×(P-1)×20 route announcements in all). Target: reflect ratio
//! podroute ÷ BIRD <= 0.5. Also shown, without a target: **all clients**, from t0 until every
//! injector has been sent at least (P-1)×20 route announcements (counted, not checked for
//! distinctness) and the listener has all P×20 prefixes.
//!
//! `PODROUTE_BENCH_PERF=1` (optional `PODROUTE_BENCH_PERF_DIR`, default /tmp): `perf record -g`
//! of the reflector (this process for podroute, injectors included; the `bird` process) during
//! the reflect phase only, into `perf-many_peers-{kind}.data`; t0 waits a second for perf to
//! attach. The machine may be shared: wall times are noisy.

#[path = "../tests/netns/mod.rs"]
mod netns;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use netns::{Netns, sh, veth};
use podroute_bgp::wire::Family;
use podroute_bgp::{PeerConfig, Speaker, SpeakerConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};

const RR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LISTENER: Ipv4Addr = Ipv4Addr::new(127, 2, 0, 1);
const NH: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn enter(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}");
}

fn bird_conf(peers: usize) -> String {
    let mut c = format!(
        "router id 10.201.0.254;\nlog stderr {{ error, fatal }};\n\
         protocol device {{ scan time 60; }}\n\
         protocol direct {{ ipv4; interface \"d0\"; }}\n\
         template bgp rrc {{\n  local {RR} as {ASN};\n  rr client;\n  \
         rr cluster id 10.201.0.254;\n  passive on;\n  hold time 240;\n  \
         ipv4 {{ import all; export all; gateway recursive; }};\n}}\n\
         protocol bgp listener from rrc {{ neighbor {LISTENER} as {ASN}; }}\n"
    );
    for i in 0..peers {
        c.push_str(&format!(
            "protocol bgp c{i} from rrc {{ neighbor {} as {ASN}; }}\n",
            client_addr(i)
        ));
    }
    c
}

async fn read_msg_async(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 19];
    s.read_exact(&mut hdr).await?;
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    if len < 19 {
        return Err(std::io::Error::other("bad BGP length"));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body).await?;
    Ok((hdr[18], body))
}

async fn session(src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    let mut s = sock.connect(SocketAddr::new(IpAddr::V4(RR), 179)).await?;
    s.set_nodelay(true)?;
    s.write_all(&open_bytes(src)).await?;
    let mut sent = false;
    loop {
        let (t, body) = read_msg_async(&mut s).await?;
        match t {
            1 => {
                s.write_all(&keepalive_bytes()).await?;
                sent = true;
            }
            4 if sent => return Ok(s),
            3 => {
                return Err(std::io::Error::other(format!(
                    "NOTIFICATION {:?}",
                    &body[..body.len().min(2)]
                )));
            }
            _ => {}
        }
    }
}

async fn session_retry(src: Ipv4Addr, deadline: Instant) -> TcpStream {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), session(src)).await {
            Ok(Ok(s)) => return s,
            r if Instant::now() > deadline => panic!("session from {src}: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

struct Outcome {
    establish: f64,
    reflect: f64,
    /// Until every injector has received the other injectors' routes.
    all: f64,
}

/// Counts the route announcements (NLRI of UPDATEs) in a BGP byte stream, parsing in place
/// (only a message cut by a read boundary is copied).
#[derive(Default)]
struct AnnouncementCounter {
    partial: Vec<u8>,
    count: usize,
}

impl AnnouncementCounter {
    fn feed(&mut self, mut data: &[u8]) {
        // Complete a message cut by the previous read: its header first, then its body.
        if !self.partial.is_empty() {
            let mut fill = |upto: usize, partial: &mut Vec<u8>| {
                let take = upto.saturating_sub(partial.len()).min(data.len());
                partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                partial.len() >= upto
            };
            if !fill(19, &mut self.partial) {
                return;
            }
            let need = (u16::from_be_bytes([self.partial[16], self.partial[17]]) as usize).max(19);
            if !fill(need, &mut self.partial) {
                return;
            }
            self.count += Self::scan(&self.partial);
            self.partial.clear();
        }
        let used = Self::scan_complete(data, &mut self.count);
        self.partial.extend_from_slice(&data[used..]);
    }

    /// Count in every complete message of `data`; returns the bytes consumed.
    fn scan_complete(data: &[u8], count: &mut usize) -> usize {
        let mut off = 0;
        while let Some(hdr) = data.get(off..off + 19) {
            let len = (u16::from_be_bytes([hdr[16], hdr[17]]) as usize).max(19);
            let Some(msg) = data.get(off..off + len) else {
                break;
            };
            *count += Self::scan(msg);
            off += len;
        }
        off
    }

    fn scan(msg: &[u8]) -> usize {
        match msg.get(18) {
            Some(2) => count_nlri(&msg[19..]),
            _ => 0,
        }
    }
}

fn count_nlri(body: &[u8]) -> usize {
    let Some(w) = body.get(0..2) else { return 0 };
    let a = 2 + u16::from_be_bytes([w[0], w[1]]) as usize;
    let Some(alen) = body.get(a..a + 2) else {
        return 0;
    };
    let mut nlri = body
        .get(a + 2 + u16::from_be_bytes([alen[0], alen[1]]) as usize..)
        .unwrap_or_default();
    let mut n = 0;
    while let Some(&len) = nlri.first() {
        nlri = nlri
            .get(1 + (len as usize).div_ceil(8)..)
            .unwrap_or_default();
        n += 1;
    }
    n
}

/// Runs the clients against a reflector already listening on 127.0.0.1:179 in `ns`.
/// `perf record` of `pid` from now until the returned child gets SIGINT, when asked for.
fn perf_attach(kind: Kind, pid: u32) -> Option<Child> {
    std::env::var("PODROUTE_BENCH_PERF").ok()?;
    let dir = std::env::var("PODROUTE_BENCH_PERF_DIR").unwrap_or_else(|_| "/tmp".into());
    let out = format!("{dir}/perf-many_peers-{}.data", kind.name());
    let child = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "4999",
            "-g",
            "-o",
            &out,
            "-p",
            &pid.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_secs(1));
    Some(child)
}

fn perf_stop(perf: Option<Child>) {
    if let Some(mut p) = perf {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
    }
}

fn drive_clients(
    ns: &str,
    peers: usize,
    per_peer: usize,
    concurrency: usize,
    reflector: (Kind, u32),
) -> Outcome {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            let target = peers * per_peer;
            // The listening client first.
            let mut l = session_retry(LISTENER, deadline).await;
            let (done_tx, mut done_rx) = watch::channel(None::<Instant>);
            tokio::spawn(async move {
                let mut c = NlriCounter::default();
                while let Ok((t, body)) = read_msg_async(&mut l).await {
                    if t == 2 {
                        c.update(&body);
                        if c.present.len() >= target && done_tx.borrow().is_none() {
                            let _ = done_tx.send(Some(Instant::now()));
                        }
                    }
                }
            });
            let (complete_tx, mut complete_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let sem = Arc::new(Semaphore::new(concurrency.max(1)));
            let established = Arc::new(AtomicUsize::new(0));
            let (go_tx, go_rx) = watch::channel(false);
            let t_start = Instant::now();
            for i in 0..peers {
                let prefixes: Vec<_> = (0..per_peer)
                    .map(|k| prefix((i * per_peer + k) as u32))
                    .collect();
                let (upd, _) = encode_announce(&prefixes, NH);
                let upd: Bytes = upd.freeze();
                let sem = sem.clone();
                let established = established.clone();
                let mut go = go_rx.clone();
                let complete_tx = complete_tx.clone();
                let expect = (peers - 1) * per_peer;
                tokio::spawn(async move {
                    let permit = sem.acquire().await;
                    let mut s = session_retry(client_addr(i), deadline).await;
                    drop(permit);
                    established.fetch_add(1, Ordering::SeqCst);
                    let _ = go.wait_for(|g| *g).await;
                    s.write_all(&upd)
                        .await
                        .unwrap_or_else(|e| panic!("write: {e}"));
                    let mut buf = vec![0u8; 64 << 10];
                    let mut counter = AnnouncementCounter::default();
                    let mut complete = expect == 0;
                    if complete {
                        let _ = complete_tx.send(Instant::now());
                    }
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !complete {
                            counter.feed(&buf[..n]);
                            if counter.count >= expect {
                                complete = true;
                                let _ = complete_tx.send(Instant::now());
                            }
                        }
                    }
                });
            }
            while established.load(Ordering::SeqCst) < peers {
                assert!(Instant::now() < deadline, "sessions not established");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t_est = t_start.elapsed();
            let perf = perf_attach(reflector.0, reflector.1);
            let t0 = Instant::now();
            let _ = go_tx.send(true);
            let t1 =
                tokio::time::timeout(Duration::from_secs(300), done_rx.wait_for(|d| d.is_some()))
                    .await
                    .unwrap_or_else(|_| panic!("listener did not get {target} routes"))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or_else(Instant::now);
            let mut t_all = t1;
            for _ in 0..peers {
                let t = tokio::time::timeout(Duration::from_secs(300), complete_rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("not every client got the others' routes"))
                    .unwrap_or_else(|| panic!("completion channel closed"));
                t_all = t_all.max(t);
            }
            perf_stop(perf);
            Outcome {
                establish: t_est.as_secs_f64(),
                reflect: t1.duration_since(t0).as_secs_f64(),
                all: t_all.duration_since(t0).as_secs_f64(),
            }
        })
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// podroute's speaker on its own runtime inside `ns`; returns a stop handle.
fn start_speaker(
    ns: &str,
    peers: usize,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async move {
            let mut cfg = SpeakerConfig::new(ASN, Ipv4Addr::new(10, 201, 0, 254));
            cfg.listen = Some(SocketAddr::new(IpAddr::V4(RR), 179));
            cfg.graceful_restart_time = None;
            let (sp, mut best) = Speaker::start(cfg)
                .await
                .unwrap_or_else(|e| panic!("speaker: {e}"));
            tokio::spawn(async move { while best.recv().await.is_some() {} });
            let addrs = std::iter::once(LISTENER).chain((0..peers).map(client_addr));
            for a in addrs {
                let mut p = PeerConfig::new(IpAddr::V4(a), ASN);
                p.passive = true;
                p.rr_client = true;
                p.families = vec![Family::IPV4_UNICAST];
                sp.add_peer(p)
                    .await
                    .unwrap_or_else(|e| panic!("add_peer: {e}"));
            }
            let _ = ready_tx.send(());
            let _ = stop_rx.await;
            let _ = sp.shutdown().await;
        });
        rt.shutdown_timeout(Duration::from_secs(2));
    });
    let _ = ready_rx.recv();
    (stop_tx, h)
}

fn start_bird(ns: &Netns, dir: &Path, peers: usize) -> Child {
    let conf = dir.join("bird.conf");
    std::fs::write(&conf, bird_conf(peers)).unwrap_or_else(|e| panic!("{e}"));
    let ctl = dir.join("bird.ctl");
    let log = std::fs::File::create(dir.join("bird.log")).unwrap_or_else(|e| panic!("{e}"));
    let log2 = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
        .arg(&conf)
        .arg("-s")
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("bird: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("birdc")
            .arg("-s")
            .arg(&ctl)
            .arg("show status")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Daemon is up"));
        if ok {
            return child;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "bird exited {st}: {}",
                std::fs::read_to_string(dir.join("bird.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "bird did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_once(
    kind: Kind,
    peers: usize,
    per_peer: usize,
    conc: usize,
) -> (Outcome, Option<(u64, f64)>) {
    let ns = Netns::new("rr");
    // No dummy module here: a veth to an otherwise empty namespace carries the subnet.
    let aux = Netns::new("rrnh");
    veth(&ns, "d0", "10.201.0.254/16", &aux, "d0", "");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    match kind {
        Kind::Podroute => {
            let (stop, h) = start_speaker(&ns.name, peers);
            let o = drive_clients(&ns.name, peers, per_peer, conc, (kind, std::process::id()));
            let _ = stop.send(());
            let _ = h.join();
            (o, None)
        }
        Kind::Bird => {
            let mut child = start_bird(&ns, dir.path(), peers);
            let pid = child.id();
            let o = drive_clients(&ns.name, peers, per_peer, conc, (kind, pid));
            let (hwm, _) = rss_kib(pid);
            let cpu = cpu_secs(pid);
            stop(&mut child, Duration::from_secs(5));
            (o, Some((hwm, cpu)))
        }
    }
}

fn main() {
    if !is_root("many_peers") {
        return;
    }
    if !have_bird() {
        println!("many_peers: skipped: `bird` (BIRD 2) is not installed");
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let peers = env_usize("PODROUTE_BENCH_PEERS", if full { 1000 } else { 50 });
    let per_peer = env_usize("PODROUTE_BENCH_ROUTES_PER_PEER", 20);
    let rounds = env_usize("PODROUTE_BENCH_ROUNDS", if full { 3 } else { 1 });
    let conc = env_usize("PODROUTE_BENCH_CONNECT_CONCURRENCY", 8);
    let only = std::env::var("PODROUTE_BENCH_ONLY").ok();
    raise_nofile(65536);
    let _ = sh("true", &[]);
    let kinds: Vec<Kind> = [Kind::Podroute, Kind::Bird]
        .into_iter()
        .filter(|k| only.as_deref().is_none_or(|o| o == k.name()))
        .collect();
    println!(
        "many_peers: {peers} RR clients x {per_peer} routes + 1 listening client, {rounds} rounds \
         alternating order. NOTE: shared 2-core machine, wall times are noisy."
    );
    let mut res: Vec<(Kind, Outcome)> = Vec::new();
    for r in 0..rounds {
        let mut order = kinds.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let (o, extra) = run_once(k, peers, per_peer, conc);
            let extra = extra
                .map(|(hwm, cpu)| {
                    format!(
                        "  bird peak RSS {:.1} MiB, CPU {cpu:.2} s",
                        hwm as f64 / 1024.0
                    )
                })
                .unwrap_or_default();
            println!(
                "  round {r} {:<8}: establish {:>7.1} ms  reflect {:>7.1} ms  total {:>7.1} ms  \
                 all clients {:>7.1} ms{extra}",
                k.name(),
                o.establish * 1e3,
                o.reflect * 1e3,
                (o.establish + o.reflect) * 1e3,
                o.all * 1e3
            );
            res.push((k, o));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let med = |k: Kind, f: fn(&Outcome) -> f64| {
        let v: Vec<f64> = res
            .iter()
            .filter(|(kk, _)| *kk == k)
            .map(|(_, o)| f(o))
            .collect();
        median(&v)
    };
    println!("  medians over {rounds} rounds:");
    println!(
        "    {:<16} {:>10} {:>10} {:>16}",
        "metric", "podroute", "bird", "podroute/bird"
    );
    type Metric = (&'static str, fn(&Outcome) -> f64, f64);
    let metrics: [Metric; 4] = [
        ("establish (ms)", |o| o.establish * 1e3, 0.0),
        ("reflect (ms)", |o| o.reflect * 1e3, 0.5),
        ("total (ms)", |o| (o.establish + o.reflect) * 1e3, 0.5),
        ("all clients (ms)", |o| o.all * 1e3, 0.0),
    ];
    for (name, f, target) in metrics {
        let p = med(Kind::Podroute, f);
        let b = med(Kind::Bird, f);
        let ratio = p / b;
        let verdict = if target > 0.0 && ratio.is_finite() {
            format!(
                "  target <= {target}: {}",
                if ratio <= target { "MET" } else { "MISSED" }
            )
        } else {
            String::new()
        };
        println!("    {name:<16} {p:>10.1} {b:>10.1} {ratio:>16.2}{verdict}");
    }
}
