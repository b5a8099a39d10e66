//! `mana status`: what a running node reports about itself: peers, hosted experts, rounds, stored shards,
//! rejected messages, and the roles' progress (trainer: rounds trained, deltas sent, hash checks;
//! coordinator: round, phase, members; evaluator: checkpoints evaluated, the last loss), and what a node
//! caught of a dishonest coordinator (a commit the trainer refused, two different commits of one round,
//! disputes heard), the fate of a trainer's deltas, and the coordinator's members, settings and last commits.
//! It reads `<data dir>/status.json`, which the node rewrites atomically every 2 seconds.

use std::path::PathBuf;

use clap::Args;
use mana_node::daemon::status;

/// A status older than this means the node is probably not running.
const STALE_MS: u64 = 10_000;

/// Arguments of `mana status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// TOML config file of the node (`mana node --config`; for its data_dir).
    #[arg(long, env = "MANA_CONFIG")]
    pub config: Option<PathBuf>,
    /// The node's data directory.
    #[arg(long, env = "MANA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `mana status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let file: super::node::NodeArgs = crate::config::load_file(args.config.as_deref())?;
    let data_dir = args
        .data_dir
        .or(file.net.data_dir)
        .unwrap_or_else(|| super::node::DEFAULT_DATA_DIR.into());
    let s = status::read(&data_dir)?;
    let age_ms = mana_node::daemon::now_ms().saturating_sub(s.updated_unix_ms);
    if args.json {
        let mut value = serde_json::to_value(&s)?;
        value["age_ms"] = serde_json::json!(age_ms);
        value["stale"] = serde_json::json!(age_ms > STALE_MS);
        println!("{value}");
        return Ok(());
    }
    if age_ms > STALE_MS {
        println!(
            "warning: status is {} s old; the node may not be running",
            age_ms / 1000
        );
    }
    println!(
        "node {} ({}, pid {}), run {}",
        s.peer_id, s.agent, s.pid, s.run
    );
    println!(
        "  key {}{}",
        s.public_key,
        if s.coordinator.is_some() {
            " (what nodes pass as --coordinator)"
        } else {
            ""
        }
    );
    for addr in &s.listen_addrs {
        println!("  listening on {addr}");
    }
    if let Some(url) = &s.dashboard {
        println!("  dashboard: {url}");
    }
    println!(
        "peers: {} connected, {} in the DHT routing table",
        s.peers.len(),
        s.routing_table_size
    );
    match s.store_quota {
        Some(quota) => println!(
            "store: {} of blobs, quota {}",
            bytes(s.store_bytes),
            bytes(quota)
        ),
        None => println!("store: {} of blobs", bytes(s.store_bytes)),
    }
    println!(
        "DHT: announcing {} blobs, holding {} provider records of other peers",
        s.dht_provided, s.dht_provider_records
    );
    for p in &s.peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.1} ms"))
            .unwrap_or_else(|| "-".into());
        let score = p
            .gossip_score
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {}  rtt {rtt}  score {score}  {}",
            p.peer_id,
            p.agent.as_deref().unwrap_or("")
        );
    }
    println!(
        "hosted experts: {}",
        if s.hosted_experts.is_empty() {
            "none".into()
        } else {
            s.hosted_experts.join(", ")
        }
    );
    let round = |r: Option<u64>| r.map(|r| r.to_string()).unwrap_or_else(|| "none".into());
    println!(
        "current round: {}, stored round: {}",
        round(s.current_round),
        round(s.stored_round)
    );
    println!("stored shards: {}", s.stored_shards.len());
    for shard in &s.stored_shards {
        println!(
            "  {}  {} bytes  {}",
            shard.shard,
            shard.bytes,
            &shard.hash[..16.min(shard.hash.len())]
        );
    }
    if !s.sync.is_empty() {
        println!("sync: {}", s.sync);
    }
    if let Some(hash) = &s.manifest_hash {
        println!("stored manifest: {hash}");
    }
    if let Some(t) = &s.training {
        let round = t
            .applied_round
            .map(|r| r.to_string())
            .unwrap_or_else(|| "none".into());
        println!(
            "training: {} rounds trained ({} missed: taken up past their deadline), {} deltas sent ({} bytes), applied round {round}, shard hashes {} matched / {} mismatched",
            t.rounds_trained,
            t.rounds_missed,
            t.deltas_sent,
            t.delta_bytes_sent,
            t.hash_matches,
            t.hash_mismatches
        );
        if let Some(loss) = t.last_train_loss {
            println!("  last training loss: {loss:.4}");
        }
        println!("  now: {}", t.activity);
        println!(
            "  published scores recomputed: {} true / {} false",
            t.scores_checked, t.score_mismatches
        );
        if let Some(last) = &t.last_score_mismatch {
            println!("  FALSE SCORE: {last}");
        }
        println!(
            "  judged: {} shards attested, {} deltas ({} fetched ahead, while their round trained), {} judging(s) given up (the round committed first); commits audited: {} contradicted / {} dropped a quorum; {} judge(s) signed two judgments; {} call(s) refused (a forged norm history, or judges not drawn)",
            t.shards_attested,
            t.deltas_judged,
            t.deltas_prefetched,
            t.judgings_given_up,
            t.quorums_contradicted,
            t.quorums_dropped,
            t.judges_equivocated,
            t.calls_refused
        );
        if let Some(last) = &t.last_audit_finding {
            println!("  last audit finding: {last}");
        }
        if let Some(why) = &t.halted {
            println!("  STOPPED: {why}");
        }
        if let Some(r) = &t.refused_commit {
            println!(
                "  REFUSED the commit of round {} ({}), {} dispute(s) published:",
                r.round, r.commit, r.disputes_published
            );
            for shard in &r.shards {
                println!(
                    "    {}: committed {}, computed {} from {} accepted delta(s)",
                    shard.shard, shard.committed, shard.computed, shard.accepted
                );
            }
        }
        if t.rounds_declined > 0 {
            println!("  rounds declined since stopping: {}", t.rounds_declined);
        }
        print_contributions(&t.contributions);
    }
    for e in &s.equivocations {
        println!(
            "COORDINATOR EQUIVOCATED in round {}: commits {} and {} (signed envelopes kept in the store: {})",
            e.round,
            e.first_commit,
            e.second_commit,
            e.evidence.join(", ")
        );
    }
    if s.disputes_heard > 0 {
        println!(
            "commit disputes heard: {} (holders say a commit's shard hash is wrong)",
            s.disputes_heard
        );
    }
    if let Some(c) = &s.coordinator {
        print_coordinator(c);
    }
    if let Some(e) = &s.evaluator {
        let last = match (e.last_round, e.last_val_loss) {
            (Some(r), Some(v)) => format!(", last round {r}: validation loss {v:.4}"),
            _ => String::new(),
        };
        println!("evaluator: {} checkpoints evaluated{last}", e.evaluated);
        if let Some(r) = e.exported_round {
            println!("  model of round {r} exported");
        }
        if let Some(err) = &e.last_error {
            println!("  last not evaluated: {err}");
        }
    }
    println!(
        "traffic since start: gossip {} in, {} out; transfers {} in, {} out",
        bytes(s.traffic.gossip_in),
        bytes(s.traffic.gossip_out),
        bytes(s.traffic.fetch_in),
        bytes(s.traffic.fetch_out)
    );
    println!(
        "gossip since start: {} accepted, {} rejected, {} ignored, {} rate-limited",
        s.accepted_messages, s.rejected_messages, s.ignored_messages, s.rate_limited_messages
    );
    println!("rejected messages (all time): {}", s.rejections.total);
    for (reason, count) in &s.rejections.by_reason {
        println!("  {reason}: {count}");
    }
    for peer in s.rejections.by_peer.iter().take(10) {
        println!("  from {}: {}", peer.peer, peer.total);
    }
    let more = s.rejections.by_peer.len().saturating_sub(10) as u64 + s.rejections.other_peers;
    if more > 0 {
        println!("  and {more} more peers");
    }
    Ok(())
}

/// A byte count for people: B, KB, MB, GB (powers of 1000).
fn bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// What became of a trainer's deltas: totals, refusals by reason, its share, the last rounds.
fn print_contributions(c: &status::Contributions) {
    let sent = c.accepted + c.refused + c.unaccounted;
    if sent == 0 {
        println!("  contributions: no commit has judged this node's deltas yet");
        return;
    }
    println!(
        "  contributions: {} accepted, {} refused, {} not in a commit (late or no commit)",
        c.accepted, c.refused, c.unaccounted
    );
    for (reason, n) in &c.refused_by_reason {
        println!("    refused {reason}: {n}");
    }
    if let Some(share) = c.share() {
        println!(
            "  share of the run's accepted deltas since start: {:.1}% ({} of {})",
            100.0 * share,
            c.accepted,
            c.run_accepted
        );
    }
    for r in c.recent.iter().rev().take(5) {
        let refused: Vec<String> = r
            .refused
            .iter()
            .map(|(shard, why)| format!("{shard} {why}"))
            .collect();
        let refused = if refused.is_empty() {
            String::new()
        } else {
            format!("; refused: {}", refused.join(", "))
        };
        println!(
            "    round {}: {} sent, {} accepted{refused}",
            r.round, r.sent, r.accepted
        );
    }
}

/// The coordinator's view: phase, members and their records, settings, last commits.
fn print_coordinator(c: &status::CoordinatorStatus) {
    let round = |r: Option<u64>| r.map(|r| r.to_string()).unwrap_or_else(|| "none".into());
    let phase = if c.phase == "waiting-for-members" {
        format!("waiting for members: {} of {}", c.members, c.min_members)
    } else {
        c.phase.clone()
    };
    println!(
        "coordinator: round {} ({phase}), {} members, committed round {}, {} deltas accepted, {} rejected",
        round(c.round),
        c.members,
        round(c.committed_round),
        c.accepted_deltas,
        c.rejected_deltas
    );
    if let Some(loss) = c.val_loss {
        println!("  validation loss: {loss:.4}");
    }
    if let Some(hash) = &c.checkpoint {
        println!("  checkpoint: {hash}");
    }
    if !c.settings.is_empty() {
        let settings: Vec<String> = c.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  settings: {}", settings.join(" "));
    }
    if c.banned > 0 || c.not_admitted > 0 {
        println!(
            "  banned keys: {}, heartbeats not admitted: {}",
            c.banned, c.not_admitted
        );
    }
    if c.failures > 0 {
        println!(
            "  round steps failed and retried or left out: {} (see the log)",
            c.failures
        );
    }
    if !c.standings.is_empty() {
        println!("  members (accepted / refused for a fault / missed, reputation):");
        let mut standings: Vec<&status::MemberStanding> = c.standings.iter().collect();
        standings.sort_by_key(|m| (!m.member, std::cmp::Reverse(m.accepted)));
        for m in standings {
            println!(
                "    {}  {} / {} / {}  rep {}{}{}",
                m.node,
                m.accepted,
                m.faults,
                m.missed,
                m.reputation,
                m.address
                    .as_ref()
                    .map(|a| format!("  from {a}"))
                    .unwrap_or_default(),
                if m.member { "" } else { "  (departed)" }
            );
        }
    }
    for commit in c.recent_commits.iter().rev().take(5) {
        let loss = commit
            .val_loss
            .map(|l| format!(", val loss {l:.4}"))
            .unwrap_or_default();
        println!(
            "  committed round {}: {} accepted, {} refused{loss}, checkpoint {}",
            commit.round,
            commit.accepted,
            commit.refused,
            &commit.checkpoint[..16.min(commit.checkpoint.len())]
        );
    }
}
