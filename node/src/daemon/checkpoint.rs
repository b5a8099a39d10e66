//! A checkpoint manifest becomes a store round: one form for the conductor (every committed round and round
//! 0, as a record without shards), the trainer (its own held shards) and a mirror (every synced checkpoint),
//! so the store holds the same form whoever commits.

use mana_protocol::{CheckpointManifest, ContentHash, ShardEntry};

use super::{NodeError, blocking};
use crate::store::{ManifestEntry, RoundManifest, Store};

/// When a store already holds this round or a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfPresent {
    /// Commit anyway (the store refuses a stale round with its typed error).
    Commit,
    /// Leave the store as it is (a restarted node whose rounds simply continue).
    Keep,
    /// Leave the store as it is if it holds this very checkpoint as this round (a commit done again after a
    /// crash that came before its caller recorded it); refuse another checkpoint for the round, or a store
    /// already past it, with the store's typed error.
    SameOnly,
}

/// Commits `checkpoint` as store round `checkpoint.round`: its shard entries are the round's manifest and its
/// encoding the round's metadata. With `manifest_blob` (the encoding, hosted as a blob by the caller), the
/// round also refers to that blob, so the store's collector keeps it while the round is kept. Returns whether
/// the round was committed (false only with [`IfPresent::Keep`] on a store at this round or later).
pub async fn commit_checkpoint(
    store: &Store,
    checkpoint: &CheckpointManifest,
    manifest_blob: Option<ContentHash>,
    if_present: IfPresent,
) -> Result<bool, NodeError> {
    commit_entries(
        store,
        checkpoint,
        &checkpoint.shards,
        manifest_blob,
        if_present,
    )
    .await
}

/// Commits `checkpoint` as store round `checkpoint.round` without its shards: the round's metadata is the
/// checkpoint's encoding and it refers to `manifest_blob` (that encoding, hosted by the caller), but it lists
/// and keeps no shard. The coordinator's record of what it committed: it never holds the shards themselves.
pub async fn commit_checkpoint_record(
    store: &Store,
    checkpoint: &CheckpointManifest,
    manifest_blob: ContentHash,
    if_present: IfPresent,
) -> Result<bool, NodeError> {
    commit_entries(store, checkpoint, &[], Some(manifest_blob), if_present).await
}

/// Commits `shards`, entries of `checkpoint`, as store round `checkpoint.round`: all of them for a mirror,
/// its share for a node that hosts a share of each checkpoint ([`super::NodeConfig::sync_only`]). The
/// round's metadata is the whole checkpoint's encoding either way, so the round is found by the
/// checkpoint's hash (an expert host answers from it after a restart); its manifest lists, and keeps, only
/// `shards`.
pub async fn commit_checkpoint_part(
    store: &Store,
    checkpoint: &CheckpointManifest,
    shards: &[ShardEntry],
) -> Result<bool, NodeError> {
    commit_entries(store, checkpoint, shards, None, IfPresent::Commit).await
}

async fn commit_entries(
    store: &Store,
    checkpoint: &CheckpointManifest,
    shards: &[ShardEntry],
    manifest_blob: Option<ContentHash>,
    if_present: IfPresent,
) -> Result<bool, NodeError> {
    let round = checkpoint.round;
    let meta = checkpoint.to_bytes()?;
    let entries: Vec<ManifestEntry> = shards
        .iter()
        .map(|e| ManifestEntry {
            shard: e.shard,
            hash: e.hash,
            len: e.size,
        })
        .collect();
    let store = store.clone();
    blocking(move || {
        match if_present {
            IfPresent::Keep if store.current_round()?.is_some_and(|c| c >= round) => {
                return Ok(false);
            }
            IfPresent::SameOnly
                if store.current_round()? == Some(round)
                    && store.manifest(round)?.is_some_and(|m| m.meta == meta) =>
            {
                if let Some(blob) = manifest_blob {
                    store.add_blob_refs(round, &[blob])?;
                }
                return Ok(false);
            }
            _ => {}
        }
        store.commit_round(round, &RoundManifest { entries, meta })?;
        if let Some(blob) = manifest_blob {
            store.add_blob_refs(round, &[blob])?;
        }
        Ok(true)
    })
    .await
}
