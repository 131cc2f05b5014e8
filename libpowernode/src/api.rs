//! Typed node_api requests and responses (shared/node-api.md, Part A and Part B §4, §6).
//!
//! Payload fields are always read from the envelope's `data`; unknown fields are ignored and
//! optional ones tolerated, so older and newer platforms keep working.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const PATH_ENROLL: &str = "/enroll";
pub const PATH_ENROLL_REFRESH: &str = "/enroll/refresh";
pub const PATH_HEARTBEAT: &str = "/status/heartbeat";

/// `{success, data, error, code, details}`.
#[derive(Debug, Deserialize)]
pub struct Envelope<T> {
    pub success: bool,
    pub data: Option<T>,
    pub error: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnrollRequest {
    pub bootstrap_token: String,
    pub csr_pem: String,
    pub agent_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dmi_uuid: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefreshRequest {
    pub csr_pem: String,
    pub agent_version: String,
}

/// Reply of `enroll` and `enroll/refresh`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EnrollResponse {
    pub cert_pem: String,
    pub ca_chain_pem: String,
    pub instance_id: String,
    #[serde(default)]
    pub mtls_subject: Option<String>,
    #[serde(default)]
    pub not_after: Option<String>,
    #[serde(default)]
    pub certificate_id: Option<String>,
    #[serde(default)]
    pub instance_token: Option<String>,
}

impl EnrollResponse {
    /// The checks the upstream agent makes, plus a sane instance id.
    pub fn validate(&self) -> Result<()> {
        if !self.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::malformed(
                "enroll response",
                "cert_pem is not a PEM certificate",
            ));
        }
        if !self.ca_chain_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::malformed(
                "enroll response",
                "ca_chain_pem is not a PEM certificate",
            ));
        }
        if self.instance_id.is_empty()
            || self.instance_id.len() > 128
            || !self
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::malformed(
                "enroll response",
                "instance_id is empty or not an identifier",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HeartbeatRequest {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), not a per-process random value.
    pub boot_id: String,
    pub agent_version: String,
    pub architecture: String,
    pub uptime_seconds: u64,
    pub module_digests: BTreeMap<String, String>,
    pub mount_state: String,
    pub load_average: String,
    pub memory_free_kb: u64,
    pub sdwan_state: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HeartbeatResponse {
    #[serde(default)]
    pub acknowledged: bool,
    #[serde(default)]
    pub server_time: Option<String>,
    #[serde(default)]
    pub next_poll_seconds: Option<u64>,
}

/// Decode a platform reply body into `T`, enforcing the envelope.
pub fn decode<T: serde::de::DeserializeOwned>(status: u16, body: &[u8]) -> Result<T> {
    let env: Envelope<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        if (200..300).contains(&status) {
            Error::malformed("platform reply", format!("not a JSON envelope: {e}"))
        } else {
            error_for_status(
                status,
                None,
                None,
                &String::from_utf8_lossy(&body[..body.len().min(200)]),
            )
        }
    })?;
    if !(200..300).contains(&status) || !env.success {
        let message = env.error.unwrap_or_else(|| "no error message".into());
        return Err(error_for_status(status, env.code, None, &message));
    }
    let data = env
        .data
        .ok_or_else(|| Error::malformed("platform reply", "success without data"))?;
    serde_json::from_value(data).map_err(|e| Error::malformed("platform reply data", e))
}

/// Map an HTTP status to the error taxonomy: 5xx/429 are "not ready yet", other 4xx are refusals.
pub fn error_for_status(
    status: u16,
    code: Option<String>,
    retry_after: Option<std::time::Duration>,
    message: &str,
) -> Error {
    let message = message.trim().to_string();
    if status >= 500 || status == 429 || status == 408 {
        Error::Unavailable {
            status,
            retry_after,
            message,
        }
    } else {
        Error::Refused {
            status,
            code,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        let ok = br#"{"success":true,"data":{"acknowledged":true,"server_time":"2026-11-28T00:00:00Z","next_poll_seconds":12,"extra":1},"meta":{}}"#;
        let hb: HeartbeatResponse = decode(200, ok).unwrap();
        assert_eq!(hb.next_poll_seconds, Some(12));

        let cases: &[(u16, &[u8], &str)] = &[
            (
                422,
                br#"{"success":false,"error":"token already consumed","code":"VALIDATION_ERROR"}"#,
                "token already consumed",
            ),
            (
                401,
                br#"{"success":false,"error":"Bootstrap token required"}"#,
                "HTTP 401",
            ),
            (200, br#"{"success":false,"error":"nope"}"#, "nope"),
            (200, b"<html>", "not a JSON envelope"),
            (200, br#"{"success":true}"#, "success without data"),
            (
                200,
                br#"{"success":true,"data":{"next_poll_seconds":"soon"}}"#,
                "invalid type",
            ),
            (502, b"Bad Gateway", "Bad Gateway"),
        ];
        for (status, body, needle) in cases {
            let e = decode::<HeartbeatResponse>(*status, body).unwrap_err();
            assert!(e.to_string().contains(needle), "{status} {e}");
        }
        assert_eq!(
            decode::<HeartbeatResponse>(502, b"x").unwrap_err().kind(),
            crate::ErrorKind::Unreachable
        );
        assert_eq!(
            decode::<HeartbeatResponse>(422, b"{}").unwrap_err().kind(),
            crate::ErrorKind::Refused
        );
    }

    #[test]
    fn enroll_response_validation() {
        let good = EnrollResponse {
            cert_pem: "-----BEGIN CERTIFICATE-----\nx".into(),
            ca_chain_pem: "-----BEGIN CERTIFICATE-----\ny".into(),
            instance_id: "0b6a4c1e-8a3e-4f43-9d51-2b8f3c1e9a77".into(),
            mtls_subject: None,
            not_after: None,
            certificate_id: None,
            instance_token: None,
        };
        assert!(good.validate().is_ok());
        let mut bad = good.clone();
        bad.instance_id = "../../etc".into();
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.cert_pem = "hello".into();
        assert!(bad.validate().is_err());
    }
}
