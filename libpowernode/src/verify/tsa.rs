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

/// The parts of a timestamp token needed for verification.
struct Token<'a> {
    signed_message: Vec<u8>,
    signature: &'a [u8],
    sig_hash: Hash,
    gen_time: i64,
}

fn parse_token<'a>(bytes: &'a [u8], signature: &[u8]) -> Result<Token<'a>, VerifyError> {
    let top = der::read_all(bytes).map_err(|e| tserr(format!("timestamp: {e}")))?;
    let parts = der::children(top.value)?;
    // TimeStampResp { status PKIStatusInfo, timeStampToken } or a bare ContentInfo.
    let content_info: Tlv<'_> = match parts.first() {
        Some(first) if first.tag == der::SEQUENCE => {
            let status = der::children(first.value)?;
            let code = status
                .first()
                .filter(|s| s.tag == der::INTEGER)
                .map(|s| s.value);
            if !matches!(code, Some([0]) | Some([1])) {
                return Err(tserr("timestamp response status is not `granted`"));
            }
            *parts
                .get(1)
                .ok_or_else(|| tserr("timestamp response has no token"))?
        }
        Some(first) if first.tag == der::OID => top,
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
    let fields = der::children(sd.value)?;
    let encap = fields
        .get(2)
        .filter(|f| f.tag == der::SEQUENCE)
        .ok_or_else(|| tserr("SignedData has no encapsulated content"))?;
    let (etype, rest) = der::expect(encap.value, der::OID)?;
    if etype.value != der::oid_bytes(OID_TST_INFO) {
        return Err(tserr("timestamp content is not a TSTInfo"));
    }
    let (econtent, _) = der::expect(rest, 0xa0)?;
    let (octets, _) = der::expect(econtent.value, der::OCTET_STRING)?;
    let tst_info = octets.value;
    let signer_infos = fields
        .iter()
        .rev()
        .find(|f| f.tag == der::SET)
        .ok_or_else(|| tserr("SignedData has no signerInfos"))?;
    let infos = der::children(signer_infos.value)?;
    let [si] = infos.as_slice() else {
        return Err(tserr("timestamp must have exactly one signer"));
    };
    let si = der::children(si.value)?;
    // version, sid, digestAlgorithm, [0] signedAttrs?, signatureAlgorithm, signature, [1]?
    let digest_alg = si
        .get(2)
        .ok_or_else(|| tserr("SignerInfo lacks digestAlgorithm"))?;
    let digest_hash = Hash::from_oid(alg_oid(digest_alg)?)
        .ok_or_else(|| VerifyError::unsupported("timestamp digest algorithm"))?;
    let mut idx = 3;
    let mut signed_message = tst_info.to_vec();
    if let Some(attrs) = si.get(3).filter(|a| a.tag == 0xa0) {
        idx = 4;
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
    let sig_alg = si
        .get(idx)
        .ok_or_else(|| tserr("SignerInfo lacks signatureAlgorithm"))?;
    let sig = si
        .get(idx + 1)
        .filter(|s| s.tag == der::OCTET_STRING)
        .ok_or_else(|| tserr("SignerInfo lacks its signature"))?;
    let hash = sig_hash(alg_oid(sig_alg)?).unwrap_or(digest_hash);

    // TSTInfo: version, policy, messageImprint, serialNumber, genTime, …
    let tst = der::read_all(tst_info)?;
    let tf = der::children(tst.value)?;
    let imprint = tf
        .get(2)
        .filter(|f| f.tag == der::SEQUENCE)
        .ok_or_else(|| tserr("TSTInfo lacks messageImprint"))?;
    let (imp_alg, rest) = der::expect(imprint.value, der::SEQUENCE)?;
    let (imp_hash, _) = der::expect(rest, der::OCTET_STRING)?;
    let imp_h = Hash::from_oid(alg_oid(&imp_alg)?)
        .ok_or_else(|| VerifyError::unsupported("timestamp message imprint hash"))?;
    if imp_h.digest(signature) != imp_hash.value {
        return Err(tserr(
            "timestamp was not issued over this bundle's signature",
        ));
    }
    let gen_t = tf
        .get(4)
        .filter(|f| f.tag == der::GENERALIZED_TIME)
        .ok_or_else(|| tserr("TSTInfo lacks genTime"))?;
    Ok(Token {
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
