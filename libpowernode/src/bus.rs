//! D-Bus names, object paths, error names and client proxies for every service of the suite.
//!
//! Conventions (docs/ARCHITECTURE.md §5): name = interface = `com.powernode.<Service>1` at
//! `/com/powernode/<Service>1`; state is properties with change signals; errors are
//! `com.powernode.Error.<Kind>` derived from [`crate::ErrorKind`]. The server-side interface
//! implementations live in each daemon; these proxies are what the other daemons and the CLI use.

use zbus::proxy;

pub const IDENTITY_NAME: &str = "com.powernode.Identity1";
pub const IDENTITY_PATH: &str = "/com/powernode/Identity1";
pub const ENROLL_NAME: &str = "com.powernode.Enroll1";
pub const ENROLL_PATH: &str = "/com/powernode/Enroll1";
pub const CERT_NAME: &str = "com.powernode.Cert1";
pub const CERT_PATH: &str = "/com/powernode/Cert1";
pub const AGENT_NAME: &str = "com.powernode.Agent1";
pub const AGENT_PATH: &str = "/com/powernode/Agent1";
pub const FLEETEVENT_NAME: &str = "com.powernode.FleetEvent1";
pub const FLEETEVENT_PATH: &str = "/com/powernode/FleetEvent1";
pub const MOUNT_NAME: &str = "com.powernode.Mount1";
pub const MOUNT_PATH: &str = "/com/powernode/Mount1";

/// Errors crossing the bus: one variant per [`crate::ErrorKind`], named
/// `com.powernode.Error.<Kind>`, carrying the human message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "com.powernode.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Config(String),
    Io(String),
    Unreachable(String),
    Refused(String),
    Malformed(String),
    TooLarge(String),
    NotFound(String),
    Crypto(String),
    Identity(String),
    Sandbox(String),
    Bus(String),
}

impl From<crate::Error> for BusError {
    fn from(e: crate::Error) -> Self {
        use crate::ErrorKind as K;
        let m = e.to_string();
        match e.kind() {
            K::Config => BusError::Config(m),
            K::Io => BusError::Io(m),
            K::Unreachable => BusError::Unreachable(m),
            K::Refused => BusError::Refused(m),
            K::Malformed => BusError::Malformed(m),
            K::TooLarge => BusError::TooLarge(m),
            K::NotFound => BusError::NotFound(m),
            K::Crypto => BusError::Crypto(m),
            K::Identity => BusError::Identity(m),
            K::Sandbox => BusError::Sandbox(m),
            K::Bus => BusError::Bus(m),
        }
    }
}

/// Map a method-call error received from the bus back to the library's taxonomy, so a CLI can
/// choose its exit code (5 for Unreachable/Refused) from what a daemon reported.
pub fn error_from_bus(e: zbus::Error) -> crate::Error {
    use crate::Error as E;
    if let zbus::Error::MethodError(name, msg, _) = &e {
        let msg = msg.clone().unwrap_or_default();
        match name.as_str().strip_prefix("com.powernode.Error.") {
            Some("Unreachable") => return E::Unreachable(msg),
            Some("Refused") => {
                return E::Refused {
                    status: 0,
                    code: None,
                    message: msg,
                };
            }
            Some("Identity") => return E::Identity(msg),
            Some("Crypto") => return E::Crypto(msg),
            Some("NotFound") => return E::NotFound(msg),
            Some("Config") => return E::Config(msg),
            Some(other) => return E::Bus(format!("{other}: {msg}")),
            None => {}
        }
    }
    E::Bus(e.to_string())
}

#[proxy(
    interface = "com.powernode.Mount1",
    default_service = "com.powernode.Mount1",
    default_path = "/com/powernode/Mount1"
)]
pub trait Mount1 {
    /// Pull, verify and compose one assigned module; returns its image digest.
    fn attach(&self, id: &str) -> zbus::Result<String>;
    /// Remove one module from the composition; returns the new generation.
    fn detach(&self, id: &str) -> zbus::Result<u64>;
    /// Compose exactly the platform's assignment list; returns the generation.
    fn sync(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn modules(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn union_mounted(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn generation(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "com.powernode.Identity1",
    default_service = "com.powernode.Identity1",
    default_path = "/com/powernode/Identity1"
)]
pub trait Identity1 {
    /// Run discovery (or return the cached result) and return the instance id.
    fn resolve(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn instance_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn source(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn platform_url(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn evidence(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn discovered_at(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "com.powernode.Enroll1",
    default_service = "com.powernode.Enroll1",
    default_path = "/com/powernode/Enroll1"
)]
pub trait Enroll1 {
    /// Enroll with the identity's bootstrap token unless PKI already exists; returns the instance id.
    fn enroll(&self) -> zbus::Result<String>;
    /// Relay one claim poll for identityd (which may not reach the platform): POST the typed
    /// claim request to `<server>/…/claim` trusting only `ca_pem`; returns the reply's data.
    fn post_claim(&self, server: &str, ca_pem: &str, request_json: &str) -> zbus::Result<String>;
    #[zbus(property)]
    fn enrolled(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn instance_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn certificate_serial(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn not_after(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "com.powernode.Agent1",
    default_service = "com.powernode.Agent1",
    default_path = "/com/powernode/Agent1"
)]
pub trait Agent1 {
    /// Send a heartbeat now instead of at the next tick.
    fn heartbeat_now(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn instance_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_heartbeat(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn heartbeat_count(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn next_poll_seconds(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn certificate_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn in_flight_tasks(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn tasks_completed(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn tasks_failed(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn last_task(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "com.powernode.Cert1",
    default_service = "com.powernode.Cert1",
    default_path = "/com/powernode/Cert1"
)]
pub trait Cert1 {
    /// Rotate now, whatever the schedule says (the clock must still be trusted).
    fn rotate_now(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn serial(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn not_before(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn not_after(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn renew_at(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn certificate_rotated(&self, serial: String) -> zbus::Result<()>;
}

#[proxy(
    interface = "com.powernode.FleetEvent1",
    default_service = "com.powernode.FleetEvent1",
    default_path = "/com/powernode/FleetEvent1"
)]
pub trait FleetEvent1 {
    /// Store an event durably (returns once it is on disk); returns its id.
    fn emit(&self, kind: &str, severity: &str, payload_json: &str) -> zbus::Result<String>;
    #[zbus(property)]
    fn queued(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn dropped(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn rejected(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn last_upload(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
}

/// systemd-timedated, for the clock-trust decision.
#[proxy(
    interface = "org.freedesktop.timedate1",
    default_service = "org.freedesktop.timedate1",
    default_path = "/org/freedesktop/timedate1"
)]
pub trait Timedate1 {
    #[zbus(property, name = "NTPSynchronized")]
    fn ntp_synchronized(&self) -> zbus::Result<bool>;
}

/// The interface a daemon serves at `path`, for emitting PropertiesChanged outside a method
/// call; `None` (logged) if it is not served.
pub async fn served<I: zbus::object_server::Interface>(
    conn: &zbus::Connection,
    path: &str,
) -> Option<zbus::object_server::InterfaceRef<I>> {
    match conn.object_server().interface::<_, I>(path).await {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(path, error = %e, "cannot find the served interface to signal changes");
            None
        }
    }
}

/// Send a fleet event through fleeteventd without letting its absence or slowness hurt the
/// caller: the outcome is logged, never returned. The event is also logged with an `event`
/// field, so the journal has it even when no fleeteventd is installed.
pub async fn emit_event(
    conn: Option<&zbus::Connection>,
    kind: &str,
    severity: &str,
    payload: serde_json::Value,
) {
    tracing::info!(event = kind, severity, payload = %payload, "fleet event");
    let Some(conn) = conn else { return };
    let send = async {
        FleetEvent1Proxy::new(conn)
            .await?
            .emit(kind, severity, &payload.to_string())
            .await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), send).await {
        Ok(Ok(id)) => tracing::debug!(event = kind, id = %id, "fleet event queued"),
        Ok(Err(e)) => tracing::warn!(event = kind, error = %e, "fleet event not queued"),
        Err(_) => tracing::warn!(
            event = kind,
            "fleet event not queued: fleeteventd timed out"
        ),
    }
}

/// Connect to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured, which is how tests point
/// the suite at a private bus).
pub async fn system_bus() -> crate::Result<zbus::Connection> {
    zbus::Connection::system().await.map_err(crate::Error::from)
}
