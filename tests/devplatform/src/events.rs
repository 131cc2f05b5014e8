//! `POST fleet/events` (node-api.md Part A §5, Part B §8) with the intended semantics: the body
//! is validated as a whole (a non-empty array of at most 500 events, each with a valid kind,
//! severity, object payload and `correlation_id`), events are stored per instance in arrival
//! order, and a `correlation_id` already stored is counted as a duplicate instead of stored
//! again — what makes the agent's at-least-once replays exactly-once here.
//!
//! Storage: `<state>/events/<instance>.jsonl` (one stored event per line, appended and
//! fdatasync'd before the reply) and `<instance>.dups` (the duplicate count). The server keeps
//! the seen ids in memory, loaded from the file on first use; the admin CLI only reads.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{AppState, InstanceAuth, JsonBody};
use crate::fsutil;

/// The agent's contract: at most this many events per request.
pub const MAX_EVENTS: usize = 500;
const MAX_KIND_LEN: usize = 128;
const SEVERITIES: [&str; 4] = ["info", "warning", "error", "critical"];
/// `serve --upstream-severities`: the upstream server's words (node-api.md Part B §8).
const UPSTREAM_SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];
const EVENTS_DIR: &str = "events";

/// One stored event, as `events --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub correlation_id: String,
    pub kind: String,
    pub severity: String,
    pub payload: Value,
    #[serde(default)]
    pub emitted_at: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    pub received_at: String,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<String>,
    duplicates: u64,
}

/// The per-instance event files, and the server's index of ids already stored.
#[derive(Debug)]
pub struct EventLog {
    dir: PathBuf,
    seen: Mutex<HashMap<String, Seen>>,
}

fn events_file(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.jsonl"))
}

fn dups_file(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.dups"))
}

/// Read an instance's stored events and duplicate count.
fn read_instance(dir: &Path, instance: &str) -> Result<(Vec<StoredEvent>, u64)> {
    let path = events_file(dir, instance);
    let mut events = Vec::new();
    match std::fs::File::open(&path) {
        Ok(f) => {
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                events.push(
                    serde_json::from_str(&line)
                        .with_context(|| format!("{}:{}", path.display(), n + 1))?,
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    }
    let dups = match std::fs::read_to_string(dups_file(dir, instance)) {
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).context("reading the duplicate count"),
    };
    Ok((events, dups))
}

impl EventLog {
    pub fn open(state_dir: &Path) -> Result<EventLog> {
        let dir = state_dir.join(EVENTS_DIR);
        fsutil::ensure_dir(&dir)?;
        Ok(EventLog {
            dir,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Store the events not seen before; returns (accepted, duplicates).
    pub fn record(&self, instance: &str, events: Vec<StoredEvent>) -> Result<(u64, u64)> {
        let mut all = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains_key(instance) {
            let (stored, duplicates) = read_instance(&self.dir, instance)?;
            all.insert(
                instance.to_string(),
                Seen {
                    ids: stored.into_iter().map(|e| e.correlation_id).collect(),
                    duplicates,
                },
            );
        }
        let seen = all.get_mut(instance).context("instance index vanished")?;
        let mut lines = Vec::new();
        let (mut accepted, mut dups) = (0u64, 0u64);
        for e in events {
            if seen.ids.contains(&e.correlation_id) {
                dups += 1;
                continue;
            }
            lines.extend(serde_json::to_vec(&e)?);
            lines.push(b'\n');
            seen.ids.insert(e.correlation_id);
            accepted += 1;
        }
        if !lines.is_empty() {
            let path = events_file(&self.dir, instance);
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(fsutil::MODE_PUBLIC)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.write_all(&lines)
                .and_then(|()| f.sync_data())
                .with_context(|| format!("appending to {}", path.display()))?;
        }
        if dups > 0 {
            seen.duplicates += dups;
            fsutil::write_atomic(
                &dups_file(&self.dir, instance),
                format!("{}\n", seen.duplicates).as_bytes(),
                fsutil::MODE_PUBLIC,
            )?;
        }
        Ok((accepted, dups))
    }
}

/// What `events --json` prints per instance.
#[derive(Debug, Serialize)]
pub struct InstanceEvents {
    pub instance_id: String,
    pub accepted: usize,
    pub duplicates: u64,
    pub events: Vec<StoredEvent>,
}

/// Every instance's events (or one instance's) from the state directory.
pub fn list(state_dir: &Path, instance: Option<&str>) -> Result<Vec<InstanceEvents>> {
    let dir = state_dir.join(EVENTS_DIR);
    let mut ids: Vec<String> = match instance {
        Some(i) => vec![i.to_string()],
        None => match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".jsonl"))
                        .map(str::to_string)
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        },
    };
    ids.sort();
    ids.into_iter()
        .map(|id| {
            let (events, duplicates) = read_instance(&dir, &id)?;
            Ok(InstanceEvents {
                instance_id: id,
                accepted: events.len(),
                duplicates,
                events,
            })
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct EventsRequest {
    #[serde(default)]
    events: Option<Vec<Value>>,
}

fn fail(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"success": false, "error": message.into(), "code": code});
    (status, axum::Json(body)).into_response()
}

/// Check one event of the request; the stored form or why it is refused.
fn validate(i: usize, v: &Value, received_at: &str, upstream: bool) -> Result<StoredEvent, String> {
    let field = |k: &str| v.get(k);
    let kind = field("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("events[{i}].kind: required string"))?;
    let kind_ok = !kind.is_empty()
        && kind.len() <= MAX_KIND_LEN
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !kind_ok {
        return Err(format!("events[{i}].kind: invalid {kind:?}"));
    }
    let (words, default) = if upstream {
        (UPSTREAM_SEVERITIES, "low")
    } else {
        (SEVERITIES, "info")
    };
    let severity = field("severity").and_then(Value::as_str).unwrap_or(default);
    if !words.contains(&severity) {
        return Err(format!("events[{i}].severity: unknown {severity:?}"));
    }
    let payload = match field("payload") {
        None | Some(Value::Null) => json!({}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(format!("events[{i}].payload: must be an object")),
    };
    let correlation_id = field("correlation_id")
        .and_then(Value::as_str)
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| format!("events[{i}].correlation_id: required string"))?;
    let text = |k: &str| field(k).and_then(Value::as_str).map(str::to_string);
    Ok(StoredEvent {
        correlation_id: correlation_id.to_string(),
        kind: kind.to_string(),
        severity: severity.to_string(),
        payload,
        emitted_at: text("emitted_at"),
        source: text("source"),
        received_at: received_at.to_string(),
    })
}

/// `POST /api/v1/system/node_api/fleet/events`.
pub async fn post_events(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    JsonBody(body): JsonBody<EventsRequest>,
) -> Response {
    let events = match body.events {
        Some(e) if !e.is_empty() => e,
        _ => {
            return fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                "VALIDATION_ERROR",
                "events: required (non-empty array)",
            );
        }
    };
    if events.len() > MAX_EVENTS {
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            format!("events: at most {MAX_EVENTS} per request"),
        );
    }
    let now = time::OffsetDateTime::now_utc();
    let received_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut stored = Vec::with_capacity(events.len());
    for (i, v) in events.iter().enumerate() {
        match validate(i, v, &received_at, state.config.upstream_severities) {
            Ok(e) => stored.push(e),
            Err(m) => return fail(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR", m),
        }
    }
    let requested = stored.len();
    let instance = auth.instance_id.clone();
    let result = tokio::task::spawn_blocking(move || state.events.record(&instance, stored)).await;
    match result {
        Ok(Ok((accepted, duplicates))) => {
            tracing::info!(instance = %auth.instance_id, accepted, duplicates, "fleet events");
            axum::Json(json!({"success": true, "data": {
                "accepted": accepted, "duplicates": duplicates, "requested": requested,
            }}))
            .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "storing events");
            fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "Internal server error",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "event task failed");
            fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "Internal server error",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> StoredEvent {
        StoredEvent {
            correlation_id: id.into(),
            kind: "k".into(),
            severity: "info".into(),
            payload: json!({}),
            emitted_at: None,
            source: None,
            received_at: "t".into(),
        }
    }

    #[test]
    fn dedupe_survives_restart() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(d.path()).expect("open");
        assert_eq!(
            log.record("i", vec![ev("a"), ev("b"), ev("a")])
                .expect("rec"),
            (2, 1)
        );
        drop(log);
        let log = EventLog::open(d.path()).expect("open");
        assert_eq!(
            log.record("i", vec![ev("b"), ev("c")]).expect("rec"),
            (1, 1)
        );
        let l = list(d.path(), None).expect("list");
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].accepted, l[0].duplicates), (3, 2));
        let order: Vec<&str> = l[0]
            .events
            .iter()
            .map(|e| e.correlation_id.as_str())
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn validation_table() {
        let cases = [
            (json!({"kind":"a.b","correlation_id":"x"}), true),
            (
                json!({"kind":"a","severity":"critical","payload":{"n":1},"correlation_id":"x"}),
                true,
            ),
            (json!({"kind":"A","correlation_id":"x"}), false),
            (
                json!({"kind":"a","severity":"low","correlation_id":"x"}),
                false,
            ),
            (
                json!({"kind":"a","payload":[1],"correlation_id":"x"}),
                false,
            ),
            (json!({"kind":"a"}), false),
            (json!({"correlation_id":"x"}), false),
        ];
        for (v, ok) in cases {
            assert_eq!(validate(0, &v, "t", false).is_ok(), ok, "{v}");
        }
        // --upstream-severities: the upstream server's words, and only those.
        for (sev, ok) in [
            ("low", true),
            ("high", true),
            ("critical", true),
            ("info", false),
        ] {
            let v = json!({"kind":"a","severity":sev,"correlation_id":"x"});
            assert_eq!(validate(0, &v, "t", true).is_ok(), ok, "{sev}");
        }
        let defaulted = validate(0, &json!({"kind":"a","correlation_id":"x"}), "t", true);
        assert_eq!(defaulted.map(|e| e.severity).as_deref(), Ok("low"));
    }
}
