//! `mana demo --chaos`: crashes while training. At random moments (drawn from the chaos seed) a child is
//! killed with SIGKILL, as a power cut or an OOM kill would, and started again a moment later with the same
//! data directory and flags. [`ChaosMode::Mixed`] kills training nodes, the coordinator once and the bootstrap
//! once; [`ChaosMode::Coordinator`] kills only the coordinator, once per committed round at a random
//! moment of the next one (the kill loop of the liveness tests: a coordinator killed faster than it can
//! finish a round would never commit again, which says nothing about how it recovers). Every kill and restart is printed on the live line; the summary
//! says what was done, and the run's usual checks (rounds committed, deltas accepted, the loss curve, the
//! holders' manifests agreeing) show that training went on.
//!
//! Kills stop a few rounds before the end (or at three quarters of `--minutes`), so that every process
//! holds the final round when the demo compares them.

use std::time::{Duration, Instant};

use mana_kernels::rng::SplitMix64;

use crate::network::Network;
use crate::progress::Progress;
use crate::supervise::{ChildId, Supervisor};
use crate::{DemoError, Stop};

/// Which children chaos kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChaosMode {
    /// Training nodes at random, the coordinator once (after round 2) and the bootstrap once (after round 3).
    Mixed,
    /// Only the coordinator: once per committed round, at a random moment of the next one.
    Coordinator,
}

/// Chaos settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosConfig {
    /// Which children are killed.
    pub mode: ChaosMode,
    /// Seed of the moments and victims.
    pub seed: u64,
}

/// Rounds before the end in which nothing is killed.
const QUIET_ROUNDS: u64 = 3;

/// One kill.
#[derive(Debug, Clone)]
struct Kill {
    name: String,
    round: u64,
}

/// The chaos of one demo run.
pub struct Chaos {
    cfg: ChaosConfig,
    rng: SplitMix64,
    next_kill: Instant,
    /// Killed children and when they start again.
    pending: Vec<(ChildId, Instant)>,
    coordinator_killed: bool,
    bootstrap_killed: bool,
    kills: Vec<Kill>,
    restarts: u64,
    /// Rounds committed when the last kill came ([`ChaosMode::Coordinator`] waits for a commit after each
    /// restart, so that the run always moves on).
    committed_at_kill: Option<u64>,
    /// Rounds committed at the last step.
    committed_seen: u64,
}

impl Chaos {
    /// Chaos starting now (the first kill comes after the first commit).
    pub fn new(cfg: ChaosConfig) -> Chaos {
        let mut chaos = Chaos {
            cfg,
            rng: SplitMix64(cfg.seed ^ 0xC4A0_5C4A_05C4_A05C),
            next_kill: Instant::now(),
            pending: Vec::new(),
            coordinator_killed: false,
            bootstrap_killed: false,
            kills: Vec::new(),
            restarts: 0,
            committed_at_kill: None,
            committed_seen: 0,
        };
        chaos.next_kill = Instant::now() + chaos.pause();
        chaos
    }

    /// Whether `id` is down on purpose (killed, its restart pending).
    pub fn is_down(&self, id: ChildId) -> bool {
        self.pending.iter().any(|(p, _)| *p == id)
    }

    /// A uniform draw in `[lo, hi)` seconds.
    fn uniform(&mut self, lo: f64, hi: f64) -> Duration {
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * unit)
    }

    /// Time until the next kill.
    fn pause(&mut self) -> Duration {
        match self.cfg.mode {
            ChaosMode::Mixed => self.uniform(2.0, 8.0),
            ChaosMode::Coordinator => self.uniform(0.3, 3.0),
        }
    }

    /// Time a killed child stays down.
    fn downtime(&mut self) -> Duration {
        match self.cfg.mode {
            ChaosMode::Mixed => self.uniform(0.5, 4.0),
            ChaosMode::Coordinator => self.uniform(0.2, 1.5),
        }
    }

    /// Whether kills are over: the last rounds (or the last quarter of the time) run undisturbed.
    fn winding_down(stop: Stop, committed: u64, elapsed: Duration) -> bool {
        match stop {
            Stop::Rounds(planned) => committed + QUIET_ROUNDS >= planned,
            Stop::Time(d) => elapsed >= d.mul_f64(0.75),
        }
    }

    /// Restarts what is due, and kills the next victim when its moment has come. `committed` is the number of
    /// rounds committed so far.
    pub fn step(
        &mut self,
        sup: &mut Supervisor,
        net: &Network,
        progress: &Progress,
        stop: Stop,
        committed: u64,
        elapsed: Duration,
    ) -> Result<(), DemoError> {
        let now = Instant::now();
        let winding_down = Self::winding_down(stop, committed, elapsed);
        let due: Vec<ChildId> = self
            .pending
            .iter()
            .filter(|(_, at)| winding_down || *at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.pending.retain(|(p, _)| *p != id);
            let pid = sup.restart(id)?;
            self.restarts += 1;
            progress.note(&format!("chaos: {} restarted (pid {pid})", sup.name(id)));
        }
        if self.cfg.mode == ChaosMode::Coordinator && committed > self.committed_seen {
            // A round was just committed: the next kill comes at a random moment of the next round (its
            // cooldown, announcement, training, verification, aggregation or commit), and only one per round,
            // or a coordinator killed faster than it can finish a round would never commit again.
            self.next_kill = now + self.uniform(0.05, 2.5);
        }
        self.committed_seen = committed;
        let waiting_for_a_commit = self.cfg.mode == ChaosMode::Coordinator
            && self.committed_at_kill.is_some_and(|k| committed <= k);
        if winding_down || committed == 0 || waiting_for_a_commit || now < self.next_kill {
            return Ok(());
        }
        self.next_kill = now + self.pause();
        let Some(victim) = self.victim(net, committed) else {
            return Ok(());
        };
        if sup.exit_status(victim).is_some() {
            // Ended by itself (the coordinator after its last round): not ours to kill or restart.
            return Ok(());
        }
        let Some(pid) = sup.kill(victim) else {
            return Ok(());
        };
        let down = self.downtime();
        self.committed_at_kill = Some(committed);
        self.pending.push((victim, now + down));
        let name = sup.name(victim).to_owned();
        progress.note(&format!(
            "chaos: killed {name} (pid {pid}, SIGKILL) after round {committed}; restarting it in {:.1} s",
            down.as_secs_f64()
        ));
        self.kills.push(Kill {
            name,
            round: committed,
        });
        Ok(())
    }

    /// The next child to kill, or `None` when every candidate is already down.
    fn victim(&mut self, net: &Network, committed: u64) -> Option<ChildId> {
        if self.cfg.mode == ChaosMode::Coordinator {
            return (!self.is_down(net.coordinator)).then_some(net.coordinator);
        }
        if !self.coordinator_killed && committed >= 2 && !self.is_down(net.coordinator) {
            self.coordinator_killed = true;
            return Some(net.coordinator);
        }
        if !self.bootstrap_killed && committed >= 3 && !self.is_down(net.bootstrap) {
            self.bootstrap_killed = true;
            return Some(net.bootstrap);
        }
        let up: Vec<ChildId> = net
            .nodes
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| !self.is_down(*id))
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[(self.rng.next_u64() % up.len() as u64) as usize])
    }

    /// Starts every child still down (at the end of the run, whatever happened).
    pub fn restart_all(
        &mut self,
        sup: &mut Supervisor,
        progress: &Progress,
    ) -> Result<(), DemoError> {
        for (id, _) in std::mem::take(&mut self.pending) {
            let pid = sup.restart(id)?;
            self.restarts += 1;
            progress.note(&format!("chaos: {} restarted (pid {pid})", sup.name(id)));
        }
        Ok(())
    }

    /// What chaos did, for the summary: kills per child and the rounds they came after.
    pub fn report(&self) -> String {
        let mut by_name: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
        for k in &self.kills {
            by_name.entry(&k.name).or_default().push(k.round);
        }
        let parts: Vec<String> = by_name
            .iter()
            .map(|(name, rounds)| {
                let list: Vec<String> = rounds.iter().map(u64::to_string).collect();
                let after = if rounds.len() == 1 { "round" } else { "rounds" };
                format!(
                    "{name} x{} (after {after} {})",
                    rounds.len(),
                    list.join(", ")
                )
            })
            .collect();
        format!(
            "chaos (seed {}): {} kills with SIGKILL, {} restarts: {}",
            self.cfg.seed,
            self.kills.len(),
            self.restarts,
            if parts.is_empty() {
                "none".to_owned()
            } else {
                parts.join("; ")
            }
        )
    }

    /// How many children were killed.
    pub fn kills(&self) -> usize {
        self.kills.len()
    }
}
