//! Signals and the shutdown sequence: not ready at once, accepting for the grace period,
//! then the servers stop (their drain is bounded by `--shutdown_drain_seconds`, see
//! `api::serve`) and the models unload. A second signal exits at once.

use crate::registry::{ManagerHandle, Registry};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// How long unloading the models may take at shutdown before the process exits anyway.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The first signal starts draining (`draining` turns true); after the grace period the
/// servers stop accepting (`stop` turns true). A second signal exits at once.
pub(super) async fn sequence(
    mut signals: Signals,
    registry: Arc<Registry>,
    grace: Duration,
    draining: watch::Sender<bool>,
    stop: watch::Sender<bool>,
) {
    let first = signals.next().await;
    registry.start_draining();
    let _ = draining.send(true);
    // Logged once it is true: not ready any more.
    tracing::info!(
        signal = first,
        grace_seconds = grace.as_secs_f64(),
        "shutting down: not ready any more; still accepting during the grace period"
    );
    tokio::select! {
        () = tokio::time::sleep(grace) => {}
        second = signals.next() => exit_now(second),
    }
    tracing::info!("grace period over: refusing new connections, finishing requests in flight");
    let _ = stop.send(true);
    let second = signals.next().await;
    exit_now(second);
}

/// Once the servers have stopped: unloads every model.
pub(super) async fn unload(manager: &ManagerHandle) {
    tracing::info!("servers shut down; unloading models");
    match tokio::time::timeout(UNLOAD_TIMEOUT, manager.set_models(Vec::new())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("unloading models: {e}"),
        Err(_) => tracing::warn!("models still unloading after {UNLOAD_TIMEOUT:?}; exiting"),
    }
    tracing::info!("stopped");
}

fn exit_now(signal: &'static str) -> ! {
    tracing::warn!(signal, "second signal: exiting without draining");
    let code = match signal {
        "SIGINT" => 130,
        _ => 143,
    };
    std::process::exit(code)
}

/// SIGTERM and SIGINT, as one stream.
pub(super) struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Signals {
    pub(super) fn install() -> Signals {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle {name} ({e}); it will not drain the server");
                None
            }
        };
        Signals {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next signal's name; never resolves when neither could be installed.
    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<Signal>) {
            match signal {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => "SIGTERM",
            () = recv(&mut self.int) => "SIGINT",
        }
    }
}
