//! The demo's output directory: where each child keeps its data and log, and the files the demo writes
//! (`metrics.jsonl`, `loss.svg`, `manifests.txt`, `sample.txt`, `summary.txt`).
//!
//! A rerun into the same directory starts from scratch: a marker file says the directory is the demo's, and
//! only then are the previous run's entries (and only those names) removed. A non-empty directory without
//! the marker is refused, so a typo in `--out` cannot delete someone's files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::DemoError;
use crate::metrics::{RoundMetrics, loss_or_nan};
use crate::plot::{self, Labels, Series};

/// The file that marks a directory as the demo's.
const MARKER: &str = ".mana-demo";
/// The files the demo writes at the top of the directory.
const FILES: [&str; 6] = [
    "metrics.jsonl",
    "loss.svg",
    "manifests.txt",
    "sample.txt",
    "summary.txt",
    MARKER,
];
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
    pub fn prepare(root: &Path) -> Result<OutDir, DemoError> {
        let reading = |e| DemoError::io(format!("reading {}", root.display()), e);
        if root.exists() {
            let mut entries = std::fs::read_dir(root).map_err(reading)?;
            let empty = entries.next().is_none();
            if !empty && !root.join(MARKER).exists() {
                return Err(DemoError::ForeignOutDir(root.to_path_buf()));
            }
            for entry in std::fs::read_dir(root).map_err(reading)? {
                let entry = entry.map_err(reading)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours_dir = DIRS.contains(&name.as_str()) || is_node_dir(&name);
                let path = entry.path();
                if ours_dir && path.is_dir() {
                    std::fs::remove_dir_all(&path)
                        .map_err(|e| DemoError::io(format!("removing {}", path.display()), e))?;
                } else if FILES.contains(&name.as_str()) && name != MARKER {
                    std::fs::remove_file(&path)
                        .map_err(|e| DemoError::io(format!("removing {}", path.display()), e))?;
                }
            }
        }
        std::fs::create_dir_all(root)
            .map_err(|e| DemoError::io(format!("creating {}", root.display()), e))?;
        std::fs::write(
            root.join(MARKER),
            "written by `mana demo`; the demo empties this directory on its next run\n",
        )
        .map_err(|e| DemoError::io(format!("writing into {}", root.display()), e))?;
        Ok(OutDir {
            root: root.to_path_buf(),
        })
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

    /// Where the evaluator exports the final model (the last committed round's).
    pub fn final_model(&self) -> PathBuf {
        self.root.join("final-model")
    }

    /// A file at the top of the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes a file at the top of the directory (through a temporary file and a rename, so a reader never
    /// sees half of it).
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf, DemoError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        std::fs::write(&tmp, contents)
            .map_err(|e| DemoError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| DemoError::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }
}

/// `node-<digits>`.
fn is_node_dir(name: &str) -> bool {
    name.strip_prefix("node-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `metrics.jsonl`, written one line per round as rounds are committed.
#[derive(Debug)]
pub struct MetricsFile {
    /// The file, for messages.
    path: PathBuf,
    /// The buffered writer.
    out: BufWriter<File>,
}

impl MetricsFile {
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> Result<MetricsFile, DemoError> {
        let file = File::create(path)
            .map_err(|e| DemoError::io(format!("creating {}", path.display()), e))?;
        Ok(MetricsFile {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Appends one line and flushes it (so the file is useful even if the demo is stopped).
    pub fn append(
        &mut self,
        line: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), DemoError> {
        serde_json::to_writer(&mut self.out, line).map_err(|source| DemoError::WriteMetrics {
            path: self.path.clone(),
            source,
        })?;
        let writing = |e| DemoError::io(format!("writing {}", self.path.display()), e);
        self.out.write_all(b"\n").map_err(writing)?;
        self.out.flush().map_err(writing)?;
        Ok(())
    }
}

/// The loss plot of the rounds so far: training and validation loss per round.
pub fn loss_svg(rounds: &[RoundMetrics], title: &str) -> String {
    let points = |f: fn(&RoundMetrics) -> Option<f32>| {
        rounds
            .iter()
            .map(|m| (m.round as f64, loss_or_nan(f(m))))
            .collect()
    };
    let series = [
        Series {
            name: "train loss".into(),
            color: "#1f77b4".into(),
            points: points(|m| m.train_loss),
        },
        Series {
            name: "validation loss".into(),
            color: "#d62728".into(),
            points: points(|m| m.val_loss),
        },
    ];
    let labels = Labels {
        title: title.to_owned(),
        x: "round".into(),
        y: "loss (nats per byte)".into(),
    };
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
        assert!(
            !out.data_dir("node-3").exists()
                && !out.logs().exists()
                && !out.file("loss.svg").exists()
        );
        assert!(
            root.join("notes.txt").exists() && root.join("node-x").exists(),
            "foreign entries are kept"
        );
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
