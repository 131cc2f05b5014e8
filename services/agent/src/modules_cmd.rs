//! Module commands. `attach <id>`, `detach <id>` and `sync` ask powernode-mountd
//! (`com.powernode.Mount1`) on the system bus, which pulls, verifies and composes; when no bus or
//! no mountd answers, `attach` falls back to fetch + verify in-process (nothing is mounted, and
//! the report says so) and `detach`/`sync` fail. `update` always fetches and verifies every
//! assigned module in-process (libpowernode::modules) without mounting.
//!
//! Exit codes (upstream's): 0 ok, 2 any verification failure (including a missing trust
//! policy), 3 a composition (mount) failure, otherwise the platform error's exit code.

use powernode::config::Config;
use powernode::modules::{self, ModuleError};
use powernode::paths::Paths;
use powernode::pki::PkiStore;
use powernode::transport::InstanceClient;
use serde_json::{Map, Value, json};

use crate::output::{EXIT_GENERIC, Report};

/// Upstream's exit code for a failed mount or composition.
pub const EXIT_MOUNT: u8 = 3;
/// How long to wait for the system bus before treating it as absent.
const BUS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Which Mount1 call a command makes.
#[derive(Debug, Clone, Copy)]
pub enum MountOp<'a> {
    Attach(&'a str),
    Detach(&'a str),
    Sync,
}

impl MountOp<'_> {
    fn command(self) -> &'static str {
        match self {
            MountOp::Attach(_) => "attach",
            MountOp::Detach(_) => "detach",
            MountOp::Sync => "sync",
        }
    }
}

/// Why mountd could not be asked (as opposed to mountd answering with an error).
fn unreachable(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.DBus.Error.Spawn.ServiceNotFound"
        ),
        _ => true,
    }
}

/// `attach`/`detach`/`sync` through mountd; `attach` falls back to fetch + verify in-process.
pub fn mount_command(op: MountOp<'_>, paths: &Paths) -> Report {
    let command = op.command();
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(e) => return Report::failed(command, EXIT_GENERIC, format!("{e:#}")),
    };
    let asked = rt.block_on(async {
        let conn = match tokio::time::timeout(BUS_WAIT, powernode::bus::system_bus()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("no system bus: {e}")),
            Err(_) => return Err(format!("no system bus within {BUS_WAIT:?}")),
        };
        let proxy = powernode::bus::Mount1Proxy::new(&conn)
            .await
            .map_err(|e| format!("com.powernode.Mount1: {e}"))?;
        let r = match op {
            MountOp::Attach(id) => proxy
                .attach(id)
                .await
                .map(|d| json!({"module": id, "digest": d})),
            MountOp::Detach(id) => proxy
                .detach(id)
                .await
                .map(|g| json!({"module": id, "generation": g})),
            MountOp::Sync => proxy.sync().await.map(|g| json!({"generation": g})),
        };
        match r {
            Err(e) if unreachable(&e) => Err(format!("powernode-mountd is not reachable: {e}")),
            Err(e) => Ok(Err(powernode::bus::error_from_bus(e))),
            Ok(mut v) => {
                if let (Some(o), Ok(t), Ok(m)) = (
                    v.as_object_mut(),
                    proxy.target().await,
                    proxy.union_mounted().await,
                ) {
                    o.insert("target".into(), json!(t));
                    o.insert("union_mounted".into(), json!(m));
                }
                Ok(Ok(v))
            }
        }
    });
    match asked {
        Ok(Ok(v)) => Report::ok(command, crate::cli::obj(v)),
        Ok(Err(e)) => {
            let code = match e.kind() {
                powernode::ErrorKind::Crypto => EXIT_VERIFY,
                powernode::ErrorKind::NotFound => EXIT_GENERIC,
                _ => EXIT_MOUNT,
            };
            Report::failed(command, code, e.to_string())
        }
        Err(why) => match op {
            MountOp::Attach(id) => {
                tracing::warn!("{why}; fetching and verifying in-process, nothing is mounted");
                let mut r = run("attach", paths, Some(id));
                r.details.insert("mounted".into(), json!(false));
                r.details.insert("note".into(), json!(why));
                r
            }
            _ => Report::failed(command, EXIT_MOUNT, why),
        },
    }
}
use crate::verify_cmd::EXIT_VERIFY;

/// Fetches and verifies the assigned modules (all of them, or only `only`).
pub fn run(command: &'static str, paths: &Paths, only: Option<&str>) -> Report {
    match run_inner(command, paths, only) {
        Ok(r) | Err(r) => r,
    }
}

fn run_inner(command: &'static str, paths: &Paths, only: Option<&str>) -> Result<Report, Report> {
    let generic = |e: String| Report::failed(command, EXIT_GENERIC, e);
    let cfg = Config::load(paths).map_err(|e| generic(format!("{e:#}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| generic(format!("creating the async runtime: {e}")))?;
    let mut client = InstanceClient::new(cfg.platform.clone(), PkiStore::new(paths.pki_dir()));
    rt.block_on(async {
        let platform_err =
            |e: powernode::Error| Report::failed(command, e.kind().exit_code() as u8, e.to_string());
        let mut assigned = modules::assigned(&mut client).await.map_err(platform_err)?;
        if let Some(id) = only {
            assigned.retain(|m| m.id == id || m.name == id);
            if assigned.is_empty() {
                return Err(generic(format!("module {id} is not assigned to this node")));
            }
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        let mut worst: u8 = 0;
        for m in &assigned {
            match modules::fetch_and_verify(&mut client, paths, m).await {
                Ok(f) => {
                    tracing::info!(module = %f.name, digest = %f.image_digest, fsverity = %f.fsverity_digest, "module verified");
                    done.push(serde_json::to_value(&f).unwrap_or(Value::Null));
                }
                Err(e) => {
                    let code = match &e {
                        ModuleError::Verification { .. } => EXIT_VERIFY,
                        ModuleError::Platform(pe) => pe.kind().exit_code() as u8,
                        ModuleError::Other { .. } => EXIT_GENERIC,
                    };
                    // Verification failures dominate: exit 2 whenever any module was refused.
                    if worst != EXIT_VERIFY {
                        worst = code;
                    }
                    tracing::error!(module = %m.name, error = %e, "module refused");
                    // Best effort: queue a fleet event when a bus (and fleeteventd) is there.
                    let conn = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        powernode::bus::system_bus(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok);
                    powernode::bus::emit_event(
                        conn.as_ref(),
                        if e.is_verification() {
                            "module.verify.failed"
                        } else {
                            "module.fetch.failed"
                        },
                        "error",
                        json!({"module_id": m.id, "name": m.name, "error": e.to_string()}),
                    )
                    .await;
                    failures.push(json!({"id": m.id, "name": m.name, "error": e.to_string(), "verification": e.is_verification()}));
                }
            }
        }
        if failures.is_empty() {
            let mut d = Map::new();
            d.insert("modules".into(), Value::Array(done));
            d.insert(
                "store".into(),
                modules::store_dir(paths).display().to_string().into(),
            );
            Ok(Report::ok(command, d))
        } else {
            let reasons: Vec<String> = failures
                .iter()
                .filter_map(|f| f["error"].as_str().map(str::to_string))
                .collect();
            Err(Report::failed(command, worst, reasons.join("; ")))
        }
    })
}
