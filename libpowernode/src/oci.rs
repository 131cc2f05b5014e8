//! Pulling module artifacts from an OCI registry into the content-addressed store
//! `/persist/cache/modules/<sha256 hex>` (docs/ARCHITECTURE.md §3c, media types there).
//!
//! A blob is streamed to a temporary file in the store directory, its SHA-256 and size checked
//! against the descriptor, fsync'd, and only then renamed to its final name: a truncated or
//! tampered blob (oci-client has already written the bad bytes when it reports the digest
//! mismatch) never appears under a content address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::digest::SHA256;
use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Artifact type of a module manifest.
pub const MODULE_ARTIFACT_TYPE: &str = "application/vnd.powernode.module.v1";
/// Config blob: `{name, version, architecture}`.
pub const MODULE_CONFIG_MEDIA_TYPE: &str = "application/vnd.powernode.module.config.v1+json";
/// The module's `manifest.yaml`.
pub const MODULE_MANIFEST_MEDIA_TYPE: &str = "application/vnd.powernode.module.manifest.v1+yaml";
/// The EROFS filesystem image (one per architecture).
pub const MODULE_EROFS_MEDIA_TYPE: &str = "application/vnd.powernode.module.erofs.v1";
/// Layer annotation: the image's fs-verity digest, `sha256:<hex>`.
pub const ANNOTATION_FSVERITY: &str = "org.powernode.fsverity.digest";
/// Layer annotation: the architecture (`amd64`, `arm64`).
pub const ANNOTATION_ARCH: &str = "org.powernode.architecture";

/// Store location under the node root.
pub const STORE_DIR: &str = "/persist/cache/modules";
/// Beside the store: which images a full check bound to a kernel-enforced fs-verity digest
/// (`crate::modules::verity_binding`).
pub const VERITY_BINDINGS_DIR: &str = "/persist/cache/modules.verity";

/// Why a pull failed. `Integrity` means the bytes did not match what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("integrity: {0}")]
    Integrity(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("{0}")]
    Io(String),
}

/// Largest manifest or image index accepted. Real ones are a few KiB; the cap keeps a hostile
/// registry from running the puller (the initramfs: root, no memory limit) out of memory
/// before the digest check can refuse the bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// How long to wait for a TCP (and TLS) connection to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a registry may stay silent in the middle of a response (per read, not per
/// transfer: a large blob on a slow but steady link is fine; a stalled one is not).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Connect and read timeouts of a registry client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: CONNECT_TIMEOUT,
            read: READ_TIMEOUT,
        }
    }
}

/// A registry client: oci-client for authentication and blobs, and a plain HTTP client of the
/// same protocol and timeouts for manifests, which oci-client reads whole into memory.
#[derive(Clone)]
pub struct Registry {
    oci: Client,
    http: reqwest::Client,
    scheme: &'static str,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// Plain HTTP only for loopback registries (tests, a local mirror); HTTPS everywhere else.
/// Fails (instead of oci-client's `Client::new`, which falls back to a default client that
/// panics) when no TLS client can be built, e.g. on a node without any CA certificates.
pub fn client_for(registry: &str) -> Result<Registry, PullError> {
    client_with_timeouts(registry, Timeouts::default())
}

/// [`client_for`] with other timeouts.
pub fn client_with_timeouts(registry: &str, timeouts: Timeouts) -> Result<Registry, PullError> {
    let host = registry.rsplit_once(':').map_or(registry, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            registry
        }
    });
    let loopback = matches!(host, "127.0.0.1" | "localhost" | "[::1]");
    let (protocol, scheme) = if loopback {
        (
            ClientProtocol::HttpsExcept(vec![registry.to_string()]),
            "http",
        )
    } else {
        (ClientProtocol::Https, "https")
    };
    let cannot = |e: &dyn std::fmt::Display| {
        PullError::Registry(format!(
            "cannot build a registry client for {registry} (are CA certificates installed?): {e}"
        ))
    };
    let oci = Client::try_from(ClientConfig {
        protocol,
        connect_timeout: Some(timeouts.connect),
        read_timeout: Some(timeouts.read),
        ..ClientConfig::default()
    })
    .map_err(|e| cannot(&e))?;
    let http = reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .read_timeout(timeouts.read)
        .https_only(!loopback)
        .build()
        .map_err(|e| cannot(&e))?;
    Ok(Registry { oci, http, scheme })
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&SHA256, data).as_ref())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `sha256:<64 lowercase hex>` → the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, PullError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| {
            PullError::Integrity(format!("unsupported digest {digest:?} (want sha256:<hex>)"))
        })
}

/// `registry/repo[:tag]` plus a manifest digest → `registry/repo@digest`.
pub fn pinned_reference(reference: &str, digest: &str) -> Result<Reference, PullError> {
    digest_hex(digest)?;
    let r: Reference = reference
        .parse()
        .map_err(|e| PullError::Registry(format!("bad reference {reference:?}: {e}")))?;
    Ok(Reference::with_digest(
        r.registry().to_string(),
        r.repository().to_string(),
        digest.to_string(),
    ))
}

/// An error and its sources, `a: b: c` (reqwest's own message hides the cause, e.g. "connection
/// refused", in its source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The OCI image index media type (a multi-architecture list of manifests).
pub const OCI_IMAGE_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The parts of an OCI image index the agent reads (parsed here rather than with oci-client's
/// types so an unknown architecture name is data, not a parse error).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Index {
    #[serde(default, rename = "mediaType")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<IndexEntry>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct IndexEntry {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub platform: Option<IndexPlatform>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct IndexPlatform {
    pub architecture: String,
    pub os: String,
}

/// The manifest for `arch` (GOARCH words) on Linux; refused when the index has none (or, for
/// safety, more than one: which one would be signed is then ambiguous).
pub fn select_platform<'a>(index: &'a Index, arch: &str) -> Result<&'a IndexEntry, PullError> {
    let fits: Vec<&IndexEntry> = index
        .manifests
        .iter()
        .filter(|m| {
            m.media_type == OCI_IMAGE_MEDIA_TYPE
                && m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    match fits.as_slice() {
        [one] => Ok(one),
        [] => {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            Err(PullError::Integrity(format!(
                "the image index has no manifest for linux/{arch} (it has: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )))
        }
        _ => Err(PullError::Integrity(format!(
            "the image index lists {} manifests for linux/{arch}",
            fits.len()
        ))),
    }
}

/// GET a manifest or index by digest, reading at most [`MAX_MANIFEST_BYTES`] (an announced
/// larger body is refused before its first byte), and check the bytes hash to the digest.
async fn pull_verified_raw(
    client: &Registry,
    reference: &Reference,
    accept: &[&str],
) -> Result<Vec<u8>, PullError> {
    let want = reference
        .digest()
        .ok_or_else(|| PullError::Registry("reference is not pinned by digest".into()))?;
    let failed = |e: &dyn std::error::Error| {
        PullError::Registry(format!("pulling manifest {reference}: {}", chain(e)))
    };
    // Anonymous pull; a registry asking for a bearer token gets oci-client's (cached) one.
    let token = client
        .oci
        .auth(reference, &RegistryAuth::Anonymous, RegistryOperation::Pull)
        .await
        .map_err(|e| failed(&e))?;
    let url = format!(
        "{}://{}/v2/{}/manifests/{want}",
        client.scheme,
        reference.resolve_registry(),
        reference.repository()
    );
    let mut req = client
        .http
        .get(&url)
        .header(reqwest::header::ACCEPT, accept.join(", "));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut res = req.send().await.map_err(|e| failed(&e))?;
    if !res.status().is_success() {
        return Err(PullError::Registry(format!(
            "pulling manifest {reference}: {url} answered {}",
            res.status()
        )));
    }
    let too_big = || {
        PullError::Integrity(format!(
            "manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes"
        ))
    };
    if res
        .content_length()
        .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut raw = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| failed(&e))? {
        if raw.len() + chunk.len() > MAX_MANIFEST_BYTES {
            return Err(too_big());
        }
        raw.extend_from_slice(&chunk);
    }
    let got = format!("sha256:{}", sha256_hex(&raw));
    if got != want {
        return Err(PullError::Integrity(format!(
            "manifest digest is {got}, expected {want}"
        )));
    }
    Ok(raw)
}

/// Fetches the image manifest pinned by digest and checks the bytes hash to that digest. When
/// the digest names an image index, the manifest for this node's architecture
/// ([`crate::architecture`]) is chosen and fetched by its own digest, checked the same way.
/// Returns the manifest and the digest it was fetched by.
pub async fn pull_manifest(
    client: &Registry,
    reference: &Reference,
) -> Result<(OciImageManifest, String), PullError> {
    let raw = pull_verified_raw(
        client,
        reference,
        &[OCI_IMAGE_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE],
    )
    .await?;
    let media: Option<String> = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    let (raw, digest) = if media.as_deref() == Some(OCI_IMAGE_INDEX_MEDIA_TYPE) {
        let index: Index = serde_json::from_slice(&raw)
            .map_err(|e| PullError::Registry(format!("image index {reference}: {e}")))?;
        let entry = select_platform(&index, crate::architecture())?;
        let child = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            entry.digest.clone(),
        );
        (
            pull_verified_raw(client, &child, &[OCI_IMAGE_MEDIA_TYPE]).await?,
            entry.digest.clone(),
        )
    } else {
        (raw, reference.digest().unwrap_or_default().to_string())
    };
    let manifest = serde_json::from_slice(&raw).map_err(|e| {
        PullError::Registry(format!(
            "manifest {reference} is not an OCI image manifest: {e}"
        ))
    })?;
    Ok((manifest, digest))
}

/// How often one pull resumes an interrupted download before giving up (the partial file stays
/// for the next pull to resume).
const RESUME_ATTEMPTS: u32 = 8;

/// A blob in the store, checked.
#[derive(Debug, Clone)]
pub struct Stored {
    pub path: PathBuf,
    /// Its fs-verity digest (`sha256:<hex>`), computed in the same read as the SHA-256 check.
    pub fsverity: String,
}

/// Streams `layer` into `<store>/<sha256 hex>`: a partial file `.<hex>.partial` (locked, so one
/// puller per blob), resumed with an HTTP range request after an interrupted download — within
/// this pull, or by the next one after a crash — then size and digest checked over the whole
/// file, fsync, rename, fsync dir. Already present (and intact) → nothing is downloaded. A
/// digest mismatch removes the partial file, so a bad byte is never resumed from.
pub async fn pull_blob_to_store(
    client: &Registry,
    reference: &Reference,
    layer: &OciDescriptor,
    store: &Path,
) -> Result<Stored, PullError> {
    use futures_util::StreamExt as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};

    let want_hex = digest_hex(&layer.digest)?.to_string();
    let size = u64::try_from(layer.size)
        .map_err(|_| PullError::Integrity(format!("blob {} has a negative size", layer.digest)))?;
    let io = |what: &str, p: &Path, e: std::io::Error| {
        PullError::Io(format!("{what} {}: {e}", p.display()))
    };
    tokio::fs::create_dir_all(store)
        .await
        .map_err(|e| io("creating", store, e))?;
    let dest = store.join(&want_hex);
    if dest.is_file()
        && let Ok((sha, fsverity)) = file_digests(&dest).await
        && sha == want_hex
    {
        return Ok(Stored {
            path: dest,
            fsverity,
        });
    }
    let partial = store.join(format!(".{want_hex}.partial"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| io("opening", &partial, e))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |_| {
            PullError::Io(format!(
                "another pull of blob {} is in progress ({} is locked)",
                layer.digest,
                partial.display()
            ))
        },
    )?;
    let std_file = lock.try_clone().map_err(|e| io("opening", &partial, e))?;
    let mut out = tokio::fs::File::from_std(std_file);
    let mut have = out
        .metadata()
        .await
        .map_err(|e| io("reading", &partial, e))?
        .len();
    if have > size {
        out.set_len(0)
            .await
            .map_err(|e| io("truncating", &partial, e))?;
        have = 0;
    }
    if have > 0 {
        tracing::info!(blob = %layer.digest, have, size, "resuming an earlier partial download");
    }
    let mut failures = 0u32;
    while have < size {
        let stream = if have == 0 {
            client
                .oci
                .pull_blob_stream(reference, layer)
                .await
                .map(|s| (s, false))
        } else {
            client
                .oci
                .pull_blob_stream_partial(reference, layer, have, None)
                .await
                .map(|r| match r {
                    oci_client::client::BlobResponse::Partial(s) => (s, false),
                    // The registry ignored the range: start over.
                    oci_client::client::BlobResponse::Full(s) => (s, true),
                })
        };
        let outcome: Result<(), String> = match stream {
            Err(e) => Err(e.to_string()),
            Ok((s, restart)) => {
                if restart {
                    out.set_len(0)
                        .await
                        .map_err(|e| io("truncating", &partial, e))?;
                    have = 0;
                }
                out.seek(std::io::SeekFrom::Start(have))
                    .await
                    .map_err(|e| io("seeking", &partial, e))?;
                let mut stream = s.stream;
                let mut r = Ok(());
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => {
                            if have + c.len() as u64 > size {
                                return Err(PullError::Integrity(format!(
                                    "registry sent more than the {size} bytes of blob {}",
                                    layer.digest
                                )));
                            }
                            out.write_all(&c)
                                .await
                                .map_err(|e| io("writing", &partial, e))?;
                            have += c.len() as u64;
                        }
                        Err(e) => {
                            r = Err(e.to_string());
                            break;
                        }
                    }
                }
                if r.is_ok() && have < size {
                    r = Err(format!("stream ended at {have} of {size} bytes"));
                }
                r
            }
        };
        out.flush().await.map_err(|e| io("writing", &partial, e))?;
        if let Err(e) = outcome {
            failures += 1;
            if failures >= RESUME_ATTEMPTS {
                out.sync_all()
                    .await
                    .map_err(|e| io("syncing", &partial, e))?;
                return Err(PullError::Registry(format!(
                    "pulling blob {}: {e} ({have} of {size} bytes kept for the next pull)",
                    layer.digest
                )));
            }
            tracing::warn!(blob = %layer.digest, have, size, error = %e, "download interrupted; resuming");
            tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(failures))).await;
        }
    }
    out.sync_all()
        .await
        .map_err(|e| io("syncing", &partial, e))?;
    drop(out);
    let (got, fsverity) = file_digests(&partial)
        .await
        .map_err(|e| io("reading", &partial, e))?;
    if got != want_hex {
        // Never resume from bytes that do not hash right: the partial goes.
        if let Err(e) = std::fs::remove_file(&partial) {
            tracing::warn!(path = %partial.display(), error = %e, "cannot remove a bad partial download");
        }
        return Err(PullError::Integrity(format!(
            "blob digest is sha256:{got}, expected {}",
            layer.digest
        )));
    }
    tokio::fs::rename(&partial, &dest)
        .await
        .map_err(|e| io("renaming into", &dest, e))?;
    crate::fsutil::fsync_dir(store).map_err(|e| PullError::Io(e.to_string()))?;
    drop(lock);
    Ok(Stored {
        path: dest,
        fsverity,
    })
}

/// Pulls a small blob (the module's manifest.yaml) into memory, refusing one whose descriptor
/// announces more than `cap` bytes, and checks size and digest before returning a byte.
pub async fn pull_small_blob(
    client: &Registry,
    reference: &Reference,
    layer: &OciDescriptor,
    cap: usize,
) -> Result<Vec<u8>, PullError> {
    let want_hex = digest_hex(&layer.digest)?.to_string();
    let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
    if size > cap as u64 {
        return Err(PullError::Integrity(format!(
            "blob {} announces {} bytes, more than the {cap} allowed",
            layer.digest, layer.size
        )));
    }
    let mut w = Capped {
        inner: Vec::new(),
        left: size,
    };
    client
        .oci
        .pull_blob(reference, layer, &mut w)
        .await
        .map_err(|e| PullError::Registry(format!("pulling blob {}: {e}", layer.digest)))?;
    let bytes = w.inner;
    if bytes.len() as u64 != size || sha256_hex(&bytes) != want_hex {
        return Err(PullError::Integrity(format!(
            "blob {} does not match its descriptor ({} bytes received)",
            layer.digest,
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// A writer that refuses more than `left` bytes: a registry cannot fill the disk by streaming
/// more than the descriptor announced (the digest check would only fail at the end).
struct Capped<W> {
    inner: W,
    left: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Capped<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "blob is larger than its descriptor",
            )));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.left -= *n as u64;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// [`crate::fsverity::file_digests`] off the async runtime; the fs-verity digest formatted.
async fn file_digests(path: &Path) -> std::io::Result<(String, String)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::fsverity::file_digests(&path).map(|(sha, v)| (sha, crate::fsverity::format(&v)))
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {

    fn index(entries: &[(&str, &str)]) -> Index {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch))| {
                serde_json::json!({
                    "mediaType": OCI_IMAGE_MEDIA_TYPE,
                    "digest": format!("sha256:{i:064}"),
                    "size": 1,
                    "platform": {"os": os, "architecture": arch}
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": manifests
        }))
        .expect("index")
    }

    #[test]
    fn index_selects_the_node_architecture() {
        let i = index(&[("linux", "arm64"), ("linux", "amd64"), ("windows", "amd64")]);
        assert_eq!(
            select_platform(&i, "amd64").expect("amd64").digest,
            format!("sha256:{:064}", 1)
        );
        let e = select_platform(&i, "riscv64").expect_err("none");
        assert!(
            e.to_string().contains("no manifest for linux/riscv64")
                && e.to_string()
                    .contains("linux/arm64, linux/amd64, windows/amd64"),
            "{e}"
        );
        let twice = index(&[("linux", "amd64"), ("linux", "amd64")]);
        assert!(select_platform(&twice, "amd64").is_err());
        assert!(
            select_platform(&index(&[]), "amd64")
                .expect_err("empty")
                .to_string()
                .contains("none")
        );
    }

    use super::*;

    #[test]
    fn pinned() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r =
            pinned_reference("127.0.0.1:5000/powernode/modules/web:1.0-amd64", &d).expect("ref");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "powernode/modules/web");
        assert_eq!(r.digest(), Some(d.as_str()));
        assert!(pinned_reference("x/y:1", "md5:abc").is_err());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    /// A registry on loopback that answers `GET /v2/` (the auth probe) with 200 and every
    /// other request with `answer`; returns its address.
    async fn fake_registry<F, Fut>(answer: F) -> String
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut reader = tokio::io::BufReader::new(stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).await.is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header).await {
                        Ok(n) if n > 2 => continue,
                        _ => break,
                    }
                }
                let mut stream = reader.into_inner();
                if request_line.starts_with("GET /v2/ ") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    continue;
                }
                tokio::spawn(answer(stream));
            }
        });
        addr
    }

    fn pinned_at(addr: &str, digest: &str) -> Reference {
        pinned_reference(&format!("{addr}/powernode/modules/web:1.0"), digest).expect("ref")
    }

    fn quick() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_times_out() {
        // Accepts, reads the request, and then says nothing, holding the connection open.
        let addr = fake_registry(|stream| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        })
        .await;
        // ... including the auth probe: a stalled registry at any step.
        let stalled = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let a = listener.local_addr().expect("addr").to_string();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            });
            a
        };
        for addr in [addr, stalled] {
            let client = client_with_timeouts(&addr, quick()).expect("client");
            let reference = pinned_at(&addr, &format!("sha256:{}", "a".repeat(64)));
            let started = std::time::Instant::now();
            let r =
                tokio::time::timeout(Duration::from_secs(20), pull_manifest(&client, &reference))
                    .await
                    .expect("the pull must give up on its own, not hang");
            let e = r.expect_err("no manifest from a silent registry");
            assert!(matches!(e, PullError::Registry(_)), "{e}");
            assert!(e.to_string().contains("timed out"), "{e}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn a_huge_manifest_is_refused_at_the_cap_without_reading_it_all() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::AsyncWriteExt as _;
        const HOSTILE: u64 = 100 * 1024 * 1024;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        // No Content-Length: the body runs until the connection closes, so only a capped
        // reader stops it.
        let addr = fake_registry(move |mut stream| {
            let counter = Arc::clone(&counter);
            async move {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {OCI_IMAGE_MEDIA_TYPE}\r\nconnection: close\r\n\r\n"
                );
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                while counter.load(Ordering::Relaxed) < HOSTILE {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
        .await;
        let client = client_with_timeouts(&addr, quick()).expect("client");
        let reference = pinned_at(&addr, &format!("sha256:{}", "b".repeat(64)));
        let e = pull_manifest(&client, &reference)
            .await
            .expect_err("a 100 MiB manifest");
        assert!(matches!(e, PullError::Integrity(_)), "{e}");
        assert!(e.to_string().contains("larger than 4194304 bytes"), "{e}");
        // Give the server a moment to notice the closed connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(Ordering::Relaxed);
        assert!(
            n < HOSTILE / 4,
            "the client read {n} bytes of a manifest capped at {MAX_MANIFEST_BYTES}"
        );
    }

    #[tokio::test]
    async fn an_announced_oversize_manifest_is_refused_before_its_body() {
        use tokio::io::AsyncWriteExt as _;
        let addr = fake_registry(|mut stream| async move {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_MANIFEST_BYTES + 1
            );
            let _ = stream.write_all(head.as_bytes()).await;
            // Then nothing: a client waiting for the body would time out instead.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let client = client_with_timeouts(&addr, quick()).expect("client");
        let reference = pinned_at(&addr, &format!("sha256:{}", "c".repeat(64)));
        let e = pull_manifest(&client, &reference)
            .await
            .expect_err("oversize");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[tokio::test]
    async fn a_manifest_within_the_cap_is_digest_checked() {
        use tokio::io::AsyncWriteExt as _;
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {"mediaType": MODULE_CONFIG_MEDIA_TYPE, "digest": format!("sha256:{}", "d".repeat(64)), "size": 2},
            "layers": []
        })
        .to_string();
        let digest = format!("sha256:{}", sha256_hex(body.as_bytes()));
        let served = body.clone();
        let addr = fake_registry(move |mut stream| {
            let served = served.clone();
            async move {
                let msg = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {OCI_IMAGE_MEDIA_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{served}",
                    served.len()
                );
                let _ = stream.write_all(msg.as_bytes()).await;
            }
        })
        .await;
        let client = client_with_timeouts(&addr, quick()).expect("client");
        let (m, d) = pull_manifest(&client, &pinned_at(&addr, &digest))
            .await
            .expect("a well-formed manifest");
        assert_eq!(d, digest);
        assert!(m.layers.is_empty());
        let wrong = format!("sha256:{}", "e".repeat(64));
        let e = pull_manifest(&client, &pinned_at(&addr, &wrong))
            .await
            .expect_err("digest mismatch");
        assert!(matches!(e, PullError::Integrity(_)), "{e}");
    }
}
