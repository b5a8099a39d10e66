//! The update rule as a flag value and a TOML value: one enum for every command that takes `--rule`
//! (`coordinator`, `simulate`), mapped onto the protocol's [`UpdateRule`].

use mana_protocol::UpdateRule;
use serde::Deserialize;

/// `--rule sync|diloco`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Synchronous data parallelism: one AdamW step per round on the mean gradient of every node's H
    /// micro-batches.
    #[default]
    Sync,
    /// DiLoCo: H local AdamW steps per round, then an outer Nesterov step on the mean pseudo-gradient.
    Diloco,
}

impl From<Rule> for UpdateRule {
    fn from(rule: Rule) -> UpdateRule {
        match rule {
            Rule::Sync => UpdateRule::Sync,
            Rule::Diloco => UpdateRule::Diloco,
        }
    }
}
