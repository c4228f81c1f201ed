//! Recording sessions: the SIPREC Session Recording Server logic between the sans-IO SIP
//! [`Endpoint`](crate::sip::Endpoint) and the flow table.
//!
//! [`Recorder`] receives [`SipEvent`]s (it is the transport driver's [`SipApp`]), decides what to
//! answer, pins and rewrites flows through [`FlowControl`] and reports what happened to the rest
//! of the recorder as [`SessionEvent`]s. It never touches sockets or files.
//!
//! The decision logic ([`Recorder::handle_request`] and the timers) does not talk to the endpoint
//! directly: it returns a [`Reply`], or queues deferred answers and BYEs in an outbox that the
//! [`SipApp`] methods flush. That keeps the endpoint borrow out of the logic.
//!
//! Sessions are keyed by Call-ID plus the client's From tag, never by Call-ID alone. Each
//! accepted m-line owns a local RTP port (and RTCP port unless rtcp-mux) for the session's life;
//! re-offers are diffed m-line by m-line against it.
//!
//! A restarted daemon carries the live sessions on: [`Recorder::handover`] and
//! [`Recorder::restore`] (see the `handover` submodule).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use rand::Rng;
use rsip::{headers::UntypedHeader, Header, Method, Request};
use tracing::{debug, info, warn};

use crate::{
    events::{
        CallIds, Codec, EndReason, MetadataVersion, Participant, RecordingId, SessionEvent,
        StreamInfo,
    },
    flow::{FlowAction, FlowControl, FlowSpec},
    sip::{DialogId, Endpoint, SipEvent, TxnId},
    siprec::{
        body::{split_body, BodyError, RecordingBody},
        ids::call_ids,
        metadata::{
            parse_metadata, snapshot_request_xml, MetadataDoc, MetadataState, SNAPSHOT_REQUEST_TYPE,
        },
        ports::PortAllocator,
        sdp::{
            answer_crypto, build_answer, choose_codec, parse_offer, Direction, Offer, OfferStream,
            StreamAnswer,
        },
    },
    transport::SipApp,
};

/// Option tags we support in `Require`.
const SUPPORTED_TAGS: [&str; 2] = ["siprec", "timer"];
/// Methods we answer in a recording dialog (for `Allow`).
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, UPDATE, OPTIONS, INFO, NOTIFY, MESSAGE";
/// Body types we accept (for `Accept` in a 415).
const ACCEPT: &str =
    "application/sdp, multipart/mixed, application/rs-metadata+xml, application/rs-metadata";

/// Configuration of the recording server.
#[derive(Clone, Debug)]
pub struct SiprecConfig {
    /// Address we answer in SDP and pin flows on.
    pub media_address: IpAddr,
    /// Inclusive range of local RTP ports.
    pub rtp_ports: (u16, u16),
    /// How long a released port stays unused, so late packets never land in another recording.
    pub port_cooldown: Duration,
    /// Sessions beyond this get 503.
    pub max_sessions: usize,
    /// No signaling and no RTP for this long ends a session.
    pub idle_timeout: Duration,
    /// Delay before answering a new INVITE (0: answer at once). Lets tests CANCEL first.
    pub answer_delay: Duration,
    /// Client networks allowed to open sessions (address, prefix length); empty allows all.
    pub acl: Vec<(IpAddr, u8)>,
    /// Header names that may carry the interaction id (CallUUID).
    pub uuid_headers: Vec<String>,
    /// Smallest Session-Expires we accept (RFC 4028 Min-SE), in seconds.
    pub min_session_expires: u32,
    /// What the XDP program does with captured packets.
    pub flow_action: FlowAction,
    /// Pin flows to the SDP source address (off: clients send from other ports than they say).
    pub pin_source: bool,
    /// `Retry-After` seconds in a 503.
    pub retry_after: u32,
    /// Reject an INVITE lacking `Require: siprec` or the `+sip.src` Contact tag.
    pub require_siprec_tag: bool,
    /// Reject an INVITE without a metadata part.
    pub require_metadata: bool,
    /// Reject an offer with a media line (port not 0) lacking `a=label`.
    pub require_label: bool,
    /// Answer the streams of a new session `a=inactive` and start them paused. The endpoint
    /// has no INVITE client transaction, so we cannot re-INVITE with `a=recvonly`; recording
    /// resumes when the client re-offers.
    pub answer_inactive: bool,
}

impl Default for SiprecConfig {
    fn default() -> Self {
        Self {
            media_address: IpAddr::from([127, 0, 0, 1]),
            rtp_ports: (40000, 49999),
            port_cooldown: Duration::from_secs(10),
            max_sessions: 1000,
            idle_timeout: Duration::from_secs(600),
            answer_delay: Duration::ZERO,
            acl: Vec::new(),
            uuid_headers: vec!["X-Genesys-CallUUID".to_string()],
            min_session_expires: 90,
            flow_action: FlowAction::Pass,
            pin_source: false,
            retry_after: 30,
            require_siprec_tag: false,
            require_metadata: false,
            require_label: false,
            answer_inactive: false,
        }
    }
}

/// Counters of the recording layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SiprecCounters {
    pub sessions_started: u64,
    /// Ended sessions by [`EndReason::name`].
    pub sessions_ended: BTreeMap<&'static str, u64>,
    /// Rejected requests by (status code, short cause); serialized as `"503 session_limit": n`.
    #[serde(serialize_with = "rejections_by_name")]
    pub rejections: BTreeMap<(u16, &'static str), u64>,
    /// Metadata snapshot requests (UPDATE with `application/rs-metadata-request`) sent.
    pub snapshot_requests: u64,
    /// Of those, the ones the client refused (non-2xx) or never answered.
    pub snapshot_requests_failed: u64,
    /// Snapshot requests sent again after a 491 (glare) and its back-off.
    pub snapshot_retries: u64,
}

fn rejections_by_name<S: serde::Serializer>(
    rejections: &BTreeMap<(u16, &'static str), u64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(
        rejections
            .iter()
            .map(|((code, cause), n)| (format!("{code} {cause}"), n)),
    )
}

impl SiprecCounters {
    /// Rejections with this status code, whatever the cause.
    pub fn rejected(&self, status: u16) -> u64 {
        self.rejections
            .iter()
            .filter(|((code, _), _)| *code == status)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What `recorder sessions` shows about a live session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionSummary {
    pub id: RecordingId,
    pub call_ids: CallIds,
    pub participants: Vec<Participant>,
    /// Accepted streams (label, local ports, flow ids, paused ...).
    pub streams: Vec<StreamInfo>,
    pub started_at: SystemTime,
    /// Last signaling or RTP seen.
    pub last_activity: SystemTime,
    /// The 200 OK was acknowledged.
    pub confirmed: bool,
}

/// A response the logic decided on; the SIP layer fills in the transaction's headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub reason: String,
    /// Extra headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Body and its content type.
    pub body: Option<(String, Vec<u8>)>,
}

impl Reply {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The value of an extra header, for tests and logs.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request was rejected: status, reason phrase, counter cause, extra headers.
struct Reject {
    status: u16,
    reason: String,
    cause: &'static str,
    headers: Vec<(String, String)>,
}

impl Reject {
    fn new(status: u16, reason: impl Into<String>, cause: &'static str) -> Self {
        Self {
            status,
            reason: reason.into(),
            cause,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// A session is the client's dialog: Call-ID plus the client's From tag. Call-ID alone is not
/// enough: a client may reuse it later for an unrelated session.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
struct SessionKey {
    call_id: String,
    from_tag: String,
}

/// Where the INVITE transaction of a session stands.
#[derive(Debug)]
enum Phase {
    /// Flows pinned, 200 not sent yet (answer delay).
    Pending {
        txn: TxnId,
        answer_at: Instant,
        reply: Reply,
    },
    /// 200 sent, waiting for ACK.
    Answered,
    /// ACK received.
    Confirmed,
}

/// One m-line slot of the session (index = m-line index). `None` = rejected / removed.
type Slot = Option<StreamInfo>;

struct Session {
    id: RecordingId,
    key: SessionKey,
    dialog: Option<DialogId>,
    phase: Phase,
    slots: Vec<Slot>,
    /// The last offer and our answers to it, to re-send our SDP on an offer-less re-INVITE.
    offer: Offer,
    answers: Vec<StreamAnswer>,
    sdp_session_id: u64,
    sdp_version: u64,
    metadata: Option<MetadataState>,
    metadata_version: u32,
    call_ids: CallIds,
    participants: Vec<Participant>,
    require_siprec: bool,
    started_at: SystemTime,
    /// Session-Expires granted (RFC 4028); the session ends if not refreshed in time.
    session_expires: Option<Duration>,
    refresh_deadline: Option<Instant>,
    /// Last signaling or RTP seen, and the packet total that RTP was judged by.
    last_activity: Instant,
    last_activity_wall: SystemTime,
    packets_seen: u64,
    /// When the flow counters are looked at next (RTP is only seen by polling them).
    next_idle_check: Instant,
    /// Unresolved metadata ids a snapshot was already requested for (cleared once the
    /// metadata is consistent again), so that one inconsistency gets one request.
    snapshot_asked: Vec<String>,
    /// A snapshot request to send (its reason) once the dialog is confirmed.
    snapshot_due: Option<String>,
    /// The deadline of this session's current entry in `Recorder::timers`, if any.
    armed_at: Option<Instant>,
}

impl Session {
    fn streams(&self) -> Vec<StreamInfo> {
        self.slots.iter().flatten().cloned().collect()
    }

    fn flow_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots
            .iter()
            .flatten()
            .flat_map(|s| std::iter::once(s.flow_id).chain(s.rtcp_flow_id))
    }

    /// Next idle check: the idle deadline, or sooner while RTP may be flowing, so that the
    /// end of RTP is noticed within a quarter of the idle timeout.
    fn schedule_idle_check(&mut self, now: Instant, idle: Duration) {
        self.next_idle_check = (self.last_activity + idle).min(now + idle / 4);
    }

    /// When `Recorder::on_timeout` has work for this session.
    fn deadline(&self) -> Instant {
        match &self.phase {
            Phase::Pending { answer_at, .. } => *answer_at,
            _ => self
                .refresh_deadline
                .map_or(self.next_idle_check, |d| d.min(self.next_idle_check)),
        }
    }
}

/// Things for the SIP layer to do, queued by the logic.
#[derive(Default)]
struct Outbox {
    /// Deferred answers.
    replies: Vec<(TxnId, Reply)>,
    byes: Vec<(DialogId, String)>,
    /// Metadata snapshot requests: (dialog, `requestsnapshot` body, is a 491 retry).
    snapshot_requests: Vec<(DialogId, String, bool)>,
}

/// A snapshot request UPDATE awaiting its response, kept to send it again after a 491.
struct SnapshotInFlight {
    xml: String,
    retried: bool,
}

/// The recording server: sessions, ports, flows.
pub struct Recorder<F: FlowControl> {
    config: SiprecConfig,
    flows: F,
    events: Box<dyn FnMut(SessionEvent) + Send>,
    ports: PortAllocator,
    /// Ports taken from `ports` but never answered (a rollback): reusable without cool-down.
    spare_ports: Vec<u16>,
    sessions: BTreeMap<SessionKey, Session>,
    next_flow_id: u64,
    accepting: bool,
    not_accepting_reason: String,
    counters: SiprecCounters,
    outbox: Outbox,
    /// Our snapshot UPDATEs awaiting a response (one per dialog: the endpoint sends one
    /// in-dialog request at a time).
    snapshots_in_flight: HashMap<DialogId, SnapshotInFlight>,
    /// Snapshot requests refused with 491, to send again at the given time.
    snapshot_retries: Vec<(Instant, DialogId, String)>,
    /// Session deadlines, earliest first, so that a timer or an event costs O(log n), not a
    /// pass over every session (with thousands held, those passes were most of the CPU per
    /// new session). An entry is current while its session's `armed_at` holds its instant;
    /// stale ones are skipped, popped from the top in `flush`, and dropped all at once when
    /// they outnumber the sessions.
    timers: BinaryHeap<Reverse<(Instant, SessionKey)>>,
    /// Sessions whose `snapshot_due` is set, so that `flush` does not look at every session.
    snapshots_due: Vec<SessionKey>,
}

impl<F: FlowControl> Recorder<F> {
    pub fn new(
        config: SiprecConfig,
        flows: F,
        events: Box<dyn FnMut(SessionEvent) + Send>,
    ) -> Self {
        let ports =
            PortAllocator::new(config.rtp_ports.0, config.rtp_ports.1, config.port_cooldown);
        Self {
            config,
            flows,
            events,
            ports,
            spare_ports: Vec::new(),
            sessions: BTreeMap::new(),
            next_flow_id: 1,
            accepting: true,
            not_accepting_reason: String::new(),
            counters: SiprecCounters::default(),
            outbox: Outbox::default(),
            snapshots_in_flight: HashMap::new(),
            snapshot_retries: Vec::new(),
            timers: BinaryHeap::new(),
            snapshots_due: Vec::new(),
        }
    }

    /// Applies reloaded limits (SIGHUP). Sessions in progress keep going: the ACL and the session
    /// limit apply to new INVITEs, the idle timeout from each session's next idle check.
    pub fn set_limits(
        &mut self,
        acl: Vec<(IpAddr, u8)>,
        max_sessions: usize,
        idle_timeout: Duration,
    ) {
        self.config.acl = acl;
        self.config.max_sessions = max_sessions;
        self.config.idle_timeout = idle_timeout;
    }

    /// `false`: new INVITEs get 503 with Retry-After (disk full, shutting down).
    pub fn set_accepting(&mut self, accepting: bool, reason: &str) {
        self.accepting = accepting;
        self.not_accepting_reason = reason.to_string();
    }

    /// Operator stop: BYE to the client, `Ended{Operator}`. `false` if the id is unknown.
    pub fn stop(&mut self, now: Instant, id: &str, endpoint: &mut Endpoint) -> bool {
        let Some(key) = self
            .sessions
            .values()
            .find(|s| s.id == id)
            .map(|s| s.key.clone())
        else {
            return false;
        };
        self.end_session(now, &key, EndReason::Operator, true);
        self.flush(now, endpoint);
        true
    }

    /// BYE every session, `Ended{Shutdown}`, flows removed.
    pub fn shutdown(&mut self, now: Instant, endpoint: &mut Endpoint) {
        self.shutdown_sessions(now);
        self.flush(now, endpoint);
    }

    /// How many sessions are live (without building their summaries, as `sessions` does).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn sessions(&self) -> Vec<SessionSummary> {
        self.sessions
            .values()
            .map(|s| SessionSummary {
                id: s.id.clone(),
                call_ids: s.call_ids.clone(),
                participants: s.participants.clone(),
                streams: s.streams(),
                started_at: s.started_at,
                last_activity: s.last_activity_wall,
                confirmed: matches!(s.phase, Phase::Confirmed),
            })
            .collect()
    }

    /// New flows get ids above `id`: records of flows a crashed daemon left in adopted rings
    /// must never be taken for a new session's.
    pub fn flow_ids_above(&mut self, id: u64) {
        self.next_flow_id = self.next_flow_id.max(id + 1);
    }

    pub fn counters(&self) -> &SiprecCounters {
        &self.counters
    }

    pub fn flows(&self) -> &F {
        &self.flows
    }

    pub fn flows_mut(&mut self) -> &mut F {
        &mut self.flows
    }

    // ---------------------------------------------------------------- requests

    /// Decides the answer to a request the SIP layer passed up. `None`: no answer now (the
    /// answer is deferred by `answer_delay`, or the request needs none, like ACK).
    pub fn handle_request(
        &mut self,
        now: Instant,
        txn: &TxnId,
        dialog: Option<&DialogId>,
        request: &Request,
        source: SocketAddr,
    ) -> Option<Reply> {
        let wall = SystemTime::now();
        if request.method == Method::Ack {
            return None;
        }
        let Some(key) = session_key(&request.headers) else {
            return Some(self.reject(Reject::new(400, "Missing Call-ID or From", "bad_request")));
        };
        let in_dialog = to_tag(&request.headers).is_some();
        let armed = key.clone();
        let result = match (&request.method, in_dialog) {
            (Method::Invite, false) => {
                if self.sessions.contains_key(&key) {
                    // Same Call-ID and From tag but no To tag: a merged or forked copy.
                    Err(Reject::new(482, "Loop Detected", "merged_request"))
                } else {
                    self.new_session(now, wall, txn, dialog, key, request, source)
                }
            }
            (Method::Options, false) => Ok(Some(options_reply())),
            _ if !self.sessions.contains_key(&key) => Err(Reject::new(
                481,
                "Call/Transaction Does Not Exist",
                "unknown_dialog",
            )),
            _ => self.in_dialog(now, wall, dialog, &key, request),
        };
        // A new session, a refresh or a BYE may have moved (or ended) the session's deadline.
        self.arm(&armed);
        match result {
            Ok(reply) => reply,
            Err(reject) => Some(self.reject(reject)),
        }
    }

    fn reject(&mut self, reject: Reject) -> Reply {
        *self
            .counters
            .rejections
            .entry((reject.status, reject.cause))
            .or_default() += 1;
        debug!(status = reject.status, reason = %reject.reason, "rejecting request");
        let mut reply = Reply::new(reject.status, reject.reason);
        reply.headers = reject.headers;
        reply
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the request's context, all needed"
    )]
    fn new_session(
        &mut self,
        now: Instant,
        wall: SystemTime,
        txn: &TxnId,
        dialog: Option<&DialogId>,
        key: SessionKey,
        request: &Request,
        source: SocketAddr,
    ) -> Result<Option<Reply>, Reject> {
        if !acl_allows(&self.config.acl, source.ip()) {
            return Err(Reject::new(403, "Forbidden", "acl"));
        }
        let require = header_tokens(&request.headers, "Require");
        let unsupported: Vec<&String> = require
            .iter()
            .filter(|t| !SUPPORTED_TAGS.iter().any(|s| t.eq_ignore_ascii_case(s)))
            .collect();
        if !unsupported.is_empty() {
            let list = unsupported
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(
                Reject::new(420, "Bad Extension", "bad_extension").header("Unsupported", list)
            );
        }
        let require_siprec = require.iter().any(|t| t.eq_ignore_ascii_case("siprec"));
        let src_feature = has_src_feature(request);
        if self.config.require_siprec_tag && !(require_siprec && src_feature) {
            let what = if require_siprec {
                "Contact must have the +sip.src feature tag"
            } else {
                "Require header must have the siprec option tag"
            };
            return Err(policy_reject(request, what, "missing_siprec_tag"));
        }
        if require_siprec && !src_feature {
            // RFC 7866 wants +sip.src too; some clients omit it. Record anyway.
            warn!(call_id = %key.call_id, "Require: siprec without +sip.src Contact tag; accepting");
        }
        if !self.accepting {
            let reason = if self.not_accepting_reason.is_empty() {
                "Service Unavailable".to_string()
            } else {
                format!("Service Unavailable: {}", self.not_accepting_reason)
            };
            return Err(Reject::new(503, reason, "not_accepting")
                .header("Retry-After", self.config.retry_after.to_string()));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(Reject::new(503, "Session limit reached", "session_limit")
                .header("Retry-After", self.config.retry_after.to_string()));
        }
        let timer = self.session_timer(request)?;
        let body = parse_body(request)?;
        let Some(sdp) = body.sdp else {
            return Err(Reject::new(
                488,
                "Not Acceptable Here: no SDP offer",
                "no_sdp",
            ));
        };
        let offer =
            parse_offer(&sdp).map_err(|e| Reject::new(400, format!("Bad SDP: {e}"), "bad_sdp"))?;
        if self.config.require_metadata && body.metadata.is_none() {
            return Err(policy_reject(
                request,
                "INVITE must have a recording metadata part",
                "missing_metadata",
            ));
        }
        self.check_labels(request, &offer)?;
        let metadata = match &body.metadata {
            Some(xml) => {
                let doc = parse_metadata_body(xml)?;
                let mut state = MetadataState::default();
                state.apply(doc, wall);
                Some(state)
            }
            None => None,
        };
        if !offer.streams.iter().any(|s| usable_codec(s).is_some()) {
            return Err(Reject::new(
                488,
                "Not Acceptable Here: no usable media stream",
                "no_usable_stream",
            ));
        }

        // Validated: take ports and pin flows.
        let mut slots: Vec<Slot> = Vec::with_capacity(offer.streams.len());
        for stream in &offer.streams {
            let slot = match usable_codec(stream) {
                Some(codec) => match self.open_stream(now, stream, codec) {
                    Ok(mut info) => {
                        // Inactive-first: the flow is pinned, the answer says inactive.
                        info.paused |= self.config.answer_inactive;
                        Some(info)
                    }
                    Err(reject) => {
                        for info in slots.into_iter().flatten() {
                            self.close_stream(now, &info, false);
                        }
                        return Err(reject);
                    }
                },
                None => None,
            };
            slots.push(slot);
        }

        let id = recording_id();
        let sdp_session_id = u64::from(rand::random::<u32>());
        let answers = answers_for(&offer, &slots, &[]);
        let answer = build_answer(
            &offer,
            &answers,
            self.config.media_address,
            sdp_session_id,
            1,
        );
        let mut reply = Reply::new(200, "OK")
            .header("Contact", self.contact(request))
            .header("Allow", ALLOW)
            .header("Supported", "timer");
        let mut required = Vec::new();
        if require_siprec {
            required.push("siprec");
        }
        if let Some(timer) = &timer {
            reply = reply.header("Session-Expires", timer.header_value());
            if timer.uac_supports {
                required.push("timer");
            }
        }
        if !required.is_empty() {
            reply = reply.header("Require", required.join(", "));
        }
        reply.body = Some(("application/sdp".to_string(), answer.into_bytes()));

        let mut call_ids = call_ids(request, metadata.as_ref(), &self.config.uuid_headers);
        if let Some(gci) = body.gci {
            // Cisco's global call id from the GTD part: worth keeping for correlation.
            call_ids.extra.push(("gci".to_string(), gci));
        }
        let participants = metadata
            .as_ref()
            .map(|m| m.participants())
            .unwrap_or_default();
        let metadata_version = body.metadata.map(|xml| MetadataVersion {
            version: 1,
            received_at: wall,
            method: "INVITE".to_string(),
            xml,
        });
        let delayed = !self.config.answer_delay.is_zero();
        let (phase, immediate) = if delayed {
            let pending = Phase::Pending {
                txn: *txn,
                answer_at: now + self.config.answer_delay,
                reply,
            };
            (pending, None)
        } else {
            (Phase::Answered, Some(reply))
        };
        let session = Session {
            id: id.clone(),
            key: key.clone(),
            dialog: dialog.cloned(),
            phase,
            slots,
            offer,
            answers,
            sdp_session_id,
            sdp_version: 1,
            metadata,
            metadata_version: u32::from(metadata_version.is_some()),
            call_ids: call_ids.clone(),
            participants: participants.clone(),
            require_siprec,
            started_at: wall,
            refresh_deadline: timer.as_ref().and_then(|t| t.deadline(now)),
            session_expires: timer.map(|t| t.interval),
            last_activity: now,
            last_activity_wall: wall,
            packets_seen: 0,
            next_idle_check: now + self.config.idle_timeout / 4,
            snapshot_asked: Vec::new(),
            snapshot_due: None,
            armed_at: None,
        };
        let streams = session.streams();
        info!(id = %id, call_id = %key.call_id, streams = streams.len(), "recording session started");
        self.sessions.insert(key.clone(), session);
        self.check_metadata_refs(&key);
        self.counters.sessions_started += 1;
        (self.events)(SessionEvent::Started {
            id,
            at: wall,
            ids: call_ids,
            streams,
            participants,
            metadata: metadata_version,
        });
        Ok(immediate)
    }

    /// Takes ports for an offered stream and pins its flows.
    fn open_stream(
        &mut self,
        now: Instant,
        stream: &OfferStream,
        codec: Codec,
    ) -> Result<StreamInfo, Reject> {
        let need_rtcp = !stream.rtcp_mux;
        let port = self
            .spare_ports
            .pop()
            .or_else(|| self.ports.allocate(now, need_rtcp));
        let Some(port) = port else {
            return Err(Reject::new(503, "Media ports exhausted", "ports_exhausted")
                .header("Retry-After", self.config.retry_after.to_string()));
        };
        let remote = stream_remote(stream);
        let mut info = StreamInfo {
            index: stream.index,
            label: stream_label(stream),
            media: stream.media.clone(),
            flow_id: 0,
            rtcp_flow_id: None,
            local_port: port,
            rtcp_port: need_rtcp.then(|| port + 1),
            remote,
            rtcp_remote: rtcp_remote(stream),
            codec,
            telephone_event_pt: stream.telephone_event.as_ref().map(|c| c.payload_type),
            paused: stream_paused(stream),
            srtp: !stream.crypto.is_empty(),
            sdes: stream
                .is_srtp()
                .then(|| crate::media::sdes::choose(&stream.crypto))
                .flatten(),
        };
        let rtp_spec = self.spec(port, remote);
        info.flow_id = rtp_spec.flow_id;
        if let Err(e) = self.flows.insert(rtp_spec) {
            self.give_back(now, port, false);
            warn!(error = %e, port, "pinning RTP flow failed");
            return Err(Reject::new(500, "Flow table error", "flow_error"));
        }
        if let Some(rtcp_port) = info.rtcp_port {
            let spec = self.spec(rtcp_port, rtcp_remote(stream));
            if let Err(e) = self.flows.insert(spec) {
                let _ = self.flows.remove(rtp_spec.local);
                self.give_back(now, port, false);
                warn!(error = %e, port = rtcp_port, "pinning RTCP flow failed");
                return Err(Reject::new(500, "Flow table error", "flow_error"));
            }
            info.rtcp_flow_id = Some(spec.flow_id);
        }
        Ok(info)
    }

    /// Unpins a stream's flows and gives its ports back.
    fn close_stream(&mut self, now: Instant, info: &StreamInfo, advertised: bool) {
        let ip = self.config.media_address;
        for port in std::iter::once(info.local_port).chain(info.rtcp_port) {
            if let Err(e) = self.flows.remove(SocketAddr::new(ip, port)) {
                warn!(error = %e, port, "unpinning flow failed");
            }
        }
        self.give_back(now, info.local_port, advertised);
    }

    /// An advertised port cools down before reuse (late packets must not reach another call);
    /// one no client ever saw in an answer can be reused at once, so it is kept aside here.
    fn give_back(&mut self, now: Instant, port: u16, advertised: bool) {
        if advertised {
            self.ports.release(now, port);
        } else {
            self.spare_ports.push(port);
        }
    }

    /// A flow spec with a fresh flow id.
    fn spec(&mut self, port: u16, remote: Option<SocketAddr>) -> FlowSpec {
        let flow_id = self.next_flow_id;
        self.next_flow_id += 1;
        FlowSpec {
            flow_id,
            local: SocketAddr::new(self.config.media_address, port),
            remote: if self.config.pin_source { remote } else { None },
            action: self.config.flow_action,
        }
    }

    /// With `require_label`: every live m-line (port not 0) must carry `a=label`, the join key
    /// with the metadata's streams.
    fn check_labels(&self, request: &Request, offer: &Offer) -> Result<(), Reject> {
        if !self.config.require_label {
            return Ok(());
        }
        match offer
            .streams
            .iter()
            .find(|s| s.port != 0 && s.label.is_none())
        {
            Some(_) => Err(policy_reject(
                request,
                "SDP must have label media attribute",
                "missing_label",
            )),
            None => Ok(()),
        }
    }

    /// Our Contact: the address the client reached us at, tagged as an SRS (RFC 7866 §6.2).
    fn contact(&self, request: &Request) -> String {
        let uri = &request.uri;
        let host = uri.host_with_port.to_string();
        let transport = uri.params.iter().find_map(|p| match p {
            rsip::Param::Transport(t) => Some(t.to_string().to_ascii_lowercase()),
            _ => None,
        });
        match transport {
            Some(t) => format!("<sip:srs@{host};transport={t}>;+sip.srs"),
            None => format!("<sip:srs@{host}>;+sip.srs"),
        }
    }

    /// The session timer a request asks for (RFC 4028), or a 422/400.
    fn session_timer(&self, request: &Request) -> Result<Option<SessionTimer>, Reject> {
        let Some(value) = header_value(&request.headers, "Session-Expires") else {
            return Ok(None);
        };
        let mut parts = value.split(';');
        let seconds: u32 = parts
            .next()
            .unwrap_or("")
            .trim()
            .parse()
            .map_err(|_| Reject::new(400, "Malformed Session-Expires", "bad_request"))?;
        if seconds < self.config.min_session_expires {
            return Err(Reject::new(
                422,
                "Session Interval Too Small",
                "session_interval_too_small",
            )
            .header("Min-SE", self.config.min_session_expires.to_string()));
        }
        let refresher = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("refresher"))
            .map(|(_, v)| v.trim().to_ascii_lowercase());
        let uac_supports = header_tokens(&request.headers, "Supported")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("timer"));
        Ok(Some(SessionTimer {
            interval: Duration::from_secs(u64::from(seconds)),
            refresher_uas: refresher.as_deref() == Some("uas"),
            uac_supports,
        }))
    }

    // ---------------------------------------------------------------- in-dialog

    fn in_dialog(
        &mut self,
        now: Instant,
        wall: SystemTime,
        dialog: Option<&DialogId>,
        key: &SessionKey,
        request: &Request,
    ) -> Result<Option<Reply>, Reject> {
        if let Some(session) = self.sessions.get_mut(key) {
            session.last_activity = now;
            session.last_activity_wall = wall;
            if session.dialog.is_none() {
                session.dialog = dialog.cloned();
            }
        }
        match &request.method {
            Method::Invite | Method::Update => self.renegotiate(now, wall, key, request).map(Some),
            Method::Bye => {
                let body = parse_body(request).unwrap_or_default();
                if let Some(xml) = body.metadata {
                    // Final metadata: a bad body must not keep the session alive.
                    match parse_metadata_body(&xml) {
                        Ok(doc) => self.apply_metadata(wall, key, request, doc, xml),
                        Err(e) => warn!(reason = %e.reason, "ignoring bad metadata in BYE"),
                    }
                }
                let reason = header_value(&request.headers, "Reason");
                self.end_session(now, key, EndReason::Bye { reason }, false);
                Ok(Some(Reply::new(200, "OK")))
            }
            Method::Options => Ok(Some(options_reply())),
            Method::Info | Method::Notify | Method::Message => Ok(Some(Reply::new(200, "OK"))),
            Method::Refer => {
                Err(Reject::new(405, "Method Not Allowed", "method_not_allowed")
                    .header("Allow", ALLOW))
            }
            // The transaction layer answers CANCEL; PRACK is harmless.
            Method::Cancel | Method::PRack => Ok(Some(Reply::new(200, "OK"))),
            _ => {
                Err(Reject::new(405, "Method Not Allowed", "method_not_allowed")
                    .header("Allow", ALLOW))
            }
        }
    }

    /// re-INVITE or UPDATE: new offer and/or metadata; refreshes the session timer.
    fn renegotiate(
        &mut self,
        now: Instant,
        wall: SystemTime,
        key: &SessionKey,
        request: &Request,
    ) -> Result<Reply, Reject> {
        let is_invite = request.method == Method::Invite;
        if self
            .sessions
            .get(key)
            .is_some_and(|s| matches!(s.phase, Phase::Pending { .. }))
        {
            return Err(Reject::new(491, "Request Pending", "request_pending"));
        }
        let timer = self.session_timer(request)?;
        let body = parse_body(request)?;
        let offer = match &body.sdp {
            Some(sdp) => Some(
                parse_offer(sdp)
                    .map_err(|e| Reject::new(400, format!("Bad SDP: {e}"), "bad_sdp"))?,
            ),
            None => None,
        };
        if let Some(offer) = &offer {
            self.check_labels(request, offer)?;
        }
        let metadata = match body.metadata {
            Some(xml) => Some((parse_metadata_body(&xml)?, xml)),
            None => None,
        };

        // Validated: apply.
        if let Some(offer) = offer {
            self.apply_offer(now, wall, key, offer);
        }
        if let Some((doc, xml)) = metadata {
            self.apply_metadata(wall, key, request, doc, xml);
            self.check_metadata_refs(key);
        }
        let contact = self.contact(request);
        let Some(session) = self.sessions.get_mut(key) else {
            return Err(Reject::new(
                481,
                "Call/Transaction Does Not Exist",
                "unknown_dialog",
            ));
        };
        if let Some(t) = &timer {
            session.session_expires = Some(t.interval);
        }
        session.refresh_deadline = match &timer {
            Some(t) => t.deadline(now),
            None => session.session_expires.map(|se| now + se),
        };
        let mut required = Vec::new();
        // Our Contact (with +sip.srs) goes in every 2xx that refreshes the target.
        let mut reply = Reply::new(200, "OK").header("Contact", contact);
        if is_invite {
            reply = reply.header("Allow", ALLOW).header("Supported", "timer");
            if session.require_siprec {
                required.push("siprec");
            }
        }
        if let Some(t) = &timer {
            reply = reply.header("Session-Expires", t.header_value());
            if t.uac_supports {
                required.push("timer");
            }
        }
        if !required.is_empty() {
            reply = reply.header("Require", required.join(", "));
        }
        // An answer to a new offer, or (offer-less re-INVITE) our current SDP again.
        if body.sdp.is_some() || is_invite {
            session.sdp_version += 1;
            let sdp = build_answer(
                &session.offer,
                &session.answers,
                self.config.media_address,
                session.sdp_session_id,
                session.sdp_version,
            );
            reply.body = Some(("application/sdp".to_string(), sdp.into_bytes()));
        }
        Ok(reply)
    }

    /// Diffs a new offer against the session's streams, m-line by m-line, and moves the flow
    /// table to match. Our local ports stay the same for streams that continue.
    fn apply_offer(&mut self, now: Instant, wall: SystemTime, key: &SessionKey, offer: Offer) {
        let Some(mut session) = self.sessions.remove(key) else {
            return;
        };
        let mut changed = false;
        let mut toggles = Vec::new();
        let count = offer.streams.len().max(session.slots.len());
        session.slots.resize(count, None);
        for (index, slot) in session.slots.iter_mut().enumerate() {
            let stream = offer.streams.get(index);
            let codec = stream.and_then(usable_codec);
            match (slot.take(), stream, codec) {
                (Some(mut info), Some(stream), Some(codec)) => {
                    let remote = stream_remote(stream);
                    let te = stream.telephone_event.as_ref().map(|c| c.payload_type);
                    let rtcp_to = rtcp_remote(stream);
                    if info.remote != remote
                        || info.codec != codec
                        || info.telephone_event_pt != te
                        || info.rtcp_remote != rtcp_to
                    {
                        info.remote = remote;
                        info.rtcp_remote = rtcp_to;
                        info.codec = codec;
                        info.telephone_event_pt = te;
                        // Same local key; the generation bump tells the data path it changed.
                        self.rewrite_flow(info.local_port, info.flow_id, remote);
                        if let (Some(port), Some(id)) = (info.rtcp_port, info.rtcp_flow_id) {
                            self.rewrite_flow(port, id, rtcp_remote(stream));
                        }
                        changed = true;
                    }
                    let label = stream_label(stream);
                    if label != info.label {
                        info.label = label;
                        changed = true;
                    }
                    let paused = stream_paused(stream);
                    if paused != info.paused {
                        info.paused = paused;
                        toggles.push((info.label.clone(), paused));
                        changed = true;
                    }
                    // A new SDES key (a transfer to a new leg): the writer decrypts with it
                    // from now on, and with the old one what is still in flight.
                    let sdes = stream
                        .is_srtp()
                        .then(|| crate::media::sdes::choose(&stream.crypto))
                        .flatten();
                    if sdes != info.sdes {
                        info.srtp = !stream.crypto.is_empty();
                        info.sdes = sdes;
                        changed = true;
                    }
                    *slot = Some(info);
                }
                (Some(info), _, _) => {
                    // Port 0 (or nothing usable left): the stream is gone.
                    self.close_stream(now, &info, true);
                    changed = true;
                }
                (None, Some(stream), Some(codec)) => match self.open_stream(now, stream, codec) {
                    Ok(info) => {
                        *slot = Some(info);
                        changed = true;
                    }
                    // Out of ports mid-call: refuse this stream only, keep the session.
                    Err(e) => {
                        warn!(id = %session.id, index, reason = %e.reason, "cannot add stream")
                    }
                },
                (None, _, _) => {}
            }
        }
        // m-lines never disappear (RFC 3264 §8); tolerate it, the slots are empty by now.
        session.slots.truncate(offer.streams.len());
        session.answers = answers_for(&offer, &session.slots, &session.answers);
        session.offer = offer;
        let id = session.id.clone();
        let streams = session.streams();
        self.sessions.insert(key.clone(), session);
        for (label, paused) in toggles {
            let event = if paused {
                SessionEvent::Paused {
                    id: id.clone(),
                    at: wall,
                    label,
                }
            } else {
                SessionEvent::Resumed {
                    id: id.clone(),
                    at: wall,
                    label,
                }
            };
            (self.events)(event);
        }
        if changed {
            (self.events)(SessionEvent::MediaChanged {
                id,
                at: wall,
                streams,
            });
        }
    }

    /// Re-pins a flow at the same local port with a new expected source.
    fn rewrite_flow(&mut self, port: u16, flow_id: u64, remote: Option<SocketAddr>) {
        let local = SocketAddr::new(self.config.media_address, port);
        let spec = FlowSpec {
            flow_id,
            local,
            remote: if self.config.pin_source { remote } else { None },
            action: self.config.flow_action,
        };
        if let Err(e) = self.flows.rewrite(local, spec) {
            warn!(error = %e, port, "rewriting flow failed; pinning afresh");
            if let Err(e) = self.flows.insert(spec) {
                warn!(error = %e, port, "pinning flow failed");
            }
        }
    }

    /// Merges metadata into the session (partial merges, complete replaces) and reports the
    /// participants it now has.
    fn apply_metadata(
        &mut self,
        wall: SystemTime,
        key: &SessionKey,
        request: &Request,
        doc: MetadataDoc,
        xml: String,
    ) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let state = session.metadata.get_or_insert_with(MetadataState::default);
        state.apply(doc, wall);
        session.participants = state.participants();
        let fresh = call_ids(request, Some(state), &self.config.uuid_headers);
        merge_call_ids(&mut session.call_ids, fresh);
        session.metadata_version += 1;
        let event = SessionEvent::ParticipantsChanged {
            id: session.id.clone(),
            at: wall,
            participants: session.participants.clone(),
            metadata: Some(MetadataVersion {
                version: session.metadata_version,
                received_at: wall,
                method: request.method.to_string(),
                xml,
            }),
            ids: session.call_ids.clone(),
        };
        (self.events)(event);
    }

    /// Schedules a metadata snapshot request when the session's metadata references ids it
    /// never described (a missed partial update): once per inconsistency, i.e. only when an
    /// unresolved id was not asked about yet.
    fn check_metadata_refs(&mut self, key: &SessionKey) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let unresolved = session
            .metadata
            .as_ref()
            .map(MetadataState::unresolved_refs)
            .unwrap_or_default();
        if unresolved.is_empty() {
            session.snapshot_asked.clear();
            return;
        }
        if unresolved
            .iter()
            .all(|id| session.snapshot_asked.contains(id))
        {
            return;
        }
        for id in &unresolved {
            if !session.snapshot_asked.contains(id) {
                session.snapshot_asked.push(id.clone());
            }
        }
        let reason = format!(
            "metadata references undescribed ids: {}",
            unresolved.join(", ")
        );
        info!(id = %session.id, %reason, "requesting a metadata snapshot");
        session.snapshot_due = Some(reason);
        self.snapshots_due.push(key.clone());
    }

    /// Queues the due snapshot requests of confirmed dialogs (an initial INVITE's request
    /// waits for its ACK).
    fn queue_snapshot_requests(&mut self) {
        if self.snapshots_due.is_empty() {
            return;
        }
        let sessions = &mut self.sessions;
        let outbox = &mut self.outbox;
        // Kept: sessions still waiting for their ACK. Dropped: sent, or the session is gone.
        self.snapshots_due.retain(|key| {
            let Some(session) = sessions.get_mut(key) else {
                return false;
            };
            let (Phase::Confirmed, Some(dialog)) = (&session.phase, &session.dialog) else {
                return session.snapshot_due.is_some();
            };
            if let Some(reason) = session.snapshot_due.take() {
                outbox.snapshot_requests.push((
                    dialog.clone(),
                    snapshot_request_xml(&reason),
                    false,
                ));
            }
            false
        });
    }

    /// Ends a session: flows removed, ports released, `Ended` emitted, BYE queued if asked.
    fn end_session(&mut self, now: Instant, key: &SessionKey, reason: EndReason, send_bye: bool) {
        let Some(session) = self.sessions.remove(key) else {
            return;
        };
        // Before the flows go: their kernel counters go with them.
        let ring_drops: Vec<(u64, u64)> = session
            .slots
            .iter()
            .flatten()
            .flat_map(|info| std::iter::once(info.flow_id).chain(info.rtcp_flow_id))
            .map(|flow| (flow, self.flows.ring_drops(flow)))
            .filter(|(_, n)| *n > 0)
            .collect();
        for info in session.slots.iter().flatten() {
            self.close_stream(now, info, true);
        }
        if let Some(dialog) = &session.dialog {
            self.snapshots_in_flight.remove(dialog);
            self.snapshot_retries.retain(|(_, d, _)| d != dialog);
        }
        match session.phase {
            // Never answered: the INVITE gets a final answer instead of a BYE.
            Phase::Pending { txn, .. } => {
                if reason != EndReason::Cancel {
                    let reply = Reply::new(503, "Service Unavailable")
                        .header("Retry-After", self.config.retry_after.to_string());
                    self.outbox.replies.push((txn, reply));
                }
            }
            Phase::Answered | Phase::Confirmed => {
                if let (true, Some(dialog)) = (send_bye, session.dialog) {
                    self.outbox.byes.push((dialog, bye_reason(&reason)));
                }
            }
        }
        info!(id = %session.id, reason = reason.name(), "recording session ended");
        *self
            .counters
            .sessions_ended
            .entry(reason.name())
            .or_default() += 1;
        (self.events)(SessionEvent::Ended {
            id: session.id,
            at: SystemTime::now(),
            reason,
            ring_drops,
        });
    }

    fn shutdown_sessions(&mut self, now: Instant) {
        let keys: Vec<SessionKey> = self.sessions.keys().cloned().collect();
        for key in keys {
            self.end_session(now, &key, EndReason::Shutdown, true);
        }
    }

    fn session_for_dialog(&self, dialog: &DialogId) -> Option<SessionKey> {
        // Our dialogs are the client's: its Call-ID and From tag (the dialog's remote tag) are
        // the session's key, one lookup. The scan is for a session keyed otherwise, if any.
        let key = SessionKey {
            call_id: dialog.call_id.clone(),
            from_tag: dialog.remote_tag.clone(),
        };
        if self
            .sessions
            .get(&key)
            .is_some_and(|s| s.dialog.as_ref() == Some(dialog))
        {
            return Some(key);
        }
        self.sessions
            .values()
            .find(|s| s.dialog.as_ref() == Some(dialog))
            .map(|s| s.key.clone())
    }

    fn session_for_txn(&self, txn: &TxnId) -> Option<SessionKey> {
        self.sessions
            .values()
            .find(|s| matches!(&s.phase, Phase::Pending { txn: t, .. } if t == txn))
            .map(|s| s.key.clone())
    }

    // ---------------------------------------------------------------- timers

    /// Puts the session's deadline in `timers` (nothing if it is already there or the session
    /// is gone).
    fn arm(&mut self, key: &SessionKey) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let at = session.deadline();
        if session.armed_at == Some(at) {
            return;
        }
        session.armed_at = Some(at);
        self.timers.push(Reverse((at, key.clone())));
        // Ended and re-armed sessions leave entries behind until their instant comes (an idle
        // check can be an hour away): drop them when they outnumber the sessions (amortised
        // O(1) per entry, since at most one entry per session is current).
        if self.timers.len() > 2 * self.sessions.len() + 64 {
            let sessions = &self.sessions;
            self.timers
                .retain(|Reverse((at, key))| timer_is_current(sessions, *at, key));
        }
    }

    /// Pops stale entries off the top, so that `next_deadline` is a real deadline.
    fn prune_timers(&mut self) {
        while let Some(Reverse((at, key))) = self.timers.peek() {
            if timer_is_current(&self.sessions, *at, key) {
                return;
            }
            self.timers.pop();
        }
    }

    /// Sends deferred answers, ends sessions whose session timer expired or that went idle.
    /// Looks only at the sessions whose deadline is due.
    fn on_timeout(&mut self, now: Instant) {
        let wall = SystemTime::now();
        let mut due = Vec::new();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.timers.pop() else {
                break;
            };
            if let Some(session) = self.sessions.get_mut(&key) {
                if session.armed_at == Some(at) {
                    session.armed_at = None;
                    due.push(key);
                }
            }
        }
        let mut expired = Vec::new();
        let mut idle = Vec::new();
        for key in due {
            match self.session_timeout(now, wall, &key) {
                Some(SessionDue::Expired) => expired.push(key),
                Some(SessionDue::Idle) => idle.push(key),
                None => self.arm(&key),
            }
        }
        for key in expired {
            info!(call_id = %key.call_id, "session timer expired");
            self.end_session(now, &key, EndReason::Timeout, true);
        }
        for key in idle {
            info!(call_id = %key.call_id, "session idle");
            self.end_session(now, &key, EndReason::Timeout, true);
        }
    }

    /// One session's due work: its deferred answer, its session timer, its idle check.
    fn session_timeout(
        &mut self,
        now: Instant,
        wall: SystemTime,
        key: &SessionKey,
    ) -> Option<SessionDue> {
        let session = self.sessions.get_mut(key)?;
        let due = matches!(&session.phase, Phase::Pending { answer_at, .. } if *answer_at <= now);
        if due {
            if let Phase::Pending { txn, reply, .. } =
                std::mem::replace(&mut session.phase, Phase::Answered)
            {
                self.outbox.replies.push((txn, reply));
                session.last_activity = now;
                session.refresh_deadline = session.session_expires.map(|se| now + se);
            }
        }
        if due || matches!(session.phase, Phase::Pending { .. }) {
            return None;
        }
        if session.refresh_deadline.is_some_and(|d| d <= now) {
            return Some(SessionDue::Expired);
        }
        if session.next_idle_check <= now {
            let packets: u64 = session.flow_ids().map(|id| self.flows.packets(id)).sum();
            if packets != session.packets_seen {
                session.packets_seen = packets;
                session.last_activity = now;
                session.last_activity_wall = wall;
            }
            if session.last_activity + self.config.idle_timeout <= now {
                return Some(SessionDue::Idle);
            }
            session.schedule_idle_check(now, self.config.idle_timeout);
        }
        None
    }

    fn next_deadline(&self) -> Option<Instant> {
        // The top may be stale (pruned in `flush`): at worst an early wake-up with nothing due.
        self.timers
            .peek()
            .map(|Reverse((at, _))| *at)
            .into_iter()
            .chain(self.snapshot_retries.iter().map(|(at, _, _)| *at))
            .min()
    }

    /// A 491 (glare: the client's own request crossed ours) to a snapshot request: schedule it
    /// once more after the RFC 3261 §14.1 back-off. As UAS we never own the Call-ID, so the
    /// wait is 0-2 s in units of 10 ms. `false` if it was already the retry.
    fn back_off_snapshot(&mut self, now: Instant, dialog: &DialogId) -> bool {
        let Some(sent) = self.snapshots_in_flight.remove(dialog) else {
            return false;
        };
        if sent.retried {
            return false;
        }
        let wait = Duration::from_millis(10 * rand::thread_rng().gen_range(0..=200u64));
        debug!(call_id = %dialog.call_id, ?wait, "snapshot request met 491; retrying");
        self.snapshot_retries
            .push((now + wait, dialog.clone(), sent.xml));
        true
    }

    /// Queues the snapshot retries whose back-off is over, for dialogs that still exist.
    fn queue_snapshot_retries(&mut self, now: Instant) {
        let (due, later) = std::mem::take(&mut self.snapshot_retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.snapshot_retries = later;
        for (_, dialog, xml) in due {
            if self.session_for_dialog(&dialog).is_some() {
                self.outbox.snapshot_requests.push((dialog, xml, true));
            }
        }
    }

    /// Sends what the logic queued.
    fn flush(&mut self, now: Instant, endpoint: &mut Endpoint) {
        self.prune_timers();
        for (txn, reply) in std::mem::take(&mut self.outbox.replies) {
            send_reply(now, endpoint, &txn, reply);
        }
        for (dialog, reason) in std::mem::take(&mut self.outbox.byes) {
            if let Err(e) = endpoint.send_bye(now, &dialog, Some(&reason)) {
                warn!(error = %e, "sending BYE failed");
            }
        }
        self.queue_snapshot_requests();
        for (dialog, xml, retry) in std::mem::take(&mut self.outbox.snapshot_requests) {
            let headers = vec![
                Header::ContentType(rsip::headers::ContentType::new(SNAPSHOT_REQUEST_TYPE)),
                Header::ContentDisposition(rsip::headers::ContentDisposition::new(
                    "recording-session",
                )),
            ];
            match endpoint.send_request(
                now,
                &dialog,
                Method::Update,
                headers,
                xml.clone().into_bytes(),
            ) {
                Ok(()) => {
                    if retry {
                        self.counters.snapshot_retries += 1;
                    } else {
                        self.counters.snapshot_requests += 1;
                    }
                    let entry = SnapshotInFlight {
                        xml,
                        retried: retry,
                    };
                    self.snapshots_in_flight.insert(dialog, entry);
                }
                // The dialog went away meanwhile (BYE crossed): nothing to ask for.
                Err(e) => debug!(error = %e, "snapshot request not sent"),
            }
        }
    }
}

impl<F: FlowControl> SipApp for Recorder<F> {
    fn handle_event(&mut self, now: Instant, event: SipEvent, endpoint: &mut Endpoint) {
        match event {
            SipEvent::Request {
                txn,
                dialog,
                request,
                source,
                ..
            } => {
                // For a new INVITE: the dialog our 2xx will create, known from the start.
                let dialog = dialog.or_else(|| endpoint.dialog_of(&txn));
                if let Some(reply) =
                    self.handle_request(now, &txn, dialog.as_ref(), &request, source)
                {
                    send_reply(now, endpoint, &txn, reply);
                }
            }
            SipEvent::Cancelled { txn } => {
                if let Some(key) = self.session_for_txn(&txn) {
                    self.end_session(now, &key, EndReason::Cancel, false);
                }
            }
            SipEvent::Acked { dialog } => {
                if let Some(key) = self.session_for_dialog(&dialog) {
                    if let Some(session) = self.sessions.get_mut(&key) {
                        session.phase = Phase::Confirmed;
                    }
                }
            }
            SipEvent::AckTimeout { dialog } => {
                if let Some(key) = self.session_for_dialog(&dialog) {
                    self.end_session(now, &key, EndReason::TransactionTimeout, false);
                }
            }
            // Our only UPDATEs are snapshot requests; a refusal is logged, never fatal (the
            // recording goes on with the metadata it has).
            SipEvent::RequestCompleted {
                dialog,
                method: Method::Update,
                response,
            } => match response.map(|r| r.status_code.code()) {
                Some(491) if self.back_off_snapshot(now, &dialog) => {}
                Some(code @ 200..=299) => {
                    self.snapshots_in_flight.remove(&dialog);
                    debug!(call_id = %dialog.call_id, code, "snapshot request accepted");
                }
                Some(code) => {
                    self.snapshots_in_flight.remove(&dialog);
                    self.counters.snapshot_requests_failed += 1;
                    warn!(call_id = %dialog.call_id, code, "snapshot request refused");
                }
                None => {
                    self.snapshots_in_flight.remove(&dialog);
                    self.counters.snapshot_requests_failed += 1;
                    warn!(call_id = %dialog.call_id, "snapshot request unanswered");
                }
            },
            _ => {}
        }
        self.flush(now, endpoint);
    }

    fn handle_timeout(&mut self, now: Instant, endpoint: &mut Endpoint) {
        self.on_timeout(now);
        self.queue_snapshot_retries(now);
        self.flush(now, endpoint);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_deadline()
    }
}

/// What a session's timer found due.
enum SessionDue {
    Expired,
    Idle,
}

/// Whether a `Recorder::timers` entry still stands for its session's deadline.
fn timer_is_current(
    sessions: &BTreeMap<SessionKey, Session>,
    at: Instant,
    key: &SessionKey,
) -> bool {
    sessions.get(key).is_some_and(|s| s.armed_at == Some(at))
}

/// Turns a [`Reply`] into a response on its transaction.
fn send_reply(now: Instant, endpoint: &mut Endpoint, txn: &TxnId, reply: Reply) {
    let Some(mut response) = endpoint.make_response(txn, reply.status, Some(&reply.reason)) else {
        debug!(status = reply.status, "transaction gone before its answer");
        return;
    };
    for (name, value) in reply.headers {
        if name.eq_ignore_ascii_case("Contact") {
            mark_srs_contact(&mut response.headers, value);
        } else {
            response.headers.push(Header::Other(name, value));
        }
    }
    if let Some((content_type, body)) = reply.body {
        response
            .headers
            .push(Header::ContentType(rsip::headers::ContentType::new(
                content_type,
            )));
        response.body = body;
    }
    if let Err(e) = endpoint.respond(now, txn, response) {
        warn!(error = %e, "sending response failed");
    }
}

/// Our Contact must carry `+sip.srs` (RFC 7866 §6.2): keep the endpoint's Contact and add the
/// tag if its configuration did not; use `ours` when the endpoint added none.
fn mark_srs_contact(headers: &mut rsip::Headers, ours: String) {
    let mut found = false;
    for h in headers.iter_mut() {
        if let Header::Contact(c) = h {
            found = true;
            let value = c.value().to_string();
            if !value.to_ascii_lowercase().contains("+sip.srs") {
                *h = Header::Contact(rsip::headers::Contact::new(format!("{value};+sip.srs")));
            }
        }
    }
    if !found {
        headers.push(Header::Contact(rsip::headers::Contact::new(
            ours.trim_end_matches(";+sip.srs").to_string() + ";+sip.srs",
        )));
    }
}

/// RFC 4028 session timer granted to a session.
struct SessionTimer {
    interval: Duration,
    /// The client asked us to refresh; we never send refreshes, so we do not enforce expiry.
    refresher_uas: bool,
    uac_supports: bool,
}

impl SessionTimer {
    fn header_value(&self) -> String {
        let refresher = if self.refresher_uas { "uas" } else { "uac" };
        format!("{};refresher={refresher}", self.interval.as_secs())
    }

    fn deadline(&self, now: Instant) -> Option<Instant> {
        (!self.refresher_uas).then(|| now + self.interval)
    }
}

fn options_reply() -> Reply {
    Reply::new(200, "OK")
        .header("Allow", ALLOW)
        .header("Accept", ACCEPT)
        .header("Supported", "siprec, timer")
}

/// `Reason` header value (RFC 3326) of the BYEs we send.
fn bye_reason(reason: &EndReason) -> String {
    let text = match reason {
        EndReason::Timeout => "Recording session timed out",
        EndReason::Operator => "Recording stopped by operator",
        EndReason::Shutdown => "Recorder shutting down",
        _ => "Recording ended",
    };
    format!("SIP;cause=200;text=\"{text}\"")
}

/// Recording id: UTC start time plus a random suffix, e.g. `20261124T081500Z-3fa2c1d9`.
fn recording_id() -> RecordingId {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:08x}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        rand::random::<u32>()
    )
}

/// `true` if the ACL is empty or a network in it contains `ip`.
fn acl_allows(acl: &[(IpAddr, u8)], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    acl.is_empty()
        || acl.iter().any(|&(net, prefix)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_match(&n.octets(), &a.octets(), prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_match(&n.octets(), &a.octets(), prefix),
            _ => false,
        })
}

fn prefix_match(net: &[u8], addr: &[u8], prefix: u8) -> bool {
    let bits = usize::from(prefix).min(net.len() * 8);
    let (full, rest) = (bits / 8, bits % 8);
    if net[..full] != addr[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[full] & mask == addr[full] & mask
    }
}

/// Name and value of each header line (whatever rsip typed it as).
fn header_lines(headers: &rsip::Headers) -> impl Iterator<Item = (String, String)> + '_ {
    headers.iter().filter_map(|h| {
        let text = h.to_string();
        let (name, value) = text.split_once(':')?;
        Some((name.trim().to_string(), value.trim().to_string()))
    })
}

/// The first value of a header.
fn header_value(headers: &rsip::Headers, name: &str) -> Option<String> {
    header_lines(headers)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Comma-separated tokens of every header line with this name.
fn header_tokens(headers: &rsip::Headers, name: &str) -> Vec<String> {
    header_lines(headers)
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `tag` parameter of a From/To header value.
fn tag_of(value: &str) -> Option<String> {
    // Parameters follow the URI: after '>' when it is bracketed.
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value.split_once(';').map_or("", |(_, p)| p),
    };
    params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("tag"))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn to_tag(headers: &rsip::Headers) -> Option<String> {
    header_value(headers, "To").and_then(|v| tag_of(&v))
}

fn session_key(headers: &rsip::Headers) -> Option<SessionKey> {
    let call_id = header_value(headers, "Call-ID").filter(|c| !c.is_empty())?;
    // RFC 2543 clients may send no From tag; the endpoint keys their dialog by an empty one.
    let from_tag = header_value(headers, "From")?;
    let from_tag = tag_of(&from_tag).unwrap_or_default();
    Some(SessionKey { call_id, from_tag })
}

/// A 400 for a request the acceptance policy refuses, naming what is missing in a
/// `Warning: 399` (RFC 3261 §20.43 miscellaneous warning), as PJSIP's SRS does.
fn policy_reject(request: &Request, what: &str, cause: &'static str) -> Reject {
    let host = request.uri.host_with_port.to_string();
    Reject::new(400, format!("Bad Request: {what}"), cause)
        .header("Warning", format!("399 {host} \"{what}\""))
}

/// Whether a Contact carries the SRC feature tag: `+sip.src`, or legacy `src`, quoted or not.
fn has_src_feature(request: &Request) -> bool {
    header_lines(&request.headers)
        .filter(|(n, _)| n.eq_ignore_ascii_case("Contact"))
        .any(|(_, value)| {
            let params = value.rfind('>').map_or(value.as_str(), |i| &value[i + 1..]);
            params.split(';').any(|p| {
                let name = p.split('=').next().unwrap_or("").trim().trim_matches('"');
                name.eq_ignore_ascii_case("+sip.src") || name.eq_ignore_ascii_case("src")
            })
        })
}

/// The SDP and metadata of a request body, or the rejection it deserves.
fn parse_body(request: &Request) -> Result<RecordingBody, Reject> {
    if request.body.is_empty() {
        return Ok(RecordingBody::default());
    }
    let content_type = header_value(&request.headers, "Content-Type");
    split_body(content_type.as_deref(), &request.body).map_err(|e| match e {
        BodyError::UnsupportedType(t) => Reject::new(
            415,
            format!("Unsupported Media Type: {t}"),
            "unsupported_media_type",
        )
        .header("Accept", ACCEPT),
        BodyError::TooLarge { .. } => Reject::new(413, "Request Entity Too Large", "too_large"),
        e => Reject::new(400, format!("Bad body: {e}"), "bad_body"),
    })
}

fn parse_metadata_body(xml: &str) -> Result<MetadataDoc, Reject> {
    parse_metadata(xml).map_err(|e| Reject::new(400, format!("Bad metadata: {e}"), "bad_metadata"))
}

/// The codec we would answer for a stream, or `None` if the stream is unusable (port 0,
/// transport we cannot receive, SRTP without usable keys, no codec).
fn usable_codec(stream: &OfferStream) -> Option<Codec> {
    if stream.is_usable() {
        choose_codec(stream)
    } else {
        None
    }
}

fn stream_label(stream: &OfferStream) -> String {
    stream
        .label
        .clone()
        .unwrap_or_else(|| stream.index.to_string())
}

fn stream_paused(stream: &OfferStream) -> bool {
    matches!(stream.direction, Direction::Inactive | Direction::RecvOnly)
}

fn stream_remote(stream: &OfferStream) -> Option<SocketAddr> {
    stream.connection.map(|ip| SocketAddr::new(ip, stream.port))
}

/// Where the client's RTCP comes from: `a=rtcp`, else RTP port + 1 (RFC 3550 §11).
fn rtcp_remote(stream: &OfferStream) -> Option<SocketAddr> {
    let ip = stream.connection?;
    match stream.rtcp {
        Some((port, addr)) => Some(SocketAddr::new(addr.unwrap_or(ip), port)),
        None => Some(SocketAddr::new(ip, stream.port.checked_add(1)?)),
    }
}

/// Our answer for each offered m-line, in order. SRTP streams keep the `a=crypto` of the
/// previous answer, so a re-answer does not change our keys.
fn answers_for(offer: &Offer, slots: &[Slot], previous: &[StreamAnswer]) -> Vec<StreamAnswer> {
    offer
        .streams
        .iter()
        .enumerate()
        .map(|(i, stream)| match slots.get(i).and_then(Option::as_ref) {
            Some(info) => {
                // Our previous answer stands while it answers the same offered tag and suite.
                let crypto = stream
                    .is_srtp()
                    .then(|| match (previous.get(i), &info.sdes) {
                        (
                            Some(StreamAnswer::Accept {
                                crypto: Some(c), ..
                            }),
                            Some(chosen),
                        ) if c.starts_with(&format!("{} {} ", chosen.tag, chosen.suite.name())) => {
                            Some(c.clone())
                        }
                        _ => answer_crypto(&stream.crypto),
                    });
                StreamAnswer::Accept {
                    port: info.local_port,
                    rtcp_port: info.rtcp_port,
                    codec: info.codec.clone(),
                    telephone_event: stream.telephone_event.clone(),
                    direction: stream.direction.answer(info.paused),
                    label: stream.label.clone(),
                    crypto: crypto.flatten(),
                }
            }
            None => StreamAnswer::Reject,
        })
        .collect()
}

/// Keeps ids learned earlier when a later request does not repeat them.
fn merge_call_ids(old: &mut CallIds, fresh: CallIds) {
    if fresh.call_uuid.is_some() {
        old.call_uuid = fresh.call_uuid;
        old.call_uuid_source = fresh.call_uuid_source;
    }
    if fresh.connection_id.is_some() {
        old.connection_id = fresh.connection_id;
    }
    for pair in fresh.extra {
        if !old.extra.contains(&pair) {
            old.extra.push(pair);
        }
    }
}

#[path = "handover.rs"]
mod handover;
pub use handover::{HandoverError, RecorderHandover, HANDOVER_VERSION};

#[cfg(test)]
#[path = "handover_tests.rs"]
mod handover_tests;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::flow::{FlowError, MemoryFlows};

    /// MemoryFlows plus packet counters the tests set, for the idle timeout.
    #[derive(Default)]
    pub(super) struct TestFlows {
        pub(super) table: MemoryFlows,
        pub(super) packets: HashMap<u64, u64>,
        /// Refuse to pin anything (a table that fails).
        pub(super) refuse: bool,
    }

    impl FlowControl for TestFlows {
        fn insert(&mut self, spec: FlowSpec) -> Result<u32, FlowError> {
            if self.refuse {
                return Err(FlowError::NotFound(spec.local));
            }
            self.table.insert(spec)
        }
        fn rewrite(&mut self, old_local: SocketAddr, new: FlowSpec) -> Result<u32, FlowError> {
            if self.refuse {
                return Err(FlowError::NotFound(old_local));
            }
            self.table.rewrite(old_local, new)
        }
        fn remove(&mut self, local: SocketAddr) -> Result<(), FlowError> {
            self.table.remove(local)
        }
        fn lookup(&self, local: SocketAddr) -> Option<(FlowSpec, u32)> {
            self.table.lookup(local)
        }
        fn packets(&self, flow_id: u64) -> u64 {
            self.packets.get(&flow_id).copied().unwrap_or(0)
        }
    }

    pub(super) const MEDIA: [u8; 4] = [10, 20, 0, 50];
    pub(super) const CLIENT: &str = "10.20.0.10:5060";

    pub(super) fn config() -> SiprecConfig {
        SiprecConfig {
            media_address: IpAddr::from(MEDIA),
            rtp_ports: (40000, 40099),
            ..SiprecConfig::default()
        }
    }

    pub(super) const SDP_7: &str =
        "v=0\r\no=SRC 700100 1 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 31000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=label:1\r\na=sendonly\r\n\
m=audio 31002 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=label:2\r\na=sendonly\r\n";

    pub(super) const META_7: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <group group_id="Q2dXbH1xTr6yb0f8kP3aJg==">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </group>
  <session session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <sipSessionID>3b9f0e6a1d2c4e5fa6b7c8d9e0f1a2b3;remote=8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f</sipSessionID>
    <group-ref>Q2dXbH1xTr6yb0f8kP3aJg==</group-ref>
    <start-time>2025-03-04T10:15:02Z</start-time>
  </session>
  <participant participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==">
    <nameID aor="sip:+493012345678@carrier.example"><name xml:lang="en">Customer</name></nameID>
  </participant>
  <participant participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
    <nameID aor="sip:7002@cc.example"><name xml:lang="en">Agent 7002</name></nameID>
  </participant>
  <stream stream_id="s1Fw9uR3Q7iL2c8Vb4NxEw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><label>1</label></stream>
  <stream stream_id="s2Kp7eT5W1oN6d3Ym8ZqJw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><label>2</label></stream>
  <sessionrecordingassoc session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </sessionrecordingassoc>
  <participantsessionassoc participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <associate-time>2025-03-04T10:15:02Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id="c1D1yJ2oQ0yC4n7Zp8LhSw==">
    <send>s1Fw9uR3Q7iL2c8Vb4NxEw==</send>
    <recv>s2Kp7eT5W1oN6d3Ym8ZqJw==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
    <send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
    <recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
  </participantstreamassoc>
</recording>
"#;

    pub(super) const SDP_8: &str =
        "v=0\r\no=SRC 700100 2 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 31000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\na=label:1\r\na=sendonly\r\n\
m=audio 31010 RTP/AVP 18 101\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=label:2\r\na=sendonly\r\n";

    pub(super) const META_8: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>partial</datamode>
  <participant participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==">
    <nameID aor="sip:7003@cc.example"><name xml:lang="en">Agent 7003</name></nameID>
  </participant>
  <participantsessionassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantsessionassoc>
  <participantsessionassoc participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==" session_id="mT0b4zR8Sxq1dQm5n9VqKw==">
    <associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantsessionassoc>
  <participantstreamassoc participant_id="a2D2wX6kT1mB9s3Yh5GfRg==">
    <disassociate-time>2025-03-04T10:21:40Z</disassociate-time>
  </participantstreamassoc>
  <participantstreamassoc participant_id="d3Hq2sK8V0nC5b1Xt7JmPw==">
    <send>s2Kp7eT5W1oN6d3Ym8ZqJw==</send>
    <recv>s1Fw9uR3Q7iL2c8Vb4NxEw==</recv>
    <associate-time>2025-03-04T10:21:40Z</associate-time>
  </participantstreamassoc>
</recording>
"#;

    /// A two-part SIPREC body (SDP + metadata).
    pub(super) fn multipart(sdp: &str, xml: &str) -> (String, String) {
        let body = format!(
            "--rsb-42\r\nContent-Type: application/sdp\r\nContent-Disposition: session;handling=required\r\n\r\n{sdp}\r\n\
--rsb-42\r\nContent-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n\r\n{xml}\r\n--rsb-42--\r\n"
        );
        ("multipart/mixed;boundary=rsb-42".to_string(), body)
    }

    /// A two-stream SDP offer with our choice of ports, direction and source address.
    pub(super) fn sdp(version: u32, ports: &[u16], direction: &str) -> String {
        let mut s = format!(
            "v=0\r\no=SRC 700100 {version} IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n"
        );
        for (i, port) in ports.iter().enumerate() {
            s += &format!(
                "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=label:{}\r\na={direction}\r\n",
                i + 1
            );
        }
        s
    }

    /// What a test request looks like before it is written out.
    pub(super) struct Req<'a> {
        pub(super) method: &'a str,
        pub(super) call_id: &'a str,
        pub(super) from_tag: &'a str,
        pub(super) to_tag: Option<&'a str>,
        pub(super) cseq: u32,
        pub(super) headers: Vec<String>,
        pub(super) body: Option<(String, String)>,
    }

    impl<'a> Req<'a> {
        pub(super) fn new(method: &'a str, call_id: &'a str) -> Self {
            Self {
                method,
                call_id,
                from_tag: "sbc-7731",
                to_tag: None,
                cseq: 1,
                headers: Vec::new(),
                body: None,
            }
        }

        pub(super) fn siprec(mut self) -> Self {
            self.headers
                .push("Contact: <sip:src@10.20.0.10:5060>;+sip.src".into());
            self.headers.push("Require: siprec".into());
            self
        }

        pub(super) fn header(mut self, line: &str) -> Self {
            self.headers.push(line.to_string());
            self
        }

        pub(super) fn body(mut self, content_type: &str, body: &str) -> Self {
            self.body = Some((content_type.to_string(), body.to_string()));
            self
        }

        pub(super) fn in_dialog(mut self, tag: &'a str, cseq: u32) -> Self {
            self.to_tag = Some(tag);
            self.cseq = cseq;
            self
        }

        pub(super) fn text(&self, branch: u64) -> String {
            let to = match self.to_tag {
                Some(tag) => format!("<sip:srs@10.20.0.50>;tag={tag}"),
                None => "<sip:srs@10.20.0.50>".to_string(),
            };
            let cseq_method = if self.method == "ACK" {
                "ACK"
            } else {
                self.method
            };
            let mut s = format!(
                "{} sip:srs@10.20.0.50:5060;transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP {CLIENT};branch=z9hG4bK-{branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:src@sbc1.cc.example>;tag={}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {} {cseq_method}\r\n",
                self.method, self.from_tag, self.call_id, self.cseq
            );
            if !self.headers.iter().any(|h| h.starts_with("Contact:")) {
                s += "Contact: <sip:src@10.20.0.10:5060>\r\n";
            }
            for h in &self.headers {
                s += h;
                s += "\r\n";
            }
            match &self.body {
                Some((ct, body)) => {
                    s += &format!(
                        "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
                None => s += "Content-Length: 0\r\n\r\n",
            }
            s
        }
    }

    pub(super) type Events = Arc<Mutex<Vec<SessionEvent>>>;

    /// Recorder + real endpoint on virtual time, over one TCP connection.
    pub(super) struct Harness {
        pub(super) rec: Recorder<TestFlows>,
        pub(super) ep: Endpoint,
        pub(super) now: Instant,
        pub(super) events: Events,
        pub(super) branch: u64,
        /// Status lines of the final responses sent (rsip drops reason phrases of known codes).
        pub(super) status_lines: Vec<String>,
    }

    impl Harness {
        pub(super) fn new(config: SiprecConfig) -> Self {
            let events: Events = Arc::default();
            let sink = events.clone();
            let rec = Recorder::new(
                config,
                TestFlows::default(),
                Box::new(move |e| sink.lock().unwrap().push(e)),
            );
            let ep = Endpoint::new(crate::sip::EndpointConfig {
                contact_host: "10.20.0.50".into(),
                contact_params: vec!["+sip.srs".into()],
                ..Default::default()
            });
            Self {
                rec,
                ep,
                now: Instant::now(),
                events,
                branch: 0,
                status_lines: Vec::new(),
            }
        }

        /// Delivers a request (fresh Via branch) and returns every message sent back.
        pub(super) fn send(&mut self, req: &Req) -> Vec<rsip::SipMessage> {
            self.branch += 1;
            let text = req.text(self.branch);
            self.send_raw(&text)
        }

        pub(super) fn send_raw(&mut self, text: &str) -> Vec<rsip::SipMessage> {
            self.ep.handle_incoming(
                self.now,
                crate::sip::Incoming {
                    transport: crate::sip::Transport::Tcp,
                    source: CLIENT.parse().unwrap(),
                    local: "10.20.0.50:5060".parse().unwrap(),
                    connection: Some(1),
                    bytes: bytes::Bytes::copy_from_slice(text.as_bytes()),
                },
            );
            self.pump()
        }

        /// Hands endpoint events to the recorder until both are quiet; returns what was sent.
        pub(super) fn pump(&mut self) -> Vec<rsip::SipMessage> {
            let mut out = Vec::new();
            loop {
                let mut busy = false;
                while let Some(event) = self.ep.poll_event() {
                    busy = true;
                    self.rec.handle_event(self.now, event, &mut self.ep);
                }
                while let Some(t) = self.ep.poll_transmit() {
                    busy = true;
                    let line = String::from_utf8_lossy(&t.bytes)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if line.starts_with("SIP/2.0 ") && !line.starts_with("SIP/2.0 1") {
                        self.status_lines.push(line);
                    }
                    out.push(rsip::SipMessage::try_from(&t.bytes[..]).expect("we send valid SIP"));
                }
                if !busy {
                    return out;
                }
            }
        }

        /// Moves virtual time forward, firing every timer due on the way.
        pub(super) fn advance(&mut self, by: Duration) -> Vec<rsip::SipMessage> {
            let target = self.now + by;
            let mut out = Vec::new();
            loop {
                let next = [self.ep.poll_timeout(), self.rec.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                match next {
                    Some(at) if at <= target => {
                        self.now = self.now.max(at);
                        self.ep.handle_timeout(self.now);
                        self.rec.handle_timeout(self.now, &mut self.ep);
                        out.extend(self.pump());
                    }
                    _ => break,
                }
            }
            self.now = target;
            out
        }

        pub(super) fn take_events(&self) -> Vec<SessionEvent> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }

        /// INVITE, expect 200, ACK it. Returns the 200 and the recording id.
        pub(super) fn establish(&mut self, req: Req) -> (rsip::Response, String) {
            let resp = final_response(&self.send(&req));
            assert_eq!(resp.status_code.code(), 200, "{resp}");
            let tag = to_tag(&resp.headers).expect("200 has a To tag");
            self.send(&ack(req.call_id, req.from_tag, &tag, req.cseq));
            let id = match self.take_events().first() {
                Some(SessionEvent::Started { id, .. }) => id.clone(),
                other => panic!("expected Started, got {other:?}"),
            };
            (resp, id)
        }

        /// (flow id, generation, remote) pinned at a local port.
        pub(super) fn flow(&self, port: u16) -> Option<(u64, u32, Option<SocketAddr>)> {
            self.rec
                .flows()
                .table
                .flows
                .get(&SocketAddr::new(IpAddr::from(MEDIA), port))
                .map(|(spec, generation)| (spec.flow_id, *generation, spec.remote))
        }
    }

    pub(super) fn ack<'a>(
        call_id: &'a str,
        from_tag: &'a str,
        to_tag: &'a str,
        cseq: u32,
    ) -> Req<'a> {
        let mut r = Req::new("ACK", call_id).in_dialog(to_tag, cseq);
        r.from_tag = from_tag;
        r
    }

    pub(super) fn responses(msgs: &[rsip::SipMessage]) -> Vec<&rsip::Response> {
        msgs.iter()
            .filter_map(|m| match m {
                rsip::SipMessage::Response(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The final response among what was sent.
    pub(super) fn final_response(msgs: &[rsip::SipMessage]) -> rsip::Response {
        responses(msgs)
            .into_iter()
            .rev()
            .find(|r| r.status_code.code() >= 200)
            .cloned()
            .unwrap_or_else(|| panic!("no final response in {msgs:?}"))
    }

    pub(super) fn requests(msgs: &[rsip::SipMessage]) -> Vec<&rsip::Request> {
        msgs.iter()
            .filter_map(|m| match m {
                rsip::SipMessage::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub(super) fn body(resp: &rsip::Response) -> String {
        String::from_utf8(resp.body.clone()).unwrap()
    }

    /// Ports of the m-lines of an SDP, in order.
    pub(super) fn m_ports(sdp: &str) -> Vec<u16> {
        sdp.lines()
            .filter_map(|l| l.strip_prefix("m="))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect()
    }

    /// The `o=` version of an SDP.
    pub(super) fn o_version(sdp: &str) -> u64 {
        let o = sdp.lines().find_map(|l| l.strip_prefix("o=")).unwrap();
        o.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    /// Lines of the m-section `index` (0-based).
    pub(super) fn m_section(sdp: &str, index: usize) -> Vec<String> {
        let mut sections: Vec<Vec<String>> = Vec::new();
        for line in sdp.lines() {
            if line.starts_with("m=") {
                sections.push(Vec::new());
            }
            if let Some(s) = sections.last_mut() {
                s.push(line.trim().to_string());
            }
        }
        sections.get(index).cloned().unwrap_or_default()
    }

    pub(super) fn spec_invite() -> Req<'static> {
        let (ct, b) = multipart(SDP_7, META_7);
        Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
            .siprec()
            .header("Supported: timer, replaces")
            .header("Session-Expires: 1800;refresher=uac")
            .header("Min-SE: 90")
            .header("X-Genesys-CallUUID: 0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A")
            .body(&ct, &b)
    }

    pub(super) fn status(h: &mut Harness, req: &Req) -> (u16, rsip::Response) {
        let r = final_response(&h.send(req));
        (r.status_code.code(), r)
    }

    #[test]
    fn plain_session_is_answered_pinned_and_ended_by_bye() {
        let mut h = Harness::new(config());
        let req = spec_invite();
        let (resp, id) = {
            let resp = final_response(&h.send(&req));
            assert_eq!(resp.status_code.code(), 200, "{resp}");
            let events = h.take_events();
            let Some(SessionEvent::Started {
                id,
                ids,
                streams,
                participants,
                metadata,
                ..
            }) = events.first()
            else {
                panic!("expected Started, got {events:?}");
            };
            assert_eq!(ids.sip_call_id, "rs-0c6e2b11@10.20.0.10");
            assert_eq!(
                ids.call_uuid.as_deref(),
                Some("0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A")
            );
            assert_eq!(streams.len(), 2);
            assert_eq!(participants.len(), 2);
            let metadata = metadata.as_ref().expect("metadata version 1");
            assert_eq!((metadata.version, metadata.method.as_str()), (1, "INVITE"));
            assert_eq!(metadata.xml.trim(), META_7.trim());
            // Recording id: UTC timestamp + random suffix.
            let (stamp, suffix) = id.split_once('-').unwrap();
            assert_eq!((stamp.len(), suffix.len()), (16, 8), "{id}");
            assert!(stamp.ends_with('Z') && stamp.as_bytes()[8] == b'T', "{id}");
            // Streams pinned at the ports we answered, with distinct flow ids.
            let sdp = body(&resp);
            let ports = m_ports(&sdp);
            assert_eq!(
                ports,
                streams.iter().map(|s| s.local_port).collect::<Vec<_>>()
            );
            for s in streams {
                assert_eq!(h.flow(s.local_port).map(|f| f.0), Some(s.flow_id));
                let rtcp = s.rtcp_port.expect("no rtcp-mux offered: RTCP port");
                assert_eq!(rtcp, s.local_port + 1);
                assert_eq!(h.flow(rtcp).map(|f| f.0), s.rtcp_flow_id);
                assert_eq!(s.codec.name, "PCMA");
                assert!(!s.paused);
            }
            assert_eq!(h.rec.flows().table.flows.len(), 4);
            (resp, id.clone())
        };
        let contact = header_value(&resp.headers, "Contact").unwrap();
        assert!(contact.contains("+sip.srs"), "{contact}");
        assert!(header_tokens(&resp.headers, "Require").contains(&"siprec".to_string()));
        assert_eq!(
            header_value(&resp.headers, "Session-Expires").as_deref(),
            Some("1800;refresher=uac")
        );
        assert!(header_value(&resp.headers, "Content-Type")
            .unwrap()
            .contains("application/sdp"));
        let sdp = body(&resp);
        for (i, label) in ["1", "2"].iter().enumerate() {
            let m = m_section(&sdp, i);
            assert!(m.contains(&"a=recvonly".to_string()), "{m:?}");
            assert!(m.contains(&format!("a=label:{label}")), "{m:?}");
            assert!(m[0].contains(" 8"), "PCMA answered: {m:?}");
        }
        let tag = to_tag(&resp.headers).unwrap();
        h.send(&ack(req.call_id, req.from_tag, &tag, 1));
        assert!(h.rec.sessions()[0].confirmed);

        let bye = Req::new("BYE", req.call_id)
            .in_dialog(&tag, 2)
            .header("Reason: Q.850;cause=16");
        let (code, _) = status(&mut h, &bye);
        assert_eq!(code, 200);
        assert!(h.rec.flows().table.flows.is_empty());
        assert!(h.rec.sessions().is_empty());
        let events = h.take_events();
        assert!(
            matches!(&events[..], [SessionEvent::Ended { id: e, reason: EndReason::Bye { reason: Some(r) }, .. }]
                if *e == id && r == "Q.850;cause=16"),
            "{events:?}"
        );
        assert_eq!(h.rec.counters().sessions_ended.get("bye"), Some(&1));
    }

    #[test]
    fn strict_acceptance_policy_answers_400_with_a_warning_naming_the_gap() {
        let mut h = Harness::new(SiprecConfig {
            require_siprec_tag: true,
            require_metadata: true,
            require_label: true,
            ..config()
        });
        let unlabelled = sdp(1, &[20000], "sendonly").replace("a=label:1\r\n", "");
        let (ct, with_meta) = multipart(SDP_7, META_7);
        let (ct_nolabel, nolabel_meta) = multipart(&unlabelled, META_7);
        let cases = [
            (
                Req::new("INVITE", "p-1").body(&ct, &with_meta),
                "Require header must have the siprec option tag",
                "missing_siprec_tag",
            ),
            (
                Req::new("INVITE", "p-2")
                    .header("Require: siprec")
                    .header("Contact: <sip:src@10.20.0.10:5060>")
                    .body(&ct, &with_meta),
                "Contact must have the +sip.src feature tag",
                "missing_siprec_tag",
            ),
            (
                Req::new("INVITE", "p-3")
                    .siprec()
                    .body("application/sdp", &sdp(1, &[20000], "sendonly")),
                "INVITE must have a recording metadata part",
                "missing_metadata",
            ),
            (
                Req::new("INVITE", "p-4")
                    .siprec()
                    .body(&ct_nolabel, &nolabel_meta),
                "SDP must have label media attribute",
                "missing_label",
            ),
        ];
        for (req, what, cause) in &cases {
            let (code, resp) = status(&mut h, req);
            assert_eq!(code, 400, "{resp}");
            assert_eq!(
                header_value(&resp.headers, "Warning").as_deref(),
                Some(format!("399 10.20.0.50:5060 \"{what}\"").as_str()),
                "{resp}"
            );
            assert!(
                h.rec.counters().rejections.contains_key(&(400, *cause)),
                "{cause}"
            );
        }
        assert!(h.take_events().is_empty());
        assert!(h.rec.flows().table.flows.is_empty());

        // A conforming INVITE is recorded; a later unlabelled offer is refused, the session kept.
        let (resp, _) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
            .siprec()
            .in_dialog(&tag, 2)
            .body("application/sdp", &unlabelled.replace(" 1 IN", " 2 IN"));
        let (code, resp) = status(&mut h, &reinvite);
        assert_eq!(code, 400, "{resp}");
        assert_eq!(h.rec.sessions().len(), 1);
        assert!(h.take_events().is_empty());
    }

    #[test]
    fn inactive_first_answers_inactive_pins_flows_and_resumes_on_a_client_reoffer() {
        let mut h = Harness::new(SiprecConfig {
            answer_inactive: true,
            ..config()
        });
        let req = Req::new("INVITE", "inact-1")
            .siprec()
            .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
        let resp = final_response(&h.send(&req));
        assert_eq!(resp.status_code.code(), 200, "{resp}");
        let tag = to_tag(&resp.headers).unwrap();
        h.send(&ack("inact-1", "sbc-7731", &tag, 1));
        let answer = body(&resp);
        let ports = m_ports(&answer);
        assert_eq!(ports.len(), 2, "{answer}");
        for (i, port) in ports.iter().enumerate() {
            let section = m_section(&answer, i);
            assert!(section.contains(&"a=inactive".to_string()), "{answer}");
            assert!(!section.contains(&"a=recvonly".to_string()), "{answer}");
            assert!(h.flow(*port).is_some(), "flow of m-line {i} pinned");
        }
        let events = h.take_events();
        let [SessionEvent::Started { id, streams, .. }] = &events[..] else {
            panic!("{events:?}");
        };
        assert!(streams.iter().all(|s| s.paused), "{streams:?}");

        // The client re-offers (same media, o= bumped): recording starts.
        let reinvite = Req::new("INVITE", "inact-1")
            .siprec()
            .in_dialog(&tag, 2)
            .body("application/sdp", &sdp(2, &[20000, 20002], "sendonly"));
        let (code, resp) = status(&mut h, &reinvite);
        assert_eq!(code, 200, "{resp}");
        let answer = body(&resp);
        assert_eq!(m_ports(&answer), ports);
        for i in 0..2 {
            assert!(
                m_section(&answer, i).contains(&"a=recvonly".to_string()),
                "{answer}"
            );
        }
        let resumed: Vec<_> = h
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                SessionEvent::Resumed { id: rid, label, .. } if rid == *id => Some(label),
                _ => None,
            })
            .collect();
        assert_eq!(resumed, vec!["1".to_string(), "2".to_string()]);
    }

    #[test]
    fn plain_sdp_invite_without_metadata_is_recorded() {
        let mut h = Harness::new(config());
        let req =
            Req::new("INVITE", "nbr-1@cube").body("application/sdp", &sdp(1, &[20000], "sendonly"));
        let resp = final_response(&h.send(&req));
        assert_eq!(resp.status_code.code(), 200, "{resp}");
        assert!(header_value(&resp.headers, "Require").is_none());
        assert!(header_value(&resp.headers, "Session-Expires").is_none());
        let events = h.take_events();
        let [SessionEvent::Started {
            streams,
            participants,
            metadata,
            ids,
            ..
        }] = &events[..]
        else {
            panic!("{events:?}");
        };
        assert_eq!((streams.len(), participants.len(), metadata), (1, 0, &None));
        assert_eq!(ids.sip_call_id, "nbr-1@cube");
        assert_eq!(streams[0].label, "1");
        assert_eq!(m_ports(&body(&resp)), vec![streams[0].local_port]);
    }

    #[test]
    fn reinvite_moves_a_stream_and_keeps_the_recording() {
        let mut h = Harness::new(config());
        let req = spec_invite();
        let (resp, id) = h.establish(req);
        let tag = to_tag(&resp.headers).unwrap();
        let ports = m_ports(&body(&resp));
        let before: Vec<_> = ports.iter().map(|p| h.flow(*p).unwrap()).collect();

        let (ct, b) = multipart(SDP_8, META_8);
        let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
            .in_dialog(&tag, 2)
            .header("Session-Expires: 1800;refresher=uac")
            .body(&ct, &b);
        let (code, resp2) = status(&mut h, &reinvite);
        assert_eq!(code, 200, "{resp2}");
        h.send(&ack(reinvite.call_id, reinvite.from_tag, &tag, 2));
        let sdp2 = body(&resp2);
        assert_eq!(m_ports(&sdp2), ports, "local ports stay");
        assert_eq!(o_version(&sdp2), o_version(&body(&resp)) + 1);
        assert!(
            m_section(&sdp2, 1)[0].contains(" 18"),
            "G.729 answered: {sdp2}"
        );

        // Label 1 untouched; label 2 rewritten in place (same key and flow id, next generation).
        assert_eq!(h.flow(ports[0]), Some(before[0]));
        let (flow_id, generation, _) = h.flow(ports[1]).unwrap();
        assert_eq!((flow_id, generation), (before[1].0, before[1].1 + 1));

        let events = h.take_events();
        assert!(events.iter().all(|e| e.recording_id() == id), "{events:?}");
        let streams = events
            .iter()
            .find_map(|e| match e {
                SessionEvent::MediaChanged { streams, .. } => Some(streams.clone()),
                _ => None,
            })
            .expect("MediaChanged");
        assert_eq!(streams[1].codec.name, "G729");
        assert_eq!(streams[1].remote, Some("10.20.0.10:31010".parse().unwrap()));
        assert_eq!(streams[0].codec.name, "PCMA");
        let (participants, metadata) = events
            .iter()
            .find_map(|e| match e {
                SessionEvent::ParticipantsChanged {
                    participants,
                    metadata,
                    ..
                } => Some((participants.clone(), metadata.clone())),
                _ => None,
            })
            .expect("ParticipantsChanged");
        assert_eq!(metadata.unwrap().version, 2);
        let by_aor = |aor: &str| {
            participants
                .iter()
                .find(|p| p.aor.as_deref().is_some_and(|a| a.contains(aor)))
                .unwrap_or_else(|| panic!("{aor} in {participants:?}"))
                .clone()
        };
        assert!(by_aor("7002").left_at.is_some());
        let joined = by_aor("7003");
        assert!(joined.joined_at.is_some() && joined.left_at.is_none());
        assert_eq!(h.rec.sessions()[0].id, id);
    }

    #[test]
    fn reinvite_adds_and_removes_streams() {
        let mut h = Harness::new(config());
        let req = Req::new("INVITE", "add-rm@src")
            .siprec()
            .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
        let (resp, _) = h.establish(req);
        let tag = to_tag(&resp.headers).unwrap();
        let ports = m_ports(&body(&resp));

        // Stream 1 goes (port 0), stream 2 stays, stream 3 is new.
        let offer = sdp(2, &[0, 20002, 20004], "sendonly");
        let reinvite = Req::new("INVITE", "add-rm@src")
            .in_dialog(&tag, 2)
            .body("application/sdp", &offer);
        let (code, resp2) = status(&mut h, &reinvite);
        assert_eq!(code, 200);
        let new_ports = m_ports(&body(&resp2));
        assert_eq!(new_ports.len(), 3);
        assert_eq!(new_ports[0], 0);
        assert_eq!(new_ports[1], ports[1]);
        assert!(new_ports[2] != 0 && !ports.contains(&new_ports[2]));
        assert!(h.flow(ports[0]).is_none() && h.flow(ports[0] + 1).is_none());
        assert!(h.flow(ports[1]).is_some() && h.flow(new_ports[2]).is_some());
        let events = h.take_events();
        let Some(SessionEvent::MediaChanged { streams, .. }) = events.last() else {
            panic!("{events:?}");
        };
        let labels: Vec<_> = streams.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["2", "3"]);
        assert_eq!(h.rec.sessions()[0].streams.len(), 2);
    }

    #[test]
    fn inactive_pauses_and_sendonly_resumes() {
        let mut h = Harness::new(config());
        let req = Req::new("INVITE", "pause@src")
            .siprec()
            .body("application/sdp", &sdp(1, &[20000, 20002], "sendonly"));
        let (resp, _) = h.establish(req);
        let tag = to_tag(&resp.headers).unwrap();

        let pause = Req::new("INVITE", "pause@src")
            .in_dialog(&tag, 2)
            .body("application/sdp", &sdp(2, &[20000, 20002], "inactive"));
        let (code, resp2) = status(&mut h, &pause);
        assert_eq!(code, 200);
        assert!(m_section(&body(&resp2), 0).contains(&"a=inactive".to_string()));
        let events = h.take_events();
        let paused: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Paused { label, .. } => Some(label.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(paused, ["1", "2"]);
        assert!(h.rec.sessions()[0].streams.iter().all(|s| s.paused));
        assert!(
            matches!(events.last(), Some(SessionEvent::MediaChanged { streams, .. }) if streams.iter().all(|s| s.paused)),
            "{events:?}"
        );

        let resume = Req::new("UPDATE", "pause@src")
            .in_dialog(&tag, 3)
            .body("application/sdp", &sdp(3, &[20000, 20002], "sendonly"));
        let (code, resp3) = status(&mut h, &resume);
        assert_eq!(code, 200);
        assert!(m_section(&body(&resp3), 1).contains(&"a=recvonly".to_string()));
        let events = h.take_events();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, SessionEvent::Resumed { .. }))
                .count(),
            2,
            "{events:?}"
        );
        assert!(h.rec.sessions()[0].streams.iter().all(|s| !s.paused));
    }

    #[test]
    fn offer_inactive_from_the_start_starts_paused() {
        let mut h = Harness::new(config());
        let req = Req::new("INVITE", "inactive@src")
            .body("application/sdp", &sdp(1, &[20000], "inactive"));
        let (resp, _) = h.establish(req);
        assert!(m_section(&body(&resp), 0).contains(&"a=inactive".to_string()));
        assert!(h.rec.sessions()[0].streams[0].paused);
    }

    #[test]
    fn cancel_before_answer_tears_down() {
        let mut h = Harness::new(SiprecConfig {
            answer_delay: Duration::from_secs(2),
            ..config()
        });
        let req = spec_invite();
        let sent = h.send(&req);
        assert!(
            responses(&sent).iter().all(|r| r.status_code.code() < 200),
            "{sent:?}"
        );
        assert_eq!(
            h.rec.flows().table.flows.len(),
            4,
            "pinned before the answer"
        );
        assert!(matches!(
            h.take_events().first(),
            Some(SessionEvent::Started { .. })
        ));

        // CANCEL carries the INVITE's branch.
        let invite_branch = h.branch;
        let sent = h.send_raw(&Req::new("CANCEL", req.call_id).text(invite_branch));
        let codes: Vec<u16> = responses(&sent)
            .iter()
            .map(|r| r.status_code.code())
            .collect();
        assert!(codes.contains(&200) && codes.contains(&487), "{codes:?}");
        assert!(h.rec.flows().table.flows.is_empty());
        assert!(h.rec.sessions().is_empty());
        let events = h.take_events();
        assert!(
            matches!(
                &events[..],
                [SessionEvent::Ended {
                    reason: EndReason::Cancel,
                    ..
                }]
            ),
            "{events:?}"
        );
        // Nothing is answered later.
        let later = h.advance(Duration::from_secs(5));
        assert!(
            responses(&later)
                .iter()
                .all(|r| r.status_code.code() != 200),
            "{later:?}"
        );
    }

    #[test]
    fn delayed_answer_is_sent_from_the_timer() {
        let mut h = Harness::new(SiprecConfig {
            answer_delay: Duration::from_millis(300),
            ..config()
        });
        let req = spec_invite();
        h.send(&req);
        let sent = h.advance(Duration::from_secs(1));
        let resp = final_response(&sent);
        assert_eq!(resp.status_code.code(), 200);
        let tag = to_tag(&resp.headers).unwrap();
        h.send(&ack(req.call_id, req.from_tag, &tag, 1));
        // The dialog is known: BYE works.
        let (code, _) = status(&mut h, &Req::new("BYE", req.call_id).in_dialog(&tag, 2));
        assert_eq!(code, 200);
        assert!(h.rec.flows().table.flows.is_empty());
    }

    #[test]
    fn error_responses() {
        let mut h = Harness::new(SiprecConfig {
            acl: vec![(IpAddr::from([10, 20, 0, 0]), 16)],
            ..config()
        });
        let ok = sdp(1, &[20000], "sendonly");
        let cases: Vec<(Req, u16, &str)> = vec![
            (
                Req::new("INVITE", "e-420")
                    .siprec()
                    .header("Require: foo, siprec")
                    .body("application/sdp", &ok),
                420,
                "",
            ),
            (
                Req::new("INVITE", "e-415")
                    .siprec()
                    .body("text/plain", "hello"),
                415,
                "",
            ),
            (
                Req::new("INVITE", "e-400-mp")
                    .siprec()
                    .body("multipart/mixed;boundary=zz", "--nope\r\nno boundary here"),
                400,
                "",
            ),
            (
                Req::new("INVITE", "e-400-sdp")
                    .siprec()
                    .body("application/sdp", "v=0\r\nm=audio banana\r\n"),
                400,
                "Bad SDP",
            ),
            (
                Req::new("INVITE", "e-400-xml").siprec().body(
                    "multipart/mixed;boundary=rsb-42",
                    &multipart(
                        &ok,
                        "<recording><participant participant_id=\"x\"></recording>",
                    )
                    .1,
                ),
                400,
                "",
            ),
            (Req::new("INVITE", "e-488-nosdp").siprec(), 488, ""),
            (
                Req::new("INVITE", "e-488-dtls").siprec().body(
                    "application/sdp",
                    "v=0\r\no=SRC 1 1 IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 20000 UDP/TLS/RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendonly\r\n",
                ),
                488,
                "",
            ),
            (
                Req::new("INVITE", "e-488-port0")
                    .siprec()
                    .body("application/sdp", &sdp(1, &[0, 0], "sendonly")),
                488,
                "",
            ),
            (
                Req::new("INVITE", "e-422")
                    .siprec()
                    .header("Session-Expires: 30")
                    .body("application/sdp", &ok),
                422,
                "",
            ),
            (Req::new("BYE", "e-481").in_dialog("nosuch", 2), 481, ""),
        ];
        for (req, want, phrase) in &cases {
            let (code, resp) = status(&mut h, req);
            assert_eq!(code, *want, "{}: {resp}", req.call_id);
            let line = h.status_lines.last().unwrap();
            assert!(line.contains(phrase), "{line}");
            match want {
                420 => assert_eq!(
                    header_value(&resp.headers, "Unsupported").as_deref(),
                    Some("foo")
                ),
                415 => assert!(header_value(&resp.headers, "Accept")
                    .unwrap()
                    .contains("application/sdp")),
                422 => assert_eq!(header_value(&resp.headers, "Min-SE").as_deref(), Some("90")),
                _ => {}
            }
        }
        assert!(h.rec.sessions().is_empty());
        assert!(
            h.rec.flows().table.flows.is_empty(),
            "no flow left by a rejection"
        );
        for code in [415, 400, 488, 422] {
            assert!(
                h.rec.counters().rejected(code) > 0,
                "{code} counted: {:?}",
                h.rec.counters()
            );
        }

        // ACL: a client outside 10.20/16.
        let mut text = Req::new("INVITE", "e-403")
            .siprec()
            .body("application/sdp", &ok)
            .text(999);
        text = text.replace(CLIENT, "192.0.2.1:5060");
        h.ep.handle_incoming(
            h.now,
            crate::sip::Incoming {
                transport: crate::sip::Transport::Tcp,
                source: "192.0.2.1:5060".parse().unwrap(),
                local: "10.20.0.50:5060".parse().unwrap(),
                connection: Some(2),
                bytes: bytes::Bytes::from(text),
            },
        );
        let resp = final_response(&h.pump());
        assert_eq!(resp.status_code.code(), 403);
        assert_eq!(h.rec.counters().rejected(403), 1);
    }

    #[test]
    fn session_limit_and_not_accepting_give_503_with_retry_after() {
        let mut h = Harness::new(SiprecConfig {
            max_sessions: 1,
            retry_after: 17,
            ..config()
        });
        h.establish(
            Req::new("INVITE", "one@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        let (code, resp) = status(
            &mut h,
            &Req::new("INVITE", "two@src").body("application/sdp", &sdp(1, &[20002], "sendonly")),
        );
        assert_eq!(code, 503);
        assert_eq!(
            header_value(&resp.headers, "Retry-After").as_deref(),
            Some("17")
        );
        assert_eq!(
            h.rec.counters().rejections.get(&(503, "session_limit")),
            Some(&1)
        );
        let json = serde_json::to_value(h.rec.counters()).unwrap();
        assert_eq!(json["rejections"]["503 session_limit"], 1);
        assert_eq!(json["sessions_started"], 1);

        let mut h = Harness::new(config());
        h.rec.set_accepting(false, "disk full");
        let (code, resp) = status(
            &mut h,
            &Req::new("INVITE", "three@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        assert_eq!(code, 503);
        let line = h.status_lines.last().unwrap();
        assert!(line.contains("disk full"), "{line}");
        assert!(header_value(&resp.headers, "Retry-After").is_some());
    }

    #[test]
    fn port_exhaustion_gives_503_and_cooldown_is_honoured() {
        // Room for exactly two RTP/RTCP pairs.
        let mut h = Harness::new(SiprecConfig {
            rtp_ports: (40000, 40003),
            port_cooldown: Duration::from_secs(10),
            ..config()
        });
        let two = sdp(1, &[20000, 20002], "sendonly");
        let (resp, _) = h.establish(Req::new("INVITE", "full@src").body("application/sdp", &two));
        let tag = to_tag(&resp.headers).unwrap();
        let (code, resp) = status(
            &mut h,
            &Req::new("INVITE", "more@src").body("application/sdp", &sdp(1, &[20004], "sendonly")),
        );
        assert_eq!(code, 503, "{resp}");
        assert!(header_value(&resp.headers, "Retry-After").is_some());
        assert_eq!(
            h.rec.counters().rejections.get(&(503, "ports_exhausted")),
            Some(&1)
        );

        let (code, _) = status(&mut h, &Req::new("BYE", "full@src").in_dialog(&tag, 2));
        assert_eq!(code, 200);
        // Released ports cool down: still no room.
        h.advance(Duration::from_secs(5));
        let (code, _) = status(
            &mut h,
            &Req::new("INVITE", "soon@src").body("application/sdp", &two),
        );
        assert_eq!(code, 503);
        assert!(
            h.rec.flows().table.flows.is_empty(),
            "a failed allocation leaves nothing pinned"
        );
        h.advance(Duration::from_secs(6));
        let (code, _) = status(
            &mut h,
            &Req::new("INVITE", "later@src").body("application/sdp", &two),
        );
        assert_eq!(code, 200);
    }

    #[test]
    fn idle_session_gets_bye_unless_rtp_flows() {
        let mut h = Harness::new(SiprecConfig {
            idle_timeout: Duration::from_secs(60),
            ..config()
        });
        let (resp, id) = h.establish(
            Req::new("INVITE", "idle@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        let flow_id = h.flow(m_ports(&body(&resp))[0]).unwrap().0;
        // RTP keeps it alive across two idle periods.
        h.rec.flows_mut().packets.insert(flow_id, 10);
        assert!(requests(&h.advance(Duration::from_secs(61))).is_empty());
        h.rec.flows_mut().packets.insert(flow_id, 20);
        assert!(requests(&h.advance(Duration::from_secs(61))).is_empty());
        assert_eq!(h.rec.sessions().len(), 1);
        // Then silence: the last RTP was seen after 61 s, so the BYE comes within a quarter of
        // the idle timeout after 61 + 60 s.
        let sent = h.advance(Duration::from_secs(15));
        let byes = requests(&sent);
        assert_eq!(byes.len(), 1, "{sent:?}");
        assert_eq!(byes[0].method, Method::Bye);
        assert!(h.rec.sessions().is_empty() && h.rec.flows().table.flows.is_empty());
        let events = h.take_events();
        assert!(
            matches!(&events[..], [SessionEvent::Ended { id: e, reason: EndReason::Timeout, .. }] if *e == id),
            "{events:?}"
        );
    }

    #[test]
    fn session_timer_expiry_sends_bye_and_refresh_extends_it() {
        let mut h = Harness::new(config());
        let req = Req::new("INVITE", "timer@src")
            .header("Supported: timer")
            .header("Session-Expires: 120;refresher=uac")
            .body("application/sdp", &sdp(1, &[20000], "sendonly"));
        let (resp, _) = h.establish(req);
        assert!(header_tokens(&resp.headers, "Require").contains(&"timer".to_string()));
        let tag = to_tag(&resp.headers).unwrap();
        h.advance(Duration::from_secs(100));
        // Refresh: an UPDATE without body.
        let (code, resp) = status(
            &mut h,
            &Req::new("UPDATE", "timer@src")
                .in_dialog(&tag, 2)
                .header("Session-Expires: 120;refresher=uac"),
        );
        assert_eq!(code, 200);
        assert!(resp.body.is_empty());
        assert!(
            requests(&h.advance(Duration::from_secs(100))).is_empty(),
            "refreshed at 100 s"
        );
        let sent = h.advance(Duration::from_secs(30));
        let byes = requests(&sent);
        assert_eq!(byes.len(), 1, "{sent:?}");
        assert_eq!(byes[0].method, Method::Bye);
        let events = h.take_events();
        assert!(matches!(
            events.last(),
            Some(SessionEvent::Ended {
                reason: EndReason::Timeout,
                ..
            })
        ));
    }

    #[test]
    fn in_dialog_methods_and_metadata_only_update() {
        let mut h = Harness::new(config());
        let (resp, _) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let call = "rs-0c6e2b11@10.20.0.10";
        let (code, resp) = status(
            &mut h,
            &Req::new("UPDATE", call)
                .in_dialog(&tag, 2)
                .body("application/rs-metadata+xml", META_8),
        );
        assert_eq!(code, 200, "{resp}");
        assert!(resp.body.is_empty());
        let events = h.take_events();
        assert!(
            matches!(&events[..], [SessionEvent::ParticipantsChanged { metadata: Some(m), .. }] if m.version == 2 && m.method == "UPDATE"),
            "{events:?}"
        );
        assert_eq!(
            status(&mut h, &Req::new("INFO", call).in_dialog(&tag, 3)).0,
            200
        );
        let (code, resp) = status(&mut h, &Req::new("REFER", call).in_dialog(&tag, 4));
        assert_eq!(code, 405);
        assert!(header_value(&resp.headers, "Allow").is_some());
        // re-INVITE without SDP: our current SDP again, version bumped, same ports.
        let ports = h.rec.sessions()[0]
            .streams
            .iter()
            .map(|s| s.local_port)
            .collect::<Vec<_>>();
        let (code, resp) = status(&mut h, &Req::new("INVITE", call).in_dialog(&tag, 5));
        assert_eq!(code, 200);
        let sdp = body(&resp);
        assert_eq!(m_ports(&sdp), ports);
        assert_eq!(o_version(&sdp), 2);
        assert!(h.take_events().is_empty(), "a refresh changes nothing");
    }

    #[test]
    fn src_tag_variants_and_missing_tag_are_accepted() {
        let mut h = Harness::new(config());
        let offer = sdp(1, &[20000], "sendonly");
        for (call, contact) in [
            ("legacy@src", "Contact: <sip:192.168.241.44:5060>;src"),
            (
                "quoted@src",
                "Contact: <sip:src@10.20.0.10:5060>;\"+sip.src\"",
            ),
            ("none@src", "Contact: <sip:src@10.20.0.10:5060>"),
        ] {
            let req = Req::new("INVITE", call)
                .header(contact)
                .header("Require: siprec")
                .body("application/sdp", &offer);
            let (code, resp) = status(&mut h, &req);
            assert_eq!(code, 200, "{call}: {resp}");
            assert!(header_tokens(&resp.headers, "Require").contains(&"siprec".to_string()));
        }
        assert_eq!(h.rec.sessions().len(), 3);
    }

    #[test]
    fn pinned_source_follows_the_offer() {
        let mut h = Harness::new(SiprecConfig {
            pin_source: true,
            ..config()
        });
        let (resp, _) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let ports = m_ports(&body(&resp));
        assert_eq!(
            h.flow(ports[1]).unwrap().2,
            Some("10.20.0.10:31002".parse().unwrap())
        );
        assert_eq!(
            h.flow(ports[1] + 1).unwrap().2,
            Some("10.20.0.10:31003".parse().unwrap())
        );
        let (ct, b) = multipart(SDP_8, META_8);
        let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
            .in_dialog(&tag, 2)
            .body(&ct, &b);
        assert_eq!(status(&mut h, &reinvite).0, 200);
        assert_eq!(
            h.flow(ports[1]).unwrap().2,
            Some("10.20.0.10:31010".parse().unwrap())
        );
        assert_eq!(
            h.flow(ports[0]).unwrap().2,
            Some("10.20.0.10:31000".parse().unwrap())
        );
    }

    #[test]
    fn call_id_reuse_with_another_from_tag_is_another_session() {
        let mut h = Harness::new(config());
        let (resp, first) = h.establish(
            Req::new("INVITE", "reused@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        let tag = to_tag(&resp.headers).unwrap();
        let mut second =
            Req::new("INVITE", "reused@src").body("application/sdp", &sdp(1, &[20002], "sendonly"));
        second.from_tag = "other-1";
        let (_, other) = h.establish(second);
        assert_ne!(first, other);
        assert_eq!(h.rec.sessions().len(), 2);
        status(&mut h, &Req::new("BYE", "reused@src").in_dialog(&tag, 2));
        let sessions = h.rec.sessions();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].id, other);
    }

    #[test]
    fn stop_and_shutdown_send_bye() {
        let mut h = Harness::new(config());
        let (_, a) = h.establish(
            Req::new("INVITE", "a@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        h.establish(
            Req::new("INVITE", "b@src").body("application/sdp", &sdp(1, &[20002], "sendonly")),
        );
        h.establish(
            Req::new("INVITE", "c@src").body("application/sdp", &sdp(1, &[20004], "sendonly")),
        );
        assert!(!h.rec.stop(h.now, "nosuch", &mut h.ep));
        assert!(h.rec.stop(h.now, &a, &mut h.ep));
        let sent = h.pump();
        assert_eq!(requests(&sent).len(), 1);
        assert!(matches!(
            h.take_events()[..],
            [SessionEvent::Ended {
                reason: EndReason::Operator,
                ..
            }]
        ));
        h.rec.shutdown(h.now, &mut h.ep);
        let sent = h.pump();
        assert_eq!(
            requests(&sent)
                .iter()
                .filter(|r| r.method == Method::Bye)
                .count(),
            2
        );
        assert!(h.rec.flows().table.flows.is_empty());
        assert_eq!(h.rec.counters().sessions_ended.get("shutdown"), Some(&2));
    }

    #[test]
    fn src_feature_tag_is_recognised() {
        let parse = |contact: &str| {
            let text = Req::new("INVITE", "x").header(contact).text(1);
            has_src_feature(&Request::try_from(text.as_str()).unwrap())
        };
        assert!(parse("Contact: <sip:src@10.20.0.10:5060>;+sip.src"));
        assert!(parse("Contact: <sip:192.168.241.44:5060>;src"));
        assert!(parse(
            "Contact: <sip:src@10.20.0.10>;\"+sip.src\";expires=60"
        ));
        assert!(!parse("Contact: <sip:src@10.20.0.10:5060;src>"));
        assert!(!parse("Contact: <sip:src@10.20.0.10:5060>;+sip.srs"));
    }

    #[test]
    fn acl_matches_prefixes() {
        let acl = vec![
            (IpAddr::from([10, 20, 0, 0]), 16),
            (IpAddr::from([192, 0, 2, 128]), 25),
            ("2001:db8::".parse().unwrap(), 32),
        ];
        let ok = |ip: &str| acl_allows(&acl, ip.parse().unwrap());
        assert!(ok("10.20.255.1") && !ok("10.21.0.1"));
        assert!(ok("192.0.2.200") && !ok("192.0.2.127"));
        assert!(ok("2001:db8:1::5") && !ok("2001:db9::1"));
        assert!(ok("::ffff:10.20.0.9"), "v4-mapped");
        assert!(
            acl_allows(&[], "203.0.113.9".parse().unwrap()),
            "empty ACL allows all"
        );
    }

    #[test]
    fn bye_with_final_metadata_reports_it_then_ends() {
        let mut h = Harness::new(config());
        let (resp, id) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let bye = Req::new("BYE", "rs-0c6e2b11@10.20.0.10")
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", META_8);
        assert_eq!(status(&mut h, &bye).0, 200);
        let events = h.take_events();
        assert!(
            matches!(
                &events[..],
                [
                    SessionEvent::ParticipantsChanged { metadata: Some(m), .. },
                    SessionEvent::Ended { id: e, reason: EndReason::Bye { reason: None }, .. },
                ] if m.method == "BYE" && m.version == 2 && *e == id
            ),
            "{events:?}"
        );
    }

    #[test]
    fn missing_ack_ends_with_transaction_timeout() {
        let mut h = Harness::new(config());
        let resp = final_response(&h.send(&spec_invite()));
        assert_eq!(resp.status_code.code(), 200);
        h.take_events();
        h.advance(Duration::from_secs(40));
        assert!(h.rec.sessions().is_empty());
        assert!(h.rec.flows().table.flows.is_empty());
        let events = h.take_events();
        assert!(
            matches!(
                &events[..],
                [SessionEvent::Ended {
                    reason: EndReason::TransactionTimeout,
                    ..
                }]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn srtp_stream_gets_a_stable_crypto_answer() {
        let mut h = Harness::new(config());
        let offer = |v: u32| {
            format!(
                "v=0\r\no=SRC 1 {v} IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 20000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\na=sendonly\r\n"
            )
        };
        let req = Req::new("INVITE", "srtp@src").body("application/sdp", &offer(1));
        let (resp, _) = h.establish(req);
        let crypto = |sdp: &str| {
            m_section(sdp, 0)
                .into_iter()
                .find(|l| l.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"))
                .unwrap_or_else(|| panic!("no crypto answer in {sdp}"))
        };
        let first = crypto(&body(&resp));
        assert!(h.rec.sessions()[0].streams[0].srtp);
        let tag = to_tag(&resp.headers).unwrap();
        let reinvite = Req::new("INVITE", "srtp@src")
            .in_dialog(&tag, 2)
            .body("application/sdp", &offer(2));
        let (code, resp2) = status(&mut h, &reinvite);
        assert_eq!(code, 200);
        assert_eq!(crypto(&body(&resp2)), first);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Arbitrary bodies and header values never panic; a rejection leaves nothing behind.
        #[test]
        fn malformed_input_is_answered_not_panicked_on(
            ct in proptest::sample::select(vec![
                "application/sdp",
                "multipart/mixed;boundary=rsb-42",
                "application/rs-metadata+xml",
                "text/plain",
            ]),
            body in "[ -~\r\n]{0,400}",
            sdp_tail in "[ -~\r\n]{0,120}",
            session_expires in "[0-9a-z;= ]{0,12}",
            reinvite in proptest::bool::ANY,
        ) {
            let mut h = Harness::new(config());
            let body = if ct.starts_with("application/sdp") {
                format!("{}{sdp_tail}", sdp(1, &[20000], "sendonly"))
            } else {
                body
            };
            let mut req = Req::new("INVITE", "fuzz@src").body(ct, &body);
            if !session_expires.is_empty() {
                req = req.header(&format!("Session-Expires: {session_expires}"));
            }
            let (code, resp) = if reinvite {
                let (first, _) = h.establish(
                    Req::new("INVITE", "fuzz@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
                );
                let tag = to_tag(&first.headers).unwrap();
                status(&mut h, &req.in_dialog(&tag, 2))
            } else {
                status(&mut h, &req)
            };
            proptest::prop_assert!(code >= 200, "{}", resp);
            let sessions = h.rec.sessions();
            if reinvite {
                // The session survives a bad re-INVITE, with its flows.
                proptest::prop_assert_eq!(sessions.len(), 1);
                let pinned: usize = sessions[0]
                    .streams
                    .iter()
                    .map(|s| 1 + usize::from(s.rtcp_port.is_some()))
                    .sum();
                proptest::prop_assert_eq!(h.rec.flows().table.flows.len(), pinned);
            } else if code != 200 {
                proptest::prop_assert!(sessions.is_empty());
                proptest::prop_assert!(h.rec.flows().table.flows.is_empty());
            }
        }
    }

    #[test]
    fn ports_of_a_refused_offer_are_reusable_at_once() {
        // Three pairs; four streams cannot fit, but that must not block the next calls.
        let mut h = Harness::new(SiprecConfig {
            rtp_ports: (40000, 40005),
            ..config()
        });
        let four = sdp(1, &[20000, 20002, 20004, 20006], "sendonly");
        let (code, _) = status(
            &mut h,
            &Req::new("INVITE", "four@src").body("application/sdp", &four),
        );
        assert_eq!(code, 503);
        assert!(h.rec.flows().table.flows.is_empty());
        for call in ["a@src", "b@src", "c@src"] {
            let one = sdp(1, &[20000], "sendonly");
            let (code, resp) = status(
                &mut h,
                &Req::new("INVITE", call).body("application/sdp", &one),
            );
            assert_eq!(code, 200, "{call}: {resp}");
        }
        let ports: std::collections::BTreeSet<u16> = h
            .rec
            .sessions()
            .iter()
            .map(|s| s.streams[0].local_port)
            .collect();
        assert_eq!(ports.len(), 3, "three distinct pairs");
    }

    #[test]
    fn invite_without_from_tag_is_recorded_and_ended() {
        let mut h = Harness::new(config());
        let mut req = Req::new("INVITE", "rfc2543@src")
            .body("application/sdp", &sdp(1, &[20000], "sendonly"));
        req.from_tag = "";
        let text = req.text(1).replace(";tag=\r\n", "\r\n");
        assert!(text.contains("From: <sip:src@sbc1.cc.example>\r\n"));
        let resp = final_response(&h.send_raw(&text));
        assert_eq!(resp.status_code.code(), 200, "{resp}");
        let tag = to_tag(&resp.headers).unwrap();
        let bye = Req::new("BYE", "rfc2543@src")
            .in_dialog(&tag, 2)
            .text(2)
            .replace(";tag=sbc-7731", "");
        let codes: Vec<u16> = responses(&h.send_raw(&bye))
            .iter()
            .map(|r| r.status_code.code())
            .collect();
        assert_eq!(codes, [200]);
        assert!(h.rec.sessions().is_empty());
    }

    /// Partial metadata whose association names a participant and a stream never described.
    pub(super) const META_GHOST: &str = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>partial</datamode>
  <participantstreamassoc participant_id="p-ghost"><send>s-ghost</send></participantstreamassoc>
</recording>"#;

    /// Our snapshot-request UPDATEs among what was sent.
    pub(super) fn snapshot_requests(msgs: &[rsip::SipMessage]) -> Vec<rsip::Request> {
        requests(msgs)
            .into_iter()
            .filter(|r| r.method == Method::Update)
            .cloned()
            .collect()
    }

    /// The client's answer to a request we sent.
    pub(super) fn answer(h: &mut Harness, req: &rsip::Request, code: u16, reason: &str) {
        let mut text = format!("SIP/2.0 {code} {reason}\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            text += &format!("{name}: {}\r\n", header_value(&req.headers, name).unwrap());
        }
        text += "Content-Length: 0\r\n\r\n";
        assert!(h.send_raw(&text).is_empty(), "a response needs no answer");
    }

    fn assert_snapshot_request(req: &rsip::Request) {
        assert_eq!(
            header_value(&req.headers, "Content-Type").as_deref(),
            Some("application/rs-metadata-request")
        );
        assert_eq!(
            header_value(&req.headers, "Content-Disposition").as_deref(),
            Some("recording-session")
        );
        let xml = String::from_utf8(req.body.clone()).unwrap();
        assert!(
            xml.contains(r#"<requestsnapshot xmlns="urn:ietf:params:xml:ns:recording:1">"#),
            "{xml}"
        );
        assert!(xml.contains(r#"<requestreason xml:lang="en">"#), "{xml}");
        assert!(xml.contains("p-ghost") && xml.contains("s-ghost"), "{xml}");
    }

    #[test]
    fn unresolved_metadata_refs_get_one_snapshot_request_per_inconsistency() {
        let mut h = Harness::new(config());
        let (resp, _) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let call = "rs-0c6e2b11@10.20.0.10";
        assert_eq!(
            h.rec.counters().snapshot_requests,
            0,
            "META_7 is consistent"
        );

        let ghost = Req::new("UPDATE", call)
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", META_GHOST);
        let out = h.send(&ghost);
        assert_eq!(final_response(&out).status_code.code(), 200);
        let sent = snapshot_requests(&out);
        assert_eq!(sent.len(), 1, "{out:?}");
        assert_snapshot_request(&sent[0]);
        assert_eq!(h.rec.counters().snapshot_requests, 1);

        // The same inconsistency again (the SRC repeats itself): no second request.
        let again = Req::new("UPDATE", call)
            .in_dialog(&tag, 3)
            .body("application/rs-metadata+xml", META_GHOST);
        assert!(snapshot_requests(&h.send(&again)).is_empty());
        // The SRC refuses: counted and logged, the recording goes on.
        answer(&mut h, &sent[0], 488, "Not Acceptable Here");
        assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
        assert_eq!(h.rec.sessions().len(), 1);

        // A complete snapshot resolves it; a later inconsistency is a new one.
        let (ct, b) = multipart(SDP_7, META_7);
        let complete = Req::new("INVITE", call).in_dialog(&tag, 4).body(&ct, &b);
        let out = h.send(&complete);
        assert_eq!(final_response(&out).status_code.code(), 200);
        assert!(snapshot_requests(&out).is_empty());
        h.send(&ack(call, "sbc-7731", &tag, 4));
        let out = h.send(
            &Req::new("UPDATE", call)
                .in_dialog(&tag, 5)
                .body("application/rs-metadata+xml", META_GHOST),
        );
        let sent = snapshot_requests(&out);
        assert_eq!(sent.len(), 1);
        assert_eq!(h.rec.counters().snapshot_requests, 2);
        answer(&mut h, &sent[0], 200, "OK");
        assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
        // Unanswered requests time out (64*T1) and count as failed too.
        let out = h.send(&Req::new("UPDATE", call).in_dialog(&tag, 6).body(
            "application/rs-metadata+xml",
            &META_GHOST.replace("ghost", "phantom"),
        ));
        assert_eq!(snapshot_requests(&out).len(), 1);
        h.advance(Duration::from_secs(40));
        assert_eq!(h.rec.counters().snapshot_requests_failed, 2);
        assert_eq!(h.rec.sessions().len(), 1);
    }

    #[test]
    fn snapshot_request_met_with_491_is_retried_once_after_the_back_off() {
        let mut h = Harness::new(config());
        let (resp, _) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let call = "rs-0c6e2b11@10.20.0.10";
        let out = h.send(
            &Req::new("UPDATE", call)
                .in_dialog(&tag, 2)
                .body("application/rs-metadata+xml", META_GHOST),
        );
        let first = snapshot_requests(&out);
        assert_eq!(first.len(), 1, "{out:?}");

        // Glare: the client answers 491. Nothing goes out at once (`answer` checks that);
        // the retry is due within the UAS back-off window of 0-2 s.
        let t0 = h.now;
        answer(&mut h, &first[0], 491, "Request Pending");
        let due = h.rec.poll_timeout().expect("a retry is scheduled");
        assert!(
            due >= t0 && due <= t0 + Duration::from_secs(2),
            "{:?}",
            due - t0
        );
        assert_eq!(h.rec.counters().snapshot_requests_failed, 0);
        let out = h.advance(Duration::from_secs(2));
        let retry = snapshot_requests(&out);
        assert_eq!(retry.len(), 1, "{out:?}");
        assert_snapshot_request(&retry[0]);
        assert_eq!(retry[0].body, first[0].body);
        let cseq = |r: &rsip::Request| header_value(&r.headers, "CSeq").unwrap();
        assert_ne!(cseq(&retry[0]), cseq(&first[0]), "a new transaction");
        assert_eq!(h.rec.counters().snapshot_retries, 1);
        assert_eq!(h.rec.counters().snapshot_requests, 1);

        // A second 491: given up, counted as failed, no third attempt.
        answer(&mut h, &retry[0], 491, "Request Pending");
        assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
        assert!(snapshot_requests(&h.advance(Duration::from_secs(5))).is_empty());
        assert_eq!(h.rec.counters().snapshot_retries, 1);
        assert_eq!(h.rec.sessions().len(), 1);
    }

    #[test]
    fn snapshot_request_for_an_initial_invite_waits_for_the_ack() {
        let mut h = Harness::new(config());
        let call = "ghost@10.20.0.10";
        let (ct, b) = multipart(SDP_7, META_GHOST);
        let out = h.send(&Req::new("INVITE", call).siprec().body(&ct, &b));
        let ok = final_response(&out);
        assert_eq!(ok.status_code.code(), 200);
        assert!(snapshot_requests(&out).is_empty(), "not before the ACK");
        let tag = to_tag(&ok.headers).unwrap();
        let out = h.send(&ack(call, "sbc-7731", &tag, 1));
        let sent = snapshot_requests(&out);
        assert_eq!(sent.len(), 1, "{out:?}");
        assert_snapshot_request(&sent[0]);
        assert_eq!(
            header_value(&sent[0].headers, "Call-ID").as_deref(),
            Some(call)
        );
    }

    #[test]
    fn call_leaving_a_persistent_recording_ends_its_participants_not_the_recording() {
        let mut h = Harness::new(config());
        let (resp, id) = h.establish(spec_invite());
        let tag = to_tag(&resp.headers).unwrap();
        let call = "rs-0c6e2b11@10.20.0.10";
        let cs_ends = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
  <sessionrecordingassoc session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><disassociate-time>2025-03-04T10:25:00Z</disassociate-time></sessionrecordingassoc>
</recording>"#;
        let (code, _) = status(
            &mut h,
            &Req::new("UPDATE", call)
                .in_dialog(&tag, 2)
                .body("application/rs-metadata+xml", cs_ends),
        );
        assert_eq!(code, 200);
        let events = h.take_events();
        let [SessionEvent::ParticipantsChanged {
            id: changed,
            participants,
            ..
        }] = &events[..]
        else {
            panic!("one ParticipantsChanged, no Ended: {events:?}");
        };
        assert_eq!(changed, &id);
        let end = crate::siprec::metadata::parse_time("2025-03-04T10:25:00Z");
        assert_eq!(participants.len(), 2);
        assert!(
            participants.iter().all(|p| p.left_at == end),
            "{participants:?}"
        );
        assert_eq!(h.rec.sessions().len(), 1, "the recording session goes on");
        assert!(h.flow(h.rec.sessions()[0].streams[0].local_port).is_some());
    }

    /// Many sessions with session timers set at different times: each expires at its own
    /// deadline (the timer heap keeps them in order), the others go on.
    #[test]
    fn session_timers_of_many_sessions_fire_in_order_and_only_when_due() {
        let mut h = Harness::new(SiprecConfig {
            rtp_ports: (40000, 49999),
            ..config()
        });
        let call_ids: Vec<String> = (0..40).map(|i| format!("many-{i}@src")).collect();
        for call_id in &call_ids {
            h.establish(
                Req::new("INVITE", call_id)
                    .header("Supported: timer")
                    .header("Session-Expires: 120;refresher=uac")
                    .body("application/sdp", &sdp(1, &[20000], "sendonly")),
            );
            h.advance(Duration::from_secs(1));
        }
        // Session i was set up at i s and expires at i + 120 s; it is now 40 s.
        let sent = h.advance(Duration::from_millis(89_500));
        let byes: Vec<String> = requests(&sent)
            .iter()
            .filter(|r| r.method == Method::Bye)
            .map(|r| header_value(&r.headers, "Call-ID").unwrap())
            .collect();
        assert_eq!(byes, call_ids[..10], "the first ten, in order");
        assert_eq!(h.rec.sessions().len(), 30);
        assert_eq!(h.rec.session_count(), 30);
        let sent = h.advance(Duration::from_secs(30));
        assert_eq!(requests(&sent).len(), 30);
        assert!(h.rec.sessions().is_empty());
        // Every timer entry went with its session: no wake-ups for sessions that are gone.
        assert_eq!(h.rec.poll_timeout(), None);
    }

    /// A refresh that shortens the session timer moves the deadline earlier, not only later.
    #[test]
    fn refresh_with_a_shorter_session_timer_ends_the_session_sooner() {
        let mut h = Harness::new(config());
        let req = Req::new("INVITE", "shorter@src")
            .header("Supported: timer")
            .header("Session-Expires: 1800;refresher=uac")
            .body("application/sdp", &sdp(1, &[20000], "sendonly"));
        let (resp, _) = h.establish(req);
        let tag = to_tag(&resp.headers).unwrap();
        h.advance(Duration::from_secs(10));
        let (code, _) = status(
            &mut h,
            &Req::new("UPDATE", "shorter@src")
                .in_dialog(&tag, 2)
                .header("Session-Expires: 120;refresher=uac"),
        );
        assert_eq!(code, 200);
        assert_eq!(h.rec.poll_timeout(), Some(h.now + Duration::from_secs(120)));
        let sent = h.advance(Duration::from_secs(121));
        assert_eq!(requests(&sent).len(), 1, "{sent:?}");
        assert!(h.rec.sessions().is_empty());
    }

    /// Sessions set up and ended by the thousand leave no timer entries behind.
    #[test]
    fn ended_sessions_leave_no_timer_entries_behind() {
        let mut h = Harness::new(SiprecConfig {
            rtp_ports: (40000, 49999),
            port_cooldown: Duration::ZERO,
            ..config()
        });
        let held =
            Req::new("INVITE", "held@src").body("application/sdp", &sdp(1, &[20000], "sendonly"));
        h.establish(held);
        for i in 0..1000 {
            let call_id = format!("churn-{i}@src");
            let (resp, _) = h.establish(
                Req::new("INVITE", &call_id).body("application/sdp", &sdp(1, &[20000], "sendonly")),
            );
            let tag = to_tag(&resp.headers).unwrap();
            let (code, _) = status(&mut h, &Req::new("BYE", &call_id).in_dialog(&tag, 2));
            assert_eq!(code, 200);
            h.take_events();
            assert!(
                h.rec.timers.len() <= 2 * h.rec.sessions.len() + 64,
                "{}",
                h.rec.timers.len()
            );
        }
        assert_eq!(h.rec.sessions().len(), 1);
        // The held session's idle check is the only deadline.
        let deadline = h.rec.poll_timeout().expect("the held session's idle check");
        assert!(deadline > h.now, "{deadline:?}");
    }
}
