//! The boot path end to end (issue #7): Debian's kernel under QEMU (TCG) boots the dracut
//! initramfs built from `initramfs/` (systemd 252 as the initrd's PID 1), whose
//! `powernode-boot.service` runs `powernode-agent boot` against the development platform and a
//! real docker-registry on host loopback, reached only through `restrict=on` guestfwd rules.
//!
//! One test, three boots from the same /persist disk (state carries over, so they cannot run
//! apart): a blank disk is formatted and the node enrolls, pulls, verifies and stacks two signed
//! modules at /sysroot, and systemd switches into it; the second boot reuses the PKI (the
//! single-use token would be refused otherwise) and the stored module is verified again from
//! the store (SHA-256, fs-verity, its kept bundle under the node's signer policy) instead of
//! being downloaded; a third, with base's stored image swapped on the powered-off disk (refused
//! by that check and fetched again) and a module tampered in the registry assigned, stops at
//! `[boot:verify]` and never switches root.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::vm::{Vm, WAITING_FOR_ASSIGNMENT, boot_lines, system_tree};
use powernode_integration_tests::{require_tool, workspace_root};
use serde_json::Value;

const PERSIST_SIZE: &str = "256M";
/// The system-base module (a Debian tree) is stored once and downloaded once beside it.
const PERSIST_SIZE_SYSTEM: &str = "1G";

/// Two modules: `base` is a tiny OS (busybox + an init that reports, tests/vm/boot-module-init.sh),
/// `app` carries a file of the same name. `base` is assigned first (rank 0), so its copy wins.
fn small_trees(w: &Path) -> Result<Vec<(String, PathBuf)>> {
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
    Ok(vec![("app".into(), app_tree), ("base".into(), base_tree)])
}

/// `PN-CHECK key=value` lines the module's init printed after the switch.
fn checks(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.split_once("PN-CHECK ")?.1.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `e2fsck -fy` of a powered-off disk image: 0 (clean) or 1 (repaired) is fine.
fn fsck(disk: &Path) -> Result<()> {
    let out = powernode_integration_tests::run(
        std::process::Command::new("e2fsck").arg("-fy").arg(disk),
    )?;
    ensure!(
        matches!(out.status.code(), Some(0 | 1)),
        "e2fsck {}: {}",
        disk.display(),
        powernode_integration_tests::describe(&out)
    );
    Ok(())
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
    let base_digest = record["layers"][0]["image_digest"]
        .as_str()
        .context("base image digest")?
        .to_string();
    // The boot path accounts for its CPU (what `make bench` reports).
    ensure!(
        record["cpu"]["user_ms"].is_u64() && record["cpu"]["children_ms"].is_u64(),
        "{record}"
    );
    ensure!(
        boot_lines(&c)
            .iter()
            .any(|l| l.starts_with("[boot:done] boot path finished in") && l.contains(", CPU ")),
        "no CPU figure on the console:\n{}",
        boot_lines(&c).join("\n")
    );
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
    // base is in the store: verified again from there (never on a binding's word), not
    // downloaded; app is new and is fetched.
    has(
        &c,
        "module base: signature by public key OK, sha256 and fs-verity",
    )?;
    has(
        &c,
        "kernel fs-verity enforced (stored image, verified again)",
    )?;
    ensure!(
        boot_lines(&c)
            .iter()
            .any(|l| l.starts_with("[boot:verify] module app:")
                && l.ends_with("kernel fs-verity enforced")),
        "app is not checked in full:\n{}",
        boot_lines(&c).join("\n")
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
    // ... and base's cached image is swapped on the powered-off disk for one with a flipped
    // byte (a plain file: a rewritten disk cannot carry the kernel's verity for other bytes).
    // The store check refuses it (its SHA-256 is not the signed digest), so it is fetched
    // again before evil is refused.
    let base_hex = base_digest.trim_start_matches("sha256:");
    let cached = format!("/cache/modules/{base_hex}");
    let forged = vm.work.path().join("forged-base");
    let mut bytes = fs::read(vm.registry.blob_path(&base_digest)?)?;
    bytes[0] ^= 0xff;
    fs::write(&forged, bytes)?;
    // The guest powers off without unmounting: replay its journal before editing.
    fsck(&vm.persist)?;
    for req in [
        format!("rm {cached}"),
        format!("write {} {cached}", forged.display()),
    ] {
        let out = powernode_integration_tests::run(
            std::process::Command::new("debugfs")
                .args(["-w", "-R", &req])
                .arg(&vm.persist),
        )?;
        ensure!(
            out.status.success(),
            "debugfs {req}: {}",
            powernode_integration_tests::describe(&out)
        );
    }
    fsck(&vm.persist)?;
    let c = vm.boot("tampered", None, None)?;
    let base_line = boot_lines(&c)
        .into_iter()
        .find(|l| l.starts_with("[boot:verify] module base:"))
        .with_context(|| format!("base was not verified:\n{c}"))?
        .to_string();
    ensure!(
        !base_line.contains("stored image") && base_line.ends_with("kernel fs-verity enforced"),
        "a swapped cached image was trusted: {base_line}"
    );
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
