//! Fault injection for crash tests. `POWERNODE_FAULT=<point>` makes the process kill itself with
//! SIGKILL when it reaches the named point — the same as an operator's `kill -9` at exactly that
//! step, with no destructor or flush running.
//!
//! Only in builds with the `fault-injection` cargo feature, which the test suite's builds turn on
//! (the integration-tests crate asks for it, and cargo unifies features across the workspace's
//! selected packages) and release builds of the binaries never do: there every point is an
//! empty inline function and the variable is never read.

/// Environment variable naming the point at which to die.
pub const FAULT_ENV: &str = "POWERNODE_FAULT";

/// Whether this build honours [`FAULT_ENV`].
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// Whether the variable's value `armed` names the point `name` (always false without the
/// feature).
pub fn fires(armed: Option<&str>, name: &str) -> bool {
    ENABLED && armed == Some(name)
}

#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if fires(std::env::var(FAULT_ENV).ok().as_deref(), name) {
        tracing::warn!(point = name, "fault injection: SIGKILL");
        if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL) {
            tracing::error!(error = %e, "fault injection failed");
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_fires_only_when_named_and_only_with_the_feature() {
        assert!(!fires(None, "rotate-mid-swap"));
        assert!(!fires(Some("other"), "rotate-mid-swap"));
        assert_eq!(
            fires(Some("rotate-mid-swap"), "rotate-mid-swap"),
            cfg!(feature = "fault-injection")
        );
    }
}
