//! A holder fetches its shards' deltas while the round trains, as their senders announce them.
//!
//! Every holder of a shard needs each of its accepted deltas: a judge to score them, any other holder to apply
//! the commit and check its hash. Fetched only when the call or the commit comes, they all travel at once, in
//! the windows that decide whether the round commits in time and whether the next one trains in time; the
//! train window before is mostly idle (a node trains, sends, then waits for the others). At 32 members on two
//! cores a member that did not judge the trunk spent most of the next round's train window fetching the 32
//! trunk deltas of the last, and missed that round.
//!
//! So the trainer hands each delta announcement it hears to a [`Prefetcher`], which brings the payload into
//! the node's store in the background when the delta is one of this node's shards, from a participant the
//! round assigned that shard, at the exact size its shard and codec give, and the first such announcement of
//! that sender and shard. The later fetch (the judge's, the commit's) then finds it in the store. Nothing is
//! decided on a prefetched payload: it is checked where it is used, as before.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mana_protocol::{
    Binding, ContentHash, DeltaAnnouncement, PublicKey, RoundAnnouncement, ShardId,
};
use tokio::sync::Semaphore;

use super::judge::expected_payload;
use crate::daemon::NodeHandle;
use mana_engine::round::RunSpec;

/// What a node holds in the round in progress: what a delta announcement is checked against.
#[derive(Clone, Copy)]
pub(crate) struct Holding<'a> {
    /// The run's model, which gives each shard's size.
    pub spec: &'a RunSpec,
    /// The round's announcement.
    pub ann: &'a RoundAnnouncement,
    /// The shards it assigned this node.
    pub shards: &'a [ShardId],
    /// This node.
    pub me: &'a PublicKey,
}

/// Fetches one trainer's shards' announced deltas ahead of need, a few at a time.
pub(crate) struct Prefetcher {
    /// The round whose announcements are taken.
    round: Option<u64>,
    /// The (sender, shard) pairs already taken this round: one payload each, whatever a sender announces.
    taken: HashSet<(PublicKey, ShardId)>,
    /// Fetches in flight at once.
    slots: Arc<Semaphore>,
}

impl Prefetcher {
    /// A prefetcher running at most `concurrency` fetches at once.
    pub(crate) fn new(concurrency: usize) -> Prefetcher {
        Prefetcher {
            round: None,
            taken: HashSet::new(),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Takes announcements of `round` from now on (the ones of an earlier round are dropped).
    pub(crate) fn begin(&mut self, round: u64) {
        self.round = Some(round);
        self.taken.clear();
    }

    /// Stops taking announcements until the next [`Prefetcher::begin`] (this node is not in the round).
    pub(crate) fn stop(&mut self) {
        self.round = None;
        self.taken.clear();
    }

    /// Whether the payload of `delta`, signed by `sender`, is worth fetching ahead (see the module doc) for a
    /// node that `holds` its shards in the round. Only the first announcement of a sender and shard in the
    /// round is.
    fn wanted(&self, holds: &Holding<'_>, sender: &PublicKey, delta: &DeltaAnnouncement) -> bool {
        let Holding {
            spec,
            ann,
            shards,
            me,
        } = *holds;
        if self.round != Some(ann.round)
            || delta.round != ann.round
            || delta.run != ann.run
            || delta.base_checkpoint != ann.base_checkpoint
            || sender == me
            || !shards.contains(&delta.shard)
            || self.taken.contains(&(*sender, delta.shard))
        {
            return false;
        }
        let assigned = ann
            .participant(sender)
            .is_some_and(|p| p.shards.contains(&delta.shard));
        let binding = Binding {
            run: ann.run.clone(),
            round: ann.round,
            shard: delta.shard,
            sender: *sender,
        };
        assigned
            && expected_payload(spec, &ann.hyper.codec, &binding)
                .is_ok_and(|(_, size)| size == delta.payload_size)
    }

    /// Starts fetching the payload of `delta`, signed by `sender`, if it is [`Prefetcher::wanted`]. Returns the
    /// payload's hash when a fetch was started (the caller pins it for the round); the fetch gives up after
    /// `timeout`.
    pub(crate) fn offer(
        &mut self,
        node: &Arc<NodeHandle>,
        holds: &Holding<'_>,
        sender: &PublicKey,
        delta: &DeltaAnnouncement,
        timeout: Duration,
    ) -> Option<ContentHash> {
        if !self.wanted(holds, sender, delta) {
            return None;
        }
        self.taken.insert((*sender, delta.shard));
        let hints = sender.peer_id().ok().into_iter().collect::<Vec<_>>();
        node.prefetch_blob(
            delta.payload_hash,
            delta.payload_size,
            hints,
            timeout,
            self.slots.clone(),
        );
        Some(delta.payload_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_engine::round::loads_len;
    use mana_protocol::{
        Deadlines, Participant, RunId, TrainingStats, UpdateRule, contribution_len,
    };

    fn key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn announcement(spec: &RunSpec) -> RoundAnnouncement {
        let e0 = spec.experts()[0];
        RoundAnnouncement {
            run: RunId::new("prefetch").expect("run id"),
            round: 2,
            base_checkpoint: ContentHash::of(b"base"),
            participants: vec![
                Participant {
                    node: key(1),
                    shards: vec![ShardId::Trunk, e0],
                    data_seeds: vec![1],
                },
                Participant {
                    node: key(2),
                    shards: vec![ShardId::Trunk],
                    data_seeds: vec![2],
                },
                Participant {
                    node: key(3),
                    shards: vec![ShardId::Trunk],
                    data_seeds: vec![3],
                },
            ],
            inner_steps: 1,
            hyper: spec.hyper(UpdateRule::Diloco),
            max_norm_ratio: 10.0,
            deadlines: Deadlines {
                deltas_by_ms: 1,
                commit_by_ms: 2,
            },
            corpus: ContentHash::of(b"corpus"),
            seed_commitment: ContentHash::of(b"seed"),
        }
    }

    /// The announcement `sender` would make of its delta to `shard`, at the size the codec gives it.
    fn delta(
        spec: &RunSpec,
        ann: &RoundAnnouncement,
        sender: u8,
        shard: ShardId,
    ) -> DeltaAnnouncement {
        let binding = Binding {
            run: ann.run.clone(),
            round: ann.round,
            shard,
            sender: key(sender),
        };
        let len = spec.shard_len(shard).expect("a shard");
        let size = contribution_len(&binding, loads_len(spec, shard), len, &ann.hyper.codec)
            .expect("a size");
        DeltaAnnouncement {
            run: ann.run.clone(),
            round: ann.round,
            shard,
            base_checkpoint: ann.base_checkpoint,
            payload_hash: ContentHash::of(&[sender]),
            payload_size: size,
            stats: TrainingStats {
                tokens: 1,
                loss_before: 1.0,
                loss_after: 1.0,
                delta_norm: 1.0,
            },
        }
    }

    #[test]
    fn only_a_delta_of_its_shards_from_a_participant_assigned_it_at_its_exact_size_is_fetched_ahead_once()
     {
        let spec = RunSpec::tiny();
        let ann = announcement(&spec);
        let me = key(2);
        let e0 = spec.experts()[0];
        let mine = Holding {
            spec: &spec,
            ann: &ann,
            shards: &[ShardId::Trunk],
            me: &me,
        };
        let mut p = Prefetcher::new(2);
        let trunk = delta(&spec, &ann, 1, ShardId::Trunk);
        // Before its round begins, nothing.
        assert!(!p.wanted(&mine, &key(1), &trunk));
        p.begin(2);
        assert!(p.wanted(&mine, &key(1), &trunk));
        // Its own, another's shard, a sender not assigned the shard, one not in the round: not fetched.
        assert!(!p.wanted(&mine, &me, &delta(&spec, &ann, 2, ShardId::Trunk)));
        assert!(!p.wanted(&mine, &key(1), &delta(&spec, &ann, 1, e0)));
        let both = [ShardId::Trunk, e0];
        let with_e0 = Holding {
            shards: &both,
            ..mine
        };
        assert!(!p.wanted(&with_e0, &key(3), &delta(&spec, &ann, 3, e0)));
        assert!(!p.wanted(&mine, &key(4), &delta(&spec, &ann, 4, ShardId::Trunk)));
        assert!(p.wanted(&mine, &key(3), &delta(&spec, &ann, 3, ShardId::Trunk)));
        // Another size than the codec gives, another round or base: not fetched.
        for bad in [
            DeltaAnnouncement {
                payload_size: trunk.payload_size + 1,
                ..trunk.clone()
            },
            DeltaAnnouncement {
                round: 3,
                ..trunk.clone()
            },
            DeltaAnnouncement {
                base_checkpoint: ContentHash::of(b"other"),
                ..trunk.clone()
            },
        ] {
            assert!(!p.wanted(&mine, &key(1), &bad));
        }
        // Once per sender and shard in a round, whatever else it announces; a new round starts afresh.
        p.taken.insert((key(1), ShardId::Trunk));
        let again = DeltaAnnouncement {
            payload_hash: ContentHash::of(b"again"),
            ..trunk.clone()
        };
        assert!(!p.wanted(&mine, &key(1), &again));
        p.begin(2);
        assert!(p.wanted(&mine, &key(1), &again));
        p.stop();
        assert!(!p.wanted(&mine, &key(1), &trunk));
    }
}
