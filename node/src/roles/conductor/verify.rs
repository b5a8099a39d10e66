//! Verification of a round's contributions before aggregation. For each delta, in order:
//! 1. **authorization**: the sender is a participant assigned that shard in the announcement, and the
//!    announced size is exactly what the round's codec makes of that shard ([`contribution_len`]), so no
//!    byte is fetched for an oversized claim;
//! 2. **fetch** the payload by hash from its sender, each delta on its own budget: at most its announced size
//!    and at most [`VerifyInput::fetch_budget`] of time (a share of the verify window), so one withheld,
//!    trickled or oversized payload is refused as `unavailable` alone and never delays another's verdict;
//!    a payload is validated as soon as it arrives and its bytes are dropped, so at most `concurrency`
//!    payloads are held at once;
//! 3. [`validate_delta_payload`]: size, hash, the binding (this sender, run, round and shard: another's
//!    payload or an old one is refused as `not-bound`, for the re-announcer alone), decoding, length,
//!    finiteness;
//! 4. **norm** at most `max_norm_ratio` × a reference norm: the larger of two medians, one over this round's
//!    deltas of the shard and its recently accepted norms (once it has some), one over its class
//!    ([`norm_class`]: the trunk, or all the experts of one layer, which share a shape). With two holders per expert, a median of one
//!    round's deltas alone could never catch a scaled one (nor in the first round, which has no history); and
//!    an expert that got no tokens for a while has a history of near-zero norms, which alone would refuse
//!    every honest delta once it is routed to again;
//! 5. the **loss check** ([`loss_check`]) on a validation batch chosen with OS randomness: every delta in
//!    diloco mode; in sync mode each delta with probability `loss_check_share`, drawn from OS randomness after
//!    the deltas are in, so a sender cannot know whether its contribution will be checked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mana_kernels::data::TextDataset;
use mana_protocol::validation::{l2_norm, median_norm, validate_delta_payload};
use mana_protocol::{Binding, DeltaAnnouncement, PublicKey, RejectCode, RoundAnnouncement, ShardId, UpdateRule, contribution_len};

use super::super::common::{fetch_bytes_within, os_seed, peer_name};
use crate::daemon::{NodeError, NodeHandle, blocking};
use crate::net::fetch::FetchError;
use mana_engine::round::{LossCheck, RunSpec, ShardRecord, loss_check};

/// The reason logged for a contribution that failed the loss check (its wire code is `inconsistent`: the
/// protocol has no dedicated code yet).
pub const LOSS_CHECK_FAILED: &str = "loss-check-failed";
/// The reason logged for a payload that could not be fetched within its budget (its wire code is
/// `unavailable`).
pub const PAYLOAD_UNAVAILABLE: &str = "unavailable";

/// What the verifier needs, all owned (it runs as its own task).
pub(crate) struct VerifyInput {
    pub announcement: RoundAnnouncement,
    pub deltas: Vec<(PublicKey, DeltaAnnouncement)>,
    /// The round's base model, every shard.
    pub model: Arc<Vec<ShardRecord>>,
    /// Recently accepted delta norms per shard.
    pub history: BTreeMap<ShardId, Vec<f32>>,
    pub spec: RunSpec,
    pub data: Arc<TextDataset>,
    pub loss_check_share: f64,
    pub loss_tolerance: f32,
    /// How long one payload's fetch may take, each on its own clock.
    pub fetch_budget: Duration,
    /// Payload fetches in flight at once (each holds at most one payload's bytes).
    pub concurrency: usize,
}

/// The verdict on one delta.
pub(crate) enum Outcome {
    Accepted { delta: Arc<Vec<f32>>, norm: f32, check: Option<LossCheck> },
    Rejected { code: RejectCode, reason: String, detail: String },
}

/// One delta and its verdict.
pub(crate) struct Checked {
    pub node: PublicKey,
    pub delta: DeltaAnnouncement,
    pub outcome: Outcome,
}

/// The verdicts of a round, with the time spent.
pub(crate) struct VerifyReport {
    pub round: u64,
    pub checked: Vec<Checked>,
    pub transfer_ms: u64,
    pub verify_ms: u64,
}

fn rejected(code: RejectCode, detail: impl ToString) -> Outcome {
    Outcome::Rejected { code, reason: code.as_str().to_owned(), detail: detail.to_string() }
}

/// Step 1 for one delta: `Err` with the refusal if the sender may not send it or its size is not the one
/// the codec makes; `Ok` with the shard's length otherwise.
fn authorize(input: &VerifyInput, sender: &PublicKey, delta: &DeltaAnnouncement) -> Result<usize, Outcome> {
    let ann = &input.announcement;
    if !ann.participant(sender).is_some_and(|p| p.shards.contains(&delta.shard)) {
        let detail = format!("{} is not assigned {} in round {}", peer_name(sender), delta.shard, ann.round);
        return Err(rejected(RejectCode::ShardNotAssigned, detail));
    }
    let len = input.spec.shard_len(delta.shard).map_err(|e| rejected(RejectCode::ShardNotAssigned, e))?;
    let expected = contribution_len(&Binding::of(delta, *sender), len, &ann.hyper.codec).map_err(|e| rejected(RejectCode::BadPayload, e))?;
    if delta.payload_size != expected {
        let detail = format!("announced {} bytes, a contribution to {} is {expected}", delta.payload_size, delta.shard);
        return Err(rejected(RejectCode::SizeMismatch, detail));
    }
    Ok(len)
}

/// Steps 2 and 3 for one delta: fetch within its budget, validate, decode.
async fn fetch_and_validate(
    node: &NodeHandle,
    sender: PublicKey,
    delta: &DeltaAnnouncement,
    len: usize,
    budget: Duration,
    ratio: f32,
) -> Result<Vec<f32>, Outcome> {
    let hints = sender.peer_id().ok().into_iter().collect();
    let bytes = fetch_bytes_within(node, delta.payload_hash, delta.payload_size, hints, budget).await.map_err(|e| match e {
        // The provider itself says the blob is bigger than announced.
        NodeError::Fetch(FetchError::TooLarge(_)) | NodeError::TooLarge { .. } => rejected(RejectCode::SizeMismatch, e),
        e => Outcome::Rejected { code: RejectCode::Unavailable, reason: PAYLOAD_UNAVAILABLE.into(), detail: e.to_string() },
    })?;
    let delta = delta.clone();
    let checked = blocking(move || Ok(validate_delta_payload(&delta, &sender, &bytes, len, None, ratio))).await;
    match checked {
        Ok(Ok(values)) => Ok(values),
        Ok(Err(r)) => Err(rejected(r.code(), r)),
        Err(e) => Err(rejected(RejectCode::BadPayload, e)),
    }
}

/// Runs the whole pipeline on `input`.
pub(crate) async fn verify_round(node: Arc<NodeHandle>, input: VerifyInput) -> VerifyReport {
    let round = input.announcement.round;
    let ann = &input.announcement;
    let started = Instant::now();
    // 1. authorization, then 2. and 3., each delta on its own budget.
    let mut pending = Vec::new();
    let mut checked = Vec::new();
    for (sender, delta) in &input.deltas {
        match authorize(&input, sender, delta) {
            Ok(len) => pending.push((*sender, delta.clone(), len)),
            Err(outcome) => checked.push(Checked { node: *sender, delta: delta.clone(), outcome }),
        }
    }
    let (budget, ratio) = (input.fetch_budget, ann.max_norm_ratio);
    let decoded: Vec<(PublicKey, DeltaAnnouncement, Result<Vec<f32>, Outcome>)> = futures::stream::iter(pending)
        .map(|(sender, delta, len)| {
            let node = node.clone();
            async move {
                let outcome = fetch_and_validate(&node, sender, &delta, len, budget, ratio).await;
                (sender, delta, outcome)
            }
        })
        .buffer_unordered(input.concurrency.max(1))
        .collect()
        .await;
    let transfer_ms = started.elapsed().as_millis() as u64;
    let verify_started = Instant::now();

    // 4. norm against the shard's median.
    let mut by_shard: BTreeMap<ShardId, Vec<f32>> = BTreeMap::new();
    let mut survivors = Vec::new();
    for (key, delta, outcome) in decoded {
        match outcome {
            Ok(values) => {
                let norm = l2_norm(&values);
                by_shard.entry(delta.shard).or_default().push(norm);
                survivors.push((key, delta, Arc::new(values), norm));
            }
            Err(outcome) => checked.push(Checked { node: key, delta, outcome }),
        }
    }
    // One median per class (this round's norms and the accepted history of every shard in it).
    let mut class_norms: BTreeMap<Option<u16>, Vec<f32>> = BTreeMap::new();
    for (shard, norms) in by_shard.iter().chain(input.history.iter()) {
        class_norms.entry(norm_class(shard)).or_default().extend(norms.iter().copied());
    }
    let class_medians: BTreeMap<Option<u16>, Option<f32>> =
        class_norms.iter().map(|(class, norms)| (*class, median_norm(norms))).collect();
    let medians: BTreeMap<ShardId, Option<f32>> = by_shard
        .iter()
        .map(|(shard, norms)| {
            let class = class_medians.get(&norm_class(shard)).copied().flatten();
            let own_history = input.history.get(shard).map_or(&[][..], Vec::as_slice);
            // Before the shard has any accepted delta, its own median would include the very deltas under test
            // (with two holders, half of them): only the class counts then. Afterwards the larger of the two:
            // the shard's own median catches a scaled delta where the class is noisy; the class's keeps an
            // expert that got no tokens for a while (norms near 0) from refusing every honest delta once it is
            // routed to again.
            let reference = if own_history.is_empty() {
                class
            } else {
                let own: Vec<f32> = norms.iter().chain(own_history).copied().collect();
                match (median_norm(&own), class) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            };
            (*shard, reference)
        })
        .collect();
    let mut to_check = Vec::new();
    for (key, delta, values, norm) in survivors {
        let median = medians.get(&delta.shard).copied().flatten();
        match median {
            Some(m) if m > 0.0 && f64::from(norm) > f64::from(ratio) * f64::from(m) => {
                let detail = format!("delta norm {norm} is over {ratio} x the median {m}");
                checked.push(Checked { node: key, delta, outcome: rejected(RejectCode::NormTooLarge, detail) });
            }
            _ => to_check.push((key, delta, values, norm)),
        }
    }

    // 5. the loss check, on an unpredictable share.
    let share = match ann.hyper.update_rule {
        UpdateRule::Diloco => 1.0,
        UpdateRule::Sync => input.loss_check_share.clamp(0.0, 1.0),
    };
    for (key, delta, values, norm) in to_check {
        let picked = share >= 1.0 || (share > 0.0 && unit_random() < share);
        if !picked {
            checked.push(Checked { node: key, delta, outcome: Outcome::Accepted { delta: values, norm, check: None } });
            continue;
        }
        let (spec, hyper, model, data) = (input.spec.clone(), ann.hyper.clone(), input.model.clone(), input.data.clone());
        let (shard, tolerance, vals) = (delta.shard, input.loss_tolerance, values.clone());
        let index = os_seed().unwrap_or(round);
        let check = blocking(move || {
            let (b, t) = spec.batch_shape(&hyper).map_err(NodeError::from)?;
            let windows = data.validation_windows(t).max(1) as u64;
            let batch = data.validation_batch(index % windows, b, t).map_err(NodeError::from)?;
            loss_check(&spec, &hyper, round, &model, shard, &vals, &batch, tolerance).map_err(NodeError::from)
        })
        .await;
        let outcome = match check {
            Ok(c) if c.passed => Outcome::Accepted { delta: values, norm, check: Some(c) },
            Ok(c) => Outcome::Rejected {
                code: RejectCode::Inconsistent,
                reason: LOSS_CHECK_FAILED.into(),
                detail: format!("validation loss {} -> {} (tolerance {tolerance})", c.before, c.after),
            },
            Err(e) => Outcome::Rejected { code: RejectCode::BadPayload, reason: LOSS_CHECK_FAILED.into(), detail: e.to_string() },
        };
        checked.push(Checked { node: key, delta, outcome });
    }
    VerifyReport { round, checked, transfer_ms, verify_ms: verify_started.elapsed().as_millis() as u64 }
}

/// A uniform draw in [0, 1) from OS randomness (0.0, i.e. "check it", if the OS cannot provide any).
fn unit_random() -> f64 {
    match os_seed() {
        Ok(x) => (x >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.0,
    }
}

/// The group of shards whose delta norms are compared with each other: the trunk alone, or every expert of
/// one MoE layer (same shape, same kind of gradient). An expert has only `replication` holders, too few for a
/// median to outvote a forged delta; a layer's experts together have many.
fn norm_class(shard: &ShardId) -> Option<u16> {
    match shard {
        ShardId::Trunk => None,
        ShardId::Expert { layer, .. } => Some(*layer),
    }
}
