//! RFC 4733 telephone events (DTMF) found on a stream's `telephone-event` payload type.
//!
//! Every packet of one event carries the event's start timestamp; the duration grows until the
//! end packet, which the sender repeats (usually three times, §2.5.1.4). Events are therefore
//! keyed by (SSRC, RTP timestamp): retransmissions and updates fold into one entry.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::rtp::RtpHeader;
use crate::writer::metadata::rfc3339;

/// One telephone event of a stream, as listed in `metadata.json` (`streams[].dtmf`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DtmfEvent {
    /// RFC 4733 §3.2 event code (0-9, 10 `*`, 11 `#`, 12-15 `A`-`D`, 16 flash).
    pub event: u8,
    /// The digit as text (`5`, `*`, `#`, `A`, `flash`; `event-<n>` for other codes).
    pub digit: String,
    pub ssrc: u32,
    /// RTP timestamp of the event's start (same in all its packets).
    pub rtp_timestamp: u32,
    /// Wall-clock arrival of the first packet seen of the event.
    pub started_at: String,
    /// Milliseconds from the recording start to `started_at` (position in the WAV).
    pub offset_ms: i64,
    /// Longest duration reported, in milliseconds.
    pub duration_ms: u64,
    /// Power level in -dBm0 (0 is loudest).
    pub volume: u8,
    /// An end packet (E bit) arrived; false when the end packets were lost.
    pub ended: bool,
}

/// The fixed part of a telephone-event payload (RFC 4733 §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EventPayload {
    pub event: u8,
    pub end: bool,
    pub volume: u8,
    /// In RTP timestamp units.
    pub duration: u16,
}

/// Parses the first 4 bytes of a telephone-event payload (`None` when shorter).
pub(crate) fn parse(payload: &[u8]) -> Option<EventPayload> {
    let b = payload.get(..4)?;
    Some(EventPayload {
        event: b[0],
        end: b[1] & 0x80 != 0,
        volume: b[1] & 0x3f,
        duration: u16::from_be_bytes([b[2], b[3]]),
    })
}

pub(crate) fn digit(event: u8) -> String {
    match event {
        0..=9 => event.to_string(),
        10 => "*".into(),
        11 => "#".into(),
        12..=15 => ((b'A' + event - 12) as char).to_string(),
        16 => "flash".into(),
        n => format!("event-{n}"),
    }
}

/// Entries searched for a matching (SSRC, timestamp): events of one stream do not overlap, so
/// only the latest few can still receive packets.
const RECENT: usize = 4;

/// Folds one telephone-event packet into `events`. Returns false for a payload too short to be
/// an event.
pub(crate) fn record(
    events: &mut Vec<DtmfEvent>,
    h: &RtpHeader,
    payload: &[u8],
    clock_rate: u32,
    wall: SystemTime,
    offset_ms: i64,
) -> bool {
    let Some(p) = parse(payload) else {
        return false;
    };
    let rate = if clock_rate == 0 { 8000 } else { clock_rate } as u64;
    let duration_ms = p.duration as u64 * 1000 / rate;
    let start = events.len().saturating_sub(RECENT);
    if let Some(e) = events[start..]
        .iter_mut()
        .rev()
        .find(|e| e.ssrc == h.ssrc && e.rtp_timestamp == h.timestamp && e.event == p.event)
    {
        e.duration_ms = e.duration_ms.max(duration_ms);
        e.ended |= p.end;
        return true;
    }
    events.push(DtmfEvent {
        event: p.event,
        digit: digit(p.event),
        ssrc: h.ssrc,
        rtp_timestamp: h.timestamp,
        started_at: rfc3339(wall),
        offset_ms,
        duration_ms,
        volume: p.volume,
        ended: p.end,
    });
    true
}
