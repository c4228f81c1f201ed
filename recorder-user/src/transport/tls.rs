//! SIP over TLS (RFC 3261 §26.3.1, "SIPS on 5061"): TCP listeners whose connections are wrapped
//! by rustls (ring provider) before they are framed and served exactly like TCP connections.
//! Only the server side exists: a message for a TLS peer whose connection has gone is dropped,
//! since opening a TLS connection would need a trust store for the client's certificate.

use std::{fs, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{inlet::Inlet, tcp, TransportError};
use crate::sip::Transport;

/// A client that does not finish the handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a PEM certificate chain and private key into a TLS server configuration.
pub fn server_config(certificate: &Path, key: &Path) -> Result<Arc<ServerConfig>, TransportError> {
    let pem_err = |path: &Path, reason: String| TransportError::TlsFile {
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = fs::read(certificate).map_err(|e| pem_err(certificate, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(certificate, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(
            certificate,
            "no CERTIFICATE in the PEM file".into(),
        ));
    }
    let key_pem = fs::read(key).map_err(|e| pem_err(key, e.to_string()))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TransportError::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(TransportError::Tls)?;
    Ok(Arc::new(config))
}

/// Accepts connections, runs each handshake in its own task (a slow client never holds up the
/// listener), then serves the connection like TCP with [`Transport::Tls`].
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inlet: Inlet,
    stop: CancellationToken,
) {
    while let Some((stream, peer, local)) = tcp::next_connection(&listener, &stop, "TLS").await {
        // The slot is taken before the handshake: handshakes are what a flood costs most.
        let Some(permit) = tcp::admit(&inlet, peer, "TLS") else {
            continue;
        };
        let acceptor = acceptor.clone();
        let inlet = inlet.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let handshake = tokio::select! {
                _ = stop.cancelled() => return,
                h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => h,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    tcp::spawn_connection(
                        tls,
                        peer,
                        local,
                        Transport::Tls,
                        inlet,
                        stop,
                        Some(permit),
                    );
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Binds a TLS listener (a TCP listener; TLS starts per connection).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    tcp::bind_stream(addr, "TLS")
}
