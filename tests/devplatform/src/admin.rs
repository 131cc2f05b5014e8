//! Admin commands that work on the state directory directly (also while `serve` runs, through
//! the store's lock): minting bootstrap tokens and listing enrolled instances.

use std::path::Path;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::store::{self, BootstrapToken, Instance, Outcome, Store};

/// Bootstrap tokens are this many random bytes (node-api.md §4.1).
const TOKEN_BYTES: usize = 32;

/// A freshly minted token, as printed by `token create --json`.
#[derive(Debug, Serialize)]
pub struct NewToken {
    pub token: String,
    pub instance_uuid: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Mint a single-use bootstrap token bound to `instance_uuid` (a fresh v4 UUID when `None`).
pub fn create_token(dir: &Path, instance_uuid: Option<&str>, ttl_secs: u64) -> Result<NewToken> {
    let instance_uuid = match instance_uuid {
        Some(u) => uuid::Uuid::parse_str(u)
            .with_context(|| format!("--instance-uuid {u:?} is not a UUID"))?,
        None => uuid::Uuid::new_v4(),
    }
    .hyphenated()
    .to_string();
    let mut secret = [0u8; TOKEN_BYTES];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| anyhow::anyhow!("random source failed"))?;
    let token = URL_SAFE_NO_PAD.encode(secret);
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let ttl = Duration::seconds(i64::try_from(ttl_secs).context("--ttl-secs too large")?);
    let expires_at = now.checked_add(ttl).context("--ttl-secs too large")?;
    let record = BootstrapToken {
        sha256: store::sha256_hex(token.as_bytes()),
        instance_uuid: instance_uuid.clone(),
        created_at: now,
        expires_at,
        consumed_at: None,
        consumed_from_ip: None,
    };
    Store::open(dir)?.transact(|s| {
        s.tokens.push(record);
        Ok::<_, anyhow::Error>(((), Outcome::Changed))
    })?;
    Ok(NewToken {
        token,
        instance_uuid,
        expires_at,
    })
}

pub fn list_instances(dir: &Path) -> Result<Vec<Instance>> {
    Ok(Store::open(dir)?.read()?.instances.into_values().collect())
}

/// Human-readable table of instances.
pub fn render_table(instances: &[Instance]) -> String {
    let fmt = |t: Option<OffsetDateTime>| {
        t.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "{:<36}  {:<8}  {:>10}  {:<20}  {:<12}  {:>5}\n",
        "INSTANCE", "STATUS", "HEARTBEATS", "LAST HEARTBEAT", "AGENT", "CERTS"
    );
    for i in instances {
        out.push_str(&format!(
            "{:<36}  {:<8}  {:>10}  {:<20}  {:<12}  {:>5}\n",
            i.instance_id,
            i.status,
            i.heartbeat_count,
            fmt(i.last_heartbeat_at),
            i.agent_version.as_deref().unwrap_or("-"),
            i.certificates_issued.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_stored_hashed_and_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuid = "6f1c1a52-3d4e-4f6a-9b1c-2d3e4f5a6b7c";
        let t = create_token(dir.path(), Some(uuid), 60).expect("create");
        assert_eq!(t.instance_uuid, uuid);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&t.token).expect("b64").len(),
            TOKEN_BYTES
        );
        let mut state = Store::open(dir.path()).expect("open").read().expect("read");
        let rec = state.token_mut(&t.token).expect("found by secret").clone();
        assert_eq!(rec.instance_uuid, uuid);
        assert_eq!(rec.expires_at - rec.created_at, Duration::seconds(60));

        let fresh = create_token(dir.path(), None, 60).expect("create");
        assert!(uuid::Uuid::parse_str(&fresh.instance_uuid).is_ok());
        assert_ne!(fresh.token, t.token);
        assert!(create_token(dir.path(), Some("not-a-uuid"), 60).is_err());
    }
}
