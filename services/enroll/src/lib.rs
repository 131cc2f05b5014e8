//! powernode-enrolld: turns the node's bootstrap token into an mTLS identity, on
//! `com.powernode.Enroll1`.
//!
//! `Enroll()` reads the identity cached by identityd (asking `com.powernode.Identity1` to resolve
//! first when there is none), runs the enrollment of [`powernode::enroll`] and reports the result
//! as properties. It refuses to enroll twice: existing PKI is reported, not replaced.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use powernode::bus::{BusError, ENROLL_NAME, ENROLL_PATH, Identity1Proxy, error_from_bus};
use powernode::config::Config;
use powernode::enroll::{self, EnrollParams, Outcome};
use powernode::paths::Paths;
use powernode::pki::{CertInfo, PkiStore};
use powernode::sandbox::Profile;
use powernode::systemd::IdleTracker;
use powernode::{Error, identity};
use zbus::object_server::SignalEmitter;

#[derive(Debug, Parser)]
#[command(
    name = "powernode-enrolld",
    version,
    about = "Enrollment daemon (com.powernode.Enroll1)"
)]
pub struct Args {
    /// Node root: every path is taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
}

#[derive(Default, Clone, PartialEq)]
struct Status {
    instance_id: String,
    serial: String,
    not_after: String,
}

struct EnrollService {
    paths: Paths,
    cfg: Config,
    status: Option<Status>,
    last_error: String,
    idle: IdleTracker,
}

impl EnrollService {
    fn store(&self) -> PkiStore {
        PkiStore::new(self.paths.pki_dir())
    }

    fn read_status(&mut self) -> powernode::Result<()> {
        self.status = match self.store().load()? {
            None => None,
            Some(c) => {
                let info = CertInfo::from_pem(&c.cert_pem)?;
                Some(Status {
                    instance_id: c.meta.instance_id,
                    serial: info.serial,
                    not_after: powernode::pki::rfc3339(info.not_after),
                })
            }
        };
        Ok(())
    }

    async fn identity(&self, conn: &zbus::Connection) -> powernode::Result<identity::Identity> {
        if let Some(id) = identity::load_cached(&self.paths)? {
            return Ok(id);
        }
        let proxy = Identity1Proxy::new(conn).await?;
        proxy.resolve().await.map_err(error_from_bus)?;
        identity::load_cached(&self.paths)?
            .ok_or_else(|| Error::Identity("identityd resolved but left no identity.json".into()))
    }

    async fn enroll_once(&mut self, conn: &zbus::Connection) -> powernode::Result<Outcome> {
        let id = self.identity(conn).await?;
        let platform_url = self
            .cfg
            .platform
            .url
            .clone()
            .or(id.platform_url.clone())
            .ok_or_else(|| {
                Error::Identity(format!(
                    "identity from {} has no platform URL",
                    id.source.as_str()
                ))
            })?;
        let ca = id.ca_pem.clone().ok_or_else(|| {
            Error::Identity(format!(
                "identity from {} has no CA bundle; the platform cannot be authenticated",
                id.source.as_str()
            ))
        })?;
        let token = id.bootstrap_token.clone().unwrap_or_default();
        let params = EnrollParams {
            bootstrap_token: token,
            platform_url,
            ca_bundle_pem: ca,
            subject: id.instance_uuid.clone(),
            dmi_uuid: read_dmi_uuid(&self.paths),
            trusted_now: trusted_now(&self.paths, conn).await,
        };
        enroll::enroll(&self.cfg.platform, &self.store(), &params).await
    }
}

/// Now, if the clock is trusted (NTP per timedated, or not before the last platform time).
async fn trusted_now(paths: &Paths, conn: &zbus::Connection) -> Option<time::OffsetDateTime> {
    let ntp = match powernode::bus::Timedate1Proxy::new(conn).await {
        Ok(p) => p.ntp_synchronized().await.unwrap_or(false),
        Err(_) => false,
    };
    let now = time::OffsetDateTime::now_utc();
    let evidence = powernode::clock::load(paths).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "clock evidence unreadable");
        None
    });
    powernode::clock::judge(now, ntp, evidence)
        .is_trusted()
        .then_some(now)
}

/// SMBIOS product UUID, sent as the `dmi_uuid` hint when readable.
fn read_dmi_uuid(paths: &Paths) -> Option<String> {
    let b = powernode::fsutil::read_optional(&paths.dmi_product_uuid(), 128).ok()??;
    let s = String::from_utf8(b).ok()?.trim().to_lowercase();
    (!s.is_empty()).then_some(s)
}

#[zbus::interface(name = "com.powernode.Enroll1")]
impl EnrollService {
    /// Enroll unless already enrolled; returns the instance id.
    async fn enroll(
        &mut self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, BusError> {
        // Enrollment talks to the platform: no idle exit until it is done.
        let _busy = self.idle.busy();
        let result = self.enroll_once(conn).await;
        let before = self.status.clone();
        let event = match &result {
            Ok(Outcome::Enrolled(m)) | Ok(Outcome::ReEnrolled(m)) => Some((
                "system.enroll.succeeded",
                "info",
                serde_json::json!({"instance_id": m.instance_id, "not_after": m.not_after}),
            )),
            Ok(Outcome::AlreadyEnrolled(_)) => None,
            Err(e) => Some((
                "system.enroll.failed",
                if e.kind() == powernode::ErrorKind::Refused {
                    "critical"
                } else {
                    "error"
                },
                serde_json::json!({"kind": e.kind().as_str(), "error": e.to_string()}),
            )),
        };
        if let Some((kind, severity, payload)) = event {
            powernode::bus::emit_event(Some(conn), kind, severity, payload).await;
        }
        match &result {
            Ok(Outcome::Enrolled(m)) => {
                tracing::info!(instance = %m.instance_id, not_after = %m.not_after, "enrolled");
                self.last_error.clear();
            }
            Ok(Outcome::ReEnrolled(m)) => {
                tracing::warn!(instance = %m.instance_id, not_after = %m.not_after, "re-enrolled after certificate expiry");
                self.last_error.clear();
            }
            Ok(Outcome::AlreadyEnrolled(m)) => {
                tracing::info!(instance = %m.instance_id, "already enrolled; token not used");
                self.last_error.clear();
            }
            Err(e) => {
                tracing::error!(kind = %e.kind(), error = %e, "enrollment failed");
                self.last_error = e.to_string();
            }
        }
        if let Err(e) = self.read_status() {
            tracing::warn!(error = %e, "cannot read PKI status");
        }
        if before != self.status {
            self.enrolled_changed(&emitter).await?;
            self.instance_id_changed(&emitter).await?;
            self.certificate_serial_changed(&emitter).await?;
            self.not_after_changed(&emitter).await?;
        }
        self.last_error_changed(&emitter).await?;
        Ok(result.map_err(BusError::from)?.meta().instance_id.clone())
    }

    /// Relay a claim poll for identityd, whose unit may reach only the metadata address. Only a
    /// well-formed claim request is forwarded, to the claim path, over HTTPS with the given CA.
    async fn post_claim(
        &self,
        server: &str,
        ca_pem: &str,
        request_json: &str,
    ) -> Result<String, BusError> {
        let _busy = self.idle.busy();
        let r = powernode::identity::claim::post_claim(
            &self.cfg.platform,
            server,
            ca_pem,
            request_json,
        )
        .await;
        r.map_err(|e| {
            tracing::warn!(server, error = %e, "claim relay failed");
            BusError::from(e)
        })
    }

    #[zbus(property)]
    async fn enrolled(&self) -> bool {
        self.idle.touch();
        self.status.is_some()
    }

    #[zbus(property)]
    async fn instance_id(&self) -> String {
        self.status
            .as_ref()
            .map(|s| s.instance_id.clone())
            .unwrap_or_default()
    }

    /// Serial (lowercase hex) of the certificate in the PKI directory.
    #[zbus(property)]
    async fn certificate_serial(&self) -> String {
        self.status
            .as_ref()
            .map(|s| s.serial.clone())
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn not_after(&self) -> String {
        self.status
            .as_ref()
            .map(|s| s.not_after.clone())
            .unwrap_or_default()
    }

    /// Why the last `Enroll()` failed; empty after a success.
    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.last_error.clone()
    }
}

/// Serve `com.powernode.Enroll1` until idle or SIGTERM.
pub async fn run(paths: Paths, cfg: Config) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let mut svc = EnrollService {
        paths,
        cfg,
        status: None,
        last_error: String::new(),
        idle: idle.clone(),
    };
    if let Err(e) = svc.read_status() {
        tracing::warn!(error = %e, "PKI directory unreadable");
        svc.last_error = e.to_string();
    }
    let _conn = zbus::connection::Builder::system()
        .name(ENROLL_NAME)
        .serve_at(ENROLL_PATH, svc)
        .build()
        .await
        .with_context(|| format!("owning {ENROLL_NAME} on the system bus"))?;
    powernode::daemon::serve_until_idle(&idle, "serving com.powernode.Enroll1").await?;
    Ok(())
}

pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-enrolld",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            let rt = powernode::daemon::start(Profile::Enroll, &paths)?;
            rt.block_on(run(paths, cfg))?;
            Ok(ExitCode::SUCCESS)
        },
    )
}
