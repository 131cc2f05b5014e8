//! libpowernode: the domain logic shared by every powernode daemon and the `powernode-agent` CLI.
//!
//! Nothing in here is a daemon. Services under `services/` are thin crates that parse arguments,
//! apply their sandbox profile and call into these modules. Layering, bottom up: `error`, `paths`,
//! `fsutil` → `config`, `api`, `bus` → `identity`, `pki`, `transport`, `enroll`, `heartbeat` →
//! `mount` (module composition plan and state.json) → `systemd`, `sandbox` (process plumbing
//! used at daemon start; `systemd` also creates transient units).

pub mod api;
pub mod bus;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod error;
pub mod events;
pub mod fault;
pub mod fsutil;
pub mod fsverity;
pub mod heartbeat;
pub mod identity;
pub mod manifest;
pub mod modules;
pub mod mount;
pub mod mounthelper;
pub mod oci;
pub mod paths;
pub mod pki;
pub mod retry;
pub mod rotation;
pub mod sandbox;
pub mod sys;
pub mod sysinfo;
pub mod sysroot;
pub mod systemd;
pub mod systemd1;
pub mod tasks;
pub mod transport;
pub mod verify;

pub use error::{Error, ErrorKind, Result};

/// The agent version reported to the platform and on D-Bus.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Architecture name in the platform's vocabulary (Go's GOARCH, as the upstream agent sends).
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}
