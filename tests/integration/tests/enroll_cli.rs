//! `powernode-agent enroll` against the real development platform (HTTPS, its own CA): the PKI
//! directory it writes (files, modes, contents), idempotence, and every refusal path leaving no
//! credentials behind (shared/node-api.md §4.1, §17; Part A §3).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::{bin, describe, run};
use serde_json::Value;

const PKI: &str = "persist/var/lib/powernode/pki";
/// The files of a committed credential set (node-api.md §17).
const CREDENTIAL_FILES: &[&str] = &[
    "node.key",
    "node.crt",
    "ca-chain.crt",
    "ca-bundle.crt",
    "instance-token.jwt",
    "meta.json",
];

/// One `enroll --json` run: exit code, the parsed JSON object, and the raw output.
struct Enroll {
    code: i32,
    json: Value,
    out: Output,
}

impl Enroll {
    fn error(&self) -> String {
        self.json["error"].as_str().unwrap_or_default().to_string()
    }

    fn ctx(&self) -> String {
        format!("exit {}:\n{}", self.code, describe(&self.out))
    }
}

/// How `enroll` is handed the bootstrap token; never on the command line.
#[derive(Clone, Copy)]
enum TokenVia {
    Stdin,
    File,
}

fn enroll(url: &str, ca: &Path, token: &str, subject: &str, root: &Path) -> Result<Enroll> {
    enroll_via(TokenVia::Stdin, url, ca, token, subject, root)
}

fn enroll_via(
    via: TokenVia,
    url: &str,
    ca: &Path,
    token: &str,
    subject: &str,
    root: &Path,
) -> Result<Enroll> {
    use std::io::Write as _;
    let token_dir = tempfile::tempdir()?;
    let token_file = token_dir.path().join("bootstrap-token");
    let mut cmd = Command::new(bin("powernode-agent")?);
    cmd.args(["enroll", "--json", "--platform-url", url])
        .arg("--ca")
        .arg(ca)
        .args(["--subject", subject])
        .arg("--root")
        .arg(root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    match via {
        TokenVia::Stdin => {
            cmd.args(["--token-file", "-"])
                .stdin(std::process::Stdio::piped());
        }
        TokenVia::File => {
            std::fs::write(&token_file, format!("{token}\n"))?;
            cmd.arg("--token-file")
                .arg(&token_file)
                .stdin(std::process::Stdio::null());
        }
    }
    ensure!(
        !cmd.get_args().any(|a| a.to_string_lossy().contains(token)),
        "the bootstrap token is in argv: {cmd:?}"
    );
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(format!("{token}\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let code = out.status.code().context("enroll killed by a signal")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "enroll --json did not print one JSON object:\n{}",
            describe(&out)
        )
    })?;
    ensure!(
        json["command"] == "enroll" && json["exit_code"].as_i64() == Some(i64::from(code)),
        "JSON envelope does not match the exit code {code}: {json}"
    );
    ensure!(
        json["status"] == if code == 0 { "ok" } else { "error" },
        "status does not match exit code {code}: {json}"
    );
    Ok(Enroll { code, json, out })
}

fn introspect(root: &Path) -> Result<Value> {
    let out = run(Command::new(bin("powernode-agent")?)
        .args(["introspect", "--json", "--root"])
        .arg(root))?;
    ensure!(
        out.status.success(),
        "introspect failed:\n{}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("introspect output is not JSON:\n{}", describe(&out)))
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

fn pki_dir(root: &Path) -> PathBuf {
    root.join(PKI)
}

/// No credential file (nor, with `pending`, the pending key) exists under `root`'s PKI directory.
fn assert_no_credentials(root: &Path, pending: bool) -> Result<()> {
    let dir = pki_dir(root);
    let mut names: Vec<&str> = CREDENTIAL_FILES.to_vec();
    if pending {
        names.push("enroll-pending.key");
    }
    for name in names {
        ensure!(
            !dir.join(name).exists(),
            "{} was written although enrollment failed",
            dir.join(name).display()
        );
    }
    // Nor may a temp file of an interrupted atomic write remain.
    if dir.is_dir() {
        for e in std::fs::read_dir(&dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            ensure!(
                !name.starts_with('.'),
                "leftover temporary file {name} in {}",
                dir.display()
            );
        }
    }
    let pki = &introspect(root)?["pki"];
    ensure!(
        pki["enrolled"] == false,
        "introspect reports a failed enrollment as enrolled: {pki}"
    );
    Ok(())
}

fn certificates_issued(p: &DevPlatform, id: &str) -> Result<Vec<String>> {
    let Some(rec) = p.instance(id)? else {
        return Ok(Vec::new());
    };
    Ok(rec["certificates_issued"]
        .as_array()
        .context("certificates_issued is not an array")?
        .iter()
        .filter_map(|c| c["serial"].as_str().map(str::to_string))
        .collect())
}

/// A 127.0.0.1 port nothing listens on (bound, then released).
fn closed_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    drop(l);
    Ok(port)
}

#[test]
fn enroll_writes_pki_with_modes_and_is_idempotent() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(None)?;
    let node = tempfile::tempdir()?;
    let root = node.path();

    let e = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, root)?;
    ensure!(e.code == 0, "enroll should succeed: {}", e.ctx());
    ensure!(e.json["result"] == "enrolled", "{}", e.json);
    ensure!(
        e.json["instance_id"] == t.instance_uuid.as_str(),
        "{}",
        e.json
    );
    ensure!(
        !String::from_utf8_lossy(&e.out.stdout).contains(&t.token)
            && !String::from_utf8_lossy(&e.out.stderr).contains(&t.token),
        "enroll printed the bootstrap token:\n{}",
        describe(&e.out)
    );

    let dir = pki_dir(root);
    ensure!(mode(&dir)? == 0o770, "PKI dir mode {:o}", mode(&dir)?);
    for (name, want) in [
        ("node.key", 0o640),
        ("instance-token.jwt", 0o640),
        ("node.crt", 0o644),
        ("ca-chain.crt", 0o644),
        ("ca-bundle.crt", 0o644),
        ("meta.json", 0o644),
    ] {
        let got = mode(&dir.join(name))?;
        ensure!(got == want, "{name}: mode {got:o}, want {want:o}");
    }
    ensure!(
        !dir.join("enroll-pending.key").exists(),
        "the pending key must be gone after a successful enrollment"
    );
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    ensure!(
        meta["instance_id"] == t.instance_uuid.as_str(),
        "meta.json: {meta}"
    );
    ensure!(meta["platform_url"] == p.url.as_str(), "meta.json: {meta}");
    ensure!(
        std::fs::read_to_string(dir.join("ca-bundle.crt"))? == p.ca_pem,
        "ca-bundle.crt is not the CA given with --ca"
    );
    let key = std::fs::read_to_string(dir.join("node.key"))?;
    ensure!(
        key.contains("BEGIN PRIVATE KEY"),
        "node.key is not a PKCS#8 PEM key"
    );

    // The certificate, read back by the agent itself.
    let intro = introspect(root)?;
    let pki = &intro["pki"];
    ensure!(pki["enrolled"] == true, "introspect: {intro}");
    ensure!(
        pki["instance_id"] == t.instance_uuid.as_str(),
        "introspect: {intro}"
    );
    ensure!(
        pki["certificate"]["subject_cn"] == t.instance_uuid.as_str(),
        "node.crt CN is not the instance uuid: {pki}"
    );
    let serial = pki["certificate"]["serial"]
        .as_str()
        .filter(|s| !s.is_empty())
        .with_context(|| format!("no certificate serial: {pki}"))?
        .to_string();
    let issued = certificates_issued(&p, &t.instance_uuid)?;
    ensure!(
        issued == vec![serial.clone()],
        "platform issued {issued:?}, node holds {serial}"
    );

    // Second run on the same directory: nothing sent, nothing issued, files untouched.
    let crt_before = std::fs::read(dir.join("node.crt"))?;
    let again = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, root)?;
    ensure!(again.code == 0, "re-enroll should succeed: {}", again.ctx());
    ensure!(again.json["result"] == "already-enrolled", "{}", again.json);
    ensure!(
        again.json["instance_id"] == t.instance_uuid.as_str(),
        "{}",
        again.json
    );
    ensure!(
        certificates_issued(&p, &t.instance_uuid)?.len() == 1,
        "already-enrolled run issued a certificate"
    );
    ensure!(
        std::fs::read(dir.join("node.crt"))? == crt_before,
        "already-enrolled run rewrote node.crt"
    );
    Ok(())
}

#[test]
fn token_from_a_file_enrolls_and_a_missing_file_sends_nothing() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(None)?;
    let node = tempfile::tempdir()?;
    // A token file that does not exist: refused before anything is sent or written.
    let out = run(Command::new(bin("powernode-agent")?)
        .args(["enroll", "--json", "--platform-url", &p.url])
        .arg("--ca")
        .arg(&p.ca_path)
        .args(["--subject", &t.instance_uuid])
        .arg("--token-file")
        .arg(node.path().join("absent"))
        .arg("--root")
        .arg(node.path()))?;
    ensure!(
        !out.status.success(),
        "enroll without a token file succeeded"
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("reading the bootstrap token from"),
        "{}",
        describe(&out)
    );
    assert_no_credentials(node.path(), true)?;
    ensure!(p.instance(&t.instance_uuid)?.is_none());

    let e = enroll_via(
        TokenVia::File,
        &p.url,
        &p.ca_path,
        &t.token,
        &t.instance_uuid,
        node.path(),
    )?;
    ensure!(e.code == 0, "enroll --token-file: {}", e.ctx());
    ensure!(e.json["result"] == "enrolled", "{}", e.json);
    ensure!(certificates_issued(&p, &t.instance_uuid)?.len() == 1);
    Ok(())
}

#[test]
fn consumed_token_is_refused_and_writes_nothing() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(None)?;
    let first = tempfile::tempdir()?;
    let e = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, first.path())?;
    ensure!(e.code == 0, "first enroll: {}", e.ctx());

    let fresh = tempfile::tempdir()?;
    let e = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, fresh.path())?;
    ensure!(e.code == 5, "consumed token must exit 5: {}", e.ctx());
    ensure!(
        e.error().contains("token already consumed"),
        "error should say the token is consumed: {}",
        e.ctx()
    );
    assert_no_credentials(fresh.path(), true)?;
    ensure!(
        certificates_issued(&p, &t.instance_uuid)?.len() == 1,
        "a refused enrollment issued a certificate"
    );
    Ok(())
}

#[test]
fn expired_token_is_refused_and_writes_nothing() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(Some(1))?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let node = tempfile::tempdir()?;
    let e = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, node.path())?;
    ensure!(e.code == 5, "expired token must exit 5: {}", e.ctx());
    let msg = e.error().to_lowercase();
    ensure!(
        msg.contains("invalid or expired") || msg.contains("expired"),
        "error should say the token is invalid or expired: {}",
        e.ctx()
    );
    assert_no_credentials(node.path(), true)?;
    ensure!(
        certificates_issued(&p, &t.instance_uuid)?.is_empty(),
        "an expired token got a certificate"
    );
    Ok(())
}

#[test]
fn platform_certificate_not_chaining_to_ca_is_refused_without_spending_the_token() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    // Another platform's CA: same kind of certificate, different key.
    let other = DevPlatform::start(&[])?;
    ensure!(other.ca_pem != p.ca_pem, "the two platforms share a CA");
    let t = p.token(None)?;
    let node = tempfile::tempdir()?;

    let e = enroll(
        &p.url,
        &other.ca_path,
        &t.token,
        &t.instance_uuid,
        node.path(),
    )?;
    ensure!(e.code == 5, "untrusted platform must exit 5: {}", e.ctx());
    let msg = e.error();
    ensure!(
        msg.contains("invalid peer certificate")
            || msg.contains("UnknownIssuer")
            || msg.contains("BadSignature"),
        "error should name the certificate problem: {}",
        e.ctx()
    );
    // The handshake failed, so nothing was sent: no credentials and no pending key either.
    assert_no_credentials(node.path(), true)?;
    ensure!(
        p.instance(&t.instance_uuid)?.is_none(),
        "the platform saw an enrollment over an untrusted connection"
    );

    // The token was never sent, so it still works with the right CA.
    let ok = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, node.path())?;
    ensure!(ok.code == 0, "enroll with the right CA: {}", ok.ctx());
    ensure!(ok.json["result"] == "enrolled", "{}", ok.json);
    ensure!(
        !pki_dir(node.path()).join("enroll-pending.key").exists(),
        "pending key left after success"
    );
    ensure!(certificates_issued(&p, &t.instance_uuid)?.len() == 1);
    Ok(())
}

#[test]
fn unreachable_platform_exits_5_with_clear_message() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(None)?;
    let node = tempfile::tempdir()?;
    let url = format!("https://127.0.0.1:{}", closed_port()?);
    let started = std::time::Instant::now();
    let e = enroll(&url, &p.ca_path, &t.token, &t.instance_uuid, node.path())?;
    ensure!(e.code == 5, "unreachable platform must exit 5: {}", e.ctx());
    let msg = e.error();
    ensure!(
        msg.contains("not reached, nothing was sent")
            && msg.contains("Connection refused")
            && msg.contains(&url),
        "error should say the platform at {url} was not reached and the token not sent: {}",
        e.ctx()
    );
    ensure!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "a refused connection took {:?}",
        started.elapsed()
    );
    // Nothing was sent, so not even the pending key is kept.
    assert_no_credentials(node.path(), true)?;
    // The token is still good.
    let ok = enroll(&p.url, &p.ca_path, &t.token, &t.instance_uuid, node.path())?;
    ensure!(
        ok.code == 0 && ok.json["result"] == "enrolled",
        "{}",
        ok.ctx()
    );
    Ok(())
}

#[test]
fn plain_http_url_is_rejected() -> Result<()> {
    let p = DevPlatform::start(&[])?;
    let t = p.token(None)?;
    let node = tempfile::tempdir()?;
    let http = p.url.replacen("https://", "http://", 1);
    let e = enroll(&http, &p.ca_path, &t.token, &t.instance_uuid, node.path())?;
    ensure!(e.code != 0, "plain http must fail: {}", e.ctx());
    ensure!(
        e.error().contains("https://"),
        "error should say https:// is required: {}",
        e.ctx()
    );
    assert_no_credentials(node.path(), true)?;
    ensure!(
        p.instance(&t.instance_uuid)?.is_none(),
        "the token went out over plain http"
    );
    Ok(())
}
