//! systemd's manager API (`org.freedesktop.systemd1`) over the system bus, and the task
//! [`Executor`] built on it. The agent runs unprivileged, so every effect goes through systemd
//! (authorised by the polkit rule the units ship), never through a child process of its own:
//! unit start/stop/restart are jobs we wait for; a shell command is a transient `oneshot` unit
//! with its own sandbox and start timeout, whose stdout and stderr come back to us through a
//! pipe passed over D-Bus, capped; reboot is `reboot.target`.

use std::os::fd::OwnedFd;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use zbus::proxy;
use zbus::wire::{Fd, OwnedObjectPath, Variant};

use crate::systemd::SystemdManagerProxy as ManagerProxy;

use crate::tasks::{Executor, Outcome, UnitVerb};

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

/// Prefix of the transient units that run shell tasks.
pub const TASK_UNIT_PREFIX: &str = "powernode-task-";
/// How long a unit job may take before we stop waiting (systemd's own job timeouts are longer
/// only for units that ask for it; start/stop of a normal service is seconds).
const JOB_WAIT: Duration = Duration::from_secs(300);
/// After the command's job ends, wait this long for the pipe to drain.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// The transient unit a task's shell command runs in.
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
    Ok(format!("{TASK_UNIT_PREFIX}{clean}.service"))
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
}

fn bus_err(what: &str, e: zbus::Error) -> String {
    match &e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{what}: {msg} ({name})"),
        _ => format!("{what}: {e}"),
    }
}

impl SystemdExecutor {
    pub fn new(conn: zbus::Connection, limits: ShellLimits) -> SystemdExecutor {
        SystemdExecutor { conn, limits }
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
        // Listen before starting the job, or a fast job ends before we look.
        let mut removed = m
            .receive_job_removed()
            .await
            .map_err(|e| bus_err("JobRemoved", e))?;
        let job = start().await?;
        let wait = async {
            while let Some(sig) = removed.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Ok(args.result.to_string());
                }
            }
            Err("systemd closed the signal stream".to_string())
        };
        tokio::time::timeout(JOB_WAIT, wait)
            .await
            .map_err(|_| format!("job {} still running after {JOB_WAIT:?}", job.as_str()))?
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

/// Read everything from `rx`, keeping the first `cap` bytes.
async fn drain(mut rx: tokio::net::unix::pipe::Receiver, cap: usize) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading task output");
                break;
            }
        }
    }
    (kept, total)
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
        let (tx, rx) = tokio::net::unix::pipe::pipe().map_err(|e| format!("pipe: {e}"))?;
        let tx: OwnedFd = tx.into_blocking_fd().map_err(|e| format!("pipe: {e}"))?;
        let tx2 = tx.try_clone().map_err(|e| format!("pipe: {e}"))?;
        let reader = tokio::spawn(drain(rx, self.limits.output_cap));
        let m = self.manager().await?;
        let micros = u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX);
        let exec_start = vec![(
            "/bin/sh".to_string(),
            vec!["/bin/sh".to_string(), "-c".to_string(), command.to_string()],
            false,
        )];
        let env = vec![format!("POWERNODE_TASK_ID={task_id}")];
        let description = format!("powernode task {task_id}");
        let props: Vec<(&str, Variant<'_>)> = vec![
            ("Description", Variant::from(description.as_str())),
            ("Type", Variant::from("oneshot")),
            ("ExecStart", Variant::from(exec_start)),
            ("Environment", Variant::from(env)),
            ("StandardInput", Variant::from("null")),
            ("StandardOutputFileDescriptor", Variant::from(Fd::from(tx))),
            ("StandardErrorFileDescriptor", Variant::from(Fd::from(tx2))),
            ("TimeoutStartUSec", Variant::from(micros)),
            // The command is the platform's to choose; the unit still keeps it away from the
            // kernel's knobs and from gaining privileges it was not started with.
            ("NoNewPrivileges", Variant::from(true)),
            ("PrivateTmp", Variant::from(true)),
            ("ProtectKernelModules", Variant::from(true)),
            ("ProtectClock", Variant::from(true)),
            ("ProtectHostname", Variant::from(true)),
            ("RestrictSUIDSGID", Variant::from(true)),
            ("LockPersonality", Variant::from(true)),
        ];
        let unit_ref = unit.as_str();
        let mref = &m;
        let result = self
            .job(&m, move || async move {
                let r = mref
                    .start_transient_unit(unit_ref, "fail", &props, &[])
                    .await;
                // systemd holds its own copies now; closing ours lets EOF arrive when the
                // command (and anything it left behind in the unit) is gone.
                drop(props);
                r.map_err(|e| bus_err(&format!("starting {unit_ref}"), e))
            })
            .await;
        let (status, unit_result) = match &result {
            Ok(r) if r == "done" => (Some(0), "success".to_string()),
            Ok(_) => self.service_result(&m, &unit).await,
            Err(_) => (None, "unknown".into()),
        };
        if result.as_ref().is_ok_and(|r| r != "done")
            && let Err(e) = m.reset_failed_unit(&unit).await
        {
            tracing::debug!(unit = %unit, error = %e, "reset-failed");
        }
        let (out, total) = match tokio::time::timeout(OUTPUT_DRAIN, reader).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(format!("output reader: {e}")),
            Err(_) => (b"<output still open after the command ended>".to_vec(), 0),
        };
        let job = result?;
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
            return Err(format!("command {why}; output: {tail}"));
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
            Ok("powernode-task-0b6a4c1e-8a3e-4f43.service")
        );
        assert!(task_unit("a/b").is_err());
        assert!(task_unit("").is_err());
        assert!(task_unit(&"x".repeat(65)).is_err());
    }
}
