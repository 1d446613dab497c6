//! Kubernetes `Service`s and `EndpointSlice`s, reduced to what service IP advertisement
//! reads (Calico's BGPConfiguration `serviceClusterIPs`, `serviceExternalIPs`,
//! `serviceLoadBalancerIPs`; the rules are in `crate::agent::services`).
//!
//! Both kinds are namespaced: they are keyed `namespace/name` in the cluster state. The
//! datastores keep only these fields ([`slim_service`], [`slim_endpoint_slice`]); an
//! `EndpointSlice` keeps only the endpoints on this node, since only they decide what this
//! node advertises, so memory follows the node's own endpoints, not the cluster's.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::{Kind, Reason, Rejection};

/// The label that ties an `EndpointSlice` to its `Service`.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    /// Any node forwards to any endpoint (the default).
    #[default]
    Cluster,
    /// Only endpoints on the receiving node serve.
    Local,
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// A validated `Service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (both families of a dual-stack Service), else `spec.clusterIP`;
    /// empty for a headless Service (`None`).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, then `spec.loadBalancerIP` when not among them.
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
}

impl ServiceInfo {
    /// `namespace/name`, the key in the cluster state.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Validates a `Service`: an address that is not an IP rejects the object (its last
    /// valid version stays), since advertising part of a Service would be a guess.
    pub fn from_service(svc: &Service) -> Result<ServiceInfo, Rejection> {
        let key = object_key(&svc.metadata);
        let reject = |reason| Rejection::new(Kind::Service, key.clone(), reason);
        let name = svc.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = svc.spec.clone().unwrap_or_default();
        let service_type = match spec.type_.as_deref().map(str::trim) {
            None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(reject(Reason::BadEnum {
                    field: "spec.type",
                    value: other.to_string(),
                    expected: "ClusterIP, NodePort, LoadBalancer, ExternalName",
                }));
            }
        };
        let policy =
            |field: &'static str, value: &Option<String>| match value.as_deref().map(str::trim) {
                None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
                Some("Local") => Ok(TrafficPolicy::Local),
                Some(other) => Err(reject(Reason::BadEnum {
                    field,
                    value: other.to_string(),
                    expected: "Cluster, Local",
                })),
            };
        let external_traffic_policy =
            policy("spec.externalTrafficPolicy", &spec.external_traffic_policy)?;
        let internal_traffic_policy =
            policy("spec.internalTrafficPolicy", &spec.internal_traffic_policy)?;
        let ip = |field: &'static str, text: &str| -> Result<IpAddr, Rejection> {
            text.trim().parse().map_err(|_| {
                reject(Reason::BadServiceIp {
                    field,
                    value: text.to_string(),
                })
            })
        };
        let given_cluster_ips: Vec<&str> = match &spec.cluster_ips {
            Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let mut cluster_ips = Vec::new();
        for text in given_cluster_ips {
            if text.is_empty() || text == "None" {
                continue;
            }
            push_unique(&mut cluster_ips, ip("spec.clusterIPs", text)?);
        }
        let mut external_ips = Vec::new();
        for text in spec.external_ips.iter().flatten() {
            push_unique(&mut external_ips, ip("spec.externalIPs", text)?);
        }
        let mut load_balancer_ips = Vec::new();
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for text in ingress
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref())
        {
            if !text.is_empty() {
                push_unique(
                    &mut load_balancer_ips,
                    ip("status.loadBalancer.ingress[].ip", text)?,
                );
            }
        }
        if let Some(text) = spec.load_balancer_ip.as_deref().filter(|t| !t.is_empty()) {
            push_unique(&mut load_balancer_ips, ip("spec.loadBalancerIP", text)?);
        }
        Ok(ServiceInfo {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name,
            service_type,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            external_traffic_policy,
            internal_traffic_policy,
        })
    }
}

fn push_unique(list: &mut Vec<IpAddr>, ip: IpAddr) {
    if !list.contains(&ip) {
        list.push(ip);
    }
}

/// `namespace/name` of a namespaced object (`/name` without a namespace).
pub fn object_key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// One endpoint of an `EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// `nodeName`.
    pub node: Option<String>,
    /// `conditions.ready`; absent counts as ready, as the API documents ("unknown state
    /// should be interpreted as ready").
    pub ready: bool,
}

/// A validated `EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label; a slice without it belongs to no Service.
    pub service: Option<String>,
    pub endpoints: Vec<EndpointInfo>,
}

impl EndpointSliceInfo {
    /// `namespace/name` of the Service this slice belongs to.
    pub fn service_key(&self) -> Option<String> {
        self.service
            .as_ref()
            .map(|s| format!("{}/{}", self.namespace, s))
    }

    pub fn from_endpoint_slice(slice: &EndpointSlice) -> Result<EndpointSliceInfo, Rejection> {
        let name = slice.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(Rejection::new(
                Kind::EndpointSlice,
                object_key(&slice.metadata),
                Reason::NoName,
            ));
        }
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .cloned();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| EndpointInfo {
                node: e.node_name.clone(),
                ready: e.conditions.as_ref().and_then(|c| c.ready) != Some(false),
            })
            .collect();
        Ok(EndpointSliceInfo {
            namespace: slice.metadata.namespace.clone().unwrap_or_default(),
            name,
            service,
            endpoints,
        })
    }
}

/// A `Service` reduced to what [`ServiceInfo::from_service`] reads.
pub fn slim_service(svc: &mut Service) {
    svc.metadata = ObjectMeta {
        name: svc.metadata.name.take(),
        namespace: svc.metadata.namespace.take(),
        ..ObjectMeta::default()
    };
    svc.spec = svc.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        external_ips: spec.external_ips,
        load_balancer_ip: spec.load_balancer_ip,
        external_traffic_policy: spec.external_traffic_policy,
        internal_traffic_policy: spec.internal_traffic_policy,
        ..ServiceSpec::default()
    });
    let ingress: Option<Vec<LoadBalancerIngress>> = svc
        .status
        .take()
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .map(|list| {
            list.into_iter()
                .filter(|i| i.ip.is_some())
                .map(|i| LoadBalancerIngress {
                    ip: i.ip,
                    ..LoadBalancerIngress::default()
                })
                .collect()
        });
    svc.status = ingress.map(|ingress| ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(ingress),
        }),
        ..ServiceStatus::default()
    });
}

/// An `EndpointSlice` reduced to its Service label and the endpoints on `local_node` (node
/// name and readiness): the others never decide what this node advertises.
pub fn slim_endpoint_slice(slice: &mut EndpointSlice, local_node: &str) {
    let service = slice
        .metadata
        .labels
        .take()
        .and_then(|mut l| l.remove_entry(SERVICE_NAME_LABEL));
    slice.metadata = ObjectMeta {
        name: slice.metadata.name.take(),
        namespace: slice.metadata.namespace.take(),
        labels: service.map(|(k, v)| [(k, v)].into()),
        ..ObjectMeta::default()
    };
    slice.ports = None;
    slice.endpoints = slice.endpoints.take().map(|all| {
        all.into_iter()
            .filter(|e| e.node_name.as_deref() == Some(local_node))
            .map(|e| Endpoint {
                node_name: e.node_name,
                conditions: e.conditions.map(|c| EndpointConditions {
                    ready: c.ready,
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn reads_a_dual_stack_load_balancer() {
        let svc = service(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {a: b}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  externalIPs: [198.51.100.7]
  loadBalancerIP: 203.0.113.9
  externalTrafficPolicy: Local
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.8}, {hostname: lb.example.com}]
"#,
        );
        let mut slim = svc.clone();
        slim_service(&mut slim);
        assert!(slim.metadata.labels.is_none());
        for s in [&svc, &slim] {
            let info = ServiceInfo::from_service(s).unwrap();
            assert_eq!(info.key(), "shop/web");
            assert_eq!(info.service_type, ServiceType::LoadBalancer);
            assert_eq!(
                info.cluster_ips,
                [
                    "10.96.0.10".parse::<IpAddr>().unwrap(),
                    "fd00:96::10".parse().unwrap()
                ]
            );
            assert_eq!(
                info.external_ips,
                ["198.51.100.7".parse::<IpAddr>().unwrap()]
            );
            assert_eq!(
                info.load_balancer_ips,
                [
                    "203.0.113.8".parse::<IpAddr>().unwrap(),
                    "203.0.113.9".parse().unwrap()
                ]
            );
            assert_eq!(info.external_traffic_policy, TrafficPolicy::Local);
            assert_eq!(info.internal_traffic_policy, TrafficPolicy::Cluster);
        }
    }

    #[test]
    fn headless_has_no_cluster_ip_and_bad_addresses_reject() {
        let info = ServiceInfo::from_service(&service(
            "metadata: {name: db, namespace: x}\nspec: {clusterIP: None}",
        ))
        .unwrap();
        assert!(info.cluster_ips.is_empty());
        let e = ServiceInfo::from_service(&service(
            "metadata: {name: db, namespace: x}\nspec: {externalIPs: [not-an-ip]}",
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service \"x/db\": spec.externalIPs \"not-an-ip\" is not an IP address"
        );
    }

    #[test]
    fn endpoint_slices_keep_only_local_endpoints() {
        let mut slice: EndpointSlice = serde_yaml_ng::from_str(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web, x: y}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.1], nodeName: n1, conditions: {ready: false}}
- {addresses: [10.0.0.2], nodeName: n2}
- {addresses: [10.0.0.3], nodeName: n1}
ports: [{port: 80}]
"#,
        )
        .unwrap();
        let full = EndpointSliceInfo::from_endpoint_slice(&slice).unwrap();
        assert_eq!(full.endpoints.len(), 3);
        slim_endpoint_slice(&mut slice, "n1");
        let info = EndpointSliceInfo::from_endpoint_slice(&slice).unwrap();
        assert_eq!(info.service_key().as_deref(), Some("shop/web"));
        assert_eq!(
            info.endpoints,
            [
                EndpointInfo {
                    node: Some("n1".into()),
                    ready: false
                },
                EndpointInfo {
                    node: Some("n1".into()),
                    ready: true
                }
            ]
        );
    }
}
