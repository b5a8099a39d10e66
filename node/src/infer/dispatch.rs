//! How an expert call carries its numbers: the encoding of the hidden states a client sends and of the
//! output a host answers with ([`Dispatch`]), and [`Loopback`], which puts a runner's calls through exactly
//! those encodings in this process, to measure what they change without a network.
//!
//! The model's FP8 GEMMs quantize their input in 1×128 tiles with amax scales, and E4M3 dispatch
//! ([`TensorDtype::E4m3Tile128`]) is that very quantization: the host's first GEMM re-quantizes the decoded
//! input to the same codes and scales (`mana_protocol::tensor`), so for a model at FP8 precision, FP8 input
//! changes no bit of the expert's output. Only the answer's encoding can then change what the client
//! computes; an f32 answer keeps generation bit-identical to the whole model in one process.

use std::fmt;
use std::str::FromStr;

use mana_kernels::KernelError;
use mana_kernels::model::{ExpertCall, ExpertRunner};
use mana_protocol::{ProtocolError, Tensor, TensorDtype};

/// The encodings of an expert call, chosen by the client: `input` for the hidden states it sends, `answer`
/// for the outputs it asks back (carried in the request, so a host answers each call as asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// The hidden states' encoding.
    pub input: TensorDtype,
    /// The outputs' encoding.
    pub answer: TensorDtype,
}

impl Dispatch {
    /// f32 both ways: bit-identical to running the whole model in one process, at any precision.
    pub const F32: Dispatch = Dispatch {
        input: TensorDtype::F32,
        answer: TensorDtype::F32,
    };

    /// E4M3 hidden states (1×128 tiles), bf16 answers, as DeepSeek-V3 dispatches and combines: 2.6 times
    /// fewer bytes than [`Dispatch::F32`] (d_model 64 or 128). At FP8 precision the input costs nothing
    /// (see the module doc); the bf16 answers leave the loss unchanged but change about 0.7% of an FP8
    /// model's greedy choices (docs/training.md, "FP8 dispatch").
    pub const FP8: Dispatch = Dispatch {
        input: TensorDtype::E4m3Tile128,
        answer: TensorDtype::Bf16,
    };

    /// E4M3 hidden states (1×128 tiles), f32 answers: the default. For a model at FP8 precision the output
    /// is bit-identical to [`Dispatch::F32`]'s (see the module doc) at 1.6 times fewer bytes, so greedy
    /// generation over the network equals the whole checkpoint's in one process, and an expert the client
    /// computes itself (`super::cache`) gives the same bits as a host's answer.
    pub const FP8_EXACT: Dispatch = Dispatch {
        input: TensorDtype::E4m3Tile128,
        answer: TensorDtype::F32,
    };

    /// The hidden states of one call, `rows` rows of `x`, encoded for the wire.
    pub fn encode_input(self, x: &[f32], rows: usize) -> Result<Tensor, ProtocolError> {
        Tensor::encode(self.input, shape(x.len(), rows)?, x)
    }
}

/// The shape `[rows, width]` of `len` values in `rows` rows.
fn shape(len: usize, rows: usize) -> Result<Vec<u32>, ProtocolError> {
    let width = len / rows.max(1);
    let bad = || ProtocolError::InvalidField {
        what: "expert call",
        detail: format!("{len} values in {rows} rows"),
    };
    if width * rows != len {
        return Err(bad());
    }
    Ok(vec![
        u32::try_from(rows).map_err(|_| bad())?,
        u32::try_from(width).map_err(|_| bad())?,
    ])
}

/// The output `out` of a call whose input had `shape`, in `answer`'s encoding: what a host sends, and what
/// a client's reference computation is turned into before it is compared with hosts' answers.
pub fn encode_answer(
    answer: TensorDtype,
    shape: Vec<u32>,
    out: &[f32],
) -> Result<Tensor, ProtocolError> {
    Tensor::encode(answer, shape, out)
}

impl Default for Dispatch {
    /// [`Dispatch::FP8_EXACT`]: fewer bytes at no change to an FP8 model's output; [`Dispatch::FP8`]'s bf16
    /// answers save more but change some greedy choices, so they are asked for, not assumed.
    fn default() -> Self {
        Dispatch::FP8_EXACT
    }
}

impl fmt::Display for Dispatch {
    /// `f32`, `fp8`, or `<input>/<answer>` for another pair.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Dispatch::F32 => f.write_str("f32"),
            Dispatch::FP8 => f.write_str("fp8"),
            Dispatch { input, answer } => write!(f, "{input}/{answer}"),
        }
    }
}

impl FromStr for Dispatch {
    type Err = ProtocolError;

    /// `f32` ([`Dispatch::F32`]), `fp8` ([`Dispatch::FP8`]), or `<input>/<answer>` with each of `f32`,
    /// `bf16`, `fp8` (e.g. `fp8/f32`: FP8 hidden states, exact answers).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((input, answer)) = s.split_once('/') {
            return Ok(Dispatch {
                input: input.parse()?,
                answer: answer.parse()?,
            });
        }
        match s.parse()? {
            TensorDtype::F32 => Ok(Dispatch::F32),
            TensorDtype::E4m3Tile128 => Ok(Dispatch::FP8),
            TensorDtype::Bf16 => Err(ProtocolError::InvalidField {
                what: "dispatch",
                detail: "bf16 needs an answer encoding too, e.g. bf16/bf16".into(),
            }),
        }
    }
}

/// Bytes of expert-call tensors, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchBytes {
    /// Calls.
    pub calls: u64,
    /// Bytes of input tensors (codes and scales) sent.
    pub request: u64,
    /// Bytes of output tensors received.
    pub response: u64,
}

/// An [`ExpertRunner`] that hands `inner` every call's input as a host would decode it from the wire under
/// `dispatch`, and gives the layer the output as a client would decode the answer: the numbers of network
/// dispatch, computed here. It counts the tensor bytes each way.
pub struct Loopback<R> {
    inner: R,
    dispatch: Dispatch,
    bytes: DispatchBytes,
}

impl<R: ExpertRunner> Loopback<R> {
    /// `inner` behind the encodings of `dispatch`.
    pub fn new(inner: R, dispatch: Dispatch) -> Self {
        Self {
            inner,
            dispatch,
            bytes: DispatchBytes::default(),
        }
    }

    /// The bytes counted so far.
    pub fn bytes(&self) -> DispatchBytes {
        self.bytes
    }
}

impl<R: ExpertRunner> ExpertRunner for Loopback<R> {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        let failed = |expert: usize, e: ProtocolError| KernelError::ExpertUnavailable {
            layer,
            expert,
            reason: e.to_string(),
        };
        let mut inputs = Vec::with_capacity(calls.len());
        for call in calls.iter() {
            let tensor = self
                .dispatch
                .encode_input(call.x, call.rows)
                .map_err(|e| failed(call.expert, e))?;
            self.bytes.request += tensor.data.0.len() as u64;
            inputs.push((
                tensor.to_f32().map_err(|e| failed(call.expert, e))?,
                tensor.shape,
            ));
        }
        let mut outs: Vec<Vec<f32>> = calls.iter().map(|c| vec![0.0; c.out.len()]).collect();
        // Which calls the inner runner could not answer: handed back as missing, not encoded.
        let missing: Vec<bool> = {
            let mut decoded: Vec<ExpertCall<'_>> = calls
                .iter()
                .zip(&inputs)
                .zip(outs.iter_mut())
                .map(|((call, (x, _)), out)| ExpertCall {
                    expert: call.expert,
                    rows: call.rows,
                    x,
                    out,
                    missing: false,
                })
                .collect();
            self.inner.run_layer(layer, &mut decoded)?;
            decoded.iter().map(|call| call.missing).collect()
        };
        for (((call, (_, shape)), out), missing) in
            calls.iter_mut().zip(inputs).zip(outs).zip(missing)
        {
            if missing {
                call.missing = true;
                continue;
            }
            let answer = encode_answer(self.dispatch.answer, shape, &out)
                .map_err(|e| failed(call.expert, e))?;
            self.bytes.response += answer.data.0.len() as u64;
            let values = answer.to_f32().map_err(|e| failed(call.expert, e))?;
            call.out.copy_from_slice(&values);
            self.bytes.calls += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_kernels::CpuBackend;
    use mana_kernels::gemm::Precision;
    use mana_kernels::model::{ExpertKernel, KernelExperts, ModelConfig, ShardId};

    /// An expert of width 200 (two 1×128 tiles a row, the second short) with weights of a fixed pattern.
    fn kernel(precision: Precision) -> ExpertKernel {
        let config = ModelConfig {
            d_model: 200,
            expert_hidden: 48,
            precision,
            ..ModelConfig::default()
        };
        let params: Vec<f32> = (0..3 * 200 * 48)
            .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 0.2)
            .collect();
        ExpertKernel::new(&config, &params, Box::new(CpuBackend::new())).expect("an expert")
    }

    /// Expert 0 of layer 1 on `x` (3 rows), through `runner`.
    fn run(runner: &mut dyn ExpertRunner, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        let mut calls = [ExpertCall {
            expert: 0,
            rows: 3,
            x,
            out: &mut out,
            missing: false,
        }];
        runner.run_layer(1, &mut calls).expect("the expert runs");
        out
    }

    fn loopback(precision: Precision, dispatch: Dispatch) -> Loopback<KernelExperts> {
        let mut experts = KernelExperts::new();
        let shard = ShardId::expert(1u16, 0u16).expect("in range");
        experts.insert(shard, kernel(precision)).expect("an expert");
        Loopback::new(experts, dispatch)
    }

    #[test]
    fn fp8_hidden_states_change_no_bit_of_an_fp8_expert() {
        let x: Vec<f32> = (0..3 * 200)
            .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 13) as f32))
            .collect();
        for precision in [Precision::Fp8, Precision::F32] {
            let mut direct = vec![0.0; x.len()];
            kernel(precision)
                .forward(&x, 3, &mut direct)
                .expect("the expert runs");
            let mut runner = loopback(precision, Dispatch::FP8_EXACT);
            let through = run(&mut runner, &x);
            let same = through
                .iter()
                .zip(&direct)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            // An FP8 expert quantizes its input exactly as the dispatch did; an f32 one sees the rounding.
            assert_eq!(same, precision == Precision::Fp8, "{precision}");
            assert_eq!(
                runner.bytes(),
                DispatchBytes {
                    calls: 1,
                    request: 3 * (200 + 2 * 4),
                    response: 3 * 200 * 4,
                }
            );
        }
        // `fp8` answers in bf16: the f32 output rounded, 2 bytes a value.
        let mut direct = vec![0.0; x.len()];
        kernel(Precision::Fp8)
            .forward(&x, 3, &mut direct)
            .expect("the expert runs");
        let mut runner = loopback(Precision::Fp8, Dispatch::FP8);
        let through = run(&mut runner, &x);
        for (a, b) in through.iter().zip(&direct) {
            assert!((a - b).abs() <= b.abs() / 256.0, "{b} came back as {a}");
        }
        assert_ne!(through, direct);
        assert_eq!(runner.bytes().response, 3 * 200 * 2);
    }

    #[test]
    fn dispatch_names_parse_and_print() {
        for (text, d) in [
            ("f32", Dispatch::F32),
            ("fp8", Dispatch::FP8),
            ("FP8", Dispatch::FP8),
            (
                "fp8/f32",
                Dispatch {
                    input: TensorDtype::E4m3Tile128,
                    answer: TensorDtype::F32,
                },
            ),
            (
                "bf16/fp8",
                Dispatch {
                    input: TensorDtype::Bf16,
                    answer: TensorDtype::E4m3Tile128,
                },
            ),
        ] {
            assert_eq!(text.parse::<Dispatch>().expect(text), d);
            assert_eq!(
                d.to_string()
                    .parse::<Dispatch>()
                    .expect("printed form parses"),
                d
            );
        }
        assert_eq!("fp8/bf16".parse::<Dispatch>().ok(), Some(Dispatch::FP8));
        for bad in ["", "bf16", "fp8/", "e5m2", "f32/f32/f32"] {
            assert!(bad.parse::<Dispatch>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_call_shape_must_be_whole_rows() {
        assert!(Dispatch::F32.encode_input(&[1.0; 6], 4).is_err());
        assert_eq!(
            Dispatch::FP8
                .encode_input(&[1.0; 6], 2)
                .expect("whole rows")
                .shape,
            vec![2, 3]
        );
    }
}
