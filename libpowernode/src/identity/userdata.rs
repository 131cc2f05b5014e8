//! User-data as every cloud, the config drive and vSphere guestinfo deliver it, in the three
//! formats of the contract (node-api.md Part B §3), tried in this order:
//! (a) a JSON object (`instance_uuid`, `bootstrap_token`, `platform_url`, `ca_pem`);
//! (b) kernel-command-line words (`powernode.instance_uuid=…`, alias `powernode.id=…`);
//! (c) shell lines (`ID=`, `KEY=`, `SERVER=`, `CA_PEM=`, optional `export `, quotes stripped).
//!
//! Parsing is separate from fetching so it is tested table-driven and fuzzable.

use serde::Deserialize;

use super::Fields;
use super::cmdline::parse_cmdline;
use super::idcfg::parse_identity_cfg;
use crate::{Error, Result};

/// Which of the three formats matched (named in the evidence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDataFormat {
    Json,
    CmdlineWords,
    ShellLines,
}

impl UserDataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            UserDataFormat::Json => "json",
            UserDataFormat::CmdlineWords => "powernode.* words",
            UserDataFormat::ShellLines => "ID=/KEY= lines",
        }
    }
}

#[derive(Deserialize)]
struct JsonUserData {
    instance_uuid: Option<String>,
    bootstrap_token: Option<String>,
    platform_url: Option<String>,
    ca_pem: Option<String>,
    instance_name: Option<String>,
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Parse user-data. `Ok(None)`: valid text that is not a powernode identity (someone else's
/// user-data, e.g. a `#cloud-config`). An error: bytes that are not text, or JSON that is broken.
pub fn parse_user_data(bytes: &[u8]) -> Result<Option<(Fields, UserDataFormat)>> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        Error::malformed(
            "user-data",
            "not UTF-8 text (binary or compressed user-data is not supported)",
        )
    })?;
    if text.contains('\0') {
        return Err(Error::malformed("user-data", "contains NUL bytes"));
    }
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.starts_with('{') {
        let j: JsonUserData =
            serde_json::from_str(trimmed).map_err(|e| Error::malformed("user-data (JSON)", e))?;
        let f = Fields {
            instance_uuid: non_empty(j.instance_uuid),
            bootstrap_token: non_empty(j.bootstrap_token),
            platform_url: non_empty(j.platform_url),
            ca_pem: non_empty(j.ca_pem),
            instance_name: non_empty(j.instance_name),
        };
        return Ok(f
            .instance_uuid
            .is_some()
            .then_some((f, UserDataFormat::Json)));
    }
    let (words, _) = parse_cmdline(trimmed);
    if words.instance_uuid.is_some() {
        return Ok(Some((words, UserDataFormat::CmdlineWords)));
    }
    let lines = parse_identity_cfg(trimmed);
    if lines.fields.instance_uuid.is_some() {
        return Ok(Some((lines.fields, UserDataFormat::ShellLines)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case<'a> = (&'a [u8], Option<(&'a str, UserDataFormat)>);

    #[test]
    fn the_three_formats_and_the_rest() {
        let cases: &[Case<'_>] = &[
            (
                br#"{"instance_uuid":"j-1","bootstrap_token":"t","platform_url":"https://p"}"#,
                Some(("j-1", UserDataFormat::Json)),
            ),
            (
                b"\n  {\"instance_uuid\": \"j-2\"}\n",
                Some(("j-2", UserDataFormat::Json)),
            ),
            (br#"{"other":"x"}"#, None),
            (
                b"powernode.instance_uuid=w-1 powernode.bootstrap_token=t",
                Some(("w-1", UserDataFormat::CmdlineWords)),
            ),
            (
                b"powernode.id=w-2\n",
                Some(("w-2", UserDataFormat::CmdlineWords)),
            ),
            (
                b"#!/bin/sh\nexport ID=\"l-1\"\nKEY='t'\nSERVER=https://p\n",
                Some(("l-1", UserDataFormat::ShellLines)),
            ),
            (b"#cloud-config\npackages: [htop]\n", None),
            (b"", None),
            (b"random garbage \x01\x02 words", None),
        ];
        for (input, want) in cases {
            let got = parse_user_data(input).unwrap();
            let got = got
                .as_ref()
                .map(|(f, fmt)| (f.instance_uuid.as_deref().unwrap_or(""), *fmt));
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn binary_and_broken_json_are_errors() {
        for (input, needle) in [
            (&b"\x1f\x8b\x08\x00\xff\xfe"[..], "not UTF-8"),
            (&b"{\"instance_uuid\": "[..], "JSON"),
            (&b"ID=a\0b"[..], "NUL"),
        ] {
            let err = parse_user_data(input).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn json_ca_and_token_survive() {
        let (f, _) = parse_user_data(
            br#"{"instance_uuid":"j","ca_pem":"-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n","bootstrap_token":"s3cret"}"#,
        )
        .unwrap()
        .unwrap();
        assert!(f.ca_pem.unwrap().contains("\nA\n"));
        assert_eq!(f.bootstrap_token.as_deref(), Some("s3cret"));
    }
}
