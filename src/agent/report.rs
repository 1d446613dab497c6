//! Turns the agent's internal view into what users read: status rows, the route report and
//! the metrics derived from them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use podroute_bgp::PeerStatus;

use super::PeerCounts;
use super::peers::PeerType;
use super::status::{PeerRow, RouteRow, RoutesReport};
use crate::dataplane::DataplaneStatus;
use crate::metrics::{Metrics, advance, peer_state_code};
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
    let mut rows: Vec<PeerRow> = info
        .iter()
        .map(|(addr, (name, peer_type, passive))| {
            let status = statuses.iter().find(|s| s.addr == *addr);
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

/// Per-peer gauges and counters.
pub(crate) fn update_peer_metrics(
    metrics: &Metrics,
    statuses: &[PeerStatus],
    info: &PeerInfo,
    counts: &mut HashMap<IpAddr, PeerCounts>,
) {
    for s in statuses {
        let Some((_, peer_type, _)) = info.get(&s.addr) else {
            continue;
        };
        let addr = s.addr.to_string();
        let labels = [addr.as_str(), peer_type.label()];
        let code = peer_state_code(&s.state.to_string());
        metrics.peer_state.with_label_values(&labels).set(code);
        metrics
            .peer_up
            .with_label_values(&labels)
            .set(i64::from(code == 6));
        metrics
            .prefixes_received
            .with_label_values(&labels)
            .set(s.prefixes_received as i64);
        metrics
            .prefixes_accepted
            .with_label_values(&labels)
            .set(s.prefixes_accepted as i64);
        metrics
            .prefixes_advertised
            .with_label_values(&labels)
            .set(s.prefixes_advertised as i64);
        metrics.stale_prefixes.with_label_values(&labels).set(
            s.graceful_restart
                .as_ref()
                .map_or(0, |g| g.stale_prefixes as i64),
        );
        let c = counts.entry(s.addr).or_default();
        advance(
            &metrics.updates_received.with_label_values(&labels),
            &mut c.updates_rx,
            s.updates_received,
        );
        advance(
            &metrics.updates_sent.with_label_values(&labels),
            &mut c.updates_tx,
            s.updates_sent,
        );
        advance(
            &metrics.notifications_received.with_label_values(&labels),
            &mut c.notif_rx,
            s.notifications_received,
        );
        advance(
            &metrics.notifications_sent.with_label_values(&labels),
            &mut c.notif_tx,
            s.notifications_sent,
        );
        advance(
            &metrics.session_establishments.with_label_values(&labels),
            &mut c.established,
            s.established_count,
        );
    }
}

/// The node (by name) whose address is `gateway`, else the address itself.
fn peer_of(state: &ClusterState, gateway: IpAddr) -> String {
    state
        .nodes
        .values()
        .find(|n| {
            n.ipv4_addr().map(IpAddr::V4) == Some(gateway)
                || n.ipv6.map(|v| IpAddr::V6(v.addr())) == Some(gateway)
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
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    RoutesReport {
        node: node.to_string(),
        routes,
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
            last_error: error.map(str::to_string),
            end_of_rib: Vec::new(),
            graceful_restart: None,
            connect_attempts: 0,
            connect_failures: 0,
            next_retry: None,
        }
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

    #[test]
    fn routes_name_the_peer_node_and_count_by_kind() {
        let mut state = ClusterState::default();
        state.nodes.insert(
            "node01".into(),
            NodeInfo {
                name: "node01".into(),
                ipv4: Some("192.168.92.129/24".parse().unwrap()),
                ipv4_source: None,
                ipv6: None,
                as_number: None,
                route_reflector_cluster_id: None,
                ipip_tunnel_addr: None,
                labels: Default::default(),
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
}
