//! Typed events from signaling (SIPREC sessions) to the rest of the recorder (writers, index).
//!
//! Signaling never touches files: it emits these, and the writer/index layer consumes them.
//! Times are wall-clock (`SystemTime`), taken when the signaling layer processed the message,
//! or taken from SIPREC metadata where it says when something happened.

use std::{net::SocketAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

/// Identifies one recording (one SIPREC recording session: one directory in the spool).
pub type RecordingId = String;

/// One negotiated media stream of a recording (one SDP m-line we accepted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Position of the m-line in the offer (0-based); stable for the session's life.
    pub index: usize,
    /// `a=label` of the m-line (RFC 4574), or the m-line index as a string when absent.
    pub label: String,
    /// Media type of the m-line (`audio`, `video`, ...).
    pub media: String,
    /// Flow id pinned in the XDP flow map for the RTP port (records carry it).
    pub flow_id: u64,
    /// Flow id for the RTCP port, when RTCP is not multiplexed.
    pub rtcp_flow_id: Option<u64>,
    /// Local RTP port we answered with.
    pub local_port: u16,
    /// Local RTCP port (None with rtcp-mux).
    pub rtcp_port: Option<u16>,
    /// Where the client said it sends from (SDP connection address and port), if given.
    pub remote: Option<SocketAddr>,
    /// Where the client's RTCP is (`a=rtcp`, else RTP port + 1), where our receiver reports go.
    #[serde(default)]
    pub rtcp_remote: Option<SocketAddr>,
    /// Codec chosen in our answer.
    pub codec: Codec,
    /// Payload type of `telephone-event` (RFC 4733), if offered.
    pub telephone_event_pt: Option<u8>,
    /// The stream is paused (`a=inactive`).
    pub paused: bool,
    /// `a=crypto` was offered (SRTP); the payload cannot be decoded without keys.
    pub srtp: bool,
    /// The offered SDES line the recorder decrypts with (RTP/SAVP). Holds the client's key:
    /// its `Debug` is redacted; only the handover file stores it.
    #[serde(default)]
    pub sdes: Option<crate::media::sdes::SdesCrypto>,
}

/// A codec from an `a=rtpmap` (or a static payload type).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Codec {
    pub payload_type: u8,
    /// Encoding name as in rtpmap, e.g. `PCMU`, `PCMA`, `opus`, `G722`.
    pub name: String,
    pub clock_rate: u32,
    pub channels: u8,
    /// `a=fmtp` parameters, if any.
    pub fmtp: Option<String>,
}

/// A participant of the recorded communication session (from SIPREC metadata).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// `participant_id` from metadata.
    pub id: String,
    pub name: Option<String>,
    pub aor: Option<String>,
    pub joined_at: Option<SystemTime>,
    pub left_at: Option<SystemTime>,
    /// Labels of the streams this participant sends (its voice).
    pub sends: Vec<String>,
    /// Labels of the streams this participant receives.
    pub receives: Vec<String>,
}

/// One version of the SIPREC metadata as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataVersion {
    /// 1 for the first body received, then 2, 3, ...
    pub version: u32,
    pub received_at: SystemTime,
    /// SIP method that carried it (INVITE, UPDATE, BYE, ...).
    pub method: String,
    /// The XML body exactly as received.
    pub xml: String,
}

/// Identifiers of the recorded interaction, gathered from headers, the Request-URI and metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallIds {
    /// Call-ID of the recording session's SIP dialog.
    pub sip_call_id: String,
    /// Interaction id (Genesys CallUUID or equivalent), the key across transfers and sites.
    pub call_uuid: Option<String>,
    /// Where `call_uuid` came from (`extensiondata`, `header:X-Genesys-CallUUID`, `request-uri`, `group`).
    pub call_uuid_source: Option<String>,
    /// Local connection id (e.g. Genesys ConnID, Request-URI `record=`), differs per site.
    pub connection_id: Option<String>,
    /// Other ids worth keeping (`dn`, `recordDN`, `otherDN`, `Session-ID`, `Cisco-Guid`, UCID ...).
    pub extra: Vec<(String, String)>,
}

/// Why a recording ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The client sent BYE. `reason` is its `Reason` header, if any.
    Bye { reason: Option<String> },
    /// The client cancelled the INVITE before we answered.
    Cancel,
    /// No RTP and no signaling for the idle timeout, or the session timer expired.
    Timeout,
    /// The INVITE transaction failed (no ACK for our 2xx).
    TransactionTimeout,
    /// The operator stopped it.
    Operator,
    /// The daemon shut down.
    Shutdown,
    /// An internal error.
    Error { detail: String },
}

impl EndReason {
    /// Short name used in metadata.json and the index (`bye`, `cancel`, `timeout`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EndReason::Bye { .. } => "bye",
            EndReason::Cancel => "cancel",
            EndReason::Timeout => "timeout",
            EndReason::TransactionTimeout => "transaction_timeout",
            EndReason::Operator => "operator",
            EndReason::Shutdown => "shutdown",
            EndReason::Error { .. } => "error",
        }
    }
}

/// What signaling tells writers and the index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A recording session was answered (200 OK sent); its flows are pinned.
    Started {
        id: RecordingId,
        at: SystemTime,
        ids: CallIds,
        streams: Vec<StreamInfo>,
        participants: Vec<Participant>,
        metadata: Option<MetadataVersion>,
    },
    /// Streams changed (re-INVITE/UPDATE with SDP): the full new stream list. Streams absent from
    /// it were removed (port 0); new ones were added; flow ids of rewritten streams stay the same.
    MediaChanged {
        id: RecordingId,
        at: SystemTime,
        streams: Vec<StreamInfo>,
    },
    /// Participants changed (metadata in re-INVITE/UPDATE/BYE): the full merged list.
    ParticipantsChanged {
        id: RecordingId,
        at: SystemTime,
        participants: Vec<Participant>,
        metadata: Option<MetadataVersion>,
        ids: CallIds,
    },
    /// A stream was paused (`a=inactive`).
    Paused {
        id: RecordingId,
        at: SystemTime,
        label: String,
    },
    /// A paused stream resumed.
    Resumed {
        id: RecordingId,
        at: SystemTime,
        label: String,
    },
    /// The recording ended; its flows are already removed from the XDP map.
    Ended {
        id: RecordingId,
        at: SystemTime,
        reason: EndReason,
        /// Per flow id, the records the XDP program could not put in a full ring (the kernel's
        /// counters, read as the flows were removed; flows without drops are left out).
        #[serde(default)]
        ring_drops: Vec<(u64, u64)>,
    },
}

impl SessionEvent {
    /// The recording this event is about.
    pub fn recording_id(&self) -> &str {
        match self {
            SessionEvent::Started { id, .. }
            | SessionEvent::MediaChanged { id, .. }
            | SessionEvent::ParticipantsChanged { id, .. }
            | SessionEvent::Paused { id, .. }
            | SessionEvent::Resumed { id, .. }
            | SessionEvent::Ended { id, .. } => id,
        }
    }
}
