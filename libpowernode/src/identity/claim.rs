//! Claim polling (node-api.md Part B §5): a disk image ships `/boot/identity.cfg` with `SERVER`
//! (and a CA) but no `KEY`; the node posts its hardware facts to `POST <SERVER>/…/claim` every
//! `poll_after_seconds` and shows the claim code on the console until an operator confirms it,
//! then takes the instance UUID and a fresh bootstrap token from the `claimed` reply.
//!
//! A boot file with `SERVER`, `ID` and `KEY` is passed through as is (the image was personalised).
//! The claim goes through the platform client, so the server is authenticated with the boot
//! file's CA only, bodies are capped, and each poll uses the shared retry policy.

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dmi::product_uuid;
use super::idcfg::{fill_ca, parse_identity_cfg};
use super::{Ctx, Fields, Identity, Probe, ProbeFuture, Source, Strategy};
use crate::fsutil::read_optional;
use crate::transport::PlatformClient;
use crate::{Error, Result};

const MAX_BOOT_CFG: u64 = 256 * 1024;
const CLAIM_PATH: &str = "/claim";
/// The server's normal cadence, used when a reply carries none.
const DEFAULT_POLL: Duration = Duration::from_secs(30);
/// How soon to try again when the claim relay (enrolld on D-Bus) could not be reached.
const RELAY_RETRY: Duration = Duration::from_secs(2);

/// Who carries a claim request to the platform. identityd's unit may reach only loopback and the
/// metadata address, so the daemon hands the POST to enrolld (which talks to the platform
/// anyway) over D-Bus; the CLI and tests post in-process with [`post_claim`].
pub trait ClaimTransport: Send + Sync {
    /// POST `request_json` to `<server><prefix>/claim`, trusting only `ca_pem`; the reply's
    /// `data` as JSON text. Errors keep their kind (unreachable vs refused).
    fn post<'a>(
        &'a self,
        server: &'a str,
        ca_pem: &'a str,
        request_json: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>>;
}

/// The claim request a node may send: parsing into it is how a relay (enrolld) makes sure it
/// forwards nothing else.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClaimRequestBody {
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmi_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub agent_version: String,
    pub architecture: String,
}

/// One claim POST from this process: the platform client with the boot file's CA only.
pub async fn post_claim(
    platform: &crate::config::PlatformConfig,
    server: &str,
    ca_pem: &str,
    request_json: &str,
) -> Result<String> {
    let body: ClaimRequestBody =
        serde_json::from_str(request_json).map_err(|e| Error::malformed("claim request", e))?;
    let client = PlatformClient::new(platform, server, ca_pem, None, None)?;
    let reply: serde_json::Value = client.post(CLAIM_PATH, &body).await?;
    Ok(reply.to_string())
}

#[derive(Debug, Serialize)]
struct ClaimRequest {
    mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    dmi_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    agent_version: &'static str,
    architecture: &'static str,
}

#[derive(Debug, Deserialize)]
struct ClaimReply {
    status: String,
    poll_after_seconds: Option<u64>,
    claim_code: Option<String>,
    bootstrap_token: Option<String>,
    instance_uuid: Option<String>,
    platform_url: Option<String>,
    message: Option<String>,
}

pub struct ClaimPoll;

/// eth0's MAC, else the alphabetically first interface other than `lo` that has one.
fn mac_address(ctx: &Ctx) -> Result<String> {
    let net = ctx.paths.under("/sys/class/net");
    let read = |name: &str| -> Result<Option<String>> {
        Ok(read_optional(&net.join(name).join("address"), 64)?
            .map(|b| String::from_utf8_lossy(&b).trim().to_ascii_lowercase())
            .filter(|m| !m.is_empty() && m != "00:00:00:00:00:00"))
    };
    if let Some(m) = read("eth0")? {
        return Ok(m);
    }
    let mut names: Vec<String> = match std::fs::read_dir(&net) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lo")
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("read directory", &net, e)),
    };
    names.sort();
    for n in names {
        if let Some(m) = read(&n)? {
            return Ok(m);
        }
    }
    Err(Error::Identity(format!(
        "claim: no network interface with a MAC address under {}",
        net.display()
    )))
}

fn hostname(ctx: &Ctx) -> Result<Option<String>> {
    Ok(
        read_optional(&ctx.paths.under("/proc/sys/kernel/hostname"), 256)?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .filter(|h| !h.is_empty()),
    )
}

/// The banner: stdout reaches the console and the journal under the unit
/// (`StandardOutput=journal+console`), and the console directly in the initramfs.
fn show_claim_code(ctx: &Ctx, code: &str, server: &str) {
    let banner = format!(
        "\n==============================================\n  powernode: this node is waiting to be claimed\n  claim code: {code}\n  platform:   {server}\n==============================================\n"
    );
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(banner.as_bytes()).and_then(|()| out.flush()) {
        tracing::warn!(error = %e, "cannot print the claim banner");
    }
    tracing::warn!(
        claim_code = code,
        platform = server,
        "waiting to be claimed"
    );
    if let Some(cb) = &ctx.settings.on_claim_code {
        cb(code);
    }
}

async fn poll(ctx: &Ctx, cfg_path: &str, server: String, fields: Fields) -> Result<Probe> {
    let ca = fields.ca_pem.clone().ok_or_else(|| {
        Error::Identity(format!(
            "claim: {cfg_path} has SERVER but no CA_PEM or CA_PEM_FILE; the claim server cannot be authenticated"
        ))
    })?;
    let request = ClaimRequest {
        mac: mac_address(ctx)?,
        dmi_uuid: product_uuid(ctx).ok().flatten(),
        hostname: hostname(ctx)?,
        agent_version: crate::AGENT_VERSION,
        architecture: crate::architecture(),
    };
    let request_json =
        serde_json::to_string(&request).map_err(|e| Error::malformed("claim request", e))?;
    let url = format!(
        "{}{}{CLAIM_PATH}",
        server.trim_end_matches('/'),
        ctx.settings.platform.api_prefix
    );
    let mut shown: Option<String> = None;
    loop {
        let reply: Result<ClaimReply> = ctx
            .settings
            .retry
            .run(|_| async {
                let text = match &ctx.settings.claim_transport {
                    Some(t) => t.post(&server, &ca, request_json.clone()).await?,
                    None => post_claim(&ctx.settings.platform, &server, &ca, &request_json).await?,
                };
                serde_json::from_str::<ClaimReply>(&text)
                    .map_err(|e| Error::malformed("claim reply", e))
            })
            .await;
        let wait = match reply {
            // A relay that is not there yet (enrolld being activated or restarted): soon again.
            Err(e @ Error::Bus(_)) => {
                tracing::warn!(error = %e, "claim relay unavailable, retrying");
                RELAY_RETRY
            }
            // Transient failures outlived the retry policy: the node keeps polling (a human is
            // expected to act; the platform may be down for a while).
            Err(
                e @ (Error::Unreachable(_) | Error::NotConnected(_) | Error::Unavailable { .. }),
            ) => {
                tracing::warn!(error = %e, "claim poll failed, polling again");
                DEFAULT_POLL
            }
            Err(e) => return Err(Error::Identity(format!("claim: {url}: {e}"))),
            Ok(r) => {
                let wait = r
                    .poll_after_seconds
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_POLL);
                match r.status.as_str() {
                    "pending" => {
                        let code = r.claim_code.unwrap_or_default();
                        if shown.as_deref() != Some(code.as_str()) {
                            show_claim_code(ctx, &code, &server);
                            shown = Some(code);
                        }
                        wait
                    }
                    "claimed" => return claimed(r, &url, &server, fields, shown),
                    "expired" => {
                        return Err(Error::Identity(format!(
                            "claim: {url} says the claim expired{} — restart discovery to get a new code",
                            shown
                                .map(|c| format!(" (code {c} was not confirmed in time)"))
                                .unwrap_or_default()
                        )));
                    }
                    "error" => {
                        tracing::warn!(
                            message = r.message.as_deref().unwrap_or(""),
                            "claim server reported an error, polling again"
                        );
                        wait
                    }
                    other => {
                        return Err(Error::Identity(format!(
                            "claim: {url} answered unknown status {other:?}"
                        )));
                    }
                }
            }
        };
        tokio::time::sleep(wait.max(ctx.settings.claim_min_poll)).await;
    }
}

fn claimed(
    r: ClaimReply,
    url: &str,
    server: &str,
    boot: Fields,
    code: Option<String>,
) -> Result<Probe> {
    let (Some(uuid), Some(token)) = (r.instance_uuid, r.bootstrap_token) else {
        return Err(Error::Identity(format!(
            "claim: {url} said claimed without instance_uuid and bootstrap_token"
        )));
    };
    let fields = Fields {
        instance_uuid: Some(uuid),
        bootstrap_token: Some(token),
        // The boot file's server is the platform; the reply's URL only fills a gap.
        platform_url: Some(server.to_string()).or(r.platform_url),
        ca_pem: boot.ca_pem,
        instance_name: boot.instance_name,
    };
    Identity::from_fields(
        fields,
        Source::Claim,
        format!(
            "claimed via POST {url}{}",
            code.map(|c| format!(" (claim code {c})"))
                .unwrap_or_default()
        ),
    )
    .map(Probe::Found)
}

impl Strategy for ClaimPoll {
    fn source(&self) -> Source {
        Source::Claim
    }
    fn needs_network(&self) -> bool {
        true
    }
    /// Waiting for a human is not bounded by the metadata deadline.
    fn bounded_by_deadline(&self) -> bool {
        false
    }
    fn probe<'a>(&'a self, ctx: &'a Ctx) -> ProbeFuture<'a> {
        Box::pin(async move {
            let p = ctx.paths.boot_identity_cfg();
            let Some(bytes) = read_optional(&p, MAX_BOOT_CFG)? else {
                return Ok(Probe::Absent(format!("claim: {} missing", p.display())));
            };
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::Identity(format!("claim: {} is not UTF-8", p.display())))?;
            let mut cfg = parse_identity_cfg(&text);
            let Some(server) = cfg.fields.platform_url.clone() else {
                return Ok(Probe::Absent(format!(
                    "claim: {} has no SERVER",
                    p.display()
                )));
            };
            fill_ca(&ctx.paths, &p, &mut cfg)?;
            let path = p.display().to_string();
            if cfg.fields.bootstrap_token.is_some() {
                if cfg.fields.instance_uuid.is_none() {
                    return Ok(Probe::Absent(format!("claim: {path} has KEY but no ID")));
                }
                return Identity::from_fields(
                    cfg.fields,
                    Source::Claim,
                    format!("ID and KEY in {path}"),
                )
                .map(Probe::Found);
            }
            poll(ctx, &path, server, cfg.fields).await
        })
    }
}
