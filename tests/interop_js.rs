//! Interoperability with js-libp2p: a js-libp2p 3.x peer (`tests/interop/js/peer.mjs`, pinned versions in its
//! package-lock.json) dials a mana bootstrap and a mana node over TCP with noise and yamux, runs identify
//! (and sees agent `mana/<version>`) and ping, subscribes to the run's public topics over gossipsub
//! `/meshsub/1.1.0` only, receives a heartbeat gossiped by the node (its bytes are a mana envelope signed by
//! the node), and publishes a message that the node receives, judges and rejects as a bad envelope.
//!
//! Needs Node.js (20 or later) with npm. When the pinned js-libp2p packages are missing, the test installs them
//! itself from the lockfile (`npm ci --prefix tests/interop/js`, the npm registry only), so the one test command
//! works on a fresh machine. Without Node.js, or when the install fails, the test fails with a message saying
//! so: it never passes without having talked to js-libp2p.

mod net_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mana_node::net::agent_version;
use mana_protocol::{Message, TopicKind, decode_envelope, topic};
use net_support::*;
use serde_json::Value;

/// The js peer's own deadline, and (with a margin) how long the test waits for it.
const JS_TIMEOUT: Duration = Duration::from_secs(60);

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/js")
}

/// Installs the pinned js-libp2p packages from the lockfile when they are missing; fails with instructions
/// unless node and those packages are then present.
fn require_js_setup() {
    let modules = js_dir().join("node_modules/libp2p");
    if !modules.is_dir() {
        let status = std::process::Command::new("npm")
            .args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(js_dir())
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "installing js-libp2p from tests/interop/js/package-lock.json failed ({status:?}): is npm installed? \
             Try `npm ci --prefix tests/interop/js` by hand"
        );
    }
    assert!(
        modules.is_dir(),
        "js-libp2p is not installed ({} is missing): run `npm ci --prefix tests/interop/js`",
        modules.display()
    );
    let version = std::process::Command::new("node").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "Node.js (`node`, version 20 or later) is needed to run the js-libp2p interop peer: {version:?}"
    );
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("js report lacks the string {}: {value}", path.join(".")))
}

fn strings_at(value: &Value, path: &[&str]) -> Vec<String> {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    let list = v
        .as_array()
        .unwrap_or_else(|| panic!("js report lacks the list {}: {value}", path.join(".")));
    list.iter()
        .map(|s| s.as_str().expect("a list of strings").to_owned())
        .collect()
}

fn from_hex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "odd-length hex");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digits"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_libp2p_peer_identifies_subscribes_and_exchanges_gossip() {
    require_js_setup();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let node = start_node(node_config(&dir.path().join("node"), &boot)).await;
    let node_id = node.peer_id().to_string();
    let run = mana_node::net::NetConfig::for_tests().run_id;
    let topics: Vec<String> = TopicKind::ALL.iter().map(|k| topic(&run, *k)).collect();
    let heartbeats = topic(&run, TopicKind::Heartbeats);

    let node_addr = node.listen_addrs().await.expect("node addrs")[0].to_string();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(js_dir().join("peer.mjs"))
        .args(["--bootstrap", &boot[0].to_string(), "--node", &node_addr])
        .args([
            "--listen-topic",
            &heartbeats,
            "--publish",
            "hello from js-libp2p",
        ])
        .args(["--timeout-ms", &JS_TIMEOUT.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for t in &topics {
        command.args(["--topic", t]);
    }
    let child = command.spawn().expect("node starts");
    let output = tokio::time::timeout(
        JS_TIMEOUT + Duration::from_secs(30),
        child.wait_with_output(),
    )
    .await
    .expect("the js peer finishes")
    .expect("the js peer's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!("js peer printed no JSON report ({e}); stdout: {stdout}; stderr: {stderr}")
        });
    assert!(
        output.status.success() && report.get("error").is_none(),
        "js peer failed: {report}; stderr: {stderr}"
    );
    println!("js-libp2p report: {report}");

    // Identify from both, over noise and yamux, with mana's agent and protocol version.
    for role in ["bootstrap", "node"] {
        assert_eq!(
            str_at(&report, &[role, "agent"]),
            agent_version(),
            "{role} agent"
        );
        assert_eq!(str_at(&report, &[role, "protocol_version"]), "/mana/1.0.0");
        assert_eq!(str_at(&report, &[role, "encryption"]), "/noise");
        assert_eq!(str_at(&report, &[role, "multiplexer"]), "/yamux/1.0.0");
        let protocols = strings_at(&report, &[role, "protocols"]);
        for p in [
            "/ipfs/id/1.0.0",
            "/ipfs/ping/1.0.0",
            "/meshsub/1.1.0",
            "/mana/kad/1.0.0",
        ] {
            assert!(
                protocols.iter().any(|x| x == p),
                "{role} does not announce {p}: {protocols:?}"
            );
        }
    }
    assert_eq!(
        str_at(&report, &["bootstrap", "peer_id"]),
        bootstrap.client().local_peer_id().to_string()
    );
    assert_eq!(str_at(&report, &["node", "peer_id"]), node_id);

    // The js peer saw the node subscribed to every public topic, over gossipsub v1.1.
    let mut subscribed = strings_at(&report, &["node", "subscribed_topics"]);
    subscribed.sort();
    let mut expected = topics.clone();
    expected.sort();
    assert_eq!(subscribed, expected);
    let streams = strings_at(&report, &["node", "gossip_streams"]);
    assert!(
        !streams.is_empty() && streams.iter().all(|p| p == "/meshsub/1.1.0"),
        "gossip streams: {streams:?}"
    );

    // The gossiped message it received is a heartbeat envelope signed by the node.
    assert_eq!(str_at(&report, &["message", "from"]), node_id);
    let bytes = from_hex(str_at(&report, &["message", "data_hex"]));
    let envelope = decode_envelope(&bytes).expect("the js peer received a mana envelope");
    assert_eq!(envelope.signer, node.public_key(), "signed by the node");
    let message = envelope.verify().expect("its signature holds");
    assert!(
        matches!(message, Message::Heartbeat(ref h) if h.run == run),
        "a heartbeat of the run: {message:?}"
    );

    // The node received the js peer's message, judged it and rejected it (it is no envelope), blaming the js
    // peer: gossip flows both ways.
    assert!(strings_at(&report, &["published", "recipients"]).contains(&node_id));
    let js_id = str_at(&report, &["local_peer_id"]).to_owned();
    wait_for(
        Duration::from_secs(30),
        "the node to reject the js peer's message",
        || async {
            let status = node.status().await.ok()?;
            let from_js = status.rejections.by_peer.iter().find(|p| p.peer == js_id)?;
            from_js
                .reasons
                .iter()
                .any(|r| r.reason == "bad-envelope")
                .then_some(())
        },
    )
    .await;

    node.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}
