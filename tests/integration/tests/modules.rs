//! Module publishing and the node-side pull + verify, on the host with real parts: Debian's
//! `docker-registry`, the development platform (`module publish` runs mkfs.erofs and
//! `fsverity digest`, signs, pushes with oci-client), a node enrolled with the CLI, and
//! `powernode-agent update` fetching and verifying in-process.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::registry::Registry;
use powernode_integration_tests::{bin, describe, require_tool, run};
use serde_json::Value;

struct Node {
    registry: Registry,
    platform: DevPlatform,
    instance: String,
    root: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Node {
    fn start() -> Result<Node> {
        for tool in ["mkfs.erofs", "fsverity"] {
            require_tool(tool)?;
        }
        let registry = Registry::start()?;
        let platform = DevPlatform::start(&[])?;
        let (root, instance) = platform.enrolled_node("pn-mod-node-")?;
        fs::create_dir_all(root.path().join("etc/powernode/trust"))?;
        let work = tempfile::Builder::new().prefix("pn-mod-work-").tempdir()?;
        let rootfs = work.path().join("rootfs");
        fs::create_dir_all(rootfs.join("usr/bin"))?;
        fs::create_dir_all(rootfs.join("etc/hello"))?;
        fs::write(rootfs.join("usr/bin/hello"), "#!/bin/sh\necho hello\n")?;
        fs::write(rootfs.join("etc/hello/big.dat"), vec![0x42u8; 300_000])?;
        fs::write(rootfs.join("etc/hello/hello.conf"), "greeting = hi\n")?;
        Ok(Node {
            registry,
            platform,
            instance,
            root,
            work,
        })
    }

    fn rootfs(&self) -> PathBuf {
        self.work.path().join("rootfs")
    }

    /// `module publish` of version 1.0.0 (+ extra flags) and `module assign`; returns what
    /// publish printed (the module record and the artifact it pushed).
    fn publish_and_assign(&self, name: &str, extra: &[&str]) -> Result<Value> {
        self.publish_version(name, "1.0.0", extra)
    }

    /// `module publish --version VERSION` (+ extra flags, its files left in `out-<name>`) and
    /// `module assign`.
    fn publish_version(&self, name: &str, version: &str, extra: &[&str]) -> Result<Value> {
        let out_dir = self.work.path().join(format!("out-{name}"));
        let mut args = vec!["--out", out_dir.to_str().context("utf-8 path")?];
        args.extend_from_slice(extra);
        let m = self
            .platform
            .publish(&self.registry.addr, name, version, &self.rootfs(), &args)?;
        self.platform.assign(&self.instance, name, &[])?;
        Ok(m)
    }

    /// `module publish --arch ARCH` of the rootfs as version 1.0.0, then `module assign`.
    fn publish_and_assign_arch(&self, name: &str, arch: &str) -> Result<Value> {
        self.publish_and_assign(name, &["--arch", arch])
    }

    /// Pin the platform's trusted root on the node (provisioning does this in production).
    fn pin_trusted_root(&self) -> Result<()> {
        self.platform.pin_trusted_root(self.root.path())
    }

    fn update(&self) -> Result<(Output, Value)> {
        let out = run(Command::new(bin("powernode-agent")?)
            .args(["update", "--json", "--root"])
            .arg(self.root.path()))?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("update output: {}", describe(&out)))?;
        Ok((out, v))
    }

    fn store(&self) -> PathBuf {
        self.root.path().join("persist/cache/modules")
    }

    /// Every file under the store (names), temporary ones included, but the signature
    /// bundles kept beside the images ([`Node::stored_bundles`]).
    fn store_entries(&self) -> Vec<String> {
        self.all_store_entries()
            .into_iter()
            .filter(|n| !n.ends_with(".sigstore.json"))
            .collect()
    }

    /// The signature bundles kept beside the images (`<hex>.<module>.sigstore.json`).
    fn stored_bundles(&self) -> Vec<String> {
        self.all_store_entries()
            .into_iter()
            .filter(|n| n.ends_with(".sigstore.json"))
            .collect()
    }

    fn all_store_entries(&self) -> Vec<String> {
        fs::read_dir(self.store())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces the node's signer policy (`etc/powernode/trust/modules.toml`).
    fn local_policy(&self, toml: &str) -> Result<()> {
        fs::write(
            self.root.path().join("etc/powernode/trust/modules.toml"),
            toml,
        )?;
        Ok(())
    }
}

fn fsverity_tool(path: &Path) -> Result<String> {
    let out = run(Command::new("fsverity").arg("digest").arg(path))?;
    ensure!(out.status.success(), "fsverity digest: {}", describe(&out));
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn published_module_is_pulled_verified_and_stored() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let image_digest = m["artifact"]["image_digest"]
        .as_str()
        .context("image_digest")?;
    let fsverity = m["artifact"]["fsverity_root_hash"]
        .as_str()
        .context("fsverity")?;

    let (out, v) = node.update()?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    let fetched = &v["modules"][0];
    ensure!(
        fetched["name"] == "hello" && fetched["image_digest"] == image_digest,
        "{v}"
    );
    ensure!(fetched["fsverity_digest"] == fsverity, "{v}");

    // The blob sits under its content address, with the right bytes.
    let hex = image_digest.trim_start_matches("sha256:");
    let stored = node.store().join(hex);
    let bytes = fs::read(&stored).with_context(|| format!("{}", stored.display()))?;
    ensure!(
        powernode::oci::sha256_hex(&bytes) == hex,
        "stored bytes differ"
    );
    ensure!(
        fsverity_tool(&stored)? == fsverity,
        "fs-verity digest differs"
    );
    ensure!(
        powernode::fsverity::format(&powernode::fsverity::digest_file(&stored)?) == fsverity,
        "userspace fs-verity digest differs from the tool's"
    );
    ensure!(
        node.store_entries() == vec![hex.to_string()],
        "{:?}",
        node.store_entries()
    );
    // The bundle is kept beside the image: every mount checks the image again offline.
    ensure!(
        node.stored_bundles() == vec![format!("{hex}.hello.sigstore.json")],
        "{:?}",
        node.stored_bundles()
    );

    // The --out artifacts verify with the CLI verifier.
    let out_dir = node.work.path().join("out-hello");
    let out = run(Command::new(bin("powernode-agent")?)
        .arg("verify")
        .arg(out_dir.join("image.erofs"))
        .arg("--bundle")
        .arg(out_dir.join("bundle.sigstore.json"))
        .arg("--key")
        .arg(out_dir.join("signing.pub"))
        .arg("--trusted-root")
        .arg(out_dir.join("trusted_root.json")))?;
    ensure!(out.status.code() == Some(0), "verify: {}", describe(&out));
    // And by digest only.
    let out = run(Command::new(bin("powernode-agent")?)
        .arg("verify")
        .arg(image_digest)
        .arg("--bundle")
        .arg(out_dir.join("bundle.sigstore.json"))
        .arg("--key")
        .arg(out_dir.join("signing.pub"))
        .arg("--trusted-root")
        .arg(out_dir.join("trusted_root.json")))?;
    ensure!(
        out.status.code() == Some(0),
        "verify digest: {}",
        describe(&out)
    );

    // A second update finds the blob already in place and succeeds again.
    let (out, _) = node.update()?;
    ensure!(out.status.success(), "second update: {}", describe(&out));

    // A new version of the same module (same id) replaces the assignment's artifact.
    fs::write(
        node.rootfs().join("etc/hello/hello.conf"),
        "greeting = hello\n",
    )?;
    let rootfs = node.rootfs();
    let m2 = node
        .platform
        .publish(&node.registry.addr, "hello", "1.1.0", &rootfs, &[])?;
    ensure!(m2["id"] == m["id"] && m2["version_number"] == 2, "{m2}");
    let d2 = m2["artifact"]["image_digest"].as_str().context("digest")?;
    ensure!(d2 != image_digest, "a changed tree gives a new image");
    let (out, v) = node.update()?;
    ensure!(out.status.success(), "update to 1.1.0: {}", describe(&out));
    ensure!(v["modules"][0]["image_digest"] == d2, "{v}");
    ensure!(
        node.store()
            .join(d2.trim_start_matches("sha256:"))
            .is_file(),
        "new image stored"
    );
    Ok(())
}

#[test]
fn tampered_blob_in_the_registry_is_refused_and_nothing_is_stored() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let digest = m["artifact"]["image_digest"].as_str().context("digest")?;
    let blob = node.registry.blob_path(digest)?;
    let mut bytes = fs::read(&blob)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&blob, &bytes)?;

    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("verification failed") && err.to_lowercase().contains("digest"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );
    Ok(())
}

#[test]
fn truncated_blob_in_the_registry_is_refused() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let digest = m["artifact"]["image_digest"].as_str().context("digest")?;
    let blob = node.registry.blob_path(digest)?;
    let bytes = fs::read(&blob)?;
    fs::write(&blob, &bytes[..bytes.len() - 100])?;
    let (out, _) = node.update()?;
    ensure!(out.status.code() != Some(0), "update: {}", describe(&out));
    let hex = digest.trim_start_matches("sha256:");
    ensure!(
        node.store_entries() == vec![format!(".{hex}.partial")],
        "only the partial download may stay: {:?}",
        node.store_entries()
    );
    // The registry heals; the next pull resumes from the bytes it already has.
    fs::write(&blob, &bytes)?;
    let (out, _) = node.update()?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("resuming an earlier partial download"),
        "{}",
        describe(&out)
    );
    ensure!(
        node.store_entries() == vec![hex.to_string()],
        "{:?}",
        node.store_entries()
    );
    Ok(())
}

/// Point the platform's record of `module` at another registry address (a proxy in front of
/// the same registry).
fn set_artifact_registry(node: &Node, module_id: &str, addr: &str) -> Result<()> {
    let store: Value = serde_json::from_slice(&fs::read(node.platform.state.join("store.json"))?)?;
    let old = store["modules"][module_id]["index"]["ref"]
        .as_str()
        .context("ref")?;
    set_artifact_field(
        node,
        module_id,
        "ref",
        &old.replacen(&node.registry.addr, addr, 1),
    )
}

/// A network that cuts every connection after 1 MiB: a 3 MiB module still arrives, by ranged
/// resumption, intact.
#[test]
fn an_interrupted_download_resumes() -> Result<()> {
    let node = Node::start()?;
    let mut x: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    fs::write(node.rootfs().join("etc/hello/noise.bin"), &noise)?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let proxy =
        powernode_integration_tests::registry::CuttingProxy::start(&node.registry.addr, 1 << 20)?;
    set_artifact_registry(&node, m["id"].as_str().context("id")?, &proxy.addr)?;
    let (out, v) = node.update()?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    let cuts = proxy.cuts.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(cuts >= 2, "the proxy cut only {cuts} connections");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("download interrupted; resuming"),
        "{}",
        describe(&out)
    );
    let hex = m["artifact"]["image_digest"]
        .as_str()
        .context("digest")?
        .trim_start_matches("sha256:");
    let stored = fs::read(node.store().join(hex))?;
    ensure!(
        powernode::oci::sha256_hex(&stored) == hex,
        "stored bytes differ"
    );
    ensure!(
        v["modules"][0]["image_digest"] == m["artifact"]["image_digest"],
        "{v}"
    );
    Ok(())
}

#[test]
fn another_key_in_the_trust_policy_is_refused() -> Result<()> {
    let node = Node::start()?;
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let other_pem = node.work.path().join("other.pub");
    fs::write(&other_pem, other.public_key_pem())?;
    node.publish_and_assign(
        "hello",
        &["--policy-key", other_pem.to_str().context("utf-8")?],
    )?;
    node.pin_trusted_root()?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    // The node's own policy allows only the platform's signing key: a platform policy naming
    // another key is refused before anything is fetched, saying why.
    ensure!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("names a public key the node's signer policy does not allow"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );

    // The same bundle with the other key through the verify CLI: exit 2 too.
    let out_dir = node.work.path().join("out-hello");
    let out = run(Command::new(bin("powernode-agent")?)
        .arg("verify")
        .arg(out_dir.join("image.erofs"))
        .arg("--bundle")
        .arg(out_dir.join("bundle.sigstore.json"))
        .arg("--key")
        .arg(&other_pem)
        .arg("--trusted-root")
        .arg(out_dir.join("trusted_root.json")))?;
    ensure!(out.status.code() == Some(2), "verify: {}", describe(&out));
    Ok(())
}

/// The platform's trust policy names the real signer, but the node's own policy allows only
/// another key: the node's policy decides, the module is refused and nothing is fetched.
#[test]
fn the_platform_cannot_widen_the_node_signer_policy() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    ensure!(m["trust_policy"]["public_key"].is_string(), "{m}");
    node.pin_trusted_root()?;
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    node.local_policy(&format!(
        "[[signer]]\nmodules = [\"hello\"]\npublic_key = \"\"\"\n{}\"\"\"\n",
        other.public_key_pem()
    ))?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("verification failed for module hello")
            && err.contains("names a public key the node's signer policy does not allow"),
        "{v}"
    );
    ensure!(
        node.all_store_entries().is_empty(),
        "store: {:?}",
        node.all_store_entries()
    );
    Ok(())
}

#[test]
fn missing_policy_or_trusted_root_is_refused() -> Result<()> {
    let node = Node::start()?;
    node.publish_and_assign("hello", &["--no-policy"])?;
    node.pin_trusted_root()?;
    // No signer policy on the node: the platform's word (here: none) is not enough.
    fs::remove_file(node.root.path().join("etc/powernode/trust/modules.toml"))?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    ensure!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the node's signer policy allows nobody to sign this module"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );

    // A local policy (the platform's key pinned on the node) makes it acceptable.
    fs::create_dir_all(node.root.path().join("etc/powernode/trust/modules"))?;
    fs::copy(
        node.platform.state.join("sigstore/signing.pub"),
        node.root
            .path()
            .join("etc/powernode/trust/modules/hello.pub"),
    )?;
    let (out, _) = node.update()?;
    ensure!(
        out.status.success(),
        "update with a local policy: {}",
        describe(&out)
    );

    // Without the pinned trusted root: refused.
    fs::remove_file(
        node.root
            .path()
            .join("etc/powernode/trust/trusted_root.json"),
    )?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    ensure!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("trusted root"),
        "{v}"
    );
    Ok(())
}

#[test]
fn bundle_with_a_wrong_signature_is_refused() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let id = m["id"].as_str().context("id")?;
    // Replace the platform's bundle for this module with one whose signature is altered.
    let path = node
        .platform
        .state
        .join("modules")
        .join(id)
        .join("bundle-amd64.sigstore.json");
    let mut b: Value = serde_json::from_slice(&fs::read(&path)?)?;
    let sig = b["messageSignature"]["signature"]
        .as_str()
        .context("signature")?
        .to_string();
    // Flip one base64 character in the middle (still valid base64, different DER bytes).
    let mut chars: Vec<char> = sig.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    b["messageSignature"]["signature"] = Value::String(chars.into_iter().collect());
    fs::write(&path, serde_json::to_vec(&b)?)?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    ensure!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("verification failed"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );
    Ok(())
}

/// A module whose manifest.yaml breaks the upstream schema or escapes its tree is refused before
/// its image is downloaded; an upstream manifest (log-forwarder's) is accepted as is.
#[test]
fn module_manifest_is_validated_before_the_image_is_pulled() -> Result<()> {
    let node = Node::start()?;
    let manifest = node.rootfs().join("manifest.yaml");
    fs::write(
        &manifest,
        "schema_version: 1\nname: hello\nsecurity:\n  seccomp_profile: ../../etc/shadow\n",
    )?;
    node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("manifest") && err.contains("seccomp_profile"),
        "{v}"
    );
    ensure!(node.store_entries().is_empty(), "image pulled anyway");

    let upstream = powernode_integration_tests::workspace_root()
        .join("tests/fixtures/upstream-modules/modules/powernode-log-forwarder/manifest.yaml");
    fs::copy(&upstream, &manifest)?;
    node.publish_and_assign("powernode-log-forwarder", &[])?;
    // `hello` is still assigned and still refused; the upstream module passes beside it.
    let (out, _) = node.update()?;
    ensure!(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .any(|l| l.contains("module verified") && l.contains("powernode-log-forwarder")),
        "update: {}",
        describe(&out)
    );
    ensure!(
        node.store_entries().len() == 1,
        "{:?}",
        node.store_entries()
    );
    Ok(())
}

/// Without a system bus (no mountd), `attach` still fetches and verifies in-process and says
/// that nothing was mounted; `detach` and `sync` need mountd and fail with the mount code 3.
#[test]
fn attach_without_mountd_verifies_only_and_detach_fails_clearly() -> Result<()> {
    let node = Node::start()?;
    node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let no_bus = format!("unix:path={}/no-bus", node.work.path().display());
    let cli = |args: &[&str]| -> Result<(Output, Value)> {
        let out = run(Command::new(bin("powernode-agent")?)
            .args(args)
            .args(["--json", "--root"])
            .arg(node.root.path())
            .env("DBUS_SYSTEM_BUS_ADDRESS", &no_bus))?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{args:?}: {}", describe(&out)))?;
        Ok((out, v))
    };
    let (out, v) = cli(&["attach", "hello"])?;
    ensure!(out.status.success(), "attach: {}", describe(&out));
    ensure!(v["mounted"] == false, "{v}");
    ensure!(
        v["note"].as_str().unwrap_or("").contains("no system bus"),
        "{v}"
    );
    ensure!(
        node.store_entries().len() == 1,
        "{:?}",
        node.store_entries()
    );
    for args in [&["detach", "hello"][..], &["sync"][..]] {
        let (out, v) = cli(args)?;
        ensure!(out.status.code() == Some(3), "{args:?}: {}", describe(&out));
        ensure!(
            v["error"].as_str().unwrap_or("").contains("system bus"),
            "{v}"
        );
    }
    Ok(())
}

/// One HTTP/1.1 exchange with the loopback registry; returns (status line, body).
fn registry_http(registry: &str, head: &str, body: &[u8]) -> Result<(String, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(registry)?;
    write!(
        s,
        "{head}\r\nHost: {registry}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let status = String::from_utf8_lossy(&resp[..split])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((status, resp[split + 4..].to_vec()))
}

/// Point the platform's record of `module` at another manifest or index digest. Atomic
/// replace: the server re-reads the store under its lock on every request.
fn set_artifact_digest(node: &Node, module_id: &str, digest: &str) -> Result<()> {
    set_artifact_field(node, module_id, "digest", digest)
}

/// Set one field of what the platform hands out for `module_id` (its index record).
fn set_artifact_field(node: &Node, module_id: &str, field: &str, value: &str) -> Result<()> {
    let path = node.platform.state.join("store.json");
    let mut store: Value = serde_json::from_slice(&fs::read(&path)?)?;
    store["modules"][module_id]["index"][field] = Value::String(value.to_string());
    let tmp = path.with_extension("json.test-tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&store)?)?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

/// The platform publishes one image index per version: the node takes the manifest for its
/// own architecture (the amd64 image, not the arm64 one published beside it, whichever came
/// first), and a version published only for another architecture is refused.
#[test]
fn an_image_index_resolves_to_the_node_architecture() -> Result<()> {
    ensure!(
        powernode::architecture() == "amd64",
        "this test publishes for amd64"
    );
    let node = Node::start()?;
    fs::write(node.rootfs().join("etc/hello/arch"), "amd64\n")?;
    let amd = node.publish_and_assign_arch("hello", "amd64")?;
    fs::write(node.rootfs().join("etc/hello/arch"), "arm64\n")?;
    let both = node.publish_and_assign_arch("hello", "arm64")?;
    node.pin_trusted_root()?;
    ensure!(both["id"] == amd["id"], "one module: {both}");
    ensure!(
        both["artifacts"]["amd64"] == amd["artifact"]
            && both["artifacts"]["arm64"] == both["artifact"],
        "both architectures are current: {both}"
    );

    // What the registry holds under the version's tag is an index of both.
    let index_ref = both["index"]["ref"].as_str().context("index ref")?;
    ensure!(index_ref.ends_with(":1.0.0"), "{index_ref}");
    let repo = index_ref
        .split_once('/')
        .and_then(|(_, r)| r.rsplit_once(':'))
        .map(|(r, _)| r)
        .context("repository")?;
    let (status, body) = registry_http(
        &node.registry.addr,
        &format!(
            "GET /v2/{repo}/manifests/1.0.0 HTTP/1.1\r\nAccept: application/vnd.oci.image.index.v1+json"
        ),
        b"",
    )?;
    ensure!(status.contains(" 200 "), "GET index: {status}");
    ensure!(
        format!("sha256:{}", powernode::oci::sha256_hex(&body)) == both["index"]["digest"],
        "the recorded index digest is the registry's"
    );
    let index: Value = serde_json::from_slice(&body)?;
    let platforms: Vec<(String, String)> = index["manifests"]
        .as_array()
        .context("manifests")?
        .iter()
        .map(|e| {
            (
                e["platform"]["architecture"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let digest_of = |arch: &str| {
        both["artifacts"][arch]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        platforms
            == vec![
                ("amd64".into(), digest_of("amd64")),
                ("arm64".into(), digest_of("arm64"))
            ],
        "{index}"
    );

    let (out, v) = node.update()?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    let got = &v["modules"][0];
    ensure!(
        got["image_digest"] == amd["artifact"]["image_digest"]
            && got["manifest_digest"] == amd["artifact"]["digest"],
        "picked the wrong manifest: {v}"
    );

    // A version published for arm64 only: its index has no manifest for this node.
    node.publish_version("hello", "2.0.0-arm-only", &["--arch", "arm64"])?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("no manifest for linux/amd64") && err.contains("linux/arm64"),
        "{v}"
    );
    Ok(())
}

const CI_IDENTITY: &str =
    "https://ci.example/acme/hello/.github/workflows/release.yml@refs/heads/main";
const CI_ISSUER: &str = "https://token.actions.example";

/// `powernode-agent verify` of the `--out` files of module `name` with an identity policy.
fn verify_keyless(node: &Node, name: &str, identity: &str, issuer: &str) -> Result<Output> {
    let out_dir = node.work.path().join(format!("out-{name}"));
    run(Command::new(bin("powernode-agent")?)
        .arg("verify")
        .arg(out_dir.join("image.erofs"))
        .arg("--bundle")
        .arg(out_dir.join("bundle.sigstore.json"))
        .args(["--certificate-identity", identity])
        .args(["--certificate-oidc-issuer", issuer])
        .arg("--trusted-root")
        .arg(out_dir.join("trusted_root.json")))
}

/// Keyless publishing: an ephemeral key with a Fulcio-style certificate for the CI identity;
/// the platform's trust policy names that identity and issuer, and the node accepts the module
/// through the CA, the embedded SCT and the logged entry of the pinned trusted root.
#[test]
fn keyless_module_is_pulled_and_verified_by_identity() -> Result<()> {
    let node = Node::start()?;
    let m =
        node.publish_and_assign("hello", &["--identity", CI_IDENTITY, "--issuer", CI_ISSUER])?;
    let tp = &m["trust_policy"];
    ensure!(
        tp["cosign_identity_regexp"]
            .as_str()
            .is_some_and(|r| r.starts_with('^') && r.ends_with('$') && r.contains(r"\.")),
        "{m}"
    );
    ensure!(
        tp["cosign_issuer_regexp"] == r"^https://token\.actions\.example$",
        "{m}"
    );
    ensure!(tp.get("public_key").is_none(), "{m}");
    node.pin_trusted_root()?;
    node.platform.allow_keyless(
        node.root.path(),
        r"^https://ci\.example/",
        r"^https://token\.actions\.example$",
    )?;

    let (out, v) = node.update()?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    let fetched = &v["modules"][0];
    ensure!(fetched["name"] == "hello", "{v}");
    ensure!(fetched["signer"] == CI_IDENTITY, "{v}");
    ensure!(
        fetched["image_digest"] == m["artifact"]["image_digest"],
        "{v}"
    );
    ensure!(
        node.store_entries().len() == 1,
        "{:?}",
        node.store_entries()
    );
    Ok(())
}

/// The `--out` files of a keyless publish verify with the CLI for the right identity and
/// issuer only, saying which one differs otherwise.
#[test]
fn keyless_out_files_verify_only_for_the_signer() -> Result<()> {
    let node = Node::start()?;
    node.publish_and_assign("hello", &["--identity", CI_IDENTITY, "--issuer", CI_ISSUER])?;
    let out_dir = node.work.path().join("out-hello");
    let bundle: Value = serde_json::from_slice(&fs::read(out_dir.join("bundle.sigstore.json"))?)?;
    ensure!(
        bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
            && bundle["verificationMaterial"]["certificate"]["rawBytes"].is_string(),
        "{bundle}"
    );
    let root: Value = serde_json::from_slice(&fs::read(out_dir.join("trusted_root.json"))?)?;
    ensure!(
        root["certificateAuthorities"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
            && root["ctlogs"].as_array().is_some_and(|a| a.len() == 1),
        "{root}"
    );

    let out = verify_keyless(&node, "hello", CI_IDENTITY, CI_ISSUER)?;
    ensure!(out.status.code() == Some(0), "verify: {}", describe(&out));

    let out = verify_keyless(&node, "hello", "https://ci.example/evil", CI_ISSUER)?;
    ensure!(
        out.status.code() == Some(2),
        "other identity: {}",
        describe(&out)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("identity does not match"),
        "other identity: {}",
        describe(&out)
    );

    let out = verify_keyless(&node, "hello", CI_IDENTITY, "https://accounts.example")?;
    ensure!(
        out.status.code() == Some(2),
        "other issuer: {}",
        describe(&out)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("OIDC issuer does not match"),
        "other issuer: {}",
        describe(&out)
    );
    Ok(())
}

/// Signed keyless by A while the platform's trust policy expects B: refused, nothing stored.
#[test]
fn keyless_module_of_another_identity_is_refused() -> Result<()> {
    let node = Node::start()?;
    node.publish_and_assign(
        "hello",
        &[
            "--identity",
            "https://ci.example/a",
            "--issuer",
            CI_ISSUER,
            "--policy-identity",
            r"^https://ci\.example/b$",
        ],
    )?;
    node.pin_trusted_root()?;
    node.platform.allow_keyless(
        node.root.path(),
        r"^https://ci\.example/",
        r"^https://token\.actions\.example$",
    )?;
    let (out, v) = node.update()?;
    ensure!(out.status.code() == Some(2), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("verification failed") && err.contains("identity does not match"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );
    Ok(())
}

/// A registry that is down, and an artifact whose image layer has the wrong media type: each a
/// clear error, nothing stored.
#[test]
fn registry_down_and_wrong_media_type_are_clear_errors() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello", &[])?;
    node.pin_trusted_root()?;
    let id = m["id"].as_str().context("id")?;

    // Nothing listens on port 9 of loopback (discard, not served here).
    set_artifact_registry(&node, id, "127.0.0.1:9")?;
    let (out, v) = node.update()?;
    ensure!(!out.status.success(), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("127.0.0.1:9") && err.to_lowercase().contains("connection refused"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "{:?}",
        node.store_entries()
    );
    let reference = m["index"]["ref"].as_str().context("ref")?;
    set_artifact_field(&node, id, "ref", reference)?;

    // The same artifact with the image layer's media type changed.
    let repo = reference
        .split_once('/')
        .map(|(_, r)| r)
        .and_then(|r| r.rsplit_once(':'))
        .map(|(r, _)| r)
        .context("repository")?;
    let digest = m["artifact"]["digest"].as_str().context("digest")?;
    let (status, body) = registry_http(
        &node.registry.addr,
        &format!(
            "GET /v2/{repo}/manifests/{digest} HTTP/1.1\r\nAccept: application/vnd.oci.image.manifest.v1+json"
        ),
        b"",
    )?;
    ensure!(status.contains(" 200 "), "{status}");
    let mut manifest: Value = serde_json::from_slice(&body)?;
    for layer in manifest["layers"].as_array_mut().context("layers")? {
        if layer["mediaType"] == "application/vnd.powernode.module.erofs.v1" {
            layer["mediaType"] = Value::String("application/vnd.oci.image.layer.v1.tar".into());
        }
    }
    let bytes = serde_json::to_vec(&manifest)?;
    let (status, _) = registry_http(
        &node.registry.addr,
        &format!(
            "PUT /v2/{repo}/manifests/wrong-type HTTP/1.1\r\nContent-Type: application/vnd.oci.image.manifest.v1+json"
        ),
        &bytes,
    )?;
    ensure!(status.contains(" 201 "), "{status}");
    set_artifact_digest(
        &node,
        id,
        &format!("sha256:{}", powernode::oci::sha256_hex(&bytes)),
    )?;
    let (out, v) = node.update()?;
    ensure!(!out.status.success(), "update: {}", describe(&out));
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("application/vnd.powernode.module.erofs.v1"),
        "{v}"
    );
    ensure!(
        node.store_entries().is_empty(),
        "{:?}",
        node.store_entries()
    );
    Ok(())
}
