//! The comparison the summary prints beside the network's answers: the full model trained on one node on as
//! many tokens as the network trained on, the same batch per step and the same number of steps
//! ([`mana_engine::round::full_model_baseline`]), in this process once the network has stopped. It says
//! what training across the network cost (or saved) against one machine doing all the work.

use mana_engine::coordinator::default_inner_steps;
use mana_engine::round::{RunSpec, SimConfig, full_model_baseline};
use mana_node::roles::common::{DataSource, load_dataset};

use crate::DemoError;
use crate::exact::{Question, Scores, score_trainer};

/// What the single node reached.
#[derive(Debug, Clone)]
pub struct SingleNode {
    /// Optimizer steps it took.
    pub steps: u64,
    /// Tokens it trained on.
    pub tokens: u64,
    /// Its validation loss at the end.
    pub val_loss: f32,
    /// Its exact-match scores on the same questions as the network's model.
    pub scores: Scores,
}

/// Trains the full model on one node for `rounds` rounds' worth of the demo's network (`nodes` nodes, its
/// rule and H, its seed, the built-in corpus), then asks it `questions`.
pub fn train_and_score(
    rule: &str,
    inner_steps: Option<u32>,
    seed: Option<u64>,
    nodes: usize,
    rounds: u64,
    questions: &[Question],
) -> Result<SingleNode, DemoError> {
    let rule = crate::traffic::rule_of(rule);
    let mut spec = RunSpec::tiny();
    if let Some(seed) = seed {
        spec.init_seed = seed;
    }
    let data = load_dataset(&DataSource::default())
        .map_err(|e| DemoError::Config(format!("the built-in corpus: {e}")))?;
    let h = inner_steps.unwrap_or_else(|| default_inner_steps(rule));
    let mut cfg = SimConfig::new(&spec, rule, h, rounds);
    cfg.nodes = nodes.max(1);
    cfg.eval_batches = 4;
    let (report, mut trainer) = full_model_baseline(&spec, &data, &cfg)
        .map_err(|e| DemoError::Config(format!("training the single-node comparison: {e}")))?;
    let scores = score_trainer(&mut trainer, questions)?;
    Ok(SingleNode {
        steps: report.steps,
        tokens: report.tokens,
        val_loss: report.val_loss,
        scores,
    })
}
