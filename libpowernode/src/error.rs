//! The library's error type. Every failure carries a bounded [`ErrorKind`], which is what D-Bus
//! error names (`com.powernode.Error.<Kind>`), event kinds and exit codes are derived from; the
//! message is for humans.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The bounded set of failure kinds. Adding one is an API change (D-Bus error names derive from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Config,
    Io,
    /// The platform could not be reached or did not answer in time (retryable).
    Unreachable,
    /// The platform answered and refused (4xx): retrying the same request will not help.
    Refused,
    /// The platform (or another peer) sent something we cannot accept.
    Malformed,
    TooLarge,
    NotFound,
    Crypto,
    Identity,
    Sandbox,
    Bus,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "Config",
            ErrorKind::Io => "Io",
            ErrorKind::Unreachable => "Unreachable",
            ErrorKind::Refused => "Refused",
            ErrorKind::Malformed => "Malformed",
            ErrorKind::TooLarge => "TooLarge",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::Crypto => "Crypto",
            ErrorKind::Identity => "Identity",
            ErrorKind::Sandbox => "Sandbox",
            ErrorKind::Bus => "Bus",
        }
    }

    /// The CLI exit code for this kind (upstream table: 5 = platform unreachable or refused).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Unreachable | ErrorKind::Refused => 5,
            _ => 1,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("platform unreachable: {0}")]
    Unreachable(String),
    /// No connection was established (TCP refused, TLS handshake failed): the request was
    /// provably never sent, so nothing it carried (a bootstrap token) was spent.
    #[error("platform not reached, nothing was sent: {0}")]
    NotConnected(String),
    /// The platform answered "not ready yet" (5xx, 429): retryable, maybe after a given delay.
    #[error("platform unavailable (HTTP {status}): {message}")]
    Unavailable {
        status: u16,
        retry_after: Option<std::time::Duration>,
        message: String,
    },
    #[error("platform refused the request (HTTP {status}{code}): {message}", code = code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Refused {
        status: u16,
        code: Option<String>,
        message: String,
    },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("D-Bus: {0}")]
    Bus(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::Io { .. } => ErrorKind::Io,
            Error::Unreachable(_) | Error::NotConnected(_) | Error::Unavailable { .. } => {
                ErrorKind::Unreachable
            }
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Malformed { .. } => ErrorKind::Malformed,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Crypto(_) => ErrorKind::Crypto,
            Error::Identity(_) => ErrorKind::Identity,
            Error::Sandbox(_) => ErrorKind::Sandbox,
            Error::Bus(_) => ErrorKind::Bus,
        }
    }

    /// Wrap an I/O error with the operation and path, the context an operator needs.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Self {
        Error::Bus(e.to_string())
    }
}
