//! Writing the node's Calico annotations through the real `kube::Client` against the in-repo
//! fake API server (tests/support/apiserver.rs).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, WatchEvent, WatchParams};
use podroute::agent::annotate::{AnnotateError, ensure_annotations, wanted_annotations};
use podroute::model::node::{
    ANNOTATION_AS_NUMBER, ANNOTATION_IPV4_ADDRESS, ANNOTATION_IPV6_ADDRESS,
};
use serde_json::json;
use support::apiserver::FakeApiServer;

fn node(name: &str, annotations: &[(&str, &str)]) -> Node {
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": annotations, "labels": { "role": "master" } },
        "status": { "addresses": [ { "type": "InternalIP", "address": "192.168.92.128" } ] },
    }))
    .unwrap()
}

fn wanted() -> BTreeMap<String, String> {
    wanted_annotations(
        Some("192.168.92.128/24".parse().unwrap()),
        None,
        Some(64512),
    )
}

async fn server_with(node: Node) -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve::<Node>();
    server.apply(&node);
    server
}

async fn annotations(server: &FakeApiServer, name: &str) -> BTreeMap<String, String> {
    let api: Api<Node> = Api::all(server.client());
    api.get(name)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
}

#[tokio::test]
async fn missing_annotations_are_patched_and_others_kept() {
    let server = server_with(node("master01", &[("kubeadm.alpha/x", "keep")])).await;
    let before = server.resource_version();
    let patched = ensure_annotations(server.client(), "master01", &wanted())
        .await
        .unwrap();
    assert!(patched);
    let patches = server.patches::<Node>();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0],
        json!({ "metadata": { "annotations": {
            ANNOTATION_IPV4_ADDRESS: "192.168.92.128/24",
            ANNOTATION_AS_NUMBER: "64512",
        } } })
    );
    let got = annotations(&server, "master01").await;
    assert_eq!(
        got.get(ANNOTATION_IPV4_ADDRESS).unwrap(),
        "192.168.92.128/24"
    );
    assert_eq!(got.get(ANNOTATION_AS_NUMBER).unwrap(), "64512");
    assert_eq!(got.get("kubeadm.alpha/x").unwrap(), "keep");
    assert_eq!(server.resource_version(), before + 1);

    // The rest of the object is untouched.
    let api: Api<Node> = Api::all(server.client());
    let stored = api.get("master01").await.unwrap();
    assert_eq!(stored.metadata.labels.unwrap()["role"], "master");
    let addresses = stored.status.unwrap().addresses.unwrap();
    assert_eq!(addresses[0].address, "192.168.92.128");

    // Watchers see the change as MODIFIED.
    let mut events = Box::pin(
        api.watch(&WatchParams::default(), &before.to_string())
            .await
            .unwrap(),
    );
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a watch event")
        .expect("stream open")
        .unwrap();
    match event {
        WatchEvent::Modified(n) => {
            let a = n.metadata.annotations.unwrap();
            assert_eq!(a[ANNOTATION_IPV4_ADDRESS], "192.168.92.128/24");
            assert_eq!(
                n.metadata.resource_version.unwrap(),
                (before + 1).to_string()
            );
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // Again: already right, nothing sent.
    let patched = ensure_annotations(server.client(), "master01", &wanted())
        .await
        .unwrap();
    assert!(!patched);
    assert_eq!(server.patches::<Node>().len(), 1);
}

#[tokio::test]
async fn a_wrong_value_is_corrected_alone() {
    let server = server_with(node(
        "master01",
        &[
            (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/32"),
            (ANNOTATION_AS_NUMBER, "64512"),
            ("other", "x"),
        ],
    ))
    .await;
    let patched = ensure_annotations(server.client(), "master01", &wanted())
        .await
        .unwrap();
    assert!(patched);
    assert_eq!(
        server.patches::<Node>(),
        vec![json!({ "metadata": { "annotations": {
            ANNOTATION_IPV4_ADDRESS: "192.168.92.128/24",
        } } })]
    );
    let got = annotations(&server, "master01").await;
    assert_eq!(got[ANNOTATION_IPV4_ADDRESS], "192.168.92.128/24");
    assert_eq!(got[ANNOTATION_AS_NUMBER], "64512");
    assert_eq!(got["other"], "x");
}

#[tokio::test]
async fn nothing_is_sent_when_already_right() {
    let server = server_with(node(
        "master01",
        &[
            (ANNOTATION_IPV4_ADDRESS, "192.168.92.128/24"),
            (ANNOTATION_AS_NUMBER, "64512"),
        ],
    ))
    .await;
    let before = server.resource_version();
    let patched = ensure_annotations(server.client(), "master01", &wanted())
        .await
        .unwrap();
    assert!(!patched);
    assert!(server.patches::<Node>().is_empty());
    assert_eq!(server.resource_version(), before);

    // Without --as only the address is wanted; a foreign ASNumber stays.
    let only_address = wanted_annotations(Some("192.168.92.128/24".parse().unwrap()), None, None);
    let patched = ensure_annotations(server.client(), "master01", &only_address)
        .await
        .unwrap();
    assert!(!patched);
    assert!(server.patches::<Node>().is_empty());
}

#[tokio::test]
async fn a_missing_node_is_a_clear_error() {
    let server = server_with(node("master01", &[])).await;
    let err = ensure_annotations(server.client(), "master02", &wanted())
        .await
        .unwrap_err();
    assert!(matches!(err, AnnotateError::NodeNotFound(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "node master02 not found; is NODENAME right?"
    );
    assert!(server.patches::<Node>().is_empty());
}

#[tokio::test]
async fn dual_stack_and_ipv6_only_nodes_get_their_ipv6_address_written() {
    let server = server_with(node("master01", &[])).await;
    let wanted = wanted_annotations(
        Some("192.168.92.128/24".parse().unwrap()),
        Some("fd00:92::128/64".parse().unwrap()),
        None,
    );
    assert!(
        ensure_annotations(server.client(), "master01", &wanted)
            .await
            .unwrap()
    );
    let got = annotations(&server, "master01").await;
    assert_eq!(got.get(ANNOTATION_IPV6_ADDRESS).unwrap(), "fd00:92::128/64");
    assert_eq!(
        got.get(ANNOTATION_IPV4_ADDRESS).unwrap(),
        "192.168.92.128/24"
    );

    // An IPv6-only node: only the IPv6 address; an IPv4 annotation already there is kept.
    let v6_only = wanted_annotations(None, Some("fd00:92::129/64".parse().unwrap()), None);
    assert!(
        ensure_annotations(server.client(), "master01", &v6_only)
            .await
            .unwrap()
    );
    let got = annotations(&server, "master01").await;
    assert_eq!(got.get(ANNOTATION_IPV6_ADDRESS).unwrap(), "fd00:92::129/64");
    assert_eq!(
        got.get(ANNOTATION_IPV4_ADDRESS).unwrap(),
        "192.168.92.128/24"
    );
}
