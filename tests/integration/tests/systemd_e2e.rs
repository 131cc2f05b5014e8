//! The skeleton path under a real systemd and system bus: the suite installed into a booted
//! Debian container, identity from /etc/identity.cfg, powernode-agent.service enabled. The agent
//! D-Bus-activates enrolld (which activates identityd), enrolls with the development platform
//! running on the host, and heartbeats. Checked inside with busctl/systemctl and outside with the
//! platform's own records.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::container::{BootOptions, Container, Image};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::units;

fn write(root: &std::path::Path, rel: &str, content: &str, mode: u32) -> Result<()> {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    std::fs::write(&p, content)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `busctl get-property` value without its type prefix (`s "x"` → `x`, `t 3` → `3`).
fn property(c: &Container, name: &str, iface: &str, prop: &str) -> Result<String> {
    let path = format!("/{}", iface.replace('.', "/"));
    let out = c.exec_ok(&["busctl", "get-property", name, &path, iface, prop])?;
    let v = out.trim().split_once(' ').map(|(_, v)| v).unwrap_or("");
    Ok(v.trim_matches('"').to_string())
}

/// The installed suite plus an identity for `token`: the platform CA under /etc/powernode/trust
/// and /etc/identity.cfg (root-only: the token is a secret, read by identityd through
/// CAP_DAC_READ_SEARCH).
fn node_tree(
    prefix: &str,
    platform: &DevPlatform,
    token: &powernode_integration_tests::devplatform::Token,
) -> Result<tempfile::TempDir> {
    let tree = tempfile::Builder::new().prefix(prefix).tempdir()?;
    units::install_tree(tree.path())?;
    write(
        tree.path(),
        "etc/powernode/trust/platform-ca.pem",
        &platform.ca_pem,
        0o644,
    )?;
    write(
        tree.path(),
        "etc/identity.cfg",
        &format!(
            "ID={}\nKEY={}\nSERVER={}\nCA_PEM_FILE=/etc/powernode/trust/platform-ca.pem\n",
            token.instance_uuid, token.token, platform.url
        ),
        0o600,
    )?;
    Ok(tree)
}

/// Anyone may ask the bus to start a service by name (StartServiceByName is not covered by
/// the destination's policy). Being started must cost nothing: no discovery, no claim banner,
/// no identity written — only an authorised caller's method call
/// does that.
#[test]
fn activation_by_anyone_has_no_side_effects() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let token = platform.token(None)?;
    let tree = node_tree("pn-e2e-activate-", &platform, &token)?;
    let c = Container::boot(
        &Image::bookworm()?,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            ..BootOptions::default()
        },
    )?;
    c.wait_running()?;
    for name in [
        "com.powernode.Identity1",
        "com.powernode.Enroll1",
        "com.powernode.Cert1",
        "com.powernode.Mount1",
    ] {
        // The answer does not matter (started, or refused): what happens next does.
        c.exec(&[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "busctl",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "StartServiceByName",
            "su",
            name,
            "0",
        ])?;
    }
    std::thread::sleep(Duration::from_secs(4));
    let journal = c.journal("powernode-identityd.service")?;
    ensure!(
        !journal.contains("identity resolved") && !journal.contains("identity resolution failed"),
        "activation alone ran discovery:\n{journal}"
    );
    ensure!(
        !c.exec(&["test", "-e", "/run/powernode/identity/identity.json"])?
            .status
            .success(),
        "activation alone wrote identity.json"
    );
    c.poweroff()?;
    Ok(())
}

#[test]
fn node_enrolls_and_heartbeats_under_systemd() -> Result<()> {
    let platform = DevPlatform::start(&["--next-poll-seconds", "2"])?;
    let token = platform.token(None)?;

    let tree = node_tree("pn-e2e-tree-", &platform, &token)?;
    let image = Image::bookworm()?;
    let started = Instant::now();
    let c = Container::boot(
        &image,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            enable: vec!["powernode-agent.service".into()],
            ..BootOptions::default()
        },
    )?;
    let state = c.wait_running()?;
    println!("container {state} after {:.1?}", started.elapsed());

    // The platform sees the node: enrolled, heartbeating with real kernel facts.
    let rec = platform
        .wait_heartbeats(&token.instance_uuid, 3, Duration::from_secs(90))
        .with_context(|| {
            format!(
                "agent journal:\n{}\nenrolld journal:\n{}\nidentityd journal:\n{}",
                c.journal("powernode-agent.service").unwrap_or_default(),
                c.journal("powernode-enrolld.service").unwrap_or_default(),
                c.journal("powernode-identityd.service").unwrap_or_default()
            )
        })?;
    println!("heartbeating after {:.1?}: {rec}", started.elapsed());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    ensure!(
        rec["boot_id"] == boot_id.trim(),
        "boot_id {}",
        rec["boot_id"]
    );
    ensure!(rec["status"] == "running", "status {}", rec["status"]);
    ensure!(rec["memory_free_kb"].as_u64().unwrap_or(0) > 0, "{rec}");
    ensure!(rec["uptime_seconds"].as_u64().unwrap_or(0) > 0, "{rec}");
    ensure!(
        rec["load_average"]
            .as_str()
            .unwrap_or("")
            .split(' ')
            .count()
            == 3,
        "{rec}"
    );
    let serial = rec["certificates_issued"][0]["serial"]
        .as_str()
        .context("issued serial")?
        .to_string();
    ensure!(
        rec["certificate_serials_seen"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == serial.as_str())),
        "the heartbeat used the enrolled certificate: {rec}"
    );

    // Inside: every service inspectable with busctl (introspect activates identityd/enrolld
    // again if they already exited idle).
    for (name, props) in [
        (
            "com.powernode.Identity1",
            &[
                "InstanceId",
                "Source",
                "PlatformUrl",
                "Evidence",
                "DiscoveredAt",
            ][..],
        ),
        (
            "com.powernode.Enroll1",
            &["Enrolled", "InstanceId", "CertificateSerial", "NotAfter"][..],
        ),
        (
            "com.powernode.Agent1",
            &["InstanceId", "State", "LastHeartbeat", "HeartbeatCount"][..],
        ),
    ] {
        let path = format!("/{}", name.replace('.', "/"));
        let intro = c.exec_ok(&["busctl", "introspect", "--no-pager", name, &path])?;
        for p in props {
            ensure!(
                intro.contains(&format!(".{p} ")),
                "{name} lacks {p}:\n{intro}"
            );
        }
    }
    let id = "com.powernode.Identity1";
    ensure!(property(&c, id, id, "InstanceId")? == token.instance_uuid);
    ensure!(property(&c, id, id, "Source")? == "identity-cfg");
    ensure!(property(&c, id, id, "PlatformUrl")? == platform.url);
    let en = "com.powernode.Enroll1";
    ensure!(property(&c, en, en, "Enrolled")? == "true");
    ensure!(property(&c, en, en, "CertificateSerial")? == serial);
    let ag = "com.powernode.Agent1";
    ensure!(property(&c, ag, ag, "State")? == "running");
    ensure!(property(&c, ag, ag, "HeartbeatCount")?.parse::<u64>()? >= 1);
    let all = c.exec_ok(&[
        "busctl",
        "call",
        id,
        "/com/powernode/Identity1",
        "org.freedesktop.DBus.Properties",
        "GetAll",
        "s",
        id,
    ])?;
    ensure!(
        !all.contains(&token.token),
        "Identity1 leaks the bootstrap token"
    );

    // systemd's view: running, notified status, no restarts.
    let show = c.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "ActiveState,StatusText,NRestarts,Result",
        "powernode-agent.service",
    ])?;
    ensure!(show.contains("ActiveState=active"), "{show}");
    ensure!(show.contains("StatusText=heartbeat ok"), "{show}");
    ensure!(show.contains("NRestarts=0"), "{show}");

    // PKI written by enrolld under its own uid, readable by the platform-facing daemons
    // (group powernode, setgid directory) and nobody else.
    for (file, want) in [
        ("", "2770 root powernode"),
        ("node.key", "640 powernode-enroll powernode"),
        ("instance-token.jwt", "640 powernode-enroll powernode"),
        ("node.crt", "644 powernode-enroll powernode"),
        ("meta.json", "644 powernode-enroll powernode"),
    ] {
        let p = format!("/persist/var/lib/powernode/pki/{file}");
        let got = c.exec_ok(&["stat", "-L", "-c", "%a %U %G", &p])?;
        ensure!(got.trim() == want, "{p}: {got:?} want {want:?}");
    }

    // The in-process sandbox was applied by each daemon that ran.
    for unit in [
        "powernode-agent.service",
        "powernode-enrolld.service",
        "powernode-identityd.service",
    ] {
        let j = c.journal(unit)?;
        ensure!(j.contains("sandbox applied"), "{unit} journal:\n{j}");
    }
    let pid = c.exec_ok(&[
        "systemctl",
        "show",
        "-P",
        "MainPID",
        "powernode-agent.service",
    ])?;
    let status = c.exec_ok(&["cat", &format!("/proc/{}/status", pid.trim())])?;
    ensure!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    ensure!(status.contains("CapEff:\t0000000000000000"), "{status}");

    // enrolld's event went through fleeteventd (D-Bus activated, durable queue, mTLS upload).
    let ev = platform
        .wait_event(
            &token.instance_uuid,
            "system.enroll.succeeded",
            Duration::from_secs(30),
        )
        .with_context(|| {
            c.journal("powernode-fleeteventd.service")
                .unwrap_or_default()
        })?;
    ensure!(
        ev["severity"] == "info" && !ev["correlation_id"].is_null(),
        "{ev}"
    );

    // A caller outside root/powernode is refused by the real system bus policy.
    let out = c.exec(&[
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "busctl",
        "call",
        ag,
        "/com/powernode/Agent1",
        ag,
        "HeartbeatNow",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("ccess denied"),
        "nobody's call: {err}"
    );

    c.poweroff()?;
    Ok(())
}

/// Rotation under real systemd: 60-second certificates, the rotation timer tightened with a
/// drop-in, certd started by its timer in its own sandbox. The rotation must land inside the
/// renewal window and the agent — never restarted — must present the new certificate on its
/// next heartbeat. Then `RotateNow()` over the bus (activating certd as a D-Bus service).
#[test]
fn certificates_rotate_on_schedule_under_systemd() -> Result<()> {
    let platform = DevPlatform::start(&["--next-poll-seconds", "1", "--cert-ttl", "60s"])?;
    let token = platform.token(None)?;
    let tree = node_tree("pn-e2e-rot-", &platform, &token)?;
    write(
        tree.path(),
        "etc/systemd/system/powernode-certd-rotate.timer.d/test.conf",
        "[Timer]\nOnBootSec=2s\nOnUnitActiveSec=3s\nRandomizedDelaySec=0\nAccuracySec=1s\n",
        0o644,
    )?;
    let c = Container::boot(
        &Image::bookworm()?,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            enable: vec![
                "powernode-agent.service".into(),
                "powernode-certd-rotate.timer".into(),
            ],
            ..BootOptions::default()
        },
    )?;
    c.wait_running()?;
    let rec = platform.wait_heartbeats(&token.instance_uuid, 1, Duration::from_secs(60))?;
    let s1 = rec["certificates_issued"][0]["serial"]
        .as_str()
        .context("serial")?
        .to_string();
    let cert = c.exec_ok(&["cat", "/persist/var/lib/powernode/pki/node.crt"])?;
    let info = powernode::pki::CertInfo::from_pem(&cert)?;
    ensure!(info.serial == s1, "node.crt is the enrolled certificate");

    // Wait for the timer-driven rotation.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (s2, rotated_at) = loop {
        let rec = platform
            .instance(&token.instance_uuid)?
            .context("instance")?;
        if let Some(second) = rec["certificates_issued"].get(1) {
            let at = time::OffsetDateTime::parse(
                second["issued_at"].as_str().context("issued_at")?,
                &time::format_description::well_known::Rfc3339,
            )?;
            break (second["serial"].as_str().context("serial")?.to_string(), at);
        }
        ensure!(
            Instant::now() < deadline,
            "no rotation; certd journal:\n{}",
            c.journal("powernode-certd-rotate.service")?
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Renew at 75 % ± 5 % of the certificate's validity (the platform backdates notBefore),
    // plus the timer's 3 s period and a little slack for the container's clock of events.
    let life = (info.not_after - info.not_before).as_seconds_f64();
    let frac = (rotated_at - info.not_before).as_seconds_f64() / life;
    let late = 0.80 + 6.0 / life;
    println!("rotated at {frac:.3} of the certificate lifetime (window 0.70-{late:.3})");
    ensure!(
        (0.70..=late).contains(&frac),
        "rotation at {frac:.3} of the lifetime"
    );
    // The agent was not restarted and its next heartbeat uses the new certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rec = platform
            .instance(&token.instance_uuid)?
            .context("instance")?;
        if rec["last_heartbeat_serial"] == s2.as_str() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "agent still on {}: {rec}",
            rec["last_heartbeat_serial"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(s2 != s1);
    let show = c.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "NRestarts,ActiveState",
        "powernode-agent.service",
    ])?;
    ensure!(
        show.contains("NRestarts=0") && show.contains("ActiveState=active"),
        "{show}"
    );
    let j = c.journal("powernode-certd-rotate.service")?;
    ensure!(j.contains("certificate rotated"), "{j}");
    platform
        .wait_event(
            &token.instance_uuid,
            "system.cert.rotated",
            Duration::from_secs(30),
        )
        .with_context(|| {
            c.journal("powernode-fleeteventd.service")
                .unwrap_or_default()
        })?;

    // RotateNow over the bus activates certd as a D-Bus service under its own unit.
    let cert = "com.powernode.Cert1";
    let out = c.exec_ok(&[
        "busctl",
        "call",
        cert,
        "/com/powernode/Cert1",
        cert,
        "RotateNow",
    ])?;
    let s3 = out
        .trim()
        .trim_start_matches("s ")
        .trim_matches('"')
        .to_string();
    ensure!(s3 != s2 && !s3.is_empty(), "RotateNow returned {out:?}");
    ensure!(property(&c, cert, cert, "Serial")? == s3);
    let state = property(&c, cert, cert, "State")?;
    ensure!(
        state == "rotated",
        "Cert1 State {state}; certd journal:\n{}",
        c.journal("powernode-certd.service")?
    );
    ensure!(!property(&c, cert, cert, "RenewAt")?.is_empty());
    c.poweroff()?;
    Ok(())
}

/// Tasks under real systemd and polkit: the unprivileged agent starts and stops a unit, runs
/// shell commands in transient units (output returned, exit status and timeout reported), and
/// on `systemctl stop` drains a short task and stops/report a long one.
#[test]
fn tasks_run_through_systemd_and_drain_on_stop() -> Result<()> {
    let platform = DevPlatform::start(&["--next-poll-seconds", "2"])?;
    let token = platform.token(None)?;
    let id = token.instance_uuid.clone();
    let tree = node_tree("pn-e2e-tasks-", &platform, &token)?;
    write(
        tree.path(),
        "etc/powernode/agent.toml.d/50-test.toml",
        "[tasks]\npoll_secs = 1\ndrain_secs = 4\n",
        0o644,
    )?;
    // A module-style service (powernode-<module>-<service>): the polkit rule lets the agent
    // start and stop those, and nothing else but its task units and reboot.target.
    write(
        tree.path(),
        "etc/systemd/system/powernode-probe-svc.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
        0o644,
    )?;
    write(
        tree.path(),
        "etc/systemd/system/pn-other.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
        0o644,
    )?;
    let c = Container::boot(
        &Image::bookworm()?,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            enable: vec!["powernode-agent.service".into()],
            ..BootOptions::default()
        },
    )?;
    c.wait_running()?;
    platform.wait_heartbeats(&id, 1, Duration::from_secs(90))?;
    let logs = || {
        format!(
            "agent journal:\n{}",
            c.journal("powernode-agent.service").unwrap_or_default()
        )
    };
    let run = |command: &str, options: serde_json::Value| -> Result<serde_json::Value> {
        let t = platform.enqueue_task(&id, command, &options)?;
        let tid = t["id"].as_str().context("id")?;
        platform
            .wait_task(&id, tid, Duration::from_secs(60))
            .with_context(logs)
    };

    let t = run(
        "start",
        serde_json::json!({"unit": "powernode-probe-svc.service"}),
    )?;
    ensure!(t["status"] == "complete", "{t}");
    ensure!(
        c.exec_ok(&["systemctl", "is-active", "powernode-probe-svc.service"])?
            .trim()
            == "active",
        "start task did not start the unit"
    );
    let t = run(
        "stop",
        serde_json::json!({"unit": "powernode-probe-svc.service"}),
    )?;
    ensure!(t["status"] == "complete", "{t}");
    let state = c.exec(&["systemctl", "is-active", "powernode-probe-svc.service"])?;
    ensure!(String::from_utf8_lossy(&state.stdout).trim() == "inactive");
    let t = run(
        "restart",
        serde_json::json!({"unit": "powernode-nonexistent.service"}),
    )?;
    ensure!(t["status"] == "failed", "{t}");
    ensure!(
        t["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("powernode-nonexistent.service"),
        "{t}"
    );
    // Units outside the privilege map: refused by polkit, and nothing happened.
    for unit in [
        "pn-other.service",
        "debug-shell.service",
        "powernode-mountd.service",
    ] {
        let t = run("start", serde_json::json!({ "unit": unit }))?;
        ensure!(t["status"] == "failed", "{unit}: {t}");
        let state = c.exec(&["systemctl", "is-active", unit])?;
        ensure!(
            String::from_utf8_lossy(&state.stdout).trim() != "active",
            "{unit} was started by a task"
        );
    }
    let t = run(
        "custom",
        serde_json::json!({"command": "id -u", "privilege_model": "privileged"}),
    )?;
    ensure!(t["status"] == "failed", "{t}");
    ensure!(
        t["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("privilege_model privileged is refused"),
        "{t}"
    );

    let t = run(
        "custom",
        serde_json::json!({"command": "echo hello; id -u; echo oops >&2; cat /persist/var/lib/powernode/pki/node.key"}),
    )?;
    // drop_to_nobody: a dynamic user, not root, that cannot read the node key.
    ensure!(t["status"] == "failed", "{t}");
    let msg = t["error_message"].as_str().unwrap_or("");
    let uid: Option<u32> = msg
        .split_once("hello\n")
        .and_then(|(_, rest)| rest.lines().next())
        .and_then(|l| l.trim().parse().ok());
    ensure!(
        uid.is_some_and(|u| u != 0) && msg.contains("oops") && msg.contains("Permission denied"),
        "{t}"
    );
    let t = run(
        "custom",
        serde_json::json!({"command": "echo hello; echo oops >&2"}),
    )?;
    ensure!(t["status"] == "complete", "{t}");
    ensure!(t["result"]["output"] == "hello\noops\n", "{t}");
    // Task output never reaches the journal.
    let journal = c.exec_ok(&["journalctl", "--no-pager", "-o", "cat"])?;
    ensure!(
        !journal.contains("hello\noops") && !journal.lines().any(|l| l.trim() == "oops"),
        "task output in the journal"
    );
    let t = run(
        "ssh_command",
        serde_json::json!({"command": "echo partial; exit 3"}),
    )?;
    ensure!(t["status"] == "failed", "{t}");
    let msg = t["error_message"].as_str().unwrap_or("");
    ensure!(
        msg.contains("exited with status 3") && msg.contains("partial"),
        "{msg}"
    );
    let t = run(
        "custom",
        serde_json::json!({"command": "sleep 30", "timeout_seconds": 1}),
    )?;
    ensure!(t["status"] == "failed", "{t}");
    ensure!(
        t["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 1s"),
        "{t}"
    );
    let big = run(
        "custom",
        serde_json::json!({"command": "head -c 200000 /dev/zero | tr '\\0' x"}),
    )?;
    ensure!(big["status"] == "complete", "{big}");
    ensure!(
        big["result"]["output_truncated"] == true
            && big["result"]["output_bytes"] == 200_000
            && big["result"]["output"].as_str().map(str::len) == Some(64 * 1024),
        "{}",
        big["result"]["output_bytes"]
    );

    // The privilege map (docs/ARCHITECTURE.md §2), from each daemon's uid under the real polkit:
    // no transient unit with a shell of its choosing, no debug shell.
    for user in powernode_integration_tests::DAEMON_USERS {
        let as_user = |argv: &[&str]| -> Result<std::process::Output> {
            let mut full = vec![
                "setpriv",
                "--reuid",
                user,
                "--regid",
                user,
                "--init-groups",
                "--",
            ];
            full.extend_from_slice(argv);
            c.exec(&full)
        };
        let shell = as_user(&[
            "systemctl",
            "--no-ask-password",
            "start",
            "debug-shell.service",
        ])?;
        ensure!(
            !shell.status.success(),
            "{user} started debug-shell.service"
        );
        let marker = format!("/run/pn-pwned-{user}");
        let transient = as_user(&[
            "systemd-run",
            "--no-ask-password",
            "--wait",
            "--collect",
            "/bin/sh",
            "-c",
            &format!("touch {marker}"),
        ])?;
        ensure!(
            !transient.status.success(),
            "{user} ran a transient unit: {}",
            String::from_utf8_lossy(&transient.stdout)
        );
        ensure!(
            !c.exec(&["test", "-e", &marker])?.status.success(),
            "{user}'s transient shell ran as root"
        );
        // systemd-mount is StartTransientUnit of a .mount: an arbitrary What= anywhere.
        let mount = as_user(&[
            "systemd-mount",
            "--no-ask-password",
            "-t",
            "tmpfs",
            "tmpfs",
            &format!("/run/pn-mnt-{user}"),
        ])?;
        ensure!(!mount.status.success(), "{user} had systemd mount a tmpfs");
    }
    let st = c.exec(&["systemctl", "is-active", "debug-shell.service"])?;
    ensure!(String::from_utf8_lossy(&st.stdout).trim() != "active");

    // Stop while a short task runs: it finishes inside the drain, the agent exits cleanly.
    let short = platform.enqueue_task(
        &id,
        "custom",
        &serde_json::json!({"command": "sleep 2; echo finished"}),
    )?;
    let long =
        platform.enqueue_task(&id, "custom", &serde_json::json!({"command": "sleep 120"}))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = platform.tasks(&id)?;
        if open
            .iter()
            .filter(|t| t["status"] == "acknowledged")
            .count()
            == 2
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "tasks not claimed: {open:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stop_started = Instant::now();
    c.exec_ok(&["systemctl", "stop", "powernode-agent.service"])?;
    println!("agent stopped in {:.1?}", stop_started.elapsed());
    let show = c.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "Result,ExecMainStatus",
        "powernode-agent.service",
    ])?;
    ensure!(
        show.contains("Result=success") && show.contains("ExecMainStatus=0"),
        "{show}\n{}",
        logs()
    );
    let s = platform.wait_task(
        &id,
        short["id"].as_str().context("id")?,
        Duration::from_secs(5),
    )?;
    ensure!(
        s["status"] == "complete" && s["result"]["output"] == "finished\n",
        "{s}"
    );
    let l = platform.wait_task(
        &id,
        long["id"].as_str().context("id")?,
        Duration::from_secs(5),
    )?;
    ensure!(l["status"] == "failed", "{l}");
    ensure!(
        l["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted: the agent stopped"),
        "{l}"
    );
    let unit = format!(
        "powernode-task@{}.service",
        long["id"].as_str().context("id")?
    );
    let st = c.exec(&["systemctl", "is-active", &unit])?;
    ensure!(
        String::from_utf8_lossy(&st.stdout).trim() != "active",
        "{unit} still running after the hand-back"
    );
    c.poweroff()?;
    Ok(())
}
