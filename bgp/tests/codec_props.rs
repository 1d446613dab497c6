//! Property tests: encode→decode round trips for arbitrary valid messages, and arbitrary or
//! mutated bytes never panic the decoder.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podroute_bgp::wire::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![
        Just(Family::IPV4_UNICAST),
        Just(Family::IPV6_UNICAST),
        (any::<u16>(), any::<u8>()).prop_map(|(afi, safi)| Family { afi, safi }),
    ]
}

fn capability() -> impl Strategy<Value = Capability> {
    prop_oneof![
        family().prop_map(Capability::Multiprotocol),
        Just(Capability::RouteRefresh),
        (1u32..).prop_map(Capability::FourOctetAs),
        (
            any::<bool>(),
            any::<bool>(),
            0u16..4096,
            prop::collection::vec((family(), any::<bool>()), 0..5)
        )
            .prop_map(
                |(r, n, t, f)| Capability::GracefulRestart(GracefulRestartCap {
                    restart_state: r,
                    notification: n,
                    restart_time: t,
                    families: f
                        .into_iter()
                        .map(|(family, forwarding_state)| GrFamily {
                            family,
                            forwarding_state
                        })
                        .collect(),
                })
            ),
        prop::collection::vec((family(), 1u8..=3), 0..4).prop_map(Capability::AddPath),
        // Codes podroute does not interpret.
        (
            prop_oneof![3u8..64, 66u8..69, 70u8..=255],
            prop::collection::vec(any::<u8>(), 0..20)
        )
            .prop_map(|(code, v)| Capability::Unknown {
                code,
                value: Bytes::from(v)
            }),
    ]
}

prop_compose! {
    fn open()(
        asn in 1u32..,
        hold in prop_oneof![Just(0u16), 3u16..],
        id in 1u32..,
        caps in prop::collection::vec(capability(), 0..40),
    ) -> Open {
        Open::new(asn, hold, Ipv4Addr::from(id), caps)
    }
}

fn v4_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0u8..=32)
        .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc()))
}

fn v6_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()))
}

fn asn() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..65536, 65536u32..]
}

fn segment() -> impl Strategy<Value = AsSegment> {
    let asns = || prop::collection::vec(asn(), 1..10);
    prop_oneof![
        4 => asns().prop_map(AsSegment::Sequence),
        2 => asns().prop_map(AsSegment::Set),
        1 => asns().prop_map(AsSegment::ConfedSequence),
        1 => asns().prop_map(AsSegment::ConfedSet),
    ]
}

/// Paths as RFC 5065 allows them: confederation segments first.
fn as_path() -> impl Strategy<Value = AsPath> {
    (
        prop::collection::vec(segment(), 0..2).prop_map(|v| {
            v.into_iter()
                .filter(|s| matches!(s, AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_)))
                .collect::<Vec<_>>()
        }),
        prop::collection::vec(segment(), 0..5).prop_map(|v| {
            v.into_iter()
                .filter(|s| matches!(s, AsSegment::Sequence(_) | AsSegment::Set(_)))
                .collect::<Vec<_>>()
        }),
    )
        .prop_map(|(mut c, s)| {
            c.extend(s);
            AsPath { segments: c }
        })
}

fn raw_attr() -> impl Strategy<Value = RawAttr> {
    (
        prop_oneof![11u8..14, 16u8..17, 19u8..32, 33u8..=255],
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(code, v)| RawAttr {
            // As stored after passing through podroute once.
            flags: 0xe0,
            code,
            value: Bytes::from(v),
        })
}

prop_compose! {
    fn path_attrs()(
        origin in prop::option::of(prop_oneof![Just(Origin::Igp), Just(Origin::Egp), Just(Origin::Incomplete)]),
        as_path in prop::option::of(as_path()),
        next_hop in prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
        med in prop::option::of(any::<u32>()),
        local_pref in prop::option::of(any::<u32>()),
        atomic_aggregate in any::<bool>(),
        aggregator in prop::option::of((asn(), any::<u32>()).prop_map(|(asn, a)| Aggregator { asn, addr: Ipv4Addr::from(a) })),
        communities in prop::collection::vec(any::<u32>(), 0..20),
        large_communities in prop::collection::vec(any::<(u32, u32, u32)>(), 0..8),
        originator_id in prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
        cluster_list in prop::collection::vec(any::<u32>().prop_map(Ipv4Addr::from), 0..5),
        unknown in prop::collection::vec(raw_attr(), 0..3)
            .prop_map(|mut v| { v.sort_by_key(|r| r.code); v.dedup_by_key(|r| r.code); v }),
    ) -> PathAttrs {
        PathAttrs { origin, as_path, next_hop, med, local_pref, atomic_aggregate, aggregator,
            communities, large_communities, originator_id, cluster_list, unknown }
    }
}

prop_compose! {
    fn update()(
        withdrawn in prop::collection::vec(v4_prefix(), 0..30),
        nlri in prop::collection::vec(v4_prefix(), 0..30),
        attrs in path_attrs(),
        reach in prop::option::of((
            prop::collection::vec(v6_prefix(), 0..30),
            any::<u128>(),
            prop::option::of(any::<u128>()),
        )),
        unreach in prop::option::of(prop::collection::vec(v6_prefix(), 0..30)),
    ) -> Update {
        let mut attrs = attrs;
        // Make the message one that raises no RFC 7606 findings.
        if !nlri.is_empty() || reach.as_ref().is_some_and(|r| !r.0.is_empty()) {
            attrs.origin.get_or_insert(Origin::Igp);
            attrs.as_path.get_or_insert_with(AsPath::default);
        }
        if !nlri.is_empty() {
            attrs.next_hop.get_or_insert(Ipv4Addr::new(192, 0, 2, 1));
        }
        Update {
            withdrawn,
            attrs,
            nlri,
            mp_reach: reach.map(|(nlri, nh, ll)| MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: NextHop { addr: IpAddr::V6(Ipv6Addr::from(nh)), link_local: ll.map(Ipv6Addr::from) },
                nlri,
            }),
            mp_unreach: unreach.map(|withdrawn| MpUnreach { family: Family::IPV6_UNICAST, withdrawn }),
            errors: vec![],
        }
    }
}

fn roundtrip(msg: &Message, ctx: CodecContext) -> Message {
    let bytes = encode(msg, ctx);
    assert!(bytes.len() <= MAX_MESSAGE_LEN, "{} octets", bytes.len());
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(frame_len(&buf), Ok(Some(bytes.len())));
    let back = decode_message(&mut buf, ctx).unwrap().unwrap();
    assert!(buf.is_empty());
    back
}

fn valid_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        open().prop_map(|o| encode(&Message::Open(o), FOUR)),
        update().prop_map(|u| encode(&Message::Update(u), FOUR)),
        update().prop_map(|u| encode(&Message::Update(u), TWO)),
        Just(encode(&Message::Keepalive, FOUR)),
        (
            any::<u8>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(c, s, d)| encode(&Message::Notification(Notification::new(c, s, d)), FOUR)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn open_round_trips(o in open()) {
        let m = Message::Open(o);
        prop_assert_eq!(roundtrip(&m, FOUR), m);
    }

    #[test]
    fn notification_round_trips(c in any::<u8>(), s in any::<u8>(), d in prop::collection::vec(any::<u8>(), 0..=4075)) {
        let m = Message::Notification(Notification::new(c, s, d));
        prop_assert_eq!(roundtrip(&m, FOUR), m);
    }

    #[test]
    fn update_round_trips_four_octet(u in update()) {
        let m = Message::Update(u);
        prop_assert_eq!(roundtrip(&m, FOUR), m);
    }

    /// Towards a 2-octet peer AS_TRANS goes on the wire and AS4_PATH/AS4_AGGREGATOR bring the
    /// original path back — except inside confederation segments, which RFC 6793 keeps out of
    /// AS4_PATH (their 4-octet numbers stay AS_TRANS).
    #[test]
    fn update_round_trips_two_octet(u in update()) {
        let mut expected = u.clone();
        if let Some(p) = &mut expected.attrs.as_path {
            for s in &mut p.segments {
                if let AsSegment::ConfedSequence(v) | AsSegment::ConfedSet(v) = s {
                    v.iter_mut().filter(|a| **a > 65535).for_each(|a| *a = AS_TRANS as u32);
                }
            }
        }
        prop_assert_eq!(roundtrip(&Message::Update(u), TWO), Message::Update(expected));
    }

    #[test]
    fn encoder_round_trips_prefix_sets(
        v4 in prop::collection::vec(v4_prefix(), 0..3000),
        v6 in prop::collection::vec(v6_prefix(), 0..1000),
        attrs in path_attrs(),
        four in any::<bool>(),
    ) {
        let ctx = CodecContext { four_octet_as: four };
        let mut attrs = attrs;
        attrs.origin.get_or_insert(Origin::Igp);
        attrs.as_path.get_or_insert_with(AsPath::default);
        attrs.next_hop.get_or_insert(Ipv4Addr::new(192, 0, 2, 1));
        attrs.unknown.clear(); // keep the attributes small enough to leave room for NLRI
        let enc = UpdateEncoder::new(ctx);
        let mut out = BytesMut::new();
        enc.announce(&attrs, None, &v4, &mut out);
        enc.announce(&attrs, Some(NextHop::new("2001:db8::1".parse().unwrap())), &v6, &mut out);
        enc.withdraw(&v4, &mut out);
        enc.withdraw(&v6, &mut out);
        let (mut a4, mut a6, mut w4, mut w6) = (vec![], vec![], vec![], vec![]);
        while !out.is_empty() {
            let len = frame_len(&out).unwrap().unwrap();
            prop_assert!(len <= MAX_MESSAGE_LEN);
            let Some(Message::Update(u)) = decode_message(&mut out, ctx).unwrap() else { panic!() };
            prop_assert!(u.errors.is_empty(), "{:?}", u.errors);
            a4.extend(u.nlri);
            w4.extend(u.withdrawn);
            if let Some(r) = u.mp_reach { a6.extend(r.nlri); }
            if let Some(w) = u.mp_unreach { w6.extend(w.withdrawn); }
        }
        prop_assert_eq!(&a4, &v4);
        prop_assert_eq!(&w4, &v4);
        prop_assert_eq!(&a6, &v6);
        prop_assert_eq!(&w6, &v6);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000), four in any::<bool>()) {
        check_no_panic(&bytes, CodecContext { four_octet_as: four });
        // And behind a valid header, so the body decoders are reached.
        let mut m = vec![0xff; 16];
        let len = (19 + bytes.len().min(4077)) as u16;
        m.extend_from_slice(&len.to_be_bytes());
        m.push(bytes.first().map_or(2, |b| b % 5 + 1));
        m.extend_from_slice(&bytes[..bytes.len().min(4077)]);
        check_no_panic(&m, CodecContext { four_octet_as: four });
    }

    #[test]
    fn mutated_messages_never_panic(
        msg in valid_message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        four in any::<bool>(),
    ) {
        let mut m = msg;
        for (i, b, op) in edits {
            if m.is_empty() { break; }
            let i = i.index(m.len());
            match op {
                0 => m[i] = b,
                1 => { m.remove(i); }
                _ => m.insert(i, b),
            }
        }
        check_no_panic(&m, CodecContext { four_octet_as: four });
    }
}

/// Decode everything in `bytes`: Ok or Err, no panic, and `frame_len` agrees with
/// `decode_message` about where messages end.
fn check_no_panic(bytes: &[u8], ctx: CodecContext) {
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        let framed = frame_len(&buf);
        match decode_message(&mut buf, ctx) {
            Ok(Some(_)) => {
                assert_eq!(framed, Ok(Some(before - buf.len())));
            }
            Ok(None) => {
                assert_eq!(framed, Ok(None));
                assert_eq!(buf.len(), before);
                break;
            }
            Err(e) => {
                // A header error is found by frame_len too; a body error means the frame was whole.
                match framed {
                    Err(fe) => assert_eq!(fe, e),
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("decode failed on an incomplete frame: {e}"),
                }
                break;
            }
        }
    }
}
