//! Kept evidence: signed messages that prove someone misbehaved (two different commits of one round signed by
//! the coordinator), kept so an operator can show them to others. Each piece is a few blobs (the signed
//! envelopes, content-addressed like any other blob) named by one small record in the `evidence` tree, which
//! keeps them alive (see the reference rule in the [store docs](super)). Pieces are never pruned with rounds;
//! at most [`MAX_EVIDENCE`] are kept, the newest keys (by byte order) winning, so a flood cannot fill the disk.

use std::collections::HashSet;

use super::Store;
use super::blobs::ContentHash;
use super::error::{StoreError, StoreResult};
use super::index::{MAX_RECORD_KEY_BYTES, decode, encode, too_large};

/// Most pieces of evidence kept; beyond it the one with the smallest key goes.
pub const MAX_EVIDENCE: usize = 32;
/// Most blobs in one piece of evidence.
pub const MAX_EVIDENCE_BLOBS: usize = 4;

/// The key of a piece of evidence about round `round`: the round, big-endian (so the oldest go first when the
/// store is full), then `parts`, the finding's kind and what it concerns.
pub fn evidence_key(round: u64, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = round.to_be_bytes().to_vec();
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

impl Store {
    /// Keeps `items` (each stored as a blob) as the piece of evidence `key`, durably. A key already kept keeps
    /// its first evidence (the first proof stands; later ones add nothing). Returns the blobs of the kept piece.
    /// Keys are chosen by the caller; start them with a big-endian round so the oldest go first.
    pub fn keep_evidence(&self, key: &[u8], items: &[&[u8]]) -> StoreResult<Vec<ContentHash>> {
        too_large("evidence key", key.len(), MAX_RECORD_KEY_BYTES)?;
        too_large("evidence blobs", items.len(), MAX_EVIDENCE_BLOBS)?;
        if let Some(kept) = self.evidence_piece(key)? {
            return Ok(kept);
        }
        // Written (and pinned) before the record that refers to them, like a round's blobs.
        let pins = items
            .iter()
            .map(|bytes| self.put_blob(bytes))
            .collect::<StoreResult<Vec<_>>>()?;
        let hashes: Vec<ContentHash> = pins.iter().map(|p| p.hash()).collect();
        let _guard = self.lock_refs();
        let tree = &self.inner.evidence;
        tree.insert(key, encode("evidence", &hashes)?)?;
        while tree.len() > MAX_EVIDENCE {
            match tree.pop_min()? {
                Some((old, _)) => {
                    tracing::warn!(key = %hex::encode(&old), "evidence store full: the oldest piece dropped")
                }
                None => break,
            }
        }
        self.inner.db.flush()?;
        drop(pins);
        Ok(hashes)
    }

    /// Every kept piece of evidence: its key and its blobs, in key order.
    pub fn evidence(&self) -> StoreResult<Vec<(Vec<u8>, Vec<ContentHash>)>> {
        let mut out = Vec::new();
        for item in self.inner.evidence.iter() {
            let (key, value) = item?;
            out.push((
                key.to_vec(),
                decode::<Vec<ContentHash>>("evidence", &value)?,
            ));
        }
        Ok(out)
    }

    /// The blobs of the piece `key`, if kept.
    pub fn evidence_piece(&self, key: &[u8]) -> StoreResult<Option<Vec<ContentHash>>> {
        match self.inner.evidence.get(key)? {
            Some(value) => Ok(Some(decode("evidence", &value)?)),
            None => Ok(None),
        }
    }

    /// Every blob kept evidence names (they are alive).
    pub(super) fn evidence_blobs(&self) -> StoreResult<HashSet<ContentHash>> {
        let mut out = HashSet::new();
        for value in self.inner.evidence.iter().values() {
            let hashes: Vec<ContentHash> = decode("evidence", &value?)?;
            if hashes.len() > MAX_EVIDENCE_BLOBS {
                return Err(StoreError::InvalidKey(
                    "an evidence record names too many blobs",
                ));
            }
            out.extend(hashes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn evidence_is_kept_through_collection_and_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        let kept = store
            .keep_evidence(
                &0u64.to_be_bytes(),
                &[b"first envelope", b"second envelope"],
            )
            .expect("keep");
        assert_eq!(kept.len(), 2);
        // The first proof stands.
        assert_eq!(
            store
                .keep_evidence(&0u64.to_be_bytes(), &[b"another"])
                .expect("keep"),
            kept
        );
        store.gc().expect("gc");
        assert_eq!(
            store.get_blob(&kept[0]).expect("kept blob"),
            b"first envelope"
        );
        for round in 1..(MAX_EVIDENCE as u64 + 5) {
            store
                .keep_evidence(&round.to_be_bytes(), &[format!("e{round}").as_bytes()])
                .expect("keep");
        }
        let all = store.evidence().expect("list");
        assert_eq!(all.len(), MAX_EVIDENCE);
        assert_eq!(
            all[0].0,
            5u64.to_be_bytes().to_vec(),
            "the oldest pieces went first"
        );
        store.gc().expect("gc");
        assert!(
            !store.has_blob(&kept[0]).expect("has"),
            "a dropped piece's blobs are collected"
        );
        assert!(
            store
                .keep_evidence(b"k", &[b"1", b"2", b"3", b"4", b"5"])
                .is_err(),
            "at most 4 blobs"
        );
    }
}
