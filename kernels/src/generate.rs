//! Text generation from a trained model: greedy decoding or sampling with a temperature and nucleus
//! (top-p) cut, optionally sped up by self-speculative decoding with the multi-token-prediction head.
//!
//! Speculation (DeepSeek-V3 §2.2 used at inference): a forward pass gives the main head's next token and,
//! from the MTP head, a draft of the token after it. The next pass runs over the sequence plus that draft.
//! Its second-to-last position tells what the main model would have produced in place of the draft: that
//! token is always committed, and when it equals the draft, the last position's main prediction is exact
//! too and is committed in the same pass (two tokens for one pass). Each committed token is chosen by the
//! main head alone, with one random draw per token in both modes, so the output is identical with and
//! without speculation, for greedy decoding and for sampling with the same seed.
//!
//! **The window.** A pass sees at most the model's context. While the sequence fits, the window is all of
//! it; once it would overflow, the window keeps the newest half of the context (`ctx − ⌊ctx/2⌋` tokens)
//! and grows again from there until it is full: [`window_start`] is that rule, a function of the sequence
//! length alone. Positions (RoPE) count from the window's start, so they re-base once per half window, not
//! at every token as a window sliding by one would: a KV cache keeps its keys across passes only while the
//! window's start stays put, and this rule lets it do so for half a context at a time, at the price of one
//! prefill of half a context per re-base. Both ways of running a pass follow the rule, so they see the
//! same windows: [`CachedModel`] keeps a [`KvCache`] and runs only the new positions; [`UncachedModel`]
//! recomputes the whole window every pass (the reference the cache is tested against, and
//! `--no-kv-cache`). Their logits are bit-identical (the model's inference products are row-invariant, see
//! [`Model::decode`]), so the output is identical with and without the cache, greedy or sampled.
//!
//! A draft is verified only when the window would not re-base with it (see [`generate`]): the verified
//! positions then see exactly the windows plain decoding gives them, and speculation stays exact past the
//! context too.

use std::ops::ControlFlow;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::model::{CacheError, ExpertRunner, KvCache, Model, ModelError, OutsideExperts};

/// What generation needs from a model: logits of the main head and (optionally) of the MTP head for the
/// last positions of a window. [`CachedModel`] and [`UncachedModel`] run the local [`Model`]; a model served
/// over the network can implement it too.
pub trait LanguageModel {
    /// V: the vocabulary size.
    fn vocab_size(&self) -> usize;
    /// The longest window a pass may cover.
    fn context(&self) -> usize;
    /// Whether the model has an MTP head (speculation needs one).
    fn has_mtp(&self) -> bool;
    /// One forward pass over `window` (T ≤ context positions, position 0 first), giving the logits of its
    /// last R = `rows` positions: main logits [R, V] (row i predicts the token after window[T − R + i])
    /// and, when asked, MTP logits [R, V] (row i predicts the token after that; the last row assumes the
    /// main head's argmax as its next token).
    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError>;
}

/// The local model run through a [`KvCache`]: each pass keeps the cached positions its window shares with
/// the previous one and runs only the rest (one or two positions while decoding; the whole window after a
/// re-base or a new prompt).
pub struct CachedModel<'m> {
    model: &'m mut Model,
    cache: KvCache,
    /// Runs the routed experts `model` does not hold (see [`Model::decode_with`]).
    experts: Option<Box<dyn ExpertRunner>>,
    /// The fewest of a token's top-k experts that must answer ([`OutsideExperts::k_min`]).
    k_min: usize,
}

impl<'m> CachedModel<'m> {
    /// Wraps `model` with an empty cache shaped for it.
    pub fn new(model: &'m mut Model) -> Self {
        let cache = model.new_cache();
        Self {
            model,
            cache,
            experts: None,
            k_min: usize::MAX,
        }
    }

    /// Wraps `model` (typically the trunk alone) with an empty cache, running the routed experts it does not
    /// hold through `experts`: how a client generates with experts hosted elsewhere.
    pub fn with_experts(model: &'m mut Model, experts: Box<dyn ExpertRunner>) -> Self {
        let cache = model.new_cache();
        Self {
            model,
            cache,
            experts: Some(experts),
            k_min: usize::MAX,
        }
    }

    /// The same model, with an expert the runner gets no answer for dropped for a token as long as the
    /// token keeps `k_min` of its top-k (see [`Model::decode_remote`]); by default every one must answer.
    /// A pass in which some token keeps fewer fails with [`crate::KernelError::TooFewExperts`], the cache
    /// as it was, and may be asked again.
    pub fn with_k_min(mut self, k_min: usize) -> Self {
        self.k_min = k_min;
        self
    }

    /// The cache (its length, its size in bytes).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

impl LanguageModel for CachedModel<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn context(&self) -> usize {
        self.model.config().context
    }

    fn has_mtp(&self) -> bool {
        self.model.config().mtp
    }

    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        let t = window.len();
        if rows == 0 || rows > t {
            return Err(CacheError::Rows { rows, tokens: t }.into());
        }
        // Keep the longest cached prefix of the window, but run at least the rows asked for.
        let shared = self
            .cache
            .tokens()
            .iter()
            .zip(window)
            .take_while(|(a, b)| a == b)
            .count();
        self.cache.truncate(shared.min(t - rows));
        let fresh = &window[self.cache.len()..];
        match self.experts.as_deref_mut() {
            Some(runner) => {
                let outside = OutsideExperts {
                    runner,
                    k_min: self.k_min,
                };
                self.model
                    .decode_remote(&mut self.cache, fresh, rows, main_out, mtp_out, outside)
            }
            None => self
                .model
                .decode_with(&mut self.cache, fresh, rows, main_out, mtp_out, None),
        }
    }
}

/// The local model recomputing the whole window every pass, through the same code as [`CachedModel`] from
/// an empty cache: the exact reference the cached path is tested against, and the "without cache" figure.
pub struct UncachedModel<'m> {
    model: &'m mut Model,
    cache: KvCache,
}

impl<'m> UncachedModel<'m> {
    /// Wraps `model`.
    pub fn new(model: &'m mut Model) -> Self {
        let cache = model.new_cache();
        Self { model, cache }
    }
}

impl LanguageModel for UncachedModel<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn context(&self) -> usize {
        self.model.config().context
    }

    fn has_mtp(&self) -> bool {
        self.model.config().mtp
    }

    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        self.cache.clear();
        self.model
            .decode(&mut self.cache, window, rows, main_out, mtp_out)
    }
}

/// Where the window of a sequence of `len` tokens starts, for a model whose context is `ctx` (see the
/// module doc): 0 while the sequence fits; past that, the window re-bases when it would exceed `ctx`, to
/// its newest `ctx − ⌊ctx/2⌋` tokens, so it always holds between that many and `ctx` tokens. A function of
/// `len` alone, so every way of reaching a length (one token a pass, two, a long prompt) sees the same
/// window.
pub fn window_start(len: usize, ctx: usize) -> usize {
    let ctx = ctx.max(1);
    if len <= ctx {
        return 0;
    }
    let keep = ctx - ctx / 2;
    // A re-base happens at lengths ctx + 1, ctx + 1 + period, ...: each time the window would reach ctx + 1.
    let period = ctx + 1 - keep;
    let first = ctx + 1;
    let last_rebase = first + (len - first) / period * period;
    last_rebase - keep
}

/// How the next token is chosen from the main head's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// A draw from softmax(logits / temperature), restricted to the smallest set of most likely tokens
    /// whose probabilities add up to at least `top_p`.
    Sample {
        /// Softmax temperature, > 0.
        temperature: f32,
        /// Nucleus mass, in (0, 1].
        top_p: f32,
    },
}

/// Settings of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateConfig {
    /// How many tokens to generate after the prompt.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Seed of the sampling draws (unused by greedy decoding).
    pub seed: u64,
    /// Whether to draft with the MTP head and verify with the main head.
    pub speculative: bool,
}

/// The prompt and the generated tokens as text, for a byte-level model: each token is one byte, and invalid
/// UTF-8 shows as U+FFFD. A token above 255 (which the model's vocabulary check rules out for a byte model)
/// shows as U+FFFD too rather than being truncated. `mana generate` and `mana demo`'s samples print this.
pub fn bytes_to_text(prompt: &[u32], tokens: &[u32]) -> String {
    let bytes: Vec<u8> = prompt
        .iter()
        .chain(tokens)
        .map(|&t| u8::try_from(t).unwrap_or(0xFF))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why generation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// The prompt holds no tokens (the model needs at least one position to predict from).
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A sampling setting is out of range.
    #[error("invalid sampling setting: {0}")]
    InvalidSampling(String),
    /// Speculation was asked of a model without an MTP head.
    #[error("speculative decoding needs a model with an MTP head")]
    NoMtp,
    /// The model refused a forward pass.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result of one generation, with counters that measure speculation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Generation {
    /// The generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Forward passes run.
    pub forward_passes: usize,
    /// Drafts that were verified.
    pub drafts: usize,
    /// Drafts the main model agreed with.
    pub accepted: usize,
}

impl Generation {
    /// Accepted drafts over verified drafts (0 when none was verified).
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafts == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafts as f64
        }
    }

    /// Generated tokens per forward pass (1 without speculation, up to 2 with it).
    pub fn tokens_per_pass(&self) -> f64 {
        if self.forward_passes == 0 {
            0.0
        } else {
            self.tokens.len() as f64 / self.forward_passes as f64
        }
    }
}

/// Generates up to `config.max_tokens` tokens after `prompt`.
pub fn generate(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    config: &GenerateConfig,
) -> Result<Generation, GenerateError> {
    generate_each(model, prompt, config, &mut |_| ControlFlow::Continue(()))
}

/// Generates like [`generate`] (the same tokens, the same passes), handing each token to `on_token` as soon
/// as it is committed, so that a caller can stream the text and stop early: when `on_token` breaks,
/// generation ends there and the [`Generation`] holds the tokens up to and including that one. It exists
/// for `mana serve`, which sends tokens as they come and stops at a stop string or when its client leaves.
pub fn generate_each(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    config: &GenerateConfig,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    check_sampling(config.sampling)?;
    if config.speculative && !model.has_mtp() {
        return Err(GenerateError::NoMtp);
    }
    let v = model.vocab_size();
    let ctx = model.context().max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut seq = prompt.to_vec();
    let mut out = Generation::default();
    let mut draft: Option<u32> = None;
    let mut window = Vec::with_capacity(ctx);
    let mut main = Vec::new();
    let mut mtp = Vec::new();
    let mut scratch = Vec::new();
    while out.tokens.len() < config.max_tokens {
        let start = window_start(seq.len(), ctx);
        // A draft is verified only when adding it would not re-base the window (so the verified rows see
        // the windows plain decoding gives them, see the module doc), and only when two tokens are still
        // wanted (verifying the last one would gain nothing).
        let verify = draft.filter(|_| {
            window_start(seq.len() + 1, ctx) == start && config.max_tokens - out.tokens.len() >= 2
        });
        window.clear();
        window.extend_from_slice(&seq[start..]);
        window.extend(verify);
        let rows = if verify.is_some() { 2 } else { 1 };
        main.resize(rows * v, 0.0);
        let want_mtp = config.speculative;
        if want_mtp {
            mtp.resize(rows * v, 0.0);
        }
        model.logits(
            &window,
            rows,
            &mut main,
            if want_mtp { Some(&mut mtp[..]) } else { None },
        )?;
        out.forward_passes += 1;
        let row = |i: usize| i * v..(i + 1) * v;
        // `last` is the row whose main prediction decides the next draft.
        let last = rows - 1;
        if let Some(d) = verify {
            out.drafts += 1;
            let c = choose(&main[row(0)], config.sampling, &mut rng, &mut scratch);
            seq.push(c);
            out.tokens.push(c);
            if on_token(c).is_break() {
                return Ok(out);
            }
            if c != d {
                draft = None;
                continue;
            }
            out.accepted += 1;
        }
        let logits = &main[row(last)];
        let next = choose(logits, config.sampling, &mut rng, &mut scratch);
        seq.push(next);
        out.tokens.push(next);
        if on_token(next).is_break() {
            return Ok(out);
        }
        // The MTP row assumed the main head's argmax as its input token: its draft is only worth verifying
        // when that is the token we committed.
        draft = (config.speculative && next == argmax(logits)).then(|| argmax(&mtp[row(last)]));
    }
    Ok(out)
}

fn check_sampling(sampling: Sampling) -> Result<(), GenerateError> {
    if let Sampling::Sample { temperature, top_p } = sampling {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(GenerateError::InvalidSampling(format!(
                "temperature {temperature} must be finite and > 0"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(GenerateError::InvalidSampling(format!(
                "top_p {top_p} must be in (0, 1]"
            )));
        }
    }
    Ok(())
}

/// The index of the largest logit (the lowest among ties; NaNs are never chosen over a number).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Chooses one token from `logits` according to `sampling`; `scratch` is reused between calls.
pub fn choose(
    logits: &[f32],
    sampling: Sampling,
    rng: &mut impl Rng,
    scratch: &mut Vec<(f32, u32)>,
) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample { temperature, top_p } => {
            sample_top_p(logits, temperature, top_p, rng, scratch)
        }
    }
}

/// A draw from the nucleus of softmax(logits / temperature): the most likely tokens (sorted by probability,
/// ties by id) whose mass first reaches `top_p`. Uses exactly one 64-bit random draw.
fn sample_top_p(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    rng: &mut impl Rng,
    probs: &mut Vec<(f32, u32)>,
) -> u32 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    probs.clear();
    let mut total = 0.0f64;
    for (i, &x) in logits.iter().enumerate() {
        let p = if x.is_nan() {
            0.0
        } else {
            ((x - max) / temperature).exp()
        };
        total += f64::from(p);
        probs.push((p, i as u32));
    }
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut nucleus = 0.0f64;
    let mut keep = probs.len();
    for (k, &(p, _)) in probs.iter().enumerate() {
        nucleus += f64::from(p);
        if nucleus >= f64::from(top_p) * total {
            keep = k + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let mass: f64 = kept.iter().map(|&(p, _)| f64::from(p)).sum();
    let mut target = u * mass;
    for &(p, id) in kept {
        target -= f64::from(p);
        if target < 0.0 {
            return id;
        }
    }
    kept.last().map_or(0, |&(_, id)| id)
}
