//! systemd plumbing: readiness and status notifications, the watchdog, and idle exit for
//! activated daemons (outside systemd, with no `NOTIFY_SOCKET`, every notification is a silent
//! no-op, which is what sd_notify(3) specifies); and asking PID 1 over D-Bus for transient
//! `.mount` units (`StartTransientUnit`, `StopUnit`, job completion through `JobRemoved`), so a
//! daemon gets mounts made without holding any mount capability itself. Unit names for mount
//! points follow `systemd-escape --path` ([`escape_path`]).

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WatchdogSec=`, as sd_watchdog_enabled(3) advises.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Idle exit lives with the rest of the daemon lifecycle; re-exported here for existing callers.
pub use crate::daemon::IdleTracker;

/// `systemd-escape --path`: the unit-name form of an absolute path (`/run/a-b/c` →
/// `run-a\x2db-c`), which a `.mount` unit for that `Where=` must be named after. Only
/// normalised absolute paths are accepted; systemd-escape would warn and produce a name that
/// does not round-trip for the rest.
pub fn escape_path(path: &str) -> Result<String, crate::Error> {
    let refuse = |why: &str| crate::Error::Config(format!("cannot escape {path:?}: {why}"));
    if !path.starts_with('/') {
        return Err(refuse("not an absolute path"));
    }
    // Simplify as systemd does: repeated slashes and `.` components go, `..` is refused.
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(refuse("not normalised (`..`)"));
    }
    if parts.is_empty() {
        return Ok("-".to_string());
    }
    let joined = parts.join("/");
    let mut out = String::with_capacity(joined.len());
    for (i, b) in joined.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    Ok(out)
}

/// The `.mount` unit systemd requires for a mount point.
pub fn mount_unit_name(r#where: &str) -> Result<String, crate::Error> {
    Ok(format!("{}.mount", escape_path(r#where)?))
}

/// The part of `org.freedesktop.systemd1.Manager` the suite uses: transient units (mountd's
/// mounts, the agent's shell tasks), unit jobs (tasks), and job completion.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait SystemdManager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::Variant<'_>)],
        aux: &[(&str, &[(&str, zbus::Variant<'_>)])],
    ) -> zbus::Result<zbus::OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    /// JobRemoved and the other unit/job signals are only sent to subscribed clients.
    fn subscribe(&self) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// One unit's state (`org.freedesktop.systemd1.Unit`).
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdUnit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

/// How long one mount or unmount job may take before the caller gives up waiting (systemd's
/// own default mount timeout is 90 s; a loop-backed EROFS image mounts in milliseconds).
pub const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A `.mount` unit to create at runtime; the unit name follows from `where`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransientMount {
    pub what: String,
    pub r#where: String,
    pub fstype: String,
    pub options: String,
    pub description: String,
    /// Stop with `umount -l`: a generation still in use by a reader (an open file, a cwd)
    /// is detached from the tree at once and released when its last user goes, instead of
    /// failing the stop with EBUSY.
    pub lazy_unmount: bool,
}

fn job_failed(unit: &str, what: &str, result: &str) -> crate::Error {
    crate::Error::Bus(format!(
        "systemd could not {what} {unit}: job {result} (see `journalctl -u {unit}`)"
    ))
}

/// The unit's ActiveState, `None` when systemd has no such unit loaded.
pub async fn unit_active_state(
    conn: &zbus::Connection,
    unit: &str,
) -> Result<Option<String>, crate::Error> {
    let manager = SystemdManagerProxy::new(conn).await?;
    let path = match manager.get_unit(unit).await {
        Ok(p) => p,
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let unit_proxy = SystemdUnitProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(Some(unit_proxy.active_state().await?))
}

/// Waits for `job` to be removed and returns its result (`done`, `failed`, …).
async fn wait_job(
    stream: &mut JobRemovedStream,
    job: &zbus::OwnedObjectPath,
    unit: &str,
    timeout: Duration,
) -> Result<String, crate::Error> {
    use futures_util::StreamExt;
    let wait = async {
        while let Some(signal) = stream.next().await {
            let args = signal.args()?;
            if args.job.as_str() == job.as_str() {
                return Ok(args.result.to_string());
            }
        }
        Err(crate::Error::Bus(format!(
            "the bus closed before systemd finished the job for {unit}"
        )))
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        crate::Error::Bus(format!(
            "systemd did not finish the job for {unit} within {timeout:?}"
        ))
    })?
}

/// Has systemd mount `m` with a transient `.mount` unit and waits for the job. An already
/// active unit for the same mount point is kept (idempotent re-runs, shared lowers); a failed
/// leftover is reset first. Returns the unit name and whether this call started it.
pub async fn start_mount(
    conn: &zbus::Connection,
    m: &TransientMount,
    timeout: Duration,
) -> Result<(String, bool), crate::Error> {
    let unit = mount_unit_name(&m.r#where)?;
    match unit_active_state(conn, &unit).await?.as_deref() {
        Some("active") => return Ok((unit, false)),
        Some("failed") => SystemdManagerProxy::new(conn)
            .await?
            .reset_failed_unit(&unit)
            .await
            .map_err(crate::Error::from)?,
        _ => {}
    }
    let manager = SystemdManagerProxy::new(conn).await?;
    // Subscribed before the call: the job may finish before the reply arrives.
    let mut removed = manager.receive_job_removed().await?;
    let props: Vec<(&str, zbus::Variant<'_>)> = vec![
        ("Description", zbus::Variant::from(m.description.as_str())),
        ("What", zbus::Variant::from(m.what.as_str())),
        ("Where", zbus::Variant::from(m.r#where.as_str())),
        ("Type", zbus::Variant::from(m.fstype.as_str())),
        ("Options", zbus::Variant::from(m.options.as_str())),
        ("LazyUnmount", zbus::Variant::from(m.lazy_unmount)),
    ];
    let job = manager
        .start_transient_unit(&unit, "fail", &props, &[])
        .await?;
    let result = wait_job(&mut removed, &job, &unit, timeout).await?;
    if result != "done" {
        return Err(job_failed(&unit, "mount", &result));
    }
    Ok((unit, true))
}

/// Stops `unit` (unmounting it, for a `.mount`) and waits for the job; a unit systemd does not
/// know is already stopped.
pub async fn stop_unit(
    conn: &zbus::Connection,
    unit: &str,
    timeout: Duration,
) -> Result<(), crate::Error> {
    let manager = SystemdManagerProxy::new(conn).await?;
    let mut removed = manager.receive_job_removed().await?;
    let job = match manager.stop_unit(unit, "replace").await {
        Ok(j) => j,
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let result = wait_job(&mut removed, &job, unit, timeout).await?;
    if result != "done" {
        return Err(job_failed(unit, "stop", &result));
    }
    Ok(())
}

#[cfg(test)]
mod escape_tests {
    use super::escape_path;

    /// Paths whose escaped form is checked against the real `systemd-escape --path`.
    const CASES: &[&str] = &[
        "/",
        "/run/powernode/root.gen/3",
        "/run/powernode/mounts/lower/0123456789abcdef",
        "/foo//bar/",
        "/a/./b",
        "/.hidden/x",
        "/a/.b",
        "/a b",
        "/ü-x",
        "/a\\b",
        "/x:y_z.w",
        "/a,b",
        "/-",
        "/sysroot",
        "/with\ttab",
    ];

    #[test]
    fn escape_matches_systemd_escape() {
        let tool = std::process::Command::new("systemd-escape")
            .arg("--version")
            .output()
            .expect("systemd-escape must be installed (package systemd)");
        assert!(tool.status.success());
        for case in CASES {
            let out = std::process::Command::new("systemd-escape")
                .args(["--path", "--", case])
                .output()
                .expect("run systemd-escape");
            assert!(out.status.success(), "{case:?}: {out:?}");
            let want = String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_string();
            assert_eq!(escape_path(case).expect(case), want, "{case:?}");
        }
    }

    #[test]
    fn escape_refuses_what_does_not_round_trip() {
        for bad in ["relative", "", "/a/../b", "/.."] {
            assert!(escape_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            escape_path("/run/powernode/root").expect("ok"),
            "run-powernode-root"
        );
    }
}
