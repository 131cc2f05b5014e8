//! A private system-type dbus-daemon on a temporary unix socket, enforcing the project's real
//! policy file (`units/usr/share/dbus-1/system.d/com.powernode.conf`) on top of the same
//! default policy as Debian's `/usr/share/dbus-1/system.conf`.
//!
//! Tests run as root. To act as another user, run the client in a child process with changed
//! credentials; [`busctl`] does that with `setpriv --reuid --regid --groups` (a child forked
//! with `nix::unistd::setgroups/setgid/setuid` before exec works the same way). dbus-daemon
//! takes the uid from SO_PEERCRED and the groups from SO_PEERGROUPS of the connecting socket,
//! so the credentials of the process that connects are what the policy sees.

use crate::{describe, require_root, require_tool, units};
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The project's D-Bus policy file, relative to the installed-tree root.
pub const POLICY_FILE: &str = "usr/share/dbus-1/system.d/com.powernode.conf";

/// A running private dbus-daemon; killed on drop.
#[derive(Debug)]
pub struct PrivateBus {
    child: Child,
    address: String,
    socket: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    /// Starts a bus that includes the policy file shipped in `units/`.
    pub fn start() -> Result<PrivateBus> {
        PrivateBus::start_with_policy(&units::source_dir().join(POLICY_FILE))
    }

    /// Starts a bus that includes `policy_file`; returns once the daemon listens.
    pub fn start_with_policy(policy_file: &Path) -> Result<PrivateBus> {
        require_root()?;
        require_tool("dbus-daemon")?;
        if !policy_file.is_file() {
            bail!("D-Bus policy file {} is missing", policy_file.display());
        }
        let dir = tempfile::Builder::new().prefix("pn-bus-").tempdir()?;
        // Other uids (nobody, group members) must reach the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let socket = dir.path().join("system_bus_socket");
        let config = dir.path().join("bus.conf");
        fs::write(&config, bus_config(&socket, policy_file))?;

        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nosyslog", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning dbus-daemon")?;
        let stdout = child.stdout.take().context("dbus-daemon stdout")?;
        let mut line = String::new();
        // The address is printed once the socket listens; EOF means the daemon died
        // (typically a policy file it refused to parse).
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim().is_empty() {
            let out = child.wait_with_output()?;
            bail!(
                "dbus-daemon exited ({}) without listening; config {}:\n{}",
                out.status,
                config.display(),
                describe(&out)
            );
        }
        Ok(PrivateBus {
            child,
            address: format!("unix:path={}", socket.display()),
            socket,
            config,
            _dir: dir,
        })
    }

    /// The address clients connect to (`unix:path=…`), for busctl `--address=` or zbus.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The listening socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("PrivateBus: killing dbus-daemon: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("PrivateBus: reaping dbus-daemon: {e}");
        }
    }
}

/// A system-bus configuration like Debian's system.conf (default-deny for method calls and
/// name ownership) listening on `socket`, plus the project's policy file.
pub fn bus_config(socket: &Path, policy_file: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <!-- Without the receive rules the daemon drops the reply to Hello. -->
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include ignore_missing="no">{policy}</include>
</busconfig>
"#,
        socket = socket.display(),
        policy = policy_file.display(),
    )
}

/// Credentials a bus client runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// uid/gid of `nobody`/`nogroup` on Debian.
pub const NOBODY: u32 = 65534;

impl Caller {
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    pub fn nobody() -> Caller {
        Caller {
            uid: NOBODY,
            gid: NOBODY,
            groups: Vec::new(),
        }
    }

    /// `nobody` with `gid` as a supplementary group (how a member of a group connects).
    pub fn nobody_in_group(gid: u32) -> Caller {
        Caller {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![gid],
        }
    }

    /// `argv` prefixed so it runs with these credentials (empty prefix for root).
    pub fn command(&self, argv: &[&str]) -> Command {
        let (program, args) = argv
            .split_first()
            .map_or(("true", &[][..]), |(p, a)| (*p, a));
        if *self == Caller::root() {
            let mut cmd = Command::new(program);
            cmd.args(args);
            return cmd;
        }
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid));
        if self.groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            cmd.arg(format!("--groups={}", groups.join(",")));
        }
        cmd.arg("--").arg(program).args(args);
        cmd
    }
}

/// Runs `busctl --address=<address> <args…>` as `caller`.
pub fn busctl(address: &str, caller: &Caller, args: &[&str]) -> Result<Output> {
    require_tool("busctl")?;
    let address = format!("--address={address}");
    let mut argv = vec!["busctl", address.as_str(), "--no-pager"];
    argv.extend_from_slice(args);
    let mut cmd = caller.command(&argv);
    cmd.env("SYSTEMD_COLORS", "0");
    crate::run(&mut cmd)
}

/// True if a failed busctl call was refused by the bus policy (not some other error).
pub fn is_access_denied(out: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && (stderr.contains("Access denied") || stderr.contains("AccessDenied"))
}
