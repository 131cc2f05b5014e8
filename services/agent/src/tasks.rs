//! The task loop of `powernode-agent service`: poll `status/tasks`, claim with `acknowledge`,
//! run through the systemd executor, report `complete` / `fail`. The claim is journaled before
//! it is sent, so a crash at any point leaves either nothing or a journal entry that the next
//! poll resolves (`powernode::tasks::recover`). Concurrency is bounded by
//! `[tasks] max_concurrent`; running tasks live in one `FuturesUnordered` on the service's
//! single-threaded runtime, so the heartbeat is never blocked behind them.
//!
//! Shutdown: stop claiming, give running tasks `[tasks] drain_secs`, then hand back what is
//! left: idempotent work stays journaled for the next start; shell commands have their unit
//! stopped and are reported as interrupted, because nobody would finish them otherwise.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use powernode::config::TasksConfig;
use powernode::paths::Paths;
use powernode::retry::RetryPolicy;
use powernode::tasks::{
    self, Command, CompleteRequest, Executor, FailRequest, InFlight, Journal, Recovery, Task,
    TaskList,
};
use powernode::transport::{InstanceClient, PlatformClient};
use powernode::{Error, bus, sysinfo};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify, watch};

/// What the D-Bus interface shows about tasks.
#[derive(Debug, Default, Clone)]
pub struct TaskStats {
    pub in_flight: u32,
    pub completed: u64,
    pub failed: u64,
    /// `<id> <command> <status>` of the last task that ended.
    pub last_task: String,
    pub last_error: String,
}

pub struct TaskLoop<E: Executor> {
    pub paths: Paths,
    pub cfg: TasksConfig,
    pub client: Mutex<InstanceClient>,
    pub exec: E,
    pub conn: Option<zbus::Connection>,
    pub stats: Arc<Mutex<TaskStats>>,
    pub poll_now: Arc<Notify>,
}

/// How one claimed task ended, for the bookkeeping after it.
enum Ended {
    Reported {
        ok: bool,
    },
    /// Left in the journal: a reboot waiting for the new boot, or a report that did not reach
    /// the platform (the next poll sees the task still open and resolves it).
    Journaled,
    Skipped,
}

/// The longest wait between task polls while they keep failing.
const POLL_BACKOFF_MAX: Duration = Duration::from_secs(600);

type Running<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = (String, Ended)> + 'a>>>;

fn now() -> String {
    powernode::pki::rfc3339(time::OffsetDateTime::now_utc())
}

impl<E: Executor> TaskLoop<E> {
    async fn api(&self) -> powernode::Result<PlatformClient> {
        Ok(self.client.lock().await.refresh()?.clone())
    }

    async fn event(&self, kind: &str, severity: &str, payload: Value) {
        bus::emit_event(self.conn.as_ref(), kind, severity, payload).await;
    }

    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        if self.cfg.poll_secs == 0 {
            tracing::info!("tasks disabled ([tasks] poll_secs = 0)");
            return;
        }
        let journal = Journal::new(&self.paths);
        let mut running: Running<'_> = FuturesUnordered::new();
        let mut active: BTreeSet<String> = BTreeSet::new();
        let mut first = true;
        // Polls failed in a row (platform down, or answering 401): back off up to
        // POLL_BACKOFF_MAX instead of asking every poll_secs.
        let mut failures: u32 = 0;
        let backoff = RetryPolicy {
            initial_delay: Duration::from_secs(self.cfg.poll_secs),
            max_delay: POLL_BACKOFF_MAX,
            deadline: Duration::MAX,
        };
        loop {
            let regular =
                Duration::from_secs(self.cfg.poll_secs).mul_f64(0.75 + fastrand::f64() / 2.0);
            let wait = if first {
                Duration::ZERO
            } else if failures > 0 {
                regular.max(backoff.delay(failures, None, fastrand::f64()))
            } else {
                regular
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.poll_now.notified() => tracing::debug!("task poll requested"),
                Some((id, ended)) = running.next() => {
                    self.finished(&mut active, &id, ended).await;
                    continue;
                }
                _ = stop.changed() => break,
            }
            first = false;
            match self.poll(&journal, &mut running, &mut active).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(kind = %e.kind(), error = %e, failures, "task poll failed");
                    self.stats.lock().await.last_error = format!("task poll: {e}");
                }
            }
        }
        self.drain(&journal, running, &mut active).await;
    }

    async fn finished(&self, active: &mut BTreeSet<String>, id: &str, ended: Ended) {
        active.remove(id);
        let mut s = self.stats.lock().await;
        s.in_flight = u32::try_from(active.len()).unwrap_or(u32::MAX);
        match ended {
            Ended::Reported { ok: true } => s.completed += 1,
            Ended::Reported { ok: false } => s.failed += 1,
            Ended::Journaled | Ended::Skipped => {}
        }
    }

    async fn poll<'a>(
        &'a self,
        journal: &Journal,
        running: &mut Running<'a>,
        active: &mut BTreeSet<String>,
    ) -> powernode::Result<()> {
        let list: TaskList = self.api().await?.get(tasks::PATH_TASKS).await?;
        let boot_id = sysinfo::boot_id(&self.paths)?;
        // Journal entries first: what a crash (or a lost claim or report) left behind. Each is
        // decided on the task's own current state, never on the list fetched above, which may
        // already be stale by the time an entry is resolved.
        let mut resolved: BTreeSet<String> = BTreeSet::new();
        for (id, entry) in journal.load()? {
            if active.contains(&id) {
                continue;
            }
            resolved.insert(id.clone());
            let current = match self.task_state(&id).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "cannot read a journaled task's state; keeping it");
                    continue;
                }
            };
            match tasks::recover(&entry, current.as_ref(), &boot_id) {
                Recovery::Forget => {
                    tracing::info!(task = %id, "journaled task no longer open on the platform");
                    journal.remove(&id)?;
                }
                Recovery::ServerOwned => {
                    tracing::info!(task = %id, command = %entry.command, "the platform runs this task itself; not run here");
                    journal.remove(&id)?;
                }
                Recovery::Report(r) => {
                    if let Err(e) = self.exec.abandon(&id).await {
                        tracing::warn!(task = %id, error = %e, "cannot stop a left-over task unit");
                    }
                    let (ok, msg) = match r {
                        Ok(m) => (true, m),
                        Err(m) => (false, m),
                    };
                    if !ok {
                        // Written before the report: whatever happens to it, this task is
                        // never run again, only reported.
                        journal.insert(
                            &id,
                            InFlight {
                                not_run: Some(msg.clone()),
                                ..entry.clone()
                            },
                        )?;
                    }
                    tracing::warn!(task = %id, command = %entry.command, ok, "{msg}");
                    let outcome = if ok {
                        Ok(tasks::Outcome {
                            result: json!({"status": "recovered"}),
                            message: msg,
                        })
                    } else {
                        Err(msg)
                    };
                    let ended = self.report(journal, &id, &entry.command, outcome).await;
                    self.finished(active, &id, ended).await;
                }
                Recovery::Claim => {
                    tracing::info!(task = %id, command = %entry.command, "claiming a journaled task whose claim never landed");
                    let task = Task {
                        id: id.clone(),
                        command: entry.command.clone(),
                        options: entry.options.clone(),
                        status: "pending".into(),
                    };
                    active.insert(id.clone());
                    running.push(Box::pin(self.claim_and_run(
                        journal.clone(),
                        task,
                        boot_id.clone(),
                    )));
                }
                Recovery::Rerun => {
                    tracing::info!(task = %id, command = %entry.command, "running a claimed task interrupted by a restart");
                    let task = Task {
                        id: id.clone(),
                        command: entry.command.clone(),
                        options: entry.options.clone(),
                        status: "acknowledged".into(),
                    };
                    active.insert(id.clone());
                    running.push(Box::pin(self.execute(journal.clone(), task)));
                }
            }
        }
        for task in &list.tasks {
            if active.len() >= self.cfg.max_concurrent {
                break;
            }
            // Only `pending` tasks are ours to claim: `running` ones belong to the platform's
            // own executor, and anything recovery looked at this round is decided already.
            if task.status != "pending" || active.contains(&task.id) || resolved.contains(&task.id)
            {
                continue;
            }
            active.insert(task.id.clone());
            self.stats.lock().await.in_flight = u32::try_from(active.len()).unwrap_or(u32::MAX);
            running.push(Box::pin(self.claim_and_run(
                journal.clone(),
                task.clone(),
                boot_id.clone(),
            )));
        }
        Ok(())
    }

    /// `GET status/tasks/:id`: the task now, `None` when the platform no longer has it.
    async fn task_state(&self, id: &str) -> powernode::Result<Option<Task>> {
        match self
            .api()
            .await?
            .get::<tasks::TaskEnvelope>(&tasks::path_task(id))
            .await
        {
            Ok(env) => Ok(Some(env.task)),
            Err(Error::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Journal, claim, run, report.
    async fn claim_and_run(
        &self,
        journal: Journal,
        task: Task,
        boot_id: String,
    ) -> (String, Ended) {
        let id = task.id.clone();
        let entry = InFlight {
            command: task.command.clone(),
            options: task.options.clone(),
            started_at: now(),
            boot_id: Some(boot_id),
            claimed: false,
            not_run: None,
        };
        if let Err(e) = journal.insert(&id, entry.clone()) {
            // Without the journal a crash would strand the claim: do not claim.
            tracing::error!(task = %id, error = %e, "cannot journal the task; not claiming it");
            self.stats.lock().await.last_error = format!("task journal: {e}");
            return (id, Ended::Skipped);
        }
        powernode::fault::point("task-journaled");
        let ack: powernode::Result<Value> = match self.api().await {
            Ok(c) => {
                c.post(&tasks::path_action(&id, "acknowledge"), &json!({}))
                    .await
            }
            Err(e) => Err(e),
        };
        match ack {
            Ok(_) => {
                // Ours now. Recorded before anything runs, so a restart knows it may have run.
                let claimed = InFlight {
                    claimed: true,
                    ..entry
                };
                if let Err(e) = journal.insert(&id, claimed) {
                    tracing::error!(task = %id, error = %e, "cannot journal the claim; not running the task");
                    self.stats.lock().await.last_error = format!("task journal: {e}");
                    return (id, Ended::Journaled);
                }
            }
            Err(Error::Refused { status: 409, .. }) | Err(Error::Refused { status: 404, .. }) => {
                tracing::info!(task = %id, "task claimed elsewhere or gone; skipping");
                if let Err(e) = journal.remove(&id) {
                    tracing::warn!(task = %id, error = %e, "cannot drop the journal entry");
                }
                return (id, Ended::Skipped);
            }
            Err(e) => {
                // The claim may or may not have landed; the journal entry stays and the next
                // poll sees `pending` (claim again) or `acknowledged` (ours: recover).
                tracing::warn!(task = %id, error = %e, "acknowledge failed");
                return (id, Ended::Journaled);
            }
        }
        powernode::fault::point("task-claimed");
        self.execute(journal, task).await
    }

    async fn execute(&self, journal: Journal, task: Task) -> (String, Ended) {
        let id = task.id.clone();
        tracing::info!(task = %id, command = %task.command, "running task");
        let outcome = match Command::parse(&task) {
            Err(e) => Err(e.to_string()),
            Ok(Command::Reboot) => match tasks::execute(&self.exec, &id, &Command::Reboot).await {
                // Reported after the reboot, when the boot id has changed.
                Ok(_) => {
                    powernode::systemd::status("reboot initiated by a task");
                    return (id, Ended::Journaled);
                }
                Err(e) => Err(e),
            },
            Ok(cmd) => tasks::execute(&self.exec, &id, &cmd).await,
        };
        let ended = self.report(&journal, &id, &task.command, outcome).await;
        (id, ended)
    }

    async fn report(
        &self,
        journal: &Journal,
        id: &str,
        command: &str,
        outcome: Result<tasks::Outcome, String>,
    ) -> Ended {
        let ok = outcome.is_ok();
        let sent = match self.api().await {
            Err(e) => Err(e),
            Ok(c) => match &outcome {
                Ok(o) => {
                    let body = CompleteRequest {
                        result: o.result.clone(),
                        message: o.message.clone(),
                    };
                    c.post::<_, Value>(&tasks::path_action(id, "complete"), &body)
                        .await
                }
                Err(msg) => {
                    let body = FailRequest {
                        error_message: msg.clone(),
                    };
                    c.post::<_, Value>(&tasks::path_action(id, "fail"), &body)
                        .await
                }
            },
        };
        let status = if ok { "complete" } else { "failed" };
        match &outcome {
            Ok(o) => {
                tracing::info!(task = %id, command, "task complete: {}", o.message);
                self.event(
                    "task.completed",
                    "info",
                    json!({"task_id": id, "command": command}),
                )
                .await;
            }
            Err(m) => {
                // The output tail is for the platform's report only.
                let why = tasks::without_output(m);
                tracing::warn!(task = %id, command, error = %why, "task failed");
                self.event(
                    "task.failed",
                    "error",
                    json!({"task_id": id, "command": command, "error": why}),
                )
                .await;
            }
        }
        {
            let mut s = self.stats.lock().await;
            s.last_task = format!("{id} {command} {status}");
        }
        match sent {
            Ok(_) => {}
            // The platform ended it already (cancelled, or failed by an operator): done.
            Err(Error::Refused {
                status: 400 | 404, ..
            }) => {
                tracing::info!(task = %id, "platform no longer accepts a report for this task");
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "cannot report the task; will retry from the journal");
                self.stats.lock().await.last_error = format!("task report: {e}");
                return Ended::Journaled;
            }
        }
        if let Err(e) = journal.remove(id) {
            tracing::warn!(task = %id, error = %e, "cannot drop the journal entry");
        }
        Ended::Reported { ok }
    }

    async fn drain(
        &self,
        journal: &Journal,
        mut running: Running<'_>,
        active: &mut BTreeSet<String>,
    ) {
        if running.is_empty() {
            return;
        }
        let n = running.len();
        tracing::info!(tasks = n, "stopping: waiting for running tasks");
        powernode::systemd::status(&format!("stopping: {n} task(s) still running"));
        let deadline = tokio::time::sleep(Duration::from_secs(self.cfg.drain_secs));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = running.next() => match next {
                    Some((id, ended)) => self.finished(active, &id, ended).await,
                    None => return,
                },
                _ = &mut deadline => break,
            }
        }
        // Cancel what is left. Idempotent work stays journaled and is re-run at the next start;
        // shell commands are stopped and reported, since nothing would ever finish them.
        drop(running);
        let left: Vec<String> = active.iter().cloned().collect();
        let entries = journal.load().unwrap_or_default();
        for id in left {
            let Some(entry) = entries.get(&id) else {
                continue;
            };
            let idempotent = Command::parse(&Task {
                id: id.clone(),
                command: entry.command.clone(),
                options: entry.options.clone(),
                status: String::new(),
            })
            .map(|c| c.idempotent())
            .unwrap_or(false);
            if idempotent {
                tracing::info!(task = %id, "handed back: re-run at the next start");
                continue;
            }
            if let Err(e) = self.exec.abandon(&id).await {
                tracing::warn!(task = %id, error = %e, "cannot stop the task's unit");
            }
            let msg = format!(
                "interrupted: the agent stopped before {} finished ({}s drain); its unit was stopped",
                entry.command, self.cfg.drain_secs
            );
            self.report(journal, &id, &entry.command, Err(msg)).await;
        }
    }
}
