//! Fault injection for crash tests. `POWERNODE_FAULT=<point>` makes the process kill itself with
//! SIGKILL when it reaches the named point — the same as an operator's `kill -9` at exactly that
//! step, with no destructor or flush running. Unset in production; reading it costs one getenv.

/// Environment variable naming the point at which to die.
pub const FAULT_ENV: &str = "POWERNODE_FAULT";

pub fn point(name: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault injection: SIGKILL");
        if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL) {
            tracing::error!(error = %e, "fault injection failed");
        }
    }
}
