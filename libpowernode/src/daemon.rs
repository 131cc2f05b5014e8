//! Process set-up shared by every daemon entry point: logging (journald-native under systemd,
//! plain stderr otherwise), the sandbox, and the single current-thread runtime.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::paths::Paths;
use crate::sandbox::{self, Profile};
use crate::{Error, Result};

/// Initialise `tracing`. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(identifier: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // JOURNAL_STREAM is set by systemd when stderr is connected to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(layer) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer.with_syslog_identifier(identifier.to_string()))
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Apply the daemon's sandbox and build its runtime: the sandbox first, while the process has a
/// single thread, so every runtime thread inherits it.
pub fn start(profile: Profile, paths: &Paths) -> Result<tokio::runtime::Runtime> {
    let report = sandbox::apply(profile, paths)?;
    tracing::info!(
        profile = report.profile,
        landlock = %report.landlock,
        seccomp_denied = report.seccomp_denied,
        "sandbox applied"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("create runtime", "tokio", e))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("install handler", "SIGTERM", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("install handler", "SIGINT", e))?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// The tail of an on-demand daemon once its bus name is owned: tells systemd it is ready
/// (`status`), serves until `idle` has been idle for its limit or SIGTERM/SIGINT arrives, and
/// tells systemd it is stopping.
pub async fn serve_until_idle(idle: &crate::systemd::IdleTracker, status: &str) -> Result<()> {
    idle.touch();
    crate::systemd::ready(status);
    tokio::select! {
        _ = idle.wait_idle() => tracing::info!("idle, exiting"),
        r = shutdown_signal() => { r?; tracing::info!("signal, exiting"); }
    }
    crate::systemd::stopping("exiting");
    Ok(())
}

/// The shape of every daemon's `entry()`: logging under `identifier`, the node root, then `body`
/// (configuration, sandbox, runtime, serving). An error is logged with its whole chain (`{:#}`)
/// and the process exits 1.
pub fn main<E: std::fmt::Display>(
    identifier: &'static str,
    root: Option<&std::path::Path>,
    body: impl FnOnce(Paths) -> std::result::Result<std::process::ExitCode, E>,
) -> std::process::ExitCode {
    init_logging(identifier);
    match body(Paths::from_cli(root)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
