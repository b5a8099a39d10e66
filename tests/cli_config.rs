//! The settings of the network commands as an operator meets them, through the built binary: a flag wins
//! over its `MANA_*` variable, which wins over the TOML file, which wins over the default; `--log-format
//! json` (or `MANA_LOG_FORMAT`, or `log_format` in the file) writes one JSON object per log line; boolean
//! variables take 1/true/yes/on and 0/false/no/off; a file with an unknown key or over 1 MiB is refused.
//! Only loopback (127.0.0.1, port 0).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TCP: &str = "/ip4/127.0.0.1/tcp/0";
const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

/// `mana` with none of the caller's `MANA_*` variables, logging at info.
fn mana() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MANA_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    cmd
}

/// What a bootstrap started with `cmd` shows: its first address line, and its first log line.
fn bootstrap_start(mut cmd: Command) -> (String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mana bootstrap starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let child = Proc(child);
    let mut addr = String::new();
    BufReader::new(stdout)
        .read_line(&mut addr)
        .expect("an address line");
    let mut log = String::new();
    BufReader::new(stderr)
        .read_line(&mut log)
        .expect("a log line");
    drop(child);
    (addr.trim().to_owned(), log.trim().to_owned())
}

fn is_json(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .is_ok_and(|v| v["level"].is_string() && v["timestamp"].is_string())
}

#[test]
fn flag_beats_variable_beats_file_beats_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("bootstrap.toml");
    let file_dir = dir.path().join("from-file");
    let env_dir = dir.path().join("from-env");
    let flag_dir = dir.path().join("from-flag");
    std::fs::write(
        &config,
        format!(
            "listen = [\"{TCP}\"]\ndata_dir = {:?}\nlog_format = \"json\"\n",
            file_dir
        ),
    )
    .expect("write config");

    // The file alone: its address (TCP), its data directory, its log format.
    let mut cmd = mana();
    cmd.arg("bootstrap").arg("--config").arg(&config);
    let (addr, log) = bootstrap_start(cmd);
    assert!(addr.starts_with("/ip4/127.0.0.1/tcp/"), "{addr}");
    assert!(is_json(&log), "log_format = \"json\" in the file: {log}");
    assert!(file_dir.join("bootstrap.key").is_file());

    // Variables over the file: QUIC, the variable's directory, text logs.
    let mut cmd = mana();
    cmd.arg("bootstrap")
        .env("MANA_CONFIG", &config)
        .env("MANA_LISTEN", QUIC)
        .env("MANA_DATA_DIR", &env_dir);
    cmd.env("MANA_LOG_FORMAT", "text");
    let (addr, log) = bootstrap_start(cmd);
    assert!(
        addr.starts_with("/ip4/127.0.0.1/udp/") && addr.contains("/quic-v1/p2p/"),
        "{addr}"
    );
    assert!(
        !log.is_empty() && !is_json(&log),
        "MANA_LOG_FORMAT=text beats the file: {log}"
    );
    assert!(env_dir.join("bootstrap.key").is_file());

    // Flags over the variables: TCP again, the flag's directory, JSON logs.
    let mut cmd = mana();
    cmd.arg("bootstrap")
        .env("MANA_CONFIG", &config)
        .env("MANA_LISTEN", QUIC)
        .env("MANA_DATA_DIR", &env_dir);
    cmd.env("MANA_LOG_FORMAT", "text")
        .args(["--listen", TCP, "--log-format", "json", "--data-dir"])
        .arg(&flag_dir);
    let (addr, log) = bootstrap_start(cmd);
    assert!(addr.starts_with("/ip4/127.0.0.1/tcp/"), "{addr}");
    assert!(
        is_json(&log),
        "--log-format json beats MANA_LOG_FORMAT: {log}"
    );
    assert!(flag_dir.join("bootstrap.key").is_file());

    // Without a file, a variable or the flag, logs are text (the default listen address, port 4001 on every
    // interface, is not for a test: the unit tests check it).
    let mut cmd = mana();
    cmd.args(["bootstrap", "--listen", TCP, "--data-dir"])
        .arg(dir.path().join("defaults"));
    let (_, log) = bootstrap_start(cmd);
    assert!(!log.is_empty() && !is_json(&log), "text by default: {log}");
}

fn verify_store(data_dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = mana();
    cmd.args(["node", "--verify-store", "--data-dir"])
        .arg(data_dir)
        .envs(env.iter().copied());
    cmd.output().expect("mana node runs")
}

#[test]
fn boolean_variables_take_the_usual_spellings() {
    let dir = tempfile::tempdir().expect("temp dir");
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off", "ON"] {
        for var in ["MANA_NO_TRAIN", "MANA_DHT_SERVER"] {
            let out = verify_store(&dir.path().join("store"), &[(var, value)]);
            assert!(
                out.status.success(),
                "{var}={value}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = verify_store(&dir.path().join("store"), &[("MANA_NO_TRAIN", "maybe")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("maybe") && err.contains("expected 1, true, yes, on, 0, false, no or off"),
        "{err}"
    );
}

#[test]
fn bad_files_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let refused = |command: &str, text: &str| {
        let path = dir.path().join(format!("{command}.toml"));
        std::fs::write(&path, text).expect("write config");
        let out = mana()
            .arg(command)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("mana runs");
        assert!(!out.status.success(), "{command} accepted {text:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("node", "lisen = []\n");
    assert!(
        err.contains("unknown key `lisen`") && err.contains("listen"),
        "{err}"
    );
    let err = refused("coordinator", "run = \"demo\"\nrounds_ms = 5\n");
    assert!(
        err.contains("unknown key `rounds_ms`") && err.contains("round_ms"),
        "{err}"
    );
    // A bootstrap joins no run: `run` is not one of its keys.
    let err = refused("bootstrap", "run = \"demo\"\n");
    assert!(err.contains("unknown key `run`"), "{err}");
    let err = refused("node", "max_shards = \"many\"\n");
    assert!(err.contains("max_shards"), "{err}");
    let err = refused("bootstrap", "log_format = \"xml\"\n");
    assert!(err.contains("log_format"), "{err}");
    let err = refused("node", &format!("#{}\n", "x".repeat(1 << 20)));
    assert!(err.contains("larger than 1 MiB"), "{err}");
}
