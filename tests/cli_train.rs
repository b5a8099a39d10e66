//! `mana train` and `mana generate` as a user runs them: the built binary, a temporary directory, no
//! network. Covers learning on the built-in corpus, the JSON log, checkpoints feeding `generate`,
//! speculative decoding giving identical output, settings precedence (flag > env > file) and refusals of
//! bad input.

mod cli_support;

use cli_support::{TINY_CONFIG, mana, ok};

use std::path::Path;

use serde_json::Value;

/// ln 256: the loss of a model that knows nothing about bytes.
const UNIFORM_LOSS: f64 = 5.545;

/// A model small enough to train in well under a minute on two cores.
const SMALL: &str = r#"
[model]
d_model = 64
n_layers = 2
n_heads = 4
n_dense_layers = 1
dense_hidden = 192
n_routed_experts = 4
top_k = 2
expert_hidden = 96
shared_hidden = 96
context = 64

[optim]
lr = 0.004
min_lr = 0.0004
warmup_steps = 20

[train]
batch_size = 16
seq_len = 64
eval_every = 50
eval_batches = 4
builtin_bytes = 1000000
"#;

/// The tests' tiny model, trained for 3 steps only: these tests check plumbing.
fn tiny() -> String {
    format!("{TINY_CONFIG}steps = 3\n")
}

fn log_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("the JSON log exists");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each log line is JSON"))
        .collect()
}

#[test]
fn training_on_the_builtin_corpus_learns_and_its_checkpoint_generates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("small.toml");
    std::fs::write(&config, SMALL).expect("write config");
    let log = dir.path().join("log.jsonl");
    let ckpt = dir.path().join("ckpt");
    let out = ok(mana()
        .args(["train", "--steps", "150", "--seed", "3", "--config"])
        .arg(&config)
        .arg("--log-json")
        .arg(&log)
        .arg("--save")
        .arg(&ckpt)
        .output()
        .expect("run mana train"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tokens/s") && stdout.contains("validation loss"),
        "summary: {stdout}"
    );

    let lines = log_lines(&log);
    assert_eq!(lines.len(), 150);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"].as_u64(), Some(i as u64));
        for key in ["loss", "mtp_loss", "lr", "tokens_per_s"] {
            assert!(
                line[key].as_f64().is_some_and(f64::is_finite),
                "{key} missing at step {i}: {line}"
            );
        }
        let load = line["expert_load"]
            .as_array()
            .expect("expert_load is an array");
        assert_eq!(load.len(), 1, "one MoE layer");
        let shares: f64 = load[0]
            .as_array()
            .expect("per-expert loads")
            .iter()
            .filter_map(Value::as_f64)
            .sum();
        assert!(
            (shares - 1.0).abs() < 1e-3,
            "expert loads sum to 1: {shares}"
        );
    }
    let evaluated: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["val_loss"].as_f64())
        .collect();
    assert_eq!(evaluated.len(), 3, "steps 50, 100 and 150 are evaluated");
    let first = lines[0]["loss"].as_f64().expect("loss");
    let final_val = *evaluated.last().expect("three evaluations");
    assert!(
        (first - UNIFORM_LOSS).abs() < 0.5,
        "an untrained byte model starts near ln 256: {first}"
    );
    assert!(
        final_val < 2.2,
        "validation loss {final_val} is not well below ln 256 = {UNIFORM_LOSS}"
    );
    assert!(
        lines[149]["mtp_loss"].as_f64().expect("mtp loss") < 3.0,
        "the MTP head learns too"
    );

    // Greedy decoding with and without speculation (--compare fails if the outputs differ).
    let out = ok(mana()
        .args([
            "generate",
            "--prompt",
            "add 12+3",
            "--max-tokens",
            "48",
            "--compare",
            "--json",
            "--checkpoint",
        ])
        .arg(&ckpt)
        .output()
        .expect("run mana generate"));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let text = report["text"].as_str().expect("text");
    assert!(text.starts_with("add 12+3"), "{text}");
    let spec = &report["speculative"];
    assert_eq!(spec["tokens"].as_u64(), Some(48));
    let rate = spec["acceptance_rate"].as_f64().expect("acceptance rate");
    assert!((0.0..=1.0).contains(&rate));
    let per_pass = spec["tokens_per_pass"].as_f64().expect("tokens per pass");
    assert!(per_pass >= 1.0 && per_pass <= 2.0, "{per_pass}");
    assert_eq!(report["plain"]["tokens_per_pass"].as_f64(), Some(1.0));

    // Sampling with the same seed: speculation does not change the text either.
    let sample = |speculative: bool| {
        let mut cmd = mana();
        cmd.args([
            "generate",
            "--prompt",
            "kv k1=v2",
            "--max-tokens",
            "40",
            "--temperature",
            "0.8",
        ]);
        cmd.args(["--top-p", "0.9", "--seed", "5", "--checkpoint"])
            .arg(&ckpt);
        if speculative {
            cmd.arg("--speculative");
        }
        ok(cmd.output().expect("run mana generate")).stdout
    };
    assert_eq!(sample(false), sample(true));

    // The KV cache changes nothing but the speed, past the context too (greedy and speculative).
    let greedy = |extra: &[&str]| {
        let mut cmd = mana();
        cmd.args(["generate", "--prompt", "add 7+", "--max-tokens", "300"])
            .args(extra)
            .arg("--checkpoint")
            .arg(&ckpt);
        ok(cmd.output().expect("run mana generate")).stdout
    };
    let cached = greedy(&[]);
    assert_eq!(cached, greedy(&["--no-kv-cache"]));
    assert_eq!(cached, greedy(&["--no-kv-cache", "--speculative"]));
}

#[test]
fn flags_override_env_which_overrides_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tiny.toml");
    std::fs::write(&config, tiny()).expect("write config");
    let log = dir.path().join("log.jsonl");
    let train = |env: &[(&str, &str)], flags: &[&str]| {
        let mut cmd = mana();
        cmd.arg("train")
            .arg("--config")
            .arg(&config)
            .arg("--log-json")
            .arg(&log)
            .args(flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        ok(cmd.output().expect("run mana train"));
        log_lines(&log)
    };
    let from_file = train(&[], &[]);
    assert_eq!(from_file.len(), 3);
    assert_eq!(from_file[0]["precision"], "fp8");
    assert_eq!(from_file[0]["tokens"].as_u64(), Some(2 * 16));
    let from_env = train(&[("MANA_STEPS", "2"), ("MANA_PRECISION", "f32")], &[]);
    assert_eq!(from_env.len(), 2);
    assert_eq!(from_env[0]["precision"], "f32");
    let from_flag = train(
        &[("MANA_STEPS", "2"), ("MANA_PRECISION", "f32")],
        &["--steps", "1", "--precision", "fp8"],
    );
    assert_eq!(from_flag.len(), 1);
    assert_eq!(from_flag[0]["precision"], "fp8");
    // The last step is always evaluated, even with eval_every = 0.
    assert!(from_flag[0]["val_loss"].as_f64().is_some());
    // Same seed, same run: everything but the timings repeats exactly.
    let strip = |lines: Vec<Value>| -> Vec<Value> {
        lines
            .into_iter()
            .map(|mut l| {
                if let Some(o) = l.as_object_mut() {
                    o.remove("tokens_per_s");
                    o.remove("elapsed_s");
                }
                l
            })
            .collect()
    };
    let again = train(&[("MANA_STEPS", "2"), ("MANA_PRECISION", "f32")], &[]);
    assert_eq!(strip(again), strip(from_env));
}

#[test]
fn trains_on_a_user_corpus_directory_with_gz_files() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tiny.toml");
    std::fs::write(&config, tiny()).expect("write config");
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).expect("mkdir");
    std::fs::write(
        corpus.join("a.txt"),
        "In the beginning was the word.\n".repeat(300),
    )
    .expect("write");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all("And the word was with mana.\n".repeat(300).as_bytes())
        .expect("compress");
    std::fs::write(corpus.join("sub/b.txt.gz"), gz.finish().expect("compress")).expect("write");
    let out = ok(mana()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--corpus")
        .arg(&corpus)
        .output()
        .expect("run"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("validation loss"));
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tiny.toml");
    std::fs::write(&config, tiny()).expect("write config");
    let fails = |args: &[&str], want: &str| {
        let out = mana()
            .arg("train")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run mana");
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    };
    let missing = dir.path().join("missing.txt");
    fails(
        &["--corpus", missing.to_str().expect("UTF-8 temp path")],
        "missing.txt",
    );
    let binary = dir.path().join("binary.dat");
    std::fs::write(&binary, [0x66u8, 0x6f, 0xff, 0xfe, 0x00]).expect("write");
    fails(
        &["--corpus", binary.to_str().expect("UTF-8 temp path")],
        "UTF-8",
    );
    fails(&["--seq-len", "33"], "context");
    fails(&["--precision", "fp4"], "fp4");
    fails(&["--steps", "0"], "steps");
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[train]\nstepz = 3\n").expect("write");
    let out = mana()
        .arg("train")
        .arg("--config")
        .arg(&unknown)
        .output()
        .expect("run mana");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stepz"));
    let out = mana()
        .args(["generate", "--prompt", "x", "--checkpoint"])
        .arg(dir.path().join("nope"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint"));
}
