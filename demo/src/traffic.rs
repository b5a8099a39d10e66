//! What the demo's deltas cost on the wire, against the reference every traffic figure of mana uses: a ring
//! all-reduce of the full model's f32 gradient among the same nodes at every optimizer step
//! (`mana_engine::round::allreduce_bytes`, the same as `mana simulate`'s).

use mana_engine::coordinator::default_inner_steps;
use mana_engine::round::{RunSpec, allreduce_bytes};
use mana_protocol::UpdateRule;

/// The demo's rule by name (`sync` or `diloco`).
pub fn rule_of(name: &str) -> UpdateRule {
    match name {
        "diloco" => UpdateRule::Diloco,
        _ => UpdateRule::Sync,
    }
}

/// Bytes per trained token that the all-reduce reference sends for `nodes` nodes training the demo's
/// model under `rule` with H = `inner_steps` (the coordinator's default when `None`): one all-reduce per
/// optimizer step, i.e. per round for sync (H micro-batches a step) and per inner step for diloco. `None`
/// if the model's size cannot be computed or no token is trained.
pub fn allreduce_per_token(rule: &str, inner_steps: Option<u32>, nodes: usize) -> Option<f64> {
    let rule = rule_of(rule);
    let spec = RunSpec::tiny();
    let params = spec.params().ok()?;
    let h = u64::from(inner_steps.unwrap_or_else(|| default_inner_steps(rule)));
    let steps = match rule {
        UpdateRule::Sync => 1,
        UpdateRule::Diloco => h,
    };
    let nodes = nodes as u64;
    let tokens = nodes * h * u64::from(spec.hyper(rule).batch_tokens);
    (tokens > 0).then(|| allreduce_bytes(params, nodes, steps) as f64 / tokens as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_is_an_all_reduce_per_optimizer_step() {
        let params = RunSpec::tiny().params().expect("the tiny model's size") as f64;
        let b = f64::from(RunSpec::tiny().hyper(UpdateRule::Sync).batch_tokens);
        // 4 nodes, diloco H = 50: 50 all-reduces of 8 · 3 · P bytes over 4 · 50 · B tokens.
        let diloco = allreduce_per_token("diloco", Some(50), 4).expect("a reference");
        assert!((diloco - 8.0 * 3.0 * params / (4.0 * b)).abs() < 1e-6 * diloco);
        // Sync with 5 micro-batches a round: one all-reduce over 4 · 5 · B tokens.
        let sync = allreduce_per_token("sync", Some(5), 4).expect("a reference");
        assert!((sync - diloco / 5.0).abs() < 1e-6 * sync);
        // One node alone sends nothing.
        assert_eq!(allreduce_per_token("diloco", None, 1), Some(0.0));
    }
}
