//! Names of the host-side interfaces of pods, as Calico's CNI plugin creates them. The rule
//! lives with the plan, which is what routes to these interfaces; the model re-exports it.

pub use crate::plan::workload_interface_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_name_is_cali_plus_11_hex_digits_of_sha1() {
        // `printf default.busybox | sha1sum` = 12d4a061371a543f...
        assert_eq!(
            workload_interface_name("default", "busybox"),
            "cali12d4a061371"
        );
    }
}
