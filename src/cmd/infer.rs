//! `mana infer`: generate text from a run's latest committed checkpoint across the network. The command
//! starts a client node that joins through `--bootstrap`, waits for the coordinator's next signed commit of
//! `--run` and for a host of every expert, fetches the trunk, runs it here and has each routed expert
//! computed by the nodes that host it (`mana_node::infer`). With `--cache-experts N` it computes the N experts
//! its prompt routes to most itself, fetched by hash from the committed checkpoint while it generates, and
//! asks the network for the rest (`mana_node::infer::cache`). The sampling flags are `mana generate`'s. Each
//! setting comes from its flag, else its `MANA_*` variable where it has one (the command reads no file).
//!
//! `--k-min` (default: the model's top-k) is how many of a token's top-k experts must answer: an expert no
//! replica answers in time is dropped for a token that keeps that many, its gates renormalized over them;
//! a step in which some token keeps fewer is tried again for up to `--wait-secs`, then the command fails.
//! The summary counts the experts dropped and the steps that stalled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use mana_engine::round::RunSpec;
use mana_kernels::generate::bytes_to_text;
use mana_node::daemon::config::{parse_addrs, parse_public_key, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::infer::{Dispatch, InferClient, InferConfig};

use super::generate::SamplingArgs;

/// Arguments of `mana infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Bootstrap node to join through, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "MANA_BOOTSTRAP", value_delimiter = ',', required = true)]
    bootstrap: Vec<String>,
    /// The training run whose checkpoint to use.
    #[arg(long, env = "MANA_RUN")]
    run: String,
    /// The run coordinator's public key (64 hex digits): only its signed commits are trusted.
    #[arg(long, env = "MANA_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seconds to wait for a signed commit and a host of every expert, and for a generation step that lacks
    /// --k-min answers for some token (it is tried again meanwhile).
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
    /// How many of a token's top-k routed experts must answer (1 to the model's top-k; default all of them):
    /// an expert that no replica answers in time is dropped for a token that keeps this many, and its gates
    /// are renormalized over them.
    #[arg(long)]
    k_min: Option<usize>,
    #[command(flatten)]
    calls: ExpertCallArgs,
    /// Seconds one expert call may take before the next replica is asked.
    #[arg(long, default_value_t = 10)]
    call_timeout_secs: u64,
    /// The client node's data directory (its key and the fetched trunk); default a fresh temporary one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: String,
    /// Print one JSON object (text, round, checkpoint and counters) instead of text.
    #[arg(long)]
    json: bool,
}

/// Joins, loads, generates and prints.
pub fn run(args: InferArgs) -> anyhow::Result<()> {
    let (prompt, generate) = args.sampling.resolve()?;
    args.calls.check()?;
    let spec = RunSpec::tiny();
    let top_k = spec.model.top_k;
    let k_min = args.k_min.unwrap_or(top_k);
    if !(1..=top_k).contains(&k_min) {
        bail!("--k-min must be between 1 and the model's top-k ({top_k}), got {k_min}");
    }
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    let config = client_config(
        &data_dir,
        &args.bootstrap,
        &args.listen,
        &args.run,
        &args.coordinator,
    )?;
    let infer = InferConfig {
        spec,
        call_timeout: Duration::from_secs(args.call_timeout_secs.max(1)),
        wait: Duration::from_secs(args.wait_secs),
        check_share: args.calls.check_share,
        k_min,
        cache_experts: args.calls.cache_experts,
        dispatch: args.calls.dispatch,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let node = Arc::new(daemon::start(config).await?);
        let client = InferClient::new(node.clone(), infer);
        let outcome = async {
            let mut session = client.load().await?;
            let started = Instant::now();
            let (generation, session) = tokio::task::spawn_blocking(move || {
                let g = session.generate(&prompt, &generate);
                (g.map(|g| (g, prompt)), session)
            })
            .await?;
            let (generation, prompt) = generation?;
            let seconds = started.elapsed().as_secs_f64();
            let text = bytes_to_text(&prompt, &generation.tokens);
            let stats = session.call_stats();
            let ms = |q: f64| stats.latency.quantile(q).map(|d| d.as_secs_f64() * 1e3);
            let cache = session.cache_stats();
            if args.json {
                let out = serde_json::json!({
                    "text": text,
                    "round": session.round,
                    "checkpoint": session.checkpoint.to_string(),
                    "tokens": generation.tokens.len(),
                    "forward_passes": generation.forward_passes,
                    "expert_calls": stats.answered,
                    "failed_attempts": stats.failed_attempts(),
                    "dispatch": args.calls.dispatch.to_string(),
                    "request_bytes": stats.request_bytes,
                    "response_bytes": stats.response_bytes,
                    "checked": stats.checked,
                    "disagreements": stats.disagreements,
                    "dropped_experts": stats.dropped,
                    "stalled_steps": stats.stalled,
                    "k_min": k_min,
                    "cache_capacity": cache.capacity,
                    "cached_experts": cache.held.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    "local_calls": cache.local_calls,
                    "experts_fetched": cache.fetched,
                    "cache_fetch_failures": cache.fetch_failures,
                    "banned_hosts": session.banned_hosts().len(),
                    "call_ms_p50": ms(0.5),
                    "call_ms_p99": ms(0.99),
                    "seconds": seconds,
                });
                println!("{out}");
            } else {
                println!("{text}");
                eprintln!(
                    "round {}: {} tokens in {seconds:.2} s ({:.1} tokens/s), {} expert calls here ({} experts \
                     cached of {}, {} fetched) and {} on the network ({} dispatch, {} bytes sent and {} received; \
                     {} retried on another replica, {} checked against a second one, {} disagreements, {} hosts \
                     banned; call time p50 {} ms, p99 {} ms); {} expert calls unanswered and dropped (k_min \
                     {k_min}), {} steps stalled and retried",
                    session.round,
                    generation.tokens.len(),
                    generation.tokens.len() as f64 / seconds.max(1e-9),
                    cache.local_calls,
                    cache.held.len(),
                    cache.capacity,
                    cache.fetched,
                    stats.answered,
                    args.calls.dispatch,
                    stats.request_bytes,
                    stats.response_bytes,
                    stats.failed_attempts(),
                    stats.checked,
                    stats.disagreements,
                    session.banned_hosts().len(),
                    ms(0.5).map_or("-".into(), |v| format!("{v:.1}")),
                    ms(0.99).map_or("-".into(), |v| format!("{v:.1}")),
                    stats.dropped,
                    stats.stalled,
                );
            }
            anyhow::Ok(())
        }
        .await;
        drop(client);
        node.stop().await?;
        outcome
    })
}

/// How a network client calls experts: the flags `mana infer` and `mana serve` (from the network) share.
#[derive(Debug, Args)]
pub(crate) struct ExpertCallArgs {
    /// Share of expert calls also asked of a second replica (0 to 1); replicas that disagree are settled by
    /// computing the expert here from its committed shard, and a host that answered wrong is banned.
    #[arg(long, default_value_t = mana_node::infer::DEFAULT_CHECK_SHARE)]
    pub(crate) check_share: f64,
    /// Most experts to compute here: the ones the prompts route to most, fetched by hash from the committed
    /// checkpoint in the background while generating; the rest are asked of their hosts (0: all of them).
    #[arg(long, env = "MANA_CACHE_EXPERTS", default_value_t = 0)]
    pub(crate) cache_experts: usize,
    /// Encodings of expert calls: `fp8/f32` (the default: hidden states in E4M3 with 1x128 scales, answers
    /// in f32; exact for an FP8 model, 1.6x fewer bytes than f32), `fp8` (answers in bf16 too: 2.6x fewer
    /// bytes; the loss is unchanged but about 0.7% of greedy choices of an FP8 model differ from the whole
    /// checkpoint's), `f32` (exact for any model), or any `<input>/<answer>` of f32, bf16, fp8.
    #[arg(long, env = "MANA_DISPATCH", default_value = "fp8/f32")]
    pub(crate) dispatch: Dispatch,
}

impl ExpertCallArgs {
    /// Refuses a `--check-share` outside 0 to 1.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.check_share) {
            bail!(
                "--check-share must be between 0 and 1, got {}",
                self.check_share
            );
        }
        Ok(())
    }
}

/// The node config of an inference client (`mana infer`, `mana serve` from the network): it joins through
/// `bootstrap`, follows `run`, trusts commits signed by `coordinator`, and syncs no shards of its own.
pub(crate) fn client_config(
    data_dir: &std::path::Path,
    bootstrap: &[String],
    listen: &str,
    run: &str,
    coordinator: &str,
) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(data_dir);
    config.net.bootstrap = parse_addrs(bootstrap)?;
    config.net.listen = parse_addrs(&[listen.to_string()])?;
    config.net.run_id = parse_run(run)?;
    config.coordinator = Some(parse_public_key(coordinator)?);
    config.sync_shards = false;
    Ok(config)
}

/// A directory removed when dropped (the client's default data directory).
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system's temporary directory.
    pub(crate) fn new() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("mana-infer-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
