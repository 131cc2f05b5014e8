//! The operator CLI: sixteen commands (docs/ARCHITECTURE.md §6). Commands that this build does
//! not implement yet say so and exit 1; they never pretend to succeed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use powernode::config::Config;
use powernode::enroll::{EnrollParams, Outcome};
use powernode::paths::Paths;
use powernode::pki::{CertInfo, PkiStore};
use serde_json::{Map, Value, json};

use crate::output::{EXIT_GENERIC, Report, exit_code_for};

#[derive(Debug, Parser)]
#[command(name = "powernode-agent", version, about = "Powernode node agent")]
pub struct Cli {
    /// Node root: every path (config, PKI, /run, /proc/cmdline, …) is taken under it.
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Print one JSON object instead of `key: value` lines.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Initramfs boot path: persist, identity, enrollment, modules, /sysroot (issue #7).
    Boot(crate::boot::BootArgs),
    /// The resident agent: heartbeats and orchestration (run by powernode-agent.service).
    Service(ServiceArgs),
    /// Enroll with a bootstrap token and write the PKI directory.
    Enroll(EnrollArgs),
    /// Verify an artifact against a Sigstore bundle, offline (exit 2 on any failure).
    Verify(crate::verify_cmd::VerifyArgs),
    /// Show identity (secrets redacted), PKI and configuration of this node.
    Introspect,
    /// Compose one assigned module (by id or name) through powernode-mountd (exit 2 refused,
    /// 3 mount failure); without mountd, fetch and verify only.
    Attach { id: String },
    /// Remove a module from the composition (through powernode-mountd).
    Detach { id: String },
    /// Fetch and verify every assigned module into the store (exit 2 if any is refused).
    Update,
    /// Commit a module's upper layer as a new version.
    Commit { id: String },
    /// Show the running agent's state (over D-Bus).
    Status,
    /// Run a platform script.
    Exec { id: String },
    /// Compose exactly the platform's module assignments (through powernode-mountd).
    Sync,
    /// Run a module's init action.
    Init { id: String, action: String },
    /// Prepare persistent volumes (destructive).
    VolumeSetup,
    /// Puppet integration.
    Puppet {
        #[command(subcommand)]
        action: PuppetAction,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum PuppetAction {
    /// Fetch the manifest and apply it.
    Apply,
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Platform URL override (normally from pki/meta.json or the identity).
    #[arg(long)]
    pub platform_url: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("bootstrap").required(true).args(["token_file", "token"]))]
pub struct EnrollArgs {
    /// File holding the bootstrap token (single use), `-` for standard input. Surrounding
    /// whitespace is ignored.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The bootstrap token itself. Deprecated: argv is readable by every local user
    /// (/proc/<pid>/cmdline); use --token-file.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub platform_url: String,
    /// PEM file with the CA bundle the platform's certificate must chain to.
    #[arg(long)]
    pub ca: PathBuf,
    /// CSR subject (the instance id; the platform forces its own CN).
    #[arg(long)]
    pub subject: String,
    #[arg(long)]
    pub dmi_uuid: Option<String>,
    /// PKI directory (default: /persist/var/lib/powernode/pki under --root).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn main(argv: Vec<OsString>) -> ExitCode {
    let cli = Cli::parse_from(argv);
    let paths = Paths::from_cli(cli.root.as_deref());
    let json = cli.json;
    if let Command::Service(args) = cli.command {
        return crate::service::entry(paths, args);
    }
    powernode::daemon::init_logging("powernode-agent");
    let report = match dispatch(cli.command, &paths) {
        Ok(r) => r,
        Err((command, e)) => Report::failed(command, exit_code_for(&e), format!("{e:#}")),
    };
    report.print(json);
    ExitCode::from(report.exit_code)
}

type CmdResult = Result<Report, (&'static str, anyhow::Error)>;

fn dispatch(command: Command, paths: &Paths) -> CmdResult {
    let not_yet = |name: &'static str, issue: u32| -> CmdResult {
        Ok(Report::failed(
            name,
            EXIT_GENERIC,
            format!("`{name}` is not implemented in this build yet (tracked in issue #{issue})"),
        ))
    };
    match command {
        Command::Service(_) => unreachable!("handled before logging set-up"),
        Command::Enroll(a) => enroll(a, paths).map_err(|e| ("enroll", e)),
        Command::Introspect => introspect(paths).map_err(|e| ("introspect", e)),
        Command::Status => status(paths).map_err(|e| ("status", e)),
        Command::Version => Ok(Report::ok(
            "version",
            obj(
                json!({"version": powernode::AGENT_VERSION, "architecture": powernode::architecture()}),
            ),
        )),
        Command::Boot(a) => Ok(crate::boot::run(a, paths)),
        Command::Verify(a) => Ok(crate::verify_cmd::run(a, paths)),
        Command::Attach { id } => Ok(crate::modules_cmd::mount_command(
            crate::modules_cmd::MountOp::Attach(&id),
            paths,
        )),
        Command::Detach { id } => Ok(crate::modules_cmd::mount_command(
            crate::modules_cmd::MountOp::Detach(&id),
            paths,
        )),
        Command::Update => Ok(crate::modules_cmd::run("update", paths, None)),
        Command::Commit { .. } => not_yet("commit", 5),
        Command::Exec { .. } => not_yet("exec", 6),
        Command::Sync => Ok(crate::modules_cmd::mount_command(
            crate::modules_cmd::MountOp::Sync,
            paths,
        )),
        Command::Init { .. } => not_yet("init", 6),
        Command::VolumeSetup => not_yet("volume-setup", 7),
        Command::Puppet { .. } => not_yet("puppet", 6),
    }
}

pub(crate) fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating the async runtime")
}

/// A bootstrap token is a few hundred bytes; anything much larger is the wrong file.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// The bootstrap token from `--token-file` (`-`: standard input) or, deprecated, `--token`.
fn bootstrap_token(file: Option<&Path>, inline: Option<String>) -> anyhow::Result<String> {
    use std::io::Read as _;
    let raw = match (file, inline) {
        (Some(f), _) if f == Path::new("-") => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_TOKEN_BYTES + 1)
                .read_to_string(&mut s)
                .context("reading the bootstrap token from standard input")?;
            s
        }
        (Some(f), _) => {
            let mut s = String::new();
            std::fs::File::open(f)
                .and_then(|h| h.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut s))
                .with_context(|| format!("reading the bootstrap token from {}", f.display()))?;
            s
        }
        (None, Some(t)) => {
            tracing::warn!(
                "--token puts the secret in argv, visible to every local user; use --token-file"
            );
            t
        }
        (None, None) => bail!("no bootstrap token: give --token-file PATH (or - for stdin)"),
    };
    if raw.len() as u64 > MAX_TOKEN_BYTES {
        bail!("the bootstrap token file is larger than {MAX_TOKEN_BYTES} bytes");
    }
    let token = raw.trim();
    if token.is_empty() {
        bail!("the bootstrap token is empty");
    }
    Ok(token.to_string())
}

fn enroll(a: EnrollArgs, paths: &Paths) -> anyhow::Result<Report> {
    let cfg = Config::load(paths)?;
    let ca = std::fs::read_to_string(&a.ca)
        .with_context(|| format!("reading CA bundle {}", a.ca.display()))?;
    let store = PkiStore::new(a.out.unwrap_or_else(|| paths.pki_dir()));
    let params = EnrollParams {
        bootstrap_token: bootstrap_token(a.token_file.as_deref(), a.token)?,
        platform_url: a.platform_url,
        ca_bundle_pem: ca,
        subject: a.subject,
        dmi_uuid: a.dmi_uuid,
        trusted_now: trusted_now(paths)?,
    };
    let outcome = runtime()?.block_on(powernode::enroll::enroll(&cfg.platform, &store, &params))?;
    let (state, meta) = match &outcome {
        Outcome::Enrolled(m) => ("enrolled", m),
        Outcome::ReEnrolled(m) => ("re-enrolled", m),
        Outcome::AlreadyEnrolled(m) => ("already-enrolled", m),
    };
    Ok(Report::ok(
        "enroll",
        obj(json!({
            "result": state,
            "instance_id": meta.instance_id,
            "subject": meta.mtls_subject,
            "not_after": meta.not_after,
            "pki_dir": store.dir().display().to_string(),
        })),
    ))
}

/// Now, if the clock can be trusted by the evidence on disk (the CLI does not ask timedated).
fn trusted_now(paths: &Paths) -> anyhow::Result<Option<time::OffsetDateTime>> {
    let now = time::OffsetDateTime::now_utc();
    let trust = powernode::clock::judge(now, false, powernode::clock::load(paths)?);
    Ok(trust.is_trusted().then_some(now))
}

fn introspect(paths: &Paths) -> anyhow::Result<Report> {
    let mut details = Map::new();
    details.insert("version".into(), powernode::AGENT_VERSION.into());
    details.insert("root".into(), paths.root().display().to_string().into());
    // The cached identity if identityd ran, else a read-only local resolution (never cached here).
    let identity = match powernode::identity::load_cached(paths)? {
        Some(id) => Ok(id),
        None => powernode::identity::resolve(paths),
    };
    details.insert(
        "identity".into(),
        match identity {
            Ok(id) => serde_json::to_value(id.public())?,
            Err(e) => json!({"error": e.to_string()}),
        },
    );
    let store = PkiStore::new(paths.pki_dir());
    let pki = match store.load() {
        Ok(None) => json!({"enrolled": false, "dir": store.dir().display().to_string()}),
        Ok(Some(c)) => {
            let info = CertInfo::from_pem(&c.cert_pem)?;
            let now = time::OffsetDateTime::now_utc();
            json!({
                "enrolled": true,
                "dir": store.dir().display().to_string(),
                "instance_id": c.meta.instance_id,
                "platform_url": c.meta.platform_url,
                "certificate": info,
                "lifetime_used_percent": (info.lifetime_used(now) * 1000.0).round() / 10.0,
                "token_expires_at": c.token.as_deref().and_then(powernode::pki::jwt_expiry).map(powernode::pki::rfc3339),
            })
        }
        Err(e) => json!({"enrolled": false, "error": e.to_string()}),
    };
    details.insert("pki".into(), pki);
    Ok(Report::ok("introspect", details))
}

/// The certificate as on disk, with the rotation schedule computed the way certd does.
fn certificate_status(paths: &Paths) -> anyhow::Result<Value> {
    let Some(creds) = PkiStore::new(paths.pki_dir()).load()? else {
        return Ok(json!({"state": "not-enrolled"}));
    };
    let now = time::OffsetDateTime::now_utc();
    // The CLI does not ask timedated; evidence alone decides (same rule as certd without NTP).
    let trust = powernode::clock::judge(now, false, powernode::clock::load(paths)?);
    let (info, verdict) = powernode::rotation::decide(now, &trust, &creds)?;
    let renew_at = match &verdict {
        powernode::rotation::Verdict::NotDue { renew_at }
        | powernode::rotation::Verdict::Due { renew_at } => {
            Some(powernode::pki::rfc3339(*renew_at))
        }
        _ => None,
    };
    Ok(json!({
        "serial": info.serial,
        "not_before": powernode::pki::rfc3339(info.not_before),
        "not_after": powernode::pki::rfc3339(info.not_after),
        "renew_at": renew_at,
        "rotation_state": verdict.state(),
        "token_expires_at": creds.token.as_deref().and_then(powernode::pki::jwt_expiry).map(powernode::pki::rfc3339),
    }))
}

fn status(paths: &Paths) -> anyhow::Result<Report> {
    let certificate = certificate_status(paths)?;
    // The composition as mountd last recorded it (read from disk: mountd exits when idle).
    let modules = match powernode::mount::load_state(paths) {
        Ok(st) => json!({
            "union_mounted": st.union_mounted,
            "generation": st.generation,
            "module_digests": st.module_digests(),
        }),
        Err(e) => json!({"error": e.to_string()}),
    };
    runtime()?.block_on(async {
        let conn = powernode::bus::system_bus().await?;
        let agent = powernode::bus::Agent1Proxy::new(&conn).await?;
        let details = json!({
            "instance_id": agent.instance_id().await?,
            "state": agent.state().await?,
            "last_heartbeat": agent.last_heartbeat().await?,
            "heartbeat_count": agent.heartbeat_count().await?,
            "next_poll_seconds": agent.next_poll_seconds().await?,
            "last_error": agent.last_error().await?,
            "certificate": certificate,
            "modules": modules,
            "tasks": {
                "in_flight": agent.in_flight_tasks().await?,
                "completed": agent.tasks_completed().await?,
                "failed": agent.tasks_failed().await?,
                "last": agent.last_task().await?,
            },
        });
        Ok(Report::ok("status", obj(details)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_a_file_trimmed() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("token");
        std::fs::write(&f, "-abc_DEF.123\n").expect("write");
        assert_eq!(
            bootstrap_token(Some(&f), None).expect("token"),
            "-abc_DEF.123"
        );
        std::fs::write(&f, " \n").expect("write");
        assert!(bootstrap_token(Some(&f), None).is_err(), "empty");
        std::fs::write(&f, vec![b'a'; 70 * 1024]).expect("write");
        assert!(bootstrap_token(Some(&f), None).is_err(), "oversize");
        assert!(bootstrap_token(Some(&d.path().join("absent")), None).is_err());
        assert!(bootstrap_token(None, None).is_err());
        assert_eq!(
            bootstrap_token(None, Some("t".into())).expect("inline"),
            "t"
        );
    }

    #[test]
    fn enroll_needs_exactly_one_token_source() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "powernode-agent",
                "enroll",
                "--platform-url",
                "https://p",
                "--ca",
                "/c",
                "--subject",
                "s",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        assert!(parse(&[]).is_err(), "no token source");
        assert!(parse(&["--token-file", "/t", "--token=x"]).is_err(), "both");
        let Command::Enroll(a) = parse(&["--token-file", "-"]).expect("stdin").command else {
            panic!("not enroll");
        };
        assert_eq!(a.token_file.as_deref(), Some(Path::new("-")));
    }
}
