//! Setup mistakes an operator makes, through the built binary: each is refused before any work with one
//! line naming the setting and a non-zero exit, or (for the ones found while running) said plainly in the
//! log. One test per mistake, named after it. Only loopback; every process is killed when its test ends.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// `mana` with none of the caller's `MANA_*` variables, logging at info, no backtraces.
fn mana() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MANA_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

/// Runs `args` to its end (it must end by itself within a minute).
fn refused(args: &[&str], dir: &Path) -> String {
    let mut child = mana()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mana starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`mana {}` did not stop by itself", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        !status.success(),
        "`mana {}` was accepted; stderr:\n{stderr}",
        args.join(" ")
    );
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("error: "),
        "no error line for `mana {}`:\n{stderr}",
        args.join(" ")
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Stack backtrace"),
        "{stderr}"
    );
    assert!(!last.trim_end().ends_with(':'), "a blank reason: {last}");
    last
}

/// The lines of a running process's stderr, as they come.
fn lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing every one of `words`; panics with what came instead.
fn expect_line(rx: &mpsc::Receiver<String>, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {words:?}; saw:\n{}", seen.join("\n"));
}

fn node(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = mana();
    cmd.args(["node", "--run", "setup", "--listen", TCP, "--data-dir"])
        .arg(dir)
        .args(extra);
    cmd
}

#[test]
fn a_port_in_use_is_refused_not_shared() {
    let dir = tempfile::tempdir().expect("temp dir");
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let line = refused(
        &[
            "node",
            "--run",
            "setup",
            "--data-dir",
            "n",
            "--listen",
            &addr,
        ],
        dir.path(),
    );
    assert!(
        line.contains(&addr) && line.contains("already in use"),
        "{line}"
    );
}

#[test]
fn a_busy_quic_port_or_foreign_address_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let held = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = format!(
        "/ip4/127.0.0.1/udp/{}/quic-v1",
        held.local_addr().expect("addr").port()
    );
    let line = refused(
        &[
            "node",
            "--run",
            "setup",
            "--data-dir",
            "n",
            "--listen",
            &addr,
        ],
        dir.path(),
    );
    assert!(line.contains("already in use"), "{line}");
    // TEST-NET-1 (RFC 5737) is on no interface of this machine.
    let line = refused(
        &[
            "bootstrap",
            "--data-dir",
            "b",
            "--listen",
            "/ip4/192.0.2.1/udp/4001/quic-v1",
        ],
        dir.path(),
    );
    assert!(line.contains("not one of this machine's"), "{line}");
}

#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n");
    let _node = Proc(
        node(&data, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("status.json").exists() {
        assert!(Instant::now() < deadline, "no status file");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Plain text names the node's key and its traffic (the operator guide promises both).
    let out = mana()
        .args(["status", "--data-dir"])
        .arg(&data)
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  key ") && text.contains("traffic since start: gossip"),
        "{text}"
    );
    // A reader that is already gone: every write of `mana status` meets a closed pipe.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = mana()
        .args(["status", "--data-dir"])
        .arg(&data)
        .stdout(writer)
        .output()
        .expect("status runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "nothing to say about a closed pipe: {stderr}"
    );
}

#[test]
fn a_second_process_on_the_same_data_dir_is_told_which_pid_holds_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n");
    let mut first = node(&data, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node");
    let pid = first.id();
    let mut line = String::new();
    BufReader::new(first.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("an address");
    let _first = Proc(first);
    let line = refused(
        &["node", "--run", "setup", "--listen", TCP, "--data-dir", "n"],
        dir.path(),
    );
    assert!(line.contains(&format!("in use by pid {pid}")), "{line}");
    let line = refused(&["node", "--verify-store", "--data-dir", "n"], dir.path());
    assert!(line.contains(&format!("in use by pid {pid}")), "{line}");
}

#[test]
fn settings_out_of_range_are_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = |extra: &[&str]| {
        let mut args = vec![
            "coordinator",
            "--run",
            "setup",
            "--listen",
            TCP,
            "--data-dir",
            "c",
        ];
        args.extend_from_slice(extra);
        refused(&args, dir.path())
    };
    assert!(coordinator(&["--inner-steps", "0"]).contains("inner_steps must be between 1"));
    assert!(coordinator(&["--rounds", "0"]).contains("--rounds must be at least 1"));
    let line = refused(
        &[
            "node",
            "--run",
            "setup",
            "--listen",
            TCP,
            "--data-dir",
            "n",
            "--max-shards",
            "0",
        ],
        dir.path(),
    );
    assert!(line.contains("--max-shards must be at least 1"), "{line}");
    // Nothing was started: no store was created for the refused coordinator.
    assert!(!dir.path().join("c/store").exists());
}

#[test]
fn a_corpus_too_small_for_the_run_is_refused_by_coordinator_and_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("tiny.txt"), "hello world\n").expect("write");
    let line = refused(
        &[
            "coordinator",
            "--run",
            "setup",
            "--listen",
            TCP,
            "--data-dir",
            "c",
            "--corpus",
            "tiny.txt",
        ],
        dir.path(),
    );
    assert!(line.contains("corpus tiny.txt is too small"), "{line}");
    let key = "11".repeat(32);
    let line = refused(
        &[
            "node",
            "--run",
            "setup",
            "--listen",
            TCP,
            "--data-dir",
            "n",
            "--coordinator",
            &key,
            "--corpus",
            "tiny.txt",
        ],
        dir.path(),
    );
    assert!(line.contains("corpus tiny.txt is too small"), "{line}");
}

#[test]
fn unwritable_metrics_and_export_paths_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Under a regular file, no path can ever be created.
    std::fs::write(dir.path().join("file"), b"x").expect("write");
    let base = [
        "coordinator",
        "--run",
        "setup",
        "--listen",
        TCP,
        "--data-dir",
        "c",
    ];
    let line = refused(
        &[&base[..], &["--metrics", "file/metrics.jsonl"]].concat(),
        dir.path(),
    );
    assert!(
        line.starts_with("error: --metrics file/metrics.jsonl"),
        "{line}"
    );
    // The model is exported by an evaluator (the coordinator holds none).
    let key = "ab".repeat(32);
    let evaluator = [
        "node",
        "--run",
        "setup",
        "--listen",
        TCP,
        "--data-dir",
        "c",
        "--coordinator",
        &key,
        "--no-train",
        "--evaluate",
    ];
    let line = refused(
        &[&evaluator[..], &["--export", "file/model"]].concat(),
        dir.path(),
    );
    assert!(line.starts_with("error: --export file/model"), "{line}");
    let line = refused(
        &[&evaluator[..evaluator.len() - 1], &["--export", "model"]].concat(),
        dir.path(),
    );
    assert!(
        line.starts_with("error: --export needs --evaluate"),
        "{line}"
    );
    assert!(
        !dir.path().join("c/store").exists(),
        "refused before the node started"
    );
}

#[test]
fn a_wrong_bootstrap_address_says_why_each_dial_failed() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A port nothing listens on (bound, then released), with some peer id.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let peer = "12D3KooWQSakZC9L2b1V5ZqvEfG8tyq6497JsuwaeKF3x9Gzqv8v";
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}");
    let mut child = node(&dir.path().join("n"), &["--bootstrap", &bootstrap])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let rx = lines(child.stderr.take().expect("piped"));
    let _child = Proc(child);
    let line = expect_line(&rx, &["dial failed", peer]);
    assert!(line.to_lowercase().contains("refused"), "{line}");
}

#[test]
fn a_bootstrap_answering_as_another_peer_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut boot = mana()
        .args(["bootstrap", "--listen", TCP, "--data-dir"])
        .arg(dir.path().join("b"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bootstrap");
    let mut addr = String::new();
    BufReader::new(boot.stdout.take().expect("piped"))
        .read_line(&mut addr)
        .expect("address");
    let _boot = Proc(boot);
    let (real, actual_id) = addr.trim().rsplit_once("/p2p/").expect("a /p2p/ address");
    let wrong = format!("{real}/p2p/12D3KooWQSakZC9L2b1V5ZqvEfG8tyq6497JsuwaeKF3x9Gzqv8v");
    let mut child = node(&dir.path().join("n"), &["--bootstrap", &wrong])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let rx = lines(child.stderr.take().expect("piped"));
    let _child = Proc(child);
    expect_line(&rx, &["dial failed", "answers as peer", actual_id]);
}

#[test]
fn a_node_without_coordinator_says_it_will_not_train() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = node(&dir.path().join("n"), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let rx = lines(child.stderr.take().expect("piped"));
    let _child = Proc(child);
    expect_line(&rx, &["no --coordinator", "will not train"]);
}

#[test]
fn redirected_logs_have_no_colour_codes_and_no_bootstrap_warning() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Without RUST_LOG: the default filter, as an operator has it.
    let mut child = mana()
        .env_remove("RUST_LOG")
        .args([
            "bootstrap",
            "--listen",
            TCP,
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--data-dir",
        ])
        .arg(dir.path().join("b"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bootstrap");
    // Both addresses are printed, every time (the QUIC listener may report after the TCP one).
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).expect("an address line");
        addrs.push(line.trim().to_owned());
    }
    assert!(
        addrs.iter().any(|a| a.contains("/tcp/")) && addrs.iter().any(|a| a.contains("/quic-v1/")),
        "{addrs:?}"
    );
    let rx = lines(child.stderr.take().expect("piped"));
    let mut child = Proc(child);
    // An absence needs a window: kad's start-up bootstrap fires within half a second of listening.
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.0.kill();
    let _ = child.0.wait();
    let logged: Vec<String> = rx.iter().collect();
    assert!(!logged.is_empty(), "the bootstrap logged nothing");
    let all = logged.join("\n");
    assert!(
        !all.contains('\u{1b}'),
        "colour codes in a redirected log:\n{all}"
    );
    assert!(!all.contains("Failed to trigger bootstrap"), "{all}");
}

#[test]
fn a_changed_rule_or_seed_on_resume_is_refused_unless_meant() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("c");
    let start = |extra: &[&str]| {
        let mut cmd = mana();
        cmd.args([
            "coordinator",
            "--run",
            "setup",
            "--listen",
            TCP,
            "--data-dir",
        ])
        .arg(&data)
        .args(extra);
        cmd
    };
    // A first run, stopped (SIGTERM) once it reports its coordinator status: its settings are stored by then.
    let mut child = start(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coordinator");
    let log = lines(child.stderr.take().expect("piped"));
    let first = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = std::fs::read_to_string(data.join("status.json")).unwrap_or_default();
        if status.contains("\"inner_steps\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no coordinator status");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = first.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let mut first = first;
    let stopped = first.0.wait().expect("the first coordinator stops");
    assert!(
        stopped.success(),
        "SIGTERM ends a coordinator cleanly: {stopped:?}"
    );
    // Its last words name its role (not "mana::cmd::node"), and its role's lines carry the role's span.
    let said: Vec<String> = log.iter().collect();
    assert!(
        said.iter().any(|l| l.contains("coordinator shutting down")),
        "{said:#?}"
    );
    assert!(
        !said.iter().any(|l| l.contains("mana::cmd::node")),
        "{said:#?}"
    );
    assert!(
        said.iter()
            .any(|l| l.contains(" coordinator: mana_node::roles::conductor")),
        "{said:#?}"
    );

    let args = [
        "coordinator",
        "--run",
        "setup",
        "--listen",
        TCP,
        "--data-dir",
        "c",
        "--rule",
        "diloco",
        "--seed",
        "5",
    ];
    let line = refused(&args, dir.path());
    assert!(
        line.contains("rule was sync, now diloco") && line.contains("seed was 1, now 5"),
        "{line}"
    );
    assert!(line.contains("--accept-changed-settings"), "{line}");
    // Meant: it resumes, saying what changed.
    let mut child = start(&[
        "--rule",
        "diloco",
        "--seed",
        "5",
        "--accept-changed-settings",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("coordinator");
    let rx = lines(child.stderr.take().expect("piped"));
    let _child = Proc(child);
    expect_line(
        &rx,
        &[
            "resuming with changed run settings",
            "rule was sync, now diloco",
        ],
    );
}

#[test]
fn a_missing_key_is_created_only_on_a_first_start_or_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n");
    let started = |extra: &[&str]| {
        let mut child = node(&data, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("an address");
        assert!(line.contains("/p2p/"), "an address: {line}");
        drop(Proc(child));
    };
    // A typo in --key is refused, and creates no key.
    let typo = &[
        "node",
        "--run",
        "setup",
        "--listen",
        TCP,
        "--data-dir",
        "n",
        "--key",
        "n/nod.key",
    ];
    let line = refused(typo, dir.path());
    assert!(
        line.contains("n/nod.key") && line.contains("does not exist") && line.contains("--new-key"),
        "{line}"
    );
    assert!(!dir.path().join("n/nod.key").exists());
    // A first start creates the default key; a restart loads it.
    started(&[]);
    let key = std::fs::read(data.join("node.key")).expect("created on the first start");
    started(&[]);
    assert_eq!(std::fs::read(data.join("node.key")).expect("kept"), key);
    // The key lost beside an existing store is refused, not replaced; --new-key replaces it.
    std::fs::remove_file(data.join("node.key")).expect("remove");
    let line = refused(
        &["node", "--run", "setup", "--listen", TCP, "--data-dir", "n"],
        dir.path(),
    );
    assert!(
        line.contains("node.key") && line.contains("does not exist"),
        "{line}"
    );
    started(&["--new-key"]);
    assert_ne!(
        std::fs::read(data.join("node.key")).expect("a new key"),
        key
    );
}
