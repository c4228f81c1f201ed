//! Another host's segment of an interaction: one GET of its WAV from that host's public URL
//! (kept in the shared index), with the caller's own `Authorization`, so that the host owning
//! the files authorises and audits the download itself.

use std::{sync::Arc, time::Duration};

use axum::http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{api::ApiError, stitch, HttpError};

/// Connecting and answering, each.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest WAV accepted from a peer: the longest stitched interaction in stereo.
const MAX_BYTES: usize = stitch::MAX_FRAMES as usize * 4 + 44;

/// The TLS client configuration for `https://` peers: the certificates in `ca` (PEM).
pub fn client_config(ca: &std::path::Path) -> Result<Arc<ClientConfig>, HttpError> {
    let err = |reason: String| HttpError::PeerCa {
        path: ca.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(ca).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE in the PEM file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// GETs `path` from the host at `base` (its public URL); the body of a 200.
pub async fn get(
    host: &str,
    base: &str,
    path: &str,
    authorization: Option<&HeaderValue>,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<Vec<u8>, ApiError> {
    let fail = |why: String| ApiError::Unavailable(format!("host {host} ({base}): {why}"));
    let uri: Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| fail(format!("bad public_url: {e}")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(fail("public_url is not http:// or https://".into())),
    };
    let name = uri
        .host()
        .ok_or_else(|| fail("public_url has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let work = async {
        let tcp = TcpStream::connect((name.as_str(), port))
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        if !https {
            return request(tcp, &uri, authorization, &fail).await;
        }
        let tls = tls.ok_or_else(|| fail("an https:// peer needs http_peer_ca".into()))?;
        let server = ServerName::try_from(name.clone()).map_err(|e| fail(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(server, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        request(stream, &uri, authorization, &fail).await
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| fail("no answer in time".into()))?
}

async fn request<S>(
    stream: S,
    uri: &Uri,
    authorization: Option<&HeaderValue>,
    fail: &impl Fn(String) -> ApiError,
) -> Result<Vec<u8>, ApiError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(connection);
    let mut request = Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")).header(
        header::HOST,
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
    );
    if let Some(auth) = authorization {
        request = request.header(header::AUTHORIZATION, auth);
    }
    let request = request
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BYTES)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the answer: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        return Err(fail(format!("{status} {error}")));
    }
    Ok(body.to_vec())
}
