//! Platform tasks (node-api.md Part A §4, Part B §7) as the agent runs them: the wire types of
//! `status/tasks`, the closed set of commands with their options validated before anything
//! runs, the in-flight journal (`tasks_state.json`, the upstream file name and shape) and the
//! recovery decision for entries a crash left behind. Executing a command is the job of an
//! [`Executor`]; the systemd one lives in [`crate::systemd1`].
//!
//! Why a journal at all: the platform only knows a task is `acknowledged`. If the agent dies
//! between the claim and the report, nobody else will ever finish it (acknowledge is a one-winner
//! claim), so the agent writes the claim down *before* acknowledging and, after a restart,
//! re-runs what is safe to re-run and reports the rest as interrupted, never leaving a task
//! silently acknowledged (the upstream agent's recovery bug).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::fsutil;
use crate::paths::Paths;

pub const PATH_TASKS: &str = "/status/tasks";
const JOURNAL_FILE: &str = "tasks_state.json";
const JOURNAL_SCHEMA: u32 = 1;
/// The journal holds at most the bounded in-flight set; anything this large is corrupt.
const MAX_JOURNAL_BYTES: u64 = 4 * 1024 * 1024;
/// systemd's own limit on unit names (UNIT_NAME_MAX).
const UNIT_NAME_MAX: usize = 255;
/// A `custom` command line longer than this is refused rather than passed to a shell.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// `GET status/tasks` → `data`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TaskList {
    #[serde(default)]
    pub tasks: Vec<Task>,
}

/// `GET status/tasks/:id` → `data`.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskEnvelope {
    pub task: Task,
}

/// A task as the platform lists it (unknown fields ignored, optional ones defaulted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub command: String,
    #[serde(default)]
    pub options: Option<Value>,
    #[serde(default)]
    pub status: String,
}

impl Task {
    /// Terminal on the platform: nothing left to do or report.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "complete" | "completed" | "failed" | "cancelled" | "aborted"
        )
    }
}

/// `POST status/tasks/:id/complete`.
#[derive(Debug, Clone, Serialize)]
pub struct CompleteRequest {
    pub result: Value,
    pub message: String,
}

/// `POST status/tasks/:id/fail` (the server reads `error_message`; upstream sent `error`).
#[derive(Debug, Clone, Serialize)]
pub struct FailRequest {
    pub error_message: String,
}

pub fn path_task(id: &str) -> String {
    format!("{PATH_TASKS}/{id}")
}

pub fn path_action(id: &str, action: &str) -> String {
    format!("{PATH_TASKS}/{id}/{action}")
}

/// Why a task cannot even start. The message is what the platform's `error_message` gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("unknown_command: {0}")]
    UnknownCommand(String),
    #[error("invalid_options: {0}")]
    InvalidOptions(String),
}

impl TaskError {
    pub fn kind(&self) -> &'static str {
        match self {
            TaskError::UnknownCommand(_) => "unknown_command",
            TaskError::InvalidOptions(_) => "invalid_options",
        }
    }
}

/// Unit verbs a task may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitVerb {
    Start,
    Stop,
    Restart,
}

impl UnitVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitVerb::Start => "start",
            UnitVerb::Stop => "stop",
            UnitVerb::Restart => "restart",
        }
    }
}

/// The commands this agent runs, parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Unit {
        verb: UnitVerb,
        unit: String,
    },
    Reboot,
    /// `sync`, `sync_modules`, `apply_config`: one module reconcile.
    Sync {
        name: String,
    },
    /// `custom`, `ssh_command`: a shell command in a transient unit.
    Shell {
        name: String,
        command: String,
        timeout_secs: Option<u64>,
    },
    /// `provision`, `deprovision`: accepted, nothing to do on the node.
    Noop {
        name: String,
    },
}

impl Command {
    pub fn parse(task: &Task) -> Result<Command, TaskError> {
        let empty = Map::new();
        let opts = match &task.options {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(TaskError::InvalidOptions(format!(
                    "options must be an object, got {}",
                    json_type_name(other)
                )));
            }
        };
        let name = task.command.as_str();
        let verb = match name {
            "start" => Some(UnitVerb::Start),
            "stop" => Some(UnitVerb::Stop),
            "restart" => Some(UnitVerb::Restart),
            _ => None,
        };
        if let Some(verb) = verb {
            let unit = required_str(opts, "unit")?;
            validate_unit_name(unit)?;
            return Ok(Command::Unit {
                verb,
                unit: unit.to_owned(),
            });
        }
        match name {
            "reboot" | "terminate" => Ok(Command::Reboot),
            "sync" | "sync_modules" | "apply_config" => Ok(Command::Sync {
                name: name.to_owned(),
            }),
            "custom" | "ssh_command" => {
                let command = required_str(opts, "command")?;
                if command.len() > MAX_COMMAND_BYTES {
                    return Err(TaskError::InvalidOptions(format!(
                        "command is longer than {MAX_COMMAND_BYTES} bytes"
                    )));
                }
                if command.contains('\0') {
                    return Err(TaskError::InvalidOptions(
                        "command contains a NUL byte".into(),
                    ));
                }
                let timeout_secs = match opts.get("timeout_seconds") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().filter(|t| *t > 0).ok_or_else(|| {
                        TaskError::InvalidOptions(format!(
                            "timeout_seconds must be a positive integer, got {v}"
                        ))
                    })?),
                };
                check_privilege_model(opts)?;
                Ok(Command::Shell {
                    name: name.to_owned(),
                    command: command.to_owned(),
                    timeout_secs,
                })
            }
            "provision" | "deprovision" => Ok(Command::Noop {
                name: name.to_owned(),
            }),
            other => Err(TaskError::UnknownCommand(other.to_owned())),
        }
    }

    /// Safe to run a second time after a crash: the same end state, no repeated side effect.
    /// Restart is deliberately not: a second restart is a second outage.
    pub fn idempotent(&self) -> bool {
        match self {
            Command::Unit { verb, .. } => *verb != UnitVerb::Restart,
            Command::Sync { .. } | Command::Noop { .. } => true,
            Command::Reboot | Command::Shell { .. } => false,
        }
    }
}

/// The privilege models a shell task may ask for (`options.privilege_model`, the upstream
/// names). Only `drop_to_nobody` runs here: the task unit (`powernode-task@.service`) is a
/// dynamic user with no capabilities, fixed by the installed unit file, not by the agent.
/// `as_user` and `privileged` would need a root-side gate checking a root-owned allow-list;
/// until one ships they are refused, which is also what an empty allow-list would do.
pub const PRIVILEGE_MODELS: [&str; 3] = ["drop_to_nobody", "as_user", "privileged"];

fn check_privilege_model(opts: &Map<String, Value>) -> Result<(), TaskError> {
    match opts.get("privilege_model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == "drop_to_nobody" => Ok(()),
        Some(Value::String(m)) if PRIVILEGE_MODELS.contains(&m.as_str()) => {
            Err(TaskError::InvalidOptions(format!(
                "privilege_model {m} is refused by this node: shell tasks run as an unprivileged \
                 dynamic user (drop_to_nobody)"
            )))
        }
        Some(other) => Err(TaskError::InvalidOptions(format!(
            "privilege_model must be one of {}, got {other}",
            PRIVILEGE_MODELS.join(", ")
        ))),
    }
}

/// "a string", "an object", …: for error messages about JSON of the wrong type.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required_str<'a>(opts: &'a Map<String, Value>, key: &str) -> Result<&'a str, TaskError> {
    match opts.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(TaskError::InvalidOptions(format!("{key} is empty"))),
        Some(v) => Err(TaskError::InvalidOptions(format!(
            "{key} must be a string, got {}",
            json_type_name(v)
        ))),
        None => Err(TaskError::InvalidOptions(format!("{key} is required"))),
    }
}

/// A unit name systemd would accept, with a type suffix, and nothing a shell or a path could
/// misread. Stricter than systemd (no `\` escapes): the platform names units, it never needs to.
pub fn validate_unit_name(unit: &str) -> Result<(), TaskError> {
    let bad = |why: &str| Err(TaskError::InvalidOptions(format!("unit {unit:?}: {why}")));
    if unit.is_empty() || unit.len() > UNIT_NAME_MAX {
        return bad("length must be 1..=255");
    }
    let Some((stem, suffix)) = unit.rsplit_once('.') else {
        return bad("no unit type suffix (e.g. .service)");
    };
    const TYPES: [&str; 11] = [
        "service",
        "socket",
        "target",
        "timer",
        "mount",
        "automount",
        "swap",
        "path",
        "slice",
        "scope",
        "device",
    ];
    if !TYPES.contains(&suffix) {
        return bad("unknown unit type");
    }
    if stem.is_empty() || stem.starts_with('-') || stem.starts_with('.') {
        return bad("empty or leading '-'/'.' name");
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.' | '@');
    if let Some(c) = stem.chars().find(|c| !ok(*c)) {
        return bad(&format!("character {c:?} is not allowed"));
    }
    if stem.matches('@').count() > 1 {
        return bad("more than one '@'");
    }
    Ok(())
}

/// Separates a failed shell task's reason from its output tail in the `fail` message. The
/// platform gets both; logs and fleet events only what comes before it ([`without_output`]).
pub const OUTPUT_MARKER: &str = "; output: ";

/// A failure message without the task output it may carry: what goes to the journal and to
/// fleet events (a command's output is the platform's, and may hold secrets).
pub fn without_output(message: &str) -> &str {
    message
        .split_once(OUTPUT_MARKER)
        .map_or(message, |(why, _)| why)
}

/// What a command produced: the `result` object and the `message` of `complete`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub result: Value,
    pub message: String,
}

/// Runs validated commands. Implementations report failures as the text the platform shows.
#[allow(async_fn_in_trait)]
pub trait Executor {
    async fn unit(&self, verb: UnitVerb, unit: &str) -> Result<Outcome, String>;
    async fn reboot(&self) -> Result<Outcome, String>;
    async fn sync(&self, name: &str) -> Result<Outcome, String>;
    async fn shell(
        &self,
        task_id: &str,
        command: &str,
        timeout_secs: Option<u64>,
    ) -> Result<Outcome, String>;
    /// Stop whatever a crashed run of `task_id` may have left running.
    async fn abandon(&self, task_id: &str) -> Result<(), String>;
}

/// Run `cmd` on `exec`. Parsing already happened; this only dispatches.
pub async fn execute<E: Executor>(
    exec: &E,
    task_id: &str,
    cmd: &Command,
) -> Result<Outcome, String> {
    match cmd {
        Command::Unit { verb, unit } => exec.unit(*verb, unit).await,
        Command::Reboot => exec.reboot().await,
        Command::Sync { name } => exec.sync(name).await,
        Command::Shell {
            command,
            timeout_secs,
            ..
        } => exec.shell(task_id, command, *timeout_secs).await,
        Command::Noop { name } => Ok(Outcome {
            result: json!({"command": name, "status": "noop_passthrough",
                "note": "nothing to do on the node for this command"}),
            message: format!("{name}: nothing to do on the node"),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Journal

/// One claimed task, written before the claim is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub command: String,
    #[serde(default)]
    pub options: Option<Value>,
    pub started_at: String,
    /// Kernel boot id when the task started: tells a finished reboot from a crash.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The platform accepted our `acknowledge`. Written after the claim, before anything runs:
    /// an entry without it never ran. Entries from before this field were all claimed.
    #[serde(default = "claimed_by_default")]
    pub claimed: bool,
    /// The `fail` message of a task we decided not to run (or not to run again), written before
    /// the report is sent: once set, the task is only ever reported, never run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
}

fn claimed_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct JournalFile {
    schema_version: u32,
    #[serde(default)]
    inflight: BTreeMap<String, InFlight>,
}

/// `tasks_state.json` under the state directory. Every change is an atomic replace (temp,
/// fsync, rename, fsync dir), so a crash leaves the old or the new set, never half of one.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(paths: &Paths) -> Journal {
        Journal {
            path: paths.state_dir().join(JOURNAL_FILE),
        }
    }

    pub fn at(path: &Path) -> Journal {
        Journal {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> crate::Result<BTreeMap<String, InFlight>> {
        let Some(bytes) = fsutil::read_optional(&self.path, MAX_JOURNAL_BYTES)? else {
            return Ok(BTreeMap::new());
        };
        let f: JournalFile = serde_json::from_slice(&bytes).map_err(|e| {
            crate::Error::malformed("task journal", format!("{}: {e}", self.path.display()))
        })?;
        if f.schema_version != JOURNAL_SCHEMA {
            return Err(crate::Error::malformed(
                "task journal",
                format!(
                    "{}: schema_version {} (this agent writes {JOURNAL_SCHEMA})",
                    self.path.display(),
                    f.schema_version
                ),
            ));
        }
        Ok(f.inflight)
    }

    fn store(&self, inflight: BTreeMap<String, InFlight>) -> crate::Result<()> {
        let f = JournalFile {
            schema_version: JOURNAL_SCHEMA,
            inflight,
        };
        let mut bytes = serde_json::to_vec_pretty(&f)
            .map_err(|e| crate::Error::malformed("task journal", e))?;
        bytes.push(b'\n');
        fsutil::atomic_write(&self.path, &bytes, 0o600)
    }

    pub fn insert(&self, id: &str, entry: InFlight) -> crate::Result<()> {
        let mut all = self.load()?;
        all.insert(id.to_owned(), entry);
        self.store(all)
    }

    pub fn remove(&self, id: &str) -> crate::Result<()> {
        let mut all = self.load()?;
        if all.remove(id).is_some() {
            self.store(all)?;
        }
        Ok(())
    }
}

/// What to do with a journal entry after a restart, given what the platform says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The platform no longer lists it as open (ended, cancelled or gone): forget it.
    Forget,
    /// Ours and never run (the claim landed, its answer was lost), or idempotent: run it.
    Rerun,
    /// Still `pending` and never run: our claim did not land. Claim it again, then run it.
    Claim,
    /// `running` on the platform: the server's own executor has it (the upstream dispatcher
    /// moves tasks `pending → running` itself). Never run by the node: forget it here.
    ServerOwned,
    /// Report it: complete (`Ok`) or fail (`Err`) with this message.
    Report(Result<String, String>),
}

/// `platform` is the task as the platform has it now (`GET status/tasks/:id`), `None` when it
/// answered 404.
pub fn recover(entry: &InFlight, platform: Option<&Task>, boot_id: &str) -> Recovery {
    let Some(task) = platform else {
        return Recovery::Forget;
    };
    if task.is_terminal() {
        return Recovery::Forget;
    }
    if let Some(msg) = &entry.not_run {
        return Recovery::Report(Err(msg.clone()));
    }
    if task.status == "running" {
        return Recovery::ServerOwned;
    }
    let parsed = Command::parse(&Task {
        id: task.id.clone(),
        command: entry.command.clone(),
        options: entry.options.clone(),
        status: task.status.clone(),
    });
    let cmd = match parsed {
        Err(e) => return Recovery::Report(Err(e.to_string())),
        Ok(c) => c,
    };
    if !entry.claimed {
        // Nothing ran: execution only starts after the claim is journaled.
        return if task.status == "pending" {
            Recovery::Claim
        } else {
            Recovery::Rerun
        };
    }
    match cmd {
        Command::Reboot if entry.boot_id.as_deref().is_some_and(|b| b != boot_id) => {
            Recovery::Report(Ok("rebooted (new kernel boot id)".into()))
        }
        c if c.idempotent() && task.status == "pending" => Recovery::Claim,
        c if c.idempotent() => Recovery::Rerun,
        c => Recovery::Report(Err(format!(
            "interrupted: the agent stopped while running {}; not re-run because it is not \
             idempotent",
            command_name(&c)
        ))),
    }
}

fn command_name(c: &Command) -> &str {
    match c {
        Command::Unit { verb, .. } => verb.as_str(),
        Command::Reboot => "reboot",
        Command::Sync { name } | Command::Shell { name, .. } | Command::Noop { name } => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(command: &str, options: Value) -> Task {
        Task {
            id: "t1".into(),
            command: command.into(),
            options: Some(options),
            status: "pending".into(),
        }
    }

    #[test]
    fn shell_tasks_run_only_as_drop_to_nobody() {
        let shell = |opts: Value| Command::parse(&task("custom", opts));
        for ok in [
            json!({"command": "id"}),
            json!({"command": "id", "privilege_model": null}),
            json!({"command": "id", "privilege_model": "drop_to_nobody"}),
        ] {
            assert!(
                matches!(shell(ok.clone()), Ok(Command::Shell { .. })),
                "{ok}"
            );
        }
        for (opts, want) in [
            (
                json!({"command": "id", "privilege_model": "privileged"}),
                "privilege_model privileged is refused",
            ),
            (
                json!({"command": "id", "privilege_model": "as_user", "user": "root"}),
                "privilege_model as_user is refused",
            ),
            (
                json!({"command": "id", "privilege_model": "root"}),
                "privilege_model must be one of drop_to_nobody, as_user, privileged",
            ),
        ] {
            let err = shell(opts).unwrap_err();
            assert_eq!(err.kind(), "invalid_options");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn failure_output_stays_out_of_logs() {
        let msg = format!("command exited with status 3{OUTPUT_MARKER}secret-token\n");
        assert_eq!(without_output(&msg), "command exited with status 3");
        assert_eq!(without_output("unknown_command: x"), "unknown_command: x");
    }

    #[test]
    fn commands_parse_and_validate() {
        let ok: &[(&str, Value, Command)] = &[
            (
                "restart",
                json!({"unit": "nginx.service"}),
                Command::Unit {
                    verb: UnitVerb::Restart,
                    unit: "nginx.service".into(),
                },
            ),
            (
                "start",
                json!({"unit": "getty@tty1.service"}),
                Command::Unit {
                    verb: UnitVerb::Start,
                    unit: "getty@tty1.service".into(),
                },
            ),
            ("terminate", json!({}), Command::Reboot),
            (
                "apply_config",
                Value::Null,
                Command::Sync {
                    name: "apply_config".into(),
                },
            ),
            (
                "custom",
                json!({"command": "echo hi", "timeout_seconds": 5}),
                Command::Shell {
                    name: "custom".into(),
                    command: "echo hi".into(),
                    timeout_secs: Some(5),
                },
            ),
            (
                "deprovision",
                json!({"extra": 1}),
                Command::Noop {
                    name: "deprovision".into(),
                },
            ),
        ];
        for (cmd, opts, want) in ok {
            assert_eq!(
                Command::parse(&task(cmd, opts.clone())).as_ref(),
                Ok(want),
                "{cmd}"
            );
        }
        let bad: &[(&str, Value, &str)] = &[
            ("format_disk", json!({}), "unknown_command: format_disk"),
            ("restart", json!({}), "invalid_options: unit is required"),
            (
                "restart",
                json!({"unit": 7}),
                "invalid_options: unit must be a string, got a number",
            ),
            ("stop", json!({"unit": "a;reboot.service"}), "not allowed"),
            ("stop", json!({"unit": "../x.service"}), "leading"),
            ("stop", json!({"unit": "x"}), "no unit type suffix"),
            ("stop", json!({"unit": "x.exe"}), "unknown unit type"),
            ("stop", json!({"unit": "a b.service"}), "not allowed"),
            ("custom", json!({"command": ""}), "command is empty"),
            ("custom", json!({"command": "x\u{0}y"}), "NUL"),
            (
                "custom",
                json!({"command": "true", "timeout_seconds": 0}),
                "timeout_seconds must be a positive integer",
            ),
            ("custom", json!([1, 2]), "options must be an object"),
        ];
        for (cmd, opts, want) in bad {
            let e = Command::parse(&task(cmd, opts.clone())).expect_err(cmd);
            assert!(e.to_string().contains(want), "{cmd} {opts}: {e}");
        }
        let long = "x".repeat(256) + ".service";
        assert!(validate_unit_name(&long).is_err());
    }

    #[test]
    fn journal_round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::at(&dir.path().join(JOURNAL_FILE));
        assert!(j.load().expect("empty").is_empty());
        let e = InFlight {
            command: "custom".into(),
            options: Some(json!({"command": "true"})),
            started_at: "2026-11-28T00:00:00Z".into(),
            boot_id: Some("b1".into()),
            claimed: true,
            not_run: None,
        };
        j.insert("a", e.clone()).expect("insert");
        j.insert("b", e.clone()).expect("insert");
        j.remove("a").expect("remove");
        j.remove("zzz").expect("removing an absent id is fine");
        let all = j.load().expect("load");
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(all["b"], e);
        let raw = std::fs::read_to_string(j.path()).expect("raw");
        assert!(raw.contains("\"schema_version\": 1"), "{raw}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(j.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        std::fs::write(j.path(), b"{\"schema_version\":1,\"inflight\":{").expect("torn");
        let err = j.load().expect_err("torn journal");
        assert!(err.to_string().contains("task journal"), "{err}");
        std::fs::write(j.path(), b"{\"schema_version\":9}").expect("future");
        assert!(
            j.load()
                .expect_err("future")
                .to_string()
                .contains("schema_version 9")
        );
    }

    #[test]
    fn recovery_decisions() {
        let entry = |command: &str, options: Value| InFlight {
            command: command.into(),
            options: Some(options),
            started_at: "2026-11-28T00:00:00Z".into(),
            boot_id: Some("boot-a".into()),
            claimed: true,
            not_run: None,
        };
        let open = |status: &str| Task {
            id: "t".into(),
            command: "ignored".into(),
            options: None,
            status: status.into(),
        };
        let stop = entry("stop", json!({"unit": "a.service"}));
        assert_eq!(recover(&stop, None, "boot-a"), Recovery::Forget);
        assert_eq!(
            recover(&stop, Some(&open("failed")), "boot-a"),
            Recovery::Forget
        );
        assert_eq!(
            recover(&stop, Some(&open("cancelled")), "boot-a"),
            Recovery::Forget
        );
        assert_eq!(
            recover(&stop, Some(&open("acknowledged")), "boot-a"),
            Recovery::Rerun
        );
        let restart = entry("restart", json!({"unit": "a.service"}));
        assert!(matches!(
            recover(&restart, Some(&open("acknowledged")), "boot-a"),
            Recovery::Report(Err(m)) if m.contains("not idempotent")
        ));
        let custom = entry("custom", json!({"command": "rm -rf /tmp/x"}));
        assert!(matches!(
            recover(&custom, Some(&open("acknowledged")), "boot-a"),
            Recovery::Report(Err(m)) if m.contains("interrupted")
        ));
        // The server's own executor has it: never run here, whatever the command.
        assert_eq!(
            recover(&custom, Some(&open("running")), "boot-a"),
            Recovery::ServerOwned
        );
        assert_eq!(
            recover(&stop, Some(&open("running")), "boot-a"),
            Recovery::ServerOwned
        );
        // Journaled, never claimed (killed before the acknowledge, or its answer lost): it
        // never ran, so it is claimed again when pending and run when already ours.
        let unclaimed = InFlight {
            claimed: false,
            ..custom.clone()
        };
        assert_eq!(
            recover(&unclaimed, Some(&open("pending")), "boot-a"),
            Recovery::Claim
        );
        assert_eq!(
            recover(&unclaimed, Some(&open("acknowledged")), "boot-a"),
            Recovery::Rerun
        );
        // Claimed and run, then put back to pending: not run a second time.
        assert!(matches!(
            recover(&custom, Some(&open("pending")), "boot-a"),
            Recovery::Report(Err(m)) if m.contains("not re-run")
        ));
        // Once reported as not run, only ever reported again.
        let reported = InFlight {
            not_run: Some("interrupted: …".into()),
            ..custom.clone()
        };
        for status in ["pending", "acknowledged", "running"] {
            assert_eq!(
                recover(&reported, Some(&open(status)), "boot-a"),
                Recovery::Report(Err("interrupted: …".into())),
                "{status}"
            );
        }
        let reboot = entry("reboot", json!({}));
        assert!(matches!(
            recover(&reboot, Some(&open("acknowledged")), "boot-b"),
            Recovery::Report(Ok(_))
        ));
        assert!(matches!(
            recover(&reboot, Some(&open("acknowledged")), "boot-a"),
            Recovery::Report(Err(_))
        ));
        let junk = entry("frobnicate", json!({}));
        assert_eq!(
            recover(&junk, Some(&open("acknowledged")), "boot-a"),
            Recovery::Report(Err("unknown_command: frobnicate".into()))
        );
    }
}
