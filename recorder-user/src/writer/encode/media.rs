//! A stream's media state on the packet stage: SRTP decryption, the decoders of its payload
//! types, concealment of lost packets and resampling to the WAV's rate, with their counters
//! for `metadata.json`. Memory only: nothing here touches a file.

use serde::{Deserialize, Serialize};

use super::rtp::RtpHeader;
use crate::{
    events::StreamInfo,
    media::{
        codec::{Decoder, Kind},
        resample::Resampler,
        srtp::{SrtpFail, SrtpRx},
    },
};

/// Per-stream media counters, flattened into the stream's entry in `metadata.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MediaStats {
    /// Rate of the stream's decoded audio (before resampling to the WAV's).
    pub sample_rate: Option<u32>,
    /// The SDES suite its packets were decrypted with (never the key).
    pub srtp_suite: Option<String>,
    /// RTP packets decoded into the WAV.
    pub decoded_packets: u64,
    /// SRTP packets whose authentication failed: kept in the pcap as received, never decoded.
    pub auth_failures: u64,
    pub rtcp_auth_failures: u64,
    /// SRTP packets dropped by the replay check (duplicates).
    pub replayed: u64,
    /// SRTP packets that could not be decrypted otherwise (unknown MKI, key past its lifetime).
    pub decrypt_errors: u64,
    /// Payloads the codec rejected.
    pub decode_errors: u64,
    /// Lost packets filled in by the codec's concealment (Opus PLC, G.729 erasure).
    pub concealed_frames: u64,
}

/// What decryption made of a packet.
pub(crate) enum Unprotected {
    /// Not SRTP: the packet as received.
    Clear,
    Plain(Vec<u8>),
    /// Counted; the packet goes no further than the pcap. `auth`: it failed authentication.
    Rejected {
        auth: bool,
    },
}

/// Longest gap (in packets) concealed; longer ones stay silent.
const MAX_CONCEAL: u16 = 5;

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct StreamMedia {
    /// Rollover counters carried by a handover; contexts are rebuilt from the stream's key.
    #[serde(default)]
    srtp: SrtpRx,
    #[serde(default)]
    pub stats: MediaStats,
    #[serde(skip)]
    decoders: Vec<(u8, Decoder)>,
    #[serde(skip)]
    resampler: Option<Resampler>,
    #[serde(skip)]
    samples: Vec<i16>,
    /// SSRC and sequence number of the last decoded packet (for concealment).
    #[serde(skip)]
    last: Option<(u32, u16)>,
}

impl Clone for StreamMedia {
    /// Decoder and resampler state is not cloned: it restarts (see [`SrtpRx`]'s clone too).
    fn clone(&self) -> Self {
        Self {
            srtp: self.srtp.clone(),
            stats: self.stats.clone(),
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for StreamMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMedia")
            .field("stats", &self.stats)
            .finish()
    }
}

impl StreamMedia {
    /// The stream's key (at the start, after a re-INVITE, after a handover). A new key keeps
    /// the old one for packets still in flight.
    pub(crate) fn set_key(&mut self, info: &StreamInfo) -> Result<(), SrtpFail> {
        let Some(c) = &info.sdes else {
            return Ok(());
        };
        self.srtp.set_key(c)?;
        self.stats.srtp_suite = Some(c.suite.name().to_string());
        Ok(())
    }

    /// Decrypts and authenticates an SRTP or SRTCP packet (the UDP payload).
    pub(crate) fn unprotect(
        &mut self,
        info: &StreamInfo,
        payload: &[u8],
        rtcp: bool,
    ) -> Unprotected {
        if info.sdes.is_none() {
            return Unprotected::Clear;
        }
        if !self.srtp.is_keyed() && self.set_key(info).is_err() {
            self.stats.decrypt_errors += 1;
            return Unprotected::Rejected { auth: false };
        }
        match self.srtp.unprotect(payload, rtcp) {
            Ok(plain) => Unprotected::Plain(plain),
            Err(SrtpFail::Auth) if rtcp => {
                self.stats.rtcp_auth_failures += 1;
                Unprotected::Rejected { auth: true }
            }
            Err(SrtpFail::Auth) => {
                self.stats.auth_failures += 1;
                Unprotected::Rejected { auth: true }
            }
            Err(SrtpFail::Replay) => {
                self.stats.replayed += 1;
                Unprotected::Rejected { auth: false }
            }
            Err(SrtpFail::Invalid(_)) => {
                self.stats.decrypt_errors += 1;
                Unprotected::Rejected { auth: false }
            }
        }
    }

    /// Decodes one RTP payload of codec `kind` whose first sample belongs at WAV frame `pos`,
    /// conceals the packets lost just before it, resamples to `wav_rate`, and hands the
    /// samples to `place(position, samples)`. False when the payload could not be decoded.
    pub(crate) fn decode(
        &mut self,
        kind: Kind,
        h: &RtpHeader,
        data: &[u8],
        pos: i64,
        wav_rate: u32,
        mut place: impl FnMut(i64, &[i16]),
    ) -> bool {
        let rate = kind.sample_rate();
        self.stats.sample_rate = Some(rate);
        let idx = match self
            .decoders
            .iter()
            .position(|(pt, _)| *pt == h.payload_type)
        {
            Some(i) => i,
            None => match Decoder::new(kind) {
                Ok(d) => {
                    self.decoders.push((h.payload_type, d));
                    self.decoders.len() - 1
                }
                Err(_) => {
                    self.stats.decode_errors += 1;
                    return false;
                }
            },
        };
        let dec = &mut self.decoders[idx].1;
        self.samples.clear();
        // Concealment comes first in the buffer: it fills the frames before `pos`.
        let lost = match self.last {
            Some((ssrc, seq)) if ssrc == h.ssrc => h.seq.wrapping_sub(seq).wrapping_sub(1),
            _ => 0,
        };
        if (1..=MAX_CONCEAL).contains(&lost) {
            for _ in 0..lost {
                match dec.conceal(&mut self.samples) {
                    Ok(true) => self.stats.concealed_frames += 1,
                    _ => break,
                }
            }
        }
        let concealed = self.samples.len();
        if dec.decode(data, &mut self.samples).is_err() {
            self.stats.decode_errors += 1;
            self.samples.truncate(concealed);
            if concealed == 0 {
                return false;
            }
        } else {
            self.stats.decoded_packets += 1;
        }
        // Reordered or duplicate packets do not move the loss reference back.
        if lost < 0x8000 {
            self.last = Some((h.ssrc, h.seq));
        }
        let start = pos - (concealed as i64 * i64::from(wav_rate) / i64::from(rate));
        if rate == wav_rate {
            place(start, &self.samples);
            return true;
        }
        if self
            .resampler
            .as_ref()
            .is_none_or(|r| r.rates() != (rate, wav_rate))
        {
            match Resampler::new(rate, wav_rate) {
                Ok(r) => self.resampler = Some(r),
                Err(_) => {
                    self.stats.decode_errors += 1;
                    return false;
                }
            }
        }
        if let Some(r) = self.resampler.as_mut() {
            if r.push(start, &self.samples, place).is_err() {
                self.stats.decode_errors += 1;
            }
        }
        true
    }
}
