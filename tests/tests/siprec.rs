//! The SIPREC server end to end: the real `recorder` binary in a network namespace, attached to
//! a veth pair, driven by the test SIPREC client over UDP and TCP with real RTP.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use tests::{
    client::{
        metadata_transfer_xml, metadata_xml, offer_sdp, siprec_body, MetaParticipant,
        OfferedStream, Reply, SipClient,
    },
    daemon::{tshark_count, Daemon, DaemonOptions},
    net::{ip, VethPair},
    rtp::RtpStream,
};

const UUID: &str = "0K1L2M3N4P5Q6R7S8T9U0V1W2X3Y4Z5A";

fn customer() -> MetaParticipant {
    MetaParticipant {
        id: "p-customer".into(),
        aor: "sip:+493012345678@carrier.example".into(),
        name: "Customer".into(),
        sends: vec!["1".into()],
    }
}

fn agent(n: u32) -> MetaParticipant {
    MetaParticipant {
        id: format!("p-agent-{n}"),
        aor: format!("sip:{n}@cc.example"),
        name: format!("Agent {n}"),
        sends: vec!["2".into()],
    }
}

fn streams(ports: &[(u16, &str)], direction: &'static str) -> Vec<OfferedStream> {
    ports
        .iter()
        .map(|(port, label)| OfferedStream {
            label: label.to_string(),
            port: *port,
            pt: if *label == "2" { 8 } else { 0 },
            direction,
            connection: None,
        })
        .collect()
}

struct Call {
    pair: VethPair,
    daemon: Daemon,
}

fn setup(tag: &str, options: DaemonOptions) -> Call {
    let pair = VethPair::new(tag);
    let daemon = Daemon::start(&pair, options);
    Call { pair, daemon }
}

impl Call {
    fn client_udp(&self) -> SipClient {
        self.pair
            .in_sender(|| SipClient::udp(IpAddr::V4(self.pair.sender_v4), self.daemon.sip))
    }

    fn client_tcp(&self) -> SipClient {
        self.pair.in_sender(|| SipClient::tcp(self.daemon.sip))
    }

    fn rtp(&self, ssrc: u32, pt: u8, dest_port: u16) -> RtpStream {
        let socket = self
            .pair
            .in_sender(|| UdpSocket::bind((self.pair.sender_v4, 0)).unwrap());
        RtpStream::new(
            socket,
            SocketAddr::new(IpAddr::V4(self.pair.recorder_v4), dest_port),
            ssrc,
            pt,
        )
    }

    fn invite_two_streams(&self, client: &mut SipClient, metadata: bool) -> Reply {
        let sdp = offer_sdp(
            IpAddr::V4(self.pair.sender_v4),
            1,
            &streams(&[(31000, "1"), (31002, "2")], "sendonly"),
        );
        let xml = metadata_xml(
            Some(UUID),
            &["1", "2"],
            &[customer(), agent(7002)],
            "2026-11-24T10:00:00Z",
        );
        let (ctype, body) = siprec_body(&sdp, metadata.then_some(xml.as_str()));
        client.invite(Some((&ctype, &body)), &[])
    }
}

fn assert_answered(reply: &Reply, streams: usize) -> Vec<u16> {
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let contact = reply.header("Contact").expect("Contact in 200");
    assert!(contact.contains("+sip.srs"), "Contact {contact}");
    assert!(reply.body().contains("a=recvonly"), "{}", reply.body());
    let ports = reply.answer_ports();
    assert_eq!(ports.len(), streams, "one m-line per offered stream");
    for p in &ports {
        assert!(
            (30000..=30099).contains(p),
            "port {p} from the configured range"
        );
    }
    ports
}

fn send_packets(stream: &mut RtpStream, n: usize, freq: f64) {
    for _ in 0..n {
        stream.send_tone_packet(freq);
    }
}

fn stream_packets(meta: &serde_json::Value, label: &str) -> u64 {
    meta["streams"]
        .as_array()
        .expect("streams in metadata.json")
        .iter()
        .filter(|s| s["label"] == label)
        .map(|s| s["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn plain_session_over_udp_is_recorded_and_ended_by_bye() {
    let call = setup("plain", DaemonOptions::default());
    let mut client = call.client_udp();
    let reply = call.invite_two_streams(&mut client, true);
    let ports = assert_answered(&reply, 2);
    assert!(reply
        .headers("Require")
        .iter()
        .any(|r| r.contains("siprec")));

    let mut s1 = call.rtp(0x1111, 0, ports[0]);
    let mut s2 = call.rtp(0x2222, 8, ports[1]);
    send_packets(&mut s1, 100, 440.0);
    send_packets(&mut s2, 100, 1000.0);
    let bye = client.bye(&["Reason: Q.850;cause=16".into()]);
    assert_eq!(bye.status, 200);

    let (dir, meta) = call.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["state"], "complete");
    assert_eq!(meta["end_reason"], "bye");
    assert_eq!(meta["call_uuid"], UUID);
    assert_eq!(stream_packets(&meta, "1"), 100);
    assert_eq!(stream_packets(&meta, "2"), 100);
    assert_eq!(tshark_count(&dir.join("recording.pcap"), None), 200);
    assert_eq!(call.daemon.recordings().len(), 1);
}

#[test]
fn session_over_tcp_without_metadata_uses_the_header_call_uuid() {
    let call = setup("tcp", DaemonOptions::default());
    let mut client = call.client_tcp();
    client
        .extra_headers
        .push(format!("X-Genesys-CallUUID: {UUID}"));
    let reply = call.invite_two_streams(&mut client, false);
    let ports = assert_answered(&reply, 2);
    let mut s1 = call.rtp(0x3333, 0, ports[0]);
    send_packets(&mut s1, 50, 440.0);
    assert_eq!(client.bye(&[]).status, 200);
    let (dir, meta) = call.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["call_uuid"], UUID);
    assert_eq!(stream_packets(&meta, "1"), 50);
    assert_eq!(tshark_count(&dir.join("recording.pcap"), None), 50);
}

#[test]
fn reinvite_moves_a_stream_to_a_new_source_without_loss() {
    let call = setup("move", DaemonOptions::default());
    // A second address on the sender side: the new agent's media anchor.
    let new_source = std::net::Ipv4Addr::new(10, 231, 0, 3);
    ip(&[
        "-n",
        &call.pair.sender_ns,
        "addr",
        "add",
        &format!("{new_source}/24"),
        "dev",
        &call.pair.sender_if,
    ]);
    let mut client = call.client_udp();
    let reply = call.invite_two_streams(&mut client, true);
    let ports = assert_answered(&reply, 2);
    let (_, first) = call.daemon.metadata_for(&client.call_id, false);

    let mut customer_rtp = call.rtp(0x1001, 0, ports[0]);
    let mut agent_rtp = call.rtp(0x2002, 8, ports[1]);
    for _ in 0..100 {
        customer_rtp.send_tone_packet(440.0);
        agent_rtp.send_tone_packet(1000.0);
    }

    // Transfer D2 -> D3: label 2 now comes from a new address and port, new SSRC.
    let sdp = offer_sdp(
        IpAddr::V4(call.pair.sender_v4),
        2,
        &[
            OfferedStream::sendonly("1", 31000, 0),
            OfferedStream {
                label: "2".into(),
                port: 31010,
                pt: 8,
                direction: "sendonly",
                connection: Some(IpAddr::V4(new_source)),
            },
        ],
    );
    let xml = metadata_transfer_xml("p-agent-7002", &agent(7003), "2026-11-24T10:05:00Z");
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    // Customer RTP keeps flowing while the re-INVITE is processed.
    let reinvite = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reinvite.status, 200, "{}", reinvite.raw);
    assert_eq!(reinvite.answer_ports(), ports, "our ports stay the same");

    let socket = call
        .pair
        .in_sender(|| UdpSocket::bind((new_source, 31010)).unwrap());
    let mut agent3_rtp = RtpStream::new(socket, agent_rtp.dest, 0x3003, 8);
    for _ in 0..100 {
        customer_rtp.send_tone_packet(440.0);
        agent3_rtp.send_tone_packet(700.0);
    }
    assert_eq!(client.bye(&[]).status, 200);

    let (dir, meta) = call.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["id"], first["id"], "one recording across the transfer");
    assert_eq!(call.daemon.recordings().len(), 1);
    assert_eq!(
        stream_packets(&meta, "1"),
        200,
        "zero loss on the customer stream"
    );
    assert_eq!(stream_packets(&meta, "2"), 200, "zero loss across the move");
    assert_eq!(tshark_count(&dir.join("recording.pcap"), None), 400);
    let participants = meta["participants"].as_array().unwrap();
    let find = |aor: &str| {
        participants
            .iter()
            .find(|p| p["aor"] == aor)
            .unwrap_or_else(|| panic!("participant {aor} in {participants:?}"))
    };
    assert!(find("sip:7002@cc.example")["left_at"].is_string());
    assert!(find("sip:7003@cc.example")["joined_at"].is_string());
}

#[test]
fn reinvite_adds_and_removes_streams_and_pauses() {
    let call = setup("addrm", DaemonOptions::default());
    let mut client = call.client_udp();
    let reply = call.invite_two_streams(&mut client, true);
    let ports = assert_answered(&reply, 2);

    // Add a third stream.
    let three = streams(&[(31000, "1"), (31002, "2"), (31004, "3")], "sendonly");
    let sdp = offer_sdp(IpAddr::V4(call.pair.sender_v4), 2, &three);
    let r = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(r.status, 200, "{}", r.raw);
    let new_ports = r.answer_ports();
    assert_eq!(new_ports.len(), 3);
    assert_eq!(&new_ports[..2], &ports[..]);
    assert!(new_ports[2] != 0 && !ports.contains(&new_ports[2]));
    let mut s3 = call.rtp(0x3, 0, new_ports[2]);
    send_packets(&mut s3, 20, 300.0);

    // Pause stream 1 (inactive), remove stream 2 (port 0).
    let mut changed = three.clone();
    changed[0].direction = "inactive";
    changed[1].port = 0;
    let sdp = offer_sdp(IpAddr::V4(call.pair.sender_v4), 3, &changed);
    let r = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(r.status, 200, "{}", r.raw);
    let after = r.answer_ports();
    assert_eq!(after[1], 0, "removed stream answered with port 0");
    assert!(r.body().contains("a=inactive"), "{}", r.body());

    // Packets to the removed stream's port are no longer recorded.
    let mut s2 = call.rtp(0x2, 8, ports[1]);
    send_packets(&mut s2, 10, 1000.0);
    // Resume stream 1.
    let sdp = offer_sdp(IpAddr::V4(call.pair.sender_v4), 4, &{
        let mut resumed = changed.clone();
        resumed[0].direction = "sendonly";
        resumed
    });
    let r = client.invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    assert_eq!(r.status, 200);
    assert!(r.body().contains("a=recvonly"));
    assert_eq!(client.bye(&[]).status, 200);

    let (_, meta) = call.daemon.metadata_for(&client.call_id, true);
    assert_eq!(stream_packets(&meta, "3"), 20);
    assert_eq!(
        stream_packets(&meta, "2"),
        0,
        "nothing recorded after port 0"
    );
    let s1 = meta["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == "1")
        .unwrap();
    let paused = s1["paused"].as_array().expect("paused intervals");
    assert_eq!(paused.len(), 1, "{s1}");
}

#[test]
fn cancel_before_answer_gets_487_and_ends_the_recording() {
    let call = setup(
        "cancel",
        DaemonOptions {
            extra: vec!["--answer-delay-ms".into(), "3000".into()],
            ..Default::default()
        },
    );
    let mut client = call.client_udp();
    let sdp = offer_sdp(
        IpAddr::V4(call.pair.sender_v4),
        1,
        &streams(&[(31000, "1")], "sendonly"),
    );
    client.send_invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    let trying = client
        .recv_reply(Duration::from_secs(2))
        .expect("100 Trying");
    assert_eq!(trying.status, 100);
    let cancel = client.cancel();
    assert_eq!(cancel.status, 200);
    assert_eq!(cancel.cseq_method(), "CANCEL");
    let invite_final = client.final_reply(Duration::from_secs(2));
    assert_eq!(invite_final.status, 487);
    let (_, meta) = call.daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["end_reason"], "cancel");
}

#[test]
fn retransmitted_invite_is_answered_once_and_lost_ack_retransmits_200() {
    let call = setup("retx", DaemonOptions::default());
    let mut client = call.client_udp();
    let sdp = offer_sdp(
        IpAddr::V4(call.pair.sender_v4),
        1,
        &streams(&[(31000, "1")], "sendonly"),
    );
    let invite = client.send_invite(Some(("application/sdp", sdp.as_bytes())), &[]);
    let first = client.final_reply(Duration::from_secs(2));
    assert_eq!(first.status, 200);
    // The client "lost" the 200 and retransmits its INVITE: answered from the transaction.
    client.send_raw(&invite);
    // No ACK: the 2xx is retransmitted (T1 = 500 ms, doubling).
    let mut oks = 0;
    // Generous window: on a loaded host the driver's timers fire late (the gaps are 0.5, 1, 2 s).
    while let Some(r) = client.recv_reply(Duration::from_millis(5000)) {
        assert_eq!(r.status, 200);
        assert_eq!(r.body(), first.body(), "same answer, not a new session");
        oks += 1;
        if oks >= 3 {
            break;
        }
    }
    assert!(oks >= 3, "200 OK retransmitted until ACK (got {oks})");
    client.to_tag = first.to_tag();
    client.ack();
    assert_eq!(call.daemon.recordings().len(), 1, "one recording only");
    assert_eq!(client.bye(&[]).status, 200);
}

#[test]
fn options_advertises_siprec() {
    let call = setup("opts", DaemonOptions::default());
    let mut client = call.client_udp();
    let r = client.non_invite("OPTIONS", None, &[]);
    assert_eq!(r.status, 200);
    assert!(r.headers("Supported").iter().any(|s| s.contains("siprec")));
    let allow = r.headers("Allow").join(",");
    for m in ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
}

#[test]
fn every_error_response_is_triggered_by_a_crafted_request() {
    let call = setup(
        "errs",
        DaemonOptions {
            rtp_ports: "30000-30011".into(),
            extra: vec!["--max-sessions".into(), "2".into()],
            ..Default::default()
        },
    );
    let sender = IpAddr::V4(call.pair.sender_v4);
    let one = offer_sdp(sender, 1, &streams(&[(31000, "1")], "sendonly"));

    // 400: malformed (no Call-ID) — the reason phrase says what.
    let mut c = call.client_udp();
    let bad = String::from_utf8(c.request("INVITE", "z9hG4bK-bad", 1, &[], None))
        .unwrap()
        .replace(&format!("Call-ID: {}\r\n", c.call_id), "");
    c.send_raw(bad.as_bytes());
    let r = c.final_reply(Duration::from_secs(2));
    assert_eq!(r.status, 400);
    assert!(!r.message.status_code.to_string().is_empty());

    // 415: a body type we cannot handle.
    let mut c = call.client_udp();
    let r = c.invite(Some(("text/plain", b"hello")), &[]);
    assert_eq!(r.status, 415, "{}", r.raw);

    // 420: unknown Require.
    let mut c = call.client_udp();
    let r = c.invite(
        Some(("application/sdp", one.as_bytes())),
        &["Require: siprec, frobnication".into()],
    );
    assert_eq!(r.status, 420, "{}", r.raw);
    assert!(r
        .header("Unsupported")
        .unwrap_or_default()
        .contains("frobnication"));

    // 481: BYE for a dialog that does not exist.
    let mut c = call.client_udp();
    c.to_tag = Some("no-such-dialog".into());
    assert_eq!(c.bye(&[]).status, 481);

    // 488: no usable stream.
    let mut c = call.client_udp();
    let unusable = one.replace("RTP/AVP", "UDP/TLS/RTP/SAVP");
    let r = c.invite(Some(("application/sdp", unusable.as_bytes())), &[]);
    assert_eq!(r.status, 488, "{}", r.raw);

    // 400: malformed SDP.
    let mut c = call.client_udp();
    let r = c.invite(
        Some(("application/sdp", b"v=0\r\nthis is not sdp\r\n")),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.raw);

    // 503 + Retry-After: session limit (2).
    let mut a = call.client_udp();
    assert_eq!(
        a.invite(Some(("application/sdp", one.as_bytes())), &[])
            .status,
        200
    );
    let mut b = call.client_udp();
    assert_eq!(
        b.invite(Some(("application/sdp", one.as_bytes())), &[])
            .status,
        200
    );
    let mut c = call.client_udp();
    let r = c.invite(Some(("application/sdp", one.as_bytes())), &[]);
    assert_eq!(r.status, 503, "{}", r.raw);
    assert!(r.header("Retry-After").is_some());
    assert_eq!(a.bye(&[]).status, 200);
    // 503 + Retry-After: port range exhausted. 12 ports = 6 RTP/RTCP pairs: b holds one, a's
    // rests in its cool-down, so 4 are free and 5 streams cannot be answered.
    let mut c = call.client_udp();
    let five = offer_sdp(
        sender,
        1,
        &streams(
            &[
                (31000, "1"),
                (31002, "2"),
                (31004, "3"),
                (31006, "4"),
                (31008, "5"),
            ],
            "sendonly",
        ),
    );
    let r = c.invite(Some(("application/sdp", five.as_bytes())), &[]);
    assert_eq!(r.status, 503, "{}", r.raw);
    assert!(r.header("Retry-After").is_some());
    assert_eq!(b.bye(&[]).status, 200);
}

#[test]
fn acl_refuses_other_networks() {
    let call = setup(
        "acl",
        DaemonOptions {
            extra: vec!["--acl".into(), "192.0.2.0/24".into()],
            ..Default::default()
        },
    );
    let mut c = call.client_udp();
    let sdp = offer_sdp(
        IpAddr::V4(call.pair.sender_v4),
        1,
        &streams(&[(31000, "1")], "sendonly"),
    );
    assert_eq!(
        c.invite(Some(("application/sdp", sdp.as_bytes())), &[])
            .status,
        403
    );
}
