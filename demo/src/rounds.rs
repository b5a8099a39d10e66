//! Following the run: the coordinator's metrics lines as they are committed, each passed on to
//! `metrics.jsonl` with the demo's own keys (elapsed time, round time, each node's counters), shown live, and
//! drawn into `loss.svg`; meanwhile watching the children, and deciding when the run is over or stuck.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mana_node::daemon::NodeStatus;

use crate::chaos::Chaos;
use crate::metrics::{self, RoundMetrics, Tail};
use crate::network::Network;
use crate::output::{self, MetricsFile, OutDir};
use crate::progress::{Progress, human_bytes};
use crate::status;
use crate::supervise::Supervisor;
use crate::{DemoConfig, DemoError, Stop};

/// How long the first round may take to be committed (nodes join, fetch the model, train).
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(300);
/// A later round may take this many times the slowest round so far (at least [`MIN_STALL`]) before the demo
/// gives up.
const STALL_FACTOR: u32 = 10;
/// The shortest stall timeout after the first round.
const MIN_STALL: Duration = Duration::from_secs(120);
/// How long the coordinator gets to finish after its last round (or after SIGTERM).
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the demo looks at the metrics file and the children.
const TICK: Duration = Duration::from_millis(200);

/// What the rounds produced.
#[derive(Debug, Default)]
pub struct Rounds {
    /// Every committed round's metrics, in order.
    pub metrics: Vec<RoundMetrics>,
    /// Per-round wall time, seconds (from commit to commit; the first from the coordinator's start).
    pub secs: Vec<f64>,
    /// Nodes that stopped during the run.
    pub nodes_lost: Vec<String>,
    /// What chaos did (`--chaos`), for the summary.
    pub chaos: Option<String>,
    /// Everything the training nodes sent on the wire (deltas, shards fetched from them, gossip), read from
    /// their status files once the last commit is applied; `None` when a node's could not be read or a
    /// node restarted (its counters start again from zero).
    pub nodes_sent: Option<u64>,
    /// Everything they received, read alike (their first download of the model included).
    pub nodes_received: Option<u64>,
}

/// Follows the coordinator's metrics until the run ends; writes `metrics.jsonl` and `loss.svg` as rounds
/// are committed.
pub fn follow(
    cfg: &DemoConfig,
    out: &OutDir,
    sup: &mut Supervisor,
    progress: &Progress,
    signals: &AtomicBool,
    net: &Network,
    started: Instant,
) -> Result<Rounds, DemoError> {
    let mut tail = Tail::new(out.coordinator_metrics());
    let mut file = MetricsFile::create(&out.file("metrics.jsonl"))?;
    let mut rounds = Rounds::default();
    let mut reported = Vec::new();
    let mut last_commit_ms = net.coordinator_started_ms;
    let mut last_progress = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut stop_asked = false;
    let title = format!("mana demo: {} nodes, {} rule", cfg.nodes, cfg.rule);
    let mut chaos = cfg.chaos.map(Chaos::new);
    loop {
        if signals.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        if let Some(chaos) = chaos.as_mut() {
            let committed = rounds.metrics.len() as u64;
            chaos.step(sup, net, progress, cfg.stop, committed, started.elapsed())?;
        }
        for death in sup.deaths(&mut reported) {
            if death.id == net.coordinator {
                return Err(DemoError::CoordinatorStopped(Box::new(death)));
            }
            progress.note(&format!(
                "warning: {} (pid {}) {}; its log is {}",
                death.name,
                death.pid,
                death.status,
                death.log.display()
            ));
            if net.nodes.iter().any(|(id, _, _)| *id == death.id) {
                rounds.nodes_lost.push(death.name.clone());
            }
        }
        if rounds.nodes_lost.len() == net.nodes.len() {
            return Err(DemoError::AllNodesStopped(out.logs()));
        }
        let coordinator_done =
            sup.exit_status(net.coordinator).is_some() && !sup.is_down(net.coordinator);
        for text in tail.poll()? {
            let line = metrics::parse_line(&text).map_err(|source| DemoError::MetricsLine {
                path: tail.path().to_path_buf(),
                line: text.clone(),
                source,
            })?;
            let m = line.metrics;
            let secs = m.unix_ms.saturating_sub(last_commit_ms) as f64 / 1000.0;
            let secs = (m.unix_ms > 0 && secs > 0.0).then_some(secs);
            if let Some(s) = secs {
                slowest = slowest.max(Duration::from_secs_f64(s));
                last_commit_ms = m.unix_ms;
            }
            let node_views: Vec<_> = net
                .nodes
                .iter()
                .map(|(_, name, dir)| (name.as_str(), status::read(dir)))
                .collect();
            let mut raw = line.raw;
            raw.insert(
                "elapsed_s".into(),
                serde_json::json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            );
            raw.insert("round_s".into(), serde_json::json!(secs));
            raw.insert(
                "nodes".into(),
                serde_json::Value::Array(
                    node_views
                        .iter()
                        .map(|(name, view)| node_json(name, view.as_ref()))
                        .collect(),
                ),
            );
            file.append(&raw)?;
            let wire_total =
                rounds.metrics.iter().map(|r| r.payload_bytes).sum::<u64>() + m.payload_bytes;
            progress.round(&m, wire_total, secs, &node_traffic(&node_views));
            rounds.secs.push(secs.unwrap_or(0.0));
            rounds.metrics.push(m);
            out.write("loss.svg", &output::loss_svg(&rounds.metrics, &title))?;
            last_progress = Instant::now();
        }
        if coordinator_done {
            // Its last lines were written before it exited: the poll above has them.
            break;
        }
        if let Stop::Time(d) = cfg.stop {
            progress.elapsed(started.elapsed());
            if !stop_asked && started.elapsed() >= d {
                progress.phase(
                    "time is up: stopping the coordinator (the evaluator exports the last committed model)",
                );
                sup.terminate(net.coordinator);
                stop_asked = true;
                last_progress = Instant::now();
            }
        }
        let limit = if stop_asked {
            EXIT_TIMEOUT
        } else if rounds.metrics.is_empty() {
            FIRST_ROUND_TIMEOUT
        } else {
            (slowest * STALL_FACTOR).max(MIN_STALL)
        };
        if last_progress.elapsed() > limit {
            return Err(DemoError::Stalled {
                secs: limit.as_secs(),
                log: sup.log(net.coordinator).to_path_buf(),
            });
        }
        std::thread::sleep(TICK);
    }
    if let Some(mut chaos) = chaos {
        chaos.restart_all(sup, progress)?;
        rounds.chaos = Some(chaos.report());
    }
    if rounds.metrics.is_empty() {
        return Err(DemoError::NoRound(sup.log(net.coordinator).to_path_buf()));
    }
    if let Stop::Rounds(planned) = cfg.stop {
        let done = rounds.metrics.len() as u64;
        if done < planned {
            return Err(DemoError::TooFewRounds {
                done,
                planned,
                log: sup.log(net.coordinator).to_path_buf(),
            });
        }
    }
    Ok(rounds)
}

/// The sums of the training nodes' bytes sent and received, from their status files (see
/// [`Rounds::nodes_sent`]); `None` if one could not be read.
pub fn nodes_traffic(net: &Network) -> Option<(u64, u64)> {
    net.nodes
        .iter()
        .map(|(_, _, dir)| {
            status::read(dir).map(|v| (status::sent(&v.traffic), status::received(&v.traffic)))
        })
        .try_fold((0u64, 0u64), |(s, r), t| {
            t.map(|(ts, tr)| (s.saturating_add(ts), r.saturating_add(tr)))
        })
}

/// What `metrics.jsonl` records about one node at a commit.
fn node_json(name: &str, view: Option<&NodeStatus>) -> serde_json::Value {
    let Some(v) = view else {
        return serde_json::json!({ "name": name });
    };
    let t = v.training.clone().unwrap_or_default();
    serde_json::json!({
        "name": name,
        "peers": v.peers.len(),
        "applied_round": t.applied_round.or(v.stored_round),
        "rounds_trained": t.rounds_trained,
        "deltas_sent": t.deltas_sent,
        "delta_bytes_sent": t.delta_bytes_sent,
        "hash_mismatches": t.hash_mismatches,
        "score_mismatches": t.score_mismatches,
        "traffic": v.traffic,
    })
}

/// The nodes' traffic for the live line: bytes sent/received on the wire by each node whose status could be
/// read (empty when none could). Status files are rewritten every 2 s, so these trail the round by up to that.
fn node_traffic(views: &[(&str, Option<NodeStatus>)]) -> String {
    let wire: Vec<String> = views
        .iter()
        .filter_map(|(name, v)| {
            let t = &v.as_ref()?.traffic;
            Some(format!(
                "{} {}/{}",
                name.trim_start_matches("node-"),
                human_bytes(status::sent(t)),
                human_bytes(status::received(t))
            ))
        })
        .collect();
    if wire.is_empty() {
        String::new()
    } else {
        format!("  node out/in: {}", wire.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_entries_carry_the_counters_and_the_traffic() {
        let mut status = NodeStatus {
            stored_round: Some(4),
            ..NodeStatus::default()
        };
        status.traffic.gossip_out = 1500;
        status.traffic.fetch_in = 20;
        let entry = node_json("node-1", Some(&status));
        assert_eq!(entry["applied_round"], 4);
        assert_eq!(entry["traffic"]["gossip_out"], 1500);
        assert_eq!(
            node_json("node-2", None),
            serde_json::json!({ "name": "node-2" })
        );
        let line = node_traffic(&[("node-1", Some(status)), ("node-2", None)]);
        assert_eq!(line, "  node out/in: 1 1.5 KB/20 B");
    }
}
