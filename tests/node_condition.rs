//! The Node's `NetworkUnavailable` condition through the real `kube::Client` against the
//! in-repo API server: a strategic merge patch of `nodes/<name>/status` that leaves the
//! kubelet's conditions alone; the agent's reporter writes `False` once ready and `True` at a
//! deliberate shutdown (unless `--shutdown-condition=false`).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use podroute::agent::condition::ConditionReporter;
use podroute::datastore::node_condition::{self, NetworkCondition};
use serde_json::{Value, json};
use support::apiserver::FakeApiServer;

async fn server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve::<Node>();
    server.apply_json::<Node>(json!({
        "metadata": { "name": "master01" },
        "status": { "conditions": [
            { "type": "Ready", "status": "True", "reason": "KubeletReady" },
            // As a cloud route controller leaves a new node.
            { "type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated" },
        ]},
    }));
    server
}

fn condition(server: &FakeApiServer, kind: &str) -> Option<Value> {
    server.get_json::<Node>("master01")?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

#[tokio::test]
async fn the_status_patch_sets_only_network_unavailable() {
    let server = server().await;
    node_condition::set(server.client(), "master01", NetworkCondition::Up)
        .await
        .unwrap();
    let c = condition(&server, "NetworkUnavailable").unwrap();
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "PodrouteIsUp");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("podroute is running")
    );
    assert!(c["lastTransitionTime"].as_str().unwrap().ends_with('Z'));
    // The kubelet's condition is still there: a merge by `type`, not a list replacement.
    assert_eq!(
        condition(&server, "Ready").unwrap()["reason"],
        "KubeletReady"
    );
    let patches = server.patches::<Node>();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0]["status"]["conditions"].as_array().unwrap().len(),
        1
    );

    node_condition::set(server.client(), "master01", NetworkCondition::Down)
        .await
        .unwrap();
    let c = condition(&server, "NetworkUnavailable").unwrap();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("PodrouteIsDown"))
    );

    let missing = node_condition::set(server.client(), "node9", NetworkCondition::Up)
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nodes/status"), "{missing}");
}

async fn wait_for_condition(server: &FakeApiServer, status: &str, reason: &str) {
    for _ in 0..300 {
        if let Some(c) = condition(server, "NetworkUnavailable")
            && c["status"] == status
            && c["reason"] == reason
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "NetworkUnavailable never became {status}/{reason}: {:?}",
        condition(server, "NetworkUnavailable")
    );
}

#[tokio::test]
async fn the_reporter_writes_false_once_ready_and_true_at_shutdown() {
    let server = server().await;
    let mut reporter = ConditionReporter::new(Some(server.client()), "master01".into());
    // Not ready: nothing written.
    reporter.observe(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    reporter.observe(false);
    assert!(server.patches::<Node>().is_empty());
    assert_eq!(
        condition(&server, "NetworkUnavailable").unwrap()["reason"],
        "NoRouteCreated"
    );

    reporter.observe(true);
    wait_for_condition(&server, "False", "PodrouteIsUp").await;
    // Further ready evaluations do not write again.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reporter.observe(true);
    }
    assert_eq!(server.patches::<Node>().len(), 1);
    assert_eq!(reporter.written(), Some(NetworkCondition::Up));
    // Losing readiness later does not flip it.
    reporter.observe(false);
    assert_eq!(server.patches::<Node>().len(), 1);

    reporter.shutdown(true).await;
    wait_for_condition(&server, "True", "PodrouteIsDown").await;
}

#[tokio::test]
async fn shutdown_condition_false_and_no_api_write_nothing() {
    let server = server().await;
    let mut reporter = ConditionReporter::new(Some(server.client()), "master01".into());
    reporter.observe(true);
    wait_for_condition(&server, "False", "PodrouteIsUp").await;
    reporter.shutdown(false).await;
    assert_eq!(server.patches::<Node>().len(), 1);
    assert_eq!(
        condition(&server, "NetworkUnavailable").unwrap()["status"],
        "False"
    );

    // YAML-directory mode: no client, nothing to write, no panic.
    let mut dir_mode = ConditionReporter::new(None, "master01".into());
    dir_mode.observe(true);
    dir_mode.shutdown(true).await;
    assert_eq!(dir_mode.written(), None);
}
