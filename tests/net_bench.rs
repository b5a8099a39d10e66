//! Figures for the network layer, printed, never asserted on (ignored by default; run with
//! `cargo test --release --test net_bench -- --ignored --nocapture --test-threads 1`):
//! - shard transfer throughput over loopback, over the wire (hash-checked, bytes dropped) and into the
//!   store (fsync'd), against bounds measured in the same run: a plain TCP copy of the same bytes; the
//!   noise cipher's own throughput (ChaCha20-Poly1305 from ring, as libp2p-noise uses it through snow, one
//!   thread sealing 64 KiB frames and one opening them) and the blob lanes' (AES-256-GCM, 1 MiB records);
//!   the encrypted pipeline (sealed frames through a
//!   loopback TCP socket, opened and hashed: the least work any encrypted, hash-checked transfer does); and
//!   the store's own write speed. With the CPU seconds per GB spent at each end (the provider runs in its
//!   own process, so the two ends are counted apart);
//! - the time for a fresh node to join and fetch a 1 GiB checkpoint from 3 providers
//!   (`cargo test --release --test net_bench bench_join_and_fetch_1gb_from_3_providers -- --ignored
//!   --nocapture`);
//! - gossip latency from one node to five peers;
//! - resident memory (RSS) of idle `mana node` processes.

mod net_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mana_node::net::fetch::{FetchOptions, fetch_blob};
use mana_node::net::libp2p::{Multiaddr, PeerId};
use mana_protocol::{ContentHash, Message};
use net_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BYTES: usize = 256 * 1024 * 1024;

/// CPU time used by a process so far (user + system, all its threads), in seconds: /proc/<pid>/stat fields
/// 14 and 15, in USER_HZ ticks (100 per second in Linux's ABI). A machine shared with other work slows the
/// wall clock of a transfer but not the CPU it costs, so both are printed.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn process_cpu_secs() -> f64 {
    cpu_secs("self")
}

/// A plain TCP copy of `data` over loopback (tokio, 1 MiB buffers), in MB/s.
async fn tcp_copy_mb_s(data: &[u8]) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let len = data.len();
    let reader = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while got < len {
            let n = sock.read(&mut buf).await.expect("read");
            assert!(n > 0, "early eof");
            got += n;
        }
    });
    let start = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(data).await.expect("write");
    reader.await.expect("reader");
    len as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// The largest plaintext libp2p-noise puts in one noise message (65535 bytes less its 1024 spare).
const NOISE_FRAME: usize = 65535 - 1024;

/// The cipher's bound on an encrypted transfer: one thread seals `total` bytes in `frame`-byte records
/// (with the copy into the output buffer that snow's ring resolver makes), another opens them, as the two
/// ends of a connection do. Returns (MB/s through the pair, CPU seconds per GB of both threads together).
fn cipher_bound(
    total: usize,
    algorithm: &'static ring::aead::Algorithm,
    frame: usize,
) -> (f64, f64) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
    let key =
        move || LessSafeKey::new(UnboundKey::new(algorithm, &[7u8; 32]).expect("a 32-byte key"));
    let nonce = |n: u64| {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&n.to_le_bytes()); // noise's ChaChaPoly nonce: 4 zero bytes, 64-bit counter
        Nonce::assume_unique_for_key(bytes)
    };
    let frames = total / frame;
    let plain = pseudo_random_bytes(frame, 9);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let start = Instant::now();
    let sealer = std::thread::spawn(move || {
        let (key, t0) = (key(), Instant::now());
        for n in 0..frames as u64 {
            let mut out = Vec::with_capacity(frame + 16);
            out.extend_from_slice(&plain);
            let tag = key
                .seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut out)
                .expect("seal");
            out.extend_from_slice(tag.as_ref());
            tx.send(out).expect("opener alive");
        }
        t0.elapsed()
    });
    let opener = std::thread::spawn(move || {
        let (key, mut busy) = (key(), Duration::ZERO);
        for (n, mut record) in rx.into_iter().enumerate() {
            let t0 = Instant::now();
            let opened = key
                .open_in_place(nonce(n as u64), Aad::empty(), &mut record)
                .expect("authentic");
            assert_eq!(opened.len(), frame);
            busy += t0.elapsed();
        }
        busy
    });
    let seal_busy = sealer.join().expect("sealer");
    let open_busy = opener.join().expect("opener");
    let bytes = (frames * frame) as f64;
    (
        bytes / 1e6 / start.elapsed().as_secs_f64(),
        (seal_busy + open_busy).as_secs_f64() / (bytes / 1e9),
    )
}

/// The least work any encrypted, hash-checked transfer does, on this machine: one thread seals noise-sized
/// frames and writes them to a loopback TCP socket, another reads them, opens them and hashes the
/// plaintext (blake3, as a fetch does). No multiplexer, no store: the cipher, the kernel's copies and the
/// hash, sharing the machine's cores as the two ends of a real transfer do. Returns (MB/s, CPU-s/GB of the
/// whole process, both ends).
fn encrypted_pipeline_bound(total: usize) -> (f64, f64) {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use std::io::Read;
    let key = || {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("a 32-byte key"))
    };
    let nonce = |n: u64| {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&n.to_le_bytes());
        Nonce::assume_unique_for_key(bytes)
    };
    let frames = total / NOISE_FRAME;
    let plain = pseudo_random_bytes(NOISE_FRAME, 9);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (cpu0, start) = (process_cpu_secs(), Instant::now());
    let opener = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let (key, mut hasher) = (key(), blake3::Hasher::new());
        let mut frame = vec![0u8; 2 + NOISE_FRAME + 16];
        for n in 0..frames as u64 {
            sock.read_exact(&mut frame).expect("read a frame");
            let opened = key
                .open_in_place(nonce(n), Aad::empty(), &mut frame[2..])
                .expect("authentic");
            hasher.update(opened);
        }
        hasher.finalize()
    });
    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let key = key();
    let mut out = Vec::with_capacity(2 + NOISE_FRAME + 16);
    for n in 0..frames as u64 {
        out.clear();
        out.extend_from_slice(&((NOISE_FRAME + 16) as u16).to_be_bytes());
        out.extend_from_slice(&plain);
        let tag = key
            .seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut out[2..])
            .expect("seal");
        out.extend_from_slice(tag.as_ref());
        sock.write_all(&out).expect("write a frame");
    }
    opener.join().expect("opener");
    let bytes = (frames * NOISE_FRAME) as f64;
    (
        bytes / 1e6 / start.elapsed().as_secs_f64(),
        (process_cpu_secs() - cpu0) / (bytes / 1e9),
    )
}

/// A sink that counts the bytes and drops them (the fetch hashes them itself): the transfer alone, without
/// the store's file write.
struct Discard(u64);

impl mana_node::net::fetch::BlobSink for Discard {
    fn write_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0 += data.len() as u64;
        Ok(())
    }
}

/// The store's own bound on a fetch: the same bytes written through its blob writer (hashed, written in
/// 1 MiB pieces, fsync'd, renamed into place) with no network, in MB/s.
fn store_write_mb_s(node: &mana_node::daemon::NodeHandle, data: &[u8]) -> f64 {
    let start = Instant::now();
    let mut writer = node.store().blob_writer(u64::MAX).expect("writer");
    for piece in data.chunks(1 << 20) {
        std::io::Write::write_all(&mut writer, piece).expect("write");
    }
    let pin = writer.finish().expect("finish");
    let secs = start.elapsed().as_secs_f64();
    drop(pin);
    data.len() as f64 / 1e6 / secs
}

/// A provider node in its own process (this test binary again, running [`provider_process`]), so that its
/// CPU time is counted apart from the fetcher's.
struct ProviderProc {
    child: Child,
    peer: PeerId,
    addr: Multiaddr,
    hash: ContentHash,
    warm: ContentHash,
    quic: Multiaddr,
    dir: std::path::PathBuf,
}

impl ProviderProc {
    fn spawn(dir: &std::path::Path, boot: &[Multiaddr], bytes: usize, seed: u64) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "provider_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                "MANA_BENCH_PROVIDER",
                format!("{}|{}|{bytes}|{seed}", dir.display(), boot[0]),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("provider process");
        let stdout = child.stdout.take().expect("piped stdout");
        let line = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split_once("PROVIDER ")
                    .map(|(_, rest)| format!("PROVIDER {rest}"))
            })
            .expect("the provider reports its address"); // after libtest's "test provider_process ... "
        let f: Vec<&str> = line.split_whitespace().collect();
        let hash = |s: &str| s.parse::<ContentHash>().expect("a hash");
        Self {
            peer: f[1].parse().expect("peer id"),
            addr: f[2].parse().expect("address"),
            hash: hash(f[3]),
            warm: hash(f[4]),
            quic: f[5].parse().expect("QUIC address"),
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn cpu_secs(&self) -> f64 {
        cpu_secs(&self.child.id().to_string())
    }

    /// Stops the provider (its stdin closes) and returns the bytes it served (`fetch_out` from its final
    /// status file).
    fn stop(mut self) -> u64 {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let status = std::fs::read_to_string(self.dir.join("status.json")).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        json["traffic"]["fetch_out"].as_u64().unwrap_or(0)
    }
}

impl Drop for ProviderProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the provider side of the benchmarks, started by [`ProviderProc::spawn`] (it does nothing
/// unless `MANA_BENCH_PROVIDER` is set). Hosts a pseudo-random blob and a small warm-up blob, prints its
/// address and their hashes, and serves until its stdin closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the provider process of the benchmarks"]
async fn provider_process() {
    let Ok(spec) = std::env::var("MANA_BENCH_PROVIDER") else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    let boot: Multiaddr = f[1].parse().expect("bootstrap address");
    let (bytes, seed): (usize, u64) = (f[2].parse().expect("size"), f[3].parse().expect("seed"));
    let mut config = node_config(std::path::Path::new(f[0]), &[boot]);
    config.net.listen.push(
        "/ip4/127.0.0.1/udp/0/quic-v1"
            .parse()
            .expect("a QUIC address"),
    );
    let node = start_node(config).await;
    let hash = node
        .host_blob_now(pseudo_random_bytes(bytes, seed))
        .await
        .expect("host");
    let warm = node
        .host_blob_now(pseudo_random_bytes(1 << 20, seed + 1))
        .await
        .expect("host");
    let addrs = node.listen_addrs().await.expect("addresses");
    let is_quic = |a: &Multiaddr| a.to_string().contains("quic");
    let addr = addrs.iter().find(|a| !is_quic(a)).expect("a TCP address");
    let quic = addrs.iter().find(|a| is_quic(a)).expect("a QUIC address");
    println!("PROVIDER {} {addr} {hash} {warm} {quic}", node.peer_id());
    std::io::stdout().flush().expect("stdout");
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn bench_shard_transfer_vs_tcp_copy() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let provider = ProviderProc::spawn(&dir.path().join("a"), &boot, BYTES, 3);
    let data = pseudo_random_bytes(BYTES, 3);
    assert_eq!(provider.hash, ContentHash::of(&data));
    let (cipher, cipher_cpu) = cipher_bound(BYTES, &ring::aead::CHACHA20_POLY1305, NOISE_FRAME);
    println!(
        "cipher bound (ring ChaCha20-Poly1305 as noise uses it, {NOISE_FRAME}-byte frames, one thread sealing, \
         one opening): {cipher:.1} MB/s, {cipher_cpu:.2} CPU-s/GB for both"
    );
    let (lane_cipher, lane_cipher_cpu) = cipher_bound(
        BYTES,
        &ring::aead::AES_256_GCM,
        mana_node::net::lane::MAX_RECORD_PLAINTEXT,
    );
    println!(
        "lane cipher bound (ring AES-256-GCM as blob lanes use it, 1 MiB records, one thread sealing, one \
         opening): {lane_cipher:.1} MB/s, {lane_cipher_cpu:.2} CPU-s/GB for both"
    );
    let (pipeline, pipeline_cpu) = encrypted_pipeline_bound(BYTES);
    println!(
        "encrypted pipeline bound (seal, TCP loopback, open, blake3; two threads): {pipeline:.1} MB/s, \
         {pipeline_cpu:.2} CPU-s/GB for both ends"
    );

    // The defaults first (blob lanes), then bulk streams alone (the connection's noise and yamux), other
    // segment sizes and streams per provider, the request-response path alone, the defaults again (the
    // first fetch of a run is the slowest), and bulk streams over a QUIC connection (one fresh fetching node
    // each).
    let d = FetchOptions::default();
    let streams_only = FetchOptions {
        blob_lanes: false,
        ..d.clone()
    };
    let variants = [
        ("defaults", FetchOptions { ..d.clone() }),
        ("bulk streams, no lanes", streams_only.clone()),
        (
            "16 MiB segments",
            FetchOptions {
                segment_bytes: 16 << 20,
                ..d.clone()
            },
        ),
        (
            "4 MiB segments, 4 streams",
            FetchOptions {
                segment_bytes: 4 << 20,
                streams_per_provider: 4,
                ..d.clone()
            },
        ),
        (
            "1 stream",
            FetchOptions {
                streams_per_provider: 1,
                ..d.clone()
            },
        ),
        (
            "request-response only",
            FetchOptions {
                bulk_streams: false,
                ..d.clone()
            },
        ),
        ("defaults, again", FetchOptions { ..d.clone() }),
        ("bulk streams over QUIC", streams_only.clone()),
    ];
    let other = pseudo_random_bytes(BYTES, 4); // for the store's own bound (a blob the node lacks)
    let mut defaults_vs_tcp = Vec::new();
    for (i, (name, fetch)) in variants.into_iter().enumerate() {
        let mut config = node_config(&dir.path().join(format!("b{i}")), &boot);
        config.fetch = fetch.clone();
        let b = start_node(config).await;
        let addr = if name.ends_with("over QUIC") {
            provider.quic.clone()
        } else {
            provider.addr.clone()
        };
        b.net().dial(addr).await.expect("dial the provider");
        // Warm the connection (and the provider's open-blob cache for the small blob) first.
        b.fetch_blob_from(provider.warm, vec![provider.peer])
            .await
            .expect("warm-up fetch");
        // Over the wire only: hash-checked, into a sink that drops the bytes; each transfer against a TCP
        // copy measured just before it (the defaults several times: their spread is part of the figure).
        let samples = if name.starts_with("defaults") { 3 } else { 1 };
        for _ in 0..samples {
            let cpu0 = process_cpu_secs();
            let tcp = tcp_copy_mb_s(&data).await;
            let tcp_cpu = process_cpu_secs() - cpu0;
            let (cpu0, provider_cpu0) = (process_cpu_secs(), provider.cpu_secs());
            let start = Instant::now();
            let (len, _) = fetch_blob(
                b.net(),
                provider.hash,
                vec![provider.peer],
                Discard(0),
                &fetch,
            )
            .await
            .expect("fetch");
            let secs = start.elapsed().as_secs_f64();
            let (fetcher_cpu, provider_cpu) = (
                process_cpu_secs() - cpu0,
                provider.cpu_secs() - provider_cpu0,
            );
            let (wire, gb) = (len as f64 / 1e6 / secs, len as f64 / 1e9);
            println!(
                "shard transfer ({name}), over the wire: {} MB in {secs:.3} s = {wire:.1} MB/s (hash-checked); \
                 CPU-s/GB: fetcher {:.2}, provider {:.2}; TCP copy {tcp:.1} MB/s ({:.2} CPU-s/GB both ends); \
                 mana/TCP = {:.3}, mana/cipher bound = {:.3}, mana/encrypted pipeline = {:.3}",
                len / 1_000_000,
                fetcher_cpu / gb,
                provider_cpu / gb,
                tcp_cpu / gb,
                wire / tcp,
                wire / cipher,
                wire / pipeline,
            );
            if name.starts_with("defaults") {
                defaults_vs_tcp.push(wire / tcp);
            }
        }
        let gb = BYTES as f64 / 1e9;

        // Into the store, as a node fetches (written, fsync'd, renamed into place), against the store's own
        // write speed on this disk.
        let (cpu0, provider_cpu0) = (process_cpu_secs(), provider.cpu_secs());
        let start = Instant::now();
        let len = b
            .fetch_blob_from(provider.hash, vec![provider.peer])
            .await
            .expect("fetch");
        let secs = start.elapsed().as_secs_f64();
        let (fetcher_cpu, provider_cpu) = (
            process_cpu_secs() - cpu0,
            provider.cpu_secs() - provider_cpu0,
        );
        let stored = len as f64 / 1e6 / secs;
        let store_bound = store_write_mb_s(&b, &other);
        println!(
            "shard transfer ({name}), into the store: {stored:.1} MB/s; CPU-s/GB: fetcher {:.2}, provider {:.2}; \
             the store alone writes {store_bound:.1} MB/s (same bytes, no network); mana/store = {:.3}",
            fetcher_cpu / gb,
            provider_cpu / gb,
            stored / store_bound,
        );
        b.shutdown().await.expect("shutdown");
    }
    defaults_vs_tcp.sort_by(f64::total_cmp);
    println!(
        "defaults over the wire, mana/TCP over {} transfers: min {:.3}, median {:.3}, max {:.3}",
        defaults_vs_tcp.len(),
        defaults_vs_tcp[0],
        defaults_vs_tcp[defaults_vs_tcp.len() / 2],
        defaults_vs_tcp[defaults_vs_tcp.len() - 1],
    );
    provider.stop();
    bootstrap.shutdown().await;
}

/// A fresh node joins through the bootstrap and fetches a 1 GiB checkpoint shard from 3 providers (each
/// in its own process) at once: the figure quoted in the operator guide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures (1 GiB on disk four times)"]
async fn bench_join_and_fetch_1gb_from_3_providers() {
    const GIB: usize = 1 << 30;
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let providers: Vec<ProviderProc> = (0..3)
        .map(|i| ProviderProc::spawn(&dir.path().join(format!("p{i}")), &boot, GIB, 21))
        .collect();
    let hash = providers[0].hash;
    assert!(
        providers.iter().all(|p| p.hash == hash),
        "the providers host the same blob"
    );
    let peers: Vec<PeerId> = providers.iter().map(|p| p.peer).collect();
    let cpu0: Vec<f64> = providers.iter().map(ProviderProc::cpu_secs).collect();
    let fetcher_cpu0 = process_cpu_secs();

    let start = Instant::now();
    let node = start_node(node_config(&dir.path().join("fresh"), &boot)).await;
    for p in &providers {
        node.net()
            .dial(p.addr.clone())
            .await
            .expect("dial a provider");
    }
    let joined = start.elapsed().as_secs_f64();
    let len = node.fetch_blob_from(hash, peers).await.expect("fetch");
    let total = start.elapsed().as_secs_f64();
    assert_eq!(len, GIB as u64);
    let fetcher_cpu = process_cpu_secs() - fetcher_cpu0;
    let provider_cpu: Vec<f64> = providers
        .iter()
        .zip(&cpu0)
        .map(|(p, c)| p.cpu_secs() - c)
        .collect();
    node.shutdown().await.expect("shutdown");
    let served: Vec<u64> = providers.into_iter().map(ProviderProc::stop).collect();
    println!(
        "fresh node: started and connected to 3 providers in {joined:.2} s, 1 GiB fetched (hash-checked, \
         fsync'd) in {:.2} s = {:.1} MB/s, {total:.2} s in all; MB served per provider {:?}; CPU-s: fetcher \
         {fetcher_cpu:.2}, providers {provider_cpu:.2?}",
        total - joined,
        GIB as f64 / 1e6 / (total - joined),
        served.iter().map(|b| b / 1_000_000).collect::<Vec<_>>(),
    );
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn bench_gossip_latency_to_five_peers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let mut nodes = Vec::new();
    for i in 0..6 {
        let mut config = node_config(&dir.path().join(format!("n{i}")), &boot);
        config.heartbeat_interval = Duration::from_secs(3600); // only our probes on the wire
        nodes.push(start_node(config).await);
    }
    let sender = nodes[0].public_key();
    let run = mana_node::net::NetConfig::for_tests().run_id;
    // Wait for the mesh: a probe must reach all five.
    let mut latencies = Vec::new();
    let mut seq = 1_000_000u64;
    for round in 0..25 {
        seq += 1;
        let mut receivers: Vec<_> = nodes[1..].iter().map(|n| n.accepted()).collect();
        let probe = idle_heartbeat(&run, seq, "probe");
        let start = Instant::now();
        if nodes[0].publish(&probe).await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut worst = Duration::ZERO;
        let mut all = true;
        for rx in receivers.iter_mut() {
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let m = rx.recv().await.expect("open");
                    if m.signer == sender {
                        if let Message::Heartbeat(h) = &m.message {
                            if h.seq == seq {
                                return start.elapsed();
                            }
                        }
                    }
                }
            })
            .await;
            match got {
                Ok(d) => worst = worst.max(d),
                Err(_) => all = false,
            }
        }
        if all && round >= 5 {
            latencies.push(worst.as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort_by(f64::total_cmp);
    let n = latencies.len();
    assert!(n > 0, "no probe reached all five peers");
    println!(
        "gossip latency to all 5 peers (publish -> validated at the last one), {n} probes: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        latencies[n / 2],
        latencies[(n * 9 / 10).min(n - 1)],
        latencies[n - 1]
    );
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
    bootstrap.shutdown().await;
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
#[ignore = "benchmark: prints figures"]
fn bench_idle_node_rss() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut boot = Command::new(env!("CARGO_BIN_EXE_mana"))
        .args([
            "bootstrap",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(dir.path().join("boot"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bootstrap");
    let mut line = String::new();
    BufReader::new(boot.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let boot = Proc(boot);
    let nodes: Vec<Proc> = (0..4)
        .map(|i| {
            Proc(
                Command::new(env!("CARGO_BIN_EXE_mana"))
                    .args([
                        "node",
                        "--listen",
                        "/ip4/127.0.0.1/tcp/0",
                        "--bootstrap",
                        line.trim(),
                        "--data-dir",
                    ])
                    .arg(dir.path().join(format!("n{i}")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("node"),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(15));
    let rss: Vec<u64> = nodes.iter().filter_map(|p| rss_kib(p.0.id())).collect();
    println!(
        "idle RSS after 15 s, 4 nodes + bootstrap on loopback: nodes {rss:?} KiB, bootstrap {:?} KiB",
        rss_kib(boot.0.id())
    );
    if !rss.is_empty() {
        println!(
            "mean idle node RSS: {:.1} MiB",
            rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0
        );
    }
}
