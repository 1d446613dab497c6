//! The Calico custom resources (`crd.projectcalico.org/v1`) exactly as they are stored.
//!
//! These types are deliberately lenient: every spec field is optional, strings stay strings
//! and numbers are wide, so that anything a Calico cluster holds deserializes and the
//! decision "is this object usable?" is taken in the model's constructors
//! ([`crate::model::Pool::from_resource`] and its siblings), each refusing with a
//! [`crate::model::Rejection`] a user can act on. Unknown and legacy fields are ignored on input.
//!
//! `kube::Resource` is implemented by hand instead of `#[derive(CustomResource)]`: the derive
//! makes `spec` mandatory, and a spec-less object would then fail the whole list of its kind.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// API group of every Calico resource podroute reads.
pub const GROUP: &str = "crd.projectcalico.org";
/// API version of every Calico resource podroute reads.
pub const VERSION: &str = "v1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "crd.projectcalico.org/v1";

/// Names of a custom resource kind, as they appear in its CustomResourceDefinition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrdNames {
    pub kind: &'static str,
    pub list_kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
}

/// Implemented by the five Calico resource types.
pub trait CalicoResource {
    const NAMES: CrdNames;
}

macro_rules! calico_resource {
    ($ty:ident, $spec:ident, $kind:literal, $plural:literal, $singular:literal) => {
        #[doc = concat!("A `", $kind, "` object (`", $plural, ".crd.projectcalico.org`).")]
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $ty {
            #[serde(default)]
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: $spec,
        }

        impl CalicoResource for $ty {
            const NAMES: CrdNames = CrdNames {
                kind: $kind,
                list_kind: concat!($kind, "List"),
                plural: $plural,
                singular: $singular,
            };
        }

        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = kube::core::ClusterResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn api_version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(API_VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl $ty {
            /// An object with this name and spec (metadata otherwise empty).
            pub fn new(name: &str, spec: $spec) -> Self {
                Self {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        ..ObjectMeta::default()
                    },
                    spec,
                }
            }

            /// `metadata.name`, empty when the object has none.
            pub fn name(&self) -> &str {
                self.metadata.name.as_deref().unwrap_or("")
            }
        }
    };
}

calico_resource!(IPPool, IPPoolSpec, "IPPool", "ippools", "ippool");
calico_resource!(
    IPAMBlock,
    IPAMBlockSpec,
    "IPAMBlock",
    "ipamblocks",
    "ipamblock"
);
calico_resource!(
    BlockAffinity,
    BlockAffinitySpec,
    "BlockAffinity",
    "blockaffinities",
    "blockaffinity"
);
calico_resource!(BGPPeer, BGPPeerSpec, "BGPPeer", "bgppeers", "bgppeer");
calico_resource!(
    BGPConfiguration,
    BGPConfigurationSpec,
    "BGPConfiguration",
    "bgpconfigurations",
    "bgpconfiguration"
);

calico_resource!(
    IPAMHandle,
    IPAMHandleSpec,
    "IPAMHandle",
    "ipamhandles",
    "ipamhandle"
);

calico_resource!(
    BGPFilter,
    BGPFilterSpec,
    "BGPFilter",
    "bgpfilters",
    "bgpfilter"
);

/// `BGPFilter.spec` (Calico 3.26+): ordered rules per direction and family.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPFilterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_v4: Option<Vec<BGPFilterRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_v4: Option<Vec<BGPFilterRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_v6: Option<Vec<BGPFilterRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_v6: Option<Vec<BGPFilterRule>>,
}

/// One rule of a `BGPFilter`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPFilterRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// `Equal`, `NotEqual`, `In`, `NotIn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<BGPFilterPrefixLength>,
    /// `RemotePeers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `Accept` or `Reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// `prefixLength` of a `BGPFilter` rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BGPFilterPrefixLength {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// `IPPool.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(
        default,
        rename = "disableBGPExport",
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_bgp_export: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uses: Option<Vec<String>>,
}

/// `IPAMBlock.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    /// Absent in some printed objects; the name (`172-16-196-128-26`) then gives the CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// `allocations[i]`: `null` = ordinal `i` free, else an index into `attributes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocations: Option<Vec<Option<i64>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Vec<AllocationAttribute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// The capitalised spelling older Calico releases wrote (`Deleted: false`).
    #[serde(default, rename = "Deleted", skip_serializing_if = "Option::is_none")]
    pub deleted_legacy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_affinity: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unallocated: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<i64>,
}

/// `IPAMHandle.spec`: which blocks hold how many addresses of one allocation handle (a pod's
/// container ID, or `ipip-tunnel-addr-<node>`). podroute writes only its node's tunnel handle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IPAMHandleSpec {
    #[serde(default, rename = "handleID", skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// Block CIDR → number of addresses of this handle in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BTreeMap<String, i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

/// One entry of `IPAMBlock.spec.attributes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// `namespace`, `pod`, `node` (and `timestamp`) for a workload's IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<BTreeMap<String, String>>,
}

/// `BlockAffinity.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// A string in the CRD (`"true"`/`"false"`); some releases wrote a boolean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<BoolOrString>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub affinity_type: Option<String>,
}

/// A field that some writers store as a boolean and others as a string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BoolOrString {
    Bool(bool),
    String(String),
}

impl BoolOrString {
    /// `true` for `true` and for the string `"true"` in any case.
    pub fn is_true(&self) -> bool {
        match self {
            BoolOrString::Bool(b) => *b,
            BoolOrString::String(s) => s.eq_ignore_ascii_case("true"),
        }
    }
}

/// `BGPPeer.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    #[serde(default, rename = "peerIP", skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BGPPassword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_original_next_hop: Option<bool>,
    /// `Auto`, `Self`, `Keep` (Calico 3.30+; supersedes `keepOriginalNextHop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<String>,
    /// Go duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<i64>,
    /// `UseNodeIP` (default) or `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(
        default,
        rename = "localASNumber",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_as_number: Option<i64>,
    #[serde(
        default,
        rename = "numAllowedLocalASNumbers",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_allowed_local_as_numbers: Option<i64>,
    /// Names of `BGPFilter`s, applied in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<String>>,
    /// `Auto`, `NextHop` (Calico 3.29+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_by: Option<String>,
}

/// `BGPPeer.spec.password`: a reference to a Secret key in the agent's namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPPassword {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SecretKeyRef {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// `BGPConfiguration.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    /// Graceful-restart time of node-to-node mesh sessions (Go duration, default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<String>,
    /// TCP-MD5 password of the node-to-node mesh sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<BGPPassword>,
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_cluster_ips: Option<Vec<ServiceCidr>>,
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_external_ips: Option<Vec<ServiceCidr>>,
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_load_balancer_ips: Option<Vec<ServiceCidr>>,
    /// Named communities (`{name, value}`), referenced by `prefixAdvertisements`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub communities: Option<Vec<NamedCommunity>>,
    /// Communities to attach to the routes inside a CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_advertisements: Option<Vec<PrefixAdvertisement>>,
}

/// `BGPConfiguration.spec.communities[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCommunity {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// `BGPConfiguration.spec.prefixAdvertisements[]`: `communities` holds names of
/// `spec.communities` entries or literal values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixAdvertisement {
    #[serde(default)]
    pub cidr: String,
    #[serde(default)]
    pub communities: Vec<String>,
}

/// `{cidr: ...}` entries of the `service*IPs` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCidr {
    #[serde(default)]
    pub cidr: String,
}
