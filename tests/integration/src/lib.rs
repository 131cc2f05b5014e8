//! Harness for the powernode integration tests (tests/integration/tests/*.rs).
//!
//! It owns everything a test needs to reach real system components: where the workspace and
//! its built binaries are ([`workspace_root`], [`bin_dir`], [`bin`]), the shipped installed-tree
//! image under `units/` ([`units`]), a private system-type dbus-daemon loaded with the real policy
//! file ([`bus::PrivateBus`]), and a booted systemd-nspawn container of Debian bookworm with the
//! suite installed ([`container::Container`]).
//!
//! The tests run as root. A missing prerequisite (binary, tool, image, root) is an error with
//! the command that fixes it, never a skip.

pub mod bus;
pub mod container;
pub mod devplatform;
pub mod metadata;
pub mod registry;
pub mod units;
pub mod vm;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // This crate lives at <root>/tests/integration.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// Directory of the built binaries: `$POWERNODE_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`,
/// else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("POWERNODE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("debug");
    }
    workspace_root().join("target/debug")
}

/// Path of a built binary; an error naming the build command if it is missing.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "binary {name} not found at {}: run `cargo build --workspace` (or `make build`), \
             or point POWERNODE_BIN_DIR at the directory holding it",
            path.display()
        );
    }
    Ok(path)
}

/// Fails unless the tests run as root (they start dbus-daemon, mount overlays, boot nspawn).
pub fn require_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no effective Uid: line in /proc/self/status")?;
    if uid != "0" {
        bail!(
            "these tests need root (effective uid is {uid}); run them as root, e.g. `sudo make test`"
        );
    }
    Ok(())
}

/// Fails unless `tool` is on PATH; names the Makefile target that installs it.
pub fn require_tool(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("{tool} is not installed: run `make deps`"))
}

/// Runs a command to completion, capturing its output; errors only if it cannot be started.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("spawning {cmd:?}"))
}

/// Runs a command and fails, with its stdout and stderr, unless it exits 0. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}", out.status, describe(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Stdout and stderr of a finished command, labelled, for error messages.
pub fn describe(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Creates system group `name` if missing (`groupadd -f -r`) and returns its gid.
pub fn ensure_group(name: &str) -> Result<u32> {
    ensure_account("group", name, &["groupadd", "-f", "-r", name])
}

/// Creates system user `name` if missing (`useradd -r`, no home, primary group nogroup) and
/// returns its uid: the D-Bus policy names the suite's daemon users, and dbus-daemon resolves
/// them when it reads the policy.
pub fn ensure_user(name: &str) -> Result<u32> {
    ensure_account(
        "passwd",
        name,
        &[
            "useradd",
            "-r",
            "-M",
            "-N",
            "-g",
            "nogroup",
            "-s",
            "/usr/sbin/nologin",
            name,
        ],
    )
}

/// The id (third field) of `name` in the `database` getent reads, after running `add` when the
/// entry is missing.
fn ensure_account(database: &str, name: &str, add: &[&str]) -> Result<u32> {
    let lookup = || run(Command::new("getent").args([database, name]));
    let mut entry = lookup()?;
    // groupadd/useradd take a lock on /etc/group; a test running in parallel may hold it briefly.
    for attempt in 1..=GROUPADD_ATTEMPTS {
        if entry.status.success() {
            break;
        }
        let out = run(Command::new(add[0]).args(&add[1..]))?;
        if !out.status.success() && attempt == GROUPADD_ATTEMPTS {
            bail!(
                "{} failed ({}):\n{}",
                add.join(" "),
                out.status,
                describe(&out)
            );
        }
        if !out.status.success() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        entry = lookup()?;
    }
    let line = String::from_utf8_lossy(&entry.stdout);
    line.trim()
        .split(':')
        .nth(2)
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("{database} {name}: unparsable entry {line:?}"))
}

/// The system users the suite's daemons run as (units/usr/lib/sysusers.d/powernode.conf).
pub const DAEMON_USERS: [&str; 6] = [
    "powernode",
    "powernode-identity",
    "powernode-enroll",
    "powernode-cert",
    "powernode-events",
    "powernode-mount",
];

/// Retries for `groupadd` when /etc/group is locked by another process.
const GROUPADD_ATTEMPTS: u32 = 5;
