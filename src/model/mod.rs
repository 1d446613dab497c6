//! The Calico-compatible cluster model.
//!
//! [`crd`] holds the objects as stored (lenient, every field optional); the other modules
//! hold the validated forms the rest of the agent works with ([`Pool`], [`Block`],
//! [`BlockClaim`], [`Peer`], [`BgpConfig`], [`NodeInfo`]). Each validated type has a
//! `from_resource`/`from_node` constructor that returns a [`Rejection`] naming the object
//! and the reason when the object cannot be used.

pub mod bgp;
pub mod block;
pub mod cidr;
pub mod compact;
pub mod crd;
pub mod decode;
pub mod error;
mod fast_yaml;
pub mod filter;
pub mod flannel;
pub mod node;
pub mod pool;
pub mod service;
pub mod workload;

pub use bgp::{BgpConfig, Peer};
pub use block::{Affinity, Allocation, Block, BlockClaim};
pub use decode::{DecodeError, Object, decode_documents, decode_documents_each};
pub use error::{Kind, Reason, Rejection};
pub use filter::Filter;
pub use node::{AddressSource, NodeInfo};
pub use pool::{EncapMode, Pool, resolve_overlaps};
pub use service::{EndpointSliceInfo, ServiceInfo, TrafficPolicy};
pub use workload::workload_interface_name;
