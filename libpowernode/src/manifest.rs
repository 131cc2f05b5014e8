//! A module's `manifest.yaml`: the size cap, the YAML parse and the validation against the
//! upstream schema (`tests/fixtures/upstream-modules/modules/.schema/module-manifest.schema.json`,
//! v1), plus the rules the agent adds because the manifest rides inside a signed but still
//! untrusted artifact. [`parse`] is the only way in; a [`Manifest`] that comes out of it has
//! passed every check below.
//!
//! YAML itself: one document, no duplicate keys at any depth, no tags; scalars resolve as YAML 1.2
//! does, so `yes`/`no`/`on`/`off` stay strings and never become booleans.
//!
//! How the schema maps onto Rust: every object the schema closes with `additionalProperties:
//! false` is a struct with `deny_unknown_fields`; `required` is a non-`Option` field; `enum` is a
//! Rust enum; integer bounds are checked while deserializing; `pattern`, `const` and `maxLength`
//! are checked by [`Manifest::validate`]. Properties the schema types as non-nullable reject an
//! explicit `null` (`key:` with no value) instead of reading it as absent. The test module walks
//! the schema file itself and proves each of those constraints is enforced, so the two cannot
//! drift apart silently.
//!
//! Beyond the schema ([`ManifestError::Unsafe`]): path-carrying fields must not contain `..`
//! components, NUL or other control characters (a newline would split one rsync filter line or
//! one unit-file line into two); paths that must stay inside the module tree (the MAC profiles)
//! must be relative, and a service's working directory must be absolute; service names must be
//! unique and make valid systemd unit names; users and environment variable names must be plain
//! names.
//!
//! The schema has no module version, priority or module type: the version travels in the OCI
//! config blob and the priority comes from the platform's module assignment (`modules`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde::de::{self, Deserializer, Error as _};

/// Largest `manifest.yaml` accepted, in bytes. The upstream manifests are 1–4 KiB of metadata; a
/// 256 KiB cap leaves ample room for long file lists while bounding what the YAML parser
/// allocates and how long it runs on bytes taken from an untrusted artifact. Checked before the
/// parser sees a byte.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// The only `schema_version` the upstream schema defines (`"const": 1`).
pub const SCHEMA_VERSION: u32 = 1;

/// `display_name.maxLength` in the schema (counted in characters, as JSON Schema does).
pub const DISPLAY_NAME_MAX_CHARS: usize = 200;

/// `name` pattern `^[a-z](?:[a-z0-9-]{0,62}[a-z0-9])?$`: at most 1 + 62 + 1 characters.
const MODULE_NAME_MAX: usize = 64;

/// `services[].name` pattern `^[a-z0-9][a-z0-9-]{0,62}$`: at most 63 characters.
const SERVICE_NAME_MAX: usize = 63;

/// systemd refuses unit names longer than this (`UNIT_NAME_MAX`).
const UNIT_NAME_MAX: usize = 255;

/// Longest user name accepted for `services[].user` (the Linux `useradd` default limit; systemd
/// warns above it).
const USER_NAME_MAX: usize = 32;

/// A module's `manifest.yaml` (schema v1), validated. Field names and meanings follow the schema.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Stable identifier (`^[a-z](?:[a-z0-9-]{0,62}[a-z0-9])?$`).
    pub name: String,
    #[serde(default, deserialize_with = "non_null")]
    pub display_name: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub license: Option<String>,
    /// rsync-style globs excluded from this module's image at build time.
    #[serde(default, deserialize_with = "non_null")]
    pub mask: Vec<String>,
    /// rsync-style globs this module owns.
    #[serde(default, deserialize_with = "non_null")]
    pub file_spec: Vec<String>,
    /// Globs no neighbour module may ship.
    #[serde(default, deserialize_with = "non_null")]
    pub protected_spec: Vec<String>,
    /// The file spec dependant (config/instance) child modules inherit.
    #[serde(default, deserialize_with = "non_null")]
    pub dependency_spec: Vec<String>,
    /// Debian packages installed into the image at build time.
    #[serde(default, deserialize_with = "non_null")]
    pub package_spec: Vec<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub dependencies: Dependencies,
    #[serde(default, deserialize_with = "non_null")]
    pub init: Option<Init>,
    #[serde(default, deserialize_with = "non_null")]
    pub services: Vec<Service>,
    /// Whether attaching or detaching needs a reboot; `None` when the manifest does not say.
    #[serde(default, deserialize_with = "non_null")]
    pub reboot_required: Option<bool>,
    #[serde(default, deserialize_with = "non_null")]
    pub security: Option<Security>,
    /// AI skills; their schema belongs to the skill subsystem, so they are kept as raw values.
    #[serde(default, deserialize_with = "non_null")]
    pub skills: Vec<serde_json::Value>,
    #[serde(default, deserialize_with = "non_null")]
    pub build: Option<Build>,
}

/// `dependencies`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependencies {
    /// `<owner>/<module>@<version-constraint>` by the schema's description (not a constraint of
    /// the schema, so not enforced here).
    #[serde(default, deserialize_with = "non_null")]
    pub requires: Vec<String>,
    /// Abstract capability tags (`http.server`, `time.sync`).
    #[serde(default, deserialize_with = "non_null")]
    pub provides: Vec<String>,
}

/// `init`: commands the agent runs as subprocesses (never through a shell).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Init {
    #[serde(default, deserialize_with = "non_null")]
    pub start: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub stop: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub restart: Option<String>,
}

/// `services[]`: one long-running process, run as a systemd unit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique within the module; a valid systemd unit name once suffixed with `.service`.
    pub name: String,
    #[serde(default, deserialize_with = "non_null")]
    pub start_command: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub stop_command: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub restart_policy: Option<RestartPolicy>,
    #[serde(default, deserialize_with = "non_null")]
    pub user: Option<String>,
    /// Absolute path on the node.
    #[serde(default, deserialize_with = "non_null")]
    pub working_directory: Option<String>,
    /// Environment for the service. The schema accepts any YAML scalar as a value; non-strings are
    /// rendered in their canonical form (`true`, `8080`), so a value whose spelling matters
    /// (`1.10`, `0755`) must be quoted in the manifest.
    #[serde(default, deserialize_with = "env_vars")]
    pub env: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "non_null")]
    pub exposed_ports: Vec<ExposedPort>,
    /// Linux capabilities (`CAP_*`) the service keeps.
    #[serde(default, deserialize_with = "non_null")]
    pub capabilities: Vec<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub health: Option<Health>,
    /// Free-form metadata (schema: any object).
    #[serde(default, deserialize_with = "non_null")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Service {
    /// The systemd unit name this service is known by within its module.
    pub fn unit_name(&self) -> String {
        format!("{}.service", self.name)
    }
}

/// `services[].restart_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

/// `services[].exposed_ports[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposedPort {
    /// 1..=65535.
    #[serde(deserialize_with = "port_number")]
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, deserialize_with = "non_null")]
    pub name: Option<String>,
}

/// `services[].exposed_ports[].protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// `services[].health`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default, deserialize_with = "non_null")]
    pub endpoint: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub method: Option<HealthMethod>,
    /// At least 1.
    #[serde(default, deserialize_with = "positive_seconds")]
    pub interval_seconds: Option<u64>,
    /// At least 1.
    #[serde(default, deserialize_with = "positive_seconds")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, deserialize_with = "non_negative_seconds")]
    pub initial_delay_seconds: Option<u64>,
}

/// `services[].health.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthMethod {
    Get,
    Post,
    Put,
    Tcp,
}

/// `security`: the policy the agent applies at attach time.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Linux capabilities (`CAP_*`) the module's processes may keep.
    #[serde(default, deserialize_with = "non_null")]
    pub capabilities: Vec<String>,
    /// Profile paths are relative to the module tree; `null` and absent both mean none.
    #[serde(default)]
    pub selinux_profile: Option<String>,
    #[serde(default)]
    pub apparmor_profile: Option<String>,
    #[serde(default)]
    pub seccomp_profile: Option<String>,
    /// Egress allowlist, `host[:port]` entries (default deny).
    #[serde(default, deserialize_with = "non_null")]
    pub egress_allow: Vec<String>,
    /// Needs raw hardware access (the upstream default is `false`).
    #[serde(default, deserialize_with = "non_null")]
    pub privileged: Option<bool>,
    #[serde(default, deserialize_with = "non_null")]
    pub user_namespace: Option<bool>,
}

/// `build`: image build pins. The agent does not act on them; they are kept for reporting.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// `sha256:<64 hex>`; `null` inherits the Containerfile default.
    #[serde(default)]
    pub ubuntu_digest: Option<String>,
    /// `YYYYMMDDTHHMMSSZ`; `null` inherits the Containerfile default.
    #[serde(default)]
    pub apt_snapshot: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub firmware_repo: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub firmware_ref: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub k3s_version: Option<String>,
}

/// Why a manifest was refused. `Display` names the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Refused before parsing.
    #[error("manifest: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// Not one well-formed YAML document (includes duplicate keys and binary input).
    #[error("manifest: not a valid YAML document: {0}")]
    Syntax(String),
    /// Something the upstream schema forbids. `field` is empty for the document itself.
    #[error("manifest: {}{reason}", field_prefix(field))]
    Schema { field: String, reason: String },
    /// Allowed by the schema but refused because the manifest is untrusted input.
    #[error("manifest: {field}: {reason}")]
    Unsafe { field: String, reason: String },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl ManifestError {
    /// Bounded reason label for events, metrics and D-Bus replies.
    pub fn kind(&self) -> &'static str {
        match self {
            ManifestError::TooLarge { .. } => "too_large",
            ManifestError::Syntax(_) => "syntax",
            ManifestError::Schema { .. } => "schema",
            ManifestError::Unsafe { .. } => "unsafe",
        }
    }

    /// The offending field (`services[1].name`), when the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ManifestError::Schema { field, .. } | ManifestError::Unsafe { field, .. }
                if !field.is_empty() =>
            {
                Some(field)
            }
            _ => None,
        }
    }

    fn schema(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestError::Schema {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn unsafe_(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestError::Unsafe {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ManifestError> for crate::Error {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::TooLarge { limit, .. } => crate::Error::TooLarge {
                what: "module manifest",
                limit: limit as u64,
            },
            other => crate::Error::malformed("module", other),
        }
    }
}

/// Parses and validates a `manifest.yaml`: size cap, YAML, schema, then the agent's own rules.
pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            size: bytes.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    // Through a generic YAML value first, for two reasons: serde_yaml_ng rejects duplicate keys
    // at every depth only when it builds a `Value` (deserializing straight into a struct keeps
    // the last of two `env` keys silently), and a `Value` keeps the scalar's YAML type, so a
    // plain `123` or `true` is refused where the schema wants a string instead of being turned
    // into one. Alias expansion and nesting depth are bounded by the crate.
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
    // serde would read an empty or `null` document as an empty mapping and complain about the
    // first missing key; say what is actually wrong.
    let what = match &doc {
        serde_yaml_ng::Value::Mapping(_) => None,
        serde_yaml_ng::Value::Null => Some("empty"),
        serde_yaml_ng::Value::Sequence(_) => Some("a sequence"),
        serde_yaml_ng::Value::Tagged(_) => Some("a tagged value"),
        _ => Some("a scalar"),
    };
    if let Some(what) = what {
        return Err(ManifestError::schema(
            "",
            format!("the document is {what}, not a mapping"),
        ));
    }
    reject_tags(&doc, "")?;
    let manifest: Manifest = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        // serde_path_to_error renders the document root as ".".
        let field = if path == "." { String::new() } else { path };
        ManifestError::schema(field, e.into_inner().to_string())
    })?;
    manifest.validate()?;
    Ok(manifest)
}

/// YAML tags (`!foo`) have no place in the schema's JSON data model, and serde_yaml_ng drops
/// them silently when the target is a string; another consumer of the same manifest might not.
fn reject_tags(v: &serde_yaml_ng::Value, at: &str) -> Result<(), ManifestError> {
    use serde_yaml_ng::Value;
    match v {
        Value::Tagged(t) => Err(ManifestError::schema(
            at,
            format!("YAML tag {} is not allowed", t.tag),
        )),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| reject_tags(item, &format!("{at}[{i}]"))),
        Value::Mapping(map) => map.iter().try_for_each(|(k, item)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            let here = if at.is_empty() {
                key
            } else {
                format!("{at}.{key}")
            };
            reject_tags(k, &here)?;
            reject_tags(item, &here)
        }),
        _ => Ok(()),
    }
}

impl Manifest {
    /// The checks serde cannot express: the schema's `const`, `pattern` and `maxLength`, then
    /// the agent's own rules for untrusted input. [`parse`] calls it; call it again after
    /// changing a `Manifest` by hand.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(ManifestError::schema(
                "schema_version",
                format!(
                    "{} is not supported (only {SCHEMA_VERSION} is defined)",
                    self.schema_version
                ),
            ));
        }
        if !is_module_name(&self.name) {
            return Err(ManifestError::schema(
                "name",
                format!(
                    "{:?} is not a valid module name (lowercase letters, digits and hyphens, \
                     starting with a letter, not ending with a hyphen, at most {MODULE_NAME_MAX})",
                    self.name
                ),
            ));
        }
        if let Some(d) = &self.display_name {
            if d.chars().count() > DISPLAY_NAME_MAX_CHARS {
                return Err(ManifestError::schema(
                    "display_name",
                    format!("longer than {DISPLAY_NAME_MAX_CHARS} characters"),
                ));
            }
            // Shown on terminals and in the platform UI: no escape sequences.
            one_line("display_name", d)?;
        }
        if let Some(d) = &self.description {
            // Folded YAML descriptions legitimately span lines.
            text("description", d)?;
        }
        if let Some(l) = &self.license {
            one_line("license", l)?;
        }
        for (field, specs) in [
            ("mask", &self.mask),
            ("file_spec", &self.file_spec),
            ("protected_spec", &self.protected_spec),
            ("dependency_spec", &self.dependency_spec),
        ] {
            for (i, spec) in specs.iter().enumerate() {
                spec_path(&format!("{field}[{i}]"), spec)?;
            }
        }
        for (i, p) in self.package_spec.iter().enumerate() {
            one_line(&format!("package_spec[{i}]"), p)?;
        }
        for (i, r) in self.dependencies.requires.iter().enumerate() {
            one_line(&format!("dependencies.requires[{i}]"), r)?;
        }
        for (i, p) in self.dependencies.provides.iter().enumerate() {
            one_line(&format!("dependencies.provides[{i}]"), p)?;
        }
        if let Some(init) = &self.init {
            for (field, cmd) in [
                ("init.start", &init.start),
                ("init.stop", &init.stop),
                ("init.restart", &init.restart),
            ] {
                if let Some(cmd) = cmd {
                    one_line(field, cmd)?;
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            svc.validate(&format!("services[{i}]"))?;
            if !seen.insert(svc.name.as_str()) {
                // Two services with one name would be one systemd unit written twice.
                return Err(ManifestError::unsafe_(
                    format!("services[{i}].name"),
                    format!("{:?} is declared by an earlier service too", svc.name),
                ));
            }
        }
        if let Some(sec) = &self.security {
            sec.validate()?;
        }
        if let Some(build) = &self.build {
            build.validate()?;
        }
        Ok(())
    }
}

impl Service {
    fn validate(&self, at: &str) -> Result<(), ManifestError> {
        let unit = self.unit_name();
        if !is_service_name(&self.name) || !is_unit_name(&unit) {
            return Err(ManifestError::schema(
                format!("{at}.name"),
                format!("{:?} is not a valid unit name", self.name),
            ));
        }
        for (field, cmd) in [
            ("start_command", &self.start_command),
            ("stop_command", &self.stop_command),
        ] {
            if let Some(cmd) = cmd {
                // Becomes one ExecStart=/ExecStop= line.
                one_line(&format!("{at}.{field}"), cmd)?;
            }
        }
        if let Some(user) = &self.user
            && !is_user_name(user)
        {
            return Err(ManifestError::unsafe_(
                format!("{at}.user"),
                format!("{user:?} is not a valid user name"),
            ));
        }
        if let Some(dir) = &self.working_directory {
            absolute_path(&format!("{at}.working_directory"), dir)?;
        }
        for (key, value) in &self.env {
            let field = format!("{at}.env.{key}");
            if !is_env_name(key) {
                return Err(ManifestError::unsafe_(
                    field,
                    format!("{key:?} is not a valid environment variable name"),
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(ManifestError::unsafe_(
                    field,
                    "value contains a control character",
                ));
            }
        }
        for (i, port) in self.exposed_ports.iter().enumerate() {
            if let Some(name) = &port.name {
                one_line(&format!("{at}.exposed_ports[{i}].name"), name)?;
            }
        }
        capabilities(&format!("{at}.capabilities"), &self.capabilities)?;
        if let Some(endpoint) = self.health.as_ref().and_then(|h| h.endpoint.as_ref()) {
            // Goes into an HTTP request line.
            one_line(&format!("{at}.health.endpoint"), endpoint)?;
        }
        Ok(())
    }
}

impl Security {
    fn validate(&self) -> Result<(), ManifestError> {
        capabilities("security.capabilities", &self.capabilities)?;
        for (field, profile) in [
            ("security.selinux_profile", &self.selinux_profile),
            ("security.apparmor_profile", &self.apparmor_profile),
            ("security.seccomp_profile", &self.seccomp_profile),
        ] {
            if let Some(p) = profile {
                relative_path(field, p)?;
            }
        }
        for (i, e) in self.egress_allow.iter().enumerate() {
            one_line(&format!("security.egress_allow[{i}]"), e)?;
        }
        Ok(())
    }
}

impl Build {
    fn validate(&self) -> Result<(), ManifestError> {
        if let Some(d) = &self.ubuntu_digest
            && !is_sha256_digest(d)
        {
            return Err(ManifestError::schema(
                "build.ubuntu_digest",
                format!("{d:?} is not sha256:<64 lowercase hex>"),
            ));
        }
        if let Some(s) = &self.apt_snapshot
            && !is_snapshot(s)
        {
            return Err(ManifestError::schema(
                "build.apt_snapshot",
                format!("{s:?} is not a YYYYMMDDTHHMMSSZ timestamp"),
            ));
        }
        for (field, v) in [
            ("build.firmware_repo", &self.firmware_repo),
            ("build.firmware_ref", &self.firmware_ref),
            ("build.k3s_version", &self.k3s_version),
        ] {
            if let Some(v) = v {
                one_line(field, v)?;
            }
        }
        Ok(())
    }
}

fn capabilities(at: &str, caps: &[String]) -> Result<(), ManifestError> {
    for (i, cap) in caps.iter().enumerate() {
        if !is_capability(cap) {
            return Err(ManifestError::schema(
                format!("{at}[{i}]"),
                format!("{cap:?} is not a capability name (CAP_ followed by A-Z and _)"),
            ));
        }
    }
    Ok(())
}

/// `^[a-z](?:[a-z0-9-]{0,62}[a-z0-9])?$`
fn is_module_name(s: &str) -> bool {
    let b = s.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase())
        && b.len() <= MODULE_NAME_MAX
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last() != Some(&b'-')
}

/// `^[a-z0-9][a-z0-9-]{0,62}$`
fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.len() <= SERVICE_NAME_MAX
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// systemd's rule for a plain (non-template) unit name: `[A-Za-z0-9:_.\-]` before the type
/// suffix, at most [`UNIT_NAME_MAX`] bytes. The schema's service-name pattern is stricter; this
/// is kept separate so the unit name itself is what gets checked.
fn is_unit_name(s: &str) -> bool {
    let Some((prefix, suffix)) = s.rsplit_once('.') else {
        return false;
    };
    !prefix.is_empty()
        && s.len() <= UNIT_NAME_MAX
        && suffix == "service"
        && prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":_.-".contains(&c))
}

/// `^CAP_[A-Z_]+$`
fn is_capability(s: &str) -> bool {
    s.strip_prefix("CAP_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|c| c.is_ascii_uppercase() || c == b'_')
    })
}

/// `^sha256:[0-9a-f]{64}$`
fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// `^[0-9]{8}T[0-9]{6}Z$`
fn is_snapshot(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
}

/// A name systemd's `User=` takes without interpretation: no spaces, colons, slashes, quotes,
/// `%` specifiers or a leading `-` that a tool could read as an option.
fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= USER_NAME_MAX
        && !s.starts_with('-')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
}

/// POSIX portable environment variable name.
fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_alphabetic() || *c == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Free text: may span lines, but no NUL or other control characters (terminal escapes).
fn text(field: &str, s: &str) -> Result<(), ManifestError> {
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ManifestError::unsafe_(
            field,
            "contains a control character",
        ));
    }
    Ok(())
}

/// A value that ends up on one line of something (a unit file, an rsync filter, a command line):
/// a newline or NUL would end it early or smuggle in a second line.
fn one_line(field: &str, s: &str) -> Result<(), ManifestError> {
    if s.contains('\0') {
        return Err(ManifestError::unsafe_(field, "contains a NUL byte"));
    }
    if s.chars().any(char::is_control) {
        return Err(ManifestError::unsafe_(
            field,
            "contains a control character (newline, tab, escape…)",
        ));
    }
    Ok(())
}

/// No component is `..` (also spelled with rsync's backslash escapes, `\.\.`).
fn no_parent_components(field: &str, p: &str) -> Result<(), ManifestError> {
    if p.split('/').any(|c| c.replace('\\', "") == "..") {
        return Err(ManifestError::unsafe_(
            field,
            format!("{p:?} has a `..` component"),
        ));
    }
    Ok(())
}

/// An rsync-style glob over the module's own tree. A leading `/` anchors it at the module root,
/// so absolute is fine; `..` is not.
fn spec_path(field: &str, p: &str) -> Result<(), ManifestError> {
    one_line(field, p)?;
    no_parent_components(field, p)
}

/// A path inside the module tree: relative, non-empty, never climbing out.
fn relative_path(field: &str, p: &str) -> Result<(), ManifestError> {
    one_line(field, p)?;
    if p.is_empty() {
        return Err(ManifestError::unsafe_(field, "is empty"));
    }
    if p.starts_with('/') {
        return Err(ManifestError::unsafe_(
            field,
            format!("{p:?} is absolute; it must be relative to the module"),
        ));
    }
    no_parent_components(field, p)
}

/// An absolute path on the node (systemd requires it for `WorkingDirectory=`).
fn absolute_path(field: &str, p: &str) -> Result<(), ManifestError> {
    one_line(field, p)?;
    if !p.starts_with('/') {
        return Err(ManifestError::unsafe_(
            field,
            format!("{p:?} is not an absolute path"),
        ));
    }
    no_parent_components(field, p)
}

/// Present-but-`null` is refused: the schema types these properties without `null`, so
/// `key:` with no value is a type error, not "absent".
fn non_null<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)?.ok_or_else(|| D::Error::custom("null is not allowed here"))
}

/// `exposed_ports[].port`: integer, minimum 1, maximum 65535.
fn port_number<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = i64::deserialize(d)?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| D::Error::custom(format!("{n} is out of range 1..=65535")))
}

fn seconds_at_least<'de, D: Deserializer<'de>>(d: D, min: i64) -> Result<Option<u64>, D::Error> {
    let n: i64 = non_null(d)?;
    u64::try_from(n)
        .ok()
        .filter(|_| n >= min)
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is below the minimum of {min}")))
}

/// `interval_seconds`, `timeout_seconds`: integer, minimum 1.
fn positive_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    seconds_at_least(d, 1)
}

/// `initial_delay_seconds`: integer, minimum 0.
fn non_negative_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    seconds_at_least(d, 0)
}

/// `services[].env`: an object whose values may be any scalar; each becomes a string.
fn env_vars<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map: BTreeMap<String, EnvValue> = non_null(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// One environment value: a YAML scalar in its canonical string form; sequences, mappings and
/// tagged values are refused (systemd can only pass strings).
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl de::Visitor<'_> for Scalar {
            type Value = EnvValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, number, boolean or null")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<EnvValue, E> {
                Ok(EnvValue(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<EnvValue, E> {
                Ok(EnvValue(String::new()))
            }
        }
        d.deserialize_any(Scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_yaml_ng::{Mapping, Value};
    use std::path::{Path, PathBuf};

    fn upstream_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/upstream-modules")
    }

    fn read(rel: &str) -> Vec<u8> {
        let p = upstream_dir().join(rel);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn upstream(rel: &str) -> Manifest {
        parse(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// Every `manifest.yaml` in the upstream tree, found by walking it, so a fixture added later
    /// is covered without touching this file.
    fn all_upstream_manifests() -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("read fixture dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.file_name().is_some_and(|n| n == "manifest.yaml") {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&upstream_dir(), &mut out);
        out.sort();
        out
    }

    #[test]
    fn every_upstream_manifest_parses() {
        let all = all_upstream_manifests();
        // 12 under modules/, 7 under templates/ (shared/fixtures/upstream-modules at copy time).
        assert_eq!(all.len(), 19, "{all:?}");
        for path in all {
            let bytes = std::fs::read(&path).expect("read manifest");
            let m = parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let dir = path
                .parent()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .expect("module dir name");
            // Each module lives in a directory named after it, except the authoring template.
            if dir != "module-repo" {
                assert_eq!(m.name, dir, "{}", path.display());
            }
            assert_eq!(m.schema_version, 1);
        }
    }

    #[test]
    fn upstream_field_values() {
        let m = upstream("modules/powernode-hub-backend/manifest.yaml");
        assert_eq!(
            m.display_name.as_deref(),
            Some("Powernode Hub Backend (Rails 8 API)")
        );
        assert_eq!(
            m.dependencies.requires,
            [
                "powernode/powernode-base-ruby@^1.0",
                "powernode/powernode-postgres@^1.0",
                "powernode/powernode-redis@^1.0"
            ]
        );
        assert_eq!(
            m.protected_spec,
            [
                "/opt/powernode-rails/config/master.key",
                "/opt/powernode-rails/config/credentials"
            ]
        );
        assert_eq!(m.services.len(), 1);
        let rails = &m.services[0];
        assert_eq!(rails.name, "rails");
        assert_eq!(rails.unit_name(), "rails.service");
        assert_eq!(rails.restart_policy, Some(RestartPolicy::Always));
        assert_eq!(rails.user.as_deref(), Some("powernode"));
        assert_eq!(
            rails.working_directory.as_deref(),
            Some("/opt/powernode-rails")
        );
        assert_eq!(
            rails.env.get("RAILS_LOG_TO_STDOUT").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            rails.env.get("RAILS_ENV").map(String::as_str),
            Some("production")
        );
        assert_eq!(
            rails.exposed_ports,
            [ExposedPort {
                port: 3000,
                protocol: Protocol::Tcp,
                name: Some("http".into())
            }]
        );
        assert_eq!(
            rails.health,
            Some(Health {
                endpoint: Some("/up".into()),
                method: Some(HealthMethod::Get),
                interval_seconds: Some(30),
                timeout_seconds: Some(5),
                initial_delay_seconds: Some(30),
            })
        );
        let meta = rails.metadata.as_ref().expect("metadata");
        assert_eq!(meta["ruby_version"], "3.3");
        assert_eq!(
            m.security.as_ref().and_then(|s| s.user_namespace),
            Some(true)
        );
        assert_eq!(
            m.build.as_ref().and_then(|b| b.apt_snapshot.as_deref()),
            Some("20260415T000000Z")
        );

        let m = upstream("modules/powernode-hub-worker/manifest.yaml");
        assert_eq!(m.services[0].restart_policy, Some(RestartPolicy::OnFailure));
        assert!(m.services[0].health.is_none());

        let m = upstream("modules/powernode-log-forwarder/manifest.yaml");
        assert_eq!(m.license.as_deref(), Some("MPL-2.0"));
        assert_eq!(m.dependencies.provides, ["observability.logs"]);
        assert_eq!(m.dependency_spec, ["/etc/vector/upstream.toml"]);
        assert_eq!(m.services[0].capabilities, ["CAP_DAC_READ_SEARCH"]);
        assert!(m.services[0].exposed_ports.is_empty());
        assert!(m.skills.is_empty());
        // A folded (`>`) description keeps its words and gains one trailing newline.
        let d = m.description.as_deref().expect("description");
        assert!(d.starts_with("Tails journald") && d.ends_with("custom build.\n"));

        let m = upstream("modules/powernode-postgres/manifest.yaml");
        assert_eq!(
            m.services[0].stop_command.as_deref(),
            Some("/usr/bin/pg_ctl -D /var/lib/postgresql/16/main stop -m fast")
        );
        assert_eq!(m.services[0].exposed_ports[0].port, 5432);
        assert!(m.init.is_none());

        let m = upstream("modules/powernode-reverse-proxy/manifest.yaml");
        let ports: Vec<u16> = m.services[0].exposed_ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, [80, 443]);

        let m = upstream("modules/powernode-base-ruby/manifest.yaml");
        assert!(m.services.is_empty() && m.security.is_none());
        assert_eq!(m.package_spec.len(), 8);
        assert_eq!(m.reboot_required, Some(false));

        let m = upstream("templates/example-modules/rpi4-firmware/manifest.yaml");
        assert_eq!(m.reboot_required, Some(true));
        let b = m.build.as_ref().expect("build");
        assert_eq!(b.ubuntu_digest, None);
        assert_eq!(b.apt_snapshot, None);
        assert_eq!(b.firmware_ref.as_deref(), Some("1.20240306"));
        let init = m.init.as_ref().expect("init");
        assert_eq!(init.start.as_deref(), Some(""));
        assert!(
            m.protected_spec
                .contains(&"/boot/firmware/bcm*-rpi-*.dtb".to_string())
        );

        let m = upstream("templates/example-modules/chrony/manifest.yaml");
        let sec = m.security.as_ref().expect("security");
        assert_eq!(sec.capabilities, ["CAP_SYS_TIME", "CAP_NET_BIND_SERVICE"]);
        assert_eq!(
            sec.egress_allow,
            ["pool.ntp.org:123", "time.cloudflare.com:123"]
        );
        assert_eq!(sec.privileged, Some(false));
        assert_eq!(
            m.init.as_ref().and_then(|i| i.restart.as_deref()),
            Some("systemctl restart chrony")
        );

        let m = upstream("templates/example-modules/system-base/manifest.yaml");
        assert!(m.protected_spec.contains(&"/etc/shadow".to_string()));
        assert!(m.dependencies.requires.is_empty());

        let m = upstream("templates/module-repo/manifest.yaml");
        assert_eq!(m.name, "example-mod");
        let sec = m.security.as_ref().expect("security");
        assert_eq!(sec.selinux_profile, None);
        assert_eq!(sec.user_namespace, Some(true));
    }

    // ---- the schema walk ----------------------------------------------------------------------

    /// A manifest that sets every property the schema defines, each array holding one element, so
    /// the walk below can mutate any of them in place.
    const FULL: &str = r#"
schema_version: 1
name: full-module
display_name: Full module
description: every property the schema defines
license: MIT
mask: ["/var/cache/apt/**"]
file_spec: ["/etc/full/**"]
protected_spec: ["/etc/full/secret.conf"]
dependency_spec: ["/etc/full/child.conf"]
package_spec: [full]
dependencies:
  requires: [powernode/system-base@^1.0]
  provides: [full.thing]
init:
  start: systemctl start full
  stop: systemctl stop full
  restart: systemctl restart full
services:
  - name: full
    start_command: /usr/bin/full --serve
    stop_command: /usr/bin/full --stop
    restart_policy: on-failure
    user: full
    working_directory: /var/lib/full
    env:
      FULL_MODE: production
    exposed_ports:
      - port: 8080
        protocol: tcp
        name: http
    capabilities: [CAP_NET_BIND_SERVICE]
    health:
      endpoint: /health
      method: GET
      interval_seconds: 10
      timeout_seconds: 2
      initial_delay_seconds: 5
    metadata:
      note: kept as is
reboot_required: false
security:
  capabilities: [CAP_NET_ADMIN]
  selinux_profile: profile.te
  apparmor_profile: apparmor/full
  seccomp_profile: seccomp.json
  egress_allow: ["example.org:443"]
  privileged: false
  user_namespace: true
skills: [{name: s}]
build:
  ubuntu_digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  apt_snapshot: "20260415T000000Z"
  firmware_repo: https://example.org/fw
  firmware_ref: "1.0"
  k3s_version: v1.30.0
"#;

    /// Values matching / violating each `pattern` of the schema, keyed by JSON pointer. The walk
    /// fails if the schema has a pattern missing here, or this table names one it no longer has.
    fn pattern_samples(ptr: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
        Some(match ptr {
            "/properties/name" => (
                &["a", "a1", "powernode-base-ruby", LONGEST_MODULE_NAME],
                &[
                    "",
                    "A",
                    "1abc",
                    "-abc",
                    "abc-",
                    "a_b",
                    "a b",
                    "a.b",
                    "abc\n",
                    "é",
                    TOO_LONG_MODULE_NAME,
                ],
            ),
            "/properties/services/items/properties/name" => (
                &["a", "1", "node-exporter", "web-", LONGEST_SERVICE_NAME],
                &[
                    "",
                    "-a",
                    "Web",
                    "a b",
                    "a/b",
                    "a;b",
                    "$(x)",
                    "a.service",
                    "a\n",
                    TOO_LONG_SERVICE_NAME,
                ],
            ),
            "/properties/services/items/properties/capabilities/items"
            | "/properties/security/properties/capabilities/items" => (
                &["CAP_SYS_ADMIN", "CAP_X"],
                &[
                    "CAP_",
                    "cap_sys_admin",
                    "SYS_ADMIN",
                    "CAP_SYS1",
                    "CAP_A B",
                    "CAP_A\n",
                ],
            ),
            "/properties/build/properties/ubuntu_digest/oneOf/1" => (
                &["sha256:0000000000000000000000000000000000000000000000000000000000000000"],
                &[
                    "sha256:",
                    "sha512:0000000000000000000000000000000000000000000000000000000000000000",
                    "sha256:ABCDEF0000000000000000000000000000000000000000000000000000000000",
                    "sha256:00000000000000000000000000000000000000000000000000000000000000000",
                    "sha256:000000000000000000000000000000000000000000000000000000000000000",
                ],
            ),
            "/properties/build/properties/apt_snapshot/oneOf/1" => (
                &["20260415T000000Z", "99999999T999999Z"],
                &[
                    "2026-04-15",
                    "20260415T000000",
                    "20260415t000000Z",
                    "2026041T000000Z",
                    "",
                ],
            ),
            _ => return None,
        })
    }

    const LONGEST_MODULE_NAME: &str =
        "a123456789012345678901234567890123456789012345678901234567890123";
    const TOO_LONG_MODULE_NAME: &str =
        "a1234567890123456789012345678901234567890123456789012345678901234";
    const LONGEST_SERVICE_NAME: &str =
        "s12345678901234567890123456789012345678901234567890123456789012";
    const TOO_LONG_SERVICE_NAME: &str =
        "s123456789012345678901234567890123456789012345678901234567890123";

    /// Schema keywords the walk (and so this module) understands.
    const KNOWN_KEYWORDS: &[&str] = &[
        "$schema",
        "$id",
        "title",
        "description",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "pattern",
        "minimum",
        "maximum",
        "maxLength",
        "oneOf",
    ];

    #[derive(Clone, Debug)]
    enum Step {
        Key(String),
        Index(usize),
    }

    fn show(path: &[Step]) -> String {
        let mut s = String::new();
        for step in path {
            match step {
                Step::Key(k) if s.is_empty() => s.push_str(k),
                Step::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Step::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    fn at_mut<'a>(doc: &'a mut Value, path: &[Step]) -> &'a mut Value {
        let mut cur = doc;
        for step in path {
            cur = match step {
                Step::Key(k) => cur.get_mut(k.as_str()),
                Step::Index(i) => cur.get_mut(*i),
            }
            .unwrap_or_else(|| panic!("FULL has nothing at {}: extend it", show(path)));
        }
        cur
    }

    fn full() -> Value {
        serde_yaml_ng::from_str(FULL).expect("FULL is YAML")
    }

    fn try_doc(doc: &Value) -> Result<Manifest, ManifestError> {
        let text = serde_yaml_ng::to_string(doc).expect("serialize");
        parse(text.as_bytes())
    }

    fn with(path: &[Step], value: Value) -> Result<Manifest, ManifestError> {
        let mut doc = full();
        *at_mut(&mut doc, path) = value;
        try_doc(&doc)
    }

    /// Asserts a schema-level rejection that names the field.
    fn assert_schema_rejects(r: Result<Manifest, ManifestError>, field: &str, what: &str) {
        match r {
            Ok(_) => panic!("{field}: {what} was accepted"),
            Err(e) => {
                assert_eq!(e.kind(), "schema", "{field}: {what}: {e}");
                assert_eq!(e.field(), Some(field), "{what}: {e}");
            }
        }
    }

    fn assert_accepts(r: Result<Manifest, ManifestError>, field: &str, what: &str) {
        if let Err(e) = r {
            panic!("{field}: {what} was refused: {e}");
        }
    }

    /// One value of each JSON type, with the type name the schema would use for it.
    fn typed_samples() -> Vec<(&'static str, Value)> {
        vec![
            ("integer", Value::from(7)),
            ("number", Value::from(7.5)),
            ("boolean", Value::Bool(true)),
            // The Norway problem from the other side: these stay strings, so a boolean or
            // integer property refuses them instead of coercing.
            ("string", Value::from("yes")),
            ("string", Value::from("true")),
            ("string", Value::from("7")),
            ("array", Value::Sequence(vec![])),
            ("object", Value::Mapping(Mapping::new())),
            ("null", Value::Null),
        ]
    }

    fn types_of(node: &serde_json::Value) -> Vec<String> {
        match node.get("type") {
            Some(serde_json::Value::String(t)) => vec![t.clone()],
            Some(serde_json::Value::Array(ts)) => ts
                .iter()
                .map(|t| t.as_str().expect("type name").to_string())
                .collect(),
            _ => vec![],
        }
    }

    fn type_allows(types: &[String], sample: &str) -> bool {
        types
            .iter()
            .any(|t| t == sample || (t == "number" && sample == "integer"))
    }

    #[derive(Default)]
    struct Walk {
        checks: usize,
        patterns_seen: Vec<String>,
    }

    impl Walk {
        fn node(&mut self, node: &serde_json::Value, ptr: &str, path: &[Step]) {
            let obj = node
                .as_object()
                .unwrap_or_else(|| panic!("{ptr} is not an object"));
            for key in obj.keys() {
                assert!(
                    KNOWN_KEYWORDS.contains(&key.as_str()),
                    "schema {ptr} uses `{key}`, which manifest.rs does not implement"
                );
            }
            let field = show(path);
            if !path.is_empty() {
                // `type`: every JSON type outside the declared set is refused, null included.
                let types = types_of(node);
                if !types.is_empty() {
                    for (t, v) in typed_samples() {
                        if !type_allows(&types, t) {
                            assert_schema_rejects(with(path, v.clone()), &field, &format!("{v:?}"));
                            self.checks += 1;
                        } else if t == "null" {
                            assert_accepts(with(path, v), &field, "null");
                            self.checks += 1;
                        }
                    }
                }
                if let Some(members) = node.get("enum").and_then(|e| e.as_array()) {
                    for m in members {
                        let v: Value = serde_json::from_value(m.clone()).expect("enum member");
                        assert_accepts(with(path, v), &field, &m.to_string());
                        self.checks += 1;
                    }
                    for bad in [Value::from("bogus"), Value::from(7), Value::Null] {
                        assert_schema_rejects(with(path, bad.clone()), &field, &format!("{bad:?}"));
                        self.checks += 1;
                    }
                    // Case matters: `get` is not `GET`, `TCP` is not `tcp`.
                    for m in members.iter().filter_map(|m| m.as_str()) {
                        let flipped: String = m
                            .chars()
                            .map(|c| {
                                if c.is_ascii_uppercase() {
                                    c.to_ascii_lowercase()
                                } else {
                                    c.to_ascii_uppercase()
                                }
                            })
                            .collect();
                        assert_schema_rejects(
                            with(path, Value::from(flipped.clone())),
                            &field,
                            &flipped,
                        );
                        self.checks += 1;
                    }
                }
                if let Some(c) = node.get("const") {
                    let n = c.as_i64().expect("integer const");
                    assert_accepts(with(path, Value::from(n)), &field, "the const");
                    for bad in [Value::from(n + 1), Value::from(n.to_string()), Value::Null] {
                        assert_schema_rejects(with(path, bad.clone()), &field, &format!("{bad:?}"));
                        self.checks += 1;
                    }
                }
                if node.get("pattern").is_some() {
                    self.pattern(ptr, path);
                }
                if let Some(min) = node.get("minimum").and_then(|m| m.as_i64()) {
                    assert_accepts(with(path, Value::from(min)), &field, "the minimum");
                    assert_schema_rejects(with(path, Value::from(min - 1)), &field, "minimum - 1");
                    self.checks += 2;
                }
                if let Some(max) = node.get("maximum").and_then(|m| m.as_i64()) {
                    assert_accepts(with(path, Value::from(max)), &field, "the maximum");
                    assert_schema_rejects(with(path, Value::from(max + 1)), &field, "maximum + 1");
                    self.checks += 2;
                }
                if let Some(max) = node.get("maxLength").and_then(|m| m.as_u64()) {
                    let max = usize::try_from(max).expect("small");
                    // Characters, not bytes: 200 × "é" is 400 bytes and still fits.
                    assert_accepts(
                        with(path, Value::from("é".repeat(max))),
                        &field,
                        "maxLength",
                    );
                    assert_schema_rejects(
                        with(path, Value::from("x".repeat(max + 1))),
                        &field,
                        "maxLength + 1",
                    );
                    self.checks += 2;
                }
                if let Some(branches) = node.get("oneOf").and_then(|b| b.as_array()) {
                    let mut allowed = Vec::new();
                    for (i, b) in branches.iter().enumerate() {
                        let bptr = format!("{ptr}/oneOf/{i}");
                        for key in b.as_object().expect("branch").keys() {
                            assert!(KNOWN_KEYWORDS.contains(&key.as_str()), "{bptr}: `{key}`");
                        }
                        allowed.extend(types_of(b));
                        if b.get("pattern").is_some() {
                            self.pattern(&bptr, path);
                        }
                    }
                    for (t, v) in typed_samples() {
                        let r = with(path, v.clone());
                        if type_allows(&allowed, t) {
                            if t == "null" {
                                assert_accepts(r, &field, "null");
                            }
                        } else {
                            assert_schema_rejects(r, &field, &format!("{v:?}"));
                        }
                        self.checks += 1;
                    }
                }
            }
            if let Some(required) = node.get("required").and_then(|r| r.as_array()) {
                for r in required {
                    let r = r.as_str().expect("required name");
                    let mut doc = full();
                    at_mut(&mut doc, path)
                        .as_mapping_mut()
                        .expect("object")
                        .remove(r)
                        .unwrap_or_else(|| panic!("FULL has no {field}.{r}"));
                    match try_doc(&doc) {
                        Ok(_) => panic!("{field}: accepted without required `{r}`"),
                        Err(e) => {
                            assert_eq!(e.kind(), "schema", "{e}");
                            assert!(e.to_string().contains(r), "{e}");
                        }
                    }
                    self.checks += 1;
                }
            }
            match node.get("additionalProperties") {
                Some(serde_json::Value::Bool(open)) => {
                    let mut doc = full();
                    // A valid environment variable name, so only the schema rule can refuse it.
                    at_mut(&mut doc, path)
                        .as_mapping_mut()
                        .expect("object")
                        .insert(Value::from("UNDECLARED_KEY"), Value::from("x"));
                    let r = try_doc(&doc);
                    if *open {
                        assert_accepts(r, &field, "an undeclared key");
                    } else {
                        match r {
                            Ok(_) => panic!("{field}: an undeclared key was accepted"),
                            Err(e) => {
                                assert_eq!(e.kind(), "schema", "{e}");
                                assert!(e.to_string().contains("UNDECLARED_KEY"), "{e}");
                            }
                        }
                    }
                    self.checks += 1;
                }
                Some(other) => panic!("{ptr}: additionalProperties {other} is not a boolean"),
                None => {}
            }
            if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    let mut p = path.to_vec();
                    p.push(Step::Key(name.clone()));
                    self.node(sub, &format!("{ptr}/properties/{name}"), &p);
                }
            }
            if let Some(items) = node.get("items") {
                let mut p = path.to_vec();
                p.push(Step::Index(0));
                self.node(items, &format!("{ptr}/items"), &p);
            }
        }

        fn pattern(&mut self, ptr: &str, path: &[Step]) {
            let field = show(path);
            let (good, bad) = pattern_samples(ptr)
                .unwrap_or_else(|| panic!("schema pattern at {ptr} has no samples in the test"));
            for g in good {
                assert_accepts(with(path, Value::from(*g)), &field, g);
            }
            for b in bad {
                assert_schema_rejects(with(path, Value::from(*b)), &field, &format!("{b:?}"));
            }
            self.checks += good.len() + bad.len();
            self.patterns_seen.push(ptr.to_string());
        }
    }

    #[test]
    fn schema_constraints_are_all_enforced() {
        let text = read("modules/.schema/module-manifest.schema.json");
        let schema: serde_json::Value = serde_json::from_slice(&text).expect("schema JSON");
        parse(FULL.as_bytes()).expect("FULL is valid");
        let mut walk = Walk::default();
        walk.node(&schema, "", &[]);
        let mut seen = walk.patterns_seen.clone();
        seen.sort();
        assert_eq!(
            seen,
            [
                "/properties/build/properties/apt_snapshot/oneOf/1",
                "/properties/build/properties/ubuntu_digest/oneOf/1",
                "/properties/name",
                "/properties/security/properties/capabilities/items",
                "/properties/services/items/properties/capabilities/items",
                "/properties/services/items/properties/name",
            ],
            "the schema's patterns changed: update pattern_samples"
        );
        // A floor, so a walk that silently stopped descending would fail.
        assert!(walk.checks > 300, "only {} checks", walk.checks);
    }

    // ---- refusals beyond the walk -------------------------------------------------------------

    fn steps(path: &str) -> Vec<Step> {
        path.split('.')
            .map(|s| match s.parse::<usize>() {
                Ok(i) => Step::Index(i),
                Err(_) => Step::Key(s.to_string()),
            })
            .collect()
    }

    #[test]
    fn untrusted_values_are_refused() {
        // (where, value, kind); the error must name exactly that field.
        #[rustfmt::skip]
        let cases: &[(&str, Value, &str)] = &[
            ("file_spec.0", "/etc/../shadow".into(), "unsafe"),
            ("mask.0", "../outside/**".into(), "unsafe"),
            ("protected_spec.0", "/etc/..".into(), "unsafe"),
            ("dependency_spec.0", "/etc/\\.\\./x".into(), "unsafe"),
            ("file_spec.0", "/etc/a\0b".into(), "unsafe"),
            // A newline would add a second rsync filter rule.
            ("mask.0", "/x\n+ /**".into(), "unsafe"),
            ("services.0.working_directory", "var/lib/full".into(), "unsafe"),
            ("services.0.working_directory", "/var/lib/../../etc".into(), "unsafe"),
            ("services.0.working_directory", "/var/lib/\0".into(), "unsafe"),
            ("services.0.working_directory", "".into(), "unsafe"),
            // MAC profiles live inside the module: absolute means the node's filesystem.
            ("security.selinux_profile", "/etc/selinux/full.pp".into(), "unsafe"),
            ("security.apparmor_profile", "../../etc/apparmor.d/x".into(), "unsafe"),
            ("security.seccomp_profile", "profiles/../../x.json".into(), "unsafe"),
            ("security.seccomp_profile", "".into(), "unsafe"),
            ("services.0.start_command", "/bin/true\nExecStartPre=/bin/evil".into(), "unsafe"),
            ("services.0.stop_command", "/bin/kill\0x".into(), "unsafe"),
            ("init.start", "systemctl start a\rb".into(), "unsafe"),
            ("services.0.user", "root:root".into(), "unsafe"),
            ("services.0.user", "-oops".into(), "unsafe"),
            ("services.0.user", "a b".into(), "unsafe"),
            ("services.0.user", "".into(), "unsafe"),
            ("services.0.env.FULL_MODE", "a\nb".into(), "unsafe"),
            ("services.0.health.endpoint", "/x\r\nHost: evil".into(), "unsafe"),
            ("services.0.exposed_ports.0.name", "a\u{1b}[2J".into(), "unsafe"),
            ("display_name", "\u{1b}[31mred".into(), "unsafe"),
            ("description", "bell\u{7}".into(), "unsafe"),
            ("security.egress_allow.0", "a:1\nb:2".into(), "unsafe"),
            ("dependencies.requires.0", "x\0".into(), "unsafe"),
            ("build.firmware_ref", "v1\n".into(), "unsafe"),
            // Env values are scalars only.
            ("services.0.env.FULL_MODE", Value::Sequence(vec![1.into()]), "schema"),
            // The schema's integer types refuse floats, even whole ones.
            ("schema_version", 1.0.into(), "schema"),
            ("services.0.exposed_ports.0.port", 8080.0.into(), "schema"),
            ("services.0.exposed_ports.0.port", (-1).into(), "schema"),
        ];
        for (path, value, kind) in cases {
            let at = steps(path);
            let err =
                with(&at, value.clone()).expect_err(&format!("{path} = {value:?} was accepted"));
            assert_eq!(err.kind(), *kind, "{path} = {value:?}: {err}");
            assert_eq!(err.field(), Some(show(&at).as_str()), "{value:?}: {err}");
        }
    }

    #[test]
    fn env_names_must_be_plain() {
        for key in ["A=B", "1A", "A B", "", "A-B", "<<"] {
            let mut doc = full();
            at_mut(&mut doc, &steps("services.0.env"))
                .as_mapping_mut()
                .expect("env")
                .insert(Value::from(key), Value::from("x"));
            let err = try_doc(&doc).expect_err(key);
            assert_eq!(err.kind(), "unsafe", "{key:?}: {err}");
        }
    }

    #[test]
    fn unit_name_error_says_field_and_value() {
        let mut doc = full();
        let services = at_mut(&mut doc, &steps("services"))
            .as_sequence_mut()
            .expect("services");
        let mut second = services[0].clone();
        second["name"] = Value::from("a b");
        services.push(second);
        let err = try_doc(&doc).expect_err("bad unit name");
        assert_eq!(
            err.to_string(),
            r#"manifest: services[1].name: "a b" is not a valid unit name"#
        );
        assert_eq!(err.kind(), "schema");
    }

    #[test]
    fn duplicate_service_names_are_refused() {
        let mut doc = full();
        let services = at_mut(&mut doc, &steps("services"))
            .as_sequence_mut()
            .expect("services");
        services.push(services[0].clone());
        let err = try_doc(&doc).expect_err("duplicate service");
        assert_eq!(err.kind(), "unsafe");
        assert_eq!(err.field(), Some("services[1].name"));
    }

    const MINIMAL: &str = "schema_version: 1\nname: mini\n";

    fn yaml_err(text: &str) -> ManifestError {
        parse(text.as_bytes()).expect_err(text)
    }

    #[test]
    fn malformed_documents_are_refused() {
        // (label, input, kind, text the message must contain)
        let cases: &[(&str, &[u8], &str, &str)] = &[
            ("empty", b"", "schema", "is empty, not a mapping"),
            ("null document", b"~", "schema", "is empty, not a mapping"),
            ("sequence document", b"[]", "schema", "is a sequence, not a mapping"),
            ("scalar document", b"hello", "schema", "is a scalar, not a mapping"),
            ("tagged document", b"!evil {name: a}", "schema", "is a tagged value, not a mapping"),
            ("two documents", b"schema_version: 1\nname: a\n---\nschema_version: 1\nname: b\n", "syntax", "more than one document"),
            ("binary garbage", b"\xff\xfe\x00\x01\x02\x03\x89PNG", "syntax", ""),
            ("NUL bytes", b"schema_version: 1\nname: a\x00b\n", "syntax", ""),
            ("unclosed flow", b"schema_version: 1\nname: [a\n", "syntax", ""),
            ("bad indentation", b"schema_version: 1\n name: a\nx", "syntax", ""),
            ("duplicate top-level key", b"schema_version: 1\nname: a\nname: b\n", "syntax", "duplicate"),
            (
                "duplicate env key",
                b"schema_version: 1\nname: a\nservices:\n  - name: s\n    env:\n      A: \"1\"\n      A: \"2\"\n",
                "syntax",
                "duplicate",
            ),
            ("duplicate key in a service", b"schema_version: 1\nname: a\nservices:\n  - name: s\n    name: t\n", "syntax", "duplicate"),
            ("unknown top-level field", b"schema_version: 1\nname: a\npriority: 10\n", "schema", "unknown field `priority`"),
            ("version is not in the schema", b"schema_version: 1\nname: a\nversion: 1.0.0\n", "schema", "unknown field `version`"),
            ("merge key", b"schema_version: 1\nname: a\n<<: {license: MIT}\n", "schema", "unknown field `<<`"),
            ("custom tag", b"schema_version: 1\nname: !evil a\n", "schema", "name"),
            (
                "tag deep inside",
                b"schema_version: 1\nname: a\nservices:\n  - name: s\n    env: {A: !evil x}\n",
                "schema",
                "services[0].env.A: YAML tag",
            ),
            ("Norway boolean", b"schema_version: 1\nname: a\nreboot_required: yes\n", "schema", "reboot_required"),
            ("quoted boolean", b"schema_version: 1\nname: a\nsecurity: {privileged: \"false\"}\n", "schema", "security.privileged"),
            ("integer as a string field", b"schema_version: 1\nname: a\nlicense: 2\n", "schema", "license"),
            ("schema_version as a string", b"schema_version: \"1\"\nname: a\n", "schema", "schema_version"),
            ("schema_version 2", b"schema_version: 2\nname: a\n", "schema", "schema_version"),
        ];
        for (label, input, kind, needle) in cases {
            let err = parse(input).expect_err(label);
            assert_eq!(err.kind(), *kind, "{label}: {err}");
            assert!(err.to_string().contains(needle), "{label}: {err}");
            assert!(err.to_string().starts_with("manifest: "), "{label}: {err}");
        }
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        // "Billion laughs": 10^12 strings from a few hundred bytes, well under the size cap.
        let mut bomb = String::from(
            "schema_version: 1\nname: a\nskills: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "k{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(bomb.len() < MAX_MANIFEST_BYTES);
        assert_eq!(yaml_err(&bomb).kind(), "syntax");

        let deep = format!(
            "{MINIMAL}skills: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(deep.len() < MAX_MANIFEST_BYTES);
        assert_eq!(yaml_err(&deep).kind(), "syntax");
    }

    #[test]
    fn norway_words_stay_strings() {
        let text = format!(
            "{MINIMAL}license: no\nservices:\n  - name: s\n    user: no\n    env: {{A: no, B: off, C: yes, D: on, E: true, F: 8080, G: ~, H: 1.5}}\n"
        );
        let m = parse(text.as_bytes()).expect("valid");
        assert_eq!(m.license.as_deref(), Some("no"));
        let s = &m.services[0];
        assert_eq!(s.user.as_deref(), Some("no"));
        let env: Vec<(&str, &str)> = s
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "no"),
                ("B", "off"),
                ("C", "yes"),
                ("D", "on"),
                ("E", "true"),
                ("F", "8080"),
                ("G", ""),
                ("H", "1.5")
            ]
        );
        // And the module name `no` is a name, not `false`.
        let m = parse(b"schema_version: 1\nname: no\n").expect("valid");
        assert_eq!(m.name, "no");
    }

    #[test]
    fn size_cap_is_checked_before_parsing() {
        // Garbage that would be a syntax error if it reached the parser.
        let big = vec![0xffu8; MAX_MANIFEST_BYTES + 1];
        let err = parse(&big).expect_err("oversized");
        assert_eq!(err.kind(), "too_large");
        assert_eq!(
            err,
            ManifestError::TooLarge {
                size: MAX_MANIFEST_BYTES + 1,
                limit: MAX_MANIFEST_BYTES
            }
        );
        // Exactly at the cap is fine.
        let mut at_cap = MINIMAL.as_bytes().to_vec();
        at_cap.push(b'#');
        at_cap.resize(MAX_MANIFEST_BYTES, b'x');
        let m = parse(&at_cap).expect("at the cap");
        assert_eq!(m.name, "mini");
    }

    #[test]
    fn minimal_manifest_has_empty_defaults() {
        let m = parse(MINIMAL.as_bytes()).expect("minimal");
        assert_eq!(m.name, "mini");
        assert!(m.services.is_empty() && m.file_spec.is_empty() && m.skills.is_empty());
        assert_eq!(m.dependencies, Dependencies::default());
        assert!(m.security.is_none() && m.build.is_none() && m.init.is_none());
        assert_eq!(m.reboot_required, None);
    }

    #[test]
    fn errors_convert_to_the_library_error() {
        let e: crate::Error = parse(&vec![b'#'; MAX_MANIFEST_BYTES + 1])
            .expect_err("too large")
            .into();
        assert_eq!(e.kind(), crate::ErrorKind::TooLarge);
        let e: crate::Error = yaml_err("schema_version: 1\nname: A\n").into();
        assert_eq!(e.kind(), crate::ErrorKind::Malformed);
        assert!(e.to_string().contains("manifest: name: \"A\""), "{e}");
    }
}
