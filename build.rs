//! Links the agent with `src/hot_text.ld`: the functions the agent runs (start-up, idle, BGP
//! updates to kernel routes) first in `.text`, so that the kernel maps fewer pages of code
//! into the process (it maps 64 KiB around each page first touched; scattered, the idle agent
//! touched 137 such windows). Only where the linker is LLD (the default of
//! x86_64-unknown-linux-gnu since Rust 1.90); `PODROUTE_HOT_TEXT=0` turns it off.
fn main() {
    println!("cargo:rerun-if-changed=src/hot_text.ld");
    println!("cargo:rerun-if-env-changed=PODROUTE_HOT_TEXT");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu"
        || std::env::var("PODROUTE_HOT_TEXT").as_deref() == Ok("0")
    {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bin=podroute=-Wl,-T,{dir}/src/hot_text.ld");
}
