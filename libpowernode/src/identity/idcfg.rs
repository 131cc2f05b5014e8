//! The local identity.cfg strategy: `/etc/identity.cfg`, then
//! `/persist/var/lib/powernode/identity.cfg` (which survives reboots on nodes with /persist).
//!
//! Format: shell-style `KEY=VALUE` lines (`ID`, `KEY`, `SERVER`, `CA_PEM`, `CA_PEM_FILE`), `#`
//! comments, optional `export ` prefix, surrounding quotes stripped. `CA_PEM_FILE` is read only
//! beneath the directory of the identity.cfg that names it, and only if it holds certificates
//! (see [`read_ca_file`]).

use std::io::Read;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::Mode;
use x509_parser::pem::Pem;

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

/// Inline `CA_PEM` wins; otherwise `CA_PEM_FILE` is read through [`read_ca_file`].
pub(super) fn fill_ca(
    paths: &crate::paths::Paths,
    cfg_path: &Path,
    cfg: &mut IdentityCfg,
) -> Result<()> {
    if cfg.fields.ca_pem.is_some() {
        return Ok(());
    }
    let Some(f) = cfg.ca_pem_file.take() else {
        return Ok(());
    };
    let refuse =
        |why: String| Error::Identity(format!("{}: CA_PEM_FILE {f}: {why}", cfg_path.display()));
    let ca = read_ca_file(paths, cfg_path, &f).map_err(refuse)?;
    cfg.fields.ca_pem = Some(ca);
    Ok(())
}

/// Read `CA_PEM_FILE` (`name`, as written in the identity.cfg at `cfg_path`).
///
/// identityd can read root-only files (it holds CAP_DAC_READ_SEARCH for `product_uuid`), and
/// some identity.cfg files are writable by its own user (`/persist/var/lib/powernode`). So the
/// file is read only beneath the directory of the identity.cfg that names it: an absolute path
/// elsewhere, any `..` and any symlink leading out are refused (the kernel resolves the path
/// with `RESOLVE_BENEATH`, so a symlink swapped in after the check cannot lead out either), and
/// the content must be PEM certificates and nothing else (a private key beside the cfg is not
/// copied into identity.json). A relative name is taken from that directory.
fn read_ca_file(
    paths: &crate::paths::Paths,
    cfg_path: &Path,
    name: &str,
) -> std::result::Result<String, String> {
    let dir = cfg_path
        .parent()
        .ok_or_else(|| "the identity.cfg has no directory".to_string())?;
    let named = Path::new(name);
    if named.components().any(|c| c == Component::ParentDir) {
        return Err("`..` is not allowed".into());
    }
    let full = if named.is_absolute() {
        paths.under(name)
    } else {
        dir.join(named)
    };
    let rel = full.strip_prefix(dir).map_err(|_| {
        format!(
            "outside {}: a CA file is read only beside the identity.cfg that names it",
            dir.display()
        )
    })?;
    if rel.as_os_str().is_empty() {
        return Err("names the identity.cfg's directory, not a file".into());
    }
    let dirfd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let how = OpenHow::new()
        // O_NONBLOCK: a FIFO planted there must not hang discovery; it is refused below.
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let opened = match openat2(&dirfd, rel, how) {
        // openat2 filtered (systemd 252's @system-service lacks it) or a kernel before 5.6:
        // walk the path one component at a time, following no symlink at all — stricter than
        // RESOLVE_BENEATH, which would follow one that stays inside.
        Err(Errno::ENOSYS | Errno::EPERM) => open_beneath_without_links(&dirfd, rel),
        other => other,
    };
    let fd = opened.map_err(|e| match e {
        Errno::ENOENT => format!("{} missing", full.display()),
        Errno::EXDEV | Errno::ELOOP => format!(
            "{} leads out of {} (symlink or mount)",
            full.display(),
            dir.display()
        ),
        e => format!("{}: {e}", full.display()),
    })?;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", full.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", full.display()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CFG + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", full.display()))?;
    if bytes.len() as u64 > MAX_CFG {
        return Err(format!("{} is larger than {MAX_CFG} bytes", full.display()));
    }
    check_pem_certificates(&bytes).map_err(|why| format!("{}: {why}", full.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", full.display()))
}

/// `rel` (no `..`, checked by the caller) below `dir`, every component opened with O_NOFOLLOW.
fn open_beneath_without_links(
    dir: &std::os::fd::OwnedFd,
    rel: &Path,
) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::openat;
    let parts: Vec<Component<'_>> = rel.components().collect();
    let Some((last, walk)) = parts.split_last() else {
        return Err(Errno::EINVAL);
    };
    let mut cur = dir.try_clone().map_err(|_| Errno::EBADF)?;
    for part in walk {
        let Component::Normal(name) = part else {
            return Err(Errno::EXDEV);
        };
        cur = openat(
            &cur,
            *name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
    }
    let Component::Normal(name) = last else {
        return Err(Errno::EXDEV);
    };
    openat(
        &cur,
        *name,
        OFlag::O_RDONLY
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK
            | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

/// PEM text that holds X.509 certificates and nothing else: every `-----BEGIN` block is a
/// parsable `CERTIFICATE`, and there is at least one.
fn check_pem_certificates(bytes: &[u8]) -> std::result::Result<(), String> {
    const NOT_PEM: &str = "not a PEM certificate";
    let text = std::str::from_utf8(bytes).map_err(|_| NOT_PEM.to_string())?;
    let blocks = text.matches("-----BEGIN ").count();
    let mut certs = 0;
    for pem in Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(|e| format!("{NOT_PEM} ({e})"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {:?} block: only CERTIFICATE blocks are accepted",
                pem.label
            ));
        }
        pem.parse_x509()
            .map_err(|e| format!("{NOT_PEM} (block {}: {e})", certs + 1))?;
        certs += 1;
    }
    if certs == 0 || certs != blocks {
        return Err(NOT_PEM.into());
    }
    Ok(())
}
