//! The handover file (`<spool>/.handover.json`): parsed as the next daemon parses it, written
//! back and read again unchanged, and its sessions restored into a recorder and endpoint.
#![no_main]

use std::{net::IpAddr, time::Instant};

use libfuzzer_sys::fuzz_target;
use recorder::{
    flow::MemoryFlows,
    handover::Handover,
    sip::{Endpoint, EndpointConfig},
    siprec::session::{Recorder, SiprecConfig},
};

fuzz_target!(|data: &[u8]| {
    let Ok(handover) = Handover::from_json(data) else {
        return;
    };
    let saved = serde_json::to_vec(&handover).unwrap();
    let again = Handover::from_json(&saved)
        .unwrap_or_else(|e| panic!("a saved handover does not read back: {e}"));
    // As JSON values: maps held in a HashMap are written in a different order each time.
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&saved).unwrap(),
        "not the same after a round trip"
    );
    // The daemon restores only onto the media address the sessions were answered with.
    let media_address = serde_json::to_value(&handover.recorder).unwrap()["media_address"]
        .as_str()
        .and_then(|a| a.parse::<IpAddr>().ok())
        .unwrap_or([10, 20, 0, 50].into());
    let mut endpoint = Endpoint::new(EndpointConfig::default());
    let restored = Recorder::restore(
        SiprecConfig {
            media_address,
            ..SiprecConfig::default()
        },
        MemoryFlows::default(),
        Box::new(|_| {}),
        handover.recorder,
        Instant::now(),
        &mut endpoint,
    );
    if let Ok(recorder) = restored {
        let _ = recorder.sessions();
        let _ = recorder.flow_locals();
    }
    let _ = handover.writer.recording_ids();
});
