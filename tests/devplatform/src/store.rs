//! The embedded store: one small `store.json` in the state directory, shared by the `serve`
//! process and the admin CLI. Every access takes an exclusive `flock` on the `store.lock`
//! sidecar, re-reads the JSON, and (for updates) writes it back atomically before the lock is
//! released, so a transaction is all-or-nothing and both processes always see each other's
//! writes. The file is tiny; simplicity beats caching here. Bootstrap tokens are kept only as
//! SHA-256 hex digests.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil;

const STORE_FILE: &str = "store.json";
const LOCK_FILE: &str = "store.lock";
/// Bumped when the on-disk shape changes incompatibly.
const SCHEMA_VERSION: u32 = 1;

/// Instance lifecycle as far as the development platform tracks it.
pub const STATUS_PENDING: &str = "pending";
pub const STATUS_RUNNING: &str = "running";

/// Everything the platform remembers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub tokens: Vec<BootstrapToken>,
    /// Keyed by instance id.
    #[serde(default)]
    pub instances: BTreeMap<String, Instance>,
    /// Published modules, keyed by module id (`modules.rs`).
    #[serde(default)]
    pub modules: BTreeMap<String, crate::modules::Module>,
    /// Instance id → assigned module ids, in assignment order.
    #[serde(default)]
    pub assignments: BTreeMap<String, Vec<String>>,
    /// Instance id → assigned module ids whose /var persists (`module assign --persistent`).
    #[serde(default)]
    pub persistent: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Tasks keyed by id (`tasks.rs`).
    #[serde(default)]
    pub tasks: BTreeMap<String, crate::tasks::Task>,
    /// Last task sequence number handed out.
    #[serde(default)]
    pub task_seq: u64,
}

/// A single-use bootstrap token. Only the digest of the secret is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapToken {
    pub sha256: String,
    pub instance_uuid: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub consumed_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub consumed_from_ip: Option<String>,
}

/// One certificate issued to an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub certificate_id: String,
    /// Lowercase hex of the serial's big-endian bytes.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

/// An enrolled instance and what its heartbeats reported. Serialised as-is by
/// `instances --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: String,
    pub mtls_subject: String,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_heartbeat_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub heartbeat_count: u64,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub dmi_uuid: Option<String>,
    #[serde(default)]
    pub boot_id: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub uptime_seconds: Option<u64>,
    #[serde(default)]
    pub load_average: Option<String>,
    #[serde(default)]
    pub memory_free_kb: Option<u64>,
    #[serde(default)]
    pub module_digests: BTreeMap<String, String>,
    #[serde(default)]
    pub mount_state: Option<String>,
    #[serde(default)]
    pub sdwan_state: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub certificates_issued: Vec<IssuedCertificate>,
    /// Serials of client certificates presented on authenticated calls, first-seen order.
    #[serde(default)]
    pub certificate_serials_seen: Vec<String>,
    /// Serial of the client certificate the last heartbeat was made with.
    #[serde(default)]
    pub last_heartbeat_serial: Option<String>,
}

impl Instance {
    pub fn new(instance_id: &str, now: OffsetDateTime) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            mtls_subject: instance_id.to_owned(),
            status: STATUS_PENDING.to_owned(),
            enrolled_at: now,
            last_heartbeat_at: None,
            heartbeat_count: 0,
            agent_version: None,
            dmi_uuid: None,
            boot_id: None,
            architecture: None,
            uptime_seconds: None,
            load_average: None,
            memory_free_kb: None,
            module_digests: BTreeMap::new(),
            mount_state: None,
            sdwan_state: None,
            certificates_issued: Vec::new(),
            certificate_serials_seen: Vec::new(),
            last_heartbeat_serial: None,
        }
    }

    /// Record a presented client-certificate serial; true if it was new.
    pub fn note_serial_seen(&mut self, serial: &str) -> bool {
        if self.certificate_serials_seen.iter().any(|s| s == serial) {
            return false;
        }
        self.certificate_serials_seen.push(serial.to_owned());
        true
    }
}

impl State {
    /// Look a token up by its secret (hashing it first).
    pub fn token_mut(&mut self, secret: &str) -> Option<&mut BootstrapToken> {
        let digest = sha256_hex(secret.as_bytes());
        self.tokens.iter_mut().find(|t| t.sha256 == digest)
    }
}

/// Whether a transaction changed anything (and so must be written back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

/// Handle on the store files in one state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open (creating the directory if needed). Nothing is read until a transaction runs.
    pub fn open(dir: &Path) -> Result<Self> {
        fsutil::ensure_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn lock(&self) -> Result<Flock<File>> {
        fsutil::lock_exclusive(&self.dir.join(LOCK_FILE))
    }

    fn load(&self) -> Result<State> {
        let path = self.dir.join(STORE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing {}", path.display()))?;
                anyhow::ensure!(
                    state.version <= SCHEMA_VERSION,
                    "{} has schema version {}, newer than this binary understands ({})",
                    path.display(),
                    state.version,
                    SCHEMA_VERSION
                );
                Ok(state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                version: SCHEMA_VERSION,
                ..State::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, state: &State) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).context("serialising store")?;
        bytes.push(b'\n');
        fsutil::write_atomic(&self.dir.join(STORE_FILE), &bytes, fsutil::MODE_SECRET)
    }

    /// Snapshot of the current state.
    pub fn read(&self) -> Result<State> {
        let _guard = self.lock()?;
        self.load()
    }

    /// Run `f` on the current state under the exclusive lock. When `f` returns `Ok` with
    /// [`Outcome::Changed`] the new state is written before the lock is dropped; on `Err` nothing
    /// is written. Store I/O failures are converted into `E` through `From<anyhow::Error>`.
    pub fn transact<T, E>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, Outcome), E>,
    ) -> Result<T, E>
    where
        E: From<anyhow::Error>,
    {
        let _guard = self.lock()?;
        let mut state = self.load()?;
        let (value, outcome) = f(&mut state)?;
        if outcome == Outcome::Changed {
            state.version = SCHEMA_VERSION;
            self.save(&state)?;
        }
        Ok(value)
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// Lowercase hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("timestamp")
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn empty_store_reads_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let state = store.read().expect("read");
        assert!(state.tokens.is_empty() && state.instances.is_empty());
        assert!(
            !dir.path().join(STORE_FILE).exists(),
            "reads never create the file"
        );
    }

    #[test]
    fn changes_persist_across_handles_and_errors_roll_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .transact(|s| {
                s.instances.insert("a".into(), Instance::new("a", now()));
                s.tokens.push(BootstrapToken {
                    sha256: sha256_hex(b"secret"),
                    instance_uuid: "a".into(),
                    created_at: now(),
                    expires_at: now(),
                    consumed_at: None,
                    consumed_from_ip: None,
                });
                Ok::<_, anyhow::Error>(((), Outcome::Changed))
            })
            .expect("transact");

        let failed: Result<(), anyhow::Error> = store.transact(|s| {
            s.instances.clear();
            Err(anyhow::anyhow!("abort"))
        });
        assert!(failed.is_err());

        let mut reopened = Store::open(dir.path())
            .expect("reopen")
            .read()
            .expect("read");
        assert_eq!(
            reopened.instances.len(),
            1,
            "failed transaction must not be written"
        );
        assert_eq!(reopened.instances["a"].status, STATUS_PENDING);
        assert!(reopened.token_mut("secret").is_some());
        assert!(reopened.token_mut("other").is_none());
        let raw = std::fs::read_to_string(dir.path().join(STORE_FILE)).expect("raw");
        assert!(
            !raw.contains("\"secret\""),
            "token secret must never be stored"
        );
    }

    #[test]
    fn concurrent_updates_do_not_lose_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .transact(|s| {
                s.instances.insert("a".into(), Instance::new("a", now()));
                Ok::<_, anyhow::Error>(((), Outcome::Changed))
            })
            .expect("seed");
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 25;
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                // Separate handles model separate processes: nothing is shared but the files.
                let store = Store::open(dir.path()).expect("open");
                std::thread::spawn(move || {
                    for _ in 0..PER_THREAD {
                        store
                            .transact(|s| {
                                if let Some(i) = s.instances.get_mut("a") {
                                    i.heartbeat_count += 1;
                                }
                                Ok::<_, anyhow::Error>(((), Outcome::Changed))
                            })
                            .expect("increment");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        let state = store.read().expect("read");
        assert_eq!(state.instances["a"].heartbeat_count, THREADS * PER_THREAD);
    }

    #[test]
    fn serial_seen_is_unique_and_ordered() {
        let mut i = Instance::new("a", now());
        assert!(i.note_serial_seen("02"));
        assert!(i.note_serial_seen("01"));
        assert!(!i.note_serial_seen("02"));
        assert_eq!(i.certificate_serials_seen, vec!["02", "01"]);
    }
}
