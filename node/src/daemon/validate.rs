//! Judging gossip: topic, size, envelope, replay window, then the protocol crate's rules. The verdict goes
//! back to gossipsub; rejections are logged in the store with their reason code.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mana_protocol::limits::MAX_ENVELOPE_BYTES;
use mana_protocol::validation::{ValidationContext, ValidationLimits};
use mana_protocol::{
    Message, PublicKey, RejectCode, Rejection, TopicKind, decode_envelope, decode_parcel, topic,
    validate_envelope,
};

use super::{Accepted, Shared, blocking, equivocation, sync};
use crate::net::Verdict;

/// The reason code of a replayed message (not a protocol code: replays are caught here, by hash).
pub const REPLAYED: &str = "replayed";
/// The reason code of a message on a topic that is not its own.
pub const WRONG_TOPIC: &str = "wrong-topic";

/// Remembers the hashes of envelopes seen within a window (twice the allowed clock skew: older envelopes
/// fail the clock check anyway), so a replay is caught even after gossipsub's duplicate cache forgot it.
pub(crate) struct ReplayGuard {
    window: Duration,
    seen: HashMap<[u8; 32], Instant>,
    order: VecDeque<([u8; 32], Instant)>,
}

/// How long an envelope's hash is remembered: twice the allowed clock skew (older envelopes fail the clock check
/// anyway).
pub(crate) fn replay_window() -> Duration {
    Duration::from_millis(2 * ValidationLimits::default().max_clock_skew_ms)
}

/// Most hashes remembered; beyond it the oldest go first.
const MAX_SEEN: usize = 200_000;

impl ReplayGuard {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records an envelope this node signed and publishes: a copy that comes back is a replay.
    pub fn note_own(&mut self, data: &[u8], now: Instant) {
        self.check_and_insert(*blake3::hash(data).as_bytes(), now);
    }

    /// True if `hash` was seen within the window; records it otherwise.
    fn check_and_insert(&mut self, hash: [u8; 32], now: Instant) -> bool {
        while let Some(&(old, at)) = self.order.front() {
            if now.saturating_duration_since(at) > self.window || self.order.len() > MAX_SEEN {
                self.order.pop_front();
                if self.seen.get(&old) == Some(&at) {
                    self.seen.remove(&old);
                }
            } else {
                break;
            }
        }
        if self.seen.contains_key(&hash) {
            return true;
        }
        self.seen.insert(hash, now);
        self.order.push_back((hash, now));
        false
    }
}

/// The outcome of judging one message.
pub(crate) enum Judgement {
    Accept(Accepted),
    /// A second, different commit of a round signed by the coordinator: passed on (it is authentic, and lets
    /// others catch it too) but never delivered or followed; the pair is kept as evidence.
    Equivocation(Box<equivocation::Equivocation>),
    Reject {
        reason: String,
        detail: String,
    },
    Ignore {
        reason: String,
    },
}

impl Judgement {
    pub fn verdict(&self) -> Verdict {
        match self {
            Judgement::Accept(_) | Judgement::Equivocation(_) => Verdict::Accept,
            Judgement::Reject { .. } => Verdict::Reject,
            Judgement::Ignore { .. } => Verdict::Ignore,
        }
    }
}

fn reject(code: &str, detail: impl ToString) -> Judgement {
    Judgement::Reject {
        reason: code.to_owned(),
        detail: detail.to_string(),
    }
}

/// Judges one gossip message forwarded by `source` on `topic_name`, heard at `heard_ms` (unix ms): its
/// timestamp is checked against that time, not the time of judging, so a message that waited in this node
/// (behind an open parcel, see [`super::parcel`]) is not refused for the wait.
pub(crate) fn judge(
    shared: &Shared,
    source: PeerId,
    topic_name: &str,
    data: &[u8],
    heard_ms: u64,
) -> Judgement {
    let run = &shared.config.net.run_id;
    let Some(kind) = TopicKind::ALL
        .into_iter()
        .find(|k| topic(run, *k) == topic_name)
    else {
        return Judgement::Ignore {
            reason: "unknown-topic".into(),
        };
    };
    if data.len() > MAX_ENVELOPE_BYTES {
        return reject(
            RejectCode::TooLarge.as_str(),
            format!("{} bytes", data.len()),
        );
    }
    let envelope = match decode_envelope(data) {
        Ok(envelope) => envelope,
        Err(e) => return reject(RejectCode::BadEnvelope.as_str(), e),
    };
    judge_envelope(shared, source, kind, data, envelope, heard_ms)
}

/// Judges the envelope `data` that the parcel `header` named, fetched by its hash after `source` passed the
/// header on: an envelope of the coordinator (up to a parcel's size), holding a message of the rounds topic,
/// of the header's round, and not itself a parcel; then judged as any gossiped envelope heard when the header
/// was (`heard_ms`): the header, signed by the coordinator, names the envelope by hash, and the fetch may
/// take longer than the clock check allows (at 32 members on 2 cores, a round's announcement fetched in 34 s
/// was refused as `clock-skew`, and its member sat out the rest of the run).
pub(crate) fn judge_parcel(
    shared: &Shared,
    source: PeerId,
    header: &mana_protocol::Parcel,
    data: &[u8],
    heard_ms: u64,
) -> Judgement {
    let envelope = match decode_parcel(data) {
        Ok(envelope) => envelope,
        Err(e) => return reject(RejectCode::BadEnvelope.as_str(), e),
    };
    if shared.config.coordinator != Some(envelope.signer) {
        return reject(
            RejectCode::NotCoordinator.as_str(),
            format!("a parcel's envelope signed by {}", envelope.signer),
        );
    }
    let judgement = judge_envelope(shared, source, TopicKind::Rounds, data, envelope, heard_ms);
    match &judgement {
        Judgement::Accept(a) if matches!(a.message, Message::Parcel(_)) => reject(
            RejectCode::Inconsistent.as_str(),
            "a parcel inside a parcel",
        ),
        Judgement::Accept(a) if a.message.round() != Some(header.round) => reject(
            RejectCode::Inconsistent.as_str(),
            format!(
                "a parcel of round {} holds a {} of round {:?}",
                header.round,
                a.message.kind(),
                a.message.round()
            ),
        ),
        _ => judgement,
    }
}

/// Judges a decoded envelope (its bytes `data`) heard on topic `kind` at `heard_ms`: replay, equivocation,
/// then the protocol's rules.
fn judge_envelope(
    shared: &Shared,
    source: PeerId,
    kind: TopicKind,
    data: &[u8],
    envelope: mana_protocol::SignedEnvelope,
    heard_ms: u64,
) -> Judgement {
    let run = &shared.config.net.run_id;
    let hash = *blake3::hash(data).as_bytes();
    if shared.replay().check_and_insert(hash, Instant::now()) {
        return reject(
            REPLAYED,
            format!("envelope {} seen before", hex::encode(&hash[..8])),
        );
    }
    // Before the round window: a second commit of a round must be compared, not dropped as stale.
    if let Some(found) = equivocation::observe(shared, data, &envelope) {
        return Judgement::Equivocation(Box::new(found));
    }
    let no_coordinator = PublicKey([0; 32]);
    let coordinator = shared
        .config
        .coordinator
        .as_ref()
        .unwrap_or(&no_coordinator);
    let current = shared.state().current.clone();
    let ctx = ValidationContext {
        run,
        coordinator,
        current: current.as_deref(),
        now_ms: heard_ms,
        limits: ValidationLimits::default(),
    };
    match validate_envelope(&ctx, &envelope) {
        Ok(message) if message.topic() != kind => reject(WRONG_TOPIC, message.kind()),
        Ok(message) => Judgement::Accept(Accepted {
            source,
            signer: envelope.signer,
            message,
            envelope: Arc::new(envelope),
        }),
        Err(rejection) if rejection.code() == RejectCode::NotCoordinator => {
            match holder_report(&envelope, current.as_deref()) {
                HolderReport::Report(message) if message.topic() == kind => {
                    Judgement::Accept(Accepted {
                        source,
                        signer: envelope.signer,
                        message,
                        envelope: Arc::new(envelope),
                    })
                }
                // Holders of a round this node has not heard of yet (it missed the announcement): not
                // theirs to answer for, and not the forwarder's.
                HolderReport::AheadOfUs => Judgement::Ignore {
                    reason: RejectCode::FutureRound.as_str().into(),
                },
                _ => judge_rejection(shared, rejection),
            }
        }
        Err(rejection) => judge_rejection(shared, rejection),
    }
}

/// What a checkpoint manifest signed by a node rather than the coordinator is.
enum HolderReport {
    /// That node's report of the shards it holds after a round (the determinism check: every holder
    /// publishes its shard hashes). Accepted (the run and the clock were already checked), never synced from;
    /// only the coordinator's manifests are.
    Report(Message),
    /// A report of a round after the one this node is in: it missed an announcement, the holders did not.
    AheadOfUs,
    /// Not a checkpoint manifest.
    NotOne,
}

/// Reads a message that failed as not the coordinator's: a holder's report, or not (see [`HolderReport`]).
fn holder_report(
    envelope: &mana_protocol::SignedEnvelope,
    current: Option<&mana_protocol::RoundAnnouncement>,
) -> HolderReport {
    let Ok(Message::CheckpointManifest(m)) = envelope.verify() else {
        return HolderReport::NotOne;
    };
    if current.is_some_and(|c| m.round > c.round) {
        return HolderReport::AheadOfUs;
    }
    HolderReport::Report(Message::CheckpointManifest(m))
}

/// Turns a rejection into a verdict: rejected (the forwarder is penalised) or ignored.
fn judge_rejection(shared: &Shared, rejection: Rejection) -> Judgement {
    let code = rejection.code();
    match ignored_because(code, shared.config.coordinator.is_some()) {
        Some(reason) => Judgement::Ignore {
            reason: reason.into(),
        },
        None => reject(code.as_str(), rejection),
    }
}

/// Why a rejection does not penalise the forwarder, or `None` when it does: only a message that is invalid
/// whatever this node knows is held against the peer that passed it on. A round that is stale, ahead of ours
/// or not yet known (this node joined late, slept or missed an announcement) and clock skew say as much about
/// us as about an honest forwarder, and coordinator messages are not ours to judge without a coordinator key.
fn ignored_because(code: RejectCode, coordinator_configured: bool) -> Option<&'static str> {
    match code {
        RejectCode::ClockSkew
        | RejectCode::StaleRound
        | RejectCode::FutureRound
        | RejectCode::NoRound => Some(code.as_str()),
        RejectCode::NotCoordinator if !coordinator_configured => Some("no-coordinator-configured"),
        _ => None,
    }
}

/// Applies a judgement: counters, the store's rejection log, local subscribers, shard sync.
pub(crate) async fn record(shared: &Arc<Shared>, source: PeerId, judgement: Judgement) {
    match judgement {
        Judgement::Accept(accepted) => {
            // Holders' manifests (see `holder_report`) are passed on, never followed.
            let from_coordinator = shared.config.coordinator == Some(accepted.signer);
            if from_coordinator && !matches!(accepted.message, Message::Heartbeat(_)) {
                let (kind, round) = (accepted.message.kind(), accepted.message.round());
                tracing::debug!(kind, ?round, "the coordinator's message taken");
            }
            {
                let mut state = shared.state();
                state.accepted += 1;
                match &accepted.message {
                    Message::RoundAnnouncement(a) => state.current = Some(Arc::new(a.clone())),
                    Message::CheckpointManifest(m) if from_coordinator => {
                        state.manifest = Some(m.clone())
                    }
                    Message::RoundCommit(c) => state.manifest = Some(c.checkpoint.clone()),
                    Message::Heartbeat(_) if from_coordinator => {
                        state.coordinator_alive = Some(Instant::now())
                    }
                    Message::CommitDispute(d) => {
                        state.disputes_heard += 1;
                        tracing::warn!(
                            signer = %accepted.signer, round = d.round, shard = %d.shard, committed = %d.committed,
                            computed = %d.computed, "a holder disputes the coordinator's commit"
                        );
                    }
                    _ => {}
                }
            }
            // Who hosts which shard blob: a result's judges, a holder reporting what it holds.
            let hosted: Vec<mana_protocol::ContentHash> = match &accepted.message {
                Message::ShardAttestation(a) => a.results.iter().map(|r| r.entry.hash).collect(),
                Message::CheckpointManifest(m) if !from_coordinator => {
                    m.shards.iter().map(|e| e.hash).collect()
                }
                _ => Vec::new(),
            };
            if let (false, Ok(peer)) = (hosted.is_empty(), accepted.signer.peer_id()) {
                let mut hosts = shared.shard_hosts.lock().unwrap_or_else(|p| p.into_inner());
                for hash in hosted {
                    hosts.note(hash, peer);
                }
            }
            let manifest = match &accepted.message {
                Message::CheckpointManifest(m) if from_coordinator => Some(m.clone()),
                Message::RoundCommit(c) => Some(c.checkpoint.clone()),
                _ => None,
            };
            if let (Some(manifest), true) = (manifest, shared.config.sync_shards) {
                let task_shared = shared.clone();
                shared.spawn(async move { sync::sync_manifest(&task_shared, manifest).await });
            }
            if !matches!(accepted.message, Message::Heartbeat(_)) {
                let _ = shared.rounds_tx.send(accepted.clone());
            }
            let _ = shared.accepted_tx.send(accepted);
        }
        Judgement::Equivocation(found) => equivocation::keep(shared, *found).await,
        Judgement::Reject { reason, detail } => {
            shared.state().rejected += 1;
            tracing::info!(peer = %source, %reason, %detail, "gossip message rejected");
            let store = shared.store.clone();
            let peer = source.to_string();
            if let Err(e) =
                blocking(move || Ok(store.record_rejection(&peer, &reason, &detail)?)).await
            {
                tracing::warn!(error = %e, "rejection not logged");
            }
        }
        Judgement::Ignore { reason } => {
            shared.state().ignored += 1;
            tracing::debug!(peer = %source, %reason, "gossip message ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_invalid_whatever_we_know_penalise_the_forwarder() {
        for code in [
            RejectCode::ClockSkew,
            RejectCode::StaleRound,
            RejectCode::FutureRound,
            RejectCode::NoRound,
        ] {
            assert_eq!(ignored_because(code, true), Some(code.as_str()));
        }
        assert_eq!(
            ignored_because(RejectCode::NotCoordinator, false),
            Some("no-coordinator-configured")
        );
        for code in [
            RejectCode::NotCoordinator,
            RejectCode::BadEnvelope,
            RejectCode::UnknownRun,
            RejectCode::NotParticipant,
            RejectCode::Inconsistent,
        ] {
            assert_eq!(ignored_because(code, true), None, "{code:?}");
        }
    }

    #[test]
    fn replay_guard_catches_repeats_within_window_only() {
        let mut guard = ReplayGuard::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!guard.check_and_insert([1; 32], t0));
        assert!(guard.check_and_insert([1; 32], t0 + Duration::from_secs(1)));
        assert!(!guard.check_and_insert([2; 32], t0 + Duration::from_secs(1)));
        assert!(
            !guard.check_and_insert([1; 32], t0 + Duration::from_secs(11)),
            "forgotten after the window"
        );
        guard.note_own(b"my envelope", t0);
        assert!(
            guard.check_and_insert(*blake3::hash(b"my envelope").as_bytes(), t0),
            "own envelopes count as seen"
        );
    }
}
