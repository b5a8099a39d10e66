//! Aggregation by the conductor: it holds the full model, so it computes every shard's new state from the
//! round's accepted deltas ([`apply_shard_round`]: payload-hash order, each at the commit's weight, and the
//! trunk's router biases moved by the accepted trunk payloads' expert loads), hosts the new blobs and
//! reports them to the state machine.

use std::sync::Arc;
use std::time::Instant;

use mana_engine::round::{ExpertLoads, apply_shard_round};
use mana_protocol::{
    AcceptedDeltas, ContentHash, RoundAnnouncement, ShardEntry, decode_contribution,
};

use super::Role;
use crate::daemon::{NodeError, blocking};
use crate::roles::common::fetch_bytes;

impl Role {
    /// Computes every shard's new state from its accepted deltas, hosts the blobs, reports them. A shard whose
    /// payload cannot be read again, whose update fails or whose blob cannot be stored is left out (the commit
    /// keeps its old state and lists its deltas as `late`); the others go on. Returns how many were left out.
    pub(super) async fn aggregate(
        &mut self,
        ann: &RoundAnnouncement,
        accepted: Vec<AcceptedDeltas>,
    ) -> u64 {
        let started = Instant::now();
        let round = ann.round;
        let mut failed = 0;
        let mut jobs = Vec::new();
        'shards: for list in &accepted {
            let Some(base) = self.model.state(&list.shard).cloned() else {
                tracing::error!(round, shard = %list.shard, "accepted deltas for a shard the model lacks");
                failed += 1;
                continue;
            };
            let mut deltas = Vec::new();
            let mut loads = Vec::new();
            for hash in &list.deltas {
                let values = match self.decoded.get(hash) {
                    Some(v) => v.clone(),
                    None => match self.decode_again(*hash, base.params.len()).await {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::error!(round, shard = %list.shard, payload = %hash, error = %e, "shard not aggregated: an accepted payload is gone");
                            failed += 1;
                            continue 'shards;
                        }
                    },
                };
                deltas.push((*hash, (*values).clone()));
                loads.extend(self.loads.get(hash).cloned());
            }
            jobs.push((list.shard, base, deltas, list.weights.clone(), loads));
        }
        let (spec, ann) = (self.cfg.spec.clone(), ann.clone());
        let jobs_len = jobs.len() as u64;
        let results = blocking(move || {
            let mut out = Vec::new();
            for (shard, base, deltas, weights, loads) in jobs {
                match apply_shard_round(&spec, &ann, &base, &deltas, &weights, &loads) {
                    Ok(state) => out.push((shard, state)),
                    Err(e) => tracing::error!(round, %shard, error = %e, "shard not aggregated"),
                }
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(round, error = %e, "aggregation failed");
            Vec::new()
        });
        failed += jobs_len - results.len() as u64;
        for (shard, state) in results {
            let bytes = state.to_bytes();
            let size = bytes.len() as u64;
            let hash = match self.node.host_blob_now(bytes).await {
                Ok(hash) => hash,
                Err(e) => {
                    tracing::error!(round, %shard, error = %e, "shard not aggregated: its new state was not stored");
                    failed += 1;
                    continue;
                }
            };
            // A durable reference for the round keeps the new state through a restart before the commit (pins
            // live in memory only, and the store collects unreferenced blobs when it opens): the restarted
            // coordinator's saved state names this result, and its commit reads the state back.
            let store = self.node.store().clone();
            if let Err(e) = blocking(move || Ok(store.add_blob_refs(round, &[hash])?)).await {
                tracing::error!(round, %shard, error = %e, "shard not aggregated: its new state could not be kept");
                failed += 1;
                continue;
            }
            self.pins.add(round, hash);
            self.pending.insert(shard, (hash, Arc::new(state)));
            let entry = ShardEntry {
                shard,
                hash,
                size,
                round,
            };
            if let Err(e) = self.machine.shard_aggregated(round, entry) {
                tracing::warn!(round, %shard, error = %e, "aggregation result not taken");
            }
        }
        self.clock.apply_ms += started.elapsed().as_millis() as u64;
        failed
    }

    /// An accepted payload fetched and decoded again (after a restart: it passed verification already).
    async fn decode_again(
        &mut self,
        hash: ContentHash,
        len: usize,
    ) -> Result<Arc<Vec<f32>>, NodeError> {
        let bytes = fetch_bytes(&self.node, hash, Vec::new(), self.cfg.fetch_timeout).await?;
        let c = blocking(move || Ok(decode_contribution(&bytes, len)?)).await?;
        let v = Arc::new(c.delta);
        self.decoded.insert(hash, v.clone());
        if !c.loads.is_empty() {
            self.loads.insert(
                hash,
                ExpertLoads {
                    sender: c.binding.sender,
                    counts: c.loads,
                },
            );
        }
        Ok(v)
    }
}
