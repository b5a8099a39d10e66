//! The client's [`ExpertRunner`]: each routed expert a MoE layer needs is asked of a host of it over the
//! network, all of a layer's experts at once, every call under a timeout, falling back to the next replica
//! when a host fails, refuses or answers something that is not an answer to the call, and asking them all
//! again (with a doubling pause) while the call's time lasts, unless every one of them is in back-off
//! already (then one pass). Healthy hosts are asked fastest first; a host that failed is asked after the
//! others for a doubling back-off, and a peer that does not serve expert calls is dropped
//! ([`super::health`]).
//!
//! An expert no replica answered in time is not an error: its call is marked missing
//! ([`ExpertCall::missing`], counted in [`CallStats::dropped`]), and the model drops it for its tokens
//! under the `k_min` rule ([`mana_kernels::model::experts`]); a step that cannot go on is waited for and
//! run again by [`super::patient`].
//!
//! The hidden states go out and the outputs come back in the encodings of the runner's [`Dispatch`] (FP8
//! hidden states and f32 answers by default, [`super::dispatch`]). An answer is used only when it names the
//! checkpoint asked for and has the input's shape, the asked encoding and finite values (a host whose answer
//! names another checkpoint, shape or encoding is banned: no honest host gives one); an honest one is
//! then bit-identical to the expert run locally on the decoded input, encoded the same way (the host runs the
//! model's own arithmetic, see [`mana_kernels::model::experts`]). A drawn share of answers is compared with a
//! second replica's, and a disagreement is settled by computing the expert here ([`super::check`]): the hosts
//! that answered wrong are banned and asked nothing more.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use libp2p::PeerId;
use mana_kernels::KernelError;
use mana_kernels::model::{ExpertCall, ExpertRunner};
use mana_protocol::{ContentHash, ExpertRequest, ExpertResponse, RunId, ShardId, TensorDtype};

use super::check::{AnswerCheck, same_bits};
use super::dispatch::Dispatch;
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
    /// The encodings of the hidden states sent and the answers asked for.
    dispatch: Dispatch,
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
    /// Bytes of the hidden-state tensors sent (codes and scales; once per call, however many hosts were
    /// asked).
    pub request_bytes: u64,
    /// Bytes of the output tensors of the answers used (once per call).
    pub response_bytes: u64,
    /// Answers compared with a second replica's.
    pub checked: u64,
    /// Checked answers on which the two replicas disagreed (each settled by computing the expert here).
    pub disagreements: u64,
    /// Attempts that failed (timeout, refusal, bad answer), per host, before another host answered or all
    /// failed.
    pub failures: BTreeMap<PeerId, u64>,
    /// How long answered calls took (second-replica checks included), from opening the stream to the
    /// decoded answer.
    pub latency: LatencyHistogram,
    /// Expert calls that no replica answered in time: each expert was dropped for that step's tokens that
    /// chose it (under the `k_min` rule), or its step stalled.
    pub dropped: u64,
    /// Steps in which some token kept fewer than `k_min` of its experts: each waited, then ran again
    /// ([`super::patient`]).
    pub stalled: u64,
}

/// Call times in buckets of an eighth of an octave (each bucket 9% wider than the last), from 1 µs up; longer
/// than the last bucket counts in it. Fixed size, so a long-lived client (`mana serve`) keeps counting
/// without growing; a quantile is read to within one bucket (9%).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

/// Buckets per octave of [`LatencyHistogram`].
const PER_OCTAVE: f64 = 8.0;
/// Buckets of [`LatencyHistogram`]: 27 octaves from 1 µs, past two minutes.
const LATENCY_BUCKETS: usize = 27 * 8;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; LATENCY_BUCKETS],
        }
    }
}

impl LatencyHistogram {
    /// Counts one call that took `took`.
    pub fn record(&mut self, took: Duration) {
        let micros = took.as_secs_f64() * 1e6;
        let bucket = if micros <= 1.0 {
            0
        } else {
            ((micros.log2() * PER_OCTAVE).ceil() as usize).min(LATENCY_BUCKETS - 1)
        };
        self.counts[bucket] += 1;
    }

    /// Takes away the calls of `earlier`, a copy of this histogram taken before: what remains are the calls
    /// counted since (for figures over a part of a session).
    pub fn subtract(&mut self, earlier: &LatencyHistogram) {
        for (count, before) in self.counts.iter_mut().zip(&earlier.counts) {
            *count = count.saturating_sub(*before);
        }
    }

    /// Calls counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The time under which a share `q` (0 to 1) of the calls ended: the upper edge of the bucket holding
    /// that call; `None` before any call.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let bucket = self.counts.iter().position(|&c| {
            seen += c;
            seen >= rank
        })?;
        Some(Duration::from_secs_f64(
            2f64.powf(bucket as f64 / PER_OCTAVE) / 1e6,
        ))
    }
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
            dispatch: Dispatch::default(),
            check: None,
            health: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// The same runner, sending hidden states and asking for answers in `dispatch`'s encodings.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// The same runner, checking answers with `check` (a drawn share against a second replica; wrong hosts
    /// banned).
    pub fn with_check(mut self, check: Arc<AnswerCheck>) -> Self {
        self.check = Some(check);
        self
    }

    /// Who is asked for each expert (before [`HostHealth`] orders them).
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
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

    /// Counts a step that stalled for want of answers.
    pub(crate) fn note_stall(&self) {
        self.lock_stats().stalled += 1;
    }
}

/// The first pause before every replica of an expert is asked again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// An answer that passed [`check_answer`].
struct Answered {
    /// The output, decoded.
    values: Vec<f32>,
    /// Bytes of the output tensor.
    bytes: u64,
    /// The host that gave it.
    host: PeerId,
}

/// Why a host's answer was not used.
#[derive(Debug)]
struct Unusable {
    reason: String,
    /// An answer no honest host gives, whatever its load or version: another checkpoint than the one
    /// asked for (a host answers from it or refuses), another shape than the input's, another encoding
    /// than the one asked for, or a tensor whose bytes do not decode as it says. Its host is banned, as
    /// one caught answering wrong values is. (Non-finite values are not such proof: a committed model
    /// whose expert overflows on this input gives them on every host.)
    malformed: bool,
}

impl Unusable {
    fn failed(reason: String) -> Self {
        Unusable {
            reason,
            malformed: false,
        }
    }

    fn malformed(reason: String) -> Self {
        Unusable {
            reason,
            malformed: true,
        }
    }
}

/// The decoded output of one host's answer and its tensor's bytes, or why it was not used.
fn check_answer(
    response: ExpertResponse,
    checkpoint: ContentHash,
    shape: &[u32],
    answer: TensorDtype,
) -> Result<(Vec<f32>, u64), Unusable> {
    match response {
        ExpertResponse::Unavailable { reason } => {
            Err(Unusable::failed(format!("unavailable: {reason}")))
        }
        ExpertResponse::Output {
            checkpoint: used,
            output,
            ..
        } => {
            if used != checkpoint {
                return Err(Unusable::malformed(format!(
                    "answered from checkpoint {used}, not {checkpoint}"
                )));
            }
            if output.shape != shape {
                return Err(Unusable::malformed(format!(
                    "output shape {:?}, not {shape:?}",
                    output.shape
                )));
            }
            if output.dtype != answer {
                return Err(Unusable::malformed(format!(
                    "answered in {}, not {answer}",
                    output.dtype
                )));
            }
            let values = output
                .to_f32()
                .map_err(|e| Unusable::malformed(e.to_string()))?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Unusable::failed("non-finite output".into()));
            }
            Ok((values, output.data.0.len() as u64))
        }
    }
}

/// One expert's answer, or every host's failure in the last pass.
type Answer = Result<Answered, String>;

/// Asks the hosts of one expert in turn until one answers, passing over them again while `timeout` lasts
/// when `again`; returns the answer and the host of each failed attempt.
async fn ask(
    net: &Client,
    hosts: &[PeerId],
    health: &Mutex<HostHealth>,
    stats: &Mutex<CallStats>,
    request: &ExpertRequest,
    timeout: Duration,
    again: bool,
) -> (Answer, Vec<PeerId>) {
    let mut failed = Vec::new();
    let mut reasons = Vec::new();
    // Hosts store a checkpoint's shards a moment after its commit is heard, and a connection may drop: a
    // pass over every replica that all fail is tried again, after a pause that doubles, until the call's
    // time is spent. Hosts that all failed lately are asked once, not waited for: the model drops an expert
    // that got no answer when `k_min` allows, and otherwise the whole step waits (`super::patient`).
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = RETRY_PAUSE;
    let again = again && !lock(health).all_failing(hosts, std::time::Instant::now());
    loop {
        reasons.clear();
        let ordered = lock(health).order(hosts, std::time::Instant::now());
        for &peer in &ordered {
            let started = std::time::Instant::now();
            let result = wire::call(net, peer, request, timeout).await;
            let took = started.elapsed();
            let unsupported = matches!(
                result,
                Err(wire::CallError::Net(NetError::StreamUnsupported { .. }))
            );
            let answer = result
                .map_err(|e| Unusable::failed(e.to_string()))
                .and_then(|response| {
                    check_answer(
                        response,
                        request.checkpoint,
                        &request.input.shape,
                        request.answer,
                    )
                });
            match answer {
                Ok((values, bytes)) => {
                    lock(health).succeeded(peer, took);
                    lock(stats).latency.record(took);
                    let answered = Answered {
                        values,
                        bytes,
                        host: peer,
                    };
                    return (Ok(answered), failed);
                }
                Err(Unusable { reason, malformed }) => {
                    tracing::debug!(%peer, shard = %request.shard, %reason, "expert call failed; next replica");
                    if malformed {
                        lock(health).ban(peer);
                    }
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

/// Why an expert got no usable answer.
#[derive(Debug)]
enum NoAnswer {
    /// No replica answered in time (every one failed, refused or is gone): the expert is missing.
    Unanswered(String),
    /// Two replicas disagreed and the expert could not be computed here: a step error.
    Unsettled(String),
}

/// Asks one expert's hosts (banned ones are left out by [`HostHealth::order`]) and, when the call is drawn
/// for a check, a second replica too; on a disagreement computes the answer here and bans the hosts that
/// gave another. Returns the output and its tensor's bytes.
async fn ask_checked(
    net: &Client,
    hosts: &[PeerId],
    health: &Mutex<HostHealth>,
    stats: &Mutex<CallStats>,
    request: &ExpertRequest,
    timeout: Duration,
    check: Option<&AnswerCheck>,
) -> (Result<(Vec<f32>, u64), NoAnswer>, Vec<PeerId>, Checked) {
    let (answer, failed) = ask(net, hosts, health, stats, request, timeout, true).await;
    let Answered {
        values,
        bytes,
        host: first,
    } = match answer {
        Ok(found) => found,
        Err(reason) => return (Err(NoAnswer::Unanswered(reason)), failed, Checked::No),
    };
    let Some(check) = check.filter(|c| c.draw()) else {
        return (Ok((values, bytes)), failed, Checked::No);
    };
    let others: Vec<PeerId> = hosts.iter().copied().filter(|p| *p != first).collect();
    // The second replica gets the first one's patience: right after a commit it may not have stored the
    // round yet, and a check asked once then would go unchecked (a replica that keeps failing is asked once,
    // by `ask`'s own rule).
    let (second, second_failed) = ask(net, &others, health, stats, request, timeout, true).await;
    let failed = [failed, second_failed].concat();
    let Ok(Answered {
        values: other_values,
        host: second,
        ..
    }) = second
    else {
        return (Ok((values, bytes)), failed, Checked::No);
    };
    if same_bits(&values, &other_values) {
        return (Ok((values, bytes)), failed, Checked::Agreed);
    }
    tracing::info!(shard = %request.shard, %first, %second, "expert replicas disagree; computing it here");
    // The shard is fetched from the hosts still asked (not banned ones) first; the fetch checks its hash.
    let holders = lock(health).order(hosts, std::time::Instant::now());
    let judged = check
        .reference(request, holders)
        .await
        .map_err(|e| e.to_string());
    match judged {
        Ok(truth) => {
            for (peer, given) in [(first, &values), (second, &other_values)] {
                if !same_bits(given, &truth) {
                    lock(health).ban(peer);
                }
            }
            (Ok((truth, bytes)), failed, Checked::Disagreed)
        }
        Err(e) => (
            Err(NoAnswer::Unsettled(format!(
                "hosts {first} and {second} disagree and the expert could not be computed here: {e}"
            ))),
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
            let input = self
                .dispatch
                .encode_input(call.x, call.rows)
                .map_err(|e| unavailable(call.expert, e.to_string()))?;
            self.lock_stats().request_bytes += input.data.0.len() as u64;
            requests.push(ExpertRequest {
                run: self.run.clone(),
                shard,
                checkpoint: self.checkpoint,
                input,
                answer: self.dispatch.answer,
            });
        }
        let none = Vec::new();
        let (net, hosts, timeout) = (&self.net, &self.hosts, self.timeout);
        let check = self.check.as_deref();
        let health = &*self.health;
        let stats = &*self.stats;
        let answers = self
            .runtime
            .block_on(join_all(requests.iter().map(|request| {
                let peers = hosts.get(&request.shard).unwrap_or(&none);
                ask_checked(net, peers, health, stats, request, timeout, check)
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
            match answer {
                Ok((values, bytes)) => {
                    call.out.copy_from_slice(&values);
                    let mut stats = self.lock_stats();
                    stats.answered += 1;
                    stats.response_bytes += bytes;
                }
                Err(NoAnswer::Unanswered(reason)) => {
                    tracing::warn!(
                        layer,
                        expert = call.expert,
                        %reason,
                        "no replica of the expert answered; dropped for this step's tokens \
                         (if each keeps k_min experts)"
                    );
                    call.missing = true;
                    self.lock_stats().dropped += 1;
                }
                Err(NoAnswer::Unsettled(reason)) => return Err(unavailable(call.expert, reason)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_protocol::{Tensor, Text};

    #[test]
    fn answers_no_honest_host_gives_are_told_from_failures() {
        let checkpoint = ContentHash::of(b"checkpoint");
        let output = |dtype, shape: Vec<u32>, values: &[f32]| ExpertResponse::Output {
            round: 1,
            checkpoint,
            output: Tensor::encode(dtype, shape, values).expect("tensor"),
        };
        let check = |response| check_answer(response, checkpoint, &[1, 2], TensorDtype::F32);
        let (values, bytes) =
            check(output(TensorDtype::F32, vec![1, 2], &[1.0, -2.0])).expect("used");
        assert_eq!((values, bytes), (vec![1.0, -2.0], 8));
        let failed = |r: Result<_, Unusable>| !r.expect_err("not used").malformed;
        let malformed = |r: Result<_, Unusable>| r.expect_err("not used").malformed;
        // A refusal or a non-finite output may come from an honest host (busy; an expert that overflows).
        let busy = ExpertResponse::Unavailable {
            reason: Text::new("busy").expect("text"),
        };
        assert!(failed(check(busy)));
        assert!(failed(check(output(
            TensorDtype::F32,
            vec![1, 2],
            &[1.0, f32::NAN]
        ))));
        // Another checkpoint, shape or encoding, or bytes that do not decode: never an honest answer.
        let mut elsewhere = output(TensorDtype::F32, vec![1, 2], &[1.0, 2.0]);
        if let ExpertResponse::Output { checkpoint, .. } = &mut elsewhere {
            *checkpoint = ContentHash::of(b"another");
        }
        assert!(malformed(check(elsewhere)));
        assert!(malformed(check(output(
            TensorDtype::F32,
            vec![2, 1],
            &[1.0, 2.0]
        ))));
        assert!(malformed(check(output(
            TensorDtype::Bf16,
            vec![1, 2],
            &[1.0, 2.0]
        ))));
        let mut short = output(TensorDtype::F32, vec![1, 2], &[1.0, 2.0]);
        if let ExpertResponse::Output { output, .. } = &mut short {
            output.data.0.truncate(4);
        }
        assert!(malformed(check(short)));
    }

    #[test]
    fn latency_quantiles_are_read_to_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 98 calls of 1 ms, 2 of 100 ms.
        for _ in 0..98 {
            h.record(Duration::from_millis(1));
        }
        for _ in 0..2 {
            h.record(Duration::from_millis(100));
        }
        assert_eq!(h.count(), 100);
        let within = |got: Option<Duration>, want: Duration| {
            let got = got.expect("calls counted").as_secs_f64();
            let want = want.as_secs_f64();
            assert!(got >= want && got <= want * 1.091, "{got} against {want}");
        };
        within(h.quantile(0.5), Duration::from_millis(1));
        within(h.quantile(0.98), Duration::from_millis(1));
        within(h.quantile(0.99), Duration::from_millis(100));
        within(h.quantile(1.0), Duration::from_millis(100));
        // Extremes land in the first and last buckets instead of failing.
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(3600));
        assert_eq!(h.quantile(0.0), Some(Duration::from_micros(1)));
        assert!(h.quantile(1.0).expect("counted") >= Duration::from_secs(120));
        // What was counted after a copy, alone.
        let earlier = h.clone();
        h.record(Duration::from_millis(5));
        h.subtract(&earlier);
        assert_eq!(h.count(), 1);
        within(h.quantile(0.5), Duration::from_millis(5));
    }
}
