//! Assembling the node's root filesystem in the initramfs (`powernode-agent boot`, issue #7):
//! finding or creating the `/persist` partition, and the mount plan that stacks verified EROFS
//! module images into an overlayfs at `/sysroot`.
//!
//! Everything that decides something is a pure function over bytes or paths (superblock label,
//! blank-disk test, layer order, overlay option string), so it is unit-tested on the host; the
//! side effects go through the small [`Mounter`] trait, whose production implementation calls
//! util-linux `mount(8)` (which attaches a loop device for an image file: the Debian 6.1 kernel
//! has no file-backed EROFS, shared/harness.md §1.1).
//!
//! This module is deliberately self-contained: mountd's general mount code lives elsewhere
//! (`mount.rs`, another branch) and the two can be unified once both exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::paths::Paths;

/// ext4 volume label of the persistent partition.
pub const PERSIST_LABEL: &str = "pnpersist";

/// Where the initramfs mounts the persistent partition (the state dir lives below it).
pub const PERSIST_DIR: &str = "/persist";

/// Where systemd's `initrd-switch-root.target` expects the new root.
pub const SYSROOT_DIR: &str = "/sysroot";

/// Lower layers and the overlay's tmpfs. Under /run so they stay visible (and inspectable)
/// after the switch: systemd moves /run into the new root.
pub const LAYERS_DIR: &str = "/run/powernode/sysroot";

/// What the boot mounted, left for the booted system (/run moves into the new root): the
/// resident agent can report `module_digests` from it.
pub const BOOT_RECORD: &str = "/run/powernode/boot.json";

/// Bytes of a candidate disk read to decide it is blank: the partition table (MBR + GPT header
/// and entries) and every common filesystem superblock lie in the first MiB.
pub const BLANK_PROBE_BYTES: usize = 1024 * 1024;

/// ext4 superblock: at byte 1024; magic at +0x38, volume name (16 bytes) at +0x78.
const EXT_SUPERBLOCK_OFFSET: usize = 1024;
const EXT_MAGIC_OFFSET: usize = 0x38;
const EXT_MAGIC: u16 = 0xEF53;
const EXT_LABEL_OFFSET: usize = 0x78;
const EXT_LABEL_LEN: usize = 16;

/// Bytes to read from a device to find an ext2/3/4 label.
pub const SUPERBLOCK_PROBE_BYTES: usize = EXT_SUPERBLOCK_OFFSET + EXT_LABEL_OFFSET + EXT_LABEL_LEN;

#[derive(Debug, thiserror::Error)]
pub enum SysrootError {
    /// A path that cannot be written into an overlayfs option string.
    #[error(
        "path {0} cannot be used in an overlayfs option (contains ',', ':', '\\' or a newline)"
    )]
    UnsafePath(PathBuf),
    #[error("no module layers to mount: refusing to build an empty /sysroot")]
    NoLayers,
    #[error("no persistent disk: no ext4 filesystem labelled {label} and no blank disk")]
    NoPersistDisk { label: &'static str },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

impl SysrootError {
    /// A bounded name for logs and events.
    pub fn kind(&self) -> &'static str {
        match self {
            SysrootError::UnsafePath(_) => "unsafe_path",
            SysrootError::NoLayers => "no_layers",
            SysrootError::NoPersistDisk { .. } => "no_persist_disk",
            SysrootError::Io { .. } => "io",
            SysrootError::Command { .. } => "command",
        }
    }

    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        SysrootError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The ext2/3/4 volume label in the first [`SUPERBLOCK_PROBE_BYTES`] of a device, if the bytes
/// hold an ext superblock (an empty label is `Some("")`).
pub fn ext4_label(head: &[u8]) -> Option<String> {
    let sb = head.get(EXT_SUPERBLOCK_OFFSET..)?;
    let magic = sb.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != EXT_MAGIC {
        return None;
    }
    let raw = sb.get(EXT_LABEL_OFFSET..EXT_LABEL_OFFSET + EXT_LABEL_LEN)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// A disk is blank when its first bytes are all zero: no partition table, no filesystem.
/// Anything else is somebody's data and is never formatted.
pub fn is_blank(head: &[u8]) -> bool {
    !head.is_empty() && head.iter().all(|&b| b == 0)
}

/// Whole-disk names the persistent partition may live on (virtio, SCSI/SATA, NVMe, Xen).
pub fn is_candidate_disk(name: &str) -> bool {
    ["vd", "sd", "xvd", "nvme"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// One module image to stack, with the platform's priority (a rank: 0 is the first assignment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: String,
    pub image: PathBuf,
    pub priority: Option<i64>,
}

/// Overlay order: the lowest rank first (overlayfs's first lower wins), modules without a
/// priority last; equal ranks keep the platform's order (the sort is stable).
pub fn order_layers(mut layers: Vec<Layer>) -> Vec<Layer> {
    layers.sort_by_key(|l| (l.priority.is_none(), l.priority.unwrap_or(0)));
    layers
}

/// How one step of the plan is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// `mount -t <fstype> -o <options> <source> <target>`; for an image file with `loop` in
    /// the options, mount(8) attaches a read-only loop device.
    Fs {
        fstype: String,
        source: String,
        options: Vec<String>,
    },
    /// `mount --bind <source> <target>`.
    Bind { source: PathBuf },
    /// `umount --lazy <target>`: the mount point goes away, the filesystem lives on as long as
    /// something (a bind elsewhere, a loop device) still holds it.
    Detach,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountStep {
    pub kind: MountKind,
    pub target: PathBuf,
    /// Directories created (mode 0755) before this step.
    pub mkdirs: Vec<PathBuf>,
}

impl MountStep {
    /// The util-linux program of this step: `mount`, or `umount` for [`MountKind::Detach`].
    pub fn program(&self) -> &'static str {
        match self.kind {
            MountKind::Detach => "umount",
            _ => "mount",
        }
    }

    /// The arguments of [`MountStep::program`] for this step.
    pub fn args(&self) -> Vec<String> {
        let target = self.target.display().to_string();
        match &self.kind {
            MountKind::Fs {
                fstype,
                source,
                options,
            } => vec![
                "-t".into(),
                fstype.clone(),
                "-o".into(),
                options.join(","),
                source.clone(),
                target,
            ],
            MountKind::Bind { source } => {
                vec!["--bind".into(), source.display().to_string(), target]
            }
            MountKind::Detach => vec!["--lazy".into(), target],
        }
    }
}

/// Where the plan puts things; [`Layout::default`] is the initramfs layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub sysroot: PathBuf,
    pub layers: PathBuf,
    /// The mounted persistent partition, moved into the new root when `Some`.
    pub persist: Option<PathBuf>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            sysroot: PathBuf::from(SYSROOT_DIR),
            layers: PathBuf::from(LAYERS_DIR),
            persist: Some(PathBuf::from(PERSIST_DIR)),
        }
    }
}

/// The planned mounts, in order, and where each layer ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<MountStep>,
    /// `(layer name, mount point)` in overlay order.
    pub lowers: Vec<(String, PathBuf)>,
    /// The overlay's `lowerdir=…,upperdir=…,workdir=…`.
    pub overlay_options: String,
}

fn option_safe(p: &Path) -> Result<String, SysrootError> {
    let s = p
        .to_str()
        .ok_or_else(|| SysrootError::UnsafePath(p.to_path_buf()))?;
    if s.is_empty() || s.contains([',', ':', '\\', '\n']) {
        return Err(SysrootError::UnsafePath(p.to_path_buf()));
    }
    Ok(s.to_string())
}

/// The mount plan for `layers` (already in overlay order, see [`order_layers`]):
/// 1. each image read-only through a loop device at `<layers>/lower/<index>` (indices, not
///    module names, so no name can reach the option string);
/// 2. a tmpfs at `<layers>/rw` holding the overlay's `upper` and `work` — one filesystem, as
///    overlayfs requires (the upstream helper put them on two);
/// 3. the overlay at the sysroot;
/// 4. the persistent partition bound to `<sysroot>/persist`, so the state dir has the same path
///    before and after the switch, then detached from the initramfs's `/persist`. (Not
///    `mount --move`: the kernel refuses to move a mount whose parent is shared, and systemd
///    makes the initramfs root shared.)
pub fn plan(layers: &[Layer], layout: &Layout) -> Result<Plan, SysrootError> {
    if layers.is_empty() {
        return Err(SysrootError::NoLayers);
    }
    let mut steps = Vec::new();
    let mut lowers = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let target = layout.layers.join("lower").join(i.to_string());
        let image = layer
            .image
            .to_str()
            .ok_or_else(|| SysrootError::UnsafePath(layer.image.clone()))?;
        steps.push(MountStep {
            kind: MountKind::Fs {
                fstype: "erofs".into(),
                source: image.to_string(),
                options: vec!["ro".into(), "loop".into()],
            },
            target: target.clone(),
            mkdirs: vec![target.clone()],
        });
        lowers.push((layer.name.clone(), target));
    }
    let rw = layout.layers.join("rw");
    steps.push(MountStep {
        kind: MountKind::Fs {
            fstype: "tmpfs".into(),
            source: "pn-sysroot-rw".into(),
            options: vec!["mode=0755".into()],
        },
        target: rw.clone(),
        mkdirs: vec![rw.clone()],
    });
    let upper = rw.join("upper");
    let work = rw.join("work");
    let lowerdir = lowers
        .iter()
        .map(|(_, p)| option_safe(p))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let overlay_options = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        option_safe(&upper)?,
        option_safe(&work)?
    );
    steps.push(MountStep {
        kind: MountKind::Fs {
            fstype: "overlay".into(),
            source: "pn-sysroot".into(),
            options: vec![overlay_options.clone()],
        },
        target: layout.sysroot.clone(),
        mkdirs: vec![upper, work, layout.sysroot.clone()],
    });
    if let Some(persist) = &layout.persist {
        let target = layout.sysroot.join("persist");
        steps.push(MountStep {
            kind: MountKind::Bind {
                source: persist.clone(),
            },
            target: target.clone(),
            mkdirs: vec![target],
        });
        steps.push(MountStep {
            kind: MountKind::Detach,
            target: persist.clone(),
            mkdirs: Vec::new(),
        });
    }
    Ok(Plan {
        steps,
        lowers,
        overlay_options,
    })
}

/// `/run/powernode/boot.json`: the layers of the booted root, in overlay order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    pub sysroot: PathBuf,
    pub layers: Vec<BootLayer>,
    /// What the boot path cost in CPU up to writing this record (the issue's ≤ 300 ms goal).
    #[serde(default)]
    pub cpu: Option<CpuTime>,
}

/// CPU time of this process, and of its waited-for children (mount(8), mkfs.ext4), in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTime {
    pub user_ms: u64,
    pub system_ms: u64,
    pub children_ms: u64,
}

impl CpuTime {
    /// The figures so far, from getrusage(2) (which fails only for a bad `who`).
    pub fn now() -> Option<CpuTime> {
        use nix::sys::resource::{UsageWho, getrusage};
        let ms = |t: nix::sys::time::TimeVal| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(t.tv_usec()).unwrap_or(0) / 1000
        };
        let me = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let kids = getrusage(UsageWho::RUSAGE_CHILDREN).ok()?;
        Some(CpuTime {
            user_ms: ms(me.user_time()),
            system_ms: ms(me.system_time()),
            children_ms: ms(kids.user_time()) + ms(kids.system_time()),
        })
    }

    /// This process's own CPU time.
    pub fn own_ms(&self) -> u64 {
        self.user_ms + self.system_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootLayer {
    pub name: String,
    pub lower: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
    /// `sha256:<hex>` of the EROFS image (what the signature covers).
    #[serde(default)]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub fsverity_digest: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
}

impl BootRecord {
    /// Module name → image digest, the heartbeat's `module_digests`.
    pub fn module_digests(&self) -> BTreeMap<String, String> {
        self.layers
            .iter()
            .filter_map(|l| Some((l.name.clone(), l.image_digest.clone()?)))
            .collect()
    }

    pub fn write(&self, paths: &Paths) -> crate::Result<()> {
        let p = paths.under(BOOT_RECORD);
        if let Some(dir) = p.parent() {
            crate::fsutil::ensure_dir(dir, 0o755)?;
        }
        let bytes =
            serde_json::to_vec(self).map_err(|e| crate::Error::malformed("boot record", e))?;
        crate::fsutil::atomic_write(&p, &bytes, 0o644)
    }

    /// The record of this boot; `None` when the node did not boot through `powernode-agent boot`.
    pub fn load(paths: &Paths) -> crate::Result<Option<BootRecord>> {
        match crate::fsutil::read_optional(&paths.under(BOOT_RECORD), 1024 * 1024)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| crate::Error::malformed("boot record", e)),
        }
    }
}

/// Side effects of a plan. The production one is [`SystemMounter`]; tests record calls.
pub trait Mounter {
    fn mkdir_all(&mut self, dir: &Path) -> Result<(), SysrootError>;
    fn mount(&mut self, step: &MountStep) -> Result<(), SysrootError>;
}

/// Runs a plan step by step; stops at the first failure (the boot fails closed, nothing later
/// is mounted on top of a half-built root).
pub fn execute(plan: &Plan, m: &mut dyn Mounter) -> Result<(), SysrootError> {
    for step in &plan.steps {
        for d in &step.mkdirs {
            m.mkdir_all(d)?;
        }
        m.mount(step)?;
    }
    Ok(())
}

/// util-linux `mount(8)` and the real filesystem.
#[derive(Debug, Default)]
pub struct SystemMounter;

impl Mounter for SystemMounter {
    fn mkdir_all(&mut self, dir: &Path) -> Result<(), SysrootError> {
        std::fs::create_dir_all(dir).map_err(|e| SysrootError::io("creating", dir, e))
    }

    fn mount(&mut self, step: &MountStep) -> Result<(), SysrootError> {
        run(step.program(), &step.args())
    }
}

/// Runs a tool and turns a failure into [`SysrootError::Command`] with its stderr.
pub fn run(program: &str, args: &[String]) -> Result<(), SysrootError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| SysrootError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(SysrootError::Command {
        command,
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// `mkfs.ext4` arguments for a new persistent partition: 4 KiB blocks and the `verity` feature
/// (fs-verity on ext4 needs the block size to equal the page size; mkfs picks 1 KiB on small
/// disks otherwise).
pub fn mkfs_args(device: &Path) -> Vec<String> {
    vec![
        "-q".into(),
        "-F".into(),
        "-b".into(),
        "4096".into(),
        "-O".into(),
        "verity".into(),
        "-L".into(),
        PERSIST_LABEL.into(),
        device.display().to_string(),
    ]
}

/// What [`find_persist`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistDisk {
    /// An ext4 filesystem labelled [`PERSIST_LABEL`].
    Existing(PathBuf),
    /// A whole disk whose first MiB is zero: may be formatted.
    Blank(PathBuf),
}

fn read_head(dev: &Path, len: usize) -> Result<Vec<u8>, SysrootError> {
    use std::io::Read;
    let f = std::fs::File::open(dev).map_err(|e| SysrootError::io("opening", dev, e))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(|e| SysrootError::io("reading", dev, e))?;
    Ok(buf)
}

/// Block devices under `sys_block` (`/sys/class/block`), whole disks and partitions, sorted by
/// name; read-only and zero-sized devices are skipped.
fn block_devices(sys_block: &Path) -> Result<Vec<(String, bool)>, SysrootError> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(sys_block).map_err(|e| SysrootError::io("listing", sys_block, e))?;
    for e in entries {
        let e = e.map_err(|e| SysrootError::io("listing", sys_block, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        if read("ro").trim() == "1" || read("size").trim() == "0" {
            continue;
        }
        let partition = dir.join("partition").exists();
        if !is_candidate_disk(&name) {
            continue;
        }
        out.push((name, partition));
    }
    out.sort();
    Ok(out)
}

/// The persistent disk: the first device (disk or partition) holding an ext4 labelled
/// [`PERSIST_LABEL`], else the first blank whole disk. `dev` is `/dev`, `sys_block` is
/// `/sys/class/block` (parameters so tests can point them at fixtures).
pub fn find_persist(dev: &Path, sys_block: &Path) -> Result<PersistDisk, SysrootError> {
    let devices = block_devices(sys_block)?;
    let mut blank = None;
    for (name, partition) in &devices {
        let path = dev.join(name);
        let head = match read_head(&path, BLANK_PROBE_BYTES) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(device = %path.display(), error = %e, "cannot read block device; skipped");
                continue;
            }
        };
        if ext4_label(&head).as_deref() == Some(PERSIST_LABEL) {
            return Ok(PersistDisk::Existing(path));
        }
        let whole_disk_unpartitioned =
            !partition && !devices.iter().any(|(n, p)| *p && n.starts_with(name));
        if blank.is_none() && whole_disk_unpartitioned && is_blank(&head) {
            blank = Some(path);
        }
    }
    blank
        .map(PersistDisk::Blank)
        .ok_or(SysrootError::NoPersistDisk {
            label: PERSIST_LABEL,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4_head(label: &str) -> Vec<u8> {
        let mut b = vec![0u8; BLANK_PROBE_BYTES];
        b[EXT_SUPERBLOCK_OFFSET + EXT_MAGIC_OFFSET..][..2]
            .copy_from_slice(&EXT_MAGIC.to_le_bytes());
        b[EXT_SUPERBLOCK_OFFSET + EXT_LABEL_OFFSET..][..label.len()]
            .copy_from_slice(label.as_bytes());
        b
    }

    #[test]
    fn ext4_labels() {
        assert_eq!(
            ext4_label(&ext4_head("pnpersist")).as_deref(),
            Some("pnpersist")
        );
        assert_eq!(ext4_label(&ext4_head("")).as_deref(), Some(""));
        // 16 bytes, no terminating NUL.
        assert_eq!(
            ext4_label(&ext4_head("0123456789abcdef")).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(ext4_label(&vec![0u8; 4096]), None, "no magic");
        assert_eq!(ext4_label(&ext4_head("x")[..1100]), None, "truncated");
        assert_eq!(ext4_label(&[]), None);
    }

    #[test]
    fn blank_means_all_zero() {
        assert!(is_blank(&[0u8; 4096]));
        let mut b = vec![0u8; 4096];
        b[510] = 0x55;
        assert!(!is_blank(&b), "an MBR signature is data");
        assert!(!is_blank(&[]), "an unreadable (empty) head is not blank");
    }

    fn layer(name: &str, priority: Option<i64>) -> Layer {
        Layer {
            name: name.into(),
            image: PathBuf::from(format!("/persist/cache/modules/{name}")),
            priority,
        }
    }

    #[test]
    fn layers_ordered_by_rank_stable_none_last() {
        let got = order_layers(vec![
            layer("c", Some(2)),
            layer("none1", None),
            layer("a", Some(0)),
            layer("b1", Some(1)),
            layer("none2", None),
            layer("b2", Some(1)),
        ]);
        let names: Vec<_> = got.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["a", "b1", "b2", "c", "none1", "none2"]);
    }

    #[test]
    fn plan_mounts_lowers_then_rw_then_overlay_then_persist_bind() {
        let p = plan(
            &[layer("app", Some(0)), layer("base", Some(1))],
            &Layout::default(),
        )
        .expect("plan");
        let args: Vec<Vec<String>> = p.steps.iter().map(MountStep::args).collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            args,
            vec![
                s(&[
                    "-t",
                    "erofs",
                    "-o",
                    "ro,loop",
                    "/persist/cache/modules/app",
                    "/run/powernode/sysroot/lower/0"
                ]),
                s(&[
                    "-t",
                    "erofs",
                    "-o",
                    "ro,loop",
                    "/persist/cache/modules/base",
                    "/run/powernode/sysroot/lower/1"
                ]),
                s(&[
                    "-t",
                    "tmpfs",
                    "-o",
                    "mode=0755",
                    "pn-sysroot-rw",
                    "/run/powernode/sysroot/rw"
                ]),
                s(&[
                    "-t",
                    "overlay",
                    "-o",
                    "lowerdir=/run/powernode/sysroot/lower/0:/run/powernode/sysroot/lower/1,\
                     upperdir=/run/powernode/sysroot/rw/upper,workdir=/run/powernode/sysroot/rw/work",
                    "pn-sysroot",
                    "/sysroot"
                ]),
                s(&["--bind", "/persist", "/sysroot/persist"]),
                s(&["--lazy", "/persist"]),
            ]
        );
        let programs: Vec<&str> = p.steps.iter().map(MountStep::program).collect();
        assert_eq!(
            programs,
            ["mount", "mount", "mount", "mount", "mount", "umount"]
        );
        assert_eq!(
            p.lowers,
            vec![
                (
                    "app".to_string(),
                    PathBuf::from("/run/powernode/sysroot/lower/0")
                ),
                (
                    "base".to_string(),
                    PathBuf::from("/run/powernode/sysroot/lower/1")
                ),
            ]
        );
        // upper and work on the same tmpfs, created after it is mounted.
        assert_eq!(
            p.steps[3].mkdirs,
            vec![
                PathBuf::from("/run/powernode/sysroot/rw/upper"),
                PathBuf::from("/run/powernode/sysroot/rw/work"),
                PathBuf::from("/sysroot"),
            ]
        );
    }

    #[test]
    fn plan_refuses_empty_and_unsafe_paths() {
        assert!(matches!(
            plan(&[], &Layout::default()),
            Err(SysrootError::NoLayers)
        ));
        let layout = Layout {
            layers: PathBuf::from("/run/a,b"),
            ..Layout::default()
        };
        let e = plan(&[layer("x", None)], &layout).expect_err("comma");
        assert_eq!(e.kind(), "unsafe_path");
        let layout = Layout {
            layers: PathBuf::from("/run/a:b"),
            ..Layout::default()
        };
        assert!(plan(&[layer("x", None)], &layout).is_err(), "colon");
        // Module names never reach the option string.
        let p = plan(&[layer("evil,upperdir=/", None)], &Layout::default()).expect("plan");
        assert!(!p.overlay_options.contains("evil"));
    }

    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        fail_at: Option<usize>,
    }

    impl Mounter for Recorder {
        fn mkdir_all(&mut self, dir: &Path) -> Result<(), SysrootError> {
            self.calls.push(format!("mkdir {}", dir.display()));
            Ok(())
        }
        fn mount(&mut self, step: &MountStep) -> Result<(), SysrootError> {
            let n = self.calls.iter().filter(|c| c.starts_with("mount")).count();
            if self.fail_at == Some(n) {
                return Err(SysrootError::Command {
                    command: "mount".into(),
                    detail: "boom".into(),
                });
            }
            self.calls.push(format!("mount {}", step.target.display()));
            Ok(())
        }
    }

    #[test]
    fn execute_stops_at_first_failure() {
        let p = plan(&[layer("a", Some(0))], &Layout::default()).expect("plan");
        let mut r = Recorder::default();
        execute(&p, &mut r).expect("ok");
        assert_eq!(
            r.calls,
            [
                "mkdir /run/powernode/sysroot/lower/0",
                "mount /run/powernode/sysroot/lower/0",
                "mkdir /run/powernode/sysroot/rw",
                "mount /run/powernode/sysroot/rw",
                "mkdir /run/powernode/sysroot/rw/upper",
                "mkdir /run/powernode/sysroot/rw/work",
                "mkdir /sysroot",
                "mount /sysroot",
                "mkdir /sysroot/persist",
                "mount /sysroot/persist",
                "mount /persist",
            ]
        );
        let mut r = Recorder {
            fail_at: Some(1),
            ..Recorder::default()
        };
        assert!(execute(&p, &mut r).is_err());
        assert!(
            !r.calls.iter().any(|c| c == "mount /sysroot"),
            "nothing after a failure: {:?}",
            r.calls
        );
    }

    #[test]
    fn cpu_time_counts_this_process() {
        let before = CpuTime::now().expect("getrusage");
        // Spin until the kernel has charged at least 30 ms more (bounded by wall time).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        let after = loop {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
            }
            let now = CpuTime::now().expect("getrusage");
            if now.own_ms() >= before.own_ms() + 30 || std::time::Instant::now() > deadline {
                break now;
            }
        };
        std::hint::black_box(x);
        assert!(
            after.own_ms() >= before.own_ms() + 30,
            "{before:?} → {after:?}"
        );
        assert!(after.user_ms >= before.user_ms, "{before:?} → {after:?}");
    }

    #[test]
    fn boot_record_round_trip_and_digests() {
        let t = tempfile::tempdir().expect("tmp");
        let paths = Paths::new(t.path());
        assert_eq!(BootRecord::load(&paths).expect("load"), None);
        let rec = BootRecord {
            sysroot: PathBuf::from("/sysroot"),
            layers: vec![
                BootLayer {
                    name: "base".into(),
                    lower: PathBuf::from("/run/powernode/sysroot/lower/0"),
                    id: Some("m1".into()),
                    image_digest: Some("sha256:aa".into()),
                    fsverity_digest: Some("sha256:bb".into()),
                    priority: Some(0),
                },
                BootLayer {
                    name: "nodigest".into(),
                    lower: PathBuf::from("/run/powernode/sysroot/lower/1"),
                    id: None,
                    image_digest: None,
                    fsverity_digest: None,
                    priority: None,
                },
            ],
            cpu: CpuTime::now(),
        };
        rec.write(&paths).expect("write");
        assert_eq!(BootRecord::load(&paths).expect("load"), Some(rec.clone()));
        assert_eq!(
            rec.module_digests(),
            BTreeMap::from([("base".to_string(), "sha256:aa".to_string())])
        );
    }

    #[test]
    fn mkfs_arguments() {
        assert_eq!(
            mkfs_args(Path::new("/dev/vda")).join(" "),
            "-q -F -b 4096 -O verity -L pnpersist /dev/vda"
        );
    }

    #[test]
    fn finds_labelled_partition_before_blank_disk() {
        let t = tempfile::tempdir().expect("tmp");
        let (dev, sys) = (t.path().join("dev"), t.path().join("sys"));
        std::fs::create_dir_all(&dev).expect("dev");
        let add = |name: &str, head: &[u8], partition: bool, ro: bool| {
            let d = sys.join(name);
            std::fs::create_dir_all(&d).expect("sys");
            std::fs::write(d.join("ro"), if ro { "1\n" } else { "0\n" }).expect("ro");
            std::fs::write(d.join("size"), "2048\n").expect("size");
            if partition {
                std::fs::write(d.join("partition"), "1\n").expect("partition");
            }
            std::fs::write(dev.join(name), head).expect("dev file");
        };
        // vda: blank; vdb: partitioned, vdb1 holds the label; vdc: read-only image; loop0: not a disk.
        add("vda", &[0u8; 8192], false, false);
        add("vdb", &[1u8; 8192], false, false);
        add("vdb1", &ext4_head(PERSIST_LABEL), true, false);
        add("vdc", &ext4_head(PERSIST_LABEL), false, true);
        add("loop0", &[0u8; 8192], false, false);
        assert_eq!(
            find_persist(&dev, &sys).expect("found"),
            PersistDisk::Existing(dev.join("vdb1"))
        );
        std::fs::write(dev.join("vdb1"), ext4_head("other")).expect("relabel");
        assert_eq!(
            find_persist(&dev, &sys).expect("found"),
            PersistDisk::Blank(dev.join("vda"))
        );
        std::fs::write(dev.join("vda"), [7u8; 100]).expect("data");
        assert_eq!(
            find_persist(&dev, &sys).expect_err("none").kind(),
            "no_persist_disk"
        );
    }
}
