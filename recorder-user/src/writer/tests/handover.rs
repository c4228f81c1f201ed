//! Handover: a daemon restart that does not end the recordings.

use super::*;

/// (ssrc, seq) of every record of a pcap we wrote, in file order; checks the framing.
fn pcap_rtp_records(path: &Path) -> Vec<(u32, u16)> {
    let d = std::fs::read(path).expect("read pcap");
    assert_eq!(&d[0..4], &0xa1b2_3c4du32.to_le_bytes(), "our pcap magic");
    let mut at = 24;
    let mut out = Vec::new();
    while at < d.len() {
        let incl = u32::from_le_bytes(d[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &d[at + 16..at + 16 + incl];
        let rtp = &frame[42..];
        out.push((
            u32::from_be_bytes(rtp[8..12].try_into().unwrap()),
            u16::from_be_bytes([rtp[2], rtp[3]]),
        ));
        at += 16 + incl;
    }
    assert_eq!(at, d.len(), "no torn record, no tail");
    out
}

/// Sends packets `from..to` (20 ms each) of both senders, `jitter_ms` late.
fn send_both(
    sink: &mut WriterSink,
    a: &mut Sender,
    b: &mut Sender,
    range: std::ops::Range<u64>,
    jitter_ms: i64,
) {
    for k in range {
        a.send(sink, k * 160, jitter_ms, &noise);
        b.send(sink, k * 160, jitter_ms, &noise);
    }
}

#[test]
fn tool_handover_then_resume_records_every_packet_once_in_one_recording() {
    let dir = TempDir::new("handover");
    let config = indexed_writer_config(dir.path());
    let rec = config.spool.join("r1");
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("r1", two_streams(), "uuid-h"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 7000);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 9000);
    send_both(&mut sink, &mut a, &mut b, 0..150, 0);
    let handover = h.handover().expect("handover");
    drop(sink);

    // Between the two daemons: files valid as they are, recording still active everywhere.
    assert_eq!(handover.recording_ids(), vec!["r1".to_string()]);
    assert_eq!(pcap_rtp_records(&rec.join(PCAP_FILE)).len(), 300);
    let (_, _, c) = read_wav(&rec.join(WAV_FILE));
    assert!(c[0].len() >= 149 * 160, "{} frames", c[0].len());
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(
        (m.state, m.streams[0].packets),
        (RecordingState::Active, 150)
    );
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("r1").unwrap().unwrap().state, "active");
    let json = serde_json::to_string(&handover).unwrap();
    let handover: WriterHandover = serde_json::from_str(&json).unwrap();
    assert!(
        repair_spool_except(&config.spool, &handover.recording_ids())
            .unwrap()
            .is_empty()
    );

    let (h, mut sink) = start_resumed(config.clone(), handover).expect("resume");
    // The kernel kept capturing meanwhile: the next packets are drained before any event, and
    // arrive 30 ms late (the WAV must follow their timestamps, as before the restart).
    send_both(&mut sink, &mut a, &mut b, 150..300, 30);
    h.sync();
    assert_eq!(
        h.stats().unknown_flow,
        0,
        "resumed flows are routed at once"
    );
    h.event(ended("r1", 6000));
    h.sync();

    let records = pcap_rtp_records(&rec.join(PCAP_FILE));
    for ssrc in [0xA, 0xB] {
        let seqs: Vec<u16> = records
            .iter()
            .filter(|(s, _)| *s == ssrc)
            .map(|r| r.1)
            .collect();
        assert_eq!(seqs, (1..=300).collect::<Vec<u16>>(), "ssrc {ssrc:#x}");
    }
    assert_eq!(records.len(), 600);
    assert_eq!(
        tshark_rtp_streams(&rec.join(PCAP_FILE)),
        vec![(0xA, 300, 0), (0xB, 300, 0)]
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Complete);
    assert_eq!(m.end_reason.as_deref(), Some("bye"));
    for s in &m.streams {
        assert_eq!(
            (s.packets, s.lost, s.ssrcs.len()),
            (300, 0, 1),
            "{}",
            s.label
        );
        assert_eq!((s.ssrcs[0].packets, s.ssrcs[0].lost), (300, 0));
    }
    // 6 s of audio, time-aligned across the restart on both channels.
    let (ch, _, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    assert_eq!(c[0].len(), 48000);
    assert_eq!(m.wav.frames, 48000);
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    let al = |n: u64| g711::alaw(encode::alaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 100, 47900, ul), Some(0));
    assert_eq!(measured_offset(&c[1], 100, 47900, al), Some(0));
    let row = index.get("r1").unwrap().unwrap();
    assert_eq!(row.state, "complete");
    let st = h.shutdown();
    assert_eq!((st.completed_recordings, st.start_failed), (1, 0));
    let dirs = std::fs::read_dir(&config.spool).unwrap().count();
    assert_eq!(dirs, 1, "one recording directory");
}

#[test]
fn resume_marks_a_recording_with_a_missing_pcap_interrupted_and_goes_on_with_the_others() {
    let dir = TempDir::new("handover-bad");
    let config = indexed_writer_config(dir.path());
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("good", mux_streams(0), "u1"));
    h.event(started("bad", mux_streams(1), "u2"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(3, 40000, 0, 0xB, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
    }
    let handover = h.handover().unwrap();
    let mut ids = handover.recording_ids();
    ids.sort();
    assert_eq!(ids, vec!["bad".to_string(), "good".to_string()]);
    std::fs::remove_file(config.spool.join("bad").join(PCAP_FILE)).unwrap();

    let (h, mut sink) = start_resumed(config.clone(), handover).unwrap();
    for k in 50..100 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
    }
    // A session started after the restart still gets packets that beat its Started.
    let mut c = Sender::new(5, 40000, 0, 0xC, 1, 0);
    c.send(&mut sink, 0, 0, &noise);
    h.event(started("new", mux_streams(2), "u3"));
    // The consumer's next drain (every tick) hands the packet held for it on.
    sink.batch_end();
    // Events about a resumed recording work as about any other: a re-INVITE drops "callee".
    h.event(SessionEvent::MediaChanged {
        id: "good".into(),
        at: at_ms(1500),
        streams: mux_streams(0)[..1].to_vec(),
    });
    h.event(ended("good", 2000));
    h.event(ended("new", 2000));
    h.sync();
    let st = h.stats();
    assert_eq!((st.start_failed, st.completed_recordings), (1, 2));
    assert_eq!(
        st.unknown_flow, 50,
        "packets of the interrupted recording are not written"
    );
    let good = RecordingMetadata::read(&config.spool.join("good")).unwrap();
    assert_eq!(good.state, RecordingState::Complete);
    assert_eq!((good.streams[0].packets, good.streams[0].lost), (100, 0));
    assert!(good.streams[0].removed_at.is_none());
    assert_eq!(
        good.streams[1].removed_at.as_deref(),
        Some(&*metadata::rfc3339(at_ms(1500)))
    );
    let bad = RecordingMetadata::read(&config.spool.join("bad")).unwrap();
    assert_eq!(bad.state, RecordingState::Interrupted);
    assert_eq!(bad.end_reason.as_deref(), Some("resume_failed"));
    assert!(bad.end_detail.as_deref().unwrap_or("").contains("resumed"));
    let new = RecordingMetadata::read(&config.spool.join("new")).unwrap();
    assert_eq!(new.streams[0].packets, 1);
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("bad").unwrap().unwrap().state, "interrupted");
    assert_eq!(index.get("good").unwrap().unwrap().state, "complete");
    h.shutdown();
}

#[test]
fn handover_of_another_version_is_refused() {
    let dir = TempDir::new("handover-ver");
    let (h, _sink) = start_writer(dir.path());
    let mut v = serde_json::to_value(h.handover().unwrap()).unwrap();
    v["version"] = serde_json::json!(HANDOVER_VERSION + 1);
    let old: WriterHandover = serde_json::from_value(v).unwrap();
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    assert!(matches!(
        start_resumed(c, old),
        Err(WriterError::HandoverVersion { .. })
    ));
}
