//! Serving fetch requests from the store. A blob is read once through the store's hash-verified read and
//! then served chunk by chunk from a bounded in-memory cache, so a 50 MB shard fetched in 1 MiB chunks costs
//! one disk read, not fifty.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};

use mana_protocol::limits::MAX_FETCH_CHUNK_BYTES;
use mana_protocol::{Bytes, FetchRequest, FetchResponse, Text};

use super::{Shared, blob_hash, blocking};

/// Recently served blobs, evicted oldest first beyond `cap` bytes.
pub struct BlobCache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    blobs: HashMap<[u8; 32], Arc<Vec<u8>>>,
    order: VecDeque<[u8; 32]>,
    bytes: usize,
}

impl BlobCache {
    /// A cache of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { cap, inner: Mutex::new(CacheInner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, hash: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.lock().blobs.get(hash).cloned()
    }

    fn insert(&self, hash: [u8; 32], blob: Arc<Vec<u8>>) {
        if blob.len() > self.cap {
            return;
        }
        let mut inner = self.lock();
        if inner.blobs.contains_key(&hash) {
            return;
        }
        while inner.bytes + blob.len() > self.cap {
            let Some(old) = inner.order.pop_front() else { break };
            if let Some(b) = inner.blobs.remove(&old) {
                inner.bytes -= b.len();
            }
        }
        inner.bytes += blob.len();
        inner.order.push_back(hash);
        inner.blobs.insert(hash, blob);
    }
}

fn refused(reason: &str) -> FetchResponse {
    FetchResponse::Refused { reason: Text::new(reason).expect("reasons are short constants") }
}

/// Answers one fetch request from the store.
pub(crate) async fn answer(shared: &Arc<Shared>, request: &FetchRequest) -> FetchResponse {
    let hash = request.hash;
    let max = request.max_len.min(shared.config.net.limits.max_chunk_bytes).min(MAX_FETCH_CHUNK_BYTES) as u64;
    let store = shared.store.clone();
    let Ok(len) = blocking(move || Ok(store.blob_len(&blob_hash(&hash))?)).await else {
        return refused("store error");
    };
    let Some(total_size) = len else { return FetchResponse::NotFound { hash } };
    if request.offset > total_size {
        return refused("offset past the end");
    }
    let end = (request.offset + max).min(total_size);
    let (start, end) = (request.offset as usize, end as usize);
    if let Some(blob) = shared.serve_cache.get(&hash.0) {
        return FetchResponse::Chunk { hash, offset: request.offset, total_size, data: Bytes(blob[start..end].to_vec()) };
    }
    let store = shared.store.clone();
    let small_enough = total_size as usize <= shared.serve_cache.cap;
    let loaded = blocking(move || {
        if small_enough {
            // Verified whole read, then cached.
            Ok(Ok(Arc::new(store.get_blob(&blob_hash(&hash))?)))
        } else {
            // Too big to cache: stream to the range (the reader verifies the hash only at the end).
            let mut reader = store.open_blob(&blob_hash(&hash))?;
            std::io::copy(&mut (&mut reader).take(start as u64), &mut std::io::sink())
                .map_err(|e| super::NodeError::Task(e.to_string()))?;
            let mut buf = vec![0u8; end - start];
            reader.read_exact(&mut buf).map_err(|e| super::NodeError::Task(e.to_string()))?;
            Ok(Err(buf))
        }
    })
    .await;
    match loaded {
        Ok(Ok(blob)) => {
            if blob.len() as u64 != total_size {
                return refused("blob changed");
            }
            let data = Bytes(blob[start..end].to_vec());
            shared.serve_cache.insert(hash.0, blob);
            FetchResponse::Chunk { hash, offset: request.offset, total_size, data }
        }
        Ok(Err(range)) => FetchResponse::Chunk { hash, offset: request.offset, total_size, data: Bytes(range) },
        Err(e) => {
            tracing::warn!(%hash, error = %e, "blob could not be served");
            FetchResponse::NotFound { hash }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_oldest_beyond_cap() {
        let cache = BlobCache::new(10);
        cache.insert([1; 32], Arc::new(vec![0; 6]));
        cache.insert([2; 32], Arc::new(vec![0; 6]));
        assert!(cache.get(&[1; 32]).is_none());
        assert!(cache.get(&[2; 32]).is_some());
        cache.insert([3; 32], Arc::new(vec![0; 11]));
        assert!(cache.get(&[3; 32]).is_none(), "bigger than the cache: not kept");
    }
}
