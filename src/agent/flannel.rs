//! flannel mode (`--model flannel`): what the agent does besides Calico mode's loop.
//!
//! - Reads `net-conf.json` once at start, as flanneld does: from a file (`--flannel-net-conf`,
//!   flanneld's `--net-config-path`), else from the `kube-flannel-cfg` ConfigMap (kubernetes
//!   datastore: `--flannel-configmap`, by default `kube-flannel/kube-flannel-cfg`, then
//!   `kube-system/kube-flannel-cfg`; YAML-directory datastore: a ConfigMap document of that
//!   name among the directory's files). A change takes effect at the next start.
//! - Plans every datastore change with [`crate::plan::flannel`]: its routes join the route
//!   plan (winning over BGP-learned routes for the same prefix), its [`TunnelPlan`] goes to
//!   the dataplane before the routes.
//! - Writes `/run/flannel/subnet.env` (`--flannel-subnet-file`) for the flannel CNI plugin,
//!   atomically (a temporary file in the same directory, renamed), whenever its content
//!   changes.
//! - Writes its own Node's flannel annotations at start (kubernetes datastore), so flanneld
//!   nodes route to it as to one of their own, and again whenever the Node's lease no longer
//!   says what this node is (its public-ip, backend type or VtepMAC differ or are gone: a
//!   cheap comparison on each state, [`annotations_stale`]).
//! - BGP: no node-to-node mesh (flanneld nodes speak none); explicit `BGPPeer`s (ToR switches)
//!   get this node's podCIDR(s); the flannel networks are the export policy's pool CIDRs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use crate::model::flannel::{
    Backend, CONFIGMAP_KEY, FlannelNode, NetConf, NetConfError, own_annotations,
};
use crate::plan::flannel::{FlannelLocal, FlannelPlan, FlannelWarning, device_mtu};
use crate::plan::tunnels::{MacAddr, TunnelPlan, VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6};
use crate::state::ClusterState;

/// flanneld's `--subnet-file` default.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Namespaces flannel's manifests put `kube-flannel-cfg` in, newest first.
pub const CONFIGMAP_NAMESPACES: [&str; 2] = ["kube-flannel", "kube-system"];
/// MTU assumed for a NIC whose MTU cannot be read.
const FALLBACK_NIC_MTU: u32 = 1500;

/// `--model`: whose objects the cluster is described by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Model {
    /// Calico's IPPools, IPAMBlocks and Node annotations; BGP mesh.
    #[default]
    Calico,
    /// flannel's net-conf.json and Nodes' podCIDRs and flannel annotations.
    Flannel,
}

/// Where `net-conf.json` is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetConfSource {
    /// A plain `net-conf.json` file (the ConfigMap mounted as flanneld mounts it).
    File(PathBuf),
    /// The ConfigMap through the API server: `namespace` (`None`: [`CONFIGMAP_NAMESPACES`])
    /// and name.
    ConfigMap {
        namespace: Option<String>,
        name: String,
    },
    /// A ConfigMap document named `name` among a YAML directory's files.
    DirConfigMap { dir: PathBuf, name: String },
}

impl std::fmt::Display for NetConfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::ConfigMap {
                namespace: Some(ns),
                name,
            } => write!(f, "ConfigMap {ns}/{name}"),
            Self::ConfigMap {
                namespace: None,
                name,
            } => write!(
                f,
                "ConfigMap {name} in {}",
                CONFIGMAP_NAMESPACES.join(" or ")
            ),
            Self::DirConfigMap { dir, name } => {
                write!(f, "ConfigMap {name} in {}", dir.display())
            }
        }
    }
}

/// Why `net-conf.json` could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{source_name}: {error}")]
    Invalid {
        source_name: String,
        error: NetConfError,
    },
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{source_name}: ConfigMap has no data key {CONFIGMAP_KEY:?}")]
    NoKey { source_name: String },
    #[error("{source_name}: {message}")]
    Read {
        source_name: String,
        message: String,
    },
}

impl LoadError {
    /// The config exists but is wrong (counted as an invalid object), as opposed to absent or
    /// unreachable.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Self::Invalid { .. } | Self::NoKey { .. })
    }
}

fn parse_from(source_name: String, text: &str) -> Result<NetConf, LoadError> {
    NetConf::parse(text).map_err(|error| LoadError::Invalid { source_name, error })
}

/// The `net-conf.json` text of a ConfigMap document named `name` in YAML `text` (documents
/// or `kind: List`): `None` when there is no such document, `Some(None)` when it has no
/// such key.
fn configmap_in_yaml(text: &str, name: &str) -> Option<Option<String>> {
    use serde::Deserialize;
    use serde_yaml_ng::Value;
    let mut found = None;
    let mut visit = |doc: &Value| {
        let kind = doc.get("kind").and_then(Value::as_str);
        let doc_name = doc
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str);
        if kind == Some("ConfigMap") && doc_name == Some(name) && found.is_none() {
            found = Some(
                doc.get("data")
                    .and_then(|d| d.get(CONFIGMAP_KEY))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            );
        }
    };
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let Ok(doc) = Value::deserialize(document) else {
            continue;
        };
        if doc.get("kind").and_then(Value::as_str) == Some("List") {
            for item in doc
                .get("items")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                visit(item);
            }
        } else {
            visit(&doc);
        }
    }
    found
}

/// Reads `net-conf.json` from `source` (`client` for [`NetConfSource::ConfigMap`]).
pub async fn load(
    source: &NetConfSource,
    client: Option<&kube::Client>,
) -> Result<NetConf, LoadError> {
    match source {
        NetConfSource::File(path) => {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LoadError::NotFound(name.clone()),
                _ => LoadError::Read {
                    source_name: name.clone(),
                    message: e.to_string(),
                },
            })?;
            parse_from(name, &text)
        }
        NetConfSource::DirConfigMap { dir, name } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| LoadError::Read {
                    source_name: dir.display().to_string(),
                    message: e.to_string(),
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let hidden = p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_none_or(|n| n.starts_with('.'));
                    let ext = p.extension().and_then(|e| e.to_str());
                    !hidden && matches!(ext, Some("yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            for file in files {
                let Ok(text) = std::fs::read_to_string(&file) else {
                    continue;
                };
                match configmap_in_yaml(&text, name) {
                    None => continue,
                    Some(None) => {
                        return Err(LoadError::NoKey {
                            source_name: format!("ConfigMap {name} in {}", file.display()),
                        });
                    }
                    Some(Some(json)) => {
                        return parse_from(
                            format!("ConfigMap {name} in {}", file.display()),
                            &json,
                        );
                    }
                }
            }
            Err(LoadError::NotFound(source.to_string()))
        }
        NetConfSource::ConfigMap { namespace, name } => {
            let Some(client) = client else {
                return Err(LoadError::Read {
                    source_name: source.to_string(),
                    message: "no Kubernetes client (use --flannel-net-conf with the \
                              YAML-directory datastore)"
                        .into(),
                });
            };
            let namespaces: Vec<&str> = match namespace {
                Some(ns) => vec![ns.as_str()],
                None => CONFIGMAP_NAMESPACES.to_vec(),
            };
            for ns in namespaces {
                let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                    kube::Api::namespaced(client.clone(), ns);
                let source_name = format!("ConfigMap {ns}/{name}");
                let cm = api.get_opt(name).await.map_err(|e| LoadError::Read {
                    source_name: source_name.clone(),
                    message: e.to_string(),
                })?;
                let Some(cm) = cm else { continue };
                let text = cm.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY)).ok_or(
                    LoadError::NoKey {
                        source_name: source_name.clone(),
                    },
                )?;
                return parse_from(source_name, text);
            }
            Err(LoadError::NotFound(source.to_string()))
        }
    }
}

/// The content of `subnet.env` for this node's lease, as flanneld writes it; `None` until the
/// node has a podCIDR of an enabled family.
pub fn subnet_env(
    conf: &NetConf,
    lease: Option<&FlannelNode>,
    mtu: u32,
    ip_masq: bool,
) -> Option<String> {
    let lease = lease?;
    let mut out = String::new();
    let mut any = false;
    if let (Some(network), Some(subnet)) = (conf.network, lease.pod_cidr_v4) {
        // The CNI bridge's address: the subnet's first host.
        let gateway = u32::from(subnet.network()).wrapping_add(1);
        let gateway = Ipv4Net::new(gateway.into(), subnet.prefix_len()).ok()?;
        out.push_str(&format!(
            "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={gateway}\n"
        ));
        any = true;
    }
    if let (Some(network), Some(subnet)) = (conf.ipv6_network, lease.pod_cidr_v6) {
        let gateway = u128::from(subnet.network()).wrapping_add(1);
        let gateway = Ipv6Net::new(gateway.into(), subnet.prefix_len()).ok()?;
        out.push_str(&format!(
            "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={gateway}\n"
        ));
        any = true;
    }
    if !any {
        return None;
    }
    out.push_str(&format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n"));
    Some(out)
}

/// Replaces `path` with `content` atomically: readers see the old file or the new one,
/// never a part (a temporary file in the same directory, synced, then renamed over it).
pub fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("subnet.env");
    let tmp = path.with_file_name(format!(".{file_name}.podroute-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(content.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The MTU of `nic` (`/sys/class/net/NIC/mtu`).
pub fn nic_mtu(nic: &str) -> Option<u32> {
    if nic.is_empty() || nic.contains('/') || nic.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(Path::new("/sys/class/net").join(nic).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The MTU the pods get (`FLANNEL_MTU`): the VXLAN device's (IPv4 device first), or the
/// NIC's with `host-gw`.
pub fn pod_mtu(conf: &NetConf, tunnels: &TunnelPlan, nic_mtu: u32) -> u32 {
    match &conf.backend {
        Backend::HostGw => nic_mtu,
        Backend::Vxlan(v) => tunnels
            .vxlan
            .first()
            .map(|d| device_mtu(d, nic_mtu))
            .unwrap_or_else(|| {
                v.mtu.unwrap_or_else(|| {
                    let overhead = if conf.network.is_some() {
                        VXLAN_OVERHEAD_V4
                    } else {
                        VXLAN_OVERHEAD_V6
                    };
                    nic_mtu.saturating_sub(overhead)
                })
            }),
    }
}

/// flannel mode's settings and the state it keeps between plans.
#[derive(Debug)]
pub struct FlannelMode {
    pub conf: NetConf,
    /// Where the config was read from (for status and logs).
    pub source: String,
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    /// The subnet.env content last written.
    written: Option<String>,
    /// The warnings of the last plan (each logged once while it lasts).
    warnings: BTreeSet<FlannelWarning>,
    /// Rejections already counted in `podroute_invalid_objects_total`.
    counted: BTreeSet<FlannelWarning>,
    /// The prefixes of the last plan's routes (readiness).
    planned: BTreeSet<IpNet>,
    /// Where the own Node's annotations are re-written when they go stale (kubernetes
    /// datastore, unless `--no-annotate`).
    annotator: Option<Annotator>,
    /// The MACs of the `flannel.1` / `flannel-v6.1` devices found at start (flanneld's, on a
    /// node migrating from it): used when the Node's annotations carry no VtepMAC, so that
    /// the device is kept rather than recreated with another MAC.
    device_macs: [Option<MacAddr>; 2],
}

/// Re-writes the own Node's flannel annotations.
struct Annotator {
    client: kube::Client,
    node: String,
    /// The stale lease last answered with a write, and when: the same stale lease is not
    /// answered again within [`ANNOTATE_RETRY`] (a write that has not reached the
    /// datastore's state yet, or failed). A write reads the Node first and patches nothing
    /// when it is right already.
    last: Option<(Option<FlannelNode>, std::time::Instant)>,
}

impl std::fmt::Debug for Annotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Annotator")
            .field("node", &self.node)
            .field("last", &self.last)
            .finish()
    }
}

/// How long the same stale annotations wait before they are written again.
const ANNOTATE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the own Node's lease no longer says what this node is, so that flanneld nodes
/// would route to it wrongly: its public-ip (v4, v6) is not the node's address, its backend
/// type is another, or (VXLAN) its VtepMAC is not the device's. A node without a lease but
/// with an address is stale too (its annotations were removed).
pub fn annotations_stale(
    backend: &Backend,
    lease: Option<&FlannelNode>,
    local: &FlannelLocal,
) -> bool {
    let Some(lease) = lease else {
        return local.ipv4.is_some() || local.ipv6.is_some();
    };
    let vxlan = matches!(backend, Backend::Vxlan(_));
    let v4 = local.ipv4.is_some_and(|a| {
        lease.public_ip != Some(a.addr()) || (vxlan && lease.vtep_mac != Some(local.vtep_mac))
    });
    let v6 = local.ipv6.is_some_and(|a| {
        lease.public_ipv6 != Some(a.addr())
            || (vxlan && lease.vtep_mac_v6 != Some(local.vtep_mac_v6))
    });
    v4 || v6 || lease.backend_type.as_deref() != Some(backend.type_name())
}

impl FlannelMode {
    pub fn new(conf: NetConf, source: String, subnet_file: PathBuf, ip_masq: bool) -> Self {
        Self {
            conf,
            source,
            subnet_file,
            ip_masq,
            written: None,
            warnings: BTreeSet::new(),
            counted: BTreeSet::new(),
            planned: BTreeSet::new(),
            annotator: None,
            device_macs: [None, None],
        }
    }

    /// Reads the MACs of the VXLAN devices already on this node (`/sys/class/net`, in the
    /// agent's network namespace); see [`Self::local`].
    pub fn remember_device_macs(&mut self) {
        let read = |name: &str| {
            std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("address"))
                .ok()
                .and_then(|t| t.trim().parse::<MacAddr>().ok())
        };
        self.device_macs = [
            read(crate::model::flannel::VXLAN_DEVICE_V4),
            read(crate::model::flannel::VXLAN_DEVICE_V6),
        ];
        if self.device_macs.iter().any(Option::is_some) {
            info!(macs = ?self.device_macs, "existing flannel VXLAN devices found");
        }
    }

    /// Keeps the own Node's annotations up to date through `client` from now on.
    pub fn annotate_with(&mut self, client: kube::Client, node: String) {
        self.annotator = Some(Annotator {
            client,
            node,
            last: None,
        });
    }

    /// Sends the own Node's annotations again when the state's lease went stale (see
    /// [`annotations_stale`]); the write runs on its own task, its result is logged. Needs a
    /// Tokio runtime when an annotator is set.
    fn refresh_annotations(&mut self, state: &ClusterState, local: &FlannelLocal) {
        if self.annotator.is_none()
            || state.local().is_none()
            || !annotations_stale(&self.conf.backend, self.own_lease(state), local)
        {
            return;
        }
        let wanted = self.annotations(local);
        let lease = self.own_lease(state).cloned();
        let Some(annotator) = self.annotator.as_mut() else {
            return;
        };
        if annotator
            .last
            .as_ref()
            .is_some_and(|(l, at)| *l == lease && at.elapsed() < ANNOTATE_RETRY)
        {
            return;
        }
        annotator.last = Some((lease, std::time::Instant::now()));
        let (client, node) = (annotator.client.clone(), annotator.node.clone());
        tokio::spawn(async move {
            match super::annotate::ensure_annotations(client, &node, &wanted).await {
                Ok(true) => info!(node, ?wanted, "flannel node annotations re-written"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot re-write the node's flannel annotations"),
            }
        });
    }

    /// The node's own lease as the datastore has it.
    pub fn own_lease<'a>(&self, state: &'a ClusterState) -> Option<&'a FlannelNode> {
        state
            .local()
            .and_then(|n| n.flannel.as_ref())
            .and_then(|l| l.as_ref().ok())
    }

    /// The planner's view of this node: its addresses, NIC, lease and VTEP MACs (the ones
    /// its Node already advertises, so a restart or a switch from flanneld keeps them; else
    /// the existing device's, found at start; else stable ones derived from the node name).
    pub fn local(
        &self,
        state: &ClusterState,
        name: &str,
        ipv4: Option<Ipv4Net>,
        ipv6: Option<Ipv6Net>,
        nic: &str,
    ) -> FlannelLocal {
        let lease = self.own_lease(state).cloned();
        FlannelLocal {
            name: name.to_string(),
            nic: nic.to_string(),
            ipv4,
            ipv6,
            vtep_mac: lease
                .as_ref()
                .and_then(|l| l.vtep_mac)
                .or(self.device_macs[0])
                .unwrap_or_else(|| MacAddr::from_seed(name)),
            vtep_mac_v6: lease
                .as_ref()
                .and_then(|l| l.vtep_mac_v6)
                .or(self.device_macs[1])
                .unwrap_or_else(|| MacAddr::from_seed(&format!("{name}/flannel-v6.1"))),
            lease,
        }
    }

    /// The annotations this node must carry for `local`.
    pub fn annotations(&self, local: &FlannelLocal) -> BTreeMap<String, String> {
        own_annotations(
            &self.conf.backend,
            local.ipv4.map(|n| n.addr()),
            local.ipv6.map(|n| n.addr()),
            Some(local.vtep_mac),
            Some(local.vtep_mac_v6),
        )
    }

    /// The flannel plan for the current state. New warnings are logged; newly unreadable or
    /// out-of-network Nodes are returned for counting as invalid objects.
    pub fn plan(&mut self, state: &ClusterState, local: &FlannelLocal) -> (FlannelPlan, usize) {
        let nodes = state
            .nodes
            .iter()
            .map(|(name, info)| (name.as_str(), info.flannel.as_ref().map(|l| l.as_ref())));
        let plan = crate::plan::flannel::plan(local, &self.conf, nodes);
        let now: BTreeSet<FlannelWarning> = plan.warnings.iter().cloned().collect();
        for w in now.difference(&self.warnings) {
            warn!("flannel: {w}");
        }
        let mut new_rejections = 0;
        for w in &now {
            let rejection = matches!(
                w,
                FlannelWarning::Unreadable { .. } | FlannelWarning::OutsideNetwork { .. }
            );
            if rejection && self.counted.insert(w.clone()) {
                new_rejections += 1;
            }
        }
        self.counted.retain(|w| now.contains(w));
        self.warnings = now;
        (plan, new_rejections)
    }

    /// One re-plan of the agent loop: the flannel plan for the current state (rejections
    /// counted in `metrics`), the subnet file brought up to date. Returns the routes and the
    /// tunnel plan.
    pub fn replan(
        &mut self,
        state: &ClusterState,
        local: &FlannelLocal,
        metrics: &crate::metrics::Metrics,
    ) -> (Vec<crate::plan::DesiredRoute>, TunnelPlan) {
        self.refresh_annotations(state, local);
        let (plan, rejected) = self.plan(state, local);
        if rejected > 0 {
            metrics
                .invalid_objects
                .with_label_values(&["FlannelLease"])
                .inc_by(rejected as u64);
        }
        self.write_subnet_env(state, &plan.tunnels, &local.nic);
        self.planned = plan.routes.iter().map(|r| r.prefix).collect();
        (plan.routes, plan.tunnels)
    }

    /// Why flannel mode is not ready (empty = ready): no podCIDR yet, no subnet file written,
    /// flannel routes the dataplane failed to program (`failed`: the failed prefixes).
    pub fn readiness<'a>(
        &self,
        state: &ClusterState,
        failed: impl IntoIterator<Item = &'a IpNet>,
    ) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.own_prefixes(state).is_empty() {
            reasons.push(
                "flannel: this node has no podCIDR inside net-conf.json's network yet".to_string(),
            );
        } else if self.written.is_none() {
            reasons.push(format!(
                "flannel: {} not written yet",
                self.subnet_file.display()
            ));
        }
        let failed: Vec<String> = failed
            .into_iter()
            .filter(|p| self.planned.contains(p))
            .map(ToString::to_string)
            .collect();
        if !failed.is_empty() {
            reasons.push(format!(
                "flannel: {} route(s) to other nodes' podCIDRs not programmed: {}",
                failed.len(),
                failed
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        reasons
    }

    /// The current warnings, as text (status).
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|w| format!("flannel: {w}"))
            .collect()
    }

    /// Writes subnet.env when its content changed. `nic` gives the MTU.
    pub fn write_subnet_env(&mut self, state: &ClusterState, tunnels: &TunnelPlan, nic: &str) {
        let nic_mtu = nic_mtu(nic).unwrap_or(FALLBACK_NIC_MTU);
        let mtu = pod_mtu(&self.conf, tunnels, nic_mtu);
        let Some(content) = subnet_env(&self.conf, self.own_lease(state), mtu, self.ip_masq) else {
            return;
        };
        if self.written.as_deref() == Some(content.as_str()) {
            return;
        }
        match write_atomic(&self.subnet_file, &content) {
            Ok(()) => {
                info!(path = %self.subnet_file.display(), mtu, "wrote flannel subnet file");
                self.written = Some(content);
            }
            Err(error) => warn!(
                path = %self.subnet_file.display(),
                %error,
                "cannot write the flannel subnet file; the flannel CNI plugin cannot set up pods \
                 until it exists (retried at the next change)"
            ),
        }
    }

    /// The prefixes this node announces over BGP: its podCIDR(s).
    pub fn own_prefixes(&self, state: &ClusterState) -> BTreeSet<IpNet> {
        let Some(lease) = self.own_lease(state) else {
            return BTreeSet::new();
        };
        lease
            .pod_cidr_v4
            .map(IpNet::V4)
            .into_iter()
            .chain(lease.pod_cidr_v6.map(IpNet::V6))
            .filter(|c| self.conf.contains(*c))
            .collect()
    }

    /// The flannel networks: what the BGP export policy lets out (as Calico's pool CIDRs).
    pub fn networks(&self) -> Vec<IpNet> {
        self.conf
            .network
            .map(IpNet::V4)
            .into_iter()
            .chain(self.conf.ipv6_network.map(IpNet::V6))
            .collect()
    }

    /// The export policy in flannel mode: the flannel networks are allowed out (as Calico's
    /// pools), and this node's podCIDRs are aggregates (as Calico's own blocks: announced as
    /// themselves, nothing more specific inside).
    pub fn adjust_export(
        &self,
        rules: &mut podroute_bgp::policy::ExportRules,
        state: &ClusterState,
    ) {
        rules.allow.extend(self.networks());
        rules.aggregates.extend(self.own_prefixes(state));
        rules.allow.sort();
        rules.allow.dedup();
        rules.aggregates.sort();
        rules.aggregates.dedup();
    }

    /// The cluster state as the BGP side of flannel mode sees it: no node-to-node mesh.
    pub fn adapt_state(&self, state: Arc<ClusterState>) -> Arc<ClusterState> {
        if !state.bgp.node_to_node_mesh {
            return state;
        }
        let mut adapted = (*state).clone();
        adapted.bgp.node_to_node_mesh = false;
        Arc::new(adapted)
    }
}

/// Where `args` say `net-conf.json` is: `--flannel-net-conf`, else the ConfigMap
/// (`--flannel-configmap`, `NAME` or `NAMESPACE/NAME`) through the API server, or among the
/// YAML directory's files.
pub fn net_conf_source(args: &super::AgentArgs) -> NetConfSource {
    if let Some(path) = &args.flannel_net_conf {
        return NetConfSource::File(path.clone());
    }
    let (namespace, name) = match args.flannel_configmap.split_once('/') {
        Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
        None => (None, args.flannel_configmap.clone()),
    };
    match args
        .datastore_type
        .parse::<crate::datastore::DatastoreSpec>()
    {
        Ok(crate::datastore::DatastoreSpec::Dir(dir)) => NetConfSource::DirConfigMap { dir, name },
        _ => NetConfSource::ConfigMap { namespace, name },
    }
}

/// Reads `net-conf.json`, retrying every 5 s while it is absent, unreachable or invalid (an
/// invalid one is counted in `podroute_invalid_objects_total{kind="FlannelNetConf"}` once
/// per distinct error), beating the heartbeat and saying why the node is not ready.
pub async fn wait_net_conf(
    args: &super::AgentArgs,
    client: Option<&kube::Client>,
    board: &super::StatusBoard,
    metrics: &crate::metrics::Metrics,
) -> FlannelMode {
    let source = net_conf_source(args);
    let mut last_error: Option<String> = None;
    loop {
        board.beat("agent");
        match load(&source, client).await {
            Ok(conf) => {
                info!(source = %source, ?conf, "flannel network config read");
                let mut mode = FlannelMode::new(
                    conf,
                    source.to_string(),
                    args.flannel_subnet_file.clone(),
                    args.flannel_ip_masq,
                );
                mode.remember_device_macs();
                return mode;
            }
            Err(error) => {
                let text = error.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    warn!("flannel network config: {text}; retrying every 5s");
                    if error.is_invalid() {
                        metrics
                            .invalid_objects
                            .with_label_values(&["FlannelNetConf"])
                            .inc();
                    }
                }
                let mut s = (*board.status()).clone();
                s.health.not_ready = vec![format!("flannel network config: {text}")];
                board.publish_status(s);
                last_error = Some(text);
            }
        }
        for _ in 0..5 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            board.beat("agent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flannel::CONFIGMAP_NAME;

    fn lease(v4: Option<&str>, v6: Option<&str>) -> FlannelNode {
        FlannelNode {
            pod_cidr_v4: v4.map(|c| c.parse().unwrap()),
            pod_cidr_v6: v6.map(|c| c.parse().unwrap()),
            ..FlannelNode::default()
        }
    }

    #[test]
    fn annotations_go_stale_when_the_address_mac_or_backend_changes() {
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        let mac: MacAddr = "fe:be:87:93:06:e2".parse().unwrap();
        let written = FlannelNode {
            public_ip: Some("192.168.0.39".parse().unwrap()),
            vtep_mac: Some(mac),
            backend_type: Some("vxlan".into()),
            kube_subnet_manager: true,
            ..lease(Some("10.244.0.0/24"), None)
        };
        let local = FlannelLocal {
            name: "master".into(),
            nic: "eth0".into(),
            ipv4: Some("192.168.0.39/26".parse().unwrap()),
            ipv6: None,
            vtep_mac: mac,
            vtep_mac_v6: MacAddr::from_seed("v6"),
            lease: Some(written.clone()),
        };
        let b = &conf.backend;
        assert!(!annotations_stale(b, Some(&written), &local));
        // The node's address moved.
        let mut moved = local.clone();
        moved.ipv4 = Some("192.168.0.40/26".parse().unwrap());
        assert!(annotations_stale(b, Some(&written), &moved));
        // The VtepMAC annotation is gone or another.
        let mut other = written.clone();
        other.vtep_mac = None;
        assert!(annotations_stale(b, Some(&other), &local));
        other.vtep_mac = Some(MacAddr::from_seed("other"));
        assert!(annotations_stale(b, Some(&other), &local));
        // Another backend type; no lease at all.
        let mut other = written.clone();
        other.backend_type = Some("host-gw".into());
        assert!(annotations_stale(b, Some(&other), &local));
        assert!(annotations_stale(b, None, &local));
        // host-gw has no VtepMAC to compare.
        let host_gw =
            NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#)
                .unwrap();
        let mut hg = written.clone();
        hg.backend_type = Some("host-gw".into());
        hg.vtep_mac = None;
        assert!(!annotations_stale(&host_gw.backend, Some(&hg), &local));
    }

    #[test]
    fn vtep_mac_from_the_lease_else_the_existing_device_else_derived() {
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        let mut mode = FlannelMode::new(conf, "t".into(), "subnet.env".into(), false);
        let state = ClusterState {
            local_node: "master".into(),
            ..ClusterState::default()
        };
        let derived = mode.local(&state, "master", None, None, "eth0").vtep_mac;
        assert_eq!(derived, MacAddr::from_seed("master"));
        let flanneld: MacAddr = "fe:be:87:93:06:e2".parse().unwrap();
        mode.device_macs = [Some(flanneld), None];
        assert_eq!(
            mode.local(&state, "master", None, None, "eth0").vtep_mac,
            flanneld
        );
    }

    #[test]
    fn subnet_env_is_flanneld_s() {
        // Seed 002, docker1: `cat /run/flannel/subnet.env` after flanneld leased 10.0.65.0/24
        // from `{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}`.
        let conf = NetConf::parse(
            r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let tunnels = TunnelPlan {
            vxlan: vec![crate::plan::tunnels::VxlanDevice {
                name: "flannel.1".into(),
                vni: 1,
                port: 8472,
                mac: MacAddr::from_seed("docker1"),
                local: "172.16.70.191".parse().unwrap(),
                parent: "eth0".into(),
                mtu: None,
                address: None,
            }],
            ..TunnelPlan::default()
        };
        let mtu = pod_mtu(&conf, &tunnels, 1500);
        let env = subnet_env(&conf, Some(&lease(Some("10.0.65.0/24"), None)), mtu, true).unwrap();
        assert_eq!(
            env,
            "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.65.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(subnet_env(&conf, None, 1450, true), None);
        assert_eq!(
            subnet_env(&conf, Some(&lease(None, None)), 1450, true),
            None
        );
    }

    #[test]
    fn subnet_env_dual_stack_host_gw_and_explicit_mtu() {
        let conf = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",
                "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        let l = lease(Some("10.244.3.0/24"), Some("fd00:10:244:3::/64"));
        let env = subnet_env(
            &conf,
            Some(&l),
            pod_mtu(&conf, &TunnelPlan::default(), 9000),
            false,
        )
        .unwrap();
        assert_eq!(
            env,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n\
             FLANNEL_MTU=9000\nFLANNEL_IPMASQ=false\n"
        );
        let conf = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400}}"#,
        )
        .unwrap();
        assert_eq!(pod_mtu(&conf, &TunnelPlan::default(), 1500), 1400);
        let v6 = NetConf::parse(
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(pod_mtu(&v6, &TunnelPlan::default(), 1500), 1430);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("podroute-flannel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/flannel/subnet.env");
        write_atomic(&path, "A=1\n").unwrap();
        write_atomic(&path, "A=2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "A=2\n");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["subnet.env"]);
        // A directory in the way: an error, no panic.
        assert!(write_atomic(&dir.join("run"), "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn net_conf_from_a_configmap_document_in_a_yaml_directory() {
        let dir = std::env::temp_dir().join(format!("podroute-flannel-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = NetConfSource::DirConfigMap {
            dir: dir.clone(),
            name: CONFIGMAP_NAME.into(),
        };
        assert!(matches!(
            load(&source, None).await,
            Err(LoadError::NotFound(_))
        ));
        // flannel's manifest, trimmed: the ConfigMap among other documents.
        std::fs::write(
            dir.join("kube-flannel.yml"),
            r#"apiVersion: v1
kind: Namespace
metadata:
  name: kube-flannel
---
kind: ConfigMap
apiVersion: v1
metadata:
  name: kube-flannel-cfg
  namespace: kube-flannel
data:
  cni-conf.json: |
    {"name": "cbr0", "cniVersion": "0.3.1"}
  net-conf.json: |
    {
      "Network": "10.244.0.0/16",
      "Backend": {
        "Type": "vxlan"
      }
    }
"#,
        )
        .unwrap();
        let conf = load(&source, None).await.unwrap();
        assert_eq!(conf.network, Some("10.244.0.0/16".parse().unwrap()));
        std::fs::write(
            dir.join("kube-flannel.yml"),
            "kind: ConfigMap\nmetadata:\n  name: kube-flannel-cfg\ndata:\n  net-conf.json: '{\"Network\": \"10.244.0.0/16\"}'\n",
        )
        .unwrap();
        let err = load(&source, None).await.unwrap_err();
        assert!(err.is_invalid());
        assert!(
            err.to_string().contains("\"udp\" is not supported"),
            "{err}"
        );
        std::fs::write(
            dir.join("kube-flannel.yml"),
            "kind: ConfigMap\nmetadata:\n  name: kube-flannel-cfg\ndata: {}\n",
        )
        .unwrap();
        assert!(matches!(
            load(&source, None).await,
            Err(LoadError::NoKey { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readiness_names_what_is_missing() {
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("podroute-ready-{}", std::process::id()));
        let mut mode = FlannelMode::new(conf, "t".into(), dir.join("subnet.env"), false);
        let mut node = k8s_openapi::api::core::v1::Node::default();
        node.metadata.name = Some("master".into());
        let info = crate::model::NodeInfo::from_node(&node).unwrap();
        let mut state = ClusterState {
            local_node: "master".into(),
            ..ClusterState::default()
        };
        state.nodes.insert("master".into(), info);
        let none: [IpNet; 0] = [];
        assert!(mode.readiness(&state, &none)[0].contains("no podCIDR"));

        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.0.0/24".into()),
            ..Default::default()
        });
        let mut other = node.clone();
        other.metadata.name = Some("node1".into());
        other.spec.as_mut().unwrap().pod_cidr = Some("10.244.1.0/24".into());
        other.metadata.annotations = Some(own_annotations(
            &mode.conf.backend,
            Some("192.168.0.22".parse().unwrap()),
            None,
            Some(MacAddr::from_seed("node1")),
            None,
        ));
        for n in [&node, &other] {
            let info = crate::model::NodeInfo::from_node(n).unwrap();
            state.nodes.insert(info.name.clone(), info);
        }
        let local = mode.local(
            &state,
            "master",
            Some("192.168.0.39/26".parse().unwrap()),
            None,
            "eth0",
        );
        let metrics = crate::metrics::Metrics::new();
        let (routes, _) = mode.replan(&state, &local, &metrics);
        assert_eq!(routes.len(), 1);
        assert_eq!(mode.readiness(&state, &none), Vec::<String>::new());
        let failed = [routes[0].prefix, "10.9.0.0/24".parse().unwrap()];
        assert_eq!(
            mode.readiness(&state, &failed),
            ["flannel: 1 route(s) to other nodes' podCIDRs not programmed: 10.244.1.0/24"]
        );
        assert!(
            std::fs::read_to_string(dir.join("subnet.env"))
                .unwrap()
                .contains("10.244.0.1/24")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bgp_side_no_mesh_networks_allowed_own_podcidr_aggregated() {
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        let mode = FlannelMode::new(conf, "t".into(), "subnet.env".into(), false);
        let mut node = k8s_openapi::api::core::v1::Node::default();
        node.metadata.name = Some("master".into());
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.0.0/24".into()),
            ..Default::default()
        });
        let mut state = ClusterState {
            local_node: "master".into(),
            ..ClusterState::default()
        };
        state.nodes.insert(
            "master".into(),
            crate::model::NodeInfo::from_node(&node).unwrap(),
        );
        assert!(state.bgp.node_to_node_mesh);
        let adapted = mode.adapt_state(Arc::new(state.clone()));
        assert!(!adapted.bgp.node_to_node_mesh);
        assert_eq!(adapted.nodes, state.nodes);
        let mut rules = podroute_bgp::policy::ExportRules {
            allow: vec!["10.96.0.0/12".parse().unwrap()],
            ..Default::default()
        };
        mode.adjust_export(&mut rules, &state);
        let text = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(text(&rules.allow), ["10.96.0.0/12", "10.244.0.0/16"]);
        assert_eq!(text(&rules.aggregates), ["10.244.0.0/24"]);
    }

    #[tokio::test]
    async fn net_conf_from_a_file() {
        let path =
            std::env::temp_dir().join(format!("podroute-net-conf-{}.json", std::process::id()));
        let source = NetConfSource::File(path.clone());
        assert!(matches!(
            load(&source, None).await,
            Err(LoadError::NotFound(_))
        ));
        std::fs::write(
            &path,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(load(&source, None).await.unwrap().backend, Backend::HostGw);
        std::fs::remove_file(&path).unwrap();
    }
}
