//! The VXLAN part of `podroute routes` and the metrics, from the tunnel plan the agent last
//! sent the dataplane ([`PlanUpdate::Tunnels`]) and the dataplane's VXLAN status.
//!
//! [`PlanUpdate::Tunnels`]: crate::dataplane::PlanUpdate::Tunnels

use crate::dataplane::vxlan::VxlanStatus;
use crate::metrics::Metrics;
use crate::plan::tunnels::TunnelPlan;

use super::status::{VtepRow, VxlanDeviceRow, VxlanReport};

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
