//! G.729 / G.729A with Annex B (comfort noise) through Debian's libbcg729: a thin safe wrapper
//! of its four C functions (no maintained Rust binding exists).

use std::ptr::NonNull;

use thiserror::Error;

/// One G.729 frame: 10 ms, 10 bytes, 80 samples at 8 kHz.
pub const FRAME_BYTES: usize = 10;
pub const FRAME_SAMPLES: usize = 80;
/// An Annex B SID (comfort noise) frame.
const SID_BYTES: usize = 2;

#[repr(C)]
struct DecoderCtx {
    _private: [u8; 0],
}

#[repr(C)]
struct EncoderCtx {
    _private: [u8; 0],
}

#[link(name = "bcg729")]
unsafe extern "C" {
    fn initBcg729DecoderChannel() -> *mut DecoderCtx;
    fn closeBcg729DecoderChannel(ctx: *mut DecoderCtx);
    fn bcg729Decoder(
        ctx: *mut DecoderCtx,
        bit_stream: *const u8,
        bit_stream_length: u8,
        frame_erasure_flag: u8,
        sid_frame_flag: u8,
        rfc3389_payload_flag: u8,
        signal: *mut i16,
    );
    fn initBcg729EncoderChannel(enable_vad: u8) -> *mut EncoderCtx;
    fn closeBcg729EncoderChannel(ctx: *mut EncoderCtx);
    fn bcg729Encoder(
        ctx: *mut EncoderCtx,
        input_frame: *const i16,
        bit_stream: *mut u8,
        bit_stream_length: *mut u8,
    );
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum G729Error {
    #[error("libbcg729 could not allocate a channel")]
    Alloc,
    #[error("payload of {0} bytes is not whole G.729 frames")]
    Length(usize),
}

/// A decoder channel (its state carries across frames).
pub struct Decoder(NonNull<DecoderCtx>);

// The context is plain memory owned by this value; libbcg729 keeps no global state.
unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new() -> Result<Self, G729Error> {
        // SAFETY: no arguments; a null return is handled.
        NonNull::new(unsafe { initBcg729DecoderChannel() })
            .map(Decoder)
            .ok_or(G729Error::Alloc)
    }

    /// Decodes one RTP payload: whole 10-byte frames, optionally ending in a 2-byte SID frame
    /// (RFC 3551 §4.5.6).
    pub fn decode(&mut self, payload: &[u8], out: &mut Vec<i16>) -> Result<(), G729Error> {
        let sid = payload.len() % FRAME_BYTES == SID_BYTES;
        if !payload.len().is_multiple_of(FRAME_BYTES) && !sid {
            return Err(G729Error::Length(payload.len()));
        }
        for frame in payload.chunks(FRAME_BYTES) {
            self.frame(frame, false, frame.len() == SID_BYTES, out);
        }
        Ok(())
    }

    /// `frames` erased frames: the decoder's own concealment.
    pub fn conceal(&mut self, frames: usize, out: &mut Vec<i16>) {
        for _ in 0..frames.max(1) {
            self.frame(&[0; FRAME_BYTES], true, false, out);
        }
    }

    fn frame(&mut self, bits: &[u8], erased: bool, sid: bool, out: &mut Vec<i16>) {
        let mut signal = [0i16; FRAME_SAMPLES];
        // SAFETY: the context is live (owned); `bits` holds `bits.len()` (<= 10) bytes and the
        // library reads at most that many; `signal` has room for the 80 samples it writes.
        unsafe {
            bcg729Decoder(
                self.0.as_ptr(),
                bits.as_ptr(),
                bits.len() as u8,
                u8::from(erased),
                u8::from(sid),
                0,
                signal.as_mut_ptr(),
            )
        };
        out.extend_from_slice(&signal);
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: created by initBcg729DecoderChannel, closed once.
        unsafe { closeBcg729DecoderChannel(self.0.as_ptr()) }
    }
}

/// The encoder, for tests that need a G.729 stream from an independent implementation.
pub struct Encoder(NonNull<EncoderCtx>);

unsafe impl Send for Encoder {}

impl Encoder {
    /// With `vad`, silence is sent as Annex B SID frames (2 bytes) or nothing.
    pub fn new(vad: bool) -> Result<Self, G729Error> {
        // SAFETY: a null return is handled.
        NonNull::new(unsafe { initBcg729EncoderChannel(u8::from(vad)) })
            .map(Encoder)
            .ok_or(G729Error::Alloc)
    }

    /// Encodes one 80-sample frame: 10 bytes, 2 (SID) or none (untransmitted, with VAD).
    pub fn encode(&mut self, frame: &[i16; FRAME_SAMPLES]) -> Vec<u8> {
        let mut bits = [0u8; FRAME_BYTES];
        let mut len = 0u8;
        // SAFETY: the context is live; the input has 80 samples, the output room for 10 bytes.
        unsafe { bcg729Encoder(self.0.as_ptr(), frame.as_ptr(), bits.as_mut_ptr(), &mut len) };
        bits[..usize::from(len).min(FRAME_BYTES)].to_vec()
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: created by initBcg729EncoderChannel, closed once.
        unsafe { closeBcg729EncoderChannel(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::codec::tests::{tone, tone_ratio};

    #[test]
    fn bcg729_round_trip_keeps_the_tone_and_conceals() {
        let input = tone(700.0, 8000, 8000);
        let mut enc = Encoder::new(false).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        for pair in input.chunks_exact(2 * FRAME_SAMPLES) {
            let mut payload = Vec::new();
            for f in pair.chunks_exact(FRAME_SAMPLES) {
                payload.extend(enc.encode(f.try_into().unwrap()));
            }
            assert_eq!(payload.len(), 20);
            dec.decode(&payload, &mut out).unwrap();
        }
        assert_eq!(out.len(), 8000);
        assert!(tone_ratio(&out[800..], 700.0, 8000) > 0.7);
        dec.conceal(2, &mut out);
        assert_eq!(out.len(), 8160);
        assert_eq!(dec.decode(&[0; 7], &mut out), Err(G729Error::Length(7)));
    }

    #[test]
    fn annex_b_sid_frames_decode_to_comfort_noise() {
        // With VAD, bcg729 sends silence as 2-byte SID frames (or nothing while it holds).
        let mut enc = Encoder::new(true).unwrap();
        let mut dec = Decoder::new().unwrap();
        let quiet: Vec<i16> = (0..8000).map(|i| ((i * 7919) % 61) as i16 - 30).collect();
        let (mut sid, mut out) = (0, Vec::new());
        for f in quiet.chunks_exact(FRAME_SAMPLES) {
            let bits = enc.encode(f.try_into().unwrap());
            match bits.len() {
                SID_BYTES => {
                    sid += 1;
                    // A voice frame followed by a SID frame in one payload (RFC 3551 §4.5.6).
                    let mut payload = vec![0u8; FRAME_BYTES];
                    payload.extend(&bits);
                    dec.decode(&payload, &mut out).unwrap();
                }
                FRAME_BYTES => dec.decode(&bits, &mut out).unwrap(),
                n => assert_eq!(n, 0),
            }
        }
        assert!(sid > 0, "no SID frame for silence");
        assert_eq!(out.len() % (2 * FRAME_SAMPLES), 0);
        // Comfort noise is quiet, not silence and not a burst.
        let tail = &out[out.len() - 2 * FRAME_SAMPLES..];
        assert!(tail.iter().all(|s| s.abs() < 2000), "{tail:?}");
    }
}
