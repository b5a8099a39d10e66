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

/// A model small enough to train in about a second (its `[train]` table last, so a test may append keys to
/// it), trained long enough that greedy text varies.
pub const TINY_CONFIG: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
n_dense_layers = 1
dense_hidden = 64
n_routed_experts = 4
top_k = 2
expert_hidden = 32
shared_hidden = 32
context = 32
precision = "fp8"

[train]
batch_size = 2
seq_len = 16
eval_every = 0
eval_batches = 1
builtin_bytes = 100000
"#;
