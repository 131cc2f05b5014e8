//! Strategy 2: QEMU fw-cfg entries under `opt/com.powernode/<key>` (the local QEMU provider).

use std::path::Path;

use super::{Ctx, Fields, Identity, Probe, Source, Strategy};
use crate::fsutil::read_optional;
use crate::{Error, Result};

/// fw-cfg items are small; a CA bundle is the largest expected value.
const MAX_ITEM: u64 = 256 * 1024;

pub struct FwCfg;

fn item(dir: &Path, key: &str) -> Result<Option<String>> {
    let p = dir.join(key).join("raw");
    match read_optional(&p, MAX_ITEM)? {
        None => Ok(None),
        Some(b) => {
            let s = String::from_utf8(b)
                .map_err(|_| Error::Identity(format!("{} is not UTF-8", p.display())))?;
            let s = s.trim().to_string();
            Ok((!s.is_empty()).then_some(s))
        }
    }
}

impl Strategy for FwCfg {
    fn source(&self) -> Source {
        Source::FwCfg
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let paths = &ctx.paths;
        let dir = paths.fw_cfg_dir();
        if !dir.is_dir() {
            return Ok(Probe::Absent(format!("fw-cfg: {} missing", dir.display())));
        }
        let fields = Fields {
            instance_uuid: item(&dir, "instance_uuid")?,
            bootstrap_token: item(&dir, "bootstrap_token")?,
            platform_url: item(&dir, "platform_url")?,
            ca_pem: item(&dir, "ca_pem")?,
            instance_name: item(&dir, "instance_name")?,
        };
        if fields.instance_uuid.is_none() {
            return Ok(Probe::Absent("fw-cfg: no instance_uuid item".into()));
        }
        let evidence = format!("{}/instance_uuid/raw", dir.display());
        Identity::from_fields(fields, Source::FwCfg, evidence).map(Probe::Found)
    }
}
