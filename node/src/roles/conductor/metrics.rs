//! One JSON line per committed round (`--metrics PATH`), the format `mana demo` and the figures read:
//!
//! ```json
//! {"round":3,"rule":"sync","participants":4,"accepted":15,"rejected":1,
//!  "rejected_reasons":{"norm-too-large":1},"train_loss":2.9,"val_loss":2.8,"tokens":4096,
//!  "payload_bytes":123456,"checkpoint":"<manifest hash hex>",
//!  "ms":{"train":812,"transfer":40,"verify":95,"apply":30},"scored":16,"score_seed":"9f1c...",
//!  "members":{"<key hex>":{"accepted":4,"refused":0},"<key hex>":{"accepted":3,"refused":1,
//!  "refused_reasons":{"norm-too-large":1}}},"unix_ms":1764340000000}
//! ```
//!
//! Wall times, measured by the coordinator: `train` from the announcement to the last delta announcement
//! (the participants' training, encoding and publishing), `apply` from the call for judgments to the last
//! result taken (the judges fetching, checking, scoring and applying the deltas and signing, and the
//! coordinator fetching the new shards). `transfer` and `verify` are 0 since protocol 8: the coordinator
//! fetches and scores no payload; each judge reports its own times in its status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Wall time of each part of a round, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseMs {
    /// Announcement to the last delta announcement.
    pub train: u64,
    /// Fetching delta payloads (0 since protocol 8: the judges fetch them).
    pub transfer: u64,
    /// Decoding, norm checks and scoring (0 since protocol 8: the judges do it).
    pub verify: u64,
    /// Computing and hosting the new shards.
    pub apply: u64,
}

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The committed round.
    pub round: u64,
    /// `sync` or `diloco`.
    #[serde(default)]
    pub rule: String,
    /// Participants announced.
    #[serde(default)]
    pub participants: usize,
    /// Deltas applied.
    #[serde(default)]
    pub accepted: usize,
    /// Deltas refused.
    #[serde(default)]
    pub rejected: usize,
    /// Refusals by reason code.
    #[serde(default)]
    pub rejected_reasons: BTreeMap<String, u64>,
    /// Mean training loss the participants reported (at the round's base weights).
    pub train_loss: Option<f32>,
    /// Validation loss of the committed checkpoint on the run's fixed validation batches.
    pub val_loss: Option<f32>,
    /// Tokens the participants trained on.
    #[serde(default)]
    pub tokens: u64,
    /// Bytes of delta payloads announced in the round.
    #[serde(default)]
    pub payload_bytes: u64,
    /// Hash (hex) of the committed checkpoint manifest.
    #[serde(default)]
    pub checkpoint: String,
    /// Wall time per part of the round.
    #[serde(default)]
    pub ms: PhaseMs,
    /// Deltas scored (the scores the commit publishes).
    #[serde(default)]
    pub scored: u64,
    /// The seed of the round's score batches (hex), which anyone can recompute from the commit.
    #[serde(default)]
    pub score_seed: Option<String>,
    /// Each sender's deltas of the round (by public key, hex): accepted and refused, with reasons.
    #[serde(default)]
    pub members: BTreeMap<String, MemberRound>,
    /// When the line was written.
    #[serde(default)]
    pub unix_ms: u64,
}

/// One member's deltas in one round's metrics line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberRound {
    /// Deltas applied.
    pub accepted: u64,
    /// Deltas refused.
    pub refused: u64,
    /// Refusals by reason code (absent when none).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refused_reasons: BTreeMap<String, u64>,
}

/// The round of the last line of the metrics file at `path`, read from its last 64 KiB; `None` when the file
/// is missing, empty or its last line is not a metrics line. A commit done again after a crash asks it, so
/// that its round is not written twice.
pub fn last_round(path: &std::path::Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 * 1024;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut tail = Vec::new();
    file.take(TAIL).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    #[derive(Deserialize)]
    struct Round {
        round: u64,
    }
    serde_json::from_str::<Round>(line).ok().map(|r| r.round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_round_reads_the_last_line_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.jsonl");
        assert_eq!(last_round(&path), None, "no file");
        let filler = "x".repeat(100_000);
        std::fs::write(
            &path,
            format!("{{\"round\":1,\"note\":\"{filler}\"}}\n{{\"round\":2,\"rule\":\"sync\"}}\n"),
        )
        .expect("write");
        assert_eq!(last_round(&path), Some(2));
        std::fs::write(&path, "{\"round\":3}\nnot json\n").expect("write");
        assert_eq!(last_round(&path), None, "a broken last line");
    }
}
