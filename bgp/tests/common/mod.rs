//! Helpers shared by the codec tests: hex vectors and framing.
#![allow(dead_code)]

use bytes::BytesMut;
use podroute_bgp::wire::*;

/// Bytes from hex, ignoring whitespace and `|` separators used to show field boundaries.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii_hexdigit())
        .map(|b| (b as char).to_digit(16).unwrap() as u8)
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd hex digits in {s:?}");
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// A whole message: marker, length, `type` and `body`.
pub fn framed(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(t);
    m.extend_from_slice(body);
    m
}

/// An UPDATE with no withdrawn routes, the given attributes and NLRI (hex).
pub fn update_msg(attrs: &str, nlri: &str) -> Vec<u8> {
    let a = hex(attrs);
    let mut body = vec![0, 0];
    body.extend_from_slice(&(a.len() as u16).to_be_bytes());
    body.extend_from_slice(&a);
    body.extend_from_slice(&hex(nlri));
    framed(2, &body)
}

pub const FOUR: CodecContext = CodecContext {
    four_octet_as: true,
};
pub const TWO: CodecContext = CodecContext {
    four_octet_as: false,
};

pub fn decode(bytes: &[u8], ctx: CodecContext) -> Result<Message, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let m = decode_message(&mut buf, ctx).map(|m| m.expect("a complete message"));
    if m.is_ok() {
        assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    }
    m
}

pub fn encode(msg: &Message, ctx: CodecContext) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_message(msg, ctx, &mut out);
    out.to_vec()
}

/// Both directions: `bytes` decode to `msg` and `msg` encodes to `bytes`.
pub fn both_ways(bytes: &[u8], msg: &Message, ctx: CodecContext) {
    assert_eq!(&decode(bytes, ctx).expect("decodes"), msg, "decode");
    assert_eq!(hexs(&encode(msg, ctx)), hexs(bytes), "encode");
}

pub fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}
