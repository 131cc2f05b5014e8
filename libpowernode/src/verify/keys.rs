//! Public keys (SPKI DER or PEM) and signature verification through aws-lc-rs.

use aws_lc_rs::{digest, signature};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::der;
use super::{VerifyError, VerifyErrorKind};

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// Hash used with a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    pub fn algorithm(self) -> &'static digest::Algorithm {
        match self {
            Hash::Sha256 => &digest::SHA256,
            Hash::Sha384 => &digest::SHA384,
            Hash::Sha512 => &digest::SHA512,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        digest::digest(self.algorithm(), data).as_ref().to_vec()
    }

    /// From a hash AlgorithmIdentifier OID (content octets).
    pub fn from_oid(oid: &[u8]) -> Option<Hash> {
        [
            ("2.16.840.1.101.3.4.2.1", Hash::Sha256),
            ("2.16.840.1.101.3.4.2.2", Hash::Sha384),
            ("2.16.840.1.101.3.4.2.3", Hash::Sha512),
        ]
        .into_iter()
        .find(|(o, _)| der::oid_bytes(o) == oid)
        .map(|(_, h)| h)
    }
}

/// Key algorithm of a [`PublicKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    /// RSA; `raw` is the PKCS#1 RSAPublicKey.
    Rsa,
}

/// A parsed public key.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub alg: KeyAlg,
    /// EC point, Ed25519 key bytes, or PKCS#1 RSAPublicKey.
    raw: Vec<u8>,
    /// The SubjectPublicKeyInfo DER (empty for a bare PKCS#1 RSA key).
    pub spki: Vec<u8>,
}

fn bad_key(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Malformed, msg)
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(spki: &[u8]) -> Result<PublicKey, VerifyError> {
        let outer = der::read_all(spki)?;
        if outer.tag != der::SEQUENCE {
            return Err(bad_key("public key is not a SubjectPublicKeyInfo"));
        }
        let (alg_id, rest) = der::expect(outer.value, der::SEQUENCE)?;
        let (bits, _) = der::expect(rest, 0x03)?;
        let (&unused, key) = bits
            .value
            .split_first()
            .ok_or_else(|| bad_key("empty public key bit string"))?;
        if unused != 0 {
            return Err(bad_key("public key bit string has unused bits"));
        }
        let (oid, params) = der::expect(alg_id.value, der::OID)?;
        let alg = if oid.value == der::oid_bytes(OID_EC_PUBLIC_KEY) {
            let (curve, _) = der::expect(params, der::OID)?;
            if curve.value == der::oid_bytes(OID_P256) {
                KeyAlg::EcdsaP256
            } else if curve.value == der::oid_bytes(OID_P384) {
                KeyAlg::EcdsaP384
            } else {
                return Err(VerifyError::unsupported("EC curve of a public key"));
            }
        } else if oid.value == der::oid_bytes(OID_ED25519) {
            KeyAlg::Ed25519
        } else if oid.value == der::oid_bytes(OID_RSA) {
            KeyAlg::Rsa
        } else {
            return Err(VerifyError::unsupported("public key algorithm"));
        };
        Ok(PublicKey {
            alg,
            raw: key.to_vec(),
            spki: spki.to_vec(),
        })
    }

    /// A bare PKCS#1 RSAPublicKey (as some trust roots carry for old CT logs).
    pub fn from_pkcs1_rsa(der_bytes: &[u8]) -> PublicKey {
        PublicKey {
            alg: KeyAlg::Rsa,
            raw: der_bytes.to_vec(),
            spki: Vec::new(),
        }
    }

    /// Parses a PEM `PUBLIC KEY`.
    pub fn from_pem(pem: &str) -> Result<PublicKey, VerifyError> {
        let blocks = pem_decode(pem, "PUBLIC KEY")?;
        match blocks.as_slice() {
            [one] => PublicKey::from_spki_der(one),
            _ => Err(bad_key("expected exactly one PEM PUBLIC KEY block")),
        }
    }

    fn algorithm(
        &self,
        hash: Hash,
    ) -> Result<&'static dyn signature::VerificationAlgorithm, VerifyError> {
        let alg: &'static dyn signature::VerificationAlgorithm = match (self.alg, hash) {
            (KeyAlg::EcdsaP256, Hash::Sha256) => &signature::ECDSA_P256_SHA256_ASN1,
            (KeyAlg::EcdsaP256, Hash::Sha384) => &signature::ECDSA_P256_SHA384_ASN1,
            (KeyAlg::EcdsaP384, Hash::Sha256) => &signature::ECDSA_P384_SHA256_ASN1,
            (KeyAlg::EcdsaP384, Hash::Sha384) => &signature::ECDSA_P384_SHA384_ASN1,
            (KeyAlg::Ed25519, _) => &signature::ED25519,
            (KeyAlg::Rsa, Hash::Sha256) => &signature::RSA_PKCS1_2048_8192_SHA256,
            (KeyAlg::Rsa, Hash::Sha384) => &signature::RSA_PKCS1_2048_8192_SHA384,
            (KeyAlg::Rsa, Hash::Sha512) => &signature::RSA_PKCS1_2048_8192_SHA512,
            (alg, hash) => {
                return Err(VerifyError::unsupported(&format!(
                    "signature with {alg:?} key and {hash:?}"
                )));
            }
        };
        Ok(alg)
    }

    /// Verifies `sig` over `message` (hashed with `hash`; ignored for Ed25519).
    pub fn verify(&self, hash: Hash, message: &[u8], sig: &[u8]) -> Result<(), VerifyError> {
        let alg = self.algorithm(hash)?;
        signature::UnparsedPublicKey::new(alg, &self.raw)
            .verify(message, sig)
            .map_err(|_| VerifyError::new(VerifyErrorKind::Signature, "signature does not verify"))
    }

    /// Verifies `sig` over a message known only by its digest (not possible for Ed25519).
    pub fn verify_prehashed(
        &self,
        hash: Hash,
        digest_bytes: &[u8],
        sig: &[u8],
    ) -> Result<(), VerifyError> {
        if self.alg == KeyAlg::Ed25519 {
            return Err(VerifyError::unsupported(
                "Ed25519 signatures over a digest-only input",
            ));
        }
        let alg = self.algorithm(hash)?;
        let d = digest::Digest::import_less_safe(digest_bytes, hash.algorithm())
            .map_err(|_| VerifyError::new(VerifyErrorKind::Input, "digest has the wrong length"))?;
        signature::UnparsedPublicKey::new(alg, &self.raw)
            .verify_digest(&d, sig)
            .map_err(|_| VerifyError::new(VerifyErrorKind::Signature, "signature does not verify"))
    }

    /// Default hash for messages signed by this key (Sigstore: P-256 → SHA-256, P-384 → SHA-384).
    pub fn default_hash(&self) -> Hash {
        match self.alg {
            KeyAlg::EcdsaP384 => Hash::Sha384,
            _ => Hash::Sha256,
        }
    }
}

/// Decodes every PEM block with `label`; other blocks are ignored.
pub fn pem_decode(text: &str, label: &str) -> Result<Vec<Vec<u8>>, VerifyError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == begin {
            body = Some(String::new());
        } else if line == end {
            let b = body
                .take()
                .ok_or_else(|| bad_key(format!("PEM {label}: END without BEGIN")))?;
            let bytes = STANDARD
                .decode(b.as_bytes())
                .map_err(|_| bad_key(format!("PEM {label}: invalid base64")))?;
            out.push(bytes);
        } else if let Some(b) = body.as_mut() {
            b.push_str(line);
        }
    }
    if body.is_some() {
        return Err(bad_key(format!("PEM {label}: BEGIN without END")));
    }
    Ok(out)
}

/// Base64 (standard alphabet), tolerating embedded whitespace and line breaks.
pub fn b64(field: &str, s: &str) -> Result<Vec<u8>, VerifyError> {
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(cleaned.as_bytes()).map_err(|_| {
        VerifyError::new(
            VerifyErrorKind::Malformed,
            format!("{field} is not valid base64"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAExRRST79+PsrRBnGAI4cMu6Omz2Jh
fwlMW+gIutNKVRaMyS4rQKvgngc5p8UbLj55pVHhIoAxi/SRgURZI0J3Xw==
-----END PUBLIC KEY-----
";

    #[test]
    fn parses_p256_pem() {
        let k = PublicKey::from_pem(KEY).expect("key");
        assert_eq!(k.alg, KeyAlg::EcdsaP256);
        assert_eq!(k.raw.len(), 65);
    }

    #[test]
    fn mangled_pem_is_rejected() {
        let bad = KEY.replace("/SRgURZI0J3Xw==", "++++wrongkey==");
        assert!(PublicKey::from_pem(&bad).is_err());
        assert!(PublicKey::from_pem("no pem here").is_err());
    }
}
