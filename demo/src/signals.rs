//! Ctrl-C, SIGTERM and SIGHUP set a flag instead of killing the demo, so that it can stop its children.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::DemoError;

/// The installed handlers: `flag` is set once one of the signals arrives; the small runtime that waits for
/// them runs as long as this is kept.
pub struct Signals {
    /// Set on Ctrl-C, SIGTERM or SIGHUP.
    pub flag: Arc<AtomicBool>,
    /// Runs the listener task; dropping it removes the handlers' task.
    _runtime: tokio::runtime::Runtime,
}

/// Installs the handlers.
pub fn install() -> Result<Signals, DemoError> {
    let flag = Arc::new(AtomicBool::new(false));
    let failed = |e| DemoError::io("starting the signal handler", e);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mana-demo-signals")
        .enable_all()
        .build()
        .map_err(failed)?;
    let set = flag.clone();
    // The listeners are registered here, before any child starts, so no signal can slip past them.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term, mut hup) = runtime
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::hangup())?,
                ))
            })
            .map_err(failed)?;
        runtime.spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            set.store(true, Ordering::SeqCst);
        });
    }
    #[cfg(not(unix))]
    runtime.spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        set.store(true, Ordering::SeqCst);
    });
    Ok(Signals {
        flag,
        _runtime: runtime,
    })
}
