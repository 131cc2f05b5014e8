//! argv[0] dispatch: which program the multicall binary was invoked as.

use std::ffi::OsStr;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callname {
    Agent,
    Identityd,
    Enrolld,
    Certd,
    Fleeteventd,
    Mountd,
    MountHelper,
    /// The upstream agent's legacy name.
    Ipn,
}

/// The program name table. Unknown names (a renamed copy, `cargo run`) act as the agent CLI.
pub fn callname_from_argv0(argv0: Option<&OsStr>) -> Callname {
    let name = argv0
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    match name {
        "powernode-identityd" => Callname::Identityd,
        "powernode-enrolld" => Callname::Enrolld,
        "powernode-certd" => Callname::Certd,
        "powernode-fleeteventd" => Callname::Fleeteventd,
        "powernode-mountd" => Callname::Mountd,
        "powernode-mount-helper" => Callname::MountHelper,
        "ipn" => Callname::Ipn,
        _ => Callname::Agent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_table() {
        let cases = [
            (
                Some("/usr/libexec/powernode/powernode-identityd"),
                Callname::Identityd,
            ),
            (Some("powernode-enrolld"), Callname::Enrolld),
            (
                Some("/usr/libexec/powernode/powernode-certd"),
                Callname::Certd,
            ),
            (
                Some("/usr/libexec/powernode/powernode-fleeteventd"),
                Callname::Fleeteventd,
            ),
            (
                Some("/usr/libexec/powernode/powernode-mountd"),
                Callname::Mountd,
            ),
            (
                Some("/usr/libexec/powernode/powernode-mount-helper"),
                Callname::MountHelper,
            ),
            (Some("/sbin/ipn"), Callname::Ipn),
            (Some("/usr/bin/powernode-agent"), Callname::Agent),
            (Some("./target/debug/powernode-agent"), Callname::Agent),
            (Some("powernode-identityd.old"), Callname::Agent),
            (None, Callname::Agent),
        ];
        for (argv0, want) in cases {
            assert_eq!(
                callname_from_argv0(argv0.map(OsStr::new)),
                want,
                "{argv0:?}"
            );
        }
    }
}
