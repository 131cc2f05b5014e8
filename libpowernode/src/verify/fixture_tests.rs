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
