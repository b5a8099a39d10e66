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
//! Order: the coordinator's round messages are judged against the round they follow, so they must be taken
//! in the order they came (a commit judged after the next round's announcement is stale; the run's end
//! before the last commit stops a trainer short of it). While a parcel is open, the coordinator's later
//! messages on the rounds topic wait behind it ([`Line`]): fetches run side by side, verdicts and deliveries
//! one after the other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::gossipsub::MessageId;
use mana_protocol::limits::MAX_ENVELOPE_BYTES;
use mana_protocol::{ContentHash, Message, Parcel, SignedEnvelope, TopicKind};
use tokio::sync::oneshot;

use super::validate::{self, Judgement};
use super::{NodeError, Shared, blocking, now_ms, sync};
use crate::net::Verdict;

/// How long a node tries to fetch a parcel's envelope before it drops the header (no one penalised). Gossip
/// keeps a message awaiting its verdict for [`crate::net::NetConfig::validation_window`], which must be
/// longer.
pub const OPEN_WITHIN: Duration = Duration::from_secs(8);

/// How many parcels' envelopes a node keeps pinned (to serve them to the peers it passed their headers to);
/// older ones are left to the store's collector.
pub const PARCELS_KEPT: usize = 32;

/// The parcels whose envelopes this node holds, oldest first.
#[derive(Default)]
pub(crate) struct KeptParcels(VecDeque<ContentHash>);

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
/// are delivered, then reports and records it as [`open`] would (opening it, if it is a parcel's header).
pub(crate) fn wait_in_line(
    shared: &Arc<Shared>,
    id: MessageId,
    source: PeerId,
    topic: String,
    data: Vec<u8>,
) {
    let mut place = Place::take(shared);
    let task_shared = shared.clone();
    shared.spawn(async move {
        let shared = task_shared;
        place.turn().await;
        let judgement = validate::judge(&shared, source, &topic, &data);
        let judgement = match judgement {
            Judgement::Accept(accepted) => match &accepted.message {
                Message::Parcel(header) => {
                    let fetched = fetch_within(&shared, source, header).await;
                    opened(&shared, header, source, fetched)
                }
                _ => Judgement::Accept(accepted),
            },
            other => other,
        };
        conclude(&shared, id, source, judgement).await;
        drop(place);
    });
}

/// Opens the parcel `header`, heard from `source` as gossip message `id`, in the background: fetches its
/// envelope at once, and once the messages ahead of it in the line are delivered, judges it, reports the
/// header's verdict to gossip and acts on the message inside.
pub(crate) fn open(shared: &Arc<Shared>, id: MessageId, source: PeerId, header: Parcel) {
    let mut place = Place::take(shared);
    let task_shared = shared.clone();
    shared.spawn(async move {
        let shared = task_shared;
        let fetched = fetch_within(&shared, source, &header).await;
        place.turn().await;
        let judgement = opened(&shared, &header, source, fetched);
        conclude(&shared, id, source, judgement).await;
        drop(place);
    });
}

/// The envelope `header` names, fetched within [`OPEN_WITHIN`].
async fn fetch_within(
    shared: &Arc<Shared>,
    source: PeerId,
    header: &Parcel,
) -> Result<Vec<u8>, String> {
    match tokio::time::timeout(OPEN_WITHIN, fetch(shared, source, header)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(format!("parcel {} not fetched: {e}", header.envelope)),
        Err(_) => Err(format!(
            "parcel {} not fetched within {OPEN_WITHIN:?}",
            header.envelope
        )),
    }
}

/// The judgement of a parcel whose envelope was `fetched` (or not): the envelope's, or dropped unheard. A
/// parcel not taken releases the envelope's pin.
fn opened(
    shared: &Shared,
    header: &Parcel,
    source: PeerId,
    fetched: Result<Vec<u8>, String>,
) -> Judgement {
    let judgement = match fetched {
        Ok(bytes) => validate::judge_parcel(shared, source, header, &bytes),
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

/// The envelope `header` names: from the store, or fetched (the forwarder first, then the coordinator, then
/// the DHT), at most its size, hash checked.
async fn fetch(
    shared: &Arc<Shared>,
    source: PeerId,
    header: &Parcel,
) -> Result<Vec<u8>, NodeError> {
    let mut hints = vec![source];
    if let Some(Ok(coordinator)) = shared.config.coordinator.map(|k| k.peer_id())
        && coordinator != source
    {
        hints.push(coordinator);
    }
    sync::fetch_and_store_hinted(shared, header.envelope, u64::from(header.size), hints).await?;
    let store = shared.store.clone();
    let hash = header.envelope;
    blocking(move || Ok(store.get_blob(&hash)?)).await
}

/// Remembers that this node holds parcel `envelope`, and releases the pin of the oldest beyond
/// [`PARCELS_KEPT`].
fn keep(shared: &Shared, envelope: ContentHash) {
    let released = {
        let mut kept = shared.parcels.lock().unwrap_or_else(|p| p.into_inner());
        if kept.0.contains(&envelope) {
            return;
        }
        kept.0.push_back(envelope);
        let over = kept.0.len().saturating_sub(PARCELS_KEPT);
        kept.0.drain(..over).collect::<Vec<_>>()
    };
    shared.unpin_blobs(&released);
}
