//! Fixed sample messages and keys shared by the integration tests (and the test vectors): everything is
//! built from constant seeds, so the bytes never change unless the format does.
#![allow(dead_code, clippy::unwrap_used)]

use mana_protocol::*;

/// The coordinator's key in every fixture.
pub fn coordinator() -> Keypair {
    Keypair::from_seed(&[0x11; 32])
}

/// A node's key in every fixture.
pub fn node() -> Keypair {
    Keypair::from_seed(&[0x22; 32])
}

/// Another node, which takes no part in the sample round.
pub fn outsider() -> Keypair {
    Keypair::from_seed(&[0x33; 32])
}

/// The run of every fixture.
pub fn run() -> RunId {
    RunId::new("demo-run").unwrap()
}

/// Time of the sample round's start, unix ms.
pub const T0: u64 = 1_800_000_000_000;

pub fn manifest(round: u64) -> CheckpointManifest {
    CheckpointManifest {
        run: run(),
        round,
        shards: vec![
            ShardEntry {
                shard: ShardId::Trunk,
                hash: ContentHash::of(b"trunk"),
                size: 1 << 20,
                round,
            },
            ShardEntry {
                shard: ShardId::expert(1, 0).unwrap(),
                hash: ContentHash::of(b"e1.0"),
                size: 4096,
                round: round.saturating_sub(1),
            },
            ShardEntry {
                shard: ShardId::expert(1, 1).unwrap(),
                hash: ContentHash::of(b"e1.1"),
                size: 4096,
                round,
            },
        ],
    }
}

pub fn round_announcement() -> RoundAnnouncement {
    RoundAnnouncement {
        run: run(),
        round: 7,
        base_checkpoint: manifest(6).hash().unwrap(),
        participants: vec![
            Participant {
                node: node().public(),
                shards: vec![ShardId::Trunk, ShardId::expert(1, 0).unwrap()],
                data_seeds: vec![1, 2],
            },
            Participant {
                node: coordinator().public(),
                shards: vec![ShardId::expert(1, 1).unwrap()],
                data_seeds: vec![3],
            },
        ],
        inner_steps: 100,
        hyper: HyperParams {
            update_rule: UpdateRule::Diloco,
            inner_lr: 3e-4,
            weight_decay: 0.1,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            batch_tokens: 8192,
            seq_len: 1024,
            codec: CodecOptions {
                block_size: 128,
                scale: ScaleFormat::F32,
                top_k_density: Some(0.02),
                values: ValueFormat::Fp8,
                top_k_per_block: false,
            },
            router_bias_gamma: 0.001,
        },
        max_norm_ratio: 3.0,
        deadlines: Deadlines {
            deltas_by_ms: T0 + 600_000,
            commit_by_ms: T0 + 660_000,
        },
        corpus: ContentHash([0; 32]),
        seed_commitment: seed_commitment(&SEED_SECRET),
    }
}

/// The seed secret of round 7 in the fixtures.
pub const SEED_SECRET: [u8; 32] = [7; 32];

pub fn delta_announcement() -> DeltaAnnouncement {
    let payload = sample_payload();
    DeltaAnnouncement {
        run: run(),
        round: 7,
        shard: ShardId::expert(1, 0).unwrap(),
        base_checkpoint: manifest(6).hash().unwrap(),
        payload_hash: ContentHash::of(&payload),
        payload_size: payload.len() as u64,
        stats: TrainingStats {
            tokens: 819_200,
            loss_before: 3.25,
            loss_after: 3.125,
            delta_norm: 0.5,
        },
    }
}

/// The delta sent in the fixtures: 300 values of a fixed pattern, dense FP8.
pub fn sample_delta() -> Vec<f32> {
    (0..300).map(|i| ((i as f32) * 0.37).sin() * 0.01).collect()
}

pub fn sample_payload() -> Vec<u8> {
    encode_delta(&sample_delta(), &CodecOptions::default()).unwrap()
}

pub fn round_commit() -> RoundCommit {
    RoundCommit {
        run: run(),
        round: 7,
        accepted: vec![AcceptedDeltas {
            shard: ShardId::expert(1, 0).unwrap(),
            deltas: vec![ContentHash::of(&sample_payload())],
            weights: vec![3],
            norms: vec![0.0725],
        }],
        rejected: vec![RejectedDelta {
            shard: ShardId::Trunk,
            node: outsider().public(),
            payload_hash: ContentHash::of(b"bad"),
            reason: RejectCode::NotParticipant,
        }],
        checkpoint: manifest(7),
        scores: vec![DeltaScore {
            shard: ShardId::expert(1, 0).unwrap(),
            payload_hash: ContentHash::of(&sample_payload()),
            in_mean: 1,
            null_loss: 5.25,
            loss: 5.125,
        }],
        seed_secret: SEED_SECRET,
        dissent: vec![ShardDissent {
            shard: ShardId::expert(1, 0).unwrap(),
            dissenters: vec![outsider().public()],
            absent: Vec::new(),
        }],
    }
}

/// A mirror's evaluation of round 7's checkpoint.
pub fn evaluation() -> Evaluation {
    Evaluation {
        run: run(),
        round: 7,
        checkpoint: manifest(7).hash().unwrap(),
        batches: 4,
        val_loss: 3.25,
    }
}

/// The coordinator's end of the run after round 7.
pub fn run_end() -> RunEnd {
    RunEnd {
        run: run(),
        round: 7,
        checkpoint: manifest(7).hash().unwrap(),
    }
}

/// A holder's dispute of [`round_commit`] for its expert: the accepted payload gives another hash.
pub fn commit_dispute() -> CommitDispute {
    let commit = round_commit();
    let shard = ShardId::expert(1, 0).unwrap();
    CommitDispute {
        run: run(),
        round: 7,
        commit: commit.hash().unwrap(),
        shard,
        base: manifest(6).shard(&shard).unwrap().hash,
        committed: commit.checkpoint.shard(&shard).unwrap().hash,
        accepted: vec![ContentHash::of(&sample_payload())],
        computed: ContentHash::of(b"what the holder computed"),
    }
}

/// The coordinator's call for round 7's judgments: one expert with two deltas (participants 0 and 3), two
/// holders and a verifier (participant indices), and a norm of the history.
pub fn aggregation_call() -> AggregationCall {
    let shard = ShardId::expert(1, 0).unwrap();
    let mut deltas = vec![
        CalledDelta {
            sender: 0,
            payload_hash: ContentHash::of(&sample_payload()),
            payload_size: sample_payload().len() as u64,
            weight: 3,
        },
        CalledDelta {
            sender: 3,
            payload_hash: ContentHash::of(b"another payload"),
            payload_size: 15,
            weight: 1,
        },
    ];
    deltas.sort_by_key(|d| (d.payload_hash, d.sender));
    AggregationCall {
        run: run(),
        round: 7,
        base_checkpoint: manifest(6).hash().unwrap(),
        seed_secret: [7; 32],
        rule: VerdictRule {
            min_norm_ratio: 0.01,
            score_share: 1.0,
            trunk_min_gain: 0.0,
            trunk_share: 0.15,
            expert_tolerance: 0.05,
        },
        judging: mana_protocol::JudgingRule::default(),
        norm_history: 8,
        norms: vec![NormRecord {
            shard,
            sender: Some(1),
            norm: 0.07,
        }],
        shards: vec![ShardCall {
            shard,
            deltas,
            holders: vec![0, 2],
            verifiers: vec![1],
        }],
    }
}

/// A judge's answer to [`aggregation_call`]: the first delta accepted, the second refused as low-score (both
/// scored), and the expert's new entry in round 7's manifest.
pub fn shard_attestation() -> ShardAttestation {
    let shard = ShardId::expert(1, 0).unwrap();
    let call = aggregation_call();
    let scores = call.shards[0]
        .deltas
        .iter()
        .enumerate()
        .map(|(i, d)| DeltaScore {
            shard,
            payload_hash: d.payload_hash,
            in_mean: 2,
            null_loss: 3.5,
            loss: 3.4 + i as f32 * 0.2,
        })
        .collect();
    ShardAttestation {
        run: run(),
        round: 7,
        call: call.hash().unwrap(),
        results: vec![ShardJudgment {
            entry: *manifest(7).shard(&shard).unwrap(),
            verdicts: vec![
                DeltaVerdict::Accept { norm: 0.0725 },
                DeltaVerdict::Refuse(RejectCode::LowScore),
            ],
            scores,
        }],
    }
}

pub fn heartbeat() -> Heartbeat {
    Heartbeat {
        run: run(),
        seq: 42,
        hosted: vec![ShardId::Trunk, ShardId::expert(1, 0).unwrap()],
        capacity: Capacity {
            device: DeviceKind::Cuda,
            memory_bytes: 80 << 30,
            tokens_per_second: 12_500.0,
            max_shards: 16,
        },
        software_version: Text::new("mana 0.1.0").unwrap(),
    }
}

/// One of each message type, with a name.
pub fn all_messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "round_announcement",
            Message::RoundAnnouncement(round_announcement()),
        ),
        (
            "delta_announcement",
            Message::DeltaAnnouncement(delta_announcement()),
        ),
        ("round_commit", Message::RoundCommit(round_commit())),
        (
            "checkpoint_manifest",
            Message::CheckpointManifest(manifest(7)),
        ),
        ("heartbeat", Message::Heartbeat(heartbeat())),
        ("commit_dispute", Message::CommitDispute(commit_dispute())),
        ("run_end", Message::RunEnd(run_end())),
        ("evaluation", Message::Evaluation(evaluation())),
        (
            "aggregation_call",
            Message::AggregationCall(aggregation_call()),
        ),
        (
            "shard_attestation",
            Message::ShardAttestation(shard_attestation()),
        ),
        ("parcel", Message::Parcel(parcel())),
    ]
}

/// The header of [`round_commit`] sent as a parcel: its envelope, signed by the coordinator at T0 + 1000.
pub fn parcel() -> Parcel {
    let commit = Message::RoundCommit(round_commit());
    let bytes = SignedEnvelope::sign(&coordinator(), &commit, T0 + 1000)
        .unwrap()
        .encode()
        .unwrap();
    Parcel {
        run: run(),
        round: 7,
        envelope: ContentHash::of(&bytes),
        size: bytes.len() as u32,
    }
}

/// The signer of each sample message: the coordinator, except for node messages.
pub fn signer_of(message: &Message) -> Keypair {
    match message {
        Message::DeltaAnnouncement(_)
        | Message::Heartbeat(_)
        | Message::CommitDispute(_)
        | Message::Evaluation(_)
        | Message::ShardAttestation(_) => node(),
        _ => coordinator(),
    }
}

/// Each sample message, signed by its signer at T0 + 1000, encoded.
pub fn all_envelopes() -> Vec<(&'static str, Vec<u8>)> {
    all_messages()
        .into_iter()
        .map(|(name, m)| {
            (
                name,
                SignedEnvelope::sign(&signer_of(&m), &m, T0 + 1000)
                    .unwrap()
                    .encode()
                    .unwrap(),
            )
        })
        .collect()
}

pub fn fetch_request() -> FetchRequest {
    FetchRequest {
        hash: ContentHash::of(&sample_payload()),
        offset: 0,
        max_len: 1 << 20,
    }
}

pub fn fetch_response() -> FetchResponse {
    let payload = sample_payload();
    FetchResponse::Chunk {
        hash: ContentHash::of(&payload),
        offset: 0,
        total_size: payload.len() as u64,
        data: Bytes(payload[..32].to_vec()),
    }
}

pub fn range_request() -> RangeRequest {
    RangeRequest {
        hash: ContentHash::of(&sample_payload()),
        offset: 8 << 20,
        len: 8 << 20,
    }
}

pub fn range_response() -> RangeResponse {
    let payload = sample_payload();
    RangeResponse::Range {
        hash: ContentHash::of(&payload),
        offset: 0,
        total_size: payload.len() as u64,
        len: 32,
    }
}

pub fn lane_request() -> LaneRequest {
    LaneRequest { share: [0x5a; 32] }
}

pub fn lane_response() -> LaneResponse {
    LaneResponse::Open {
        port: 4002,
        ticket: [0x11; 16],
        share: [0xa5; 32],
    }
}

pub fn expert_request() -> ExpertRequest {
    ExpertRequest {
        run: run(),
        shard: ShardId::expert(1, 0).unwrap(),
        checkpoint: manifest(7).hash().unwrap(),
        input: Tensor::from_f32(vec![2, 4], &[0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, 4.0]).unwrap(),
        answer: TensorDtype::F32,
    }
}

/// An expert request with its input in E4M3 (1×128 tiles: one scale per row here, 3.5/448 = 2^-7 and
/// 7/448 = 2^-6, so every value is exact) asking for a bf16 answer, as FP8 dispatch sends it.
pub fn expert_request_fp8() -> ExpertRequest {
    let x = [0.5, -1.0, 3.5, 0.0, 1.5, -0.25, 3.0, 7.0];
    ExpertRequest {
        input: Tensor::encode(TensorDtype::E4m3Tile128, vec![2, 4], &x).unwrap(),
        answer: TensorDtype::Bf16,
        ..expert_request()
    }
}

/// The answer to [`expert_request_fp8`], in bf16.
pub fn expert_response_bf16() -> ExpertResponse {
    let y = [1.0, -2.5, 3.140625, 4.0, 0.0078125, 6.0, -7.0, 8.0];
    ExpertResponse::Output {
        round: 7,
        checkpoint: manifest(7).hash().unwrap(),
        output: Tensor::encode(TensorDtype::Bf16, vec![2, 4], &y).unwrap(),
    }
}

pub fn expert_response() -> ExpertResponse {
    ExpertResponse::Output {
        round: 7,
        checkpoint: manifest(7).hash().unwrap(),
        output: Tensor::from_f32(vec![2, 4], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap(),
    }
}
