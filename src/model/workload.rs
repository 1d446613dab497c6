//! Names of the host-side interfaces of pods, as Calico's CNI plugin creates them.

use sha1::{Digest, Sha1};

/// `cali` + the first 11 hex digits of sha1("<namespace>.<pod>"), e.g. the interface of pod
/// `default/busybox` on the host.
pub fn workload_interface_name(namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let mut name = String::with_capacity(15);
    name.push_str("cali");
    for byte in digest.iter() {
        name.push_str(&format!("{byte:02x}"));
        if name.len() >= 15 {
            break;
        }
    }
    name.truncate(15);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_name_matches_the_seed_route_table() {
        // Seed 001: pod kube-system/busybox-b8ffb94c4-c84gp holds 172.16.241.69 on master01,
        // whose route table shows `172.16.241.69 ... cali67beaa0e9f4`.
        assert_eq!(
            workload_interface_name("kube-system", "busybox-b8ffb94c4-c84gp"),
            "cali67beaa0e9f4"
        );
    }

    #[test]
    fn interface_name_is_cali_plus_11_hex_digits_of_sha1() {
        // `printf default.busybox | sha1sum` = 12d4a061371a543f...
        assert_eq!(
            workload_interface_name("default", "busybox"),
            "cali12d4a061371"
        );
    }
}
