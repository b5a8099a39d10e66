//! How `mana status` reaches a running node: the node rewrites `<data dir>/status.json` every
//! `status_interval` (2 s by default), atomically (temporary file, then rename), so a reader never sees a
//! half-written file. A reader judges freshness by `updated_unix_ms`. No socket is opened for this.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{NodeError, Shared, blocking, now_ms};
use crate::net::{PeerSummary, Traffic};
use crate::store::RejectionSummary;

/// The file name of the status file in the data directory.
pub const STATUS_FILE: &str = "status.json";

/// One stored shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredShard {
    /// Shard name (`trunk`, `expert/<layer>/<index>`).
    pub shard: String,
    /// blake3 of its bytes, hex.
    pub hash: String,
    /// Its length in bytes.
    pub bytes: u64,
}

/// What a node reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    /// `mana/<version>`.
    pub agent: String,
    /// Process id of the node.
    pub pid: u32,
    /// When this status was collected, unix milliseconds.
    pub updated_unix_ms: u64,
    /// The node's peer id.
    pub peer_id: String,
    /// The node's public key (64 hex digits): for a coordinator, what nodes pass as `--coordinator`.
    #[serde(default)]
    pub public_key: String,
    /// The run followed.
    pub run: String,
    /// Listen addresses, with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// The dashboard's URL, when the node serves one.
    #[serde(default)]
    pub dashboard: Option<String>,
    /// Connected peers with round trip and gossip score.
    pub peers: Vec<PeerSummary>,
    /// Peers in the DHT routing table.
    pub routing_table_size: usize,
    /// Blobs this node announces as a provider in the DHT (each a blob its store holds).
    #[serde(default)]
    pub dht_provided: usize,
    /// Other peers' provider records this node holds for the DHT (dropped as they expire).
    #[serde(default)]
    pub dht_provider_records: usize,
    /// Application bytes on the wire since start: gossip published/received, fetch frames written/read.
    #[serde(default)]
    pub traffic: Traffic,
    /// Experts this node hosts (from its latest stored round).
    pub hosted_experts: Vec<String>,
    /// The round in progress (last accepted announcement), if any.
    pub current_round: Option<u64>,
    /// The latest round committed to the store.
    pub stored_round: Option<u64>,
    /// Bytes of blobs in the store (and being written).
    #[serde(default)]
    pub store_bytes: u64,
    /// The store's quota (`--store-quota`), if any.
    #[serde(default)]
    pub store_quota: Option<u64>,
    /// For a coordinator's node: its parcels, and the copies of them it served and refused.
    #[serde(default)]
    pub parcels: super::ParcelCounts,
    /// Blobs kept alive by this process (written or fetched for a round not yet committed and released): a
    /// few rounds' worth; a number that only grows is a leak of disk.
    #[serde(default)]
    pub pinned_blobs: usize,
    /// The shards of the stored round.
    pub stored_shards: Vec<StoredShard>,
    /// Hash (hex) of the checkpoint manifest of the stored round, when the round carries one (a trainer's own
    /// manifest of its held shards, the coordinator's full checkpoint, a mirror's synced checkpoint).
    #[serde(default)]
    pub manifest_hash: Option<String>,
    /// Shard sync progress or last outcome.
    pub sync: String,
    /// Gossip messages accepted, rejected and ignored since start.
    pub accepted_messages: u64,
    /// Rejected since start.
    pub rejected_messages: u64,
    /// Ignored since start.
    pub ignored_messages: u64,
    /// Gossip ignored because its forwarder exceeded the rate limit.
    pub rate_limited_messages: u64,
    /// Network events dropped because the node was a full queue behind (`event_queue`): gossip ignored (the
    /// node catches up from a later message), requests answered busy. Heartbeats are counted apart.
    #[serde(default)]
    pub dropped_events: u64,
    /// Heartbeats ignored because the node was that many heartbeats behind. They wait behind every other
    /// event and are the first thing a busy node lets go.
    #[serde(default)]
    pub dropped_heartbeats: u64,
    /// Gossip messages this node sent that a slow peer never took (waited in its queue past gossipsub's limit).
    #[serde(default)]
    pub gossip_to_slow_peers: u64,
    /// Inbound connections refused by a connection limit since start (a flood from one address shows here).
    #[serde(default)]
    pub denied_connections: u64,
    /// The store's rejection log: counts by reason and by peer.
    pub rejections: RejectionSummary,
    /// The trainer role's progress (`None` when the node does not train).
    #[serde(default)]
    pub training: Option<TrainingStatus>,
    /// The coordinator role's progress (`None` unless this node coordinates a run).
    #[serde(default)]
    pub coordinator: Option<CoordinatorStatus>,
    /// The evaluator role's progress (`None` unless this node evaluates checkpoints).
    #[serde(default)]
    pub evaluator: Option<EvaluatorStatus>,
    /// Rounds the coordinator committed twice, differently (proof kept in the store): the run's coordinator
    /// is not to be trusted. Empty in a healthy run.
    #[serde(default)]
    pub equivocations: Vec<super::equivocation::EquivocationSummary>,
    /// Commit disputes heard (holders showing that a commit's shard hash is wrong), since start.
    #[serde(default)]
    pub disputes_heard: u64,
}

/// What the evaluator role reports ([`crate::roles::evaluator`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaluatorStatus {
    /// Checkpoints evaluated and published since start.
    pub evaluated: u64,
    /// The last round evaluated.
    pub last_round: Option<u64>,
    /// Its validation loss.
    pub last_val_loss: Option<f32>,
    /// The last checkpoint that could not be evaluated, and why (cleared by the next success).
    pub last_error: Option<String>,
    /// The round of the model in the export directory, when the evaluator exports
    /// ([`crate::roles::evaluator::EvaluatorConfig::export`]).
    pub exported_round: Option<u64>,
}

/// What the trainer role reports ([`crate::roles::trainer`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingStatus {
    /// Rounds in which this node trained and published its deltas.
    pub rounds_trained: u64,
    /// Delta announcements published since start.
    pub deltas_sent: u64,
    /// Bytes of delta payloads published since start.
    pub delta_bytes_sent: u64,
    /// The last round whose commit this node applied.
    pub applied_round: Option<u64>,
    /// Hash (hex) of this node's own checkpoint manifest of its held shards after `applied_round`.
    pub manifest_hash: Option<String>,
    /// Held shards after `applied_round`: name and hash (hex).
    pub held_shards: Vec<(String, String)>,
    /// Shards whose recomputed hash differed from the coordinator's commit, since start. With every accepted
    /// payload at hand this refutes the commit (see `refused_commit`); no shard is ever re-fetched for it.
    pub hash_mismatches: u64,
    /// Shards whose recomputed hash matched the commit, since start.
    pub hash_matches: u64,
    /// Shard results this node computed and signed as a judge (a holder, or a drawn verifier), since
    /// start.
    #[serde(default)]
    pub shards_attested: u64,
    /// Deltas this node judged (checked, and scored unless refused before) as a judge of their shard, since
    /// start.
    #[serde(default)]
    pub deltas_judged: u64,
    /// Calls this node stopped judging because their round was committed, or a later round begun, before it
    /// was done (its judgment would no longer count), since start. Many mean its judging is too slow for the
    /// run's verify window.
    #[serde(default)]
    pub judgings_given_up: u64,
    /// Deltas of this node's shards fetched while their round trained, as their senders announced them
    /// (so that judging and applying the commit find them in the store), since start.
    #[serde(default)]
    pub deltas_prefetched: u64,
    /// Rounds this node took up only after their delta deadline had passed (its loop busy with the round
    /// before, or the announcement slow to reach it), and so sat out without training, since start.
    #[serde(default)]
    pub rounds_missed: u64,
    /// Commits that recorded, for a shard this node judged, other verdicts or another result than the
    /// quorum of judgments this node saw signed (the signed call, attestations and commit are kept in the
    /// store as evidence), since start. Never expected: a coordinator that does not take what the quorum
    /// signed, or a judge that signed two judgments.
    #[serde(default)]
    pub quorums_contradicted: u64,
    /// Commits that held a shard this node judged (its deltas `late`) although this node saw a quorum of its
    /// judges sign, since start: the coordinator dropped or never got the attestations, or could not fetch
    /// the result's blob.
    #[serde(default)]
    pub quorums_dropped: u64,
    /// Judges of shards this node judged that signed two different judgments of one shard for one call,
    /// since start: each voided (it counts as absent, here as at the coordinator), its two signed
    /// attestations kept in the store as evidence. Never expected from an honest judge.
    #[serde(default)]
    pub judges_equivocated: u64,
    /// Calls for judgments this node did not judge because their norm history is not what the commits it saw
    /// published (a made-up, moved or left-out norm: [`mana_engine::coordinator::norm_ledger`]), or because
    /// their judges are not the public draw ([`mana_engine::coordinator::check_call_judges`]), since start;
    /// the signed call is kept in the store. Never expected from an honest coordinator.
    #[serde(default)]
    pub calls_refused: u64,
    /// The last such finding (contradicted or dropped quorum, equivocating judge, refused call): round, shard
    /// and what differed.
    #[serde(default)]
    pub last_audit_finding: Option<String>,
    /// Published delta scores this node recomputed (its own deltas and the accepted deltas of its shards)
    /// and found to agree, since start.
    pub scores_checked: u64,
    /// Published scores (or seed reveals) this node found false, since start: the verifier's verdicts do
    /// not follow from public data. Never expected; see `last_score_mismatch`.
    pub score_mismatches: u64,
    /// The last false score found: round, shard, payload, published and recomputed losses.
    pub last_score_mismatch: Option<String>,
    /// Training loss of the last local round.
    pub last_train_loss: Option<f32>,
    /// What the trainer is doing now, or its last error.
    pub activity: String,
    /// Why this node stopped taking part in the run, if it did: a commit it refuted, or the coordinator's
    /// equivocation. `None` while it trains.
    #[serde(default)]
    pub halted: Option<String>,
    /// The commit this node refused to build on because its shards did not reproduce from its accepted deltas.
    #[serde(default)]
    pub refused_commit: Option<RefusedCommit>,
    /// Rounds that named this node after it stopped, which it did not take part in.
    #[serde(default)]
    pub rounds_declined: u64,
    /// What became of this node's deltas, as the coordinator's signed commits say.
    #[serde(default)]
    pub contributions: Contributions,
    /// The training loss of each round this node trained (at most [`MAX_LOSS_POINTS`], newest last).
    #[serde(default)]
    pub loss_curve: Vec<LossPoint>,
    /// The run's last round, once the coordinator announced its end.
    #[serde(default)]
    pub run_ended: Option<u64>,
}

/// Most points a loss curve keeps (the oldest go first).
pub const MAX_LOSS_POINTS: usize = 2000;

/// One point of a loss curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossPoint {
    /// The round.
    pub round: u64,
    /// Training loss (a trainer's own; the coordinator's: the mean its participants reported).
    pub train: Option<f32>,
    /// Validation loss of the committed checkpoint (the coordinator's only).
    pub val: Option<f32>,
}

/// Appends `point` to `curve`, keeping at most [`MAX_LOSS_POINTS`].
pub fn push_loss(curve: &mut Vec<LossPoint>, point: LossPoint) {
    curve.push(point);
    if curve.len() > MAX_LOSS_POINTS {
        let excess = curve.len() - MAX_LOSS_POINTS;
        curve.drain(..excess);
    }
}

/// The fate of a trainer's deltas: each commit lists the accepted payloads per shard and the refused ones with
/// their reason, so a node sees whether (and why not) its work counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Contributions {
    /// Deltas in a commit's accepted lists, since start.
    pub accepted: u64,
    /// Deltas in a commit's refused list, since start.
    pub refused: u64,
    /// Refused deltas by reason code (`low-score`, `norm-too-large`...).
    pub refused_by_reason: std::collections::BTreeMap<String, u64>,
    /// Deltas sent that the round's commit neither accepted nor refused (late, or the commit never came).
    pub unaccounted: u64,
    /// Deltas the run accepted in the commits this node saw since start (everyone's): `accepted` over this is
    /// the node's share of the run's accepted work.
    pub run_accepted: u64,
    /// The last rounds this node sent deltas in, newest last (at most [`RECENT_ROUNDS`]).
    pub recent: Vec<RoundContribution>,
}

/// How many rounds [`Contributions::recent`] keeps.
pub const RECENT_ROUNDS: usize = 16;

/// One round's contributions of this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundContribution {
    /// The round.
    pub round: u64,
    /// Deltas sent.
    pub sent: u64,
    /// Deltas accepted.
    pub accepted: u64,
    /// Refused deltas: shard and reason code.
    pub refused: Vec<(String, String)>,
}

impl Contributions {
    /// This node's share of the accepted deltas of the commits it saw, if any were accepted.
    pub fn share(&self) -> Option<f64> {
        (self.run_accepted > 0).then(|| self.accepted as f64 / self.run_accepted as f64)
    }

    /// Records a commit: `sent` are this node's deltas of the commit's round (shard and payload hash), `me` its
    /// key. Counts everyone's accepted deltas towards the run's total.
    pub fn record_commit(
        &mut self,
        commit: &mana_protocol::RoundCommit,
        me: &mana_protocol::PublicKey,
        sent: &[(mana_protocol::ShardId, mana_protocol::ContentHash)],
    ) {
        self.run_accepted += commit
            .accepted
            .iter()
            .map(|a| a.deltas.len() as u64)
            .sum::<u64>();
        if sent.is_empty() {
            return;
        }
        let mut round = RoundContribution {
            round: commit.round,
            sent: sent.len() as u64,
            ..Default::default()
        };
        for (shard, hash) in sent {
            let accepted = commit
                .accepted
                .iter()
                .any(|a| a.shard == *shard && a.deltas.contains(hash));
            let refused = commit
                .rejected
                .iter()
                .find(|r| r.shard == *shard && r.payload_hash == *hash && r.node == *me);
            if accepted {
                round.accepted += 1;
            } else if let Some(r) = refused {
                let reason = r.reason.as_str().to_owned();
                *self.refused_by_reason.entry(reason.clone()).or_default() += 1;
                round.refused.push((shard.to_string(), reason));
            } else {
                self.unaccounted += 1;
            }
        }
        self.accepted += round.accepted;
        self.refused += round.refused.len() as u64;
        self.recent.push(round);
        if self.recent.len() > RECENT_ROUNDS {
            self.recent.remove(0);
        }
    }
}

/// A commit a trainer refused ([`crate::roles::commit_check`]): the published disputes say the same, signed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefusedCommit {
    /// The commit's round.
    pub round: u64,
    /// The commit's id (`RoundCommit::hash`, hex).
    pub commit: String,
    /// Each refuted shard: name, the committed hash, the computed hash (hex), and the accepted payloads used.
    pub shards: Vec<RefutedShard>,
    /// Disputes published on gossip (one per refuted shard, when gossip took them).
    pub disputes_published: u64,
}

/// One shard of a refused commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefutedShard {
    /// The shard (`trunk`, `expert/<layer>/<index>`).
    pub shard: String,
    /// The hash the commit gives it (hex).
    pub committed: String,
    /// The hash this node computed (hex).
    pub computed: String,
    /// How many accepted payloads went into the computation.
    pub accepted: usize,
}

/// What the coordinator role reports ([`crate::roles::conductor`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorStatus {
    /// The round in progress or last committed.
    pub round: Option<u64>,
    /// The state machine's phase.
    pub phase: String,
    /// Members (nodes whose heartbeats arrive).
    pub members: usize,
    /// The last committed round.
    pub committed_round: Option<u64>,
    /// Hash (hex) of the last committed checkpoint manifest.
    pub checkpoint: Option<String>,
    /// The last validation loss an evaluator published for a commit (the coordinator measures none).
    pub val_loss: Option<f32>,
    /// Evaluators' figures taken since start: the first for a round's checkpoint, and the later ones that
    /// matched it.
    pub evaluations_agreed: u64,
    /// Evaluators' figures that differed from the one taken for their round (each logged as a warning),
    /// since start.
    pub evaluations_disagreed: u64,
    /// Deltas accepted and rejected since start.
    pub accepted_deltas: u64,
    /// Rejected since start.
    pub rejected_deltas: u64,
    /// Judges' signed results (shard attestations) taken, since start.
    #[serde(default)]
    pub attestations: u64,
    /// Holders' manifests (their shard hashes after a round) compared with the committed checkpoint.
    #[serde(default)]
    pub holder_reports: u64,
    /// Shard hashes in those reports that differ from the commit (a holder computed different weights).
    #[serde(default)]
    pub holder_mismatches: u64,
    /// Keys banned for their record.
    #[serde(default)]
    pub banned: usize,
    /// Heartbeats refused since start (banned, not on the allowlist, the run full, its address at its cap of
    /// members, or its address not known yet: a new key heard only through other peers waits for a direct
    /// connection, usually one heartbeat).
    #[serde(default)]
    pub not_admitted: u64,
    /// Round steps that failed since start and were retried (a commit the store refused) or left out (a
    /// shard not aggregated); each is in the log. The role goes on either way.
    #[serde(default)]
    pub failures: u64,
    /// The records the coordinator keeps (its members', and departed keys' in debt or in good standing, up
    /// to the member cap), lowest reputation first.
    #[serde(default)]
    pub standings: Vec<MemberStanding>,
    /// Members needed before a round starts (while `phase` is `waiting-for-members`: "waiting for
    /// `members` of `min_members`").
    #[serde(default)]
    pub min_members: usize,
    /// The run's settings, by name (rule, inner steps, replication, round and verify times, seed...).
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, String>,
    /// The last commits, newest last (at most [`RECENT_ROUNDS`]).
    #[serde(default)]
    pub recent_commits: Vec<CommitSummary>,
    /// The run's loss per committed round (at most [`MAX_LOSS_POINTS`], newest last).
    #[serde(default)]
    pub loss_curve: Vec<LossPoint>,
}

/// One committed round, as the coordinator's status lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommitSummary {
    /// The round.
    pub round: u64,
    /// Deltas applied.
    pub accepted: u64,
    /// Deltas refused.
    pub refused: u64,
    /// Validation loss of the committed checkpoint, once an evaluator published it.
    pub val_loss: Option<f32>,
    /// The checkpoint manifest's hash (hex).
    pub checkpoint: String,
}

/// One member's record as the coordinator keeps it (its standing: what its deltas earned and cost it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberStanding {
    /// The member's public key, hex.
    pub node: String,
    /// Deltas accepted.
    pub accepted: u64,
    /// Deltas refused for its own fault.
    pub faults: u64,
    /// Deltas unavailable, and rounds missed.
    pub missed: u64,
    /// Its reputation (banned at the run's threshold).
    pub reputation: i64,
    /// Whether it is a member now (its heartbeats arrive), rather than a departed key whose record is kept.
    #[serde(default)]
    pub member: bool,
    /// The address block it is counted under for the per-IP member cap (an IPv4 address or an IPv6 /64), if
    /// known.
    #[serde(default)]
    pub address: Option<String>,
}

/// Collects the status now.
pub(crate) async fn collect(shared: &Shared) -> Result<NodeStatus, NodeError> {
    let snap = shared.client.snapshot().await?;
    let store = shared.store.clone();
    let (latest, rejections) =
        blocking(move || Ok((store.latest()?, store.rejection_summary()?))).await?;
    let manifest_hash = latest.as_ref().and_then(|(_, m)| {
        mana_protocol::CheckpointManifest::from_bytes(&m.meta)
            .ok()
            .and_then(|c| c.hash().ok())
            .map(|h| hex::encode(h.0))
    });
    let (stored_round, stored_shards) = match latest {
        Some((round, manifest)) => (
            Some(round),
            manifest
                .entries
                .iter()
                .map(|e| StoredShard {
                    shard: e.shard.to_string(),
                    hash: e.hash.to_hex(),
                    bytes: e.len,
                })
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    let hosted_experts = stored_shards
        .iter()
        .filter(|s: &&StoredShard| s.shard.starts_with("expert/"))
        .map(|s| s.shard.clone())
        .collect();
    let state = shared.state();
    let peer_id = snap.peer_id.clone();
    Ok(NodeStatus {
        agent: crate::net::agent_version(),
        pid: std::process::id(),
        updated_unix_ms: now_ms(),
        run: shared.config.net.run_id.to_string(),
        dashboard: shared.dashboard.get().map(|a| format!("http://{a}/")),
        listen_addrs: snap
            .listen_addrs
            .iter()
            .map(|a| format!("{a}/p2p/{peer_id}"))
            .collect(),
        peer_id,
        public_key: hex::encode(shared.keypair.public().0),
        peers: snap.peers,
        routing_table_size: snap.routing_table.len(),
        dht_provided: snap.dht_provided,
        dht_provider_records: snap.dht_provider_records,
        traffic: shared.client.traffic(),
        hosted_experts,
        current_round: state.current.as_ref().map(|a| a.round),
        stored_round,
        store_bytes: shared.store.blob_bytes(),
        pinned_blobs: shared.store.pinned_blobs(),
        store_quota: shared.config.store_quota,
        parcels: super::parcel::counts(shared),
        stored_shards,
        manifest_hash,
        sync: state.sync_state.clone(),
        accepted_messages: state.accepted,
        rejected_messages: state.rejected,
        ignored_messages: state.ignored,
        rate_limited_messages: snap.gossip_rate_limited,
        dropped_events: snap.events_dropped,
        dropped_heartbeats: snap.heartbeats_dropped,
        gossip_to_slow_peers: snap.gossip_to_slow_peers,
        denied_connections: snap.inbound_denied,
        rejections,
        training: state.training.clone(),
        coordinator: state.coordinator.clone(),
        evaluator: state.evaluator.clone(),
        equivocations: state.equivocations.clone(),
        disputes_heard: state.disputes_heard,
    })
}

/// The status file's path in `data_dir`.
pub fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

/// Collects the status and writes it atomically; returns the connected peers it listed (for the peer book).
pub(crate) async fn write(shared: &Shared) -> Result<Vec<crate::net::PeerSummary>, NodeError> {
    let status = collect(shared).await?;
    let peers = status.peers.clone();
    let path = status_path(&shared.config.data_dir);
    blocking(move || {
        let json = serde_json::to_vec_pretty(&status).map_err(|e| NodeError::Status {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|source| NodeError::File {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| NodeError::File {
            path: tmp.clone(),
            source,
        })?;
        Ok(peers)
    })
    .await
}

/// Largest status file read.
const MAX_STATUS_BYTES: u64 = 16 * 1024 * 1024;

/// Reads the status file of the node whose data directory is `data_dir`.
pub fn read(data_dir: &Path) -> Result<NodeStatus, NodeError> {
    let path = status_path(data_dir);
    let err = |e: String| {
        NodeError::Config(format!(
            "{}: {e} (is a node running with this data dir?)",
            path.display()
        ))
    };
    let meta = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_STATUS_BYTES {
        return Err(err("too large".into()));
    }
    let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_protocol::{
        AcceptedDeltas, CheckpointManifest, ContentHash, PublicKey, RejectCode, RejectedDelta,
        RoundCommit, RunId, ShardId,
    };

    #[test]
    fn a_commit_tells_a_trainer_the_fate_of_each_delta() {
        let (me, other) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let e = |index| ShardId::Expert { layer: 0, index };
        let commit = RoundCommit {
            run: RunId::new("fate").expect("run"),
            round: 4,
            accepted: vec![
                AcceptedDeltas {
                    shard: ShardId::Trunk,
                    deltas: vec![ContentHash([1; 32]), ContentHash([2; 32])],
                    weights: vec![1, 1],
                    norms: vec![1.0, 1.0],
                },
                AcceptedDeltas {
                    shard: e(0),
                    deltas: vec![ContentHash([3; 32])],
                    weights: vec![1],
                    norms: vec![1.0],
                },
            ],
            rejected: vec![
                RejectedDelta {
                    shard: e(1),
                    node: me,
                    payload_hash: ContentHash([4; 32]),
                    reason: RejectCode::LowScore,
                },
                // Another sender's refusal of a payload with the same hash is not ours.
                RejectedDelta {
                    shard: e(2),
                    node: other,
                    payload_hash: ContentHash([5; 32]),
                    reason: RejectCode::LowScore,
                },
            ],
            checkpoint: CheckpointManifest {
                run: RunId::new("fate").expect("run"),
                round: 4,
                shards: Vec::new(),
            },
            scores: Vec::new(),
            seed_secret: [0; 32],
            dissent: Vec::new(),
        };
        let mut c = Contributions::default();
        // Ours: trunk [1] accepted, expert 1 [4] refused, expert 2 [5] neither (the refusal names another node).
        let sent = [
            (ShardId::Trunk, ContentHash([1; 32])),
            (e(1), ContentHash([4; 32])),
            (e(2), ContentHash([5; 32])),
        ];
        c.record_commit(&commit, &me, &sent);
        assert_eq!(
            (c.accepted, c.refused, c.unaccounted, c.run_accepted),
            (1, 1, 1, 3)
        );
        assert_eq!(c.refused_by_reason.get("low-score"), Some(&1));
        assert_eq!(c.recent.len(), 1);
        assert_eq!(
            c.recent[0].refused,
            vec![("expert/0/1".to_owned(), "low-score".to_owned())]
        );
        assert!((c.share().expect("share") - 1.0 / 3.0).abs() < 1e-9);
        // A commit of a round this node sent nothing in still counts towards the run's total.
        c.record_commit(&commit, &me, &[]);
        assert_eq!((c.accepted, c.run_accepted, c.recent.len()), (1, 6, 1));
    }
}
