//! From the cluster state (and the BGP best paths) to what this node announces and the plan's
//! input. Pure functions; the agent loop calls them after every change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use podroute_bgp::policy::{CommunityRule, ExportRules};

use crate::model::{self, Block, Pool};
use crate::plan::tunnels::{Vtep, default_vtep_mac};
use crate::plan::{
    self, Allocation, BlockSpec, LearnedRoute, LocalNode, PeerNode, PlanInput, PoolSpec,
};
use crate::state::ClusterState;

fn encap(mode: model::EncapMode) -> plan::EncapMode {
    match mode {
        model::EncapMode::Never => plan::EncapMode::Never,
        model::EncapMode::Always => plan::EncapMode::Always,
        model::EncapMode::CrossSubnet => plan::EncapMode::CrossSubnet,
    }
}

fn exportable_pool<'a>(state: &'a ClusterState, net: &IpNet) -> Option<&'a Pool> {
    state
        .pool_containing(net)
        .filter(|pool| !pool.disable_bgp_export)
}

/// Whether `node` holds `block`: affinity `host:<node>`, not being deleted, and its
/// BlockAffinity (when there is one) confirmed. For the local node (every caller here) the
/// affinity comes from the state's index, so that a replan is O(blocks), not
/// O(blocks x affinities).
fn holds(state: &ClusterState, block: &Block, node: &str) -> bool {
    if block.host() != Some(node) || block.deleted {
        return false;
    }
    let claim = if node == state.local_node {
        state.local_claim(&block.cidr)
    } else {
        state
            .affinities
            .values()
            .find(|c| c.cidr == block.cidr && c.node == node)
    };
    match claim {
        None => true,
        Some(c) => !c.deleted && (c.state.is_empty() || c.state == "confirmed"),
    }
}

/// The prefixes this node originates over BGP: its blocks (affinity `host:<node>`, affinity
/// confirmed or absent) inside a pool without `disableBGPExport`, and each address of
/// someone else's block that is used on this node (a borrowed IP, as a /32 or /128). As with
/// Calico, nothing outside every pool is announced.
pub fn advertisements(state: &ClusterState) -> BTreeSet<IpNet> {
    let node = state.local_node.as_str();
    let mut out = BTreeSet::new();
    for block in state.blocks.values() {
        if holds(state, block, node) {
            if exportable_pool(state, &block.cidr).is_some() {
                out.insert(block.cidr);
            }
            continue;
        }
        if block.deleted {
            continue;
        }
        for a in block.borrowed() {
            if a.node.as_deref() == Some(node) {
                let host = IpNet::from(a.ip);
                if exportable_pool(state, &host).is_some() {
                    out.insert(host);
                }
            }
        }
    }
    out
}

/// The speaker-wide export policy, Calico's `calico_export_to_bgp_peers` BIRD filter as
/// confd renders it for this node:
///
/// ```text
/// reject_disabled_pools();   # net ~ pool with disableBGPExport  -> reject      (deny)
/// apply_communities();       # net ~ prefixAdvertisements cidr   -> add communities
/// calico_aggr();             # net = own confirmed block -> accept; net ~ it -> reject
/// if net ~ <service CIDR>    then accept;   # serviceClusterIPs/ExternalIPs/LoadBalancerIPs
/// if net ~ <pool>            then accept;   # every pool without disableBGPExport
/// reject;
/// ```
///
/// `prefixAdvertisements` CIDRs are accepted too (they name what the cluster means to
/// announce). Routes learned from a ToR or any other peer outside these sets are never passed
/// on: podroute is no transit AS.
pub fn export_rules(state: &ClusterState) -> ExportRules {
    let node = state.local_node.as_str();
    let mut aggregates: Vec<IpNet> = state
        .blocks
        .values()
        .filter(|b| holds(state, b, node))
        .map(|b| b.cidr)
        .collect();
    aggregates.sort();
    aggregates.dedup();
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    for pool in state.pools.values() {
        if pool.disable_bgp_export {
            deny.push(pool.cidr);
        } else {
            allow.push(pool.cidr);
        }
    }
    let bgp = &state.bgp;
    allow.extend(bgp.service_cluster_ips.iter().copied());
    allow.extend(bgp.service_external_ips.iter().copied());
    allow.extend(bgp.service_load_balancer_ips.iter().copied());
    allow.extend(bgp.prefix_advertisements.iter().map(|(cidr, _)| *cidr));
    allow.sort();
    allow.dedup();
    deny.sort();
    let communities = bgp
        .prefix_advertisements
        .iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(cidr, c)| CommunityRule {
            cidr: *cidr,
            communities: c.clone(),
        })
        .collect();
    ExportRules {
        deny,
        aggregates,
        allow,
        communities,
    }
}

/// Builds the plan's input. `local` carries this node's address as detected (with prefix)
/// and NIC; `learned` the BGP best paths; `interfaces` the `cali*` devices present.
pub fn plan_input(
    state: &ClusterState,
    local: &LocalNode,
    learned: &BTreeMap<IpNet, IpAddr>,
    interfaces: &BTreeSet<String>,
) -> PlanInput {
    let pools = state
        .pools
        .values()
        .map(|p| PoolSpec {
            name: p.name.clone(),
            cidr: p.cidr,
            ipip: encap(p.ipip_mode),
            vxlan: encap(p.vxlan_mode),
            disabled: p.disabled,
        })
        .collect();
    let blocks = state
        .blocks
        .values()
        .filter(|b| !b.deleted)
        .map(|b| BlockSpec {
            cidr: b.cidr,
            // A block this node holds only under an unconfirmed affinity is not ours yet;
            // for other nodes the IPAMBlock's affinity is what counts.
            affinity: match b.host() {
                Some(h) if h == local.name && !holds(state, b, h) => None,
                other => other.map(str::to_string),
            },
            allocations: b
                .allocations
                .iter()
                .map(|a| Allocation {
                    ip: a.ip,
                    namespace: a.namespace.clone(),
                    pod: a.pod.clone(),
                    node: a.node.clone(),
                })
                .collect(),
        })
        .collect();
    let nodes = state
        .nodes
        .values()
        .filter(|n| n.name != local.name)
        .map(|n| PeerNode {
            name: n.name.clone(),
            ipv4: n.ipv4_addr(),
            ipv6: n.ipv6.map(|v| v.addr()),
        })
        .collect();
    let vteps = state
        .nodes
        .values()
        .flat_map(|n| {
            let v = &n.vxlan;
            let v4 = v.ipv4.map(|ip| Vtep {
                node: n.name.clone(),
                tunnel_ip: IpAddr::V4(ip),
                mac: v.mac4.unwrap_or_else(|| default_vtep_mac(&n.name, true)),
            });
            let v6 = v.ipv6.map(|ip| Vtep {
                node: n.name.clone(),
                tunnel_ip: IpAddr::V6(ip),
                mac: v.mac6.unwrap_or_else(|| default_vtep_mac(&n.name, false)),
            });
            v4.into_iter().chain(v6)
        })
        .collect();
    PlanInput {
        local: local.clone(),
        pools,
        blocks,
        learned: learned
            .iter()
            .map(|(prefix, next_hop)| LearnedRoute {
                prefix: *prefix,
                next_hop: *next_hop,
            })
            .collect(),
        nodes,
        local_interfaces: interfaces.clone(),
        vteps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Affinity, BlockClaim};

    fn pool(cidr: &str, export: bool) -> Pool {
        Pool {
            name: format!("pool-{cidr}"),
            cidr: cidr.parse().unwrap(),
            block_size: 26,
            ipip_mode: model::EncapMode::CrossSubnet,
            vxlan_mode: model::EncapMode::Never,
            nat_outgoing: true,
            disabled: false,
            disable_bgp_export: !export,
            node_selector: None,
            created: None,
        }
    }

    fn block(cidr: &str, host: &str, borrowed: &[(&str, &str)]) -> Block {
        Block {
            name: cidr.replace(['.', '/'], "-"),
            cidr: cidr.parse().unwrap(),
            affinity: Some(Affinity::Host(host.into())),
            allocations: borrowed
                .iter()
                .enumerate()
                .map(|(i, (ip, node))| model::Allocation {
                    ordinal: i as u32,
                    ip: ip.parse().unwrap(),
                    handle_id: None,
                    namespace: Some("default".into()),
                    pod: Some(format!("pod{i}")),
                    node: Some(node.to_string()),
                    attr_type: None,
                })
                .collect(),
            deleted: false,
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState {
            local_node: "master01".into(),
            ..ClusterState::default()
        };
        for p in [pool("172.16.0.0/16", true), pool("10.99.0.0/16", false)] {
            s.pools.insert(p.name.clone(), p);
        }
        for b in [
            block(
                "172.16.241.64/26",
                "master01",
                &[("172.16.241.65", "master01")],
            ),
            block(
                "172.16.196.128/26",
                "node01",
                &[("172.16.196.130", "master01")],
            ),
            block("10.99.0.0/26", "master01", &[]),
            block("192.0.2.0/26", "master01", &[]),
            block("172.16.5.0/26", "master01", &[]),
        ] {
            s.blocks.insert(b.name.clone(), b);
        }
        s.affinities.insert(
            "pending".into(),
            BlockClaim {
                name: "pending".into(),
                cidr: "172.16.5.0/26".parse().unwrap(),
                node: "master01".into(),
                state: "pending".into(),
                deleted: false,
            },
        );
        s
    }

    #[test]
    fn announces_own_confirmed_blocks_and_borrowed_ips_in_exported_pools() {
        let got: Vec<String> = advertisements(&state())
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, vec!["172.16.196.130/32", "172.16.241.64/26"]);
    }

    #[test]
    fn plan_input_carries_the_model() {
        let s = state();
        let local = LocalNode {
            name: "master01".into(),
            ipv4: Some("192.168.92.128/24".parse().unwrap()),
            ipv6: None,
            nic: "ens33".into(),
        };
        let learned = BTreeMap::from([(
            "172.16.196.128/26".parse().unwrap(),
            "192.168.92.129".parse().unwrap(),
        )]);
        let input = plan_input(&s, &local, &learned, &BTreeSet::new());
        assert_eq!(input.pools.len(), 2);
        assert_eq!(input.pools[1].ipip, plan::EncapMode::CrossSubnet);
        let pending = input
            .blocks
            .iter()
            .find(|b| b.cidr == "172.16.5.0/26".parse::<IpNet>().unwrap())
            .unwrap();
        assert_eq!(
            pending.affinity, None,
            "unconfirmed affinity is not ours yet"
        );
        assert_eq!(input.learned.len(), 1);
        let lines = plan::plan(&input).lines();
        assert!(
            lines.contains(&"172.16.196.128/26 via 192.168.92.129 dev ens33".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"blackhole 172.16.241.64/26".to_string()),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_learned_copy_of_a_prefix_this_node_originates_gets_no_route() {
        let s = state();
        let local = LocalNode {
            name: "master01".into(),
            ipv4: Some("192.168.92.128/24".parse().unwrap()),
            ipv6: None,
            nic: "ens33".into(),
        };
        let cidr: IpNet = "10.96.0.0/12".parse().unwrap();
        let lb: IpNet = "203.0.113.9/32".parse().unwrap();
        let peer: IpAddr = "192.168.92.129".parse().unwrap();
        let learned = BTreeMap::from([(cidr, peer), (lb, peer)]);
        let input = plan_input(&s, &local, &BTreeMap::new(), &BTreeSet::new());
        let both = plan::Planner::new(&input);
        let mut w = BTreeSet::new();
        let routed: Vec<IpNet> = both
            .routes(learned.iter().map(|(p, n)| (*p, *n)), &mut w)
            .map(|r| r.prefix)
            .filter(|p| *p == cidr || *p == lb)
            .collect();
        assert_eq!(
            routed,
            [cidr, lb],
            "another node's service prefixes are routed"
        );
        let mine = plan::Planner::new(&input).originating([cidr]);
        let routed: Vec<IpNet> = mine
            .routes(learned.iter().map(|(p, n)| (*p, *n)), &mut w)
            .map(|r| r.prefix)
            .filter(|p| *p == cidr || *p == lb)
            .collect();
        assert_eq!(routed, [lb], "the CIDR this node announces itself is not");
        assert_eq!(mine.route_for(cidr, Some(peer), &mut w), None);
        assert!(mine.route_for(lb, Some(peer), &mut w).is_some());
    }
}
