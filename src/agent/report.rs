//! Turns the agent's internal view into what users read: status rows, the route report and
//! the metrics derived from them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use podroute_bgp::{PeerStatus, SpeakerSummary};

use super::PeerCounts;
use super::peers::PeerType;
use super::status::{PeerRow, RouteRow, RoutesReport};
use crate::dataplane::DataplaneStatus;
use crate::dataplane::ipip_user::{DropReason, IpipCountersSnapshot};
use crate::dataplane::kernel::Protocol;
use crate::metrics::{Metrics, PEER_STATE_CODES, advance, delta, peer_state_code};
use crate::plan::{DesiredRoute, RouteKind};
use crate::state::ClusterState;

/// Name, type and passivity of each configured peer, by address.
pub(crate) type PeerInfo = BTreeMap<IpAddr, (String, PeerType, bool)>;

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The peer table of `podroute status`.
pub(crate) fn peer_rows(statuses: &[PeerStatus], info: &PeerInfo) -> Vec<PeerRow> {
    // One lookup per peer, not a scan of every status (quadratic at thousands of peers).
    let by_addr: HashMap<IpAddr, &PeerStatus> = statuses.iter().map(|s| (s.addr, s)).collect();
    let mut rows: Vec<PeerRow> = info
        .iter()
        .map(|(addr, (name, peer_type, passive))| {
            let status = by_addr.get(addr).copied();
            let state = status.map_or_else(|| "Idle".to_string(), |s| s.state.to_string());
            let stale = status
                .and_then(|s| s.graceful_restart.as_ref())
                .map_or(0, |g| g.stale_prefixes);
            let info = match status {
                Some(_) if stale > 0 => format!("graceful restart: {stale} stale routes kept"),
                Some(_) if state == "Established" => "Established".to_string(),
                Some(s) => s.last_error.clone().unwrap_or_else(|| {
                    if *passive {
                        "waiting for the peer to connect".into()
                    } else {
                        "connecting".into()
                    }
                }),
                None => "not started".to_string(),
            };
            PeerRow {
                address: addr.to_string(),
                port: status.map_or(0, |s| s.port),
                peer_type: peer_type.display().to_string(),
                name: name.clone(),
                remote_as: status.map_or(0, |s| s.remote_as),
                state,
                since: status.map_or(0, |s| unix_secs(s.since)),
                info,
                passive: *passive,
                prefixes_received: status.map_or(0, |s| s.prefixes_received),
                prefixes_accepted: status.map_or(0, |s| s.prefixes_accepted),
                prefixes_advertised: status.map_or(0, |s| s.prefixes_advertised),
                stale_prefixes: stale,
                routes_rejected_loop: status.map_or(0, |s| s.routes_rejected_loop),
                routes_rejected_filter: status.map_or(0, |s| s.routes_rejected_filter),
                routes_rejected_malformed: status.map_or(0, |s| s.routes_rejected_malformed),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.address
            .parse::<IpAddr>()
            .ok()
            .cmp(&b.address.parse::<IpAddr>().ok())
    });
    rows
}

/// The kernel's TCP-MD5 drop counters (`TCPMD5NotFound`, `TCPMD5Unexpected`,
/// `TCPMD5Failure` of `TcpExt` in `/proc/net/netstat`), `None` when unreadable.
pub(crate) fn tcp_md5_counters(netstat: &str) -> Option<[u64; 3]> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some([
        get("TCPMD5NotFound")?,
        get("TCPMD5Unexpected")?,
        get("TCPMD5Failure")?,
    ])
}

/// Brings `podroute_tcp_md5_failures_total` up to the kernel's counters.
/// Drops from before the agent started are not counted (`last` is `None` until the first
/// read).
pub(crate) fn update_md5_metrics(metrics: &Metrics, last: &mut Option<[u64; 3]>) {
    let Some(now) = std::fs::read_to_string("/proc/net/netstat")
        .ok()
        .and_then(|t| tcp_md5_counters(&t))
    else {
        return;
    };
    let last = last.get_or_insert(now);
    for (i, reason) in ["not_found", "unexpected", "failure"].iter().enumerate() {
        let d = delta(&mut last[i], now[i]);
        // Created at zero too, so the series exists for dashboards and alerts.
        metrics
            .tcp_md5_failures
            .with_label_values(&[reason])
            .inc_by(d);
    }
}

/// How often at most one peer's refused routes are logged.
const REJECTION_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counts a peer's newly refused announcements by reason and logs them at WARN, at most once
/// a minute per peer (with the count since the last line).
fn record_rejections(metrics: &Metrics, s: &PeerStatus, c: &mut PeerCounts) {
    let looped = delta(&mut c.rejected_loop, s.routes_rejected_loop);
    let filtered = delta(&mut c.rejected_filter, s.routes_rejected_filter);
    let malformed = delta(&mut c.rejected_malformed, s.routes_rejected_malformed);
    for (reason, n) in [
        ("loop", looped),
        ("import_filter", filtered),
        ("malformed", malformed),
    ] {
        if n > 0 {
            metrics
                .routes_rejected
                .with_label_values(&[reason])
                .inc_by(n);
        }
    }
    c.unlogged_rejections += looped + filtered + malformed;
    let now = std::time::Instant::now();
    let due = c
        .last_rejection_log
        .is_none_or(|t| now.duration_since(t) >= REJECTION_LOG_INTERVAL);
    if c.unlogged_rejections > 0 && due {
        tracing::warn!(
            peer = %s.addr,
            refused = c.unlogged_rejections,
            loop_total = s.routes_rejected_loop,
            import_filter_total = s.routes_rejected_filter,
            malformed_total = s.routes_rejected_malformed,
            "routes from this peer refused (loop detection, BGPFilter import rules or RFC 7606 \
             treat-as-withdraw); see podroute status"
        );
        c.unlogged_rejections = 0;
        c.last_rejection_log = Some(now);
    }
}

/// The peers' session states by address, for lookups in loops over blocks or peers: a
/// linear search of the statuses per block made every status publish of a 5,000-node mesh
/// (20,000 blocks) scan 100 million entries.
pub(crate) struct PeerStates(HashMap<IpAddr, podroute_bgp::fsm::State>);

impl PeerStates {
    pub(crate) fn new(statuses: &[PeerStatus]) -> PeerStates {
        PeerStates(statuses.iter().map(|s| (s.addr, s.state)).collect())
    }

    pub(crate) fn get(&self, addr: IpAddr) -> Option<podroute_bgp::fsm::State> {
        self.0.get(&addr).copied()
    }
}

/// The speaker's outbound connection attempts: started in all (a counter), in flight now and
/// at most at once (never above the speaker's bound).
pub(crate) fn update_connect_metrics(metrics: &Metrics, summary: &SpeakerSummary) {
    let counted = metrics.connect_attempts.get();
    if summary.connect_attempts > counted {
        metrics
            .connect_attempts
            .inc_by(summary.connect_attempts - counted);
    }
    metrics
        .connects_in_flight
        .set(i64::try_from(summary.connects_in_flight).unwrap_or(i64::MAX));
    metrics
        .connects_in_flight_max
        .set(i64::try_from(summary.connects_in_flight_peak).unwrap_or(i64::MAX));
    metrics
        .session_tasks
        .set(i64::try_from(summary.session_tasks).unwrap_or(i64::MAX));
}

/// Totals over all peers, and the per-peer gauges and counters while
/// [`Metrics::per_peer`] allows them (the totals' series are fixed in number, the per-peer ones
/// grow with the mesh).
pub(crate) fn update_peer_metrics(
    metrics: &Metrics,
    statuses: &[PeerStatus],
    info: &PeerInfo,
    counts: &mut HashMap<IpAddr, PeerCounts>,
) {
    let per_peer = metrics.per_peer(info.len());
    metrics.per_peer_series.set(i64::from(per_peer));
    if !per_peer {
        metrics.clear_per_peer();
    }

    // Peers by type and state; a configured peer the speaker does not report yet is Idle.
    let mut by_state: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for peer_type in [PeerType::Mesh, PeerType::Global, PeerType::Node] {
        for (state, _) in PEER_STATE_CODES {
            by_state.insert((peer_type.label(), state), 0);
        }
    }
    let reported: HashMap<IpAddr, &PeerStatus> = statuses.iter().map(|s| (s.addr, s)).collect();
    for (addr, (_, peer_type, _)) in info {
        let state = reported.get(addr).map(|s| s.state.to_string());
        let state = PEER_STATE_CODES
            .iter()
            .find(|(name, _)| Some(*name) == state.as_deref())
            .map_or("Idle", |(name, _)| *name);
        if let Some(n) = by_state.get_mut(&(peer_type.label(), state)) {
            *n += 1;
        }
    }
    for ((peer_type, state), n) in by_state {
        metrics.peers.with_label_values(&[peer_type, state]).set(n);
    }

    let mut prefixes = [0i64; 4]; // received, accepted, advertised, stale
    let mut moved = [0u64; 5]; // updates rx/tx, notifications rx/tx, establishments
    for s in statuses {
        let Some((_, peer_type, _)) = info.get(&s.addr) else {
            continue;
        };
        let stale = s
            .graceful_restart
            .as_ref()
            .map_or(0, |g| g.stale_prefixes as i64);
        let gauges = [
            s.prefixes_received as i64,
            s.prefixes_accepted as i64,
            s.prefixes_advertised as i64,
            stale,
        ];
        for (sum, v) in prefixes.iter_mut().zip(gauges) {
            *sum += v;
        }
        let c = counts.entry(s.addr).or_default();
        let deltas = [
            delta(&mut c.updates_rx, s.updates_received),
            delta(&mut c.updates_tx, s.updates_sent),
            delta(&mut c.notif_rx, s.notifications_received),
            delta(&mut c.notif_tx, s.notifications_sent),
            delta(&mut c.established, s.established_count),
        ];
        for (sum, d) in moved.iter_mut().zip(deltas) {
            *sum += d;
        }
        record_rejections(metrics, s, c);
        if !per_peer {
            continue;
        }
        let addr = s.addr.to_string();
        let labels = [addr.as_str(), peer_type.label()];
        let code = peer_state_code(&s.state.to_string());
        metrics.peer_state.with_label_values(&labels).set(code);
        metrics
            .peer_up
            .with_label_values(&labels)
            .set(i64::from(code == 6));
        for (vec, v) in [
            &metrics.prefixes_received,
            &metrics.prefixes_accepted,
            &metrics.prefixes_advertised,
            &metrics.stale_prefixes,
        ]
        .into_iter()
        .zip(gauges)
        {
            vec.with_label_values(&labels).set(v);
        }
        for (vec, d) in [
            &metrics.updates_received,
            &metrics.updates_sent,
            &metrics.notifications_received,
            &metrics.notifications_sent,
            &metrics.session_establishments,
        ]
        .into_iter()
        .zip(deltas)
        {
            // Created even when zero, so that every peer has every series.
            vec.with_label_values(&labels).inc_by(d);
        }
    }
    for (kind, v) in ["received", "accepted", "advertised", "stale"]
        .into_iter()
        .zip(prefixes)
    {
        metrics.prefixes.with_label_values(&[kind]).set(v);
    }
    for ((direction, kind), d) in [
        ("received", "update"),
        ("sent", "update"),
        ("received", "notification"),
        ("sent", "notification"),
    ]
    .into_iter()
    .zip(moved)
    {
        metrics
            .messages
            .with_label_values(&[direction, kind])
            .inc_by(d);
    }
    metrics.sessions_established.inc_by(moved[4]);
}

/// The node (by name) whose address is `gateway`, else the address itself.
fn peer_of(state: &ClusterState, gateway: IpAddr) -> String {
    state
        .nodes
        .values()
        .find(|n| {
            n.ipv4_addr().map(IpAddr::V4) == Some(gateway)
                || n.ipv6.map(|v| IpAddr::V6(v.addr())) == Some(gateway)
                // A VXLAN route's gateway is the node's VTEP address.
                || n.vxlan.ipv4.map(IpAddr::V4) == Some(gateway)
                || n.vxlan.ipv6.map(IpAddr::V6) == Some(gateway)
        })
        .map_or_else(|| gateway.to_string(), |n| n.name.clone())
}

/// `podroute routes`: the plan, with each route's kernel state.
pub(crate) fn routes(
    node: &str,
    plan: Option<&[DesiredRoute]>,
    dp: &DataplaneStatus,
    state: &ClusterState,
) -> RoutesReport {
    let failures: HashMap<_, _> = dp
        .failures
        .iter()
        .map(|f| (f.route.prefix, f.error.to_string()))
        .collect();
    let others: HashMap<_, _> = dp
        .by_other_owner
        .iter()
        .map(|o| (o.prefix, o.protocol))
        .collect();
    let routes = plan
        .map(|routes| {
            routes
                .iter()
                .map(|r| {
                    let error = failures.get(&r.prefix).cloned();
                    RouteRow {
                        prefix: r.prefix.to_string(),
                        gateway: r.gateway.map(|g| g.to_string()),
                        device: r.device.as_deref().map(str::to_string),
                        onlink: r.onlink,
                        kind: r.kind.label().to_string(),
                        peer: r.gateway.map(|g| peer_of(state, g)),
                        installed: dp.programmed && error.is_none(),
                        error,
                        programmed_by: others
                            .get(&r.prefix.trunc())
                            .map(|p| format!("another owner (proto {})", Protocol(*p))),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    RoutesReport {
        node: node.to_string(),
        routes,
        vxlan: None,
    }
}

/// The userspace IPIP forwarder's counter values already exported to Prometheus.
#[derive(Debug, Default)]
pub(crate) struct ExportedIpip {
    encap_packets: u64,
    decap_packets: u64,
    encap_bytes: u64,
    decap_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

/// `podroute_ipip_packets`, `_bytes` and `_drops`: the userspace IPIP forwarder's counters
/// since the last call (`last` holds what was exported).
pub(crate) fn update_ipip_metrics(
    m: &Metrics,
    now: &IpipCountersSnapshot,
    last: &mut ExportedIpip,
) {
    advance(
        &m.ipip_packets.with_label_values(&["encap"]),
        &mut last.encap_packets,
        now.encap_packets,
    );
    advance(
        &m.ipip_packets.with_label_values(&["decap"]),
        &mut last.decap_packets,
        now.decap_packets,
    );
    advance(
        &m.ipip_bytes.with_label_values(&["encap"]),
        &mut last.encap_bytes,
        now.encap_bytes,
    );
    advance(
        &m.ipip_bytes.with_label_values(&["decap"]),
        &mut last.decap_bytes,
        now.decap_bytes,
    );
    for reason in DropReason::ALL {
        advance(
            &m.ipip_drops.with_label_values(&[reason.label()]),
            &mut last.drops[reason.index()],
            now.dropped(reason),
        );
    }
}

/// `podroute_routes_programmed{kind}` and the dataplane totals.
pub(crate) fn update_route_metrics(metrics: &Metrics, dp: &DataplaneStatus) {
    for kind in RouteKind::ALL {
        let n = dp.programmed_by_kind[kind.index()];
        metrics
            .routes_programmed
            .with_label_values(&[kind.label()])
            .set(n as i64);
    }
    metrics.routes_desired.set(dp.desired_routes as i64);
    super::tunnels::update_metrics(metrics, &dp.vxlan);
    metrics.routes_failed.set(dp.failures.len() as i64);
    let errors = metrics.netlink_errors.get();
    if dp.counters.route_errors > errors {
        metrics
            .netlink_errors
            .inc_by(dp.counters.route_errors - errors);
    }
    let repairs = metrics.drift_repairs.get();
    if dp.counters.drift_repairs > repairs {
        metrics
            .drift_repairs
            .inc_by(dp.counters.drift_repairs - repairs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeInfo;
    use crate::plan::RouteScope;
    use podroute_bgp::fsm::State;
    use std::time::SystemTime;

    fn status(addr: &str, state: State, error: Option<&str>) -> PeerStatus {
        PeerStatus {
            addr: addr.parse().unwrap(),
            port: 179,
            remote_as: 64512,
            kind: "mesh".into(),
            state,
            since: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000),
            established_count: 1,
            prefixes_received: 1,
            prefixes_accepted: 1,
            prefixes_advertised: 2,
            updates_received: 3,
            updates_sent: 4,
            notifications_received: 0,
            notifications_sent: 0,
            routes_rejected_loop: 0,
            routes_rejected_filter: 0,
            routes_rejected_malformed: 0,
            last_error: error.map(str::to_string),
            end_of_rib: Vec::new(),
            graceful_restart: None,
            connect_attempts: 0,
            connect_failures: 0,
            next_retry: None,
        }
    }

    #[test]
    fn tcp_md5_counters_from_netstat() {
        let text = "TcpExt: SyncookiesSent TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure\n\
                    TcpExt: 0 3 1 7\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcp_md5_counters(text), Some([3, 1, 7]));
        assert_eq!(tcp_md5_counters("IpExt: a\nIpExt: 1\n"), None);
    }

    #[test]
    fn peer_rows_use_calico_wording() {
        let info: PeerInfo = [
            (
                "192.168.92.129".parse().unwrap(),
                ("node01".to_string(), PeerType::Mesh, true),
            ),
            (
                "192.168.92.250".parse().unwrap(),
                ("tor".to_string(), PeerType::Global, false),
            ),
        ]
        .into();
        let statuses = vec![
            status("192.168.92.129", State::Established, None),
            status("192.168.92.250", State::Active, Some("Connection refused")),
        ];
        let rows = peer_rows(&statuses, &info);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].peer_type.as_str(),
                rows[0].state.as_str(),
                rows[0].info.as_str()
            ),
            ("node-to-node mesh", "Established", "Established")
        );
        assert_eq!(
            (
                rows[1].peer_type.as_str(),
                rows[1].state.as_str(),
                rows[1].info.as_str()
            ),
            ("global", "Active", "Connection refused")
        );
        assert_eq!(rows[0].since, 1000);

        let metrics = Metrics::new();
        let mut counts = HashMap::new();
        update_peer_metrics(&metrics, &statuses, &info, &mut counts);
        update_peer_metrics(&metrics, &statuses, &info, &mut counts);
        let text = metrics.encode();
        assert!(
            text.contains("podroute_bgp_peer_up{peer=\"192.168.92.129\",peer_type=\"mesh\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podroute_bgp_peer_up{peer=\"192.168.92.250\",peer_type=\"global\"} 0")
        );
        assert!(
            text.contains(
                "podroute_bgp_updates_sent_total{peer=\"192.168.92.129\",peer_type=\"mesh\"} 4"
            ),
            "counted once: {text}"
        );
    }

    /// `n` mesh peers 10.1.x.y, every 10th Active, the rest Established; plus one configured
    /// global peer the speaker does not report yet.
    fn mesh(n: u32) -> (Vec<PeerStatus>, PeerInfo) {
        let mut statuses = Vec::new();
        let mut info = PeerInfo::new();
        for i in 0..n {
            let addr = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            let state = if i % 10 == 0 {
                State::Active
            } else {
                State::Established
            };
            statuses.push(status(&addr, state, None));
            info.insert(
                addr.parse().unwrap(),
                (format!("node{i}"), PeerType::Mesh, false),
            );
        }
        info.insert(
            "10.9.0.1".parse().unwrap(),
            ("tor".to_string(), PeerType::Global, false),
        );
        (statuses, info)
    }

    fn series_with(text: &str, needle: &str) -> usize {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .count()
    }

    #[test]
    fn many_peers_export_totals_only_under_auto() {
        let (statuses, info) = mesh(500);
        let metrics = Metrics::with_peer_labels(crate::metrics::PeerLabels::Auto, 100);
        let mut counts = HashMap::new();
        update_peer_metrics(&metrics, &statuses, &info, &mut counts);
        update_peer_metrics(&metrics, &statuses, &info, &mut counts);
        let text = metrics.encode();
        assert_eq!(series_with(&text, "peer=\""), 0, "{text}");
        assert!(text.contains("podroute_bgp_per_peer_series 0"), "{text}");
        for line in [
            "podroute_bgp_peers{peer_type=\"mesh\",state=\"Established\"} 450",
            "podroute_bgp_peers{peer_type=\"mesh\",state=\"Active\"} 50",
            "podroute_bgp_peers{peer_type=\"global\",state=\"Idle\"} 1",
            "podroute_bgp_peers{peer_type=\"node\",state=\"Established\"} 0",
            "podroute_bgp_prefixes{kind=\"received\"} 500",
            "podroute_bgp_prefixes{kind=\"advertised\"} 1000",
            // Counted once although published twice.
            "podroute_bgp_messages_total{direction=\"sent\",type=\"update\"} 2000",
            "podroute_bgp_messages_total{direction=\"received\",type=\"update\"} 1500",
            "podroute_bgp_sessions_established_total 500",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        // The size no longer follows the mesh: 18 peer-state series, not 11 per peer.
        let (statuses_big, info_big) = mesh(2000);
        update_peer_metrics(&metrics, &statuses_big, &info_big, &mut HashMap::new());
        assert_eq!(
            metrics.encode().lines().count(),
            text.lines().count(),
            "the exposition grew with the number of peers"
        );

        // Back under the limit: per-peer series again; `always` keeps them beyond it.
        let (few, few_info) = mesh(20);
        update_peer_metrics(&metrics, &few, &few_info, &mut counts);
        let text = metrics.encode();
        assert_eq!(series_with(&text, "podroute_bgp_peer_up{"), 20, "{text}");
        assert!(text.contains("podroute_bgp_per_peer_series 1"), "{text}");

        let always = Metrics::with_peer_labels(crate::metrics::PeerLabels::Always, 100);
        update_peer_metrics(&always, &statuses, &info, &mut HashMap::new());
        assert_eq!(series_with(&always.encode(), "podroute_bgp_peer_up{"), 500);
        let never = Metrics::with_peer_labels(crate::metrics::PeerLabels::Never, 100);
        update_peer_metrics(&never, &few, &few_info, &mut HashMap::new());
        let text = never.encode();
        assert_eq!(series_with(&text, "peer=\""), 0, "{text}");
        assert!(
            text.contains("podroute_bgp_peers{peer_type=\"mesh\",state=\"Established\"} 18"),
            "{text}"
        );
    }

    #[test]
    fn routes_name_the_peer_node_and_count_by_kind() {
        let mut state = ClusterState::default();
        state.nodes.insert(
            "node01".into(),
            NodeInfo {
                name: "node01".into(),
                ipv4: Some("192.168.92.129/24".parse().unwrap()),
                ipv4_source: None,
                internal_ipv6: None,
                ipv6: None,
                as_number: None,
                route_reflector_cluster_id: None,
                ipip_tunnel_addr: None,
                vxlan: Default::default(),
                labels: Default::default(),
                flannel: None,
                ready: None,
            },
        );
        let plan = vec![
            DesiredRoute {
                prefix: "172.16.196.128/26".parse().unwrap(),
                kind: RouteKind::BlockDirect,
                gateway: Some("192.168.92.129".parse().unwrap()),
                device: Some("ens33".into()),
                onlink: false,
                scope: RouteScope::Universe,
            },
            DesiredRoute {
                prefix: "10.9.0.0/24".parse().unwrap(),
                kind: RouteKind::External,
                gateway: Some("192.168.92.1".parse().unwrap()),
                device: None,
                onlink: false,
                scope: RouteScope::Universe,
            },
        ];
        let mut programmed_by_kind = [0; RouteKind::ALL.len()];
        programmed_by_kind[RouteKind::BlockDirect.index()] = 1;
        programmed_by_kind[RouteKind::External.index()] = 1;
        let dp = DataplaneStatus {
            programmed: true,
            desired_routes: 2,
            installed_routes: 2,
            programmed_by_kind,
            applied: Some(1),
            ..DataplaneStatus::default()
        };
        let report = routes("master01", Some(&plan), &dp, &state);
        let peers: Vec<Option<&str>> = report.routes.iter().map(|r| r.peer.as_deref()).collect();
        assert_eq!(peers, vec![Some("node01"), Some("192.168.92.1")]);
        assert!(
            report
                .routes
                .iter()
                .all(|r| r.installed && r.error.is_none())
        );
        let metrics = Metrics::new();
        update_route_metrics(&metrics, &dp);
        let text = metrics.encode();
        assert!(text.contains("podroute_routes_programmed{kind=\"block-direct\"} 1"));
        assert!(text.contains("podroute_routes_programmed{kind=\"block-ipip\"} 0"));
        assert!(text.contains("podroute_routes_desired 2"));
    }

    #[test]
    fn a_route_of_another_owner_is_installed_and_names_it_and_a_held_one_is_failed() {
        use crate::dataplane::{OtherOwner, RouteError};
        let workload = |ip: &str| DesiredRoute {
            prefix: format!("{ip}/32").parse().unwrap(),
            kind: RouteKind::Workload,
            gateway: None,
            device: Some("cali0123456789a".into()),
            onlink: false,
            scope: RouteScope::Link,
        };
        let plan = vec![workload("172.16.241.65"), workload("172.16.241.66")];
        let mut programmed_by_kind = [0; RouteKind::ALL.len()];
        programmed_by_kind[RouteKind::Workload.index()] = 1;
        let failure = crate::dataplane::RouteFailure::for_test(
            plan[1].clone(),
            RouteError::Occupied { protocol: Some(4) },
        );
        let dp = DataplaneStatus {
            programmed: true,
            desired_routes: 2,
            programmed_by_kind,
            failures: vec![failure],
            by_other_owner: vec![OtherOwner {
                prefix: plan[0].prefix,
                protocol: 3,
            }],
            ..DataplaneStatus::default()
        };
        let report = routes("master01", Some(&plan), &dp, &ClusterState::default());
        let cni = &report.routes[0];
        assert!(cni.installed && cni.error.is_none(), "{cni:?}");
        assert_eq!(
            cni.programmed_by.as_deref(),
            Some("another owner (proto boot)")
        );
        let held = &report.routes[1];
        assert!(!held.installed && held.programmed_by.is_none(), "{held:?}");
        assert!(
            held.error
                .as_deref()
                .is_some_and(|e| e.contains("another owner (proto static)")),
            "{held:?}"
        );
        let metrics = Metrics::new();
        update_route_metrics(&metrics, &dp);
        let text = metrics.encode();
        assert!(text.contains("podroute_routes_failed 1"), "{text}");
        assert!(text.contains("podroute_routes_programmed{kind=\"workload\"} 1"));
    }
}
