//! `mana`: one binary for every role in the network (node, coordinator, bootstrap, client) and for local
//! work (training on one machine, sampling text). Each subcommand lives in `cmd/` and only calls a library
//! crate; this file parses the command line and reports errors. Settings are layered by `config`, logging
//! is set up by `logging` (each command picks its log format).

mod cmd;
mod config;
mod logging;

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
    let cli = Cli::parse();
    cmd::run(cli.command)
}
