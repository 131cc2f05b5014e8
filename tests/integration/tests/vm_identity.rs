//! Identity discovery on real virtual firmware: Debian's kernel under QEMU (TCG) boots a small
//! initramfs holding `powernode-agent`, which reads fw-cfg items and the SMBIOS product UUID
//! through the kernel's own interfaces (qemu_fw_cfg sysfs, /sys/class/dmi) — what the host
//! tiers can only imitate with fixture trees.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::{bin, describe, require_tool, run, workspace_root};
use serde_json::Value;

const DMI_UUID: &str = "6f1c0b8e-8a3e-4f43-9d51-2b8f3c1e9a77";
const FWCFG_UUID: &str = "0b6a4c1e-aaaa-4f43-9d51-2b8f3c1e9a77";

/// Boot once with `extra` QEMU arguments; the JSON `introspect` printed inside.
fn boot(extra: &[&str]) -> Result<Value> {
    require_tool("qemu-system-x86_64")?;
    let (kroot, vmlinuz) = powernode_integration_tests::vm::kernel()?;
    let tmp = tempfile::tempdir()?;
    let initrd = tmp.path().join("initrd.gz");
    let vm = workspace_root().join("tests/vm");
    let out = run(Command::new("bash")
        .arg(vm.join("initramfs.sh"))
        .arg(&kroot)
        .arg(bin("powernode-agent")?)
        .arg(vm.join("identity-init.sh"))
        .arg(&initrd))?;
    ensure!(out.status.success(), "initramfs.sh: {}", describe(&out));
    let start = Instant::now();
    // TCG: /dev/kvm here is PVM and cannot run Debian's kernel (shared/harness.md §0).
    let out = run(Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-M",
            "q35",
        ])
        .args([
            "-m",
            "1024",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1", "-uuid", DMI_UUID])
        .args(extra))?;
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("boot took {:.1?}", start.elapsed());
    let Some(json) = console
        .split("PN-INTROSPECT-BEGIN")
        .nth(1)
        .and_then(|s| s.split("PN-INTROSPECT-END").next())
    else {
        bail!(
            "no introspect output on the console:\n{console}\n{}",
            describe(&out)
        );
    };
    serde_json::from_str(json.trim()).with_context(|| format!("introspect output: {json}"))
}

#[test]
fn fw_cfg_and_dmi_are_read_from_real_firmware() -> Result<()> {
    let v = boot(&[
        "-fw_cfg",
        &format!("name=opt/com.powernode/instance_uuid,string={FWCFG_UUID}"),
        "-fw_cfg",
        "name=opt/com.powernode/bootstrap_token,string=SECRET-FWCFG-TOKEN",
        "-fw_cfg",
        "name=opt/com.powernode/platform_url,string=https://fw.example",
    ])?;
    let id = &v["identity"];
    ensure!(
        id["source"] == "fw-cfg" && id["instance_uuid"] == FWCFG_UUID,
        "{v}"
    );
    ensure!(id["platform_url"] == "https://fw.example", "{v}");
    ensure!(id["bootstrap_token"] == "<redacted>", "{v}");
    ensure!(
        !v.to_string().contains("SECRET-FWCFG-TOKEN"),
        "token leaked: {v}"
    );

    // No fw-cfg items: the SMBIOS UUID QEMU was given (-uuid) names the node.
    let v = boot(&[])?;
    let id = &v["identity"];
    ensure!(
        id["source"] == "dmi" && id["instance_uuid"] == DMI_UUID,
        "{v}"
    );
    Ok(())
}
