//! The boot path end to end (issue #7): Debian's kernel under QEMU (TCG) boots the dracut
//! initramfs built from `initramfs/` (systemd 252 as the initrd's PID 1), whose
//! `powernode-boot.service` runs `powernode-agent boot` against the development platform and a
//! real docker-registry on host loopback, reached only through `restrict=on` guestfwd rules.
//!
//! One test, three boots from the same /persist disk (state carries over, so they cannot run
//! apart): a blank disk is formatted and the node enrolls, pulls, verifies and stacks two signed
//! modules at /sysroot, and systemd switches into it; the second boot reuses the PKI (the
//! single-use token would be refused otherwise); a third, with a tampered module assigned, stops
//! at `[boot:verify]` and never switches root.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::devplatform::{DevPlatform, Token};
use powernode_integration_tests::registry::Registry;
use powernode_integration_tests::{bin, describe, require_tool, run, run_ok, workspace_root};
use serde_json::Value;

/// The host as the guest sees it (guestfwd targets; the platform certificate carries it).
const HOST_IN_GUEST: &str = "10.0.2.100";
/// Per boot: a TCG boot of the initramfs with enrollment and two pulls takes ~30-60 s.
const BOOT_TIMEOUT_SECS: &str = "200";
const PERSIST_SIZE: &str = "256M";
/// The system-base module (a Debian tree) is stored once and downloaded once beside it.
const PERSIST_SIZE_SYSTEM: &str = "1G";
/// What the guest prints when it has enrolled and no module is assigned yet.
const WAITING_FOR_ASSIGNMENT: &str = "[boot:fetch] no modules assigned yet";

fn port_of(addr: &str) -> Result<u16> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {addr}"))
}

/// The dracut image for this agent binary and module source, built once and kept under
/// build/vm/ (dracut takes a minute or more on two busy cores).
fn base_initramfs(kroot: &Path) -> Result<PathBuf> {
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

/// Two modules: `base` is a tiny OS (busybox + an init that reports, tests/vm/boot-module-init.sh),
/// `app` carries a file of the same name. `base` is assigned first (rank 0), so its copy wins.
fn small_trees(w: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let busybox = require_tool("busybox")?;
    let base_tree = w.join("tree-base");
    for d in [
        "bin", "sbin", "etc", "usr/lib", "proc", "sys", "dev", "run", "tmp", "persist",
    ] {
        fs::create_dir_all(base_tree.join(d))?;
    }
    fs::copy(&busybox, base_tree.join("bin/busybox"))?;
    for applet in ["sh", "cat", "awk", "ls", "tr", "sync", "poweroff", "echo"] {
        std::os::unix::fs::symlink("busybox", base_tree.join("bin").join(applet))?;
    }
    fs::copy(
        workspace_root().join("tests/vm/boot-module-init.sh"),
        base_tree.join("sbin/init"),
    )?;
    fs::write(
        base_tree.join("usr/lib/os-release"),
        "ID=pntest\nNAME=\"powernode test root\"\n",
    )?;
    fs::write(base_tree.join("etc/pn-layer"), "base\n")?;
    fs::write(base_tree.join("etc/pn-base-only"), "yes\n")?;
    let app_tree = w.join("tree-app");
    fs::create_dir_all(app_tree.join("etc"))?;
    fs::write(app_tree.join("etc/pn-layer"), "app\n")?;
    fs::write(app_tree.join("etc/pn-app-only"), "yes\n")?;
    Ok(vec![("app", app_tree), ("base", base_tree)])
}

/// A `system-base`-style module: the debootstrapped Debian of `make image` with the suite
/// installed (units/ plus the multicall binary, daemons as argv[0] symlinks), the agent and
/// systemd-networkd enabled (tests/vm/system-module.sh).
fn system_tree(w: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
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
    Ok(vec![("system-base", tree)])
}

/// A newc cpio of `dir`, appended to the dracut image (the kernel unpacks concatenated
/// archives; an uncompressed one must start 4-byte aligned, so the base is zero-padded).
fn with_overlay(base: &Path, dir: &Path, out: &Path) -> Result<()> {
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

struct Vm {
    registry: Registry,
    platform: DevPlatform,
    work: tempfile::TempDir,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    persist: PathBuf,
    token: Token,
}

impl Vm {
    /// Registry, platform, the initramfs with this run's trust root and registry relay, a
    /// blank /persist disk of `persist_size`, and the modules `trees` builds (published, not
    /// assigned: the platform accepts assignments only for enrolled instances).
    fn setup(
        persist_size: &str,
        trees: impl FnOnce(&Path) -> Result<Vec<(&'static str, PathBuf)>>,
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
        let (kroot, vmlinuz) = powernode_integration_tests::vm::kernel()?;
        let base = base_initramfs(&kroot)?;
        let registry = Registry::start()?;
        let platform = DevPlatform::start(&["--san", HOST_IN_GUEST])?;
        let work = tempfile::Builder::new().prefix("pn-vm-boot-").tempdir()?;
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
        };
        for (name, tree) in &trees {
            vm.publish(name, tree)?;
        }
        let first = trees.first().map(|(n, _)| *n).context("no module trees")?;

        // Per-run additions: the platform's Sigstore trusted root and the registry relay.
        let extra = w.join("initrd-extra");
        let trust = extra.join("etc/powernode/trust");
        fs::create_dir_all(&trust)?;
        fs::copy(
            w.join(format!("out-{first}/trusted_root.json")),
            trust.join("trusted_root.json"),
        )?;
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

    /// `module publish` of `tree`; the stored record.
    fn publish(&self, name: &str, tree: &Path) -> Result<Value> {
        let out_dir = self.work.path().join(format!("out-{name}"));
        let m: Value = serde_json::from_str(&self.platform.cli(&[
            "module",
            "publish",
            "--registry",
            &self.registry.addr,
            "--name",
            name,
            "--version",
            "1.0.0",
            "--out",
            out_dir.to_str().context("utf-8 path")?,
            tree.to_str().context("utf-8 path")?,
        ])?)?;
        Ok(m)
    }

    /// `module assign` to the VM's instance (the platform knows it only once it enrolled);
    /// the assignment order is the priority rank.
    fn assign(&self, name: &str) -> Result<()> {
        self.platform.cli(&[
            "module",
            "assign",
            "--instance",
            &self.token.instance_uuid,
            "--module",
            name,
        ])?;
        Ok(())
    }

    /// One boot; the serial console. `on_enrolled` runs once the guest says it waits for an
    /// assignment (it has enrolled by then, so the platform accepts one).
    /// `stop_when`, checked twice a second, ends a boot that does not power off by itself.
    fn boot(
        &self,
        label: &str,
        on_enrolled: Option<&dyn Fn() -> Result<()>>,
        stop_when: Option<&dyn Fn() -> Result<bool>>,
    ) -> Result<String> {
        let plat_port = port_of(&self.platform.url)?;
        let reg_port = port_of(&self.registry.addr)?;
        let fwd =
            |p: u16| format!("guestfwd=tcp:{HOST_IN_GUEST}:{p}-cmd:socat - TCP:127.0.0.1:{p}");
        let ca = self.work.path().join("ca.pem");
        fs::write(&ca, &self.platform.ca_pem)?;
        let fw = |k: &str, v: &str| format!("name=opt/com.powernode/{k},string={v}");
        let start = Instant::now();
        // TCG: /dev/kvm here is PVM and cannot run Debian's kernel (shared/harness.md §0).
        let console_path = self.work.path().join(format!("console-{label}.log"));
        let mut child = Command::new("timeout")
            .args([BOOT_TIMEOUT_SECS, "qemu-system-x86_64"])
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
        let mut hook = on_enrolled;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if let Some(stop) = stop_when
                && stop()?
            {
                // SIGTERM to timeout(1), which passes it on to QEMU.
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
                break child.wait()?;
            }
            // The guest has enrolled and found nothing assigned: the operator's turn.
            if let Some(h) = hook
                && fs::read_to_string(&console_path)?.contains(WAITING_FOR_ASSIGNMENT)
            {
                h()?;
                hook = None;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let console = fs::read_to_string(&console_path)?;
        println!("boot {label}: {:.1?}", start.elapsed());
        ensure!(
            hook.is_none(),
            "boot {label}: the guest never waited for an assignment; console:\n{console}"
        );
        if status.code() == Some(124) {
            bail!("boot {label} timed out after {BOOT_TIMEOUT_SECS} s; console:\n{console}");
        }
        Ok(console)
    }
}

/// `PN-CHECK key=value` lines the module's init printed after the switch.
fn checks(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.split_once("PN-CHECK ")?.1.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn boot_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.find("[boot:").map(|i| &l[i..]))
        .collect()
}

fn has(console: &str, needle: &str) -> Result<()> {
    ensure!(
        console.contains(needle),
        "console lacks {needle:?}; boot lines:\n{}\n--- console:\n{console}",
        boot_lines(console).join("\n")
    );
    Ok(())
}

fn expect(k: &BTreeMap<String, String>, want: &[(&str, &str)], console: &str) -> Result<()> {
    for (key, value) in want {
        ensure!(
            k.get(*key).map(String::as_str) == Some(*value),
            "after switch-root {key} = {:?}, want {value:?}; console:\n{console}",
            k.get(*key)
        );
    }
    Ok(())
}

fn boot_record(console: &str) -> Result<Value> {
    Ok(serde_json::from_str(
        console
            .lines()
            .find_map(|l| l.split_once("PN-BOOTJSON ").map(|(_, j)| j.trim()))
            .context("no boot record printed")?,
    )?)
}

#[test]
fn dracut_initramfs_enrolls_verifies_mounts_and_switches_root() -> Result<()> {
    let vm = Vm::setup(PERSIST_SIZE, small_trees)?;
    let id = vm.token.instance_uuid.clone();

    // 1. Blank disk: format, enroll, wait for the assignment the operator makes once the
    //    node shows up, fetch + verify, overlay, switch-root into the module's init.
    let assign_base = || vm.assign("base");
    let c = vm.boot("first", Some(&assign_base), None)?;
    has(&c, "[boot:persist] /dev/vda is blank: creating ext4")?;
    has(&c, &format!("[boot:identity] instance {id} from fw-cfg"))?;
    has(&c, &format!("[boot:enroll] enrolled as {id}"))?;
    has(&c, WAITING_FOR_ASSIGNMENT)?;
    has(&c, "[boot:verify] module base: signature by")?;
    // /persist is ext4 with -O verity: the kernel now verifies every read of the image, and
    // its own measurement matched the signed digest.
    has(&c, "kernel fs-verity enforced")?;
    has(&c, "[boot:mount] lower 0: module base")?;
    has(&c, "[boot:switch-root] /sysroot is ready (1 layer(s))")?;
    has(&c, "PN-SYSROOT-END")?;
    let k = checks(&c);
    expect(
        &k,
        &[
            ("layer", "base"),
            ("base_only", "yes"),
            ("app_only", ""),
            ("root_fstype", "overlay"),
            ("persist_fstype", "ext4"),
            ("lowers", "erofs"),
            ("writable", "yes"),
        ],
        &c,
    )?;
    let pki = k.get("pki").cloned().unwrap_or_default();
    for f in ["node.key", "node.crt", "ca-bundle.crt", "meta.json"] {
        ensure!(pki.contains(f), "PKI on /persist lacks {f}: {pki}");
    }
    let record = boot_record(&c)?;
    ensure!(record["layers"][0]["name"] == "base", "{record}");
    ensure!(
        record["layers"][0]["image_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{record}"
    );
    let rec = vm
        .platform
        .instance(&id)?
        .with_context(|| format!("the platform has no record of {id}"))?;
    println!("platform record: {rec}");

    // 2. Same disk, a second module: the PKI on /persist is reused (the spent token is never
    //    sent again) and the layers stack by rank.
    vm.assign("app")?;
    let c = vm.boot("second", None, None)?;
    has(
        &c,
        "[boot:persist] found ext4 labelled pnpersist on /dev/vda",
    )?;
    has(
        &c,
        &format!("[boot:identity] instance {id} from the PKI on /persist"),
    )?;
    has(&c, "[boot:enroll] already enrolled")?;
    ensure!(
        !c.contains("[boot:enroll] enrolling"),
        "enrolled again:\n{c}"
    );
    has(&c, "[boot:mount] lower 0: module base")?;
    has(&c, "[boot:mount] lower 1: module app")?;
    has(&c, "PN-SYSROOT-END")?;
    expect(
        &checks(&c),
        &[
            ("layer", "base"),
            ("base_only", "yes"),
            ("app_only", "yes"),
            ("lowers", "erofs erofs"),
        ],
        &c,
    )?;
    ensure!(
        vm.platform.instances()?.len() == 1,
        "a second instance appeared"
    );

    // 3. A module whose blob was changed in the registry: refused, no switch-root.
    let evil_tree = vm.work.path().join("tree-evil");
    fs::create_dir_all(evil_tree.join("etc"))?;
    fs::write(evil_tree.join("etc/pn-layer"), "evil\n")?;
    let m = vm.publish("evil", &evil_tree)?;
    vm.assign("evil")?;
    let digest = m["artifact"]["image_digest"].as_str().context("digest")?;
    let blob = vm.registry.blob_path(digest)?;
    let mut bytes = fs::read(&blob)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, bytes)?;
    let c = vm.boot("tampered", None, None)?;
    has(&c, "[boot:verify] FAILED: module evil REFUSED")?;
    has(&c, "[boot:failed] stopping the boot at stage verify")?;
    ensure!(
        !c.contains("PN-SYSROOT-INIT") && !c.contains("[boot:switch-root]"),
        "switched root despite a refused module:\n{c}"
    );
    Ok(())
}

#[test]
fn system_base_module_boots_debian_and_the_agent_heartbeats() -> Result<()> {
    let vm = Vm::setup(PERSIST_SIZE_SYSTEM, system_tree)?;
    let id = vm.token.instance_uuid.clone();
    let assign = || vm.assign("system-base");
    let beating = || -> Result<bool> {
        Ok(vm
            .platform
            .instance(&id)?
            .is_some_and(|r| r["heartbeat_count"].as_u64().unwrap_or(0) >= 1))
    };
    let c = vm.boot("system", Some(&assign), Some(&beating))?;
    has(&c, &format!("[boot:enroll] enrolled as {id}"))?;
    has(&c, "[boot:verify] module system-base: signature by")?;
    has(&c, "[boot:switch-root] /sysroot is ready (1 layer(s))")?;
    let rec = vm
        .platform
        .instance(&id)?
        .with_context(|| format!("no platform record of {id}"))?;
    ensure!(
        rec["heartbeat_count"].as_u64().unwrap_or(0) >= 1,
        "no heartbeat from the booted system: {rec}\n{c}"
    );
    // The module's report unit ran under the module's systemd, after the switch.
    has(&c, "PN-SYSTEM os=debian")?;
    let record = boot_record(&c)?;
    ensure!(record["layers"][0]["name"] == "system-base", "{record}");
    // The heartbeat reports the root the initramfs composed (boot.json survives the switch).
    ensure!(
        rec["mount_state"] == "mounted"
            && rec["module_digests"]["system-base"] == record["layers"][0]["image_digest"],
        "heartbeat without the module digest: {rec}\n{record}"
    );
    println!("platform record: {rec}");
    Ok(())
}
