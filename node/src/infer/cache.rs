//! Hot experts: a client that computes the few experts its prompts route to most itself, and asks the
//! network only for the rest (`mana infer --cache-experts N`).
//!
//! [`CachedExperts`] is the session's [`ExpertRunner`]. It counts the rows routed to every (layer, expert)
//! in the session's calls ([`RoutingCounts`]), runs the experts it holds here as [`ExpertKernel`](mana_kernels::model::ExpertKernel)s and
//! hands every other call to [`NetworkExperts`]. An expert it holds is built from the committed shard,
//! fetched by the hash the signed commit names ([`ExpertSource`]), and computed with the arithmetic every
//! host answers with, so a local answer is bit-identical to a host's and the output does not change.
//!
//! Policy ([`plan`]): the cache holds the `capacity` experts with the most rows routed so far in the session
//! (ties: the lower layer, then the lower index), and only experts that were routed at all. The ranking is
//! looked at again after every committed token and at the end of each generation ([`CachedExperts::refresh`]):
//! routing over a prompt predicts the routing of its continuation, so the first look, right after the
//! prompt's pass, already finds most of the experts worth holding. What entered the top is fetched in the
//! background, never inside a step: a step uses what is held when it runs, and the fetched experts join (and
//! the ones that left the top go) all at once when every fetch has ended. One fetch is in flight at a time,
//! which also bounds the traffic while the ranking is still moving; the counts add up over the session, so
//! the ranking settles as it grows. An expert whose fetch fails stays with the network for the session.
//! [`CachedExperts::settle`] waits until the held experts are the ranking's top (tests; a server between
//! requests).
//!
//! Why a runner around [`NetworkExperts`] rather than inserting the experts into the client's trunk
//! [`mana_kernels::model::Model`] (whose `decode_with` runs the experts it holds): the model's parameters are
//! one flat buffer laid out when it is built, so adding or dropping an expert mid-session would mean
//! re-laying and re-rounding the model between steps, with the model borrowed by the generation that is
//! running; the runner's set changes under a short lock between two layer calls, and the counting needs the
//! runner's view anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use mana_kernels::KernelError;
use mana_kernels::model::{ExpertCall, ExpertRunner, KernelExperts};
use mana_protocol::ShardId;

use super::fetch::ExpertSource;
use super::lock;
use super::remote::NetworkExperts;

/// Rows routed to each expert in a session's calls: what ranks the experts worth holding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingCounts {
    rows: BTreeMap<ShardId, u64>,
}

impl RoutingCounts {
    /// No rows yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `rows` rows routed to `shard`.
    pub fn record(&mut self, shard: ShardId, rows: usize) {
        *self.rows.entry(shard).or_default() += rows as u64;
    }

    /// Rows routed to `shard` so far.
    pub fn rows(&self, shard: ShardId) -> u64 {
        self.rows.get(&shard).copied().unwrap_or(0)
    }

    /// Every routed expert with its rows, most rows first (ties: the lower shard first).
    pub fn ranked(&self) -> Vec<(ShardId, u64)> {
        let mut ranked: Vec<(ShardId, u64)> = self
            .rows
            .iter()
            .filter(|(_, rows)| **rows > 0)
            .map(|(s, r)| (*s, *r))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
    }

    /// The `n` most-routed experts (fewer when fewer were routed), leaving out those in `skip`.
    pub fn top(&self, n: usize, skip: &BTreeSet<ShardId>) -> Vec<ShardId> {
        self.ranked()
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| !skip.contains(s))
            .take(n)
            .collect()
    }
}

/// What one look at the ranking decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachePlan {
    /// The experts to hold: the top of the ranking, at most the capacity.
    pub want: Vec<ShardId>,
    /// Wanted and not held: to fetch.
    pub fetch: Vec<ShardId>,
    /// Held and no longer wanted: to drop (once the fetches end, so the cache never holds more than its
    /// capacity).
    pub drop: Vec<ShardId>,
}

/// The plan for a cache of `capacity` experts holding `held`: the `capacity` most-routed experts that are not
/// `unfetchable`.
pub fn plan(
    counts: &RoutingCounts,
    held: &BTreeSet<ShardId>,
    capacity: usize,
    unfetchable: &BTreeSet<ShardId>,
) -> CachePlan {
    let want = counts.top(capacity, unfetchable);
    let fetch = want.iter().filter(|s| !held.contains(s)).copied().collect();
    let drop = held.iter().filter(|s| !want.contains(s)).copied().collect();
    CachePlan { want, fetch, drop }
}

/// What the cache did, for a client to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Most experts held.
    pub capacity: usize,
    /// The experts held now, in shard order.
    pub held: Vec<ShardId>,
    /// Expert calls computed here (the network's are in [`super::CallStats::answered`]).
    pub local_calls: u64,
    /// Experts fetched and built.
    pub fetched: u64,
    /// Experts dropped after they left the top.
    pub dropped: u64,
    /// Fetches that failed (that expert then stays with the network for the session).
    pub fetch_failures: u64,
}

/// The cache's bookkeeping, shared by the runner (on the decode thread) and the background fetch; locked
/// only briefly.
struct CacheState {
    counts: RoutingCounts,
    /// The experts in [`CachedExperts::kernels`].
    held: BTreeSet<ShardId>,
    /// Experts whose fetch failed: left to the network.
    unfetchable: BTreeSet<ShardId>,
    /// The fetch in flight, if any.
    in_flight: Option<tokio::task::JoinHandle<()>>,
    stats: CacheStats,
}

/// The client's runner: counts the routing, runs the held experts here and the rest on the network.
/// Clones share the cache.
#[derive(Clone)]
pub struct CachedExperts {
    network: NetworkExperts,
    source: ExpertSource,
    runtime: tokio::runtime::Handle,
    state: Arc<Mutex<CacheState>>,
    /// The held experts, locked by a layer's call for as long as it runs and by the fetch's change to the
    /// set (on a blocking thread); always taken before `state` when both are.
    kernels: Arc<Mutex<KernelExperts>>,
}

impl CachedExperts {
    /// A runner holding up to `capacity` experts (0: none; every call goes to `network`), built from shards
    /// fetched through `source`, fetching in the background on `runtime`.
    pub fn new(
        network: NetworkExperts,
        source: ExpertSource,
        runtime: tokio::runtime::Handle,
        capacity: usize,
    ) -> Self {
        let state = CacheState {
            counts: RoutingCounts::new(),
            held: BTreeSet::new(),
            unfetchable: BTreeSet::new(),
            in_flight: None,
            stats: CacheStats {
                capacity,
                ..CacheStats::default()
            },
        };
        Self {
            network,
            source,
            runtime,
            state: Arc::new(Mutex::new(state)),
            kernels: Arc::default(),
        }
    }

    /// The runner that asks the network.
    pub fn network(&self) -> &NetworkExperts {
        &self.network
    }

    /// The rows routed so far.
    pub fn routing(&self) -> RoutingCounts {
        lock(&self.state).counts.clone()
    }

    /// The counts so far and the experts held.
    pub fn stats(&self) -> CacheStats {
        let state = lock(&self.state);
        CacheStats {
            held: state.held.iter().copied().collect(),
            ..state.stats.clone()
        }
    }

    /// Looks at the ranking: unless a change is in flight, starts fetching (in the background) the experts
    /// that entered the top, and dropping the ones that left once those are in. Returns whether it started
    /// a change. Cheap (a sort of the routed experts); never waits.
    pub fn refresh(&self) -> bool {
        let mut state = lock(&self.state);
        let capacity = state.stats.capacity;
        if capacity == 0 || state.in_flight.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let plan = plan(&state.counts, &state.held, capacity, &state.unfetchable);
        if plan.fetch.is_empty() && plan.drop.is_empty() {
            return false;
        }
        tracing::debug!(fetch = ?plan.fetch, drop = ?plan.drop, "expert cache: following the ranking");
        let holders: Vec<_> = plan
            .fetch
            .iter()
            .map(|s| self.network.holders(*s))
            .collect();
        let (source, shared, kernels) = (
            self.source.clone(),
            self.state.clone(),
            self.kernels.clone(),
        );
        state.in_flight = Some(self.runtime.spawn(async move {
            let built = join_all(
                plan.fetch
                    .iter()
                    .zip(holders)
                    .map(|(shard, holders)| source.kernel(*shard, holders)),
            )
            .await;
            // The set changes on a blocking thread: it waits for a layer's call that is running.
            let change = tokio::task::spawn_blocking(move || {
                let mut kernels = lock(&kernels);
                let mut state = lock(&shared);
                for (shard, kernel) in plan.fetch.iter().zip(built) {
                    match kernel.and_then(|k| Ok(kernels.insert(*shard, k)?)) {
                        Ok(()) => {
                            state.held.insert(*shard);
                            state.stats.fetched += 1;
                        }
                        Err(e) => {
                            tracing::warn!(%shard, error = %e, "expert cache: fetch failed; the network keeps serving it");
                            state.unfetchable.insert(*shard);
                            state.stats.fetch_failures += 1;
                        }
                    }
                }
                for shard in &plan.drop {
                    if kernels.remove(*shard).is_some() {
                        state.held.remove(shard);
                        state.stats.dropped += 1;
                    }
                }
            });
            if let Err(e) = change.await {
                tracing::warn!(error = %e, "expert cache: changing the held experts failed");
            }
        }));
        true
    }

    /// Waits until the held experts are the top of the ranking so far (or the fetches of the missing ones
    /// failed): the change in flight, then another look, until one starts nothing. Ends: with the counts
    /// still (no generation runs meanwhile), each pass either brings the held set to the top or marks an
    /// expert unfetchable.
    pub async fn settle(&self) {
        loop {
            let in_flight = lock(&self.state).in_flight.take();
            if let Some(task) = in_flight
                && let Err(e) = task.await
            {
                tracing::warn!(error = %e, "expert cache: a fetch was lost");
            }
            if !self.refresh() {
                return;
            }
        }
    }
}

impl ExpertRunner for CachedExperts {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        {
            let mut state = lock(&self.state);
            for call in calls.iter() {
                if let Ok(shard) = ShardId::expert(layer, call.expert) {
                    state.counts.record(shard, call.rows);
                }
            }
        }
        let mut kernels = lock(&self.kernels);
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        // Where each network call sits in `calls`, to hand back the ones no replica answered.
        let mut remote_at = Vec::new();
        for (at, call) in calls.iter_mut().enumerate() {
            let part = ExpertCall {
                expert: call.expert,
                rows: call.rows,
                x: call.x,
                out: &mut *call.out,
                missing: false,
            };
            if kernels.holds(layer, call.expert) {
                local.push(part);
            } else {
                remote_at.push(at);
                remote.push(part);
            }
        }
        lock(&self.state).stats.local_calls += local.len() as u64;
        let kernels = &mut *kernels;
        let network = &mut self.network;
        // The held experts compute on a scoped thread while this one waits on the network, so a layer
        // takes the longer of the two, not their sum.
        let result = match (local.is_empty(), remote.is_empty()) {
            (true, true) => Ok(()),
            (false, true) => kernels.run_layer(layer, &mut local),
            (true, false) => network.run_layer(layer, &mut remote),
            (false, false) => std::thread::scope(|s| {
                let expert = local[0].expert;
                let here = s.spawn(|| kernels.run_layer(layer, &mut local));
                let there = network.run_layer(layer, &mut remote);
                let here = here.join().unwrap_or_else(|_| {
                    Err(KernelError::ExpertUnavailable {
                        layer,
                        expert,
                        reason: "the local expert computation panicked".into(),
                    })
                });
                here.and(there)
            }),
        };
        let missing: Vec<usize> = remote_at
            .iter()
            .zip(&remote)
            .filter(|(_, part)| part.missing)
            .map(|(&at, _)| at)
            .collect();
        drop((local, remote));
        for at in missing {
            calls[at].missing = true;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expert(layer: usize, index: usize) -> ShardId {
        ShardId::expert(layer, index).expect("in bounds")
    }

    fn counts(rows: &[((usize, usize), usize)]) -> RoutingCounts {
        let mut counts = RoutingCounts::new();
        for &((layer, index), r) in rows {
            counts.record(expert(layer, index), r);
        }
        counts
    }

    #[test]
    fn the_ranking_is_by_rows_then_by_shard_and_leaves_out_unrouted_experts() {
        let c = counts(&[
            ((1, 3), 5),
            ((1, 0), 2),
            ((2, 1), 5),
            ((1, 3), 1),
            ((1, 7), 0),
        ]);
        assert_eq!(c.rows(expert(1, 3)), 6);
        assert_eq!(
            c.ranked(),
            vec![(expert(1, 3), 6), (expert(2, 1), 5), (expert(1, 0), 2)]
        );
        // A tie goes to the lower shard.
        let tie = counts(&[((2, 0), 4), ((1, 5), 4)]);
        assert_eq!(tie.top(1, &BTreeSet::new()), vec![expert(1, 5)]);
        // Never an expert that was not routed, even with room to spare.
        assert_eq!(c.top(10, &BTreeSet::new()).len(), 3);
        assert_eq!(
            c.top(2, &BTreeSet::from([expert(1, 3)])),
            vec![expert(2, 1), expert(1, 0)]
        );
    }

    #[test]
    fn a_plan_fetches_what_entered_the_top_and_drops_what_left_it() {
        let c = counts(&[((1, 0), 9), ((1, 1), 8), ((1, 2), 7), ((1, 3), 1)]);
        let none = BTreeSet::new();
        let empty = plan(&c, &BTreeSet::new(), 2, &none);
        assert_eq!(empty.want, vec![expert(1, 0), expert(1, 1)]);
        assert_eq!(empty.fetch, empty.want);
        assert!(empty.drop.is_empty());

        let held = BTreeSet::from([expert(1, 1), expert(1, 3)]);
        let moved = plan(&c, &held, 2, &none);
        assert_eq!(moved.fetch, vec![expert(1, 0)]);
        assert_eq!(moved.drop, vec![expert(1, 3)]);

        // Held and wanted: nothing to do.
        let settled = plan(&c, &BTreeSet::from([expert(1, 0), expert(1, 1)]), 2, &none);
        assert!(settled.fetch.is_empty() && settled.drop.is_empty());

        // An expert that could not be fetched gives its place to the next one.
        let failed = BTreeSet::from([expert(1, 0)]);
        let around = plan(&c, &BTreeSet::new(), 2, &failed);
        assert_eq!(around.want, vec![expert(1, 1), expert(1, 2)]);

        // A capacity of 0 holds nothing and drops all.
        let zero = plan(&c, &held, 0, &none);
        assert!(zero.want.is_empty() && zero.fetch.is_empty());
        assert_eq!(zero.drop, held.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn held_plus_fetched_minus_dropped_never_exceeds_the_capacity() {
        // Any held set within capacity, any counts: applying the plan stays within capacity and ends at the
        // wanted set.
        let c = counts(&[
            ((1, 0), 3),
            ((1, 1), 3),
            ((1, 2), 2),
            ((2, 0), 5),
            ((2, 1), 1),
        ]);
        let all: Vec<ShardId> = c.ranked().into_iter().map(|(s, _)| s).collect();
        for capacity in 0..=all.len() {
            for mask in 0u32..(1 << all.len()) {
                let held: BTreeSet<ShardId> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| *s)
                    .collect();
                if held.len() > capacity {
                    continue;
                }
                let p = plan(&c, &held, capacity, &BTreeSet::new());
                let mut after = held.clone();
                after.extend(p.fetch.iter().copied());
                for s in &p.drop {
                    after.remove(s);
                }
                assert!(after.len() <= capacity);
                assert_eq!(after, p.want.iter().copied().collect::<BTreeSet<_>>());
            }
        }
    }
}
