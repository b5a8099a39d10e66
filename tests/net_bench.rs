//! Figures for the network layer, printed, never asserted on (ignored by default; run with
//! `cargo test --test net_bench -- --ignored --nocapture --test-threads 1`):
//! - shard transfer throughput over loopback against a plain TCP copy of the same bytes in the same run;
//! - gossip latency from one node to five peers;
//! - resident memory (RSS) of idle `mana node` processes.

mod net_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mana_protocol::{Capacity, ContentHash, DeviceKind, Heartbeat, Message, Text};
use net_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BYTES: usize = 64 * 1024 * 1024;

/// CPU time used by this whole process so far (user + system), in seconds: /proc/self/stat fields 14 and 15,
/// in USER_HZ ticks (100 per second in Linux's ABI). A machine shared with other work slows the wall clock
/// of a transfer but not the CPU it costs, so both are printed.
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A plain TCP copy of `data` over loopback (tokio, 1 MiB buffers), in MB/s.
async fn tcp_copy_mb_s(data: &[u8]) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn bench_shard_transfer_vs_tcp_copy() {
    use mana_node::net::fetch::FetchOptions;
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let a = start_node(node_config(&dir.path().join("a"), &boot)).await;
    let data = pseudo_random_bytes(BYTES, 3);
    let hash = a.host_blob(data.clone()).await.expect("host");
    assert_eq!(hash, ContentHash::of(&data));
    let warm = a.host_blob(pseudo_random_bytes(1 << 20, 4)).await.expect("host");

    // The defaults first, then other chunk sizes and request windows (one fresh fetching node each).
    let defaults = FetchOptions::default();
    let variants = [
        (defaults.chunk_bytes, defaults.per_provider),
        (1 << 20, 16),
        (2 << 20, 8),
        (4 << 20, 8),
        (4 << 20, 16),
    ];
    for (i, (chunk_bytes, per_provider)) in variants.into_iter().enumerate() {
        let mut config = node_config(&dir.path().join(format!("b{i}")), &boot);
        config.fetch.chunk_bytes = chunk_bytes;
        config.fetch.per_provider = per_provider;
        config.fetch.concurrency = per_provider;
        let b = start_node(config).await;
        // Warm the connection (and the provider's open-blob cache for the small blob) first.
        b.fetch_blob(warm).await.expect("warm-up fetch");
        let cpu0 = process_cpu_secs();
        let tcp = tcp_copy_mb_s(&data).await;
        let tcp_cpu = process_cpu_secs() - cpu0;
        let before = b.status().await.expect("status").traffic;
        let cpu0 = process_cpu_secs();
        let start = Instant::now();
        let len = b.fetch_blob(hash).await.expect("fetch");
        let secs = start.elapsed().as_secs_f64();
        let mana_cpu = process_cpu_secs() - cpu0;
        let after = b.status().await.expect("status").traffic;
        let mana = len as f64 / 1e6 / secs;
        println!(
            "shard transfer, {} KiB chunks, {per_provider} in flight{}: {} MB in {secs:.2} s = {mana:.1} MB/s \
             (hash-checked, fsync'd into the store), {mana_cpu:.2} CPU-s both ends; plain TCP copy {tcp:.1} MB/s, \
             {tcp_cpu:.2} CPU-s; ratio mana/TCP = {:.3}; fetch bytes in {}",
            chunk_bytes / 1024,
            if i == 0 { " (defaults)" } else { "" },
            len / 1_000_000,
            mana / tcp,
            after.fetch_in - before.fetch_in,
        );
        b.shutdown().await.expect("shutdown");
    }
    a.shutdown().await.expect("shutdown");
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
        let probe = Message::Heartbeat(Heartbeat {
            run: run.clone(),
            seq,
            hosted: Vec::new(),
            capacity: Capacity { device: DeviceKind::Cpu, memory_bytes: 0, tokens_per_second: 0.0, max_shards: 0 },
            software_version: Text::new("probe").expect("short"),
        });
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
        .args(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir.path().join("boot"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bootstrap");
    let mut line = String::new();
    BufReader::new(boot.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let boot = Proc(boot);
    let nodes: Vec<Proc> = (0..4)
        .map(|i| {
            Proc(
                Command::new(env!("CARGO_BIN_EXE_mana"))
                    .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", line.trim(), "--data-dir"])
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
    println!("idle RSS after 15 s, 4 nodes + bootstrap on loopback: nodes {rss:?} KiB, bootstrap {:?} KiB", rss_kib(boot.0.id()));
    if !rss.is_empty() {
        println!("mean idle node RSS: {:.1} MiB", rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0);
    }
}
