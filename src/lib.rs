//! podroute: a Calico-compatible pod-network routing agent.
//!
//! The modules follow the data flow in DESIGN.md: datastore → ClusterState → plan →
//! dataplane, with the BGP speaker (crate `podroute-bgp`) feeding learned routes into the plan.

pub use podroute_bgp as bgp;

pub mod agent;
pub mod cli;
pub mod crds;
pub mod dataplane;
pub mod datastore;
pub mod http;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod prefix_map;
pub mod state;
