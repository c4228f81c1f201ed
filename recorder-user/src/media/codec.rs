//! Audio decoders for the WAV: G.711 (tables), G.722 (the spandsp decoder ported to Rust, in
//! `ezk-g722`), Opus (Debian's libopus through `audiopus`) and G.729 (Debian's libbcg729, see
//! [`super::g729`]). Each turns one RTP payload into mono samples at its own rate.

use thiserror::Error;

use super::g729;
use crate::events::Codec;

/// A codec the WAV can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pcmu,
    Pcma,
    G722,
    Opus { channels: u8 },
    G729,
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("opus: {0}")]
    Opus(#[from] audiopus::Error),
    #[error("g729: {0}")]
    G729(#[from] g729::G729Error),
    #[error("empty payload")]
    Empty,
}

impl Kind {
    /// The decoder for a negotiated codec (by name, case-insensitively).
    pub fn for_codec(c: &Codec) -> Option<Kind> {
        let n = c.name.as_str();
        Some(if n.eq_ignore_ascii_case("PCMU") {
            Kind::Pcmu
        } else if n.eq_ignore_ascii_case("PCMA") {
            Kind::Pcma
        } else if n.eq_ignore_ascii_case("G722") {
            Kind::G722
        } else if n.eq_ignore_ascii_case("opus") {
            Kind::Opus {
                channels: c.channels.clamp(1, 2),
            }
        } else if n.eq_ignore_ascii_case("G729") || n.eq_ignore_ascii_case("G729A") {
            Kind::G729
        } else {
            return None;
        })
    }

    /// Static payload types (RFC 3551) some clients switch to without a new offer.
    pub fn for_static_pt(pt: u8) -> Option<Kind> {
        match pt {
            0 => Some(Kind::Pcmu),
            8 => Some(Kind::Pcma),
            9 => Some(Kind::G722),
            18 => Some(Kind::G729),
            _ => None,
        }
    }

    /// The byte-to-sample table of G.711: the writer decodes these while it interleaves (no
    /// intermediate buffer per packet).
    pub fn g711_table(self) -> Option<&'static [i16; 256]> {
        match self {
            Kind::Pcmu => Some(&crate::writer::encode::g711::ULAW),
            Kind::Pcma => Some(&crate::writer::encode::g711::ALAW),
            _ => None,
        }
    }

    /// Rate of the decoded audio. G.722 is 16 kHz audio although its RTP clock says 8000
    /// (RFC 3551 §4.5.2); Opus always decodes at 48 kHz here (RFC 7587 §4.1).
    pub fn sample_rate(self) -> u32 {
        match self {
            Kind::Pcmu | Kind::Pcma | Kind::G729 => 8000,
            Kind::G722 => 16000,
            Kind::Opus { .. } => 48000,
        }
    }
}

/// Decoder state of one stream and payload type.
pub struct Decoder {
    kind: Kind,
    state: State,
    /// Samples the last packet decoded to (what a concealed packet is worth).
    last_len: usize,
    /// Decoded samples (interleaved for stereo Opus) before the downmix.
    scratch: Vec<i16>,
}

enum State {
    Table(&'static [i16; 256]),
    G722(Box<ezk_g722::libg722::decoder::Decoder>),
    Opus(audiopus::coder::Decoder),
    G729(g729::Decoder),
}

/// Longest Opus frame: 120 ms at 48 kHz (RFC 6716 §2.1.4), per channel.
const OPUS_MAX_FRAME: usize = 5760;

impl Decoder {
    pub fn new(kind: Kind) -> Result<Self, DecodeError> {
        let state = match kind {
            Kind::Pcmu => State::Table(&crate::writer::encode::g711::ULAW),
            Kind::Pcma => State::Table(&crate::writer::encode::g711::ALAW),
            Kind::G722 => State::G722(Box::new(ezk_g722::libg722::decoder::Decoder::new(
                ezk_g722::libg722::Bitrate::Mode1_64000,
                false,
                false,
            ))),
            Kind::Opus { channels } => State::Opus(audiopus::coder::Decoder::new(
                audiopus::SampleRate::Hz48000,
                if channels == 2 {
                    audiopus::Channels::Stereo
                } else {
                    audiopus::Channels::Mono
                },
            )?),
            Kind::G729 => State::G729(g729::Decoder::new()?),
        };
        Ok(Self {
            kind,
            state,
            last_len: 0,
            scratch: Vec::new(),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Appends the mono samples of one payload to `out`, at [`Kind::sample_rate`].
    pub fn decode(&mut self, payload: &[u8], out: &mut Vec<i16>) -> Result<(), DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        let start = out.len();
        match &mut self.state {
            State::Table(t) => out.extend(payload.iter().map(|&b| t[usize::from(b)])),
            State::G722(d) => out.extend(d.decode(payload)),
            State::Opus(d) => {
                let ch = if matches!(self.kind, Kind::Opus { channels: 2 }) {
                    2
                } else {
                    1
                };
                self.scratch.resize(OPUS_MAX_FRAME * ch, 0);
                let packet = audiopus::packet::Packet::try_from(payload)?;
                let signals = audiopus::MutSignals::try_from(&mut self.scratch[..])?;
                let n = d.decode(Some(packet), signals, false)?;
                downmix(&self.scratch[..n * ch], ch, out);
            }
            State::G729(d) => d.decode(payload, out)?,
        }
        self.last_len = out.len() - start;
        Ok(())
    }

    /// Appends the codec's concealment for one lost packet (Opus PLC, G.729 frame erasure);
    /// `false` when the codec has none (its gap stays silent).
    pub fn conceal(&mut self, out: &mut Vec<i16>) -> Result<bool, DecodeError> {
        if self.last_len == 0 {
            return Ok(false);
        }
        match &mut self.state {
            State::Opus(d) => {
                let ch = if matches!(self.kind, Kind::Opus { channels: 2 }) {
                    2
                } else {
                    1
                };
                self.scratch
                    .resize(self.last_len.min(OPUS_MAX_FRAME) * ch, 0);
                let signals = audiopus::MutSignals::try_from(&mut self.scratch[..])?;
                let n = d.decode(None, signals, false)?;
                downmix(&self.scratch[..n * ch], ch, out);
                Ok(true)
            }
            State::G729(d) => {
                d.conceal(self.last_len / g729::FRAME_SAMPLES, out);
                Ok(true)
            }
            State::Table(_) | State::G722(_) => Ok(false),
        }
    }
}

fn downmix(interleaved: &[i16], channels: usize, out: &mut Vec<i16>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
    } else {
        out.extend(
            interleaved
                .chunks_exact(2)
                .map(|lr| ((i32::from(lr[0]) + i32::from(lr[1])) / 2) as i16),
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tone at `freq` Hz, `n` samples at `rate`.
    pub(crate) fn tone(freq: f64, rate: u32, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| {
                (8000.0 * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin())
                    as i16
            })
            .collect()
    }

    /// Goertzel power of `freq` relative to the signal's power (1.0: a pure tone).
    pub(crate) fn tone_ratio(s: &[i16], freq: f64, rate: u32) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
        let (mut s1, mut s2) = (0.0, 0.0);
        let mut energy = 0.0;
        for &x in s {
            let x = f64::from(x);
            energy += x * x;
            let s0 = x + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        if energy == 0.0 {
            0.0
        } else {
            2.0 * power / (energy * s.len() as f64)
        }
    }

    fn codec(name: &str, rate: u32, channels: u8) -> Codec {
        Codec {
            payload_type: 96,
            name: name.into(),
            clock_rate: rate,
            channels,
            fmtp: None,
        }
    }

    /// Whatever a payload holds, a decoder returns samples or an error, never panics; and
    /// concealment after garbage stays bounded.
    #[test]
    fn garbage_payloads_are_errors_not_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for kind in [
            Kind::Pcmu,
            Kind::Pcma,
            Kind::G722,
            Kind::Opus { channels: 1 },
            Kind::Opus { channels: 2 },
            Kind::G729,
        ] {
            let mut dec = Decoder::new(kind).unwrap();
            let mut out = Vec::new();
            for len in 0..400 {
                let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                out.clear();
                let _ = dec.decode(&junk, &mut out);
                let _ = dec.conceal(&mut out);
                assert!(out.len() <= 2 * OPUS_MAX_FRAME + 8 * len, "{kind:?} {len}");
            }
        }
    }

    #[test]
    fn kinds_from_names_and_static_types() {
        assert_eq!(Kind::for_codec(&codec("g722", 8000, 1)), Some(Kind::G722));
        assert_eq!(
            Kind::for_codec(&codec("OPUS", 48000, 2)),
            Some(Kind::Opus { channels: 2 })
        );
        assert_eq!(Kind::for_codec(&codec("GSM", 8000, 1)), None);
        assert_eq!(Kind::for_static_pt(9).map(Kind::sample_rate), Some(16000));
        assert_eq!(Kind::for_static_pt(18), Some(Kind::G729));
    }

    #[test]
    fn g722_decodes_its_encoders_tone_at_16k() {
        let input = tone(1000.0, 16000, 3200);
        let mut enc = ezk_g722::libg722::encoder::Encoder::new(
            ezk_g722::libg722::Bitrate::Mode1_64000,
            false,
            false,
        );
        let mut dec = Decoder::new(Kind::G722).unwrap();
        let mut out = Vec::new();
        for frame in input.chunks(320) {
            let payload = enc.encode(frame);
            assert_eq!(payload.len(), 160, "20 ms is 160 bytes at 64 kbit/s");
            dec.decode(&payload, &mut out).unwrap();
        }
        assert_eq!(out.len(), 3200);
        assert!(tone_ratio(&out[320..], 1000.0, 16000) > 0.9);
        assert!(!dec.conceal(&mut out).unwrap());
    }

    #[test]
    fn opus_decodes_libopus_tone_and_conceals_a_loss() {
        use audiopus::{coder::Encoder, Application, Channels, SampleRate};
        let enc = Encoder::new(SampleRate::Hz48000, Channels::Stereo, Application::Voip).unwrap();
        let mono = tone(440.0, 48000, 48000);
        let stereo: Vec<i16> = mono.iter().flat_map(|&s| [s, s]).collect();
        let mut dec = Decoder::new(Kind::Opus { channels: 2 }).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        for frame in stereo.chunks(960 * 2) {
            let n = enc.encode(frame, &mut buf[..]).unwrap();
            dec.decode(&buf[..n], &mut out).unwrap();
        }
        assert_eq!(out.len(), 48000);
        assert!(tone_ratio(&out[4800..], 440.0, 48000) > 0.8);
        let before = out.len();
        assert!(dec.conceal(&mut out).unwrap());
        assert_eq!(out.len() - before, 960);
        assert!(dec.decode(&[0xff, 0xff, 0xff], &mut out).is_err());
    }

    /// A mono encoder's stream (`stereo=0`, as most softphones send) on the `opus/48000/2`
    /// every Opus rtpmap names: decoded the same, one sample per 48 kHz frame.
    #[test]
    fn opus_decodes_a_mono_encoded_stream() {
        use audiopus::{coder::Encoder, Application, Channels, SampleRate};
        let enc = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
        let mono = tone(440.0, 48000, 48000);
        let mut dec = Decoder::new(Kind::Opus { channels: 2 }).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        for frame in mono.chunks(960) {
            let n = enc.encode(frame, &mut buf[..]).unwrap();
            dec.decode(&buf[..n], &mut out).unwrap();
        }
        assert_eq!(out.len(), 48000);
        assert!(tone_ratio(&out[4800..], 440.0, 48000) > 0.8);
    }
}
