//! Enrollment: bootstrap token → Ed25519 key + CSR → `POST enroll` → PKI files.
//!
//! The platform consumes the token in the same request, so enrollment is not retry-safe
//! (node-api.md Part A §3). The key is persisted *before* the request; a refusal removes it again
//! (nothing half-written remains); a lost reply keeps it and says plainly that the token may be
//! spent, so the operator mints a new one instead of the node looping on a dead token.

use crate::api::{EnrollRequest, EnrollResponse, PATH_ENROLL};
use crate::config::PlatformConfig;
use crate::pki::{self, Meta, PkiStore};
use crate::transport::PlatformClient;
use crate::{AGENT_VERSION, Error, Result};

/// What the node presents to enroll.
#[derive(Clone)]
pub struct EnrollParams {
    pub bootstrap_token: String,
    pub platform_url: String,
    /// Trust anchors for the platform's certificate; becomes `pki/ca-bundle.crt`.
    pub ca_bundle_pem: String,
    /// CSR subject; the platform forces its own CN, this is a hint.
    pub subject: String,
    pub dmi_uuid: Option<String>,
    /// The current time when the clock is trusted (`clock::judge`). With it, an *expired*
    /// certificate on disk is replaced by a new enrollment (recovery); without it, existing
    /// credentials are never touched.
    pub trusted_now: Option<time::OffsetDateTime>,
}

impl std::fmt::Debug for EnrollParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollParams")
            .field("platform_url", &self.platform_url)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Enrolled(Meta),
    /// The certificate on disk had expired and was replaced by a new enrollment.
    ReEnrolled(Meta),
    /// PKI already on disk: nothing was sent, the token was not used.
    AlreadyEnrolled(Meta),
}

impl Outcome {
    pub fn meta(&self) -> &Meta {
        match self {
            Outcome::Enrolled(m) | Outcome::ReEnrolled(m) | Outcome::AlreadyEnrolled(m) => m,
        }
    }
}

pub async fn enroll(cfg: &PlatformConfig, store: &PkiStore, p: &EnrollParams) -> Result<Outcome> {
    let mut replacing = false;
    if let Some(creds) = store.load()? {
        let expired = match p.trusted_now {
            Some(now) => crate::pki::CertInfo::from_pem(&creds.cert_pem)?.not_after <= now,
            None => false,
        };
        if !expired {
            return Ok(Outcome::AlreadyEnrolled(creds.meta));
        }
        tracing::warn!(instance = %creds.meta.instance_id, "certificate expired: re-enrolling with the bootstrap token");
        replacing = true;
    }
    if p.bootstrap_token.trim().is_empty() {
        return Err(Error::Identity("no bootstrap token: cannot enroll".into()));
    }
    // The client is built first so a bad URL or CA bundle fails before any state is written.
    let client = PlatformClient::new(cfg, &p.platform_url, &p.ca_bundle_pem, None, None)?;
    // Reuse a key left by an attempt whose reply was lost: same key, same CSR subject.
    let key = match store.pending_key()? {
        Some(pem) => pki::key_from_pem(&pem)?,
        None => {
            let k = pki::generate_key()?;
            store.write_pending_key(&k.serialize_pem())?;
            k
        }
    };
    let req = EnrollRequest {
        bootstrap_token: p.bootstrap_token.clone(),
        csr_pem: pki::csr_pem(&key, &p.subject)?,
        agent_version: AGENT_VERSION.to_string(),
        dmi_uuid: p.dmi_uuid.clone(),
    };
    let resp: EnrollResponse = match client.post(PATH_ENROLL, &req).await {
        Ok(r) => r,
        Err(e @ (Error::Refused { .. } | Error::NotConnected(_))) => {
            // Refused: the platform said no. Not connected: the token never left the node.
            store.discard_pending_key()?;
            return Err(e);
        }
        Err(Error::Unreachable(m)) | Err(Error::Unavailable { message: m, .. }) => {
            return Err(Error::Unreachable(format!(
                "{m}; the reply was lost after the request was sent, so the bootstrap token may \
                 now be consumed and a new one needed (the key in {} is kept for a retry)",
                store.dir().display()
            )));
        }
        Err(e) => {
            store.discard_pending_key()?;
            return Err(e);
        }
    };
    let meta = store.commit(
        &resp,
        &key.serialize_pem(),
        &p.ca_bundle_pem,
        Some(&p.platform_url),
    )?;
    Ok(if replacing {
        Outcome::ReEnrolled(meta)
    } else {
        Outcome::Enrolled(meta)
    })
}
