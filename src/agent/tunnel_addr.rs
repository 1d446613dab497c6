//! Decides when the node's IPIP and VXLAN (IPv4 and IPv6) tunnel addresses are allocated in or released from
//! Calico IPAM ([`crate::datastore::tunnel_ipam`] does the writes), in its own task fed by
//! the cluster state: a write to the API server never holds up the event loop. Once the
//! annotation is written, the watch brings it back in the Node and the plan puts it on
//! `tunl0` / `vxlan.calico` (and the other nodes route to this node's VTEP).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::datastore::tunnel_ipam::{self, Ensured, TunnelKind};
use crate::state::{ClusterState, StateRx};

/// Wait before trying again after a failed allocation or release.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What the cluster state asks of the tunnel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelAddrAction {
    /// A pool needs the encapsulation and the Node has no annotation: allocate in these own
    /// blocks of the tunnel address's family (those in such pools first, then the others,
    /// each group lowest first).
    Allocate(Vec<IpNet>),
    /// No pool of that family needs the encapsulation and the Node still has an
    /// annotation: release.
    Release(Vec<IpNet>),
    Nothing,
}

/// The action for `state` (pure), for the IPIP tunnel address.
pub fn wanted(state: &ClusterState) -> TunnelAddrAction {
    wanted_for(state, TunnelKind::Ipip)
}

/// The action for `state` (pure), for the tunnel address of `kind`: allocated while a pool
/// of its family (IPv4; IPv6 for [`TunnelKind::VxlanV6`]) uses that encapsulation, released
/// when none does.
pub fn wanted_for(state: &ClusterState, kind: TunnelKind) -> TunnelAddrAction {
    let ipip_pools: Vec<&crate::model::Pool> = state
        .pools
        .values()
        // A disabled pool's blocks are still routed through the tunnel: it counts too.
        .filter(|p| {
            let mode = match kind {
                TunnelKind::Ipip => p.ipip_mode,
                TunnelKind::Vxlan | TunnelKind::VxlanV6 => p.vxlan_mode,
            };
            mode.is_on() && p.cidr.addr().is_ipv6() == kind.is_ipv6()
        })
        .collect();
    let own: Vec<IpNet> = state
        .local_blocks()
        .filter(|b| !b.deleted && b.cidr.addr().is_ipv6() == kind.is_ipv6())
        .map(|b| b.cidr.trunc())
        .collect();
    let annotated = state
        .local()
        .and_then(|n| match kind {
            TunnelKind::Ipip => n.ipip_tunnel_addr.map(IpAddr::V4),
            TunnelKind::Vxlan => n.vxlan.ipv4.map(IpAddr::V4),
            TunnelKind::VxlanV6 => n.vxlan.ipv6.map(IpAddr::V6),
        })
        .is_some();
    if ipip_pools.is_empty() {
        return if annotated {
            TunnelAddrAction::Release(own)
        } else {
            TunnelAddrAction::Nothing
        };
    }
    if annotated || state.local().is_none() || own.is_empty() {
        return TunnelAddrAction::Nothing;
    }
    let in_ipip = |n: &IpNet| ipip_pools.iter().any(|p| p.cidr.contains(n));
    let mut ordered: Vec<IpNet> = own.iter().copied().filter(in_ipip).collect();
    ordered.sort();
    let mut rest: Vec<IpNet> = own.iter().copied().filter(|n| !in_ipip(n)).collect();
    rest.sort();
    ordered.extend(rest);
    TunnelAddrAction::Allocate(ordered)
}

/// Runs until the datastore stops: after each state, does what [`wanted`] says (at most one
/// attempt per [`RETRY_AFTER`] while it fails).
pub fn spawn(client: kube::Client, node: String, mut state: StateRx) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut current: Option<Arc<ClusterState>> = state.latest();
        loop {
            let failed = match &current {
                Some(s) => {
                    // Each on its own: one failing does not hold up the others.
                    let ipip = act(&client, &node, s, TunnelKind::Ipip).await;
                    let vxlan = act(&client, &node, s, TunnelKind::Vxlan).await;
                    let vxlan6 = act(&client, &node, s, TunnelKind::VxlanV6).await;
                    ipip || vxlan || vxlan6
                }
                None => false,
            };
            if failed {
                tokio::select! {
                    changed = state.changed() => match changed {
                        Ok(s) => current = Some(s),
                        Err(_) => return,
                    },
                    // Same state, next attempt.
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                }
            } else {
                match state.changed().await {
                    Ok(s) => current = Some(s),
                    Err(_) => return,
                }
            }
        }
    })
}

/// One attempt; returns whether it failed.
async fn act(client: &kube::Client, node: &str, state: &ClusterState, kind: TunnelKind) -> bool {
    match wanted_for(state, kind) {
        TunnelAddrAction::Nothing => false,
        TunnelAddrAction::Allocate(blocks) => {
            match tunnel_ipam::ensure_kind(client, node, &blocks, kind).await {
                Ok(Ensured::Existing(addr)) => {
                    debug!(addr, ?kind, "the Node has its tunnel address");
                    false
                }
                Ok(Ensured::Allocated(_)) => false,
                Ok(Ensured::NoFreeAddress) => {
                    warn!(
                        ?blocks,
                        ?kind,
                        "no free address in this node's blocks for the tunnel address; the \
                         tunnel device stays without one"
                    );
                    true
                }
                Err(e) => {
                    warn!(error = %e, ?kind, "tunnel address not allocated; retrying in {RETRY_AFTER:?}");
                    true
                }
            }
        }
        TunnelAddrAction::Release(blocks) => {
            match tunnel_ipam::release_kind(client, node, &blocks, kind).await {
                Ok(_) => false,
                Err(e) => {
                    warn!(error = %e, ?kind, "tunnel address not released; retrying in {RETRY_AFTER:?}");
                    true
                }
            }
        }
    }
}
