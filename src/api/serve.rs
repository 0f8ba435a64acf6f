//! The accept loop both ports share: each connection in a task of its own (TLS handshake
//! included, so a slow client stalls only itself), HTTP/1 and HTTP/2 with the connection
//! settings, a maximum connection age, and a drain with a bound at shutdown.
//!
//! Not axum::serve nor tonic's transport: neither exposes the HTTP/2 settings, TLS or a
//! bounded drain, and tonic's transport would answer `grpc-timeout` itself (see
//! `api::grpc::router`).

use crate::config::ConnectionSettings;
use crate::request_log::{self, RequestLogs};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its TLS handshake before the connection is closed.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After an accept error other than a failed connection (e.g. out of file descriptors),
/// wait this long before accepting again rather than spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// One port: what it serves and how.
pub struct Port {
    /// "gRPC" or "REST", for the logs.
    pub name: &'static str,
    pub listener: TcpListener,
    pub router: Router,
    /// TLS (and mTLS) on every connection; `None`: plaintext.
    pub tls: Option<PortTls>,
    /// Where a connection without a client certificate may go when one is required.
    pub anonymous: Anonymous,
    pub settings: ConnectionSettings,
}

/// A port's TLS.
#[derive(Clone)]
pub struct PortTls {
    pub config: Arc<rustls::ServerConfig>,
    /// `client_verify`: a certificate signed by `custom_ca` is required for every call but
    /// the [`Anonymous`] paths. (A certificate that is presented is always verified.)
    pub certificate_required: bool,
}

/// What a connection without a client certificate may call when `client_verify` requires
/// one. Kubelets present no certificate, so the REST port lets its probes through; all else
/// gets `refuse`'s answer, before any handler runs.
#[derive(Clone, Copy)]
pub struct Anonymous {
    pub paths: &'static [&'static str],
    pub refuse: fn() -> axum::response::Response,
}

/// What every connection of a port shares.
struct Shared {
    name: &'static str,
    router: Router,
    tls: Option<TlsAcceptor>,
    /// `router` for connections without a client certificate, when one is required.
    anonymous_router: Option<Router>,
    http: auto::Builder<TokioExecutor>,
    settings: ConnectionSettings,
}

/// `router` as a connection without a client certificate may use it: only `anonymous`'s
/// paths.
fn anonymous_router(router: Router, anonymous: Anonymous) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if anonymous.paths.contains(&request.uri().path()) {
                next.run(request).await
            } else {
                (anonymous.refuse)()
            }
        },
    ))
}

/// Runs every request of `router` in a request logging scope (see [`request_log`]). A map
/// of the response future rather than axum's `from_fn` middleware, which boxes and costs a
/// few microseconds a request whether or not any model logs.
pub fn with_request_log(router: Router, logs: Arc<RequestLogs>) -> Router {
    router.layer(tower::util::MapFutureLayer::new(move |response| {
        request_log::scope(Arc::clone(&logs), response)
    }))
}

/// Serves `port` until `stop` turns true. Then the listener closes (new connections are
/// refused), every connection is asked to finish (HTTP/2 GOAWAY; HTTP/1 closes once idle),
/// and those still open after `drain` are closed.
pub async fn serve(port: Port, mut stop: watch::Receiver<bool>, drain: Duration) {
    let anonymous_router = port
        .tls
        .as_ref()
        .filter(|tls| tls.certificate_required)
        .map(|_| anonymous_router(port.router.clone(), port.anonymous));
    let shared = Arc::new(Shared {
        name: port.name,
        router: port.router,
        tls: port.tls.map(|tls| TlsAcceptor::from(tls.config)),
        anonymous_router,
        http: http_builder(&port.settings),
        settings: port.settings,
    });
    let listener = port.listener;
    let connection_stop = stop.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|&stop| stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let stop = connection_stop.clone();
                    connections.spawn(connection(tcp, peer, Arc::clone(&shared), stop));
                }
                Err(e) => accept_failed(shared.name, e).await,
            },
            // Finished connections leave the set as they go.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let finished = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "{}: closing the connections still open after the drain limit ({drain:?})",
            shared.name
        );
        connections.shutdown().await;
    }
}

/// The largest HTTP/2 frame the server accepts (SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// HTTP/2 flow-control windows: how much a client may send on a stream, and on all the
/// streams of a connection, before the server has read it. They also bound what one
/// connection can make the server buffer.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// HTTP/1 and HTTP/2 on one port (told apart by the HTTP/2 preface), with the settings.
fn http_builder(settings: &ConnectionSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer gives HTTP/1 its header read timeout (30 s), so a client that never
    // finishes its request head cannot hold a connection for ever.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        // Tensors arrive in large messages: let clients send them in frames of up to
        // 1 MiB instead of HTTP/2's default 16 KiB, so a 602 KB image is a few frames to
        // parse and buffer rather than 37.
        .max_frame_size(MAX_FRAME_BYTES)
        // hyper's 1 MiB windows made a client with two 602 KB images in flight on a
        // connection wait for WINDOW_UPDATEs; these (grpc-go's BDP ceiling for the
        // connection) let it send them at once.
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .keep_alive_interval(settings.keepalive_time)
        .keep_alive_timeout(settings.keepalive_timeout);
    builder
}

async fn accept_failed(name: &str, error: std::io::Error) {
    use std::io::ErrorKind;
    // A client that went away between its SYN and our accept: nothing to do.
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!("{name}: cannot accept a connection: {error}");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    // Small unary calls: do not let Nagle hold back the response.
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = &shared.tls else {
        return serve_connection(tcp, peer, &shared, &shared.router, stop).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let certified = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|chain| !chain.is_empty());
            let router = match &shared.anonymous_router {
                Some(anonymous) if !certified => anonymous,
                _ => &shared.router,
            };
            serve_connection(tls, peer, &shared, router, stop).await
        }
        // Debug only: anyone can reach the port with anything, and logs must not be theirs
        // to fill.
        Ok(Err(e)) => tracing::debug!(%peer, "{}: TLS handshake failed: {e}", shared.name),
        Err(_) => tracing::debug!(%peer, "{}: TLS handshake timed out", shared.name),
    }
}

/// Serves one connection until it closes; asks it to go away when the server stops or the
/// connection reaches its maximum age, and closes it when the age's grace is over.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    shared: &Shared,
    router: &Router,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router.clone());
    let conn = shared.http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let aged = sleep_or_never(shared.settings.max_connection_age.map(jitter));
    tokio::pin!(aged);
    let grace_over = sleep_or_never(None);
    tokio::pin!(grace_over);
    let mut going_away = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, "{}: connection ended: {e}", shared.name);
                }
                return;
            }
            _ = stop.wait_for(|&stop| stop), if !going_away => {
                going_away = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut aged, if !going_away => {
                going_away = true;
                conn.as_mut().graceful_shutdown();
                grace_over.set(sleep_or_never(shared.settings.max_connection_age_grace));
            }
            () = &mut grace_over => return,
        }
    }
}

async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// The age plus or minus up to 10%, as gRPC does, so that connections opened together do not
/// all reconnect together.
fn jitter(age: Duration) -> Duration {
    age.mul_f64(0.9 + 0.2 * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth() {
        let age = Duration::from_secs(100);
        for _ in 0..1000 {
            let jittered = jitter(age);
            assert!(jittered >= Duration::from_secs(90) && jittered <= Duration::from_secs(110));
        }
    }
}
