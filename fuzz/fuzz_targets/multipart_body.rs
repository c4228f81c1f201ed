//! Multipart request bodies, and the SDP and metadata parts taken from them as an INVITE's are.
//!
//! Input: the Content-Type value up to the first newline, then the body.
#![no_main]

use std::time::UNIX_EPOCH;

use libfuzzer_sys::fuzz_target;
use recorder::siprec::{parse_metadata, parse_offer, split_body, MetadataState, MAX_BODY_LEN};

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => (std::str::from_utf8(&data[..nl]).ok(), &data[nl + 1..]),
        None => (None, data),
    };
    let Ok(parts) = split_body(content_type, body) else {
        return;
    };
    // A part is taken from the body, never made up.
    for part in [&parts.sdp, &parts.metadata].into_iter().flatten() {
        assert!(part.len() <= body.len().min(MAX_BODY_LEN));
    }
    if let Some(sdp) = &parts.sdp {
        let _ = parse_offer(sdp);
    }
    if let Some(xml) = &parts.metadata {
        if let Ok(doc) = parse_metadata(xml) {
            let mut state = MetadataState::default();
            state.apply(doc, UNIX_EPOCH);
            let _ = state.participants();
        }
    }
});
