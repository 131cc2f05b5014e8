//! X.509 certificates: parsed with x509-parser (strict DER, every extension decoded), owned
//! for the trust root and the bundle; chain verification against trust-root chains, Fulcio
//! identity extraction and embedded SCT verification (RFC 6962).
//!
//! RFC 5280 §4.2: a certificate carrying a critical extension this verifier does not evaluate
//! is refused at parse time ([`KNOWN_CRITICAL`]).

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::der;
use super::keys::{Hash, PublicKey};
use super::trust_root::TransparencyLog;
use super::{VerifyError, VerifyErrorKind};

pub const OID_SAN: &str = "2.5.29.17";
pub const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";
pub const OID_KEY_USAGE: &str = "2.5.29.15";
pub const OID_EKU: &str = "2.5.29.37";
pub const OID_SUBJECT_KEY_ID: &str = "2.5.29.14";
pub const OID_AUTHORITY_KEY_ID: &str = "2.5.29.35";
pub const OID_EKU_CODE_SIGNING: &str = "1.3.6.1.5.5.7.3.3";
pub const OID_EKU_TIME_STAMPING: &str = "1.3.6.1.5.5.7.3.8";
pub const OID_FULCIO_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
pub const OID_FULCIO_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
pub const OID_SCT_LIST: &str = "1.3.6.1.4.1.11129.2.4.2";

/// Extensions this verifier understands, and so may accept when marked critical: the ones it
/// evaluates (basic constraints, key usage, EKU, SAN, the SCT list, the Fulcio issuer) and the
/// key identifiers, which only name keys. Any other critical extension refuses the certificate.
pub const KNOWN_CRITICAL: &[&str] = &[
    OID_BASIC_CONSTRAINTS,
    OID_KEY_USAGE,
    OID_EKU,
    OID_SAN,
    OID_SUBJECT_KEY_ID,
    OID_AUTHORITY_KEY_ID,
    OID_SCT_LIST,
    OID_FULCIO_ISSUER_V1,
    OID_FULCIO_ISSUER_V2,
];

/// One extension.
#[derive(Debug, Clone)]
pub struct Extension {
    /// Dotted OID.
    pub oid: String,
    pub critical: bool,
    /// Content of extnValue (the OCTET STRING's content).
    pub value: Vec<u8>,
}

/// A parsed certificate (owned).
#[derive(Debug, Clone)]
pub struct Certificate {
    pub der: Vec<u8>,
    pub tbs: Vec<u8>,
    /// Dotted OID of the signature algorithm.
    sig_alg: String,
    signature: Vec<u8>,
    /// Content octets of the serial number INTEGER.
    pub serial: Vec<u8>,
    /// DER of the issuer Name.
    pub issuer: Vec<u8>,
    /// DER of the subject Name.
    pub subject: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub spki: Vec<u8>,
    pub extensions: Vec<Extension>,
    /// The subjectKeyIdentifier, if present.
    pub subject_key_id: Option<Vec<u8>>,
    ca: bool,
    /// `None` without a KeyUsage extension.
    digital_signature: Option<bool>,
    /// Dotted EKU OIDs.
    ekus: Vec<String>,
    sans: Vec<String>,
}

fn cert_err(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Certificate, msg)
}

/// The UTF-8 string inside a SAN otherName value (`[0] EXPLICIT UTF8String`).
fn other_name_string(value: &[u8]) -> Option<String> {
    let wrapped = der::read_all(value).ok()?;
    let inner = if wrapped.tag == 0xa0 {
        der::read_all(wrapped.value).ok()?
    } else {
        wrapped
    };
    std::str::from_utf8(inner.value).ok().map(str::to_string)
}

impl Certificate {
    pub fn from_der(bytes: &[u8]) -> Result<Certificate, VerifyError> {
        let (rest, x) = X509Certificate::from_der(bytes)
            .map_err(|e| cert_err(format!("certificate does not parse: {e}")))?;
        if !rest.is_empty() {
            return Err(cert_err("certificate: trailing data"));
        }
        let tbs = &x.tbs_certificate;
        let mut extensions = Vec::new();
        let mut ca = false;
        let mut digital_signature = None;
        let mut ekus = Vec::new();
        let mut sans = Vec::new();
        let mut subject_key_id = None;
        for ext in tbs.extensions() {
            let oid = ext.oid.to_id_string();
            if ext.critical && !KNOWN_CRITICAL.contains(&oid.as_str()) {
                return Err(cert_err(format!(
                    "certificate carries an unknown critical extension {oid}"
                )));
            }
            match ext.parsed_extension() {
                ParsedExtension::ParseError { error } => {
                    return Err(cert_err(format!(
                        "certificate extension {oid} is malformed: {error}"
                    )));
                }
                ParsedExtension::BasicConstraints(bc) => ca = bc.ca,
                ParsedExtension::KeyUsage(ku) => {
                    digital_signature = Some(ku.digital_signature());
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    let named = [
                        (eku.code_signing, OID_EKU_CODE_SIGNING),
                        (eku.time_stamping, OID_EKU_TIME_STAMPING),
                    ];
                    ekus.extend(
                        named
                            .iter()
                            .filter(|(set, _)| *set)
                            .map(|(_, o)| (*o).to_string()),
                    );
                    ekus.extend(eku.other.iter().map(|o| o.to_id_string()));
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::RFC822Name(s)
                            | GeneralName::DNSName(s)
                            | GeneralName::URI(s) => sans.push((*s).to_string()),
                            GeneralName::OtherName(_, v) => {
                                sans.extend(other_name_string(v));
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(id) => {
                    subject_key_id = Some(id.0.to_vec());
                }
                _ => {}
            }
            extensions.push(Extension {
                oid,
                critical: ext.critical,
                value: ext.value.to_vec(),
            });
        }
        Ok(Certificate {
            der: bytes.to_vec(),
            tbs: tbs.as_ref().to_vec(),
            sig_alg: x.signature_algorithm.algorithm.to_id_string(),
            signature: x.signature_value.data.to_vec(),
            serial: tbs.raw_serial().to_vec(),
            issuer: tbs.issuer.as_raw().to_vec(),
            subject: tbs.subject.as_raw().to_vec(),
            not_before: tbs.validity.not_before.timestamp(),
            not_after: tbs.validity.not_after.timestamp(),
            spki: tbs.subject_pki.raw.to_vec(),
            extensions,
            subject_key_id,
            ca,
            digital_signature,
            ekus,
            sans,
        })
    }

    pub fn extension(&self, dotted: &str) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.oid == dotted)
    }

    pub fn public_key(&self) -> Result<PublicKey, VerifyError> {
        PublicKey::from_spki_der(&self.spki)
    }

    /// Closed interval: `not_before <= t <= not_after`.
    pub fn valid_at(&self, t: i64) -> bool {
        self.not_before <= t && t <= self.not_after
    }

    pub fn is_self_signed(&self) -> bool {
        self.issuer == self.subject && self.verify_signed_by(self).is_ok()
    }

    /// Checks this certificate's signature with `issuer`'s key.
    pub fn verify_signed_by(&self, issuer: &Certificate) -> Result<(), VerifyError> {
        let hash = [
            ("1.2.840.10045.4.3.2", Hash::Sha256),
            ("1.2.840.10045.4.3.3", Hash::Sha384),
            ("1.2.840.10045.4.3.4", Hash::Sha512),
            ("1.2.840.113549.1.1.11", Hash::Sha256),
            ("1.2.840.113549.1.1.12", Hash::Sha384),
            ("1.2.840.113549.1.1.13", Hash::Sha512),
            ("1.3.101.112", Hash::Sha512),
        ]
        .into_iter()
        .find(|(o, _)| *o == self.sig_alg)
        .map(|(_, h)| h)
        .ok_or_else(|| VerifyError::unsupported("certificate signature algorithm"))?;
        issuer
            .public_key()?
            .verify(hash, &self.tbs, &self.signature)
            .map_err(|_| cert_err("certificate signature does not verify with its issuer's key"))
    }

    pub fn is_ca(&self) -> bool {
        self.ca
    }

    /// True if the certificate has an EKU extension containing `dotted`.
    pub fn has_eku(&self, dotted: &str) -> bool {
        self.ekus.iter().any(|e| e == dotted)
    }

    /// False only if a KeyUsage extension is present without digitalSignature.
    pub fn allows_digital_signature(&self) -> bool {
        self.digital_signature.unwrap_or(true)
    }

    /// SAN values (email, URI, DNS, and Fulcio's otherName username).
    pub fn san_values(&self) -> Vec<String> {
        self.sans.clone()
    }

    /// The OIDC issuer: extension .1.8 (DER string), falling back to the legacy raw .1.1.
    pub fn oidc_issuer(&self) -> Option<String> {
        if let Some(e) = self.extension(OID_FULCIO_ISSUER_V2) {
            return der::read_all(&e.value)
                .ok()
                .and_then(|t| std::str::from_utf8(t.value).ok().map(str::to_string));
        }
        self.extension(OID_FULCIO_ISSUER_V1)
            .and_then(|e| std::str::from_utf8(&e.value).ok().map(str::to_string))
    }

    /// The TBS with the SCT-list extension removed (the RFC 6962 precertificate TBS).
    fn precert_tbs(&self) -> Result<Vec<u8>, VerifyError> {
        let sct_oid = der::oid_bytes(OID_SCT_LIST);
        let tbs = der::read_all(&self.tbs)?;
        let mut body = Vec::new();
        for f in der::children(tbs.value)? {
            if f.tag != 0xa3 {
                body.extend_from_slice(f.raw);
                continue;
            }
            let (seq, _) = der::expect(f.value, der::SEQUENCE)?;
            let mut exts = Vec::new();
            for ext in der::children(seq.value)? {
                let (oid, _) = der::expect(ext.value, der::OID)?;
                if oid.value != sct_oid.as_slice() {
                    exts.extend_from_slice(ext.raw);
                }
            }
            body.extend(der::encode(0xa3, &der::encode(der::SEQUENCE, &exts)));
        }
        Ok(der::encode(der::SEQUENCE, &body))
    }

    /// Verifies that at least one embedded SCT was issued by a CT log of the trust root.
    pub fn verify_embedded_sct(
        &self,
        issuer: &Certificate,
        ctlogs: &[TransparencyLog],
    ) -> Result<(), VerifyError> {
        let sct_err = |m: String| VerifyError::new(VerifyErrorKind::Sct, m);
        let ext = self
            .extension(OID_SCT_LIST)
            .ok_or_else(|| sct_err("the signing certificate has no embedded SCT".into()))?;
        let list = der::read_all(&ext.value)?;
        if list.tag != der::OCTET_STRING {
            return Err(sct_err("SCT list is not an OCTET STRING".into()));
        }
        let scts = parse_sct_list(list.value).map_err(sct_err)?;
        let issuer_key_hash = Hash::Sha256.digest(&issuer.spki);
        let tbs = self.precert_tbs()?;
        let mut last = String::from("no SCT");
        for sct in &scts {
            let Some(log) = ctlogs.iter().find(|l| l.key_id == sct.log_id) else {
                last = "SCT issued by a CT log that is not in the trusted root".into();
                continue;
            };
            let Some(key) = &log.key else {
                last = "CT log key in the trusted root is not usable".into();
                continue;
            };
            if !log.valid_for.contains(sct.timestamp_ms.div_euclid(1000)) {
                last = "SCT timestamp outside the CT log key's validity".into();
                continue;
            }
            let mut msg = vec![0u8, 0u8]; // v1, certificate_timestamp
            msg.extend_from_slice(&sct.timestamp_ms.to_be_bytes());
            msg.extend_from_slice(&1u16.to_be_bytes()); // precert_entry
            msg.extend_from_slice(&issuer_key_hash);
            let len = tbs.len() as u32;
            msg.extend_from_slice(&len.to_be_bytes()[1..]);
            msg.extend_from_slice(&tbs);
            msg.extend_from_slice(&(sct.extensions.len() as u16).to_be_bytes());
            msg.extend_from_slice(&sct.extensions);
            let hash = match sct.hash_alg {
                4 => Hash::Sha256,
                5 => Hash::Sha384,
                6 => Hash::Sha512,
                _ => {
                    last = "SCT uses an unknown hash".into();
                    continue;
                }
            };
            match key.verify(hash, &msg, &sct.signature) {
                Ok(()) => return Ok(()),
                Err(_) => last = "SCT signature does not verify".into(),
            }
        }
        Err(sct_err(last))
    }
}

#[derive(Debug)]
struct Sct {
    log_id: Vec<u8>,
    timestamp_ms: i64,
    extensions: Vec<u8>,
    hash_alg: u8,
    signature: Vec<u8>,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("truncated SCT list".into());
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn take_u16(b: &mut &[u8]) -> Result<usize, String> {
    let h = take(b, 2)?;
    Ok(usize::from(u16::from_be_bytes([h[0], h[1]])))
}

fn parse_sct_list(mut b: &[u8]) -> Result<Vec<Sct>, String> {
    let total = take_u16(&mut b)?;
    let mut list = take(&mut b, total)?;
    let mut out = Vec::new();
    while !list.is_empty() {
        let n = take_u16(&mut list)?;
        let mut s = take(&mut list, n)?;
        let version = take(&mut s, 1)?[0];
        if version != 0 {
            continue;
        }
        let log_id = take(&mut s, 32)?.to_vec();
        let ts = take(&mut s, 8)?;
        let mut tsb = [0u8; 8];
        tsb.copy_from_slice(ts);
        let ext_len = take_u16(&mut s)?;
        let extensions = take(&mut s, ext_len)?.to_vec();
        let hash_alg = take(&mut s, 1)?[0];
        let _sig_alg = take(&mut s, 1)?[0];
        let sig_len = take_u16(&mut s)?;
        let signature = take(&mut s, sig_len)?.to_vec();
        out.push(Sct {
            log_id,
            timestamp_ms: i64::from_be_bytes(tsb),
            extensions,
            hash_alg,
            signature,
        });
    }
    Ok(out)
}

/// Verifies `leaf` up to the end of `chain` (intermediates…, root taken from the trust root).
/// Every certificate must be valid at every instant of `times` (closed intervals); each parent
/// must be a CA; the last one must be self-signed.
pub fn verify_chain(
    leaf: &Certificate,
    chain: &[Certificate],
    times: &[i64],
) -> Result<(), VerifyError> {
    let mut child = leaf;
    for parent in chain {
        if child.issuer != parent.subject {
            return Err(cert_err("issuer name does not match the CA's subject"));
        }
        if !parent.is_ca() {
            return Err(cert_err("an issuing certificate is not a CA"));
        }
        child.verify_signed_by(parent)?;
        child = parent;
    }
    let root = chain.last().ok_or_else(|| cert_err("empty CA chain"))?;
    if !root.is_self_signed() {
        return Err(cert_err(
            "the CA chain in the trusted root does not end in a self-signed root",
        ));
    }
    for t in times {
        for c in std::iter::once(leaf).chain(chain) {
            if !c.valid_at(*t) {
                return Err(cert_err(format!(
                    "certificate not valid at {} (valid {} .. {})",
                    super::fmt_time(*t),
                    super::fmt_time(c.not_before),
                    super::fmt_time(c.not_after)
                )));
            }
        }
    }
    Ok(())
}
