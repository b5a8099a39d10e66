//! The client's [`ExpertRunner`]: each routed expert a MoE layer needs is asked of a host of it over the
//! network, all of a layer's experts at once, every call under a timeout, falling back to the next replica
//! when a host fails, refuses or answers something that is not an answer to the call, and asking them all
//! again (with a doubling pause) while the call's time lasts. A host that failed is asked after the others
//! for a doubling back-off, and a peer that does not serve expert calls is dropped ([`super::health`]).
//!
//! An answer is used only when it names the checkpoint asked for and has the input's shape and finite
//! values; an honest one is then bit-identical to the expert run locally (the host runs the model's own
//! arithmetic, see [`mana_kernels::model::experts`]). A drawn share of answers is compared with a second
//! replica's, and a disagreement is settled by computing the expert here ([`super::check`]): the hosts
//! that answered wrong are banned and asked nothing more.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use libp2p::PeerId;
use mana_kernels::KernelError;
use mana_kernels::model::{ExpertCall, ExpertRunner};
use mana_protocol::{ContentHash, ExpertRequest, ExpertResponse, RunId, ShardId, Tensor};

use super::check::{AnswerCheck, same_bits};
use super::health::HostHealth;
use super::{lock, wire};
use crate::net::{Client, NetError};

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
    /// Checks a share of answers against a second replica; `None`: answers are taken as they come.
    check: Option<Arc<AnswerCheck>>,
    /// Which hosts to ask first (failed ones later, for a doubling back-off).
    health: Arc<Mutex<HostHealth>>,
    /// Calls answered, and calls that failed on some host (then retried on another).
    stats: Arc<Mutex<CallStats>>,
}

/// Counts of expert calls, for a client to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Expert calls answered.
    pub answered: u64,
    /// Bytes of requests sent.
    pub request_bytes: u64,
    /// Answers compared with a second replica's.
    pub checked: u64,
    /// Checked answers on which the two replicas disagreed (each settled by computing the expert here).
    pub disagreements: u64,
    /// Attempts that failed (timeout, refusal, bad answer), per host, before another host answered or all
    /// failed.
    pub failures: BTreeMap<PeerId, u64>,
}

impl CallStats {
    /// Attempts that failed on any host.
    pub fn failed_attempts(&self) -> u64 {
        self.failures.values().sum()
    }
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
            check: None,
            health: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// The same runner, checking answers with `check` (a drawn share against a second replica; wrong hosts
    /// banned).
    pub fn with_check(mut self, check: Arc<AnswerCheck>) -> Self {
        self.check = Some(check);
        self
    }

    /// The hosts banned for answering wrong.
    pub fn banned(&self) -> Vec<PeerId> {
        lock(&self.health).banned()
    }

    /// The hosts of expert `shard` in the order they would be asked (banned ones left out): where its
    /// shard blob is fetched from first.
    pub fn holders(&self, shard: ShardId) -> Vec<PeerId> {
        let hosts = self.hosts.get(&shard).map(Vec::as_slice).unwrap_or(&[]);
        lock(&self.health).order(hosts, std::time::Instant::now())
    }

    /// The counts so far.
    pub fn stats(&self) -> CallStats {
        self.lock_stats().clone()
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, CallStats> {
        lock(&self.stats)
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

/// One expert's answer: the output and the host that gave it, or every host's failure in the last pass.
type Answer = Result<(Vec<f32>, PeerId), String>;

/// Asks the hosts of one expert in turn until one answers, passing over them again while `timeout` lasts
/// when `again`; returns the answer and the host of each failed attempt.
async fn ask(
    net: &Client,
    hosts: &[PeerId],
    health: &Mutex<HostHealth>,
    request: &ExpertRequest,
    timeout: Duration,
    again: bool,
) -> (Answer, Vec<PeerId>) {
    let mut failed = Vec::new();
    let mut reasons = Vec::new();
    // Hosts store a checkpoint's shards a moment after its commit is heard: a pass over every replica that
    // all refuse is tried again, after a pause that doubles, until the call's time is spent.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = RETRY_PAUSE;
    loop {
        reasons.clear();
        let ordered = lock(health).order(hosts, std::time::Instant::now());
        for &peer in &ordered {
            let result = wire::call(net, peer, request, timeout).await;
            let unsupported = matches!(
                result,
                Err(wire::CallError::Net(NetError::StreamUnsupported { .. }))
            );
            let answer = result.map_err(|e| e.to_string()).and_then(|response| {
                check_answer(response, request.checkpoint, &request.input.shape)
            });
            match answer {
                Ok(values) => {
                    lock(health).succeeded(peer);
                    return (Ok((values, peer)), failed);
                }
                Err(reason) => {
                    tracing::debug!(%peer, shard = %request.shard, %reason, "expert call failed; next replica");
                    lock(health).failed(peer, unsupported, std::time::Instant::now());
                    failed.push(peer);
                    reasons.push(format!("{peer}: {reason}"));
                }
            }
        }
        if !again || ordered.is_empty() || tokio::time::Instant::now() + pause >= deadline {
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

/// What checking one answer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// Not checked (not drawn, or no second replica answered).
    No,
    /// A second replica gave the same answer.
    Agreed,
    /// The replicas disagreed; the answer was computed here and the wrong hosts banned.
    Disagreed,
}

/// Asks one expert's hosts (banned ones are left out by [`HostHealth::order`]) and, when the call is drawn
/// for a check, a second replica too; on a disagreement computes the answer here and bans the hosts that
/// gave another.
async fn ask_checked(
    net: &Client,
    hosts: &[PeerId],
    health: &Mutex<HostHealth>,
    request: &ExpertRequest,
    timeout: Duration,
    check: Option<&AnswerCheck>,
) -> (Result<Vec<f32>, String>, Vec<PeerId>, Checked) {
    let (answer, failed) = ask(net, hosts, health, request, timeout, true).await;
    let (values, first) = match answer {
        Ok(found) => found,
        Err(reason) => return (Err(reason), failed, Checked::No),
    };
    let Some(check) = check.filter(|c| c.draw()) else {
        return (Ok(values), failed, Checked::No);
    };
    let others: Vec<PeerId> = hosts.iter().copied().filter(|p| *p != first).collect();
    let (second, second_failed) = ask(net, &others, health, request, timeout, false).await;
    let failed = [failed, second_failed].concat();
    let Ok((other_values, second)) = second else {
        return (Ok(values), failed, Checked::No);
    };
    if same_bits(&values, &other_values) {
        return (Ok(values), failed, Checked::Agreed);
    }
    tracing::info!(shard = %request.shard, %first, %second, "expert replicas disagree; computing it here");
    let rows = request.input.shape.first().copied().unwrap_or(0) as usize;
    // The shard is fetched from the hosts still asked (not banned ones) first; the fetch checks its hash.
    let holders = lock(health).order(hosts, std::time::Instant::now());
    let judged = match request.input.to_f32() {
        Ok(x) => check
            .reference(request.shard, x, rows, holders)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match judged {
        Ok(truth) => {
            for (peer, given) in [(first, &values), (second, &other_values)] {
                if !same_bits(given, &truth) {
                    lock(health).ban(peer);
                }
            }
            (Ok(truth), failed, Checked::Disagreed)
        }
        Err(e) => (
            Err(format!(
                "hosts {first} and {second} disagree and the expert could not be computed here: {e}"
            )),
            failed,
            Checked::Disagreed,
        ),
    }
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
        let check = self.check.as_deref();
        let health = &*self.health;
        let answers = self
            .runtime
            .block_on(join_all(requests.iter().map(|request| {
                let peers = hosts.get(&request.shard).unwrap_or(&none);
                ask_checked(net, peers, health, request, timeout, check)
            })));
        for (call, (answer, failed, checked)) in calls.iter_mut().zip(answers) {
            {
                let mut stats = self.lock_stats();
                for peer in failed {
                    *stats.failures.entry(peer).or_default() += 1;
                }
                stats.checked += u64::from(checked != Checked::No);
                stats.disagreements += u64::from(checked == Checked::Disagreed);
            }
            let values = answer.map_err(|reason| unavailable(call.expert, reason))?;
            call.out.copy_from_slice(&values);
            self.lock_stats().answered += 1;
        }
        Ok(())
    }
}
