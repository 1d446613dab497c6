//! VXLAN devices (VTEPs) and their per-remote-VTEP neighbour and FDB entries.
//!
//! Given the plan's [`VxlanDevice`]s and [`VxlanPeer`]s ([`crate::plan::tunnels`]), this
//! module makes the kernel match, as Felix does for `vxlan.calico` / `vxlan-v6.calico` and
//! flanneld for `flannel.1`; nothing here is specific to Calico's VNI, port or names:
//!
//! - **Device**: kind `vxlan`, VNI, destination port, `nolearning`, `local` = the node's
//!   address, `dev` = the host NIC, MTU (the plan's, else the NIC's minus 50 for IPv4 / 70 for
//!   IPv6), MAC, up, and the tunnel address (`/32`, `/128`; other global addresses of the
//!   device's family are removed). A device of that name that is a `vxlan` device with another
//!   VNI, port, parent, local address, MAC or with learning on is deleted and made again (routes
//!   through it then come back with the next route resync); a device of that name of another
//!   kind is **reported, never touched**. A device podroute made carries the alias
//!   [`DEVICE_ALIAS`]; one that matched the plan is adopted as is (Felix's, after a migration).
//!   A device that leaves the plan is deleted only if it is ours (made here, adopted in this
//!   run, or carrying the alias).
//! - **Neighbour entry** per remote VTEP: `TUNNEL_IP lladdr MAC dev DEVICE nud permanent
//!   proto 157` (the route protocol marks ours, `ip neigh show proto 157`).
//! - **FDB entry** per remote VTEP: `MAC dst UNDERLAY dev DEVICE self permanent`. The FDB
//!   has no protocol field: an entry is ours when this run wrote it, or (after a restart) when
//!   its MAC is the lladdr of one of our neighbour entries on that device.
//! - Entries of ours that leave the plan are deleted; entries of anyone else (other
//!   protocols, other MACs) are never touched.
//!
//! The sync logic is pure ([`decide_device`], [`diff_entries`]) and tested without a kernel;
//! [`VxlanTunnels::reconcile`] dumps links, addresses, neighbours and the FDB once, decides,
//! and sends the changes through the dataplane's batched request socket (so the monitor,
//! which ignores that socket's own changes, sees only drift). Drift (a deleted FDB entry,
//! neighbour or device, a changed MTU) reaches [`super::Dataplane::run`] as a monitor event
//! on one of the devices; the whole VXLAN state is then reconciled again (a few entries per
//! node, one dump each). Failed entries are retried with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::monitor::LinkInfo as MonitorLink;
use super::socket::{NetlinkError, Request};
use crate::plan::tunnels::{MacAddr, VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6, VxlanDevice, VxlanPeer};

/// `IFLA_IFALIAS` of the VXLAN devices podroute creates.
pub const DEVICE_ALIAS: &str = "podroute";

/// What the kernel has of one link, as far as a VXLAN device is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedLink {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`; `None` for devices without one (`lo`, physical NICs).
    pub kind: Option<String>,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<MacAddr>,
    pub alias: Option<String>,
    /// The VXLAN parameters, for `vxlan` devices.
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub parent: Option<u32>,
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
}

impl ObservedLink {
    /// Reads a `RTM_NEWLINK` message.
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut link = ObservedLink {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: 1500,
            ..Default::default()
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Address(bytes) => {
                    if let Ok(mac) = <[u8; 6]>::try_from(bytes.as_slice()) {
                        link.mac = Some(MacAddr(mac));
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(data)) => {
                                for d in data {
                                    match d {
                                        InfoVxlan::Id(v) => link.vni = Some(*v),
                                        InfoVxlan::Port(p) => link.port = Some(*p),
                                        InfoVxlan::Link(i) => link.parent = Some(*i),
                                        InfoVxlan::Local(a) => link.local = Some(IpAddr::V4(*a)),
                                        InfoVxlan::Local6(a) => link.local = Some(IpAddr::V6(*a)),
                                        InfoVxlan::Learning(l) => link.learning = Some(*l),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// What to do about one planned device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceDecision {
    /// It is there as planned (parameters; MTU, up and address are set separately).
    Keep,
    /// No device of that name: create it.
    Create,
    /// A `vxlan` device of that name with other parameters: delete and create.
    Recreate(String),
    /// A device of that name of another kind: reported, left alone.
    Foreign(String),
    /// The parent NIC does not exist.
    NoParent,
}

/// The MTU a device gets: the plan's, else the parent's minus the encapsulation overhead.
pub fn device_mtu(device: &VxlanDevice, parent_mtu: u32) -> u32 {
    device.mtu.unwrap_or_else(|| {
        let overhead = if device.local.is_ipv4() {
            VXLAN_OVERHEAD_V4
        } else {
            VXLAN_OVERHEAD_V6
        };
        parent_mtu.saturating_sub(overhead)
    })
}

/// The ownership and parameter rule for one planned device (pure).
pub fn decide_device(
    device: &VxlanDevice,
    existing: Option<&ObservedLink>,
    parent: Option<&ObservedLink>,
) -> DeviceDecision {
    let Some(parent) = parent else {
        return DeviceDecision::NoParent;
    };
    let Some(link) = existing else {
        return DeviceDecision::Create;
    };
    if link.kind.as_deref() != Some("vxlan") {
        return DeviceDecision::Foreign(link.kind.clone().unwrap_or_else(|| "kind-less".into()));
    }
    let mut wrong = Vec::new();
    if link.vni != Some(device.vni) {
        wrong.push(format!("VNI {:?} (want {})", link.vni, device.vni));
    }
    if link.port != Some(device.port) {
        wrong.push(format!("port {:?} (want {})", link.port, device.port));
    }
    if link.parent != Some(parent.index) {
        wrong.push(format!(
            "parent index {:?} (want {} = {})",
            link.parent, parent.index, device.parent
        ));
    }
    if link.local != Some(device.local) {
        wrong.push(format!("local {:?} (want {})", link.local, device.local));
    }
    if link.mac != Some(device.mac) {
        let have = link.mac.map_or("none".to_string(), |m| m.to_string());
        wrong.push(format!("MAC {have} (want {})", device.mac));
    }
    if link.learning != Some(false) {
        wrong.push("learning on (want nolearning)".into());
    }
    if wrong.is_empty() {
        DeviceDecision::Keep
    } else {
        DeviceDecision::Recreate(wrong.join(", "))
    }
}

/// A neighbour entry (`ip neigh`) on a VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNeighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
    pub protocol: Option<u8>,
}

/// An FDB entry (`bridge fdb`) on a VXLAN device; one per remote destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedFdb {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

/// A change to one neighbour or FDB entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryChange {
    /// `ip neigh replace IP lladdr MAC dev IFINDEX nud permanent proto P`.
    SetNeighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: MacAddr,
    },
    DelNeighbour {
        ifindex: u32,
        ip: IpAddr,
    },
    /// `bridge fdb replace MAC dev IFINDEX dst DST self permanent`.
    SetFdb {
        ifindex: u32,
        mac: MacAddr,
        dst: IpAddr,
    },
    DelFdb {
        ifindex: u32,
        mac: MacAddr,
        dst: Option<IpAddr>,
    },
}

/// The entries of one device: what to change so that the kernel holds `peers` (the device's
/// planned VTEPs), and which planned entries are already right (pure).
///
/// `ours` is the protocol; `owned_fdb` the MACs whose FDB entries this run wrote on this
/// device. Returns the changes and the number of planned neighbour and FDB entries in place.
pub fn diff_entries(
    ifindex: u32,
    peers: &[&VxlanPeer],
    neighbours: &[ObservedNeighbour],
    fdb: &[ObservedFdb],
    ours: u8,
    owned_fdb: &BTreeSet<MacAddr>,
) -> (Vec<EntryChange>, usize, usize) {
    let mut changes = Vec::new();
    let (mut neigh_ok, mut fdb_ok) = (0, 0);
    let neighbours: Vec<&ObservedNeighbour> =
        neighbours.iter().filter(|n| n.ifindex == ifindex).collect();
    let fdb: Vec<&ObservedFdb> = fdb.iter().filter(|f| f.ifindex == ifindex).collect();
    // MACs of our neighbour entries: their FDB entries are ours too (adoption after restart).
    let our_macs: BTreeSet<MacAddr> = neighbours
        .iter()
        .filter(|n| n.protocol == Some(ours))
        .filter_map(|n| n.mac)
        .chain(owned_fdb.iter().copied())
        .collect();
    for peer in peers {
        let have = neighbours.iter().find(|n| n.ip == peer.tunnel_ip);
        if have.is_some_and(|n| n.mac == Some(peer.mac) && n.permanent) {
            if have.is_some_and(|n| n.protocol == Some(ours)) {
                neigh_ok += 1;
            } else {
                // Right, but written by someone else (flanneld or Felix before a
                // migration): rewritten in place with our protocol, so that it is ours from
                // now on (removed when the VTEP leaves the plan, its FDB entry with it). The
                // replace changes nothing the kernel forwards by; counted once it succeeds.
                changes.push(EntryChange::SetNeighbour {
                    ifindex,
                    ip: peer.tunnel_ip,
                    mac: peer.mac,
                });
            }
        } else {
            changes.push(EntryChange::SetNeighbour {
                ifindex,
                ip: peer.tunnel_ip,
                mac: peer.mac,
            });
        }
        let dsts: Vec<&&ObservedFdb> = fdb.iter().filter(|f| f.mac == peer.mac).collect();
        if dsts.len() == 1 && dsts[0].dst == Some(peer.underlay) && dsts[0].permanent {
            fdb_ok += 1;
        } else {
            // Replace sets an entry's (first) destination: with several (appended), the
            // wrong ones go first.
            if dsts.len() > 1 {
                for extra in dsts.iter().filter(|f| f.dst != Some(peer.underlay)) {
                    changes.push(EntryChange::DelFdb {
                        ifindex,
                        mac: extra.mac,
                        dst: extra.dst,
                    });
                }
            }
            changes.push(EntryChange::SetFdb {
                ifindex,
                mac: peer.mac,
                dst: peer.underlay,
            });
        }
    }
    for n in &neighbours {
        if n.protocol == Some(ours) && !peers.iter().any(|p| p.tunnel_ip == n.ip) {
            changes.push(EntryChange::DelNeighbour { ifindex, ip: n.ip });
        }
    }
    for f in &fdb {
        if our_macs.contains(&f.mac) && !peers.iter().any(|p| p.mac == f.mac) {
            changes.push(EntryChange::DelFdb {
                ifindex,
                mac: f.mac,
                dst: f.dst,
            });
        }
    }
    (changes, neigh_ok, fdb_ok)
}

/// One planned device's state, for status readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub name: String,
    pub index: Option<u32>,
    pub mtu: Option<u32>,
    /// Why the device is not as planned; `None` when it is.
    pub error: Option<String>,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VxlanCounters {
    pub devices_created: u64,
    pub devices_recreated: u64,
    pub devices_deleted: u64,
    pub entries_written: u64,
    pub entries_deleted: u64,
    pub entry_errors: u64,
    pub reconciles: u64,
}

/// What the agent, metrics and `podroute routes` read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanStatus {
    pub devices: Vec<DeviceStatus>,
    /// Remote VTEPs planned.
    pub vteps: usize,
    pub neighbours_programmed: usize,
    pub neighbours_failed: usize,
    pub fdb_programmed: usize,
    pub fdb_failed: usize,
    /// One line per failed device or entry.
    pub failures: Vec<String>,
    pub counters: VxlanCounters,
}

/// What a reconcile changed that the route half of the dataplane must know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanReport {
    /// The planned devices that exist now (name and index), for the route half's link map.
    pub links: Vec<MonitorLink>,
    /// Devices were deleted (recreated or dropped): the kernel removed their routes without
    /// telling; the route table must be re-read.
    pub deleted_devices: bool,
}

/// The VXLAN half of the dataplane: owns the devices and entries of [`VxlanDevice`]s and
/// [`VxlanPeer`]s.
#[derive(Debug)]
pub struct VxlanTunnels {
    protocol: u8,
    devices: Vec<VxlanDevice>,
    peers: Vec<VxlanPeer>,
    /// Devices made or adopted by this run, by name.
    owned: BTreeSet<String>,
    /// FDB MACs written by this run, per device name.
    owned_fdb: BTreeMap<String, BTreeSet<MacAddr>>,
    /// Indexes of the planned devices and their parents, as last seen (monitor filter).
    watched: BTreeSet<u32>,
    /// A device of ours left the plan and waits for its routes to move.
    pending_removal: bool,
    status: VxlanStatus,
    attempts: u32,
    next_retry: Option<Instant>,
    retry_min: Duration,
    retry_max: Duration,
}

impl VxlanTunnels {
    pub fn new(protocol: u8, retry_min: Duration, retry_max: Duration) -> Self {
        Self {
            protocol,
            devices: Vec::new(),
            peers: Vec::new(),
            owned: BTreeSet::new(),
            owned_fdb: BTreeMap::new(),
            watched: BTreeSet::new(),
            pending_removal: false,
            status: VxlanStatus::default(),
            attempts: 0,
            next_retry: None,
            retry_min,
            retry_max,
        }
    }

    /// Sets the planned devices and VTEPs (a complete set; see [`crate::plan::tunnels`]).
    pub fn set_plan(&mut self, devices: Vec<VxlanDevice>, peers: Vec<VxlanPeer>) {
        self.devices = devices;
        self.peers = peers;
        self.attempts = 0;
    }

    /// True when a monitor event about link `index` concerns a planned device or its parent.
    pub fn watches(&self, index: u32) -> bool {
        self.watched.contains(&index)
    }

    /// True when `name` is a planned device.
    pub fn plans_device(&self, name: &str) -> bool {
        self.devices.iter().any(|d| d.name == name)
    }

    /// True when there is anything to keep (a plan with devices, or devices of ours to
    /// remove).
    pub fn active(&self) -> bool {
        !self.devices.is_empty() || !self.owned.is_empty() || self.pending_removal
    }

    /// When a failed device or entry is due to be retried.
    pub fn next_retry(&self) -> Option<Instant> {
        self.next_retry
    }

    pub fn status(&self) -> &VxlanStatus {
        &self.status
    }

    /// True when a device of ours left the plan but was kept because routes still used it.
    pub fn pending_removal(&self) -> bool {
        self.pending_removal
    }

    /// Makes the kernel match the plan; never fails as a whole: what cannot be done is in
    /// the status and retried. A device that left the plan is deleted only when
    /// `may_remove(name)`: while routes still go through it (a pool switching from VXLAN to
    /// IPIP, its new routes not installed yet), it stays, so no block is ever without a
    /// route; [`Self::pending_removal`] says so.
    pub fn reconcile(
        &mut self,
        sock: &mut impl super::RouteSocket,
        may_remove: impl Fn(&str) -> bool,
    ) -> VxlanReport {
        self.pending_removal = false;
        let mut report = VxlanReport::default();
        self.status.counters.reconciles += 1;
        let mut failures = Vec::new();
        let mut links = match dump_links(sock) {
            Ok(l) => l,
            Err(e) => {
                self.fail_all(format!("cannot read the links: {e}"));
                return report;
            }
        };
        // Devices that left the plan: delete ours.
        let planned: BTreeSet<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
        let stale: Vec<ObservedLink> = links
            .values()
            .filter(|l| !planned.contains(l.name.as_str()) && l.kind.as_deref() == Some("vxlan"))
            .filter(|l| self.owned.contains(&l.name) || l.alias.as_deref() == Some(DEVICE_ALIAS))
            .cloned()
            .collect();
        for link in stale {
            if !may_remove(&link.name) {
                self.pending_removal = true;
                continue;
            }
            match exec1(sock, del_link(link.index)) {
                Ok(()) => {
                    tracing::info!(
                        device = link.name,
                        "VXLAN device no longer planned; deleted"
                    );
                    self.status.counters.devices_deleted += 1;
                    report.deleted_devices = true;
                }
                Err(e) => failures.push(format!("deleting VXLAN device {}: {e}", link.name)),
            }
            self.owned.remove(&link.name);
            self.owned_fdb.remove(&link.name);
        }
        if !self.pending_removal {
            self.owned.retain(|n| planned.contains(n.as_str()));
        }

        // Planned devices.
        let mut device_status = Vec::new();
        let mut created = false;
        for device in &self.devices {
            let by_name = |name: &str| links.values().find(|l| l.name == name);
            let parent = by_name(&device.parent);
            let existing = by_name(&device.name);
            let decision = decide_device(device, existing, parent);
            let mut error = None;
            match &decision {
                DeviceDecision::Keep => {
                    self.owned.insert(device.name.clone());
                }
                DeviceDecision::NoParent => {
                    error = Some(format!(
                        "parent NIC {:?} not found; the VXLAN device {} is not made",
                        device.parent, device.name
                    ));
                }
                DeviceDecision::Foreign(kind) => {
                    error = Some(format!(
                        "device {:?} exists but is a {kind} device, not vxlan; podroute leaves \
                         it alone (remove or rename it to let podroute make the VXLAN device)",
                        device.name
                    ));
                }
                DeviceDecision::Create | DeviceDecision::Recreate(_) => {
                    if let (DeviceDecision::Recreate(why), Some(old)) = (&decision, existing) {
                        tracing::warn!(
                            device = device.name,
                            why,
                            "VXLAN device differs from the plan; recreating it"
                        );
                        if let Err(e) = exec1(sock, del_link(old.index)) {
                            error = Some(format!("deleting {} to recreate it: {e}", device.name));
                        } else {
                            report.deleted_devices = true;
                            self.status.counters.devices_recreated += 1;
                        }
                    }
                    if error.is_none() {
                        let parent = parent.map_or((0, 1500), |p| (p.index, p.mtu));
                        let mtu = device_mtu(device, parent.1);
                        match exec1(sock, new_vxlan(device, parent.0, mtu)) {
                            Ok(()) => {
                                tracing::info!(device = device.name, vni = device.vni, port = device.port, mtu, mac = %device.mac, local = %device.local, parent = device.parent, "VXLAN device created");
                                self.status.counters.devices_created += 1;
                                self.owned.insert(device.name.clone());
                                self.owned_fdb.remove(&device.name);
                                created = true;
                            }
                            Err(e) => error = Some(create_error(&device.name, &e)),
                        }
                    }
                }
            }
            device_status.push(DeviceStatus {
                name: device.name.clone(),
                index: None,
                mtu: None,
                error,
            });
        }
        if created {
            match dump_links(sock) {
                Ok(l) => links = l,
                Err(e) => failures.push(format!("cannot re-read the links: {e}")),
            }
        }

        // MTU, up, address of every device that is ours now.
        let mut indexes: BTreeMap<String, u32> = BTreeMap::new();
        self.watched.clear();
        let addresses = dump_addresses(sock).unwrap_or_else(|e| {
            failures.push(format!("cannot read the addresses: {e}"));
            Vec::new()
        });
        for (device, st) in self.devices.iter().zip(device_status.iter_mut()) {
            let parent = links.values().find(|l| l.name == device.parent);
            if let Some(p) = parent {
                self.watched.insert(p.index);
            }
            let Some(link) = links.values().find(|l| l.name == device.name) else {
                continue;
            };
            st.index = Some(link.index);
            self.watched.insert(link.index);
            if st.error.is_some() || !self.owned.contains(&device.name) {
                continue;
            }
            let mtu = device_mtu(device, parent.map_or(1500, |p| p.mtu));
            st.mtu = Some(mtu);
            if link.mtu != mtu || !link.up {
                let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).up().build();
                if let Err(e) = exec1(
                    sock,
                    Request {
                        message: RouteNetlinkMessage::SetLink(msg),
                        flags: 0,
                    },
                ) {
                    st.error = Some(format!("setting {} mtu {mtu} up: {e}", device.name));
                    continue;
                }
            }
            if let Err(e) = sync_address(sock, device, link.index, &addresses) {
                st.error = Some(format!("address of {}: {e}", device.name));
            }
            indexes.insert(device.name.clone(), link.index);
            report.links.push(MonitorLink {
                index: link.index,
                name: Some(device.name.clone()),
                up: true,
                // A vxlan device has carrier while it is up.
                running: true,
                mtu: Some(mtu),
            });
        }
        failures.extend(device_status.iter().filter_map(|d| d.error.clone()));

        // Neighbour and FDB entries.
        let (neighbours, fdb) = match (dump_neighbours(sock), dump_fdb(sock)) {
            (Ok(n), Ok(f)) => (n, f),
            (Err(e), _) | (_, Err(e)) => {
                failures.push(format!("cannot read the neighbour/FDB tables: {e}"));
                (Vec::new(), Vec::new())
            }
        };
        let mut changes = Vec::new();
        let (mut neigh_ok, mut fdb_ok) = (0, 0);
        let (mut neigh_failed, mut fdb_failed) = (0, 0);
        for device in &self.devices {
            let peers: Vec<&VxlanPeer> = self
                .peers
                .iter()
                .filter(|p| p.device == device.name)
                .collect();
            let Some(&ifindex) = indexes.get(&device.name) else {
                neigh_failed += peers.len();
                fdb_failed += peers.len();
                continue;
            };
            let owned = self
                .owned_fdb
                .get(&device.name)
                .cloned()
                .unwrap_or_default();
            let (c, n, f) = diff_entries(ifindex, &peers, &neighbours, &fdb, self.protocol, &owned);
            neigh_ok += n;
            fdb_ok += f;
            changes.extend(c.into_iter().map(|c| (device.name.clone(), c)));
        }
        let results = sock.execute(changes.iter().map(|(_, c)| entry_request(c, self.protocol)));
        for ((device, change), result) in changes.iter().zip(results) {
            let is_set = matches!(
                change,
                EntryChange::SetNeighbour { .. } | EntryChange::SetFdb { .. }
            );
            match (&result, change) {
                (Ok(()), EntryChange::SetNeighbour { .. }) => neigh_ok += 1,
                (Ok(()), EntryChange::SetFdb { mac, .. }) => {
                    fdb_ok += 1;
                    self.owned_fdb
                        .entry(device.clone())
                        .or_default()
                        .insert(*mac);
                }
                (Ok(()), EntryChange::DelFdb { mac, .. }) => {
                    if let Some(set) = self.owned_fdb.get_mut(device) {
                        set.remove(mac);
                    }
                }
                (Ok(()), EntryChange::DelNeighbour { .. }) => {}
                // Already gone.
                (Err(e), EntryChange::DelNeighbour { .. } | EntryChange::DelFdb { .. })
                    if e.errno() == Some(libc::ENOENT) => {}
                (Err(e), c) => {
                    self.status.counters.entry_errors += 1;
                    match c {
                        EntryChange::SetNeighbour { .. } => neigh_failed += 1,
                        EntryChange::SetFdb { .. } => fdb_failed += 1,
                        _ => {}
                    }
                    failures.push(format!("{device}: {}: {e}", describe(c)));
                }
            }
            if result.is_ok() {
                if is_set {
                    self.status.counters.entries_written += 1;
                } else {
                    self.status.counters.entries_deleted += 1;
                }
            }
        }
        if !changes.is_empty() {
            tracing::debug!(
                changes = changes.len(),
                "VXLAN neighbour/FDB entries reconciled"
            );
        }
        self.status.devices = device_status;
        self.status.vteps = self.peers.len();
        self.status.neighbours_programmed = neigh_ok;
        self.status.neighbours_failed = neigh_failed;
        self.status.fdb_programmed = fdb_ok;
        self.status.fdb_failed = fdb_failed;
        self.schedule(&failures);
        self.status.failures = failures;
        report
    }

    fn fail_all(&mut self, why: String) {
        self.status.failures = vec![why.clone()];
        self.schedule(&[why]);
    }

    fn schedule(&mut self, failures: &[String]) {
        if failures.is_empty() {
            self.attempts = 0;
            self.next_retry = None;
            return;
        }
        for f in failures {
            if self.attempts == 0 {
                tracing::warn!("VXLAN: {f}");
            }
        }
        self.attempts = self.attempts.saturating_add(1);
        let delay = self
            .retry_min
            .saturating_mul(1 << self.attempts.saturating_sub(1).min(16))
            .min(self.retry_max);
        self.next_retry = Some(Instant::now() + delay);
    }
}

fn describe(change: &EntryChange) -> String {
    match change {
        EntryChange::SetNeighbour { ip, mac, .. } => format!("neighbour {ip} lladdr {mac}"),
        EntryChange::DelNeighbour { ip, .. } => format!("deleting neighbour {ip}"),
        EntryChange::SetFdb { mac, dst, .. } => format!("FDB entry {mac} dst {dst}"),
        EntryChange::DelFdb { mac, .. } => format!("deleting FDB entry {mac}"),
    }
}

fn create_error(name: &str, e: &NetlinkError) -> String {
    match e.errno() {
        Some(libc::EOPNOTSUPP) => format!(
            "cannot create VXLAN device {name}: the kernel has no vxlan support (load the \
             `vxlan` module); routes through it are reported failed"
        ),
        Some(libc::EEXIST) => format!(
            "cannot create VXLAN device {name}: another VXLAN device already uses this VNI and \
             port on this host ({e})"
        ),
        _ => format!("cannot create VXLAN device {name}: {e}"),
    }
}

fn exec1(sock: &mut impl super::RouteSocket, request: Request) -> Result<(), NetlinkError> {
    sock.execute([request])
        .pop()
        .unwrap_or_else(|| Err(NetlinkError::Io("no answer".into())))
}

fn del_link(index: u32) -> Request {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    Request {
        message: RouteNetlinkMessage::DelLink(msg),
        flags: 0,
    }
}

/// `ip link add NAME type vxlan id VNI dstport PORT nolearning dev PARENT local LOCAL` +
/// `address MAC mtu MTU alias podroute up`.
fn new_vxlan(device: &VxlanDevice, parent: u32, mtu: u32) -> Request {
    let mut builder = LinkVxlan::new(&device.name, device.vni)
        .dev(parent)
        .port(device.port)
        .learning(false);
    builder = match device.local {
        IpAddr::V4(a) => builder.local(a),
        IpAddr::V6(a) => builder.local6(a),
    };
    let msg = builder
        .mtu(mtu)
        .address(device.mac.0.to_vec())
        .alias(DEVICE_ALIAS)
        .up()
        .build();
    Request {
        message: RouteNetlinkMessage::NewLink(msg),
        flags: NLM_F_CREATE | NLM_F_EXCL,
    }
}

fn dump_links(
    sock: &mut impl super::RouteSocket,
) -> Result<BTreeMap<u32, ObservedLink>, NetlinkError> {
    let mut links = BTreeMap::new();
    sock.dump_each(RouteNetlinkMessage::GetLink(LinkMessage::default()), |m| {
        if let RouteNetlinkMessage::NewLink(m) = m {
            let l = ObservedLink::from_message(&m);
            links.insert(l.index, l);
        }
    })?;
    Ok(links)
}

/// Global-scope addresses by interface index.
fn dump_addresses(sock: &mut impl super::RouteSocket) -> Result<Vec<(u32, IpNet)>, NetlinkError> {
    let mut out = Vec::new();
    sock.dump_each(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewAddress(m) = m
                && m.header.scope == AddressScope::Universe
            {
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = addr.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(ip) = addr
                    && let Ok(net) = IpNet::new(ip, m.header.prefix_len)
                {
                    out.push((m.header.index, net));
                }
            }
        },
    )?;
    Ok(out)
}

fn address_message(index: u32, net: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = if net.addr().is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.prefix_len = net.prefix_len();
    msg.header.index = index;
    msg.header.scope = AddressScope::Universe;
    msg.header.flags = AddressHeaderFlags::Nodad;
    msg.attributes.push(AddressAttribute::Local(net.addr()));
    if net.addr().is_ipv6() {
        msg.attributes.push(AddressAttribute::Address(net.addr()));
    }
    msg.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    msg
}

/// Puts the planned tunnel address on the device and removes its other global addresses of
/// the device's family (the device is ours; Felix does the same).
fn sync_address(
    sock: &mut impl super::RouteSocket,
    device: &VxlanDevice,
    index: u32,
    addresses: &[(u32, IpNet)],
) -> Result<(), NetlinkError> {
    let family_v4 = device.local.is_ipv4();
    let have: Vec<IpNet> = addresses
        .iter()
        .filter(|(i, a)| *i == index && a.addr().is_ipv4() == family_v4)
        .map(|(_, a)| *a)
        .collect();
    let mut requests = Vec::new();
    for old in have.iter().filter(|a| Some(**a) != device.address) {
        requests.push(Request {
            message: RouteNetlinkMessage::DelAddress(address_message(index, *old)),
            flags: 0,
        });
    }
    if let Some(want) = device.address
        && !have.contains(&want)
    {
        requests.push(Request {
            message: RouteNetlinkMessage::NewAddress(address_message(index, want)),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        });
    }
    for r in sock.execute(requests) {
        r?;
    }
    Ok(())
}

fn neighbour_ip(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

/// Reads a neighbour (`ip neigh`) message.
pub fn observed_neighbour(m: &NeighbourMessage) -> Option<ObservedNeighbour> {
    let mut ip = None;
    let mut mac = None;
    let mut protocol = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(d) => ip = neighbour_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
            NeighbourAttribute::Protocol(p) => protocol = Some(u8::from(*p)),
            _ => {}
        }
    }
    Some(ObservedNeighbour {
        ifindex: m.header.ifindex,
        ip: ip?,
        mac,
        permanent: m.header.state == NeighbourState::Permanent,
        protocol,
    })
}

/// Reads an FDB (`bridge fdb`) message.
pub fn observed_fdb(m: &NeighbourMessage) -> Option<ObservedFdb> {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(d) => dst = neighbour_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
            _ => {}
        }
    }
    Some(ObservedFdb {
        ifindex: m.header.ifindex,
        mac: mac?,
        dst,
        permanent: m.header.state == NeighbourState::Permanent,
    })
}

fn dump_neighbours(
    sock: &mut impl super::RouteSocket,
) -> Result<Vec<ObservedNeighbour>, NetlinkError> {
    let mut out = Vec::new();
    sock.dump_each(
        RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewNeighbour(m) = m
                && let Some(n) = observed_neighbour(&m)
            {
                out.push(n);
            }
        },
    )?;
    Ok(out)
}

fn dump_fdb(sock: &mut impl super::RouteSocket) -> Result<Vec<ObservedFdb>, NetlinkError> {
    let mut out = Vec::new();
    let mut req = NeighbourMessage::default();
    req.header.family = AddressFamily::Bridge;
    sock.dump_each(RouteNetlinkMessage::GetNeighbour(req), |m| {
        if let RouteNetlinkMessage::NewNeighbour(m) = m
            && let Some(f) = observed_fdb(&m)
        {
            out.push(f);
        }
    })?;
    Ok(out)
}

fn ip_family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// The netlink request of one entry change.
pub fn entry_request(change: &EntryChange, protocol: u8) -> Request {
    let mut m = NeighbourMessage::default();
    match *change {
        EntryChange::SetNeighbour { ifindex, ip, mac } => {
            m.header.family = ip_family(ip);
            m.header.ifindex = ifindex;
            m.header.state = NeighbourState::Permanent;
            m.attributes = vec![
                NeighbourAttribute::Destination(neighbour_address(ip)),
                NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
                NeighbourAttribute::Protocol(RouteProtocol::from(protocol)),
            ];
            Request {
                message: RouteNetlinkMessage::NewNeighbour(m),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
            }
        }
        EntryChange::DelNeighbour { ifindex, ip } => {
            m.header.family = ip_family(ip);
            m.header.ifindex = ifindex;
            m.attributes = vec![NeighbourAttribute::Destination(neighbour_address(ip))];
            Request {
                message: RouteNetlinkMessage::DelNeighbour(m),
                flags: 0,
            }
        }
        EntryChange::SetFdb { ifindex, mac, dst } => {
            m.header.family = AddressFamily::Bridge;
            m.header.ifindex = ifindex;
            m.header.state = NeighbourState::Permanent;
            m.header.flags = NeighbourFlags::Own;
            m.attributes = vec![
                NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
                NeighbourAttribute::Destination(neighbour_address(dst)),
            ];
            Request {
                message: RouteNetlinkMessage::NewNeighbour(m),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
            }
        }
        EntryChange::DelFdb { ifindex, mac, dst } => {
            m.header.family = AddressFamily::Bridge;
            m.header.ifindex = ifindex;
            m.header.flags = NeighbourFlags::Own;
            m.attributes = vec![NeighbourAttribute::LinkLayerAddress(mac.0.to_vec())];
            if let Some(dst) = dst {
                m.attributes
                    .push(NeighbourAttribute::Destination(neighbour_address(dst)));
            }
            Request {
                message: RouteNetlinkMessage::DelNeighbour(m),
                flags: 0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tunnels::{CALICO_VXLAN_PORT, CALICO_VXLAN_VNI};

    fn device() -> VxlanDevice {
        VxlanDevice {
            name: "vxlan.calico".into(),
            vni: CALICO_VXLAN_VNI,
            port: CALICO_VXLAN_PORT,
            mac: "66:00:00:00:00:01".parse().unwrap(),
            local: "192.168.0.39".parse().unwrap(),
            parent: "ens33".into(),
            mtu: None,
            address: Some("10.244.0.0/32".parse().unwrap()),
        }
    }

    fn parent() -> ObservedLink {
        ObservedLink {
            index: 2,
            name: "ens33".into(),
            mtu: 1500,
            up: true,
            ..Default::default()
        }
    }

    fn as_planned() -> ObservedLink {
        ObservedLink {
            index: 7,
            name: "vxlan.calico".into(),
            kind: Some("vxlan".into()),
            mtu: 1450,
            up: true,
            mac: Some("66:00:00:00:00:01".parse().unwrap()),
            alias: None,
            vni: Some(4096),
            port: Some(4789),
            parent: Some(2),
            local: Some("192.168.0.39".parse().unwrap()),
            learning: Some(false),
        }
    }

    #[test]
    fn device_is_created_kept_recreated_or_left_alone() {
        let d = device();
        let p = parent();
        assert_eq!(decide_device(&d, None, Some(&p)), DeviceDecision::Create);
        assert_eq!(decide_device(&d, None, None), DeviceDecision::NoParent);
        // Felix's device with the same parameters (no alias): adopted as is.
        assert_eq!(
            decide_device(&d, Some(&as_planned()), Some(&p)),
            DeviceDecision::Keep
        );
        for (what, change) in [
            (
                "VNI",
                Box::new(|l: &mut ObservedLink| l.vni = Some(1)) as Box<dyn Fn(&mut ObservedLink)>,
            ),
            ("port", Box::new(|l: &mut ObservedLink| l.port = Some(8472))),
            (
                "parent",
                Box::new(|l: &mut ObservedLink| l.parent = Some(3)),
            ),
            (
                "MAC",
                Box::new(|l: &mut ObservedLink| l.mac = Some(MacAddr([2, 0, 0, 0, 0, 9]))),
            ),
            (
                "local",
                Box::new(|l: &mut ObservedLink| l.local = Some("10.0.0.1".parse().unwrap())),
            ),
            (
                "learning",
                Box::new(|l: &mut ObservedLink| l.learning = Some(true)),
            ),
        ] {
            let mut l = as_planned();
            change(&mut l);
            match decide_device(&d, Some(&l), Some(&p)) {
                DeviceDecision::Recreate(why) => assert!(why.contains(what), "{what}: {why}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // MTU and up are set in place, not by recreating.
        let mut l = as_planned();
        l.mtu = 9000;
        l.up = false;
        assert_eq!(decide_device(&d, Some(&l), Some(&p)), DeviceDecision::Keep);
        // Another kind of device of that name is never touched.
        let mut l = as_planned();
        l.kind = Some("bridge".into());
        assert_eq!(
            decide_device(&d, Some(&l), Some(&p)),
            DeviceDecision::Foreign("bridge".into())
        );
    }

    #[test]
    fn mtu_follows_the_parent_minus_the_overhead_of_the_family() {
        let mut d = device();
        assert_eq!(device_mtu(&d, 1500), 1450);
        assert_eq!(device_mtu(&d, 9001), 8951);
        d.local = "fd00::1".parse().unwrap();
        assert_eq!(device_mtu(&d, 1500), 1430);
        d.mtu = Some(1400);
        assert_eq!(device_mtu(&d, 1500), 1400);
        assert_eq!(device_mtu(&device(), 20), 0, "never underflows");
    }

    fn peer(tunnel: &str, mac: &str, underlay: &str) -> VxlanPeer {
        VxlanPeer {
            device: "vxlan.calico".into(),
            node: "n".into(),
            tunnel_ip: tunnel.parse().unwrap(),
            mac: mac.parse().unwrap(),
            underlay: underlay.parse().unwrap(),
        }
    }

    fn neigh(ip: &str, mac: &str, protocol: Option<u8>) -> ObservedNeighbour {
        ObservedNeighbour {
            ifindex: 7,
            ip: ip.parse().unwrap(),
            mac: Some(mac.parse().unwrap()),
            permanent: true,
            protocol,
        }
    }

    fn fdb(mac: &str, dst: &str) -> ObservedFdb {
        ObservedFdb {
            ifindex: 7,
            mac: mac.parse().unwrap(),
            dst: Some(dst.parse().unwrap()),
            permanent: true,
        }
    }

    const P: u8 = 157;

    #[test]
    fn missing_entries_are_written_and_present_ones_counted() {
        let a = peer("10.244.1.0", "0e:61:06:ff:7a:73", "192.168.0.22");
        let b = peer("10.244.2.0", "0a:72:bf:3f:cd:40", "192.168.0.8");
        let (changes, n, f) = diff_entries(7, &[&a, &b], &[], &[], P, &BTreeSet::new());
        assert_eq!((n, f), (0, 0));
        assert_eq!(changes.len(), 4);
        // Seed 000's tables in place: nothing to do.
        let neighbours = [
            neigh("10.244.1.0", "0e:61:06:ff:7a:73", Some(P)),
            neigh("10.244.2.0", "0a:72:bf:3f:cd:40", Some(P)),
        ];
        let entries = [
            fdb("0e:61:06:ff:7a:73", "192.168.0.22"),
            fdb("0a:72:bf:3f:cd:40", "192.168.0.8"),
        ];
        let (changes, n, f) =
            diff_entries(7, &[&a, &b], &neighbours, &entries, P, &BTreeSet::new());
        assert_eq!((changes, n, f), (vec![], 2, 2));
        // Felix's or flanneld's identical entries (no protocol) are adopted: the neighbours
        // rewritten in place with our protocol (same MAC), the FDB entries left as they are.
        let felix = [
            neigh("10.244.1.0", "0e:61:06:ff:7a:73", None),
            neigh("10.244.2.0", "0a:72:bf:3f:cd:40", None),
        ];
        let (changes, n, f) = diff_entries(7, &[&a, &b], &felix, &entries, P, &BTreeSet::new());
        assert_eq!((n, f), (0, 2), "neighbours counted once rewritten");
        assert_eq!(
            changes,
            [
                EntryChange::SetNeighbour {
                    ifindex: 7,
                    ip: a.tunnel_ip,
                    mac: a.mac
                },
                EntryChange::SetNeighbour {
                    ifindex: 7,
                    ip: b.tunnel_ip,
                    mac: b.mac
                },
            ]
        );
    }

    #[test]
    fn changed_underlay_or_mac_is_replaced() {
        let a = peer("10.244.1.0", "0e:61:06:ff:7a:73", "192.168.0.99");
        let neighbours = [neigh("10.244.1.0", "02:00:00:00:00:01", Some(P))];
        let entries = [fdb("0e:61:06:ff:7a:73", "192.168.0.22")];
        let (changes, n, f) = diff_entries(7, &[&a], &neighbours, &entries, P, &BTreeSet::new());
        assert_eq!((n, f), (0, 0));
        assert_eq!(
            changes,
            [
                EntryChange::SetNeighbour {
                    ifindex: 7,
                    ip: a.tunnel_ip,
                    mac: a.mac
                },
                EntryChange::SetFdb {
                    ifindex: 7,
                    mac: a.mac,
                    dst: a.underlay
                },
            ]
        );
    }

    #[test]
    fn only_our_unplanned_entries_are_removed() {
        let ours_n = neigh("10.244.3.0", "02:00:00:00:00:03", Some(P));
        let theirs_n = neigh("10.244.4.0", "02:00:00:00:00:04", None);
        let ours_f = fdb("02:00:00:00:00:03", "192.168.0.3");
        let theirs_f = fdb("02:00:00:00:00:04", "192.168.0.4");
        let written = fdb("02:00:00:00:00:05", "192.168.0.5");
        let owned: BTreeSet<MacAddr> = ["02:00:00:00:00:05".parse().unwrap()].into();
        // Entries on another device are not looked at.
        let mut elsewhere = fdb("02:00:00:00:00:03", "192.168.0.3");
        elsewhere.ifindex = 8;
        let (mut changes, _, _) = diff_entries(
            7,
            &[],
            &[ours_n.clone(), theirs_n],
            &[ours_f.clone(), theirs_f, written.clone(), elsewhere],
            P,
            &owned,
        );
        changes.sort();
        assert_eq!(
            changes,
            [
                EntryChange::DelNeighbour {
                    ifindex: 7,
                    ip: ours_n.ip
                },
                EntryChange::DelFdb {
                    ifindex: 7,
                    mac: ours_f.mac,
                    dst: ours_f.dst
                },
                EntryChange::DelFdb {
                    ifindex: 7,
                    mac: written.mac,
                    dst: written.dst
                },
            ]
        );
    }

    #[test]
    fn entry_requests_carry_permanent_state_self_and_our_protocol() {
        let set = entry_request(
            &EntryChange::SetNeighbour {
                ifindex: 7,
                ip: "10.244.1.0".parse().unwrap(),
                mac: "0e:61:06:ff:7a:73".parse().unwrap(),
            },
            P,
        );
        let RouteNetlinkMessage::NewNeighbour(m) = set.message else {
            panic!("not a neighbour message")
        };
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert!(
            m.attributes
                .contains(&NeighbourAttribute::Protocol(RouteProtocol::from(P)))
        );
        assert_eq!(set.flags, NLM_F_CREATE | NLM_F_REPLACE);
        let fdb = entry_request(
            &EntryChange::SetFdb {
                ifindex: 7,
                mac: "0e:61:06:ff:7a:73".parse().unwrap(),
                dst: "192.168.0.22".parse().unwrap(),
            },
            P,
        );
        let RouteNetlinkMessage::NewNeighbour(m) = fdb.message else {
            panic!("not a neighbour message")
        };
        assert_eq!(m.header.family, AddressFamily::Bridge);
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        let back = observed_fdb(&m).unwrap();
        assert_eq!(back.dst, Some("192.168.0.22".parse().unwrap()));
    }
}
