//! Content-addressed blob files: the bytes of shards and delta payloads, each in a file named by its blake3
//! hash, fanned out into 256 subdirectories by the hash's first byte (`blobs/ab/ab12…`).
//!
//! Every blob is written atomically: into a temporary file under `tmp/`, fsync'd, renamed into place, and the
//! directory fsync'd. So a file under `blobs/` is either absent or complete; after a crash only `tmp/` holds
//! debris, which the store removes at start-up. Reads re-hash the file and never hand out bytes that do not
//! match the name.
//!
//! Blobs written in this process are *pinned* (see [`BlobPin`]) until the caller drops the pin: the garbage
//! collector never removes a pinned blob, so a round being assembled cannot lose its shards before the commit
//! that refers to them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::{StoreError, StoreResult, io_err};

/// Size of the buffer used to hash or copy files in pieces.
const CHUNK_BYTES: usize = 1 << 20;

/// A blob's name in the store is the protocol's content hash of its bytes (one hash type everywhere).
pub use mana_protocol::ContentHash;

/// The in-memory set of pinned blobs, with a count per blob (several pins may hold one blob).
#[derive(Debug, Default)]
pub(crate) struct PinTable {
    counts: Mutex<HashMap<ContentHash, usize>>,
}

impl PinTable {
    /// Locks the table. A poisoned lock only means another thread panicked while holding it; the map of counts
    /// is still consistent (every mutation is a single insert or remove), so we keep using it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<ContentHash, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pin(self: &Arc<Self>, hash: ContentHash, len: u64) -> BlobPin {
        *self.lock().entry(hash).or_insert(0) += 1;
        BlobPin {
            hash,
            len,
            table: Arc::clone(self),
        }
    }

    /// How many blobs are pinned now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Keeps a blob from being garbage-collected while the caller still needs it (typically: from the moment a
/// shard or delta payload is written until the sled commit that refers to it). Dropping the pin releases it;
/// an unreferenced, unpinned blob is then removed by the next collection. Clones are independent pins.
#[derive(Debug)]
pub struct BlobPin {
    hash: ContentHash,
    len: u64,
    table: Arc<PinTable>,
}

impl BlobPin {
    /// The pinned blob's hash (its name).
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    /// The blob's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Clone for BlobPin {
    fn clone(&self) -> Self {
        self.table.pin(self.hash, self.len)
    }
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        let mut counts = self.table.lock();
        if let Some(count) = counts.get_mut(&self.hash) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.hash);
            }
        }
    }
}

/// One file found under `blobs/` by a listing.
#[derive(Debug)]
pub(crate) enum BlobEntry {
    /// A file whose name is a blob hash, in the right fan-out directory.
    Blob {
        /// The hash its name gives.
        hash: ContentHash,
        /// Its length in bytes.
        len: u64,
    },
    /// Anything else (the store never writes such files there).
    Stray(PathBuf),
}

/// The blob half of the store: directory layout, atomic writes, verified reads, pins.
#[derive(Debug)]
pub(crate) struct BlobDir {
    blobs: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    pins: Arc<PinTable>,
    next_tmp: AtomicU64,
    /// Most bytes of blob files, stored and being written (`None`: as much as the disk holds).
    quota: Option<u64>,
    /// Bytes of the blob files in `blobs/`.
    stored: AtomicU64,
    /// Bytes written so far by writers not yet finished.
    writing: AtomicU64,
}

impl BlobDir {
    /// Creates (if needed) `blobs/00`..`blobs/ff`, `tmp/` and `quarantine/` under `root`, and makes the
    /// directory entries durable.
    pub(crate) fn open(root: &Path, quota: Option<u64>) -> StoreResult<Self> {
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        let quarantine = root.join("quarantine");
        for dir in [&blobs, &tmp, &quarantine] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        for prefix in 0..=255u8 {
            let dir = blobs.join(hex::encode([prefix]));
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        sync_dir(&blobs)?;
        sync_dir(root)?;
        let dir = Self {
            blobs,
            tmp,
            quarantine,
            pins: Arc::default(),
            next_tmp: AtomicU64::new(0),
            quota,
            stored: AtomicU64::new(0),
            writing: AtomicU64::new(0),
        };
        let stored = dir
            .list()?
            .iter()
            .map(|e| match e {
                BlobEntry::Blob { len, .. } => *len,
                BlobEntry::Stray(_) => 0,
            })
            .sum();
        dir.stored.store(stored, Ordering::Relaxed);
        Ok(dir)
    }

    /// The file a blob lives in.
    pub(crate) fn path_of(&self, hash: &ContentHash) -> PathBuf {
        let name = hash.to_hex();
        self.blobs.join(&name[..2]).join(name)
    }

    /// Removes every leftover temporary file (writes interrupted by a crash). Only safe while no writer is
    /// running, i.e. at open, which holds sled's exclusive lock on the data directory.
    pub(crate) fn clear_tmp(&self) -> StoreResult<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
            let path = entry.map_err(io_err(&self.tmp))?.path();
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(io_err(&path))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Pins `hash` for the caller.
    pub(crate) fn pin(&self, hash: ContentHash, len: u64) -> BlobPin {
        self.pins.pin(hash, len)
    }

    /// The pin table (the collector consults it).
    pub(crate) fn pins(&self) -> &PinTable {
        &self.pins
    }

    /// The length of a stored blob, or `None` if there is no file for it.
    pub(crate) fn stored_len(&self, hash: &ContentHash) -> StoreResult<Option<u64>> {
        let path = self.path_of(hash);
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io_err(path)(err)),
        }
    }

    /// Whether `more` bytes of blob fit under the quota; [`StoreError::Full`] when they do not.
    pub(crate) fn admit(&self, more: u64) -> StoreResult<()> {
        let Some(quota) = self.quota else {
            return Ok(());
        };
        let used = self.used();
        if used.saturating_add(more) > quota {
            return Err(StoreError::Full {
                needed: more,
                used,
                quota,
            });
        }
        Ok(())
    }

    /// Bytes of blob files stored and being written.
    pub(crate) fn used(&self) -> u64 {
        self.stored.load(Ordering::Relaxed) + self.writing.load(Ordering::Relaxed)
    }

    /// Writes `bytes` as a blob (unless an identical one is already stored) and returns a pin on it.
    pub(crate) fn put(&self, bytes: &[u8]) -> StoreResult<BlobPin> {
        let hash = ContentHash::of(bytes);
        // Pin before looking: from here on the collector leaves this name alone, so a file we find stays.
        let pin = self.pin(hash, bytes.len() as u64);
        if self.stored_len(&hash)? == Some(bytes.len() as u64) {
            return Ok(pin);
        }
        self.admit(bytes.len() as u64)?;
        let (tmp_path, file) = self.create_tmp()?;
        let mut guard = TmpGuard(Some(tmp_path.clone()));
        let mut file = file;
        file.write_all(bytes).map_err(io_err(&tmp_path))?;
        self.install(&tmp_path, file, &hash, bytes.len() as u64)?;
        guard.disarm();
        Ok(pin)
    }

    /// Starts a streaming write of at most `max_len` bytes.
    pub(crate) fn writer(self: &Arc<Self>, max_len: u64) -> StoreResult<BlobWriter> {
        let (tmp_path, file) = self.create_tmp()?;
        Ok(BlobWriter {
            dir: Arc::clone(self),
            out: Some(BufWriter::with_capacity(CHUNK_BYTES, file)),
            tmp: TmpGuard(Some(tmp_path)),
            hasher: blake3::Hasher::new(),
            written: 0,
            counted: 0,
            max_len,
        })
    }

    fn create_tmp(&self) -> StoreResult<(PathBuf, File)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((path, file))
    }

    /// Makes a fully written temporary file the blob `hash`: fsync the file, rename it into place, fsync the
    /// fan-out directory. Only after this returns may a sled commit refer to the blob.
    fn install(
        &self,
        tmp_path: &Path,
        file: File,
        hash: &ContentHash,
        len: u64,
    ) -> StoreResult<()> {
        file.sync_all().map_err(io_err(tmp_path))?;
        drop(file);
        let dest = self.path_of(hash);
        let replaced = self.stored_len(hash)?.unwrap_or(0);
        fs::rename(tmp_path, &dest).map_err(io_err(&dest))?;
        self.stored.fetch_add(len, Ordering::Relaxed);
        self.forget_bytes(replaced);
        let parent = dest.parent().unwrap_or(&self.blobs);
        sync_dir(parent)
    }

    /// Reads a whole blob and checks it against its name. A mismatch quarantines the file and is an error.
    pub(crate) fn read(&self, hash: &ContentHash) -> StoreResult<Vec<u8>> {
        let path = self.path_of(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob(*hash));
            }
            Err(err) => return Err(io_err(path)(err)),
        };
        let actual = ContentHash::of(&bytes);
        if actual != *hash {
            return Err(self.corrupt(hash, actual));
        }
        Ok(bytes)
    }

    /// Hashes a stored file in pieces, without keeping it in memory. `Ok(None)` if there is no such file.
    pub(crate) fn hash_file(&self, hash: &ContentHash) -> StoreResult<Option<(ContentHash, u64)>> {
        let path = self.path_of(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_err(path)(err)),
        };
        let (actual, len) = hash_reader(&mut file).map_err(io_err(&path))?;
        Ok(Some((actual, len)))
    }

    /// Opens a blob for streaming: the whole file is hashed first (so a corrupt file is an error here, before
    /// any byte is handed out), then it is read again through a reader that re-hashes as it goes.
    pub(crate) fn open_reader(&self, hash: &ContentHash) -> StoreResult<BlobReader> {
        let (path, mut file) = self.open_file(hash)?;
        let (actual, len) = hash_reader(&mut file).map_err(io_err(&path))?;
        if actual != *hash {
            return Err(self.corrupt(hash, actual));
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        Ok(BlobReader::new(file, *hash, len, false))
    }

    /// Opens a stored blob for range reads without hashing it again: it was verified when it was installed
    /// (every install path checks the hash of the bytes it writes), and whoever fetches ranges of it checks
    /// the hash of what it receives. `mana node --verify-store` re-hashes every file.
    pub(crate) fn open_ranged(&self, hash: &ContentHash) -> StoreResult<BlobReader> {
        let (path, file) = self.open_file(hash)?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        Ok(BlobReader::new(file, *hash, len, true))
    }

    /// The blob's file, opened for reading, with its path; [`StoreError::MissingBlob`] when there is none.
    fn open_file(&self, hash: &ContentHash) -> StoreResult<(PathBuf, File)> {
        let path = self.path_of(hash);
        match File::open(&path) {
            Ok(file) => Ok((path, file)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob(*hash))
            }
            Err(err) => Err(io_err(path)(err)),
        }
    }

    /// Takes `len` bytes off the stored count (a file removed or quarantined).
    fn forget_bytes(&self, len: u64) {
        let _ = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(len))
            });
    }

    /// Moves a corrupt blob out of `blobs/` (so it reads as missing and can be fetched again), logs it, and
    /// returns the error to hand the caller.
    fn corrupt(&self, hash: &ContentHash, actual: ContentHash) -> StoreError {
        let path = self.path_of(hash);
        let dest = self.quarantine.join(hash.to_hex());
        let len = self.stored_len(hash).ok().flatten().unwrap_or(0);
        match fs::rename(&path, &dest) {
            Ok(()) => {
                self.forget_bytes(len);
                tracing::error!(blob = %hash, %actual, quarantined = %dest.display(), "corrupt blob")
            }
            Err(err) => {
                tracing::error!(blob = %hash, %actual, %err, "corrupt blob; could not quarantine it")
            }
        }
        StoreError::CorruptBlob {
            hash: *hash,
            actual,
        }
    }

    /// Lists every file under `blobs/`.
    pub(crate) fn list(&self) -> StoreResult<Vec<BlobEntry>> {
        let mut out = Vec::new();
        for prefix in 0..=255u8 {
            let prefix_hex = hex::encode([prefix]);
            let dir = self.blobs.join(&prefix_hex);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err(dir)(err)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(io_err(&path))?;
                let name = entry.file_name();
                let hash = name
                    .to_str()
                    .and_then(ContentHash::from_hex)
                    .filter(|h| h.to_hex()[..2] == prefix_hex);
                match hash {
                    Some(hash) if meta.is_file() => out.push(BlobEntry::Blob {
                        hash,
                        len: meta.len(),
                    }),
                    _ => out.push(BlobEntry::Stray(path)),
                }
            }
        }
        Ok(out)
    }

    /// Removes a blob unless it is pinned. The pin table stays locked across the check and the removal, so a
    /// concurrent `put` of the same bytes either pins first (and the blob stays) or finds no file and writes it.
    pub(crate) fn remove_unless_pinned(&self, hash: &ContentHash) -> StoreResult<bool> {
        let pins = self.pins.lock();
        if pins.contains_key(hash) {
            return Ok(false);
        }
        let path = self.path_of(hash);
        let len = self.stored_len(hash)?.unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.forget_bytes(len);
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(io_err(path)(err)),
        }
    }
}

/// Hashes everything `reader` yields; returns the hash and the byte count.
fn hash_reader(reader: &mut impl Read) -> io::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hasher.finalize().into(), len))
}

/// fsyncs a directory, so that renames and creations inside it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Deletes a temporary file when dropped, unless disarmed (it was renamed into place).
#[derive(Debug)]
struct TmpGuard(Option<PathBuf>);

impl TmpGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        let Some(path) = self.0.take() else { return };
        if let Err(err) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %err, "could not remove a temporary blob file");
        }
    }
}

/// Writes one blob in pieces (a 50 MB shard arriving in chunks), hashing as it goes. Nothing is visible under
/// `blobs/` until [`BlobWriter::finish`]; dropping an unfinished writer deletes its temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    dir: Arc<BlobDir>,
    out: Option<BufWriter<File>>,
    tmp: TmpGuard,
    hasher: blake3::Hasher,
    written: u64,
    /// Bytes this writer added to its directory's count of bytes being written.
    counted: u64,
    max_len: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The hash of the bytes written so far (the writer hashes as it writes, so a fetcher checks this one
    /// instead of hashing the bytes again).
    pub fn hash(&self) -> ContentHash {
        self.hasher.finalize().into()
    }

    /// Forgets everything written so far (the temporary file is emptied), for another attempt at the blob.
    pub fn restart(&mut self) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already finished"))?;
        out.flush()?;
        out.get_mut().set_len(0)?;
        out.get_mut().seek(SeekFrom::Start(0))?;
        self.hasher.reset();
        self.written = 0;
        Ok(())
    }

    /// Completes the blob: flush, fsync, rename into place, fsync the directory. Returns a pin on it.
    pub fn finish(self) -> StoreResult<BlobPin> {
        self.finish_inner(None)
    }

    /// Like [`BlobWriter::finish`], but the bytes must hash to `expected` (the hash a peer announced);
    /// otherwise nothing is stored and [`StoreError::HashMismatch`] is returned.
    pub fn finish_expecting(self, expected: &ContentHash) -> StoreResult<BlobPin> {
        self.finish_inner(Some(expected))
    }

    fn finish_inner(mut self, expected: Option<&ContentHash>) -> StoreResult<BlobPin> {
        let tmp_path = self
            .tmp
            .0
            .clone()
            .ok_or(StoreError::Config("blob writer already finished"))?;
        let hash: ContentHash = self.hasher.finalize().into();
        match expected {
            Some(expected) if *expected != hash => {
                return Err(StoreError::HashMismatch {
                    expected: *expected,
                    actual: hash,
                });
            }
            _ => {}
        }
        let out = self
            .out
            .take()
            .ok_or(StoreError::Config("blob writer already finished"))?;
        let file = out
            .into_inner()
            .map_err(|err| io_err(&tmp_path)(err.into_error()))?;
        let pin = self.dir.pin(hash, self.written);
        // From here the bytes count as stored (install) or are dropped with the temporary copy.
        self.uncount();
        if self.dir.stored_len(&hash)? == Some(self.written) {
            return Ok(pin); // already stored; the guard deletes our temporary copy
        }
        self.dir.install(&tmp_path, file, &hash, self.written)?;
        self.tmp.disarm();
        Ok(pin)
    }
}

impl BlobWriter {
    /// Takes this writer's bytes off the count of bytes being written.
    fn uncount(&mut self) {
        let counted = std::mem::take(&mut self.counted);
        let _ = self
            .dir
            .writing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(counted))
            });
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.uncount();
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let new_len = self.written.saturating_add(buf.len() as u64);
        if new_len > self.max_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("blob exceeds its limit of {} bytes", self.max_len),
            ));
        }
        // The quota counts bytes as they are written, so writers at once cannot overrun it together.
        self.dir
            .admit(buf.len() as u64)
            .map_err(|e| io::Error::new(io::ErrorKind::StorageFull, e))?;
        self.dir
            .writing
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.counted += buf.len() as u64;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already finished"))?;
        let n = out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// Streams a stored blob that was verified when opened. It re-hashes as it reads; if the file changed since
/// (a disk fault under our feet), the read that reaches the end fails with `InvalidData` instead of
/// returning end-of-file, so a consumer that reads to the end never accepts bad bytes silently.
///
/// It also serves ranges ([`Seek`]), e.g. chunks of a shard for peers: the blob was verified once at open,
/// and after a seek the reader no longer re-hashes (the bytes read are no longer the whole blob in order).
#[derive(Debug)]
pub struct BlobReader {
    file: File,
    hasher: blake3::Hasher,
    expected: ContentHash,
    len: u64,
    read: u64,
    /// Set by a seek: reads serve ranges, and the end-of-read re-hash check is off.
    ranged: bool,
}

impl BlobReader {
    /// A reader at the start of `file`, the blob `expected` of `len` bytes; `ranged` turns the end-of-read
    /// hash check off from the start (a reader for range reads).
    fn new(file: File, expected: ContentHash, len: u64, ranged: bool) -> BlobReader {
        BlobReader {
            file,
            hasher: blake3::Hasher::new(),
            expected,
            len,
            read: 0,
            ranged,
        }
    }

    /// The blob's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blob's hash.
    pub fn hash(&self) -> ContentHash {
        self.expected
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if self.ranged {
            return Ok(n);
        }
        if n == 0 && !buf.is_empty() {
            let actual: ContentHash = self.hasher.finalize().into();
            if actual != self.expected || self.read != self.len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} changed while being read (now hashes to {actual})",
                        self.expected
                    ),
                ));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.ranged = true;
        self.file.seek(pos)
    }
}
