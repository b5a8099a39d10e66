//! The coordinator's per-round metrics (one JSON object per committed round, in the file given to
//! `mana coordinator --metrics`) as the demo reads them: each line is the coordinator's own
//! [`RoundMetrics`], and [`Tail`] follows the file while the coordinator appends to it, returning only
//! complete lines. The demo writes each line on to `<out>/metrics.jsonl` unchanged, plus a few keys of its own.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The coordinator's metrics line, the one type both sides use (the children are this same build).
pub use mana_node::roles::conductor::{PhaseMs, RoundMetrics};

use crate::DemoError;

/// The most bytes one metrics line may have (a line is a few hundred bytes; this bounds a runaway file).
const MAX_LINE_BYTES: usize = 1 << 20;

/// The keys a line must have even though their value may be `null` (no accepted delta, no validation): a
/// line without them is not a round's metrics.
const REQUIRED_LOSSES: [&str; 2] = ["train_loss", "val_loss"];

/// Why a line is not a round's metrics.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// It is not a JSON object.
    #[error("not a JSON object")]
    NotAnObject(#[source] serde_json::Error),
    /// A field is mistyped, or `round` is missing.
    #[error("missing or mistyped fields")]
    Fields(#[source] serde_json::Error),
    /// One of the losses is missing (they may be `null`, not absent).
    #[error("missing field `{0}`")]
    MissingLoss(&'static str),
}

/// One line of the metrics file: the typed view and the whole object (to pass on unchanged).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The fields the demo uses.
    pub metrics: RoundMetrics,
    /// Every field of the line.
    pub raw: serde_json::Map<String, serde_json::Value>,
}

/// Parses one line of the coordinator's metrics file.
pub fn parse_line(text: &str) -> Result<Line, LineError> {
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(LineError::NotAnObject)?;
    if let Some(key) = REQUIRED_LOSSES
        .into_iter()
        .find(|key| !raw.contains_key(*key))
    {
        return Err(LineError::MissingLoss(key));
    }
    let metrics = RoundMetrics::deserialize(serde_json::Value::Object(raw.clone()))
        .map_err(LineError::Fields)?;
    Ok(Line { metrics, raw })
}

/// A loss as the plot and the summary use it: NaN when the line has none (the plot skips it, the text
/// shows `-`).
pub fn loss_or_nan(loss: Option<f32>) -> f64 {
    loss.map_or(f64::NAN, f64::from)
}

/// Follows a file that another process appends lines to.
#[derive(Debug)]
pub struct Tail {
    /// The file followed.
    path: PathBuf,
    /// Bytes consumed so far.
    offset: u64,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
}

impl Tail {
    /// Follows `path` from its start (it need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Tail {
        Tail {
            path: path.into(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The file followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last call (none if the file does not exist yet).
    pub fn poll(&mut self) -> Result<Vec<String>, DemoError> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DemoError::io(format!("opening {}", self.path.display()), e)),
        };
        let reading = |e| DemoError::io(format!("reading {}", self.path.display()), e);
        file.seek(SeekFrom::Start(self.offset)).map_err(reading)?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).map_err(reading)?;
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).trim().to_owned();
            if !text.is_empty() {
                lines.push(text);
            }
        }
        if self.partial.len() > MAX_LINE_BYTES {
            return Err(DemoError::LineTooLong {
                path: self.path.clone(),
                max: MAX_LINE_BYTES,
            });
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LINE: &str = r#"{"round":3,"rule":"sync","participants":4,"accepted":15,"rejected":1,"rejected_reasons":{"norm-too-large":1},"train_loss":2.5,"val_loss":2.6,"tokens":4096,"payload_bytes":123456,"checkpoint":"ab12","ms":{"train":900,"transfer":40,"verify":30,"apply":20},"unix_ms":1700000000000,"extra":true}"#;

    #[test]
    fn parses_the_contract_line_and_keeps_unknown_keys() {
        let line = parse_line(LINE).expect("parses");
        let m = &line.metrics;
        assert_eq!(
            (m.round, m.accepted, m.rejected, m.tokens, m.payload_bytes),
            (3, 15, 1, 4096, 123456)
        );
        assert_eq!(m.rejected_reasons.get("norm-too-large"), Some(&1));
        assert_eq!(
            m.ms,
            PhaseMs {
                train: 900,
                transfer: 40,
                verify: 30,
                apply: 20
            }
        );
        assert_eq!(line.raw.get("extra"), Some(&serde_json::Value::Bool(true)));
    }

    #[test]
    fn rejects_lines_without_the_losses() {
        assert!(parse_line(r#"{"round":1}"#).is_err());
        let null =
            parse_line(r#"{"round":1,"train_loss":null,"val_loss":2.5}"#).expect("null is allowed");
        assert!(
            loss_or_nan(null.metrics.train_loss).is_nan()
                && loss_or_nan(null.metrics.val_loss) == 2.5
        );
        assert!(parse_line("[1,2]").is_err());
        assert!(parse_line("{").is_err());
    }

    #[test]
    fn reads_what_the_coordinator_writes() {
        // The coordinator serializes the same type; a line it writes must read back as itself.
        let m = RoundMetrics {
            round: 7,
            rule: "diloco".into(),
            participants: 2,
            accepted: 2,
            rejected: 0,
            rejected_reasons: Default::default(),
            train_loss: None,
            val_loss: Some(1.25),
            tokens: 10,
            payload_bytes: 20,
            checkpoint: "cc".into(),
            members: Default::default(),
            ms: PhaseMs {
                train: 1,
                transfer: 2,
                verify: 3,
                apply: 4,
            },
            scored: 2,
            score_seed: Some("00000000000000ff".into()),
            unix_ms: 5,
        };
        let text = serde_json::to_string(&m).expect("serializes");
        assert_eq!(parse_line(&text).expect("parses").metrics, m);
    }

    #[test]
    fn tail_returns_only_complete_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.jsonl");
        let mut tail = Tail::new(&path);
        assert!(tail.poll().expect("missing file is fine").is_empty());
        let mut f = File::create(&path).expect("create");
        f.write_all(b"{\"a\":1}\n{\"b\":").expect("write");
        f.flush().expect("flush");
        assert_eq!(tail.poll().expect("poll"), ["{\"a\":1}"]);
        assert!(tail.poll().expect("poll").is_empty());
        f.write_all(b"2}\n\n{\"c\":3}\n").expect("write");
        f.flush().expect("flush");
        assert_eq!(tail.poll().expect("poll"), ["{\"b\":2}", "{\"c\":3}"]);
    }
}
