//! When metadata.json and the media are written.

use super::*;

/// Polls `metadata.json` of `rec` until `ok` holds (the writer's flush is asynchronous).
fn wait_metadata(rec: &Path, ok: impl Fn(&RecordingMetadata) -> bool) -> RecordingMetadata {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(m) = RecordingMetadata::read(rec) {
            if ok(&m) {
                return m;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metadata.json never got there"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn metadata_is_rewritten_on_news_and_counters_on_their_own_interval() {
    let dir = TempDir::new("metaflush");
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.flush_interval = Duration::from_millis(20);
    c.metadata_interval = Duration::from_secs(3600);
    let (h, mut sink) = start(c.clone()).unwrap();
    let rec = dir.path().join("r1");
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    h.sync();
    // Media flushes go on (the WAV header covers the new audio) ...
    let (_, _, chans) = wait_wav(&rec.join(WAV_FILE), 50 * 160);
    assert_eq!(chans[0].len(), 50 * 160);
    // (One more flush after that one, so that it has finished whatever it writes.)
    a.send(&mut sink, 50 * 160, 0, &noise);
    wait_wav(&rec.join(WAV_FILE), 51 * 160);
    // ... but counters alone do not rewrite metadata.json before their interval.
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!((m.streams[0].packets, m.media_received), (0, false));
    // An event does, at once.
    h.event(SessionEvent::Paused {
        id: "r1".into(),
        at: at_ms(1000),
        label: "callee".into(),
    });
    h.sync();
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().streams[0].packets,
        51
    );
    h.shutdown();

    // With a short interval the counters follow without any event.
    let dir = TempDir::new("metaflush2");
    c.spool = dir.path().to_path_buf();
    c.metadata_interval = Duration::from_millis(100);
    let (h, mut sink) = start(c).unwrap();
    let rec = dir.path().join("r1");
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    wait_metadata(&rec, |m| m.streams[0].packets == 50);
    h.shutdown();
}

/// Polls the WAV until its header covers `frames` frames; returns it as [`read_wav`] does.
fn wait_wav(path: &Path, frames: usize) -> (u16, u32, Vec<Vec<i16>>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = std::fs::read(path).unwrap();
        let len = u32::from_le_bytes(d[40..44].try_into().unwrap()) as usize;
        let ch = u16::from_le_bytes([d[22], d[23]]).max(1) as usize;
        if len / (2 * ch) >= frames {
            // The header was flushed; the file itself is still the mapped (longer) one.
            let mut chans = vec![Vec::new(); ch];
            for (i, s) in d[44..44 + len].chunks(2).enumerate() {
                chans[i % ch].push(i16::from_le_bytes([s[0], s[1]]));
            }
            return (ch as u16, 8000, chans);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "WAV header never covered {frames} frames"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
