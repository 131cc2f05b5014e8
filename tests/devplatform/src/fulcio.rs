//! A Fulcio-style certificate authority for keyless module signing.
//!
//! Production keyless signing gets a short-lived certificate from Fulcio after an OIDC login
//! and an SCT from a certificate-transparency log. The development platform has neither, so it
//! plays both parts locally: a self-signed P-256 root kept under `<state>/sigstore/` issues
//! 10-minute leaf certificates for ephemeral keys, carrying the identity as SAN, the OIDC
//! issuer in the Fulcio extensions (…57264.1.8 as a DER UTF8String and the legacy .1.1 raw),
//! and an embedded SCT signed by the platform's CT log key. The SCT signs the RFC 6962
//! precertificate TBS: the leaf is built once without the SCT list, the SCT is signed over that
//! TBS, and the leaf is built again from identical parameters plus the SCT list as the last
//! extension, so that removing it reproduces the signed bytes exactly (what verifiers check).

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::fsutil;
use crate::modules::Signer;

const CA_CERT_FILE: &str = "fulcio-ca.der";
const CA_KEY_FILE: &str = "fulcio-ca.key.pem";
const CA_COMMON_NAME: &str = "powernode-devplatform fulcio";
/// Long enough to outlive any test or demo state directory.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Tolerates clocks of other machines that run slightly behind when a CA is fresh.
const CA_BACKDATE: Duration = Duration::hours(1);
/// Fulcio's leaf lifetime: signing happens right after issuance, verifiers rely on the logged
/// signing time rather than on the certificate still being valid.
pub const LEAF_VALIDITY: Duration = Duration::minutes(10);

/// Fulcio OIDC issuer extension (DER UTF8String), what current verifiers read.
const OID_ISSUER_V2: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 8];
/// Legacy Fulcio OIDC issuer extension (raw bytes), for older verifiers.
const OID_ISSUER_V1: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 1];
/// RFC 6962 embedded SCT list.
const OID_SCT_LIST: &[u64] = &[1, 3, 6, 1, 4, 1, 11129, 2, 4, 2];
const SERIAL_LEN: usize = 16;
/// RFC 5246 HashAlgorithm.sha256 and SignatureAlgorithm.ecdsa.
const SCT_HASH_SHA256: u8 = 4;
const SCT_SIG_ECDSA: u8 = 3;
/// RFC 6962 LogEntryType.precert_entry.
const PRECERT_ENTRY: u16 = 1;

/// The signer's identity as it appears in the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// A URI (contains "://", e.g. a CI workflow) or an email address.
    pub subject: String,
    /// The OIDC issuer URL.
    pub issuer: String,
}

impl Identity {
    fn san(&self) -> Result<SanType> {
        let ia5 = Ia5String::try_from(self.subject.as_str())
            .with_context(|| format!("identity {:?} is not ASCII", self.subject))?;
        Ok(if self.subject.contains("://") {
            SanType::URI(ia5)
        } else {
            SanType::Rfc822Name(ia5)
        })
    }
}

/// The CA: its certificate and the issuer it signs with.
pub struct Fulcio {
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Fulcio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fulcio")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; SERIAL_LEN];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("random serial"))?;
    // Positive (top bit clear) and minimal DER (first byte non-zero).
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

/// A DER TLV with a definite length (short or long form).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn u16_len(len: usize, what: &str) -> Result<[u8; 2]> {
    u16::try_from(len)
        .map(u16::to_be_bytes)
        .with_context(|| format!("{what} is too long for an SCT"))
}

/// RFC 6962 §3.2: the data a CT log signs for a precertificate.
fn sct_signed_data(timestamp_ms: u64, issuer_key_hash: &[u8], tbs: &[u8]) -> Result<Vec<u8>> {
    let mut msg = vec![0u8, 0u8]; // v1, certificate_timestamp
    msg.extend_from_slice(&timestamp_ms.to_be_bytes());
    msg.extend_from_slice(&PRECERT_ENTRY.to_be_bytes());
    msg.extend_from_slice(issuer_key_hash);
    let len = u32::try_from(tbs.len())
        .ok()
        .filter(|l| *l < 1 << 24)
        .context("TBS too long for an SCT")?;
    msg.extend_from_slice(&len.to_be_bytes()[1..]);
    msg.extend_from_slice(tbs);
    msg.extend_from_slice(&0u16.to_be_bytes()); // no CT extensions
    Ok(msg)
}

/// The SignedCertificateTimestampList (TLS encoding) holding one SCT.
fn sct_list(log_id: &[u8], timestamp_ms: u64, signature: &[u8]) -> Result<Vec<u8>> {
    let mut sct = vec![0u8]; // v1
    sct.extend_from_slice(log_id);
    sct.extend_from_slice(&timestamp_ms.to_be_bytes());
    sct.extend_from_slice(&0u16.to_be_bytes()); // no CT extensions
    sct.extend_from_slice(&[SCT_HASH_SHA256, SCT_SIG_ECDSA]);
    sct.extend_from_slice(&u16_len(signature.len(), "SCT signature")?);
    sct.extend_from_slice(signature);
    let mut entry = u16_len(sct.len(), "SCT")?.to_vec();
    entry.extend_from_slice(&sct);
    let mut list = u16_len(entry.len(), "SCT list")?.to_vec();
    list.extend_from_slice(&entry);
    Ok(list)
}

/// The TBSCertificate bytes of a DER certificate.
fn tbs_of(cert: &[u8]) -> Result<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| anyhow::anyhow!("parsing the precertificate: {e}"))?;
    Ok(parsed.tbs_certificate.as_ref().to_vec())
}

impl Fulcio {
    /// Loads the CA from `dir`, creating and persisting it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Fulcio> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() && !key_path.exists() {
            create(&cert_path, &key_path)?;
        }
        let ca_der = std::fs::read(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing CA key {}", key_path.display()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", cert_path.display()))?;
        let not_before = parsed.validity().not_before.to_datetime();
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.as_slice()), key)
            .context("loading the Fulcio CA issuer")?;
        Ok(Fulcio {
            ca_der,
            issuer,
            not_before,
            not_after,
        })
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// Issues a leaf certificate for `leaf_key` valid from `now` for [`LEAF_VALIDITY`], with an
    /// embedded SCT from `ctlog`. Returns the certificate (DER).
    pub fn issue(
        &self,
        leaf_key: &KeyPair,
        identity: &Identity,
        ctlog: &Signer,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>> {
        // Whole seconds: the certificate cannot carry more, and the SCT time must not precede
        // the certificate's notBefore.
        let now = now.replace_nanosecond(0).context("truncating the time")?;
        if now < self.not_before || now + LEAF_VALIDITY > self.not_after {
            bail!("the Fulcio CA under the state directory is not valid now");
        }
        let mut params = CertificateParams::default();
        // Fulcio leaves have an empty subject: the identity lives in the SAN only.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![identity.san()?];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now;
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial()?);
        params.custom_extensions = vec![
            CustomExtension::from_oid_content(OID_ISSUER_V1, identity.issuer.as_bytes().to_vec()),
            CustomExtension::from_oid_content(OID_ISSUER_V2, der(0x0c, identity.issuer.as_bytes())),
        ];

        // Precertificate: the same certificate without the SCT list; only its TBS matters.
        let precert = params
            .signed_by(leaf_key, &self.issuer)
            .context("issuing the precertificate")?;
        let tbs = tbs_of(precert.der())?;
        let issuer_key_hash = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.issuer.key().subject_public_key_info(),
        );
        let timestamp_ms = u64::try_from(now.unix_timestamp())
            .context("time before 1970")?
            .saturating_mul(1000);
        let signature = ctlog.sign(&sct_signed_data(
            timestamp_ms,
            issuer_key_hash.as_ref(),
            &tbs,
        )?)?;
        let list = sct_list(&ctlog.key_id(), timestamp_ms, &signature)?;
        // Last, so that removing it leaves the precertificate's extension order intact.
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                OID_SCT_LIST,
                der(0x04, &list),
            ));
        let cert = params
            .signed_by(leaf_key, &self.issuer)
            .context("issuing the signing certificate")?;
        Ok(cert.der().to_vec())
    }
}

fn create(cert_path: &Path, key_path: &Path) -> Result<()> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the Fulcio CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "powernode-devplatform");
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .context("truncating the time")?;
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .context("self-signing the Fulcio CA")?;
    // Key first: a crash between the two writes leaves a key without a certificate, which
    // load_or_create reports instead of silently minting a second CA.
    fsutil::write_atomic(
        key_path,
        key.serialize_pem().as_bytes(),
        fsutil::MODE_SECRET,
    )?;
    fsutil::write_atomic(cert_path, cert.der(), fsutil::MODE_PUBLIC)?;
    tracing::info!(path = %cert_path.display(), "created the development Fulcio CA");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode::verify::TrustedRoot;
    use powernode::verify::cert::{self, Certificate};

    fn setup() -> (tempfile::TempDir, Fulcio, Signer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Fulcio::load_or_create(dir.path()).expect("ca");
        let ctlog = Signer::load_or_create(dir.path(), "ctlog").expect("ctlog");
        (dir, ca, ctlog)
    }

    fn issue(ca: &Fulcio, ctlog: &Signer, subject: &str) -> Certificate {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let id = Identity {
            subject: subject.into(),
            issuer: "https://issuer.example".into(),
        };
        let der = ca
            .issue(&key, &id, ctlog, OffsetDateTime::now_utc())
            .expect("issue");
        let leaf = Certificate::from_der(&der).expect("parse");
        assert_eq!(leaf.spki, key.subject_public_key_info());
        leaf
    }

    fn ctlogs(ctlog: &Signer) -> TrustedRoot {
        let root = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "ctlogs": [crate::modules::log_entry(ctlog, "https://ctlog.invalid")],
        });
        TrustedRoot::from_json(&serde_json::to_vec(&root).expect("json")).expect("root")
    }

    #[test]
    fn ca_persists_and_is_a_p256_root() {
        let (dir, ca, _) = setup();
        let again = Fulcio::load_or_create(dir.path()).expect("reload");
        assert_eq!(ca.ca_der(), again.ca_der());
        let c = Certificate::from_der(ca.ca_der()).expect("parse");
        assert!(c.is_ca() && c.is_self_signed());
    }

    #[test]
    fn leaf_carries_the_fulcio_extensions_and_chains() {
        let (_dir, ca, ctlog) = setup();
        let ca_cert = Certificate::from_der(ca.ca_der()).expect("ca");
        let leaf = issue(&ca, &ctlog, "https://ci.example/acme/build@refs/heads/main");
        assert_eq!(
            leaf.san_values(),
            vec!["https://ci.example/acme/build@refs/heads/main".to_string()]
        );
        assert_eq!(
            leaf.oidc_issuer().as_deref(),
            Some("https://issuer.example")
        );
        let v1 = leaf.extension(cert::OID_FULCIO_ISSUER_V1).expect(".1.1");
        assert_eq!(v1.value, b"https://issuer.example");
        assert!(leaf.has_eku(cert::OID_EKU_CODE_SIGNING));
        assert!(leaf.allows_digital_signature());
        assert!(!leaf.is_ca());
        assert_eq!(leaf.not_after - leaf.not_before, 600);
        cert::verify_chain(&leaf, std::slice::from_ref(&ca_cert), &[leaf.not_before])
            .expect("chains to the CA");
        let last = leaf.extensions.last().expect("extensions");
        assert_eq!(
            last.oid,
            leaf.extension(cert::OID_SCT_LIST).expect("sct").oid
        );
    }

    #[test]
    fn email_identity_is_an_rfc822_san() {
        let (_dir, ca, ctlog) = setup();
        let leaf = issue(&ca, &ctlog, "dev@example.org");
        let san = leaf.extension(cert::OID_SAN).expect("san");
        // SEQUENCE { [1] IA5String }
        assert_eq!(san.value[2], 0x81, "{:02x?}", san.value);
        assert_eq!(leaf.san_values(), vec!["dev@example.org".to_string()]);
    }

    /// The agent's verifier strips the SCT list from the TBS and checks the log's signature
    /// over the result: this only passes if both issuances produced identical fields.
    #[test]
    fn embedded_sct_verifies_with_the_agent_code() {
        let (dir, ca, ctlog) = setup();
        let ca_cert = Certificate::from_der(ca.ca_der()).expect("ca");
        let leaf = issue(&ca, &ctlog, "https://ci.example/x");
        leaf.verify_embedded_sct(&ca_cert, &ctlogs(&ctlog).ctlogs)
            .expect("SCT verifies");

        // Another CT log key, or another issuer key hash: refused.
        let other = Signer::load_or_create(dir.path(), "other").expect("other");
        assert!(
            leaf.verify_embedded_sct(&ca_cert, &ctlogs(&other).ctlogs)
                .is_err()
        );
        let other_ca_dir = tempfile::tempdir().expect("tempdir");
        let other_ca = Fulcio::load_or_create(other_ca_dir.path()).expect("ca");
        let other_ca_cert = Certificate::from_der(other_ca.ca_der()).expect("ca");
        assert!(
            leaf.verify_embedded_sct(&other_ca_cert, &ctlogs(&ctlog).ctlogs)
                .is_err()
        );
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }
}
