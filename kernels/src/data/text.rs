//! A byte-level text dataset: every byte is a token (V = 256), split into a training and a validation part,
//! with batches that are a pure function of (seed, data shard, step) so that any node can reproduce any
//! other node's batch.
//!
//! Letters: B = batch size, T = sequence length; a batch row holds T + 1 consecutive bytes.
//!
//! The split interleaves fixed-size blocks (every ~1/f-th block goes to validation) so that both parts see
//! every kind of text in the corpus, not just whatever happens to sit at the end of a file.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::batch::Batch;

/// The vocabulary of a byte-level dataset: one token per byte value.
pub const BYTE_VOCAB: usize = 256;

/// The largest B × (T + 1) a single batch may ask for (bounds the memory an untrusted request can cause).
pub const MAX_BATCH_TOKENS: usize = 1 << 24;

/// How the bytes are divided between training and validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Size of the blocks the text is cut into before they are dealt to either part (smaller for a text
    /// of fewer than 1 / `validation_fraction` blocks, so that validation is never left empty).
    pub block_bytes: usize,
    /// Fraction of the blocks (spread evenly) that go to validation; in [0, 0.5].
    pub validation_fraction: f64,
}

impl Default for Split {
    fn default() -> Self {
        Self {
            block_bytes: 4096,
            validation_fraction: 0.05,
        }
    }
}

/// Why a dataset could not be built or could not produce a batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DatasetError {
    /// The text holds no bytes at all.
    #[error("the text is empty")]
    Empty,
    /// One part of the split is too short to hold a single row of T + 1 bytes.
    #[error("the {part} part holds {have} bytes, fewer than the {need} one row of the batch needs")]
    TooShort {
        /// "training" or "validation".
        part: &'static str,
        /// T + 1.
        need: usize,
        /// The part's length in bytes.
        have: usize,
    },
    /// The split settings are out of range.
    #[error("invalid split: {0}")]
    InvalidSplit(String),
    /// B or T is zero, or B × (T + 1) exceeds [`MAX_BATCH_TOKENS`].
    #[error("invalid batch shape {batch_size} x ({seq_len} + 1)")]
    InvalidShape {
        /// B.
        batch_size: usize,
        /// T.
        seq_len: usize,
    },
}

/// A byte-level dataset held in memory: a training part and a validation part.
#[derive(Debug, Clone)]
pub struct TextDataset {
    train: Vec<u8>,
    validation: Vec<u8>,
}

impl TextDataset {
    /// Splits `text` into training and validation bytes according to `split`.
    pub fn new(text: &[u8], split: Split) -> Result<Self, DatasetError> {
        if text.is_empty() {
            return Err(DatasetError::Empty);
        }
        if split.block_bytes == 0 {
            return Err(DatasetError::InvalidSplit(
                "block_bytes must be positive".into(),
            ));
        }
        let f = split.validation_fraction;
        if !(0.0..=0.5).contains(&f) {
            return Err(DatasetError::InvalidSplit(format!(
                "validation_fraction {f} is outside [0, 0.5]"
            )));
        }
        let mut train = Vec::with_capacity(text.len());
        let mut validation =
            Vec::with_capacity((text.len() as f64 * f) as usize + split.block_bytes);
        // A text shorter than 1/f blocks would get no validation block at all: shrink the blocks so that
        // there are at least 1/f of them.
        let block_bytes = if f > 0.0 {
            let min_blocks = (1.0 / f).ceil() as usize;
            split.block_bytes.min((text.len() / min_blocks).max(1))
        } else {
            split.block_bytes
        };
        for (i, block) in text.chunks(block_bytes).enumerate() {
            // Block i goes to validation when the running count of validation blocks, floor((i + 1)·f),
            // steps up at i: this spreads them evenly, and f = 0 sends none.
            let before = (i as f64 * f).floor();
            let after = ((i + 1) as f64 * f).floor();
            if after > before {
                validation.extend_from_slice(block);
            } else {
                train.extend_from_slice(block);
            }
        }
        Ok(Self { train, validation })
    }

    /// The training bytes.
    pub fn train_bytes(&self) -> &[u8] {
        &self.train
    }

    /// The validation bytes.
    pub fn validation_bytes(&self) -> &[u8] {
        &self.validation
    }

    /// Checks that both parts hold at least one row of `seq_len + 1` bytes, so that a run with sequences of
    /// that length can draw training batches and measure validation loss: a command checks it before it
    /// starts, rather than failing at its first batch.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), DatasetError> {
        let need = seq_len + 1;
        for (part, bytes) in [("training", &self.train), ("validation", &self.validation)] {
            if bytes.len() < need {
                return Err(DatasetError::TooShort {
                    part,
                    need,
                    have: bytes.len(),
                });
            }
        }
        Ok(())
    }

    /// The vocabulary size a model needs for this dataset.
    pub fn vocab_size(&self) -> usize {
        BYTE_VOCAB
    }

    /// The training batch of data shard `shard` at optimizer step `step` for run seed `seed`: B rows of
    /// T + 1 consecutive training bytes at start offsets drawn uniformly. The same arguments always give
    /// the same batch; changing any of seed, shard or step gives an independent one.
    pub fn batch(
        &self,
        seed: u64,
        shard: u64,
        step: u64,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Batch, DatasetError> {
        let width = check_shape(batch_size, seq_len)?;
        let starts = self
            .train
            .len()
            .checked_sub(width)
            .ok_or(DatasetError::TooShort {
                part: "training",
                need: width,
                have: self.train.len(),
            })?
            + 1;
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&shard.to_le_bytes());
        key[16..24].copy_from_slice(&step.to_le_bytes());
        key[24..].copy_from_slice(b"mana/dat");
        let mut rng = ChaCha8Rng::from_seed(key);
        let mut tokens = Vec::with_capacity(batch_size * width);
        for _ in 0..batch_size {
            let start = uniform_below(&mut rng, starts as u64) as usize;
            tokens.extend(
                self.train[start..start + width]
                    .iter()
                    .map(|&b| u32::from(b)),
            );
        }
        Ok(Batch {
            tokens,
            batch_size,
            seq_len,
        })
    }

    /// The number of distinct validation windows of T + 1 bytes (they do not overlap).
    pub fn validation_windows(&self, seq_len: usize) -> usize {
        self.validation.len() / (seq_len + 1)
    }

    /// Validation batch number `index`: rows are the non-overlapping windows `index·B .. index·B + B` of the
    /// validation bytes (wrapping around), so a fixed index always gives the same batch, whatever the seed.
    pub fn validation_batch(
        &self,
        index: u64,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Batch, DatasetError> {
        let width = check_shape(batch_size, seq_len)?;
        let windows = self.validation_windows(seq_len);
        if windows == 0 {
            return Err(DatasetError::TooShort {
                part: "validation",
                need: width,
                have: self.validation.len(),
            });
        }
        let mut tokens = Vec::with_capacity(batch_size * width);
        for r in 0..batch_size as u64 {
            let w =
                (index.wrapping_mul(batch_size as u64).wrapping_add(r) % windows as u64) as usize;
            let start = w * width;
            tokens.extend(
                self.validation[start..start + width]
                    .iter()
                    .map(|&b| u32::from(b)),
            );
        }
        Ok(Batch {
            tokens,
            batch_size,
            seq_len,
        })
    }
}

/// Checks B and T and returns T + 1.
fn check_shape(batch_size: usize, seq_len: usize) -> Result<usize, DatasetError> {
    let bad = DatasetError::InvalidShape {
        batch_size,
        seq_len,
    };
    if batch_size == 0 || seq_len == 0 {
        return Err(bad);
    }
    let width = seq_len.checked_add(1).ok_or(bad.clone())?;
    match batch_size.checked_mul(width) {
        Some(n) if n <= MAX_BATCH_TOKENS => Ok(width),
        _ => Err(bad),
    }
}

/// A uniform integer in [0, n) (0 when n = 0), without modulo bias (Lemire's multiply-and-reject).
pub(crate) fn uniform_below(rng: &mut impl Rng, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}
