//! `trusted_root.json` (Sigstore TrustedRoot, protobuf JSON): certificate authorities,
//! transparency logs (Rekor v1/v2), CT logs and timestamp authorities, each with a validity window.

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::cert::Certificate;
use super::keys::{PublicKey, b64};
use super::{VerifyError, VerifyErrorKind};

/// A closed time interval; `end: None` = still valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl Validity {
    pub const ALWAYS: Validity = Validity {
        start: None,
        end: None,
    };

    /// Closed interval: both ends inclusive.
    pub fn contains(&self, t: i64) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}

/// A transparency log (Rekor) or CT log.
#[derive(Debug, Clone)]
pub struct TransparencyLog {
    pub base_url: String,
    /// logId.keyId (for Rekor v1 and CT: SHA-256 of the SPKI).
    pub key_id: Vec<u8>,
    /// `None` when the key could not be parsed (it is then never used to accept anything).
    pub key: Option<PublicKey>,
    pub valid_for: Validity,
}

/// A certificate authority or timestamp authority.
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    pub uri: String,
    /// Leaf-most first, root last.
    pub chain: Vec<Certificate>,
    pub valid_for: Validity,
}

/// A parsed trusted root.
#[derive(Debug, Clone)]
pub struct TrustedRoot {
    pub tlogs: Vec<TransparencyLog>,
    pub ctlogs: Vec<TransparencyLog>,
    pub certificate_authorities: Vec<CertificateAuthority>,
    pub timestamp_authorities: Vec<CertificateAuthority>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoot {
    media_type: Option<String>,
    #[serde(default)]
    tlogs: Vec<RawLog>,
    #[serde(default)]
    ctlogs: Vec<RawLog>,
    #[serde(default)]
    certificate_authorities: Vec<RawCa>,
    #[serde(default)]
    timestamp_authorities: Vec<RawCa>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLog {
    #[serde(default)]
    base_url: String,
    public_key: RawKey,
    log_id: RawLogId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawKey {
    raw_bytes: Option<String>,
    key_details: Option<String>,
    valid_for: Option<RawRange>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogId {
    key_id: String,
}

#[derive(Deserialize)]
struct RawRange {
    start: Option<String>,
    end: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCa {
    #[serde(default)]
    uri: String,
    cert_chain: RawChain,
    valid_for: Option<RawRange>,
}

#[derive(Deserialize)]
struct RawChain {
    #[serde(default)]
    certificates: Vec<RawCert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawCert {
    pub raw_bytes: String,
}

fn root_err(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::TrustRoot, msg)
}

fn parse_time(field: &str, s: &str) -> Result<i64, VerifyError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| {
            root_err(format!(
                "trusted root: {field} `{s}` is not an RFC 3339 time: {e}"
            ))
        })
}

fn parse_range(what: &str, r: Option<&RawRange>) -> Result<Validity, VerifyError> {
    let Some(r) = r else {
        return Ok(Validity::ALWAYS);
    };
    let start = r.start.as_deref().ok_or_else(|| {
        root_err(format!(
            "trusted root: {what} has a validFor without `start`"
        ))
    })?;
    let start = parse_time("validFor.start", start)?;
    let end = r
        .end
        .as_deref()
        .map(|e| parse_time("validFor.end", e))
        .transpose()?;
    if end.is_some_and(|e| e < start) {
        return Err(root_err(format!(
            "trusted root: {what} validFor ends before it starts"
        )));
    }
    Ok(Validity {
        start: Some(start),
        end,
    })
}

fn parse_log(what: &str, l: &RawLog) -> Result<TransparencyLog, VerifyError> {
    let key_id =
        b64("logId.keyId", &l.log_id.key_id).map_err(|e| root_err(format!("trusted root: {e}")))?;
    let valid_for = parse_range(what, l.public_key.valid_for.as_ref())?;
    let key = match &l.public_key.raw_bytes {
        Some(raw) => {
            let der = b64("publicKey.rawBytes", raw)
                .map_err(|e| root_err(format!("trusted root: {e}")))?;
            match PublicKey::from_spki_der(&der) {
                Ok(k) => Some(k),
                Err(_)
                    if l.public_key
                        .key_details
                        .as_deref()
                        .is_some_and(|d| d.starts_with("PKCS1_RSA")) =>
                {
                    Some(PublicKey::from_pkcs1_rsa(&der))
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    Ok(TransparencyLog {
        base_url: l.base_url.clone(),
        key_id,
        key,
        valid_for,
    })
}

fn parse_ca(what: &str, c: &RawCa) -> Result<CertificateAuthority, VerifyError> {
    let chain = c
        .cert_chain
        .certificates
        .iter()
        .map(|rc| {
            let der = b64("certificate rawBytes", &rc.raw_bytes)?;
            Certificate::from_der(&der)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| root_err(format!("trusted root: {what}: {e}")))?;
    if chain.is_empty() {
        return Err(root_err(format!(
            "trusted root: {what} has an empty certificate chain"
        )));
    }
    Ok(CertificateAuthority {
        uri: c.uri.clone(),
        chain,
        valid_for: parse_range(what, c.valid_for.as_ref())?,
    })
}

impl TrustedRoot {
    /// Parses a `trusted_root.json`. Malformed entries (bad base64, unparsable certificates, a
    /// `validFor` without `start`) reject the whole root.
    pub fn from_json(bytes: &[u8]) -> Result<TrustedRoot, VerifyError> {
        let raw: RawRoot = serde_json::from_slice(bytes)
            .map_err(|e| root_err(format!("trusted root is not valid TrustedRoot JSON: {e}")))?;
        if let Some(mt) = &raw.media_type
            && !mt.starts_with("application/vnd.dev.sigstore.trustedroot")
        {
            return Err(root_err(format!(
                "trusted root has an unknown media type `{mt}`"
            )));
        }
        Ok(TrustedRoot {
            tlogs: raw
                .tlogs
                .iter()
                .map(|l| parse_log("tlog", l))
                .collect::<Result<_, _>>()?,
            ctlogs: raw
                .ctlogs
                .iter()
                .map(|l| parse_log("ctlog", l))
                .collect::<Result<_, _>>()?,
            certificate_authorities: raw
                .certificate_authorities
                .iter()
                .map(|c| parse_ca("certificate authority", c))
                .collect::<Result<_, _>>()?,
            timestamp_authorities: raw
                .timestamp_authorities
                .iter()
                .map(|c| parse_ca("timestamp authority", c))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn tlog(&self, key_id: &[u8]) -> Option<&TransparencyLog> {
        self.tlogs.iter().find(|l| l.key_id == key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = r#"{
      "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
      "tlogs": [{"baseUrl": "https://log.example", "hashAlgorithm": "SHA2_256",
        "publicKey": {"rawBytes": "MCowBQYDK2VwAyEAPn+AREHoBaZ7wgS1zBqpxmLSGnyhxXj4lFxSdWVB8o8=",
                      "keyDetails": "PKIX_ED25519", "validFor": {"start": "2025-04-16T00:00:00Z", "end": "2025-05-01T00:00:00Z"}},
        "logId": {"keyId": "8w1amZ2S5mJIQkQmPxdMuOrL/oJkvFg9MnQXmeOCXck="}}],
      "certificateAuthorities": [], "ctlogs": [], "timestampAuthorities": []
    }"#;

    #[test]
    fn parses_log_with_closed_window() {
        let r = TrustedRoot::from_json(ROOT.as_bytes()).expect("root");
        assert_eq!(r.tlogs.len(), 1);
        let l = &r.tlogs[0];
        assert_eq!(l.key_id.len(), 32);
        assert!(l.key.is_some());
        let end = parse_time("t", "2025-05-01T00:00:00Z").expect("time");
        assert!(l.valid_for.contains(end));
        assert!(!l.valid_for.contains(end + 1));
        assert!(l.valid_for.contains(end - 86_400));
        assert!(!l.valid_for.contains(0));
    }

    #[test]
    fn validity_without_start_is_rejected() {
        let bad = ROOT.replace(
            r#"{"start": "2025-04-16T00:00:00Z", "end": "2025-05-01T00:00:00Z"}"#,
            "{}",
        );
        let e = TrustedRoot::from_json(bad.as_bytes()).expect_err("must reject");
        assert_eq!(e.kind(), VerifyErrorKind::TrustRoot);
        assert!(e.to_string().contains("start"));
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(TrustedRoot::from_json(b"{\"tlogs\": 5}").is_err());
        assert!(TrustedRoot::from_json(b"not json").is_err());
    }

    #[test]
    fn production_root_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/sigstore/public-good/trusted_root.json"
        );
        let bytes = std::fs::read(path).expect("fixture");
        let r = TrustedRoot::from_json(&bytes).expect("production root");
        assert!(!r.certificate_authorities.is_empty());
        assert!(!r.tlogs.is_empty());
        assert!(!r.ctlogs.is_empty());
        assert!(!r.timestamp_authorities.is_empty());
    }
}
