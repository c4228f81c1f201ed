//! File descriptors held by many live recordings.

use super::*;

/// Set (to a spool path) in the child process of `many_recordings_hold_no_descriptors`.
const FD_CHILD_ENV: &str = "RECORDER_WRITER_FD_CHILD_SPOOL";
const FD_CHILD_RECORDINGS: u64 = 3000;
const FD_CHILD_LIMIT: u64 = 256;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The writer side of `many_recordings_hold_no_descriptors`, in a process of its own (the fd
/// count of the test process moves with the other tests): lowers its soft `RLIMIT_NOFILE`,
/// records one packet on every stream of many live recordings and prints what it saw.
#[test]
#[ignore = "child process of many_recordings_hold_no_descriptors"]
fn fd_child() {
    let Ok(spool) = std::env::var(FD_CHILD_ENV) else {
        return;
    };
    let lim = libc::rlimit {
        rlim_cur: FD_CHILD_LIMIT,
        rlim_max: FD_CHILD_LIMIT,
    };
    // SAFETY: plain syscall on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let (h, mut sink) = start_writer(Path::new(&spool));
    h.sync();
    let before = open_fds();
    let mut max_seen = before;
    for k in 0..FD_CHILD_RECORDINGS {
        let mut ev = started(&format!("r{k}"), mux_streams(k), "u");
        if let SessionEvent::Started { metadata, .. } = &mut ev {
            *metadata = None; // one file (and fsync) less per recording
        }
        h.event(ev);
        for flow in [2 * k + 1, 2 * k + 2] {
            let (f, off) = udp_frame(40000, &rtp(0, 1, 0, flow as u32, &[0xff; 160]));
            feed(&mut sink, flow, at_ms(20), &f, off);
        }
        if k % 500 == 499 {
            h.sync();
            max_seen = max_seen.max(open_fds());
        }
    }
    h.sync();
    let after = open_fds();
    let st = h.stats();
    println!(
        "FDS {before} {} {after} {} {} {} {}",
        max_seen.max(after),
        st.active_recordings,
        st.start_failed,
        st.pcap_write_failed,
        st.wav_write_failed
    );
    // Ending 3000 recordings costs ~10 000 fsyncs, and the parent removes the spool anyway.
    std::process::exit(0);
}

#[test]
fn many_recordings_hold_descriptors_only_up_to_a_share_of_the_limit() {
    let dir = TempDir::new("fds");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer::tests::fds::fd_child",
            "--ignored",
            "--nocapture",
        ])
        .env(FD_CHILD_ENV, dir.path())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run the test binary as the writer child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FDS "))
        .unwrap_or_else(|| panic!("child printed no result: {stdout}"));
    let v: Vec<u64> = line[4..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let [before, max, after, active, start_failed, pcap_failed, wav_failed] = v[..] else {
        panic!("bad child line {line}");
    };
    assert_eq!(
        (active, start_failed, pcap_failed, wav_failed),
        (FD_CHILD_RECORDINGS, 0, 0, 0),
        "every recording created and written under a soft limit of {FD_CHILD_LIMIT} fds"
    );
    // The file threads keep at most a quarter of the limit open; the rest are opened per job.
    let kept = FD_CHILD_LIMIT / 4;
    assert!(
        max <= before + kept + 4 && after <= before + kept + 4,
        "descriptors grew with recordings: {before} before, {max} at most, {after} after (share {kept})"
    );
    assert!(
        max >= before + kept / 2,
        "the file threads kept no descriptors open: {before} before, {max} at most"
    );
}
