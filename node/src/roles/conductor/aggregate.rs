//! Aggregation by the conductor: it holds the full model, so it computes every shard's new state from the
//! round's accepted deltas ([`apply_round`], payload-hash order), hosts the new blobs and reports them to the
//! state machine.

use std::sync::Arc;
use std::time::Instant;

use mana_engine::round::apply_round;
use mana_protocol::{AcceptedDeltas, RoundAnnouncement, ShardEntry, decode_contribution};

use super::Role;
use crate::daemon::{NodeError, blocking};
use crate::roles::common::fetch_bytes;

impl Role {
    /// Computes every shard's new state from its accepted deltas, hosts the blobs, reports them.
    pub(super) async fn aggregate(
        &mut self,
        ann: &RoundAnnouncement,
        accepted: Vec<AcceptedDeltas>,
    ) -> Result<(), NodeError> {
        let started = Instant::now();
        let round = ann.round;
        let mut jobs = Vec::new();
        for list in &accepted {
            let Some(base) = self.model.state(&list.shard).cloned() else {
                tracing::error!(round, shard = %list.shard, "accepted deltas for a shard the model lacks");
                continue;
            };
            let mut deltas = Vec::new();
            for hash in &list.deltas {
                let values = match self.decoded.get(hash) {
                    Some(v) => v.clone(),
                    None => {
                        // After a restart: fetch and decode again (it passed verification already).
                        let bytes =
                            fetch_bytes(&self.node, *hash, Vec::new(), self.cfg.fetch_timeout)
                                .await?;
                        let len = base.params.len();
                        let v = blocking(move || Ok(decode_contribution(&bytes, len)?.1)).await?;
                        let v = Arc::new(v);
                        self.decoded.insert(*hash, v.clone());
                        v
                    }
                };
                deltas.push((*hash, (*values).clone()));
            }
            jobs.push((list.shard, base, deltas));
        }
        let (spec, hyper) = (self.cfg.spec.clone(), ann.hyper.clone());
        let results = blocking(move || {
            let mut out = Vec::new();
            for (shard, base, deltas) in jobs {
                match apply_round(&spec, &hyper, round, &base, &deltas) {
                    Ok(state) => out.push((shard, state)),
                    Err(e) => tracing::error!(round, %shard, error = %e, "shard not aggregated"),
                }
            }
            Ok(out)
        })
        .await?;
        for (shard, state) in results {
            let bytes = state.to_bytes();
            let size = bytes.len() as u64;
            let hash = self.node.host_blob_now(bytes).await?;
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
        Ok(())
    }
}
