//! Replays of the coordinator with explicit times and seeds.

use super::*;
use mana_protocol::{
    Capacity, CodecOptions, DeviceKind, HyperParams, Message, RunId, Text, TrainingStats,
    UpdateRule,
};

fn key(i: u8) -> PublicKey {
    PublicKey([i; 32])
}

/// An address of its own for each key (the first 16 bytes as an IPv6 address), so the per-IP cap stays out
/// of the tests that are not about it.
fn own_ip(node: &PublicKey) -> Origin {
    let mut b = [0u8; 16];
    b.copy_from_slice(&node.0[..16]);
    Origin::Ip(std::net::IpAddr::from(b))
}

/// `10.0.0.<i>`.
fn ip(i: u8) -> Origin {
    Origin::Ip(std::net::IpAddr::from([10, 0, 0, i]))
}

/// `127.0.0.1`.
fn loopback() -> Origin {
    Origin::Ip(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// A coordinator of an open run with at most `per_ip` members per address.
fn capped_per_ip(per_ip: usize) -> Coordinator {
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.standing.max_members_per_ip = per_ip;
    Coordinator::new(cfg, base_manifest()).unwrap()
}

fn run() -> RunId {
    RunId::new("test-run").unwrap()
}

fn hyper() -> HyperParams {
    HyperParams {
        update_rule: UpdateRule::Diloco,
        inner_lr: 1e-3,
        weight_decay: 0.1,
        outer_lr: 0.7,
        outer_momentum: 0.9,
        batch_tokens: 1024,
        seq_len: 128,
        codec: CodecOptions::default(),
        router_bias_gamma: 0.001,
    }
}

fn experts() -> Vec<ShardId> {
    (0..2u16)
        .flat_map(|l| (0..4u16).map(move |i| ShardId::Expert { layer: l, index: i }))
        .collect()
}

fn base_manifest() -> CheckpointManifest {
    let mut shards = vec![ShardEntry {
        shard: ShardId::Trunk,
        hash: ContentHash::of(b"trunk"),
        size: 5,
        round: 0,
    }];
    for e in experts() {
        shards.push(ShardEntry {
            shard: e,
            hash: ContentHash::of(e.to_string().as_bytes()),
            size: 9,
            round: 0,
        });
    }
    shards.sort_by_key(|e| e.shard);
    CheckpointManifest {
        run: run(),
        round: 0,
        shards,
    }
}

fn coordinator() -> Coordinator {
    coordinator_with(10_000)
}

fn coordinator_with(member_timeout_ms: u64) -> Coordinator {
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.min_members = 3;
    cfg.train_ms = 1_000;
    cfg.verify_ms = 1_000;
    cfg.cooldown_ms = 100;
    cfg.member_timeout_ms = member_timeout_ms;
    Coordinator::new(cfg, base_manifest()).unwrap()
}

fn heartbeat(seq: u64, tps: f32) -> Heartbeat {
    Heartbeat {
        run: run(),
        seq,
        hosted: vec![],
        capacity: Capacity {
            device: DeviceKind::Cpu,
            memory_bytes: 1 << 30,
            tokens_per_second: tps,
            max_shards: 64,
        },
        software_version: Text::new("test").unwrap(),
    }
}

fn delta(ann: &RoundAnnouncement, shard: ShardId, node: PublicKey) -> DeltaAnnouncement {
    let mut tag = node.0.to_vec();
    tag.extend_from_slice(shard.to_string().as_bytes());
    tag.extend_from_slice(&ann.round.to_le_bytes());
    DeltaAnnouncement {
        run: run(),
        round: ann.round,
        shard,
        base_checkpoint: ann.base_checkpoint,
        payload_hash: ContentHash::of(&tag),
        payload_size: 100,
        stats: TrainingStats {
            tokens: 10,
            loss_before: 2.0,
            loss_after: 1.9,
            delta_norm: 0.1,
        },
    }
}

fn announced(actions: &[Action]) -> RoundAnnouncement {
    match actions {
        [Action::AnnounceRound(a)] => a.clone(),
        other => panic!("expected one announcement, got {other:?}"),
    }
}

/// Joins nodes 1..=n at t=0 (node i declaring 100·i tokens/s) and returns their keys.
fn join(c: &mut Coordinator, n: u8) -> Vec<PublicKey> {
    for i in 1..=n {
        c.node_heartbeat(
            0,
            key(i),
            own_ip(&key(i)),
            &heartbeat(1, 100.0 * f32::from(i)),
        )
        .unwrap();
    }
    (1..=n).map(key).collect()
}

/// Joins nodes 1..=n at t=0 and returns the announcement of round 1.
fn start(c: &mut Coordinator, n: u8) -> RoundAnnouncement {
    join(c, n);
    announced(&c.tick(0, 11).unwrap())
}

/// Sends every assigned delta of `nodes`.
fn send_all(c: &mut Coordinator, ann: &RoundAnnouncement, nodes: &[PublicKey], now: u64) {
    for p in ann.participants.iter().filter(|p| nodes.contains(&p.node)) {
        for s in &p.shards {
            c.delta_announced(now, p.node, delta(ann, *s, p.node))
                .unwrap();
        }
    }
}

#[test]
fn waits_for_members_then_announces_a_covering_round() {
    let mut c = coordinator();
    let _ = c.node_heartbeat(0, key(1), own_ip(&key(1)), &heartbeat(1, 100.0));
    let _ = c.node_heartbeat(0, key(2), own_ip(&key(2)), &heartbeat(1, 100.0));
    assert!(c.tick(0, 1).unwrap().is_empty());
    assert_eq!(c.state().name(), "waiting-for-members");
    let _ = c.node_heartbeat(5, key(3), own_ip(&key(3)), &heartbeat(1, 100.0));
    let ann = announced(&c.tick(5, 1).unwrap());
    assert_eq!(ann.round, 1);
    assert_eq!(ann.base_checkpoint, base_manifest().hash().unwrap());
    assert_eq!(
        ann.deadlines,
        Deadlines {
            deltas_by_ms: 1_005,
            commit_by_ms: 2_005
        }
    );
    for e in experts() {
        let hosts = ann
            .participants
            .iter()
            .filter(|p| p.shards.contains(&e))
            .count();
        assert_eq!(hosts, 2, "{e}");
    }
    assert!(
        ann.participants
            .iter()
            .all(|p| p.shards.contains(&ShardId::Trunk) && p.data_seeds.len() == 1)
    );
    // The announcement is a valid protocol message.
    Message::RoundAnnouncement(ann).check_limits().unwrap();
}

/// The call in `actions`, which must be exactly one call for judgments.
fn called(actions: &[Action]) -> AggregationCall {
    match actions {
        [Action::CallAggregation(call)] => call.clone(),
        other => panic!("expected one call for judgments, got {other:?}"),
    }
}

/// The commit in `actions`, which must end with one.
fn committed(actions: &[Action]) -> RoundCommit {
    match actions.last() {
        Some(Action::CommitRound(commit)) => commit.clone(),
        _ => panic!("expected a commit, got {actions:?}"),
    }
}

/// The key of the sender of `d` (the call names senders by their index in the announcement).
fn sender_of(ann: &RoundAnnouncement, d: &CalledDelta) -> PublicKey {
    ann.participants[d.sender as usize].node
}

/// The norm the judges of these tests measure on `d`: made from its payload hash, so that a norm found in a
/// commit or in a later call's history points back to the one delta it was measured on (a norm moved to
/// another delta, shard or sender shows).
fn norm_of(d: &CalledDelta) -> f32 {
    1.0 + f32::from(d.payload_hash.0[0]) / 64.0 + f32::from(d.payload_hash.0[1]) / 16_384.0
}

/// The verdict of a judge that accepts `d`: its norm, as every honest judge measures it.
fn accept(d: &CalledDelta) -> DeltaVerdict {
    DeltaVerdict::Accept { norm: norm_of(d) }
}

/// The new entry a judge signs for `shard` in round `round`, named by `what`: judges that computed the same
/// state sign the same `what`.
fn entry_in(round: u64, shard: ShardId, what: &str) -> ShardEntry {
    ShardEntry {
        shard,
        hash: ContentHash::of(what.as_bytes()),
        // The base's sizes (a shard's size is fixed by the run's layout).
        size: if shard == ShardId::Trunk { 5 } else { 9 },
        round,
    }
}

/// A score for each delta of `part`, in the call's order (each a little better than a zero delta), as a judge
/// publishes them for the commit.
fn scores_of(part: &ShardCall) -> Vec<DeltaScore> {
    part.deltas
        .iter()
        .enumerate()
        .map(|(i, d)| DeltaScore {
            shard: part.shard,
            payload_hash: d.payload_hash,
            in_mean: part.deltas.len() as u32,
            null_loss: 5.0,
            loss: 5.0 - i as f32 / 100.0,
        })
        .collect()
}

/// What a judge of `part` signs in round `round`: the entry named `what`, `verdict(d)` for each delta in the
/// call's order (one per delta, as the coordinator requires) and a score for each.
fn judged(
    part: &ShardCall,
    round: u64,
    what: &str,
    verdict: impl Fn(&CalledDelta) -> DeltaVerdict,
) -> ShardJudgment {
    ShardJudgment {
        entry: entry_in(round, part.shard, what),
        verdicts: part.deltas.iter().map(verdict).collect(),
        scores: scores_of(part),
    }
}

/// What an honest judge of `part` signs in round 1 when every delta passes: the entry named `what`.
fn judgment(part: &ShardCall, what: &str) -> ShardJudgment {
    judged(part, 1, what, accept)
}

/// Each judge of each shard of `call` for which `judge` has a judgment signs it (one attestation per judge
/// and shard); each result that reaches a quorum is taken at once, as the daemon does once it holds the blob.
fn attest_each(
    c: &mut Coordinator,
    call: &AggregationCall,
    judge: impl Fn(&ShardCall) -> Option<ShardJudgment>,
) {
    let ann = c.state().round().unwrap().announcement.clone();
    for part in &call.shards {
        let Some(judgment) = judge(part) else {
            continue;
        };
        let judges = judges_of(&ann, part);
        for k in judges.holders.iter().chain(&judges.verifiers) {
            c.shard_attested(call.round, *k, &signed(call, vec![judgment.clone()]))
                .unwrap();
        }
    }
}

/// Every judge of every shard of `call` signs `judge(part)`: every shard reaches its quorum and is taken.
fn attest_all(
    c: &mut Coordinator,
    call: &AggregationCall,
    judge: impl Fn(&ShardCall) -> ShardJudgment,
) {
    attest_each(c, call, |part| Some(judge(part)));
}

/// `call`'s attestation carrying `results`, as a judge signs it.
fn signed(call: &AggregationCall, results: Vec<ShardJudgment>) -> ShardAttestation {
    ShardAttestation {
        run: call.run.clone(),
        round: call.round,
        call: call.hash().unwrap(),
        results,
    }
}

/// The standing each participant of `call` should have after its first round, when the judges' verdicts
/// on its deltas were `verdict` and the shards `late` took no result: computed from the rules of
/// [`standing`] by hand, to compare with what the coordinator kept.
fn expected_standings(
    ann: &RoundAnnouncement,
    call: &AggregationCall,
    late: &[ShardId],
    verdict: impl Fn(&CalledDelta) -> DeltaVerdict,
) -> BTreeMap<PublicKey, Standing> {
    let policy = StandingPolicy::default();
    let mut want: BTreeMap<PublicKey, Standing> = BTreeMap::new();
    for part in call.shards.iter().filter(|p| !late.contains(&p.shard)) {
        for d in &part.deltas {
            let s = want.entry(sender_of(ann, d)).or_default();
            match verdict(d) {
                DeltaVerdict::Accept { .. } => {
                    s.accepted += 1;
                    s.reputation += 1;
                }
                DeltaVerdict::Refuse(code) => {
                    let cost = standing::refusal_cost(code, &policy);
                    if cost >= policy.fault_cost {
                        s.faults += 1;
                    } else if cost > 0 {
                        s.missed += 1;
                    }
                    s.reputation -= cost;
                }
            }
        }
    }
    want
}

#[test]
fn full_round_commits_and_round_trips_through_the_protocol() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &nodes, 10);
    let seed = c.state().round().unwrap().score_seed();
    // Every delta is in: the call for judgments comes at once, with every delta (none is judged yet).
    let call = called(&c.tick(20, 12).unwrap());
    assert_eq!(c.state().name(), "round-aggregate");
    assert_eq!(call.round, 1);
    Message::AggregationCall(call.clone())
        .check_limits()
        .unwrap();
    assert!(
        call.reveals_seed_of(&ann),
        "the call reveals the secret the announcement committed to"
    );
    assert_eq!(
        crate::round::call_score_seed(&call),
        seed,
        "a judge recomputes the score seed from the call"
    );
    assert_eq!(call.rule, c.config().verdict);
    assert!(call.norms.is_empty(), "no norm accepted yet");
    let sent: usize = ann.participants.iter().map(|p| p.shards.len()).sum();
    let in_call: usize = call.shards.iter().map(|p| p.deltas.len()).sum();
    assert_eq!(in_call, sent, "every delta is called");
    for part in &call.shards {
        assert!(
            part.deltas
                .windows(2)
                .all(|w| (w[0].payload_hash, w[0].sender) < (w[1].payload_hash, w[1].sender)),
            "application order is by payload hash, then sender"
        );
        for d in &part.deltas {
            let announced = delta(&ann, part.shard, sender_of(&ann, d));
            assert_eq!(
                (d.payload_hash, d.payload_size, d.weight),
                (announced.payload_hash, announced.payload_size, 1),
                "as its sender announced it, at a newcomer's weight"
            );
        }
    }
    // The judges refuse one delta (too large a norm) and accept the others.
    let bad = call.shards[0].deltas[0];
    let verdict = |d: &CalledDelta| {
        if *d == bad {
            DeltaVerdict::Refuse(RejectCode::NormTooLarge)
        } else {
            accept(d)
        }
    };
    attest_all(&mut c, &call, |part| {
        judged(part, 1, &format!("new {}", part.shard), verdict)
    });
    let commit = committed(&c.tick(40, 14).unwrap());
    assert_eq!(commit.round, 1);
    assert_eq!(
        crate::round::commit_score_seed(&commit),
        seed,
        "the score seed is recomputed from the commit"
    );
    assert!(
        commit.reveals_seed_of(&ann),
        "the commit reveals the secret the announcement committed to"
    );
    assert_eq!(commit.scores.len(), sent, "every score is published");
    assert!(
        commit
            .scores
            .windows(2)
            .all(|w| (w[0].shard, w[0].payload_hash) < (w[1].shard, w[1].payload_hash)),
        "scores sorted by shard and payload"
    );
    for a in &commit.accepted {
        assert_eq!(a.weights, vec![1; a.deltas.len()], "new members weigh 1");
        let part = call.shard(&a.shard).unwrap();
        let norms: Vec<f32> = part
            .deltas
            .iter()
            .filter(|d| **d != bad)
            .map(norm_of)
            .collect();
        assert_eq!(a.norms, norms, "the judges' norms, in the call's order");
    }
    assert_eq!(
        commit.rejected,
        vec![RejectedDelta {
            shard: call.shards[0].shard,
            node: sender_of(&ann, &bad),
            payload_hash: bad.payload_hash,
            reason: RejectCode::NormTooLarge,
        }]
    );
    assert_eq!(commit.checkpoint.round, 1);
    assert_eq!(commit.checkpoint.shards.len(), base_manifest().shards.len());
    assert!(
        commit.checkpoint.shards.iter().all(|e| e.round == 1),
        "every shard got deltas, so every shard changed"
    );
    // Round trip through the wire encoding: the commit is a valid message and the manifest decodes to itself.
    let msg = Message::RoundCommit(commit.clone());
    msg.check_limits().unwrap();
    assert_eq!(
        CheckpointManifest::from_bytes(&commit.checkpoint.to_bytes().unwrap()).unwrap(),
        commit.checkpoint
    );
    assert_eq!(c.checkpoint(), &commit.checkpoint);
    // Cooldown, then round 2 from the new checkpoint.
    assert_eq!(c.state().name(), "cooldown");
    assert!(c.tick(100, 15).unwrap().is_empty());
    for i in 1..=3 {
        let _ = c.node_heartbeat(140, key(i), own_ip(&key(i)), &heartbeat(2, 100.0));
    }
    let ann2 = announced(&c.tick(140, 16).unwrap());
    assert_eq!(ann2.round, 2);
    assert_eq!(ann2.base_checkpoint, commit.checkpoint.hash().unwrap());
}

#[test]
fn nodes_missing_the_deadline_are_dropped_and_the_round_completes() {
    let mut c = coordinator();
    let ann = start(&mut c, 4);
    let late_p = ann
        .participants
        .iter()
        .max_by_key(|p| p.shards.len())
        .unwrap()
        .clone();
    assert!(late_p.shards.len() >= 2);
    let late = late_p.node;
    let on_time: Vec<PublicKey> = ann
        .participants
        .iter()
        .map(|p| p.node)
        .filter(|n| *n != late)
        .collect();
    send_all(&mut c, &ann, &on_time, 10);
    // The late node sends only part of its work before the deadline.
    let first = late_p.shards[0];
    c.delta_announced(10, late, delta(&ann, first, late))
        .unwrap();
    assert!(
        c.tick(500, 1).unwrap().is_empty(),
        "waits for the missing deltas until the deadline"
    );
    let call = called(&c.tick(1_001, 1).unwrap());
    let late_index = ann
        .participants
        .iter()
        .position(|p| p.node == late)
        .unwrap() as u32;
    assert!(
        call.shards
            .iter()
            .all(|p| p.deltas.iter().all(|d| d.sender != late_index)),
        "the late node's partial work is not called"
    );
    assert!(
        call.shards
            .iter()
            .all(|p| !judges_of(&ann, p).contains(&late)),
        "nor does the late node judge"
    );
    let r = c.state().round().unwrap();
    assert!(r.dropped.contains(&late));
    // Its late delta is refused.
    let rest = late_p.shards[1];
    assert_eq!(
        c.delta_announced(1_002, late, delta(&ann, rest, late)),
        Err(EventError::Refused(RejectCode::StaleRound))
    );
    // No judge answers: at the commit deadline every delta is listed as late and the round still commits.
    assert!(
        c.tick(2_000, 1).unwrap().is_empty(),
        "waits until the deadline"
    );
    let commit = committed(&c.tick(2_006, 1).unwrap());
    assert!(commit.accepted.is_empty());
    let called_deltas: usize = call.shards.iter().map(|p| p.deltas.len()).sum();
    assert_eq!(commit.rejected.len(), called_deltas);
    assert!(
        commit
            .rejected
            .iter()
            .all(|d| d.reason == RejectCode::Late && d.node != late)
    );
    assert_eq!(c.state().name(), "cooldown");
    assert_eq!(
        c.checkpoint().shards,
        base_manifest().shards,
        "nothing applied, every shard unchanged"
    );
    // Late is the round's fault, not the senders': only the dropped node's record moves.
    for n in &on_time {
        assert_eq!(c.standings().get(n), Standing::default(), "{n}");
    }
    assert_eq!(c.standings().get(&late).missed, 1);
}
#[test]
fn refuses_deltas_that_do_not_fit_the_round() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let p = &ann.participants[0];
    let not_mine = experts()
        .into_iter()
        .find(|e| !p.shards.contains(e))
        .unwrap();
    let mut d = delta(&ann, p.shards[0], p.node);
    assert_eq!(
        c.delta_announced(1, key(99), d.clone()),
        Err(EventError::Refused(RejectCode::NotParticipant))
    );
    assert_eq!(
        c.delta_announced(1, p.node, delta(&ann, not_mine, p.node)),
        Err(EventError::Refused(RejectCode::ShardNotAssigned))
    );
    d.base_checkpoint = ContentHash::of(b"other");
    assert_eq!(
        c.delta_announced(1, p.node, d),
        Err(EventError::Refused(RejectCode::WrongBase))
    );
    let good = delta(&ann, p.shards[0], p.node);
    assert_eq!(
        c.delta_announced(2_000, p.node, good.clone()),
        Err(EventError::Refused(RejectCode::Late))
    );
    c.delta_announced(1, p.node, good.clone()).unwrap();
    assert_eq!(
        c.delta_announced(1, p.node, good),
        Err(EventError::Refused(RejectCode::Inconsistent))
    );
}

#[test]
fn experts_of_departed_nodes_are_reassigned_next_round() {
    let mut c = coordinator_with(500);
    let ann = start(&mut c, 4);
    // Find an expert and make both its hosts leave mid-round (one says goodbye, one times out).
    let e = experts()[0];
    let hosts: Vec<PublicKey> = ann
        .participants
        .iter()
        .filter(|p| p.shards.contains(&e))
        .map(|p| p.node)
        .collect();
    assert_eq!(hosts.len(), 2);
    c.node_left(&hosts[0]);
    let stay: Vec<PublicKey> = ann
        .participants
        .iter()
        .map(|p| p.node)
        .filter(|n| !hosts.contains(n))
        .collect();
    send_all(&mut c, &ann, &stay, 10);
    for n in &stay {
        let _ = c.node_heartbeat(600, *n, own_ip(n), &heartbeat(2, 100.0));
    }
    // At 600 the second host has been silent > 500 ms: it leaves, and since everyone still in the round has
    // delivered, the call for judgments goes out before the delta deadline.
    let call = called(&c.tick(600, 2).unwrap());
    assert_eq!(c.members().len(), 2);
    assert!(c.state().round().unwrap().dropped.contains(&hosts[1]));
    let RunState::RoundAggregate(r) = c.state().clone() else {
        panic!("{:?}", c.state())
    };
    assert!(r.deltas.keys().all(|(_, n)| stay.contains(n)));
    assert!(
        call.shard(&e).is_none(),
        "nobody delivered for the orphaned expert"
    );
    // No judge answers: at the commit deadline every delta is listed as late.
    let commit = committed(&c.tick(2_001, 3).unwrap());
    assert!(commit.accepted.is_empty() && !commit.rejected.is_empty());
    assert!(commit.rejected.iter().all(|d| d.reason == RejectCode::Late));
    // Two newcomers join; round 2 gives the orphaned expert two live hosts.
    for n in [key(50), key(51)].iter().chain(&stay) {
        let _ = c.node_heartbeat(2_200, *n, own_ip(n), &heartbeat(3, 100.0));
    }
    let ann2 = announced(&c.tick(2_200, 4).unwrap());
    let new_hosts: Vec<PublicKey> = ann2
        .participants
        .iter()
        .filter(|p| p.shards.contains(&e))
        .map(|p| p.node)
        .collect();
    assert_eq!(new_hosts.len(), 2);
    assert!(new_hosts.iter().all(|n| !hosts.contains(n)));
}

#[test]
fn resumes_from_serialized_state_and_behaves_identically() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &nodes[..2], 10);
    let saved = c.to_bytes().unwrap();
    let mut restored = Coordinator::from_bytes(&saved).unwrap();
    assert_eq!(restored, c);
    // Both continue the same way.
    send_all(&mut c, &ann, &nodes[2..], 20);
    send_all(&mut restored, &ann, &nodes[2..], 20);
    assert_eq!(c.tick(30, 5).unwrap(), restored.tick(30, 5).unwrap());
    assert_eq!(c, restored);
    // Mid-judging, with some judgments signed (their verdicts and norms included), a restored coordinator
    // is the same and takes the rest of the judgments the same way.
    let call = called_call(&c);
    let part = an_expert(&call).clone();
    let j = judges_of(&ann, &part);
    let first = signed(&call, vec![judgment(&part, "honest")]);
    for d in [&mut c, &mut restored] {
        assert_eq!(d.shard_attested(1, j.holders[0], &first), Ok(vec![]));
    }
    let mut restored = Coordinator::from_bytes(&c.to_bytes().unwrap()).unwrap();
    assert_eq!(restored, c);
    for d in [&mut c, &mut restored] {
        attest_all(d, &call, |p| judgment(p, &format!("new {}", p.shard)));
    }
    assert_eq!(c.tick(40, 6).unwrap(), restored.tick(40, 6).unwrap());
    assert_eq!(c, restored);
    // Corrupted or truncated state is an error, not a panic.
    assert!(Coordinator::from_bytes(&saved[..saved.len() / 2]).is_err());
    assert!(Coordinator::from_bytes(&[0xff; 16]).is_err());
    let mut extra = saved.clone();
    extra.push(0);
    assert!(Coordinator::from_bytes(&extra).is_err());
}

/// The call of the round `c` is judging (as kept in its state: a restored coordinator still has it).
fn called_call(c: &Coordinator) -> AggregationCall {
    c.state()
        .round()
        .unwrap()
        .call
        .as_ref()
        .unwrap()
        .call
        .clone()
}
#[test]
fn same_events_same_seed_same_announcement() {
    let (mut a, mut b) = (coordinator(), coordinator());
    assert_eq!(start(&mut a, 5), start(&mut b, 5));
    let mut c = coordinator();
    for i in (1..=5).rev() {
        let _ = c.node_heartbeat(
            0,
            key(i),
            own_ip(&key(i)),
            &heartbeat(1, 100.0 * f32::from(i)),
        );
    }
    assert_eq!(
        announced(&c.tick(0, 11).unwrap()),
        start(&mut coordinator(), 5),
        "join order does not matter"
    );
}

#[test]
fn stale_heartbeats_and_other_runs_are_ignored() {
    let mut c = coordinator();
    let _ = c.node_heartbeat(0, key(1), own_ip(&key(1)), &heartbeat(5, 100.0));
    let _ = c.node_heartbeat(100, key(1), own_ip(&key(1)), &heartbeat(4, 999.0));
    assert_eq!(c.members()[&key(1)].last_seen_ms, 0);
    let mut other = heartbeat(9, 1.0);
    other.run = RunId::new("other").unwrap();
    let _ = c.node_heartbeat(0, key(2), own_ip(&key(2)), &other);
    assert_eq!(c.members().len(), 1);
}

#[test]
fn bad_configs_are_refused() {
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.min_members = 1;
    assert!(Coordinator::new(cfg.clone(), base_manifest()).is_err());
    cfg.min_members = 2;
    cfg.experts.push(ShardId::Trunk);
    assert!(Coordinator::new(cfg.clone(), base_manifest()).is_err());
    cfg.experts.pop();
    cfg.hyper.outer_momentum = 1.0;
    assert!(Coordinator::new(cfg, base_manifest()).is_err());
}

/// A round where one participant sent another's payload as its own.
struct Copied {
    ann: RoundAnnouncement,
    /// Whose trunk payload it is.
    victim: PublicKey,
    /// Who announced it as its own trunk delta too.
    thief: PublicKey,
    /// The victim's trunk delta.
    stolen: DeltaAnnouncement,
    /// The round's call for judgments.
    call: AggregationCall,
}

/// Round 1 of 3 members where the thief announces the victim's trunk payload as its own trunk delta (before
/// the victim does) and everyone else sends their own work, up to the call. With `thief_first`, the thief is
/// the first participant and the victim the second (the thief's copy comes first in the call, which orders
/// one payload's deltas by sender), otherwise the other way round.
fn round_with_a_copy(c: &mut Coordinator, thief_first: bool) -> Copied {
    let ann = start(c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    let (victim, thief) = if thief_first {
        (nodes[1], nodes[0])
    } else {
        (nodes[0], nodes[1])
    };
    let stolen = delta(&ann, ShardId::Trunk, victim);
    c.delta_announced(10, thief, stolen.clone()).unwrap();
    for p in &ann.participants {
        for s in &p.shards {
            if (p.node, *s) != (thief, ShardId::Trunk) {
                c.delta_announced(10, p.node, delta(&ann, *s, p.node))
                    .unwrap();
            }
        }
    }
    let call = called(&c.tick(20, 1).unwrap());
    Copied {
        ann,
        victim,
        thief,
        stolen,
        call,
    }
}

#[test]
fn a_copied_payload_hash_never_changes_the_verdict_on_the_original() {
    // The thief's copy comes before the original in the call, then after it (the call orders a payload's
    // deltas by sender): a verdict is the delta's own wherever it stands.
    for thief_first in [true, false] {
        let mut c = coordinator();
        let Copied {
            ann,
            victim,
            thief,
            stolen,
            call,
        } = round_with_a_copy(&mut c, thief_first);
        let trunk = call.shard(&ShardId::Trunk).unwrap();
        let copies: Vec<PublicKey> = trunk
            .deltas
            .iter()
            .filter(|d| d.payload_hash == stolen.payload_hash)
            .map(|d| sender_of(&ann, d))
            .collect();
        let mut both = vec![victim, thief];
        both.sort_by_key(|k| ann.participants.iter().position(|p| p.node == *k));
        assert_eq!(
            copies, both,
            "the original and the copy are both called, by sender"
        );
        // The judges find the payload bound to the victim: the copy is refused, the original accepted.
        let verdict = |d: &CalledDelta| {
            if d.payload_hash == stolen.payload_hash && sender_of(&ann, d) == thief {
                DeltaVerdict::Refuse(RejectCode::NotBound)
            } else {
                accept(d)
            }
        };
        attest_all(&mut c, &call, |part| judged(part, 1, "new", verdict));
        let commit = committed(&c.tick(30, 2).unwrap());
        let accepted = commit
            .accepted
            .iter()
            .find(|a| a.shard == ShardId::Trunk)
            .unwrap();
        assert_eq!(
            accepted
                .deltas
                .iter()
                .filter(|h| **h == stolen.payload_hash)
                .count(),
            1,
            "the victim's delta counts once"
        );
        assert_eq!(
            accepted.deltas.len(),
            2,
            "the victim's and the third node's trunk deltas"
        );
        assert_eq!(
            commit.rejected,
            vec![RejectedDelta {
                shard: ShardId::Trunk,
                node: thief,
                payload_hash: stolen.payload_hash,
                reason: RejectCode::NotBound,
            }],
            "the copy is refused under the thief's key, nobody else's"
        );
        for (node, want) in expected_standings(&ann, &call, &[], verdict) {
            assert_eq!(c.standings().get(&node), want, "{node}");
        }
        assert_eq!(c.standings().get(&thief).faults, 1);
        assert_eq!(c.standings().get(&victim).faults, 0);
    }
}

#[test]
fn a_payload_announced_twice_is_called_twice_and_the_round_stays_consistent() {
    let mut c = coordinator();
    let Copied {
        ann,
        victim,
        thief,
        stolen,
        call,
    } = round_with_a_copy(&mut c, false);
    let seed = c.state().round().unwrap().score_seed();
    // The call is a valid message although one payload appears in it twice (for two senders).
    Message::AggregationCall(call.clone())
        .check_limits()
        .unwrap();
    let trunk = call.shard(&ShardId::Trunk).unwrap();
    assert_eq!(
        trunk.deltas.len(),
        3,
        "one trunk delta per participant, the copy included"
    );
    assert_eq!(crate::round::call_score_seed(&call), seed);
    // A judgment that leaves the copy out (one verdict per distinct payload) is not counted.
    let mut distinct = trunk.deltas.clone();
    distinct.dedup_by_key(|d| d.payload_hash);
    assert_eq!(distinct.len(), 2);
    let deduplicated = ShardJudgment {
        verdicts: distinct.iter().map(accept).collect(),
        ..judgment(trunk, "deduplicated")
    };
    let judge = judges_of(&ann, trunk).holders[0];
    assert_eq!(
        c.shard_attested(1, judge, &signed(&call, vec![deduplicated])),
        Err(EventError::Refused(RejectCode::ShardNotAssigned))
    );
    let verdict = |d: &CalledDelta| {
        if sender_of(&ann, d) == thief && d.payload_hash == stolen.payload_hash {
            DeltaVerdict::Refuse(RejectCode::NotBound)
        } else {
            accept(d)
        }
    };
    attest_all(&mut c, &call, |part| judged(part, 1, "new", verdict));
    let commit = committed(&c.tick(30, 2).unwrap());
    Message::RoundCommit(commit.clone()).check_limits().unwrap();
    // Every delta of the call is in the commit, once accepted and once refused for the copied payload; the
    // score seed is the call's.
    let listed: usize = commit
        .accepted
        .iter()
        .map(|a| a.deltas.len())
        .sum::<usize>()
        + commit.rejected.len();
    let in_call: usize = call.shards.iter().map(|p| p.deltas.len()).sum();
    assert_eq!(listed, in_call);
    assert_eq!(crate::round::commit_score_seed(&commit), seed);
    assert_eq!(c.standings().get(&victim).faults, 0);
    assert_eq!(c.standings().get(&thief).faults, 1);
}

/// Opens a round at `t` (every member heartbeats first), lets every participant in `senders` send all its
/// deltas and ticks once more. Returns the announcement and what that tick did: the call for judgments
/// when every delta was in (with it the commit, when the call has nothing to judge).
fn round_to_call(
    c: &mut Coordinator,
    t: u64,
    senders: &[PublicKey],
) -> (RoundAnnouncement, Vec<Action>) {
    for n in c.members().keys().copied().collect::<Vec<_>>() {
        let seq = c.members()[&n].last_seq + 1;
        let _ = c.node_heartbeat(t, n, own_ip(&n), &heartbeat(seq, 100.0));
    }
    let ann = announced(&c.tick(t, t).unwrap());
    send_all(c, &ann, senders, t + 10);
    let actions = c.tick(t + 20, t).unwrap();
    (ann, actions)
}

/// Plays one whole round at `t`: every participant in `senders` sends all its deltas; the judges refuse a
/// sender's deltas for `refuse(sender)` when it says so and accept the others (each with [`norm_of`]); every
/// judge signs the same, so every shard reaches its quorum and is taken. Returns the announcement and the
/// commit.
fn play_round_in(
    c: &mut Coordinator,
    t: u64,
    senders: &[PublicKey],
    refuse: impl Fn(&PublicKey) -> Option<RejectCode>,
) -> (RoundAnnouncement, RoundCommit) {
    let (ann, mut actions) = round_to_call(c, t, senders);
    if let [Action::CallAggregation(call)] = actions.as_slice() {
        let call = call.clone();
        let verdict = |d: &CalledDelta| match refuse(&sender_of(&ann, d)) {
            Some(code) => DeltaVerdict::Refuse(code),
            None => accept(d),
        };
        attest_all(c, &call, |part| {
            judged(
                part,
                ann.round,
                &format!("{} {}", part.shard, ann.round),
                verdict,
            )
        });
        actions = c.tick(t + 40, t).unwrap();
    }
    let commit = committed(&actions);
    (ann, commit)
}

/// [`play_round_in`], for the commit alone.
fn play_round(
    c: &mut Coordinator,
    t: u64,
    senders: &[PublicKey],
    refuse: impl Fn(&PublicKey) -> Option<RejectCode>,
) -> RoundCommit {
    play_round_in(c, t, senders, refuse).1
}

#[test]
fn a_member_refused_again_and_again_is_banned_and_stays_out() {
    let mut c = coordinator();
    let all = join(&mut c, 4);
    let refuse = |n: &PublicKey| (*n == key(4)).then_some(RejectCode::LowScore);
    let mut t = 0;
    while c.members().contains_key(&key(4)) {
        play_round(&mut c, t, &all, refuse);
        t += 1_000;
        assert!(t < 20_000, "never banned: {:?}", c.standings().get(&key(4)));
    }
    assert!(c.standings().is_banned(&key(4)));
    assert!(c.standings().get(&key(1)).reputation > 0);
    // Its heartbeats are refused from now on, whatever their sequence number.
    assert_eq!(
        c.node_heartbeat(t, key(4), own_ip(&key(4)), &heartbeat(1_000, 1e9)),
        Err(EventError::Refused(RejectCode::NotAdmitted))
    );
    let ann = announced(&c.tick(t, 1).unwrap());
    assert!(ann.participant(&key(4)).is_none());
    // The ban survives a save and a restore.
    let restored = Coordinator::from_bytes(&c.to_bytes().unwrap()).unwrap();
    assert!(restored.standings().is_banned(&key(4)));
}

#[test]
fn an_accepted_delta_weighs_its_senders_standing_up_to_the_cap() {
    let mut c = coordinator();
    let all = join(&mut c, 3);
    let first = play_round(&mut c, 0, &all, |_| None);
    for a in &first.accepted {
        assert_eq!(
            a.weights,
            vec![1; a.deltas.len()],
            "no record yet: weight 1"
        );
    }
    let mut t = 1_000;
    for _ in 0..12 {
        play_round(&mut c, t, &all, |_| None);
        t += 1_000;
    }
    // A newcomer joins a run whose members have a record.
    let newcomer = key(9);
    c.node_heartbeat(t, newcomer, own_ip(&newcomer), &heartbeat(1, 1e9))
        .unwrap();
    let mut with_new = all.clone();
    with_new.push(newcomer);
    let commit = play_round(&mut c, t, &with_new, |_| None);
    let ann_participants: Vec<PublicKey> = with_new.clone();
    let trunk = commit
        .accepted
        .iter()
        .find(|a| a.shard == ShardId::Trunk)
        .expect("trunk deltas accepted");
    assert_eq!(trunk.deltas.len(), ann_participants.len());
    let mut weights = trunk.weights.clone();
    weights.sort();
    // The newcomer weighs 1; every member with 13 rounds of accepted work is at the cap.
    assert_eq!(weights[0], 1, "{weights:?}");
    assert!(
        weights[1..]
            .iter()
            .all(|w| *w == standing::DELTA_WEIGHT_CAP),
        "{weights:?}"
    );
    for a in &commit.accepted {
        assert_eq!(a.weights.len(), a.deltas.len());
    }
    Message::RoundCommit(commit).check_limits().unwrap();
}
#[test]
fn the_allowlist_and_the_member_cap_decide_who_joins() {
    let mut c = coordinator();
    c.set_allowlist(Some([key(1), key(2), key(3)].into_iter().collect()));
    for i in 1..=3 {
        c.node_heartbeat(0, key(i), own_ip(&key(i)), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        c.node_heartbeat(0, key(9), own_ip(&key(9)), &heartbeat(1, 100.0)),
        Err(EventError::Refused(RejectCode::NotAdmitted))
    );
    // A member taken off the list leaves at once.
    c.set_allowlist(Some([key(1), key(2)].into_iter().collect()));
    assert!(!c.members().contains_key(&key(3)));
    // An open run with a cap of 3 members.
    let mut cfg = c.config().clone();
    cfg.standing.max_members = 3;
    let mut capped = Coordinator::new(cfg, base_manifest()).unwrap();
    for i in 1..=3 {
        capped
            .node_heartbeat(0, key(i), own_ip(&key(i)), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        capped.node_heartbeat(0, key(4), own_ip(&key(4)), &heartbeat(1, 100.0)),
        Err(EventError::Refused(RejectCode::NotAdmitted))
    );
    // A member already in keeps heartbeating.
    capped
        .node_heartbeat(10, key(1), own_ip(&key(1)), &heartbeat(2, 100.0))
        .unwrap();
}

#[test]
fn a_flood_of_new_keys_claiming_huge_capacity_wins_no_expert_from_members_with_a_record() {
    let mut c = coordinator();
    let veterans = join(&mut c, 3);
    let mut t = 0;
    for _ in 0..3 {
        play_round(&mut c, t, &veterans, |_| None);
        t += 1_000;
    }
    // 20 new keys, each claiming a million tokens per second.
    for i in 100..120u8 {
        c.node_heartbeat(t, key(i), own_ip(&key(i)), &heartbeat(1, 1e6))
            .unwrap();
    }
    let ann = announced(&c.tick(t, 99).unwrap());
    let experts_of = |n: &PublicKey| {
        ann.participant(n).map_or(0, |p| {
            p.shards.iter().filter(|s| **s != ShardId::Trunk).count()
        })
    };
    let newcomers: usize = (100..120u8).map(|i| experts_of(&key(i))).sum();
    let veteran: usize = veterans.iter().map(experts_of).sum();
    assert_eq!(
        veteran,
        experts().len() * 2,
        "the veterans keep every expert slot"
    );
    assert_eq!(newcomers, 0, "declared capacity wins nothing");
}

/// A run of a few thousand members outgrows one 64 KiB store record many times over (the daemon saves the
/// state as a split record); it still encodes, decodes and behaves the same.
#[test]
fn a_few_thousand_members_round_trip_past_one_record() {
    let members = 3_000u32;
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.standing.max_members = members as usize;
    let mut c = Coordinator::new(cfg, base_manifest()).unwrap();
    for i in 0..members {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k[31] = 0xEE;
        c.node_heartbeat(0, PublicKey(k), own_ip(&PublicKey(k)), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(c.members().len(), members as usize);
    let bytes = c.to_bytes().unwrap();
    assert!(
        bytes.len() > 2 * 64 * 1024,
        "{} bytes for {members} members",
        bytes.len()
    );
    let back = Coordinator::from_bytes(&bytes).unwrap();
    assert_eq!(back.to_bytes().unwrap(), bytes);
}

const NOT_ADMITTED: Result<(), EventError> = Err(EventError::Refused(RejectCode::NotAdmitted));

#[test]
fn a_new_key_from_an_address_at_its_cap_is_refused_and_other_addresses_still_join() {
    let mut c = capped_per_ip(2);
    for i in 1..=2 {
        c.node_heartbeat(0, key(i), ip(1), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        c.node_heartbeat(0, key(3), ip(1), &heartbeat(1, 100.0)),
        NOT_ADMITTED
    );
    assert!(!c.members().contains_key(&key(3)));
    c.node_heartbeat(0, key(4), ip(2), &heartbeat(1, 100.0))
        .unwrap();
    assert_eq!((c.members_at(ip_addr(1)), c.members_at(ip_addr(2))), (2, 1));
    // The members in keep heartbeating from there.
    c.node_heartbeat(10, key(1), ip(1), &heartbeat(2, 100.0))
        .unwrap();
    assert_eq!(c.members()[&key(1)].last_seen_ms, 10);
    // A place freed is taken by the next key.
    c.node_left(&key(1));
    c.node_heartbeat(20, key(3), ip(1), &heartbeat(2, 100.0))
        .unwrap();
    assert_eq!(c.members_at(ip_addr(1)), 2);
}

fn ip_addr(i: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([10, 0, 0, i])
}

#[test]
fn one_ipv6_slash_64_counts_as_one_address() {
    let v6 = |last: u16, prefix: u16| {
        Origin::Ip(std::net::IpAddr::from(std::net::Ipv6Addr::new(
            0x2001, 0xdb8, prefix, 1, 0, 0, 0, last,
        )))
    };
    let mut c = capped_per_ip(2);
    c.node_heartbeat(0, key(1), v6(1, 7), &heartbeat(1, 100.0))
        .unwrap();
    c.node_heartbeat(0, key(2), v6(2, 7), &heartbeat(1, 100.0))
        .unwrap();
    // A third key from another address of the same /64 is refused; one from another /64 joins.
    assert_eq!(
        c.node_heartbeat(0, key(3), v6(0xffff, 7), &heartbeat(1, 100.0)),
        Err(EventError::Refused(RejectCode::NotAdmitted))
    );
    c.node_heartbeat(0, key(4), v6(1, 8), &heartbeat(1, 100.0))
        .unwrap();
    // An IPv4-mapped IPv6 address is its IPv4 address.
    let mapped = |i: u8| {
        Origin::Ip(std::net::IpAddr::V6(
            std::net::Ipv4Addr::new(10, 0, 0, i).to_ipv6_mapped(),
        ))
    };
    c.node_heartbeat(0, key(5), ip(9), &heartbeat(1, 100.0))
        .unwrap();
    c.node_heartbeat(0, key(6), mapped(9), &heartbeat(1, 100.0))
        .unwrap();
    assert_eq!(c.members_at(ip_addr(9)), 2);
    assert_eq!(
        c.node_heartbeat(0, key(7), mapped(9), &heartbeat(1, 100.0)),
        Err(EventError::Refused(RejectCode::NotAdmitted))
    );
}

#[test]
fn a_member_is_never_evicted_by_the_per_ip_cap() {
    let mut c = capped_per_ip(1);
    c.node_heartbeat(0, key(1), ip(1), &heartbeat(1, 100.0))
        .unwrap();
    c.node_heartbeat(0, key(2), ip(2), &heartbeat(1, 100.0))
        .unwrap();
    // key 2 now shows up from address 1, which is at its cap: it stays, and is counted there.
    c.node_heartbeat(10, key(2), ip(1), &heartbeat(2, 100.0))
        .unwrap();
    assert!(c.members().contains_key(&key(1)) && c.members().contains_key(&key(2)));
    assert_eq!(c.members()[&key(2)].origin, ip(1));
    assert_eq!(c.members_at(ip_addr(1)), 2);
    // A heartbeat whose origin is not known leaves the one known in place.
    c.node_heartbeat(20, key(2), Origin::Unknown, &heartbeat(3, 100.0))
        .unwrap();
    assert_eq!(c.members()[&key(2)].origin, ip(1));
    assert_eq!(c.members()[&key(2)].last_seen_ms, 20);
}

#[test]
fn a_key_whose_address_is_unknown_waits_until_it_is_known() {
    let mut c = capped_per_ip(4);
    assert_eq!(
        c.node_heartbeat(0, key(1), Origin::Unknown, &heartbeat(1, 100.0)),
        NOT_ADMITTED
    );
    assert!(c.members().is_empty());
    // The next heartbeat, once the driver has a direct connection to it.
    c.node_heartbeat(10, key(1), ip(1), &heartbeat(2, 100.0))
        .unwrap();
    assert_eq!(c.members()[&key(1)].origin, ip(1));
}

#[test]
fn loopback_is_counted_unless_colocated_peers_are_trusted() {
    let mut c = capped_per_ip(2);
    for i in 1..=2 {
        c.node_heartbeat(0, key(i), loopback(), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        c.node_heartbeat(0, key(3), loopback(), &heartbeat(1, 100.0)),
        NOT_ADMITTED
    );
    c.set_trust_colocated(true);
    c.node_heartbeat(0, key(3), loopback(), &heartbeat(1, 100.0))
        .unwrap();
    c.node_heartbeat(0, key(4), Origin::Unknown, &heartbeat(1, 100.0))
        .unwrap();
    // Other addresses are still counted.
    for i in 5..=6 {
        c.node_heartbeat(0, key(i), ip(1), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        c.node_heartbeat(0, key(7), ip(1), &heartbeat(1, 100.0)),
        NOT_ADMITTED
    );
    assert_eq!(c.members().len(), 6);
}

#[test]
fn the_per_ip_cap_must_be_at_least_one() {
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.standing.max_members_per_ip = 0;
    assert!(Coordinator::new(cfg, base_manifest()).is_err());
}

#[test]
fn a_state_saved_before_the_per_ip_cap_still_resumes() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &nodes[..2], 10);
    let old = legacy::encode_v1(&c);
    let restored = Coordinator::from_bytes(&old).unwrap();
    // The same state, but where its members are is not known until they heartbeat again, and the round in
    // progress (protocol 1's) is abandoned: the next round starts from the committed checkpoint.
    assert!(matches!(c.state(), RunState::RoundTrain(_)));
    assert_eq!(restored.state(), &RunState::WaitingForMembers);
    assert_eq!(restored.checkpoint(), c.checkpoint());
    assert_eq!(restored.config(), c.config());
    assert_eq!(
        restored.members().keys().collect::<Vec<_>>(),
        c.members().keys().collect::<Vec<_>>()
    );
    assert!(
        restored
            .members()
            .values()
            .all(|m| m.origin == Origin::Unknown)
    );
    // Saved again, it is in the current format.
    let again = restored.to_bytes().unwrap();
    assert_eq!(Coordinator::from_bytes(&again).unwrap(), restored);
    // Between rounds nothing is lost.
    let mut idle = coordinator();
    join(&mut idle, 3);
    let waiting = Coordinator::from_bytes(&legacy::encode_v1(&idle)).unwrap();
    assert_eq!(waiting.state(), idle.state());
    let cooling = Coordinator {
        state: RunState::Cooldown { until_ms: 1234 },
        ..idle.clone()
    };
    let cooled = Coordinator::from_bytes(&legacy::encode_v1(&cooling)).unwrap();
    assert_eq!(cooled.state(), &RunState::Cooldown { until_ms: 1234 });
    let cooled_bytes = legacy::encode_v1(&cooling);
    assert!(Coordinator::from_bytes(&cooled_bytes[..cooled_bytes.len() - 1]).is_err());
}

/// A key of its own for member `i` of a large run.
fn wide_key(i: u32) -> PublicKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x77;
    PublicKey(k)
}

#[test]
fn a_round_takes_at_most_what_one_announcement_carries_and_keeps_its_hosts() {
    use mana_protocol::limits::MAX_PARTICIPANTS;
    let members = MAX_PARTICIPANTS as u32 + 200;
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.standing.max_members = members as usize;
    let mut c = Coordinator::new(cfg, base_manifest()).unwrap();
    for i in 0..members {
        let k = wide_key(i);
        c.node_heartbeat(0, k, own_ip(&k), &heartbeat(1, 100.0))
            .unwrap();
    }
    let first = announced(&c.tick(0, 3).unwrap());
    assert_eq!(first.participants.len(), MAX_PARTICIPANTS);
    Message::RoundAnnouncement(first.clone())
        .check_limits()
        .unwrap();
    let hosts = |ann: &RoundAnnouncement| -> BTreeSet<PublicKey> {
        ann.participants
            .iter()
            .filter(|p| p.shards.iter().any(|s| *s != ShardId::Trunk))
            .map(|p| p.node)
            .collect()
    };
    // Every participant leaves the round without a delta; the next round, drawn with another seed, keeps
    // the experts where they were.
    let next = first.deadlines.deltas_by_ms + 1;
    let mut actions = c.tick(next, 4).unwrap();
    let mut now = next;
    while !matches!(actions.last(), Some(Action::AnnounceRound(_))) {
        now += 1_000;
        for i in 0..members {
            let k = wide_key(i);
            c.node_heartbeat(now, k, own_ip(&k), &heartbeat(2 + now, 100.0))
                .unwrap();
        }
        actions = c.tick(now, 5).unwrap();
        assert!(now < next + 60_000, "no second round");
    }
    let Some(Action::AnnounceRound(second)) = actions.last() else {
        unreachable!()
    };
    assert_eq!(second.participants.len(), MAX_PARTICIPANTS);
    assert_eq!(hosts(second), hosts(&first));
}

#[test]
fn the_per_address_counts_follow_moves_departures_and_a_restore() {
    let mut c = capped_per_ip(2);
    for i in 1..=2 {
        c.node_heartbeat(0, key(i), ip(1), &heartbeat(1, 100.0))
            .unwrap();
    }
    assert_eq!(
        c.node_heartbeat(0, key(3), ip(1), &heartbeat(1, 100.0)),
        NOT_ADMITTED
    );
    // key 2 moves to address 2: address 1 has room again.
    c.node_heartbeat(10, key(2), ip(2), &heartbeat(2, 100.0))
        .unwrap();
    c.node_heartbeat(10, key(3), ip(1), &heartbeat(2, 100.0))
        .unwrap();
    // key 1 leaves: room again; a restored coordinator counts the same.
    c.node_left(&key(1));
    let mut back = Coordinator::from_bytes(&c.to_bytes().unwrap()).unwrap();
    for d in [&mut c, &mut back] {
        d.node_heartbeat(20, key(4), ip(1), &heartbeat(1, 100.0))
            .unwrap();
        assert_eq!(
            d.node_heartbeat(20, key(5), ip(1), &heartbeat(1, 100.0)),
            NOT_ADMITTED
        );
        assert_eq!(d.members_at(ip_addr(1)), 2);
    }
}

#[test]
fn members_that_take_no_shard_do_not_start_a_round() {
    let mut c = coordinator();
    let mirror = |seq| Heartbeat {
        capacity: Capacity {
            max_shards: 0,
            ..heartbeat(seq, 0.0).capacity
        },
        ..heartbeat(seq, 0.0)
    };
    // Two trainers and a mirror (an evaluator): three members, two of which can train.
    join(&mut c, 2);
    c.node_heartbeat(0, key(9), own_ip(&key(9)), &mirror(1))
        .unwrap();
    assert_eq!(c.members().len(), 3);
    assert!(c.tick(0, 1).unwrap().is_empty(), "min_members is 3");
    let _ = c.node_heartbeat(5, key(3), own_ip(&key(3)), &heartbeat(1, 100.0));
    let ann = announced(&c.tick(5, 1).unwrap());
    assert_eq!(ann.participants.len(), 3);
    assert!(ann.participant(&key(9)).is_none());
}

/// A round of 3 members up to its call for judgments, every participant having sent all its deltas.
fn called_round(c: &mut Coordinator) -> (RoundAnnouncement, AggregationCall) {
    let ann = start(c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(c, &ann, &nodes, 10);
    let call = called(&c.tick(20, 12).unwrap());
    (ann, call)
}

/// The call's part about an expert (held by two of the three members, so judged by them and the third).
fn an_expert(call: &AggregationCall) -> &ShardCall {
    call.shards
        .iter()
        .find(|p| p.shard != ShardId::Trunk)
        .unwrap()
}

#[test]
fn every_shard_is_judged_by_its_holders_and_a_verifier_drawn_from_the_others() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    assert!(!call.shards.is_empty());
    assert_eq!(call.base_checkpoint, ann.base_checkpoint);
    for part in &call.shards {
        let shard = part.shard;
        let judges = judges_of(&ann, part);
        let holders: BTreeSet<PublicKey> = ann
            .participants
            .iter()
            .filter(|p| p.shards.contains(&shard))
            .map(|p| p.node)
            .collect();
        // Holders judge (at most three of them); the verifiers hold nothing of the shard.
        assert!(judges.holders.iter().all(|h| holders.contains(h)));
        assert_eq!(judges.holders.len(), holders.len().min(3));
        assert!(judges.verifiers.iter().all(|v| !holders.contains(v)));
        let others = ann.participants.len() - holders.len();
        assert_eq!(judges.verifiers.len(), others.min(2), "{shard}");
    }
}

#[test]
fn the_result_a_quorum_signs_is_committed_and_a_dissenting_judge_pays() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    // An expert held by two of the three members, so judged by them and the third, drawn as verifier.
    let part = an_expert(&call);
    let shard = part.shard;
    let judges = judges_of(&ann, part);
    assert_eq!((judges.holders.len(), judges.verifiers.len()), (2, 1));
    let (liar, honest, verifier) = (judges.holders[0], judges.holders[1], judges.verifiers[0]);
    let good = judgment(part, "the honest result");
    // Nobody outside the shard's judges counts, nor a judgment for another call.
    let outsider = key(99);
    assert_eq!(
        c.shard_attested(1, outsider, &signed(&call, vec![good.clone()])),
        Err(EventError::Refused(RejectCode::ShardNotAssigned))
    );
    let other_call = ShardAttestation {
        call: ContentHash::of(b"another call"),
        ..signed(&call, vec![good.clone()])
    };
    assert_eq!(
        c.shard_attested(1, honest, &other_call),
        Err(EventError::Refused(RejectCode::Inconsistent))
    );
    // A result of another size than the shard's is not a state of it: not counted, whoever signs it (a
    // quorum of liars cannot make holders and mirrors fetch more than a shard).
    let mut huge = good.clone();
    huge.entry.size = 1 << 40;
    assert_eq!(
        c.shard_attested(1, liar, &signed(&call, vec![huge])),
        Err(EventError::Refused(RejectCode::ShardNotAssigned))
    );
    // A holder signs a wrong state: no quorum yet, and the wrong result cannot be taken.
    let wrong = judgment(part, "a wrong result");
    assert_eq!(
        c.shard_attested(1, liar, &signed(&call, vec![wrong.clone()])),
        Ok(vec![])
    );
    assert_eq!(c.state().round().unwrap().results.get(&part.shard), None);
    // The other holder and the verifier sign the honest judgment: it has its quorum.
    assert_eq!(
        c.shard_attested(1, honest, &signed(&call, vec![good.clone()])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_attested(1, verifier, &signed(&call, vec![good.clone()])),
        Ok(vec![good.entry])
    );
    assert_eq!(
        c.state().round().unwrap().results.get(&part.shard),
        Some(&good.entry),
        "taken at its quorum"
    );
    // A judge's second, different judgment for the shard does not replace its first: it voids it (the judge
    // equivocated), and the result, taken already, is not taken twice.
    assert_eq!(
        c.shard_attested(1, liar, &signed(&call, vec![good.clone()])),
        Ok(vec![])
    );
    let kept = &c.state().round().unwrap().attested[&shard][&liar];
    assert!(equivocation::is_void(kept), "{kept:?}");
    // The other shards' judges all sign; the round commits the quorum's result.
    attest_each(&mut c, &call, |p| {
        (p.shard != shard).then(|| judgment(p, &format!("new {}", p.shard)))
    });
    let faults_before = c.standings().get(&liar).faults;
    let commit = committed(&c.tick(40, 14).unwrap());
    assert_eq!(commit.checkpoint.shard(&shard), Some(&good.entry));
    assert!(commit.accepted.iter().any(|a| a.shard == shard));
    assert_eq!(c.standings().get(&liar).faults, faults_before + 1);
    assert_eq!(c.standings().get(&honest).faults, 0);
    // The commit records the dissent by key; shards where every judge signed the quorum's are left out.
    assert_eq!(
        commit.dissent,
        vec![ShardDissent {
            shard,
            dissenters: vec![liar],
            absent: Vec::new(),
        }]
    );
    Message::RoundCommit(commit).check_limits().unwrap();
}

/// A judge of a quorum that signs a second, different judgment after its quorum was taken counts as having
/// signed nothing: the result stands if the other judges still make a quorum, and the shard holds otherwise.
/// Either way the commit names it among the shard's dissenters and it is charged.
#[test]
fn a_judge_that_signs_two_judgments_counts_for_neither_and_is_recorded() {
    for honest_signs in [true, false] {
        let mut c = coordinator();
        let (ann, call) = called_round(&mut c);
        let part = an_expert(&call);
        let shard = part.shard;
        let judges = judges_of(&ann, part);
        let (cheat, honest, verifier) = (judges.holders[0], judges.holders[1], judges.verifiers[0]);
        let good = judgment(part, "the honest result");
        c.shard_attested(1, cheat, &signed(&call, vec![good.clone()]))
            .unwrap();
        assert_eq!(
            c.shard_attested(1, verifier, &signed(&call, vec![good.clone()])),
            Ok(vec![good.entry]),
            "the cheat and the verifier make the quorum"
        );
        // Then the cheat signs another result: its judgment is void whatever order the two arrive in, and
        // the result, short of its quorum now, is no longer taken: the round waits for the other judges.
        let other = judgment(part, "another result");
        c.shard_attested(1, cheat, &signed(&call, vec![other]))
            .unwrap();
        assert_eq!(c.state().round().unwrap().results.get(&shard), None);
        // A third copy of either changes nothing.
        c.shard_attested(1, cheat, &signed(&call, vec![good.clone()]))
            .unwrap();
        if honest_signs {
            assert_eq!(
                c.shard_attested(1, honest, &signed(&call, vec![good.clone()])),
                Ok(vec![good.entry]),
                "taken again with the honest holder"
            );
        }
        attest_each(&mut c, &call, |p| {
            (p.shard != shard).then(|| judgment(p, &format!("new {}", p.shard)))
        });
        let base = *c.checkpoint().shard(&shard).unwrap();
        // Without the honest holder the round waits for it until the commit deadline.
        let deadline = c
            .state()
            .round()
            .unwrap()
            .announcement
            .deadlines
            .commit_by_ms;
        let commit = if honest_signs {
            committed(&c.tick(40, 14).unwrap())
        } else {
            let early = c.tick(40, 14).unwrap();
            assert!(
                !early.iter().any(|a| matches!(a, Action::CommitRound(_))),
                "committed before the deadline without the shard's quorum: {early:?}"
            );
            committed(&c.tick(deadline + 1, 14).unwrap())
        };
        let record = commit.dissent.iter().find(|d| d.shard == shard).cloned();
        assert_eq!(c.standings().get(&cheat).faults, 1, "the cheat is charged");
        assert_eq!(c.standings().get(&honest).faults, 0);
        // Named a dissenter either way (it counts as absent in the tally, and is not listed absent).
        assert_eq!(
            record,
            Some(ShardDissent {
                shard,
                dissenters: vec![cheat],
                absent: Vec::new(),
            })
        );
        if honest_signs {
            assert_eq!(commit.checkpoint.shard(&shard), Some(&good.entry));
        } else {
            // The verifier alone is no quorum: the shard holds, its deltas `late`.
            assert_eq!(commit.checkpoint.shard(&shard), Some(&base));
            assert!(
                commit
                    .rejected
                    .iter()
                    .any(|r| r.shard == shard && r.reason == RejectCode::Late)
            );
        }
        Message::RoundCommit(commit).check_limits().unwrap();
    }
}

#[test]
fn colluding_holders_without_a_verifier_get_no_quorum_and_the_shard_holds() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let shard = part.shard;
    let judges = judges_of(&ann, part);
    // Both holders sign the same wrong judgment (every delta refused, so the shard keeps its state): two of
    // three judges, but no verifier among them.
    let wrong = judged(part, 1, "what the colluders agree on", |_| {
        DeltaVerdict::Refuse(RejectCode::LowScore)
    });
    for h in &judges.holders {
        assert_eq!(
            c.shard_attested(1, *h, &signed(&call, vec![wrong.clone()])),
            Ok(vec![])
        );
    }
    // The verifier signs the honest one: one signature, no quorum either.
    assert_eq!(
        c.shard_attested(
            1,
            judges.verifiers[0],
            &signed(&call, vec![judgment(part, "honest")])
        ),
        Ok(vec![])
    );
    // Every other shard is settled; this one keeps its state at the deadline and its deltas are late.
    attest_each(&mut c, &call, |p| {
        (p.shard != shard).then(|| judgment(p, "fine"))
    });
    assert!(
        matches!(c.tick(40, 14).unwrap().as_slice(), []),
        "the round waits for the shard until the commit deadline"
    );
    let commit = committed(&c.tick(ann.deadlines.commit_by_ms + 1, 14).unwrap());
    let base = base_manifest();
    assert_eq!(
        commit.checkpoint.shard(&shard).map(|e| e.hash),
        base.shard(&shard).map(|e| e.hash)
    );
    assert!(commit.accepted.iter().all(|a| a.shard != shard));
    assert!(
        commit
            .rejected
            .iter()
            .filter(|r| r.shard == shard)
            .all(|r| r.reason == RejectCode::Late)
    );
    // The colluders' refusals were never taken: their victims lose nothing.
    assert!(
        c.standings().records().values().all(|s| s.faults == 0),
        "{:?}",
        c.standings().records()
    );
}

#[test]
fn a_judge_that_never_answers_leaves_the_quorum_to_the_others() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let judges = judges_of(&ann, part);
    // One holder died after training: the other holder and the verifier carry the shard.
    let good = judgment(part, "honest");
    assert_eq!(
        c.shard_attested(1, judges.holders[1], &signed(&call, vec![good.clone()])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_attested(1, judges.verifiers[0], &signed(&call, vec![good.clone()])),
        Ok(vec![good.entry])
    );
    // The other shards' judges all sign; the silent holder is on the commit's record.
    let judged = part.shard;
    attest_each(&mut c, &call, |p| {
        (p.shard != judged).then(|| judgment(p, &format!("new {}", p.shard)))
    });
    let commit = committed(&c.tick(40, 14).unwrap());
    let record = commit
        .dissent
        .iter()
        .find(|d| d.shard == part.shard)
        .expect("the shard's absent judges recorded");
    assert!(record.dissenters.is_empty());
    assert!(record.absent.contains(&judges.holders[0]));
}

#[test]
fn a_state_saved_before_the_judges_still_resumes() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &nodes[..2], 10);
    let restored = Coordinator::from_bytes(&legacy::encode_v2(&c)).unwrap();
    // The round in progress (protocol 6's) is abandoned; members, standings and the checkpoint are kept,
    // and the judging rule is the default.
    assert_eq!(restored.state(), &RunState::WaitingForMembers);
    assert_eq!(restored.checkpoint(), c.checkpoint());
    assert_eq!(restored.config(), c.config());
    assert_eq!(restored.members(), c.members());
    let cooling = Coordinator {
        state: RunState::Cooldown { until_ms: 77 },
        ..restored.clone()
    };
    let cooled = Coordinator::from_bytes(&legacy::encode_v2(&cooling)).unwrap();
    assert_eq!(cooled.state(), &RunState::Cooldown { until_ms: 77 });
    let bytes = legacy::encode_v2(&cooling);
    assert!(Coordinator::from_bytes(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn a_state_saved_before_the_judges_verdicts_still_resumes() {
    let mut c = coordinator();
    // A judging rule of the operator's own, which format 3 kept; one round played, so the coordinator has
    // a norm history, which format 3 did not keep.
    let mut cfg = c.config().clone();
    cfg.judging = JudgingRule {
        verifiers_per_shard: 1,
        max_holder_judges: 2,
    };
    c.reconfigure(cfg).unwrap();
    let all = join(&mut c, 3);
    play_round(&mut c, 0, &all, |_| None);
    assert!(!c.norms.samples().is_empty());
    // Round 2 in progress: judging, with some judgments in.
    let (ann, actions) = round_to_call(&mut c, 1_000, &all);
    let call = called(&actions);
    let part = an_expert(&call).clone();
    let j = judges_of(&ann, &part);
    c.shard_attested(
        ann.round,
        j.holders[0],
        &signed(&call, vec![judged(&part, ann.round, "new", accept)]),
    )
    .unwrap();
    let restored = Coordinator::from_bytes(&legacy::encode_v3(&c)).unwrap();
    // The round in progress (protocol 7's) is abandoned, and the norm history starts empty; members,
    // standings, the checkpoint, the round count and the judging rule are kept, and the verdict rule and the
    // history length are the defaults.
    assert_eq!(
        restored,
        Coordinator {
            state: RunState::WaitingForMembers,
            norms: NormHistory::new(config::DEFAULT_NORM_HISTORY as usize),
            ..c.clone()
        }
    );
    assert_eq!(restored.config().judging, c.config().judging);
    assert_eq!(
        restored.config().verdict,
        crate::round::default_verdict_rule()
    );
    // It opens the next round from its checkpoint, with the next number, and calls it with no norm history.
    let mut resumed = restored.clone();
    let (next, actions) = round_to_call(&mut resumed, 5_000, &all);
    assert_eq!(next.round, ann.round + 1);
    assert_eq!(next.base_checkpoint, c.checkpoint().hash().unwrap());
    assert!(called(&actions).norms.is_empty());
    // Saved again, it is in the current format.
    assert_eq!(
        Coordinator::from_bytes(&restored.to_bytes().unwrap()).unwrap(),
        restored
    );
    // Between rounds nothing is lost; a truncated state is an error.
    for state in [
        RunState::Cooldown { until_ms: 77 },
        RunState::WaitingForMembers,
    ] {
        let idle = Coordinator {
            state: state.clone(),
            ..c.clone()
        };
        let back = Coordinator::from_bytes(&legacy::encode_v3(&idle)).unwrap();
        assert_eq!(back.state(), &state);
    }
    let bytes = legacy::encode_v3(&c);
    assert!(Coordinator::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    // A round still training is abandoned as well.
    let mut training = coordinator();
    start(&mut training, 3);
    assert!(matches!(training.state(), RunState::RoundTrain(_)));
    let back = Coordinator::from_bytes(&legacy::encode_v3(&training)).unwrap();
    assert_eq!(back.state(), &RunState::WaitingForMembers);
    assert_eq!(back.members(), training.members());
}

#[test]
fn a_participant_dropped_from_the_round_judges_nothing() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    // The third participant sends nothing: dropped at the delta deadline.
    send_all(&mut c, &ann, &nodes[..2], 10);
    let call = called(&c.tick(ann.deadlines.deltas_by_ms + 1, 12).unwrap());
    assert!(!call.shards.is_empty());
    for part in &call.shards {
        assert!(!judges_of(&ann, part).contains(&nodes[2]), "{part:?}");
    }
}

#[test]
fn the_commit_carries_the_quorums_verdicts_and_the_standings_follow_them() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    // The judges refuse the cheat's trunk delta as not bound to it (its sender's fault), and another
    // sender's expert delta as too small (an honest expert that got no tokens: a small cost); they accept
    // every other delta, each with its norm.
    let cheat = ann.participants[0].node;
    let trunk = call.shard(&ShardId::Trunk).unwrap();
    let forged = *trunk
        .deltas
        .iter()
        .find(|d| sender_of(&ann, d) == cheat)
        .unwrap();
    let small = *an_expert(&call)
        .deltas
        .iter()
        .find(|d| sender_of(&ann, d) != cheat)
        .unwrap();
    let verdict = |d: &CalledDelta| {
        if *d == forged {
            DeltaVerdict::Refuse(RejectCode::NotBound)
        } else if *d == small {
            DeltaVerdict::Refuse(RejectCode::NormTooSmall)
        } else {
            accept(d)
        }
    };
    attest_all(&mut c, &call, |part| judged(part, 1, "new", verdict));
    let commit = committed(&c.tick(40, 14).unwrap());
    // Each shard's accepted deltas in the call's order, with the call's weights and the verdicts' norms.
    for part in &call.shards {
        let kept: Vec<&CalledDelta> = part
            .deltas
            .iter()
            .filter(|d| **d != forged && **d != small)
            .collect();
        let want = AcceptedDeltas {
            shard: part.shard,
            deltas: kept.iter().map(|d| d.payload_hash).collect(),
            weights: kept.iter().map(|d| d.weight).collect(),
            norms: kept.iter().map(|d| norm_of(d)).collect(),
        };
        let got = commit.accepted.iter().find(|a| a.shard == part.shard);
        assert_eq!(got, Some(&want), "{}", part.shard);
    }
    // The refused ones with their codes, under their senders' keys.
    let mut want = vec![
        RejectedDelta {
            shard: ShardId::Trunk,
            node: cheat,
            payload_hash: forged.payload_hash,
            reason: RejectCode::NotBound,
        },
        RejectedDelta {
            shard: an_expert(&call).shard,
            node: sender_of(&ann, &small),
            payload_hash: small.payload_hash,
            reason: RejectCode::NormTooSmall,
        },
    ];
    want.sort_by_key(|d| (d.shard, d.node, d.payload_hash));
    assert_eq!(commit.rejected, want);
    // The standings follow the verdicts: +1 per accepted delta, the fault cost for the forged one, 1 for the
    // small one.
    let expected = expected_standings(&ann, &call, &[], verdict);
    assert_eq!(expected.len(), 3);
    for (node, want) in &expected {
        assert_eq!(&c.standings().get(node), want, "{node}");
    }
    let honest = ann.participants[1].node;
    let cheat_s = c.standings().get(&cheat);
    assert_eq!(cheat_s.faults, 1);
    assert_eq!(
        cheat_s.reputation,
        cheat_s.accepted as i64 - StandingPolicy::default().fault_cost
    );
    assert!(c.standings().get(&honest).reputation > 0);
    // Round 2's weights are the standings the verdicts left.
    let (ann2, actions) = round_to_call(
        &mut c,
        1_000,
        &ann.participants.iter().map(|p| p.node).collect::<Vec<_>>(),
    );
    let call2 = called(&actions);
    for part in &call2.shards {
        for d in &part.deltas {
            assert_eq!(
                d.weight,
                c.standings().get(&sender_of(&ann2, d)).delta_weight()
            );
        }
    }
}

#[test]
fn a_shard_without_a_quorum_lists_its_deltas_late_at_no_cost_to_their_senders() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let mut experts = call.shards.iter().filter(|p| p.shard != ShardId::Trunk);
    // Two experts: the judges of one each sign another state (no quorum); of the other's, one alone answers
    // before the deadline (no quorum either).
    let (split, unfetched) = (
        experts.next().unwrap().clone(),
        experts.next().unwrap().clone(),
    );
    let refuse_all = |_: &CalledDelta| DeltaVerdict::Refuse(RejectCode::BadPayload);
    let j = judges_of(&ann, &split);
    for (i, k) in j.holders.iter().chain(&j.verifiers).enumerate() {
        let own = judged(&split, 1, &format!("state {i}"), refuse_all);
        assert_eq!(
            c.shard_attested(1, *k, &signed(&call, vec![own])),
            Ok(vec![])
        );
    }
    let j = judges_of(&ann, &unfetched);
    let agreed = judged(&unfetched, 1, "agreed", refuse_all);
    assert_eq!(
        c.shard_attested(1, j.holders[0], &signed(&call, vec![agreed.clone()])),
        Ok(vec![]),
        "one judge is no quorum"
    );
    // Every other shard is judged and taken.
    let late = [split.shard, unfetched.shard];
    attest_each(&mut c, &call, |p| {
        (!late.contains(&p.shard)).then(|| judgment(p, "new"))
    });
    let commit = committed(&c.tick(ann.deadlines.commit_by_ms + 1, 14).unwrap());
    for part in [&split, &unfetched] {
        let mut want: Vec<RejectedDelta> = part
            .deltas
            .iter()
            .map(|d| RejectedDelta {
                shard: part.shard,
                node: sender_of(&ann, d),
                payload_hash: d.payload_hash,
                reason: RejectCode::Late,
            })
            .collect();
        want.sort_by_key(|d| (d.node, d.payload_hash));
        let got: Vec<RejectedDelta> = commit
            .rejected
            .iter()
            .filter(|r| r.shard == part.shard)
            .cloned()
            .collect();
        assert_eq!(
            got, want,
            "{}: every delta late, whatever the judges said",
            part.shard
        );
        assert!(commit.accepted.iter().all(|a| a.shard != part.shard));
        assert_eq!(
            commit.checkpoint.shard(&part.shard),
            base_manifest().shard(&part.shard),
            "{} keeps its entry",
            part.shard
        );
    }
    assert_eq!(
        commit.rejected.len(),
        split.deltas.len() + unfetched.deltas.len()
    );
    // Their senders are charged nothing for them (nor for the refusals that were never taken): each record
    // holds the other shards' accepted deltas alone.
    let expected = expected_standings(&ann, &call, &late, accept);
    for p in &ann.participants {
        assert_eq!(
            c.standings().get(&p.node),
            expected.get(&p.node).copied().unwrap_or_default(),
            "{}",
            p.node
        );
    }
}

#[test]
fn accepted_norms_reach_the_next_call_and_refused_ones_do_not() {
    let mut c = coordinator();
    // Two norms kept per shard, so that the trunk's three accepted deltas overflow the history.
    let mut cfg = c.config().clone();
    cfg.norm_history = 2;
    c.reconfigure(cfg).unwrap();
    let all = join(&mut c, 4);
    let refused = key(2);
    let (ann, commit) = play_round_in(&mut c, 0, &all, |n| {
        (*n == refused).then_some(RejectCode::NormTooSmall)
    });
    // The records the history should hold: each accepted delta's norm with its sender, shard by shard in
    // the commit's (the call's) order, the last two of each shard.
    let sender_of_payload = |shard: ShardId, h: &ContentHash| {
        ann.participants
            .iter()
            .map(|p| p.node)
            .find(|n| delta(&ann, shard, *n).payload_hash == *h)
            .unwrap()
    };
    let trunk = commit
        .accepted
        .iter()
        .find(|a| a.shard == ShardId::Trunk)
        .unwrap();
    assert_eq!(trunk.deltas.len(), 3, "four trunk deltas, one refused");
    let (next, actions) = round_to_call(&mut c, 1_000, &all);
    let call = called(&actions);
    Message::AggregationCall(call.clone())
        .check_limits()
        .unwrap();
    // Each sender named by its index among the next round's participants (every member takes part again).
    let index_in_next = |node: PublicKey| {
        next.participants
            .iter()
            .position(|p| p.node == node)
            .map(|i| i as u32)
    };
    let mut want = Vec::new();
    for a in &commit.accepted {
        let records: Vec<NormRecord> = a
            .deltas
            .iter()
            .zip(&a.norms)
            .map(|(h, norm)| NormRecord {
                shard: a.shard,
                sender: index_in_next(sender_of_payload(a.shard, h)),
                norm: *norm,
            })
            .collect();
        want.extend(records[records.len().saturating_sub(2)..].iter().copied());
    }
    assert!(want.iter().all(|r| r.sender.is_some()), "{want:?}");
    assert_eq!(call.norms, want);
    assert!(
        call.norms
            .iter()
            .all(|r| r.sender != index_in_next(refused)),
        "no refused delta's norm"
    );
    assert_eq!(
        call.norms
            .iter()
            .filter(|r| r.shard == ShardId::Trunk)
            .count(),
        2,
        "at most the history's length a shard"
    );
}

#[test]
fn judges_agreeing_on_the_entry_but_not_on_every_verdict_are_no_quorum() {
    // `other` turns the first delta's verdict into another one; the entry stays the same.
    let others: [fn(&CalledDelta) -> DeltaVerdict; 2] = [
        // Refused instead of accepted.
        |_| DeltaVerdict::Refuse(RejectCode::LowScore),
        // Accepted with a norm one ulp off: verdicts agree bit for bit or not at all.
        |d| DeltaVerdict::Accept {
            norm: f32::from_bits(norm_of(d).to_bits() + 1),
        },
    ];
    for other in others {
        let mut c = coordinator();
        let (ann, call) = called_round(&mut c);
        let part = an_expert(&call);
        let judges = judges_of(&ann, part);
        let (a, b, v) = (judges.holders[0], judges.holders[1], judges.verifiers[0]);
        let first = part.deltas[0];
        let all_in = judgment(part, "one state");
        let one_off = judged(part, 1, "one state", |d| {
            if *d == first { other(d) } else { accept(d) }
        });
        assert_eq!(all_in.entry, one_off.entry);
        assert_ne!(all_in.verdicts, one_off.verdicts);
        // Holder `a` and the verifier disagree on one verdict: two of three signatures on the entry, no quorum.
        assert_eq!(
            c.shard_attested(1, a, &signed(&call, vec![all_in.clone()])),
            Ok(vec![])
        );
        assert_eq!(
            c.shard_attested(1, v, &signed(&call, vec![one_off.clone()])),
            Ok(vec![])
        );
        assert_eq!(c.state().round().unwrap().results.get(&part.shard), None);
        // Holder `b` sides with the verifier: that is the quorum, and `a` dissents.
        assert_eq!(
            c.shard_attested(1, b, &signed(&call, vec![one_off.clone()])),
            Ok(vec![one_off.entry])
        );
        attest_each(&mut c, &call, |p| {
            (p.shard != part.shard).then(|| judgment(p, "new"))
        });
        let commit = committed(&c.tick(40, 14).unwrap());
        let rejected: Vec<&RejectedDelta> = commit
            .rejected
            .iter()
            .filter(|r| r.shard == part.shard)
            .collect();
        let accepted = commit
            .accepted
            .iter()
            .find(|a| a.shard == part.shard)
            .unwrap();
        match other(&first) {
            DeltaVerdict::Refuse(code) => {
                assert_eq!(rejected.len(), 1);
                assert_eq!(
                    (rejected[0].payload_hash, rejected[0].reason),
                    (first.payload_hash, code)
                );
                assert!(!accepted.deltas.contains(&first.payload_hash));
            }
            DeltaVerdict::Accept { norm } => {
                assert!(rejected.is_empty());
                let at = accepted
                    .deltas
                    .iter()
                    .position(|h| *h == first.payload_hash)
                    .unwrap();
                assert_eq!(
                    accepted.norms[at].to_bits(),
                    norm.to_bits(),
                    "the quorum's norm"
                );
            }
        }
        // The dissenter pays once; the refused delta's sender pays for it (it may be any of the three).
        let refused = |k: &PublicKey| {
            u64::from(
                matches!(other(&first), DeltaVerdict::Refuse(_)) && sender_of(&ann, &first) == *k,
            )
        };
        assert_eq!(c.standings().get(&a).faults, 1 + refused(&a));
        assert_eq!(c.standings().get(&b).faults, refused(&b));
        assert_eq!(c.standings().get(&v).faults, refused(&v));
    }
}

#[test]
fn scores_are_no_part_of_the_agreement_and_the_first_signers_are_published() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let judges = judges_of(&ann, part);
    let (a, v) = (judges.holders[0], judges.verifiers[0]);
    // Two judges agree on the state and the verdicts; their scores differ in the last bits (another CPU
    // rounds a loss differently).
    let mine = judgment(part, "one state");
    let mut theirs = mine.clone();
    for s in &mut theirs.scores {
        s.loss = f32::from_bits(s.loss.to_bits() + 1);
    }
    assert_eq!(
        c.shard_attested(1, a, &signed(&call, vec![mine.clone()])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_attested(1, v, &signed(&call, vec![theirs.clone()])),
        Ok(vec![mine.entry]),
        "a quorum all the same"
    );
    // The other holder has not signed (it would dissent if it signed anything else); the other shards settle.
    attest_each(&mut c, &call, |p| {
        (p.shard != part.shard).then(|| judgment(p, "new"))
    });
    let commit = committed(&c.tick(40, 14).unwrap());
    let first = if a < v { &mine } else { &theirs };
    let published: Vec<DeltaScore> = commit
        .scores
        .iter()
        .filter(|s| s.shard == part.shard)
        .copied()
        .collect();
    let mut want = first.scores.clone();
    want.sort_by_key(|s| s.payload_hash);
    assert_eq!(
        published, want,
        "the scores of the quorum's first signer by key"
    );
    assert!(c.standings().records().values().all(|s| s.faults == 0));
}

#[test]
fn a_judgment_without_one_verdict_per_called_delta_is_not_counted() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let judges = judges_of(&ann, part);
    let good = judgment(part, "honest");
    let mut short = good.clone();
    short.verdicts.pop();
    let mut long = good.clone();
    long.verdicts.push(accept(&part.deltas[0]));
    for bad in [&short, &long] {
        for k in judges.holders.iter().chain(&judges.verifiers) {
            assert_eq!(
                c.shard_attested(1, *k, &signed(&call, vec![bad.clone()])),
                Err(EventError::Refused(RejectCode::ShardNotAssigned)),
                "{} verdicts for {} deltas",
                bad.verdicts.len(),
                part.deltas.len()
            );
        }
    }
    assert!(
        !c.state()
            .round()
            .unwrap()
            .attested
            .contains_key(&part.shard)
    );
    // Beside a well-formed judgment of another shard, the malformed one is skipped and the other counts.
    let holder = judges.holders[0];
    let trunk = call.shard(&ShardId::Trunk).unwrap();
    assert!(judges_of(&ann, trunk).contains(&holder));
    let mut both = vec![judgment(trunk, "trunk"), short.clone()];
    both.sort_by_key(|j| j.entry.shard);
    assert_eq!(
        c.shard_attested(1, holder, &signed(&call, both)),
        Ok(vec![])
    );
    let r = c.state().round().unwrap();
    assert!(r.attested[&ShardId::Trunk].contains_key(&holder));
    assert!(!r.attested.contains_key(&part.shard));
    // The malformed judgment was not kept as the judges' first: their well-formed ones still count.
    assert_eq!(
        c.shard_attested(1, holder, &signed(&call, vec![good.clone()])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_attested(1, judges.verifiers[0], &signed(&call, vec![good.clone()])),
        Ok(vec![good.entry])
    );
}

/// An observer's audit of a commit ([`audit::audit_shard`]): the honest commit agrees with the quorum it saw;
/// a commit that accepts a delta the quorum refused, or takes another result, contradicts it; a commit that
/// holds a shard whose quorum signed is `Dropped`; without a quorum seen nothing follows.
#[test]
fn an_observer_catches_a_commit_that_is_not_what_the_quorum_signed() {
    use super::audit::{Finding, audit_shard};
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call).clone();
    let base = *base_manifest().shard(&part.shard).unwrap();
    // The judges refuse the first delta of the expert and accept the others.
    let first = part.deltas[0].payload_hash;
    let verdict = |d: &CalledDelta| {
        if d.payload_hash == first {
            DeltaVerdict::Refuse(RejectCode::LowScore)
        } else {
            accept(d)
        }
    };
    let honest = judged(&part, 1, "honest", verdict);
    let judges = judges_of(&ann, &part);
    let seen: BTreeMap<PublicKey, ShardJudgment> = judges
        .holders
        .iter()
        .chain(&judges.verifiers)
        .map(|k| (*k, honest.clone()))
        .collect();
    attest_all(&mut c, &call, |p| {
        if p.shard == part.shard {
            honest.clone()
        } else {
            judgment(p, "other")
        }
    });
    let commit = committed(&c.tick(40, 14).unwrap());
    assert_eq!(
        audit_shard(&ann, &part, &seen, base, &commit),
        Finding::Agrees
    );
    // Nothing seen, nothing follows.
    assert_eq!(
        audit_shard(&ann, &part, &BTreeMap::new(), base, &commit),
        Finding::NoQuorumSeen
    );
    // The coordinator accepts the refused delta after all.
    let mut forged = commit.clone();
    forged.rejected.retain(|r| r.payload_hash != first);
    let list = forged
        .accepted
        .iter_mut()
        .find(|a| a.shard == part.shard)
        .unwrap();
    list.deltas.insert(0, first);
    list.weights.insert(0, 1);
    list.norms.insert(0, 1.0);
    assert!(matches!(
        audit_shard(&ann, &part, &seen, base, &forged),
        Finding::Contradicts { .. }
    ));
    // Another result than the quorum's.
    let mut forged = commit.clone();
    forged.checkpoint.shards.iter_mut().for_each(|e| {
        if e.shard == part.shard {
            e.hash = ContentHash::of(b"nobody signed this");
        }
    });
    assert!(matches!(
        audit_shard(&ann, &part, &seen, base, &forged),
        Finding::Contradicts { .. }
    ));
    // The shard held, its deltas late, though a quorum signed.
    let mut held = commit.clone();
    held.accepted.retain(|a| a.shard != part.shard);
    held.rejected.retain(|r| r.shard != part.shard);
    for d in &part.deltas {
        held.rejected.push(RejectedDelta {
            shard: part.shard,
            node: sender_of(&ann, d),
            payload_hash: d.payload_hash,
            reason: RejectCode::Late,
        });
    }
    held.checkpoint.shards.iter_mut().for_each(|e| {
        if e.shard == part.shard {
            *e = base;
        }
    });
    let Finding::Dropped { signers } = audit_shard(&ann, &part, &seen, base, &held) else {
        panic!("a dropped quorum is not seen")
    };
    assert_eq!(signers.len(), judges.len());
}

/// The bound of a run's round messages holds for its real rounds: a round whose deltas are all accepted
/// (the next call carries their norms) and one whose deltas are all refused, each with its score, with the
/// member cap at the members that train, so that the bound is not loosened by participants that never come.
#[test]
fn every_round_message_fits_the_bound_its_settings_give() {
    let mut cfg = CoordinatorConfig::new(run(), experts(), hyper());
    cfg.min_members = 3;
    cfg.train_ms = 1_000;
    cfg.verify_ms = 1_000;
    cfg.cooldown_ms = 100;
    cfg.standing.max_members = 3;
    let bound = check_round_messages(&cfg).unwrap();
    let mut c = Coordinator::new(cfg, base_manifest()).unwrap();
    let size = |m: Message| {
        mana_protocol::wire::encode::<_, { usize::MAX }>(&m, "round message")
            .unwrap()
            .len()
    };
    let (ann, call) = called_round(&mut c);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    attest_all(&mut c, &call, |part| judgment(part, "one"));
    let first = committed(&c.tick(40, 14).unwrap());
    assert!(first.rejected.is_empty());
    let mut sizes = vec![(
        size(Message::RoundAnnouncement(ann)),
        size(Message::AggregationCall(call)),
        size(Message::RoundCommit(first)),
    )];
    let ann = announced(&c.tick(1_000, 15).unwrap());
    send_all(&mut c, &ann, &nodes, 1_010);
    let call = called(&c.tick(1_020, 16).unwrap());
    assert!(
        !call.norms.is_empty(),
        "the second call carries the first round's norms"
    );
    attest_all(&mut c, &call, |part| {
        judged(part, 2, "two", |_| {
            DeltaVerdict::Refuse(RejectCode::NormTooLarge)
        })
    });
    let second = committed(&c.tick(1_040, 17).unwrap());
    assert!(second.accepted.is_empty() && !second.scores.is_empty());
    sizes.push((
        size(Message::RoundAnnouncement(ann)),
        size(Message::AggregationCall(call)),
        size(Message::RoundCommit(second)),
    ));
    for (announcement, call, commit) in sizes {
        assert!(
            announcement <= bound.announcement && call <= bound.call && commit <= bound.commit,
            "{announcement}, {call}, {commit} bytes against {bound:?}"
        );
    }
}

/// A 1B-parameter layout (22 MoE layers of 64 experts, replication 2) outgrows a gossip message, but not a
/// parcel: its coordinator starts, and its calls and commits travel as parcels. A layout four times wider
/// with replication 8 cannot be sequenced at all: its commit would list more deltas than the protocol
/// allows, and its messages outgrow a parcel. Its coordinator refuses to start, saying why, instead of
/// failing every tick at its first commit.
#[test]
fn a_layout_whose_round_messages_outgrow_a_parcel_is_refused() {
    let layers = |experts: u16| -> Vec<ShardId> {
        (2..24u16)
            .flat_map(|layer| (0..experts).map(move |index| ShardId::Expert { layer, index }))
            .collect()
    };
    let b1 = CoordinatorConfig::new(run(), layers(64), hyper());
    let bound = check_round_messages(&b1).unwrap();
    assert!(
        bound.commit > mana_protocol::limits::MAX_MESSAGE_BYTES
            && bound.call > mana_protocol::limits::MAX_MESSAGE_BYTES,
        "the 1B layout's call and commit are parcels: {bound:?}"
    );
    let mut wide = CoordinatorConfig::new(run(), layers(256), hyper());
    wide.replication = 8;
    let refused = check_round_messages(&wide).unwrap_err();
    assert_eq!(refused.field, "experts");
    assert!(refused.reason.contains("5633 shards"), "{}", refused.reason);
    assert!(
        refused.reason.contains("deltas can be"),
        "{}",
        refused.reason
    );
    // Within the protocol's counts but over a parcel: 3,960 experts, 30 verifiers a shard (a norm history of 4,
    // so that the call's norms stay within theirs), every judge on
    // the record of dissent. The bound's sizes refuse it.
    let mut heavy = CoordinatorConfig::new(run(), layers(180), hyper());
    heavy.judging.verifiers_per_shard = 30;
    heavy.norm_history = 4;
    heavy.standing.max_members = 64;
    let heavy_bound = round_message_bound(&heavy);
    assert!(
        heavy_bound.commit > mana_protocol::limits::MAX_PARCEL_MESSAGE_BYTES,
        "{heavy_bound:?}"
    );
    let refused = check_round_messages(&heavy).unwrap_err();
    assert!(
        refused.reason.contains("commit can reach"),
        "{}",
        refused.reason
    );
    let fits = check_round_messages(&CoordinatorConfig::new(run(), experts(), hyper())).unwrap();
    assert!(
        fits.commit <= mana_protocol::limits::MAX_MESSAGE_BYTES,
        "{fits:?}"
    );
}

/// Every call the coordinator makes names each shard's judges as the public draw (`check_call_judges`), so
/// its judges take it: with every participant in, with one dropped at the delta deadline, and with one that
/// left after sending all its deltas but before the call (its deltas leave the call with it).
#[test]
fn the_coordinators_calls_name_the_drawn_judges() {
    let everyone = |ann: &RoundAnnouncement| -> Vec<PublicKey> {
        ann.participants.iter().map(|p| p.node).collect()
    };
    let mut c = coordinator();
    let ann = start(&mut c, 6);
    send_all(&mut c, &ann, &everyone(&ann), 10);
    let call = called(&c.tick(20, 1).unwrap());
    // Two verifiers of each expert; every participant holds the trunk, so it has none.
    assert!(
        call.shards
            .iter()
            .all(|p| p.verifiers.len() == if p.shard == ShardId::Trunk { 0 } else { 2 })
    );
    check_call_judges(&ann, &call, &base_manifest()).unwrap();

    let mut c = coordinator();
    let ann = start(&mut c, 6);
    send_all(&mut c, &ann, &everyone(&ann)[1..], 10);
    let call = called(&c.tick(1_001, 1).unwrap());
    check_call_judges(&ann, &call, &base_manifest()).unwrap();

    let mut c = coordinator();
    let ann = start(&mut c, 6);
    let all = everyone(&ann);
    send_all(&mut c, &ann, &all, 10);
    c.node_left(&all[0]);
    let call = called(&c.tick(20, 1).unwrap());
    let gone = 0u32;
    assert!(
        call.shards
            .iter()
            .flat_map(|p| &p.deltas)
            .all(|d| d.sender != gone),
        "the deltas of a participant that left are not called"
    );
    assert!(
        call.shards
            .iter()
            .all(|p| !judges_of(&ann, p).contains(&all[0]))
    );
    check_call_judges(&ann, &call, &base_manifest()).unwrap();
}

/// A call whose judges are not the draw is found out, whichever way they were changed: a verifier of the
/// coordinator's choice, a holder left out, a rule other than the one the judges were drawn by, a sender that
/// is no participant. The order the call lists them in does not matter.
#[test]
fn a_call_whose_judges_are_not_the_draw_is_found_out() {
    let mut c = coordinator();
    let ann = start(&mut c, 6);
    let all: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &all, 10);
    let call = called(&c.tick(20, 1).unwrap());
    let not_drawn = |call: &AggregationCall| {
        matches!(
            check_call_judges(&ann, call, &base_manifest()),
            Err(DrawMismatch::NotDrawn { .. })
        )
    };

    let mut reordered = call.clone();
    for part in &mut reordered.shards {
        part.holders.reverse();
        part.verifiers.reverse();
    }
    check_call_judges(&ann, &reordered, &base_manifest()).unwrap();

    // A verifier swapped for a participant that was neither drawn nor holds the shard.
    let mut chosen = call.clone();
    let part = &mut chosen.shards[1];
    let outsider = (0..all.len() as u32)
        .find(|i| !part.holders.contains(i) && !part.verifiers.contains(i))
        .filter(|i| !ann.participants[*i as usize].shards.contains(&part.shard))
        .expect("a participant that neither holds nor verifies the shard");
    part.verifiers[0] = outsider;
    assert!(not_drawn(&chosen));

    let mut left_out = call.clone();
    left_out.shards[1].holders.pop();
    assert!(not_drawn(&left_out));

    let mut no_verifiers = call.clone();
    no_verifiers.judging.verifiers_per_shard = 0;
    assert!(not_drawn(&no_verifiers));

    let mut stranger = call.clone();
    stranger.shards[0].deltas[0].sender = all.len() as u32;
    assert_eq!(
        check_call_judges(&ann, &stranger, &base_manifest()),
        Err(DrawMismatch::NoParticipant(all.len() as u32))
    );
}

/// A shard that held in a round for want of a quorum is escalated in the next: its call names twice the
/// verifiers, the shards that moved keep the rule's two, and the judges' check agrees on the base checkpoint
/// (which shows the held shard did not move); on a base where it moved, the same call is not the draw.
#[test]
fn a_shard_held_for_want_of_a_quorum_gets_twice_the_verifiers_next_round() {
    let mut c = coordinator();
    let ann = start(&mut c, 7);
    let all: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &all, 10);
    let call = called(&c.tick(20, 1).unwrap());
    let held = call
        .shards
        .iter()
        .find(|p| p.shard != ShardId::Trunk)
        .unwrap()
        .shard;
    // Every shard's judges agree but the held one's, who sign nothing.
    attest_each(&mut c, &call, |part| {
        (part.shard != held).then(|| judgment(part, &part.shard.to_string()))
    });
    let commit = committed(&c.tick(2_006, 1).unwrap());
    assert!(
        commit
            .rejected
            .iter()
            .any(|r| r.shard == held && r.reason == RejectCode::Late)
    );
    let base = c.checkpoint().clone();
    assert_eq!(base.shard(&held), base_manifest().shard(&held));

    let (ann, actions) = round_to_call(&mut c, 3_000, &all);
    let call = called(&actions);
    assert_eq!(ann.base_checkpoint, base.hash().unwrap());
    for part in &call.shards {
        let expected = match part.shard {
            ShardId::Trunk => 0,
            s if s == held => 4,
            _ => 2,
        };
        assert_eq!(part.verifiers.len(), expected, "{}", part.shard);
        assert_eq!(escalated(&base, ann.round, &part.shard), part.shard == held);
    }
    check_call_judges(&ann, &call, &base).unwrap();
    let mut moved = base.clone();
    for e in &mut moved.shards {
        e.round = 1;
    }
    assert!(matches!(
        check_call_judges(&ann, &call, &moved),
        Err(DrawMismatch::NotDrawn { shard, .. }) if shard == held
    ));
}

/// A holder outvoted on its own expert loses it: the next round assigns the expert to another member, and
/// the outvoted holder keeps its other shards.
#[test]
fn a_holder_outvoted_on_its_own_shard_loses_it() {
    let mut c = coordinator();
    let ann = start(&mut c, 6);
    let all: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &all, 10);
    let call = called(&c.tick(20, 1).unwrap());
    let part = call
        .shards
        .iter()
        .find(|p| p.shard != ShardId::Trunk)
        .unwrap()
        .clone();
    let liar = judges_of(&ann, &part).holders[0];
    for p in &call.shards {
        let judges = judges_of(&ann, p);
        for k in judges.holders.iter().chain(&judges.verifiers) {
            let what = if p.shard == part.shard && *k == liar {
                "the liar's".to_string()
            } else {
                p.shard.to_string()
            };
            c.shard_attested(1, *k, &signed(&call, vec![judgment(p, &what)]))
                .unwrap();
        }
    }
    let commit = committed(&c.tick(2_006, 1).unwrap());
    assert!(
        commit
            .dissent
            .iter()
            .any(|d| d.shard == part.shard && d.dissenters == vec![liar])
    );
    let kept: Vec<ShardId> = ann
        .participant(&liar)
        .unwrap()
        .shards
        .iter()
        .copied()
        .filter(|s| *s != part.shard)
        .collect();
    let (next, _) = round_to_call(&mut c, 3_000, &all);
    let now = &next.participant(&liar).unwrap().shards;
    assert!(!now.contains(&part.shard), "{now:?}");
    assert!(kept.iter().all(|s| now.contains(s)), "{kept:?} {now:?}");
    let hosts = next
        .participants
        .iter()
        .filter(|p| p.shards.contains(&part.shard))
        .count();
    assert_eq!(hosts, 2, "the expert has its two holders again");
}

/// A state saved by a coordinator of protocol 10 (format 4: its call carried no judging rule) resumes: a
/// round in progress is abandoned, everything else is kept, the norm history included. The current format
/// keeps the bar on outvoted holders across a save.
#[test]
fn a_state_saved_before_the_call_carried_its_judging_rule_still_resumes() {
    let mut c = coordinator();
    let all = join(&mut c, 3);
    play_round(&mut c, 0, &all, |_| None);
    assert!(!c.norms.samples().is_empty());
    let (ann, actions) = round_to_call(&mut c, 1_000, &all);
    let call = called(&actions);
    let part = an_expert(&call).clone();
    let j = judges_of(&ann, &part);
    c.shard_attested(
        ann.round,
        j.holders[0],
        &signed(&call, vec![judged(&part, ann.round, "new", accept)]),
    )
    .unwrap();
    let restored = Coordinator::from_bytes(&legacy::encode_v4(&c)).unwrap();
    assert_eq!(
        restored,
        Coordinator {
            state: RunState::WaitingForMembers,
            ..c.clone()
        }
    );
    let mut resumed = restored.clone();
    let (next, actions) = round_to_call(&mut resumed, 5_000, &all);
    assert_eq!(next.round, ann.round + 1);
    assert!(!called(&actions).norms.is_empty(), "the history is kept");
    for state in [
        RunState::Cooldown { until_ms: 77 },
        RunState::WaitingForMembers,
    ] {
        let idle = Coordinator {
            state: state.clone(),
            ..c.clone()
        };
        let back = Coordinator::from_bytes(&legacy::encode_v4(&idle)).unwrap();
        assert_eq!(back.state(), &state);
    }
    let bytes = legacy::encode_v4(&c);
    assert!(Coordinator::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    // The bar survives a save in the current format.
    let mut barred = c.clone();
    barred.barred.insert(part.shard, vec![j.holders[0]]);
    assert_eq!(
        Coordinator::from_bytes(&barred.to_bytes().unwrap()).unwrap(),
        barred
    );
}

/// The assignment gives an expert back to a holder barred from it only when nobody else has room.
#[test]
fn a_barred_holder_gets_its_expert_back_only_when_nobody_else_has_room() {
    let cand = |n: u8, max_shards: u32| Candidate {
        node: key(n),
        capacity: Capacity {
            device: DeviceKind::Cpu,
            memory_bytes: 1 << 30,
            tokens_per_second: 1.0,
            max_shards,
        },
        reserved_slots: 0,
    };
    let expert = ShardId::Expert { layer: 1, index: 0 };
    let bar: ExpertHosts = [(expert, vec![key(1)])].into_iter().collect();
    for seed in 0..20 {
        // key(1) would win on load; barred, another takes it.
        let cands = [cand(1, 4), cand(2, 4), cand(3, 4)];
        let hosts = assign_experts(&cands, &[expert], 1, &ExpertHosts::new(), &bar, seed).unwrap();
        assert_ne!(hosts[&expert], vec![key(1)], "seed {seed}");
        // Nobody else has room: the barred holder keeps the expert hosted.
        let cands = [cand(1, 4), cand(2, 0), cand(3, 0)];
        let hosts = assign_experts(&cands, &[expert], 1, &ExpertHosts::new(), &bar, seed).unwrap();
        assert_eq!(hosts[&expert], vec![key(1)]);
    }
}
