//! Whether a trainer hears its coordinator. A node given a mistyped `--run` or `--coordinator` hears nothing
//! that it accepts and used to wait forever without a word; after a coordinator's last round (or its crash),
//! nodes went on showing "round 90: applied". The watch turns both into a plain sentence, in the log once
//! per silence and in the status for as long as it lasts.

use std::time::{Duration, Instant};

/// What the watch has to say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Silence {
    /// The coordinator was heard recently enough, or its round is still in progress.
    Heard,
    /// Nothing from the coordinator since start, for this long.
    NeverHeard(Duration),
    /// The coordinator's heartbeats arrive (right key, right run) but it announced no round for this long:
    /// it waits for enough members.
    Waiting(Duration),
    /// Nothing since its last announcement or commit (of round `round`), for this long.
    Silent {
        /// The last round heard of.
        round: u64,
        /// Time since the last message past the round's own commit deadline.
        for_: Duration,
    },
}

/// Tracks the coordinator's last message and the round's deadline.
#[derive(Debug)]
pub struct CoordinatorWatch {
    started: Instant,
    after: Duration,
    last: Option<(Instant, u64)>,
    /// The coordinator's last heartbeat.
    alive: Option<Instant>,
    /// Until this instant the coordinator is expected to be quiet (the round's commit deadline).
    quiet_until: Option<Instant>,
    said: bool,
}

impl CoordinatorWatch {
    /// A watch that speaks after `after` without a word from the coordinator (beyond a round's deadline).
    pub fn new(now: Instant, after: Duration) -> Self {
        Self {
            started: now,
            after,
            last: None,
            alive: None,
            quiet_until: None,
            said: false,
        }
    }

    /// The coordinator announced or committed `round`; `quiet_for` is how long until its commit deadline.
    pub fn heard(&mut self, now: Instant, round: u64, quiet_for: Duration) {
        self.last = Some((now, round));
        self.quiet_until = Some(now + quiet_for);
        self.said = false;
    }

    /// A heartbeat of the coordinator arrived: it is up, on this run, under this key.
    pub fn alive(&mut self, now: Instant) {
        self.alive = Some(now);
    }

    /// The state now.
    pub fn check(&self, now: Instant) -> Silence {
        match self.last {
            None => {
                let waited = now.saturating_duration_since(self.started);
                let up = self
                    .alive
                    .is_some_and(|a| now.saturating_duration_since(a) < self.after);
                match (waited >= self.after, up) {
                    (false, _) => Silence::Heard,
                    (true, true) => Silence::Waiting(waited),
                    (true, false) => Silence::NeverHeard(waited),
                }
            }
            Some((at, round)) => {
                let from = self.quiet_until.map_or(at, |q| q.max(at));
                let silent = now.saturating_duration_since(from);
                if silent >= self.after {
                    Silence::Silent {
                        round,
                        for_: silent,
                    }
                } else {
                    Silence::Heard
                }
            }
        }
    }

    /// True the first time a silence is seen (until the coordinator is heard again): log it once.
    pub fn first_time(&mut self) -> bool {
        !std::mem::replace(&mut self.said, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_said_after_the_wait_and_past_the_round_deadline() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = CoordinatorWatch::new(t0, s(60));
        assert_eq!(w.check(t0 + s(59)), Silence::Heard);
        assert_eq!(w.check(t0 + s(61)), Silence::NeverHeard(s(61)));
        // Its heartbeats arrive: it is up, and waits (for members).
        w.alive(t0 + s(50));
        assert_eq!(w.check(t0 + s(61)), Silence::Waiting(s(61)));
        assert_eq!(
            w.check(t0 + s(111)),
            Silence::NeverHeard(s(111)),
            "its heartbeats stopped too"
        );
        assert!(w.first_time());
        assert!(!w.first_time(), "said once");
        // A round of 100 s: quiet until its deadline, silent 60 s after it.
        w.heard(t0 + s(70), 4, s(100));
        assert!(w.first_time(), "a new silence is said again");
        assert_eq!(w.check(t0 + s(200)), Silence::Heard);
        assert_eq!(
            w.check(t0 + s(240)),
            Silence::Silent {
                round: 4,
                for_: s(70)
            }
        );
    }
}
