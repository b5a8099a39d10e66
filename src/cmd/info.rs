//! `mana info`: what this build of mana can use on this machine, so that an operator can check a node's
//! compute before joining a run.

use clap::Args;

/// Arguments of `mana info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the version and the compute backends.
pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let version = env!("CARGO_PKG_VERSION");
    if args.json {
        let info =
            serde_json::json!({ "version": version, "backends": ["cpu"], "cpu_threads": threads });
        println!("{info}");
    } else {
        println!("mana {version}");
        println!("backends: cpu ({threads} threads)");
    }
    Ok(())
}
