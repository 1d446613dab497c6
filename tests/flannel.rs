//! flannel mode end to end through the YAML-directory datastore: seed 000's cluster, written
//! as `kubectl get nodes -o yaml` and flannel's own manifest print it, read by the datastore
//! and planned for each node; the tables equal the seed's `route -n`, `arp -n` and
//! `bridge fdb`, and follow a Node's change.
//!
//! With root, the agent itself runs in flannel mode in a network namespace (where `flannel.1`
//! already exists, as on a node that ran flanneld): it programs flanneld's routes through it,
//! writes `subnet.env`, and starts no BGP mesh.

mod netns;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podroute::agent::flannel::{FlannelMode, NetConfSource, load};
use podroute::plan::flannel::tables;
use podroute::state::{ClusterState, StateRx};

const WAIT: Duration = Duration::from_secs(20);

/// flannel's manifest (`kube-flannel.yml`), the parts podroute reads.
const KUBE_FLANNEL_YML: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: kube-flannel
---
kind: ConfigMap
apiVersion: v1
metadata:
  name: kube-flannel-cfg
  namespace: kube-flannel
  labels:
    tier: node
    app: flannel
data:
  cni-conf.json: |
    {
      "name": "cbr0",
      "cniVersion": "0.3.1",
      "plugins": [{"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}}]
    }
  net-conf.json: |
    {
      "Network": "10.244.0.0/16",
      "Backend": {
        "Type": "vxlan"
      }
    }
"#;

/// One Node as flanneld's kube subnet manager leaves it.
fn node_yaml(name: &str, ip: &str, cidr: &str, mac: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations:
    flannel.alpha.coreos.com/backend-data: '{{"VNI":1,"VtepMAC":"{mac}"}}'
    flannel.alpha.coreos.com/backend-type: vxlan
    flannel.alpha.coreos.com/kube-subnet-manager: "true"
    flannel.alpha.coreos.com/public-ip: {ip}
    node.alpha.kubernetes.io/ttl: "0"
spec:
  podCIDR: {cidr}
  podCIDRs:
  - {cidr}
status:
  addresses:
  - type: InternalIP
    address: {ip}
  - type: Hostname
    address: {name}
"#
    )
}

/// Seed 000: master 192.168.0.39, node1 192.168.0.22, node2 192.168.0.8.
fn seed000_nodes(node1_mac: &str) -> String {
    [
        node_yaml(
            "master",
            "192.168.0.39",
            "10.244.0.0/24",
            "fe:be:87:93:06:e2",
        ),
        node_yaml("node1", "192.168.0.22", "10.244.1.0/24", node1_mac),
        node_yaml("node2", "192.168.0.8", "10.244.2.0/24", "0a:72:bf:3f:cd:40"),
    ]
    .join("---\n")
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn wait_for(
    rx: &mut StateRx,
    what: &str,
    pred: impl FnMut(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: not reached; last state: {:#?}", rx.latest()),
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test]
async fn seed000_from_a_yaml_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "kube-flannel.yml", KUBE_FLANNEL_YML);
    write(
        dir.path(),
        "nodes.yaml",
        &seed000_nodes("0e:61:06:ff:7a:73"),
    );
    let conf = load(
        &NetConfSource::DirConfigMap {
            dir: dir.path().to_path_buf(),
            name: "kube-flannel-cfg".into(),
        },
        None,
    )
    .await
    .unwrap();
    let mut ds = podroute::datastore::dir::spawn(dir.path(), "master", Duration::from_millis(50));
    let state = wait_for(&mut ds.state, "three nodes", |s| s.nodes.len() == 3).await;
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
    // flannel's ConfigMap (and the Namespace beside it) are not the datastore's business:
    // the ConfigMap is not counted as unreadable, the Namespace is (a kind nobody reads).
    assert_eq!(ds.counters.unreadable(), 1);

    let mut mode = FlannelMode::new(conf, "test".into(), dir.path().join("subnet.env"), false);
    let local = mode.local(
        &state,
        "master",
        Some("192.168.0.39/26".parse().unwrap()),
        None,
        "eth0",
    );
    // The VTEP MAC the Node already advertises is kept.
    assert_eq!(local.vtep_mac.to_string(), "fe:be:87:93:06:e2");
    let (plan, rejected) = mode.plan(&state, &local);
    assert_eq!(rejected, 0);
    let (routes, arp, fdb) = tables(&plan);
    // Seed 000, on master: `route -n`, `arp -n`, `bridge fdb`.
    assert_eq!(
        routes,
        lines(
            "10.244.1.0 10.244.1.0 255.255.255.0 UG 0 0 0 flannel.1
             10.244.2.0 10.244.2.0 255.255.255.0 UG 0 0 0 flannel.1"
        )
    );
    assert_eq!(
        arp,
        lines(
            "10.244.1.0 ether 0e:61:06:ff:7a:73 CM flannel.1
             10.244.2.0 ether 0a:72:bf:3f:cd:40 CM flannel.1"
        )
    );
    assert_eq!(
        fdb,
        lines(
            "0a:72:bf:3f:cd:40 dev flannel.1 dst 192.168.0.8 self permanent
             0e:61:06:ff:7a:73 dev flannel.1 dst 192.168.0.22 self permanent"
        )
    );
    // The annotations podroute writes for master are the ones flanneld wrote.
    let wanted = mode.annotations(&local);
    assert_eq!(
        wanted["flannel.alpha.coreos.com/backend-data"],
        r#"{"VNI":1,"VtepMAC":"fe:be:87:93:06:e2"}"#
    );
    assert_eq!(wanted["flannel.alpha.coreos.com/public-ip"], "192.168.0.39");

    // node1's flanneld restarts with a new VTEP (its flannel.1 recreated): the FDB and
    // neighbour entries follow, the route stays.
    write(
        dir.path(),
        "nodes.yaml",
        &seed000_nodes("0e:61:06:ff:7a:74"),
    );
    let state = wait_for(&mut ds.state, "node1's new MAC", |s| {
        s.nodes.get("node1").is_some_and(|n| {
            n.flannel.as_ref().is_some_and(|l| {
                l.as_ref()
                    .is_ok_and(|l| l.vtep_mac.is_some_and(|m| m.to_string().ends_with("74")))
            })
        })
    })
    .await;
    let (plan2, _) = mode.plan(&state, &local);
    assert_eq!(plan2.routes, plan.routes);
    assert!(
        tables(&plan2)
            .2
            .contains(&"0e:61:06:ff:7a:74 dev flannel.1 dst 192.168.0.22 self permanent".into())
    );

    // A broken lease is left out with its reason, and counted once.
    write(
        dir.path(),
        "broken.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node3\n  annotations:\n    \
         flannel.alpha.coreos.com/backend-data: '{\"VtepMAC\": 7}'\nspec:\n  podCIDR: \
         10.244.3.0/24\n",
    );
    let state = wait_for(&mut ds.state, "node3", |s| s.nodes.len() == 4).await;
    let (plan3, rejected) = mode.plan(&state, &local);
    assert_eq!(rejected, 1);
    assert_eq!(plan3.routes.len(), 2);
    assert!(
        mode.warning_lines()
            .iter()
            .any(|w| w.contains("node3") && w.contains("backend-data")),
        "{:?}",
        mode.warning_lines()
    );
    let (_, again) = mode.plan(&state, &local);
    assert_eq!(again, 0, "a rejection standing still is not counted again");
}

/// A flannel cluster seen through the API server: no Calico CRD is installed (every Calico
/// collection answers 404), yet the datastore in flannel mode syncs with the Nodes' leases,
/// and net-conf.json is read from the ConfigMap in `kube-flannel`.
#[tokio::test]
async fn kubernetes_datastore_without_calico_crds_and_the_configmap() {
    use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use support::apiserver::FakeApiServer;

    let server = FakeApiServer::start().await;
    server.serve::<Node>();
    server.serve::<Service>();
    server.serve::<EndpointSlice>();
    for document in seed000_nodes("0e:61:06:ff:7a:73").split("---\n") {
        let node: Node = serde_yaml_ng::from_str(document).unwrap();
        server.apply(&node);
    }
    let cm: serde_json::Value = serde_yaml_ng::from_str(
        KUBE_FLANNEL_YML
            .split("---\n")
            .nth(1)
            .expect("the ConfigMap document"),
    )
    .unwrap();
    server.apply_namespaced_json::<ConfigMap>("kube-flannel", cm);

    // `false` (Calico mode) never syncs here: the IPPool list is 404.
    let mut ds = podroute::datastore::kube::spawn_with_options(
        server.client(),
        "master",
        Duration::from_secs(60),
        true,
    );
    let state = tokio::time::timeout(WAIT, ds.state.synced())
        .await
        .expect("flannel mode syncs without Calico's CRDs")
        .unwrap();
    assert_eq!(state.nodes.len(), 3);
    assert!(state.pools.is_empty() && state.peers.is_empty());

    let client = server.client();
    let conf = load(
        &NetConfSource::ConfigMap {
            namespace: None,
            name: "kube-flannel-cfg".into(),
        },
        Some(&client),
    )
    .await
    .unwrap();
    let mut mode = FlannelMode::new(conf, "test".into(), "subnet.env".into(), false);
    let local = mode.local(
        &state,
        "master",
        Some("192.168.0.39/26".parse().unwrap()),
        None,
        "eth0",
    );
    let (plan, _) = mode.plan(&state, &local);
    assert_eq!(
        plan.routes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink",
            "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
        ]
    );
    // In another namespace than asked: not found, said so.
    let err = load(
        &NetConfSource::ConfigMap {
            namespace: Some("kube-system".into()),
            name: "kube-flannel-cfg".into(),
        },
        Some(&client),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "ConfigMap kube-system/kube-flannel-cfg: not found"
    );
}

/// Kills the agent it holds (a process this test started) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_in_flannel_mode_programs_flanneld_s_routes_and_writes_subnet_env() {
    use netns::{Netns, can_run, veth};
    if !can_run("agent_in_flannel_mode") {
        return;
    }
    let ns = Netns::new("flannel-a");
    let node1 = Netns::new("flannel-b");
    // master's NIC (a veth to node1's namespace) and the flannel.1 flanneld made there (seed
    // 000: `ip -d link show flannel.1`); podroute adopts it. Only inside these namespaces.
    veth(
        &ns,
        "eth0",
        "192.168.0.39/26",
        &node1,
        "eth0",
        "192.168.0.22/26",
    );
    let (vxlan_ok, out) = ns.try_ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.168.0.39",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    if !vxlan_ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the kernel's vxlan module is needed: {out}"
        );
        eprintln!("SKIP: no vxlan device: {out}");
        return;
    }
    ns.ip(&["link", "set", "flannel.1", "address", "fe:be:87:93:06:e2"]);
    ns.ip(&["addr", "add", "10.244.0.0/32", "dev", "flannel.1"]);
    ns.ip(&["link", "set", "flannel.1", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write(&datastore, "kube-flannel.yml", KUBE_FLANNEL_YML);
    write(
        &datastore,
        "nodes.yaml",
        &seed000_nodes("0e:61:06:ff:7a:73"),
    );
    let subnet_env = dir.path().join("run/flannel/subnet.env");
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _agent = Agent(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_podroute"),
                "agent",
            ])
            .args(["--nodename", "master", "--model", "flannel"])
            .args(["--ip", "192.168.0.39/26", "--nic", "eth0"])
            .arg("--datastore-type")
            .arg(format!("dir:{}", datastore.display()))
            .arg("--flannel-subnet-file")
            .arg(&subnet_env)
            .args(["--metrics-addr", "127.0.0.1:9091"])
            .env_remove("IP")
            .env_remove("PODROUTE_MODEL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podroute agent starts"),
    );
    let want = [
        "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink",
        "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut routes;
    loop {
        routes = ns.routes(podroute::dataplane::DEFAULT_ROUTE_PROTOCOL);
        if routes == want && subnet_env.exists() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "no flannel routes: {routes:?}\n--- log\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Seed 000's flannel.1 has MTU 1450 over eth0's 1500: the CNI plugin gets the same.
    let dummy_mtu: u32 = ns
        .exec("cat", &["/sys/class/net/eth0/mtu"])
        .1
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&subnet_env).unwrap(),
        format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.0.1/24\nFLANNEL_MTU={}\n\
             FLANNEL_IPMASQ=false\n",
            dummy_mtu - 50
        )
    );
    // Ready (its own podCIDR, subnet.env, every flannel route programmed), and no
    // node-to-node mesh in flannel mode: flanneld nodes speak no BGP.
    let status = loop {
        let (ok, out) = ns.exec(
            env!("CARGO_BIN_EXE_podroute"),
            &[
                "status",
                "--agent",
                "http://127.0.0.1:9091",
                "--output",
                "json",
            ],
        );
        let status: Option<podroute::agent::status::AgentStatus> =
            ok.then(|| serde_json::from_str(&out).ok()).flatten();
        match status {
            Some(s) if s.health.ready => break s,
            other if Instant::now() > deadline => panic!("not ready: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(status.peers.is_empty(), "{:?}", status.peers);
}

/// flannel mode with a `BGPPeer` (a ToR, BIRD 2 here): the node announces its own podCIDR
/// and nothing else (not the other nodes' podCIDRs it routes through the overlay).
#[test]
fn flannel_mode_announces_its_podcidr_to_a_bgppeer() {
    use netns::{Netns, can_run, veth};
    if !can_run("flannel_mode_announces_its_podcidr_to_a_bgppeer") {
        return;
    }
    let bird_ok = Command::new("bird")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stderr.is_empty());
    if !bird_ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "BIRD 2 (`bird`, `birdc`) is needed; install bird2 (tests/run.sh does)"
        );
        eprintln!("SKIP: no bird");
        return;
    }
    let node = Netns::new("flannel-bgp");
    let tor = Netns::new("flannel-tor");
    veth(
        &node,
        "eth0",
        "192.168.0.39/26",
        &tor,
        "eth0",
        "192.168.0.50/26",
    );

    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write(&datastore, "kube-flannel.yml", KUBE_FLANNEL_YML);
    write(
        &datastore,
        "nodes.yaml",
        &seed000_nodes("0e:61:06:ff:7a:73"),
    );
    write(
        &datastore,
        "tor.yaml",
        "apiVersion: crd.projectcalico.org/v1\nkind: BGPPeer\nmetadata:\n  name: tor\nspec:\n  \
         peerIP: 192.168.0.50\n  asNumber: 65001\n",
    );
    let conf = dir.path().join("bird.conf");
    let socket = dir.path().join("bird.ctl");
    std::fs::write(
        &conf,
        format!(
            "log \"{}\" all;\nrouter id 192.168.0.50;\nprotocol device {{ scan time 2; }}\n\
             protocol bgp master {{\n  local 192.168.0.50 as 65001;\n  neighbor 192.168.0.39 \
             as 64512;\n  direct;\n  hold time 9;\n  connect delay time 1;\n  connect retry \
             time 1;\n  error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n",
            dir.path().join("bird.log").display()
        ),
    )
    .unwrap();
    let _bird = Agent(
        Command::new("ip")
            .args(["netns", "exec", &tor.name, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird starts"),
    );
    let log_path = dir.path().join("agent.log");
    let _agent = Agent(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.name,
                env!("CARGO_BIN_EXE_podroute"),
                "agent",
            ])
            .args(["--nodename", "master", "--model", "flannel"])
            .args([
                "--ip",
                "192.168.0.39/26",
                "--nic",
                "eth0",
                "--connect-retry",
                "1s",
            ])
            .arg("--datastore-type")
            .arg(format!("dir:{}", datastore.display()))
            .arg("--flannel-subnet-file")
            .arg(dir.path().join("subnet.env"))
            .args(["--metrics-addr", "127.0.0.1:9091"])
            .env_remove("IP")
            .env_remove("PODROUTE_MODEL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("podroute agent starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let learned = loop {
        let (_, out) = tor.exec(
            "birdc",
            &[
                "-s",
                socket.to_str().unwrap(),
                "show",
                "route",
                "protocol",
                "master",
            ],
        );
        let prefixes: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.contains('/'))
            .map(str::to_string)
            .collect();
        if !prefixes.is_empty() {
            break (prefixes, out);
        }
        if Instant::now() > deadline {
            panic!(
                "BIRD learned nothing: {out}\n--- agent log\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(learned.0, ["10.244.0.0/24"], "{}", learned.1);
    assert!(learned.1.contains("via 192.168.0.39"), "{}", learned.1);
}

/// A pod namespace behind the node's `cni0` bridge, as the flannel CNI plugin (bridge + host
///-local IPAM) makes it: `eth0` with `addr` in the node's podCIDR, default via the bridge.
fn flannel_pod(node: &netns::Netns, tag: &str, bridge_addr: &str, addr: &str) -> netns::Netns {
    let pod = netns::Netns::new(tag);
    node.ip(&["link", "add", "cni0", "type", "bridge"]);
    node.ip(&["addr", "add", bridge_addr, "dev", "cni0"]);
    node.ip(&["link", "set", "cni0", "up"]);
    node.ip(&[
        "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", "veth-pod", "master", "cni0", "up"]);
    pod.ip(&["addr", "add", addr, "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    let gateway = bridge_addr.split('/').next().unwrap();
    pod.ip(&["route", "add", "default", "via", gateway]);
    node.sysctl("net.ipv4.ip_forward=1");
    pod
}

/// Makes a node's VXLAN device and VTEP entries with `ip`/`bridge`, as flanneld makes them
/// (no alias, neighbours without a protocol, FDB entries appended). For the flanneld nodes
/// of the mixed cluster, and for a podroute node's state before its migration from flanneld;
/// never for a node where podroute runs already: there the agent makes them itself.
fn program_vteps(ns: &netns::Netns, tunnels: &podroute::plan::tunnels::TunnelPlan, mtu: u32) {
    for d in &tunnels.vxlan {
        let (vni, port, local) = (d.vni.to_string(), d.port.to_string(), d.local.to_string());
        ns.ip(&[
            "link",
            "add",
            &d.name,
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &local,
            "dev",
            &d.parent,
            "dstport",
            &port,
            "nolearning",
        ]);
        let (mac, mtu) = (d.mac.to_string(), mtu.to_string());
        ns.ip(&["link", "set", &d.name, "address", &mac, "mtu", &mtu, "up"]);
        if let Some(address) = d.address {
            ns.ip(&["addr", "add", &address.to_string(), "dev", &d.name]);
        }
    }
    for p in &tunnels.vxlan_peers {
        let (ip, mac, dst) = (
            p.tunnel_ip.to_string(),
            p.mac.to_string(),
            p.underlay.to_string(),
        );
        ns.ip(&[
            "neigh",
            "add",
            &ip,
            "lladdr",
            &mac,
            "dev",
            &p.device,
            "nud",
            "permanent",
        ]);
        let (ok, out) = ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                &p.device,
                "dst",
                &dst,
                "self",
                "permanent",
            ],
        );
        assert!(ok, "bridge fdb append: {out}");
    }
}

/// TCP from `client` to `addr` in `server`'s namespace and back.
fn tcp_echo(server: &netns::Netns, client: &netns::Netns, addr: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = server
        .run(move || TcpListener::bind(addr))
        .map_err(|e| format!("bind {addr}: {e}"))?;
    // Left blocked in accept if the client never connects (the test fails anyway).
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    });
    client.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"hello").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).map_err(|e| format!("echo: {e}"))?;
        (&buf == b"hello")
            .then_some(())
            .ok_or_else(|| format!("echoed {buf:?}"))
    })
}

/// The mixed cluster's two nodes: node1 configured exactly as flanneld configures it
/// (device, neighbour and FDB entries and route by `ip`/`bridge`, annotations as flanneld
/// writes them), master to run `podroute agent --model flannel`; a pod behind each node's
/// `cni0`. `None`: the kernel has no vxlan module (skipped outside CI).
struct Mixed {
    master: netns::Netns,
    node1: netns::Netns,
    pod_a: netns::Netns,
    pod_b: netns::Netns,
    dir: tempfile::TempDir,
    /// What podroute plans for master (for the checks, and for flanneld's state before a
    /// migration).
    master_plan: podroute::plan::flannel::FlannelPlan,
}

const MASTER_MAC: &str = "fe:be:87:93:06:e2";
const NODE1_MAC: &str = "0e:61:06:ff:7a:73";

fn mixed_cluster(tag: &str) -> Option<Mixed> {
    use netns::{Netns, veth};
    let master = Netns::new(&format!("{tag}-master"));
    let node1 = Netns::new(&format!("{tag}-node1"));
    veth(
        &master,
        "eth0",
        "192.168.0.39/26",
        &node1,
        "eth0",
        "192.168.0.22/26",
    );
    let (ok, out) = node1.try_ip(&[
        "link", "add", "probe-vx", "type", "vxlan", "id", "9", "dstport", "8472",
    ]);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the kernel's vxlan module is needed: {out}"
        );
        eprintln!("SKIP: no vxlan device: {out}");
        return None;
    }
    node1.ip(&["link", "del", "probe-vx"]);
    let pod_a = flannel_pod(
        &master,
        &format!("{tag}-pod-a"),
        "10.244.0.1/24",
        "10.244.0.2/24",
    );
    let pod_b = flannel_pod(
        &node1,
        &format!("{tag}-pod-b"),
        "10.244.1.1/24",
        "10.244.1.2/24",
    );

    let dir = tempfile::tempdir().unwrap();
    let datastore = dir.path().join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    write(&datastore, "kube-flannel.yml", KUBE_FLANNEL_YML);
    let nodes = [
        node_yaml("master", "192.168.0.39", "10.244.0.0/24", MASTER_MAC),
        node_yaml("node1", "192.168.0.22", "10.244.1.0/24", NODE1_MAC),
    ];
    write(&datastore, "nodes.yaml", &nodes.join("---\n"));

    let conf = podroute::model::flannel::NetConf::parse(
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let lease = |text: &str| -> podroute::model::flannel::FlannelNode {
        let node: k8s_openapi::api::core::v1::Node = serde_yaml_ng::from_str(text).unwrap();
        podroute::model::flannel::FlannelNode::from_node(&node)
            .unwrap()
            .unwrap()
    };
    let (master_lease, node1_lease) = (lease(&nodes[0]), lease(&nodes[1]));
    let mac = |m: &str| m.parse().unwrap();
    let local = |name: &str, ip: &str, own: &podroute::model::flannel::FlannelNode| {
        podroute::plan::flannel::FlannelLocal {
            name: name.into(),
            nic: "eth0".into(),
            ipv4: Some(ip.parse().unwrap()),
            ipv6: None,
            vtep_mac: own.vtep_mac.unwrap(),
            vtep_mac_v6: mac("02:00:00:00:00:06"),
            lease: Some(own.clone()),
        }
    };
    // node1, as flanneld leaves it (seed 000's node1 tables).
    let node1_plan = podroute::plan::flannel::plan(
        &local("node1", "192.168.0.22/26", &node1_lease),
        &conf,
        [("master", Some(Ok(&master_lease)))],
    );
    program_vteps(&node1, &node1_plan.tunnels, 1450);
    node1.ip(&[
        "route",
        "add",
        "10.244.0.0/24",
        "via",
        "10.244.0.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    let master_plan = podroute::plan::flannel::plan(
        &local("master", "192.168.0.39/26", &master_lease),
        &conf,
        [("node1", Some(Ok(&node1_lease)))],
    );
    Some(Mixed {
        master,
        node1,
        pod_a,
        pod_b,
        dir,
        master_plan,
    })
}

impl Mixed {
    /// `podroute agent --model flannel` in master's namespace, and its log's path.
    fn start_agent(&self) -> (Agent, std::path::PathBuf) {
        let log_path = self.dir.path().join("agent.log");
        let agent = Agent(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.master.name,
                    env!("CARGO_BIN_EXE_podroute"),
                    "agent",
                ])
                .args(["--nodename", "master", "--model", "flannel"])
                .args(["--ip", "192.168.0.39/26", "--nic", "eth0"])
                .arg("--datastore-type")
                .arg(format!(
                    "dir:{}",
                    self.dir.path().join("datastore").display()
                ))
                .arg("--flannel-subnet-file")
                .arg(self.dir.path().join("subnet.env"))
                .args(["--metrics-addr", "127.0.0.1:9091"])
                .env_remove("IP")
                .env_remove("PODROUTE_MODEL")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .expect("podroute agent starts"),
        );
        (agent, log_path)
    }

    /// Master's `flannel.1`, neighbour and FDB entries as the kernel shows them: what the
    /// plan lacks (the lab's check) and the texts.
    fn master_vtep(&self) -> (Vec<String>, [String; 4]) {
        let show = |args: &[&str]| self.master.exec(args[0], &args[1..]).1;
        let texts = [
            show(&["ip", "-d", "link", "show", "flannel.1"]),
            show(&["ip", "-4", "addr", "show", "dev", "flannel.1"]),
            show(&["ip", "neigh", "show", "dev", "flannel.1"]),
            show(&["bridge", "fdb", "show", "dev", "flannel.1"]),
        ];
        let missing = podroute::lab::flannel::vtep_mismatches(
            &self.master_plan,
            1450,
            &texts[0],
            &texts[1],
            &texts[2],
            &texts[3],
        );
        (missing, texts)
    }

    /// Waits until master's kernel holds podroute's whole plan: the device and entries, and
    /// the route (podroute's, or flanneld's identical one where it was there before).
    fn wait_master_programmed(&self, log_path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (missing, texts) = self.master_vtep();
            let routes = self.master.all_routes();
            let routed = routes.iter().any(|r| {
                r.starts_with("10.244.1.0/24 via 10.244.1.0 dev flannel.1") && r.contains("onlink")
            });
            if missing.is_empty() && routed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "master not programmed: missing {missing:?}, routes {routes:?}\n{}\n--- log\n{}",
                texts.join("\n"),
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn flannel1_ifindex(&self) -> String {
        let text = self.master.ip(&["-o", "link", "show", "flannel.1"]);
        text.split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// The mixed cluster: node1 is configured exactly as flanneld configures it; master runs
/// `podroute agent --model flannel`, which makes master's `flannel.1`, its neighbour and FDB
/// entries and its route by itself. Pod to pod: ping and TCP both ways, and the packets on
/// the wire are VXLAN, UDP 8472, VNI 1.
#[test]
fn mixed_cluster_flanneld_node_and_podroute_node_pass_traffic() {
    use netns::{can_ping, can_run};
    const TEST: &str = "mixed_cluster_flanneld_node_and_podroute_node_pass_traffic";
    if !can_run(TEST) || !can_ping(TEST) {
        return;
    }
    let Some(m) = mixed_cluster("fl-mix") else {
        return;
    };
    // Nothing of flannel.1 on master before the agent.
    assert!(!m.master.try_ip(&["link", "show", "flannel.1"]).0);
    let (_agent, log_path) = m.start_agent();
    m.wait_master_programmed(&log_path);
    assert_eq!(
        m.master.routes(podroute::dataplane::DEFAULT_ROUTE_PROTOCOL),
        ["10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink"]
    );
    // The device and its entries, as `ip`/`bridge` print them, equal the plan.
    let (_, [link, addr, neigh, fdb]) = m.master_vtep();
    let link_words: Vec<&str> = link.split_whitespace().collect();
    for pair in [
        ["mtu", "1450"],
        ["link/ether", MASTER_MAC],
        ["id", "1"],
        ["local", "192.168.0.39"],
        ["dev", "eth0"],
        ["dstport", "8472"],
    ] {
        assert!(link_words.windows(2).any(|w| w == pair), "{pair:?}: {link}");
    }
    assert!(link_words.contains(&"nolearning"), "{link}");
    assert!(addr.contains("inet 10.244.0.0/32 "), "{addr}");
    let neigh = lines(&neigh);
    assert_eq!(neigh.len(), 1, "{neigh:?}");
    assert!(
        neigh[0].starts_with(&format!("10.244.1.0 lladdr {NODE1_MAC} PERMANENT")),
        "{neigh:?}"
    );
    assert_eq!(
        lines(&fdb),
        [format!("{NODE1_MAC} dst 192.168.0.22 self permanent")]
    );

    // The wire, on node1's NIC: VXLAN on UDP 8472 with VNI 1.
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &m.node1.name,
            "tcpdump",
            "-nn",
            "-l",
            "-c",
            "2",
            "-i",
            "eth0",
        ])
        // 8472 is OTV's port to tcpdump; flannel's VXLAN uses it.
        .args(["-T", "vxlan", "udp", "port", "8472"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    std::thread::sleep(Duration::from_millis(500));

    let (ok, out) = m.pod_a.ping("10.244.1.2");
    assert!(ok, "pod A (podroute node) -> pod B (flanneld node): {out}");
    let (ok, out) = m.pod_b.ping("10.244.0.2");
    assert!(ok, "pod B (flanneld node) -> pod A (podroute node): {out}");
    tcp_echo(&m.pod_b, &m.pod_a, "10.244.1.2:8080").expect("TCP pod A -> pod B");
    tcp_echo(&m.pod_a, &m.pod_b, "10.244.0.2:8080").expect("TCP pod B -> pod A");

    match capture {
        Ok(mut child) => {
            let wire_deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < wire_deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("VXLAN") && text.contains("vni 1"),
                "no VXLAN VNI 1 on the wire: {text}"
            );
            assert!(text.contains(".8472"), "{text}");
        }
        Err(e) => assert!(
            std::env::var_os("CI").is_none(),
            "tcpdump is needed for the capture: {e}"
        ),
    }
}

/// A node migrating from flanneld: master's `flannel.1` (VNI 1, port 8472, its VtepMAC),
/// neighbour and FDB entries and route are flanneld's, pods talk through them; podroute
/// starts there and adopts the device (same ifindex, not recreated) and the entries, while a
/// pod pings across without losing a reply.
#[test]
fn a_node_migrating_from_flanneld_is_adopted_without_loss() {
    use netns::{can_ping, can_run};
    const TEST: &str = "a_node_migrating_from_flanneld_is_adopted_without_loss";
    if !can_run(TEST) || !can_ping(TEST) {
        return;
    }
    let Some(m) = mixed_cluster("fl-mig") else {
        return;
    };
    // flanneld ran on master: its device, entries and route.
    program_vteps(&m.master, &m.master_plan.tunnels, 1450);
    m.master.ip(&[
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "10.244.1.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    let (ok, out) = m.pod_a.ping("10.244.1.2");
    assert!(
        ok,
        "flanneld's own tables carry traffic before the migration: {out}"
    );
    let before = m.flannel1_ifindex();
    assert!(!before.is_empty());

    // A pod pings node1's pod all through the agent's start (the lab's ICMP echo: one
    // request every 50 ms, each answered within a second).
    let pinger = {
        let ns = m.pod_a.name.clone();
        std::thread::spawn(move || {
            podroute::lab::echo(
                &ns,
                "10.244.1.2".parse().unwrap(),
                120,
                Duration::from_millis(50),
                Duration::from_secs(1),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (_agent, log_path) = m.start_agent();
    m.wait_master_programmed(&log_path);
    let report = pinger.join().unwrap().expect("the echo runs");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        report.all_answered(),
        "replies lost while podroute took over: {}\n--- log\n{log}",
        report.summary()
    );
    assert_eq!(
        m.flannel1_ifindex(),
        before,
        "flannel.1 was recreated\n{log}"
    );
    assert!(!log.contains("recreating"), "{log}");
    // The entries are podroute's now: the neighbour carries its protocol (so it goes when
    // node1 leaves the plan), and there is one FDB entry per VTEP.
    let ours = m
        .master
        .ip(&["neigh", "show", "dev", "flannel.1", "proto", "157"]);
    assert!(ours.contains("10.244.1.0"), "neighbour not adopted: {ours}");
    let (_, fdb) = m
        .master
        .exec("bridge", &["fdb", "show", "dev", "flannel.1"]);
    assert_eq!(
        lines(&fdb),
        [format!("{NODE1_MAC} dst 192.168.0.22 self permanent")]
    );
    // Traffic both ways still passes.
    let (ok, out) = m.pod_b.ping("10.244.0.2");
    assert!(ok, "pod B -> pod A after the migration: {out}");
    tcp_echo(&m.pod_a, &m.pod_b, "10.244.0.2:8080").expect("TCP pod B -> pod A");
}

/// `podroute lab --model flannel`, as a user runs it: seed 000's three nodes, each with its
/// agent; every route, `flannel.1` and VTEP entry checked against the kernel, pods pinging
/// across nodes through `flannel.1`; exit 0 only when all of it passes.
#[test]
fn lab_model_flannel_passes_routes_vteps_and_pod_pings() {
    use netns::can_run;
    const TEST: &str = "lab_model_flannel_passes_routes_vteps_and_pod_pings";
    if !can_run(TEST) {
        return;
    }
    {
        let probe = netns::Netns::new("fl-lab-probe");
        let (ok, out) = probe.try_ip(&[
            "link", "add", "probe-vx", "type", "vxlan", "id", "9", "dstport", "8472",
        ]);
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "the kernel's vxlan module is needed: {out}"
            );
            eprintln!("SKIP: no vxlan device: {out}");
            return;
        }
    }
    let prefix = format!("fl{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_podroute"))
        .args(["lab", "--model", "flannel", "--prefix", &prefix])
        .output()
        .expect("podroute lab runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(!stdout.contains("N/A"), "{stdout}");
    let count = |what: &str| {
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(what))
            .count()
    };
    assert_eq!(
        count("PASS  kernel routes equal the plan (2 through flannel.1)"),
        3,
        "{stdout}"
    );
    assert_eq!(count("PASS  flannel.1 (VNI"), 3, "{stdout}");
    // Every pod to both other nodes' pods.
    assert_eq!(count("PASS  ping pod"), 6, "{stdout}");
    // Nothing is left behind.
    assert!(
        podroute::lab::namespaces_with_prefix(&format!("{prefix}-")).is_empty(),
        "namespaces left"
    );
}

/// The kubernetes datastore: podroute in flannel mode writes its Node's annotations again
/// when they go stale after the start (here: someone sets a wrong `public-ip`), so flanneld
/// nodes keep reaching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_annotations_are_rewritten_when_they_go_stale() {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use netns::{Netns, can_run, veth};
    use support::apiserver::FakeApiServer;
    const TEST: &str = "flannel_annotations_are_rewritten_when_they_go_stale";
    if !can_run(TEST) {
        return;
    }
    let master = Netns::new("fl-ann-master");
    let other = Netns::new("fl-ann-other");
    veth(
        &master,
        "eth0",
        "192.168.0.39/26",
        &other,
        "eth0",
        "192.168.0.22/26",
    );
    // The API server listens inside master's namespace, where the agent runs.
    let listener = master
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let server = FakeApiServer::start_with(listener);
    server.serve::<Node>();
    server.serve::<Service>();
    server.serve::<EndpointSlice>();
    let node = |public_ip: &str| -> Node {
        serde_yaml_ng::from_str(&node_yaml("master", public_ip, "10.244.0.0/24", MASTER_MAC))
            .unwrap()
    };
    server.apply(&node("192.168.0.39"));
    let dir = tempfile::tempdir().unwrap();
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(
        &net_conf,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    \
             server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  \
             context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            server.addr()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let _agent = Agent(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &master.name,
                env!("CARGO_BIN_EXE_podroute"),
                "agent",
            ])
            .args(["--nodename", "master", "--model", "flannel"])
            .args(["--ip", "192.168.0.39/26", "--nic", "eth0"])
            .args(["--datastore-type", "kubernetes"])
            .arg("--flannel-net-conf")
            .arg(&net_conf)
            .arg("--flannel-subnet-file")
            .arg(dir.path().join("subnet.env"))
            .args(["--metrics-addr", "127.0.0.1:9091"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("IP")
            .env_remove("PODROUTE_MODEL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("podroute agent starts"),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let public_ip = || {
        server
            .get_json::<Node>("master")
            .and_then(|n| {
                n["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    // Started and planned: subnet.env written; the annotations were right, nothing patched.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("subnet.env").exists() {
        assert!(Instant::now() < deadline, "agent not started\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Patches of flannel's annotations (the Calico address annotation and the node
    // condition are patched too).
    let flannel_patches = || -> Vec<serde_json::Value> {
        server
            .patches::<Node>()
            .into_iter()
            .filter(|p| {
                p["metadata"]["annotations"]
                    .as_object()
                    .is_some_and(|a| a.keys().any(|k| k.starts_with("flannel.alpha.coreos.com/")))
            })
            .collect()
    };
    assert_eq!(flannel_patches(), Vec::<serde_json::Value>::new());

    // Someone (a stale flanneld, a script) writes another public-ip: podroute corrects it.
    server.apply(&node("192.168.0.99"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while public_ip() != "192.168.0.39" {
        assert!(
            Instant::now() < deadline,
            "public-ip not re-written: {:?}\n{}",
            public_ip(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log().contains("flannel node annotations re-written"),
        "{}",
        log()
    );
    let patches = flannel_patches();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(
        patches[0]["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"], "192.168.0.39",
        "{patches:?}"
    );
}
