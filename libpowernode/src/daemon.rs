//! Process set-up shared by every daemon entry point: logging (journald-native under systemd,
//! plain stderr otherwise), the sandbox, and the single current-thread runtime; and idle exit
//! for activated daemons, which never happens while a call or a background job holds a
//! [`BusyGuard`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

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

/// Tracks activity of an on-demand daemon so it exits when nobody needs it: only once no
/// [`BusyGuard`] is held and the idle limit has passed since the last one dropped (or the last
/// [`touch`](Self::touch)). A method handler or background job that may outlast the limit (a
/// pull from a slow registry, a platform that never answers) holds a guard for its whole run.
#[derive(Debug, Clone)]
pub struct IdleTracker {
    state: Arc<Mutex<Activity>>,
    limit: Option<Duration>,
}

#[derive(Debug)]
struct Activity {
    busy: usize,
    /// When the daemon last became idle (last touch, or the last guard dropped).
    since: Instant,
}

/// Keeps the daemon from exiting idle while held; dropping the last one restarts the idle
/// period. Owns its tracker state, so it can move into a spawned task.
#[derive(Debug)]
#[must_use = "the daemon counts as busy only while the guard is held"]
pub struct BusyGuard {
    state: Arc<Mutex<Activity>>,
}

impl IdleTracker {
    /// `idle_secs == 0` disables idle exit.
    pub fn new(idle_secs: u64) -> Self {
        IdleTracker {
            state: Arc::new(Mutex::new(Activity {
                busy: 0,
                since: Instant::now(),
            })),
            limit: (idle_secs > 0).then(|| Duration::from_secs(idle_secs)),
        }
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        // The critical sections only assign integers and instants; a poisoned lock holds a
        // consistent value.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Restart the idle period (a short call, an event).
    pub fn touch(&self) {
        self.activity().since = Instant::now();
    }

    /// Mark the daemon busy until the returned guard drops.
    pub fn busy(&self) -> BusyGuard {
        self.activity().busy += 1;
        BusyGuard {
            state: Arc::clone(&self.state),
        }
    }

    /// How many guards are held now.
    pub fn busy_count(&self) -> usize {
        self.activity().busy
    }

    /// Resolves once no guard is held and the daemon has been idle for the limit; never when
    /// disabled.
    pub async fn wait_idle(&self) {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            let wake = {
                let a = self.activity();
                if a.busy == 0 && a.since.elapsed() >= limit {
                    return;
                }
                // While busy, look again a limit later: the guard's drop restarts the period,
                // so exit comes no sooner than `limit` after it whatever the polling phase.
                if a.busy == 0 {
                    a.since + limit
                } else {
                    Instant::now() + limit
                }
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut a = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        a.busy = a.busy.saturating_sub(1);
        if a.busy == 0 {
            a.since = Instant::now();
        }
    }
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
/// tells systemd it is stopping. A call or job holding a [`BusyGuard`] keeps it serving.
pub async fn serve_until_idle(idle: &IdleTracker, status: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `wait_idle` has resolved by now (paused time: the runtime auto-advances the
    /// clock only when every task is blocked, so `advance` moves it exactly).
    async fn exited_after(idle: &IdleTracker, secs: u64) -> bool {
        let wait = idle.wait_idle();
        tokio::pin!(wait);
        tokio::select! {
            biased;
            _ = &mut wait => true,
            _ = tokio::time::sleep(Duration::from_secs(secs)) => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_exit_after_the_limit_without_calls() {
        let idle = IdleTracker::new(3);
        assert!(!exited_after(&idle, 2).await, "not before the limit");
        assert!(exited_after(&idle, 2).await, "at the limit");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_guard_keeps_the_daemon_serving_past_the_limit() {
        let idle = IdleTracker::new(3);
        let guard = idle.busy();
        assert_eq!(idle.busy_count(), 1);
        // A call that takes 10 limits: the daemon stays.
        assert!(
            !exited_after(&idle, 30).await,
            "exited in the middle of a call"
        );
        drop(guard);
        assert_eq!(idle.busy_count(), 0);
        // The idle period starts when the guard drops, not when the call started.
        assert!(!exited_after(&idle, 2).await, "exited right after the call");
        assert!(exited_after(&idle, 2).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_job_holds_a_guard_across_tasks() {
        let idle = IdleTracker::new(3);
        let guard = idle.busy();
        let job = tokio::spawn(async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(20)).await;
        });
        let waiter = {
            let idle = idle.clone();
            tokio::spawn(async move {
                idle.wait_idle().await;
                Instant::now()
            })
        };
        let started = Instant::now();
        job.await.unwrap();
        let exited = waiter.await.unwrap();
        // The job ended at +20 s; the exit comes a full limit later, never during the job.
        assert!(
            exited - started >= Duration::from_secs(23),
            "{:?}",
            exited - started
        );
        assert!(
            exited - started < Duration::from_secs(24),
            "{:?}",
            exited - started
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_guards_count() {
        let idle = IdleTracker::new(3);
        let a = idle.busy();
        let b = idle.busy();
        drop(a);
        assert!(!exited_after(&idle, 10).await, "one call still runs");
        drop(b);
        assert!(exited_after(&idle, 4).await);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_disables_idle_exit() {
        let idle = IdleTracker::new(0);
        assert!(!exited_after(&idle, 3600).await);
    }
}
