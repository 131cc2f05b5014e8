//! Fleet events: what one event is (kind, severity, payload, source, a unique id) and how an
//! untrusted submission is validated, plus the durable on-disk queue ([`queue::Queue`]) that
//! fleeteventd keeps them in until the platform has acknowledged them.
//!
//! The record format lives in [`record`] (pure encode/decode, no I/O); the queue in [`queue`]
//! (segments, group commit, ledger, size cap). Nothing here talks to the network or the bus.

pub mod queue;
pub mod record;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use queue::{Queue, QueueConfig};

/// Longest accepted event kind (`system.cert.rotated` style names).
pub const MAX_KIND_LEN: usize = 128;
/// Largest accepted payload, serialised (a payload is context, not a log file).
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// The platform accepts at most this many events per `POST fleet/events` (node-api.md A §5).
pub const MAX_BATCH: usize = 500;
/// The kind of the event the queue emits itself when its size cap forced it to drop events.
pub const DROPPED_KIND: &str = "system.events.dropped";
/// Kinds under this namespace speak for the suite itself (`system.cert.rotated`,
/// [`DROPPED_KIND`]): the platform trusts them as the node's own word, so only the suite's own
/// uids may emit them.
pub const RESERVED_NAMESPACE: &str = "system";

/// Whether `kind` lies in the [`RESERVED_NAMESPACE`] (the namespace itself or below it).
pub fn is_reserved_kind(kind: &str) -> bool {
    kind.strip_prefix(RESERVED_NAMESPACE)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

pub use crate::config::SeverityVocabulary;

/// Event severity, in the vocabulary of node-api.md Part A §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// The upstream server's vocabulary (node-api.md Part B §8: `low`, `medium`, `high`,
    /// `critical`; anything else is silently dropped there).
    pub fn as_upstream(self) -> &'static str {
        match self {
            Severity::Info => "low",
            Severity::Warning => "medium",
            Severity::Error => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Result<Severity, EventError> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            "critical" => Ok(Severity::Critical),
            other => Err(EventError::Severity(truncated(other))),
        }
    }
}

/// Why a submitted event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("invalid kind {0:?}: want 1-128 characters of [a-z0-9_.]")]
    Kind(String),
    #[error("unknown severity {0:?}: want info, warning, error or critical")]
    Severity(String),
    #[error("payload is not a JSON object: {0}")]
    Payload(String),
    #[error("payload exceeds {MAX_PAYLOAD_BYTES} bytes")]
    PayloadTooLarge,
    #[error("message is not a JSON event object: {0}")]
    Message(String),
    #[error("message exceeds {0} bytes")]
    MessageTooLarge(usize),
    #[error("rate limit exceeded for {0}")]
    RateLimited(String),
    #[error("kind {0:?} is reserved for the suite's own daemons")]
    ReservedKind(String),
    #[error("too many connections: {0}")]
    TooManyConnections(String),
    /// The event was valid but could not be stored (disk full, I/O error): worth retrying later,
    /// unlike every other refusal.
    #[error("storing the event failed: {0}")]
    Storage(String),
}

impl EventError {
    /// Bounded reason label for counters and replies.
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Kind(_) => "invalid_kind",
            EventError::Severity(_) => "invalid_severity",
            EventError::Payload(_) => "invalid_payload",
            EventError::PayloadTooLarge => "payload_too_large",
            EventError::Message(_) => "invalid_message",
            EventError::MessageTooLarge(_) => "message_too_large",
            EventError::RateLimited(_) => "rate_limited",
            EventError::ReservedKind(_) => "reserved_kind",
            EventError::TooManyConnections(_) => "too_many_connections",
            EventError::Storage(_) => "storage",
        }
    }
}

impl From<EventError> for crate::Error {
    fn from(e: EventError) -> Self {
        match e {
            EventError::PayloadTooLarge => crate::Error::TooLarge {
                what: "event payload",
                limit: MAX_PAYLOAD_BYTES as u64,
            },
            EventError::MessageTooLarge(n) => crate::Error::TooLarge {
                what: "event message",
                limit: n as u64,
            },
            EventError::RateLimited(s) => crate::Error::Refused {
                status: 429,
                code: Some("rate_limited".into()),
                message: format!("rate limit exceeded for {s}"),
            },
            EventError::ReservedKind(kind) => crate::Error::Refused {
                status: 403,
                code: Some("reserved_kind".into()),
                message: format!("kind {kind:?} is reserved for the suite's own daemons"),
            },
            EventError::TooManyConnections(s) => crate::Error::Refused {
                status: 429,
                code: Some("too_many_connections".into()),
                message: s,
            },
            EventError::Storage(detail) => crate::Error::io(
                "storing the event in",
                "the event queue",
                std::io::Error::other(detail),
            ),
            other => crate::Error::malformed("event", other),
        }
    }
}

/// Echo at most this much of a rejected value back (replies and logs stay small).
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One fleet event, as stored and uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id; sent as `correlation_id` so the platform can drop replays.
    pub id: String,
    pub kind: String,
    pub severity: Severity,
    pub payload: Map<String, Value>,
    /// RFC 3339, when the daemon accepted it.
    pub emitted_at: String,
    /// Who sent it (`uid=…,pid=…` from the socket or bus credentials, or a daemon name).
    pub source: String,
}

/// `[a-z0-9_.]+`, at most [`MAX_KIND_LEN`].
pub fn validate_kind(kind: &str) -> Result<(), EventError> {
    let ok = !kind.is_empty()
        && kind.len() <= MAX_KIND_LEN
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(EventError::Kind(truncated(kind)))
    }
}

/// A payload must be a JSON object no larger than [`MAX_PAYLOAD_BYTES`] once serialised.
pub fn validate_payload(payload: Value) -> Result<Map<String, Value>, EventError> {
    let Value::Object(map) = payload else {
        return Err(EventError::Payload(format!(
            "got {}",
            crate::tasks::json_type_name(&payload)
        )));
    };
    let size = serde_json::to_vec(&map)
        .map_err(|e| EventError::Payload(e.to_string()))?
        .len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(EventError::PayloadTooLarge);
    }
    Ok(map)
}

/// A fresh random (v4) UUID, the event id.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    // The kernel's CSPRNG: ids from two processes (or a restarted one) must never collide.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        tracing::warn!("system random source failed; event id from the fallback generator");
        b = fastrand::u128(..).to_be_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_rfc3339() -> String {
    crate::pki::rfc3339(time::OffsetDateTime::now_utc())
}

impl Event {
    /// Validate a submission (the D-Bus `Emit` arguments) and stamp it with an id and time.
    pub fn new(
        kind: &str,
        severity: &str,
        payload_json: &str,
        source: &str,
    ) -> Result<Event, EventError> {
        validate_kind(kind)?;
        let severity = Severity::parse(severity)?;
        if payload_json.len() > MAX_PAYLOAD_BYTES {
            return Err(EventError::PayloadTooLarge);
        }
        let payload = if payload_json.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_str(payload_json).map_err(|e| EventError::Payload(e.to_string()))?
        };
        Ok(Event::stamped(
            kind,
            severity,
            validate_payload(payload)?,
            source,
        ))
    }

    /// An event from already-valid parts (the daemon's own events).
    pub fn stamped(
        kind: &str,
        severity: Severity,
        payload: Map<String, Value>,
        source: &str,
    ) -> Event {
        Event {
            id: new_id(),
            kind: kind.to_string(),
            severity,
            payload,
            emitted_at: now_rfc3339(),
            source: source.to_string(),
        }
    }

    /// Parse one socket message: `{"kind":…, "severity":…, "payload":{…}}`. Unknown fields are
    /// refused, so a typo is reported rather than silently dropped.
    pub fn from_message(msg: &[u8], max: usize, source: &str) -> Result<Event, EventError> {
        if msg.len() > max {
            return Err(EventError::MessageTooLarge(max));
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Message {
            kind: String,
            #[serde(default = "default_severity")]
            severity: String,
            #[serde(default)]
            payload: Option<Value>,
        }
        fn default_severity() -> String {
            "info".into()
        }
        let m: Message =
            serde_json::from_slice(msg).map_err(|e| EventError::Message(e.to_string()))?;
        validate_kind(&m.kind)?;
        let severity = Severity::parse(&m.severity)?;
        let payload = validate_payload(m.payload.unwrap_or(Value::Object(Map::new())))?;
        Ok(Event::stamped(&m.kind, severity, payload, source))
    }

    /// The upload form (node-api.md Part A §5), plus `emitted_at` and `source`, which the
    /// upstream server ignores and the development platform records.
    pub fn wire(&self, vocabulary: SeverityVocabulary) -> Value {
        let severity = match vocabulary {
            SeverityVocabulary::PartA => self.severity.as_str(),
            SeverityVocabulary::Upstream => self.severity.as_upstream(),
        };
        serde_json::json!({
            "kind": self.kind,
            "severity": severity,
            "payload": self.payload,
            "correlation_id": self.id,
            "emitted_at": self.emitted_at,
            "source": self.source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kinds() {
        for ok in ["a", "system.cert.rotated", "x_1.y_2", &"a".repeat(128)] {
            assert!(validate_kind(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a-b", "a b", "ä", "a/b", &"a".repeat(129)] {
            assert!(validate_kind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_kinds() {
        for reserved in ["system", "system.cert.rotated", DROPPED_KIND] {
            assert!(is_reserved_kind(reserved), "{reserved}");
        }
        for free in ["systemd.unit", "systems", "app.system.x", "sys"] {
            assert!(!is_reserved_kind(free), "{free}");
        }
        let e = crate::Error::from(EventError::Storage("disk full".into()));
        assert_eq!(e.kind(), crate::error::ErrorKind::Io);
        let e = crate::Error::from(EventError::ReservedKind("system.x".into()));
        assert_eq!(e.kind(), crate::error::ErrorKind::Refused);
    }

    #[test]
    fn submissions() {
        let e = Event::new("t.x", "warning", r#"{"a":1}"#, "uid=0").unwrap();
        assert_eq!(e.severity, Severity::Warning);
        assert_eq!(e.payload["a"], 1);
        assert_eq!(e.id.len(), 36);
        assert_eq!(Event::new("t", "info", "", "s").unwrap().payload.len(), 0);
        let cases: &[(&str, &str, &str, &str)] = &[
            ("T", "info", "{}", "invalid_kind"),
            ("t", "low", "{}", "invalid_severity"),
            ("t", "info", "[1]", "invalid_payload"),
            ("t", "info", "{nope", "invalid_payload"),
        ];
        for (k, s, p, want) in cases {
            assert_eq!(
                Event::new(k, s, p, "x").unwrap_err().kind(),
                *want,
                "{k} {s} {p}"
            );
        }
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_PAYLOAD_BYTES));
        assert_eq!(
            Event::new("t", "info", &big, "x").unwrap_err(),
            EventError::PayloadTooLarge
        );
    }

    #[test]
    fn messages() {
        let e = Event::from_message(br#"{"kind":"a.b","payload":{"n":2}}"#, 1024, "s").unwrap();
        assert_eq!((e.kind.as_str(), e.severity), ("a.b", Severity::Info));
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid_message"),
            (br#"{"severity":"info"}"#, "invalid_message"),
            (br#"{"kind":"a","extra":1}"#, "invalid_message"),
            (br#"{"kind":"a","severity":"fatal"}"#, "invalid_severity"),
            (br#"{"kind":"a","payload":"s"}"#, "invalid_payload"),
            (br#"{"kind":"A"}"#, "invalid_kind"),
        ];
        for (m, want) in cases {
            assert_eq!(
                Event::from_message(m, 1024, "s").unwrap_err().kind(),
                *want,
                "{}",
                String::from_utf8_lossy(m)
            );
        }
        assert_eq!(
            Event::from_message(&[b' '; 2000], 1024, "s")
                .unwrap_err()
                .kind(),
            "message_too_large"
        );
    }

    #[test]
    fn ids_are_unique_v4() {
        let a = new_id();
        assert_ne!(a, new_id());
        assert_eq!(&a[14..15], "4");
        let wire = Event::new("k", "critical", "{}", "s")
            .unwrap()
            .wire(SeverityVocabulary::PartA);
        assert_eq!(wire["severity"], "critical");
        assert!(wire["correlation_id"].is_string());
        for (ours, upstream) in [
            ("info", "low"),
            ("warning", "medium"),
            ("error", "high"),
            ("critical", "critical"),
        ] {
            let e = Event::new("k", ours, "{}", "s").unwrap();
            assert_eq!(e.wire(SeverityVocabulary::PartA)["severity"], ours);
            assert_eq!(e.wire(SeverityVocabulary::Upstream)["severity"], upstream);
        }
        let cfg = crate::config::Config::from_toml_str("[events]\nwire_severity = \"upstream\"\n")
            .unwrap();
        assert_eq!(cfg.events.wire_severity, SeverityVocabulary::Upstream);
        assert!(
            crate::config::Config::from_toml_str("[events]\nwire_severity = \"loud\"\n").is_err()
        );
    }
}
