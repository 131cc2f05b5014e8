use std::fs;
use std::path::Path;

use super::*;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn fwcfg(root: &Path, key: &str, value: &str) {
    put(
        root,
        &format!("sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode/{key}/raw"),
        value,
    );
}

#[test]
fn cmdline_parsing_table() {
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        (
            "quiet powernode.instance_uuid=abc-1 ro",
            Some("abc-1"),
            None,
        ),
        ("powernode.id=alias-1", Some("alias-1"), None),
        (
            "powernode.id=alias powernode.instance_uuid=canon",
            Some("canon"),
            None,
        ),
        (
            "powernode.instance_uuid=canon powernode.id=alias",
            Some("canon"),
            None,
        ),
        ("powernode.instance_uuid= quiet", None, None),
        ("console=ttyS0", None, None),
        (
            "powernode.instance_uuid=\"q-1\" powernode.platform_url='https://p:8443'",
            Some("q-1"),
            Some("https://p:8443"),
        ),
    ];
    for (line, uuid, url) in cases {
        let (f, _) = parse_cmdline(line);
        assert_eq!(f.instance_uuid.as_deref(), *uuid, "{line}");
        assert_eq!(f.platform_url.as_deref(), *url, "{line}");
    }
    let (f, _) = parse_cmdline(
        "powernode.instance_uuid=x powernode.ca_pem=\"-----BEGIN CERTIFICATE-----\\nAA\\n-----END CERTIFICATE-----\" powernode.bootstrap_token=tok",
    );
    assert_eq!(
        f.ca_pem.as_deref(),
        Some("-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----")
    );
    assert_eq!(f.bootstrap_token.as_deref(), Some("tok"));
}

#[test]
fn identity_cfg_parsing() {
    let c = parse_identity_cfg(
        "# comment\n\nexport ID=\"id-9\"\nKEY='tok'\nSERVER=https://s\nCA_PEM_FILE=/boot/ca.pem\nJUNK\n",
    );
    assert_eq!(c.fields.instance_uuid.as_deref(), Some("id-9"));
    assert_eq!(c.fields.bootstrap_token.as_deref(), Some("tok"));
    assert_eq!(c.fields.platform_url.as_deref(), Some("https://s"));
    assert_eq!(c.ca_pem_file.as_deref(), Some("/boot/ca.pem"));
    let c = parse_identity_cfg("ID=\nKEY=x\n");
    assert_eq!(c.fields.instance_uuid, None, "empty ID is absent");
}

#[test]
fn nothing_found_reports_every_strategy() {
    let d = tempfile::tempdir().unwrap();
    put(d.path(), "proc/cmdline", "quiet ro\n");
    let err = resolve(&Paths::new(d.path())).unwrap_err().to_string();
    assert!(
        err.contains("kernel-cmdline: no powernode.instance_uuid"),
        "{err}"
    );
    assert!(err.contains("fw-cfg"), "{err}");
    assert!(err.contains("identity.cfg missing"), "{err}");
}

#[test]
fn precedence_cmdline_over_fwcfg_over_identity_cfg() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let paths = Paths::new(r);
    put(r, "etc/identity.cfg", "ID=from-cfg\nSERVER=https://cfg\n");
    put(r, "proc/cmdline", "quiet\n");
    let id = resolve(&paths).unwrap();
    assert_eq!(
        (id.instance_uuid.as_str(), id.source),
        ("from-cfg", Source::IdentityCfg)
    );

    fwcfg(r, "instance_uuid", "from-fwcfg\n");
    fwcfg(r, "platform_url", "https://fw:1\n");
    fwcfg(r, "instance_name", "node-a\n");
    fwcfg(r, "ca_pem", CA);
    let id = resolve(&paths).unwrap();
    assert_eq!(
        (id.instance_uuid.as_str(), id.source),
        ("from-fwcfg", Source::FwCfg)
    );
    assert_eq!(id.instance_name.as_deref(), Some("node-a"));
    assert_eq!(id.platform_url.as_deref(), Some("https://fw:1"));
    assert!(id.evidence.contains("instance_uuid/raw"));

    put(
        r,
        "proc/cmdline",
        "quiet powernode.instance_uuid=from-cmdline\n",
    );
    let id = resolve(&paths).unwrap();
    assert_eq!(
        (id.instance_uuid.as_str(), id.source),
        ("from-cmdline", Source::KernelCmdline)
    );
}

#[test]
fn persist_identity_cfg_and_ca_file_under_root() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    put(
        r,
        "persist/var/lib/powernode/identity.cfg",
        "ID=p-1\nKEY=t\nSERVER=https://s\nCA_PEM_FILE=/boot/ca.pem\n",
    );
    put(r, "boot/ca.pem", CA);
    let id = resolve(&Paths::new(r)).unwrap();
    assert_eq!(id.instance_uuid, "p-1");
    assert_eq!(id.ca_pem.as_deref(), Some(CA));
    assert!(
        id.evidence
            .contains("persist/var/lib/powernode/identity.cfg")
    );

    put(
        r,
        "persist/var/lib/powernode/identity.cfg",
        "ID=p-1\nCA_PEM_FILE=/boot/missing.pem\n",
    );
    let err = resolve(&Paths::new(r)).unwrap_err().to_string();
    assert!(err.contains("CA_PEM_FILE"), "{err}");
}

#[test]
fn bad_values_are_refused_with_the_source_named() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for (line, needle) in [
        (
            "powernode.instance_uuid=../../etc/passwd",
            "not a UUID-like identifier",
        ),
        (
            "powernode.instance_uuid=a powernode.platform_url=http://plain",
            "https://",
        ),
        (
            "powernode.instance_uuid=a powernode.ca_pem=hello",
            "not a PEM",
        ),
    ] {
        put(r, "proc/cmdline", line);
        let err = resolve(&Paths::new(r)).unwrap_err().to_string();
        assert!(err.contains(needle), "{line}: {err}");
        assert!(err.contains("kernel-cmdline"), "{err}");
    }
}

#[test]
fn cache_round_trip_is_private_and_public_view_redacts() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let paths = Paths::new(d.path());
    put(
        d.path(),
        "proc/cmdline",
        "powernode.instance_uuid=c-1 powernode.bootstrap_token=SECRET",
    );
    let id = resolve(&paths).unwrap();
    assert!(load_cached(&paths).unwrap().is_none());
    store_cached(&paths, &id).unwrap();
    assert_eq!(load_cached(&paths).unwrap().unwrap(), id);
    let mode = fs::metadata(paths.identity_json())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "group powernode-identity (enrolld) reads it");
    let public = serde_json::to_string(&id.public()).unwrap();
    assert!(!public.contains("SECRET"), "{public}");
    assert!(public.contains("<redacted>"));
    assert!(!format!("{id:?}").contains("SECRET"));
}
