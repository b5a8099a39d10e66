//! Parcels: a coordinator's round message too large for gossip travels as a blob behind a small gossiped
//! header ([`mana_protocol::Parcel`], spec §4).
//!
//! Sending: the coordinator's node stores the signed envelope's bytes as a blob and gossips the header
//! instead ([`publish`]). Receiving: a valid header is not reported to gossip at once. The node fetches the
//! envelope from the peer that passed the header on, then from the coordinator, judges it as if it had been
//! gossiped, and only then reports the header's verdict ([`open`]). So gossip passes a header on only from
//! nodes that hold its envelope and serve it: the fetches spread down the gossip tree, and each node takes the
//! envelope once instead of a copy from every mesh peer.
//!
//! Spread: the coordinator floods its headers (every member hears each straight from it, in the order sent),
//! so every member would fetch every envelope from it, and its upload would grow with members times the
//! envelope, itself growing with members. With [`super::NodeConfig::parcel_copies`] set (it is off by
//! default), it serves that many copies of each to whoever asks first and refuses the rest
//! ([`crate::net::fetch::SPREAD`]); a member refused takes the envelope from its gossip mesh on the rounds
//! topic, whose members fetched theirs, and is served by the coordinator if it asks again after
//! [`SPREAD_PATIENCE`].
//!
//! Order: the coordinator's round messages are judged against the round they follow, so they must be taken
//! in the order they came (a commit judged after the next round's announcement is stale; the run's end
//! before the last commit stops a trainer short of it). While a parcel is open, the coordinator's later
//! messages on the rounds topic wait behind it ([`Line`]): fetches run side by side, verdicts and deliveries
//! one after the other.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::gossipsub::MessageId;
use mana_protocol::limits::MAX_ENVELOPE_BYTES;
use mana_protocol::{ContentHash, Message, Parcel, SignedEnvelope, TopicKind};
use tokio::sync::oneshot;

use super::validate::{self, Judgement};
use super::{NodeError, Shared, blocking, now_ms, sync};
use crate::net::Verdict;

/// How long a node tries to fetch a parcel's envelope before it tells gossip to drop the header (no one
/// penalised). Gossip keeps a message awaiting its verdict for [`crate::net::NetConfig::validation_window`],
/// which must be longer.
pub const OPEN_WITHIN: Duration = Duration::from_secs(8);

/// How much longer a node that missed [`OPEN_WITHIN`] goes on fetching the envelope for itself (gossip gives
/// it no second copy of the header: it dropped it as seen): a busy coordinator or forwarder must not cost it
/// the round.
pub const DELIVER_WITHIN: Duration = Duration::from_secs(60);

/// The first pause between two tries at a parcel's envelope; it doubles up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The longest pause between two tries.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// How many parcels' envelopes a node keeps pinned (to serve them to the peers it passed their headers to);
/// older ones are left to the store's collector.
pub const PARCELS_KEPT: usize = 32;

/// The parcels whose envelopes this node holds, oldest first, and the copies served of its own.
#[derive(Default)]
pub(crate) struct KeptParcels {
    kept: VecDeque<ContentHash>,
    own: Spread,
}

/// The copies of this node's own parcels' envelopes served so far, to cap them
/// ([`super::NodeConfig::parcel_copies`]): the members that fetched one serve the rest.
#[derive(Debug, Default)]
struct Spread {
    /// The parcels still kept ([`PARCELS_KEPT`]), by envelope.
    parcels: HashMap<ContentHash, Served>,
    /// Since the node started.
    counts: ParcelCounts,
}

/// What a node's own parcels cost it since it started: the figure that shows the coordinator's upload per
/// message does not grow with the members (`mana status`, the light coordinator's test).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParcelCounts {
    /// Parcels this node published.
    pub published: u64,
    /// Bytes of their envelopes.
    pub bytes: u64,
    /// Copies of their envelopes served (first ranges).
    pub copies_served: u64,
    /// Copies refused, the fetcher sent to another holder.
    pub copies_refused: u64,
}

/// One own parcel's copies.
#[derive(Debug)]
struct Served {
    /// Copies served (first ranges of its envelope).
    copies: u64,
    /// The peers refused so far, and when each was refused first.
    refused: HashMap<PeerId, Instant>,
}

/// How long a peer refused a copy of a parcel looks elsewhere before the coordinator serves it anyway: a
/// member whose peers do not have the envelope yet still gets it, a few seconds late.
pub const SPREAD_PATIENCE: Duration = Duration::from_secs(2);

/// Most peers remembered as refused for one parcel; past it every peer is served (the memory stays bounded
/// whatever the number of peers that ask).
const MAX_REFUSED: usize = 4096;

impl Spread {
    /// Starts counting the copies of `envelope` (`size` bytes), a parcel this node publishes.
    fn track(&mut self, envelope: ContentHash, size: u32) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.parcels.entry(envelope) {
            slot.insert(Served {
                copies: 0,
                refused: HashMap::new(),
            });
            self.counts.published += 1;
            self.counts.bytes += u64::from(size);
        }
    }

    /// Whether a range of `envelope` (`len` bytes from `offset`) may be served to `peer` at `now`, counting it
    /// as a copy if it is one. Only a range from the start with bytes in it is a copy: a length probe, or
    /// the rest of a copy begun, is always served, as is a blob that is not one of this node's parcels. The
    /// first `copies` copies of a parcel are served to whoever asks; after that a peer is refused, and
    /// served if it asks again once [`SPREAD_PATIENCE`] has passed since its first refusal (it found no other
    /// holder). So a parcel costs about `copies` copies plus those that did not find it among their peers,
    /// whatever the number of members; a peer that takes a copy and serves no one delays others by the
    /// patience, no more. `copies` 0: no cap.
    fn admit(
        &mut self,
        peer: &PeerId,
        envelope: &ContentHash,
        offset: u64,
        len: u64,
        copies: u32,
        now: Instant,
    ) -> bool {
        let Some(served) = self.parcels.get_mut(envelope) else {
            return true;
        };
        if offset != 0 || len == 0 {
            return true;
        }
        let patient = served
            .refused
            .get(peer)
            .is_some_and(|first| now.saturating_duration_since(*first) >= SPREAD_PATIENCE);
        if copies == 0
            || served.copies < u64::from(copies)
            || patient
            || served.refused.len() >= MAX_REFUSED
        {
            served.copies += 1;
            served.refused.remove(peer);
            self.counts.copies_served += 1;
            true
        } else {
            served.refused.entry(*peer).or_insert(now);
            self.counts.copies_refused += 1;
            false
        }
    }
}

/// What this node's own parcels cost it so far.
pub(crate) fn counts(shared: &Shared) -> ParcelCounts {
    shared
        .parcels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .own
        .counts
}

/// Whether this node serves a range of blob `hash` (`len` bytes from `offset`) now: see [`Spread::admit`].
pub(crate) fn admit(
    shared: &Shared,
    peer: &PeerId,
    hash: &ContentHash,
    offset: u64,
    len: u64,
) -> bool {
    let mut parcels = shared.parcels.lock().unwrap_or_else(|p| p.into_inner());
    parcels.own.admit(
        peer,
        hash,
        offset,
        len,
        shared.config.parcel_copies,
        Instant::now(),
    )
}

/// The envelope size over which this node's round messages travel as parcels: its setting, and never over
/// what a gossip message holds.
pub(crate) fn threshold(shared: &Shared) -> usize {
    shared.config.parcel_over_bytes.min(MAX_ENVELOPE_BYTES)
}

/// Whether this node sends `message`, whose envelope is `len` bytes, as a parcel: only a message that the
/// run's coordinator signs (others' parcels are refused), from a node that can be the coordinator (one that
/// follows another's key never is; the coordinator's own node names itself or no one), over [`threshold`].
pub(crate) fn sends_as_parcel(shared: &Shared, message: &Message, len: usize) -> bool {
    let coordinators = matches!(
        message,
        Message::RoundAnnouncement(_)
            | Message::RoundCommit(_)
            | Message::CheckpointManifest(_)
            | Message::AggregationCall(_)
            | Message::RunEnd(_)
    );
    coordinators
        && shared
            .config
            .coordinator
            .is_none_or(|key| key == shared.keypair.public())
        && len > threshold(shared)
}

/// Stores `bytes` (the signed envelope of `message`) as a blob, pinned, and gossips its header.
pub(crate) async fn publish(
    shared: &Arc<Shared>,
    message: &Message,
    bytes: Vec<u8>,
) -> Result<(), NodeError> {
    let size = u32::try_from(bytes.len()).map_err(|_| {
        NodeError::Protocol(mana_protocol::ProtocolError::InvalidField {
            what: "parcel size",
            detail: format!("{} bytes", bytes.len()),
        })
    })?;
    shared.replay().note_own(&bytes, std::time::Instant::now());
    let store = shared.store.clone();
    let pin = blocking(move || Ok(store.put_blob(&bytes)?)).await?;
    let envelope = ContentHash(pin.hash().0);
    sync::keep_pin(shared, pin);
    shared
        .parcels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .own
        .track(envelope, size);
    keep(shared, envelope);
    let header = Message::Parcel(Parcel {
        run: message.run().clone(),
        round: message.round().unwrap_or(0),
        envelope,
        size,
    });
    tracing::debug!(kind = message.kind(), %envelope, size, "round message sent as a parcel");
    let signed = SignedEnvelope::sign(&shared.keypair, &header, now_ms())?.encode()?;
    shared.publish_signed(TopicKind::Rounds, signed).await
}

/// The coordinator's round messages that wait for an open parcel, in the order they came: each waits for the
/// one before it to be judged and delivered.
#[derive(Default)]
pub(crate) struct Line {
    /// Messages in the line (opened parcels and those behind them), not yet delivered.
    waiting: usize,
    /// Told when the last message in the line is delivered.
    last: Option<oneshot::Receiver<()>>,
}

/// Whether gossip message `data` on `topic` must wait in the line: some message is in it, and this one is
/// the coordinator's on the rounds topic (read from its envelope without verifying it; the line only orders,
/// the judging comes after).
pub(crate) fn must_wait(shared: &Shared, topic: &str, data: &[u8]) -> bool {
    if shared.line().waiting == 0
        || topic != mana_protocol::topic(&shared.config.net.run_id, TopicKind::Rounds)
    {
        return false;
    }
    let signer = mana_protocol::decode_envelope(data).map(|e| e.signer).ok();
    signer.is_some() && signer == shared.config.coordinator
}

/// A place in the line: the message ahead's signal to wait on, and this one's to give when it is delivered
/// (or dropped, however its task ends).
struct Place {
    shared: Arc<Shared>,
    ahead: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Place {
    /// Takes a place at the end of the line.
    fn take(shared: &Arc<Shared>) -> Place {
        let (done, delivered) = oneshot::channel();
        let mut line = shared.line();
        line.waiting += 1;
        Place {
            shared: shared.clone(),
            ahead: line.last.replace(delivered),
            done: Some(done),
        }
    }

    /// Waits until the message ahead is delivered (or its task ended).
    async fn turn(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            let _ = ahead.await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shared.line().waiting -= 1;
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// Judges gossip message `id` (`data` on `topic`, from `source`) once the messages ahead of it in the line
/// are delivered, then reports and records it as [`open`] would (opening it, if it is a parcel's header). It
/// is judged as of now, when it was heard: the wait is this node's, not the sender's.
pub(crate) fn wait_in_line(
    shared: &Arc<Shared>,
    id: MessageId,
    source: PeerId,
    topic: String,
    data: Vec<u8>,
) {
    let heard_ms = now_ms();
    let mut place = Place::take(shared);
    let task_shared = shared.clone();
    shared.spawn(async move {
        let shared = task_shared;
        place.turn().await;
        match validate::judge(&shared, source, &topic, &data, heard_ms) {
            Judgement::Accept(accepted) => match &accepted.message {
                Message::Parcel(header) => {
                    let fetched = fetch_for(&shared, source, header, OPEN_WITHIN).await;
                    deliver(&shared, id, source, header, heard_ms, fetched).await;
                }
                _ => conclude(&shared, id, source, Judgement::Accept(accepted)).await,
            },
            other => conclude(&shared, id, source, other).await,
        }
        drop(place);
    });
}

/// Opens the parcel `header`, heard from `source` as gossip message `id` at `heard_ms`, in the background:
/// fetches its envelope at once, and once the messages ahead of it in the line are delivered, judges it (as
/// of `heard_ms`), reports the header's verdict to gossip and acts on the message inside.
pub(crate) fn open(
    shared: &Arc<Shared>,
    id: MessageId,
    source: PeerId,
    header: Parcel,
    heard_ms: u64,
) {
    let mut place = Place::take(shared);
    let task_shared = shared.clone();
    shared.spawn(async move {
        let shared = task_shared;
        let fetched = fetch_for(&shared, source, &header, OPEN_WITHIN).await;
        place.turn().await;
        deliver(&shared, id, source, &header, heard_ms, fetched).await;
        drop(place);
    });
}

/// Judges the envelope of `header` (heard at `heard_ms`; `fetched` within [`OPEN_WITHIN`], or not), reports
/// the header's verdict and records the judgement. One not fetched in time is reported ignored at once
/// (gossip passes it on from those that have it) and fetched on for this node alone, for [`DELIVER_WITHIN`].
async fn deliver(
    shared: &Arc<Shared>,
    id: MessageId,
    source: PeerId,
    header: &Parcel,
    heard_ms: u64,
    fetched: Result<Vec<u8>, String>,
) {
    let late = match fetched {
        Ok(bytes) => {
            let judgement = opened(shared, header, source, heard_ms, Ok(bytes));
            return conclude(shared, id, source, judgement).await;
        }
        Err(reason) => reason,
    };
    tracing::info!(envelope = %header.envelope, %late, "parcel not opened in time; still fetching it for this node");
    // Counted as ignored now, when gossip is told: the rest concerns this node alone.
    shared.state().ignored += 1;
    if let Err(e) = shared.client.report(id, source, Verdict::Ignore).await {
        tracing::debug!(error = %e, "verdict not reported");
    }
    match fetch_for(shared, source, header, DELIVER_WITHIN).await {
        Ok(bytes) => {
            let judgement = opened(shared, header, source, heard_ms, Ok(bytes));
            validate::record(shared, source, judgement).await;
        }
        Err(reason) => {
            shared.unpin_blobs(&[header.envelope]);
            tracing::warn!(round = header.round, %reason, "a round message of the coordinator never reached this node");
        }
    }
}

/// The envelope `header` names, tried again and again (with growing pauses) for at most `within`.
async fn fetch_for(
    shared: &Arc<Shared>,
    source: PeerId,
    header: &Parcel,
    within: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = RETRY_PAUSE;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error =
            match tokio::time::timeout_at(deadline, fetch(shared, source, header, tries)).await {
                Ok(Ok(bytes)) => return Ok(bytes),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "out of time".to_string(),
            };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(format!(
                "parcel {} not fetched within {within:?} ({tries} tries; last: {error})",
                header.envelope
            ));
        }
        tracing::debug!(envelope = %header.envelope, %error, "parcel not fetched; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

/// The judgement of a parcel heard at `heard_ms` whose envelope was `fetched` (or not): the envelope's, or
/// dropped unheard. A parcel not taken releases the envelope's pin.
fn opened(
    shared: &Shared,
    header: &Parcel,
    source: PeerId,
    heard_ms: u64,
    fetched: Result<Vec<u8>, String>,
) -> Judgement {
    let judgement = match fetched {
        Ok(bytes) => validate::judge_parcel(shared, source, header, &bytes, heard_ms),
        Err(reason) => Judgement::Ignore { reason },
    };
    if matches!(judgement.verdict(), Verdict::Accept) {
        keep(shared, header.envelope);
    } else {
        shared.unpin_blobs(&[header.envelope]);
    }
    judgement
}

/// Reports `judgement` of gossip message `id` to gossip and applies it.
async fn conclude(shared: &Arc<Shared>, id: MessageId, source: PeerId, judgement: Judgement) {
    if let Err(e) = shared.client.report(id, source, judgement.verdict()).await {
        tracing::debug!(error = %e, "verdict not reported");
    }
    validate::record(shared, source, judgement).await;
}

/// Tries at an envelope before the DHT is asked for other holders as well (a query costs every node on its
/// way some work; by then the forwarder, the coordinator and the gossip mesh have been asked several times).
const DHT_AFTER_TRIES: u32 = 3;

/// How long one try asks the DHT for other holders of an envelope.
const PROVIDER_QUERY: Duration = Duration::from_secs(2);

/// Try number `tries` at the envelope `header` names: from the store, or fetched from the forwarder and the
/// coordinator, from the second try also this node's gossip mesh on the rounds topic, and past
/// [`DHT_AFTER_TRIES`] the holders the DHT names (nodes that fetched it announce it); at most its size, hash
/// checked.
async fn fetch(
    shared: &Arc<Shared>,
    source: PeerId,
    header: &Parcel,
    tries: u32,
) -> Result<Vec<u8>, NodeError> {
    let (ask_peers, ask_dht) = (tries > 1, tries > DHT_AFTER_TRIES);
    let hash = header.envelope;
    let store = shared.store.clone();
    if blocking(move || Ok(store.blob_len(&hash)?))
        .await?
        .is_none()
    {
        let me = shared.client.local_peer_id();
        let mut providers = vec![source];
        if let Some(Ok(coordinator)) = shared.config.coordinator.map(|k| k.peer_id()) {
            providers.push(coordinator);
        }
        // The coordinator serves a few copies and refuses the rest: the peers this node hears round messages
        // from took theirs, or will. (Not on the first try: asking peers that have nothing yet costs a round
        // trip each.)
        if ask_peers {
            let rounds = mana_protocol::topic(&shared.config.net.run_id, TopicKind::Rounds);
            if let Ok(mesh) = shared.client.mesh_peers(rounds).await {
                providers.extend(mesh);
            }
        }
        if ask_dht
            && let Ok(Ok(found)) =
                tokio::time::timeout(PROVIDER_QUERY, shared.client.get_providers(hash.0.to_vec()))
                    .await
        {
            providers.extend(found);
        }
        providers.retain(|p| *p != me);
        providers.sort();
        providers.dedup();
        sync::fetch_from(shared, hash, u64::from(header.size), providers).await?;
    }
    let store = shared.store.clone();
    blocking(move || Ok(store.get_blob(&hash)?)).await
}

/// Remembers that this node holds parcel `envelope`, and releases the pin of the oldest beyond
/// [`PARCELS_KEPT`].
fn keep(shared: &Shared, envelope: ContentHash) {
    let released = {
        let mut parcels = shared.parcels.lock().unwrap_or_else(|p| p.into_inner());
        if parcels.kept.contains(&envelope) {
            return;
        }
        parcels.kept.push_back(envelope);
        let over = parcels.kept.len().saturating_sub(PARCELS_KEPT);
        let released = parcels.kept.drain(..over).collect::<Vec<_>>();
        for gone in &released {
            parcels.own.parcels.remove(gone);
        }
        released
    };
    shared.unpin_blobs(&released);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_own_parcel_is_served_a_few_copies_then_only_to_those_that_found_no_other_holder() {
        let start = Instant::now();
        let envelope = ContentHash::of(b"a parcel");
        let other = ContentHash::of(b"another blob");
        let peers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let mut spread = Spread::default();
        spread.track(envelope, 500);
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Three copies to the first three that ask, at once.
        for peer in &peers[..3] {
            assert!(spread.admit(peer, &envelope, 0, 500, 3, at(0)));
        }
        // The next are refused, however often they ask within the patience.
        assert!(!spread.admit(&peers[3], &envelope, 0, 500, 3, at(10)));
        assert!(!spread.admit(&peers[4], &envelope, 0, 500, 3, at(500)));
        assert!(!spread.admit(&peers[3], &envelope, 0, 500, 3, at(1_000)));
        // Probes, the rest of a copy begun and blobs that are not own parcels are always served.
        assert!(spread.admit(&peers[5], &envelope, 0, 0, 3, at(0)));
        assert!(spread.admit(&peers[5], &envelope, 100, 400, 3, at(0)));
        assert!(spread.admit(&peers[5], &other, 0, 500, 3, at(0)));
        // Once the patience has passed since its first refusal, a peer that asks again is served; one
        // refused later still waits, and a peer never refused is refused first.
        assert!(spread.admit(&peers[3], &envelope, 0, 500, 3, at(2_010)));
        assert!(!spread.admit(&peers[4], &envelope, 0, 500, 3, at(2_010)));
        assert!(spread.admit(&peers[4], &envelope, 0, 500, 3, at(2_500)));
        assert!(!spread.admit(&peers[5], &envelope, 0, 500, 3, at(5_000)));
        assert_eq!(spread.counts.copies_served, 5);
        assert_eq!(spread.counts.copies_refused, 5);
        // 0: no cap.
        for peer in &peers {
            assert!(spread.admit(peer, &envelope, 0, 500, 0, at(0)));
        }
    }
}
