//! The saved-state format, and the state saved before it had a header. bincode is not self-describing: a
//! field added to a saved struct changes the layout, so an old state would no longer decode (and
//! `#[serde(default)]` does not help). A state now starts with [`STATE_HEADER`]; one without it is the first
//! format (before the per-IP member cap, the published scores and the weighted aggregate, which came with
//! wire protocol 2), decoded here into the current structs: its members' origins are unknown until their next
//! heartbeat, and its policy gets the default `max_members_per_ip`. A round that was in progress when the
//! old coordinator saved is abandoned (its announcement was protocol 1's, which no node of this version reads,
//! and it had no seed secret): the coordinator resumes waiting for members and opens the next round from its
//! last committed checkpoint; members, standings, bans and the checkpoint are kept.
//!
//! Format 2 (header version 2) is the layout before the shard judges' results (protocol 7): its config has no
//! judging rule (it gets the default) and its round in progress has no call or attestations. That round,
//! announced under protocol 6, is abandoned like a first-format one ([`decode_v2`]).
//!
//! Format 3 (header version 3) is the layout before the judges' verdicts (protocol 8): its config has no
//! verdict rule or norm history length (they get the defaults), the coordinator kept no norm history (the
//! judges' bounds start from this round's deltas alone), and its round in progress carried the coordinator's
//! own verdicts and a protocol-7 call. That round is abandoned like the older ones ([`decode_v3`]).
//!
//! Format 4 (header version 4) is the layout of protocols 8 to 10: its call has no judging rule, and the
//! coordinator kept no bar on outvoted holders. A round in progress is abandoned (its messages were protocol
//! 10's, which no node of this version reads); everything else is kept ([`decode_v4`]).
//!
//! The next change to a saved struct bumps the header's version byte and moves the current layout here.

use std::collections::{BTreeMap, BTreeSet};

use mana_protocol::{
    Capacity, CheckpointManifest, ContentHash, DeltaAnnouncement, DeltaScore, HyperParams,
    PublicKey, RejectCode, RejectedDelta, RoundAnnouncement, RunId, ShardEntry, ShardId,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::config::DEFAULT_NORM_HISTORY;
use super::{
    Coordinator, CoordinatorConfig, CoordinatorError, ExpertHosts, JudgingRule, Member, Origin,
    RunState, StandingPolicy, Standings,
};
use crate::round::{NormHistory, default_verdict_rule};

/// The first bytes of a saved state: a byte no bincode varint starts with (so no header-less state can
/// begin with it), `MC` (mana coordinator), and the format version.
pub(super) const STATE_HEADER: [u8; 4] = [0xFF, b'M', b'C', 5];

/// The header of a state saved in format 4 (see the module doc).
pub(super) const STATE_HEADER_V4: [u8; 4] = [0xFF, b'M', b'C', 4];

/// The header of a state saved in format 3 (see the module doc).
pub(super) const STATE_HEADER_V3: [u8; 4] = [0xFF, b'M', b'C', 3];

/// The header of a state saved in format 2 (see the module doc).
pub(super) const STATE_HEADER_V2: [u8; 4] = [0xFF, b'M', b'C', 2];

/// Most bytes a saved state may take.
const MAX_STATE_BYTES: usize = 64 * 1024 * 1024;

/// Decodes one `T` that must take all of `bytes` (bounded: a truncated or corrupted file gives an error).
pub(super) fn decode_whole<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CoordinatorError> {
    let cfg = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(bytes, cfg)
        .map_err(|e| CoordinatorError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CoordinatorError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Decodes a state saved in the first format (no header).
pub(super) fn decode_v1(bytes: &[u8]) -> Result<Coordinator, CoordinatorError> {
    let cfg = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
    let (head, used): (CoordinatorV1, usize) = bincode::serde::decode_from_slice(bytes, cfg)
        .map_err(|e| CoordinatorError::Decode(e.to_string()))?;
    let rest = &bytes[used..];
    let (phase, used): (u32, usize) = bincode::serde::decode_from_slice(rest, cfg)
        .map_err(|e| CoordinatorError::Decode(e.to_string()))?;
    let state = match phase {
        0 if used == rest.len() => RunState::WaitingForMembers,
        4 => RunState::Cooldown {
            until_ms: decode_whole(&rest[used..])?,
        },
        1..=3 => {
            tracing::warn!(
                round = head.next_round.saturating_sub(1),
                "the saved state is from before protocol 2: the round it was running is abandoned"
            );
            RunState::WaitingForMembers
        }
        _ => {
            return Err(CoordinatorError::Decode(format!(
                "unknown run phase {phase} in a first-format state"
            )));
        }
    };
    let mut c = Coordinator::from(head);
    c.state = state;
    Ok(c)
}

/// [`StandingPolicy`] before `max_members_per_ip`.
#[derive(Serialize, Deserialize)]
struct StandingPolicyV1 {
    fault_cost: i64,
    ban_at: i64,
    max_weight: i64,
    max_members: usize,
    max_banned: usize,
}

/// [`Member`] before `origin`.
#[derive(Serialize, Deserialize)]
struct MemberV1 {
    capacity: Capacity,
    last_seen_ms: u64,
    last_seq: u64,
}

/// [`CoordinatorConfig`] before `judging` (format 2), with the standing policy of its format: the first
/// format's was a [`StandingPolicyV1`].
#[derive(Serialize, Deserialize)]
struct ConfigOf<S> {
    run: RunId,
    experts: Vec<ShardId>,
    replication: usize,
    min_members: usize,
    trunk_everywhere: bool,
    train_ms: u64,
    verify_ms: u64,
    cooldown_ms: u64,
    member_timeout_ms: u64,
    inner_steps: u32,
    data_seeds_per_node: u32,
    max_norm_ratio: f32,
    hyper: HyperParams,
    standing: S,
    corpus: ContentHash,
}

/// The first format's config.
type ConfigV1 = ConfigOf<StandingPolicyV1>;
/// Format 2's config.
type ConfigV2 = ConfigOf<StandingPolicy>;

impl<S> ConfigOf<S> {
    /// The same config with its standing policy turned into another format's.
    fn map_standing<T>(self, f: impl FnOnce(S) -> T) -> ConfigOf<T> {
        ConfigOf {
            run: self.run,
            experts: self.experts,
            replication: self.replication,
            min_members: self.min_members,
            trunk_everywhere: self.trunk_everywhere,
            train_ms: self.train_ms,
            verify_ms: self.verify_ms,
            cooldown_ms: self.cooldown_ms,
            member_timeout_ms: self.member_timeout_ms,
            inner_steps: self.inner_steps,
            data_seeds_per_node: self.data_seeds_per_node,
            max_norm_ratio: self.max_norm_ratio,
            hyper: self.hyper,
            standing: f(self.standing),
            corpus: self.corpus,
        }
    }
}

impl ConfigV2 {
    /// The current config, with the default judging rule (which format 2 did not have).
    fn into_current(self) -> CoordinatorConfig {
        CoordinatorConfig {
            run: self.run,
            experts: self.experts,
            replication: self.replication,
            min_members: self.min_members,
            trunk_everywhere: self.trunk_everywhere,
            train_ms: self.train_ms,
            verify_ms: self.verify_ms,
            cooldown_ms: self.cooldown_ms,
            member_timeout_ms: self.member_timeout_ms,
            inner_steps: self.inner_steps,
            data_seeds_per_node: self.data_seeds_per_node,
            max_norm_ratio: self.max_norm_ratio,
            hyper: self.hyper,
            standing: self.standing,
            corpus: self.corpus,
            judging: JudgingRule::default(),
            verdict: default_verdict_rule(),
            norm_history: DEFAULT_NORM_HISTORY,
        }
    }

    /// `c` in format 2 (for the tests' old states).
    #[cfg(test)]
    fn of(c: &CoordinatorConfig) -> ConfigV2 {
        let c = c.clone();
        ConfigOf {
            run: c.run,
            experts: c.experts,
            replication: c.replication,
            min_members: c.min_members,
            trunk_everywhere: c.trunk_everywhere,
            train_ms: c.train_ms,
            verify_ms: c.verify_ms,
            cooldown_ms: c.cooldown_ms,
            member_timeout_ms: c.member_timeout_ms,
            inner_steps: c.inner_steps,
            data_seeds_per_node: c.data_seeds_per_node,
            max_norm_ratio: c.max_norm_ratio,
            hyper: c.hyper,
            standing: c.standing,
            corpus: c.corpus,
        }
    }
}

impl StandingPolicyV1 {
    /// The current policy, with the default per-IP cap (which the first format did not have).
    fn upgrade(self) -> StandingPolicy {
        StandingPolicy {
            fault_cost: self.fault_cost,
            ban_at: self.ban_at,
            max_weight: self.max_weight,
            max_members: self.max_members,
            max_banned: self.max_banned,
            ..StandingPolicy::default()
        }
    }

    /// `s` in the first format (for the tests' old states).
    #[cfg(test)]
    fn of(s: StandingPolicy) -> StandingPolicyV1 {
        StandingPolicyV1 {
            fault_cost: s.fault_cost,
            ban_at: s.ban_at,
            max_weight: s.max_weight,
            max_members: s.max_members,
            max_banned: s.max_banned,
        }
    }
}

/// [`Coordinator`] in the first format (its skipped fields were never saved), but for its last field, the
/// run state, which [`decode_v1`] reads by hand.
#[derive(Serialize, Deserialize)]
struct CoordinatorV1 {
    config: ConfigV1,
    members: BTreeMap<PublicKey, MemberV1>,
    checkpoint: CheckpointManifest,
    next_round: u64,
    hosts: ExpertHosts,
    standings: Standings,
}

impl From<CoordinatorV1> for Coordinator {
    fn from(old: CoordinatorV1) -> Coordinator {
        let config = old
            .config
            .map_standing(StandingPolicyV1::upgrade)
            .into_current();
        let members = old
            .members
            .into_iter()
            .map(|(k, m)| {
                let member = Member {
                    capacity: m.capacity,
                    last_seen_ms: m.last_seen_ms,
                    last_seq: m.last_seq,
                    origin: Origin::Unknown,
                };
                (k, member)
            })
            .collect();
        Coordinator {
            config,
            members,
            checkpoint: old.checkpoint,
            next_round: old.next_round,
            hosts: old.hosts,
            standings: old.standings,
            allowlist: None,
            trust_colocated: false,
            norms: NormHistory::new(DEFAULT_NORM_HISTORY as usize),
            blocks: Default::default(),
            state: RunState::WaitingForMembers,
            barred: ExpertHosts::new(),
        }
    }
}

/// A state in the first format, as a coordinator from before the header saved it (for the tests).
#[cfg(test)]
pub(super) fn encode_v1(c: &Coordinator) -> Vec<u8> {
    let old = CoordinatorV1 {
        config: ConfigV2::of(&c.config).map_standing(StandingPolicyV1::of),
        members: c
            .members
            .iter()
            .map(|(k, m)| {
                let old = MemberV1 {
                    capacity: m.capacity,
                    last_seen_ms: m.last_seen_ms,
                    last_seq: m.last_seq,
                };
                (*k, old)
            })
            .collect(),
        checkpoint: c.checkpoint.clone(),
        next_round: c.next_round,
        hosts: c.hosts.clone(),
        standings: c.standings.clone(),
    };
    let cfg = bincode::config::standard();
    let mut bytes = bincode::serde::encode_to_vec(&old, cfg).expect("test states encode");
    // The run state: the current layout of the phases whose layout did not change; a round in progress as
    // its phase number and some bytes (its old layout, which is not read).
    let state = match &c.state {
        RunState::WaitingForMembers => vec![0u8],
        RunState::RoundTrain(_) => [vec![1u8], vec![7; 40]].concat(),
        RunState::RoundAggregate(_) => [vec![3u8], vec![7; 40]].concat(),
        RunState::Cooldown { until_ms } => [
            vec![4u8],
            bincode::serde::encode_to_vec(until_ms, cfg).expect("test states encode"),
        ]
        .concat(),
    };
    bytes.extend(state);
    bytes
}

/// Decodes a state saved in format 2 (after its header).
pub(super) fn decode_v2(body: &[u8]) -> Result<Coordinator, CoordinatorError> {
    let old: CoordinatorV2 = decode_whole(body)?;
    let state = match old.state {
        RunStateV2::WaitingForMembers => RunState::WaitingForMembers,
        RunStateV2::Cooldown { until_ms } => RunState::Cooldown { until_ms },
        RunStateV2::RoundTrain(r) | RunStateV2::RoundVerify(r) | RunStateV2::RoundAggregate(r) => {
            tracing::warn!(
                round = r.announcement.round,
                "the saved state is from before protocol 7: the round it was running is abandoned"
            );
            RunState::WaitingForMembers
        }
    };
    Ok(Coordinator {
        config: old.config.into_current(),
        members: old.members,
        checkpoint: old.checkpoint,
        next_round: old.next_round,
        hosts: old.hosts,
        standings: old.standings,
        allowlist: None,
        trust_colocated: false,
        norms: NormHistory::new(DEFAULT_NORM_HISTORY as usize),
        blocks: Default::default(),
        state,
        barred: ExpertHosts::new(),
    })
}

/// The coordinator's own verdict on a delta, as formats 2 and 3 kept it (read only to be abandoned).
#[derive(Serialize, Deserialize)]
enum Verdict {
    Accept,
    Reject(RejectCode),
}

/// [`super::ActiveRound`] in format 2: before the call and the attestations (read only to be abandoned).
#[derive(Serialize, Deserialize)]
struct ActiveRoundV2 {
    announcement: RoundAnnouncement,
    deltas: BTreeMap<(ShardId, PublicKey), DeltaAnnouncement>,
    verdicts: BTreeMap<(ShardId, PublicKey), Verdict>,
    dropped: BTreeSet<PublicKey>,
    refused: Vec<RejectedDelta>,
    results: BTreeMap<ShardId, ShardEntry>,
    seed_secret: [u8; 32],
    scores: BTreeMap<(ShardId, PublicKey), DeltaScore>,
    weights: BTreeMap<(ShardId, PublicKey), u32>,
}

/// [`RunState`] in format 2.
#[derive(Serialize, Deserialize)]
enum RunStateV2 {
    WaitingForMembers,
    RoundTrain(ActiveRoundV2),
    RoundVerify(ActiveRoundV2),
    RoundAggregate(ActiveRoundV2),
    Cooldown { until_ms: u64 },
}

/// [`Coordinator`] in format 2 (its skipped fields were never saved).
#[derive(Serialize, Deserialize)]
struct CoordinatorV2 {
    config: ConfigV2,
    members: BTreeMap<PublicKey, Member>,
    checkpoint: CheckpointManifest,
    next_round: u64,
    hosts: ExpertHosts,
    standings: Standings,
    state: RunStateV2,
}

/// A state in format 2, as a coordinator from before the judges' results saved it (for the tests): a round
/// in progress is written with its format-2 fields.
#[cfg(test)]
pub(super) fn encode_v2(c: &Coordinator) -> Vec<u8> {
    let round = |r: &super::ActiveRound| ActiveRoundV2 {
        announcement: r.announcement.clone(),
        deltas: r.deltas.clone(),
        verdicts: BTreeMap::new(),
        dropped: r.dropped.clone(),
        refused: Vec::new(),
        results: r.results.clone(),
        seed_secret: r.seed_secret,
        scores: BTreeMap::new(),
        weights: BTreeMap::new(),
    };
    let old = CoordinatorV2 {
        config: ConfigV2::of(&c.config),
        members: c.members.clone(),
        checkpoint: c.checkpoint.clone(),
        next_round: c.next_round,
        hosts: c.hosts.clone(),
        standings: c.standings.clone(),
        state: match &c.state {
            RunState::WaitingForMembers => RunStateV2::WaitingForMembers,
            RunState::RoundTrain(r) => RunStateV2::RoundTrain(round(r)),
            RunState::RoundAggregate(r) => RunStateV2::RoundAggregate(round(r)),
            RunState::Cooldown { until_ms } => RunStateV2::Cooldown {
                until_ms: *until_ms,
            },
        },
    };
    let mut bytes = STATE_HEADER_V2.to_vec();
    bytes.extend(
        bincode::serde::encode_to_vec(&old, bincode::config::standard())
            .expect("test states encode"),
    );
    bytes
}

/// Decodes a state saved in format 3 (after its header).
pub(super) fn decode_v3(body: &[u8]) -> Result<Coordinator, CoordinatorError> {
    let old: CoordinatorV3 = decode_whole(body)?;
    let state = match old.state {
        RunStateV3::WaitingForMembers => RunState::WaitingForMembers,
        RunStateV3::Cooldown { until_ms } => RunState::Cooldown { until_ms },
        RunStateV3::RoundTrain(r) | RunStateV3::RoundVerify(r) | RunStateV3::RoundAggregate(r) => {
            tracing::warn!(
                round = r.announcement.round,
                "the saved state is from before protocol 8: the round it was running is abandoned"
            );
            RunState::WaitingForMembers
        }
    };
    let config = old.config.into_current();
    Ok(Coordinator {
        norms: NormHistory::new(config.norm_history as usize),
        config,
        members: old.members,
        checkpoint: old.checkpoint,
        next_round: old.next_round,
        hosts: old.hosts,
        standings: old.standings,
        allowlist: None,
        trust_colocated: false,
        blocks: Default::default(),
        state,
        barred: ExpertHosts::new(),
    })
}

/// [`CoordinatorConfig`] in format 3: before the verdict rule and the norm history length.
#[derive(Serialize, Deserialize)]
struct ConfigV3 {
    head: ConfigV2,
    judging: JudgingRule,
}

impl ConfigV3 {
    fn into_current(self) -> CoordinatorConfig {
        CoordinatorConfig {
            judging: self.judging,
            ..self.head.into_current()
        }
    }

    #[cfg(test)]
    fn of(c: &CoordinatorConfig) -> ConfigV3 {
        ConfigV3 {
            head: ConfigV2::of(c),
            judging: c.judging,
        }
    }
}

/// The accepted deltas of a shard in protocol 7 (no norms).
#[derive(Serialize, Deserialize)]
struct AcceptedDeltasV7 {
    shard: ShardId,
    deltas: Vec<ContentHash>,
    weights: Vec<u32>,
}

/// One shard of a protocol-7 call for results.
#[derive(Serialize, Deserialize)]
struct ShardCallV7 {
    accepted: AcceptedDeltasV7,
    holders: Vec<u32>,
    verifiers: Vec<u32>,
}

/// A protocol-7 call for results.
#[derive(Serialize, Deserialize)]
struct AggregationCallV7 {
    run: RunId,
    round: u64,
    base_checkpoint: ContentHash,
    shards: Vec<ShardCallV7>,
}

/// A format-3 round's call and its id.
#[derive(Serialize, Deserialize)]
struct CalledV3 {
    call: AggregationCallV7,
    id: ContentHash,
}

/// [`super::ActiveRound`] in format 3 (read only to be abandoned).
#[derive(Serialize, Deserialize)]
struct ActiveRoundV3 {
    announcement: RoundAnnouncement,
    deltas: BTreeMap<(ShardId, PublicKey), DeltaAnnouncement>,
    verdicts: BTreeMap<(ShardId, PublicKey), Verdict>,
    dropped: BTreeSet<PublicKey>,
    refused: Vec<RejectedDelta>,
    results: BTreeMap<ShardId, ShardEntry>,
    call: Option<CalledV3>,
    attested: BTreeMap<ShardId, BTreeMap<PublicKey, ShardEntry>>,
    seed_secret: [u8; 32],
    scores: BTreeMap<(ShardId, PublicKey), DeltaScore>,
    weights: BTreeMap<(ShardId, PublicKey), u32>,
}

/// [`RunState`] in format 3.
#[derive(Serialize, Deserialize)]
enum RunStateV3 {
    WaitingForMembers,
    RoundTrain(ActiveRoundV3),
    RoundVerify(ActiveRoundV3),
    RoundAggregate(ActiveRoundV3),
    Cooldown { until_ms: u64 },
}

/// [`Coordinator`] in format 3.
#[derive(Serialize, Deserialize)]
struct CoordinatorV3 {
    config: ConfigV3,
    members: BTreeMap<PublicKey, Member>,
    checkpoint: CheckpointManifest,
    next_round: u64,
    hosts: ExpertHosts,
    standings: Standings,
    state: RunStateV3,
}

/// A state in format 3, as a coordinator from before the judges' verdicts saved it (for the tests): a round
/// in progress is written as a protocol-7 round waiting for its results.
#[cfg(test)]
pub(super) fn encode_v3(c: &Coordinator) -> Vec<u8> {
    let round = |r: &super::ActiveRound| ActiveRoundV3 {
        announcement: r.announcement.clone(),
        deltas: r.deltas.clone(),
        verdicts: BTreeMap::new(),
        dropped: r.dropped.clone(),
        refused: Vec::new(),
        results: r.results.clone(),
        call: Some(CalledV3 {
            call: AggregationCallV7 {
                run: r.announcement.run.clone(),
                round: r.announcement.round,
                base_checkpoint: r.announcement.base_checkpoint,
                shards: vec![ShardCallV7 {
                    accepted: AcceptedDeltasV7 {
                        shard: ShardId::Trunk,
                        deltas: vec![ContentHash([3; 32])],
                        weights: vec![1],
                    },
                    holders: vec![0],
                    verifiers: vec![1],
                }],
            },
            id: ContentHash([4; 32]),
        }),
        attested: BTreeMap::new(),
        seed_secret: r.seed_secret,
        scores: BTreeMap::new(),
        weights: BTreeMap::new(),
    };
    let old = CoordinatorV3 {
        config: ConfigV3::of(&c.config),
        members: c.members.clone(),
        checkpoint: c.checkpoint.clone(),
        next_round: c.next_round,
        hosts: c.hosts.clone(),
        standings: c.standings.clone(),
        state: match &c.state {
            RunState::WaitingForMembers => RunStateV3::WaitingForMembers,
            RunState::RoundTrain(r) => RunStateV3::RoundTrain(round(r)),
            RunState::RoundAggregate(r) => RunStateV3::RoundAggregate(round(r)),
            RunState::Cooldown { until_ms } => RunStateV3::Cooldown {
                until_ms: *until_ms,
            },
        },
    };
    let mut bytes = STATE_HEADER_V3.to_vec();
    bytes.extend(
        bincode::serde::encode_to_vec(&old, bincode::config::standard())
            .expect("test states encode"),
    );
    bytes
}

/// A protocol-10 call for judgments: the current one without its judging rule.
#[derive(Serialize, Deserialize)]
struct AggregationCallV10 {
    run: RunId,
    round: u64,
    base_checkpoint: ContentHash,
    seed_secret: [u8; 32],
    rule: mana_protocol::VerdictRule,
    norm_history: u32,
    norms: Vec<mana_protocol::NormRecord>,
    shards: Vec<mana_protocol::ShardCall>,
}

/// A format-4 round's call and its id.
#[derive(Serialize, Deserialize)]
struct CalledV4 {
    call: AggregationCallV10,
    id: ContentHash,
}

/// [`super::ActiveRound`] in format 4 (read only to be abandoned).
#[derive(Serialize, Deserialize)]
struct ActiveRoundV4 {
    announcement: RoundAnnouncement,
    deltas: BTreeMap<(ShardId, PublicKey), DeltaAnnouncement>,
    dropped: BTreeSet<PublicKey>,
    results: BTreeMap<ShardId, ShardEntry>,
    call: Option<CalledV4>,
    attested: BTreeMap<ShardId, BTreeMap<PublicKey, mana_protocol::ShardJudgment>>,
    seed_secret: [u8; 32],
}

/// [`RunState`] in format 4.
#[derive(Serialize, Deserialize)]
enum RunStateV4 {
    WaitingForMembers,
    RoundTrain(ActiveRoundV4),
    RoundAggregate(ActiveRoundV4),
    Cooldown { until_ms: u64 },
}

/// [`Coordinator`] in format 4 (its skipped fields were never saved).
#[derive(Serialize, Deserialize)]
struct CoordinatorV4 {
    config: CoordinatorConfig,
    members: BTreeMap<PublicKey, Member>,
    checkpoint: CheckpointManifest,
    next_round: u64,
    hosts: ExpertHosts,
    standings: Standings,
    state: RunStateV4,
    norms: NormHistory,
}

/// Decodes a state saved in format 4 (after its header).
pub(super) fn decode_v4(body: &[u8]) -> Result<Coordinator, CoordinatorError> {
    let old: CoordinatorV4 = decode_whole(body)?;
    let state = match old.state {
        RunStateV4::WaitingForMembers => RunState::WaitingForMembers,
        RunStateV4::Cooldown { until_ms } => RunState::Cooldown { until_ms },
        RunStateV4::RoundTrain(r) | RunStateV4::RoundAggregate(r) => {
            tracing::warn!(
                round = r.announcement.round,
                "the saved state is from before protocol 11: the round it was running is abandoned"
            );
            RunState::WaitingForMembers
        }
    };
    Ok(Coordinator {
        config: old.config,
        members: old.members,
        checkpoint: old.checkpoint,
        next_round: old.next_round,
        hosts: old.hosts,
        standings: old.standings,
        allowlist: None,
        trust_colocated: false,
        state,
        norms: old.norms,
        blocks: Default::default(),
        barred: ExpertHosts::new(),
    })
}

/// A state in format 4, as a coordinator of protocol 10 saved it (for the tests): a round in progress is
/// written with its call less the judging rule.
#[cfg(test)]
pub(super) fn encode_v4(c: &Coordinator) -> Vec<u8> {
    let round = |r: &super::ActiveRound| ActiveRoundV4 {
        announcement: r.announcement.clone(),
        deltas: r.deltas.clone(),
        dropped: r.dropped.clone(),
        results: r.results.clone(),
        call: r.call.as_ref().map(|c| CalledV4 {
            call: AggregationCallV10 {
                run: c.call.run.clone(),
                round: c.call.round,
                base_checkpoint: c.call.base_checkpoint,
                seed_secret: c.call.seed_secret,
                rule: c.call.rule,
                norm_history: c.call.norm_history,
                norms: c.call.norms.clone(),
                shards: c.call.shards.clone(),
            },
            id: c.id,
        }),
        attested: r.attested.clone(),
        seed_secret: r.seed_secret,
    };
    let old = CoordinatorV4 {
        config: c.config.clone(),
        members: c.members.clone(),
        checkpoint: c.checkpoint.clone(),
        next_round: c.next_round,
        hosts: c.hosts.clone(),
        standings: c.standings.clone(),
        state: match &c.state {
            RunState::WaitingForMembers => RunStateV4::WaitingForMembers,
            RunState::RoundTrain(r) => RunStateV4::RoundTrain(round(r)),
            RunState::RoundAggregate(r) => RunStateV4::RoundAggregate(round(r)),
            RunState::Cooldown { until_ms } => RunStateV4::Cooldown {
                until_ms: *until_ms,
            },
        },
        norms: c.norms.clone(),
    };
    let mut bytes = STATE_HEADER_V4.to_vec();
    bytes.extend(
        bincode::serde::encode_to_vec(&old, bincode::config::standard())
            .expect("test states encode"),
    );
    bytes
}
