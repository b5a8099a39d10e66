//! An expert of the committed checkpoint, built here from its shard: fetched by the hash the signed commit
//! names (the fetch checks the bytes against it), decoded for the run's model and turned into an
//! [`ExpertKernel`], the arithmetic every host answers with. The answer check ([`super::check`]) computes a
//! disputed answer with it; the client's expert cache ([`super::cache`]) runs the experts it holds with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use libp2p::PeerId;
use mana_engine::round::{RunShard, RunSpec, ShardRecord};
use mana_kernels::model::{ExpertKernel, ModelError};
use mana_kernels::{CpuBackend, KernelError};
use mana_protocol::{CheckpointManifest, ContentHash, ShardId};

use crate::daemon::{NodeError, NodeHandle};

/// Why the client could not build or run an expert of the checkpoint itself.
#[derive(Debug, thiserror::Error)]
pub enum ExpertFetchError {
    /// The signed commit names no such shard.
    #[error("the checkpoint has no shard {0}")]
    NotInCheckpoint(ShardId),
    /// Fetching or reading the shard failed.
    #[error(transparent)]
    Node(Box<NodeError>),
    /// The shard does not decode for the run's model.
    #[error("shard {shard}: {source}")]
    Shard {
        /// The shard.
        shard: ShardId,
        /// Why it does not decode.
        source: Box<mana_engine::round::RoundError>,
    },
    /// The expert could not be built from the shard.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The expert's arithmetic failed (a shape the request should not have had).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The request's input does not decode, or the output does not encode as asked.
    #[error(transparent)]
    Protocol(#[from] mana_protocol::ProtocolError),
    /// The blocking computation was lost.
    #[error("the expert's blocking work did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<NodeError> for ExpertFetchError {
    fn from(e: NodeError) -> Self {
        Self::Node(Box::new(e))
    }
}

/// Where the client's own copies of experts come from: the node (to fetch shards), the run's model and
/// the checkpoint's shard hashes (from the signed commit). Cheap to clone.
#[derive(Clone)]
pub struct ExpertSource {
    node: Arc<NodeHandle>,
    spec: RunSpec,
    shards: Arc<BTreeMap<ShardId, ContentHash>>,
}

impl ExpertSource {
    /// The experts of `manifest` for `spec`'s model, fetched through `node`.
    pub fn new(node: Arc<NodeHandle>, spec: RunSpec, manifest: &CheckpointManifest) -> Self {
        Self {
            node,
            spec,
            shards: Arc::new(manifest.shards.iter().map(|e| (e.shard, e.hash)).collect()),
        }
    }

    /// Expert `shard` built from the shard blob the checkpoint names, fetched from `holders` first, else
    /// through the DHT (the fetch checks the bytes against the hash). Decoding and building run on a
    /// blocking thread.
    pub async fn kernel(
        &self,
        shard: ShardId,
        holders: Vec<PeerId>,
    ) -> Result<ExpertKernel, ExpertFetchError> {
        let hash = *self
            .shards
            .get(&shard)
            .ok_or(ExpertFetchError::NotInCheckpoint(shard))?;
        self.node.fetch_blob_from(hash, holders).await?;
        let bytes = self.node.read_blob(hash).await?;
        let spec = self.spec.clone();
        tokio::task::spawn_blocking(move || {
            let record = ShardRecord::from_bytes(&bytes, &spec, shard).map_err(|e| {
                ExpertFetchError::Shard {
                    shard,
                    source: Box::new(e),
                }
            })?;
            Ok(ExpertKernel::new(
                &spec.model,
                &record.params,
                Box::new(CpuBackend::new()),
            )?)
        })
        .await?
    }
}
