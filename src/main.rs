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
    /// Print the version.
    Version,
    /// Print the CustomResourceDefinitions podroute reads (crd.projectcalico.org/v1).
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            init_logging(&args.log);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(podroute::agent::run(*args))?;
        }
        Command::Version => {
            println!("podroute {}", env!("CARGO_PKG_VERSION"));
        }
        Command::Crds { out_dir: None } => {
            print!("{}", podroute::crds::render_all()?);
        }
        Command::Crds { out_dir: Some(dir) } => {
            for crd in podroute::crds::all() {
                let path = dir.join(&crd.file_name);
                std::fs::write(&path, crd.to_yaml()?)
                    .with_context(|| format!("writing {}", path.display()))?;
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
