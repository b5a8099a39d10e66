//! Garbage collection: removing blob files that nothing refers to (see the reference rule in the
//! [store docs](super)): blobs of pruned rounds, blobs written by a crashed or abandoned round, and stray
//! files under `blobs/`.

use serde::Serialize;

use super::Store;
use super::blobs::BlobEntry;
use super::error::{StoreResult, io_err};

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Blobs kept because a retained round or a reference needs them.
    pub blobs_referenced: usize,
    /// Unreferenced blobs kept because they are pinned (a round being assembled).
    pub blobs_pinned: usize,
    /// Blobs removed.
    pub blobs_removed: usize,
    /// Bytes those blobs held.
    pub bytes_removed: u64,
    /// Files under `blobs/` that were not blobs at all, removed.
    pub stray_files_removed: usize,
}

impl Store {
    /// Removes every blob that no retained round, no blob reference and no pin refers to. Runs after each
    /// commit (by default) and at open; safe to call at any time, from any thread.
    pub fn gc(&self) -> StoreResult<GcReport> {
        let _guard = self.lock_refs();
        self.gc_locked()
    }

    /// The collection proper; the caller holds the references lock, so no commit or reference change runs
    /// meanwhile.
    pub(super) fn gc_locked(&self) -> StoreResult<GcReport> {
        // Only what is durable in the index may protect a blob: flush first, so that a removal we saw in
        // memory cannot come back after a crash and refer to a file we deleted.
        self.inner.db.flush()?;
        let live = self.referenced()?;
        let mut report = GcReport::default();
        for entry in self.inner.blobs.list()? {
            match entry {
                BlobEntry::Blob { hash, .. } if live.contains(&hash) => {
                    report.blobs_referenced += 1
                }
                BlobEntry::Blob { hash, len } => {
                    if self.inner.blobs.remove_unless_pinned(&hash)? {
                        report.blobs_removed += 1;
                        report.bytes_removed += len;
                    } else {
                        report.blobs_pinned += 1;
                    }
                }
                BlobEntry::Stray(path) => {
                    tracing::warn!(path = %path.display(), "removing a stray file from the blob directory");
                    let result = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    result.map_err(io_err(&path))?;
                    report.stray_files_removed += 1;
                }
            }
        }
        if report.blobs_removed > 0 {
            tracing::debug!(
                removed = report.blobs_removed,
                bytes = report.bytes_removed,
                "collected blobs"
            );
        }
        Ok(report)
    }

    /// How many blobs are pinned in this process now.
    pub fn pinned_blobs(&self) -> usize {
        self.inner.blobs.pins().len()
    }
}
