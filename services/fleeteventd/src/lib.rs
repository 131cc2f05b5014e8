//! powernode-fleeteventd: accepts fleet events from the node's processes, keeps them in the
//! durable queue ([`powernode::events::Queue`]) and uploads them to the platform.
//!
//! Two ways in, both answering only once the event is on disk (fsync'd, group-committed):
//! - **D-Bus** `com.powernode.FleetEvent1.Emit(kind, severity, payload_json) → id`, with the
//!   properties `Queued`, `Dropped`, `Rejected`, `LastUpload`, `LastError`;
//! - **the event socket** `/run/powernode/events.sock`, passed by systemd (socket activation).
//!   It is `SOCK_SEQPACKET`: one JSON event per message (`{"kind","severity","payload"}`),
//!   message boundaries kept like a datagram socket, but connected, so the sender's credentials
//!   come from `SO_PEERCRED` (unforgeable, unlike a claimed field) and every message gets a reply
//!   message: `{"ok":true,"id":…}` once stored, or `{"ok":false,"error":<reason>,"message":…}`.
//!   A client that does not read replies loses nothing but the replies.
//!
//! Invalid input (bad JSON, unknown severity, oversize, a sender over its rate, a `system.*`
//! kind from a uid outside the suite) is refused with a reason and counted in `Rejected`; the
//! daemon stays up. An event that is valid but could not be stored is answered `storage`, so
//! the client knows to retry. The socket's clients are bounded per uid ([`limits`]): connections
//! (a uid over its share, or the daemon at the budget its fd limit allows, is told
//! `too_many_connections` and closed), events per second, and idle time (a connection that sends
//! nothing for `--connection-idle-secs` is closed), so no uid can keep another's events out. The uploader posts batches of at most
//! 500 to `POST fleet/events` through the rotation-following [`InstanceClient`], backing off with
//! the retry policy while the platform is down, and acknowledges in the ledger only what the
//! platform accepted, so a restart resumes where it stopped. The daemon exits once idle *and*
//! drained.

pub mod limits;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use powernode::bus::{BusError, FLEETEVENT_NAME, FLEETEVENT_PATH};
use powernode::config::Config;
use powernode::events::{Event, EventError, MAX_BATCH, MAX_PAYLOAD_BYTES, Queue, QueueConfig};
use powernode::paths::Paths;
use powernode::pki::PkiStore;
use powernode::retry::RetryPolicy;
use powernode::sandbox::Profile;
use powernode::systemd::{self, IdleTracker};
use powernode::transport::InstanceClient;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::limits::{
    ConnectionLimits, DEFAULT_SYSTEM_SENDERS, MAX_CONNECTIONS_PER_UID, RateLimiter, SystemSenders,
};

/// node_api path of the upload.
pub const UPLOAD_PATH: &str = "/fleet/events";
/// A socket message: the payload cap plus room for kind, severity and JSON framing.
pub const MAX_MESSAGE_BYTES: usize = MAX_PAYLOAD_BYTES + 4096;
/// Events waiting for the writer; beyond this, submitters wait (back-pressure, not loss).
const SUBMIT_QUEUE: usize = 4096;
/// Most events one group commit takes.
const MAX_COMMIT: usize = 1024;
/// Socket messages read from one connection before their replies are sent.
const MAX_PIPELINE: usize = 256;
/// How long a reply may wait for a client that does not read its socket.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Socket events parsed and not yet stored, across all connections: bounds the memory a flood
/// can pin (each at most [`MAX_MESSAGE_BYTES`] on the wire) to tens of MiB whatever the number
/// of connections. Beyond it, connections wait (back-pressure, not loss).
const MAX_IN_FLIGHT: usize = MAX_COMMIT;
/// How long accept() pauses when the process is out of descriptors (EMFILE/ENFILE): the pending
/// connection stays in the backlog, so retrying at once would only spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A connection that sends nothing for this long is closed by default: a client emits and
/// goes, or reconnects when it has something to say, and an idle slot counts against its uid.
const DEFAULT_CONNECTION_IDLE_SECS: u64 = 30;
/// On SIGTERM, the uploader gets this long to empty the queue before the daemon exits
/// (well inside the unit's TimeoutStopSec; what is left stays on disk for the next start).
const FLUSH_ON_STOP: Duration = Duration::from_secs(5);
/// How often the idle check looks again while events are still queued.
const DRAIN_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Parser)]
#[command(
    name = "powernode-fleeteventd",
    version,
    about = "Durable fleet event daemon (com.powernode.FleetEvent1)"
)]
pub struct Args {
    /// Node root: every path is taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Disk budget of the queue; above it the oldest events are dropped (and counted).
    #[arg(long, default_value_t = QueueConfig::default().max_bytes)]
    pub max_queue_bytes: u64,
    /// Size at which a queue segment is closed (the granularity of dropping).
    #[arg(long, default_value_t = QueueConfig::default().segment_bytes)]
    pub segment_bytes: u64,
    /// Events per second one sender uid (all its processes together) may submit on average.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Events one sender uid may submit in a burst above the rate.
    #[arg(long, default_value_t = 10000)]
    pub burst: u32,
    /// Close a socket connection that sends nothing for this many seconds.
    #[arg(long, default_value_t = DEFAULT_CONNECTION_IDLE_SECS)]
    pub connection_idle_secs: u64,
    /// Users (names or numeric uids, comma-separated) allowed to emit `system.*` kinds; names
    /// missing on the node are skipped.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SYSTEM_SENDERS.iter().map(|s| s.to_string()))]
    pub system_senders: Vec<String>,
}

/// Forget bus peers' credentials once this many are cached.
const MAX_TRACKED_PEERS: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Shared state

struct Submit {
    event: Event,
    reply: oneshot::Sender<Result<String, EventError>>,
}

/// Who sent an event, as the kernel or the bus reported it.
#[derive(Debug, Clone)]
struct Sender {
    /// None when the credentials could not be had: such senders share one rate bucket and may
    /// not use the reserved namespace.
    uid: Option<u32>,
    /// Recorded with the event (`socket uid=… gid=… pid=…`, `dbus uid=… pid=…`).
    source: String,
}

#[derive(Debug, Default, Clone)]
struct Status {
    last_upload: String,
    last_error: String,
}

struct Shared {
    queue: Arc<Mutex<Queue>>,
    submit: mpsc::Sender<Submit>,
    limiter: Mutex<RateLimiter<Option<u32>>>,
    system_senders: SystemSenders,
    connections: Arc<ConnectionLimits>,
    in_flight: Arc<Semaphore>,
    status: Mutex<Status>,
    rejected: AtomicU64,
    idle: IdleTracker,
    /// Wakes the uploader when something was stored.
    stored: Notify,
    conn: Mutex<Option<zbus::Connection>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these cannot leave them inconsistent in a way that matters
    // more than stopping the daemon would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Check the reserved namespace and the sender's rate, then store durably; the event's id
    /// once it is fsync'd.
    async fn submit(&self, event: Event, sender: &Sender) -> Result<String, EventError> {
        self.idle.touch();
        if !self.system_senders.may_emit(sender.uid, &event.kind) {
            self.reject("reserved_kind");
            tracing::info!(kind = %event.kind, sender = %sender.source, "reserved event kind refused");
            return Err(EventError::ReservedKind(event.kind));
        }
        if !lock(&self.limiter).allow(&sender.uid, Instant::now()) {
            self.reject("rate_limited");
            let who = sender.uid.map_or_else(
                || "senders without credentials".into(),
                |u| format!("uid {u}"),
            );
            return Err(EventError::RateLimited(who));
        }
        let (tx, rx) = oneshot::channel();
        let writer_gone = || EventError::Storage("event writer stopped".into());
        self.submit
            .send(Submit { event, reply: tx })
            .await
            .map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }

    fn reject(&self, reason: &str) {
        let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(reason, rejected_total = n, "event rejected");
    }

    fn queued(&self) -> u64 {
        lock(&self.queue).queued()
    }

    async fn announce(&self) {
        let conn = lock(&self.conn).clone();
        let Some(conn) = conn else { return };
        let Some(iface) = powernode::bus::served::<FleetEventService>(&conn, FLEETEVENT_PATH).await
        else {
            return;
        };
        let em = iface.signal_emitter();
        let svc = iface.get().await;
        for r in [
            svc.queued_changed(em).await,
            svc.dropped_changed(em).await,
            svc.last_upload_changed(em).await,
            svc.last_error_changed(em).await,
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, "emitting PropertiesChanged");
            }
        }
    }
}

/// The group-commit writer: takes everything submitted meanwhile, appends it with one fsync,
/// then answers every submitter.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Submit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_COMMIT {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let (events, replies): (Vec<Event>, Vec<_>) =
            batch.into_iter().map(|s| (s.event, s.reply)).unzip();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let queue = shared.queue.clone();
        // Whatever the cause (disk full, I/O error, a crashed task), the events are valid and
        // were not stored: the client hears `storage` and may retry.
        let result = tokio::task::spawn_blocking(move || lock(&queue).append(&events))
            .await
            .map_err(|e| EventError::Storage(format!("event writer task failed: {e}")))
            .and_then(|r| r.map_err(|e| EventError::Storage(e.to_string())));
        match &result {
            Ok(_) => shared.stored.notify_one(),
            Err(e) => tracing::error!(error = %e, "storing events failed"),
        }
        for (id, reply) in ids.into_iter().zip(replies) {
            // A submitter that went away (a killed client) needs no answer.
            if reply
                .send(result.as_ref().map(|_| id).map_err(Clone::clone))
                .is_err()
            {
                tracing::debug!("submitter gone before its event was stored");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Uploader

fn now_rfc3339() -> String {
    powernode::pki::rfc3339(time::OffsetDateTime::now_utc())
}

async fn uploader(shared: Arc<Shared>, paths: Paths, cfg: Config) {
    let policy = RetryPolicy::from(&cfg.retry);
    let mut client = InstanceClient::new(cfg.platform.clone(), PkiStore::new(paths.pki_dir()));
    let mut failures = 0u32;
    loop {
        let queue = shared.queue.clone();
        let batch = match tokio::task::spawn_blocking(move || {
            let q = lock(&queue);
            q.read_batch(MAX_BATCH).map(|b| (b, q.acked_seq()))
        })
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading queued events failed");
                tokio::time::sleep(policy.max_delay).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reader task failed");
                tokio::time::sleep(policy.max_delay).await;
                continue;
            }
        };
        let (batch, acked) = batch;
        if batch.last_seq <= acked {
            // Drained: wait for the writer (a permit stored by notify_one is not lost).
            shared.stored.notified().await;
            continue;
        }
        if !batch.events.is_empty() {
            let body = serde_json::json!({
                "events": batch.events.iter().map(|e| e.wire(cfg.events.wire_severity)).collect::<Vec<_>>(),
            });
            let sent = policy
                .run(|_| {
                    let c = client.refresh().cloned();
                    let body = &body;
                    async move { c?.post::<_, serde_json::Value>(UPLOAD_PATH, body).await }
                })
                .await;
            match sent {
                Ok(reply) => {
                    tracing::info!(events = batch.events.len(), last_seq = batch.last_seq, reply = %reply, "events uploaded");
                    failures = 0;
                }
                Err(e) => {
                    let wait = policy.delay(failures, None, fastrand::f64());
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, kind = %e.kind(), wait_ms = wait.as_millis() as u64, queued = shared.queued(), "event upload failed; keeping them queued");
                    lock(&shared.status).last_error = e.to_string();
                    shared.announce().await;
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
        }
        let queue = shared.queue.clone();
        let seq = batch.last_seq;
        match tokio::task::spawn_blocking(move || lock(&queue).ack(seq)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "recording the acknowledgement failed; the batch will be sent again")
            }
            Err(e) => tracing::error!(error = %e, "ack task failed"),
        }
        {
            let mut st = lock(&shared.status);
            st.last_upload = now_rfc3339();
            st.last_error.clear();
        }
        shared.idle.touch();
        shared.announce().await;
    }
}

// ---------------------------------------------------------------------------------------------
// D-Bus

struct FleetEventService {
    shared: Arc<Shared>,
    /// Credentials of bus peers by unique name (asked once per peer).
    peers: HashMap<String, Sender>,
}

impl FleetEventService {
    async fn sender_of(&mut self, conn: &zbus::Connection, sender: Option<&str>) -> Sender {
        let Some(sender) = sender else {
            return Sender {
                uid: None,
                source: "dbus".into(),
            };
        };
        if let Some(s) = self.peers.get(sender) {
            return s.clone();
        }
        let described = async {
            let proxy = zbus::fdo::DBusProxy::new(conn).await?;
            let name = zbus::names::BusName::try_from(sender.to_string())?;
            let creds = proxy.get_connection_credentials(name).await?;
            let uid = creds.unix_user_id();
            Ok::<_, zbus::Error>(Sender {
                uid,
                source: format!(
                    "dbus uid={} pid={}",
                    uid.map_or_else(|| "?".into(), |u| u.to_string()),
                    creds
                        .process_id()
                        .map_or_else(|| "?".into(), |p| p.to_string())
                ),
            })
        }
        .await
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, sender, "no credentials for bus peer");
            Sender {
                uid: None,
                source: format!("dbus {sender}"),
            }
        });
        if self.peers.len() >= MAX_TRACKED_PEERS {
            self.peers.clear();
        }
        self.peers.insert(sender.to_string(), described.clone());
        described
    }
}

#[zbus::interface(name = "com.powernode.FleetEvent1")]
impl FleetEventService {
    /// Store an event durably; returns its id (the `correlation_id` the platform sees).
    async fn emit(
        &mut self,
        kind: &str,
        severity: &str,
        payload_json: &str,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, BusError> {
        self.shared.idle.touch();
        let sender = header.sender().map(|s| s.to_string());
        let sender = self.sender_of(conn, sender.as_deref()).await;
        let event = Event::new(kind, severity, payload_json, &sender.source).map_err(|e| {
            self.shared.reject(e.kind());
            BusError::from(powernode::Error::from(e))
        })?;
        let shared = self.shared.clone();
        shared
            .submit(event, &sender)
            .await
            .map_err(|e| BusError::from(powernode::Error::from(e)))
    }

    /// Events stored and not yet accepted by the platform.
    #[zbus(property)]
    async fn queued(&self) -> u64 {
        self.shared.queued()
    }

    /// Events dropped by the queue's size cap, ever.
    #[zbus(property)]
    async fn dropped(&self) -> u64 {
        lock(&self.shared.queue).dropped()
    }

    /// Submissions refused (invalid, oversize, rate-limited, reserved kind) since start.
    #[zbus(property)]
    async fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// When the platform last accepted a batch (RFC 3339), empty if never since start.
    #[zbus(property)]
    async fn last_upload(&self) -> String {
        lock(&self.shared.status).last_upload.clone()
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        lock(&self.shared.status).last_error.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The event socket

/// The socket systemd passed, if any (`ListenSequentialPacket=`).
fn take_socket() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    // A SOCK_SEQPACKET listener accepts like a stream listener, so the std type carries it;
    // listenfd checks the family and type before wrapping it.
    let l = fds
        .take_custom::<std::os::unix::net::UnixListener>(
            0,
            nix::libc::AF_UNIX,
            nix::libc::SOCK_SEQPACKET,
            "unix seqpacket socket",
        )
        .context("LISTEN_FDS: fd 3")?;
    Ok(l)
}

fn reply_ok(id: &str) -> Vec<u8> {
    serde_json::json!({"ok": true, "id": id})
        .to_string()
        .into_bytes()
}

fn reply_err(e: &EventError) -> Vec<u8> {
    serde_json::json!({"ok": false, "error": e.kind(), "message": e.to_string()})
        .to_string()
        .into_bytes()
}

/// Accept for as long as the daemon runs. Every pending connection is taken off the backlog,
/// even one the caps refuse (it is told why and closed), so connections that are never served
/// cannot pile up in front of those that would be. Out of descriptors, it waits and retries; it
/// never gives up on the socket.
async fn serve_socket(shared: Arc<Shared>, listener: tokio::net::UnixListener, idle: Duration) {
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                failing = false;
                shared.idle.touch();
                let Some((sender, slot)) = admit(&shared, &conn) else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_connection(shared, conn, sender, idle).await;
                    // Counted until the connection is gone.
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE/ENFILE leave the connection pending and the listener readable, so
                // without the pause this would spin; said once per episode, not per retry.
                if failing {
                    tracing::debug!(error = %e, "accept on the event socket still failing");
                } else {
                    tracing::warn!(error = %e, "accept on the event socket failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The sender of a new connection and its counted slot, or None once it was refused.
fn admit(shared: &Shared, conn: &tokio::net::UnixStream) -> Option<(Sender, limits::Slot)> {
    let cred = match conn.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            // Unix sockets always carry credentials; without them nothing can be counted.
            tracing::warn!(error = %e, "no peer credentials on the event socket; connection closed");
            return None;
        }
    };
    let sender = Sender {
        uid: Some(cred.uid()),
        source: format!(
            "socket uid={} gid={} pid={}",
            cred.uid(),
            cred.gid(),
            cred.pid().map_or_else(|| "?".into(), |p| p.to_string())
        ),
    };
    match shared.connections.try_open(cred.uid()) {
        Ok(slot) => Some((sender, slot)),
        Err(refusal) => {
            shared.reject("too_many_connections");
            tracing::debug!(sender = %sender.source, %refusal, "event socket connection refused");
            let reply = reply_err(&EventError::TooManyConnections(refusal.to_string()));
            // A fresh connection's send buffer is empty: the refusal fits without waiting.
            if let Err(e) = conn.try_write(&reply) {
                tracing::debug!(error = %e, "could not tell a refused connection why");
            }
            None
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    conn: tokio::net::UnixStream,
    sender: Sender,
    idle: Duration,
) {
    // One byte more than accepted: a message that fills it was larger (SEQPACKET truncates).
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    loop {
        match tokio::time::timeout(idle, conn.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "event socket connection failed");
                return;
            }
            Err(_) => {
                tracing::debug!(sender = %sender.source, "idle event socket connection closed");
                return;
            }
        }
        let mut pending: Vec<Result<oneshot::Receiver<Result<String, EventError>>, EventError>> =
            Vec::new();
        let mut eof = false;
        while pending.len() < MAX_PIPELINE {
            match conn.try_read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    shared.idle.touch();
                    match Event::from_message(&buf[..n], MAX_MESSAGE_BYTES, &sender.source) {
                        Ok(ev) => {
                            let Ok(permit) = shared.in_flight.clone().acquire_owned().await else {
                                pending.push(Err(EventError::Storage("daemon stopping".into())));
                                continue;
                            };
                            let (tx, rx) = oneshot::channel();
                            let shared2 = shared.clone();
                            let sender2 = sender.clone();
                            // Submitted concurrently so one connection's burst shares a commit.
                            tokio::spawn(async move {
                                let r = shared2.submit(ev, &sender2).await;
                                drop(permit);
                                if tx.send(r).is_err() {
                                    tracing::debug!("socket client gone before its reply");
                                }
                            });
                            pending.push(Ok(rx));
                        }
                        Err(e) => {
                            shared.reject(e.kind());
                            pending.push(Err(e));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the event socket");
                    eof = true;
                    break;
                }
            }
        }
        for p in pending {
            let reply = match p {
                Ok(rx) => match rx.await {
                    Ok(Ok(id)) => reply_ok(&id),
                    Ok(Err(e)) => reply_err(&e),
                    Err(_) => reply_err(&EventError::Storage("event writer stopped".into())),
                },
                Err(e) => reply_err(&e),
            };
            if !eof && !send_reply(&conn, &reply).await {
                eof = true;
            }
        }
        if eof {
            return;
        }
    }
}

/// Send one reply message; false once the peer is gone or does not read.
async fn send_reply(conn: &tokio::net::UnixStream, msg: &[u8]) -> bool {
    let attempt = async {
        loop {
            conn.writable().await?;
            match conn.try_write(msg) {
                Ok(_) => return Ok::<_, std::io::Error>(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(REPLY_TIMEOUT, attempt).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "event socket peer gone");
            false
        }
        Err(_) => {
            tracing::debug!("event socket peer does not read its replies");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up

pub async fn serve(
    paths: Paths,
    cfg: Config,
    args: &Args,
    system_senders: SystemSenders,
    socket: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<()> {
    let dir = paths.state_dir().join("events");
    let qcfg = QueueConfig {
        max_bytes: args.max_queue_bytes,
        segment_bytes: args.segment_bytes,
    };
    let queue = tokio::task::spawn_blocking(move || Queue::open(&dir, qcfg))
        .await
        .context("queue recovery task")??;
    let rec = queue.recovery().clone();
    tracing::info!(
        segments = rec.segments,
        records = rec.records,
        queued = queue.queued(),
        dropped = queue.dropped(),
        corrupt_regions = rec.corrupt_regions,
        truncated_bytes = rec.truncated_bytes,
        ledger_reset = rec.ledger_reset,
        "event queue recovered"
    );
    let (nofile, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .context("reading RLIMIT_NOFILE")?;
    let budget = limits::connection_budget(nofile);
    tracing::info!(
        nofile,
        connections = budget,
        per_uid = MAX_CONNECTIONS_PER_UID,
        "event socket connection caps"
    );
    let (tx, rx) = mpsc::channel(SUBMIT_QUEUE);
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let shared = Arc::new(Shared {
        queue: Arc::new(Mutex::new(queue)),
        submit: tx,
        limiter: Mutex::new(RateLimiter::new(args.rate, args.burst)),
        system_senders,
        connections: ConnectionLimits::new(MAX_CONNECTIONS_PER_UID, budget),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        status: Mutex::new(Status::default()),
        rejected: AtomicU64::new(0),
        idle: idle.clone(),
        stored: Notify::new(),
        conn: Mutex::new(None),
    });
    tokio::spawn(writer(shared.clone(), rx));
    // Whatever a previous run left queued goes out without waiting for a new event.
    shared.stored.notify_one();
    tokio::spawn(uploader(shared.clone(), paths.clone(), cfg.clone()));
    if let Some(l) = socket {
        l.set_nonblocking(true)
            .context("event socket: non-blocking")?;
        let l = tokio::net::UnixListener::from_std(l).context("event socket")?;
        let idle = Duration::from_secs(args.connection_idle_secs.max(1));
        tokio::spawn(serve_socket(shared.clone(), l, idle));
        tracing::info!("serving the event socket");
    }
    let conn = zbus::connection::Builder::system()
        .name(FLEETEVENT_NAME)
        .serve_at(
            FLEETEVENT_PATH,
            FleetEventService {
                shared: shared.clone(),
                peers: HashMap::new(),
            },
        )
        .build()
        .await
        .with_context(|| format!("owning {FLEETEVENT_NAME} on the system bus"))?;
    *lock(&shared.conn) = Some(conn);
    idle.touch();
    systemd::ready("serving com.powernode.FleetEvent1");
    let drained_and_idle = async {
        loop {
            idle.wait_idle().await;
            let queued = shared.queued();
            if queued == 0 {
                return;
            }
            systemd::status(&format!("idle; {queued} events waiting for the platform"));
            tokio::time::sleep(DRAIN_POLL).await;
        }
    };
    tokio::select! {
        _ = drained_and_idle => tracing::info!("idle and drained, exiting"),
        r = powernode::daemon::shutdown_signal() => {
            r?;
            // Everything queued is already durable; this only saves the next start an upload.
            // Bounded, so a platform outage never holds up a shutdown.
            let queued = shared.queued();
            if queued > 0 {
                systemd::stopping(&format!("stopping: flushing {queued} events"));
                let flushed = tokio::time::timeout(FLUSH_ON_STOP, async {
                    while shared.queued() > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await
                .is_ok();
                tracing::info!(before = queued, left = shared.queued(), flushed, "signal, exiting");
            } else {
                tracing::info!("signal, exiting (queue empty)");
            }
        }
    }
    systemd::stopping("exiting");
    Ok(())
}

pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-fleeteventd",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            // Taken before the sandbox and the runtime: LISTEN_FDS is about this process only.
            let socket = take_socket()?;
            // Resolved before the sandbox, which may hide the user database.
            let system_senders = SystemSenders::resolve(&args.system_senders);
            match std::fs::read_to_string("/proc/self/uid_map") {
                Ok(map) if limits::uids_collapsed(&map) => tracing::warn!(
                    uid_map = %map.trim(),
                    "in a user namespace: socket senders whose uid is not mapped all read as \
                     65534 and share one connection and rate allowance (drop PrivateUsers=)"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading /proc/self/uid_map"),
            }
            // The sandbox grants write access to existing paths only.
            powernode::fsutil::ensure_dir(&paths.state_dir().join("events"), 0o700)?;
            let rt = powernode::daemon::start(Profile::Events, &paths)?;
            rt.block_on(serve(paths, cfg, &args, system_senders, socket))?;
            Ok(ExitCode::SUCCESS)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let ok: serde_json::Value = serde_json::from_slice(&reply_ok("x")).unwrap_or_default();
        assert_eq!(ok["ok"], true);
        let e = reply_err(&EventError::Severity("low".into()));
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap_or_default();
        assert_eq!(v["error"], "invalid_severity");
        let v: serde_json::Value =
            serde_json::from_slice(&reply_err(&EventError::Storage("ENOSPC".into())))
                .unwrap_or_default();
        assert_eq!(v["error"], "storage");
    }
}
