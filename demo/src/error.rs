//! The demo's one error type. Every way the demo can fail is a variant, so the CLI can report it (with its
//! cause chain) and a test can tell the failures apart; the messages name the file or log to look at.

use std::path::PathBuf;

use mana_kernels::generate::GenerateError;
use mana_kernels::train::TrainError;

use crate::metrics::LineError;
use crate::supervise::Death;

/// Why the demo (or one of its parts) failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The settings cannot make a network (no nodes, say).
    #[error("{0}")]
    Config(String),
    /// A file or directory could not be created, read or written; `context` says which and what for.
    #[error("{context}")]
    Io {
        /// What the demo was doing (`creating <path>`).
        context: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// `metrics.jsonl` could not be written.
    #[error("writing {path}")]
    WriteMetrics {
        /// The file.
        path: PathBuf,
        /// The serializer's (or the file's) reason.
        #[source]
        source: serde_json::Error,
    },
    /// The output directory holds someone else's files, which the demo will not delete.
    #[error("{} is not empty and was not written by `mana demo`; choose another --out directory", .0.display())]
    ForeignOutDir(PathBuf),
    /// A child process could not be started.
    #[error("starting {name} ({program})")]
    Spawn {
        /// The child's name.
        name: String,
        /// The executable.
        program: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A child ended while the demo was waiting for a line from it.
    #[error("{0}")]
    ChildEnded(Box<Death>),
    /// A child closed its stdout but has not (yet) been seen to end.
    #[error("{name} closed its stdout; its log is {}", log.display())]
    StdoutClosed {
        /// The child's name.
        name: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A child did not print what the demo waits for (its address, its key) in time.
    #[error("{name} did not print what the demo waits for within {secs} s; its log is {}", log.display())]
    StartupTimeout {
        /// The child's name.
        name: String,
        /// The time it had, seconds.
        secs: u64,
        /// Its log file.
        log: PathBuf,
    },
    /// Ctrl-C, SIGTERM or SIGHUP arrived while the demo was waiting.
    #[error("interrupted")]
    Interrupted,
    /// The coordinator ended (or failed) before the run was over.
    #[error("the coordinator stopped: {0}")]
    CoordinatorStopped(Box<Death>),
    /// Every training node has ended.
    #[error("every node has stopped; see their logs in {}", .0.display())]
    AllNodesStopped(PathBuf),
    /// No round was committed for longer than the demo's stall limit.
    #[error("nothing happened for {secs} s (no round committed, coordinator still running); see {}", log.display())]
    Stalled {
        /// The limit that passed, seconds.
        secs: u64,
        /// The coordinator's log.
        log: PathBuf,
    },
    /// The coordinator ended without committing a single round.
    #[error("the coordinator ended without committing a round; see {}", .0.display())]
    NoRound(PathBuf),
    /// The coordinator ended before the planned number of rounds.
    #[error("the coordinator ended after {done} of {planned} rounds; see {}", log.display())]
    TooFewRounds {
        /// Rounds committed.
        done: u64,
        /// Rounds planned.
        planned: u64,
        /// The coordinator's log.
        log: PathBuf,
    },
    /// A line of the coordinator's metrics file is not a round's metrics.
    #[error("a line of {}: {line}", path.display())]
    MetricsLine {
        /// The metrics file.
        path: PathBuf,
        /// The line.
        line: String,
        /// What is wrong with it.
        #[source]
        source: LineError,
    },
    /// The coordinator's metrics file has a line longer than the demo reads.
    #[error("{} has a line longer than {max} bytes", path.display())]
    LineTooLong {
        /// The metrics file.
        path: PathBuf,
        /// The bound, bytes.
        max: usize,
    },
    /// The evaluator did not export the final round's model in time.
    #[error("the evaluator did not export round {round}'s model (it last exported {exported:?}; see {})", log.display())]
    NotExported {
        /// The final round.
        round: u64,
        /// The last round it exported, if any.
        exported: Option<u64>,
        /// The evaluator's log.
        log: PathBuf,
    },
    /// The final model the evaluator exported could not be loaded.
    #[error("loading the final model from {}", dir.display())]
    LoadModel {
        /// The exported checkpoint directory.
        dir: PathBuf,
        /// The trainer's reason.
        #[source]
        source: TrainError,
    },
    /// Generation from the final model failed.
    #[error("generating a sample")]
    Generate(#[source] GenerateError),
    /// Some process holds a shard with other bytes than another holder, or is not at the final round.
    #[error("the processes disagree on the final model: see {}", .0.display())]
    Disagree(PathBuf),
    /// The run was interrupted; every child is stopped. `source` is what the demo was doing.
    #[error("interrupted: every process the demo started is stopped; what it had written is in {}", out.display())]
    RunInterrupted {
        /// The output directory.
        out: PathBuf,
        /// The error the interruption caused.
        #[source]
        source: Box<DemoError>,
    },
    /// The run failed; every child is stopped.
    #[error("the demo failed; every process it started is stopped; logs in {}", logs.display())]
    RunFailed {
        /// The children's logs.
        logs: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<DemoError>,
    },
}

impl DemoError {
    /// An I/O error with what the demo was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> DemoError {
        DemoError::Io {
            context: context.into(),
            source,
        }
    }
}
