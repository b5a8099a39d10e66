//! Whether a call's norm history is the one the commits published. The norm bounds of a round's verdicts
//! draw on the norms of recently accepted deltas, which the coordinator hands its judges in the call
//! ([`AggregationCall::norms`]). A coordinator that forged them (a made-up norm, a norm moved to another
//! sender, a recent one left out) would move every judge's bounds at once, and the judges would agree on the
//! forged verdicts. Anyone who saw the commits can tell: each commit lists its accepted deltas with their
//! norms, and the round's call and announcement name each delta's sender. [`NormLedger`] rebuilds the history
//! from what it is shown, in the coordinator's order (per shard, oldest first, a commit's shards in order and
//! each shard's deltas in the call's order), and [`NormLedger::check`] compares a new call's records with it.
//!
//! What a check can say depends on what was seen. Records of rounds before the ledger's first are unknown, so
//! a call may carry older records in front of the ones the ledger holds; once the ledger holds every record
//! since the run's first commit, or as many as any call may carry ([`MAX_NORM_HISTORY`]), a shard's records
//! must be exactly the end of the ledger's. A commit missed, or one whose call was missed, breaks the chain:
//! the ledger starts again from the next round, and a call that does not follow the last commit recorded is
//! not checked.
//!
//! How many records of a shard a call carries follows from the call before it: the coordinator keeps the
//! `norm_history` most recent of each shard (published in every call), so after a call that carried `k` of
//! a shard and a commit that accepted `a` more, the next call carries `min(k + a, norm_history)`. A call that
//! cuts a shard's history short of that (or pads it) is caught even when its records are genuine. A
//! coordinator restarted with another setting publishes it: a lowered one cuts at once; a raised one fills
//! as commits come.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use mana_protocol::{
    AggregationCall, CalledDelta, NormRecord, PublicKey, RoundAnnouncement, RoundCommit, ShardId,
};

use super::config::MAX_NORM_HISTORY;
use crate::round::NormSample;

/// What [`NormLedger::check`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum NormCheck {
    /// The call's records are the ones the commits seen published (the end of them, per shard).
    Agrees,
    /// The call does not follow the last commit recorded: nothing to compare.
    Unknown,
    /// The call's records are not what the commits published: what differs.
    Forged(String),
}

/// The accepted norms of the commits seen in an unbroken run, per shard, as the coordinator keeps them.
#[derive(Debug, Clone, Default)]
pub struct NormLedger {
    /// The first round of the unbroken run, and the last recorded (`first > last`: none recorded yet).
    first: Option<u64>,
    last: Option<u64>,
    by_shard: BTreeMap<ShardId, VecDeque<NormSample>>,
    /// Of the last announcements and calls shown, by round ([`KEPT_ROUNDS`]), only what names the senders of
    /// the commits' deltas (gossip may bring the next round's announcement before this round's commit): the
    /// participants' keys, in the announcement's order, and each called shard's deltas.
    participants: BTreeMap<u64, Vec<PublicKey>>,
    calls: BTreeMap<u64, BTreeMap<ShardId, Vec<CalledDelta>>>,
    /// Of the last calls shown, by round: its `norm_history`, and how many records of each shard it carried.
    held: BTreeMap<u64, (u32, BTreeMap<ShardId, usize>)>,
    /// Of the last commits recorded, by round: how many norms of each shard it accepted.
    added: BTreeMap<u64, BTreeMap<ShardId, usize>>,
}

/// Rounds whose announcement and call are kept.
const KEPT_ROUNDS: usize = 3;

/// A committed norm as a call names it: its shard, its sender's key if the sender takes part in the call's
/// round, and the norm.
#[derive(Debug, Clone, Copy)]
struct Named {
    shard: ShardId,
    sender: Option<PublicKey>,
    norm: f32,
}

/// How a check's finding names a record's sender.
fn sender_name(sender: Option<PublicKey>) -> String {
    sender.map_or_else(|| "no participant".to_string(), |k| k.to_string())
}

/// Keeps `value` for `round` in `map`, and the last [`KEPT_ROUNDS`] rounds only.
fn keep<T>(map: &mut BTreeMap<u64, T>, round: u64, value: T) {
    map.insert(round, value);
    while map.len() > KEPT_ROUNDS {
        map.pop_first();
    }
}

impl NormLedger {
    /// An empty ledger.
    pub fn new() -> NormLedger {
        NormLedger::default()
    }

    /// Takes a round's announcement (its commit's senders are its participants).
    pub fn announced(&mut self, announcement: &RoundAnnouncement) {
        let keys = announcement.participants.iter().map(|p| p.node).collect();
        keep(&mut self.participants, announcement.round, keys);
    }

    /// Takes a round's call (its commit's accepted deltas are among its deltas).
    pub fn called(&mut self, call: &AggregationCall) {
        let deltas = call
            .shards
            .iter()
            .map(|part| (part.shard, part.deltas.clone()))
            .collect();
        keep(&mut self.calls, call.round, deltas);
        let mut counts: BTreeMap<ShardId, usize> = BTreeMap::new();
        for r in &call.norms {
            *counts.entry(r.shard).or_default() += 1;
        }
        keep(&mut self.held, call.round, (call.norm_history, counts));
    }

    /// Records the accepted norms of `commit`; starts again after it when it does not follow the last
    /// commit recorded or its deltas' senders are unknown (its call or announcement was not shown).
    pub fn committed(&mut self, commit: &RoundCommit) {
        if self.last == Some(commit.round) {
            // The same round's commit again (republished after a restart): recorded already.
            return;
        }
        let follows = self
            .last
            .is_some_and(|l| l.checked_add(1) == Some(commit.round));
        let records = self.records_of(commit);
        if let Some(records) = &records {
            let mut counts: BTreeMap<ShardId, usize> = BTreeMap::new();
            for r in records {
                *counts.entry(r.shard).or_default() += 1;
            }
            keep(&mut self.added, commit.round, counts);
        }
        match (follows, records) {
            (true, Some(records)) => {
                for r in records {
                    let list = self.by_shard.entry(r.shard).or_default();
                    list.push_back(r);
                    if list.len() > MAX_NORM_HISTORY as usize {
                        list.pop_front();
                    }
                }
                self.last = Some(commit.round);
            }
            // The first commit seen, one after a gap, or one whose senders are unknown: the chain starts at
            // the next round (what came before is unknown). The run's first commit (round 1) has no record
            // before it: a ledger that starts there knows all of them.
            (_, records) => {
                self.by_shard.clear();
                match records {
                    Some(records) if commit.round == 1 => {
                        self.first = Some(1);
                        self.last = Some(1);
                        for r in records {
                            self.by_shard.entry(r.shard).or_default().push_back(r);
                        }
                    }
                    _ => {
                        self.first = Some(commit.round.saturating_add(1));
                        self.last = Some(commit.round);
                    }
                }
            }
        }
    }

    /// The norm records `commit` adds, in the coordinator's order; `None` when a delta's sender is unknown.
    fn records_of(&self, commit: &RoundCommit) -> Option<Vec<NormSample>> {
        if commit.accepted.is_empty() {
            return Some(Vec::new());
        }
        let call = self.calls.get(&commit.round)?;
        let participants = self.participants.get(&commit.round)?;
        let mut records = Vec::new();
        for list in &commit.accepted {
            let called = call.get(&list.shard)?;
            let sender_of = |i: usize| participants.get(called[i].sender as usize);
            // One payload may be called for two senders (a copy re-announced): the accepted one is the one
            // the commit does not refuse, each called delta taken once.
            let refused = |i: usize| {
                sender_of(i).is_some_and(|node| {
                    commit.rejected.iter().any(|r| {
                        r.shard == list.shard
                            && r.node == *node
                            && r.payload_hash == called[i].payload_hash
                    })
                })
            };
            let mut used = std::collections::BTreeSet::new();
            for (hash, norm) in list.deltas.iter().zip(&list.norms) {
                let at = (0..called.len()).find(|i| {
                    called[*i].payload_hash == *hash && !used.contains(i) && !refused(*i)
                })?;
                used.insert(at);
                records.push(NormSample {
                    shard: list.shard,
                    sender: *sender_of(at)?,
                    norm: *norm,
                });
            }
        }
        Some(records)
    }

    /// The norm records an honest coordinator keeping `norm_history` records a shard hands in round
    /// `round`'s call: of each shard, the most recent the commits published, as many as the call before and
    /// the commit since make (see the module doc), each sender named by its index among round `round`'s
    /// participants. `None` when this ledger cannot tell (that call, that commit or the round's announcement
    /// not seen, or fewer records seen than the call must carry).
    pub fn honest_history(&self, round: u64, norm_history: u32) -> Option<Vec<NormRecord>> {
        let before = round.checked_sub(1)?;
        if self.last != Some(before) {
            return None;
        }
        let participants = self.participants.get(&round)?;
        let (_, held) = self.held.get(&before)?;
        let added = self.added.get(&before)?;
        let mut records = Vec::new();
        for (shard, list) in &self.by_shard {
            let total =
                held.get(shard).copied().unwrap_or(0) + added.get(shard).copied().unwrap_or(0);
            let count = total.min(norm_history as usize);
            let start = list.len().checked_sub(count)?;
            records.extend(list.iter().skip(start).map(|s| {
                NormRecord {
                    shard: s.shard,
                    sender: participants
                        .iter()
                        .position(|p| *p == s.sender)
                        .map(|i| i as u32),
                    norm: s.norm,
                }
            }));
        }
        Some(records)
    }

    /// Compares `call`'s norm records with the ones the commits recorded published (see the module doc).
    pub fn check(&self, call: &AggregationCall) -> NormCheck {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return NormCheck::Unknown;
        };
        if last.checked_add(1) != Some(call.round) {
            return NormCheck::Unknown;
        }
        // A record names its sender among the call's round's participants.
        let Some(participants) = self.participants.get(&call.round) else {
            return NormCheck::Unknown;
        };
        let taking_part: BTreeSet<&PublicKey> = participants.iter().collect();
        // The call's records, shard by shard in shard order, as the coordinator lists them.
        let mut called: BTreeMap<ShardId, Vec<Named>> = BTreeMap::new();
        let mut previous: Option<ShardId> = None;
        for r in &call.norms {
            if previous.is_some_and(|p| p > r.shard) {
                return NormCheck::Forged(format!(
                    "the records are not in shard order ({} after {})",
                    r.shard,
                    previous.map(|p| p.to_string()).unwrap_or_default()
                ));
            }
            previous = Some(r.shard);
            let sender = match r.sender {
                None => None,
                Some(i) => match participants.get(i as usize) {
                    Some(key) => Some(*key),
                    None => {
                        return NormCheck::Forged(format!(
                            "{}: a record names participant {i} of {}",
                            r.shard,
                            participants.len()
                        ));
                    }
                },
            };
            called.entry(r.shard).or_default().push(Named {
                shard: r.shard,
                sender,
                norm: r.norm,
            });
        }
        // A committed norm as the call must name it: its sender only if that sender takes part.
        let as_called = |s: &NormSample| Named {
            shard: s.shard,
            sender: taking_part.contains(&s.sender).then_some(s.sender),
            norm: s.norm,
        };
        let same = |a: &Named, b: &Named| {
            a.shard == b.shard && a.sender == b.sender && a.norm.to_bits() == b.norm.to_bits()
        };
        let empty = VecDeque::new();
        let shards: std::collections::BTreeSet<ShardId> =
            called.keys().chain(self.by_shard.keys()).copied().collect();
        for shard in shards {
            let c = called.get(&shard).map(Vec::as_slice).unwrap_or(&[]);
            let l = self.by_shard.get(&shard).unwrap_or(&empty);
            // Every record of the shard since the run began, or as many as a call may carry.
            let complete = first <= 1 || l.len() >= MAX_NORM_HISTORY as usize;
            let ends_with = |long: &[Named], short: &[Named]| {
                long.len() >= short.len()
                    && long[long.len() - short.len()..]
                        .iter()
                        .zip(short)
                        .all(|(x, y)| same(x, y))
            };
            let l: Vec<Named> = l.iter().map(as_called).collect();
            let agrees = ends_with(&l, c) || (!complete && ends_with(c, &l));
            if !agrees {
                return NormCheck::Forged(format!(
                    "{shard}: the call carries {} records, not the end of the {} the commits since round {first} published{}",
                    c.len(),
                    l.len(),
                    match (c.last(), l.last()) {
                        (Some(x), Some(y)) if !same(x, y) => format!(
                            " (its last: norm {} from {}; committed last: norm {} from {})",
                            x.norm,
                            sender_name(x.sender),
                            y.norm,
                            sender_name(y.sender)
                        ),
                        _ => String::new(),
                    }
                ));
            }
        }
        self.check_counts(call, &called)
    }

    /// Whether each shard's records in `call` (`called`) number what the call before it and the commit
    /// between them make them (see the module doc); [`NormCheck::Agrees`] when either was not seen.
    fn check_counts(
        &self,
        call: &AggregationCall,
        called: &BTreeMap<ShardId, Vec<Named>>,
    ) -> NormCheck {
        let before = call.round.saturating_sub(1);
        let (Some((kept_before, held)), Some(added)) =
            (self.held.get(&before), self.added.get(&before))
        else {
            return NormCheck::Agrees;
        };
        let n = call.norm_history as usize;
        let shards: BTreeSet<&ShardId> = held
            .keys()
            .chain(added.keys())
            .chain(called.keys())
            .collect();
        for shard in shards {
            let total =
                held.get(shard).copied().unwrap_or(0) + added.get(shard).copied().unwrap_or(0);
            // The setting may have changed between the two calls (a restart): the commit's norms were kept
            // under the old one or the new one, whichever the coordinator ran when it took them.
            let fewest = total.min(n).min(*kept_before as usize);
            let most = total.min(n);
            let carried = called.get(shard).map_or(0, Vec::len);
            if !(fewest..=most).contains(&carried) {
                return NormCheck::Forged(format!(
                    "{shard}: the call carries {carried} records where its history of {n} a shard holds {}: \
                     the call of round {before} carried {} and its commit accepted {} more",
                    if fewest == most {
                        most.to_string()
                    } else {
                        format!("{fewest} to {most}")
                    },
                    held.get(shard).copied().unwrap_or(0),
                    added.get(shard).copied().unwrap_or(0),
                ));
            }
        }
        NormCheck::Agrees
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use mana_protocol::{
        AcceptedDeltas, CalledDelta, CodecOptions, ContentHash, Deadlines, HyperParams, NormRecord,
        Participant, PublicKey, RunId, ShardCall, UpdateRule, VerdictRule,
    };

    use super::*;

    const E0: ShardId = ShardId::Expert { layer: 0, index: 0 };

    fn key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn run() -> RunId {
        RunId::new("norms").unwrap()
    }

    fn announcement(round: u64) -> RoundAnnouncement {
        RoundAnnouncement {
            run: run(),
            round,
            base_checkpoint: ContentHash::of(b"base"),
            participants: (1..=3)
                .map(|i| Participant {
                    node: key(i),
                    shards: vec![ShardId::Trunk, E0],
                    data_seeds: vec![u64::from(i)],
                })
                .collect(),
            inner_steps: 1,
            hyper: HyperParams {
                update_rule: UpdateRule::Sync,
                inner_lr: 1e-3,
                weight_decay: 0.0,
                outer_lr: 1.0,
                outer_momentum: 0.0,
                batch_tokens: 64,
                seq_len: 16,
                codec: CodecOptions::default(),
                router_bias_gamma: 0.0,
            },
            max_norm_ratio: 10.0,
            deadlines: Deadlines {
                deltas_by_ms: 1,
                commit_by_ms: 2,
            },
            corpus: ContentHash::of(b"corpus"),
            seed_commitment: ContentHash::of(b"seed"),
        }
    }

    fn payload(round: u64, shard: ShardId, sender: u32) -> ContentHash {
        ContentHash::of(format!("{round} {shard} {sender}").as_bytes())
    }

    /// Round `round`'s call: every participant sent a delta of the trunk and of E0; `norms` is its history,
    /// kept at 8 records a shard.
    fn call(round: u64, norms: Vec<NormRecord>) -> AggregationCall {
        call_keeping(round, 8, norms)
    }

    /// [`call`], saying that the coordinator keeps `norm_history` records a shard.
    fn call_keeping(round: u64, norm_history: u32, norms: Vec<NormRecord>) -> AggregationCall {
        let part = |shard| {
            let mut deltas: Vec<CalledDelta> = (0..3)
                .map(|s| CalledDelta {
                    sender: s,
                    payload_hash: payload(round, shard, s),
                    payload_size: 10,
                    weight: 1,
                })
                .collect();
            deltas.sort_by_key(|d| (d.payload_hash, d.sender));
            ShardCall {
                shard,
                deltas,
                holders: vec![0, 1, 2],
                verifiers: Vec::new(),
            }
        };
        AggregationCall {
            run: run(),
            round,
            base_checkpoint: ContentHash::of(b"base"),
            seed_secret: [0; 32],
            rule: VerdictRule {
                min_norm_ratio: 0.1,
                score_share: 1.0,
                trunk_min_gain: 0.0,
                trunk_share: 0.0,
                expert_tolerance: 0.0,
            },
            judging: mana_protocol::JudgingRule::default(),
            norm_history,
            norms,
            shards: vec![part(ShardId::Trunk), part(E0)],
        }
    }

    /// Round `round`'s commit accepting every delta of `call`, each with norm round + sender / 10.
    fn commit(call: &AggregationCall) -> RoundCommit {
        let accepted = call
            .shards
            .iter()
            .map(|p| AcceptedDeltas {
                shard: p.shard,
                deltas: p.deltas.iter().map(|d| d.payload_hash).collect(),
                weights: vec![1; p.deltas.len()],
                norms: p
                    .deltas
                    .iter()
                    .map(|d| call.round as f32 + d.sender as f32 / 10.0)
                    .collect(),
            })
            .collect();
        RoundCommit {
            run: run(),
            round: call.round,
            accepted,
            rejected: Vec::new(),
            checkpoint: mana_protocol::CheckpointManifest {
                run: run(),
                round: call.round,
                shards: Vec::new(),
            },
            scores: Vec::new(),
            seed_secret: [0; 32],
            dissent: Vec::new(),
        }
    }

    /// The history an honest coordinator keeping `per_shard` records a shard hands in round `round`'s call,
    /// after rounds 1..round committed as [`commit`] does.
    fn honest_history(round: u64, per_shard: usize) -> Vec<NormRecord> {
        let mut by_shard: BTreeMap<ShardId, Vec<NormRecord>> = BTreeMap::new();
        for r in 1..round {
            let c = call(r, Vec::new());
            for part in &c.shards {
                for d in &part.deltas {
                    let list = by_shard.entry(part.shard).or_default();
                    list.push(NormRecord {
                        shard: part.shard,
                        sender: Some(d.sender),
                        norm: r as f32 + d.sender as f32 / 10.0,
                    });
                    let excess = list.len().saturating_sub(per_shard);
                    list.drain(..excess);
                }
            }
        }
        by_shard.into_values().flatten().collect()
    }

    /// A ledger shown rounds `from..to` (announcement, call, commit) of a coordinator keeping 8 records a
    /// shard, and round `to`'s announcement (its call's records name their senders among its participants).
    fn shown(from: u64, to: u64) -> NormLedger {
        shown_keeping(from, to, 8)
    }

    /// [`shown`], of a coordinator keeping `per_shard` records a shard.
    fn shown_keeping(from: u64, to: u64, per_shard: u32) -> NormLedger {
        let mut ledger = NormLedger::new();
        for r in from..to {
            ledger.announced(&announcement(r));
            let c = call_keeping(r, per_shard, honest_history(r, per_shard as usize));
            ledger.called(&c);
            ledger.committed(&commit(&c));
        }
        ledger.announced(&announcement(to));
        ledger
    }

    #[test]
    fn an_honest_history_agrees_and_a_forged_one_does_not() {
        let ledger = shown(1, 6);
        let honest = honest_history(6, 8);
        assert_eq!(ledger.check(&call(6, honest.clone())), NormCheck::Agrees);
        // What the ledger says an honest call carries is that history.
        let rebuilt = ledger.honest_history(6, 8).unwrap();
        assert_eq!(format!("{rebuilt:?}"), format!("{honest:?}"));
        // Fewer records a shard than the setting, the most recent kept: cut short.
        assert!(matches!(
            ledger.check(&call(6, honest_history(6, 2))),
            NormCheck::Forged(_)
        ));
        // The setting lowered in the open (a restarted coordinator): the same records agree.
        assert_eq!(
            ledger.check(&call_keeping(6, 2, honest_history(6, 2))),
            NormCheck::Agrees
        );
        // A norm moved, a sender changed, a made-up record, a recent one left out, another order.
        let mut moved = honest.clone();
        moved[3].norm *= 10.0;
        let mut sender = honest.clone();
        sender[3].sender = sender[3].sender.map(|i| (i + 1) % 3);
        // A participant's norm said to be a non-participant's (it would then bound its own delta), and a
        // sender past the participants.
        let mut anonymous = honest.clone();
        anonymous[3].sender = None;
        let mut outside = honest.clone();
        outside[3].sender = Some(3);
        let mut made_up = honest.clone();
        made_up.push(NormRecord {
            shard: E0,
            sender: Some(1),
            norm: 99.0,
        });
        let mut left_out = honest.clone();
        left_out.pop();
        let mut reordered = honest.clone();
        reordered.swap(0, 9);
        for forged in [
            moved, sender, anonymous, outside, made_up, left_out, reordered,
        ] {
            assert!(
                matches!(ledger.check(&call(6, forged.clone())), NormCheck::Forged(_)),
                "{forged:?}"
            );
        }
        // A call of another round than the next is not checked.
        assert_eq!(ledger.check(&call(8, Vec::new())), NormCheck::Unknown);
    }

    #[test]
    fn records_from_before_the_ledger_are_allowed_in_front_only() {
        // Joined at round 3: rounds 1 and 2 are unknown, so the call may carry them first.
        let ledger = shown_keeping(3, 6, 16);
        let honest = honest_history(6, 16);
        assert_eq!(
            ledger.check(&call_keeping(6, 16, honest.clone())),
            NormCheck::Agrees
        );
        // From round 1, the ledger knows every record: none may come before them.
        let full = shown(1, 6);
        let mut extra = honest.clone();
        extra.insert(
            0,
            NormRecord {
                shard: ShardId::Trunk,
                sender: Some(0),
                norm: 0.5,
            },
        );
        assert!(matches!(
            full.check(&call_keeping(6, 16, extra.clone())),
            NormCheck::Forged(_)
        ));
        // Joined late, an older record in front is unknown, not forged, by its content; but the call before
        // carried 12 records of the trunk and its commit accepted 3, so a 16th is one too many.
        assert!(matches!(
            ledger.check(&call_keeping(6, 16, extra.clone())),
            NormCheck::Forged(_)
        ));
        // Without the call before (its commit accepted nothing new), the content alone is checked.
        let mut blind = ledger.clone();
        blind.held.clear();
        assert_eq!(blind.check(&call_keeping(6, 16, extra)), NormCheck::Agrees);
        let mut middle = honest;
        let at = middle.len() - 2;
        middle.insert(
            at,
            NormRecord {
                shard: E0,
                sender: Some(0),
                norm: 0.5,
            },
        );
        assert!(matches!(
            blind.check(&call_keeping(6, 16, middle)),
            NormCheck::Forged(_)
        ));
    }

    /// A coordinator keeping 2 records a shard, restarted keeping 8: its history fills as commits come, and
    /// the calls say so; one that then claims to keep 8 but cuts to 2 again is caught.
    #[test]
    fn a_raised_setting_fills_as_commits_come() {
        let ledger = shown_keeping(1, 6, 2);
        // Restarted after round 5's commit (kept under 2) or before it (under 8): 2 or 5 records a shard.
        for kept in [2, 5] {
            assert_eq!(
                ledger.check(&call_keeping(6, 8, honest_history(6, kept))),
                NormCheck::Agrees,
                "{kept}"
            );
        }
        let mut next = ledger.clone();
        let c = call_keeping(6, 8, honest_history(6, 5));
        next.called(&c);
        next.committed(&commit(&c));
        next.announced(&announcement(7));
        assert_eq!(
            next.check(&call_keeping(7, 8, honest_history(7, 8))),
            NormCheck::Agrees
        );
        assert!(matches!(
            next.check(&call_keeping(7, 8, honest_history(7, 2))),
            NormCheck::Forged(_)
        ));
    }

    #[test]
    fn a_payload_called_for_two_senders_counts_for_the_one_not_refused() {
        // Round 1: sender 2 re-announced sender 0's trunk payload; the commit refuses the copy.
        let mut c = call(1, Vec::new());
        let original = payload(1, ShardId::Trunk, 0);
        let trunk = &mut c.shards[0];
        trunk.deltas.retain(|d| d.sender != 2);
        trunk.deltas.push(CalledDelta {
            sender: 2,
            payload_hash: original,
            payload_size: 10,
            weight: 1,
        });
        trunk.deltas.sort_by_key(|d| (d.payload_hash, d.sender));
        let mut done = commit(&c);
        let list = &mut done.accepted[0];
        let at = list.deltas.iter().rposition(|h| *h == original).unwrap();
        list.deltas.remove(at);
        list.norms.remove(at);
        list.weights.remove(at);
        done.rejected.push(mana_protocol::RejectedDelta {
            shard: ShardId::Trunk,
            node: key(3),
            payload_hash: original,
            reason: mana_protocol::RejectCode::NotBound,
        });
        let mut ledger = NormLedger::new();
        ledger.announced(&announcement(1));
        ledger.called(&c);
        ledger.committed(&done);
        let trunk: Vec<_> = ledger.by_shard[&ShardId::Trunk].iter().collect();
        assert_eq!(trunk.len(), 2);
        assert!(trunk.iter().any(|r| r.sender == key(1)), "{trunk:?}");
        assert!(trunk.iter().all(|r| r.sender != key(3)), "{trunk:?}");
    }

    #[test]
    fn a_missed_commit_or_call_starts_the_ledger_again() {
        let mut ledger = shown(1, 4);
        // Round 4's call was missed: its commit's senders are unknown, and the ledger restarts at round 5.
        ledger.announced(&announcement(4));
        ledger.committed(&commit(&call(4, Vec::new())));
        ledger.announced(&announcement(5));
        assert_eq!(
            ledger.check(&call(5, honest_history(5, 8))),
            NormCheck::Agrees
        );
        let mut forged = honest_history(5, 8);
        forged.last_mut().unwrap().norm = 42.0;
        // Nothing recorded since the restart: the call's records are all from before it.
        assert_eq!(ledger.check(&call(5, forged)), NormCheck::Agrees);
        // The same commit again changes nothing.
        ledger.committed(&commit(&call(4, Vec::new())));
        assert_eq!(
            ledger.check(&call(5, honest_history(5, 8))),
            NormCheck::Agrees
        );
        // A call that does not follow the last commit seen is not checked.
        assert_eq!(ledger.check(&call(6, Vec::new())), NormCheck::Unknown);
        // A commit skipped (round 5): the ledger restarts after round 6, and checks round 8 against round 7.
        for r in [6, 7] {
            let c = call(r, honest_history(r, 8));
            ledger.announced(&announcement(r));
            ledger.called(&c);
            ledger.committed(&commit(&c));
        }
        ledger.announced(&announcement(8));
        let honest = honest_history(8, 8);
        assert_eq!(ledger.check(&call(8, honest.clone())), NormCheck::Agrees);
        let mut forged = honest;
        forged.last_mut().unwrap().norm = 42.0;
        assert!(matches!(
            ledger.check(&call(8, forged)),
            NormCheck::Forged(_)
        ));
    }
}
