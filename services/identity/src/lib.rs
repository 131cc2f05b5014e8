//! powernode-identityd: answers "who is this node?" on `com.powernode.Identity1`.
//!
//! D-Bus activated. The bus name is owned at once; discovery starts with the first `Resolve()`
//! (being started by the bus, which anyone may ask for, does nothing) and runs in the
//! background (the cloud probes take up to the 2 s cascade deadline, claim polling waits for a
//! human), so properties answer immediately and a second `Resolve()` waits for the running
//! discovery rather than starting another. The result lives in `/run/powernode/identity.json` (0600, it holds the
//! bootstrap token); only public facts are properties. Once enrolled, a restart never re-runs
//! network discovery (see `powernode::identity::obtain`). Exits after `daemon.idle_exit_secs`
//! without calls, never while a discovery is running.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use powernode::bus::{BusError, IDENTITY_NAME, IDENTITY_PATH};
use powernode::config::Config;
use powernode::identity::{self, Ctx, Identity, Settings};
use powernode::paths::Paths;
use powernode::sandbox::Profile;
use powernode::systemd::{self, IdleTracker};
use tokio::sync::watch;

/// `Resolve()` waits this long for a running discovery (below the D-Bus default call timeout
/// of 25 s); a claim still pending after that is reported, and the caller asks again.
const RESOLVE_WAIT: Duration = Duration::from_secs(20);

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

#[derive(Default)]
struct State {
    current: Option<Identity>,
    last_error: String,
    claim_code: String,
    running: bool,
}

/// Shared between the D-Bus object and the discovery task.
#[derive(Clone)]
struct Shared {
    ctx: Ctx,
    state: Arc<Mutex<State>>,
    /// Bumped when a discovery finishes.
    done: watch::Sender<u64>,
    conn: Arc<Mutex<Option<zbus::Connection>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent (plain assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a discovery unless one is running or an identity is known.
    fn kick(&self) {
        {
            let mut st = self.state();
            if st.running || st.current.is_some() {
                return;
            }
            st.running = true;
        }
        let me = self.clone();
        tokio::spawn(async move { me.discover().await });
    }

    async fn discover(self) {
        let result = identity::obtain(&self.ctx).await;
        {
            let mut st = self.state();
            st.running = false;
            match &result {
                Ok(id) => {
                    tracing::info!(instance = %id.instance_uuid, source = id.source.as_str(), evidence = %id.evidence, "identity resolved");
                    st.current = Some(id.clone());
                    st.last_error.clear();
                    st.claim_code.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "identity resolution failed");
                    st.last_error = e.to_string();
                }
            }
        }
        self.done.send_modify(|n| *n += 1);
        self.announce().await;
    }

    /// PropertiesChanged for everything (cheap; happens once per discovery).
    async fn announce(&self) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(conn) = conn else { return };
        let Some(iface) = powernode::bus::served::<IdentityService>(&conn, IDENTITY_PATH).await
        else {
            return;
        };
        let em = iface.signal_emitter();
        let svc = iface.get().await;
        let results = [
            svc.instance_id_changed(em).await,
            svc.source_changed(em).await,
            svc.platform_url_changed(em).await,
            svc.evidence_changed(em).await,
            svc.discovered_at_changed(em).await,
            svc.last_error_changed(em).await,
            svc.claim_code_changed(em).await,
        ];
        for r in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, "emitting PropertiesChanged");
            }
        }
    }
}

struct IdentityService {
    shared: Shared,
    idle: IdleTracker,
}

impl IdentityService {
    fn field(&self, f: impl Fn(&Identity) -> String) -> String {
        self.idle.touch();
        self.shared
            .state()
            .current
            .as_ref()
            .map(f)
            .unwrap_or_default()
    }
}

#[zbus::interface(name = "com.powernode.Identity1")]
impl IdentityService {
    /// The identity's instance id: the cached one, or the result of the running (or a new)
    /// discovery.
    async fn resolve(&self) -> Result<String, BusError> {
        let _busy = self.idle.busy();
        let mut done = self.shared.done.subscribe();
        self.shared.kick();
        let wait = async {
            loop {
                {
                    let st = self.shared.state();
                    if let Some(id) = &st.current {
                        return Ok(id.instance_uuid.clone());
                    }
                    if !st.running {
                        return Err(st.last_error.clone());
                    }
                }
                if done.changed().await.is_err() {
                    return Err("identity discovery stopped".to_string());
                }
            }
        };
        let r = tokio::time::timeout(RESOLVE_WAIT, wait).await;
        match r {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(msg)) => Err(BusError::from(powernode::Error::Identity(msg))),
            Err(_) => {
                let code = self.shared.state().claim_code.clone();
                Err(BusError::from(powernode::Error::Identity(
                    if code.is_empty() {
                        "identity discovery still running; call Resolve() again".into()
                    } else {
                        format!("waiting to be claimed (claim code {code}); call Resolve() again")
                    },
                )))
            }
        }
    }

    #[zbus(property)]
    async fn instance_id(&self) -> String {
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
        self.idle.touch();
        self.shared.state().last_error.clone()
    }

    /// The code an operator types to claim this node while claim polling waits; else empty.
    #[zbus(property)]
    async fn claim_code(&self) -> String {
        self.idle.touch();
        self.shared.state().claim_code.clone()
    }
}

/// Claim transport over D-Bus: enrolld makes the HTTPS call.
struct BusClaim {
    conn: Arc<Mutex<Option<zbus::Connection>>>,
}

impl powernode::identity::claim::ClaimTransport for BusClaim {
    fn post<'a>(
        &'a self,
        server: &'a str,
        ca_pem: &'a str,
        request_json: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = powernode::Result<String>> + Send + 'a>>
    {
        Box::pin(async move {
            let conn = self
                .conn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or_else(|| powernode::Error::Bus("not connected yet".into()))?;
            let proxy = powernode::bus::Enroll1Proxy::new(&conn).await?;
            proxy
                .post_claim(server, ca_pem, &request_json)
                .await
                .map_err(powernode::bus::error_from_bus)
        })
    }
}

/// Serve `com.powernode.Identity1` until idle or SIGTERM.
pub async fn run(paths: Paths, cfg: Config) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let state = Arc::new(Mutex::new(State::default()));
    let mut settings = Settings::from_config(&cfg)?;
    // Claim polls go through enrolld: this unit may reach only loopback and the metadata address.
    let bus_conn: Arc<Mutex<Option<zbus::Connection>>> = Arc::new(Mutex::new(None));
    settings.claim_transport = Some(Arc::new(BusClaim {
        conn: bus_conn.clone(),
    }));
    let claim_state = state.clone();
    settings.on_claim_code = Some(Arc::new(move |code: &str| {
        claim_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim_code = code.to_string();
    }));
    let ctx = Ctx::new(paths, settings)?;
    let (done, _) = watch::channel(0u64);
    let shared = Shared {
        ctx,
        state,
        done,
        conn: bus_conn,
    };
    // A cached identity is served at once, without waiting for the bus.
    match identity::load_cached(&shared.ctx.paths) {
        Ok(Some(id)) => shared.state().current = Some(id),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring unreadable identity cache"),
    }
    let svc = IdentityService {
        shared: shared.clone(),
        idle: idle.clone(),
    };
    let conn = zbus::connection::Builder::system()
        .name(IDENTITY_NAME)
        .serve_at(IDENTITY_PATH, svc)
        .build()
        .await
        .with_context(|| format!("owning {IDENTITY_NAME} on the system bus"))?;
    *shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    // No discovery until a caller the bus policy lets through asks (`Resolve()`): anyone may
    // have the bus start this service (StartServiceByName), and that alone must not probe
    // metadata services or print a claim banner.
    idle.touch();
    systemd::ready("serving com.powernode.Identity1");
    loop {
        tokio::select! {
            _ = idle.wait_idle() => {
                if shared.state().running {
                    // A claim or a slow probe is in flight: not idle.
                    idle.touch();
                    continue;
                }
                tracing::info!("idle, exiting");
                break;
            }
            r = powernode::daemon::shutdown_signal() => { r?; tracing::info!("signal, exiting"); break; }
        }
    }
    systemd::stopping("exiting");
    drop(conn);
    Ok(())
}

/// The whole process: arguments, logging, sandbox, runtime. Shared by `main.rs` and the
/// `powernode-agent` multicall binary.
pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-identityd",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            // Landlock grants writes below directories that exist when it is applied.
            powernode::fsutil::ensure_dir(&paths.identity_run_dir(), 0o750)?;
            let rt = powernode::daemon::start(Profile::Identity, &paths)?;
            rt.block_on(run(paths, cfg))?;
            Ok(ExitCode::SUCCESS)
        },
    )
}
