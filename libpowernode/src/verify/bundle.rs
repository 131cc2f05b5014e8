//! Sigstore bundles v0.1/v0.2/v0.3 (protobuf JSON), both media type spellings.
//!
//! The parse is strict where the protobuf schema is: each oneof (the signed content, the
//! verification material) holds exactly one member, and the media type must match the content
//! (v0.1 and v0.2 have no single `certificate`, v0.3 no `x509CertificateChain`; v0.1 entries
//! carry a signed entry timestamp, v0.2+ entries an inclusion proof). What one bundle may cost
//! to verify is capped before any signature is checked (see the `MAX_*` constants).

use serde_json::Value;

use super::cert::Certificate;
use super::keys::b64;
use super::{VerifyError, VerifyErrorKind};

/// Verification material.
#[derive(Debug, Clone)]
pub enum Material {
    /// Leaf first (v0.1/v0.2 `x509CertificateChain`, or v0.3 `certificate`).
    Certificates(Vec<Certificate>),
    /// `publicKey` with its hint (key-based signing).
    PublicKey { hint: Option<String> },
}

/// A DSSE envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub signatures: Vec<Vec<u8>>,
}

impl Envelope {
    /// DSSE pre-authentication encoding.
    pub fn pae(&self) -> Vec<u8> {
        let mut out = format!(
            "DSSEv1 {} {} {} ",
            self.payload_type.len(),
            self.payload_type,
            self.payload.len()
        )
        .into_bytes();
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Signed content.
#[derive(Debug, Clone)]
pub enum Content {
    Message {
        /// `SHA2_256`, …
        digest_algorithm: String,
        digest: Vec<u8>,
        signature: Vec<u8>,
    },
    Dsse(Envelope),
}

impl Content {
    /// The signature bytes (the single DSSE signature for envelopes).
    pub fn signature(&self) -> Option<&[u8]> {
        match self {
            Content::Message { signature, .. } => Some(signature),
            Content::Dsse(e) => e.signatures.first().map(Vec::as_slice),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InclusionProof {
    pub log_index: i64,
    pub root_hash: Vec<u8>,
    pub tree_size: i64,
    pub hashes: Vec<Vec<u8>>,
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TlogEntry {
    pub log_index: i64,
    pub key_id: Vec<u8>,
    pub kind: String,
    pub version: String,
    /// 0 when absent (Rekor v2).
    pub integrated_time: i64,
    pub signed_entry_timestamp: Option<Vec<u8>>,
    pub inclusion_proof: Option<InclusionProof>,
    /// canonicalizedBody, decoded.
    pub body: Vec<u8>,
    /// canonicalizedBody as it appears in the bundle (base64), for the SET payload.
    pub body_b64: String,
}

/// A parsed bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Minor version: 1, 2 or 3.
    pub minor: u8,
    pub material: Material,
    pub tlog_entries: Vec<TlogEntry>,
    /// DER TimeStampResp blobs (RFC 3161).
    pub rfc3161_timestamps: Vec<Vec<u8>>,
    pub content: Content,
}

/// Largest bundle accepted, in bytes. Conformance and module bundles weigh 3–20 KiB; the bulk of
/// a large one is a DSSE payload (an in-toto statement), which 4 MiB still holds while keeping
/// the JSON tree one bundle can make the parser build small.
pub const MAX_BUNDLE_BYTES: usize = 4 << 20;
/// Most RFC 3161 timestamps accepted. Each costs a CMS parse and a signature check against
/// every trusted TSA (≈ 2 ms); signers attach one, rarely two.
pub const MAX_TIMESTAMPS: usize = 32;
/// Most transparency-log entries accepted (verification itself needs exactly one).
pub const MAX_TLOG_ENTRIES: usize = 8;
/// Longest `x509CertificateChain` accepted (Fulcio: leaf, intermediate, root).
pub const MAX_CHAIN_CERTIFICATES: usize = 8;
/// Most DSSE signatures accepted (verification itself needs exactly one).
pub const MAX_DSSE_SIGNATURES: usize = 8;
/// Most hashes in one inclusion proof: a tree of 2^64 leaves needs 64.
pub const MAX_PROOF_HASHES: usize = 64;

fn berr(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Bundle, msg)
}

fn s<'a>(v: &'a Value, field: &str) -> Result<&'a str, VerifyError> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| berr(format!("bundle: missing string `{field}`")))
}

fn int(v: &Value, field: &str) -> Result<Option<i64>, VerifyError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(x)) => x
            .parse()
            .map(Some)
            .map_err(|_| berr(format!("bundle: `{field}` is not an integer"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| berr(format!("bundle: `{field}` is not an integer"))),
        Some(_) => Err(berr(format!("bundle: `{field}` is not an integer"))),
    }
}

fn bytes(v: &Value, field: &str) -> Result<Vec<u8>, VerifyError> {
    b64(field, s(v, field)?).map_err(|e| berr(format!("bundle: {e}")))
}

/// The members of a protobuf oneof present in `v` (a JSON `null` counts as absent); more than
/// one is refused.
fn one_of<'a>(
    v: &'a Value,
    what: &str,
    members: &[&'static str],
) -> Result<Option<(&'static str, &'a Value)>, VerifyError> {
    let present: Vec<(&'static str, &'a Value)> = members
        .iter()
        .filter_map(|m| v.get(*m).filter(|x| !x.is_null()).map(|x| (*m, x)))
        .collect();
    match present.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        [(a, _), (b, _), ..] => Err(berr(format!(
            "bundle carries more than one {what} (`{a}` and `{b}`); exactly one is allowed"
        ))),
    }
}

/// The array in `v[field]` (absent = empty), refused beyond `max` elements.
fn capped_array<'a>(v: &'a Value, field: &str, max: usize) -> Result<&'a [Value], VerifyError> {
    let items = match v.get(field) {
        None | Some(Value::Null) => return Ok(&[]),
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(berr(format!("bundle: `{field}` is not a list"))),
    };
    if items.len() > max {
        return Err(berr(format!(
            "bundle has {} `{field}`, more than the {max} accepted",
            items.len()
        )));
    }
    Ok(items)
}

/// Minor version from a bundle media type, or an error for unknown ones.
pub fn media_type_minor(mt: &str) -> Result<u8, VerifyError> {
    let v = mt
        .strip_prefix("application/vnd.dev.sigstore.bundle+json;version=")
        .or_else(|| {
            mt.strip_prefix("application/vnd.dev.sigstore.bundle.v")
                .and_then(|r| r.strip_suffix("+json"))
        })
        .ok_or_else(|| berr(format!("unknown bundle media type `{mt}`")))?;
    match v {
        "0.1" => Ok(1),
        "0.2" => Ok(2),
        "0.3" => Ok(3),
        other => Err(VerifyError::new(
            VerifyErrorKind::Bundle,
            format!("unsupported bundle version `{other}` (known: 0.1, 0.2, 0.3)"),
        )),
    }
}

fn cert(v: &Value) -> Result<Certificate, VerifyError> {
    let der = bytes(v, "rawBytes")?;
    Certificate::from_der(&der)
}

fn parse_entry(t: &Value) -> Result<TlogEntry, VerifyError> {
    let log_index = int(t, "logIndex")?.ok_or_else(|| berr("tlog entry without logIndex"))?;
    if log_index < 0 {
        return Err(berr("tlog entry has a negative logIndex"));
    }
    let key_id = t
        .get("logId")
        .map(|l| bytes(l, "keyId"))
        .transpose()?
        .ok_or_else(|| berr("tlog entry without logId"))?;
    let kv = t
        .get("kindVersion")
        .ok_or_else(|| berr("tlog entry without kindVersion"))?;
    let body_b64 = s(t, "canonicalizedBody")?.to_string();
    let body = b64("canonicalizedBody", &body_b64).map_err(|e| berr(format!("bundle: {e}")))?;
    let set = t
        .get("inclusionPromise")
        .map(|p| bytes(p, "signedEntryTimestamp"))
        .transpose()?;
    let proof = match t.get("inclusionProof") {
        None | Some(Value::Null) => None,
        Some(p) => {
            let hashes = capped_array(p, "hashes", MAX_PROOF_HASHES)?
                .iter()
                .map(|h| {
                    h.as_str()
                        .ok_or_else(|| berr("inclusion proof hash is not a string"))
                        .and_then(|h| b64("inclusion proof hash", h))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let log_index = int(p, "logIndex")?.unwrap_or(0);
            let tree_size =
                int(p, "treeSize")?.ok_or_else(|| berr("inclusion proof without treeSize"))?;
            if log_index < 0 || tree_size <= 0 {
                return Err(berr("inclusion proof has a negative index or empty tree"));
            }
            Some(InclusionProof {
                log_index,
                root_hash: bytes(p, "rootHash")?,
                tree_size,
                hashes,
                checkpoint: p
                    .get("checkpoint")
                    .and_then(|c| c.get("envelope"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        }
    };
    Ok(TlogEntry {
        log_index,
        key_id,
        kind: s(kv, "kind")?.to_string(),
        version: s(kv, "version")?.to_string(),
        integrated_time: int(t, "integratedTime")?.unwrap_or(0),
        signed_entry_timestamp: set,
        inclusion_proof: proof,
        body,
        body_b64,
    })
}

impl Bundle {
    pub fn from_json(data: &[u8]) -> Result<Bundle, VerifyError> {
        if data.len() > MAX_BUNDLE_BYTES {
            return Err(berr(format!(
                "bundle is {} bytes, more than the {MAX_BUNDLE_BYTES} accepted",
                data.len()
            )));
        }
        let v: Value = serde_json::from_slice(data)
            .map_err(|e| berr(format!("bundle is not valid JSON: {e}")))?;
        let minor = media_type_minor(s(&v, "mediaType")?)?;
        let vm = v
            .get("verificationMaterial")
            .ok_or_else(|| berr("bundle has no verificationMaterial"))?;
        let material = match one_of(
            vm,
            "kind of verification material",
            &["x509CertificateChain", "certificate", "publicKey"],
        )? {
            Some(("x509CertificateChain", chain)) => {
                if minor >= 3 {
                    return Err(berr(
                        "a v0.3 bundle carries a single `certificate`, not an `x509CertificateChain`",
                    ));
                }
                let certs = capped_array(chain, "certificates", MAX_CHAIN_CERTIFICATES)?
                    .iter()
                    .map(cert)
                    .collect::<Result<Vec<_>, _>>()?;
                if certs.is_empty() {
                    return Err(berr("bundle's certificate chain is empty"));
                }
                Material::Certificates(certs)
            }
            Some(("certificate", c)) => {
                if minor < 3 {
                    return Err(berr(format!(
                        "a v0.{minor} bundle has no single `certificate` (it came with v0.3)"
                    )));
                }
                Material::Certificates(vec![cert(c)?])
            }
            Some((_, k)) => Material::PublicKey {
                hint: k.get("hint").and_then(Value::as_str).map(str::to_string),
            },
            None => return Err(berr("bundle has no certificate or public key")),
        };
        let tlog_entries = capped_array(vm, "tlogEntries", MAX_TLOG_ENTRIES)?
            .iter()
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        for e in &tlog_entries {
            if minor == 1 && e.signed_entry_timestamp.is_none() {
                return Err(berr(
                    "a v0.1 bundle's tlog entry must carry an inclusion promise (signed entry timestamp)",
                ));
            }
            if minor >= 2 && e.inclusion_proof.is_none() {
                return Err(VerifyError::new(
                    VerifyErrorKind::Tlog,
                    format!("a v0.{minor} bundle's tlog entry must carry an inclusion proof"),
                ));
            }
        }
        let rfc3161_timestamps = match vm.get("timestampVerificationData") {
            None | Some(Value::Null) => Vec::new(),
            Some(t) => capped_array(t, "rfc3161Timestamps", MAX_TIMESTAMPS)?
                .iter()
                .map(|t| bytes(t, "signedTimestamp"))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let content = match one_of(&v, "signed content", &["messageSignature", "dsseEnvelope"])? {
            Some(("messageSignature", ms)) => {
                let (alg, digest) = match ms.get("messageDigest") {
                    Some(d) => (s(d, "algorithm")?.to_string(), bytes(d, "digest")?),
                    None => (String::new(), Vec::new()),
                };
                Content::Message {
                    digest_algorithm: alg,
                    digest,
                    signature: bytes(ms, "signature")?,
                }
            }
            Some((_, env)) => {
                let signatures = capped_array(env, "signatures", MAX_DSSE_SIGNATURES)?
                    .iter()
                    .map(|x| bytes(x, "sig"))
                    .collect::<Result<Vec<_>, _>>()?;
                Content::Dsse(Envelope {
                    payload_type: s(env, "payloadType")?.to_string(),
                    payload: bytes(env, "payload")?,
                    signatures,
                })
            }
            None => return Err(berr("bundle has neither messageSignature nor dsseEnvelope")),
        };
        Ok(Bundle {
            minor,
            material,
            tlog_entries,
            rfc3161_timestamps,
            content,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            media_type_minor("application/vnd.dev.sigstore.bundle+json;version=0.1").expect("v"),
            1
        );
        assert_eq!(
            media_type_minor("application/vnd.dev.sigstore.bundle.v0.3+json").expect("v"),
            3
        );
        assert!(media_type_minor("application/vnd.dev.sigstore.bundle+json;version=99.9").is_err());
        assert!(media_type_minor("application/json").is_err());
    }

    #[test]
    fn pae_matches_spec_example() {
        let e = Envelope {
            payload_type: "http://example.com/HelloWorld".into(),
            payload: b"hello world".to_vec(),
            signatures: vec![],
        };
        assert_eq!(
            e.pae(),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
