//! `manifests/` deploys the agent the code actually is: every env var is one of the agent's
//! flags and parses, the probes and ports match the HTTP server's address, the RBAC rules
//! cover everything the datastore watches, and the example IPPool passes the model's
//! validation. The Dockerfile runs what the DaemonSet expects, the Grafana dashboard and the
//! alert rules query only exported metrics, and README.md's flag table and metric list match
//! the code. (tests/prometheus.rs runs the alerts and the dashboard in a real Prometheus.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Args as _, FromArgMatches as _};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Probe};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use podroute::agent::AgentArgs;
use podroute::agent::config::DEFAULT_METRICS_ADDR;
use podroute::model::crd::{BGPConfiguration, BGPPeer, BlockAffinity, IPAMBlock, IPPool};
use podroute::model::{EncapMode, Kind, Object, Pool, decode_documents};
use serde_json::Value;

const NAMESPACE: &str = "podroute-system";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// File names of the YAML files directly in `manifests/`, sorted.
fn yaml_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    names
}

fn read(file: &str) -> String {
    let path = manifests_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-empty YAML document of one file.
fn documents(file: &str) -> Vec<Value> {
    let text = read(file);
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document)
            .unwrap_or_else(|e| panic!("manifests/{file} is not valid YAML: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

/// Every Kubernetes object in `manifests/` (kustomization.yaml is not one), with its file.
fn objects() -> Vec<(String, Value)> {
    yaml_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml")
        .flat_map(|f| documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

/// The one object of `kind`, converted to its typed form.
fn the<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let found: Vec<Value> = objects()
        .into_iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in manifests/");
    serde_json::from_value(found.into_iter().next().unwrap())
        .unwrap_or_else(|e| panic!("the {kind} in manifests/ does not match its schema: {e}"))
}

fn daemonset() -> DaemonSet {
    the("DaemonSet")
}

/// The pod's containers by name: the agent (`podroute`) and the userspace IPIP forwarder
/// (`ipip-forwarder`), nothing else.
fn containers() -> BTreeMap<String, Container> {
    let ds = daemonset();
    let containers: BTreeMap<String, Container> = ds
        .spec
        .template
        .spec
        .unwrap()
        .containers
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    assert_eq!(
        containers.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ipip-forwarder", "podroute"],
        "the DaemonSet runs the agent and the IPIP forwarder, each in its own container"
    );
    containers
}

fn agent_container() -> Container {
    containers().remove("podroute").unwrap()
}

fn forwarder_container() -> Container {
    containers().remove("ipip-forwarder").unwrap()
}

/// `podroute agent`'s arguments as clap defines them.
fn agent_command() -> clap::Command {
    AgentArgs::augment_args(clap::Command::new("agent").no_binary_name(true))
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not an address:port: {e}"))
        .port()
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn container_port(container: &Container, name: &str) -> ContainerPort {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .cloned()
        .unwrap_or_else(|| panic!("the container has no port named {name:?}"))
}

/// The port number an httpGet probe connects to (numbers and port names both resolve).
fn probe_target(container: &Container, probe: &Option<Probe>, what: &str) -> (String, i32) {
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .unwrap_or_else(|| panic!("{what} is not an httpGet probe"));
    let port = match get.port {
        IntOrString::Int(n) => n,
        IntOrString::String(name) => container_port(container, &name).container_port,
    };
    (get.path.unwrap_or_default(), port)
}

#[test]
fn every_document_is_a_named_object_in_the_podroute_namespace() {
    let objects = objects();
    assert!(!objects.is_empty());
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "IPPool",
    ];
    for (file, obj) in &objects {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            !api_version.is_empty() && !kind.is_empty() && !name.is_empty(),
            "manifests/{file}: a document lacks apiVersion, kind or metadata.name: {obj}"
        );
        let namespace = obj["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&kind) {
            assert_eq!(
                namespace, None,
                "manifests/{file}: {kind} {name} is cluster-scoped"
            );
        } else {
            assert_eq!(
                namespace,
                Some(NAMESPACE),
                "manifests/{file}: {kind} {name} belongs in {NAMESPACE}"
            );
        }
    }
    let namespaces: Vec<&str> = objects
        .iter()
        .filter(|(_, o)| o["kind"] == "Namespace")
        .filter_map(|(_, o)| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(namespaces, [NAMESPACE]);
}

#[test]
fn daemonset_env_vars_are_agent_flags_and_parse() {
    let container = agent_container();
    let command = agent_command();
    let by_env: BTreeMap<String, &clap::Arg> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_string_lossy().into_owned(), a)))
        .collect();
    let mut argv = Vec::new();
    for var in container.env.iter().flatten() {
        let Some(arg) = by_env.get(&var.name) else {
            panic!(
                "DaemonSet env {} is not a `podroute agent` flag; known: {:?}",
                var.name,
                by_env.keys().collect::<Vec<_>>()
            );
        };
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            // spec.nodeName: any node name will do for parsing.
            (None, Some(_)) => "node01".to_string(),
            _ => panic!("env {} needs exactly one of value, valueFrom", var.name),
        };
        let long = arg.get_long().expect("every agent flag has a long name");
        argv.push(format!("--{long}={value}"));
    }
    // The values as the agent would take them from the environment.
    let matches = command
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("the DaemonSet's env does not parse: {e}"));
    let args = AgentArgs::from_arg_matches(&matches).unwrap();
    assert_eq!(args.nodename.as_deref(), Some("node01"));
    assert_eq!(args.datastore_type, "kubernetes");
    assert_eq!(args.ip, "autodetect");
    assert_eq!(
        args.ipip_forwarder,
        podroute::dataplane::ipip_user::process::ForwarderOwner::External,
        "the forwarder is the pod's other container: the agent must not start its own"
    );

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODENAME")
        .and_then(|e| e.value_from.clone())
        .and_then(|v| v.field_ref)
        .map(|f| f.field_path);
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
}

#[test]
fn probes_and_metrics_port_are_the_agents_http_server() {
    let container = agent_container();
    let env_addr = env_value(&container, "PODROUTE_METRICS_ADDR")
        .expect("the DaemonSet sets PODROUTE_METRICS_ADDR");
    let port = port_of(&env_addr);
    assert_eq!(
        port,
        port_of(DEFAULT_METRICS_ADDR),
        "the DaemonSet moves the metrics port away from the agent's default"
    );
    assert_eq!(
        container_port(&container, "metrics").container_port,
        i32::from(port)
    );
    let live = probe_target(&container, &container.liveness_probe, "livenessProbe");
    let ready = probe_target(&container, &container.readiness_probe, "readinessProbe");
    assert_eq!(live, ("/livez".to_string(), i32::from(port)));
    assert_eq!(ready, ("/readyz".to_string(), i32::from(port)));

    let annotations = daemonset()
        .spec
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some(port.to_string().as_str())
    );
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
}

#[test]
fn daemonset_runs_in_the_host_network_with_only_the_capabilities_it_needs() {
    let ds = daemonset();
    let pod = ds.spec.clone().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "the agent must run on every node, whatever its taints"
    );

    let container = agent_container();
    assert_eq!(container.args, Some(vec!["agent".to_string()]));
    assert_eq!(
        container.image.as_deref(),
        Some(format!("podroute:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the image tag is the crate version"
    );
    let security = container.security_context.clone().unwrap_or_default();
    assert_ne!(
        security.privileged,
        Some(true),
        "not a privileged container"
    );
    let caps = security.capabilities.unwrap_or_default();
    let added: BTreeSet<String> = caps.add.into_iter().flatten().collect();
    for needed in ["NET_ADMIN", "NET_RAW"] {
        assert!(added.contains(needed), "capability {needed} is not added");
    }
    // BGP listens on port 179; with every default capability dropped, binding a port below
    // 1024 needs NET_BIND_SERVICE back.
    let bgp = container_port(&container, "bgp").container_port;
    assert_eq!(
        bgp,
        i32::from(podroute::model::bgp::DEFAULT_LISTEN_PORT),
        "BGPConfiguration listenPort default"
    );
    if caps.drop.iter().flatten().any(|c| c == "ALL") && bgp < 1024 {
        assert!(
            added.contains("NET_BIND_SERVICE"),
            "all capabilities are dropped, so the BGP listener on {bgp} needs NET_BIND_SERVICE"
        );
    }

    let update = ds.spec.update_strategy.unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        update.rolling_update.unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
}

/// Group and plural of every kind the datastore watches, from the types it watches.
fn watched_resources() -> Vec<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    Kind::ALL
        .iter()
        .map(|kind| match kind {
            Kind::Node => of::<k8s_openapi::api::core::v1::Node>(),
            Kind::IPPool => of::<IPPool>(),
            Kind::IPAMBlock => of::<IPAMBlock>(),
            Kind::BlockAffinity => of::<BlockAffinity>(),
            Kind::BGPPeer => of::<BGPPeer>(),
            Kind::BGPConfiguration => of::<BGPConfiguration>(),
            Kind::BGPFilter => of::<podroute::model::crd::BGPFilter>(),
            Kind::Service => of::<k8s_openapi::api::core::v1::Service>(),
            Kind::EndpointSlice => of::<k8s_openapi::api::discovery::v1::EndpointSlice>(),
        })
        .collect()
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    let any = |list: &Option<Vec<String>>, want: &str| {
        list.iter().flatten().any(|x| x == want || x == "*")
    };
    rules.iter().any(|r| {
        any(&r.api_groups, group)
            && any(&r.resources, resource)
            && r.verbs.iter().any(|v| v == verb || v == "*")
            && r.resource_names.as_ref().is_none_or(|n| n.is_empty())
    })
}

#[test]
fn cluster_role_covers_what_the_datastore_reads_and_is_bound_to_the_agent() {
    let role: ClusterRole = the("ClusterRole");
    let rules = role.rules.clone().unwrap_or_default();
    let watched = watched_resources();
    assert_eq!(watched.len(), 9);
    for (group, plural) in &watched {
        for verb in ["get", "list", "watch"] {
            assert!(
                allows(&rules, group, plural, verb),
                "ClusterRole {:?} does not allow {verb} on {group:?} {plural}",
                role.metadata.name
            );
        }
    }
    // Exactly the writes the code makes: the node annotations (unless --no-annotate,
    // src/agent/annotate.rs and src/datastore/tunnel_ipam.rs), the NetworkUnavailable
    // condition (src/datastore/node_condition.rs, a patch of nodes/status), and the tunnel
    // address in IPAM (src/datastore/tunnel_ipam.rs: a compare-and-swap `replace` of the
    // node's IPAMBlock; get, create and delete of its IPAMHandle).
    let writes: &[(&str, &str, &str)] = &[
        ("", "nodes", "patch"),
        ("", "nodes/status", "patch"),
        ("crd.projectcalico.org", "ipamblocks", "update"),
        ("crd.projectcalico.org", "ipamhandles", "get"),
        ("crd.projectcalico.org", "ipamhandles", "create"),
        ("crd.projectcalico.org", "ipamhandles", "delete"),
    ];
    for (group, resource, verb) in writes {
        assert!(
            allows(&rules, group, resource, verb),
            "ClusterRole does not allow {verb} on {group:?} {resource}"
        );
    }
    let tunnel_ipam = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/datastore/tunnel_ipam.rs"),
    )
    .unwrap();
    for call in [".replace(", ".create(", ".delete(", ".get_opt("] {
        assert!(
            tunnel_ipam.contains(call),
            "tunnel_ipam.rs no longer calls {call}"
        );
    }
    for call in [".patch(", ".patch_status("] {
        assert!(
            !tunnel_ipam.contains(&format!("blocks{call}")),
            "tunnel_ipam.rs patches a block: grant it"
        );
    }
    let condition = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/datastore/node_condition.rs"),
    )
    .unwrap();
    assert!(condition.contains(".patch_status("));
    // Nothing more on the Calico objects: no other create/update/patch/delete, so pools,
    // affinities, peers and blocks (beyond the tunnel allocation's update) are never changed.
    let granted =
        |group: &str, resource: &str, verb: &str| writes.contains(&(group, resource, verb));
    for (group, plural) in watched.iter().filter(|(g, _)| !g.is_empty()) {
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(
                granted(group, plural, verb) || !allows(&rules, group, plural, verb),
                "{verb} on {plural}"
            );
        }
    }
    for verb in ["list", "watch", "update", "patch", "deletecollection"] {
        assert!(
            !allows(&rules, "crd.projectcalico.org", "ipamhandles", verb),
            "{verb} on ipamhandles is not needed"
        );
    }
    assert!(!allows(&rules, "", "nodes", "update"));
    assert!(!allows(&rules, "", "nodes/status", "update"));

    let ds = daemonset();
    let account = ds
        .spec
        .template
        .spec
        .unwrap()
        .service_account_name
        .expect("the DaemonSet names its ServiceAccount");
    let sa: k8s_openapi::api::core::v1::ServiceAccount = the("ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some(account.as_str()));
    assert_eq!(
        ds.metadata.namespace.as_deref(),
        sa.metadata.namespace.as_deref()
    );

    let binding: ClusterRoleBinding = the("ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert!(binding.subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(NAMESPACE)
    }));
}

#[test]
fn bgp_password_secrets_are_readable_in_the_agents_namespace_only() {
    let role: Role = the("Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert!(allows(
        &role.rules.clone().unwrap_or_default(),
        "",
        "secrets",
        "get"
    ));
    let cluster: ClusterRole = the("ClusterRole");
    assert!(
        !allows(&cluster.rules.unwrap_or_default(), "", "secrets", "get"),
        "Secrets are granted in {NAMESPACE} only"
    );
    let binding: RoleBinding = the("RoleBinding");
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        (binding.role_ref.kind.as_str(), Some(&binding.role_ref.name)),
        ("Role", role.metadata.name.as_ref())
    );
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount" && s.name == "podroute")
    );
}

#[test]
fn kustomization_lists_every_manifest_but_the_example_pool_and_the_alerts() {
    let docs = documents("kustomization.yaml");
    assert_eq!(docs.len(), 1);
    let k = &docs[0];
    assert_eq!(k["kind"], "Kustomization");
    let resources: Vec<String> = k["resources"]
        .as_array()
        .expect("kustomization.yaml has resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for r in &resources {
        let path = manifests_dir().join(r);
        assert!(
            path.exists(),
            "kustomization.yaml lists {r}, which does not exist"
        );
        // kustomize loads files only from within its own directory.
        assert!(
            !r.starts_with("..") && !r.starts_with('/'),
            "{r} is outside manifests/; kustomize refuses it by default"
        );
    }
    // alerts.yaml is a PrometheusRule: on a cluster without the Prometheus Operator's CRD,
    // `kubectl apply -k` would fail on it, so it is applied on its own.
    let expected: Vec<String> = yaml_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml" && f != "ippool-default.yaml" && f != "alerts.yaml")
        .collect();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, expected);
}

#[test]
fn example_ippool_is_the_seed_pool_and_passes_validation() {
    let docs = decode_documents(&read("ippool-default.yaml")).unwrap();
    assert_eq!(docs.len(), 1);
    let Ok(Object::IPPool(raw)) = &docs[0] else {
        panic!("ippool-default.yaml is not an IPPool: {:?}", docs[0]);
    };
    let pool = Pool::from_resource(raw).unwrap();
    assert_eq!(pool.name, "default-ipv4-ippool");
    assert_eq!(pool.cidr, "172.16.0.0/16".parse().unwrap());
    assert_eq!(pool.block_size, 26);
    assert_eq!(pool.ipip_mode, EncapMode::Always);
    assert_eq!(pool.vxlan_mode, EncapMode::Never);
    assert!(pool.nat_outgoing);
    assert_eq!(pool.node_selector.as_deref(), Some("all()"));
}

#[test]
fn dockerfile_runs_the_binary_the_daemonset_expects() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .unwrap()
            .replace("\\\n", " ");
    let instruction = |name: &str| -> Vec<String> {
        dockerfile
            .lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|rest| rest.trim().to_string())
            .collect()
    };
    assert_eq!(instruction("ENTRYPOINT "), [r#"["/podroute"]"#]);
    assert_eq!(instruction("CMD "), [r#"["agent"]"#]);
    assert!(
        instruction("RUN ")
            .iter()
            .any(|r| r.contains("--locked") && r.contains("x86_64-unknown-linux-musl")),
        "the image is a static musl build from Cargo.lock"
    );
}

/// The README's flag table, rendered from the agent's clap definition.
fn flag_table() -> String {
    let mut table =
        String::from("| Flag | Environment variable | Default | Meaning |\n|---|---|---|---|\n");
    for arg in agent_command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "—".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let flag = format!("`--{long}`");
        let help = arg
            .get_help()
            .map(|h| h.to_string().replace('\n', " "))
            .unwrap_or_default();
        table.push_str(&format!("| {flag} | {env} | {default} | {help} |\n"));
    }
    table
}

#[test]
fn readme_flag_table_is_the_agents_flags() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table = flag_table();
    assert!(
        readme.contains(&table),
        "README.md's `podroute agent` flag table is out of date; it should read:\n\n{table}"
    );
}

#[test]
fn readme_documents_every_metric() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let names = declared_metrics();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document {missing:?}"
    );
}

/// The declared metric a series name belongs to: itself, or the histogram whose `_bucket`,
/// `_sum` or `_count` series it is.
fn exported_base(name: &str, declared: &[String]) -> Option<String> {
    std::iter::once(name)
        .chain(
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix)),
        )
        .find(|base| declared.iter().any(|d| d == base))
        .map(str::to_string)
}

/// Every metric name in src/metrics.rs, where each is declared as `opts("name", "help")`.
fn declared_metrics() -> Vec<String> {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
            .unwrap();
    let declared = regex::Regex::new(r#"opts\(\s*"([a-z0-9_]+)""#).unwrap();
    let names: Vec<String> = declared
        .captures_iter(&source)
        .map(|c| format!("podroute_{}", &c[1]))
        .collect();
    assert!(names.len() >= 20, "found only {names:?} in src/metrics.rs");
    names
}

#[test]
fn dashboard_queries_only_metrics_the_agent_exports() {
    let text = read("dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let panels = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    let declared = declared_metrics();
    let used = regex::Regex::new(r"podroute_[a-z0-9_]+").unwrap();
    let mut queried = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("every target has a PromQL expr");
            for name in used.find_iter(expr).map(|m| m.as_str()) {
                let base = exported_base(name, &declared).unwrap_or_else(|| {
                    panic!(
                        "panel {:?} queries {name}, which the agent does not export",
                        panel["title"]
                    )
                });
                queried.insert(base);
            }
        }
    }
    for needed in [
        // The totals: the per-peer series are not there beyond --metrics-peer-label-limit.
        "podroute_bgp_peers",
        "podroute_routes_programmed",
        "podroute_convergence_seconds",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn alert_rules_query_only_exported_metrics_and_say_what_to_do() {
    let docs = documents("alerts.yaml");
    assert_eq!(docs.len(), 1, "alerts.yaml holds one PrometheusRule");
    let rule = &docs[0];
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    let declared = declared_metrics();
    let used = regex::Regex::new(r"podroute_[a-z0-9_]+").unwrap();
    let mut alerts = BTreeSet::new();
    let mut watched = BTreeSet::new();
    let groups = rule["spec"]["groups"]
        .as_array()
        .expect("the PrometheusRule has spec.groups");
    for group in groups {
        for r in group["rules"].as_array().expect("every group has rules") {
            let name = r["alert"].as_str().expect("every rule is an alert");
            assert!(name.starts_with("Podroute"), "{name}: alerts are Podroute*");
            assert!(alerts.insert(name.to_string()), "{name} is defined twice");
            let expr = r["expr"].as_str().expect("every alert has an expr");
            for metric in used.find_iter(expr).map(|m| m.as_str()) {
                let base = exported_base(metric, &declared).unwrap_or_else(|| {
                    panic!("{name} queries {metric}, which the agent does not export")
                });
                watched.insert(base);
            }
            assert!(
                used.is_match(expr) || expr.contains("up{"),
                "{name} watches none of the agent's metrics: {expr}"
            );
            let severity = r["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?} is not critical, warning or info"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    r["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| !a.trim().is_empty()),
                    "{name} has no {annotation}"
                );
            }
        }
    }
    // What issue 14 asks to be alerted on.
    for needed in [
        "podroute_bgp_peer_up",
        "podroute_routes_failed",
        "podroute_ready",
        "podroute_datastore_synced",
        "podroute_ipip_drops_total",
        "podroute_netlink_errors_total",
        "podroute_convergence_seconds",
    ] {
        assert!(watched.contains(needed), "no alert watches {needed}");
    }
}

/// Runs `podroute ARGS` and returns (success, stdout + stderr).
fn run_podroute(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_podroute"))
        .args(args)
        .output()
        .expect("running the podroute binary");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The volume mounted at `/dev/net/tun` in `container`, as the pod's hostPath volume.
fn tun_device_volume(container: &Container) -> (String, Option<String>) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/dev/net/tun")
        .unwrap_or_else(|| panic!("{} does not mount /dev/net/tun", container.name));
    let volume = daemonset()
        .spec
        .template
        .spec
        .unwrap()
        .volumes
        .into_iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let host = volume
        .host_path
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", volume.name));
    (host.path, host.type_)
}

#[test]
fn the_ipip_forwarder_is_its_own_container_sharing_the_hosts_network() {
    let agent = agent_container();
    let forwarder = forwarder_container();
    assert_eq!(
        forwarder.image, agent.image,
        "the same binary: the agent checks the forwarder's version"
    );
    // Its command line parses as the binary's `ipip-forwarder` subcommand, with the node's
    // address where the pod gives $(NODE_IP); `--help` after them exits 0 only when every
    // argument before it parsed (the control below shows that a bad one fails).
    let args = forwarder.args.clone().expect("the forwarder's args");
    assert_eq!(args.first().map(String::as_str), Some("ipip-forwarder"));
    assert!(
        args.iter().any(|a| a == "--wait-for-device"),
        "the forwarder must not make tunl0 itself (it would stand in the way of the \
         kernel's ipip device): it waits for the agent's"
    );
    let node_ip = forwarder
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_IP")
        .and_then(|e| e.value_from.clone())
        .and_then(|v| v.field_ref)
        .map(|f| f.field_path);
    assert_eq!(node_ip.as_deref(), Some("status.hostIP"));
    let local = args
        .iter()
        .position(|a| a == "--local")
        .and_then(|i| args.get(i + 1))
        .expect("--local VALUE");
    assert_eq!(
        local, "$(NODE_IP)",
        "the node's address from the downward API"
    );
    let mut argv: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(NODE_IP)", "192.168.92.128"))
        .collect();
    argv.push("--help".into());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (ok, out) = run_podroute(&argv);
    assert!(ok, "podroute {argv:?}: {out}");
    let (bad, _) = run_podroute(&["ipip-forwarder", "--local", "not-an-ip", "--help"]);
    assert!(!bad, "control: a bad argument before --help fails");
    for var in forwarder.env.iter().flatten() {
        assert!(
            ["NODE_IP", "PODROUTE_LOG"].contains(&var.name.as_str()),
            "env {} is not read by the forwarder",
            var.name
        );
    }

    // What it needs, and no more: the raw sockets and the TUN device.
    let security = forwarder.security_context.clone().unwrap_or_default();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.unwrap_or_default();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = caps.add.into_iter().flatten().collect();
    assert_eq!(
        added,
        ["NET_ADMIN", "NET_RAW"].map(String::from).into(),
        "NET_ADMIN for the TUN device, NET_RAW for IP-protocol-4 sockets"
    );
    assert!(forwarder.ports.is_none(), "it listens on no port");
    // Both containers reach the host's /dev/net/tun (the agent makes the device, the
    // forwarder attaches to it).
    for c in [&agent, &forwarder] {
        assert_eq!(
            tun_device_volume(c),
            ("/dev/net/tun".to_string(), Some("CharDevice".to_string())),
            "{}",
            c.name
        );
    }
    // The control socket is abstract, scoped to the network namespace: both containers must
    // be in the host's (so the agent finds the forwarder), and a restart of one container
    // does not restart the other (no shared process namespace is needed).
    let pod = daemonset().spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.share_process_namespace, Some(true));
    assert!(
        forwarder.liveness_probe.is_none(),
        "a probe of the agent's HTTP server must not restart the forwarder"
    );
    assert_eq!(
        podroute::dataplane::ipip_user::process::control_socket_name(podroute::plan::TUNNEL_DEVICE),
        "podroute/ipip-forwarder/tunl0"
    );
}
