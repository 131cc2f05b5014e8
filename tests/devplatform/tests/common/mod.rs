//! Test harness: runs the real `powernode-devplatform` binary on 127.0.0.1:0 in a temporary
//! state directory, and builds reqwest clients whose rustls configuration trusts only the dev CA
//! and (optionally) presents an Ed25519 client identity generated here with rcgen.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_powernode-devplatform");
pub const PREFIX: &str = "/api/v1/system/node_api";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server.
pub struct Platform {
    child: Option<Child>,
    pub state: PathBuf,
    pub url: String,
    pub ca_path: PathBuf,
    pub ca_pem: String,
}

impl Platform {
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .expect("server log file");
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--state")
            .arg(state)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ca_path = None;
        let mut url = None;
        while ca_path.is_none() || url.is_none() {
            let line = rx
                .recv_timeout(STARTUP_TIMEOUT)
                .expect("server printed CA and URL lines");
            if let Some(p) = line.strip_prefix("CA ") {
                ca_path = Some(PathBuf::from(p));
            } else if let Some(u) = line.strip_prefix("URL ") {
                url = Some(u.to_owned());
            }
        }
        let ca_path = ca_path.expect("CA line");
        let url = url.expect("URL line");
        assert!(
            ca_path.is_absolute(),
            "CA path must be absolute: {ca_path:?}"
        );
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        assert_eq!(
            std::fs::read_to_string(state.join("url"))
                .expect("url file")
                .trim(),
            url
        );
        let ca_pem = std::fs::read_to_string(&ca_path).expect("read CA");
        Self {
            child: Some(child),
            state: state.to_path_buf(),
            url,
            ca_path,
            ca_pem,
        }
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{PREFIX}/{path}", self.url)
    }

    /// SIGTERM and wait; asserts a clean exit 0.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = child.wait().expect("wait");
        assert!(status.success(), "server exit status {status}");
    }

    pub fn token(&self, instance_uuid: Option<&str>, ttl_secs: u64) -> (String, String) {
        create_token(&self.state, instance_uuid, ttl_secs)
    }

    pub fn anon_client(&self) -> reqwest::Client {
        client(&self.ca_pem, None)
    }

    pub fn instances(&self) -> Vec<Value> {
        let out = cli(&["instances", "--state", path_str(&self.state), "--json"]);
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("instances JSON array")
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                eprintln!("killing server: {e}");
            }
            if let Err(e) = child.wait() {
                eprintln!("waiting for server: {e}");
            }
        }
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run the CLI and require success.
pub fn cli(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("run CLI");
    assert!(
        out.status.success(),
        "CLI {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `token create --json`; returns (token, instance_uuid).
pub fn create_token(state: &Path, instance_uuid: Option<&str>, ttl_secs: u64) -> (String, String) {
    let ttl = ttl_secs.to_string();
    let mut args = vec![
        "token",
        "create",
        "--state",
        path_str(state),
        "--ttl-secs",
        &ttl,
        "--json",
    ];
    if let Some(u) = instance_uuid {
        args.extend(["--instance-uuid", u]);
    }
    let out = cli(&args);
    let v: Value = serde_json::from_slice(&out.stdout).expect("token JSON");
    (
        v["token"].as_str().expect("token").to_owned(),
        v["instance_uuid"].as_str().expect("uuid").to_owned(),
    )
}

/// An Ed25519 node key.
pub struct NodeKey {
    pub key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Self {
        Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key"),
        }
    }

    pub fn csr_pem(&self, cn: &str) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .serialize_request(&self.key)
            .expect("csr")
            .pem()
            .expect("csr pem")
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// reqwest client trusting only `ca_pem`, optionally presenting (cert PEM, key PEM); TLS 1.3.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    client_with_version(ca_pem, identity, &rustls::version::TLS13)
}

pub fn client_with_version(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    version: &'static rustls::SupportedProtocolVersion,
) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("add root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert PEM");
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth cert")
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Credentials from a successful enroll/refresh plus the key they belong to.
pub struct Enrolled {
    pub key: NodeKey,
    pub data: Value,
}

impl Enrolled {
    pub fn instance_id(&self) -> &str {
        self.data["instance_id"].as_str().expect("instance_id")
    }
    pub fn cert_pem(&self) -> &str {
        self.data["cert_pem"].as_str().expect("cert_pem")
    }
    pub fn jwt(&self) -> &str {
        self.data["instance_token"]
            .as_str()
            .expect("instance_token")
    }
    pub fn client(&self, ca_pem: &str) -> reqwest::Client {
        client(ca_pem, Some((self.cert_pem(), &self.key.key_pem())))
    }
}

/// POST JSON and return (status, body JSON).
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut req = client.post(url).json(body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"));
    (status, json)
}

/// Enroll a fresh key with `token`; panics unless 200.
pub async fn enroll(p: &Platform, token: &str) -> Enrolled {
    let key = NodeKey::generate();
    let body = serde_json::json!({
        "bootstrap_token": token,
        "csr_pem": key.csr_pem("csr-cn-is-ignored"),
        "agent_version": "test-0.1",
    });
    let (status, json) = post(&p.anon_client(), &p.endpoint("enroll"), &body, None).await;
    assert_eq!(status, 200, "enroll failed: {json}");
    assert_eq!(json["success"], true);
    Enrolled {
        key,
        data: json["data"].clone(),
    }
}

/// Decode a JWT's claims without verifying (the server verifies; tests inspect).
pub fn jwt_claims(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("claims part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("claims JSON")
}

/// Assert an error envelope.
pub fn assert_error(status: u16, json: &Value, want_status: u16, want_code: &str, want_msg: &str) {
    assert_eq!(status, want_status, "{json}");
    assert_eq!(json["success"], false, "{json}");
    assert_eq!(json["code"], want_code, "{json}");
    let msg = json["error"].as_str().expect("error text");
    assert!(
        msg.contains(want_msg),
        "error {msg:?} should contain {want_msg:?}"
    );
}
