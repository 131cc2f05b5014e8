//! The mTLS client for the platform's node_api.
//!
//! TLS 1.3 only; the server certificate must chain to the CA bundle that came with the identity
//! (no system roots, as upstream); the node's Ed25519 certificate is presented on every instance
//! call together with `Authorization: Bearer <instance JWT>`. Redirects are refused (a redirect to
//! another host would leak the JWT) and every reply body is size-capped while it streams in.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{decode, error_for_status};
use crate::config::PlatformConfig;
use crate::pki::Credentials;
use crate::retry::parse_retry_after;
use crate::{Error, Result};

/// The client certificate a request is made with, if any (enrollment has none).
#[derive(Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert_chain_pem: &'a str,
    pub key_pem: &'a str,
}

#[derive(Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    base: String,
    /// `https://host:port` of the platform (for absolute-path URLs it hands out).
    origin: String,
    token: Option<String>,
    max_body: u64,
}

impl std::fmt::Debug for PlatformClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Parse every certificate of a PEM bundle.
pub fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::malformed(what, e))?;
    if certs.is_empty() {
        return Err(Error::malformed(what, "no certificate in PEM"));
    }
    Ok(certs)
}

fn tls_config(
    ca_bundle_pem: &str,
    identity: Option<ClientIdentity<'_>>,
) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_certs(ca_bundle_pem, "CA bundle")? {
        roots.add(c).map_err(|e| Error::malformed("CA bundle", e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = parse_certs(id.cert_chain_pem, "node certificate")?;
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                .map_err(|e| Error::malformed("node key", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Crypto(format!("node certificate/key: {e}")))?
        }
    };
    Ok(config)
}

impl PlatformClient {
    /// A client for `platform_url` trusting only `ca_bundle_pem`.
    pub fn new(
        cfg: &PlatformConfig,
        platform_url: &str,
        ca_bundle_pem: &str,
        identity: Option<ClientIdentity<'_>>,
        token: Option<String>,
    ) -> Result<Self> {
        let url = cfg
            .url
            .as_deref()
            .unwrap_or(platform_url)
            .trim_end_matches('/');
        if !url.starts_with("https://") {
            return Err(Error::Config(format!(
                "platform URL must be https://, got {url:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(ca_bundle_pem, identity)?)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .user_agent(concat!("powernode-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(PlatformClient {
            http,
            base: format!("{url}{}", cfg.api_prefix),
            origin: origin_of(url),
            token,
            max_body: cfg.max_response_bytes,
        })
    }

    /// The instance client: mTLS with the enrolled certificate plus the JWT.
    pub fn from_credentials(cfg: &PlatformConfig, creds: &Credentials) -> Result<Self> {
        let url = cfg
            .url
            .as_deref()
            .or(creds.meta.platform_url.as_deref())
            .ok_or_else(|| {
                Error::Config("no platform URL: not in pki/meta.json nor platform.url".into())
            })?;
        let chain = format!("{}\n{}", creds.cert_pem.trim_end(), creds.ca_chain_pem);
        PlatformClient::new(
            cfg,
            url,
            &creds.ca_bundle_pem,
            Some(ClientIdentity {
                cert_chain_pem: &chain,
                key_pem: &creds.key_pem,
            }),
            creds.token.clone(),
        )
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// POST `body` as JSON to `path` (relative to the API prefix) and decode the envelope's data.
    pub async fn post<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp> {
        let url = format!("{}{}", self.base, path);
        let req = self
            .http
            .post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(body);
        let body = self.send(req, &url).await?;
        decode(body.0, &body.1).map_err(|e| with_retry_after(e, body.2))
    }

    /// GET `path` (relative to the API prefix) and decode the envelope's data.
    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp> {
        let url = format!("{}{}", self.base, path);
        let req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json");
        let body = self.send(req, &url).await?;
        decode(body.0, &body.1).map_err(|e| with_retry_after(e, body.2))
    }

    /// GET a URL the platform handed out (an absolute path on the platform, or a full URL on
    /// the same origin) and return the raw body. Other hosts are refused.
    pub async fn get_raw(&self, url: &str) -> Result<Vec<u8>> {
        let full = on_origin(&self.origin, url).ok_or_else(|| {
            Error::malformed(
                "platform URL",
                format!("{url:?} is not on the platform {}", self.origin),
            )
        })?;
        let req = self.http.get(&full);
        let (status, body, retry_after) = self.send(req, &full).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        // Error replies use the envelope.
        match decode::<serde_json::Value>(status, &body) {
            Err(e) => Err(with_retry_after(e, retry_after)),
            Ok(_) => Err(error_for_status(
                status,
                None,
                retry_after,
                "unexpected reply",
            )),
        }
    }

    async fn send(
        &self,
        mut req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<(u16, Vec<u8>, Option<Duration>)> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| send_error(url, e))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(Error::Refused {
                status: status.as_u16(),
                code: None,
                message: format!(
                    "redirect to {:?} refused",
                    resp.headers().get(reqwest::header::LOCATION)
                ),
            });
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = read_capped(resp, self.max_body).await?;
        Ok((status.as_u16(), body, retry_after))
    }
}

/// `url` as a full URL on `origin`: an absolute path (not `//host`), or a URL starting with
/// `origin/`. Anything else (another host, a scheme change, a relative path) is `None`.
fn on_origin(origin: &str, url: &str) -> Option<String> {
    if url.starts_with('/') && !url.starts_with("//") {
        return Some(format!("{origin}{url}"));
    }
    url.strip_prefix(origin)
        .filter(|rest| rest.starts_with('/'))
        .map(|_| url.to_string())
}

/// `https://host:port` of a URL without its path.
fn origin_of(url: &str) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => url[..after + i].to_string(),
        None => url.to_string(),
    }
}

/// Attach `Retry-After` to "not ready yet" errors; 5xx refusals become unavailability.
fn with_retry_after(e: Error, retry_after: Option<Duration>) -> Error {
    match e {
        Error::Unavailable {
            status, message, ..
        } => Error::Unavailable {
            status,
            retry_after,
            message,
        },
        Error::Refused {
            status,
            code,
            message,
        } if status >= 500 => error_for_status(status, code, retry_after, &message),
        other => other,
    }
}

/// The instance client every long-lived process uses: it follows credential rotation. Before
/// each request it reads the PKI store's generation (one readlink) and rebuilds its TLS client
/// when another process (certd) installed new credentials, so no process keeps presenting an
/// old certificate or JWT — polling the link cannot miss a change the way a lost inotify event
/// or D-Bus signal could.
#[derive(Debug)]
pub struct InstanceClient {
    cfg: PlatformConfig,
    store: crate::pki::PkiStore,
    generation: Option<String>,
    client: Option<PlatformClient>,
    meta: Option<crate::pki::Meta>,
}

impl InstanceClient {
    pub fn new(cfg: PlatformConfig, store: crate::pki::PkiStore) -> Self {
        InstanceClient {
            cfg,
            store,
            generation: None,
            client: None,
            meta: None,
        }
    }

    /// Reload if the credentials changed; error if the node is not enrolled.
    pub fn refresh(&mut self) -> Result<&PlatformClient> {
        let generation = self.store.generation()?;
        if self.client.is_none() || generation != self.generation || generation.is_none() {
            let creds = self.store.load()?.ok_or_else(|| {
                Error::NotFound("no credentials: the node is not enrolled".into())
            })?;
            let client = PlatformClient::from_credentials(&self.cfg, &creds)?;
            if self.generation.is_some() && generation != self.generation {
                tracing::info!(from = ?self.generation, to = ?generation, "credentials rotated; client reloaded");
            }
            self.client = Some(client);
            self.meta = Some(creds.meta);
            self.generation = generation;
        }
        self.client
            .as_ref()
            .ok_or_else(|| Error::NotFound("no client".into()))
    }

    /// The generation (certificate serial) the last request was made with.
    pub fn generation(&self) -> Option<&str> {
        self.generation.as_deref()
    }

    pub fn meta(&self) -> Option<&crate::pki::Meta> {
        self.meta.as_ref()
    }

    pub async fn post<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &Req,
    ) -> Result<Resp> {
        let client = self.refresh()?.clone();
        client.post(path, body).await
    }

    pub async fn get<Resp: DeserializeOwned>(&mut self, path: &str) -> Result<Resp> {
        let client = self.refresh()?.clone();
        client.get(path).await
    }

    pub async fn get_raw(&mut self, url: &str) -> Result<Vec<u8>> {
        let client = self.refresh()?.clone();
        client.get_raw(url).await
    }
}

fn send_error(url: &str, e: reqwest::Error) -> Error {
    // The deepest cause says *why* (certificate unknown, connection refused, …); reqwest's own
    // layers only repeat the URL.
    let mut cause = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    let msg = format!("{url}: {cause}");
    // A connect error (TCP or TLS handshake) means the request never left this node.
    if e.is_connect() {
        Error::NotConnected(msg)
    } else {
        Error::Unreachable(msg)
    }
}

async fn read_capped(resp: reqwest::Response, limit: u64) -> Result<Vec<u8>> {
    if let Some(len) = resp.content_length()
        && len > limit
    {
        return Err(Error::TooLarge {
            what: "platform reply",
            limit,
        });
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Unreachable(format!("reading reply: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(Error::TooLarge {
                what: "platform reply",
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_urls_stay_on_the_platform() {
        let o = origin_of("https://p.example:8443/base");
        assert_eq!(o, "https://p.example:8443");
        assert_eq!(origin_of("https://p.example"), "https://p.example");
        assert_eq!(
            on_origin(&o, "/api/v1/x").as_deref(),
            Some("https://p.example:8443/api/v1/x")
        );
        assert_eq!(
            on_origin(&o, "https://p.example:8443/f").as_deref(),
            Some("https://p.example:8443/f")
        );
        for bad in [
            "//evil.example/f",
            "https://evil.example/f",
            "https://p.example:8443.evil.example/f",
            "http://p.example:8443/f",
            "f",
            "",
        ] {
            assert_eq!(on_origin(&o, bad), None, "{bad}");
        }
    }

    #[test]
    fn refuses_plain_http_and_bad_bundles() {
        let cfg = PlatformConfig::default();
        let err = PlatformClient::new(&cfg, "http://x", "", None, None).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let err = PlatformClient::new(&cfg, "https://x", "not pem", None, None).unwrap_err();
        assert!(err.to_string().contains("CA bundle"), "{err}");
    }
}
