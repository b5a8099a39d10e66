//! The built-in corpus: deterministic in its seed, every kind of line present, and every line correct (the
//! sums add up, the recalled value is the one stated, the sorted list is sorted).

use std::collections::HashMap;

use mana_kernels::data::builtin::{self, LineKind};
use mana_kernels::data::{Split, TextDataset};

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = builtin::generate(1, 100_000);
    assert_eq!(a.len(), 100_000);
    assert_eq!(a, builtin::generate(1, 100_000));
    assert_ne!(a, builtin::generate(2, 100_000));
    // A shorter corpus is a prefix of a longer one from the same seed.
    assert_eq!(&a[..5000], &builtin::generate(1, 5000)[..]);
}

#[test]
fn every_kind_appears_in_fair_shares_and_every_line_is_ascii() {
    let text = builtin::generate(3, 200_000);
    assert!(
        text.iter()
            .all(|b| b.is_ascii() && (*b == b'\n' || !b.is_ascii_control()))
    );
    let s = std::str::from_utf8(&text).expect("ASCII is UTF-8");
    let mut counts: HashMap<LineKind, usize> = HashMap::new();
    let lines: Vec<&str> = s.lines().collect();
    for line in &lines[..lines.len() - 1] {
        let kind = builtin::kind_of(line).unwrap_or_else(|| panic!("unknown line {line:?}"));
        *counts.entry(kind).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    for kind in LineKind::ALL {
        let n = counts.get(&kind).copied().unwrap_or(0);
        assert!(n * 10 > total, "{kind:?} has only {n} of {total} lines");
    }
}

fn check_line(line: &str) {
    let num = |s: &str| {
        s.parse::<i64>()
            .unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}"))
    };
    let (word, rest) = line.split_once(' ').expect("lines have words");
    match word {
        "add" | "sub" | "mul" => {
            let (lhs, rhs) = rest.split_once('=').expect("arithmetic has =");
            let op = match word {
                "add" => '+',
                "sub" => '-',
                _ => '*',
            };
            let (a, b) = lhs.split_once(op).expect("arithmetic has its operator");
            let want = match op {
                '+' => num(a) + num(b),
                '-' => num(a) - num(b),
                _ => num(a) * num(b),
            };
            assert_eq!(num(rhs), want, "{line}");
            assert!(want >= 0);
        }
        "kv" => {
            let parts: Vec<&str> = rest.split(' ').collect();
            let (query, pairs) = parts.split_last().expect("recall has a query");
            let map: HashMap<&str, &str> = pairs
                .iter()
                .map(|p| p.split_once('=').expect("pairs have ="))
                .collect();
            assert_eq!(map.len(), pairs.len(), "keys are distinct in {line}");
            let (k, v) = query.split_once('?').expect("query has ?");
            assert_eq!(map.get(k), Some(&v), "{line}");
        }
        "sort" => {
            let (list, sorted) = rest.split_once('>').expect("sort has >");
            let mut xs: Vec<i64> = list.split(' ').map(num).collect();
            xs.sort_unstable();
            let ys: Vec<i64> = sorted.split(' ').map(num).collect();
            assert_eq!(xs, ys, "{line}");
        }
        "rev" => {
            let (w, r) = rest.split_once('>').expect("rev has >");
            assert_eq!(w.chars().rev().collect::<String>(), r, "{line}");
        }
        "count" => {
            let xs: Vec<i64> = rest.split(' ').map(num).collect();
            assert!(xs.windows(2).all(|w| w[1] == w[0] + 1), "{line}");
        }
        _ => assert!(
            line.ends_with('.'),
            "English lines end with a full stop: {line}"
        ),
    }
}

#[test]
fn every_line_is_correct() {
    let text = builtin::generate(11, 300_000);
    let s = std::str::from_utf8(&text).expect("ASCII is UTF-8");
    let lines: Vec<&str> = s.lines().collect();
    // The last line may be cut short by the length limit.
    for line in &lines[..lines.len() - 1] {
        check_line(line);
    }
}

#[test]
fn the_builtin_corpus_feeds_a_dataset() {
    let text = builtin::generate(5, builtin::DEFAULT_BUILTIN_BYTES);
    let ds = TextDataset::new(&text, Split::default()).expect("valid split");
    let b = ds.batch(5, 0, 0, 4, 128).expect("batch");
    assert!(b.tokens.iter().all(|&t| t < 128), "ASCII tokens");
    assert!(ds.validation_batch(0, 4, 128).is_ok());
}

#[test]
fn every_kind_but_english_splits_into_a_prompt_and_its_answer() {
    let cases = [
        ("add 17+25=42\n", LineKind::Arithmetic, "add 17+25=", "42"),
        (
            "kv k3=v9 k7=v2 k7?v2",
            LineKind::Recall,
            "kv k3=v9 k7=v2 k7?",
            "v2",
        ),
        (
            "sort 5 3 9 1>1 3 5 9\n",
            LineKind::Sort,
            "sort 5 3 9 1>",
            "1 3 5 9",
        ),
        ("rev lamp>pmal\n", LineKind::Reverse, "rev lamp>", "pmal"),
        (
            "count 7 8 9 10 11\n",
            LineKind::Count,
            "count 7 8 9 ",
            "10 11",
        ),
    ];
    for (line, kind, prompt, answer) in cases {
        let t = builtin::task_of(line).expect("a task");
        assert_eq!(
            (t.kind, t.prompt, t.answer),
            (kind, prompt, answer),
            "{line}"
        );
    }
    for line in [
        "the small fox sees the red box.\n",
        "count 1 2 3",
        "add 1+2=",
        "hello",
        "",
    ] {
        assert_eq!(builtin::task_of(line), None, "{line}");
    }
    // Every generated line of a scorable kind splits, and prompt + answer is the line.
    let text = String::from_utf8(builtin::generate(5, 20_000)).expect("ascii");
    let mut seen = 0;
    for line in text.lines().take(500) {
        match builtin::task_of(line) {
            Some(t) => {
                assert_eq!(format!("{}{}", t.prompt, t.answer), line);
                seen += 1;
            }
            None => assert_eq!(builtin::kind_of(line), Some(LineKind::English), "{line}"),
        }
    }
    assert!(seen > 300, "{seen}");
}
