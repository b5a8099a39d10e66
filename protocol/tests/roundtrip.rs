//! Every message survives encode → decode → verify unchanged, and any single-byte change of a signed
//! envelope (at every position, with several replacement values) makes decoding or verification fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use common::*;
use mana_protocol::*;

#[test]
fn every_message_round_trips_through_a_signed_envelope() {
    for (name, message) in all_messages() {
        let kp = signer_of(&message);
        let envelope = SignedEnvelope::sign(&kp, &message, T0 + 1000).unwrap();
        let bytes = envelope.encode().unwrap();
        let decoded = decode_envelope(&bytes).unwrap();
        assert_eq!(decoded, envelope, "{name}");
        assert_eq!(decoded.verify().unwrap(), message, "{name}");
        assert_eq!(decoded.signer, kp.public(), "{name}");
        assert_eq!(decoded.signer_peer_id().unwrap(), kp.peer_id(), "{name}");
        assert_eq!(decoded.timestamp_ms, T0 + 1000, "{name}");
    }
}

#[test]
fn request_response_frames_round_trip() {
    assert_eq!(
        FetchRequest::decode(&fetch_request().encode().unwrap()).unwrap(),
        fetch_request()
    );
    assert_eq!(
        FetchResponse::decode(&fetch_response().encode().unwrap()).unwrap(),
        fetch_response()
    );
    let not_found = FetchResponse::NotFound {
        hash: ContentHash::of(b"x"),
    };
    assert_eq!(
        FetchResponse::decode(&not_found.encode().unwrap()).unwrap(),
        not_found
    );
    let refused = FetchResponse::Refused {
        reason: Text::new("busy").unwrap(),
    };
    assert_eq!(
        FetchResponse::decode(&refused.encode().unwrap()).unwrap(),
        refused
    );
    assert_eq!(
        LaneRequest::decode(&lane_request().encode().unwrap()).unwrap(),
        lane_request()
    );
    assert_eq!(
        LaneResponse::decode(&lane_response().encode().unwrap()).unwrap(),
        lane_response()
    );
    let refused = LaneResponse::Refused {
        reason: Text::new("busy").unwrap(),
    };
    assert_eq!(
        LaneResponse::decode(&refused.encode().unwrap()).unwrap(),
        refused
    );
    let port_zero = LaneResponse::Open {
        port: 0,
        ticket: [1; 16],
        share: [2; 32],
    };
    assert!(
        LaneResponse::decode(&port_zero.encode().unwrap()).is_err(),
        "an Open on port 0 is refused"
    );
    assert_eq!(
        ExpertRequest::decode(&expert_request().encode().unwrap()).unwrap(),
        expert_request()
    );
    assert_eq!(
        ExpertResponse::decode(&expert_response().encode().unwrap()).unwrap(),
        expert_response()
    );
    let unavailable = ExpertResponse::Unavailable {
        reason: Text::new("not hosted").unwrap(),
    };
    assert_eq!(
        ExpertResponse::decode(&unavailable.encode().unwrap()).unwrap(),
        unavailable
    );
    let (request, response) = (expert_request_fp8(), expert_response_bf16());
    assert_eq!(
        ExpertRequest::decode(&request.encode().unwrap()).unwrap(),
        request
    );
    assert_eq!(
        ExpertResponse::decode(&response.encode().unwrap()).unwrap(),
        response
    );
    let t = expert_request().input;
    assert_eq!(
        t.to_f32().unwrap(),
        vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, 4.0]
    );
}

#[test]
fn manifest_blob_round_trips_and_hash_is_of_its_bytes() {
    let m = manifest(3);
    let bytes = m.to_bytes().unwrap();
    assert_eq!(CheckpointManifest::from_bytes(&bytes).unwrap(), m);
    assert_eq!(m.hash().unwrap(), ContentHash::of(&bytes));
}

#[test]
fn every_single_byte_change_of_an_envelope_is_detected() {
    for (name, bytes) in all_envelopes() {
        for pos in 0..bytes.len() {
            for delta in [0x01u8, 0x80, 0xff] {
                let mut tampered = bytes.clone();
                tampered[pos] ^= delta;
                let outcome = decode_envelope(&tampered).and_then(|e| e.verify());
                assert!(
                    outcome.is_err(),
                    "{name}: flipping byte {pos} with {delta:#04x} went unnoticed"
                );
            }
        }
        // Truncation and extension are detected too.
        assert!(
            decode_envelope(&bytes[..bytes.len() - 1]).is_err(),
            "{name}: truncated"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_envelope(&longer).is_err(), "{name}: extended");
    }
}

#[test]
fn signature_does_not_transfer_to_another_signer_or_time() {
    let message = Message::Heartbeat(heartbeat());
    let mut env = SignedEnvelope::sign(&node(), &message, T0).unwrap();
    env.timestamp_ms += 1;
    assert_eq!(env.verify(), Err(ProtocolError::BadSignature));
    let mut env = SignedEnvelope::sign(&node(), &message, T0).unwrap();
    env.signer = outsider().public();
    assert_eq!(env.verify(), Err(ProtocolError::BadSignature));
}

#[test]
fn a_signature_over_the_bytes_without_the_domain_is_refused() {
    // Sign the same body bytes but without the domain prefix: must not verify.
    let message = Message::Heartbeat(heartbeat());
    let env = SignedEnvelope::sign(&node(), &message, T0).unwrap();
    let bytes = env.encode().unwrap();
    let body = &bytes[..bytes.len() - 64];
    let mut forged = env.clone();
    forged.signature = node().sign(body);
    assert_eq!(forged.verify(), Err(ProtocolError::BadSignature));
    let mut with_domain = SIGNING_DOMAIN.to_vec();
    with_domain.extend_from_slice(body);
    forged.signature = node().sign(&with_domain);
    assert_eq!(forged.verify().unwrap(), message);
}

#[test]
fn other_versions_are_refused_before_anything_else() {
    let message = Message::Heartbeat(heartbeat());
    let mut env = SignedEnvelope::sign(&node(), &message, T0).unwrap();
    env.version = 1;
    let bytes = env.encode().unwrap();
    assert_eq!(
        decode_envelope(&bytes),
        Err(ProtocolError::UnsupportedVersion {
            got: 1,
            supported: PROTOCOL_VERSION
        })
    );
    // A later version (a one-byte varint, like every version so far).
    let later = PROTOCOL_VERSION + 1;
    let mut frame = fetch_request().encode().unwrap();
    frame[0] = later as u8;
    assert_eq!(
        FetchRequest::decode(&frame),
        Err(ProtocolError::UnsupportedVersion {
            got: later,
            supported: PROTOCOL_VERSION
        })
    );
}

#[test]
fn non_canonical_encodings_are_refused() {
    // A varint written in a longer form than needed (251 + u16) decodes in bincode but is not canonical.
    let message = Message::Heartbeat(heartbeat());
    let env = SignedEnvelope::sign(&node(), &message, T0).unwrap();
    let bytes = env.encode().unwrap();
    let version = PROTOCOL_VERSION.to_le_bytes();
    let mut long_form = vec![251u8, version[0], version[1]];
    long_form.extend_from_slice(&bytes[1..]);
    assert!(matches!(
        decode_envelope(&long_form),
        Err(ProtocolError::NonCanonical { .. })
    ));
}

#[test]
fn count_limits_are_enforced_on_sign_and_decode() {
    let mut hb = heartbeat();
    hb.hosted = vec![ShardId::Trunk; limits::MAX_SHARDS_PER_NODE + 1];
    let message = Message::Heartbeat(hb);
    assert!(matches!(
        SignedEnvelope::sign(&node(), &message, T0),
        Err(ProtocolError::InvalidField { .. })
    ));
    let mut manifest = manifest(1);
    manifest.shards.swap(0, 1);
    assert!(matches!(
        CheckpointManifest::from_bytes(&bincode_of(&manifest)),
        Err(ProtocolError::InvalidField { .. })
    ));
}

fn bincode_of(m: &CheckpointManifest) -> Vec<u8> {
    wire::encode::<_, { limits::MAX_MESSAGE_BYTES }>(m, "test").unwrap()
}

#[test]
fn oversized_inputs_are_refused_before_decoding() {
    let big = vec![1u8; limits::MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        decode_envelope(&big),
        Err(ProtocolError::TooLarge { .. })
    ));
    let chunk = FetchResponse::Chunk {
        hash: ContentHash::of(b""),
        offset: 0,
        total_size: u64::MAX,
        data: Bytes(vec![0; limits::MAX_FETCH_CHUNK_BYTES as usize + 1]),
    };
    assert!(chunk.encode().is_err());
    let bad_tensor = Tensor {
        dtype: TensorDtype::F32,
        shape: vec![2, 2],
        data: Bytes(vec![0; 15]),
    };
    assert!(bad_tensor.check().is_err());
    let huge = Tensor {
        dtype: TensorDtype::F32,
        shape: vec![u32::MAX, u32::MAX, 2],
        data: Bytes(vec![]),
    };
    assert!(huge.check().is_err());
}

mod generated {
    use super::*;
    use proptest::prelude::*;

    fn shard() -> impl Strategy<Value = ShardId> {
        prop_oneof![
            Just(ShardId::Trunk),
            (0u16..1024, 0u16..4096).prop_map(|(l, i)| ShardId::expert(l, i).unwrap())
        ]
    }

    fn hash() -> impl Strategy<Value = ContentHash> {
        any::<[u8; 32]>().prop_map(ContentHash)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn random_messages_round_trip(
            round in any::<u64>(), seq in any::<u64>(), ts in any::<u64>(), size in any::<u64>(),
            shards in proptest::collection::vec(shard(), 0..40), one in shard(), h1 in hash(), h2 in hash(),
            floats in any::<[f32; 4]>(), version in "[a-zA-Z0-9 .+-]{0,60}", seed in any::<[u8; 32]>(),
        ) {
            let kp = Keypair::from_seed(&seed);
            let messages = [
                Message::Heartbeat(Heartbeat {
                    run: run(), seq, hosted: shards.clone(),
                    capacity: Capacity { device: DeviceKind::Cpu, memory_bytes: size, tokens_per_second: floats[0], max_shards: 3 },
                    software_version: Text::new(version).unwrap(),
                }),
                Message::DeltaAnnouncement(DeltaAnnouncement {
                    run: run(), round, shard: one, base_checkpoint: h1, payload_hash: h2, payload_size: size,
                    stats: TrainingStats { tokens: seq, loss_before: floats[1], loss_after: floats[2], delta_norm: floats[3] },
                }),
                Message::CheckpointManifest(CheckpointManifest {
                    run: run(), round,
                    shards: {
                        let mut s = shards.clone();
                        s.sort();
                        s.dedup();
                        s.into_iter().map(|shard| ShardEntry { shard, hash: h1, size, round }).collect()
                    },
                }),
            ];
            for message in messages {
                let bytes = SignedEnvelope::sign(&kp, &message, ts).unwrap().encode().unwrap();
                let back = decode_envelope(&bytes).unwrap().verify().unwrap();
                // Compare encodings: NaN floats are equal bit for bit but not by PartialEq.
                let again = SignedEnvelope::sign(&kp, &back, ts).unwrap().encode().unwrap();
                prop_assert_eq!(again, bytes);
            }
        }
    }
}
