//! The SIP endpoint: routes every incoming message to a transaction, a dialog, a stateless
//! answer, or the application, and owns all their timers.
//!
//! # Method taxonomy (quinn-proto style)
//! * `&self` getters: [`Endpoint::make_response`], [`Endpoint::counters`], [`Endpoint::dialog_count`].
//! * input: [`Endpoint::handle_incoming`], [`Endpoint::handle_timeout`].
//! * application commands: [`Endpoint::respond`], [`Endpoint::send_bye`].
//! * output: [`Endpoint::poll_event`], [`Endpoint::poll_transmit`], [`Endpoint::poll_timeout`].
//!
//! After every input or command, drain `poll_event` and `poll_transmit` until both return
//! `None`, then sleep until `poll_timeout` (the driver in [`crate::transport::driver`] does
//! exactly that in one function).
//!
//! # What the endpoint answers by itself
//! Malformed requests (400 with a reason saying what), missing mandatory headers (400),
//! unknown `Require` option tags (420), Max-Forwards 0 (483), unknown dialogs (481), CSeq out of
//! order in a dialog (500), out-of-dialog OPTIONS (200 with Allow/Accept/Supported), CANCEL
//! (200, plus 487 to the INVITE), methods it cannot serve (405/501), overload (503), and
//! retransmitted requests (answered from their transaction). ACKs are absorbed. Everything else
//! becomes a [`SipEvent::Request`] the application must answer with [`Endpoint::respond`].
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

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
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

pub use super::transaction::TxnId;
use super::{
    dialog::{Dialog, DialogId},
    message::{self, Parsed, RequestFacts},
    transaction::{
        ClientOutput, ClientTransaction, Route, ServerState, ServerTransaction, TxnKey, TxnOutput,
    },
    SipError,
};

/// The transport a message came on or goes out on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
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
    /// BYE for it (RFC 3261 §13.3.1.4); its outcome comes as [`SipEvent::ByeCompleted`].
    AckTimeout { dialog: DialogId },
    /// A BYE we sent got its final response (`status`), or none within 64*T1 (`None`).
    ByeCompleted {
        dialog: DialogId,
        status: Option<u16>,
    },
    /// A message could not be parsed or was rejected statelessly (for counters/logs).
    /// `status` is the response sent, or 0 when the message was dropped unanswered.
    Rejected {
        status: u16,
        reason: String,
        source: SocketAddr,
    },
}

/// Static configuration of the endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// User part of our Contact URI.
    pub contact_user: String,
    /// Host of our Contact URI and of the Via of requests we send (an address clients can reach).
    pub contact_host: String,
    pub contact_port: u16,
    /// Header parameters appended to our Contact (e.g. `+sip.srs`).
    pub contact_params: Vec<String>,
    /// Sent as `Server` in responses and `User-Agent` in requests.
    pub user_agent: String,
    /// Methods listed in `Allow`.
    pub allow: Vec<String>,
    /// Option tags listed in `Supported`; a `Require` outside this list gets 420.
    pub supported: Vec<String>,
    /// Body types listed in `Accept`.
    pub accept: Vec<String>,
    /// Extra headers for the 200 to OPTIONS.
    pub options_headers: Vec<(String, String)>,
    /// Hand out-of-dialog OPTIONS to the app instead of answering them here.
    pub app_handles_options: bool,
    /// Server transactions kept at most; beyond that new requests get 503.
    pub max_transactions: usize,
    /// `Retry-After` seconds in those 503s.
    pub retry_after_secs: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        Self {
            contact_user: "srs".into(),
            contact_host: "127.0.0.1".into(),
            contact_port: 5060,
            contact_params: Vec::new(),
            user_agent: concat!("recorder/", env!("CARGO_PKG_VERSION")).into(),
            allow: list(&[
                "INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "UPDATE", "INFO",
            ]),
            supported: list(&["siprec", "timer"]),
            accept: list(&[
                "application/sdp",
                "application/rs-metadata+xml",
                "application/rs-metadata",
                "multipart/mixed",
            ]),
            options_headers: Vec::new(),
            app_handles_options: false,
            max_transactions: 10_000,
            retry_after_secs: 5,
        }
    }
}

/// Counters for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SipCounters {
    /// Requests received, by method (retransmissions included).
    pub requests: BTreeMap<String, u64>,
    /// Responses sent, by status (first transmissions only).
    pub responses_sent: BTreeMap<u16, u64>,
    /// Responses received to our requests, by status.
    pub responses_received: BTreeMap<u16, u64>,
    /// Stateless rejections and drops, by category (e.g. `malformed`, `unknown-dialog`).
    pub rejections: BTreeMap<&'static str, u64>,
    /// Retransmitted requests answered from their transaction (never given to the app).
    pub retransmissions_absorbed: u64,
    /// Timer-driven re-sends of our responses and requests.
    pub retransmissions_sent: u64,
    /// ACKs absorbed (all ACKs end here).
    pub acks: u64,
    /// 2xx responses never ACKed.
    pub ack_timeouts: u64,
    /// CRLF keep-alives received.
    pub keepalives: u64,
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
    transmits: VecDeque<Transmit>,
    events: VecDeque<SipEvent>,
    counters: SipCounters,
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
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: SipCounters::default(),
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

    // ---------------------------------------------------------------- input

    /// Processes one datagram or framed TCP message.
    pub fn handle_incoming(&mut self, now: Instant, incoming: Incoming) {
        if incoming.bytes.iter().all(|b| b.is_ascii_whitespace()) {
            self.counters.keepalives += 1;
            return;
        }
        let datagram = incoming.transport == Transport::Udp;
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
                    self.reject(0, "garbage", reason, incoming.source);
                }
            }
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(_, t)| t.poll_timeout().is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in due {
            let Some(txn) = self.txns.get_mut(&id) else {
                continue;
            };
            out.clear();
            txn.handle_timeout(now, &mut out);
            let route = txn.route;
            let dialog = txn.dialog.clone();
            for output in out.drain(..) {
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
                    TxnOutput::Terminated => self.remove_txn(id),
                }
            }
        }

        let due: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| c.poll_timeout().is_some_and(|at| at <= now))
            .map(|(b, _)| b.clone())
            .collect();
        let mut out = Vec::new();
        for branch in due {
            let Some(client) = self.clients.get_mut(&branch) else {
                continue;
            };
            out.clear();
            client.handle_timeout(now, &mut out);
            let route = client.route;
            for output in out.drain(..) {
                match output {
                    ClientOutput::Retransmit(bytes) => {
                        self.counters.retransmissions_sent += 1;
                        self.push_transmit(route, bytes);
                    }
                    ClientOutput::TimedOut => {
                        if let Some(client) = self.clients.remove(&branch) {
                            self.events.push_back(SipEvent::ByeCompleted {
                                dialog: client.dialog,
                                status: None,
                            });
                        }
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- output

    /// The earliest instant at which [`Endpoint::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let servers = self.txns.values().filter_map(|t| t.poll_timeout());
        let clients = self.clients.values().filter_map(|c| c.poll_timeout());
        servers.chain(clients).min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SipEvent> {
        self.events.pop_front()
    }

    // ---------------------------------------------------------------- app commands

    /// Builds a response to the request of `txn` for the app to add headers and a body to.
    ///
    /// Copies Via (the top one stamped with `received`/`rport`), From, To, Call-ID and CSeq;
    /// adds our To-tag when the request had none (the same tag for every response of the
    /// transaction, and the dialog's tag once its 2xx is sent); adds our Contact to 101-299
    /// responses to INVITE and 2xx to UPDATE, and copies Record-Route into 101-299 to INVITE.
    /// `None` when `txn` is unknown.
    pub fn make_response(
        &self,
        txn: &TxnId,
        status: u16,
        reason: Option<&str>,
    ) -> Option<rsip::Response> {
        let t = self.txns.get(txn)?;
        let answer = Answer {
            request: &t.request,
            facts: &t.facts,
            source: t.source,
            route: t.route,
            local_tag: t.local_tag.as_deref(),
        };
        Some(self.build_response(&answer, status, reason))
    }

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
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Sends a BYE in `dialog` (e.g. the operator stopped the recording) and ends the dialog.
    /// `reason` is the value of a `Reason` header (RFC 3326), e.g. `SIP;cause=200;text="stop"`.
    /// Retransmitted on UDP until a final response or timer F; the outcome comes as
    /// [`SipEvent::ByeCompleted`].
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
        d.local_cseq += 1;
        let branch = format!("z9hG4bK{:016x}", rand::random::<u64>());
        let target = d.remote_target.clone().unwrap_or_else(|| uri_for(d.source));
        let route = bye_route(&d, &target);
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
            "{} BYE",
            d.local_cseq
        ))));
        if let Some(reason) = reason {
            headers.push(Header::Other("Reason".into(), reason.into()));
        }
        headers.push(Header::UserAgent(rsip::headers::UserAgent::new(
            self.config.user_agent.clone(),
        )));
        headers.push(Header::ContentLength(rsip::headers::ContentLength::new(
            "0",
        )));
        let text = format!("BYE {target} SIP/2.0\r\n{headers}\r\n");
        let bytes = Bytes::from(message::restore_ipv6(&text).into_owned());
        *self
            .counters
            .requests
            .entry("BYE(sent)".into())
            .or_default() += 1;
        self.push_transmit(route, bytes.clone());
        self.clients
            .insert(branch, ClientTransaction::new(now, route, d.id, bytes));
        Ok(())
    }

    // ---------------------------------------------------------------- requests

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
        } else if self.txns.len() >= self.config.max_transactions {
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
                incoming,
                request,
                facts,
                key,
                route,
                status,
                &reason,
                extra,
                Some(category),
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
                incoming,
                request,
                facts,
                key,
                route,
                420,
                "Bad Extension",
                extra,
                Some("bad-extension"),
            );
        }

        if let Some(to_tag) = facts.to_tag.clone() {
            let id = DialogId {
                call_id: facts.call_id.clone(),
                local_tag: to_tag,
                remote_tag: facts.from_tag.clone().unwrap_or_default(),
            };
            if !self.dialogs.contains_key(&id) {
                return self.answer_in_new_txn(
                    now,
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                    481,
                    "Call/Transaction Does Not Exist",
                    Vec::new(),
                    Some("unknown-dialog"),
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
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                    500,
                    "Previous INVITE pending",
                    extra,
                    Some("invite-pending"),
                );
            }
            let Some(dialog) = self.dialogs.get_mut(&id) else {
                return;
            };
            if !dialog.accept_cseq(facts.cseq) {
                return self.answer_in_new_txn(
                    now,
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                    500,
                    "CSeq out of order",
                    Vec::new(),
                    Some("cseq-out-of-order"),
                );
            }
            return self.offer_to_app(now, incoming, request, facts, key, route, Some(id));
        }

        match request.method {
            rsip::Method::Invite => {
                self.offer_to_app(now, incoming, request, facts, key, route, None)
            }
            rsip::Method::Options if !self.config.app_handles_options => {
                let extra = self.capability_headers();
                self.answer_in_new_txn(
                    now, incoming, request, facts, key, route, 200, "OK", extra, None,
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
                incoming,
                request,
                facts,
                key,
                route,
                481,
                "Call/Transaction Does Not Exist",
                Vec::new(),
                Some("unknown-dialog"),
            ),
            _ => {
                let extra = vec![Header::Allow(rsip::headers::Allow::new(
                    self.config.allow.join(", "),
                ))];
                self.answer_in_new_txn(
                    now,
                    incoming,
                    request,
                    facts,
                    key,
                    route,
                    405,
                    "Method Not Allowed",
                    extra,
                    Some("method-not-allowed"),
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
    #[allow(clippy::too_many_arguments)]
    fn answer_in_new_txn(
        &mut self,
        now: Instant,
        incoming: &Incoming,
        request: rsip::Request,
        facts: RequestFacts,
        key: TxnKey,
        route: Route,
        status: u16,
        reason: &str,
        extra: Vec<Header>,
        rejection: Option<&'static str>,
    ) {
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
        if txn.facts.cseq != facts.cseq || !txn.on_ack(now) || !was_accepted {
            return;
        }
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
                incoming,
                request,
                facts,
                key,
                route,
                481,
                "Call/Transaction Does Not Exist",
                Vec::new(),
                Some("cancel-no-match"),
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
            self.reject(0, category, reason, incoming.source);
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
            return self.reject(
                0,
                "stray-response",
                "response without a usable Via".into(),
                incoming.source,
            );
        };
        let Some(client) = self.clients.get_mut(&via.branch) else {
            // Retransmitted final responses to a finished BYE land here too.
            return self.reject(
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
            self.events.push_back(SipEvent::ByeCompleted {
                dialog: client.dialog,
                status: Some(status),
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
            ServerTransaction::new(id, key, route, source, request, facts, local_tag, dialog),
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

    fn build_response(&self, a: &Answer<'_>, status: u16, reason: Option<&str>) -> rsip::Response {
        let mut headers = rsip::Headers::default();
        let mut first = true;
        for h in a.request.headers.iter() {
            match h {
                Header::Via(v) if first => {
                    first = false;
                    headers.push(Header::Via(rsip::headers::Via::new(stamp_via(
                        v.value(),
                        &a.facts.via,
                        a.source,
                    ))));
                }
                Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => {
                    headers.push(h.clone())
                }
                Header::To(t) => {
                    let value = match (a.facts.to_tag.is_none(), a.local_tag, status > 100) {
                        (true, Some(tag), true) => format!("{};tag={tag}", t.value()),
                        _ => t.value().to_string(),
                    };
                    headers.push(Header::To(rsip::headers::To::new(value)));
                }
                _ => {}
            }
        }
        let invite = a.request.method == rsip::Method::Invite;
        if invite && (101..300).contains(&status) {
            for h in a.request.headers.iter() {
                if let Header::RecordRoute(_) = h {
                    headers.push(h.clone());
                }
            }
        }
        if (invite && (101..300).contains(&status))
            || (a.request.method == rsip::Method::Update && (200..300).contains(&status))
        {
            headers.push(Header::Contact(rsip::headers::Contact::new(
                self.contact_value(a.route.transport),
            )));
        }
        headers.push(Header::Server(rsip::headers::Server::new(
            self.config.user_agent.clone(),
        )));
        let status_code = match reason {
            Some(reason) => rsip::StatusCode::Other(status, sanitize_reason(reason)),
            None => rsip::StatusCode::from(status),
        };
        rsip::Response {
            status_code,
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }

    fn contact_value(&self, transport: Transport) -> String {
        let mut value = format!(
            "<sip:{}@{}:{}{}>",
            self.config.contact_user,
            bracket_v6(&self.config.contact_host),
            self.config.contact_port,
            if transport == Transport::Tcp {
                ";transport=tcp"
            } else {
                ""
            }
        );
        for p in &self.config.contact_params {
            value.push(';');
            value.push_str(p);
        }
        value
    }

    /// `Allow`, `Accept`, `Supported` and the configured extra OPTIONS headers, for an app
    /// that answers OPTIONS itself.
    pub fn capability_headers(&self) -> Vec<Header> {
        let mut extra = vec![
            Header::Allow(rsip::headers::Allow::new(self.config.allow.join(", "))),
            Header::Accept(rsip::headers::Accept::new(self.config.accept.join(", "))),
            Header::Supported(rsip::headers::Supported::new(
                self.config.supported.join(", "),
            )),
        ];
        for (name, value) in &self.config.options_headers {
            extra.push(Header::Other(name.clone(), value.clone()));
        }
        extra
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

    fn reject(&mut self, status: u16, category: &'static str, reason: String, source: SocketAddr) {
        self.note_rejection(status, category, reason, source);
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

impl SipCounters {
    fn count_response(&mut self, status: u16) {
        *self.responses_sent.entry(status).or_default() += 1;
    }
}

/// RFC 3261 §18.2.2 / RFC 3581: where a response goes.
fn response_route(incoming: &Incoming, via: &message::TopVia) -> Route {
    let destination = match incoming.transport {
        // Stream transports answer on the connection the request came on; `destination` is
        // only used if it has gone: the received address and the sent-by port (§18.2.2).
        Transport::Tcp if incoming.connection.is_some() => {
            SocketAddr::new(incoming.source.ip(), via.port.unwrap_or(5060))
        }
        Transport::Tcp => incoming.source,
        Transport::Udp if via.rport => incoming.source,
        Transport::Udp => SocketAddr::new(incoming.source.ip(), via.port.unwrap_or(5060)),
    };
    Route {
        transport: incoming.transport,
        destination,
        connection: incoming.connection,
        local: Some(incoming.local),
    }
}

/// Adds `received` (when the source differs from sent-by, or rport asks) and fills `rport`
/// in the first value of the top Via line.
fn stamp_via(value: &str, via: &message::TopVia, source: SocketAddr) -> String {
    let (first, rest) = match value.find(',') {
        Some(comma) => value.split_at(comma),
        None => (value, ""),
    };
    let mut parts: Vec<String> = first.split(';').map(|p| p.trim().to_string()).collect();
    let same_host = matches!(via.host, rsip::Host::IpAddr(ip) if ip == source.ip());
    let add_received = !same_host || via.rport;
    parts.retain(|p| !(add_received && p.to_ascii_lowercase().starts_with("received=")));
    for p in parts.iter_mut().skip(1) {
        if p.eq_ignore_ascii_case("rport") {
            *p = format!("rport={}", source.port());
        }
    }
    if add_received {
        parts.push(format!("received={}", source.ip()));
    }
    format!("{}{rest}", parts.join(";"))
}

/// Where our in-dialog BYE goes: the first Route, else the remote target, when they are IP
/// literals, else the address the dialog came from; on TCP also the dialog's connection.
fn bye_route(d: &Dialog, target: &rsip::Uri) -> Route {
    // On TCP the dialog's connection is used while it lives; `destination` is where the
    // transport connects if it has gone (never the client's ephemeral source port).
    let first_route = d.route_set.first().and_then(|r| {
        let start = r.find('<')? + 1;
        let end = start + r[start..].find('>')?;
        rsip::Uri::try_from(&r[start..end]).ok()
    });
    let destination = first_route
        .as_ref()
        .and_then(uri_addr)
        .or_else(|| uri_addr(target))
        .unwrap_or(d.source);
    Route {
        destination,
        ..d.route
    }
}

fn uri_addr(uri: &rsip::Uri) -> Option<SocketAddr> {
    let ip = message::marker_ip(&uri.host_with_port.host)?;
    Some(SocketAddr::new(
        ip,
        uri.host_with_port.port.map_or(5060, |p| *p.value()),
    ))
}

fn uri_for(addr: SocketAddr) -> rsip::Uri {
    rsip::Uri {
        scheme: Some(rsip::Scheme::Sip),
        host_with_port: addr.into(),
        ..Default::default()
    }
}

fn bracket_v6(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_string(),
    }
}

fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A reason phrase must stay on the status line.
fn sanitize_reason(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn ensure_to_tag(response: &mut rsip::Response, tag: &str) {
    for h in response.headers.iter_mut() {
        if let Header::To(to) = h {
            let has_tag = to
                .typed()
                .map(|t| message::tag_param(&t.params).is_some())
                .unwrap_or(true);
            if !has_tag {
                *to = rsip::headers::To::new(format!("{};tag={tag}", to.value()));
            }
            return;
        }
    }
}

/// Encodes with a correct Content-Length and the body bytes as they are (rsip's `Display`
/// would pass the body through a lossy UTF-8 conversion).
fn encode_response(response: &mut rsip::Response) -> Bytes {
    response
        .headers
        .retain(|h| !matches!(h, Header::ContentLength(_)));
    response
        .headers
        .push(Header::ContentLength(rsip::headers::ContentLength::new(
            response.body.len().to_string(),
        )));
    let head = format!(
        "{} {}\r\n{}\r\n",
        response.version, response.status_code, response.headers
    );
    let mut out = message::restore_ipv6(&head).into_owned().into_bytes();
    out.extend_from_slice(&response.body);
    Bytes::from(out)
}
