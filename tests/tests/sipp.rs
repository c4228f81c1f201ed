//! The recorder against an independent SIP implementation: SIPp runs the SIPREC client scenario
//! in `tests/sipp/siprec_uac.xml` (multipart INVITE with metadata, RTP via rtp_stream, BYE).

use std::{path::PathBuf, process::Command};

use tests::{
    daemon::{scratch_dir, tshark_count, Daemon, DaemonOptions},
    net::VethPair,
};

const UUID: &str = "SIPP0000111122223333444455556666";

#[test]
fn sipp_siprec_session_is_recorded() {
    let pair = VethPair::new("sipp");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let dir = scratch_dir("sipp");
    // Two seconds of a 440 Hz tone as 8 kHz mu-law, what SIPp streams as PCMU.
    let tone = dir.join("tone.wav");
    let status = Command::new("sox")
        .args(["-n", "-r", "8000", "-c", "1", "-e", "u-law"])
        .arg(&tone)
        .args(["synth", "2", "sine", "440"])
        .status()
        .expect("run sox (install: cargo xtask setup)");
    assert!(status.success());
    let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sipp/siprec_uac.xml");
    let out = VethPair::command(&pair.sender_ns, "sipp")
        .arg(daemon.sip.to_string())
        .arg("-sf")
        .arg(&scenario)
        .args(["-m", "1", "-i", &pair.sender_v4.to_string()])
        .args(["-mi", &pair.sender_v4.to_string(), "-mp", "32000"])
        .args(["-key", "tone_file", tone.to_str().unwrap()])
        .args(["-key", "call_uuid", UUID])
        .args([
            "-timeout",
            "30s",
            "-timeout_error",
            "-nostdin",
            "-trace_err",
        ])
        .arg("-error_file")
        .arg(dir.join("sipp-errors.log"))
        .current_dir(&dir)
        .output()
        .expect("run sipp (install: cargo xtask setup)");
    let errors = std::fs::read_to_string(dir.join("sipp-errors.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "sipp failed ({}):\n{}\n{errors}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    let recordings = daemon.recordings();
    assert_eq!(recordings.len(), 1);
    let meta = loop {
        let meta = tests::daemon::read_json(&recordings[0].join("metadata.json")).unwrap();
        if meta["state"] != "active" {
            break meta;
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling the daemon's file
    };
    assert_eq!(meta["end_reason"], "bye");
    assert_eq!(meta["call_uuid"], UUID);
    let packets = meta["streams"][0]["packets"].as_u64().unwrap();
    // 2 s of 20 ms packets.
    assert!(
        (95..=101).contains(&packets),
        "{packets} RTP packets recorded"
    );
    assert_eq!(
        tshark_count(&recordings[0].join("recording.pcap"), Some("udp")) as u64,
        packets
    );
    let _ = std::fs::remove_dir_all(&dir);
}
