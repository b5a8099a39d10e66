//! The judges' verdicts and results: each shard's deltas are checked and scored, and its next state computed,
//! by its judges (its holders and the verifiers drawn for it), who sign both (`ShardAttestation`); never by
//! the conductor. The conductor publishes the state machine's call for judgments, counts the signatures there, fetches each result a quorum signed by its hash
//! from those who signed it, checks that the blob is a state of that shard, keeps it for the commit, and
//! reports it. A result that cannot be fetched or read is not taken: its shard keeps its state for the round
//! unless a later attestation brings the fetch again.

use std::time::Instant;

use mana_engine::coordinator::EventError;
use mana_engine::round::{RunShard, ShardRecord};
use mana_protocol::{
    AggregationCall, Message, PublicKey, ShardAttestation, ShardEntry,
};

use super::Role;
use crate::daemon::{NodeError, blocking};
use crate::roles::common::{fetch_bytes_within, peer_name, peer_of, publish_patiently};

/// A result's blob fetched and read (or not) by a task of [`Role::fetch_result`].
pub(super) struct Fetched {
    round: u64,
    entry: ShardEntry,
    result: Result<ShardRecord, NodeError>,
}

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

    /// A judge's signed results: counted by the state machine; each result that now has its quorum is
    /// fetched.
    pub(super) fn on_attestation(&mut self, signer: PublicKey, attestation: &ShardAttestation) {
        match self
            .machine
            .shard_attested(attestation.round, signer, attestation)
        {
            Ok(ready) => {
                self.attestations += 1;
                for entry in ready {
                    let signers = self
                        .machine
                        .state()
                        .round()
                        .and_then(|r| r.ready_result(&entry.shard))
                        .map(|(_, signers)| signers)
                        .unwrap_or_default();
                    self.fetch_result(attestation.round, entry, &signers);
                }
            }
            Err(EventError::Refused(code)) => {
                tracing::debug!(round = attestation.round, judge = %peer_name(&signer), %code, "attestation not taken")
            }
        }
    }

    /// Starts fetching every result that has its quorum and is not taken yet (after a restart).
    pub(super) fn fetch_ready(&mut self) {
        let Some(round) = self.machine.state().round() else {
            return;
        };
        let r = round.announcement.round;
        for (entry, signers) in round.ready_results() {
            self.fetch_result(r, entry, &signers);
        }
    }

    /// Starts fetching `entry`, a result a quorum signed, from its `signers`, unless it is being fetched; the
    /// blob is read as a state of its shard, and the outcome comes back as a [`Fetched`].
    fn fetch_result(&mut self, round: u64, entry: ShardEntry, signers: &[PublicKey]) {
        // A shard's blob has the same size every round (its layout is the run's): a signed size that differs
        // is refused before a byte is fetched, so a quorum of liars cannot make the coordinator download more
        // than a shard.
        let base = self.machine.checkpoint().shard(&entry.shard).map(|e| e.size);
        if base != Some(entry.size) {
            tracing::warn!(round, shard = %entry.shard, size = entry.size, ?base, "a signed result has another size than its shard; not fetched");
            return;
        }
        if self.machine.checkpoint().shard(&entry.shard) == Some(&entry) {
            // The judges accepted no delta: the shard keeps its base state, which is here already.
            if let Err(e) = self.machine.shard_aggregated(round, entry) {
                tracing::debug!(round, shard = %entry.shard, error = %e, "unchanged result not taken");
            }
            return;
        }
        if !self.fetching.insert(entry.hash) {
            return;
        }
        let hints = signers.iter().filter_map(peer_of).collect();
        let (node, spec, tx) = (
            self.node.clone(),
            self.cfg.spec.clone(),
            self.results_tx.clone(),
        );
        let timeout = self.cfg.fetch_timeout;
        tokio::spawn(async move {
            let result = async {
                // At most the shard's size, and hash-checked; a blob that is not a state of the shard does
                // not decode.
                let bytes =
                    fetch_bytes_within(&node, entry.hash, entry.size, hints, timeout).await?;
                let shard = entry.shard;
                blocking(move || Ok(ShardRecord::from_bytes(&bytes, &spec, shard)?)).await
            }
            .await;
            let _ = tx
                .send(Fetched {
                    round,
                    entry,
                    result,
                })
                .await;
        });
    }

    /// A result's blob arrived (or not): kept for the commit and reported to the state machine.
    pub(super) async fn on_fetched(&mut self, fetched: Fetched) {
        let Fetched {
            round,
            entry,
            result,
        } = fetched;
        self.fetching.remove(&entry.hash);
        let state = match result {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(round, shard = %entry.shard, hash = %entry.hash, error = %e, "a signed result could not be had; its shard holds unless it comes");
                self.failures += 1;
                return;
            }
        };
        // A durable reference for the round keeps the blob through a restart before the commit (pins live in
        // memory only, and the store collects unreferenced blobs when it opens).
        let store = self.node.store().clone();
        let hash = entry.hash;
        if let Err(e) = blocking(move || Ok(store.add_blob_refs(round, &[hash])?)).await {
            tracing::error!(round, shard = %entry.shard, error = %e, "a signed result could not be kept");
            self.failures += 1;
            return;
        }
        self.pins.add(round, hash);
        if let Some(called) = self.clock.called {
            self.clock.apply_ms = called.elapsed().as_millis() as u64;
        }
        match self.machine.shard_aggregated(round, entry) {
            // Read once: the commit takes the state from here.
            Ok(()) => {
                self.taken
                    .insert(entry.shard, (entry.hash, std::sync::Arc::new(state)));
            }
            Err(e) => tracing::debug!(round, shard = %entry.shard, error = %e, "result not taken"),
        }
    }
}
