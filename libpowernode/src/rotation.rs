//! Certificate and JWT rotation: when to renew, and the renewal itself.
//!
//! Renew at 75 % of the certificate's lifetime, spread by ± 5 % of the lifetime (derived from the
//! serial, so the decision is stable across restarts and `RenewAt` can be shown), never later than
//! a floor of remaining validity, and early enough that the instance JWT is refreshed before it
//! comes within 2 h of `exp` (a quarter of its lifetime for short-lived tokens) — the upstream
//! agent's 24 h JWT hazard. No decision is made on an untrusted clock.

use std::time::Duration;

use time::OffsetDateTime;

use crate::api::{EnrollResponse, PATH_ENROLL_REFRESH, RefreshRequest};
use crate::clock::Trust;
use crate::config::PlatformConfig;
use crate::pki::{self, CertInfo, Credentials, Meta, PkiStore};
use crate::transport::PlatformClient;
use crate::{AGENT_VERSION, Error, Result};

pub const RENEW_FRACTION: f64 = 0.75;
pub const JITTER_FRACTION: f64 = 0.05;
/// Renew no later than this before expiry (capped at a quarter of the lifetime).
pub const MIN_REMAINING: Duration = Duration::from_secs(24 * 3600);
/// Refresh the JWT this long before its `exp` (capped at a quarter of its lifetime).
pub const JWT_MARGIN: Duration = Duration::from_secs(2 * 3600);

/// Deterministic jitter in [-1, 1] from the serial.
fn serial_jitter(serial: &str) -> f64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 2001) as f64 / 1000.0 - 1.0
}

/// When the credentials should be renewed.
pub fn renew_at(cert: &CertInfo, jwt: Option<(OffsetDateTime, OffsetDateTime)>) -> OffsetDateTime {
    let life = cert.not_after - cert.not_before;
    let frac = RENEW_FRACTION + JITTER_FRACTION * serial_jitter(&cert.serial);
    let mut at = cert.not_before + life * frac;
    let floor = time::Duration::try_from(MIN_REMAINING)
        .unwrap_or(time::Duration::DAY)
        .min(life / 4);
    at = at.min(cert.not_after - floor);
    if let Some((iat, exp)) = jwt {
        let margin = time::Duration::try_from(JWT_MARGIN)
            .unwrap_or(time::Duration::HOUR)
            .min((exp - iat) / 4);
        at = at.min(exp - margin);
    }
    at
}

/// The `iat` and `exp` of a JWT, read without verification.
pub fn jwt_window(token: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = OffsetDateTime::from_unix_timestamp(v.get("exp")?.as_i64()?).ok()?;
    let iat = v
        .get("iat")
        .and_then(|x| x.as_i64())
        .and_then(|x| OffsetDateTime::from_unix_timestamp(x).ok())
        .unwrap_or(exp - time::Duration::DAY);
    Some((iat, exp))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    NotDue {
        renew_at: OffsetDateTime,
    },
    Due {
        renew_at: OffsetDateTime,
    },
    /// The certificate lapsed: refresh over mTLS will be refused; recovery needs re-enrollment.
    Expired {
        not_after: OffsetDateTime,
    },
    ClockUntrusted(String),
}

impl Verdict {
    pub fn state(&self) -> &'static str {
        match self {
            Verdict::NotDue { .. } => "valid",
            Verdict::Due { .. } => "due",
            Verdict::Expired { .. } => "expired",
            Verdict::ClockUntrusted(_) => "clock-untrusted",
        }
    }
}

pub fn decide(
    now: OffsetDateTime,
    clock: &Trust,
    creds: &Credentials,
) -> Result<(CertInfo, Verdict)> {
    let info = CertInfo::from_pem(&creds.cert_pem)?;
    if let Trust::Untrusted(why) = clock {
        return Ok((info, Verdict::ClockUntrusted(why.clone())));
    }
    let at = renew_at(&info, creds.token.as_deref().and_then(jwt_window));
    let v = if now >= info.not_after {
        Verdict::Expired {
            not_after: info.not_after,
        }
    } else if now >= at {
        Verdict::Due { renew_at: at }
    } else {
        Verdict::NotDue { renew_at: at }
    };
    Ok((info, v))
}

/// Exclusive lock on the PKI directory for the duration of a rotation.
pub struct RotationLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

impl std::fmt::Debug for RotationLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotationLock")
    }
}

pub fn lock(store: &PkiStore) -> Result<RotationLock> {
    crate::fsutil::ensure_dir(store.dir(), 0o700)?;
    let p = store.dir().join(".rotation.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io("open", &p, e))?;
    let flock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("flock", &p, std::io::Error::from(e)))?;
    Ok(RotationLock { _flock: flock })
}

/// Renew now: new key (persisted first), `enroll/refresh` with the current credentials, then the
/// validated set is installed atomically. Old credentials stay current on any failure.
pub async fn rotate(cfg: &PlatformConfig, store: &PkiStore) -> Result<Meta> {
    let _lock = lock(store)?;
    let creds = store
        .load()?
        .ok_or_else(|| Error::NotFound("not enrolled: nothing to rotate".into()))?;
    let client = PlatformClient::from_credentials(cfg, &creds)?;
    let key = pki::generate_key()?;
    store.write_pending_key(&key.serialize_pem())?;
    crate::fault::point("rotate-after-key-write");
    let req = RefreshRequest {
        csr_pem: pki::csr_pem(&key, &creds.meta.mtls_subject)?,
        agent_version: AGENT_VERSION.to_string(),
    };
    let resp: EnrollResponse = client.post(PATH_ENROLL_REFRESH, &req).await?;
    crate::fault::point("rotate-after-request");
    store.commit(&resp, &key.serialize_pem(), &creds.ca_bundle_pem, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn cert(serial: &str, from: OffsetDateTime, to: OffsetDateTime) -> CertInfo {
        CertInfo {
            subject_cn: "i".into(),
            issuer: "ca".into(),
            serial: serial.into(),
            not_before: from,
            not_after: to,
        }
    }

    #[test]
    fn renews_at_three_quarters_with_stable_jitter() {
        let from = datetime!(2026-01-01 0:00 UTC);
        let to = from + time::Duration::days(100);
        for serial in [
            "01",
            "ab12",
            "ffffffffffff",
            "7395ecbe40f51ada97b4f7a2a1aa82b4",
        ] {
            let at = renew_at(&cert(serial, from, to), None);
            let day = (at - from).as_seconds_f64() / 86400.0;
            assert!((70.0..=80.0).contains(&day), "{serial}: day {day}");
            assert_eq!(at, renew_at(&cert(serial, from, to), None), "stable");
        }
        assert_ne!(
            renew_at(&cert("01", from, to), None),
            renew_at(&cert("02", from, to), None)
        );
    }

    #[test]
    fn short_certificates_and_jwt_pull_renewal_earlier() {
        let from = datetime!(2026-01-01 0:00 UTC);
        // 2-minute certificate: 75 % ± 5 %, the 1-day floor capped at a quarter.
        let at = renew_at(&cert("01", from, from + time::Duration::minutes(2)), None);
        let s = (at - from).whole_seconds();
        assert!((84..=96).contains(&s), "{s}");
        // A 24 h JWT issued at `from` forces renewal 2 h before its exp even on a 90-day cert.
        let c = cert("01", from, from + time::Duration::days(90));
        let jwt = (from, from + time::Duration::hours(24));
        assert_eq!(renew_at(&c, Some(jwt)), from + time::Duration::hours(22));
        // A 300 s JWT: a quarter of its lifetime.
        let jwt = (from, from + time::Duration::seconds(300));
        assert_eq!(renew_at(&c, Some(jwt)), from + time::Duration::seconds(225));
    }
}
