//! `manifests/alerts.yaml` and `manifests/dashboard.json` against Debian's `prometheus` and
//! `promtool`:
//!
//! - the PrometheusRule's `spec` is a rules file that `promtool check rules` accepts, and
//!   `promtool test rules` passes `tests/fixtures/prometheus/alerts_test.yaml`, which has a
//!   case where each alert fires and one where it does not;
//! - a real Prometheus, started by the test inside the lab's master01 namespace (listening
//!   on that namespace's loopback, with its own data directory), scrapes the three real
//!   agents of the lab cluster. Every dashboard query and every alert expression evaluates
//!   without error, every series they select exists, every rule is loaded and healthy, a
//!   healthy cluster raises no alert, and stopping one agent makes the peer-down and
//!   agent-down alerts pending. `promtool check metrics` finds nothing in any agent's
//!   `/metrics`.
//!
//! Without `promtool`/`prometheus` (tests/run.sh installs Debian's `prometheus`) or root the
//! tests print a loud SKIP; with `CI=true` they fail instead. All traffic stays inside the
//! namespaces the lab creates.

mod agent_guard;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agent_guard::{in_path, tool_works};
use podroute::lab::{ClusterSpec, Lab, LabConfig, WaitError, http_get, wait_until};
use serde_json::Value;

/// Longest wait for a mesh to converge; typically 1-3 s.
const CONVERGE: Duration = Duration::from_secs(45);
/// Longest wait for Prometheus to start, scrape, evaluate or notice a change (it scrapes
/// and evaluates every second here).
const PROMETHEUS: Duration = Duration::from_secs(60);
/// Where the test's Prometheus listens, inside master01's namespace.
const PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cannot_run(test: &str, why: &str, need: &str) {
    agent_guard::cannot_run("prometheus", test, why, need);
}

fn have_promtool(test: &str) -> bool {
    if !in_path("promtool") {
        cannot_run(
            test,
            "`promtool` is missing",
            "Install Debian's `prometheus` package (tests/run.sh does).",
        );
        return false;
    }
    true
}

/// Parses a YAML file into JSON values (one document).
fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The PrometheusRule in manifests/alerts.yaml.
fn prometheus_rule() -> Value {
    let rule = yaml(&repo().join("manifests/alerts.yaml"));
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    rule
}

/// Writes the PrometheusRule's `spec` (its rule groups) as a plain Prometheus rules file.
fn write_rules_file(dir: &Path) -> PathBuf {
    let spec = &prometheus_rule()["spec"];
    assert!(
        spec["groups"].as_array().is_some_and(|g| !g.is_empty()),
        "alerts.yaml has no spec.groups"
    );
    let text = serde_yaml_ng::to_string(spec).expect("rule groups serialise as YAML");
    let path = dir.join("alerts.rules.yaml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// Every alerting rule: name and expression.
fn alert_rules() -> BTreeMap<String, String> {
    let rule = prometheus_rule();
    let mut alerts = BTreeMap::new();
    for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            let name = r["alert"].as_str().expect("every rule is an alert");
            let expr = r["expr"].as_str().expect("every alert has an expr");
            assert!(
                alerts.insert(name.to_string(), expr.to_string()).is_none(),
                "alert {name} is defined twice"
            );
        }
    }
    alerts
}

fn run_promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for promtool: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let test = "alert_rules_pass_promtool_check_and_unit_tests";
    if !have_promtool(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = write_rules_file(dir.path());
    let rules_name = rules.file_name().unwrap().to_str().unwrap();
    let (ok, out) = run_promtool(&["check", "rules", rules_name], dir.path(), None);
    assert!(ok, "promtool check rules:\n{out}");

    let cases_path = repo().join("tests/fixtures/prometheus/alerts_test.yaml");
    let cases = yaml(&cases_path);
    assert_eq!(
        cases["rule_files"],
        serde_json::json!([rules_name]),
        "the unit tests must load the rules generated from alerts.yaml"
    );
    // Every alert has a case where it fires and one where it does not; no case names an
    // alert that does not exist.
    let alerts = alert_rules();
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in cases["tests"]
        .as_array()
        .expect("alerts_test.yaml has tests")
    {
        for case in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("a case names its alert");
            assert!(
                alerts.contains_key(name),
                "alerts_test.yaml tests {name}, which alerts.yaml does not define"
            );
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name.to_string());
            } else {
                silent.insert(name.to_string());
            }
        }
    }
    for name in alerts.keys() {
        assert!(fires.contains(name), "no unit test where {name} fires");
        assert!(
            silent.contains(name),
            "no unit test where {name} stays quiet"
        );
    }

    std::fs::copy(&cases_path, dir.path().join("alerts_test.yaml")).unwrap();
    let (ok, out) = run_promtool(&["test", "rules", "alerts_test.yaml"], dir.path(), None);
    assert!(ok, "promtool test rules:\n{out}");
}

// ---------------------------------------------------------------------------------------
// A real Prometheus scraping the lab's agents.

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The test's Prometheus, inside namespace `ns`.
struct Prom {
    ns: String,
}

impl Prom {
    /// `GET path` answered with `status: success`: the `data` field.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) = http_get(&self.ns, PROMETHEUS_ADDR, path, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let answer: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {path}: HTTP {code}, not JSON ({e}): {body}"))?;
        if answer["status"] != "success" {
            return Err(format!(
                "GET {path}: HTTP {code}, {}: {}",
                answer["errorType"], answer["error"]
            ));
        }
        Ok(answer["data"].clone())
    }

    /// An instant query: the series of its vector result.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)))?;
        if data["resultType"] != "vector" {
            return Err(format!("{expr}: result is {}", data["resultType"]));
        }
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Active alerts (pending or firing) as (alertname, state, labels).
    fn alerts(&self) -> Result<Vec<(String, String, Value)>, String> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["state"].as_str().unwrap_or("").to_string(),
                    a["labels"].clone(),
                )
            })
            .collect())
    }
}

/// Every vector selector in a PromQL expression (`metric` or `metric{matchers}`): the
/// agent's metrics and `up`.
fn selectors(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(?:up|podroute_[a-z0-9_]+)\b(?:\{[^}]*\})?").unwrap();
    let mut found: Vec<String> = re.find_iter(expr).map(|m| m.as_str().to_string()).collect();
    found.sort();
    found.dedup();
    found
}

/// Whether a PromQL expression compares (`==`, `!=`, `>`, `<`, ...) outside label
/// matchers, so that it may rightly select nothing.
fn is_filter(expr: &str) -> bool {
    let matchers = regex::Regex::new(r"\{[^}]*\}").unwrap();
    let bare = matchers.replace_all(expr, "");
    ["==", "!=", ">", "<"].iter().any(|op| bare.contains(op))
}

/// The dashboard's queries with Grafana's variables replaced: all nodes, a 30 s rate
/// window (Prometheus scrapes every second here).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("manifests/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let expr = expr
                .replace("$instance", ".+")
                .replace("$__rate_interval", "30s");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            queries.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    assert!(!queries.is_empty(), "the dashboard has no queries");
    queries
}

/// The dashboard's template variables of the form `label_values(METRIC, LABEL)`.
fn dashboard_label_values() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("manifests/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let re = regex::Regex::new(r"^label_values\(\s*([^,]+?)\s*,\s*([a-z_]+)\s*\)$").unwrap();
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["query"]["query"].as_str().or(v["query"].as_str()))
        .filter_map(|q| re.captures(q).map(|c| (c[1].to_string(), c[2].to_string())))
        .collect()
}

fn can_run_lab(test: &str) -> bool {
    if !podroute::lab::is_root() {
        cannot_run(
            test,
            "not running as root",
            "This test needs root (network namespaces, veth, routes).",
        );
        return false;
    }
    if !tool_works("ip", "-V") {
        cannot_run(test, "iproute2 `ip` is missing", "Install iproute2.");
        return false;
    }
    if !in_path("prometheus") {
        cannot_run(
            test,
            "`prometheus` is missing",
            "Install Debian's `prometheus` package (tests/run.sh does).",
        );
        return false;
    }
    have_promtool(test)
}

/// The tail of every log of the lab (agents and Prometheus), for failure messages.
fn logs(lab: &Lab) -> String {
    lab.spec
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .chain(["prometheus".to_string()])
        .map(|label| format!("--- {label}:\n{}", lab.log_tail(&label, 25)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn eventually<T>(lab: &Lab, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    match wait_until(what, PROMETHEUS, || check().map_err(WaitError::Pending)) {
        Ok(v) => v,
        Err(e) => panic!("{e}\n{}", logs(lab)),
    }
}

#[test]
fn real_prometheus_scrapes_the_lab_and_evaluates_dashboard_and_alerts() {
    let test = "real_prometheus_scrapes_the_lab_and_evaluates_dashboard_and_alerts";
    if !can_run_lab(test) {
        return;
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let cfg = LabConfig::new(
        format!("prom{}{n}", std::process::id()),
        env!("CARGO_BIN_EXE_podroute"),
    );
    let mut lab = Lab::build(cfg, ClusterSpec::seed()).expect("build the lab");
    lab.start_agents().expect("start the agents");
    if let Err(e) = lab.wait_converged(CONVERGE) {
        panic!("{e}\n{}", logs(&lab));
    }
    let master = lab.spec.nodes[0].name.clone();
    let victim = lab.spec.nodes[2].clone();
    let port = lab.cfg.metrics_port;

    // Every agent's exposition passes promtool's linter.
    for node in &lab.spec.nodes {
        let text = lab
            .metrics(&node.name)
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
        let (ok, out) = run_promtool(&["check", "metrics"], lab.workdir(), Some(&text));
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on {}'s /metrics:\n{out}",
            node.name
        );
    }

    // Prometheus in master01's namespace: scrapes every node's agent on its node address
    // (the agents listen on 0.0.0.0), evaluates the rules every second.
    let dir = lab.workdir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let rules = write_rules_file(&dir);
    let targets: Vec<String> = lab
        .spec
        .nodes
        .iter()
        .map(|n| format!("'{}:{port}'", n.ip()))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - '{}'\n\
         scrape_configs:\n  - job_name: podroute\n    static_configs:\n      - targets: [{}]\n",
        rules.display(),
        targets.join(", ")
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let (ok, out) = run_promtool(
        &["check", "config", config_path.to_str().unwrap()],
        &dir,
        None,
    );
    assert!(ok, "promtool check config:\n{out}");
    let args = vec![
        format!("--config.file={}", config_path.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS_ADDR}"),
        "--storage.tsdb.retention.time=1h".to_string(),
    ];
    lab.spawn(
        "prometheus",
        &lab.node_ns(&master),
        Path::new("prometheus"),
        &args,
    )
    .expect("start prometheus");
    let prom = Prom {
        ns: lab.node_ns(&master),
    };

    // All three targets up.
    eventually(&lab, "Prometheus scraping every agent", || {
        lab.check_running("prometheus").map_err(|e| e.to_string())?;
        let up = prom.query("up{job=\"podroute\"} == 1")?;
        if up.len() == targets.len() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} targets up: {up:?}",
                up.len(),
                targets.len()
            ))
        }
    });

    // Every dashboard query evaluates and returns series; a filter (a panel of the peers
    // not Established) may be empty in a healthy cluster, but what it filters exists.
    let queries = dashboard_queries();
    eventually(&lab, "every dashboard query to return series", || {
        let mut wrong = Vec::new();
        for (title, expr) in &queries {
            match prom.query(expr) {
                Ok(series) if series.is_empty() && !is_filter(expr) => {
                    wrong.push(format!("{title}: {expr}: no series"))
                }
                Ok(_) => {}
                Err(e) => wrong.push(format!("{title}: {e}")),
            }
            for selector in selectors(expr) {
                match prom.query(&selector) {
                    Ok(series) if series.is_empty() => {
                        wrong.push(format!("{title}: {selector} selects no series"))
                    }
                    Ok(_) => {}
                    Err(e) => wrong.push(format!("{title}: {selector}: {e}")),
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("\n"))
        }
    });

    // The node picker (`label_values(podroute_build_info, instance)`) finds every node.
    let variables = dashboard_label_values();
    assert!(!variables.is_empty(), "the dashboard has no node variable");
    for (metric, label) in &variables {
        let series = prom
            .query(metric)
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
        let values: BTreeSet<&str> = series
            .iter()
            .filter_map(|s| s["metric"][label.as_str()].as_str())
            .collect();
        assert_eq!(
            values.len(),
            targets.len(),
            "label_values({metric}, {label}) lists {values:?}"
        );
    }

    // Every alert expression evaluates, and every series it selects exists.
    let alerts = alert_rules();
    eventually(&lab, "every alert expression and selector", || {
        let mut wrong = Vec::new();
        for (name, expr) in &alerts {
            if let Err(e) = prom.query(expr) {
                wrong.push(format!("{name}: {e}"));
            }
            for selector in selectors(expr) {
                match prom.query(&selector) {
                    Ok(series) if series.is_empty() => {
                        wrong.push(format!("{name}: {selector} selects no series"))
                    }
                    Ok(_) => {}
                    Err(e) => wrong.push(format!("{name}: {selector}: {e}")),
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("\n"))
        }
    });

    // Prometheus loaded every rule of alerts.yaml and evaluated each without error.
    eventually(&lab, "every rule loaded and healthy", || {
        let data = prom.api("/api/v1/rules")?;
        let mut loaded = BTreeMap::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for r in group["rules"].as_array().into_iter().flatten() {
                loaded.insert(
                    r["name"].as_str().unwrap_or("").to_string(),
                    (
                        r["health"].as_str().unwrap_or("").to_string(),
                        r["lastError"].as_str().unwrap_or("").to_string(),
                    ),
                );
            }
        }
        let names: BTreeSet<&String> = loaded.keys().collect();
        let want: BTreeSet<&String> = alerts.keys().collect();
        if names != want {
            return Err(format!("loaded {names:?}, want {want:?}"));
        }
        let unhealthy: Vec<String> = loaded
            .iter()
            .filter(|(_, (health, _))| health != "ok")
            .map(|(name, (health, error))| format!("{name}: {health} {error}"))
            .collect();
        if unhealthy.is_empty() {
            Ok(())
        } else {
            Err(unhealthy.join("\n"))
        }
    });

    // A healthy, converged cluster raises no alert, not even a pending one.
    let active = prom
        .alerts()
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert!(
        active.is_empty(),
        "alerts in a healthy cluster: {active:#?}\n{}",
        logs(&lab)
    );

    // Stop node02's agent: its target goes down and the other nodes lose their session to
    // it. The alerts turn pending at once (they fire only after their `for`).
    lab.stop_agent(&victim.name, libc::SIGTERM, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let victim_target = format!("{}:{port}", victim.ip());
    let victim_peer = victim.ip().to_string();
    let others: BTreeSet<String> = lab
        .spec
        .nodes
        .iter()
        .filter(|n| n.name != victim.name)
        .map(|n| format!("{}:{port}", n.ip()))
        .collect();
    eventually(
        &lab,
        "PodrouteAgentDown and PodrouteBGPPeerDown pending",
        || {
            let active = prom.alerts()?;
            let agent_down: BTreeSet<String> = active
                .iter()
                .filter(|(name, state, _)| name == "PodrouteAgentDown" && state == "pending")
                .filter_map(|(_, _, l)| l["instance"].as_str().map(str::to_string))
                .collect();
            let peer_down: BTreeSet<String> = active
                .iter()
                .filter(|(name, state, l)| {
                    name == "PodrouteBGPPeerDown" && state == "pending" && l["peer"] == victim_peer
                })
                .filter_map(|(_, _, l)| l["instance"].as_str().map(str::to_string))
                .collect();
            if agent_down == BTreeSet::from([victim_target.clone()]) && peer_down == others {
                Ok(())
            } else {
                Err(format!(
                    "agent down on {agent_down:?} (want {victim_target}), peer {victim_peer} \
                 down on {peer_down:?} (want {others:?}); active: {active:#?}"
                ))
            }
        },
    );
    // Each of the others still has its session to the other: no node is cut off.
    let active = prom
        .alerts()
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert!(
        !active
            .iter()
            .any(|(name, _, _)| name == "PodrouteNoEstablishedBGPPeers"),
        "{active:#?}"
    );
}

#[test]
fn selectors_are_found_in_alert_expressions() {
    assert_eq!(
        selectors("max without (peer, peer_type) (podroute_bgp_peer_up) == 0"),
        ["podroute_bgp_peer_up"]
    );
    assert_eq!(
        selectors(
            "sum(rate(podroute_ipip_drops_total{reason!=\"not_ipv4\"}[5m])) / \
             sum(rate(podroute_ipip_packets_total[5m])) + up{job=~\".*podroute.*\"}"
        ),
        [
            "podroute_ipip_drops_total{reason!=\"not_ipv4\"}",
            "podroute_ipip_packets_total",
            "up{job=~\".*podroute.*\"}",
        ]
    );
    assert_eq!(encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    assert!(is_filter("podroute_bgp_peer_state{instance=~\".+\"} != 6"));
    assert!(!is_filter(
        "sum(podroute_bgp_peer_up{instance=~\".+\", peer!=\"x\"})"
    ));
}
