//! `podroute agent` flags. Every flag is also an environment variable; where calico/node has
//! one for the same setting, the variable has Calico's name (`NODENAME`, `IP`,
//! `IP_AUTODETECTION_METHOD`, `AS`, `DATASTORE_TYPE`), so a calico-node DaemonSet's `env`
//! carries over. podroute's own settings are `PODROUTE_*`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;

/// Default address of the HTTP server (metrics, health, status API): Felix's metrics port.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9091";

/// `podroute agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// This node's name, as in its Kubernetes `Node` (default: the host name).
    #[arg(long, env = "NODENAME")]
    pub nodename: Option<String>,

    /// The node's IPv4 address: `autodetect` (default), `none`, or an address with its prefix
    /// (`10.0.0.5/24`; without a prefix the address is taken as /32, so no peer is in the same
    /// subnet).
    #[arg(long, env = "IP", default_value = "autodetect")]
    pub ip: String,

    /// The node's IPv6 address: `none` (default, as calico/node without `IP6`: the Node's
    /// `projectcalico.org/IPv6Address`, if any, is used), `autodetect`, or a global address
    /// with its prefix (`fd00:92::128/64`). Never link-local: it is the IPv6 next hop.
    #[arg(long, env = "IP6", default_value = "none")]
    pub ip6: String,

    /// How `--ip6 autodetect` finds the address: the same methods as
    /// `--ip-autodetection-method`, with IPv6 networks and addresses.
    #[arg(long, env = "IP6_AUTODETECTION_METHOD", default_value = "first-found")]
    pub ip6_autodetection_method: String,

    /// BGP router ID: the node's IPv4 address when unset; `hash` for a stable ID from the
    /// node name (Calico's; used by default on an IPv6-only node); or an ID in IPv4 form.
    #[arg(long, env = "CALICO_ROUTER_ID", value_parser = str::parse::<crate::agent::router_id::RouterIdChoice>)]
    pub router_id: Option<crate::agent::router_id::RouterIdChoice>,

    /// How `--ip autodetect` finds the address: `first-found`, `interface=REGEX`,
    /// `skip-interface=REGEX`, `can-reach=ADDR`, `cidr=CIDR[,CIDR...]`,
    /// `kubernetes-internal-ip`.
    #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
    pub ip_autodetection_method: String,

    /// The node's AS number; overrides the `projectcalico.org/ASNumber` annotation and the
    /// cluster's `asNumber`. Written to the annotation when set.
    #[arg(long = "as", env = "AS", value_name = "ASN")]
    pub as_number: Option<u32>,

    /// Where the cluster objects come from: `kubernetes` (in-cluster or KUBECONFIG) or
    /// `dir:PATH` (a directory of YAML files, re-read every second).
    #[arg(long, env = "DATASTORE_TYPE", default_value = "kubernetes")]
    pub datastore_type: String,

    /// Host NIC for direct routes and the tunnel MTU (default: the interface that holds the
    /// node address).
    #[arg(long, env = "PODROUTE_NIC")]
    pub nic: Option<String>,

    /// HTTP server: `/metrics`, `/livez`, `/readyz` and, unless `--status-addr` is set, the
    /// status API (`/status`, `/routes`) that `podroute status` reads.
    #[arg(long, env = "PODROUTE_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    /// Serve the status API (`/status`, `/routes`) on this address only, not on
    /// `--metrics-addr` (e.g. `127.0.0.1:9092`, so that pods cannot read it).
    #[arg(long, env = "PODROUTE_STATUS_ADDR")]
    pub status_addr: Option<SocketAddr>,

    /// Most HTTP connections open at once, per listening address. At the cap a new connection
    /// closes the least recently active one (an idle one at once, a busy one after its answer).
    /// Held to a quarter of the open-file limit, so that BGP and the datastore always have
    /// descriptors.
    #[arg(long, env = "PODROUTE_HTTP_MAX_CONNECTIONS", default_value_t = crate::http::DEFAULT_MAX_CONNECTIONS)]
    pub http_max_connections: usize,

    /// Time an HTTP client has to send a complete request head, counted from when the server
    /// waits for one (a new connection, or the next request on a kept-alive one).
    #[arg(long, env = "PODROUTE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// An HTTP connection on which no byte has moved either way for this long is closed
    /// (an idle kept-alive connection, a client that stopped reading its answer).
    #[arg(long, env = "PODROUTE_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// Per-peer metric series (`peer` label): `always`, `never`, or `auto` (only while there
    /// are at most `--metrics-peer-label-limit` peers). Totals over all peers are always
    /// exported.
    #[arg(long, env = "PODROUTE_METRICS_PEER_LABELS", value_enum, default_value_t = crate::metrics::PeerLabels::Auto)]
    pub metrics_peer_labels: crate::metrics::PeerLabels,

    /// Number of peers up to which `--metrics-peer-labels auto` exports per-peer series.
    #[arg(long, env = "PODROUTE_METRICS_PEER_LABEL_LIMIT", default_value_t = crate::metrics::DEFAULT_PEER_LABEL_LIMIT)]
    pub metrics_peer_label_limit: usize,

    /// Address the BGP listener binds to; the port is BGPConfiguration `listenPort` (179). Default: `::`, dual-stack (IPv6 peers such as Calico's bird6, and IPv4 peers seen as ::ffff:a.b.c.d, matched to their IPv4 address), or `0.0.0.0` when the host has IPv6 disabled.
    #[arg(long, env = "PODROUTE_BGP_BIND")]
    pub bgp_bind: Option<IpAddr>,

    /// Carry IPv6 unicast inside the IPv4 mesh and BGPPeer sessions (one session per peer,
    /// no separate IPv6 mesh between dual-stack nodes). Only for clusters where every node
    /// runs podroute: Calico's bird and bird6 take one family per session, over the nodes'
    /// IPv4 and IPv6 addresses, which is the default.
    #[arg(long, env = "PODROUTE_BGP_MULTIPROTOCOL_SESSIONS")]
    pub bgp_multiprotocol_sessions: bool,

    /// BGP hold time offered to peers, seconds (keepalive = hold / 3). 0 or 3..=65535.
    #[arg(long, env = "PODROUTE_HOLD_TIME", default_value_t = 240)]
    pub hold_time: u16,

    /// Wait before retrying a peer that refused or did not answer; doubles with each failure
    /// in a row (with jitter: each delay cut by 0–25 %) up to `--connect-retry-max`, and
    /// starts over once a session is up. A refused attempt (the host answered with a reset:
    /// nothing listens yet, as while a peer restarts) is retried sooner: the first three
    /// refusals in a row wait 1 s, 2 s, 4 s (never more than `--connect-retry`), and do not
    /// count in the doubling, which then goes on from `--connect-retry` (5, 10, 20 s ... up to
    /// 120 s). Timeouts and any further refusal take the normal backoff, so a peer that keeps
    /// refusing costs at most three attempts more than the normal backoff.
    #[arg(long, env = "PODROUTE_CONNECT_RETRY", default_value = "5s", value_parser = parse_duration)]
    pub connect_retry: Duration,

    /// Longest wait between connection attempts to a peer that keeps failing.
    #[arg(long, env = "PODROUTE_CONNECT_RETRY_MAX", default_value = "120s", value_parser = parse_duration)]
    pub connect_retry_max: Duration,

    /// How `tunl0` is made for IPIP pools: `kernel` (the `ipip` module), `userspace` (a TUN
    /// device plus a raw IP-protocol-4 socket, for kernels without `ipip`), or `auto` (kernel
    /// when it can create an ipip device, else userspace).
    #[arg(long, env = "PODROUTE_IPIP_DATAPLANE", default_value = "auto")]
    pub ipip_dataplane: crate::dataplane::ipip_user::IpipDataplane,

    /// Who runs the userspace IPIP forwarder process (`podroute ipip-forwarder`): `agent`
    /// (the agent starts it, detached, when none answers; it outlives the agent and the
    /// agent's next run adopts it) or `external` (another container of the pod runs it; the
    /// agent only connects). Kubernetes kills every process of a container with its main
    /// process, so in a DaemonSet `external` with a second container keeps tunnelled traffic
    /// going through agent restarts.
    #[arg(
        long,
        env = "PODROUTE_IPIP_FORWARDER",
        value_enum,
        default_value = "agent"
    )]
    pub ipip_forwarder: crate::dataplane::ipip_user::process::ForwarderOwner,

    /// Route protocol number marking podroute's routes (`ip route show proto 157`).
    #[arg(long, env = "PODROUTE_ROUTE_PROTOCOL", default_value_t = crate::dataplane::DEFAULT_ROUTE_PROTOCOL)]
    pub route_protocol: u8,

    /// How long `/readyz` waits for mesh peers to reach Established before giving up on them.
    #[arg(long, env = "PODROUTE_READY_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub ready_grace: Duration,

    /// After a restart (routes of ours already in the kernel), how long BGP best-path
    /// selection and the first route update wait for every peer's End-of-RIB (RFC 4724
    /// selection deferral); until then the kernel routes of the previous run stay as they are.
    #[arg(long, env = "PODROUTE_SELECTION_DEFERRAL", default_value = "5s", value_parser = parse_duration)]
    pub selection_deferral: Duration,

    /// How often the YAML-directory datastore is re-read.
    #[arg(long, env = "PODROUTE_DIR_POLL", default_value = "1s", value_parser = parse_duration)]
    pub dir_poll: Duration,

    /// YAML-directory datastore: files larger than this many bytes are not read (one log
    /// line; the objects read from the file before stay in force).
    #[arg(long, env = "PODROUTE_DATASTORE_MAX_FILE_SIZE", default_value_t = crate::datastore::dir::DEFAULT_MAX_FILE_SIZE)]
    pub datastore_max_file_size: u64,

    /// How long a datastore wipe (every object of a kind gone at once, this node's own Node
    /// gone, a YAML file emptied) must last before it is applied; until then the previous
    /// objects stay in force and `/readyz` fails with the reason.
    #[arg(long, env = "PODROUTE_DATASTORE_WIPE_CONFIRM", default_value = "60s", value_parser = parse_duration)]
    pub datastore_wipe_confirm: Duration,

    /// Do not write the node's IPv4Address / IPv6Address / ASNumber annotations, nor in
    /// flannel mode its flannel.alpha.coreos.com annotations (kubernetes datastore).
    #[arg(long, env = "PODROUTE_NO_ANNOTATE")]
    pub no_annotate: bool,

    /// On SIGTERM/SIGINT, set the Node's `NetworkUnavailable` condition to `True` (reason
    /// `PodrouteIsDown`), as calico-node does on shutdown (kubernetes datastore). `false`
    /// leaves it at `False` through restarts.
    #[arg(long, env = "PODROUTE_SHUTDOWN_CONDITION", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub shutdown_condition: bool,

    /// Whose objects describe the cluster: `calico` (IPPools, IPAMBlocks, Node annotations,
    /// BGP mesh) or `flannel` (flannel's net-conf.json and the Nodes' podCIDRs and
    /// flannel.alpha.coreos.com annotations: routes and VXLAN entries as flanneld makes them;
    /// BGP only to explicit BGPPeers).
    #[arg(long, env = "PODROUTE_MODEL", value_enum, default_value_t = crate::agent::flannel::Model::Calico)]
    pub model: crate::agent::flannel::Model,

    /// flannel mode: read net-conf.json from this file (flanneld's `--net-config-path`, e.g.
    /// `/etc/kube-flannel/net-conf.json` mounted from the ConfigMap) instead of the ConfigMap.
    #[arg(long, env = "PODROUTE_FLANNEL_NET_CONF", value_name = "PATH")]
    pub flannel_net_conf: Option<std::path::PathBuf>,

    /// flannel mode: the ConfigMap holding net-conf.json, `NAME` (looked up in kube-flannel,
    /// then kube-system) or `NAMESPACE/NAME`; with the YAML-directory datastore, a ConfigMap
    /// document of that name among the directory's files.
    #[arg(long, env = "PODROUTE_FLANNEL_CONFIGMAP", default_value = crate::model::flannel::CONFIGMAP_NAME)]
    pub flannel_configmap: String,

    /// flannel mode: the file the flannel CNI plugin reads (flanneld's `--subnet-file`).
    #[arg(long, env = "PODROUTE_FLANNEL_SUBNET_FILE", default_value = crate::agent::flannel::DEFAULT_SUBNET_FILE)]
    pub flannel_subnet_file: std::path::PathBuf,

    /// flannel mode: `FLANNEL_IPMASQ` in the subnet file. `true` tells the CNI plugin that the
    /// node masquerades pod traffic leaving the cluster itself (flanneld's `--ip-masq`);
    /// podroute does not, so keep `false` (the CNI bridge then masquerades) unless something
    /// else on the node does.
    #[arg(long, env = "PODROUTE_FLANNEL_IP_MASQ", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub flannel_ip_masq: bool,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,podroute_bgp=debug`).
    #[arg(long, env = "PODROUTE_LOG", default_value = "info")]
    pub log: String,
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    crate::model::bgp::parse_go_duration(t)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms, 5s, 2m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        use clap::Parser;
        Cmd::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).map(|c| c.agent)
    }

    #[test]
    fn http_and_metrics_bounds_parse_into_typed_values() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.metrics_peer_labels, crate::metrics::PeerLabels::Auto);
        assert_eq!(a.metrics_peer_label_limit, 100);
        assert_eq!(a.status_addr, None);
        assert_eq!(a.http_max_connections, crate::http::DEFAULT_MAX_CONNECTIONS);
        assert_eq!(a.http_header_timeout, Duration::from_secs(10));
        assert_eq!(a.http_idle_timeout, Duration::from_secs(60));

        let a = parse(&[
            "--metrics-peer-labels",
            "never",
            "--status-addr",
            "127.0.0.1:9092",
            "--http-idle-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(a.metrics_peer_labels, crate::metrics::PeerLabels::Never);
        assert_eq!(a.status_addr, Some("127.0.0.1:9092".parse().unwrap()));
        assert_eq!(a.http_idle_timeout, Duration::from_millis(500));
        let err = parse(&["--metrics-peer-labels", "sometimes"]).unwrap_err();
        assert!(err.to_string().contains("auto, always, never"), "{err}");
    }

    #[test]
    fn model_flags() {
        use crate::agent::flannel::{Model, NetConfSource, net_conf_source};
        let a = parse(&[]).unwrap();
        assert_eq!(a.model, Model::Calico);
        assert!(!a.flannel_ip_masq);
        assert_eq!(
            a.flannel_subnet_file,
            std::path::PathBuf::from("/run/flannel/subnet.env")
        );
        assert_eq!(
            net_conf_source(&a),
            NetConfSource::ConfigMap {
                namespace: None,
                name: "kube-flannel-cfg".into()
            }
        );
        let a = parse(&[
            "--model",
            "flannel",
            "--flannel-configmap",
            "kube-system/flannel-cfg",
        ])
        .unwrap();
        assert_eq!(a.model, Model::Flannel);
        assert_eq!(
            net_conf_source(&a),
            NetConfSource::ConfigMap {
                namespace: Some("kube-system".into()),
                name: "flannel-cfg".into()
            }
        );
        let a = parse(&["--datastore-type", "dir:/etc/podroute"]).unwrap();
        assert_eq!(
            net_conf_source(&a),
            NetConfSource::DirConfigMap {
                dir: "/etc/podroute".into(),
                name: "kube-flannel-cfg".into()
            }
        );
        let a = parse(&["--flannel-net-conf", "/etc/kube-flannel/net-conf.json"]).unwrap();
        assert_eq!(
            net_conf_source(&a),
            NetConfSource::File("/etc/kube-flannel/net-conf.json".into())
        );
        let err = parse(&["--model", "weave"]).unwrap_err();
        assert!(err.to_string().contains("calico, flannel"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
