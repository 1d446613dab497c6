//! Which service prefixes this node originates over BGP, by Calico's rules (confd's route
//! generator with the default `serviceLoadBalancerAggregation: Enabled`). Pure: the cluster
//! state (the `default` BGPConfiguration, Services, this node's EndpointSlice endpoints) in,
//! prefixes with their reasons out.
//!
//! 1. Every node advertises each CIDR of `serviceClusterIPs`, `serviceExternalIPs` and
//!    `serviceLoadBalancerIPs` itself (the aggregate: a ToR spreads traffic over all nodes and
//!    kube-proxy forwards it).
//! 2. A Service with `externalTrafficPolicy: Local` and a ready endpoint on this node is also
//!    advertised from this node as /32 (/128) routes: every cluster IP (both of a dual-stack
//!    Service) inside `serviceClusterIPs`, every `spec.externalIPs` address inside
//!    `serviceExternalIPs`, every load-balancer address (`status.loadBalancer.ingress[].ip`,
//!    `spec.loadBalancerIP`) inside `serviceLoadBalancerIPs`. Nodes without such an endpoint
//!    do not, so the longest match leads the ToR to the nodes that serve without a hop.
//! 3. A Service with `externalTrafficPolicy: Cluster` whose external or load-balancer
//!    address falls in a single-address entry (a /32 or /128 in the configuration) is
//!    advertised with all those /32s from every node (Calico does the same).
//! 4. podroute addition: `internalTrafficPolicy: Local` with a ready endpoint on this node
//!    advertises the Service's cluster IPs as /32s (internal policy governs cluster-IP
//!    traffic only). Calico looks at `externalTrafficPolicy` alone.
//!
//! Only Services of type ClusterIP, NodePort and LoadBalancer with a cluster IP count
//! (not headless, not ExternalName), as in Calico. An endpoint counts when its `nodeName`
//! is this node and `conditions.ready` is not `false` (Calico ignores readiness; kube-proxy
//! does not send Local traffic to an endpoint that is not ready, so neither do we). Addresses
//! outside the configured CIDRs are never advertised (the export policy would refuse them).
//! A prefix is withdrawn when its Service, its last ready local endpoint or its CIDR goes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::service::ServiceType;
use crate::model::{ServiceInfo, TrafficPolicy};
use crate::state::ClusterState;

/// Which BGPConfiguration field a service prefix falls under (metric label `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceIpKind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
}

impl ServiceIpKind {
    pub const ALL: [ServiceIpKind; 3] = [
        ServiceIpKind::ClusterIp,
        ServiceIpKind::ExternalIp,
        ServiceIpKind::LoadBalancerIp,
    ];

    /// The `kind` label of `podroute_bgp_service_prefixes_advertised`.
    pub fn label(self) -> &'static str {
        match self {
            ServiceIpKind::ClusterIp => "cluster_ip",
            ServiceIpKind::ExternalIp => "external_ip",
            ServiceIpKind::LoadBalancerIp => "load_balancer_ip",
        }
    }

    /// The BGPConfiguration field of this kind.
    pub fn field(self) -> &'static str {
        match self {
            ServiceIpKind::ClusterIp => "serviceClusterIPs",
            ServiceIpKind::ExternalIp => "serviceExternalIPs",
            ServiceIpKind::LoadBalancerIp => "serviceLoadBalancerIPs",
        }
    }
}

/// Why a service prefix is advertised.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// A CIDR of the BGPConfiguration, advertised by every node (rule 1).
    Range,
    /// `namespace/name` with a Local traffic policy and a ready endpoint here (rules 2, 4).
    LocalEndpoint { service: String, internal: bool },
    /// `namespace/name`, Cluster policy, an address in a single-address entry (rule 3).
    SingleAddress { service: String },
}

/// One reason for one prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceReason {
    pub kind: ServiceIpKind,
    pub cause: Cause,
}

impl fmt::Display for ServiceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.kind.field();
        match &self.cause {
            Cause::Range => write!(f, "{field} range (every node)"),
            Cause::LocalEndpoint { service, internal } => write!(
                f,
                "{service}: {}TrafficPolicy Local, ready endpoint on this node ({field})",
                if *internal { "internal" } else { "external" }
            ),
            Cause::SingleAddress { service } => write!(
                f,
                "{service}: externalTrafficPolicy Cluster with a single-address {field} entry \
                 (every node)"
            ),
        }
    }
}

/// The service prefixes this node advertises, each with every reason it has.
pub type ServicePrefixes = BTreeMap<IpNet, BTreeSet<ServiceReason>>;

fn inside(ranges: &[IpNet], ip: IpAddr) -> bool {
    ranges.iter().any(|r| r.contains(&ip))
}

fn single_entry(ranges: &[IpNet], ip: IpAddr) -> bool {
    ranges
        .iter()
        .any(|r| r.contains(&ip) && r.prefix_len() == r.max_prefix_len())
}

/// The Services (`namespace/name`) with a ready endpoint on `node`.
fn ready_here(state: &ClusterState, node: &str) -> BTreeSet<String> {
    state
        .endpoint_slices
        .values()
        .filter(|slice| {
            slice
                .endpoints
                .iter()
                .any(|e| e.ready && e.node.as_deref() == Some(node))
        })
        .filter_map(|slice| slice.service_key())
        .collect()
}

/// The service prefixes `state.local_node` advertises (see the module doc for the rules).
pub fn service_prefixes(state: &ClusterState) -> ServicePrefixes {
    let bgp = &state.bgp;
    let mut out = ServicePrefixes::new();
    let mut add = |prefix: IpNet, kind: ServiceIpKind, cause: Cause| {
        out.entry(prefix.trunc())
            .or_default()
            .insert(ServiceReason { kind, cause });
    };
    for (ranges, kind) in [
        (&bgp.service_cluster_ips, ServiceIpKind::ClusterIp),
        (&bgp.service_external_ips, ServiceIpKind::ExternalIp),
        (
            &bgp.service_load_balancer_ips,
            ServiceIpKind::LoadBalancerIp,
        ),
    ] {
        for cidr in ranges {
            add(*cidr, kind, Cause::Range);
        }
    }
    let served_here = ready_here(state, state.local_node.as_str());
    for (key, svc) in &state.services {
        if svc.service_type == ServiceType::ExternalName || svc.cluster_ips.is_empty() {
            continue;
        }
        let external_local = svc.external_traffic_policy == TrafficPolicy::Local;
        let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
        let here = (external_local || internal_local) && served_here.contains(key);
        let load_balancer = svc.service_type == ServiceType::LoadBalancer;
        let single = !external_local
            && (svc
                .external_ips
                .iter()
                .any(|ip| single_entry(&bgp.service_external_ips, *ip))
                || (load_balancer
                    && svc
                        .load_balancer_ips
                        .iter()
                        .any(|ip| single_entry(&bgp.service_load_balancer_ips, *ip))));
        let cause = if here && external_local {
            Cause::LocalEndpoint {
                service: key.clone(),
                internal: false,
            }
        } else if single {
            Cause::SingleAddress {
                service: key.clone(),
            }
        } else if here {
            // internalTrafficPolicy Local only: the cluster IPs.
            add_ips(
                &mut add,
                svc,
                &bgp.service_cluster_ips,
                ServiceIpKind::ClusterIp,
                &Cause::LocalEndpoint {
                    service: key.clone(),
                    internal: true,
                },
            );
            continue;
        } else {
            continue;
        };
        add_ips(
            &mut add,
            svc,
            &bgp.service_cluster_ips,
            ServiceIpKind::ClusterIp,
            &cause,
        );
        add_ips(
            &mut add,
            svc,
            &bgp.service_external_ips,
            ServiceIpKind::ExternalIp,
            &cause,
        );
        if load_balancer {
            add_ips(
                &mut add,
                svc,
                &bgp.service_load_balancer_ips,
                ServiceIpKind::LoadBalancerIp,
                &cause,
            );
        }
    }
    out
}

fn add_ips(
    add: &mut impl FnMut(IpNet, ServiceIpKind, Cause),
    svc: &ServiceInfo,
    ranges: &[IpNet],
    kind: ServiceIpKind,
    cause: &Cause,
) {
    let ips = match kind {
        ServiceIpKind::ClusterIp => &svc.cluster_ips,
        ServiceIpKind::ExternalIp => &svc.external_ips,
        ServiceIpKind::LoadBalancerIp => &svc.load_balancer_ips,
    };
    for ip in ips.iter().filter(|ip| inside(ranges, **ip)) {
        add(IpNet::from(*ip), kind, cause.clone());
    }
}

/// Prefixes per kind, for `podroute_bgp_service_prefixes_advertised{kind}`: a prefix counts
/// once under each kind it is advertised for.
pub fn count_by_kind(prefixes: &ServicePrefixes) -> BTreeMap<ServiceIpKind, usize> {
    let mut counts: BTreeMap<ServiceIpKind, usize> =
        ServiceIpKind::ALL.iter().map(|k| (*k, 0)).collect();
    for reasons in prefixes.values() {
        let kinds: BTreeSet<ServiceIpKind> = reasons.iter().map(|r| r.kind).collect();
        for kind in kinds {
            *counts.entry(kind).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSliceInfo, service::EndpointInfo};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn state() -> ClusterState {
        let mut s = ClusterState {
            local_node: "n1".into(),
            ..ClusterState::default()
        };
        s.bgp.service_cluster_ips = vec![net("10.96.0.0/12"), net("fd00:96::/112")];
        s.bgp.service_external_ips = vec![net("198.51.100.0/24"), net("192.0.2.7/32")];
        s.bgp.service_load_balancer_ips = vec![net("203.0.113.0/24")];
        s
    }

    fn svc(name: &str, etp: TrafficPolicy, itp: TrafficPolicy) -> ServiceInfo {
        ServiceInfo {
            namespace: "ns".into(),
            name: name.into(),
            service_type: ServiceType::ClusterIp,
            cluster_ips: vec![ip("10.96.0.10")],
            external_ips: vec![],
            load_balancer_ips: vec![],
            external_traffic_policy: etp,
            internal_traffic_policy: itp,
        }
    }

    fn with(mut s: ClusterState, svc: ServiceInfo, endpoints: &[(&str, bool)]) -> ClusterState {
        let key = svc.key();
        s.endpoint_slices.insert(
            format!("{key}-x"),
            EndpointSliceInfo {
                namespace: svc.namespace.clone(),
                name: format!("{}-x", svc.name),
                service: Some(svc.name.clone()),
                endpoints: endpoints
                    .iter()
                    .map(|(n, ready)| EndpointInfo {
                        node: Some(n.to_string()),
                        ready: *ready,
                    })
                    .collect(),
            },
        );
        s.services.insert(key, svc);
        s
    }

    fn prefixes(s: &ClusterState) -> Vec<String> {
        service_prefixes(s).keys().map(|p| p.to_string()).collect()
    }

    const RANGES: [&str; 5] = [
        "10.96.0.0/12",
        "192.0.2.7/32",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "fd00:96::/112",
    ];

    #[test]
    fn every_node_advertises_the_configured_ranges_and_nothing_without_them() {
        assert_eq!(prefixes(&state()), RANGES);
        let none = with(
            ClusterState {
                local_node: "n1".into(),
                ..ClusterState::default()
            },
            svc("a", TrafficPolicy::Local, TrafficPolicy::Cluster),
            &[("n1", true)],
        );
        assert!(service_prefixes(&none).is_empty());
    }

    #[test]
    fn decision_table_for_cluster_ips() {
        use TrafficPolicy::{Cluster, Local};
        // (external policy, internal policy, endpoints, /32 expected)
        type Case<'a> = (TrafficPolicy, TrafficPolicy, &'a [(&'a str, bool)], bool);
        let cases: &[Case] = &[
            (Cluster, Cluster, &[("n1", true)], false),
            (Local, Cluster, &[("n1", true)], true),
            (Local, Cluster, &[("n1", false)], false),
            (Local, Cluster, &[("n2", true)], false),
            (Local, Cluster, &[], false),
            (
                Local,
                Cluster,
                &[("n2", true), ("n1", false), ("n1", true)],
                true,
            ),
            (Cluster, Local, &[("n1", true)], true),
            (Cluster, Local, &[("n1", false)], false),
            (Cluster, Local, &[("n2", true)], false),
        ];
        for (etp, itp, endpoints, want) in cases {
            let s = with(state(), svc("a", *etp, *itp), endpoints);
            let got = service_prefixes(&s).contains_key(&net("10.96.0.10/32"));
            assert_eq!(got, *want, "{etp:?} {itp:?} {endpoints:?}");
        }
    }

    #[test]
    fn local_service_advertises_every_address_in_range_dual_stack_too() {
        let mut svc = svc("web", TrafficPolicy::Local, TrafficPolicy::Cluster);
        svc.service_type = ServiceType::LoadBalancer;
        svc.cluster_ips = vec![ip("10.96.0.10"), ip("fd00:96::10")];
        svc.external_ips = vec![ip("198.51.100.5"), ip("172.31.0.1")];
        svc.load_balancer_ips = vec![ip("203.0.113.9"), ip("100.64.0.1")];
        let s = with(state(), svc, &[("n1", true)]);
        let got = service_prefixes(&s);
        let mut want: Vec<&str> = RANGES.to_vec();
        want.extend([
            "10.96.0.10/32",
            "198.51.100.5/32",
            "203.0.113.9/32",
            "fd00:96::10/128",
        ]);
        want.sort_by_key(|p| net(p));
        assert_eq!(
            got.keys().map(|p| p.to_string()).collect::<Vec<_>>(),
            want,
            "addresses outside the configured CIDRs are ignored"
        );
        let reasons = &got[&net("203.0.113.9/32")];
        assert_eq!(
            reasons.iter().next().map(|r| r.to_string()).as_deref(),
            Some(
                "ns/web: externalTrafficPolicy Local, ready endpoint on this node \
                 (serviceLoadBalancerIPs)"
            )
        );
        let counts = count_by_kind(&got);
        assert_eq!(counts[&ServiceIpKind::ClusterIp], 4);
        assert_eq!(counts[&ServiceIpKind::ExternalIp], 3);
        assert_eq!(counts[&ServiceIpKind::LoadBalancerIp], 2);
    }

    #[test]
    fn internal_local_advertises_only_cluster_ips() {
        let mut svc = svc("a", TrafficPolicy::Cluster, TrafficPolicy::Local);
        svc.external_ips = vec![ip("198.51.100.5")];
        let s = with(state(), svc, &[("n1", true)]);
        let got = prefixes(&s);
        assert!(got.contains(&"10.96.0.10/32".to_string()));
        assert!(!got.contains(&"198.51.100.5/32".to_string()));
    }

    #[test]
    fn cluster_policy_with_a_single_address_entry_is_advertised_everywhere() {
        let mut svc = svc("a", TrafficPolicy::Cluster, TrafficPolicy::Cluster);
        svc.external_ips = vec![ip("192.0.2.7")];
        // No endpoint at all on this node: still advertised (rule 3).
        let s = with(state(), svc, &[("n2", true)]);
        let got = service_prefixes(&s);
        assert!(got.contains_key(&net("10.96.0.10/32")));
        assert!(got[&net("192.0.2.7/32")].contains(&ServiceReason {
            kind: ServiceIpKind::ExternalIp,
            cause: Cause::Range
        }));
    }

    #[test]
    fn headless_external_name_and_other_namespaces_are_not_advertised() {
        let mut headless = svc("h", TrafficPolicy::Local, TrafficPolicy::Cluster);
        headless.cluster_ips.clear();
        let s = with(state(), headless, &[("n1", true)]);
        assert_eq!(prefixes(&s), RANGES);
        let mut ext = svc("e", TrafficPolicy::Local, TrafficPolicy::Cluster);
        ext.service_type = ServiceType::ExternalName;
        let s = with(state(), ext, &[("n1", true)]);
        assert_eq!(prefixes(&s), RANGES);
        // A slice of a same-named Service in another namespace does not count.
        let mut s = with(
            state(),
            svc("a", TrafficPolicy::Local, TrafficPolicy::Cluster),
            &[("n1", true)],
        );
        for slice in s.endpoint_slices.values_mut() {
            slice.namespace = "other".into();
        }
        assert_eq!(prefixes(&s), RANGES);
    }
}
