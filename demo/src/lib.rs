//! `mana demo`: a whole training network on this machine, on loopback: a bootstrap node, a coordinator, an
//! evaluator (a node that mirrors every checkpoint, publishes its validation loss and exports the model: the
//! coordinator holds none) and N training nodes,
//! each a separate `mana` process (the executable given in [`DemoConfig::exe`]) with its
//! own data directory and log under the output directory. The demo follows the coordinator's per-round
//! metrics and shows them live, and at the end writes `metrics.jsonl`, `loss.svg`, `manifests.txt` (does
//! every holder of each shard hold the same bytes?), `sample.txt` (text from the final model) and
//! `summary.txt`.
//!
//! Use: fill a [`DemoConfig`] and call [`run`]; the CLI's `mana demo` does only that.
//!
//! Every child is stopped when the demo ends, however it ends: normally, on an error, on Ctrl-C / SIGTERM /
//! SIGHUP, or on a panic ([`supervise::Supervisor`]'s `Drop`). The demo reads the daemon's own types
//! (`NodeStatus`, `RoundMetrics`) from the files the children write.
//!
//! - [`supervise`]: the child processes; [`metrics`]: the coordinator's round lines; [`status`]: the
//!   children's status files; [`progress`]: the live display; [`plot`]: the SVG loss plot;
//!   [`manifests`]: the final comparison; [`sample`]: generation from the final model; [`output`]: the
//!   output directory; [`chaos`]: kills and restarts while training; `network`, `rounds`, `summary`,
//!   `signals`: starting the network, following the rounds, the summary text and the signal handlers.

pub mod chaos;
mod error;
pub mod exact;
pub mod manifests;
pub mod metrics;
mod network;
pub mod output;
pub mod plot;
pub mod progress;
mod rounds;
pub mod sample;
mod signals;
pub mod single;
pub mod status;
mod summary;
pub mod supervise;
pub mod traffic;

pub use error::DemoError;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use output::OutDir;
use progress::Progress;
use supervise::{STOP_GRACE, Supervisor};

/// When the run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this many committed rounds (the coordinator ends the run; the evaluator exports the model).
    Rounds(u64),
    /// After this long (the demo then asks the coordinator to stop; the evaluator exports the last committed
    /// model).
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
    /// Members the coordinator waits for before a round (`None`: every node, so that each round has them all).
    pub min_members: Option<usize>,
    /// When to stop.
    pub stop: Stop,
    /// Text to train on (`None`: the built-in corpus).
    pub corpus: Option<PathBuf>,
    /// `sync` or `diloco`.
    pub rule: String,
    /// H: micro-batches per round (sync) or inner steps (diloco); `None`: the coordinator's default.
    pub inner_steps: Option<u32>,
    /// The delta codec, as the coordinator's flags (`--top-k 0.03 --top-k-per-block ...`; empty: dense FP8).
    pub codec_flags: Vec<String>,
    /// Seed of the run (weights, data, built-in corpus); `None`: the coordinator's default.
    pub seed: Option<u64>,
    /// Prompts for `sample.txt`.
    pub prompts: Vec<String>,
    /// Bytes generated per prompt.
    pub sample_tokens: usize,
    /// `--log-format` of every child: `text` or `json`.
    pub log_format: String,
    /// Kill and restart children while training (`--chaos`); `None`: no chaos.
    pub chaos: Option<chaos::ChaosConfig>,
    /// After the run, train the full model on one node on as many tokens and score it beside the network's
    /// (built-in corpus only).
    pub single_node: bool,
}

/// Runs the demo to the end, then stops every child; prints the summary and writes `summary.txt`.
pub fn run(cfg: DemoConfig) -> Result<(), DemoError> {
    if cfg.nodes < 1 {
        return Err(DemoError::Config("--nodes must be at least 1".into()));
    }
    if cfg.min_members.is_some_and(|m| m < 1 || m > cfg.nodes) {
        return Err(DemoError::Config(
            "--min-members must be between 1 and --nodes".into(),
        ));
    }
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
        Err(e) if interrupted => Err(DemoError::RunInterrupted {
            out: out.root.clone(),
            source: Box::new(e),
        }),
        Err(e) => Err(DemoError::RunFailed {
            logs: out.logs(),
            source: Box::new(e),
        }),
    }
}

/// Starts the network, follows the rounds, then writes the outputs; returns the summary text.
fn drive(
    cfg: &DemoConfig,
    out: &OutDir,
    sup: &mut Supervisor,
    progress: &Progress,
    signals: &AtomicBool,
    started: Instant,
) -> Result<String, DemoError> {
    let net = network::start(cfg, out, sup, progress)?;
    progress.note(&format!(
        "network up in {:.1} s: bootstrap, coordinator, evaluator and {} nodes on 127.0.0.1 (logs in {})",
        started.elapsed().as_secs_f64(),
        cfg.nodes,
        out.logs().display()
    ));
    progress.phase("waiting for the first round (nodes join, fetch the model, train)");
    let mut rounds = rounds::follow(cfg, out, sup, progress, signals, &net, started)?;
    // `follow` returns only once a round has been committed.
    let Some(last) = rounds.metrics.last() else {
        return Err(DemoError::NoRound(sup.log(net.coordinator).to_path_buf()));
    };
    progress.phase("waiting for the nodes to apply the last commit");
    let comparison = net.compare_holdings(out, sup, &rounds, last, signals)?;
    progress.phase("waiting for the evaluator to export the final model");
    net.wait_for_export(out, sup, last.round, signals)?;
    out.write("manifests.txt", &comparison.text)?;
    // Read before the nodes stop; a node killed by chaos counted from zero again after its restart.
    if cfg.chaos.is_none()
        && rounds.nodes_lost.is_empty()
        && let Some((sent, received)) = rounds::nodes_traffic(&net)
    {
        rounds.nodes_sent = Some(sent);
        rounds.nodes_received = Some(received);
    }
    // Everything is read; the children can go (generation below needs the CPU to itself).
    sup.stop_all(STOP_GRACE);
    progress.phase("sampling text from the final model");
    let samples = sample::generate_samples(&out.final_model(), &cfg.prompts, cfg.sample_tokens)?;
    let header = format!(
        "greedy continuations by the final model (round {}, exported to {}), {} bytes each",
        last.round,
        out.final_model().display(),
        cfg.sample_tokens
    );
    out.write("sample.txt", &sample::render(&samples, &header))?;
    // Exact answers to the built-in corpus's questions, the network's model and (if asked) one node's.
    let answers = if cfg.corpus.is_none() {
        progress.phase("asking the final model the built-in corpus's questions");
        let questions = exact::questions(exact::QUESTION_SEED);
        let network = exact::score_checkpoint(&out.final_model(), &questions)?;
        let single = if cfg.single_node {
            progress.phase("training the full model on one node on as many tokens, for comparison");
            Some(single::train_and_score(
                &cfg.rule,
                cfg.inner_steps,
                cfg.seed,
                cfg.nodes,
                last.round,
                &questions,
            )?)
        } else {
            None
        };
        Some(summary::Answers { network, single })
    } else {
        None
    };
    let summary = summary::summary(
        cfg,
        out,
        &rounds,
        &comparison,
        &samples,
        answers.as_ref(),
        started.elapsed(),
    );
    if !comparison.agree {
        println!("{summary}");
        return Err(DemoError::Disagree(out.file("manifests.txt")));
    }
    Ok(summary)
}
