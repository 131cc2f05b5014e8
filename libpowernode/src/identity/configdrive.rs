//! KubeVirt (and OpenStack-style) config drives: a small filesystem labelled `cidata` (cloud-init
//! NoCloud: `user-data` at the top) or `config-2` (`openstack/latest/user_data`).
//!
//! identityd cannot mount (its seccomp filter and unit forbid it), so the drive is read where it
//! is already mounted: [`CONFIG_DRIVE_DIR`] under the node root. The initramfs (or a mount unit
//! `run-powernode-config\x2ddrive.mount` with `What=/dev/disk/by-label/cidata`, read-only) mounts
//! it there; with `--root DIR` a plain directory `DIR/run/powernode/config-drive` stands in for it.

use super::cloud::identity_from_user_data;
use super::{Ctx, Probe, Source, Strategy};
use crate::Result;
use crate::fsutil::read_optional;

/// Where the config drive is mounted (under the node root).
pub const CONFIG_DRIVE_DIR: &str = "/run/powernode/config-drive";
/// User-data files, NoCloud first.
const USER_DATA_FILES: [&str; 2] = ["user-data", "openstack/latest/user_data"];
/// Same cap as the metadata services.
const MAX_USER_DATA: u64 = super::METADATA_BODY_LIMIT as u64;

pub struct ConfigDrive;

impl Strategy for ConfigDrive {
    fn source(&self) -> Source {
        Source::Kubevirt
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let dir = ctx.paths.under(CONFIG_DRIVE_DIR);
        if !dir.is_dir() {
            return Ok(Probe::Absent(format!(
                "kubevirt: no config drive mounted at {}",
                dir.display()
            )));
        }
        for f in USER_DATA_FILES {
            let p = dir.join(f);
            if let Some(bytes) = read_optional(&p, MAX_USER_DATA)? {
                return identity_from_user_data(
                    Source::Kubevirt,
                    &format!("user-data from {}", p.display()),
                    &bytes,
                );
            }
        }
        Ok(Probe::Absent(format!(
            "kubevirt: config drive {} has neither {}",
            dir.display(),
            USER_DATA_FILES.join(" nor ")
        )))
    }
}
