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
use crate::fsutil::{atomic_write, ensure_dir, fsync_dir, read_optional};
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

/// What a new credential set must match before it replaces the current one.
#[derive(Debug, Clone, Default)]
pub struct Expect<'a> {
    /// The certificate's CN must be this (the instance's mTLS subject), when known.
    pub subject: Option<&'a str>,
    /// On rotation, the new chain must end in one of these roots (the CA may not change silently).
    pub previous_chain_pem: Option<&'a str>,
}

/// Check that `cert_pem` is for `key`, names the expected subject and chains to `chain_pem`
/// (and to the previous chain's CA on rotation), as a client certificate valid now.
pub fn check_certificate(
    cert_pem: &str,
    chain_pem: &str,
    key: &rcgen::KeyPair,
    expect: &Expect<'_>,
) -> Result<CertInfo> {
    use rustls::pki_types::pem::PemObject;
    let info = CertInfo::from_pem(cert_pem)?;
    let (_, p) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| Error::malformed("certificate PEM", e))?;
    let cert = p
        .parse_x509()
        .map_err(|e| Error::malformed("certificate", e))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::Crypto(
            "the certificate is not for this node's key".into(),
        ));
    }
    if let Some(want) = expect.subject
        && info.subject_cn != want
    {
        return Err(Error::Crypto(format!(
            "certificate subject {:?} is not {want:?}",
            info.subject_cn
        )));
    }
    let leaf = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::malformed("certificate PEM", e))?;
    for (what, pem) in [
        ("issuing chain", Some(chain_pem)),
        ("previous CA", expect.previous_chain_pem),
    ] {
        let Some(pem) = pem else { continue };
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::transport::parse_certs(pem, "CA chain")? {
            roots.add(c).map_err(|e| Error::malformed("CA chain", e))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .map_err(|e| Error::Crypto(format!("client verifier: {e}")))?;
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| Error::Crypto(format!("certificate does not chain to the {what}: {e}")))?;
    }
    Ok(info)
}

/// A generation's directory name: the lowercase hex SHA-256 of the certificate's DER. Unlike
/// the serial, which the platform chooses and may repeat, it differs for every certificate, so a
/// new key is never mistaken for an old generation. Generations named by serial (written before)
/// still load: [`PkiStore::load`] follows `current` whatever the name.
pub fn generation_name(cert_pem: &str) -> Result<String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| Error::malformed("certificate PEM", e))?;
    Ok(crate::oci::sha256_hex(&p.contents))
}

/// The PKI directory. Each credential set is one *generation* directory `gen/<sha256>/`, written
/// completely and fsync-ed before the `current` symlink is switched to it with one rename; the
/// contract's file names (`node.key`, `node.crt`, …) are stable symlinks through `current`. So
/// every reader sees one whole generation, and a crash at any step leaves either the old or the
/// new set current — never a key of one and a certificate of the other.
#[derive(Debug, Clone)]
pub struct PkiStore {
    dir: PathBuf,
}

const GEN_DIR: &str = "gen";
const CURRENT: &str = "current";
/// Generations kept besides the current one: the last good set stays until the next rotation.
const KEEP_PREVIOUS: usize = 1;
const SET_FILES: [&str; 6] = [NODE_KEY, NODE_CRT, CA_CHAIN, CA_BUNDLE, META, TOKEN];

/// The node key, the JWT and a pending key: the owner (enrolld or certd) and group `powernode`
/// (the platform-facing daemons, which all speak mTLS with the key) may read them; nobody else.
const SECRET_MODE: u32 = 0o640;

/// A PKI directory: enrolld and certd (two uids, both in group powernode) both add generations,
/// so the group may write. Below the setgid PKI directory tmpfiles creates, new entries inherit
/// group powernode. The mode is set when this call creates the directory (the umask would
/// otherwise take the group's bits) and left alone otherwise: only the owner may change it.
fn ensure_shared_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    ensure_dir(dir, 0o770)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
        .map_err(|e| Error::io("chmod", dir, e))
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

    /// Persist the key for a request in flight (enrollment or rotation) before it is sent.
    pub fn write_pending_key(&self, key_pem: &str) -> Result<()> {
        ensure_shared_dir(&self.dir)?;
        atomic_write(&self.path(PENDING_KEY), key_pem.as_bytes(), SECRET_MODE)
    }

    pub fn pending_key(&self) -> Result<Option<String>> {
        read_text(&self.path(PENDING_KEY))
    }

    pub fn discard_pending_key(&self) -> Result<()> {
        remove_if_exists(&self.path(PENDING_KEY))
    }

    /// The current generation's name ([`generation_name`]), or `None` before enrollment. One readlink:
    /// cheap enough to check before every request, which is how clients pick up a rotation.
    pub fn generation(&self) -> Result<Option<String>> {
        let link = self.path(CURRENT);
        match std::fs::read_link(&link) {
            Ok(t) => Ok(t.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("readlink", link, e)),
        }
    }

    /// Validate and install a credential set from an enroll or refresh reply; returns its meta.
    /// On rotation (`current` exists) the new certificate must keep the subject and the CA.
    pub fn commit(
        &self,
        resp: &EnrollResponse,
        key_pem: &str,
        ca_bundle_pem: &str,
        platform_url: Option<&str>,
    ) -> Result<Meta> {
        resp.validate()?;
        let previous = self.load()?;
        let key = key_from_pem(key_pem)?;
        let subject = resp
            .mtls_subject
            .clone()
            .unwrap_or_else(|| resp.instance_id.clone());
        let expect = Expect {
            subject: Some(
                previous
                    .as_ref()
                    .map(|p| p.meta.mtls_subject.as_str())
                    .unwrap_or(&subject),
            ),
            previous_chain_pem: previous.as_ref().map(|p| p.ca_chain_pem.as_str()),
        };
        let info = check_certificate(&resp.cert_pem, &resp.ca_chain_pem, &key, &expect)?;
        let meta = Meta {
            instance_id: resp.instance_id.clone(),
            mtls_subject: subject,
            certificate_id: resp.certificate_id.clone().unwrap_or_default(),
            not_after: resp
                .not_after
                .clone()
                .unwrap_or_else(|| rfc3339(info.not_after)),
            platform_url: platform_url
                .map(str::to_string)
                .or_else(|| previous.as_ref().and_then(|p| p.meta.platform_url.clone())),
        };
        let meta_json =
            serde_json::to_vec_pretty(&meta).map_err(|e| Error::malformed("meta.json", e))?;
        ensure_shared_dir(&self.dir)?;
        let gens = self.path(GEN_DIR);
        ensure_shared_dir(&gens)?;
        let name = generation_name(&resp.cert_pem)?;
        let staging = gens.join(format!(
            ".staging-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        ensure_shared_dir(&staging)?;
        atomic_write(&staging.join(CA_BUNDLE), ca_bundle_pem.as_bytes(), 0o644)?;
        atomic_write(&staging.join(CA_CHAIN), resp.ca_chain_pem.as_bytes(), 0o644)?;
        atomic_write(&staging.join(NODE_KEY), key_pem.as_bytes(), SECRET_MODE)?;
        atomic_write(&staging.join(NODE_CRT), resp.cert_pem.as_bytes(), 0o644)?;
        if let Some(t) = &resp.instance_token {
            atomic_write(&staging.join(TOKEN), t.as_bytes(), SECRET_MODE)?;
        }
        atomic_write(&staging.join(META), &meta_json, 0o644)?;
        let target = gens.join(&name);
        if target.exists() {
            // The same certificate twice (a replayed reply): it certifies the same key, so the
            // existing generation is equivalent.
            std::fs::remove_dir_all(&staging).map_err(|e| Error::io("remove", &staging, e))?;
        } else {
            std::fs::rename(&staging, &target)
                .map_err(|e| Error::io("rename into place", &target, e))?;
        }
        fsync_dir(&gens)?;
        crate::fault::point("rotate-mid-swap");
        self.switch_current(&name)?;
        self.discard_pending_key()?;
        self.prune(&name);
        Ok(meta)
    }

    /// Point `current` at `gen/<name>` with one rename, and make sure the stable names exist.
    fn switch_current(&self, name: &str) -> Result<()> {
        let tmp = self.path(&format!(".current.tmp-{}", std::process::id()));
        remove_if_exists(&tmp)?;
        std::os::unix::fs::symlink(Path::new(GEN_DIR).join(name), &tmp)
            .map_err(|e| Error::io("symlink", &tmp, e))?;
        std::fs::rename(&tmp, self.path(CURRENT))
            .map_err(|e| Error::io("rename into place", self.path(CURRENT), e))?;
        for f in SET_FILES {
            let link = self.path(f);
            let want = Path::new(CURRENT).join(f);
            match std::fs::read_link(&link) {
                Ok(t) if t == want => continue,
                // A flat file from an older layout, or a wrong link: replace it atomically.
                _ => {
                    let tmp = self.path(&format!(".{f}.link-{}", std::process::id()));
                    remove_if_exists(&tmp)?;
                    std::os::unix::fs::symlink(&want, &tmp)
                        .map_err(|e| Error::io("symlink", &tmp, e))?;
                    std::fs::rename(&tmp, &link)
                        .map_err(|e| Error::io("rename into place", &link, e))?;
                }
            }
        }
        fsync_dir(&self.dir)
    }

    /// Remove generations older than the previous one, and abandoned staging directories.
    fn prune(&self, current: &str) {
        let gens = self.path(GEN_DIR);
        let Ok(entries) = std::fs::read_dir(&gens) else {
            return;
        };
        let mut old: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == current {
                continue;
            }
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            old.push((mtime, e.path()));
        }
        old.sort();
        let staging: Vec<_> = old
            .iter()
            .filter(|(_, p)| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".staging-"))
            })
            .cloned()
            .collect();
        let generations: Vec<_> = old
            .iter()
            .filter(|(_, p)| !staging.iter().any(|(_, s)| s == p))
            .cloned()
            .collect();
        let drop_n = generations.len().saturating_sub(KEEP_PREVIOUS);
        for (_, p) in staging.iter().chain(generations.iter().take(drop_n)) {
            if let Err(e) = std::fs::remove_dir_all(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot prune old PKI generation");
            }
        }
    }

    /// The current credential set. `Ok(None)` when not enrolled; an error when it is damaged.
    /// Reads from the resolved generation directory, so a concurrent rotation cannot mix sets.
    pub fn load(&self) -> Result<Option<Credentials>> {
        let base = match self.generation()? {
            Some(g) => self.path(GEN_DIR).join(g),
            // The flat layout (upstream agent, or before the first rotation of an old node).
            None => self.dir.clone(),
        };
        let Some(meta_text) = read_text(&base.join(META))? else {
            return Ok(None);
        };
        let meta: Meta =
            serde_json::from_str(&meta_text).map_err(|e| Error::malformed("pki/meta.json", e))?;
        let need = |name: &str| -> Result<String> {
            read_text(&base.join(name))?.ok_or_else(|| {
                Error::NotFound(format!("{} (meta.json exists)", base.join(name).display()))
            })
        };
        Ok(Some(Credentials {
            key_pem: need(NODE_KEY)?,
            cert_pem: need(NODE_CRT)?,
            ca_chain_pem: need(CA_CHAIN)?,
            ca_bundle_pem: need(CA_BUNDLE)?,
            token: read_text(&base.join(TOKEN))?.map(|t| t.trim().to_string()),
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

    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = generate_key().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    fn leaf(ca: &Ca, key: &rcgen::KeyPair, cn: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.signed_by(key, &ca.issuer).unwrap().pem()
    }

    fn reply(ca: &Ca, cert: String, id: &str) -> EnrollResponse {
        EnrollResponse {
            cert_pem: cert,
            ca_chain_pem: ca.pem.clone(),
            instance_id: id.into(),
            mtls_subject: None,
            not_after: None,
            certificate_id: Some("c1".into()),
            instance_token: Some("a.b.c".into()),
        }
    }

    #[test]
    fn commit_then_load_round_trips_with_modes() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path().join("pki"));
        assert!(store.load().unwrap().is_none());
        assert!(store.generation().unwrap().is_none());
        let ca = ca("ca");
        let key = generate_key().unwrap();
        store.write_pending_key(&key.serialize_pem()).unwrap();
        let resp = reply(&ca, leaf(&ca, &key, "inst-1"), "inst-1");
        store
            .commit(&resp, &key.serialize_pem(), &ca.pem, Some("https://p"))
            .unwrap();
        let creds = store.load().unwrap().unwrap();
        assert_eq!(creds.meta.mtls_subject, "inst-1");
        assert_eq!(creds.meta.platform_url.as_deref(), Some("https://p"));
        assert_eq!(creds.token.as_deref(), Some("a.b.c"));
        assert!(
            !creds.meta.not_after.is_empty(),
            "not_after taken from the certificate"
        );
        let mode = |n: &str| {
            std::fs::metadata(store.dir().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o770);
        assert_eq!(mode(NODE_KEY), 0o640);
        assert_eq!(mode(TOKEN), 0o640);
        assert_eq!(mode(NODE_CRT), 0o644);
        assert_eq!(mode(META), 0o644);
        // The contract's names resolve to the current generation.
        assert_eq!(
            std::fs::read_to_string(store.dir().join(NODE_KEY)).unwrap(),
            key.serialize_pem()
        );
        assert!(
            store.pending_key().unwrap().is_none(),
            "pending key consumed"
        );
        assert!(
            !format!("{creds:?}").contains("BEGIN"),
            "Debug never prints secrets"
        );
    }

    #[test]
    fn rotation_switches_generation_and_keeps_one_previous() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        let ca = ca("ca");
        let mut gens = Vec::new();
        for _ in 0..3 {
            let key = generate_key().unwrap();
            let resp = reply(&ca, leaf(&ca, &key, "inst-1"), "inst-1");
            store
                .commit(&resp, &key.serialize_pem(), &ca.pem, Some("https://p"))
                .unwrap();
            let g = store.generation().unwrap().unwrap();
            assert_eq!(g, generation_name(&resp.cert_pem).unwrap());
            assert_eq!(g.len(), 64, "hex SHA-256 of the DER: {g}");
            assert_eq!(store.load().unwrap().unwrap().key_pem, key.serialize_pem());
            gens.push(g);
        }
        let left: Vec<_> = std::fs::read_dir(d.path().join(GEN_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "current + one previous: {left:?}");
        assert!(left.contains(&gens[2]) && left.contains(&gens[1]));
        // The URL survives a refresh that does not repeat it.
        let key = generate_key().unwrap();
        store
            .commit(
                &reply(&ca, leaf(&ca, &key, "inst-1"), "inst-1"),
                &key.serialize_pem(),
                &ca.pem,
                None,
            )
            .unwrap();
        assert_eq!(
            store.load().unwrap().unwrap().meta.platform_url.as_deref(),
            Some("https://p")
        );
    }

    fn leaf_with_serial(ca: &Ca, key: &rcgen::KeyPair, cn: &str, serial: &[u8]) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.signed_by(key, &ca.issuer).unwrap().pem()
    }

    #[test]
    fn a_reused_serial_with_a_new_key_is_a_new_generation() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        let ca = ca("ca");
        let old_key = generate_key().unwrap();
        let old_cert = leaf_with_serial(&ca, &old_key, "inst-1", &[0x42, 0x07]);
        store
            .commit(
                &reply(&ca, old_cert.clone(), "inst-1"),
                &old_key.serialize_pem(),
                &ca.pem,
                Some("https://p"),
            )
            .unwrap();
        let new_key = generate_key().unwrap();
        let new_cert = leaf_with_serial(&ca, &new_key, "inst-1", &[0x42, 0x07]);
        assert_eq!(
            CertInfo::from_pem(&old_cert).unwrap().serial,
            CertInfo::from_pem(&new_cert).unwrap().serial,
            "the platform reused the serial"
        );
        store
            .commit(
                &reply(&ca, new_cert.clone(), "inst-1"),
                &new_key.serialize_pem(),
                &ca.pem,
                None,
            )
            .unwrap();
        let current = store.load().unwrap().unwrap();
        assert_eq!(
            current.key_pem,
            new_key.serialize_pem(),
            "the new key is current"
        );
        assert_eq!(current.cert_pem, new_cert);
        assert_eq!(
            store.generation().unwrap().as_deref(),
            Some(generation_name(&new_cert).unwrap().as_str())
        );
        let mut left: Vec<_> = std::fs::read_dir(d.path().join(GEN_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            generation_name(&old_cert).unwrap(),
            generation_name(&new_cert).unwrap(),
        ];
        want.sort();
        assert_eq!(left, want, "both generations kept");
        let key_in = |cert: &str| {
            std::fs::read_to_string(
                d.path()
                    .join(GEN_DIR)
                    .join(generation_name(cert).unwrap())
                    .join(NODE_KEY),
            )
            .unwrap()
        };
        assert_eq!(key_in(&old_cert), old_key.serialize_pem());
        assert_eq!(key_in(&new_cert), new_key.serialize_pem());
    }

    #[test]
    fn a_serial_named_generation_from_before_still_loads_and_rotates() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        let ca = ca("ca");
        let key = generate_key().unwrap();
        let cert = leaf(&ca, &key, "inst-1");
        store
            .commit(
                &reply(&ca, cert.clone(), "inst-1"),
                &key.serialize_pem(),
                &ca.pem,
                Some("https://p"),
            )
            .unwrap();
        // Rename it as the serial-named layout had it, `current` pointing there.
        let serial = CertInfo::from_pem(&cert).unwrap().serial;
        let hashed = generation_name(&cert).unwrap();
        std::fs::rename(
            d.path().join(GEN_DIR).join(&hashed),
            d.path().join(GEN_DIR).join(&serial),
        )
        .unwrap();
        store.switch_current(&serial).unwrap();
        assert_eq!(
            store.generation().unwrap().as_deref(),
            Some(serial.as_str())
        );
        assert_eq!(store.load().unwrap().unwrap().key_pem, key.serialize_pem());
        // The next rotation checks against it and moves on to a SHA-256 name.
        let k2 = generate_key().unwrap();
        let c2 = leaf(&ca, &k2, "inst-1");
        store
            .commit(
                &reply(&ca, c2.clone(), "inst-1"),
                &k2.serialize_pem(),
                &ca.pem,
                None,
            )
            .unwrap();
        assert_eq!(
            store.generation().unwrap(),
            Some(generation_name(&c2).unwrap())
        );
        assert!(
            d.path().join(GEN_DIR).join(&serial).is_dir(),
            "kept as the previous set"
        );
    }

    #[test]
    fn bad_refresh_replies_are_refused_and_old_credentials_kept() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        let ca1 = ca("ca");
        let key = generate_key().unwrap();
        store
            .commit(
                &reply(&ca1, leaf(&ca1, &key, "inst-1"), "inst-1"),
                &key.serialize_pem(),
                &ca1.pem,
                Some("https://p"),
            )
            .unwrap();
        let before = store.generation().unwrap();
        let new_key = generate_key().unwrap();
        let other_key = generate_key().unwrap();
        let evil = ca("ca");
        let good = leaf(&ca1, &new_key, "inst-1");
        let cases: Vec<(EnrollResponse, &str)> = vec![
            (
                reply(&ca1, leaf(&ca1, &other_key, "inst-1"), "inst-1"),
                "not for this node's key",
            ),
            (
                reply(&ca1, leaf(&ca1, &new_key, "inst-2"), "inst-1"),
                "subject",
            ),
            (
                reply(&evil, leaf(&evil, &new_key, "inst-1"), "inst-1"),
                "previous CA",
            ),
            (
                reply(&ca1, good[..good.len() / 2].to_string(), "inst-1"),
                "certificate",
            ),
        ];
        for (resp, needle) in cases {
            let e = store
                .commit(&resp, &new_key.serialize_pem(), &ca1.pem, None)
                .unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
            assert_eq!(store.generation().unwrap(), before);
            assert_eq!(store.load().unwrap().unwrap().key_pem, key.serialize_pem());
        }
    }

    #[test]
    fn crash_leftovers_do_not_change_what_is_current() {
        let d = tempfile::tempdir().unwrap();
        let store = PkiStore::new(d.path());
        let ca = ca("ca");
        let key = generate_key().unwrap();
        store
            .commit(
                &reply(&ca, leaf(&ca, &key, "i"), "i"),
                &key.serialize_pem(),
                &ca.pem,
                Some("https://p"),
            )
            .unwrap();
        // A crash mid-commit leaves a staging dir and a pending key; both are ignored by load.
        std::fs::create_dir_all(d.path().join("gen/.staging-1-0")).unwrap();
        std::fs::write(d.path().join("gen/.staging-1-0/node.key"), "partial").unwrap();
        store.write_pending_key("pending").unwrap();
        assert_eq!(store.load().unwrap().unwrap().key_pem, key.serialize_pem());
        // The next commit clears the abandoned staging directory.
        let k2 = generate_key().unwrap();
        store
            .commit(
                &reply(&ca, leaf(&ca, &k2, "i"), "i"),
                &k2.serialize_pem(),
                &ca.pem,
                None,
            )
            .unwrap();
        assert!(!d.path().join("gen/.staging-1-0").exists());
    }

    #[test]
    fn flat_layout_from_the_upstream_agent_still_loads() {
        let d = tempfile::tempdir().unwrap();
        for (f, c) in [
            (META, r#"{"instance_id":"i","mtls_subject":"i"}"#),
            (NODE_KEY, "k"),
            (NODE_CRT, "c"),
            (CA_CHAIN, "x"),
            (CA_BUNDLE, "y"),
        ] {
            std::fs::write(d.path().join(f), c).unwrap();
        }
        let creds = PkiStore::new(d.path()).load().unwrap().unwrap();
        assert_eq!(creds.meta.instance_id, "i");
        assert!(creds.token.is_none());
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
