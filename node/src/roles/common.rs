//! What both roles need: the run's dataset, publishing that waits for gossip subscriptions, fetching a blob's
//! bytes with a time limit, and the ledger that releases pins of blobs a role no longer needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use libp2p::PeerId;
use mana_kernels::data::builtin::{self, DEFAULT_BUILTIN_BYTES};
use mana_kernels::data::{SourceLimits, Split, TextDataset, read_corpus};
use mana_protocol::{ContentHash, Message, PublicKey, ShardEntry};

use crate::daemon::{NodeError, NodeHandle, blocking};

/// Where a run's text comes from. Every member of a run must use the same one (the trainer reads its
/// batches from it, the coordinator its validation batches), like the same [`mana_engine::round::RunSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct DataSource {
    /// A corpus file or directory (`--corpus`); `None` for the built-in corpus.
    pub corpus: Option<std::path::PathBuf>,
    /// Seed of the built-in corpus.
    pub seed: u64,
    /// Bytes of built-in corpus generated.
    pub builtin_bytes: usize,
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource {
            corpus: None,
            seed: 0,
            builtin_bytes: DEFAULT_BUILTIN_BYTES,
        }
    }
}

/// Reads (or generates) the run's text and splits it into training and validation parts, like `mana train`.
pub fn load_dataset(source: &DataSource) -> Result<TextDataset, NodeError> {
    let text = match &source.corpus {
        Some(path) => read_corpus(path, SourceLimits::default())
            .map_err(|e| NodeError::Config(format!("corpus {}: {e}", path.display())))?,
        None => builtin::generate(source.seed, source.builtin_bytes),
    };
    TextDataset::new(&text, Split::default()).map_err(|e| NodeError::Config(format!("corpus: {e}")))
}

/// The hash a run announces its corpus by ([`mana_protocol::RoundAnnouncement::corpus`]): blake3 over the
/// training part's length, the training bytes and the validation bytes.
pub fn corpus_hash(data: &TextDataset) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(data.train_bytes().len() as u64).to_le_bytes());
    hasher.update(data.train_bytes());
    hasher.update(data.validation_bytes());
    ContentHash(*hasher.finalize().as_bytes())
}

/// Checks that the run's corpus can feed rounds of `spec`'s sequence length (training and validation
/// parts alike), with the corpus named in the error.
pub fn check_corpus(
    data: &TextDataset,
    spec: &mana_engine::round::RunSpec,
    source: &DataSource,
) -> Result<(), NodeError> {
    let seq_len = spec.hyper(mana_protocol::UpdateRule::Sync).seq_len as usize;
    data.check_seq_len(seq_len).map_err(|e| {
        let name = source
            .corpus
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in".into());
        NodeError::Config(format!("corpus {name} is too small for the run: {e}"))
    })
}

/// Publishes `message`, retrying every 200 ms while gossip has no subscribed peer yet (or a transient
/// error), for at most `patience`.
pub async fn publish_patiently(
    node: &NodeHandle,
    message: &Message,
    patience: Duration,
) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match node.publish(message).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(kind = message.kind(), error = %e, "publish failed, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Fetches blob `hash` (from the store if there, else from `hints`, else from the providers the DHT knows)
/// and returns its verified bytes, within `timeout`.
pub async fn fetch_bytes(
    node: &NodeHandle,
    hash: ContentHash,
    hints: Vec<PeerId>,
    timeout: Duration,
) -> Result<Vec<u8>, NodeError> {
    fetch_bytes_within(node, hash, u64::MAX, hints, timeout).await
}

/// [`fetch_bytes`] for a blob of at most `max_len` bytes: a bigger one is neither downloaded nor read (a
/// copy already in the store included). A fetch that fails (a connection closed under it, no provider found
/// yet) is tried again after a short pause while `timeout` lasts: a node that has just joined often finds its
/// first connections still being set up. A blob bigger than `max_len` is not tried again.
pub async fn fetch_bytes_within(
    node: &NodeHandle,
    hash: ContentHash,
    max_len: u64,
    hints: Vec<PeerId>,
    timeout: Duration,
) -> Result<Vec<u8>, NodeError> {
    fetch_patiently(node, hash, max_len, timeout, || {
        node.fetch_blob_within(hash, max_len, hints.clone())
    })
    .await
}

/// The bytes of shard `entry`'s blob, within `timeout`: made here from `spec` if it is a round-0 shard (the
/// bytes must hash to the entry's), else fetched like [`fetch_bytes_within`] (at most the entry's size;
/// first from the peers the daemon heard host it: [`crate::daemon::hosts`]).
pub async fn fetch_shard_bytes(
    node: &NodeHandle,
    entry: ShardEntry,
    spec: &mana_engine::round::RunSpec,
    timeout: Duration,
) -> Result<Vec<u8>, NodeError> {
    fetch_patiently(node, entry.hash, entry.size, timeout, || {
        node.fetch_shard(entry, Vec::new(), Some(spec))
    })
    .await
}

/// Runs `fetch` (which brings blob `hash` into the store and returns its length) until it succeeds or
/// `timeout` passes, then reads the blob; one of more than `max_len` bytes is refused and not tried again.
async fn fetch_patiently<F>(
    node: &NodeHandle,
    hash: ContentHash,
    max_len: u64,
    timeout: Duration,
    fetch: impl Fn() -> F,
) -> Result<Vec<u8>, NodeError>
where
    F: std::future::Future<Output = Result<u64, NodeError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(left, fetch()).await {
            Ok(Ok(len)) if len > max_len => {
                return Err(NodeError::TooLarge {
                    what: format!("blob {hash}"),
                    len,
                    max: max_len,
                });
            }
            Ok(Ok(_)) => return node.read_blob(hash).await,
            Ok(Err(e @ NodeError::Fetch(crate::net::fetch::FetchError::TooLarge(_)))) => {
                return Err(e);
            }
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(NodeError::Timeout {
                    what: format!("fetching {hash}"),
                    after: timeout,
                });
            }
        };
        if deadline.saturating_duration_since(tokio::time::Instant::now()) < FETCH_RETRY_PAUSE * 2 {
            return Err(error);
        }
        tracing::debug!(blob = %hash, error = %error, "fetch failed; trying again");
        tokio::time::sleep(FETCH_RETRY_PAUSE).await;
    }
}

/// The pause before a failed fetch is tried again.
const FETCH_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The libp2p peer of a signing key (`None` if the bytes are not a valid key).
pub fn peer_of(key: &PublicKey) -> Option<PeerId> {
    key.peer_id().ok()
}

/// The peer id of a signing key, as text (for the rejection log); the key's hex if it is not a valid key.
pub fn peer_name(key: &PublicKey) -> String {
    key.peer_id()
        .map(|p| p.to_string())
        .unwrap_or_else(|_| hex::encode(key.0))
}

/// A fresh unpredictable 64-bit seed from the operating system (for choices senders must not foresee).
pub fn os_seed() -> Result<u64, NodeError> {
    getrandom::u64().map_err(NodeError::Randomness)
}

/// Whether this occasion is one of the drawn `share` (0 to 1) of them, from the OS's randomness so that
/// nobody can foresee which: always at 1 or more, never at 0, less or NaN, and true when the randomness
/// cannot be read (drawn checks are the safe side).
pub fn draw_share(share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    if share <= 0.0 || share.is_nan() {
        return false;
    }
    // 53 random bits as a uniform draw in [0, 1).
    os_seed().map_or(true, |r| ((r >> 11) as f64) / ((1u64 << 53) as f64) < share)
}

/// Blobs a role pinned, by the round that needed them. Blobs of rounds older than the last few are released
/// ([`NodeHandle::unpin`]), so the store's collector can reclaim payloads and superseded shards once no
/// retained round refers to them.
#[derive(Debug, Default)]
pub struct PinLedger {
    by_round: BTreeMap<u64, Vec<ContentHash>>,
}

impl PinLedger {
    /// Notes that round `round` pinned `hash`.
    pub fn add(&mut self, round: u64, hash: ContentHash) {
        self.by_round.entry(round).or_default().push(hash);
    }

    /// Releases the pins of every round before `keep_from`, except blobs named in `keep` (still in use): those
    /// stay in the ledger under `keep_from`, so they are released once they are no longer kept. (Dropping them
    /// from the ledger instead leaked their pins for good: a 30-minute soak found on every node, and on the
    /// coordinator, the trunk states of 4 rounds after which the trunk stayed unchanged for two rounds.)
    pub fn release_before(&mut self, node: &NodeHandle, keep_from: u64, keep: &[ContentHash]) {
        let release = self.releasable(keep_from, keep);
        node.unpin(&release);
    }

    /// What [`PinLedger::release_before`] releases, taken out of the ledger.
    fn releasable(&mut self, keep_from: u64, keep: &[ContentHash]) -> Vec<ContentHash> {
        let newer = self.by_round.split_off(&keep_from);
        let old = std::mem::replace(&mut self.by_round, newer);
        let mut release = Vec::new();
        for hash in old.into_values().flatten() {
            if self.holds(&hash) {
                continue;
            }
            if keep.contains(&hash) {
                self.add(keep_from, hash);
            } else if !release.contains(&hash) {
                release.push(hash);
            }
        }
        release
    }

    fn holds(&self, hash: &ContentHash) -> bool {
        self.by_round.values().any(|v| v.contains(hash))
    }
}

/// Appends one line to a file (the metrics log), creating it if needed.
pub async fn append_line(path: &Path, line: String) -> Result<(), NodeError> {
    let path = path.to_path_buf();
    blocking(move || {
        use std::io::Write;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| NodeError::File {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| NodeError::File {
                path: path.to_path_buf(),
                source,
            })?;
        writeln!(file, "{line}").map_err(|source| NodeError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_kept_through_several_releases_is_released_once_it_is_not_kept() {
        let (a, b, c) = (
            ContentHash([1; 32]),
            ContentHash([2; 32]),
            ContentHash([3; 32]),
        );
        let mut ledger = PinLedger::default();
        ledger.add(10, a);
        ledger.add(10, b);
        ledger.add(11, c);
        // Round 12 still uses `a` (a shard unchanged since round 10); `b` is done with.
        assert_eq!(ledger.releasable(11, &[a]), vec![b]);
        // Rounds 13 and 14 still use `a`.
        assert_eq!(ledger.releasable(12, &[a, c]), Vec::<ContentHash>::new());
        assert_eq!(ledger.releasable(13, &[a]), vec![c]);
        // Round 15 replaced it: released, once.
        assert_eq!(ledger.releasable(14, &[]), vec![a]);
        assert_eq!(ledger.releasable(20, &[]), Vec::<ContentHash>::new());
    }

    #[test]
    fn a_blob_named_by_a_newer_round_waits_for_that_round() {
        let a = ContentHash([1; 32]);
        let mut ledger = PinLedger::default();
        ledger.add(3, a);
        ledger.add(5, a);
        assert!(ledger.releasable(4, &[]).is_empty());
        assert_eq!(ledger.releasable(6, &[]), vec![a]);
    }
}
