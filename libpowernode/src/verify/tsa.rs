//! RFC 3161 timestamps: a TimeStampResp (or bare TimeStampToken) whose CMS SignedData carries a
//! TSTInfo over the artifact signature, signed by a timestamp authority of the trust root.

use super::cert;
use super::der::{self, Tlv};
use super::keys::Hash;
use super::trust_root::CertificateAuthority;
use super::{VerifyError, VerifyErrorKind};

const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_TST_INFO: &str = "1.2.840.113549.1.9.16.1.4";
const OID_CONTENT_TYPE: &str = "1.2.840.113549.1.9.3";
const OID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";

fn tserr(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Timestamp, msg)
}

fn alg_oid<'a>(alg_id: &Tlv<'a>) -> Result<&'a [u8], VerifyError> {
    Ok(der::expect(alg_id.value, der::OID)?.0.value)
}

/// Hash of a signature algorithm OID (ecdsa-with-SHAx / shaxWithRSA), or `None`.
fn sig_hash(oid: &[u8]) -> Option<Hash> {
    [
        ("1.2.840.10045.4.3.2", Hash::Sha256),
        ("1.2.840.10045.4.3.3", Hash::Sha384),
        ("1.2.840.10045.4.3.4", Hash::Sha512),
        ("1.2.840.113549.1.1.11", Hash::Sha256),
        ("1.2.840.113549.1.1.12", Hash::Sha384),
        ("1.2.840.113549.1.1.13", Hash::Sha512),
    ]
    .into_iter()
    .find(|(o, _)| der::oid_bytes(o) == oid)
    .map(|(_, h)| h)
}

/// How a SignerInfo names its signing certificate (RFC 5652 §5.3 `sid`).
#[derive(Debug, PartialEq, Eq)]
pub enum SignerId<'a> {
    /// Version 1: the certificate's issuer Name (DER) and serial number (INTEGER content).
    IssuerSerial { issuer: &'a [u8], serial: &'a [u8] },
    /// Version 3: the certificate's subjectKeyIdentifier.
    SubjectKeyId(&'a [u8]),
}

impl SignerId<'_> {
    /// True if this id names `c`.
    pub fn names(&self, c: &cert::Certificate) -> bool {
        match self {
            SignerId::IssuerSerial { issuer, serial } => {
                c.issuer.as_slice() == *issuer && c.serial.as_slice() == *serial
            }
            SignerId::SubjectKeyId(ski) => c.subject_key_id.as_deref() == Some(*ski),
        }
    }
}

/// The parts of a timestamp token needed for verification.
#[derive(Debug)]
pub struct Token<'a> {
    pub signer: SignerId<'a>,
    pub signed_message: Vec<u8>,
    pub signature: &'a [u8],
    pub sig_hash: Hash,
    pub gen_time: i64,
}

fn tagged<'a>(f: Option<&Tlv<'a>>, tag: u8, what: &str) -> Result<Tlv<'a>, VerifyError> {
    f.filter(|f| f.tag == tag)
        .copied()
        .ok_or_else(|| tserr(format!("malformed timestamp: {what}")))
}

/// Parses a DER TimeStampResp (or a bare TimeStampToken) strictly, and checks that its TSTInfo
/// was issued over `signature`. Nothing is verified against a key here.
pub fn parse_token<'a>(bytes: &'a [u8], signature: &[u8]) -> Result<Token<'a>, VerifyError> {
    let top = der::read_all(bytes).map_err(|e| tserr(format!("timestamp: {e}")))?;
    if top.tag != der::SEQUENCE {
        return Err(tserr("timestamp is not a DER SEQUENCE"));
    }
    let parts = der::children(top.value)?;
    // TimeStampResp { status PKIStatusInfo, timeStampToken } or a bare ContentInfo.
    let content_info: Tlv<'_> = match parts.as_slice() {
        [status, token] if status.tag == der::SEQUENCE => {
            let status = der::children(status.value)?;
            let code = status
                .first()
                .filter(|s| s.tag == der::INTEGER)
                .map(|s| s.value);
            if !matches!(code, Some([0]) | Some([1])) {
                return Err(tserr("timestamp response status is not `granted`"));
            }
            if token.tag != der::SEQUENCE {
                return Err(tserr("timestamp response's token is not a ContentInfo"));
            }
            *token
        }
        [status] if status.tag == der::SEQUENCE => {
            return Err(tserr("timestamp response has no token"));
        }
        [first, _] if first.tag == der::OID => top,
        _ => {
            return Err(tserr(
                "timestamp is neither a TimeStampResp nor a ContentInfo",
            ));
        }
    };
    let ci = der::children(content_info.value)?;
    let [ct, wrapped] = ci.as_slice() else {
        return Err(tserr("malformed timestamp ContentInfo"));
    };
    if ct.tag != der::OID || ct.value != der::oid_bytes(OID_SIGNED_DATA) || wrapped.tag != 0xa0 {
        return Err(tserr("timestamp token is not CMS SignedData"));
    }
    let sd = der::read_all(wrapped.value)?;
    if sd.tag != der::SEQUENCE {
        return Err(tserr("timestamp SignedData is not a SEQUENCE"));
    }
    // SignedData: version, digestAlgorithms, encapContentInfo, [0] certificates?, [1] crls?,
    // signerInfos.
    let fields = der::children(sd.value)?;
    let mut it = fields.iter();
    tagged(it.next(), der::INTEGER, "SignedData version")?;
    tagged(it.next(), der::SET, "SignedData digestAlgorithms")?;
    let encap = tagged(it.next(), der::SEQUENCE, "SignedData encapContentInfo")?;
    let mut next = it.next();
    if next.is_some_and(|f| f.tag == 0xa0) {
        next = it.next();
    }
    if next.is_some_and(|f| f.tag == 0xa1) {
        next = it.next();
    }
    let signer_infos = tagged(next, der::SET, "SignedData signerInfos")?;
    if it.next().is_some() {
        return Err(tserr(
            "malformed timestamp: data after SignedData signerInfos",
        ));
    }
    let (etype, rest) = der::expect(encap.value, der::OID)?;
    if etype.value != der::oid_bytes(OID_TST_INFO) {
        return Err(tserr("timestamp content is not a TSTInfo"));
    }
    let econtent = der::read_all(rest)?;
    if econtent.tag != 0xa0 {
        return Err(tserr("timestamp has no encapsulated TSTInfo"));
    }
    let octets = der::read_all(econtent.value)?;
    if octets.tag != der::OCTET_STRING {
        return Err(tserr(
            "timestamp's encapsulated TSTInfo is not an OCTET STRING",
        ));
    }
    let tst_info = octets.value;
    let infos = der::children(signer_infos.value)?;
    let [si] = infos.as_slice() else {
        return Err(tserr("timestamp must have exactly one signer"));
    };
    if si.tag != der::SEQUENCE {
        return Err(tserr("timestamp SignerInfo is not a SEQUENCE"));
    }
    let si = der::children(si.value)?;
    // version, sid, digestAlgorithm, [0] signedAttrs?, signatureAlgorithm, signature, [1]?
    let mut it = si.iter();
    let version = tagged(it.next(), der::INTEGER, "SignerInfo version")?;
    let sid = it
        .next()
        .ok_or_else(|| tserr("malformed timestamp: SignerInfo lacks sid"))?;
    let signer = match (version.value, sid.tag) {
        ([1], der::SEQUENCE) => {
            let (issuer, rest) = der::expect(sid.value, der::SEQUENCE)?;
            let serial = der::read_all(rest)?;
            if serial.tag != der::INTEGER {
                return Err(tserr("timestamp signer id has no serial number"));
            }
            SignerId::IssuerSerial {
                issuer: issuer.raw,
                serial: serial.value,
            }
        }
        ([3], 0x80) => SignerId::SubjectKeyId(sid.value),
        _ => {
            return Err(tserr(
                "timestamp SignerInfo's version and signer id do not agree (RFC 5652 §5.3)",
            ));
        }
    };
    let digest_alg = tagged(it.next(), der::SEQUENCE, "SignerInfo digestAlgorithm")?;
    let digest_hash = Hash::from_oid(alg_oid(&digest_alg)?)
        .ok_or_else(|| VerifyError::unsupported("timestamp digest algorithm"))?;
    let mut next = it.next();
    let mut signed_message = tst_info.to_vec();
    if let Some(attrs) = next.filter(|a| a.tag == 0xa0) {
        next = it.next();
        let mut message_digest = None;
        let mut content_type_ok = false;
        for attr in der::children(attrs.value)? {
            let (oid, rest) = der::expect(attr.value, der::OID)?;
            let (set, _) = der::expect(rest, der::SET)?;
            let first = der::children(set.value)?.into_iter().next();
            if oid.value == der::oid_bytes(OID_MESSAGE_DIGEST) {
                message_digest = first.map(|v| v.value.to_vec());
            } else if oid.value == der::oid_bytes(OID_CONTENT_TYPE) {
                content_type_ok = first.is_some_and(|v| v.value == der::oid_bytes(OID_TST_INFO));
            }
        }
        if !content_type_ok {
            return Err(tserr(
                "timestamp signed attributes lack the TSTInfo content type",
            ));
        }
        if message_digest.as_deref() != Some(digest_hash.digest(tst_info).as_slice()) {
            return Err(tserr(
                "timestamp signed attributes do not match the TSTInfo",
            ));
        }
        signed_message = der::encode(der::SET, attrs.value);
    }
    let sig_alg = tagged(next, der::SEQUENCE, "SignerInfo signatureAlgorithm")?;
    let sig = tagged(it.next(), der::OCTET_STRING, "SignerInfo signature")?;
    match it.next() {
        None => {}
        Some(u) if u.tag == 0xa1 && it.next().is_none() => {}
        Some(_) => {
            return Err(tserr(
                "malformed timestamp: data after the SignerInfo signature",
            ));
        }
    }
    let hash = sig_hash(alg_oid(&sig_alg)?).unwrap_or(digest_hash);

    // TSTInfo: version, policy, messageImprint, serialNumber, genTime, …
    let tst = der::read_all(tst_info)?;
    if tst.tag != der::SEQUENCE {
        return Err(tserr("TSTInfo is not a SEQUENCE"));
    }
    let tf = der::children(tst.value)?;
    tagged(tf.first(), der::INTEGER, "TSTInfo version")?;
    tagged(tf.get(1), der::OID, "TSTInfo policy")?;
    let imprint = tagged(tf.get(2), der::SEQUENCE, "TSTInfo messageImprint")?;
    tagged(tf.get(3), der::INTEGER, "TSTInfo serialNumber")?;
    let (imp_alg, rest) = der::expect(imprint.value, der::SEQUENCE)?;
    let imp_hash = der::read_all(rest)?;
    if imp_hash.tag != der::OCTET_STRING {
        return Err(tserr("TSTInfo messageImprint has no hash"));
    }
    let imp_h = Hash::from_oid(alg_oid(&imp_alg)?)
        .ok_or_else(|| VerifyError::unsupported("timestamp message imprint hash"))?;
    if imp_h.digest(signature) != imp_hash.value {
        return Err(tserr(
            "timestamp was not issued over this bundle's signature",
        ));
    }
    let gen_t = tagged(tf.get(4), der::GENERALIZED_TIME, "TSTInfo genTime")?;
    Ok(Token {
        signer,
        signed_message,
        signature: sig.value,
        sig_hash: hash,
        gen_time: der::generalized_time(gen_t.value)?,
    })
}

/// Verifies one RFC 3161 timestamp over `signature` against the trusted TSAs and returns its
/// genTime (Unix seconds). The TSA's chain is the trust root's and is judged at genTime.
pub fn verify(
    resp: &[u8],
    signature: &[u8],
    tsas: &[CertificateAuthority],
) -> Result<i64, VerifyError> {
    let token = parse_token(resp, signature)?;
    let mut last = tserr("no timestamp authority in the trusted root");
    for tsa in tsas {
        let Some(leaf) = tsa.chain.first() else {
            continue;
        };
        if !token.signer.names(leaf) {
            last = tserr(
                "timestamp's SignerInfo does not name a timestamp authority certificate of the trusted root",
            );
            continue;
        }
        let key = match leaf.public_key() {
            Ok(k) => k,
            Err(e) => {
                last = e;
                continue;
            }
        };
        if key
            .verify(token.sig_hash, &token.signed_message, token.signature)
            .is_err()
        {
            last = tserr("timestamp is not signed by a timestamp authority of the trusted root");
            continue;
        }
        if !tsa.valid_for.contains(token.gen_time) {
            last = tserr(format!(
                "timestamp time {} is outside the timestamp authority's validity in the trusted root",
                super::fmt_time(token.gen_time)
            ));
            continue;
        }
        if !leaf.has_eku(cert::OID_EKU_TIME_STAMPING) {
            last = tserr("timestamp authority certificate lacks the timeStamping usage");
            continue;
        }
        let chain_ok = if tsa.chain.len() == 1 {
            if leaf.valid_at(token.gen_time) {
                Ok(())
            } else {
                Err(tserr(
                    "timestamp authority certificate not valid at genTime",
                ))
            }
        } else {
            cert::verify_chain(leaf, &tsa.chain[1..], &[token.gen_time])
        };
        match chain_ok {
            Ok(()) => return Ok(token.gen_time),
            Err(e) => {
                last = tserr(format!("timestamp authority chain at genTime: {e}"));
            }
        }
    }
    Err(last)
}
