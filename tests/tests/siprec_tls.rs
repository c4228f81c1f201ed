//! SIP over TLS end to end: the real `recorder` with a TLS listener (self-signed certificate
//! from rcgen) in a network namespace; the test client runs a recording session over TLS with
//! real RTP.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
};

use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{recorder_bin, scratch_dir, tshark_count, Daemon, DaemonOptions},
    net::VethPair,
    rtp::RtpStream,
};

const TLS_PORT: u16 = 5061;

fn participant(id: &str, label: &str) -> MetaParticipant {
    MetaParticipant {
        id: id.into(),
        aor: format!("sip:{id}@cc.example"),
        name: id.into(),
        sends: vec![label.into()],
    }
}

#[test]
fn recording_session_over_tls() {
    let pair = VethPair::new("tls");
    let certified = rcgen::generate_simple_self_signed(vec![
        "recorder.test".into(),
        pair.recorder_v4.to_string(),
    ])
    .unwrap();
    let pem_dir = scratch_dir("tls-pem");
    let cert = pem_dir.join("cert.pem");
    let key = pem_dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let tls_addr = SocketAddr::new(IpAddr::V4(pair.recorder_v4), TLS_PORT);
    let daemon = Daemon::start(
        &pair,
        DaemonOptions {
            extra: vec![
                "--sip-tls-listen".into(),
                tls_addr.to_string(),
                "--tls-certificate".into(),
                cert.display().to_string(),
                "--tls-private-key".into(),
                key.display().to_string(),
            ],
            ..DaemonOptions::default()
        },
    );

    let mut client =
        pair.in_sender(|| SipClient::tls(tls_addr, certified.cert.der(), "recorder.test"));
    // SIPS Request-URI, as a TLS-only SRC addresses us.
    client.request_uri = format!("sips:srs@{tls_addr}");
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[
            OfferedStream::sendonly("1", 31000, 0),
            OfferedStream::sendonly("2", 31002, 8),
        ],
    );
    let xml = metadata_xml(
        None,
        &["1", "2"],
        &[participant("cust", "1"), participant("agent", "2")],
        "2026-11-24T10:00:00Z",
    );
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let contact = reply.header("Contact").expect("Contact in 200");
    assert!(
        contact.contains(&format!(":{TLS_PORT};transport=tls")) && contact.contains("+sip.srs"),
        "Contact names our TLS listener: {contact}"
    );
    let via = reply.header("Via").unwrap();
    assert!(via.starts_with("SIP/2.0/TLS "), "{via}");
    let ports = reply.answer_ports();
    assert_eq!(ports.len(), 2);

    let mut streams: Vec<RtpStream> = ports
        .iter()
        .zip([(0x7101u32, 0u8), (0x7202, 8)])
        .map(|(port, (ssrc, pt))| {
            let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
            RtpStream::new(
                socket,
                SocketAddr::new(IpAddr::V4(pair.recorder_v4), *port),
                ssrc,
                pt,
            )
        })
        .collect();
    for _ in 0..60 {
        for s in streams.iter_mut() {
            s.send_tone_packet(440.0);
        }
    }
    // An in-dialog UPDATE and the BYE over the same TLS connection.
    assert_eq!(client.non_invite("UPDATE", None, &[]).status, 200);
    assert_eq!(client.bye(&[]).status, 200);

    let (dir, meta) = daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["state"], "complete");
    assert_eq!(meta["end_reason"], "bye");
    assert_eq!(tshark_count(&dir.join("recording.pcap"), None), 120);
    let _ = std::fs::remove_dir_all(&pem_dir);
}

#[test]
fn tls_listen_without_certificate_is_a_configuration_error() {
    let out = Command::new(recorder_bin())
        .args([
            "run",
            "--interface",
            "lo",
            "--media-address",
            "127.0.0.1",
            "--sip-listen",
            "127.0.0.1:0",
            "--sip-tls-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls_certificate"), "{stderr}");
}
