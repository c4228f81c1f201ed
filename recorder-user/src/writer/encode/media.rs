//! A stream's media state on the packet stage: SRTP decryption, the decoders of its payload
//! types, concealment of lost packets and resampling to the WAV's rate, with their counters
//! for `metadata.json`. Memory only: nothing here touches a file.

use serde::{Deserialize, Serialize};

use super::rtp::RtpHeader;
use crate::{
    events::{Codec, StreamInfo},
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

/// What the pcap holds of SRTP streams: the packets as received (default: the evidence as it
/// was on the wire, playable only with the keys), or decrypted RTP/RTCP (Wireshark and tshark
/// play it; the pcap then holds the conversation in the clear, like the WAV). Packets that
/// fail authentication are kept as received either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PcapSrtp {
    #[default]
    Received,
    Decrypted,
}

/// `frame` (Ethernet, optional VLAN tags, IPv4 or IPv6, UDP) with its UDP payload replaced by
/// `plain` (shorter: tag and MKI gone), its length fields adjusted and its checksums made
/// valid. `None` when the frame is not of that shape (it is then stored as received).
pub(crate) fn decrypted_frame(
    frame: &[u8],
    payload_offset: usize,
    plain: &[u8],
) -> Option<Vec<u8>> {
    let udp = payload_offset.checked_sub(8)?;
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    while matches!(ethertype, 0x8100 | 0x88a8) {
        ethertype = u16::from_be_bytes([*frame.get(l3 + 2)?, *frame.get(l3 + 3)?]);
        l3 += 4;
    }
    let cut = frame.len().checked_sub(payload_offset + plain.len())?;
    let mut out = Vec::with_capacity(payload_offset + plain.len());
    out.extend_from_slice(frame.get(..payload_offset)?);
    out.extend_from_slice(plain);
    let sub = |b: &mut [u8]| {
        let v = u16::from_be_bytes([b[0], b[1]]).checked_sub(cut as u16)?;
        b.copy_from_slice(&v.to_be_bytes());
        Some(())
    };
    sub(out.get_mut(udp + 4..udp + 6)?)?;
    out[udp + 6..udp + 8].fill(0);
    // The headers must end where the capture says the UDP header starts.
    let l3_len = match ethertype {
        0x0800 => usize::from(frame.get(l3)? & 0x0f) * 4,
        0x86dd => 40,
        _ => return None,
    };
    if l3 + l3_len > udp || l3_len < 20 {
        return None;
    }
    match ethertype {
        0x0800 => {
            let ihl = usize::from(out.get(l3)? & 0x0f) * 4;
            sub(out.get_mut(l3 + 2..l3 + 4)?)?;
            out[l3 + 10..l3 + 12].fill(0);
            let sum = checksum(&[out.get(l3..l3 + ihl)?]);
            out[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            // UDP checksum 0: none (RFC 768), valid for IPv4.
        }
        0x86dd => {
            sub(out.get_mut(l3 + 4..l3 + 6)?)?;
            // IPv6 requires it: pseudo-header (addresses, length, next header 17) + UDP.
            let len = (out.len() - udp) as u32;
            let pseudo = [len.to_be_bytes(), 17u32.to_be_bytes()].concat();
            let sum = checksum(&[out.get(l3 + 8..l3 + 40)?, &pseudo, &out[udp..]]);
            let sum = if sum == 0 { 0xffff } else { sum };
            out[udp + 6..udp + 8].copy_from_slice(&sum.to_be_bytes());
        }
        _ => return None,
    }
    Some(out)
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each of even length but the
/// last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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

/// Decoded audio handed to the WAV: samples, or G.711 bytes with their table (decoded as they
/// are interleaved).
pub(crate) enum Samples<'a> {
    Pcm(&'a [i16]),
    G711(&'a [u8], &'static [i16; 256]),
}

impl Samples<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Samples::Pcm(s) => s.len(),
            Samples::G711(b, _) => b.len(),
        }
    }
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
    /// Codecs negotiated before a re-INVITE changed the payload type, by payload type.
    #[serde(default)]
    earlier: Vec<Codec>,
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
            earlier: self.earlier.clone(),
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

    /// Keeps decoding `codec`'s payload type after a re-INVITE moved the stream to another
    /// one (a dynamic type is then no longer in the stream's info).
    pub(crate) fn remember_codec(&mut self, codec: &Codec) {
        self.earlier
            .retain(|c| c.payload_type != codec.payload_type);
        self.earlier.push(codec.clone());
    }

    pub(crate) fn earlier_codec(&self, pt: u8) -> Option<Kind> {
        self.earlier
            .iter()
            .find(|c| c.payload_type == pt)
            .and_then(Kind::for_codec)
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
        mut place: impl FnMut(i64, Samples<'_>),
    ) -> bool {
        let rate = kind.sample_rate();
        self.stats.sample_rate = Some(rate);
        if let (Some(table), true) = (kind.g711_table(), rate == wav_rate) {
            // G.711 has no concealment and needs no state: straight into the WAV.
            if data.is_empty() {
                self.stats.decode_errors += 1;
                return false;
            }
            self.stats.decoded_packets += 1;
            place(pos, Samples::G711(data, table));
            return true;
        }
        let pt = h.payload_type;
        let idx = match self
            .decoders
            .iter()
            .position(|(p, d)| *p == pt && d.kind() == kind)
        {
            Some(i) => i,
            None => match Decoder::new(kind) {
                Ok(d) => {
                    // A payload type given to another codec: the old decoder goes.
                    self.decoders.retain(|(p, _)| *p != pt);
                    self.decoders.push((pt, d));
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
            place(start, Samples::Pcm(&self.samples));
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
            if r.push(start, &self.samples, |p, s| place(p, Samples::Pcm(s)))
                .is_err()
            {
                self.stats.decode_errors += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v6: bool, vlan: bool, payload: &[u8]) -> (Vec<u8>, usize) {
        let mut f = vec![0u8; 12];
        if vlan {
            f.extend([0x81, 0x00, 0x00, 0x05]);
        }
        let udp_len = (8 + payload.len()) as u16;
        if v6 {
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend(udp_len.to_be_bytes());
            f.extend([17, 64]);
            f.extend((0..32).map(|i| i as u8));
        } else {
            f.extend([0x08, 0x00, 0x45, 0]);
            f.extend((20 + udp_len).to_be_bytes());
            f.extend([0, 0, 0x40, 0, 64, 17, 0xde, 0xad, 10, 0, 0, 1, 10, 0, 0, 2]);
        }
        f.extend([0x79, 0x18, 0x75, 0x30]);
        f.extend(udp_len.to_be_bytes());
        f.extend([0xbe, 0xef]);
        let off = f.len();
        f.extend_from_slice(payload);
        (f, off)
    }

    #[test]
    fn decrypted_frames_have_their_lengths_and_checksums_right() {
        let srtp: Vec<u8> = (0..182).map(|i| i as u8).collect();
        let plain = &srtp[..172];
        for (v6, vlan) in [(false, false), (false, true), (true, false), (true, true)] {
            let (f, off) = frame(v6, vlan, &srtp);
            let out = decrypted_frame(&f, off, plain).unwrap();
            assert_eq!(out.len(), f.len() - 10);
            assert_eq!(&out[off..], plain);
            let l3 = if vlan { 18 } else { 14 };
            let udp = off - 8;
            assert_eq!(u16::from_be_bytes([out[udp + 4], out[udp + 5]]), 180);
            if v6 {
                assert_eq!(u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]), 180);
                let pseudo = [180u32.to_be_bytes(), 17u32.to_be_bytes()].concat();
                assert_eq!(checksum(&[&out[l3 + 8..l3 + 40], &pseudo, &out[udp..]]), 0);
            } else {
                assert_eq!(u16::from_be_bytes([out[l3 + 2], out[l3 + 3]]), 200);
                assert_eq!(checksum(&[&out[l3..l3 + 20]]), 0, "header checksum valid");
                assert_eq!(out[udp + 6..udp + 8], [0, 0]);
            }
        }
        let (mut f, off) = frame(false, false, &srtp);
        f[12] = 0x88; // not IP
        assert!(decrypted_frame(&f, off, plain).is_none());
        // A UDP offset inside the IP header (never from the XDP parser): refused, no panic.
        let (f, _) = frame(true, false, &srtp);
        assert!(decrypted_frame(&f, 30, &srtp[..10]).is_none());
        for off in 0..f.len() {
            let _ = decrypted_frame(&f, off, &[]);
            let _ = decrypted_frame(&f[..off], off.saturating_sub(3), &[1, 2]);
        }
    }
}
