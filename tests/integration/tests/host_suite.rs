//! The daemons together on the host: identityd, enrolld and `powernode-agent service` on a
//! private system bus (the project's real policy), a node root in a temporary directory whose
//! identity comes from fw-cfg fixture files, and the development platform. Covers identity →
//! enrollment → heartbeats end to end, the Agent1 interface and its policy, restarts with PKI
//! present, and heartbeat failures becoming visible.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::bus::{Caller, PrivateBus, busctl, is_access_denied};
use powernode_integration_tests::devplatform::{DevPlatform, Token};
use powernode_integration_tests::{bin, describe, run};
use serde_json::Value;

const IDENTITY: (&str, &str) = ("com.powernode.Identity1", "/com/powernode/Identity1");
const ENROLL: (&str, &str) = ("com.powernode.Enroll1", "/com/powernode/Enroll1");
const AGENT: (&str, &str) = ("com.powernode.Agent1", "/com/powernode/Agent1");

const STARTUP: Duration = Duration::from_secs(30);

/// A process the test started, with its log file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A whole node: bus, platform, node root and the daemons. Kills the daemons on drop (before
/// the bus and the platform go).
struct Node {
    procs: Vec<Proc>,
    bus: PrivateBus,
    platform: DevPlatform,
    token: Token,
    root: tempfile::TempDir,
    logs: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Err(e) = p.child.kill() {
                eprintln!("killing {}: {e}", p.name);
            }
            if let Err(e) = p.child.wait() {
                eprintln!("reaping {}: {e}", p.name);
            }
        }
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::create_dir_all(path.parent().context("no parent")?)?;
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The node root: fw-cfg identity, /proc facts (no cmdline), config, run and PKI directories.
fn build_root(root: &Path, platform: &DevPlatform, token: &Token) -> Result<()> {
    let fw = root.join("sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode");
    for (key, value) in [
        ("instance_uuid", token.instance_uuid.as_str()),
        ("bootstrap_token", token.token.as_str()),
        ("platform_url", platform.url.as_str()),
        ("ca_pem", platform.ca_pem.as_str()),
    ] {
        write(&fw.join(key).join("raw"), value)?;
    }
    fs::create_dir_all(root.join("proc/sys/kernel/random"))?;
    for f in ["loadavg", "meminfo", "uptime", "sys/kernel/random/boot_id"] {
        symlink(Path::new("/proc").join(f), root.join("proc").join(f))?;
    }
    write(
        &root.join("etc/powernode/agent.toml"),
        "[daemon]\nidle_exit_secs = 0\n",
    )?;
    fs::create_dir_all(root.join("run/powernode"))?;
    let pki = root.join("persist/var/lib/powernode/pki");
    fs::create_dir_all(&pki)?;
    fs::set_permissions(&pki, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn host_boot_id() -> Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Poll `f` until it yields a value or `timeout` passes; the error carries the last state seen.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f()? {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Node {
    /// Bus, platform (`--next-poll-seconds next_poll`), root, identityd, enrolld, agent.
    fn start(next_poll: u64) -> Result<Node> {
        let bus = PrivateBus::start()?;
        let platform = DevPlatform::start(&["--next-poll-seconds", &next_poll.to_string()])?;
        let token = platform.token(None)?;
        let root = tempfile::Builder::new().prefix("pn-node-").tempdir()?;
        let logs = tempfile::Builder::new().prefix("pn-logs-").tempdir()?;
        build_root(root.path(), &platform, &token)?;
        let mut node = Node {
            procs: Vec::new(),
            bus,
            platform,
            token,
            root,
            logs,
        };
        node.spawn("identityd", "powernode-identityd", &[])?;
        node.spawn("enrolld", "powernode-enrolld", &[])?;
        node.wait_name(IDENTITY.0)?;
        node.wait_name(ENROLL.0)?;
        node.start_agent()?;
        Ok(node)
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn uuid(&self) -> &str {
        &self.token.instance_uuid
    }

    /// Starts `binary [args…] --root ROOT` on the private bus, output to a log file.
    fn spawn(&mut self, name: &str, binary: &str, args: &[&str]) -> Result<()> {
        let n = self.procs.iter().filter(|p| p.name == name).count();
        let log = self.logs.path().join(format!("{name}.{n}.log"));
        let out = fs::File::create(&log)?;
        let child = Command::new(bin(binary)?)
            .args(args)
            .arg("--root")
            .arg(self.root())
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .env("RUST_LOG", "info")
            .env_remove("POWERNODE_ROOT")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        self.spawn("agent", "powernode-agent", &["service"])?;
        self.wait_name(AGENT.0)
    }

    /// SIGTERM the running agent and wait; it must exit 0.
    fn stop_agent(&mut self) -> Result<()> {
        let p = self
            .procs
            .iter_mut()
            .rev()
            .find(|p| p.name == "agent")
            .context("no agent started")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(p.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let st = p.child.wait()?;
        ensure!(st.success(), "agent exited with {st} on SIGTERM");
        Ok(())
    }

    /// Fails if a daemon the test started has exited.
    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(st) = p.child.try_wait()? {
                // The agent that was stopped on purpose is not "dead".
                if p.name == "agent" && st.success() {
                    continue;
                }
                bail!(
                    "{} exited unexpectedly ({st}); log:\n{}",
                    p.name,
                    fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    fn all_logs(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            s.push_str(&format!(
                "=== {} ({})\n{}\n",
                p.name,
                p.log.display(),
                fs::read_to_string(&p.log).unwrap_or_default()
            ));
        }
        s.push_str(&format!("=== devplatform\n{}\n", self.platform.log()));
        s
    }

    /// Adds every daemon log to a failure.
    fn verdict(&self, r: Result<()>) -> Result<()> {
        r.map_err(|e| e.context(format!("logs:\n{}", self.all_logs())))
    }

    fn busctl(&self, caller: &Caller, args: &[&str]) -> Result<std::process::Output> {
        busctl(self.bus.address(), caller, args)
    }

    fn wait_name(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.check_alive()?;
            let out = self.busctl(&Caller::root(), &["list", "--no-legend"])?;
            let listed = String::from_utf8_lossy(&out.stdout);
            if out.status.success()
                && listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not appear on the bus in {STARTUP:?}:\n{}\nlogs:\n{}",
                    describe(&out),
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A property as JSON (`busctl --json=short get-property` → its `data`), as root.
    fn prop(&self, (name, path): (&str, &str), prop: &str) -> Result<Value> {
        let out = self.busctl(
            &Caller::root(),
            &["--json=short", "get-property", name, path, name, prop],
        )?;
        ensure!(
            out.status.success(),
            "get-property {name} {prop}:\n{}",
            describe(&out)
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("busctl output:\n{}", describe(&out)))?;
        Ok(v["data"].clone())
    }

    fn prop_str(&self, svc: (&str, &str), prop: &str) -> Result<String> {
        let v = self.prop(svc, prop)?;
        v.as_str()
            .map(str::to_string)
            .with_context(|| format!("{}.{prop} is not a string: {v}", svc.0))
    }

    fn prop_u64(&self, svc: (&str, &str), prop: &str) -> Result<u64> {
        let v = self.prop(svc, prop)?;
        v.as_u64()
            .with_context(|| format!("{}.{prop} is not an integer: {v}", svc.0))
    }

    /// `GetAll` of a service's interface, raw busctl output.
    fn get_all(&self, (name, path): (&str, &str)) -> Result<String> {
        let out = self.busctl(
            &Caller::root(),
            &[
                "--json=short",
                "call",
                name,
                path,
                "org.freedesktop.DBus.Properties",
                "GetAll",
                "s",
                name,
            ],
        )?;
        ensure!(out.status.success(), "GetAll {name}:\n{}", describe(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn heartbeat_now(&self, caller: &Caller) -> Result<std::process::Output> {
        self.busctl(caller, &["call", AGENT.0, AGENT.1, AGENT.0, "HeartbeatNow"])
    }

    /// Waits for Agent1 to be `running` with at least `count` heartbeats; returns the count.
    fn wait_agent_running(&mut self, count: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let state = self.prop_str(AGENT, "State")?;
            let n = self.prop_u64(AGENT, "HeartbeatCount")?;
            if state == "running" && n >= count {
                return Ok(n);
            }
            if Instant::now() > deadline {
                let err = self.prop_str(AGENT, "LastError")?;
                bail!(
                    "agent not running with {count} heartbeats in {timeout:?}: \
                     state {state}, count {n}, last error {err:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn platform_record(&self) -> Result<Value> {
        self.platform
            .instance(self.uuid())?
            .with_context(|| format!("platform has no record of {}", self.uuid()))
    }

    fn issued_serials(&self) -> Result<Vec<String>> {
        Ok(self.platform_record()?["certificates_issued"]
            .as_array()
            .context("certificates_issued")?
            .iter()
            .filter_map(|c| c["serial"].as_str().map(str::to_string))
            .collect())
    }

    fn agent_cli(&self, args: &[&str]) -> Result<Value> {
        let out = run(Command::new(bin("powernode-agent")?)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .env_remove("POWERNODE_ROOT"))?;
        ensure!(
            out.status.success(),
            "powernode-agent {args:?}:\n{}",
            describe(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !text.contains(&self.token.token)
                && !String::from_utf8_lossy(&out.stderr).contains(&self.token.token),
            "powernode-agent {args:?} printed the bootstrap token:\n{}",
            describe(&out)
        );
        serde_json::from_str(text.trim()).with_context(|| describe(&out))
    }
}

#[test]
fn node_resolves_enrolls_and_heartbeats() -> Result<()> {
    let mut node = Node::start(1)?;
    let r = (|| -> Result<()> {
        let uuid = node.uuid().to_string();
        let rec = node
            .platform
            .wait_heartbeats(&uuid, 2, Duration::from_secs(30))?;
        ensure!(
            rec["boot_id"] == host_boot_id()?.as_str(),
            "heartbeat boot_id is not the kernel's: {rec}"
        );
        ensure!(
            rec["agent_version"].as_str().is_some_and(|v| !v.is_empty()),
            "no agent_version: {rec}"
        );
        ensure!(
            rec["memory_free_kb"].as_u64().is_some_and(|m| m > 0),
            "no memory_free_kb: {rec}"
        );
        ensure!(
            rec["load_average"]
                .as_str()
                .is_some_and(|l| l.split(' ').count() == 3),
            "no load_average: {rec}"
        );
        ensure!(rec["uptime_seconds"].as_u64().is_some(), "no uptime: {rec}");

        node.wait_agent_running(1, Duration::from_secs(10))?;
        ensure!(node.prop_str(AGENT, "InstanceId")? == uuid);
        ensure!(node.prop_str(AGENT, "LastError")?.is_empty());
        ensure!(!node.prop_str(AGENT, "LastHeartbeat")?.is_empty());
        ensure!(node.prop_u64(AGENT, "NextPollSeconds")? == 1);

        ensure!(node.prop_str(IDENTITY, "InstanceId")? == uuid);
        ensure!(node.prop_str(IDENTITY, "Source")? == "fw-cfg");
        ensure!(node.prop_str(IDENTITY, "PlatformUrl")? == node.platform.url);
        ensure!(node.prop_str(IDENTITY, "LastError")?.is_empty());

        ensure!(node.prop(ENROLL, "Enrolled")? == true, "Enroll1.Enrolled");
        ensure!(node.prop_str(ENROLL, "InstanceId")? == uuid);
        let issued = node.issued_serials()?;
        ensure!(issued.len() == 1, "platform issued {issued:?}");
        ensure!(
            node.prop_str(ENROLL, "CertificateSerial")? == issued[0],
            "Enroll1.CertificateSerial differs from the platform's {issued:?}"
        );
        ensure!(node.prop_str(ENROLL, "LastError")?.is_empty());

        // The token never leaves identity.json: not on the bus, not in introspect, not in logs.
        let token = node.token.token.clone();
        for svc in [IDENTITY, ENROLL, AGENT] {
            let all = node.get_all(svc)?;
            ensure!(
                all.contains(&uuid) && !all.contains(&token),
                "{} properties leak the token or miss the id: {all}",
                svc.0
            );
        }
        let root = node.root().display().to_string();
        let intro = node.agent_cli(&["introspect", "--json", "--root", &root])?;
        ensure!(intro["identity"]["source"] == "fw-cfg", "{intro}");
        ensure!(
            intro["identity"]["instance_uuid"] == uuid.as_str(),
            "{intro}"
        );
        ensure!(
            intro["identity"]["bootstrap_token"] == "<redacted>",
            "{intro}"
        );
        ensure!(intro["pki"]["enrolled"] == true, "{intro}");
        ensure!(
            intro["pki"]["certificate"]["serial"] == issued[0].as_str(),
            "{intro}"
        );
        for p in &node.procs {
            let log = fs::read_to_string(&p.log)?;
            ensure!(
                !log.contains(&token),
                "{} logged the bootstrap token",
                p.name
            );
        }

        let cache = node.root().join("run/powernode/identity/identity.json");
        let mode = fs::metadata(&cache)?.permissions().mode() & 0o7777;
        ensure!(mode == 0o640, "identity.json mode {mode:o}");
        ensure!(
            fs::read_to_string(&cache)?.contains(&token),
            "identity.json should cache the token for enrolld"
        );
        Ok(())
    })();
    node.verdict(r)
}

#[test]
fn heartbeat_now_is_root_only() -> Result<()> {
    // 30 s cadence: only the D-Bus call explains a prompt extra heartbeat.
    let mut node = Node::start(30)?;
    let r = (|| -> Result<()> {
        let before = node.wait_agent_running(1, Duration::from_secs(30))?;
        ensure!(node.prop_u64(AGENT, "NextPollSeconds")? == 30);
        let on_platform = node.platform_record()?["heartbeat_count"]
            .as_u64()
            .context("heartbeat_count")?;

        let out = node.heartbeat_now(&Caller::nobody())?;
        ensure!(
            is_access_denied(&out),
            "HeartbeatNow as nobody must be refused by the bus policy:\n{}",
            describe(&out)
        );

        let out = node.heartbeat_now(&Caller::root())?;
        ensure!(
            out.status.success(),
            "HeartbeatNow as root:\n{}",
            describe(&out)
        );
        let started = Instant::now();
        let after = wait_for("HeartbeatCount to rise", Duration::from_secs(5), || {
            let n = node.prop_u64(AGENT, "HeartbeatCount")?;
            Ok(if n > before {
                Ok(n)
            } else {
                Err(format!("count {n}"))
            })
        })?;
        ensure!(
            after == before + 1,
            "one call, one heartbeat: {before} → {after} (refused call must not count)"
        );
        node.platform
            .wait_heartbeats(node.uuid(), on_platform + 1, Duration::from_secs(5))?;
        eprintln!("HeartbeatNow answered in {:?}", started.elapsed());

        // The refused call did nothing: no further beat within a few seconds.
        std::thread::sleep(Duration::from_secs(2));
        ensure!(node.prop_u64(AGENT, "HeartbeatCount")? == after);
        Ok(())
    })();
    node.verdict(r)
}

#[test]
fn status_reports_the_running_agent() -> Result<()> {
    let mut node = Node::start(1)?;
    let r = (|| -> Result<()> {
        node.wait_agent_running(1, Duration::from_secs(30))?;
        let s = node.agent_cli(&["status", "--json"])?;
        ensure!(s["command"] == "status" && s["status"] == "ok", "{s}");
        ensure!(s["exit_code"] == 0, "{s}");
        ensure!(s["state"] == "running", "{s}");
        ensure!(s["instance_id"] == node.uuid(), "{s}");
        ensure!(s["heartbeat_count"].as_u64().is_some_and(|n| n >= 1), "{s}");
        ensure!(s["next_poll_seconds"] == 1, "{s}");
        ensure!(
            s["last_heartbeat"].as_str().is_some_and(|t| !t.is_empty()),
            "{s}"
        );
        Ok(())
    })();
    node.verdict(r)
}

#[test]
fn restarted_agent_reuses_its_pki() -> Result<()> {
    let mut node = Node::start(1)?;
    let r = (|| -> Result<()> {
        let uuid = node.uuid().to_string();
        let rec = node
            .platform
            .wait_heartbeats(&uuid, 2, Duration::from_secs(30))?;
        let beats = rec["heartbeat_count"].as_u64().context("heartbeat_count")?;
        let pki = node.root().join("persist/var/lib/powernode/pki");
        let crt = fs::read(pki.join("node.crt"))?;
        let key = fs::read(pki.join("node.key"))?;

        node.stop_agent()?;
        node.start_agent()?;
        let rec = node
            .platform
            .wait_heartbeats(&uuid, beats + 2, Duration::from_secs(30))?;
        node.wait_agent_running(1, Duration::from_secs(10))?;
        ensure!(node.prop_str(AGENT, "InstanceId")? == uuid);
        let issued = node.issued_serials()?;
        ensure!(
            issued.len() == 1,
            "restart with PKI present enrolled again: {issued:?}"
        );
        ensure!(fs::read(pki.join("node.crt"))? == crt, "node.crt changed");
        ensure!(fs::read(pki.join("node.key"))? == key, "node.key changed");
        ensure!(
            rec["boot_id"] == host_boot_id()?.as_str(),
            "boot_id after an agent restart must still be the kernel's: {rec}"
        );
        Ok(())
    })();
    node.verdict(r)
}

/// Serve the platform again from `state` on `listen` (same port, same CA); returns its URL.
fn restart_platform(node: &mut Node, listen: &str) -> Result<String> {
    let log = node.logs.path().join("devplatform-restarted.log");
    let mut child = Command::new(bin("powernode-devplatform")?)
        .arg("serve")
        .arg("--state")
        .arg(&node.platform.state)
        .args(["--listen", listen, "--next-poll-seconds", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    node.procs.push(Proc {
        name: "devplatform-restarted".into(),
        child,
        log,
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + STARTUP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .context("restarted devplatform printed no URL")?;
        if let Some(u) = line.strip_prefix("URL ") {
            return Ok(u.to_string());
        }
    }
}

#[test]
fn heartbeat_failures_are_visible_and_recover() -> Result<()> {
    let mut node = Node::start(1)?;
    let r = (|| -> Result<()> {
        let uuid = node.uuid().to_string();
        node.platform
            .wait_heartbeats(&uuid, 2, Duration::from_secs(30))?;
        node.wait_agent_running(1, Duration::from_secs(10))?;
        let url = node.platform.url.clone();
        let listen = url
            .strip_prefix("https://")
            .context("platform URL")?
            .to_string();

        node.platform.stop()?;
        let err = wait_for("Agent1 degraded", Duration::from_secs(15), || {
            node.check_alive()?;
            let state = node.prop_str(AGENT, "State")?;
            let err = node.prop_str(AGENT, "LastError")?;
            Ok(if state == "degraded" && !err.is_empty() {
                Ok(err)
            } else {
                Err(format!("state {state}, last error {err:?}"))
            })
        })?;
        ensure!(
            (err.contains("unreachable") || err.contains("not reached")) && err.contains(&listen),
            "LastError should say which platform is unreachable: {err:?}"
        );
        let s = node.agent_cli(&["status", "--json"])?;
        ensure!(
            s["state"] == "degraded" && s["last_error"] == err.as_str(),
            "{s}"
        );

        // Same state (same CA and records), same port: the node recovers by itself.
        let before = node.platform_record()?["heartbeat_count"]
            .as_u64()
            .context("heartbeat_count")?;
        let again = restart_platform(&mut node, &listen)?;
        ensure!(
            again == url,
            "restarted platform on {again}, expected {url}"
        );
        wait_for("Agent1 running again", Duration::from_secs(15), || {
            node.check_alive()?;
            let state = node.prop_str(AGENT, "State")?;
            let err = node.prop_str(AGENT, "LastError")?;
            Ok(if state == "running" && err.is_empty() {
                Ok(())
            } else {
                Err(format!("state {state}, last error {err:?}"))
            })
        })?;
        node.platform
            .wait_heartbeats(&uuid, before + 2, Duration::from_secs(15))?;
        ensure!(node.issued_serials()?.len() == 1, "recovery re-enrolled");
        Ok(())
    })();
    node.verdict(r)
}
