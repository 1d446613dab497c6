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

fn updates(from: &str, to: &str) -> Vec<Update> {
    captured()
        .iter()
        .filter(|c| c.from.starts_with(from) && c.to.starts_with(to))
        .filter_map(|c| match decode_one(c) {
            Message::Update(u) => Some(u),
            _ => None,
        })
        .collect()
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn comm(a: u16, b: u16) -> u32 {
    (a as u32) << 16 | b as u32
}

#[test]
fn every_captured_message_decodes_and_open_keepalive_notification_reencode_identically() {
    let all = captured();
    assert_eq!(all.len(), 64);
    let mut kinds = [0usize; 6];
    for c in &all {
        let msg = decode_one(c);
        kinds[c.bytes[18] as usize] += 1;
        let mut out = BytesMut::new();
        encode_message(&msg, ctx_for(c), &mut out);
        if !matches!(msg, Message::Update(_)) {
            assert_eq!(
                out[..],
                c.bytes[..],
                "{} > {}: re-encoded {msg:?}",
                c.from,
                c.to
            );
        }
        let mut again = out.clone();
        let back = decode_message(&mut again, ctx_for(c)).unwrap().unwrap();
        // Passed-on unknown attributes come back with the Partial bit (RFC 4271 §5).
        let mut expected = msg.clone();
        if let Message::Update(u) = &mut expected {
            u.attrs.unknown.iter_mut().for_each(|r| r.flags |= 0x20);
        }
        assert_eq!(back, expected, "{} > {}: round trip", c.from, c.to);
    }
    assert_eq!(
        kinds[1..5],
        [13, 28, 5, 18],
        "OPEN, UPDATE, NOTIFICATION, KEEPALIVE"
    );
}

#[test]
fn bird_open_capabilities() {
    let c = &captured()[0];
    assert!(c.from.starts_with("127.0.0.2:"));
    let Message::Open(open) = decode_one(c) else {
        panic!("first message is BIRD's OPEN")
    };
    assert_eq!(open.my_as, AS_TRANS);
    assert_eq!(open.asn(), 4_200_000_001);
    assert_eq!(open.hold_time, 90);
    assert_eq!(
        open.families(),
        vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]
    );
    assert!(open.route_refresh());
    let gr = open.graceful_restart().unwrap();
    assert_eq!(
        (gr.restart_state, gr.restart_time, gr.families.len()),
        (false, 120, 2)
    );
    assert!(
        open.capabilities
            .contains(&Capability::AddPath(vec![(Family::IPV4_UNICAST, 1)]))
    );
    // Enhanced route refresh (70) and long-lived GR (71) are kept as unknown.
    assert!(
        open.capabilities
            .iter()
            .any(|c| matches!(c, Capability::Unknown { code: 70, .. }))
    );
}

#[test]
fn bird_updates() {
    let u = updates("127.0.0.2:42493", "127.0.0.3");
    // /26s with communities, MED and a large community (RFC 8092, code 32).
    assert_eq!(
        u[0].nlri,
        vec![
            net("10.1.0.64/26"),
            net("10.1.0.0/26"),
            net("10.1.0.128/26")
        ]
    );
    let a = &u[0].attrs;
    assert_eq!(a.origin, Some(Origin::Igp));
    assert_eq!(a.as_path, Some(AsPath::from_sequence(vec![4_200_000_001])));
    assert_eq!(a.next_hop, Some("127.0.0.2".parse().unwrap()));
    assert_eq!(a.med, Some(50));
    assert_eq!(a.communities, vec![comm(65001, 100), comm(65535, 65281)]);
    assert_eq!(a.large_communities, vec![(4_200_000_001, 1, 2)]);
    assert!(a.unknown.is_empty());
    assert!(u[0].errors.is_empty());
    // IPv4 End-of-RIB, IPv6 /122s in MP_REACH, IPv6 End-of-RIB.
    assert_eq!(u[2].end_of_rib_family(), Some(Family::IPV4_UNICAST));
    let r = u[3].mp_reach.as_ref().unwrap();
    assert_eq!(r.next_hop, NextHop::new("2001:db8::2".parse().unwrap()));
    assert_eq!(
        r.nlri,
        vec![
            net("2001:db8:1::40/122"),
            net("2001:db8:2::/48"),
            net("2001:db8:1::/122")
        ]
    );
    assert_eq!(u[4].end_of_rib_family(), Some(Family::IPV6_UNICAST));
    // Withdrawals: MP_UNREACH for IPv6, Withdrawn Routes for IPv4.
    assert_eq!(u[5].mp_unreach.as_ref().unwrap().withdrawn.len(), 3);
    assert_eq!(u[6].withdrawn.len(), 4);
    assert_eq!(u[6].end_of_rib_family(), None);
}

#[test]
fn gobgp_updates() {
    let u = updates("127.0.0.3:1791", "127.0.0.2:42493");
    assert_eq!(u[0].nlri, vec![net("10.3.0.0/26")]);
    assert_eq!(u[0].attrs.origin, Some(Origin::Incomplete));
    assert_eq!(u[0].attrs.med, Some(10));
    assert_eq!(
        u[0].attrs.communities,
        vec![comm(65002, 200), comm(65002, 201)]
    );
    assert_eq!(u[0].attrs.as_path, Some(AsPath::from_sequence(vec![65002])));
    // GoBGP puts an IPv4-mapped next hop in MP_REACH for IPv6 over an IPv4 session.
    let r = u[3].mp_reach.as_ref().unwrap();
    assert_eq!(
        r.next_hop.addr,
        "::ffff:127.0.0.3".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(r.nlri, vec![net("2001:db8:3::/122")]);
    assert_eq!(u[2].end_of_rib_family(), Some(Family::IPV4_UNICAST));
    assert_eq!(u[4].end_of_rib_family(), Some(Family::IPV6_UNICAST));
    assert_eq!(u[5].withdrawn, vec![net("10.3.0.64/26")]);
    assert_eq!(
        u[6].mp_unreach.as_ref().unwrap().withdrawn,
        vec![net("2001:db8:3::/122")]
    );
}

#[test]
fn gobgp_to_two_octet_bird_keeps_as_path() {
    // BIRD "B" runs `enable as4 off`: GoBGP sends 2-octet AS_PATH. This is the capture that
    // showed AS_PATH being dropped for OLD speakers.
    let u = updates("127.0.0.3:1791", "127.0.0.4");
    assert_eq!(u[0].attrs.as_path, Some(AsPath::from_sequence(vec![65002])));
    assert!(u[0].errors.is_empty(), "{:?}", u[0].errors);
    assert!(!u[0].treat_as_withdraw());
}

#[test]
fn wrong_as_notifications_from_each_daemon() {
    let all = captured();
    let gobgp = all
        .iter()
        .find(|c| {
            c.from.starts_with("127.0.0.3:") && c.to.starts_with("127.0.0.6:") && c.bytes[18] == 3
        })
        .unwrap();
    let Message::Notification(n) = decode_one(gobgp) else {
        panic!()
    };
    assert_eq!((n.code, n.subcode), (2, 2));
    assert!(n.data.is_empty());
    assert_eq!(n.to_string(), "OPEN Message Error / Bad Peer AS (2/2)");

    let bird = all
        .iter()
        .find(|c| c.from.starts_with("127.0.0.7:") && c.bytes[18] == 3)
        .unwrap();
    let Message::Notification(n) = decode_one(bird) else {
        panic!()
    };
    // BIRD puts the AS it saw in the data, 4 octets.
    assert_eq!(
        (n.code, n.subcode, &n.data[..]),
        (2, 2, &[0, 0, 0xfd, 0xea][..])
    );
    assert_eq!(
        n.to_string(),
        "OPEN Message Error / Bad Peer AS (2/2), data 0x0000fdea"
    );
}
