//! The agent's HTTP server on a real socket, and the `podroute status` / `podroute routes`
//! client against it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use podroute::agent::status::{AgentStatus, Health, PeerRow, RouteRow, RoutesReport, StatusBoard};
use podroute::cli::{self, AgentError, Output};
use podroute::http::{HttpConfig, Limits};
use podroute::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[allow(dead_code)]
mod agent_guard;

struct Answer {
    code: u16,
    content_type: Option<String>,
    body: String,
}

/// A bare HTTP/1.1 GET (connection close), so the tests see exactly what is on the wire.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let code = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string());
    Answer {
        code,
        content_type,
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path).await
}

async fn start(board: Arc<StatusBoard>, metrics: Metrics, live_max_age: Duration) -> SocketAddr {
    let listener = podroute::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(podroute::http::serve(
        listener,
        board,
        metrics,
        live_max_age,
    ));
    addr
}

fn ready_status() -> AgentStatus {
    AgentStatus {
        node: "master01".into(),
        version: "0.1.0".into(),
        ipv4: Some("192.168.92.128/24".into()),
        nic: Some("ens33".into()),
        as_number: 64512,
        router_id: "192.168.92.128".into(),
        started: 1_700_000_000,
        health: Health {
            live: true,
            ready: true,
            not_ready: vec![],
        },
        peers: vec![PeerRow {
            address: "192.168.92.129".into(),
            port: 179,
            peer_type: "node-to-node mesh".into(),
            name: "node01".into(),
            remote_as: 64512,
            state: "Established".into(),
            since: 1_700_000_100,
            info: "Established".into(),
            ..PeerRow::default()
        }],
        ..AgentStatus::default()
    }
}

fn routes_report() -> RoutesReport {
    RoutesReport {
        node: "master01".into(),
        vxlan: None,
        routes: vec![
            RouteRow {
                prefix: "172.16.196.128/26".into(),
                gateway: Some("192.168.92.129".into()),
                device: Some("ens33".into()),
                kind: "block-direct".into(),
                peer: Some("node01".into()),
                installed: true,
                ..RouteRow::default()
            },
            RouteRow {
                prefix: "172.16.241.64/26".into(),
                kind: "blackhole".into(),
                installed: true,
                ..RouteRow::default()
            },
        ],
    }
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let metrics = Metrics::new();
    metrics.routes_desired.set(7);
    let addr = start(
        Arc::new(StatusBoard::new()),
        metrics,
        Duration::from_secs(60),
    )
    .await;
    let a = get(addr, "/metrics").await;
    assert_eq!(a.code, 200);
    assert_eq!(a.content_type.as_deref(), Some("text/plain; version=0.0.4"));
    assert!(a.body.contains("podroute_routes_desired 7"), "{}", a.body);
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_405() {
    let addr = start(
        Arc::new(StatusBoard::new()),
        Metrics::new(),
        Duration::from_secs(60),
    )
    .await;
    for path in ["/", "/nope", "/status/extra", "/metricsx"] {
        assert_eq!(get(addr, path).await.code, 404, "{path}");
    }
    assert_eq!(request(addr, "POST", "/status").await.code, 405);
    assert_eq!(request(addr, "HEAD", "/livez").await.code, 503);
}

#[tokio::test]
async fn readiness_follows_the_published_status() {
    let board = Arc::new(StatusBoard::new());
    let addr = start(board.clone(), Metrics::new(), Duration::from_secs(60)).await;

    // Nothing published yet.
    let a = get(addr, "/readyz").await;
    assert_eq!((a.code, a.body.as_str()), (503, "starting\n"));
    assert_eq!(a.content_type.as_deref(), Some("text/plain; charset=utf-8"));

    let mut status = ready_status();
    status.health = Health {
        live: true,
        ready: false,
        not_ready: vec![
            "datastore not synced".into(),
            "mesh peer node01 not established".into(),
        ],
    };
    board.publish_status(status.clone());
    let a = get(addr, "/readyz").await;
    assert_eq!(a.code, 503);
    assert_eq!(
        a.body,
        "datastore not synced\nmesh peer node01 not established\n"
    );
    let a = get(addr, "/readyz?verbose").await;
    assert_eq!(a.code, 503);
    assert!(
        a.body.contains("[-]not ready: datastore not synced\n"),
        "{}",
        a.body
    );
    assert!(a.body.ends_with("readyz check failed\n"), "{}", a.body);

    board.publish_status(ready_status());
    let a = get(addr, "/readyz").await;
    assert_eq!((a.code, a.body.as_str()), (200, "ok\n"));
    let a = get(addr, "/readyz?verbose=1").await;
    assert_eq!(a.code, 200);
    assert!(
        a.body.contains("[+]bgp peers established (1/1)\n"),
        "{}",
        a.body
    );
    assert!(a.body.ends_with("readyz check passed\n"), "{}", a.body);
}

#[tokio::test]
async fn liveness_fails_on_a_stale_heartbeat() {
    let max_age = Duration::from_millis(100);
    let board = Arc::new(StatusBoard::new());
    let addr = start(board.clone(), Metrics::new(), max_age).await;

    let a = get(addr, "/livez").await;
    assert_eq!(
        (a.code, a.body.as_str()),
        (503, "no event loop has started\n")
    );

    // Fresh beats: live. Retried in case a loaded machine takes longer than max_age.
    let mut live = None;
    for _ in 0..20 {
        board.beat("bgp");
        board.beat("dataplane");
        let a = get(addr, "/livez").await;
        if a.code == 200 {
            live = Some(a.body);
            break;
        }
    }
    assert_eq!(live.as_deref(), Some("ok\n"));

    tokio::time::sleep(max_age * 3).await;
    board.beat("dataplane");
    let a = get(addr, "/livez").await;
    assert_eq!(a.code, 503);
    assert!(a.body.starts_with("bgp loop silent for "), "{}", a.body);
    assert!(a.body.ends_with('\n'), "{}", a.body);
}

#[tokio::test]
async fn status_and_routes_are_json() {
    let board = Arc::new(StatusBoard::new());
    let addr = start(board.clone(), Metrics::new(), Duration::from_secs(60)).await;

    let a = get(addr, "/status").await;
    assert_eq!(a.code, 200);
    assert_eq!(a.content_type.as_deref(), Some("application/json"));
    let empty: AgentStatus = serde_json::from_str(&a.body).unwrap();
    assert_eq!(empty, AgentStatus::default());

    board.publish_status(ready_status());
    board.publish_routes(routes_report());
    let status: AgentStatus = serde_json::from_str(&get(addr, "/status").await.body).unwrap();
    assert_eq!(status, ready_status());
    let a = get(addr, "/routes").await;
    assert_eq!(a.code, 200);
    assert_eq!(a.content_type.as_deref(), Some("application/json"));
    let routes: RoutesReport = serde_json::from_str(&a.body).unwrap();
    assert_eq!(routes, routes_report());
}

/// The client commands against a server running on its own runtime (they block).
#[test]
fn client_commands_against_the_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let board = Arc::new(StatusBoard::new());
    board.publish_status(ready_status());
    board.publish_routes(routes_report());
    let addr = rt.block_on(start(board, Metrics::new(), Duration::from_secs(60)));
    let url = format!("http://{addr}");

    let text = cli::status_command(&url, Output::Table).unwrap();
    assert!(
        text.starts_with(
            "podroute process is running (node master01, 192.168.92.128/24, AS 64512, ready)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("| 192.168.92.129 | node-to-node mesh | up    |"),
        "{text}"
    );

    let json = cli::status_command(&url, Output::Json).unwrap();
    let parsed: AgentStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, ready_status());

    let text = cli::routes_command(&url, Output::Table).unwrap();
    assert!(
        text.contains(
            "172.16.196.128  192.168.92.129  255.255.255.192 UG    0      0        0 ens33 block-direct node01\n"
        ),
        "{text}"
    );
    // No scheme, trailing slash: still the same agent.
    let json = cli::routes_command(&format!("{addr}/"), Output::Json).unwrap();
    assert_eq!(
        serde_json::from_str::<RoutesReport>(&json).unwrap(),
        routes_report()
    );

    // A path prefix is kept: /x/status does not exist.
    match cli::status_command(&format!("{url}/x"), Output::Table) {
        Err(AgentError::Http { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unreachable_agent_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let err = cli::status_command(&url, Output::Table).unwrap_err();
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot reach the podroute agent at {url}: ")),
        "{msg}"
    );
    assert!(
        msg.ends_with("(is it running? is --metrics-addr or --status-addr different?)"),
        "{msg}"
    );

    for bad in [
        "https://127.0.0.1:9091",
        "http://",
        "ftp://x",
        "http://u@h:1",
    ] {
        let err = cli::routes_command(bad, Output::Table).unwrap_err();
        assert!(matches!(err, AgentError::BadUrl { .. }), "{bad}: {err:?}");
    }
}

/// Something that is not the agent answers on the port.
#[test]
fn malformed_answers_are_clear_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = [
        "<html>hello</html>",
        "{\"node\": 5}",
        "[1, 2",
        "{\"node\":\"n\"}",
    ];
    rt.spawn(async move {
        for body in bodies.iter().cycle() {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    let url = format!("http://{addr}");
    for (i, output) in [Output::Table, Output::Table, Output::Json, Output::Table]
        .into_iter()
        .enumerate()
    {
        let err = cli::status_command(&url, output).unwrap_err();
        assert!(matches!(err, AgentError::Malformed { .. }), "{i}: {err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "the podroute agent at {url} sent a /status document"
            )),
            "{err}"
        );
    }
}

#[tokio::test]
async fn fetch_async_from_async_code() {
    let board = Arc::new(StatusBoard::new());
    board.publish_routes(routes_report());
    let addr = start(board, Metrics::new(), Duration::from_secs(60)).await;
    let body = cli::fetch_async(&format!("http://{addr}"), "/routes")
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<RoutesReport>(&body).unwrap(),
        routes_report()
    );
    let err = cli::fetch_async(&format!("http://{addr}"), "/nope")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the podroute agent at http://{addr} answered GET /nope with 404 Not Found: not found"
        )
    );
}

/// Generous bound on anything the tests wait for, so that a regression fails instead of
/// hanging; not a timing goal.
const PATIENCE: Duration = Duration::from_secs(30);

async fn start_limited(board: Arc<StatusBoard>, limits: Limits) -> SocketAddr {
    let listener = podroute::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = podroute::http::router(board, Metrics::new(), Duration::from_secs(60));
    tokio::spawn(podroute::http::serve_app(listener, app, limits));
    addr
}

fn live_board() -> Arc<StatusBoard> {
    let board = Arc::new(StatusBoard::new());
    board.beat("bgp");
    board
}

/// Raises this process's soft open-file limit to the hard one; returns the soft limit.
fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Reads until the server closes the connection (EOF or reset); false if it is still open
/// after [`PATIENCE`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    waited.is_ok()
}

/// The finding of issue 14: ~20,000 idle connections to :9091 exhausted the agent's
/// descriptors. Thousands of connections that never send a byte: the server holds at most
/// its cap of them, `/livez` still answers during the flood, and every idle one is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_is_bounded_and_livez_answers() {
    let soft = raise_own_fd_limit();
    let cap = 64;
    // Client ends all live in this process; leave room for the server's cap and the runtime.
    let flood = usize::try_from(soft.saturating_sub(400))
        .unwrap_or(usize::MAX)
        .min(3000);
    if flood < 1000 {
        agent_guard::cannot_run(
            "http",
            "idle_connection_flood_is_bounded_and_livez_answers",
            &format!("the open-file limit is {soft}, too low for a flood of 1000 connections"),
            "Raise `ulimit -n` (hard limit) to at least 1500.",
        );
        return;
    }
    let limits = Limits {
        max_connections: cap,
        header_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_secs(2),
    };
    let addr = start_limited(live_board(), limits).await;
    let before = open_fds();

    let mut idle = Vec::with_capacity(flood);
    for _ in 0..flood {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Every client end is open here; the server side must not have followed them.
    let held_by_server = open_fds().saturating_sub(before + flood);
    assert!(
        held_by_server <= cap + 8,
        "{flood} idle connections: the server holds {held_by_server} descriptors (cap {cap})"
    );

    // Kubelet's probe gets through during the flood (it displaces the least recent one).
    let a = tokio::time::timeout(PATIENCE, get(addr, "/livez"))
        .await
        .expect("/livez did not answer during the flood");
    assert_eq!((a.code, a.body.as_str()), (200, "ok\n"));

    // None of them sent a byte: each is closed, by eviction or by the idle timeout.
    let mut still_open = 0;
    for stream in &mut idle {
        if !closed_by_server(stream).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections the server never closed");
    let a = get(addr, "/livez").await;
    assert_eq!(a.code, 200);
}

/// Below the cap, a quiet connection is closed after the idle timeout: one that never sent a
/// request, and one kept alive after an answer. A connection in use is not.
#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let limits = Limits {
        max_connections: 1000,
        header_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_millis(500),
    };
    let addr = start_limited(live_board(), limits).await;

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut kept_alive = TcpStream::connect(addr).await.unwrap();
    kept_alive
        .write_all(format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = kept_alive.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // A busy client that keeps asking stays connected across several idle timeouts.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    for _ in 0..8 {
        busy.write_all(format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let n = busy.read(&mut answer).await.unwrap();
        assert!(n > 0, "the server closed a connection in use");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    assert!(
        closed_by_server(&mut silent).await,
        "a silent connection stayed open"
    );
    assert!(
        closed_by_server(&mut kept_alive).await,
        "an idle kept-alive connection stayed open"
    );
}

/// A client trickling its request head a byte at a time (slowloris) is not idle, but it must
/// finish the head within the header timeout.
#[tokio::test]
async fn a_request_head_must_arrive_within_the_header_timeout() {
    let limits = Limits {
        max_connections: 1000,
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(600),
    };
    let addr = start_limited(live_board(), limits).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    // 100 bytes, 100 ms apart: ten seconds of trickle, far beyond the header timeout.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slow.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            // hyper may answer 408 before closing
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    assert!(
        closed,
        "a request head trickled for 10 s was still being read"
    );
}

#[tokio::test]
async fn status_addr_serves_status_and_routes_and_metrics_addr_does_not() {
    let board = Arc::new(StatusBoard::new());
    board.publish_status(ready_status());
    board.publish_routes(routes_report());
    let metrics = Metrics::new();
    metrics.routes_desired.set(3);
    let config = HttpConfig {
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        status_addr: Some("127.0.0.1:0".parse().unwrap()),
        limits: Limits::default(),
        live_max_age: Duration::from_secs(60),
    };
    let servers = podroute::http::start(&config, board, metrics)
        .await
        .unwrap();
    let (metrics_addr, status_addr) = (servers.metrics_addr, servers.status_addr.unwrap());
    assert_ne!(metrics_addr, status_addr);

    let a = get(metrics_addr, "/metrics").await;
    assert_eq!(a.code, 200);
    assert!(a.body.contains("podroute_routes_desired 3"), "{}", a.body);
    assert_eq!(get(metrics_addr, "/livez").await.code, 503); // no loop beats here
    assert_eq!(get(metrics_addr, "/readyz").await.code, 200);
    for path in ["/status", "/routes"] {
        let a = get(metrics_addr, path).await;
        assert_eq!(a.code, 404, "{path} on the metrics address");
        assert!(
            a.body
                .contains(&format!("served on {status_addr} (--status-addr)")),
            "{}",
            a.body
        );
    }

    let status: AgentStatus =
        serde_json::from_str(&get(status_addr, "/status").await.body).unwrap();
    assert_eq!(status, ready_status());
    let routes: RoutesReport =
        serde_json::from_str(&get(status_addr, "/routes").await.body).unwrap();
    assert_eq!(routes, routes_report());
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(
            get(status_addr, path).await.code,
            404,
            "{path} on the status address"
        );
    }

    // The CLI, pointed (as its environment would) at the status address.
    let url = format!("http://{status_addr}");
    let text = tokio::task::spawn_blocking(move || cli::status_command(&url, Output::Table))
        .await
        .unwrap()
        .unwrap();
    assert!(
        text.contains("| 192.168.92.129 | node-to-node mesh | up    |"),
        "{text}"
    );
    let err = cli::fetch_async(&format!("http://{metrics_addr}"), "/status")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--status-addr"), "{err}");

    drop(servers);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(status_addr).await.is_err(),
        "dropping the servers stops them"
    );
}

fn many_peers(n: usize, down_every: usize) -> AgentStatus {
    let mut status = ready_status();
    status.peers = (0..n)
        .map(|i| {
            let down = i % down_every == 0;
            PeerRow {
                address: format!("10.1.{}.{}", i / 250, i % 250 + 1),
                port: 179,
                peer_type: "node-to-node mesh".into(),
                name: format!("node{i}"),
                remote_as: 64512,
                state: if down { "Active" } else { "Established" }.into(),
                info: if down {
                    "Connection refused"
                } else {
                    "Established"
                }
                .into(),
                ..PeerRow::default()
            }
        })
        .collect();
    status
}

#[tokio::test]
async fn status_lists_a_bounded_number_of_peers_unless_asked_for_all() {
    let board = Arc::new(StatusBoard::new());
    let full = many_peers(1000, 50); // 20 down
    board.publish_status(full.clone());
    let addr = start(board, Metrics::new(), Duration::from_secs(60)).await;

    let short: AgentStatus = serde_json::from_str(&get(addr, "/status").await.body).unwrap();
    assert_eq!(short.peers.len(), podroute::http::STATUS_PEERS_DEFAULT);
    assert!(
        short.peers[..20].iter().all(|p| p.state == "Active"),
        "the peers not Established come first"
    );
    let summary = short.peer_summary.as_ref().expect("a summary of all peers");
    assert_eq!((summary.total, summary.listed), (1000, 100));
    assert_eq!(summary.by_state.get("Established"), Some(&980));
    assert_eq!(summary.by_state.get("Active"), Some(&20));
    assert_eq!(short.health, full.health);

    let all: AgentStatus =
        serde_json::from_str(&get(addr, "/status?peers=all").await.body).unwrap();
    assert_eq!(all, full);
    let five: AgentStatus = serde_json::from_str(&get(addr, "/status?peers=5").await.body).unwrap();
    assert_eq!(five.peers.len(), 5);
    let a = get(addr, "/status?peers=lots").await;
    assert_eq!(a.code, 400, "{}", a.body);

    let url = format!("http://{addr}");
    let text = tokio::task::spawn_blocking(move || {
        (
            cli::status_command(&url, Output::Table).unwrap(),
            cli::status_command_with(&url, Output::Table, cli::Peers::All).unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(
        text.0.contains("Listed 100 of 1000 peers, those not Established first (20 Active, 980 Established); `podroute status --all` lists every peer.\n"),
        "{}",
        text.0
    );
    assert!(!text.1.contains("Listed"), "{}", text.1);
    assert!(text.1.contains("| 10.1.3.250 "), "{}", text.1);
}
