//! UpdateEncoder splits large announcements and withdrawals into UPDATEs of at most 4096
//! octets, each carrying the attributes, and the prefixes come back exactly, in order.

mod common;

use bytes::BytesMut;
use common::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podroute_bgp::wire::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn v4_26s(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).unwrap()))
        .collect()
}

fn v6_122s(n: u128) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let base = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base + (i << 6)), 122).unwrap())
        })
        .collect()
}

fn attrs() -> PathAttrs {
    PathAttrs {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::from_sequence(vec![65001, 4_200_000_001])),
        next_hop: Some("192.0.2.1".parse().unwrap()),
        med: Some(5),
        communities: vec![0xfde9_0001, 0xfde9_0002],
        ..PathAttrs::default()
    }
}

/// Split `out` into messages, checking each against the size limit.
fn messages(mut out: BytesMut, ctx: CodecContext) -> Vec<Update> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let len = frame_len(&out).unwrap().unwrap();
        assert!(len <= MAX_MESSAGE_LEN, "message of {len} octets");
        match decode_message(&mut out, ctx).unwrap().unwrap() {
            Message::Update(u) => v.push(u),
            m => panic!("{m:?}"),
        }
    }
    v
}

#[test]
fn announce_5000_v4_26s() {
    for ctx in [FOUR, TWO] {
        let prefixes = v4_26s(5000);
        let mut out = BytesMut::new();
        let n = UpdateEncoder::new(ctx).announce(&attrs(), None, &prefixes, &mut out);
        let msgs = messages(out, ctx);
        assert_eq!(n, msgs.len());
        // 5 octets per /26: about 800 per message.
        assert!(n <= 7, "{n} messages");
        let mut back = Vec::new();
        for u in &msgs {
            assert_eq!(u.attrs, attrs(), "attributes in every message");
            assert!(u.errors.is_empty());
            back.extend_from_slice(&u.nlri);
        }
        assert_eq!(back, prefixes);
    }
}

#[test]
fn announce_5000_v6_122s() {
    let prefixes = v6_122s(5000);
    let nh = NextHop {
        addr: "2001:db8::1".parse().unwrap(),
        link_local: Some("fe80::1".parse().unwrap()),
    };
    let mut out = BytesMut::new();
    let n = UpdateEncoder::new(FOUR).announce(&attrs(), Some(nh), &prefixes, &mut out);
    let msgs = messages(out, FOUR);
    assert_eq!(n, msgs.len());
    let mut back = Vec::new();
    let mut expected_attrs = attrs();
    expected_attrs.next_hop = None;
    for u in &msgs {
        assert_eq!(u.attrs, expected_attrs);
        assert!(u.nlri.is_empty() && u.errors.is_empty());
        let r = u.mp_reach.as_ref().unwrap();
        assert_eq!((r.family, r.next_hop), (Family::IPV6_UNICAST, nh));
        back.extend_from_slice(&r.nlri);
    }
    assert_eq!(back, prefixes);
    // 17 octets per /122: about 237 per message.
    assert!(n <= 22, "{n} messages");
}

#[test]
fn withdraw_5000_each_family() {
    for prefixes in [v4_26s(5000), v6_122s(5000)] {
        let mut out = BytesMut::new();
        let n = UpdateEncoder::new(FOUR).withdraw(&prefixes, &mut out);
        let msgs = messages(out, FOUR);
        assert_eq!(n, msgs.len());
        let mut back = Vec::new();
        for u in &msgs {
            assert!(u.nlri.is_empty() && u.mp_reach.is_none());
            back.extend_from_slice(&u.withdrawn);
            if let Some(w) = &u.mp_unreach {
                back.extend_from_slice(&w.withdrawn);
            }
        }
        assert_eq!(back, prefixes);
    }
}

#[test]
fn messages_are_filled() {
    // Every message but the last is within one prefix of the limit.
    let prefixes = v4_26s(5000);
    let mut out = BytesMut::new();
    UpdateEncoder::new(FOUR).announce(&attrs(), None, &prefixes, &mut out);
    let mut sizes = Vec::new();
    while !out.is_empty() {
        let len = frame_len(&out).unwrap().unwrap();
        sizes.push(len);
        let _ = out.split_to(len);
    }
    for s in &sizes[..sizes.len() - 1] {
        assert!(*s > MAX_MESSAGE_LEN - 5, "{sizes:?}");
    }
}

#[test]
fn empty_input_writes_nothing_and_eor_markers() {
    let mut out = BytesMut::new();
    let e = UpdateEncoder::new(FOUR);
    assert_eq!(e.announce(&attrs(), None, &[], &mut out), 0);
    assert_eq!(e.withdraw(&[], &mut out), 0);
    assert!(out.is_empty());
    e.end_of_rib(Family::IPV6_UNICAST, &mut out);
    let msgs = messages(out, FOUR);
    assert_eq!(msgs[0].end_of_rib_family(), Some(Family::IPV6_UNICAST));
}
