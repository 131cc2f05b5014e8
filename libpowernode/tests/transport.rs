//! The platform client against a real TLS server on loopback that answers with canned, often
//! hostile, HTTP replies: every bad reply must become a clear, correctly classified error.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use powernode::config::PlatformConfig;
use powernode::transport::PlatformClient;
use powernode::{Error, ErrorKind};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server {
    url: String,
    ca_pem: String,
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
}

/// Serve `reply` (raw HTTP/1.1 bytes) to every connection.
async fn serve(reply: Vec<u8>) -> Server {
    let (ca_pem, cert, key) = pki();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // The client may hang up early (that is the point of some cases).
                if tls.write_all(&reply).await.is_ok() {
                    tls.shutdown().await.ok();
                }
            });
        }
    });
    Server {
        url: format!("https://{addr}"),
        ca_pem,
    }
}

fn response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

fn chunked(chunks: usize, size: usize) -> Vec<u8> {
    let mut r =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..chunks {
        r.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        r.extend_from_slice(&vec![b'y'; size]);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

fn cfg() -> PlatformConfig {
    PlatformConfig {
        max_response_bytes: 4096,
        request_timeout_secs: 5,
        ..PlatformConfig::default()
    }
}

async fn call(s: &Server) -> Result<serde_json::Value, Error> {
    let c = PlatformClient::new(&cfg(), &s.url, &s.ca_pem, None, Some("jwt".into())).unwrap();
    c.post("/status/heartbeat", &serde_json::json!({"x": 1}))
        .await
}

#[tokio::test]
async fn good_reply_is_decoded() {
    let s = serve(response(
        "200 OK",
        &["Content-Type: application/json"],
        br#"{"success":true,"data":{"ok":1}}"#,
    ))
    .await;
    assert_eq!(call(&s).await.unwrap()["ok"], 1);
}

#[tokio::test]
async fn hostile_replies_become_classified_errors() {
    let big = vec![b'x'; 10_000];
    let cases: Vec<(Vec<u8>, ErrorKind, &str)> = vec![
        (
            response("200 OK", &[], b"<html>hi</html>"),
            ErrorKind::Malformed,
            "not a JSON envelope",
        ),
        (
            response("200 OK", &[], br#"{"success":true,"data":"#),
            ErrorKind::Malformed,
            "not a JSON envelope",
        ),
        (
            response("200 OK", &[], &big),
            ErrorKind::TooLarge,
            "exceeds the limit of 4096",
        ),
        // No Content-Length: the cap must hold while the body streams in.
        (chunked(10, 1024), ErrorKind::TooLarge, "exceeds the limit"),
        (
            response("302 Found", &["Location: https://evil.example/steal"], b""),
            ErrorKind::Refused,
            "redirect",
        ),
        (
            response(
                "422 Unprocessable Entity",
                &[],
                br#"{"success":false,"error":"token already consumed","code":"VALIDATION_ERROR"}"#,
            ),
            ErrorKind::Refused,
            "token already consumed",
        ),
        (
            response("503 Service Unavailable", &["Retry-After: 7"], b"down"),
            ErrorKind::Unreachable,
            "HTTP 503",
        ),
    ];
    for (reply, kind, needle) in cases {
        let s = serve(reply).await;
        let e = call(&s).await.expect_err("must fail");
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    let s = serve(response(
        "503 Service Unavailable",
        &["Retry-After: 7"],
        b"down",
    ))
    .await;
    match call(&s).await {
        Err(Error::Unavailable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_not_chaining_to_the_bundle_is_refused() {
    let s = serve(response("200 OK", &[], br#"{"success":true,"data":{}}"#)).await;
    let (other_ca, _, _) = pki();
    let c = PlatformClient::new(&cfg(), &s.url, &other_ca, None, None).unwrap();
    let e = c.post::<_, serde_json::Value>("/x", &1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable);
    // Both test CAs share a name, so rustls reports the signature rather than the issuer.
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
}
