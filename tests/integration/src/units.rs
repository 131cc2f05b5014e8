//! The shipped installed-tree image (`units/`): listing its unit files, installing it with the
//! built binaries into a root directory, and running `systemd-analyze` over it.

use crate::{bin, run, workspace_root};
use anyhow::{Context, Result, bail};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where systemd looks for vendor units, relative to a root.
pub const SYSTEM_UNIT_DIR: &str = "usr/lib/systemd/system";

/// Each built binary and the directory (relative to /) it is installed into.
pub const BINARIES: &[(&str, &str)] = &[
    ("powernode-identityd", "usr/libexec/powernode"),
    ("powernode-enrolld", "usr/libexec/powernode"),
    ("powernode-certd", "usr/libexec/powernode"),
    ("powernode-fleeteventd", "usr/libexec/powernode"),
    ("powernode-mountd", "usr/libexec/powernode"),
    ("powernode-mount-helper", "usr/libexec/powernode"),
    ("powernode-agent", "usr/bin"),
];

/// The `units/` directory: an image of the installed tree, paths relative to /.
pub fn source_dir() -> PathBuf {
    workspace_root().join("units")
}

/// Every shipped systemd unit file (.service, .socket, .timer, …), sorted.
pub fn unit_files() -> Result<Vec<PathBuf>> {
    let dir = source_dir().join(SYSTEM_UNIT_DIR);
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no unit files under {}", dir.display());
    }
    Ok(files)
}

/// The shipped `.service` units, sorted.
pub fn service_files() -> Result<Vec<PathBuf>> {
    Ok(unit_files()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect())
}

/// The file name of a unit path (`powernode-agent.service`).
pub fn unit_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Copies `units/` into `dest_root` and installs the built binaries where the units expect
/// them (see [`BINARIES`]). Fails if a binary has not been built.
pub fn install_tree(dest_root: &Path) -> Result<()> {
    copy_tree(&source_dir(), dest_root)?;
    for (name, dir) in BINARIES {
        let src = bin(name)?;
        let dir = dest_root.join(dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dst = dir.join(name);
        fs::copy(&src, &dst)
            .with_context(|| format!("installing {} as {}", src.display(), dst.display()))?;
    }
    Ok(())
}

/// Adds the host's own systemd units (dbus.socket, sysinit.target, …) to `dest_root` without
/// overwriting any, so `systemd-analyze verify --root=dest_root` can resolve the implicit
/// dependencies of the suite's units.
pub fn add_host_systemd_units(dest_root: &Path) -> Result<()> {
    let host = Path::new("/").join(SYSTEM_UNIT_DIR);
    let dest = dest_root.join(SYSTEM_UNIT_DIR);
    fs::create_dir_all(&dest)?;
    let status = Command::new("cp")
        .arg("-an")
        .arg(format!("{}/.", host.display()))
        .arg(&dest)
        .status()
        .context("spawning cp")?;
    if !status.success() {
        bail!(
            "copying {} to {} failed: {status}",
            host.display(),
            dest.display()
        );
    }
    Ok(())
}

/// Recursively copies `src` into `dst` (created if missing), keeping file modes and symlinks.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&from)?, &to)
                .with_context(|| format!("linking {}", to.display()))?;
        } else {
            fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// Result of `systemd-analyze security --offline=true` for one unit file.
#[derive(Debug, Clone)]
pub struct Exposure {
    pub unit: String,
    /// Overall exposure, 0.0 (best) to 10.0.
    pub score: f64,
    /// Whether systemd-analyze exited 0, i.e. the score is within the `--threshold`.
    pub within_threshold: bool,
    /// The full table systemd-analyze printed.
    pub report: String,
}

/// Runs `systemd-analyze security --offline=true --threshold=<threshold> <unit_file>`.
/// `threshold` is exposure x 10, as systemd-analyze takes it (20 means 2.0).
pub fn offline_security(unit_file: &Path, threshold: u32) -> Result<Exposure> {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={threshold}"))
        .arg(unit_file)
        .env("SYSTEMD_COLORS", "0"))?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let score = parse_exposure(&report).with_context(|| {
        format!(
            "no exposure level in systemd-analyze output:\n{}",
            crate::describe(&out)
        )
    })?;
    Ok(Exposure {
        unit: unit_name(unit_file),
        score,
        within_threshold: out.status.success(),
        report,
    })
}

/// Extracts the number from `→ Overall exposure level for x.service: 1.4 OK 🙂`.
pub fn parse_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, after) = line.rsplit_once(": ")?;
    after.split_whitespace().next()?.parse().ok()
}

/// `systemd-analyze verify --root=<root> <units…>` run from the root's unit directory, so
/// the names resolve inside the root.
pub fn verify(root: &Path, unit_names: &[String]) -> Result<Output> {
    run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(unit_names)
        .current_dir(root.join(SYSTEM_UNIT_DIR))
        .env("SYSTEMD_COLORS", "0"))
}

#[cfg(test)]
mod tests {
    use super::parse_exposure;

    #[test]
    fn parses_exposure_lines() {
        let cases = [
            (
                "→ Overall exposure level for a.service: 1.4 OK 🙂\n",
                Some(1.4),
            ),
            (
                "x\n→ Overall exposure level for b.service: 9.6 UNSAFE 😨",
                Some(9.6),
            ),
            ("no score here", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_exposure(input), want, "{input:?}");
        }
    }
}
