//! Status out: metrics, readiness and the status board, from the loop's state and the
//! dataplane's status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::peers::PeerType;
use super::{Agent, report, status};
use crate::dataplane::DataplaneStatus;

impl Agent {
    /// Refreshes metrics and the status board.
    pub(super) fn publish(&mut self) {
        let dp = self.dp_status.borrow().clone();
        report::update_peer_metrics(
            &self.metrics,
            &self.peer_status,
            &self.peers_by_addr(),
            &mut self.peer_counts,
        );
        report::update_route_metrics(&self.metrics, &dp);
        let ready = self.readiness(&dp);
        self.metrics.ready.set(i64::from(ready.is_empty()));
        self.metrics
            .config_warnings
            .set(self.peer_warnings.len() as i64);
        // Only nodes with TCP-MD5 sessions read the kernel's counters (publish runs often).
        if self
            .peers
            .values()
            .any(|p| p.desired.config.password.is_some())
        {
            report::update_md5_metrics(&self.metrics, &mut self.md5_counts);
        }
        self.condition.observe(ready.is_empty());
        let mut status = status::AgentStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ipv4: self.address.map(|a| a.to_string()),
            ipv6: self.ipv6().map(|a| a.to_string()),
            nic: Some(self.nic.clone()),
            as_number: self.local_as,
            router_id: self.router_id.to_string(),
            started: report::unix_secs(self.started),
            health: status::Health {
                live: true,
                ready: ready.is_empty(),
                not_ready: ready,
            },
            datastore: status::DatastoreStatus {
                source: self.datastore_source.clone(),
                synced: true,
                revision: self.state.revision,
                rejected: self
                    .state
                    .rejected
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                errors: self.state.source_errors.clone(),
            },
            dataplane: status::DataplaneSummary {
                programmed: dp.programmed,
                desired_routes: dp.desired_routes,
                installed_routes: dp.installed_routes,
                failed_routes: dp.failures.len(),
            },
            peers: report::peer_rows(&self.peer_status, &self.peers_by_addr()),
            peer_summary: None,
            config_warnings: self
                .peer_warnings
                .iter()
                .cloned()
                .chain(self.flannel.iter().flat_map(|f| f.warning_lines()))
                .collect(),
            service_prefixes: self.service_rows.clone(),
        };
        status
            .datastore
            .errors
            .extend(self.peer_warnings.iter().cloned());
        if let Some(e) = &dp.tunnels.ipip.error {
            status.datastore.errors.push(e.clone());
        }
        if let Some(w) = self.tunnel_address_warning(&dp) {
            status.datastore.errors.push(w);
        }
        self.board.publish_status(status);
    }

    fn peers_by_addr(&self) -> BTreeMap<IpAddr, (String, PeerType, bool)> {
        self.peers
            .iter()
            .map(|(a, p)| {
                (
                    *a,
                    (
                        p.desired.name.clone(),
                        p.desired.peer_type,
                        p.desired.config.passive,
                    ),
                )
            })
            .collect()
    }

    /// With the YAML-directory datastore and an IPIP pool, a Node without
    /// `projectcalico.org/IPv4IPIPTunnelAddr` gets a tunnel address no IPAM reserved.
    fn tunnel_address_warning(&self, dp: &DataplaneStatus) -> Option<String> {
        if self.tunnel_addr.is_some()
            || self
                .state
                .local()
                .and_then(|n| n.ipip_tunnel_addr)
                .is_some()
        {
            return None;
        }
        let address = dp.tunnels.ipip.ready.as_ref()?.address?;
        Some(format!(
            "tunl0 uses {address}, which is not allocated in IPAM: the YAML-directory datastore \
             cannot allocate it; set the Node's projectcalico.org/IPv4IPIPTunnelAddr annotation"
        ))
    }

    /// Known blocks this node has no programmed route for, that should hold readiness back:
    /// every block (own or of another node, outside disabled and disableBGPExport pools)
    /// without a planned route or whose route failed, while the agent is younger than
    /// `--ready-grace` or its node's BGP session with us is Established (the route should
    /// come). A block of a node we have had no session with for the grace time does not hold
    /// readiness (a dead node must not make every other node unready).
    fn unrouted_blocks(&self, dp: &DataplaneStatus) -> Vec<String> {
        let Some(planner) = &self.planner else {
            return Vec::new();
        };
        let young = self
            .started
            .elapsed()
            .is_ok_and(|age| age < self.args.ready_grace);
        // The nodes whose session with us is Established (a handful), found once per publish
        // rather than looked up by name for each of the (many) blocks.
        let established: BTreeSet<&str> = if young {
            BTreeSet::new()
        } else {
            let states = report::PeerStates::new(&self.peer_status);
            self.state
                .nodes
                .iter()
                .filter(|(_, n)| {
                    n.ipv4_addr().is_some_and(|a| {
                        states.get(IpAddr::V4(a)) == Some(podroute_bgp::fsm::State::Established)
                    })
                })
                .map(|(name, _)| name.as_str())
                .collect()
        };
        let failed: BTreeSet<IpNet> = dp.failures.iter().map(|f| f.route.prefix).collect();
        let mut missing = Vec::new();
        let mut warnings = BTreeSet::new();
        for block in self.state.blocks.values() {
            let Some(host) = block.host() else { continue };
            if block.deleted {
                continue;
            }
            let own = host == self.node;
            // Neither ours, nor young, nor of a node we have a session with: it does not
            // hold readiness back, routed or not (no route lookup for it).
            if !(own || young || established.contains(host)) {
                continue;
            }
            let exported = self
                .state
                .pool_containing(&block.cidr)
                .is_some_and(|p| !p.disabled && !p.disable_bgp_export);
            if !own && !exported {
                continue;
            }
            let prefix = block.cidr.trunc();
            let routed = planner
                .route_for(prefix, self.learned.get(&prefix), &mut warnings)
                .is_some()
                && !failed.contains(&prefix);
            if routed {
                continue;
            }
            missing.push(format!("{prefix} ({host})"));
        }
        missing
    }

    /// Reasons the agent is not ready (empty = ready).
    fn readiness(&self, dp: &DataplaneStatus) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.deferral.is_some() {
            reasons.push(
                "waiting for End-of-RIB from BGP peers before the first route update".to_string(),
            );
        }
        reasons.extend(self.state.suspect.iter().map(|s| s.message.clone()));
        if !dp.programmed || dp.applied.is_none() {
            reasons.push("first route reconcile not applied yet".to_string());
        } else {
            if let Some(f) = &self.flannel {
                reasons
                    .extend(f.readiness(&self.state, dp.failures.iter().map(|f| &f.route.prefix)));
            }
            let missing = self.unrouted_blocks(dp);
            if !missing.is_empty() {
                let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
                reasons.push(format!(
                    "{} known block(s) not routed yet: {}{}",
                    missing.len(),
                    shown.join(", "),
                    if missing.len() > 5 { ", ..." } else { "" }
                ));
            }
        }
        let states = report::PeerStates::new(&self.peer_status);
        for (addr, peer) in &self.peers {
            if peer.desired.peer_type != PeerType::Mesh
                || peer.since.elapsed() >= self.args.ready_grace
            {
                continue;
            }
            let state = states.get(*addr).map(|s| s.to_string());
            if state.as_deref() != Some("Established") {
                reasons.push(format!(
                    "mesh peer {addr} ({}) is {} (waiting up to {:?})",
                    peer.desired.name,
                    state.as_deref().unwrap_or("unknown"),
                    self.args.ready_grace
                ));
            }
        }
        reasons
    }
}
