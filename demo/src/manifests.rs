//! `manifests.txt`: after the last round, the evaluator (a mirror of every checkpoint) and each node report the
//! round they hold, the hash of its checkpoint manifest and the hash of every shard it holds. Nodes hold different
//! shards (the trunk and their assigned experts), so their manifests differ by design; what must agree is
//! each shard: every holder of a shard must hold the same bytes, at the same final round. This module
//! compares them and writes the table.

use std::collections::BTreeMap;
use std::fmt::Write;

/// What one process holds at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// `evaluator`, `node-1`...
    pub name: String,
    /// The round it holds (`None`: it reported none).
    pub round: Option<u64>,
    /// Hash (hex) of its checkpoint manifest, if it reports one.
    pub manifest: Option<String>,
    /// (shard name, hash hex) of every shard it holds.
    pub shards: Vec<(String, String)>,
}

/// The outcome of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// True when every holder is at the final round, holds at least one shard, and all holders of each shard
    /// hold the same hash.
    pub agree: bool,
    /// Shards held with more than one hash.
    pub mismatched_shards: Vec<String>,
    /// Holders not at the final round (or reporting nothing).
    pub behind: Vec<String>,
    /// The human-readable table.
    pub text: String,
}

/// Compares the holders against each other and against the final committed round and checkpoint.
pub fn compare(
    final_round: Option<u64>,
    checkpoint: Option<&str>,
    holders: &[Holder],
) -> Comparison {
    // shard -> hash -> holders
    let mut by_shard: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for h in holders {
        for (shard, hash) in &h.shards {
            by_shard
                .entry(shard)
                .or_default()
                .entry(hash)
                .or_default()
                .push(&h.name);
        }
    }
    let mismatched_shards: Vec<String> = by_shard
        .iter()
        .filter(|(_, hashes)| hashes.len() > 1)
        .map(|(shard, _)| (*shard).to_owned())
        .collect();
    let behind: Vec<String> = holders
        .iter()
        .filter(|h| {
            h.shards.is_empty()
                || h.round.is_none()
                || (final_round.is_some() && h.round != final_round)
        })
        .map(|h| h.name.clone())
        .collect();
    let agree = !holders.is_empty() && mismatched_shards.is_empty() && behind.is_empty();

    let mut text = String::new();
    let round = final_round.map_or_else(|| "none".to_owned(), |r| r.to_string());
    let _ = writeln!(text, "final committed round: {round}");
    let _ = writeln!(
        text,
        "committed checkpoint manifest: {}",
        checkpoint.unwrap_or("(not reported)")
    );
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "{:<12} {:>6} {:>7}  manifest hash (of the shards it holds)",
        "process", "round", "shards"
    );
    for h in holders {
        let r = h.round.map_or_else(|| "-".to_owned(), |r| r.to_string());
        let _ = writeln!(
            text,
            "{:<12} {:>6} {:>7}  {}",
            h.name,
            r,
            h.shards.len(),
            h.manifest.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(text);
    let _ = writeln!(text, "{:<16} {:<64}  holders", "shard", "hash (blake3)");
    for (shard, hashes) in &by_shard {
        let flag = if hashes.len() > 1 { "  MISMATCH" } else { "" };
        for (hash, names) in hashes {
            let _ = writeln!(text, "{shard:<16} {hash:<64}  {}{flag}", names.join(" "));
        }
    }
    let _ = writeln!(text);
    if agree {
        let _ = writeln!(
            text,
            "verdict: AGREE: all {} processes hold round {round}, and every holder of each of the {} shards holds identical bytes",
            holders.len(),
            by_shard.len()
        );
    } else {
        let _ = writeln!(text, "verdict: DISAGREE");
        if !mismatched_shards.is_empty() {
            let _ = writeln!(
                text,
                "  shards held with different hashes: {}",
                mismatched_shards.join(", ")
            );
        }
        if !behind.is_empty() {
            let _ = writeln!(
                text,
                "  not at round {round} (or holding nothing): {}",
                behind.join(", ")
            );
        }
    }
    Comparison {
        agree,
        mismatched_shards,
        behind,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str, round: u64, shards: &[(&str, &str)]) -> Holder {
        Holder {
            name: name.into(),
            round: Some(round),
            manifest: Some(format!("m-{name}")),
            shards: shards
                .iter()
                .map(|(s, h)| ((*s).to_owned(), (*h).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn agreeing_holders_of_different_shards_agree() {
        let holders = [
            holder(
                "coordinator",
                5,
                &[("trunk", "t"), ("expert/0/0", "a"), ("expert/0/1", "b")],
            ),
            holder("node-1", 5, &[("trunk", "t"), ("expert/0/0", "a")]),
            holder("node-2", 5, &[("trunk", "t"), ("expert/0/1", "b")]),
        ];
        let c = compare(Some(5), Some("ck"), &holders);
        assert!(c.agree, "{}", c.text);
        assert!(
            c.text.contains("verdict: AGREE")
                && c.text.contains("node-1 node-2")
                && c.text.contains("ck")
        );
    }

    #[test]
    fn a_different_hash_or_a_lagging_holder_disagrees() {
        let holders = [
            holder("coordinator", 5, &[("trunk", "t")]),
            holder("node-1", 5, &[("trunk", "x")]),
        ];
        let c = compare(Some(5), None, &holders);
        assert!(!c.agree);
        assert_eq!(c.mismatched_shards, ["trunk"]);
        assert!(c.text.contains("MISMATCH") && c.text.contains("DISAGREE"));

        let holders = [
            holder("coordinator", 5, &[("trunk", "t")]),
            holder("node-1", 4, &[("trunk", "t")]),
        ];
        let c = compare(Some(5), None, &holders);
        assert_eq!(
            (c.agree, c.behind.as_slice()),
            (false, ["node-1".to_owned()].as_slice())
        );

        let empty = Holder {
            name: "node-2".into(),
            round: None,
            manifest: None,
            shards: vec![],
        };
        assert!(!compare(Some(5), None, &[empty]).agree);
        assert!(!compare(Some(5), None, &[]).agree);
    }
}
