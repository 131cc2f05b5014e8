//! Certificate lifecycle on the host: the development platform issuing short-lived
//! certificates, a node enrolled with the CLI, `powernode-agent service` heartbeating on a
//! private bus, and `powernode-certd --once` rotating — on schedule, after being killed at each
//! step of a rotation, with the platform down, on an untrusted clock and after expiry.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode::pki::{CertInfo, Expect, PkiStore, check_certificate, key_from_pem};
use powernode_integration_tests::bus::PrivateBus;
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::{bin, describe, run};
use serde_json::Value;

struct Node {
    agent: Option<Child>,
    bus: PrivateBus,
    platform: DevPlatform,
    instance: String,
    root: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill().ok();
            a.wait().ok();
        }
    }
}

impl Node {
    /// Platform with `cert_ttl`, node enrolled through the CLI, agent heartbeating every second.
    fn start(cert_ttl: &str) -> Result<Node> {
        let platform = DevPlatform::start(&["--next-poll-seconds", "1", "--cert-ttl", cert_ttl])?;
        let bus = PrivateBus::start()?;
        let (root, instance) = platform.enrolled_node("pn-cert-")?;
        // Short retry deadline so "platform down" fails within the test's patience.
        fs::write(
            root.path().join("etc/powernode/agent.toml"),
            "[daemon]\nidle_exit_secs = 0\n[heartbeat]\ninterval_secs = 1\n[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 500\ndeadline_secs = 2\n",
        )?;
        let mut node = Node {
            agent: None,
            bus,
            platform,
            instance,
            root,
        };
        node.start_agent()?;
        Ok(node)
    }

    fn start_agent(&mut self) -> Result<()> {
        let log = fs::File::create(self.root.path().join("agent.log"))?;
        self.agent = Some(
            Command::new(bin("powernode-agent")?)
                .arg("service")
                .arg("--root")
                .arg(self.root.path())
                .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        Ok(())
    }

    fn agent_log(&self) -> String {
        fs::read_to_string(self.root.path().join("agent.log")).unwrap_or_default()
    }

    fn store(&self) -> PkiStore {
        PkiStore::new(self.root.path().join("persist/var/lib/powernode/pki"))
    }

    fn serial(&self) -> Result<String> {
        let c = self.store().load()?.context("not enrolled")?;
        Ok(CertInfo::from_pem(&c.cert_pem)?.serial)
    }

    /// The current key and certificate belong together and chain to the platform CA.
    fn assert_consistent(&self) -> Result<()> {
        let c = self.store().load()?.context("not enrolled")?;
        let key = key_from_pem(&c.key_pem)?;
        check_certificate(&c.cert_pem, &c.ca_chain_pem, &key, &Expect::default())?;
        Ok(())
    }

    fn certd(&self, args: &[&str], fault: Option<&str>) -> Result<Output> {
        let mut cmd = Command::new(bin("powernode-certd")?);
        cmd.args(["--once", "--json", "--root"])
            .arg(self.root.path())
            .args(args);
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address());
        if let Some(f) = fault {
            cmd.env("POWERNODE_FAULT", f);
        }
        run(&mut cmd)
    }

    fn certd_json(&self, args: &[&str]) -> Result<(Output, Value)> {
        let out = self.certd(args, None)?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("certd output: {}", describe(&out)))?;
        Ok((out, v))
    }

    fn issued(&self) -> Result<usize> {
        let rec = self
            .platform
            .instance(&self.instance)?
            .context("instance")?;
        Ok(rec["certificates_issued"].as_array().map_or(0, Vec::len))
    }

    /// Wait until a heartbeat made with `serial` reaches the platform.
    fn wait_heartbeat_with(&self, serial: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let rec = self
                .platform
                .instance(&self.instance)?
                .context("instance")?;
            if rec["last_heartbeat_serial"] == serial {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no heartbeat with serial {serial} in {timeout:?}: {rec}\nagent log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn rotation_happens_in_its_window_and_the_next_heartbeat_uses_it() -> Result<()> {
    let node = Node::start("40s")?;
    let s1 = node.serial()?;
    node.wait_heartbeat_with(&s1, Duration::from_secs(20))?;

    let (out, v) = node.certd_json(&[])?;
    ensure!(out.status.success() && v["state"] == "valid", "{v}");
    ensure!(node.issued()? == 1, "nothing rotated before it was due");
    let c = node.store().load()?.context("creds")?;
    let info = CertInfo::from_pem(&c.cert_pem)?;
    let renew_at = time::OffsetDateTime::parse(
        v["renew_at"].as_str().context("renew_at")?,
        &time::format_description::well_known::Rfc3339,
    )?;
    let frac = (renew_at - info.not_before).as_seconds_f64()
        / (info.not_after - info.not_before).as_seconds_f64();
    ensure!(
        (0.70..=0.80).contains(&frac),
        "renew_at at {frac:.3} of the lifetime"
    );

    let wait = renew_at - time::OffsetDateTime::now_utc();
    if wait.is_positive() {
        std::thread::sleep(Duration::try_from(wait)? + Duration::from_millis(300));
    }
    let (out, v) = node.certd_json(&[])?;
    ensure!(
        out.status.success() && v["state"] == "rotated",
        "{v} {}",
        describe(&out)
    );
    let s2 = node.serial()?;
    ensure!(s2 != s1 && v["serial"] == s2.as_str(), "{v}");
    ensure!(node.issued()? == 2);
    node.assert_consistent()?;
    // The agent was not restarted: its very next heartbeat presents the new certificate.
    let took = node.wait_heartbeat_with(&s2, Duration::from_secs(5))?;
    println!("rotated at {frac:.3} of the lifetime; agent switched within {took:?}");
    ensure!(
        node.agent_log().contains("credentials rotated"),
        "{}",
        node.agent_log()
    );
    Ok(())
}

#[test]
fn killed_at_any_step_the_node_keeps_a_working_key_and_certificate() -> Result<()> {
    let node = Node::start("1h")?;
    for point in [
        "rotate-after-key-write",
        "rotate-after-request",
        "rotate-mid-swap",
    ] {
        let before = node.serial()?;
        let out = node.certd(&["--force"], Some(point))?;
        ensure!(
            out.status.signal() == Some(9),
            "{point}: expected SIGKILL, got {}",
            describe(&out)
        );
        node.assert_consistent()?;
        let after = node.serial()?;
        // Killed before the swap, the old set is current; the platform still accepts it.
        ensure!(
            after == before,
            "{point}: current changed to {after} without a completed swap"
        );
        node.wait_heartbeat_with(&after, Duration::from_secs(10))?;
        // The next rotation completes normally over whatever the crash left behind.
        let (out, v) = node.certd_json(&["--force"])?;
        ensure!(
            out.status.success() && v["state"] == "rotated",
            "{point}: {v} {}",
            describe(&out)
        );
        node.assert_consistent()?;
        let new = node.serial()?;
        node.wait_heartbeat_with(&new, Duration::from_secs(10))?;
        println!("{point}: recovered, {before} -> {new}");
    }
    let gens = fs::read_dir(node.store().dir().join("gen"))?.count();
    ensure!(gens <= 2, "abandoned generations pruned: {gens} left");
    Ok(())
}

#[test]
fn platform_down_keeps_old_credentials_and_exits_5_then_recovers() -> Result<()> {
    let mut node = Node::start("1h")?;
    let before = node.serial()?;
    node.platform.stop()?;
    let (out, v) = node.certd_json(&["--force"])?;
    ensure!(
        out.status.code() == Some(5) && v["state"] == "failed",
        "{v}"
    );
    ensure!(
        v["error"].as_str().unwrap_or("").contains("not reached"),
        "{v}"
    );
    ensure!(node.serial()? == before);
    node.assert_consistent()?;
    // The platform comes back on the same address: the next run rotates, the agent follows.
    node.platform
        .restart(&["--next-poll-seconds", "1", "--cert-ttl", "1h"])?;
    let (out, v) = node.certd_json(&["--force"])?;
    ensure!(out.status.success() && v["state"] == "rotated", "{v}");
    let after = node.serial()?;
    ensure!(after != before);
    node.wait_heartbeat_with(&after, Duration::from_secs(15))?;
    Ok(())
}

#[test]
fn overdue_rotation_is_reported_on_every_heartbeat() -> Result<()> {
    // 40 s: "overdue" (renew time + a tenth of the lifetime) comes ~6 s before expiry, room for
    // the checks below on a loaded machine.
    let node = Node::start("40s")?;
    let agent = ("com.powernode.Agent1", "/com/powernode/Agent1");
    let state = || -> Result<String> {
        let out = powernode_integration_tests::bus::busctl(
            node.bus.address(),
            &powernode_integration_tests::bus::Caller::root(),
            &[
                "get-property",
                agent.0,
                agent.1,
                agent.0,
                "CertificateState",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("s ")
            .trim_matches('"')
            .to_string())
    };
    // No certd runs: once the renewal is late by a tenth of the lifetime, the agent says so.
    let deadline = Instant::now() + Duration::from_secs(50);
    while state()? != "overdue" {
        ensure!(
            Instant::now() < deadline,
            "never overdue: {}\n{}",
            state()?,
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let reports = node
        .agent_log()
        .matches("certificate rotation overdue")
        .count();
    ensure!(reports >= 2, "reported on each heartbeat, got {reports}");
    let (out, v) = node.certd_json(&[])?;
    ensure!(out.status.success() && v["state"] == "rotated", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while state()? != "valid" {
        ensure!(Instant::now() < deadline, "still {}", state()?);
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

#[test]
fn untrusted_clock_blocks_rotation_decisions() -> Result<()> {
    let node = Node::start("1h")?;
    let state = node.root.path().join("persist/var/lib/powernode");
    // The platform "proved" a time a day ahead of ours and NTP is not synchronised (no
    // timedated on the private bus): our clock is behind reality.
    let ahead = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    fs::write(
        state.join("clock.json"),
        serde_json::json!({"last_good": ahead.format(&time::format_description::well_known::Rfc3339)?}).to_string(),
    )?;
    let (out, v) = node.certd_json(&["--force"])?;
    ensure!(
        out.status.success() && v["state"] == "clock-untrusted",
        "{v}"
    );
    ensure!(v["error"].as_str().unwrap_or("").contains("NTP"), "{v}");
    ensure!(node.issued()? == 1, "no rotation on an untrusted clock");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o750))?;
    Ok(())
}

#[test]
fn expired_certificate_is_reported_and_kept() -> Result<()> {
    let mut node = Node::start("3s")?;
    let before = node.serial()?;
    std::thread::sleep(Duration::from_secs(4));
    if let Some(mut a) = node.agent.take() {
        a.kill().ok();
        a.wait().ok();
    }
    let (out, v) = node.certd_json(&[])?;
    ensure!(
        out.status.code() == Some(5),
        "expired + refused refresh exits 5: {v}"
    );
    ensure!(v["state"] == "failed", "{v}");
    // Nothing deleted: the lapsed set stays for a recovery path to replace.
    ensure!(node.serial()? == before);
    node.assert_consistent().ok(); // the certificate is expired now; consistency of key/cert:
    let c = node.store().load()?.context("creds kept")?;
    ensure!(c.key_pem.contains("PRIVATE KEY"));
    Ok(())
}

#[test]
fn expired_certificate_is_recovered_by_re_enrollment() -> Result<()> {
    let mut node = Node::start("3s")?;
    if let Some(mut a) = node.agent.take() {
        a.kill().ok();
        a.wait().ok();
    }
    let before = node.serial()?;
    // The operator supplies a new bootstrap token for the same instance through the identity.
    let fresh = node.platform.token_for(&node.instance)?;
    let identity = serde_json::json!({
        "instance_uuid": node.instance,
        "platform_url": node.platform.url,
        "ca_pem": node.platform.ca_pem,
        "bootstrap_token": fresh.token,
        "instance_name": null,
        "source": "identity-cfg",
        "evidence": "test",
        "discovered_at": "2026-01-01T00:00:00Z",
    });
    let run_dir = node.root.path().join("run/powernode/identity");
    fs::create_dir_all(&run_dir)?;
    fs::write(run_dir.join("identity.json"), identity.to_string())?;
    fs::set_permissions(
        run_dir.join("identity.json"),
        fs::Permissions::from_mode(0o600),
    )?;
    let log = fs::File::create(node.root.path().join("enrolld.log"))?;
    let mut enrolld = Command::new(bin("powernode-enrolld")?)
        .arg("--root")
        .arg(node.root.path())
        .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    std::thread::sleep(Duration::from_secs(4));
    let (out, v) = node.certd_json(&[])?;
    enrolld.kill().ok();
    enrolld.wait().ok();
    ensure!(
        out.status.success() && v["state"] == "re-enrolled",
        "{v} {}\nenrolld:\n{}",
        describe(&out),
        fs::read_to_string(node.root.path().join("enrolld.log")).unwrap_or_default()
    );
    let after = node.serial()?;
    ensure!(after != before, "a new certificate is current");
    node.assert_consistent()?;
    node.start_agent()?;
    node.wait_heartbeat_with(&after, Duration::from_secs(10))?;
    Ok(())
}
