//! `mana demo` end to end, with the real binary: a bootstrap, a coordinator and nodes as separate processes
//! on loopback train a few rounds; the outputs exist and make sense (metrics lines parse and the loss falls,
//! the SVG has its lines, every holder of each shard agrees, the sample is text); and no process the demo
//! started is left behind, neither after a normal end nor after Ctrl-C or a SIGKILL of the demo. Under
//! `--chaos` (children killed and restarted while training) every round is still committed once and the
//! holders agree.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nodes and rounds of the test network: small, so that it runs quickly on two busy cores.
const NODES: &str = "2";
const ROUNDS: u64 = 3;

fn mana() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana"));
    cmd.env("RUST_LOG", "info")
        .env_remove("MANA_CORPUS")
        .env_remove("MANA_SEED");
    cmd
}

/// Process ids of the running processes whose command line mentions `needle` (the test's temporary
/// directory, which every child of the demo has in its --data-dir).
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Kills the demo if the test fails before it ends (its own guard then stops the children... unless it is
/// killed, which is why the assertions below look for leftovers).
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_trains_and_writes_its_outputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let output = mana()
        .args([
            "demo",
            "--nodes",
            NODES,
            "--rounds",
            &ROUNDS.to_string(),
            "--sample-tokens",
            "24",
            "--out",
        ])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("mana demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "mana demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        processes_mentioning(dir.path()).is_empty(),
        "left behind: {:?}",
        processes_mentioning(dir.path())
    );

    // metrics.jsonl: one line per round, in order, finite losses, and the loss falls.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("each metrics line is JSON"))
        .collect();
    assert_eq!(lines.len() as u64, ROUNDS, "{metrics}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["round"].as_u64(), Some(i as u64 + 1), "{line}");
        for key in ["train_loss", "val_loss"] {
            let v = line[key].as_f64().expect("a loss");
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        assert!(
            line["accepted"].as_u64().expect("accepted count") > 0,
            "{line}"
        );
        assert!(
            line["payload_bytes"].as_u64().expect("payload bytes") > 0,
            "{line}"
        );
        assert_eq!(
            line["nodes"]
                .as_array()
                .expect("per-node entries")
                .len()
                .to_string(),
            NODES
        );
    }
    let val = |l: &serde_json::Value| l["val_loss"].as_f64().expect("val loss");
    let (first, last) = (&lines[0], &lines[lines.len() - 1]);
    assert!(
        val(last) < val(first),
        "validation loss did not fall: {} -> {}",
        val(first),
        val(last)
    );

    // loss.svg: an SVG document with the two lines.
    let svg = std::fs::read_to_string(out.join("loss.svg")).expect("loss.svg");
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"")
            && svg.trim_end().ends_with("</svg>")
    );
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
    assert_eq!(svg.matches('<').count(), svg.matches('>').count());

    // manifests.txt: every process at the last round, every shard identical across its holders.
    let manifests = std::fs::read_to_string(out.join("manifests.txt")).expect("manifests.txt");
    assert!(manifests.contains("verdict: AGREE"), "{manifests}");
    assert!(!manifests.contains("MISMATCH"), "{manifests}");
    assert!(
        manifests.contains("evaluator")
            && manifests.contains("node-2")
            && manifests.contains("trunk")
    );

    // sample.txt: each default prompt, continued.
    let sample = std::fs::read_to_string(out.join("sample.txt")).expect("sample.txt");
    let continuation = sample
        .split("--- prompt \"the small fox \"\n")
        .nth(1)
        .expect("the English prompt's block");
    assert!(
        continuation.starts_with("the small fox ")
            && continuation.lines().next().expect("a line").len() > 14,
        "{sample}"
    );

    // The summary, and the logs of every process.
    assert!(
        stdout.contains("manifests AGREE") && stdout.contains("rounds    3 committed"),
        "{stdout}"
    );
    // The exact answers per kind of line, the network's model beside one node's trained on as many tokens.
    let answers = stdout
        .lines()
        .find(|l| l.starts_with("answers   exact"))
        .unwrap_or_else(|| panic!("no answers line in {stdout}"));
    for kind in ["arithmetic", "recall", "sorting", "reversal", "counting"] {
        assert!(answers.contains(&format!("{kind} ")), "{answers}");
    }
    assert!(
        stdout.contains("one node, full model, 150 steps on the same"),
        "{stdout}"
    );
    for name in ["bootstrap", "coordinator", "node-1", "node-2"] {
        assert!(
            out.join("logs").join(format!("{name}.log")).exists(),
            "no log for {name}"
        );
    }
}

/// Starts a long demo in `dir` and waits until its whole network runs; returns it and its pid.
fn start_long_demo(dir: &Path) -> (Demo, u32) {
    let out = dir.join("out");
    let child = mana()
        .args(["demo", "--nodes", NODES, "--rounds", "1000", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mana demo starts");
    let mut demo = Demo(child);
    let pid = demo.0.id();

    // Wait until the whole network runs: bootstrap, coordinator, evaluator and the nodes (besides the demo
    // itself).
    let want = 3 + NODES.parse::<usize>().expect("a number");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let children = processes_mentioning(dir)
            .into_iter()
            .filter(|(p, _)| *p != pid)
            .count();
        if children >= want && out.join("node-2").join("status.json").exists() {
            break;
        }
        assert!(
            demo.0.try_wait().expect("try_wait").is_none(),
            "the demo ended early"
        );
        assert!(
            Instant::now() < deadline,
            "the network did not start in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (demo, pid)
}

#[test]
fn ctrl_c_stops_every_process_the_demo_started() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut demo, pid) = start_long_demo(dir.path());
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(demo.0.stderr.as_mut().expect("piped stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success(), "an interrupted demo reports failure");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        processes_mentioning(dir.path()).is_empty(),
        "left behind: {:?}",
        processes_mentioning(dir.path())
    );
}

/// A SIGKILL of the demo runs none of its cleanup; the kernel stops its children all the same (they asked to
/// be sent SIGTERM when it dies) and they exit cleanly.
#[cfg(target_os = "linux")]
#[test]
fn sigkill_of_the_demo_leaves_no_process_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut demo, pid) = start_long_demo(dir.path());
    let sent = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    demo.0.wait().expect("the demo is reaped");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = processes_mentioning(dir.path());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `mana demo --chaos <mode>` for `rounds` rounds; returns the summary (stdout) once it succeeded and
/// left nothing behind, after checking that every round was committed once, in order, and that the holders
/// agree.
fn chaos_demo(mode: &str, rounds: u64) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let output = mana()
        .args(["demo", "--nodes", "3", "--rounds", &rounds.to_string()])
        .args(["--sample-tokens", "8", "--chaos", mode, "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("mana demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "mana demo --chaos {mode} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        processes_mentioning(dir.path()).is_empty(),
        "left behind: {:?}",
        processes_mentioning(dir.path())
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let committed: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["round"]
                .as_u64()
                .expect("round")
        })
        .collect();
    assert_eq!(
        committed,
        (1..=rounds).collect::<Vec<_>>(),
        "every round committed once, in order"
    );
    assert!(stdout.contains("manifests AGREE"), "{stdout}");
    assert!(
        stdout.contains("chaos: killed"),
        "the live line says what it did"
    );
    stdout
}

/// The number of kills the summary reports.
fn kills(summary: &str) -> usize {
    summary
        .split("kills with SIGKILL")
        .next()
        .and_then(|head| head.rsplit(' ').nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chaos line in {summary}"))
}

/// `--chaos`: training nodes are killed and restarted while training, and training goes on.
#[test]
fn chaos_kills_and_restarts_children_and_training_goes_on() {
    let summary = chaos_demo("all", 10);
    assert!(kills(&summary) >= 1, "{summary}");
    assert!(summary.contains("training went on"), "{summary}");
}

/// The coordinator killed with SIGKILL again and again, at any point of its round (the short version of the
/// kill loop; the long one is in the operator guide): every restart resumes, every round is committed once,
/// and the holders end bit-identical.
#[test]
fn coordinator_kill_loop_resumes_every_time() {
    let summary = chaos_demo("coordinator", 12);
    assert!(kills(&summary) >= 3, "{summary}");
    assert!(summary.contains("coordinator x"), "{summary}");
}

/// Lines of the demo's `metrics.jsonl` so far (one per committed round).
fn committed_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The last round the coordinator committed, from its status file (its metrics line comes a moment later,
/// once an evaluator measured the round).
fn committed_round(out: &Path) -> usize {
    std::fs::read_to_string(out.join("coordinator").join("status.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|status| status["coordinator"]["committed_round"].as_u64())
        .unwrap_or(0) as usize
}

/// Waits (polling) until the coordinator has committed `rounds` rounds.
fn wait_rounds(demo: &mut Demo, out: &Path, rounds: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while committed_round(out) < rounds {
        assert!(
            demo.0.try_wait().expect("try_wait").is_none(),
            "the demo ended early"
        );
        assert!(
            Instant::now() < deadline,
            "round {rounds} not committed in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node that sleeps (SIGSTOP) through two rounds rejoins within two rounds of waking (SIGCONT): it applies
/// a round trained after it woke, and ends holding the final round like every other process; no process
/// scores a peer below zero for it. The run goes
/// on without it meanwhile (`--min-members 2` of 3: with every node required, the coordinator waits for it).
#[test]
fn a_node_asleep_for_two_rounds_rejoins_within_two() {
    const ROUNDS: usize = 12;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let child = mana()
        .args(["demo", "--nodes", "3", "--min-members", "2"])
        .args([
            "--rounds",
            &ROUNDS.to_string(),
            "--sample-tokens",
            "8",
            "--out",
        ])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mana demo starts");
    let mut demo = Demo(child);
    wait_rounds(&mut demo, &out, 3);
    let sleeper = processes_mentioning(&out.join("node-2"))
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" node "))
        .expect("node-2 runs")
        .0;
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([name, &sleeper.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    };
    signal("-STOP");
    let asleep_at = committed_round(&out);
    wait_rounds(&mut demo, &out, asleep_at + 2);
    signal("-CONT");
    let woke_at = committed_round(&out);

    // Once it is back (two rounds on), no process scores an honest peer below zero: the sleeper missed
    // messages, nobody sent it anything invalid, and it forwarded nothing that was.
    wait_rounds(&mut demo, &out, woke_at + 2);
    for name in ["coordinator", "node-1", "node-2", "node-3"] {
        let path = out.join(name).join("status.json");
        let status: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("status.json"))
                .expect("status.json parses");
        let peers = status["peers"].as_array().expect("peers");
        assert!(!peers.is_empty(), "{name} has no peer");
        for peer in peers {
            let score = peer["gossip_score"].as_f64().unwrap_or(0.0);
            assert!(
                score >= 0.0,
                "{name} scores {} at {score} after node-2 slept",
                peer["peer_id"]
            );
        }
    }

    let status = demo.0.wait().expect("the demo ends");
    let mut stderr = String::new();
    std::io::Read::read_to_string(demo.0.stderr.as_mut().expect("piped stderr"), &mut stderr)
        .expect("stderr");
    assert!(status.success(), "the demo failed: {stderr}");
    let lines = committed_lines(&out);
    assert_eq!(lines.len(), ROUNDS);
    let applied = |line: &serde_json::Value| {
        line["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == "node-2")
            .and_then(|n| n["applied_round"].as_u64())
    };
    // Within two rounds of waking (plus one for the status file's 2 s lag), it applied a round after the one
    // committed when it woke.
    let check = (woke_at + 3).min(ROUNDS);
    assert!(
        applied(&lines[check - 1]).is_some_and(|r| r > woke_at as u64),
        "node-2 woke after round {woke_at}; at round {check} it had applied {:?}",
        applied(&lines[check - 1])
    );
    let manifests = std::fs::read_to_string(out.join("manifests.txt")).expect("manifests.txt");
    assert!(manifests.contains("AGREE"), "{manifests}");
}
