//! Heartbeat payload and cadence (node-api.md §6.1, Part A §8).
//!
//! Every field carries a real value; the wait before the next beat follows the platform's
//! `next_poll_seconds` (bounded, so a broken platform can neither hammer nor silence the node),
//! spread by ± jitter so a fleet that rebooted together does not beat in lock step.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::HeartbeatRequest;
use crate::config::HeartbeatConfig;
use crate::paths::Paths;
use crate::{AGENT_VERSION, Result, architecture, sysinfo};

/// Never beat faster than this, whatever the platform says.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Never stay silent longer than this: the platform marks a node lost after a few misses.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Collect the payload from the kernel and the node state.
pub fn gather(
    paths: &Paths,
    module_digests: BTreeMap<String, String>,
    mounted: bool,
) -> Result<HeartbeatRequest> {
    Ok(HeartbeatRequest {
        boot_id: sysinfo::boot_id(paths)?,
        agent_version: AGENT_VERSION.to_string(),
        architecture: architecture().to_string(),
        uptime_seconds: sysinfo::uptime_seconds(paths)?,
        module_digests,
        mount_state: if mounted { "mounted" } else { "unmounted" }.to_string(),
        load_average: sysinfo::load_average(paths)?,
        memory_free_kb: sysinfo::memory_free_kb(paths)?,
        sdwan_state: Vec::new(),
    })
}

/// The base interval: the platform's `next_poll_seconds` when it sent a usable one.
pub fn base_interval(next_poll_seconds: Option<u64>, cfg: &HeartbeatConfig) -> Duration {
    let secs = next_poll_seconds
        .filter(|s| *s > 0)
        .unwrap_or(cfg.interval_secs);
    Duration::from_secs(secs).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// `base` spread by ± `jitter_percent`, with `u` a uniform sample in `[0, 1)`.
pub fn jittered(base: Duration, jitter_percent: u8, u: f64) -> Duration {
    let spread = f64::from(jitter_percent) / 100.0;
    let factor = 1.0 - spread + 2.0 * spread * u.clamp(0.0, 1.0);
    base.mul_f64(factor).max(MIN_INTERVAL)
}

/// The wait before the next heartbeat.
pub fn next_delay(next_poll_seconds: Option<u64>, cfg: &HeartbeatConfig) -> Duration {
    jittered(
        base_interval(next_poll_seconds, cfg),
        cfg.jitter_percent,
        fastrand::f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_follows_platform_within_bounds() {
        let cfg = HeartbeatConfig {
            interval_secs: 30,
            jitter_percent: 10,
        };
        assert_eq!(base_interval(None, &cfg), Duration::from_secs(30));
        assert_eq!(base_interval(Some(0), &cfg), Duration::from_secs(30));
        assert_eq!(base_interval(Some(12), &cfg), Duration::from_secs(12));
        assert_eq!(base_interval(Some(u64::MAX), &cfg), MAX_INTERVAL);
        assert_eq!(
            jittered(Duration::from_secs(30), 10, 0.0),
            Duration::from_secs(27)
        );
        assert_eq!(
            jittered(Duration::from_secs(30), 10, 1.0),
            Duration::from_secs(33)
        );
        assert_eq!(
            jittered(Duration::from_secs(30), 0, 0.7),
            Duration::from_secs(30)
        );
        for _ in 0..1000 {
            let d = next_delay(Some(20), &cfg);
            assert!(
                d >= Duration::from_secs(18) && d <= Duration::from_secs(22),
                "{d:?}"
            );
        }
    }

    #[test]
    fn gather_reads_real_values() {
        let hb = gather(&Paths::default(), BTreeMap::new(), false).unwrap();
        assert_eq!(hb.boot_id.len(), 36);
        assert_eq!(hb.agent_version, AGENT_VERSION);
        assert_eq!(hb.mount_state, "unmounted");
        assert!(hb.memory_free_kb > 0);
        assert_eq!(hb.load_average.split(' ').count(), 3);
    }
}
