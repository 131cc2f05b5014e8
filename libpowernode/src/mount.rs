//! Composition of verified module images into one overlayfs root: the mount *plan* and the
//! on-disk record of what is mounted (`state.json`). No mounting happens here — mountd hands the
//! plan to systemd as transient `.mount` units ([`crate::systemd::TransientMount`]), and the
//! initramfs boot path (issue #7) will mount the same plan directly.
//!
//! A plan for generation `n` is, in start order:
//! 1. one read-only EROFS mount per distinct image at `/run/powernode/mounts/lower/<sha256 hex>`
//!    (shared by every generation that uses the image);
//! 2. a tmpfs at `/run/powernode/mounts/upper/<n>` holding the overlay's `upper/` and `work/`
//!    directories (overlayfs requires both on the same mount);
//! 3. the overlay at `<target>.gen/<n>`, `lowerdir` = the lowers, **highest priority first**
//!    (overlayfs resolves a name in the first lower that has it, so that module wins);
//! 4. when any module is persistent, a bind of `/persist/var` onto `<target>.gen/<n>/var`, so
//!    writes under /var survive reboots while the rest of the root stays ephemeral.
//!
//! **Order.** Modules are sorted by `effective_priority` descending, ties by module id
//! ascending (byte order): the smaller id wins a tie, the same way on every node. Two modules
//! carrying the same image share one lower at the position of the first.
//!
//! **The target** (default `/run/powernode/root`; `/sysroot` at boot) is a symlink to the current
//! generation's directory, replaced with one `rename(2)`: a reader resolving the path sees the
//! old root or the new one, never a missing or half-built one, and a process already inside the
//! old generation keeps working until that generation is stopped, after the switch. A bind
//! mount would not do: stacking the new generation over the old one is atomic, but stopping the
//! old unit would then unmount the top of the stack (the new one).
//!
//! **Escaping.** Overlay option values are escaped for the kernel's parser (`\` → `\\`,
//! `,` → `\,`, and `:` → `\:`, which separates lowers); paths that no escaping makes safe through
//! mount(8) (relative or non-normalised paths, control characters, `"` which libmount treats as
//! quoting, non-UTF-8) are refused, as is an option string longer than the one page
//! mount(2) accepts.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::paths::Paths;

/// The current `state.json` layout. A file with a newer version is refused, not guessed at.
pub const SCHEMA_VERSION: u32 = 1;
/// Where each image's EROFS lower is mounted (`<dir>/<sha256 hex>`).
pub const LOWER_DIR: &str = "/run/powernode/mounts/lower";
/// Where each generation's upper tmpfs is mounted (`<dir>/<generation>`).
pub const UPPER_DIR: &str = "/run/powernode/mounts/upper";
/// The composed root when nothing else is configured.
pub const DEFAULT_TARGET: &str = "/run/powernode/root";
/// What persistent modules keep across reboots, bound onto the root's /var.
pub const PERSIST_VAR: &str = "/persist/var";
/// state.json is small; anything bigger is not ours.
const STATE_LIMIT: u64 = 1 << 20;
/// mount(2) copies at most one page of option data (legacy API, which mount(8) 2.38 uses).
const MAX_OPTIONS: usize = 4095;
/// overlayfs's own limit on stacked lowers (OVL_MAX_STACK).
const MAX_LOWERS: usize = 500;
/// Size of each generation's upper tmpfs; writes beyond it fail with ENOSPC instead of eating
/// the node's memory.
const UPPER_SIZE: &str = "512m";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("path {path:?} cannot be used in a mount: {reason}")]
    Unexpressible { path: String, reason: &'static str },
    #[error("module {id:?}: {reason}")]
    InvalidModule { id: String, reason: String },
    #[error("{0}")]
    TooLarge(String),
    #[error("state file {path}: {detail}")]
    State { path: PathBuf, detail: String },
}

impl From<MountError> for crate::Error {
    fn from(e: MountError) -> Self {
        match e {
            MountError::Unexpressible { .. } | MountError::InvalidModule { .. } => {
                crate::Error::Config(e.to_string())
            }
            MountError::TooLarge(m) => crate::Error::Config(m),
            MountError::State { .. } => crate::Error::malformed("state.json", e),
        }
    }
}

/// A verified module image ready to be composed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleImage {
    pub id: String,
    pub name: String,
    /// `sha256:<hex>` of the EROFS image: its content address in the store.
    pub digest: String,
    pub fsverity: String,
    pub effective_priority: i64,
    /// Keeps /var across reboots (the `/persist/var` bind).
    pub persistent: bool,
    /// The image file in the store.
    pub image: PathBuf,
}

/// One mount, as a `.mount` unit describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub what: String,
    pub r#where: String,
    pub fstype: String,
    pub options: String,
}

/// Paths of a composition, all under the node root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub target: PathBuf,
    pub lower_dir: PathBuf,
    pub upper_dir: PathBuf,
    pub persist_var: PathBuf,
    /// Owner of each upper tmpfs's root, so the unprivileged caller can create `upper/` and
    /// `work/` in it (systemd mounts; it does not create directories inside).
    pub upper_owner: Option<(u32, u32)>,
    /// Mount lowers and the overlay `nosuid,nodev` (default). A composition at runtime serves
    /// files, not a booted system, and an unprivileged caller that can have images mounted must
    /// not gain a set-uid binary that way; the boot path (issue #7) turns it off for /sysroot.
    pub nosuid: bool,
}

impl Layout {
    /// The layout under `paths`' root with `target` (default [`DEFAULT_TARGET`]), which is an
    /// absolute path of the node and so is placed under the root too.
    pub fn new(paths: &Paths, target: Option<&Path>) -> Layout {
        let target = match target {
            Some(t) => paths.under(&t.to_string_lossy()),
            None => paths.under(DEFAULT_TARGET),
        };
        Layout {
            target,
            lower_dir: paths.under(LOWER_DIR),
            upper_dir: paths.under(UPPER_DIR),
            persist_var: paths.under(PERSIST_VAR),
            upper_owner: None,
            nosuid: true,
        }
    }

    /// `<target>.gen`: the directory holding one mount point per generation.
    pub fn generations_dir(&self) -> PathBuf {
        let mut s = self.target.clone().into_os_string();
        s.push(".gen");
        PathBuf::from(s)
    }

    pub fn generation_dir(&self, generation: u64) -> PathBuf {
        self.generations_dir().join(generation.to_string())
    }
}

/// Everything to mount for one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub generation: u64,
    /// Highest priority first; also the start order.
    pub lowers: Vec<MountSpec>,
    pub upper: MountSpec,
    /// `upper/` and `work/` inside the upper tmpfs, created between the tmpfs and the overlay.
    pub upper_dirs: [PathBuf; 2],
    pub overlay: MountSpec,
    pub persist_var: Option<MountSpec>,
    /// The generation's mount point (`<target>.gen/<n>`), where the target symlink points.
    pub root: PathBuf,
    pub target: PathBuf,
    /// Module ids in overlay order (highest priority first).
    pub order: Vec<String>,
}

impl Plan {
    /// Start order: lowers, upper, overlay, the /var bind.
    pub fn start_order(&self) -> Vec<&MountSpec> {
        let mut v: Vec<&MountSpec> = self.lowers.iter().collect();
        v.push(&self.upper);
        v.push(&self.overlay);
        v.extend(self.persist_var.iter());
        v
    }

    /// Stop order: the reverse of [`Plan::start_order`].
    pub fn stop_order(&self) -> Vec<&MountSpec> {
        let mut v = self.start_order();
        v.reverse();
        v
    }

    /// The mounts only this generation uses (everything but the shared lowers).
    pub fn generation_mounts(&self) -> Vec<&MountSpec> {
        let mut v = vec![&self.upper, &self.overlay];
        v.extend(self.persist_var.iter());
        v
    }
}

/// Checks that `path` can be written into a mount option or a unit property unchanged.
pub fn check_path(path: &Path) -> Result<&str, MountError> {
    let refuse = |reason| MountError::Unexpressible {
        path: path.to_string_lossy().into_owned(),
        reason,
    };
    let s = path.to_str().ok_or_else(|| refuse("not UTF-8"))?;
    if !s.starts_with('/') {
        return Err(refuse("not absolute"));
    }
    if s.len() > 1 && (s.ends_with('/') || s.contains("//")) {
        return Err(refuse("not normalised (repeated or trailing slash)"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
        || s.split('/').any(|c| c == "." || c == "..")
    {
        return Err(refuse("not normalised (. or .. component)"));
    }
    if s.chars().any(char::is_control) {
        return Err(refuse("contains a control character"));
    }
    if s.contains('"') {
        return Err(refuse("contains '\"', which libmount takes as quoting"));
    }
    Ok(s)
}

/// Escapes one overlay option value (a path) for the kernel's option parser.
pub fn escape_overlay_value(path: &Path) -> Result<String, MountError> {
    let s = check_path(path)?;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    Ok(out)
}

fn digest_hex(m: &ModuleImage) -> Result<&str, MountError> {
    let hex = m
        .digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| MountError::InvalidModule {
            id: m.id.clone(),
            reason: format!("digest {:?} is not sha256:<64 lowercase hex>", m.digest),
        })?;
    Ok(hex)
}

/// Overlay order: `effective_priority` descending, then id ascending.
pub fn stack_order(modules: &[ModuleImage]) -> Vec<&ModuleImage> {
    let mut v: Vec<&ModuleImage> = modules.iter().collect();
    v.sort_by(|a, b| {
        b.effective_priority
            .cmp(&a.effective_priority)
            .then_with(|| a.id.cmp(&b.id))
    });
    v
}

/// The plan for `modules` as generation `generation`. Refuses an empty set (nothing to
/// compose), duplicate ids, malformed digests and paths that cannot be expressed.
pub fn plan(layout: &Layout, modules: &[ModuleImage], generation: u64) -> Result<Plan, MountError> {
    if modules.is_empty() {
        return Err(MountError::InvalidModule {
            id: String::new(),
            reason: "no modules to compose".into(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in modules {
        if m.id.is_empty() {
            return Err(MountError::InvalidModule {
                id: m.id.clone(),
                reason: "empty id".into(),
            });
        }
        if !seen.insert(m.id.as_str()) {
            return Err(MountError::InvalidModule {
                id: m.id.clone(),
                reason: "listed twice".into(),
            });
        }
    }
    let ordered = stack_order(modules);
    if ordered.len() > MAX_LOWERS {
        return Err(MountError::TooLarge(format!(
            "{} modules exceed overlayfs's limit of {MAX_LOWERS} lowers",
            ordered.len()
        )));
    }
    let flags = if layout.nosuid { "nosuid,nodev," } else { "" };
    let mut lowers: Vec<MountSpec> = Vec::new();
    let mut lowerdir: Vec<String> = Vec::new();
    for m in &ordered {
        let hex = digest_hex(m)?;
        let at = layout.lower_dir.join(hex);
        let at_s = check_path(&at)?.to_string();
        if lowers.iter().any(|l| l.r#where == at_s) {
            continue;
        }
        lowerdir.push(escape_overlay_value(&at)?);
        lowers.push(MountSpec {
            what: check_path(&m.image)?.to_string(),
            r#where: at_s,
            fstype: "erofs".into(),
            options: format!("{flags}ro"),
        });
    }
    let upper_mnt = layout.upper_dir.join(generation.to_string());
    let upper_dir = upper_mnt.join("upper");
    let work_dir = upper_mnt.join("work");
    let mut upper_opts = format!("mode=0755,nosuid,nodev,size={UPPER_SIZE}");
    if let Some((uid, gid)) = layout.upper_owner {
        upper_opts.push_str(&format!(",uid={uid},gid={gid}"));
    }
    let upper = MountSpec {
        what: "tmpfs".into(),
        r#where: check_path(&upper_mnt)?.to_string(),
        fstype: "tmpfs".into(),
        options: upper_opts,
    };
    let options = format!(
        "{flags}lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        escape_overlay_value(&upper_dir)?,
        escape_overlay_value(&work_dir)?
    );
    if options.len() > MAX_OPTIONS {
        return Err(MountError::TooLarge(format!(
            "overlay options are {} bytes, more than the {MAX_OPTIONS} mount(2) accepts",
            options.len()
        )));
    }
    let root = layout.generation_dir(generation);
    let overlay = MountSpec {
        what: "overlay".into(),
        r#where: check_path(&root)?.to_string(),
        fstype: "overlay".into(),
        options,
    };
    let persist_var = if ordered.iter().any(|m| m.persistent) {
        Some(MountSpec {
            what: check_path(&layout.persist_var)?.to_string(),
            r#where: check_path(&root.join("var"))?.to_string(),
            fstype: "none".into(),
            options: "bind".into(),
        })
    } else {
        None
    };
    check_path(&layout.target)?;
    Ok(Plan {
        generation,
        lowers,
        upper,
        upper_dirs: [upper_dir, work_dir],
        overlay,
        persist_var,
        root,
        target: layout.target.clone(),
        order: ordered.iter().map(|m| m.id.clone()).collect(),
    })
}

/// What `state.json` records per attached module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    #[serde(default)]
    pub name: String,
    pub digest: String,
    pub fsverity: String,
    pub priority: i64,
    #[serde(default)]
    pub persistent: bool,
    /// RFC 3339.
    pub mounted_at: String,
}

/// `<state dir>/state.json`: what is composed now. Written only after the mounts it describes
/// are in place, so a crash leaves the previous, still true, record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub schema_version: u32,
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleRecord>,
    #[serde(default)]
    pub union_mounted: bool,
    #[serde(default)]
    pub generation: u64,
    /// The target the generation is linked at (absolute, under the node root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema_version: SCHEMA_VERSION,
            modules: BTreeMap::new(),
            union_mounted: false,
            generation: 0,
            target: None,
        }
    }
}

impl State {
    /// Heartbeat `module_digests`: module id → image digest.
    pub fn module_digests(&self) -> BTreeMap<String, String> {
        self.modules
            .iter()
            .map(|(id, r)| (id.clone(), r.digest.clone()))
            .collect()
    }

    /// Heartbeat `mount_state`.
    pub fn mount_state(&self) -> &'static str {
        if self.union_mounted {
            "mounted"
        } else {
            "unmounted"
        }
    }

    /// The recorded modules as images in the store, for re-planning.
    pub fn images(&self, paths: &Paths) -> Vec<ModuleImage> {
        self.modules
            .iter()
            .map(|(id, r)| ModuleImage {
                id: id.clone(),
                name: r.name.clone(),
                digest: r.digest.clone(),
                fsverity: r.fsverity.clone(),
                effective_priority: r.priority,
                persistent: r.persistent,
                image: crate::modules::store_dir(paths)
                    .join(r.digest.strip_prefix("sha256:").unwrap_or(&r.digest)),
            })
            .collect()
    }
}

pub fn state_path(paths: &Paths) -> PathBuf {
    paths.state_dir().join("state.json")
}

/// Parses state.json's bytes; a torn or foreign file is an error naming `path`, never an
/// empty state (that would make the heartbeat report nothing mounted while mounts exist).
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<State, MountError> {
    let err = |detail: String| MountError::State {
        path: path.to_path_buf(),
        detail,
    };
    let state: State =
        serde_json::from_slice(bytes).map_err(|e| err(format!("unreadable: {e}")))?;
    if state.schema_version == 0 || state.schema_version > SCHEMA_VERSION {
        return Err(err(format!(
            "schema_version {} is not supported (this build reads 1..={SCHEMA_VERSION})",
            state.schema_version
        )));
    }
    Ok(state)
}

/// The composition state; no file yet means nothing is mounted.
pub fn load_state(paths: &Paths) -> crate::Result<State> {
    let path = state_path(paths);
    match fsutil::read_optional(&path, STATE_LIMIT)? {
        None => Ok(State::default()),
        Some(bytes) => Ok(parse_state(&path, &bytes)?),
    }
}

/// Writes state.json atomically (temp, fsync, rename, fsync dir), world-readable: it holds
/// digests, no secrets, and the agent's heartbeat reads it.
pub fn save_state(paths: &Paths, state: &State) -> crate::Result<()> {
    let mut bytes =
        serde_json::to_vec_pretty(state).map_err(|e| crate::Error::malformed("state.json", e))?;
    bytes.push(b'\n');
    fsutil::atomic_write(&state_path(paths), &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn module(id: &str, prio: i64, digest_char: char) -> ModuleImage {
        ModuleImage {
            id: id.into(),
            name: format!("name-{id}"),
            digest: format!("sha256:{}", hex(digest_char)),
            fsverity: format!("sha256:{}", hex('f')),
            effective_priority: prio,
            persistent: false,
            image: PathBuf::from(format!("/persist/cache/modules/{}", hex(digest_char))),
        }
    }

    fn layout() -> Layout {
        Layout::new(&Paths::default(), None)
    }

    #[test]
    fn stack_order_is_priority_descending_then_id() {
        /// (id, effective_priority) in input order → ids in overlay order.
        type Case<'a> = (&'a [(&'a str, i64)], &'a [&'a str]);
        let cases: &[Case] = &[
            (&[("a", 1), ("b", 2)], &["b", "a"]),
            (&[("b", 5), ("a", 5)], &["a", "b"]),
            (
                &[("m", 1), ("z", 3), ("a", 3), ("q", -1)],
                &["a", "z", "m", "q"],
            ),
            (&[("only", 0)], &["only"]),
        ];
        for (input, want) in cases {
            let mods: Vec<ModuleImage> = input
                .iter()
                .enumerate()
                .map(|(i, (id, p))| module(id, *p, char::from(b'a' + i as u8)))
                .collect();
            let got: Vec<&str> = stack_order(&mods).iter().map(|m| m.id.as_str()).collect();
            assert_eq!(&got, want, "{input:?}");
            let p = plan(&layout(), &mods, 1).expect("plan");
            assert_eq!(p.order, *want);
        }
    }

    #[test]
    fn plan_for_two_modules() {
        let p = plan(
            &layout(),
            &[module("low", 1, 'a'), module("high", 2, 'b')],
            7,
        )
        .expect("plan");
        assert_eq!(p.lowers.len(), 2);
        assert_eq!(
            p.lowers[0].r#where,
            format!("/run/powernode/mounts/lower/{}", hex('b'))
        );
        assert_eq!(
            p.lowers[0].what,
            format!("/persist/cache/modules/{}", hex('b'))
        );
        assert_eq!(
            (p.lowers[0].fstype.as_str(), p.lowers[0].options.as_str()),
            ("erofs", "nosuid,nodev,ro")
        );
        assert_eq!(p.upper.r#where, "/run/powernode/mounts/upper/7");
        assert_eq!(p.upper.fstype, "tmpfs");
        assert_eq!(p.overlay.r#where, "/run/powernode/root.gen/7");
        assert_eq!(
            p.overlay.options,
            format!(
                "nosuid,nodev,lowerdir=/run/powernode/mounts/lower/{}:/run/powernode/mounts/lower/{},upperdir=/run/powernode/mounts/upper/7/upper,workdir=/run/powernode/mounts/upper/7/work",
                hex('b'),
                hex('a')
            )
        );
        assert!(p.persist_var.is_none());
        assert_eq!(p.target, PathBuf::from("/run/powernode/root"));
        let start: Vec<&str> = p.start_order().iter().map(|m| m.r#where.as_str()).collect();
        let mut stop: Vec<&str> = p.stop_order().iter().map(|m| m.r#where.as_str()).collect();
        stop.reverse();
        assert_eq!(start, stop);
        assert_eq!(start.last(), Some(&"/run/powernode/root.gen/7"));
    }

    #[test]
    fn persistent_module_binds_persist_var_and_shared_images_mount_once() {
        let mut a = module("a", 1, 'a');
        a.persistent = true;
        let b = module("b", 1, 'a'); // same image
        let p = plan(&layout(), &[a, b], 2).expect("plan");
        assert_eq!(p.lowers.len(), 1, "one lower per image");
        let var = p.persist_var.clone().expect("var bind");
        assert_eq!(
            (
                var.what.as_str(),
                var.r#where.as_str(),
                var.options.as_str()
            ),
            ("/persist/var", "/run/powernode/root.gen/2/var", "bind")
        );
        assert_eq!(p.stop_order()[0].r#where, "/run/powernode/root.gen/2/var");
    }

    #[test]
    fn configured_target_and_root() {
        let paths = Paths::new("/tmp/node");
        let mut l = Layout::new(&paths, Some(Path::new("/sysroot")));
        l.upper_owner = Some((990, 991));
        l.nosuid = false;
        let p = plan(&l, &[module("a", 1, 'c')], 1).expect("plan");
        assert_eq!(p.lowers[0].options, "ro");
        assert!(
            p.overlay.options.starts_with("lowerdir="),
            "{}",
            p.overlay.options
        );
        assert_eq!(p.target, PathBuf::from("/tmp/node/sysroot"));
        assert_eq!(p.overlay.r#where, "/tmp/node/sysroot.gen/1");
        assert!(
            p.upper.options.ends_with(",uid=990,gid=991"),
            "{}",
            p.upper.options
        );
    }

    #[test]
    fn escaping_and_refusals() {
        let ok = [
            ("/plain/path", "/plain/path"),
            ("/a,b", "/a\\,b"),
            ("/c:d", "/c\\:d"),
            ("/e\\f", "/e\\\\f"),
            ("/sp ace/ü", "/sp ace/ü"),
            ("/", "/"),
        ];
        for (input, want) in ok {
            assert_eq!(escape_overlay_value(Path::new(input)).expect(input), want);
        }
        let refused = [
            "relative/path",
            "",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/trailing/",
            "/new\nline",
            "/tab\there",
            "/quo\"te",
        ];
        for input in refused {
            assert!(
                matches!(
                    escape_overlay_value(Path::new(input)),
                    Err(MountError::Unexpressible { .. })
                ),
                "{input:?} must be refused"
            );
        }
        use std::os::unix::ffi::OsStrExt;
        let non_utf8 = Path::new(std::ffi::OsStr::from_bytes(b"/x\xff"));
        assert!(escape_overlay_value(non_utf8).is_err());
    }

    #[test]
    fn plan_refusals() {
        let l = layout();
        assert!(plan(&l, &[], 1).is_err(), "empty");
        assert!(
            plan(&l, &[module("a", 1, 'a'), module("a", 2, 'b')], 1).is_err(),
            "duplicate id"
        );
        let mut bad = module("x", 1, 'a');
        bad.digest = "sha256:ABC".into();
        assert!(matches!(
            plan(&l, &[bad], 1),
            Err(MountError::InvalidModule { .. })
        ));
        let mut upper = module("x", 1, 'a');
        upper.digest = format!("sha256:{}", hex('A'));
        assert!(plan(&l, &[upper], 1).is_err(), "uppercase hex");
        let mut img = module("x", 1, 'a');
        img.image = PathBuf::from("cache/relative");
        assert!(matches!(
            plan(&l, &[img], 1),
            Err(MountError::Unexpressible { .. })
        ));
        let bad_target = Layout {
            target: PathBuf::from("/run/\"root"),
            ..layout()
        };
        assert!(plan(&bad_target, &[module("x", 1, 'a')], 1).is_err());
        // ~100 bytes per lower: 60 lowers exceed one page of options.
        let many: Vec<ModuleImage> = (0..60)
            .map(|i| {
                let mut m = module(&format!("m{i:02}"), i, 'a');
                m.digest = format!("sha256:{:064x}", i);
                m
            })
            .collect();
        assert!(matches!(plan(&l, &many, 1), Err(MountError::TooLarge(_))));
        assert!(plan(&l, &many[..30], 1).is_ok());
    }

    #[test]
    fn state_round_trip_and_heartbeat_views() {
        let d = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(d.path());
        fsutil::ensure_dir(&paths.state_dir(), 0o750).expect("dir");
        let empty = load_state(&paths).expect("missing = empty");
        assert_eq!(empty, State::default());
        assert_eq!(empty.mount_state(), "unmounted");
        let mut s = State {
            generation: 3,
            union_mounted: true,
            target: Some("/run/powernode/root".into()),
            ..State::default()
        };
        s.modules.insert(
            "m1".into(),
            ModuleRecord {
                name: "hello".into(),
                digest: format!("sha256:{}", hex('a')),
                fsverity: format!("sha256:{}", hex('b')),
                priority: 2,
                persistent: false,
                mounted_at: "2026-11-28T12:00:00Z".into(),
            },
        );
        save_state(&paths, &s).expect("save");
        let back = load_state(&paths).expect("load");
        assert_eq!(back, s);
        assert_eq!(back.mount_state(), "mounted");
        assert_eq!(
            back.module_digests(),
            BTreeMap::from([("m1".to_string(), format!("sha256:{}", hex('a')))])
        );
        let images = back.images(&paths);
        assert_eq!(
            images[0].image,
            d.path().join(format!("persist/cache/modules/{}", hex('a')))
        );
        // Only state.json in the directory: no temp files left.
        let names: Vec<_> = std::fs::read_dir(paths.state_dir())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn torn_or_foreign_state_is_a_clear_error() {
        let p = Path::new("/x/state.json");
        let cases: &[(&[u8], &str)] = &[
            (b"", "unreadable"),
            (
                b"{\"schema_version\":1,\"modules\":{\"a\":{\"dig",
                "unreadable",
            ),
            (b"\x00\x00\x00\x00", "unreadable"),
            (b"[1,2]", "unreadable"),
            (b"{\"schema_version\":2}", "schema_version 2"),
            (b"{\"schema_version\":0}", "schema_version 0"),
            (b"{\"modules\":{}}", "unreadable"),
            (
                b"{\"schema_version\":1,\"modules\":{\"a\":{\"digest\":1}}}",
                "unreadable",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse_state(p, bytes).expect_err(&String::from_utf8_lossy(bytes));
            let msg = e.to_string();
            assert!(msg.contains("/x/state.json") && msg.contains(want), "{msg}");
        }
        assert!(parse_state(p, b"{\"schema_version\":1,\"future_field\":true}").is_ok());
        // Through load_state the error keeps its kind for D-Bus and exit codes.
        let d = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(d.path());
        fsutil::ensure_dir(&paths.state_dir(), 0o750).expect("dir");
        std::fs::write(state_path(&paths), b"{torn").expect("write");
        let e = load_state(&paths).expect_err("torn");
        assert_eq!(e.kind(), crate::ErrorKind::Malformed);
    }
}
