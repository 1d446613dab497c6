//! Error handling per RFC 4271 §6 and RFC 7606: which NOTIFICATION (code/subcode/data) a
//! malformed message earns, and which RFC 7606 action a malformed attribute gets.

mod common;

use bytes::BytesMut;
use common::*;
use podroute_bgp::wire::*;

fn notification(bytes: &[u8], ctx: CodecContext) -> (u8, u8, Vec<u8>) {
    let n = decode(bytes, ctx).expect_err("must fail").notification;
    (n.code, n.subcode, n.data.to_vec())
}

fn with_len(len: u16, t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&len.to_be_bytes());
    m.push(t);
    m.extend_from_slice(body);
    m
}

// --- RFC 4271 §6.1 Message Header errors --------------------------------------------------------

#[test]
fn bad_marker_is_connection_not_synchronized() {
    let mut m = framed(4, &[]);
    m[3] = 0xfe;
    assert_eq!(notification(&m, FOUR), (1, 1, vec![]));
    // Detected from the header alone, before the body arrives.
    assert!(frame_len(&m[..19]).is_err());
}

#[test]
fn bad_lengths_carry_the_length_field() {
    let cases: [(u16, u8, usize); 8] = [
        (18, 4, 0),      // below the header
        (4097, 2, 4078), // above 4096
        (20, 4, 1),      // KEEPALIVE must be exactly 19
        (28, 1, 9),      // OPEN minimum is 29
        (22, 2, 3),      // UPDATE minimum is 23
        (20, 3, 1),      // NOTIFICATION minimum is 21
        (0, 1, 0),
        (0xffff, 3, 0),
    ];
    for (len, t, body) in cases {
        let m = with_len(len, t, &vec![0; body]);
        assert_eq!(
            notification(&m, FOUR),
            (1, 2, len.to_be_bytes().to_vec()),
            "length {len} type {t}"
        );
        // frame_len already knows from the 19-octet header.
        assert!(frame_len(&m[..19]).is_err());
    }
}

#[test]
fn bad_type_carries_the_type() {
    for t in [0u8, 6, 255] {
        assert_eq!(notification(&framed(t, &[]), FOUR), (1, 3, vec![t]));
    }
}

#[test]
fn incomplete_input_asks_for_more() {
    let m = framed(1, &hex("04 fde9 005a 0a000001 00"));
    for cut in 0..m.len() {
        let mut buf = BytesMut::from(&m[..cut]);
        assert_eq!(decode_message(&mut buf, FOUR), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
}

#[test]
fn route_refresh_wrong_length_is_7_1_with_the_message() {
    let m = framed(5, &hex("0001 00 01 00"));
    assert_eq!(notification(&m, FOUR), (7, 1, m.clone()));
}

// --- RFC 4271 §6.2 OPEN errors ------------------------------------------------------------------

fn open(version: u8, asn: u16, hold: u16, id: &str, params: &str) -> Vec<u8> {
    let p = hex(params);
    let mut body = vec![version];
    body.extend_from_slice(&asn.to_be_bytes());
    body.extend_from_slice(&hold.to_be_bytes());
    body.extend_from_slice(&hex(id));
    body.push(p.len() as u8);
    body.extend_from_slice(&p);
    framed(1, &body)
}

#[test]
fn open_errors() {
    // Version 3: Unsupported Version Number, data = largest supported version (2 octets).
    assert_eq!(
        notification(&open(3, 65001, 90, "0a000001", ""), FOUR),
        (2, 1, vec![0, 4])
    );
    // Optional parameter type 1 (authentication, deprecated): Unsupported Optional Parameter.
    assert_eq!(
        notification(&open(4, 65001, 90, "0a000001", "01 02 abcd"), FOUR),
        (2, 4, vec![])
    );
    // Hold time 1 and 2 are unacceptable; 0 and 3 are fine.
    for hold in [1, 2] {
        assert_eq!(
            notification(&open(4, 65001, hold, "0a000001", ""), FOUR),
            (2, 6, vec![])
        );
    }
    for hold in [0, 3] {
        assert!(decode(&open(4, 65001, hold, "0a000001", ""), FOUR).is_ok());
    }
    // BGP Identifier 0 (RFC 6286 §2.2).
    assert_eq!(
        notification(&open(4, 65001, 90, "00000000", ""), FOUR),
        (2, 3, vec![])
    );
    // AS 0 in My Autonomous System or in the 4-octet AS capability (RFC 7607).
    assert_eq!(
        notification(&open(4, 0, 90, "0a000001", ""), FOUR),
        (2, 2, vec![])
    );
    assert_eq!(
        notification(
            &open(4, 23456, 90, "0a000001", "02 06 41 04 00000000"),
            FOUR
        ),
        (2, 2, vec![])
    );
    // Optional Parameters Length disagreeing with the message: unspecific OPEN error.
    let mut m = open(4, 65001, 90, "0a000001", "02 02 02 00");
    m[28] = 3;
    assert_eq!(notification(&m, FOUR).0, 2);
    // A capability overrunning its parameter.
    assert_eq!(
        notification(&open(4, 65001, 90, "0a000001", "02 03 02 05 00"), FOUR).0,
        2
    );
}

// --- RFC 4271 §6.3 / RFC 7606 UPDATE errors ----------------------------------------------------

/// Well-formed ORIGIN, AS_PATH (4-octet) and NEXT_HOP, to be combined with the attribute
/// under test.
const BASE: &str = "40 01 01 00 | 40 02 06 02 01 0000fde9 | 40 03 04 c0000202";
const NLRI: &str = "1a 0a000040";

fn update(attrs: &str) -> Update {
    match decode(&update_msg(attrs, NLRI), FOUR).expect("no session reset") {
        Message::Update(u) => u,
        m => panic!("{m:?}"),
    }
}

fn findings(u: &Update) -> Vec<(u8, ErrorAction)> {
    u.errors.iter().map(|e| (e.attr, e.action)).collect()
}

use ErrorAction::{AttributeDiscard as Discard, TreatAsWithdraw as Withdraw};

#[test]
fn withdrawn_length_overrun_is_malformed_attribute_list() {
    let m = framed(2, &hex("0010 | 18 0a0001 | 0000"));
    assert_eq!(notification(&m, FOUR), (3, 1, vec![]));
    // Total Path Attribute Length overrunning the message.
    let m = framed(2, &hex("0000 | 0020 | 40 01 01 00"));
    assert_eq!(notification(&m, FOUR), (3, 1, vec![]));
}

#[test]
fn each_malformed_attribute_gets_its_rfc7606_action() {
    let cases: &[(&str, &str, u8, ErrorAction)] = &[
        // §7.1 ORIGIN: length ≠ 1 or undefined value.
        ("40 01 02 0000", "", 1, Withdraw),
        ("40 01 01 03", "", 1, Withdraw),
        // §7.2 AS_PATH: zero-length segment, overrun, bad segment type, trailing octet.
        ("40 02 02 0200", "", 2, Withdraw),
        ("40 02 06 0202 0000fde9", "", 2, Withdraw),
        ("40 02 06 0501 0000fde9", "", 2, Withdraw),
        ("40 02 07 0201 0000fde9 02", "", 2, Withdraw),
        // §7.3 NEXT_HOP length.
        ("40 03 05 c000020201", "", 3, Withdraw),
        // §7.4 MED, §7.5 LOCAL_PREF length.
        ("", "80 04 03 000064", 4, Withdraw),
        ("", "40 05 05 00000000c8", 5, Withdraw),
        // §7.6 ATOMIC_AGGREGATE length ≠ 0: discard.
        ("", "40 06 01 00", 6, Discard),
        // §7.7 AGGREGATOR length (8 with 4-octet AS): discard.
        ("", "c0 07 06 fde9 c0000203", 7, Discard),
        // §7.8 COMMUNITIES not a non-zero multiple of 4.
        ("", "c0 08 06 fde90064 0001", 8, Withdraw),
        ("", "c0 08 00", 8, Withdraw),
        // RFC 8092 §6: LARGE_COMMUNITIES not a non-zero multiple of 12.
        ("", "c0 20 08 0000fde8 00000001", 32, Withdraw),
        ("", "c0 20 00", 32, Withdraw),
        // §7.9 ORIGINATOR_ID, §7.10 CLUSTER_LIST length.
        ("", "80 09 05 c000020400", 9, Withdraw),
        ("", "80 0a 06 c0000205 0000", 10, Withdraw),
        // §3 c: conflicting Optional/Transitive flags; the attribute's own action applies.
        ("c0 01 01 00", "", 1, Withdraw),
        ("", "40 07 08 fa56ea01 c0000203", 7, Discard),
        ("", "c0 04 04 00000064", 4, Withdraw),
        // RFC 7607: AS 0.
        ("40 02 06 0201 00000000", "", 2, Withdraw),
        ("", "c0 07 08 00000000 c0000203", 7, Discard),
    ];
    for &(replace, extra, attr, action) in cases {
        // `replace` takes the place of the BASE attribute with the same code.
        let base: Vec<&str> = BASE
            .split('|')
            .map(str::trim)
            .filter(|a| replace.is_empty() || a[3..5] != replace[3..5])
            .collect();
        let attrs = format!("{} {replace} {extra}", base.join(" "));
        let u = update(&attrs);
        assert_eq!(findings(&u), vec![(attr, action)], "{attrs}");
        assert_eq!(u.treat_as_withdraw(), action == Withdraw, "{attrs}");
        // The NLRI are still reported, so the RIB can withdraw them.
        assert_eq!(u.nlri, vec![net("10.0.0.64/26")]);
    }
}

#[test]
fn attribute_discard_keeps_the_rest() {
    let u = update(&format!("{BASE} 40 06 01 00 c0 08 04 fde90064"));
    assert!(!u.attrs.atomic_aggregate);
    assert_eq!(u.attrs.communities, vec![0xfde9_0064]);
    assert_eq!(u.errors[0].reason, "ATOMIC_AGGREGATE length is not 0");
}

#[test]
fn missing_well_known_attributes_withdraw() {
    for (attrs, reason) in [
        (
            "40 02 06 02 01 0000fde9 | 40 03 04 c0000202",
            "missing well-known attribute ORIGIN",
        ),
        (
            "40 01 01 00 | 40 03 04 c0000202",
            "missing well-known attribute AS_PATH",
        ),
        (
            "40 01 01 00 | 40 02 06 02 01 0000fde9",
            "missing well-known attribute NEXT_HOP",
        ),
    ] {
        let u = update(attrs);
        assert_eq!(u.errors.len(), 1, "{attrs}");
        assert_eq!(u.errors[0].reason, reason);
        assert!(u.treat_as_withdraw());
    }
    // NEXT_HOP is not needed when only MP_REACH_NLRI carries routes (RFC 4760 §3).
    let m = update_msg(
        "90 0e 0026 0002 01 10 20010db8000000000000000000000002 00 7a 20010db8000100000000000000000040
         40 01 01 00 40 02 00",
        "",
    );
    let Ok(Message::Update(u)) = decode(&m, FOUR) else {
        panic!()
    };
    assert!(u.errors.is_empty(), "{:?}", u.errors);
    // A pure withdrawal needs no attributes at all.
    let m = framed(2, &hex("0004 18 0a0001 0000"));
    let Ok(Message::Update(u)) = decode(&m, FOUR) else {
        panic!()
    };
    assert!(u.errors.is_empty());
}

#[test]
fn repeated_attributes() {
    // Repeats other than MP_* are discarded; the first occurrence wins (RFC 7606 §3 g).
    let u = update(&format!("{BASE} 80 04 04 00000001 80 04 04 00000002"));
    assert_eq!(u.attrs.med, Some(1));
    assert_eq!(findings(&u), vec![(4, Discard)]);
    assert!(!u.treat_as_withdraw());
    // A repeated MP_REACH_NLRI is a session reset: Malformed Attribute List.
    let mp = "80 0e 15 0002 01 10 20010db8000000000000000000000002 00";
    let m = update_msg(&format!("{mp} {mp} 40 01 01 00 40 02 00"), "");
    assert_eq!(notification(&m, FOUR), (3, 1, vec![]));
    let mpu = "80 0f 03 0002 01";
    let m = update_msg(&format!("{mpu} {mpu}"), "");
    assert_eq!(notification(&m, FOUR), (3, 1, vec![]));
}

#[test]
fn unrecognized_well_known_attribute_carries_the_attribute() {
    let m = update_msg(&format!("{BASE} 40 63 02 abcd"), NLRI);
    assert_eq!(notification(&m, FOUR), (3, 2, hex("40 63 02 abcd")));
}

#[test]
fn bad_prefixes_reset_the_session() {
    // Prefix length 33 in NLRI, and a prefix running past the end, are Invalid Network Field.
    assert_eq!(
        notification(&update_msg(BASE, "21 0a000000 00"), FOUR),
        (3, 10, vec![])
    );
    assert_eq!(
        notification(&update_msg(BASE, "1a 0a00"), FOUR),
        (3, 10, vec![])
    );
    let m = framed(2, &hex("0002 | 21 0a | 0000"));
    assert_eq!(notification(&m, FOUR), (3, 10, vec![]));
    // In MP_REACH_NLRI (length 129 for IPv6): Optional Attribute Error (RFC 4760 §7).
    let m = update_msg(
        "80 0e 16 0002 01 10 20010db8000000000000000000000002 00 81 | 40 01 01 00 40 02 00",
        "",
    );
    assert_eq!(notification(&m, FOUR), (3, 9, vec![]));
}

#[test]
fn mp_reach_bad_next_hop_length_resets() {
    for nh_len in ["08", "11", "00", "20"] {
        // nh len 0x20 with only 16 octets present also runs into the NLRI.
        let m = update_msg(
            &format!(
                "80 0e 15 0002 01 {nh_len} 20010db8000000000000000000000002 00 | 40 01 01 00 40 02 00"
            ),
            "",
        );
        assert_eq!(notification(&m, FOUR).0, 3, "nh len {nh_len}");
        assert_eq!(notification(&m, FOUR).1, 9, "nh len {nh_len}");
    }
    // Too short to hold AFI/SAFI/length.
    let m = update_msg("80 0e 02 0002 | 40 01 01 00 40 02 00", "");
    assert_eq!(notification(&m, FOUR), (3, 9, vec![]));
}

#[test]
fn mp_attribute_flag_error_resets_with_the_attribute() {
    let attr = "c0 0f 03 0002 01";
    let m = update_msg(attr, "");
    assert_eq!(notification(&m, FOUR), (3, 4, hex(attr)));
}

#[test]
fn attribute_list_overrun_withdraws() {
    // The last attribute's length runs past the attribute field (RFC 7606 §4): withdraw,
    // and the NLRI field is still found from the Total Path Attribute Length.
    let u = update(&format!("{BASE} 80 04 09 00000064"));
    assert!(u.treat_as_withdraw());
    assert_eq!(u.nlri, vec![net("10.0.0.64/26")]);
    // Fewer than 3 octets left for an attribute header.
    let u = update(&format!("{BASE} 80 04"));
    assert!(u.treat_as_withdraw());
}
