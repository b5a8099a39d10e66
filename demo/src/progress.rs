//! The demo's live output: on a terminal, a progress bar (rounds, or seconds when the run is timed) with
//! one line per committed round printed above it; otherwise plain lines on stdout, one per round, so a log
//! or a pipe gets the same information without escape codes.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::metrics::RoundMetrics;

/// Where progress goes.
#[derive(Debug)]
pub struct Progress {
    /// `Some` on a terminal.
    bar: Option<ProgressBar>,
    /// Rounds planned, when the run is counted in rounds.
    rounds: Option<u64>,
}

impl Progress {
    /// Progress towards `rounds` rounds, or towards `duration` when the run is timed.
    pub fn new(rounds: Option<u64>, duration: Option<Duration>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let (len, template) = match (rounds, duration) {
                (Some(r), _) => (r, "{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}"),
                (None, Some(d)) => (
                    d.as_secs().max(1),
                    "{elapsed_precise} [{bar:30}] {pos}/{len} s {msg}",
                ),
                (None, None) => (1, "{elapsed_precise} {msg}"),
            };
            let bar = ProgressBar::new(len);
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress { bar, rounds }
    }

    /// What the demo is doing now (start-up steps, waiting for a round).
    pub fn phase(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(text.to_owned()),
            None => println!("{text}"),
        }
    }

    /// A line that stays (a warning, a milestone).
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    /// Seconds elapsed, for a timed run's bar.
    pub fn elapsed(&self, elapsed: Duration) {
        if let (Some(bar), None) = (&self.bar, self.rounds) {
            bar.set_position(elapsed.as_secs().min(bar.length().unwrap_or(u64::MAX)));
        }
    }

    /// One committed round.
    pub fn round(&self, m: &RoundMetrics, wire_total: u64, round_secs: Option<f64>, nodes: &str) {
        let of = self.rounds.map_or_else(String::new, |r| format!("/{r}"));
        let took = round_secs.map_or_else(String::new, |s| format!("  {s:.1} s"));
        let line = format!(
            "round {}{of}  loss {}  val {}  deltas {} accepted, {} rejected  wire {} (total {}, {}){took}{nodes}",
            m.round,
            loss(m.train_loss),
            loss(m.val_loss),
            m.accepted,
            m.rejected,
            human_bytes(m.payload_bytes),
            human_bytes(wire_total),
            per_token(m.payload_bytes, m.tokens),
        );
        match &self.bar {
            Some(bar) => {
                bar.println(line);
                if self.rounds.is_some() {
                    bar.set_position(m.round);
                }
                bar.set_message(format!("val loss {}", loss(m.val_loss)));
            }
            None => println!("{line}"),
        }
    }

    /// Removes the bar (before the summary is printed).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Bytes per trained token, for the live line and the summary (`-` before any token).
pub fn per_token(bytes: u64, tokens: u64) -> String {
    if tokens == 0 {
        return "- B/token".into();
    }
    format!("{:.2} B/token", bytes as f64 / tokens as f64)
}

/// A loss with three decimals, or `-` when there is none (or it is not finite).
pub fn loss(value: Option<f32>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{:.3}", f64::from(v)),
        _ => "-".to_owned(),
    }
}

/// Bytes in B, KB, MB or GB (powers of 1000, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_naturally() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1234), "1.2 KB");
        assert_eq!(human_bytes(45_600_000), "45.6 MB");
        assert_eq!(human_bytes(7_000_000_000_000), "7000.0 GB");
    }

    #[test]
    fn losses_show_three_decimals_or_a_dash() {
        assert_eq!(loss(Some(2.5)), "2.500");
        assert_eq!(
            (loss(None), loss(Some(f32::NAN)), loss(Some(f32::INFINITY))),
            ("-".into(), "-".into(), "-".into())
        );
    }
}
