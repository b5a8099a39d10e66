//! The validator refuses each kind of bad contribution with its own reason and code, and accepts the good
//! ones. The context (current round, clock) is passed in.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use common::*;
use mana_protocol::validation::{l2_norm, median_norm, validate_delta_payload};
use mana_protocol::*;

const NOW: u64 = T0 + 1000;

fn check(
    current: Option<&RoundAnnouncement>,
    signer: &Keypair,
    timestamp: u64,
    message: &Message,
) -> Result<Message, Rejection> {
    let run = run();
    let coord = coordinator().public();
    let ctx = ValidationContext {
        run: &run,
        coordinator: &coord,
        current,
        now_ms: NOW,
        limits: ValidationLimits::default(),
    };
    let envelope = SignedEnvelope::sign(signer, message, timestamp).unwrap();
    validate_envelope(&ctx, &decode_envelope(&envelope.encode().unwrap()).unwrap())
}

fn code(r: Result<Message, Rejection>) -> RejectCode {
    r.expect_err("should be refused").code()
}

#[test]
fn good_messages_pass() {
    let round = round_announcement();
    let mut previous = round.clone();
    previous.round -= 1;
    assert!(
        check(
            Some(&previous),
            &coordinator(),
            NOW,
            &Message::RoundAnnouncement(round.clone())
        )
        .is_ok()
    );
    assert!(
        check(
            None,
            &coordinator(),
            NOW,
            &Message::RoundAnnouncement(round.clone())
        )
        .is_ok()
    );
    assert!(
        check(
            Some(&round),
            &node(),
            NOW,
            &Message::DeltaAnnouncement(delta_announcement())
        )
        .is_ok()
    );
    assert!(
        check(
            Some(&round),
            &coordinator(),
            NOW,
            &Message::RoundCommit(round_commit())
        )
        .is_ok()
    );
    assert!(
        check(
            Some(&round),
            &coordinator(),
            NOW,
            &Message::CheckpointManifest(manifest(6))
        )
        .is_ok()
    );
    assert!(
        check(
            Some(&round),
            &outsider(),
            NOW,
            &Message::Heartbeat(heartbeat())
        )
        .is_ok()
    );
}

#[test]
fn each_refusal_has_its_reason() {
    let round = round_announcement();
    let cur = Some(&round);
    let delta = |f: &dyn Fn(&mut DeltaAnnouncement)| {
        let mut d = delta_announcement();
        f(&mut d);
        Message::DeltaAnnouncement(d)
    };

    let mut other_run = heartbeat();
    other_run.run = RunId::new("other").unwrap();
    assert_eq!(
        code(check(cur, &node(), NOW, &Message::Heartbeat(other_run))),
        RejectCode::UnknownRun
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW + 31_000,
            &Message::Heartbeat(heartbeat())
        )),
        RejectCode::ClockSkew
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW - 31_000,
            &Message::Heartbeat(heartbeat())
        )),
        RejectCode::ClockSkew
    );

    // Round window: replays of old rounds are stale; a node that missed announcements takes any later round
    // (it catches up instead of waiting forever for the one it missed).
    assert_eq!(
        code(check(
            cur,
            &coordinator(),
            NOW,
            &Message::RoundAnnouncement(round.clone())
        )),
        RejectCode::StaleRound
    );
    let mut far = round.clone();
    far.round += 5;
    assert!(check(cur, &coordinator(), NOW, &Message::RoundAnnouncement(far)).is_ok());
    // A commit of the current round or a later one (its announcement missed) is taken, an older one is stale,
    // and one before any announcement is the run's latest checkpoint: taken too.
    let mut behind = round.clone();
    behind.round -= 2;
    for current in [Some(&round), Some(&behind), None] {
        assert!(
            check(
                current,
                &coordinator(),
                NOW,
                &Message::RoundCommit(round_commit())
            )
            .is_ok()
        );
    }
    let mut ahead = round.clone();
    ahead.round += 1;
    assert_eq!(
        code(check(
            Some(&ahead),
            &coordinator(),
            NOW,
            &Message::RoundCommit(round_commit())
        )),
        RejectCode::StaleRound
    );
    assert_eq!(
        code(check(cur, &node(), NOW, &delta(&|d| d.round -= 1))),
        RejectCode::StaleRound
    );
    assert_eq!(
        code(check(cur, &node(), NOW, &delta(&|d| d.round += 1))),
        RejectCode::FutureRound
    );
    assert_eq!(
        code(check(None, &node(), NOW, &delta(&|_| {}))),
        RejectCode::NoRound
    );

    // Who may sign what.
    let mut next = round.clone();
    next.round += 1;
    assert_eq!(
        code(check(cur, &node(), NOW, &Message::RoundAnnouncement(next))),
        RejectCode::NotCoordinator
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &Message::RoundCommit(round_commit())
        )),
        RejectCode::NotCoordinator
    );
    assert_eq!(
        code(check(
            cur,
            &outsider(),
            NOW,
            &Message::CheckpointManifest(manifest(6))
        )),
        RejectCode::NotCoordinator
    );
    assert_eq!(
        code(check(cur, &outsider(), NOW, &delta(&|_| {}))),
        RejectCode::NotParticipant
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &delta(&|d| d.shard = ShardId::expert(1, 1).unwrap())
        )),
        RejectCode::ShardNotAssigned
    );

    // Contents.
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &delta(&|d| d.base_checkpoint = ContentHash::of(b"old"))
        )),
        RejectCode::WrongBase
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &delta(&|d| d.payload_size = u64::MAX)
        )),
        RejectCode::TooLarge
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &delta(&|d| d.stats.loss_after = f32::NAN)
        )),
        RejectCode::NonFinite
    );
    assert_eq!(
        code(check(
            cur,
            &node(),
            NOW,
            &delta(&|d| d.stats.delta_norm = f32::INFINITY)
        )),
        RejectCode::NonFinite
    );
    let mut late_round = round.clone();
    late_round.deadlines.deltas_by_ms = NOW - 1;
    assert_eq!(
        code(check(Some(&late_round), &node(), NOW, &delta(&|_| {}))),
        RejectCode::Late
    );

    let mut next = round.clone();
    next.round += 1;
    next.hyper.outer_lr = f32::NAN;
    assert_eq!(
        code(check(
            cur,
            &coordinator(),
            NOW,
            &Message::RoundAnnouncement(next.clone())
        )),
        RejectCode::NonFinite
    );
    next.hyper.outer_lr = 0.7;
    next.participants.push(next.participants[0].clone());
    assert_eq!(
        code(check(
            cur,
            &coordinator(),
            NOW,
            &Message::RoundAnnouncement(next)
        )),
        RejectCode::Inconsistent
    );
    let mut commit = round_commit();
    commit.checkpoint.round = 3;
    assert_eq!(
        code(check(
            cur,
            &coordinator(),
            NOW,
            &Message::RoundCommit(commit)
        )),
        RejectCode::Inconsistent
    );
    let mut hb = heartbeat();
    hb.capacity.tokens_per_second = f32::NAN;
    assert_eq!(
        code(check(cur, &node(), NOW, &Message::Heartbeat(hb))),
        RejectCode::NonFinite
    );
}

#[test]
fn tampered_envelopes_are_refused_as_bad_envelopes() {
    let round = round_announcement();
    let run = run();
    let coord = coordinator().public();
    let ctx = ValidationContext {
        run: &run,
        coordinator: &coord,
        current: Some(&round),
        now_ms: NOW,
        limits: ValidationLimits::default(),
    };
    let mut env = SignedEnvelope::sign(&node(), &Message::Heartbeat(heartbeat()), NOW).unwrap();
    env.signer = coordinator().public();
    let r = validate_envelope(&ctx, &env).unwrap_err();
    assert_eq!(r.code(), RejectCode::BadEnvelope);
    assert!(r.to_string().starts_with("bad-envelope"), "{r}");
}

/// A contribution of `shard_len` values and `loads_len` loads under the default codec (the fixture's).
fn shape(shard_len: usize, loads_len: usize) -> PayloadShape {
    PayloadShape {
        shard_len,
        loads_len,
        codec: CodecOptions::default(),
    }
}

/// The fixture's announcement, for a payload bound to its signer (the fixture node) as a trainer hosts it.
fn bound_announcement() -> (DeltaAnnouncement, Vec<u8>) {
    let mut ann = delta_announcement();
    let payload = Binding::of(&ann, node().public())
        .wrap(&[], &sample_payload())
        .unwrap();
    ann.payload_hash = ContentHash::of(&payload);
    ann.payload_size = payload.len() as u64;
    (ann, payload)
}

#[test]
fn delta_payloads_are_checked_against_their_announcement() {
    let (ann, payload) = bound_announcement();
    let me = node().public();
    let n = sample_delta().len();
    let valid = validate_delta_payload(&ann, &me, &payload, &shape(n, 0), None, 3.0).unwrap();
    assert!(valid.loads.is_empty());
    let norm = l2_norm(&valid.delta);
    // An expert's contribution carries no loads, a trunk's the model's routed experts: any other count is
    // refused.
    let r = validate_delta_payload(&ann, &me, &payload, &shape(n, 4), None, 3.0).unwrap_err();
    assert_eq!(r.code(), RejectCode::BadPayload);
    assert!(r.to_string().contains("expert loads"), "{r}");
    assert!(validate_delta_payload(&ann, &me, &payload, &shape(n, 0), Some(norm), 3.0).is_ok());

    let r = validate_delta_payload(&ann, &me, &payload, &shape(n, 0), Some(norm / 4.0), 3.0)
        .unwrap_err();
    assert_eq!(r.code(), RejectCode::NormTooLarge);
    assert!(r.to_string().starts_with("norm-too-large"), "{r}");

    let mut tampered = payload.clone();
    tampered[20] ^= 1;
    assert_eq!(
        validate_delta_payload(&ann, &me, &tampered, &shape(n, 0), None, 3.0)
            .unwrap_err()
            .code(),
        RejectCode::HashMismatch
    );
    assert_eq!(
        validate_delta_payload(
            &ann,
            &me,
            &payload[..payload.len() - 1],
            &shape(n, 0),
            None,
            3.0
        )
        .unwrap_err()
        .code(),
        RejectCode::SizeMismatch
    );
    assert_eq!(
        validate_delta_payload(&ann, &me, &payload, &shape(n + 1, 0), None, 3.0)
            .unwrap_err()
            .code(),
        RejectCode::BadPayload
    );

    // A delta encoded with another codec than the round's is refused even when it decodes: here the round
    // asks for power-of-two scales and the payload has f32 ones (and the other way round).
    let pow2 = CodecOptions {
        scale: ScaleFormat::PowerOfTwo,
        ..CodecOptions::default()
    };
    let r = validate_delta_payload(
        &ann,
        &me,
        &payload,
        &PayloadShape {
            codec: pow2,
            ..shape(n, 0)
        },
        None,
        3.0,
    )
    .unwrap_err();
    assert_eq!(r.code(), RejectCode::BadPayload);
    assert!(r.to_string().contains("round codec"), "{r}");

    // A payload whose hash matches but which does not decode, and a bare delta with no binding.
    for junk in [vec![0u8; 40], sample_payload()] {
        let mut junk_ann = ann.clone();
        junk_ann.payload_hash = ContentHash::of(&junk);
        junk_ann.payload_size = junk.len() as u64;
        assert_eq!(
            validate_delta_payload(&junk_ann, &me, &junk, &shape(n, 0), None, 3.0)
                .unwrap_err()
                .code(),
            RejectCode::BadPayload
        );
    }
}

#[test]
fn a_payload_is_refused_under_any_other_sender_round_or_shard() {
    let (ann, payload) = bound_announcement();
    let n = sample_delta().len();
    // Another key re-announcing the same hash.
    let r = validate_delta_payload(
        &ann,
        &outsider().public(),
        &payload,
        &shape(n, 0),
        None,
        3.0,
    )
    .unwrap_err();
    assert_eq!(r.code(), RejectCode::NotBound);
    assert!(r.to_string().starts_with("not-bound"), "{r}");
    // The same sender, in a later round or for another shard.
    let mut later = ann.clone();
    later.round += 1;
    assert_eq!(
        validate_delta_payload(&later, &node().public(), &payload, &shape(n, 0), None, 3.0)
            .unwrap_err()
            .code(),
        RejectCode::NotBound
    );
    let mut other = ann.clone();
    other.shard = ShardId::expert(1, 1).unwrap();
    assert_eq!(
        validate_delta_payload(&other, &node().public(), &payload, &shape(n, 0), None, 3.0)
            .unwrap_err()
            .code(),
        RejectCode::NotBound
    );
}

#[test]
fn codes_are_stable_and_distinct() {
    let all = [
        RejectCode::BadEnvelope,
        RejectCode::UnknownRun,
        RejectCode::ClockSkew,
        RejectCode::NoRound,
        RejectCode::StaleRound,
        RejectCode::FutureRound,
        RejectCode::NotCoordinator,
        RejectCode::NotParticipant,
        RejectCode::ShardNotAssigned,
        RejectCode::WrongBase,
        RejectCode::Late,
        RejectCode::TooLarge,
        RejectCode::NonFinite,
        RejectCode::Inconsistent,
        RejectCode::NormTooLarge,
        RejectCode::HashMismatch,
        RejectCode::SizeMismatch,
        RejectCode::BadPayload,
        RejectCode::NotBound,
        RejectCode::Unavailable,
        RejectCode::NormTooSmall,
        RejectCode::LowScore,
        RejectCode::NotAdmitted,
    ];
    let strings: std::collections::HashSet<_> = all.iter().map(|c| c.as_str()).collect();
    assert_eq!(strings.len(), all.len());
    assert_eq!(RejectCode::NormTooLarge.to_string(), "norm-too-large");
    // The wire index of each code is its position: appending is fine, reordering breaks peers.
    for (i, c) in all.iter().enumerate() {
        let bytes = wire::encode::<_, 64>(c, "code").unwrap();
        assert_eq!(bytes, vec![i as u8], "{c}");
    }
}

#[test]
fn median_norm_is_the_median() {
    assert_eq!(median_norm(&[]), None);
    assert_eq!(median_norm(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median_norm(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    assert_eq!(median_norm(&[1.0, f32::NAN]), None);
}

#[test]
fn commit_disputes_are_judged_by_round_and_consistency() {
    let round = round_announcement();
    let dispute = |f: &dyn Fn(&mut CommitDispute)| {
        let mut d = commit_dispute();
        f(&mut d);
        Message::CommitDispute(d)
    };
    // Any node may dispute the commit of the current round or of one just before it.
    assert!(check(Some(&round), &node(), NOW, &dispute(&|_| {})).is_ok());
    assert!(check(Some(&round), &outsider(), NOW, &dispute(&|d| d.round -= 2)).is_ok());
    assert_eq!(
        code(check(None, &node(), NOW, &dispute(&|_| {}))),
        RejectCode::NoRound
    );
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &dispute(&|d| d.round += 1)
        )),
        RejectCode::FutureRound
    );
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &dispute(&|d| d.round -= 3)
        )),
        RejectCode::StaleRound
    );
    // A dispute that agrees with the commit, or that changes a shard without any delta, is nonsense.
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &dispute(&|d| d.computed = d.committed)
        )),
        RejectCode::Inconsistent
    );
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &dispute(&|d| d.accepted.clear())
        )),
        RejectCode::Inconsistent
    );
    assert!(
        check(
            Some(&round),
            &node(),
            NOW,
            &dispute(&|d| {
                d.accepted.clear();
                d.committed = ContentHash::of(b"changed without a delta");
                d.computed = d.base;
            })
        )
        .is_ok()
    );
}

#[test]
fn a_dispute_matches_only_the_commit_it_quotes() {
    let commit = round_commit();
    let dispute = commit_dispute();
    assert_eq!(dispute.matches(&commit), Ok(()));
    let mut other = commit.clone();
    other.rejected.clear();
    assert!(matches!(
        dispute.matches(&other),
        Err(DisputeMismatch::OtherCommit { .. })
    ));
    let mut wrong = dispute.clone();
    wrong.committed = ContentHash::of(b"another entry");
    assert_eq!(
        wrong.matches(&commit),
        Err(DisputeMismatch::OtherEntry {
            shard: dispute.shard
        })
    );
    let mut wrong = dispute.clone();
    wrong.accepted.push(ContentHash::of(b"one more"));
    assert_eq!(
        wrong.matches(&commit),
        Err(DisputeMismatch::OtherDeltas {
            shard: dispute.shard
        })
    );
    let mut wrong = dispute.clone();
    wrong.computed = wrong.committed;
    assert_eq!(wrong.matches(&commit), Err(DisputeMismatch::NoDisagreement));
}

#[test]
fn commit_ids_differ_when_contents_differ() {
    let commit = round_commit();
    let mut other = commit.clone();
    other.rejected.clear();
    assert_eq!(commit.hash().unwrap(), round_commit().hash().unwrap());
    assert_ne!(commit.hash().unwrap(), other.hash().unwrap());
}

#[test]
fn evaluations_are_judged_by_round_and_their_figures() {
    let round = round_announcement();
    let evaluation = |f: &dyn Fn(&mut Evaluation)| {
        let mut e = evaluation();
        f(&mut e);
        Message::Evaluation(e)
    };
    // Any node may report the loss of a recent committed checkpoint.
    assert!(check(Some(&round), &node(), NOW, &evaluation(&|_| {})).is_ok());
    assert!(
        check(
            Some(&round),
            &outsider(),
            NOW,
            &evaluation(&|e| e.round -= 2)
        )
        .is_ok()
    );
    assert_eq!(
        code(check(None, &node(), NOW, &evaluation(&|_| {}))),
        RejectCode::NoRound
    );
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &evaluation(&|e| e.round += 1)
        )),
        RejectCode::FutureRound
    );
    assert_eq!(
        code(check(
            Some(&round),
            &node(),
            NOW,
            &evaluation(&|e| e.round -= 3)
        )),
        RejectCode::StaleRound
    );
    // A loss that is no loss, or an average over no batch (or too many), does not decode.
    for bad in [
        evaluation(&|e| e.val_loss = f32::NAN),
        evaluation(&|e| e.val_loss = f32::INFINITY),
        evaluation(&|e| e.val_loss = -0.5),
        evaluation(&|e| e.batches = 0),
        evaluation(&|e| e.batches = limits::MAX_EVALUATION_BATCHES + 1),
    ] {
        assert!(bad.check_limits().is_err(), "{bad:?}");
    }
}

#[test]
fn calls_and_attestations_are_bounded_sorted_and_finite() {
    assert!(
        Message::AggregationCall(aggregation_call())
            .check_limits()
            .is_ok()
    );
    assert!(
        Message::ShardAttestation(shard_attestation())
            .check_limits()
            .is_ok()
    );
    let call = |f: &dyn Fn(&mut AggregationCall)| {
        let mut c = aggregation_call();
        f(&mut c);
        Message::AggregationCall(c)
    };
    let attestation = |f: &dyn Fn(&mut ShardAttestation)| {
        let mut a = shard_attestation();
        f(&mut a);
        Message::ShardAttestation(a)
    };
    for bad in [
        // Deltas out of order (the order the accepted ones are applied in), or one twice.
        call(&|c| c.shards[0].deltas.reverse()),
        call(&|c| {
            let d = c.shards[0].deltas[0];
            c.shards[0].deltas.push(d);
        }),
        // A weight outside 1 to MAX_DELTA_WEIGHT.
        call(&|c| c.shards[0].deltas[0].weight = 0),
        call(&|c| c.shards[0].deltas[1].weight = MAX_DELTA_WEIGHT + 1),
        // A sender or judge index no announcement can hold.
        call(&|c| c.shards[0].deltas[0].sender = limits::MAX_PARTICIPANTS as u32),
        call(&|c| c.shards[0].verifiers.push(limits::MAX_PARTICIPANTS as u32)),
        // A rule or a norm that is not a figure.
        call(&|c| c.rule.score_share = 1.5),
        call(&|c| c.rule.expert_tolerance = f32::NAN),
        call(&|c| c.rule.min_norm_ratio = -0.1),
        call(&|c| c.norms[0].norm = f32::INFINITY),
        call(&|c| c.norms[0].norm = -1.0),
        // A norm history outside 1 to MAX_NORM_HISTORY, or more records of a shard than it keeps.
        call(&|c| c.norm_history = 0),
        call(&|c| c.norm_history = limits::MAX_NORM_HISTORY + 1),
        call(&|c| {
            c.norm_history = 1;
            let n = c.norms[0];
            c.norms.push(n);
        }),
        // A judging rule with no holder judging, or more judges than a shard may have.
        call(&|c| c.judging.max_holder_judges = 0),
        call(&|c| {
            c.judging.max_holder_judges = 32;
            c.judging.verifiers_per_shard = limits::MAX_SHARD_JUDGES as u32 - 31;
        }),
        call(&|c| c.judging.verifiers_per_shard = u32::MAX),
        // Shards out of order.
        call(&|c| {
            let s = c.shards[0].clone();
            c.shards.push(s);
        }),
        // More scores than verdicts, a norm that is none, shards out of order.
        attestation(&|a| {
            let s = a.results[0].scores[0];
            a.results[0].scores.extend([s, s]);
        }),
        attestation(&|a| a.results[0].verdicts[0] = DeltaVerdict::Accept { norm: f32::NAN }),
        attestation(&|a| {
            let r = a.results[0].clone();
            a.results.push(r);
        }),
    ] {
        assert!(bad.check_limits().is_err(), "{bad:?}");
    }
    // A commit's accepted norms: one per delta, each a norm.
    let mut commit = round_commit();
    commit.accepted[0].norms.push(1.0);
    assert!(Message::RoundCommit(commit).check_limits().is_err());
    let mut commit = round_commit();
    commit.accepted[0].norms[0] = f32::NAN;
    assert!(Message::RoundCommit(commit).check_limits().is_err());
}

#[test]
fn verdicts_agree_only_bit_for_bit() {
    let accept = |norm: f32| DeltaVerdict::Accept { norm };
    assert_eq!(accept(0.5), accept(0.5));
    assert_ne!(accept(0.5), accept(0.5 + f32::EPSILON));
    assert_ne!(accept(0.5), DeltaVerdict::Refuse(RejectCode::LowScore));
    assert_ne!(
        DeltaVerdict::Refuse(RejectCode::LowScore),
        DeltaVerdict::Refuse(RejectCode::NormTooLarge)
    );
    // A total order, so a tally can group them.
    let mut v = vec![
        DeltaVerdict::Refuse(RejectCode::LowScore),
        accept(2.0),
        accept(1.0),
    ];
    v.sort();
    assert_eq!(v[0], accept(1.0));
}

#[test]
fn parcels_come_only_from_the_coordinator_with_a_size_a_parcel_may_have() {
    let header = parcel();
    assert!(check(None, &coordinator(), NOW, &Message::Parcel(header.clone())).is_ok());
    assert_eq!(
        code(check(None, &node(), NOW, &Message::Parcel(header.clone()))),
        RejectCode::NotCoordinator
    );
    for size in [0, limits::MAX_PARCEL_BYTES as u32 + 1] {
        let bad = Message::Parcel(Parcel {
            size,
            ..header.clone()
        });
        assert!(
            SignedEnvelope::sign(&coordinator(), &bad, NOW).is_err(),
            "a parcel of {size} bytes is not signed"
        );
    }
}

/// A node that missed the last round's announcement still takes the end of the run (and with it the final
/// checkpoint it names): only who signed it and when are checked.
#[test]
fn the_end_of_the_run_is_taken_in_any_round_but_only_from_the_coordinator() {
    let end = Message::RunEnd(run_end());
    let mut earlier = round_announcement();
    earlier.round = run_end().round - 2;
    for current in [None, Some(&earlier), Some(&round_announcement())] {
        assert!(
            check(current, &coordinator(), NOW, &end).is_ok(),
            "{current:?}"
        );
    }
    assert_eq!(
        code(check(Some(&earlier), &node(), NOW, &end)),
        RejectCode::NotCoordinator
    );
    assert_eq!(
        code(check(Some(&earlier), &coordinator(), NOW - 60_000, &end)),
        RejectCode::ClockSkew
    );
}

#[test]
fn an_envelope_over_the_gossip_limit_opens_only_as_a_parcel() {
    // A commit whose checkpoint lists 8,000 shards: about 0.4 MiB, over a gossip message.
    let mut commit = round_commit();
    commit.checkpoint.shards = (0..8000u32)
        .map(|i| ShardEntry {
            shard: ShardId::Expert {
                layer: (i / 256) as u16,
                index: (i % 256) as u16,
            },
            hash: ContentHash::of(&i.to_le_bytes()),
            size: 1 << 20,
            round: 7,
        })
        .collect();
    let message = Message::RoundCommit(commit);
    let bytes = SignedEnvelope::sign(&coordinator(), &message, NOW)
        .unwrap()
        .encode()
        .unwrap();
    assert!(
        bytes.len() > limits::MAX_ENVELOPE_BYTES,
        "{} bytes",
        bytes.len()
    );
    assert!(matches!(
        decode_envelope(&bytes),
        Err(ProtocolError::TooLarge { .. })
    ));
    let opened = decode_parcel(&bytes).unwrap();
    assert_eq!(opened.verify().unwrap(), message);
    let mut too_big = bytes.clone();
    too_big.resize(limits::MAX_PARCEL_BYTES + 1, 0);
    assert!(matches!(
        decode_parcel(&too_big),
        Err(ProtocolError::TooLarge { .. })
    ));
}
