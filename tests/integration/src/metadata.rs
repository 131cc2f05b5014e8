//! Fake cloud metadata services and a fake claim server, on loopback, for the identity tests.
//!
//! Each fake speaks its cloud's real wire format and *enforces* its headers, so the real probe
//! code is tested, not a convenient subset: AWS IMDSv2 (`PUT /latest/api/token` needs
//! `X-aws-ec2-metadata-token-ttl-seconds` — 400 without — and every GET needs the issued
//! `X-aws-ec2-metadata-token` — 401 without or wrong), GCP (`Metadata-Flavor: Google` else
//! 403, and the same header on every reply), Azure IMDS (`Metadata: true` else 400, an
//! `api-version` query parameter else 400, userData base64-encoded), DigitalOcean and Hetzner
//! (no headers). Every request is recorded (`METHOD path -> status`).
//!
//! The user-data endpoint can misbehave on purpose ([`UserData`]), and [`FakeMetadata::silent`]
//! / [`FakeMetadata::resetting`] / [`refused_url`] stand for a black-holed, a resetting and an
//! absent metadata address. Servers run on their own thread and runtime, so synchronous tests
//! (which spawn daemons) and async tests use them alike. The code under test is pointed at a fake
//! through `[identity] metadata_url` or `POWERNODE_METADATA_URL`; nothing here ever touches
//! 169.254.169.254.
//!
//! identityd asks a cloud only when the firmware names it, so each cloud also has its fake DMI
//! strings ([`Cloud::dmi`], written by [`fake_dmi`] under a node root); [`QEMU_DMI`] is a machine
//! that is no cloud, and a root without `sys/class/dmi/id` is a node without DMI (probed blindly).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Which cloud a fake imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
    DigitalOcean,
    Hetzner,
}

impl Cloud {
    pub const ALL: [Cloud; 5] = [
        Cloud::Aws,
        Cloud::Gcp,
        Cloud::Azure,
        Cloud::DigitalOcean,
        Cloud::Hetzner,
    ];

    /// The SMBIOS strings this cloud's VMs show in `/sys/class/dmi/id` (file, value).
    pub fn dmi(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Cloud::Aws => &[
                ("sys_vendor", "Amazon EC2"),
                ("product_name", "m5.large"),
                ("bios_vendor", "Amazon EC2"),
                ("board_vendor", "Amazon EC2"),
                ("chassis_asset_tag", "Amazon EC2"),
            ],
            Cloud::Gcp => &[
                ("sys_vendor", "Google"),
                ("product_name", "Google Compute Engine"),
                ("bios_vendor", "Google"),
                ("board_vendor", "Google"),
            ],
            Cloud::Azure => &[
                ("sys_vendor", "Microsoft Corporation"),
                ("product_name", "Virtual Machine"),
                ("bios_vendor", "Microsoft Corporation"),
                ("board_vendor", "Microsoft Corporation"),
                ("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77"),
            ],
            Cloud::DigitalOcean => &[
                ("sys_vendor", "DigitalOcean"),
                ("product_name", "Droplet"),
                ("bios_vendor", "DigitalOcean"),
            ],
            Cloud::Hetzner => &[
                ("sys_vendor", "Hetzner"),
                ("product_name", "vServer"),
                ("bios_vendor", "Hetzner"),
            ],
        }
    }

    /// Every request the identity code sends to this cloud starts with this path.
    pub fn path_prefix(self) -> &'static str {
        match self {
            Cloud::Aws => "/latest/",
            Cloud::Gcp => "/computeMetadata/",
            Cloud::Azure => "/metadata/instance",
            Cloud::DigitalOcean => "/metadata/v1/",
            Cloud::Hetzner => "/hetzner/",
        }
    }
}

/// A machine that is no cloud: QEMU's SMBIOS strings (q35, SeaBIOS).
pub const QEMU_DMI: &[(&str, &str)] = &[
    ("sys_vendor", "QEMU"),
    ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
    ("bios_vendor", "SeaBIOS"),
    ("bios_version", "1.16.2-debian-1.16.2-1"),
    ("board_vendor", ""),
    ("chassis_asset_tag", ""),
];

/// Write a fake `/sys/class/dmi/id` under the node root `root` with these strings.
pub fn fake_dmi(root: &Path, strings: &[(&str, &str)]) -> Result<()> {
    let dir = root.join("sys/class/dmi/id");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, value) in strings {
        let p = dir.join(file);
        std::fs::write(&p, format!("{value}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// What the user-data endpoint does.
#[derive(Debug, Clone)]
pub enum UserData {
    /// The instance has user-data: these bytes.
    Body(Vec<u8>),
    /// No user-data (each cloud's own way of saying so).
    Unset,
    /// Answer this status with an empty body.
    Status(u16),
    /// The first `n` requests get 503, then `body`.
    FlakyThen(u32, Vec<u8>),
    /// A body of this many bytes, streamed; with a Content-Length header or chunked.
    Huge { bytes: usize, declare_length: bool },
    /// Accept the request and never answer.
    Hang,
}

/// The recorded requests, `"METHOD /path?query -> status"`.
pub type Log = Arc<Mutex<Vec<String>>>;

struct Inner {
    cloud: Cloud,
    user_data: UserData,
    token: String,
    user_data_calls: Mutex<u32>,
    log: Log,
}

/// A running fake; stopped on drop.
#[derive(Debug)]
pub struct FakeMetadata {
    url: String,
    log: Log,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const AWS_TOKEN: &str = "AQAEAFakeImdsV2SessionToken==";

impl FakeMetadata {
    /// A fake `cloud` whose user-data endpoint behaves as `user_data`.
    pub fn start(cloud: Cloud, user_data: UserData) -> Result<FakeMetadata> {
        let log: Log = Arc::default();
        let inner = Arc::new(Inner {
            cloud,
            user_data,
            token: AWS_TOKEN.to_string(),
            user_data_calls: Mutex::new(0),
            log: log.clone(),
        });
        let router = Router::new().fallback(handle).with_state(inner);
        FakeMetadata::serve(log, move |listener, stop| async move {
            // Stop hard: a connection stuck mid-body (the 100 MB case) must not hold the drop;
            // leaving block_on drops the runtime, which cancels every connection task.
            tokio::select! {
                r = axum::serve(listener, router) => r.context("fake metadata server"),
                _ = stop => Ok(()),
            }
        })
    }

    /// Accepts connections and never answers (a black-holed metadata address, as close as
    /// loopback gets: the SYN is answered by the kernel, the request never is).
    pub fn silent() -> Result<FakeMetadata> {
        FakeMetadata::serve(Arc::default(), |listener, stop| async move {
            let mut held = Vec::new();
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    r = listener.accept() => held.push(r?.0),
                }
            }
        })
    }

    /// Reads each request, then resets the connection (RST, no HTTP answer).
    pub fn resetting() -> Result<FakeMetadata> {
        FakeMetadata::serve(Arc::default(), |listener, stop| async move {
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    r = listener.accept() => {
                        let (mut s, _) = r?;
                        tokio::spawn(async move {
                            let mut buf = [0u8; 4096];
                            if let Err(e) = s.read(&mut buf).await {
                                eprintln!("resetting fake: read: {e}");
                            }
                            // Linger 0: close() sends RST instead of FIN.
                            if let Err(e) = s.set_zero_linger() {
                                eprintln!("resetting fake: SO_LINGER: {e}");
                            }
                            drop(s);
                        });
                    }
                }
            }
        })
    }

    fn serve<F, Fut>(log: Log, body: F) -> Result<FakeMetadata>
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop, stop_rx) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = addr_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = addr_tx.send(listener.local_addr().map_err(Into::into));
                if let Err(e) = body(listener, stop_rx).await {
                    eprintln!("fake metadata server: {e:#}");
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("fake metadata server did not start")??;
        Ok(FakeMetadata {
            url: format!("http://{addr}"),
            log,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The base URL to configure as the metadata URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("fake metadata server thread panicked");
        }
    }
}

/// A loopback URL where nothing listens (connection refused): an address with no service.
pub fn refused_url() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(format!("http://{addr}"))
}

fn status(code: u16, body: impl Into<Body>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, body.into()).into_response()
}

static CHUNK: [u8; 64 * 1024] = [b'A'; 64 * 1024];

async fn user_data_reply(inner: &Inner, found: impl Fn(Vec<u8>) -> Response) -> Response {
    let n = {
        let mut c = inner
            .user_data_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *c += 1;
        *c
    };
    match &inner.user_data {
        UserData::Body(b) => found(b.clone()),
        UserData::Unset => match inner.cloud {
            // Azure answers 200 with an empty userData; the others 404.
            Cloud::Azure => status(200, ""),
            _ => status(404, "Not Found"),
        },
        UserData::Status(s) => status(*s, ""),
        UserData::FlakyThen(k, b) => {
            if n <= *k {
                status(503, "try later")
            } else {
                found(b.clone())
            }
        }
        UserData::Huge {
            bytes,
            declare_length,
        } => {
            let chunks = bytes.div_ceil(CHUNK.len());
            let stream = futures_util::stream::iter(
                (0..chunks).map(|_| Ok::<_, Infallible>(Bytes::from_static(&CHUNK))),
            );
            let mut r = Response::new(Body::from_stream(stream));
            if *declare_length {
                r.headers_mut().insert(
                    axum::http::header::CONTENT_LENGTH,
                    (chunks * CHUNK.len()).into(),
                );
            }
            r
        }
        UserData::Hang => std::future::pending().await,
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let h = req.headers().clone();
    let resp = match inner.cloud {
        Cloud::Aws => aws(&inner, &method, &path, &h).await,
        Cloud::Gcp => gcp(&inner, &method, &path, &h).await,
        Cloud::Azure => azure(&inner, &method, &path, &query, &h).await,
        Cloud::DigitalOcean => {
            simple(
                &inner,
                &method,
                &path,
                "/metadata/v1/id",
                "/metadata/v1/user-data",
                "331829418",
            )
            .await
        }
        Cloud::Hetzner => {
            simple(
                &inner,
                &method,
                &path,
                "/hetzner/v1/metadata/instance-id",
                "/hetzner/v1/userdata",
                "4711",
            )
            .await
        }
    };
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    if let Ok(mut l) = inner.log.lock() {
        l.push(format!("{method} {path}{q} -> {}", resp.status().as_u16()));
    }
    resp
}

async fn aws(inner: &Inner, method: &Method, path: &str, h: &HeaderMap) -> Response {
    if h.contains_key("x-forwarded-for") {
        return status(403, "Forbidden");
    }
    match (method.as_str(), path) {
        ("PUT", "/latest/api/token") => {
            let ttl = header(h, "x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|t| (1..=21600).contains(t));
            match ttl {
                None => status(400, "Bad Request"),
                Some(t) => {
                    let mut r = status(200, inner.token.clone());
                    r.headers_mut()
                        .insert("x-aws-ec2-metadata-token-ttl-seconds", t.into());
                    r
                }
            }
        }
        ("GET", p) if p.starts_with("/latest/") => {
            if header(h, "x-aws-ec2-metadata-token") != Some(inner.token.as_str()) {
                return status(401, "Unauthorized");
            }
            match p {
                "/latest/user-data" => user_data_reply(inner, |b| status(200, b)).await,
                "/latest/meta-data/instance-id" => status(200, "i-0123456789abcdef0"),
                _ => status(404, "Not Found"),
            }
        }
        _ => status(404, "Not Found"),
    }
}

async fn gcp(inner: &Inner, method: &Method, path: &str, h: &HeaderMap) -> Response {
    let mut r =
        if header(h, "metadata-flavor") != Some("Google") || h.contains_key("x-forwarded-for") {
            status(403, "Missing Metadata-Flavor:Google header.")
        } else {
            match (method.as_str(), path) {
                ("GET", "/computeMetadata/v1/") => status(200, "instance/\nproject/\n"),
                ("GET", "/computeMetadata/v1/instance/attributes/user-data") => {
                    user_data_reply(inner, |b| status(200, b)).await
                }
                _ => status(404, "Not Found"),
            }
        };
    r.headers_mut().insert(
        "metadata-flavor",
        axum::http::HeaderValue::from_static("Google"),
    );
    r
}

async fn azure(inner: &Inner, method: &Method, path: &str, query: &str, h: &HeaderMap) -> Response {
    if !path.starts_with("/metadata/") {
        return status(404, "Not Found");
    }
    if header(h, "metadata") != Some("true") || h.contains_key("x-forwarded-for") {
        return status(
            400,
            r#"{"error":"Bad request. Required metadata header not specified"}"#,
        );
    }
    if !query.split('&').any(|kv| kv.starts_with("api-version=")) {
        return status(
            400,
            r#"{"error":"Bad request. api-version was not specified in the request."}"#,
        );
    }
    match (method.as_str(), path) {
        ("GET", "/metadata/instance") => status(
            200,
            r#"{"compute":{"azEnvironment":"AzurePublicCloud","vmId":"02aab8a4-74ef-476e-8182-f6d2ba4166a6"},"network":{}}"#,
        ),
        ("GET", "/metadata/instance/compute/userData") => {
            user_data_reply(inner, |b| {
                status(200, base64::engine::general_purpose::STANDARD.encode(b))
            })
            .await
        }
        _ => status(404, "Not Found"),
    }
}

async fn simple(
    inner: &Inner,
    method: &Method,
    path: &str,
    id_path: &str,
    data_path: &str,
    id: &'static str,
) -> Response {
    match (method.as_str(), path) {
        ("GET", p) if p == id_path => status(200, id),
        ("GET", p) if p == data_path => user_data_reply(inner, |b| status(200, b)).await,
        _ => status(404, "Not Found"),
    }
}

/// One answer of the fake claim server.
#[derive(Debug, Clone)]
pub enum ClaimStep {
    Pending {
        code: String,
        poll_after: u64,
    },
    Claimed {
        instance_uuid: String,
        token: String,
    },
    Expired,
    /// An HTTP error status (the envelope's error form).
    Http(u16),
}

/// A fake platform `claim` endpoint over TLS (self-signed for 127.0.0.1), answering the
/// scripted steps in order (the last one repeats) and recording each request body.
#[derive(Debug)]
pub struct FakeClaim {
    pub url: String,
    pub ca_pem: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct ClaimInner {
    steps: Vec<ClaimStep>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn claim_handler(State(inner): State<Arc<ClaimInner>>, req: Request) -> Response {
    if req.method() != Method::POST || req.uri().path() != "/api/v1/system/node_api/claim" {
        return status(
            404,
            r#"{"success":false,"error":"not found","code":"NOT_FOUND"}"#,
        );
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => return status(400, r#"{"success":false,"error":"body"}"#),
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if v.get("mac")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .is_empty()
    {
        return status(400, r#"{"success":false,"error":"mac is required"}"#);
    }
    let n = {
        let mut b = inner.bodies.lock().unwrap_or_else(|p| p.into_inner());
        b.push(v);
        b.len()
    };
    let step = inner
        .steps
        .get(n - 1)
        .or(inner.steps.last())
        .cloned()
        .unwrap_or(ClaimStep::Expired);
    let data = match step {
        ClaimStep::Pending { code, poll_after } => {
            serde_json::json!({"status":"pending","poll_after_seconds":poll_after,"claim_code":code})
        }
        ClaimStep::Claimed {
            instance_uuid,
            token,
        } => serde_json::json!({"status":"claimed","poll_after_seconds":30,
            "bootstrap_token":token,"instance_uuid":instance_uuid,
            "platform_url":"https://platform.example"}),
        ClaimStep::Expired => serde_json::json!({"status":"expired","poll_after_seconds":0}),
        ClaimStep::Http(code) => {
            return status(
                code,
                format!(r#"{{"success":false,"error":"scripted {code}"}}"#),
            );
        }
    };
    let mut r = status(
        200,
        serde_json::json!({"success":true,"data":data}).to_string(),
    );
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    r
}

impl FakeClaim {
    pub fn start(steps: Vec<ClaimStep>) -> Result<FakeClaim> {
        let key = rcgen::KeyPair::generate().context("key")?;
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        let cert = params.self_signed(&key)?;
        let ca_pem = cert.pem();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| anyhow::anyhow!("key der: {e}"))?,
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let router = Router::new()
            .fallback(claim_handler)
            .with_state(Arc::new(ClaimInner {
                steps,
                bodies: bodies.clone(),
            }));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = addr_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = addr_tx.send(listener.local_addr().map_err(Into::into));
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        r = listener.accept() => match r {
                            Ok(x) => x,
                            Err(e) => { eprintln!("fake claim: accept: {e}"); return; }
                        },
                    };
                    let acceptor = acceptor.clone();
                    let router = router.clone();
                    tokio::spawn(async move {
                        let tls = match acceptor.accept(tcp).await {
                            Ok(t) => t,
                            Err(e) => {
                                eprintln!("fake claim: TLS: {e}");
                                return;
                            }
                        };
                        let svc = hyper_util::service::TowerToHyperService::new(router);
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await
                        {
                            eprintln!("fake claim: connection: {e}");
                        }
                    });
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("fake claim server did not start")??;
        Ok(FakeClaim {
            url: format!("https://{addr}"),
            ca_pem,
            bodies,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The JSON bodies of the claim requests so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Drop for FakeClaim {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("fake claim server thread panicked");
        }
    }
}
