//! The agent's HTTP server on a real socket, and the `podroute status` / `podroute routes`
//! client against it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use podroute::agent::status::{AgentStatus, Health, PeerRow, RouteRow, RoutesReport, StatusBoard};
use podroute::cli::{self, AgentError, Output};
use podroute::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
