//! The trainer's error-feedback residuals, kept in its store so that they survive a restart.
//!
//! What a node's codec drops from a delta (top-k's unsent values, the quantization error) is not lost: the
//! node's [`DeltaEncoder`] keeps it and adds it to the next round's delta. That residual is the node's own
//! state, worth as much as the deltas it will send: a node that lost it on a restart would silently drop
//! everything its codec had deferred. So after each round's encoding the trainer stores each shard's residual:
//! the values as a blob (f32 little-endian), referenced by the round so the store's pruning collects old
//! ones, and a small record (kind [`RecordKind::RoundState`], one per run and shard) naming the blob, the
//! codec options it was made under and its length. A restarted trainer that is assigned the shard again
//! under the same options goes on from it; under other options, or if the blob was pruned, it starts afresh
//! (and says so in its log).

use mana_protocol::{CodecOptions, ContentHash, DeltaEncoder, RunId, ShardId};
use serde::{Deserialize, Serialize};

use crate::daemon::{NodeError, NodeHandle, blocking};
use crate::store::RecordKind;

/// What the record of one shard's residual says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResidualRecord {
    /// The round whose encoding left it.
    round: u64,
    /// The blob of its values.
    blob: ContentHash,
    /// Values.
    len: usize,
    /// The codec options it was made under.
    options: CodecOptions,
}

/// The record key of `shard`'s residual in `run`.
fn key(run: &RunId, shard: ShardId) -> Vec<u8> {
    format!("trainer/residual/{run}/{shard}").into_bytes()
}

/// Stores `encoder`'s residual for `shard`, as left by round `round`'s encoding.
pub(crate) async fn save(
    node: &NodeHandle,
    run: &RunId,
    shard: ShardId,
    round: u64,
    encoder: &DeltaEncoder,
) -> Result<(), NodeError> {
    let bytes: Vec<u8> = encoder
        .residual()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let record = ResidualRecord {
        round,
        blob: ContentHash::of(&bytes),
        len: encoder.residual().len(),
        options: *encoder.options(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| NodeError::Config(e.to_string()))?;
    let (store, key) = (node.store().clone(), key(run, shard));
    blocking(move || {
        let pin = store.put_blob(&bytes)?;
        store.put_record_with_blobs(RecordKind::RoundState, &key, &value, round, &[pin.hash()])?;
        Ok(())
    })
    .await
}

/// The encoder to go on with for `shard` under `options`: from the stored residual when there is one of
/// `len` values made under the same options, else a fresh one.
pub(crate) async fn load(
    node: &NodeHandle,
    run: &RunId,
    shard: ShardId,
    options: CodecOptions,
    len: usize,
) -> Result<DeltaEncoder, NodeError> {
    let (store, key) = (node.store().clone(), key(run, shard));
    let found = blocking(move || {
        let Some(value) = store.get_record(RecordKind::RoundState, &key)? else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<ResidualRecord>(&value) else {
            return Ok(None);
        };
        if record.options != options || record.len != len {
            return Ok(Some((record, None)));
        }
        let values = match store.get_blob(&record.blob) {
            Ok(bytes) if bytes.len() == 4 * len => Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>(),
            ),
            _ => None,
        };
        Ok(Some((record, values)))
    })
    .await?;
    match found {
        Some((record, Some(values))) => match DeltaEncoder::from_residual(options, values) {
            Ok(encoder) => {
                tracing::info!(%shard, round = record.round, "error-feedback residual restored from the store");
                return Ok(encoder);
            }
            Err(e) => {
                tracing::warn!(%shard, error = %e, "stored error-feedback residual unusable; starting afresh")
            }
        },
        Some((record, None)) => tracing::warn!(
            %shard,
            round = record.round,
            "stored error-feedback residual not usable (other codec options, other length, or pruned); starting afresh"
        ),
        None => {}
    }
    Ok(DeltaEncoder::new(options)?)
}

/// Forgets `shard`'s residual (the node no longer hosts it).
pub(crate) async fn forget(node: &NodeHandle, run: &RunId, shard: ShardId) {
    let (store, key) = (node.store().clone(), key(run, shard));
    if let Err(e) = blocking(move || Ok(store.remove_record(RecordKind::RoundState, &key)?)).await {
        tracing::warn!(%shard, error = %e, "stored residual not removed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::daemon::{self, NodeConfig};

    /// Whether loading the trunk's residual under `options` and `len` gives a fresh encoder.
    async fn fresh(node: &NodeHandle, run: &RunId, options: CodecOptions, len: usize) -> bool {
        load(node, run, ShardId::Trunk, options, len)
            .await
            .unwrap()
            .residual()
            .is_empty()
    }

    fn sparse() -> CodecOptions {
        CodecOptions {
            top_k_density: Some(0.1),
            ..CodecOptions::default()
        }
    }

    /// A residual stored by one run of the node is found by the next one on the same data directory, under
    /// the same codec options and length only; a forgotten one is gone.
    #[tokio::test]
    async fn a_residual_survives_a_restart_under_the_same_options_only() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId::new("residuals").unwrap();
        let shard = ShardId::Trunk;
        let delta: Vec<f32> = (0..300).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        let mut encoder = DeltaEncoder::new(sparse()).unwrap();
        encoder.encode(&delta).unwrap();
        let kept = encoder.residual().to_vec();
        assert!(kept.iter().any(|v| *v != 0.0), "top-k left nothing behind");

        let node = daemon::start(NodeConfig::for_tests(dir.path()))
            .await
            .unwrap();
        // Nothing stored yet: a fresh encoder.
        assert!(fresh(&node, &run, sparse(), 300).await);
        save(&node, &run, shard, 4, &encoder).await.unwrap();
        node.shutdown().await.unwrap();

        let node = daemon::start(NodeConfig::for_tests(dir.path()))
            .await
            .unwrap();
        let mut restored = load(&node, &run, shard, sparse(), 300).await.unwrap();
        assert_eq!(restored.residual(), &kept[..]);
        // It goes on exactly as the encoder that never stopped.
        let next: Vec<f32> = delta.iter().map(|d| d * 0.5).collect();
        assert_eq!(
            restored.encode(&next).unwrap(),
            encoder.encode(&next).unwrap()
        );
        // Other options or another length: afresh.
        assert!(fresh(&node, &run, CodecOptions::default(), 300).await);
        assert!(fresh(&node, &run, sparse(), 301).await);
        // Another run's, or another shard's: none.
        let other = RunId::new("other").unwrap();
        assert!(fresh(&node, &other, sparse(), 300).await);
        forget(&node, &run, shard).await;
        assert!(fresh(&node, &run, sparse(), 300).await);
        node.shutdown().await.unwrap();
    }
}
