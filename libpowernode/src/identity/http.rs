//! Metadata HTTP: one request, its outcome classified the way the cascade needs it, and the
//! shared retry policy around it.
//!
//! "Absent" (this is not that cloud: 404, another 4xx, connection refused, no route or device)
//! ends a probe at once; "not ready yet" (5xx, 429, timeout, reset) is retried with full jitter
//! until the cascade deadline. Bodies are capped while streaming, so a 100 MB reply costs 64 KiB.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;

use super::Ctx;
use crate::retry::{RetryClass, RetryPolicy, Retryable, parse_retry_after};

/// First retry after at most this (full jitter below it); the deadline bounds the rest.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(super) enum MetaError {
    /// Nothing to find here.
    Absent(String),
    /// Asked too early, or the service is struggling: worth another try.
    NotReady {
        msg: String,
        retry_after: Option<Duration>,
    },
    /// An answer we cannot use (4xx other than 404 on a service that is there, body too large).
    Bad(String),
    /// Non-200, non-404, non-5xx status (the caller decides whether that means "not this cloud").
    Status(String),
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Absent(m) | MetaError::Bad(m) | MetaError::Status(m) => f.write_str(m),
            MetaError::NotReady { msg, .. } => write!(f, "not ready: {msg}"),
        }
    }
}

impl Retryable for MetaError {
    fn retry_class(&self) -> RetryClass {
        match self {
            MetaError::NotReady { retry_after, .. } => RetryClass::Transient {
                retry_after: *retry_after,
            },
            _ => RetryClass::Permanent,
        }
    }
}

/// A 200 reply.
pub(super) struct Reply {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Is this transport error "nobody is there" rather than "not answering yet"?
fn connection_absent(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    use std::io::ErrorKind::*;
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            // ENODEV (19): no such device, e.g. no interface to reach the link-local range.
            if io.raw_os_error() == Some(19) {
                return Some(NotFound);
            }
            return match io.kind() {
                ConnectionRefused | NetworkUnreachable | HostUnreachable | AddrNotAvailable
                | NotFound => Some(io.kind()),
                _ => None,
            };
        }
        src = s.source();
    }
    None
}

fn chain(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn transport_error(url: &str, e: reqwest::Error) -> MetaError {
    if e.is_timeout() {
        return MetaError::NotReady {
            msg: format!("{url}: timed out"),
            retry_after: None,
        };
    }
    if let Some(kind) = connection_absent(&e) {
        return MetaError::Absent(format!("{url}: {kind}"));
    }
    MetaError::NotReady {
        msg: format!("{url}: {}", chain(&e)),
        retry_after: None,
    }
}

/// One request, no retry.
async fn once(
    ctx: &Ctx,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, MetaError> {
    let mut req = ctx.http.request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send().await.map_err(|e| transport_error(url, e))?;
    let status = resp.status().as_u16();
    match status {
        200 => {}
        404 => return Err(MetaError::Absent(format!("{url}: HTTP 404"))),
        429 | 500..=599 => {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            return Err(MetaError::NotReady {
                msg: format!("{url}: HTTP {status}"),
                retry_after,
            });
        }
        _ => return Err(MetaError::Status(format!("{url}: HTTP {status}"))),
    }
    let limit = ctx.settings.body_limit;
    let too_large = || MetaError::Bad(format!("{url}: body exceeds the limit of {limit} bytes"));
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(too_large());
    }
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_error(url, e)),
        }
    }
    Ok(Reply { headers, body })
}

/// One request with the shared retry policy, bounded by the cascade deadline.
pub(super) async fn fetch(
    ctx: &Ctx,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, MetaError> {
    let policy = RetryPolicy {
        initial_delay: RETRY_INITIAL,
        max_delay: RETRY_MAX,
        deadline: ctx.settings.deadline,
    };
    policy
        .run(|_| once(ctx, method.clone(), url, headers))
        .await
}
