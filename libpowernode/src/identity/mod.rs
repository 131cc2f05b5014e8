//! Who this node is: the identity discovery cascade.
//!
//! Strategies run in the contract's order (shared/node-api.md Part B §3, extended by issue 3):
//! kernel command line → fw-cfg → claim polling → AWS → GCP → Azure → DigitalOcean → Hetzner →
//! KubeVirt config drive → vSphere guestinfo → DMI → local identity.cfg. The first that yields an
//! instance UUID wins; a strategy that finds nothing says why, and a strategy that fails is
//! remembered and reported only if nothing wins.
//!
//! The clouds are asked only when the firmware names them (DMI vendor strings, `dmi.rs`); a node
//! with no DMI at all is the one case where every cloud is probed blindly. `CA_PEM_FILE` is read
//! only beside the identity.cfg that names it, and only if it holds certificates (`idcfg.rs`).
//!
//! Speed: the two leading local strategies are read first (no packet leaves the node when they
//! match); everything else then starts at once, and the cascade walks the results in order, so a
//! black-holed metadata address costs one overall deadline ([`Settings::deadline`], 1.8 s), not the
//! sum of the probes. Precedence stays the fixed order whatever finishes first.
//!
//! The result is cached in `/run/powernode/identity/identity.json` (0640, group powernode-identity): it holds the bootstrap token, so
//! it never leaves the node and [`Identity::public`] is what D-Bus and the CLI show. Once the node
//! is enrolled (PKI present) a restart never re-runs network discovery: see [`obtain`].

pub mod claim;
mod cloud;
mod cmdline;
mod configdrive;
mod dmi;
mod fwcfg;
mod http;
mod idcfg;
mod userdata;
mod vsphere;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{Config, PlatformConfig};
use crate::fsutil::{atomic_write, ensure_dir, read_optional};
use crate::paths::Paths;
use crate::pki::PkiStore;
use crate::retry::RetryPolicy;
use crate::{Error, Result};

pub use cmdline::parse_cmdline;
pub use idcfg::parse_identity_cfg;
pub use userdata::{UserDataFormat, parse_user_data};

/// Where an identity came from; the strings are the stable names of `introspect --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    KernelCmdline,
    FwCfg,
    Claim,
    Aws,
    Gcp,
    Azure,
    Digitalocean,
    Hetzner,
    Kubevirt,
    Vsphere,
    Dmi,
    IdentityCfg,
    /// Rebuilt from the enrolled credentials (`pki/meta.json`) after a reboot, when no local
    /// source names the node: network discovery is never re-run once enrolled.
    Pki,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::KernelCmdline => "kernel-cmdline",
            Source::FwCfg => "fw-cfg",
            Source::Claim => "claim",
            Source::Aws => "aws",
            Source::Gcp => "gcp",
            Source::Azure => "azure",
            Source::Digitalocean => "digitalocean",
            Source::Hetzner => "hetzner",
            Source::Kubevirt => "kubevirt",
            Source::Vsphere => "vsphere",
            Source::Dmi => "dmi",
            Source::IdentityCfg => "identity-cfg",
            Source::Pki => "pki",
        }
    }
}

/// A discovered identity. Holds secrets: never log it, never put it on D-Bus.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub instance_uuid: String,
    pub platform_url: Option<String>,
    pub ca_pem: Option<String>,
    pub bootstrap_token: Option<String>,
    /// fw-cfg `instance_name`, for the transient hostname.
    #[serde(default)]
    pub instance_name: Option<String>,
    pub source: Source,
    /// Human-readable: which file, key or URL decided.
    pub evidence: String,
    #[serde(with = "time::serde::rfc3339")]
    pub discovered_at: OffsetDateTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.public())
    }
}

/// The identity with every secret removed: what D-Bus, logs and `introspect` may show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PublicIdentity {
    pub instance_uuid: String,
    pub source: &'static str,
    pub platform_url: Option<String>,
    pub has_ca_pem: bool,
    /// Always "<redacted>" when a token exists; never the token.
    pub bootstrap_token: Option<&'static str>,
    pub instance_name: Option<String>,
    pub evidence: String,
    pub discovered_at: String,
}

impl Identity {
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            instance_uuid: self.instance_uuid.clone(),
            source: self.source.as_str(),
            platform_url: self.platform_url.clone(),
            has_ca_pem: self.ca_pem.is_some(),
            bootstrap_token: self.bootstrap_token.as_ref().map(|_| "<redacted>"),
            instance_name: self.instance_name.clone(),
            evidence: self.evidence.clone(),
            discovered_at: rfc3339(self.discovered_at),
        }
    }

    /// Validate the fields a strategy found and make them an identity.
    fn from_fields(f: Fields, source: Source, evidence: String) -> Result<Identity> {
        let uuid = f.instance_uuid.unwrap_or_default();
        validate_instance_id(&uuid)?;
        if let Some(u) = &f.platform_url
            && !u.starts_with("https://")
        {
            return Err(Error::Identity(format!(
                "{}: platform URL must be https://, got {u:?}",
                source.as_str()
            )));
        }
        if let Some(ca) = &f.ca_pem
            && !ca.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(Error::Identity(format!(
                "{}: ca_pem is not a PEM certificate",
                source.as_str()
            )));
        }
        Ok(Identity {
            instance_uuid: uuid,
            platform_url: f.platform_url,
            ca_pem: f.ca_pem,
            bootstrap_token: f.bootstrap_token,
            instance_name: f.instance_name,
            source,
            evidence,
            discovered_at: OffsetDateTime::now_utc(),
        })
    }
}

/// Instance ids are UUIDs in practice; accept identifier characters only, since the id ends up in
/// file names, certificate subjects and D-Bus properties.
pub fn validate_instance_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::Identity("instance id is empty".into()));
    }
    if id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Identity(format!(
            "instance id {id:?} is not a UUID-like identifier"
        )));
    }
    Ok(())
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The raw values a source offers; the same shape for every source.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fields {
    pub instance_uuid: Option<String>,
    pub bootstrap_token: Option<String>,
    pub platform_url: Option<String>,
    pub ca_pem: Option<String>,
    pub instance_name: Option<String>,
}

/// What one strategy concluded.
#[derive(Debug)]
pub enum Probe {
    Found(Identity),
    /// Nothing here; the reason is kept as evidence of why the cascade moved on.
    Absent(String),
}

/// The link-local metadata address every supported cloud answers on.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";
/// Environment override of `[identity] metadata_url` (tests point it at loopback).
pub const METADATA_URL_ENV: &str = "POWERNODE_METADATA_URL";
/// One metadata request (the upstream agent's per-probe budget).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Every cloud probe, retries included, is over by then: the worst case of the whole network
/// phase when the metadata address black-holes. Issue 3's goal is ≤ 2 s for the whole cascade
/// (upstream's budget is 30 s); 1.8 s leaves room for the local strategies and the process.
/// It still fits one full 1.5 s probe.
pub const CLOUD_DEADLINE: Duration = Duration::from_millis(1800);
/// Metadata bodies above this are refused (upstream's cap; user-data for us is a few lines).
pub const METADATA_BODY_LIMIT: usize = 64 * 1024;
/// `vmware-rpctool "info-get guestinfo.powernode.userdata"` is the guestinfo interface.
pub const DEFAULT_VSPHERE_COMMAND: &str = "vmware-rpctool";
/// A claim server asking for faster polling than this is slowed down to it.
pub const CLAIM_MIN_POLL: Duration = Duration::from_secs(1);

/// Called with each new claim code while a claim is pending (D-Bus shows it).
pub type ClaimObserver = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything the strategies need besides the node root: where to ask and how long to wait.
#[derive(Clone)]
pub struct Settings {
    /// Base URL of the cloud metadata service, plain `http://`.
    pub metadata_url: String,
    pub probe_timeout: Duration,
    pub deadline: Duration,
    pub body_limit: usize,
    /// argv prefix of the guestinfo tool; `info-get guestinfo.<key>` is appended. Empty disables.
    pub vsphere_command: Vec<String>,
    /// `[platform]` settings: the claim request goes through the platform client, and a configured
    /// `url` is the platform of a DMI identity.
    pub platform: PlatformConfig,
    /// The claim request's retry policy (5xx, timeouts).
    pub retry: RetryPolicy,
    pub claim_min_poll: Duration,
    /// Skip strategies that need the network (claim, clouds): used by `introspect`, and after
    /// enrollment.
    pub offline: bool,
    pub on_claim_code: Option<ClaimObserver>,
    /// How claim requests reach the platform; `None` posts from this process.
    pub claim_transport: Option<Arc<dyn claim::ClaimTransport>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("metadata_url", &self.metadata_url)
            .field("deadline", &self.deadline)
            .field("vsphere_command", &self.vsphere_command)
            .field("offline", &self.offline)
            .finish_non_exhaustive()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            metadata_url: DEFAULT_METADATA_URL.into(),
            probe_timeout: PROBE_TIMEOUT,
            deadline: CLOUD_DEADLINE,
            body_limit: METADATA_BODY_LIMIT,
            vsphere_command: vec![DEFAULT_VSPHERE_COMMAND.into()],
            platform: PlatformConfig::default(),
            retry: RetryPolicy::default(),
            claim_min_poll: CLAIM_MIN_POLL,
            offline: false,
            on_claim_code: None,
            claim_transport: None,
        }
    }
}

impl Settings {
    /// Settings from the merged configuration; `$POWERNODE_METADATA_URL` overrides
    /// `[identity] metadata_url`.
    pub fn from_config(cfg: &Config) -> Result<Settings> {
        let env = std::env::var(METADATA_URL_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        Settings::from_config_with(cfg, env.as_deref())
    }

    /// [`Settings::from_config`] with the environment value passed in (testable without
    /// touching the process environment).
    pub fn from_config_with(cfg: &Config, metadata_env: Option<&str>) -> Result<Settings> {
        let url = metadata_env
            .or(cfg.identity.metadata_url.as_deref())
            .unwrap_or(DEFAULT_METADATA_URL)
            .trim()
            .trim_end_matches('/')
            .to_string();
        if !url.starts_with("http://") {
            return Err(Error::Config(format!(
                "identity metadata URL must be plain http:// (link-local service), got {url:?}"
            )));
        }
        let mut s = Settings {
            metadata_url: url,
            platform: cfg.platform.clone(),
            retry: RetryPolicy::from(&cfg.retry),
            ..Settings::default()
        };
        if let Some(cmd) = &cfg.identity.vsphere_command {
            s.vsphere_command = cmd.clone();
        }
        Ok(s)
    }
}

/// What every probe gets: the node root, the settings and one HTTP client for metadata.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub paths: Paths,
    pub settings: Settings,
    http: reqwest::Client,
}

impl Ctx {
    pub fn new(paths: Paths, settings: Settings) -> Result<Ctx> {
        let http = reqwest::Client::builder()
            // Metadata is link-local: a proxy from the environment must never see it.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.probe_timeout)
            .timeout(settings.probe_timeout)
            .http1_only()
            // Metadata is plain HTTP. A preconfigured TLS config with no roots keeps reqwest from
            // loading the platform verifier, which fails on nodes without a CA store (minimal
            // images, the initramfs) and would never be used here anyway.
            .tls_backend_preconfigured(no_roots_tls()?)
            .user_agent(concat!("powernode-identityd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("metadata HTTP client: {e}")))?;
        Ok(Ctx {
            paths,
            settings,
            http,
        })
    }

    /// Paths plus the settings read from the node's configuration.
    pub fn from_paths(paths: &Paths) -> Result<Ctx> {
        let cfg = Config::load(paths)?;
        Ctx::new(paths.clone(), Settings::from_config(&cfg)?)
    }

    fn metadata(&self, path: &str) -> String {
        format!("{}{path}", self.settings.metadata_url)
    }
}

/// A boxed probe future (strategies are trait objects; native async fns in traits are not).
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<Probe>> + Send + 'a>>;

/// One identity source. Every method has a default, so a source implements only what it offers
/// (the afterburn provider model): local sources implement [`Strategy::probe_local`], network
/// sources override [`Strategy::probe`] and [`Strategy::needs_network`].
pub trait Strategy: Send + Sync {
    fn source(&self) -> Source;

    /// Sends packets (cloud metadata, the claim server): skipped by offline resolution.
    fn needs_network(&self) -> bool {
        false
    }

    /// The cloud metadata probes share one overall deadline; claim polling is exempt (it waits
    /// for a human).
    fn bounded_by_deadline(&self) -> bool {
        self.needs_network()
    }

    /// Look for an identity without blocking on the network. The default: nothing here.
    fn probe_local(&self, _ctx: &Ctx) -> Result<Probe> {
        Ok(Probe::Absent(format!(
            "{}: not available",
            self.source().as_str()
        )))
    }

    /// Look for an identity. The default runs [`Strategy::probe_local`].
    fn probe<'a>(&'a self, ctx: &'a Ctx) -> ProbeFuture<'a> {
        Box::pin(async move { self.probe_local(ctx) })
    }
}

/// The factory: the strategy for one source.
pub fn strategy_for(source: Source) -> Option<Box<dyn Strategy>> {
    Some(match source {
        Source::KernelCmdline => Box::new(cmdline::KernelCmdline),
        Source::FwCfg => Box::new(fwcfg::FwCfg),
        Source::Claim => Box::new(claim::ClaimPoll),
        Source::Aws => Box::new(cloud::Aws),
        Source::Gcp => Box::new(cloud::Gcp),
        Source::Azure => Box::new(cloud::Azure),
        Source::Digitalocean => Box::new(cloud::DigitalOcean),
        Source::Hetzner => Box::new(cloud::Hetzner),
        Source::Kubevirt => Box::new(configdrive::ConfigDrive),
        Source::Vsphere => Box::new(vsphere::Vsphere),
        Source::Dmi => Box::new(dmi::Dmi),
        Source::IdentityCfg => Box::new(idcfg::LocalIdentityCfg),
        Source::Pki => return None,
    })
}

/// The cascade order.
pub const ORDER: [Source; 12] = [
    Source::KernelCmdline,
    Source::FwCfg,
    Source::Claim,
    Source::Aws,
    Source::Gcp,
    Source::Azure,
    Source::Digitalocean,
    Source::Hetzner,
    Source::Kubevirt,
    Source::Vsphere,
    Source::Dmi,
    Source::IdentityCfg,
];

/// Every strategy, in the cascade order.
pub fn default_strategies() -> Vec<Box<dyn Strategy>> {
    ORDER.iter().filter_map(|s| strategy_for(*s)).collect()
}

/// The outcome of a cascade run, with the trail an SRE needs when nothing matched.
#[derive(Debug)]
pub struct Resolution {
    pub identity: Option<Identity>,
    /// One line per strategy tried: `"<source>: <what happened>"`.
    pub trail: Vec<String>,
}

impl Resolution {
    pub fn into_result(self) -> Result<Identity> {
        let trail = self.trail;
        self.identity.ok_or_else(|| {
            Error::Identity(format!("no identity source matched: {}", trail.join("; ")))
        })
    }
}

/// Fold one strategy's outcome into the trail; `Some` when it decided the cascade.
fn settle(trail: &mut Vec<String>, source: Source, r: Result<Probe>) -> Option<Identity> {
    match r {
        Ok(Probe::Found(id)) => {
            trail.push(format!("{}: found ({})", source.as_str(), id.evidence));
            Some(id)
        }
        Ok(Probe::Absent(why)) => {
            trail.push(why);
            None
        }
        Err(e) => {
            trail.push(format!("{}: error: {e}", source.as_str()));
            None
        }
    }
}

/// Run `strategies` in order; the first found identity wins. See the module docs for how the
/// network strategies overlap.
pub async fn resolve_with(ctx: &Ctx, strategies: &[Box<dyn Strategy>]) -> Resolution {
    let mut trail = Vec::new();
    // The leading local strategies decide alone when they match: nothing is sent on the network.
    let lead = strategies.iter().take_while(|s| !s.needs_network()).count();
    for s in &strategies[..lead] {
        if let Some(id) = settle(&mut trail, s.source(), s.probe(ctx).await) {
            return Resolution {
                identity: Some(id),
                trail,
            };
        }
    }
    let rest = &strategies[lead..];
    let mut results: Vec<Option<Result<Probe>>> = rest.iter().map(|_| None).collect();
    let mut running = FuturesUnordered::new();
    for (i, s) in rest.iter().enumerate() {
        if ctx.settings.offline && s.needs_network() {
            results[i] = Some(Ok(Probe::Absent(format!(
                "{}: not probed (offline resolution)",
                s.source().as_str()
            ))));
            continue;
        }
        let deadline = s.bounded_by_deadline().then_some(ctx.settings.deadline);
        let source = s.source();
        let fut = s.probe(ctx);
        running.push(async move {
            let r = match deadline {
                None => fut.await,
                Some(d) => match tokio::time::timeout(d, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Identity(format!(
                        "{}: no answer within the {} ms deadline",
                        source.as_str(),
                        d.as_millis()
                    ))),
                },
            };
            (i, r)
        });
    }
    let mut next = 0;
    loop {
        while next < rest.len() {
            let Some(r) = results[next].take() else {
                break;
            };
            if let Some(id) = settle(&mut trail, rest[next].source(), r) {
                return Resolution {
                    identity: Some(id),
                    trail,
                };
            }
            next += 1;
        }
        if next == rest.len() {
            return Resolution {
                identity: None,
                trail,
            };
        }
        match running.next().await {
            Some((i, r)) => results[i] = Some(r),
            // Unreachable: every undecided slot has a running future.
            None => {
                trail.push("cascade: internal error: a strategy never ran".into());
                return Resolution {
                    identity: None,
                    trail,
                };
            }
        }
    }
}

/// The whole cascade with the default strategies; no caching.
pub async fn discover(ctx: &Ctx) -> Resolution {
    resolve_with(ctx, &default_strategies()).await
}

/// The local strategies only, synchronously (no network, no runtime needed): what
/// `powernode-agent introspect` shows when identityd has not cached anything. Never cached.
pub fn resolve(paths: &Paths) -> Result<Identity> {
    let mut ctx = Ctx::from_paths(paths)?;
    ctx.settings.offline = true;
    resolve_offline(&ctx).into_result()
}

/// [`resolve`] with explicit settings.
pub fn resolve_offline(ctx: &Ctx) -> Resolution {
    let mut trail = Vec::new();
    for s in default_strategies() {
        if s.needs_network() {
            trail.push(format!(
                "{}: not probed (offline resolution)",
                s.source().as_str()
            ));
            continue;
        }
        if let Some(id) = settle(&mut trail, s.source(), s.probe_local(ctx)) {
            return Resolution {
                identity: Some(id),
                trail,
            };
        }
    }
    Resolution {
        identity: None,
        trail,
    }
}

/// The identity the daemon serves, and how it was obtained:
/// 1. the cache (`/run/powernode/identity/identity.json`) if present;
/// 2. if the node is enrolled (`pki/meta.json`): the local sources only — if one names the
///    enrolled instance its source is kept, otherwise the identity is rebuilt from the PKI
///    (source `pki`). Network discovery (claim, clouds) is never re-run, and an enrolled node
///    never silently becomes another instance;
/// 3. the full cascade.
///
/// Anything but the cached case is written to the cache.
pub async fn obtain(ctx: &Ctx) -> Result<Identity> {
    if let Some(id) = load_cached(&ctx.paths)? {
        return Ok(id);
    }
    let store = PkiStore::new(ctx.paths.pki_dir());
    let id = match store.load()? {
        Some(creds) => {
            let mut offline = ctx.clone();
            offline.settings.offline = true;
            let local = resolve_offline(&offline);
            match local.identity {
                Some(id) if id.instance_uuid == creds.meta.instance_id => id,
                other => {
                    if let Some(o) = other {
                        tracing::warn!(
                            enrolled = %creds.meta.instance_id,
                            local = %o.instance_uuid,
                            source = o.source.as_str(),
                            "a local source names another instance than the enrolled one; keeping the enrolled identity"
                        );
                    }
                    Identity {
                        instance_uuid: creds.meta.instance_id.clone(),
                        platform_url: creds.meta.platform_url.clone(),
                        ca_pem: Some(creds.ca_bundle_pem.clone()),
                        bootstrap_token: None,
                        instance_name: None,
                        source: Source::Pki,
                        evidence: format!(
                            "instance_id in {} (enrolled; network discovery not re-run)",
                            store.dir().join("meta.json").display()
                        ),
                        discovered_at: OffsetDateTime::now_utc(),
                    }
                }
            }
        }
        None => discover(ctx).await.into_result()?,
    };
    store_cached(&ctx.paths, &id)?;
    Ok(id)
}

/// The cached identity (`/run/powernode/identity/identity.json`), if any.
pub fn load_cached(paths: &Paths) -> Result<Option<Identity>> {
    let p = paths.identity_json();
    match read_optional(&p, 1024 * 1024)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::malformed("identity.json", e)),
    }
}

pub fn store_cached(paths: &Paths, id: &Identity) -> Result<()> {
    ensure_dir(&paths.identity_run_dir(), 0o750)?;
    let bytes = serde_json::to_vec_pretty(id).map_err(|e| Error::malformed("identity", e))?;
    // Group-readable: identityd's group holds enrolld, the one other reader of the token.
    atomic_write(&paths.identity_json(), &bytes, 0o640)
}

/// A TLS configuration that trusts nothing: for clients that only ever speak plain HTTP.
fn no_roots_tls() -> Result<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

#[cfg(test)]
mod tests;
