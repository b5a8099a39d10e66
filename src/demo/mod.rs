//! `mana demo`: a whole training network on this machine, on loopback: a bootstrap node, a coordinator and
//! N training nodes, each a separate `mana` process (this same executable) with its own data directory and
//! log under the output directory. The demo follows the coordinator's per-round metrics and shows them live,
//! and at the end writes `metrics.jsonl`, `loss.svg`, `manifests.txt` (does every holder of each shard hold
//! the same bytes?), `sample.txt` (text from the final model) and `summary.txt`.
//!
//! The children are started in order, each once the previous one has printed what the next needs: the
//! bootstrap its address, the coordinator its address and public key, each node its listen address.
//! Every child is stopped when the demo ends, however it ends: normally, on an error, on Ctrl-C / SIGTERM /
//! SIGHUP, or on a panic ([`supervise::Supervisor`]'s `Drop`).
//!
//! - [`supervise`]: the child processes; [`metrics`]: the coordinator's round lines; [`status`]: the
//!   children's status files; [`progress`]: the live display; [`plot`]: the SVG loss plot;
//!   [`manifests`]: the final comparison; [`sample`]: generation from the final model; [`output`]: the
//!   output directory.

pub mod manifests;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod progress;
pub mod sample;
pub mod status;
pub mod supervise;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use manifests::{Comparison, Holder};
use metrics::{RoundMetrics, Tail};
use output::{MetricsFile, OutDir};
use progress::{Progress, human_bytes};
use supervise::{ChildId, STOP_GRACE, Supervisor};

/// The run name every child follows (it names the gossip topics).
const RUN: &str = "demo";
/// How long a child may take to print its address (or key) after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the first round may take to be committed (nodes join, fetch the model, train).
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(300);
/// A later round may take this many times the slowest round so far (at least [`MIN_STALL`]) before the demo
/// gives up.
const STALL_FACTOR: u32 = 10;
/// The shortest stall timeout after the first round.
const MIN_STALL: Duration = Duration::from_secs(120);
/// How long the coordinator gets to finish and export after its last round (or after SIGTERM).
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the nodes get to apply the last commit after the coordinator has finished.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the demo looks at the metrics file and the children.
const TICK: Duration = Duration::from_millis(200);

/// When the run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this many committed rounds (the coordinator stops itself and exports the model).
    Rounds(u64),
    /// After this long (the demo then asks the coordinator to stop; it exports the last committed model).
    Time(Duration),
}

/// Everything the demo needs to know.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `mana` executable to start the children from.
    pub exe: PathBuf,
    /// The output directory.
    pub out: PathBuf,
    /// Training nodes.
    pub nodes: usize,
    /// When to stop.
    pub stop: Stop,
    /// Text to train on (`None`: the built-in corpus).
    pub corpus: Option<PathBuf>,
    /// `sync` or `diloco`.
    pub rule: String,
    /// H: micro-batches per round (sync) or inner steps (diloco); `None`: the coordinator's default.
    pub inner_steps: Option<u32>,
    /// Seed of the run (weights, data, built-in corpus); `None`: the coordinator's default.
    pub seed: Option<u64>,
    /// Prompts for `sample.txt`.
    pub prompts: Vec<String>,
    /// Bytes generated per prompt.
    pub sample_tokens: usize,
    /// `--log-format` of every child: `text` or `json`.
    pub log_format: String,
}

/// The running network.
struct Network {
    coordinator: ChildId,
    /// (child, name, data dir) of each training node.
    nodes: Vec<(ChildId, String, PathBuf)>,
    /// When the coordinator was started, unix ms (the first round's start).
    coordinator_started_ms: u64,
}

/// What the rounds produced.
struct Rounds {
    metrics: Vec<RoundMetrics>,
    /// Per-round wall time, seconds (from commit to commit; the first from the coordinator's start).
    secs: Vec<f64>,
    nodes_lost: Vec<String>,
}

/// Runs the demo to the end, then stops every child.
pub fn run(cfg: DemoConfig) -> anyhow::Result<()> {
    anyhow::ensure!(cfg.nodes >= 1, "--nodes must be at least 1");
    let started = Instant::now();
    let out = OutDir::prepare(&cfg.out)?;
    let installed = signals::install()?;
    let signals = &installed.flag;
    let mut sup = Supervisor::new(out.logs())?;
    sup.set_cancel(signals.clone());
    let (rounds_planned, duration) = match cfg.stop {
        Stop::Rounds(r) => (Some(r), None),
        Stop::Time(d) => (None, Some(d)),
    };
    let progress = Progress::new(rounds_planned, duration);
    let result = drive(&cfg, &out, &mut sup, &progress, signals, started);
    progress.finish();
    // Stop the children before reporting, whatever happened (Drop would too; this way the summary is
    // printed after they are gone).
    sup.stop_all(STOP_GRACE);
    let interrupted = signals.load(Ordering::SeqCst);
    match result {
        Ok(summary) => {
            println!("{summary}");
            out.write("summary.txt", &summary)?;
            Ok(())
        }
        Err(e) if interrupted => Err(e.context(format!(
            "interrupted: every process the demo started is stopped; what it had written is in {}",
            out.root.display()
        ))),
        Err(e) => Err(e.context(format!("the demo failed; every process it started is stopped; logs in {}", out.logs().display()))),
    }
}

/// Starts the network, follows the rounds, then writes the outputs; returns the summary text.
fn drive(
    cfg: &DemoConfig,
    out: &OutDir,
    sup: &mut Supervisor,
    progress: &Progress,
    signals: &Arc<AtomicBool>,
    started: Instant,
) -> anyhow::Result<String> {
    let net = start_network(cfg, out, sup, progress)?;
    progress.note(&format!(
        "network up in {:.1} s: bootstrap, coordinator and {} nodes on 127.0.0.1 (logs in {})",
        started.elapsed().as_secs_f64(),
        cfg.nodes,
        out.logs().display()
    ));
    progress.phase("waiting for the first round (nodes join, fetch the model, train)");
    let rounds = follow_rounds(cfg, out, sup, progress, signals, &net, started)?;
    let final_round = rounds.metrics.last().map(|m| m.round);
    progress.phase("waiting for the nodes to apply the last commit");
    let comparison = compare_manifests(out, sup, &net, &rounds, signals)?;
    out.write("manifests.txt", &comparison.text)?;
    // Everything is read; the children can go (generation below needs the CPU to itself).
    sup.stop_all(STOP_GRACE);
    progress.phase("sampling text from the final model");
    let samples = sample::generate_samples(&out.final_model(), &cfg.prompts, cfg.sample_tokens)?;
    let header = format!(
        "greedy continuations by the final model (round {}, exported to {}), {} bytes each",
        final_round.map_or_else(|| "-".into(), |r| r.to_string()),
        out.final_model().display(),
        cfg.sample_tokens
    );
    out.write("sample.txt", &sample::render(&samples, &header))?;
    let summary = summary(cfg, out, &rounds, &comparison, &samples, started.elapsed());
    if !comparison.agree {
        println!("{summary}");
        bail!("the processes disagree on the final model: see {}", out.file("manifests.txt").display());
    }
    Ok(summary)
}

/// A `mana` command for a child: the demo's settings only (no `MANA_*` variable of the user's shell leaks
/// into a child's configuration), logs at `info` unless `RUST_LOG` says otherwise.
fn mana(cfg: &DemoConfig, role: &str) -> Command {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args([role, "--log-format", &cfg.log_format]);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MANA_") {
            cmd.env_remove(key);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

/// The loopback listen address (TCP, port chosen by the system).
const LISTEN: &str = "/ip4/127.0.0.1/tcp/0";

/// Starts the bootstrap, the coordinator and the nodes, each once the previous has printed what it needs.
fn start_network(cfg: &DemoConfig, out: &OutDir, sup: &mut Supervisor, progress: &Progress) -> anyhow::Result<Network> {
    progress.phase("starting the bootstrap node");
    let mut cmd = mana(cfg, "bootstrap");
    cmd.args(["--listen", LISTEN, "--data-dir"]).arg(out.data_dir("bootstrap"));
    let bootstrap = sup.spawn("bootstrap", cmd)?;
    let boot_addr = sup.wait_line(bootstrap, STARTUP_TIMEOUT, |l| {
        (l.starts_with("/ip4/127.0.0.1/tcp/") && l.contains("/p2p/")).then(|| l.to_owned())
    })?;

    progress.phase("starting the coordinator");
    let mut cmd = mana(cfg, "coordinator");
    cmd.args(["--run", RUN, "--listen", LISTEN, "--bootstrap", &boot_addr, "--rule", &cfg.rule])
        .args(["--min-members", &cfg.nodes.to_string()])
        // Every routed expert on two nodes (one when there is a single node).
        .args(["--replication", &cfg.nodes.min(2).to_string()])
        .arg("--data-dir")
        .arg(out.data_dir("coordinator"))
        .arg("--metrics")
        .arg(out.coordinator_metrics())
        .arg("--export")
        .arg(out.final_model());
    if let Stop::Rounds(r) = cfg.stop {
        cmd.args(["--rounds", &r.to_string()]);
    }
    if let Some(h) = cfg.inner_steps {
        cmd.args(["--inner-steps", &h.to_string()]);
    }
    if let Some(seed) = cfg.seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    if let Some(corpus) = &cfg.corpus {
        cmd.arg("--corpus").arg(corpus);
    }
    let coordinator_started_ms = mana_node::daemon::now_ms();
    let coordinator = sup.spawn("coordinator", cmd)?;
    // It ends by itself after its last round (or on SIGTERM), exporting the model: that is not a failure.
    sup.allow_exit(coordinator);
    let (mut addr, mut key) = (None, None);
    sup.wait_line(coordinator, STARTUP_TIMEOUT, |l| {
        if let Some(a) = l.strip_prefix("addr ") {
            addr.get_or_insert_with(|| a.trim().to_owned());
        } else if let Some(k) = l.strip_prefix("coordinator-key ") {
            key = Some(k.trim().to_owned());
        }
        (addr.is_some() && key.is_some()).then_some(())
    })?;
    let key = key.context("the coordinator printed its key")?;

    progress.phase(&format!("starting {} nodes", cfg.nodes));
    let mut nodes = Vec::new();
    for i in 1..=cfg.nodes {
        let name = format!("node-{i}");
        let data_dir = out.data_dir(&name);
        let mut cmd = mana(cfg, "node");
        cmd.args(["--run", RUN, "--listen", LISTEN, "--bootstrap", &boot_addr, "--coordinator", &key])
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(corpus) = &cfg.corpus {
            cmd.arg("--corpus").arg(corpus);
        }
        let id = sup.spawn(&name, cmd)?;
        nodes.push((id, name, data_dir));
    }
    for (id, _, _) in &nodes {
        sup.wait_line(*id, STARTUP_TIMEOUT, |l| l.starts_with("/ip4/127.0.0.1/").then_some(()))?;
    }
    Ok(Network { coordinator, nodes, coordinator_started_ms })
}

/// Follows the coordinator's metrics until the run ends; writes `metrics.jsonl` and `loss.svg` as rounds
/// are committed.
fn follow_rounds(
    cfg: &DemoConfig,
    out: &OutDir,
    sup: &mut Supervisor,
    progress: &Progress,
    signals: &Arc<AtomicBool>,
    net: &Network,
    started: Instant,
) -> anyhow::Result<Rounds> {
    let mut tail = Tail::new(out.coordinator_metrics());
    let mut file = MetricsFile::create(&out.file("metrics.jsonl"))?;
    let mut rounds = Rounds { metrics: Vec::new(), secs: Vec::new(), nodes_lost: Vec::new() };
    let mut reported = Vec::new();
    let mut last_commit_ms = net.coordinator_started_ms;
    let mut last_progress = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut stop_asked = false;
    let title = format!("mana demo: {} nodes, {} rule", cfg.nodes, cfg.rule);
    loop {
        if signals.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        for death in sup.deaths(&mut reported) {
            if death.id == net.coordinator {
                bail!("the coordinator stopped: {death}");
            }
            progress.note(&format!("warning: {} (pid {}) {}; its log is {}", death.name, death.pid, death.status, death.log.display()));
            if net.nodes.iter().any(|(id, _, _)| *id == death.id) {
                rounds.nodes_lost.push(death.name.clone());
            }
        }
        if rounds.nodes_lost.len() == net.nodes.len() {
            bail!("every node has stopped; see their logs in {}", out.logs().display());
        }
        let coordinator_done = sup.exit_status(net.coordinator).is_some();
        for text in tail.poll()? {
            let line = metrics::parse_line(&text).with_context(|| format!("a line of {}: {text}", tail.path().display()))?;
            let m = line.metrics;
            let secs = m.unix_ms.saturating_sub(last_commit_ms) as f64 / 1000.0;
            let secs = (m.unix_ms > 0 && secs > 0.0).then_some(secs);
            if let Some(s) = secs {
                slowest = slowest.max(Duration::from_secs_f64(s));
                last_commit_ms = m.unix_ms;
            }
            let node_views: Vec<_> = net.nodes.iter().map(|(_, name, dir)| (name, status::read(dir))).collect();
            let mut raw = line.raw;
            raw.insert("elapsed_s".into(), serde_json::json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0));
            raw.insert("round_s".into(), serde_json::json!(secs));
            raw.insert(
                "nodes".into(),
                serde_json::Value::Array(node_views.iter().map(|(name, view)| node_json(name, view.as_ref())).collect()),
            );
            file.append(&raw)?;
            let wire_total = rounds.metrics.iter().map(|r| r.payload_bytes).sum::<u64>() + m.payload_bytes;
            progress.round(&m, wire_total, secs, &node_traffic(&node_views));
            rounds.secs.push(secs.unwrap_or(0.0));
            rounds.metrics.push(m);
            out.write("loss.svg", &output::loss_svg(&rounds.metrics, &title))?;
            last_progress = Instant::now();
        }
        if coordinator_done {
            // Its last lines were written before it exited: the poll above has them.
            break;
        }
        if let Stop::Time(d) = cfg.stop {
            progress.elapsed(started.elapsed());
            if !stop_asked && started.elapsed() >= d {
                progress.phase("time is up: stopping the coordinator (it exports the last committed model)");
                sup.terminate(net.coordinator);
                stop_asked = true;
                last_progress = Instant::now();
            }
        }
        let limit = if stop_asked {
            EXIT_TIMEOUT
        } else if rounds.metrics.is_empty() {
            FIRST_ROUND_TIMEOUT
        } else {
            (slowest * STALL_FACTOR).max(MIN_STALL)
        };
        if last_progress.elapsed() > limit {
            bail!(
                "nothing happened for {} s (no round committed, coordinator still running); see {}",
                limit.as_secs(),
                sup.log(net.coordinator).display()
            );
        }
        std::thread::sleep(TICK);
    }
    if rounds.metrics.is_empty() {
        bail!("the coordinator ended without committing a round; see {}", sup.log(net.coordinator).display());
    }
    if let Stop::Rounds(r) = cfg.stop {
        let done = rounds.metrics.len() as u64;
        anyhow::ensure!(
            done >= r,
            "the coordinator ended after {done} of {r} rounds; see {}",
            sup.log(net.coordinator).display()
        );
    }
    Ok(rounds)
}

/// What `metrics.jsonl` records about one node at a commit.
fn node_json(name: &str, view: Option<&status::StatusView>) -> serde_json::Value {
    let Some(v) = view else { return serde_json::json!({ "name": name }) };
    let t = v.training.clone().unwrap_or_default();
    let mut entry = serde_json::json!({
        "name": name,
        "peers": v.peers.len(),
        "applied_round": t.applied_round.or(v.stored_round),
        "rounds_trained": t.rounds_trained,
        "deltas_sent": t.deltas_sent,
        "delta_bytes_sent": t.delta_bytes_sent,
        "hash_mismatches": t.hash_mismatches,
    });
    if let Some(traffic) = v.traffic {
        entry["traffic"] = serde_json::json!(traffic);
    }
    entry
}

/// The nodes' traffic for the live line: bytes sent/received on the wire when the nodes count them, else
/// the delta bytes they published (empty when they report neither). Status files are rewritten every 2 s,
/// so these trail the round by up to that.
fn node_traffic(views: &[(&String, Option<status::StatusView>)]) -> String {
    let wire: Vec<String> = views
        .iter()
        .filter_map(|(name, v)| {
            let t = v.as_ref()?.traffic?;
            Some(format!("{} {}/{}", name.trim_start_matches("node-"), human_bytes(t.sent()), human_bytes(t.received())))
        })
        .collect();
    if !wire.is_empty() {
        return format!("  node out/in: {}", wire.join(", "));
    }
    let sent: Vec<String> = views
        .iter()
        .filter_map(|(name, v)| {
            let t = v.as_ref()?.training.as_ref()?;
            Some(format!("{} {}", name.trim_start_matches("node-"), human_bytes(t.delta_bytes_sent)))
        })
        .collect();
    if sent.is_empty() { String::new() } else { format!("  deltas sent by node: {}", sent.join(", ")) }
}

/// Waits for the nodes to hold the final round, then compares every process's shard hashes.
fn compare_manifests(
    out: &OutDir,
    sup: &mut Supervisor,
    net: &Network,
    rounds: &Rounds,
    signals: &Arc<AtomicBool>,
) -> anyhow::Result<Comparison> {
    let last = rounds.metrics.last().context("at least one round was committed")?;
    let final_round = Some(last.round);
    let checkpoint = (!last.checkpoint.is_empty()).then_some(last.checkpoint.as_str());
    let holders = |sup: &mut Supervisor| -> Vec<Holder> {
        let mut all = vec![holder("coordinator", status::read(&out.data_dir("coordinator")))];
        for (id, name, dir) in &net.nodes {
            // A node that died is reported as it last was, and shows as behind if it missed rounds.
            let _ = sup.exit_status(*id);
            all.push(holder(name, status::read(dir)));
        }
        all
    };
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let current = holders(sup);
        let comparison = manifests::compare(final_round, checkpoint, &current);
        let waiting_for_alive = comparison.behind.iter().any(|name| !rounds.nodes_lost.contains(name));
        if comparison.agree || !waiting_for_alive || Instant::now() >= deadline || signals.load(Ordering::SeqCst) {
            if signals.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            return Ok(comparison);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn holder(name: &str, view: Option<status::StatusView>) -> Holder {
    match view {
        Some(v) => {
            let (round, shards, manifest) = v.holdings();
            Holder { name: name.to_owned(), round, manifest, shards }
        }
        None => Holder { name: name.to_owned(), round: None, manifest: None, shards: Vec::new() },
    }
}

/// The one-screen summary.
fn summary(
    cfg: &DemoConfig,
    out: &OutDir,
    rounds: &Rounds,
    comparison: &Comparison,
    samples: &[sample::Sample],
    elapsed: Duration,
) -> String {
    let m = &rounds.metrics;
    let (first, last) = (&m[0], &m[m.len() - 1]);
    let n = m.len() as f64;
    let mean = |f: fn(&RoundMetrics) -> u64| m.iter().map(f).sum::<u64>() as f64 / n / 1000.0;
    let wire: u64 = m.iter().map(|r| r.payload_bytes).sum();
    let tokens: u64 = m.iter().map(|r| r.tokens).sum();
    let accepted: u64 = m.iter().map(|r| r.accepted).sum();
    let rejected: u64 = m.iter().map(|r| r.rejected).sum();
    let timed: Vec<f64> = rounds.secs.iter().copied().skip(1).filter(|s| *s > 0.0).collect();
    let per_round = if timed.is_empty() {
        String::new()
    } else {
        format!(", {:.1} s per round after the first", timed.iter().sum::<f64>() / timed.len() as f64)
    };
    let h = cfg.inner_steps.map_or_else(String::new, |h| format!(", H = {h}"));
    let mut s = String::new();
    s.push_str(&format!(
        "mana demo: {} nodes, a coordinator and a bootstrap on loopback, rule {}{h}, finished in {}\n",
        cfg.nodes,
        cfg.rule,
        clock(elapsed)
    ));
    s.push_str(&format!(
        "rounds    {} committed (first round {:.1} s{per_round}); phases on average: train {:.1} s, transfer {:.1} s, verify {:.1} s, apply {:.1} s\n",
        m.len(),
        rounds.secs[0],
        mean(|r| r.ms.train),
        mean(|r| r.ms.transfer),
        mean(|r| r.ms.verify),
        mean(|r| r.ms.apply),
    ));
    s.push_str(&format!(
        "loss      train {} -> {}, validation {} -> {} (round {} -> {})\n",
        progress::loss(first.train_loss),
        progress::loss(last.train_loss),
        progress::loss(first.val_loss),
        progress::loss(last.val_loss),
        first.round,
        last.round
    ));
    let per_token = if tokens > 0 { format!(", {:.1} bytes per token trained", wire as f64 / tokens as f64) } else { String::new() };
    s.push_str(&format!(
        "deltas    {accepted} accepted, {rejected} rejected; {} of payloads on the wire{per_token}\n",
        human_bytes(wire)
    ));
    if !rounds.nodes_lost.is_empty() {
        s.push_str(&format!("lost      {} stopped during the run (see their logs)\n", rounds.nodes_lost.join(", ")));
    }
    let verdict = comparison.text.lines().find(|l| l.starts_with("verdict:")).unwrap_or("verdict: -");
    s.push_str(&format!("manifests {}\n", verdict.trim_start_matches("verdict: ")));
    if let Some(sample) = samples.first() {
        s.push_str(&format!("sample    {:?}\n", sample::first_line(sample)));
    }
    s.push_str(&format!(
        "outputs   {}: metrics.jsonl loss.svg manifests.txt sample.txt summary.txt, logs/, final-model/",
        out.root.display()
    ));
    s
}

/// `1m 05s` / `42.0 s`.
fn clock(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 { format!("{secs:.1} s") } else { format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60) }
}

/// Ctrl-C, SIGTERM and SIGHUP set a flag instead of killing the demo, so that it can stop its children.
mod signals {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::Context;

    /// The installed handlers: `flag` is set once one of the signals arrives; the small runtime that waits
    /// for them runs as long as this is kept.
    pub struct Signals {
        /// Set on Ctrl-C, SIGTERM or SIGHUP.
        pub flag: Arc<AtomicBool>,
        _runtime: tokio::runtime::Runtime,
    }

    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Signals> {
        let flag = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mana-demo-signals")
            .enable_all()
            .build()
            .context("starting the signal handler")?;
        let set = flag.clone();
        // The listeners are registered here, before any child starts, so no signal can slip past them.
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (mut int, mut term, mut hup) = runtime.block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::hangup())?,
                ))
            })?;
            runtime.spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                set.store(true, Ordering::SeqCst);
            });
        }
        #[cfg(not(unix))]
        runtime.spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            set.store(true, Ordering::SeqCst);
        });
        Ok(Signals { flag, _runtime: runtime })
    }
}
