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

#[test]
fn full_round_commits_and_round_trips_through_the_protocol() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(&mut c, &ann, &nodes, 10);
    let verify = c.tick(20, 12).unwrap();
    let [Action::Verify { round: 1, deltas }] = verify.as_slice() else {
        panic!("{verify:?}")
    };
    let first_bad = deltas[0].1.payload_hash;
    for (i, (n, d)) in deltas.iter().enumerate() {
        let v = if d.payload_hash == first_bad {
            Verdict::Reject(RejectCode::NormTooLarge)
        } else {
            Verdict::Accept
        };
        let score = DeltaScore {
            shard: d.shard,
            payload_hash: d.payload_hash,
            in_mean: 2,
            null_loss: 5.0,
            loss: 5.0 - i as f32 / 100.0,
        };
        c.delta_scored(1, *n, score).unwrap();
        // A score for a payload the node did not announce is refused.
        let other = DeltaScore {
            payload_hash: ContentHash::of(b"not announced"),
            ..score
        };
        assert!(c.delta_scored(1, *n, other).is_err());
        c.verification_verdict(1, d.shard, *n, d.payload_hash, v)
            .unwrap();
    }
    let seed = c.state().round().unwrap().score_seed();
    let agg = c.tick(30, 13).unwrap();
    let [Action::CallAggregation(call)] = agg.as_slice() else {
        panic!("{agg:?}")
    };
    assert_eq!(call.round, 1);
    Message::AggregationCall(call.clone()).check_limits().unwrap();
    for part in &call.shards {
        let a = &part.accepted;
        assert!(
            a.deltas.windows(2).all(|w| w[0] < w[1]),
            "aggregation order is by payload hash"
        );
    }
    attest_all(&mut c, call, |shard| ShardEntry {
        shard,
        hash: ContentHash::of(format!("new {shard}").as_bytes()),
        size: 9,
        round: 1,
    });
    let done = c.tick(40, 14).unwrap();
    let [Action::CommitRound(commit)] = done.as_slice() else {
        panic!("{done:?}")
    };
    assert_eq!(commit.round, 1);
    assert_eq!(
        crate::round::commit_score_seed(commit),
        seed,
        "the score seed is recomputed from the commit"
    );
    assert!(
        commit.reveals_seed_of(&ann),
        "the commit reveals the secret the announcement committed to"
    );
    assert_eq!(
        commit.scores.len(),
        deltas.len(),
        "every score is published"
    );
    assert!(
        commit
            .scores
            .windows(2)
            .all(|w| (w[0].shard, w[0].payload_hash) < (w[1].shard, w[1].payload_hash)),
        "scores sorted by shard and payload"
    );
    for a in &commit.accepted {
        assert_eq!(a.weights, vec![1; a.deltas.len()], "new members weigh 1");
    }
    assert_eq!(commit.rejected.len(), 1);
    assert_eq!(commit.rejected[0].reason, RejectCode::NormTooLarge);
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
    let after = c.tick(1_001, 1).unwrap();
    let [Action::Verify { deltas, .. }] = after.as_slice() else {
        panic!("{after:?}")
    };
    assert!(
        deltas.iter().all(|(n, _)| *n != late),
        "the late node's partial work is not verified"
    );
    let r = c.state().round().unwrap();
    assert!(r.dropped.contains(&late));
    // Its late delta is refused.
    let rest = late_p.shards[1];
    assert_eq!(
        c.delta_announced(1_002, late, delta(&ann, rest, late)),
        Err(EventError::Refused(RejectCode::StaleRound))
    );
    // Nobody verifies: at the commit deadline everything is refused as late and the round still commits.
    // With nothing accepted there is nothing to aggregate, so the commit follows in the same tick.
    let done = c.tick(2_002, 1).unwrap();
    let [
        Action::CallAggregation(call),
        Action::CommitRound(commit),
    ] = done.as_slice()
    else {
        panic!("{done:?}")
    };
    assert!(call.shards.is_empty() && commit.accepted.is_empty());
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
    // delivered, verification starts before the delta deadline.
    let actions = c.tick(600, 2).unwrap();
    assert!(
        matches!(actions.as_slice(), [Action::Verify { .. }]),
        "{actions:?}"
    );
    assert_eq!(c.members().len(), 2);
    assert!(c.state().round().unwrap().dropped.contains(&hosts[1]));
    let RunState::RoundVerify(r) = c.state().clone() else {
        panic!("{:?}", c.state())
    };
    assert!(r.deltas.keys().all(|(_, n)| stay.contains(n)));
    for ((shard, n), d) in &r.deltas {
        c.verification_verdict(1, *shard, *n, d.payload_hash, Verdict::Accept)
            .unwrap();
    }
    assert!(matches!(
        c.tick(700, 3).unwrap().as_slice(),
        [Action::CallAggregation(_)]
    ));
    // Nobody reports aggregation results: at the commit deadline the accepted deltas are listed as late.
    let done = c.tick(2_001, 3).unwrap();
    let [Action::CommitRound(commit)] = done.as_slice() else {
        panic!("{done:?}")
    };
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
    // Corrupted or truncated state is an error, not a panic.
    assert!(Coordinator::from_bytes(&saved[..saved.len() / 2]).is_err());
    assert!(Coordinator::from_bytes(&[0xff; 16]).is_err());
    let mut extra = saved.clone();
    extra.push(0);
    assert!(Coordinator::from_bytes(&extra).is_err());
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

#[test]
fn a_copied_payload_hash_never_changes_the_verdict_on_the_original() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    let (victim, thief) = (nodes[0], nodes[1]);
    // The thief announces the victim's trunk payload as its own trunk delta, before the victim does.
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
    assert!(matches!(
        c.tick(20, 1).unwrap().as_slice(),
        [Action::Verify { .. }]
    ));
    // The thief's verdict comes first; it is its own, not the victim's.
    c.verification_verdict(
        1,
        ShardId::Trunk,
        thief,
        stolen.payload_hash,
        Verdict::Reject(RejectCode::NotBound),
    )
    .unwrap();
    let RunState::RoundVerify(r) = c.state().clone() else {
        panic!("{:?}", c.state())
    };
    for ((shard, n), d) in &r.deltas {
        if (*shard, *n) != (ShardId::Trunk, thief) {
            c.verification_verdict(1, *shard, *n, d.payload_hash, Verdict::Accept)
                .unwrap();
        }
    }
    // A verdict for a (shard, node) whose payload is another never lands.
    assert!(
        c.verification_verdict(
            1,
            ShardId::Trunk,
            nodes[2],
            stolen.payload_hash,
            Verdict::Accept
        )
        .is_err()
    );
    let agg = c.tick(30, 2).unwrap();
    let [Action::CallAggregation(call)] = agg.as_slice() else {
        panic!("{agg:?}")
    };
    let trunk = &call.shard(&ShardId::Trunk).unwrap().accepted;
    assert_eq!(
        trunk
            .deltas
            .iter()
            .filter(|h| **h == stolen.payload_hash)
            .count(),
        1,
        "the victim's delta counts once"
    );
    assert_eq!(
        trunk.deltas.len(),
        2,
        "the victim's and the third node's trunk deltas"
    );
}

#[test]
fn one_payload_accepted_twice_counts_once() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    let copy = delta(&ann, ShardId::Trunk, nodes[0]);
    for p in &ann.participants {
        for s in &p.shards {
            let d = if *s == ShardId::Trunk && p.node == nodes[1] {
                copy.clone()
            } else {
                delta(&ann, *s, p.node)
            };
            c.delta_announced(10, p.node, d).unwrap();
        }
    }
    c.tick(20, 1).unwrap();
    let RunState::RoundVerify(r) = c.state().clone() else {
        panic!("{:?}", c.state())
    };
    // A careless verifier accepts both copies: the second is refused by the state machine.
    for ((shard, n), d) in &r.deltas {
        c.verification_verdict(1, *shard, *n, d.payload_hash, Verdict::Accept)
            .unwrap();
    }
    let RunState::RoundVerify(r) = c.state().clone() else {
        panic!("{:?}", c.state())
    };
    let refused = r
        .verdicts
        .values()
        .filter(|v| **v == Verdict::Reject(RejectCode::NotBound))
        .count();
    assert_eq!(refused, 1);
    let agg = c.tick(30, 2).unwrap();
    let [Action::CallAggregation(call)] = agg.as_slice() else {
        panic!("{agg:?}")
    };
    let trunk = &call.shard(&ShardId::Trunk).unwrap().accepted;
    assert!(
        trunk.deltas.windows(2).all(|w| w[0] < w[1]),
        "no payload twice: {:?}",
        trunk.deltas
    );
}

/// Every judge of every shard in `call` signs `result(shard)`; each result that reaches a quorum is taken
/// (as the daemon does once it holds the blob).
fn attest_all(c: &mut Coordinator, call: &AggregationCall, result: impl Fn(ShardId) -> ShardEntry) {
    let ann = c.state().round().unwrap().announcement.clone();
    let id = call.hash().unwrap();
    for part in &call.shards {
        let shard = part.accepted.shard;
        let judges = judges_of(&ann, part);
        for judge in judges.holders.iter().chain(&judges.verifiers) {
            let att = ShardAttestation {
                run: call.run.clone(),
                round: call.round,
                call: id,
                results: vec![result(shard)],
            };
            for ready in c.shard_attested(call.round, *judge, &att).unwrap() {
                c.shard_aggregated(call.round, ready).unwrap();
            }
        }
    }
}

/// Plays one whole round at `t`: every participant in `senders` sends all its deltas; `judge` gives each
/// delta's verdict; every accepted shard is aggregated. Returns the commit.
fn play_round(
    c: &mut Coordinator,
    t: u64,
    senders: &[PublicKey],
    judge: impl Fn(&PublicKey) -> Verdict,
) -> RoundCommit {
    for n in c.members().keys().copied().collect::<Vec<_>>() {
        let seq = c.members()[&n].last_seq + 1;
        let _ = c.node_heartbeat(t, n, own_ip(&n), &heartbeat(seq, 100.0));
    }
    let ann = announced(&c.tick(t, t).unwrap());
    send_all(c, &ann, senders, t + 10);
    let verify = c.tick(t + 20, t).unwrap();
    let [Action::Verify { deltas, .. }] = verify.as_slice() else {
        panic!("{verify:?}")
    };
    for (n, d) in deltas {
        c.verification_verdict(ann.round, d.shard, *n, d.payload_hash, judge(n))
            .unwrap();
    }
    let mut actions = c.tick(t + 30, t).unwrap();
    if let [Action::CallAggregation(call)] = actions.as_slice() {
        let call = call.clone();
        attest_all(c, &call, |shard| ShardEntry {
            shard,
            hash: ContentHash::of(format!("{} {}", shard, ann.round).as_bytes()),
            size: 9,
            round: ann.round,
        });
        actions = c.tick(t + 40, t).unwrap();
    }
    let Some(Action::CommitRound(commit)) = actions.last() else {
        panic!("{actions:?}")
    };
    commit.clone()
}

#[test]
fn a_member_refused_again_and_again_is_banned_and_stays_out() {
    let mut c = coordinator();
    let all = join(&mut c, 4);
    let judge = |n: &PublicKey| {
        if *n == key(4) {
            Verdict::Reject(RejectCode::LowScore)
        } else {
            Verdict::Accept
        }
    };
    let mut t = 0;
    while c.members().contains_key(&key(4)) {
        play_round(&mut c, t, &all, judge);
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
    let accept = |_: &PublicKey| Verdict::Accept;
    let first = play_round(&mut c, 0, &all, accept);
    for a in &first.accepted {
        assert_eq!(
            a.weights,
            vec![1; a.deltas.len()],
            "no record yet: weight 1"
        );
    }
    let mut t = 1_000;
    for _ in 0..12 {
        play_round(&mut c, t, &all, accept);
        t += 1_000;
    }
    // A newcomer joins a run whose members have a record.
    let newcomer = key(9);
    c.node_heartbeat(t, newcomer, own_ip(&newcomer), &heartbeat(1, 1e9))
        .unwrap();
    let mut with_new = all.clone();
    with_new.push(newcomer);
    let commit = play_round(&mut c, t, &with_new, accept);
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
        play_round(&mut c, t, &veterans, |_| Verdict::Accept);
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

/// A round of 3 members up to its call for results, every delta accepted.
fn called_round(c: &mut Coordinator) -> (RoundAnnouncement, AggregationCall) {
    let ann = start(c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    send_all(c, &ann, &nodes, 10);
    let verify = c.tick(20, 12).unwrap();
    let [Action::Verify { deltas, .. }] = verify.as_slice() else {
        panic!("{verify:?}")
    };
    for (n, d) in deltas.clone() {
        c.verification_verdict(1, d.shard, n, d.payload_hash, Verdict::Accept)
            .unwrap();
    }
    let agg = c.tick(30, 13).unwrap();
    let [Action::CallAggregation(call)] = agg.as_slice() else {
        panic!("{agg:?}")
    };
    (ann, call.clone())
}

/// The call's part about an expert (held by two of the three members, so judged by them and the third).
fn an_expert(call: &AggregationCall) -> &ShardCall {
    call.shards
        .iter()
        .find(|p| p.accepted.shard != ShardId::Trunk)
        .unwrap()
}

fn entry(shard: ShardId, what: &str) -> ShardEntry {
    ShardEntry {
        shard,
        hash: ContentHash::of(what.as_bytes()),
        size: 9,
        round: 1,
    }
}

fn signed(call: &AggregationCall, results: Vec<ShardEntry>) -> ShardAttestation {
    ShardAttestation {
        run: call.run.clone(),
        round: call.round,
        call: call.hash().unwrap(),
        results,
    }
}

#[test]
fn every_shard_is_judged_by_its_holders_and_a_verifier_drawn_from_the_others() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    assert!(!call.shards.is_empty());
    assert_eq!(call.base_checkpoint, ann.base_checkpoint);
    for part in &call.shards {
        let shard = part.accepted.shard;
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
    let shard = part.accepted.shard;
    let judges = judges_of(&ann, part);
    assert_eq!((judges.holders.len(), judges.verifiers.len()), (2, 1));
    let (liar, honest, verifier) = (judges.holders[0], judges.holders[1], judges.verifiers[0]);
    let good = entry(shard, "the honest result");
    // Nobody outside the shard's judges counts, nor a result for another call.
    let outsider = key(99);
    assert_eq!(
        c.shard_attested(1, outsider, &signed(&call, vec![good])),
        Err(EventError::Refused(RejectCode::ShardNotAssigned))
    );
    let other_call = ShardAttestation {
        call: ContentHash::of(b"another call"),
        ..signed(&call, vec![good])
    };
    assert_eq!(
        c.shard_attested(1, honest, &other_call),
        Err(EventError::Refused(RejectCode::Inconsistent))
    );
    // A holder signs a wrong hash: no quorum yet, and the wrong result cannot be taken.
    let wrong = entry(shard, "a wrong result");
    assert_eq!(
        c.shard_attested(1, liar, &signed(&call, vec![wrong])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_aggregated(1, wrong),
        Err(EventError::Refused(RejectCode::Inconsistent))
    );
    // The other holder and the verifier sign the honest result: it has its quorum.
    assert_eq!(
        c.shard_attested(1, honest, &signed(&call, vec![good])),
        Ok(vec![])
    );
    assert_eq!(
        c.shard_attested(1, verifier, &signed(&call, vec![good])),
        Ok(vec![good])
    );
    // A judge's second, different result for the shard does not replace its first.
    assert_eq!(
        c.shard_attested(1, liar, &signed(&call, vec![good])),
        Ok(vec![good])
    );
    c.shard_aggregated(1, good).unwrap();
    // The other shards' judges all sign; the round commits the quorum's result.
    attest_all(&mut c, &call, |s| entry(s, &format!("new {s}")));
    let faults_before = c.standings().get(&liar).faults;
    let done = c.tick(40, 14).unwrap();
    let [Action::CommitRound(commit)] = done.as_slice() else {
        panic!("{done:?}")
    };
    assert_eq!(commit.checkpoint.shard(&shard), Some(&good));
    assert!(commit.accepted.iter().any(|a| a.shard == shard));
    assert_eq!(c.standings().get(&liar).faults, faults_before + 1);
    assert_eq!(c.standings().get(&honest).faults, 0);
}

#[test]
fn colluding_holders_without_a_verifier_get_no_quorum_and_the_shard_holds() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let shard = part.accepted.shard;
    let judges = judges_of(&ann, part);
    let wrong = entry(shard, "what the colluders agree on");
    // Both holders sign the same wrong result: two of three judges, but no verifier among them.
    for h in &judges.holders {
        assert_eq!(c.shard_attested(1, *h, &signed(&call, vec![wrong])), Ok(vec![]));
    }
    // The verifier signs the honest one: one signature, no quorum either.
    assert_eq!(
        c.shard_attested(
            1,
            judges.verifiers[0],
            &signed(&call, vec![entry(shard, "honest")])
        ),
        Ok(vec![])
    );
    // Every other shard is settled; this one keeps its state at the deadline and its deltas are late.
    for other in call.shards.iter().filter(|p| p.accepted.shard != shard) {
        let s = other.accepted.shard;
        let j = judges_of(&ann, other);
        for k in j.holders.iter().chain(&j.verifiers) {
            for ready in c.shard_attested(1, *k, &signed(&call, vec![entry(s, "fine")])).unwrap() {
                c.shard_aggregated(1, ready).unwrap();
            }
        }
    }
    assert!(
        matches!(c.tick(40, 14).unwrap().as_slice(), []),
        "the round waits for the shard until the commit deadline"
    );
    let done = c.tick(ann.deadlines.commit_by_ms + 1, 14).unwrap();
    let [Action::CommitRound(commit)] = done.as_slice() else {
        panic!("{done:?}")
    };
    let base = base_manifest();
    assert_eq!(commit.checkpoint.shard(&shard).map(|e| e.hash), base.shard(&shard).map(|e| e.hash));
    assert!(commit.accepted.iter().all(|a| a.shard != shard));
    assert!(
        commit
            .rejected
            .iter()
            .filter(|r| r.shard == shard)
            .all(|r| r.reason == RejectCode::Late)
    );
}

#[test]
fn a_judge_that_never_answers_leaves_the_quorum_to_the_others() {
    let mut c = coordinator();
    let (ann, call) = called_round(&mut c);
    let part = an_expert(&call);
    let shard = part.accepted.shard;
    let judges = judges_of(&ann, part);
    // One holder died after training: the other holder and the verifier carry the shard.
    let good = entry(shard, "honest");
    assert_eq!(c.shard_attested(1, judges.holders[1], &signed(&call, vec![good])), Ok(vec![]));
    assert_eq!(
        c.shard_attested(1, judges.verifiers[0], &signed(&call, vec![good])),
        Ok(vec![good])
    );
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
fn a_participant_dropped_from_the_round_judges_nothing() {
    let mut c = coordinator();
    let ann = start(&mut c, 3);
    let nodes: Vec<PublicKey> = ann.participants.iter().map(|p| p.node).collect();
    // The third participant sends nothing: dropped at the delta deadline.
    send_all(&mut c, &ann, &nodes[..2], 10);
    let verify = c.tick(ann.deadlines.deltas_by_ms + 1, 12).unwrap();
    let [Action::Verify { deltas, .. }] = verify.as_slice() else {
        panic!("{verify:?}")
    };
    for (n, d) in deltas.clone() {
        c.verification_verdict(1, d.shard, n, d.payload_hash, Verdict::Accept)
            .unwrap();
    }
    let agg = c.tick(ann.deadlines.deltas_by_ms + 2, 13).unwrap();
    let [Action::CallAggregation(call)] = agg.as_slice() else {
        panic!("{agg:?}")
    };
    assert!(!call.shards.is_empty());
    for part in &call.shards {
        assert!(!judges_of(&ann, part).contains(&nodes[2]), "{part:?}");
    }
}
