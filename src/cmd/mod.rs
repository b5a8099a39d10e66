//! The subcommands of `mana`, one file each. Every subcommand is a clap `Args` struct whose doc comments
//! are its help text, and a `run` function that calls into a library crate. The network processes (node,
//! coordinator, bootstrap) share the settings of `net`, and start logging themselves once their settings
//! (`--log-format` among them) are layered; the demo starts it with its own `--log-format`; every other
//! command logs as text.

mod bootstrap;
mod codec;
mod coordinator;
mod demo;
pub(crate) mod generate;
pub(crate) mod infer;
mod info;
mod keygen;
mod net;
mod node;
mod preflight;
mod rule;
mod serve;
mod simulate;
mod status;
mod train;

use clap::Subcommand;

/// The subcommands of `mana`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version, the compute backends available on this machine and their settings.
    Info(info::InfoArgs),
    /// Create a node identity key file (mode 0600) and print its PeerId.
    Keygen(keygen::KeygenArgs),
    /// Run a node: join the network, validate gossip, serve and sync shards (or check its store).
    Node(node::NodeArgs),
    /// Run a bootstrap node: a long-lived DHT server and relay with a persistent identity.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Coordinate a training run: announce rounds, verify and aggregate deltas, commit checkpoints.
    Coordinator(coordinator::CoordinatorArgs),
    /// Show what a running node reports: peers, experts, rounds, shards, rejected messages.
    Status(status::StatusArgs),
    /// Train the model on one machine, on a text corpus or the built-in one.
    Train(train::TrainArgs),
    /// Sample text from a checkpoint (greedy, or temperature and top-p; optionally speculative with MTP).
    Generate(generate::GenerateArgs),
    /// Generate text from a run's latest committed checkpoint across the network: the trunk runs here, each
    /// routed expert on a node that hosts it.
    Infer(infer::InferArgs),
    /// Serve completions over an OpenAI-style HTTP API (`POST /v1/completions`, streaming, `GET /v1/models`)
    /// from a checkpoint.
    Serve(serve::ServeArgs),
    /// Simulate N training nodes in one process: loss against single-node training, bytes per token.
    Simulate(simulate::SimulateArgs),
    /// Start a whole training network on this machine (bootstrap, coordinator, N nodes), train for a few
    /// minutes with live progress, and write metrics, a loss plot, final shard hashes and a text sample.
    Demo(demo::DemoArgs),
}

impl Command {
    /// Whether the command only prints and exits (no network, no files written), so that a closed stdout
    /// may end it quietly.
    pub fn only_prints(&self) -> bool {
        matches!(
            self,
            Command::Info(_) | Command::Status(_) | Command::Generate(_)
        )
    }
}

/// Runs one subcommand to completion.
pub fn run(command: Command) -> anyhow::Result<()> {
    if !matches!(
        command,
        Command::Node(_) | Command::Bootstrap(_) | Command::Coordinator(_) | Command::Demo(_)
    ) {
        crate::logging::init(crate::logging::LogFormat::Text);
    }
    match command {
        Command::Info(args) => info::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Node(args) => node::run(args),
        Command::Bootstrap(args) => bootstrap::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Status(args) => status::run(args),
        Command::Train(args) => train::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Demo(args) => demo::run(args),
    }
}
