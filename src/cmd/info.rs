//! `mana info`: what this build of mana can use on this machine, so that an operator can check a node's
//! compute before joining a run: the backends built in, and whether a GPU is present and why it is or is
//! not used.

use std::path::Path;

use clap::Args;

/// Arguments of `mana info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The GPU backends this build holds (none yet: the CUDA backend is not part of it).
const GPU_BACKENDS: &[&str] = &[];

/// NVIDIA GPUs the driver lists (`/proc/driver/nvidia/gpus/*/information`, its `Model:` line), by name.
fn nvidia_gpus(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut gpus: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let info = std::fs::read_to_string(e.path().join("information")).unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_owned())
                .unwrap_or_else(|| format!("NVIDIA GPU at {}", e.file_name().to_string_lossy()))
        })
        .collect();
    gpus.sort();
    gpus
}

/// Why the GPUs found are or are not used.
fn gpu_verdict(gpus: &[String]) -> &'static str {
    match (gpus.is_empty(), GPU_BACKENDS.is_empty()) {
        (true, _) => "no GPU found (no NVIDIA driver listing one): training runs on the CPU",
        (false, true) => "not used: this build has no GPU backend, so training runs on the CPU",
        (false, false) => "used by the GPU backend",
    }
}

/// Prints the version, the compute backends and the GPUs.
pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let version = env!("CARGO_PKG_VERSION");
    let gpus = nvidia_gpus(Path::new("/proc/driver/nvidia/gpus"));
    let verdict = gpu_verdict(&gpus);
    if args.json {
        let info = serde_json::json!({
            "version": version,
            "backends": ["cpu"],
            "gpu_backends": GPU_BACKENDS,
            "gpus": gpus,
            "gpu_use": verdict,
            "cpu_threads": threads,
        });
        println!("{info}");
    } else {
        println!("mana {version}");
        println!("backends: cpu ({threads} threads)");
        println!(
            "GPU backends built in: {}",
            if GPU_BACKENDS.is_empty() {
                "none".to_owned()
            } else {
                GPU_BACKENDS.join(", ")
            }
        );
        if gpus.is_empty() {
            println!("GPUs: {verdict}");
        } else {
            println!("GPUs: {} ({verdict})", gpus.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_read_from_the_driver_listing_and_judged() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(nvidia_gpus(&dir.path().join("absent")).is_empty());
        let gpu = dir.path().join("0000:01:00.0");
        std::fs::create_dir(&gpu).expect("mkdir");
        std::fs::write(gpu.join("information"), "Model: \t NVIDIA H200\nIRQ: 42\n").expect("write");
        let gpus = nvidia_gpus(dir.path());
        assert_eq!(gpus, ["NVIDIA H200"]);
        assert!(gpu_verdict(&gpus).starts_with("not used: this build has no GPU backend"));
        assert!(gpu_verdict(&[]).starts_with("no GPU found"));
    }
}
