//! The pure engine of a mana training run, between the protocol and the daemon: everything a round decides or
//! computes, as plain functions and state machines over protocol messages and shard states. It does no I/O,
//! reads no clock and draws no randomness of its own (the caller passes time and seeds in), so the compiler
//! keeps it free of the network and the store, and `mana simulate` and the engine's tests build without them.
//!
//! - [`coordinator`]: the coordinator's state machine (membership, assignment, phases, the commit record);
//! - [`round`]: the round maths (local training, norm bounds, the reproducible score, a holder's update, the in-process simulator);
//! - [`aggregate`]: the robust mean and the outer update rules.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
pub mod aggregate;
pub mod coordinator;
pub mod round;
