//! The suite installed into a booted Debian bookworm under systemd-nspawn: the system comes
//! up, users, directories, units and policy are in place, and the SRE tools work inside.
//! The daemons' own behaviour is not exercised here.

use anyhow::{Result, ensure};
use powernode_integration_tests::container::{Container, Image};
use std::time::Instant;

#[test]
fn installed_suite_boots_in_a_container() -> Result<()> {
    let image = Image::bookworm()?;
    let start = Instant::now();
    let container = Container::boot_installed(&image, &[])?;
    let state = container.wait_running()?;
    println!("boot: {state} after {:.2?}", start.elapsed());
    if state != "running" {
        println!("failed units:\n{}", container.failed_units()?);
    }
    ensure!(
        state == "running" || state == "degraded",
        "system state {state}:\n{}",
        container.boot_log()
    );

    // The sysusers.d entries: one system user per daemon; group powernode holds the
    // platform-facing daemons but not identityd; enrolld may read identityd's token.
    let mut uids = std::collections::BTreeSet::new();
    for user in powernode_integration_tests::DAEMON_USERS {
        let passwd = container.exec_ok(&["getent", "passwd", user])?;
        let uid: u32 = passwd.split(':').nth(2).unwrap_or_default().parse()?;
        ensure!(uid < 1000, "{user} should be a system user, got uid {uid}");
        ensure!(
            uids.insert(uid),
            "{user} shares uid {uid} with another daemon"
        );
    }
    let members = |group: &str| -> Result<Vec<String>> {
        let line = container.exec_ok(&["getent", "group", group])?;
        Ok(line
            .trim()
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect())
    };
    let groups = |user: &str| -> Result<String> { container.exec_ok(&["id", "-nG", user]) };
    ensure!(
        !groups("powernode-identity")?
            .split_whitespace()
            .any(|g| g == "powernode"),
        "identityd must not be in group powernode"
    );
    for user in [
        "powernode-enroll",
        "powernode-cert",
        "powernode-events",
        "powernode-mount",
    ] {
        ensure!(
            groups(user)?.split_whitespace().any(|g| g == "powernode"),
            "{user} should be in group powernode"
        );
    }
    ensure!(
        members("powernode-identity")?.contains(&"powernode-enroll".to_string()),
        "enrolld reads identity.json through group powernode-identity"
    );

    // The tmpfiles.d entries, created at boot.
    for (path, want) in [
        ("/run/powernode", "1775 root:powernode"),
        (
            "/run/powernode/identity",
            "750 powernode-identity:powernode-identity",
        ),
        ("/run/powernode/tasks", "700 powernode:powernode"),
        ("/persist/var/lib/powernode", "2770 root:powernode"),
        ("/persist/var/lib/powernode/pki", "2770 root:powernode"),
        ("/etc/powernode", "755 root:root"),
    ] {
        let got = container.exec_ok(&["stat", "-c", "%a %U:%G", path])?;
        ensure!(got.trim() == want, "{path}: {got:?}, want {want:?}");
    }

    // The units are loaded and analysable online.
    for unit in [
        "powernode-identityd.service",
        "powernode-enrolld.service",
        "powernode-agent.service",
    ] {
        let load = container.exec_ok(&["systemctl", "show", "-P", "LoadState", unit])?;
        ensure!(load.trim() == "loaded", "{unit}: LoadState {load:?}");
    }
    let security = container.exec_ok(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "powernode-enrolld.service",
    ])?;
    let line = security
        .lines()
        .find(|l| l.contains("Overall exposure"))
        .unwrap_or("(none)");
    println!("online: {line}");
    ensure!(
        line.contains("powernode-enrolld.service"),
        "no overall exposure line:\n{security}"
    );

    // The system bus runs with our policy and activation files loaded.
    let names = container.exec_ok(&["busctl", "list", "--no-pager", "--acquired"])?;
    ensure!(
        names.contains("org.freedesktop.systemd1"),
        "busctl list:\n{names}"
    );
    let activatable = container.exec_ok(&["busctl", "list", "--no-pager", "--activatable"])?;
    for name in ["com.powernode.Identity1", "com.powernode.Enroll1"] {
        ensure!(
            activatable.contains(name),
            "{name} is not activatable:\n{activatable}"
        );
    }

    let powered = Instant::now();
    let took = container.poweroff()?;
    println!("poweroff: {took:.2?} (total {:.2?})", powered.elapsed());
    Ok(())
}
