//! `cargo xtask demo`: one recorded call on a veth pair, end to end.
//!
//! Creates a sender namespace and a recorder namespace joined by veth, starts the real recorder
//! (XDP on the recorder's veth end), runs a SIPREC session with G.711 audio (a customer tone on
//! label 1, an agent tone on label 2), transfers the agent by re-INVITE (new source port, new
//! SSRC, metadata: agent 7002 leaves, agent 7003 joins), hangs up, and prints the recording.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use tests::{
    client::{
        metadata_transfer_xml, metadata_xml, offer_sdp, siprec_body, MetaParticipant,
        OfferedStream, SipClient,
    },
    daemon::{tshark_count, Daemon, DaemonOptions},
    net::VethPair,
    rtp::{send_paced, RtpStream},
};

fn participant(id: &str, aor: &str, name: &str, label: &str) -> MetaParticipant {
    MetaParticipant {
        id: id.into(),
        aor: aor.into(),
        name: name.into(),
        sends: vec![label.into()],
    }
}

fn now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let spool = out_dir.join("spool");

    println!("demo: creating namespaces and a veth pair");
    let pair = VethPair::new("demo");
    println!(
        "demo: starting the recorder on {} ({}), SIP {}:5060",
        pair.recorder_if, pair.recorder_ns, pair.recorder_v4
    );
    let mut daemon =
        Daemon::start_with_spool(&pair, DaemonOptions::default(), out_dir.clone(), spool);
    daemon.keep_files = true;

    let sip = daemon.sip;
    let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), sip));
    let call_uuid = "DEMO0000000000000000000000000001";
    let t0 = now_rfc3339();
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[
            OfferedStream::sendonly("1", 31000, 0),
            OfferedStream::sendonly("2", 31002, 8),
        ],
    );
    let xml = metadata_xml(
        Some(call_uuid),
        &["1", "2"],
        &[
            participant(
                "d1",
                "sip:+15551230001@carrier.example",
                "Customer (D1)",
                "1",
            ),
            participant("d2", "sip:7002@cc.example", "Agent 7002 (D2)", "2"),
        ],
        &t0,
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(
        reply.status, 200,
        "recorder refused the session:\n{}",
        reply.raw
    );
    let ports = reply.answer_ports();
    println!("demo: recording session answered, RTP ports {ports:?}");

    let dest = |port| SocketAddr::new(IpAddr::V4(pair.recorder_v4), port);
    let socket = |port| pair.in_sender(|| UdpSocket::bind((pair.sender_v4, port)).unwrap());
    let mut customer = RtpStream::new(socket(31000), dest(ports[0]), 0xD1D1D1D1, 0);
    let mut agent2 = RtpStream::new(socket(31002), dest(ports[1]), 0xD2D2D2D2, 8);
    println!("demo: 3 s of audio: customer 440 Hz (PCMU), agent 7002 660 Hz (PCMA)");
    send_paced(
        &mut [(&mut customer, 440.0), (&mut agent2, 660.0)],
        Duration::from_secs(3),
    );

    println!("demo: transfer D2 -> D3 by re-INVITE (new source port and SSRC for label 2)");
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        2,
        &[
            OfferedStream::sendonly("1", 31000, 0),
            OfferedStream::sendonly("2", 31012, 8),
        ],
    );
    let xml = metadata_transfer_xml(
        "d2",
        &participant("d3", "sip:7003@cc.example", "Agent 7003 (D3)", "2"),
        &now_rfc3339(),
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "re-INVITE refused:\n{}", reply.raw);
    let mut agent3 = RtpStream::new(socket(31012), dest(ports[1]), 0xD3D3D3D3, 8);
    agent3.sample = agent2.sample;
    println!("demo: 3 s of audio: customer 440 Hz, agent 7003 880 Hz");
    send_paced(
        &mut [(&mut customer, 440.0), (&mut agent3, 880.0)],
        Duration::from_secs(3),
    );

    let bye = client.bye(&[]);
    assert_eq!(bye.status, 200);
    let sent = customer.sent + agent2.sent + agent3.sent;
    let (dir, meta) = daemon.metadata_for(&client.call_id, true);
    daemon.stop();

    println!("\n=== recording {} ===", meta["id"].as_str().unwrap_or("?"));
    println!("directory:   {}", dir.display());
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        println!(
            "  {:<24} {len:>9} bytes",
            entry.file_name().to_string_lossy()
        );
    }
    println!("state:       {} ({})", meta["state"], meta["end_reason"]);
    println!("call uuid:   {}", meta["call_uuid"]);
    println!("started:     {}", meta["started_at"]);
    println!("ended:       {}", meta["ended_at"]);
    if let Some(ps) = meta["participants"].as_array() {
        for p in ps {
            println!(
                "participant: {:<22} {:<36} joined {} left {}",
                p["name"].as_str().unwrap_or("?"),
                p["aor"].as_str().unwrap_or("?"),
                p["joined_at"],
                p["left_at"]
            );
        }
    }
    let mut recorded = 0;
    if let Some(ss) = meta["streams"].as_array() {
        for s in ss {
            recorded += s["packets"].as_u64().unwrap_or(0);
            println!(
                "stream {:<3} codec {:<6} port {:<6} packets {:<5} lost {:<3} ssrcs {}",
                s["label"].as_str().unwrap_or("?"),
                s["codec"].as_str().unwrap_or("?"),
                s["local_port"],
                s["packets"],
                s["lost"],
                s["ssrcs"]
            );
        }
    }
    let pcap_packets = tshark_count(&dir.join("recording.pcap"), None);
    println!(
        "RTP sent {sent}, recorded {recorded}, in pcap (tshark) {pcap_packets}, lost {}",
        sent.saturating_sub(recorded)
    );
    if let Ok(out) = std::process::Command::new("soxi")
        .arg(dir.join("recording.wav"))
        .output()
    {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    assert_eq!(recorded, sent, "the demo lost packets");
}
