//! Exact-match scores: how many of the built-in corpus's questions a model answers exactly, per kind of line,
//! so that `summary.txt` says in numbers whether the network's model learned (next to the same score of the
//! full model trained on one node on as many tokens).
//!
//! The questions come from a built-in corpus generated from another seed than the run's ([`QUESTION_SEED`]).
//! Recall and sorting lines are drawn from so many possibilities that these are new to the model; the
//! corpus holds every reversal (16 words) and counting line (360) and most sums many times over, so there the
//! score says whether the model learned the corpus, not whether it generalizes. Each question is a line cut
//! before its answer ([`builtin::task_of`]); the model continues it greedily and is right when it writes
//! exactly the answer and then a newline.

use std::collections::BTreeMap;
use std::path::Path;

use mana_kernels::CpuBackend;
use mana_kernels::data::builtin::{self, LineKind};
use mana_kernels::generate::{self, CachedModel, GenerateConfig, Sampling};
use mana_kernels::train::Trainer;

use crate::DemoError;

/// Questions asked per kind of line.
pub const QUESTIONS_PER_KIND: usize = 25;
/// The built-in corpus seed the questions are drawn from (the demo trains on seed 1 unless told otherwise).
pub const QUESTION_SEED: u64 = 0x5c07e;

/// The kinds scored, in the order they are reported (English has no single right answer).
pub const SCORED: [LineKind; 5] = [
    LineKind::Arithmetic,
    LineKind::Recall,
    LineKind::Sort,
    LineKind::Reverse,
    LineKind::Count,
];

/// A short name for a kind of line, as the summary prints it.
pub fn kind_name(kind: LineKind) -> &'static str {
    match kind {
        LineKind::Arithmetic => "arithmetic",
        LineKind::Recall => "recall",
        LineKind::English => "english",
        LineKind::Sort => "sorting",
        LineKind::Reverse => "reversal",
        LineKind::Count => "counting",
    }
}

/// One question: the prompt and its one right answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// What kind of line it was cut from.
    pub kind: LineKind,
    /// The line up to the answer.
    pub prompt: String,
    /// The answer, without the newline.
    pub answer: String,
}

/// The first [`QUESTIONS_PER_KIND`] questions of each scored kind in the built-in corpus of `seed`, in corpus
/// order.
pub fn questions(seed: u64) -> Vec<Question> {
    let text = builtin::generate(seed, 1 << 18);
    let mut per_kind: BTreeMap<u8, usize> = BTreeMap::new();
    let mut out = Vec::new();
    // The last line may be cut short: it is not used.
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    for raw in &lines[..lines.len().saturating_sub(1)] {
        let Ok(line) = std::str::from_utf8(raw) else {
            continue;
        };
        let Some(task) = builtin::task_of(line) else {
            continue;
        };
        let n = per_kind.entry(task.kind as u8).or_default();
        if *n >= QUESTIONS_PER_KIND {
            continue;
        }
        *n += 1;
        out.push(Question {
            kind: task.kind,
            prompt: task.prompt.to_owned(),
            answer: task.answer.to_owned(),
        });
    }
    out
}

/// Right answers out of questions asked, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scores {
    /// (right, asked) per kind, in [`SCORED`] order.
    pub by_kind: Vec<(LineKind, usize, usize)>,
}

impl Scores {
    /// All kinds together: (right, asked).
    pub fn total(&self) -> (usize, usize) {
        self.by_kind
            .iter()
            .fold((0, 0), |(r, a), (_, right, asked)| (r + right, a + asked))
    }

    /// One line: `arithmetic 3/25, recall 0/25, ...`.
    pub fn line(&self) -> String {
        let (right, asked) = self.total();
        let parts: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, r, a)| format!("{} {r}/{a}", kind_name(*k)))
            .collect();
        format!("{} (all {right}/{asked})", parts.join(", "))
    }
}

/// Asks `model` every question greedily and counts the exact answers per kind.
pub fn score_trainer(trainer: &mut Trainer, questions: &[Question]) -> Result<Scores, DemoError> {
    let mut model = CachedModel::new(trainer.model_mut());
    let mut counts: BTreeMap<u8, (usize, usize)> = BTreeMap::new();
    for q in questions {
        let prompt: Vec<u32> = q.prompt.bytes().map(u32::from).collect();
        let config = GenerateConfig {
            // The answer and its newline.
            max_tokens: q.answer.len() + 1,
            sampling: Sampling::Greedy,
            seed: 0,
            speculative: false,
        };
        let generation =
            generate::generate(&mut model, &prompt, &config).map_err(DemoError::Generate)?;
        let written: Vec<u8> = generation
            .tokens
            .iter()
            .map(|&t| u8::try_from(t).unwrap_or(0))
            .collect();
        let right = written == [q.answer.as_bytes(), b"\n"].concat();
        let c = counts.entry(q.kind as u8).or_default();
        c.0 += usize::from(right);
        c.1 += 1;
    }
    Ok(Scores {
        by_kind: SCORED
            .iter()
            .map(|k| {
                let (r, a) = counts.get(&(*k as u8)).copied().unwrap_or((0, 0));
                (*k, r, a)
            })
            .collect(),
    })
}

/// Loads the checkpoint in `dir` and scores it.
pub fn score_checkpoint(dir: &Path, questions: &[Question]) -> Result<Scores, DemoError> {
    let mut trainer =
        Trainer::load(dir, Box::new(CpuBackend::new())).map_err(|source| DemoError::LoadModel {
            dir: dir.to_path_buf(),
            source,
        })?;
    score_trainer(&mut trainer, questions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_cover_every_scored_kind() {
        let qs = questions(QUESTION_SEED);
        for kind in SCORED {
            assert_eq!(
                qs.iter().filter(|q| q.kind == kind).count(),
                QUESTIONS_PER_KIND,
                "{kind:?}"
            );
        }
        assert!(qs.iter().all(|q| !q.answer.is_empty()));
        assert_eq!(qs, questions(QUESTION_SEED));
    }

    #[test]
    fn the_line_says_right_over_asked_per_kind() {
        let s = Scores {
            by_kind: vec![(LineKind::Arithmetic, 3, 25), (LineKind::Count, 25, 25)],
        };
        assert_eq!(s.total(), (28, 50));
        assert_eq!(s.line(), "arithmetic 3/25, counting 25/25 (all 28/50)");
    }
}
