//! `podroute agent`: the datastore, the BGP speaker and the dataplane wired into one process.

pub mod annotate;
pub mod autodetect;
pub mod config;
pub mod status;

pub use config::AgentArgs;
