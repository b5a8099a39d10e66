//! The judges' results: each shard's next state is computed and signed by its judges (its holders and the
//! verifiers drawn for it, `ShardAttestation`), never by the conductor. The conductor publishes the state
//! machine's call for results, counts the signatures there, fetches each result a quorum signed by its hash
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

/// A result's blob fetched (or not) by a task of [`Role::fetch_result`].
pub(super) struct Fetched {
    round: u64,
    entry: ShardEntry,
    result: Result<(), NodeError>,
}

impl Role {
    /// Publishes the call for the round's results (the judges answer it), within the commit window.
    pub(super) async fn call_results(&mut self, call: AggregationCall) {
        let round = call.round;
        let shards = call.shards.len();
        if shards == 0 {
            return;
        }
        self.clock.called = Some(Instant::now());
        let patience = std::time::Duration::from_secs(10);
        match publish_patiently(&self.node, &Message::AggregationCall(call), patience).await {
            Ok(()) => tracing::info!(round, shards, "results called for"),
            Err(e) => tracing::warn!(round, error = %e, "call for results not published"),
        }
    }

    /// A judge's signed results: counted by the state machine; each result that has its quorum is fetched.
    pub(super) fn on_attestation(&mut self, signer: PublicKey, attestation: &ShardAttestation) {
        match self
            .machine
            .shard_attested(attestation.round, signer, attestation)
        {
            Ok(_) => {
                self.attestations += 1;
                self.fetch_ready();
            }
            Err(EventError::Refused(code)) => {
                tracing::debug!(round = attestation.round, judge = %peer_name(&signer), %code, "attestation not taken")
            }
        }
    }

    /// Starts fetching every result that has its quorum and is neither taken nor being fetched.
    pub(super) fn fetch_ready(&mut self) {
        let Some(round) = self.machine.state().round() else {
            return;
        };
        let r = round.announcement.round;
        for (entry, signers) in round.ready_results() {
            // A shard's blob has the same size every round (its layout is the run's): a signed size that
            // differs is refused before a byte is fetched, so a quorum of liars cannot make the coordinator
            // download more than a shard.
            let base = self.machine.checkpoint().shard(&entry.shard).map(|e| e.size);
            if base != Some(entry.size) {
                tracing::warn!(round = r, shard = %entry.shard, size = entry.size, ?base, "a signed result has another size than its shard; not fetched");
                continue;
            }
            if !self.fetching.insert(entry.hash) {
                continue;
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
                    let bytes = fetch_bytes_within(&node, entry.hash, entry.size, hints, timeout).await?;
                    let shard = entry.shard;
                    let len = bytes.len() as u64;
                    if len != entry.size {
                        return Err(NodeError::Config(format!(
                            "the blob of {shard} is {len} bytes, its signed entry says {}",
                            entry.size
                        )));
                    }
                    blocking(move || {
                        ShardRecord::from_bytes(&bytes, &spec, shard)?;
                        Ok(())
                    })
                    .await
                }
                .await;
                let _ = tx
                    .send(Fetched {
                        round: r,
                        entry,
                        result,
                    })
                    .await;
            });
        }
    }

    /// A result's blob arrived (or not): kept for the commit and reported to the state machine.
    pub(super) async fn on_fetched(&mut self, fetched: Fetched) {
        let Fetched {
            round,
            entry,
            result,
        } = fetched;
        self.fetching.remove(&entry.hash);
        if let Err(e) = result {
            tracing::warn!(round, shard = %entry.shard, hash = %entry.hash, error = %e, "a signed result could not be had; its shard holds unless it comes");
            self.failures += 1;
            return;
        }
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
        if let Err(e) = self.machine.shard_aggregated(round, entry) {
            tracing::debug!(round, shard = %entry.shard, error = %e, "result not taken");
        }
    }
}
