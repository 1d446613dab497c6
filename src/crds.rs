//! The CustomResourceDefinitions podroute reads, generated from code so that `crds/` and
//! `podroute crds` cannot drift apart.
//!
//! They are structurally compatible with Calico's own (`crd.projectcalico.org/v1`, same
//! names, cluster scope, required fields, enums and defaults), so either set can be
//! installed and objects written for one are valid under the other.

use serde_json::{Value, json};

use crate::model::crd::{
    BGPConfiguration, BGPFilter, BGPPeer, BlockAffinity, CalicoResource, CrdNames, GROUP,
    IPAMBlock, IPAMHandle, IPPool, VERSION,
};

/// The CRDs could not be rendered as YAML.
#[derive(Debug, thiserror::Error)]
#[error("cannot render CRD {name} as YAML: {source}")]
pub struct CrdRenderError {
    name: String,
    source: serde_yaml_ng::Error,
}

/// One generated CRD.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedCrd {
    /// File name under `crds/`, e.g. `crd.projectcalico.org_ippools.yaml`.
    pub file_name: String,
    /// The CustomResourceDefinition object.
    pub object: Value,
}

impl GeneratedCrd {
    /// The CRD as YAML (keys sorted, as `kubectl get -o yaml` prints them).
    pub fn to_yaml(&self) -> Result<String, CrdRenderError> {
        serde_yaml_ng::to_string(&sorted_yaml(&self.object)).map_err(|source| CrdRenderError {
            name: self.file_name.clone(),
            source,
        })
    }
}

fn sorted_yaml(value: &Value) -> serde_yaml_ng::Value {
    use serde_yaml_ng::Value as Y;
    match value {
        Value::Null => Y::Null,
        Value::Bool(b) => Y::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Y::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                Y::Number(u.into())
            } else {
                Y::Number(n.as_f64().unwrap_or_default().into())
            }
        }
        Value::String(s) => Y::String(s.clone()),
        Value::Array(items) => Y::Sequence(items.iter().map(sorted_yaml).collect()),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = serde_yaml_ng::Mapping::new();
            for key in keys {
                out.insert(Y::String(key.clone()), sorted_yaml(&map[key]));
            }
            Y::Mapping(out)
        }
    }
}

fn crd(names: CrdNames, spec_schema: Value) -> GeneratedCrd {
    let name = format!("{}.{GROUP}", names.plural);
    let object = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": name },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": names.kind,
                "listKind": names.list_kind,
                "plural": names.plural,
                "singular": names.singular,
            },
            "preserveUnknownFields": false,
            "scope": "Cluster",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": { "type": "string" },
                            "kind": { "type": "string" },
                            "metadata": { "type": "object" },
                            "spec": spec_schema,
                        },
                    },
                },
            }],
        },
    });
    GeneratedCrd {
        file_name: format!("{GROUP}_{}.yaml", names.plural),
        object,
    }
}

fn string() -> Value {
    json!({ "type": "string" })
}

fn boolean() -> Value {
    json!({ "type": "boolean" })
}

fn encap_mode(description: &str) -> Value {
    json!({
        "type": "string",
        "default": "Never",
        "enum": ["Never", "Always", "CrossSubnet"],
        "description": description,
    })
}

fn secret_key_ref() -> Value {
    json!({
        "type": "object",
        "properties": {
            "secretKeyRef": {
                "type": "object",
                "properties": {
                    "key": string(),
                    "name": { "type": "string", "default": "" },
                    "optional": boolean(),
                },
                "required": ["key"],
                "x-kubernetes-map-type": "atomic",
            },
        },
    })
}

fn cidr_list() -> Value {
    json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": { "cidr": { "type": "string", "format": "cidr" } },
            "x-kubernetes-map-type": "atomic",
        },
        "x-kubernetes-list-type": "set",
    })
}

fn ippool() -> GeneratedCrd {
    crd(
        IPPool::NAMES,
        json!({
            "description": "IPPoolSpec contains the specification for an IPPool resource.",
            "type": "object",
            "properties": {
                "allowedUses": {
                    "type": "array",
                    "items": string(),
                    "uniqueItems": true,
                },
                "blockSize": {
                    "type": "integer",
                    "description": "The block size to use for IP address assignments from this pool. Defaults to 26 for IPv4 and 122 for IPv6.",
                },
                "cidr": { "type": "string", "description": "The pool CIDR." },
                "disableBGPExport": boolean(),
                "disabled": boolean(),
                "ipip": {
                    "type": "object",
                    "description": "Deprecated: APIv1 backwards compatibility only.",
                    "properties": { "enabled": boolean(), "mode": string() },
                },
                "ipipMode": encap_mode("IPIP encapsulation for this pool: Never (default), Always or CrossSubnet."),
                "nat-outgoing": {
                    "type": "boolean",
                    "description": "Deprecated: APIv1 backwards compatibility only.",
                },
                "natOutgoing": boolean(),
                "nodeSelector": string(),
                "vxlanMode": encap_mode("VXLAN encapsulation for this pool: Never (default), Always or CrossSubnet."),
            },
            "required": ["cidr"],
        }),
    )
}

fn ipamblock() -> GeneratedCrd {
    crd(
        IPAMBlock::NAMES,
        json!({
            "description": "IPAMBlockSpec contains the specification for an IPAMBlock resource.",
            "type": "object",
            "properties": {
                "affinity": {
                    "type": "string",
                    "description": "host:<node> or virtual:<name>; unset = not affine to a host.",
                },
                "allocations": {
                    "type": "array",
                    "items": { "type": "integer", "nullable": true },
                    "description": "null = ordinal free, else the index of its entry in attributes.",
                },
                "attributes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "handle_id": string(),
                            "secondary": {
                                "type": "object",
                                "additionalProperties": string(),
                            },
                        },
                    },
                },
                "cidr": { "type": "string", "description": "The block's CIDR." },
                "deleted": boolean(),
                "sequenceNumber": { "type": "integer", "format": "int64", "default": 0 },
                "sequenceNumberForAllocation": {
                    "type": "object",
                    "additionalProperties": { "type": "integer", "format": "int64" },
                },
                "strictAffinity": boolean(),
                "unallocated": { "type": "array", "items": { "type": "integer" } },
            },
            "required": [
                "allocations",
                "attributes",
                "cidr",
                "sequenceNumber",
                "strictAffinity",
                "unallocated",
            ],
        }),
    )
}

/// `IPAMHandle`: podroute writes its node's tunnel-address handle (`ipip-tunnel-addr-<node>`).
fn ipamhandle() -> GeneratedCrd {
    crd(
        IPAMHandle::NAMES,
        json!({
            "description": "IPAMHandleSpec contains the specification for an IPAMHandle resource.",
            "type": "object",
            "properties": {
                "block": {
                    "type": "object",
                    "additionalProperties": { "type": "integer" },
                    "description": "Block CIDR -> number of this handle's addresses in it.",
                },
                "deleted": boolean(),
                "handleID": string(),
            },
            "required": ["block", "handleID"],
        }),
    )
}

fn blockaffinity() -> GeneratedCrd {
    crd(
        BlockAffinity::NAMES,
        json!({
            "description": "BlockAffinitySpec contains the specification for a BlockAffinity resource.",
            "type": "object",
            "properties": {
                "cidr": string(),
                "deleted": {
                    "type": "string",
                    "description": "A string for compatibility with older releases.",
                },
                "node": string(),
                "state": string(),
                "type": string(),
            },
            "required": ["cidr", "deleted", "node", "state"],
        }),
    )
}

fn bgppeer() -> GeneratedCrd {
    crd(
        BGPPeer::NAMES,
        json!({
            "description": "BGPPeerSpec contains the specification for a BGPPeer resource.",
            "type": "object",
            "properties": {
                "asNumber": { "type": "integer", "format": "int32" },
                "filters": { "type": "array", "items": string() },
                "keepOriginalNextHop": boolean(),
                "localWorkloadSelector": string(),
                "maxRestartTime": {
                    "type": "string",
                    "description": "Graceful restart time (e.g. 120s); BIRD's default of 120s when unset.",
                },
                "nextHopMode": { "type": "string", "enum": ["Auto", "Self", "Keep"] },
                "node": string(),
                "nodeSelector": string(),
                "numAllowedLocalASNumbers": { "type": "integer", "format": "int32" },
                "password": secret_key_ref(),
                "peerIP": {
                    "type": "string",
                    "description": "IP of the peer, optionally with port: <IPv4>:<port> or [<IPv6>]:<port>.",
                },
                "peerSelector": string(),
                "reachableBy": string(),
                "reversePeering": { "type": "string", "enum": ["Auto", "Manual"] },
                "sourceAddress": string(),
                "ttlSecurity": { "type": "integer" },
            },
        }),
    )
}

fn bgpconfiguration() -> GeneratedCrd {
    crd(
        BGPConfiguration::NAMES,
        json!({
            "description": "BGPConfigurationSpec contains the values of the BGP configuration.",
            "type": "object",
            "properties": {
                "asNumber": {
                    "type": "integer",
                    "format": "int32",
                    "description": "Default AS number of the nodes. [Default: 64512]",
                },
                "bindMode": { "type": "string", "enum": ["None", "NodeIP"] },
                "communities": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": string(),
                            "value": {
                                "type": "string",
                                "pattern": "^(\\d+):(\\d+)$|^(\\d+):(\\d+):(\\d+)$",
                            },
                        },
                        "x-kubernetes-map-type": "atomic",
                    },
                    "x-kubernetes-list-type": "set",
                },
                "ignoredInterfaces": {
                    "type": "array",
                    "items": string(),
                    "x-kubernetes-list-type": "set",
                },
                "listenPort": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 65535,
                    "description": "BGP port. [Default: 179]",
                },
                "localWorkloadPeeringIPV4": string(),
                "localWorkloadPeeringIPV6": string(),
                "logSeverityScreen": {
                    "type": "string",
                    "default": "Info",
                    "pattern": "^(?i)(Trace|Debug|Info|Warning|Error|Fatal)?$",
                },
                "nodeMeshMaxRestartTime": string(),
                "nodeMeshPassword": secret_key_ref(),
                "nodeToNodeMeshEnabled": {
                    "type": "boolean",
                    "description": "Full node-to-node BGP mesh. [Default: true]",
                },
                "prefixAdvertisements": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "cidr": { "type": "string", "format": "cidr" },
                            "communities": { "type": "array", "items": string() },
                        },
                        "x-kubernetes-map-type": "atomic",
                    },
                    "x-kubernetes-list-type": "set",
                },
                "serviceClusterIPs": cidr_list(),
                "serviceExternalIPs": cidr_list(),
                "serviceLoadBalancerAggregation": {
                    "type": "string",
                    "default": "Enabled",
                    "enum": ["Enabled", "Disabled"],
                },
                "serviceLoadBalancerIPs": cidr_list(),
            },
        }),
    )
}

fn bgpfilter() -> GeneratedCrd {
    let rules = |v6: bool| {
        json!({
            "type": "array",
            "items": {
                "description": format!(
                    "A rule of an IPv{} filter: the first rule that matches decides.",
                    if v6 { 6 } else { 4 }
                ),
                "type": "object",
                "properties": {
                    "action": { "type": "string", "enum": ["Accept", "Reject"] },
                    "cidr": string(),
                    "interface": string(),
                    "matchOperator": {
                        "type": "string",
                        "enum": ["Equal", "NotEqual", "In", "NotIn"],
                    },
                    "prefixLength": {
                        "type": "object",
                        "properties": {
                            "max": {
                                "type": "integer",
                                "format": "int32",
                                "minimum": 0,
                                "maximum": if v6 { 128 } else { 32 },
                            },
                            "min": {
                                "type": "integer",
                                "format": "int32",
                                "minimum": 0,
                                "maximum": if v6 { 128 } else { 32 },
                            },
                        },
                    },
                    "source": { "type": "string", "enum": ["RemotePeers"] },
                },
                "required": ["action"],
            },
        })
    };
    crd(
        BGPFilter::NAMES,
        json!({
            "description": "BGPFilterSpec contains the IPv4 and IPv6 filter rules of the BGP Filter.",
            "type": "object",
            "properties": {
                "exportV4": rules(false),
                "exportV6": rules(true),
                "importV4": rules(false),
                "importV6": rules(true),
            },
        }),
    )
}

/// The seven CRDs, in a fixed order.
pub fn all() -> Vec<GeneratedCrd> {
    vec![
        bgpconfiguration(),
        bgpfilter(),
        bgppeer(),
        blockaffinity(),
        ipamblock(),
        ipamhandle(),
        ippool(),
    ]
}

/// All CRDs as one multi-document YAML stream (what `podroute crds` prints).
pub fn render_all() -> Result<String, CrdRenderError> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&crd.to_yaml()?);
    }
    Ok(out)
}
