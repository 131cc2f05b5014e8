//! powernode-certd: keeps the node's mTLS certificate and instance JWT alive.
//!
//! Two ways in: `--once` (what `powernode-certd-rotate.timer` runs every 6 h and at boot) checks
//! and rotates if due, then exits; without it, the daemon serves `com.powernode.Cert1` on D-Bus
//! (properties, `RotateNow()`, the `CertificateRotated` signal) until idle. Both share one
//! rotation lock, so they never rotate concurrently. Every other process picks the new
//! credentials up by itself before its next request ([`powernode::transport::InstanceClient`]).
//!
//! Events (`system.cert.rotated`, `system.cert.rotation_failed`) are logged with an `event`
//! field until the fleet event path exists.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use powernode::bus::{BusError, CERT_NAME, CERT_PATH, Timedate1Proxy};
use powernode::clock;
use powernode::config::Config;
use powernode::paths::Paths;
use powernode::pki::{PkiStore, rfc3339};
use powernode::retry::RetryPolicy;
use powernode::rotation::{self, Verdict};
use powernode::sandbox::Profile;
use powernode::systemd::IdleTracker;
use powernode::{Error, ErrorKind};
use time::OffsetDateTime;
use zbus::object_server::SignalEmitter;

#[derive(Debug, Parser)]
#[command(
    name = "powernode-certd",
    version,
    about = "Certificate lifecycle daemon (com.powernode.Cert1)"
)]
pub struct Args {
    /// Node root: every path is taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Check once, rotate if due, exit (the timer's mode).
    #[arg(long)]
    pub once: bool,
    /// With --once: rotate even if not due (the clock must still be trusted).
    #[arg(long, requires = "once")]
    pub force: bool,
    /// With --once: print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What a check concluded, for properties, the CLI and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub renew_at: String,
    /// `valid`, `due`, `rotated`, `expired`, `clock-untrusted`, `failed`, `not-enrolled`.
    pub state: String,
    pub last_error: String,
}

impl Status {
    /// What a verdict on a certificate shows, before any rotation is attempted.
    fn of(info: &powernode::pki::CertInfo, v: &Verdict) -> Status {
        Status {
            serial: info.serial.clone(),
            not_before: rfc3339(info.not_before),
            not_after: rfc3339(info.not_after),
            renew_at: match v {
                Verdict::NotDue { renew_at } | Verdict::Due { renew_at } => rfc3339(*renew_at),
                _ => String::new(),
            },
            state: v.state().into(),
            last_error: match v {
                Verdict::ClockUntrusted(why) => why.clone(),
                _ => String::new(),
            },
        }
    }
}

/// NTP state from systemd-timedated; "not synchronised" when it cannot be asked.
async fn ntp_synchronized(conn: Option<&zbus::Connection>) -> bool {
    let Some(conn) = conn else { return false };
    match Timedate1Proxy::new(conn).await {
        Ok(p) => p.ntp_synchronized().await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "timedated unavailable; treating the clock as unsynchronised");
            false
        }),
        Err(_) => false,
    }
}

/// Check the credentials and rotate when due (or `force`d). Never touches them otherwise.
pub async fn check(
    paths: &Paths,
    cfg: &Config,
    conn: Option<&zbus::Connection>,
    force: bool,
) -> (Status, Result<Option<String>, Error>) {
    let store = PkiStore::new(paths.pki_dir());
    let creds = match store.load() {
        Ok(Some(c)) => c,
        Ok(None) => {
            return (
                Status {
                    state: "not-enrolled".into(),
                    ..Status::default()
                },
                Ok(None),
            );
        }
        Err(e) => {
            return (
                Status {
                    state: "failed".into(),
                    last_error: e.to_string(),
                    ..Status::default()
                },
                Err(e),
            );
        }
    };
    let now = OffsetDateTime::now_utc();
    let evidence = clock::load(paths).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "clock evidence unreadable; ignoring it");
        None
    });
    let trust = clock::judge(now, ntp_synchronized(conn).await, evidence);
    let (info, verdict) = match rotation::decide(now, &trust, &creds) {
        Ok(v) => v,
        Err(e) => {
            return (
                Status {
                    state: "failed".into(),
                    last_error: e.to_string(),
                    ..Status::default()
                },
                Err(e),
            );
        }
    };
    let mut status = Status::of(&info, &verdict);
    let go = match &verdict {
        Verdict::ClockUntrusted(why) => {
            tracing::warn!(reason = %why, "clock untrusted: no rotation decision");
            false
        }
        Verdict::Expired { not_after } => {
            // A lapsed certificate is a state, not a wedge: keep trying (the platform may still
            // accept it for refresh), report loudly, never delete anything.
            tracing::error!(event = "system.cert.rotation_failed", severity = "critical", not_after = %rfc3339(*not_after), "certificate expired; attempting refresh; re-enrollment needs a new bootstrap token");
            true
        }
        Verdict::Due { .. } => true,
        Verdict::NotDue { .. } => force,
    };
    if !go {
        return (status, Ok(None));
    }
    let expired = matches!(verdict, Verdict::Expired { .. });
    // A lapsed certificate fails the handshake every time: one try, then the recovery path.
    let policy = if expired {
        RetryPolicy::once()
    } else {
        RetryPolicy::from(&cfg.retry)
    };
    let mut recovery_error: Option<String> = None;
    // Only when the recovery path, not the refresh, produced the new credentials.
    let mut reenrolled = false;
    let mut result = policy
        .run(|_| rotation::rotate(&cfg.platform, &store))
        .await;
    if expired
        && let Err(e) = &result
        && let Some(conn) = conn
    {
        // The platform refuses a lapsed certificate; recovery is a new enrollment, which
        // enrolld performs when the identity carries a (new) bootstrap token.
        tracing::warn!(error = %e, "refresh with the expired certificate failed; asking enrolld to re-enroll");
        let recovered = match powernode::bus::Enroll1Proxy::new(conn).await {
            Ok(p) => {
                p.enroll()
                    .await
                    .map_err(powernode::bus::error_from_bus)
                    .and_then(|_| {
                        store.load()?.map(|c| c.meta).ok_or_else(|| {
                            Error::NotFound("no credentials after re-enrollment".into())
                        })
                    })
            }
            Err(e) => Err(Error::from(e)),
        };
        match recovered {
            Ok(meta) => {
                tracing::info!(event = "system.cert.reenrolled", "re-enrolled after expiry");
                reenrolled = true;
                result = Ok(meta);
            }
            // Keep the refresh error (its kind decides the exit code); say why recovery failed.
            Err(e) => recovery_error = Some(format!("; re-enrollment not possible: {e}")),
        }
    }
    match result {
        Ok(meta) => {
            let new = store.load().ok().flatten();
            let info = new
                .as_ref()
                .and_then(|c| powernode::pki::CertInfo::from_pem(&c.cert_pem).ok());
            if let Some(info) = &info {
                status.serial = info.serial.clone();
                status.not_before = rfc3339(info.not_before);
                status.not_after = rfc3339(info.not_after);
                let jwt = new
                    .as_ref()
                    .and_then(|c| c.token.as_deref())
                    .and_then(rotation::jwt_window);
                status.renew_at = rfc3339(rotation::renew_at(info, jwt));
            }
            status.state = if reenrolled { "re-enrolled" } else { "rotated" }.into();
            tracing::info!(event = "system.cert.rotated", serial = %status.serial, not_after = %meta.not_after, "certificate rotated");
            powernode::bus::emit_event(
                conn,
                if reenrolled {
                    "system.cert.reenrolled"
                } else {
                    "system.cert.rotated"
                },
                "info",
                serde_json::json!({"serial": status.serial, "not_after": meta.not_after}),
            )
            .await;
            (status.clone(), Ok(Some(status.serial)))
        }
        Err(e) => {
            tracing::error!(event = "system.cert.rotation_failed", severity = "critical", kind = %e.kind(), error = %e, "rotation failed; old credentials kept");
            status.state = "failed".into();
            status.last_error = format!("{e}{}", recovery_error.unwrap_or_default());
            powernode::bus::emit_event(
                conn,
                "system.cert.rotation_failed",
                "critical",
                serde_json::json!({"serial": status.serial, "not_after": status.not_after, "error": status.last_error}),
            )
            .await;
            (status, Err(e))
        }
    }
}

struct CertService {
    paths: Paths,
    cfg: Config,
    status: Status,
    idle: IdleTracker,
}

impl CertService {
    async fn run_check(
        &mut self,
        conn: &zbus::Connection,
        emitter: &SignalEmitter<'_>,
        force: bool,
    ) -> Result<String, BusError> {
        // A rotation talks to the platform: no idle exit until it is done.
        let _busy = self.idle.busy();
        let (status, result) = check(&self.paths, &self.cfg, Some(conn), force).await;
        let before = std::mem::replace(&mut self.status, status);
        let s = &self.status;
        if before.serial != s.serial {
            self.serial_changed(emitter).await?;
            self.not_before_changed(emitter).await?;
            self.not_after_changed(emitter).await?;
        }
        if before.renew_at != s.renew_at {
            self.renew_at_changed(emitter).await?;
        }
        if before.state != s.state {
            self.state_changed(emitter).await?;
        }
        if before.last_error != s.last_error {
            self.last_error_changed(emitter).await?;
        }
        match result {
            Ok(Some(serial)) => {
                Self::certificate_rotated(emitter, &serial).await?;
                Ok(serial)
            }
            Ok(None) => Ok(self.status.serial.clone()),
            Err(e) => Err(BusError::from(e)),
        }
    }
}

#[zbus::interface(name = "com.powernode.Cert1")]
impl CertService {
    /// Rotate now regardless of the schedule; returns the (new) serial.
    async fn rotate_now(
        &mut self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, BusError> {
        self.run_check(conn, &emitter, true).await
    }

    /// Check the schedule and rotate only if due; returns the current serial.
    async fn check(
        &mut self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, BusError> {
        self.run_check(conn, &emitter, false).await
    }

    #[zbus(property)]
    async fn serial(&self) -> String {
        self.idle.touch();
        self.status.serial.clone()
    }

    #[zbus(property)]
    async fn not_before(&self) -> String {
        self.status.not_before.clone()
    }

    #[zbus(property)]
    async fn not_after(&self) -> String {
        self.status.not_after.clone()
    }

    /// When the next rotation is due (RFC 3339).
    #[zbus(property)]
    async fn renew_at(&self) -> String {
        self.status.renew_at.clone()
    }

    #[zbus(property)]
    async fn state(&self) -> String {
        self.status.state.clone()
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.status.last_error.clone()
    }

    #[zbus(signal)]
    async fn certificate_rotated(emitter: &SignalEmitter<'_>, serial: &str) -> zbus::Result<()>;
}

/// The state on disk, without rotating: what the properties show before any call.
async fn initial_status(paths: &Paths) -> Status {
    let store = PkiStore::new(paths.pki_dir());
    let creds = match store.load() {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Status {
                state: "not-enrolled".into(),
                ..Status::default()
            };
        }
        Err(e) => {
            return Status {
                state: "failed".into(),
                last_error: e.to_string(),
                ..Status::default()
            };
        }
    };
    let now = OffsetDateTime::now_utc();
    let conn = powernode::bus::system_bus().await.ok();
    let trust = clock::judge(
        now,
        ntp_synchronized(conn.as_ref()).await,
        clock::load(paths).ok().flatten(),
    );
    match rotation::decide(now, &trust, &creds) {
        Ok((info, v)) => Status::of(&info, &v),
        Err(e) => Status {
            state: "failed".into(),
            last_error: e.to_string(),
            ..Status::default()
        },
    }
}

pub async fn serve(paths: Paths, cfg: Config) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    // Computed before the name is owned: a call queued by D-Bus activation may be dispatched
    // as soon as it is, and must not be overwritten by start-up state afterwards.
    let status = initial_status(&paths).await;
    let _conn = zbus::connection::Builder::system()
        .name(CERT_NAME)
        .serve_at(
            CERT_PATH,
            CertService {
                paths: paths.clone(),
                cfg: cfg.clone(),
                status,
                idle: idle.clone(),
            },
        )
        .build()
        .await
        .with_context(|| format!("owning {CERT_NAME} on the system bus"))?;
    powernode::daemon::serve_until_idle(&idle, "serving com.powernode.Cert1").await?;
    Ok(())
}

async fn once(paths: Paths, cfg: Config, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    // The bus is only needed to ask timedated; a node without one still rotates.
    let conn = match powernode::bus::system_bus().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::info!(error = %e, "no system bus; NTP state unknown");
            None
        }
    };
    let (status, result) = check(&paths, &cfg, conn.as_ref(), force).await;
    let code = match &result {
        Ok(_) => 0u8,
        Err(e) if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Refused) => 5,
        Err(_) => 1,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "command": "certd", "status": if code == 0 { "ok" } else { "error" }, "exit_code": code,
                "state": status.state, "serial": status.serial, "not_after": status.not_after,
                "renew_at": status.renew_at, "error": status.last_error,
            })
        );
    } else {
        println!(
            "state: {}\nserial: {}\nnot_after: {}\nrenew_at: {}",
            status.state, status.serial, status.not_after, status.renew_at
        );
        if !status.last_error.is_empty() {
            eprintln!("powernode-certd: {}", status.last_error);
        }
    }
    Ok(ExitCode::from(code))
}

pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-certd",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            let rt = powernode::daemon::start(Profile::Cert, &paths)?;
            if args.once {
                rt.block_on(once(paths, cfg, args.force, args.json))
            } else {
                rt.block_on(serve(paths, cfg)).map(|()| ExitCode::SUCCESS)
            }
        },
    )
}
