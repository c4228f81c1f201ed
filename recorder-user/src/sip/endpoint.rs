//! The SIP endpoint: routes every incoming message to a transaction, a dialog, a stateless
//! answer, or the application, and owns all their timers.
//!
//! # Method taxonomy (quinn-proto style)
//! * `&self` getters: [`Endpoint::make_response`], [`Endpoint::dialog_of`],
//!   [`Endpoint::has_dialog`], [`Endpoint::capability_headers`], [`Endpoint::counters`],
//!   [`Endpoint::dialog_count`], [`Endpoint::transaction_count`].
//! * input: [`Endpoint::handle_incoming`], [`Endpoint::handle_timeout`].
//! * application commands: [`Endpoint::respond`], [`Endpoint::send_bye`].
//! * output: [`Endpoint::poll_event`], [`Endpoint::poll_transmit`], [`Endpoint::poll_timeout`].
//! * restart handover: [`Endpoint::export_dialog`], [`Endpoint::forget_dialog`] (old daemon),
//!   [`Endpoint::import_dialog`] (new daemon).
//!
//! After every input or command, drain `poll_event` and `poll_transmit` until both return
//! `None`, then sleep until `poll_timeout` (the driver in [`crate::transport::driver`] does
//! exactly that in one function).
//!
//! # What the endpoint answers by itself
//! Malformed requests (400 with a reason saying what; 505 for another SIP version), missing
//! mandatory headers (400), unknown `Require` option tags (420 + `Unsupported`), Max-Forwards 0
//! (483), unknown dialogs (481), CSeq out of order in a dialog (500), a re-INVITE while the
//! previous one is unanswered (500 + `Retry-After`), out-of-dialog OPTIONS (200 with
//! Allow/Accept/Supported), CANCEL (200, plus 487 to the INVITE), methods it cannot serve
//! (405/501), overload (503 + `Retry-After`), and retransmitted requests (answered from their
//! transaction). ACKs are absorbed. Everything else becomes a [`SipEvent::Request`].
//!
//! # Contract with the application
//! * Every [`SipEvent::Request`] gets one final response through [`Endpoint::respond`]
//!   (build it with [`Endpoint::make_response`], add headers and a body). Unanswered after
//!   [`EndpointConfig::app_answer_timeout`], the endpoint answers 500 itself.
//! * INVITEs already got 100 Trying. A 2xx to an initial INVITE creates the dialog whose id
//!   [`Endpoint::dialog_of`] gives from the start; [`SipEvent::Acked`] or
//!   [`SipEvent::AckTimeout`] follows. After [`SipEvent::Cancelled`], do not answer.
//! * A 2xx to an in-dialog BYE ends the dialog. To end it from our side, [`Endpoint::send_bye`]
//!   (the dialog ends at once; [`SipEvent::RequestCompleted`] reports the outcome).
//! * Hosts written as bracketed IPv6 references appear in parsed URIs as marker domains
//!   (an rsip limitation, see [`super::message`]); [`super::message::marker_ip`] decodes them.
//!
//! # Example: answering a recording INVITE
//! ```
//! use std::time::Instant;
//! use bytes::Bytes;
//! use recorder::sip::{Endpoint, EndpointConfig, Incoming, SipEvent, Transport};
//! use rsip::headers::UntypedHeader; // brings `new` for untyped headers
//!
//! let mut endpoint = Endpoint::new(EndpointConfig::default());
//! let now = Instant::now();
//! let invite = "INVITE sip:srs@127.0.0.1 SIP/2.0\r\n\
//!     Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
//!     From: <sip:src@127.0.0.1>;tag=a\r\nTo: <sip:srs@127.0.0.1>\r\n\
//!     Call-ID: doc\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
//! endpoint.handle_incoming(now, Incoming {
//!     transport: Transport::Udp,
//!     source: "127.0.0.1:5070".parse().unwrap(),
//!     local: "127.0.0.1:5060".parse().unwrap(),
//!     connection: None,
//!     bytes: Bytes::from_static(invite.as_bytes()),
//! });
//! while let Some(event) = endpoint.poll_event() {
//!     if let SipEvent::Request { txn, .. } = event {
//!         let mut ok = endpoint.make_response(&txn, 200, None).unwrap();
//!         ok.headers.push(rsip::Header::ContentType(rsip::headers::ContentType::new("application/sdp")));
//!         ok.body = b"v=0\r\n".to_vec();
//!         endpoint.respond(now, &txn, ok).unwrap();
//!     }
//! }
//! assert!(endpoint.poll_transmit().unwrap().bytes.starts_with(b"SIP/2.0 100 Trying"));
//! assert!(endpoint.poll_transmit().unwrap().bytes.starts_with(b"SIP/2.0 200 OK"));
//! assert_eq!(endpoint.dialog_count(), 1);
//! ```

mod responses;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use bytes::Bytes;
use rsip::{
    headers::{ToTypedHeader, UntypedHeader},
    prelude::HeadersExt,
    Header,
};

pub use super::config::{EndpointConfig, Network, SipCounters};
pub use super::transaction::TxnId;
use super::{
    dialog::{Dialog, DialogId, DialogSnapshot, PendingAck},
    message::{self, Parsed, RequestFacts},
    outgoing::{
        bracket_v6, encode_response, ensure_to_tag, in_dialog_route, new_tag, response_route,
        sanitize_reason, stamp_via, uri_for,
    },
    transaction::{
        ClientOutput, ClientTransaction, Route, ServerState, ServerTransaction, TxnKey, TxnOutput,
    },
    SipError,
};

/// The transport a message came on or goes out on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    Udp,
    Tcp,
    /// SIP over TLS (RFC 3261 §26.3.1): framed like TCP, answered on the same connection.
    Tls,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        })
    }
}

/// Bytes to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub transport: Transport,
    pub destination: SocketAddr,
    /// For TCP: the connection the request came on (responses and in-dialog requests reuse it).
    pub connection: Option<u64>,
    /// Our address to send from (the one the request arrived on), when known.
    pub local: Option<SocketAddr>,
    pub bytes: Bytes,
}

/// One received datagram or TCP-framed message.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub transport: Transport,
    pub source: SocketAddr,
    pub local: SocketAddr,
    /// For TCP: the id of the connection it arrived on.
    pub connection: Option<u64>,
    pub bytes: Bytes,
}

/// What the application is told.
#[derive(Debug)]
// Events are moved once from the queue to the app; boxing the request would only cost an alloc.
#[allow(clippy::large_enum_variant)]
pub enum SipEvent {
    /// A request that needs the app's answer: new INVITE (`dialog: None`), or an in-dialog
    /// re-INVITE, UPDATE, BYE, INFO, OPTIONS, NOTIFY, MESSAGE, REFER, PRACK (`dialog: Some`);
    /// also out-of-dialog OPTIONS when [`EndpointConfig::app_handles_options`] is set.
    /// The app must answer with [`Endpoint::respond`] (now or later); INVITEs already got
    /// 100 Trying.
    Request {
        txn: TxnId,
        dialog: Option<DialogId>,
        request: rsip::Request,
        source: SocketAddr,
        transport: Transport,
    },
    /// A pending INVITE was CANCELled: the endpoint already sent 200 to the CANCEL and 487 to
    /// the INVITE; `txn` can no longer be answered.
    Cancelled { txn: TxnId },
    /// The 2xx to an INVITE (initial or re-INVITE) got its ACK.
    Acked { dialog: DialogId },
    /// The 2xx to an INVITE was never ACKed (64*T1): the dialog is gone and the endpoint sent a
    /// BYE for it (RFC 3261 §13.3.1.4); its outcome comes as [`SipEvent::RequestCompleted`].
    AckTimeout { dialog: DialogId },
    /// A request we sent ([`Endpoint::send_bye`], [`Endpoint::send_request`]) got its final
    /// `response`, or none within 64*T1 (`None`).
    RequestCompleted {
        dialog: DialogId,
        method: rsip::Method,
        response: Option<rsip::Response>,
    },
    /// A message could not be parsed or was rejected statelessly (for counters/logs).
    /// `status` is the response sent, or 0 when the message was dropped unanswered.
    Rejected {
        status: u16,
        reason: String,
        source: SocketAddr,
    },
}

/// The sans-IO SIP UAS. See the module documentation for the call order.
pub struct Endpoint {
    config: EndpointConfig,
    next_txn: u64,
    txns: HashMap<TxnId, ServerTransaction>,
    by_key: HashMap<TxnKey, TxnId>,
    dialogs: HashMap<DialogId, Dialog>,
    /// The INVITE transaction whose 2xx waits for its ACK, per dialog.
    awaiting_ack: HashMap<DialogId, TxnId>,
    /// Our BYE client transactions by Via branch.
    clients: HashMap<String, ClientTransaction>,
    /// Deadlines of all transactions, earliest first. Entries go stale when a transaction's
    /// timers change; stale ones are skipped (and pruned from the top after every call), so
    /// `poll_timeout` is O(1) and `handle_timeout` only visits due transactions.
    timers: BinaryHeap<Reverse<(Instant, TimerOwner)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SipEvent>,
    counters: SipCounters,
    /// Dialogs given to another daemon ([`Endpoint::forget_dialog`]): their requests are
    /// dropped, not answered 481.
    handed_over: HashSet<DialogId>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerOwner {
    Server(TxnId),
    Client(String),
}

/// What a stateless answer needs about the request.
struct Answer<'a> {
    request: &'a rsip::Request,
    facts: &'a RequestFacts,
    source: SocketAddr,
    route: Route,
    local_tag: Option<&'a str>,
}

impl Endpoint {
    pub fn new(config: EndpointConfig) -> Self {
        Self {
            config,
            next_txn: 1,
            txns: HashMap::new(),
            by_key: HashMap::new(),
            dialogs: HashMap::new(),
            awaiting_ack: HashMap::new(),
            clients: HashMap::new(),
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: SipCounters::default(),
            handed_over: HashSet::new(),
        }
    }

    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    pub fn counters(&self) -> &SipCounters {
        &self.counters
    }

    /// Live dialogs (2xx sent and not yet ended).
    pub fn dialog_count(&self) -> usize {
        self.dialogs.len()
    }

    /// The dialog of `txn`: the one an in-dialog request belongs to, or, for an initial INVITE,
    /// the id its 2xx creates (known from the start, so sessions can be keyed by it at once).
    pub fn dialog_of(&self, txn: &TxnId) -> Option<DialogId> {
        let t = self.txns.get(txn)?;
        if let Some(d) = &t.dialog {
            return Some(d.clone());
        }
        if t.request.method != rsip::Method::Invite {
            return None;
        }
        Some(DialogId {
            call_id: t.facts.call_id.clone(),
            local_tag: t.local_tag.clone()?,
            remote_tag: t.facts.from_tag.clone().unwrap_or_default(),
        })
    }

    /// Whether `dialog` is live.
    pub fn has_dialog(&self, dialog: &DialogId) -> bool {
        self.dialogs.contains_key(dialog)
    }

    /// Server transactions currently kept.
    pub fn transaction_count(&self) -> usize {
        self.txns.len()
    }

    // ---------------------------------------------------------------- handover

    /// The state of a live dialog that a restarted daemon needs to carry it on
    /// ([`Endpoint::import_dialog`]), including the INVITE whose 2xx still waits for its ACK.
    /// Other transactions are not included: they cannot outlive the process.
    pub fn export_dialog(&self, now: Instant, id: &DialogId) -> Option<DialogSnapshot> {
        let d = self.dialogs.get(id)?;
        let awaiting_ack = self
            .awaiting_ack
            .get(id)
            .and_then(|txn| self.txns.get(txn))
            .and_then(|t| {
                let ack_wait = t.ack_wait_left(now)?;
                let response = t.last_response.as_ref()?;
                let mut invite = t.request.clone();
                invite.body.clear();
                invite
                    .headers
                    .retain(|h| !matches!(h, Header::ContentLength(_)));
                invite
                    .headers
                    .push(Header::ContentLength(rsip::headers::ContentLength::new(
                        "0",
                    )));
                Some(PendingAck {
                    invite: message::restore_ipv6(&invite.to_string()).into_owned(),
                    response: String::from_utf8_lossy(response).into_owned(),
                    ack_wait,
                })
            });
        Some(DialogSnapshot {
            id: d.id.clone(),
            remote_cseq: d.remote_cseq,
            local_cseq: d.local_cseq,
            local_party: d.local_party.clone(),
            remote_party: d.remote_party.clone(),
            remote_target: d.remote_target.as_ref().map(|u| u.to_string()),
            route_set: d.route_set.clone(),
            transport: d.route.transport,
            destination: d.route.destination,
            local: d.route.local,
            source: d.source,
            awaiting_ack,
        })
    }

    /// Rebuilds a dialog exported by a previous daemon. Stream connections do not survive a
    /// restart: the dialog keeps no connection, so our requests on TCP open a new one to
    /// `destination` (or reuse the client's latest), and on TLS wait for the client to connect.
    /// A pending ACK gets its INVITE transaction back, so the ACK (or a retransmitted INVITE)
    /// is matched and [`SipEvent::Acked`] / [`SipEvent::AckTimeout`] follow as usual.
    pub fn import_dialog(
        &mut self,
        now: Instant,
        snapshot: DialogSnapshot,
    ) -> Result<DialogId, SipError> {
        let id = snapshot.id.clone();
        let bad = |reason: String| SipError::BadSnapshot {
            id: id.clone(),
            reason,
        };
        if self.dialogs.contains_key(&id) {
            return Err(bad("the dialog exists already".into()));
        }
        let remote_target = snapshot
            .remote_target
            .as_deref()
            .map(|t| rsip::Uri::try_from(t).map_err(|e| bad(format!("remote target {t:?}: {e}"))))
            .transpose()?;
        let route = Route {
            transport: snapshot.transport,
            destination: snapshot.destination,
            connection: None,
            local: snapshot.local,
        };
        let pending = snapshot
            .awaiting_ack
            .map(|p| {
                let datagram = false;
                let request = match message::parse(p.invite.as_bytes(), datagram) {
                    Parsed::Request(r) if r.method == rsip::Method::Invite => r,
                    _ => return Err(bad("pending INVITE does not parse".into())),
                };
                let facts = message::required_headers(&request).map_err(bad)?;
                Ok((request, facts, p))
            })
            .transpose()?;
        self.dialogs.insert(
            id.clone(),
            Dialog {
                id: id.clone(),
                remote_cseq: snapshot.remote_cseq,
                local_cseq: snapshot.local_cseq,
                local_party: snapshot.local_party,
                remote_party: snapshot.remote_party,
                remote_target,
                route_set: snapshot.route_set,
                route,
                source: snapshot.source,
            },
        );
        if let Some((request, facts, p)) = pending {
            let key = TxnKey::new(&facts, &rsip::Method::Invite);
            // The initial INVITE had no To-tag: its responses carry the dialog's.
            let local_tag = facts.to_tag.is_none().then(|| id.local_tag.clone());
            let txn = self.insert_txn(
                key,
                route,
                snapshot.source,
                request,
                facts,
                local_tag,
                Some(id.clone()),
            );
            if let Some(t) = self.txns.get_mut(&txn) {
                t.restore_accepted(now, Bytes::from(p.response.into_bytes()), p.ack_wait);
            }
            self.awaiting_ack.insert(id.clone(), txn);
            self.schedule(TimerOwner::Server(txn));
            self.prune_timers();
        }
        Ok(id)
    }

    /// Drops a dialog and every transaction of it without a word to the client (it was handed
    /// over to another daemon). Requests in it that still arrive here are dropped unanswered,
    /// so that a UDP client's retransmission reaches the next daemon. `false` if it did not
    /// exist.
    pub fn forget_dialog(&mut self, id: &DialogId) -> bool {
        let existed = self.dialogs.remove(id).is_some();
        if existed {
            self.handed_over.insert(id.clone());
        }
        self.awaiting_ack.remove(id);
        let txns: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(_, t)| t.dialog.as_ref() == Some(id))
            .map(|(txn, _)| *txn)
            .collect();
        for txn in txns {
            self.remove_txn(txn);
        }
        self.clients.retain(|_, c| &c.dialog != id);
        self.prune_timers();
        existed
    }

    // ---------------------------------------------------------------- input

    /// Processes one datagram or framed TCP message.
    pub fn handle_incoming(&mut self, now: Instant, incoming: Incoming) {
        if incoming.bytes.iter().all(|b| b.is_ascii_whitespace()) {
            self.counters.keepalives += 1;
            return;
        }
        let datagram = incoming.transport == Transport::Udp;
        // A datagram's header section beyond what a stream may carry is not worth a parse
        // (a flood of them would cost the driver more than every live call).
        let head = incoming
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(incoming.bytes.len());
        if datagram && head > super::framing::MAX_HEADER_BYTES {
            let reason = format!(
                "header section over {} bytes",
                super::framing::MAX_HEADER_BYTES
            );
            let answer =
                super::admission::raw_response(&incoming.bytes, 513, "Message Too Large", &[]);
            let status = if let Some(bytes) = answer {
                self.counters.count_response(513);
                self.push_transmit(
                    Route {
                        transport: incoming.transport,
                        destination: incoming.source,
                        connection: incoming.connection,
                        local: Some(incoming.local),
                    },
                    Bytes::from(bytes),
                );
                513
            } else {
                0
            };
            return self.note_rejection(status, "too-large", reason, incoming.source);
        }
        match message::parse(&incoming.bytes, datagram) {
            Parsed::Request(request) => self.handle_request(now, &incoming, request),
            Parsed::Response(response) => self.handle_response(&incoming, response),
            Parsed::Unprocessable {
                request,
                status,
                reason,
            } => {
                if !self.try_unknown_method(&incoming) {
                    self.reject_unparsed(&incoming, &request, status, reason);
                }
            }
            Parsed::Garbage(reason) => {
                if !self.try_unknown_method(&incoming) {
                    self.note_rejection(0, "garbage", reason, incoming.source);
                }
            }
        }
        self.prune_timers();
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, owner))) = self.timers.peek().cloned() {
            if at > now {
                break;
            }
            self.timers.pop();
            if !self.timer_is_current(at, &owner) {
                continue;
            }
            match owner {
                TimerOwner::Server(id) => self.server_timeout(now, id),
                TimerOwner::Client(branch) => self.client_timeout(now, branch),
            }
        }
        self.prune_timers();
    }

    fn server_timeout(&mut self, now: Instant, id: TxnId) {
        let Some(txn) = self.txns.get_mut(&id) else {
            return;
        };
        let mut out = Vec::new();
        txn.handle_timeout(now, &mut out);
        let route = txn.route;
        let dialog = txn.dialog.clone();
        for output in out {
            match output {
                TxnOutput::Retransmit(bytes) => {
                    self.counters.retransmissions_sent += 1;
                    self.push_transmit(route, bytes);
                }
                TxnOutput::AckTimeout => {
                    self.counters.ack_timeouts += 1;
                    if let Some(dialog) = dialog.clone() {
                        if self.awaiting_ack.get(&dialog) == Some(&id) {
                            self.awaiting_ack.remove(&dialog);
                        }
                        // §13.3.1.4: the session SHOULD be ended with a BYE.
                        let reason = "SIP;cause=408;text=\"ACK timeout\"";
                        let _ = self.send_bye(now, &dialog, Some(reason));
                        self.events.push_back(SipEvent::AckTimeout { dialog });
                    }
                }
                TxnOutput::AppDeadline => {
                    let reason = "No answer from the application";
                    if let Some(response) = self.make_response(&id, 500, Some(reason)) {
                        let _ = self.respond(now, &id, response);
                    }
                    if let Some(source) = self.txns.get(&id).map(|t| t.source) {
                        self.note_rejection(500, "app-timeout", reason.into(), source);
                    }
                }
                TxnOutput::Terminated => self.remove_txn(id),
            }
        }
        self.schedule(TimerOwner::Server(id));
    }

    fn client_timeout(&mut self, now: Instant, branch: String) {
        let Some(client) = self.clients.get_mut(&branch) else {
            return;
        };
        let mut out = Vec::new();
        client.handle_timeout(now, &mut out);
        let route = client.route;
        for output in out {
            match output {
                ClientOutput::Retransmit(bytes) => {
                    self.counters.retransmissions_sent += 1;
                    self.push_transmit(route, bytes);
                }
                ClientOutput::TimedOut => {
                    if let Some(client) = self.clients.remove(&branch) {
                        self.events.push_back(SipEvent::RequestCompleted {
                            dialog: client.dialog,
                            method: client.method,
                            response: None,
                        });
                    }
                }
            }
        }
        self.schedule(TimerOwner::Client(branch));
    }

    /// Records the current deadline of a transaction (after anything that may change it).
    fn schedule(&mut self, owner: TimerOwner) {
        let at = match &owner {
            TimerOwner::Server(id) => self.txns.get(id).and_then(|t| t.poll_timeout()),
            TimerOwner::Client(b) => self.clients.get(b).and_then(|c| c.poll_timeout()),
        };
        if let Some(at) = at {
            self.timers.push(Reverse((at, owner)));
        }
    }

    fn timer_is_current(&self, at: Instant, owner: &TimerOwner) -> bool {
        let current = match owner {
            TimerOwner::Server(id) => self.txns.get(id).and_then(|t| t.poll_timeout()),
            TimerOwner::Client(b) => self.clients.get(b).and_then(|c| c.poll_timeout()),
        };
        current == Some(at)
    }

    /// Drops stale entries from the top so that `poll_timeout` reports a real deadline.
    fn prune_timers(&mut self) {
        while let Some(Reverse((at, owner))) = self.timers.peek() {
            if self.timer_is_current(*at, owner) {
                return;
            }
            self.timers.pop();
        }
    }

    // ---------------------------------------------------------------- output

    /// The earliest instant at which [`Endpoint::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SipEvent> {
        self.events.pop_front()
    }

    // ---------------------------------------------------------------- app commands

    /// Sends the app's answer to the request of `txn`.
    ///
    /// A 2xx to an initial INVITE creates the dialog (keyed by the To-tag of
    /// [`Endpoint::make_response`], which is added here if the app dropped it); a 2xx to BYE
    /// ends it. `Content-Length` is set from the body.
    pub fn respond(
        &mut self,
        now: Instant,
        txn: &TxnId,
        mut response: rsip::Response,
    ) -> Result<(), SipError> {
        let status = response.status_code.code();
        if !(100..=699).contains(&status) {
            return Err(SipError::BadResponse(format!("status {status}")));
        }
        let t = self.txns.get_mut(txn).ok_or(SipError::UnknownTransaction)?;
        if status > 100 {
            if let Some(tag) = &t.local_tag {
                ensure_to_tag(&mut response, tag);
            }
        }
        let bytes = encode_response(&mut response);
        t.send(now, status, bytes.clone())?;
        let route = t.route;
        let method = t.request.method;
        self.counters.count_response(status);
        self.push_transmit(route, bytes);
        self.schedule(TimerOwner::Server(*txn));
        if (200..300).contains(&status) {
            match method {
                rsip::Method::Invite => self.on_invite_accepted(*txn),
                rsip::Method::Update => self.refresh_target(*txn),
                rsip::Method::Bye => {
                    if let Some(dialog) = self.txns.get(txn).and_then(|t| t.dialog.clone()) {
                        self.dialogs.remove(&dialog);
                        // A BYE before the ACK: stop retransmitting the 2xx, the dialog is over.
                        if let Some(invite) = self.awaiting_ack.remove(&dialog) {
                            if let Some(t) = self.txns.get_mut(&invite) {
                                t.on_ack(now);
                                self.schedule(TimerOwner::Server(invite));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        self.prune_timers();
        Ok(())
    }

    /// Sends a BYE in `dialog` (e.g. the operator stopped the recording) and ends the dialog.
    /// `reason` is the value of a `Reason` header (RFC 3326), e.g. `SIP;cause=200;text="stop"`.
    /// Retransmitted on UDP until a final response or timer F; the outcome comes as
    /// [`SipEvent::RequestCompleted`].
    pub fn send_bye(
        &mut self,
        now: Instant,
        dialog: &DialogId,
        reason: Option<&str>,
    ) -> Result<(), SipError> {
        let mut d = self
            .dialogs
            .remove(dialog)
            .ok_or_else(|| SipError::UnknownDialog(dialog.clone()))?;
        self.awaiting_ack.remove(dialog);
        let extra = reason
            .map(|r| vec![Header::Other("Reason".into(), r.into())])
            .unwrap_or_default();
        self.send_in_dialog(now, &mut d, rsip::Method::Bye, extra, Vec::new());
        Ok(())
    }

    /// Sends a non-INVITE request in `dialog` (UPDATE, INFO, NOTIFY, MESSAGE, OPTIONS) with
    /// extra headers (e.g. `Content-Type`) and a body; the dialog stays. Retransmitted on UDP
    /// until a final response or timer F; the outcome comes as [`SipEvent::RequestCompleted`].
    /// INVITE, ACK and CANCEL are refused (no INVITE client transaction here); use
    /// [`Endpoint::send_bye`] for BYE.
    pub fn send_request(
        &mut self,
        now: Instant,
        dialog: &DialogId,
        method: rsip::Method,
        headers: Vec<Header>,
        body: Vec<u8>,
    ) -> Result<(), SipError> {
        use rsip::Method::{Ack, Bye, Cancel, Invite};
        if matches!(method, Invite | Ack | Cancel | Bye) {
            return Err(SipError::UnsupportedMethod(method));
        }
        let mut d = self
            .dialogs
            .remove(dialog)
            .ok_or_else(|| SipError::UnknownDialog(dialog.clone()))?;
        self.send_in_dialog(now, &mut d, method, headers, body);
        self.dialogs.insert(d.id.clone(), d);
        Ok(())
    }

    /// Builds, sends and tracks one in-dialog request (RFC 3261 §12.2.1.1).
    fn send_in_dialog(
        &mut self,
        now: Instant,
        d: &mut Dialog,
        method: rsip::Method,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) {
        d.local_cseq += 1;
        let branch = format!("z9hG4bK{:016x}", rand::random::<u64>());
        let target = d.remote_target.clone().unwrap_or_else(|| uri_for(d.source));
        let route = in_dialog_route(d, &target);
        let mut headers = rsip::Headers::default();
        headers.push(Header::Via(rsip::headers::Via::new(format!(
            "SIP/2.0/{} {}:{};branch={branch};rport",
            route.transport,
            bracket_v6(&self.config.contact_host),
            self.config.contact_port
        ))));
        headers.push(Header::MaxForwards(rsip::headers::MaxForwards::new("70")));
        for r in &d.route_set {
            headers.push(Header::Route(rsip::headers::Route::new(r.clone())));
        }
        headers.push(Header::From(rsip::headers::From::new(
            d.local_party.clone(),
        )));
        headers.push(Header::To(rsip::headers::To::new(d.remote_party.clone())));
        headers.push(Header::CallId(rsip::headers::CallId::new(
            d.id.call_id.clone(),
        )));
        headers.push(Header::CSeq(rsip::headers::CSeq::new(format!(
            "{} {method}",
            d.local_cseq
        ))));
        if method != rsip::Method::Bye {
            headers.push(Header::Contact(rsip::headers::Contact::new(
                self.contact_value(route.transport),
            )));
        }
        headers.extend(extra);
        headers.retain(|h| !matches!(h, Header::ContentLength(_)));
        headers.push(Header::UserAgent(rsip::headers::UserAgent::new(
            self.config.user_agent.clone(),
        )));
        headers.push(Header::ContentLength(rsip::headers::ContentLength::new(
            body.len().to_string(),
        )));
        let text = format!("{method} {target} SIP/2.0\r\n{headers}\r\n");
        let mut bytes = message::restore_ipv6(&text).into_owned().into_bytes();
        bytes.extend_from_slice(&body);
        let bytes = Bytes::from(bytes);
        *self
            .counters
            .requests
            .entry(format!("{method}(sent)"))
            .or_default() += 1;
        self.push_transmit(route, bytes.clone());
        self.clients.insert(
            branch.clone(),
            ClientTransaction::new(now, route, d.id.clone(), method, bytes),
        );
        self.schedule(TimerOwner::Client(branch));
        self.prune_timers();
    }

    // ---------------------------------------------------------------- requests

    /// Transactions beyond which a request gets 503. Requests in a dialog (BYE, re-INVITE,
    /// UPDATE) may use twice the table: refusing them would leave recordings running that the
    /// client has ended, and new sessions are refused first.
    fn transaction_limit(&self, facts: &RequestFacts) -> usize {
        if facts.to_tag.is_some() {
            self.config.max_transactions.saturating_mul(2)
        } else {
            self.config.max_transactions
        }
    }

    fn handle_request(&mut self, now: Instant, incoming: &Incoming, request: rsip::Request) {
        *self
            .counters
            .requests
            .entry(request.method.to_string())
            .or_default() += 1;
        let facts = match message::required_headers(&request) {
            Ok(facts) => facts,
            Err(reason) => return self.reject_unparsed(incoming, &request, 400, reason),
        };
        let route = response_route(incoming, &facts.via);
        if request.method == rsip::Method::Ack {
            return self.handle_ack(now, &facts);
        }
        let key = TxnKey::new(&facts, &request.method);
        if let Some(id) = self.by_key.get(&key) {
            self.counters.retransmissions_absorbed += 1;
            if let Some(bytes) = self.txns.get(id).and_then(|t| t.on_retransmitted_request()) {
                self.push_transmit(route, bytes);
            }
            return;
        }
        let stateless: Option<(u16, String, &'static str)> = if facts.cseq_method != request.method
        {
            Some((
                400,
                "CSeq method does not match the request".into(),
                "malformed",
            ))
        } else if message::max_forwards(&request) == Some(0) {
            Some((483, "Too Many Hops".into(), "too-many-hops"))
        } else if self.txns.len() >= self.transaction_limit(&facts) {
            Some((503, "Service Unavailable".into(), "overload"))
        } else {
            None
        };
        if let Some((status, reason, category)) = stateless {
            let extra = if status == 503 {
                vec![Header::RetryAfter(rsip::headers::RetryAfter::new(
                    self.config.retry_after_secs.to_string(),
                ))]
            } else {
                Vec::new()
            };
            return self.answer_in_new_txn(
                now,
                NewTxn {
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                },
                LocalAnswer {
                    status,
                    reason: &reason,
                    extra,
                    rejection: Some(category),
                },
            );
        }
        if request.method == rsip::Method::Cancel {
            return self.handle_cancel(now, incoming, request, facts, key, route);
        }
        let unsupported: Vec<String> = message::header_tokens(&request.headers, "Require")
            .into_iter()
            .filter(|tag| {
                !self
                    .config
                    .supported
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(tag))
            })
            .collect();
        if !unsupported.is_empty() {
            let extra = vec![Header::Unsupported(rsip::headers::Unsupported::new(
                unsupported.join(", "),
            ))];
            return self.answer_in_new_txn(
                now,
                NewTxn {
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                },
                LocalAnswer {
                    status: 420,
                    reason: "Bad Extension",
                    extra,
                    rejection: Some("bad-extension"),
                },
            );
        }

        if let Some(to_tag) = facts.to_tag.clone() {
            let id = DialogId {
                call_id: facts.call_id.clone(),
                local_tag: to_tag,
                remote_tag: facts.from_tag.clone().unwrap_or_default(),
            };
            if self.handed_over.contains(&id) {
                // Unanswered: a UDP client retransmits it to the next daemon; 481 would end
                // a session that goes on there.
                let reason = "dialog handed over to the next daemon".to_string();
                return self.note_rejection(0, "handed-over", reason, incoming.source);
            }
            if !self.dialogs.contains_key(&id) {
                return self.answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 481,
                        reason: "Call/Transaction Does Not Exist",
                        extra: Vec::new(),
                        rejection: Some("unknown-dialog"),
                    },
                );
            }
            // §14.2: a second INVITE while the first is unanswered gets 500 + Retry-After.
            let overlapping = request.method == rsip::Method::Invite
                && self.txns.values().any(|t| {
                    t.dialog.as_ref() == Some(&id)
                        && t.is_invite()
                        && t.state == ServerState::Proceeding
                });
            if overlapping {
                let retry = rand::random::<u32>() % 10 + 1;
                let extra = vec![Header::RetryAfter(rsip::headers::RetryAfter::new(
                    retry.to_string(),
                ))];
                return self.answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 500,
                        reason: "Previous INVITE pending",
                        extra,
                        rejection: Some("invite-pending"),
                    },
                );
            }
            let Some(dialog) = self.dialogs.get_mut(&id) else {
                return;
            };
            if !dialog.accept_cseq(facts.cseq) {
                return self.answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 500,
                        reason: "CSeq out of order",
                        extra: Vec::new(),
                        rejection: Some("cseq-out-of-order"),
                    },
                );
            }
            return self.offer_to_app(now, incoming, request, facts, key, route, Some(id));
        }

        match request.method {
            rsip::Method::Invite if !self.source_allowed(incoming.source.ip()) => self
                .answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 403,
                        reason: "Source not allowed",
                        extra: Vec::new(),
                        rejection: Some("source-not-allowed"),
                    },
                ),
            rsip::Method::Invite => {
                self.offer_to_app(now, incoming, request, facts, key, route, None)
            }
            rsip::Method::Options if !self.config.app_handles_options => {
                let extra = self.capability_headers();
                self.answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 200,
                        reason: "OK",
                        extra,
                        rejection: None,
                    },
                )
            }
            rsip::Method::Options => {
                self.offer_to_app(now, incoming, request, facts, key, route, None)
            }
            rsip::Method::Bye
            | rsip::Method::Update
            | rsip::Method::Info
            | rsip::Method::PRack
            | rsip::Method::Notify
            | rsip::Method::Refer => self.answer_in_new_txn(
                now,
                NewTxn {
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                },
                LocalAnswer {
                    status: 481,
                    reason: "Call/Transaction Does Not Exist",
                    extra: Vec::new(),
                    rejection: Some("unknown-dialog"),
                },
            ),
            _ => {
                let extra = vec![Header::Allow(rsip::headers::Allow::new(
                    self.config.allow.join(", "),
                ))];
                self.answer_in_new_txn(
                    now,
                    NewTxn {
                        incoming,
                        request,
                        facts,
                        key,
                        route,
                    },
                    LocalAnswer {
                        status: 405,
                        reason: "Method Not Allowed",
                        extra,
                        rejection: Some("method-not-allowed"),
                    },
                )
            }
        }
    }

    /// Creates the server transaction and hands the request to the app.
    #[allow(clippy::too_many_arguments)]
    fn offer_to_app(
        &mut self,
        now: Instant,
        incoming: &Incoming,
        request: rsip::Request,
        facts: RequestFacts,
        key: TxnKey,
        route: Route,
        dialog: Option<DialogId>,
    ) {
        let local_tag = facts.to_tag.is_none().then(new_tag);
        let id = self.insert_txn(
            key,
            route,
            incoming.source,
            request.clone(),
            facts,
            local_tag,
            dialog.clone(),
        );
        if let Some(txn) = self.txns.get_mut(&id) {
            txn.start_app_deadline(now + self.config.app_answer_timeout);
        }
        self.schedule(TimerOwner::Server(id));
        if request.method == rsip::Method::Invite {
            // §17.2.1: 100 Trying at once, so the client stops retransmitting while the app decides.
            if let Some(trying) = self.make_response(&id, 100, None) {
                let _ = self.respond(now, &id, trying);
            }
        }
        self.events.push_back(SipEvent::Request {
            txn: id,
            dialog,
            request,
            source: incoming.source,
            transport: incoming.transport,
        });
    }

    /// Answers a request here, through a transaction so that retransmissions get the same answer.
    fn answer_in_new_txn(&mut self, now: Instant, txn: NewTxn<'_>, answer: LocalAnswer<'_>) {
        let NewTxn {
            incoming,
            request,
            facts,
            key,
            route,
        } = txn;
        let LocalAnswer {
            status,
            reason,
            extra,
            rejection,
        } = answer;
        let local_tag = facts.to_tag.is_none().then(new_tag);
        let id = self.insert_txn(key, route, incoming.source, request, facts, local_tag, None);
        let Some(mut response) = self.make_response(&id, status, Some(reason)) else {
            return;
        };
        response.headers.extend(extra);
        let _ = self.respond(now, &id, response);
        if let Some(category) = rejection {
            self.note_rejection(status, category, reason.to_string(), incoming.source);
        }
    }

    fn handle_ack(&mut self, now: Instant, facts: &RequestFacts) {
        self.counters.acks += 1;
        // ACK to a non-2xx: same branch as the INVITE (§17.2.3). Some clients also reuse the
        // INVITE's branch for the ACK to a 2xx (RFC 2543 habit), so an Accepted match counts too.
        let key = TxnKey::new(facts, &rsip::Method::Ack);
        let by_branch = self.by_key.get(&key).copied();
        // ACK to a 2xx: a new transaction within the dialog (§13.2.2.4).
        let in_dialog = facts.to_tag.clone().and_then(|to_tag| {
            let dialog = DialogId {
                call_id: facts.call_id.clone(),
                local_tag: to_tag,
                remote_tag: facts.from_tag.clone().unwrap_or_default(),
            };
            self.awaiting_ack.get(&dialog).copied()
        });
        let Some(id) = by_branch.or(in_dialog) else {
            return;
        };
        let Some(txn) = self.txns.get_mut(&id) else {
            return;
        };
        let was_accepted = txn.state == ServerState::Accepted;
        let acked = txn.facts.cseq == facts.cseq && txn.on_ack(now);
        self.schedule(TimerOwner::Server(id));
        if !acked || !was_accepted {
            return;
        }
        let Some(txn) = self.txns.get(&id) else {
            return;
        };
        if let Some(dialog) = txn.dialog.clone() {
            self.awaiting_ack.remove(&dialog);
            self.events.push_back(SipEvent::Acked { dialog });
        }
    }

    fn handle_cancel(
        &mut self,
        now: Instant,
        incoming: &Incoming,
        request: rsip::Request,
        facts: RequestFacts,
        key: TxnKey,
        route: Route,
    ) {
        let invite_key = TxnKey {
            method: rsip::Method::Invite.to_string(),
            ..key.clone()
        };
        let Some(invite_id) = self.by_key.get(&invite_key).copied() else {
            return self.answer_in_new_txn(
                now,
                NewTxn {
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                },
                LocalAnswer {
                    status: 481,
                    reason: "Call/Transaction Does Not Exist",
                    extra: Vec::new(),
                    rejection: Some("cancel-no-match"),
                },
            );
        };
        // §9.2: the CANCEL's response carries the same To-tag as the INVITE's responses.
        let invite_tag = self.txns.get(&invite_id).and_then(|t| t.local_tag.clone());
        let cancel_id = self.insert_txn(
            key,
            route,
            incoming.source,
            request,
            facts,
            invite_tag,
            None,
        );
        if let Some(ok) = self.make_response(&cancel_id, 200, None) {
            let _ = self.respond(now, &cancel_id, ok);
        }
        let pending = self
            .txns
            .get(&invite_id)
            .is_some_and(|t| t.state == ServerState::Proceeding);
        if pending {
            if let Some(terminated) = self.make_response(&invite_id, 487, None) {
                let _ = self.respond(now, &invite_id, terminated);
            }
            self.events
                .push_back(SipEvent::Cancelled { txn: invite_id });
        }
    }

    /// Requests rsip could not parse in full, or that lack a mandatory header.
    fn reject_unparsed(
        &mut self,
        incoming: &Incoming,
        request: &rsip::Request,
        status: u16,
        reason: String,
    ) {
        self.answer_unparsed(incoming, request, status, reason, Vec::new(), "malformed");
    }

    /// Answers without a transaction (the request is not trustworthy enough to key one);
    /// returns false when not even the top Via is usable, after reporting the drop.
    fn answer_unparsed(
        &mut self,
        incoming: &Incoming,
        request: &rsip::Request,
        status: u16,
        reason: String,
        extra: Vec<Header>,
        category: &'static str,
    ) -> bool {
        let facts = message::lenient_facts(request).filter(|_| request.method != rsip::Method::Ack);
        let Some(facts) = facts else {
            self.note_rejection(0, category, reason, incoming.source);
            return false;
        };
        let tag = new_tag();
        let answer = Answer {
            request,
            facts: &facts,
            source: incoming.source,
            route: response_route(incoming, &facts.via),
            local_tag: Some(&tag),
        };
        let mut response = self.build_response(&answer, status, Some(&reason));
        response.headers.extend(extra);
        let route = answer.route;
        let bytes = encode_response(&mut response);
        self.counters.count_response(status);
        self.push_transmit(route, bytes);
        self.note_rejection(status, category, reason, incoming.source);
        true
    }

    /// 501 for a method rsip does not know (it fails the whole parse).
    fn try_unknown_method(&mut self, incoming: &Incoming) -> bool {
        let Some((method, request)) = message::parse_unknown_method(&incoming.bytes) else {
            return false;
        };
        *self.counters.requests.entry(method.clone()).or_default() += 1;
        let allow = Header::Allow(rsip::headers::Allow::new(self.config.allow.join(", ")));
        let reason = format!("Not Implemented: {method}");
        self.answer_unparsed(
            incoming,
            &request,
            501,
            reason,
            vec![allow],
            "not-implemented",
        )
    }

    // ---------------------------------------------------------------- responses

    fn handle_response(&mut self, incoming: &Incoming, response: rsip::Response) {
        let status = response.status_code.code();
        *self.counters.responses_received.entry(status).or_default() += 1;
        let Ok(via) = message::top_via(&response.headers) else {
            return self.note_rejection(
                0,
                "stray-response",
                "response without a usable Via".into(),
                incoming.source,
            );
        };
        let Some(client) = self.clients.get_mut(&via.branch) else {
            // Retransmitted final responses to a finished BYE land here too.
            return self.note_rejection(
                0,
                "stray-response",
                format!("no transaction for {status}"),
                incoming.source,
            );
        };
        if status < 200 {
            client.on_provisional();
            return;
        }
        if let Some(client) = self.clients.remove(&via.branch) {
            self.events.push_back(SipEvent::RequestCompleted {
                dialog: client.dialog,
                method: client.method,
                response: Some(response),
            });
        }
    }

    // ---------------------------------------------------------------- helpers

    #[allow(clippy::too_many_arguments)]
    fn insert_txn(
        &mut self,
        key: TxnKey,
        route: Route,
        source: SocketAddr,
        request: rsip::Request,
        facts: RequestFacts,
        local_tag: Option<String>,
        dialog: Option<DialogId>,
    ) -> TxnId {
        let id = TxnId(self.next_txn);
        self.next_txn += 1;
        self.by_key.insert(key.clone(), id);
        self.txns.insert(
            id,
            ServerTransaction::new(key, route, source, request, facts, local_tag, dialog),
        );
        id
    }

    fn remove_txn(&mut self, id: TxnId) {
        if let Some(txn) = self.txns.remove(&id) {
            if self.by_key.get(&txn.key) == Some(&id) {
                self.by_key.remove(&txn.key);
            }
            if let Some(dialog) = txn.dialog {
                if self.awaiting_ack.get(&dialog) == Some(&id) {
                    self.awaiting_ack.remove(&dialog);
                }
            }
        }
    }

    /// A 2xx to an INVITE was sent: create the dialog (initial INVITE) or refresh its target.
    fn on_invite_accepted(&mut self, id: TxnId) {
        let Some(txn) = self.txns.get_mut(&id) else {
            return;
        };
        let dialog_id = match &txn.dialog {
            Some(existing) => existing.clone(),
            None => {
                let Some(local_tag) = txn.local_tag.clone() else {
                    return;
                };
                let dialog_id = DialogId {
                    call_id: txn.facts.call_id.clone(),
                    local_tag: local_tag.clone(),
                    remote_tag: txn.facts.from_tag.clone().unwrap_or_default(),
                };
                let local_party = txn
                    .request
                    .to_header()
                    .map(|t| format!("{};tag={local_tag}", t.value()))
                    .unwrap_or_default();
                let remote_party = txn
                    .request
                    .from_header()
                    .map(|f| f.value().to_string())
                    .unwrap_or_default();
                let route_set = txn
                    .request
                    .headers
                    .iter()
                    .filter_map(|h| match h {
                        Header::RecordRoute(r) => Some(r.value().to_string()),
                        _ => None,
                    })
                    .collect();
                self.dialogs.insert(
                    dialog_id.clone(),
                    Dialog {
                        id: dialog_id.clone(),
                        remote_cseq: txn.facts.cseq,
                        local_cseq: u32::from(rand::random::<u16>()),
                        local_party,
                        remote_party,
                        remote_target: None,
                        route_set,
                        route: txn.route,
                        source: txn.source,
                    },
                );
                txn.dialog = Some(dialog_id.clone());
                dialog_id
            }
        };
        self.awaiting_ack.insert(dialog_id, id);
        self.refresh_target(id);
    }

    /// Takes the remote target from the Contact of a dialog-creating or target-refresh request.
    fn refresh_target(&mut self, id: TxnId) {
        let Some(txn) = self.txns.get(&id) else {
            return;
        };
        let Some(dialog) = txn.dialog.as_ref().and_then(|d| self.dialogs.get_mut(d)) else {
            return;
        };
        let contact = txn.request.headers.iter().find_map(|h| match h {
            Header::Contact(c) => c.typed().ok().map(|c| c.uri),
            _ => None,
        });
        if let Some(uri) = contact {
            dialog.remote_target = Some(uri);
        }
    }

    fn source_allowed(&self, ip: IpAddr) -> bool {
        self.config.allowed_networks.is_empty()
            || self.config.allowed_networks.iter().any(|n| n.contains(ip))
    }

    fn push_transmit(&mut self, route: Route, bytes: Bytes) {
        self.transmits.push_back(Transmit {
            transport: route.transport,
            destination: route.destination,
            connection: route.connection,
            local: route.local,
            bytes,
        });
    }

    fn note_rejection(
        &mut self,
        status: u16,
        category: &'static str,
        reason: String,
        source: SocketAddr,
    ) {
        *self.counters.rejections.entry(category).or_default() += 1;
        tracing::debug!(%source, status, category, %reason, "SIP message rejected");
        self.events.push_back(SipEvent::Rejected {
            status,
            reason,
            source,
        });
    }
}

/// A request the endpoint answers itself, with what its new server transaction needs.
struct NewTxn<'a> {
    incoming: &'a Incoming,
    request: rsip::Request,
    facts: RequestFacts,
    key: TxnKey,
    route: Route,
}

/// The endpoint's own answer to a request: status, reason phrase, extra headers, and the
/// rejection category it is counted under (`None`: not a rejection).
struct LocalAnswer<'a> {
    status: u16,
    reason: &'a str,
    extra: Vec<Header>,
    rejection: Option<&'static str>,
}
