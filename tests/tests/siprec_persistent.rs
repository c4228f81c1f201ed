//! Persistent recording session end to end: the SRC says (metadata `sessionrecordingassoc`
//! with a `disassociate-time`) that the recorded call left the recording session; its
//! participants get `left_at`, and the recording goes on until the BYE.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{Daemon, DaemonOptions},
    net::VethPair,
    rtp::RtpStream,
};

const LEFT: &str = "2026-11-24T10:05:00Z";

#[test]
fn call_leaving_the_recording_session_ends_its_participants_not_the_recording() {
    let pair = VethPair::new("persist");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly("1", 31000, 0)],
    );
    let participants = ["cust", "agent"].map(|id| MetaParticipant {
        id: format!("p-{id}"),
        aor: format!("sip:{id}@cc.example"),
        name: id.into(),
        sends: vec!["1".into()],
    });
    let xml = metadata_xml(None, &["1"], &participants, "2026-11-24T10:00:00Z");
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    let mut rtp = RtpStream::new(
        socket,
        SocketAddr::new(IpAddr::V4(pair.recorder_v4), reply.answer_ports()[0]),
        0x9e55,
        0,
    );
    for _ in 0..20 {
        rtp.send_tone_packet(440.0);
    }

    // `metadata_xml` puts both participants in communication session `sess-1`.
    let cs_left = format!(
        "<recording xmlns=\"urn:ietf:params:xml:ns:recording:1\"><datamode>partial</datamode>\
         <sessionrecordingassoc session_id=\"sess-1\"><disassociate-time>{LEFT}</disassociate-time>\
         </sessionrecordingassoc></recording>"
    );
    let update = client.non_invite(
        "UPDATE",
        Some(("application/rs-metadata+xml", cs_left.as_bytes())),
        &["Content-Disposition: recording-session".into()],
    );
    assert_eq!(update.status, 200, "{}", update.raw);
    // Still recording: RTP after the UPDATE is kept.
    for _ in 0..20 {
        rtp.send_tone_packet(440.0);
    }
    assert_eq!(client.bye(&[]).status, 200);

    let (_, meta) = daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["end_reason"], "bye", "only the BYE ended it");
    assert_eq!(meta["streams"][0]["packets"], 40);
    let people = meta["participants"].as_array().unwrap();
    assert_eq!(people.len(), 2);
    for p in people {
        assert_eq!(p["left_at"], LEFT, "{p}");
        assert_eq!(p["joined_at"], "2026-11-24T10:00:00Z", "{p}");
    }
}
