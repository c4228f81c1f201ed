//! Encoding, on the packet stage: a captured packet becomes a pcap record in its recording's
//! buffer and, for decoded audio, PCM samples in its WAV window (`recording.rs` drives both).

pub mod dtmf;
pub(crate) mod g711;
pub mod media;
pub(crate) mod pcap;
pub(crate) mod recording;
pub mod rtp;
pub(crate) mod wav;
