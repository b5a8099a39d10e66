//! The node's store, one per node, in `--data-dir`: checkpoint shards and delta payloads, the rounds they make
//! up, and small records (peers, delta announcements, round state, the log of rejected messages).
//!
//! # Two parts
//! - **Blob files** ([`blobs`]): the bytes of shards and payloads, each in a file named by its blake3 hash
//!   under `blobs/<first byte>/`, written atomically (temp file, fsync, rename, fsync dir) and verified
//!   against the name whenever read.
//! - **A sled index** ([`index`]) under `index/`: round manifests (which blobs make up each round), blob
//!   references of pending work, records and the rejection log.
//!
//! Why two: sled 0.34.7 keeping 0.1-4 MB values in a commit-and-prune loop lost nothing across 176 SIGKILLs
//! but grew to 63-116x the live data, took 1.2 s to open and wrote at 74 MB/s. Here sled only ever holds
//! small values.
//!
//! # Rounds are atomic
//! A round becomes visible when [`Store::commit_round`] applies one sled batch (the new manifest, and the
//! removal of rounds beyond the keep-last-K policy) and flushes it. Every blob the manifest names must already
//! be a complete, fsync'd file, which `commit_round` checks. So after `kill -9` at any moment the store opens
//! and holds the last round whose commit returned, complete.
//!
//! # What keeps a blob alive (the reference rule)
//! The collector ([`Store::gc`], run after each commit and at open) removes every blob file that nothing
//! refers to. A blob is alive while any of these holds:
//! 1. a retained round's manifest lists it;
//! 2. a blob reference `(round, hash)` exists for a round not yet pruned ([`Store::add_blob_refs`],
//!    [`Store::put_record_with_blobs`]): how delta payloads of a round being assembled are kept;
//! 3. a kept piece of evidence names it ([`Store::keep_evidence`]: signed messages proving misbehaviour, a
//!    few dozen at most);
//! 4. a [`BlobPin`] is held in this process: every write returns one, so a shard written for a round being
//!    assembled survives until the commit that refers to it. Pins live in memory only, so at start-up
//!    nothing is pinned and blobs written but never committed (a crash mid-round) are collected.
//!
//! References (1, 2, 3) are changed, and the collector runs, under one lock, after a sled flush: a file is
//! only deleted once no durable index entry can refer to it.
//!
//! # Blocking
//! Every call does blocking file I/O (and fsyncs). The async daemon calls the store through
//! `tokio::task::spawn_blocking`; the handle is cheap to clone and safe to share between threads.

pub mod blobs;
pub mod error;
pub mod evidence;
pub mod gc;
pub mod index;
mod lock;
pub mod verify;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use blobs::{BlobPin, BlobReader, BlobWriter, ContentHash};
pub use error::{StoreError, StoreResult};
pub use gc::GcReport;
pub use index::{
    MAX_MANIFEST_ENTRIES, MAX_MANIFEST_META_BYTES, MAX_RECORD_KEY_BYTES, MAX_RECORD_VALUE_BYTES,
    MAX_REJECTION_DETAIL_BYTES, MAX_REJECTION_KEYS, MAX_REJECTION_PEER_BYTES,
    MAX_REJECTION_REASON_BYTES, MAX_SPLIT_RECORD_BYTES, MAX_SUMMARY_PEERS, ManifestEntry,
    OVERFLOW_PEER, PeerRejections, ReasonCount, RecordKind, RejectionEntry, RejectionSummary,
    RoundManifest, round_key,
};
pub use verify::{CorruptBlob, MissingBlob, VerifyReport};

use blobs::BlobDir;
use error::io_err;
use index::{decode, encode, key_round, ref_key, ref_key_hash, too_large};

/// How a store behaves; [`StoreConfig::default`] suits a node.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// How many of the newest rounds to keep (at least 1). Older ones are pruned at each commit.
    pub keep_rounds: usize,
    /// Collect unreferenced blobs right after each commit (otherwise only at open and on [`Store::gc`]).
    pub gc_after_commit: bool,
    /// sled's page cache, in bytes. The index is small, so this can be too.
    pub index_cache_bytes: u64,
    /// Most bytes of blobs the store holds (and is writing); a write past it is refused with
    /// [`StoreError::Full`] and nothing already stored is touched. `None`: as much as the disk holds.
    pub max_blob_bytes: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            keep_rounds: 3,
            gc_after_commit: true,
            index_cache_bytes: 64 << 20,
            max_blob_bytes: None,
        }
    }
}

/// What opening the store found and cleaned up.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpenReport {
    /// Leftover temporary files (interrupted writes) removed.
    pub temp_files_removed: usize,
    /// The start-up collection (blobs written but never committed, or left by pruning before a crash).
    pub gc: GcReport,
    /// The newest complete round.
    pub current_round: Option<u64>,
}

/// What a commit did besides adding the round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CommitReport {
    /// Rounds removed by the keep-last-K policy.
    pub pruned_rounds: Vec<u64>,
    /// The collection that followed, if [`StoreConfig::gc_after_commit`].
    pub gc: Option<GcReport>,
}

/// Bytes on disk, for `mana status` and the disk-use test.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiskUsage {
    /// Sum of file lengths under the data directory.
    pub total_bytes: u64,
    /// Blocks actually allocated under the data directory (`st_blocks` x 512).
    pub allocated_bytes: u64,
    /// Sum of blob file lengths.
    pub blob_bytes: u64,
    /// Number of blob files.
    pub blob_count: usize,
    /// Sum of file lengths of the sled index.
    pub index_bytes: u64,
}

/// A handle on the store. Cloning is cheap; all clones share one store.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: StoreConfig,
    db: sled::Db,
    rounds: sled::Tree,
    refs: sled::Tree,
    rejections: sled::Tree,
    /// Kept proof of misbehaviour ([`evidence`]): key -> the blobs holding it.
    evidence: sled::Tree,
    /// One tree per [`RecordKind`], in [`RecordKind::index`] order.
    records: Vec<sled::Tree>,
    blobs: Arc<BlobDir>,
    /// Serialises everything that changes which blobs are referenced (commits, references) with the
    /// collector, so that a collection never sees a half-made change.
    refs_lock: Mutex<()>,
    /// Distinct (peer, reason) pairs in the rejection log, to enforce [`MAX_REJECTION_KEYS`].
    rejection_keys: AtomicUsize,
    opened: OpenReport,
    /// Released when the last handle is dropped, after the index (declared last: dropped last).
    _lock: lock::StoreLock,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: opens sled under `dir/index` (which also takes an
    /// exclusive lock, so two processes cannot share a data directory), removes leftover temporary files,
    /// drops references of pruned rounds, and collects unreferenced blobs.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> StoreResult<Store> {
        if config.keep_rounds == 0 {
            return Err(StoreError::Config("keep_rounds must be at least 1"));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock::StoreLock::acquire(&dir)?;
        let db = open_index(&dir.join("index"), config.index_cache_bytes)?;
        let rounds = db.open_tree("rounds")?;
        let refs = db.open_tree("refs")?;
        let rejections = db.open_tree("rejections")?;
        let evidence = db.open_tree("evidence")?;
        let records = RecordKind::ALL
            .iter()
            .map(|kind| db.open_tree(kind.tree_name()))
            .collect::<Result<Vec<_>, _>>()?;
        let blobs = Arc::new(BlobDir::open(&dir, config.max_blob_bytes)?);
        let temp_files_removed = blobs.clear_tmp()?;
        let rejection_keys = AtomicUsize::new(rejections.len());
        let mut store = Store {
            inner: Arc::new(Inner {
                dir,
                config,
                db,
                rounds,
                refs,
                rejections,
                evidence,
                records,
                blobs,
                refs_lock: Mutex::new(()),
                rejection_keys,
                opened: OpenReport::default(),
                _lock: lock,
            }),
        };
        let gc = {
            let _guard = store.lock_refs();
            if let Some(oldest) = store.oldest_round()? {
                store.prune_scoped_below(oldest)?;
            }
            store.gc_locked()?
        };
        let current_round = store.current_round()?;
        let report = OpenReport {
            temp_files_removed,
            gc,
            current_round,
        };
        tracing::info!(
            dir = %store.inner.dir.display(),
            current_round = ?current_round,
            temp_files_removed,
            blobs_removed = report.gc.blobs_removed,
            "store opened"
        );
        // Only we hold the Arc at this point, so the report can be filled in.
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.opened = report;
        }
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// What opening found and cleaned up.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.opened
    }

    fn lock_refs(&self) -> MutexGuard<'_, ()> {
        // The guarded state lives in sled and on disk, not in the mutex, so a poisoned lock is still usable.
        self.inner
            .refs_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- blobs ----

    /// Stores `bytes` as a blob (deduplicated by hash), durably, and returns a pin on it. Hold the pin until
    /// a commit or reference refers to the blob; [`BlobPin::hash`] is its name.
    pub fn put_blob(&self, bytes: &[u8]) -> StoreResult<BlobPin> {
        self.inner.blobs.put(bytes)
    }

    /// Starts writing a blob in pieces (at most `max_len` bytes); see [`BlobWriter`].
    pub fn blob_writer(&self, max_len: u64) -> StoreResult<BlobWriter> {
        self.inner.blobs.writer(max_len)
    }

    /// Reads a whole blob, verified against its hash. A corrupt file gives [`StoreError::CorruptBlob`] (and is
    /// moved aside); a missing one [`StoreError::MissingBlob`].
    pub fn get_blob(&self, hash: &ContentHash) -> StoreResult<Vec<u8>> {
        self.inner.blobs.read(hash)
    }

    /// Opens a blob for streaming (to a peer, say), verified first; see [`BlobReader`].
    pub fn open_blob(&self, hash: &ContentHash) -> StoreResult<BlobReader> {
        self.inner.blobs.open_reader(hash)
    }

    /// Opens a blob for range reads (serving peers) without hashing the whole file again: blobs are verified
    /// once, when they are stored; the reader checks nothing, and the fetcher checks the hash of what it gets.
    pub fn open_blob_ranged(&self, hash: &ContentHash) -> StoreResult<BlobReader> {
        self.inner.blobs.open_ranged(hash)
    }

    /// Bytes of blobs stored and being written: what [`StoreConfig::max_blob_bytes`] bounds.
    pub fn blob_bytes(&self) -> u64 {
        self.inner.blobs.used()
    }

    /// Whether a file for the blob exists (not verified; reading verifies).
    pub fn has_blob(&self, hash: &ContentHash) -> StoreResult<bool> {
        Ok(self.inner.blobs.stored_len(hash)?.is_some())
    }

    /// The length of a stored blob, if there is one.
    pub fn blob_len(&self, hash: &ContentHash) -> StoreResult<Option<u64>> {
        self.inner.blobs.stored_len(hash)
    }

    /// Pins a blob that is already stored (one the next round reuses unchanged, for instance), so that it
    /// outlives the pruning of the rounds that list it. `None` if it is not stored.
    pub fn pin_blob(&self, hash: &ContentHash) -> StoreResult<Option<BlobPin>> {
        let _guard = self.lock_refs();
        Ok(self
            .inner
            .blobs
            .stored_len(hash)?
            .map(|len| self.inner.blobs.pin(*hash, len)))
    }

    // ---- rounds ----

    /// Commits `round`: one sled batch adds its manifest and removes the rounds beyond the keep-last-K
    /// policy, then the index is flushed; only then is the round visible, all its shards together. Every
    /// blob the manifest lists must be stored already, with the listed length. Rounds must increase.
    /// Afterwards, references and round-scoped records of pruned rounds are dropped, and (by default)
    /// unreferenced blobs collected.
    pub fn commit_round(&self, round: u64, manifest: &RoundManifest) -> StoreResult<CommitReport> {
        manifest.check_limits()?;
        let encoded = encode("round manifest", manifest)?;
        too_large("encoded manifest", encoded.len(), index::MAX_MANIFEST_BYTES)?;
        let _guard = self.lock_refs();
        match self.current_round()? {
            Some(current) if round <= current => {
                return Err(StoreError::StaleRound { round, current });
            }
            _ => {}
        }
        let mut checked = HashSet::new();
        for entry in &manifest.entries {
            if !checked.insert(entry.hash) {
                continue;
            }
            match self.inner.blobs.stored_len(&entry.hash)? {
                None => return Err(StoreError::MissingBlob(entry.hash)),
                Some(actual) if actual != entry.len => {
                    return Err(StoreError::BlobLength {
                        hash: entry.hash,
                        expected: entry.len,
                        actual,
                    });
                }
                Some(_) => {}
            }
        }
        let existing = self.rounds()?;
        let excess = (existing.len() + 1).saturating_sub(self.inner.config.keep_rounds);
        let pruned_rounds: Vec<u64> = existing[..excess].to_vec();
        let mut batch = sled::Batch::default();
        batch.insert(round.to_be_bytes().to_vec(), encoded);
        for old in &pruned_rounds {
            batch.remove(old.to_be_bytes().to_vec());
        }
        self.inner.rounds.apply_batch(batch)?;
        let oldest = if pruned_rounds.is_empty() {
            None
        } else {
            self.oldest_round()?
        };
        if let Some(oldest) = oldest {
            self.prune_scoped_below(oldest)?;
        }
        self.inner.db.flush()?;
        let gc = if self.inner.config.gc_after_commit {
            Some(self.gc_locked()?)
        } else {
            None
        };
        Ok(CommitReport { pruned_rounds, gc })
    }

    /// The newest committed round, if any.
    pub fn current_round(&self) -> StoreResult<Option<u64>> {
        Ok(self
            .inner
            .rounds
            .last()?
            .and_then(|(key, _)| key_round(&key)))
    }

    /// The oldest retained round, if any.
    fn oldest_round(&self) -> StoreResult<Option<u64>> {
        Ok(self
            .inner
            .rounds
            .first()?
            .and_then(|(key, _)| key_round(&key)))
    }

    /// The manifest of a retained round.
    pub fn manifest(&self, round: u64) -> StoreResult<Option<RoundManifest>> {
        match self.inner.rounds.get(round.to_be_bytes())? {
            Some(bytes) => Ok(Some(decode("round manifest", &bytes)?)),
            None => Ok(None),
        }
    }

    /// The newest round and its manifest, read together (a separate `current_round` then `manifest` could
    /// straddle a commit).
    pub fn latest(&self) -> StoreResult<Option<(u64, RoundManifest)>> {
        match self.inner.rounds.last()? {
            Some((key, bytes)) => {
                let round =
                    key_round(&key).ok_or(StoreError::InvalidKey("round key is not 8 bytes"))?;
                Ok(Some((round, decode("round manifest", &bytes)?)))
            }
            None => Ok(None),
        }
    }

    /// The retained rounds, oldest first.
    pub fn rounds(&self) -> StoreResult<Vec<u64>> {
        let mut out = Vec::new();
        for item in self.inner.rounds.iter().keys() {
            let key = item?;
            out.push(key_round(&key).ok_or(StoreError::InvalidKey("round key is not 8 bytes"))?);
        }
        Ok(out)
    }

    /// Removes blob references and round-scoped records of rounds older than `oldest`. Caller holds the lock.
    fn prune_scoped_below(&self, oldest: u64) -> StoreResult<()> {
        let end = oldest.to_be_bytes();
        let mut trees = vec![&self.inner.refs];
        for kind in RecordKind::ALL.iter().filter(|k| k.is_round_scoped()) {
            trees.push(&self.inner.records[kind.index()]);
        }
        for tree in trees {
            let mut batch = sled::Batch::default();
            for key in tree.range(..end.as_slice()).keys() {
                batch.remove(key?);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }

    // ---- blob references ----

    /// Records that round `round` needs these blobs (delta payloads of a round being assembled, say), so the
    /// collector keeps them until the round is pruned. The blobs must be stored. Flushed before returning.
    pub fn add_blob_refs(&self, round: u64, hashes: &[ContentHash]) -> StoreResult<()> {
        let _guard = self.lock_refs();
        let mut batch = sled::Batch::default();
        for hash in hashes {
            if self.inner.blobs.stored_len(hash)?.is_none() {
                return Err(StoreError::MissingBlob(*hash));
            }
            batch.insert(ref_key(round, hash).to_vec(), Vec::<u8>::new());
        }
        self.inner.refs.apply_batch(batch)?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// Drops references added by [`Store::add_blob_refs`] (a delta that was rejected, say).
    pub fn remove_blob_refs(&self, round: u64, hashes: &[ContentHash]) -> StoreResult<()> {
        let _guard = self.lock_refs();
        let mut batch = sled::Batch::default();
        for hash in hashes {
            batch.remove(ref_key(round, hash).to_vec());
        }
        self.inner.refs.apply_batch(batch)?;
        Ok(())
    }

    /// The blobs referenced for `round`.
    pub fn blob_refs(&self, round: u64) -> StoreResult<Vec<ContentHash>> {
        let mut out = Vec::new();
        for key in self.inner.refs.scan_prefix(round.to_be_bytes()).keys() {
            let key = key?;
            out.push(
                ref_key_hash(&key)
                    .ok_or(StoreError::InvalidKey("blob reference key is not 40 bytes"))?,
            );
        }
        Ok(out)
    }

    // ---- records ----

    fn check_record(kind: RecordKind, key: &[u8], value_len: usize) -> StoreResult<()> {
        too_large("record key", key.len(), MAX_RECORD_KEY_BYTES)?;
        too_large("record value", value_len, MAX_RECORD_VALUE_BYTES)?;
        if kind.is_round_scoped() && key.len() < 8 {
            return Err(StoreError::InvalidKey(
                "round-scoped record keys start with the round (see round_key)",
            ));
        }
        Ok(())
    }

    /// Stores a small record (at most [`MAX_RECORD_VALUE_BYTES`]), replacing any with the same key. Not
    /// flushed at once: sled flushes within half a second, and the next commit flushes everything.
    pub fn put_record(&self, kind: RecordKind, key: &[u8], value: &[u8]) -> StoreResult<()> {
        Self::check_record(kind, key, value.len())?;
        self.inner.records[kind.index()].insert(key, value)?;
        Ok(())
    }

    /// Stores a record together with blob references for `round`, in one sled transaction, and flushes:
    /// a delta announcement and its payload, typically. The blobs must be stored.
    pub fn put_record_with_blobs(
        &self,
        kind: RecordKind,
        key: &[u8],
        value: &[u8],
        round: u64,
        blobs: &[ContentHash],
    ) -> StoreResult<()> {
        use sled::Transactional;
        Self::check_record(kind, key, value.len())?;
        let _guard = self.lock_refs();
        for hash in blobs {
            if self.inner.blobs.stored_len(hash)?.is_none() {
                return Err(StoreError::MissingBlob(*hash));
            }
        }
        let records = &self.inner.records[kind.index()];
        (records, &self.inner.refs)
            .transaction(|(records, refs)| {
                records.insert(key, value)?;
                for hash in blobs {
                    refs.insert(ref_key(round, hash).to_vec(), Vec::<u8>::new())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|err| StoreError::Transaction(format!("{err:?}")))?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// Stores a record of any size up to [`MAX_SPLIT_RECORD_BYTES`] (the coordinator's state, which grows with
    /// its members), replacing any with the same key: a header under `key` and the value in parts of at most
    /// [`MAX_RECORD_VALUE_BYTES`] under derived keys, all written (and the parts of a longer old value
    /// removed) in one sled transaction, then flushed. Read it back with [`Store::get_split_record`].
    pub fn put_split_record(&self, kind: RecordKind, key: &[u8], value: &[u8]) -> StoreResult<()> {
        too_large("split record value", value.len(), MAX_SPLIT_RECORD_BYTES)?;
        Self::check_record(kind, &index::split_part_key(key, 0), 0)?;
        let tree = &self.inner.records[kind.index()];
        let old_parts = tree
            .get(key)?
            .and_then(|h| index::decode_split_header(&h))
            .map_or(0, |(parts, _)| parts);
        let parts: Vec<&[u8]> = value.chunks(MAX_RECORD_VALUE_BYTES).collect();
        let header = index::encode_split_header(parts.len() as u32, value.len() as u64);
        tree.transaction(|t| {
            t.insert(key, header.as_slice())?;
            for (i, part) in parts.iter().enumerate() {
                t.insert(index::split_part_key(key, i as u32), *part)?;
            }
            for i in parts.len() as u32..old_parts {
                t.remove(index::split_part_key(key, i))?;
            }
            Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
        })
        .map_err(|err| StoreError::Transaction(format!("{err:?}")))?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// Reads a record stored with [`Store::put_split_record`], in one transaction (never half of one value
    /// and half of the next). A plain record under `key` (written by [`Store::put_record`], as the
    /// coordinator's state was before it could grow past one record) is returned as it is.
    pub fn get_split_record(&self, kind: RecordKind, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let tree = &self.inner.records[kind.index()];
        tree.transaction(|t| {
            let Some(head) = t.get(key)? else {
                return Ok(Ok(None));
            };
            let Some((parts, len)) = index::decode_split_header(&head) else {
                return Ok(Ok(Some(head.to_vec())));
            };
            let mut value = Vec::with_capacity(len.min(MAX_SPLIT_RECORD_BYTES as u64) as usize);
            for i in 0..parts {
                match t.get(index::split_part_key(key, i))? {
                    Some(part) => value.extend_from_slice(&part),
                    None => {
                        return Ok(Err(StoreError::Decode {
                            what: "split record",
                            detail: format!("part {i} of {parts} is missing"),
                        }));
                    }
                }
            }
            if value.len() as u64 != len {
                return Ok(Err(StoreError::Decode {
                    what: "split record",
                    detail: format!("{} bytes, the header says {len}", value.len()),
                }));
            }
            Ok(Ok(Some(value)))
        })
        .map_err(|err: sled::transaction::TransactionError<()>| {
            StoreError::Transaction(format!("{err:?}"))
        })?
    }

    /// Reads a record.
    pub fn get_record(&self, kind: RecordKind, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.inner.records[kind.index()]
            .get(key)?
            .map(|v| v.to_vec()))
    }

    /// Removes a record; returns whether there was one.
    pub fn remove_record(&self, kind: RecordKind, key: &[u8]) -> StoreResult<bool> {
        Ok(self.inner.records[kind.index()].remove(key)?.is_some())
    }

    /// Every record of a kind, in key order.
    pub fn records(&self, kind: RecordKind) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(kind, &[])
    }

    /// The records of a round-scoped kind that belong to `round`.
    pub fn records_in_round(
        &self,
        kind: RecordKind,
        round: u64,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(kind, &round.to_be_bytes())
    }

    fn scan(&self, kind: RecordKind, prefix: &[u8]) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.inner.records[kind.index()].scan_prefix(prefix) {
            let (key, value) = item?;
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Stores a serde value as a record (bincode, with a format byte), within the record size limit.
    pub fn put_typed<T: Serialize>(
        &self,
        kind: RecordKind,
        key: &[u8],
        value: &T,
    ) -> StoreResult<()> {
        let bytes = encode("record", value)?;
        self.put_record(kind, key, &bytes)
    }

    /// Reads a record written by [`Store::put_typed`].
    pub fn get_typed<T: DeserializeOwned>(
        &self,
        kind: RecordKind,
        key: &[u8],
    ) -> StoreResult<Option<T>> {
        match self.get_record(kind, key)? {
            Some(bytes) => Ok(Some(decode("record", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Makes everything written so far durable (records are otherwise flushed within half a second).
    pub fn flush(&self) -> StoreResult<()> {
        self.inner.db.flush()?;
        Ok(())
    }

    // ---- rejection log ----

    /// Counts one rejected message from `peer` for `reason` (a stable reason code), keeping `detail` as the
    /// last detail. Over-long inputs are truncated, never refused: logging a bad message must not fail.
    pub fn record_rejection(&self, peer: &str, reason: &str, detail: &str) -> StoreResult<()> {
        let peer = index::truncate_text(peer, MAX_REJECTION_PEER_BYTES);
        let reason = index::truncate_text(reason, MAX_REJECTION_REASON_BYTES);
        let detail = index::truncate_text(detail, MAX_REJECTION_DETAIL_BYTES);
        let mut key = index::rejection_key(&peer, &reason);
        if self.inner.rejection_keys.load(Ordering::Relaxed) >= MAX_REJECTION_KEYS
            && !self.inner.rejections.contains_key(&key)?
        {
            key = index::rejection_key(OVERFLOW_PEER, &reason);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let previous = self.inner.rejections.fetch_and_update(&key, |old| {
            let mut entry = old
                .and_then(|bytes| decode::<RejectionEntry>("rejection entry", bytes).ok())
                .unwrap_or(RejectionEntry {
                    count: 0,
                    first_seen_unix: now,
                    last_seen_unix: now,
                    last_detail: String::new(),
                });
            entry.count = entry.count.saturating_add(1);
            entry.last_seen_unix = now;
            entry.last_detail = detail.clone();
            // Encoding a struct of integers and a bounded string cannot fail; if it somehow did, keep the old.
            encode("rejection entry", &entry)
                .ok()
                .or_else(|| old.map(<[u8]>::to_vec))
        })?;
        if previous.is_none() {
            self.inner.rejection_keys.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The rejection log, summed per reason and per peer (the peers with most rejections first, at most
    /// [`MAX_SUMMARY_PEERS`] of them).
    pub fn rejection_summary(&self) -> StoreResult<RejectionSummary> {
        let mut summary = RejectionSummary::default();
        let mut peers: std::collections::BTreeMap<String, PeerRejections> = Default::default();
        for item in self.inner.rejections.iter() {
            let (key, value) = item?;
            let Some((peer, reason)) = index::split_rejection_key(&key) else {
                tracing::warn!("skipping an unreadable rejection-log key");
                continue;
            };
            let entry: RejectionEntry = decode("rejection entry", &value)?;
            summary.total = summary.total.saturating_add(entry.count);
            *summary.by_reason.entry(reason.clone()).or_insert(0) += entry.count;
            let slot = peers.entry(peer.clone()).or_insert_with(|| PeerRejections {
                peer,
                total: 0,
                reasons: Vec::new(),
            });
            slot.total = slot.total.saturating_add(entry.count);
            slot.reasons.push(ReasonCount { reason, entry });
        }
        summary.by_peer = peers.into_values().collect();
        for peer in &mut summary.by_peer {
            peer.reasons.sort_by(|a, b| {
                b.entry
                    .count
                    .cmp(&a.entry.count)
                    .then(a.reason.cmp(&b.reason))
            });
        }
        summary
            .by_peer
            .sort_by(|a, b| b.total.cmp(&a.total).then(a.peer.cmp(&b.peer)));
        let listed = summary.by_peer.len().min(index::MAX_SUMMARY_PEERS);
        summary.other_peers = (summary.by_peer.len() - listed) as u64;
        summary.by_peer.truncate(listed);
        Ok(summary)
    }

    // ---- accounting ----

    /// Every blob a retained round or a blob reference refers to. Caller holds the lock when it matters.
    fn referenced(&self) -> StoreResult<HashSet<ContentHash>> {
        let mut live = HashSet::new();
        for item in self.inner.rounds.iter().values() {
            let manifest: RoundManifest = decode("round manifest", &item?)?;
            live.extend(manifest.entries.iter().map(|e| e.hash));
        }
        for key in self.inner.refs.iter().keys() {
            let key = key?;
            live.insert(
                ref_key_hash(&key)
                    .ok_or(StoreError::InvalidKey("blob reference key is not 40 bytes"))?,
            );
        }
        live.extend(self.evidence_blobs()?);
        Ok(live)
    }

    /// Bytes of the blobs that retained rounds and references need: the data the store must keep.
    pub fn live_bytes(&self) -> StoreResult<u64> {
        let mut total = 0;
        for hash in self.referenced()? {
            total += self.inner.blobs.stored_len(&hash)?.unwrap_or(0);
        }
        Ok(total)
    }

    /// Measures the data directory.
    pub fn disk_usage(&self) -> StoreResult<DiskUsage> {
        let mut usage = DiskUsage::default();
        let index_dir = self.inner.dir.join("index");
        let blobs_dir = self.inner.dir.join("blobs");
        let mut stack = vec![self.inner.dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(io_err(&path))?;
                usage.allocated_bytes += meta.blocks() * 512;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                usage.total_bytes += meta.len();
                if path.starts_with(&index_dir) {
                    usage.index_bytes += meta.len();
                } else if path.starts_with(&blobs_dir) {
                    usage.blob_bytes += meta.len();
                    usage.blob_count += 1;
                }
            }
        }
        Ok(usage)
    }
}

/// How long [`open_index`] keeps retrying while sled's lock on the index is still held.
const INDEX_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens the sled index. sled takes an exclusive lock on its file; after a store is dropped, sled releases
/// its file handle only once its epoch-based reclamation runs, which can lag behind the drop within one
/// process (a reopen right after a close then fails with "could not acquire lock"). So a lock failure is
/// retried for up to [`INDEX_LOCK_WAIT`]; another process that really holds the store still gets the error.
fn open_index(path: &Path, cache_bytes: u64) -> StoreResult<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace)
            .open();
        match result {
            Err(sled::Error::Io(err))
                if err.to_string().contains("could not acquire lock")
                    && started.elapsed() < INDEX_LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}
