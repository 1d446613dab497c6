//! UPDATE decode and encode throughput for packed /26 announcements.
//!
//! `cargo bench -p podroute-bgp --bench codec -- --warm-up-time 1 --measurement-time 3`
//! Throughput is reported in elements = prefixes, i.e. prefixes per second.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podroute_bgp::wire::*;
use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

const CTX: CodecContext = CodecContext {
    four_octet_as: true,
};

fn v4_26s(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).unwrap()))
        .collect()
}

fn v6_122s(n: u128) -> Vec<IpNet> {
    let base = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
    (0..n)
        .map(|i| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base + (i << 6)), 122).unwrap()))
        .collect()
}

fn attrs() -> PathAttrs {
    PathAttrs {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath::from_sequence(vec![65001, 4_200_000_001])),
        next_hop: Some(Ipv4Addr::new(192, 0, 2, 1)),
        med: Some(0),
        communities: vec![0xfde9_0001],
        ..PathAttrs::default()
    }
}

fn decode_all(mut buf: BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(Message::Update(u))) = decode_message(&mut buf, CTX) {
        n += u.nlri.len() + u.mp_reach.map_or(0, |r| r.nlri.len());
    }
    n
}

fn bench(c: &mut Criterion) {
    let enc = UpdateEncoder::new(CTX);

    // One full UPDATE: as many /26s as fit in 4096 octets.
    let mut one = BytesMut::new();
    let all = v4_26s(2000);
    enc.announce(&attrs(), None, &all, &mut one);
    let first_len = frame_len(&one).unwrap().unwrap();
    let one = one.split_to(first_len);
    let n_one = decode_all(one.clone());
    let mut g = c.benchmark_group("update_4096");
    g.throughput(Throughput::Elements(n_one as u64));
    g.bench_function(BenchmarkId::new("decode_v4_26", n_one), |b| {
        b.iter(|| decode_all(black_box(one.clone())))
    });
    let prefixes = v4_26s(n_one as u32);
    g.bench_function(BenchmarkId::new("encode_v4_26", n_one), |b| {
        let mut out = BytesMut::with_capacity(8192);
        b.iter(|| {
            out.clear();
            enc.announce(black_box(&attrs()), None, black_box(&prefixes), &mut out)
        })
    });
    g.finish();

    // 100,000 prefixes through the encoder and back.
    let mut g = c.benchmark_group("table_100k");
    g.sample_size(20);
    for (name, prefixes, nh) in [
        ("v4_26", v4_26s(100_000), None),
        (
            "v6_122",
            v6_122s(100_000),
            Some(NextHop::new("2001:db8::1".parse().unwrap())),
        ),
    ] {
        g.throughput(Throughput::Elements(prefixes.len() as u64));
        let mut wire = BytesMut::new();
        enc.announce(&attrs(), nh, &prefixes, &mut wire);
        assert_eq!(decode_all(wire.clone()), prefixes.len());
        g.bench_function(format!("encode_{name}"), |b| {
            let mut out = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                enc.announce(black_box(&attrs()), nh, black_box(&prefixes), &mut out)
            })
        });
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| decode_all(black_box(wire.clone())))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
