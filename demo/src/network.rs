//! The demo's network: starting the bootstrap, the coordinator and the nodes (each once the previous one
//! has printed what the next needs: the bootstrap its address, the coordinator its address and public key,
//! each node its listen address), and, at the end, waiting for every process to hold the final round and
//! comparing what they hold.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::manifests::{self, Comparison, Holder};
use crate::metrics::RoundMetrics;
use crate::output::OutDir;
use crate::progress::Progress;
use crate::rounds::Rounds;
use crate::status;
use crate::supervise::{ChildId, Supervisor};
use crate::{DemoConfig, DemoError, Stop};

/// The run name every child follows (it names the gossip topics).
const RUN: &str = "demo";
/// How long a child may take to print its address (or key) after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes get to apply the last commit after the coordinator has finished.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The loopback listen address (TCP, port chosen by the system).
const LISTEN: &str = "/ip4/127.0.0.1/tcp/0";

/// The running network.
#[derive(Debug)]
pub struct Network {
    /// The bootstrap child.
    pub bootstrap: ChildId,
    /// The coordinator child.
    pub coordinator: ChildId,
    /// (child, name, data dir) of each training node.
    pub nodes: Vec<(ChildId, String, PathBuf)>,
    /// The evaluator child: a node that mirrors every checkpoint and publishes its validation loss (the
    /// coordinator does not hold the model to measure it).
    pub evaluator: ChildId,
    /// When the coordinator was started, unix ms (the first round's start).
    pub coordinator_started_ms: u64,
}

/// A child's command line, kept so that the child can be started again (chaos restarts it).
struct Recipe {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
}

impl Recipe {
    /// `mana <role> --log-format <format>`, to which the caller adds the role's arguments.
    fn new(cfg: &DemoConfig, role: &str) -> Recipe {
        Recipe {
            exe: cfg.exe.clone(),
            args: vec![
                role.into(),
                "--log-format".into(),
                cfg.log_format.clone().into(),
            ],
        }
    }

    fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
        &mut self,
        args: I,
    ) -> &mut Recipe {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    fn arg(&mut self, arg: impl AsRef<std::ffi::OsStr>) -> &mut Recipe {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// What builds the command each time it is started: the demo's settings only (no `MANA_*` variable of
    /// the user's shell leaks into a child's configuration), logs at `info` unless `RUST_LOG` says otherwise.
    fn into_maker(self) -> impl Fn() -> Command + 'static {
        move || {
            let mut cmd = Command::new(&self.exe);
            cmd.args(&self.args);
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
    }
}

/// A loopback TCP port free now (for a bootstrap that must keep its address across restarts).
fn free_port() -> Result<u16, DemoError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DemoError::io("finding a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| DemoError::io("finding a free port", e))
}

/// Starts the bootstrap, the coordinator and the nodes, each once the previous has printed what it needs.
pub fn start(
    cfg: &DemoConfig,
    out: &OutDir,
    sup: &mut Supervisor,
    progress: &Progress,
) -> Result<Network, DemoError> {
    progress.phase("starting the bootstrap node");
    // Under chaos the bootstrap is restarted: a fixed port keeps its address (its key keeps its peer id).
    let boot_listen = match cfg.chaos {
        Some(_) => format!("/ip4/127.0.0.1/tcp/{}", free_port()?),
        None => LISTEN.to_owned(),
    };
    let mut cmd = Recipe::new(cfg, "bootstrap");
    cmd.args(["--listen", &boot_listen, "--data-dir"])
        .arg(out.data_dir("bootstrap"));
    let bootstrap = sup.spawn_restartable("bootstrap", cmd.into_maker())?;
    let boot_addr = sup.wait_line(bootstrap, STARTUP_TIMEOUT, |l| {
        (l.starts_with("/ip4/127.0.0.1/tcp/") && l.contains("/p2p/")).then(|| l.to_owned())
    })?;

    progress.phase("starting the coordinator");
    let mut cmd = Recipe::new(cfg, "coordinator");
    cmd.args([
        "--run",
        RUN,
        "--listen",
        LISTEN,
        "--bootstrap",
        &boot_addr,
        "--rule",
        &cfg.rule,
    ])
    .args([
        "--min-members",
        &cfg.min_members.unwrap_or(cfg.nodes).to_string(),
    ])
    // Every routed expert on two nodes (one when there is a single node).
    .args(["--replication", &cfg.nodes.min(2).to_string()])
    .arg("--data-dir")
    .arg(out.data_dir("coordinator"))
    .arg("--metrics")
    .arg(out.coordinator_metrics());
    if let Stop::Rounds(r) = cfg.stop {
        cmd.args(["--rounds", &r.to_string()]);
    }
    if let Some(h) = cfg.inner_steps {
        cmd.args(["--inner-steps", &h.to_string()]);
    }
    cmd.args(&cfg.codec_flags);
    if let Some(seed) = cfg.seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    if let Some(corpus) = &cfg.corpus {
        cmd.arg("--corpus").arg(corpus);
    }
    let coordinator_started_ms = mana_node::daemon::now_ms();
    let coordinator = sup.spawn_restartable("coordinator", cmd.into_maker())?;
    // It ends by itself after its last round (or on SIGTERM): that is not a failure.
    sup.allow_exit(coordinator);
    let mut addr = None;
    let mut key = None;
    let key = sup.wait_line(coordinator, STARTUP_TIMEOUT, |l| {
        if let Some(a) = l.strip_prefix("addr ") {
            addr.get_or_insert_with(|| a.trim().to_owned());
        } else if let Some(k) = l.strip_prefix("coordinator-key ") {
            key = Some(k.trim().to_owned());
        }
        addr.as_ref().and(key.clone())
    })?;

    progress.phase("starting the evaluator");
    let mut cmd = Recipe::new(cfg, "node");
    cmd.args([
        "--run",
        RUN,
        "--listen",
        LISTEN,
        "--bootstrap",
        &boot_addr,
        "--coordinator",
        &key,
        "--no-train",
        "--evaluate",
    ])
    .arg("--data-dir")
    .arg(out.data_dir("evaluator"))
    // The coordinator holds no model: the evaluator, which mirrors every checkpoint, assembles it.
    .arg("--export")
    .arg(out.final_model());
    if let Some(corpus) = &cfg.corpus {
        cmd.arg("--corpus").arg(corpus);
    }
    if let Some(seed) = cfg.seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    let evaluator = sup.spawn_restartable("evaluator", cmd.into_maker())?;
    sup.wait_line(evaluator, STARTUP_TIMEOUT, |l| {
        l.starts_with("/ip4/127.0.0.1/").then_some(())
    })?;

    progress.phase(&format!("starting {} nodes", cfg.nodes));
    let mut nodes = Vec::new();
    for i in 1..=cfg.nodes {
        let name = format!("node-{i}");
        let data_dir = out.data_dir(&name);
        let mut cmd = Recipe::new(cfg, "node");
        cmd.args([
            "--run",
            RUN,
            "--listen",
            LISTEN,
            "--bootstrap",
            &boot_addr,
            "--coordinator",
            &key,
        ])
        .arg("--data-dir")
        .arg(&data_dir);
        if let Some(corpus) = &cfg.corpus {
            cmd.arg("--corpus").arg(corpus);
        }
        if let Some(seed) = cfg.seed {
            cmd.args(["--seed", &seed.to_string()]);
        }
        let id = sup.spawn_restartable(&name, cmd.into_maker())?;
        nodes.push((id, name, data_dir));
    }
    for (id, _, _) in &nodes {
        sup.wait_line(*id, STARTUP_TIMEOUT, |l| {
            l.starts_with("/ip4/127.0.0.1/").then_some(())
        })?;
    }
    Ok(Network {
        bootstrap,
        coordinator,
        nodes,
        evaluator,
        coordinator_started_ms,
    })
}

impl Network {
    /// Waits for the nodes to hold the final round, then compares every process's shard hashes.
    pub fn compare_holdings(
        &self,
        out: &OutDir,
        sup: &mut Supervisor,
        rounds: &Rounds,
        last: &RoundMetrics,
        signals: &AtomicBool,
    ) -> Result<Comparison, DemoError> {
        let final_round = Some(last.round);
        let checkpoint = (!last.checkpoint.is_empty()).then_some(last.checkpoint.as_str());
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let current = self.holders(out, sup);
            let comparison = manifests::compare(final_round, checkpoint, &current);
            let waiting_for_alive = comparison
                .behind
                .iter()
                .any(|name| !rounds.nodes_lost.contains(name));
            if signals.load(Ordering::SeqCst) {
                return Err(DemoError::Interrupted);
            }
            if comparison.agree || !waiting_for_alive || Instant::now() >= deadline {
                return Ok(comparison);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for the evaluator to have exported the model of `round` (or a later one) to the final model's
    /// directory.
    pub fn wait_for_export(
        &self,
        out: &OutDir,
        sup: &mut Supervisor,
        round: u64,
        signals: &AtomicBool,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let exported = status::read(&out.data_dir("evaluator"))
                .and_then(|s| s.evaluator)
                .and_then(|e| e.exported_round);
            if exported.is_some_and(|r| r >= round) {
                return Ok(());
            }
            if signals.load(Ordering::SeqCst) {
                return Err(DemoError::Interrupted);
            }
            if Instant::now() >= deadline {
                return Err(DemoError::NotExported {
                    round,
                    exported,
                    log: sup.log(self.evaluator).to_path_buf(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the evaluator (a mirror of every checkpoint) and each node report holding now. The coordinator
    /// holds no shard.
    fn holders(&self, out: &OutDir, sup: &mut Supervisor) -> Vec<Holder> {
        let mut all = vec![holder(
            "evaluator",
            status::read(&out.data_dir("evaluator")),
        )];
        for (id, name, dir) in &self.nodes {
            // A node that died is reported as it last was, and shows as behind if it missed rounds.
            let _ = sup.exit_status(*id);
            all.push(holder(name, status::read(dir)));
        }
        all
    }
}

/// One process's holdings for the comparison (nothing, when it has no readable status).
fn holder(name: &str, view: Option<mana_node::daemon::NodeStatus>) -> Holder {
    let held = view.as_ref().map(status::holdings).unwrap_or_default();
    Holder {
        name: name.to_owned(),
        round: held.round,
        manifest: held.manifest,
        shards: held.shards,
    }
}
