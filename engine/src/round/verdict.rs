//! A judge's verdicts on one shard's deltas: the part of judging that is a pure function of public data, run
//! by every judge of the shard (its holders and the verifiers drawn for it) once its daemon has fetched and
//! checked each payload (size, hash, binding, decoding: `mana_protocol::validation::validate_delta_payload`).
//! For each delta of the call's shard, in the call's order:
//! 1. a payload the daemon could not have or found invalid is refused with that reason;
//! 2. the **norm bounds** ([`judge_norm`]): against the shard's other valid deltas of the round and the
//!    call's norm history (the norms the last commits accepted), never the sender's own;
//! 3. the **score** ([`ShardScorer`]): the delta applied alone through the round's update, against a zero
//!    delta, on the round's base trunk and the shard alone, on the batch of the call's score seed
//!    ([`call_score_seed`]: the seed secret the call reveals and every payload hash of the call); every
//!    delta is scored unless the rule's `score_share` is under 1, and then the draw comes from the seed;
//! 4. the rule's [`ScorePolicy`]: a trunk delta must gain, relative to the others' gains; an expert delta
//!    must not clearly harm.
//!
//! The inputs are the call, the announcement, the round's base blobs of the trunk and the shard, the payloads
//! and the run's text: any holder of the shard gets the same verdicts, bit for bit on one kind of CPU (the
//! norms are exact; a loss may differ by about 1e-6 on another CPU, which changes a verdict only for a gain
//! that close to its bar), so the judges' verdicts are reproducible records, and a quorum of them decides.

use mana_kernels::data::TextDataset;
use mana_kernels::model::ShardId;
use mana_protocol::validation::l2_norm;
use mana_protocol::{
    AggregationCall, ContentHash, DeltaScore, DeltaVerdict, PublicKey, RejectCode,
    RoundAnnouncement, VerdictRule,
};

use super::error::RoundError;
use super::norms::{NormSample, NormVerdict, history_of, judge_norm};
use super::score::{Score, ScorePolicy, ShardScorer, is_scored, score_batch, score_seed};
use super::spec::RunSpec;
use super::state::ShardRecord;

/// The verdict rule a run uses unless its operator sets another: a norm of at least 1% of its reference,
/// every delta scored, and [`ScorePolicy::default`]'s bars.
pub fn default_verdict_rule() -> VerdictRule {
    let p = ScorePolicy::default();
    VerdictRule {
        min_norm_ratio: 0.01,
        score_share: 1.0,
        trunk_min_gain: p.trunk_min_gain,
        trunk_share: p.trunk_share,
        expert_tolerance: p.expert_tolerance,
    }
}

impl ScorePolicy {
    /// The score bars of a call's verdict rule.
    pub fn of(rule: &VerdictRule) -> ScorePolicy {
        ScorePolicy {
            trunk_min_gain: rule.trunk_min_gain,
            trunk_share: rule.trunk_share,
            expert_tolerance: rule.expert_tolerance,
        }
    }
}

/// The score seed of a call's round ([`score_seed`]) over every delta of the call, with the secret it reveals:
/// the same seed as the commit's ([`super::commit_score_seed`]), which lists the same deltas.
pub fn call_score_seed(call: &AggregationCall) -> u64 {
    score_seed(
        &call.run,
        call.round,
        &call.seed_secret,
        call.shards
            .iter()
            .flat_map(|s| s.deltas.iter().map(|d| d.payload_hash)),
    )
}

/// One delta of the judged shard as the judge's daemon found its payload.
#[derive(Debug, Clone, Copy)]
pub struct Fetched<'a> {
    /// Who sent it.
    pub sender: PublicKey,
    /// Its payload's hash, as called.
    pub payload_hash: ContentHash,
    /// The decoded delta, or why the payload was refused (not had in time, wrong size, not bound...).
    pub payload: Result<&'a [f32], RejectCode>,
}

/// A judge's verdicts on one shard's deltas, in the call's order, with the scores it measured (for the
/// scored deltas, in the same order).
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// One verdict per delta.
    pub verdicts: Vec<DeltaVerdict>,
    /// The score of each scored delta.
    pub scores: Vec<DeltaScore>,
}

/// Judges `shard`'s deltas of `call` (`deltas`, in the call's order: its [`mana_protocol::ShardCall`]'s),
/// on `base`, the round's base states of the trunk and `shard` (other shards in it are left out). Fails
/// only when the shard cannot be judged at all (its base is missing, the run's text gives no batch): a
/// judge then signs nothing for it.
pub fn judge_deltas(
    spec: &RunSpec,
    announcement: &RoundAnnouncement,
    call: &AggregationCall,
    shard: ShardId,
    base: &[ShardRecord],
    data: &TextDataset,
    deltas: &[Fetched<'_>],
) -> Result<Judged, RoundError> {
    let rule = &call.rule;
    let history: Vec<NormSample> = history_of(call, announcement);
    // Each valid payload's norm, or the refusal its payload already had.
    let norms: Vec<Result<f32, RejectCode>> =
        deltas.iter().map(|d| d.payload.map(l2_norm)).collect();
    let round: Vec<NormSample> = deltas
        .iter()
        .zip(&norms)
        .filter_map(|(d, n)| {
            n.ok().map(|norm| NormSample {
                shard,
                sender: d.sender,
                norm,
            })
        })
        .collect();
    let mut verdicts: Vec<DeltaVerdict> = Vec::with_capacity(deltas.len());
    for (d, norm) in deltas.iter().zip(&norms) {
        let verdict = match *norm {
            Err(code) => DeltaVerdict::Refuse(code),
            Ok(norm) => match judge_norm(
                &round,
                &history,
                shard,
                d.sender,
                norm,
                rule.min_norm_ratio,
                announcement.max_norm_ratio,
            ) {
                NormVerdict::Within => DeltaVerdict::Accept { norm },
                NormVerdict::TooLarge { .. } => DeltaVerdict::Refuse(RejectCode::NormTooLarge),
                NormVerdict::TooSmall { .. } => DeltaVerdict::Refuse(RejectCode::NormTooSmall),
            },
        };
        verdicts.push(verdict);
    }

    // The score, on the batch the round's deltas fixed, of the deltas within their bounds.
    let seed = call_score_seed(call);
    let within: Vec<usize> = (0..deltas.len())
        .filter(|i| matches!(verdicts[*i], DeltaVerdict::Accept { .. }))
        .collect();
    let picked: Vec<usize> = within
        .iter()
        .copied()
        .filter(|i| is_scored(seed, shard, &deltas[*i].sender, f64::from(rule.score_share)))
        .collect();
    let mut scores = Vec::new();
    if picked.is_empty() {
        return Ok(Judged { verdicts, scores });
    }
    let in_mean = within.len();
    let batch = score_batch(spec, &announcement.hyper, data, seed, shard)?;
    let mut scorer = ShardScorer::new(
        spec,
        &announcement.hyper,
        announcement.round,
        base,
        shard,
        batch,
        in_mean,
    )?;
    let mut measured: Vec<(usize, Score)> = Vec::with_capacity(picked.len());
    for &i in &picked {
        let Ok(values) = deltas[i].payload else {
            continue;
        };
        measured.push((i, scorer.score(values)?));
    }
    let policy = ScorePolicy::of(rule);
    for (at, (i, score)) in measured.iter().enumerate() {
        // The other senders' gains on this shard, for the relative bar.
        let others: Vec<f32> = measured
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != at)
            .map(|(_, (_, s))| s.gain())
            .collect();
        if !policy.accepts(shard, score.gain(), &others) {
            verdicts[*i] = DeltaVerdict::Refuse(RejectCode::LowScore);
        }
        scores.push(DeltaScore {
            shard,
            payload_hash: deltas[*i].payload_hash,
            in_mean: in_mean as u32,
            null_loss: score.null_loss,
            loss: score.loss,
        });
    }
    Ok(Judged { verdicts, scores })
}
