//! Configuration: `agent.toml` plus `agent.toml.d/*.toml` drop-ins, merged from the vendor
//! (`/usr/lib/powernode`), runtime (`/run/powernode`) and admin (`/etc/powernode`) directories.
//!
//! Precedence, lowest first: the three base files in directory order, then every drop-in sorted by
//! file name, where a drop-in in a later directory masks one of the same name in an earlier one
//! (the systemd/zincati convention). Tables merge key by key; any other value is replaced. Unknown
//! keys are an error, so a typo is reported instead of silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::paths::Paths;
use crate::{Error, Result};

const CONFIG_FILE: &str = "agent.toml";
const DROPIN_DIR: &str = "agent.toml.d";
/// The task unit's TimeoutStartSec= (3660 s) is the backstop for a task the agent no longer
/// watches; a longer allowed timeout would be cut short by it.
pub const MAX_TASK_TIMEOUT_SECS: u64 = 3600;
/// Config files are small; anything bigger is a mistake, not configuration.
const MAX_CONFIG_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub platform: PlatformConfig,
    pub heartbeat: HeartbeatConfig,
    pub daemon: DaemonConfig,
    pub identity: IdentityConfig,
    pub retry: RetryConfig,
    pub tasks: TasksConfig,
    pub events: EventsConfig,
}

/// Which severity words go on the wire.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SeverityVocabulary {
    /// `info`, `warning`, `error`, `critical` (node-api.md Part A §5; the development platform).
    #[default]
    PartA,
    /// `low`, `medium`, `high`, `critical`: what the upstream server stores. Its validation
    /// silently drops every other word, so a node talking to it must say this.
    Upstream,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub wire_severity: SeverityVocabulary,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformConfig {
    /// Overrides the URL discovered with the identity (useful behind a proxy).
    pub url: Option<String>,
    pub api_prefix: String,
    /// Response bodies above this are refused (the upstream agent caps at 1 MiB too).
    pub max_response_bytes: u64,
    pub request_timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            url: None,
            api_prefix: "/api/v1/system/node_api".into(),
            max_response_bytes: 1024 * 1024,
            request_timeout_secs: 30,
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Used until the platform sends `next_poll_seconds`.
    pub interval_secs: u64,
    /// Each wait is spread by ± this percentage so a fleet rebooted together does not beat in step.
    pub jitter_percent: u8,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_secs: 30,
            jitter_percent: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Activated daemons exit after this long without a call; 0 keeps them resident.
    pub idle_exit_secs: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig { idle_exit_secs: 30 }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Base URL of the cloud metadata service (link-local by default; tests point it at loopback).
    pub metadata_url: Option<String>,
    /// argv prefix of the vSphere guestinfo tool (`["vmware-rpctool"]` by default, or
    /// `["vmtoolsd", "--cmd"]`); `info-get guestinfo.powernode.userdata` is appended.
    pub vsphere_command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Poll `status/tasks` this often (± 25 %, the upstream cadence); 0 disables tasks.
    pub poll_secs: u64,
    /// Tasks executing at once; more claimable tasks wait for the next poll.
    pub max_concurrent: usize,
    /// Shell tasks (`custom`, `ssh_command`) without `timeout_seconds` get this long.
    pub command_timeout_secs: u64,
    /// Upper bound on any shell task's `timeout_seconds`.
    pub max_command_timeout_secs: u64,
    /// Bytes of a shell task's output reported to the platform.
    pub output_cap_bytes: usize,
    /// On SIGTERM, in-flight tasks get this long to finish before they are handed back. Keep
    /// it below the unit's `TimeoutStopSec=`.
    pub drain_secs: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            poll_secs: 20,
            max_concurrent: 2,
            command_timeout_secs: 300,
            max_command_timeout_secs: 3600,
            output_cap_bytes: 64 * 1024,
            drain_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Total time budget for one logical operation, attempts and waits included.
    pub deadline_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_delay_ms: 500,
            max_delay_ms: 30_000,
            deadline_secs: 120,
        }
    }
}

impl Config {
    /// Load and merge every configuration file under `paths`.
    pub fn load(paths: &Paths) -> Result<Config> {
        let dirs = paths.config_dirs();
        let mut merged = toml::Table::new();
        for dir in &dirs {
            let file = dir.join(CONFIG_FILE);
            if let Some(t) = read_table(&file)? {
                merge(&mut merged, t);
            }
        }
        for file in dropins(&dirs)? {
            if let Some(t) = read_table(&file)? {
                merge(&mut merged, t);
            }
        }
        Config::from_table(merged)
    }

    pub fn from_toml_str(s: &str) -> Result<Config> {
        let t: toml::Table = s
            .parse()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        Config::from_table(t)
    }

    fn from_table(t: toml::Table) -> Result<Config> {
        let cfg: Config = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.heartbeat.interval_secs == 0 {
            return Err(Error::Config("heartbeat.interval_secs must be > 0".into()));
        }
        if self.heartbeat.jitter_percent > 50 {
            return Err(Error::Config(
                "heartbeat.jitter_percent must be ≤ 50".into(),
            ));
        }
        if self.tasks.max_concurrent == 0 {
            return Err(Error::Config("tasks.max_concurrent must be > 0".into()));
        }
        if self.tasks.max_command_timeout_secs > MAX_TASK_TIMEOUT_SECS {
            return Err(Error::Config(format!(
                "tasks.max_command_timeout_secs must be ≤ {MAX_TASK_TIMEOUT_SECS} (the task unit's \
                 TimeoutStartSec= backstop)"
            )));
        }
        if self.tasks.command_timeout_secs == 0
            || self.tasks.command_timeout_secs > self.tasks.max_command_timeout_secs
        {
            return Err(Error::Config(
                "tasks.command_timeout_secs must be in 1..=max_command_timeout_secs".into(),
            ));
        }
        if !self.platform.api_prefix.starts_with('/') {
            return Err(Error::Config(
                "platform.api_prefix must start with '/'".into(),
            ));
        }
        if let Some(u) = &self.platform.url
            && !u.starts_with("https://")
        {
            return Err(Error::Config(format!(
                "platform.url must be https://, got {u:?}"
            )));
        }
        Ok(())
    }
}

fn read_table(file: &Path) -> Result<Option<toml::Table>> {
    let Some(bytes) = crate::fsutil::read_optional(file, MAX_CONFIG_BYTES)? else {
        return Ok(None);
    };
    check_owner(file)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Config(format!("{}: not UTF-8", file.display())))?;
    text.parse::<toml::Table>()
        .map(Some)
        .map_err(|e| Error::Config(format!("{}: {e}", file.display())))
}

/// Configuration decides what the daemons trust, so it must be root's (or, for a tool run by
/// another user on its own tree, that user's): a file another uid owns, or that its group or
/// everyone may write, is refused rather than read. `/run/powernode` is writable by the daemons'
/// group, so without this any of them could configure the others.
fn check_owner(file: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(file).map_err(|e| Error::io("stat", file, e))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(Error::Config(format!(
            "{}: refused: owned by uid {}, not root",
            file.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Error::Config(format!(
            "{}: refused: writable by group or others (mode {:o})",
            file.display(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Drop-in files in application order: by name, a later directory masking an earlier one.
fn dropins(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let d = dir.join(DROPIN_DIR);
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read directory", &d, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &d, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".toml") && !name.starts_with('.') {
                by_name.insert(name, entry.path());
            }
        }
    }
    Ok(by_name.into_values().collect())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn defaults_without_any_file() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::load(&Paths::new(d.path())).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.heartbeat.interval_secs, 30);
    }

    #[test]
    fn precedence_vendor_runtime_admin_then_dropins() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(
            &r.join("usr/lib/powernode/agent.toml"),
            "[heartbeat]\ninterval_secs = 10\njitter_percent = 5\n[daemon]\nidle_exit_secs = 7\n",
        );
        write(
            &r.join("run/powernode/agent.toml"),
            "[heartbeat]\ninterval_secs = 20\n",
        );
        write(
            &r.join("etc/powernode/agent.toml"),
            "[platform]\nurl = \"https://p.example\"\n",
        );
        // Same-named drop-in in /etc masks the vendor one; 20- sorts after 10-.
        write(
            &r.join("usr/lib/powernode/agent.toml.d/10-a.toml"),
            "[daemon]\nidle_exit_secs = 99\n",
        );
        write(
            &r.join("etc/powernode/agent.toml.d/10-a.toml"),
            "[daemon]\nidle_exit_secs = 3\n",
        );
        write(
            &r.join("run/powernode/agent.toml.d/20-b.toml"),
            "[heartbeat]\ninterval_secs = 40\n",
        );
        write(
            &r.join("etc/powernode/agent.toml.d/ignored.conf"),
            "garbage",
        );
        let cfg = Config::load(&Paths::new(r)).unwrap();
        assert_eq!(cfg.heartbeat.interval_secs, 40);
        assert_eq!(
            cfg.heartbeat.jitter_percent, 5,
            "table merge keeps untouched keys"
        );
        assert_eq!(cfg.daemon.idle_exit_secs, 3);
        assert_eq!(cfg.platform.url.as_deref(), Some("https://p.example"));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for (text, needle) in [
            ("[heartbeat]\ninterval_sec = 5\n", "unknown field"),
            ("[heartbeat]\ninterval_secs = \"x\"\n", "invalid type"),
            ("[heartbeat\n", "expected"),
            ("[heartbeat]\ninterval_secs = 0\n", "must be > 0"),
            ("[platform]\nurl = \"http://plain\"\n", "https://"),
        ] {
            let err = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} -> {err}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("etc/powernode/agent.toml"), "[x");
        let err = Config::load(&Paths::new(d.path())).unwrap_err().to_string();
        assert!(err.contains("etc/powernode/agent.toml"), "{err}");
    }

    #[test]
    fn config_another_uid_or_group_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run/powernode/agent.toml");
        write(&run, "[tasks]\ndrain_secs = 5\n");
        fs::set_permissions(&run, fs::Permissions::from_mode(0o664)).unwrap();
        let err = Config::load(&Paths::new(d.path())).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");

        fs::set_permissions(&run, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            Config::load(&Paths::new(d.path()))
                .unwrap()
                .tasks
                .drain_secs,
            5
        );
        // The suite's tests run as root; a daemon's uid owning the file is refused.
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let err = Config::load(&Paths::new(d.path())).unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn task_timeouts_stay_under_the_units_backstop() {
        let err = Config::from_toml_str("[tasks]\nmax_command_timeout_secs = 7200\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("≤ 3600"), "{err}");
    }
}
