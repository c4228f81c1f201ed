//! RTP header parsing, per-SSRC loss accounting and the timestamp -> WAV position mapping.

use serde::{Deserialize, Serialize};

/// The fields of an RTP header the writer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RtpHeader {
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Offset of the payload within the UDP payload.
    pub payload_offset: usize,
    /// Payload length (padding removed).
    pub payload_len: usize,
}

/// What a UDP payload on an RTP port is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Rtp(RtpHeader),
    /// RTCP multiplexed on the RTP port (RFC 5761: payload types 200-206 on the wire).
    Rtcp,
    /// Not RTP version 2 or cut short.
    Malformed,
}

pub(crate) fn parse(b: &[u8]) -> Kind {
    if b.len() < 12 || b[0] >> 6 != 2 {
        return Kind::Malformed;
    }
    if (200..=206).contains(&b[1]) {
        return Kind::Rtcp;
    }
    let cc = (b[0] & 0x0f) as usize;
    let mut off = 12 + 4 * cc;
    if b[0] & 0x10 != 0 {
        let Some(ext) = b.get(off + 2..off + 4) else {
            return Kind::Malformed;
        };
        off += 4 + 4 * u16::from_be_bytes([ext[0], ext[1]]) as usize;
    }
    let mut end = b.len();
    if b[0] & 0x20 != 0 {
        end = end.saturating_sub(*b.last().unwrap_or(&0) as usize);
    }
    if off > end {
        return Kind::Malformed;
    }
    Kind::Rtp(RtpHeader {
        payload_type: b[1] & 0x7f,
        seq: u16::from_be_bytes([b[2], b[3]]),
        timestamp: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        payload_offset: off,
        payload_len: end - off,
    })
}

/// Sequence jump (either way) beyond which a source is considered restarted (RFC 3550 A.1 uses
/// 3000 for MAX_DROPOUT).
const MAX_DROPOUT: i32 = 3000;

/// Loss accounting for one SSRC (RFC 3550 A.1, simplified).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsrcStats {
    pub ssrc: u32,
    pub packets: u64,
    /// Expected minus received, summed over the runs of this SSRC (never negative).
    pub lost: u64,
    /// Extended sequence number of the first packet of the current run.
    #[serde(skip)]
    base: i64,
    /// Highest extended sequence number of the current run.
    #[serde(skip)]
    max: i64,
    /// Packets received in the current run.
    #[serde(skip)]
    run_received: u64,
    /// Loss of the runs already closed.
    #[serde(skip)]
    closed_lost: u64,
    /// Interarrival jitter in timestamp units, scaled by 16 (RFC 3550 A.8).
    #[serde(skip)]
    jitter_q4: u32,
    /// Relative transit time of the previous packet (arrival minus RTP timestamp).
    #[serde(skip)]
    last_transit: Option<u32>,
}

/// Every field of [`SsrcStats`] (its serde form, in `metadata.json`, skips the internal ones):
/// what a handover carries so that loss and jitter go on without a false gap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SsrcState {
    ssrc: u32,
    packets: u64,
    lost: u64,
    base: i64,
    max: i64,
    run_received: u64,
    closed_lost: u64,
    jitter_q4: u32,
    last_transit: Option<u32>,
}

impl From<&SsrcStats> for SsrcState {
    fn from(s: &SsrcStats) -> Self {
        Self {
            ssrc: s.ssrc,
            packets: s.packets,
            lost: s.lost,
            base: s.base,
            max: s.max,
            run_received: s.run_received,
            closed_lost: s.closed_lost,
            jitter_q4: s.jitter_q4,
            last_transit: s.last_transit,
        }
    }
}

impl From<SsrcState> for SsrcStats {
    fn from(s: SsrcState) -> Self {
        Self {
            ssrc: s.ssrc,
            packets: s.packets,
            lost: s.lost,
            base: s.base,
            max: s.max,
            run_received: s.run_received,
            closed_lost: s.closed_lost,
            jitter_q4: s.jitter_q4,
            last_transit: s.last_transit,
        }
    }
}

/// `#[serde(with)]` for a `Vec<SsrcStats>` with all its fields (handover state).
pub(crate) mod full_ssrcs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{SsrcState, SsrcStats};

    pub(crate) fn serialize<S: Serializer>(v: &[SsrcStats], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(SsrcState::from)
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SsrcStats>, D::Error> {
        Ok(Vec::<SsrcState>::deserialize(d)?
            .into_iter()
            .map(SsrcStats::from)
            .collect())
    }
}

impl SsrcStats {
    pub(crate) fn new(ssrc: u32, seq: u16) -> Self {
        Self {
            ssrc,
            base: seq as i64,
            max: seq as i64 - 1,
            ..Default::default()
        }
    }

    pub(crate) fn record(&mut self, seq: u16) {
        self.packets += 1;
        let delta = (seq.wrapping_sub(self.max as u16)) as i16 as i32;
        if delta.abs() > MAX_DROPOUT {
            // The source restarted its sequence: close this run.
            self.closed_lost += self.run_lost();
            *self = Self {
                packets: self.packets,
                closed_lost: self.closed_lost,
                ..Self::new(self.ssrc, seq)
            };
        }
        let ext = self.max + delta as i64;
        self.max = self.max.max(ext);
        self.run_received += 1;
        self.lost = self.closed_lost + self.run_lost();
    }

    /// Updates the interarrival jitter from a packet's RTP timestamp and its arrival time, both
    /// in units of the stream's clock (RFC 3550 A.8; wrapping arithmetic, as the RFC's).
    pub(crate) fn record_arrival(&mut self, rtp_ts: u32, arrival_ts: u32) {
        let transit = arrival_ts.wrapping_sub(rtp_ts);
        if let Some(last) = self.last_transit {
            let d = (transit.wrapping_sub(last) as i32).unsigned_abs();
            let j = self.jitter_q4 as i64 + d as i64 - ((self.jitter_q4 as i64 + 8) >> 4);
            self.jitter_q4 = j.clamp(0, u32::MAX as i64) as u32;
        }
        self.last_transit = Some(transit);
    }

    /// Interarrival jitter in timestamp units (the RTCP report block field).
    pub fn jitter(&self) -> u32 {
        self.jitter_q4 >> 4
    }

    /// Extended highest sequence number received (cycles in the upper 16 bits).
    pub fn extended_highest_seq(&self) -> u32 {
        self.max.max(0) as u32
    }

    fn run_lost(&self) -> u64 {
        let expected = (self.max - self.base + 1).max(0) as u64;
        expected.saturating_sub(self.run_received)
    }
}

/// Maps RTP timestamps of one stream to frame positions in the recording.
///
/// Within one SSRC the position follows the RTP timestamp (immune to network jitter). The mapping
/// is anchored on the packet's wall-clock position at the first packet, at an SSRC change, at a
/// sequence jump, and whenever the timestamp-derived position drifts from the wall-clock one by
/// more than [`Aligner::MAX_DRIFT_MS`] (a timestamp jump, a pause the sender did not advance its
/// clock over, a clock running wild).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Aligner {
    anchor: Option<Anchor>,
    /// How often the mapping was re-anchored after the first packet.
    pub reanchors: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Anchor {
    ssrc: u32,
    seq: u16,
    ts: u32,
    pos: i64,
}

impl Aligner {
    pub(crate) const MAX_DRIFT_MS: i64 = 1000;
    const MAX_SEQ_JUMP: i32 = 1000;

    /// Position (in frames at `out_rate`) of the first sample of a packet. `wall_pos` is the
    /// packet's arrival position (frames since the recording started, from wall time).
    pub(crate) fn position(
        &mut self,
        h: &RtpHeader,
        clock_rate: u32,
        out_rate: u32,
        wall_pos: i64,
    ) -> i64 {
        let clock_rate = clock_rate.max(1) as i64;
        let max_drift = Self::MAX_DRIFT_MS * out_rate as i64 / 1000;
        if let Some(a) = self.anchor.filter(|a| a.ssrc == h.ssrc) {
            let dts = h.timestamp.wrapping_sub(a.ts) as i32 as i64;
            let dseq = h.seq.wrapping_sub(a.seq) as i16 as i32;
            let pos = a.pos + dts * out_rate as i64 / clock_rate;
            if (pos - wall_pos).abs() <= max_drift && dseq.abs() <= Self::MAX_SEQ_JUMP {
                // Move the anchor forward so timestamp differences stay small on long calls.
                if dseq > 0 {
                    self.anchor = Some(Anchor {
                        seq: h.seq,
                        ts: h.timestamp,
                        pos,
                        ..a
                    });
                }
                return pos;
            }
        }
        if self.anchor.is_some() {
            self.reanchors += 1;
        }
        self.anchor = Some(Anchor {
            ssrc: h.ssrc,
            seq: h.seq,
            ts: h.timestamp,
            pos: wall_pos,
        });
        wall_pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(seq: u16, ts: u32, ssrc: u32) -> RtpHeader {
        RtpHeader {
            payload_type: 0,
            seq,
            timestamp: ts,
            ssrc,
            payload_offset: 12,
            payload_len: 160,
        }
    }

    #[test]
    fn parse_rejects_garbage_and_finds_payload() {
        assert_eq!(parse(&[0u8; 5]), Kind::Malformed);
        assert_eq!(parse(&[0u8; 20]), Kind::Malformed);
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 9];
        p.extend_from_slice(&[0xff; 160]);
        let Kind::Rtp(h) = parse(&p) else {
            panic!("not rtp")
        };
        assert_eq!(
            (h.seq, h.timestamp, h.ssrc, h.payload_len),
            (1, 160, 9, 160)
        );
        // Extension header of one word, padding of 4 bytes.
        let mut p = vec![
            0xB0, 8, 0, 1, 0, 0, 0, 160, 0, 0, 0, 9, 0xbe, 0xde, 0, 1, 1, 2, 3, 4,
        ];
        p.extend_from_slice(&[0x55; 10]);
        p.extend_from_slice(&[0, 0, 0, 4]);
        let Kind::Rtp(h) = parse(&p) else {
            panic!("not rtp")
        };
        assert_eq!(
            (h.payload_offset, h.payload_len, h.payload_type),
            (20, 10, 8)
        );
        assert_eq!(
            parse(&[0x80, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
            Kind::Rtcp
        );
    }

    #[test]
    fn loss_counts_gaps_and_survives_wrap() {
        let mut s = SsrcStats::new(1, 65530);
        for seq in [65530u16, 65531, 65533, 65534, 0, 1, 3] {
            s.record(seq);
        }
        assert_eq!((s.packets, s.lost), (7, 3));
        // Reordering does not count as loss once the packet shows up.
        s.record(2);
        assert_eq!(s.lost, 2);
        assert_eq!(s.extended_highest_seq(), 65536 + 3);
    }

    #[test]
    fn handed_over_stats_go_on_as_if_never_stopped() {
        let mut whole = SsrcStats::new(5, 65000);
        let mut first = SsrcStats::new(5, 65000);
        // A gap (65003 lost), a wrap, jittered arrivals.
        let packets: Vec<(u16, u32)> = [65000u16, 65001, 65002, 65004, 65535, 0, 1, 2]
            .iter()
            .enumerate()
            .map(|(i, &seq)| (seq, 1000 + i as u32 * 160 + (i as u32 % 3) * 7))
            .collect();
        let (before, after) = packets.split_at(4);
        for &(seq, at) in before {
            for s in [&mut whole, &mut first] {
                s.record(seq);
                s.record_arrival(seq as u32 * 160, at);
            }
        }
        let json = serde_json::to_string(&SsrcState::from(&first)).unwrap();
        let mut resumed = SsrcStats::from(serde_json::from_str::<SsrcState>(&json).unwrap());
        for &(seq, at) in after {
            for s in [&mut whole, &mut resumed] {
                s.record(seq);
                s.record_arrival(seq as u32 * 160, at);
            }
        }
        assert_eq!(resumed, whole);
        assert!(whole.lost > 0 && whole.jitter() > 0, "{whole:?}");
    }

    #[test]
    fn jitter_follows_rfc3550_a8() {
        let mut s = SsrcStats::new(1, 0);
        // Packets 160 ticks apart; arrivals alternate 0 and 32 ticks late.
        for i in 0..200u32 {
            s.record_arrival(i * 160, i * 160 + (i % 2) * 32 + 1000);
        }
        // J converges to |D| = 32 (J += (|D| - J) / 16).
        assert!((30..=32).contains(&s.jitter()), "{}", s.jitter());
        let mut steady = SsrcStats::new(2, 0);
        for i in 0..50u32 {
            steady.record_arrival(i * 160, i * 160 + 7);
        }
        assert_eq!(steady.jitter(), 0);
    }

    #[test]
    fn aligner_follows_timestamps_and_reanchors_on_ssrc_change() {
        let mut a = Aligner::default();
        assert_eq!(a.position(&hdr(1, 1000, 7), 8000, 8000, 80), 80);
        // Jittered arrival does not move the position.
        assert_eq!(a.position(&hdr(2, 1160, 7), 8000, 8000, 400), 240);
        // New SSRC: anchored on wall time.
        assert_eq!(a.position(&hdr(500, 90, 8), 8000, 8000, 16000), 16000);
        // Same SSRC, timestamp did not advance over a 2 s pause: wall time wins.
        assert_eq!(a.position(&hdr(501, 250, 8), 8000, 8000, 32160), 32160);
        assert_eq!(a.reanchors, 2);
    }
}
