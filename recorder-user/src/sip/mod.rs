//! Sans-IO SIP user-agent server: RFC 3261 server transactions, dialogs and the stateless
//! answers a recording server gives by itself.
//!
//! Nothing here touches a socket or reads the clock: bytes and `now` go in through
//! [`Endpoint::handle_incoming`] / [`Endpoint::handle_timeout`], and datagrams, events and the
//! next wake-up come out of [`Endpoint::poll_transmit`], [`Endpoint::poll_event`] and
//! [`Endpoint::poll_timeout`] (the quinn-proto shape). The async shell that owns the sockets is
//! [`crate::transport`].
//!
//! * [`admission`]: which messages may wait behind new sessions under load.
//! * [`framing`]: splitting a TCP byte stream into messages by `Content-Length`.
//! * [`message`]: parsing with `rsip` (plus the narrow normalisation it needs) and header helpers.
//! * [`transaction`]: server transactions (INVITE and non-INVITE) and our BYE client transaction.
//! * [`dialog`]: dialog state keyed by Call-ID and tags.
//! * [`config`]: endpoint configuration and counters.
//! * `outgoing`: where responses and our requests go, and their encoding.
//! * [`endpoint`]: routing of incoming messages to all of the above; the public API (its
//!   `responses` builds what it answers).

pub mod admission;
pub mod config;
pub mod dialog;
pub mod endpoint;
pub mod framing;
pub mod message;
mod outgoing;
pub mod transaction;

pub use admission::{classify, Class};
pub use dialog::{DialogId, DialogSnapshot, PendingAck};
pub use endpoint::{
    Endpoint, EndpointConfig, Incoming, Network, SipCounters, SipEvent, Transmit, Transport, TxnId,
};
pub use framing::{frame, Framer, FramingError};

use std::time::Duration;

/// RFC 3261 T1: round-trip time estimate, the first retransmission interval.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2: the cap of the retransmission interval.
pub const T2: Duration = Duration::from_secs(4);
/// RFC 3261 T4: how long a message may stay in the network (timers I and K on UDP).
pub const T4: Duration = Duration::from_secs(5);

/// Errors the application gets back from [`Endpoint`] commands.
#[derive(Debug, thiserror::Error)]
pub enum SipError {
    #[error("unknown transaction")]
    UnknownTransaction,
    #[error("transaction already has a final response")]
    AlreadyAnswered,
    #[error("unknown dialog {0}")]
    UnknownDialog(DialogId),
    #[error("response is unusable: {0}")]
    BadResponse(String),
    #[error("cannot send {0} requests")]
    UnsupportedMethod(rsip::Method),
    #[error("cannot import dialog {id}: {reason}")]
    BadSnapshot { id: DialogId, reason: String },
}

#[cfg(test)]
mod tests;
