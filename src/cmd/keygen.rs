//! `mana keygen`: create a node's identity key file and print the PeerId that other nodes will know it by.

use std::path::PathBuf;

use clap::Args;

/// Arguments of `mana keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key file (created with mode 0600).
    #[arg(long, env = "MANA_KEY_FILE", default_value = "mana-node.key")]
    out: PathBuf,
    /// Replace the file if it exists (the old identity is lost).
    #[arg(long)]
    force: bool,
}

/// Generates the key, writes it, and prints the PeerId on stdout.
pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let keypair = mana_node::keyfile::generate(&args.out, args.force)?;
    tracing::info!(path = %args.out.display(), public_key = %keypair.public(), "wrote key file");
    println!("{}", keypair.peer_id());
    Ok(())
}
