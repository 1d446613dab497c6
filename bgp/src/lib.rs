//! podroute-bgp: a BGP-4 speaker (RFC 4271) for podroute.
//!
//! The core is sans-IO: [`wire`] turns bytes into typed messages and back, [`fsm`] turns
//! session events into actions. Only [`session`] and [`speaker`] touch tokio.

pub mod validate;
pub mod wire;
