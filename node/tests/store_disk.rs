//! Disk use: after 100 rounds with keep-last-3 pruning, the whole data directory (sled's files included)
//! stays within 1.5x the live data (the blobs that retained rounds and references need), and stays there
//! after a restart.
//!
//! Each round rewrites half of its 8 shards (64-576 KB each) and references one delta payload for the next
//! round, so manifests share blobs, pruning must keep the shared ones and collect the rest.
//! Figures (bytes, ratio, and, for information only, time taken) are printed, never asserted on time.

use mana_protocol::ShardId;
use std::time::Instant;

use mana_node::store::{ManifestEntry, RecordKind, RoundManifest, Store, StoreConfig, round_key};

const ROUNDS: u64 = 100;
const SHARDS: u64 = 8;
const MAX_RATIO: f64 = 1.5;

fn shard_bytes(version: u64, shard: u64) -> Vec<u8> {
    let mut rng = mana_kernels::rng::SplitMix64(
        version.wrapping_mul(mana_kernels::rng::GOLDEN) ^ shard.wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let mut next = || rng.next_u64();
    let len = (64 << 10) + (next() % (512 << 10)) as usize;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn ratio(store: &Store) -> (f64, f64, u64) {
    let usage = store.disk_usage().expect("disk usage");
    let live = store.live_bytes().expect("live bytes");
    let apparent = usage.total_bytes as f64 / live as f64;
    let allocated = usage.allocated_bytes as f64 / live as f64;
    eprintln!(
        "disk: live {live} B; data dir {} B ({apparent:.3}x), allocated {} B ({allocated:.3}x); blobs {} B in {} \
         files; sled index {} B",
        usage.total_bytes,
        usage.allocated_bytes,
        usage.blob_bytes,
        usage.blob_count,
        usage.index_bytes
    );
    (apparent, allocated, live)
}

#[test]
fn hundred_rounds_with_pruning_stay_within_one_and_a_half_times_live_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        keep_rounds: 3,
        ..StoreConfig::default()
    };
    let mut written = 0u64;
    let started = Instant::now();
    {
        let store = Store::open(dir.path(), config.clone()).expect("open");
        for round in 1..=ROUNDS {
            let mut manifest = RoundManifest {
                entries: Vec::new(),
                meta: vec![0; 256],
            };
            let mut pins = Vec::new();
            for shard in 0..SHARDS {
                // Odd shards change every round, even ones every 4th.
                let version = if shard % 2 == 1 {
                    round
                } else {
                    round - round % 4
                };
                let data = shard_bytes(version, shard);
                let pin = store.put_blob(&data).expect("put shard");
                written += data.len() as u64;
                manifest.entries.push(ManifestEntry {
                    shard: ShardId::expert((round % 3) as u16, shard as u16).expect("in bounds"),
                    hash: pin.hash(),
                    len: pin.len(),
                });
                pins.push(pin);
            }
            let payload = store
                .put_blob(&shard_bytes(round + 1_000_000, 99))
                .expect("payload");
            store
                .put_record_with_blobs(
                    RecordKind::DeltaAnnouncement,
                    &round_key(round + 1, b"peer"),
                    &[7; 200],
                    round + 1,
                    &[payload.hash()],
                )
                .expect("announce");
            store
                .put_record(RecordKind::RoundState, b"trainer", &round.to_le_bytes())
                .expect("state");
            store
                .record_rejection("peer-x", "stale_round", "old")
                .expect("rejection");
            store.commit_round(round, &manifest).expect("commit");
        }
        let elapsed = started.elapsed().as_secs_f64();
        eprintln!(
            "wrote {ROUNDS} rounds, {written} B of shards offered (deduplicated on write) in {elapsed:.2} s: {:.1} MB/s \
             (information only; see benches/store.rs for the measured figure)",
            written as f64 / elapsed / 1e6
        );
        assert_eq!(
            store.rounds().expect("rounds"),
            vec![ROUNDS - 2, ROUNDS - 1, ROUNDS]
        );
        let (apparent, allocated, live) = ratio(&store);
        assert!(live > 0);
        assert!(
            apparent <= MAX_RATIO,
            "data dir is {apparent:.3}x the live data"
        );
        assert!(
            allocated <= MAX_RATIO,
            "allocated blocks are {allocated:.3}x the live data"
        );
    }
    let reopen = Instant::now();
    let store = Store::open(dir.path(), config).expect("reopen");
    eprintln!(
        "reopened in {:.3} s (information only)",
        reopen.elapsed().as_secs_f64()
    );
    assert_eq!(store.current_round().expect("current"), Some(ROUNDS));
    let (apparent, allocated, _) = ratio(&store);
    assert!(
        apparent <= MAX_RATIO,
        "after restart, data dir is {apparent:.3}x the live data"
    );
    assert!(
        allocated <= MAX_RATIO,
        "after restart, allocated blocks are {allocated:.3}x the live data"
    );
    assert!(store.verify().expect("verify").is_ok());
}
