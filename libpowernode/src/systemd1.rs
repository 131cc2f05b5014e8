//! systemd's manager API (`org.freedesktop.systemd1`) over the system bus, and the task
//! [`Executor`] built on it. The agent runs unprivileged, so every effect goes through systemd
//! (authorised by the polkit rule the units ship), never through a child process of its own:
//! unit start/stop/restart are jobs we wait for; a shell command is an instance of the installed
//! template `powernode-task@.service` (a dynamic user without capabilities: the unit file, not
//! the agent, fixes how a task runs, so the agent needs no StartTransientUnit grant); its command
//! goes in through a file systemd reads as a credential and its output comes back in a file the
//! agent created, never through the journal; reboot is `reboot.target`.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::json;
use zbus::proxy;
use zbus::wire::OwnedObjectPath;

use crate::systemd::SystemdManagerProxy as ManagerProxy;

use crate::fsutil;
use crate::tasks::{Executor, OUTPUT_MARKER, Outcome, UnitVerb};

#[proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Service {
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
}

/// The installed template that runs shell tasks; the instance is the task id.
pub const TASK_UNIT_TEMPLATE: &str = "powernode-task@";
/// Where the agent hands a task its command (`<id>.sh`) and gets its output back (`<id>.out`),
/// both named in the template; under the runtime directory.
pub const TASKS_RUN_DIR: &str = "/run/powernode/tasks";
/// How long a unit job may take before we stop waiting (systemd's own job timeouts are longer
/// only for units that ask for it; start/stop of a normal service is seconds).
const JOB_WAIT: Duration = Duration::from_secs(300);
/// After a task's own timeout: how long its stop (SIGTERM, then SIGKILL of the cgroup after the
/// unit's 90 s stop timeout) may take.
const STOP_WAIT: Duration = Duration::from_secs(120);
/// The output file is written by the task's own uid under LimitFSIZE=; anything beyond this is
/// not read back even if the limit was raised.
const OUTPUT_READ_LIMIT: u64 = 64 * 1024 * 1024;

/// The template instance a task's shell command runs in.
pub fn task_unit(task_id: &str) -> Result<String, String> {
    let clean: String = task_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    if clean.is_empty() || clean.len() != task_id.len() {
        return Err(format!(
            "task id {task_id:?} cannot name a unit (only [A-Za-z0-9_-], ≤ 64)"
        ));
    }
    Ok(format!("{TASK_UNIT_TEMPLATE}{clean}.service"))
}

/// A task's command and output files under [`TASKS_RUN_DIR`], both the agent's own (0600).
struct TaskFiles {
    command: PathBuf,
    output: PathBuf,
}

impl TaskFiles {
    fn create(dir: &Path, task_id: &str, command: &str) -> Result<TaskFiles, String> {
        // task_unit() validated the id: it is a plain file name.
        task_unit(task_id)?;
        fsutil::ensure_dir(dir, 0o700).map_err(|e| format!("task directory: {e}"))?;
        let files = TaskFiles {
            command: dir.join(format!("{task_id}.sh")),
            output: dir.join(format!("{task_id}.out")),
        };
        fsutil::atomic_write(&files.command, command.as_bytes(), 0o600)
            .map_err(|e| format!("task command file: {e}"))?;
        // Created (empty) before the start so systemd opens our file rather than making one.
        fsutil::atomic_write(&files.output, b"", 0o600)
            .map_err(|e| format!("task output file: {e}"))?;
        Ok(files)
    }

    /// The first `cap` bytes of the output and its total size.
    fn read_output(&self, cap: usize) -> Result<(Vec<u8>, u64), String> {
        let f = fs::File::open(&self.output).map_err(|e| format!("task output: {e}"))?;
        let total = f
            .metadata()
            .map_err(|e| format!("task output: {e}"))?
            .len()
            .min(OUTPUT_READ_LIMIT);
        let mut kept = Vec::new();
        f.take(cap as u64)
            .read_to_end(&mut kept)
            .map_err(|e| format!("task output: {e}"))?;
        Ok((kept, total))
    }

    fn remove(&self) {
        for p in [&self.command, &self.output] {
            if let Err(e) = fs::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a task file");
            }
        }
    }
}

/// Limits for shell tasks.
#[derive(Debug, Clone)]
pub struct ShellLimits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// Bytes of combined stdout+stderr kept for the platform; the rest is read and dropped.
    pub output_cap: usize,
}

pub struct SystemdExecutor {
    conn: zbus::Connection,
    limits: ShellLimits,
    tasks_dir: PathBuf,
}

fn bus_err(what: &str, e: zbus::Error) -> String {
    match &e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{what}: {msg} ({name})"),
        _ => format!("{what}: {e}"),
    }
}

impl SystemdExecutor {
    pub fn new(conn: zbus::Connection, limits: ShellLimits, tasks_dir: PathBuf) -> SystemdExecutor {
        SystemdExecutor {
            conn,
            limits,
            tasks_dir,
        }
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, String> {
        let m = ManagerProxy::new(&self.conn)
            .await
            .map_err(|e| bus_err("systemd manager", e))?;
        // JobRemoved is only sent to subscribed clients; a subscription lasts as long as our
        // bus connection, so every call after the first hears AlreadySubscribed.
        match m.subscribe().await {
            Ok(()) => Ok(m),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" =>
            {
                Ok(m)
            }
            Err(e) => Err(bus_err("Subscribe", e)),
        }
    }

    /// Start a job with `start` and wait until systemd removes it; returns its result
    /// (`done`, `failed`, `canceled`, `timeout`, `dependency`, `skipped`).
    async fn job<F, Fut>(&self, m: &ManagerProxy<'static>, start: F) -> Result<String, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<OwnedObjectPath, String>>,
    {
        self.job_within(m, JOB_WAIT, start)
            .await?
            .ok_or_else(|| format!("job still running after {JOB_WAIT:?}"))
    }

    /// As [`Self::job`], but `None` when the job is still running after `wait`.
    async fn job_within<F, Fut>(
        &self,
        m: &ManagerProxy<'static>,
        wait: Duration,
        start: F,
    ) -> Result<Option<String>, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<OwnedObjectPath, String>>,
    {
        // Listen before starting the job, or a fast job ends before we look.
        let mut removed = m
            .receive_job_removed()
            .await
            .map_err(|e| bus_err("JobRemoved", e))?;
        let job = start().await?;
        let ended = async {
            while let Some(sig) = removed.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Ok(args.result.to_string());
                }
            }
            Err("systemd closed the signal stream".to_string())
        };
        match tokio::time::timeout(wait, ended).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn service_result(&self, m: &ManagerProxy<'static>, unit: &str) -> (Option<i32>, String) {
        let Ok(path) = m.get_unit(unit).await else {
            return (None, "unknown".into());
        };
        let svc = ServiceProxy::builder(&self.conn).path(path).build().await;
        match svc {
            Ok(s) => (
                s.exec_main_status().await.ok(),
                s.result().await.unwrap_or_else(|_| "unknown".into()),
            ),
            Err(_) => (None, "unknown".into()),
        }
    }
}

impl Executor for SystemdExecutor {
    async fn unit(&self, verb: UnitVerb, unit: &str) -> Result<Outcome, String> {
        let m = self.manager().await?;
        let result = self
            .job(&m, || async {
                let r = match verb {
                    UnitVerb::Start => m.start_unit(unit, "replace").await,
                    UnitVerb::Stop => m.stop_unit(unit, "replace").await,
                    UnitVerb::Restart => m.restart_unit(unit, "replace").await,
                };
                r.map_err(|e| bus_err(&format!("{} {unit}", verb.as_str()), e))
            })
            .await?;
        if result != "done" {
            let (status, why) = self.service_result(&m, unit).await;
            return Err(format!(
                "{} {unit}: job {result} (unit result {why}{})",
                verb.as_str(),
                status
                    .map(|s| format!(", exit status {s}"))
                    .unwrap_or_default()
            ));
        }
        Ok(Outcome {
            result: json!({"unit": unit, "verb": verb.as_str(), "job_result": result}),
            message: format!("{} {unit}: done", verb.as_str()),
        })
    }

    async fn reboot(&self) -> Result<Outcome, String> {
        let m = self.manager().await?;
        // Irreversible: nothing queued later may cancel the reboot.
        m.start_unit("reboot.target", "replace-irreversibly")
            .await
            .map_err(|e| bus_err("start reboot.target", e))?;
        Ok(Outcome {
            result: json!({"status": "reboot_initiated"}),
            message: "reboot initiated".into(),
        })
    }

    async fn sync(&self, name: &str) -> Result<Outcome, String> {
        // mountd owns module reconcile; ask it on the bus.
        let what = format!("{name}: module reconcile (com.powernode.Mount1.Sync)");
        let mount = crate::bus::Mount1Proxy::new(&self.conn)
            .await
            .map_err(|e| bus_err(&what, e))?;
        let generation = mount.sync().await.map_err(|e| bus_err(&what, e))?;
        Ok(Outcome {
            result: json!({"status": "reconciled", "generation": generation}),
            message: format!("{name}: modules reconciled (generation {generation})"),
        })
    }

    async fn shell(
        &self,
        task_id: &str,
        command: &str,
        timeout_secs: Option<u64>,
    ) -> Result<Outcome, String> {
        let unit = task_unit(task_id)?;
        let timeout = timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(self.limits.default_timeout)
            .min(self.limits.max_timeout);
        let files = TaskFiles::create(&self.tasks_dir, task_id, command)?;
        let m = self.manager().await?;
        // The job of a oneshot ends when the command does: wait as long as the task may run.
        let started = self
            .job_within(&m, timeout, || async {
                m.start_unit(&unit, "replace")
                    .await
                    .map_err(|e| bus_err(&format!("starting {unit}"), e))
            })
            .await;
        let (job, timed_out) = match started {
            Ok(Some(r)) => (r, false),
            Ok(None) => {
                // Over time: stop it (systemd kills the whole cgroup) and wait for that too.
                let stopped = self
                    .job_within(&m, STOP_WAIT, || async {
                        m.stop_unit(&unit, "replace")
                            .await
                            .map_err(|e| bus_err(&format!("stopping {unit}"), e))
                    })
                    .await;
                match stopped {
                    Ok(Some(_)) => {}
                    Ok(None) => tracing::warn!(unit = %unit, "a timed-out task is still stopping"),
                    Err(e) => tracing::warn!(unit = %unit, error = %e, "stopping a timed-out task"),
                }
                ("timeout".to_string(), true)
            }
            Err(e) => {
                files.remove();
                return Err(e);
            }
        };
        let (status, unit_result) = if job == "done" {
            (Some(0), "success".to_string())
        } else if timed_out {
            (None, "timeout".to_string())
        } else {
            self.service_result(&m, &unit).await
        };
        if job != "done"
            && let Err(e) = m.reset_failed_unit(&unit).await
        {
            tracing::debug!(unit = %unit, error = %e, "reset-failed");
        }
        let read = files.read_output(self.limits.output_cap);
        files.remove();
        let (out, total) = read?;
        let output = String::from_utf8_lossy(&out).into_owned();
        let truncated = total > out.len() as u64;
        if job != "done" {
            let why = match unit_result.as_str() {
                "timeout" => format!("timed out after {}s", timeout.as_secs()),
                "exit-code" => format!("exited with status {}", status.unwrap_or(-1)),
                "signal" | "core-dump" => format!("killed by signal {}", status.unwrap_or(-1)),
                other => format!("job {job}, unit result {other}"),
            };
            let tail: String = output
                .chars()
                .rev()
                .take(2048)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!("command {why}{OUTPUT_MARKER}{tail}"));
        }
        Ok(Outcome {
            result: json!({
                "command": command,
                "exit_status": 0,
                "output": output,
                "output_bytes": total,
                "output_truncated": truncated,
                "unit": unit,
            }),
            message: "command exited 0".into(),
        })
    }

    async fn abandon(&self, task_id: &str) -> Result<(), String> {
        let unit = task_unit(task_id)?;
        let m = self.manager().await?;
        match m.stop_unit(&unit, "replace").await {
            Ok(_) => Ok(()),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            Err(e) => Err(bus_err(&format!("stopping {unit}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_units() {
        assert_eq!(
            task_unit("0b6a4c1e-8a3e-4f43").as_deref(),
            Ok("powernode-task@0b6a4c1e-8a3e-4f43.service")
        );
        assert!(task_unit("a/b").is_err());
        assert!(task_unit("").is_err());
        assert!(task_unit(&"x".repeat(65)).is_err());
    }
}
