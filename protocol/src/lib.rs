//! Everything that crosses mana's wire between nodes, coordinators and clients: message types, their
//! canonical encoding, signed envelopes, the FP8 gradient-delta codec and the validation of decoded messages
//! against their context. This crate does no I/O: no sockets, no clock, no files.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
