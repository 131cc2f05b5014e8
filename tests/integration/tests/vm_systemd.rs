//! The identity daemon as a real systemd unit on real virtual firmware: Debian's kernel under
//! QEMU (TCG) boots the debootstrapped Debian root (make image) with the suite installed, systemd
//! as PID 1 and the system bus. A probe unit asks `com.powernode.Identity1.Resolve()`, which
//! D-Bus-activates powernode-identityd in its own sandbox (user powernode, seccomp, no new
//! privileges, CAP_DAC_READ_SEARCH for the root-only fw-cfg and DMI files), and reports what it
//! found on the serial console. First boot: fw-cfg items; second boot: none, only the SMBIOS
//! UUID (`-uuid`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::{describe, require_tool, run, units, workspace_root};

const DMI_UUID: &str = "7e2d1c9f-3b4a-4c5d-8e6f-a1b2c3d4e5f6";
const FWCFG_UUID: &str = "1c2b3a49-5d6e-4f70-8192-a3b4c5d6e7f8";

/// The probe: resolve through the bus, then print the properties, the unit's identity and its
/// sandbox, between markers, and power off.
const PROBE: &str = r#"[Unit]
Description=powernode VM probe: identity through the real unit
After=dbus.service
Wants=dbus.service

[Service]
Type=simple
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo PN-BEGIN; \
  busctl call com.powernode.Identity1 /com/powernode/Identity1 com.powernode.Identity1 Resolve; \
  for p in Source InstanceId PlatformUrl; do echo "PROP $p $(busctl get-property com.powernode.Identity1 /com/powernode/Identity1 com.powernode.Identity1 $p)"; done; \
  pid=$(systemctl show -P MainPID powernode-identityd.service); \
  echo "UNIT $(systemctl show -P ActiveState powernode-identityd.service) uid=$(awk "/^Uid:/{print \\$2}" /proc/$pid/status) powernode=$(id -u powernode-identity)"; \
  grep -E "^(NoNewPrivs|Seccomp|CapEff):" /proc/$pid/status; \
  echo PN-END; systemctl poweroff'

[Install]
WantedBy=multi-user.target
"#;

fn write(root: &Path, rel: &str, content: &str) -> Result<()> {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
}

/// The root disk and the initramfs, built once for both boots.
fn assets(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (kroot, _) = powernode_integration_tests::vm::kernel()?;
    let image = workspace_root().join("build/images/bookworm");
    ensure!(
        image.join(".powernode-image-stamp").is_file(),
        "{} missing: run `make image`",
        image.display()
    );
    let tree = dir.join("tree");
    units::install_tree(&tree)?;
    let extra = dir.join("extra");
    write(&extra, "etc/systemd/system/pn-probe.service", PROBE)?;
    std::fs::create_dir_all(extra.join("etc/systemd/system/multi-user.target.wants"))?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/pn-probe.service",
        extra.join("etc/systemd/system/multi-user.target.wants/pn-probe.service"),
    )?;
    // DMI names a node only when a platform is configured (identity/dmi.rs).
    write(
        &extra,
        "etc/powernode/agent.toml",
        "[platform]\nurl = \"https://platform.example\"\n",
    )?;
    let disk = dir.join("root.ext4");
    let vm = workspace_root().join("tests/vm");
    let out = run(Command::new("bash")
        .arg(vm.join("sysroot.sh"))
        .arg(&image)
        .arg(&tree)
        .arg(&extra)
        .arg(&disk))?;
    ensure!(out.status.success(), "sysroot.sh: {}", describe(&out));
    let initrd = dir.join("initrd.gz");
    let out = run(Command::new("bash")
        .arg(vm.join("initramfs.sh"))
        .arg(&kroot)
        .arg(powernode_integration_tests::bin("powernode-agent")?)
        .arg(vm.join("systemd-init.sh"))
        .arg(&initrd)
        .env("MODULES", "qemu_fw_cfg virtio_pci virtio_blk ext4"))?;
    ensure!(out.status.success(), "initramfs.sh: {}", describe(&out));
    Ok((disk, initrd))
}

/// Boot the disk (a fresh copy: every boot starts from the same image); the probe's lines.
fn boot(dir: &Path, disk: &Path, initrd: &Path, extra: &[&str]) -> Result<String> {
    let (_, vmlinuz) = powernode_integration_tests::vm::kernel()?;
    let copy = dir.join("boot.ext4");
    std::fs::copy(disk, &copy)?;
    let start = Instant::now();
    let out = run(Command::new("timeout")
        .args(["300", "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-M", "q35", "-m", "1024", "-smp", "2", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 systemd.show_status=error systemd.mask=serial-getty@ttyS0.service",
            "-uuid",
            DMI_UUID,
            "-drive",
        ])
        .arg(format!(
            "if=none,id=d0,file={},format=raw,cache=unsafe",
            copy.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .args(extra))?;
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("systemd boot + probe took {:.1?}", start.elapsed());
    let Some(probe) = console
        .split("PN-BEGIN")
        .nth(1)
        .and_then(|s| s.split("PN-END").next())
    else {
        bail!(
            "no probe output on the console:\n{console}\n{}",
            describe(&out)
        );
    };
    Ok(probe.to_string())
}

fn line<'a>(probe: &'a str, prefix: &str) -> &'a str {
    probe
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or("")
}

#[test]
fn identityd_unit_discovers_firmware_identity_under_systemd() -> Result<()> {
    require_tool("qemu-system-x86_64")?;
    let dir = tempfile::Builder::new()
        .prefix("pn-vm-systemd-")
        .tempdir()?;
    let (disk, initrd) = assets(dir.path())?;

    let probe = boot(
        dir.path(),
        &disk,
        &initrd,
        &[
            "-fw_cfg",
            &format!("name=opt/com.powernode/instance_uuid,string={FWCFG_UUID}"),
            "-fw_cfg",
            "name=opt/com.powernode/bootstrap_token,string=SECRET-VM-TOKEN",
            "-fw_cfg",
            "name=opt/com.powernode/platform_url,string=https://fw.example",
        ],
    )?;
    ensure!(
        line(&probe, "s ").contains(FWCFG_UUID),
        "Resolve() answered: {probe}"
    );
    ensure!(
        line(&probe, "PROP Source").contains("\"fw-cfg\""),
        "{probe}"
    );
    ensure!(
        line(&probe, "PROP PlatformUrl").contains("https://fw.example"),
        "{probe}"
    );
    ensure!(
        !probe.contains("SECRET-VM-TOKEN"),
        "token on the bus: {probe}"
    );
    // Running as the powernode account (a process with capabilities is not dumpable, so its
    // /proc entries belong to root: read the Uid line instead).
    let unit = line(&probe, "UNIT");
    let uid = unit.split("uid=").nth(1).and_then(|r| r.split(' ').next());
    let want = unit.split("powernode=").nth(1);
    ensure!(
        unit.starts_with("UNIT active ") && uid.is_some() && uid == want && want != Some("0"),
        "{probe}"
    );
    ensure!(line(&probe, "NoNewPrivs:").ends_with('1'), "{probe}");
    ensure!(line(&probe, "Seccomp:").ends_with('2'), "{probe}");
    // Only CAP_DAC_READ_SEARCH (bit 2) is left.
    ensure!(
        line(&probe, "CapEff:").ends_with("0000000000000004"),
        "{probe}"
    );

    let probe = boot(dir.path(), &disk, &initrd, &[])?;
    ensure!(line(&probe, "PROP Source").contains("\"dmi\""), "{probe}");
    ensure!(
        line(&probe, "PROP InstanceId").contains(DMI_UUID),
        "{probe}"
    );
    Ok(())
}
