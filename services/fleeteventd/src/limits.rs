//! Who may send what, and how much: the bounds that keep one local client from starving the
//! others. A token bucket per sender uid ([`RateLimiter`]), open connections counted per uid and
//! in total ([`ConnectionLimits`]), and the uids allowed to speak in the reserved `system.*`
//! namespace ([`SystemSenders`]).
//!
//! Everything is keyed by uid, never by pid: a process can fork as often as it likes, but it
//! cannot change the uid the kernel reports for it (`SO_PEERCRED`, the bus's credentials).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use powernode::events::is_reserved_kind;

/// Connections one uid may hold open at once. A well-behaved client needs one (two while it
/// reconnects); 16 leaves room for a daemon's concurrent tasks and a shell user, and still
/// lets a single uid take at most a small share of [`MAX_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_UID: usize = 16;
/// Connections open at once across all uids, whatever the fd limit allows. Each costs a
/// receive buffer of one message (about 20 KiB), so this also bounds that memory (~10 MiB).
pub const MAX_CONNECTIONS: usize = 512;
/// File descriptors kept out of the connection budget: the listener, the bus, the platform's
/// TLS connection, queue segments and ledger, and the one a refused connection holds while it
/// is told why.
pub const FD_RESERVE: u64 = 64;

/// Connections allowed open at once under a soft `RLIMIT_NOFILE` of `nofile`: never so many
/// that accept() runs out of descriptors before the cap refuses a connection.
pub fn connection_budget(nofile: u64) -> usize {
    let by_fds = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    by_fds.clamp(1, MAX_CONNECTIONS)
}

/// Whether `uid_map` (`/proc/self/uid_map`) maps less than every uid onto itself. Then the
/// kernel reports every unmapped peer as the overflow uid (65534), and the per-uid bounds lump
/// all those peers together (systemd's `PrivateUsers=yes` maps only root and the unit's user).
pub fn uids_collapsed(uid_map: &str) -> bool {
    let lines: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| !f.is_empty())
        .collect();
    lines != [vec!["0", "0", "4294967295"]]
}

// ---------------------------------------------------------------------------------------------
// Rate

/// A token bucket per sender: `rate` per second, at most `burst` saved up.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, (f64, Instant)>,
}

/// Forget senders (full buckets) once this many are tracked, so a churn of senders cannot grow
/// the map without bound.
const MAX_TRACKED_SENDERS: usize = 4096;

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Take one token for `sender` at `now`; false when it has none left.
    pub fn allow(&mut self, sender: &K, now: Instant) -> bool {
        if self.buckets.len() >= MAX_TRACKED_SENDERS && !self.buckets.contains_key(sender) {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .buckets
            .entry(sender.clone())
            .or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// This uid already holds its share.
    PerUid { uid: u32, limit: usize },
    /// The daemon holds as many as its descriptors allow.
    Total { limit: usize },
}

impl std::fmt::Display for ConnectionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionRefusal::PerUid { uid, limit } => {
                write!(f, "uid {uid} already holds {limit} connections")
            }
            ConnectionRefusal::Total { limit } => {
                write!(f, "the daemon already serves {limit} connections")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    by_uid: HashMap<u32, usize>,
    total: usize,
}

/// Open connections, counted per uid and in total.
#[derive(Debug)]
pub struct ConnectionLimits {
    per_uid: usize,
    total: usize,
    open: Mutex<Open>,
}

/// One counted connection; the count goes down when it is dropped.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    uid: u32,
}

impl ConnectionLimits {
    pub fn new(per_uid: usize, total: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            per_uid,
            total,
            open: Mutex::new(Open::default()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        // Counters only: a panic elsewhere cannot leave them in a state worse than stopping.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection from `uid`, unless that uid or the daemon is at its cap.
    pub fn try_open(self: &Arc<Self>, uid: u32) -> Result<Slot, ConnectionRefusal> {
        let mut open = self.open();
        if open.total >= self.total {
            return Err(ConnectionRefusal::Total { limit: self.total });
        }
        let held = open.by_uid.entry(uid).or_insert(0);
        if *held >= self.per_uid {
            return Err(ConnectionRefusal::PerUid {
                uid,
                limit: self.per_uid,
            });
        }
        *held += 1;
        open.total += 1;
        Ok(Slot {
            limits: self.clone(),
            uid,
        })
    }

    /// Connections open now (total, from `uid`).
    pub fn held(&self, uid: u32) -> (usize, usize) {
        let open = self.open();
        (open.total, open.by_uid.get(&uid).copied().unwrap_or(0))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total = open.total.saturating_sub(1);
        if let Some(held) = open.by_uid.get_mut(&self.uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.by_uid.remove(&self.uid);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reserved namespace

/// Who may emit `system.*` kinds by default: root and the suite's daemon users.
pub const DEFAULT_SYSTEM_SENDERS: &[&str] = &[
    "root",
    "powernode-identity",
    "powernode-enroll",
    "powernode-cert",
    "powernode-events",
    "powernode-mount",
    "powernode",
];

/// The uids allowed to emit kinds in the reserved namespace, resolved once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemSenders {
    uids: HashSet<u32>,
}

impl SystemSenders {
    /// Resolve user names (or numeric uids) through the system's user database. A name that
    /// does not exist is skipped with a note: the list names users of every release, and a
    /// node need not have all of them.
    pub fn resolve(entries: &[String]) -> SystemSenders {
        let mut uids = HashSet::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(uid) = entry.parse::<u32>() {
                uids.insert(uid);
                continue;
            }
            match nix::unistd::User::from_name(entry) {
                Ok(Some(user)) => {
                    uids.insert(user.uid.as_raw());
                }
                Ok(None) => tracing::info!(user = entry, "system sender not on this node; skipped"),
                Err(e) => {
                    tracing::warn!(user = entry, error = %e, "looking up a system sender failed; skipped")
                }
            }
        }
        tracing::info!(uids = ?uids, "uids allowed to emit system.* events");
        SystemSenders { uids }
    }

    pub fn from_uids(uids: impl IntoIterator<Item = u32>) -> SystemSenders {
        SystemSenders {
            uids: uids.into_iter().collect(),
        }
    }

    /// Whether a sender with `uid` (None: credentials unknown) may emit `kind`.
    pub fn may_emit(&self, uid: Option<u32>, kind: &str) -> bool {
        !is_reserved_kind(kind) || uid.is_some_and(|u| self.uids.contains(&u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limit_is_per_sender_and_refills() {
        let mut rl = RateLimiter::new(10, 5);
        let t0 = Instant::now();
        assert!((0..5).all(|_| rl.allow(&1000u32, t0)), "the burst passes");
        assert!(!rl.allow(&1000, t0), "then the sender is limited");
        assert!(rl.allow(&1001, t0), "others are not");
        assert!(rl.allow(&1000, t0 + Duration::from_millis(100)), "refilled");
        assert!(!rl.allow(&1000, t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| rl.allow(&1000, later)).count(),
            5,
            "capped at the burst"
        );
    }

    #[test]
    fn connections_are_capped_per_uid_and_in_total() {
        let limits = ConnectionLimits::new(2, 3);
        let a1 = limits.try_open(1000);
        let a2 = limits.try_open(1000);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(
            limits.try_open(1000).err(),
            Some(ConnectionRefusal::PerUid {
                uid: 1000,
                limit: 2
            })
        );
        let b1 = limits.try_open(1001);
        assert!(b1.is_ok(), "another uid still gets in");
        assert_eq!(
            limits.try_open(1002).err(),
            Some(ConnectionRefusal::Total { limit: 3 })
        );
        drop(a1);
        assert_eq!(limits.held(1000), (2, 1));
        let c1 = limits.try_open(1002);
        assert!(c1.is_ok(), "a closed slot is free again");
        drop((a2, b1));
        assert_eq!(limits.held(1000), (1, 0));
    }

    #[test]
    fn collapsed_uid_maps() {
        assert!(!uids_collapsed("         0          0 4294967295\n"));
        assert!(uids_collapsed(
            "         0          0          1\n       990        990          1\n"
        ));
        assert!(uids_collapsed("0 100000 65536\n"));
    }

    #[test]
    fn budget_stays_below_the_fd_limit() {
        assert_eq!(connection_budget(256), 192);
        assert_eq!(connection_budget(1024), MAX_CONNECTIONS);
        assert_eq!(connection_budget(10), 1, "never zero");
    }

    #[test]
    fn reserved_namespace() {
        let s = SystemSenders::from_uids([0, 990]);
        assert!(s.may_emit(Some(990), "system.cert.rotated"));
        assert!(!s.may_emit(Some(1000), "system.cert.rotated"));
        assert!(!s.may_emit(None, "system"));
        assert!(s.may_emit(Some(1000), "app.started"));
        assert!(s.may_emit(None, "app.started"));
        let r = SystemSenders::resolve(&[
            "root".into(),
            "4242".into(),
            "no-such-user-powernode".into(),
        ]);
        assert_eq!(r, SystemSenders::from_uids([0, 4242]));
    }

    /// The unit's LimitNOFILE= must leave room for every connection the caps allow, so accept()
    /// never meets EMFILE before the cap has refused a connection.
    #[test]
    fn unit_limits_fit_the_caps() {
        let unit =
            include_str!("../../../units/usr/lib/systemd/system/powernode-fleeteventd.service");
        let nofile: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            nofile >= MAX_CONNECTIONS as u64 + FD_RESERVE,
            "LimitNOFILE={nofile} in the unit"
        );
        assert_eq!(connection_budget(nofile), MAX_CONNECTIONS);
        assert!(unit.lines().any(|l| l.starts_with("MemoryMax=")));
    }
}
