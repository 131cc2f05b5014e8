//! Cloud metadata strategies: AWS (IMDSv2), GCP, Azure, DigitalOcean, Hetzner. Each first asks
//! a question only its cloud answers (the detection step: any "absent" answer means "not this
//! cloud"), then fetches the user-data and parses it in the three formats.
//!
//! Nothing is sent unless the firmware names the cloud (DMI vendor strings, see
//! [`super::dmi::Firmware::names`]): the metadata address is link-local, and on a LAN or in a test
//! machine whatever answers there is not a cloud. Only a node without any DMI is probed blindly.
//!
//! URLs and headers are each cloud's documented interface; the base address is
//! [`super::Settings::metadata_url`] (`http://169.254.169.254`, loopback in tests).

use base64::Engine;
use reqwest::Method;

use super::dmi::firmware;
use super::http::{MetaError, fetch};
use super::userdata::parse_user_data;
use super::{Ctx, Identity, Probe, ProbeFuture, Source, Strategy};
use crate::{Error, Result};

/// IMDSv2 session tokens live this long; one cascade needs seconds.
const AWS_TOKEN_TTL_SECONDS: &str = "60";

/// A cloud that is "detect with a GET, then GET the user-data".
struct Spec {
    source: Source,
    detect: &'static str,
    /// A response header detection must carry (GCP answers `Metadata-Flavor: Google`).
    detect_reply_header: Option<(&'static str, &'static str)>,
    user_data: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Azure returns userData base64-encoded.
    base64: bool,
}

const GCP: Spec = Spec {
    source: Source::Gcp,
    detect: "/computeMetadata/v1/",
    detect_reply_header: Some(("metadata-flavor", "Google")),
    user_data: "/computeMetadata/v1/instance/attributes/user-data",
    headers: &[("Metadata-Flavor", "Google")],
    base64: false,
};

const AZURE: Spec = Spec {
    source: Source::Azure,
    detect: "/metadata/instance?api-version=2021-02-01",
    detect_reply_header: None,
    user_data: "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
    headers: &[("Metadata", "true")],
    base64: true,
};

const DIGITALOCEAN: Spec = Spec {
    source: Source::Digitalocean,
    detect: "/metadata/v1/id",
    detect_reply_header: None,
    user_data: "/metadata/v1/user-data",
    headers: &[],
    base64: false,
};

const HETZNER: Spec = Spec {
    source: Source::Hetzner,
    detect: "/hetzner/v1/metadata/instance-id",
    detect_reply_header: None,
    user_data: "/hetzner/v1/userdata",
    headers: &[],
    base64: false,
};

fn err(source: Source, e: impl std::fmt::Display) -> Error {
    Error::Identity(format!("{}: {e}", source.as_str()))
}

/// `Some(absent)` when the firmware says this node is not one of `source`'s machines: then the
/// cloud is not asked anything. A node without DMI at all is probed blindly.
fn ruled_out_by_firmware(ctx: &Ctx, source: Source) -> Result<Option<Probe>> {
    Ok(match firmware(ctx)? {
        None => None,
        Some(fw) if fw.names(source) => None,
        Some(fw) => Some(Probe::Absent(format!(
            "{}: not probed: the firmware does not name this cloud ({})",
            source.as_str(),
            fw.describe()
        ))),
    })
}

/// The detection step's verdict: `Ok(None)` when the cloud is there.
async fn detect(
    ctx: &Ctx,
    source: Source,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    want_header: Option<(&str, &str)>,
) -> Result<std::result::Result<super::http::Reply, Probe>> {
    let url = ctx.metadata(path);
    match fetch(ctx, method, &url, headers).await {
        Ok(r) => {
            if let Some((h, v)) = want_header
                && r.headers.get(h).and_then(|x| x.to_str().ok()) != Some(v)
            {
                return Ok(Err(Probe::Absent(format!(
                    "{}: {url} answered without `{h}: {v}`",
                    source.as_str()
                ))));
            }
            Ok(Ok(r))
        }
        Err(MetaError::Absent(m) | MetaError::Status(m)) => Ok(Err(Probe::Absent(format!(
            "{}: not this cloud ({m})",
            source.as_str()
        )))),
        Err(e) => Err(err(source, e)),
    }
}

/// Fetch and parse the user-data once the cloud is detected.
async fn user_data(
    ctx: &Ctx,
    source: Source,
    path: &str,
    headers: &[(&str, &str)],
    base64: bool,
) -> Result<Probe> {
    let url = ctx.metadata(path);
    let body = match fetch(ctx, Method::GET, &url, headers).await {
        Ok(r) => r.body,
        Err(MetaError::Absent(m)) => {
            return Ok(Probe::Absent(format!(
                "{}: instance has no user-data ({m})",
                source.as_str()
            )));
        }
        Err(e) => return Err(err(source, e)),
    };
    let body = if base64 { maybe_base64(body) } else { body };
    identity_from_user_data(source, &format!("user-data from {url}"), &body)
}

/// Azure documents userData as base64; decode when it decodes to text, else take it as is.
fn maybe_base64(body: Vec<u8>) -> Vec<u8> {
    let trimmed: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    match base64::engine::general_purpose::STANDARD.decode(&trimmed) {
        Ok(d) if !trimmed.is_empty() && std::str::from_utf8(&d).is_ok() => d,
        _ => body,
    }
}

/// Shared by every source that delivers user-data (clouds, config drive, guestinfo).
pub(super) fn identity_from_user_data(source: Source, what: &str, body: &[u8]) -> Result<Probe> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Probe::Absent(format!(
            "{}: {what} is empty",
            source.as_str()
        )));
    }
    match parse_user_data(body).map_err(|e| err(source, format!("{what}: {e}")))? {
        None => Ok(Probe::Absent(format!(
            "{}: {what} holds no powernode identity",
            source.as_str()
        ))),
        Some((fields, fmt)) => Identity::from_fields(
            fields,
            source,
            format!("{}: {what} ({})", source.as_str(), fmt.as_str()),
        )
        .map(Probe::Found),
    }
}

async fn simple(ctx: &Ctx, spec: &Spec) -> Result<Probe> {
    if let Some(absent) = ruled_out_by_firmware(ctx, spec.source)? {
        return Ok(absent);
    }
    if let Err(absent) = detect(
        ctx,
        spec.source,
        Method::GET,
        spec.detect,
        spec.headers,
        spec.detect_reply_header,
    )
    .await?
    {
        return Ok(absent);
    }
    user_data(ctx, spec.source, spec.user_data, spec.headers, spec.base64).await
}

/// AWS IMDSv2: `PUT /latest/api/token` (TTL header) then the user-data with the session token.
pub struct Aws;

impl Strategy for Aws {
    fn source(&self) -> Source {
        Source::Aws
    }
    fn needs_network(&self) -> bool {
        true
    }
    fn probe<'a>(&'a self, ctx: &'a Ctx) -> ProbeFuture<'a> {
        Box::pin(async move {
            if let Some(absent) = ruled_out_by_firmware(ctx, Source::Aws)? {
                return Ok(absent);
            }
            let reply = match detect(
                ctx,
                Source::Aws,
                Method::PUT,
                "/latest/api/token",
                &[(
                    "X-aws-ec2-metadata-token-ttl-seconds",
                    AWS_TOKEN_TTL_SECONDS,
                )],
                None,
            )
            .await?
            {
                Ok(r) => r,
                Err(absent) => return Ok(absent),
            };
            let token = String::from_utf8(reply.body)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty() && t.len() <= 1024 && !t.contains(['\r', '\n']))
                .ok_or_else(|| err(Source::Aws, "IMDSv2 token reply is not a token"))?;
            user_data(
                ctx,
                Source::Aws,
                "/latest/user-data",
                &[("X-aws-ec2-metadata-token", &token)],
                false,
            )
            .await
        })
    }
}

macro_rules! simple_cloud {
    ($name:ident, $spec:expr, $source:expr) => {
        pub struct $name;
        impl Strategy for $name {
            fn source(&self) -> Source {
                $source
            }
            fn needs_network(&self) -> bool {
                true
            }
            fn probe<'a>(&'a self, ctx: &'a Ctx) -> ProbeFuture<'a> {
                Box::pin(simple(ctx, &$spec))
            }
        }
    };
}

simple_cloud!(Gcp, GCP, Source::Gcp);
simple_cloud!(Azure, AZURE, Source::Azure);
simple_cloud!(DigitalOcean, DIGITALOCEAN, Source::Digitalocean);
simple_cloud!(Hetzner, HETZNER, Source::Hetzner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_base64_is_decoded_only_when_it_is_base64_text() {
        assert_eq!(maybe_base64(b"SUQ9YQ==\n".to_vec()), b"ID=a");
        assert_eq!(maybe_base64(b"ID=a".to_vec()), b"ID=a");
        // Valid base64 of binary stays as is (and is refused later as non-text).
        assert_eq!(maybe_base64(b"//79".to_vec()), b"//79");
    }
}
