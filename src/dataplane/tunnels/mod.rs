//! The encapsulation devices: one module per device kind, fed by the plan.
//!
//! The dataplane task receives the [`TunnelPlan`] on the plan channel
//! ([`super::PlanUpdate::Tunnels`]) ahead of the routes that use its devices, and hands each
//! part to its module here:
//! - [`ipip`]: `tunl0` (kernel `ipip` device, or a TUN device with the userspace forwarder
//!   process), its address and MTU, and the forwarder's table of remote blocks, kept as IPIP
//!   routes are upserted and removed and published before they are installed; when IPIP
//!   leaves the plan the device is removed by the dataplane ([`Tunnels::remove_ipip`]) only
//!   once no route of ours needs it, the rule the VXLAN devices follow;
//! - VXLAN (`vxlan.calico`, `flannel.1`, ...): the place for `super::vxlan`'s module, which
//!   takes [`TunnelPlan::vxlan`] and [`TunnelPlan::vxlan_peers`] (devices, permanent
//!   neighbour and FDB entries). Until it lands those parts of the plan are not acted on.
//!
//! The device-making code itself (rtnetlink, TUN) is in [`super::tunnel`] and
//! [`super::ipip_user`]; the modules here decide when to call it.

pub mod ipip;

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::dataplane::ipip_user::IpipCounters;
use crate::plan::RouteKind;
use crate::plan::tunnels::TunnelPlan;
use ipip::{Ipip, IpipConfig, IpipStatus};

/// How the tunnel devices are made.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelsConfig {
    pub ipip: IpipConfig,
}

/// What the status reports about the tunnel devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    pub ipip: IpipStatus,
}

/// Every encapsulation device of the node.
pub struct Tunnels {
    ipip: Ipip,
    // The VXLAN devices and their neighbour/FDB entries are `super::vxlan::VxlanTunnels`,
    // held by the `Dataplane` itself: they go through the dataplane's batched netlink socket
    // and are removed only once no route of the dataplane's slots still needs them, which
    // this async, socket-less dispatcher cannot see. `Dataplane::stream` gives them
    // `plan.vxlan` and `plan.vxlan_peers` together with this `apply`.
}

impl Tunnels {
    pub fn new(config: TunnelsConfig) -> Self {
        Self {
            ipip: Ipip::new(config.ipip),
        }
    }

    /// Makes the devices of `plan`. Called before the routes of later plan updates are
    /// reconciled.
    pub async fn apply(&mut self, plan: TunnelPlan) {
        let TunnelPlan {
            ipip,
            vxlan: _,
            vxlan_peers: _,
        } = plan;
        self.ipip.apply(ipip).await;
    }

    /// `tunl0` left the plan and waits to be removed once no route needs it.
    pub fn ipip_pending_removal(&self) -> bool {
        self.ipip.pending_removal()
    }

    /// Removes `tunl0` (see [`ipip`]); the dataplane calls it once no route of ours goes
    /// through the device.
    pub async fn remove_ipip(&mut self) {
        self.ipip.remove().await;
    }

    /// Every 250 ms (the dataplane's tick): repairs what went away (a dead forwarder), retries failed set-ups.
    pub async fn maintain(&mut self) {
        self.ipip.maintain().await;
    }

    /// Routes a previous run left in the kernel through `device` (destination, gateway),
    /// found when the dataplane opened.
    pub fn adopt(&mut self, device: &str, routes: Vec<(IpNet, IpAddr)>) {
        if device == crate::plan::TUNNEL_DEVICE {
            self.ipip.adopt(routes);
        }
    }

    /// A full plan replaces every desired route (the adopted ones go with the first).
    pub fn full_plan(&mut self) {
        self.ipip.clear_routes();
    }

    /// The desired route for `dst` is now of `kind` via `gateway`.
    pub fn route_upserted(&mut self, dst: IpNet, kind: RouteKind, gateway: Option<IpAddr>) {
        self.ipip.route_upserted(dst, kind, gateway);
    }

    /// No route is desired for `dst` any more.
    pub fn route_removed(&mut self, dst: IpNet) {
        self.ipip.route_removed(dst);
    }

    /// Hands changed tables to their devices' forwarders; called before the routes that use
    /// them are reconciled.
    pub fn publish(&mut self) {
        self.ipip.publish();
    }

    /// Waits (boundedly) until the userspace forwarder uses the table last published.
    pub async fn delivered(&self) {
        self.ipip.delivered().await;
    }

    /// The userspace IPIP forwarder's counters.
    pub fn ipip_counters(&self) -> Arc<IpipCounters> {
        self.ipip.counters()
    }

    /// The IPIP table's remote blocks (tests).
    #[cfg(test)]
    pub(crate) fn ipip_remotes(&self) -> Vec<(ipnet::Ipv4Net, std::net::Ipv4Addr)> {
        self.ipip.remotes()
    }

    pub fn status(&self) -> TunnelStatus {
        TunnelStatus {
            ipip: self.ipip.status().clone(),
        }
    }
}
