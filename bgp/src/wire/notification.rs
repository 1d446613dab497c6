//! NOTIFICATION (RFC 4271 §4.5) with the error codes of §4.5, RFC 5492, RFC 4486, RFC 7313.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Error code    | Error subcode |   Data (variable)             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Error codes (RFC 4271 §4.5, RFC 7313).
pub mod code {
    pub const MESSAGE_HEADER: u8 = 1;
    pub const OPEN_MESSAGE: u8 = 2;
    pub const UPDATE_MESSAGE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;
}

/// Message Header Error subcodes (RFC 4271 §6.1).
pub mod header_err {
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;
}

/// OPEN Message Error subcodes (RFC 4271 §6.2, RFC 5492 §5).
pub mod open_err {
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
}

/// UPDATE Message Error subcodes (RFC 4271 §6.3).
pub mod update_err {
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE: u8 = 2;
    pub const MISSING_WELL_KNOWN_ATTRIBUTE: u8 = 3;
    pub const ATTRIBUTE_FLAGS_ERROR: u8 = 4;
    pub const ATTRIBUTE_LENGTH_ERROR: u8 = 5;
    pub const INVALID_ORIGIN_ATTRIBUTE: u8 = 6;
    pub const INVALID_NEXT_HOP_ATTRIBUTE: u8 = 8;
    pub const OPTIONAL_ATTRIBUTE_ERROR: u8 = 9;
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;
}

/// Cease subcodes (RFC 4486, RFC 8203).
pub mod cease {
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMIN_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMIN_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIG_CHANGE: u8 = 6;
    pub const CONNECTION_COLLISION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;
    pub const HARD_RESET: u8 = 9;
}

/// A NOTIFICATION message: error code, subcode and diagnostic data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Bytes,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Bytes>) -> Self {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }

    /// Cease with the given subcode and no data.
    pub fn cease(subcode: u8) -> Self {
        Notification::new(code::CEASE, subcode, Bytes::new())
    }

    pub(crate) fn decode_body(body: &[u8]) -> Result<Self, super::DecodeError> {
        if body.len() < 2 {
            let len = (super::HEADER_LEN + body.len()) as u16;
            return Err(super::DecodeError::new(
                code::MESSAGE_HEADER,
                header_err::BAD_MESSAGE_LENGTH,
                len.to_be_bytes().to_vec(),
            ));
        }
        Ok(Notification::new(
            body[0],
            body[1],
            Bytes::copy_from_slice(&body[2..]),
        ))
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u8(self.code);
        out.put_u8(self.subcode);
        // A NOTIFICATION must fit in one message; truncate diagnostic data if it does not.
        let room = super::MAX_MESSAGE_LEN - super::HEADER_LEN - 2;
        out.put_slice(&self.data[..self.data.len().min(room)]);
    }

    /// The RFC name of the code, e.g. "OPEN Message Error".
    pub fn code_name(&self) -> &'static str {
        match self.code {
            code::MESSAGE_HEADER => "Message Header Error",
            code::OPEN_MESSAGE => "OPEN Message Error",
            code::UPDATE_MESSAGE => "UPDATE Message Error",
            code::HOLD_TIMER_EXPIRED => "Hold Timer Expired",
            code::FSM => "Finite State Machine Error",
            code::CEASE => "Cease",
            code::ROUTE_REFRESH => "ROUTE-REFRESH Message Error",
            _ => "Unknown error code",
        }
    }

    /// The RFC name of the subcode, e.g. "Bad Peer AS"; empty where the code has none.
    pub fn subcode_name(&self) -> &'static str {
        match (self.code, self.subcode) {
            (code::MESSAGE_HEADER, 1) => "Connection Not Synchronized",
            (code::MESSAGE_HEADER, 2) => "Bad Message Length",
            (code::MESSAGE_HEADER, 3) => "Bad Message Type",
            (code::OPEN_MESSAGE, 1) => "Unsupported Version Number",
            (code::OPEN_MESSAGE, 2) => "Bad Peer AS",
            (code::OPEN_MESSAGE, 3) => "Bad BGP Identifier",
            (code::OPEN_MESSAGE, 4) => "Unsupported Optional Parameter",
            (code::OPEN_MESSAGE, 6) => "Unacceptable Hold Time",
            (code::OPEN_MESSAGE, 7) => "Unsupported Capability",
            (code::UPDATE_MESSAGE, 1) => "Malformed Attribute List",
            (code::UPDATE_MESSAGE, 2) => "Unrecognized Well-known Attribute",
            (code::UPDATE_MESSAGE, 3) => "Missing Well-known Attribute",
            (code::UPDATE_MESSAGE, 4) => "Attribute Flags Error",
            (code::UPDATE_MESSAGE, 5) => "Attribute Length Error",
            (code::UPDATE_MESSAGE, 6) => "Invalid ORIGIN Attribute",
            (code::UPDATE_MESSAGE, 8) => "Invalid NEXT_HOP Attribute",
            (code::UPDATE_MESSAGE, 9) => "Optional Attribute Error",
            (code::UPDATE_MESSAGE, 10) => "Invalid Network Field",
            (code::UPDATE_MESSAGE, 11) => "Malformed AS_PATH",
            (code::FSM, 1) => "Receive Unexpected Message in OpenSent State",
            (code::FSM, 2) => "Receive Unexpected Message in OpenConfirm State",
            (code::FSM, 3) => "Receive Unexpected Message in Established State",
            (code::CEASE, 1) => "Maximum Number of Prefixes Reached",
            (code::CEASE, 2) => "Administrative Shutdown",
            (code::CEASE, 3) => "Peer De-configured",
            (code::CEASE, 4) => "Administrative Reset",
            (code::CEASE, 5) => "Connection Rejected",
            (code::CEASE, 6) => "Other Configuration Change",
            (code::CEASE, 7) => "Connection Collision Resolution",
            (code::CEASE, 8) => "Out of Resources",
            (code::CEASE, 9) => "Hard Reset",
            (code::ROUTE_REFRESH, 1) => "Invalid Message Length",
            _ => "",
        }
    }
}

impl fmt::Display for Notification {
    /// `OPEN Message Error / Bad Peer AS (2/2), data 0x fd e9`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code_name())?;
        let sub = self.subcode_name();
        if !sub.is_empty() {
            write!(f, " / {sub}")?;
        }
        write!(f, " ({}/{})", self.code, self.subcode)?;
        if !self.data.is_empty() {
            // RFC 8203 shutdown communication: length-prefixed UTF-8.
            if self.code == code::CEASE
                && (self.subcode == cease::ADMIN_SHUTDOWN || self.subcode == cease::ADMIN_RESET)
                && self.data[0] as usize + 1 == self.data.len()
                && let Ok(text) = std::str::from_utf8(&self.data[1..])
            {
                return write!(f, ": \"{text}\"");
            }
            f.write_str(", data 0x")?;
            for b in self.data.iter().take(32) {
                write!(f, "{b:02x}")?;
            }
            if self.data.len() > 32 {
                f.write_str("...")?;
            }
        }
        Ok(())
    }
}
