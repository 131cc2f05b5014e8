//! `powernode-agent boot`: the initramfs boot path (issue #7), run once by
//! `powernode-boot.service` inside the dracut initramfs (initramfs/modules.d/90powernode).
//!
//! Stages, each announced as `[boot:<stage>] …` on stdout (the unit sends it to the console)
//! and in the kernel log (/dev/kmsg):
//! `persist` (find the ext4 labelled `pnpersist`, or format a blank disk, mount at /persist) →
//! `identity` (skipped when PKI is on /persist) → `enroll` (skipped when that PKI is valid) →
//! `fetch` + `verify` (every assigned module through `libpowernode::modules`, fail closed:
//! `fetch_and_verify` ends with `modules::verify_stored`, the check mountd runs before its
//! mounts too, and a stored image that fails it is fetched again, never mounted) →
//! `mount` (EROFS lowers + tmpfs upper → overlay at /sysroot, /persist moved into it,
//! `libpowernode::sysroot`) → `switch-root` (nothing to do: systemd's initrd-switch-root.target
//! switches once this unit has finished with /sysroot mounted).
//!
//! Any failure ends the command non-zero with `[boot:<stage>] FAILED: <reason>`; the unit's
//! `OnFailure=emergency.target` then stops the boot. Exit 2 = a module was refused.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::Args;
use powernode::config::Config;
use powernode::enroll::{EnrollParams, Outcome};
use powernode::modules::{self, Fetched, ModuleError};
use powernode::paths::Paths;
use powernode::pki::{CertInfo, PkiStore};
use powernode::sysroot::{self, BootLayer, BootRecord, Layer, Layout, PersistDisk, SystemMounter};
use powernode::transport::InstanceClient;
use serde_json::{Map, Value};

use crate::output::{EXIT_GENERIC, Report};
use crate::verify_cmd::EXIT_VERIFY;

/// How long to wait for the persistent disk to show up (udev coldplug loads virtio_blk).
const PERSIST_WAIT: Duration = Duration::from_secs(30);

/// Default wait for a first module assignment after enrollment, and the polling interval.
const MODULE_WAIT: Duration = Duration::from_secs(300);
const MODULE_POLL: Duration = Duration::from_secs(2);

/// Kernel log lines are capped at about 1 KiB; longer ones are cut, the console keeps it all.
const KMSG_MAX: usize = 900;

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Use this block device for /persist instead of searching (label `pnpersist`, else the
    /// first blank disk). Also `powernode.persist=<dev>` on the kernel command line.
    #[arg(long)]
    pub persist_device: Option<PathBuf>,
}

/// The console and kernel-log writer for `[boot:<stage>]` lines.
struct Console {
    kmsg: Option<File>,
}

impl Console {
    fn open(paths: &Paths) -> Console {
        let p = paths.under("/dev/kmsg");
        let kmsg = match std::fs::OpenOptions::new().write(true).open(&p) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "no kernel log: boot stages go to stdout only");
                None
            }
        };
        Console { kmsg }
    }

    fn say(&mut self, stage: &str, msg: impl std::fmt::Display) {
        let line = format!("[boot:{stage}] {msg}");
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "writing a boot line to stdout");
        }
        if let Some(k) = self.kmsg.as_mut() {
            let mut short = line;
            if short.len() > KMSG_MAX {
                let mut cut = KMSG_MAX;
                while !short.is_char_boundary(cut) {
                    cut -= 1;
                }
                short.truncate(cut);
                short.push('…');
            }
            // <6> = info: kept out of a `quiet` console, which already has the stdout copy.
            if let Err(e) = writeln!(k, "<6>powernode-agent: {short}") {
                tracing::warn!(error = %e, "writing to /dev/kmsg failed; stdout only from now on");
                self.kmsg = None;
            }
        }
    }
}

/// A failed stage: where, which exit code, why.
struct Failure {
    stage: &'static str,
    exit: u8,
    error: anyhow::Error,
}

fn at(stage: &'static str) -> impl Fn(anyhow::Error) -> Failure {
    move |error| Failure {
        stage,
        exit: EXIT_GENERIC,
        error,
    }
}

pub fn run(args: BootArgs, paths: &Paths) -> Report {
    let mut console = Console::open(paths);
    console.say(
        "start",
        format!(
            "powernode-agent {} boot ({})",
            powernode::AGENT_VERSION,
            powernode::architecture()
        ),
    );
    let started = Instant::now();
    match run_stages(&args, paths, &mut console) {
        Ok(details) => {
            let cpu = sysroot::CpuTime::now().map_or_else(String::new, |c| {
                format!(
                    ", CPU {} ms (user {}, system {}; children {})",
                    c.own_ms(),
                    c.user_ms,
                    c.system_ms,
                    c.children_ms
                )
            });
            console.say(
                "done",
                format!(
                    "boot path finished in {:.1}s{cpu}",
                    started.elapsed().as_secs_f64()
                ),
            );
            Report::ok("boot", details)
        }
        Err(f) => {
            let reason = format!("{:#}", f.error);
            console.say(f.stage, format!("FAILED: {reason}"));
            console.say(
                "failed",
                format!(
                    "stopping the boot at stage {}: no switch-root (emergency.target)",
                    f.stage
                ),
            );
            Report::failed("boot", f.exit, format!("stage {}: {reason}", f.stage))
        }
    }
}

fn run_stages(
    args: &BootArgs,
    paths: &Paths,
    console: &mut Console,
) -> Result<Map<String, Value>, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating the async runtime")
        .map_err(at("start"))?;
    let persist = mount_persist(args, paths, console).map_err(at("persist"))?;
    let cfg = Config::load(paths)
        .map_err(anyhow::Error::from)
        .map_err(at("identity"))?;
    let store = PkiStore::new(paths.pki_dir());
    let instance = rt.block_on(identity_and_enroll(&cfg, paths, &store, console))?;

    let fetched = rt.block_on(fetch_modules(&cfg, paths, &store, console))?;

    let layers = sysroot::order_layers(
        fetched
            .iter()
            .map(|(f, priority)| Layer {
                name: f.name.clone(),
                image: f.path.clone(),
                priority: *priority,
            })
            .collect(),
    );
    let layout = Layout {
        persist: Some(persist),
        ..Layout::default()
    };
    mount_sysroot(paths, &layers, &layout, &fetched, console).map_err(at("mount"))?;
    console.say(
        "switch-root",
        format!(
            "{} is ready ({} layer(s)); initrd-switch-root.target switches to it",
            layout.sysroot.display(),
            layers.len()
        ),
    );
    let mut d = Map::new();
    d.insert("instance_id".into(), instance.into());
    d.insert(
        "modules".into(),
        Value::Array(layers.iter().map(|l| l.name.clone().into()).collect()),
    );
    d.insert(
        "sysroot".into(),
        layout.sysroot.display().to_string().into(),
    );
    Ok(d)
}

/// The value of `key=` on the kernel command line, if given and not empty.
fn cmdline_value(paths: &Paths, key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string(paths.proc_cmdline()).ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Kernel command line `powernode.persist=<dev>`, if given.
fn cmdline_persist(paths: &Paths) -> Option<PathBuf> {
    cmdline_value(paths, "powernode.persist").map(PathBuf::from)
}

/// How long to wait for a first module assignment: `powernode.module_wait=<seconds>`.
fn module_wait(paths: &Paths) -> Duration {
    cmdline_value(paths, "powernode.module_wait")
        .and_then(|v| v.parse().ok())
        .map_or(MODULE_WAIT, Duration::from_secs)
}

/// Mount points from /proc/self/mountinfo (field 5).
fn is_mount_point(paths: &Paths, dir: &Path) -> anyhow::Result<bool> {
    let p = paths.under("/proc/self/mountinfo");
    let info = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == dir))
}

fn mount_persist(args: &BootArgs, paths: &Paths, console: &mut Console) -> anyhow::Result<PathBuf> {
    let target = paths.under(sysroot::PERSIST_DIR);
    if is_mount_point(paths, &target)? {
        console.say(
            "persist",
            format!("{} is already mounted", target.display()),
        );
        return Ok(target);
    }
    let chosen = args
        .persist_device
        .clone()
        .or_else(|| cmdline_persist(paths));
    let deadline = Instant::now() + PERSIST_WAIT;
    let disk = loop {
        let found = match &chosen {
            Some(dev) => explicit_disk(dev),
            None => sysroot::find_persist(&paths.under("/dev"), &paths.under("/sys/class/block"))
                .map_err(anyhow::Error::from),
        };
        match found {
            Ok(d) => break d,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "persistent disk not there yet");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e.context(format!("after waiting {PERSIST_WAIT:?}"))),
        }
    };
    let device = match disk {
        PersistDisk::Existing(d) => {
            console.say(
                "persist",
                format!(
                    "found ext4 labelled {} on {}",
                    sysroot::PERSIST_LABEL,
                    d.display()
                ),
            );
            d
        }
        PersistDisk::Blank(d) => {
            console.say(
                "persist",
                format!(
                    "{} is blank: creating ext4 (4 KiB blocks, verity) labelled {}",
                    d.display(),
                    sysroot::PERSIST_LABEL
                ),
            );
            sysroot::run("mkfs.ext4", &sysroot::mkfs_args(&d))?;
            d
        }
    };
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    sysroot::run(
        "mount",
        &[
            "-t".into(),
            "ext4".into(),
            device.display().to_string(),
            target.display().to_string(),
        ],
    )?;
    console.say(
        "persist",
        format!("mounted {} at {}", device.display(), target.display()),
    );
    state_layout(paths)?;
    Ok(target)
}

/// The state directory's parents with the modes tmpfiles.d gives them on an installed system
/// (units/usr/lib/tmpfiles.d): the PKI code creates missing parents 0700, which would lock the
/// daemons (user `powernode`) out after the switch.
fn state_layout(paths: &Paths) -> anyhow::Result<()> {
    for (dir, mode) in [
        ("/persist/var", 0o755),
        ("/persist/var/lib", 0o755),
        ("/persist/var/lib/powernode", 0o750),
    ] {
        let p = paths.under(dir);
        powernode::fsutil::ensure_dir(&p, mode)?;
        // An existing directory keeps its mode under ensure_dir: set it, as tmpfiles `d` does.
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", p.display()))?;
    }
    Ok(())
}

/// An operator-named device: used when it carries our label, formatted only when blank.
fn explicit_disk(dev: &Path) -> anyhow::Result<PersistDisk> {
    use std::io::Read as _;
    let mut head = Vec::new();
    File::open(dev)
        .with_context(|| format!("opening {}", dev.display()))?
        .take(sysroot::BLANK_PROBE_BYTES as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", dev.display()))?;
    if sysroot::ext4_label(&head).as_deref() == Some(sysroot::PERSIST_LABEL) {
        Ok(PersistDisk::Existing(dev.to_path_buf()))
    } else if sysroot::is_blank(&head) {
        Ok(PersistDisk::Blank(dev.to_path_buf()))
    } else {
        Err(anyhow!(
            "{} holds data but no ext4 labelled {}: refusing to format it",
            dev.display(),
            sysroot::PERSIST_LABEL
        ))
    }
}

/// The clock as the CLI judges it: trusted only with evidence on disk.
fn trusted_now(paths: &Paths) -> anyhow::Result<Option<time::OffsetDateTime>> {
    let now = time::OffsetDateTime::now_utc();
    let trust = powernode::clock::judge(now, false, powernode::clock::load(paths)?);
    Ok(trust.is_trusted().then_some(now))
}

fn read_dmi_uuid(paths: &Paths) -> Option<String> {
    let b = powernode::fsutil::read_optional(&paths.dmi_product_uuid(), 128).ok()??;
    let s = String::from_utf8(b).ok()?.trim().to_lowercase();
    (!s.is_empty()).then_some(s)
}

/// Identity and enrollment. Valid PKI on /persist decides both: no discovery, no request.
async fn identity_and_enroll(
    cfg: &Config,
    paths: &Paths,
    store: &PkiStore,
    console: &mut Console,
) -> Result<String, Failure> {
    let now = trusted_now(paths).map_err(at("enroll"))?;
    let creds = store
        .load()
        .map_err(anyhow::Error::from)
        .map_err(at("identity"))?;
    if let Some(c) = &creds {
        let info = CertInfo::from_pem(&c.cert_pem)
            .map_err(anyhow::Error::from)
            .map_err(at("enroll"))?;
        let expired = now.is_some_and(|n| info.not_after <= n);
        if !expired {
            console.say(
                "identity",
                format!(
                    "instance {} from the PKI on /persist (discovery not re-run)",
                    c.meta.instance_id
                ),
            );
            console.say(
                "enroll",
                format!(
                    "already enrolled (certificate {} valid until {}): skipped, no token used",
                    info.serial,
                    powernode::pki::rfc3339(info.not_after)
                ),
            );
            return Ok(c.meta.instance_id.clone());
        }
        console.say(
            "enroll",
            "the certificate on /persist has expired: enrolling again with the bootstrap token",
        );
    }
    let ctx = powernode::identity::Ctx::from_paths(paths)
        .map_err(anyhow::Error::from)
        .map_err(at("identity"))?;
    let resolution = powernode::identity::discover(&ctx).await;
    let id = resolution
        .into_result()
        .map_err(anyhow::Error::from)
        .map_err(at("identity"))?;
    console.say(
        "identity",
        format!(
            "instance {} from {} ({})",
            id.instance_uuid,
            id.source.as_str(),
            id.evidence
        ),
    );
    let missing = |what: &str| Failure {
        stage: "enroll",
        exit: EXIT_GENERIC,
        error: anyhow!(
            "the identity ({}) carries no {what}: cannot enroll",
            id.source.as_str()
        ),
    };
    let params = EnrollParams {
        bootstrap_token: id
            .bootstrap_token
            .clone()
            .ok_or_else(|| missing("bootstrap token"))?,
        platform_url: id
            .platform_url
            .clone()
            .ok_or_else(|| missing("platform URL"))?,
        ca_bundle_pem: id.ca_pem.clone().ok_or_else(|| missing("CA bundle"))?,
        subject: id.instance_uuid.clone(),
        dmi_uuid: read_dmi_uuid(paths),
        trusted_now: now,
    };
    console.say("enroll", format!("enrolling with {}", params.platform_url));
    let outcome = powernode::enroll::enroll(&cfg.platform, store, &params)
        .await
        .map_err(|e| Failure {
            stage: "enroll",
            exit: e.kind().exit_code() as u8,
            error: e.into(),
        })?;
    let (what, meta) = match &outcome {
        Outcome::Enrolled(m) => ("enrolled", m),
        Outcome::ReEnrolled(m) => ("re-enrolled", m),
        Outcome::AlreadyEnrolled(m) => ("already enrolled", m),
    };
    console.say(
        "enroll",
        format!(
            "{what} as {} (PKI in {})",
            meta.instance_id,
            store.dir().display()
        ),
    );
    Ok(meta.instance_id.clone())
}

/// Every assigned module, fetched and verified; the first refusal stops the boot.
async fn fetch_modules(
    cfg: &Config,
    paths: &Paths,
    store: &PkiStore,
    console: &mut Console,
) -> Result<Vec<(Fetched, Option<i64>)>, Failure> {
    let mut client = InstanceClient::new(cfg.platform.clone(), store.clone());
    // A node that has just enrolled usually has no assignment yet: the operator (or the
    // platform's automation) assigns once it shows up. Wait for one, within a deadline.
    let wait = module_wait(paths);
    let deadline = Instant::now() + wait;
    let mut announced = false;
    let assigned = loop {
        let assigned = modules::assigned(&mut client).await.map_err(|e| Failure {
            stage: "fetch",
            exit: e.kind().exit_code() as u8,
            error: anyhow::Error::from(e).context("listing assigned modules"),
        })?;
        if !assigned.is_empty() {
            break assigned;
        }
        if Instant::now() >= deadline {
            return Err(Failure {
                stage: "fetch",
                exit: EXIT_GENERIC,
                error: anyhow!(
                    "no modules are assigned to this node after waiting {}s: there is nothing to boot",
                    wait.as_secs()
                ),
            });
        }
        if !announced {
            console.say(
                "fetch",
                format!(
                    "no modules assigned yet; asking again every {}s for up to {}s",
                    MODULE_POLL.as_secs(),
                    wait.as_secs()
                ),
            );
            announced = true;
        }
        tokio::time::sleep(MODULE_POLL).await;
    };
    console.say(
        "fetch",
        format!(
            "{} module(s) assigned: {}",
            assigned.len(),
            assigned
                .iter()
                .map(|m| match m.priority {
                    Some(p) => format!("{} (priority {p})", m.name),
                    None => m.name.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let mut out = Vec::new();
    for m in &assigned {
        match modules::fetch_and_verify(&mut client, paths, m).await {
            Ok(f) => {
                console.say(
                    "fetch",
                    format!(
                        "module {}: {} ({} bytes) in {}",
                        f.name,
                        f.image_digest,
                        f.size_bytes,
                        f.path.display()
                    ),
                );
                console.say(
                    "verify",
                    format!(
                        "module {}: signature by {} OK, sha256 and fs-verity {} match, kernel fs-verity {}",
                        f.name, f.signer, f.fsverity_digest, f.kernel_verity
                    ),
                );
                out.push((f, m.priority));
            }
            Err(e) => {
                let (stage, exit) = match &e {
                    ModuleError::Verification { .. } => ("verify", EXIT_VERIFY),
                    ModuleError::Platform(pe) => ("fetch", pe.kind().exit_code() as u8),
                    ModuleError::Other { .. } => ("fetch", EXIT_GENERIC),
                };
                let error = if e.is_verification() {
                    anyhow!("module {} REFUSED: {e}", m.name)
                } else {
                    anyhow!("module {}: {e}", m.name)
                };
                return Err(Failure { stage, exit, error });
            }
        }
    }
    // Everything assigned is here and verified: images no longer assigned can go.
    let keep = out.iter().map(|(f, _)| f.image_digest.clone()).collect();
    match modules::prune_store(paths, &keep) {
        Ok(p) if !p.images.is_empty() => console.say(
            "fetch",
            format!(
                "removed {} image(s) no longer assigned ({} bytes)",
                p.images.len(),
                p.bytes
            ),
        ),
        Ok(_) => {}
        Err(e) => console.say("fetch", format!("could not prune the module store: {e}")),
    }
    Ok(out)
}

fn mount_sysroot(
    paths: &Paths,
    layers: &[Layer],
    layout: &Layout,
    fetched: &[(Fetched, Option<i64>)],
    console: &mut Console,
) -> anyhow::Result<()> {
    let plan = sysroot::plan(layers, layout)?;
    for (i, (name, dir)) in plan.lowers.iter().enumerate() {
        console.say(
            "mount",
            format!(
                "lower {i}: module {name} (EROFS, read-only loop) at {}",
                dir.display()
            ),
        );
    }
    sysroot::execute(&plan, &mut SystemMounter)?;
    console.say(
        "mount",
        format!(
            "overlay at {} ({}; upper on tmpfs)",
            layout.sysroot.display(),
            plan.overlay_options
        ),
    );
    if let Some(p) = &layout.persist {
        console.say(
            "mount",
            format!(
                "{} bound to {} (and detached here)",
                p.display(),
                layout.sysroot.join("persist").display()
            ),
        );
    }
    // systemd refuses to switch into a tree that is not an OS: say so here, not in the journal.
    let os_release = ["usr/lib/os-release", "etc/os-release"]
        .iter()
        .map(|p| layout.sysroot.join(p))
        .find(|p| p.exists());
    let Some(os_release) = os_release else {
        anyhow::bail!(
            "the merged root {} has no os-release: systemd would refuse to switch into it",
            layout.sysroot.display()
        );
    };
    console.say(
        "mount",
        format!("root identifies itself in {}", os_release.display()),
    );
    let record = BootRecord {
        sysroot: layout.sysroot.clone(),
        layers: plan
            .lowers
            .iter()
            .map(|(name, dir)| {
                let f = fetched.iter().find(|(f, _)| &f.name == name);
                BootLayer {
                    name: name.clone(),
                    lower: dir.clone(),
                    id: f.map(|(f, _)| f.id.clone()),
                    image_digest: f.map(|(f, _)| f.image_digest.clone()),
                    fsverity_digest: f.map(|(f, _)| f.fsverity_digest.clone()),
                    priority: f.and_then(|(_, p)| *p),
                }
            })
            .collect(),
        cpu: sysroot::CpuTime::now(),
    };
    record.write(paths)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop (the agent crate has no tempfile dependency).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "pn-boot-test-{tag}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&p).expect("scratch");
            Scratch(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("removing {}: {e}", self.0.display());
            }
        }
    }

    #[test]
    fn persist_device_from_cmdline() {
        let t = Scratch::new("cmdline");
        let paths = Paths::new(t.path());
        std::fs::create_dir_all(t.path().join("proc")).expect("proc");
        std::fs::write(
            t.path().join("proc/cmdline"),
            "console=ttyS0 powernode.persist=/dev/vdb quiet\n",
        )
        .expect("cmdline");
        assert_eq!(cmdline_persist(&paths), Some(PathBuf::from("/dev/vdb")));
        std::fs::write(
            t.path().join("proc/cmdline"),
            "powernode.persist= powernode.persistx=/dev/x powernode.module_wait=7\n",
        )
        .expect("cmdline");
        assert_eq!(cmdline_persist(&paths), None);
        assert_eq!(module_wait(&paths), Duration::from_secs(7));
        std::fs::write(t.path().join("proc/cmdline"), "powernode.module_wait=x\n")
            .expect("cmdline");
        assert_eq!(module_wait(&paths), MODULE_WAIT);
    }

    #[test]
    fn state_layout_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = Scratch::new("layout");
        let paths = Paths::new(t.path());
        std::fs::create_dir_all(t.path().join("persist/var")).expect("var");
        std::fs::set_permissions(
            t.path().join("persist/var"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        state_layout(&paths).expect("layout");
        for (d, want) in [
            ("persist/var", 0o755),
            ("persist/var/lib", 0o755),
            ("persist/var/lib/powernode", 0o750),
        ] {
            let mode = std::fs::metadata(t.path().join(d))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, want, "{d}");
        }
    }

    #[test]
    fn explicit_device_is_never_formatted_when_it_holds_data() {
        let t = Scratch::new("disk");
        let dev = t.path().join("disk");
        std::fs::write(&dev, [0u8; 8192]).expect("blank");
        assert!(matches!(explicit_disk(&dev), Ok(PersistDisk::Blank(_))));
        std::fs::write(&dev, [9u8; 8192]).expect("data");
        assert!(explicit_disk(&dev).is_err());
    }
}
