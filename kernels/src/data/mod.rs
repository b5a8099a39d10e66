//! Training data: the [`Batch`] that the trainer consumes and the datasets that produce batches.

pub mod batch;

pub use batch::{Batch, BatchShapeError};
