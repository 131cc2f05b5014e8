//! The one retry policy every network call goes through: a deadline for the whole operation,
//! exponential backoff with full jitter (AWS architecture blog's "full jitter": sleep a uniform
//! random time in `[0, min(cap, base·2ⁿ)]`), and the server's `Retry-After` honoured as a floor.
//!
//! Errors say whether they are worth retrying through [`Retryable`]: "not ready yet" (timeouts,
//! 5xx, 429) is retried, "absent" or "refused" (404, 4xx, malformed replies) is returned at once.

use std::future::Future;
use std::time::Duration;

use crate::Error;
use crate::config::RetryConfig;

/// How an error should be treated by [`RetryPolicy::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Will not get better by asking again.
    Permanent,
    /// Transient; the server may have said how long to wait.
    Transient { retry_after: Option<Duration> },
}

pub trait Retryable {
    fn retry_class(&self) -> RetryClass;
}

impl Retryable for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::Unreachable(_) | Error::NotConnected(_) => {
                RetryClass::Transient { retry_after: None }
            }
            Error::Unavailable { retry_after, .. } => RetryClass::Transient {
                retry_after: *retry_after,
            },
            _ => RetryClass::Permanent,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub deadline: Duration,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(c.initial_delay_ms),
            max_delay: Duration::from_millis(c.max_delay_ms),
            deadline: Duration::from_secs(c.deadline_secs),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::from(&RetryConfig::default())
    }
}

impl RetryPolicy {
    /// A policy that tries exactly once (for operations that are not retry-safe, like enrollment).
    pub fn once() -> Self {
        RetryPolicy {
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            deadline: Duration::ZERO,
        }
    }

    /// The wait before attempt `attempt + 1` (0-based), given a uniform sample `u` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, u: f64) -> Duration {
        let exp = self
            .initial_delay
            .saturating_mul(2u32.saturating_pow(attempt.min(31)));
        let cap = exp.min(self.max_delay);
        let jittered = cap.mul_f64(u.clamp(0.0, 1.0));
        match retry_after {
            Some(ra) => jittered.max(ra),
            None => jittered,
        }
    }

    /// Run `op` until it succeeds, fails permanently, or the next wait would cross the deadline.
    /// The last error is returned as it was; `on_retry` sees each transient failure.
    pub async fn run<T, E, F, Fut>(&self, mut op: F) -> Result<T, E>
    where
        E: Retryable + std::fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            let err = match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let RetryClass::Transient { retry_after } = err.retry_class() else {
                return Err(err);
            };
            let wait = self.delay(attempt, retry_after, fastrand::f64());
            // `>=`: a zero deadline (RetryPolicy::once) must stop even when no time has passed.
            if start.elapsed() + wait >= self.deadline {
                return Err(err);
            }
            tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %err, "transient failure, retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// Parse an HTTP `Retry-After` value given in seconds (the HTTP-date form is treated as absent).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
        }
    }

    #[test]
    fn full_jitter_bounds() {
        let p = policy();
        assert_eq!(p.delay(0, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(0, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_millis(800));
        assert_eq!(p.delay(10, None, 1.0), Duration::from_secs(2), "capped");
        assert_eq!(
            p.delay(40, None, 0.5),
            Duration::from_secs(1),
            "no overflow"
        );
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(5)), 0.3),
            Duration::from_secs(5),
            "Retry-After is a floor"
        );
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, Error> = policy()
            .run(|n| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(Error::Unreachable("down".into()))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), Error> = policy()
            .run(|_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(Error::Refused {
                        status: 422,
                        code: None,
                        message: "token already consumed".into(),
                    })
                }
            })
            .await;
        assert!(matches!(r, Err(Error::Refused { status: 422, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_stops_retrying_and_returns_last_error() {
        let start = tokio::time::Instant::now();
        let r: Result<(), Error> = policy()
            .run(|_| async {
                Err(Error::Unavailable {
                    status: 503,
                    retry_after: Some(Duration::from_secs(3)),
                    message: "maintenance".into(),
                })
            })
            .await;
        assert!(matches!(r, Err(Error::Unavailable { status: 503, .. })));
        let spent = start.elapsed();
        assert!(spent <= Duration::from_secs(10), "{spent:?}");
        assert!(
            spent >= Duration::from_secs(9),
            "three 3 s waits fit in 10 s: {spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn once_never_waits() {
        let calls = AtomicU32::new(0);
        let r: Result<(), Error> = RetryPolicy::once()
            .run(|_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Error::Unreachable("x".into())) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
