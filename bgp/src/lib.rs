//! podroute-bgp: a BGP-4 speaker (RFC 4271) for podroute.
//!
//! The core is sans-IO: [`wire`] turns bytes into typed messages and back, [`fsm`] turns
//! session events into actions, [`collision`] decides between two connections to one peer
//! (collision, a restarted peer's new session), [`gr`] does graceful restart the same way,
//! [`rib`] runs the decision process and export rules. Only `session` and [`speaker`] touch
//! tokio.

pub mod attrset;
pub mod best_changes;
pub mod collision;
pub mod connect;
pub mod fsm;
pub mod gr;
pub mod packed_btree;
pub mod policy;
pub mod rib;
pub(crate) mod session;
pub mod sockopt;
pub mod speaker;
pub mod validate;
pub mod wire;

pub use best_changes::{BestChangeBatch, BestChanges};
pub use connect::ConnectPriority;
pub use speaker::{
    EarlyListener, GrStatus, PeerConfig, PeerStatus, Speaker, SpeakerConfig, SpeakerError,
    SpeakerSummary,
};
