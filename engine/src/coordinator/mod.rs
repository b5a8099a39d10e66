//! The coordinator of a training run as a pure state machine (after Psyche's coordinator): no clock, no
//! randomness, no I/O. The daemon feeds it events (heartbeats, departures, delta announcements, the judges'
//! attestations) and calls [`Coordinator::tick`] with the time and a seed; it answers with [`Action`]s
//! (protocol messages to publish, work to start) for the daemon to carry out. The whole state is
//! serde-serializable, so a restarted coordinator resumes where it stopped ([`Coordinator::to_bytes`]).
//!
//! Phases ([`RunState`]):
//!
//! ```text
//! WaitingForMembers --(>= min_members)--> RoundTrain --(all deltas in, or deltas_by_ms)--> RoundAggregate
//!   --(every called shard's result in, or commit_by_ms)--> Cooldown --(cooldown over)--> RoundTrain
//!   (or WaitingForMembers if too few remain)
//! ```
//!
//! **Verdicts and aggregation by the shards' judges.** When the deltas are in, the coordinator calls for
//! judgments ([`Action::CallAggregation`]): for each shard with deltas, the deltas (sender, payload, weight),
//! the verdict rule, the norm history and the round's seed secret; its judges ([`judges`]: its holders and
//! verifiers drawn from the other participants by the round's score seed) check and score each delta, compute
//! the shard's next state from the ones they accept and sign both ([`Coordinator::shard_attested`]). The
//! verdicts and result a quorum signed are taken as soon as the quorum is there: the coordinator commits the
//! result's hash, never its bytes (the judges host the blob). A shard without a quorum keeps its state for
//! the round (its deltas are listed as `late`, at no cost to their senders), and a judge that signed anything
//! else than the quorum loses standing. The coordinator never fetches a payload or a shard, scores a delta or
//! computes a shard.
//!
//! A participant that has sent nothing for some assigned shard by the delta deadline is dropped from the round;
//! the round completes with the others. A member whose heartbeats stop for `member_timeout_ms` leaves; experts
//! it hosted are reassigned at the next round.

pub mod assign;
pub mod audit;
pub mod config;
pub mod equivocation;
pub mod judges;
mod legacy;
pub mod message_bound;
pub mod norm_ledger;
pub mod standing;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mana_protocol::limits::MAX_PARTICIPANTS;
use mana_protocol::{
    AcceptedDeltas, AggregationCall, CalledDelta, Capacity, CheckpointManifest, ContentHash,
    Deadlines, DeltaAnnouncement, DeltaScore, DeltaVerdict, Heartbeat, NormRecord, Participant,
    PublicKey, RejectCode, RejectedDelta, RoundAnnouncement, RoundCommit, ShardAttestation,
    ShardCall, ShardDissent, ShardEntry, ShardId, ShardJudgment, seed_commitment,
};

use crate::round::{NormHistory, NormSample};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use assign::{AssignError, Candidate, ExpertHosts, assign_experts, experts_by_node};
pub use config::{ConfigError, CoordinatorConfig, MAX_INNER_STEPS, default_inner_steps};
pub use judges::{
    Draw, DrawMismatch, Judges, JudgingRule, Tally, check_call_judges, draw_judges, escalated,
    tally,
};
pub use message_bound::{RoundMessageBound, check_round_messages, round_message_bound};
pub use standing::{Standing, StandingPolicy, Standings};

/// Why the coordinator could not be built, saved or restored.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The base checkpoint manifest could not be encoded or hashed, or a saved state could not be encoded.
    #[error("encoding coordinator state: {0}")]
    Encode(String),
    /// A saved state does not decode.
    #[error("decoding coordinator state: {0}")]
    Decode(String),
}

/// Most phase changes one [`Coordinator::tick`] makes.
const MAX_STEPS_PER_TICK: usize = 8;

/// What a member last told us about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its declared capacity.
    pub capacity: Capacity,
    /// When its last heartbeat arrived (coordinator time, unix ms).
    pub last_seen_ms: u64,
    /// The highest heartbeat sequence number seen, to ignore stale (reordered) heartbeats.
    pub last_seq: u64,
    /// Where it was last seen from, counted against [`StandingPolicy::max_members_per_ip`].
    pub origin: Origin,
}

/// Where a heartbeat's signer is, as the coordinator's own direct connection to it shows. Heartbeats are
/// gossip (any peer forwards them), so only the driver, which holds the connections, can tell; the state
/// machine counts members per address with it, so that a flood of keys from one host cannot fill the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Not known (yet): the coordinator has no direct connection to the signer (the heartbeat came through
    /// other peers, or over a relay, which shows no address).
    #[default]
    Unknown,
    /// The remote IP address of the coordinator's direct connection to the signer.
    Ip(IpAddr),
}

/// The block of addresses one host is counted under for the per-IP member cap: an IPv4 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 address's /64 prefix, since a host (a home
/// router, a cloud machine) is usually given a whole /64 and can use any address in it.
pub fn address_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The round in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveRound {
    /// What was announced.
    pub announcement: RoundAnnouncement,
    /// Deltas received, by (shard, node).
    pub deltas: BTreeMap<(ShardId, PublicKey), DeltaAnnouncement>,
    /// Participants dropped from the round (left, or missed the delta deadline).
    pub dropped: BTreeSet<PublicKey>,
    /// New shard entries taken (a quorum of the shard's judges signed each), by shard.
    pub results: BTreeMap<ShardId, ShardEntry>,
    /// The call for judgments ([`Action::CallAggregation`]), once the deltas are in.
    pub call: Option<Called>,
    /// Each judge's signed judgment, by shard and judge (the first a judge signs for a shard counts, until it
    /// signs another: then a void stands in its place, [`equivocation`]).
    pub attested: BTreeMap<ShardId, BTreeMap<PublicKey, ShardJudgment>>,
    /// The round's seed secret: its blake3 is in the announcement, the call reveals it, and it enters the
    /// score seed ([`ActiveRound::score_seed`]). Drawn from the tick's seed when the round opens; kept with
    /// the state, so a restarted coordinator reveals the secret it committed to.
    pub seed_secret: [u8; 32],
}

/// What the judges of a shard must agree on, bit for bit, for a quorum: the shard's new entry and every
/// verdict (the norms of the accepted deltas included). Scores are not part of it: they are published for
/// anyone to recompute, and another CPU may round a loss differently.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Agreement {
    /// The shard's new entry.
    pub entry: ShardEntry,
    /// One verdict per delta of the call's shard, in the call's order.
    pub verdicts: Vec<DeltaVerdict>,
}

impl Agreement {
    /// What `judgment` signs for the quorum.
    pub fn of(judgment: &ShardJudgment) -> Agreement {
        Agreement {
            entry: judgment.entry,
            verdicts: judgment.verdicts.clone(),
        }
    }
}

/// A round's call for judgments and its id ([`AggregationCall::hash`]), which every attestation names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Called {
    /// The call as published.
    pub call: AggregationCall,
    /// Its id, kept so that checking an attestation's does not encode and hash the whole call again.
    pub id: ContentHash,
}

/// The phase of the run (Psyche's `RunState`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RunState {
    /// Not enough members to start a round.
    WaitingForMembers,
    /// Participants train; deltas are collected until the delta deadline.
    RoundTrain(ActiveRound),
    /// Each shard's judges check and score its deltas, compute its next state and sign both; their
    /// attestations are collected until the commit deadline.
    RoundAggregate(ActiveRound),
    /// The round is committed; the next starts at `until_ms`.
    Cooldown {
        /// When the next round may start.
        until_ms: u64,
    },
}

impl RunState {
    /// A short name, for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            RunState::WaitingForMembers => "waiting-for-members",
            RunState::RoundTrain(_) => "round-train",
            RunState::RoundAggregate(_) => "round-aggregate",
            RunState::Cooldown { .. } => "cooldown",
        }
    }

    fn round_mut(&mut self) -> Option<&mut ActiveRound> {
        match self {
            RunState::RoundTrain(r) | RunState::RoundAggregate(r) => Some(r),
            _ => None,
        }
    }

    /// The round in progress, if any.
    pub fn round(&self) -> Option<&ActiveRound> {
        match self {
            RunState::RoundTrain(r) | RunState::RoundAggregate(r) => Some(r),
            _ => None,
        }
    }
}

/// What the daemon must do on the coordinator's behalf.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish this announcement on the rounds topic: a round starts.
    AnnounceRound(RoundAnnouncement),
    /// Publish this call on the rounds topic: each shard's judges check and score its deltas, compute its
    /// next state from the ones they accept and sign both; report each attestation with
    /// [`Coordinator::shard_attested`].
    CallAggregation(AggregationCall),
    /// Publish this commit on the rounds topic (and store its manifest): the round is closed.
    CommitRound(RoundCommit),
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    /// The event does not fit the current phase or round.
    #[error("{0}")]
    Refused(RejectCode),
}

/// The coordinator: configuration, members, the last committed checkpoint and the current phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coordinator {
    config: CoordinatorConfig,
    members: BTreeMap<PublicKey, Member>,
    /// The last committed checkpoint: the base of the next round.
    checkpoint: CheckpointManifest,
    /// The number of the next round to announce.
    next_round: u64,
    /// Expert hosts of the last announced round, kept so surviving hosts keep their experts.
    hosts: ExpertHosts,
    /// Every member's record, and the banned keys.
    standings: Standings,
    /// With an allowlist, only these keys may join (set by the driver, e.g. from a file it reloads; not
    /// saved: the driver sets it again after a restart).
    #[serde(skip)]
    allowlist: Option<BTreeSet<PublicKey>>,
    /// Whether loopback addresses, and signers whose address is unknown, escape the per-IP member cap: set
    /// by the driver of a loopback-only node (every peer it can hear runs on its own host); not saved.
    #[serde(skip)]
    trust_colocated: bool,
    state: RunState,
    /// The norms of recently accepted deltas, with their senders (at most `norm_history` a shard), from the
    /// quorums' verdicts: published with every call for the judges' norm bounds.
    norms: NormHistory,
    /// Members per address block (derived from the members; not saved).
    #[serde(skip)]
    blocks: BlockCounts,
    /// The holders outvoted on their own expert in the last commit, by expert: the next assignment gives it
    /// to them again only if no other member has room.
    barred: ExpertHosts,
}

/// How many members were last seen from each address block ([`address_block`]), kept up to date as members
/// join, move and leave, so that admitting a new key costs a lookup instead of a pass over every member
/// (the pass made a flood of joins quadratic: `engine/benches/coordinator_scale.rs`). Derived from the
/// members, built on first use (also after a restore) and not part of the state's equality.
#[derive(Debug, Clone, Default)]
struct BlockCounts {
    built: bool,
    counts: BTreeMap<IpAddr, usize>,
}

impl PartialEq for BlockCounts {
    fn eq(&self, _: &BlockCounts) -> bool {
        true
    }
}

impl BlockCounts {
    /// Members seen from `ip`'s block.
    fn at(&mut self, members: &BTreeMap<PublicKey, Member>, ip: IpAddr) -> usize {
        if !self.built {
            self.counts.clear();
            for m in members.values() {
                if let Origin::Ip(o) = m.origin {
                    *self.counts.entry(address_block(o)).or_default() += 1;
                }
            }
            self.built = true;
        }
        self.counts.get(&address_block(ip)).copied().unwrap_or(0)
    }

    /// A member is now seen from `origin`.
    fn add(&mut self, origin: Origin) {
        if let (true, Origin::Ip(ip)) = (self.built, origin) {
            *self.counts.entry(address_block(ip)).or_default() += 1;
        }
    }

    /// A member is no longer seen from `origin`.
    fn remove(&mut self, origin: Origin) {
        if let (true, Origin::Ip(ip)) = (self.built, origin) {
            let block = address_block(ip);
            if let Some(n) = self.counts.get_mut(&block) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.counts.remove(&block);
                }
            }
        }
    }
}

impl Coordinator {
    /// A new coordinator for `config.run`, whose first round starts from `checkpoint`.
    pub fn new(
        config: CoordinatorConfig,
        checkpoint: CheckpointManifest,
    ) -> Result<Coordinator, CoordinatorError> {
        config.validate()?;
        let next_round = checkpoint.round + 1;
        let norms = NormHistory::new(config.norm_history as usize);
        Ok(Coordinator {
            config,
            members: BTreeMap::new(),
            checkpoint,
            next_round,
            hosts: ExpertHosts::new(),
            standings: Standings::default(),
            allowlist: None,
            trust_colocated: false,
            state: RunState::WaitingForMembers,
            norms,
            blocks: BlockCounts::default(),
            barred: ExpertHosts::new(),
        })
    }

    /// Every member's record and the banned keys.
    pub fn standings(&self) -> &Standings {
        &self.standings
    }

    /// Sets the admission policy: `None` admits any key (an open run), `Some(keys)` only those keys; members
    /// not on a new list leave at once.
    pub fn set_allowlist(&mut self, allowlist: Option<BTreeSet<PublicKey>>) {
        if let Some(keys) = &allowlist {
            let gone: Vec<PublicKey> = self
                .members
                .keys()
                .filter(|k| !keys.contains(k))
                .copied()
                .collect();
            for node in gone {
                self.node_left(&node);
            }
        }
        self.allowlist = allowlist;
    }

    /// Trusts co-located peers (the driver of a loopback-only node sets it, like the network's
    /// `trust_colocated_ips`): loopback addresses are not counted against the per-IP member cap, and a key
    /// whose address is not known yet may join. Off by default; not saved (the driver sets it again).
    pub fn set_trust_colocated(&mut self, trust: bool) {
        self.trust_colocated = trust;
    }

    /// Whether `node` may be a member (beside the member caps): not banned, and on the allowlist if there is one.
    pub fn admits(&self, node: &PublicKey) -> bool {
        !self.standings.is_banned(node)
            && self
                .allowlist
                .as_ref()
                .is_none_or(|keys| keys.contains(node))
    }

    /// The current phase.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The members, by key.
    pub fn members(&self) -> &BTreeMap<PublicKey, Member> {
        &self.members
    }

    /// The last committed checkpoint.
    pub fn checkpoint(&self) -> &CheckpointManifest {
        &self.checkpoint
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Replaces the configuration for the rounds to come (a resumed run whose operator changed a setting on
    /// purpose). The run and its experts cannot change: the checkpoint is theirs.
    pub fn reconfigure(&mut self, config: CoordinatorConfig) -> Result<(), CoordinatorError> {
        config.validate()?;
        if config.run != self.config.run || config.experts != self.config.experts {
            return Err(CoordinatorError::Config(ConfigError {
                field: "run/experts",
                reason: "a resumed run keeps its run id and experts".into(),
            }));
        }
        self.norms.keep_per_shard(config.norm_history as usize);
        self.config = config;
        Ok(())
    }

    /// Saves the whole state (a format header, then bincode with the standard config), to be restored with
    /// [`Coordinator::from_bytes`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, CoordinatorError> {
        let mut bytes = legacy::STATE_HEADER.to_vec();
        bincode::serde::encode_into_std_write(self, &mut bytes, bincode::config::standard())
            .map_err(|e| CoordinatorError::Encode(e.to_string()))?;
        Ok(bytes)
    }

    /// Restores a state saved by [`Coordinator::to_bytes`] (a local file the coordinator wrote; still bounded and
    /// checked, as a truncated or corrupted file must give an error).
    pub fn from_bytes(bytes: &[u8]) -> Result<Coordinator, CoordinatorError> {
        let c = if let Some(body) = bytes.strip_prefix(legacy::STATE_HEADER.as_slice()) {
            legacy::decode_whole::<Coordinator>(body)?
        } else if let Some(body) = bytes.strip_prefix(legacy::STATE_HEADER_V4.as_slice()) {
            // Saved before the call carried its judging rule (protocol 11).
            legacy::decode_v4(body)?
        } else if let Some(body) = bytes.strip_prefix(legacy::STATE_HEADER_V3.as_slice()) {
            // Saved before the judges' verdicts (protocol 8).
            legacy::decode_v3(body)?
        } else if let Some(body) = bytes.strip_prefix(legacy::STATE_HEADER_V2.as_slice()) {
            // Saved before the shard judges' results (protocol 7).
            legacy::decode_v2(body)?
        } else {
            // Saved before the format header (and the per-IP member cap) existed.
            legacy::decode_v1(bytes)?
        };
        c.config.validate()?;
        Ok(c)
    }

    /// A heartbeat from `node` at `now_ms`: a new node joins (it takes part from the next round), a known one
    /// stays alive. Heartbeats for another run or older than the last seen are ignored. A key that is banned,
    /// not on the allowlist, or new while the run has `max_members`, or while its `origin` already has
    /// `max_members_per_ip` members, or whose origin is unknown (see [`Coordinator::set_trust_colocated`]), is
    /// refused (`not-admitted`). A member already in keeps its place whatever its origin; a known origin
    /// replaces the one it had.
    pub fn node_heartbeat(
        &mut self,
        now_ms: u64,
        node: PublicKey,
        origin: Origin,
        heartbeat: &Heartbeat,
    ) -> Result<(), EventError> {
        if heartbeat.run != self.config.run {
            return Err(EventError::Refused(RejectCode::UnknownRun));
        }
        if !self.admits(&node) {
            return Err(EventError::Refused(RejectCode::NotAdmitted));
        }
        if let Some(m) = self.members.get_mut(&node) {
            if heartbeat.seq > m.last_seq {
                m.capacity = heartbeat.capacity;
                m.last_seen_ms = now_ms;
                m.last_seq = heartbeat.seq;
                if origin != Origin::Unknown && origin != m.origin {
                    self.blocks.remove(m.origin);
                    self.blocks.add(origin);
                    m.origin = origin;
                }
            }
            return Ok(());
        }
        if !self.has_room_for(origin) {
            return Err(EventError::Refused(RejectCode::NotAdmitted));
        }
        self.blocks.add(origin);
        self.members.insert(
            node,
            Member {
                capacity: heartbeat.capacity,
                last_seen_ms: now_ms,
                last_seq: heartbeat.seq,
                origin,
            },
        );
        Ok(())
    }

    /// Whether a new key seen from `origin` fits under the member cap and the per-IP cap. A key whose address
    /// is unknown waits (the driver learns it within a heartbeat or two), unless co-located peers are trusted.
    fn has_room_for(&mut self, origin: Origin) -> bool {
        let policy = &self.config.standing;
        if self.members.len() >= policy.max_members {
            return false;
        }
        match origin {
            Origin::Unknown => self.trust_colocated,
            Origin::Ip(ip) if self.trust_colocated && address_block(ip).is_loopback() => true,
            Origin::Ip(ip) => self.blocks.at(&self.members, ip) < policy.max_members_per_ip,
        }
    }

    /// Members last seen from `ip`'s address block ([`address_block`]: the address itself for IPv4, its /64
    /// for IPv6).
    pub fn members_at(&self, ip: IpAddr) -> usize {
        let block = address_block(ip);
        self.members
            .values()
            .filter(|m| matches!(m.origin, Origin::Ip(o) if address_block(o) == block))
            .count()
    }

    /// `node` left (said goodbye, or the network lost it): it is no member any more and is dropped from the
    /// round in progress.
    pub fn node_left(&mut self, node: &PublicKey) {
        if let Some(m) = self.members.remove(node) {
            self.blocks.remove(m.origin);
        }
        if let Some(round) = self.state.round_mut()
            && round.announcement.participant(node).is_some()
        {
            round.dropped.insert(*node);
            // Before the call its deltas go too: the call's senders are the pool its judges are drawn from
            // (`judges::check_call_judges`), and one gone should not be drawn.
            if round.call.is_none() {
                round.deltas.retain(|(_, n), _| n != node);
            }
        }
    }

    /// A delta announcement from `node` (signature already checked). Refused unless it is for the round in
    /// training, from a participant still in it, for a shard assigned to it, from the round's base, on time,
    /// and the first for that (shard, node).
    pub fn delta_announced(
        &mut self,
        now_ms: u64,
        node: PublicKey,
        delta: DeltaAnnouncement,
    ) -> Result<(), EventError> {
        let refuse = |c| Err(EventError::Refused(c));
        if delta.run != self.config.run {
            return refuse(RejectCode::UnknownRun);
        }
        let RunState::RoundTrain(round) = &mut self.state else {
            return refuse(RejectCode::StaleRound);
        };
        let ann = &round.announcement;
        if delta.round < ann.round {
            return refuse(RejectCode::StaleRound);
        }
        if delta.round > ann.round {
            return refuse(RejectCode::FutureRound);
        }
        let Some(p) = ann.participant(&node) else {
            return refuse(RejectCode::NotParticipant);
        };
        if round.dropped.contains(&node) {
            return refuse(RejectCode::NotParticipant);
        }
        if !p.shards.contains(&delta.shard) {
            return refuse(RejectCode::ShardNotAssigned);
        }
        if delta.base_checkpoint != ann.base_checkpoint {
            return refuse(RejectCode::WrongBase);
        }
        if now_ms > ann.deadlines.deltas_by_ms {
            return refuse(RejectCode::Late);
        }
        if round.deltas.contains_key(&(delta.shard, node)) {
            return refuse(RejectCode::Inconsistent);
        }
        round.deltas.insert((delta.shard, node), delta);
        Ok(())
    }

    /// A judge's signed judgments for round `round` (`judge` is the envelope's signer). Each judgment counts for
    /// a shard the call names with `judge` among its judges, when it has one verdict per delta of the shard;
    /// the first judgment a judge signs for a shard is kept, and voided if the judge signs another
    /// ([`equivocation`]: it then counts as absent, and the commit records it as a dissenter); one whose new
    /// entry has another size than the
    /// shard's (a shard's layout is the run's) does not count. A result is taken as soon as a quorum of its
    /// judges signed it; returns the results this attestation completed (the coordinator holds their hashes,
    /// never their bytes). Refused when no call is under way for the round (`stale-round`),
    /// for another call than the round's (`inconsistent`), or when the signer judges none of the shards it
    /// names (`shard-not-assigned`).
    pub fn shard_attested(
        &mut self,
        round: u64,
        judge: PublicKey,
        attestation: &ShardAttestation,
    ) -> Result<Vec<ShardEntry>, EventError> {
        let RunState::RoundAggregate(r) = &mut self.state else {
            return Err(EventError::Refused(RejectCode::StaleRound));
        };
        let Some(Called { call, id }) = &r.call else {
            return Err(EventError::Refused(RejectCode::StaleRound));
        };
        if r.announcement.round != round || attestation.round != round || call.round != round {
            return Err(EventError::Refused(RejectCode::StaleRound));
        }
        if attestation.call != *id {
            return Err(EventError::Refused(RejectCode::Inconsistent));
        }
        let (mut counted, mut voided) = (Vec::new(), Vec::new());
        for judgment in &attestation.results {
            let shard = judgment.entry.shard;
            let Some(part) = call.shard(&shard) else {
                continue;
            };
            // A new state of this round, or the base state itself (no delta accepted), of the shard's size: a
            // quorum of liars cannot make holders and mirrors fetch more than a shard.
            let base = self.checkpoint.shard(&shard);
            let unchanged = base == Some(&judgment.entry);
            if (judgment.entry.round != round && !unchanged)
                || base.map(|b| b.size) != Some(judgment.entry.size)
                || judgment.verdicts.len() != part.deltas.len()
                || !judges_of(&r.announcement, part).contains(&judge)
            {
                continue;
            }
            let judged = r.attested.entry(shard).or_default();
            match judged.get_mut(&judge) {
                None => {
                    judged.insert(judge, judgment.clone());
                }
                Some(kept) => {
                    if equivocation::equivocates(kept, judgment) {
                        tracing::warn!(round, %shard, judge = %judge, "a judge signed two judgments of one shard: both void");
                        *kept = equivocation::void_of(kept);
                        voided.push(shard);
                    }
                }
            }
            counted.push(shard);
        }
        if counted.is_empty() {
            return Err(EventError::Refused(RejectCode::ShardNotAssigned));
        }
        // A result taken with the equivocator's signature may have lost its quorum: the round waits for the
        // shard's other judges again (until its deadline).
        for shard in voided {
            if !matches!(tally_shard(r, &shard), Some(Tally::Quorum { .. })) {
                r.results.remove(&shard);
            }
        }
        Ok(take_quorums(r, &counted))
    }

    /// Advances the state machine to time `now_ms`; `seed` drives this tick's random choices (the next
    /// round's assignment and data seeds). Returns what the daemon must do.
    pub fn tick(&mut self, now_ms: u64, seed: u64) -> Result<Vec<Action>, CoordinatorError> {
        self.expire_members(now_ms);
        let mut actions = Vec::new();
        // Phases may complete back to back (e.g. a round where everyone left); step until nothing moves. A full
        // cycle is five phases, so the bound only guards against a zero cooldown spinning through empty rounds.
        for _ in 0..MAX_STEPS_PER_TICK {
            let before = self.state.name();
            let step = self.step(now_ms, seed)?;
            let moved = step.is_some() || self.state.name() != before;
            actions.extend(step);
            if !moved {
                break;
            }
        }
        Ok(actions)
    }

    fn expire_members(&mut self, now_ms: u64) {
        let timeout = self.config.member_timeout_ms;
        let gone: Vec<PublicKey> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms) > timeout)
            .map(|(k, _)| *k)
            .collect();
        for node in gone {
            self.node_left(&node);
        }
    }

    fn step(&mut self, now_ms: u64, seed: u64) -> Result<Option<Action>, CoordinatorError> {
        let state = std::mem::replace(&mut self.state, RunState::WaitingForMembers);
        let (next, action) = match state {
            RunState::WaitingForMembers => match self.start_round(now_ms, seed)? {
                Some(round) => {
                    let ann = round.announcement.clone();
                    (
                        RunState::RoundTrain(round),
                        Some(Action::AnnounceRound(ann)),
                    )
                }
                None => (RunState::WaitingForMembers, None),
            },
            RunState::Cooldown { until_ms } if now_ms >= until_ms => {
                (RunState::WaitingForMembers, None)
            }
            cooldown @ RunState::Cooldown { .. } => (cooldown, None),
            RunState::RoundTrain(mut round) => {
                let deadline = now_ms > round.announcement.deadlines.deltas_by_ms;
                if deadline || all_deltas_in(&round) {
                    drop_missing(&mut round);
                    let call = self.judgment_call(&round);
                    let id = call
                        .hash()
                        .map_err(|e| CoordinatorError::Encode(e.to_string()))?;
                    round.call = Some(Called {
                        call: call.clone(),
                        id,
                    });
                    (
                        RunState::RoundAggregate(round),
                        Some(Action::CallAggregation(call)),
                    )
                } else {
                    (RunState::RoundTrain(round), None)
                }
            }
            RunState::RoundAggregate(mut round) => {
                // A state saved by a version that took a result only once its blob was fetched may hold
                // quorums not taken yet.
                let shards: Vec<ShardId> = round.attested.keys().copied().collect();
                take_quorums(&mut round, &shards);
                let all_in = round.call.as_ref().is_none_or(|c| {
                    c.call
                        .shards
                        .iter()
                        .all(|s| round.results.contains_key(&s.shard))
                });
                if all_in || now_ms > round.announcement.deadlines.commit_by_ms {
                    let commit = self.commit(round)?;
                    (
                        RunState::Cooldown {
                            until_ms: now_ms.saturating_add(self.config.cooldown_ms),
                        },
                        Some(Action::CommitRound(commit)),
                    )
                } else {
                    (RunState::RoundAggregate(round), None)
                }
            }
        };
        self.state = next;
        Ok(action)
    }

    /// Builds the next round from the current members, or `None` if they cannot carry one.
    fn start_round(
        &mut self,
        now_ms: u64,
        seed: u64,
    ) -> Result<Option<ActiveRound>, CoordinatorError> {
        let trunk_slot = u32::from(self.config.trunk_everywhere);
        // Capacity is earned: a member's weight is its standing's, whatever throughput it declares; its own
        // `max_shards` still caps what it is given.
        let policy = self.config.standing;
        let candidates: Vec<Candidate> = self
            .members
            .iter()
            .filter(|(_, m)| m.capacity.max_shards >= trunk_slot)
            .map(|(k, m)| {
                let capacity = Capacity {
                    tokens_per_second: self.standings.get(k).weight(&policy),
                    ..m.capacity
                };
                Candidate {
                    node: *k,
                    capacity,
                    reserved_slots: trunk_slot,
                }
            })
            .collect();
        // Members that can take no shard (mirrors, evaluators) do not count towards the members a round needs.
        if candidates.len() < self.config.min_members {
            return Ok(None);
        }
        let candidates = self.within_participant_cap(candidates, seed);
        let hosts = match assign_experts(
            &candidates,
            &self.config.experts,
            self.config.replication,
            &self.hosts,
            &self.barred,
            seed,
        ) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "not starting a round yet");
                return Ok(None);
            }
        };
        let by_node = experts_by_node(&hosts);
        let round = self.next_round;
        let participants: Vec<Participant> = candidates
            .iter()
            .map(|c| {
                let mut shards = Vec::new();
                if self.config.trunk_everywhere {
                    shards.push(ShardId::Trunk);
                }
                shards.extend(by_node.get(&c.node).into_iter().flatten().copied());
                let data_seeds = (0..self.config.data_seeds_per_node)
                    .map(|i| {
                        let mut tag = round.to_le_bytes().to_vec();
                        tag.extend_from_slice(&i.to_le_bytes());
                        assign::mix(seed, &tag, &c.node.0)
                    })
                    .collect();
                Participant {
                    node: c.node,
                    shards,
                    data_seeds,
                }
            })
            .filter(|p| !p.shards.is_empty())
            .collect();
        if participants.is_empty() {
            return Ok(None);
        }
        let base_checkpoint = self
            .checkpoint
            .hash()
            .map_err(|e| CoordinatorError::Encode(e.to_string()))?;
        let deltas_by_ms = now_ms.saturating_add(self.config.train_ms);
        let seed_secret = round_secret(seed, round);
        let announcement = RoundAnnouncement {
            run: self.config.run.clone(),
            round,
            base_checkpoint,
            participants,
            inner_steps: self.config.inner_steps,
            hyper: self.config.hyper.clone(),
            max_norm_ratio: self.config.max_norm_ratio,
            deadlines: Deadlines {
                deltas_by_ms,
                commit_by_ms: deltas_by_ms.saturating_add(self.config.verify_ms),
            },
            corpus: self.config.corpus,
            seed_commitment: seed_commitment(&seed_secret),
        };
        self.hosts = hosts;
        // The bar holds for one assignment.
        self.barred.clear();
        self.next_round = round + 1;
        Ok(Some(ActiveRound {
            announcement,
            deltas: BTreeMap::new(),
            dropped: BTreeSet::new(),
            results: BTreeMap::new(),
            call: None,
            attested: BTreeMap::new(),
            seed_secret,
        }))
    }

    /// At most [`MAX_PARTICIPANTS`] of `candidates` (what one announcement may carry): members that hosted
    /// experts last round first (their shards stay where they are), then by standing, then in an order
    /// drawn from `seed`. The others stay members and wait for a place (a participant leaving, or one
    /// banned). Below the cap, every candidate takes part.
    fn within_participant_cap(&self, mut candidates: Vec<Candidate>, seed: u64) -> Vec<Candidate> {
        if candidates.len() <= MAX_PARTICIPANTS {
            return candidates;
        }
        let hosted: BTreeSet<PublicKey> = self.hosts.values().flatten().copied().collect();
        let policy = self.config.standing;
        candidates.sort_by_cached_key(|c| {
            (
                !hosted.contains(&c.node),
                std::cmp::Reverse(self.standings.get(&c.node).weight(&policy) as u32),
                assign::mix(seed, b"mana/participant-cap", &c.node.0),
            )
        });
        candidates.truncate(MAX_PARTICIPANTS);
        candidates
    }

    /// Closes `round`: each shard whose result was taken takes it, with its quorum's verdicts (the accepted
    /// deltas, each with its weight and norm, and the refused ones with their reasons), the scores one of
    /// the quorum's signers published (the first by key) and the judges that signed otherwise or nothing;
    /// every other shard keeps its entry, and its deltas are listed as refused `late` (nobody's fault but the
    /// round's: it costs their senders nothing). The verdicts go into the senders' standings, the dissenters
    /// are charged, and the accepted norms go into the norm history.
    fn commit(&mut self, round: ActiveRound) -> Result<RoundCommit, CoordinatorError> {
        let r = round.announcement.round;
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        let mut scores: Vec<DeltaScore> = Vec::new();
        let mut verdicts: Vec<(PublicKey, DeltaVerdict)> = Vec::new();
        let mut dissent: Vec<ShardDissent> = Vec::new();
        // The results that still have their quorum now: one taken earlier may have lost it since, when one of
        // its signers equivocated.
        let mut taken: BTreeMap<ShardId, ShardEntry> = BTreeMap::new();
        let parts = round
            .call
            .as_ref()
            .map(|c| c.call.shards.as_slice())
            .unwrap_or(&[]);
        for part in parts {
            let sender = |d: &CalledDelta| {
                round
                    .announcement
                    .participants
                    .get(d.sender as usize)
                    .map(|p| p.node)
            };
            let voided = equivocators(&round, &part.shard);
            let quorum = match (
                round.results.get(&part.shard),
                tally_shard(&round, &part.shard),
            ) {
                (
                    Some(_),
                    Some(Tally::Quorum {
                        result,
                        signers,
                        dissenters,
                        absent,
                    }),
                ) => {
                    let (dissenters, absent) = with_equivocators(dissenters, absent, &voided);
                    if !(dissenters.is_empty() && absent.is_empty()) {
                        dissent.push(ShardDissent {
                            shard: part.shard,
                            dissenters,
                            absent,
                        });
                    }
                    Some((result, signers))
                }
                _ => {
                    // A held shard's record names only its equivocators (there is no quorum to dissent from).
                    if !voided.is_empty() {
                        dissent.push(ShardDissent {
                            shard: part.shard,
                            dissenters: voided,
                            absent: Vec::new(),
                        });
                    }
                    None
                }
            };
            let Some((agreement, signers)) = quorum else {
                for d in &part.deltas {
                    if let Some(node) = sender(d) {
                        rejected.push(RejectedDelta {
                            shard: part.shard,
                            node,
                            payload_hash: d.payload_hash,
                            reason: RejectCode::Late,
                        });
                    }
                }
                continue;
            };
            taken.insert(part.shard, agreement.entry);
            if let Some(first) = signers
                .first()
                .and_then(|k| round.attested.get(&part.shard)?.get(k))
            {
                // Only scores of deltas the call names for this shard.
                scores.extend(first.scores.iter().filter(|s| {
                    s.shard == part.shard
                        && part.deltas.iter().any(|d| d.payload_hash == s.payload_hash)
                }));
            }
            let mut list = AcceptedDeltas {
                shard: part.shard,
                deltas: Vec::new(),
                weights: Vec::new(),
                norms: Vec::new(),
            };
            for (d, v) in part.deltas.iter().zip(&agreement.verdicts) {
                let Some(node) = sender(d) else { continue };
                verdicts.push((node, *v));
                match v {
                    DeltaVerdict::Accept { norm } => {
                        list.deltas.push(d.payload_hash);
                        list.weights.push(d.weight);
                        list.norms.push(*norm);
                        self.norms.push(NormSample {
                            shard: part.shard,
                            sender: node,
                            norm: *norm,
                        });
                    }
                    DeltaVerdict::Refuse(reason) => rejected.push(RejectedDelta {
                        shard: part.shard,
                        node,
                        payload_hash: d.payload_hash,
                        reason: *reason,
                    }),
                }
            }
            if !list.deltas.is_empty() {
                accepted.push(list);
            }
        }
        self.charge_dissenters(r, &dissent);
        self.unhost_dissenters(&dissent);
        self.update_standings(&round, &verdicts);
        let mut shards: BTreeMap<ShardId, ShardEntry> = self
            .checkpoint
            .shards
            .iter()
            .map(|e| (e.shard, *e))
            .collect();
        shards.extend(taken);
        let checkpoint = CheckpointManifest {
            run: self.config.run.clone(),
            round: r,
            shards: shards.into_values().collect(),
        };
        rejected.sort_by_key(|d| (d.shard, d.node, d.payload_hash));
        scores.sort_by_key(|s| (s.shard, s.payload_hash));
        scores.dedup_by_key(|s| (s.shard, s.payload_hash));
        self.checkpoint = checkpoint.clone();
        Ok(RoundCommit {
            run: self.config.run.clone(),
            round: r,
            accepted,
            rejected,
            checkpoint,
            scores,
            seed_secret: round.seed_secret,
            // Parts are sorted by shard, so is the dissent.
            dissent,
        })
    }

    /// The call for round `round`'s judgments: for each shard with deltas, every delta (its sender as an
    /// index into the announcement's participants, its payload, and its weight: its sender's standing now)
    /// and its judges drawn by the run's judging rule from the round's score seed (holders: the participants
    /// assigned it; verifiers: the others), with the verdict rule, the norm history and the seed secret. Only
    /// participants still in the round judge: one dropped for missing the delta deadline is likely gone, and
    /// a judge that never answers only stalls its shard (a key that joins and never trains cannot be drawn).
    fn judgment_call(&self, round: &ActiveRound) -> AggregationCall {
        let ann = &round.announcement;
        let index: BTreeMap<PublicKey, u32> = ann
            .participants
            .iter()
            .enumerate()
            .map(|(i, p)| (p.node, i as u32))
            .collect();
        // The judges' pool: the participants with deltas in the call, which every judge can tell from the call
        // alone (`judges::check_call_judges`). Once the deltas are in, they are those still in the round: a
        // dropped participant's deltas are gone (`drop_missing`, `node_left`).
        let senders: BTreeSet<PublicKey> = round.deltas.keys().map(|(_, n)| *n).collect();
        let active: Vec<&Participant> = ann
            .participants
            .iter()
            .filter(|p| senders.contains(&p.node))
            .collect();
        let keys: Vec<PublicKey> = active.iter().map(|p| p.node).collect();
        let seed = round.score_seed();
        let mut by_shard: BTreeMap<ShardId, Vec<CalledDelta>> = BTreeMap::new();
        for ((shard, node), d) in &round.deltas {
            let Some(sender) = index.get(node).copied() else {
                continue;
            };
            by_shard.entry(*shard).or_default().push(CalledDelta {
                sender,
                payload_hash: d.payload_hash,
                payload_size: d.payload_size,
                weight: self.standings.get(node).delta_weight(),
            });
        }
        let rule = &self.config.judging;
        let draw = Draw::new(seed, &keys);
        let mut holders_of: BTreeMap<ShardId, Vec<PublicKey>> = BTreeMap::new();
        for p in &active {
            for shard in &p.shards {
                holders_of.entry(*shard).or_default().push(p.node);
            }
        }
        let shards = by_shard
            .into_iter()
            .map(|(shard, mut deltas)| {
                deltas.sort_by_key(|d| (d.payload_hash, d.sender));
                let holders = holders_of.get(&shard).map(Vec::as_slice).unwrap_or(&[]);
                let judges = draw.judges(
                    shard,
                    holders,
                    rule,
                    judges::escalated(&self.checkpoint, ann.round, &shard),
                );
                let at = |k: &PublicKey| index.get(k).copied();
                ShardCall {
                    shard,
                    deltas,
                    holders: judges.holders.iter().filter_map(at).collect(),
                    verifiers: judges.verifiers.iter().filter_map(at).collect(),
                }
            })
            .collect();
        AggregationCall {
            run: ann.run.clone(),
            round: ann.round,
            // The announcement's: the checkpoint the round was opened on (not hashed again).
            base_checkpoint: ann.base_checkpoint,
            seed_secret: round.seed_secret,
            rule: self.config.verdict,
            judging: self.config.judging,
            norm_history: self.config.norm_history,
            norms: self
                .norms
                .samples()
                .into_iter()
                .map(|s| NormRecord {
                    shard: s.shard,
                    sender: index.get(&s.sender).copied(),
                    norm: s.norm,
                })
                .collect(),
            shards,
        }
    }
}

impl Coordinator {
    /// A holder that signed another judgment of its own shard than the quorum's (or two) loses the shard: its
    /// state of it is not the committed one (or it lies about it), and a pair of colluding holders would
    /// otherwise keep the shard and split every round's judges on it. The next assignment gives the slot to
    /// another member with room (it is barred from that expert for that assignment, unless nobody else has
    /// room). A holder that signed nothing keeps its shard: it may have crashed, and a member that leaves
    /// loses its shards anyway.
    fn unhost_dissenters(&mut self, dissent: &[ShardDissent]) {
        // `barred` is empty here: the announcement of the round being committed cleared it.
        for d in dissent {
            if let Some(hosts) = self.hosts.get_mut(&d.shard) {
                let outvoted: Vec<PublicKey> = hosts
                    .iter()
                    .filter(|k| d.dissenters.contains(k))
                    .copied()
                    .collect();
                hosts.retain(|k| !outvoted.contains(k));
                if !outvoted.is_empty() {
                    self.barred.insert(d.shard, outvoted);
                }
            }
        }
    }

    /// A judge that signed another result than the one its shard's quorum signed is on record: it loses
    /// standing as for one refused contribution (`inconsistent`) in the round, however many of its results
    /// were outvoted (a judge whose machine computes differently is wrong on every shard it judges, and one
    /// round should not ban it; a liar pays again every round it lies).
    fn charge_dissenters(&mut self, round: u64, dissent: &[ShardDissent]) {
        let policy = self.config.standing;
        let mut dissenters = BTreeSet::new();
        for d in dissent {
            for node in &d.dissenters {
                tracing::warn!(round, shard = %d.shard, node = %node, "a judge signed another result than its shard's quorum");
                dissenters.insert(*node);
            }
        }
        for node in dissenters {
            self.standings
                .refused(node, RejectCode::Inconsistent, &policy);
        }
    }

    /// The quorums' verdicts into the members' standings (the deltas of a shard without a quorum are not
    /// their senders' doing and count for nothing); then bans whoever fell to the threshold (they leave at
    /// once) and bounds the records of departed members.
    fn update_standings(&mut self, round: &ActiveRound, verdicts: &[(PublicKey, DeltaVerdict)]) {
        let policy = self.config.standing;
        for (node, verdict) in verdicts {
            match verdict {
                DeltaVerdict::Accept { .. } => self.standings.accepted(*node),
                DeltaVerdict::Refuse(code) => self.standings.refused(*node, *code, &policy),
            }
        }
        for node in &round.dropped {
            // Dropped while still a member: it missed the delta deadline (a member that left is not charged).
            if self.members.contains_key(node) {
                self.standings.dropped(*node);
            }
        }
        for node in self.standings.ban_faulty(round.announcement.round, &policy) {
            tracing::warn!(node = %node, round = round.announcement.round, "member banned for its record");
            if let Some(m) = self.members.remove(&node) {
                self.blocks.remove(m.origin);
            }
        }
        let members = &self.members;
        self.standings
            .forget_departed(|k| members.contains_key(k), policy.max_members);
    }
}

/// Every (participant, shard) pair still in the round has delivered.
fn all_deltas_in(round: &ActiveRound) -> bool {
    round
        .announcement
        .participants
        .iter()
        .filter(|p| !round.dropped.contains(&p.node))
        .all(|p| {
            p.shards
                .iter()
                .all(|s| round.deltas.contains_key(&(*s, p.node)))
        })
}

/// At the delta deadline: a participant missing any assigned delta is dropped, and its deltas go too (a
/// partial contribution is not worth waiting for nor half-applying). Deltas of participants who left are
/// dropped as well.
fn drop_missing(round: &mut ActiveRound) {
    for p in &round.announcement.participants {
        if !p
            .shards
            .iter()
            .all(|s| round.deltas.contains_key(&(*s, p.node)))
        {
            round.dropped.insert(p.node);
        }
    }
    let dropped = round.dropped.clone();
    round.deltas.retain(|(_, node), _| !dropped.contains(node));
}

impl ActiveRound {
    /// The seed of this round's score batches ([`crate::round::score_seed`]) over every delta of the round
    /// (after the delta deadline, every delta of the call): the same set the commit lists as accepted or
    /// refused, so a holder recomputes it from the commit ([`crate::round::commit_score_seed`]) and a judge
    /// from the call ([`crate::round::call_score_seed`]).
    pub fn score_seed(&self) -> u64 {
        crate::round::score_seed(
            &self.announcement.run,
            self.announcement.round,
            &self.seed_secret,
            self.deltas.values().map(|d| d.payload_hash),
        )
    }
}

/// Takes, among `shards`, each result a quorum of its judges signed and that is not taken yet; returns those.
/// A strict majority of the judges cannot sign two different agreements, so a result taken stays the
/// quorum's whatever attestations come later.
fn take_quorums(round: &mut ActiveRound, shards: &[ShardId]) -> Vec<ShardEntry> {
    let mut taken = Vec::new();
    for shard in shards {
        if round.results.contains_key(shard) {
            continue;
        }
        if let Some(Tally::Quorum { result, .. }) = tally_shard(round, shard) {
            round.results.insert(*shard, result.entry);
            taken.push(result.entry);
        }
    }
    taken
}

/// Domain tag of [`round_secret`].
const SECRET_TAG: &[u8] = b"mana/seed-secret/v1";

/// Round `round`'s seed secret, drawn from the seed of the tick that opens it (the daemon's randomness: the
/// state machine itself has none).
fn round_secret(seed: u64, round: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(SECRET_TAG);
    h.update(&seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    *h.finalize().as_bytes()
}

/// The judges of one shard of a call, by key (indices outside the announcement are no one).
pub fn judges_of(announcement: &RoundAnnouncement, call: &ShardCall) -> Judges {
    let key = |i: &u32| announcement.participants.get(*i as usize).map(|p| p.node);
    Judges {
        holders: call.holders.iter().filter_map(key).collect(),
        verifiers: call.verifiers.iter().filter_map(key).collect(),
    }
}

/// The judges whose judgment of `shard` was voided for equivocation in `round`, sorted.
fn equivocators(round: &ActiveRound, shard: &ShardId) -> Vec<PublicKey> {
    round
        .attested
        .get(shard)
        .into_iter()
        .flatten()
        .filter(|(_, j)| equivocation::is_void(j))
        .map(|(k, _)| *k)
        .collect()
}

/// A quorum's `dissenters` and `absent` (sorted), with the `voided` judges (sorted), whom the tally counted
/// as absent, moved to the dissenters: they signed two judgments.
fn with_equivocators(
    mut dissenters: Vec<PublicKey>,
    mut absent: Vec<PublicKey>,
    voided: &[PublicKey],
) -> (Vec<PublicKey>, Vec<PublicKey>) {
    absent.retain(|k| !voided.contains(k));
    dissenters.extend_from_slice(voided);
    dissenters.sort();
    dissenters.dedup();
    (dissenters, absent)
}

/// How the judges' signed judgments for `shard` stand, if the round's call names it.
fn tally_shard(round: &ActiveRound, shard: &ShardId) -> Option<Tally<Agreement>> {
    let part = round.call.as_ref()?.call.shard(shard)?;
    Some(tally_judgments(
        &round.announcement,
        part,
        round.attested.get(shard).into_iter().flatten(),
    ))
}

/// How the judgments `signed` (by signer) of `part`'s shard stand among its judges in `announcement`'s round:
/// the one count behind the coordinator's commit and any observer's audit ([`audit::audit_shard`]). A
/// judgment of another shard, or without one verdict per called delta, does not count.
pub(crate) fn tally_judgments<'a>(
    announcement: &RoundAnnouncement,
    part: &ShardCall,
    signed: impl IntoIterator<Item = (&'a PublicKey, &'a ShardJudgment)>,
) -> Tally<Agreement> {
    let agreements: BTreeMap<PublicKey, Agreement> = signed
        .into_iter()
        .filter(|(_, j)| j.entry.shard == part.shard && j.verdicts.len() == part.deltas.len())
        .map(|(k, j)| (*k, Agreement::of(j)))
        .collect();
    tally(&judges_of(announcement, part), &agreements)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
