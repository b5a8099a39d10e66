//! The largest round messages a run can produce, against what the network carries.
//!
//! A round's announcement, call and commit each travel as one signed envelope: gossiped whole up to
//! [`MAX_MESSAGE_BYTES`], and as a parcel (a gossiped header naming a blob that each node fetches once, see
//! [`mana_protocol::Parcel`]) up to [`MAX_PARCEL_MESSAGE_BYTES`]. Their sizes grow with the run's shards (the
//! commit's checkpoint lists every shard; the call's norm history keeps `norm_history` norms of each), with
//! the holders per shard (a delta each) and with the participants (a trunk delta each when every participant
//! trains the trunk). A 1B-parameter layout (1,408 experts and the trunk, replication 2, 1,000 participants)
//! outgrows gossip: its first commit is 367 KiB and its fourth round's call 260 KiB, against 255 KiB, so
//! its calls and commits travel as parcels. A run whose messages could outgrow even a parcel cannot be
//! sequenced: the coordinator's tick would fail on encoding the call or the commit, every tick.
//!
//! [`round_message_bound`] builds the largest announcement, call and commit the run's settings allow and
//! encodes them: every participant slot filled, every delta refused with a score, every judge of every shard
//! on the record of dissent, every shard's norm history full, every number at its widest encoding. A
//! coordinator checks it before it starts ([`check_round_messages`]) and refuses the run with the sizes and
//! what to change, rather than stalling at its first large round.

#[cfg(doc)]
use mana_protocol::limits::MAX_MESSAGE_BYTES;
use mana_protocol::limits::{
    MAX_CALL_NORMS, MAX_COMMIT_DELTAS, MAX_DELTA_PAYLOAD_BYTES, MAX_MANIFEST_SHARDS,
    MAX_PARCEL_MESSAGE_BYTES, MAX_PARTICIPANTS, MAX_SHARD_BYTES, MAX_SHARD_JUDGES,
    MAX_SHARDS_PER_NODE,
};
use mana_protocol::{
    AggregationCall, CalledDelta, CheckpointManifest, ContentHash, Deadlines, DeltaScore, Message,
    NormRecord, Participant, PublicKey, RejectCode, RejectedDelta, RoundAnnouncement, RoundCommit,
    ShardCall, ShardDissent, ShardEntry, ShardId,
};

use super::config::{ConfigError, CoordinatorConfig};

/// The largest encoded size of each of a run's round messages, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundMessageBound {
    /// The round announcement (participants, their shards and data seeds).
    pub announcement: usize,
    /// The call for judgments (every delta, the judges, the norm history).
    pub call: usize,
    /// The commit (every verdict and score, the dissent, the checkpoint).
    pub commit: usize,
}

/// The largest announcement, call and commit a round of `config` can produce.
pub fn round_message_bound(config: &CoordinatorConfig) -> RoundMessageBound {
    let [announcement, call, commit] = largest_messages(config);
    RoundMessageBound {
        announcement: encoded_len(&announcement),
        call: encoded_len(&call),
        commit: encoded_len(&commit),
    }
}

/// The announcement, call and commit that [`round_message_bound`] measures.
fn largest_messages(config: &CoordinatorConfig) -> [Message; 3] {
    let participants = MAX_PARTICIPANTS.min(config.standing.max_members.max(1)) as u32;
    let widest = participants - 1;
    let far = PublicKey([0xff; 32]);
    let hash = ContentHash([0xff; 32]);
    let mut shards: Vec<ShardId> = std::iter::once(ShardId::Trunk)
        .chain(config.experts.iter().copied())
        .collect();
    shards.sort();
    shards.dedup();
    // Holders of each shard: every participant for a trunk every participant trains, else `replication`.
    let holders = |shard: &ShardId| -> u32 {
        if *shard == ShardId::Trunk && config.trunk_everywhere {
            participants
        } else {
            (config.replication as u32).min(participants)
        }
    };
    let judges = |shard: &ShardId| -> (u32, u32) {
        let h = holders(shard);
        if h >= participants {
            // Held by everyone: holders and verifiers together, all drawn among the holders.
            let all = config.judging.max_holder_judges + config.judging.verifiers(true);
            return (h.min(all), 0);
        }
        let holder_judges = h.min(config.judging.max_holder_judges);
        // An escalated shard's (twice the verifiers): the most a call can name.
        let verifiers = config
            .judging
            .verifiers(true)
            .min(participants.saturating_sub(h));
        (holder_judges, verifiers)
    };

    // The announcement: every holder slot given out over the participants.
    let mut slots: Vec<Vec<ShardId>> = vec![Vec::new(); participants as usize];
    let mut next = 0usize;
    for shard in &shards {
        for _ in 0..holders(shard) {
            let slot = next % slots.len();
            slots[slot].push(*shard);
            next += 1;
        }
    }
    let announcement = RoundAnnouncement {
        run: config.run.clone(),
        round: u64::MAX,
        base_checkpoint: hash,
        participants: slots
            .into_iter()
            .map(|shards| Participant {
                node: far,
                shards,
                data_seeds: vec![u64::MAX; config.data_seeds_per_node as usize],
            })
            .collect(),
        inner_steps: config.inner_steps,
        hyper: config.hyper.clone(),
        max_norm_ratio: config.max_norm_ratio,
        deadlines: Deadlines {
            deltas_by_ms: u64::MAX,
            commit_by_ms: u64::MAX,
        },
        corpus: config.corpus,
        seed_commitment: hash,
    };

    // The call: a delta from every holder of every shard, the most judges, a full norm history.
    let call = AggregationCall {
        run: config.run.clone(),
        round: u64::MAX,
        base_checkpoint: hash,
        seed_secret: [0xff; 32],
        rule: config.verdict,
        judging: config.judging,
        norm_history: config.norm_history,
        norms: shards
            .iter()
            .flat_map(|shard| {
                (0..config.norm_history).map(move |_| NormRecord {
                    shard: *shard,
                    sender: Some(widest),
                    norm: f32::MAX,
                })
            })
            .collect(),
        shards: shards
            .iter()
            .map(|shard| {
                let (holder_judges, verifiers) = judges(shard);
                ShardCall {
                    shard: *shard,
                    deltas: (0..holders(shard))
                        .map(|_| CalledDelta {
                            sender: widest,
                            payload_hash: hash,
                            payload_size: MAX_DELTA_PAYLOAD_BYTES,
                            weight: mana_protocol::MAX_DELTA_WEIGHT,
                        })
                        .collect(),
                    holders: vec![widest; holder_judges as usize],
                    verifiers: vec![widest; verifiers as usize],
                }
            })
            .collect(),
    };

    // The commit: every delta refused (a refusal names its sender; an acceptance does not) and scored, every
    // judge a dissenter, every shard in the checkpoint.
    let commit = RoundCommit {
        run: config.run.clone(),
        round: u64::MAX,
        accepted: Vec::new(),
        rejected: shards
            .iter()
            .flat_map(|shard| {
                (0..holders(shard)).map(move |_| RejectedDelta {
                    shard: *shard,
                    node: far,
                    payload_hash: hash,
                    reason: RejectCode::NormTooLarge,
                })
            })
            .collect(),
        checkpoint: CheckpointManifest {
            run: config.run.clone(),
            round: u64::MAX,
            shards: shards
                .iter()
                .map(|shard| ShardEntry {
                    shard: *shard,
                    hash,
                    size: MAX_SHARD_BYTES,
                    round: u64::MAX,
                })
                .collect(),
        },
        scores: shards
            .iter()
            .flat_map(|shard| {
                let in_mean = holders(shard);
                (0..in_mean).map(move |_| DeltaScore {
                    shard: *shard,
                    payload_hash: hash,
                    in_mean,
                    null_loss: f32::MAX,
                    loss: f32::MAX,
                })
            })
            .collect(),
        seed_secret: [0xff; 32],
        dissent: shards
            .iter()
            .map(|shard| {
                let (holder_judges, verifiers) = judges(shard);
                ShardDissent {
                    shard: *shard,
                    dissenters: vec![far; (holder_judges + verifiers) as usize],
                    absent: Vec::new(),
                }
            })
            .collect(),
    };
    [
        Message::RoundAnnouncement(announcement),
        Message::AggregationCall(call),
        Message::RoundCommit(commit),
    ]
}

/// The first of the protocol's counts that `messages` (the largest ones) break, said in words: a real
/// message past one fails its own check at encoding, every tick.
fn over_counts(messages: &[Message]) -> Option<String> {
    let over = |what: &str, n: usize, max: usize| {
        (n > max).then(|| format!("{what} can be {n} (at most {max})"))
    };
    messages.iter().find_map(|message| match message {
        Message::RoundAnnouncement(a) => a.participants.iter().find_map(|p| {
            over(
                "shards of one participant",
                p.shards.len(),
                MAX_SHARDS_PER_NODE,
            )
        }),
        Message::AggregationCall(c) => over("call shards", c.shards.len(), MAX_MANIFEST_SHARDS)
            .or_else(|| {
                let deltas = c.shards.iter().map(|s| s.deltas.len()).sum();
                over("call deltas", deltas, MAX_COMMIT_DELTAS)
            })
            .or_else(|| over("call norms", c.norms.len(), MAX_CALL_NORMS))
            .or_else(|| {
                c.shards.iter().find_map(|s| {
                    over(
                        "judges of one shard",
                        s.holders.len() + s.verifiers.len(),
                        MAX_SHARD_JUDGES,
                    )
                })
            }),
        Message::RoundCommit(c) => over("commit deltas", c.rejected.len(), MAX_COMMIT_DELTAS),
        _ => None,
    })
}

fn encoded_len(message: &Message) -> usize {
    // Uncapped: the bound is what is being measured. An encoding failure (none is possible for these
    // structures) counts as too large.
    mana_protocol::wire::encode::<_, { usize::MAX }>(message, "round message bound")
        .map_or(usize::MAX, |bytes| bytes.len())
}

/// Refuses settings whose round messages could outgrow a parcel ([`MAX_PARCEL_MESSAGE_BYTES`]) or the
/// protocol's counts (deltas in a commit, norms in a call), naming the message, its size or count, and the
/// settings that make it.
pub fn check_round_messages(config: &CoordinatorConfig) -> Result<RoundMessageBound, ConfigError> {
    let settings = || {
        format!(
            "{} shards, replication {}, up to {} participants, a norm history of {} a shard",
            config.experts.len() + 1,
            config.replication,
            MAX_PARTICIPANTS.min(config.standing.max_members),
            config.norm_history,
        )
    };
    if let Some(over) = over_counts(&largest_messages(config)) {
        return Err(ConfigError {
            field: "experts",
            reason: format!(
                "a round's {over}, over the protocol's limit ({}): run fewer experts, a lower replication \
                 or norm history, or fewer members (`max_members`)",
                settings()
            ),
        });
    }
    let bound = round_message_bound(config);
    let over = [
        ("announcement", bound.announcement),
        ("call for judgments", bound.call),
        ("commit", bound.commit),
    ]
    .into_iter()
    .filter(|(_, bytes)| *bytes > MAX_PARCEL_MESSAGE_BYTES)
    .max_by_key(|(_, bytes)| *bytes);
    match over {
        None => Ok(bound),
        Some((what, bytes)) => Err(ConfigError {
            field: "experts",
            reason: format!(
                "a round's {what} can reach {} KiB, over the {} KiB a round message may hold ({}): run \
                 fewer experts, a lower replication or norm history, or fewer members (`max_members`)",
                bytes.div_ceil(1024),
                MAX_PARCEL_MESSAGE_BYTES / 1024,
                settings(),
            ),
        }),
    }
}
