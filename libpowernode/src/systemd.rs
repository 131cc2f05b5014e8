//! systemd plumbing: readiness and status notifications, the watchdog, and idle exit for
//! activated daemons. Outside systemd (no `NOTIFY_SOCKET`) every call is a silent no-op, which
//! is what sd_notify(3) specifies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WatchdogSec=`, as sd_watchdog_enabled(3) advises.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Tracks activity of an on-demand daemon so it can exit when nobody needs it.
#[derive(Debug, Clone)]
pub struct IdleTracker {
    start: Instant,
    last_ms: Arc<AtomicU64>,
    limit: Option<Duration>,
}

impl IdleTracker {
    /// `idle_secs == 0` disables idle exit.
    pub fn new(idle_secs: u64) -> Self {
        IdleTracker {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            limit: (idle_secs > 0).then(|| Duration::from_secs(idle_secs)),
        }
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start.elapsed() - Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once the daemon has been idle for the limit; never when disabled.
    pub async fn wait_idle(&self) {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}
