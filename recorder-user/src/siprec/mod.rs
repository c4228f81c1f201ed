//! SIPREC (RFC 7866) parsing and building blocks, sans-IO: request bodies, SDP offer/answer,
//! RFC 7865 metadata, interaction identifiers and local RTP port allocation.
//!
//! Each submodule has its own error type; the recording-session state machine builds on these.

pub mod body;
pub mod ids;
pub mod metadata;
pub mod ports;
pub mod sdp;

pub use body::{split_body, BodyError, RecordingBody};
pub use ids::{call_ids, DEFAULT_UUID_HEADERS};
pub use metadata::{parse_metadata, MetadataDoc, MetadataError, MetadataState};
pub use ports::PortAllocator;
pub use sdp::{
    answer_crypto, build_answer, choose_codec, parse_offer, Direction, Offer, OfferStream,
    SdpError, StreamAnswer,
};

/// Largest request body (and body part) accepted; real multipart INVITEs are a few KiB.
pub const MAX_BODY_LEN: usize = 256 * 1024;

pub mod session;
