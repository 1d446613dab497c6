//! The tunnel plan the agent sends the dataplane ([`PlanUpdate::Tunnels`]), ahead of the
//! routes that use its devices, and the VXLAN part of `podroute routes` and the metrics.
//!
//! The plan is recomputed with every route plan from the same [`PlanInput`] (it depends on
//! the Nodes' addresses and VTEP annotations, which a route plan may not: a remote node's new
//! address changes only its FDB entry) and sent only when it changed.
//!
//! [`PlanUpdate::Tunnels`]: crate::dataplane::PlanUpdate::Tunnels

use crate::dataplane::vxlan::VxlanStatus;
use crate::metrics::Metrics;
use crate::plan::PlanInput;
use crate::plan::tunnels::{TunnelPlan, vxlan_plan};

use super::status::{VtepRow, VxlanDeviceRow, VxlanReport};

/// The last tunnel plan sent.
#[derive(Debug, Default)]
pub struct TunnelPlans {
    last: Option<TunnelPlan>,
}

impl TunnelPlans {
    /// The tunnel plan for `input` when it differs from the last one sent (or none was).
    pub fn update(&mut self, input: &PlanInput) -> Option<TunnelPlan> {
        let (vxlan, vxlan_peers) = vxlan_plan(input);
        let plan = TunnelPlan {
            // `tunl0` is still set up by the agent loop on this branch (issue 13 moves it).
            ipip: None,
            vxlan,
            vxlan_peers,
        };
        if self.last.as_ref() == Some(&plan) {
            return None;
        }
        self.last = Some(plan.clone());
        Some(plan)
    }

    pub fn current(&self) -> Option<&TunnelPlan> {
        self.last.as_ref()
    }
}

/// The VXLAN part of `GET /routes`; `None` when the node has no VXLAN device planned.
pub fn report(plan: Option<&TunnelPlan>, status: &VxlanStatus) -> Option<VxlanReport> {
    let plan = plan.filter(|p| !p.vxlan.is_empty())?;
    Some(VxlanReport {
        devices: plan
            .vxlan
            .iter()
            .map(|d| {
                let st = status.devices.iter().find(|s| s.name == d.name);
                VxlanDeviceRow {
                    name: d.name.clone(),
                    vni: d.vni,
                    port: d.port,
                    mac: d.mac.to_string(),
                    local: d.local.to_string(),
                    parent: d.parent.clone(),
                    address: d.address.map(|a| a.to_string()),
                    mtu: st.and_then(|s| s.mtu),
                    error: st.map_or_else(
                        || Some("not reconciled yet".to_string()),
                        |s| s.error.clone(),
                    ),
                }
            })
            .collect(),
        vteps: plan
            .vxlan_peers
            .iter()
            .map(|p| VtepRow {
                device: p.device.clone(),
                node: p.node.clone(),
                tunnel_ip: p.tunnel_ip.to_string(),
                mac: p.mac.to_string(),
                underlay: p.underlay.to_string(),
            })
            .collect(),
        neighbours_programmed: status.neighbours_programmed,
        neighbours_failed: status.neighbours_failed,
        fdb_programmed: status.fdb_programmed,
        fdb_failed: status.fdb_failed,
        failures: status.failures.clone(),
    })
}

/// `podroute_vxlan_*` gauges from the dataplane's VXLAN status.
pub fn update_metrics(metrics: &Metrics, status: &VxlanStatus) {
    let set = |g: &prometheus::IntGauge, n: usize| g.set(i64::try_from(n).unwrap_or(i64::MAX));
    set(&metrics.vxlan_vteps, status.vteps);
    set(
        &metrics.vxlan_devices_ready,
        status
            .devices
            .iter()
            .filter(|d| d.error.is_none() && d.index.is_some())
            .count(),
    );
    for (entry, programmed, failed) in [
        (
            "neighbour",
            status.neighbours_programmed,
            status.neighbours_failed,
        ),
        ("fdb", status.fdb_programmed, status.fdb_failed),
    ] {
        set(
            &metrics.vxlan_entries_programmed.with_label_values(&[entry]),
            programmed,
        );
        set(
            &metrics.vxlan_entries_failed.with_label_values(&[entry]),
            failed,
        );
    }
}
