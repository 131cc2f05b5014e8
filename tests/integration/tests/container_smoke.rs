//! The suite installed into a booted Debian bookworm under systemd-nspawn: the system comes
//! up, users, directories, units and policy are in place, and the SRE tools work inside.
//! The daemons' own behaviour is not exercised here, except that identityd's cloud probes stay
//! in the container's network namespace: the container reaches only its loopback, the
//! namespace's metadata recorder and the test's own forwarded servers, and an attempt to reach
//! anything else is refused and recorded (checked here, and by every `poweroff`).

use anyhow::{Result, ensure};
use powernode_integration_tests::container::{Container, Image};
use powernode_integration_tests::describe;
use std::io::Write;
use std::time::Instant;

/// What the host-side server forwarded into the container says.
const GREETING: &str = "hello-from-the-host";
/// TEST-NET-1 (RFC 5737): an address outside the container that nothing should try to reach.
const OUTSIDE: &str = "192.0.2.1";

#[test]
fn installed_suite_boots_in_a_container() -> Result<()> {
    let image = Image::bookworm()?;
    // A server of the test on the host's loopback, listening before the boot: forwarded inside.
    let host_server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let host_port = host_server.local_addr()?.port();
    let greeter = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = host_server.accept()?;
        s.write_all(format!("{GREETING}\n").as_bytes())
    });
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

    // The network. The test's loopback server is reachable on the same port inside.
    ensure!(
        container.network().forwarded_ports().contains(&host_port),
        "port {host_port} not forwarded: {:?}",
        container.network().forwarded_ports()
    );
    let got = container.exec_ok(&[
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{host_port}; head -n1 <&3"),
    ])?;
    ensure!(got.trim() == GREETING, "through the forwarder: {got:?}");
    greeter.join().expect("greeter thread")?;

    // identityd, asked who this node is, finds no source; its cloud probes (every cloud on a
    // host without DMI: the container sees the host's /sys) reach only the namespace's recorder.
    let resolve = container.exec(&[
        "busctl",
        "--timeout=30",
        "call",
        "com.powernode.Identity1",
        "/com/powernode/Identity1",
        "com.powernode.Identity1",
        "Resolve",
    ])?;
    let answer = describe(&resolve);
    println!("Resolve: {answer}");
    ensure!(
        !resolve.status.success() && answer.contains("no identity source matched"),
        "Resolve: {answer}"
    );
    let probes = container.network().metadata_requests();
    println!("metadata recorder: {probes:?}");
    if !std::path::Path::new("/sys/class/dmi/id").exists() {
        for detection in [
            "PUT /latest/api/token",
            "GET /computeMetadata/v1/",
            "GET /metadata/instance?api-version=2021-02-01",
            "GET /metadata/v1/id",
            "GET /hetzner/v1/metadata/instance-id",
        ] {
            ensure!(
                probes.iter().any(|p| p == detection),
                "{detection:?} did not reach the recorder: {probes:?}"
            );
        }
    }
    container.network().ensure_no_leaks()?;

    // The guard itself: a connection to an outside address is refused and recorded.
    let out = container.exec(&["bash", "-c", &format!("echo > /dev/tcp/{OUTSIDE}/80")])?;
    ensure!(
        !out.status.success(),
        "reached {OUTSIDE}:\n{}",
        describe(&out)
    );
    let leaks = container.network().leaks()?;
    ensure!(leaks == [OUTSIDE], "recorded leaks: {leaks:?}");
    container.network().clear_leaks()?;

    let powered = Instant::now();
    let took = container.poweroff()?;
    println!("poweroff: {took:.2?} (total {:.2?})", powered.elapsed());
    Ok(())
}
