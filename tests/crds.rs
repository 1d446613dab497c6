//! `crds/` is what the code generates, and `podroute crds` prints exactly `crds/`.
//! Regenerate with `cargo run -- crds --out-dir crds`.

use std::path::Path;

fn crds_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crds")
}

#[test]
fn crds_directory_matches_the_generated_crds() {
    let generated = podroute::crds::all();
    let mut on_disk: Vec<String> = std::fs::read_dir(crds_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = generated.iter().map(|c| c.file_name.clone()).collect();
    names.sort();
    assert_eq!(
        on_disk, names,
        "crds/ holds other files than the code generates"
    );
    for crd in generated {
        let file = std::fs::read_to_string(crds_dir().join(&crd.file_name)).unwrap();
        assert_eq!(
            file,
            crd.to_yaml().unwrap(),
            "crds/{} differs from the code; run `cargo run -- crds --out-dir crds`",
            crd.file_name
        );
    }
}

#[test]
fn podroute_crds_prints_the_crds_directory() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_podroute"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = String::new();
    for crd in podroute::crds::all() {
        expected.push_str("---\n");
        expected.push_str(&std::fs::read_to_string(crds_dir().join(&crd.file_name)).unwrap());
    }
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

#[test]
fn crds_are_calico_compatible() {
    let expected = [
        (
            "BGPConfiguration",
            "bgpconfigurations",
            "bgpconfiguration",
            None,
        ),
        ("BGPFilter", "bgpfilters", "bgpfilter", None),
        ("BGPPeer", "bgppeers", "bgppeer", None),
        (
            "BlockAffinity",
            "blockaffinities",
            "blockaffinity",
            Some(vec!["cidr", "deleted", "node", "state"]),
        ),
        (
            "IPAMBlock",
            "ipamblocks",
            "ipamblock",
            Some(vec![
                "allocations",
                "attributes",
                "cidr",
                "sequenceNumber",
                "strictAffinity",
                "unallocated",
            ]),
        ),
        (
            "IPAMHandle",
            "ipamhandles",
            "ipamhandle",
            Some(vec!["block", "handleID"]),
        ),
        ("IPPool", "ippools", "ippool", Some(vec!["cidr"])),
    ];
    let crds = podroute::crds::all();
    assert_eq!(crds.len(), expected.len());
    for (crd, (kind, plural, singular, required)) in crds.iter().zip(expected) {
        let o = &crd.object;
        assert_eq!(
            o["metadata"]["name"],
            format!("{plural}.crd.projectcalico.org")
        );
        let spec = &o["spec"];
        assert_eq!(spec["group"], "crd.projectcalico.org");
        assert_eq!(spec["scope"], "Cluster");
        assert_eq!(spec["names"]["kind"], kind);
        assert_eq!(spec["names"]["listKind"], format!("{kind}List"));
        assert_eq!(spec["names"]["plural"], plural);
        assert_eq!(spec["names"]["singular"], singular);
        let version = &spec["versions"][0];
        assert_eq!(version["name"], "v1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let req: Option<Vec<&str>> = schema["required"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect());
        assert_eq!(req, required, "{kind} required fields");
    }
    let pool = &crds[6].object["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    for field in ["ipipMode", "vxlanMode"] {
        assert_eq!(pool[field]["default"], "Never");
        assert_eq!(
            pool[field]["enum"],
            serde_json::json!(["Never", "Always", "CrossSubnet"])
        );
    }
    let bgp = &crds[0].object["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert_eq!(bgp["listenPort"]["maximum"], 65535);
}

/// The BGPFilter schema has Calico's enums, so `kubectl apply` refuses what podroute would
/// reject anyway.
#[test]
fn bgpfilter_rules_have_calicos_enums() {
    let crds = podroute::crds::all();
    let filter = crds
        .iter()
        .find(|c| c.file_name == "crd.projectcalico.org_bgpfilters.yaml")
        .expect("the BGPFilter CRD is generated");
    let spec = &filter.object["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    for list in ["exportV4", "importV4", "exportV6", "importV6"] {
        let rule = &spec[list]["items"]["properties"];
        assert_eq!(
            rule["action"]["enum"],
            serde_json::json!(["Accept", "Reject"])
        );
        assert_eq!(
            rule["matchOperator"]["enum"],
            serde_json::json!(["Equal", "NotEqual", "In", "NotIn"])
        );
        assert_eq!(rule["source"]["enum"], serde_json::json!(["RemotePeers"]));
    }
    assert_eq!(
        spec["exportV6"]["items"]["properties"]["prefixLength"]["properties"]["max"]["maximum"],
        128
    );
}
