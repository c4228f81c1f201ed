//! A disk that is full, or refuses a recording's directory.

use super::*;

/// A tmpfs mounted on a temp dir, unmounted on drop (also when the test panics).
/// The directory is made by the file thread, off the packet stage: when it cannot be made (here:
/// it exists, an earlier recording's), nothing of the earlier one is touched, and the new one's
/// packets are counted as not written, its index row removed at its end.
#[test]
fn a_recording_whose_directory_cannot_be_made_touches_nothing_and_is_counted() {
    let dir = TempDir::new("mkdir");
    let spool = dir.path().join("spool");
    let earlier = spool.join("r1");
    std::fs::create_dir_all(&earlier).unwrap();
    std::fs::write(earlier.join(PCAP_FILE), b"earlier pcap").unwrap();
    std::fs::write(earlier.join(METADATA_FILE), b"earlier metadata").unwrap();
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    let (h, mut sink) = start(c).unwrap();
    h.event(started("r1", two_streams(), "U9"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    drop(sink);
    h.event(ended("r1", 1000));
    h.sync();
    let st = h.stats();
    assert_eq!(
        (st.start_failed, st.pcap_write_failed, st.unknown_flow),
        (1, 50, 0)
    );
    assert!(st.metadata_write_failed >= 1, "{st:?}");
    assert_eq!(
        std::fs::read(earlier.join(PCAP_FILE)).unwrap(),
        b"earlier pcap"
    );
    assert_eq!(
        std::fs::read(earlier.join(METADATA_FILE)).unwrap(),
        b"earlier metadata"
    );
    assert!(!earlier.join(WAV_FILE).exists());
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    assert!(index.by_call_uuid("U9").unwrap().is_empty());
    h.shutdown();
}

struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = TempDir::new("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn tmpfs_disk_full_refuses_new_sessions_and_corrupts_nothing() {
    let fs = Tmpfs::mount("1m");
    let spool = fs.0.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.min_free_bytes = 200 * 1024;
    c.media_floor_bytes = 64 * 1024;
    c.host = "t".into();
    let (h, mut sink) = start(c).unwrap();
    assert!(h.can_accept_new_session());
    h.event(started("full", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 0);
    // ~2.2 MB of pcap (plus 32 kB/s of WAV): far more than the tmpfs holds.
    let mut sent = 0;
    for k in 0..5000u64 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
        sent += 2;
        if k % 500 == 0 {
            h.sync(); // keep the queue short (it is bounded)
        }
    }
    h.sync();
    assert!(
        !h.can_accept_new_session(),
        "free space below the threshold"
    );
    let st = h.stats();
    assert!(st.pcap_write_failed > 0, "{st:?}");
    h.event(ended("full", 100_000));
    h.sync();
    let rec = spool.join("full");
    let m = RecordingMetadata::read(&rec).expect("metadata.json intact");
    assert_eq!(m.state, RecordingState::Complete);
    assert!(m.dropped.pcap_write_failed > 0);
    let written = m.streams[0].packets + m.streams[1].packets;
    assert_eq!(written + m.dropped.pcap_write_failed, sent);
    // Whatever is in the files is whole and readable.
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)).0, written);
    let (ch, _, _) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    need("soxi");
    run(Command::new("soxi").arg(rec.join(WAV_FILE)));
    h.shutdown();
}
