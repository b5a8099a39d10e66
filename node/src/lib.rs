//! The mana daemon: the libp2p network layer, the node itself, the roles that drive the pure engine
//! (`mana-engine`) on the network (the conductor that `mana coordinator` runs, the trainer), and the crash-safe
//! store of checkpoint shards, and inference across the network (expert hosts and clients).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
pub mod daemon;
pub mod infer;
pub mod keyfile;
pub mod net;
pub mod roles;
pub mod store;
