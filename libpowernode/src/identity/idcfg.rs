//! The local identity.cfg strategy: `/etc/identity.cfg`, then
//! `/persist/var/lib/powernode/identity.cfg` (which survives reboots on nodes with /persist).
//!
//! Format: shell-style `KEY=VALUE` lines (`ID`, `KEY`, `SERVER`, `CA_PEM`, `CA_PEM_FILE`), `#`
//! comments, optional `export ` prefix, surrounding quotes stripped.

use super::{Ctx, Fields, Identity, Probe, Source, Strategy};
use crate::fsutil::read_optional;
use crate::{Error, Result};

const MAX_CFG: u64 = 256 * 1024;

pub struct LocalIdentityCfg;

/// Parsed identity.cfg: the fields plus the `CA_PEM_FILE` reference still to be read.
#[derive(Debug, Default, PartialEq)]
pub struct IdentityCfg {
    pub fields: Fields,
    pub ca_pem_file: Option<String>,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

pub fn parse_identity_cfg(text: &str) -> IdentityCfg {
    let mut c = IdentityCfg::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = unquote(v).to_string();
        let v = (!v.is_empty()).then_some(v);
        match k.trim() {
            "ID" => c.fields.instance_uuid = v,
            "KEY" => c.fields.bootstrap_token = v,
            "SERVER" => c.fields.platform_url = v,
            "CA_PEM" => c.fields.ca_pem = v.map(|p| p.replace("\\n", "\n")),
            "CA_PEM_FILE" => c.ca_pem_file = v,
            "NAME" => c.fields.instance_name = v,
            _ => {}
        }
    }
    c
}

impl Strategy for LocalIdentityCfg {
    fn source(&self) -> Source {
        Source::IdentityCfg
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let paths = &ctx.paths;
        let mut tried = Vec::new();
        for p in paths.local_identity_cfgs() {
            let Some(bytes) = read_optional(&p, MAX_CFG)? else {
                tried.push(format!("{} missing", p.display()));
                continue;
            };
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::Identity(format!("{} is not UTF-8", p.display())))?;
            let mut cfg = parse_identity_cfg(&text);
            if cfg.fields.instance_uuid.is_none() {
                tried.push(format!("{} has no ID", p.display()));
                continue;
            }
            fill_ca(paths, &p, &mut cfg)?;
            let evidence = format!("ID in {}", p.display());
            return Identity::from_fields(cfg.fields, Source::IdentityCfg, evidence)
                .map(Probe::Found);
        }
        Ok(Probe::Absent(format!("identity-cfg: {}", tried.join(", "))))
    }
}

/// Inline `CA_PEM` wins; a `CA_PEM_FILE` path is resolved under the node root and must exist.
pub(super) fn fill_ca(
    paths: &crate::paths::Paths,
    cfg_path: &std::path::Path,
    cfg: &mut IdentityCfg,
) -> Result<()> {
    if cfg.fields.ca_pem.is_some() {
        return Ok(());
    }
    let Some(f) = cfg.ca_pem_file.take() else {
        return Ok(());
    };
    let ca_path = paths.under(&f);
    let ca = read_optional(&ca_path, MAX_CFG)?.ok_or_else(|| {
        Error::Identity(format!(
            "{}: CA_PEM_FILE {} missing",
            cfg_path.display(),
            ca_path.display()
        ))
    })?;
    cfg.fields.ca_pem = Some(String::from_utf8_lossy(&ca).into_owned());
    Ok(())
}
