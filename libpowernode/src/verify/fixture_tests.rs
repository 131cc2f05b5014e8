//! Library-level checks on the conformance fixtures, with targeted mutations the upstream suite
//! does not cover (each one must turn a verifying bundle into a failure of the expected kind).

use serde_json::Value;

use super::*;

const ID: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const ISS: &str = "https://token.actions.githubusercontent.com";

fn fixture(rel: &str) -> Vec<u8> {
    let p = format!(
        "{}/../tests/fixtures/sigstore/{rel}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn json(rel: &str) -> Value {
    serde_json::from_slice(&fixture(rel)).expect("fixture JSON")
}

fn policy() -> Policy {
    Policy::Identity {
        identity: Matcher::Exact(ID.into()),
        issuer: Matcher::Exact(ISS.into()),
    }
}

fn artifact() -> Artifact {
    Artifact::Bytes(fixture("bundle-verify/a.txt"))
}

fn run(root: &Value, bundle: &Value, policy: &Policy) -> Result<Verified, VerifyError> {
    verify_bytes(
        &serde_json::to_vec(root).expect("ser"),
        &serde_json::to_vec(bundle).expect("ser"),
        &artifact(),
        policy,
    )
}

fn prod_root() -> Value {
    json("public-good/trusted_root.json")
}

fn v01() -> Value {
    json("bundle-verify/happy-path-v0.1/bundle.sigstore.json")
}

fn rekor2() -> (Value, Value) {
    (
        json("bundle-verify/rekor2-happy-path/trusted_root.json"),
        json("bundle-verify/rekor2-happy-path/bundle.sigstore.json"),
    )
}

#[test]
fn baselines_verify() {
    let v = run(&prod_root(), &v01(), &policy()).expect("v0.1 verifies");
    assert_eq!(v.identity, ID);
    assert_eq!(v.issuer.as_deref(), Some(ISS));
    assert_eq!(v.signing_times, vec![1_689_177_396]);
    let (root, bundle) = rekor2();
    let v = run(&root, &bundle, &policy()).expect("rekor v2 verifies");
    assert_eq!(v.tlog_kind, "hashedrekord 0.0.2");
}

#[test]
fn altered_integrated_time_breaks_the_set() {
    let mut b = v01();
    b["verificationMaterial"]["tlogEntries"][0]["integratedTime"] = "1689177397".into();
    let e = run(&prod_root(), &b, &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
}

#[test]
fn v01_without_set_fails() {
    let mut b = v01();
    b["verificationMaterial"]["tlogEntries"][0]
        .as_object_mut()
        .expect("entry")
        .remove("inclusionPromise");
    assert!(run(&prod_root(), &b, &policy()).is_err());
}

#[test]
fn missing_ct_logs_fail_the_sct_check() {
    let mut r = prod_root();
    r["ctlogs"] = Value::Array(vec![]);
    let e = run(&r, &v01(), &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Sct, "{e}");
}

#[test]
fn tlog_key_window_is_closed_on_the_right_side_only() {
    // Integrated time 2023-07-12T15:56:36Z: an end one second earlier rejects.
    let mut r = prod_root();
    for l in r["tlogs"].as_array_mut().expect("tlogs") {
        if l["logId"]["keyId"] == "wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0=" {
            l["publicKey"]["validFor"]["end"] = "2023-07-12T15:56:35Z".into();
        }
    }
    let e = run(&r, &v01(), &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
}

#[test]
fn ca_window_is_honoured() {
    let mut r = prod_root();
    for ca in r["certificateAuthorities"].as_array_mut().expect("cas") {
        ca["validFor"]["end"] = "2023-07-12T15:56:35Z".into();
    }
    let e = run(&r, &v01(), &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Certificate, "{e}");
}

#[test]
fn identity_and_issuer_are_exact() {
    let p = Policy::Identity {
        identity: Matcher::Exact(format!("{ID}x")),
        issuer: Matcher::Exact(ISS.into()),
    };
    assert_eq!(
        run(&prod_root(), &v01(), &p).expect_err("identity").kind(),
        VerifyErrorKind::Policy
    );
    let p = Policy::Identity {
        identity: Matcher::Exact(ID.into()),
        issuer: Matcher::Exact("https://token.actions.githubusercontent.com/".into()),
    };
    assert_eq!(
        run(&prod_root(), &v01(), &p).expect_err("issuer").kind(),
        VerifyErrorKind::Policy
    );
}

#[test]
fn rekor2_needs_a_trusted_tsa() {
    let (mut root, bundle) = rekor2();
    root["timestampAuthorities"] = Value::Array(vec![]);
    let e = run(&root, &bundle, &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Timestamp, "{e}");
}

#[test]
fn rekor2_log_must_be_in_the_root() {
    let (mut root, bundle) = rekor2();
    root["tlogs"]
        .as_array_mut()
        .expect("tlogs")
        .retain(|l| l["baseUrl"] != "https://log2025-alpha1.rekor.sigstage.dev");
    let e = run(&root, &bundle, &policy()).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
}

#[test]
fn key_policy_with_another_key_fails() {
    let root = json("bundle-verify/managed-key-and-trusted-root/trusted_root.json");
    let bundle = json("bundle-verify/managed-key-and-trusted-root/bundle.sigstore.json");
    let good = PublicKey::from_pem(
        std::str::from_utf8(&fixture(
            "bundle-verify/managed-key-and-trusted-root/key.pub",
        ))
        .expect("utf8"),
    )
    .expect("key");
    run(&root, &bundle, &Policy::Key(good)).expect("right key verifies");
    // The staging Rekor v1 key: a valid P-256 key that did not sign the artifact.
    let other = PublicKey::from_pem(
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEDODRU688UYGuy54mNUlaEBiQdTE9\nnYLr0lg6RXowI/QV/RE1azBn4Eg5/2uTOMbhB1/gfcHzijzFi9Tk+g1Prg==\n-----END PUBLIC KEY-----\n",
    )
    .expect("key");
    let e = run(&root, &bundle, &Policy::Key(other)).expect_err("must fail");
    assert_eq!(e.kind(), VerifyErrorKind::Signature, "{e}");
    // A certificate bundle cannot be verified with --key.
    let k = PublicKey::from_pem(
        std::str::from_utf8(&fixture(
            "bundle-verify/managed-key-and-trusted-root/key.pub",
        ))
        .expect("utf8"),
    )
    .expect("key");
    assert!(run(&prod_root(), &v01(), &Policy::Key(k)).is_err());
}

#[test]
fn issuer_extension_falls_back_to_legacy_oid() {
    use rcgen::{CertificateParams, CustomExtension, KeyPair};
    let kp = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![]).expect("params");
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 57264, 1, 1],
            b"https://legacy.example".to_vec(),
        ));
    let der = params.self_signed(&kp).expect("cert").der().to_vec();
    let c = cert::Certificate::from_der(&der).expect("parse");
    assert_eq!(c.oidc_issuer().as_deref(), Some("https://legacy.example"));
    // With both present, .1.8 (a DER UTF8String) wins.
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 57264, 1, 8],
            der::encode(0x0c, b"https://new.example"),
        ));
    let der = params.self_signed(&kp).expect("cert").der().to_vec();
    let c = cert::Certificate::from_der(&der).expect("parse");
    assert_eq!(c.oidc_issuer().as_deref(), Some("https://new.example"));
}

// ---- Finding 15: bundles the verifier must refuse (each verified before). ----

fn v03() -> Value {
    json("bundle-verify/happy-path-v0.3/bundle.sigstore.json")
}

fn rekor2_verifies(b: &Value) -> Result<Verified, VerifyError> {
    let (root, _) = rekor2();
    run(&root, b, &policy())
}

fn b64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn rekor2_timestamp(b: &Value) -> Vec<u8> {
    let ts = b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]
        ["signedTimestamp"]
        .as_str()
        .expect("timestamp");
    keys::b64("ts", ts).expect("b64")
}

fn set_rekor2_timestamp(b: &mut Value, der_bytes: &[u8]) {
    b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]["signedTimestamp"] =
        b64_encode(der_bytes).into();
}

#[test]
fn rekor2_log_index_must_be_the_proven_one() {
    let (_, mut b) = rekor2();
    let v = rekor2_verifies(&b).expect("baseline");
    assert_eq!(v.log_index, 735);
    b["verificationMaterial"]["tlogEntries"][0]["logIndex"] = "736".into();
    let e = rekor2_verifies(&b).expect_err("an unproven logIndex must be refused");
    assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
    assert!(e.to_string().contains("735"), "{e}");
}

#[test]
fn rekor_v1_reports_the_set_signed_index() {
    // Rekor v1 entries carry the global index (signed by the SET) and a per-shard proof index.
    let v = run(&prod_root(), &v01(), &policy()).expect("v0.1 verifies");
    assert_eq!(v.log_index, 27_246_492);
}

#[test]
fn checkpoint_line_naming_another_signer_is_refused() {
    let (_, mut b) = rekor2();
    let cp = &mut b["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"]["envelope"];
    let renamed = cp.as_str().expect("checkpoint").replacen(
        "\u{2014} log2025-alpha1.rekor.sigstage.dev ",
        "\u{2014} other.example ",
        1,
    );
    *cp = renamed.into();
    let e = rekor2_verifies(&b).expect_err("signer name must be the origin's");
    assert_eq!(e.kind(), VerifyErrorKind::Tlog, "{e}");
}

#[test]
fn both_message_signature_and_dsse_envelope_are_refused() {
    let dsse = json("bundle-verify/happy-path-intoto-in-dsse-v3/bundle.sigstore.json");
    let mut b = v01();
    b["dsseEnvelope"] = dsse["dsseEnvelope"].clone();
    let e = run(&prod_root(), &b, &policy()).expect_err("two signed contents");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    assert!(e.to_string().contains("more than one"), "{e}");
}

#[test]
fn more_than_one_kind_of_verification_material_is_refused() {
    // v0.3: certificate plus a public key hint, and plus a chain.
    let mut b = v03();
    b["verificationMaterial"]["publicKey"] = serde_json::json!({"hint": "x"});
    let e = run(&prod_root(), &b, &policy()).expect_err("certificate + publicKey");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    let mut b = v01();
    b["verificationMaterial"]["certificate"] =
        b["verificationMaterial"]["x509CertificateChain"]["certificates"][0].clone();
    let e = run(&prod_root(), &b, &policy()).expect_err("chain + certificate");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    // An explicit null is an absent member, as in protobuf JSON.
    let mut b = v03();
    b["verificationMaterial"]["publicKey"] = Value::Null;
    run(&prod_root(), &b, &policy()).expect("null member is absent");
}

#[test]
fn media_type_must_match_the_content() {
    const V01: &str = "application/vnd.dev.sigstore.bundle+json;version=0.1";
    const V02: &str = "application/vnd.dev.sigstore.bundle+json;version=0.2";
    const V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
    // v0.3 content (a single `certificate`) labelled v0.1 or v0.2.
    for mt in [V01, V02] {
        let mut b = v03();
        b["mediaType"] = mt.into();
        let e = run(&prod_root(), &b, &policy()).expect_err(mt);
        assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{mt}: {e}");
    }
    // v0.1 content (an `x509CertificateChain`) labelled v0.3.
    let mut b = v01();
    b["mediaType"] = V03.into();
    let e = run(&prod_root(), &b, &policy()).expect_err("chain in v0.3");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    // A Rekor v2 entry (no SET) labelled v0.1, even with its certificate put in a chain.
    let (_, mut b) = rekor2();
    b["mediaType"] = V01.into();
    let c = b["verificationMaterial"]
        .as_object_mut()
        .expect("vm")
        .remove("certificate")
        .expect("certificate");
    b["verificationMaterial"]["x509CertificateChain"] = serde_json::json!({"certificates": [c]});
    let e = rekor2_verifies(&b).expect_err("v0.1 needs a SET");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    // v0.1 content labelled v0.2 still verifies: it has its inclusion proof.
    let mut b = v01();
    b["mediaType"] = V02.into();
    run(&prod_root(), &b, &policy()).expect("v0.1 content is valid v0.2");
}

/// The (issuer, serial) signer id's serial number inside a TimeStampResp, located with the
/// module's own DER reader: (offset, length) of its content octets.
fn sid_serial_span(ts: &[u8]) -> (usize, usize) {
    let top = der::read_all(ts).expect("resp");
    let token = der::children(top.value).expect("resp parts")[1];
    let wrapped = der::children(token.value).expect("ci")[1];
    let sd = der::read_all(wrapped.value).expect("sd");
    let fields = der::children(sd.value).expect("sd fields");
    let infos = fields.last().expect("signerInfos");
    let si = der::children(infos.value).expect("infos")[0];
    let sid = der::children(si.value).expect("si")[1];
    let (_, rest) = der::expect(sid.value, der::SEQUENCE).expect("issuer");
    let serial = der::read_all(rest).expect("serial");
    let off = serial.value.as_ptr() as usize - ts.as_ptr() as usize;
    (off, serial.value.len())
}

#[test]
fn rfc3161_outer_tag_and_signer_id_are_checked() {
    let (_, mut b) = rekor2();
    let ts = rekor2_timestamp(&b);
    assert_eq!(ts[0], der::SEQUENCE);
    // The outer TimeStampResp SEQUENCE relabelled as a SET.
    let mut wrong_tag = ts.clone();
    wrong_tag[0] = der::SET;
    set_rekor2_timestamp(&mut b, &wrong_tag);
    let e = rekor2_verifies(&b).expect_err("outer tag");
    assert_eq!(e.kind(), VerifyErrorKind::Timestamp, "{e}");
    // A signer id naming another certificate (serial changed); the signature does not cover it.
    let (off, len) = sid_serial_span(&ts);
    let mut wrong_sid = ts.clone();
    wrong_sid[off + len - 1] ^= 0x01;
    set_rekor2_timestamp(&mut b, &wrong_sid);
    let e = rekor2_verifies(&b).expect_err("signer id");
    assert_eq!(e.kind(), VerifyErrorKind::Timestamp, "{e}");
    assert!(e.to_string().contains("SignerInfo"), "{e}");
    // The untouched token still verifies.
    set_rekor2_timestamp(&mut b, &ts);
    rekor2_verifies(&b).expect("original timestamp");
}

#[test]
fn the_cost_of_one_bundle_is_capped() {
    use bundle::{MAX_BUNDLE_BYTES, MAX_TIMESTAMPS};
    let (_, b) = rekor2();
    let copies = |n: usize| {
        let mut b = b.clone();
        let one =
            b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0].clone();
        b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"] =
            Value::Array(vec![one; n]);
        b
    };
    rekor2_verifies(&copies(2)).expect("two timestamps are fine");
    let e = rekor2_verifies(&copies(MAX_TIMESTAMPS + 1)).expect_err("too many timestamps");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    // 10,000 copies are refused by size before any is parsed or verified.
    let started = std::time::Instant::now();
    let e = rekor2_verifies(&copies(10_000)).expect_err("huge bundle");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut padded = serde_json::to_vec(&b).expect("ser");
    padded.resize(MAX_BUNDLE_BYTES + 1, b' ');
    let e = Bundle::from_json(&padded).expect_err("oversized");
    assert!(e.to_string().contains("more than"), "{e}");
    // Too many tlog entries and too long a chain.
    let (_, mut many) = rekor2();
    let entry = many["verificationMaterial"]["tlogEntries"][0].clone();
    many["verificationMaterial"]["tlogEntries"] =
        Value::Array(vec![entry; bundle::MAX_TLOG_ENTRIES + 1]);
    let e = rekor2_verifies(&many).expect_err("tlog entries");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
    let mut long = v01();
    let c = long["verificationMaterial"]["x509CertificateChain"]["certificates"][0].clone();
    long["verificationMaterial"]["x509CertificateChain"]["certificates"] =
        Value::Array(vec![c; bundle::MAX_CHAIN_CERTIFICATES + 1]);
    let e = run(&prod_root(), &long, &policy()).expect_err("chain");
    assert_eq!(e.kind(), VerifyErrorKind::Bundle, "{e}");
}

// ---- Finding 14: RFC 5280 §4.2, unknown critical extensions. ----

fn leaf_with_extension(critical: bool) -> Vec<u8> {
    use rcgen::{CertificateParams, CustomExtension, KeyPair};
    let kp = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["a.example".into()]).expect("params");
    let mut ext =
        CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    ext.set_criticality(critical);
    params.custom_extensions.push(ext);
    params.self_signed(&kp).expect("cert").der().to_vec()
}

#[test]
fn unknown_critical_extension_is_refused() {
    let e = cert::Certificate::from_der(&leaf_with_extension(true))
        .expect_err("unknown critical extension");
    assert_eq!(e.kind(), VerifyErrorKind::Certificate, "{e}");
    assert!(e.to_string().contains("critical"), "{e}");
    let c = cert::Certificate::from_der(&leaf_with_extension(false)).expect("non-critical");
    assert_eq!(c.san_values(), vec!["a.example".to_string()]);
}

#[test]
fn bundle_leaf_with_unknown_critical_extension_is_refused() {
    let mut b = v03();
    b["verificationMaterial"]["certificate"]["rawBytes"] =
        b64_encode(&leaf_with_extension(true)).into();
    let e = run(&prod_root(), &b, &policy()).expect_err("critical extension on the leaf");
    assert_eq!(e.kind(), VerifyErrorKind::Certificate, "{e}");
    assert!(e.to_string().contains("critical"), "{e}");
}

#[test]
fn fulcio_and_tsa_certificates_parse_with_their_extensions() {
    let b = v03();
    let der_bytes = keys::b64(
        "c",
        b["verificationMaterial"]["certificate"]["rawBytes"]
            .as_str()
            .expect("rawBytes"),
    )
    .expect("b64");
    let c = cert::Certificate::from_der(&der_bytes).expect("Fulcio leaf");
    assert!(c.has_eku(cert::OID_EKU_CODE_SIGNING));
    assert!(c.allows_digital_signature());
    assert!(!c.is_ca());
    assert_eq!(c.san_values(), vec![ID.to_string()]);
    assert_eq!(c.oidc_issuer().as_deref(), Some(ISS));
    let root = TrustedRoot::from_json(&fixture("public-good/trusted_root.json")).expect("root");
    assert!(
        root.certificate_authorities
            .iter()
            .flat_map(|ca| &ca.chain)
            .all(|c| c.is_ca())
    );
}
