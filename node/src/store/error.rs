//! The store's typed errors: what went wrong, and which blob, round or record it concerns.

use std::path::PathBuf;

use super::blobs::ContentHash;

/// Everything a store operation can fail with.
///
/// A corrupt blob is an error, never data: [`StoreError::CorruptBlob`] is returned instead of the bytes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed; `path` says on which file or directory.
    #[error("store I/O error at {path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another open store in this one) holds the store: two writers would corrupt it.
    #[error("the store {dir} is in use by {}; stop it first, or give this process another --data-dir", holder_text(.pid))]
    InUse {
        /// The store's directory.
        dir: PathBuf,
        /// The process that holds it, as it wrote in the lock file (absent if unreadable).
        pid: Option<u32>,
    },
    /// The sled index failed (I/O or its own corruption check at open).
    #[error("store index (sled) error: {0}")]
    Index(#[from] sled::Error),
    /// A sled transaction across several trees failed.
    #[error("store index transaction failed: {0}")]
    Transaction(String),
    /// A blob's contents no longer hash to its name. The file was moved out of the blob directory (so that
    /// `has_blob` is false and it can be fetched again) and its bytes were not returned.
    #[error("blob {hash} is corrupt: its contents hash to {actual}")]
    CorruptBlob {
        /// The name of the blob (the hash its contents should have).
        hash: ContentHash,
        /// What its contents hash to now.
        actual: ContentHash,
    },
    /// A blob was asked for, or referred to by a commit, but no file holds it.
    #[error("blob {0} is not in the store")]
    MissingBlob(ContentHash),
    /// A manifest entry's length disagrees with the blob file it names.
    #[error("blob {hash} is {actual} bytes but the manifest says {expected}")]
    BlobLength {
        /// The blob.
        hash: ContentHash,
        /// The length the manifest gives.
        expected: u64,
        /// The length of the file.
        actual: u64,
    },
    /// A streamed blob did not hash to the hash its sender announced.
    #[error("streamed blob hashes to {actual}, expected {expected}")]
    HashMismatch {
        /// The hash the caller expected.
        expected: ContentHash,
        /// The hash of the bytes written.
        actual: ContentHash,
    },
    /// A value or key is larger than the store accepts.
    #[error("{what} is {len} bytes (or items), the limit is {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A key does not have the shape its record kind needs.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// Rounds are committed in increasing order; this one is not newer than the current one.
    #[error("round {round} is not newer than the current round {current}")]
    StaleRound {
        /// The round being committed.
        round: u64,
        /// The newest committed round.
        current: u64,
    },
    /// The store's quota ([`super::StoreConfig::max_blob_bytes`]) leaves no room for this blob. Old rounds
    /// are collected as new ones commit, and unpinned blobs at each collection, so room comes back by itself.
    #[error(
        "the store is full: {used} of its {quota} bytes in use, {needed} more needed; room comes back as old \
         rounds are collected, or raise --store-quota"
    )]
    Full {
        /// Bytes the write needed.
        needed: u64,
        /// Bytes of blobs stored and being written.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// A stored record could not be decoded (the index holds bytes this version does not understand).
    #[error("stored {what} could not be decoded: {detail}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// A value could not be encoded.
    #[error("{what} could not be encoded: {detail}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's message.
        detail: String,
    },
    /// The configuration passed to `Store::open` is unusable.
    #[error("invalid store configuration: {0}")]
    Config(&'static str),
}

/// The store's result type.
pub type StoreResult<T> = Result<T, StoreError>;

/// Wraps an I/O error with the path it happened on.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, source }
}

fn holder_text(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "another process".to_owned(),
    }
}

impl StoreError {
    /// True when the store cannot take more bytes: its quota is reached, or the disk itself is full.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Full { .. } => true,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}
