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
