//! Store speed, as ratios against plain file I/O measured in the same run:
//! - `commit_round`: write 8 fresh 1 MiB shards as blobs and commit them as a round (with keep-last-3
//!   pruning and collection), against `baseline_files`: the same 8 MiB written as 8 files with the same
//!   durability steps (write, fsync, rename, fsync dir) and nothing else;
//! - `open`: open a store holding 3 rounds (sled recovery, temp cleanup, start-up collection), against
//!   `baseline_open`: opening and reading the same number of files' metadata.
//!
//! Run: `cargo bench -p mana-node --bench store`.

use mana_protocol::ShardId;
use std::fs;
use std::io::Write;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mana_node::store::{ManifestEntry, RoundManifest, Store, StoreConfig};

const SHARDS: usize = 8;
const SHARD_BYTES: usize = 1 << 20;

fn shard(counter: u64, index: usize) -> Vec<u8> {
    let mut data = vec![0u8; SHARD_BYTES];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let word = counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((index * SHARD_BYTES + i) as u64);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    data
}

fn commit_one(store: &Store, round: u64) {
    let mut manifest = RoundManifest::default();
    let mut pins = Vec::new();
    for index in 0..SHARDS {
        let pin = store.put_blob(&shard(round, index)).expect("bench: put");
        manifest.entries.push(ManifestEntry {
            shard: ShardId::expert(0u16, index as u16).expect("in bounds"),
            hash: pin.hash(),
            len: pin.len(),
        });
        pins.push(pin);
    }
    store.commit_round(round, &manifest).expect("bench: commit");
}

fn write_files(dir: &Path, counter: u64) {
    for index in 0..SHARDS {
        let data = shard(counter, index);
        let tmp = dir.join("tmp");
        let mut file = fs::File::create(&tmp).expect("bench: create");
        file.write_all(&data).expect("bench: write");
        file.sync_all().expect("bench: fsync");
        fs::rename(&tmp, dir.join(format!("{index}"))).expect("bench: rename");
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("bench: fsync dir");
    }
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((SHARDS * SHARD_BYTES) as u64));

    let dir = tempfile::tempdir().expect("bench: tempdir");
    let store = Store::open(dir.path().join("store"), StoreConfig::default()).expect("bench: open");
    let mut round = 0u64;
    group.bench_function("commit_round", |b| {
        b.iter(|| {
            round += 1;
            commit_one(&store, round);
        })
    });
    drop(store);

    let files = dir.path().join("files");
    fs::create_dir_all(&files).expect("bench: mkdir");
    let mut counter = 0u64;
    group.bench_function("baseline_files", |b| {
        b.iter(|| {
            counter += 1;
            write_files(&files, counter);
        })
    });

    group.throughput(Throughput::Elements(1));
    group.bench_function("open", |b| {
        b.iter(|| {
            let store = Store::open(dir.path().join("store"), StoreConfig::default())
                .expect("bench: reopen");
            assert!(store.current_round().expect("bench: current").is_some());
        })
    });
    group.bench_function("baseline_open", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for _ in 0..3 {
                for entry in fs::read_dir(&files).expect("bench: read_dir") {
                    total += entry
                        .expect("bench: entry")
                        .metadata()
                        .expect("bench: metadata")
                        .len();
                }
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
