//! Dialog state (RFC 3261 §12) for dialogs we are the UAS of.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{endpoint::Transport, transaction::Route};

/// Identifies a dialog: Call-ID plus our (local) and the client's (remote) tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DialogId {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
}

impl fmt::Display for DialogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{};local-tag={};remote-tag={}",
            self.call_id, self.local_tag, self.remote_tag
        )
    }
}

/// A confirmed (or confirming: 2xx sent, ACK pending) dialog.
#[derive(Clone, Debug)]
pub(crate) struct Dialog {
    pub id: DialogId,
    /// Highest CSeq seen from the client; in-dialog requests must exceed it (§12.2.2).
    pub remote_cseq: u32,
    /// CSeq of the last request we sent in the dialog.
    pub local_cseq: u32,
    /// Our side as the client wrote it in To, with our tag.
    pub local_party: String,
    /// The client's From value, with its tag.
    pub remote_party: String,
    /// The client's Contact URI (the remote target), updated by re-INVITE/UPDATE.
    pub remote_target: Option<rsip::Uri>,
    /// Record-Route values of the dialog-creating request, in order (our route set, §12.1.1).
    pub route_set: Vec<String>,
    /// How the dialog-creating request reached us; requests we send reuse it.
    pub route: Route,
    /// The address the dialog-creating request came from.
    pub source: SocketAddr,
}

impl Dialog {
    /// Checks and records the CSeq of an incoming in-dialog request. Lower or equal numbers are
    /// out of order (§12.2.2 says 500); ACK and CANCEL reuse their INVITE's number and are not
    /// passed here.
    pub fn accept_cseq(&mut self, cseq: u32) -> bool {
        if cseq <= self.remote_cseq {
            return false;
        }
        self.remote_cseq = cseq;
        true
    }
}

/// A dialog as a restarted daemon needs it to carry on: what in-dialog requests are checked
/// against and what the requests we send are built from (see [`super::Endpoint::export_dialog`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialogSnapshot {
    pub id: DialogId,
    pub remote_cseq: u32,
    pub local_cseq: u32,
    /// Our To value with our tag (the From of our requests).
    pub local_party: String,
    /// The client's From value with its tag (the To of our requests).
    pub remote_party: String,
    /// The client's Contact URI, as text.
    pub remote_target: Option<String>,
    /// Record-Route values, in order.
    pub route_set: Vec<String>,
    pub transport: Transport,
    /// Where the dialog's messages went (our in-dialog requests fall back to it).
    pub destination: SocketAddr,
    /// Our address the dialog was created on.
    pub local: Option<SocketAddr>,
    /// The address the dialog-creating request came from.
    pub source: SocketAddr,
    /// Our 2xx to the last INVITE of the dialog still waits for its ACK.
    pub awaiting_ack: Option<PendingAck>,
}

/// An INVITE server transaction in Accepted state (RFC 6026): 2xx sent, no ACK yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAck {
    /// The INVITE as received, without its body: retransmissions and the ACK match it.
    pub invite: String,
    /// Our 2xx as sent (retransmitted on UDP until the ACK comes).
    pub response: String,
    /// What was left of the 64*T1 wait for the ACK.
    pub ack_wait: Duration,
}
