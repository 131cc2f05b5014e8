//! The development platform (`powernode-devplatform`) as a test fixture: a real HTTPS server
//! with its own CA on host loopback, plus its admin CLI for tokens and instance records.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{bin, describe, run};

const STARTUP: Duration = Duration::from_secs(30);

pub struct DevPlatform {
    child: Option<Child>,
    _state_dir: Option<tempfile::TempDir>,
    pub state: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    pub ca_path: PathBuf,
    pub ca_pem: String,
}

/// A freshly minted bootstrap token and the instance it is bound to.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub instance_uuid: String,
}

impl DevPlatform {
    /// Serve on 127.0.0.1:<free port> from a new state directory; `extra` are more `serve` flags.
    pub fn start(extra: &[&str]) -> Result<DevPlatform> {
        let dir = tempfile::Builder::new()
            .prefix("pn-devplatform-")
            .tempdir()?;
        let state = dir.path().join("state");
        let mut p = DevPlatform::start_at(&state, extra)?;
        p._state_dir = Some(dir);
        Ok(p)
    }

    /// Serve from `state` (kept by the caller, e.g. to restart on it).
    pub fn start_at(state: &Path, extra: &[&str]) -> Result<DevPlatform> {
        DevPlatform::start_listen(state, "127.0.0.1:0", extra)
    }

    /// Restart on the same state and address: same CA, same URL (a platform coming back).
    pub fn restart(&mut self, extra: &[&str]) -> Result<()> {
        self.stop()?;
        let listen = self.url.trim_start_matches("https://").to_string();
        let mut fresh = DevPlatform::start_listen(&self.state, &listen, extra)?;
        self.child = fresh.child.take();
        Ok(())
    }

    fn start_listen(state: &Path, listen: &str, extra: &[&str]) -> Result<DevPlatform> {
        let log = std::fs::File::create(state.with_extension("log"))
            .with_context(|| format!("creating log beside {}", state.display()))?;
        let mut child = Command::new(bin("powernode-devplatform")?)
            .arg("serve")
            .arg("--state")
            .arg(state)
            .args(["--listen", listen])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting powernode-devplatform")?;
        let stdout = child.stdout.take().context("devplatform stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut ca_path, mut url) = (None, None);
        let deadline = Instant::now() + STARTUP;
        while ca_path.is_none() || url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).with_context(|| {
                format!(
                    "devplatform did not print its CA and URL; log:\n{}",
                    std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
                )
            })?;
            if let Some(p) = line.strip_prefix("CA ") {
                ca_path = Some(PathBuf::from(p));
            } else if let Some(u) = line.strip_prefix("URL ") {
                url = Some(u.to_string());
            }
        }
        let ca_path = ca_path.context("CA line")?;
        let ca_pem = std::fs::read_to_string(&ca_path)?;
        Ok(DevPlatform {
            child: Some(child),
            _state_dir: None,
            state: state.to_path_buf(),
            url: url.context("URL line")?,
            ca_path,
            ca_pem,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }

    /// Run an admin subcommand on this platform's state (`--state` is appended).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(bin("powernode-devplatform")?)
            .args(args)
            .arg("--state")
            .arg(&self.state))?;
        if !out.status.success() {
            bail!("powernode-devplatform {args:?}: {}", describe(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Mint a bootstrap token (`ttl_secs` None = the platform default of one hour).
    pub fn token(&self, ttl_secs: Option<u64>) -> Result<Token> {
        let ttl = ttl_secs.map(|t| t.to_string());
        let mut args = vec!["token", "create", "--json"];
        if let Some(t) = &ttl {
            args.extend(["--ttl-secs", t.as_str()]);
        }
        let v: Value = serde_json::from_str(&self.cli(&args)?)?;
        Ok(Token {
            token: v["token"].as_str().context("token")?.to_string(),
            instance_uuid: v["instance_uuid"]
                .as_str()
                .context("instance_uuid")?
                .to_string(),
        })
    }

    /// A node root enrolled with `powernode-agent enroll --root` against this platform, with the
    /// kernel facts a heartbeat reads linked from the host's /proc. Returns the root and the
    /// instance id.
    pub fn enrolled_node(&self, prefix: &str) -> Result<(tempfile::TempDir, String)> {
        let token = self.token(None)?;
        let root = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/sys/kernel/random"))?;
        for f in ["loadavg", "meminfo", "uptime", "sys/kernel/random/boot_id"] {
            std::os::unix::fs::symlink(Path::new("/proc").join(f), r.join("proc").join(f))?;
        }
        std::fs::create_dir_all(r.join("etc/powernode"))?;
        // The token goes through a file, never argv (readable by every local user).
        let token_dir = tempfile::tempdir()?;
        let token_file = token_dir.path().join("bootstrap-token");
        std::fs::write(&token_file, &token.token)?;
        let out = run(Command::new(bin("powernode-agent")?)
            .arg("enroll")
            .arg("--token-file")
            .arg(&token_file)
            .args([
                "--platform-url",
                &self.url,
                "--subject",
                &token.instance_uuid,
            ])
            .arg("--root")
            .arg(r)
            .arg("--ca")
            .arg(&self.ca_path))?;
        if !out.status.success() {
            bail!("enroll: {}", describe(&out));
        }
        Ok((root, token.instance_uuid))
    }

    /// Mint a bootstrap token bound to an existing (or chosen) instance id.
    pub fn token_for(&self, instance_uuid: &str) -> Result<Token> {
        let v: Value = serde_json::from_str(&self.cli(&[
            "token",
            "create",
            "--json",
            "--instance-uuid",
            instance_uuid,
        ])?)?;
        Ok(Token {
            token: v["token"].as_str().context("token")?.to_string(),
            instance_uuid: v["instance_uuid"]
                .as_str()
                .context("instance_uuid")?
                .to_string(),
        })
    }

    /// `module publish` of the tree `rootfs` to `registry` (+ `extra` flags such as `--arch`,
    /// `--out`, `--identity`); what publish printed: the module record and the `artifact` it
    /// pushed.
    pub fn publish(
        &self,
        registry: &str,
        name: &str,
        version: &str,
        rootfs: &Path,
        extra: &[&str],
    ) -> Result<Value> {
        let mut args = vec![
            "module",
            "publish",
            "--registry",
            registry,
            "--name",
            name,
            "--version",
            version,
        ];
        args.extend_from_slice(extra);
        args.push(rootfs.to_str().context("utf-8 path")?);
        Ok(serde_json::from_str(&self.cli(&args)?)?)
    }

    /// Pin the platform's Sigstore trusted root in the node tree `root`
    /// (`etc/powernode/trust/trusted_root.json`) and the node's own signer policy
    /// (`etc/powernode/trust/modules.toml`: the platform's signing key may sign every module),
    /// as provisioning does in production. Both exist once something was published.
    pub fn pin_trusted_root(&self, root: &Path) -> Result<()> {
        let trust = root.join("etc/powernode/trust");
        std::fs::create_dir_all(&trust)?;
        std::fs::copy(
            self.state.join("sigstore/trusted_root.json"),
            trust.join("trusted_root.json"),
        )?;
        let key = std::fs::read_to_string(self.state.join("sigstore/signing.pub"))?;
        std::fs::write(
            trust.join("modules.toml"),
            format!("[[signer]]\nmodules = [\"*\"]\npublic_key = \"\"\"\n{key}\"\"\"\n"),
        )?;
        Ok(())
    }

    /// Adds a keyless signer (identity and issuer regexps) for every module to the node's
    /// signer policy written by [`DevPlatform::pin_trusted_root`].
    pub fn allow_keyless(&self, root: &Path, identity_re: &str, issuer_re: &str) -> Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("etc/powernode/trust/modules.toml"))?;
        write!(
            f,
            "[[signer]]\nmodules = [\"*\"]\nidentity = '{identity_re}'\nissuer = '{issuer_re}'\n"
        )?;
        Ok(())
    }

    /// `module assign` (+ `extra`, e.g. `--persistent`); the assignment order is the priority.
    pub fn assign(&self, instance: &str, module: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "module",
            "assign",
            "--instance",
            instance,
            "--module",
            module,
        ];
        args.extend_from_slice(extra);
        self.cli(&args)?;
        Ok(())
    }

    /// Fleet events the platform stored for `instance` (each with kind, severity, payload, …).
    pub fn events(&self, instance: &str) -> Result<Vec<Value>> {
        let v: Value =
            serde_json::from_str(&self.cli(&["events", "--json", "--instance", instance])?)?;
        Ok(v.as_array()
            .and_then(|a| a.first())
            .and_then(|i| i["events"].as_array())
            .cloned()
            .unwrap_or_default())
    }

    /// Wait until an event of `kind` from `instance` reached the platform.
    pub fn wait_event(&self, instance: &str, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(instance)?;
            if let Some(e) = events.iter().find(|e| e["kind"] == kind) {
                return Ok(e.clone());
            }
            if Instant::now() > deadline {
                let kinds: Vec<_> = events.iter().map(|e| e["kind"].clone()).collect();
                bail!("no {kind} event from {instance} in {timeout:?}; got {kinds:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Queue a task for `instance`; returns the stored task (with its `id`).
    pub fn enqueue_task(&self, instance: &str, command: &str, options: &Value) -> Result<Value> {
        let opts = options.to_string();
        Ok(serde_json::from_str(&self.cli(&[
            "task",
            "enqueue",
            "--instance",
            instance,
            "--command",
            command,
            "--options",
            &opts,
        ])?)?)
    }

    /// Take task `id` as the upstream server's own executor would (`pending → running`).
    pub fn dispatch_task(&self, id: &str) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["task", "dispatch", id])?)?)
    }

    /// Every task of `instance`, oldest first, as the store has them.
    pub fn tasks(&self, instance: &str) -> Result<Vec<Value>> {
        Ok(serde_json::from_str(&self.cli(&[
            "task",
            "list",
            "--instance",
            instance,
        ])?)?)
    }

    /// Wait until task `id` has ended (`complete`, `failed` or `cancelled`); returns it.
    pub fn wait_task(&self, instance: &str, id: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self
                .tasks(instance)?
                .into_iter()
                .find(|t| t["id"].as_str() == Some(id))
                .with_context(|| format!("no task {id}"))?;
            if matches!(
                t["status"].as_str(),
                Some("complete" | "failed" | "cancelled")
            ) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("task {id} still {} after {timeout:?}: {t}", t["status"]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn instances(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_str(&self.cli(&["instances", "--json"])?)?)
    }

    pub fn instance(&self, id: &str) -> Result<Option<Value>> {
        Ok(self
            .instances()?
            .into_iter()
            .find(|i| i["instance_id"].as_str() == Some(id)))
    }

    /// Poll the store until `instance` has at least `count` heartbeats; returns its record.
    pub fn wait_heartbeats(&self, id: &str, count: u64, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let rec = self.instance(id)?;
            if let Some(r) = &rec
                && r["heartbeat_count"].as_u64().unwrap_or(0) >= count
            {
                return Ok(r.clone());
            }
            if Instant::now() > deadline {
                bail!("instance {id} did not reach {count} heartbeats in {timeout:?}: {rec:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
            let st = c.wait()?;
            if !st.success() {
                bail!("devplatform exited with {st}");
            }
        }
        Ok(())
    }
}

impl Drop for DevPlatform {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Err(e) = c.kill() {
                eprintln!("killing devplatform: {e}");
            }
            if let Err(e) = c.wait() {
                eprintln!("waiting for devplatform: {e}");
            }
        }
    }
}
