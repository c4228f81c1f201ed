//! Entry points for the coverage-guided fuzz targets in `fuzz/` (outside the workspace), for
//! the parsers that are private to their layer. Not an API: nothing else may use it, and it
//! changes with the code behind it.

use std::ops::Range;

pub use crate::capture::RecordHeader;
use crate::writer::encode::rtp::{self, Aligner, Kind, SsrcStats};
pub use recorder_ebpf::abi::RECORD_HEADER_LEN;

/// A ring record split into its header and captured frame (the ring consumer's parser).
pub fn ring_record(bytes: &[u8]) -> Option<(RecordHeader, &[u8])> {
    crate::capture::ring::parse_record(bytes)
}

/// The frame with its UDP payload replaced by `plain` (what `pcap_srtp = "decrypted"` stores).
pub fn decrypted_frame(frame: &[u8], payload_offset: usize, plain: &[u8]) -> Option<Vec<u8>> {
    crate::writer::encode::media::decrypted_frame(frame, payload_offset, plain)
}

/// What the writer reads of one RTP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RtpPacket {
    Rtp {
        payload_type: u8,
        seq: u16,
        timestamp: u32,
        ssrc: u32,
        payload: Range<usize>,
    },
    Rtcp,
    Malformed,
}

/// The writer's RTP header parser.
pub fn rtp_parse(b: &[u8]) -> RtpPacket {
    match rtp::parse(b) {
        Kind::Rtp(h) => RtpPacket::Rtp {
            payload_type: h.payload_type,
            seq: h.seq,
            timestamp: h.timestamp,
            ssrc: h.ssrc,
            payload: h.payload_offset..h.payload_offset + h.payload_len,
        },
        Kind::Rtcp => RtpPacket::Rtcp,
        Kind::Malformed => RtpPacket::Malformed,
    }
}

/// The writer's per-stream RTP state: loss and jitter per SSRC, and the timeline position.
#[derive(Default)]
pub struct RtpTrack {
    ssrcs: Vec<SsrcStats>,
    aligner: Aligner,
}

/// One SSRC's counters as the metadata and the RTCP reports show them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsrcSummary {
    pub ssrc: u32,
    pub packets: u64,
    pub lost: u64,
    pub jitter: u32,
    pub extended_highest_seq: u32,
}

impl RtpTrack {
    /// Accounts one packet as the writer does; the position of its first sample, for RTP.
    pub fn push(
        &mut self,
        payload: &[u8],
        arrival: u32,
        clock_rate: u32,
        out_rate: u32,
        wall_pos: i64,
    ) -> Option<i64> {
        let Kind::Rtp(h) = rtp::parse(payload) else {
            return None;
        };
        let i = match self.ssrcs.iter().position(|s| s.ssrc == h.ssrc) {
            Some(i) => i,
            None => {
                self.ssrcs.push(SsrcStats::new(h.ssrc, h.seq));
                self.ssrcs.len() - 1
            }
        };
        self.ssrcs[i].record(h.seq);
        self.ssrcs[i].record_arrival(h.timestamp, arrival);
        Some(self.aligner.position(&h, clock_rate, out_rate, wall_pos))
    }

    pub fn summary(&self) -> Vec<SsrcSummary> {
        self.ssrcs
            .iter()
            .map(|s| SsrcSummary {
                ssrc: s.ssrc,
                packets: s.packets,
                lost: s.lost,
                jitter: s.jitter(),
                extended_highest_seq: s.extended_highest_seq(),
            })
            .collect()
    }
}

/// A sender keyed like the receiver of `crypto` (same profile mapping), to make packets that
/// must authenticate. `None` for plain RTP (both halves off) or parameters the library refuses.
pub fn srtp_sender(crypto: &crate::media::sdes::SdesCrypto) -> Option<libsrtp::SendSession> {
    let config = crate::media::srtp::config(crypto).ok()??;
    let mut session = libsrtp::SendSession::new();
    session.add_stream(None, &config).ok()?;
    Some(session)
}

/// The control server's RFC 3339 parser (the `since` of `recordings`).
pub fn control_time(s: &str) -> Result<std::time::SystemTime, String> {
    crate::control::parse_time(s)
}
