//! A judge's work on one shard of a call for judgments: what a holder of the shard, or a verifier drawn for
//! it, does before it signs. For each delta the call names, in the call's order:
//! 1. **authorization**: its sender is a participant assigned the shard, and its announced size is exactly
//!    what the round's codec makes of the shard ([`contribution_len`]), so no byte is fetched for an
//!    oversized claim;
//! 2. **fetch** the payload by hash from its sender, each delta on its own budget (at most its size, and at
//!    most [`ShardInput::fetch_budget`] of time): one withheld, trickled or oversized payload is refused as
//!    `unavailable` or `size-mismatch` alone and never delays another's verdict;
//! 3. [`validate_delta_payload`]: size, hash, the binding (this sender, run, round and shard: another's
//!    payload or an old one is refused as `not-bound`, for the re-announcer alone), decoding, length,
//!    finiteness;
//! 4. the engine's verdicts ([`judge_deltas`]: norm bounds, then the reproducible score on the round's base
//!    trunk and the shard alone), then the shard's next state from the accepted deltas at their weights
//!    ([`apply_shard_round`], the function every holder runs on a commit).
//!
//! Steps 1 to 3 depend only on the call, the announcement and the payloads, and step 4 on the base blobs and
//! the run's text: any holder of the shard that does the same gets the same verdicts and the same state, so
//! a judge's signature is a record anyone can check, and the quorum of the shard's judges decides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mana_kernels::data::TextDataset;
use mana_protocol::validation::{ValidPayload, validate_delta_payload};
use mana_protocol::{
    AggregationCall, Binding, CalledDelta, CodecOptions, ContentHash, DeltaAnnouncement,
    DeltaScore, DeltaVerdict, PayloadShape, PublicKey, RejectCode, RoundAnnouncement, ShardId,
    TrainingStats, contribution_len,
};

use super::common::fetch_bytes_within;
use crate::daemon::{NodeError, NodeHandle, blocking};
use crate::net::fetch::FetchError;
use mana_engine::round::{
    ExpertLoads, Fetched, RunSpec, ShardRecord, apply_shard_round, judge_deltas, loads_len,
};

/// Attempts a payload fetch's budget is split into.
const FETCH_ATTEMPTS: u32 = 3;

/// What a judge needs to judge one shard, all owned (it runs off the role's loop).
pub(crate) struct ShardInput {
    pub announcement: RoundAnnouncement,
    pub call: Arc<AggregationCall>,
    pub shard: ShardId,
    /// The round's base states of the trunk and of `shard` (one record when `shard` is the trunk).
    pub base: Vec<ShardRecord>,
    pub spec: RunSpec,
    pub data: Arc<TextDataset>,
    /// How long one payload's fetch may take, each on its own clock.
    pub fetch_budget: Duration,
    /// Payload fetches in flight at once.
    pub concurrency: usize,
}

/// What a judge found for one shard.
pub(crate) struct ShardOutcome {
    /// One verdict per delta of the call's shard, in the call's order.
    pub verdicts: Vec<DeltaVerdict>,
    /// The scores it measured.
    pub scores: Vec<DeltaScore>,
    /// The shard's next state, or `None` when no delta was accepted (the shard keeps its base state).
    pub next: Option<ShardRecord>,
    /// The accepted deltas, decoded, in the call's order, with their weights: what a commit that takes this
    /// result applies (kept so that the commit is not fetched and computed again).
    pub accepted: Vec<(ContentHash, Vec<f32>)>,
    pub weights: Vec<u32>,
    /// The payloads it fetched (to pin them for the round), accepted or not.
    pub fetched: Vec<ContentHash>,
    /// Time spent fetching payloads, and checking, scoring and applying them, in ms.
    pub transfer_ms: u64,
    pub judge_ms: u64,
}

/// The announcement a called delta stands for: what its sender signed, as far as its payload's binding and
/// size go (the call carries the hash and size it announced).
fn announced(call: &AggregationCall, shard: ShardId, d: &CalledDelta) -> DeltaAnnouncement {
    DeltaAnnouncement {
        run: call.run.clone(),
        round: call.round,
        shard,
        base_checkpoint: call.base_checkpoint,
        payload_hash: d.payload_hash,
        payload_size: d.payload_size,
        // Not part of what the payload is checked against.
        stats: TrainingStats {
            tokens: 0,
            loss_before: 0.0,
            loss_after: 0.0,
            delta_norm: 0.0,
        },
    }
}

/// Step 1 for one delta: its sender's key, and `Ok` with the payload's shape if it may be fetched, else the
/// refusal.
fn authorize(
    input: &ShardInput,
    d: &CalledDelta,
) -> (Option<PublicKey>, Result<PayloadShape, RejectCode>) {
    let ann = &input.announcement;
    let Some(p) = ann.participants.get(d.sender as usize) else {
        return (None, Err(RejectCode::NotParticipant));
    };
    if !p.shards.contains(&input.shard) {
        return (Some(p.node), Err(RejectCode::ShardNotAssigned));
    }
    let binding = Binding::of(&announced(&input.call, input.shard, d), p.node);
    match expected_payload(&input.spec, &ann.hyper.codec, &binding) {
        Ok((shape, size)) if size == d.payload_size => (Some(p.node), Ok(shape)),
        Ok(_) => (Some(p.node), Err(RejectCode::SizeMismatch)),
        Err(code) => (Some(p.node), Err(code)),
    }
}

/// The shape of the payload `binding` names under `codec`, and its exact size in bytes: what a judge checks
/// an announced payload against, and what a holder fetches ahead ([`super::prefetch`]). Fails as
/// `shard-not-assigned` for a shard the spec does not have, `bad-payload` for a size the codec cannot give.
pub(crate) fn expected_payload(
    spec: &RunSpec,
    codec: &CodecOptions,
    binding: &Binding,
) -> Result<(PayloadShape, u64), RejectCode> {
    let shard_len = spec
        .shard_len(binding.shard)
        .map_err(|_| RejectCode::ShardNotAssigned)?;
    let shape = PayloadShape {
        shard_len,
        loads_len: loads_len(spec, binding.shard),
        codec: *codec,
    };
    let size = contribution_len(binding, shape.loads_len, shard_len, codec)
        .map_err(|_| RejectCode::BadPayload)?;
    Ok((shape, size))
}

/// Steps 2 and 3 for one delta: fetch within its budget, validate, decode.
async fn fetch_and_validate(
    node: &NodeHandle,
    sender: PublicKey,
    delta: DeltaAnnouncement,
    shape: PayloadShape,
    budget: Duration,
    max_norm_ratio: f32,
) -> Result<ValidPayload, RejectCode> {
    let hints: Vec<_> = sender.peer_id().ok().into_iter().collect();
    // The budget in a few attempts: a request that hangs (a connection its peer already closed, say) is given
    // up and asked again on a fresh one, instead of taking the whole budget with it (a fetch that fails
    // outright is tried again inside each attempt, by `fetch_bytes_within`).
    let deadline = tokio::time::Instant::now() + budget;
    let attempt = (budget / FETCH_ATTEMPTS).max(Duration::from_secs(1));
    let bytes = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = fetch_bytes_within(
            node,
            delta.payload_hash,
            delta.payload_size,
            hints.clone(),
            attempt.min(left),
        )
        .await;
        match result {
            Ok(bytes) => break bytes,
            // The provider itself says the blob is bigger than announced.
            Err(NodeError::Fetch(FetchError::TooLarge(_)) | NodeError::TooLarge { .. }) => {
                return Err(RejectCode::SizeMismatch);
            }
            Err(e)
                if deadline.saturating_duration_since(tokio::time::Instant::now())
                    < Duration::from_millis(200) =>
            {
                tracing::info!(payload = %delta.payload_hash, shard = %delta.shard, error = %e, "payload not had within its budget of {budget:?}: unavailable");
                return Err(RejectCode::Unavailable);
            }
            Err(e) => {
                tracing::debug!(payload = %delta.payload_hash, error = %e, "payload fetch attempt failed; asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (shard, payload) = (delta.shard, delta.payload_hash);
    let checked = blocking(move || {
        Ok(validate_delta_payload(
            &delta,
            &sender,
            &bytes,
            &shape,
            None,
            max_norm_ratio,
        ))
    })
    .await;
    match checked {
        Ok(Ok(values)) => Ok(values),
        Ok(Err(r)) => {
            tracing::info!(%shard, %payload, error = %r, "payload refused");
            Err(r.code())
        }
        Err(_) => Err(RejectCode::BadPayload),
    }
}

/// Judges `input.shard`: every step of the module doc. Fails only when the shard cannot be judged at all
/// (its base state is missing, the engine fails): the judge then signs nothing for it.
pub(crate) async fn judge_shard(
    node: Arc<NodeHandle>,
    input: ShardInput,
) -> Result<ShardOutcome, NodeError> {
    let started = Instant::now();
    let part = input
        .call
        .shard(&input.shard)
        .ok_or(NodeError::MissingShard {
            round: input.call.round,
            shard: input.shard,
        })?
        .clone();
    let max_norm_ratio = input.announcement.max_norm_ratio;
    let jobs: Vec<(usize, Option<PublicKey>, Result<PayloadShape, RejectCode>)> = part
        .deltas
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (sender, shape) = authorize(&input, d);
            (i, sender, shape)
        })
        .collect();
    let fetched: Vec<ContentHash> = part
        .deltas
        .iter()
        .zip(&jobs)
        .filter(|(_, (_, _, shape))| shape.is_ok())
        .map(|(d, _)| d.payload_hash)
        .collect();
    let (call, shard, budget) = (input.call.clone(), input.shard, input.fetch_budget);
    let mut payloads: Vec<(usize, Option<PublicKey>, Result<ValidPayload, RejectCode>)> =
        futures::stream::iter(jobs)
            .map(|(i, sender, shape)| {
                let node = node.clone();
                let delta = announced(&call, shard, &part.deltas[i]);
                async move {
                    let payload = match (sender, shape) {
                        (Some(sender), Ok(shape)) => {
                            fetch_and_validate(&node, sender, delta, shape, budget, max_norm_ratio)
                                .await
                        }
                        (_, Err(code)) => Err(code),
                        (None, Ok(_)) => Err(RejectCode::NotParticipant),
                    };
                    (i, sender, payload)
                }
            })
            .buffer_unordered(input.concurrency.max(1))
            .collect()
            .await;
    payloads.sort_by_key(|(i, ..)| *i);
    let transfer_ms = started.elapsed().as_millis() as u64;
    let judging = Instant::now();
    let ShardInput {
        announcement,
        call,
        base,
        spec,
        data,
        ..
    } = input;
    let (verdicts, scores, next, accepted, weights) = blocking(move || {
        // A delta whose sender is no participant has no key; its payload was never fetched, and its verdict
        // is its refusal, so any key stands in for it in the engine's input.
        let nobody = PublicKey([0; 32]);
        let fetched: Vec<Fetched<'_>> = payloads
            .iter()
            .map(|(i, sender, p)| Fetched {
                sender: sender.unwrap_or(nobody),
                payload_hash: part.deltas[*i].payload_hash,
                payload: p.as_ref().map(|v| v.delta.as_slice()).map_err(|c| *c),
            })
            .collect();
        let judged = judge_deltas(&spec, &announcement, &call, shard, &base, &data, &fetched)?;
        let mut accepted: Vec<(ContentHash, Vec<f32>)> = Vec::new();
        let mut weights = Vec::new();
        let mut loads = Vec::new();
        for ((i, sender, payload), verdict) in payloads.into_iter().zip(&judged.verdicts) {
            if let (DeltaVerdict::Accept { .. }, Ok(valid), Some(sender)) =
                (verdict, payload, sender)
            {
                if !valid.loads.is_empty() {
                    loads.push(ExpertLoads {
                        sender,
                        counts: valid.loads,
                    });
                }
                accepted.push((part.deltas[i].payload_hash, valid.delta));
                weights.push(part.deltas[i].weight);
            }
        }
        let next = if accepted.is_empty() {
            None
        } else {
            let own = base
                .iter()
                .find(|s| s.shard == shard)
                .ok_or(NodeError::MissingShard {
                    round: announcement.round,
                    shard,
                })?;
            Some(apply_shard_round(
                &spec,
                &announcement,
                own,
                &accepted,
                &weights,
                &loads,
            )?)
        };
        Ok((judged.verdicts, judged.scores, next, accepted, weights))
    })
    .await?;
    Ok(ShardOutcome {
        verdicts,
        scores,
        next,
        accepted,
        weights,
        fetched,
        transfer_ms,
        judge_ms: judging.elapsed().as_millis() as u64,
    })
}
