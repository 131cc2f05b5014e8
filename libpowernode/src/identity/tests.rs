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

/// A real self-signed certificate and its private key, both PEM.
fn cert_and_key() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

#[test]
fn persist_identity_cfg_and_ca_file_under_root() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let (cert, _) = cert_and_key();
    put(
        r,
        "persist/var/lib/powernode/identity.cfg",
        "ID=p-1\nKEY=t\nSERVER=https://s\nCA_PEM_FILE=/persist/var/lib/powernode/ca.pem\n",
    );
    put(r, "persist/var/lib/powernode/ca.pem", &cert);
    let id = resolve(&Paths::new(r)).unwrap();
    assert_eq!(id.instance_uuid, "p-1");
    assert_eq!(id.ca_pem.as_deref(), Some(cert.as_str()));
    assert!(
        id.evidence
            .contains("persist/var/lib/powernode/identity.cfg")
    );

    // A relative name is taken from the identity.cfg's directory.
    put(
        r,
        "persist/var/lib/powernode/identity.cfg",
        "ID=p-1\nCA_PEM_FILE=ca.pem\n",
    );
    assert_eq!(
        resolve(&Paths::new(r)).unwrap().ca_pem.as_deref(),
        Some(cert.as_str())
    );

    put(
        r,
        "persist/var/lib/powernode/identity.cfg",
        "ID=p-1\nCA_PEM_FILE=/persist/var/lib/powernode/missing.pem\n",
    );
    let err = resolve(&Paths::new(r)).unwrap_err().to_string();
    assert!(
        err.contains("CA_PEM_FILE") && err.contains("missing"),
        "{err}"
    );
}

/// identityd reads root-only files, and /persist/var/lib/powernode/identity.cfg is writable by
/// its own user: `CA_PEM_FILE` must not turn that into a way to copy any file into
/// identity.json.
#[test]
fn ca_pem_file_is_read_only_beside_its_identity_cfg_and_only_certificates() {
    use std::os::unix::fs::symlink;
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let (cert, key) = cert_and_key();
    const SHADOW: &str = "root:$6$SECRETHASH:19000:0:99999:7:::\n";
    put(r, "etc/shadow", SHADOW);
    put(r, "etc/ssl/certs/other-ca.pem", &cert);
    put(r, "boot/ca.pem", &cert);
    let pn = "persist/var/lib/powernode";
    put(r, &format!("{pn}/pki/node.key"), &key);
    put(r, &format!("{pn}/combined.pem"), &format!("{cert}{key}"));
    put(
        r,
        &format!("{pn}/fake.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    put(r, &format!("{pn}/shadow-copy"), SHADOW);
    symlink(r.join("etc/shadow"), r.join(pn).join("abs-link.pem")).unwrap();
    symlink("../../../../etc/shadow", r.join(pn).join("rel-link.pem")).unwrap();
    symlink("pki", r.join(pn).join("pki-link")).unwrap();
    nix::unistd::mkfifo(
        &r.join(pn).join("fifo.pem"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    let cases: &[(&str, &str)] = &[
        ("/etc/shadow", "outside"),
        ("/etc/ssl/certs/other-ca.pem", "outside"),
        ("/boot/ca.pem", "outside"),
        ("/persist/var/lib/powernode/../../../../etc/shadow", "`..`"),
        ("../../../../etc/shadow", "`..`"),
        ("abs-link.pem", "leads out"),
        ("rel-link.pem", "leads out"),
        ("pki/node.key", "\"PRIVATE KEY\" block"),
        ("pki-link/node.key", "\"PRIVATE KEY\" block"),
        ("combined.pem", "\"PRIVATE KEY\" block"),
        ("fake.pem", "not a PEM certificate"),
        ("shadow-copy", "not a PEM certificate"),
        ("fifo.pem", "not a regular file"),
        ("/persist/var/lib/powernode", "not a file"),
    ];
    for (name, needle) in cases {
        put(
            r,
            &format!("{pn}/identity.cfg"),
            &format!("ID=p-1\nCA_PEM_FILE={name}\n"),
        );
        let err = resolve(&Paths::new(r)).unwrap_err().to_string();
        assert!(
            err.contains("identity-cfg: error")
                && err.contains("CA_PEM_FILE")
                && err.contains(needle),
            "{name}: want {needle:?} in {err}"
        );
        assert!(
            !err.contains("SECRETHASH") && !err.contains("PRIVATE KEY-----"),
            "{err}"
        );
    }

    // The same file named by the identity.cfg in its own directory is fine.
    put(
        r,
        "etc/identity.cfg",
        "ID=e-1\nCA_PEM_FILE=/etc/ssl/certs/other-ca.pem\n",
    );
    let id = resolve(&Paths::new(r)).unwrap();
    assert_eq!(
        (id.instance_uuid.as_str(), id.ca_pem.as_deref()),
        ("e-1", Some(cert.as_str()))
    );
    // /etc/shadow beside /etc/identity.cfg is still not a certificate.
    put(r, "etc/identity.cfg", "ID=e-1\nCA_PEM_FILE=/etc/shadow\n");
    let err = resolve(&Paths::new(r)).unwrap_err().to_string();
    assert!(
        err.contains("not a PEM certificate") && !err.contains("SECRETHASH"),
        "{err}"
    );
}

fn dmi(root: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(root.join("sys/class/dmi/id")).unwrap();
    for (f, v) in files {
        put(root, &format!("sys/class/dmi/id/{f}"), &format!("{v}\n"));
    }
}

/// Which clouds the firmware names, per vendor strings (ds-identify's facts).
#[test]
fn the_firmware_names_the_cloud_to_probe() {
    use super::dmi::firmware;
    const CLOUDS: [Source; 5] = [
        Source::Aws,
        Source::Gcp,
        Source::Azure,
        Source::Digitalocean,
        Source::Hetzner,
    ];
    // (DMI file, value) pairs written, clouds expected to be probed.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [Source]);
    let cases: &[Case<'_>] = &[
        (
            &[
                ("sys_vendor", "QEMU"),
                ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
            ],
            &[],
        ),
        (&[], &[]),
        (
            &[("sys_vendor", "Amazon EC2"), ("product_name", "m5.large")],
            &[Source::Aws],
        ),
        (&[("bios_vendor", "Amazon EC2")], &[Source::Aws]),
        (
            &[("sys_vendor", "Xen"), ("bios_version", "4.11.amazon")],
            &[Source::Aws],
        ),
        (
            &[
                ("sys_vendor", "Google"),
                ("product_name", "Google Compute Engine"),
            ],
            &[Source::Gcp],
        ),
        (&[("board_vendor", "Google")], &[Source::Gcp]),
        (
            &[
                ("sys_vendor", "Microsoft Corporation"),
                ("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77"),
            ],
            &[Source::Azure],
        ),
        (&[("sys_vendor", "Microsoft Corporation")], &[]),
        (
            &[("sys_vendor", "DigitalOcean"), ("product_name", "Droplet")],
            &[Source::Digitalocean],
        ),
        (
            &[("sys_vendor", "Hetzner"), ("product_name", "vServer")],
            &[Source::Hetzner],
        ),
        // Exact values, as firmware writes them: a look-alike is not the cloud.
        (&[("sys_vendor", "Hetzner Online GmbH")], &[]),
        (&[("product_name", "Not Google Compute Engine")], &[]),
    ];
    for (files, want) in cases {
        let d = tempfile::tempdir().unwrap();
        dmi(d.path(), files);
        let ctx = Ctx::new(Paths::new(d.path()), Settings::default()).unwrap();
        let fw = firmware(&ctx).unwrap().expect("a DMI directory");
        let got: Vec<Source> = CLOUDS.into_iter().filter(|s| fw.names(*s)).collect();
        assert_eq!(&got, want, "{files:?}");
    }
    let d = tempfile::tempdir().unwrap();
    let ctx = Ctx::new(Paths::new(d.path()), Settings::default()).unwrap();
    assert!(firmware(&ctx).unwrap().is_none(), "no DMI at all");
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
