//! The userspace IPIP forwarder as its own process (`podroute ipip-forwarder`), so that an
//! agent crash, OOM kill or restart does not stop tunnelled traffic.
//!
//! - [`serve`] (the subcommand): claims the abstract unix socket
//!   [`control_socket_name`] of the device in the calling network namespace (abstract names
//!   are per network namespace: one forwarder per `tunl0`, no file to go stale), attaches to
//!   `tunl0` ([`super::spawn`]) and forwards with the last table it was given until `SIGTERM`
//!   or a forwarding failure. Each line received on a connection is a [`Request`]; each is
//!   answered with one [`Reply`] line (JSON).
//! - [`RemoteForwarder::adopt_or_start`] (the agent): connects to a running forwarder (a
//!   restarted agent adopts it, it never restarts it), or starts one as a detached child
//!   (own session, so signals to the agent or its process group do not reach it), then pushes
//!   every new [`TunnelTable`] and polls the counters once a second. The connection's end
//!   reports the forwarder's death ([`RemoteForwarder::exit`]); the agent starts a new one and
//!   pushes its current table.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{ForwarderConfig, ForwarderExit, IpipCounters, IpipCountersSnapshot, TunnelTable};
use crate::dataplane::tunnel::TunnelError;

/// The abstract unix socket name of the forwarder of `device` (in the caller's network
/// namespace).
pub fn control_socket_name(device: &str) -> String {
    format!("podroute/ipip-forwarder/{device}")
}

/// Who starts the forwarder process (`--ipip-forwarder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ForwarderOwner {
    /// The agent starts it when none answers.
    #[default]
    Agent,
    /// Something else (a second container); the agent only connects.
    External,
}

/// Agent → forwarder, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Forward by this table from now on.
    Table(TableMessage),
    /// Only the counters, please.
    Counters,
    /// Stop forwarding and exit (answered first): the node's pools no longer use IPIP and
    /// the agent removes `tunl0`. A forwarder older than this request closes the connection
    /// on it and keeps running.
    Stop,
}

/// A [`TunnelTable`] on the wire (prefixes as `a.b.c.d/len` text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMessage {
    pub remotes: Vec<(String, Ipv4Addr)>,
    pub known_nodes: Vec<Ipv4Addr>,
    pub pools: Vec<String>,
}

impl From<&TunnelTable> for TableMessage {
    fn from(t: &TunnelTable) -> Self {
        Self {
            remotes: t
                .remotes()
                .iter()
                .map(|(p, gw)| (p.to_string(), *gw))
                .collect(),
            known_nodes: t.known_nodes().to_vec(),
            pools: t.pools().iter().map(ToString::to_string).collect(),
        }
    }
}

/// Parses a prefix of a [`TableMessage`]; a malformed one is logged and skipped.
fn prefix(text: &str) -> Option<Ipv4Net> {
    match text.parse() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(prefix = text, error = %e, "malformed prefix in a tunnel table; skipped");
            None
        }
    }
}

impl From<TableMessage> for TunnelTable {
    fn from(m: TableMessage) -> Self {
        TunnelTable::new(
            m.remotes
                .iter()
                .filter_map(|(p, gw)| Some((prefix(p)?, *gw))),
            m.known_nodes,
            m.pools.iter().filter_map(|p| prefix(p)),
        )
    }
}

/// Forwarder → agent: the answer to every [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub pid: u32,
    /// The forwarder's podroute version (empty from forwarders older than this field).
    #[serde(default)]
    pub version: String,
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    pub segmented: u64,
    pub coalesced: u64,
    /// Indexed by [`super::DropReason::index`].
    pub drops: Vec<u64>,
}

impl Reply {
    fn new(s: &IpipCountersSnapshot) -> Self {
        Self {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            encap_packets: s.encap_packets,
            encap_bytes: s.encap_bytes,
            decap_packets: s.decap_packets,
            decap_bytes: s.decap_bytes,
            segmented: s.segmented,
            coalesced: s.coalesced,
            drops: s.drops.to_vec(),
        }
    }

    fn snapshot(&self) -> IpipCountersSnapshot {
        let mut s = IpipCountersSnapshot {
            encap_packets: self.encap_packets,
            encap_bytes: self.encap_bytes,
            decap_packets: self.decap_packets,
            decap_bytes: self.decap_bytes,
            segmented: self.segmented,
            coalesced: self.coalesced,
            ..Default::default()
        };
        for (d, v) in s.drops.iter_mut().zip(&self.drops) {
            *d = *v;
        }
        s
    }
}

fn socket_addr(device: &str) -> Result<SocketAddr, TunnelError> {
    SocketAddr::from_abstract_name(control_socket_name(device).as_bytes())
        .map_err(|e| TunnelError::io("naming the forwarder's control socket", e))
}

/// Runs the forwarder process until `SIGTERM`/`SIGINT` (then `Ok`) or a forwarding failure
/// (`Err`). Call it on a tokio runtime in the node's network namespace; `tunl0` must exist
/// (the agent makes it with [`super::UserspaceIpip`]).
pub async fn serve(config: ForwarderConfig) -> Result<(), TunnelError> {
    serve_when(config, false).await
}

/// True when `device` is a TUN device in the caller's network namespace (sysfs shows
/// `tun_flags` for those only).
pub fn is_tun_device(device: &str) -> bool {
    !device.contains('/')
        && std::path::Path::new("/sys/class/net")
            .join(device)
            .join("tun_flags")
            .exists()
}

/// How often a forwarder started with `wait_for_device` looks for the TUN device.
pub const DEVICE_POLL: Duration = Duration::from_millis(250);

/// [`serve`]; with `wait_for_device` (the forwarder as its own container, started with the
/// pod whatever the node's tunnel) it answers on its control socket at once but attaches
/// only once `device` exists as a TUN device, made by the agent on a node without the
/// kernel's `ipip` ([`is_tun_device`], checked every [`DEVICE_POLL`]). It never creates the
/// device itself: a TUN `tunl0` would stand in the way of the kernel's. Tables received
/// meanwhile are kept and used from the start.
pub async fn serve_when(config: ForwarderConfig, wait_for_device: bool) -> Result<(), TunnelError> {
    let device = config.device.clone();
    let listener = UnixListener::bind_addr(&socket_addr(&device)?).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            TunnelError::Io {
                what: format!("starting the IPIP forwarder of {device}"),
                error: "another forwarder of this device runs in this network namespace".into(),
            }
        } else {
            TunnelError::io("binding the forwarder's control socket", e)
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| TunnelError::io("binding the forwarder's control socket", e))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| TunnelError::io("binding the forwarder's control socket", e))?;
    let (table_tx, table_rx) = watch::channel(Arc::new(TunnelTable::default()));
    let table_tx = Arc::new(table_tx);
    let counters = Arc::new(IpipCounters::new());
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut forwarder = if wait_for_device && !is_tun_device(&device) {
        tracing::info!(
            device,
            "waiting for the agent to make the userspace tunnel device (a node with the \
             kernel's ipip module never needs this forwarder)"
        );
        None
    } else {
        Some(super::spawn(
            config.clone(),
            table_rx.clone(),
            counters.clone(),
        )?)
    };
    tracing::info!(
        device,
        pid = std::process::id(),
        "IPIP forwarder process serving"
    );
    let mut poll = tokio::time::interval(DEVICE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| TunnelError::io("installing the SIGTERM handler", e))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        table_tx.clone(),
                        counters.clone(),
                        stop.clone(),
                    ));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a control connection"),
            },
            exit = async {
                match forwarder.as_mut() {
                    Some(f) => f.exited().await,
                    None => std::future::pending().await,
                }
            } => {
                return match exit {
                    ForwarderExit::Stopped => Ok(()),
                    ForwarderExit::Failed(e) => Err(e),
                };
            }
            _ = poll.tick(), if forwarder.is_none() => {
                if is_tun_device(&device) {
                    forwarder = Some(super::spawn(config.clone(), table_rx.clone(), counters.clone())?);
                    tracing::info!(device, "the userspace tunnel device is there: forwarding");
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = stop.notified() => {
                tracing::info!(device, "asked to stop: no IPIP pool left");
                break;
            }
        }
    }
    tracing::info!(device, "IPIP forwarder process stopping");
    if let Some(forwarder) = forwarder {
        forwarder.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::UnixStream,
    table_tx: Arc<watch::Sender<Arc<TunnelTable>>>,
    counters: Arc<IpipCounters>,
    stop: Arc<tokio::sync::Notify>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "control connection failed");
                break;
            }
        };
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Table(t)) => {
                let table = TunnelTable::from(t);
                tracing::info!(
                    remotes = table.remotes().len(),
                    known_nodes = table.known_nodes().len(),
                    pools = table.pools().len(),
                    "tunnel table received"
                );
                table_tx.send_replace(Arc::new(table));
            }
            Ok(Request::Counters) => {}
            Ok(Request::Stop) => {
                if let Ok(mut reply) = serde_json::to_string(&Reply::new(&counters.snapshot())) {
                    reply.push('\n');
                    let _ = write.write_all(reply.as_bytes()).await;
                }
                stop.notify_one();
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "malformed control request; closing the connection");
                break;
            }
        }
        let Ok(mut reply) = serde_json::to_string(&Reply::new(&counters.snapshot())) else {
            break;
        };
        reply.push('\n');
        if write.write_all(reply.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// The agent's side of a forwarder process. Dropping it closes the connection only: the
/// forwarder keeps running with its last table.
#[derive(Debug)]
pub struct RemoteForwarder {
    task: tokio::task::JoinHandle<()>,
    exit: watch::Receiver<Option<ForwarderExit>>,
    /// The last table the forwarder confirmed (`None`: none sent yet, it has its initial one).
    delivered: watch::Receiver<Option<Arc<TunnelTable>>>,
    /// The forwarder's process id (from its first reply).
    pub pid: u32,
    /// The forwarder's podroute version (from its first reply; empty when it is older than
    /// the field).
    pub version: String,
    /// True when this call found the forwarder running (an agent restart).
    pub adopted: bool,
}

impl Drop for RemoteForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RemoteForwarder {
    /// Connects to the forwarder of `config.device` in the calling thread's network namespace,
    /// starting `program ipip-forwarder ...` (detached) when none answers. Then hands it
    /// every table published on `table` (the current one at once, unless it is still the
    /// empty initial table) and stores its counters in `counters` once a second.
    pub async fn adopt_or_start(
        owner: ForwarderOwner,
        program: &std::path::Path,
        config: &ForwarderConfig,
        log: &str,
        table: watch::Receiver<Arc<TunnelTable>>,
        counters: Arc<IpipCounters>,
    ) -> Result<RemoteForwarder, TunnelError> {
        let addr = socket_addr(&config.device)?;
        let (stream, adopted) = match UnixStream::connect_addr(&addr) {
            Ok(s) => (s, true),
            Err(_) if owner == ForwarderOwner::Agent => {
                (start(program, config, log, &addr).await?, false)
            }
            Err(e) => {
                return Err(TunnelError::io(
                    format!(
                        "connecting to the IPIP forwarder of {} (--ipip-forwarder external: \
                         is the ipip-forwarder container running?)",
                        config.device
                    ),
                    e,
                ));
            }
        };
        let what = "connecting to the IPIP forwarder";
        stream
            .set_nonblocking(true)
            .map_err(|e| TunnelError::io(what, e))?;
        let stream =
            tokio::net::UnixStream::from_std(stream).map_err(|e| TunnelError::io(what, e))?;
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        // A first exchange: the forwarder answers (and tells its pid).
        send(&mut write, &Request::Counters)
            .await
            .map_err(|e| TunnelError::io(what, e))?;
        let first = tokio::time::timeout(REPLY_TIMEOUT, read_reply(&mut lines))
            .await
            .map_err(|_| TunnelError::Io {
                what: what.into(),
                error: format!("no answer within {REPLY_TIMEOUT:?}"),
            })?
            .map_err(|e| TunnelError::io(what, e))?;
        counters.store(&first.snapshot());
        let pid = first.pid;
        let version = first.version.clone();
        let (exit_tx, exit) = watch::channel(None);
        let (delivered_tx, delivered) = watch::channel(None);
        let task = tokio::spawn(async move {
            let outcome = talk(write, lines, table, counters, delivered_tx).await;
            let _ = exit_tx.send(Some(ForwarderExit::Failed(TunnelError::Io {
                what: "the IPIP forwarder process's control connection".into(),
                error: outcome,
            })));
        });
        Ok(RemoteForwarder {
            task,
            exit,
            delivered,
            pid,
            version,
            adopted,
        })
    }

    /// `None` while the forwarder answers.
    pub fn exit(&self) -> Option<ForwarderExit> {
        self.exit.borrow().clone()
    }

    /// Has the forwarder confirmed a table equal to `table` (or, before any was sent, is
    /// `table` the empty one it starts with)?
    pub fn holds(&self, table: &TunnelTable) -> bool {
        match &*self.delivered.borrow() {
            Some(have) => std::ptr::eq(&**have, table) || **have == *table,
            None => {
                table.remotes().is_empty()
                    && table.known_nodes().is_empty()
                    && table.pools().is_empty()
            }
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, req: &Request) -> std::io::Result<()> {
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn read_reply(lines: &mut Lines) -> std::io::Result<Reply> {
    match lines.next_line().await? {
        Some(line) => serde_json::from_str(&line).map_err(std::io::Error::other),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the forwarder closed the connection",
        )),
    }
}

/// How long the agent waits for each answer of the forwarder.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pushes tables and polls counters until the connection fails; returns why.
async fn talk(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut lines: Lines,
    mut table: watch::Receiver<Arc<TunnelTable>>,
    counters: Arc<IpipCounters>,
    delivered: watch::Sender<Option<Arc<TunnelTable>>>,
) -> String {
    let initial_empty = {
        let t = table.borrow_and_update();
        t.remotes().is_empty() && t.known_nodes().is_empty() && t.pools().is_empty()
    };
    if !initial_empty {
        table.mark_changed();
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut sent = None;
        let req = tokio::select! {
            changed = table.changed() => {
                if changed.is_err() {
                    return "the agent's table channel closed".into();
                }
                let t = table.borrow_and_update().clone();
                let req = Request::Table(TableMessage::from(&*t));
                sent = Some(t);
                req
            }
            _ = tick.tick() => Request::Counters,
            // Between exchanges nothing is due from the forwarder: this ends at once when
            // it dies (EOF), so a new one is started without waiting for the next poll.
            unasked = lines.next_line() => {
                return match unasked {
                    Ok(None) => "the forwarder closed the connection".into(),
                    Ok(Some(line)) => format!("unasked line from the forwarder: {line:?}"),
                    Err(e) => e.to_string(),
                };
            }
        };
        if let Err(e) = send(&mut write, &req).await {
            return e.to_string();
        }
        // A forwarder that stops answering counts as dead (its threads may be stuck).
        match tokio::time::timeout(REPLY_TIMEOUT, read_reply(&mut lines)).await {
            Ok(Ok(r)) => {
                counters.store(&r.snapshot());
                // The forwarder answers a table once it uses it.
                if sent.is_some() {
                    delivered.send_replace(sent);
                }
            }
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no answer within {REPLY_TIMEOUT:?}"),
        }
    }
}

/// Starts the forwarder process, detached, and waits until its control socket answers.
async fn start(
    program: &std::path::Path,
    config: &ForwarderConfig,
    log: &str,
    addr: &SocketAddr,
) -> Result<UnixStream, TunnelError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    cmd.arg("ipip-forwarder")
        .arg("--device")
        .arg(&config.device)
        .arg("--local")
        .arg(config.local.to_string())
        .arg("--log")
        .arg(log)
        .stdin(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it makes the
    // forwarder its own session and process group, so signals to the agent's group (or
    // terminal) do not reach it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        TunnelError::io(format!("starting {} ipip-forwarder", program.display()), e)
    })?;
    let pid = child.id();
    tracing::info!(
        pid,
        device = config.device,
        "IPIP forwarder process started"
    );
    let started = Instant::now();
    let result = loop {
        match UnixStream::connect_addr(addr) {
            Ok(s) => break Ok(s),
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    // Lost a race with another starter? Then its forwarder answers.
                    if let Ok(s) = UnixStream::connect_addr(addr) {
                        return Ok(s);
                    }
                    break Err(TunnelError::Io {
                        what: "starting the IPIP forwarder process".into(),
                        error: format!("it exited with {status} (see its log lines above)"),
                    });
                }
                if started.elapsed() > Duration::from_secs(10) {
                    break Err(TunnelError::io(
                        "waiting for the IPIP forwarder process's socket",
                        e,
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Reap it whenever it ends, while this agent lives.
    let _ = std::thread::Builder::new()
        .name("podroute-fwd-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    result
}

/// Reads lines of a blocking control connection (tests, tools): sends `req`, returns the
/// reply.
pub fn request(device: &str, req: &Request, timeout: Duration) -> Result<Reply, TunnelError> {
    let what = "asking the IPIP forwarder";
    let mut s =
        UnixStream::connect_addr(&socket_addr(device)?).map_err(|e| TunnelError::io(what, e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| TunnelError::io(what, e))?;
    let mut line = serde_json::to_string(req).map_err(|e| TunnelError::Io {
        what: what.into(),
        error: e.to_string(),
    })?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| TunnelError::io(what, e))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| TunnelError::io(what, e))?;
    serde_json::from_str(&reply).map_err(|e| TunnelError::Io {
        what: what.into(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_through_json() {
        let table = TunnelTable::new(
            [(
                "10.244.1.0/26".parse().unwrap(),
                Ipv4Addr::new(192, 168, 92, 12),
            )],
            [Ipv4Addr::new(192, 168, 92, 13)],
            ["10.244.0.0/16".parse().unwrap()],
        );
        let line = serde_json::to_string(&Request::Table(TableMessage::from(&table))).unwrap();
        let back: Request = serde_json::from_str(&line).unwrap();
        let Request::Table(t) = back else {
            panic!("not a table: {line}")
        };
        assert_eq!(TunnelTable::from(t), table);
        assert_eq!(
            serde_json::from_str::<Request>("\"counters\"").unwrap(),
            Request::Counters
        );
    }

    fn table(n: u8) -> TunnelTable {
        TunnelTable::new(
            [(
                Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 26).unwrap(),
                Ipv4Addr::new(192, 168, 92, n),
            )],
            [],
            ["10.244.0.0/16".parse().unwrap()],
        )
    }

    /// A fake forwarder on the control socket of `device`: records the tables it receives,
    /// answers every request with `encap_packets` = the number of requests so far.
    fn fake_forwarder(device: &str) -> std::sync::mpsc::Receiver<TunnelTable> {
        let listener = UnixListener::bind_addr(&socket_addr(device).unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut write = stream.try_clone().unwrap();
            let mut requests = 0;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                requests += 1;
                match serde_json::from_str::<Request>(&line).unwrap() {
                    Request::Table(t) => {
                        let _ = tx.send(TunnelTable::from(t));
                    }
                    Request::Counters | Request::Stop => {}
                }
                let s = IpipCountersSnapshot {
                    encap_packets: requests,
                    ..Default::default()
                };
                let mut reply = serde_json::to_string(&Reply::new(&s)).unwrap();
                reply.push('\n');
                if write.write_all(reply.as_bytes()).is_err() {
                    break;
                }
                // The fifth request: the forwarder "dies".
                if requests == 5 {
                    break;
                }
            }
        });
        rx
    }

    // Multi-threaded: the test blocks a thread on the fake forwarder's channel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_pushes_tables_reads_counters_and_sees_the_forwarder_die() {
        let device = format!("test{}a", std::process::id());
        let tables = fake_forwarder(&device);
        let (table_tx, table_rx) = watch::channel(Arc::new(table(1)));
        let counters = Arc::new(IpipCounters::new());
        let mut config = ForwarderConfig::new(Ipv4Addr::new(192, 168, 92, 10));
        config.device = device.clone();
        let remote = RemoteForwarder::adopt_or_start(
            ForwarderOwner::External,
            std::path::Path::new("/nonexistent"),
            &config,
            "info",
            table_rx,
            counters.clone(),
        )
        .await
        .unwrap();
        assert!(remote.adopted);
        assert_eq!(remote.pid, std::process::id());
        assert_eq!(remote.version, env!("CARGO_PKG_VERSION"));
        let recv = |what: &str| {
            tables
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        assert_eq!(recv("the current table at once"), table(1));
        table_tx.send_replace(Arc::new(table(2)));
        assert_eq!(recv("the next table"), table(2));
        assert!(counters.snapshot().encap_packets >= 2, "counters copied");
        let deadline = Instant::now() + Duration::from_secs(20);
        while remote.exit().is_none() {
            assert!(Instant::now() < deadline, "the forwarder's end is noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(remote.exit(), Some(ForwarderExit::Failed(_))));
    }

    #[tokio::test]
    async fn external_owner_without_a_forwarder_is_an_error_that_says_so() {
        let mut config = ForwarderConfig::new(Ipv4Addr::new(192, 168, 92, 10));
        config.device = format!("test{}b", std::process::id());
        let (_tx, rx) = watch::channel(Arc::new(TunnelTable::default()));
        let err = RemoteForwarder::adopt_or_start(
            ForwarderOwner::External,
            std::path::Path::new("/nonexistent"),
            &config,
            "info",
            rx,
            Arc::new(IpipCounters::new()),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("ipip-forwarder container"),
            "{err}"
        );
    }

    #[test]
    fn reply_keeps_the_counters() {
        let mut s = IpipCountersSnapshot {
            encap_packets: 3,
            decap_bytes: 700,
            ..Default::default()
        };
        s.drops[2] = 5;
        let r: Reply =
            serde_json::from_str(&serde_json::to_string(&Reply::new(&s)).unwrap()).unwrap();
        assert_eq!(r.snapshot(), s);
    }
}
