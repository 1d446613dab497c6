//! Workload interface names, as Calico's CNI plugin and Felix derive them.
//!
//! The host side of a pod's veth is `cali` followed by the first 11 hex digits of
//! `sha1("<namespace>.<pod>")`: 15 characters, the kernel's `IFNAMSIZ - 1` limit. The plan only
//! routes a pod IP to its interface when an interface of that name exists.

use sha1::{Digest, Sha1};

/// Prefix of every workload interface name.
pub const WORKLOAD_IFACE_PREFIX: &str = "cali";

/// Number of hex digits of the SHA-1 digest that follow the prefix.
const HASH_DIGITS: usize = 11;

/// The host-side interface name of the pod `namespace/pod`: `cali` + first 11 hex chars of
/// `sha1("namespace.pod")`.
///
/// ```
/// assert_eq!(
///     podroute::plan::workload_interface_name("kube-system", "busybox-b8ffb94c4-c84gp"),
///     "cali67beaa0e9f4"
/// );
/// ```
pub fn workload_interface_name(namespace: &str, pod: &str) -> String {
    let mut hasher = Sha1::new();
    hasher.update(namespace.as_bytes());
    hasher.update(b".");
    hasher.update(pod.as_bytes());
    let digest = hasher.finalize();
    let mut name = String::with_capacity(WORKLOAD_IFACE_PREFIX.len() + HASH_DIGITS);
    name.push_str(WORKLOAD_IFACE_PREFIX);
    for byte in digest.iter() {
        for nibble in [byte >> 4, byte & 0x0f] {
            if name.len() == WORKLOAD_IFACE_PREFIX.len() + HASH_DIGITS {
                return name;
            }
            name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed with coreutils: `echo -n "ns.pod" | sha1sum`.
    #[test]
    fn matches_sha1sum_of_namespace_dot_pod() {
        // Seed 001: busybox-b8ffb94c4-c84gp (kube-system) is 172.16.241.69 on master01, and
        // master01's table after CrossSubnet routes 172.16.241.69 to cali67beaa0e9f4.
        assert_eq!(
            workload_interface_name("kube-system", "busybox-b8ffb94c4-c84gp"),
            "cali67beaa0e9f4"
        );
        // sha1("default.nginx-0") = c048fd9a7506...
        assert_eq!(
            workload_interface_name("default", "nginx-0"),
            "calic048fd9a750"
        );
    }

    #[test]
    fn names_fit_ifnamsiz() {
        let name = workload_interface_name("a-very-long-namespace-name", "and-a-long-pod-name-0");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("cali"));
        assert!(
            name[4..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
