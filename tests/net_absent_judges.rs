//! Churn while the judges work (#16 §3), on a real loopback network with the real roles: a bootstrap, the
//! coordinator (`run_conductor`), an evaluator, four honest trainers (`run_trainer`) and a silent member. The
//! silent member trains and sends honest deltas every round but never judges: a verifier (or holder) that
//! never answers. In round 2, once the call for judgments is out (every delta is in), one honest trainer is
//! killed: a holder that dies after training and before attesting.
//!
//! What must hold: every round commits; each shard the dead or silent judge was drawn for takes the result
//! of the judges that answered where they are a quorum (the missing judge named `absent` in the commit), and
//! otherwise holds; the next rounds go on without the dead trainer (its experts move to the living); every
//! honest holder agrees with every commit, and the validation loss falls.

mod net_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mana_engine::coordinator::judges_of;
use mana_engine::round::RunSpec;
use mana_kernels::data::TextDataset;
use mana_node::daemon::NodeHandle;
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_protocol::{
    AggregationCall, DeltaEncoder, Message, PublicKey, RejectCode, RoundAnnouncement, RoundCommit,
    ShardId, UpdateRule,
};
use net_support::*;
use tokio::sync::{broadcast, watch};

const HONEST: usize = 4;
const ROUNDS: u64 = 4;
/// The round whose call the killed trainer dies at.
const KILL_ROUND: u64 = 2;

/// The silent member's loop: every round it takes part in, it trains honestly from the round's base and
/// sends its deltas; it never answers a call. The rounds it sent deltas in go into `sent`.
async fn run_silent(
    node: Arc<NodeHandle>,
    spec: RunSpec,
    data: Arc<TextDataset>,
    sent: Arc<Mutex<BTreeSet<u64>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rx = node.accepted();
    let me = node.public_key();
    let mut encoders: BTreeMap<ShardId, DeltaEncoder> = BTreeMap::new();
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = rx.recv() => m,
        };
        let ann = match message {
            Ok(m) => match m.message {
                Message::RoundAnnouncement(ann) => ann,
                _ => continue,
            },
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(part) = ann.participant(&me).cloned() else {
            continue;
        };
        let Some((_, local)) = honest_local_round(&node, &ann, &part, &spec, &data).await else {
            continue;
        };
        if !publish_deltas(&node, &ann, &local, &mut encoders, |_| None)
            .await
            .is_empty()
        {
            sent.lock().expect("lock").insert(ann.round);
        }
    }
}

/// How the shards a missing judge was drawn for came out.
#[derive(Debug, Default)]
struct Missing {
    /// Shards taken by the judges that answered, the missing one named absent.
    carried: usize,
    /// Shards held: the judges that answered were no quorum.
    held: usize,
}

/// Checks, for every shard of `call` that `judge` was drawn for and did not attest, that `commit` took the
/// result of the others with `judge` named absent, or held the shard for want of a quorum among them.
fn check_missing_judge(
    ann: &RoundAnnouncement,
    call: &AggregationCall,
    commit: &RoundCommit,
    judge: &PublicKey,
    answered: &BTreeSet<PublicKey>,
    tally: &mut Missing,
) {
    for part in &call.shards {
        let judges = judges_of(ann, part);
        if !judges.contains(judge) {
            continue;
        }
        let late = commit
            .rejected
            .iter()
            .any(|r| r.shard == part.shard && r.reason == RejectCode::Late);
        if late {
            // Held: those that answered were short of a quorum (with a verifier among them when drawn).
            let answering: Vec<&PublicKey> = judges
                .holders
                .iter()
                .chain(&judges.verifiers)
                .filter(|k| answered.contains(k))
                .collect();
            let verifier = judges.verifiers.is_empty()
                || answering.iter().any(|k| judges.verifiers.contains(k));
            eprintln!(
                "round {}: {} held: {} of {} judges answered",
                commit.round,
                part.shard,
                answering.len(),
                judges.len()
            );
            assert!(
                answering.len() < judges.quorum() || !verifier,
                "round {}: {} held though its answering judges were a quorum",
                commit.round,
                part.shard
            );
            tally.held += 1;
            continue;
        }
        let dissent = commit.dissent.iter().find(|d| d.shard == part.shard);
        assert!(
            dissent.is_some_and(|d| d.absent.contains(judge)),
            "round {}: {} taken without naming its missing judge absent: {dissent:?}",
            commit.round,
            part.shard
        );
        tally.carried += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_that_dies_before_attesting_and_one_that_never_answers_leave_the_round_to_the_others()
 {
    let mut net = RoundNet::start(HONEST).await;
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
    let sent = Arc::new(Mutex::new(BTreeSet::new()));
    let silent =
        Arc::new(start_node(member_config(net.dir.path(), &net.boot, "silent", key)).await);
    let silent_key = silent.public_key();
    let silent_task = tokio::spawn(run_silent(
        silent.clone(),
        net.spec.clone(),
        net.data.clone(),
        sent.clone(),
        net.stop_rx.clone(),
    ));

    let metrics = net.dir.path().join("metrics.jsonl");
    let run = net.coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &net.spec, UpdateRule::Sync, 2).expect("machine config");
    // Every member in round 1; the rounds after the kill go on with the four left.
    machine.min_members = HONEST;
    machine.train_ms = 30_000;
    machine.verify_ms = 12_000;
    machine.cooldown_ms = 200;
    machine.member_timeout_ms = 6_000;
    let mut role = ConductorConfig::new(machine, net.spec.clone(), net.data.clone());
    role.rounds = Some(ROUNDS);
    role.metrics = Some(metrics.clone());
    let coordinating = tokio::spawn(run_conductor(
        net.coordinator.clone(),
        role,
        stopped(net.stop_rx.clone()),
    ));

    // The kill: the last trainer, the moment round 2's call is out (its deltas are in; its judging has begun).
    let call = wait_for(Duration::from_secs(180), "round 2's call", || {
        let heard = heard.clone();
        async move {
            heard
                .find(|m| match &m.message {
                    Message::AggregationCall(c) if c.round == KILL_ROUND => Some(c.clone()),
                    _ => None,
                })
                .pop()
        }
    })
    .await;
    let (victim, task) = net.trainers.pop().expect("a trainer");
    let dead = victim.public_key();
    task.abort();
    let _ = task.await;
    Arc::into_inner(victim)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
    eprintln!("killed {dead} at round {KILL_ROUND}'s call");

    let RoundsHeard {
        lines,
        commits,
        announcements,
        calls,
    } = rounds_heard(
        coordinating,
        Duration::from_secs(120 + 60 * ROUNDS),
        &metrics,
        &heard,
        ROUNDS,
    )
    .await;
    let ann_of = |round: u64| {
        announcements
            .iter()
            .find(|a| a.round == round)
            .expect("the round's announcement")
    };
    // Who answered each call (the attestations node 0 heard, its own included).
    let answered = |call: &AggregationCall| -> BTreeSet<PublicKey> {
        let id = call.hash().expect("call id");
        heard
            .find(|m| match &m.message {
                Message::ShardAttestation(a) if a.call == id => Some(m.signer),
                _ => None,
            })
            .into_iter()
            .collect()
    };

    // Round 2: the dead trainer had sent its deltas and was a judge; it never attested.
    let kill_ann = ann_of(KILL_ROUND);
    let dead_index = kill_ann
        .participants
        .iter()
        .position(|p| p.node == dead)
        .expect("the killed trainer took part in round 2") as u32;
    assert!(
        call.shards
            .iter()
            .any(|p| p.deltas.iter().any(|d| d.sender == dead_index)),
        "the killed trainer's deltas were called"
    );
    let kill_answered = answered(&call);
    assert!(
        !kill_answered.contains(&dead),
        "the killed trainer attested before it died"
    );
    let kill_commit = commits
        .iter()
        .find(|c| c.round == KILL_ROUND)
        .expect("round 2 committed");
    let mut dead_tally = Missing::default();
    check_missing_judge(
        kill_ann,
        &call,
        kill_commit,
        &dead,
        &kill_answered,
        &mut dead_tally,
    );
    // The silent member, in every round it sent deltas in.
    let mut silent_tally = Missing::default();
    for commit in &commits {
        let Some(call) = calls.iter().find(|c| c.round == commit.round) else {
            continue;
        };
        let ann = ann_of(commit.round);
        if !sent.lock().expect("lock").contains(&commit.round)
            || ann.participant(&silent_key).is_none()
        {
            continue;
        }
        let answered = answered(call);
        assert!(!answered.contains(&silent_key));
        check_missing_judge(ann, call, commit, &silent_key, &answered, &mut silent_tally);
    }
    eprintln!("the killed trainer's shards: {dead_tally:?}; the silent member's: {silent_tally:?}");
    for m in &lines {
        eprintln!(
            "round {}: val {:?} accepted {} rejected {} {:?}",
            m.round, m.val_loss, m.accepted, m.rejected, m.rejected_reasons
        );
    }
    assert!(
        dead_tally.carried > 0,
        "no shard the killed trainer judged was carried by the others: {dead_tally:?}"
    );
    assert!(
        silent_tally.carried > 0,
        "no shard the silent member judged was carried by the others: {silent_tally:?}"
    );
    // The run went on without the dead trainer: it is in no later round than the one after its death (it is
    // dropped from that one for its missing deltas, if it was still a member when it opened).
    let last = ann_of(ROUNDS);
    assert!(
        last.participant(&dead).is_none(),
        "the dead trainer is still assigned work"
    );
    for commit in commits.iter().filter(|c| c.round > KILL_ROUND) {
        let took = commit
            .accepted
            .iter()
            .map(|a| a.deltas.len())
            .sum::<usize>();
        assert!(took > 0, "round {}: nothing accepted", commit.round);
    }
    let val: Vec<f32> = lines
        .iter()
        .map(|m| m.val_loss.expect("val loss"))
        .collect();
    assert!(
        val[val.len() - 1] < val[0],
        "validation loss did not fall: {val:?}"
    );
    for s in net.statuses().await {
        let t = training(&s);
        assert_eq!(t.hash_mismatches, 0, "{:?}", t.refused_commit);
        assert!(t.refused_commit.is_none(), "{:?}", t.refused_commit);
    }
    let _ = net.stop_tx.send(true);
    silent_task.await.expect("silent task");
    Arc::into_inner(silent)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
    net.stop().await;
}
