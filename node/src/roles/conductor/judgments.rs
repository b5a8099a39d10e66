//! The judges' verdicts and results: each shard's deltas are checked and scored, and its next state computed,
//! by its judges (its holders and the verifiers drawn for it), who sign both (`ShardAttestation`) and host the
//! result; never by the conductor. The conductor publishes the state machine's call for judgments and hands
//! it every attestation; the machine takes a result as soon as a quorum signed it. The conductor fetches no
//! payload and no shard: the commit names the result's hash, and holders, mirrors and the next round's
//! trainers fetch the bytes from the judges.

use std::time::Instant;

use mana_engine::coordinator::EventError;
use mana_protocol::{AggregationCall, Message, PublicKey, ShardAttestation};

use super::Role;
use crate::roles::common::{peer_name, publish_patiently};

impl Role {
    /// Publishes the call for the round's judgments (the judges answer it), within the commit window.
    pub(super) async fn call_results(&mut self, call: AggregationCall) {
        let round = call.round;
        let shards = call.shards.len();
        if shards == 0 {
            return;
        }
        self.clock.called = Some(Instant::now());
        let patience = std::time::Duration::from_secs(10);
        match publish_patiently(&self.node, &Message::AggregationCall(call), patience).await {
            Ok(()) => tracing::info!(round, shards, "judgments called for"),
            Err(e) => tracing::warn!(round, error = %e, "call for judgments not published"),
        }
    }

    /// A judge's signed results, counted by the state machine, which takes each result that now has its
    /// quorum.
    pub(super) fn on_attestation(&mut self, signer: PublicKey, attestation: &ShardAttestation) {
        match self
            .machine
            .shard_attested(attestation.round, signer, attestation)
        {
            Ok(taken) => {
                self.attestations += 1;
                for entry in taken {
                    tracing::debug!(round = attestation.round, shard = %entry.shard, hash = %entry.hash, "a quorum's result taken");
                }
                if let Some(called) = self.clock.called {
                    self.clock.apply_ms = called.elapsed().as_millis() as u64;
                }
            }
            Err(EventError::Refused(code)) => {
                tracing::debug!(round = attestation.round, judge = %peer_name(&signer), %code, "attestation not taken")
            }
        }
    }
}
