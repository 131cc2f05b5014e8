//! powernode-identityd: answers "who is this node?" on `com.powernode.Identity1`.
//!
//! D-Bus activated; resolves at start (the local strategies are cheap) and on `Resolve()`, keeps
//! the result in `/run/powernode/identity.json` (0600, it holds the bootstrap token) and exposes
//! only public facts as properties. Exits after `daemon.idle_exit_secs` without calls.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use powernode::bus::{BusError, IDENTITY_NAME, IDENTITY_PATH};
use powernode::config::Config;
use powernode::identity::{self, Identity};
use powernode::paths::Paths;
use powernode::sandbox::Profile;
use powernode::systemd::{self, IdleTracker};
use zbus::object_server::SignalEmitter;

#[derive(Debug, Parser)]
#[command(
    name = "powernode-identityd",
    version,
    about = "Identity discovery daemon (com.powernode.Identity1)"
)]
pub struct Args {
    /// Node root: every path (config, /proc/cmdline, /sys/firmware, /run) is taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
}

struct IdentityService {
    paths: Paths,
    current: Option<Identity>,
    last_error: String,
    idle: IdleTracker,
}

impl IdentityService {
    /// Use the cache if present, else run the cascade and cache the winner.
    fn refresh(&mut self) -> powernode::Result<Identity> {
        if let Some(id) = identity::load_cached(&self.paths)? {
            self.current = Some(id.clone());
            return Ok(id);
        }
        let id = identity::resolve(&self.paths)?;
        identity::store_cached(&self.paths, &id)?;
        tracing::info!(instance = %id.instance_uuid, source = id.source.as_str(), evidence = %id.evidence, "identity resolved");
        self.current = Some(id.clone());
        Ok(id)
    }

    fn field(&self, f: impl Fn(&Identity) -> String) -> String {
        self.current.as_ref().map(f).unwrap_or_default()
    }
}

#[zbus::interface(name = "com.powernode.Identity1")]
impl IdentityService {
    /// Resolve (or return the cached) identity; returns the instance id.
    async fn resolve(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, BusError> {
        self.idle.touch();
        let before = self.current.clone();
        let result = self.refresh();
        self.last_error = result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        if before != self.current {
            self.instance_id_changed(&emitter).await?;
            self.source_changed(&emitter).await?;
            self.platform_url_changed(&emitter).await?;
            self.evidence_changed(&emitter).await?;
            self.discovered_at_changed(&emitter).await?;
        }
        let id = result.map_err(|e| {
            tracing::warn!(error = %e, "identity resolution failed");
            BusError::from(e)
        })?;
        Ok(id.instance_uuid)
    }

    #[zbus(property)]
    async fn instance_id(&self) -> String {
        self.idle.touch();
        self.field(|i| i.instance_uuid.clone())
    }

    #[zbus(property)]
    async fn source(&self) -> String {
        self.field(|i| i.source.as_str().to_string())
    }

    #[zbus(property)]
    async fn platform_url(&self) -> String {
        self.field(|i| i.platform_url.clone().unwrap_or_default())
    }

    #[zbus(property)]
    async fn evidence(&self) -> String {
        self.field(|i| i.evidence.clone())
    }

    #[zbus(property)]
    async fn discovered_at(&self) -> String {
        self.field(|i| i.public().discovered_at)
    }

    /// Why the last resolution failed; empty after a success.
    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.last_error.clone()
    }
}

/// Serve `com.powernode.Identity1` until idle or SIGTERM.
pub async fn run(paths: Paths, cfg: Config) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let mut svc = IdentityService {
        paths,
        current: None,
        last_error: String::new(),
        idle: idle.clone(),
    };
    if let Err(e) = svc.refresh() {
        tracing::warn!(error = %e, "no identity yet");
        svc.last_error = e.to_string();
    }
    let _conn = zbus::connection::Builder::system()
        .name(IDENTITY_NAME)
        .serve_at(IDENTITY_PATH, svc)
        .build()
        .await
        .with_context(|| format!("owning {IDENTITY_NAME} on the system bus"))?;
    idle.touch();
    systemd::ready("serving com.powernode.Identity1");
    tokio::select! {
        _ = idle.wait_idle() => tracing::info!("idle, exiting"),
        r = powernode::daemon::shutdown_signal() => { r?; tracing::info!("signal, exiting"); }
    }
    systemd::stopping("exiting");
    Ok(())
}

/// The whole process: arguments, logging, sandbox, runtime. Shared by `main.rs` and the
/// `powernode-agent` multicall binary.
pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::init_logging("powernode-identityd");
    let paths = Paths::from_cli(args.root.as_deref());
    let result = (|| -> anyhow::Result<()> {
        let cfg = Config::load(&paths)?;
        let rt = powernode::daemon::start(Profile::Identity, &paths)?;
        rt.block_on(run(paths, cfg))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
