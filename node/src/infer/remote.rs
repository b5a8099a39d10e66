//! The client's [`ExpertRunner`]: each routed expert a MoE layer needs is asked of a host of it over the
//! network, all of a layer's experts at once, every call under a timeout, falling back to the next replica
//! when a host fails, refuses or answers something that is not an answer to the call, and asking them all
//! again (with a doubling pause) while the call's time lasts.
//!
//! An answer is used only when it names the checkpoint asked for and has the input's shape and finite
//! values; it is then bit-identical to the expert run locally (the host runs the model's own arithmetic,
//! see [`mana_kernels::model::experts`]). Checking answers against a second replica is not done yet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use libp2p::PeerId;
use mana_kernels::KernelError;
use mana_kernels::model::{ExpertCall, ExpertRunner};
use mana_protocol::{ContentHash, ExpertRequest, ExpertResponse, RunId, ShardId, Tensor};

use super::wire;
use crate::net::Client;

/// Who hosts each expert shard, best first.
pub type Hosts = BTreeMap<ShardId, Vec<PeerId>>;

/// Calls experts of one checkpoint on the hosts in [`Hosts`]. Clones share their counts.
#[derive(Clone)]
pub struct NetworkExperts {
    net: Client,
    runtime: tokio::runtime::Handle,
    run: RunId,
    checkpoint: ContentHash,
    hosts: Hosts,
    timeout: Duration,
    /// Calls answered, and calls that failed on some host (then retried on another).
    stats: Arc<Mutex<CallStats>>,
}

/// Counts of expert calls, for a client to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Expert calls answered.
    pub answered: u64,
    /// Attempts that failed (timeout, refusal, bad answer) before another host answered or all failed.
    pub failed_attempts: u64,
    /// Bytes of requests sent.
    pub request_bytes: u64,
}

impl NetworkExperts {
    /// A runner for `checkpoint` of `run`, calling the hosts in `hosts` through `net` with `timeout` per
    /// call, on `runtime` (the runner is called from a blocking thread).
    pub fn new(
        net: Client,
        runtime: tokio::runtime::Handle,
        run: RunId,
        checkpoint: ContentHash,
        hosts: Hosts,
        timeout: Duration,
    ) -> Self {
        Self {
            net,
            runtime,
            run,
            checkpoint,
            hosts,
            timeout,
            stats: Arc::default(),
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> CallStats {
        *self.lock_stats()
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, CallStats> {
        // Plain counters: a panic elsewhere leaves them usable.
        self.stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The first pause before every replica of an expert is asked again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why one host's answer was not used.
fn check_answer(
    response: ExpertResponse,
    checkpoint: ContentHash,
    shape: &[u32],
) -> Result<Vec<f32>, String> {
    match response {
        ExpertResponse::Unavailable { reason } => Err(format!("unavailable: {reason}")),
        ExpertResponse::Output {
            checkpoint: used,
            output,
            ..
        } => {
            if used != checkpoint {
                return Err(format!("answered from checkpoint {used}, not {checkpoint}"));
            }
            if output.shape != shape {
                return Err(format!("output shape {:?}, not {shape:?}", output.shape));
            }
            let values = output.to_f32().map_err(|e| e.to_string())?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err("non-finite output".into());
            }
            Ok(values)
        }
    }
}

/// Asks the hosts of one expert in turn until one answers, passing over them again while `timeout` lasts;
/// returns the output and the failed attempts, or every host's failure in the last pass.
async fn ask(
    net: &Client,
    hosts: &[PeerId],
    request: &ExpertRequest,
    timeout: Duration,
) -> (Result<Vec<f32>, String>, u64) {
    let mut failed = 0;
    let mut reasons = Vec::new();
    // Hosts store a checkpoint's shards a moment after its commit is heard: a pass over every replica that
    // all refuse is tried again, after a pause that doubles, until the call's time is spent.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = RETRY_PAUSE;
    loop {
        reasons.clear();
        for &peer in hosts {
            let answer = match wire::call(net, peer, request, timeout).await {
                Ok(response) => check_answer(response, request.checkpoint, &request.input.shape),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(values) => return (Ok(values), failed),
                Err(reason) => {
                    tracing::debug!(%peer, shard = %request.shard, %reason, "expert call failed; next replica");
                    failed += 1;
                    reasons.push(format!("{peer}: {reason}"));
                }
            }
        }
        if hosts.is_empty() || tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    if reasons.is_empty() {
        reasons.push("no known host".into());
    }
    (Err(reasons.join("; ")), failed)
}

impl ExpertRunner for NetworkExperts {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        let unavailable = |expert: usize, reason: String| KernelError::ExpertUnavailable {
            layer,
            expert,
            reason,
        };
        let mut requests = Vec::with_capacity(calls.len());
        for call in calls.iter() {
            let shard = ShardId::expert(layer, call.expert)
                .map_err(|e| unavailable(call.expert, e.to_string()))?;
            let c = call.x.len() / call.rows.max(1);
            let shape = vec![call.rows as u32, c as u32];
            let input = Tensor::from_f32(shape, call.x)
                .map_err(|e| unavailable(call.expert, e.to_string()))?;
            self.lock_stats().request_bytes += input.data.0.len() as u64;
            requests.push(ExpertRequest {
                run: self.run.clone(),
                shard,
                checkpoint: self.checkpoint,
                input,
            });
        }
        let none = Vec::new();
        let (net, hosts, timeout) = (&self.net, &self.hosts, self.timeout);
        let answers = self
            .runtime
            .block_on(join_all(requests.iter().map(|request| {
                let peers = hosts.get(&request.shard).unwrap_or(&none);
                ask(net, peers, request, timeout)
            })));
        for (call, (answer, failed)) in calls.iter_mut().zip(answers) {
            self.lock_stats().failed_attempts += failed;
            let values = answer.map_err(|reason| unavailable(call.expert, reason))?;
            call.out.copy_from_slice(&values);
            self.lock_stats().answered += 1;
        }
        Ok(())
    }
}
