//! Byte-level vectors, both directions: each wire image decodes to the struct next to it and
//! the struct encodes to the same bytes. Field boundaries are marked with `|`; values are
//! worked out from the RFC diagrams in the doc comments of `bgp/src/wire/`.

mod common;

use bytes::Bytes;
use common::*;
use podroute_bgp::wire::*;
use std::net::{IpAddr, Ipv4Addr};

const AS4: u32 = 4_200_000_001; // 0xfa56ea01

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// OPEN, KEEPALIVE, NOTIFICATION, ROUTE-REFRESH

#[test]
fn open_with_every_capability() {
    let body = hex("04 | 5ba0 | 00b4 | c0000201 | 32 | 02 30
         01 04 0001 00 01
         01 04 0002 00 01
         02 00
         41 04 fa56ea01
         40 0a c078 | 0001 01 80 | 0002 01 00
         45 08 0001 01 03 | 0002 01 01
         49 04 02766d00");
    let open = Open {
        version: 4,
        my_as: AS_TRANS,
        hold_time: 180,
        bgp_id: ip4("192.0.2.1"),
        capabilities: vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::Multiprotocol(Family::IPV6_UNICAST),
            Capability::RouteRefresh,
            Capability::FourOctetAs(AS4),
            Capability::GracefulRestart(GracefulRestartCap {
                restart_state: true,
                notification: true,
                restart_time: 120,
                families: vec![
                    GrFamily {
                        family: Family::IPV4_UNICAST,
                        forwarding_state: true,
                    },
                    GrFamily {
                        family: Family::IPV6_UNICAST,
                        forwarding_state: false,
                    },
                ],
            }),
            Capability::AddPath(vec![(Family::IPV4_UNICAST, 3), (Family::IPV6_UNICAST, 1)]),
            Capability::Unknown {
                code: 73,
                value: Bytes::from_static(b"\x02vm\x00"),
            },
        ],
    };
    assert_eq!(open.asn(), AS4);
    assert_eq!(
        open.families(),
        vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]
    );
    assert!(open.route_refresh());
    assert_eq!(
        Open::new(AS4, 180, ip4("192.0.2.1"), vec![]).my_as,
        AS_TRANS,
        "a 4-octet AS puts AS_TRANS in My Autonomous System"
    );
    both_ways(&framed(1, &body), &Message::Open(open), FOUR);
}

#[test]
fn open_gr_flags_each_bit() {
    // R only, N only, restart time 4095, no families (BIRD sends this when not restarting).
    for (ft, r, n, time) in [
        ("8fff", true, false, 4095),
        ("4000", false, true, 0),
        ("0078", false, false, 120),
    ] {
        let body = hex(&format!(
            "04 | fde9 | 005a | 7f000002 | 06 | 02 04 | 40 02 {ft}"
        ));
        let open = Open {
            version: 4,
            my_as: 65001,
            hold_time: 90,
            bgp_id: ip4("127.0.0.2"),
            capabilities: vec![Capability::GracefulRestart(GracefulRestartCap {
                restart_state: r,
                notification: n,
                restart_time: time,
                families: vec![],
            })],
        };
        both_ways(&framed(1, &body), &Message::Open(open), FOUR);
    }
}

#[test]
fn open_without_capabilities_is_ipv4_only() {
    let bytes = framed(1, &hex("04 | fde9 | 0000 | 0a000001 | 00"));
    let open = Open {
        version: 4,
        my_as: 65001,
        hold_time: 0,
        bgp_id: ip4("10.0.0.1"),
        capabilities: vec![],
    };
    assert_eq!(open.families(), vec![Family::IPV4_UNICAST]);
    assert_eq!(open.asn(), 65001);
    both_ways(&bytes, &Message::Open(open), FOUR);
}

#[test]
fn open_one_parameter_per_capability_decodes() {
    // Older speakers send one optional parameter per capability (RFC 5492 allows either).
    let bytes = framed(
        1,
        &hex("04 | fde9 | 005a | 0a000001 | 10 | 02 06 01 04 0001 00 01 | 02 06 41 04 0000fde9"),
    );
    let Message::Open(open) = decode(&bytes, FOUR).unwrap() else {
        panic!()
    };
    assert_eq!(
        open.capabilities,
        vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::FourOctetAs(65001)
        ]
    );
}

#[test]
fn open_extended_optional_parameters_rfc9072() {
    // Non-Ext OP Len 255, Non-Ext OP Type 255, Extended Opt. Parm. Length 2 octets, and the
    // parameter's length in 2 octets.
    let mut caps = Vec::new();
    for i in 0..60u8 {
        caps.push(Capability::Unknown {
            code: 200,
            value: Bytes::from(vec![i; 3]),
        });
    }
    let open = Open {
        version: 4,
        my_as: 65001,
        hold_time: 90,
        bgp_id: ip4("10.0.0.1"),
        capabilities: caps,
    };
    let bytes = encode(&Message::Open(open.clone()), FOUR);
    assert_eq!(
        &bytes[28..32],
        &hex("ff ff 012f")[..],
        "3 + 60 * (2 + 3) = 303"
    );
    assert_eq!(&bytes[32..35], &hex("02 012c")[..]);
    both_ways(&bytes, &Message::Open(open), FOUR);
}

#[test]
fn keepalive() {
    both_ways(
        &hex("ffffffffffffffffffffffffffffffff 0013 04"),
        &Message::Keepalive,
        FOUR,
    );
}

#[test]
fn notifications() {
    both_ways(
        &framed(3, &hex("02 02 | fde9")),
        &Message::Notification(Notification::new(2, 2, vec![0xfd, 0xe9])),
        FOUR,
    );
    // RFC 8203 shutdown communication.
    let n = Notification::new(6, 2, &b"\x04bye!"[..]);
    assert_eq!(
        n.to_string(),
        "Cease / Administrative Shutdown (6/2): \"bye!\""
    );
    both_ways(
        &framed(3, &hex("06 02 | 04 62796521")),
        &Message::Notification(n),
        FOUR,
    );
    both_ways(
        &hex("ffffffffffffffffffffffffffffffff 0015 03 | 04 00"),
        &Message::Notification(Notification::new(4, 0, Bytes::new())),
        FOUR,
    );
}

#[test]
fn route_refresh() {
    both_ways(
        &framed(5, &hex("0001 00 01")),
        &Message::RouteRefresh(RouteRefresh {
            family: Family::IPV4_UNICAST,
            subtype: 0,
        }),
        FOUR,
    );
    // RFC 7313 BoRR for IPv6: the subtype is the old Reserved octet.
    both_ways(
        &framed(5, &hex("0002 01 01")),
        &Message::RouteRefresh(RouteRefresh {
            family: Family::IPV6_UNICAST,
            subtype: 1,
        }),
        FOUR,
    );
}

// ---------------------------------------------------------------------------------------------
// UPDATE

fn upd(u: Update) -> Message {
    Message::Update(u)
}

/// Every non-MP attribute at once, 4-octet AS numbers.
#[test]
fn update_every_attribute_four_octet() {
    let mut body = hex("0004 | 18 0a0001"); // withdrawn 10.0.1.0/24
    let attrs = hex("40 01 01 00
         40 02 10 | 02 02 0000fde9 fa56ea01 | 01 01 0000fdea
         40 03 04 c0000202
         80 04 04 00000064
         40 05 04 000000c8
         40 06 00
         c0 07 08 fa56ea01 c0000203
         c0 08 08 fde90064 ffffff01
         80 09 04 c0000204
         80 0a 08 c0000205 c0000206");
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(&attrs);
    body.extend_from_slice(&hex("1a 0a000040")); // 10.0.0.64/26
    let u = Update {
        withdrawn: vec![net("10.0.1.0/24")],
        attrs: PathAttrs {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath {
                segments: vec![
                    AsSegment::Sequence(vec![65001, AS4]),
                    AsSegment::Set(vec![65002]),
                ],
            }),
            next_hop: Some(ip4("192.0.2.2")),
            med: Some(100),
            local_pref: Some(200),
            atomic_aggregate: true,
            aggregator: Some(Aggregator {
                asn: AS4,
                addr: ip4("192.0.2.3"),
            }),
            communities: vec![0xfde9_0064, 0xffff_ff01],
            originator_id: Some(ip4("192.0.2.4")),
            cluster_list: vec![ip4("192.0.2.5"), ip4("192.0.2.6")],
            large_communities: vec![],
            unknown: vec![],
        },
        nlri: vec![net("10.0.0.64/26")],
        ..Update::default()
    };
    assert_eq!(u.attrs.as_path.as_ref().unwrap().path_len(), 3);
    both_ways(&framed(2, &body), &upd(u), FOUR);
}

/// The same attributes between two 2-octet speakers: AS_PATH and AGGREGATOR shrink.
#[test]
fn update_two_octet_as_path_and_aggregator() {
    let bytes = update_msg(
        "40 01 01 02
         40 02 0a | 02 02 fde9 fdea | 01 01 fdeb
         40 03 04 c0000202
         c0 07 06 fde9 c0000203",
        "1a 0a000000",
    );
    let u = Update {
        attrs: PathAttrs {
            origin: Some(Origin::Incomplete),
            as_path: Some(AsPath {
                segments: vec![
                    AsSegment::Sequence(vec![65001, 65002]),
                    AsSegment::Set(vec![65003]),
                ],
            }),
            next_hop: Some(ip4("192.0.2.2")),
            aggregator: Some(Aggregator {
                asn: 65001,
                addr: ip4("192.0.2.3"),
            }),
            ..PathAttrs::default()
        },
        nlri: vec![net("10.0.0.0/26")],
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), TWO);
}

/// RFC 8092: LARGE_COMMUNITIES (type 32, optional transitive), twelve octets a value, after
/// the lower-numbered attributes.
#[test]
fn update_large_communities() {
    let bytes = update_msg(
        "40 01 01 00
         40 02 06 | 02 01 0000fde8
         40 03 04 c0000202
         c0 08 04 fde80064
         c0 20 18 0000fde8 00000001 00000002 | 0000fde9 ffffffff 00000000",
        "1a 0a000000",
    );
    let u = Update {
        attrs: PathAttrs {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::from_sequence(vec![65000])),
            next_hop: Some(ip4("192.0.2.2")),
            communities: vec![0xfde8_0064],
            large_communities: vec![(65000, 1, 2), (65001, u32::MAX, 0)],
            ..PathAttrs::default()
        },
        nlri: vec![net("10.0.0.0/26")],
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), FOUR);
}

/// RFC 6793 §4.2.2: towards a 2-octet peer, AS_TRANS in AS_PATH/AGGREGATOR and the real
/// numbers in AS4_PATH/AS4_AGGREGATOR; on receipt (§4.2.3) the original comes back.
#[test]
fn update_as4_path_towards_two_octet_peer() {
    let bytes = update_msg(
        "40 01 01 00
         40 02 06 | 02 02 fde9 5ba0
         40 03 04 c0000202
         c0 07 06 5ba0 c0000203
         c0 11 0a | 02 02 0000fde9 fa56ea01
         c0 12 08 fa56ea01 c0000203",
        "1a 0a000000",
    );
    let u = Update {
        attrs: PathAttrs {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::from_sequence(vec![65001, AS4])),
            next_hop: Some(ip4("192.0.2.2")),
            aggregator: Some(Aggregator {
                asn: AS4,
                addr: ip4("192.0.2.3"),
            }),
            ..PathAttrs::default()
        },
        nlri: vec![net("10.0.0.0/26")],
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), TWO);
}

/// RFC 6793 §4.2.3 merge when an OLD speaker prepended after the AS4_PATH was formed: the
/// leading AS_PATH numbers are kept, the rest comes from AS4_PATH.
#[test]
fn as4_merge_on_receipt() {
    let bytes = update_msg(
        "40 01 01 00
         40 02 08 | 02 03 fdf2 fde9 5ba0
         40 03 04 c0000202
         c0 11 0a | 02 02 0000fde9 fa56ea01",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, TWO).unwrap() else {
        panic!()
    };
    assert_eq!(
        u.attrs.as_path.unwrap().segments,
        vec![
            AsSegment::Sequence(vec![65010]),
            AsSegment::Sequence(vec![65001, AS4])
        ]
    );

    // AS4_PATH longer than AS_PATH: AS4_PATH is ignored (§4.2.3).
    let bytes = update_msg(
        "40 01 01 00 | 40 02 04 | 02 01 5ba0 | 40 03 04 c0000202
         c0 11 0a | 02 02 0000fde9 fa56ea01",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, TWO).unwrap() else {
        panic!()
    };
    assert_eq!(u.attrs.as_path.unwrap(), AsPath::from_sequence(vec![23456]));

    // AGGREGATOR that is not AS_TRANS: both AS4_AGGREGATOR and AS4_PATH are ignored.
    let bytes = update_msg(
        "40 01 01 00 | 40 02 04 | 02 01 5ba0 | 40 03 04 c0000202
         c0 07 06 fde9 c0000203
         c0 11 06 | 02 01 fa56ea01
         c0 12 08 fa56ea01 c0000203",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, TWO).unwrap() else {
        panic!()
    };
    assert_eq!(u.attrs.as_path.unwrap(), AsPath::from_sequence(vec![23456]));
    assert_eq!(u.attrs.aggregator.unwrap().asn, 65001);

    // AGGREGATOR that is not AS_TRANS but no AS4_AGGREGATOR: AS4_PATH is still merged.
    let bytes = update_msg(
        "40 01 01 00 | 40 02 04 | 02 01 5ba0 | 40 03 04 c0000202
         c0 07 06 fde9 c0000203
         c0 11 06 | 02 01 fa56ea01",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, TWO).unwrap() else {
        panic!()
    };
    assert_eq!(u.attrs.as_path.unwrap(), AsPath::from_sequence(vec![AS4]));
    assert_eq!(u.attrs.aggregator.unwrap().asn, 65001);

    // Confederation segments in AS4_PATH are dropped, the rest is used (RFC 6793 §6), and a
    // leading AS_CONFED_SEQUENCE of AS_PATH survives the merge.
    let bytes = update_msg(
        "40 01 01 00
         40 02 08 | 03 01 fdf0 | 02 01 5ba0
         40 03 04 c0000202
         c0 11 0c | 03 01 0000fdf0 | 02 01 fa56ea01",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, TWO).unwrap() else {
        panic!()
    };
    assert!(u.errors.is_empty(), "{:?}", u.errors);
    assert_eq!(
        u.attrs.as_path.unwrap().segments,
        vec![
            AsSegment::ConfedSequence(vec![65008]),
            AsSegment::Sequence(vec![AS4])
        ]
    );
}

/// AS4_PATH never carries confederation segments (RFC 6793 §4.2.2).
#[test]
fn as4_path_encoding_leaves_out_confederation_segments() {
    let u = Update {
        attrs: PathAttrs {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath {
                segments: vec![
                    AsSegment::ConfedSequence(vec![65008]),
                    AsSegment::Sequence(vec![AS4]),
                ],
            }),
            next_hop: Some(ip4("192.0.2.2")),
            ..PathAttrs::default()
        },
        nlri: vec![net("10.0.0.0/26")],
        ..Update::default()
    };
    let bytes = update_msg(
        "40 01 01 00
         40 02 08 | 03 01 fdf0 | 02 01 5ba0
         40 03 04 c0000202
         c0 11 06 | 02 01 fa56ea01",
        "1a 0a000000",
    );
    both_ways(&bytes, &upd(u), TWO);
}

/// An unknown optional transitive attribute is kept and sent on with the Partial bit
/// (RFC 4271 §5), in type-code order (EXTENDED COMMUNITIES, 16, before AS4_PATH, 17).
#[test]
fn unknown_optional_transitive_is_passed_on_with_partial() {
    let received = update_msg(
        "40 01 01 00 | 40 02 06 | 02 01 0000fde9 | 40 03 04 c0000202
         c0 63 0c fa56ea01 00000001 00000002
         c0 10 08 0002fde9 00000064",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&received, FOUR).unwrap() else {
        panic!()
    };
    assert_eq!(
        u.attrs.unknown,
        vec![
            RawAttr {
                flags: 0xc0,
                code: 99,
                value: Bytes::from(hex("fa56ea01 00000001 00000002"))
            },
            RawAttr {
                flags: 0xc0,
                code: 16,
                value: Bytes::from(hex("0002fde9 00000064"))
            },
        ]
    );
    let sent = update_msg(
        "40 01 01 00 | 40 02 06 | 02 01 0000fde9 | 40 03 04 c0000202
         e0 10 08 0002fde9 00000064
         e0 63 0c fa56ea01 00000001 00000002",
        "1a 0a000000",
    );
    assert_eq!(hexs(&encode(&upd(u.clone()), FOUR)), hexs(&sent));
    // Towards a 2-octet peer with a 4-octet path the unknown 16 goes before AS4_PATH (17).
    let mut u2 = u;
    u2.attrs.as_path = Some(AsPath::from_sequence(vec![AS4]));
    let sent2 = update_msg(
        "40 01 01 00 | 40 02 04 | 02 01 5ba0 | 40 03 04 c0000202
         e0 10 08 0002fde9 00000064
         c0 11 06 | 02 01 fa56ea01
         e0 63 0c fa56ea01 00000001 00000002",
        "1a 0a000000",
    );
    assert_eq!(hexs(&encode(&upd(u2), TWO)), hexs(&sent2));

    // Unknown optional non-transitive attributes are dropped quietly.
    let bytes = update_msg(
        "40 01 01 00 | 40 02 00 | 40 03 04 c0000202 | 80 63 02 abcd",
        "1a 0a000000",
    );
    let Message::Update(u) = decode(&bytes, FOUR).unwrap() else {
        panic!()
    };
    assert!(u.attrs.unknown.is_empty() && u.errors.is_empty());
}

fn mp_attrs() -> PathAttrs {
    PathAttrs {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::from_sequence(vec![65001])),
        ..PathAttrs::default()
    }
}

#[test]
fn mp_reach_ipv6_global_next_hop() {
    let bytes = update_msg(
        "90 0e 0026 | 0002 01 | 10 20010db8000000000000000000000002 | 00
                    | 7a 20010db8000100000000000000000040
         40 01 01 00
         40 02 06 | 02 01 0000fde9",
        "",
    );
    let u = Update {
        attrs: mp_attrs(),
        mp_reach: Some(MpReach {
            family: Family::IPV6_UNICAST,
            next_hop: NextHop::new("2001:db8::2".parse().unwrap()),
            nlri: vec![net("2001:db8:1::40/122")],
        }),
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), FOUR);
}

#[test]
fn mp_reach_ipv6_global_and_link_local_next_hop() {
    let bytes = update_msg(
        "90 0e 0036 | 0002 01 | 20 20010db8000000000000000000000002
                                   fe800000000000000000000000000002 | 00
                    | 7a 20010db8000100000000000000000040
         40 01 01 00
         40 02 06 | 02 01 0000fde9",
        "",
    );
    let u = Update {
        attrs: mp_attrs(),
        mp_reach: Some(MpReach {
            family: Family::IPV6_UNICAST,
            next_hop: NextHop {
                addr: "2001:db8::2".parse().unwrap(),
                link_local: Some("fe80::2".parse().unwrap()),
            },
            nlri: vec![net("2001:db8:1::40/122")],
        }),
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), FOUR);
}

#[test]
fn mp_unreach_ipv6() {
    let bytes = update_msg(
        "90 0f 0014 | 0002 01 | 7a 20010db8000100000000000000000040",
        "",
    );
    let u = Update {
        mp_unreach: Some(MpUnreach {
            family: Family::IPV6_UNICAST,
            withdrawn: vec![net("2001:db8:1::40/122")],
        }),
        ..Update::default()
    };
    both_ways(&bytes, &upd(u), FOUR);
}

#[test]
fn end_of_rib_both_families() {
    let v4 = hex("ffffffffffffffffffffffffffffffff 0017 02 | 0000 | 0000");
    both_ways(&v4, &upd(Update::end_of_rib(Family::IPV4_UNICAST)), FOUR);
    let v6 = update_msg("90 0f 0003 | 0002 01", "");
    both_ways(&v6, &upd(Update::end_of_rib(Family::IPV6_UNICAST)), FOUR);
    // As BIRD and GoBGP send it: MP_UNREACH_NLRI without the Extended Length bit.
    let v6_short = update_msg("80 0f 03 | 0002 01", "");
    for (bytes, family) in [
        (v4, Family::IPV4_UNICAST),
        (v6, Family::IPV6_UNICAST),
        (v6_short, Family::IPV6_UNICAST),
    ] {
        let Message::Update(u) = decode(&bytes, FOUR).unwrap() else {
            panic!()
        };
        assert_eq!(u.end_of_rib_family(), Some(family));
    }
    // A withdrawal is not an End-of-RIB.
    let Message::Update(u) = decode(
        &update_msg(
            "90 0f 0014 | 0002 01 | 7a 20010db8000100000000000000000040",
            "",
        ),
        FOUR,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(u.end_of_rib_family(), None);
}

#[test]
fn mp_reach_ipv4_via_mp_and_host_bits_cleared() {
    // IPv4 in MP_REACH (RFC 4760 allows it), and trailing host bits are ignored on receipt.
    let bytes = update_msg(
        "90 0e 000e | 0001 01 | 04 c0000202 | 00 | 1a 0a000041
         40 01 01 00 | 40 02 00",
        "",
    );
    let Message::Update(u) = decode(&bytes, FOUR).unwrap() else {
        panic!()
    };
    let r = u.mp_reach.unwrap();
    assert_eq!(r.next_hop, NextHop::new(IpAddr::V4(ip4("192.0.2.2"))));
    assert_eq!(r.nlri, vec![net("10.0.0.64/26")]);
    assert!(u.errors.is_empty());
}
