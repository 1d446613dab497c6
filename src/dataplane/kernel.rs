//! Routes as the kernel holds them, their netlink messages, and the changes made to them.
//!
//! A kernel route is identified by (table, destination, TOS, priority): that is the key the
//! kernel matches `NLM_F_REPLACE` and deletes on. The protocol is not part of the key, which is
//! why adds use `NLM_F_EXCL` (never replace a foreign route), replaces are only issued for
//! routes that carry our protocol, and deletes name our protocol (the kernel then never
//! deletes a foreign route).

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::socket::Request;

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
/// Priority the kernel gives IPv6 routes added without one (`IP6_RT_PRIO_USER`).
pub const IPV6_DEFAULT_PRIORITY: u32 = 1024;

const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTN_BLACKHOLE: u8 = 6;

/// What identifies a route in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub dst: IpNet,
    pub priority: u32,
    pub tos: u8,
}

impl RouteKey {
    /// Every key with destination `dst`, for range queries.
    pub(crate) fn range(dst: IpNet) -> std::ops::RangeInclusive<RouteKey> {
        RouteKey {
            dst,
            priority: 0,
            tos: 0,
        }..=RouteKey {
            dst,
            priority: u32::MAX,
            tos: u8::MAX,
        }
    }
}

/// A route of the main table, or one we want there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub key: RouteKey,
    pub protocol: u8,
    /// `RTN_*` type (unicast, blackhole, ...).
    pub kind: u8,
    pub scope: u8,
    pub gateway: Option<IpAddr>,
    /// Output interface; in a wanted route `None` means "whatever the kernel resolves".
    pub oif: Option<u32>,
    pub onlink: bool,
    /// An ECMP route (never one of ours).
    pub multipath: bool,
}

impl KernelRoute {
    /// A unicast or blackhole route with our protocol, as the plan wants it.
    pub fn wanted(
        dst: IpNet,
        protocol: u8,
        blackhole: bool,
        link_scope: bool,
        gateway: Option<IpAddr>,
        oif: Option<u32>,
        onlink: bool,
    ) -> Self {
        let priority = if dst.addr().is_ipv6() {
            IPV6_DEFAULT_PRIORITY
        } else {
            0
        };
        Self {
            key: RouteKey {
                dst,
                priority,
                tos: 0,
            },
            protocol,
            kind: if blackhole {
                RTN_BLACKHOLE
            } else {
                RTN_UNICAST
            },
            scope: if link_scope {
                RT_SCOPE_LINK
            } else {
                RT_SCOPE_UNIVERSE
            },
            gateway,
            oif,
            onlink,
            multipath: false,
        }
    }

    /// Does the kernel route `have` (same key) do what this wanted route asks, as ours (same
    /// protocol)?
    pub fn satisfied_by(&self, have: &KernelRoute) -> bool {
        have.protocol == self.protocol && self.same_route_as(have)
    }

    /// Does `have`, whoever owns it, route exactly as this wanted route asks: same key, type,
    /// gateway, device (when the plan names one), scope and onlink flag, and not ECMP? The
    /// protocol is not compared: an identical route of another owner (the CNI plugin's pod
    /// route, protocol `boot`) satisfies the plan.
    pub fn same_route_as(&self, have: &KernelRoute) -> bool {
        let v4 = self.key.dst.addr().is_ipv4();
        have.key == self.key
            && have.kind == self.kind
            && have.gateway == self.gateway
            && (self.oif.is_none() || have.oif == self.oif)
            // IPv6 does not report scope (always universe).
            && (!v4 || have.scope == self.scope)
            && have.onlink == self.onlink
            && !have.multipath
    }

    /// Parses a route message of the main table; `None` for other tables, families and
    /// cache entries.
    pub fn from_message(msg: &RouteMessage) -> Option<Self> {
        let h = &msg.header;
        if !matches!(h.address_family, AddressFamily::Inet | AddressFamily::Inet6) {
            return None;
        }
        if h.flags.contains(RouteFlags::Cloned) {
            return None;
        }
        let mut table = u32::from(h.table);
        let mut dst: Option<IpAddr> = None;
        let mut route = KernelRoute {
            key: RouteKey {
                dst: IpNet::default(),
                priority: 0,
                tos: h.tos,
            },
            protocol: h.protocol.into(),
            kind: h.kind.into(),
            scope: h.scope.into(),
            gateway: None,
            oif: None,
            onlink: h.flags.contains(RouteFlags::Onlink),
            multipath: false,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(a) => dst = address(a),
                RouteAttribute::Gateway(a) => route.gateway = address(a),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Priority(p) => route.key.priority = *p,
                RouteAttribute::MultiPath(_) => route.multipath = true,
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN {
            return None;
        }
        let v6 = h.address_family == AddressFamily::Inet6;
        let dst = dst.unwrap_or(if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        });
        if dst.is_ipv6() != v6 {
            return None;
        }
        route.key.dst = IpNet::new(dst, h.destination_prefix_length).ok()?;
        Some(route)
    }

    fn header(&self) -> RouteHeader {
        RouteHeader {
            address_family: if self.key.dst.addr().is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            },
            destination_prefix_length: self.key.dst.prefix_len(),
            tos: self.key.tos,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::from(self.protocol),
            scope: RouteScope::from(self.scope),
            kind: RouteType::from(self.kind),
            ..RouteHeader::default()
        }
    }

    fn base_attributes(&self) -> Vec<RouteAttribute> {
        let mut attrs = Vec::with_capacity(4);
        if self.key.dst.prefix_len() > 0 {
            attrs.push(RouteAttribute::Destination(RouteAddress::from(
                self.key.dst.addr(),
            )));
        }
        if self.key.priority != 0 {
            attrs.push(RouteAttribute::Priority(self.key.priority));
        }
        attrs
    }

    /// `RTM_NEWROUTE` for this route.
    pub fn new_message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header = self.header();
        if self.onlink {
            msg.header.flags |= RouteFlags::Onlink;
        }
        msg.attributes = self.base_attributes();
        if let Some(gw) = self.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(oif) = self.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg
    }

    /// `RTM_DELROUTE` for this route: key, type and protocol, so that only this route matches.
    pub fn del_message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header = self.header();
        // Scope "nowhere" on delete means "any scope".
        msg.header.scope = RouteScope::NoWhere;
        msg.attributes = self.base_attributes();
        msg
    }
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// `RTM_GETROUTE` for the single address `to`: the kernel answers with the route it would use
/// to reach it (`ip route get TO`).
pub fn get_route_request(to: IpAddr) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if to.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.destination_prefix_length = if to.is_ipv6() { 128 } else { 32 };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(to)));
    RouteNetlinkMessage::GetRoute(msg)
}

/// From the answer to [`get_route_request`]: the gateway and output device the kernel would
/// use, when it would use a gateway (`None`: the address is on a connected subnet, or the
/// answer is not a unicast route).
pub fn next_hop_of(answer: &RouteNetlinkMessage) -> Option<(IpAddr, u32)> {
    let RouteNetlinkMessage::NewRoute(m) = answer else {
        return None;
    };
    if u8::from(m.header.kind) != RTN_UNICAST {
        return None;
    }
    let mut gateway = None;
    let mut oif = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Gateway(a) => gateway = address(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some((gateway?, oif?))
}

/// The route dump request: main table, our protocol (the kernel filters with strict
/// checking on; [`KernelRoute::from_message`] and the caller filter again).
pub fn dump_request(protocol: u8) -> RouteNetlinkMessage {
    dump_request_filtered(Some(protocol), None)
}

/// The route dump request of the main table: only `protocol` when given, only routes
/// through device `oif` when given (as [`dump_request`]).
pub fn dump_request_filtered(protocol: Option<u8>, oif: Option<u32>) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    // Protocol 0 (unspec) means "any" in a dump filter.
    msg.header.protocol = RouteProtocol::from(protocol.unwrap_or(0));
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    RouteNetlinkMessage::GetRoute(msg)
}

/// A route protocol number shown as iproute2 names it (`/etc/iproute2/rt_protos`): `boot`,
/// `static`, `bird`, ...; numbers without a name (Felix's 80, podroute's 157) as the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol(pub u8);

impl Protocol {
    /// iproute2's name of the protocol, if it has one.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "unspec",
            1 => "redirect",
            2 => "kernel",
            3 => "boot",
            4 => "static",
            8 => "gated",
            9 => "ra",
            10 => "mrt",
            11 => "zebra",
            12 => "bird",
            13 => "dnrouted",
            14 => "xorp",
            15 => "ntk",
            16 => "dhcp",
            17 => "mrouted",
            18 => "keepalived",
            42 => "babel",
            99 => "openr",
            186 => "bgp",
            187 => "isis",
            188 => "ospf",
            189 => "rip",
            192 => "eigrp",
            _ => return None,
        })
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

/// One change to the kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create a route where none with its key exists (`NLM_F_CREATE | NLM_F_EXCL`).
    Add(KernelRoute),
    /// Overwrite our route with the same key (`NLM_F_CREATE | NLM_F_REPLACE`).
    Replace(KernelRoute),
    /// Remove one of our routes.
    Delete(KernelRoute),
}

impl Change {
    pub fn route(&self) -> &KernelRoute {
        match self {
            Self::Add(r) | Self::Replace(r) | Self::Delete(r) => r,
        }
    }

    pub fn request(&self) -> Request {
        match self {
            Self::Add(r) => Request {
                message: RouteNetlinkMessage::NewRoute(r.new_message()),
                flags: NLM_F_CREATE | NLM_F_EXCL,
            },
            Self::Replace(r) => Request {
                message: RouteNetlinkMessage::NewRoute(r.new_message()),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
            },
            Self::Delete(r) => Request {
                message: RouteNetlinkMessage::DelRoute(r.del_message()),
                flags: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u8 = 157;

    #[test]
    fn the_next_hop_of_a_route_lookup_is_its_gateway_when_it_has_one() {
        let RouteNetlinkMessage::GetRoute(req) = get_route_request("fd00:93::130".parse().unwrap())
        else {
            panic!("not RTM_GETROUTE");
        };
        assert_eq!(req.header.address_family, AddressFamily::Inet6);
        assert_eq!(req.header.destination_prefix_length, 128);
        // Through the router: the answer's gateway and device.
        let answer = |gw: Option<&str>, kind: RouteType| {
            let mut m = RouteMessage::default();
            m.header.address_family = AddressFamily::Inet6;
            m.header.kind = kind;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    "fd00:93::130".parse::<IpAddr>().unwrap(),
                )));
            if let Some(gw) = gw {
                m.attributes
                    .push(RouteAttribute::Gateway(RouteAddress::from(
                        gw.parse::<IpAddr>().unwrap(),
                    )));
            }
            m.attributes.push(RouteAttribute::Oif(7));
            RouteNetlinkMessage::NewRoute(m)
        };
        assert_eq!(
            next_hop_of(&answer(Some("fd00:92::1"), RouteType::Unicast)),
            Some(("fd00:92::1".parse().unwrap(), 7))
        );
        // On a connected subnet: no gateway. Unreachable: not a next hop.
        assert_eq!(next_hop_of(&answer(None, RouteType::Unicast)), None);
        assert_eq!(
            next_hop_of(&answer(Some("fd00:92::1"), RouteType::Unreachable)),
            None
        );
        assert_eq!(
            next_hop_of(&RouteNetlinkMessage::GetRoute(RouteMessage::default())),
            None
        );
    }

    fn via(dst: &str, gw: &str, oif: Option<u32>, onlink: bool) -> KernelRoute {
        KernelRoute::wanted(
            dst.parse().unwrap(),
            P,
            false,
            false,
            Some(gw.parse().unwrap()),
            oif,
            onlink,
        )
    }

    #[test]
    fn kernel_resolved_device_satisfies_a_route_without_one() {
        let want = via("10.0.0.0/26", "192.168.1.2", None, false);
        let mut have = want.clone();
        have.oif = Some(2);
        assert!(want.satisfied_by(&have));
        let pinned = via("10.0.0.0/26", "192.168.1.2", Some(3), false);
        assert!(!pinned.satisfied_by(&have), "another device");
    }

    #[test]
    fn shape_differences_are_not_satisfied() {
        let want = via("10.0.1.0/26", "192.168.1.3", Some(3), true);
        let mut other_gw = want.clone();
        other_gw.gateway = Some("192.168.1.4".parse().unwrap());
        let mut not_onlink = want.clone();
        not_onlink.onlink = false;
        let mut foreign = want.clone();
        foreign.protocol = 3;
        let mut other_metric = want.clone();
        other_metric.key.priority = 5;
        let mut ecmp = want.clone();
        ecmp.multipath = true;
        assert!(want.satisfied_by(&want.clone()));
        for have in [other_gw, not_onlink, foreign, other_metric, ecmp] {
            assert!(!want.satisfied_by(&have), "{have:?}");
        }
    }

    /// The route Calico's CNI plugin adds for a pod: `POD/32 dev caliXXX scope link`, protocol
    /// `boot` (the netlink default).
    fn cni_route(dst: &str, oif: u32) -> KernelRoute {
        KernelRoute::wanted(dst.parse().unwrap(), 3, false, true, None, Some(oif), false)
    }

    #[test]
    fn an_identical_route_of_another_owner_is_the_same_route_but_not_ours() {
        let want = KernelRoute::wanted(
            "172.16.241.65/32".parse().unwrap(),
            P,
            false,
            true,
            None,
            Some(7),
            false,
        );
        let cni = cni_route("172.16.241.65/32", 7);
        assert!(want.same_route_as(&cni));
        assert!(
            !want.satisfied_by(&cni),
            "not ours: never adopted or replaced"
        );
        let other_device = cni_route("172.16.241.65/32", 8);
        let mut universe = cni.clone();
        universe.scope = RT_SCOPE_UNIVERSE;
        let mut via = cni.clone();
        via.gateway = Some("192.168.92.1".parse().unwrap());
        let mut blackhole = cni.clone();
        blackhole.kind = RTN_BLACKHOLE;
        for have in [other_device, universe, via, blackhole] {
            assert!(!want.same_route_as(&have), "{have:?}");
        }
    }

    #[test]
    fn protocols_are_named_as_iproute2_names_them() {
        assert_eq!(Protocol(3).to_string(), "boot");
        assert_eq!(Protocol(4).to_string(), "static");
        assert_eq!(Protocol(12).to_string(), "bird");
        assert_eq!(Protocol(80).to_string(), "80");
        assert_eq!(Protocol(157).to_string(), "157");
    }

    #[test]
    fn key_range_holds_every_key_of_a_destination_only() {
        let dst: IpNet = "10.0.0.0/26".parse().unwrap();
        let range = RouteKey::range(dst);
        for (priority, tos) in [(0, 0), (5, 0), (u32::MAX, u8::MAX)] {
            assert!(range.contains(&RouteKey { dst, priority, tos }));
        }
        let next: IpNet = "10.0.0.64/26".parse().unwrap();
        assert!(!range.contains(&RouteKey {
            dst: next,
            priority: 0,
            tos: 0
        }));
    }

    #[test]
    fn message_round_trip() {
        let r = via("10.0.0.0/26", "192.168.1.2", Some(3), true);
        let parsed = KernelRoute::from_message(&r.new_message()).unwrap();
        assert_eq!(parsed, r);
        let bh = KernelRoute::wanted(
            "fd00::/122".parse().unwrap(),
            P,
            true,
            false,
            None,
            None,
            false,
        );
        let parsed = KernelRoute::from_message(&bh.new_message()).unwrap();
        assert_eq!(parsed, bh);
        assert_eq!(parsed.key.priority, IPV6_DEFAULT_PRIORITY);
    }
}
