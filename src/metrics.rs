//! Prometheus metrics (`GET /metrics`). Every metric is `podroute_*`; peers are labels
//! (`peer` = address, `peer_type` = mesh/global/node), prefixes never are.
//!
//! Per-peer series grow with the mesh (eleven per peer: 55,000 series and 4 MB of text at
//! 5,000 nodes), so they are exported only while there are at most
//! [`Metrics::peer_label_limit`] peers under [`PeerLabels::Auto`]; the totals over all peers
//! (`podroute_bgp_peers{peer_type,state}`, `podroute_bgp_prefixes{kind}`,
//! `podroute_bgp_messages_total`, `podroute_bgp_sessions_established_total`) are always there,
//! a fixed number of series whatever the cluster's size.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `--metrics-peer-labels`: when the per-peer (`peer` label) series are exported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerLabels {
    /// While the number of peers is at most the limit; totals only beyond it.
    #[default]
    Auto,
    /// Always, however many peers there are.
    Always,
    /// Never: totals only.
    Never,
}

/// Default of `--metrics-peer-label-limit`.
pub const DEFAULT_PEER_LABEL_LIMIT: usize = 100;

/// BGP FSM state as a number, as in `podroute_bgp_peer_state`.
pub const PEER_STATE_CODES: [(&str, i64); 6] = [
    ("Idle", 1),
    ("Connect", 2),
    ("Active", 3),
    ("OpenSent", 4),
    ("OpenConfirm", 5),
    ("Established", 6),
];

/// Numeric code of an FSM state name (0 when unknown).
pub fn peer_state_code(state: &str) -> i64 {
    PEER_STATE_CODES
        .iter()
        .find(|(name, _)| *name == state)
        .map_or(0, |(_, code)| *code)
}

/// All of the agent's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    peer_labels: PeerLabels,
    peer_label_limit: usize,
    pub build_info: IntGaugeVec,
    pub peers: IntGaugeVec,
    pub prefixes: IntGaugeVec,
    pub messages: IntCounterVec,
    pub routes_rejected: IntCounterVec,
    pub config_warnings: IntGauge,
    pub tcp_md5_failures: IntCounterVec,
    pub sessions_established: IntCounter,
    pub per_peer_series: IntGauge,
    pub peer_state: IntGaugeVec,
    pub peer_up: IntGaugeVec,
    pub prefixes_received: IntGaugeVec,
    pub prefixes_accepted: IntGaugeVec,
    pub prefixes_advertised: IntGaugeVec,
    pub stale_prefixes: IntGaugeVec,
    pub updates_received: IntCounterVec,
    pub updates_sent: IntCounterVec,
    pub notifications_received: IntCounterVec,
    pub notifications_sent: IntCounterVec,
    pub session_establishments: IntCounterVec,
    pub connect_attempts: IntCounter,
    pub connects_in_flight: IntGauge,
    pub connects_in_flight_max: IntGauge,
    pub session_tasks: IntGauge,
    pub routes_programmed: IntGaugeVec,
    pub routes_desired: IntGauge,
    pub routes_failed: IntGauge,
    pub vxlan_vteps: IntGauge,
    pub vxlan_devices_ready: IntGauge,
    pub vxlan_entries_programmed: IntGaugeVec,
    pub vxlan_entries_failed: IntGaugeVec,
    pub netlink_errors: IntCounter,
    pub drift_repairs: IntCounter,
    pub reconcile_seconds: Histogram,
    pub convergence_seconds: HistogramVec,
    pub invalid_objects: IntCounterVec,
    pub datastore_synced: IntGauge,
    pub datastore_revision: IntGauge,
    pub datastore_suspect: IntGaugeVec,
    /// Service prefixes this node advertises, by kind (cluster_ip, external_ip,
    /// load_balancer_ip).
    pub service_prefixes: IntGaugeVec,
    pub ready: IntGauge,
    pub ipip_packets: IntCounterVec,
    pub ipip_bytes: IntCounterVec,
    pub ipip_drops: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("podroute")
}

impl Metrics {
    /// [`Metrics::with_peer_labels`] with the flags' defaults.
    pub fn new() -> Self {
        Self::with_peer_labels(PeerLabels::Auto, DEFAULT_PEER_LABEL_LIMIT)
    }

    /// Metrics whose per-peer series follow `peer_labels` (with `limit` for `auto`).
    pub fn with_peer_labels(peer_labels: PeerLabels, limit: usize) -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let peer = &["peer", "peer_type"];
        let buckets_fast = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let buckets_conv = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Metrics {
            peer_labels,
            peer_label_limit: limit,
            build_info: reg!(IntGaugeVec::new(
                opts("build_info", "Always 1; the version label names the build."),
                &["version"]
            )),
            peers: reg!(IntGaugeVec::new(
                opts(
                    "bgp_peers",
                    "Configured BGP peers by type (mesh, global, node) and FSM state."
                ),
                &["peer_type", "state"]
            )),
            prefixes: reg!(IntGaugeVec::new(
                opts(
                    "bgp_prefixes",
                    "Prefixes summed over all peers, by kind (received, accepted, advertised, \
                     stale)."
                ),
                &["kind"]
            )),
            messages: reg!(IntCounterVec::new(
                opts(
                    "bgp_messages_total",
                    "UPDATE and NOTIFICATION messages of all peers, by direction (received, \
                     sent) and type (update, notification)."
                ),
                &["direction", "type"]
            )),
            tcp_md5_failures: reg!(IntCounterVec::new(
                opts(
                    "tcp_md5_failures_total",
                    "TCP segments the kernel dropped for TCP-MD5 (RFC 2385) in the agent's \
                     network namespace, by reason: not_found (a signature was expected and is \
                     missing), unexpected (a signature nobody expects), failure (a wrong \
                     signature: the peer's password differs). From /proc/net/netstat."
                ),
                &["reason"]
            )),
            config_warnings: reg!(IntGauge::with_opts(opts(
                "config_warnings",
                "Configuration podroute cannot honour as written (one per object and field: an \
                 unreadable BGP password, a missing BGPFilter, reachableBy, ...); listed in \
                 `podroute status`."
            ))),
            routes_rejected: reg!(IntCounterVec::new(
                opts(
                    "bgp_routes_rejected_total",
                    "Announcements of all peers refused before the Loc-RIB, by reason: loop \
                     (AS_PATH with our AS, our ORIGINATOR_ID or CLUSTER_ID), import_filter \
                     (a BGPFilter import rule) and malformed (RFC 7606 treat-as-withdraw). Per peer in `podroute status`."
                ),
                &["reason"]
            )),
            sessions_established: reg!(IntCounter::with_opts(opts(
                "bgp_sessions_established_total",
                "Times any peer's session reached Established."
            ))),
            per_peer_series: reg!(IntGauge::with_opts(opts(
                "bgp_per_peer_series",
                "1 while the per-peer series (peer label) are exported, 0 when only the \
                 totals are (--metrics-peer-labels)."
            ))),
            peer_state: reg!(IntGaugeVec::new(
                opts(
                    "bgp_peer_state",
                    "BGP FSM state per peer: 1 Idle, 2 Connect, 3 Active, 4 OpenSent, \
                     5 OpenConfirm, 6 Established."
                ),
                peer
            )),
            peer_up: reg!(IntGaugeVec::new(
                opts("bgp_peer_up", "1 when the session is Established, else 0."),
                peer
            )),
            prefixes_received: reg!(IntGaugeVec::new(
                opts(
                    "bgp_prefixes_received",
                    "Prefixes in the peer's Adj-RIB-In."
                ),
                peer
            )),
            prefixes_accepted: reg!(IntGaugeVec::new(
                opts(
                    "bgp_prefixes_accepted",
                    "Prefixes from the peer that passed validation and loop checks."
                ),
                peer
            )),
            prefixes_advertised: reg!(IntGaugeVec::new(
                opts(
                    "bgp_prefixes_advertised",
                    "Prefixes in the peer's Adj-RIB-Out."
                ),
                peer
            )),
            stale_prefixes: reg!(IntGaugeVec::new(
                opts(
                    "bgp_stale_prefixes",
                    "Routes of a restarting peer kept under graceful restart (RFC 4724)."
                ),
                peer
            )),
            updates_received: reg!(IntCounterVec::new(
                opts("bgp_updates_received_total", "UPDATE messages received."),
                peer
            )),
            updates_sent: reg!(IntCounterVec::new(
                opts("bgp_updates_sent_total", "UPDATE messages sent."),
                peer
            )),
            notifications_received: reg!(IntCounterVec::new(
                opts(
                    "bgp_notifications_received_total",
                    "NOTIFICATION messages received."
                ),
                peer
            )),
            notifications_sent: reg!(IntCounterVec::new(
                opts(
                    "bgp_notifications_sent_total",
                    "NOTIFICATION messages sent."
                ),
                peer
            )),
            session_establishments: reg!(IntCounterVec::new(
                opts(
                    "bgp_session_establishments_total",
                    "Times the session reached Established."
                ),
                peer
            )),
            connect_attempts: reg!(IntCounter::with_opts(opts(
                "bgp_connect_attempts_total",
                "Outbound BGP connection attempts started, all peers."
            ))),
            connects_in_flight: reg!(IntGauge::with_opts(opts(
                "bgp_connects_in_flight",
                "Outbound BGP connection attempts in flight now (bounded by the speaker)."
            ))),
            connects_in_flight_max: reg!(IntGauge::with_opts(opts(
                "bgp_connects_in_flight_max",
                "Most outbound BGP connection attempts ever in flight at once since the start."
            ))),
            session_tasks: reg!(IntGauge::with_opts(opts(
                "bgp_session_tasks",
                "BGP peers with a session task running; the others wait for a connect turn, \
                 back off or wait for the peer without one."
            ))),
            routes_programmed: reg!(IntGaugeVec::new(
                opts(
                    "routes_programmed",
                    "Routes in the kernel as planned, by kind (block-direct, block-ipip, \
                     block-noencap, block-vxlan, blackhole, workload, borrowed-direct, \
                     borrowed-ipip, borrowed-noencap, borrowed-vxlan, external)."
                ),
                &["kind"]
            )),
            routes_desired: reg!(IntGauge::with_opts(opts(
                "routes_desired",
                "Routes in the current plan."
            ))),
            routes_failed: reg!(IntGauge::with_opts(opts(
                "routes_failed",
                "Planned routes not in the kernel: refused (retried with backoff) or held by another owner's different route (left alone)."
            ))),
            vxlan_vteps: reg!(IntGauge::with_opts(opts(
                "vxlan_vteps",
                "Remote VXLAN tunnel endpoints planned (one neighbour and one FDB entry each)."
            ))),
            vxlan_devices_ready: reg!(IntGauge::with_opts(opts(
                "vxlan_devices_ready",
                "VXLAN devices (vxlan.calico, vxlan-v6.calico) in the kernel as planned."
            ))),
            vxlan_entries_programmed: reg!(IntGaugeVec::new(
                opts(
                    "vxlan_entries_programmed",
                    "VXLAN neighbour and FDB entries in the kernel as planned, by entry (neighbour, fdb)."
                ),
                &["entry"]
            )),
            vxlan_entries_failed: reg!(IntGaugeVec::new(
                opts(
                    "vxlan_entries_failed",
                    "Planned VXLAN neighbour and FDB entries not in the kernel (retried with backoff), by entry."
                ),
                &["entry"]
            )),
            netlink_errors: reg!(IntCounter::with_opts(opts(
                "netlink_errors_total",
                "Route requests the kernel refused or that could not be sent."
            ))),
            drift_repairs: reg!(IntCounter::with_opts(opts(
                "drift_repairs_total",
                "Route changes made because the kernel table drifted from the plan."
            ))),
            reconcile_seconds: reg!(Histogram::with_opts(
                HistogramOpts::from(opts(
                    "reconcile_duration_seconds",
                    "Time to compare and apply one plan update (full or delta) to the kernel."
                ))
                .buckets(buckets_fast)
            )),
            convergence_seconds: reg!(HistogramVec::new(
                HistogramOpts::from(opts(
                    "convergence_seconds",
                    "From a datastore or BGP event to the resulting routes in the kernel."
                ))
                .buckets(buckets_conv),
                &["trigger"]
            )),
            invalid_objects: reg!(IntCounterVec::new(
                opts(
                    "invalid_objects_total",
                    "Objects skipped (or held at their last valid version) because they \
                     failed validation, by kind."
                ),
                &["kind"]
            )),
            datastore_synced: reg!(IntGauge::with_opts(opts(
                "datastore_synced",
                "1 once the initial datastore sync is done."
            ))),
            datastore_revision: reg!(IntGauge::with_opts(opts(
                "datastore_revision",
                "Revision of the cluster state in force."
            ))),
            datastore_suspect: reg!(IntGaugeVec::new(
                opts(
                    "datastore_suspect",
                    "1 while a wipe of this kind (every object gone at once, or this node's \
                     Node; kind \"File\" for an emptied file) is held back until confirmed."
                ),
                &["kind"]
            )),
            service_prefixes: reg!(IntGaugeVec::new(
                opts(
                    "bgp_service_prefixes_advertised",
                    "Service prefixes this node advertises (configured CIDRs and /32s of \
                     Local services with a ready endpoint here), by kind."
                ),
                &["kind"]
            )),
            ready: reg!(IntGauge::with_opts(opts(
                "ready",
                "1 when /readyz answers 200."
            ))),
            ipip_packets: reg!(IntCounterVec::new(
                opts(
                    "ipip_packets_total",
                    "Packets through the userspace tunl0: encap (pod to remote node) and \
                     decap (remote node to pod)."
                ),
                &["direction"]
            )),
            ipip_bytes: reg!(IntCounterVec::new(
                opts(
                    "ipip_bytes_total",
                    "Inner bytes through the userspace tunl0, by direction."
                ),
                &["direction"]
            )),
            ipip_drops: reg!(IntCounterVec::new(
                opts(
                    "ipip_drops_total",
                    "Packets the userspace tunl0 dropped, by reason (unknown_source, \
                     no_route, bad_inner_header, outside_pool, ...)."
                ),
                &["reason"]
            )),
            registry,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The `--metrics-peer-labels` limit.
    pub fn peer_label_limit(&self) -> usize {
        self.peer_label_limit
    }

    /// Whether per-peer series are exported with `peers` peers configured.
    pub fn per_peer(&self, peers: usize) -> bool {
        match self.peer_labels {
            PeerLabels::Always => true,
            PeerLabels::Never => false,
            PeerLabels::Auto => peers <= self.peer_label_limit,
        }
    }

    /// Removes the series of every peer (per-peer series switched off).
    pub fn clear_per_peer(&self) {
        for vec in [
            &self.peer_state,
            &self.peer_up,
            &self.prefixes_received,
            &self.prefixes_accepted,
            &self.prefixes_advertised,
            &self.stale_prefixes,
        ] {
            vec.reset();
        }
        for vec in [
            &self.updates_received,
            &self.updates_sent,
            &self.notifications_received,
            &self.notifications_sent,
            &self.session_establishments,
        ] {
            vec.reset();
        }
    }

    /// Removes every series of a peer that went away.
    pub fn remove_peer(&self, peer: &str, peer_type: &str) {
        let labels = [peer, peer_type];
        for vec in [
            &self.peer_state,
            &self.peer_up,
            &self.prefixes_received,
            &self.prefixes_accepted,
            &self.prefixes_advertised,
            &self.stale_prefixes,
        ] {
            let _ = vec.remove_label_values(&labels);
        }
        for vec in [
            &self.updates_received,
            &self.updates_sent,
            &self.notifications_received,
            &self.notifications_sent,
            &self.session_establishments,
        ] {
            let _ = vec.remove_label_values(&labels);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Advances a counter to a cumulative value read from elsewhere (a peer's message count).
/// A smaller value means the source restarted from zero: the new value is added.
pub fn advance(counter: &IntCounter, last: &mut u64, now: u64) {
    let delta = delta(last, now);
    if delta > 0 {
        counter.inc_by(delta);
    }
}

/// How far a cumulative value read from elsewhere moved since `last` (which becomes `now`);
/// a smaller value means the source restarted from zero, so all of `now` is new.
pub fn delta(last: &mut u64, now: u64) -> u64 {
    let delta = if now >= *last { now - *last } else { now };
    *last = now;
    delta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_once_used() {
        let m = Metrics::new();
        m.build_info.with_label_values(&["0.1.0"]).set(1);
        m.peer_state
            .with_label_values(&["10.0.0.2", "mesh"])
            .set(peer_state_code("Established"));
        m.routes_programmed
            .with_label_values(&["block-ipip"])
            .set(3);
        m.convergence_seconds
            .with_label_values(&["bgp"])
            .observe(0.01);
        let text = m.encode();
        assert!(text.contains("podroute_bgp_peer_state{peer=\"10.0.0.2\",peer_type=\"mesh\"} 6"));
        assert!(text.contains("podroute_routes_programmed{kind=\"block-ipip\"} 3"));
        assert!(text.contains("podroute_convergence_seconds_count{trigger=\"bgp\"} 1"));
        m.remove_peer("10.0.0.2", "mesh");
        assert!(!m.encode().contains("10.0.0.2"));
    }

    #[test]
    fn advance_handles_restarts() {
        let c = IntCounter::new("c", "c").unwrap();
        let mut last = 0;
        advance(&c, &mut last, 5);
        advance(&c, &mut last, 7);
        advance(&c, &mut last, 2);
        assert_eq!(c.get(), 9);
    }
}
