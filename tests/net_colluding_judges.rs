//! Two colluding members against the judges' quorum, on a real loopback network with the real roles: a
//! bootstrap, the coordinator (`run_conductor`), three honest trainers (`run_trainer`), an evaluator, and two
//! colluders. The colluders are members like any other (they heartbeat, are assigned the trunk and experts,
//! and train honestly). One of them poisons two deltas every round, in ways the honest judges refuse: its
//! trunk delta sign-flipped (`low-score`) and one expert's scaled fifty times (`norm-too-large`). Both sign
//! the same judgment of every shard either of them judges, as a holder or as a drawn verifier: every delta
//! accepted (the poisoned ones too) and one state they agree on. So the test plays the attacks of the
//! light-coordinator issue that need two keys: two colluding holders of one shard, a judge that accepts a
//! poisoned delta (the other colluder judges the trunk in every round, and its expert when drawn), and both
//! together against the honest judges.
//!
//! What must hold, shard by shard and round by round, from the call the test heard (its judges) and the
//! commit:
//! - nothing the colluders signed is ever committed, and no poisoned delta is ever accepted;
//! - where the honest judges are a quorum (a strict majority, with a verifier among them when verifiers were
//!   drawn), their result stands, the poisoned delta is refused, and each colluder among the judges is named
//!   a dissenter in the commit (and charged);
//! - where they are not (two colluders among four judges), the shard holds its state and its deltas are
//!   `late`; in the next round it is escalated (twice the verifiers), so the colluders face an honest majority
//!   there, and a colluder outvoted on a shard it holds loses it;
//! - every honest holder agrees with every commit, and the validation loss falls.

mod net_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mana_engine::coordinator::{escalated, judges_of};
use mana_engine::round::RunSpec;
use mana_kernels::data::TextDataset;
use mana_node::daemon::NodeHandle;
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_protocol::{
    AggregationCall, ContentHash, DeltaEncoder, DeltaVerdict, Message, PublicKey, RejectCode,
    RoundAnnouncement, ShardAttestation, ShardEntry, ShardId, ShardJudgment, UpdateRule,
};
use net_support::*;
use tokio::sync::{broadcast, watch};

const HONEST: usize = 3;
const ROUNDS: u64 = 4;

/// What the colluders did.
#[derive(Default)]
struct CollusionLog {
    /// The poisoned payloads sent: (round, shard, payload hash) by colluder.
    poisoned: BTreeMap<PublicKey, BTreeSet<(u64, ShardId, ContentHash)>>,
    /// Shards each colluder signed its collusive judgment of, by round.
    signed: BTreeMap<(u64, PublicKey), usize>,
}

/// The state the colluders agree on for `shard` in `round`: the same for both, and no state anyone computes.
fn agreed_state(shard: ShardId, round: u64) -> ContentHash {
    ContentHash::of(format!("what the colluders sign for {shard} in round {round}").as_bytes())
}

/// How many times its honest norm the poisoner sends its first expert's delta (over the norm bound's 10).
const EXPERT_POISON_SCALE: f32 = 50.0;

/// A colluder's loop: every round it takes part in, it trains honestly from the round's base and publishes
/// an honest delta for each shard it is assigned; a `poisoner` sends its trunk delta sign-flipped and its
/// first expert's scaled [`EXPERT_POISON_SCALE`] times instead (each bound and encoded like an honest one).
/// On every call, it signs the colluders' judgment of every shard it judges: every delta accepted, the agreed
/// state.
async fn run_colluder(
    node: Arc<NodeHandle>,
    poisoner: bool,
    spec: RunSpec,
    data: Arc<TextDataset>,
    log: Arc<Mutex<CollusionLog>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rx = node.accepted();
    let me = node.public_key();
    let mut encoders: BTreeMap<ShardId, DeltaEncoder> = BTreeMap::new();
    let mut last_ann: Option<RoundAnnouncement> = None;
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = rx.recv() => m,
        };
        let ann = match message {
            Ok(m) => match m.message {
                Message::RoundAnnouncement(ann) => ann,
                Message::AggregationCall(call) => {
                    if let Some(ann) = last_ann.as_ref().filter(|a| a.round == call.round) {
                        let n = sign_collusion(&node, ann, &call).await;
                        if n > 0 {
                            log.lock().expect("lock").signed.insert((call.round, me), n);
                        }
                    }
                    continue;
                }
                _ => continue,
            },
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        last_ann = Some(ann.clone());
        let Some(part) = ann.participant(&me).cloned() else {
            continue;
        };
        let Some((_, local)) = honest_local_round(&node, &ann, &part, &spec, &data).await else {
            eprintln!("round {}: a colluder could not fetch its base", ann.round);
            continue;
        };
        let expert = part.shards.iter().copied().find(|s| *s != ShardId::Trunk);
        let scale = |shard: ShardId| match shard {
            _ if !poisoner => None,
            ShardId::Trunk => Some(-1.0),
            s if Some(s) == expert => Some(EXPERT_POISON_SCALE),
            _ => None,
        };
        for (shard, hash, poisoned) in
            publish_deltas(&node, &ann, &local, &mut encoders, scale).await
        {
            if poisoned {
                log.lock()
                    .expect("lock")
                    .poisoned
                    .entry(me)
                    .or_default()
                    .insert((ann.round, shard, hash));
            }
        }
    }
}

/// Signs, as `node`, the colluders' judgment of every shard of `call` it judges in `ann`'s round (every delta
/// accepted at a made-up norm, and the agreed state); returns how many shards.
async fn sign_collusion(
    node: &NodeHandle,
    ann: &RoundAnnouncement,
    call: &AggregationCall,
) -> usize {
    let me = node.public_key();
    let Ok(base) = node.read_blob(call.base_checkpoint).await else {
        return 0;
    };
    let Ok(base) = mana_protocol::CheckpointManifest::from_bytes(&base) else {
        return 0;
    };
    let results: Vec<ShardJudgment> = call
        .shards
        .iter()
        .filter(|c| judges_of(ann, c).contains(&me))
        .filter_map(|c| base.shard(&c.shard).copied().map(|e| (c, e)))
        .map(|(c, e)| ShardJudgment {
            entry: ShardEntry {
                hash: agreed_state(c.shard, call.round),
                round: call.round,
                ..e
            },
            verdicts: vec![DeltaVerdict::Accept { norm: 1.0 }; c.deltas.len()],
            scores: Vec::new(),
        })
        .collect();
    let n = results.len();
    if n == 0 {
        return 0;
    }
    let attestation = ShardAttestation {
        run: call.run.clone(),
        round: call.round,
        call: call.hash().expect("call id"),
        results,
    };
    match node.publish(&Message::ShardAttestation(attestation)).await {
        Ok(()) => n,
        Err(_) => 0,
    }
}

/// How one shard of one round came out, against what its judges make of it.
#[derive(Debug, Default)]
struct Tallied {
    /// Shard-rounds the honest judges carried (colluders among the judges, if any, named dissenters).
    carried: usize,
    /// Of those, with both colluders among the judges.
    carried_against_two: usize,
    /// Of those, escalated (held the round before).
    carried_escalated: usize,
    /// Shard-rounds held because the honest judges were no quorum.
    held: usize,
    /// Of those, with both colluders holding the shard.
    held_by_two_holders: usize,
    /// Poisoned deltas judged by the other colluder (as a holder or a verifier), and refused or held.
    poison_judged_by_accomplice: usize,
    /// Poisoned deltas refused.
    poison_refused: usize,
    /// Shard-rounds the honest judges should have carried but that held (an honest judge too slow).
    held_though_honest_quorum: usize,
    /// Colluders outvoted on an expert they held (with a next round to look at).
    outvoted_holders: usize,
    /// Of those, how many did not hold it in the next round.
    lost_by_outvoted: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluding_judges_never_carry_a_shard_and_are_outvoted_once_it_is_escalated() {
    // Two honest members offer room for one expert each, the third for many, like the colluders: of the 16
    // expert slots (8 experts, 2 holders each) the colluders take at least 9 between them, so they hold at
    // least one expert together, which its two honest verifiers cannot carry alone.
    let net = RoundNet::start_with(HONEST, |name, cfg| {
        if name == "node-0" || name == "node-1" {
            cfg.capacity.max_shards = 2;
        }
    })
    .await;
    let key = net.coordinator.public_key();
    let _evaluator = start_evaluator(
        net.dir.path(),
        &net.boot,
        key,
        &net.spec,
        &net.data,
        net.stop_rx.clone(),
    )
    .await;
    let heard = Heard::listen(&net.trainers[0].0);
    let log = Arc::new(Mutex::new(CollusionLog::default()));
    let mut colluders = Vec::new();
    for (name, poisoner) in [("colluder-a", true), ("colluder-b", false)] {
        let node = Arc::new(start_node(member_config(net.dir.path(), &net.boot, name, key)).await);
        let task = tokio::spawn(run_colluder(
            node.clone(),
            poisoner,
            net.spec.clone(),
            net.data.clone(),
            log.clone(),
            net.stop_rx.clone(),
        ));
        colluders.push((node, task));
    }
    let bad: Vec<PublicKey> = colluders.iter().map(|(n, _)| n.public_key()).collect();

    let metrics = net.dir.path().join("metrics.jsonl");
    let run = net.coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &net.spec, UpdateRule::Sync, 2).expect("machine config");
    machine.min_members = HONEST + 2;
    // Room for the first round, in which every node fetches the base model on a debug build and two cores
    // (the colluders fetch theirs with the test's own, slower code): a colluder that missed it would leave
    // its experts unmoved, escalated at once in round 2.
    machine.train_ms = 30_000;
    machine.verify_ms = 12_000;
    machine.cooldown_ms = 200;
    machine.member_timeout_ms = 8_000;
    // Every round waits for all five; the poisoner's refusals would ban it within three rounds (its
    // faults are checked below, bans by `tests/net_hostile_rounds.rs`), and the run would wait for it.
    machine.standing.ban_at = -1_000_000;
    let mut role = ConductorConfig::new(machine, net.spec.clone(), net.data.clone());
    role.rounds = Some(ROUNDS);
    role.metrics = Some(metrics.clone());
    let coordinating = tokio::spawn(run_conductor(
        net.coordinator.clone(),
        role,
        stopped(net.stop_rx.clone()),
    ));
    let RoundsHeard {
        lines,
        commits,
        announcements,
        calls,
    } = rounds_heard(
        coordinating,
        Duration::from_secs(120 + 45 * ROUNDS),
        &metrics,
        &heard,
        ROUNDS,
    )
    .await;
    let log = std::mem::take(&mut *log.lock().expect("lock"));
    let poisoned: BTreeMap<ContentHash, (PublicKey, u64, ShardId)> = log
        .poisoned
        .iter()
        .flat_map(|(k, set)| set.iter().map(move |(r, s, h)| (*h, (*k, *r, *s))))
        .collect();
    assert!(!poisoned.is_empty(), "the colluders poisoned nothing");
    assert!(!log.signed.is_empty(), "the colluders judged nothing");

    let mut t = Tallied::default();
    // The base checkpoint of the round being looked at (round 1's, the genesis, escalates nothing).
    let mut base: Option<mana_protocol::CheckpointManifest> = None;
    for commit in &commits {
        let ann = announcements
            .iter()
            .find(|a| a.round == commit.round)
            .expect("the commit's announcement");
        let call = calls
            .iter()
            .find(|c| c.round == commit.round)
            .expect("the commit's call");
        let base_entries = base.take();
        for p in &ann.participants {
            eprintln!(
                "round {}: {} holds {:?}{}",
                commit.round,
                &p.node.to_string()[..8],
                p.shards,
                if bad.contains(&p.node) {
                    " (colluder)"
                } else {
                    ""
                }
            );
        }
        for part in &call.shards {
            let shard = part.shard;
            let judges = judges_of(ann, part);
            let colluding: Vec<&PublicKey> = bad.iter().filter(|k| judges.contains(k)).collect();
            let honest_verifiers = judges.verifiers.iter().filter(|k| !bad.contains(k)).count();
            let honest = judges.len() - colluding.len();
            let honest_quorum =
                honest >= judges.quorum() && (judges.verifiers.is_empty() || honest_verifiers >= 1);
            // The colluders are never a quorum: at most two of at least four judges.
            assert!(
                colluding.len() < judges.quorum(),
                "round {}: {shard}: {} colluders among {} judges",
                commit.round,
                colluding.len(),
                judges.len()
            );
            let entry = commit
                .checkpoint
                .shard(&shard)
                .expect("the shard committed");
            assert_ne!(
                entry.hash,
                agreed_state(shard, commit.round),
                "round {}: the colluders' state of {shard} was committed",
                commit.round
            );
            let accepted: BTreeSet<ContentHash> = commit
                .accepted
                .iter()
                .filter(|a| a.shard == shard)
                .flat_map(|a| a.deltas.iter().copied())
                .collect();
            let late = commit
                .rejected
                .iter()
                .any(|r| r.shard == shard && r.reason == RejectCode::Late);
            let mut poison_here = Vec::new();
            for d in &part.deltas {
                let Some((sender, _, _)) = poisoned.get(&d.payload_hash) else {
                    continue;
                };
                assert!(
                    !accepted.contains(&d.payload_hash),
                    "round {}: a poisoned delta to {shard} was accepted",
                    commit.round
                );
                poison_here.push(d.payload_hash);
                if bad.iter().any(|k| k != sender && judges.contains(k)) {
                    t.poison_judged_by_accomplice += 1;
                }
            }
            if late {
                // Held: nothing of the shard was taken, its state is the base's.
                assert!(accepted.is_empty(), "round {}: {shard}", commit.round);
                if honest_quorum {
                    eprintln!(
                        "round {}: {shard} held though its honest judges were a quorum",
                        commit.round
                    );
                    t.held_though_honest_quorum += 1;
                } else {
                    eprintln!(
                        "round {}: {shard} held: colluding holders {}, colluding verifiers {}, judges {}",
                        commit.round,
                        colluding
                            .iter()
                            .filter(|k| judges.holders.contains(k))
                            .count(),
                        colluding
                            .iter()
                            .filter(|k| judges.verifiers.contains(k))
                            .count(),
                        judges.len()
                    );
                    t.held += 1;
                    if colluding.len() == 2 && colluding.iter().all(|k| judges.holders.contains(k))
                    {
                        t.held_by_two_holders += 1;
                    }
                }
                continue;
            }
            // Taken: only the honest judges can be its quorum.
            assert!(
                honest_quorum,
                "round {}: {shard} committed without an honest quorum",
                commit.round
            );
            t.carried += 1;
            if colluding.len() == 2 {
                t.carried_against_two += 1;
            }
            if base_entries
                .as_ref()
                .is_some_and(|b| escalated(b, commit.round, &shard))
            {
                t.carried_escalated += 1;
            }
            // The flipped trunk scores low; the scaled expert is over its bound (or all zeros, when no token
            // of the poisoner's batches reached it).
            let reasons: &[RejectCode] = if shard == ShardId::Trunk {
                &[RejectCode::LowScore]
            } else {
                &[RejectCode::NormTooLarge, RejectCode::NormTooSmall]
            };
            for h in &poison_here {
                let refused = commit.rejected.iter().find(|r| r.payload_hash == *h);
                assert!(
                    refused.is_some_and(|r| reasons.contains(&r.reason)),
                    "round {}: the poisoned delta to {shard} refused as {refused:?}, expected {reasons:?}",
                    commit.round
                );
                t.poison_refused += 1;
            }
            // Each colluder that judged it signed what the quorum did not: a dissenter on record.
            let dissent = commit.dissent.iter().find(|d| d.shard == shard);
            for k in &colluding {
                let signed = log.signed.contains_key(&(commit.round, **k));
                assert!(
                    !signed || dissent.is_some_and(|d| d.dissenters.contains(k)),
                    "round {}: {shard}: a colluder's judgment not on record: {dissent:?}",
                    commit.round
                );
            }
        }
        base = Some(commit.checkpoint.clone());
        // Colluders outvoted on an expert they held lose it: the next round gives it to an honest member with
        // room (the third honest one always has), and never to both of them again.
        if let Some(next) = announcements.iter().find(|a| a.round == commit.round + 1) {
            for d in commit.dissent.iter().filter(|d| d.shard != ShardId::Trunk) {
                let outvoted: Vec<&PublicKey> = d
                    .dissenters
                    .iter()
                    .filter(|k| bad.contains(k))
                    .filter(|k| {
                        ann.participant(k)
                            .is_some_and(|p| p.shards.contains(&d.shard))
                    })
                    .collect();
                if outvoted.is_empty() {
                    continue;
                }
                t.outvoted_holders += outvoted.len();
                let holders: Vec<PublicKey> = next
                    .participants
                    .iter()
                    .filter(|p| p.shards.contains(&d.shard))
                    .map(|p| p.node)
                    .collect();
                assert!(
                    holders.iter().any(|k| !bad.contains(k))
                        && holders.iter().filter(|k| bad.contains(k)).count() < 2,
                    "round {}: {} after its colluding holders were outvoted: {holders:?}",
                    next.round,
                    d.shard
                );
                for k in &outvoted {
                    if !holders.contains(k) {
                        t.lost_by_outvoted += 1;
                    }
                }
            }
        }
    }
    eprintln!(
        "collusion over {ROUNDS} rounds: {t:?}; signed {:?}",
        log.signed
    );
    for m in &lines {
        eprintln!(
            "round {}: val {:?} accepted {} rejected {} {:?}",
            m.round, m.val_loss, m.accepted, m.rejected, m.rejected_reasons
        );
    }
    assert!(t.carried_against_two > 0, "{t:?}");
    assert!(
        t.held_by_two_holders > 0,
        "no expert held by both colluders was held: {t:?}"
    );
    assert!(t.lost_by_outvoted > 0, "{t:?}");
    assert!(
        t.held > 0,
        "the colluders never split a shard's judges: {t:?}"
    );
    assert!(
        t.carried_escalated > 0,
        "no escalated shard was carried: {t:?}"
    );
    assert!(t.poison_refused > 0, "{t:?}");
    assert!(t.poison_judged_by_accomplice > 0, "{t:?}");
    assert!(
        t.held_though_honest_quorum <= 2,
        "honest quorums lost to slowness: {t:?}"
    );
    // The colluders' dissent cost them standing.
    let status = net.coordinator.status().await.expect("coordinator status");
    for k in &bad {
        let record = status
            .coordinator
            .as_ref()
            .and_then(|c| {
                c.standings
                    .iter()
                    .find(|m| m.node == hex::encode(k.0))
                    .cloned()
            })
            .expect("the colluder's record");
        eprintln!("colluder {k}: {record:?}");
        assert!(record.faults >= 1, "collusion cost {k} nothing: {record:?}");
    }
    let val: Vec<f32> = lines
        .iter()
        .map(|m| m.val_loss.expect("val loss"))
        .collect();
    assert!(
        val[val.len() - 1] < val[0],
        "validation loss did not fall: {val:?}"
    );
    // Every honest holder recomputed every committed shard it holds and found the commit's hash.
    for s in net.statuses().await {
        let t = training(&s);
        assert_eq!(t.hash_mismatches, 0, "{:?}", t.refused_commit);
        assert!(t.refused_commit.is_none(), "{:?}", t.refused_commit);
    }
    let _ = net.stop_tx.send(true);
    for (node, task) in colluders {
        task.await.expect("colluder task");
        Arc::into_inner(node)
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
    }
    net.stop().await;
}
