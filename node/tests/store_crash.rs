//! Crash safety: `kill -9` at any moment leaves a store that opens and holds the last complete round.
//!
//! The test re-executes its own binary in "writer mode" (selected by an environment variable): the writer
//! opens the store and commits rounds in a loop (shards of varied sizes, some reused from the previous round,
//! delta payloads referenced for the next round, rejections logged), printing `committed <round>` after each
//! commit returns. The test SIGKILLs it after a random delay, reopens the store and checks:
//! - it opens, and no temporary file survives the open;
//! - the current round is at least the last one the writer reported committed (a commit that returned is
//!   durable) or that an earlier check found, and at most one past that;
//! - every retained round is complete: each shard reads back, hash-correct, with the content the writer
//!   generated for that round and shard (no partial round is visible);
//! - `verify()` finds nothing wrong.
//!
//! Knobs: `MANA_STORE_KILLS` (default 40) and `MANA_STORE_KILL_SEED` (default: from the clock; printed).

use mana_protocol::ShardId;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mana_node::store::{
    ContentHash, ManifestEntry, RecordKind, RoundManifest, Store, StoreConfig, round_key,
};

/// Set (to the data directory) in the child: run the writer loop instead of the test.
const WRITER_ENV: &str = "MANA_STORE_CRASH_WRITER_DIR";
const KEEP_ROUNDS: usize = 3;
const SHARDS_PER_ROUND: u64 = 6;

/// splitmix64: a tiny deterministic generator, so the checker can recompute what the writer wrote.
use mana_kernels::rng::SplitMix64 as SplitMix;

/// The round in which shard `shard` last changed, as of round `round`: shards 0-1 change every round, the
/// others every 2nd, 3rd... round, so manifests share blobs and pruning has to keep the shared ones.
fn version_of(round: u64, shard: u64) -> u64 {
    let period = shard.saturating_sub(1).max(1);
    round - round % period
}

/// The bytes of `shard` as it is in round `round`: a header naming (version, shard) and seeded filler, 4 KB to
/// 300 KB long.
fn shard_bytes(round: u64, shard: u64) -> Vec<u8> {
    let version = version_of(round, shard);
    let mut rng = SplitMix(version.wrapping_mul(1_000_003) ^ shard.wrapping_mul(7919));
    let len = 4096 + (rng.next_u64() % (300 << 10)) as usize;
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&shard.to_le_bytes());
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn config() -> StoreConfig {
    StoreConfig {
        keep_rounds: KEEP_ROUNDS,
        ..StoreConfig::default()
    }
}

/// The writer: commits rounds until killed.
fn writer_loop(dir: &Path) -> ! {
    let store = match Store::open(dir, config()) {
        Ok(store) => store,
        Err(err) => {
            eprintln!("writer: open failed: {err}");
            std::process::exit(3);
        }
    };
    let mut round = store.current_round().ok().flatten().map_or(1, |r| r + 1);
    let stdout = std::io::stdout();
    loop {
        let result = (|| -> Result<(), mana_node::store::StoreError> {
            let mut manifest = RoundManifest {
                entries: Vec::new(),
                meta: round.to_le_bytes().to_vec(),
            };
            let mut pins = Vec::new();
            for shard in 0..SHARDS_PER_ROUND {
                let data = shard_bytes(round, shard);
                let pin = if shard % 2 == 0 {
                    store.put_blob(&data)?
                } else {
                    let mut writer = store.blob_writer(1 << 20)?;
                    for chunk in data.chunks(16 << 10) {
                        writer.write_all(chunk).map_err(|source| {
                            mana_node::store::StoreError::Io {
                                path: dir.to_path_buf(),
                                source,
                            }
                        })?;
                    }
                    writer.finish()?
                };
                manifest.entries.push(ManifestEntry {
                    shard: ShardId::expert(0u16, shard as u16).expect("in bounds"),
                    hash: pin.hash(),
                    len: pin.len(),
                });
                pins.push(pin);
            }
            // A delta payload for the next round, announced and referenced.
            let payload = store.put_blob(&shard_bytes(round + 1_000_000, 0))?;
            store.put_record_with_blobs(
                RecordKind::DeltaAnnouncement,
                &round_key(round + 1, b"peer"),
                b"announcement",
                round + 1,
                &[payload.hash()],
            )?;
            store.record_rejection("peer-x", "bad_signature", "crash test")?;
            store.commit_round(round, &manifest)?;
            Ok(())
        })();
        if let Err(err) = result {
            eprintln!("writer: round {round} failed: {err}");
            std::process::exit(4);
        }
        let mut out = stdout.lock();
        // If the parent is gone there is nobody to tell; keep going until killed.
        let _ = writeln!(out, "committed {round}");
        let _ = out.flush();
        round += 1;
    }
}

/// Opens the store and checks everything the module doc promises. Returns the current round.
fn check_store(dir: &Path, floor: Option<u64>) -> Option<u64> {
    let store = Store::open(dir, config()).expect("the store opens after kill -9");
    assert_eq!(
        std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
        0,
        "temp files removed at open"
    );
    let current = store.current_round().expect("current round");
    if let Some(floor) = floor {
        let current = current.expect("a round was acknowledged or seen, so one is stored");
        assert!(
            current >= floor,
            "round {floor} was acknowledged or seen but the store holds only {current}"
        );
        assert!(
            current <= floor + 1,
            "store holds {current}, only {floor} known (one more may be in flight)"
        );
    }
    let rounds = store.rounds().expect("rounds");
    assert!(
        rounds.len() <= KEEP_ROUNDS,
        "pruning keeps {KEEP_ROUNDS}: {rounds:?}"
    );
    for &round in &rounds {
        let manifest = store
            .manifest(round)
            .expect("manifest")
            .expect("listed round has a manifest");
        assert_eq!(manifest.meta, round.to_le_bytes());
        assert_eq!(
            manifest.entries.len() as u64,
            SHARDS_PER_ROUND,
            "round {round} complete"
        );
        for (shard, entry) in manifest.entries.iter().enumerate() {
            let data = store
                .get_blob(&entry.hash)
                .unwrap_or_else(|err| panic!("round {round} shard {shard}: {err}"));
            assert_eq!(ContentHash::of(&data), entry.hash);
            assert_eq!(
                data,
                shard_bytes(round, shard as u64),
                "round {round} shard {shard} content"
            );
        }
    }
    let report = store.verify().expect("verify runs");
    assert!(report.is_ok(), "verify after kill: {report:?}");
    current
}

#[test]
fn kill_nine_at_random_moments_leaves_the_last_complete_round() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer_loop(Path::new(&dir));
    }
    let kills: usize = std::env::var("MANA_STORE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("MANA_STORE_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill test: {kills} kills, MANA_STORE_KILL_SEED={seed}");
    let mut rng = SplitMix(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let started = Instant::now();
    let mut acknowledged: Option<u64> = None;
    let mut durable: Option<u64> = None;
    let mut kills_after_unacknowledged_commit = 0;
    for kill in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill_nine_at_random_moments_leaves_the_last_complete_round",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("writer starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let last_seen = Arc::new(Mutex::new(None::<u64>));
        let reader = {
            let last_seen = Arc::clone(&last_seen);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // libtest may have printed "test <name> ... " on the same line before our first one.
                    let found = line
                        .find("committed ")
                        .map(|at| &line[at + "committed ".len()..]);
                    if let Some(round) = found.and_then(|r| r.trim().parse::<u64>().ok()) {
                        *last_seen.lock().expect("reader lock") = Some(round);
                    }
                }
            })
        };
        // Child start-up (exec + open) takes some tens of ms; kill anywhere from during open to a few rounds in.
        let delay = Duration::from_millis(5 + rng.next_u64() % 400);
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            panic!("writer exited by itself ({status}) before kill {kill}: {err}");
        }
        child.kill().expect("SIGKILL the writer");
        child.wait().expect("reap the writer");
        reader.join().expect("reader thread");
        let seen = *last_seen.lock().expect("reader lock");
        if seen.is_some() {
            acknowledged = seen;
        }
        // What the store must hold at least: the last acknowledged commit, or a round a previous check found
        // (once seen after a reopen it is on disk and must stay).
        let floor = acknowledged.max(durable);
        let current = check_store(dir.path(), floor);
        if current != acknowledged {
            kills_after_unacknowledged_commit += 1;
        }
        durable = current;
    }
    eprintln!(
        "kill test: {kills} kills in {:.1} s; last round {:?}; {kills_after_unacknowledged_commit} kills landed between a commit and its acknowledgement",
        started.elapsed().as_secs_f64(),
        acknowledged
    );
    assert!(
        acknowledged.unwrap_or(0) >= 3,
        "the writer made progress between kills"
    );
}
