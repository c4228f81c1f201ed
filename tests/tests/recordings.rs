//! Recordings on disk with the real daemon: crash repair after `kill -9`, and a full disk.

use std::{
    net::{IpAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    client::{offer_sdp, OfferedStream, SipClient},
    daemon::{read_json, scratch_dir, tshark_count, Daemon, DaemonOptions},
    net::VethPair,
    rtp::RtpStream,
};

fn one_stream(pair: &VethPair, label: &str, port: u16) -> String {
    offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly(label, port, 0)],
    )
}

/// Waits until the recording's metadata.json (rewritten by the daemon's periodic flush) says
/// `packets` were written for its first stream.
fn wait_written(dir: &Path, packets: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(meta) = read_json(&dir.join("metadata.json")) {
            if meta["streams"][0]["packets"].as_u64() == Some(packets) {
                return meta;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{packets} packets never written in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50)); // polling a file another process flushes
    }
}

fn soxi_samples(wav: &Path) -> u64 {
    let out = Command::new("soxi")
        .arg("-s")
        .arg(wav)
        .output()
        .expect("run soxi (install: cargo xtask setup)");
    assert!(
        out.status.success(),
        "soxi cannot read {}: {}",
        wav.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn kill_9_mid_call_then_restart_repairs_the_recording() {
    let pair = VethPair::new("crash");
    let dir = scratch_dir("crash");
    let config = dir.join("recorder.toml");
    // Counters in metadata.json every second: the test waits for them.
    std::fs::write(&config, "metadata_interval_secs = 1\n").unwrap();
    let mut daemon = Daemon::start(
        &pair,
        DaemonOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    );
    let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let sdp = one_stream(&pair, "1", 31000);
    let reply = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(reply.status, 200);
    let port = reply.answer_ports()[0];
    let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 31000)).unwrap());
    let mut rtp = RtpStream::new(
        socket,
        (IpAddr::V4(pair.recorder_v4), port).into(),
        0xC0FFEE,
        0,
    );
    for _ in 0..250 {
        rtp.send_tone_packet(440.0);
    }
    let (dir, _) = daemon.metadata_for(&client.call_id, false);
    wait_written(&dir, 250);

    daemon.kill9();
    let meta = read_json(&dir.join("metadata.json")).unwrap();
    assert_eq!(meta["state"], "active", "killed mid-call");

    // A new daemon on the same spool repairs what the old one left open.
    daemon.spawn(&pair);
    let meta = read_json(&dir.join("metadata.json")).unwrap();
    assert_eq!(meta["state"], "interrupted");
    assert_eq!(
        tshark_count(&dir.join("recording.pcap"), None),
        250,
        "nothing written was lost"
    );
    // soxi reads the repaired header. (The burst above is not real-time, so the WAV's length
    // says little; WAV timing is covered by the writer's own tests.)
    assert!(soxi_samples(&dir.join("recording.wav")) > 0);
    drop(daemon);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

#[test]
fn full_disk_refuses_new_sessions_and_corrupts_nothing() {
    let pair = VethPair::new("full");
    let dir = scratch_dir("full");
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&spool)
        .status()
        .expect("mount tmpfs");
    assert!(status.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(spool.clone());
    let config = dir.join("recorder.toml");
    std::fs::write(&config, "min_free_bytes = 8388608\n").unwrap();
    let daemon = Daemon::start_with_spool(
        &pair,
        DaemonOptions {
            extra: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
        dir.clone(),
        spool.clone(),
    );

    let mut first = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let sdp = one_stream(&pair, "1", 31000);
    let reply = first.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(reply.status, 200, "room on the disk: accepted");
    let port = reply.answer_ports()[0];
    let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 31000)).unwrap());
    let mut rtp = RtpStream::new(
        socket,
        (IpAddr::V4(pair.recorder_v4), port).into(),
        0xF00D,
        0,
    );
    for _ in 0..100 {
        rtp.send_tone_packet(440.0);
    }

    // Something else fills the disk to below the threshold.
    let filler = spool.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=12"])
        .arg(format!("of={}", filler.display()))
        .output();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("refusing new sessions") {
        assert!(
            Instant::now() < deadline,
            "daemon never noticed the full disk:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50)); // waiting for the daemon's log line
    }
    let mut second = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let refused = second.invite(
        Some(("application/sdp", one_stream(&pair, "1", 31002).as_bytes())),
        &[],
    );
    assert_eq!(refused.status, 503, "{}", refused.raw);
    assert!(refused.header("Retry-After").is_some());

    // The active call keeps recording what it can; its files stay valid.
    for _ in 0..100 {
        rtp.send_tone_packet(440.0);
    }
    assert_eq!(first.bye(&[]).status, 200);
    let (rec, meta) = daemon.metadata_for(&first.call_id, true);
    assert_eq!(meta["state"], "complete");
    let written = meta["streams"][0]["packets"].as_u64().unwrap();
    assert!(
        written >= 100,
        "packets before the disk filled are kept ({written})"
    );
    assert_eq!(
        tshark_count(&rec.join("recording.pcap"), None) as u64,
        written
    );
    soxi_samples(&rec.join("recording.wav"));
    std::fs::remove_file(&filler).unwrap();
}
