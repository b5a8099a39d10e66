//! The store's behaviour one call at a time: blobs (atomic, verified, deduplicated, streamed), rounds
//! (atomic commit, keep-last-K pruning), the reference rule the collector follows (manifests, references,
//! pins), records and their limits, the rejection log, verification, and a restart that finds it all intact.

use mana_protocol::ShardId;
use std::fs;
use std::io::{Read, Write};

use mana_node::store::{
    ContentHash, MAX_RECORD_KEY_BYTES, MAX_RECORD_VALUE_BYTES, ManifestEntry, RecordKind,
    RoundManifest, Store, StoreConfig, StoreError, round_key,
};

/// Deterministic filler bytes (splitmix64), so blobs differ by seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = mana_kernels::rng::SplitMix64(
        seed.wrapping_mul(mana_kernels::rng::GOLDEN) ^ 0xD1B5_4A32_D192_ED03,
    );
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn open(dir: &std::path::Path, keep: usize) -> Store {
    Store::open(
        dir,
        StoreConfig {
            keep_rounds: keep,
            ..StoreConfig::default()
        },
    )
    .expect("store opens")
}

/// Writes `n` shards for a round and returns the manifest plus the pins that keep them until the commit.
fn write_round(
    store: &Store,
    round: u64,
    n: usize,
) -> (RoundManifest, Vec<mana_node::store::BlobPin>) {
    let mut manifest = RoundManifest {
        entries: Vec::new(),
        meta: round.to_le_bytes().to_vec(),
    };
    let mut pins = Vec::new();
    for i in 0..n {
        let data = bytes(round * 1000 + i as u64, 1000 + 37 * i);
        let pin = store.put_blob(&data).expect("blob written");
        manifest.entries.push(ManifestEntry {
            shard: ShardId::expert(0u16, i as u16).expect("in bounds"),
            hash: pin.hash(),
            len: pin.len(),
        });
        pins.push(pin);
    }
    (manifest, pins)
}

fn tmp_files(dir: &std::path::Path) -> usize {
    fs::read_dir(dir.join("tmp"))
        .expect("tmp dir exists")
        .count()
}

#[test]
fn blobs_round_trip_dedupe_and_live_in_fanned_out_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    let data = bytes(1, 5000);
    let a = store.put_blob(&data).expect("put");
    let b = store.put_blob(&data).expect("put again");
    assert_eq!(a.hash(), b.hash());
    assert_eq!(a.hash(), ContentHash::of(&data));
    assert_eq!(store.get_blob(&a.hash()).expect("get"), data);
    assert!(store.has_blob(&a.hash()).expect("has"));
    assert_eq!(store.blob_len(&a.hash()).expect("len"), Some(5000));
    let hex = a.hash().to_hex();
    let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    assert_eq!(fs::read(&path).expect("blob file named by its hash"), data);
    assert_eq!(
        store.disk_usage().expect("usage").blob_count,
        1,
        "deduplicated"
    );
    assert_eq!(tmp_files(dir.path()), 0);
    let missing = ContentHash::of(b"never stored");
    assert!(matches!(store.get_blob(&missing), Err(StoreError::MissingBlob(h)) if h == missing));
    assert!(!store.has_blob(&missing).expect("has"));
    let empty = store.put_blob(&[]).expect("empty blob");
    assert_eq!(
        store.get_blob(&empty.hash()).expect("get empty"),
        Vec::<u8>::new()
    );
}

#[test]
fn blob_writer_streams_checks_hash_and_limit_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    let data = bytes(2, 3 << 20);
    let mut writer = store.blob_writer(4 << 20).expect("writer");
    for chunk in data.chunks(64 << 10) {
        writer.write_all(chunk).expect("chunk");
    }
    assert_eq!(writer.written(), data.len() as u64);
    let pin = writer
        .finish_expecting(&ContentHash::of(&data))
        .expect("finish");
    assert_eq!(store.get_blob(&pin.hash()).expect("get"), data);

    // Streaming it back out yields the same bytes.
    let mut reader = store.open_blob(&pin.hash()).expect("reader");
    assert_eq!(reader.len(), data.len() as u64);
    let mut back = Vec::new();
    reader.read_to_end(&mut back).expect("read to end");
    assert_eq!(back, data);

    // Wrong announced hash: nothing stored, no temp file left.
    let mut writer = store.blob_writer(1 << 20).expect("writer");
    writer.write_all(b"some payload").expect("write");
    let wrong = ContentHash::of(b"another payload");
    assert!(matches!(
        writer.finish_expecting(&wrong),
        Err(StoreError::HashMismatch { .. })
    ));
    assert!(
        !store
            .has_blob(&ContentHash::of(b"some payload"))
            .expect("has")
    );
    assert_eq!(tmp_files(dir.path()), 0);

    // Over the limit: the write fails.
    let mut writer = store.blob_writer(10).expect("writer");
    assert!(writer.write_all(&[0u8; 11]).is_err());
    drop(writer);

    // Dropped unfinished: temp file removed, nothing stored.
    let mut writer = store.blob_writer(1 << 20).expect("writer");
    writer.write_all(b"half a shard").expect("write");
    drop(writer);
    assert_eq!(tmp_files(dir.path()), 0);
    assert_eq!(store.disk_usage().expect("usage").blob_count, 1);
}

#[test]
fn corrupt_blob_is_an_error_never_data_and_verify_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    let (manifest, _pins) = write_round(&store, 1, 3);
    store.commit_round(1, &manifest).expect("commit");
    assert!(store.verify().expect("verify").is_ok());

    let victim = manifest.entries[1].hash;
    let hex = victim.to_hex();
    let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    let mut raw = fs::read(&path).expect("read raw");
    raw[17] ^= 0x40;
    fs::write(&path, &raw).expect("flip a bit");

    // Serving opens a blob without hashing it again (it was verified when stored): the ranged reader
    // hands out the bytes as they are on disk, and the fetcher's hash check is what catches a flipped bit.
    let mut served = Vec::new();
    store
        .open_blob_ranged(&victim)
        .expect("opened without a hash pass")
        .read_to_end(&mut served)
        .expect("read");
    assert_eq!(served, raw);
    assert_ne!(ContentHash::of(&served), victim);

    let report = store.verify().expect("verify runs");
    assert!(!report.is_ok());
    assert_eq!(report.corrupt_blobs.len(), 1);
    assert_eq!(report.corrupt_blobs[0].hash, victim);
    assert_eq!(report.missing_blobs.len(), 1);
    assert_eq!(report.missing_blobs[0].round, 1);
    assert_eq!(report.missing_blobs[0].shard, "expert/0/1");

    assert!(matches!(
        store.open_blob(&victim),
        Err(StoreError::CorruptBlob { .. })
    ));
    // open_blob quarantined it; it now reads as missing and can be fetched again.
    assert!(!store.has_blob(&victim).expect("has"));
    assert!(dir.path().join("quarantine").join(&hex).exists());
    assert!(matches!(
        store.get_blob(&victim),
        Err(StoreError::MissingBlob(_))
    ));

    // Re-fetching the good bytes repairs the store.
    let good = bytes(1001, 1037);
    assert_eq!(ContentHash::of(&good), victim);
    let _pin = store.put_blob(&good).expect("repair");
    assert!(store.verify().expect("verify").is_ok());

    // A truncated file is corrupt too (get_blob path).
    let other = manifest.entries[2].hash;
    let hex = other.to_hex();
    let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    let raw = fs::read(&path).expect("read raw");
    fs::write(&path, &raw[..raw.len() / 2]).expect("truncate");
    assert!(
        matches!(store.get_blob(&other), Err(StoreError::CorruptBlob { hash, .. }) if hash == other)
    );
}

#[test]
fn commit_is_checked_and_rounds_only_go_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    assert_eq!(store.current_round().expect("current"), None);
    assert!(store.latest().expect("latest").is_none());

    let (mut manifest, _pins) = write_round(&store, 7, 2);
    let ghost = ContentHash::of(b"not written");
    manifest.entries.push(ManifestEntry {
        shard: ShardId::Trunk,
        hash: ghost,
        len: 11,
    });
    assert!(
        matches!(store.commit_round(7, &manifest), Err(StoreError::MissingBlob(h)) if h == ghost)
    );
    assert_eq!(
        store.current_round().expect("current"),
        None,
        "a failed commit shows nothing"
    );

    manifest.entries.pop();
    manifest.entries[0].len += 1;
    assert!(matches!(
        store.commit_round(7, &manifest),
        Err(StoreError::BlobLength { .. })
    ));
    manifest.entries[0].len -= 1;

    store.commit_round(7, &manifest).expect("commit");
    assert_eq!(store.current_round().expect("current"), Some(7));
    assert_eq!(store.manifest(7).expect("manifest"), Some(manifest.clone()));
    assert_eq!(store.latest().expect("latest"), Some((7, manifest.clone())));
    assert!(matches!(
        store.commit_round(7, &manifest),
        Err(StoreError::StaleRound {
            round: 7,
            current: 7
        })
    ));
    assert!(matches!(
        store.commit_round(3, &manifest),
        Err(StoreError::StaleRound { .. })
    ));

    // A shard's name is a typed ShardId now: an over-long name cannot even be built (the bound moved from the
    // store into the type).
    assert!("x".repeat(300).parse::<ShardId>().is_err());
}

#[test]
fn pruning_keeps_last_k_and_collects_what_nothing_refers_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    let shared = store.put_blob(&bytes(99, 4096)).expect("shared shard");
    let mut round_blobs = Vec::new();
    for round in 1..=5u64 {
        let (mut manifest, pins) = write_round(&store, round, 2);
        // The trunk is unchanged across rounds: every manifest lists the same blob.
        manifest.entries.push(ManifestEntry {
            shard: ShardId::Trunk,
            hash: shared.hash(),
            len: shared.len(),
        });
        let report = store.commit_round(round, &manifest).expect("commit");
        drop(pins);
        if round > 3 {
            assert_eq!(report.pruned_rounds, vec![round - 3]);
        }
        round_blobs.push(manifest.entries.iter().map(|e| e.hash).collect::<Vec<_>>());
    }
    drop(shared);
    store.gc().expect("gc");
    assert_eq!(store.rounds().expect("rounds"), vec![3, 4, 5]);
    assert!(store.manifest(2).expect("manifest").is_none());
    for (i, hashes) in round_blobs.iter().enumerate() {
        let round = i as u64 + 1;
        for (j, hash) in hashes.iter().enumerate() {
            let is_trunk = j == 2;
            assert_eq!(
                store.has_blob(hash).expect("has"),
                round >= 3 || is_trunk,
                "round {round} blob {j}"
            );
        }
    }
    // Only live data remains.
    let usage = store.disk_usage().expect("usage");
    assert_eq!(usage.blob_bytes, store.live_bytes().expect("live"));
    assert_eq!(usage.blob_count, 3 * 2 + 1);
    assert!(store.verify().expect("verify").is_ok());
}

#[test]
fn pinned_and_referenced_blobs_survive_collection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 2);
    let (manifest, pins) = write_round(&store, 1, 1);
    store.commit_round(1, &manifest).expect("commit");
    drop(pins);

    // A shard written for round 2, still being assembled: pinned, so kept.
    let assembling = store.put_blob(&bytes(5, 777)).expect("put");
    // A delta payload for round 2, referenced from its announcement.
    let payload = store.put_blob(&bytes(6, 888)).expect("payload");
    let announcement = round_key(2, b"peer-a");
    store
        .put_record_with_blobs(
            RecordKind::DeltaAnnouncement,
            &announcement,
            b"announcement",
            2,
            &[payload.hash()],
        )
        .expect("announce");
    let payload_hash = payload.hash();
    drop(payload);
    // An orphan: written, never referenced, pin dropped.
    let orphan = store.put_blob(&bytes(7, 999)).expect("orphan").hash();

    let report = store.gc().expect("gc");
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.blobs_pinned, 1);
    assert!(!store.has_blob(&orphan).expect("has"));
    assert!(store.has_blob(&assembling.hash()).expect("has"));
    assert!(store.has_blob(&payload_hash).expect("has"));
    assert_eq!(store.blob_refs(2).expect("refs"), vec![payload_hash]);
    assert_eq!(
        store
            .records_in_round(RecordKind::DeltaAnnouncement, 2)
            .expect("records")
            .len(),
        1
    );

    // Dropping the pin without committing: collected next time.
    let assembling_hash = assembling.hash();
    drop(assembling);
    store.gc().expect("gc");
    assert!(!store.has_blob(&assembling_hash).expect("has"));

    // Round 2 commits and, with rounds 3 and 4, pushes round 2 out (keep 2): its references and its
    // round-scoped records go with it, then the payload is collected.
    for round in 2..=4u64 {
        let (manifest, _pins) = write_round(&store, round, 1);
        store.commit_round(round, &manifest).expect("commit");
        if round < 4 {
            assert!(store.has_blob(&payload_hash).expect("has"), "round {round}");
        }
    }
    assert!(store.blob_refs(2).expect("refs").is_empty());
    assert!(
        store
            .records_in_round(RecordKind::DeltaAnnouncement, 2)
            .expect("records")
            .is_empty()
    );
    assert!(!store.has_blob(&payload_hash).expect("has"));

    // References can be added and removed on their own; missing blobs cannot be referenced.
    let extra = store.put_blob(b"extra").expect("put");
    store.add_blob_refs(9, &[extra.hash()]).expect("add refs");
    drop(extra);
    store.gc().expect("gc");
    assert!(store.has_blob(&ContentHash::of(b"extra")).expect("has"));
    store
        .remove_blob_refs(9, &[ContentHash::of(b"extra")])
        .expect("remove refs");
    store.gc().expect("gc");
    assert!(!store.has_blob(&ContentHash::of(b"extra")).expect("has"));
    assert!(matches!(
        store.add_blob_refs(9, &[ContentHash::of(b"absent")]),
        Err(StoreError::MissingBlob(_))
    ));

    // An already stored blob can be pinned again, to outlive the pruning of the rounds listing it.
    let (manifest, _pins) = write_round(&store, 5, 1);
    store.commit_round(5, &manifest).expect("commit");
    let kept = store
        .pin_blob(&manifest.entries[0].hash)
        .expect("pin")
        .expect("stored");
    for round in 6..=8u64 {
        let (manifest, _pins) = write_round(&store, round, 1);
        store.commit_round(round, &manifest).expect("commit");
    }
    assert!(store.has_blob(&kept.hash()).expect("has"));
    assert!(
        store
            .pin_blob(&ContentHash::of(b"absent"))
            .expect("pin")
            .is_none()
    );
}

#[test]
fn records_have_limits_and_typed_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    store
        .put_record(RecordKind::Peer, b"peer-1", b"/ip4/127.0.0.1/tcp/1")
        .expect("put");
    store
        .put_record(RecordKind::Peer, b"peer-2", b"/ip4/127.0.0.1/tcp/2")
        .expect("put");
    assert_eq!(
        store
            .get_record(RecordKind::Peer, b"peer-1")
            .expect("get")
            .as_deref(),
        Some(&b"/ip4/127.0.0.1/tcp/1"[..])
    );
    assert_eq!(store.records(RecordKind::Peer).expect("list").len(), 2);
    assert!(
        store
            .get_record(RecordKind::RoundState, b"peer-1")
            .expect("kinds are separate")
            .is_none()
    );
    assert!(
        store
            .remove_record(RecordKind::Peer, b"peer-2")
            .expect("remove")
    );
    assert!(
        !store
            .remove_record(RecordKind::Peer, b"peer-2")
            .expect("remove again")
    );

    let big = vec![0u8; MAX_RECORD_VALUE_BYTES + 1];
    assert!(matches!(
        store.put_record(RecordKind::Peer, b"k", &big),
        Err(StoreError::TooLarge { .. })
    ));
    let long_key = vec![1u8; MAX_RECORD_KEY_BYTES + 1];
    assert!(matches!(
        store.put_record(RecordKind::Peer, &long_key, b"v"),
        Err(StoreError::TooLarge { .. })
    ));
    assert!(matches!(
        store.put_record(RecordKind::DeltaAnnouncement, b"short", b"v"),
        Err(StoreError::InvalidKey(_))
    ));

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct RoundState {
        round: u64,
        phase: String,
        members: Vec<String>,
    }
    let state = RoundState {
        round: 12,
        phase: "train".into(),
        members: vec!["a".into(), "b".into()],
    };
    store
        .put_typed(RecordKind::RoundState, b"coordinator", &state)
        .expect("put typed");
    assert_eq!(
        store
            .get_typed::<RoundState>(RecordKind::RoundState, b"coordinator")
            .expect("get"),
        Some(state)
    );
    // Garbage under a typed key is a decode error, not a panic.
    store
        .put_record(
            RecordKind::RoundState,
            b"garbage",
            &[1, 0xff, 0xff, 0xff, 0xff, 0xff],
        )
        .expect("put");
    assert!(matches!(
        store.get_typed::<RoundState>(RecordKind::RoundState, b"garbage"),
        Err(StoreError::Decode { .. })
    ));
}

#[test]
fn rejection_log_counts_per_peer_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    for _ in 0..3 {
        store
            .record_rejection("peer-a", "bad_signature", "sig over wrong bytes")
            .expect("record");
    }
    store
        .record_rejection("peer-a", "too_large", "5 MB")
        .expect("record");
    store
        .record_rejection("peer-b", "bad_signature", "x")
        .expect("record");
    let hostile_peer = format!("evil\0{}", "p".repeat(1000));
    store
        .record_rejection(&hostile_peer, "stale_round", &"d".repeat(10_000))
        .expect("long inputs are truncated");

    let summary = store.rejection_summary().expect("summary");
    assert_eq!(summary.total, 6);
    assert_eq!(summary.by_reason["bad_signature"], 4);
    assert_eq!(summary.by_reason["too_large"], 1);
    assert_eq!(summary.by_reason["stale_round"], 1);
    let a = &summary.by_peer[0];
    assert_eq!(a.peer, "peer-a");
    assert_eq!(a.total, 4);
    assert_eq!(a.reasons[0].reason, "bad_signature");
    assert_eq!(a.reasons[0].entry.count, 3);
    assert_eq!(a.reasons[0].entry.last_detail, "sig over wrong bytes");
    let evil = summary
        .by_peer
        .iter()
        .find(|p| p.peer.starts_with("evil"))
        .expect("truncated peer listed");
    assert!(evil.peer.len() <= mana_node::store::MAX_REJECTION_PEER_BYTES);
    assert!(
        evil.reasons[0].entry.last_detail.len() <= mana_node::store::MAX_REJECTION_DETAIL_BYTES
    );
    // The summary is what `mana status` prints as JSON.
    let json = serde_json::to_string(&summary).expect("summary serialises");
    assert!(json.contains("bad_signature"));
}

/// A record larger than one sled record (the coordinator's state with thousands of members) is stored in
/// parts and read back whole; a shorter value replaces it and its extra parts go; a plain record under the
/// key (an older store's) reads as it is; the bound holds.
#[test]
fn split_records_hold_values_past_one_record() {
    use mana_node::store::{MAX_RECORD_VALUE_BYTES, MAX_SPLIT_RECORD_BYTES};
    let dir = tempfile::tempdir().expect("tempdir");
    let key = b"coordinator/state";
    {
        let store = open(dir.path(), 3);
        assert_eq!(
            store
                .get_split_record(RecordKind::RoundState, key)
                .expect("read"),
            None
        );
        store
            .put_record(RecordKind::RoundState, key, b"an older store's plain state")
            .expect("plain");
        assert_eq!(
            store
                .get_split_record(RecordKind::RoundState, key)
                .expect("read"),
            Some(b"an older store's plain state".to_vec())
        );
        let big = bytes(7, 5 * MAX_RECORD_VALUE_BYTES + 123);
        assert!(
            store.put_record(RecordKind::RoundState, key, &big).is_err(),
            "one record cannot hold it"
        );
        store
            .put_split_record(RecordKind::RoundState, key, &big)
            .expect("split");
        assert_eq!(
            store
                .get_split_record(RecordKind::RoundState, key)
                .expect("read"),
            Some(big)
        );
    }
    // After a restart, a shorter value replaces it: parts 2..5 are gone.
    let store = open(dir.path(), 3);
    let small = bytes(8, MAX_RECORD_VALUE_BYTES + 1);
    store
        .put_split_record(RecordKind::RoundState, key, &small)
        .expect("split");
    assert_eq!(
        store
            .get_split_record(RecordKind::RoundState, key)
            .expect("read"),
        Some(small)
    );
    assert_eq!(
        store.records(RecordKind::RoundState).expect("list").len(),
        3,
        "the header and two parts, nothing left of the longer value"
    );
    let empty: &[u8] = &[];
    store
        .put_split_record(RecordKind::RoundState, key, empty)
        .expect("empty");
    assert_eq!(
        store
            .get_split_record(RecordKind::RoundState, key)
            .expect("read"),
        Some(Vec::new())
    );
    let too_big = vec![0u8; MAX_SPLIT_RECORD_BYTES + 1];
    assert!(matches!(
        store.put_split_record(RecordKind::RoundState, key, &too_big),
        Err(StoreError::TooLarge { .. })
    ));
}

/// The summary lists the peers with most rejections and only counts the rest, so `status.json` stays small
/// however many peers were refused (the log itself holds up to `MAX_REJECTION_KEYS` pairs, tens of MB).
#[test]
fn rejection_summary_lists_at_most_its_cap_of_peers() {
    use mana_node::store::MAX_SUMMARY_PEERS;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 3);
    let peers = 3 * MAX_SUMMARY_PEERS;
    let detail = "d".repeat(mana_node::store::MAX_REJECTION_DETAIL_BYTES);
    for i in 0..peers {
        // Peer i is refused i + 1 times, so the listed ones are the last MAX_SUMMARY_PEERS.
        for _ in 0..=i {
            store
                .record_rejection(&format!("peer-{i:04}"), "bad-signature", &detail)
                .expect("record");
        }
    }
    let summary = store.rejection_summary().expect("summary");
    let every = (peers * (peers + 1) / 2) as u64;
    assert_eq!(summary.total, every);
    assert_eq!(summary.by_reason["bad-signature"], every);
    assert_eq!(summary.by_peer.len(), MAX_SUMMARY_PEERS);
    assert_eq!(summary.other_peers, (peers - MAX_SUMMARY_PEERS) as u64);
    assert_eq!(summary.by_peer[0].peer, format!("peer-{:04}", peers - 1));
    assert_eq!(summary.by_peer[0].total, peers as u64);
    assert_eq!(
        summary.by_peer[MAX_SUMMARY_PEERS - 1].total,
        (peers - MAX_SUMMARY_PEERS + 1) as u64
    );
    // A listed peer costs at most its name and a detail per reason.
    let json = serde_json::to_string(&summary).expect("summary serialises");
    assert!(json.len() < MAX_SUMMARY_PEERS * 512, "{} bytes", json.len());
}

#[test]
fn restart_finds_the_store_intact_and_cleans_crash_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (manifest, stored) = {
        let store = open(dir.path(), 3);
        let mut last = None;
        for round in 1..=4u64 {
            let (manifest, _pins) = write_round(&store, round, 3);
            store.commit_round(round, &manifest).expect("commit");
            last = Some(manifest);
        }
        store
            .put_record(RecordKind::Peer, b"peer-1", b"addr")
            .expect("record");
        store
            .record_rejection("peer-1", "bad_signature", "d")
            .expect("rejection");
        store.flush().expect("flush");
        let manifest = last.expect("four rounds committed");
        let stored: Vec<Vec<u8>> = manifest
            .entries
            .iter()
            .map(|e| store.get_blob(&e.hash).expect("blob"))
            .collect();
        (manifest, stored)
    };
    // What a crash can leave: a half-written temp file, a blob renamed into place but never committed, and
    // something that is not a blob at all.
    fs::write(dir.path().join("tmp").join("1234-0.tmp"), b"half").expect("temp leftover");
    let orphan = bytes(4242, 100);
    let orphan_hash = ContentHash::of(&orphan);
    let hex = orphan_hash.to_hex();
    fs::write(dir.path().join("blobs").join(&hex[..2]).join(&hex), &orphan).expect("orphan blob");
    fs::write(
        dir.path().join("blobs").join("00").join("not-a-blob"),
        b"junk",
    )
    .expect("stray");

    let store = open(dir.path(), 3);
    let report = store.open_report();
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.gc.blobs_removed, 1);
    assert_eq!(report.gc.stray_files_removed, 1);
    assert_eq!(report.current_round, Some(4));
    assert!(!store.has_blob(&orphan_hash).expect("has"));
    assert_eq!(store.rounds().expect("rounds"), vec![2, 3, 4]);
    assert_eq!(store.manifest(4).expect("manifest"), Some(manifest.clone()));
    for (entry, data) in manifest.entries.iter().zip(&stored) {
        assert_eq!(&store.get_blob(&entry.hash).expect("blob"), data);
    }
    assert_eq!(
        store
            .get_record(RecordKind::Peer, b"peer-1")
            .expect("record")
            .as_deref(),
        Some(&b"addr"[..])
    );
    assert_eq!(store.rejection_summary().expect("summary").total, 1);
    let verify = store.verify().expect("verify");
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.rounds_checked, 3);
    assert_eq!(verify.blobs_checked, 9);
    assert_eq!(verify.unreferenced_blobs, 0);

    // A second open of the same data directory is refused, not shared.
    assert!(Store::open(dir.path(), StoreConfig::default()).is_err());
}

#[test]
fn zero_keep_rounds_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        keep_rounds: 0,
        ..StoreConfig::default()
    };
    assert!(matches!(
        Store::open(dir.path(), config),
        Err(StoreError::Config(_))
    ));
}

/// A store with a quota refuses a blob past it (whole, or as it streams in) with a typed "full" error,
/// loses nothing it holds, and takes the blob once old rounds are collected: room comes back by itself.
#[test]
fn a_full_store_refuses_new_blobs_keeps_what_it_has_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        dir.path(),
        StoreConfig {
            keep_rounds: 1,
            max_blob_bytes: Some(100_000),
            ..StoreConfig::default()
        },
    )
    .expect("store");
    let shard = ShardId::Expert { layer: 0, index: 0 };
    let commit = |round: u64, blob: &[u8]| {
        let pin = store.put_blob(blob).expect("fits");
        let manifest = RoundManifest {
            entries: vec![ManifestEntry {
                shard,
                hash: pin.hash(),
                len: blob.len() as u64,
            }],
            meta: Vec::new(),
        };
        store.commit_round(round, &manifest).expect("commit");
        pin.hash()
    };
    let a = commit(1, &bytes(1, 60_000));
    assert_eq!(store.blob_bytes(), 60_000);

    let b = bytes(2, 60_000);
    let err = store.put_blob(&b).expect_err("past the quota");
    assert!(err.is_full(), "{err}");
    assert!(matches!(
        err,
        StoreError::Full {
            needed: 60_000,
            used: 60_000,
            quota: 100_000
        }
    ));
    assert!(err.to_string().contains("the store is full"), "{err}");
    let mut writer = store.blob_writer(u64::MAX).expect("writer");
    let streamed = writer
        .write_all(&b)
        .expect_err("past the quota while streaming");
    assert_eq!(streamed.kind(), std::io::ErrorKind::StorageFull);
    drop(writer);
    assert_eq!(
        store.blob_bytes(),
        60_000,
        "an abandoned write gives its bytes back"
    );
    assert_eq!(
        store.get_blob(&a).expect("round 1 intact"),
        bytes(1, 60_000)
    );

    // The next round needs little; committing it prunes round 1 and collects its blob: room is back.
    commit(2, &bytes(3, 10_000));
    assert!(!store.has_blob(&a).expect("has"));
    assert_eq!(store.blob_bytes(), 10_000);
    let _pin = store.put_blob(&b).expect("fits again");
    assert_eq!(store.blob_bytes(), 70_000);
    // Reopened, the store counts what it holds again (no pin survives: the unreferenced blob is collected).
    drop(_pin);
    drop(store);
    let store = Store::open(
        dir.path(),
        StoreConfig {
            keep_rounds: 1,
            max_blob_bytes: Some(100_000),
            ..StoreConfig::default()
        },
    )
    .expect("reopen");
    assert_eq!(store.blob_bytes(), 10_000);
}
