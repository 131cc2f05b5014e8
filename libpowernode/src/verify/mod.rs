//! Offline Sigstore bundle verification (cosign keyless and key-based), written against the
//! public sigstore-conformance suite.
//!
//! Everything here is pure: parsers take bytes, nothing prints, nothing touches the network.
//! The trust material comes from a pinned `trusted_root.json` ([`TrustedRoot`]). What is checked
//! for a bundle ([`verify`]):
//!
//! * the bundle media type (v0.1, v0.2, v0.3, both spellings) and its structure;
//! * exactly one member per protobuf oneof (signed content; certificate / chain / public key),
//!   the media type matching the content, and caps on what one bundle may cost
//!   ([`bundle::MAX_BUNDLE_BYTES`] and the other `MAX_*` constants there);
//! * exactly one transparency-log entry, from a log of the trust root; its body must describe
//!   this very signature and signer (hashedrekord 0.0.1/0.0.2, dsse 0.0.1, intoto 0.0.2); only a
//!   proven log index is reported, and a Rekor v2 entry's index must be its proof's;
//! * Rekor v1 entries: the signed entry timestamp (SET) with the log key; the integrated time is
//!   then a verified signing time; the log key must be valid at it;
//! * the inclusion proof (RFC 6962 audit path) and its checkpoint (signed note: a line whose
//!   key hint and signer name are the log's must verify with the log's key, others are
//!   ignored); required from v0.2 on;
//! * RFC 3161 timestamps from a trusted TSA over the signature (TSA chain judged at genTime;
//!   strict TimeStampResp/CMS structure, the SignerInfo's sid naming the TSA certificate);
//!   the only time source for Rekor v2 entries;
//! * at least one verified time; certificates parse with x509-parser and one with an unknown
//!   critical extension is refused; the leaf certificate chains to a trusted CA and every
//!   certificate is valid at every verified time (closed intervals); an embedded SCT from a
//!   trusted CT log; SAN and OIDC issuer (ext .1.8, falling back to .1.1) match the policy;
//! * the artifact signature (message signature over the artifact or its digest; DSSE over the
//!   PAE, with the in-toto subject matching the artifact digest).
//!
//! sigstore-rs 0.15 is deliberately not used: its bundle verifier skips the SET, inclusion proof
//! and checkpoint, has no Rekor v2/TSA support and only reads the legacy issuer extension.

pub mod bundle;
pub mod cert;
pub mod der;
pub mod keys;
pub mod tlog;
pub mod trust_root;
pub mod tsa;

#[cfg(test)]
mod fixture_tests;

use std::fmt;

pub use bundle::Bundle;
pub use keys::PublicKey;
pub use trust_root::TrustedRoot;

use bundle::{Content, Material};
use keys::Hash;

/// Bounded classification of verification failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyErrorKind {
    /// The trusted root is unusable.
    TrustRoot,
    /// The bundle is malformed or of an unknown version.
    Bundle,
    /// Bytes that do not parse (DER, base64, PEM).
    Malformed,
    /// Caller input (policy, artifact) is unusable.
    Input,
    /// Certificate chain, validity or usage.
    Certificate,
    /// Signed certificate timestamp.
    Sct,
    /// Identity or issuer does not match the policy.
    Policy,
    /// Artifact signature.
    Signature,
    /// Transparency-log entry, SET, inclusion proof or checkpoint.
    Tlog,
    /// RFC 3161 timestamp or missing verified time.
    Timestamp,
    /// A feature this verifier does not implement (fails closed).
    Unsupported,
}

/// A verification failure; `Display` says why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}")]
pub struct VerifyError {
    kind: VerifyErrorKind,
    msg: String,
}

impl VerifyError {
    pub fn new(kind: VerifyErrorKind, msg: impl Into<String>) -> Self {
        VerifyError {
            kind,
            msg: msg.into(),
        }
    }

    /// A feature that is not implemented: the message always contains "not supported".
    pub fn unsupported(what: &str) -> Self {
        VerifyError::new(
            VerifyErrorKind::Unsupported,
            format!("{what} is not supported"),
        )
    }

    pub fn kind(&self) -> VerifyErrorKind {
        self.kind
    }
}

pub(crate) fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// The artifact: its bytes, or only its SHA-256 digest (`sha256:<hex>` input).
#[derive(Debug, Clone)]
pub enum Artifact {
    Bytes(Vec<u8>),
    Sha256([u8; 32]),
}

impl Artifact {
    /// Parses `sha256:<64 hex>`; `None` if `s` is not of that form.
    pub fn parse_digest(s: &str) -> Option<Artifact> {
        let hex = s.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Artifact::Sha256(out))
    }

    pub fn sha256(&self) -> Vec<u8> {
        match self {
            Artifact::Bytes(b) => Hash::Sha256.digest(b),
            Artifact::Sha256(d) => d.to_vec(),
        }
    }
}

/// A string policy: exact match, or a regular expression (unanchored, like cosign's
/// `--certificate-identity-regexp`; anchor it with `^…$` to match the whole value).
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Regex(regex::Regex),
}

impl Matcher {
    pub fn regex(pattern: &str) -> Result<Matcher, VerifyError> {
        regex::Regex::new(pattern).map(Matcher::Regex).map_err(|e| {
            VerifyError::new(
                VerifyErrorKind::Input,
                format!("invalid regular expression `{pattern}`: {e}"),
            )
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == value,
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Exact(s) => write!(f, "{s}"),
            Matcher::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

/// Who must have signed.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Keyless: a Fulcio-style certificate whose SAN and OIDC issuer match.
    Identity { identity: Matcher, issuer: Matcher },
    /// Key-based: the bundle's signature must verify with this key.
    Key(PublicKey),
}

/// What was verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The matching SAN, or "public key" for key-based bundles.
    pub identity: String,
    pub issuer: Option<String>,
    pub tlog_kind: String,
    /// The proven log index: the one the SET signs (Rekor v1), else the inclusion proof's.
    pub log_index: i64,
    /// Verified signing times (integrated time and/or RFC 3161 genTimes), Unix seconds.
    pub signing_times: Vec<i64>,
    pub bundle_version: String,
}

/// Tolerance for a log's integrated time being ahead of this machine's clock (seconds).
const MAX_CLOCK_SKEW: i64 = 300;

/// Verifies `bundle` for `artifact` under `policy` against `root`. Fails closed.
pub fn verify(
    root: &TrustedRoot,
    bundle: &Bundle,
    artifact: &Artifact,
    policy: &Policy,
) -> Result<Verified, VerifyError> {
    // 1. Signer material.
    let (leaf, key) = match (policy, &bundle.material) {
        (Policy::Key(k), Material::PublicKey { .. }) => (None, k.clone()),
        (Policy::Key(_), Material::Certificates(_)) => {
            return Err(VerifyError::new(
                VerifyErrorKind::Policy,
                "bundle is signed with a certificate; verify it with an identity policy, not --key",
            ));
        }
        (Policy::Identity { .. }, Material::PublicKey { .. }) => {
            return Err(VerifyError::new(
                VerifyErrorKind::Policy,
                "bundle carries no certificate (key-signed); an identity policy cannot be satisfied",
            ));
        }
        (Policy::Identity { .. }, Material::Certificates(certs)) => {
            let leaf = certs.first().ok_or_else(|| {
                VerifyError::new(VerifyErrorKind::Bundle, "empty certificate chain")
            })?;
            if certs.iter().any(Certificate::is_self_signed) {
                return Err(VerifyError::new(
                    VerifyErrorKind::Certificate,
                    "bundle's certificate chain includes a root certificate",
                ));
            }
            (Some(leaf), leaf.public_key()?)
        }
    };

    // 2. Artifact signature.
    let digest = artifact.sha256();
    let sig_err = |m: &str| VerifyError::new(VerifyErrorKind::Signature, m.to_string());
    match &bundle.content {
        Content::Message {
            digest_algorithm,
            digest: md,
            signature,
        } => {
            if !md.is_empty() {
                if digest_algorithm != "SHA2_256" {
                    return Err(VerifyError::unsupported(&format!(
                        "message digest algorithm {digest_algorithm}"
                    )));
                }
                if *md != digest {
                    return Err(sig_err(
                        "bundle's message digest does not match the artifact",
                    ));
                }
            }
            let r = match artifact {
                Artifact::Bytes(b) => key.verify(key.default_hash(), b, signature),
                Artifact::Sha256(d) => key.verify_prehashed(Hash::Sha256, d, signature),
            };
            r.map_err(|e| match e.kind() {
                VerifyErrorKind::Unsupported => e,
                _ => sig_err("artifact signature does not verify"),
            })?;
        }
        Content::Dsse(env) => {
            let [sig] = env.signatures.as_slice() else {
                return Err(sig_err("DSSE envelope must carry exactly one signature"));
            };
            key.verify(key.default_hash(), &env.pae(), sig)
                .map_err(|_| sig_err("DSSE envelope signature does not verify"))?;
            check_in_toto_subject(env, &digest)?;
        }
    }

    // 3. Transparency log entry.
    let entry = match bundle.tlog_entries.as_slice() {
        [one] => one,
        [] => {
            return Err(VerifyError::new(
                VerifyErrorKind::Tlog,
                "bundle has no transparency log entry",
            ));
        }
        _ => {
            return Err(VerifyError::unsupported(
                "more than one transparency log entry",
            ));
        }
    };
    tlog::check_body(
        entry,
        &tlog::Expected {
            content: &bundle.content,
            cert: leaf,
            key: &key,
        },
    )?;
    let log = root.tlog(&entry.key_id).ok_or_else(|| {
        VerifyError::new(
            VerifyErrorKind::Tlog,
            "tlog entry comes from a transparency log that is not in the trusted root",
        )
    })?;
    if bundle.minor >= 2 || entry.inclusion_proof.is_some() {
        tlog::verify_inclusion(entry, log)?;
    }
    let proof_index = entry.inclusion_proof.as_ref().map(|p| p.log_index);

    // 4. Verified times, and the log index that was proven (by the SET, or else by the
    // inclusion proof): the only one ever reported.
    let mut times = Vec::new();
    let mut proven_index = None;
    let rekor_v1 = tlog::is_rekor_v1(entry);
    if rekor_v1 {
        if entry.signed_entry_timestamp.is_some() {
            tlog::verify_set(entry, log)?;
            proven_index = Some(entry.log_index);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if entry.integrated_time > now + MAX_CLOCK_SKEW {
                return Err(VerifyError::new(
                    VerifyErrorKind::Tlog,
                    format!(
                        "integrated time {} is in the future",
                        fmt_time(entry.integrated_time)
                    ),
                ));
            }
            times.push(entry.integrated_time);
        } else if bundle.minor == 1 {
            return Err(VerifyError::new(
                VerifyErrorKind::Tlog,
                "v0.1 bundle without a signed entry timestamp",
            ));
        }
    }
    let signature = bundle
        .content
        .signature()
        .ok_or_else(|| sig_err("bundle has no signature"))?;
    for ts in &bundle.rfc3161_timestamps {
        times.push(tsa::verify(ts, signature, &root.timestamp_authorities)?);
    }
    let log_index = proven_index.or(proof_index).ok_or_else(|| {
        VerifyError::new(
            VerifyErrorKind::Tlog,
            "tlog entry has neither a signed entry timestamp nor an inclusion proof",
        )
    })?;
    if times.is_empty() {
        return Err(VerifyError::new(
            VerifyErrorKind::Timestamp,
            "no verified signing time (no signed entry timestamp and no trusted RFC 3161 timestamp)",
        ));
    }
    for t in &times {
        if !log.valid_for.contains(*t) {
            return Err(VerifyError::new(
                VerifyErrorKind::Tlog,
                format!(
                    "transparency log key is not valid at the signing time {}",
                    fmt_time(*t)
                ),
            ));
        }
    }

    // 5. Certificate: chain, SCT, identity.
    let (identity, issuer) = match (policy, leaf) {
        (Policy::Identity { identity, issuer }, Some(leaf)) => {
            let ca = root
                .certificate_authorities
                .iter()
                .filter(|ca| times.iter().all(|t| ca.valid_for.contains(*t)))
                .find_map(|ca| {
                    cert::verify_chain(leaf, &ca.chain, &times)
                        .ok()
                        .map(|()| ca)
                });
            let ca = match ca {
                Some(ca) => ca,
                None => {
                    // Say why with the first CA that at least issued the leaf.
                    let detail = root
                        .certificate_authorities
                        .iter()
                        .find(|ca| ca.chain.first().is_some_and(|c| c.subject == leaf.issuer))
                        .and_then(|ca| cert::verify_chain(leaf, &ca.chain, &times).err())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_else(|| ": issuer not in the trusted root".into());
                    return Err(VerifyError::new(
                        VerifyErrorKind::Certificate,
                        format!(
                            "signing certificate does not chain to a trusted CA valid at the signing time{detail}"
                        ),
                    ));
                }
            };
            if !leaf.has_eku(cert::OID_EKU_CODE_SIGNING) || !leaf.allows_digital_signature() {
                return Err(VerifyError::new(
                    VerifyErrorKind::Certificate,
                    "signing certificate lacks the codeSigning / digitalSignature usage",
                ));
            }
            let issuer_cert = ca
                .chain
                .first()
                .ok_or_else(|| VerifyError::new(VerifyErrorKind::TrustRoot, "empty CA chain"))?;
            leaf.verify_embedded_sct(issuer_cert, &root.ctlogs)?;
            let sans = leaf.san_values();
            let Some(san) = sans.iter().find(|s| identity.matches(s)) else {
                return Err(VerifyError::new(
                    VerifyErrorKind::Policy,
                    format!(
                        "certificate identity does not match (got {}, expected {identity})",
                        if sans.is_empty() {
                            "no SAN".to_string()
                        } else {
                            sans.join(", ")
                        }
                    ),
                ));
            };
            let got_issuer = leaf.oidc_issuer().ok_or_else(|| {
                VerifyError::new(
                    VerifyErrorKind::Policy,
                    "certificate has no OIDC issuer extension",
                )
            })?;
            if !issuer.matches(&got_issuer) {
                return Err(VerifyError::new(
                    VerifyErrorKind::Policy,
                    format!(
                        "certificate OIDC issuer does not match (got {got_issuer}, expected {issuer})"
                    ),
                ));
            }
            (san.clone(), Some(got_issuer))
        }
        _ => ("public key".to_string(), None),
    };

    Ok(Verified {
        identity,
        issuer,
        tlog_kind: format!("{} {}", entry.kind, entry.version),
        log_index,
        signing_times: times,
        bundle_version: format!("0.{}", bundle.minor),
    })
}

use cert::Certificate;

/// For in-toto payloads, one subject's sha256 must equal the artifact digest.
fn check_in_toto_subject(env: &bundle::Envelope, digest: &[u8]) -> Result<(), VerifyError> {
    if env.payload_type != "application/vnd.in-toto+json" {
        return Err(VerifyError::unsupported(&format!(
            "DSSE payload type `{}`",
            env.payload_type
        )));
    }
    let st: serde_json::Value = serde_json::from_slice(&env.payload)
        .map_err(|_| VerifyError::new(VerifyErrorKind::Bundle, "in-toto statement is not JSON"))?;
    let want: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let found = st
        .get("subject")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|subs| {
            subs.iter().any(|s| {
                s.get("digest")
                    .and_then(|d| d.get("sha256"))
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|h| h.eq_ignore_ascii_case(&want))
            })
        });
    if found {
        Ok(())
    } else {
        Err(VerifyError::new(
            VerifyErrorKind::Signature,
            "no subject of the in-toto statement matches the artifact digest",
        ))
    }
}

/// Reads and verifies in one go (bundle and trust root as bytes).
pub fn verify_bytes(
    trusted_root_json: &[u8],
    bundle_json: &[u8],
    artifact: &Artifact,
    policy: &Policy,
) -> Result<Verified, VerifyError> {
    let root = TrustedRoot::from_json(trusted_root_json)?;
    let bundle = Bundle::from_json(bundle_json)?;
    verify(&root, &bundle, artifact, policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_input_parses() {
        let d = "sha256:a0cfc71271d6e278e57cd332ff957c3f7043fdda354c4cbb190a30d56efa01bf";
        let Some(Artifact::Sha256(b)) = Artifact::parse_digest(d) else {
            panic!("digest not parsed");
        };
        assert_eq!(b[0], 0xa0);
        assert!(Artifact::parse_digest("sha256:abc").is_none());
        assert!(Artifact::parse_digest("a.txt").is_none());
    }

    #[test]
    fn matchers() {
        assert!(Matcher::Exact("a".into()).matches("a"));
        assert!(!Matcher::Exact("a".into()).matches("ab"));
        let r = Matcher::regex(r"^https://github\.com/acme/").expect("regex");
        assert!(r.matches("https://github.com/acme/x"));
        assert!(!r.matches("https://github.com/evil/x"));
        assert!(Matcher::regex("(").is_err());
    }
}
