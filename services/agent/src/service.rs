//! `powernode-agent service`: the resident agent. Makes sure the node is enrolled (through
//! identityd and enrolld on the bus), then heartbeats on the platform's cadence. Publishes its
//! state on `com.powernode.Agent1`, reports readiness and status to systemd and pings the
//! watchdog from the same runtime that does the work, so a wedged runtime is restarted.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use powernode::api::{HeartbeatRequest, HeartbeatResponse, PATH_HEARTBEAT};
use powernode::bus::{AGENT_NAME, AGENT_PATH, BusError, Enroll1Proxy, error_from_bus};
use powernode::config::Config;
use powernode::paths::Paths;
use powernode::pki::{Credentials, PkiStore};
use powernode::retry::RetryPolicy;
use powernode::sandbox::Profile;
use powernode::systemd1::{ShellLimits, SystemdExecutor};
use powernode::transport::InstanceClient;
use powernode::{Error, ErrorKind, heartbeat, systemd};
use tokio::sync::{Mutex, Notify, watch};

use crate::tasks::{TaskLoop, TaskStats};
use zbus::object_server::{InterfaceRef, SignalEmitter};

use crate::cli::ServiceArgs;
use crate::output::EXIT_UNREACHABLE;

/// Shared between the loop and the D-Bus interface.
#[derive(Debug, Default, Clone)]
struct State {
    instance_id: String,
    state: &'static str,
    last_heartbeat: String,
    heartbeat_count: u64,
    next_poll_seconds: u64,
    last_error: String,
    certificate_state: String,
}

struct AgentIface {
    state: Arc<Mutex<State>>,
    beat_now: Arc<Notify>,
    tasks: Arc<Mutex<TaskStats>>,
    poll_tasks: Arc<Notify>,
}

#[zbus::interface(name = "com.powernode.Agent1")]
impl AgentIface {
    /// Send a heartbeat now instead of at the next tick.
    async fn heartbeat_now(&self) -> Result<(), BusError> {
        self.beat_now.notify_one();
        Ok(())
    }

    /// Poll the platform for tasks now instead of at the next tick.
    async fn poll_tasks_now(&self) -> Result<(), BusError> {
        self.poll_tasks.notify_one();
        Ok(())
    }

    /// Tasks claimed and not yet reported.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn in_flight_tasks(&self) -> u32 {
        self.tasks.lock().await.in_flight
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn tasks_completed(&self) -> u64 {
        self.tasks.lock().await.completed
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn tasks_failed(&self) -> u64 {
        self.tasks.lock().await.failed
    }

    /// `<id> <command> <complete|failed>` of the last task that ended; empty before the first.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn last_task(&self) -> String {
        self.tasks.lock().await.last_task.clone()
    }

    #[zbus(property)]
    async fn instance_id(&self) -> String {
        self.state.lock().await.instance_id.clone()
    }

    /// `starting`, `enrolling`, `running`, `degraded` (last heartbeat failed) or `refused`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.state.lock().await.state.to_string()
    }

    /// RFC 3339 time of the last acknowledged heartbeat; empty before the first.
    #[zbus(property)]
    async fn last_heartbeat(&self) -> String {
        self.state.lock().await.last_heartbeat.clone()
    }

    #[zbus(property)]
    async fn heartbeat_count(&self) -> u64 {
        self.state.lock().await.heartbeat_count
    }

    #[zbus(property)]
    async fn next_poll_seconds(&self) -> u64 {
        self.state.lock().await.next_poll_seconds
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.state.lock().await.last_error.clone()
    }

    /// `valid`, `due`, `overdue` (certd has not rotated in time), `expired` or `clock-untrusted`.
    #[zbus(property)]
    async fn certificate_state(&self) -> String {
        self.state.lock().await.certificate_state.clone()
    }
}

struct Agent {
    paths: Paths,
    cfg: Config,
    conn: zbus::Connection,
    iface: InterfaceRef<AgentIface>,
    state: Arc<Mutex<State>>,
    beat_now: Arc<Notify>,
    tasks: Arc<Mutex<TaskStats>>,
    poll_tasks: Arc<Notify>,
}

impl Agent {
    async fn update(&self, f: impl FnOnce(&mut State)) {
        let before = self.state.lock().await.clone();
        let after = {
            let mut s = self.state.lock().await;
            f(&mut s);
            s.clone()
        };
        if let Err(e) = self.emit_changes(&before, &after).await {
            tracing::warn!(error = %e, "cannot emit PropertiesChanged");
        }
    }

    async fn emit_changes(&self, b: &State, a: &State) -> zbus::Result<()> {
        let i = self.iface.get().await;
        let e: &SignalEmitter<'_> = self.iface.signal_emitter();
        if b.instance_id != a.instance_id {
            i.instance_id_changed(e).await?;
        }
        if b.state != a.state {
            i.state_changed(e).await?;
        }
        if b.last_heartbeat != a.last_heartbeat {
            i.last_heartbeat_changed(e).await?;
        }
        if b.heartbeat_count != a.heartbeat_count {
            i.heartbeat_count_changed(e).await?;
        }
        if b.next_poll_seconds != a.next_poll_seconds {
            i.next_poll_seconds_changed(e).await?;
        }
        if b.last_error != a.last_error {
            i.last_error_changed(e).await?;
        }
        if b.certificate_state != a.certificate_state {
            i.certificate_state_changed(e).await?;
        }
        Ok(())
    }

    /// PKI from disk, enrolling through enrolld first when there is none. Transient failures are
    /// retried with the retry policy, forever; a refusal (consumed or expired token) is final.
    async fn credentials(&self) -> powernode::Result<Credentials> {
        let store = PkiStore::new(self.paths.pki_dir());
        let policy = RetryPolicy::from(&self.cfg.retry);
        loop {
            if let Some(c) = store.load()? {
                return Ok(c);
            }
            self.update(|s| s.state = "enrolling").await;
            systemd::status("enrolling: asking com.powernode.Enroll1");
            let proxy = Enroll1Proxy::new(&self.conn).await?;
            // Retry transient failures within one policy window, then keep trying at the cap.
            let r = policy
                .run(|_| async { proxy.enroll().await.map_err(error_from_bus) })
                .await;
            match r {
                Ok(id) => tracing::info!(instance = %id, "enrolled through enrolld"),
                // The platform or a sibling daemon is not there yet: keep trying at the cap.
                Err(e) if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Bus) => {
                    self.update(|s| s.last_error = e.to_string()).await;
                    systemd::status(&format!("enrollment pending: {e}"));
                    tracing::warn!(error = %e, "platform unreachable, will retry enrollment");
                    // Spread the retries of a fleet that lost its platform together.
                    tokio::time::sleep(policy.delay(u32::MAX, None, 0.5 + fastrand::f64() / 2.0))
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn beat(&self, client: &mut InstanceClient) -> powernode::Result<HeartbeatResponse> {
        // What mountd composed (state.json), else what the initramfs composed as the root
        // (/run/powernode/boot.json); a torn file is reported, never read as "nothing".
        let (mut digests, mut mounted) = match powernode::mount::load_state(&self.paths) {
            Ok(st) => (st.module_digests(), st.union_mounted),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the module state for the heartbeat");
                (BTreeMap::new(), false)
            }
        };
        if digests.is_empty() {
            match powernode::sysroot::BootRecord::load(&self.paths) {
                Ok(Some(r)) => {
                    digests = r.module_digests();
                    mounted = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the boot record for the heartbeat")
                }
            }
        }
        let payload: HeartbeatRequest = heartbeat::gather(&self.paths, digests, mounted)?;
        let r: HeartbeatResponse = client.post(PATH_HEARTBEAT, &payload).await?;
        // An mTLS-authenticated platform time: evidence for the clock-trust decision.
        if let Some(t) = r.server_time.as_deref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        }) && let Err(e) = powernode::clock::record(&self.paths, t)
        {
            tracing::warn!(error = %e, "cannot record platform time");
        }
        Ok(r)
    }

    /// Watch certd's work from the outside: a rotation overdue by a tenth of the lifetime, or an
    /// expired certificate, is reported as a critical event on every heartbeat until fixed.
    async fn watch_certificate(&self) {
        let verdict = (|| -> powernode::Result<Option<String>> {
            let Some(creds) = PkiStore::new(self.paths.pki_dir()).load()? else {
                return Ok(None);
            };
            let now = time::OffsetDateTime::now_utc();
            let trust = powernode::clock::judge(now, false, powernode::clock::load(&self.paths)?);
            let (info, v) = powernode::rotation::decide(now, &trust, &creds)?;
            let grace = (info.not_after - info.not_before) / 10;
            Ok(Some(match v {
                powernode::rotation::Verdict::Due { renew_at } if now > renew_at + grace => {
                    tracing::error!(
                        event = "system.cert.rotation_failed",
                        severity = "critical",
                        serial = %info.serial,
                        renew_at = %powernode::pki::rfc3339(renew_at),
                        "certificate rotation overdue; is powernode-certd-rotate.timer running?"
                    );
                    "overdue".to_string()
                }
                powernode::rotation::Verdict::Expired { not_after } => {
                    tracing::error!(
                        event = "system.cert.rotation_failed",
                        severity = "critical",
                        serial = %info.serial,
                        not_after = %powernode::pki::rfc3339(not_after),
                        "certificate expired"
                    );
                    "expired".to_string()
                }
                other => other.state().to_string(),
            }))
        })();
        match verdict {
            Ok(Some(state)) => self.update(|s| s.certificate_state = state).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot assess the certificate"),
        }
    }

    /// Enroll if needed, then heartbeat and run tasks until `stop` turns true.
    async fn run(&self, stop: watch::Receiver<bool>) -> powernode::Result<()> {
        let creds = self.credentials().await?;
        // Follows rotations by certd: each request uses the current credentials.
        let mut client = InstanceClient::new(
            self.cfg.platform.clone(),
            PkiStore::new(self.paths.pki_dir()),
        );
        let instance = creds.meta.instance_id.clone();
        let platform = client.refresh()?.base_url().to_string();
        self.update(|s| {
            s.instance_id = instance.clone();
            s.state = "running";
        })
        .await;
        tracing::info!(instance = %instance, platform = %platform, "heartbeating");
        let exec = SystemdExecutor::new(
            self.conn.clone(),
            ShellLimits {
                default_timeout: Duration::from_secs(self.cfg.tasks.command_timeout_secs),
                max_timeout: Duration::from_secs(self.cfg.tasks.max_command_timeout_secs),
                output_cap: self.cfg.tasks.output_cap_bytes,
            },
            self.paths.under(powernode::systemd1::TASKS_RUN_DIR),
        );
        let task_loop = TaskLoop {
            paths: self.paths.clone(),
            cfg: self.cfg.tasks.clone(),
            client: Mutex::new(InstanceClient::new(
                self.cfg.platform.clone(),
                PkiStore::new(self.paths.pki_dir()),
            )),
            exec,
            conn: Some(self.conn.clone()),
            stats: self.tasks.clone(),
            poll_now: self.poll_tasks.clone(),
        };
        tokio::join!(
            self.heartbeats(&mut client, stop.clone()),
            task_loop.run(stop)
        );
        Ok(())
    }

    async fn heartbeats(&self, client: &mut InstanceClient, mut stop: watch::Receiver<bool>) {
        let mut next_poll: Option<u64> = None;
        loop {
            match self.beat(client).await {
                Ok(r) => {
                    next_poll = r.next_poll_seconds.or(next_poll);
                    let at = r.server_time.unwrap_or_else(|| {
                        powernode::pki::rfc3339(time::OffsetDateTime::now_utc())
                    });
                    let np = heartbeat::base_interval(next_poll, &self.cfg.heartbeat).as_secs();
                    self.update(|s| {
                        s.state = "running";
                        s.last_heartbeat = at.clone();
                        s.heartbeat_count += 1;
                        s.next_poll_seconds = np;
                        s.last_error.clear();
                    })
                    .await;
                    systemd::status(&format!("heartbeat ok at {at}; next in ~{np}s"));
                }
                Err(e) => {
                    tracing::warn!(kind = %e.kind(), error = %e, "heartbeat failed");
                    systemd::status(&format!("heartbeat failed: {e}"));
                    self.update(|s| {
                        s.state = "degraded";
                        s.last_error = e.to_string();
                    })
                    .await;
                }
            }
            self.watch_certificate().await;
            let wait = heartbeat::next_delay(next_poll, &self.cfg.heartbeat);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.beat_now.notified() => tracing::info!("heartbeat requested over D-Bus"),
                _ = stop.changed() => return,
            }
        }
    }
}

async fn watchdog(period: Duration) {
    let mut t = tokio::time::interval(period);
    loop {
        t.tick().await;
        systemd::watchdog_ping();
    }
}

async fn serve(paths: Paths, mut cfg: Config, args: ServiceArgs) -> anyhow::Result<()> {
    if let Some(u) = args.platform_url {
        cfg.platform.url = Some(u);
    }
    let state = Arc::new(Mutex::new(State {
        state: "starting",
        ..State::default()
    }));
    let beat_now = Arc::new(Notify::new());
    let tasks = Arc::new(Mutex::new(TaskStats::default()));
    let poll_tasks = Arc::new(Notify::new());
    let conn = zbus::connection::Builder::system()
        .name(AGENT_NAME)
        .serve_at(
            AGENT_PATH,
            AgentIface {
                state: state.clone(),
                beat_now: beat_now.clone(),
                tasks: tasks.clone(),
                poll_tasks: poll_tasks.clone(),
            },
        )
        .build()
        .await
        .with_context(|| format!("owning {AGENT_NAME} on the system bus"))?;
    let iface = conn
        .object_server()
        .interface::<_, AgentIface>(AGENT_PATH)
        .await?;
    let drain = Duration::from_secs(cfg.tasks.drain_secs);
    let agent = Agent {
        paths,
        cfg,
        conn,
        iface,
        state,
        beat_now,
        tasks,
        poll_tasks,
    };
    // Ready as soon as we serve the bus: enrollment may wait on the platform for a long time and
    // must not count against the start timeout.
    systemd::ready("started; checking enrollment");
    let dog = async {
        match systemd::watchdog_period() {
            Some(p) => watchdog(p).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(dog);
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = agent.run(stop_rx);
    tokio::pin!(run);
    let signalled = tokio::select! {
        r = &mut run => {
            let e = match r { Ok(()) => return Ok(()), Err(e) => e };
            agent.update(|s| { s.state = if e.kind() == ErrorKind::Refused { "refused" } else { "degraded" }; s.last_error = e.to_string(); }).await;
            systemd::status(&format!("failed: {e}"));
            return Err(anyhow::Error::new(e));
        }
        _ = &mut dog => return Ok(()),
        r = powernode::daemon::shutdown_signal() => r,
    };
    signalled?;
    // Stop claiming, let running tasks finish (bounded), hand back the rest; keep the watchdog
    // fed meanwhile. A second signal or the outer bound ends it regardless.
    systemd::stopping("stopping: draining tasks");
    tracing::info!("signal: stopping, draining tasks");
    if stop_tx.send(true).is_err() {
        tracing::debug!("task loop already gone");
    }
    let bound = drain + Duration::from_secs(10);
    tokio::select! {
        _ = &mut run => tracing::info!("drained, exiting"),
        _ = &mut dog => {}
        _ = tokio::time::sleep(bound) => tracing::warn!(after = ?bound, "drain did not finish; exiting anyway"),
        _ = powernode::daemon::shutdown_signal() => tracing::warn!("second signal: exiting without waiting"),
    }
    Ok(())
}

pub fn entry(paths: Paths, args: ServiceArgs) -> ExitCode {
    powernode::daemon::init_logging("powernode-agent");
    let result = (|| -> anyhow::Result<()> {
        let cfg = Config::load(&paths)?;
        let rt = powernode::daemon::start(Profile::Agent, &paths)?;
        rt.block_on(serve(paths, cfg, args))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            let code = match e.downcast_ref::<Error>() {
                Some(pe) => pe.kind().exit_code() as u8,
                None => 1,
            };
            // Refused and unreachable-at-enrollment both exit 5; the unit stops restarting on 5.
            ExitCode::from(if code == EXIT_UNREACHABLE {
                EXIT_UNREACHABLE
            } else {
                1
            })
        }
    }
}
