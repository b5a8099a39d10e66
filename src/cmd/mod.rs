//! The subcommands of `mana`, one file each. Every subcommand is a clap `Args` struct whose doc comments
//! are its help text, and a `run` function that calls into a library crate.

mod info;
mod keygen;

use clap::Subcommand;

/// The subcommands of `mana`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version, the compute backends available on this machine and their settings.
    Info(info::InfoArgs),
    /// Create a node identity key file (mode 0600) and print its PeerId.
    Keygen(keygen::KeygenArgs),
}

/// Runs one subcommand to completion.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Info(args) => info::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}
