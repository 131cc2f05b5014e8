//! `powernode-agent verify`: offline Sigstore bundle verification (libpowernode::verify).
//!
//! Exit 0 when verified, 2 on any failure (including a missing policy or unreadable input), with
//! the reason on stderr or in the JSON report.

use std::path::{Path, PathBuf};

use clap::Args;
use powernode::paths::Paths;
use powernode::verify::{self, Artifact, Matcher, Policy, PublicKey};
use serde_json::{Map, Value, json};

use crate::output::Report;

/// Exit code of every verification failure (upstream table).
pub const EXIT_VERIFY: u8 = 2;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The artifact: a file, or `sha256:<hex>` (a digest, unless a file of that name exists).
    pub artifact: String,
    /// The Sigstore bundle (`.sigstore.json`, v0.1–v0.3).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Exact certificate identity (SAN).
    #[arg(long, conflicts_with = "identity_regexp")]
    pub certificate_identity: Option<String>,
    /// Exact OIDC issuer.
    #[arg(long, conflicts_with = "issuer_regexp")]
    pub certificate_oidc_issuer: Option<String>,
    /// Regular expression for the certificate identity (unanchored, as in cosign).
    #[arg(long, alias = "certificate-identity-regexp")]
    pub identity_regexp: Option<String>,
    /// Regular expression for the OIDC issuer (unanchored, as in cosign).
    #[arg(long, alias = "certificate-oidc-issuer-regexp")]
    pub issuer_regexp: Option<String>,
    /// PEM public key for key-signed bundles (excludes the identity options).
    #[arg(long, conflicts_with_all = ["certificate_identity", "certificate_oidc_issuer", "identity_regexp", "issuer_regexp"])]
    pub key: Option<PathBuf>,
    /// trusted_root.json (default: /etc/powernode/trust/trusted_root.json under --root).
    #[arg(long)]
    pub trusted_root: Option<PathBuf>,
}

const NAME: &str = "verify";

fn fail(msg: impl Into<String>) -> Report {
    Report::failed(NAME, EXIT_VERIFY, msg.into())
}

fn read(what: &str, p: &Path) -> Result<Vec<u8>, Report> {
    std::fs::read(p).map_err(|e| fail(format!("reading {what} {}: {e}", p.display())))
}

fn policy(a: &VerifyArgs) -> Result<Policy, Report> {
    if let Some(k) = &a.key {
        let pem = read("key", k)?;
        let pem = String::from_utf8(pem)
            .map_err(|_| fail(format!("key {} is not PEM text", k.display())))?;
        let key =
            PublicKey::from_pem(&pem).map_err(|e| fail(format!("key {}: {e}", k.display())))?;
        return Ok(Policy::Key(key));
    }
    let identity = match (&a.certificate_identity, &a.identity_regexp) {
        (Some(s), _) => Some(Matcher::Exact(s.clone())),
        (None, Some(r)) => Some(Matcher::regex(r).map_err(|e| fail(e.to_string()))?),
        (None, None) => None,
    };
    let issuer = match (&a.certificate_oidc_issuer, &a.issuer_regexp) {
        (Some(s), _) => Some(Matcher::Exact(s.clone())),
        (None, Some(r)) => Some(Matcher::regex(r).map_err(|e| fail(e.to_string()))?),
        (None, None) => None,
    };
    match (identity, issuer) {
        (Some(identity), Some(issuer)) => Ok(Policy::Identity { identity, issuer }),
        (None, None) => Err(fail(
            "no verification policy: give --certificate-identity/--identity-regexp with \
             --certificate-oidc-issuer/--issuer-regexp, or --key",
        )),
        _ => Err(fail(
            "incomplete verification policy: an identity and an OIDC issuer are both required",
        )),
    }
}

/// Runs the command; never returns an error (failures are reports with exit code 2).
pub fn run(a: VerifyArgs, paths: &Paths) -> Report {
    match run_inner(&a, paths) {
        Ok(r) | Err(r) => r,
    }
}

fn run_inner(a: &VerifyArgs, paths: &Paths) -> Result<Report, Report> {
    let policy = policy(a)?;
    let bundle_path = a
        .bundle
        .as_deref()
        .ok_or_else(|| fail("no --bundle given (detached signatures are not supported)"))?;
    let root_path = a
        .trusted_root
        .clone()
        .unwrap_or_else(|| paths.trust_dir().join("trusted_root.json"));
    let artifact_path = Path::new(&a.artifact);
    let artifact = match Artifact::parse_digest(&a.artifact) {
        Some(d) if !artifact_path.exists() => d,
        _ => Artifact::Bytes(read("artifact", artifact_path)?),
    };
    let root_json = read("trusted root", &root_path)?;
    let bundle_json = read("bundle", bundle_path)?;
    let v = verify::verify_bytes(&root_json, &bundle_json, &artifact, &policy)
        .map_err(|e| fail(format!("verification failed: {e}")))?;
    let hex: String = artifact
        .sha256()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let times: Vec<Value> = v
        .signing_times
        .iter()
        .map(|t| {
            time::OffsetDateTime::from_unix_timestamp(*t)
                .ok()
                .and_then(|d| {
                    d.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map_or_else(|| json!(t), Value::from)
        })
        .collect();
    let mut d = Map::new();
    d.insert("verified".into(), true.into());
    d.insert("artifact_sha256".into(), hex.into());
    d.insert("identity".into(), v.identity.into());
    d.insert("issuer".into(), v.issuer.map_or(Value::Null, Value::from));
    d.insert("bundle_version".into(), v.bundle_version.into());
    d.insert("tlog_entry".into(), v.tlog_kind.into());
    d.insert("log_index".into(), v.log_index.into());
    d.insert("signing_times".into(), Value::Array(times));
    d.insert(
        "trusted_root".into(),
        root_path.display().to_string().into(),
    );
    Ok(Report::ok(NAME, d))
}
