//! `cargo +nightly fuzz run decode_message` (from bgp/): arbitrary bytes into the decoder must
//! give messages or errors, never a panic, and `frame_len` must agree with `decode_message`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use podroute_bgp::wire::{CodecContext, decode_message, encode_message, frame_len};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let ctx = CodecContext {
        four_octet_as: flags & 1 != 0,
    };
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        let framed = frame_len(&buf);
        match decode_message(&mut buf, ctx) {
            Ok(Some(msg)) => {
                assert_eq!(framed, Ok(Some(before - buf.len())));
                // Whatever decoded must encode and decode again.
                let mut out = BytesMut::new();
                encode_message(&msg, ctx, &mut out);
                let _ = decode_message(&mut out, ctx);
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
});
