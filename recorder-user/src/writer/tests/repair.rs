//! Crash repair, retention, the index and shutdown.

use super::*;

#[test]
fn tool_crash_repair_keeps_everything_and_marks_interrupted() {
    let dir = TempDir::new("crash");
    let bytes = abandoned_recording(dir.path(), 300, 100);
    let rec = dir.path().join("crashed");
    // The metadata still has the counters of the flush at packet 100.
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().streams[0].packets,
        100
    );
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().state,
        RecordingState::Active
    );

    let repaired = repair_spool(dir.path()).unwrap();
    assert_eq!(repaired, vec!["crashed".to_string()]);
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (300, bytes));
    let (_, _, c) = read_wav(&rec.join(WAV_FILE));
    // All 300 packets (6 s) of audio are there, the last one included.
    assert_eq!(c[0].len(), 300 * 160);
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 47000, 48000, ul), Some(0));
    need("soxi");
    assert_eq!(
        run(Command::new("soxi").arg("-s").arg(rec.join(WAV_FILE))).trim(),
        "48000"
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.end_reason.as_deref(), Some("crash"));
    assert!(m.ended_at.is_some());
    // A second run finds nothing to do.
    assert!(repair_spool(dir.path()).unwrap().is_empty());
}

/// Set (to a spool path) in the child process of `tool_kill_9_then_repair`.
const CRASH_CHILD_ENV: &str = "RECORDER_WRITER_CRASH_CHILD_SPOOL";

/// The recorder side of `tool_kill_9_then_repair`: records 5 s of two streams, says READY with
/// what it sent, then waits to be killed. Does nothing unless started by that test.
#[test]
#[ignore = "child process of tool_kill_9_then_repair"]
fn crash_child() {
    let Ok(spool) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (h, mut sink) = start_writer(Path::new(&spool));
    h.event(started("killed", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 0);
    let (mut n, mut bytes) = (0u64, 0u64);
    for k in 0..250u64 {
        for s in [&mut a, &mut b] {
            let (f, off) = s.frame(k * 160, &noise);
            feed(&mut sink, s.flow_id, at_ms((k * 20) as i64), &f, off);
            n += 1;
            bytes += f.len() as u64;
        }
    }
    h.sync();
    println!("READY {n} {bytes}");
    loop {
        std::thread::park();
    }
}

#[test]
fn tool_kill_9_then_repair() {
    use std::io::BufRead;
    let dir = TempDir::new("kill9");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer::tests::repair::crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the test binary as the recorder child");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("READY"));
    child.kill().expect("SIGKILL the child"); // Child::kill sends SIGKILL
    child.wait().unwrap();
    let ready = ready.expect("child reported READY");
    let mut it = ready
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().unwrap());
    let (n, bytes) = (it.next().unwrap(), it.next().unwrap());

    let rec = dir.path().join("killed");
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().state,
        RecordingState::Active
    );
    assert_eq!(
        repair_spool(dir.path()).unwrap(),
        vec!["killed".to_string()]
    );
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (n, bytes));
    assert_eq!(
        tshark_rtp_streams(&rec.join(PCAP_FILE)),
        vec![(0xA, 250, 0), (0xB, 250, 0)]
    );
    let (ch, _, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    // 5 s of audio on both channels (trailing samples that decode to 0 may be trimmed).
    assert!(
        (40000 - 160..=40000).contains(&c[0].len()),
        "{} frames",
        c[0].len()
    );
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    let al = |n: u64| g711::alaw(encode::alaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 100, 39000, ul), Some(0));
    assert_eq!(measured_offset(&c[1], 100, 39000, al), Some(0));
    need("soxi");
    let frames = run(Command::new("soxi").arg("-s").arg(rec.join(WAV_FILE)));
    assert_eq!(frames.trim(), c[0].len().to_string());
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.wav.frames, c[0].len() as u64);
}

/// A recording killed before its first metadata.json reached the disk: repair rebuilds one
/// from the pcap and the WAV, marks it interrupted, and the next writer indexes it.
/// Directories without a pcap or a WAV are not recordings and stay as they are.
#[test]
fn repair_rebuilds_metadata_never_written_and_the_writer_indexes_it() {
    let dir = TempDir::new("nometa");
    let mut config = indexed_writer_config(dir.path());
    std::fs::create_dir_all(&config.spool).unwrap();
    let bytes = abandoned_recording(&config.spool, 50, 0);
    let rec = config.spool.join("crashed");
    std::fs::remove_file(rec.join(METADATA_FILE)).unwrap();
    std::fs::create_dir(config.spool.join("empty")).unwrap();
    std::fs::create_dir(config.spool.join("other")).unwrap();
    std::fs::write(config.spool.join("other").join("notes.txt"), b"x").unwrap();
    // The index exists already and never got the recording's row (a new index is filled from
    // the spool, which would hide whether the writer indexes what repair rebuilt).
    drop(crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap());

    let repaired = repair_spool_except(&config.spool, &[]).unwrap();
    assert_eq!(
        repaired,
        vec![Repaired {
            id: "crashed".into(),
            local_ports: vec![40000],
            rebuilt: true,
        }]
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.id, "crashed");
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.end_reason.as_deref(), Some("crash"));
    assert_eq!(
        m.started_at,
        metadata::rfc3339(at_ms(0)),
        "the first packet"
    );
    assert!(m.ended_at.is_some());
    assert_eq!(m.streams.len(), 1);
    let s = &m.streams[0];
    assert_eq!((s.local_port, s.packets, s.bytes), (40000, 50, bytes));
    assert_eq!((m.wav.sample_rate, m.wav.frames), (8000, 50 * 160));
    assert!(
        m.notes.iter().any(|n| n.contains("metadata rebuilt")),
        "{:?}",
        m.notes
    );
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (50, bytes));
    for other in ["empty", "other"] {
        assert!(!config.spool.join(other).join(METADATA_FILE).exists());
    }
    assert!(repair_spool_except(&config.spool, &[]).unwrap().is_empty());

    config.reindex = repaired.into_iter().map(|r| r.id).collect();
    let (h, _sink) = start(config.clone()).unwrap();
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("crashed").unwrap().unwrap().state, "interrupted");
    drop(h);
}

#[test]
fn repair_cuts_a_torn_pcap_record() {
    let dir = TempDir::new("torn");
    abandoned_recording(dir.path(), 10, 0);
    let pcap = dir.path().join("crashed").join(PCAP_FILE);
    let r = crate::writer::encode::pcap::repair(&pcap).unwrap();
    assert_eq!(r.records, 10);
    // Tear the last record: cut 5 bytes from its body.
    let f = std::fs::OpenOptions::new().write(true).open(&pcap).unwrap();
    f.set_len(r.new_len - 5).unwrap();
    let r2 = crate::writer::encode::pcap::repair(&pcap).unwrap();
    assert_eq!(r2.records, 9);
    assert_eq!(r2.new_len, r.new_len - (16 + 214));
}

#[test]
fn retention_deletes_oldest_finished_never_active() {
    let dir = TempDir::new("retention");
    let (h, _sink) = start_writer(dir.path());
    for (i, id) in ["old", "mid", "new"].iter().enumerate() {
        let mut ev = started(id, two_streams(), "u");
        if let SessionEvent::Started { at, .. } = &mut ev {
            *at = at_ms(i as i64 * 60_000);
        }
        h.event(ev);
        h.event(ended(id, i as i64 * 60_000 + 10_000));
    }
    // Started now: shutdown will end it now (not years after t0).
    h.event(started_at("live", SystemTime::now()));
    h.sync();
    let spool = dir.path();
    let size = |id: &str| crate::writer::retention::dir_size(&spool.join(id));
    let total: u64 = ["old", "mid", "new", "live"].iter().map(|i| size(i)).sum();
    // Room for everything but the oldest.
    let policy = RetentionPolicy {
        max_age: None,
        max_bytes: Some(total - size("old") + 1),
    };
    assert_eq!(
        enforce_retention(spool, policy, SystemTime::now()).unwrap(),
        vec!["old"]
    );
    // Age: everything finished is older than a minute; the live one stays.
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(60)),
        max_bytes: None,
    };
    assert_eq!(
        enforce_retention(spool, policy, SystemTime::now()).unwrap(),
        vec!["mid", "new"]
    );
    // Even a zero size limit never deletes an active recording.
    let policy = RetentionPolicy {
        max_age: None,
        max_bytes: Some(0),
    };
    assert!(enforce_retention(spool, policy, SystemTime::now())
        .unwrap()
        .is_empty());
    assert!(spool.join("live").join(METADATA_FILE).exists());
    h.shutdown();
}

#[test]
fn index_is_kept_by_the_writer_and_retention() {
    let dir = TempDir::new("windex");
    let spool = dir.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    c.retention_max_age = Some(Duration::from_secs(1));
    let (h, _sink) = start(c).unwrap();
    h.event(started("a", two_streams(), "U1"));
    h.sync();
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    let rows = index.by_call_uuid("U1").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "active");
    h.event(ended("a", 1000));
    h.sync();
    assert_eq!(index.by_call_uuid("U1").unwrap()[0].state, "complete");
    assert_eq!(h.enforce_retention().unwrap(), vec!["a"]);
    assert!(index.by_call_uuid("U1").unwrap().is_empty());
    h.shutdown();
}

/// A recording of a CallUUID already in the index is linked to its interaction (first id) and to
/// the latest earlier recording; a reused SIP Call-ID with another CallUUID links nothing.
#[test]
fn recordings_of_one_call_uuid_are_linked_and_a_reused_call_id_is_not() {
    let dir = TempDir::new("wlink");
    let spool = dir.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    let (h, _sink) = start(c).unwrap();
    let with = |id: &str, secs: u64, uuid: &str, call_id: &str| {
        let mut ev = started(id, two_streams(), uuid);
        if let SessionEvent::Started { at, ids, .. } = &mut ev {
            *at = t0() + Duration::from_secs(secs);
            ids.sip_call_id = call_id.into();
        }
        ev
    };
    h.event(with("first", 0, "U1", "same@sbc"));
    h.event(ended("first", 5_000));
    h.event(with("second", 10, "U1", "b@sbc"));
    h.event(ended("second", 15_000));
    // An unrelated session reusing the first one's Call-ID.
    h.event(with("unrelated", 20, "U2", "same@sbc"));
    h.event(with("third", 30, "U1", "c@sbc"));
    // The CallUUID of this one only arrives with metadata in a re-INVITE: linked then.
    let mut late = with("late", 40, "U1", "d@sbc");
    if let SessionEvent::Started { ids, .. } = &mut late {
        ids.call_uuid = None;
    }
    h.event(late);
    h.sync();
    assert_eq!(
        RecordingMetadata::read(&spool.join("late"))
            .unwrap()
            .interaction,
        None
    );
    h.event(SessionEvent::ParticipantsChanged {
        id: "late".into(),
        at: t0() + Duration::from_secs(41),
        participants: vec![],
        metadata: None,
        ids: CallIds {
            sip_call_id: "d@sbc".into(),
            call_uuid: Some("U1".into()),
            ..Default::default()
        },
    });
    h.sync();
    let meta = |id: &str| RecordingMetadata::read(&spool.join(id)).unwrap();
    assert_eq!(meta("first").interaction, None, "the first links nothing");
    assert_eq!(meta("second").interaction.as_deref(), Some("first"));
    assert_eq!(meta("second").previous.as_deref(), Some("first"));
    assert_eq!(meta("third").interaction.as_deref(), Some("first"));
    assert_eq!(meta("third").previous.as_deref(), Some("second"));
    assert_eq!(meta("unrelated").interaction, None);
    assert_eq!(meta("unrelated").previous, None);
    assert_eq!(meta("late").interaction.as_deref(), Some("first"));
    assert_eq!(meta("late").previous.as_deref(), Some("third"));
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    let rows = index.by_call_uuid("U1").unwrap();
    let links: Vec<(&str, Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.interaction.as_deref(),
                r.previous.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        links,
        vec![
            ("first", None, None),
            ("second", Some("first"), Some("first")),
            ("third", Some("first"), Some("second")),
            ("late", Some("first"), Some("third")),
        ]
    );
    assert_eq!(index.by_call_uuid("U2").unwrap().len(), 1);
    h.shutdown();
}

#[test]
fn shutdown_completes_active_recordings() {
    let dir = TempDir::new("shutdown");
    let (h, _sink) = start_writer(dir.path());
    h.event(started_at("r1", SystemTime::now()));
    let st = h.shutdown();
    assert_eq!((st.active_recordings, st.completed_recordings), (0, 1));
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(
        (m.state, m.end_reason.as_deref()),
        (RecordingState::Complete, Some("shutdown"))
    );
}

#[test]
fn bad_recording_id_is_refused_not_a_panic() {
    let dir = TempDir::new("badid");
    let (h, _sink) = start_writer(dir.path());
    h.event(started("../escape", two_streams(), "u"));
    h.sync();
    assert_eq!(h.stats().start_failed, 1);
    assert!(!dir.path().join("../escape").exists());
    h.shutdown();
}
