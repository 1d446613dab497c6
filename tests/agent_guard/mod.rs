//! The skip guard shared by the agent end-to-end and failure tests: a loud banner when a
//! test cannot run here, and a failure instead when `CI=true`.

use std::process::Command;

pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The loud "skipped" banner; a panic when `CI=true`, so that CI never passes without it.
pub fn cannot_run(suite: &str, test: &str, why: &str, need: &str) {
    let msg = format!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED agent {suite} test `{test}`: {why}.\n\
         !!! {need}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    if ci() {
        panic!("{msg}CI=true: an end-to-end test that cannot run is a failure");
    }
    eprintln!("{msg}");
}

pub fn tool_works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An executable named `program` is on `PATH`.
pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
