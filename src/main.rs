//! `mana`: one binary for every role in the network (node, coordinator, bootstrap, client) and for local
//! work (training on one machine, sampling text). Each subcommand lives in `cmd/` and only calls a library
//! crate; this file parses the command line and reports errors. Settings are layered by `config`, logging
//! is set up by `logging` (each command picks its log format).

mod cmd;
mod config;
mod logging;

use std::process::ExitCode;

use clap::Parser;

/// Train one Mixture-of-Experts language model on many people's GPUs, over a peer-to-peer network.
#[derive(Debug, Parser)]
#[command(name = "mana", version, about, long_about = None)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    return_freed_memory();
    let cli = Cli::parse();
    if cli.command.only_prints() {
        end_quietly_on_a_closed_pipe();
    }
    match cmd::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line (see [`mana_node::net::error_chain`]).
fn one_line(e: &anyhow::Error) -> String {
    let line = mana_node::net::error_chain(e.as_ref());
    if line.is_empty() {
        "failed, with no reason given".to_owned()
    } else {
        line
    }
}

/// Makes glibc's allocator give freed memory back, so a long-running role's resident memory follows what it
/// holds. By default glibc keeps one heap arena per thread (up to 8 per core) and raises its mmap threshold
/// after each large free, so the training buffers of every round end up in heaps it never returns: in a
/// 4-minute demo (222 rounds) a node grew from 120 to 194 MiB and the coordinator from 290 to 365 MiB. With
/// two arenas and large blocks always mapped (and unmapped when freed), the same run measured 66 to 104 MiB
/// and 69 to 91 MiB at the same speed (`.ci/soak.py`; the rest is the DHT's provider records, capped).
/// Environment variables (`MALLOC_ARENA_MAX`...) still override these when an operator sets them.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
        const SET: [(i32, &str); 3] = [
            (M_ARENA_MAX, "MALLOC_ARENA_MAX"),
            (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
            (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
        ];
        for (param, env) in SET {
            if std::env::var_os(env).is_some() {
                continue;
            }
            let value = if param == M_ARENA_MAX { 2 } else { 256 * 1024 };
            // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any thread.
            unsafe { mallopt(param, value) };
        }
    }
}

/// A command that only prints (`mana status | head -3`) ends as `cat` does when its reader goes away,
/// instead of panicking in `println!`. The network processes keep Rust's default (SIGPIPE ignored): a peer
/// that closes a socket must never end them.
fn end_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    {
        use nix::sys::signal::{SigHandler, Signal, signal};
        // SAFETY: called before any other thread exists; SIG_DFL installs no handler of ours.
        let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("")]
    struct Blank;

    #[derive(Debug, thiserror::Error)]
    #[error("listen on /ip4/127.0.0.1/udp/9/quic-v1 failed")]
    struct Outer(#[source] Blank);

    #[derive(Debug, thiserror::Error)]
    #[error("store I/O error at /d: {0}")]
    struct Quoting(#[source] std::io::Error);

    /// The example unit in the operator guide: its sections and keys are systemd's, and its ExecStart is a
    /// command line mana accepts.
    #[test]
    fn the_systemd_unit_starts_a_valid_command() {
        let unit = include_str!("../docs/systemd/mana-node.service");
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in unit.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            assert!(!section.is_empty(), "{key} outside a section");
            keys.push((section.clone(), key.to_owned(), value.to_owned()));
        }
        let has = |s: &str, k: &str| keys.iter().any(|(a, b, _)| a == s && b == k);
        for (s, k) in [
            ("Unit", "Description"),
            ("Service", "ExecStart"),
            ("Service", "User"),
            ("Install", "WantedBy"),
        ] {
            assert!(has(s, k), "[{s}] {k} missing");
        }
        let exec = &keys
            .iter()
            .find(|(_, k, _)| k == "ExecStart")
            .expect("ExecStart")
            .2;
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert!(args[0].ends_with("/mana"), "{exec}");
        let cli = Cli::try_parse_from(std::iter::once("mana").chain(args[1..].iter().copied()))
            .unwrap_or_else(|e| panic!("ExecStart is not a valid mana command: {e}"));
        assert!(matches!(cli.command, cmd::Command::Node(_)));
    }

    #[test]
    fn causes_join_on_one_line_without_blanks_or_repeats() {
        let e = anyhow::Error::new(Outer(Blank));
        assert_eq!(
            one_line(&e),
            "listen on /ip4/127.0.0.1/udp/9/quic-v1 failed"
        );
        let e = anyhow::Error::new(Quoting(std::io::Error::other("disk full")))
            .context("saving round 3");
        assert_eq!(
            one_line(&e),
            "saving round 3: store I/O error at /d: disk full"
        );
    }
}
