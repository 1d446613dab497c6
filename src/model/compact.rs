//! Keeping only what the agent reads: a datastore passes every stored object through these
//! functions before keeping it, so that its memory follows the node's own routes and peers,
//! not the size of the cluster's text.
//!
//! - a `Node` keeps its name, labels, `projectcalico.org/*` and `flannel.alpha.coreos.com/*`
//!   annotations, addresses, `spec.podCIDR(s)` (flannel mode) and the status of its `Ready`
//!   condition (not its times or message, which change on every heartbeat);
//! - every Calico object keeps `metadata.name` (and `creationTimestamp`, which decides
//!   between overlapping pools);
//! - an `IPAMBlock` affine to another node keeps its CIDR, affinity, deletion marker and the
//!   addresses used on a node other than its host (borrowed IPs, which need their own /32);
//!   the other allocations matter only on the block's host.
//!
//! An object that does not validate is kept whole, so its rejection reads as before.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::block::Block;
use super::crd::{AllocationAttribute, IPAMBlock};

/// Annotation prefix of everything podroute reads from a `Node`.
const CALICO_ANNOTATION_PREFIX: &str = "projectcalico.org/";

/// Secondary attributes of an allocation that the model reads.
const SECONDARY_KEYS: [&str; 4] = ["namespace", "pod", "node", "type"];

/// `metadata` reduced to the name and creation time.
pub fn slim_meta(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// A `Node` reduced to what [`NodeInfo::from_node`](super::NodeInfo::from_node) reads.
pub fn slim_node(node: &mut Node) {
    let annotations = node.metadata.annotations.take().map(|all| {
        all.into_iter()
            .filter(|(k, _)| {
                k.starts_with(CALICO_ANNOTATION_PREFIX)
                    || k.starts_with(super::flannel::ANNOTATION_PREFIX)
            })
            .collect::<BTreeMap<_, _>>()
    });
    let ready = super::node::node_ready(node).map(|ready| NodeCondition {
        type_: "Ready".to_string(),
        status: if ready { "True" } else { "False" }.to_string(),
        ..NodeCondition::default()
    });
    let addresses: Option<Vec<NodeAddress>> =
        node.status.take().and_then(|status| status.addresses);
    node.metadata = ObjectMeta {
        name: node.metadata.name.take(),
        labels: node.metadata.labels.take(),
        annotations,
        ..ObjectMeta::default()
    };
    node.spec = node.spec.take().and_then(|spec| {
        (spec.pod_cidr.is_some() || spec.pod_cidrs.is_some()).then(|| NodeSpec {
            pod_cidr: spec.pod_cidr,
            pod_cidrs: spec.pod_cidrs,
            ..NodeSpec::default()
        })
    });
    node.status = (addresses.is_some() || ready.is_some()).then(|| NodeStatus {
        addresses,
        conditions: ready.map(|c| vec![c]),
        ..NodeStatus::default()
    });
}

/// A validated block reduced for `local_node` (see the module doc): a block affine to
/// another node keeps only its borrowed addresses, without handle IDs. Blocks of
/// `local_node` and blocks without a host affinity are unchanged.
pub fn compact_valid_block(block: &mut Block, local_node: &str) {
    let host = match block.host() {
        Some(host) if host != local_node => host.to_string(),
        _ => return,
    };
    block
        .allocations
        .retain(|a| a.node.as_deref().is_some_and(|n| n != host));
    for allocation in &mut block.allocations {
        allocation.handle_id = None;
    }
    block.allocations.shrink_to_fit();
}

/// An `IPAMBlock` reduced for a node that is not `local_node`: see the module doc. Blocks of
/// `local_node`, blocks without a host affinity and blocks that do not validate keep their
/// allocations.
pub fn compact_block(block: &mut IPAMBlock, local_node: &str) {
    slim_meta(&mut block.metadata);
    let Ok(valid) = Block::from_resource(block) else {
        return;
    };
    match valid.host() {
        Some(host) if host != local_node => {}
        _ => return,
    }
    let spec = &mut block.spec;
    spec.cidr = Some(valid.cidr.to_string());
    spec.unallocated = None;
    spec.sequence_number = None;
    spec.strict_affinity = None;
    let borrowed: Vec<_> = valid.borrowed().collect();
    if borrowed.is_empty() {
        spec.allocations = None;
        spec.attributes = None;
        return;
    }
    let Some(slots) = spec.allocations.as_mut() else {
        return;
    };
    let mut attributes = Vec::with_capacity(borrowed.len());
    for slot in slots.iter_mut() {
        *slot = None;
    }
    for allocation in borrowed {
        let Some(slot) = usize::try_from(allocation.ordinal)
            .ok()
            .and_then(|o| slots.get_mut(o))
        else {
            continue;
        };
        let Ok(index) = i64::try_from(attributes.len()) else {
            continue;
        };
        *slot = Some(index);
        let secondary: BTreeMap<String, String> = SECONDARY_KEYS
            .iter()
            .zip([
                &allocation.namespace,
                &allocation.pod,
                &allocation.node,
                &allocation.attr_type,
            ])
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
            .collect();
        attributes.push(AllocationAttribute {
            handle_id: None,
            secondary: Some(secondary),
        });
    }
    spec.attributes = Some(attributes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::IPAMBlockSpec;

    fn attribute(pod: &str, node: &str) -> AllocationAttribute {
        AllocationAttribute {
            handle_id: Some(format!("k8s-pod-network.{pod}")),
            secondary: Some(
                [
                    ("namespace", "default"),
                    ("pod", pod),
                    ("node", node),
                    ("timestamp", "2024-05-01 10:00:00 +0000 UTC"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
        }
    }

    fn block(host: &str) -> IPAMBlock {
        let mut slots = vec![None; 4];
        slots[1] = Some(0);
        slots[2] = Some(1);
        let mut b = IPAMBlock::new(
            "10-0-0-0-30",
            IPAMBlockSpec {
                cidr: Some("10.0.0.0/30".into()),
                affinity: Some(format!("host:{host}")),
                allocations: Some(slots),
                attributes: Some(vec![attribute("a", host), attribute("b", "elsewhere")]),
                unallocated: Some(vec![0, 3]),
                ..IPAMBlockSpec::default()
            },
        );
        b.metadata.resource_version = Some("42".into());
        b
    }

    #[test]
    fn a_remote_block_keeps_only_its_borrowed_addresses() {
        let mut b = block("n2");
        let before = Block::from_resource(&b).unwrap();
        compact_block(&mut b, "n1");
        let after = Block::from_resource(&b).unwrap();
        assert_eq!(after.cidr, before.cidr);
        assert_eq!(after.affinity, before.affinity);
        assert_eq!(after.allocations.len(), 1);
        let kept = &after.allocations[0];
        assert_eq!(kept.ip.to_string(), "10.0.0.2");
        assert_eq!(kept.node.as_deref(), Some("elsewhere"));
        assert_eq!(kept.pod.as_deref(), Some("b"));
        assert_eq!(
            before.borrowed().collect::<Vec<_>>()[0].interface_name(),
            kept.interface_name()
        );
        assert_eq!(b.metadata.resource_version, None);
        assert_eq!(b.spec.unallocated, None);
    }

    #[test]
    fn a_valid_remote_block_keeps_only_its_borrowed_addresses() {
        let raw = block("n2");
        let before = Block::from_resource(&raw).unwrap();
        let mut remote = before.clone();
        compact_valid_block(&mut remote, "n1");
        let mut raw_compacted = raw.clone();
        compact_block(&mut raw_compacted, "n1");
        assert_eq!(remote, Block::from_resource(&raw_compacted).unwrap());
        assert_eq!(remote.allocations.len(), 1);
        assert_eq!(remote.allocations[0].node.as_deref(), Some("elsewhere"));
        assert_eq!(remote.allocations[0].handle_id, None);
        let mut local = before.clone();
        compact_valid_block(&mut local, "n2");
        assert_eq!(local, before);
    }

    #[test]
    fn a_local_block_keeps_every_allocation() {
        let mut b = block("n1");
        let before = Block::from_resource(&b).unwrap();
        compact_block(&mut b, "n1");
        assert_eq!(Block::from_resource(&b).unwrap(), before);
    }

    #[test]
    fn a_remote_block_without_borrowed_addresses_keeps_no_allocation_list() {
        let mut b = block("n2");
        b.spec.attributes = Some(vec![attribute("a", "n2"), attribute("b", "n2")]);
        compact_block(&mut b, "n1");
        assert_eq!(b.spec.allocations, None);
        assert_eq!(b.spec.attributes, None);
        assert!(Block::from_resource(&b).unwrap().allocations.is_empty());
    }

    #[test]
    fn an_invalid_block_is_kept_whole() {
        let mut b = block("n2");
        b.spec.allocations = Some(vec![None; 3]);
        let spec = b.spec.clone();
        compact_block(&mut b, "n1");
        assert_eq!(b.spec, spec);
    }

    #[test]
    fn a_node_keeps_what_nodeinfo_reads() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "n1",
                "labels": {"rack": "r1"},
                "annotations": {
                    "projectcalico.org/IPv4Address": "10.0.0.5/24",
                    "flannel.alpha.coreos.com/backend-data": "{\"VtepMAC\":\"0e:61:06:ff:7a:73\"}",
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1000),
                },
                "managedFields": [{"manager": "kubelet"}],
            },
            "spec": {"podCIDR": "10.244.0.0/24", "providerID": "x".repeat(100)},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
                "images": [{"names": ["registry/image:tag"], "sizeBytes": 1}],
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "True", "reason": "KubeletReady",
                     "lastHeartbeatTime": "2026-01-01T00:00:00Z"},
                ],
            },
        }))
        .unwrap();
        let before = crate::model::NodeInfo::from_node(&node).unwrap();
        assert_eq!(before.ready, Some(true));
        slim_node(&mut node);
        assert_eq!(crate::model::NodeInfo::from_node(&node).unwrap(), before);
        assert!(before.flannel.as_ref().is_some_and(|f| {
            f.as_ref()
                .is_ok_and(|f| f.vtep_mac.is_some() && f.pod_cidr_v4.is_some())
        }));
        let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
        assert_eq!(conditions.map(Vec::len), Some(1), "only Ready");
        assert!(conditions.is_some_and(|c| c[0].last_heartbeat_time.is_none()));
        assert_eq!(
            node.metadata.annotations.as_ref().map(BTreeMap::len),
            Some(2)
        );
        assert_eq!(node.metadata.managed_fields, None);
        assert!(node.spec.as_ref().is_some_and(|s| s.provider_id.is_none()));
        assert!(node.status.as_ref().is_some_and(|s| s.images.is_none()));
    }
}
