//! `serve`: key material start-up, the rustls server configuration (TLS 1.3/1.2, client
//! certificates optional but verified against our CA when presented), and the manual accept loop
//! TCP → TLS → hyper HTTP/1.1 → axum, with the verified peer certificate attached to every request
//! of its connection. A failed handshake drops only that connection. SIGTERM/SIGINT stop
//! accepting, let in-flight requests finish briefly, and exit 0.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::api::{self, ApiConfig, AppState, PeerInfo};
use crate::ca::Ca;
use crate::fsutil;
use crate::jwt::JwtKey;
use crate::store::Store;

const JWT_SECRET_FILE: &str = "jwt.secret";
const URL_FILE: &str = "url";
/// A client that does not finish the handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight connections may run after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    pub listen: String,
    pub sans: Vec<String>,
    pub config: ApiConfig,
}

pub async fn serve(opts: ServeOptions) -> Result<()> {
    fsutil::ensure_dir(&opts.state_dir)?;
    let state_dir = std::path::absolute(&opts.state_dir)
        .with_context(|| format!("resolving {}", opts.state_dir.display()))?;
    let store = Store::open(&state_dir)?;
    let ca = Ca::load_or_create(&state_dir)?;
    let jwt = JwtKey::load_or_create(&state_dir.join(JWT_SECRET_FILE))?;
    let tls = tls_config(&ca, &opts.sans)?;

    let listener = TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let bound = listener.local_addr().context("reading bound address")?;
    let url = format!("https://{}", display_addr(bound));
    fsutil::write_atomic(
        &state_dir.join(URL_FILE),
        format!("{url}\n").as_bytes(),
        fsutil::MODE_PUBLIC,
    )?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "CA {}", ca.cert_path().display()).context("writing stdout")?;
        writeln!(out, "URL {url}").context("writing stdout")?;
        out.flush().context("flushing stdout")?;
    }
    tracing::info!(%url, state_dir = %state_dir.display(), "serving node_api");

    let state = Arc::new(AppState {
        store,
        ca,
        jwt,
        config: opts.config,
        events: crate::events::EventLog::open(&state_dir)?,
        state_dir: state_dir.clone(),
    });
    let router = api::router(state);
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    connections.spawn(handle_connection(
                        acceptor.clone(),
                        router.clone(),
                        stream,
                        remote,
                        shutdown_rx.clone(),
                    ));
                }
                // Per-connection accept errors (e.g. EMFILE, ECONNABORTED) must not end the
                // server; back off briefly so a persistent one does not spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
        }
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }

    drop(listener);
    if shutdown_tx.send(true).is_err() {
        tracing::debug!("no connection was listening for shutdown");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
        connections.abort_all();
    }
    tracing::info!("stopped");
    Ok(())
}

fn tls_config(ca: &Ca, sans: &[String]) -> Result<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert_der()?)
        .context("adding CA to client-auth roots")?;
    // allow_unauthenticated: enroll has no client certificate yet. A certificate that *is*
    // presented must chain to our CA or the handshake fails.
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .context("building client certificate verifier")?;
    let (chain, key) = ca.issue_server_cert(sans)?;
    let mut config = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_client_cert_verifier(verifier)
    .with_single_cert(chain, key)
    .context("configuring server certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The address to advertise: unspecified binds are reachable over loopback.
fn display_addr(bound: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
    } else {
        bound
    }
}

async fn handle_connection(
    acceptor: TlsAcceptor,
    router: axum::Router,
    stream: TcpStream,
    remote: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "TLS handshake timed out");
            return;
        }
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.clone().into_owned());
    tracing::debug!(%remote, client_cert = client_cert.is_some(), "TLS established");
    let peer = PeerInfo {
        client_cert,
        remote,
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            router.clone().oneshot(req)
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_advertised_as_loopback() {
        let cases = [
            ("0.0.0.0:8443", "127.0.0.1:8443"),
            ("[::]:9000", "127.0.0.1:9000"),
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("[::1]:2", "[::1]:2"),
        ];
        for (bound, want) in cases {
            let bound: SocketAddr = bound.parse().expect("addr");
            assert_eq!(display_addr(bound).to_string(), want);
        }
    }
}
