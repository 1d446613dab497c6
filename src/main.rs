//! The `podroute` binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "podroute",
    version,
    about = "Calico-compatible pod-network routing agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the routing agent on this node (normally as a DaemonSet).
    Agent(Box<podroute::agent::AgentArgs>),
    /// Run the userspace IPIP forwarder of `tunl0` (the TUN device the agent makes on kernels
    /// without `ipip`) in this network namespace. The agent starts it when none runs (or,
    /// with `--ipip-forwarder external`, another container does), and it keeps forwarding
    /// with its last tunnel table while the agent is down. Needs CAP_NET_ADMIN and
    /// CAP_NET_RAW.
    IpipForwarder {
        /// The TUN device.
        #[arg(long, default_value = podroute::plan::TUNNEL_DEVICE)]
        device: String,
        /// The node's address: source of outer headers, destination of received ones.
        #[arg(long)]
        local: std::net::Ipv4Addr,
        /// Log filter (tracing `EnvFilter` syntax).
        #[arg(long, env = "PODROUTE_LOG", default_value = "info")]
        log: String,
        /// Start forwarding only once the agent has made the device as a TUN device (it is
        /// never created here): for a forwarder container started with every pod, idle on
        /// nodes whose kernel has `ipip`.
        #[arg(long)]
        wait_for_device: bool,
    },
    /// Print the version.
    Version,
    /// Print the CustomResourceDefinitions podroute reads (crd.projectcalico.org/v1).
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Build seed 001's cluster (plus a node behind a router) in network namespaces, run one
    /// agent per node, check routes and pod-to-pod pings, then remove it all (root only).
    /// Exit status 1 when a check failed, 2 when the lab could not run.
    Lab {
        /// Leave the lab running afterwards (remove it with `podroute lab --cleanup`).
        #[arg(long)]
        keep: bool,
        /// Prefix of the lab's network namespaces.
        #[arg(long, default_value = podroute::lab::DEFAULT_PREFIX)]
        prefix: String,
        /// Remove a lab left running (or behind): stop its processes, delete its namespaces.
        #[arg(long, conflicts_with = "keep")]
        cleanup: bool,
        /// The podroute binary the agents run (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long to wait for the agents to converge.
        #[arg(long, default_value = "60s", value_parser = podroute::agent::config::parse_duration)]
        timeout: std::time::Duration,
        /// `calico`: seed 001's Calico cluster; `flannel`: seed 000's flannel cluster with the
        /// agents in flannel mode (planned tables without root).
        #[arg(long, value_enum, default_value_t = podroute::agent::flannel::Model::Calico)]
        model: podroute::agent::flannel::Model,
        /// Address families of the cluster: `ipv4` (seed 001), `dual` (IPv4 and IPv6 node
        /// addresses, pools, blocks and pods; one mesh per family) or `ipv6` (IPv6-only).
        #[arg(long, value_enum, default_value_t)]
        family: podroute::lab::Family,
        /// The pool's encapsulation: `ipip` (ipipMode CrossSubnet, seed 001) or `vxlan`
        /// (vxlanMode CrossSubnet, the kernel's vxlan.calico across the router).
        #[arg(long, value_enum, default_value_t = podroute::lab::LabEncap::Ipip)]
        encap: podroute::lab::LabEncap,
    },
    /// Show the running agent's BGP peers and health, like `calicoctl node status`.
    Status {
        /// URL of the agent's status API. Default: `PODROUTE_STATUS_ADDR`, else
        /// `PODROUTE_METRICS_ADDR` (as the agent's container sets them), else
        /// http://127.0.0.1:9091.
        #[arg(long, env = "PODROUTE_AGENT")]
        agent: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: podroute::cli::Output,
        /// List every BGP peer (by default the agent lists at most 100, those not
        /// Established first).
        #[arg(long)]
        all: bool,
    },
    /// Show the routes the running agent programs, like `route -n`.
    Routes {
        /// URL of the agent's status API (default as for `podroute status`).
        #[arg(long, env = "PODROUTE_AGENT")]
        agent: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: podroute::cli::Output,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            one_malloc_arena();
            init_logging(&args.log);
            raise_nofile_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(podroute::agent::run(*args))?;
        }
        Command::IpipForwarder {
            device,
            local,
            log,
            wait_for_device,
        } => {
            init_logging(&log);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let mut config = podroute::dataplane::ipip_user::ForwarderConfig::new(local);
            config.device = device;
            runtime
                .block_on(podroute::dataplane::ipip_user::process::serve_when(
                    config,
                    wait_for_device,
                ))
                .context("userspace IPIP forwarder")?;
        }
        Command::Version => {
            println!("podroute {}", env!("CARGO_PKG_VERSION"));
        }
        Command::Crds { out_dir: None } => {
            print!("{}", podroute::crds::render_all()?);
        }
        Command::Lab {
            cleanup: true,
            prefix,
            ..
        } => match podroute::lab::cleanup_prefix(&prefix) {
            Ok(done) => {
                for line in done {
                    println!("{line}");
                }
                println!("lab {prefix:?} removed");
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        },
        Command::Lab {
            keep,
            prefix,
            binary,
            timeout,
            model,
            family,
            encap,
            cleanup: false,
        } => {
            podroute::lab::install_signal_cleanup().context("installing the Ctrl-C handler")?;
            let opts = podroute::lab::LabOptions {
                prefix,
                keep,
                binary,
                timeout,
                family,
                encap,
            };
            let run = match model {
                podroute::agent::flannel::Model::Calico => podroute::lab::run,
                podroute::agent::flannel::Model::Flannel => podroute::lab::flannel::run,
            };
            // Exit status: 0 all checks passed, 1 a check failed, 2 the lab could not run.
            match run(&opts, &mut std::io::stdout()) {
                Ok(true) => {}
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Crds { out_dir: Some(dir) } => {
            for crd in podroute::crds::all() {
                let path = dir.join(&crd.file_name);
                std::fs::write(&path, crd.to_yaml()?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        // Client errors are for the user, not a backtrace: print them and exit 1.
        Command::Status { agent, output, all } => {
            let agent = podroute::cli::agent_url(agent);
            let peers = if all {
                podroute::cli::Peers::All
            } else {
                podroute::cli::Peers::Default
            };
            match podroute::cli::status_command_with(&agent, output, peers) {
                Ok(text) => print!("{text}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Routes { agent, output } => {
            match podroute::cli::routes_command(&podroute::cli::agent_url(agent), output) {
                Ok(text) => print!("{text}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `filter` (`RUST_LOG` syntax).
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Raises the soft open-file limit to the hard one: every BGP session, HTTP client, watch
/// and netlink socket is a descriptor, and container runtimes often start processes with a
/// soft limit of 1024 under a hard limit of a million. Logged either way.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
        return;
    }
    let (soft, hard) = (lim.rlim_cur, lim.rlim_max);
    if soft >= hard {
        tracing::info!(
            soft,
            hard,
            "open-file limit (RLIMIT_NOFILE) already at its maximum"
        );
        return;
    }
    lim.rlim_cur = hard;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(
            from = soft,
            to = hard,
            "open-file limit (RLIMIT_NOFILE) soft limit raised to the hard limit"
        );
    } else {
        let e = std::io::Error::last_os_error();
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
    }
}

/// glibc gives every thread that allocates its own malloc arena, and memory freed into one
/// arena is not reused by the others: the agent's tables are built on whichever runtime
/// thread runs a task and freed on another, so per-thread arenas held several MiB more at
/// 100,000 routes (`benches/bgp_to_kernel.rs`, peak RSS) for no speed we could measure. One
/// arena for the process; must run before any thread starts. (musl, the release image's libc,
/// has no arenas.)
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
