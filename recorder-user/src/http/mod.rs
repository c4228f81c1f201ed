//! The HTTP API and `/metrics`: axum on hyper (HTTP/1.1), on the daemon's runtime.
//!
//! `http_listen` serves the whole router, over TLS (rustls, as SIP) when
//! `http_tls_certificate` and `http_tls_private_key` are set; `metrics_listen`, kept for configs
//! written before `http_listen`, serves the same router in plain HTTP. The accept loop is ours
//! (not `axum::serve`) so that a TLS handshake runs in the connection's task, never holding up
//! the listener, and every request knows its client address for the audit log.

mod api;
mod audit;
mod auth;
mod console;
mod files;
mod peer;
mod stitch;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    error_handling::HandleErrorLayer,
    extract::ConnectInfo,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::Semaphore,
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::{limit::GlobalConcurrencyLimitLayer, BoxError, ServiceBuilder, ServiceExt};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{debug, info};

pub use self::{
    audit::Audit,
    auth::{TokenFile, Tokens},
};
use crate::{
    config::Config,
    guard::{
        ApiCounters, HTTP_HANDLER_TIMEOUT, HTTP_MAX_BODY, HTTP_MAX_CONNECTIONS, HTTP_MAX_HEAD,
        HTTP_MAX_IN_FLIGHT,
    },
    metrics,
};

/// Errors setting the HTTP server up (request errors are `api::ApiError`, private to the module).
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("binding the HTTP listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP TLS: {0}")]
    Tls(#[from] crate::transport::TransportError),
    #[error("api_tokens_file {path}: {reason}")]
    Tokens { path: PathBuf, reason: String },
    #[error("http_peer_ca {path}: {reason}")]
    PeerCa { path: PathBuf, reason: String },
    #[error("audit_log {path}: {source}")]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers read.
pub struct HttpState {
    pub config: Config,
    pub sources: metrics::Sources,
    pub tokens: TokenFile,
    pub audit: Audit,
    /// The index connection the handlers share (opened at the first query).
    pub index: std::sync::Mutex<Option<crate::index::Index>>,
    /// TLS for fetching from other hosts' `https://` public URLs (`http_peer_ca`).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
}

/// A client that has not sent its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not finish the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the listeners the configuration asks for (`http_listen`, `metrics_listen`); they
/// serve until `shutdown`.
pub async fn start(
    config: &Config,
    sources: metrics::Sources,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, HttpError> {
    if config.http_listen.is_none() && config.metrics_listen.is_none() {
        return Ok(Vec::new());
    }
    if config.api_tokens_file.is_none() && config.http_listen.is_some() {
        tracing::warn!("no api_tokens_file: every /api/v1 request gets 401");
    }
    let tokens = TokenFile::open(config.api_tokens_file.as_deref())?;
    let audit = match &config.audit_log {
        Some(path) => Audit::open(path)?,
        None => Audit::DaemonLog,
    };
    let peer_tls = config
        .http_peer_ca
        .as_deref()
        .map(peer::client_config)
        .transpose()?;
    let state = Arc::new(HttpState {
        config: config.clone(),
        sources,
        tokens,
        audit,
        index: std::sync::Mutex::new(None),
        peer_tls,
    });
    if let Some(url) = config.public_url.clone() {
        // Other hosts find this one's files through the shared index.
        let state = state.clone();
        tokio::spawn(async move {
            let site = state.config.site_name();
            let set = url.clone();
            match api::with_index(&state, move |index| index.set_public_url(&site, &set)).await {
                Ok(()) => info!(%url, "public URL recorded in the index"),
                Err(e) => tracing::warn!(error = %e, "cannot record the public URL in the index"),
            }
        });
    }
    let api_counters = state.sources.api.clone();
    let router = limited(api::router(state), api_counters.clone());
    let mut tasks = Vec::new();
    if let Some(addr) = config.http_listen {
        let tls = match (&config.http_tls_certificate, &config.http_tls_private_key) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(
                crate::transport::tls::server_config(cert, key)?,
            )),
            _ => None,
        };
        tasks.push(
            serve(
                addr,
                tls,
                router.clone(),
                api_counters.clone(),
                shutdown.clone(),
            )
            .await?,
        );
    }
    if let Some(addr) = config.metrics_listen {
        tasks.push(serve(addr, None, router, api_counters, shutdown).await?);
    }
    Ok(tasks)
}

/// The router behind the request limits: bodies over [`HTTP_MAX_BODY`] get 413; beyond
/// [`HTTP_MAX_IN_FLIGHT`] requests at once (one limit for every route) and for a handler that
/// has not answered within [`HTTP_HANDLER_TIMEOUT`], 503 at once, so a burst of clients never
/// queues up work or memory behind the ones being served.
fn limited(router: Router, api: Arc<ApiCounters>) -> Router {
    let in_flight = Arc::new(Semaphore::new(HTTP_MAX_IN_FLIGHT));
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |e: BoxError| {
                let api = api.clone();
                async move { limit_error(&api, e) }
            }))
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(in_flight))
            .timeout(HTTP_HANDLER_TIMEOUT)
            .layer(RequestBodyLimitLayer::new(HTTP_MAX_BODY)),
    )
}

/// The answer of a request limit, as the API's other errors: JSON `{"error": ...}`.
fn limit_error(api: &ApiCounters, e: BoxError) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let (status, message) = if e.is::<tower::load_shed::error::Overloaded>() {
        api.http_overloaded.fetch_add(1, Relaxed);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many requests in flight (at most {HTTP_MAX_IN_FLIGHT}); retry"),
        )
    } else if e.is::<tower::timeout::error::Elapsed>() {
        api.http_timeouts.fetch_add(1, Relaxed);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "request not answered within {} s",
                HTTP_HANDLER_TIMEOUT.as_secs()
            ),
        )
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    };
    (
        status,
        [(header::RETRY_AFTER, "1")],
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// What a plain-HTTP client over the connection limit reads before the connection closes.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 40\r\n\r\n\
{\"error\":\"too many connections; retry\"}\n";

/// Binds `addr` and serves `router` on it (TLS with `tls`) until `shutdown`, at most
/// [`HTTP_MAX_CONNECTIONS`] connections at once: a plain-HTTP client beyond that gets a 503, a
/// TLS one is closed (answering it would cost a handshake).
pub async fn serve(
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    api: Arc<ApiCounters>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, HttpError> {
    let slots = Arc::new(Semaphore::new(HTTP_MAX_CONNECTIONS));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, tls = tls.is_some(), "HTTP listening");
    Ok(tokio::spawn(async move {
        let mut backoff = crate::accept::AcceptBackoff::new("HTTP");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                },
            };
            backoff.succeeded();
            let _ = stream.set_nodelay(true);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                api.http_connections_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if tls.is_none() {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let write = stream.write_all(TOO_MANY_CONNECTIONS);
                        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
                    });
                }
                continue;
            };
            let router = router.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            // Connections end with the daemon: the state holds the writer, which shutdown
            // needs back.
            tokio::spawn(async move {
                let _slot = slot;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = connection(stream, peer, tls, router) => {}
                }
            });
        }
    }))
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
) {
    match tls {
        None => http1(stream, peer, router).await,
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => http1(stream, peer, router).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "HTTP TLS handshake failed"),
                Err(_) => debug!(%peer, "HTTP TLS handshake timed out"),
            }
        }
    }
}

/// Serves HTTP/1.1 requests on one connection, each tagged with the client's address.
async fn http1<S>(stream: S, peer: SocketAddr, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Also closes keep-alive connections idle for that long (hyper starts it per head).
        .header_read_timeout(HEADER_TIMEOUT)
        // Heads beyond this get 431 from hyper.
        .max_buf_size(HTTP_MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        debug!(%peer, error = %e, "HTTP connection ended");
    }
}
