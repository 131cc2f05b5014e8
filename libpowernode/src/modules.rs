//! Module assignments from the platform (node-api.md Part A §6–7, Part B §10), the node's own
//! signer policy ([`LocalPolicy`]: who may sign which module; the platform's `trust_policy`
//! can only narrow it) and the fetch + verify step: the Sigstore bundle is checked against
//! that policy and the pinned trusted root **before** anything is downloaded, then the EROFS
//! image is pulled into the content-addressed store. [`verify_stored`] is the one check every
//! image passes before any mount of it (boot path and mountd): from the store alone, the kept
//! bundle, the SHA-256 and the fs-verity digest of one read, the kernel's measurement. No
//! local signer, no trusted root, no bundle → refused (fail closed).

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
    /// `enforced` (the kernel measures the file as its fs-verity digest and checks every read)
    /// or `not enabled`; ` (stored image, verified again)` when the store's copy was used.
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

/// Beside the store: where earlier versions recorded, per image, an fs-verity digest they
/// then trusted without reading the image. Nothing trusts these files any more; they are only
/// removed with their image.
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
/// (`sha256:<hex>` each), with their signature bundles and old fs-verity bindings, so a node that runs for months does
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
    let entries: Vec<std::fs::DirEntry> = entries
        .collect::<Result<_, _>>()
        .map_err(|e| crate::Error::io("read", &store, e))?;
    for entry in &entries {
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
                remove_stale(&verity_binding(paths, &name));
                let sidecar = format!("{name}.");
                for side in entries.iter().filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with(&sidecar) && n.ends_with(BUNDLE_SUFFIX)
                }) {
                    remove_stale(&side.path());
                }
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

/// Removes a file that belongs to a removed image; one left behind is logged, not fatal.
fn remove_stale(file: &Path) {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %file.display(), error = %e, "cannot remove a file of a removed image")
        }
    }
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

/// Longest module name accepted (names become file names in the trust dir and the store).
pub const MAX_MODULE_NAME: usize = 64;

/// The node's own signer policy: who may sign which module (see [`LocalPolicy`]).
pub const LOCAL_POLICY_FILE: &str = "modules.toml";
/// Where an image default of the signer policy is shipped; the admin's copy in the trust dir
/// replaces it as a whole.
pub const VENDOR_TRUST_DIR: &str = "/usr/lib/powernode/trust";
/// `<store>/<sha256 hex>.<module>.sigstore.json`: the bundle that signed a stored image.
const BUNDLE_SUFFIX: &str = "sigstore.json";
/// A stored bundle larger than this is not one we wrote.
const MAX_STORED_BUNDLE: u64 = 1 << 20;
/// The signer policy file is small; anything bigger is refused.
const MAX_POLICY_FILE: u64 = 256 * 1024;

/// Checks a module name before it touches a path: 1 to [`MAX_MODULE_NAME`] bytes of
/// `[A-Za-z0-9._-]`, starting with a letter or digit (so never `.`, `..` or a hidden name),
/// without `..` anywhere.
pub fn check_module_name(name: &str) -> Result<(), ModuleError> {
    let refuse = |why: &str| ModuleError::Verification {
        module: name.escape_debug().to_string(),
        reason: format!("invalid module name: {why}"),
    };
    if name.is_empty() || name.len() > MAX_MODULE_NAME {
        return Err(refuse("must be 1 to 64 bytes"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(refuse("must start with a letter or digit"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(refuse("only A-Z a-z 0-9 . _ - are allowed"));
    }
    if name.contains("..") {
        return Err(refuse("must not contain `..`"));
    }
    Ok(())
}

/// The module name checked (it goes into a path) and the store's hex name of `digest`.
fn checked_store_hex<'a>(module: &str, digest: &'a str) -> Result<&'a str, ModuleError> {
    check_module_name(module)?;
    store_hex(digest).ok_or_else(|| ModuleError::Verification {
        module: module.to_string(),
        reason: format!("malformed digest {digest:?}"),
    })
}

/// `sha256:<64 lowercase hex>` → the hex, else `None` (a digest names a file in the store).
fn store_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// One `[[signer]]` of the local policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignerEntry {
    /// Module names this signer may sign; `"*"` = every module.
    modules: Vec<String>,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    signer: Vec<SignerEntry>,
}

/// A signer the node accepts for a module.
#[derive(Debug, Clone)]
pub struct Signer {
    policy: Policy,
    /// The platform's narrowing of a keyless signer: the bundle must satisfy both.
    also: Option<Policy>,
    /// For errors and logs: the key's origin or the identity/issuer patterns.
    label: String,
}

impl Signer {
    fn from_entry(e: &SignerEntry, origin: &str) -> Result<Signer, String> {
        match (&e.public_key, &e.identity, &e.issuer) {
            (Some(pem), None, None) => Ok(Signer {
                policy: Policy::Key(
                    PublicKey::from_pem(pem)
                        .map_err(|err| format!("{origin}: public_key: {err}"))?,
                ),
                also: None,
                label: format!("public key from {origin}"),
            }),
            (None, Some(id), Some(iss)) if !id.is_empty() && !iss.is_empty() => Ok(Signer {
                policy: Policy::Identity {
                    identity: Matcher::regex(id).map_err(|err| format!("{origin}: {err}"))?,
                    issuer: Matcher::regex(iss).map_err(|err| format!("{origin}: {err}"))?,
                },
                also: None,
                label: format!("identity /{id}/ issued by /{iss}/"),
            }),
            _ => Err(format!(
                "{origin}: a signer is either `public_key` or both `identity` and `issuer`"
            )),
        }
    }
}

/// The node's own signer policy for one module, read from the trust dir: `modules.toml`
/// (`/etc/powernode/trust/`, else the image's `/usr/lib/powernode/trust/`) and the older
/// per-module key file `/etc/powernode/trust/modules/<name>.pub`. It is authoritative: the
/// platform's `trust_policy` can only narrow it ([`LocalPolicy::narrow`]).
#[derive(Debug, Clone)]
pub struct LocalPolicy {
    module: String,
    signers: Vec<Signer>,
}

impl LocalPolicy {
    /// The signers allowed for `module`. No file, or no signer naming the module → refused:
    /// a node without trust of its own does not take the platform's word for it.
    pub fn load(paths: &Paths, module: &str) -> Result<LocalPolicy, ModuleError> {
        check_module_name(module)?;
        let refuse = |reason: String| ModuleError::Verification {
            module: module.to_string(),
            reason,
        };
        let mut signers = Vec::new();
        let admin = paths.trust_dir().join(LOCAL_POLICY_FILE);
        let vendor = paths.under(VENDOR_TRUST_DIR).join(LOCAL_POLICY_FILE);
        for file in [admin, vendor] {
            let Some(bytes) = crate::fsutil::read_optional(&file, MAX_POLICY_FILE)
                .map_err(|e| refuse(format!("signer policy: {e}")))?
            else {
                continue;
            };
            let origin = file.display().to_string();
            let text = String::from_utf8(bytes)
                .map_err(|_| refuse(format!("signer policy {origin}: not UTF-8")))?;
            let parsed: PolicyFile = toml::from_str(&text)
                .map_err(|e| refuse(format!("signer policy {origin}: {e}")))?;
            for e in parsed
                .signer
                .iter()
                .filter(|e| e.modules.iter().any(|m| m == "*" || m == module))
            {
                signers.push(Signer::from_entry(e, &origin).map_err(&refuse)?);
            }
            // The admin's file replaces the image's default as a whole.
            break;
        }
        let legacy = paths
            .trust_dir()
            .join("modules")
            .join(format!("{module}.pub"));
        if let Some(pem) = crate::fsutil::read_optional(&legacy, MAX_POLICY_FILE)
            .map_err(|e| refuse(format!("signer key: {e}")))?
        {
            let origin = legacy.display().to_string();
            let entry = SignerEntry {
                modules: vec![module.to_string()],
                public_key: Some(String::from_utf8_lossy(&pem).into_owned()),
                identity: None,
                issuer: None,
            };
            signers.push(Signer::from_entry(&entry, &origin).map_err(&refuse)?);
        }
        if signers.is_empty() {
            return Err(refuse(format!(
                "the node's signer policy allows nobody to sign this module (no [[signer]] for it in {}/{LOCAL_POLICY_FILE} or {VENDOR_TRUST_DIR}/{LOCAL_POLICY_FILE}, no modules/{module}.pub): refusing",
                paths.trust_dir().display()
            )));
        }
        Ok(LocalPolicy {
            module: module.to_string(),
            signers,
        })
    }

    /// The platform's `trust_policy` applied as a narrowing: a key must be one the local
    /// policy lists (then only that key is accepted); an identity policy needs a local
    /// identity signer and is checked on top of it (a bundle must satisfy both). A platform
    /// signer the local policy does not allow is refused here, before anything is fetched.
    pub fn narrow(mut self, platform: Option<&TrustPolicy>) -> Result<LocalPolicy, ModuleError> {
        let refuse = |reason: String| ModuleError::Verification {
            module: self.module.clone(),
            reason,
        };
        let narrowing = match platform {
            None => None,
            Some(tp) => policy_from(tp).map_err(&refuse)?,
        };
        match narrowing {
            None => {}
            Some(Policy::Key(k)) => {
                self.signers
                    .retain(|s| matches!(&s.policy, Policy::Key(l) if l.spki == k.spki));
                if self.signers.is_empty() {
                    return Err(refuse(
                        "the platform's trust policy names a public key the node's signer policy does not allow for this module: refusing".into(),
                    ));
                }
            }
            Some(p @ Policy::Identity { .. }) => {
                self.signers
                    .retain(|s| matches!(s.policy, Policy::Identity { .. }));
                if self.signers.is_empty() {
                    return Err(refuse(
                        "the platform's trust policy names a keyless identity, but the node's signer policy allows no keyless signer for this module: refusing".into(),
                    ));
                }
                for s in &mut self.signers {
                    s.also = Some(p.clone());
                }
            }
        }
        Ok(self)
    }

    /// The bundle verified for `artifact` by one of the allowed signers (and the platform's
    /// narrowing, if any); otherwise every signer's reason.
    pub fn verify(
        &self,
        root: &TrustedRoot,
        bundle: &verify::Bundle,
        artifact: &Artifact,
    ) -> Result<verify::Verified, String> {
        let mut reasons = Vec::new();
        for s in &self.signers {
            let r = verify::verify(root, bundle, artifact, &s.policy).and_then(|v| match &s.also {
                Some(also) => verify::verify(root, bundle, artifact, also).map(|_| v),
                None => Ok(v),
            });
            match r {
                Ok(v) => return Ok(v),
                Err(e) => reasons.push(format!("{}: {e}", s.label)),
            }
        }
        Err(format!(
            "no signer the node's policy allows verified the bundle ({})",
            reasons.join("; ")
        ))
    }
}

/// What verifying a module's image needs, all from the node: its signer policy for the
/// module and the pinned Sigstore trusted root.
#[derive(Debug, Clone)]
pub struct NodeTrust {
    pub policy: LocalPolicy,
    pub root: TrustedRoot,
}

impl NodeTrust {
    /// The local policy for `module` (narrowed by the platform's `trust_policy`, if given)
    /// and `/etc/powernode/trust/trusted_root.json`.
    pub fn load(
        paths: &Paths,
        module: &str,
        platform: Option<&TrustPolicy>,
    ) -> Result<NodeTrust, ModuleError> {
        let policy = LocalPolicy::load(paths, module)?.narrow(platform)?;
        let refuse = |reason: String| ModuleError::Verification {
            module: module.to_string(),
            reason,
        };
        let root_path = paths.trust_dir().join("trusted_root.json");
        let root_json = std::fs::read(&root_path)
            .map_err(|e| refuse(format!("trusted root {}: {e}", root_path.display())))?;
        let root = TrustedRoot::from_json(&root_json).map_err(|e| refuse(e.to_string()))?;
        Ok(NodeTrust { policy, root })
    }
}

/// An image in the store that passed [`verify_stored`] just now.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    pub path: PathBuf,
    /// `sha256:<hex>`, what the bundle signs and the file hashes to.
    pub digest: String,
    /// Computed from the same read as the SHA-256, so bound to the signature through it.
    pub fsverity: String,
    pub signer: String,
    /// `enforced` (the kernel measures the file as `fsverity`) or `not enabled`.
    pub kernel_verity: String,
}

/// Where the bundle that signed `digest` for `module` is kept, beside the image.
pub fn stored_bundle_path(paths: &Paths, hex: &str, module: &str) -> PathBuf {
    store_dir(paths).join(format!("{hex}.{module}.{BUNDLE_SUFFIX}"))
}

/// Keeps the bundle in the store (atomic write), so the image can be verified again
/// without the network before every mount.
pub fn save_bundle(
    paths: &Paths,
    digest: &str,
    module: &str,
    bundle_json: &[u8],
) -> Result<(), ModuleError> {
    let hex = checked_store_hex(module, digest)?;
    let path = stored_bundle_path(paths, hex, module);
    crate::fsutil::ensure_dir(&store_dir(paths), 0o755)
        .and_then(|()| crate::fsutil::atomic_write(&path, bundle_json, 0o644))
        .map_err(|e| ModuleError::Other {
            module: module.to_string(),
            reason: format!("keeping the signature bundle: {e}"),
        })
}

/// Checks a stored image before any mount of it, from the store and the node's trust alone
/// (no network): `digest` is well formed, the bundle kept beside the image verifies for
/// `digest` under the node's signer policy for `module`, one read of the file gives that
/// SHA-256 and the fs-verity digest `fsverity` (so the fs-verity digest is the signed bytes'
/// own), and where the kernel has fs-verity on the file its measurement is that digest too.
/// A rewritten image, a rewritten state.json (another digest or fs-verity value), a missing
/// or foreign bundle: refused.
pub fn verify_stored(
    paths: &Paths,
    module: &str,
    digest: &str,
    fsverity: &str,
    trust: &NodeTrust,
) -> Result<VerifiedImage, ModuleError> {
    let hex = checked_store_hex(module, digest)?;
    let refuse = |reason: String| ModuleError::Verification {
        module: module.to_string(),
        reason,
    };
    let bundle_path = stored_bundle_path(paths, hex, module);
    let bundle_json = crate::fsutil::read_optional(&bundle_path, MAX_STORED_BUNDLE)
        .map_err(|e| refuse(format!("stored bundle: {e}")))?
        .ok_or_else(|| {
            refuse(format!(
                "no signature bundle stored for {digest} ({})",
                bundle_path.display()
            ))
        })?;
    verify_image(paths, module, digest, fsverity, trust, &bundle_json)
}

/// [`verify_stored`] with the bundle given: the check itself, also run on a fresh download
/// before its bundle is kept.
fn verify_image(
    paths: &Paths,
    module: &str,
    digest: &str,
    fsverity: &str,
    trust: &NodeTrust,
    bundle_json: &[u8],
) -> Result<VerifiedImage, ModuleError> {
    let hex = checked_store_hex(module, digest)?;
    let refuse = |reason: String| ModuleError::Verification {
        module: module.to_string(),
        reason,
    };
    let artifact = Artifact::parse_digest(digest)
        .ok_or_else(|| refuse(format!("malformed digest {digest:?}")))?;
    let bundle = verify::Bundle::from_json(bundle_json)
        .map_err(|e| refuse(format!("stored bundle: {e}")))?;
    let verified = trust
        .policy
        .verify(&trust.root, &bundle, &artifact)
        .map_err(|e| refuse(format!("stored bundle: {e}")))?;
    let path = store_dir(paths).join(hex);
    let (sha, fsv) = crate::fsverity::file_digests(&path)
        .map_err(|e| refuse(format!("stored image {}: {e}", path.display())))?;
    if sha != hex {
        return Err(refuse(format!(
            "stored image {} hashes to sha256:{sha}, not the signed {digest}: rewritten",
            path.display()
        )));
    }
    let fsv = crate::fsverity::format(&fsv);
    if fsv != fsverity {
        return Err(refuse(format!(
            "the signed image's fs-verity digest is {fsv}, the record says {fsverity}"
        )));
    }
    let kernel_verity = match crate::fsverity::kernel_measurement(&path) {
        Ok(Some(m)) if m == fsv => "enforced".to_string(),
        Ok(Some(m)) => {
            return Err(refuse(format!(
                "the kernel measures {} as {m}, its content as {fsv}",
                path.display()
            )));
        }
        Ok(None) => "not enabled".to_string(),
        Err(e) => {
            return Err(refuse(format!(
                "kernel fs-verity of {}: {e}",
                path.display()
            )));
        }
    };
    Ok(VerifiedImage {
        path,
        digest: digest.to_string(),
        fsverity: fsv,
        signer: verified.identity,
        kernel_verity,
    })
}

/// Downloads the bundle, verifies it, pulls the image and checks it with [`verify_stored`].
/// Fails closed. The node's signer policy decides who may sign; the platform's `trust_policy`
/// only narrows it.
pub async fn fetch_and_verify(
    client: &mut InstanceClient,
    paths: &Paths,
    module: &ModuleSummary,
) -> Result<Fetched, ModuleError> {
    check_module_name(&module.name)?;
    let refuse = |reason: String| ModuleError::Verification {
        module: module.name.clone(),
        reason,
    };
    let other = |reason: String| ModuleError::Other {
        module: module.name.clone(),
        reason,
    };
    let detail: ModuleEnvelope = client.get(&format!("/modules/{}", module.id)).await?;
    let platform_policy = detail
        .module
        .trust_policy
        .filter(|t| *t != TrustPolicy::default());
    let trust = NodeTrust::load(paths, &module.name, platform_policy.as_ref())?;

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
    // Checked before the download, so an unsigned image is never fetched.
    trust
        .policy
        .verify(&trust.root, &bundle, &artifact)
        .map_err(|e| refuse(format!("signature bundle: {e}")))?;
    // The full check of the stored image with this bundle; the bundle is then kept beside
    // the image, so every later mount verifies the image again from the store alone.
    let check = || {
        let (paths, name, digest, want, trust, bundle) = (
            paths.clone(),
            module.name.clone(),
            layer.digest.clone(),
            want_fsverity.clone(),
            trust.clone(),
            bundle_json.clone(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                let v = verify_image(&paths, &name, &digest, &want, &trust, &bundle)?;
                save_bundle(&paths, &digest, &name, &bundle)?;
                Ok::<VerifiedImage, ModuleError>(v)
            })
            .await
            .map_err(|e| other(e.to_string()))?
        }
    };
    let store = store_dir(paths);
    let hex = oci::digest_hex(&layer.digest)
        .map_err(|e| pull_err(e, &refuse, &other))?
        .to_string();
    let cached = if store.join(&hex).is_file() {
        match check().await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(module = %module.name, error = %e, "stored image refused; fetching it again");
                None
            }
        }
    } else {
        None
    };
    let verified = match cached {
        Some(mut v) => {
            tracing::info!(module = %module.name, "stored image verified; not downloaded again");
            v.kernel_verity = format!("{} (stored image, verified again)", v.kernel_verity);
            v
        }
        None => {
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
            // Where the filesystem can, hand the check to the kernel: from here on every read
            // of the image is verified against the digest we just checked.
            let p = path.clone();
            let want = want_fsverity.clone();
            let kernel =
                tokio::task::spawn_blocking(move || crate::fsverity::enable_and_measure(&p, &want))
                    .await
                    .map_err(|e| other(e.to_string()))?;
            match kernel {
                Ok(crate::fsverity::KernelVerity::Enforced) => {
                    tracing::info!(module = %module.name, "fs-verity enabled; the kernel measurement matches");
                }
                Ok(crate::fsverity::KernelVerity::Unsupported(why)) => {
                    tracing::debug!(module = %module.name, why, "filesystem without fs-verity");
                }
                Err(e) => {
                    if let Err(rm) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %rm, "cannot remove a refused image");
                    }
                    return Err(refuse(format!("kernel fs-verity: {e}")));
                }
            }
            check().await?
        }
    };
    Ok(Fetched {
        kernel_verity: verified.kernel_verity,
        id: module.id.clone(),
        name: module.name.clone(),
        image_digest: layer.digest.clone(),
        manifest_digest,
        fsverity_digest: verified.fsverity,
        size_bytes: u64::try_from(layer.size).unwrap_or(0),
        path: verified.path,
        signer: verified.signer,
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
    /// A P-256 key nobody signed the fixtures with.
    const OTHER_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEarQTLI7V5iegIcqUs8ZZ1k/j2F9n
h+McmrVvak4YJhFpi1Tx0Iia2Wo2HFu6/a6hZmB7hFRzOdNLNySxQ0Ap9Q==
-----END PUBLIC KEY-----
";
    const FIXTURE_ID: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
    const FIXTURE_ISS: &str = "https://token.actions.githubusercontent.com";

    fn fixture(rel: &str) -> Vec<u8> {
        let p = format!(
            "{}/../tests/fixtures/sigstore/{rel}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn fixture_key() -> String {
        String::from_utf8(fixture(
            "bundle-verify/managed-key-and-trusted-root/key.pub",
        ))
        .expect("utf-8")
    }

    /// A node root whose store holds the conformance artifact (`a.txt`) as module `hello`'s
    /// image, signed by the fixture key (key-based bundle) and pinned root; `policy` is the
    /// node's modules.toml. Returns the digest and fs-verity digest of the image.
    struct Node {
        _dir: tempfile::TempDir,
        paths: Paths,
        digest: String,
        fsverity: String,
    }

    fn node(policy: &str) -> Node {
        let dir = tempfile::tempdir().expect("tmp");
        let paths = Paths::new(dir.path());
        let image = fixture("bundle-verify/a.txt");
        let hex = oci::sha256_hex(&image);
        std::fs::create_dir_all(store_dir(&paths)).expect("store");
        std::fs::write(store_dir(&paths).join(&hex), &image).expect("image");
        std::fs::create_dir_all(paths.trust_dir()).expect("trust");
        std::fs::write(
            paths.trust_dir().join("trusted_root.json"),
            fixture("bundle-verify/managed-key-and-trusted-root/trusted_root.json"),
        )
        .expect("root");
        std::fs::write(paths.trust_dir().join(LOCAL_POLICY_FILE), policy).expect("policy");
        let digest = format!("sha256:{hex}");
        save_bundle(
            &paths,
            &digest,
            "hello",
            &fixture("bundle-verify/managed-key-and-trusted-root/bundle.sigstore.json"),
        )
        .expect("bundle");
        let fsverity =
            crate::fsverity::format(&crate::fsverity::digest_reader(&image[..]).expect("fsv"));
        Node {
            _dir: dir,
            paths,
            digest,
            fsverity,
        }
    }

    fn key_policy(modules: &str, pem: &str) -> String {
        format!("[[signer]]\nmodules = {modules}\npublic_key = '''\n{pem}'''\n")
    }

    fn reason(r: Result<impl std::fmt::Debug, ModuleError>) -> String {
        match r {
            Err(e @ ModuleError::Verification { .. }) => e.to_string(),
            other => panic!("expected a verification refusal, got {other:?}"),
        }
    }

    #[test]
    fn stored_image_verifies_from_the_store_alone() {
        for modules in [r#"["hello"]"#, r#"["*"]"#, r#"["other", "hello"]"#] {
            let n = node(&key_policy(modules, &fixture_key()));
            let trust = NodeTrust::load(&n.paths, "hello", None).expect("trust");
            let v =
                verify_stored(&n.paths, "hello", &n.digest, &n.fsverity, &trust).expect("verifies");
            assert_eq!(v.digest, n.digest);
            assert_eq!(v.fsverity, n.fsverity);
            assert_eq!(v.kernel_verity, "not enabled");
        }
    }

    #[test]
    fn rewritten_store_image_is_refused() {
        let n = node(&key_policy(r#"["hello"]"#, &fixture_key()));
        let trust = NodeTrust::load(&n.paths, "hello", None).expect("trust");
        let hex = store_hex(&n.digest).expect("hex");
        std::fs::write(store_dir(&n.paths).join(hex), b"a rewritten image").expect("swap");
        let why = reason(verify_stored(
            &n.paths,
            "hello",
            &n.digest,
            &n.fsverity,
            &trust,
        ));
        assert!(why.contains("rewritten"), "{why}");
    }

    #[test]
    fn rewritten_state_records_are_refused() {
        let n = node(&key_policy(r#"["hello"]"#, &fixture_key()));
        let trust = NodeTrust::load(&n.paths, "hello", None).expect("trust");
        // Another image, put in the store under its own address but never signed.
        let forged = b"an image nobody signed";
        let forged_hex = oci::sha256_hex(forged);
        std::fs::write(store_dir(&n.paths).join(&forged_hex), forged).expect("forged");
        let forged_fsv =
            crate::fsverity::format(&crate::fsverity::digest_reader(&forged[..]).expect("fsv"));
        let why = reason(verify_stored(
            &n.paths,
            "hello",
            &format!("sha256:{forged_hex}"),
            &forged_fsv,
            &trust,
        ));
        assert!(why.contains("no signature bundle"), "{why}");
        // The signed image's bundle copied to the forged image's name does not sign it.
        std::fs::copy(
            stored_bundle_path(&n.paths, store_hex(&n.digest).expect("hex"), "hello"),
            stored_bundle_path(&n.paths, &forged_hex, "hello"),
        )
        .expect("copy");
        let why = reason(verify_stored(
            &n.paths,
            "hello",
            &format!("sha256:{forged_hex}"),
            &forged_fsv,
            &trust,
        ));
        assert!(why.contains("stored bundle"), "{why}");
        // Another fs-verity digest recorded for the signed image.
        let why = reason(verify_stored(
            &n.paths,
            "hello",
            &n.digest,
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            &trust,
        ));
        assert!(why.contains("fs-verity"), "{why}");
        // Digests that would name a path outside the store.
        for d in [
            "sha256:../../etc/passwd",
            "sha256:",
            "md5:00",
            &n.digest.to_uppercase(),
        ] {
            let why = reason(verify_stored(&n.paths, "hello", d, &n.fsverity, &trust));
            assert!(why.contains("malformed digest"), "{d}: {why}");
        }
    }

    #[test]
    fn a_signer_the_local_policy_does_not_allow_is_refused() {
        // The image is signed by the fixture key; the node allows only another key.
        let n = node(&key_policy(r#"["hello"]"#, OTHER_KEY));
        let trust = NodeTrust::load(&n.paths, "hello", None).expect("trust");
        let why = reason(verify_stored(
            &n.paths,
            "hello",
            &n.digest,
            &n.fsverity,
            &trust,
        ));
        assert!(why.contains("no signer the node's policy allows"), "{why}");
        // The fixture key allowed for another module does not cover this one.
        let n = node(&key_policy(r#"["other"]"#, &fixture_key()));
        let why = reason(NodeTrust::load(&n.paths, "hello", None));
        assert!(why.contains("allows nobody"), "{why}");
    }

    #[test]
    fn the_platform_policy_only_narrows() {
        let n = node(&format!(
            "{}{}",
            key_policy(r#"["*"]"#, &fixture_key()),
            key_policy(r#"["*"]"#, OTHER_KEY)
        ));
        let platform = |pem: &str| TrustPolicy {
            public_key: Some(pem.to_string()),
            ..TrustPolicy::default()
        };
        // Narrowed to the signing key: verifies.
        let trust =
            NodeTrust::load(&n.paths, "hello", Some(&platform(&fixture_key()))).expect("trust");
        verify_stored(&n.paths, "hello", &n.digest, &n.fsverity, &trust).expect("verifies");
        // Narrowed to the other allowed key: the fixture's signature no longer passes.
        let trust = NodeTrust::load(&n.paths, "hello", Some(&platform(OTHER_KEY))).expect("trust");
        reason(verify_stored(
            &n.paths,
            "hello",
            &n.digest,
            &n.fsverity,
            &trust,
        ));

        // A platform naming a key the node does not allow (widening) is refused outright.
        let n = node(&key_policy(r#"["hello"]"#, OTHER_KEY));
        let why = reason(NodeTrust::load(
            &n.paths,
            "hello",
            Some(&platform(&fixture_key())),
        ));
        assert!(why.contains("does not allow"), "{why}");
        // So is a keyless identity when the node allows keys only.
        let keyless = TrustPolicy {
            cosign_identity_regexp: Some(".*".into()),
            cosign_issuer_regexp: Some(".*".into()),
            ..TrustPolicy::default()
        };
        let why = reason(NodeTrust::load(&n.paths, "hello", Some(&keyless)));
        assert!(why.contains("no keyless signer"), "{why}");
    }

    #[test]
    fn keyless_platform_policy_must_match_on_top_of_the_local_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let paths = Paths::new(dir.path());
        std::fs::create_dir_all(paths.trust_dir()).expect("trust");
        std::fs::write(
            paths.trust_dir().join("trusted_root.json"),
            fixture("public-good/trusted_root.json"),
        )
        .expect("root");
        std::fs::write(
            paths.trust_dir().join(LOCAL_POLICY_FILE),
            format!(
                "[[signer]]\nmodules = [\"hello\"]\nidentity = '^{}$'\nissuer = '^{}$'\n",
                regex::escape(FIXTURE_ID),
                regex::escape(FIXTURE_ISS)
            ),
        )
        .expect("policy");
        let bundle = verify::Bundle::from_json(&fixture(
            "bundle-verify/happy-path-v0.3/bundle.sigstore.json",
        ))
        .expect("bundle");
        let artifact = Artifact::Bytes(fixture("bundle-verify/a.txt"));
        let trust = NodeTrust::load(&paths, "hello", None).expect("trust");
        trust
            .policy
            .verify(&trust.root, &bundle, &artifact)
            .expect("local identity verifies");
        let platform = |id: &str| TrustPolicy {
            cosign_identity_regexp: Some(id.into()),
            cosign_issuer_regexp: Some(".*".into()),
            ..TrustPolicy::default()
        };
        let trust = NodeTrust::load(&paths, "hello", Some(&platform("beacon"))).expect("trust");
        trust
            .policy
            .verify(&trust.root, &bundle, &artifact)
            .expect("narrowed identity still matches");
        let trust =
            NodeTrust::load(&paths, "hello", Some(&platform("^https://evil/"))).expect("trust");
        assert!(
            trust
                .policy
                .verify(&trust.root, &bundle, &artifact)
                .is_err()
        );
    }

    #[test]
    fn no_local_policy_means_refused_whatever_the_platform_says() {
        let n = node("");
        let platform = TrustPolicy {
            public_key: Some(fixture_key()),
            ..TrustPolicy::default()
        };
        let why = reason(NodeTrust::load(&n.paths, "hello", Some(&platform)));
        assert!(why.contains("allows nobody"), "{why}");
        // The older per-module key file still counts as the node's own policy.
        std::fs::create_dir_all(n.paths.trust_dir().join("modules")).expect("dir");
        std::fs::write(n.paths.trust_dir().join("modules/hello.pub"), fixture_key()).expect("pub");
        let trust = NodeTrust::load(&n.paths, "hello", Some(&platform)).expect("trust");
        verify_stored(&n.paths, "hello", &n.digest, &n.fsverity, &trust).expect("verifies");
    }

    #[test]
    fn module_names_are_checked_before_they_touch_a_path() {
        let n = node(&key_policy(r#"["*"]"#, &fixture_key()));
        // A key outside modules/ that `../x` would have reached.
        std::fs::create_dir_all(n.paths.trust_dir().join("modules")).expect("dir");
        std::fs::write(n.paths.trust_dir().join("x.pub"), fixture_key()).expect("pub");
        let trust = NodeTrust::load(&n.paths, "hello", None).expect("trust");
        let long = "a".repeat(MAX_MODULE_NAME + 1);
        for bad in [
            "../x", "..", ".", "", "a/b", ".hidden", "a..b", "a b", "é", &long,
        ] {
            let why = reason(NodeTrust::load(&n.paths, bad, None));
            assert!(why.contains("invalid module name"), "{bad:?}: {why}");
            let why = reason(verify_stored(&n.paths, bad, &n.digest, &n.fsverity, &trust));
            assert!(why.contains("invalid module name"), "{bad:?}: {why}");
            reason(save_bundle(&n.paths, &n.digest, bad, b"{}"));
        }
        let longest = "a".repeat(MAX_MODULE_NAME);
        for good in ["hello", "web-app_2", "a.b", "0", &longest] {
            check_module_name(good).expect(good);
        }
    }

    #[test]
    fn malformed_local_policies_are_refused() {
        for bad in [
            "[[signer]]\nmodules = [\"*\"]\n",
            "[[signer]]\nmodules = [\"*\"]\nidentity = \"x\"\n",
            "[[signer]]\nmodules = [\"*\"]\npublic_key = \"not a key\"\n",
            "[[signer]]\nmodules = [\"*\"]\nunknown = 1\n",
            "not toml [",
        ] {
            let n = node(bad);
            reason(NodeTrust::load(&n.paths, "hello", None));
        }
    }

    #[test]
    fn pruning_removes_an_image_with_its_bundles() {
        let n = node(&key_policy(r#"["*"]"#, &fixture_key()));
        save_bundle(&n.paths, &n.digest, "other", b"{}").expect("second bundle");
        let p = prune_store(&n.paths, &Default::default()).expect("prune");
        assert_eq!(p.images, vec![n.digest.clone()]);
        let left: Vec<_> = std::fs::read_dir(store_dir(&n.paths))
            .expect("read")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
