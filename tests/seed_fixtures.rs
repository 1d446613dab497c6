//! The seed's objects (seed 001, Calico IPIP), written exactly as the article prints them,
//! parse into the expected model.

use std::path::Path;

use podroute::model::{Affinity, Block, EncapMode, Object, Pool, decode_documents};

fn decode_one(file: &str) -> Object {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/seed001")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut docs = decode_documents(&text).unwrap();
    assert_eq!(docs.len(), 1, "{file}");
    docs.remove(0).unwrap()
}

#[test]
fn seed_ippool_is_a_crosssubnet_ipip_pool() {
    let Object::IPPool(raw) = decode_one("ippool-default-ipv4-ippool.yaml") else {
        panic!("not an IPPool");
    };
    let pool = Pool::from_resource(&raw).unwrap();
    assert_eq!(pool.name, "default-ipv4-ippool");
    assert_eq!(pool.cidr, "172.16.0.0/16".parse().unwrap());
    assert_eq!(pool.block_size, 26);
    assert_eq!(pool.ipip_mode, EncapMode::CrossSubnet);
    assert_eq!(pool.vxlan_mode, EncapMode::Never);
    assert!(!pool.nat_outgoing && !pool.disabled && !pool.disable_bgp_export);
    assert_eq!(
        pool.created.map(|t| t.to_string()).as_deref(),
        Some("2021-03-30T04:16:40Z")
    );
}

#[test]
fn seed_ipamblocks_take_their_cidr_from_the_name_and_their_host_from_affinity() {
    let cases = [
        (
            "ipamblock-172-16-196-128-26.yaml",
            "172.16.196.128/26",
            "node01",
        ),
        (
            "ipamblock-172-16-241-64-26.yaml",
            "172.16.241.64/26",
            "master01",
        ),
    ];
    for (file, cidr, host) in cases {
        let Object::IPAMBlock(raw) = decode_one(file) else {
            panic!("{file}: not an IPAMBlock");
        };
        // The printed spec carries the legacy capitalised `Deleted` and no cidr.
        assert_eq!(raw.spec.deleted_legacy, Some(false));
        assert_eq!(raw.spec.cidr, None);
        let block = Block::from_resource(&raw).unwrap();
        assert_eq!(block.cidr, cidr.parse().unwrap(), "{file}");
        assert_eq!(block.affinity, Some(Affinity::Host(host.to_string())));
        assert_eq!(block.host(), Some(host));
        assert!(block.allocations.is_empty());
        assert!(!block.deleted);
    }
}

#[tokio::test]
async fn seed_directory_gives_the_expected_cluster_state() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed001");
    let mut ds =
        podroute::datastore::dir::spawn(dir, "master01", std::time::Duration::from_millis(50));
    let state = ds.state.synced().await.unwrap();
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
    assert!(state.source_errors.is_empty(), "{:?}", state.source_errors);
    assert_eq!(
        state.pools.keys().collect::<Vec<_>>(),
        ["default-ipv4-ippool"]
    );
    let local: Vec<_> = state.local_blocks().map(|b| b.cidr.to_string()).collect();
    assert_eq!(local, ["172.16.241.64/26"]);
    let remote: Vec<_> = state
        .blocks_of("node01")
        .map(|b| b.cidr.to_string())
        .collect();
    assert_eq!(remote, ["172.16.196.128/26"]);
    let pool = state
        .pool_containing(&"172.16.196.128/26".parse().unwrap())
        .unwrap();
    assert_eq!(pool.ipip_mode, EncapMode::CrossSubnet);
    // No BGPConfiguration in the seed: Calico's defaults.
    assert_eq!(state.bgp.as_number, 64512);
    assert!(state.bgp.node_to_node_mesh);
    assert_eq!(state.bgp.listen_port, 179);
}
