//! Module assignments from the platform (node-api.md Part A §6–7, Part B §10) and the
//! fetch + verify step: the Sigstore bundle is checked against the module's trust policy and the
//! pinned trusted root **before** anything is downloaded, then the EROFS image is pulled into the
//! content-addressed store and its SHA-256 and fs-verity digests are checked. No policy, no
//! trusted root, no bundle → refused (fail closed).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::oci::{self, PullError};
use crate::paths::Paths;
use crate::transport::InstanceClient;
use crate::verify::{self, Artifact, Matcher, Policy, PublicKey, TrustedRoot};

/// `GET modules` entry (fields the agent reads; the rest is ignored).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModuleSummary {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub current_version: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ModuleList {
    #[serde(default)]
    modules: Vec<ModuleSummary>,
}

/// `data.module.trust_policy`: a PEM public key, or keyless identity + issuer regexps.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct TrustPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosign_identity_regexp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosign_issuer_regexp: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ModuleDetail {
    #[serde(default)]
    trust_policy: Option<TrustPolicy>,
}

#[derive(Debug, Deserialize)]
struct ModuleEnvelope {
    module: ModuleDetail,
}

/// `data.oci` of `GET modules/:id/download`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OciArtifact {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub fsverity_root_hash: Option<String>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub cosign_bundle_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Download {
    #[serde(default)]
    oci: Option<OciArtifact>,
}

/// A module image that passed every check and sits in the store.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub id: String,
    pub name: String,
    /// `sha256:<hex>` of the EROFS image (what the bundle signs).
    pub image_digest: String,
    pub manifest_digest: String,
    pub fsverity_digest: String,
    pub size_bytes: u64,
    pub path: PathBuf,
    pub signer: String,
    /// `enforced` (the kernel verifies every read) or `unsupported (<why>)`.
    pub kernel_verity: String,
    /// The module's validated manifest.yaml.
    #[serde(skip)]
    pub manifest: crate::manifest::Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// Signature, policy, digest or fs-verity check failed, or no policy: refused.
    #[error("verification failed for module {module}: {reason}")]
    Verification { module: String, reason: String },
    #[error(transparent)]
    Platform(#[from] crate::Error),
    #[error("module {module}: {reason}")]
    Other { module: String, reason: String },
}

impl ModuleError {
    pub fn is_verification(&self) -> bool {
        matches!(self, ModuleError::Verification { .. })
    }
}

/// `GET modules`.
pub async fn assigned(client: &mut InstanceClient) -> crate::Result<Vec<ModuleSummary>> {
    let list: ModuleList = client.get("/modules").await?;
    Ok(list.modules)
}

/// Where the images live under the node root.
pub fn store_dir(paths: &Paths) -> PathBuf {
    paths.under(oci::STORE_DIR)
}

/// Beside the store: per image (by SHA-256 hex), the fs-verity digest a full check bound it
/// to, written only once the kernel enforces that digest on the stored file
/// ([`crate::fsverity::kernel_verified`]).
pub fn verity_binding(paths: &Paths, hex: &str) -> PathBuf {
    paths.under(oci::VERITY_BINDINGS_DIR).join(hex)
}

/// What [`prune_store`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// `sha256:<hex>` of each removed image.
    pub images: Vec<String>,
    pub bytes: u64,
}

/// Removes the stored images (files named by their SHA-256 hex) whose digest is not in `keep`
/// (`sha256:<hex>` each), with their fs-verity bindings, so a node that runs for months does
/// not keep every image it ever had. Partial downloads and any other name are left alone. An
/// image still mounted stays usable: its loop device holds the file open. A file that cannot
/// be removed is logged and skipped; only an unreadable store is an error.
pub fn prune_store(
    paths: &Paths,
    keep: &std::collections::BTreeSet<String>,
) -> crate::Result<Pruned> {
    let store = store_dir(paths);
    let entries = match std::fs::read_dir(&store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pruned::default()),
        Err(e) => return Err(crate::Error::io("read", store, e)),
    };
    let mut out = Pruned::default();
    for entry in entries {
        let entry = entry.map_err(|e| crate::Error::io("read", &store, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_image = name.len() == 64
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let digest = format!("sha256:{name}");
        if !is_image || keep.contains(&digest) {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                remove_binding(&verity_binding(paths, &name));
                out.images.push(digest);
                out.bytes += size;
            }
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot prune an unused image");
            }
        }
    }
    if !out.images.is_empty() {
        crate::fsutil::fsync_dir(&store)?;
    }
    out.images.sort();
    Ok(out)
}

fn remove_binding(binding: &Path) {
    match std::fs::remove_file(binding) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %binding.display(), error = %e, "cannot remove a stale fs-verity binding")
        }
    }
}

fn local_policy(paths: &Paths, name: &str) -> Option<TrustPolicy> {
    let p = paths
        .trust_dir()
        .join("modules")
        .join(format!("{name}.pub"));
    let pem = std::fs::read_to_string(p).ok()?;
    Some(TrustPolicy {
        public_key: Some(pem),
        ..TrustPolicy::default()
    })
}

/// The verification policy from a trust policy; incomplete or empty → `None`.
pub fn policy_from(tp: &TrustPolicy) -> Result<Option<Policy>, String> {
    if let Some(pem) = tp.public_key.as_deref().filter(|s| !s.trim().is_empty()) {
        return PublicKey::from_pem(pem)
            .map(|k| Some(Policy::Key(k)))
            .map_err(|e| format!("trust policy public key: {e}"));
    }
    match (&tp.cosign_identity_regexp, &tp.cosign_issuer_regexp) {
        (Some(id), Some(iss)) if !id.is_empty() && !iss.is_empty() => Ok(Some(Policy::Identity {
            identity: Matcher::regex(id).map_err(|e| e.to_string())?,
            issuer: Matcher::regex(iss).map_err(|e| e.to_string())?,
        })),
        _ => Ok(None),
    }
}

/// Downloads the bundle, verifies it, pulls the image and checks its digests. Fails closed.
pub async fn fetch_and_verify(
    client: &mut InstanceClient,
    paths: &Paths,
    module: &ModuleSummary,
) -> Result<Fetched, ModuleError> {
    let refuse = |reason: String| ModuleError::Verification {
        module: module.name.clone(),
        reason,
    };
    let other = |reason: String| ModuleError::Other {
        module: module.name.clone(),
        reason,
    };
    let detail: ModuleEnvelope = client.get(&format!("/modules/{}", module.id)).await?;
    let tp = detail
        .module
        .trust_policy
        .filter(|t| *t != TrustPolicy::default())
        .or_else(|| local_policy(paths, &module.name));
    let policy = match tp
        .as_ref()
        .map(policy_from)
        .transpose()
        .map_err(&refuse)?
        .flatten()
    {
        Some(p) => p,
        None => {
            return Err(refuse(
                "no trust policy (neither from the platform nor under /etc/powernode/trust/modules): refusing".into(),
            ));
        }
    };
    let root_path = paths.trust_dir().join("trusted_root.json");
    let root_json = std::fs::read(&root_path)
        .map_err(|e| refuse(format!("trusted root {}: {e}", root_path.display())))?;
    let root = TrustedRoot::from_json(&root_json).map_err(|e| refuse(e.to_string()))?;

    let dl: Download = client
        .get(&format!("/modules/{}/download", module.id))
        .await?;
    let art = dl
        .oci
        .ok_or_else(|| other("the platform has no OCI artifact for this module".into()))?;
    let bundle_url = art
        .cosign_bundle_url
        .as_deref()
        .ok_or_else(|| refuse("no signature bundle (cosign_bundle_url) offered".into()))?;
    let bundle_json = client.get_raw(bundle_url).await?;
    let bundle = verify::Bundle::from_json(&bundle_json).map_err(|e| refuse(e.to_string()))?;

    let reference = oci::pinned_reference(&art.reference, &art.digest)
        .map_err(|e| pull_err(e, &refuse, &other))?;
    let registry = reference.registry().to_string();
    let oc = oci::client_for(&registry).map_err(|e| pull_err(e, &refuse, &other))?;
    // An index resolves to this node's architecture; either way the manifest is digest-checked.
    let (manifest, manifest_digest) = oci::pull_manifest(&oc, &reference)
        .await
        .map_err(|e| pull_err(e, &refuse, &other))?;
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == oci::MODULE_EROFS_MEDIA_TYPE)
        .ok_or_else(|| {
            other(format!(
                "artifact has no {} layer",
                oci::MODULE_EROFS_MEDIA_TYPE
            ))
        })?
        .clone();
    // The manifest.yaml layer is covered by the digest-pinned OCI manifest; it must parse and
    // validate before anything of the module is downloaded or mounted.
    let manifest_layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == oci::MODULE_MANIFEST_MEDIA_TYPE)
        .ok_or_else(|| {
            refuse(format!(
                "artifact has no {} layer",
                oci::MODULE_MANIFEST_MEDIA_TYPE
            ))
        })?;
    let manifest_yaml = oci::pull_small_blob(
        &oc,
        &reference,
        manifest_layer,
        crate::manifest::MAX_MANIFEST_BYTES,
    )
    .await
    .map_err(|e| pull_err(e, &refuse, &other))?;
    let module_manifest =
        crate::manifest::parse(&manifest_yaml).map_err(|e| refuse(e.to_string()))?;
    let want_fsverity = layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(oci::ANNOTATION_FSVERITY))
        .cloned()
        .ok_or_else(|| refuse("image layer carries no fs-verity digest annotation".into()))?;
    if let Some(platform) = &art.fsverity_root_hash
        && *platform != want_fsverity
    {
        return Err(refuse(format!(
            "fs-verity digest differs between platform ({platform}) and artifact ({want_fsverity})"
        )));
    }
    if let Some(size) = art.size_bytes
        && i64::try_from(size).ok() != Some(layer.size)
    {
        return Err(refuse(format!(
            "image size differs between platform ({size}) and artifact ({})",
            layer.size
        )));
    }
    let artifact = Artifact::parse_digest(&layer.digest)
        .ok_or_else(|| refuse(format!("unsupported layer digest {}", layer.digest)))?;
    let verified = verify::verify(&root, &bundle, &artifact, &policy)
        .map_err(|e| refuse(format!("signature bundle: {e}")))?;

    let store = store_dir(paths);
    let hex = oci::digest_hex(&layer.digest)
        .map_err(|e| pull_err(e, &refuse, &other))?
        .to_string();
    let binding = verity_binding(paths, &hex);
    let cached = {
        let (p, b, want) = (store.join(&hex), binding.clone(), want_fsverity.clone());
        tokio::task::spawn_blocking(move || crate::fsverity::kernel_verified(&p, &b, &want))
            .await
            .map_err(|e| other(e.to_string()))?
    };
    let (path, kernel_verity) = if cached {
        tracing::info!(module = %module.name, "cached image: the kernel enforces its fs-verity digest; not read again");
        (
            store.join(&hex),
            "enforced (cached image, not read again)".to_string(),
        )
    } else {
        // A full check follows: an old binding must not outlive a refusal.
        remove_binding(&binding);
        let oci::Stored {
            path,
            fsverity: fsv,
        } = oci::pull_blob_to_store(&oc, &reference, &layer, &store)
            .await
            .map_err(|e| pull_err(e, &refuse, &other))?;
        if fsv != want_fsverity {
            // The bytes hash right but the annotation lies: do not keep it under its address.
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a refused image");
            }
            return Err(refuse(format!(
                "fs-verity digest of the image is {fsv}, the artifact says {want_fsverity}"
            )));
        }
        // Where the filesystem can, hand the check to the kernel: from here on every read of
        // the image is verified against the digest we just checked.
        let p = path.clone();
        let want = want_fsverity.clone();
        let kernel =
            tokio::task::spawn_blocking(move || crate::fsverity::enable_and_measure(&p, &want))
                .await
                .map_err(|e| other(e.to_string()))?;
        let kernel_verity = match kernel {
            Ok(crate::fsverity::KernelVerity::Enforced) => {
                tracing::info!(module = %module.name, "fs-verity enabled; the kernel measurement matches");
                // What the next fetch of this image may rely on instead of reading it again.
                if let Some(dir) = binding.parent()
                    && let Err(e) = crate::fsutil::ensure_dir(dir, 0o755)
                        .and_then(|()| crate::fsutil::atomic_write(&binding, fsv.as_bytes(), 0o644))
                {
                    tracing::warn!(error = %e, "fs-verity binding not recorded; the next fetch reads the image again");
                }
                "enforced".to_string()
            }
            Ok(crate::fsverity::KernelVerity::Unsupported(why)) => {
                tracing::debug!(module = %module.name, why, "filesystem without fs-verity");
                format!("unsupported ({why})")
            }
            Err(e) => {
                if let Err(rm) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %rm, "cannot remove a refused image");
                }
                return Err(refuse(format!("kernel fs-verity: {e}")));
            }
        };
        (path, kernel_verity)
    };
    Ok(Fetched {
        kernel_verity,
        id: module.id.clone(),
        name: module.name.clone(),
        image_digest: layer.digest.clone(),
        manifest_digest,
        // Either the kernel's measurement or the full read matched it.
        fsverity_digest: want_fsverity,
        size_bytes: u64::try_from(layer.size).unwrap_or(0),
        path,
        signer: verified.identity,
        manifest: module_manifest,
    })
}

fn pull_err(
    e: PullError,
    refuse: &impl Fn(String) -> ModuleError,
    other: &impl Fn(String) -> ModuleError,
) -> ModuleError {
    match e {
        PullError::Integrity(m) => refuse(m),
        PullError::Registry(m) | PullError::Io(m) => other(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_what_is_wanted_and_what_is_not_an_image() {
        let d = tempfile::tempdir().expect("tmp");
        let paths = Paths::new(d.path());
        let store = store_dir(&paths);
        std::fs::create_dir_all(&store).expect("store");
        let hex = |c: char| c.to_string().repeat(64);
        for c in ['a', 'b', 'c'] {
            std::fs::write(store.join(hex(c)), vec![0u8; 10]).expect("image");
            let b = verity_binding(&paths, &hex(c));
            std::fs::create_dir_all(b.parent().expect("parent")).expect("bindings");
            std::fs::write(&b, "sha256:x").expect("binding");
        }
        std::fs::write(store.join(format!(".{}.partial", hex('d'))), b"part").expect("partial");
        std::fs::write(store.join("README"), b"not an image").expect("other");
        std::fs::write(store.join("A".repeat(64)), b"upper case").expect("other");
        let keep = [format!("sha256:{}", hex('b'))].into_iter().collect();
        let p = prune_store(&paths, &keep).expect("prune");
        assert_eq!(
            p.images,
            vec![
                format!("sha256:{}", hex('a')),
                format!("sha256:{}", hex('c'))
            ]
        );
        assert_eq!(p.bytes, 20);
        let mut left: Vec<String> = std::fs::read_dir(&store)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            hex('b'),
            format!(".{}.partial", hex('d')),
            "README".to_string(),
            "A".repeat(64),
        ];
        want.sort();
        assert_eq!(left, want);
        assert!(verity_binding(&paths, &hex('b')).exists());
        assert!(!verity_binding(&paths, &hex('a')).exists());
        // Nothing to do the second time; a missing store is not an error.
        assert_eq!(
            prune_store(&paths, &keep).expect("again"),
            Pruned::default()
        );
        std::fs::remove_dir_all(&store).expect("rm");
        assert_eq!(prune_store(&paths, &keep).expect("none"), Pruned::default());
    }

    #[test]
    fn policies() {
        assert!(policy_from(&TrustPolicy::default()).expect("ok").is_none());
        let only_identity = TrustPolicy {
            cosign_identity_regexp: Some("^https://ci/".into()),
            ..TrustPolicy::default()
        };
        assert!(
            policy_from(&only_identity).expect("ok").is_none(),
            "incomplete = none"
        );
        let keyless = TrustPolicy {
            cosign_identity_regexp: Some("^https://ci/".into()),
            cosign_issuer_regexp: Some("^https://issuer$".into()),
            ..TrustPolicy::default()
        };
        assert!(matches!(
            policy_from(&keyless).expect("ok"),
            Some(Policy::Identity { .. })
        ));
        let bad_key = TrustPolicy {
            public_key: Some("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into()),
            ..TrustPolicy::default()
        };
        assert!(policy_from(&bad_key).is_err());
        let bad_regex = TrustPolicy {
            cosign_identity_regexp: Some("(".into()),
            cosign_issuer_regexp: Some("x".into()),
            ..TrustPolicy::default()
        };
        assert!(policy_from(&bad_regex).is_err());
    }

    #[test]
    fn download_reply_parses_with_unknown_fields() {
        let d: Download = serde_json::from_str(
            r#"{"file":{"name":"x"},"oci":{"ref":"r/x:1","digest":"sha256:00","size_bytes":5,"extra":1}}"#,
        )
        .expect("parse");
        let oci = d.oci.expect("oci");
        assert_eq!(oci.reference, "r/x:1");
        assert_eq!(oci.size_bytes, Some(5));
        assert!(oci.cosign_bundle_url.is_none());
        let none: Download = serde_json::from_str("{}").expect("parse");
        assert!(none.oci.is_none());
    }
}
