//! Checking the hosts' expert answers, so that a host that answers wrong is caught and banned.
//!
//! A host computes an expert with the model's row-invariant arithmetic ([`mana_kernels::model::ExpertKernel`]), so every honest
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

use std::sync::Arc;

use libp2p::PeerId;
use mana_engine::round::RunSpec;
use mana_protocol::{CheckpointManifest, ExpertRequest};

use super::dispatch::encode_answer;
use super::fetch::{ExpertFetchError, ExpertSource};
use crate::daemon::NodeHandle;
use crate::roles::common::draw_share;

/// The default share of expert calls a client checks against a second replica: one in ten.
pub const DEFAULT_CHECK_SHARE: f64 = 0.1;

/// What the client needs to check answers and to judge a disagreement: where to fetch the checkpoint's
/// experts from (by the hashes of the signed commit) and the share of calls to check.
pub struct AnswerCheck {
    source: ExpertSource,
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
            source: ExpertSource::new(node, spec, manifest),
            share,
        }
    }

    /// Whether this call is checked: true in the configured share of calls ([`draw_share`]).
    pub fn draw(&self) -> bool {
        draw_share(self.share)
    }

    /// The right answer to `request` (of this checkpoint), decoded: its expert computed here from the shard
    /// blob the checkpoint names (fetched from `holders` first, else through the DHT; the fetch checks the
    /// bytes against the hash; see [`ExpertSource::kernel`]) on the request's input as a host decodes it, then encoded as the request
    /// asks and decoded again, exactly as an honest host's answer reaches the client.
    pub async fn reference(
        &self,
        request: &ExpertRequest,
        holders: Vec<PeerId>,
    ) -> Result<Vec<f32>, ExpertFetchError> {
        let x = request.input.to_f32()?;
        let shape = request.input.shape.clone();
        let rows = shape.first().copied().unwrap_or(0) as usize;
        let answer = request.answer;
        let mut kernel = self.source.kernel(request.shard, holders).await?;
        tokio::task::spawn_blocking(move || {
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
