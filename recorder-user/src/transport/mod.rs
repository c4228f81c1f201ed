//! The only place SIP touches sockets: UDP and TCP listeners on the same addresses, TCP framing
//! per connection, and the one driver task that owns the sans-IO [`crate::sip::Endpoint`].
//!
//! * [`udp`]: UDP sockets and their receive tasks.
//! * [`tcp`]: TCP listeners, one task per connection (reader + writer), connection ids.
//! * [`tls`]: TLS listeners; their connections are then served like TCP ones.
//! * [`driver`]: [`driver::run`], the loop that feeds the endpoint and drains it.
//! * [`inlet`]: the two queues from the socket tasks to the driver, admission and its counters.

pub mod driver;
pub mod inlet;
pub mod tcp;
pub mod tls;
pub mod udp;

#[cfg(test)]
mod tests;

use std::{net::SocketAddr, path::PathBuf};

pub use driver::{bind, run, run_on, Command, SipApp, Sockets};
pub use inlet::{TransportMonitor, TransportStats};

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind {transport} {addr}: {source}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no listen address given")]
    NoListenAddress,
    #[error("TLS file {path}: {reason}")]
    TlsFile { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}
