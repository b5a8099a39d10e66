//! A dishonest coordinator is caught (issue #12, section 5), on a real loopback network with the real roles: a
//! bootstrap, the coordinator's node running the real conductor (`run_conductor`) for its honest rounds, and
//! three honest trainers (`run_trainer`). The lie itself is real traffic signed with the coordinator's key: the
//! test publishes it through the coordinator's own node (`NodeHandle::publish` signs with that node's key), as
//! a coordinator that lies would. No trainer code is mocked.
//!
//! - A coordinator that commits a wrong shard: after two honest rounds, the test runs one more round as the
//!   coordinator (announcement, then a commit that accepts every trainer's trunk delta but gives the trunk its
//!   old hash). Every trainer recomputes the trunk, refuses the commit (status, no adoption: its store stays
//!   at the honest round), publishes a signed dispute (checked here: signature, and that it quotes the commit
//!   faithfully, the three trainers agreeing on the computed hash), and declines the next round built on it.
//!   In its honest rounds every trainer recomputed the published scores of its own deltas and of its shards'
//!   accepted deltas, and found them all true.
//! - A coordinator that publishes false scores: the trainers draw no round for recomputing scores
//!   (`rescore_share` 0). After two honest rounds, the test runs one round as the coordinator and refuses
//!   every trunk delta as `low-score`, publishing made-up scores. The commit is otherwise right (nothing
//!   accepted, every shard unchanged), so only the score check can catch it: every trainer recomputes its own
//!   refused delta's score (always, whatever its share), finds the published one false, and says so (error
//!   log, `score_mismatches` in its status).
//! - A coordinator that does not commit what a quorum of a shard's judges signed: the test calls the trunk's
//!   judgments itself, then drops the quorum (the trunk held, its deltas `late`) in one round and forges the
//!   accepted norms in the next. Every trainer, a judge of the trunk, audits each commit against the
//!   attestations it saw: the first is counted as a dropped quorum, the second as a contradiction, kept with
//!   its signed evidence.
//! - A coordinator that equivocates: while the conductor runs, the test publishes a second, different commit
//!   for a round already committed. Every node (the three trainers and the coordinator's own node) keeps both
//!   signed envelopes in its store (checked here with the coordinator's key alone) and shows it in its status,
//!   and every trainer stops building on the run.
//!
//! - A coordinator that forges the norm history of a call: every trainer, which rebuilt the history from the
//!   commits, refuses to judge the call and keeps it as evidence.
//! - A call published again (a coordinator restarted while its judges work): every trainer answers with the
//!   judgment it signed for it, not a new one.
//! - Not a lie, played the same way: a commit whose new trunk nobody serves at first. Every trainer keeps
//!   trying and applies the commit once the trunk is hosted, with no later round to prompt it.
//! - Nor this: the run's end heard before its last commit. Every trainer still applies the commit.
//! - Nor this: the run's end heard and the last commit never. Every trainer takes its trunk from the end's
//!   final checkpoint, the state it computed itself as a judge; and one whose trunk no judge signed (a lie)
//!   is refused by all.
//!
//! The tests share the machine's cores, so they run one at a time.
// The serialising guard is held across awaits on purpose: it spans a whole test and is never contended
// within one.
#![allow(clippy::await_holding_lock)]

mod net_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mana_engine::round::RunSpec;
use mana_node::daemon::equivocation::{EVIDENCE_KIND, verify_equivocation};
use mana_node::daemon::status::RefusedCommit;
use mana_node::daemon::{Accepted, NodeHandle};
use mana_node::roles::commit_check::refusal_key;
use mana_node::roles::common::{DataSource, load_dataset, publish_patiently};
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_protocol::{
    AcceptedDeltas, AggregationCall, CalledDelta, ContentHash, DeltaScore, DeltaVerdict, Message,
    NormRecord, PublicKey, RejectCode, RejectedDelta, RoundAnnouncement, RoundCommit, RunEnd,
    ShardCall, ShardId, ShardJudgment, seed_commitment,
};
use net_support::*;
use tokio::sync::watch;

/// One test at a time: each runs a whole network on the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

const HONEST: usize = 3;
/// Honest rounds before the coordinator commits a wrong shard, in the round after them.
const HONEST_ROUNDS: u64 = 2;
const LIE: u64 = HONEST_ROUNDS + 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_commits_a_wrong_shard_is_caught() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let net = RoundNet::start(HONEST).await;
    let trainer_keys: Vec<PublicKey> = net.trainers.iter().map(|(n, _)| n.public_key()).collect();
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let seen_by_coordinator = Heard::listen(&net.coordinator);

    // Honest rounds, by the real conductor, until every trainer applied the last one.
    let before = net.honest_rounds(HONEST_ROUNDS, HONEST).await;
    // The honest coordinator's scores are true: every trainer (recomputing them every round here) checked
    // some and found none false, from the shards it holds.
    for s in &before {
        let t = training(s);
        assert!(t.scores_checked > 0, "{} checked no score", s.peer_id);
        assert_eq!(t.score_mismatches, 0, "{:?}", t.last_score_mismatch);
    }
    let (honest_ann, honest_commit) = seen_by_trainer.round(HONEST_ROUNDS);
    let honest_s = started.elapsed().as_secs_f64();

    // The next round, run by the test as the coordinator, from the honest checkpoint.
    let base = honest_commit.checkpoint.clone();
    let ann = next_announcement(&honest_ann, LIE, &base);
    net.announce(&ann).await;
    let trunk_deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;
    // The lie: every trunk delta accepted, the trunk committed unchanged (its old blob, which exists and could
    // be fetched); the experts honestly unchanged (no expert delta accepted).
    let mut payloads: Vec<ContentHash> = trunk_deltas.iter().map(|(_, h)| *h).collect();
    payloads.sort();
    let mut checkpoint = base.clone();
    checkpoint.round = LIE;
    let lied_trunk = base.shard(&ShardId::Trunk).expect("trunk").hash;
    let lie = RoundCommit {
        run: ann.run.clone(),
        round: LIE,
        accepted: vec![AcceptedDeltas {
            shard: ShardId::Trunk,
            deltas: payloads.clone(),
            weights: vec![1; payloads.len()],
            norms: vec![1.0; payloads.len()],
        }],
        rejected: Vec::new(),
        checkpoint,
        scores: Vec::new(),
        // The announcement is the honest round's but for its number and deadlines: its commitment too.
        seed_secret: honest_commit.seed_secret,
        dissent: Vec::new(),
    };
    assert_eq!(lie.round, LIE);
    let lie_id = lie.hash().expect("commit id");
    let lie_at = Instant::now();
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(lie.clone()),
        Duration::from_secs(10),
    )
    .await
    .expect("the wrong commit published");

    // Every trainer refuses it: status, no adoption, stopped.
    let refused = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer refused the wrong commit",
            |s| training(s).refused_commit.is_some() && training(s).halted.is_some(),
        )
        .await;
    let refuse_s = lie_at.elapsed().as_secs_f64();
    let mut computed = Vec::new();
    for s in &refused {
        let t = training(s);
        let r = t.refused_commit.as_ref().expect("refused");
        assert_eq!(r.round, LIE);
        assert_eq!(r.commit, lie_id.to_string());
        assert_eq!(r.shards.len(), 1, "only the trunk is wrong: {r:?}");
        assert_eq!(r.shards[0].shard, "trunk");
        assert_eq!(r.shards[0].committed, lied_trunk.to_string());
        assert_eq!(r.shards[0].accepted, HONEST);
        assert_ne!(r.shards[0].computed, r.shards[0].committed);
        assert_eq!(r.disputes_published, 1);
        computed.push(r.shards[0].computed.clone());
        // Not adopted: the node's store and its applied round stay at the honest round.
        assert_eq!(
            t.applied_round,
            Some(HONEST_ROUNDS),
            "{} adopted the wrong commit",
            s.peer_id
        );
        assert_eq!(
            s.stored_round,
            Some(HONEST_ROUNDS),
            "{} stored the wrong commit",
            s.peer_id
        );
        let was = before
            .iter()
            .find(|b| b.peer_id == s.peer_id)
            .expect("the same trainer before");
        assert_eq!(
            training(was).held_shards,
            t.held_shards,
            "{} changed its shards",
            s.peer_id
        );
        assert_eq!(t.hash_mismatches, 1);
    }
    computed.dedup();
    assert_eq!(
        computed.len(),
        1,
        "the honest trainers computed the same trunk: {computed:?}"
    );

    // The disputes: signed by each trainer, checkable against the commit, agreeing with each other.
    let disputes = wait_for(
        Duration::from_secs(20),
        "the coordinator heard every dispute",
        || async {
            let d: Vec<Accepted> = seen_by_coordinator
                .find(|m| matches!(m.message, Message::CommitDispute(_)).then(|| m.clone()));
            (d.len() >= HONEST).then_some(d)
        },
    )
    .await;
    let mut signers = Vec::new();
    for m in &disputes {
        let bytes = m.envelope.encode().expect("encode");
        let envelope = mana_protocol::decode_envelope(&bytes).expect("decodes");
        let Message::CommitDispute(dispute) =
            envelope.verify().expect("the dispute's signature verifies")
        else {
            panic!("not a dispute")
        };
        assert!(
            trainer_keys.contains(&envelope.signer),
            "signed by a trainer"
        );
        signers.push(envelope.signer);
        assert_eq!(
            dispute.matches(&lie),
            Ok(()),
            "the dispute quotes the wrong commit faithfully"
        );
        assert_eq!(dispute.accepted, payloads);
        assert_eq!(dispute.base, lied_trunk);
        assert_eq!(dispute.computed.to_string(), computed[0]);
    }
    signers.sort();
    signers.dedup();
    assert_eq!(signers.len(), HONEST, "one dispute from every trainer");
    let heard = net
        .coordinator
        .status()
        .await
        .expect("status")
        .disputes_heard;
    assert!(
        heard >= HONEST as u64,
        "the coordinator's node counts the disputes: {heard}"
    );

    // A round built on the wrong commit: every trainer declines it.
    let trained_before: Vec<u64> = refused.iter().map(|s| training(s).rounds_trained).collect();
    let wrong_manifest = lie.checkpoint.to_bytes().expect("manifest bytes");
    net.coordinator
        .host_blob_now(wrong_manifest)
        .await
        .expect("hosted");
    net.announce(&next_announcement(&ann, LIE + 1, &lie.checkpoint))
        .await;
    let after = net
        .wait_trainers(
            Duration::from_secs(30),
            "every trainer declined the round after the lie",
            |s| training(s).rounds_declined >= 1,
        )
        .await;
    let trained_after: Vec<u64> = after.iter().map(|s| training(s).rounds_trained).collect();
    assert_eq!(
        trained_before, trained_after,
        "a trainer trained on the wrong commit"
    );
    let round3_deltas = seen_by_coordinator.find(|m| match &m.message {
        Message::DeltaAnnouncement(d) if d.round == LIE + 1 => Some(()),
        _ => None,
    });
    assert!(
        round3_deltas.is_empty(),
        "deltas were sent for a round built on the wrong commit"
    );
    // The refusal is kept in each trainer's store (so a restarted trainer still refuses; see the test below).
    for (node, _) in &net.trainers {
        let key = refusal_key(LIE, &lie.run);
        let blobs = node
            .store()
            .evidence_piece(&key)
            .expect("evidence read")
            .expect("the refusal kept");
        let record: RefusedCommit =
            serde_json::from_slice(&node.read_blob(blobs[0]).await.expect("blob")).expect("json");
        assert_eq!((record.round, record.commit), (LIE, lie_id.to_string()));
    }
    // What `mana status` (and its `--json`) reads: the status file each node rewrites.
    for (node, _) in &net.trainers {
        let dir = node.config().data_dir.clone();
        wait_for(
            Duration::from_secs(20),
            "the refusal in the status file",
            || {
                let dir = dir.clone();
                async move {
                    let s = mana_node::daemon::status::read(&dir).ok()?;
                    let t = s.training?;
                    (t.halted.is_some() && t.refused_commit.is_some_and(|r| r.round == LIE))
                        .then_some(())
                }
            },
        )
        .await;
    }
    eprintln!(
        "wrong shard: honest rounds done at {honest_s:.1} s; {} of {HONEST} trainers refused the wrong commit within {refuse_s:.1} s, \
         {} disputes heard and verified, {} trainers declined the next round; total {:.1} s",
        refused.len(),
        disputes.len(),
        after.len(),
        started.elapsed().as_secs_f64()
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_publishes_false_scores_is_caught() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Trainers that never draw a round for recomputing others' scores: a verdict on their own delta is
    // checked all the same.
    let net = RoundNet::start_rescoring(HONEST, 0.0).await;
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let seen_by_coordinator = Heard::listen(&net.coordinator);
    let honest = net.honest_rounds(HONEST_ROUNDS, HONEST).await;
    for s in &honest {
        let t = training(s);
        assert_eq!(t.score_mismatches, 0, "{:?}", t.last_score_mismatch);
    }
    let checked_before: BTreeMap<String, u64> = honest
        .iter()
        .map(|s| (s.peer_id.clone(), training(s).scores_checked))
        .collect();
    let (honest_ann, honest_commit) = seen_by_trainer.round(HONEST_ROUNDS);
    let base = honest_commit.checkpoint;

    // The test's round, with a seed secret it commits to.
    let secret = [0x5e; 32];
    let ann = RoundAnnouncement {
        seed_commitment: seed_commitment(&secret),
        ..next_announcement(&honest_ann, LIE, &base)
    };
    net.announce(&ann).await;
    let trunk_deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;
    // The lie: every honest trunk delta refused as `low-score`, with a score saying it raised the loss.
    let mut checkpoint = base.clone();
    checkpoint.round = LIE;
    let mut scores: Vec<DeltaScore> = trunk_deltas
        .iter()
        .map(|(_, payload)| DeltaScore {
            shard: ShardId::Trunk,
            payload_hash: *payload,
            in_mean: HONEST as u32,
            null_loss: 5.0,
            loss: 5.5,
        })
        .collect();
    scores.sort_by_key(|s| s.payload_hash);
    let lie = RoundCommit {
        run: ann.run.clone(),
        round: LIE,
        accepted: Vec::new(),
        rejected: trunk_deltas
            .iter()
            .map(|(node, payload)| RejectedDelta {
                shard: ShardId::Trunk,
                node: *node,
                payload_hash: *payload,
                reason: RejectCode::LowScore,
            })
            .collect(),
        checkpoint,
        scores,
        seed_secret: secret,
        dissent: Vec::new(),
    };
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(lie),
        Duration::from_secs(10),
    )
    .await
    .expect("the commit with false scores published");
    let caught = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer found its delta's published score false and applied the commit",
            // The score check comes before the commit is stored: both are waited for.
            |s| training(s).score_mismatches >= 1 && training(s).applied_round == Some(LIE),
        )
        .await;
    for s in &caught {
        let t = training(s);
        assert_eq!(
            t.score_mismatches, 1,
            "one false score per trainer: its own"
        );
        let text = t
            .last_score_mismatch
            .clone()
            .expect("the mismatch is described");
        assert!(
            text.contains("is false") && text.contains("trunk"),
            "{text}"
        );
        // The commit itself reproduces (nothing accepted, nothing changed): the node applies it and goes on.
        assert_eq!(t.applied_round, Some(LIE), "{}", s.peer_id);
        assert!(t.halted.is_none());
        assert_eq!(t.scores_checked, checked_before[&s.peer_id]);
    }
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_equivocates_is_caught() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let net = RoundNet::start(HONEST).await;
    let key = net.coordinator.public_key();
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let conducting = net.conduct(3, HONEST);

    // The honest commit of round 1, as the trainers got it.
    let first = wait_for(
        Duration::from_secs(120),
        "the commit of round 1",
        || async {
            seen_by_trainer
                .find(|m| match &m.message {
                    Message::RoundCommit(c) if c.round == 1 => Some(c.clone()),
                    _ => None,
                })
                .pop()
        },
    )
    .await;
    // The second story of round 1: the same, but blaming a trainer for a delta it never sent.
    let mut second = first.clone();
    second.rejected.push(RejectedDelta {
        shard: ShardId::Trunk,
        node: net.trainers[1].0.public_key(),
        payload_hash: ContentHash::of(b"never sent"),
        reason: RejectCode::NormTooLarge,
    });
    let ids = BTreeMap::from([
        (first.hash().expect("id"), "first"),
        (second.hash().expect("id"), "second"),
    ]);
    let lie_at = Instant::now();
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(second.clone()),
        Duration::from_secs(10),
    )
    .await
    .expect("the second commit published");

    // Every node keeps the pair and shows it; every trainer stops.
    let mut nodes: Vec<(&str, Arc<NodeHandle>)> = vec![("coordinator", net.coordinator.clone())];
    nodes.extend(
        net.trainers
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (["node-0", "node-1", "node-2"][i], n.clone())),
    );
    for (name, node) in &nodes {
        let status = wait_for(
            Duration::from_secs(30),
            &format!("{name} caught the equivocation"),
            || async {
                let s = node.status().await.expect("status");
                (!s.equivocations.is_empty()).then_some(s)
            },
        )
        .await;
        let e = &status.equivocations[0];
        assert_eq!(e.round, 1, "{name}");
        assert_eq!(e.evidence.len(), 2, "{name}: both envelopes stored");
        let mut key_bytes = 1u64.to_be_bytes().to_vec();
        key_bytes.extend_from_slice(EVIDENCE_KIND);
        let blobs = node
            .store()
            .evidence_piece(&key_bytes)
            .expect("evidence read")
            .expect("evidence kept");
        assert_eq!(
            blobs.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            e.evidence,
            "{name}"
        );
        let a = node.read_blob(blobs[0]).await.expect("first envelope");
        let b = node.read_blob(blobs[1]).await.expect("second envelope");
        let (ca, cb) = verify_equivocation(&key, &a, &b).expect("the pair proves the equivocation");
        let mut got = BTreeMap::new();
        got.insert(ca.hash().expect("id"), "first");
        got.insert(cb.hash().expect("id"), "second");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ids.keys().collect::<Vec<_>>(),
            "{name}: the pair is the two commits"
        );
    }
    let caught_s = lie_at.elapsed().as_secs_f64();
    // What `mana status --json` shows: the status file each node rewrites.
    for (name, node) in &nodes {
        let dir = node.config().data_dir.clone();
        wait_for(
            Duration::from_secs(20),
            &format!("the equivocation in {name}'s status file"),
            || {
                let dir = dir.clone();
                async move {
                    let s = mana_node::daemon::status::read(&dir).ok()?;
                    s.equivocations
                        .iter()
                        .any(|e| e.round == 1 && e.evidence.len() == 2)
                        .then_some(())
                }
            },
        )
        .await;
    }
    let halted = net
        .wait_trainers(
            Duration::from_secs(30),
            "every trainer stopped building on the run",
            |s| training(s).halted.is_some(),
        )
        .await;
    for s in &halted {
        let why = training(s).halted.clone().unwrap_or_default();
        assert!(
            why.contains("two different commits"),
            "{}: {why}",
            s.peer_id
        );
    }
    let halt_s = lie_at.elapsed().as_secs_f64();
    // The conductor goes on announcing rounds; the trainers take no part in them.
    let declined = net
        .wait_trainers(
            Duration::from_secs(90),
            "every trainer declined a later round",
            |s| training(s).rounds_declined >= 1,
        )
        .await;
    let last_trained: Vec<u64> = declined
        .iter()
        .map(|s| training(s).rounds_trained)
        .collect();
    assert!(
        last_trained.iter().all(|r| *r <= 2),
        "a trainer went on training: {last_trained:?}"
    );
    eprintln!(
        "equivocation: caught by {} nodes (coordinator + {HONEST} trainers) within {caught_s:.1} s, {} trainers stopped within \
         {halt_s:.1} s, {} declined a later round; total {:.1} s",
        nodes.len(),
        halted.len(),
        declined.len(),
        started.elapsed().as_secs_f64()
    );
    drop(nodes);
    let _ = net.stop_tx.send(true);
    conducting
        .await
        .expect("coordinator task")
        .expect("coordinator ran");
    net.stop().await;
}

/// A trainer that refused a commit keeps refusing after a restart: the refusal kept in its store (as the test
/// above shows the trainer writes it) halts a freshly started trainer on the same data directory at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_refused_a_commit_still_refuses_after_a_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator = mana_protocol::Keypair::from_seed(&[9; 32]).public();
    let node = Arc::new(start_node(member_config(dir.path(), &[], "node", coordinator)).await);
    let refused = RefusedCommit {
        round: 7,
        commit: ContentHash::of(b"the wrong commit").to_string(),
        ..RefusedCommit::default()
    };
    let key = refusal_key(7, &node.config().net.run_id);
    let record = serde_json::to_vec(&refused).expect("json");
    node.store().keep_evidence(&key, &[&record]).expect("kept");
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 64 * 1024,
            ..DataSource::default()
        })
        .expect("corpus"),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_trainer(
        node.clone(),
        TrainerConfig::new(RunSpec::tiny(), data),
        stopped(stop_rx),
    ));
    let status = wait_for(
        Duration::from_secs(20),
        "the restarted trainer halted",
        || async {
            let s = node.status().await.expect("status");
            s.training
                .clone()
                .filter(|t| t.halted.is_some())
                .map(|t| (t, s))
        },
    )
    .await;
    assert_eq!(status.0.refused_commit, Some(refused));
    assert!(status.0.halted.unwrap_or_default().contains("round 7"));
    let _ = stop_tx.send(true);
    task.await.expect("trainer task").expect("trainer ran");
    Arc::into_inner(node)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
}

/// The test, as the coordinator, calls round `ann`'s judgments of the trunk alone (its trunk `deltas`, every
/// participant judging as a holder) and waits for every trainer's attestation; returns the call and the
/// judgment a quorum signed.
async fn call_trunk_judgments(
    net: &RoundNet,
    heard: &Heard,
    ann: &RoundAnnouncement,
    deltas: &[(PublicKey, ContentHash)],
    secret: [u8; 32],
    norms: Vec<NormRecord>,
) -> (AggregationCall, ShardJudgment) {
    let call = trunk_call(heard, ann, deltas, secret, norms);
    let id = publish_call(net, &call).await;
    let judgments = wait_for(
        Duration::from_secs(60),
        "every trainer's judgment of the trunk",
        || async {
            let j: Vec<ShardJudgment> = heard.find(|m| match &m.message {
                Message::ShardAttestation(a) if a.call == id => a.results.first().cloned(),
                _ => None,
            });
            (j.len() >= HONEST).then_some(j)
        },
    )
    .await;
    // The honest trainers agree: one judgment, every honest delta accepted.
    let first = judgments[0].clone();
    for j in &judgments {
        assert_eq!((j.entry, &j.verdicts), (first.entry, &first.verdicts));
    }
    assert!(
        first
            .verdicts
            .iter()
            .all(|v| matches!(v, DeltaVerdict::Accept { .. })),
        "{:?}",
        first.verdicts
    );
    (call, first)
}

/// Announces `ann` as the coordinator, waits for every trainer's trunk delta and calls the trunk's judgments
/// with the norm history the trainers rebuilt (`seen_by_trainer`): the call and the quorum's judgment.
async fn announce_and_call_trunk(
    net: &RoundNet,
    seen_by_coordinator: &Heard,
    seen_by_trainer: &Heard,
    ann: &RoundAnnouncement,
    secret: [u8; 32],
) -> (AggregationCall, ShardJudgment) {
    net.announce(ann).await;
    let deltas = seen_by_coordinator.trunk_deltas(ann.round, HONEST).await;
    let norms = honest_norms(seen_by_trainer, ann.round);
    call_trunk_judgments(net, seen_by_coordinator, ann, &deltas, secret, norms).await
}

/// The network after its honest rounds, for a test that then plays the coordinator: what the coordinator's
/// node heard since before the first round, and the last honest round's announcement and commit as the first
/// trainer got them.
/// The network after the honest rounds: what the coordinator's node heard, the last honest announcement and
/// commit, and what a trainer heard (the coordinator's own messages among them, which the coordinator's node
/// never hears).
async fn after_honest_rounds() -> (RoundNet, Heard, RoundAnnouncement, RoundCommit, Heard) {
    let net = RoundNet::start(HONEST).await;
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let seen_by_coordinator = Heard::listen(&net.coordinator);
    net.honest_rounds(HONEST_ROUNDS, HONEST).await;
    let (ann, commit) = seen_by_trainer.round(HONEST_ROUNDS);
    (net, seen_by_coordinator, ann, commit, seen_by_trainer)
}

/// Round [`LIE`] played by the test as the coordinator after two honest rounds, up to the trunk's judgments.
struct CalledLie {
    net: RoundNet,
    seen_by_coordinator: Heard,
    seen_by_trainer: Heard,
    ann: RoundAnnouncement,
    /// Its base: the last honest commit's checkpoint.
    base: mana_protocol::CheckpointManifest,
    call: AggregationCall,
    /// The trunk quorum's judgment.
    judgment: ShardJudgment,
    secret: [u8; 32],
}

impl CalledLie {
    /// The checkpoint an honest commit of the round would name: the trunk the quorum signed.
    fn honest_checkpoint(&self) -> mana_protocol::CheckpointManifest {
        let (ann, base, call, judgment) = (&self.ann, &self.base, &self.call, &self.judgment);
        trunk_commit(ann, base, call, judgment, self.secret, 1.0).checkpoint
    }
}

/// Two honest rounds, then round [`LIE`] announced and the trunk's judgments called ([`CalledLie`]).
async fn called_lie_round() -> CalledLie {
    let (net, seen_by_coordinator, honest_ann, honest_commit, seen_by_trainer) =
        after_honest_rounds().await;
    let secret = honest_commit.seed_secret;
    let base = honest_commit.checkpoint.clone();
    let ann = next_announcement(&honest_ann, LIE, &base);
    let (call, judgment) =
        announce_and_call_trunk(&net, &seen_by_coordinator, &seen_by_trainer, &ann, secret).await;
    CalledLie {
        net,
        seen_by_coordinator,
        seen_by_trainer,
        ann,
        base,
        call,
        judgment,
        secret,
    }
}

/// A real trunk state that no judge computed: `base`'s trunk (read from a trainer) with one weight moved, as
/// bytes.
async fn a_trunk_nobody_judged(
    net: &RoundNet,
    base: &mana_protocol::CheckpointManifest,
) -> Vec<u8> {
    use mana_engine::round::state::RunShard;
    use mana_kernels::checkpoint::ShardRecord;
    let old = base.shard(&ShardId::Trunk).expect("trunk").hash;
    let bytes = net.trainers[0]
        .0
        .read_blob(old)
        .await
        .expect("the base trunk");
    let mut trunk = ShardRecord::from_bytes(&bytes, &net.spec, ShardId::Trunk).expect("decodes");
    trunk.params[0] += 0.01;
    trunk.to_bytes()
}

/// The norm history an honest coordinator hands in round `round`'s call, rebuilt from the announcements,
/// calls and commits a trainer heard (`mana_engine::coordinator::norm_ledger`): a call that carries another
/// is not judged.
fn honest_norms(seen_by_trainer: &Heard, round: u64) -> Vec<NormRecord> {
    let mut ledger = mana_engine::coordinator::norm_ledger::NormLedger::new();
    for message in seen_by_trainer.find(|m| Some(m.message.clone())) {
        match &message {
            Message::RoundAnnouncement(a) => ledger.announced(a),
            Message::AggregationCall(c) => ledger.called(c),
            Message::RoundCommit(c) => ledger.committed(c),
            _ => {}
        }
    }
    ledger
        .honest_history(
            round,
            mana_engine::coordinator::config::DEFAULT_NORM_HISTORY,
        )
        .expect("the history of the rounds heard")
}

/// Publishes `call` as the coordinator; returns its id.
async fn publish_call(net: &RoundNet, call: &AggregationCall) -> ContentHash {
    publish_patiently(
        &net.coordinator,
        &Message::AggregationCall(call.clone()),
        Duration::from_secs(10),
    )
    .await
    .expect("the call published");
    call.hash().expect("call id")
}

/// Round `ann`'s commit from `base` of the trunk as its judges' quorum signed `judgment` of `call`: every
/// delta of the call accepted, with the norms the judges measured times `norm_scale` (1 for the honest
/// commit).
fn trunk_commit(
    ann: &RoundAnnouncement,
    base: &mana_protocol::CheckpointManifest,
    call: &AggregationCall,
    judgment: &ShardJudgment,
    secret: [u8; 32],
    norm_scale: f32,
) -> RoundCommit {
    let part = &call.shards[0];
    let mut checkpoint = base.clone();
    checkpoint.round = ann.round;
    for e in checkpoint.shards.iter_mut() {
        if e.shard == ShardId::Trunk {
            *e = judgment.entry;
        }
    }
    RoundCommit {
        run: ann.run.clone(),
        round: ann.round,
        accepted: vec![AcceptedDeltas {
            shard: ShardId::Trunk,
            deltas: part.deltas.iter().map(|d| d.payload_hash).collect(),
            weights: vec![1; part.deltas.len()],
            norms: judgment
                .verdicts
                .iter()
                .map(|v| match v {
                    DeltaVerdict::Accept { norm } => norm * norm_scale,
                    DeltaVerdict::Refuse(_) => 0.0,
                })
                .collect(),
        }],
        rejected: Vec::new(),
        checkpoint,
        scores: Vec::new(),
        seed_secret: secret,
        dissent: Vec::new(),
    }
}

/// Round `ann`'s call for judgments of the trunk alone (its trunk `deltas`, every participant a holder), with
/// `norms` as its norm history.
fn trunk_call(
    heard: &Heard,
    ann: &RoundAnnouncement,
    deltas: &[(PublicKey, ContentHash)],
    secret: [u8; 32],
    norms: Vec<NormRecord>,
) -> AggregationCall {
    let index = |k: &PublicKey| {
        ann.participants
            .iter()
            .position(|p| p.node == *k)
            .expect("a participant") as u32
    };
    let sizes: BTreeMap<ContentHash, u64> = heard
        .find(|m| match &m.message {
            Message::DeltaAnnouncement(d) if d.round == ann.round => {
                Some((d.payload_hash, d.payload_size))
            }
            _ => None,
        })
        .into_iter()
        .collect();
    let mut called: Vec<CalledDelta> = deltas
        .iter()
        .map(|(k, h)| CalledDelta {
            sender: index(k),
            payload_hash: *h,
            payload_size: sizes[h],
            weight: 1,
        })
        .collect();
    called.sort_by_key(|d| (d.payload_hash, d.sender));
    AggregationCall {
        run: ann.run.clone(),
        round: ann.round,
        base_checkpoint: ann.base_checkpoint,
        seed_secret: secret,
        rule: mana_engine::round::default_verdict_rule(),
        judging: mana_protocol::JudgingRule::default(),
        norm_history: mana_engine::coordinator::config::DEFAULT_NORM_HISTORY,
        norms,
        shards: vec![ShardCall {
            shard: ShardId::Trunk,
            deltas: called,
            holders: (0..ann.participants.len() as u32).collect(),
            verifiers: Vec::new(),
        }],
    }
}

/// A call published again (as a coordinator restarted while its judges work does) is answered with the
/// judgment signed for it, not judged again: a second judgment that differed (a payload fetched the second
/// time that was unavailable the first) would count as an equivocation and cost an honest judge its standing.
/// Every trainer sends its attestation again, with the same judgment, and none is found equivocating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_published_again_gets_the_same_judgment_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (net, seen_by_coordinator, honest_ann, honest_commit, seen_by_trainer) =
        after_honest_rounds().await;
    let ann = next_announcement(&honest_ann, LIE, &honest_commit.checkpoint);
    let (call, _) = announce_and_call_trunk(
        &net,
        &seen_by_coordinator,
        &seen_by_trainer,
        &ann,
        honest_commit.seed_secret,
    )
    .await;
    let before: Vec<u64> = net
        .wait_trainers(Duration::from_secs(60), "every trainer judged", |s| {
            training(s).activity == format!("round {LIE}: judgments signed")
        })
        .await
        .iter()
        .map(|s| training(s).deltas_judged)
        .collect();
    let id = publish_call(&net, &call).await;
    let answers = wait_for(
        Duration::from_secs(60),
        "every trainer's second attestation",
        || async {
            let a: Vec<(PublicKey, ShardJudgment)> =
                seen_by_coordinator.find(|m| match &m.message {
                    Message::ShardAttestation(a) if a.call == id => {
                        a.results.first().cloned().map(|j| (m.signer, j))
                    }
                    _ => None,
                });
            (a.len() >= 2 * HONEST).then_some(a)
        },
    )
    .await;
    for (node, _) in &net.trainers {
        let key = node.public_key();
        let mine: Vec<&ShardJudgment> = answers
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, j)| j)
            .collect();
        assert!(mine.len() >= 2, "{key}: {} attestations", mine.len());
        assert!(mine.iter().all(|j| *j == mine[0]), "{key}: {mine:?}");
    }
    // Not judged again: no delta was judged since the first answer.
    let after: Vec<u64> = net
        .statuses()
        .await
        .iter()
        .map(|s| {
            assert_eq!(training(s).judges_equivocated, 0);
            training(s).deltas_judged
        })
        .collect();
    assert_eq!(after, before, "the call was judged again");
    net.stop().await;
}

/// A coordinator that forges the norm history of its call (the norms of recently accepted deltas, which
/// every judge's norm bounds draw on) is refused by its judges. After two honest rounds, which every trainer
/// saw, the test calls the trunk's judgments of a third with one made-up record (a norm a thousand times an
/// honest one, as from a trainer that never sent it). Every trainer rebuilds the history from the commits
/// (`mana_engine::coordinator::norm_ledger`), finds the call's is not it, does not judge (no attestation
/// is published for the call) and keeps the signed call as evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_a_forged_norm_history_is_not_judged() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (net, seen_by_coordinator, honest_ann, honest_commit, _) = after_honest_rounds().await;
    let norm = honest_commit
        .accepted
        .iter()
        .find(|a| a.shard == ShardId::Trunk)
        .and_then(|a| a.norms.first().copied())
        .expect("an honest trunk delta accepted");
    let ann = next_announcement(&honest_ann, LIE, &honest_commit.checkpoint);
    net.announce(&ann).await;
    let deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;
    let forged = vec![NormRecord {
        shard: ShardId::Trunk,
        sender: ann
            .participants
            .iter()
            .position(|p| p.node == net.trainers[0].0.public_key())
            .map(|i| i as u32),
        norm: norm * 1000.0,
    }];
    let call = trunk_call(
        &seen_by_coordinator,
        &ann,
        &deltas,
        honest_commit.seed_secret,
        forged,
    );
    refused_by_every_trainer(
        &net,
        &seen_by_coordinator,
        &call,
        "norm history",
        b"/norm-history-forged",
    )
    .await;
    net.stop().await;
}

/// Publishes `call` as the coordinator and checks that every trainer refuses it before judging: each counts a
/// refused call whose finding names `finding`, no attestation of it exists (in what the coordinator's node
/// `heard`), and each keeps the signed call under the round's evidence key ending in `evidence`.
async fn refused_by_every_trainer(
    net: &RoundNet,
    heard: &Heard,
    call: &AggregationCall,
    finding: &str,
    evidence: &[u8],
) {
    let id = publish_call(net, call).await;
    let refused = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer refused the call",
            |s| training(s).calls_refused >= 1,
        )
        .await;
    for s in &refused {
        let found = training(s).last_audit_finding.clone().unwrap_or_default();
        assert!(found.contains(finding), "{found}");
    }
    // Refused before judging: no judgment of the call exists.
    let judged = heard.find(|m| match &m.message {
        Message::ShardAttestation(a) if a.call == id => Some(m.signer),
        _ => None,
    });
    assert!(judged.is_empty(), "judged by {judged:?}");
    for (node, _) in &net.trainers {
        let mut key = call.round.to_be_bytes().to_vec();
        key.extend_from_slice(evidence);
        let blobs = node
            .store()
            .evidence_piece(&key)
            .expect("evidence read")
            .expect("the evidence kept");
        let bytes = node.read_blob(blobs[0]).await.expect("blob");
        let kept = mana_protocol::decode_envelope(&bytes).expect("the call");
        assert_eq!(kept.signer, net.coordinator.public_key());
        assert!(matches!(kept.verify(), Ok(Message::AggregationCall(c)) if &c == call));
    }
}

/// A coordinator that names a shard's judges itself, instead of the public draw, is refused by its judges.
/// After two honest rounds the test calls the trunk's judgments of a third with two of the three trainers as
/// its judges, where the draw (the call's own rule, three judging holders, from the seed the call reveals)
/// gives all three: a coordinator's pick that could leave out the one honest holder among colluders. Every
/// trainer redraws the judges (`mana_engine::coordinator::check_call_judges`), finds the call's are not
/// them, does not judge, and keeps the signed call as evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_judges_are_not_the_draw_is_not_judged() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (net, seen_by_coordinator, honest_ann, honest_commit, seen_by_trainer) =
        after_honest_rounds().await;
    let ann = next_announcement(&honest_ann, LIE, &honest_commit.checkpoint);
    net.announce(&ann).await;
    let deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;
    let mut call = trunk_call(
        &seen_by_coordinator,
        &ann,
        &deltas,
        honest_commit.seed_secret,
        honest_norms(&seen_by_trainer, LIE),
    );
    // The draw: every participant sent a trunk delta and holds the trunk, and three may judge it.
    mana_engine::coordinator::check_call_judges(&ann, &call, &honest_commit.checkpoint)
        .expect("the honest call is the draw");
    let left_out = call.shards[0].holders.pop().expect("a holder");
    eprintln!("the call leaves participant {left_out} out of the trunk's judges");
    refused_by_every_trainer(
        &net,
        &seen_by_coordinator,
        &call,
        "public draw",
        b"/judges-not-drawn",
    )
    .await;
    net.stop().await;
}

/// A coordinator that does not commit what a quorum of a shard's judges signed is seen by the judges
/// themselves (`audit_commit` in the trainer, `mana_engine::coordinator::audit`), on a real network. The test
/// plays the coordinator for two rounds after two honest ones. In the first it drops the judges' quorum: the
/// commit holds the trunk and lists every trunk delta `late`; every trainer counts a dropped quorum
/// (`quorums_dropped`). In the second it commits the quorum's result and accepted deltas but forges their
/// norms (tenfold: the history later norm bounds draw on, which recomputing the shard cannot see): every
/// trainer finds the commit contradicting the quorum (`quorums_contradicted`) and keeps the signed call, the
/// quorum's attestations and the commit as evidence, which verify with their signers' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_drops_or_rewrites_a_quorums_judgment_is_caught() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Round LIE: the quorum's judgment dropped.
    let CalledLie {
        net,
        seen_by_coordinator,
        seen_by_trainer,
        ann,
        base,
        judgment,
        secret,
        ..
    } = called_lie_round().await;
    let deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;
    assert_ne!(judgment.entry, *base.shard(&ShardId::Trunk).expect("trunk"));
    let mut checkpoint = base.clone();
    checkpoint.round = LIE;
    let dropped = RoundCommit {
        run: ann.run.clone(),
        round: LIE,
        accepted: Vec::new(),
        rejected: deltas
            .iter()
            .map(|(node, payload_hash)| RejectedDelta {
                shard: ShardId::Trunk,
                node: *node,
                payload_hash: *payload_hash,
                reason: RejectCode::Late,
            })
            .collect(),
        checkpoint: checkpoint.clone(),
        scores: Vec::new(),
        seed_secret: secret,
        dissent: Vec::new(),
    };
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(dropped.clone()),
        Duration::from_secs(10),
    )
    .await
    .expect("the commit published");
    let after_drop = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer saw the dropped quorum",
            |s| training(s).quorums_dropped >= 1 && training(s).applied_round == Some(LIE),
        )
        .await;
    for s in &after_drop {
        let t = training(s);
        assert_eq!(t.quorums_contradicted, 0, "{:?}", t.last_audit_finding);
        assert!(
            t.halted.is_none(),
            "a dropped quorum is no proof: {:?}",
            t.halted
        );
    }

    // Round LIE + 1: the quorum's result, with forged norms.
    let ann = next_announcement(&ann, LIE + 1, &dropped.checkpoint);
    net.coordinator
        .host_blob_now(dropped.checkpoint.to_bytes().expect("manifest"))
        .await
        .expect("hosted");
    let (call, judgment) =
        announce_and_call_trunk(&net, &seen_by_coordinator, &seen_by_trainer, &ann, secret).await;
    // The norms forged tenfold.
    let forged = trunk_commit(&ann, &dropped.checkpoint, &call, &judgment, secret, 10.0);
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(forged.clone()),
        Duration::from_secs(10),
    )
    .await
    .expect("the commit published");
    let after_forgery = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer saw the forged norms",
            |s| training(s).quorums_contradicted >= 1,
        )
        .await;
    for s in &after_forgery {
        let t = training(s);
        // The shard itself reproduces: only the audit sees the forgery.
        assert_eq!(t.hash_mismatches, 0, "{:?}", t.refused_commit);
        let finding = t.last_audit_finding.clone().unwrap_or_default();
        assert!(finding.contains("trunk"), "{finding}");
    }
    // The evidence: the signed commit, the signed call and the quorum's signed attestations.
    for (node, _) in &net.trainers {
        let mut key = (LIE + 1).to_be_bytes().to_vec();
        key.extend_from_slice(b"/quorum-contradicted/trunk");
        let blobs = node
            .store()
            .evidence_piece(&key)
            .expect("evidence read")
            .expect("the evidence kept");
        assert_eq!(blobs.len(), 3);
        let read = |i: usize| {
            let node = node.clone();
            let hash = blobs[i];
            async move { node.read_blob(hash).await.expect("blob") }
        };
        let commit = mana_protocol::decode_envelope(&read(0).await).expect("the commit");
        assert_eq!(commit.signer, net.coordinator.public_key());
        assert!(matches!(commit.verify(), Ok(Message::RoundCommit(c)) if c == forged));
        let called = mana_protocol::decode_envelope(&read(1).await).expect("the call");
        assert!(matches!(called.verify(), Ok(Message::AggregationCall(c)) if c == call));
        let attestations: Vec<Vec<u8>> =
            serde_json::from_slice(&read(2).await).expect("the attestations");
        assert!(attestations.len() >= 2, "a quorum of the three holders");
        for bytes in &attestations {
            let a = mana_protocol::decode_envelope(bytes).expect("an attestation");
            assert!(matches!(a.verify(), Ok(Message::ShardAttestation(_))));
        }
    }
    net.stop().await;
}

/// Not a lie, played the same way: a commit whose new trunk a holder cannot have at once (an accepted delta's
/// sender gone before anyone but the judges fetched it, and the judges slow to serve the result). After two
/// honest rounds the test runs a third as the coordinator and commits a trunk computed from a delta nobody
/// serves, hosting the new trunk nowhere yet. Every trainer, unable to recompute it or to fetch it, does not
/// call the round applied and says why in its status; once the trunk is hosted (by the coordinator's node
/// here) every trainer fetches it on its own, with no later round to make it, and applies the commit. Before,
/// a failed fetch at a run's last commit left its holder on the old state for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_shard_that_cannot_be_fetched_at_once_is_fetched_later() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Fetches of what nobody has give up after FETCH (a minute by default).
    const FETCH: Duration = Duration::from_secs(8);
    let net = RoundNet::start_fetching_within(HONEST, FETCH).await;
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let seen_by_coordinator = Heard::listen(&net.coordinator);
    net.honest_rounds(HONEST_ROUNDS, HONEST).await;
    let (honest_ann, honest_commit) = seen_by_trainer.round(HONEST_ROUNDS);
    let base = honest_commit.checkpoint.clone();
    let ann = next_announcement(&honest_ann, LIE, &base);
    net.announce(&ann).await;
    let deltas = seen_by_coordinator.trunk_deltas(LIE, HONEST).await;

    // The new trunk: a real trunk state (the base's, one weight moved), which nobody holds yet.
    let next = a_trunk_nobody_judged(&net, &base).await;
    let next_hash = ContentHash::of(&next);
    // The accepted deltas: the trainers' own, and one whose payload no node has.
    let mut payloads: Vec<ContentHash> = deltas.iter().map(|(_, h)| *h).collect();
    payloads.push(ContentHash::of(
        b"a delta whose sender left before anyone fetched it",
    ));
    let mut checkpoint = base.clone();
    checkpoint.round = LIE;
    for entry in &mut checkpoint.shards {
        if entry.shard == ShardId::Trunk {
            (entry.hash, entry.size, entry.round) = (next_hash, next.len() as u64, LIE);
        }
    }
    let commit = RoundCommit {
        run: ann.run.clone(),
        round: LIE,
        accepted: vec![AcceptedDeltas {
            shard: ShardId::Trunk,
            deltas: payloads.clone(),
            weights: vec![1; payloads.len()],
            norms: vec![1.0; payloads.len()],
        }],
        rejected: Vec::new(),
        checkpoint,
        scores: Vec::new(),
        seed_secret: honest_commit.seed_secret,
        dissent: Vec::new(),
    };
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(commit),
        Duration::from_secs(10),
    )
    .await
    .expect("the commit published");

    // Nobody can have the trunk: every trainer says so, and has not applied the round.
    let waiting = net
        .wait_trainers(
            4 * FETCH + Duration::from_secs(30),
            "every trainer failed to fetch the new trunk once",
            |s| training(s).activity.contains("not fetched yet"),
        )
        .await;
    for s in &waiting {
        assert_eq!(training(s).applied_round, Some(HONEST_ROUNDS));
        assert_eq!(training(s).hash_mismatches, 0);
    }
    // Hosted: every trainer fetches it and applies the commit, with no other message to prompt it.
    assert_eq!(
        net.coordinator.host_blob_now(next).await.expect("hosted"),
        next_hash
    );
    let applied = net
        .wait_trainers(
            2 * FETCH + Duration::from_secs(30),
            "every trainer applied the commit",
            |s| training(s).applied_round == Some(LIE),
        )
        .await;
    for s in &applied {
        let t = training(s);
        let held: BTreeMap<&str, &str> = t
            .held_shards
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(held.get("trunk"), Some(&next_hash.to_string().as_str()));
        assert_eq!(s.stored_round, Some(LIE));
        assert_eq!(t.hash_mismatches, 0);
        assert!(t.halted.is_none(), "{:?}", t.halted);
    }
    net.stop().await;
}

/// Not a lie either: the run's end overtaking its last commit (two messages, which gossip may deliver by
/// different paths and so in either order). After two honest rounds the test runs a third as the
/// coordinator, calls the trunk's judgments, then publishes the run's end before the honest commit. Every
/// trainer still applies the last commit: the end no longer drops the assignment it is applied with (the
/// light coordinator's 16-member run, with the coordinator publishing along the gossip mesh, failed so five
/// times in five before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_end_before_its_last_commit_still_lets_the_commit_apply() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let CalledLie {
        net,
        ann,
        base,
        call,
        judgment,
        secret,
        ..
    } = called_lie_round().await;
    let commit = trunk_commit(&ann, &base, &call, &judgment, secret, 1.0);
    let checkpoint = commit.checkpoint.clone();

    // The end first: every trainer hears it before the commit.
    let end = RunEnd {
        run: ann.run.clone(),
        round: LIE,
        checkpoint: checkpoint.hash().expect("manifest hash"),
    };
    publish_patiently(
        &net.coordinator,
        &Message::RunEnd(end),
        Duration::from_secs(10),
    )
    .await
    .expect("the end published");
    net.wait_trainers(
        Duration::from_secs(30),
        "every trainer heard the end",
        |s| training(s).run_ended == Some(LIE),
    )
    .await;
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(commit),
        Duration::from_secs(10),
    )
    .await
    .expect("the commit published");
    for s in &applied_with(&net, "every trainer applied the last commit", &judgment).await {
        let t = training(s);
        assert_eq!(t.quorums_dropped + t.quorums_contradicted, 0);
    }
    net.stop().await;
}

/// Not a lie: a member that never hears the last commit (lost on the way), only the run's end. After two
/// honest rounds the test runs a third as the coordinator and calls the trunk's judgments, then publishes
/// only the end, naming the checkpoint the honest commit would have (its manifest hosted, as a coordinator's
/// commits are). Every trainer takes its trunk from it, the state it computed itself as a judge, and applies
/// the round. Before, each waited for the commit for good and held round 2's trunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_hears_the_last_commit_takes_the_final_checkpoint() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lie = called_lie_round().await;
    end_with(&lie.net, &lie.ann, &lie.honest_checkpoint()).await;
    let what = "every trainer applied the last round from the final checkpoint";
    for s in &applied_with(&lie.net, what, &lie.judgment).await {
        assert_eq!(training(s).run_ended, Some(LIE));
    }
    lie.net.stop().await;
}

/// The lie behind the same path: a run's end naming a final checkpoint whose trunk no judge signed (a real
/// trunk state, the base's with one weight moved, hosted with its manifest). Every trainer refuses to take
/// it, says so, and keeps round 2's trunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_checkpoint_that_no_judge_signed_is_not_taken() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lie = called_lie_round().await;
    let (net, ann, base) = (&lie.net, &lie.ann, &lie.base);
    let mut checkpoint = lie.honest_checkpoint();
    let old = base.shard(&ShardId::Trunk).expect("trunk").hash;
    let forged = a_trunk_nobody_judged(net, base).await;
    let forged_hash = net
        .coordinator
        .host_blob_now(forged.clone())
        .await
        .expect("hosted");
    for entry in &mut checkpoint.shards {
        if entry.shard == ShardId::Trunk {
            (entry.hash, entry.size) = (forged_hash, forged.len() as u64);
        }
    }
    end_with(net, ann, &checkpoint).await;
    let refused = net
        .wait_trainers(
            Duration::from_secs(60),
            "every trainer refused the final checkpoint",
            |s| {
                training(s)
                    .activity
                    .contains("no judge this node heard signed")
            },
        )
        .await;
    for s in &refused {
        let t = training(s);
        assert_eq!(t.applied_round, Some(HONEST_ROUNDS));
        let trunk = t.held_shards.iter().find(|(k, _)| k == "trunk");
        assert_eq!(trunk.map(|(_, h)| h.clone()), Some(old.to_string()));
        assert_eq!(s.stored_round, Some(HONEST_ROUNDS));
    }
    lie.net.stop().await;
}

/// Waits (`what`) until every trainer has applied round [`LIE`] and holds the trunk `judgment` names, stored,
/// with no hash mismatch; returns their statuses.
async fn applied_with(
    net: &RoundNet,
    what: &str,
    judgment: &ShardJudgment,
) -> Vec<mana_node::daemon::status::NodeStatus> {
    let applied = net
        .wait_trainers(Duration::from_secs(60), what, |s| {
            training(s).applied_round == Some(LIE)
        })
        .await;
    for s in &applied {
        let t = training(s);
        let trunk = t.held_shards.iter().find(|(k, _)| k == "trunk");
        assert_eq!(
            trunk.map(|(_, h)| h.clone()),
            Some(judgment.entry.hash.to_string())
        );
        assert_eq!(s.stored_round, Some(LIE));
        assert_eq!(t.hash_mismatches, 0);
    }
    applied
}

/// Hosts `checkpoint`'s manifest on the coordinator's node (as a coordinator hosts its commits') and
/// publishes the run's end at `ann`'s round, naming it, with no commit before it.
async fn end_with(
    net: &RoundNet,
    ann: &RoundAnnouncement,
    checkpoint: &mana_protocol::CheckpointManifest,
) {
    let hash = net
        .coordinator
        .host_blob_now(checkpoint.to_bytes().expect("encodes"))
        .await
        .expect("hosted");
    assert_eq!(hash, checkpoint.hash().expect("manifest hash"));
    publish_patiently(
        &net.coordinator,
        &Message::RunEnd(RunEnd {
            run: ann.run.clone(),
            round: ann.round,
            checkpoint: hash,
        }),
        Duration::from_secs(10),
    )
    .await
    .expect("the end published");
}
