//! What makes a run that run: its update rule, the seed of its initial weights, its model, its corpus and its
//! coordinator's key. They are stored with the run at its start; a coordinator resumed from the same data
//! directory with any of them changed is refused, naming each change, unless the operator says the change
//! is meant (`--accept-changed-settings`). Without this, a changed `--rule` or `--seed` on resume was
//! silently ignored (the saved state machine kept the old ones, and so did the metrics).

use mana_engine::round::RunSpec;
use mana_protocol::{ContentHash, PublicKey, UpdateRule};
use serde::{Deserialize, Serialize};

/// The store record (kind `RoundState`) holding the run's identity.
pub const IDENTITY_KEY: &[u8] = b"coordinator/run";

/// A run's fixed settings, as stored (JSON) and compared on resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// `sync` or `diloco`.
    pub rule: String,
    /// Seed of the initial weights.
    pub seed: u64,
    /// The model's shape (its configuration, as text).
    pub model: String,
    /// blake3 (hex) of the corpus's training and validation bytes.
    pub corpus: String,
    /// The coordinator's public key (hex).
    pub coordinator: String,
}

impl RunIdentity {
    /// The identity of a run of `spec` under `rule` on the corpus hashing to `corpus`
    /// ([`crate::roles::common::corpus_hash`], the hash every round announces), coordinated by `key`.
    pub fn of(
        spec: &RunSpec,
        rule: UpdateRule,
        corpus: ContentHash,
        key: &PublicKey,
    ) -> RunIdentity {
        RunIdentity {
            rule: match rule {
                UpdateRule::Sync => "sync".into(),
                UpdateRule::Diloco => "diloco".into(),
            },
            seed: spec.init_seed,
            model: format!("{:?}", spec.model),
            corpus: corpus.to_string(),
            coordinator: hex::encode(key.0),
        }
    }

    /// Each setting that differs from `saved`: its name, the saved value and this one.
    pub fn changes_from(&self, saved: &RunIdentity) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut check = |name, a: String, b: String| {
            if a != b {
                out.push((name, a, b));
            }
        };
        check("rule", saved.rule.clone(), self.rule.clone());
        check("seed", saved.seed.to_string(), self.seed.to_string());
        check("model", saved.model.clone(), self.model.clone());
        check("corpus (hash)", short(&saved.corpus), short(&self.corpus));
        check(
            "coordinator key",
            short(&saved.coordinator),
            short(&self.coordinator),
        );
        out
    }
}

fn short(hex: &str) -> String {
    hex.chars().take(16).collect()
}

/// The one-line refusal for `changes`.
pub fn describe(changes: &[(&'static str, String, String)]) -> String {
    changes
        .iter()
        .map(|(name, saved, now)| format!("{name} was {saved}, now {now}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::common::corpus_hash;
    use mana_kernels::data::{Split, TextDataset};

    #[test]
    fn every_fixed_setting_is_named_when_it_changes() {
        let spec = RunSpec::tiny();
        let text =
            "a run's corpus, long enough to split into training and validation parts. ".repeat(200);
        let data = TextDataset::new(text.as_bytes(), Split::default()).expect("dataset");
        let key = PublicKey([7; 32]);
        let base = RunIdentity::of(&spec, UpdateRule::Sync, corpus_hash(&data), &key);
        assert!(base.changes_from(&base).is_empty());
        let mut other_spec = spec.clone();
        other_spec.init_seed += 1;
        let other_text = format!("{text}!");
        let other_data =
            TextDataset::new(other_text.as_bytes(), Split::default()).expect("dataset");
        let changed = RunIdentity::of(
            &other_spec,
            UpdateRule::Diloco,
            corpus_hash(&other_data),
            &PublicKey([8; 32]),
        );
        let names: Vec<&str> = changed.changes_from(&base).iter().map(|c| c.0).collect();
        assert_eq!(names, ["rule", "seed", "corpus (hash)", "coordinator key"]);
        let line = describe(&changed.changes_from(&base));
        assert!(
            line.starts_with("rule was sync, now diloco; seed was "),
            "{line}"
        );
    }
}
