//! `summary.txt`: the run on one screen (rounds and their phases, the losses, the deltas, the verdict on the
//! final shards, the first sample), printed at the end and written to the output directory.

use std::fmt::Write;
use std::time::Duration;

use crate::DemoConfig;
use crate::exact::{QUESTIONS_PER_KIND, Scores};
use crate::manifests::Comparison;
use crate::metrics::RoundMetrics;
use crate::output::OutDir;
use crate::progress::{self, human_bytes};
use crate::rounds::Rounds;
use crate::sample::{self, Sample};
use crate::single::SingleNode;

/// The exact-match scores of the network's final model and, when trained, of the single-node comparison.
pub struct Answers {
    /// The network's exported model.
    pub network: Scores,
    /// The full model trained on one node on as many tokens.
    pub single: Option<SingleNode>,
}

/// `bytes` over `tokens`, and how many times less that is than the all-reduce reference (`crate::traffic`):
/// "0.71 B/token, 8326x less than the all-reduce" (the ratio left out when it cannot be said: no byte, or one
/// node, which would send nothing either way).
fn per_token_against_allreduce(cfg: &DemoConfig, bytes: u64, tokens: u64) -> String {
    let ours = progress::per_token(bytes, tokens);
    match crate::traffic::allreduce_per_token(&cfg.rule, cfg.inner_steps, cfg.nodes) {
        Some(reference) if tokens > 0 && bytes > 0 && reference > 0.0 => format!(
            "{ours}, {:.0}x less than the all-reduce",
            reference * tokens as f64 / bytes as f64
        ),
        _ => ours,
    }
}

/// The one-screen summary.
pub fn summary(
    cfg: &DemoConfig,
    out: &OutDir,
    rounds: &Rounds,
    comparison: &Comparison,
    samples: &[Sample],
    answers: Option<&Answers>,
    elapsed: Duration,
) -> String {
    let m = &rounds.metrics;
    let (Some(first), Some(last)) = (m.first(), m.last()) else {
        // The run ends in an error before this when no round was committed.
        return format!(
            "mana demo: no round was committed (outputs in {})",
            out.root.display()
        );
    };
    let n = m.len() as f64;
    let mean = |f: fn(&RoundMetrics) -> u64| m.iter().map(f).sum::<u64>() as f64 / n / 1000.0;
    let wire: u64 = m.iter().map(|r| r.payload_bytes).sum();
    let tokens: u64 = m.iter().map(|r| r.tokens).sum();
    let accepted: u64 = m.iter().map(|r| r.accepted as u64).sum();
    let rejected: u64 = m.iter().map(|r| r.rejected as u64).sum();
    let timed: Vec<f64> = rounds
        .secs
        .iter()
        .copied()
        .skip(1)
        .filter(|s| *s > 0.0)
        .collect();
    let per_round = if timed.is_empty() {
        String::new()
    } else {
        format!(
            ", {:.1} s per round after the first",
            timed.iter().sum::<f64>() / timed.len() as f64
        )
    };
    let h = cfg
        .inner_steps
        .map_or_else(String::new, |h| format!(", H = {h}"));
    let codec = if cfg.codec_flags.is_empty() {
        String::new()
    } else {
        format!(", codec {}", cfg.codec_flags.join(" "))
    };
    // Writing to a String cannot fail; `let _ =` keeps the code free of unwraps.
    let mut s = String::new();
    let _ = writeln!(
        s,
        "mana demo: {} nodes, a coordinator, an evaluator and a bootstrap on loopback, rule {}{h}{codec}, finished in {}",
        cfg.nodes,
        cfg.rule,
        clock(elapsed)
    );
    let _ = writeln!(
        s,
        "rounds    {} committed (first round {:.1} s{per_round}); phases on average: train {:.1} s, judge and apply {:.1} s (the shards' judges fetch, check, score and apply the deltas)",
        m.len(),
        rounds.secs.first().copied().unwrap_or(0.0),
        mean(|r| r.ms.train),
        mean(|r| r.ms.apply),
    );
    let _ = writeln!(
        s,
        "loss      train {} -> {}, validation {} -> {} (round {} -> {})",
        progress::loss(first.train_loss),
        progress::loss(last.train_loss),
        progress::loss(first.val_loss),
        progress::loss(last.val_loss),
        first.round,
        last.round
    );
    let _ = writeln!(
        s,
        "deltas    {accepted} accepted, {rejected} rejected; {} of payloads ({})",
        human_bytes(wire),
        per_token_against_allreduce(cfg, wire, tokens),
    );
    if let (Some(sent), Some(received)) = (rounds.nodes_sent, rounds.nodes_received) {
        let _ = writeln!(
            s,
            "traffic   the training nodes sent {} ({}) and received {} ({}; their first download of the model included)",
            human_bytes(sent),
            per_token_against_allreduce(cfg, sent, tokens),
            human_bytes(received),
            per_token_against_allreduce(cfg, received, tokens),
        );
    }
    if let Some(reference) =
        crate::traffic::allreduce_per_token(&cfg.rule, cfg.inner_steps, cfg.nodes)
            .filter(|r| *r > 0.0)
    {
        let _ = writeln!(
            s,
            "          (the all-reduce: an f32 ring all-reduce of the full model's gradient among the {} nodes at every optimizer step, {reference:.0} B/token)",
            cfg.nodes
        );
    }
    if !rounds.nodes_lost.is_empty() {
        let _ = writeln!(
            s,
            "lost      {} stopped during the run (see their logs)",
            rounds.nodes_lost.join(", ")
        );
    }
    if let Some(chaos) = &rounds.chaos {
        let _ = writeln!(s, "{chaos}");
        let _ = writeln!(
            s,
            "          training went on: {} rounds committed, {accepted} deltas accepted, loss {} -> {}",
            m.len(),
            progress::loss(first.val_loss.or(first.train_loss)),
            progress::loss(last.val_loss.or(last.train_loss))
        );
    }
    let verdict = comparison
        .text
        .lines()
        .find(|l| l.starts_with("verdict:"))
        .unwrap_or("verdict: -");
    let _ = writeln!(s, "manifests {}", verdict.trim_start_matches("verdict: "));
    if let Some(a) = answers {
        let _ = writeln!(
            s,
            "answers   exact, of {} questions per kind: network {}",
            QUESTIONS_PER_KIND,
            a.network.line()
        );
        if let Some(one) = &a.single {
            let _ = writeln!(
                s,
                "          one node, full model, {} steps on the same {} tokens (validation {}): {}",
                one.steps,
                one.tokens,
                progress::loss(Some(one.val_loss)),
                one.scores.line()
            );
        }
    }
    if let Some(sample) = samples.first() {
        let _ = writeln!(s, "sample    {:?}", sample::first_line(sample));
    }
    let _ = write!(
        s,
        "outputs   {}: metrics.jsonl loss.svg manifests.txt sample.txt summary.txt, logs/, final-model/",
        out.root.display()
    );
    s
}

/// `1m 05s` / `42.0 s`.
fn clock(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_naturally() {
        assert_eq!(clock(Duration::from_millis(42_040)), "42.0 s");
        assert_eq!(clock(Duration::from_secs(65)), "1m 05s");
    }
}
