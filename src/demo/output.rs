//! The demo's output directory: where each child keeps its data and log, and the files the demo writes
//! (`metrics.jsonl`, `loss.svg`, `manifests.txt`, `sample.txt`, `summary.txt`).
//!
//! A rerun into the same directory starts from scratch: a marker file says the directory is the demo's, and
//! only then are the previous run's entries (and only those names) removed. A non-empty directory without
//! the marker is refused, so a typo in `--out` cannot delete someone's files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::metrics::RoundMetrics;
use super::plot::{self, Labels, Series};

/// The file that marks a directory as the demo's.
const MARKER: &str = ".mana-demo";
/// The files the demo writes at the top of the directory.
const FILES: [&str; 6] = ["metrics.jsonl", "loss.svg", "manifests.txt", "sample.txt", "summary.txt", MARKER];
/// The directories the demo creates (besides `node-<i>`).
const DIRS: [&str; 4] = ["logs", "bootstrap", "coordinator", "final-model"];

/// The output directory's layout.
#[derive(Debug, Clone)]
pub struct OutDir {
    /// Its root.
    pub root: PathBuf,
}

impl OutDir {
    /// Creates the directory, or empties a previous demo's; refuses a non-empty directory that is not one.
    pub fn prepare(root: &Path) -> anyhow::Result<OutDir> {
        if root.exists() {
            let mut entries = std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))?;
            let empty = entries.next().is_none();
            if !empty && !root.join(MARKER).exists() {
                bail!(
                    "{} is not empty and was not written by `mana demo`; choose another --out directory",
                    root.display()
                );
            }
            for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours_dir = DIRS.contains(&name.as_str()) || is_node_dir(&name);
                let path = entry.path();
                if ours_dir && path.is_dir() {
                    std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
                } else if FILES.contains(&name.as_str()) && name != MARKER {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        std::fs::write(root.join(MARKER), "written by `mana demo`; the demo empties this directory on its next run\n")
            .with_context(|| format!("writing into {}", root.display()))?;
        Ok(OutDir { root: root.to_path_buf() })
    }

    /// Child logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The data directory of a child (`bootstrap`, `coordinator`, `node-1`...).
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where the coordinator writes its per-round metrics.
    pub fn coordinator_metrics(&self) -> PathBuf {
        self.data_dir("coordinator").join("metrics.jsonl")
    }

    /// Where the coordinator exports the final model.
    pub fn final_model(&self) -> PathBuf {
        self.root.join("final-model")
    }

    /// A file at the top of the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes a file at the top of the directory (through a temporary file and a rename, so a reader never
    /// sees half of it).
    pub fn write(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// `node-<digits>`.
fn is_node_dir(name: &str) -> bool {
    name.strip_prefix("node-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `metrics.jsonl`, written one line per round as rounds are committed.
#[derive(Debug)]
pub struct MetricsFile {
    out: BufWriter<File>,
}

impl MetricsFile {
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> anyhow::Result<MetricsFile> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsFile { out: BufWriter::new(file) })
    }

    /// Appends one line and flushes it (so the file is useful even if the demo is stopped).
    pub fn append(&mut self, line: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// The loss plot of the rounds so far: training and validation loss per round.
pub fn loss_svg(rounds: &[RoundMetrics], title: &str) -> String {
    let points = |f: fn(&RoundMetrics) -> f64| rounds.iter().map(|m| (m.round as f64, f(m))).collect();
    let series = [
        Series { name: "train loss".into(), color: "#1f77b4".into(), points: points(|m| m.train_loss) },
        Series { name: "validation loss".into(), color: "#d62728".into(), points: points(|m| m.val_loss) },
    ];
    let labels = Labels { title: title.to_owned(), x: "round".into(), y: "loss (nats per byte)".into() };
    plot::line_plot(&labels, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reruns_empty_only_the_demo_s_own_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("out");
        let out = OutDir::prepare(&root).expect("fresh dir");
        std::fs::create_dir_all(out.data_dir("node-3")).expect("mkdir");
        std::fs::create_dir_all(out.logs()).expect("mkdir");
        out.write("loss.svg", "<svg/>").expect("write");
        std::fs::write(root.join("notes.txt"), "mine").expect("write");
        std::fs::create_dir_all(root.join("node-x")).expect("mkdir");
        OutDir::prepare(&root).expect("rerun");
        assert!(!out.data_dir("node-3").exists() && !out.logs().exists() && !out.file("loss.svg").exists());
        assert!(root.join("notes.txt").exists() && root.join("node-x").exists(), "foreign entries are kept");
        assert!(root.join(MARKER).exists());
    }

    #[test]
    fn refuses_a_foreign_non_empty_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("thesis.tex"), "precious").expect("write");
        let err = OutDir::prepare(dir.path()).expect_err("refused");
        assert!(err.to_string().contains("not written by `mana demo`"));
        assert!(dir.path().join("thesis.tex").exists());
    }
}
