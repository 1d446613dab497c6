//! The BGP-4 wire format (RFC 4271 §4), sans-IO: bytes in, typed messages out, and back.
//!
//! Decoding is two steps, as RFC 7606 asks: [`decode_message`] does framing and structural
//! decode with checked arithmetic and returns either a message or the NOTIFICATION that the
//! session must send; attribute errors that RFC 7606 answers with "treat-as-withdraw" or
//! "attribute discard" are recorded in [`Update::errors`] instead of failing the message.
//! Peer-dependent checks (eBGP/iBGP) live in [`crate::validate`].

mod attr;
mod header;
mod nlri;
mod notification;
mod open;
mod update;

pub use attr::{Aggregator, AsPath, AsSegment, AttrError, ErrorAction, Origin, PathAttrs, RawAttr};
pub use header::{
    HEADER_LEN, MARKER, MAX_MESSAGE_LEN, MessageType, decode_message, encode_message, frame_len,
};
pub use nlri::{Family, decode_prefixes, encode_prefix};
pub use notification::{Notification, cease, code, header_err, open_err, update_err};
pub use open::{AS_TRANS, Capability, GrFamily, GracefulRestartCap, Open};
pub use update::{MpReach, MpUnreach, NextHop, Update, UpdateEncoder};

/// What the peer and we agreed in the OPEN exchange that changes how bytes are read or written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodecContext {
    /// Both sides sent the 4-octet AS capability (RFC 6793): AS numbers are 4 octets on the wire.
    pub four_octet_as: bool,
}

/// A BGP message (RFC 4271 §4.1 type codes 1..=4, RFC 2918 type 5).
// Messages live only between the socket and the session; boxing Update would change the
// public API for no measurable gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

/// ROUTE-REFRESH (RFC 2918 §3), with the RFC 7313 subtype byte kept as it was received.
///
/// ```text
///  0       7      15      23      31
/// +-------+-------+-------+-------+
/// |      AFI      |  Res. | SAFI  |
/// +-------+-------+-------+-------+
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRefresh {
    pub family: Family,
    pub subtype: u8,
}

/// A framing or structural error: the session answers it with this NOTIFICATION and closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{notification}")]
pub struct DecodeError {
    pub notification: Notification,
}

impl DecodeError {
    pub fn new(code: u8, subcode: u8, data: impl Into<bytes::Bytes>) -> Self {
        DecodeError {
            notification: Notification::new(code, subcode, data),
        }
    }
}
