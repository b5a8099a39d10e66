//! The coordinator's per-round metrics (one JSON object per committed round, in the file given to
//! `mana coordinator --metrics`) as the demo reads them: [`RoundMetrics`] is the typed view of the fields it
//! shows, and [`Tail`] follows the file while the coordinator appends to it, returning only complete lines.
//! The demo writes each line on to `<out>/metrics.jsonl` unchanged, plus a few keys of its own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The most bytes one metrics line may have (a line is a few hundred bytes; this bounds a runaway file).
const MAX_LINE_BYTES: usize = 1 << 20;

/// Wall time of a round's phases, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PhaseMs {
    /// Local training on the nodes.
    pub train: u64,
    /// Moving the delta payloads.
    pub transfer: u64,
    /// Verifying them.
    pub verify: u64,
    /// Aggregating and applying them.
    pub apply: u64,
}

/// One committed round, as the coordinator reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RoundMetrics {
    /// The round number.
    pub round: u64,
    /// `sync` or `diloco`.
    #[serde(default)]
    pub rule: String,
    /// Nodes named in the round's announcement.
    #[serde(default)]
    pub participants: u64,
    /// Delta contributions accepted.
    #[serde(default)]
    pub accepted: u64,
    /// Delta contributions rejected.
    #[serde(default)]
    pub rejected: u64,
    /// Rejections by reason.
    #[serde(default)]
    pub rejected_reasons: BTreeMap<String, u64>,
    /// Mean training loss the nodes reported (NaN when the line has none: no accepted delta).
    #[serde(deserialize_with = "nullable_loss")]
    pub train_loss: f64,
    /// Validation loss of the committed model (NaN when the line has none).
    #[serde(deserialize_with = "nullable_loss")]
    pub val_loss: f64,
    /// Tokens trained on in the round, all nodes together.
    #[serde(default)]
    pub tokens: u64,
    /// Bytes of delta payloads the round moved.
    #[serde(default)]
    pub payload_bytes: u64,
    /// The committed checkpoint manifest's hash (hex).
    #[serde(default)]
    pub checkpoint: String,
    /// Wall time of the round's phases.
    #[serde(default)]
    pub ms: PhaseMs,
    /// When the round was committed, unix milliseconds.
    #[serde(default)]
    pub unix_ms: u64,
}

/// A loss that the coordinator writes as `null` when it has none: NaN, which the plot skips and the
/// progress line shows as `-`.
fn nullable_loss<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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
pub fn parse_line(text: &str) -> anyhow::Result<Line> {
    let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).context("not a JSON object")?;
    let metrics = RoundMetrics::deserialize(serde_json::Value::Object(raw.clone())).context("missing or mistyped fields")?;
    Ok(Line { metrics, raw })
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
        Tail { path: path.into(), offset: 0, partial: Vec::new() }
    }

    /// The file followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last call (none if the file does not exist yet).
    pub fn poll(&mut self) -> anyhow::Result<Vec<String>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        file.seek(SeekFrom::Start(self.offset)).with_context(|| format!("reading {}", self.path.display()))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).with_context(|| format!("reading {}", self.path.display()))?;
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
        anyhow::ensure!(
            self.partial.len() <= MAX_LINE_BYTES,
            "{} has a line longer than {MAX_LINE_BYTES} bytes",
            self.path.display()
        );
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
        assert_eq!((m.round, m.accepted, m.rejected, m.tokens, m.payload_bytes), (3, 15, 1, 4096, 123456));
        assert_eq!(m.rejected_reasons.get("norm-too-large"), Some(&1));
        assert_eq!(m.ms, PhaseMs { train: 900, transfer: 40, verify: 30, apply: 20 });
        assert_eq!(line.raw.get("extra"), Some(&serde_json::Value::Bool(true)));
    }

    #[test]
    fn rejects_lines_without_the_losses() {
        assert!(parse_line(r#"{"round":1}"#).is_err());
        let null = parse_line(r#"{"round":1,"train_loss":null,"val_loss":2.5}"#).expect("null is allowed");
        assert!(null.metrics.train_loss.is_nan() && null.metrics.val_loss == 2.5);
        assert!(parse_line("[1,2]").is_err());
        assert!(parse_line("{").is_err());
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
