//! Helpers shared by the tests that drive the `mana` binary (`tests/cli_*.rs`).
#![allow(dead_code)]

use std::process::{Command, Output};

/// The `mana` binary, logging warnings only, with no `MANA_*` variable leaking in from the environment (the
/// tests set the ones they mean to).
pub fn mana() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana"));
    for (key, _) in std::env::vars() {
        if key.starts_with("MANA_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// `out`, after checking that the command succeeded (else the test fails with its status and output).
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "mana failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
