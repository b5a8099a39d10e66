//! `mana serve` as a user runs it: the built binary serving a checkpoint that `mana train` just wrote, on a
//! free loopback port, called through a real HTTP client (ureq). Covers completions identical to `mana
//! generate` (greedy and seeded sampling), streamed events that add up to the same text and end with
//! `[DONE]`, stop strings, `/v1/models`, every refusal (400, 404, 405, 413, 503) in OpenAI's error shape,
//! a client leaving (mid-stream or before a plain answer) stopping its generation, Ctrl-C, and the refusal
//! to start with neither a checkpoint nor a network to join. Then from the network: `mana infer` and `mana
//! serve` joining a live `mana demo` and generating with its nodes' experts. Every wait is on a condition (a
//! line printed, a log line, a process ending, a file written).

mod cli_support;

use cli_support::{TINY_CONFIG, mana, ok};

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

/// The server's limit on `max_tokens` (`mana generate`'s).
const MAX_TOKENS_LIMIT: u64 = 1 << 20;

/// The server's limit on a request body.
const MAX_BODY_BYTES: usize = 1 << 20;

/// A failsafe for waits on the server's log, so that a broken server fails the test instead of hanging it.
const LOG_FAILSAFE: Duration = Duration::from_secs(300);

/// Trains the tiny model for 200 steps into `dir/name`.
fn checkpoint(dir: &Path, name: &str) -> PathBuf {
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY_CONFIG).expect("write config");
    let ckpt = dir.join(name);
    ok(mana()
        .args(["train", "--steps", "200", "--seed", "3", "--config"])
        .arg(&config)
        .arg("--save")
        .arg(&ckpt)
        .output()
        .expect("run mana train"));
    ckpt
}

/// A running `mana serve`, killed when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// The server's log lines (stderr), as they come.
    log: mpsc::Receiver<String>,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts `mana serve --listen 127.0.0.1:0 ARGS` and waits for the line that gives its address.
    fn start(args: &[&str]) -> Server {
        let mut child = mana()
            .env("RUST_LOG", "info")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mana serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        let base = loop {
            line.clear();
            let n = stdout.read_line(&mut line).expect("read stdout");
            if n == 0 {
                let status = child.wait().expect("wait");
                let log: Vec<String> = log.try_iter().collect();
                panic!("mana serve ended ({status}) before listening: {log:#?}");
            }
            if let Some(at) = line.find("http://") {
                break line[at..].trim().to_owned();
            }
        };
        Server {
            child,
            base,
            log,
            _stdout: stdout,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits for a log line that contains `needle` and returns it.
    fn wait_for_log(&self, needle: &str) -> String {
        loop {
            match self.log.recv_timeout(LOG_FAILSAFE) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that hands back 4xx and 5xx responses instead of turning them into errors, as a test of
/// refusals needs.
fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` to `/v1/completions` and returns the status and the JSON answer.
fn post(server: &Server, body: &str) -> (u16, Value) {
    let mut response = client()
        .post(server.url("/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body)
        .expect("the request is answered");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("read the body");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

/// A completion's text, after checking the shape of the object around it.
fn completion_text(answer: &Value, finish_reason: &str) -> String {
    assert_eq!(answer["object"], "text_completion", "{answer}");
    assert!(
        answer["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-")),
        "{answer}"
    );
    assert!(answer["created"].as_u64().is_some(), "{answer}");
    let choices = answer["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert!(choices[0]["logprobs"].is_null());
    assert_eq!(choices[0]["finish_reason"], finish_reason, "{answer}");
    choices[0]["text"].as_str().expect("text").to_owned()
}

/// Opens a streamed completion and returns its event reader, after checking the response's head.
fn open_stream(server: &Server, request: &Value) -> BufReader<impl Read> {
    let response = client()
        .post(server.url("/v1/completions"))
        .header("Content-Type", "application/json")
        .send(request.to_string())
        .expect("the request is answered");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "text/event-stream");
    BufReader::new(response.into_body().into_reader())
}

/// The next `data:` payload of an event stream (None at its end).
fn next_event(events: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if events.read_line(&mut line).expect("read the stream") == 0 {
            return None;
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return Some(data.to_owned());
        }
        assert!(line.trim().is_empty(), "not an SSE line: {line:?}");
    }
}

/// Reads a whole stream: the text of its chunks, its finish reason, and whether `[DONE]` ended it.
fn read_stream(mut events: impl BufRead) -> (Vec<String>, String) {
    let mut pieces = Vec::new();
    let mut finish = None;
    while let Some(data) = next_event(&mut events) {
        if data == "[DONE]" {
            assert!(next_event(&mut events).is_none(), "events after [DONE]");
            let finish = finish.expect("a chunk gave the finish reason");
            return (pieces, finish);
        }
        assert!(finish.is_none(), "a chunk after the finish reason");
        let chunk: Value = serde_json::from_str(&data).expect("each event is JSON");
        let choice = &chunk["choices"][0];
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        pieces.push(choice["text"].as_str().expect("text").to_owned());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    panic!("the stream ended without [DONE]");
}

/// What `mana generate --json` makes of `prompt`, less the prompt.
fn generated(ckpt: &Path, prompt: &str, max_tokens: usize, sampling: &[&str]) -> String {
    let out = ok(mana()
        .args(["generate", "--json", "--prompt", prompt, "--max-tokens"])
        .arg(max_tokens.to_string())
        .args(sampling)
        .arg("--checkpoint")
        .arg(ckpt)
        .output()
        .expect("run mana generate"));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let text = report["text"].as_str().expect("text");
    text.strip_prefix(prompt)
        .expect("the text starts with the prompt")
        .to_owned()
}

#[test]
fn completions_match_mana_generate_streamed_or_not_and_stop_strings_end_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = checkpoint(dir.path(), "tiny-200");
    let server = Server::start(&["--checkpoint", ckpt.to_str().expect("UTF-8 path")]);

    // The model's id is the checkpoint directory's name.
    let mut response = client()
        .get(server.url("/v1/models"))
        .call()
        .expect("models");
    assert_eq!(response.status().as_u16(), 200);
    let models: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON");
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], "tiny-200");
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "mana");
    assert!(data[0]["created"].as_u64().is_some());

    // Greedy: exactly `mana generate --temperature 0`'s text.
    let prompt = "add 1+2";
    let expected = generated(&ckpt, prompt, 60, &["--temperature", "0"]);
    assert_eq!(expected.len(), 60, "an ASCII completion: {expected:?}");
    let request =
        json!({"model": "tiny-200", "prompt": prompt, "max_tokens": 60, "temperature": 0});
    let (status, answer) = post(&server, &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(completion_text(&answer, "length"), expected);
    assert_eq!(answer["model"], "tiny-200");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 60, "total_tokens": 67})
    );

    // The prompt may be an array of one string, and the model may be left out.
    let (status, answer) = post(
        &server,
        &json!({"prompt": [prompt], "max_tokens": 60, "temperature": 0}).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(completion_text(&answer, "length"), expected);

    // A prompt with multi-byte characters: tokens are bytes.
    let accented = "caf\u{e9} \u{2713}";
    let (status, answer) = post(
        &server,
        &json!({"prompt": accented, "max_tokens": 12, "temperature": 0}).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        completion_text(&answer, "length"),
        generated(&ckpt, accented, 12, &["--temperature", "0"])
    );
    assert_eq!(answer["usage"]["prompt_tokens"], 9);

    // Streamed: one event per token here (ASCII), adding up to the same text, then [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (pieces, finish) = read_stream(open_stream(&server, &streamed));
    assert_eq!(finish, "length");
    assert_eq!(pieces.concat(), expected);
    assert!(pieces.len() >= 60, "{} events", pieces.len());

    // Sampling with a seed: `mana generate`'s draw too.
    let sampled = generated(
        &ckpt,
        prompt,
        40,
        &["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"],
    );
    let request =
        json!({"prompt": prompt, "max_tokens": 40, "temperature": 0.8, "top_p": 0.9, "seed": 5});
    let (status, answer) = post(&server, &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(completion_text(&answer, "length"), sampled);

    // A stop string taken from the middle of the greedy text: the answer ends just before its first
    // occurrence, streamed or not.
    let stop: String = expected.chars().skip(20).take(2).collect();
    let cut = expected.find(&stop).expect("the stop string occurs");
    let before = &expected[..cut];
    let request =
        json!({"prompt": prompt, "max_tokens": 60, "temperature": 0, "stop": ["\u{e9}", stop]});
    let (status, answer) = post(&server, &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(completion_text(&answer, "stop"), before);
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (pieces, finish) = read_stream(open_stream(&server, &streamed));
    assert_eq!(finish, "stop");
    assert_eq!(pieces.concat(), before);

    // Ctrl-C stops the server cleanly.
    let mut server = server;
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(i32::try_from(server.child.id()).expect("a pid fits i32"));
        kill(pid, Signal::SIGINT).expect("send SIGINT");
        let status = server.child.wait().expect("wait for mana serve");
        assert!(status.success(), "{status}");
    }
}

/// Sends `method path` with `body` and checks the OpenAI-shaped error that comes back.
fn refused(server: &Server, method: &str, path: &str, body: Option<Vec<u8>>, status: u16) -> Value {
    let agent = client();
    let url = server.url(path);
    let mut response = match (method, body) {
        ("GET", None) => agent.get(&url).call(),
        ("DELETE", None) => agent.delete(&url).call(),
        ("POST", Some(body)) => agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(&body[..]),
        ("POST", None) => agent.post(&url).send_empty(),
        other => panic!("no such case {other:?}"),
    }
    .expect("the request is answered");
    assert_eq!(response.status().as_u16(), status, "{method} {path}");
    let text = response.body_mut().read_to_string().expect("read the body");
    let answer: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let error = &answer["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
    assert!(error["type"].is_string(), "{answer}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{answer}"
    );
    answer
}

#[test]
fn bad_requests_get_clear_json_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = checkpoint(dir.path(), "ckpt");
    let server = Server::start(&[
        "--checkpoint",
        ckpt.to_str().expect("UTF-8 path"),
        "--model-name",
        "mana-tiny",
    ]);
    let post = |body: &[u8], status: u16| {
        refused(
            &server,
            "POST",
            "/v1/completions",
            Some(body.to_vec()),
            status,
        )
    };

    let e = post(b"{\"prompt\": \"abc\"", 400);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .expect("message")
            .contains("JSON"),
        "{e}"
    );
    let e = post(br#"{"max_tokens": 4}"#, 400);
    assert_eq!(e["error"]["param"], "prompt");
    let e = post(
        json!({"prompt": "a", "max_tokens": MAX_TOKENS_LIMIT + 1})
            .to_string()
            .as_bytes(),
        400,
    );
    assert_eq!(e["error"]["param"], "max_tokens");
    let e = post(br#"{"prompt": "a", "temperature": -1}"#, 400);
    assert_eq!(e["error"]["param"], "temperature");
    let e = post(
        br#"{"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}"#,
        400,
    );
    assert_eq!(e["error"]["param"], "stop");
    let e = post(b"\xff\xfe", 400);
    assert_eq!(e["error"]["param"], Value::Null);
    refused(&server, "POST", "/v1/completions", None, 400);

    // The model must be the one served; routes must exist; methods must fit.
    let e = post(br#"{"model": "gpt-4", "prompt": "a"}"#, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    refused(&server, "GET", "/v1/chat/completions", None, 404);
    refused(&server, "GET", "/v1/models/gpt-4", None, 404);
    refused(&server, "GET", "/", None, 404);
    refused(&server, "GET", "/v1/completions", None, 405);
    refused(&server, "DELETE", "/v1/models", None, 405);

    // A body one byte over the limit is refused while it is read.
    let mut big = br#"{"prompt": "a", "padding": ""#.to_vec();
    big.resize(MAX_BODY_BYTES - 2, b' ');
    big.extend_from_slice(b"\"}");
    assert_eq!(big.len(), MAX_BODY_BYTES);
    let (status, _) = {
        let mut response = client()
            .post(server.url("/v1/completions"))
            .send(&big[..])
            .expect("answered");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string())
    };
    assert_eq!(status, 200, "a body of exactly the limit is accepted");
    big.push(b' ');
    let e = post(&big, 413);
    assert_eq!(e["error"]["code"], "request_too_large");

    // Bytes that are not HTTP get hyper's 400 (and the connection closed), nothing worse.
    let mut raw =
        std::net::TcpStream::connect(server.base.trim_start_matches("http://")).expect("connect");
    raw.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    // Still serving, and the model is named as asked.
    let mut response = client()
        .get(server.url("/v1/models/mana-tiny"))
        .call()
        .expect("model");
    assert_eq!(response.status().as_u16(), 200);
    let model: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON");
    assert_eq!(model["id"], "mana-tiny");
}

#[test]
fn a_full_queue_answers_busy_and_a_client_leaving_stops_its_generation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = checkpoint(dir.path(), "ckpt");
    let server = Server::start(&[
        "--checkpoint",
        ckpt.to_str().expect("UTF-8 path"),
        "--queue",
        "0",
    ]);
    // A stream far longer than the test: it holds the only slot until its client leaves (once the
    // client stops reading, the generation waits for it).
    let long = json!({"prompt": "kv k1=", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "stream": true});
    let mut events = open_stream(&server, &long);
    let first = next_event(&mut events).expect("a first event");
    assert!(first.starts_with('{'), "{first}");

    let e = refused(
        &server,
        "POST",
        "/v1/completions",
        Some(br#"{"prompt": "a", "max_tokens": 1}"#.to_vec()),
        503,
    );
    assert_eq!(e["error"]["code"], "server_busy");

    // The client leaves: the generation stops well short of its million tokens and frees the slot.
    drop(events);
    let line = server.wait_for_log("streamed completion");
    let tokens: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tokens="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {line:?}"));
    assert!(
        tokens < MAX_TOKENS_LIMIT,
        "{tokens} tokens: the generation ran to the end"
    );
    assert!(line.contains("client_left=true"), "{line}");
    let (status, answer) = post(
        &server,
        r#"{"prompt": "a", "max_tokens": 3, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
}

#[test]
fn without_a_checkpoint_or_a_network_to_join_it_says_what_it_needs() {
    let out = mana().args(["serve"]).output().expect("run mana serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--checkpoint")
            && stderr.contains("--bootstrap")
            && stderr.contains("--coordinator"),
        "{stderr}"
    );
}

/// A `mana demo` running in the background (its bootstrap, coordinator, evaluator and 3 training nodes, all
/// real processes), killed when dropped (its children get SIGTERM when it dies).
struct DemoNetwork {
    child: Child,
}

impl Drop for DemoNetwork {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DemoNetwork {
    /// Starts a long demo in `dir` and waits until its coordinator has committed a round; returns it with a
    /// node's address to join through and the coordinator's key.
    fn start(dir: &Path) -> (DemoNetwork, String, String) {
        let out = dir.join("out");
        let child = mana()
            .args(["demo", "--nodes", "3", "--rounds", "1000", "--out"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mana demo starts");
        let status = |name: &str| -> Option<Value> {
            let text = std::fs::read_to_string(out.join(name).join("status.json")).ok()?;
            serde_json::from_str(&text).ok()
        };
        let mut demo = DemoNetwork { child };
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let committed = std::fs::read_to_string(out.join("coordinator/metrics.jsonl"))
                .is_ok_and(|m| m.lines().next().is_some());
            let key =
                status("coordinator").and_then(|s| s["public_key"].as_str().map(str::to_owned));
            let addr = status("node-1")
                .and_then(|s| s["listen_addrs"].get(0)?.as_str().map(str::to_owned));
            if let (true, Some(key), Some(addr)) = (committed, key, addr) {
                return (demo, addr, key);
            }
            assert!(
                demo.child.try_wait().expect("try_wait").is_none(),
                "the demo ended early"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the demo committed no round in time"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// From the network, as a user runs them against a live run (here a demo's real processes): `mana infer`
/// generates with the experts the nodes host, every call checked against a second replica without a
/// disagreement, and `mana serve` without a checkpoint streams a completion from the same network and
/// refuses a bad request with a JSON error. (That network output equals the whole checkpoint's, bit for bit,
/// is `tests/net_infer.rs`'s.)
#[test]
fn from_a_live_network_mana_infer_generates_and_mana_serve_streams() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_demo, addr, key) = DemoNetwork::start(dir.path());
    let network = [
        "--bootstrap",
        addr.as_str(),
        "--run",
        "demo",
        "--coordinator",
        key.as_str(),
    ];

    let prompt = "In the beginning";
    let out = ok(mana()
        .args(["infer", "--json", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(network)
        .args([
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--check-share",
            "1",
        ])
        .args(["--speculative", "--cache-experts", "2"])
        .output()
        .expect("run mana infer"));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert!(report["round"].as_u64().is_some_and(|r| r >= 1), "{report}");
    assert_eq!(report["tokens"], 12, "{report}");
    assert!(
        report["text"]
            .as_str()
            .is_some_and(|t| t.starts_with(prompt)),
        "{report}"
    );
    assert!(
        report["expert_calls"].as_u64().is_some_and(|n| n > 0),
        "no expert was asked of a node: {report}"
    );
    assert!(
        report["checked"].as_u64().is_some_and(|n| n > 0),
        "no answer was checked against a second replica: {report}"
    );
    assert_eq!(report["disagreements"], 0, "{report}");
    assert_eq!(report["banned_hosts"], 0, "{report}");

    let server = Server::start(&network);
    let models: Value = serde_json::from_str(
        &client()
            .get(server.url("/v1/models"))
            .call()
            .expect("models")
            .body_mut()
            .read_to_string()
            .expect("read the body"),
    )
    .expect("JSON");
    assert_eq!(models["object"], "list", "{models}");
    let request = json!({"prompt": prompt, "max_tokens": 8, "stream": true});
    let (pieces, finish) = read_stream(open_stream(&server, &request));
    assert_eq!(finish, "length");
    assert!(!pieces.concat().is_empty(), "no text streamed");
    let (status, answer) = post(&server, r#"{"prompt": "x", "max_tokens": -1}"#);
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
}
