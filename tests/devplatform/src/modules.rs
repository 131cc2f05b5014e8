//! Modules (node-api.md Part A §6–7, Part B §10): publishing an EROFS image as a signed OCI
//! artifact, assignments, and the `GET modules`, `GET modules/:id`, `GET modules/:id/download`
//! and `GET files/modules/:id/cosign-bundle` endpoints.
//!
//! Signing: the platform keeps a test Sigstore setup under `<state>/sigstore/`: a P-256 signing
//! key (the module trust policy's public key) and a P-256 "transparency log" key. A published
//! image digest gets a key-based Sigstore bundle v0.1: a `messageSignature` over the image,
//! one `hashedrekord` 0.0.1 tlog entry (log index 0 of a one-entry log per bundle) with a signed
//! entry timestamp (SET) by the log key. `trusted_root.json` lists that log key. This is what
//! `powernode-agent verify --key signing.pub --trusted-root trusted_root.json` accepts.
//!
//! Keyless signing (`--identity`, `--issuer`) is what production CI does with cosign, so the
//! agent's identity policies can be exercised end to end: an ephemeral P-256 key gets a
//! 10-minute certificate from the platform's Fulcio-style CA ([`crate::fulcio`]) with the
//! identity as SAN, the OIDC issuer extensions and an embedded SCT from the platform's CT log
//! key. The image signature, that certificate and a `hashedrekord` entry naming it (SET,
//! inclusion proof and signed checkpoint) form a Sigstore bundle v0.3; `trusted_root.json` also
//! lists the CA and the CT log, and the trust policy becomes `^<identity>$` + `^<issuer>$`.
//! `powernode-agent verify --certificate-identity I --certificate-oidc-issuer U` accepts it.
//!
//! Artifact (docs/ARCHITECTURE.md §3c): artifactType `application/vnd.powernode.module.v1`,
//! config `application/vnd.powernode.module.config.v1+json`, layers `manifest.yaml`
//! (`application/vnd.powernode.module.manifest.v1+yaml`) and the EROFS image
//! (`application/vnd.powernode.module.erofs.v1`, annotated `org.powernode.fsverity.digest`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail, ensure};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, InstanceAuth, blocking, success};
use crate::fsutil;
use crate::fulcio::{Fulcio, Identity};
use crate::store::{Outcome, Store, hex, sha256_hex};

const ARTIFACT_TYPE: &str = "application/vnd.powernode.module.v1";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.powernode.module.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.powernode.module.manifest.v1+yaml";
const EROFS_MEDIA_TYPE: &str = "application/vnd.powernode.module.erofs.v1";
const ANNOTATION_FSVERITY: &str = "org.powernode.fsverity.digest";
const ANNOTATION_ARCH: &str = "org.powernode.architecture";
const OCI_IMAGE_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const SIGSTORE_DIR: &str = "sigstore";
const MODULES_DIR: &str = "modules";
/// DER prefix of a P-256 SubjectPublicKeyInfo (the uncompressed point follows).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// One architecture's artifact of a module version: its own manifest (tag
/// `<version>-<arch>`), listed in the version's image index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    #[serde(rename = "ref")]
    pub reference: String,
    /// Digest of this architecture's manifest.
    pub digest: String,
    /// Size of that manifest in bytes (the index descriptor carries it).
    pub manifest_size: u64,
    pub architecture: String,
    pub fsverity_root_hash: String,
    pub size_bytes: u64,
    /// `sha256:` of the EROFS image (what the bundle signs).
    pub image_digest: String,
}

/// The OCI image index of a module version (tag `<version>`): what the platform hands out,
/// so each node resolves its own architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexRecord {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Module {
    pub id: String,
    pub name: String,
    pub version: String,
    pub version_number: u64,
    pub index: IndexRecord,
    /// The current version's artifacts by architecture.
    pub artifacts: BTreeMap<String, Artifact>,
    /// `{public_key}` (PEM) or `{cosign_identity_regexp, cosign_issuer_regexp}`; `None` = none.
    #[serde(default)]
    pub trust_policy: Option<Value>,
}

impl Module {
    /// The artifact for `arch`, else the first one (the upstream server's rule, Part B §10.3).
    pub fn artifact_for(&self, arch: Option<&str>) -> Option<&Artifact> {
        arch.and_then(|a| self.artifacts.get(a))
            .or_else(|| self.artifacts.values().next())
    }
}

/// What `module publish` reports: the module, and the artifact this run pushed.
#[derive(Debug, Serialize)]
pub struct Published {
    #[serde(flatten)]
    pub module: Module,
    pub artifact: Artifact,
}

/// A persistent P-256 key (signing, transparency log, CT log).
pub(crate) struct Signer {
    key: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl Signer {
    /// Load `<dir>/<name>.p8`, generating it on first use.
    pub(crate) fn load_or_create(dir: &Path, name: &str) -> Result<Signer> {
        let path = dir.join(format!("{name}.p8"));
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_ASN1_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
                fsutil::write_atomic(&path, doc.as_ref(), fsutil::MODE_SECRET)?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Signer::from_pkcs8(&pkcs8).with_context(|| path.display().to_string())
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<Signer> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
            .map_err(|e| anyhow::anyhow!("not a P-256 PKCS#8 key: {e}"))?;
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(key.public_key().as_ref());
        Ok(Signer { key, spki })
    }

    /// ECDSA P-256 SHA-256, ASN.1 DER signature.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .key
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| anyhow::anyhow!("signing"))?
            .as_ref()
            .to_vec())
    }

    fn public_pem(&self) -> String {
        let b = B64.encode(&self.spki);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// SHA-256 of the SPKI: the log ID of Rekor v1 and CT logs.
    pub(crate) fn key_id(&self) -> Vec<u8> {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.spki)
            .as_ref()
            .to_vec()
    }
}

/// PEM of a DER certificate.
fn cert_pem(der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A `tlogs`/`ctlogs` entry of `trusted_root.json` for `key`.
pub(crate) fn log_entry(key: &Signer, base_url: &str) -> Value {
    json!({
        "baseUrl": base_url,
        "hashAlgorithm": "SHA2_256",
        "publicKey": {
            "rawBytes": B64.encode(&key.spki),
            "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": {"start": "2020-01-01T00:00:00Z"}
        },
        "logId": {"keyId": B64.encode(key.key_id())}
    })
}

fn rfc3339(t: time::OffsetDateTime) -> Result<String> {
    t.format(&time::format_description::well_known::Rfc3339)
        .context("formatting a time")
}

/// The regular expression matching exactly `s` (the agent's matchers are unanchored).
fn exact_regex(s: &str) -> String {
    format!("^{}$", regex::escape(s))
}

/// Origin line of the checkpoints (signed notes) of the one-entry logs.
const CHECKPOINT_ORIGIN: &str = "devplatform.invalid/rekor";
const BUNDLE_V01: &str = "application/vnd.dev.sigstore.bundle+json;version=0.1";
const BUNDLE_V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// The platform's signing key, log key, Fulcio CA, CT log key and trusted root (created on
/// first use).
struct Sigstore {
    signing: Signer,
    log: Signer,
    fulcio: Fulcio,
    ctlog: Signer,
    dir: PathBuf,
}

impl Sigstore {
    fn open(state: &Path) -> Result<Sigstore> {
        let dir = state.join(SIGSTORE_DIR);
        fsutil::ensure_dir(&dir)?;
        let s = Sigstore {
            signing: Signer::load_or_create(&dir, "signing")?,
            log: Signer::load_or_create(&dir, "log")?,
            fulcio: Fulcio::load_or_create(&dir)?,
            ctlog: Signer::load_or_create(&dir, "ctlog")?,
            dir,
        };
        fsutil::write_atomic(
            &s.dir.join("signing.pub"),
            s.signing.public_pem().as_bytes(),
            fsutil::MODE_PUBLIC,
        )?;
        let root = s.trusted_root()?;
        fsutil::write_atomic(
            &s.dir.join("trusted_root.json"),
            serde_json::to_string_pretty(&root)?.as_bytes(),
            fsutil::MODE_PUBLIC,
        )?;
        Ok(s)
    }

    fn trusted_root(&self) -> Result<Value> {
        Ok(json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log_entry(&self.log, "https://devplatform.invalid/rekor")],
            "certificateAuthorities": [{
                "subject": {
                    "organization": "powernode-devplatform",
                    "commonName": "powernode-devplatform fulcio"
                },
                "uri": "https://devplatform.invalid/fulcio",
                "certChain": {"certificates": [{"rawBytes": B64.encode(self.fulcio.ca_der())}]},
                "validFor": {
                    "start": rfc3339(self.fulcio.not_before)?,
                    "end": rfc3339(self.fulcio.not_after)?
                }
            }],
            "ctlogs": [log_entry(&self.ctlog, "https://devplatform.invalid/ct")],
            "timestampAuthorities": []
        }))
    }

    /// The hashedrekord 0.0.1 body Rekor would log for `sig` over an image of `digest`;
    /// `verifier_pem` is the signer's public key or certificate (PEM).
    fn hashedrekord(digest: &[u8], sig: &[u8], verifier_pem: &str) -> Value {
        json!({
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": hex(digest)}},
                "signature": {
                    "content": B64.encode(sig),
                    "publicKey": {"content": B64.encode(verifier_pem)}
                }
            }
        })
    }

    /// The tlog entry for `body` as log index 0 of a one-entry log: a signed entry timestamp
    /// (SET) by the log key, and with `proof` also the inclusion proof and its signed
    /// checkpoint (which bundles from v0.2 on must carry).
    fn tlog_entry(&self, body: &Value, integrated: i64, proof: bool) -> Result<Value> {
        let body_bytes = serde_json::to_vec(body)?;
        let body_b64 = B64.encode(&body_bytes);
        let log_id = self.log.key_id();
        // Canonical JSON (keys sorted, no whitespace), as Rekor signs it.
        let set_payload = format!(
            "{{\"body\":{},\"integratedTime\":{integrated},\"logID\":\"{}\",\"logIndex\":0}}",
            Value::String(body_b64.clone()),
            hex(&log_id)
        );
        let set = self.log.sign(set_payload.as_bytes())?;
        let mut entry = json!({
            "logIndex": "0",
            "logId": {"keyId": B64.encode(&log_id)},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": integrated.to_string(),
            "inclusionPromise": {"signedEntryTimestamp": B64.encode(&set)},
            "canonicalizedBody": body_b64
        });
        if proof {
            // RFC 6962: the root of a one-leaf tree is the leaf hash, with an empty audit path.
            let mut leaf = vec![0u8];
            leaf.extend_from_slice(&body_bytes);
            let root = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf);
            let text = format!(
                "{CHECKPOINT_ORIGIN} - 0\n1\n{}\n",
                B64.encode(root.as_ref())
            );
            // Signed note: the signature is prefixed with the first 4 bytes of the key ID.
            let mut note_sig = log_id.get(..4).context("short log ID")?.to_vec();
            note_sig.extend_from_slice(&self.log.sign(text.as_bytes())?);
            let envelope = format!(
                "{text}\n\u{2014} {CHECKPOINT_ORIGIN} {}\n",
                B64.encode(&note_sig)
            );
            entry["inclusionProof"] = json!({
                "logIndex": "0",
                "rootHash": B64.encode(root.as_ref()),
                "treeSize": "1",
                "hashes": [],
                "checkpoint": {"envelope": envelope}
            });
        }
        Ok(entry)
    }

    /// A key-based Sigstore bundle v0.1 over `image` with a SET from the log key.
    fn bundle(&self, image: &[u8]) -> Result<Value> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, image);
        let sig = self.signing.sign(image)?;
        let body = Self::hashedrekord(digest.as_ref(), &sig, &self.signing.public_pem());
        let integrated = time::OffsetDateTime::now_utc().unix_timestamp();
        Ok(json!({
            "mediaType": BUNDLE_V01,
            "verificationMaterial": {
                "publicKey": {"hint": B64.encode(self.signing.key_id())},
                "tlogEntries": [self.tlog_entry(&body, integrated, false)?]
            },
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": B64.encode(digest.as_ref())},
                "signature": B64.encode(&sig)
            }
        }))
    }

    /// A keyless Sigstore bundle v0.3 over `image`, as cosign writes it today: an ephemeral
    /// key, its Fulcio-style certificate for `identity` (`verificationMaterial.certificate`),
    /// a hashedrekord entry naming that certificate, with SET, inclusion proof and checkpoint.
    /// The ephemeral key is dropped on return, as in real keyless signing.
    fn keyless_bundle(&self, image: &[u8], identity: &Identity) -> Result<Value> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("generating the ephemeral key"))?;
        let ephemeral = Signer::from_pkcs8(pkcs8.as_ref())?;
        let cert_key = rcgen::KeyPair::try_from(pkcs8.as_ref())
            .context("loading the ephemeral key for the certificate")?;
        let now = time::OffsetDateTime::now_utc();
        let cert = self.fulcio.issue(&cert_key, identity, &self.ctlog, now)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, image);
        let sig = ephemeral.sign(image)?;
        let body = Self::hashedrekord(digest.as_ref(), &sig, &cert_pem(&cert));
        // Logged right after signing: inside the certificate's 10 minutes.
        let integrated = now.unix_timestamp();
        Ok(json!({
            "mediaType": BUNDLE_V03,
            "verificationMaterial": {
                "certificate": {"rawBytes": B64.encode(&cert)},
                "tlogEntries": [self.tlog_entry(&body, integrated, true)?]
            },
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": B64.encode(digest.as_ref())},
                "signature": B64.encode(&sig)
            }
        }))
    }
}

/// What `module publish` was asked to do.
#[derive(Debug)]
pub struct PublishArgs {
    pub state: PathBuf,
    pub registry: String,
    pub name: String,
    pub version: String,
    pub arch: String,
    pub rootfs: PathBuf,
    pub out: Option<PathBuf>,
    /// Record this PEM key as the trust policy instead of the platform's signing key.
    pub policy_key: Option<PathBuf>,
    /// Record no trust policy at all (to exercise the agent's fail-closed path).
    pub no_policy: bool,
    /// Sign keyless as this identity instead of with the platform's signing key.
    pub identity: Option<Identity>,
    /// With `identity`: record this identity regexp as the trust policy instead of the signer's
    /// own (to exercise the agent's refusal of another signer).
    pub policy_identity: Option<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

fn fsverity_digest(path: &Path) -> Result<String> {
    let out = Command::new("fsverity")
        .args([
            "digest",
            "--hash-alg=sha256",
            "--block-size=4096",
            "--compact",
        ])
        .arg(path)
        .output()
        .context("running `fsverity digest` (apt package fsverity)")?;
    ensure!(
        out.status.success(),
        "fsverity digest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hexd = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        hexd.len() == 64 && hexd.bytes().all(|b| b.is_ascii_hexdigit()),
        "unexpected `fsverity digest` output {hexd:?}"
    );
    Ok(format!("sha256:{hexd}"))
}

fn registry_client(registry: &str) -> Client {
    let loopback = ["127.0.0.1:", "localhost:", "[::1]:"]
        .iter()
        .any(|p| registry.starts_with(p));
    Client::new(ClientConfig {
        protocol: if loopback {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        },
        ..ClientConfig::default()
    })
}

/// Builds, signs, pushes and records a module version. Returns the stored module.
pub async fn publish(a: PublishArgs) -> Result<Published> {
    ensure!(valid_name(&a.name), "invalid module name {:?}", a.name);
    ensure!(valid_name(&a.version), "invalid version {:?}", a.version);
    ensure!(valid_name(&a.arch), "invalid architecture {:?}", a.arch);
    ensure!(
        a.rootfs.is_dir(),
        "{} is not a directory",
        a.rootfs.display()
    );
    let store = Store::open(&a.state)?;
    let sig = Sigstore::open(&a.state)?;
    let work = WorkDir(tempfile_dir(&a.state)?);
    let image_path = work.0.join("image.erofs");
    let out = Command::new("mkfs.erofs")
        .args(["--quiet", "--all-root", "-T0"])
        .arg(&image_path)
        .arg(&a.rootfs)
        .output()
        .context("running mkfs.erofs (apt package erofs-utils)")?;
    ensure!(
        out.status.success(),
        "mkfs.erofs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&image_path)?;
    let image_digest = format!("sha256:{}", sha256_hex(&image));
    let fsverity = fsverity_digest(&image_path)?;
    let bundle = match &a.identity {
        Some(id) => sig.keyless_bundle(&image, id)?,
        None => sig.bundle(&image)?,
    };

    // The module's own manifest.yaml when the tree has one (the upstream layout), else the
    // smallest manifest the schema accepts.
    let manifest_yaml = match std::fs::read_to_string(a.rootfs.join("manifest.yaml")) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("schema_version: 1\nname: {}\n", a.name)
        }
        Err(e) => return Err(e).context("reading manifest.yaml of the module tree"),
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_FSVERITY.to_string(), fsverity.clone());
    annotations.insert(ANNOTATION_ARCH.to_string(), a.arch.clone());
    annotations.insert(
        "org.opencontainers.image.title".to_string(),
        format!("{}-{}-{}.erofs", a.name, a.version, a.arch),
    );
    let layers = vec![
        ImageLayer::new(
            manifest_yaml.into_bytes(),
            MANIFEST_MEDIA_TYPE.to_string(),
            None,
        ),
        ImageLayer::new(
            image.clone(),
            EROFS_MEDIA_TYPE.to_string(),
            Some(annotations),
        ),
    ];
    let config = Config::new(
        serde_json::to_vec(&json!({"name": a.name, "version": a.version, "architecture": a.arch}))?,
        CONFIG_MEDIA_TYPE.to_string(),
        None,
    );
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.artifact_type = Some(ARTIFACT_TYPE.to_string());
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
    let repo = format!("{}/powernode/modules/{}", a.registry, a.name);
    let arch_ref = format!("{repo}:{}-{}", a.version, a.arch);
    let reference: Reference = arch_ref
        .parse()
        .with_context(|| format!("reference {arch_ref}"))?;
    let client = registry_client(&a.registry);
    client
        .push(
            &reference,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .with_context(|| format!("pushing {arch_ref}"))?;
    // The registry's digest of the canonical bytes it stored (not our serialisation).
    let (raw, _) = client
        .pull_manifest_raw(
            &reference,
            &RegistryAuth::Anonymous,
            &[OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .with_context(|| format!("reading back {arch_ref}"))?;
    let artifact = Artifact {
        reference: arch_ref,
        digest: format!("sha256:{}", sha256_hex(&raw)),
        manifest_size: raw.len() as u64,
        architecture: a.arch.clone(),
        fsverity_root_hash: fsverity,
        size_bytes: image.len() as u64,
        image_digest,
    };

    let trust_policy = if a.no_policy {
        None
    } else if let Some(id) = &a.identity {
        let identity = a
            .policy_identity
            .clone()
            .unwrap_or_else(|| exact_regex(&id.subject));
        Some(json!({
            "cosign_identity_regexp": identity,
            "cosign_issuer_regexp": exact_regex(&id.issuer),
        }))
    } else if let Some(p) = &a.policy_key {
        let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Some(json!({"public_key": pem}))
    } else {
        Some(json!({"public_key": sig.signing.public_pem()}))
    };
    let bundle_bytes = serde_json::to_vec_pretty(&bundle)?;

    // One publish at a time per platform, so two architectures of one version published at
    // once both end up in its index.
    let _publishing = fsutil::lock_exclusive(&a.state.join(MODULES_DIR).join("publish.lock"))?;
    let existing = store
        .read()?
        .modules
        .into_values()
        .find(|m| m.name == a.name);
    // The same version gains (or replaces) an architecture; another version starts afresh.
    let mut artifacts = match &existing {
        Some(m) if m.version == a.version => m.artifacts.clone(),
        _ => BTreeMap::new(),
    };
    artifacts.insert(a.arch.clone(), artifact.clone());
    let index_ref = format!("{repo}:{}", a.version);
    let index_digest = push_index(&client, &index_ref, &artifacts).await?;
    let id = existing
        .as_ref()
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), |m| m.id.clone());
    let dir = a.state.join(MODULES_DIR).join(&id);
    fsutil::ensure_dir(&dir)?;
    fsutil::write_atomic(
        &dir.join(bundle_file(&a.arch)),
        &bundle_bytes,
        fsutil::MODE_PUBLIC,
    )?;
    let module = store.transact(|s| {
        let module = Module {
            id: id.clone(),
            name: a.name.clone(),
            version: a.version.clone(),
            version_number: s.modules.get(&id).map_or(1, |m| m.version_number + 1),
            index: IndexRecord {
                reference: index_ref.clone(),
                digest: index_digest.clone(),
            },
            artifacts: artifacts.clone(),
            trust_policy: trust_policy.clone(),
        };
        s.modules.insert(id.clone(), module.clone());
        Ok::<_, anyhow::Error>((module, Outcome::Changed))
    })?;

    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::copy(&image_path, out.join("image.erofs"))?;
        std::fs::write(out.join("bundle.sigstore.json"), &bundle_bytes)?;
        std::fs::copy(
            sig.dir.join("trusted_root.json"),
            out.join("trusted_root.json"),
        )?;
        std::fs::copy(sig.dir.join("signing.pub"), out.join("signing.pub"))?;
    }
    Ok(Published { module, artifact })
}

/// The Sigstore bundle of one architecture's image, beside the module's record.
fn bundle_file(arch: &str) -> String {
    format!("bundle-{arch}.sigstore.json")
}

/// Pushes the image index of `artifacts` (one linux/<arch> manifest each) as `index_ref`;
/// returns its digest (of exactly the bytes sent).
async fn push_index(
    client: &Client,
    index_ref: &str,
    artifacts: &BTreeMap<String, Artifact>,
) -> Result<String> {
    let manifests: Vec<Value> = artifacts
        .values()
        .map(|art| {
            json!({
                "mediaType": OCI_IMAGE_MEDIA_TYPE,
                "digest": art.digest,
                "size": art.manifest_size,
                "artifactType": ARTIFACT_TYPE,
                "platform": {"architecture": art.architecture, "os": "linux"},
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "manifests": manifests,
    }))?;
    let digest = format!("sha256:{}", sha256_hex(&body));
    let reference: Reference = index_ref
        .parse()
        .with_context(|| format!("reference {index_ref}"))?;
    client
        .push_manifest_raw(
            &reference,
            body,
            axum::http::HeaderValue::from_static(OCI_IMAGE_INDEX_MEDIA_TYPE),
        )
        .await
        .with_context(|| format!("pushing the image index {index_ref}"))?;
    Ok(digest)
}

/// The build directory, removed however `publish` ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn tempfile_dir(state: &Path) -> Result<PathBuf> {
    let dir = state.join(MODULES_DIR).join(format!(
        ".work-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `module assign`: add the module (by name or id) to the instance's assignments, and set
/// whether its /var persists. Assigning again keeps the position and updates the flag.
pub fn assign(state: &Path, instance: &str, module: &str, persistent: bool) -> Result<String> {
    let store = Store::open(state)?;
    store.transact(|s| {
        if !s.instances.contains_key(instance) {
            bail!("no enrolled instance {instance}");
        }
        let Some(id) = s
            .modules
            .values()
            .find(|m| m.name == module || m.id == module)
            .map(|m| m.id.clone())
        else {
            bail!("no module {module}");
        };
        let list = s.assignments.entry(instance.to_string()).or_default();
        let mut changed = false;
        if !list.contains(&id) {
            list.push(id.clone());
            changed = true;
        }
        let flags = s.persistent.entry(instance.to_string()).or_default();
        changed |= if persistent {
            flags.insert(id.clone())
        } else {
            flags.remove(&id)
        };
        Ok((
            id,
            if changed {
                Outcome::Changed
            } else {
                Outcome::Unchanged
            },
        ))
    })
}

/// `module list`.
pub fn list_all(state: &Path) -> Result<Vec<Module>> {
    Ok(Store::open(state)?.read()?.modules.into_values().collect())
}

fn summary(m: &Module, priority: usize) -> Value {
    json!({
        "id": m.id,
        "name": m.name,
        "variety": "erofs",
        "priority": priority,
        "effective_priority": priority,
        "category_id": null,
        "parent_module_id": null,
        "reboot_required": false,
        "copy_path_destination": null,
        "has_data_file": true,
        "current_version": m.version_number,
        "dependencies": [],
    })
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "Module not found")
}

/// The module if it is assigned to this instance.
fn assigned(state: &AppState, instance: &str, id: &str) -> Result<Module, ApiError> {
    let s = state.store.read()?;
    let ok = s
        .assignments
        .get(instance)
        .is_some_and(|l| l.iter().any(|m| m == id));
    match s.modules.get(id) {
        Some(m) if ok => Ok(m.clone()),
        _ => Err(not_found()),
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let modules = blocking(move || {
        let s = st.store.read()?;
        let persistent = s.persistent.get(&auth.instance_id);
        Ok(s.assignments
            .get(&auth.instance_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| s.modules.get(id))
                    .enumerate()
                    .map(|(i, m)| {
                        // This platform's addition (Part A): the upstream server has no such
                        // field, so a node served by it sees `false`.
                        let mut e = summary(m, i + 1);
                        e["persistent"] = json!(persistent.is_some_and(|p| p.contains(&m.id)));
                        e
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default())
    })
    .await?;
    Ok(success(json!({"count": modules.len(), "modules": modules})))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let m = blocking(move || assigned(&st, &auth.instance_id, &id)).await?;
    let mut module = summary(&m, 1);
    if let Some(o) = module.as_object_mut() {
        o.insert(
            "description".into(),
            json!(format!("{} {}", m.name, m.version)),
        );
        o.insert("version".into(), json!(m.version));
        o.insert(
            "trust_policy".into(),
            m.trust_policy.clone().unwrap_or(Value::Null),
        );
        for k in [
            "mask",
            "file_spec",
            "package_spec",
            "dependency_spec",
            "protected_spec",
        ] {
            o.insert(k.into(), json!([]));
        }
        o.insert("services".into(), json!([]));
        o.insert("config".into(), json!({}));
    }
    Ok(success(json!({"module": module})))
}

/// The instance's architecture as it enrolled (`None` when it did not say).
fn instance_arch(state: &AppState, instance: &str) -> Result<Option<String>, ApiError> {
    Ok(state
        .store
        .read()?
        .instances
        .get(instance)
        .and_then(|i| i.architecture.clone()))
}

/// `data.oci`: the version's image index (each node resolves its own architecture from it),
/// with the size, fs-verity digest and bundle of the instance's architecture, else the first.
pub async fn download(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let (m, arch) = blocking(move || {
        let m = assigned(&st, &auth.instance_id, &id)?;
        Ok((m, instance_arch(&st, &auth.instance_id)?))
    })
    .await?;
    let a = m.artifact_for(arch.as_deref()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "NO_DATA_FILE",
            "Module has no data file",
        )
    })?;
    Ok(success(json!({
        "oci": {
            "ref": m.index.reference,
            "digest": m.index.digest,
            "architecture": a.architecture,
            "fsverity_root_hash": a.fsverity_root_hash,
            "size_bytes": a.size_bytes,
            "cosign_bundle_url": format!("{}/files/modules/{}/cosign-bundle", crate::api::API_PREFIX, m.id),
        }
    })))
}

pub async fn cosign_bundle(
    State(state): State<Arc<AppState>>,
    auth: InstanceAuth,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let st = state.clone();
    let bytes = blocking(move || {
        let m = assigned(&st, &auth.instance_id, &id)?;
        let arch = instance_arch(&st, &auth.instance_id)?;
        let a = m.artifact_for(arch.as_deref()).ok_or_else(not_found)?;
        let p = st
            .state_dir
            .join(MODULES_DIR)
            .join(&m.id)
            .join(bundle_file(&a.architecture));
        std::fs::read(&p)
            .with_context(|| format!("reading {}", p.display()))
            .map_err(ApiError::from)
    })
    .await?;
    // Key-based bundles are v0.1, keyless ones v0.3: the file says which.
    let media_type = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| BUNDLE_V01.to_string());
    Ok(([(axum::http::header::CONTENT_TYPE, media_type)], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["hello", "web-1", "a.b_c", "1x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", "Hello", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn keys_persist_and_bundle_has_a_valid_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Sigstore::open(dir.path()).expect("open");
        let b = Sigstore::open(dir.path()).expect("reopen");
        assert_eq!(a.signing.spki, b.signing.spki, "signing key persisted");
        assert_eq!(a.log.spki, b.log.spki, "log key persisted");
        assert_ne!(a.signing.spki, a.log.spki);
        let bundle = a.bundle(b"image bytes").expect("bundle");
        let e = &bundle["verificationMaterial"]["tlogEntries"][0];
        let payload = format!(
            "{{\"body\":{},\"integratedTime\":{},\"logID\":\"{}\",\"logIndex\":0}}",
            e["canonicalizedBody"],
            e["integratedTime"].as_str().expect("time"),
            hex(&a.log.key_id())
        );
        let set = B64
            .decode(
                e["inclusionPromise"]["signedEntryTimestamp"]
                    .as_str()
                    .expect("set"),
            )
            .expect("b64");
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            a.log.key.public_key().as_ref(),
        )
        .verify(payload.as_bytes(), &set)
        .expect("SET verifies with the log key");
        let root = a.trusted_root().expect("root");
        assert_eq!(
            root["tlogs"][0]["logId"]["keyId"],
            Value::String(B64.encode(a.log.key_id()))
        );
    }

    /// The keyless bundle passes the agent's full verifier (chain, SCT, SET, inclusion proof,
    /// checkpoint, identity) with the platform's own trusted root, and only for its signer.
    #[test]
    fn keyless_bundle_verifies_with_the_agent_code() {
        use powernode::verify::{self, Artifact, Matcher, Policy};
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sigstore::open(dir.path()).expect("open");
        let id = Identity {
            subject: "https://ci.example/a+b".into(),
            issuer: "https://issuer.example".into(),
        };
        let bundle =
            serde_json::to_vec(&s.keyless_bundle(b"image", &id).expect("bundle")).expect("json");
        let root =
            std::fs::read(dir.path().join(SIGSTORE_DIR).join("trusted_root.json")).expect("root");
        let policy = |identity: &str, issuer: &str| Policy::Identity {
            identity: Matcher::regex(&exact_regex(identity)).expect("regex"),
            issuer: Matcher::regex(&exact_regex(issuer)).expect("regex"),
        };
        let v = verify::verify_bytes(
            &root,
            &bundle,
            &Artifact::Bytes(b"image".to_vec()),
            &policy(&id.subject, &id.issuer),
        )
        .expect("verifies");
        assert_eq!(v.identity, id.subject);
        assert_eq!(v.bundle_version, "0.3");
        for (subject, issuer) in [
            ("https://ci.example/aab", id.issuer.as_str()),
            (id.subject.as_str(), "https://issuer.example.evil"),
        ] {
            let err = verify::verify_bytes(
                &root,
                &bundle,
                &Artifact::Bytes(b"image".to_vec()),
                &policy(subject, issuer),
            )
            .expect_err("another signer");
            assert!(err.to_string().contains("does not match"), "{err}");
        }
        let err = verify::verify_bytes(
            &root,
            &bundle,
            &Artifact::Bytes(b"other".to_vec()),
            &policy(&id.subject, &id.issuer),
        )
        .expect_err("another image");
        assert!(err.to_string().contains("digest"), "{err}");
    }

    #[test]
    fn assign_needs_instance_and_module() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = assign(dir.path(), "i-1", "hello", false).expect_err("no instance");
        assert!(err.to_string().contains("no enrolled instance"), "{err}");
    }
}
