//! The message header (RFC 4271 §4.1) and message framing.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                           Marker (16 octets of 0xff)          +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::notification::{code, header_err};
use super::{CodecContext, DecodeError, Family, Message, Notification, Open, RouteRefresh, Update};
use bytes::{Buf, BufMut, BytesMut};

pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
pub const MARKER: [u8; 16] = [0xff; 16];

/// Message type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Open = 1,
    Update = 2,
    Notification = 3,
    Keepalive = 4,
    RouteRefresh = 5,
}

pub(crate) fn put_header(out: &mut BytesMut, t: MessageType) {
    out.put_slice(&MARKER);
    out.put_u16(0);
    out.put_u8(t as u8);
}

/// Fill in the length of the message that starts at `start`.
pub(crate) fn finish_header(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start) as u16;
    out[start + 16..start + 18].copy_from_slice(&len.to_be_bytes());
}

/// If `buf` starts with a complete message, its length. Checks the header (marker, length
/// bounds, type) so a stream with a bad header fails before the body arrives.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != MARKER {
        return Err(DecodeError::new(
            code::MESSAGE_HEADER,
            header_err::CONNECTION_NOT_SYNCHRONIZED,
            Vec::new(),
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let t = buf[18];
    let bad_len = || {
        DecodeError::new(
            code::MESSAGE_HEADER,
            header_err::BAD_MESSAGE_LENGTH,
            (len as u16).to_be_bytes().to_vec(),
        )
    };
    // RFC 4271 §6.1 minimum lengths per type; KEEPALIVE is exactly 19.
    let min = match t {
        1 => 29,
        2 => 23,
        3 => 21,
        4 => 19,
        5 => 23,
        _ => {
            return Err(DecodeError::new(
                code::MESSAGE_HEADER,
                header_err::BAD_MESSAGE_TYPE,
                vec![t],
            ));
        }
    };
    if !(min..=MAX_MESSAGE_LEN).contains(&len) || (t == 4 && len != 19) {
        return Err(bad_len());
    }
    Ok(if buf.len() >= len { Some(len) } else { None })
}

/// Take one complete message off the front of `buf`. `Ok(None)` means more bytes are needed.
/// An error carries the NOTIFICATION to send before closing the session.
pub fn decode_message(
    buf: &mut BytesMut,
    ctx: CodecContext,
) -> Result<Option<Message>, DecodeError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let frame = buf.split_to(len);
    let t = frame[18];
    let body = &frame[HEADER_LEN..];
    let msg = match t {
        1 => Message::Open(Open::decode_body(body)?),
        2 => Message::Update(Update::decode_body(body, ctx)?),
        3 => Message::Notification(Notification::decode_body(body)?),
        4 => Message::Keepalive,
        _ if len != 23 => {
            // RFC 7313 §5: a ROUTE-REFRESH whose body is not 4 octets is answered with
            // ROUTE-REFRESH Message Error / Invalid Message Length carrying the whole message
            // (podroute negotiates no ORF, RFC 5291, so no longer form is valid).
            return Err(DecodeError::new(code::ROUTE_REFRESH, 1, frame.freeze()));
        }
        _ => {
            let mut b = body;
            let afi = b.get_u16();
            let subtype = b.get_u8();
            let safi = b.get_u8();
            Message::RouteRefresh(RouteRefresh {
                family: Family { afi, safi },
                subtype,
            })
        }
    };
    Ok(Some(msg))
}

/// Append `msg` as one framed message.
pub fn encode_message(msg: &Message, ctx: CodecContext, out: &mut BytesMut) {
    let start = out.len();
    match msg {
        Message::Update(u) => return u.encode(ctx, out),
        Message::Open(o) => {
            put_header(out, MessageType::Open);
            o.encode_body(out);
        }
        Message::Notification(n) => {
            put_header(out, MessageType::Notification);
            n.encode_body(out);
        }
        Message::Keepalive => put_header(out, MessageType::Keepalive),
        Message::RouteRefresh(r) => {
            put_header(out, MessageType::RouteRefresh);
            out.put_u16(r.family.afi);
            out.put_u8(r.subtype);
            out.put_u8(r.family.safi);
        }
    }
    finish_header(out, start);
}
