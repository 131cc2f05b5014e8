//! Every on-disk location the suite uses, derived from one root directory.
//!
//! Production uses `/`; tests and `--root DIR` / `POWERNODE_ROOT` runs place a whole node (its
//! kernel interfaces included: `proc/cmdline`, `sys/firmware/...`) under a temporary directory, so
//! nothing here may hard-code an absolute path without going through [`Paths`].

use std::path::{Path, PathBuf};

/// Environment variable that selects the root when `--root` is not given.
pub const ROOT_ENV: &str = "POWERNODE_ROOT";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths::new("/")
    }
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }

    /// `--root` if given, else `$POWERNODE_ROOT`, else `/`.
    pub fn from_cli(root: Option<&Path>) -> Self {
        match root {
            Some(r) => Paths::new(r),
            None => match std::env::var_os(ROOT_ENV) {
                Some(r) if !r.is_empty() => Paths::new(PathBuf::from(r)),
                _ => Paths::default(),
            },
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolve an absolute path of the installed layout under this root.
    pub fn under(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Configuration directories, lowest precedence first (vendor, runtime, admin).
    pub fn config_dirs(&self) -> [PathBuf; 3] {
        [
            self.under("/usr/lib/powernode"),
            self.under("/run/powernode"),
            self.under("/etc/powernode"),
        ]
    }

    pub fn etc_dir(&self) -> PathBuf {
        self.under("/etc/powernode")
    }

    pub fn trust_dir(&self) -> PathBuf {
        self.under("/etc/powernode/trust")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.under("/run/powernode")
    }

    /// identityd's own runtime directory (its uid owns it; enrolld reads through the group).
    pub fn identity_run_dir(&self) -> PathBuf {
        self.under("/run/powernode/identity")
    }

    pub fn identity_json(&self) -> PathBuf {
        self.identity_run_dir().join("identity.json")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.under("/persist/var/lib/powernode")
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.under("/persist/var/lib/powernode/pki")
    }

    pub fn proc_cmdline(&self) -> PathBuf {
        self.under("/proc/cmdline")
    }

    pub fn fw_cfg_dir(&self) -> PathBuf {
        self.under("/sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode")
    }

    pub fn dmi_product_uuid(&self) -> PathBuf {
        self.under("/sys/class/dmi/id/product_uuid")
    }

    /// identity.cfg files read by the local strategy, in precedence order.
    pub fn local_identity_cfgs(&self) -> [PathBuf; 2] {
        [
            self.under("/etc/identity.cfg"),
            self.under("/persist/var/lib/powernode/identity.cfg"),
        ]
    }

    pub fn boot_identity_cfg(&self) -> PathBuf {
        self.under("/boot/identity.cfg")
    }

    pub fn proc_file(&self, name: &str) -> PathBuf {
        self.under("/proc").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_lives_under_the_root() {
        let p = Paths::new("/tmp/node");
        assert_eq!(
            p.pki_dir(),
            PathBuf::from("/tmp/node/persist/var/lib/powernode/pki")
        );
        assert_eq!(p.proc_cmdline(), PathBuf::from("/tmp/node/proc/cmdline"));
        assert_eq!(
            p.fw_cfg_dir(),
            PathBuf::from("/tmp/node/sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode")
        );
        for d in p.config_dirs() {
            assert!(d.starts_with("/tmp/node"), "{d:?}");
        }
        assert_eq!(
            Paths::default().identity_json(),
            PathBuf::from("/run/powernode/identity/identity.json")
        );
    }
}
