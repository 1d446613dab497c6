//! The agent's HTTP server: Prometheus metrics, kubelet health probes and the status API that
//! `podroute status` / `podroute routes` read.
//!
//! | path       | answer                                                                  |
//! |------------|-------------------------------------------------------------------------|
//! | `/metrics` | [`Metrics::encode`], `text/plain; version=0.0.4`                         |
//! | `/livez`   | 200 `ok`, or 503 with the stalled event loops, one per line              |
//! | `/readyz`  | 200 `ok`, or 503 with the not-ready reasons; `?verbose` lists the checks |
//! | `/status`  | [`AgentStatus`](crate::agent::status::AgentStatus) as JSON               |
//! | `/routes`  | [`RoutesReport`](crate::agent::status::RoutesReport) as JSON             |
//!
//! Other paths answer 404; a known path with a method other than GET/HEAD answers 405.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::agent::status::StatusBoard;
use crate::metrics::Metrics;

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

/// The routes of the server, for embedding or for driving without a socket.
pub fn router(board: Arc<StatusBoard>, metrics: Metrics, live_max_age: Duration) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/routes", get(routes))
        .fallback(not_found)
        .with_state(AppState {
            board,
            metrics,
            live_max_age,
        })
}

/// Serves the endpoints on `listener` until the task is dropped or the listener fails.
/// `/livez` fails when an event loop has not beaten within `live_max_age`.
pub async fn serve(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    live_max_age: Duration,
) -> io::Result<()> {
    axum::serve(listener, router(board, metrics, live_max_age)).await
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

async fn status(State(s): State<AppState>) -> Response {
    json(&*s.board.status())
}

async fn routes(State(s): State<AppState>) -> Response {
    match s.board.routes().await {
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
