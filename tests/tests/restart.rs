//! Restart without losing packets: the daemon leaves with `--detach-on-exit` in the middle of a
//! call while RTP flows; XDP keeps capturing into the pinned rings while no daemon runs; a new
//! daemon adopts the pinned capture and the session, and the call carries on to its BYE. The
//! one recording holds every packet, checked sequence number by sequence number.

use std::{
    net::{IpAddr, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{read_json, recorder_bin, Daemon, DaemonOptions},
    net::VethPair,
    rtp::RtpStream,
};

/// `(ssrc, seq)` of every RTP packet to `port` in the pcap, in file order (tshark decodes).
fn rtp_packets(pcap: &Path, port: u16) -> Vec<(u32, u16)> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-d", &format!("udp.port=={port},rtp")])
        .args(["-Y", &format!("udp.dstport=={port} && rtp")])
        .args(["-T", "fields", "-e", "rtp.ssrc", "-e", "rtp.seq"])
        .output()
        .expect("run tshark (install: cargo xtask setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let (ssrc, seq) = line.split_once('\t').expect("two fields");
            let ssrc = u32::from_str_radix(ssrc.trim_start_matches("0x"), 16).expect("ssrc");
            (ssrc, seq.parse().expect("seq"))
        })
        .collect()
}

fn soxi_seconds(wav: &Path) -> f64 {
    let out = Command::new("soxi")
        .arg("-D")
        .arg(wav)
        .output()
        .expect("soxi");
    assert!(out.status.success(), "soxi cannot read {}", wav.display());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Sends 20 ms packets on every stream in real time until `stop`, reporting each round's total
/// on `progress`. Returns the streams (their `seq` and `sent` say what went out).
fn send_until(
    mut streams: Vec<RtpStream>,
    stop: Arc<AtomicBool>,
    progress: mpsc::Sender<u64>,
) -> std::thread::JoinHandle<(Vec<RtpStream>, Duration)> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = start + Duration::from_millis(20 * n);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait); // pacing real-time media, not synchronisation
            }
            for (i, stream) in streams.iter_mut().enumerate() {
                stream.send_tone_packet(440.0 * (i + 1) as f64);
            }
            n += 1;
            let _ = progress.send(n);
        }
        (streams, start.elapsed())
    })
}

/// Blocks until the sender has sent `rounds` more rounds.
fn wait_rounds(progress: &mpsc::Receiver<u64>, rounds: u64) {
    let target = progress.recv().expect("sender running") + rounds;
    while progress.recv().expect("sender running") < target {}
}

#[test]
fn restart_mid_call_loses_no_packet_and_keeps_one_recording() {
    let pair = VethPair::new("restart");
    let mut daemon = Daemon::start(
        &pair,
        DaemonOptions {
            extra: vec!["--detach-on-exit".into()],
            ..Default::default()
        },
    );
    let sender = IpAddr::V4(pair.sender_v4);
    let mut client = pair.in_sender(|| SipClient::udp(sender, daemon.sip));
    let sdp = offer_sdp(
        sender,
        1,
        &[
            OfferedStream::sendonly("1", 31000, 0),
            OfferedStream::sendonly("2", 31002, 0),
        ],
    );
    let participants = [
        MetaParticipant {
            id: "p-cust".into(),
            aor: "sip:+15551230000@example.com".into(),
            name: "Customer".into(),
            sends: vec!["1".into()],
        },
        MetaParticipant {
            id: "p-agent".into(),
            aor: "sip:agent7@example.com".into(),
            name: "Agent".into(),
            sends: vec!["2".into()],
        },
    ];
    let xml = metadata_xml(
        Some("restart-uuid-1"),
        &["1", "2"],
        &participants,
        "2026-11-24T10:00:00Z",
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let ports = reply.answer_ports();
    assert_eq!(ports.len(), 2);

    let streams: Vec<RtpStream> = [(31000u16, 0x5E55_0001u32), (31002, 0x5E55_0002)]
        .iter()
        .zip(&ports)
        .map(|(&(from, ssrc), &to)| {
            let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, from)).unwrap());
            RtpStream::new(socket, (IpAddr::V4(pair.recorder_v4), to).into(), ssrc, 0)
        })
        .collect();
    let first_seqs: Vec<u16> = streams.iter().map(|s| s.seq).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (progress_tx, progress) = mpsc::channel();
    let sending = send_until(streams, stop.clone(), progress_tx);
    wait_rounds(&progress, 50);

    // The first daemon leaves; capture stays pinned and attached.
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
    let (dir, meta) = daemon.metadata_for(&client.call_id, false);
    assert_eq!(meta["state"], "active", "handed over, not finished");
    assert!(
        daemon.spool.join(".handover.json").exists(),
        "handover file saved:\n{}",
        daemon.log_text()
    );
    assert!(daemon.pin_dir.exists(), "pins left for the next daemon");

    // RTP goes on while no daemon runs: only the kernel holds these packets.
    wait_rounds(&progress, 50);

    // The next daemon (a clean-exit one this time) adopts capture and session.
    daemon.args.retain(|a| a != "--detach-on-exit");
    daemon.spawn(&pair);
    let log = daemon.log_text();
    assert!(log.contains("adopted the pinned capture"), "{log}");
    assert!(
        !daemon.spool.join(".handover.json").exists(),
        "handover used"
    );
    let status = status_json(&daemon);
    assert_eq!(status["restart"]["adopted"], true, "{status:#}");
    assert_eq!(status["restart"]["carried_on_sessions"], 1, "{status:#}");
    assert_eq!(status["restart"]["on_exit"], "finish", "{status:#}");
    assert_eq!(status["sip"]["sessions_active"], 1, "{status:#}");
    wait_rounds(&progress, 50);
    stop.store(true, Ordering::Relaxed);
    let (streams, span) = sending.join().unwrap();

    // The dialog lives on in the new daemon: it answers the client's BYE.
    let bye = client.bye(&[]);
    assert_eq!(bye.status, 200, "{}", bye.raw);
    let (finished_dir, meta) = daemon.metadata_for(&client.call_id, true);
    assert_eq!(finished_dir, dir, "the same recording carried on");
    assert_eq!(meta["state"], "complete", "{meta:#}");
    assert_eq!(daemon.recordings().len(), 1, "one recording");

    // Every packet, once, in order.
    let pcap = dir.join("recording.pcap");
    for ((stream, port), first) in streams.iter().zip(&ports).zip(&first_seqs) {
        let got = rtp_packets(&pcap, *port);
        let expected: Vec<(u32, u16)> = (0..stream.sent)
            .map(|i| (stream.ssrc, first.wrapping_add(i as u16)))
            .collect();
        assert!(stream.sent >= 150, "sent {}", stream.sent);
        if got != expected {
            let missing: Vec<_> = expected.iter().filter(|p| !got.contains(p)).collect();
            let first_difference = got.iter().zip(&expected).position(|(g, e)| g != e);
            panic!(
                "port {port}: sent {}, recorded {}; missing {:?}...; first difference at {first_difference:?}: {:?}\n{}",
                expected.len(),
                got.len(),
                &missing[..missing.len().min(10)],
                first_difference.map(|i| &got[i.saturating_sub(2)..(i + 3).min(got.len())]),
                daemon.log_text()
            );
        }
    }
    let recorded: Vec<u64> = (0..2)
        .map(|i| meta["streams"][i]["packets"].as_u64().unwrap())
        .collect();
    assert_eq!(recorded, vec![streams[0].sent, streams[1].sent], "{meta:#}");
    for i in 0..2 {
        assert_eq!(meta["streams"][i]["lost"], 0, "no loss counted: {meta:#}");
    }
    // The WAV spans the call in real time, downtime included (the kernel timestamped the
    // packets it buffered).
    let seconds = soxi_seconds(&dir.join("recording.wav"));
    assert!(
        (seconds - span.as_secs_f64()).abs() < 0.25,
        "WAV {seconds:.3} s, call {:.3} s",
        span.as_secs_f64()
    );
    let index = read_json(&dir.join("metadata.json")).unwrap();
    assert_eq!(index["call_uuid"], "restart-uuid-1", "{index:#}");

    // A clean exit removes the pins.
    assert_eq!(daemon.stop(), Some(0));
    assert!(
        !daemon.pin_dir.exists(),
        "clean exit unpins:\n{}",
        daemon.log_text()
    );
}

#[test]
fn without_bpffs_the_daemon_runs_unpinned_and_says_so() {
    let pair = VethPair::new("nopin");
    let mut daemon = Daemon::start(&pair, DaemonOptions::default());
    assert_eq!(daemon.stop(), Some(0));
    // A pin dir on an ordinary file system: pinning is impossible there.
    let at = daemon
        .args
        .iter()
        .position(|a| a == "--pin-dir")
        .expect("the harness gives a pin dir")
        + 1;
    daemon.args[at] = daemon.dir.join("not-bpffs").display().to_string();
    daemon.spawn(&pair);
    let log = daemon.log_text();
    assert!(log.contains("capture is not pinned"), "{log}");
    let status = status_json(&daemon);
    assert!(status["restart"]["pinned_in"].is_null(), "{status:#}");
    assert_eq!(daemon.stop(), Some(0));
}

/// `recorder status --json` of a running daemon.
fn status_json(daemon: &Daemon) -> serde_json::Value {
    let out = Command::new(recorder_bin())
        .args(["status", "--json", "--socket"])
        .arg(&daemon.control)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}
