//! The Node's `NetworkUnavailable` condition (kubernetes datastore), as calico-node keeps it:
//! `False` (reason `PodrouteIsUp`) once this node routes every known block, `True` (reason
//! `PodrouteIsDown`) when the agent is stopped deliberately (SIGTERM, `--shutdown-condition`).
//!
//! Kubernetes taints a node whose `NetworkUnavailable` is `True`
//! (`node.kubernetes.io/network-unavailable:NoSchedule`), and cloud route controllers set it
//! `True` on new nodes until something says the pod network is there. The write is a strategic
//! merge patch of `nodes/<name>/status` with just this condition: the API server merges
//! `status.conditions` by `type`, so the kubelet's conditions are left alone (a JSON merge
//! patch would replace the whole list).

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use thiserror::Error;

/// The condition type podroute writes.
pub const CONDITION_TYPE: &str = "NetworkUnavailable";

/// What the condition says about this node's pod network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkCondition {
    /// Routes to every known block are programmed: `NetworkUnavailable=False`.
    Up,
    /// The agent is shutting down: `NetworkUnavailable=True`.
    Down,
}

impl NetworkCondition {
    /// `status` of the condition.
    pub fn status(self) -> &'static str {
        match self {
            NetworkCondition::Up => "False",
            NetworkCondition::Down => "True",
        }
    }

    /// `reason`, in calico-node's style (`CalicoIsUp` / `CalicoIsDown`).
    pub fn reason(self) -> &'static str {
        match self {
            NetworkCondition::Up => "PodrouteIsUp",
            NetworkCondition::Down => "PodrouteIsDown",
        }
    }

    /// `message`.
    pub fn message(self) -> &'static str {
        match self {
            NetworkCondition::Up => "podroute is running on this node and routes every block",
            NetworkCondition::Down => "podroute is shutting down on this node",
        }
    }

    /// The strategic merge patch that sets the condition, stamped with `now` (RFC 3339) as
    /// both heartbeat and transition time, as calico-node writes it.
    pub fn patch_body(self, now: &str) -> Value {
        json!({
            "status": {
                "conditions": [{
                    "type": CONDITION_TYPE,
                    "status": self.status(),
                    "reason": self.reason(),
                    "message": self.message(),
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
            },
        })
    }
}

/// The condition could not be written.
#[derive(Debug, Error)]
#[error(
    "cannot set the NetworkUnavailable condition of node {node}: {source} (the service account \
     needs `patch` on nodes/status)"
)]
pub struct ConditionError {
    pub node: String,
    #[source]
    pub source: kube::Error,
}

/// Whether `node` already carries `condition` (same status and reason): then nothing needs to
/// be written.
pub fn already_set(node: &Node, condition: NetworkCondition) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == CONDITION_TYPE
                && c.status == condition.status()
                && c.reason.as_deref() == Some(condition.reason())
        })
}

/// Sets node `node_name`'s `NetworkUnavailable` condition.
pub async fn set(
    client: kube::Client,
    node_name: &str,
    condition: NetworkCondition,
) -> Result<(), ConditionError> {
    let nodes: Api<Node> = Api::all(client);
    // RFC 3339 in whole seconds, as the API server stores condition times.
    let now = format!("{:.0}", jiff::Timestamp::now());
    let body = condition.patch_body(&now);
    nodes
        .patch_status(node_name, &PatchParams::default(), &Patch::Strategic(&body))
        .await
        .map(|_| ())
        .map_err(|source| ConditionError {
            node: node_name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_and_down_are_calico_shaped() {
        let up = NetworkCondition::Up.patch_body("2024-01-01T00:00:00Z");
        let c = &up["status"]["conditions"][0];
        assert_eq!(c["type"], "NetworkUnavailable");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "PodrouteIsUp");
        assert_eq!(c["lastTransitionTime"], "2024-01-01T00:00:00Z");
        let down = NetworkCondition::Down.patch_body("x");
        assert_eq!(down["status"]["conditions"][0]["status"], "True");
        assert_eq!(down["status"]["conditions"][0]["reason"], "PodrouteIsDown");
    }

    #[test]
    fn already_set_compares_status_and_reason() {
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": "n" },
            "status": { "conditions": [
                { "type": "Ready", "status": "True", "reason": "KubeletReady" },
                { "type": "NetworkUnavailable", "status": "False", "reason": "CalicoIsUp" },
            ]},
        }))
        .unwrap();
        // calico-node's condition is not ours: written again with our reason.
        assert!(!already_set(&node, NetworkCondition::Up));
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": "n" },
            "status": { "conditions": [
                { "type": "NetworkUnavailable", "status": "False", "reason": "PodrouteIsUp" },
            ]},
        }))
        .unwrap();
        assert!(already_set(&node, NetworkCondition::Up));
        assert!(!already_set(&node, NetworkCondition::Down));
    }
}
