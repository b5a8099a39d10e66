//! Serving fetch requests from the store by range reads. A blob was verified once, when it was stored, and is
//! not hashed again to be served (the fetcher checks the hash of what it receives): the first request opens
//! the file, the open reader is kept in a small cache of open blobs, and every chunk is a seek and a read of
//! just its bytes. So serving costs no hash pass, a cache miss costs one `open`, and a blob larger than
//! memory is served without ever being held whole. Concurrent first requests for one blob share one open.
//!
//! The same cache backs both protocols: chunk requests ([`answer`]) and bulk streams ([`StoreBlobs`], the
//! store as a [`BlobSource`] for [`crate::net::bulk::serve`]).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use mana_protocol::limits::MAX_FETCH_CHUNK_BYTES;
use mana_protocol::{Bytes, ContentHash, FetchRequest, FetchResponse, Text};
use tokio::sync::OnceCell;

use super::{NodeError, Shared, blocking};
use crate::net::bulk::{BlobSource, RangeRead, ServeLimits};
use crate::store::{BlobReader, Store, StoreError};

/// How many blobs a node keeps open for serving (least recently used closed first).
pub const OPEN_BLOBS: usize = 64;

/// A verified, open blob, shared by the requests for its chunks (each seeks, then reads its range).
type OpenBlob = Arc<Mutex<BlobReader>>;

/// The blobs open for serving (verified when they were stored, not when opened).
pub struct BlobCache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    blobs: HashMap<[u8; 32], Slot>,
    clock: u64,
}

struct Slot {
    /// Filled by the first request's open; later requests wait on it.
    blob: Arc<OnceCell<OpenBlob>>,
    last_used: u64,
}

impl BlobCache {
    /// A cache keeping at most `cap` blobs open.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot of `hash`, created if absent; the least recently used slot goes when over the cap.
    fn slot(&self, hash: [u8; 32]) -> Arc<OnceCell<OpenBlob>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if !inner.blobs.contains_key(&hash) && inner.blobs.len() >= self.cap {
            let oldest = inner
                .blobs
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(h, _)| *h);
            if let Some(oldest) = oldest {
                inner.blobs.remove(&oldest);
            }
        }
        let slot = inner.blobs.entry(hash).or_insert_with(|| Slot {
            blob: Arc::default(),
            last_used: now,
        });
        slot.last_used = now;
        slot.blob.clone()
    }

    /// Forgets `hash` (it left the store, or could not be opened).
    fn remove(&self, hash: &[u8; 32]) {
        self.lock().blobs.remove(hash);
    }

    /// Number of blobs open now.
    pub fn len(&self) -> usize {
        self.lock()
            .blobs
            .values()
            .filter(|s| s.blob.initialized())
            .count()
    }

    /// Whether no blob is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open reader of `hash`, opened once. `None` when the store lacks it.
    async fn open(&self, store: &Store, hash: [u8; 32]) -> Result<Option<OpenBlob>, NodeError> {
        let slot = self.slot(hash);
        let opened = slot
            .get_or_try_init(|| {
                let store = store.clone();
                async move {
                    let reader = blocking(move || {
                        Ok(store.open_blob_ranged(&mana_protocol::ContentHash(hash))?)
                    })
                    .await?;
                    Ok::<_, NodeError>(Arc::new(Mutex::new(reader)))
                }
            })
            .await;
        match opened {
            Ok(blob) => Ok(Some(blob.clone())),
            Err(e) => {
                self.remove(&hash);
                match e {
                    NodeError::Store(StoreError::MissingBlob(_)) => Ok(None),
                    e => Err(e),
                }
            }
        }
    }
}

fn refused(reason: &str) -> FetchResponse {
    FetchResponse::Refused {
        reason: Text::new(reason).expect("reasons are short constants"),
    }
}

/// Reads `len` bytes at `offset` of an open blob.
fn read_range(blob: &OpenBlob, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut reader = blob.lock().unwrap_or_else(|p| p.into_inner());
    reader.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

/// Answers one fetch request of `peer` from the store.
pub(crate) async fn answer(
    shared: &Arc<Shared>,
    peer: libp2p::PeerId,
    request: &FetchRequest,
) -> FetchResponse {
    let hash = request.hash;
    let max = request
        .max_len
        .min(shared.config.net.limits.max_chunk_bytes)
        .min(MAX_FETCH_CHUNK_BYTES) as u64;
    // Still in the store? (A blob pruned since it was opened is no longer served.)
    let store = shared.store.clone();
    let Ok(len) = blocking(move || Ok(store.blob_len(&hash)?)).await else {
        return refused("store error");
    };
    let Some(total_size) = len else {
        shared.serve_cache.remove(&hash.0);
        return FetchResponse::NotFound { hash };
    };
    if request.offset > total_size {
        return refused("offset past the end");
    }
    if !super::parcel::admit(
        shared,
        &peer,
        &hash,
        request.offset,
        u64::from(request.max_len),
    ) {
        return refused(crate::net::fetch::SPREAD);
    }
    let blob = match shared.serve_cache.open(&shared.store, hash.0).await {
        Ok(Some(blob)) => blob,
        Ok(None) => return FetchResponse::NotFound { hash },
        Err(e) => {
            tracing::warn!(%hash, error = %e, "blob could not be served");
            return FetchResponse::NotFound { hash };
        }
    };
    let verified_len = blob.lock().unwrap_or_else(|p| p.into_inner()).len();
    if verified_len != total_size {
        shared.serve_cache.remove(&hash.0);
        return refused("blob changed");
    }
    let offset = request.offset;
    let len = (total_size - offset).min(max) as usize;
    match blocking(move || {
        read_range(&blob, offset, len).map_err(|source| NodeError::File {
            path: format!("<blob {hash}>").into(),
            source,
        })
    })
    .await
    {
        Ok(data) => FetchResponse::Chunk {
            hash,
            offset,
            total_size,
            data: Bytes(data),
        },
        Err(e) => {
            tracing::warn!(%hash, error = %e, "blob range could not be read");
            shared.serve_cache.remove(&hash.0);
            refused("read error")
        }
    }
}

/// The store as the source of bulk streams: the same verified, cached open blobs as chunk requests, and
/// the same check that a blob is still in the store before each range.
pub(crate) struct StoreBlobs(pub(crate) Arc<Shared>);

/// An open blob, as bulk streams read it.
struct OpenRange {
    blob: OpenBlob,
    len: u64,
}

impl RangeRead for OpenRange {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut reader = self.blob.lock().unwrap_or_else(|p| p.into_inner());
        reader.seek(SeekFrom::Start(offset))?;
        reader.read_exact(buf)
    }
}

impl BlobSource for StoreBlobs {
    fn admit(&self, peer: &libp2p::PeerId, hash: &ContentHash, offset: u64, len: u64) -> bool {
        super::parcel::admit(&self.0, peer, hash, offset, len)
    }

    async fn open(&self, hash: ContentHash) -> std::io::Result<Option<Arc<dyn RangeRead>>> {
        let shared = &self.0;
        let store = shared.store.clone();
        let len = blocking(move || Ok(store.blob_len(&hash)?))
            .await
            .map_err(std::io::Error::other)?;
        let Some(len) = len else {
            shared.serve_cache.remove(&hash.0);
            return Ok(None);
        };
        let Some(blob) = shared
            .serve_cache
            .open(&shared.store, hash.0)
            .await
            .map_err(std::io::Error::other)?
        else {
            return Ok(None);
        };
        if blob.lock().unwrap_or_else(|p| p.into_inner()).len() != len {
            shared.serve_cache.remove(&hash.0);
            return Err(std::io::Error::other("blob changed since it was opened"));
        }
        Ok(Some(Arc::new(OpenRange { blob, len })))
    }
}

/// The bulk stream limits of a node's network settings.
pub(crate) fn stream_limits(net: &crate::net::NetConfig) -> ServeLimits {
    ServeLimits {
        max_streams: net.limits.max_blob_streams,
        max_streams_per_peer: net.limits.max_blob_streams_per_peer,
        stall_timeout: net.request_timeout,
        lane: net.blob_lane_addr(),
    }
}

/// Chunk requests being answered, in total and per peer. Each holds up to one chunk (4 MiB by default) until
/// its response is sent, so these caps bound the memory that requests can pin: a request beyond them is
/// answered `Refused: busy` at once and the fetcher tries again or elsewhere.
pub struct ServePermits {
    max_total: usize,
    max_per_peer: usize,
    inner: Mutex<(usize, HashMap<libp2p::PeerId, usize>)>,
}

/// One request being answered; dropping it (response sent, or the task gone) frees its slot.
pub struct ServePermit {
    permits: Arc<ServePermits>,
    peer: libp2p::PeerId,
}

impl ServePermits {
    /// Caps of `max_total` requests at once, `max_per_peer` of them for one peer.
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<ServePermits> {
        Arc::new(ServePermits {
            max_total,
            max_per_peer,
            inner: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for one request of `peer`, or `None` when either cap is reached.
    pub fn try_acquire(self: &Arc<Self>, peer: libp2p::PeerId) -> Option<ServePermit> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *inner;
        let mine = per_peer.entry(peer).or_insert(0);
        if *total >= self.max_total || *mine >= self.max_per_peer {
            if *mine == 0 {
                per_peer.remove(&peer);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(ServePermit {
            permits: self.clone(),
            peer,
        })
    }

    /// Requests being answered now, and peers they come from.
    pub fn in_use(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.0, inner.1.len())
    }
}

impl Drop for ServePermit {
    fn drop(&mut self) {
        let mut inner = self.permits.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *inner;
        *total = total.saturating_sub(1);
        if let Some(mine) = per_peer.get_mut(&self.peer) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn serve_permits_cap_requests_per_peer_and_in_total() {
        let permits = ServePermits::new(5, 2);
        let (a, b, c) = (
            libp2p::PeerId::random(),
            libp2p::PeerId::random(),
            libp2p::PeerId::random(),
        );
        let a1 = permits.try_acquire(a).expect("a 1");
        let _a2 = permits.try_acquire(a).expect("a 2");
        assert!(permits.try_acquire(a).is_none(), "a third for one peer");
        let _b1 = permits.try_acquire(b).expect("b 1");
        let _b2 = permits.try_acquire(b).expect("b 2");
        let _c1 = permits.try_acquire(c).expect("c 1");
        assert!(permits.try_acquire(c).is_none(), "a sixth in total");
        assert_eq!(permits.in_use(), (5, 3));
        drop(a1);
        let _c2 = permits.try_acquire(c).expect("a freed slot is taken");
        assert!(permits.try_acquire(libp2p::PeerId::random()).is_none());
        assert_eq!(permits.in_use(), (5, 3), "a refused peer leaves no entry");
    }

    #[tokio::test]
    async fn opens_once_serves_ranges_and_evicts_least_recent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("store");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let a = store.put_blob(&bytes).expect("put").hash();
        let b = store.put_blob(b"other").expect("put").hash();
        let cache = BlobCache::new(1);
        let blob = cache
            .open(&store, a.0)
            .await
            .expect("open")
            .expect("present");
        assert_eq!(
            read_range(&blob, 9_000, 1_000).expect("tail"),
            bytes[9_000..]
        );
        assert_eq!(read_range(&blob, 17, 100).expect("middle"), bytes[17..117]);
        let again = cache
            .open(&store, a.0)
            .await
            .expect("open")
            .expect("present");
        assert!(
            Arc::ptr_eq(&blob, &again),
            "the second request reuses the verified reader"
        );
        assert_eq!(cache.len(), 1);
        cache
            .open(&store, b.0)
            .await
            .expect("open")
            .expect("present");
        assert_eq!(cache.len(), 1, "cap of one: the older blob was closed");
        assert!(
            cache
                .open(&store, [9; 32])
                .await
                .expect("no error")
                .is_none(),
            "absent blob"
        );
        assert!(
            !cache.lock().blobs.contains_key(&[9; 32]),
            "a failed open leaves nothing behind"
        );
    }
}
