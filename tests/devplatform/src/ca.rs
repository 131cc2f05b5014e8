//! The platform's own certificate authority: a self-signed Ed25519 root persisted in the state
//! directory (`ca.pem`, `ca.key` 0600), the per-start HTTPS server certificate, and node client
//! certificates issued from CSRs. Also the small X.509 readers the API needs (CN and serial of a
//! presented client certificate).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::fsutil;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
const CA_COMMON_NAME: &str = "Powernode Dev CA";
const CA_VALIDITY: Duration = Duration::days(3650);
/// Backdating absorbs clock skew between the platform and freshly booted nodes.
const BACKDATE: Duration = Duration::seconds(60);
/// Server certificates are re-issued on every start, so a year is plenty.
const SERVER_CERT_VALIDITY: Duration = Duration::days(365);
/// 16 random bytes with the top bit cleared: a positive 127-bit serial, as upstream.
const SERIAL_LEN: usize = 16;
/// Names every server certificate carries, so local clients always verify.
const DEFAULT_SERVER_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub cert_pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

/// Why a node certificate could not be issued (maps to 422 "CSR/CA failure: …").
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("invalid CSR: {0}")]
    Csr(rcgen::Error),
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    #[error("random source failed")]
    Random,
}

/// The loaded CA.
pub struct Ca {
    cert_pem: String,
    cert_path: PathBuf,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Load the CA from `dir`, creating and persisting a new one on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() && !key_path.exists() {
            create(&cert_path, &key_path)?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing CA key {}", key_path.display()))?;
        let der = pem_to_der(&cert_pem).context("parsing CA certificate PEM")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("parsing CA certificate: {e}"))?;
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(der.clone()), key)
            .context("loading CA issuer")?;
        let cert_path = std::path::absolute(&cert_path)
            .with_context(|| format!("resolving {}", cert_path.display()))?;
        Ok(Self {
            cert_pem,
            cert_path,
            not_after,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        Ok(CertificateDer::from(pem_to_der(&self.cert_pem)?))
    }

    /// Issue the HTTPS server certificate (fresh key each call). `extra_sans` are DNS names or
    /// IP addresses on top of localhost/127.0.0.1/::1.
    pub fn issue_server_cert(
        &self,
        extra_sans: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).context("generating server key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "powernode-devplatform");
        params.distinguished_name = dn;
        for name in DEFAULT_SERVER_SANS
            .iter()
            .map(|s| s.to_string())
            .chain(extra_sans.iter().cloned())
        {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .with_context(|| format!("invalid --san {name:?}"))?,
                ),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + SERVER_CERT_VALIDITY).min(self.not_after);
        params.serial_number = Some(random_serial().map_err(|_| anyhow::anyhow!("random"))?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing server certificate")?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key_der))
    }

    /// Issue a node client certificate for the CSR's public key. The CSR's own subject is
    /// ignored: the CN is forced to `common_name` (the instance id).
    pub fn issue_client_cert(
        &self,
        csr_pem: &str,
        common_name: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedLeaf, IssueError> {
        // from_pem verifies the CSR's self-signature.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(IssueError::Csr)?;
        let serial = random_serial().map_err(|()| IssueError::Random)?;
        let serial_hex = serial_hex(serial.as_ref());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Backdate for clock skew, but never by more than a tenth of the lifetime: minute-long
        // test certificates must still renew at 75 % of the lifetime *they were asked for*.
        params.not_before = now - BACKDATE.min(ttl / 10);
        // Certificates at whole seconds: X.509 time has no fractions and the API reports this.
        let not_after = (now + ttl)
            .min(self.not_after)
            .replace_nanosecond(0)
            .unwrap_or(now + ttl);
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            serial_hex,
            not_after,
        })
    }
}

fn create(cert_path: &Path, key_path: &Path) -> Result<()> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).context("generating CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial().map_err(|()| anyhow::anyhow!("random"))?);
    let cert = params.self_signed(&key).context("self-signing CA")?;
    // Key first: a crash between the two writes leaves a key without a cert, which
    // load_or_create reports instead of silently minting a second CA.
    fsutil::write_atomic(
        key_path,
        key.serialize_pem().as_bytes(),
        fsutil::MODE_SECRET,
    )?;
    fsutil::write_atomic(cert_path, cert.pem().as_bytes(), fsutil::MODE_PUBLIC)?;
    tracing::info!(path = %cert_path.display(), "created new development CA");
    Ok(())
}

fn random_serial() -> Result<SerialNumber, ()> {
    let mut bytes = [0u8; SERIAL_LEN];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| ())?;
    // Positive (top bit clear) and minimal DER (first byte non-zero).
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

/// Lowercase hex of a serial's big-endian bytes, without leading zero bytes (DER adds one when
/// the top bit is set; both forms must compare equal).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    crate::store::hex(&bytes[start..])
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("invalid certificate PEM: {e:?}"))?
        .to_vec())
}

/// Subject CN and serial (hex) of a DER certificate.
pub fn cn_and_serial(der: &[u8]) -> Result<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("parsing client certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("client certificate has no CN")?
        .as_str()
        .map_err(|e| anyhow::anyhow!("client certificate CN is not a string: {e}"))?
        .to_owned();
    Ok((cn, serial_hex(cert.tbs_certificate.raw_serial())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_der_padding() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x7f, 0x00]), "7f00");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn ca_persists_and_issues_leaf_with_forced_cn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("create");
        let again = Ca::load_or_create(dir.path()).expect("load");
        assert_eq!(ca.cert_pem(), again.cert_pem(), "CA must be reused");
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let node_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let mut req = CertificateParams::default();
        req.distinguished_name
            .push(DnType::CommonName, "ignored-cn");
        let csr = req
            .serialize_request(&node_key)
            .expect("csr")
            .pem()
            .expect("pem");
        let now = OffsetDateTime::now_utc();
        let leaf = again
            .issue_client_cert(&csr, "instance-1", Duration::days(90), now)
            .expect("issue");
        let der = pem_to_der(&leaf.cert_pem).expect("der");
        let (cn, serial) = cn_and_serial(&der).expect("parse");
        assert_eq!(cn, "instance-1");
        assert_eq!(serial, leaf.serial_hex);
        assert!(serial.len() >= 16, "serial has at least 64 bits: {serial}");

        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(
            parsed
                .issuer()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok()),
            Some(CA_COMMON_NAME)
        );
        let eku = parsed.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
        let bc = parsed.basic_constraints().expect("bc").expect("present");
        assert!(!bc.value.ca);
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            node_key.public_key_raw()
        );

        let tampered = csr.replace('A', "B");
        assert!(
            again
                .issue_client_cert(&tampered, "x", Duration::days(1), now)
                .is_err()
        );
    }
}
