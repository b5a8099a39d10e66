//! The real binaries: `mana bootstrap` prints its address; two `mana node` processes join through it and
//! see each other; `mana status --json` reads a running node's status file; the bootstrap keeps its
//! identity across a restart. Processes are killed when the test ends, even on failure.

mod net_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mana() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mana"));
    cmd.env("RUST_LOG", "warn").env_remove("MANA_CONFIG");
    cmd
}

/// Starts `mana bootstrap` and returns it with the first address it prints.
fn start_bootstrap(data_dir: &Path) -> (Proc, String) {
    let mut child = mana()
        .args([
            "bootstrap",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mana bootstrap starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("bootstrap prints its address");
    let addr = line.trim().to_owned();
    assert!(
        addr.contains("/p2p/12D3KooW"),
        "unexpected address line {addr:?}"
    );
    (Proc(child), addr)
}

fn status_json(data_dir: &Path) -> Option<serde_json::Value> {
    let out = mana()
        .args(["status", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn binaries_join_through_bootstrap_and_report_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (boot, boot_addr) = start_bootstrap(&dir.path().join("boot"));
    let boot_id = boot_addr.rsplit('/').next().expect("peer id").to_owned();

    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let child = mana()
            .args([
                "node",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--bootstrap",
                &boot_addr,
                "--data-dir",
            ])
            .arg(dir.path().join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mana node starts");
        nodes.push(Proc(child));
    }

    // Each node's status shows the bootstrap and the other node as peers.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut ids = Vec::new();
    for name in ["n1", "n2"] {
        loop {
            if let Some(s) = status_json(&dir.path().join(name)) {
                let peers: Vec<String> = s["peers"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p["peer_id"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                if peers.len() >= 2 && peers.contains(&boot_id) && s["stale"] == false {
                    ids.push(s["peer_id"].as_str().expect("peer id").to_owned());
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not join in time"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_ne!(ids[0], ids[1]);

    // The bootstrap keeps its identity across a restart.
    drop(boot);
    let (_boot, again) = start_bootstrap(&dir.path().join("boot"));
    assert_eq!(again.rsplit('/').next(), Some(boot_id.as_str()));
    drop(nodes);
}
