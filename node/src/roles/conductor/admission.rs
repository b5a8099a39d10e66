//! Who may join the run: the coordinator's allowlist file, read at start and read again whenever it changes
//! (checked once a second), so an operator admits or removes a key by editing the file. Without a file the
//! run is open; either way banned keys and the member cap apply (the state machine's
//! [`mana_engine::coordinator::standing`]).
//!
//! The file: one public key per line, 64 hex digits (what `mana keygen` and a node's status print), `#` starts
//! a comment, blank lines are skipped. At most [`MAX_ALLOWLIST_BYTES`].
//!
//! Members per IP address: heartbeats are gossip, forwarded by any peer, so the address a key is counted
//! against is the one of the coordinator's own direct connection to it ([`origin_of`]; its libp2p peer id is
//! derived from the same ed25519 key). A key heard only through others is dialled ([`learn_address`]) and
//! waits: its next heartbeat, seconds later, finds the connection. A peer reachable only over a relay
//! (`/p2p-circuit`, which shows no address) waits until hole punching (dcutr) gives it a direct connection.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use libp2p::PeerId;
use mana_engine::coordinator::Origin;
use mana_protocol::PublicKey;

use crate::daemon::config::parse_public_key;
use crate::daemon::{NodeError, NodeHandle};

/// Largest allowlist file read (about 15,000 keys).
pub const MAX_ALLOWLIST_BYTES: u64 = 1 << 20;
/// How often the file's modification time is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Parses an allowlist file's text; an error names the line.
pub fn parse_allowlist(text: &str) -> Result<BTreeSet<PublicKey>, NodeError> {
    let mut keys = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let key = parse_public_key(line)
            .map_err(|e| NodeError::Config(format!("allowlist line {}: {e}", i + 1)))?;
        keys.insert(key);
    }
    Ok(keys)
}

/// Reads and parses the allowlist at `path` (bounded).
pub fn read_allowlist(path: &Path) -> Result<BTreeSet<PublicKey>, NodeError> {
    let file_err = |source| NodeError::File {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(file_err)?;
    if meta.len() > MAX_ALLOWLIST_BYTES {
        return Err(NodeError::Config(format!(
            "allowlist {} is {} bytes, more than the {MAX_ALLOWLIST_BYTES} allowed",
            path.display(),
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(file_err)?;
    parse_allowlist(&text).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
}

/// The allowlist file and when it last changed.
pub(crate) struct AllowlistFile {
    path: PathBuf,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl AllowlistFile {
    /// Reads the file for the first time: an unreadable or malformed file stops the coordinator at start.
    pub(crate) fn open(path: PathBuf) -> Result<(AllowlistFile, BTreeSet<PublicKey>), NodeError> {
        let keys = read_allowlist(&path)?;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok((
            AllowlistFile {
                path,
                modified,
                checked: Instant::now(),
            },
            keys,
        ))
    }

    /// The new list if the file changed since the last read, at most once per [`CHECK_EVERY`]. A file that
    /// became unreadable or malformed keeps the list in force (and is logged), so a half-saved edit never
    /// opens the run or empties it.
    pub(crate) fn reload_if_changed(&mut self) -> Option<BTreeSet<PublicKey>> {
        if self.checked.elapsed() < CHECK_EVERY {
            return None;
        }
        self.checked = Instant::now();
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.modified {
            return None;
        }
        self.modified = modified;
        match read_allowlist(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "allowlist reloaded");
                Some(keys)
            }
            Err(e) => {
                tracing::error!(error = %e, "allowlist not reloaded; the previous list stays in force");
                None
            }
        }
    }
}

/// Where `signer` is, as this node's direct connection to it shows, and its peer id (none if the key is not
/// an ed25519 point, which a verified signer always is).
pub(crate) fn origin_of(node: &NodeHandle, signer: &PublicKey) -> (Origin, Option<PeerId>) {
    let Ok(peer) = signer.peer_id() else {
        return (Origin::Unknown, None);
    };
    let origin = node
        .net()
        .remote_ip(&peer)
        .map_or(Origin::Unknown, Origin::Ip);
    (origin, Some(peer))
}

/// How often one peer is dialled to learn its address.
const DIAL_EVERY: Duration = Duration::from_secs(30);
/// Most peers dialled per [`DIAL_EVERY`]: a flood of keys heard only through gossip costs the coordinator at
/// most this many dials per period, never one per heartbeat.
const MAX_DIALS_PER_PERIOD: usize = 1024;

/// Which heartbeat signers were dialled lately, so each is dialled at most once per [`DIAL_EVERY`] and all of
/// them together at most [`MAX_DIALS_PER_PERIOD`] times per period.
#[derive(Default)]
pub(crate) struct DialBudget {
    dialled: std::collections::HashMap<PeerId, Instant>,
}

impl DialBudget {
    /// Whether `peer` may be dialled at `now` (and, if so, counts the dial).
    pub(crate) fn take(&mut self, peer: PeerId, now: Instant) -> bool {
        if self
            .dialled
            .get(&peer)
            .is_some_and(|at| now.saturating_duration_since(*at) < DIAL_EVERY)
        {
            return false;
        }
        if self.dialled.len() >= MAX_DIALS_PER_PERIOD {
            self.dialled
                .retain(|_, at| now.saturating_duration_since(*at) < DIAL_EVERY);
            if self.dialled.len() >= MAX_DIALS_PER_PERIOD {
                return false;
            }
        }
        self.dialled.insert(peer, now);
        true
    }
}

/// Dials `peer` (at the addresses the DHT knows) so that its next heartbeat shows where it is; a peer that is
/// connected already (over a relay) or being dialled is left alone.
pub(crate) async fn learn_address(node: &NodeHandle, peer: PeerId) {
    if let Err(e) = node.net().dial_peer(peer).await {
        tracing::debug!(%peer, error = %e, "no direct connection to a heartbeat's signer yet");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn a_signer_is_dialled_once_per_period_and_a_flood_is_capped() {
        let mut budget = super::DialBudget::default();
        let start = std::time::Instant::now();
        let one = libp2p::PeerId::random();
        assert!(budget.take(one, start));
        assert!(!budget.take(one, start + super::Duration::from_secs(5)));
        assert!(budget.take(one, start + super::DIAL_EVERY));
        let mut granted = 0;
        for _ in 0..3 * super::MAX_DIALS_PER_PERIOD {
            if budget.take(libp2p::PeerId::random(), start + super::DIAL_EVERY) {
                granted += 1;
            }
        }
        assert_eq!(
            granted,
            super::MAX_DIALS_PER_PERIOD - 1,
            "the flood is capped per period"
        );
        // A period later the budget is back.
        assert!(budget.take(libp2p::PeerId::random(), start + 3 * super::DIAL_EVERY));
    }

    use super::*;

    #[test]
    fn keys_comments_and_bad_lines() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let keys =
            parse_allowlist(&format!("# the run's members\n{a}\n\n  {b}  # alice\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&PublicKey([0x11; 32])));
        let err = parse_allowlist(&format!("{a}\nnot-a-key\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_allowlist(&"ab".repeat(31)).is_err(), "a short key");
    }

    #[test]
    fn an_edit_is_picked_up_and_a_broken_edit_keeps_the_old_list() {
        let dir = std::env::temp_dir().join(format!("mana-allowlist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("allow.txt");
        std::fs::write(&path, "11".repeat(32)).unwrap();
        let (mut file, keys) = AllowlistFile::open(path.clone()).unwrap();
        assert_eq!(keys.len(), 1);
        std::fs::write(&path, format!("{}\n{}\n", "11".repeat(32), "22".repeat(32))).unwrap();
        // Force the next check and a visible change of the modification time.
        file.checked -= CHECK_EVERY;
        file.modified = None;
        assert_eq!(file.reload_if_changed().unwrap().len(), 2);
        std::fs::write(&path, "garbage").unwrap();
        file.checked -= CHECK_EVERY;
        file.modified = None;
        assert!(file.reload_if_changed().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
