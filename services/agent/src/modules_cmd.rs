//! `powernode-agent update` / `attach <id>`: fetch and verify the node's assigned modules
//! in-process (libpowernode::modules). Mounting is not part of this step.
//!
//! Exit 0 when every module verified and sits in the store, 2 on any verification failure
//! (including a missing trust policy), otherwise the platform error's exit code.

use powernode::config::Config;
use powernode::modules::{self, ModuleError};
use powernode::paths::Paths;
use powernode::pki::PkiStore;
use powernode::transport::InstanceClient;
use serde_json::{Map, Value, json};

use crate::output::{EXIT_GENERIC, Report};
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
