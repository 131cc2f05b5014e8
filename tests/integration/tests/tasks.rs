//! The task loop of `powernode-agent service` against the development platform on the host:
//! claim → run → report for the commands that need no systemd, validation failures reported
//! with their reason, two agents with the same identity never both running a task, and crash
//! recovery from the journal (`POWERNODE_FAULT=task-claimed` kills the agent right after a
//! successful claim). Commands that act through systemd run in the container tier
//! (`tasks_systemd.rs`); here they must fail with a clear reason because no systemd answers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::bin;
use powernode_integration_tests::bus::{Caller, PrivateBus, busctl};
use powernode_integration_tests::devplatform::DevPlatform;
use serde_json::{Value, json};

const AGENT: &str = "com.powernode.Agent1";
const WAIT: Duration = Duration::from_secs(30);

/// An agent process on its own private bus, polling tasks every second.
struct Agent {
    child: Child,
    log: PathBuf,
    bus: PrivateBus,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("killing agent: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping agent: {e}");
        }
    }
}

fn configure(root: &Path) -> Result<()> {
    let d = root.join("etc/powernode/agent.toml.d");
    fs::create_dir_all(&d)?;
    fs::write(
        d.join("50-test.toml"),
        "[tasks]\npoll_secs = 1\nmax_concurrent = 2\ndrain_secs = 5\n[heartbeat]\ninterval_secs = 5\n",
    )?;
    Ok(())
}

impl Agent {
    fn start(root: &Path, tag: &str, fault: Option<&str>) -> Result<Agent> {
        let bus = PrivateBus::start()?;
        let log = root.join(format!("agent-{tag}.log"));
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(bin("powernode-agent")?);
        cmd.args(["service", "--root"])
            .arg(root)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("POWERNODE_FAULT")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some(f) = fault {
            cmd.env("POWERNODE_FAULT", f);
        }
        let child = cmd.spawn().context("starting the agent")?;
        Ok(Agent { child, log, bus })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn prop(&self, name: &str) -> Result<Value> {
        let out = busctl(
            self.bus.address(),
            &Caller::root(),
            &[
                "--json=short",
                "get-property",
                AGENT,
                "/com/powernode/Agent1",
                AGENT,
                name,
            ],
        )?;
        ensure!(
            out.status.success(),
            "get-property {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["data"].clone())
    }

    /// Wait for the process to exit by itself (a fault point); returns how it ended.
    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("agent still running after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn ids(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect()
}

fn journal(root: &Path) -> Result<Value> {
    let p = root.join("persist/var/lib/powernode/tasks_state.json");
    match fs::read(&p) {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({"inflight": {}})),
        Err(e) => Err(e.into()),
    }
}

#[test]
fn tasks_are_claimed_run_and_reported_with_reasons() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-")?;
    configure(root.path())?;
    let cases: Vec<(&str, Value)> = vec![
        ("provision", json!({})),
        ("format_disk", json!({})),
        ("restart", json!({"unit": "a;reboot.service"})),
        ("custom", json!({})),
        ("stop", json!({"unit": "nginx.service"})),
        ("sync_modules", json!({})),
    ];
    let mut queued = Vec::new();
    for (cmd, opts) in &cases {
        queued.push(platform.enqueue_task(&id, cmd, opts)?);
    }
    let agent = Agent::start(root.path(), "a", None)?;
    let mut ended = Vec::new();
    for t in &queued {
        let tid = t["id"].as_str().context("id")?;
        let r = platform.wait_task(&id, tid, WAIT);
        ended.push(r.with_context(|| agent.log())?);
    }
    let by_cmd = |c: &str| -> &Value {
        ended
            .iter()
            .find(|t| t["command"] == c)
            .unwrap_or(&Value::Null)
    };
    let p = by_cmd("provision");
    assert_eq!(p["status"], "complete", "{p}");
    assert_eq!(p["result"]["status"], "noop_passthrough", "{p}");
    assert!(
        p["claimed_by_serial"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let expect_fail = [
        ("format_disk", "unknown_command: format_disk"),
        ("restart", "invalid_options: unit \"a;reboot.service\""),
        ("custom", "invalid_options: command is required"),
        // No systemd on this bus: the reason names who did not answer.
        ("stop", "org.freedesktop.systemd1"),
        ("sync_modules", "com.powernode.Mount1"),
    ];
    for (cmd, want) in expect_fail {
        let t = by_cmd(cmd);
        assert_eq!(t["status"], "failed", "{cmd}: {t}");
        let msg = t["error_message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{cmd}: {msg:?} should contain {want:?}");
    }
    // Every task was claimed once and only once.
    for t in &ended {
        let acks = t["events"]
            .as_array()
            .map(|e| e.iter().filter(|e| e["type"] == "acknowledged").count());
        assert_eq!(acks, Some(1), "{t}");
    }
    assert_eq!(
        journal(root.path())?["inflight"],
        json!({}),
        "journal drained"
    );
    assert_eq!(agent.prop("TasksCompleted")?, json!(1));
    assert_eq!(agent.prop("TasksFailed")?, json!(5));
    assert_eq!(agent.prop("InFlightTasks")?, json!(0));
    Ok(())
}

#[test]
fn two_agents_with_one_identity_never_both_run_a_task() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-twin-")?;
    configure(root.path())?;
    // The twin: the same credentials in a second root (its own journal, its own bus).
    let twin = tempfile::Builder::new()
        .prefix("pn-tasks-twin2-")
        .tempdir()?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", root.path().display()))
        .arg(twin.path())
        .status()?;
    ensure!(status.success(), "cp -a failed");
    const N: usize = 24;
    let mut queued = Vec::new();
    for _ in 0..N {
        queued.push(platform.enqueue_task(&id, "provision", &json!({}))?);
    }
    let a = Agent::start(root.path(), "a", None)?;
    let b = Agent::start(twin.path(), "b", None)?;
    for tid in ids(&queued) {
        let t = platform
            .wait_task(&id, &tid, WAIT)
            .with_context(|| format!("a:\n{}\nb:\n{}", a.log(), b.log()))?;
        assert_eq!(t["status"], "complete", "{t}");
    }
    let (la, lb) = (a.log(), b.log());
    for tid in ids(&queued) {
        let needle = tid.as_str();
        let ra = la
            .lines()
            .filter(|l| l.contains("running task") && l.contains(needle))
            .count();
        let rb = lb
            .lines()
            .filter(|l| l.contains("running task") && l.contains(needle))
            .count();
        assert_eq!(ra + rb, 1, "task {tid} ran {ra}× in a and {rb}× in b");
    }
    let conflicts: u64 = platform
        .tasks(&id)?
        .iter()
        .map(|t| t["claim_conflicts"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("claim conflicts (lost races, answered 409): {conflicts}");
    Ok(())
}

#[test]
fn a_crash_after_the_claim_is_recovered_from_the_journal() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-crash-")?;
    configure(root.path())?;

    // Idempotent work is re-run after the crash.
    let t = platform.enqueue_task(&id, "provision", &json!({}))?;
    let tid = t["id"].as_str().context("id")?.to_string();
    let mut a = Agent::start(root.path(), "crash1", Some("task-claimed"))?;
    let st = a.wait_exit(WAIT)?;
    ensure!(!st.success(), "the fault point must kill the agent: {st}");
    let stored = platform
        .tasks(&id)?
        .into_iter()
        .find(|x| x["id"] == tid.as_str())
        .context("task")?;
    assert_eq!(stored["status"], "acknowledged", "{stored}");
    assert!(
        journal(root.path())?["inflight"].get(&tid).is_some(),
        "claim journaled before it was sent"
    );
    drop(a);
    let b = Agent::start(root.path(), "recover1", None)?;
    let done = platform
        .wait_task(&id, &tid, WAIT)
        .with_context(|| b.log())?;
    assert_eq!(done["status"], "complete", "{done}");
    assert!(
        b.log()
            .contains("running a claimed task interrupted by a restart")
    );
    drop(b);

    // A shell command is not re-run: it is reported as interrupted.
    let t = platform.enqueue_task(&id, "custom", &json!({"command": "touch /tmp/pn-never"}))?;
    let tid = t["id"].as_str().context("id")?.to_string();
    let mut c = Agent::start(root.path(), "crash2", Some("task-claimed"))?;
    c.wait_exit(WAIT)?;
    drop(c);
    let d = Agent::start(root.path(), "recover2", None)?;
    let done = platform
        .wait_task(&id, &tid, WAIT)
        .with_context(|| d.log())?;
    assert_eq!(done["status"], "failed", "{done}");
    let msg = done["error_message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("interrupted") && msg.contains("not idempotent"),
        "{msg}"
    );
    let j = journal(root.path())?;
    assert_eq!(j["inflight"], json!({}), "journal drained: {j}");
    Ok(())
}

/// How many times the platform recorded a claim of `task`.
fn claims(task: &Value) -> usize {
    task["events"].as_array().map_or(0, |e| {
        e.iter().filter(|e| e["type"] == "acknowledged").count()
    })
}

/// Killed between the journal write and the acknowledge: the task never ran and is still
/// pending. The next start claims it once and runs it once — not run unclaimed, not twice.
#[test]
fn a_task_journaled_but_never_claimed_is_claimed_then_run_once() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-unclaimed-")?;
    configure(root.path())?;
    let t = platform.enqueue_task(&id, "provision", &json!({}))?;
    let tid = t["id"].as_str().context("id")?.to_string();
    let mut a = Agent::start(root.path(), "crash", Some("task-journaled"))?;
    ensure!(
        !a.wait_exit(WAIT)?.success(),
        "the fault point must kill the agent"
    );
    let j = journal(root.path())?;
    ensure!(j["inflight"][&tid]["claimed"] == false, "{j}");
    let stored = platform.tasks(&id)?;
    let stored = stored
        .iter()
        .find(|x| x["id"] == tid.as_str())
        .context("task")?;
    ensure!(stored["status"] == "pending", "{stored}");
    drop(a);

    let b = Agent::start(root.path(), "recover", None)?;
    let done = platform
        .wait_task(&id, &tid, WAIT)
        .with_context(|| b.log())?;
    ensure!(done["status"] == "complete", "{done}");
    ensure!(
        b.log()
            .contains("claiming a journaled task whose claim never landed"),
        "{}",
        b.log()
    );
    let stored = platform.tasks(&id)?;
    let stored = stored
        .iter()
        .find(|x| x["id"] == tid.as_str())
        .context("task")?;
    ensure!(
        claims(stored) == 1,
        "claimed {} times: {stored}",
        claims(stored)
    );
    ensure!(journal(root.path())?["inflight"] == json!({}));
    Ok(())
}

/// Tasks the platform's own executor took (`running`) are the platform's: the node never
/// claims or runs them, whether it sees them first in the list or in its journal.
#[test]
fn tasks_the_server_runs_are_never_run_by_the_node() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-server-")?;
    configure(root.path())?;
    // Seen first in the list.
    let listed = platform.enqueue_task(&id, "provision", &json!({}))?;
    let listed_id = listed["id"].as_str().context("id")?.to_string();
    platform.dispatch_task(&listed_id)?;
    // Journaled (the agent was killed before its claim), then taken by the server.
    let journaled = platform.enqueue_task(&id, "provision", &json!({}))?;
    let journaled_id = journaled["id"].as_str().context("id")?.to_string();
    let mut a = Agent::start(root.path(), "crash", Some("task-journaled"))?;
    ensure!(
        !a.wait_exit(WAIT)?.success(),
        "the fault point must kill the agent"
    );
    drop(a);
    platform.dispatch_task(&journaled_id)?;

    let b = Agent::start(root.path(), "watch", None)?;
    let deadline = Instant::now() + WAIT;
    while !b.log().contains("the platform runs this task itself") {
        ensure!(
            Instant::now() < deadline,
            "journal entry not resolved:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A few more polls (poll_secs = 1) to give a wrong claim every chance.
    std::thread::sleep(Duration::from_secs(3));
    for tid in [&listed_id, &journaled_id] {
        let stored = platform.tasks(&id)?;
        let t = stored
            .iter()
            .find(|x| x["id"] == tid.as_str())
            .context("task")?;
        ensure!(
            t["status"] == "running" && claims(t) == 0,
            "{t}\n{}",
            b.log()
        );
    }
    ensure!(journal(root.path())?["inflight"] == json!({}));
    ensure!(b.prop("TasksCompleted")? == json!(0), "{}", b.log());
    Ok(())
}

#[test]
fn a_corrupt_journal_is_reported_and_nothing_is_claimed() -> Result<()> {
    let platform = DevPlatform::start(&[])?;
    let (root, id) = platform.enrolled_node("pn-tasks-torn-")?;
    configure(root.path())?;
    let j = root
        .path()
        .join("persist/var/lib/powernode/tasks_state.json");
    fs::write(&j, b"{\"schema_version\":1,\"inflight\":{\"x\":")?;
    let t = platform.enqueue_task(&id, "provision", &json!({}))?;
    let agent = Agent::start(root.path(), "torn", None)?;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut last_error = Value::Null;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        if agent.log().contains("task journal") {
            last_error = json!("seen");
            break;
        }
    }
    assert_eq!(last_error, json!("seen"), "log:\n{}", agent.log());
    let stored = platform.tasks(&id)?;
    assert_eq!(stored[0]["id"], t["id"]);
    assert_eq!(
        stored[0]["status"], "pending",
        "a node that cannot journal must not claim"
    );
    // The heartbeat is not blocked by it.
    platform.wait_heartbeats(&id, 1, WAIT)?;
    Ok(())
}
