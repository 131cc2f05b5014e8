//! Who this node is: the identity discovery cascade.
//!
//! Strategies run in the contract's order (shared/node-api.md Part B §3) and the first that yields
//! an instance UUID wins; a strategy that finds nothing says why, and a strategy that fails is
//! remembered and reported only if nothing wins. This build has the local strategies — kernel
//! command line, QEMU fw-cfg and the local identity.cfg files; cloud metadata and claim polling
//! slot into the same [`Strategy`] trait.
//!
//! The result is cached in `/run/powernode/identity.json` (0600): it holds the bootstrap token, so
//! it never leaves the node and [`Identity::public`] is what D-Bus and the CLI show.

mod cmdline;
mod fwcfg;
mod idcfg;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{atomic_write, ensure_dir, read_optional};
use crate::paths::Paths;
use crate::{Error, Result};

pub use cmdline::parse_cmdline;
pub use idcfg::parse_identity_cfg;

/// Where an identity came from; the strings are the stable names of `introspect --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    KernelCmdline,
    FwCfg,
    Claim,
    Aws,
    Gcp,
    Azure,
    Digitalocean,
    Hetzner,
    Kubevirt,
    Vsphere,
    Dmi,
    IdentityCfg,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::KernelCmdline => "kernel-cmdline",
            Source::FwCfg => "fw-cfg",
            Source::Claim => "claim",
            Source::Aws => "aws",
            Source::Gcp => "gcp",
            Source::Azure => "azure",
            Source::Digitalocean => "digitalocean",
            Source::Hetzner => "hetzner",
            Source::Kubevirt => "kubevirt",
            Source::Vsphere => "vsphere",
            Source::Dmi => "dmi",
            Source::IdentityCfg => "identity-cfg",
        }
    }
}

/// A discovered identity. Holds secrets: never log it, never put it on D-Bus.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub instance_uuid: String,
    pub platform_url: Option<String>,
    pub ca_pem: Option<String>,
    pub bootstrap_token: Option<String>,
    /// fw-cfg `instance_name`, for the transient hostname.
    #[serde(default)]
    pub instance_name: Option<String>,
    pub source: Source,
    /// Human-readable: which file and key decided.
    pub evidence: String,
    #[serde(with = "time::serde::rfc3339")]
    pub discovered_at: OffsetDateTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.public())
    }
}

/// The identity with every secret removed: what D-Bus, logs and `introspect` may show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PublicIdentity {
    pub instance_uuid: String,
    pub source: &'static str,
    pub platform_url: Option<String>,
    pub has_ca_pem: bool,
    /// Always "<redacted>" when a token exists; never the token.
    pub bootstrap_token: Option<&'static str>,
    pub instance_name: Option<String>,
    pub evidence: String,
    pub discovered_at: String,
}

impl Identity {
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            instance_uuid: self.instance_uuid.clone(),
            source: self.source.as_str(),
            platform_url: self.platform_url.clone(),
            has_ca_pem: self.ca_pem.is_some(),
            bootstrap_token: self.bootstrap_token.as_ref().map(|_| "<redacted>"),
            instance_name: self.instance_name.clone(),
            evidence: self.evidence.clone(),
            discovered_at: rfc3339(self.discovered_at),
        }
    }

    /// Fields a strategy found, before validation.
    fn from_fields(f: Fields, source: Source, evidence: String) -> Result<Identity> {
        let uuid = f.instance_uuid.unwrap_or_default();
        validate_instance_id(&uuid)?;
        if let Some(u) = &f.platform_url
            && !u.starts_with("https://")
        {
            return Err(Error::Identity(format!(
                "{}: platform URL must be https://, got {u:?}",
                source.as_str()
            )));
        }
        if let Some(ca) = &f.ca_pem
            && !ca.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(Error::Identity(format!(
                "{}: ca_pem is not a PEM certificate",
                source.as_str()
            )));
        }
        Ok(Identity {
            instance_uuid: uuid,
            platform_url: f.platform_url,
            ca_pem: f.ca_pem,
            bootstrap_token: f.bootstrap_token,
            instance_name: f.instance_name,
            source,
            evidence,
            discovered_at: OffsetDateTime::now_utc(),
        })
    }
}

/// Instance ids are UUIDs in practice; accept identifier characters only, since the id ends up in
/// file names, certificate subjects and D-Bus properties.
pub fn validate_instance_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::Identity("instance id is empty".into()));
    }
    if id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Identity(format!(
            "instance id {id:?} is not a UUID-like identifier"
        )));
    }
    Ok(())
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The raw values a source offers; the same shape for every source.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fields {
    pub instance_uuid: Option<String>,
    pub bootstrap_token: Option<String>,
    pub platform_url: Option<String>,
    pub ca_pem: Option<String>,
    pub instance_name: Option<String>,
}

/// What one strategy concluded.
#[derive(Debug)]
pub enum Probe {
    Found(Identity),
    /// Nothing here; the reason is kept as evidence of why the cascade moved on.
    Absent(String),
}

/// One identity source. Methods have defaults so a source implements only what it offers.
pub trait Strategy: Send + Sync {
    fn source(&self) -> Source;

    /// Look for an identity. The default says the source does not exist on this node.
    fn probe(&self, _paths: &Paths) -> Result<Probe> {
        Ok(Probe::Absent(format!(
            "{}: not available",
            self.source().as_str()
        )))
    }
}

/// The strategies of this build, in the contract's order.
pub fn default_strategies() -> Vec<Box<dyn Strategy>> {
    vec![
        Box::new(cmdline::KernelCmdline),
        Box::new(fwcfg::FwCfg),
        Box::new(idcfg::LocalIdentityCfg),
    ]
}

/// The outcome of a cascade run, with the trail an SRE needs when nothing matched.
#[derive(Debug)]
pub struct Resolution {
    pub identity: Option<Identity>,
    /// One line per strategy tried: `"<source>: <what happened>"`.
    pub trail: Vec<String>,
}

/// Run `strategies` in order; the first found identity wins.
pub fn resolve_with(paths: &Paths, strategies: &[Box<dyn Strategy>]) -> Resolution {
    let mut trail = Vec::new();
    for s in strategies {
        match s.probe(paths) {
            Ok(Probe::Found(id)) => {
                trail.push(format!("{}: found ({})", s.source().as_str(), id.evidence));
                return Resolution {
                    identity: Some(id),
                    trail,
                };
            }
            Ok(Probe::Absent(why)) => trail.push(why),
            Err(e) => trail.push(format!("{}: error: {e}", s.source().as_str())),
        }
    }
    Resolution {
        identity: None,
        trail,
    }
}

/// Resolve with the default strategies; an error carrying the whole trail if nothing matched.
pub fn resolve(paths: &Paths) -> Result<Identity> {
    let r = resolve_with(paths, &default_strategies());
    r.identity.ok_or_else(|| {
        Error::Identity(format!(
            "no identity source matched: {}",
            r.trail.join("; ")
        ))
    })
}

/// The cached identity (`/run/powernode/identity.json`), if any.
pub fn load_cached(paths: &Paths) -> Result<Option<Identity>> {
    let p = paths.identity_json();
    match read_optional(&p, 1024 * 1024)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::malformed("identity.json", e)),
    }
}

pub fn store_cached(paths: &Paths, id: &Identity) -> Result<()> {
    ensure_dir(&paths.run_dir(), 0o750)?;
    let bytes = serde_json::to_vec_pretty(id).map_err(|e| Error::malformed("identity", e))?;
    atomic_write(&paths.identity_json(), &bytes, 0o600)
}

#[cfg(test)]
mod tests;
