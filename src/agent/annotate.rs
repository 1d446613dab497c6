//! The node's Calico annotations (kubernetes datastore): `projectcalico.org/IPv4Address`,
//! `projectcalico.org/IPv6Address` (when the node has one) and, when `--as` is set, `projectcalico.org/ASNumber`, written as calico/node writes them so
//! that other nodes (podroute or Calico) find this node's address and AS.

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use thiserror::Error;

use crate::model::node::{ANNOTATION_AS_NUMBER, ANNOTATION_IPV4_ADDRESS, ANNOTATION_IPV6_ADDRESS};

/// Why the annotations could not be written.
#[derive(Debug, Error)]
pub enum AnnotateError {
    #[error("node {0} not found; is NODENAME right?")]
    NodeNotFound(String),
    #[error("cannot read node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cannot annotate node {node}: {source} (the service account needs `patch` on nodes; \
         PODROUTE_NO_ANNOTATE turns annotating off)"
    )]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// The annotations this node should carry: the addresses with their prefixes
/// (`192.168.92.128/24`, `fd00:92::128/64`), and the AS number only when given explicitly
/// (`--as`).
pub fn wanted_annotations(
    address: Option<Ipv4Net>,
    address6: Option<Ipv6Net>,
    as_number: Option<u32>,
) -> BTreeMap<String, String> {
    let mut wanted = BTreeMap::new();
    if let Some(address) = address {
        wanted.insert(ANNOTATION_IPV4_ADDRESS.to_string(), address.to_string());
    }
    if let Some(address) = address6 {
        wanted.insert(ANNOTATION_IPV6_ADDRESS.to_string(), address.to_string());
    }
    if let Some(asn) = as_number {
        wanted.insert(ANNOTATION_AS_NUMBER.to_string(), asn.to_string());
    }
    wanted
}

/// The entries of `wanted` that `node` lacks or holds with another value.
pub fn missing_or_wrong(
    node: &Node,
    wanted: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let have = node.metadata.annotations.as_ref();
    wanted
        .iter()
        .filter(|(k, v)| have.and_then(|a| a.get(*k)) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Makes node `node_name` carry `wanted`: reads the Node and, when an annotation is missing or
/// different, sends a JSON merge patch of just those annotations (others are left alone).
/// Returns whether a patch was sent.
pub async fn ensure_annotations(
    client: kube::Client,
    node_name: &str,
    wanted: &BTreeMap<String, String>,
) -> Result<bool, AnnotateError> {
    let nodes: Api<Node> = Api::all(client);
    let node = nodes
        .get_opt(node_name)
        .await
        .map_err(|source| AnnotateError::Get {
            node: node_name.to_string(),
            source,
        })?
        .ok_or_else(|| AnnotateError::NodeNotFound(node_name.to_string()))?;
    let patch = missing_or_wrong(&node, wanted);
    if patch.is_empty() {
        return Ok(false);
    }
    let body = serde_json::json!({ "metadata": { "annotations": patch } });
    match nodes
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            Err(AnnotateError::NodeNotFound(node_name.to_string()))
        }
        Err(source) => Err(AnnotateError::Patch {
            node: node_name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("master01".into());
        if !annotations.is_empty() {
            n.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        n
    }

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn wanted_has_the_prefix_and_only_an_explicit_as() {
        let addr: Ipv4Net = "192.168.92.128/24".parse().unwrap();
        assert_eq!(
            wanted_annotations(Some(addr), None, None),
            map(&[(ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24")])
        );
        assert_eq!(
            wanted_annotations(Some(addr), None, Some(64512)),
            map(&[
                (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
                (ANNOTATION_AS_NUMBER, "64512"),
            ])
        );
        assert_eq!(
            wanted_annotations(None, None, Some(65001)),
            map(&[(ANNOTATION_AS_NUMBER, "65001")])
        );
        assert!(wanted_annotations(None, None, None).is_empty());
        let v6: Ipv6Net = "fd00:92::128/64".parse().unwrap();
        assert_eq!(
            wanted_annotations(Some(addr), Some(v6), None),
            map(&[
                (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
                (ANNOTATION_IPV6_ADDRESS, "fd00:92::128/64"),
            ])
        );
        assert_eq!(
            wanted_annotations(None, Some(v6), None),
            map(&[(ANNOTATION_IPV6_ADDRESS, "fd00:92::128/64")]),
            "an IPv6-only node"
        );
    }

    #[test]
    fn only_missing_or_different_entries() {
        let wanted = map(&[
            (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
            (ANNOTATION_AS_NUMBER, "64512"),
        ]);
        assert_eq!(missing_or_wrong(&node(&[]), &wanted), wanted);
        let n = node(&[
            (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
            (ANNOTATION_AS_NUMBER, "65000"),
            ("other", "x"),
        ]);
        assert_eq!(
            missing_or_wrong(&n, &wanted),
            map(&[(ANNOTATION_AS_NUMBER, "64512")])
        );
        // A different prefix is a different value.
        let n = node(&[(ANNOTATION_IPV4_ADDRESS, "192.168.92.128/32")]);
        assert_eq!(missing_or_wrong(&n, &wanted), wanted);
        let n = node(&[
            (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
            (ANNOTATION_AS_NUMBER, "64512"),
        ]);
        assert!(missing_or_wrong(&n, &wanted).is_empty());
        assert!(missing_or_wrong(&n, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn not_found_names_the_fix() {
        let msg = AnnotateError::NodeNotFound("node9".into()).to_string();
        assert_eq!(msg, "node node9 not found; is NODENAME right?");
    }
}
