//! powernode-mountd: composes the node's verified modules into one overlayfs root.
//!
//! D-Bus activated as `com.powernode.Mount1`. `Attach(id)`, `Detach(id)` and `Sync()` decide the
//! set of modules (`Sync` takes the platform's assignment list); every new image is pulled and
//! verified with [`powernode::modules::fetch_and_verify`] first, and before any mount every
//! image of the new generation — those state.json lists included — is checked again from the
//! store with [`powernode::modules::verify_stored`]. One refusal (signature, signer policy,
//! digest, fs-verity) means nothing is mounted or recorded — fail closed. The mounts themselves
//! are transient `.mount` units that systemd creates at the request of powernode-mount-helper
//! ([`powernode::mounthelper`]), the root helper that checks each one against the plan's shapes
//! and each lower's stored image, so this process holds no mount capability and no grant that
//! reaches root; the plan comes from [`powernode::mount`]. A change builds a new generation next
//! to the current one, switches the target symlink with one rename, then stops the old
//! generation's units in reverse order. `state.json` is written after the mounts it describes exist.
//!
//! Each attached module is a child object `/com/powernode/Mount1/module/<escaped id>`
//! (`com.powernode.Mount1.Module`), listed by introspection (`busctl tree`).
//! Events: `module.attached`, `module.refused` (`stored: true` when an image in the store or
//! its state.json record failed the check), `module.detached`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use powernode::bus::BusError;
use powernode::config::Config;
use powernode::modules::{self, ModuleError, ModuleSummary};
use powernode::mount::{self, Layout, ModuleRecord, MountSpec, Plan, State};
use powernode::paths::Paths;
use powernode::pki::PkiStore;
use powernode::sandbox::Profile;
use powernode::systemd::{self, IdleTracker, TransientMount};
use powernode::transport::InstanceClient;
use powernode::{Error, fsutil};
use serde::Deserialize;
use serde_json::json;
use zbus::object_server::SignalEmitter;

pub const MOUNT_NAME: &str = "com.powernode.Mount1";
pub const MOUNT_PATH: &str = "/com/powernode/Mount1";
pub const MODULE_INTERFACE: &str = "com.powernode.Mount1.Module";

#[derive(Debug, Parser)]
#[command(
    name = "powernode-mountd",
    version,
    about = "Module composition daemon (com.powernode.Mount1)"
)]
pub struct Args {
    /// Node root: every path is taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Where the composed root appears (a symlink to the current generation).
    #[arg(long, default_value = mount::DEFAULT_TARGET)]
    pub target: PathBuf,
}

/// `GET modules` entry with the priority fields the composition needs.
#[derive(Debug, Clone, Deserialize)]
struct Assigned {
    id: String,
    name: String,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    effective_priority: Option<i64>,
    #[serde(default)]
    current_version: Option<serde_json::Value>,
    /// The module keeps /var across reboots (`/persist/var` bound onto the root). The
    /// development platform's addition; absent (false) from the upstream server.
    #[serde(default)]
    persistent: bool,
}

#[derive(Debug, Deserialize)]
struct AssignedList {
    #[serde(default)]
    modules: Vec<Assigned>,
}

impl Assigned {
    fn summary(&self) -> ModuleSummary {
        ModuleSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            priority: self.priority,
            current_version: self.current_version.clone(),
        }
    }

    /// The platform's `effective_priority` (inherited through dependencies), else `priority`.
    fn priority(&self) -> i64 {
        self.effective_priority.or(self.priority).unwrap_or(0)
    }
}

/// The D-Bus object path element for a module id: `[A-Za-z0-9]` kept, every other byte as
/// `_xx` (the escaping sd_bus_path_encode uses), `_` alone for an empty id.
pub fn object_path_for(id: &str) -> String {
    let mut s = String::from(MOUNT_PATH);
    s.push_str("/module/");
    if id.is_empty() {
        s.push('_');
    }
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() {
            s.push(b as char);
        } else {
            s.push_str(&format!("_{b:02x}"));
        }
    }
    s
}

fn now() -> String {
    powernode::pki::rfc3339(time::OffsetDateTime::now_utc())
}

fn transient(spec: &MountSpec, what_for: &str) -> TransientMount {
    TransientMount {
        what: spec.what.clone(),
        r#where: spec.r#where.clone(),
        fstype: spec.fstype.clone(),
        options: spec.options.clone(),
        description: format!("Powernode module root: {what_for}"),
        lazy_unmount: true,
    }
}

/// Creates a directory mountd owns (so it can remove what systemd mounted inside later).
fn ensure_dirs(layout: &Layout) -> Result<(), Error> {
    for d in [
        &layout.lower_dir,
        &layout.upper_dir,
        &layout.generations_dir(),
    ] {
        fsutil::ensure_dir(d, 0o755)?;
    }
    Ok(())
}

/// Removes an empty mount point left behind after its unit stopped; a failure only leaves an
/// empty directory on a tmpfs, so it is logged, not returned.
fn remove_mount_point(p: &str) {
    match std::fs::remove_dir(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = p, error = %e, "mount point not removed"),
    }
}

/// Points `target` at `root` with one rename(2): readers see the old or the new generation.
fn link_target(target: &Path, root: &Path, generation: u64) -> Result<(), Error> {
    let parent = target
        .parent()
        .ok_or_else(|| Error::Config(format!("target {} has no parent", target.display())))?;
    fsutil::ensure_dir(parent, 0o755)?;
    if let Ok(meta) = std::fs::symlink_metadata(target)
        && !meta.file_type().is_symlink()
    {
        return Err(Error::Config(format!(
            "target {} exists and is not a symlink; refusing to replace it",
            target.display()
        )));
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.{generation}.tmp"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale link", &tmp, e)),
    }
    std::os::unix::fs::symlink(root, &tmp).map_err(|e| Error::io("symlink", &tmp, e))?;
    std::fs::rename(&tmp, target).map_err(|e| Error::io("rename into place", target, e))?;
    fsutil::fsync_dir(parent)
}

fn unlink_target(target: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(target).map_err(|e| Error::io("remove", target, e))
        }
        Ok(_) => Err(Error::Config(format!(
            "target {} is not a symlink; leaving it",
            target.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("stat", target, e)),
    }
}

/// Stops units in the given order, collecting every failure and continuing, so one stuck
/// unmount does not leave the rest mounted.
async fn stop_all(conn: &zbus::Connection, specs: &[&MountSpec]) -> Result<(), Error> {
    let mut errors = Vec::new();
    for spec in specs {
        let res = async {
            let unit = systemd::mount_unit_name(&spec.r#where)?;
            powernode::mounthelper::stop_unit(conn, &unit, systemd::JOB_TIMEOUT).await
        }
        .await;
        match res {
            Ok(()) => remove_mount_point(&spec.r#where),
            Err(e) => {
                tracing::error!(r#where = %spec.r#where, error = %e, "unmount failed");
                errors.push(e.to_string());
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Bus(errors.join("; ")))
    }
}

/// Mounts `plan` (lowers, upper, overlay, /var bind). On failure, stops what this call started,
/// in reverse, and returns the first error.
async fn bring_up(conn: &zbus::Connection, plan: &Plan) -> Result<(), Error> {
    let mut started: Vec<&MountSpec> = Vec::new();
    let result = bring_up_inner(conn, plan, &mut started).await;
    if let Err(e) = &result {
        tracing::error!(generation = plan.generation, error = %e, "mounting the new generation failed; rolling back");
        started.reverse();
        if let Err(e) = stop_all(conn, &started).await {
            tracing::error!(error = %e, "rollback left units behind");
        }
    }
    result
}

async fn bring_up_inner<'p>(
    conn: &zbus::Connection,
    plan: &'p Plan,
    started: &mut Vec<&'p MountSpec>,
) -> Result<(), Error> {
    // A leftover of this generation (a crash between mounting and recording) may have other
    // lowers: it is not in state.json, so it is stopped, not reused.
    let leftovers = plan.generation_mounts();
    for spec in leftovers.iter().rev() {
        let unit = systemd::mount_unit_name(&spec.r#where)?;
        if systemd::unit_active_state(conn, &unit).await?.is_some() {
            powernode::mounthelper::stop_unit(conn, &unit, systemd::JOB_TIMEOUT).await?;
        }
    }
    for (i, spec) in plan.lowers.iter().enumerate() {
        let what_for = format!("lower {} of generation {}", i + 1, plan.generation);
        let (_, fresh) = powernode::mounthelper::start_mount(
            conn,
            &transient(spec, &what_for),
            systemd::JOB_TIMEOUT,
        )
        .await?;
        if fresh {
            started.push(spec);
        }
    }
    let what_for = format!("upper tmpfs of generation {}", plan.generation);
    powernode::mounthelper::start_mount(
        conn,
        &transient(&plan.upper, &what_for),
        systemd::JOB_TIMEOUT,
    )
    .await?;
    started.push(&plan.upper);
    for d in &plan.upper_dirs {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create overlay directory", d, e)),
        }
    }
    let what_for = format!("overlay of generation {}", plan.generation);
    powernode::mounthelper::start_mount(
        conn,
        &transient(&plan.overlay, &what_for),
        systemd::JOB_TIMEOUT,
    )
    .await?;
    started.push(&plan.overlay);
    if let Some(var) = &plan.persist_var {
        let what_for = format!("persistent /var of generation {}", plan.generation);
        powernode::mounthelper::start_mount(conn, &transient(var, &what_for), systemd::JOB_TIMEOUT)
            .await?;
        started.push(var);
    }
    Ok(())
}

/// Moves from `old` to `new`: the new generation up, the target switched, the old generation
/// and lowers no longer used stopped (in reverse order). `new == None` detaches everything.
async fn transition(
    conn: &zbus::Connection,
    layout: &Layout,
    old: Option<&Plan>,
    new: Option<&Plan>,
) -> Result<(), Error> {
    ensure_dirs(layout)?;
    if let Some(new) = new {
        bring_up(conn, new).await?;
        if let Err(e) = link_target(&new.target, &new.root, new.generation) {
            // Undo the new generation and the lowers the current one does not use.
            let in_use: BTreeSet<&str> = old
                .map(|o| o.lowers.iter().map(|l| l.r#where.as_str()).collect())
                .unwrap_or_default();
            let specs: Vec<&MountSpec> = new
                .stop_order()
                .into_iter()
                .filter(|m| !in_use.contains(m.r#where.as_str()))
                .collect();
            if let Err(se) = stop_all(conn, &specs).await {
                tracing::error!(error = %se, "rollback left units behind");
            }
            return Err(e);
        }
    } else if let Some(old) = old {
        unlink_target(&old.target)?;
    }
    if let Some(old) = old {
        let keep: BTreeSet<&str> = new
            .map(|n| n.lowers.iter().map(|l| l.r#where.as_str()).collect())
            .unwrap_or_default();
        let mut specs = old.generation_mounts();
        specs.reverse();
        specs.extend(
            old.lowers
                .iter()
                .rev()
                .filter(|l| !keep.contains(l.r#where.as_str())),
        );
        stop_all(conn, &specs).await?;
    }
    Ok(())
}

/// What a refused or failed module fetch becomes on the bus: verification failures are
/// `Crypto`, platform errors keep their kind, the rest (no artifact, registry trouble) `NotFound`.
fn module_bus_error(e: ModuleError) -> BusError {
    match e {
        ModuleError::Verification { .. } => BusError::Crypto(e.to_string()),
        ModuleError::Platform(pe) => BusError::from(pe),
        ModuleError::Other { .. } => BusError::NotFound(e.to_string()),
    }
}

/// A module as a child object.
struct ModuleObject {
    id: String,
    rec: ModuleRecord,
}

#[zbus::interface(name = "com.powernode.Mount1.Module")]
impl ModuleObject {
    #[zbus(property)]
    async fn id(&self) -> String {
        self.id.clone()
    }
    #[zbus(property)]
    async fn name(&self) -> String {
        self.rec.name.clone()
    }
    /// `sha256:<hex>` of the EROFS image.
    #[zbus(property)]
    async fn digest(&self) -> String {
        self.rec.digest.clone()
    }
    #[zbus(property)]
    async fn fsverity(&self) -> String {
        self.rec.fsverity.clone()
    }
    #[zbus(property)]
    async fn priority(&self) -> i64 {
        self.rec.priority
    }
    /// `mounted` while the module is part of the current generation.
    #[zbus(property)]
    async fn state(&self) -> String {
        "mounted".into()
    }
    #[zbus(property)]
    async fn mounted_at(&self) -> String {
        self.rec.mounted_at.clone()
    }
}

struct MountService {
    paths: Paths,
    cfg: Config,
    target: PathBuf,
    state: State,
    /// Why state.json could not be read; while set, nothing is changed.
    broken: Option<String>,
    last_error: String,
    idle: IdleTracker,
}

impl MountService {
    fn layout(&self, target: Option<&str>) -> Layout {
        let mut layout = Layout::new(&self.paths, None);
        layout.target = match target {
            Some(t) => PathBuf::from(t),
            None => self.paths.under(&self.target.to_string_lossy()),
        };
        layout.upper_owner = Some((
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ));
        layout
    }

    /// The plan of what state.json says is mounted.
    fn current_plan(&self) -> Result<Option<Plan>, Error> {
        if !self.state.union_mounted || self.state.modules.is_empty() {
            return Ok(None);
        }
        let layout = self.layout(self.state.target.as_deref());
        Ok(Some(mount::plan(
            &layout,
            &self.state.images(&self.paths),
            self.state.generation,
        )?))
    }

    fn usable(&self) -> Result<(), BusError> {
        match &self.broken {
            Some(why) => Err(BusError::Malformed(format!(
                "{why}; refusing to change mounts until it is repaired"
            ))),
            None => Ok(()),
        }
    }

    async fn assigned(&self) -> Result<(InstanceClient, Vec<Assigned>), Error> {
        let mut client = InstanceClient::new(
            self.cfg.platform.clone(),
            PkiStore::new(self.paths.pki_dir()),
        );
        let list: AssignedList = client.get("/modules").await?;
        Ok((client, list.modules))
    }

    /// Pulls and verifies each module; the first refusal aborts (fail closed) after an event.
    async fn fetch_all(
        &self,
        conn: &zbus::Connection,
        client: &mut InstanceClient,
        wanted: &[Assigned],
    ) -> Result<Vec<(Assigned, modules::Fetched)>, BusError> {
        let mut out = Vec::new();
        for a in wanted {
            match modules::fetch_and_verify(client, &self.paths, &a.summary()).await {
                Ok(f) => {
                    tracing::info!(module = %f.name, digest = %f.image_digest, fsverity = %f.fsverity_digest, "module verified");
                    out.push((a.clone(), f));
                }
                Err(e) => {
                    tracing::error!(module = %a.name, error = %e, "module refused");
                    powernode::bus::emit_event(
                        Some(conn),
                        "module.refused",
                        "error",
                        json!({"module_id": a.id, "name": a.name, "error": e.to_string(), "verification": e.is_verification()}),
                    )
                    .await;
                    return Err(module_bus_error(e));
                }
            }
        }
        Ok(out)
    }

    /// Checks every image of `desired` again from the store with
    /// [`modules::verify_stored`] (SHA-256, fs-verity, the kept bundle under the node's own
    /// signer policy), whether it was fetched just now or comes from state.json — after a
    /// reboot, a Detach or an unchanged module in a Sync alike. The first refusal is a
    /// `module.refused` event and a `Crypto` error; nothing is mounted.
    async fn verify_images(
        &self,
        conn: &zbus::Connection,
        desired: &BTreeMap<String, ModuleRecord>,
    ) -> Result<(), BusError> {
        for (id, rec) in desired {
            let (paths, r) = (self.paths.clone(), rec.clone());
            let checked = tokio::task::spawn_blocking(move || {
                let trust = modules::NodeTrust::load(&paths, &r.name, None)?;
                modules::verify_stored(&paths, &r.name, &r.digest, &r.fsverity, &trust)
            })
            .await
            .map_err(|e| BusError::Bus(format!("verifying module {id}: {e}")))?;
            match checked {
                Ok(v) => {
                    tracing::debug!(module = %rec.name, digest = %v.digest, kernel_verity = %v.kernel_verity, "stored image verified");
                }
                Err(e) => {
                    tracing::error!(module = %rec.name, digest = %rec.digest, error = %e, "stored image refused; nothing is mounted");
                    powernode::bus::emit_event(
                        Some(conn),
                        "module.refused",
                        "error",
                        json!({"module_id": id, "name": rec.name, "digest": rec.digest, "error": e.to_string(), "verification": e.is_verification(), "stored": true}),
                    )
                    .await;
                    return Err(module_bus_error(e));
                }
            }
        }
        Ok(())
    }

    /// Makes `desired` the composed set: a new generation (or none), state.json, objects.
    /// Every image is verified first ([`MountService::verify_images`]).
    async fn apply(
        &mut self,
        conn: &zbus::Connection,
        desired: BTreeMap<String, ModuleRecord>,
    ) -> Result<(), BusError> {
        self.verify_images(conn, &desired).await?;
        let old = self.current_plan()?;
        let generation = self.state.generation + 1;
        let layout = self.layout(None);
        let mut next = State {
            generation: self.state.generation,
            modules: desired,
            union_mounted: false,
            target: None,
            ..State::default()
        };
        let new = if next.modules.is_empty() {
            None
        } else {
            next.generation = generation;
            next.union_mounted = true;
            next.target = Some(layout.target.to_string_lossy().into_owned());
            Some(mount::plan(&layout, &next.images(&self.paths), generation).map_err(Error::from)?)
        };
        transition(conn, &layout, old.as_ref(), new.as_ref()).await?;
        mount::save_state(&self.paths, &next)?;
        let before = std::mem::replace(&mut self.state, next);
        self.publish_modules(conn, &before).await;
        Ok(())
    }

    /// Brings child objects in line with the state.
    async fn publish_modules(&self, conn: &zbus::Connection, before: &State) {
        let server = conn.object_server();
        for (id, rec) in &before.modules {
            if self.state.modules.get(id) != Some(rec)
                && let Err(e) = server.remove::<ModuleObject, _>(object_path_for(id)).await
            {
                tracing::warn!(module = %id, error = %e, "child object not removed");
            }
        }
        for (id, rec) in &self.state.modules {
            if before.modules.get(id) == Some(rec) {
                continue;
            }
            let obj = ModuleObject {
                id: id.clone(),
                rec: rec.clone(),
            };
            if let Err(e) = server.at(object_path_for(id), obj).await {
                tracing::warn!(module = %id, error = %e, "child object not published");
            }
        }
    }

    async fn changed(&self, emitter: &SignalEmitter<'_>, before: (bool, u64, String)) {
        let r = async {
            if before.0 != self.state.union_mounted {
                self.union_mounted_changed(emitter).await?;
            }
            if before.1 != self.state.generation {
                self.generation_changed(emitter).await?;
                self.modules_changed(emitter).await?;
            }
            if before.2 != self.last_error {
                self.last_error_changed(emitter).await?;
            }
            zbus::Result::Ok(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "PropertiesChanged not sent");
        }
    }

    fn snapshot(&self) -> (bool, u64, String) {
        (
            self.state.union_mounted,
            self.state.generation,
            self.last_error.clone(),
        )
    }

    fn record(a: &Assigned, f: &modules::Fetched, at: &str) -> ModuleRecord {
        ModuleRecord {
            name: f.name.clone(),
            digest: f.image_digest.clone(),
            fsverity: f.fsverity_digest.clone(),
            priority: a.priority(),
            persistent: a.persistent,
            mounted_at: at.to_string(),
        }
    }

    /// After a Sync, which fetched everything assigned: images neither assigned nor under the
    /// booted root (boot.json) leave the store. A failure is logged; the Sync stands.
    fn prune(&self, fetched: &[(Assigned, modules::Fetched)]) {
        let mut keep: std::collections::BTreeSet<String> = fetched
            .iter()
            .map(|(_, f)| f.image_digest.clone())
            .collect();
        match powernode::sysroot::BootRecord::load(&self.paths) {
            Ok(Some(r)) => keep.extend(r.module_digests().into_values()),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "boot record unreadable; not pruning the store");
                return;
            }
        }
        match modules::prune_store(&self.paths, &keep) {
            Ok(p) if !p.images.is_empty() => {
                tracing::info!(images = ?p.images, bytes = p.bytes, "removed images no longer assigned");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot prune the module store"),
        }
    }

    async fn do_attach(&mut self, conn: &zbus::Connection, id: &str) -> Result<String, BusError> {
        self.usable()?;
        let (mut client, list) = self.assigned().await.map_err(BusError::from)?;
        let Some(a) = list.into_iter().find(|m| m.id == id || m.name == id) else {
            return Err(BusError::NotFound(format!(
                "module {id} is not assigned to this node"
            )));
        };
        let fetched = self
            .fetch_all(conn, &mut client, std::slice::from_ref(&a))
            .await?;
        let (a, f) = fetched
            .into_iter()
            .next()
            .ok_or_else(|| BusError::Bus("no module fetched".into()))?;
        let mut desired = self.state.modules.clone();
        let rec = Self::record(&a, &f, &now());
        if let Some(cur) = desired.get(&a.id)
            && cur.digest == rec.digest
            && cur.priority == rec.priority
            && cur.persistent == rec.persistent
            && self.state.union_mounted
        {
            return Ok(cur.digest.clone());
        }
        desired.insert(a.id.clone(), rec.clone());
        self.apply(conn, desired).await?;
        powernode::bus::emit_event(
            Some(conn),
            "module.attached",
            "info",
            json!({"module_id": a.id, "name": rec.name, "digest": rec.digest, "fsverity": rec.fsverity, "generation": self.state.generation}),
        )
        .await;
        Ok(rec.digest)
    }

    async fn do_detach(&mut self, conn: &zbus::Connection, id: &str) -> Result<u64, BusError> {
        self.usable()?;
        let key = self
            .state
            .modules
            .iter()
            .find(|(k, r)| k.as_str() == id || r.name == id)
            .map(|(k, _)| k.clone())
            .ok_or_else(|| BusError::NotFound(format!("module {id} is not attached")))?;
        let mut desired = self.state.modules.clone();
        let rec = desired.remove(&key);
        self.apply(conn, desired).await?;
        powernode::bus::emit_event(
            Some(conn),
            "module.detached",
            "info",
            json!({"module_id": key, "name": rec.map(|r| r.name), "generation": self.state.generation}),
        )
        .await;
        Ok(self.state.generation)
    }

    async fn do_sync(&mut self, conn: &zbus::Connection) -> Result<u64, BusError> {
        self.usable()?;
        let (mut client, list) = self.assigned().await.map_err(BusError::from)?;
        let fetched = self.fetch_all(conn, &mut client, &list).await?;
        let at = now();
        let mut desired = BTreeMap::new();
        for (a, f) in &fetched {
            let mut rec = Self::record(a, f, &at);
            if let Some(cur) = self.state.modules.get(&a.id)
                && cur.digest == rec.digest
            {
                rec.mounted_at = cur.mounted_at.clone();
            }
            desired.insert(a.id.clone(), rec);
        }
        if desired == self.state.modules && (self.state.union_mounted || desired.is_empty()) {
            self.prune(&fetched);
            return Ok(self.state.generation);
        }
        let before = self.state.modules.clone();
        self.apply(conn, desired).await?;
        self.prune(&fetched);
        for (id, rec) in &self.state.modules {
            if before.get(id).map(|r| &r.digest) != Some(&rec.digest) {
                powernode::bus::emit_event(
                    Some(conn),
                    "module.attached",
                    "info",
                    json!({"module_id": id, "name": rec.name, "digest": rec.digest, "fsverity": rec.fsverity, "generation": self.state.generation}),
                )
                .await;
            }
        }
        for (id, rec) in &before {
            if !self.state.modules.contains_key(id) {
                powernode::bus::emit_event(
                    Some(conn),
                    "module.detached",
                    "info",
                    json!({"module_id": id, "name": rec.name, "generation": self.state.generation}),
                )
                .await;
            }
        }
        Ok(self.state.generation)
    }

    /// Runs one operation with idle tracking, LastError and change signals.
    async fn finish<T>(
        &mut self,
        emitter: &SignalEmitter<'_>,
        before: (bool, u64, String),
        r: Result<T, BusError>,
    ) -> Result<T, BusError> {
        self.last_error = match &r {
            Ok(_) => String::new(),
            Err(e) => bus_error_message(e),
        };
        self.changed(emitter, before).await;
        self.idle.touch();
        r
    }
}

fn bus_error_message(e: &BusError) -> String {
    match e {
        BusError::ZBus(z) => z.to_string(),
        BusError::Config(m)
        | BusError::Io(m)
        | BusError::Unreachable(m)
        | BusError::Refused(m)
        | BusError::Malformed(m)
        | BusError::TooLarge(m)
        | BusError::NotFound(m)
        | BusError::Crypto(m)
        | BusError::Identity(m)
        | BusError::Sandbox(m)
        | BusError::Bus(m) => m.clone(),
    }
}

#[zbus::interface(name = "com.powernode.Mount1")]
impl MountService {
    /// Pull, verify and compose one assigned module (by id or name); returns its image digest.
    async fn attach(
        &mut self,
        id: &str,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, BusError> {
        // Not idle while the call runs, however long the platform or the registry takes.
        let _busy = self.idle.busy();
        let before = self.snapshot();
        let r = self.do_attach(conn, id).await;
        self.finish(&emitter, before, r).await
    }

    /// Remove one module from the composition; returns the new generation.
    async fn detach(
        &mut self,
        id: &str,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<u64, BusError> {
        // Not idle while the call runs, however long the platform or the registry takes.
        let _busy = self.idle.busy();
        let before = self.snapshot();
        let r = self.do_detach(conn, id).await;
        self.finish(&emitter, before, r).await
    }

    /// Compose exactly the platform's assignment list; any refusal changes nothing.
    async fn sync(
        &mut self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<u64, BusError> {
        // Not idle while the call runs, however long the platform or the registry takes.
        let _busy = self.idle.busy();
        let before = self.snapshot();
        let r = self.do_sync(conn).await;
        self.finish(&emitter, before, r).await
    }

    /// Ids of the composed modules, highest priority first (their objects are children).
    #[zbus(property)]
    async fn modules(&self) -> Vec<String> {
        self.idle.touch();
        let images = self.state.images(&self.paths);
        mount::stack_order(&images)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    }

    #[zbus(property)]
    async fn union_mounted(&self) -> bool {
        self.idle.touch();
        self.state.union_mounted
    }

    #[zbus(property)]
    async fn generation(&self) -> u64 {
        self.state.generation
    }

    /// Where the composed root appears.
    #[zbus(property)]
    async fn target(&self) -> String {
        self.state
            .target
            .clone()
            .unwrap_or_else(|| self.layout(None).target.to_string_lossy().into_owned())
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.last_error.clone()
    }
}

pub async fn serve(paths: Paths, cfg: Config, target: PathBuf) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let (state, broken) = match mount::load_state(&paths) {
        Ok(s) => (s, None),
        Err(e) => {
            tracing::error!(error = %e, "state.json unreadable; serving read-only");
            (State::default(), Some(e.to_string()))
        }
    };
    let service = MountService {
        paths,
        cfg,
        target,
        last_error: broken.clone().unwrap_or_default(),
        state,
        broken,
        idle: idle.clone(),
    };
    let children: Vec<(String, ModuleObject)> = service
        .state
        .modules
        .iter()
        .map(|(id, rec)| {
            (
                object_path_for(id),
                ModuleObject {
                    id: id.clone(),
                    rec: rec.clone(),
                },
            )
        })
        .collect();
    let mut builder = zbus::connection::Builder::system().serve_at(MOUNT_PATH, service);
    for (path, obj) in children {
        builder = builder.serve_at(path, obj);
    }
    // Objects first, name last: a call queued by D-Bus activation is dispatched once the
    // name is owned and must find the state already loaded.
    let _conn = builder
        .name(MOUNT_NAME)
        .build()
        .await
        .with_context(|| format!("owning {MOUNT_NAME} on the system bus"))?;
    powernode::daemon::serve_until_idle(&idle, "serving com.powernode.Mount1").await?;
    Ok(())
}

pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-mountd",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            // Landlock grants only paths that exist when it is applied (tmpfiles.d creates
            // them on a node; a fresh --root may not have them yet).
            for dir in [
                modules::store_dir(&paths),
                paths.under(powernode::oci::VERITY_BINDINGS_DIR),
                paths.run_dir(),
            ] {
                fsutil::ensure_dir(&dir, 0o755)?;
            }
            let rt = powernode::daemon::start(Profile::Mount, &paths)?;
            rt.block_on(serve(paths, cfg, args.target))
                .map(|()| ExitCode::SUCCESS)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_are_escaped() {
        let cases = [
            ("abc123", "/com/powernode/Mount1/module/abc123"),
            (
                "6f1c0b8e-8a3e",
                "/com/powernode/Mount1/module/6f1c0b8e_2d8a3e",
            ),
            ("a_b.c", "/com/powernode/Mount1/module/a_5fb_2ec"),
            ("", "/com/powernode/Mount1/module/_"),
        ];
        for (id, want) in cases {
            let got = object_path_for(id);
            assert_eq!(got, want);
            assert!(zbus::ObjectPath::try_from(got.as_str()).is_ok(), "{got}");
        }
    }

    #[test]
    fn assigned_priority_prefers_effective() {
        let a: Assigned = serde_json::from_str(
            r#"{"id":"x","name":"n","priority":1,"effective_priority":5,"unknown":true}"#,
        )
        .expect("parse");
        assert_eq!(a.priority(), 5);
        let b: Assigned =
            serde_json::from_str(r#"{"id":"x","name":"n","priority":3}"#).expect("parse");
        assert_eq!(b.priority(), 3);
        let c: Assigned = serde_json::from_str(r#"{"id":"x","name":"n"}"#).expect("parse");
        assert_eq!(c.priority(), 0);
    }
}
