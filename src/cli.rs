//! `podroute status` and `podroute routes`: clients of the agent's status API (`GET /status`,
//! `GET /routes`, served by [`crate::http`]) that print what the agent reports, in the shape of
//! `calicoctl node status` and `route -n`.
//!
//! The rendering is pure ([`render_status`], [`render_routes`]); [`fetch`] does the HTTP.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::de::DeserializeOwned;

use crate::agent::status::{AgentStatus, PeerRow, RouteRow, RoutesReport};

/// Where the agent's HTTP server listens by default (`--metrics-addr 0.0.0.0:9091`).
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9091";

/// The agent URL the client commands use: `explicit` (`--agent` / `PODROUTE_AGENT`), else the
/// agent's own `PODROUTE_STATUS_ADDR` or `PODROUTE_METRICS_ADDR` from the environment (set in
/// the agent's container, where `kubectl exec ... podroute status` runs), else
/// [`DEFAULT_AGENT`].
pub fn agent_url(explicit: Option<String>) -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    agent_url_from(
        explicit,
        env("PODROUTE_STATUS_ADDR").as_deref(),
        env("PODROUTE_METRICS_ADDR").as_deref(),
    )
}

/// [`agent_url`] with the environment passed in. An address that is not a socket address is
/// skipped; an unspecified IP (`0.0.0.0`, `::`) is reached on loopback.
pub fn agent_url_from(
    explicit: Option<String>,
    status_addr: Option<&str>,
    metrics_addr: Option<&str>,
) -> String {
    if let Some(url) = explicit {
        return url;
    }
    [status_addr, metrics_addr]
        .into_iter()
        .flatten()
        .find_map(|a| a.trim().parse::<std::net::SocketAddr>().ok())
        .map_or_else(
            || DEFAULT_AGENT.to_string(),
            |mut addr| {
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr.ip() {
                        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                    });
                }
                format!("http://{addr}")
            },
        )
}

/// Which peers `podroute status` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Peers {
    /// The agent's default: at most 100, those not Established first, with a count of all.
    #[default]
    Default,
    /// Every peer (`--all`).
    All,
}

/// How long a request to the agent may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body accepted from the agent.
const MAX_BODY: usize = 64 << 20;

/// `--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// The agent's JSON document as received.
    Json,
}

/// Why a client command could not show what the agent reports.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot reach the podroute agent at {url}: {reason} (is it running? is --metrics-addr or --status-addr different?)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the podroute agent at {url} answered GET {path} with {status}: {body}")]
    Http {
        url: String,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("the podroute agent at {url} sent a {path} document that is not valid: {reason}")]
    Malformed {
        url: String,
        path: String,
        reason: String,
    },
}

/// `podroute status`: what to print.
pub fn status_command(agent: &str, output: Output) -> Result<String, AgentError> {
    status_command_with(agent, output, Peers::Default)
}

/// `podroute status [--all]`.
pub fn status_command_with(
    agent: &str,
    output: Output,
    peers: Peers,
) -> Result<String, AgentError> {
    let path = match peers {
        Peers::Default => "/status",
        Peers::All => "/status?peers=all",
    };
    let body = fetch(agent, path)?;
    match output {
        Output::Json => raw_json(agent, "/status", body),
        Output::Table => {
            let status: AgentStatus = decode(agent, "/status", &body)?;
            Ok(render_status(&status, SystemTime::now()))
        }
    }
}

/// `podroute routes`: what to print.
pub fn routes_command(agent: &str, output: Output) -> Result<String, AgentError> {
    let body = fetch(agent, "/routes")?;
    match output {
        Output::Json => raw_json(agent, "/routes", body),
        Output::Table => {
            let routes: RoutesReport = decode(agent, "/routes", &body)?;
            Ok(render_routes(&routes))
        }
    }
}

fn decode<T: DeserializeOwned>(agent: &str, path: &str, body: &str) -> Result<T, AgentError> {
    serde_json::from_str(body).map_err(|e| AgentError::Malformed {
        url: agent.to_string(),
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// The body unchanged (with a final newline) once it is known to be JSON at all.
fn raw_json(agent: &str, path: &str, mut body: String) -> Result<String, AgentError> {
    decode::<serde_json::Value>(agent, path, &body)?;
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Ok(body)
}

/// The agent's address split for a request: `host:port` to connect to, the `Host` header and
/// a path prefix (`http://h:9091/prefix`).
#[derive(Debug, PartialEq, Eq)]
struct Target {
    connect: String,
    host_header: String,
    base_path: String,
}

fn parse_agent(agent: &str) -> Result<Target, AgentError> {
    let bad = |reason: &str| AgentError::BadUrl {
        url: agent.to_string(),
        reason: reason.to_string(),
    };
    let with_scheme = if agent.contains("://") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    };
    let uri: Uri = with_scheme.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(bad(&format!("scheme {other} is not supported, only http"))),
        None => return Err(bad("no scheme")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user information is not supported"));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match &authority.as_str()[host.len()..] {
        "" => 80,
        rest => rest
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| bad("the port is not a number"))?,
    };
    Ok(Target {
        connect: format!("{host}:{port}"),
        host_header: authority.as_str().to_string(),
        base_path: uri.path().trim_end_matches('/').to_string(),
    })
}

/// `GET agent + path`: the body of a 200 answer. Blocks on its own runtime, so it must not
/// be called from async code (use [`fetch_async`] there).
pub fn fetch(agent: &str, path: &str) -> Result<String, AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AgentError::Unreachable {
            url: agent.to_string(),
            reason: format!("starting the I/O runtime: {e}"),
        })?;
    runtime.block_on(fetch_async(agent, path))
}

/// [`fetch`] for async callers; gives up after [`REQUEST_TIMEOUT`].
pub async fn fetch_async(agent: &str, path: &str) -> Result<String, AgentError> {
    let target = parse_agent(agent)?;
    let unreachable = |reason: String| AgentError::Unreachable {
        url: agent.to_string(),
        reason,
    };
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, get(&target, path)).await {
        Ok(result) => result.map_err(unreachable)?,
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            )));
        }
    };
    if status != StatusCode::OK {
        return Err(AgentError::Http {
            url: agent.to_string(),
            path: path.to_string(),
            status,
            body: clean(body.trim()),
        });
    }
    Ok(body)
}

async fn get(target: &Target, path: &str) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::TcpStream::connect(&target.connect)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let request = Request::get(format!("{}{path}", target.base_path))
        .header(header::HOST, &target.host_header)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("podroute/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// podroute status

/// `calicoctl node status`-like text, with SINCE in the system's local time zone.
pub fn render_status(status: &AgentStatus, now: SystemTime) -> String {
    let tz = TimeZone::try_system().unwrap_or(TimeZone::UTC);
    render_status_in(status, now, &tz)
}

/// [`render_status`] with SINCE in the time zone `tz`.
///
/// Columns: PEER ADDRESS (with `:port` when not 179), PEER TYPE, STATE, SINCE, INFO.
/// STATE follows what BIRD (and so calicoctl) shows for a BGP protocol: `up` when the session
/// is Established, `start` while it is being brought up (Idle, Connect, Active, OpenSent,
/// OpenConfirm), `down` for anything else. SINCE is `HH:MM:SS` when the last state change was
/// today, else its date (`YYYY-MM-DD`); `-` when unknown (0).
pub fn render_status_in(status: &AgentStatus, now: SystemTime, tz: &TimeZone) -> String {
    let mut facts = vec![format!("node {}", clean(&status.node))];
    if let Some(ip) = &status.ipv4 {
        facts.push(clean(ip));
    }
    if let Some(ip) = &status.ipv6 {
        facts.push(clean(ip));
    }
    facts.push(format!("AS {}", status.as_number));
    facts.push(
        if status.health.ready {
            "ready"
        } else {
            "not ready"
        }
        .to_string(),
    );
    if !status.health.live {
        facts.push("not live".to_string());
    }
    let mut out = format!("podroute process is running ({})\n", facts.join(", "));
    if !status.health.ready {
        out.push_str("Not ready:\n");
        if status.health.not_ready.is_empty() {
            out.push_str("  - starting\n");
        }
        for reason in &status.health.not_ready {
            out.push_str(&format!("  - {}\n", clean(reason)));
        }
    }
    if !status.config_warnings.is_empty() {
        out.push_str("Configuration not honoured as written:\n");
        for w in &status.config_warnings {
            out.push_str(&format!("  - {}\n", clean(w)));
        }
    }

    if !status.service_prefixes.is_empty() {
        out.push_str("Service prefixes advertised:\n");
        for row in &status.service_prefixes {
            out.push_str(&format!(
                "  {} - {}\n",
                clean(&row.prefix),
                row.reasons
                    .iter()
                    .map(|r| clean(r))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }

    let now = Timestamp::try_from(now).ok();
    let (v6, v4): (Vec<&PeerRow>, Vec<&PeerRow>) = status
        .peers
        .iter()
        .partition(|p| matches!(p.address.parse::<IpAddr>(), Ok(IpAddr::V6(_))));
    out.push_str("\nIPv4 BGP status\n");
    if v4.is_empty() {
        out.push_str("No IPv4 peers found.\n");
    } else {
        out.push_str(&peer_table(&v4, now, tz));
    }
    // As calicoctl: the IPv6 table whenever the node has IPv6 (or IPv6 peers).
    if !v6.is_empty() {
        out.push_str("\nIPv6 BGP status\n");
        out.push_str(&peer_table(&v6, now, tz));
    } else if status.ipv6.is_some() {
        out.push_str("\nIPv6 BGP status\nNo IPv6 peers found.\n");
    }
    if let Some(summary) = &status.peer_summary {
        let states: Vec<String> = summary
            .by_state
            .iter()
            .map(|(state, n)| format!("{n} {}", clean(state)))
            .collect();
        out.push_str(&format!(
            "\nListed {} of {} peers, those not Established first ({}); \
             `podroute status --all` lists every peer.\n",
            summary.listed,
            summary.total,
            states.join(", ")
        ));
    }
    out
}

/// calicoctl's STATE for a BGP FSM state.
pub fn peer_state_word(fsm_state: &str) -> &'static str {
    match fsm_state {
        "Established" => "up",
        "Idle" | "Connect" | "Active" | "OpenSent" | "OpenConfirm" => "start",
        _ => "down",
    }
}

fn peer_table(peers: &[&PeerRow], now: Option<Timestamp>, tz: &TimeZone) -> String {
    let header = ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"];
    let rows: Vec<[String; 5]> = peers
        .iter()
        .map(|p| {
            [
                peer_address(p),
                clean(&p.peer_type),
                peer_state_word(&p.state).to_string(),
                since(p.since, now, tz),
                clean(&p.info),
            ]
        })
        .collect();
    ascii_table(&header, &rows)
}

fn peer_address(p: &PeerRow) -> String {
    let addr = clean(&p.address);
    match (p.port, addr.parse::<IpAddr>()) {
        (0 | 179, _) => addr,
        (port, Ok(IpAddr::V6(_))) => format!("[{addr}]:{port}"),
        (port, _) => format!("{addr}:{port}"),
    }
}

fn since(unix: u64, now: Option<Timestamp>, tz: &TimeZone) -> String {
    let Some(at) = i64::try_from(unix)
        .ok()
        .filter(|s| *s > 0)
        .and_then(|s| Timestamp::from_second(s).ok())
    else {
        return "-".to_string();
    };
    let at = at.to_zoned(tz.clone());
    let today = now.map(|n| n.to_zoned(tz.clone()).date());
    if today == Some(at.date()) {
        at.strftime("%H:%M:%S").to_string()
    } else {
        at.strftime("%Y-%m-%d").to_string()
    }
}

/// A table bordered like calicoctl's: headers centered, cells left-aligned, one space of
/// padding.
fn ascii_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let len = |s: &str| s.chars().count();
    let mut widths = header.map(len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(len(cell));
        }
    }
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = rule.clone();
    for (h, w) in header.iter().zip(widths) {
        let left = (w - len(h)) / 2;
        let right = w - len(h) - left;
        out.push_str(&format!("| {}{h}{} ", " ".repeat(left), " ".repeat(right)));
    }
    out.push_str("|\n");
    out.push_str(&rule);
    for row in rows {
        for (cell, w) in row.iter().zip(widths) {
            out.push_str(&format!("| {cell}{} ", " ".repeat(w - len(cell))));
        }
        out.push_str("|\n");
    }
    out.push_str(&rule);
    out
}

/// Control characters (newlines in an error text) would break the layout.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// podroute routes

/// Marks a route that is not in the kernel (its error is listed below the table).
pub const NOT_INSTALLED_MARK: &str = "!";

/// `route -n`-like tables of the agent's routes.
///
/// IPv4: `Destination Gateway Genmask Flags Metric Ref Use Iface` as net-tools prints them,
/// then KIND and PEER, then [`NOT_INSTALLED_MARK`] on routes not installed. Flags: `U`, plus
/// `G` with a gateway and `H` for a host prefix. Blackhole routes show gateway `0.0.0.0`, flags
/// `U` and iface `*` (as the kernel's blackholes appear in `route -n`); a gateway route without
/// a device (the kernel picks it) shows iface `-`. Metric, Ref and Use are 0. IPv6 routes follow
/// in a second table shaped like `route -n -A inet6` (Destination/prefix, Next Hop `::` when
/// none, Flag, Met, Ref, Use, If). A prefix that does not parse is shown as is in the IPv4
/// table with genmask `?`.
pub fn render_routes(report: &RoutesReport) -> String {
    let (v6, v4): (Vec<&RouteRow>, Vec<&RouteRow>) = report
        .routes
        .iter()
        .partition(|r| matches!(r.prefix.parse::<IpNet>(), Ok(IpNet::V6(_))));

    let mut out = String::from("Kernel IP routing table\n");
    let rows: Vec<Row> = v4.iter().map(|r| Row::v4(r)).collect();
    out.push_str(&layout(
        "Destination     Gateway         Genmask         Flags Metric Ref    Use ",
        "Iface",
        &rows,
    ));
    if v4.is_empty() {
        out.push_str("(no IPv4 routes)\n");
    }
    if !v6.is_empty() {
        out.push_str("\nKernel IPv6 routing table\n");
        let rows: Vec<Row> = v6.iter().map(|r| Row::v6(r)).collect();
        out.push_str(&layout(
            "Destination                    Next Hop                   Flag Met Ref Use ",
            "If",
            &rows,
        ));
    }

    let failed: Vec<&RouteRow> = report.routes.iter().filter(|r| !r.installed).collect();
    if !failed.is_empty() {
        out.push_str(&format!("\n{NOT_INSTALLED_MARK} not installed:\n"));
        for r in failed {
            let error = r.error.as_deref().unwrap_or("no error reported");
            out.push_str(&format!("  {}: {}\n", clean(&r.prefix), clean(error)));
        }
    }
    if let Some(vx) = &report.vxlan {
        out.push_str("\nVXLAN devices:\n");
        for d in &vx.devices {
            out.push_str(&format!(
                "  {} vxlan id {} dstport {} nolearning local {} dev {} address {} mtu {} inet {}\n",
                clean(&d.name),
                d.vni,
                d.port,
                clean(&d.local),
                clean(&d.parent),
                clean(&d.mac),
                d.mtu.map_or("-".to_string(), |m| m.to_string()),
                clean(d.address.as_deref().unwrap_or("(no tunnel address)")),
            ));
            if let Some(e) = &d.error {
                out.push_str(&format!("    {NOT_INSTALLED_MARK} {}\n", clean(e)));
            }
        }
        out.push_str(&format!(
            "VTEPs: {} (neighbour entries {} programmed, {} failed; FDB entries {} programmed, \
             {} failed)\n",
            vx.vteps.len(),
            vx.neighbours_programmed,
            vx.neighbours_failed,
            vx.fdb_programmed,
            vx.fdb_failed
        ));
        for v in &vx.vteps {
            out.push_str(&format!(
                "  {} lladdr {} dst {} dev {} ({})\n",
                clean(&v.tunnel_ip),
                clean(&v.mac),
                clean(&v.underlay),
                clean(&v.device),
                clean(&v.node)
            ));
        }
        for f in &vx.failures {
            out.push_str(&format!("  {NOT_INSTALLED_MARK} {}\n", clean(f)));
        }
    }
    let by_other: Vec<(&RouteRow, &str)> = report
        .routes
        .iter()
        .filter_map(|r| Some((r, r.programmed_by.as_deref()?)))
        .collect();
    if !by_other.is_empty() {
        out.push_str("\nprogrammed by another owner (identical to the plan; left to it):\n");
        for (r, by) in by_other {
            out.push_str(&format!("  {}: {}\n", clean(&r.prefix), clean(by)));
        }
    }
    out
}

/// One table row: the fixed-width net-tools part up to the interface, then the rest.
struct Row {
    fixed: String,
    iface: String,
    kind: String,
    peer: String,
    installed: bool,
}

impl Row {
    fn iface(r: &RouteRow) -> String {
        match (&r.device, &r.gateway) {
            (Some(dev), _) => clean(dev),
            (None, Some(_)) => "-".to_string(),
            (None, None) => "*".to_string(),
        }
    }

    fn flags(r: &RouteRow, host: bool) -> String {
        let mut flags = String::from("U");
        if r.gateway.is_some() {
            flags.push('G');
        }
        if host {
            flags.push('H');
        }
        flags
    }

    fn rest(r: &RouteRow, fixed: String) -> Row {
        Row {
            fixed,
            iface: Self::iface(r),
            kind: clean(&r.kind),
            peer: r.peer.as_deref().map_or_else(|| "-".to_string(), clean),
            installed: r.installed,
        }
    }

    /// net-tools: `%-15s %-15s %-15s %-5s %-6d %-2d %7d `.
    fn v4(r: &RouteRow) -> Row {
        let (dest, mask, host) = match r.prefix.parse::<IpNet>() {
            Ok(net) => (
                net.addr().to_string(),
                net.netmask().to_string(),
                net.prefix_len() == net.max_prefix_len(),
            ),
            Err(_) => (clean(&r.prefix), "?".to_string(), false),
        };
        let gateway = r.gateway.as_deref().map_or_else(|| "0.0.0.0".into(), clean);
        let fixed = format!(
            "{dest:<15} {gateway:<15} {mask:<15} {:<5} {:<6} {:<2} {:>7} ",
            Self::flags(r, host),
            0,
            0,
            0
        );
        Self::rest(r, fixed)
    }

    /// net-tools: `%-30s %-26s %-4s %-3d %-1d%6d `.
    fn v6(r: &RouteRow) -> Row {
        let (dest, host) = match r.prefix.parse::<IpNet>() {
            Ok(net) => (net.to_string(), net.prefix_len() == net.max_prefix_len()),
            Err(_) => (clean(&r.prefix), false),
        };
        let gateway = r.gateway.as_deref().map_or_else(|| "::".into(), clean);
        let fixed = format!(
            "{dest:<30} {gateway:<26} {:<4} {:<3} {:<1}{:>6} ",
            Self::flags(r, host),
            0,
            0,
            0
        );
        Self::rest(r, fixed)
    }
}

/// The rows under `header` (the fixed part) + interface, KIND, PEER columns sized to fit.
fn layout(header: &str, iface_header: &str, rows: &[Row]) -> String {
    let len = |s: &str| s.chars().count();
    let iface_w = rows
        .iter()
        .map(|r| len(&r.iface))
        .fold(len(iface_header), usize::max);
    let kind_w = rows.iter().map(|r| len(&r.kind)).fold(4, usize::max);
    let peer_w = rows.iter().map(|r| len(&r.peer)).fold(4, usize::max);
    let line = |fixed: &str, iface: &str, kind: &str, peer: &str, mark: &str| {
        let mut l = format!(
            "{fixed}{iface}{} {kind}{} {peer}{} {mark}",
            " ".repeat(iface_w - len(iface)),
            " ".repeat(kind_w - len(kind)),
            " ".repeat(peer_w - len(peer)),
        );
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(header, iface_header, "KIND", "PEER", "");
    for r in rows {
        let mark = if r.installed { "" } else { NOT_INSTALLED_MARK };
        out.push_str(&line(&r.fixed, &r.iface, &r.kind, &r.peer, mark));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_url_prefers_the_flag_then_the_status_then_the_metrics_address() {
        assert_eq!(
            agent_url_from(Some("http://x:1".into()), Some("127.0.0.1:9092"), None),
            "http://x:1"
        );
        assert_eq!(
            agent_url_from(None, Some("127.0.0.1:9092"), Some("0.0.0.0:9091")),
            "http://127.0.0.1:9092"
        );
        assert_eq!(
            agent_url_from(None, None, Some("0.0.0.0:9099")),
            "http://127.0.0.1:9099"
        );
        assert_eq!(
            agent_url_from(None, Some("[::]:9092"), None),
            "http://[::1]:9092"
        );
        assert_eq!(agent_url_from(None, Some("nonsense"), None), DEFAULT_AGENT);
        assert_eq!(agent_url_from(None, None, None), DEFAULT_AGENT);
    }
    use crate::agent::status::Health;

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    /// 2023-11-14 22:13:20 UTC.
    const NOW: u64 = 1_700_000_000;
    /// 2023-11-14 09:31:12 UTC.
    const MORNING: u64 = 1_699_954_272;

    fn mesh_peer() -> PeerRow {
        PeerRow {
            address: "192.168.92.129".into(),
            port: 179,
            peer_type: "node-to-node mesh".into(),
            name: "node01".into(),
            remote_as: 64512,
            state: "Established".into(),
            since: MORNING,
            info: "Established".into(),
            ..PeerRow::default()
        }
    }

    fn master01() -> AgentStatus {
        AgentStatus {
            node: "master01".into(),
            ipv4: Some("192.168.92.128/24".into()),
            as_number: 64512,
            health: Health {
                live: true,
                ready: true,
                not_ready: vec![],
            },
            peers: vec![mesh_peer()],
            ..AgentStatus::default()
        }
    }

    #[test]
    fn status_lists_service_prefixes_with_their_reasons() {
        let status = AgentStatus {
            service_prefixes: vec![crate::agent::status::ServicePrefixRow {
                prefix: "10.96.0.10/32".into(),
                reasons: vec![
                    "shop/web: externalTrafficPolicy Local, ready endpoint on this node \
                     (serviceClusterIPs)"
                        .into(),
                ],
            }],
            ..master01()
        };
        let text = render_status_in(&status, at(NOW), &TimeZone::UTC);
        assert!(
            text.contains(
                "Service prefixes advertised:\n  10.96.0.10/32 - shop/web: externalTrafficPolicy \
                 Local, ready endpoint on this node (serviceClusterIPs)\n"
            ),
            "{text}"
        );
        let plain = render_status_in(&master01(), at(NOW), &TimeZone::UTC);
        assert!(!plain.contains("Service prefixes"), "{plain}");
    }

    #[test]
    fn status_ready_with_one_mesh_peer() {
        let text = render_status_in(&master01(), at(NOW), &TimeZone::UTC);
        assert_eq!(
            text,
            "\
podroute process is running (node master01, 192.168.92.128/24, AS 64512, ready)

IPv4 BGP status
+----------------+-------------------+-------+----------+-------------+
|  PEER ADDRESS  |     PEER TYPE     | STATE |  SINCE   |    INFO     |
+----------------+-------------------+-------+----------+-------------+
| 192.168.92.129 | node-to-node mesh | up    | 09:31:12 | Established |
+----------------+-------------------+-------+----------+-------------+
"
        );
    }

    #[test]
    fn status_not_ready_with_ipv6_peers_ports_and_old_dates() {
        let mut status = master01();
        status.health = Health {
            live: false,
            ready: false,
            not_ready: vec!["datastore not synced".into()],
        };
        status.peers.push(PeerRow {
            address: "10.0.0.1".into(),
            port: 1790,
            peer_type: "global".into(),
            state: "Active".into(),
            since: 1_600_000_000,
            info: "Connection refused".into(),
            ..PeerRow::default()
        });
        status.peers.push(PeerRow {
            address: "fd00::1".into(),
            port: 179,
            peer_type: "node specific".into(),
            state: "Idle".into(),
            since: 0,
            info: "Hold Timer\nExpired".into(),
            ..PeerRow::default()
        });
        status.peers.push(PeerRow {
            address: "fd00::2".into(),
            port: 1179,
            peer_type: "global".into(),
            state: "Stopped".into(),
            since: u64::MAX,
            info: String::new(),
            ..PeerRow::default()
        });
        let text = render_status_in(&status, at(NOW), &TimeZone::UTC);
        assert_eq!(
            text,
            "\
podroute process is running (node master01, 192.168.92.128/24, AS 64512, not ready, not live)
Not ready:
  - datastore not synced

IPv4 BGP status
+----------------+-------------------+-------+------------+--------------------+
|  PEER ADDRESS  |     PEER TYPE     | STATE |   SINCE    |        INFO        |
+----------------+-------------------+-------+------------+--------------------+
| 192.168.92.129 | node-to-node mesh | up    | 09:31:12   | Established        |
| 10.0.0.1:1790  | global            | start | 2020-09-13 | Connection refused |
+----------------+-------------------+-------+------------+--------------------+

IPv6 BGP status
+----------------+---------------+-------+-------+--------------------+
|  PEER ADDRESS  |   PEER TYPE   | STATE | SINCE |        INFO        |
+----------------+---------------+-------+-------+--------------------+
| fd00::1        | node specific | start | -     | Hold Timer Expired |
| [fd00::2]:1179 | global        | down  | -     |                    |
+----------------+---------------+-------+-------+--------------------+
"
        );
    }

    #[test]
    fn ipv6_only_node_shows_its_address_and_its_ipv6_mesh() {
        let status = AgentStatus {
            node: "v6node".into(),
            ipv6: Some("fd00:92::128/64".into()),
            as_number: 64512,
            health: Health {
                live: true,
                ready: true,
                not_ready: vec![],
            },
            peers: vec![PeerRow {
                address: "fd00:92::129".into(),
                port: 179,
                peer_type: "node-to-node mesh".into(),
                state: "Established".into(),
                since: 0,
                info: "Established".into(),
                ..PeerRow::default()
            }],
            ..AgentStatus::default()
        };
        let text = render_status_in(&status, at(NOW), &TimeZone::UTC);
        assert!(
            text.starts_with(
                "podroute process is running (node v6node, fd00:92::128/64, AS 64512, ready)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("IPv4 BGP status\nNo IPv4 peers found.\n"),
            "{text}"
        );
        let v6 = text.split("IPv6 BGP status\n").nth(1).unwrap_or_default();
        assert!(
            v6.contains("| fd00:92::129 | node-to-node mesh | up "),
            "{text}"
        );
        // A dual-stack node without IPv6 peers says so.
        let mut dual = status.clone();
        dual.ipv4 = Some("192.168.92.128/24".into());
        dual.peers.clear();
        let text = render_status_in(&dual, at(NOW), &TimeZone::UTC);
        assert!(
            text.contains("IPv6 BGP status\nNo IPv6 peers found.\n"),
            "{text}"
        );
    }

    #[test]
    fn status_without_peers_or_address() {
        let status = AgentStatus {
            node: "n1".into(),
            as_number: 65001,
            ..AgentStatus::default()
        };
        assert_eq!(
            render_status_in(&status, at(NOW), &TimeZone::UTC),
            "\
podroute process is running (node n1, AS 65001, not ready, not live)
Not ready:
  - starting

IPv4 BGP status
No IPv4 peers found.
"
        );
    }

    #[test]
    fn since_is_a_date_when_the_local_day_differs() {
        // 09:31:12 UTC is 18:31:12 on the 14th in UTC+9, where "now" is already the 15th.
        let tokyo = TimeZone::fixed(jiff::tz::offset(9));
        let text = render_status_in(&master01(), at(NOW), &tokyo);
        assert!(text.contains("| up    | 2023-11-14 |"), "{text}");
        let utc_minus_1 = TimeZone::fixed(jiff::tz::offset(-1));
        let text = render_status_in(&master01(), at(NOW), &utc_minus_1);
        assert!(text.contains("| up    | 08:31:12 |"), "{text}");
    }

    #[test]
    fn state_words() {
        assert_eq!(peer_state_word("Established"), "up");
        for s in ["Idle", "Connect", "Active", "OpenSent", "OpenConfirm"] {
            assert_eq!(peer_state_word(s), "start", "{s}");
        }
        assert_eq!(peer_state_word(""), "down");
        assert_eq!(peer_state_word("established"), "down");
    }

    fn route(prefix: &str, gateway: Option<&str>, device: Option<&str>, kind: &str) -> RouteRow {
        RouteRow {
            prefix: prefix.into(),
            gateway: gateway.map(Into::into),
            device: device.map(Into::into),
            onlink: false,
            kind: kind.into(),
            peer: None,
            installed: true,
            error: None,
            programmed_by: None,
        }
    }

    /// shared/seeds/001: master01's `route -n` after `ipipMode: CrossSubnet`, the rows
    /// podroute owns.
    #[test]
    fn routes_seed001_master01_cross_subnet() {
        let mut direct = route(
            "172.16.196.128/26",
            Some("192.168.92.129"),
            Some("ens33"),
            "block-direct",
        );
        direct.peer = Some("node01".into());
        let report = RoutesReport {
            node: "master01".into(),
            vxlan: None,
            routes: vec![
                direct,
                route("172.16.241.64/26", None, None, "blackhole"),
                route(
                    "172.16.241.65/32",
                    None,
                    Some("cali99ba0e1a1c8"),
                    "workload",
                ),
            ],
        };
        let text = render_routes(&report);
        assert_eq!(
            text,
            "\
Kernel IP routing table
Destination     Gateway         Genmask         Flags Metric Ref    Use Iface           KIND         PEER
172.16.196.128  192.168.92.129  255.255.255.192 UG    0      0        0 ens33           block-direct node01
172.16.241.64   0.0.0.0         255.255.255.192 U     0      0        0 *               blackhole    -
172.16.241.65   0.0.0.0         255.255.255.255 UH    0      0        0 cali99ba0e1a1c8 workload     -
"
        );
        // Up to the interface, each row is the seed's line verbatim.
        let seed = [
            "Destination     Gateway         Genmask         Flags Metric Ref    Use Iface",
            "172.16.196.128  192.168.92.129  255.255.255.192 UG    0      0        0 ens33",
            "172.16.241.64   0.0.0.0         255.255.255.192 U     0      0        0 *",
            "172.16.241.65   0.0.0.0         255.255.255.255 UH    0      0        0 cali99ba0e1a1c8",
        ];
        for (line, want) in text.lines().skip(1).zip(seed) {
            assert_eq!(line[..want.len()], *want);
            assert!(line[want.len()..].starts_with(' '), "{line}");
        }
    }

    #[test]
    fn routes_programmed_by_another_owner_are_listed_as_installed() {
        let mut cni = route(
            "172.16.241.65/32",
            None,
            Some("cali99ba0e1a1c8"),
            "workload",
        );
        cni.programmed_by = Some("another owner (proto boot)".into());
        let report = RoutesReport {
            node: "master01".into(),
            vxlan: None,
            routes: vec![cni, route("172.16.241.64/26", None, None, "blackhole")],
        };
        let text = render_routes(&report);
        assert!(!text.contains(NOT_INSTALLED_MARK), "{text}");
        assert!(
            text.ends_with(
                "\nprogrammed by another owner (identical to the plan; left to it):\n  \
                 172.16.241.65/32: another owner (proto boot)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn routes_ipv6_unresolved_device_and_not_installed() {
        let mut external = route("10.9.0.0/26", Some("10.0.0.1"), None, "external");
        external.peer = Some("10.0.0.1".into());
        let mut failed = route(
            "172.16.241.65/32",
            None,
            Some("cali99ba0e1a1c8"),
            "workload",
        );
        failed.installed = false;
        failed.error = Some("No such device (os error 19)".into());
        let mut failed6 = route(
            "fd00:10::/122",
            Some("fd00::2"),
            Some("eth0"),
            "block-direct",
        );
        failed6.peer = Some("node02".into());
        failed6.installed = false;
        let report = RoutesReport {
            node: "master01".into(),
            vxlan: None,
            routes: vec![
                external,
                failed,
                failed6,
                route("fd00:10::1/128", None, Some("calia"), "workload"),
                route("fd00:10::40/122", None, None, "blackhole"),
            ],
        };
        assert_eq!(
            render_routes(&report),
            "\
Kernel IP routing table
Destination     Gateway         Genmask         Flags Metric Ref    Use Iface           KIND     PEER
10.9.0.0        10.0.0.1        255.255.255.192 UG    0      0        0 -               external 10.0.0.1
172.16.241.65   0.0.0.0         255.255.255.255 UH    0      0        0 cali99ba0e1a1c8 workload -        !

Kernel IPv6 routing table
Destination                    Next Hop                   Flag Met Ref Use If    KIND         PEER
fd00:10::/122                  fd00::2                    UG   0   0     0 eth0  block-direct node02 !
fd00:10::1/128                 ::                         UH   0   0     0 calia workload     -
fd00:10::40/122                ::                         U    0   0     0 *     blackhole    -

! not installed:
  172.16.241.65/32: No such device (os error 19)
  fd00:10::/122: no error reported
"
        );
    }

    #[test]
    fn routes_show_the_vxlan_devices_and_vteps() {
        use crate::agent::status::{VtepRow, VxlanDeviceRow, VxlanReport};
        let mut vx = route(
            "172.16.10.0/26",
            Some("172.16.10.0"),
            Some("vxlan.calico"),
            "block-vxlan",
        );
        vx.onlink = true;
        vx.peer = Some("node02".into());
        let report = RoutesReport {
            node: "master01".into(),
            routes: vec![vx],
            vxlan: Some(VxlanReport {
                devices: vec![VxlanDeviceRow {
                    name: "vxlan.calico".into(),
                    vni: 4096,
                    port: 4789,
                    mac: "66:00:00:00:00:01".into(),
                    local: "192.168.92.128".into(),
                    parent: "ens33".into(),
                    address: Some("172.16.241.64/32".into()),
                    mtu: Some(1450),
                    error: None,
                }],
                vteps: vec![VtepRow {
                    device: "vxlan.calico".into(),
                    node: "node02".into(),
                    tunnel_ip: "172.16.10.0".into(),
                    mac: "66:00:00:00:00:02".into(),
                    underlay: "192.168.93.130".into(),
                }],
                neighbours_programmed: 1,
                neighbours_failed: 0,
                fdb_programmed: 0,
                fdb_failed: 1,
                failures: vec![
                    "vxlan.calico: FDB entry 66:00:00:00:00:02 dst 192.168.93.130: \
                                No such device (os error 19)"
                        .into(),
                ],
            }),
        };
        let text = render_routes(&report);
        assert!(text.contains("vxlan.calico block-vxlan node02"), "{text}");
        assert!(
            text.contains(
                "\nVXLAN devices:\n  vxlan.calico vxlan id 4096 dstport 4789 nolearning local \
                 192.168.92.128 dev ens33 address 66:00:00:00:00:01 mtu 1450 inet \
                 172.16.241.64/32\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "VTEPs: 1 (neighbour entries 1 programmed, 0 failed; FDB entries 0 programmed, \
                 1 failed)\n  172.16.10.0 lladdr 66:00:00:00:00:02 dst 192.168.93.130 dev \
                 vxlan.calico (node02)\n  ! vxlan.calico: FDB entry"
            ),
            "{text}"
        );
        // The JSON round trip keeps it; an agent without VXLAN sends none.
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<RoutesReport>(&json).unwrap(), report);
        let none = serde_json::to_string(&RoutesReport::default()).unwrap();
        assert!(!none.contains("vxlan"), "{none}");
    }

    #[test]
    fn routes_empty_and_garbage() {
        assert_eq!(
            render_routes(&RoutesReport::default()),
            "\
Kernel IP routing table
Destination     Gateway         Genmask         Flags Metric Ref    Use Iface KIND PEER
(no IPv4 routes)
"
        );
        let mut odd = route(
            "not a prefix",
            Some("gw\nx"),
            Some("a-very-long-device-name-é"),
            "",
        );
        odd.installed = false;
        odd.error = Some("line one\nline two".into());
        let text = render_routes(&RoutesReport {
            node: String::new(),
            vxlan: None,
            routes: vec![odd],
        });
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(
            text.contains("not a prefix    gw x            ?               UG "),
            "{text}"
        );
        assert!(
            text.ends_with("  not a prefix: line one line two\n"),
            "{text}"
        );
    }

    #[test]
    fn agent_urls() {
        let t = parse_agent("http://127.0.0.1:9091").unwrap();
        assert_eq!(
            t,
            Target {
                connect: "127.0.0.1:9091".into(),
                host_header: "127.0.0.1:9091".into(),
                base_path: String::new(),
            }
        );
        let t = parse_agent("localhost").unwrap();
        assert_eq!(
            (t.connect.as_str(), t.base_path.as_str()),
            ("localhost:80", "")
        );
        let t = parse_agent("http://[::1]:9091/agent/").unwrap();
        assert_eq!(
            (
                t.connect.as_str(),
                t.host_header.as_str(),
                t.base_path.as_str()
            ),
            ("[::1]:9091", "[::1]:9091", "/agent")
        );
        for bad in ["https://h", "http://", "http://user@h", "h:notaport", ""] {
            assert!(
                matches!(parse_agent(bad), Err(AgentError::BadUrl { .. })),
                "{bad}"
            );
        }
    }
}
