//! The settings that the network processes (`mana node`, `mana coordinator`, `mana bootstrap`) share, declared
//! once and flattened into each command (`#[command(flatten)]`, and taken from its TOML file by the same
//! names): the config file itself, the log format, where to listen, where the data and key live, the
//! network limits; and for the two that join a run, the bootstrap nodes and the run.

use std::path::PathBuf;

use clap::Args;
use mana_node::daemon::config::parse_addrs;
use mana_node::net::libp2p::Multiaddr;
use mana_node::net::{Limits, NetConfig};
use serde::Deserialize;

use crate::config::Layered;
use crate::logging::LogFormat;

/// Settings of every network process.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetArgs {
    /// TOML file of settings: each flag's name with `_` for `-` (e.g. `data_dir`), and a [limits] table;
    /// unknown keys are refused. Flags and MANA_* variables win over it.
    #[arg(long, env = "MANA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log lines on stderr: text, or json (one object per line). Default text.
    #[arg(long, env = "MANA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1; default
    /// TCP and QUIC on port 4001.
    #[arg(long, env = "MANA_LISTEN", value_delimiter = ',')]
    pub listen: Option<Vec<String>>,
    /// Data directory (the key by default; the store and status.json for a node or coordinator).
    #[arg(long, env = "MANA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Key file; default <data dir>/node.key (bootstrap.key for a bootstrap). A missing one is created (mode
    /// 0600) only on a first start with the default file, or with --new-key.
    #[arg(long, env = "MANA_KEY")]
    pub key: Option<PathBuf>,
    /// Create the key file if it is missing, even one named with --key or missing beside an existing store
    /// (a new identity; MANA_NEW_KEY: 1, true, yes, on or 0, false, no, off). Never read from the file.
    #[arg(long, env = "MANA_NEW_KEY", value_parser = crate::config::parse_bool)]
    #[serde(skip)]
    pub new_key: bool,
    /// TCP port of blob lanes (direct, AES-sealed transfers of checkpoint shards to peers; see the operator
    /// guide), or off. Default: the TCP listen port + 1 (4002), any free port when listening on port 0.
    #[arg(long, env = "MANA_BLOB_LANE_PORT")]
    pub blob_lane_port: Option<String>,
    /// Network size and rate limits: only in the file, as a [limits] table.
    #[arg(skip)]
    pub limits: Option<Limits>,
}

/// Settings of a process that joins a run (a node, a coordinator).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinArgs {
    /// Bootstrap node to join through, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "MANA_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Option<Vec<String>>,
    /// The training run (names the gossip topics).
    #[arg(long, env = "MANA_RUN")]
    pub run: Option<String>,
    /// Serve a live web page of this node's state, contributions, loss curve, peers and traffic at this
    /// address (IP:PORT; keep it on 127.0.0.1: it has no login).
    #[arg(long, env = "MANA_DASHBOARD")]
    pub dashboard: Option<String>,
    /// Most bytes of blobs (shards, payloads) the store may hold; past it new blobs are refused with a clear
    /// error until old rounds are collected. Default: as much as the disk holds.
    #[arg(long, env = "MANA_STORE_QUOTA")]
    pub store_quota: Option<u64>,
}

/// The `--dashboard` address of [`JoinArgs`], layered and parsed.
pub fn dashboard_addr(layers: &Layered<&JoinArgs>) -> anyhow::Result<Option<std::net::SocketAddr>> {
    layers
        .get(|a| &a.dashboard)
        .map(|text| {
            text.parse()
                .map_err(|e| anyhow::anyhow!("--dashboard {text}: not an IP:PORT address ({e})"))
        })
        .transpose()
}

/// The default listen addresses: TCP and QUIC on port 4001, all interfaces.
pub fn default_listen() -> Vec<String> {
    vec![
        "/ip4/0.0.0.0/tcp/4001".into(),
        "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
    ]
}

/// True when every address is on loopback (a local test net: DHT server mode, no co-location penalty).
pub fn all_loopback(addrs: &[String]) -> bool {
    !addrs.is_empty()
        && addrs
            .iter()
            .all(|a| a.starts_with("/ip4/127.") || a.starts_with("/ip6/::1/"))
}

/// [`NetArgs`] with every layer applied (flag > environment > file > default).
#[derive(Debug, Clone)]
pub struct Net {
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The key file, when not the data directory's default.
    pub key: Option<PathBuf>,
    /// Whether a missing key file may be created wherever it is (`--new-key`).
    pub new_key: bool,
    /// The listen addresses.
    pub listen: Vec<Multiaddr>,
    /// True when they are all on loopback.
    pub loopback: bool,
    /// The file's limits, if it has any.
    pub limits: Option<Limits>,
    /// The blob lane port (`None`: no lanes).
    pub blob_lane_port: Option<u16>,
}

impl Net {
    /// Resolves the layers; `default_data_dir` is the command's.
    pub fn resolve(layers: &Layered<&NetArgs>, default_data_dir: &str) -> anyhow::Result<Net> {
        let listen = layers.get(|a| &a.listen).unwrap_or_else(default_listen);
        Ok(Net {
            log_format: layers.get(|a| &a.log_format).unwrap_or_default(),
            data_dir: layers
                .get(|a| &a.data_dir)
                .unwrap_or_else(|| default_data_dir.into()),
            key: layers.get(|a| &a.key),
            new_key: layers.flags.new_key,
            loopback: all_loopback(&listen),
            listen: parse_addrs(&listen)?,
            limits: layers.get(|a| &a.limits),
            blob_lane_port: match layers.get(|a| &a.blob_lane_port) {
                None => default_lane_port(&parse_addrs(&listen)?),
                Some(text) => parse_lane_port(&text)?,
            },
        })
    }

    /// Sets the listen addresses, the limits and, on loopback, trust in co-located peers.
    pub fn apply(&self, net: &mut NetConfig) {
        net.listen = self.listen.clone();
        if let Some(limits) = &self.limits {
            net.limits = limits.clone();
        }
        net.trust_colocated_ips = self.loopback;
        net.blob_lane_port = self.blob_lane_port;
    }
}

/// `--blob-lane-port`: a port, or `off`.
fn parse_lane_port(text: &str) -> anyhow::Result<Option<u16>> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("--blob-lane-port {text}: not a port (0 to 65535) or off"))
}

/// The default blob lane port: the first TCP listen port + 1, or 0 (any) when that port is 0 or the last.
fn default_lane_port(listen: &[Multiaddr]) -> Option<u16> {
    use mana_node::net::libp2p::multiaddr::Protocol;
    let tcp = listen.iter().find_map(|addr| {
        addr.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
    });
    Some(
        tcp.and_then(|port| (port != 0).then(|| port.checked_add(1)).flatten())
            .unwrap_or(0),
    )
}

/// The bootstrap addresses of [`JoinArgs`], layered and parsed (none by default).
pub fn bootstrap_addrs(layers: &Layered<&JoinArgs>) -> anyhow::Result<Vec<Multiaddr>> {
    Ok(parse_addrs(
        &layers.get(|a| &a.bootstrap).unwrap_or_default(),
    )?)
}

/// Completes on ctrl-c or SIGTERM, logging that `role` (node, coordinator, bootstrap) is shutting down.
pub async fn shutdown_signal(role: &'static str) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("{role} shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_port_is_a_port_or_off_and_defaults_next_to_the_listen_port() {
        assert_eq!(parse_lane_port("4002").expect("a port"), Some(4002));
        assert_eq!(parse_lane_port("OFF").expect("off"), None);
        let err = parse_lane_port("70000").expect_err("out of range");
        assert!(err.to_string().contains("--blob-lane-port 70000"), "{err}");
        assert!(parse_lane_port("").is_err());
        let addrs = |list: &[&str]| -> Vec<Multiaddr> {
            list.iter().map(|a| a.parse().expect("multiaddr")).collect()
        };
        assert_eq!(
            default_lane_port(&addrs(&[
                "/ip4/0.0.0.0/udp/4001/quic-v1",
                "/ip4/0.0.0.0/tcp/4001"
            ])),
            Some(4002)
        );
        assert_eq!(
            default_lane_port(&addrs(&["/ip4/127.0.0.1/tcp/0"])),
            Some(0)
        );
        assert_eq!(
            default_lane_port(&addrs(&["/ip4/127.0.0.1/tcp/65535"])),
            Some(0)
        );
        assert_eq!(
            default_lane_port(&addrs(&["/ip4/127.0.0.1/udp/9/quic-v1"])),
            Some(0)
        );
    }
}
