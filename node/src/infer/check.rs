//! Checking the hosts' expert answers, so that a host that answers wrong is caught and banned.
//!
//! A host computes an expert with the model's row-invariant arithmetic ([`ExpertKernel`]), so every honest
//! host of a checkpoint's expert gives the same answer bit for bit, whatever else it computes. For a drawn
//! share of calls ([`AnswerCheck::draw`], from the OS's randomness so a host cannot foresee which) the client
//! asks a second replica as well and compares the two answers bit for bit. When they differ, one host lied,
//! and the client settles it the way any holder of the shard could: it fetches the expert's shard by the hash
//! the signed commit names, computes the answer itself ([`AnswerCheck::reference`]: on the request's input as
//! a host decodes it, encoded as the request asks, as a host does), uses that answer, and bans every host
//! whose answer differs from it ([`super::health`] keeps the bans: a banned host is asked nothing more in the
//! session). The verdict is reproducible: the commit, the shard and the request determine the right answer.
//!
//! Exact comparison holds for CPU hosts: the row product has a fixed order without fused multiply-add, so
//! it gives the same bits at every SIMD level. The one platform-dependent step is the activation's `exp`
//! (the C library's); hosts on different C libraries could differ in a last bit, and GPU hosts will need a
//! tolerance instead of equality. FP8 dispatch keeps equality: the encodings are deterministic
//! (`mana_protocol::tensor`), so hosts computing on the same decoded input give the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use libp2p::PeerId;
use mana_engine::round::{RunShard, RunSpec, ShardRecord};
use mana_kernels::model::{ExpertKernel, ModelError};
use mana_kernels::{CpuBackend, KernelError};
use mana_protocol::{CheckpointManifest, ContentHash, ExpertRequest, ProtocolError, ShardId};

use super::dispatch::encode_answer;
use crate::daemon::{NodeError, NodeHandle};
use crate::roles::common::draw_share;

/// The default share of expert calls a client checks against a second replica: one in ten.
pub const DEFAULT_CHECK_SHARE: f64 = 0.1;

/// Why the client could not compute an expert's answer itself.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
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
    Protocol(#[from] ProtocolError),
    /// The blocking computation was lost.
    #[error("the reference computation did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<NodeError> for ReferenceError {
    fn from(e: NodeError) -> Self {
        Self::Node(Box::new(e))
    }
}

/// What the client needs to check answers and to judge a disagreement: the node (to fetch shards), the
/// run's model, the checkpoint's shard hashes (from the signed commit) and the share of calls to check.
pub struct AnswerCheck {
    node: Arc<NodeHandle>,
    spec: RunSpec,
    shards: BTreeMap<ShardId, ContentHash>,
    share: f64,
}

impl AnswerCheck {
    /// Checks a `share` (0 to 1) of the calls for the experts of `manifest`, judging disagreements from its
    /// shards fetched through `node`.
    pub fn new(
        node: Arc<NodeHandle>,
        spec: RunSpec,
        manifest: &CheckpointManifest,
        share: f64,
    ) -> Self {
        Self {
            node,
            spec,
            shards: manifest.shards.iter().map(|e| (e.shard, e.hash)).collect(),
            share,
        }
    }

    /// Whether this call is checked: true in the configured share of calls ([`draw_share`]).
    pub fn draw(&self) -> bool {
        draw_share(self.share)
    }

    /// The right answer to `request` (of this checkpoint), decoded: its expert computed here from the shard
    /// blob the checkpoint names (fetched from `holders` first, else through the DHT; the fetch checks the
    /// bytes against the hash) on the request's input as a host decodes it, then encoded as the request
    /// asks and decoded again, exactly as an honest host's answer reaches the client.
    pub async fn reference(
        &self,
        request: &ExpertRequest,
        holders: Vec<PeerId>,
    ) -> Result<Vec<f32>, ReferenceError> {
        let shard = request.shard;
        let x = request.input.to_f32()?;
        let shape = request.input.shape.clone();
        let rows = shape.first().copied().unwrap_or(0) as usize;
        let answer = request.answer;
        let hash = *self
            .shards
            .get(&shard)
            .ok_or(ReferenceError::NotInCheckpoint(shard))?;
        self.node.fetch_blob_from(hash, holders).await?;
        let bytes = self.node.read_blob(hash).await?;
        let spec = self.spec.clone();
        tokio::task::spawn_blocking(move || {
            let record = ShardRecord::from_bytes(&bytes, &spec, shard).map_err(|e| {
                ReferenceError::Shard {
                    shard,
                    source: Box::new(e),
                }
            })?;
            let mut kernel =
                ExpertKernel::new(&spec.model, &record.params, Box::new(CpuBackend::new()))?;
            let mut out = vec![0.0f32; x.len()];
            kernel.forward(&x, rows, &mut out)?;
            Ok(encode_answer(answer, shape, &out)?.to_f32()?)
        })
        .await?
    }
}

/// Whether two answers are the same bit for bit (what honest hosts give).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
