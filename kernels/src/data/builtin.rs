//! The built-in corpus: text generated from a seed, used when the user gives no corpus (and by
//! `mana demo`). It mixes several distinct kinds of line, each with its own structure, so that a model
//! has something to learn quickly and routed experts have something to specialise on:
//!
//! - arithmetic: `add 17+25=42`, `sub 93-48=45`, `mul 12*7=84`;
//! - key/value recall: `kv k3=v9 k7=v2 k1=v5 k7?v2` (the answer is stated earlier in the line);
//! - English: templated sentences, `the small fox sees a red box.`;
//! - sorting: `sort 5 3 9 1>1 3 5 9`;
//! - reversal: `rev lamp>pmal`;
//! - counting: `count 7 8 9 10 11`.
//!
//! Every line ends with `\n` and is plain ASCII. The same seed always gives the same bytes.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::text::uniform_below;

/// The kinds of line in the built-in corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    /// Two-operand arithmetic on small numbers: `add`, `sub` (non-negative results) and `mul`.
    Arithmetic,
    /// A handful of key/value pairs, then a query for one of the keys and its value.
    Recall,
    /// A templated English sentence.
    English,
    /// A short list of numbers and the same list sorted.
    Sort,
    /// A word and its reversal.
    Reverse,
    /// A run of consecutive numbers.
    Count,
}

impl LineKind {
    /// Every kind, in the order used to draw them.
    pub const ALL: [LineKind; 6] = [
        LineKind::Arithmetic,
        LineKind::Recall,
        LineKind::English,
        LineKind::Sort,
        LineKind::Reverse,
        LineKind::Count,
    ];
}

/// The default size of the built-in corpus: enough for short runs to see little repetition.
pub const DEFAULT_BUILTIN_BYTES: usize = 4 << 20;

const DETERMINERS: [&str; 4] = ["the", "a", "one", "every"];
const ADJECTIVES: [&str; 10] = [
    "small", "red", "old", "quick", "quiet", "green", "tall", "brave", "cold", "bright",
];
const NOUNS: [&str; 12] = [
    "fox", "dog", "bird", "king", "child", "ship", "tree", "river", "box", "farmer", "cat", "star",
];
const VERBS: [&str; 10] = [
    "sees", "finds", "follows", "likes", "carries", "watches", "helps", "calls", "meets", "holds",
];
const PLACES: [&str; 8] = [
    "in the house",
    "by the sea",
    "at night",
    "on the hill",
    "near the road",
    "in the rain",
    "at home",
    "in spring",
];
const WORDS: [&str; 16] = [
    "lamp", "stone", "bread", "water", "garden", "window", "silver", "market", "candle", "mirror",
    "forest", "letter", "harbor", "pocket", "ladder", "thunder",
];

/// Generates `len` bytes of built-in corpus from `seed` (the last line is cut at `len`).
pub fn generate(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = Vec::with_capacity(len + 128);
    let mut line = String::new();
    while text.len() < len {
        let kind = LineKind::ALL[pick(&mut rng, LineKind::ALL.len())];
        line.clear();
        write_line(kind, &mut rng, &mut line);
        text.extend_from_slice(line.as_bytes());
    }
    text.truncate(len);
    text
}

/// Appends one line of `kind` (ending with `\n`) to `out`.
pub fn write_line(kind: LineKind, rng: &mut impl Rng, out: &mut String) {
    use std::fmt::Write;
    // Writing to a String cannot fail, so the fmt::Results below are ignored.
    match kind {
        LineKind::Arithmetic => {
            let a = pick(rng, 100);
            let b = pick(rng, 100);
            let _ = match pick(rng, 3) {
                0 => writeln!(out, "add {a}+{b}={}", a + b),
                1 => {
                    let (x, y) = if a >= b { (a, b) } else { (b, a) };
                    writeln!(out, "sub {x}-{y}={}", x - y)
                }
                _ => {
                    let (x, y) = (pick(rng, 20), pick(rng, 10));
                    writeln!(out, "mul {x}*{y}={}", x * y)
                }
            };
        }
        LineKind::Recall => {
            let pairs = 3 + pick(rng, 4);
            let mut keys: Vec<usize> = Vec::with_capacity(pairs);
            while keys.len() < pairs {
                let k = pick(rng, 10);
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            let values: Vec<usize> = keys.iter().map(|_| pick(rng, 10)).collect();
            out.push_str("kv");
            for (k, v) in keys.iter().zip(&values) {
                let _ = write!(out, " k{k}=v{v}");
            }
            let q = pick(rng, pairs);
            let _ = writeln!(out, " k{}?v{}", keys[q], values[q]);
        }
        LineKind::English => {
            let det = DETERMINERS[pick(rng, DETERMINERS.len())];
            let adj = ADJECTIVES[pick(rng, ADJECTIVES.len())];
            let noun = NOUNS[pick(rng, NOUNS.len())];
            let verb = VERBS[pick(rng, VERBS.len())];
            let adj2 = ADJECTIVES[pick(rng, ADJECTIVES.len())];
            let noun2 = NOUNS[pick(rng, NOUNS.len())];
            let _ = if pick(rng, 2) == 0 {
                writeln!(out, "{det} {adj} {noun} {verb} the {adj2} {noun2}.")
            } else {
                let place = PLACES[pick(rng, PLACES.len())];
                writeln!(out, "{det} {noun} {verb} a {noun2} {place}.")
            };
        }
        LineKind::Sort => {
            let n = 3 + pick(rng, 4);
            let mut xs: Vec<usize> = (0..n).map(|_| pick(rng, 10)).collect();
            out.push_str("sort");
            for x in &xs {
                let _ = write!(out, " {x}");
            }
            xs.sort_unstable();
            out.push('>');
            let sorted: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
            out.push_str(&sorted.join(" "));
            out.push('\n');
        }
        LineKind::Reverse => {
            let word = WORDS[pick(rng, WORDS.len())];
            let reversed: String = word.chars().rev().collect();
            let _ = writeln!(out, "rev {word}>{reversed}");
        }
        LineKind::Count => {
            let start = pick(rng, 90);
            let n = 4 + pick(rng, 4);
            out.push_str("count");
            for x in start..start + n {
                let _ = write!(out, " {x}");
            }
            out.push('\n');
        }
    }
}

/// The kind of a built-in line, told from its opening word (None for text not made by [`write_line`]).
pub fn kind_of(line: &str) -> Option<LineKind> {
    let first = line.split(' ').next()?;
    match first {
        "add" | "sub" | "mul" => Some(LineKind::Arithmetic),
        "kv" => Some(LineKind::Recall),
        "sort" => Some(LineKind::Sort),
        "rev" => Some(LineKind::Reverse),
        "count" => Some(LineKind::Count),
        w if DETERMINERS.contains(&w) => Some(LineKind::English),
        _ => None,
    }
}

/// A built-in line split into a question and its one right answer, for exact-match scoring of a model: the
/// model gets `prompt` and must continue with exactly `answer` and then a newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task<'a> {
    /// The kind of line.
    pub kind: LineKind,
    /// The line up to the answer: `add 17+25=`, `kv k3=v9 k7=v2 k7?`, `sort 5 3 9 1>`, `rev lamp>`, or a
    /// count's first three numbers and a space (`count 7 8 9 `).
    pub prompt: &'a str,
    /// The rest of the line without its newline: `42`, `v2`, `1 3 5 9`, `pmal`, `10 11`.
    pub answer: &'a str,
}

/// The exact-match task of a built-in line (with or without its newline), or `None` for English (which has
/// no single right continuation) and for text not made by [`write_line`].
pub fn task_of(line: &str) -> Option<Task<'_>> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let kind = kind_of(line)?;
    let cut = match kind {
        LineKind::Arithmetic => line.find('=')? + 1,
        LineKind::Recall => line.rfind('?')? + 1,
        LineKind::Sort | LineKind::Reverse => line.find('>')? + 1,
        LineKind::Count => {
            // After the word and three numbers, and the space that follows them.
            let mut spaces = line.match_indices(' ').map(|(i, _)| i);
            spaces.nth(3)? + 1
        }
        LineKind::English => return None,
    };
    let (prompt, answer) = line.split_at(cut);
    (!answer.is_empty()).then_some(Task {
        kind,
        prompt,
        answer,
    })
}

/// A uniform index below `n`.
fn pick(rng: &mut impl Rng, n: usize) -> usize {
    uniform_below(rng, n as u64) as usize
}
