//! Hostile input: arbitrary bytes and mutated valid encodings, fed to every decoder, must give an error or
//! a value, never a panic. (Allocation bounds are checked in `alloc_bound.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use common::*;
use mana_protocol::codec::DeltaHeader;
use mana_protocol::*;
use proptest::prelude::*;

/// Runs every decoder of the crate on `bytes`; only panics matter here.
fn decode_everything(bytes: &[u8]) {
    if let Ok(env) = decode_envelope(bytes) {
        let _ = env.verify();
        let _ = env.signer_peer_id();
    }
    let _ = FetchRequest::decode(bytes);
    let _ = FetchResponse::decode(bytes);
    let _ = ExpertRequest::decode(bytes).map(|r| r.input.to_f32());
    if let Ok(ExpertResponse::Output { output, .. }) = ExpertResponse::decode(bytes) {
        let _ = output.to_f32();
    }
    let _ = RangeRequest::decode(bytes);
    let _ = RangeResponse::decode(bytes);
    let _ = LaneRequest::decode(bytes);
    let _ = LaneResponse::decode(bytes);
    let _ = CheckpointManifest::from_bytes(bytes);
    let _ = DeltaHeader::parse(bytes);
    let _ = decode_delta(bytes, 1 << 16);
}

fn valid_samples() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = all_envelopes().into_iter().map(|(_, b)| b).collect();
    out.push(fetch_request().encode().unwrap());
    out.push(fetch_response().encode().unwrap());
    out.push(range_request().encode().unwrap());
    out.push(range_response().encode().unwrap());
    out.push(lane_request().encode().unwrap());
    out.push(lane_response().encode().unwrap());
    out.push(expert_request().encode().unwrap());
    out.push(expert_response().encode().unwrap());
    out.push(expert_request_fp8().encode().unwrap());
    out.push(expert_response_bf16().encode().unwrap());
    out.push(manifest(2).to_bytes().unwrap());
    out.push(sample_payload());
    let sparse = CodecOptions {
        top_k_density: Some(0.05),
        scale: ScaleFormat::PowerOfTwo,
        ..CodecOptions::default()
    };
    out.push(encode_delta(&sample_delta(), &sparse).unwrap());
    for (values, scale) in [
        (ValueFormat::Int2, ScaleFormat::F32),
        (ValueFormat::Int4, ScaleFormat::PowerOfTwo),
        (ValueFormat::Fp8, ScaleFormat::F32),
    ] {
        let blocks = CodecOptions {
            top_k_density: Some(0.03),
            top_k_per_block: true,
            values,
            scale,
            ..CodecOptions::default()
        };
        out.push(encode_delta(&sample_delta(), &blocks).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_prefix_never_panic(
        which in 0usize..64, cut in any::<prop::sample::Index>(), tail in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let samples = valid_samples();
        let sample = &samples[which % samples.len()];
        let mut bytes = sample[..cut.index(sample.len() + 1)].to_vec();
        bytes.extend_from_slice(&tail);
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_valid_encodings_never_panic(
        which in 0usize..64,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let samples = valid_samples();
        let mut bytes = samples[which % samples.len()].clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_everything(&bytes);
    }
}

#[test]
fn every_truncation_of_every_sample_is_an_error() {
    for sample in valid_samples() {
        for cut in 0..sample.len() {
            let bytes = &sample[..cut];
            assert!(decode_envelope(bytes).is_err());
            assert!(decode_delta(bytes, 1 << 16).is_err());
            decode_everything(bytes);
        }
    }
}
