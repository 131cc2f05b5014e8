//! The root side of module composition, and the one way mountd reaches it.
//!
//! mountd talks to the platform and the registry, so it must not hold a grant that reaches root;
//! yet only a privileged caller may have systemd create `.mount` units (systemd 252 does not
//! describe `StartTransientUnit` to polkit, so a polkit grant for it would allow any transient
//! *service* too). `powernode-mount-helper` (`com.powernode.MountHelper1`, root with
//! CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH only, no network) is that caller, and it starts a mount
//! only when the request is one of the four shapes a composition plan produces
//! ([`check_mount`]), at the places the node's own configuration names:
//!
//! * a lower: the EROFS image `<store>/<hex>` read-only, `nosuid,nodev`, at
//!   `<lower dir>/<hex>` — and only after the helper itself has checked that the file's SHA-256
//!   is `<hex>`, the content address the signed manifest names (mountd verified the signature
//!   when it stored the image);
//! * an upper: a tmpfs at `<upper dir>/<n>`, `nosuid,nodev`, owned by the caller;
//! * an overlay at `<target>.gen/<n>` whose lowers are mounted EROFS lowers of the lower dir and
//!   whose upper and work directories lie on the mounted upper tmpfs of the same generation;
//! * the bind of `/persist/var` onto `<target>.gen/<n>/var` of a mounted overlay.
//!
//! Stops are limited the same way ([`check_stop`]): only mount units of those places.
//! Everything else is refused with the reason, before systemd is asked.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mount::{Layout, escape_overlay_value};
use crate::systemd::{TransientMount, escape_path};

pub const BUS_NAME: &str = "com.powernode.MountHelper1";
pub const OBJECT_PATH: &str = "/com/powernode/MountHelper1";
/// The user mountd runs as: the one caller besides root.
pub const CALLER_USER: &str = "powernode-mount";
/// EROFS_SUPER_MAGIC (include/uapi/linux/magic.h).
const EROFS_MAGIC: i64 = 0xE0F5_E1E2;
/// TMPFS_MAGIC (include/uapi/linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Store images are named by the SHA-256 of their content: 64 lowercase hex digits.
const HEX_LEN: usize = 64;

#[zbus::proxy(
    interface = "com.powernode.MountHelper1",
    default_service = "com.powernode.MountHelper1",
    default_path = "/com/powernode/MountHelper1"
)]
pub trait MountHelper1 {
    /// Has systemd mount one of the plan's mounts; returns the unit and whether this call
    /// started it.
    fn start_mount(
        &self,
        what: &str,
        r#where: &str,
        fstype: &str,
        options: &str,
        description: &str,
        lazy_unmount: bool,
    ) -> zbus::Result<(String, bool)>;

    /// Stops one of the composition's mount units.
    fn stop_unit(&self, unit: &str) -> zbus::Result<()>;
}

/// Why the helper will not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{what} {path:?} is not where a composition mounts it (expected {expected})")]
    Place {
        what: &'static str,
        path: String,
        expected: String,
    },
    #[error("mount options {options:?} refused: {reason}")]
    Options { options: String, reason: String },
    #[error("{0} is not a mounted {1}")]
    NotMounted(String, &'static str),
    #[error("image {path}: {reason}")]
    Image { path: String, reason: String },
    #[error("unit {0:?} is not one of the composition's mount units")]
    Unit(String),
    #[error("filesystem type {0:?} is never mounted by the composition")]
    FsType(String),
}

/// What an accepted request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Lower {
        hex: String,
    },
    Upper {
        generation: u64,
    },
    Overlay {
        generation: u64,
        lowers: Vec<String>,
    },
    PersistVar {
        generation: u64,
    },
}

/// Where the helper lets a composition mount, from the node's configuration (not the caller's).
#[derive(Debug, Clone)]
pub struct Policy {
    pub layout: Layout,
    pub store: PathBuf,
    /// The caller's uid and gid: the only owner an upper tmpfs may be given.
    pub caller: (u32, u32),
}

fn place(what: &'static str, path: &str, expected: impl Into<String>) -> Refusal {
    Refusal::Place {
        what,
        path: path.to_string(),
        expected: expected.into(),
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `dir/<rest>` → `rest`, when `path` is exactly one component below `dir`.
fn child_of<'a>(dir: &Path, path: &'a str) -> Option<&'a str> {
    let dir = dir.to_str()?;
    let rest = path.strip_prefix(dir)?.strip_prefix('/')?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

fn generation_of(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// True when `path` is a mount point: its device differs from its parent's.
fn is_mount_point(path: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    me.is_dir() && me.dev() != parent.dev()
}

// f_type is __fsword_t: i64 on x86_64, narrower on some other architectures.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0 as i64)
}

fn require_mounted(path: &Path, magic: i64, kind: &'static str) -> Result<(), Refusal> {
    if is_mount_point(path) && fs_magic(path) == Some(magic) {
        Ok(())
    } else {
        Err(Refusal::NotMounted(path.display().to_string(), kind))
    }
}

/// The comma-separated options, which must include `nosuid` and `nodev`: nothing the
/// composition mounts may carry a set-uid binary or a device node into the node.
fn options_with_nosuid(options: &str) -> Result<Vec<&str>, Refusal> {
    let opts: Vec<&str> = options.split(',').collect();
    for need in ["nosuid", "nodev"] {
        if !opts.contains(&need) {
            return Err(Refusal::Options {
                options: options.to_string(),
                reason: format!("{need} is required"),
            });
        }
    }
    Ok(opts)
}

/// Checks `m` against the policy; for a lower, also reads the image to check its digest.
pub fn check_mount(policy: &Policy, m: &TransientMount) -> Result<Checked, Refusal> {
    let layout = &policy.layout;
    match m.fstype.as_str() {
        "erofs" => {
            let hex = child_of(&layout.lower_dir, &m.r#where)
                .filter(|h| is_hex64(h))
                .ok_or_else(|| {
                    place(
                        "lower",
                        &m.r#where,
                        format!("{}/<sha256>", layout.lower_dir.display()),
                    )
                })?;
            let image = policy.store.join(hex);
            if Path::new(&m.what) != image {
                return Err(place("image", &m.what, image.display().to_string()));
            }
            let mut opts = options_with_nosuid(&m.options)?;
            opts.retain(|o| !matches!(*o, "nosuid" | "nodev"));
            if opts != ["ro"] {
                return Err(Refusal::Options {
                    options: m.options.clone(),
                    reason: "a lower is mounted with exactly ro,nosuid,nodev".into(),
                });
            }
            check_image_digest(&image, hex)?;
            Ok(Checked::Lower {
                hex: hex.to_string(),
            })
        }
        "tmpfs" => {
            let generation = child_of(&layout.upper_dir, &m.r#where)
                .and_then(generation_of)
                .ok_or_else(|| {
                    place(
                        "upper",
                        &m.r#where,
                        format!("{}/<n>", layout.upper_dir.display()),
                    )
                })?;
            if m.what != "tmpfs" {
                return Err(place("tmpfs source", &m.what, "tmpfs"));
            }
            let (uid, gid) = policy.caller;
            for o in options_with_nosuid(&m.options)? {
                let ok = match o.split_once('=') {
                    None => matches!(o, "nosuid" | "nodev"),
                    Some(("mode", v)) => v == "0755",
                    Some(("size", v)) => !v.is_empty() && v.len() <= 12,
                    Some(("uid", v)) => v == uid.to_string(),
                    Some(("gid", v)) => v == gid.to_string(),
                    Some(_) => false,
                };
                if !ok {
                    return Err(Refusal::Options {
                        options: m.options.clone(),
                        reason: format!("{o:?} is not an upper tmpfs option"),
                    });
                }
            }
            Ok(Checked::Upper { generation })
        }
        "overlay" => {
            let gens = layout.generations_dir();
            let generation = child_of(&gens, &m.r#where)
                .and_then(generation_of)
                .ok_or_else(|| place("overlay", &m.r#where, format!("{}/<n>", gens.display())))?;
            if m.what != "overlay" {
                return Err(place("overlay source", &m.what, "overlay"));
            }
            let lowers = check_overlay_options(policy, generation, &m.options)?;
            for hex in &lowers {
                require_mounted(&layout.lower_dir.join(hex), EROFS_MAGIC, "EROFS lower")?;
            }
            require_mounted(
                &layout.upper_dir.join(generation.to_string()),
                TMPFS_MAGIC,
                "upper tmpfs",
            )?;
            Ok(Checked::Overlay { generation, lowers })
        }
        "none" => {
            let gens = layout.generations_dir();
            let generation = m
                .r#where
                .strip_suffix("/var")
                .and_then(|g| child_of(&gens, g))
                .and_then(generation_of)
                .ok_or_else(|| {
                    place(
                        "/var bind",
                        &m.r#where,
                        format!("{}/<n>/var", gens.display()),
                    )
                })?;
            if Path::new(&m.what) != layout.persist_var || m.options != "bind" {
                return Err(place(
                    "/var bind source",
                    &m.what,
                    format!("{} with options bind", layout.persist_var.display()),
                ));
            }
            let root = layout.generation_dir(generation);
            if !is_mount_point(&root) {
                return Err(Refusal::NotMounted(root.display().to_string(), "overlay"));
            }
            Ok(Checked::PersistVar { generation })
        }
        other => Err(Refusal::FsType(other.to_string())),
    }
}

/// `nosuid,nodev,lowerdir=L1:L2…,upperdir=U,workdir=W` exactly as a plan writes it, each `L`
/// a lower of the lower dir; returns the lowers' digests in order.
fn check_overlay_options(
    policy: &Policy,
    generation: u64,
    options: &str,
) -> Result<Vec<String>, Refusal> {
    let refuse = |reason: String| Refusal::Options {
        options: options.to_string(),
        reason,
    };
    let layout = &policy.layout;
    let escaped = |p: &Path| escape_overlay_value(p).map_err(|e| refuse(e.to_string()));
    let upper_mnt = layout.upper_dir.join(generation.to_string());
    let tail = format!(
        ",upperdir={},workdir={}",
        escaped(&upper_mnt.join("upper"))?,
        escaped(&upper_mnt.join("work"))?
    );
    let lowers = options
        .strip_prefix("nosuid,nodev,lowerdir=")
        .and_then(|r| r.strip_suffix(tail.as_str()))
        .ok_or_else(|| {
            refuse(format!(
                "expected nosuid,nodev,lowerdir=…{tail} for generation {generation}"
            ))
        })?;
    let prefix = format!("{}/", escaped(&layout.lower_dir)?);
    let mut out = Vec::new();
    let mut rest = lowers;
    loop {
        let hex = rest
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.get(..HEX_LEN))
            .filter(|h| is_hex64(h))
            .ok_or_else(|| refuse(format!("a lowerdir is not {prefix}<sha256>")))?;
        out.push(hex.to_string());
        rest = &rest[prefix.len() + HEX_LEN..];
        match rest.strip_prefix(':') {
            Some(r) => rest = r,
            None if rest.is_empty() => return Ok(out),
            None => return Err(refuse(format!("unexpected {rest:?} after a lowerdir"))),
        }
    }
}

/// The image must be a regular file (not a link elsewhere) whose SHA-256 is its name.
fn check_image_digest(image: &Path, hex: &str) -> Result<(), Refusal> {
    let refuse = |reason: String| Refusal::Image {
        path: image.display().to_string(),
        reason,
    };
    let meta = std::fs::symlink_metadata(image).map_err(|e| refuse(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let (sha, _) = crate::fsverity::file_digests(image).map_err(|e| refuse(e.to_string()))?;
    if sha != hex {
        return Err(refuse(format!(
            "content is sha256:{sha}, not the sha256:{hex} it is stored as: refused, not mounted"
        )));
    }
    Ok(())
}

/// A stop is allowed only for the mount units of the composition's places.
pub fn check_stop(policy: &Policy, unit: &str) -> Result<(), Refusal> {
    let refuse = || Refusal::Unit(unit.to_string());
    let stem = unit.strip_suffix(".mount").ok_or_else(refuse)?;
    let under = |dir: &Path| -> Option<String> {
        dir.to_str()
            .and_then(|d| escape_path(d).ok())
            .and_then(|e| stem.strip_prefix(&format!("{e}-")).map(str::to_string))
    };
    let layout = &policy.layout;
    if under(&layout.lower_dir).is_some_and(|h| is_hex64(&h))
        || under(&layout.upper_dir).is_some_and(|g| generation_of(&g).is_some())
    {
        return Ok(());
    }
    if let Some(rest) = under(&layout.generations_dir()) {
        let g = rest.strip_suffix("-var").unwrap_or(&rest);
        if generation_of(g).is_some() {
            return Ok(());
        }
    }
    Err(refuse())
}

fn helper_error(what: &str, e: zbus::Error) -> crate::Error {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => {
            crate::Error::Bus(format!("{what}: {msg} ({name})"))
        }
        other => crate::Error::Bus(format!("{what}: powernode-mount-helper: {other}")),
    }
}

/// mountd's side: ask the helper for one mount of a plan.
pub async fn start_mount(
    conn: &zbus::Connection,
    m: &TransientMount,
    timeout: Duration,
) -> Result<(String, bool), crate::Error> {
    let helper = MountHelper1Proxy::new(conn).await?;
    let call = helper.start_mount(
        &m.what,
        &m.r#where,
        &m.fstype,
        &m.options,
        &m.description,
        m.lazy_unmount,
    );
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| {
            crate::Error::Bus(format!(
                "mounting {} took longer than {timeout:?}",
                m.r#where
            ))
        })?
        .map_err(|e| helper_error(&format!("mounting {}", m.r#where), e))
}

/// mountd's side: ask the helper to stop one of the composition's mount units.
pub async fn stop_unit(
    conn: &zbus::Connection,
    unit: &str,
    timeout: Duration,
) -> Result<(), crate::Error> {
    let helper = MountHelper1Proxy::new(conn).await?;
    tokio::time::timeout(timeout, helper.stop_unit(unit))
        .await
        .map_err(|_| crate::Error::Bus(format!("stopping {unit} took longer than {timeout:?}")))?
        .map_err(|e| helper_error(&format!("stopping {unit}"), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::paths::Paths;

    fn policy(root: &Path) -> Policy {
        let paths = Paths::new(root);
        Policy {
            layout: Layout::new(&paths, None),
            store: paths.under(crate::oci::STORE_DIR),
            caller: (998, 997),
        }
    }

    fn spec(what: &str, r#where: &str, fstype: &str, options: &str) -> TransientMount {
        TransientMount {
            what: what.into(),
            r#where: r#where.into(),
            fstype: fstype.into(),
            options: options.into(),
            description: "test".into(),
            lazy_unmount: false,
        }
    }

    fn store_image(p: &Policy, content: &[u8]) -> String {
        std::fs::create_dir_all(&p.store).unwrap();
        let hex = crate::oci::sha256_hex(content);
        std::fs::write(p.store.join(&hex), content).unwrap();
        hex
    }

    #[test]
    fn a_lower_is_its_stored_image_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = policy(d.path());
        let hex = store_image(&p, b"an erofs image");
        let lower = |hex: &str| p.layout.lower_dir.join(hex).display().to_string();
        let image = |hex: &str| p.store.join(hex).display().to_string();
        assert_eq!(
            check_mount(
                &p,
                &spec(&image(&hex), &lower(&hex), "erofs", "nosuid,nodev,ro")
            )
            .unwrap(),
            Checked::Lower { hex: hex.clone() }
        );
        // A tampered store file: named for one content, holding another.
        std::fs::write(p.store.join(&hex), b"rewritten while the node was down").unwrap();
        let err = check_mount(
            &p,
            &spec(&image(&hex), &lower(&hex), "erofs", "nosuid,nodev,ro"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("refused, not mounted"), "{err}");

        let other = store_image(&p, b"another image");
        for (what, r#where, options, want) in [
            // An arbitrary What= (a disk, a file elsewhere).
            (
                "/dev/vda".to_string(),
                lower(&other),
                "nosuid,nodev,ro",
                "is not where",
            ),
            (
                image(&other),
                lower(&hex),
                "nosuid,nodev,ro",
                "is not where",
            ),
            // Somewhere else.
            (
                image(&other),
                "/etc".to_string(),
                "nosuid,nodev,ro",
                "is not where",
            ),
            (
                image(&other),
                format!("{}/../x", lower(&other)),
                "nosuid,nodev,ro",
                "is not where",
            ),
            // Set-uid binaries or writable.
            (image(&other), lower(&other), "ro", "nosuid is required"),
            (
                image(&other),
                lower(&other),
                "nosuid,nodev,rw",
                "exactly ro,nosuid,nodev",
            ),
        ] {
            let err = check_mount(&p, &spec(&what, &r#where, "erofs", options))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{what} {where} {options}: {err}");
        }
    }

    #[test]
    fn uppers_overlays_and_binds_only_in_their_places() {
        let d = tempfile::tempdir().unwrap();
        let p = policy(d.path());
        let upper = p.layout.upper_dir.join("3").display().to_string();
        assert_eq!(
            check_mount(
                &p,
                &spec(
                    "tmpfs",
                    &upper,
                    "tmpfs",
                    "mode=0755,nosuid,nodev,size=512m,uid=998,gid=997"
                )
            )
            .unwrap(),
            Checked::Upper { generation: 3 }
        );
        for (r#where, options) in [
            (
                upper.as_str(),
                "mode=0755,nosuid,nodev,size=512m,uid=0,gid=0",
            ),
            (upper.as_str(), "mode=0755,nodev,size=512m"),
            (upper.as_str(), "mode=4777,nosuid,nodev"),
            ("/run/powernode/x", "nosuid,nodev"),
        ] {
            assert!(check_mount(&p, &spec("tmpfs", r#where, "tmpfs", options)).is_err());
        }

        // An overlay over a directory that is not a mounted lower: refused.
        let hex = "a".repeat(64);
        std::fs::create_dir_all(p.layout.lower_dir.join(&hex)).unwrap();
        let esc = |p: &Path| escape_overlay_value(p).unwrap();
        let upper_mnt = p.layout.upper_dir.join("3");
        let options = format!(
            "nosuid,nodev,lowerdir={}/{hex},upperdir={},workdir={}",
            esc(&p.layout.lower_dir),
            esc(&upper_mnt.join("upper")),
            esc(&upper_mnt.join("work"))
        );
        let root = p.layout.generation_dir(3).display().to_string();
        let err = check_mount(&p, &spec("overlay", &root, "overlay", &options))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a mounted EROFS lower"), "{err}");
        assert_eq!(
            check_overlay_options(&p, 3, &options).unwrap(),
            vec![hex.clone()]
        );
        // Another generation's upper, a foreign lowerdir, missing nosuid.
        for bad in [
            options.replace("/3/", "/4/"),
            options.replace(&format!("/{hex}"), "/etc"),
            options.replacen("nosuid,nodev,", "", 1),
            format!("{options},redirect_dir=on"),
        ] {
            assert!(check_overlay_options(&p, 3, &bad).is_err(), "{bad}");
        }
        // The /var bind: only /persist/var, only onto a generation's var, only once mounted.
        let var = format!("{root}/var");
        let persist = p.layout.persist_var.display().to_string();
        let err = check_mount(&p, &spec(&persist, &var, "none", "bind"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a mounted overlay"), "{err}");
        assert!(check_mount(&p, &spec("/", &var, "none", "bind")).is_err());
        assert!(check_mount(&p, &spec(&persist, "/var", "none", "bind")).is_err());
        assert!(check_mount(&p, &spec("proc", "/proc", "proc", "")).is_err());
    }

    #[test]
    fn only_the_compositions_units_may_be_stopped() {
        let p = policy(Path::new("/"));
        let hex = "b".repeat(64);
        for ok in [
            format!("run-powernode-mounts-lower-{hex}.mount"),
            "run-powernode-mounts-upper-7.mount".to_string(),
            "run-powernode-root.gen-7.mount".to_string(),
            "run-powernode-root.gen-7-var.mount".to_string(),
        ] {
            check_stop(&p, &ok).unwrap();
        }
        for bad in [
            "dbus.service",
            "-.mount",
            "persist.mount",
            "run-powernode-mounts-lower-x.mount",
            "run-powernode-root.gen-7-etc.mount",
            "run-powernode-mounts-upper-7.service",
        ] {
            assert!(check_stop(&p, bad).is_err(), "{bad}");
        }
    }
}
