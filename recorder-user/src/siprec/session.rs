//! Recording sessions: the SIPREC Session Recording Server logic between the sans-IO SIP
//! [`Endpoint`] and the flow table.
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
//!
//! Submodules: `invite` (a new session: checks, ports, flows, the answer), `dialog` (requests in a
//! dialog, re-offers, metadata updates, snapshot requests, ending a session); the tests are in
//! `session/tests.rs` (harness, INVITE path) and `session/tests/in_dialog.rs`.

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
    /// Out-of-dialog OPTIONS answered 503 (full, draining, not accepting).
    pub options_unavailable: u64,
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
    /// Draining (`recorder drain`, SIGUSR1, `drain = true`): no new session, the live ones go on.
    draining: bool,
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
            draining: false,
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

    /// Draining: new INVITEs get 503 with Retry-After (and so do OPTIONS, which turns a load
    /// balancer away) while the live sessions go on, in-dialog requests included.
    pub fn set_draining(&mut self, draining: bool) {
        if draining != self.draining {
            info!(
                draining,
                live_sessions = self.sessions.len(),
                "{}",
                if draining {
                    "draining: no new sessions, the live ones go on"
                } else {
                    "drain ended: taking new sessions"
                }
            );
        }
        self.draining = draining;
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Why a new session would be refused now (`None`: it would be taken, as far as the state
    /// of the server goes). Out-of-dialog OPTIONS answer 503 with this reason: a load balancer
    /// that probes with OPTIONS (Kamailio's dispatcher) then sends its INVITEs elsewhere
    /// before they would fail.
    pub fn refusal(&self, now: Instant) -> Option<String> {
        self.admission(now, true).err().map(|r| r.reason)
    }

    /// The server-state checks of a new session; `ports`: also whether the media ports of a
    /// two-stream session are free (an INVITE finds that out when it allocates them).
    fn admission(&self, now: Instant, ports: bool) -> Result<(), Reject> {
        let retry_after = self.config.retry_after.to_string();
        if !self.accepting {
            let reason = if self.not_accepting_reason.is_empty() {
                "Service Unavailable".to_string()
            } else {
                format!("Service Unavailable: {}", self.not_accepting_reason)
            };
            return Err(
                Reject::new(503, reason, "not_accepting").header("Retry-After", retry_after)
            );
        }
        if self.draining {
            return Err(
                Reject::new(503, "Service Unavailable: draining", "draining")
                    .header("Retry-After", retry_after),
            );
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(Reject::new(503, "Session limit reached", "session_limit")
                .header("Retry-After", retry_after));
        }
        if ports && self.ports.available(now) + self.spare_ports.len() < 2 {
            return Err(Reject::new(503, "Media ports exhausted", "ports_exhausted")
                .header("Retry-After", retry_after));
        }
        Ok(())
    }

    /// The answer to an out-of-dialog OPTIONS: 200 with our capabilities, or 503 while a new
    /// session would be refused. Not counted as a rejection: a prober asks every second.
    fn options(&mut self, now: Instant) -> Reply {
        match self.admission(now, true) {
            Ok(()) => options_reply(),
            Err(refused) => {
                self.counters.options_unavailable += 1;
                let mut reply = Reply::new(503, refused.reason);
                reply.headers = refused.headers;
                reply
            }
        }
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
            (Method::Options, false) => Ok(Some(self.options(now))),
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

mod dialog;
mod invite;

#[path = "handover.rs"]
mod handover;
pub use handover::{HandoverError, RecorderHandover, HANDOVER_VERSION};

#[cfg(test)]
#[path = "handover_tests.rs"]
mod handover_tests;

#[cfg(test)]
mod tests;
