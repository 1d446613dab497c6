//! Before the loop: the node's name and addresses, the datastore and its first sync, the
//! HTTP endpoints, the node annotations; then [`Agent::start`] and [`Agent::run`] until
//! SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use super::status::StatusBoard;
use super::{Agent, AgentArgs, LIVENESS_MAX_AGE, Startup, annotate, autodetect, flannel, listen};
use crate::datastore::{self, DatastoreHandle, DatastoreSpec};
use crate::metrics::Metrics;
use crate::model::{AddressSource, NodeInfo};
use crate::state::{ClusterState, StateRx};

/// The node name: `--nodename`/`NODENAME`, else the host name.
pub fn node_name(args: &AgentArgs) -> anyhow::Result<String> {
    if let Some(name) = args.nodename.as_deref().filter(|n| !n.trim().is_empty()) {
        return Ok(name.trim().to_string());
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!("no --nodename/NODENAME given and the host name cannot be read");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let host = String::from_utf8_lossy(&buf[..end]).to_string();
    // Kubernetes node names are the lowercase short or full host name.
    Ok(host.to_lowercase())
}

/// Starts the datastore the flags name; with `kubernetes` also returns the client (for the
/// node annotations).
pub async fn start_datastore(
    args: &AgentArgs,
    node: &str,
) -> anyhow::Result<(DatastoreHandle, Option<kube::Client>)> {
    let spec: DatastoreSpec = args.datastore_type.parse()?;
    Ok(match spec {
        DatastoreSpec::Kubernetes => {
            let client = kube::Client::try_default().await.context(
                "cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG); \
                 use --datastore-type dir:PATH to run without one",
            )?;
            (
                datastore::kube::spawn_with_options(
                    client.clone(),
                    node,
                    args.datastore_wipe_confirm,
                    args.model == flannel::Model::Flannel,
                ),
                Some(client),
            )
        }
        DatastoreSpec::Dir(path) => (
            datastore::dir::spawn_with(
                path,
                node,
                datastore::dir::DirOptions {
                    poll: args.dir_poll,
                    max_file_size: args.datastore_max_file_size,
                    wipe_confirm: args.datastore_wipe_confirm,
                },
            ),
            None,
        ),
    })
}

/// Waits for the datastore's first complete snapshot, beating the heartbeat meanwhile.
pub async fn wait_synced(
    state: &mut StateRx,
    board: &StatusBoard,
    source: &str,
) -> anyhow::Result<Arc<ClusterState>> {
    let mut waiting = tokio::time::interval(Duration::from_secs(1));
    let started = Instant::now();
    loop {
        tokio::select! {
            synced = state.synced() => return synced.context("datastore stopped before its initial sync"),
            _ = waiting.tick() => {
                board.beat("agent");
                let mut s = (*board.status()).clone();
                s.health.not_ready = vec![format!("datastore {source} not synced yet")];
                board.publish_status(s);
                if started.elapsed() > Duration::from_secs(10) && started.elapsed().as_secs().is_multiple_of(30) {
                    warn!(source, waited_s = started.elapsed().as_secs(), "still waiting for the datastore's initial sync");
                }
            }
        }
    }
}

/// The node's addresses (with prefixes) and the interface holding the first of them.
struct NodeAddresses {
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    interface: Option<String>,
}

/// The node's addresses: `--ip` / `--ip6` and autodetection as calico/node does it; with
/// `none`, the address the Node object already carries. One of the two is needed.
fn resolve_addresses(args: &AgentArgs, state: &ClusterState) -> anyhow::Result<NodeAddresses> {
    let local = state.local();
    let internal_ip = local
        .filter(|n| n.ipv4_source == Some(AddressSource::InternalIp))
        .and_then(NodeInfo::ipv4_addr);
    let detected = autodetect::resolve(&args.ip, &args.ip_autodetection_method, internal_ip)?;
    let ifaces = || autodetect::list_interfaces().unwrap_or_default();
    let (v4, v4_interface) = match detected {
        Some(d) => (Some(d.address), d.interface),
        None => match local.and_then(|n| n.ipv4) {
            Some(net) => {
                let holder =
                    autodetect::interface_of(net.addr(), &ifaces()).map(|i| i.name.clone());
                (Some(net), holder)
            }
            None => (None, None),
        },
    };
    if let (Some(annotated), Some(address)) = (local.and_then(|n| n.ipv4), v4)
        && local.and_then(|n| n.ipv4_source) == Some(AddressSource::Annotation)
        && annotated != address
    {
        warn!(%annotated, %address, "the Node's projectcalico.org/IPv4Address differs from the address found here");
    }
    let detected6 = autodetect::resolve6(
        &args.ip6,
        &args.ip6_autodetection_method,
        local.and_then(|n| n.internal_ipv6),
    )?;
    let (v6, v6_interface) = match detected6 {
        Some(d) => {
            if let Some(annotated) = local.and_then(|n| n.ipv6)
                && annotated != d.address
            {
                warn!(%annotated, address = %d.address, "the Node's projectcalico.org/IPv6Address differs from the address found here");
            }
            (Some(d.address), d.interface)
        }
        None => match local.and_then(|n| n.ipv6) {
            Some(net) => {
                let holder =
                    autodetect::interface_of6(net.addr(), &ifaces()).map(|i| i.name.clone());
                (Some(net), holder)
            }
            None => (None, None),
        },
    };
    if v4.is_none() && v6.is_none() {
        bail!(
            "the Node {:?} has neither an IPv4 nor an IPv6 address (IP={:?}, IP6={:?}); podroute \
             needs one for BGP: set IP or IP6 (autodetect or an address)",
            state.local_node,
            args.ip,
            args.ip6
        );
    }
    let interface = v4_interface.or(v6_interface);
    info!(
        ipv4 = ?v4,
        ipv6 = ?v6,
        interface = interface.as_deref().unwrap_or("?"),
        method = args.ip_autodetection_method,
        method6 = args.ip6_autodetection_method,
        "node addresses"
    );
    Ok(NodeAddresses { v4, v6, interface })
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// `podroute agent`: runs until SIGTERM/SIGINT or a fatal error.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let node = node_name(&args)?;
    let metrics =
        Metrics::with_peer_labels(args.metrics_peer_labels, args.metrics_peer_label_limit);
    let board = Arc::new(StatusBoard::new());
    board.beat("agent");
    info!(
        node,
        version = env!("CARGO_PKG_VERSION"),
        datastore = args.datastore_type,
        "podroute agent starting"
    );
    let _http = crate::http::start(
        &crate::http::HttpConfig {
            metrics_addr: args.metrics_addr,
            status_addr: args.status_addr,
            limits: crate::http::Limits {
                max_connections: args.http_max_connections,
                header_timeout: args.http_header_timeout,
                idle_timeout: args.http_idle_timeout,
            },
            live_max_age: LIVENESS_MAX_AGE,
        },
        board.clone(),
        metrics.clone(),
    )
    .await?;

    // The BGP listener opens before the datastore is read: a peer that has read its own
    // faster and connects now is held until its peer entry is configured, not refused
    // (which would cost it a connect retry).
    let early_listener = listen::early_listener(listen::listen_candidates(
        args.bgp_bind,
        crate::model::bgp::DEFAULT_LISTEN_PORT,
    ))
    .await;
    let (mut datastore, client) = start_datastore(&args, &node).await?;
    let source = args.datastore_type.clone();
    let state = tokio::select! {
        s = wait_synced(&mut datastore.state, &board, &source) => s?,
        _ = termination() => return Ok(()),
    };
    info!(
        revision = state.revision,
        nodes = state.nodes.len(),
        pools = state.pools.len(),
        blocks = state.blocks.len(),
        "datastore synced"
    );
    if state.local().is_none() {
        warn!(
            node,
            "no Node object named {node:?} in the datastore; is NODENAME right?"
        );
    }
    let addresses = resolve_addresses(&args, &state)?;
    let nic = match (&args.nic, addresses.interface) {
        (Some(nic), _) => nic.clone(),
        (None, Some(holder)) => holder,
        (None, None) => {
            bail!(
                "cannot tell which interface holds the node address ({}); set \
                 --nic/PODROUTE_NIC",
                addresses
                    .v4
                    .map(|a| a.to_string())
                    .or(addresses.v6.map(|a| a.to_string()))
                    .unwrap_or_default()
            )
        }
    };
    let mut flannel = match args.model {
        flannel::Model::Calico => None,
        flannel::Model::Flannel => {
            let mode = tokio::select! {
                m = flannel::wait_net_conf(&args, client.as_ref(), &board, &metrics) => m,
                _ = termination() => return Ok(()),
            };
            Some(mode)
        }
    };
    let secrets = match (&client, args.datastore_type.parse::<DatastoreSpec>()) {
        (Some(client), _) => datastore::secrets::SecretSource::Kube {
            client: client.clone(),
            namespace: datastore::secrets::own_namespace(),
        },
        (None, Ok(DatastoreSpec::Dir(path))) => datastore::secrets::SecretSource::Dir(path),
        _ => datastore::secrets::SecretSource::None,
    };
    if let Some(client) = client.clone()
        && !args.no_annotate
    {
        let wanted = annotate::wanted_annotations(addresses.v4, addresses.v6, args.as_number);
        match annotate::ensure_annotations(client.clone(), &node, &wanted).await {
            Ok(true) => info!(node, ?wanted, "node annotations written"),
            Ok(false) => debug!(node, "node annotations already right"),
            // Peers may still find this node by its InternalIP; keep running.
            Err(e) => warn!(error = %e, "cannot write the node's annotations"),
        }
        if let Some(f) = flannel.as_mut() {
            let latest = datastore.state.latest().unwrap_or(state.clone());
            let local = f.local(&latest, &node, addresses.v4, addresses.v6, &nic);
            let wanted = f.annotations(&local);
            match annotate::ensure_annotations(client.clone(), &node, &wanted).await {
                Ok(true) => info!(node, ?wanted, "flannel node annotations written"),
                Ok(false) => debug!(node, "flannel node annotations already right"),
                Err(e) => warn!(
                    error = %e,
                    "cannot write the node's flannel annotations; flanneld nodes do not route \
                     to this node until they are written (retried while they are stale)"
                ),
            }
            // From now on, re-written whenever the lease goes stale.
            f.annotate_with(client, node.clone());
        }
    }
    let startup = Startup {
        node,
        address: addresses.v4,
        address6: addresses.v6,
        nic,
        datastore,
        datastore_source: source,
        early_listener,
        metrics,
        board,
        secrets,
        client,
        flannel,
    };
    let (agent, dataplane) = Agent::start(args, startup).await?;
    agent.run(dataplane, termination()).await
}
