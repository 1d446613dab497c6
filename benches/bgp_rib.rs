//! BGP RIB benchmarks: import throughput of packed /26 announcements into the Loc-RIB, and
//! memory per route for 100,000 routes (counted by a wrapping global allocator, so the figure
//! is heap bytes actually held, not an estimate).
//!
//! Run: `cargo bench --bench bgp_rib`. BIRD holds about 100 bytes per route for comparison.

use criterion::{BatchSize, Criterion, criterion_group};
use ipnet::{IpNet, Ipv4Net};
use podroute::bgp::rib::{Rib, RibPeer};
use podroute::bgp::wire::{AsPath, Family, Origin, PathAttrs, Update};
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static HELD: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new, Ordering::Relaxed);
        HELD.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `n` /26 blocks from 10.0.0.0 upwards, as a cluster's IPAM would hand them out.
fn blocks(n: usize) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let a = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i as u32) * 64;
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), 26).unwrap())
        })
        .collect()
}

/// UPDATEs as a peer sends them: one next hop (node) per 4 blocks.
fn updates(prefixes: &[IpNet]) -> Vec<Update> {
    prefixes
        .chunks(4)
        .enumerate()
        .map(|(i, c)| Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                next_hop: Some(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(192, 168, 0, 0)) + i as u32,
                )),
                local_pref: Some(100),
                ..Default::default()
            },
            nlri: c.to_vec(),
            ..Default::default()
        })
        .collect()
}

fn rib() -> Rib {
    let mut rib = Rib::new(64512, Ipv4Addr::new(10, 255, 0, 1), None);
    rib.add_peer(
        1,
        RibPeer {
            addr: IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2)),
            remote_as: 64512,
            local_addr: IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1)),
            local_v6_next_hop: None,
            rr_client: false,
            next_hop_self: false,
            import_filter: None,
            export_filter: None,
            local_as: None,
            next_hop_keep: false,
            allow_own_as: 0,
        },
    );
    rib.peer_up(1, Ipv4Addr::new(10, 255, 0, 2), vec![Family::IPV4_UNICAST]);
    rib
}

fn memory_per_route(n: usize) {
    let ups = updates(&blocks(n));
    let before = HELD.load(Ordering::Relaxed);
    let mut r = rib();
    for u in &ups {
        let _ = r.apply_update(1, u);
    }
    let held = HELD.load(Ordering::Relaxed) - before;
    println!(
        "rib memory: {n} routes ({} attribute sets) hold {held} bytes = {:.1} bytes/route (Adj-RIB-In + Loc-RIB)",
        r.interned_attr_sets(),
        held as f64 / n as f64
    );
    drop(r);
}

fn import(c: &mut Criterion) {
    let mut g = c.benchmark_group("rib_import");
    g.sample_size(10);
    for n in [20_000usize, 100_000] {
        let ups = updates(&blocks(n));
        g.throughput(criterion::Throughput::Elements(n as u64));
        g.bench_function(format!("{n}_blocks"), |b| {
            b.iter_batched(
                rib,
                |mut r| {
                    for u in &ups {
                        let _ = r.apply_update(1, u);
                    }
                    r
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, import);

fn main() {
    memory_per_route(100_000);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
