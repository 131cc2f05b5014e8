//! The real `powernode-identityd` binary (sandbox applied) with `--root` on a private system bus
//! enforcing the project's policy: a fw-cfg fixture node, and a node whose only source is a fake
//! AWS metadata service reached through `POWERNODE_METADATA_URL`. Checks the D-Bus properties
//! with busctl, that no secret reaches the bus, and the 0600 cache.
//!
//! Every node here has QEMU's DMI strings (no cloud is asked) and a metadata URL on loopback
//! where nothing listens, so no test sends a packet to the link-local metadata address; the AWS
//! node has EC2's strings and its fake on loopback.
//!
//! Real fw-cfg and DMI discovery (QEMU `-fw_cfg`, `-uuid`) under the unit belongs to the VM tier
//! (issue 7): a container sees the host's /sys.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::bus::{Caller, PrivateBus, busctl};
use powernode_integration_tests::metadata::{
    Cloud, FakeMetadata, QEMU_DMI, UserData, fake_dmi, refused_url,
};
use powernode_integration_tests::{bin, describe, run_ok, workspace_root};

const NAME: &str = "com.powernode.Identity1";
const PATH: &str = "/com/powernode/Identity1";

struct Daemon {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("killing identityd: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping identityd: {e}");
        }
    }
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn start(bus: &PrivateBus, root: &Path, env: &[(&str, &str)]) -> Result<Daemon> {
    let log = tempfile::NamedTempFile::new()?;
    let mut cmd = Command::new(bin("powernode-identityd")?);
    cmd.arg("--root")
        .arg(root)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .env("RUST_LOG", "info")
        .env_remove("POWERNODE_ROOT")
        .env_remove("POWERNODE_METADATA_URL")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().context("starting powernode-identityd")?;
    Ok(Daemon { child, log })
}

fn property(bus: &PrivateBus, prop: &str) -> Result<String> {
    let out = busctl(
        bus.address(),
        &Caller::root(),
        &["get-property", NAME, PATH, NAME, prop],
    )?;
    ensure!(
        out.status.success(),
        "get-property {prop}:\n{}",
        describe(&out)
    );
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // `s "value"`
    Ok(s.trim_start_matches("s ").trim_matches('"').to_string())
}

/// Wait until the daemon owns its name (it does so before discovery finishes).
fn wait_name(bus: &PrivateBus, d: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = d.child.try_wait()? {
            bail!("identityd exited ({st}):\n{}", d.log());
        }
        let out = busctl(bus.address(), &Caller::root(), &["list", "--acquired"])?;
        if String::from_utf8_lossy(&out.stdout).contains(NAME) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{NAME} not owned after 20 s; log:\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ask for discovery (`Resolve()`, which is what starts it) without waiting for the answer.
fn request_resolve(bus: &PrivateBus) -> Result<()> {
    let out = busctl(
        bus.address(),
        &Caller::root(),
        &["--timeout=1", "call", NAME, PATH, NAME, "Resolve"],
    )?;
    // A discovery longer than a second times the call out (it goes on in identityd); one that
    // fails answers with its reason, which the caller checks through LastError.
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() || err.contains("timed out") || err.contains("Call failed: identity"),
        "Resolve:\n{}",
        describe(&out)
    );
    Ok(())
}

/// Start discovery, then poll `InstanceId` until the background discovery filled it in.
fn wait_identity(bus: &PrivateBus, d: &mut Daemon) -> Result<String> {
    // Resolve() needs the name owned; a call before that finds no one to answer.
    wait_name(bus, d)?;
    request_resolve(bus)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = d.child.try_wait()? {
            bail!("identityd exited ({st}):\n{}", d.log());
        }
        if let Ok(id) = property(bus, "InstanceId")
            && !id.is_empty()
        {
            return Ok(id);
        }
        if Instant::now() > deadline {
            bail!("no identity after 20 s; log:\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node root: the given fixture trees, QEMU's DMI strings, config with no idle exit, no
/// guestinfo tool and a loopback metadata URL where nothing listens.
fn node(trees: &[&str]) -> Result<tempfile::TempDir> {
    let root = tempfile::Builder::new().prefix("pn-idd-").tempdir()?;
    for t in trees {
        let src = workspace_root().join("tests/fixtures/identity").join(t);
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", src.display()))
                .arg(root.path()),
        )?;
    }
    let etc = root.path().join("etc/powernode");
    fs::create_dir_all(&etc)?;
    fs::write(
        etc.join("agent.toml"),
        format!(
            "[daemon]\nidle_exit_secs = 0\n[identity]\nvsphere_command = [\"/nonexistent/vmware-rpctool\"]\nmetadata_url = \"{}\"\n",
            refused_url()?
        ),
    )?;
    fs::create_dir_all(root.path().join("run/powernode"))?;
    fake_dmi(root.path(), QEMU_DMI)?;
    Ok(root)
}

fn check_cache(root: &Path, secret: &str) -> Result<()> {
    let p = root.join("run/powernode/identity/identity.json");
    let mode = fs::metadata(&p)?.permissions().mode() & 0o777;
    ensure!(mode == 0o640, "identity.json mode {mode:o}");
    ensure!(
        fs::read_to_string(&p)?.contains(secret),
        "the cache holds the token"
    );
    Ok(())
}

fn check_no_secret_on_bus(bus: &PrivateBus, secret: &str) -> Result<()> {
    let out = busctl(
        bus.address(),
        &Caller::root(),
        &["introspect", NAME, PATH, NAME],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "introspect:\n{}", describe(&out));
    ensure!(!text.contains(secret), "a secret is on D-Bus:\n{text}");
    Ok(())
}

#[test]
fn fw_cfg_node_on_the_bus() -> Result<()> {
    let bus = PrivateBus::start()?;
    let root = node(&["fw-cfg", "identity-cfg"])?;
    let mut d = start(&bus, root.path(), &[])?;
    let id = wait_identity(&bus, &mut d)?;
    ensure!(id == "22222222-2222-4222-8222-222222222222", "{id}");
    ensure!(property(&bus, "Source")? == "fw-cfg");
    ensure!(property(&bus, "PlatformUrl")? == "https://fwcfg.example");
    ensure!(property(&bus, "Evidence")?.contains("instance_uuid/raw"));
    ensure!(property(&bus, "LastError")?.is_empty());
    ensure!(!property(&bus, "DiscoveredAt")?.is_empty());
    check_no_secret_on_bus(&bus, "tok-fwcfg")?;
    check_cache(root.path(), "tok-fwcfg")?;
    // Resolve() answers from what is known.
    let out = busctl(
        bus.address(),
        &Caller::root(),
        &["call", NAME, PATH, NAME, "Resolve"],
    )?;
    ensure!(out.status.success(), "Resolve:\n{}", describe(&out));
    ensure!(String::from_utf8_lossy(&out.stdout).contains("22222222-2222-4222-8222-222222222222"));
    Ok(())
}

#[test]
fn fake_aws_node_on_the_bus() -> Result<()> {
    let fake = FakeMetadata::start(
        Cloud::Aws,
        UserData::Body(
            br#"{"instance_uuid":"88888888-8888-4888-8888-888888888888","bootstrap_token":"tok-aws-secret","platform_url":"https://aws.example"}"#.to_vec(),
        ),
    )?;
    let bus = PrivateBus::start()?;
    // identity.cfg ranks below the clouds: AWS must win.
    let root = node(&["identity-cfg"])?;
    fs::remove_dir_all(root.path().join("sys/class/dmi"))?;
    fake_dmi(root.path(), Cloud::Aws.dmi())?;
    let mut d = start(&bus, root.path(), &[("POWERNODE_METADATA_URL", fake.url())])?;
    // The name is owned at once; a call before that would be "not provided by any .service".
    wait_name(&bus, &mut d)?;
    // Resolve() waits for the running discovery and returns the instance id.
    let out = busctl(
        bus.address(),
        &Caller::root(),
        &["--timeout=30", "call", NAME, PATH, NAME, "Resolve"],
    );
    let id = wait_identity(&bus, &mut d)?;
    let out = out?;
    ensure!(
        out.status.success(),
        "Resolve:\n{}\n{}",
        describe(&out),
        d.log()
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains(&id));
    ensure!(id == "88888888-8888-4888-8888-888888888888", "{id}");
    ensure!(property(&bus, "Source")? == "aws", "{}", d.log());
    let evidence = property(&bus, "Evidence")?;
    ensure!(
        evidence == format!("aws: user-data from {}/latest/user-data (json)", fake.url()),
        "{evidence}"
    );
    let reqs = fake.requests();
    ensure!(
        reqs.contains(&"PUT /latest/api/token -> 200".to_string())
            && reqs.contains(&"GET /latest/user-data -> 200".to_string()),
        "{reqs:?}"
    );
    check_no_secret_on_bus(&bus, "tok-aws-secret")?;
    check_cache(root.path(), "tok-aws-secret")?;
    ensure!(
        !d.log().contains("tok-aws-secret"),
        "the token is in the log:\n{}",
        d.log()
    );
    Ok(())
}

/// identityd's unit may reach only the metadata address, so claim polls are relayed by
/// enrolld: without enrolld no claim request leaves identityd; with it the node is claimed.
#[test]
fn claim_polling_is_relayed_by_enrolld() -> Result<()> {
    use powernode_integration_tests::metadata::{ClaimStep, FakeClaim};
    let claim = FakeClaim::start(vec![
        ClaimStep::Pending {
            code: "K7M2QX9P".into(),
            poll_after: 0,
        },
        ClaimStep::Claimed {
            instance_uuid: "77777777-7777-4777-8777-777777777777".into(),
            token: "tok-claimed-secret".into(),
        },
    ])?;
    let bus = PrivateBus::start()?;
    let root = node(&[])?;
    let r = root.path();
    fs::create_dir_all(r.join("boot"))?;
    fs::write(
        r.join("boot/identity.cfg"),
        format!(
            "ID=\nKEY=\nSERVER={}\nCA_PEM_FILE=/boot/powernode-ca.pem\n",
            claim.url
        ),
    )?;
    fs::write(r.join("boot/powernode-ca.pem"), &claim.ca_pem)?;
    fs::create_dir_all(r.join("sys/class/net/eth0"))?;
    fs::write(r.join("sys/class/net/eth0/address"), "52:54:00:ab:cd:ef\n")?;
    let mut d = start(&bus, r, &[])?;
    wait_name(&bus, &mut d)?;
    request_resolve(&bus)?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        claim.requests().is_empty(),
        "identityd posted the claim itself: {:?}",
        claim.requests()
    );
    let log = tempfile::NamedTempFile::new()?;
    let mut enrolld = Command::new(bin("powernode-enrolld")?)
        .arg("--root")
        .arg(r)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .spawn()?;
    let id = wait_identity(&bus, &mut d);
    enrolld.kill().ok();
    enrolld.wait().ok();
    let id = id.with_context(|| fs::read_to_string(log.path()).unwrap_or_default())?;
    ensure!(id == "77777777-7777-4777-8777-777777777777", "{id}");
    ensure!(property(&bus, "Source")? == "claim");
    ensure!(property(&bus, "Evidence")?.contains("claim code K7M2QX9P"));
    ensure!(claim.requests().len() == 2, "{:?}", claim.requests());
    check_no_secret_on_bus(&bus, "tok-claimed-secret")?;
    Ok(())
}

/// `/persist/var/lib/powernode/identity.cfg` is writable by identityd's own user, and identityd
/// can read root-only files: a `CA_PEM_FILE` naming a root-only file elsewhere (here a
/// shadow-like `/etc/shadow`, mode 0400) is refused with a clear error, and its content lands
/// neither in identity.json nor on the bus nor in the log.
#[test]
fn a_ca_pem_file_outside_its_identity_cfg_directory_is_refused() -> Result<()> {
    const SECRET: &str = "SHADOWHASH-7f3a";
    let bus = PrivateBus::start()?;
    let root = node(&[])?;
    let r = root.path();
    fs::create_dir_all(r.join("etc"))?;
    fs::write(
        r.join("etc/shadow"),
        format!("root:$6${SECRET}:19000:0:99999:7:::\n"),
    )?;
    fs::set_permissions(r.join("etc/shadow"), fs::Permissions::from_mode(0o400))?;
    fs::create_dir_all(r.join("persist/var/lib/powernode"))?;
    fs::write(
        r.join("persist/var/lib/powernode/identity.cfg"),
        "ID=55555555-5555-4555-8555-555555555555\nKEY=tok-persist\nCA_PEM_FILE=/etc/shadow\n",
    )?;
    let mut d = start(&bus, r, &[])?;
    wait_name(&bus, &mut d)?;
    request_resolve(&bus)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let e = property(&bus, "LastError")?;
        if !e.is_empty() {
            break e;
        }
        ensure!(
            Instant::now() < deadline,
            "no LastError after 20 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let want = format!(
        "{}/persist/var/lib/powernode/identity.cfg: CA_PEM_FILE /etc/shadow: outside {}/persist/var/lib/powernode",
        r.display(),
        r.display()
    );
    ensure!(err.contains(&want), "LastError {err:?}, want {want:?}");
    ensure!(property(&bus, "InstanceId")?.is_empty());
    ensure!(
        !r.join("run/powernode/identity.json").exists(),
        "an identity was cached"
    );
    check_no_secret_on_bus(&bus, SECRET)?;
    ensure!(
        !d.log().contains(SECRET),
        "the file is in the log:\n{}",
        d.log()
    );
    Ok(())
}
