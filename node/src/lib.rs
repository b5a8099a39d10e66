//! The mana daemon: the libp2p network layer, the node/coordinator/client roles, the trainer and aggregator
//! that drive training rounds, and the crash-safe store of checkpoint shards.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
pub mod daemon;
pub mod keyfile;
pub mod net;
pub mod store;
pub mod roles;
