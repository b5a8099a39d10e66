//! The KV-cached decode step: steps of any size give the bits of one prefill (main and MTP logits, after a
//! truncation too), the step computes the same model as the full-window forward (to f32 rounding), and
//! bad steps are typed errors that leave the cache alone.

use mana_kernels::CpuBackend;
use mana_kernels::gemm::Precision;
use mana_kernels::model::{CacheError, Model, ModelConfig, ModelError};

/// The decode step and [`Model::logits`] differ only in the order of f32 sums (row-invariant products
/// against the `gemm` crate's blocked ones): logits agree to this fraction of the largest logit, in f32.
const DECODE_VS_BATCHED_TOL: f32 = 1e-4;

fn model(precision: Precision) -> Model {
    let config = ModelConfig {
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_dense_layers: 1,
        dense_hidden: 64,
        n_routed_experts: 4,
        top_k: 2,
        expert_hidden: 32,
        shared_hidden: 32,
        context: 40,
        init_std: 0.2,
        precision,
        ..ModelConfig::default()
    };
    Model::new(config, 11, Box::new(CpuBackend::default())).expect("valid config")
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

/// Main and MTP logits of every position of `toks`, from one step over an empty cache.
fn prefill(m: &mut Model, toks: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let v = m.config().vocab_size;
    let mut cache = m.new_cache();
    let (mut main, mut mtp) = (vec![0.0; toks.len() * v], vec![0.0; toks.len() * v]);
    m.decode(&mut cache, toks, toks.len(), &mut main, Some(&mut mtp))
        .expect("valid step");
    (main, mtp)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn steps_of_any_size_give_the_bits_of_one_prefill() {
    for precision in [Precision::F32, Precision::Fp8] {
        let mut m = model(precision);
        let v = m.config().vocab_size;
        let toks = tokens(40);
        let (main, _) = prefill(&mut m, &toks);
        let mut cache = m.new_cache();
        let mut pos = 0;
        for step in [7usize, 1, 2, 3, 1, 1, 5, 1, 2, 17] {
            let (mut got, mut got_mtp) = (vec![0.0; step * v], vec![0.0; step * v]);
            m.decode(
                &mut cache,
                &toks[pos..pos + step],
                step,
                &mut got,
                Some(&mut got_mtp),
            )
            .expect("valid step");
            pos += step;
            assert_eq!(cache.len(), pos);
            assert_eq!(
                bits(&got),
                bits(&main[(pos - step) * v..pos * v]),
                "{precision} main, step to {pos}"
            );
            // The MTP rows of a prefix: the last one assumes the argmax, as in a prefill of that prefix.
            let (_, want_mtp) = prefill(&mut m, &toks[..pos]);
            assert_eq!(
                bits(&got_mtp),
                bits(&want_mtp[(pos - step) * v..]),
                "{precision} mtp, step to {pos}"
            );
        }
        assert_eq!(pos, 40, "the steps cover the whole context");
    }
}

#[test]
fn a_truncated_cache_continues_as_if_the_dropped_positions_never_ran() {
    // A rejected speculative draft: run x then draft d, drop d, run c: same as running x then c.
    let mut m = model(Precision::Fp8);
    let v = m.config().vocab_size;
    let toks = tokens(12);
    let mut cache = m.new_cache();
    let (mut main, mut mtp) = (vec![0.0; 2 * v], vec![0.0; 2 * v]);
    m.decode(
        &mut cache,
        &toks[..10],
        1,
        &mut main[..v],
        Some(&mut mtp[..v]),
    )
    .expect("valid");
    m.decode(&mut cache, &[toks[10], 99], 2, &mut main, Some(&mut mtp))
        .expect("valid");
    cache.truncate(11);
    assert_eq!(cache.len(), 11);
    m.decode(
        &mut cache,
        &toks[11..12],
        1,
        &mut main[..v],
        Some(&mut mtp[..v]),
    )
    .expect("valid");
    let (want, want_mtp) = prefill(&mut m, &toks);
    assert_eq!(bits(&main[..v]), bits(&want[11 * v..]));
    assert_eq!(bits(&mtp[..v]), bits(&want_mtp[11 * v..]));
}

#[test]
fn the_decode_step_computes_the_same_model_as_the_full_window_forward() {
    let mut m = model(Precision::F32);
    let v = m.config().vocab_size;
    let toks = tokens(40);
    let (main, mtp) = prefill(&mut m, &toks);
    let (mut want, mut want_mtp) = (vec![0.0; 40 * v], vec![0.0; 40 * v]);
    m.logits(&toks, &mut want, Some(&mut want_mtp))
        .expect("valid");
    for (got, want) in [(&main, &want), (&mtp, &want_mtp)] {
        let scale = want.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        let worst = got
            .iter()
            .zip(want.iter())
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            worst <= DECODE_VS_BATCHED_TOL * scale,
            "worst {worst} of {scale}"
        );
    }
    // And the check has teeth: the same tokens one position later give other logits.
    let mut shifted = vec![0u32];
    shifted.extend_from_slice(&toks[..39]);
    let (moved, _) = prefill(&mut m, &shifted);
    let worst = moved[v..]
        .iter()
        .zip(&want[..39 * v])
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        worst > 100.0 * DECODE_VS_BATCHED_TOL,
        "positions do not matter? {worst}"
    );
}

#[test]
fn bad_steps_are_typed_errors_and_leave_the_cache_alone() {
    let mut m = model(Precision::Fp8);
    let v = m.config().vocab_size;
    let mut cache = m.new_cache();
    let mut out = vec![0.0; v];
    m.decode(&mut cache, &tokens(38), 1, &mut out, None)
        .expect("valid");
    let before = cache.tokens().to_vec();
    let err = |r: Result<(), ModelError>| r.expect_err("must be refused");
    assert_eq!(
        err(m.decode(&mut cache, &[1, 2, 3], 1, &mut out, None)),
        ModelError::Cache(CacheError::Full {
            len: 38,
            new: 3,
            capacity: 40
        })
    );
    assert_eq!(
        err(m.decode(&mut cache, &[], 1, &mut out, None)),
        ModelError::Cache(CacheError::NoTokens)
    );
    assert_eq!(
        err(m.decode(&mut cache, &[1], 2, &mut out, None)),
        ModelError::Cache(CacheError::Rows { rows: 2, tokens: 1 })
    );
    assert!(matches!(
        err(m.decode(&mut cache, &[1], 0, &mut out, None)),
        ModelError::Cache(CacheError::Rows { .. })
    ));
    assert!(matches!(
        err(m.decode(&mut cache, &[300], 1, &mut out, None)),
        ModelError::TokenOutOfRange { .. }
    ));
    assert!(matches!(
        err(m.decode(&mut cache, &[1], 1, &mut out[..5], None)),
        ModelError::Length { .. }
    ));
    assert!(matches!(
        err(m.decode(&mut cache, &[1], 1, &mut vec![0.0; v], Some(&mut [0.0; 3]))),
        ModelError::Length { .. }
    ));
    let mut x = vec![0.0; 32];
    assert!(matches!(
        err(m.decode_attention(2, &mut cache, &mut x)),
        ModelError::Cache(CacheError::Layer { .. })
    ));
    assert!(matches!(
        err(m.decode_ffn(0, &mut x[..31])),
        ModelError::Cache(CacheError::Residual { .. })
    ));
    assert!(matches!(
        err(m.decode_attention(0, &mut cache, &mut vec![0.0; 3 * 32])),
        ModelError::Cache(CacheError::Full { .. })
    ));
    // A cache shaped for another model.
    let mut other = model(Precision::Fp8);
    let mut wrong = Model::new(
        ModelConfig {
            context: 8,
            ..other.config().clone()
        },
        1,
        Box::new(CpuBackend::default()),
    )
    .expect("valid")
    .new_cache();
    assert!(matches!(
        err(other.decode(&mut wrong, &[1], 1, &mut out, None)),
        ModelError::Cache(CacheError::Mismatch { what: "context" })
    ));
    assert_eq!(
        cache.tokens(),
        before,
        "refused steps leave the cache as it was"
    );
    // The per-block steps run on rows the cache has room for.
    m.decode_ffn(1, &mut x).expect("a MoE block's FFN half");
    cache.truncate(30);
    m.decode_attention(0, &mut cache, &mut x)
        .expect("one row at position 30");
}

#[test]
fn decode_steps_follow_changes_to_the_parameters_and_the_precision() {
    // The FP8 weights a decode step multiplies are rounded once; any change must be seen by the next step.
    let mut m = model(Precision::Fp8);
    let toks = tokens(10);
    let (before, _) = prefill(&mut m, &toks);
    for p in m.params_mut() {
        *p *= 1.01;
    }
    let (after, _) = prefill(&mut m, &toks);
    let mut fresh = model(Precision::Fp8);
    fresh.params_mut().copy_from_slice(m.params());
    let (want, _) = prefill(&mut fresh, &toks);
    assert_ne!(bits(&after), bits(&before));
    assert_eq!(bits(&after), bits(&want), "the step saw the new parameters");
    m.set_precision(Precision::F32);
    fresh.set_precision(Precision::F32);
    let (f32_logits, _) = prefill(&mut m, &toks);
    assert_ne!(bits(&f32_logits), bits(&after));
    assert_eq!(bits(&f32_logits), bits(&prefill(&mut fresh, &toks).0));
}
