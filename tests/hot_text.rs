//! The agent binary is linked with `src/hot_text.ld` (build.rs): the functions the agent runs
//! come first in `.text`, before the code it never runs. If the script stops being applied
//! (or stops matching), the agent's code pages mapped at run time grow back by several MiB
//! (`benches/bgp_to_kernel.rs`, peak RSS).

use std::process::Command;

fn address(symbols: &str, prefix: &str) -> u64 {
    symbols
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            (matches!(kind, "t" | "T") && name.starts_with(prefix))
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .min()
        .unwrap_or_else(|| panic!("no symbol {prefix}* in the agent binary"))
}

#[test]
fn hot_functions_come_first_in_text() {
    if std::env::var("PODROUTE_HOT_TEXT").as_deref() == Ok("0") {
        println!("hot_text: skipped: PODROUTE_HOT_TEXT=0 builds without the layout");
        assert!(
            std::env::var("CI").is_err(),
            "CI must build with the hot-text layout"
        );
        return;
    }
    let out = Command::new("nm")
        .arg(env!("CARGO_BIN_EXE_podroute"))
        .output()
        .unwrap_or_else(|e| panic!("running nm (binutils): {e}"));
    assert!(out.status.success(), "nm failed");
    let symbols = String::from_utf8_lossy(&out.stdout);
    // Run on every start and on every route batch: in the script.
    let hot = [
        "_ZN8podroute4main",
        "_ZN8podroute9dataplane6socket8send_all",
        "_ZN12podroute_bgp3rib3Rib13import_update",
    ];
    // Never run by an agent: error rendering of the command line, the lab.
    let cold = address(&symbols, "_ZN8podroute3lab");
    for h in hot {
        let a = address(&symbols, h);
        assert!(
            a < cold,
            "{h} at {a:#x} is not before the lab code at {cold:#x}"
        );
    }
}
