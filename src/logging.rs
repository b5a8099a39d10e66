//! Where logs go and in what form: stderr, through `tracing`, filtered by `RUST_LOG` (default `info`), as
//! text for people or one JSON object per line for log collectors (`--log-format json`). Stdout stays free
//! for a command's own output (JSON for machines, text for people).

use serde::Deserialize;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`, `message` and the event's fields at the
    /// top level, plus `span` and `spans` when inside spans.
    Json,
}

impl LogFormat {
    /// The value that selects this format on the command line (`--log-format <value>`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Starts logging for the rest of the process. Called once, when the command knows its format; a second
/// call changes nothing.
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // Without RUST_LOG: info, less the DHT's warning that it has no peer to bootstrap from, which it logs at
    // every start before the first connection (a bootstrap node's own included) and means nothing then.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,libp2p_kad::behaviour=error"));
    // Colour only for a person at a terminal: redirected to a file, escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a subscriber is already set: then the first one stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
