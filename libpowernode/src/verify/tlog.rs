//! Transparency-log checks: RFC 6962 inclusion proofs, signed-note checkpoints, Rekor v1 signed
//! entry timestamps (SET) and consistency of the logged entry body with the bundle.

use serde_json::Value;

use super::bundle::{Content, TlogEntry};
use super::cert::Certificate;
use super::keys::{Hash, PublicKey, b64, pem_decode};
use super::trust_root::TransparencyLog;
use super::{VerifyError, VerifyErrorKind};

fn terr(msg: impl Into<String>) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Tlog, msg)
}

fn node(left: &[u8], right: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(65);
    buf.push(1u8);
    buf.extend_from_slice(left);
    buf.extend_from_slice(right);
    Hash::Sha256.digest(&buf)
}

/// RFC 6962 leaf hash: SHA-256(0x00 || entry).
pub fn leaf_hash(entry: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(entry.len() + 1);
    buf.push(0u8);
    buf.extend_from_slice(entry);
    Hash::Sha256.digest(&buf)
}

/// Root hash implied by an audit path (RFC 9162 §2.1.3.2).
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[Vec<u8>],
) -> Result<Vec<u8>, VerifyError> {
    if index >= size {
        return Err(terr("inclusion proof index is outside the tree"));
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = leaf.to_vec();
    for p in proof {
        if p.len() != 32 {
            return Err(terr("inclusion proof hash has the wrong length"));
        }
        if snode == 0 {
            return Err(terr("inclusion proof is too long"));
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(terr("inclusion proof is too short"));
    }
    Ok(r)
}

/// One signature line of a signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_hint: [u8; 4],
    pub signature: Vec<u8>,
}

/// A checkpoint (transparency-log signed note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root_hash: Vec<u8>,
    /// The signed text (everything before the blank line, with its final newline).
    pub text: String,
    pub signatures: Vec<NoteSignature>,
}

impl Checkpoint {
    pub fn parse(envelope: &str) -> Result<Checkpoint, VerifyError> {
        let (head, sigs) = envelope
            .split_once("\n\n")
            .ok_or_else(|| terr("checkpoint has no signature block"))?;
        let text = format!("{head}\n");
        let mut lines = head.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err(terr("checkpoint has no origin line"));
        }
        let size = lines
            .next()
            .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or_else(|| terr("checkpoint has no tree size line"))?;
        let root_hash = lines
            .next()
            .and_then(|l| b64("checkpoint root hash", l).ok())
            .filter(|h| h.len() == 32)
            .ok_or_else(|| terr("checkpoint has no root hash line"))?;
        let mut signatures = Vec::new();
        for line in sigs.split('\n').filter(|l| !l.is_empty()) {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| terr("checkpoint signature line does not start with an em dash"))?;
            let (name, sig) = rest
                .rsplit_once(' ')
                .ok_or_else(|| terr("malformed checkpoint signature line"))?;
            let raw = b64("checkpoint signature", sig)?;
            if raw.len() < 5 || name.is_empty() {
                return Err(terr("checkpoint signature is too short"));
            }
            let mut key_hint = [0u8; 4];
            key_hint.copy_from_slice(&raw[..4]);
            signatures.push(NoteSignature {
                name: name.to_string(),
                key_hint,
                signature: raw[4..].to_vec(),
            });
        }
        if signatures.is_empty() {
            return Err(terr("checkpoint carries no signature"));
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root_hash,
            text,
            signatures,
        })
    }

    /// The name the log signs this checkpoint under: the origin itself (Rekor v2, C2SP
    /// tlog-checkpoint), or `NAME` for a Rekor v1 origin `NAME - <tree id>`.
    pub fn signer_name(&self) -> &str {
        match self.origin.rsplit_once(" - ") {
            Some((name, tree)) if !tree.is_empty() && tree.bytes().all(|b| b.is_ascii_digit()) => {
                name
            }
            _ => &self.origin,
        }
    }

    /// Succeeds if one signature line verifies with the log's key and names the log (as Go's
    /// `note` package requires, a line counts only if both its key hint and its signer name are
    /// the log's); others (witness cosignatures, unknown keys) are ignored.
    pub fn verify(&self, log: &TransparencyLog) -> Result<(), VerifyError> {
        let key = log
            .key
            .as_ref()
            .ok_or_else(|| terr("transparency log key in the trusted root is not usable"))?;
        let hint = log.key_id.get(..4).unwrap_or_default();
        let name = self.signer_name();
        let ok = self
            .signatures
            .iter()
            .filter(|s| s.key_hint == hint && s.name == name)
            .any(|s| {
                key.verify(Hash::Sha256, self.text.as_bytes(), &s.signature)
                    .is_ok()
            });
        if ok {
            Ok(())
        } else {
            Err(terr(
                "checkpoint has no valid signature by the transparency log's key",
            ))
        }
    }
}

/// Verifies the entry's inclusion proof and its checkpoint.
pub fn verify_inclusion(entry: &TlogEntry, log: &TransparencyLog) -> Result<(), VerifyError> {
    if !is_rekor_v1(entry)
        && let Some(proof) = &entry.inclusion_proof
        && proof.log_index != entry.log_index
    {
        // Rekor v2 has one tree per log: the entry's index is the proven leaf index. (Rekor v1
        // entries carry a global index over all shards, bound by the SET instead.)
        return Err(terr(format!(
            "tlog entry's logIndex {} differs from its inclusion proof's {}",
            entry.log_index, proof.log_index
        )));
    }
    let proof = entry
        .inclusion_proof
        .as_ref()
        .ok_or_else(|| terr("tlog entry has no inclusion proof"))?;
    let root = root_from_inclusion_proof(
        proof.log_index as u64,
        proof.tree_size as u64,
        &leaf_hash(&entry.body),
        &proof.hashes,
    )?;
    if root != proof.root_hash {
        return Err(terr("inclusion proof does not lead to its root hash"));
    }
    let envelope = proof
        .checkpoint
        .as_deref()
        .ok_or_else(|| terr("inclusion proof has no checkpoint"))?;
    let cp = Checkpoint::parse(envelope)?;
    cp.verify(log)?;
    if cp.root_hash != proof.root_hash || cp.size != proof.tree_size as u64 {
        return Err(terr("checkpoint does not match the inclusion proof's tree"));
    }
    Ok(())
}

/// Verifies a Rekor v1 signed entry timestamp.
pub fn verify_set(entry: &TlogEntry, log: &TransparencyLog) -> Result<(), VerifyError> {
    let set = entry
        .signed_entry_timestamp
        .as_ref()
        .ok_or_else(|| terr("tlog entry has no signed entry timestamp"))?;
    let key = log
        .key
        .as_ref()
        .ok_or_else(|| terr("transparency log key in the trusted root is not usable"))?;
    let hex: String = entry.key_id.iter().map(|b| format!("{b:02x}")).collect();
    // Canonical JSON: keys sorted, no whitespace.
    let payload = format!(
        "{{\"body\":{},\"integratedTime\":{},\"logID\":\"{}\",\"logIndex\":{}}}",
        Value::String(entry.body_b64.clone()),
        entry.integrated_time,
        hex,
        entry.log_index
    );
    key.verify(Hash::Sha256, payload.as_bytes(), set)
        .map_err(|_| terr("signed entry timestamp does not verify with the log's key"))
}

/// What the logged body must agree with.
pub struct Expected<'a> {
    pub content: &'a Content,
    /// The signing certificate, or `None` for key-signed bundles.
    pub cert: Option<&'a Certificate>,
    pub key: &'a PublicKey,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Result<&'a Value, VerifyError> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .ok_or_else(|| terr(format!("tlog entry body lacks `{}`", path.join("."))))?;
    }
    Ok(cur)
}

fn str_field<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, VerifyError> {
    field(v, path)?.as_str().ok_or_else(|| {
        terr(format!(
            "tlog entry body: `{}` is not a string",
            path.join(".")
        ))
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares a base64 PEM verifier (certificate or public key) with the expected signer.
fn pem_verifier_matches(b64_pem: &str, exp: &Expected<'_>) -> Result<bool, VerifyError> {
    let pem = String::from_utf8(b64("tlog verifier", b64_pem)?)
        .map_err(|_| terr("tlog verifier is not PEM text"))?;
    Ok(match exp.cert {
        Some(c) => pem_decode(&pem, "CERTIFICATE")?.first() == Some(&c.der),
        None => pem_decode(&pem, "PUBLIC KEY")?.first() == Some(&exp.key.spki),
    })
}

fn mismatch(what: &str) -> VerifyError {
    terr(format!(
        "tlog entry does not match the bundle: {what} differs"
    ))
}

/// Checks that the logged body describes exactly this bundle's signature and signer.
pub fn check_body(entry: &TlogEntry, exp: &Expected<'_>) -> Result<(), VerifyError> {
    let body: Value =
        serde_json::from_slice(&entry.body).map_err(|_| terr("tlog entry body is not JSON"))?;
    let kind = str_field(&body, &["kind"])?;
    let api = str_field(&body, &["apiVersion"])?;
    if kind != entry.kind || api != entry.version {
        return Err(terr("tlog entry kindVersion does not match its body"));
    }
    let spec = field(&body, &["spec"])?;
    match (kind, api, exp.content) {
        (
            "hashedrekord",
            "0.0.1",
            Content::Message {
                digest, signature, ..
            },
        ) => {
            if str_field(spec, &["data", "hash", "algorithm"])? != "sha256"
                || str_field(spec, &["data", "hash", "value"])? != hex(digest)
            {
                return Err(mismatch("artifact digest"));
            }
            if b64("signature", str_field(spec, &["signature", "content"])?)? != *signature {
                return Err(mismatch("signature"));
            }
            if !pem_verifier_matches(
                str_field(spec, &["signature", "publicKey", "content"])?,
                exp,
            )? {
                return Err(mismatch("signing certificate or key"));
            }
            Ok(())
        }
        ("hashedrekord", "0.0.2", content) => {
            let v = field(spec, &["hashedRekordV002"])?;
            let (want_digest, sig) = match content {
                Content::Message {
                    digest, signature, ..
                } => (digest.clone(), signature.as_slice()),
                Content::Dsse(env) => (
                    Hash::Sha256.digest(&env.pae()),
                    env.signatures
                        .first()
                        .map(Vec::as_slice)
                        .ok_or_else(|| terr("DSSE envelope has no signature"))?,
                ),
            };
            if str_field(v, &["data", "algorithm"])? != "SHA2_256"
                || b64("digest", str_field(v, &["data", "digest"])?)? != want_digest
            {
                return Err(mismatch("artifact digest"));
            }
            if b64("signature", str_field(v, &["signature", "content"])?)? != sig {
                return Err(mismatch("signature"));
            }
            let verifier = field(v, &["signature", "verifier"])?;
            let matches = match exp.cert {
                Some(c) => {
                    b64(
                        "certificate",
                        str_field(verifier, &["x509Certificate", "rawBytes"])?,
                    )? == c.der
                }
                None => {
                    b64(
                        "public key",
                        str_field(verifier, &["publicKey", "rawBytes"])?,
                    )? == exp.key.spki
                }
            };
            if !matches {
                return Err(mismatch("signing certificate or key"));
            }
            Ok(())
        }
        ("dsse", "0.0.1", Content::Dsse(env)) => {
            if str_field(spec, &["payloadHash", "algorithm"])? != "sha256"
                || str_field(spec, &["payloadHash", "value"])?
                    != hex(&Hash::Sha256.digest(&env.payload))
            {
                return Err(mismatch("DSSE payload hash"));
            }
            let sigs = field(spec, &["signatures"])?
                .as_array()
                .ok_or_else(|| terr("tlog dsse signatures is not a list"))?;
            if sigs.len() != env.signatures.len() {
                return Err(mismatch("DSSE signature list"));
            }
            for (logged, ours) in sigs.iter().zip(&env.signatures) {
                if b64("signature", str_field(logged, &["signature"])?)? != *ours
                    || !pem_verifier_matches(str_field(logged, &["verifier"])?, exp)?
                {
                    return Err(mismatch("DSSE signature"));
                }
            }
            Ok(())
        }
        ("intoto", "0.0.2", Content::Dsse(env)) => {
            let c = field(spec, &["content"])?;
            if str_field(c, &["payloadHash", "algorithm"])? != "sha256"
                || str_field(c, &["payloadHash", "value"])?
                    != hex(&Hash::Sha256.digest(&env.payload))
            {
                return Err(mismatch("in-toto payload hash"));
            }
            let sigs = field(c, &["envelope", "signatures"])?
                .as_array()
                .ok_or_else(|| terr("tlog intoto signatures is not a list"))?;
            if sigs.len() != env.signatures.len() {
                return Err(mismatch("in-toto signature list"));
            }
            for (logged, ours) in sigs.iter().zip(&env.signatures) {
                // Rekor stores the envelope's (already base64) signature base64-encoded again.
                let once = b64("signature", str_field(logged, &["sig"])?)?;
                let sig = match std::str::from_utf8(&once)
                    .ok()
                    .and_then(|s| b64("signature", s).ok())
                {
                    Some(twice) => twice,
                    None => once,
                };
                if sig != *ours || !pem_verifier_matches(str_field(logged, &["publicKey"])?, exp)? {
                    return Err(mismatch("in-toto signature"));
                }
            }
            Ok(())
        }
        ("hashedrekord", "0.0.1", Content::Dsse(_)) => Err(terr(
            "a DSSE envelope cannot be checked against a hashedrekord 0.0.1 entry",
        )),
        ("dsse" | "intoto", _, Content::Message { .. }) => Err(terr(
            "a message signature cannot be checked against a DSSE entry",
        )),
        (k, v, _) => Err(VerifyError::unsupported(&format!(
            "tlog entry kind {k} {v}"
        ))),
    }
}

/// True for Rekor v1 entry types (which carry an integrated time and a SET).
pub fn is_rekor_v1(entry: &TlogEntry) -> bool {
    !(entry.kind == "hashedrekord" && entry.version == "0.0.2")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mth(leaves: &[Vec<u8>]) -> Vec<u8> {
        match leaves.len() {
            0 => Hash::Sha256.digest(b""),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = n.next_power_of_two() / 2;
                node(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = n.next_power_of_two() / 2;
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    #[test]
    fn empty_tree_hash_is_known_vector() {
        // RFC 6962 test vector: the hash of the empty tree.
        assert_eq!(
            hex(&mth(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Leaf hash of the empty entry (certificate-transparency-go test vector).
        assert_eq!(
            hex(&leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn proofs_verify_for_all_sizes_and_indices() {
        for n in 1..=17usize {
            let leaves: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; i + 1]).collect();
            let root = mth(&leaves);
            for m in 0..n {
                let p = path(m, &leaves);
                let got = root_from_inclusion_proof(m as u64, n as u64, &leaf_hash(&leaves[m]), &p)
                    .expect("proof shape");
                assert_eq!(got, root, "n={n} m={m}");
                if let Some(first) = p.first() {
                    let mut bad = p.clone();
                    bad[0] = first.iter().map(|b| b ^ 1).collect();
                    let got =
                        root_from_inclusion_proof(m as u64, n as u64, &leaf_hash(&leaves[m]), &bad)
                            .expect("proof shape");
                    assert_ne!(got, root);
                }
            }
        }
        assert!(root_from_inclusion_proof(5, 5, &leaf_hash(b""), &[]).is_err());
    }

    const NOTE: &str = "log2025-alpha1.rekor.sigstage.dev\n736\nrs1YPY0ydAV0lxgfrq5pE4oRpUJwo3syeps5+eGUTDI=\n\n\u{2014} log2025-alpha1.rekor.sigstage.dev 8w1amdbj1mjNN674dHAkD92+QZoEgBC7o0mXYSTRluDjQrOPjrps3zQB9ut+ShLepyZPsWBDi5IB3yXyjgjQT6OG9A8=\n";

    #[test]
    fn checkpoint_parses() {
        let cp = Checkpoint::parse(NOTE).expect("checkpoint");
        assert_eq!(cp.origin, "log2025-alpha1.rekor.sigstage.dev");
        assert_eq!(cp.size, 736);
        assert_eq!(cp.root_hash.len(), 32);
        assert_eq!(cp.signatures.len(), 1);
        assert_eq!(cp.signatures[0].key_hint, [0xf3, 0x0d, 0x5a, 0x99]);
        assert_eq!(cp.signatures[0].signature.len(), 64);
        assert!(cp.text.ends_with("=\n"));
    }

    #[test]
    fn checkpoint_verifies_with_ed25519_log_key() {
        let key_der = b64(
            "k",
            "MCowBQYDK2VwAyEAPn+AREHoBaZ7wgS1zBqpxmLSGnyhxXj4lFxSdWVB8o8=",
        )
        .expect("b64");
        let log = TransparencyLog {
            base_url: String::new(),
            key_id: b64("id", "8w1amZ2S5mJIQkQmPxdMuOrL/oJkvFg9MnQXmeOCXck=").expect("b64"),
            key: Some(PublicKey::from_spki_der(&key_der).expect("key")),
            valid_for: super::super::trust_root::Validity::ALWAYS,
        };
        Checkpoint::parse(NOTE)
            .expect("cp")
            .verify(&log)
            .expect("verifies");
        let tampered = NOTE.replacen("736", "737", 1);
        assert!(
            Checkpoint::parse(&tampered)
                .expect("cp")
                .verify(&log)
                .is_err()
        );
    }

    fn staging_v2_log() -> TransparencyLog {
        let key_der = b64(
            "k",
            "MCowBQYDK2VwAyEAPn+AREHoBaZ7wgS1zBqpxmLSGnyhxXj4lFxSdWVB8o8=",
        )
        .expect("b64");
        TransparencyLog {
            base_url: String::new(),
            key_id: b64("id", "8w1amZ2S5mJIQkQmPxdMuOrL/oJkvFg9MnQXmeOCXck=").expect("b64"),
            key: Some(PublicKey::from_spki_der(&key_der).expect("key")),
            valid_for: super::super::trust_root::Validity::ALWAYS,
        }
    }

    #[test]
    fn checkpoint_signature_line_must_name_the_origin() {
        // Same key hint and signature bytes, another signer name: not the log's line.
        let renamed = NOTE.replacen(
            "\u{2014} log2025-alpha1.rekor.sigstage.dev ",
            "\u{2014} witness.example ",
            1,
        );
        let e = Checkpoint::parse(&renamed)
            .expect("cp")
            .verify(&staging_v2_log())
            .expect_err("a line naming another signer must not count");
        assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
    }

    #[test]
    fn rekor_v1_origin_names_its_signer_before_the_tree_id() {
        let cp = |origin: &str| Checkpoint {
            origin: origin.into(),
            size: 1,
            root_hash: vec![0; 32],
            text: String::new(),
            signatures: vec![],
        };
        assert_eq!(
            cp("rekor.sigstore.dev - 2605736670972794746").signer_name(),
            "rekor.sigstore.dev"
        );
        assert_eq!(
            cp("log2025-alpha1.rekor.sigstage.dev").signer_name(),
            "log2025-alpha1.rekor.sigstage.dev"
        );
        assert_eq!(cp("a - b").signer_name(), "a - b");
    }

    #[test]
    fn malformed_checkpoints_are_rejected() {
        // No origin, no size, no root hash, no signatures.
        assert!(
            Checkpoint::parse(&NOTE.replacen("log2025-alpha1.rekor.sigstage.dev\n", "", 1))
                .is_err()
        );
        assert!(Checkpoint::parse(&NOTE.replacen("736\n", "", 1)).is_err());
        assert!(
            Checkpoint::parse(&NOTE.replacen(
                "rs1YPY0ydAV0lxgfrq5pE4oRpUJwo3syeps5+eGUTDI=\n",
                "",
                1
            ))
            .is_err()
        );
        let unsigned = NOTE.split("\u{2014}").next().expect("head");
        assert!(Checkpoint::parse(unsigned).is_err());
    }
}
