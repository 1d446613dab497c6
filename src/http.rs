//! The agent's HTTP server: Prometheus metrics, kubelet health probes and the status API that
//! `podroute status` / `podroute routes` read.
//!
//! | path       | answer                                                                  |
//! |------------|-------------------------------------------------------------------------|
//! | `/metrics` | [`Metrics::encode`], `text/plain; version=0.0.4`                         |
//! | `/livez`   | 200 `ok`, or 503 with the stalled event loops, one per line              |
//! | `/readyz`  | 200 `ok`, or 503 with the not-ready reasons; `?verbose` lists the checks |
//! | `/status`  | [`AgentStatus`](crate::agent::status::AgentStatus) as JSON; beyond [`STATUS_PEERS_DEFAULT`] peers only some are listed (`?peers=all`, `?peers=N`) |
//! | `/routes`  | [`RoutesReport`](crate::agent::status::RoutesReport) as JSON             |
//!
//! Other paths answer 404; a known path with a method other than GET/HEAD answers 405. With a
//! separate status address (`--status-addr`) `/status` and `/routes` are served there only.
//!
//! The port is reachable from every pod, so the server is bounded: at most
//! [`Limits::max_connections`] connections per address (a new one closes the least recently
//! active), a request head must arrive within [`Limits::header_timeout`], and a connection on
//! which nothing moved for [`Limits::idle_timeout`] is closed. A flood of idle connections can
//! therefore neither keep `/livez` from answering nor take the descriptors BGP and the
//! datastore need.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::agent::status::StatusBoard;
use crate::metrics::Metrics;

/// Default of `--http-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// `/status` lists at most this many peers unless asked for more (`?peers=all`).
pub const STATUS_PEERS_DEFAULT: usize = 100;

/// How long a new connection at the cap waits for the connection it displaced to close
/// before it is closed itself.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Bounds of one listening address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once; further held to a quarter of the open-file limit.
    pub max_connections: usize,
    /// Time to receive a complete request head, from when the server starts waiting for it.
    pub header_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The connection cap actually used: `wanted`, but at most a quarter of the soft open-file
/// limit, so that the descriptors BGP sessions, the datastore and netlink need are never taken
/// by HTTP clients (two listening addresses take at most half).
pub fn effective_max_connections(wanted: usize, nofile_soft: Option<u64>) -> usize {
    let by_fds = nofile_soft.map_or(usize::MAX, |soft| {
        usize::try_from(soft / 4).unwrap_or(usize::MAX)
    });
    wanted.min(by_fds).max(1)
}

/// The process's soft `RLIMIT_NOFILE`, `None` when unlimited or unreadable.
pub fn nofile_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Where and how the agent serves HTTP.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `/metrics`, `/livez`, `/readyz`, and `/status` + `/routes` unless `status_addr` is set.
    pub metrics_addr: SocketAddr,
    /// `/status` and `/routes` only.
    pub status_addr: Option<SocketAddr>,
    pub limits: Limits,
    /// `/livez` fails when an event loop has not beaten within this.
    pub live_max_age: Duration,
}

/// The running servers; dropping this stops them.
#[derive(Debug)]
pub struct Servers {
    /// The bound metrics address (the real port when 0 was asked for).
    pub metrics_addr: SocketAddr,
    /// The bound status address, when separate.
    pub status_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<io::Result<()>>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds the addresses of `config` and serves them until the returned [`Servers`] is dropped.
pub async fn start(
    config: &HttpConfig,
    board: Arc<StatusBoard>,
    metrics: Metrics,
) -> io::Result<Servers> {
    let main = bind(config.metrics_addr).await?;
    let metrics_addr = main.local_addr()?;
    let mut tasks = Vec::new();
    let mut status_addr = None;
    match config.status_addr {
        None => {
            info!(addr = %metrics_addr, "serving /metrics, /livez, /readyz, /status, /routes");
            let app = router(board, metrics, config.live_max_age);
            tasks.push(tokio::spawn(serve_app(main, app, config.limits)));
        }
        Some(addr) => {
            let side = bind(addr).await?;
            let bound = side.local_addr()?;
            status_addr = Some(bound);
            info!(addr = %metrics_addr, "serving /metrics, /livez, /readyz");
            info!(addr = %bound, "serving /status, /routes");
            let app = metrics_router(board.clone(), metrics, config.live_max_age, Some(bound));
            tasks.push(tokio::spawn(serve_app(main, app, config.limits)));
            tasks.push(tokio::spawn(serve_app(
                side,
                status_router(board),
                config.limits,
            )));
        }
    }
    Ok(Servers {
        metrics_addr,
        status_addr,
        tasks,
    })
}

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

#[derive(Clone)]
struct AppState {
    board: Arc<StatusBoard>,
    metrics: Metrics,
    live_max_age: Duration,
}

/// Binds the server's listening socket; the error names the address.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("binding the HTTP server to {addr}: {e}")))
}

/// Every endpoint on one address, for embedding or for driving without a socket.
pub fn router(board: Arc<StatusBoard>, metrics: Metrics, live_max_age: Duration) -> Router {
    metrics_routes(board.clone(), metrics, live_max_age, None)
        .merge(status_routes(board))
        .fallback(not_found)
}

/// `/metrics`, `/livez` and `/readyz`. With `status_elsewhere`, `/status` and `/routes` answer
/// 404 naming that address, so a client pointed at the wrong port learns where to go.
pub fn metrics_router(
    board: Arc<StatusBoard>,
    metrics: Metrics,
    live_max_age: Duration,
    status_elsewhere: Option<SocketAddr>,
) -> Router {
    metrics_routes(board, metrics, live_max_age, status_elsewhere).fallback(not_found)
}

fn metrics_routes(
    board: Arc<StatusBoard>,
    metrics: Metrics,
    live_max_age: Duration,
    status_elsewhere: Option<SocketAddr>,
) -> Router {
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz));
    if let Some(addr) = status_elsewhere {
        let hint = format!(
            "not found: the status API is served on {addr} (--status-addr); \
             try `podroute status --agent http://{addr}`\n"
        );
        for path in ["/status", "/routes"] {
            let hint = hint.clone();
            app = app.route(
                path,
                get(move || async move { text(StatusCode::NOT_FOUND, hint) }),
            );
        }
    }
    app.with_state(AppState {
        board,
        metrics,
        live_max_age,
    })
}

/// `/status` and `/routes`.
pub fn status_router(board: Arc<StatusBoard>) -> Router {
    status_routes(board).fallback(not_found)
}

fn status_routes(board: Arc<StatusBoard>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/routes", get(routes))
        .with_state(board)
}

/// Serves every endpoint on `listener` with the default [`Limits`] until the task is dropped.
/// `/livez` fails when an event loop has not beaten within `live_max_age`.
pub async fn serve(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    live_max_age: Duration,
) -> io::Result<()> {
    serve_app(
        listener,
        router(board, metrics, live_max_age),
        Limits::default(),
    )
    .await
}

/// Serves `app` on `listener` within `limits` until the task is dropped. Accept errors (such
/// as running out of descriptors) are logged and retried, never fatal.
pub async fn serve_app(listener: TcpListener, app: Router, limits: Limits) -> io::Result<()> {
    let cap = effective_max_connections(limits.max_connections, nofile_soft_limit());
    if cap < limits.max_connections {
        warn!(
            wanted = limits.max_connections,
            cap, "HTTP connection cap lowered to a quarter of the open-file limit"
        );
    }
    let addr = listener.local_addr().ok();
    let conns = Arc::new(Connections::default());
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) {
                    // EMFILE/ENFILE and the like: the pending connection stays queued in the
                    // kernel; try again shortly instead of spinning.
                    if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        warn!(?addr, error = %e, "accepting an HTTP connection failed; retrying");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        if conns.len() >= cap {
            conns.evict_least_recent();
            if tokio::time::timeout(EVICTION_WAIT, conns.below(cap))
                .await
                .is_err()
            {
                debug!(%remote, cap, "HTTP connection cap reached and no connection closed; closing the new one");
                continue;
            }
        }
        let conn = conns.register();
        tokio::spawn(connection(stream, app.clone(), limits, conn));
    }
}

/// The open connections of one listener, for the cap and the least-recently-active eviction.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Tracked>>,
    next_id: AtomicU64,
    /// Signalled whenever a connection closes.
    closed: Notify,
}

struct Tracked {
    activity: Arc<Activity>,
    evict: Arc<Notify>,
    evicted: bool,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        let evict = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Tracked {
                activity: activity.clone(),
                evict: evict.clone(),
                evicted: false,
            },
        );
        Registered {
            id,
            conns: self.clone(),
            activity,
            evict,
        }
    }

    /// Asks the connection that has been quiet longest to close: at once when it is between
    /// requests, after its answer when it is in one.
    fn evict_least_recent(&self) {
        let mut open = self.lock();
        if let Some(victim) = open
            .values_mut()
            .filter(|t| !t.evicted)
            .min_by_key(|t| t.activity.last())
        {
            victim.evicted = true;
            victim.evict.notify_one();
        }
    }

    /// Resolves once fewer than `cap` connections are open.
    async fn below(&self, cap: usize) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.len() < cap {
                return;
            }
            closed.await;
        }
    }
}

/// One connection's entry; removing it from the map when the connection ends.
struct Registered {
    id: u64,
    conns: Arc<Connections>,
    activity: Arc<Activity>,
    evict: Arc<Notify>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
        self.conns.closed.notify_waiters();
    }
}

/// When a connection last moved a byte, in milliseconds since it was accepted.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn quiet_for(&self) -> Duration {
        self.last().elapsed()
    }
}

/// Serves one connection until it ends, is evicted, or has been quiet for the idle timeout.
async fn connection(stream: TcpStream, app: Router, limits: Limits, entry: Registered) {
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: entry.activity.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut evicted = false;
    loop {
        let quiet = limits
            .idle_timeout
            .saturating_sub(entry.activity.quiet_for());
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = entry.evict.notified(), if !evicted => {
                debug!("HTTP connection cap reached; closing the least recently active connection");
                evicted = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(quiet) => {
                if entry.activity.quiet_for() >= limits.idle_timeout {
                    debug!(idle = ?limits.idle_timeout, "closing an idle HTTP connection");
                    return;
                }
            }
        }
    }
}

/// A socket that records when it last read or wrote a byte.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn text(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, TEXT)], body).into_response()
}

/// One line per item, each ending in a newline.
fn lines(items: &[String]) -> String {
    items.iter().map(|l| format!("{l}\n")).collect()
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            (StatusCode::OK, [(header::CONTENT_TYPE, JSON)], body).into_response()
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON failed: {e}\n"),
        ),
    }
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        s.metrics.encode(),
    )
        .into_response()
}

async fn livez(State(s): State<AppState>) -> Response {
    match s.board.live(s.live_max_age) {
        Ok(()) => text(StatusCode::OK, "ok\n".into()),
        Err(stalled) => text(StatusCode::SERVICE_UNAVAILABLE, lines(&stalled)),
    }
}

/// `?verbose` (any value) lists the checks Kubernetes-style (`[+]...` / `[-]...`): the
/// datastore, dataplane and BGP peer lines are informational, the `not ready:` lines (the
/// agent's own reasons) decide; the status code is the same as without it.
async fn readyz(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let ready = s.board.ready();
    let code = if ready.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !q.contains_key("verbose") {
        return match ready {
            Ok(()) => text(code, "ok\n".into()),
            Err(reasons) => text(code, lines(&reasons)),
        };
    }
    let status = s.board.status();
    let mark = |ok: bool| if ok { "[+]" } else { "[-]" };
    let ds = &status.datastore;
    let dp = &status.dataplane;
    let established = status
        .peers
        .iter()
        .filter(|p| p.state == "Established")
        .count();
    let mut out = vec![
        format!(
            "{}datastore synced (source {:?}, revision {})",
            mark(ds.synced),
            ds.source,
            ds.revision
        ),
        format!(
            "{}dataplane programmed ({}/{} routes installed, {} failed)",
            mark(dp.programmed),
            dp.installed_routes,
            dp.desired_routes,
            dp.failed_routes
        ),
        format!(
            "{}bgp peers established ({established}/{})",
            mark(established == status.peers.len()),
            status.peers.len()
        ),
    ];
    match ready {
        Ok(()) => out.push("readyz check passed".into()),
        Err(reasons) => {
            out.extend(reasons.iter().map(|r| format!("[-]not ready: {r}")));
            out.push("readyz check failed".into());
        }
    }
    text(code, lines(&out))
}

/// `?peers=all` lists every peer, `?peers=N` at most N; by default at most
/// [`STATUS_PEERS_DEFAULT`]. When peers are left out, `peer_summary` counts them all.
async fn status(
    State(board): State<Arc<StatusBoard>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("peers").map(String::as_str) {
        None => Some(STATUS_PEERS_DEFAULT),
        Some("all") => None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("peers={n:?}: expected `all` or a number of peers\n"),
                );
            }
        },
    };
    let full = board.status();
    match limit.and_then(|limit| full.with_peer_limit(limit)) {
        Some(short) => json(&short),
        None => json(&*full),
    }
}

async fn routes(State(board): State<Arc<StatusBoard>>) -> Response {
    match board.routes().await {
        Some(report) => json(&*report),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not answer with its routes; try again\n".into(),
        ),
    }
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cap_leaves_three_quarters_of_the_descriptors() {
        assert_eq!(effective_max_connections(256, Some(1_048_576)), 256);
        assert_eq!(effective_max_connections(256, Some(1024)), 256);
        assert_eq!(effective_max_connections(256, Some(512)), 128);
        assert_eq!(effective_max_connections(256, None), 256);
        assert_eq!(effective_max_connections(256, Some(2)), 1);
        assert_eq!(effective_max_connections(0, Some(1024)), 1);
    }
}
