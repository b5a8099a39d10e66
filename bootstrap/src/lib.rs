//! The bootstrap node: a thin layer on `mana-node`'s network layer that runs only the DHT in server mode and
//! the relay, so that new nodes have a well-known place to join and home routers are no obstacle.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
