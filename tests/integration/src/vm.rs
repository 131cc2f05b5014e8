//! The TCG VM tier's shared pieces: Debian's kernel (`make vm-assets`), the dracut initramfs
//! built from `initramfs/`, and [`Vm`]: a development platform and a docker-registry on host
//! loopback, and QEMU booting the initramfs with fw-cfg identity, a /persist disk and a
//! `restrict=on` network whose only routes are guestfwd rules to those two. Used by
//! `tests/vm_boot.rs`, `make demo` and `make bench`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::devplatform::{DevPlatform, Token};
use crate::registry::Registry;
use crate::{bin, describe, require_tool, run, run_ok, workspace_root};

/// The host as the guest sees it (guestfwd targets; the platform certificate carries it).
pub const HOST_IN_GUEST: &str = "10.0.2.100";
/// Per boot: a TCG boot of the initramfs with enrollment and two pulls takes ~30-60 s.
pub const BOOT_TIMEOUT_SECS: u64 = 200;
/// Set to `1` to keep a [`Vm`]'s work directory (consoles, /persist disk, initrd).
pub const KEEP_ENV: &str = "POWERNODE_KEEP_VM";
/// What the guest prints when it has enrolled and no module is assigned yet.
pub const WAITING_FOR_ASSIGNMENT: &str = "[boot:fetch] no modules assigned yet";

/// (the unpacked kernel package root, its vmlinuz) under build/vm/kernel.
pub fn kernel() -> Result<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("build/vm/kernel");
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{} missing: run `make vm-assets`", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz-* in build/vm/kernel/boot: run `make vm-assets`")?;
    Ok((dir, vmlinuz))
}

pub fn port_of(addr: &str) -> Result<u16> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {addr}"))
}

/// The dracut image for this agent binary and module source, built once and kept under
/// build/vm/ (dracut takes a minute or more on two busy cores).
pub fn base_initramfs(kroot: &Path) -> Result<PathBuf> {
    let agent = bin("powernode-agent")?;
    let root = workspace_root();
    let module_dir = root.join("initramfs/modules.d/90powernode");
    let mut inputs = vec![
        agent.clone(),
        root.join("initramfs/build.sh"),
        kroot.join(".stamp"),
    ];
    let mut files: Vec<PathBuf> = fs::read_dir(&module_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    inputs.extend(files);
    // The key: the digest of every input's digest (paths left out, so a moved tree reuses it).
    let sums = run_ok(Command::new("sha256sum").args(&inputs))?;
    let digests: String = sums
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect::<Vec<_>>()
        .join("\n");
    let list = tempfile::NamedTempFile::new()?;
    fs::write(list.path(), digests)?;
    let key = run_ok(Command::new("sha256sum").arg(list.path()))?;
    let key = &key[..16];
    let dir = root.join("build/vm");
    let img = dir.join(format!("initramfs-test-{key}.img"));
    if img.is_file() {
        return Ok(img);
    }
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".initramfs-test-{key}.{}.tmp", std::process::id()));
    let start = Instant::now();
    let out = run(Command::new("bash")
        .arg(root.join("initramfs/build.sh"))
        .arg(kroot)
        .arg(&agent)
        .arg(&tmp)
        .args(["--install", "/usr/lib/systemd/systemd-socket-proxyd"])
        // Trust roots and config come per run in the appended archive, not from this host.
        .env("POWERNODE_TRUST_DIR", "/nonexistent")
        .env("POWERNODE_CONFIG", "/nonexistent"))?;
    ensure!(
        out.status.success(),
        "initramfs/build.sh: {}",
        describe(&out)
    );
    println!("dracut initramfs built in {:.1?}", start.elapsed());
    fs::rename(&tmp, &img)?;
    // Older images (other agent builds) are 50 MB each: keep only this one.
    for e in fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("initramfs-test-") && e.path() != img {
            fs::remove_file(e.path())
                .with_context(|| format!("removing stale {}", e.path().display()))?;
        }
    }
    Ok(img)
}

/// A `system-base`-style module: the debootstrapped Debian of `make image` with the suite
/// installed (units/ plus the multicall binary, daemons as argv[0] symlinks), the agent and
/// systemd-networkd enabled (tests/vm/system-module.sh).
pub fn system_tree(w: &Path) -> Result<Vec<(String, PathBuf)>> {
    let image = workspace_root().join("build/images/bookworm");
    ensure!(
        image.join(".powernode-image-stamp").is_file(),
        "{} missing: run `make image`",
        image.display()
    );
    let tree = w.join("tree-system");
    let out = run(Command::new("bash")
        .arg(workspace_root().join("tests/vm/system-module.sh"))
        .arg(&image)
        .arg(workspace_root().join("units"))
        .arg(bin("powernode-agent")?)
        .arg(&tree))?;
    ensure!(out.status.success(), "system-module.sh: {}", describe(&out));
    Ok(vec![("system-base".to_string(), tree)])
}

/// A newc cpio of `dir`, appended to the dracut image (the kernel unpacks concatenated
/// archives; an uncompressed one must start 4-byte aligned, so the base is zero-padded).
pub fn with_overlay(base: &Path, dir: &Path, out: &Path) -> Result<()> {
    let mut bytes = fs::read(base)?;
    while bytes.len() % 512 != 0 {
        bytes.push(0);
    }
    let cpio = run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet",
        dir.display()
    )))?;
    ensure!(cpio.status.success(), "cpio: {}", describe(&cpio));
    bytes.extend_from_slice(&cpio.stdout);
    fs::write(out, bytes)?;
    Ok(())
}

/// A platform, a registry, the per-run initramfs and a /persist disk image: everything one
/// node's boots need. Boots from the same `Vm` share the disk (state carries over).
pub struct Vm {
    pub registry: Registry,
    pub platform: DevPlatform,
    pub work: tempfile::TempDir,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub persist: PathBuf,
    pub token: Token,
    /// Each QEMU run is killed after this long ([`BOOT_TIMEOUT_SECS`] by default).
    pub timeout_secs: u64,
}

/// A QEMU process booting the node; its serial console goes to [`Running::console_path`].
pub struct Running {
    pub label: String,
    pub child: Child,
    pub console_path: PathBuf,
    pub started: Instant,
}

impl Running {
    /// The serial console so far.
    pub fn console(&self) -> Result<String> {
        Ok(fs::read_to_string(&self.console_path)?)
    }

    /// Exited yet? (`None` while QEMU runs.)
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM to timeout(1), which passes it on to QEMU; waits for it.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Vm {
    /// Registry, platform, the initramfs with this run's trust root and registry relay, a
    /// blank /persist disk of `persist_size`, and the modules `trees` builds (published, not
    /// assigned: the platform accepts assignments only for enrolled instances).
    pub fn setup(
        persist_size: &str,
        trees: impl FnOnce(&Path) -> Result<Vec<(String, PathBuf)>>,
    ) -> Result<Vm> {
        Self::setup_with(persist_size, &[], trees)
    }

    /// [`Vm::setup`] with extra `serve` flags for the platform.
    pub fn setup_with(
        persist_size: &str,
        platform_args: &[&str],
        trees: impl FnOnce(&Path) -> Result<Vec<(String, PathBuf)>>,
    ) -> Result<Vm> {
        for tool in [
            "qemu-system-x86_64",
            "socat",
            "mkfs.erofs",
            "fsverity",
            "dracut",
            "cpio",
            "busybox",
        ] {
            require_tool(tool)?;
        }
        let (kroot, vmlinuz) = kernel()?;
        let base = base_initramfs(&kroot)?;
        let registry = Registry::start()?;
        let mut args = vec!["--san", HOST_IN_GUEST];
        args.extend_from_slice(platform_args);
        let platform = DevPlatform::start(&args)?;
        let mut work = tempfile::Builder::new().prefix("pn-vm-boot-").tempdir()?;
        // POWERNODE_KEEP_VM=1 leaves the consoles, disk and initrd behind for a post-mortem.
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v == "1") {
            work.disable_cleanup(true);
            eprintln!("{KEEP_ENV}=1: keeping {}", work.path().display());
        }
        let w = work.path().to_path_buf();
        let trees = trees(&w)?;
        let token = platform.token(None)?;
        let mut vm = Vm {
            registry,
            platform,
            work,
            vmlinuz,
            initrd: PathBuf::new(),
            persist: PathBuf::new(),
            token,
            timeout_secs: BOOT_TIMEOUT_SECS,
        };
        for (name, tree) in &trees {
            vm.publish(name, tree)?;
        }

        // Per-run additions: the platform's Sigstore trusted root and the registry relay.
        let extra = w.join("initrd-extra");
        vm.platform.pin_trusted_root(&extra)?;
        let reg_port = port_of(&vm.registry.addr)?;
        let out = run(Command::new("bash")
            .arg(workspace_root().join("tests/vm/registry-relay.sh"))
            .arg(&extra)
            .arg(reg_port.to_string())
            .arg(format!("{HOST_IN_GUEST}:{reg_port}")))?;
        ensure!(
            out.status.success(),
            "registry-relay.sh: {}",
            describe(&out)
        );
        vm.initrd = w.join("initrd.img");
        with_overlay(&base, &extra, &vm.initrd)?;

        vm.persist = w.join("persist.img");
        run_ok(
            Command::new("truncate")
                .args(["-s", persist_size])
                .arg(&vm.persist),
        )?;
        Ok(vm)
    }

    /// `module publish` of `tree` as version 1.0.0, its files left in `out-<name>`.
    pub fn publish(&self, name: &str, tree: &Path) -> Result<Value> {
        let out_dir = self.work.path().join(format!("out-{name}"));
        self.platform.publish(
            &self.registry.addr,
            name,
            "1.0.0",
            tree,
            &["--out", out_dir.to_str().context("utf-8 path")?],
        )
    }

    /// `module assign` to the VM's instance (the platform knows it only once it enrolled);
    /// the assignment order is the priority rank.
    pub fn assign(&self, name: &str) -> Result<()> {
        self.platform.assign(&self.token.instance_uuid, name, &[])
    }

    /// Starts QEMU (TCG) on the kernel, the initramfs and the /persist disk, with fw-cfg
    /// carrying the instance UUID, bootstrap token, platform URL and CA.
    pub fn spawn(&self, label: &str) -> Result<Running> {
        let plat_port = port_of(&self.platform.url)?;
        let reg_port = port_of(&self.registry.addr)?;
        let fwd =
            |p: u16| format!("guestfwd=tcp:{HOST_IN_GUEST}:{p}-cmd:socat - TCP:127.0.0.1:{p}");
        let ca = self.work.path().join("ca.pem");
        fs::write(&ca, &self.platform.ca_pem)?;
        let fw = |k: &str, v: &str| format!("name=opt/com.powernode/{k},string={v}");
        let started = Instant::now();
        // TCG: /dev/kvm here is PVM and cannot run Debian's kernel (shared/harness.md §0).
        let console_path = self.work.path().join(format!("console-{label}.log"));
        let child = Command::new("timeout")
            .arg(self.timeout_secs.to_string())
            .arg("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35"])
            .args(["-m", "1024", "-smp", "2", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(&self.initrd)
            .args([
                "-append",
                // rd.emergency=poweroff: a refused boot ends the VM instead of waiting at a shell.
                "console=ttyS0 quiet panic=-1 rd.shell=0 rd.emergency=poweroff \
                 powernode.module_wait=120",
            ])
            .args(["-fw_cfg", &fw("instance_uuid", &self.token.instance_uuid)])
            .args(["-fw_cfg", &fw("bootstrap_token", &self.token.token)])
            .args([
                "-fw_cfg",
                &fw(
                    "platform_url",
                    &format!("https://{HOST_IN_GUEST}:{plat_port}"),
                ),
            ])
            .arg("-fw_cfg")
            .arg(format!(
                "name=opt/com.powernode/ca_pem,file={}",
                ca.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=none,id=persist,file={},format=raw,cache=unsafe",
                self.persist.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=persist"])
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,restrict=on,{},{}",
                    fwd(plat_port),
                    fwd(reg_port)
                ),
            ])
            .args([
                "-device",
                "virtio-net-pci,netdev=n0",
                "-device",
                "virtio-rng-pci",
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&console_path)?)
            .stderr(fs::File::create(console_path.with_extension("stderr"))?)
            .spawn()
            .context("starting qemu")?;
        Ok(Running {
            label: label.to_string(),
            child,
            console_path,
            started,
        })
    }

    /// One boot; the serial console. `on_enrolled` runs once the guest says it waits for an
    /// assignment (it has enrolled by then, so the platform accepts one).
    /// `stop_when`, checked twice a second, ends a boot that does not power off by itself.
    pub fn boot(
        &self,
        label: &str,
        on_enrolled: Option<&dyn Fn() -> Result<()>>,
        stop_when: Option<&dyn Fn() -> Result<bool>>,
    ) -> Result<String> {
        let mut vm = self.spawn(label)?;
        let mut hook = on_enrolled;
        let status = loop {
            if let Some(st) = vm.exited()? {
                break st;
            }
            if let Some(stop) = stop_when
                && stop()?
            {
                break vm.stop()?;
            }
            // The guest has enrolled and found nothing assigned: the operator's turn.
            if let Some(h) = hook
                && vm.console()?.contains(WAITING_FOR_ASSIGNMENT)
            {
                h()?;
                hook = None;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let console = vm.console()?;
        println!("boot {label}: {:.1?}", vm.started.elapsed());
        ensure!(
            hook.is_none(),
            "boot {label}: the guest never waited for an assignment; console:\n{console}"
        );
        if status.code() == Some(124) {
            bail!(
                "boot {label} timed out after {} s; console:\n{console}",
                self.timeout_secs
            );
        }
        Ok(console)
    }
}

/// The `[boot:<stage>] …` lines of a console.
pub fn boot_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.find("[boot:").map(|i| &l[i..]))
        .collect()
}
