//! The reconcile decisions against a simulated kernel ([`SimKernel`] behind
//! [`RouteSocket`]): no root, no netlink. The netns tests (`tests/dataplane_netns.rs`) run
//! the same rules against the real kernel.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_core::NLM_F_EXCL;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::kernel::{KernelRoute, RouteKey};
use super::monitor::{Event, LinkInfo};
use super::socket::{NetlinkError, Request};
use super::*;
use crate::plan::{DesiredRoute, RouteKind, RouteScope};

const OURS: u8 = DEFAULT_ROUTE_PROTOCOL;
const BOOT: u8 = 3;

/// What the simulated kernel holds and was asked.
#[derive(Debug, Default)]
struct SimState {
    /// Links: index → (name, up with carrier).
    links: BTreeMap<u32, (String, bool)>,
    /// The main table.
    routes: BTreeMap<RouteKey, KernelRoute>,
    /// Requests that changed the table: ("add" | "replace" | "delete", destination).
    log: Vec<(&'static str, String)>,
    /// Submitted batches stay unanswered until waited for, or until the socket is used
    /// otherwise (as with the real socket's sender thread); `ready` says no once per batch.
    defer: bool,
    /// The submitted batch, before the kernel took it.
    submitted: Option<Vec<Request>>,
    /// Its results, once taken (by another call before `wait`).
    answered: Option<Vec<Result<(), NetlinkError>>>,
    /// `ready` calls while a batch was submitted (every other one answers no).
    not_ready: usize,
}

/// A routing table that answers like the kernel's rtnetlink for what the dataplane sends:
/// exclusive adds fail with EEXIST on a taken key, routes through a missing device with
/// ENODEV, deletes name the protocol and fail with ESRCH on anyone else's route.
#[derive(Clone, Default)]
struct SimKernel(Arc<Mutex<SimState>>);

fn refused(errno: i32) -> Result<(), NetlinkError> {
    Err(NetlinkError::Kernel {
        errno,
        message: None,
    })
}

impl SimKernel {
    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.0.lock().unwrap()
    }

    fn link(&self, index: u32, name: &str) -> &Self {
        self.state().links.insert(index, (name.into(), true));
        self
    }

    fn route(&self, route: KernelRoute) -> &Self {
        self.state().routes.insert(route.key, route);
        self
    }

    fn log(&self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut self.state().log)
    }

    fn table(&self) -> Vec<(String, u8)> {
        self.state()
            .routes
            .values()
            .map(|r| (r.key.dst.to_string(), r.protocol))
            .collect()
    }

    fn apply(&self, req: Request) -> Result<(), NetlinkError> {
        let mut st = self.state();
        match req.message {
            RouteNetlinkMessage::NewRoute(m) => {
                let Some(route) = KernelRoute::from_message(&m) else {
                    return refused(libc::EINVAL);
                };
                if req.flags & NLM_F_EXCL != 0 && st.routes.contains_key(&route.key) {
                    return refused(libc::EEXIST);
                }
                if route.oif.is_some_and(|i| !st.links.contains_key(&i)) {
                    return refused(libc::ENODEV);
                }
                let op = if st.routes.contains_key(&route.key) {
                    "replace"
                } else {
                    "add"
                };
                st.log.push((op, route.key.dst.to_string()));
                st.routes.insert(route.key, route);
                Ok(())
            }
            RouteNetlinkMessage::DelRoute(m) => {
                let Some(route) = KernelRoute::from_message(&m) else {
                    return refused(libc::EINVAL);
                };
                match st.routes.get(&route.key) {
                    Some(have) if have.protocol == route.protocol => {
                        st.routes.remove(&route.key);
                        st.log.push(("delete", route.key.dst.to_string()));
                        Ok(())
                    }
                    _ => refused(libc::ESRCH),
                }
            }
            _ => refused(libc::EOPNOTSUPP),
        }
    }
}

impl SimKernel {
    /// The kernel takes the submitted batch (deferred mode) and keeps its results for `wait`.
    fn take_submitted(&self) {
        let batch = self.state().submitted.take();
        if let Some(requests) = batch {
            let results: Vec<_> = requests.into_iter().map(|r| self.apply(r)).collect();
            self.state().answered = Some(results);
        }
    }
}

impl RouteSocket for SimKernel {
    fn submit(&mut self, requests: Vec<Request>) -> socket::Submitted {
        if !self.state().defer {
            let results = self.execute(requests);
            return socket::Submitted::done(socket::BatchResults { results, sends: 0 });
        }
        self.take_submitted();
        let mut st = self.state();
        assert!(
            st.answered.is_none(),
            "submit before the last batch was waited for"
        );
        st.submitted = Some(requests);
        socket::Submitted::running()
    }

    fn ready(&mut self) -> bool {
        let mut st = self.state();
        if st.submitted.is_some() && st.not_ready.is_multiple_of(2) {
            st.not_ready += 1;
            return false;
        }
        st.not_ready += usize::from(st.submitted.is_some());
        true
    }

    fn wait(&mut self, submitted: socket::Submitted) -> socket::BatchResults {
        if let Some(done) = submitted.into_done() {
            return done;
        }
        self.take_submitted();
        let results = self.state().answered.take().expect("a batch was submitted");
        socket::BatchResults { results, sends: 0 }
    }

    /// The simulated kernel has only connected subnets: no gateway needs a recursive look-up.
    fn get(&mut self, _message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NetlinkError> {
        self.take_submitted();
        Err(NetlinkError::Kernel {
            errno: libc::ENETUNREACH,
            message: None,
        })
    }

    fn execute(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
    ) -> Vec<Result<(), NetlinkError>> {
        let requests: Vec<Request> = requests.into_iter().collect();
        self.take_submitted();
        requests.into_iter().map(|r| self.apply(r)).collect()
    }

    fn dump_each(
        &mut self,
        message: RouteNetlinkMessage,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        self.take_submitted();
        let st = self.state();
        match message {
            RouteNetlinkMessage::GetLink(_) => {
                for (index, (name, carrier)) in &st.links {
                    let mut m = LinkMessage::default();
                    m.header.index = *index;
                    if *carrier {
                        m.header.flags = LinkFlags::Up | LinkFlags::Running;
                    }
                    m.attributes.push(LinkAttribute::IfName(name.clone()));
                    each(RouteNetlinkMessage::NewLink(m));
                }
            }
            // Unfiltered: the dataplane filters what it reads again.
            RouteNetlinkMessage::GetRoute(_) => {
                for route in st.routes.values() {
                    each(RouteNetlinkMessage::NewRoute(route.new_message()));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn sends(&self) -> u64 {
        0
    }
}

const NIC: u32 = 2;
const TUNL0: u32 = 3;
const CALI: u32 = 4;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A node with `ens33` and `cali67beaa0e9f4` (and `tunl0` when asked).
fn kernel(tunl0: bool) -> SimKernel {
    let k = SimKernel::default();
    k.link(1, "lo")
        .link(NIC, "ens33")
        .link(CALI, "cali67beaa0e9f4");
    if tunl0 {
        k.link(TUNL0, "tunl0");
    }
    k
}

fn open(k: &SimKernel) -> Dataplane<SimKernel> {
    Dataplane::with_socket(DataplaneConfig::default(), k.clone(), None).unwrap()
}

fn blackhole(prefix: &str) -> DesiredRoute {
    DesiredRoute {
        prefix: net(prefix),
        kind: RouteKind::Blackhole,
        gateway: None,
        device: None,
        onlink: false,
        scope: RouteScope::Universe,
    }
}

fn workload(prefix: &str) -> DesiredRoute {
    DesiredRoute {
        prefix: net(prefix),
        kind: RouteKind::Workload,
        gateway: None,
        device: Some("cali67beaa0e9f4".into()),
        onlink: false,
        scope: RouteScope::Link,
    }
}

fn ipip(prefix: &str, node: &str) -> DesiredRoute {
    DesiredRoute {
        prefix: net(prefix),
        kind: RouteKind::BlockIpip,
        gateway: Some(ip(node)),
        device: Some("tunl0".into()),
        onlink: true,
        scope: RouteScope::Universe,
    }
}

fn direct(prefix: &str, node: &str) -> DesiredRoute {
    DesiredRoute {
        prefix: net(prefix),
        kind: RouteKind::BlockDirect,
        gateway: Some(ip(node)),
        device: Some("ens33".into()),
        onlink: false,
        scope: RouteScope::Universe,
    }
}

/// `route` as the kernel holds it when `protocol` installed it through link `oif`.
fn installed(route: &DesiredRoute, protocol: u8, oif: Option<u32>) -> KernelRoute {
    KernelRoute::wanted(
        route.prefix,
        protocol,
        route.is_blackhole(),
        route.scope == RouteScope::Link,
        route.gateway,
        oif,
        route.onlink,
    )
}

fn log(entries: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    entries.iter().map(|(op, d)| (*op, d.to_string())).collect()
}

#[test]
fn a_restart_adopts_what_is_planned_and_deletes_only_its_own_leftovers() {
    let k = kernel(false);
    let kept = blackhole("172.16.241.64/26");
    k.route(installed(&kept, OURS, None))
        .route(installed(&blackhole("172.16.9.0/26"), OURS, None))
        .route(installed(
            &direct("10.1.0.0/16", "192.168.92.1"),
            BOOT,
            Some(NIC),
        ));
    let mut dp = open(&k);
    assert_eq!(dp.status().installed_routes, 2, "ours adopted");
    assert_eq!(
        dp.reconcile(),
        ApplyReport::default(),
        "no plan yet: nothing deleted"
    );
    assert!(k.log().is_empty());
    let new = direct("172.16.196.128/26", "192.168.92.129");
    dp.set_desired([&kept, &new]);
    let report = dp.reconcile();
    assert_eq!((report.added, report.deleted, report.replaced), (1, 1, 0));
    assert_eq!(
        k.log(),
        log(&[("add", "172.16.196.128/26"), ("delete", "172.16.9.0/26")]),
        "adds before deletes; the adopted route as planned is not touched"
    );
    assert!(
        k.table().contains(&("10.1.0.0/16".into(), BOOT)),
        "another owner's route stays"
    );
    assert_eq!(dp.reconcile(), ApplyReport::default(), "in sync");
}

#[test]
fn another_owners_route_satisfies_the_plan_when_identical_and_is_never_touched() {
    let k = kernel(false);
    let pod = workload("172.16.241.69/32");
    let held = direct("172.16.196.128/26", "192.168.92.129");
    // The CNI plugin's identical pod route; someone else's different route at a block.
    k.route(installed(&pod, BOOT, Some(CALI))).route(installed(
        &direct("172.16.196.128/26", "192.168.92.200"),
        BOOT,
        Some(NIC),
    ));
    let mut dp = open(&k);
    dp.set_desired([&pod, &held]);
    let report = dp.reconcile();
    assert_eq!(report.changes(), 1, "one failure, no request: {report:?}");
    assert!(k.log().is_empty(), "nothing sent to the kernel");
    let status = dp.status();
    assert_eq!(
        status.by_other_owner,
        vec![OtherOwner {
            prefix: net("172.16.241.69/32"),
            protocol: BOOT
        }]
    );
    assert_eq!(status.failures.len(), 1);
    assert_eq!(
        status.failures[0].error,
        RouteError::Occupied {
            protocol: Some(BOOT)
        }
    );
    assert_eq!(status.programmed_by_kind[RouteKind::Workload.index()], 1);
    // The other owner removes its route (the monitor says so): ours goes in.
    let theirs = k
        .state()
        .routes
        .remove(&installed(&held, BOOT, Some(NIC)).key)
        .unwrap();
    let (dirty, resync) = dp.absorb(vec![Event::RouteRemoved(theirs)]);
    assert!(!resync);
    dp.reconcile_some(&dirty);
    assert_eq!(k.log(), log(&[("add", "172.16.196.128/26")]));
    assert!(dp.status().failures.is_empty());
}

#[test]
fn an_add_refused_with_eexist_looks_up_the_route_in_the_way() {
    let k = kernel(false);
    let mut dp = open(&k);
    let want = direct("172.16.196.128/26", "192.168.92.129");
    dp.set_desired([&want]);
    // Added behind the dataplane's back after its last read, and different from the plan.
    k.route(installed(
        &direct("172.16.196.128/26", "192.168.92.7"),
        4,
        Some(NIC),
    ));
    let report = dp.reconcile();
    assert_eq!(report.failed, 1);
    assert_eq!(
        dp.status().failures[0].error,
        RouteError::Occupied { protocol: Some(4) }
    );
    assert!(k.log().is_empty());
}

#[test]
fn a_delta_reconciles_only_its_prefixes() {
    let k = kernel(false);
    let mut dp = open(&k);
    let a = blackhole("172.16.241.64/26");
    let b = direct("172.16.196.128/26", "192.168.92.129");
    dp.set_desired([&a, &b]);
    dp.reconcile();
    k.log();
    let moved = direct("172.16.196.128/26", "192.168.92.130");
    let c = direct("172.16.10.0/26", "192.168.92.131");
    let dirty = dp.apply_delta(vec![
        RouteChange::Upsert(moved),
        RouteChange::Upsert(c),
        RouteChange::Upsert(a.clone()),
        RouteChange::Remove(net("172.16.241.64/26")),
    ]);
    assert_eq!(
        dirty,
        vec![
            net("172.16.10.0/26"),
            net("172.16.196.128/26"),
            net("172.16.241.64/26")
        ]
    );
    dp.reconcile_some(&dirty);
    assert_eq!(
        k.log(),
        log(&[
            ("add", "172.16.10.0/26"),
            ("replace", "172.16.196.128/26"),
            ("delete", "172.16.241.64/26"),
        ])
    );
    let unchanged = dp.apply_delta(vec![RouteChange::Upsert(direct(
        "172.16.10.0/26",
        "192.168.92.131",
    ))]);
    assert!(unchanged.is_empty(), "the same route again changes nothing");
}

#[test]
fn routes_wait_for_a_missing_device_and_go_in_when_it_appears() {
    let k = kernel(false);
    let mut dp = open(&k);
    let route = ipip("172.16.10.0/26", "192.168.93.130");
    dp.set_desired([&route]);
    dp.reconcile();
    assert!(k.log().is_empty());
    assert_eq!(
        dp.status().failures[0].error,
        RouteError::MissingDevice("tunl0".into())
    );
    k.link(TUNL0, "tunl0");
    let (dirty, resync) = dp.absorb(vec![Event::LinkChanged(LinkInfo {
        index: TUNL0,
        name: Some("tunl0".into()),
        up: true,
        running: true,
        mtu: Some(1480),
    })]);
    assert!(!resync);
    assert_eq!(dirty, vec![net("172.16.10.0/26")]);
    dp.reconcile_some(&dirty);
    assert_eq!(k.log(), log(&[("add", "172.16.10.0/26")]));
    assert!(dp.status().failures.is_empty());
}

#[test]
fn the_tunnel_table_follows_the_desired_ipip_routes() {
    let k = kernel(true);
    // The previous run's route through tunl0, adopted at open.
    let old = ipip("172.16.9.0/26", "192.168.93.140");
    k.route(installed(&old, OURS, Some(TUNL0)));
    let mut dp = open(&k);
    let remotes =
        |dp: &Dataplane<SimKernel>| -> Vec<(Ipv4Net, Ipv4Addr)> { dp.tunnels.ipip_remotes() };
    let v4 = |n: &str| n.parse::<Ipv4Net>().unwrap();
    let a4 = |a: &str| a.parse::<Ipv4Addr>().unwrap();
    assert_eq!(
        remotes(&dp),
        vec![(v4("172.16.9.0/26"), a4("192.168.93.140"))],
        "until the first plan, the adopted routes"
    );
    dp.set_desired([
        &ipip("172.16.196.128/26", "192.168.93.130"),
        &direct("172.16.10.0/26", "192.168.92.129"),
        &blackhole("172.16.241.64/26"),
    ]);
    assert_eq!(
        remotes(&dp),
        vec![(v4("172.16.196.128/26"), a4("192.168.93.130"))],
        "the first full plan replaces them; IPIP routes only"
    );
    dp.apply_delta(vec![
        RouteChange::Upsert(ipip("172.16.10.0/26", "192.168.93.131")),
        RouteChange::Upsert(direct("172.16.196.128/26", "192.168.92.130")),
    ]);
    assert_eq!(
        remotes(&dp),
        vec![(v4("172.16.10.0/26"), a4("192.168.93.131"))],
        "a route moving into the tunnel enters it, one leaving it goes"
    );
    dp.apply_delta(vec![RouteChange::Remove(net("172.16.10.0/26"))]);
    assert!(remotes(&dp).is_empty());
    dp.set_desired([&ipip("172.16.20.0/26", "192.168.93.150")]);
    assert_eq!(
        remotes(&dp),
        vec![(v4("172.16.20.0/26"), a4("192.168.93.150"))]
    );
}

#[test]
fn link_facts_follow_the_monitor() {
    let k = kernel(false);
    let mut dp = open(&k);
    let mut facts = dp.link_facts();
    assert_eq!(facts.borrow().has_carrier("ens33"), Some(true));
    assert_eq!(
        facts.borrow_and_update().named_with_prefix("cali"),
        ["cali67beaa0e9f4".to_string()].into()
    );
    dp.absorb(vec![
        Event::LinkChanged(LinkInfo {
            index: NIC,
            name: Some("ens33".into()),
            up: true,
            running: false,
            mtu: Some(1500),
        }),
        Event::LinkChanged(LinkInfo {
            index: 9,
            name: Some("cali0fd794bcf81".into()),
            up: true,
            running: true,
            mtu: Some(1500),
        }),
        Event::LinkRemoved(LinkInfo {
            index: CALI,
            name: Some("cali67beaa0e9f4".into()),
            up: false,
            running: false,
            mtu: None,
        }),
    ]);
    assert!(facts.has_changed().unwrap());
    let now = facts.borrow_and_update().clone();
    assert_eq!(now.has_carrier("ens33"), Some(false), "carrier lost");
    assert_eq!(now.has_carrier("eth9"), None);
    assert_eq!(
        now.named_with_prefix("cali"),
        ["cali0fd794bcf81".to_string()].into()
    );
    // A link event that changes no fact publishes nothing.
    dp.absorb(vec![Event::LinkChanged(LinkInfo {
        index: 9,
        name: Some("cali0fd794bcf81".into()),
        up: true,
        running: true,
        mtu: Some(9000),
    })]);
    assert!(!facts.has_changed().unwrap());
}

fn vxlan(prefix: &str, vtep: &str) -> DesiredRoute {
    DesiredRoute {
        prefix: net(prefix),
        kind: RouteKind::BlockVxlan,
        gateway: Some(ip(vtep)),
        device: Some("vxlan.calico".into()),
        onlink: true,
        scope: RouteScope::Universe,
    }
}

#[test]
fn tunl0_is_needed_until_the_last_route_through_it_has_moved() {
    const VXLAN: u32 = 5;
    let k = kernel(true);
    let mut dp = open(&k);
    let a = ipip("172.16.196.128/26", "192.168.93.130");
    let b = ipip("172.16.10.0/26", "192.168.93.131");
    dp.set_desired([&a, &b, &blackhole("172.16.241.64/26")]);
    dp.reconcile();
    k.log();
    assert!(dp.device_needed("tunl0"), "desired routes name it");
    // The pool moves to VXLAN while vxlan.calico is not there yet: the new routes wait for
    // their device, and the old ones stay in the kernel, through tunl0.
    dp.set_desired([
        &vxlan("172.16.196.128/26", "172.16.196.128"),
        &vxlan("172.16.10.0/26", "172.16.10.0"),
        &blackhole("172.16.241.64/26"),
    ]);
    dp.reconcile();
    assert!(k.log().is_empty(), "nothing deleted, nothing replaced");
    assert!(
        k.state()
            .routes
            .values()
            .filter(|r| r.oif == Some(TUNL0))
            .count()
            == 2,
        "the old routes still carry the traffic"
    );
    assert!(
        dp.device_needed("tunl0"),
        "no desired route names tunl0, but two destinations are between their routes"
    );
    // The device comes; one route moves, the other's replace is refused (the device goes
    // again meanwhile, say): still needed.
    k.link(VXLAN, "vxlan.calico");
    let (dirty, _) = dp.absorb(vec![Event::LinkChanged(LinkInfo {
        index: VXLAN,
        name: Some("vxlan.calico".into()),
        up: true,
        running: true,
        mtu: Some(1450),
    })]);
    dp.reconcile_some(&dirty[..1]);
    assert_eq!(k.log(), log(&[("replace", "172.16.10.0/26")]));
    assert!(
        dp.device_needed("tunl0"),
        "one route still goes through tunl0"
    );
    dp.reconcile_some(&dirty);
    assert_eq!(k.log(), log(&[("replace", "172.16.196.128/26")]));
    assert!(
        !k.state().routes.values().any(|r| r.oif == Some(TUNL0)),
        "no route through tunl0 left"
    );
    assert!(!dp.device_needed("tunl0"), "now it may go");
    assert!(dp.device_needed("vxlan.calico"));
    // A route of ours through tunl0 that the plan does not want (left by a previous run, or
    // added by hand) keeps it until it is deleted.
    let left = ipip("172.16.20.0/26", "192.168.93.150");
    k.route(installed(&left, OURS, Some(TUNL0)));
    dp.read_kernel().unwrap();
    assert!(dp.device_needed("tunl0"));
    dp.reconcile();
    assert_eq!(k.log(), log(&[("delete", "172.16.20.0/26")]));
    assert!(!dp.device_needed("tunl0"));
}

/// `n` /26 blocks in 10.0.0.0/8 from block `from` on, direct through `node`.
fn blocks(from: u32, n: u32, node: &str) -> Vec<DesiredRoute> {
    (from..from + n)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i * 64);
            direct(&format!("{a}/26"), node)
        })
        .collect()
}

/// A stream of deltas larger than a chunk, with later deltas changing and removing routes of
/// chunks still in flight: with the kernel answering each batch only when the dataplane
/// waits for it (or uses the socket otherwise), the table ends as the plan says, every
/// destination decided on its answers (no failure, no refused add), and every update counted
/// as applied.
#[tokio::test]
async fn a_stream_with_chunks_in_flight_ends_with_the_plan_in_the_kernel() {
    let k = kernel(false);
    k.state().defer = true;
    let mut dp = open(&k);
    let own = blackhole("172.16.241.64/26");
    dp.set_desired([&own]);
    dp.reconcile();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut seq = 0;
    let mut send = |changes: Vec<RouteChange>| {
        seq += 1;
        tx.send(PlanMessage {
            seq,
            update: PlanUpdate::Delta(changes),
        })
        .unwrap();
    };
    let total = 3 * RECONCILE_CHUNK as u32 + 100;
    let first = blocks(0, total, "192.168.92.129");
    for part in first.chunks(1000) {
        send(part.iter().cloned().map(RouteChange::Upsert).collect());
    }
    // Moved to another next hop: blocks of the first chunks, and of the last.
    let moved = blocks(10, 500, "192.168.92.130").into_iter().chain(blocks(
        total - 50,
        50,
        "192.168.92.130",
    ));
    send(moved.map(RouteChange::Upsert).collect());
    // Removed, and some of them back.
    let removed: Vec<IpNet> = blocks(2000, 300, "192.168.92.129")
        .iter()
        .map(|r| r.prefix)
        .collect();
    send(removed.iter().map(|p| RouteChange::Remove(*p)).collect());
    send(
        blocks(2000, 100, "192.168.92.131")
            .into_iter()
            .map(RouteChange::Upsert)
            .collect(),
    );
    let last = seq;
    let first_message = rx.recv().await.unwrap();
    let (status_tx, _status_rx) = watch::channel(DataplaneStatus::default());
    dp.stream(first_message, &mut rx, &status_tx).await;

    // What the plan says now.
    let mut want: BTreeMap<IpNet, IpAddr> = first
        .iter()
        .map(|r| (r.prefix, ip("192.168.92.129")))
        .collect();
    for r in blocks(10, 500, "192.168.92.130").into_iter().chain(blocks(
        total - 50,
        50,
        "192.168.92.130",
    )) {
        want.insert(r.prefix, ip("192.168.92.130"));
    }
    for p in &removed {
        want.remove(p);
    }
    for r in blocks(2000, 100, "192.168.92.131") {
        want.insert(r.prefix, ip("192.168.92.131"));
    }
    let st = k.state();
    let have: BTreeMap<IpNet, IpAddr> = st
        .routes
        .values()
        .filter(|r| r.gateway.is_some())
        .map(|r| (r.key.dst, r.gateway.unwrap()))
        .collect();
    assert_eq!(have.len(), want.len());
    assert!(have == want, "the kernel table is the plan");
    assert!(
        st.submitted.is_none() && st.answered.is_none(),
        "nothing left in flight"
    );
    assert!(
        st.not_ready > 0,
        "updates were taken while a batch was with the kernel"
    );
    drop(st);
    assert!(dp.inflight.is_none());
    assert!(
        dp.failures.is_empty(),
        "{:?}",
        dp.failures.keys().take(5).collect::<Vec<_>>()
    );
    assert_eq!(dp.counters.route_errors, 0);
    assert_eq!(dp.applied, Some(last));
    let status = dp.status();
    assert_eq!(status.installed_routes, want.len() + 1);
}
