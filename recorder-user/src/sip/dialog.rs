//! Dialog state (RFC 3261 §12) for dialogs we are the UAS of.

use std::{fmt, net::SocketAddr};

use super::transaction::Route;

/// Identifies a dialog: Call-ID plus our (local) and the client's (remote) tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
