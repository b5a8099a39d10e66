//! Holders' reports: every holder publishes its own manifest of its shards after a round; the conductor
//! compares each hash with its commit and counts reports and mismatches in its status.

use mana_protocol::{CheckpointManifest, PublicKey};

use super::Role;
use crate::roles::common::peer_name;

impl Role {
    /// A holder's manifest of its shards after a round: each hash must be the committed one.
    pub(super) fn on_holder_report(&mut self, signer: PublicKey, report: &CheckpointManifest) {
        let checkpoint = self.machine.checkpoint();
        if report.round != checkpoint.round {
            return;
        }
        self.holder_reports += 1;
        for entry in &report.shards {
            if checkpoint
                .shard(&entry.shard)
                .is_some_and(|c| c.hash != entry.hash)
            {
                self.holder_mismatches += 1;
                tracing::warn!(round = report.round, node = %peer_name(&signer), shard = %entry.shard, "a holder's shard differs from the commit");
            }
        }
    }
}
