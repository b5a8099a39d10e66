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
//! 4. **norm** bounds ([`judge_norm`]): at most `max_norm_ratio` and at least `min_norm_ratio` times a
//!    reference taken from the *other* senders' norms (this round's and the recently accepted ones), so that
//!    no sender moves its own bounds; a zero delta is always refused (`norm-too-small`);
//! 5. the **score** ([`ShardScorer`]): the delta applied alone through the round's own update, against the
//!    same update with a zero delta, on the round's base trunk and the shard alone (what any holder of the
//!    shard has), on a validation batch fixed by the round's [`mana_engine::round::score_seed`] (a hash of
//!    every payload under verification, so known only once the deltas are in); a delta the [`ScorePolicy`]
//!    does not accept is refused (`low-score`). Every delta is scored unless `score_share` < 1, and then the
//!    draw also comes from the seed. Everything here is reproducible by anyone who holds the shard's and the
//!    trunk's base states, the run's text and the commit, which lists every verified delta.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mana_kernels::data::TextDataset;
use mana_protocol::validation::{ValidPayload, l2_norm, validate_delta_payload};
use mana_protocol::{
    Binding, CodecOptions, DeltaAnnouncement, DeltaScore, PayloadShape, PublicKey, RejectCode,
    RoundAnnouncement, ShardId, contribution_len,
};

use super::super::common::{fetch_bytes_within, peer_name};
use crate::daemon::{NodeError, NodeHandle, blocking};
use crate::net::fetch::FetchError;
use mana_engine::round::{
    NormSample, NormVerdict, RunSpec, Score, ScorePolicy, ShardRecord, ShardScorer, is_scored,
    judge_norm, loads_len, score_batch,
};

/// The reason logged for a payload that could not be fetched within its budget (its wire code is
/// `unavailable`).
pub const PAYLOAD_UNAVAILABLE: &str = "unavailable";

/// Attempts a payload fetch's budget is split into.
const FETCH_ATTEMPTS: u32 = 3;

/// What the verifier needs, all owned (it runs as its own task).
pub(crate) struct VerifyInput {
    pub announcement: RoundAnnouncement,
    pub deltas: Vec<(PublicKey, DeltaAnnouncement)>,
    /// The seed of the round's score batches, over every delta of the round (not only those verified here:
    /// a restarted verifier checks only what is left).
    pub score_seed: u64,
    /// The round's base model, every shard.
    pub model: Arc<Vec<ShardRecord>>,
    /// Recently accepted delta norms, with their senders.
    pub history: Vec<NormSample>,
    pub spec: RunSpec,
    pub data: Arc<TextDataset>,
    /// Share of the deltas scored (1: every one).
    pub score_share: f64,
    /// What score a delta needs.
    pub score_policy: ScorePolicy,
    /// A delta's norm must be at least this share of its reference.
    pub min_norm_ratio: f32,
    /// How long one payload's fetch may take, each on its own clock.
    pub fetch_budget: Duration,
    /// Payload fetches in flight at once (each holds at most one payload's bytes).
    pub concurrency: usize,
}

/// The verdict on one delta.
pub(crate) enum Outcome {
    Accepted {
        /// Its L2 norm (for the norm history).
        norm: f32,
    },
    Rejected {
        code: RejectCode,
        reason: String,
        detail: String,
    },
}

/// One delta and its verdict.
pub(crate) struct Checked {
    pub node: PublicKey,
    pub delta: DeltaAnnouncement,
    pub outcome: Outcome,
    /// Its score, if it was scored (accepted or refused `low-score`), as the commit publishes it.
    pub score: Option<DeltaScore>,
}

/// The verdicts of a round, with the time spent.
pub(crate) struct VerifyReport {
    pub round: u64,
    /// The seed of the round's score batches.
    pub score_seed: u64,
    /// Deltas scored.
    pub scored: u64,
    pub checked: Vec<Checked>,
    pub transfer_ms: u64,
    pub verify_ms: u64,
}

fn rejected(code: RejectCode, detail: impl ToString) -> Outcome {
    Outcome::Rejected {
        code,
        reason: code.as_str().to_owned(),
        detail: detail.to_string(),
    }
}

/// Step 1 for one delta: `Err` with the refusal if the sender may not send it or its size is not the one
/// the codec makes; `Ok` with the shard's length and its contributions' number of expert loads otherwise.
fn authorize(
    input: &VerifyInput,
    sender: &PublicKey,
    delta: &DeltaAnnouncement,
) -> Result<(usize, usize), Outcome> {
    let ann = &input.announcement;
    if !ann
        .participant(sender)
        .is_some_and(|p| p.shards.contains(&delta.shard))
    {
        let detail = format!(
            "{} is not assigned {} in round {}",
            peer_name(sender),
            delta.shard,
            ann.round
        );
        return Err(rejected(RejectCode::ShardNotAssigned, detail));
    }
    let len = input
        .spec
        .shard_len(delta.shard)
        .map_err(|e| rejected(RejectCode::ShardNotAssigned, e))?;
    let loads = loads_len(&input.spec, delta.shard);
    let expected = contribution_len(&Binding::of(delta, *sender), loads, len, &ann.hyper.codec)
        .map_err(|e| rejected(RejectCode::BadPayload, e))?;
    if delta.payload_size != expected {
        let detail = format!(
            "announced {} bytes, a contribution to {} is {expected}",
            delta.payload_size, delta.shard
        );
        return Err(rejected(RejectCode::SizeMismatch, detail));
    }
    Ok((len, loads))
}

/// Steps 2 and 3 for one delta: fetch within its budget, validate, decode.
async fn fetch_and_validate(
    node: &NodeHandle,
    sender: PublicKey,
    delta: &DeltaAnnouncement,
    (len, loads): (usize, usize),
    codec: CodecOptions,
    budget: Duration,
    ratio: f32,
) -> Result<ValidPayload, Outcome> {
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
            Err(e @ (NodeError::Fetch(FetchError::TooLarge(_)) | NodeError::TooLarge { .. })) => {
                return Err(rejected(RejectCode::SizeMismatch, e));
            }
            Err(e)
                if deadline.saturating_duration_since(tokio::time::Instant::now())
                    < Duration::from_millis(200) =>
            {
                let detail = format!("within {budget:?}: {e}");
                return Err(Outcome::Rejected {
                    code: RejectCode::Unavailable,
                    reason: PAYLOAD_UNAVAILABLE.into(),
                    detail,
                });
            }
            Err(e) => {
                tracing::debug!(payload = %delta.payload_hash, error = %e, "payload fetch attempt failed; asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let delta = delta.clone();
    let checked = blocking(move || {
        let shape = PayloadShape {
            shard_len: len,
            loads_len: loads,
            codec,
        };
        Ok(validate_delta_payload(
            &delta, &sender, &bytes, &shape, None, ratio,
        ))
    })
    .await;
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
            Ok(sizes) => pending.push((*sender, delta.clone(), sizes)),
            Err(outcome) => checked.push(Checked {
                node: *sender,
                delta: delta.clone(),
                outcome,
                score: None,
            }),
        }
    }
    let (budget, ratio, codec) = (input.fetch_budget, ann.max_norm_ratio, ann.hyper.codec);
    let decoded: Vec<(PublicKey, DeltaAnnouncement, Result<ValidPayload, Outcome>)> =
        futures::stream::iter(pending)
            .map(|(sender, delta, sizes)| {
                let node = node.clone();
                async move {
                    let outcome =
                        fetch_and_validate(&node, sender, &delta, sizes, codec, budget, ratio)
                            .await;
                    (sender, delta, outcome)
                }
            })
            .buffer_unordered(input.concurrency.max(1))
            .collect()
            .await;
    let transfer_ms = started.elapsed().as_millis() as u64;
    let verify_started = Instant::now();

    // 4. norm bounds, each delta against the other senders' norms only.
    let mut survivors = Vec::new();
    for (sender, delta, outcome) in decoded {
        match outcome {
            Ok(valid) => {
                let norm = l2_norm(&valid.delta);
                survivors.push((sender, delta, Arc::new(valid.delta), norm));
            }
            Err(outcome) => checked.push(Checked {
                node: sender,
                delta,
                outcome,
                score: None,
            }),
        }
    }
    let samples: Vec<NormSample> = survivors
        .iter()
        .map(|(sender, delta, _, norm)| NormSample {
            shard: delta.shard,
            sender: *sender,
            norm: *norm,
        })
        .collect();
    type Survivor = (PublicKey, DeltaAnnouncement, Arc<Vec<f32>>, f32);
    let mut by_shard: BTreeMap<ShardId, Vec<Survivor>> = BTreeMap::new();
    for (sender, delta, values, norm) in survivors {
        let verdict = judge_norm(
            &samples,
            &input.history,
            delta.shard,
            sender,
            norm,
            input.min_norm_ratio,
            ann.max_norm_ratio,
        );
        let refusal = match verdict {
            NormVerdict::Within => None,
            NormVerdict::TooLarge { reference } => Some((
                RejectCode::NormTooLarge,
                format!(
                    "delta norm {norm} is over {} x the reference {reference}",
                    ann.max_norm_ratio
                ),
            )),
            NormVerdict::TooSmall { reference } => Some((
                RejectCode::NormTooSmall,
                format!(
                    "delta norm {norm} is under {} x the reference {reference}",
                    input.min_norm_ratio
                ),
            )),
        };
        match refusal {
            Some((code, detail)) => checked.push(Checked {
                node: sender,
                delta,
                outcome: rejected(code, detail),
                score: None,
            }),
            None => by_shard
                .entry(delta.shard)
                .or_default()
                .push((sender, delta, values, norm)),
        }
    }

    // 5. the score, shard by shard, on the batch the round's deltas fixed.
    let seed = input.score_seed;
    let mut scored = 0u64;
    for (shard, deltas) in by_shard {
        let picked: Vec<bool> = deltas
            .iter()
            .map(|(sender, ..)| is_scored(seed, shard, sender, input.score_share))
            .collect();
        let to_score: Vec<Arc<Vec<f32>>> = deltas
            .iter()
            .zip(&picked)
            .filter(|(_, p)| **p)
            .map(|((_, _, values, ..), _)| values.clone())
            .collect();
        let in_mean = deltas.len();
        let scores = if to_score.is_empty() {
            Ok(Vec::new())
        } else {
            let (spec, hyper, model, data) = (
                input.spec.clone(),
                ann.hyper.clone(),
                input.model.clone(),
                input.data.clone(),
            );
            blocking(move || {
                let batch =
                    score_batch(&spec, &hyper, &data, seed, shard).map_err(NodeError::from)?;
                let mut scorer =
                    ShardScorer::new(&spec, &hyper, round, &model, shard, batch, in_mean)
                        .map_err(NodeError::from)?;
                to_score
                    .iter()
                    .map(|d| scorer.score(d).map_err(NodeError::from))
                    .collect::<Result<Vec<Score>, NodeError>>()
            })
            .await
        };
        let mut scores = match scores {
            Ok(s) => {
                scored += s.len() as u64;
                s.into_iter()
            }
            Err(e) => {
                // The scorer itself failed (the run's data or model is broken): no delta of the shard can be
                // judged, and none is accepted unjudged; refused as not verified in time (`late`), which is the
                // coordinator's failing and costs the senders nothing.
                tracing::error!(round, %shard, error = %e, "scoring failed");
                for (sender, delta, ..) in deltas {
                    checked.push(Checked {
                        node: sender,
                        delta,
                        outcome: rejected(RejectCode::Late, format!("not scored: {e}")),
                        score: None,
                    });
                }
                continue;
            }
        };
        let scores: Vec<Option<Score>> = picked
            .iter()
            .map(|p| if *p { scores.next() } else { None })
            .collect();
        for (i, ((sender, delta, _, norm), score)) in
            deltas.into_iter().zip(scores.iter().copied()).enumerate()
        {
            // The other senders' gains on this shard, for the relative threshold.
            let others: Vec<f32> = scores
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, s)| s.map(|s| s.gain()))
                .collect();
            let outcome = match score {
                Some(s) if !input.score_policy.accepts(shard, s.gain(), &others) => rejected(
                    RejectCode::LowScore,
                    format!(
                        "gain {:+.6} nats against a zero delta (loss {} against {}, score seed {seed:016x}), needed {} {:+.6}",
                        s.gain(),
                        s.loss,
                        s.null_loss,
                        if shard == ShardId::Trunk {
                            "more than"
                        } else {
                            "at least"
                        },
                        input.score_policy.threshold(shard, &others)
                    ),
                ),
                _ => Outcome::Accepted { norm },
            };
            let score = score.map(|s| DeltaScore {
                shard,
                payload_hash: delta.payload_hash,
                in_mean: in_mean as u32,
                null_loss: s.null_loss,
                loss: s.loss,
            });
            checked.push(Checked {
                node: sender,
                delta,
                outcome,
                score,
            });
        }
    }
    VerifyReport {
        round,
        score_seed: seed,
        scored,
        checked,
        transfer_ms,
        verify_ms: verify_started.elapsed().as_millis() as u64,
    }
}
