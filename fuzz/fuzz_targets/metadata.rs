//! RFC 7865 metadata: documents (`complete` and `partial`, separated by NUL) parsed and merged
//! in order into one session's state, as an INVITE and its re-INVITEs/UPDATEs deliver them.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use recorder::siprec::{parse_metadata, MetadataState};

fuzz_target!(|data: &[u8]| {
    let mut state = MetadataState::default();
    let mut applied = 0;
    for (i, part) in data.split(|b| *b == 0).enumerate().take(8) {
        let xml = String::from_utf8_lossy(part);
        if let Ok(doc) = parse_metadata(&xml) {
            state.apply(doc, UNIX_EPOCH + Duration::from_secs(i as u64));
            applied += 1;
        }
    }
    assert_eq!(state.documents() as usize, applied);
    for p in state.participants() {
        let _ = state.participant_extensions(&p.id);
    }
    for s in state.streams() {
        let _ = state.label_of_stream(&s.id);
    }
    let _ = state.call_uuid();
    let _ = state.unresolved_refs();
    let _ = state.extensions();
    let _ = state.session_ids();
    let _ = state.groups();
    let _ = state.sessions();
    let _ = state.session_recording_assocs();
});
