//! Node keys, CSRs and the on-disk PKI directory (shared/node-api.md §17).
//!
//! Layout and modes: `node.key` 0600 (PKCS#8 PEM, Ed25519), `node.crt`, `ca-chain.crt`,
//! `ca-bundle.crt` 0644, `instance-token.jwt` 0600, `meta.json` 0644. Every file is written
//! atomically and `meta.json` is written last: it is the commit marker, so a crash in the middle
//! leaves a directory that [`PkiStore::load`] reports as "not enrolled" instead of a half-set.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::EnrollResponse;
use crate::fsutil::{atomic_write, ensure_dir, read_optional};
use crate::{Error, Result};

pub const NODE_KEY: &str = "node.key";
pub const NODE_CRT: &str = "node.crt";
pub const CA_CHAIN: &str = "ca-chain.crt";
pub const CA_BUNDLE: &str = "ca-bundle.crt";
pub const META: &str = "meta.json";
pub const TOKEN: &str = "instance-token.jwt";
/// The key generated for an enrollment in flight: persisted before the request is sent.
pub const PENDING_KEY: &str = "enroll-pending.key";

const MAX_PKI_FILE: u64 = 256 * 1024;

/// A fresh Ed25519 key pair.
pub fn generate_key() -> Result<rcgen::KeyPair> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| Error::Crypto(e.to_string()))
}

pub fn key_from_pem(pem: &str) -> Result<rcgen::KeyPair> {
    rcgen::KeyPair::from_pem(pem).map_err(|e| Error::Crypto(format!("node key: {e}")))
}

/// A PKCS#10 CSR with `CN=<subject>` and nothing else (the platform forces the CN anyway).
pub fn csr_pem(key: &rcgen::KeyPair, subject: &str) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::Crypto(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    let csr = params
        .serialize_request(key)
        .map_err(|e| Error::Crypto(format!("CSR: {e}")))?;
    csr.pem()
        .map_err(|e| Error::Crypto(format!("CSR PEM: {e}")))
}

/// What `meta.json` holds: the contract's four fields plus the platform URL, so a restart needs
/// no network discovery once enrolled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub instance_id: String,
    pub mtls_subject: String,
    #[serde(default)]
    pub certificate_id: String,
    #[serde(default)]
    pub not_after: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_url: Option<String>,
}

/// The facts an operator wants from a certificate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertInfo {
    pub subject_cn: String,
    pub issuer: String,
    /// Lowercase hex, no separators.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// The first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<CertInfo> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| Error::malformed("certificate PEM", e))?;
        let cert = p
            .parse_x509()
            .map_err(|e| Error::malformed("certificate", e))?;
        let subject_cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(CertInfo {
            subject_cn,
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().replace(':', "").to_lowercase(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }

    /// Fraction of the validity period elapsed at `now` (0.0 before, 1.0 at expiry).
    pub fn lifetime_used(&self, now: OffsetDateTime) -> f64 {
        let total = (self.not_after - self.not_before).as_seconds_f64();
        if total <= 0.0 {
            return 1.0;
        }
        ((now - self.not_before).as_seconds_f64() / total).clamp(0.0, 1.0)
    }
}

/// Everything needed to talk to the platform as this node.
#[derive(Clone)]
pub struct Credentials {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_chain_pem: String,
    /// Trust anchors for the platform's server certificate (from the identity).
    pub ca_bundle_pem: String,
    pub token: Option<String>,
    pub meta: Meta,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key or the token.
        f.debug_struct("Credentials")
            .field("meta", &self.meta)
            .field("has_token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    crate::identity::rfc3339(t)
}

/// The `exp` claim of a JWT, read without verifying it (we hold it; the platform verifies it).
pub fn jwt_expiry(token: &str) -> Option<OffsetDateTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    OffsetDateTime::from_unix_timestamp(v.get("exp")?.as_i64()?).ok()
}

#[derive(Debug, Clone)]
pub struct PkiStore {
    dir: PathBuf,
}

impl PkiStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Persist the key for an enrollment before its request is sent (node-api.md Part A §3).
    pub fn write_pending_key(&self, key_pem: &str) -> Result<()> {
        ensure_dir(&self.dir, 0o700)?;
        atomic_write(&self.path(PENDING_KEY), key_pem.as_bytes(), 0o600)
    }

    pub fn pending_key(&self) -> Result<Option<String>> {
        read_text(&self.path(PENDING_KEY))
    }

    pub fn discard_pending_key(&self) -> Result<()> {
        remove_if_exists(&self.path(PENDING_KEY))
    }

    /// Write a complete credential set; `meta.json` last.
    pub fn commit(
        &self,
        resp: &EnrollResponse,
        key_pem: &str,
        ca_bundle_pem: &str,
        platform_url: Option<&str>,
    ) -> Result<Meta> {
        resp.validate()?;
        ensure_dir(&self.dir, 0o700)?;
        let meta = Meta {
            instance_id: resp.instance_id.clone(),
            mtls_subject: resp
                .mtls_subject
                .clone()
                .unwrap_or_else(|| resp.instance_id.clone()),
            certificate_id: resp.certificate_id.clone().unwrap_or_default(),
            not_after: resp.not_after.clone().unwrap_or_default(),
            platform_url: platform_url.map(str::to_string),
        };
        let meta_json =
            serde_json::to_vec_pretty(&meta).map_err(|e| Error::malformed("meta.json", e))?;
        atomic_write(&self.path(CA_BUNDLE), ca_bundle_pem.as_bytes(), 0o644)?;
        atomic_write(&self.path(CA_CHAIN), resp.ca_chain_pem.as_bytes(), 0o644)?;
        atomic_write(&self.path(NODE_KEY), key_pem.as_bytes(), 0o600)?;
        atomic_write(&self.path(NODE_CRT), resp.cert_pem.as_bytes(), 0o644)?;
        match &resp.instance_token {
            Some(t) => atomic_write(&self.path(TOKEN), t.as_bytes(), 0o600)?,
            None => remove_if_exists(&self.path(TOKEN))?,
        }
        atomic_write(&self.path(META), &meta_json, 0o644)?;
        self.discard_pending_key()?;
        Ok(meta)
    }

    /// `Ok(None)` when not enrolled (no `meta.json`); an error when the set is damaged.
    pub fn load(&self) -> Result<Option<Credentials>> {
        let Some(meta_text) = read_text(&self.path(META))? else {
            return Ok(None);
        };
        let meta: Meta =
            serde_json::from_str(&meta_text).map_err(|e| Error::malformed("pki/meta.json", e))?;
        let need = |name: &str| -> Result<String> {
            read_text(&self.path(name))?.ok_or_else(|| {
                Error::NotFound(format!("{} (meta.json exists)", self.path(name).display()))
            })
        };
        Ok(Some(Credentials {
            key_pem: need(NODE_KEY)?,
            cert_pem: need(NODE_CRT)?,
            ca_chain_pem: need(CA_CHAIN)?,
            ca_bundle_pem: need(CA_BUNDLE)?,
            token: read_text(&self.path(TOKEN))?.map(|t| t.trim().to_string()),
            meta,
        }))
    }
}

fn read_text(p: &Path) -> Result<Option<String>> {
    match read_optional(p, MAX_PKI_FILE)? {
        None => Ok(None),
        Some(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| Error::malformed("PKI file", format!("{} is not UTF-8", p.display()))),
    }
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn self_signed(cn: &str) -> (String, rcgen::KeyPair) {
        let key = generate_key().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key)
    }

    #[test]
    fn csr_carries_the_subject() {
        let key = generate_key().unwrap();
        let pem = csr_pem(&key, "0b6a4c1e-uuid").unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
                .unwrap();
        let cn = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .unwrap();
        assert_eq!(cn.as_str().unwrap(), "0b6a4c1e-uuid");
    }

    #[test]
    fn commit_then_load_round_trips_with_modes() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path().join("pki"));
        assert!(store.load().unwrap().is_none());
        let (cert, key) = self_signed("inst-1");
        store.write_pending_key(&key.serialize_pem()).unwrap();
        let resp = EnrollResponse {
            cert_pem: cert.clone(),
            ca_chain_pem: cert.clone(),
            instance_id: "inst-1".into(),
            mtls_subject: None,
            not_after: Some("2027-01-01T00:00:00Z".into()),
            certificate_id: Some("c1".into()),
            instance_token: Some("a.b.c".into()),
        };
        store
            .commit(&resp, &key.serialize_pem(), &cert, Some("https://p"))
            .unwrap();
        let creds = store.load().unwrap().unwrap();
        assert_eq!(creds.meta.mtls_subject, "inst-1");
        assert_eq!(creds.meta.platform_url.as_deref(), Some("https://p"));
        assert_eq!(creds.token.as_deref(), Some("a.b.c"));
        let mode = |n: &str| {
            std::fs::metadata(store.dir().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode(NODE_KEY), 0o600);
        assert_eq!(mode(TOKEN), 0o600);
        assert_eq!(mode(NODE_CRT), 0o644);
        assert_eq!(mode(META), 0o644);
        assert!(
            store.pending_key().unwrap().is_none(),
            "pending key consumed"
        );
        assert!(
            format!("{creds:?}").find("BEGIN").is_none(),
            "Debug never prints secrets"
        );
    }

    #[test]
    fn damaged_set_is_an_error_not_absent() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        std::fs::write(
            d.path().join(META),
            r#"{"instance_id":"i","mtls_subject":"i"}"#,
        )
        .unwrap();
        assert!(matches!(store.load(), Err(Error::NotFound(_))));
        std::fs::write(d.path().join(META), "{").unwrap();
        assert!(matches!(store.load(), Err(Error::Malformed { .. })));
    }

    #[test]
    fn cert_info_and_lifetime() {
        let (cert, _) = self_signed("node-7");
        let info = CertInfo::from_pem(&cert).unwrap();
        assert_eq!(info.subject_cn, "node-7");
        assert!(!info.serial.is_empty());
        assert!(info.lifetime_used(info.not_before) < 1e-9);
        assert!((info.lifetime_used(info.not_after) - 1.0).abs() < 1e-9);
        assert!(CertInfo::from_pem("garbage").is_err());
    }

    #[test]
    fn jwt_expiry_reads_exp() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"HS256"}"#),
            b64(r#"{"exp":1800000000}"#)
        );
        assert_eq!(jwt_expiry(&t).unwrap().unix_timestamp(), 1_800_000_000);
        assert!(jwt_expiry("nonsense").is_none());
    }
}
