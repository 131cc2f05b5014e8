//! The identity cascade's local sources on fixture trees (tests/fixtures/identity): kernel
//! command line, fw-cfg, KubeVirt config drives (NoCloud and config-2), vSphere guestinfo through
//! a fake `vmware-rpctool`, DMI, identity.cfg — each alone, then stacked to check precedence; and
//! the enrolled-node rule (PKI present: no network discovery, never another instance).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use powernode::identity::{self, Ctx, Settings, Source};
use powernode::paths::Paths;
use powernode_integration_tests::metadata::{Cloud, FakeMetadata, UserData};
use powernode_integration_tests::{run_ok, workspace_root};

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures/identity").join(name)
}

/// A temporary node root made of the named fixture trees (later trees add to earlier ones).
fn node(trees: &[&str]) -> tempfile::TempDir {
    let root = tempfile::Builder::new().prefix("pn-id-").tempdir().unwrap();
    for t in trees {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", fixture(t).display()))
                .arg(root.path()),
        )
        .unwrap();
    }
    root
}

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

/// A fake guestinfo tool: answers `info-get guestinfo.powernode.userdata[.encoding]` from files
/// next to it, exits 1 "No value found" otherwise (what vmware-rpctool does).
fn fake_rpctool(dir: &Path, userdata: Option<&str>, encoding: Option<&str>) -> PathBuf {
    let tool = dir.join("vmware-rpctool");
    let mut script = String::from("#!/bin/sh\ncase \"$1\" in\n");
    if let Some(u) = userdata {
        fs::write(dir.join("userdata"), u).unwrap();
        script.push_str(&format!(
            "\"info-get guestinfo.powernode.userdata\") cat '{}' ;;\n",
            dir.join("userdata").display()
        ));
    }
    if let Some(e) = encoding {
        script.push_str(&format!(
            "\"info-get guestinfo.powernode.userdata.encoding\") echo '{e}' ;;\n"
        ));
    }
    script.push_str("*) echo 'No value found' >&2; exit 1 ;;\nesac\n");
    fs::write(&tool, script).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    tool
}

/// Point the node's vSphere strategy at `tool` (a drop-in, so fixture agent.toml files stay).
fn use_tool(root: &Path, tool: &Path) {
    put(
        root,
        "etc/powernode/agent.toml.d/50-vsphere.toml",
        &format!("[identity]\nvsphere_command = [\"{}\"]\n", tool.display()),
    );
}

fn no_tool(root: &Path) {
    put(
        root,
        "etc/powernode/agent.toml.d/50-vsphere.toml",
        "[identity]\nvsphere_command = [\"/nonexistent/vmware-rpctool\"]\n",
    );
}

fn resolve(root: &Path) -> powernode::Result<identity::Identity> {
    identity::resolve(&Paths::new(root))
}

/// Fixture tree, source, instance UUID, token, platform URL.
type Case = (
    &'static str,
    Source,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);
/// The source expected to win, and how to remove it from the node.
type Peel<'a> = (Source, &'a dyn Fn(&Path));

#[test]
fn each_local_source_alone() {
    let cases: &[Case] = &[
        (
            "cmdline",
            Source::KernelCmdline,
            "11111111-1111-4111-8111-111111111111",
            Some("tok-cmdline"),
            Some("https://cmdline.example"),
        ),
        (
            "fw-cfg",
            Source::FwCfg,
            "22222222-2222-4222-8222-222222222222",
            Some("tok-fwcfg"),
            Some("https://fwcfg.example"),
        ),
        (
            "dmi",
            Source::Dmi,
            "33333333-3333-4333-8333-333333333333",
            None,
            Some("https://dmi.example"),
        ),
        (
            "nocloud",
            Source::Kubevirt,
            "44444444-4444-4444-8444-444444444444",
            Some("tok-nocloud"),
            Some("https://kubevirt.example"),
        ),
        (
            "config-2",
            Source::Kubevirt,
            "55555555-5555-4555-8555-555555555555",
            Some("tok-config2"),
            None,
        ),
        (
            "identity-cfg",
            Source::IdentityCfg,
            "66666666-6666-4666-8666-666666666666",
            Some("tok-cfg"),
            Some("https://cfg.example"),
        ),
    ];
    for (tree, source, uuid, token, url) in cases {
        let root = node(&[tree]);
        no_tool(root.path());
        let id = resolve(root.path()).unwrap_or_else(|e| panic!("{tree}: {e}"));
        assert_eq!(id.source, *source, "{tree}");
        assert_eq!(id.instance_uuid, *uuid, "{tree}");
        assert_eq!(id.bootstrap_token.as_deref(), *token, "{tree}");
        assert_eq!(id.platform_url.as_deref(), *url, "{tree}");
        assert!(
            id.evidence.contains(&root.path().display().to_string()),
            "{tree}: evidence names the file: {}",
            id.evidence
        );
    }
    let root = node(&["fw-cfg"]);
    assert_eq!(
        resolve(root.path()).unwrap().instance_name.as_deref(),
        Some("node-fw")
    );
    let root = node(&["nocloud"]);
    no_tool(root.path());
    assert!(
        resolve(root.path())
            .unwrap()
            .evidence
            .contains("config-drive/user-data (json)")
    );
}

#[test]
fn precedence_over_every_local_source() {
    let tools = tempfile::tempdir().unwrap();
    let tool = fake_rpctool(
        tools.path(),
        Some("ID=77777777-7777-4777-8777-777777777777\nKEY=tok-vsphere\n"),
        None,
    );
    let root = node(&["identity-cfg", "dmi", "nocloud", "fw-cfg", "cmdline"]);
    let r = root.path();
    use_tool(r, &tool);
    // Peel sources off from the top: each time the next one in the cascade order wins.
    let order: &[Peel<'_>] = &[
        (Source::KernelCmdline, &|r| {
            fs::remove_file(r.join("proc/cmdline")).unwrap()
        }),
        (Source::FwCfg, &|r| {
            fs::remove_dir_all(r.join("sys/firmware")).unwrap()
        }),
        (Source::Kubevirt, &|r| {
            fs::remove_dir_all(r.join("run/powernode/config-drive")).unwrap()
        }),
        (Source::Vsphere, &|r| no_tool(r)),
        (Source::Dmi, &|r| {
            fs::remove_dir_all(r.join("sys/class/dmi")).unwrap()
        }),
        (Source::IdentityCfg, &|r| {
            fs::remove_file(r.join("etc/identity.cfg")).unwrap()
        }),
    ];
    for (source, peel) in order {
        let id = resolve(r).unwrap();
        assert_eq!(id.source, *source);
        peel(r);
    }
    let err = resolve(r).unwrap_err().to_string();
    assert!(err.contains("no identity source matched"), "{err}");
    assert!(
        err.contains("claim: not probed (offline resolution)"),
        "{err}"
    );
}

#[test]
fn vsphere_guestinfo_through_the_tool() {
    let tools = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();

    let tool = fake_rpctool(
        tools.path(),
        Some(r#"{"instance_uuid":"v-1","bootstrap_token":"t"}"#),
        None,
    );
    use_tool(r, &tool);
    let id = resolve(r).unwrap();
    assert_eq!(
        (id.source, id.instance_uuid.as_str()),
        (Source::Vsphere, "v-1")
    );
    assert_eq!(
        id.evidence,
        "vsphere: guestinfo.powernode.userdata via guestinfo (json)"
    );

    // base64 with the encoding key (Ignition's convention).
    let tool = fake_rpctool(tools.path(), Some("SUQ9di0yCktFWT10Cg==\n"), Some("base64"));
    use_tool(r, &tool);
    assert_eq!(resolve(r).unwrap().instance_uuid, "v-2");

    let tool = fake_rpctool(tools.path(), Some("not base64!!"), Some("base64"));
    use_tool(r, &tool);
    let err = resolve(r).unwrap_err().to_string();
    assert!(
        err.contains("vsphere: error") && err.contains("not base64"),
        "{err}"
    );

    // Unset key: absent, with the tool's own words.
    let tool = fake_rpctool(tools.path(), None, None);
    use_tool(r, &tool);
    let err = resolve(r).unwrap_err().to_string();
    assert!(err.contains("No value found"), "{err}");

    // A tool that hangs is killed after the probe timeout.
    let hang = tools.path().join("hang");
    fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
    fs::set_permissions(&hang, fs::Permissions::from_mode(0o755)).unwrap();
    use_tool(r, &hang);
    let start = Instant::now();
    let err = resolve(r).unwrap_err().to_string();
    assert!(err.contains("did not exit within 1500 ms"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    no_tool(r);
    let err = resolve(r).unwrap_err().to_string();
    assert!(
        err.contains("vsphere: /nonexistent/vmware-rpctool not installed"),
        "{err}"
    );
}

#[test]
fn dmi_needs_a_platform_and_a_real_uuid() {
    let root = node(&["dmi"]);
    let r = root.path();
    no_tool(r);
    fs::remove_file(r.join("etc/powernode/agent.toml")).unwrap();
    let err = resolve(r).unwrap_err().to_string();
    assert!(err.contains("no [platform] url is configured"), "{err}");

    put(
        r,
        "etc/powernode/agent.toml",
        "[platform]\nurl = \"https://dmi.example\"\n",
    );
    for placeholder in [
        "00000000-0000-0000-0000-000000000000",
        "03000200-0400-0500-0006-000700080009",
    ] {
        put(r, "sys/class/dmi/id/product_uuid", placeholder);
        let err = resolve(r).unwrap_err().to_string();
        assert!(err.contains("missing or a placeholder"), "{err}");
    }
    put(r, "sys/class/dmi/id/product_uuid", "Not Settable\n");
    let err = resolve(r).unwrap_err().to_string();
    assert!(
        err.contains("dmi: error") && err.contains("not a UUID"),
        "{err}"
    );
    // Uppercase firmware values are normalised.
    put(
        r,
        "sys/class/dmi/id/product_uuid",
        "4C4C4544-0042-3510-8052-B4C04F564433\n",
    );
    assert_eq!(
        resolve(r).unwrap().instance_uuid,
        "4c4c4544-0042-3510-8052-b4c04f564433"
    );
}

#[test]
fn identity_cfg_quotes_export_and_bad_values() {
    let root = node(&["identity-cfg"]);
    let r = root.path();
    no_tool(r);
    let id = resolve(r).unwrap();
    assert_eq!(id.instance_name.as_deref(), Some("node-cfg"));
    for (cfg, needle) in [
        ("ID='bad id with spaces'\n", "not a UUID-like identifier"),
        ("ID=ok\nSERVER=http://plain\n", "https://"),
        (
            "ID=ok\nCA_PEM_FILE=/etc/missing.pem\n",
            "CA_PEM_FILE /etc/missing.pem: ",
        ),
        // Only beside the identity.cfg that names it.
        (
            "ID=ok\nCA_PEM_FILE=/boot/ca.pem\n",
            "CA_PEM_FILE /boot/ca.pem: outside",
        ),
    ] {
        put(r, "etc/identity.cfg", cfg);
        let err = resolve(r).unwrap_err().to_string();
        assert!(
            err.contains("identity-cfg: error") && err.contains(needle),
            "{cfg}: {err}"
        );
    }
    fs::write(r.join("etc/identity.cfg"), b"ID=\xff\xfe\n").unwrap();
    let err = resolve(r).unwrap_err().to_string();
    assert!(err.contains("not UTF-8"), "{err}");
}

fn write_pki(root: &Path, instance: &str) {
    let pki = root.join("persist/var/lib/powernode/pki");
    fs::create_dir_all(&pki).unwrap();
    fs::write(
        pki.join("meta.json"),
        format!(r#"{{"instance_id":"{instance}","mtls_subject":"{instance}","platform_url":"https://enrolled.example"}}"#),
    )
    .unwrap();
    for f in ["node.key", "node.crt", "ca-chain.crt"] {
        fs::write(pki.join(f), "x").unwrap();
    }
    fs::write(
        pki.join("ca-bundle.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
}

fn ctx(root: &Path, url: &str) -> Ctx {
    let settings = Settings {
        metadata_url: url.into(),
        vsphere_command: Vec::new(),
        ..Settings::default()
    };
    Ctx::new(Paths::new(root), settings).unwrap()
}

#[tokio::test]
async fn enrolled_nodes_never_rerun_network_discovery() {
    let fake = FakeMetadata::start(
        Cloud::Aws,
        UserData::Body(br#"{"instance_uuid":"someone-else"}"#.to_vec()),
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_pki(r, "enrolled-1");

    // Nothing local names the node: rebuilt from the PKI, no request to the metadata service.
    let id = identity::obtain(&ctx(r, fake.url())).await.unwrap();
    assert_eq!(
        (id.source, id.instance_uuid.as_str()),
        (Source::Pki, "enrolled-1")
    );
    assert_eq!(id.platform_url.as_deref(), Some("https://enrolled.example"));
    assert!(id.bootstrap_token.is_none());
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    // …and cached, 0600.
    let cached = identity::load_cached(&Paths::new(r)).unwrap().unwrap();
    assert_eq!(cached, id);
    let mode = fs::metadata(r.join("run/powernode/identity/identity.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    // The cache wins on the next start.
    put(r, "proc/cmdline", "powernode.instance_uuid=enrolled-1");
    assert_eq!(
        identity::obtain(&ctx(r, fake.url())).await.unwrap().source,
        Source::Pki
    );

    // Without the cache (a reboot), a local source naming the enrolled instance keeps its source;
    // one naming another instance does not take over the enrolled node.
    fs::remove_file(r.join("run/powernode/identity/identity.json")).unwrap();
    assert_eq!(
        identity::obtain(&ctx(r, fake.url())).await.unwrap().source,
        Source::KernelCmdline
    );
    fs::remove_file(r.join("run/powernode/identity/identity.json")).unwrap();
    put(r, "proc/cmdline", "powernode.instance_uuid=impostor");
    let id = identity::obtain(&ctx(r, fake.url())).await.unwrap();
    assert_eq!(
        (id.source, id.instance_uuid.as_str()),
        (Source::Pki, "enrolled-1")
    );
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());

    // Not enrolled: the full cascade runs (and reaches the fake).
    let fresh = tempfile::tempdir().unwrap();
    let id = identity::obtain(&ctx(fresh.path(), fake.url()))
        .await
        .unwrap();
    assert_eq!(
        (id.source, id.instance_uuid.as_str()),
        (Source::Aws, "someone-else")
    );
    assert!(!fake.requests().is_empty());
}
