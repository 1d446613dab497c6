//! Node address autodetection inside a network namespace (root): `list_interfaces` and
//! `select` run on a thread that has entered a namespace holding a node-like set of
//! interfaces. Every address lives only inside namespaces these tests create; no packet is
//! sent (`can-reach=` only connects a UDP socket).

mod netns;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netns::{Netns, can_run};
use podroute::agent::autodetect::{
    DetectError, Detected, HostInterface, Method, list_interfaces, resolve, select,
};

/// A node namespace and the namespace holding its veth peers (both deleted on drop).
struct Node {
    ns: Netns,
    _far: Netns,
}

/// Adds veth `name` with a fixed interface index to `ns`, its peer up in `far`.
fn veth(ns: &Netns, far: &Netns, name: &str, index: u32, addrs: &[&str], up: bool) {
    let peer = format!("p{name}");
    let index = index.to_string();
    ns.ip(&[
        "link", "add", "name", name, "index", &index, "type", "veth", "peer", "name", &peer,
        "netns", &far.name,
    ]);
    far.ip(&["link", "set", &peer, "up"]);
    for addr in addrs {
        ns.ip(&["addr", "add", addr, "dev", name]);
    }
    if up {
        ns.ip(&["link", "set", name, "up"]);
    }
}

/// Interfaces, in the order calico/node searches them (highest index first):
///
/// | index | name     | state | addresses                                          |
/// |-------|----------|-------|----------------------------------------------------|
/// | 50    | eth2     | down  | 10.99.0.1/24                                       |
/// | 40    | cali1234 | up    | 10.20.0.1/24                                       |
/// | 30    | docker0  | up    | 172.17.0.1/16 (a bridge)                           |
/// | 20    | eth0     | up    | 169.254.10.10/16, 192.168.92.128/24, 192.168.92.200/24 (label eth0:1) |
/// | 10    | eth1     | up    | 10.10.0.5/24                                       |
/// | 1     | lo       | up    | 127.0.0.1/8                                        |
fn node(test: &str) -> Option<Node> {
    if !can_run(test) {
        return None;
    }
    let ns = Netns::new("adnode");
    let far = Netns::new("adfar");
    veth(&ns, &far, "eth1", 10, &["10.10.0.5/24"], true);
    veth(
        &ns,
        &far,
        "eth0",
        20,
        &["169.254.10.10/16", "192.168.92.128/24"],
        true,
    );
    ns.ip(&[
        "addr",
        "add",
        "192.168.92.200/24",
        "dev",
        "eth0",
        "label",
        "eth0:1",
    ]);
    ns.ip(&[
        "link", "add", "name", "docker0", "index", "30", "type", "bridge",
    ]);
    ns.ip(&["addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    ns.ip(&["link", "set", "docker0", "up"]);
    veth(&ns, &far, "cali1234", 40, &["10.20.0.1/24"], true);
    veth(&ns, &far, "eth2", 50, &["10.99.0.1/24"], false);
    Some(Node { ns, _far: far })
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn on(address: &str, interface: &str) -> Detected {
    Detected {
        address: net(address),
        interface: Some(interface.into()),
    }
}

/// `list_interfaces` + `select` inside the node namespace.
fn detect(
    node: &Node,
    method: &str,
    internal_ip: Option<Ipv4Addr>,
) -> Result<Detected, DetectError> {
    let method: Method = method.parse().unwrap();
    node.ns.run(move || {
        let ifaces = list_interfaces().expect("list interfaces");
        select(&method, &ifaces, internal_ip)
    })
}

#[test]
fn lists_interfaces_of_the_namespace() {
    let Some(node) = node("lists_interfaces_of_the_namespace") else {
        return;
    };
    let ifaces: Vec<HostInterface> = node.ns.run(|| list_interfaces().unwrap());
    let names: Vec<(&str, u32, bool)> = ifaces
        .iter()
        .map(|i| (i.name.as_str(), i.index, i.up))
        .collect();
    assert_eq!(
        names,
        vec![
            ("eth2", 50, false),
            ("cali1234", 40, true),
            ("docker0", 30, true),
            ("eth0", 20, true),
            ("eth1", 10, true),
            ("lo", 1, true),
        ]
    );
    let eth0 = &ifaces[3];
    assert_eq!(
        eth0.addrs,
        vec![
            net("169.254.10.10/16"),
            net("192.168.92.128/24"),
            net("192.168.92.200/24")
        ]
    );
    assert_eq!(ifaces[0].addrs, vec![net("10.99.0.1/24")]);
    assert_eq!(ifaces[2].addrs, vec![net("172.17.0.1/16")]);
    assert_eq!(ifaces[5].addrs, vec![net("127.0.0.1/8")]);
}

#[test]
fn first_found_in_namespace() {
    let Some(node) = node("first_found_in_namespace") else {
        return;
    };
    // eth2 is down, cali1234 and docker0 are excluded, eth0's link-local address is skipped.
    assert_eq!(
        detect(&node, "first-found", None).unwrap(),
        on("192.168.92.128/24", "eth0")
    );
}

#[test]
fn interface_regex_in_namespace() {
    let Some(node) = node("interface_regex_in_namespace") else {
        return;
    };
    assert_eq!(
        detect(&node, "interface=eth1", None).unwrap(),
        on("10.10.0.5/24", "eth1")
    );
    assert_eq!(
        detect(&node, "interface=eth.*", None).unwrap(),
        on("192.168.92.128/24", "eth0")
    );
    assert_eq!(
        detect(&node, "interface=docker0", None).unwrap(),
        on("172.17.0.1/16", "docker0")
    );
    assert!(matches!(
        detect(&node, "interface=eth2", None),
        Err(DetectError::NoAddress { .. })
    ));
}

#[test]
fn skip_interface_in_namespace() {
    let Some(node) = node("skip_interface_in_namespace") else {
        return;
    };
    assert_eq!(
        detect(&node, "skip-interface=eth0", None).unwrap(),
        on("10.10.0.5/24", "eth1")
    );
    assert!(matches!(
        detect(&node, "skip-interface=eth0,eth1", None),
        Err(DetectError::NoAddress { .. })
    ));
}

#[test]
fn cidr_in_namespace() {
    let Some(node) = node("cidr_in_namespace") else {
        return;
    };
    assert_eq!(
        detect(&node, "cidr=10.10.0.0/16", None).unwrap(),
        on("10.10.0.5/24", "eth1")
    );
    assert_eq!(
        detect(&node, "cidr=192.168.92.192/26", None).unwrap(),
        on("192.168.92.200/24", "eth0")
    );
    assert!(matches!(
        detect(&node, "cidr=10.99.0.0/24", None),
        Err(DetectError::NoAddress { .. })
    ));
}

#[test]
fn can_reach_in_namespace() {
    let Some(node) = node("can_reach_in_namespace") else {
        return;
    };
    assert_eq!(
        detect(&node, "can-reach=192.168.92.1", None).unwrap(),
        on("192.168.92.128/24", "eth0")
    );
    assert_eq!(
        detect(&node, "can-reach=10.10.0.9", None).unwrap(),
        on("10.10.0.5/24", "eth1")
    );
    // No default route in the namespace.
    let err = detect(&node, "can-reach=203.0.113.1", None).unwrap_err();
    assert!(matches!(err, DetectError::Unreachable { .. }), "{err}");
}

#[test]
fn kubernetes_internal_ip_in_namespace() {
    let Some(node) = node("kubernetes_internal_ip_in_namespace") else {
        return;
    };
    assert_eq!(
        detect(
            &node,
            "kubernetes-internal-ip",
            Some("10.10.0.5".parse().unwrap())
        )
        .unwrap(),
        on("10.10.0.5/24", "eth1")
    );
    assert_eq!(
        detect(
            &node,
            "kubernetes-internal-ip",
            Some("10.1.2.3".parse().unwrap())
        )
        .unwrap(),
        Detected {
            address: net("10.1.2.3/32"),
            interface: None
        }
    );
}

#[test]
fn resolve_in_namespace() {
    let Some(node) = node("resolve_in_namespace") else {
        return;
    };
    let got = node.ns.run(|| {
        (
            resolve("autodetect", "first-found", None).unwrap(),
            resolve("10.10.0.5", "first-found", None).unwrap(),
            resolve("10.10.0.5/16", "first-found", None).unwrap(),
            resolve("none", "first-found", None).unwrap(),
        )
    });
    assert_eq!(got.0, Some(on("192.168.92.128/24", "eth0")));
    assert_eq!(got.1, Some(on("10.10.0.5/24", "eth1")));
    assert_eq!(got.2, Some(on("10.10.0.5/16", "eth1")));
    assert_eq!(got.3, None);
}
