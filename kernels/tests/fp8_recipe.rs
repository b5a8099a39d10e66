//! The FP8 ablation switches ([`Fp8Recipe`]): the default is today's recipe (every Linear GEMM kind in
//! FP8, amax scales), all switches off is the f32 model bit for bit, and each switch moves exactly its own
//! GEMM kind (forward `ABt`, data gradient `AB`, weight gradient `AtB`) to FP8 and nothing else.
#![allow(clippy::unwrap_used)]

mod model_support;

use std::sync::{Arc, Mutex};

use mana_kernels::gemm::{Dims, Form, Fp8Recipe, LinearPrecision, Precision};
use mana_kernels::model::{Model, ModelConfig};
use mana_kernels::optim::OptimConfig;
use mana_kernels::quant::ScaleMode;
use mana_kernels::train::Trainer;
use mana_kernels::{Backend, CpuBackend, KernelError};
use model_support::{random_batch, tiny_config};

/// The (precision, form) of every GEMM a model asked for, in order.
type CallLog = Arc<Mutex<Vec<(Precision, Form)>>>;

/// The CPU backend, recording each `matmul` call.
struct Recording(CpuBackend, CallLog);

impl Backend for Recording {
    fn name(&self) -> &str {
        "recording-cpu"
    }
    fn matmul(
        &mut self,
        p: Precision,
        f: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        d: Dims,
        acc: bool,
    ) -> Result<(), KernelError> {
        self.1.lock().unwrap().push((p, f));
        self.0.matmul(p, f, a, b, c, d, acc)
    }
}

fn recipe(forward: bool, dgrad: bool, wgrad: bool) -> Fp8Recipe {
    Fp8Recipe {
        forward,
        dgrad,
        wgrad,
        scale: ScaleMode::Amax,
    }
}

/// Three training steps of the tiny model at `precision` with `fp8`; returns the parameters, the last
/// loss and the GEMM calls of the run.
fn train(precision: Precision, fp8: Fp8Recipe) -> (Vec<f32>, f32, Vec<(Precision, Form)>) {
    let cfg = ModelConfig {
        precision,
        fp8,
        ..tiny_config()
    };
    let log = CallLog::default();
    let backend = Recording(CpuBackend::with_threads(1), log.clone());
    let model = Model::new(cfg, 3, Box::new(backend)).unwrap();
    let optim = OptimConfig {
        warmup_steps: 1,
        total_steps: 3,
        ..OptimConfig::default()
    };
    let mut tr = Trainer::from_model(model, optim, 3).unwrap();
    let mut loss = 0.0;
    for i in 0..3 {
        loss = tr.step(&random_batch(10 + i, 2, 8, 32)).unwrap().loss;
    }
    let calls = log.lock().unwrap().clone();
    (tr.model().params().to_vec(), loss, calls)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn the_default_recipe_is_deepseeks_and_reads_from_toml() {
    let d = Fp8Recipe::default();
    assert_eq!(d, recipe(true, true, true));
    assert_eq!(ModelConfig::default().fp8, d);
    // No table: the default. A partial table: the rest default. Unknown keys: refused.
    assert_eq!(ModelConfig::from_toml_str("").unwrap().fp8, d);
    let cfg =
        ModelConfig::from_toml_str("[fp8]\nwgrad = false\nscale = \"power_of_two\"\n").unwrap();
    assert_eq!(
        cfg.fp8,
        Fp8Recipe {
            wgrad: false,
            scale: ScaleMode::PowerOfTwo,
            ..d
        }
    );
    assert!(ModelConfig::from_toml_str("[fp8]\nwgard = false\n").is_err());
    let back = ModelConfig::from_toml_str(&cfg.to_toml_string().unwrap()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn the_switches_map_to_the_gemm_kinds() {
    let f = |b: bool| if b { Precision::Fp8 } else { Precision::F32 };
    for mask in 0..8u8 {
        let (fw, dg, wg) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
        let r = recipe(fw, dg, wg);
        assert_eq!(
            r.linear_precision(Precision::Fp8),
            LinearPrecision {
                forward: f(fw),
                dgrad: f(dg),
                wgrad: f(wg),
            }
        );
        assert_eq!(r.linear_precision(Precision::F32), LinearPrecision::F32);
    }
}

#[test]
fn all_switches_off_is_the_f32_model_bit_for_bit() {
    let (p32, l32, calls32) = train(Precision::F32, Fp8Recipe::default());
    let (poff, loff, calls_off) = train(Precision::Fp8, recipe(false, false, false));
    assert!(calls32.iter().all(|(p, _)| *p == Precision::F32));
    assert_eq!(calls_off, calls32);
    assert_eq!(loff.to_bits(), l32.to_bits());
    assert!(bits(&poff) == bits(&p32), "parameters differ");
    // And the default recipe really is FP8.
    let (p8, _, _) = train(Precision::Fp8, Fp8Recipe::default());
    assert!(bits(&p8) != bits(&p32));
}

#[test]
fn each_switch_moves_only_its_gemm_kind_to_fp8() {
    let (_, _, all_on) = train(Precision::Fp8, Fp8Recipe::default());
    let (_, _, all_off) = train(Precision::Fp8, recipe(false, false, false));
    // All on: every GEMM of one kind except the f32 ones (router, heads) is FP8.
    let fp8_of = |calls: &[(Precision, Form)], form: Form| {
        calls
            .iter()
            .filter(|(p, f)| *f == form && *p == Precision::Fp8)
            .count()
    };
    let of_kind =
        |calls: &[(Precision, Form)], form: Form| calls.iter().filter(|(_, f)| *f == form).count();
    for (form, r) in [
        (Form::ABt, recipe(true, false, false)),
        (Form::AB, recipe(false, true, false)),
        (Form::AtB, recipe(false, false, true)),
    ] {
        let (_, _, calls) = train(Precision::Fp8, r);
        // The same GEMMs in the same order (the run is only three steps, so routing may differ, but not
        // the count of calls of each kind at these sizes: every expert gets rows in every step).
        assert_eq!(calls.len(), all_on.len(), "{form:?}");
        assert!(fp8_of(&all_on, form) > 0, "{form:?}");
        assert_eq!(fp8_of(&calls, form), fp8_of(&all_on, form), "{form:?}");
        assert_eq!(
            calls.iter().filter(|(p, _)| *p == Precision::Fp8).count(),
            fp8_of(&calls, form),
            "{form:?}: another GEMM kind went FP8"
        );
        assert_eq!(of_kind(&calls, form), of_kind(&all_off, form), "{form:?}");
    }
}
