//! How the coordinator's state machine scales with members: one whole round (members join, a round is
//! announced, every participant announces a delta per shard, the call for judgments, the judges' attestations
//! with a verdict and a score per delta, the commit), driven
//! with simulated members over the shard list of a 1B-parameter preset (24 layers, 64 experts in each of the
//! 22 MoE layers: 1,408 experts and the trunk), at several member counts. Prints, per count: the time of each
//! step (events fed, ticks), the saved state's size at each phase, and the announcement's and commit's
//! encoded sizes against the gossip envelope limit.
//!
//! `cargo bench -p mana-engine --bench coordinator_scale` (add `-- 1000 5000` for other counts, `rounds=N`
//! for N rounds each: the call carries the norm history, which fills over the first rounds). Figures are
//! printed, not asserted; the growth from one count to the next is what to read (time and bytes per member).

use std::net::IpAddr;
use std::time::Instant;

use mana_engine::coordinator::{
    Action, Coordinator, CoordinatorConfig, Origin, judges_of, round_message_bound,
};
use mana_protocol::{
    Capacity, CheckpointManifest, CodecOptions, ContentHash, DeltaAnnouncement, DeltaScore,
    DeltaVerdict, DeviceKind, Heartbeat, HyperParams, Message, PublicKey, RunId, ShardAttestation,
    ShardEntry, ShardId, ShardJudgment, Text, TrainingStats, UpdateRule,
};

/// The 1B preset's MoE layout: 24 blocks, the first two dense, 64 routed experts in each of the others
/// (d_model 1024, expert hidden 512: 3 x 1024 x 512 = 1.57M parameters an expert, 1.4B in experts).
const LAYERS: u16 = 24;
const DENSE_LAYERS: u16 = 2;
const EXPERTS_PER_LAYER: u16 = 64;

fn experts() -> Vec<ShardId> {
    (DENSE_LAYERS..LAYERS)
        .flat_map(|layer| (0..EXPERTS_PER_LAYER).map(move |index| ShardId::Expert { layer, index }))
        .collect()
}

fn key(i: u32) -> PublicKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[4] = 0xAB;
    PublicKey(k)
}

/// An address of its own per member (10.x.y.z), so the per-IP cap admits everyone.
fn origin(i: u32) -> Origin {
    let b = (i + 1).to_be_bytes();
    Origin::Ip(IpAddr::from([10, b[1], b[2], b[3]]))
}

fn run() -> RunId {
    RunId::new("scale").expect("a valid run id")
}

fn manifest(experts: &[ShardId]) -> CheckpointManifest {
    let mut shards: Vec<ShardEntry> = std::iter::once(ShardId::Trunk)
        .chain(experts.iter().copied())
        .map(|shard| ShardEntry {
            shard,
            hash: ContentHash::of(shard.to_string().as_bytes()),
            size: 6_291_456,
            round: 0,
        })
        .collect();
    shards.sort_by_key(|e| e.shard);
    CheckpointManifest {
        run: run(),
        round: 0,
        shards,
    }
}

fn hyper() -> HyperParams {
    HyperParams {
        update_rule: UpdateRule::Diloco,
        inner_lr: 1e-3,
        weight_decay: 0.1,
        outer_lr: 0.7,
        outer_momentum: 0.9,
        batch_tokens: 4096,
        seq_len: 256,
        codec: CodecOptions::default(),
        router_bias_gamma: 0.001,
    }
}

fn encoded_len(message: Message) -> usize {
    mana_protocol::wire::encode::<_, { usize::MAX }>(&message, "message")
        .map(|b| b.len())
        .unwrap_or(0)
}

/// Times `f` in milliseconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64() * 1e3)
}

fn state_kib(c: &Coordinator) -> f64 {
    c.to_bytes().map(|b| b.len()).unwrap_or(0) as f64 / 1024.0
}

fn rounds(members: u32, rounds: u32) {
    let experts = experts();
    let mut cfg = CoordinatorConfig::new(run(), experts.clone(), hyper());
    cfg.standing.max_members = members as usize + 1;
    cfg.min_members = 2;
    let bound = round_message_bound(&cfg);
    println!(
        "{members:>6} members: the largest announcement {} KiB, call {} KiB, commit {} KiB a round of these \
         settings can produce (gossiped whole up to {} KiB, as parcels over it; a coordinator refuses to run \
         them over {} KiB)",
        bound.announcement / 1024,
        bound.call / 1024,
        bound.commit / 1024,
        mana_protocol::limits::MAX_MESSAGE_BYTES / 1024,
        mana_protocol::limits::MAX_PARCEL_MESSAGE_BYTES / 1024,
    );
    let mut c = Coordinator::new(cfg, manifest(&experts)).expect("a valid coordinator");
    let capacity = Capacity {
        device: DeviceKind::Cpu,
        memory_bytes: 8 << 30,
        tokens_per_second: 1000.0,
        max_shards: 4,
    };
    let mut now = 1_000_000u64;
    let heartbeats = |c: &mut Coordinator, now: u64, seq: u64| {
        for i in 0..members {
            let hb = Heartbeat {
                run: run(),
                seq,
                hosted: vec![],
                capacity,
                software_version: Text::new("bench").expect("a short text"),
            };
            c.node_heartbeat(now, key(i), origin(i), &hb)
                .expect("admitted");
        }
    };
    let (_, join_ms) = timed(|| heartbeats(&mut c, now, 1));
    let joined_kib = state_kib(&c);
    for round in 1..=rounds {
        if round > 1 {
            // The next round: every member heard from again, the clock past the cooldown.
            now += 60_000;
            heartbeats(&mut c, now, u64::from(round));
        }
        now += 1;
        let (actions, announce_ms) = timed(|| c.tick(now, 7).expect("tick"));
        let Some(Action::AnnounceRound(ann)) = actions
            .into_iter()
            .find(|a| matches!(a, Action::AnnounceRound(_)))
        else {
            println!("{members:>6} members, round {round}: no round started");
            return;
        };
        let ann_bytes = encoded_len(Message::RoundAnnouncement(ann.clone()));
        let announced_kib = state_kib(&c);
        let stats = TrainingStats {
            tokens: 4096,
            loss_before: 3.0,
            loss_after: 2.9,
            delta_norm: 1.0,
        };
        let mut deltas = Vec::new();
        for p in &ann.participants {
            for shard in &p.shards {
                let mut h = p.node.0.to_vec();
                h.extend_from_slice(shard.to_string().as_bytes());
                deltas.push((
                    p.node,
                    DeltaAnnouncement {
                        run: run(),
                        round: ann.round,
                        shard: *shard,
                        base_checkpoint: ann.base_checkpoint,
                        payload_hash: ContentHash::of(&h),
                        payload_size: 1 << 20,
                        stats,
                    },
                ));
            }
        }
        now += 1;
        let (_, deltas_ms) = timed(|| {
            for (node, d) in &deltas {
                c.delta_announced(now, *node, d.clone())
                    .expect("a valid delta");
            }
        });
        let trained_kib = state_kib(&c);
        // Every delta is in: the same tick seals the round and calls for judgments.
        let (actions, call_ms) = timed(|| c.tick(now, 8));
        let actions = match actions {
            Ok(actions) => actions,
            Err(e) => {
                println!("{members:>6} members, round {round}: no call ({e}), as the bound said");
                return;
            }
        };
        let Some(Action::CallAggregation(call)) = actions.into_iter().next() else {
            panic!("a call for judgments expected");
        };
        let called_kib = state_kib(&c);
        let call_bytes = encoded_len(Message::AggregationCall(call.clone()));
        let call_norms = call.norms.len();
        let call_id = call.hash().expect("call id");
        // What every judge of a shard signs: a verdict and a score per delta (the default rule scores every
        // delta) and the new state. Built before the clock starts: the judges' work, not the coordinator's.
        let judgments: Vec<ShardJudgment> = call
            .shards
            .iter()
            .map(|part| ShardJudgment {
                entry: ShardEntry {
                    shard: part.shard,
                    hash: ContentHash::of(&[1]),
                    size: 6_291_456,
                    round: ann.round,
                },
                verdicts: part
                    .deltas
                    .iter()
                    .map(|_| DeltaVerdict::Accept { norm: 1.0 })
                    .collect(),
                scores: part
                    .deltas
                    .iter()
                    .map(|d| DeltaScore {
                        shard: part.shard,
                        payload_hash: d.payload_hash,
                        in_mean: part.deltas.len() as u32,
                        null_loss: 3.0,
                        loss: 2.9,
                    })
                    .collect(),
            })
            .collect();
        // Every judge of every shard signs its judgment (one attestation per judge and shard: the most messages
        // the coordinator takes), and each result is taken once it has its quorum.
        let (attestations, results_ms) = timed(|| {
            let mut n = 0u64;
            for (part, judgment) in call.shards.iter().zip(&judgments) {
                let judges = judges_of(&ann, part);
                for judge in judges.holders.iter().chain(&judges.verifiers) {
                    let att = ShardAttestation {
                        run: call.run.clone(),
                        round: ann.round,
                        call: call_id,
                        results: vec![judgment.clone()],
                    };
                    n += 1;
                    c.shard_attested(ann.round, *judge, &att)
                        .expect("an attestation");
                }
            }
            n
        });
        let attested_kib = state_kib(&c);
        let (actions, commit_ms) = timed(|| c.tick(now, 10));
        let actions = match actions {
            Ok(actions) => actions,
            Err(e) => {
                println!("{members:>6} members, round {round}: no commit ({e}), as the bound said");
                return;
            }
        };
        let Some(Action::CommitRound(commit)) = actions.into_iter().next() else {
            panic!("a commit expected");
        };
        assert!(
            commit.rejected.is_empty() && commit.accepted.len() == call.shards.len(),
            "every shard reaches its quorum and takes every delta"
        );
        let commit_bytes = encoded_len(Message::RoundCommit(commit));
        let committed_kib = state_kib(&c);
        let limit = mana_protocol::limits::MAX_MESSAGE_BYTES;
        println!(
            "{members:>6} members, round {round}, {:>5} participants, {:>6} deltas | ms: join {join_ms:>8.1}, announce {announce_ms:>8.1}, \
         deltas {deltas_ms:>8.1}, call {call_ms:>8.1}, {attestations} attestations {results_ms:>6.1}, commit \
         {commit_ms:>8.1} | state KiB: joined {joined_kib:>8.1}, announced {announced_kib:>8.1}, trained \
         {trained_kib:>8.1}, called {called_kib:>8.1}, attested {attested_kib:>8.1}, committed {committed_kib:>8.1} | \
         announcement {:.0} KiB, call {:.0} KiB ({call_norms} norms of the history), commit {:.0} KiB \
         (a parcel over {:.0} KiB)",
            ann.participants.len(),
            deltas.len(),
            ann_bytes as f64 / 1024.0,
            call_bytes as f64 / 1024.0,
            commit_bytes as f64 / 1024.0,
            limit as f64 / 1024.0,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is a member count.
    let counts: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // `rounds=N` runs N rounds per count (the call's norm history grows over the first rounds).
    let rounds_asked: u32 = std::env::args()
        .find_map(|a| a.strip_prefix("rounds=").and_then(|n| n.parse().ok()))
        .unwrap_or(1);
    let counts = if counts.is_empty() {
        vec![1_000, 2_500, 5_000, 10_000]
    } else {
        counts
    };
    println!(
        "coordinator state machine, 1B preset shard list: {} experts and the trunk, replication 2",
        experts().len()
    );
    for n in counts {
        rounds(n, rounds_asked);
    }
}
