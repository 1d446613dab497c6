//! The forwarding table of the userspace tunnel: which node a pod address lives behind,
//! which outer sources are accepted and which inner addresses are allowed.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::plan::{DesiredRoute, RouteKind};

/// Hasher for `u32` keys that are IPv4 addresses: one multiply (Fibonacci hashing).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<u32, V, BuildHasherDefault<AddrHasher>>;
type AddrSet = HashSet<u32, BuildHasherDefault<AddrHasher>>;

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// What the userspace tunnel forwards by, rebuilt whenever the plan changes.
///
/// - `remotes`: remote prefix → node address, from the plan's IPIP routes
///   ([`RouteKind::BlockIpip`] and [`RouteKind::BorrowedIpip`]); the inner destination of a
///   packet read from `tunl0` is looked up here (longest prefix match).
/// - `known_nodes`: outer source addresses accepted from the wire: the given node addresses
///   plus every gateway of `remotes`.
/// - `pools`: the IPv4 pool CIDRs; decapsulated packets need source and destination inside
///   one of them.
#[derive(Debug, Clone, Default)]
pub struct TunnelTable {
    remotes: Vec<(Ipv4Net, Ipv4Addr)>,
    known_nodes: Vec<Ipv4Addr>,
    pools: Vec<Ipv4Net>,
    /// Prefix lengths present, longest first, each with network → gateway.
    by_len: Vec<(u8, AddrMap<Ipv4Addr>)>,
    known: AddrSet,
    pool_masks: Vec<(u32, u32)>,
}

impl PartialEq for TunnelTable {
    fn eq(&self, other: &Self) -> bool {
        self.remotes == other.remotes
            && self.known_nodes == other.known_nodes
            && self.pools == other.pools
    }
}

impl Eq for TunnelTable {}

impl TunnelTable {
    /// Builds the table. Prefixes are truncated to their network; for a prefix given twice
    /// the last gateway wins. Every gateway becomes a known node.
    pub fn new(
        remotes: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>,
        known_nodes: impl IntoIterator<Item = Ipv4Addr>,
        pools: impl IntoIterator<Item = Ipv4Net>,
    ) -> Self {
        let mut by_prefix: std::collections::BTreeMap<Ipv4Net, Ipv4Addr> = Default::default();
        for (prefix, gw) in remotes {
            by_prefix.insert(prefix.trunc(), gw);
        }
        let remotes: Vec<(Ipv4Net, Ipv4Addr)> = by_prefix.into_iter().collect();
        let mut known_nodes: Vec<Ipv4Addr> = known_nodes
            .into_iter()
            .chain(remotes.iter().map(|(_, gw)| *gw))
            .collect();
        known_nodes.sort();
        known_nodes.dedup();
        let mut pools: Vec<Ipv4Net> = pools.into_iter().map(|p| p.trunc()).collect();
        pools.sort();
        pools.dedup();

        let mut by_len: Vec<(u8, AddrMap<Ipv4Addr>)> = Vec::new();
        for (prefix, gw) in &remotes {
            let len = prefix.prefix_len();
            let slot = match by_len.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    by_len.push((len, AddrMap::default()));
                    by_len.len() - 1
                }
            };
            by_len[slot].1.insert(u32::from(prefix.network()), *gw);
        }
        by_len.sort_by_key(|b| std::cmp::Reverse(b.0));
        let known = known_nodes.iter().map(|a| u32::from(*a)).collect();
        let pool_masks = pools
            .iter()
            .map(|p| (u32::from(p.network()), mask(p.prefix_len())))
            .collect();
        Self {
            remotes,
            known_nodes,
            pools,
            by_len,
            known,
            pool_masks,
        }
    }

    /// The table for a plan: its IPv4 IPIP routes (kinds `BlockIpip` and `BorrowedIpip`,
    /// prefix → gateway), the addresses of the other nodes, and the pools (IPv6 ones are
    /// ignored).
    pub fn from_plan<R: Borrow<DesiredRoute>>(
        routes: impl IntoIterator<Item = R>,
        node_addrs: impl IntoIterator<Item = Ipv4Addr>,
        pools: impl IntoIterator<Item = IpNet>,
    ) -> Self {
        let remotes = routes.into_iter().filter_map(|r| {
            let r = r.borrow();
            if !matches!(r.kind, RouteKind::BlockIpip | RouteKind::BorrowedIpip) {
                return None;
            }
            match (r.prefix, r.gateway) {
                (IpNet::V4(p), Some(IpAddr::V4(gw))) => Some((p, gw)),
                _ => None,
            }
        });
        let pools = pools.into_iter().filter_map(|p| match p {
            IpNet::V4(p) => Some(p),
            IpNet::V6(_) => None,
        });
        Self::new(remotes, node_addrs, pools)
    }

    /// Remote prefixes and their node, sorted by prefix.
    pub fn remotes(&self) -> &[(Ipv4Net, Ipv4Addr)] {
        &self.remotes
    }

    /// Accepted outer sources, sorted.
    pub fn known_nodes(&self) -> &[Ipv4Addr] {
        &self.known_nodes
    }

    /// IPv4 pools, sorted.
    pub fn pools(&self) -> &[Ipv4Net] {
        &self.pools
    }

    /// The node behind `dst` (longest prefix match over the remotes).
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let d = u32::from(dst);
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&(d & mask(*len))).copied())
    }

    /// Is `src` an accepted outer source?
    pub fn is_known_node(&self, src: Ipv4Addr) -> bool {
        self.known.contains(&u32::from(src))
    }

    /// Is `addr` inside an IPv4 pool?
    pub fn in_pool(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.pool_masks.iter().any(|(net, m)| a & m == *net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RouteScope;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let t = TunnelTable::new(
            [
                (n("172.16.196.128/26"), a("192.168.93.130")),
                (n("172.16.196.140/32"), a("192.168.93.131")),
                (n("172.16.0.0/16"), a("192.168.93.1")),
                (n("0.0.0.0/0"), a("192.168.93.254")),
            ],
            [],
            [n("172.16.0.0/16")],
        );
        assert_eq!(t.lookup(a("172.16.196.129")), Some(a("192.168.93.130")));
        assert_eq!(t.lookup(a("172.16.196.140")), Some(a("192.168.93.131")));
        assert_eq!(t.lookup(a("172.16.196.191")), Some(a("192.168.93.130")));
        assert_eq!(t.lookup(a("172.16.196.192")), Some(a("192.168.93.1")));
        assert_eq!(t.lookup(a("10.1.2.3")), Some(a("192.168.93.254")));
    }

    #[test]
    fn no_match_and_empty_table() {
        let t = TunnelTable::new([(n("172.16.196.128/26"), a("192.168.93.130"))], [], []);
        assert_eq!(t.lookup(a("172.16.196.127")), None);
        assert_eq!(t.lookup(a("172.16.196.192")), None);
        let empty = TunnelTable::default();
        assert_eq!(empty.lookup(a("172.16.196.129")), None);
        assert!(!empty.is_known_node(a("192.168.93.130")));
        assert!(!empty.in_pool(a("172.16.0.1")));
    }

    #[test]
    fn unnormalised_prefixes_are_truncated_and_last_duplicate_wins() {
        let t = TunnelTable::new(
            [
                (n("172.16.196.129/26"), a("192.168.93.130")),
                (n("172.16.196.128/26"), a("192.168.93.131")),
            ],
            [],
            [n("172.16.1.1/16")],
        );
        assert_eq!(
            t.remotes(),
            &[(n("172.16.196.128/26"), a("192.168.93.131"))]
        );
        assert_eq!(t.lookup(a("172.16.196.130")), Some(a("192.168.93.131")));
        assert_eq!(t.pools(), &[n("172.16.0.0/16")]);
        assert!(t.in_pool(a("172.16.255.255")));
        assert!(!t.in_pool(a("172.17.0.0")));
    }

    #[test]
    fn known_nodes_include_gateways() {
        let t = TunnelTable::new(
            [(n("172.16.196.128/26"), a("192.168.93.130"))],
            [a("192.168.92.129"), a("192.168.92.129")],
            [],
        );
        assert_eq!(t.known_nodes(), &[a("192.168.92.129"), a("192.168.93.130")]);
        assert!(t.is_known_node(a("192.168.93.130")));
        assert!(t.is_known_node(a("192.168.92.129")));
        assert!(!t.is_known_node(a("192.168.92.130")));
    }

    #[test]
    fn from_plan_keeps_ipip_routes_only() {
        let route = |prefix: &str, kind, gw: &str, dev: Option<&str>| DesiredRoute {
            prefix: prefix.parse().unwrap(),
            kind,
            gateway: (!gw.is_empty()).then(|| gw.parse().unwrap()),
            device: dev.map(Into::into),
            onlink: kind == RouteKind::BlockIpip || kind == RouteKind::BorrowedIpip,
            scope: RouteScope::Universe,
        };
        let routes = vec![
            route(
                "172.16.196.128/26",
                RouteKind::BlockIpip,
                "192.168.93.130",
                Some("tunl0"),
            ),
            route(
                "172.16.241.70/32",
                RouteKind::BorrowedIpip,
                "192.168.93.131",
                Some("tunl0"),
            ),
            route(
                "172.16.10.0/26",
                RouteKind::BlockDirect,
                "192.168.92.129",
                Some("ens33"),
            ),
            route("172.16.241.64/26", RouteKind::Blackhole, "", None),
            route("10.9.0.0/16", RouteKind::External, "192.168.92.1", None),
        ];
        let t = TunnelTable::from_plan(
            &routes,
            [a("192.168.92.129")],
            [
                "172.16.0.0/16".parse().unwrap(),
                "fd00::/48".parse().unwrap(),
            ],
        );
        assert_eq!(
            t.remotes(),
            &[
                (n("172.16.196.128/26"), a("192.168.93.130")),
                (n("172.16.241.70/32"), a("192.168.93.131")),
            ]
        );
        assert_eq!(t.pools(), &[n("172.16.0.0/16")]);
        assert_eq!(
            t.known_nodes(),
            &[
                a("192.168.92.129"),
                a("192.168.93.130"),
                a("192.168.93.131")
            ]
        );
        assert_eq!(
            t.lookup(a("172.16.10.1")),
            None,
            "direct routes are not tunnelled"
        );
        assert_eq!(t.lookup(a("172.16.241.70")), Some(a("192.168.93.131")));
        assert_eq!(t.lookup(a("172.16.241.71")), None);
    }

    #[test]
    fn many_prefixes() {
        let remotes: Vec<(Ipv4Net, Ipv4Addr)> = (0..10_000u32)
            .map(|i| {
                let net = Ipv4Net::new(Ipv4Addr::from(0xac10_0000 + (i << 6)), 26).unwrap();
                (net, Ipv4Addr::from(0xc0a8_0000 + (i % 250) + 1))
            })
            .collect();
        let t = TunnelTable::new(remotes.clone(), [], []);
        for (net, gw) in remotes.iter().step_by(97) {
            let host = Ipv4Addr::from(u32::from(net.network()) + 17);
            assert_eq!(t.lookup(host), Some(*gw));
        }
    }
}
