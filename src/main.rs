//! `mana`: one binary for every role in the network (node, coordinator, bootstrap, client) and for local
//! work (training on one machine, sampling text). Each subcommand lives in `cmd/` and only calls a library
//! crate; this file parses the command line, sets up logging and reports errors.

mod cmd;

use clap::Parser;

/// Train one Mixture-of-Experts language model on many people's GPUs, over a peer-to-peer network.
#[derive(Debug, Parser)]
#[command(name = "mana", version, about, long_about = None)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    cmd::run(cli.command)
}

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default `info`), so that stdout stays free
/// for a command's own output (JSON for machines, text for people).
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
