//! Full verification of a store (`mana node --verify-store`): every blob file re-hashed against its name,
//! every manifest decoded and every blob it or a reference names present and correct.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use super::Store;
use super::blobs::{BlobEntry, ContentHash};
use super::error::{StoreError, StoreResult};
use super::index::{RoundManifest, decode, key_round, ref_key_hash};

/// A blob file whose contents do not hash to its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CorruptBlob {
    /// The file's name.
    pub hash: ContentHash,
    /// What its contents hash to.
    pub actual: ContentHash,
}

/// A blob that a round (or a reference) needs but that is not stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MissingBlob {
    /// The round that needs it.
    pub round: u64,
    /// The shard name from the manifest; empty for a blob reference.
    pub shard: String,
    /// The blob.
    pub hash: ContentHash,
}

/// The outcome of [`Store::verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Retained rounds whose manifests were checked.
    pub rounds_checked: usize,
    /// Blob files re-hashed.
    pub blobs_checked: usize,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Blob files whose contents do not match their names.
    pub corrupt_blobs: Vec<CorruptBlob>,
    /// Blobs that rounds or references need but that are absent (or corrupt, so unusable).
    pub missing_blobs: Vec<MissingBlob>,
    /// Rounds whose manifest could not be decoded.
    pub unreadable_manifests: Vec<u64>,
    /// Index keys of the wrong shape.
    pub bad_index_keys: usize,
    /// Blob files nothing refers to (pinned ones included; the collector removes the others).
    pub unreferenced_blobs: usize,
    /// Files under `blobs/` that are not blobs.
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    /// Whether the store is sound: no corrupt or missing blob, every manifest and key readable.
    /// Unreferenced and stray files are only waste, not damage.
    pub fn is_ok(&self) -> bool {
        self.corrupt_blobs.is_empty()
            && self.missing_blobs.is_empty()
            && self.unreadable_manifests.is_empty()
            && self.bad_index_keys == 0
    }
}

impl Store {
    /// Checks every hash in the store, reading every blob file once. It changes nothing (corrupt files are
    /// reported, not moved), and holds the references lock throughout so no commit or collection runs
    /// meanwhile. Errors are for failures to carry out the check (I/O), not for what it finds.
    pub fn verify(&self) -> StoreResult<VerifyReport> {
        let _guard = self.lock_refs();
        let mut report = VerifyReport::default();
        // hash -> whether the file is sound
        let mut sound: HashMap<ContentHash, bool> = HashMap::new();
        for entry in self.inner.blobs.list()? {
            match entry {
                BlobEntry::Blob { hash, .. } => {
                    let Some((actual, len)) = self.inner.blobs.hash_file(&hash)? else {
                        continue; // removed since listed; cannot happen under the lock, harmless if it does
                    };
                    report.blobs_checked += 1;
                    report.bytes_checked += len;
                    if actual != hash {
                        tracing::error!(blob = %hash, %actual, "verify: corrupt blob");
                        report.corrupt_blobs.push(CorruptBlob { hash, actual });
                    }
                    sound.insert(hash, actual == hash);
                }
                BlobEntry::Stray(path) => report.stray_files.push(path),
            }
        }
        let mut referenced = std::collections::HashSet::new();
        for item in self.inner.rounds.iter() {
            let (key, value) = item?;
            let Some(round) = key_round(&key).filter(|_| key.len() == 8) else {
                report.bad_index_keys += 1;
                continue;
            };
            report.rounds_checked += 1;
            let manifest: RoundManifest = match decode("round manifest", &value) {
                Ok(manifest) => manifest,
                Err(StoreError::Decode { .. }) => {
                    report.unreadable_manifests.push(round);
                    continue;
                }
                Err(err) => return Err(err),
            };
            for entry in manifest.entries {
                referenced.insert(entry.hash);
                if sound.get(&entry.hash) != Some(&true) {
                    report.missing_blobs.push(MissingBlob {
                        round,
                        shard: entry.shard.to_string(),
                        hash: entry.hash,
                    });
                }
            }
        }
        for key in self.inner.refs.iter().keys() {
            let key = key?;
            let (Some(round), Some(hash)) = (
                key_round(&key),
                ref_key_hash(&key).filter(|_| key.len() == 40),
            ) else {
                report.bad_index_keys += 1;
                continue;
            };
            referenced.insert(hash);
            if sound.get(&hash) != Some(&true) {
                report.missing_blobs.push(MissingBlob {
                    round,
                    shard: String::new(),
                    hash,
                });
            }
        }
        report.unreferenced_blobs = sound
            .keys()
            .filter(|hash| !referenced.contains(hash))
            .count();
        Ok(report)
    }
}
