//! VMware vSphere guestinfo: `vmware-rpctool "info-get guestinfo.powernode.userdata"` (or any
//! configured argv prefix, e.g. `vmtoolsd --cmd`), with `guestinfo.powernode.userdata.encoding`
//! = `base64` for encoded values — the same key pair convention as Ignition's guestinfo.
//!
//! A missing tool means "not vSphere"; a non-zero exit means the key is not set (the tools exit
//! 1 with "No value found"); a tool that hangs is killed after the probe timeout. The secret
//! travels on the tool's stdout only, never in argv or the environment.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use super::cloud::identity_from_user_data;
use super::{Ctx, Probe, ProbeFuture, Source, Strategy};
use crate::{Error, Result};

const KEY: &str = "guestinfo.powernode.userdata";
const ENCODING_KEY: &str = "guestinfo.powernode.userdata.encoding";
/// How often a running tool is checked for exit.
const POLL: Duration = Duration::from_millis(10);

pub struct Vsphere;

enum Outcome {
    NoTool(String),
    Unset(String),
    Value(Vec<u8>),
}

/// Run `argv… "info-get <key>"` with a timeout; stdout capped at the metadata body limit.
fn info_get(ctx: &Ctx, key: &str) -> Result<Outcome> {
    let argv = &ctx.settings.vsphere_command;
    let Some((prog, args)) = argv.split_first() else {
        return Ok(Outcome::NoTool("no guestinfo command configured".into()));
    };
    let mut child = match Command::new(prog)
        .args(args)
        .arg(format!("info-get {key}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Outcome::NoTool(format!("{prog} not installed")));
        }
        Err(e) => return Err(Error::io("run", prog, e)),
    };
    let limit = ctx.settings.body_limit;
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(out) = stdout.as_mut()
            && let Err(e) = out.take(limit as u64 + 1).read_to_end(&mut buf)
        {
            tracing::debug!(error = %e, "reading guestinfo tool output");
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > ctx.settings.probe_timeout => {
                if let Err(e) = child.kill() {
                    tracing::warn!(error = %e, "killing the guestinfo tool");
                }
                if let Err(e) = child.wait() {
                    tracing::warn!(error = %e, "reaping the guestinfo tool");
                }
                return Err(Error::Identity(format!(
                    "vsphere: {prog} did not exit within {} ms",
                    ctx.settings.probe_timeout.as_millis()
                )));
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Err(Error::io("wait for", prog, e)),
        }
    };
    let out = reader
        .join()
        .map_err(|_| Error::Identity("vsphere: output reader panicked".into()))?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take()
            && let Err(e) = (&mut e).take(512).read_to_string(&mut err)
        {
            tracing::debug!(error = %e, "reading guestinfo tool stderr");
        }
        return Ok(Outcome::Unset(format!(
            "{prog} info-get {key}: {status}: {}",
            err.trim()
        )));
    }
    if out.len() > limit {
        return Err(Error::Identity(format!(
            "vsphere: {key} exceeds the limit of {limit} bytes"
        )));
    }
    Ok(Outcome::Value(out))
}

impl Strategy for Vsphere {
    fn source(&self) -> Source {
        Source::Vsphere
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let value = match info_get(ctx, KEY)? {
            Outcome::NoTool(why) => return Ok(Probe::Absent(format!("vsphere: {why}"))),
            Outcome::Unset(why) => return Ok(Probe::Absent(format!("vsphere: {why}"))),
            Outcome::Value(v) => v,
        };
        let encoding = match info_get(ctx, ENCODING_KEY)? {
            Outcome::Value(v) => String::from_utf8_lossy(&v).trim().to_ascii_lowercase(),
            Outcome::NoTool(_) | Outcome::Unset(_) => String::new(),
        };
        let data = match encoding.as_str() {
            "" => value,
            "base64" | "b64" => {
                let clean: Vec<u8> = value
                    .into_iter()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(clean)
                    .map_err(|e| Error::Identity(format!("vsphere: {KEY} is not base64: {e}")))?
            }
            other => {
                return Err(Error::Identity(format!(
                    "vsphere: unsupported {ENCODING_KEY} {other:?} (base64 or unset)"
                )));
            }
        };
        identity_from_user_data(Source::Vsphere, &format!("{KEY} via guestinfo"), &data)
    }

    /// The tool is a child process: wait for it off the runtime thread.
    fn probe<'a>(&'a self, ctx: &'a Ctx) -> ProbeFuture<'a> {
        let ctx = ctx.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Vsphere.probe_local(&ctx))
                .await
                .map_err(|e| Error::Identity(format!("vsphere: probe task failed: {e}")))?
        })
    }
}
