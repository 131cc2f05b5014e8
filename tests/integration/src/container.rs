//! A systemd-nspawn container booting the cached Debian bookworm image with the suite
//! installed: real systemd PID 1, real system bus, the project's units and policy.
//!
//! The image is built by `tests/systemd/mkimage.sh` (`make image`) and never modified: each
//! boot mounts an overlayfs whose lower layers are the install tree (top) and the image, with
//! a tmpfs upper layer that disappears with the container.
//!
//! The host's PID 1 is not systemd and there is no host system bus, so nspawn runs with
//! `--register=no --keep-unit`, and commands go in through `nsenter` into the container's PID 1
//! (there is no machined for `machinectl shell`). Processes started that way are not under
//! nspawn's seccomp filter or capability bounding set: assert sandboxing through units
//! started inside (`systemd-run --wait --pipe -p …`), not through [`Container::exec`] itself.
//!
//! The container shares the host's network namespace, so services inside reach a test
//! server on the host's 127.0.0.1.

use crate::{describe, require_root, require_tool, run, units, workspace_root};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Written by mkimage.sh once the image is complete.
pub const IMAGE_STAMP: &str = ".powernode-image-stamp";
/// How long PID 1 may take to appear after nspawn starts.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Boot to `running`/`degraded` takes under a second idle; allow for a loaded CI machine and
/// for units that wait out a start timeout.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Poweroff takes 1.3–2 s idle; after this the container is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
const CONTAINER_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cached, pristine root tree a container boots from.
#[derive(Debug, Clone)]
pub struct Image {
    pub root: PathBuf,
}

impl Image {
    /// `<workspace>/build/images/bookworm`; an error with the build command if it is missing.
    pub fn bookworm() -> Result<Image> {
        Image::at(&workspace_root().join("build/images/bookworm"))
    }

    /// An image built by mkimage.sh at `root`.
    pub fn at(root: &Path) -> Result<Image> {
        if !root.join(IMAGE_STAMP).is_file() {
            bail!(
                "container image {} is missing or incomplete: run `make image` \
                 (or `bash tests/systemd/mkimage.sh {}`)",
                root.display(),
                root.display()
            );
        }
        Ok(Image {
            root: root.to_path_buf(),
        })
    }
}

/// A host path made visible inside the container.
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub container: String,
    pub read_only: bool,
}

/// What to put into a container before it boots.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// A root tree (e.g. from [`units::install_tree`]) layered over the image.
    pub overlay_tree: Option<PathBuf>,
    /// Extra bind mounts.
    pub binds: Vec<Bind>,
    /// Units to `systemctl enable` before boot (e.g. `powernode-agent.service`).
    pub enable: Vec<String>,
    /// Loop block devices to make usable inside (0 = none): the host's `/dev/loop-control`
    /// and `/dev/loop0` … `/dev/loop<N-1>` are bound in, nodes missing on the host are created
    /// first. mount(8) attaches a loop device for a filesystem image in a regular file (EROFS
    /// modules); the kernel hands out the lowest free index host-wide, so N must cover the
    /// loops other processes on the host hold at the same time.
    pub loop_devices: u32,
}

/// Major number of loop block devices (Documentation/admin-guide/devices.txt).
const LOOP_MAJOR: u32 = 7;

/// Makes sure `/dev/loop0` … `/dev/loop<n-1>` exist on the host (devtmpfs creates only the
/// first few at boot; the kernel allocates the device behind a node on first open).
fn ensure_loop_nodes(n: u32) -> Result<Vec<PathBuf>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = PathBuf::from(format!("/dev/loop{i}"));
        if !node.exists() {
            crate::run_ok(Command::new("mknod").args(["-m", "0660"]).arg(&node).args([
                "b",
                &LOOP_MAJOR.to_string(),
                &i.to_string(),
            ]))
            .with_context(|| format!("creating {}", node.display()))?;
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// A booted container; powered off (then killed if it hangs) and unmounted on drop.
#[derive(Debug)]
pub struct Container {
    name: String,
    nspawn: Child,
    leader: u32,
    dir: tempfile::TempDir,
    merged: PathBuf,
    started: Instant,
    stopped: bool,
    _cgroups: ContainerCgroups,
    _install_tree: Option<tempfile::TempDir>,
}

impl Container {
    /// Installs the suite (units/ plus the built binaries) into a fresh tree and boots with it.
    pub fn boot_installed(image: &Image, enable: &[&str]) -> Result<Container> {
        let tree = tempfile::Builder::new().prefix("pn-install-").tempdir()?;
        units::install_tree(tree.path())?;
        let opts = BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            enable: enable.iter().map(|s| s.to_string()).collect(),
            ..BootOptions::default()
        };
        let mut container = Container::boot(image, &opts)?;
        container._install_tree = Some(tree);
        Ok(container)
    }

    /// Mounts the overlay, prepares users and enabled units, starts `systemd-nspawn --boot`
    /// and returns once the container's PID 1 runs (see [`Container::wait_running`]).
    pub fn boot(image: &Image, opts: &BootOptions) -> Result<Container> {
        require_root()?;
        for tool in ["systemd-nspawn", "nsenter", "mount", "umount"] {
            require_tool(tool)?;
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pn{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new().prefix("pn-nspawn-").tempdir()?;
        let rw = dir.path().join("rw");
        let merged = dir.path().join("root");
        fs::create_dir_all(&rw)?;
        fs::create_dir_all(&merged)?;

        // Upper layer on tmpfs: the image stays pristine and nothing outlives the container.
        mount(&["-t", "tmpfs", "-o", "mode=0755", "pn-upper"], &rw)?;
        let mut container_dir = MountGuard {
            dir: dir.path().to_path_buf(),
            merged: None,
        };
        fs::create_dir_all(rw.join("upper"))?;
        fs::create_dir_all(rw.join("work"))?;
        let mut lower = image.root.display().to_string();
        if let Some(tree) = &opts.overlay_tree {
            lower = format!("{}:{lower}", tree.display());
        }
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            rw.join("upper").display(),
            rw.join("work").display()
        );
        mount(&["-t", "overlay", "-o", &data, "pn-root"], &merged)?;
        container_dir.merged = Some(merged.clone());

        // The powernode user must exist before tmpfiles runs at boot; sysusers' own unit is
        // conditional on /etc needing an update, so do it here, like a package postinst.
        crate::run_ok(
            Command::new("systemd-sysusers").arg(format!("--root={}", merged.display())),
        )?;
        if !opts.enable.is_empty() {
            crate::run_ok(
                Command::new("systemctl")
                    .arg(format!("--root={}", merged.display()))
                    .arg("enable")
                    .args(&opts.enable),
            )?;
        }

        let log = fs::File::create(dir.path().join("boot.log"))?;
        let cgroups = ContainerCgroups::create(&name)?;
        // sh joins the container's own cgroups, then becomes nspawn (same PID).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", JOIN_CGROUPS_AND_EXEC, "sh"])
            .arg(cgroups.procs_files())
            .arg("systemd-nspawn");
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .arg("--quiet")
            .arg(format!("--directory={}", merged.display()))
            .arg(format!("--machine={name}"))
            .args(["--boot", "--register=no", "--keep-unit", "--console=pipe"])
            .args(["--link-journal=no", "--system-call-filter=bpf"])
            .arg("--capability=CAP_BPF,CAP_PERFMON");
        if opts.loop_devices > 0 {
            require_tool("mknod")?;
            cmd.arg("--bind=/dev/loop-control");
            for node in ensure_loop_nodes(opts.loop_devices)? {
                cmd.arg(format!("--bind={}", node.display()));
            }
        }
        for bind in &opts.binds {
            let flag = if bind.read_only {
                "--bind-ro"
            } else {
                "--bind"
            };
            cmd.arg(format!("{flag}={}:{}", bind.host.display(), bind.container));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning systemd-nspawn")?;
        // From here on Container's Drop does the cleanup.
        std::mem::forget(container_dir);
        let mut container = Container {
            name,
            nspawn,
            leader: 0,
            dir,
            merged,
            started: Instant::now(),
            stopped: false,
            _install_tree: None,
            _cgroups: cgroups,
        };
        container.leader = container.find_leader()?;
        Ok(container)
    }

    /// The container's PID 1 as seen from the host.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Machine name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's root as mounted on the host (the overlay), for inspecting files.
    pub fn root(&self) -> &Path {
        &self.merged
    }

    /// Everything nspawn and the container's console printed so far.
    pub fn boot_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("boot.log"))
            .unwrap_or_else(|e| format!("(boot log unreadable: {e})"))
    }

    fn find_leader(&mut self) -> Result<u32> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let nspawn = self.nspawn.id();
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                self.stopped = true;
                bail!(
                    "systemd-nspawn exited ({status}) before booting:\n{}",
                    self.boot_log()
                );
            }
            // nspawn's child is the container's PID 1 once it has exec'd systemd.
            let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return Ok(pid);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no systemd PID 1 under nspawn {nspawn} after {LEADER_TIMEOUT:?}:\n{}",
                    self.boot_log()
                );
            }
            sleep(POLL);
        }
    }

    /// Runs `argv` inside the container (all of PID 1's namespaces, a clean environment).
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.leader))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--",
            ])
            .args([
                "env",
                "-i",
                CONTAINER_PATH,
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=cat",
            ])
            .args(argv)
            .stdin(Stdio::null());
        run(&mut cmd)
    }

    /// Like [`Container::exec`] but fails, with its output, unless `argv` exits 0; returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "in container {}: {argv:?} failed ({}):\n{}",
                self.name,
                out.status,
                describe(&out)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until boot has finished and returns `systemctl is-system-running`'s verdict
    /// (`running`, `degraded`, …). Fails after [`BOOT_TIMEOUT`].
    pub fn wait_running(&self) -> Result<String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let secs = BOOT_TIMEOUT.as_secs().to_string();
        loop {
            // Before PID 1 opens its private socket systemctl fails to connect: it prints
            // nothing, or `offline`. Retry until PID 1 itself answers with a state.
            let out = self.exec(&["timeout", &secs, "systemctl", "is-system-running", "--wait"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !matches!(state.as_str(), "" | "offline" | "initializing" | "starting") {
                return Ok(state);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {} did not finish booting in {BOOT_TIMEOUT:?} (state {state:?}):\n{}\n{}",
                    self.name,
                    describe(&out),
                    self.boot_log()
                );
            }
            sleep(POLL);
        }
    }

    /// Time since nspawn was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// `systemctl --failed` output, for diagnostics.
    pub fn failed_units(&self) -> Result<String> {
        self.exec_ok(&[
            "systemctl",
            "--failed",
            "--no-legend",
            "--plain",
            "--no-pager",
        ])
    }

    /// The journal of one unit (`journalctl -u`).
    pub fn journal(&self, unit: &str) -> Result<String> {
        self.exec_ok(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ])
    }

    /// Powers the container off cleanly and returns how long that took.
    pub fn poweroff(mut self) -> Result<Duration> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<Duration> {
        let start = Instant::now();
        if self.stopped {
            return Ok(Duration::ZERO);
        }
        let asked = if self.leader > 1 {
            self.exec(&["systemctl", "poweroff", "--no-block"])
                .map(|o| o.status)
        } else {
            Err(anyhow::anyhow!("PID 1 never appeared"))
        };
        let deadline = Instant::now() + POWEROFF_TIMEOUT;
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                self.stopped = true;
                if !status.success() {
                    bail!(
                        "systemd-nspawn exited with {status} on poweroff:\n{}",
                        self.boot_log()
                    );
                }
                return Ok(start.elapsed());
            }
            if Instant::now() > deadline {
                break;
            }
            sleep(POLL);
        }
        // Killing PID 1 tears down the whole PID namespace; nspawn then exits. Without a
        // known PID 1, kill nspawn itself (never `kill 0`: that is our own process group).
        let kill = if self.leader > 1 {
            Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status()
                .map(drop)
        } else {
            self.nspawn.kill()
        };
        let reaped = self.nspawn.wait();
        self.stopped = true;
        bail!(
            "container {} did not power off in {POWEROFF_TIMEOUT:?} (poweroff request: {:?}; \
             kill: {kill:?}; nspawn: {reaped:?}):\n{}",
            self.name,
            asked,
            self.boot_log()
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("Container {}: {e:#}", self.name);
        }
        let guard = MountGuard {
            dir: self.dir.path().to_path_buf(),
            merged: Some(self.merged.clone()),
        };
        drop(guard);
    }
}

/// `$1` is a space-separated list of cgroup.procs files; the rest is the command to exec.
const JOIN_CGROUPS_AND_EXEC: &str =
    "for f in $1; do echo $$ > \"$f\" || exit 1; done; shift; exec \"$@\"";

/// One cgroup per container in each hierarchy the host mounts for systemd (cgroup2 and the
/// hybrid layout's name=systemd). `nspawn --keep-unit` puts the container's `payload` and
/// `supervisor` cgroups under the cgroup it runs in; this host's PID 1 is not systemd and
/// every process sits in the root cgroup, so without this all containers on the machine —
/// other test runs included — would share `/payload`, and one container's systemd pruning its
/// cgroups removes another's (seen as `status=219/CGROUP` on a mount unit's stop).
#[derive(Debug)]
struct ContainerCgroups {
    dirs: Vec<PathBuf>,
}

impl ContainerCgroups {
    fn create(name: &str) -> Result<ContainerCgroups> {
        let mut dirs = Vec::new();
        for root in [
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup",
        ] {
            let root = Path::new(root);
            if !root.join("cgroup.procs").is_file() {
                continue;
            }
            let dir = root.join(format!("powernode-test-{name}"));
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
            dirs.push(dir);
            if root == Path::new("/sys/fs/cgroup") {
                break;
            }
            if dirs.len() == 2 {
                break;
            }
        }
        if dirs.is_empty() {
            bail!("no cgroup hierarchy found under /sys/fs/cgroup");
        }
        Ok(ContainerCgroups { dirs })
    }

    fn procs_files(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.join("cgroup.procs").display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for ContainerCgroups {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = remove_cgroup_tree(dir) {
                eprintln!("removing cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// Removes a cgroup and its children, leaves first (a cgroup directory only goes with rmdir,
/// once it has no children and no processes).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// Unmounts the overlay and its tmpfs upper layer (in that order) when dropped.
struct MountGuard {
    dir: PathBuf,
    merged: Option<PathBuf>,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let targets = self.merged.iter().cloned().chain([self.dir.join("rw")]);
        for target in targets {
            let out = Command::new("umount").arg(&target).output();
            match out {
                Ok(o) if o.status.success() => {}
                other => {
                    // Busy (a straggler still inside): detach lazily so the temp dir can go.
                    eprintln!("umount {}: {other:?}; retrying lazily", target.display());
                    if let Err(e) = Command::new("umount").arg("-l").arg(&target).status() {
                        eprintln!("umount -l {}: {e}", target.display());
                    }
                }
            }
        }
    }
}

fn mount(args: &[&str], target: &Path) -> Result<()> {
    crate::run_ok(Command::new("mount").args(args).arg(target)).map(drop)
}
