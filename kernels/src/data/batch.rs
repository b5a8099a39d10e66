//! One training batch: `B` sequences of `T + 1` byte tokens, the unit that the trainer consumes and that the
//! data module produces.
//!
//! Letters: B = batch size (sequences), T = sequence length (positions that predict).
//! `tokens` is B × (T + 1), row-major. Position t of a row predicts t + 1 with the main head and t + 2 with
//! the multi-token-prediction head, so each row carries one token beyond its T inputs.

use serde::{Deserialize, Serialize};

/// A batch of token sequences, each one token longer than the number of positions that predict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// B × (T + 1) token ids, row-major; row b is `tokens[b * (T + 1)..(b + 1) * (T + 1)]`.
    pub tokens: Vec<u32>,
    /// B: the number of sequences.
    pub batch_size: usize,
    /// T: the number of input positions per sequence (each row holds T + 1 tokens).
    pub seq_len: usize,
}

impl Batch {
    /// Builds a batch from rows laid out as described on [`Batch`], checking that the length matches.
    pub fn new(
        tokens: Vec<u32>,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Self, BatchShapeError> {
        let expected = batch_size
            .checked_mul(seq_len.checked_add(1).ok_or(BatchShapeError::Overflow)?)
            .ok_or(BatchShapeError::Overflow)?;
        if tokens.len() != expected {
            return Err(BatchShapeError::Length {
                expected,
                actual: tokens.len(),
            });
        }
        Ok(Self {
            tokens,
            batch_size,
            seq_len,
        })
    }

    /// The T + 1 tokens of row `b`, or `None` when `b >= B` or the buffer is shorter than its shape says.
    pub fn row(&self, b: usize) -> Option<&[u32]> {
        let width = self.seq_len + 1;
        let start = b.checked_mul(width)?;
        if b >= self.batch_size {
            return None;
        }
        self.tokens.get(start..start + width)
    }

    /// Iterates over the B rows of T + 1 tokens.
    pub fn rows(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.batch_size).filter_map(move |b| self.row(b))
    }

    /// B × T: the number of positions that the main head is trained on.
    pub fn predicted_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }
}

/// Why a token buffer does not fit the shape given for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchShapeError {
    /// The buffer's length is not B × (T + 1).
    #[error("batch holds {actual} tokens, but its shape needs {expected}")]
    Length {
        /// B × (T + 1).
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },
    /// B × (T + 1) does not fit in a usize.
    #[error("batch shape overflows usize")]
    Overflow,
}
