//! Whether the wall clock can be trusted for certificate decisions.
//!
//! A node that boots with a dead RTC may believe it is 1970 or 2038; acting on that would
//! declare a good certificate expired or rotate one that is not due. The clock is *untrusted*
//! when it is not NTP-synchronised **and** it reads earlier than the last time the platform
//! proved to us (the `server_time` of an mTLS-authenticated reply, persisted monotonically).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{atomic_write, ensure_dir, read_optional};
use crate::paths::Paths;
use crate::{Error, Result};

const CLOCK_FILE: &str = "clock.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The latest authenticated platform time seen.
    #[serde(with = "time::serde::rfc3339")]
    pub last_good: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    Trusted(&'static str),
    Untrusted(String),
}

impl Trust {
    pub fn is_trusted(&self) -> bool {
        matches!(self, Trust::Trusted(_))
    }
}

pub fn load(paths: &Paths) -> Result<Option<Evidence>> {
    let p = paths.state_dir().join(CLOCK_FILE);
    match read_optional(&p, 4096)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::malformed("clock.json", e)),
    }
}

/// Record an authenticated platform time; the evidence only ever moves forward.
pub fn record(paths: &Paths, server_time: OffsetDateTime) -> Result<()> {
    if load(paths)?.is_some_and(|e| e.last_good >= server_time) {
        return Ok(());
    }
    ensure_dir(&paths.state_dir(), 0o750)?;
    let bytes = serde_json::to_vec(&Evidence {
        last_good: server_time,
    })
    .map_err(|e| Error::malformed("clock.json", e))?;
    atomic_write(&paths.state_dir().join(CLOCK_FILE), &bytes, 0o644)
}

/// The verdict for `now`, given whether NTP reports synchronisation.
pub fn judge(now: OffsetDateTime, ntp_synchronized: bool, evidence: Option<Evidence>) -> Trust {
    if ntp_synchronized {
        return Trust::Trusted("NTP-synchronised");
    }
    match evidence {
        Some(e) if now < e.last_good => Trust::Untrusted(format!(
            "clock reads {} but the platform proved {} already, and NTP is not synchronised",
            crate::identity::rfc3339(now),
            crate::identity::rfc3339(e.last_good)
        )),
        Some(_) => Trust::Trusted("not before the last authenticated platform time"),
        None => Trust::Trusted("no evidence against it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn verdicts() {
        let ev = Some(Evidence {
            last_good: datetime!(2026-11-28 12:00 UTC),
        });
        assert!(!judge(datetime!(2026-11-28 11:00 UTC), false, ev).is_trusted());
        assert!(judge(datetime!(2026-11-28 11:00 UTC), true, ev).is_trusted());
        assert!(judge(datetime!(2026-11-28 13:00 UTC), false, ev).is_trusted());
        assert!(judge(datetime!(1970-01-01 0:00 UTC), false, None).is_trusted());
    }

    #[test]
    fn evidence_only_moves_forward() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        record(&p, datetime!(2026-11-28 12:00 UTC)).unwrap();
        record(&p, datetime!(2026-11-28 11:00 UTC)).unwrap();
        assert_eq!(
            load(&p).unwrap().unwrap().last_good,
            datetime!(2026-11-28 12:00 UTC)
        );
        record(&p, datetime!(2026-11-29 0:00 UTC)).unwrap();
        assert_eq!(
            load(&p).unwrap().unwrap().last_good,
            datetime!(2026-11-29 0:00 UTC)
        );
    }
}
