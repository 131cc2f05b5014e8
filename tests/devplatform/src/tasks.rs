//! Tasks (node-api.md Part A §4, Part B §7) with the intended semantics: `GET status/tasks`
//! lists the caller's `pending`, `acknowledged` and `running` tasks oldest first;
//! `POST status/tasks/:id/acknowledge` is an atomic claim (`pending → acknowledged` under the
//! store lock, so exactly one caller wins and every other gets 409 `ALREADY_CLAIMED`);
//! `complete` (from `acknowledged`/`running`, with `result` and `message`) and `fail` (from
//! `pending`/`acknowledged`/`running`, with `error_message`) end a task. The upstream server's
//! bugs are not reproduced: acknowledge works (upstream: 422), `fail` stores the message the
//! agent sent, and there is no server-side executor racing the agent.
//!
//! Every task records who claimed it: the serial of the client certificate the claim was made
//! with, and how many claim attempts lost (`claim_conflicts`), so tests can prove one winner.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::api::{ApiError, AppState, InstanceAuth, JsonBody, blocking, success};
use crate::store::{Outcome, Store};

pub const PENDING: &str = "pending";
pub const ACKNOWLEDGED: &str = "acknowledged";
pub const RUNNING: &str = "running";
pub const COMPLETE: &str = "complete";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";
/// Listed to the agent (Part B §7.1).
const OPEN: [&str; 3] = [PENDING, ACKNOWLEDGED, RUNNING];
/// The longest `error_message` / `message` kept; agents cap their own output well below this.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// One task as stored and as `tasks --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub instance_id: String,
    pub command: String,
    #[serde(default)]
    pub options: Value,
    pub status: String,
    #[serde(default)]
    pub progress: u8,
    /// Enqueue order; ties in `created_at` (whole seconds) are broken by it.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub acknowledged_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub claimed_by_serial: Option<String>,
    #[serde(default)]
    pub claim_conflicts: u64,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub events: Vec<TaskEvent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub timestamp: String,
}

impl Task {
    fn summary(&self) -> Value {
        json!({
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": self.progress,
            "created_at": rfc3339(self.created_at),
        })
    }

    fn full(&self) -> Value {
        let mut v = self.summary();
        if let Some(o) = v.as_object_mut() {
            o.insert("options".into(), self.options.clone());
            o.insert(
                "started_at".into(),
                json!(self.acknowledged_at.map(rfc3339)),
            );
            o.insert("events".into(), json!(self.events));
        }
        v
    }

    fn event(&mut self, kind: &str, message: &str, at: OffsetDateTime) {
        self.events.push(TaskEvent {
            kind: kind.to_owned(),
            message: message.to_owned(),
            timestamp: rfc3339(at),
        });
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn now() -> OffsetDateTime {
    let n = OffsetDateTime::now_utc();
    n.replace_nanosecond(0).unwrap_or(n)
}

/// Admin: queue `command` with `options` for an enrolled instance; returns the new task.
pub fn enqueue(state: &Path, instance: &str, command: &str, options: Value) -> Result<Task> {
    anyhow::ensure!(!command.trim().is_empty(), "--command must not be empty");
    anyhow::ensure!(
        options.is_object(),
        "--options must be a JSON object, got {options}"
    );
    let store = Store::open(state)?;
    store.transact(|s| {
        anyhow::ensure!(
            s.instances.contains_key(instance),
            "no enrolled instance {instance:?}"
        );
        s.task_seq += 1;
        let at = now();
        let mut task = Task {
            id: uuid::Uuid::new_v4().hyphenated().to_string(),
            instance_id: instance.to_owned(),
            command: command.to_owned(),
            options,
            status: PENDING.to_owned(),
            progress: 0,
            seq: s.task_seq,
            created_at: at,
            acknowledged_at: None,
            completed_at: None,
            claimed_by_serial: None,
            claim_conflicts: 0,
            result: None,
            message: None,
            error_message: None,
            events: Vec::new(),
        };
        task.event("created", "Task queued by the admin CLI", at);
        s.tasks.insert(task.id.clone(), task.clone());
        Ok((task, Outcome::Changed))
    })
}

/// Admin: cancel a task that has not ended (the agent sees it disappear from its list).
pub fn cancel(state: &Path, id: &str) -> Result<Task> {
    transition(
        state,
        id,
        &OPEN,
        CANCELLED,
        ("cancelled", "Cancelled by the admin CLI"),
    )
}

/// Admin: what the upstream server's own executor does with a new task: take it
/// (`pending → running`) and run it server-side. The node must leave such a task alone.
pub fn dispatch(state: &Path, id: &str) -> Result<Task> {
    transition(
        state,
        id,
        &[PENDING],
        RUNNING,
        ("dispatched", "Taken by the server's own executor"),
    )
}

/// Moves task `id` from one of `from` to `to`, recording `event` (kind, message).
fn transition(
    state: &Path,
    id: &str,
    from: &[&str],
    to: &str,
    (kind, message): (&str, &str),
) -> Result<Task> {
    Store::open(state)?.transact(|s| {
        let t = s
            .tasks
            .get_mut(id)
            .with_context(|| format!("no task {id:?}"))?;
        anyhow::ensure!(
            from.contains(&t.status.as_str()),
            "task {id} is {}, not {}",
            t.status,
            from.join(" or ")
        );
        t.status = to.to_owned();
        t.event(kind, message, now());
        Ok((t.clone(), Outcome::Changed))
    })
}

/// Admin: every task, oldest first, optionally of one instance.
pub fn list_all(state: &Path, instance: Option<&str>) -> Result<Vec<Task>> {
    let s = Store::open(state)?.read()?;
    let mut v: Vec<Task> = s
        .tasks
        .into_values()
        .filter(|t| instance.is_none_or(|i| t.instance_id == i))
        .collect();
    v.sort_by_key(|t| t.seq);
    Ok(v)
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "Operation not found")
}

/// Run `f` on the caller's task `id` under the store lock.
async fn with_task<T: Send + 'static>(
    state: &Arc<AppState>,
    instance: String,
    id: String,
    f: impl FnOnce(&mut Task) -> Result<(T, Outcome), ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        store.transact(|s| match s.tasks.get_mut(&id) {
            Some(t) if t.instance_id == instance => f(t),
            _ => Err(not_found()),
        })
    })
    .await
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let tasks = blocking(move || {
        let s = st.store.read()?;
        let mut open: Vec<&Task> = s
            .tasks
            .values()
            .filter(|t| t.instance_id == auth.instance_id && OPEN.contains(&t.status.as_str()))
            .collect();
        open.sort_by_key(|t| (t.created_at, t.seq));
        Ok(open.iter().map(|t| t.full()).collect::<Vec<_>>())
    })
    .await?;
    Ok(success(json!({"count": tasks.len(), "tasks": tasks})))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let task = with_task(&state, auth.instance_id, id, |t| {
        Ok((t.full(), Outcome::Unchanged))
    })
    .await?;
    Ok(success(json!({"task": task})))
}

pub async fn acknowledge(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let serial = auth.serial.clone();
    // A lost claim must be written too (the conflict count), so the error travels as a value.
    let r = with_task(&state, auth.instance_id, id, move |t| {
        if t.status != PENDING {
            t.claim_conflicts += 1;
            let e = ApiError::new(
                StatusCode::CONFLICT,
                "ALREADY_CLAIMED",
                format!("Task is {} and cannot be claimed", t.status),
            );
            return Ok((Err(e), Outcome::Changed));
        }
        let at = now();
        t.status = ACKNOWLEDGED.to_owned();
        t.acknowledged_at = Some(at);
        t.claimed_by_serial = Some(serial);
        t.event("acknowledged", "Claimed by instance", at);
        Ok((Ok(t.summary()), Outcome::Changed))
    })
    .await?;
    let summary = r?;
    Ok(success(json!({"task": summary, "acknowledged": true})))
}

#[derive(Debug, Default, Deserialize)]
pub struct CompleteRequest {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct FailRequest {
    #[serde(default)]
    error_message: Option<String>,
}

fn capped(s: Option<String>, default: &str) -> Result<String, ApiError> {
    let s = s
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| default.to_owned());
    if s.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
            format!("message longer than {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    Ok(s)
}

pub async fn complete(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<CompleteRequest>,
) -> Result<Response, ApiError> {
    let result = body.result.unwrap_or_else(|| json!({}));
    if !result.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "result must be an object",
        ));
    }
    let message = capped(body.message, "Completed by instance")?;
    let summary = with_task(&state, auth.instance_id, id, move |t| {
        if t.status != ACKNOWLEDGED && t.status != RUNNING {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("Operation cannot be completed from {} state", t.status),
            ));
        }
        let at = now();
        t.status = COMPLETE.to_owned();
        t.progress = 100;
        t.completed_at = Some(at);
        t.result = Some(result);
        t.event("completed", &message, at);
        t.message = Some(message);
        Ok((t.summary(), Outcome::Changed))
    })
    .await?;
    Ok(success(json!({"task": summary, "completed": true})))
}

pub async fn fail(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<FailRequest>,
) -> Result<Response, ApiError> {
    let message = capped(body.error_message, "Failed by instance")?;
    let summary = with_task(&state, auth.instance_id, id, move |t| {
        if !OPEN.contains(&t.status.as_str()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("Operation cannot be failed from {} state", t.status),
            ));
        }
        let at = now();
        t.status = FAILED.to_owned();
        t.completed_at = Some(at);
        t.event("failed", &message, at);
        t.error_message = Some(message);
        Ok((t.summary(), Outcome::Changed))
    })
    .await?;
    Ok(success(json!({"task": summary, "failed": true})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Instance;

    fn store_with_instance(dir: &Path) {
        Store::open(dir)
            .expect("open")
            .transact(|s| {
                s.instances
                    .insert("i-1".into(), Instance::new("i-1", now()));
                Ok::<_, anyhow::Error>(((), Outcome::Changed))
            })
            .expect("seed");
    }

    #[test]
    fn enqueue_validates_and_orders() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(enqueue(dir.path(), "i-1", "custom", json!({})).is_err());
        store_with_instance(dir.path());
        assert!(enqueue(dir.path(), "i-1", " ", json!({})).is_err());
        assert!(enqueue(dir.path(), "i-1", "custom", json!([1])).is_err());
        let a = enqueue(dir.path(), "i-1", "custom", json!({"command": "true"})).expect("a");
        let b = enqueue(dir.path(), "i-1", "restart", json!({"unit": "x.service"})).expect("b");
        assert_eq!(a.status, PENDING);
        let all = list_all(dir.path(), Some("i-1")).expect("list");
        assert_eq!(
            all.iter().map(|t| &t.id).collect::<Vec<_>>(),
            vec![&a.id, &b.id]
        );
        assert!(
            list_all(dir.path(), Some("other"))
                .expect("list")
                .is_empty()
        );
        let c = cancel(dir.path(), &a.id).expect("cancel");
        assert_eq!(c.status, CANCELLED);
        assert!(cancel(dir.path(), &a.id).is_err(), "cancel is once");
    }
}
