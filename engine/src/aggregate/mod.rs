//! The aggregator: what a shard's holder does with the round's accepted deltas. [`clip::robust_mean`] combines
//! them (centered clipping, in payload-hash order, so every holder gets bit-identical results) and
//! [`outer`] applies the result with the round's update rule (`sync`: AdamW; `diloco`: Nesterov momentum).
//! Pure numerics over slices: fetching, decoding and storing the shard are the daemon's job.

pub mod clip;
pub mod outer;

pub use clip::{
    AggregateError, ClipConfig, Contribution, coordinate_median, plain_mean, robust_mean,
};
pub use outer::{DilocoRule, NesterovState, sync_step};
