//! The speaker's side of a new cluster state: the export policy, the sessions, and the
//! prefixes this node announces; and the sessions reset when the host NIC loses its carrier.

use std::net::IpAddr;
use std::time::Instant;

use anyhow::Context;
use tracing::{debug, info, warn};

use super::{Agent, ConfiguredPeer, intent, peers, services, status};
use crate::metrics::advance;
use crate::state::ClusterState;

impl Agent {
    /// Gives the speaker the export policy, the sessions and the announcements of `state`.
    pub(super) async fn configure_speaker(
        &mut self,
        state: &ClusterState,
        at: Instant,
    ) -> anyhow::Result<()> {
        if let Some(flag_as) = self
            .args
            .as_number
            .or(state.local().and_then(|n| n.as_number))
            && flag_as != self.local_as
        {
            warn!(
                running = self.local_as,
                configured = flag_as,
                "the node's AS number changed; restart the agent to apply it"
            );
        }
        if state.bgp.listen_port != self.listen_port {
            warn!(
                running = self.listen_port,
                configured = state.bgp.listen_port,
                "BGP listenPort changed; restart the agent to apply it"
            );
        }

        // Export policy before sessions and announcements: nothing outside it is ever sent.
        let mut rules = intent::export_rules(state);
        if let Some(f) = &self.flannel {
            f.adjust_export(&mut rules, state);
        }
        if self.export_rules.as_ref() != Some(&rules) {
            debug!(
                allow = rules.allow.len(),
                deny = rules.deny.len(),
                aggregates = rules.aggregates.len(),
                "export policy"
            );
            self.speaker
                .set_export_rules(Some(rules.clone()))
                .await
                .context("BGP speaker")?;
            self.export_rules = Some(rules);
        }

        // Sessions.
        let passwords = self
            .passwords
            .resolve(
                state
                    .peers
                    .values()
                    .filter_map(|p| p.password.as_ref())
                    .chain(state.bgp.node_mesh_password.as_ref()),
            )
            .await;
        let set = peers::desired_peers_with(state, &self.identity(), &passwords);
        for w in &set.warnings {
            if !self.peer_warnings.contains(w) {
                warn!("{w}");
            }
        }
        self.peer_warnings = set.warnings;
        let gone: Vec<IpAddr> = self
            .peers
            .keys()
            .filter(|a| !set.peers.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(old) = self.peers.remove(&addr) {
                info!(peer = %addr, name = old.desired.name, "removing BGP peer");
                self.speaker
                    .remove_peer(addr)
                    .await
                    .context("BGP speaker")?;
                self.metrics
                    .remove_peer(&addr.to_string(), old.desired.peer_type.label());
                self.peer_counts.remove(&addr);
            }
        }
        for (addr, desired) in peers::in_connect_order(set.peers) {
            let unchanged = self.peers.get(&addr).is_some_and(|p| p.desired == desired);
            if unchanged {
                continue;
            }
            info!(peer = %addr, name = desired.name, peer_type = desired.peer_type.label(), remote_as = desired.config.remote_as, passive = desired.config.passive, "configuring BGP peer");
            self.speaker
                .set_peer(desired.config.clone())
                .await
                .context("BGP speaker")?;
            if let Some(old) = self.peers.get(&addr)
                && old.desired.peer_type != desired.peer_type
            {
                self.metrics
                    .remove_peer(&addr.to_string(), old.desired.peer_type.label());
            }
            let since = self.peers.get(&addr).map_or(at, |p| p.since);
            self.peers.insert(addr, ConfiguredPeer { desired, since });
        }

        // Announcements: the blocks, and the service prefixes (Calico's rules).
        let service_prefixes = services::service_prefixes(state);
        for (kind, count) in services::count_by_kind(&service_prefixes) {
            self.metrics
                .service_prefixes
                .with_label_values(&[kind.label()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut wanted = intent::advertisements(state);
        if let Some(f) = &self.flannel {
            wanted.extend(f.own_prefixes(state));
        }
        wanted.extend(service_prefixes.keys().copied());
        self.service_rows = service_prefixes
            .iter()
            .map(|(prefix, reasons)| status::ServicePrefixRow {
                prefix: prefix.to_string(),
                reasons: reasons.iter().map(ToString::to_string).collect(),
            })
            .collect();
        for prefix in self.announced.difference(&wanted) {
            debug!(%prefix, "withdrawing");
            self.speaker
                .withdraw(*prefix)
                .await
                .context("BGP speaker")?;
        }
        for prefix in wanted.difference(&self.announced) {
            debug!(%prefix, "announcing");
            self.speaker
                .announce(*prefix, None)
                .await
                .context("BGP speaker")?;
        }
        if wanted != self.announced {
            info!(
                prefixes = wanted.len(),
                services = service_prefixes.len(),
                "announcing this node's blocks and service prefixes"
            );
        }
        self.announced = wanted;

        Ok(())
    }

    pub(super) fn count_rejections(&mut self) {
        for (kind, count) in self.datastore.counters.snapshot() {
            let label = kind.as_str();
            let last = self.reject_seen.entry(label).or_insert(0);
            advance(
                &self.metrics.invalid_objects.with_label_values(&[label]),
                last,
                count,
            );
        }
    }

    /// When the host NIC loses its carrier (or is set down), the peers on its subnet are
    /// unreachable: their sessions are reset at once instead of waiting for the hold timer,
    /// so their routes go now (no graceful restart: the peer did not restart, we lost it).
    pub(super) async fn on_nic_carrier(&mut self, up: Option<bool>) -> anyhow::Result<()> {
        if up == Some(false) && !self.nic_down {
            self.nic_down = true;
            let lost: Vec<IpAddr> = self
                .peers
                .keys()
                .filter(|a| match a {
                    IpAddr::V4(v4) => self.address.is_some_and(|a| a.contains(v4)),
                    IpAddr::V6(v6) => self.ipv6().is_some_and(|a| a.contains(v6)),
                })
                .copied()
                .collect();
            warn!(nic = self.nic, peers = ?lost, "host NIC is down; resetting the sessions to peers on its subnet");
            for addr in lost {
                self.speaker
                    .remove_peer(addr)
                    .await
                    .context("BGP speaker")?;
                if let Some(p) = self.peers.get(&addr) {
                    self.speaker
                        .set_peer(p.desired.config.clone())
                        .await
                        .context("BGP speaker")?;
                }
            }
        } else if up == Some(true) && self.nic_down {
            self.nic_down = false;
            info!(nic = self.nic, "host NIC is up again");
        }
        Ok(())
    }
}
