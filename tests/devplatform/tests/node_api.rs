//! End-to-end tests of the development platform: the real binary, real TLS with client
//! certificates, the admin CLI against the same state directory, and restarts.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn state_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    (dir, state)
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM")
        .to_vec()
}

fn serial_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    let raw = cert.tbs_certificate.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(0);
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

fn heartbeat_body(boot_id: &str) -> Value {
    json!({
        "boot_id": boot_id,
        "agent_version": "test-0.2",
        "architecture": "x86_64",
        "uptime_seconds": 42,
        "module_digests": {"base": "sha256:abc"},
        "mount_state": "mounted",
        "load_average": "0.10 0.20 0.30",
        "memory_free_kb": 123456,
        "sdwan_state": [{"interface": "wg0", "peer_count": 1}],
        "some_future_field": {"ignored": true},
    })
}

#[tokio::test]
async fn enroll_issues_cert_chained_to_ca_with_forced_cn_and_valid_jwt() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let uuid = "0d6f4a2e-5b1c-4e8f-9a3d-7c2b1e0f4a5b";
    let (token, bound) = p.token(Some(uuid), 3600);
    assert_eq!(bound, uuid);
    let e = enroll(&p, &token).await;
    let d = &e.data;

    assert_eq!(d["instance_id"], uuid);
    assert_eq!(d["mtls_subject"], uuid);
    assert_eq!(d["ca_chain_pem"].as_str(), Some(p.ca_pem.as_str()));
    assert!(uuid::Uuid::parse_str(d["certificate_id"].as_str().expect("id")).is_ok());

    // Certificate: CN forced to the instance uuid, signed by the CA key, client-auth only,
    // CSR's public key, ~90 days.
    let der = pem_der(e.cert_pem());
    let ca_der = pem_der(&p.ca_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("leaf");
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
    let cn = cert.subject().iter_common_name().next().expect("CN");
    assert_eq!(cn.as_str().expect("CN str"), uuid);
    assert_eq!(cert.issuer(), ca.subject());
    let ca_cn = ca.subject().iter_common_name().next().expect("CA CN");
    assert_eq!(ca_cn.as_str().expect("str"), "Powernode Dev CA");
    let ca_key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ED25519,
        ca.public_key().subject_public_key.data.as_ref(),
    );
    ca_key
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .expect("leaf signature verifies with the CA key");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        e.key.key.public_key_raw()
    );
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("eku present");
    assert!(eku.value.client_auth);
    assert!(
        !cert
            .basic_constraints()
            .expect("bc")
            .expect("bc present")
            .value
            .ca
    );
    let ku = cert.key_usage().expect("ku").expect("ku present");
    assert!(ku.value.digital_signature());
    assert!(serial_hex(&der).len() >= 16, "serial >= 64 bits");
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 7_776_000 + 60, "90 days plus 60 s backdating");
    let not_after = time::OffsetDateTime::parse(
        d["not_after"].as_str().expect("not_after"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339 not_after");
    assert_eq!(
        not_after.unix_timestamp(),
        cert.validity().not_after.timestamp()
    );

    // JWT claims.
    let c = jwt_claims(e.jwt());
    assert_eq!(c["type"], "instance");
    assert_eq!(c["sub"], uuid);
    assert_eq!(c["iss"], "powernode-devplatform");
    assert_eq!(c["aud"], "powernode-node-api");
    assert_eq!(c["version"], 2);
    assert_eq!(
        c["exp"].as_i64().expect("exp") - c["iat"].as_i64().expect("iat"),
        86_400
    );
    assert!(uuid::Uuid::parse_str(c["jti"].as_str().expect("jti")).is_ok());

    // Enrolled but not yet heard from.
    let list = p.instances();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["last_heartbeat_at"], Value::Null);
    assert_eq!(list[0]["agent_version"], "test-0.1");
    assert_eq!(
        list[0]["certificates_issued"][0]["serial"],
        serial_hex(&der)
    );
    p.stop();
}

#[tokio::test]
async fn bootstrap_token_is_single_use_and_accepted_from_header() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let (token, _) = p.token(None, 3600);
    let key = NodeKey::generate();
    let res = p
        .anon_client()
        .post(p.endpoint("enroll"))
        .header("X-Bootstrap-Token", &token)
        .json(&json!({"csr_pem": key.csr_pem("x")}))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 200);

    let body = json!({"bootstrap_token": token, "csr_pem": key.csr_pem("x")});
    let (status, json) = post(&p.anon_client(), &p.endpoint("enroll"), &body, None).await;
    assert_error(
        status,
        &json,
        422,
        "VALIDATION_ERROR",
        "token already consumed",
    );

    let body = json!({"bootstrap_token": "never-issued", "csr_pem": key.csr_pem("x")});
    let (status, json) = post(&p.anon_client(), &p.endpoint("enroll"), &body, None).await;
    assert_error(
        status,
        &json,
        422,
        "VALIDATION_ERROR",
        "invalid or expired bootstrap token",
    );
}

#[tokio::test]
async fn expired_token_is_rejected() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let (token, _) = p.token(None, 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let body = json!({"bootstrap_token": token, "csr_pem": NodeKey::generate().csr_pem("x")});
    let (status, json) = post(&p.anon_client(), &p.endpoint("enroll"), &body, None).await;
    assert_error(
        status,
        &json,
        422,
        "VALIDATION_ERROR",
        "invalid or expired bootstrap token",
    );
    assert!(p.instances().is_empty());
}

#[tokio::test]
async fn enroll_input_errors() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let c = p.anon_client();
    let url = p.endpoint("enroll");
    let csr = NodeKey::generate().csr_pem("x");

    let (status, json) = post(&c, &url, &json!({"csr_pem": csr}), None).await;
    assert_error(
        status,
        &json,
        401,
        "UNAUTHORIZED",
        "Bootstrap token required (body :bootstrap_token or header X-Bootstrap-Token)",
    );

    let (token, _) = p.token(None, 3600);
    let (status, json) = post(&c, &url, &json!({"bootstrap_token": token}), None).await;
    assert_error(
        status,
        &json,
        400,
        "PARAMETER_MISSING",
        "param is missing or the value is empty: csr_pem",
    );
    let (status, json) = post(
        &c,
        &url,
        &json!({"bootstrap_token": token, "csr_pem": ""}),
        None,
    )
    .await;
    assert_error(status, &json, 400, "PARAMETER_MISSING", "csr_pem");

    // A CSR whose signature does not verify: 422, and the token is not burnt.
    let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
    let mid = lines.len() / 2;
    lines[mid] = lines[mid]
        .chars()
        .map(|ch| {
            if ch == 'A' {
                'B'
            } else if ch == 'B' {
                'A'
            } else {
                ch
            }
        })
        .collect();
    let bad = lines.join("\n");
    let (status, json) = post(
        &c,
        &url,
        &json!({"bootstrap_token": token, "csr_pem": bad}),
        None,
    )
    .await;
    assert_error(status, &json, 422, "VALIDATION_ERROR", "CSR/CA failure: ");
    let (status, json) = post(
        &c,
        &url,
        &json!({"bootstrap_token": token, "csr_pem": "garbage"}),
        None,
    )
    .await;
    assert_error(status, &json, 422, "VALIDATION_ERROR", "CSR/CA failure: ");
    let (status, _) = post(
        &c,
        &url,
        &json!({"bootstrap_token": token, "csr_pem": csr}),
        None,
    )
    .await;
    assert_eq!(status, 200, "token survives CSR failures");
}

#[tokio::test]
async fn malformed_json_wrong_types_and_unknown_routes() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let c = p.anon_client();
    let res = c
        .post(p.endpoint("enroll"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 400);
    let json: Value = res.json().await.expect("json");
    assert_error(400, &json, 400, "BAD_REQUEST", "Invalid JSON body");

    let (status, json) = post(
        &c,
        &p.endpoint("enroll"),
        &json!({"bootstrap_token": 12}),
        None,
    )
    .await;
    assert_error(
        status,
        &json,
        400,
        "BAD_REQUEST",
        "bootstrap_token: invalid type",
    );

    let e = enroll(&p, &p.token(None, 3600).0).await;
    let (status, json) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &json!({"uptime_seconds": "long"}),
        Some(e.jwt()),
    )
    .await;
    assert_error(status, &json, 400, "BAD_REQUEST", "uptime_seconds");

    let (status, json) = post(&c, &p.endpoint("no/such/route"), &json!({}), None).await;
    assert_error(status, &json, 404, "NOT_FOUND", "Route not found");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let big = json!({"bootstrap_token": "x", "padding": "a".repeat(2 * 1024 * 1024)});
    let (status, json) = post(&p.anon_client(), &p.endpoint("enroll"), &big, None).await;
    assert_error(status, &json, 413, "PAYLOAD_TOO_LARGE", "exceeds");

    let e = enroll(&p, &p.token(None, 3600).0).await;
    let (status, json) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &big,
        Some(e.jwt()),
    )
    .await;
    assert_error(status, &json, 413, "PAYLOAD_TOO_LARGE", "exceeds");
    // A body just under the cap is accepted.
    let ok = json!({"boot_id": "b", "padding": "a".repeat(1024 * 1024 - 100)});
    let (status, _) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &ok,
        Some(e.jwt()),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn heartbeat_is_recorded_and_listed() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &["--next-poll-seconds", "7"]);
    let e = enroll(&p, &p.token(None, 3600).0).await;
    let client = e.client(&p.ca_pem);
    for _ in 0..2 {
        let (status, json) = post(
            &client,
            &p.endpoint("status/heartbeat"),
            &heartbeat_body("boot-0123456789abcdef"),
            Some(e.jwt()),
        )
        .await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["success"], true);
        assert_eq!(json["data"]["acknowledged"], true);
        assert_eq!(json["data"]["next_poll_seconds"], 7);
        let server_time = json["data"]["server_time"].as_str().expect("server_time");
        time::OffsetDateTime::parse(server_time, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 server_time");
    }
    let list = p.instances();
    assert_eq!(list.len(), 1);
    let i = &list[0];
    assert_eq!(i["instance_id"], e.instance_id());
    assert_eq!(i["status"], "running");
    assert_eq!(i["heartbeat_count"], 2);
    assert_eq!(i["boot_id"], "boot-0123456789abcdef");
    assert_eq!(i["agent_version"], "test-0.2");
    assert_eq!(i["architecture"], "x86_64");
    assert_eq!(i["uptime_seconds"], 42);
    assert_eq!(i["load_average"], "0.10 0.20 0.30");
    assert_eq!(i["memory_free_kb"], 123456);
    assert_eq!(i["mount_state"], "mounted");
    assert_eq!(i["module_digests"], json!({"base": "sha256:abc"}));
    assert!(i["last_heartbeat_at"].is_string());
    let serial = serial_hex(&pem_der(e.cert_pem()));
    assert_eq!(i["certificate_serials_seen"], json!([serial]));
    assert_eq!(i["certificates_issued"][0]["serial"], serial);

    // The human table mentions the instance.
    let out = cli(&["instances", "--state", path_str(&state)]);
    let table = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        table.contains(e.instance_id()) && table.contains("running"),
        "{table}"
    );
}

#[tokio::test]
async fn instance_auth_requires_matching_cert_and_jwt() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let a = enroll(&p, &p.token(None, 3600).0).await;
    let b = enroll(&p, &p.token(None, 3600).0).await;
    let url = p.endpoint("status/heartbeat");
    let body = heartbeat_body("boot-x");

    let (s, j) = post(&p.anon_client(), &url, &body, None).await;
    assert_error(
        s,
        &j,
        401,
        "UNAUTHORIZED",
        "Instance token or mTLS client certificate required",
    );
    let (s, j) = post(&p.anon_client(), &url, &body, Some(a.jwt())).await;
    assert_error(
        s,
        &j,
        401,
        "UNAUTHORIZED",
        "mTLS client certificate required",
    );
    let (s, j) = post(&a.client(&p.ca_pem), &url, &body, None).await;
    assert_error(s, &j, 401, "UNAUTHORIZED", "Instance token required");
    let (s, j) = post(&a.client(&p.ca_pem), &url, &body, Some(b.jwt())).await;
    assert_error(s, &j, 401, "UNAUTHORIZED", "does not match");
    let mut forged = a.jwt().to_owned();
    forged.pop();
    forged.push(if a.jwt().ends_with('A') { 'B' } else { 'A' });
    let (s, j) = post(&a.client(&p.ca_pem), &url, &body, Some(&forged)).await;
    assert_error(s, &j, 401, "UNAUTHORIZED", "Invalid instance token: ");
    let (s, j) = post(&a.client(&p.ca_pem), &url, &body, Some("not.a.jwt")).await;
    assert_error(
        s,
        &j,
        401,
        "UNAUTHORIZED",
        "Invalid instance token: malformed",
    );

    // Nothing above counted as a heartbeat or recorded a serial.
    for i in p.instances() {
        assert_eq!(i["heartbeat_count"], 0);
        assert_eq!(i["status"], "pending");
        assert_eq!(i["certificate_serials_seen"], json!([]));
    }

    let (s, j) = post(&a.client(&p.ca_pem), &url, &body, Some(a.jwt())).await;
    assert_eq!(s, 200, "{j}");
}

#[tokio::test]
async fn expired_jwt_is_rejected() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &["--jwt-ttl-secs", "1"]);
    let e = enroll(&p, &p.token(None, 3600).0).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (s, j) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &json!({}),
        Some(e.jwt()),
    )
    .await;
    assert_error(
        s,
        &j,
        401,
        "UNAUTHORIZED",
        "Invalid instance token: expired",
    );
}

#[tokio::test]
async fn foreign_client_certificate_fails_the_handshake() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let e = enroll(&p, &p.token(None, 3600).0).await;

    // Same CN and a valid JWT, but the certificate comes from a CA the server does not trust.
    let foreign_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Powernode Dev CA");
    let foreign_ca = ca_params.self_signed(&foreign_key).expect("foreign CA");
    let issuer = rcgen::Issuer::new(ca_params, foreign_key);
    let node = NodeKey::generate();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, e.instance_id());
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&node.key, &issuer).expect("leaf");
    let chain = format!("{}{}", leaf.pem(), foreign_ca.pem());
    let bad = client(&p.ca_pem, Some((&chain, &node.key_pem())));
    let res = bad
        .post(p.endpoint("status/heartbeat"))
        .bearer_auth(e.jwt())
        .json(&json!({}))
        .send()
        .await;
    assert!(res.is_err(), "handshake must be refused, got {res:?}");

    // The server survived and still serves the legitimate node.
    let (s, j) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &json!({}),
        Some(e.jwt()),
    )
    .await;
    assert_eq!(s, 200, "{j}");
}

#[tokio::test]
async fn refresh_issues_new_serial_and_old_cert_keeps_working() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let old = enroll(&p, &p.token(None, 3600).0).await;
    let url = p.endpoint("enroll/refresh");

    let (s, j) = post(&old.client(&p.ca_pem), &url, &json!({}), Some(old.jwt())).await;
    assert_error(s, &j, 400, "PARAMETER_MISSING", "csr_pem");
    // A bootstrap token is not instance auth.
    let (token, _) = p.token(None, 3600);
    let res = p
        .anon_client()
        .post(&url)
        .header("X-Bootstrap-Token", &token)
        .json(&json!({"csr_pem": NodeKey::generate().csr_pem("x")}))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 401);

    let key = NodeKey::generate();
    let body = json!({"csr_pem": key.csr_pem("ignored"), "agent_version": "test-0.3"});
    let (s, j) = post(&old.client(&p.ca_pem), &url, &body, Some(old.jwt())).await;
    assert_eq!(s, 200, "{j}");
    let new = Enrolled {
        key,
        data: j["data"].clone(),
    };
    assert_eq!(new.instance_id(), old.instance_id());
    assert_ne!(new.jwt(), old.jwt());
    let old_serial = serial_hex(&pem_der(old.cert_pem()));
    let new_serial = serial_hex(&pem_der(new.cert_pem()));
    assert_ne!(old_serial, new_serial);
    let new_der = pem_der(new.cert_pem());
    let (_, cert) = x509_parser::parse_x509_certificate(&new_der).expect("x509");
    let cn = cert.subject().iter_common_name().next().expect("CN");
    assert_eq!(cn.as_str().expect("str"), old.instance_id());

    let hb = p.endpoint("status/heartbeat");
    for (who, client, jwt) in [
        ("old cert, new jwt", old.client(&p.ca_pem), new.jwt()),
        ("new cert, new jwt", new.client(&p.ca_pem), new.jwt()),
        ("new cert, old jwt", new.client(&p.ca_pem), old.jwt()),
    ] {
        let (s, j) = post(&client, &hb, &heartbeat_body("b"), Some(jwt)).await;
        assert_eq!(s, 200, "{who}: {j}");
    }
    let list = p.instances();
    let i = &list[0];
    let issued: Vec<&str> = i["certificates_issued"]
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["serial"].as_str().expect("serial"))
        .collect();
    assert_eq!(issued, vec![old_serial.as_str(), new_serial.as_str()]);
    assert_eq!(
        i["certificate_serials_seen"],
        json!([old_serial, new_serial])
    );
    assert_eq!(i["heartbeat_count"], 3);
}

#[tokio::test]
async fn state_survives_restart() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let ca_before = p.ca_pem.clone();
    let first = enroll(&p, &p.token(None, 3600).0).await;
    let (pending_token, pending_uuid) = p.token(None, 3600);
    p.stop();

    let p = Platform::start(&state, &[]);
    assert_eq!(p.ca_pem, ca_before, "CA must persist across restarts");
    // Old credentials still work: CA and JWT secret persisted.
    let (s, j) = post(
        &first.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &heartbeat_body("b"),
        Some(first.jwt()),
    )
    .await;
    assert_eq!(s, 200, "{j}");
    let second = enroll(&p, &pending_token).await;
    assert_eq!(second.instance_id(), pending_uuid);
    let list = p.instances();
    assert_eq!(list.len(), 2);
    p.stop();
}

#[tokio::test]
async fn token_created_while_serving_is_accepted_immediately() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    // Several enrolments racing with CLI writes to the same store.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (token, uuid) = create_token(&state, None, 60);
        let url = p.endpoint("enroll");
        let c = p.anon_client();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"bootstrap_token": token, "csr_pem": NodeKey::generate().csr_pem("x")});
            let (s, j) = post(&c, &url, &body, None).await;
            assert_eq!(s, 200, "{j}");
            assert_eq!(j["data"]["instance_id"], uuid.as_str());
        }));
        // Interleave a CLI write.
        create_token(&state, None, 60);
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(p.instances().len(), 4);
}

#[tokio::test]
async fn tls12_clients_are_served_too() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let e = enroll(&p, &p.token(None, 3600).0).await;
    let c = client_with_version(
        &p.ca_pem,
        Some((e.cert_pem(), &e.key.key_pem())),
        &rustls::version::TLS12,
    );
    let (s, j) = post(
        &c,
        &p.endpoint("status/heartbeat"),
        &json!({}),
        Some(e.jwt()),
    )
    .await;
    assert_eq!(s, 200, "{j}");
}

#[tokio::test]
async fn certificate_of_unknown_instance_is_rejected() {
    let (_tmp, state) = state_dir();
    let p = Platform::start(&state, &[]);
    let e = enroll(&p, &p.token(None, 3600).0).await;
    // Forget the instance behind the server's back (it is idle; the store is re-read per
    // request): its certificate and JWT stay cryptographically valid.
    let path = state.join("store.json");
    let mut store: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("store")).expect("json");
    store["instances"]
        .as_object_mut()
        .expect("instances")
        .clear();
    std::fs::write(&path, serde_json::to_vec(&store).expect("json")).expect("write");
    let (s, j) = post(
        &e.client(&p.ca_pem),
        &p.endpoint("status/heartbeat"),
        &json!({}),
        Some(e.jwt()),
    )
    .await;
    assert_error(
        s,
        &j,
        401,
        "UNAUTHORIZED",
        "Instance not found for mTLS subject",
    );
}
