//! RFC 4733 DTMF end to end: real telephone-event packets on a recorded stream end up as
//! digits in metadata.json (once each, despite the repeated end packets), kept in the pcap.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use tests::{
    client::{offer_sdp, siprec_body, OfferedStream, SipClient},
    daemon::{tshark_count, Daemon, DaemonOptions},
    net::VethPair,
    rtp::RtpStream,
};

/// The payload type `offer_sdp` maps to telephone-event.
const TELEPHONE_EVENT: u8 = 101;

#[test]
fn dtmf_digits_are_recorded_in_metadata() {
    let pair = VethPair::new("dtmf");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let mut client = pair.in_sender(|| SipClient::udp(IpAddr::V4(pair.sender_v4), daemon.sip));
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly("1", 31000, 0)],
    );
    let (ctype, body) = siprec_body(&sdp, None);
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let port = reply.answer_ports()[0];
    let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    let mut rtp = RtpStream::new(
        socket,
        SocketAddr::new(IpAddr::V4(pair.recorder_v4), port),
        0x4733,
        0,
    );
    let mut sent = 0;
    for _ in 0..25 {
        rtp.send_tone_packet(440.0);
        sent += 1;
    }
    // "1", "#", "9": 100, 60 and 200 ms.
    sent += rtp.send_dtmf(TELEPHONE_EVENT, 1, 5);
    for _ in 0..5 {
        rtp.send_tone_packet(440.0);
        sent += 1;
    }
    sent += rtp.send_dtmf(TELEPHONE_EVENT, 11, 3);
    sent += rtp.send_dtmf(TELEPHONE_EVENT, 9, 10);
    for _ in 0..5 {
        rtp.send_tone_packet(440.0);
        sent += 1;
    }
    assert_eq!(client.bye(&[]).status, 200);

    let (dir, meta) = daemon.metadata_for(&client.call_id, true);
    let stream = &meta["streams"][0];
    assert_eq!(stream["packets"], sent, "every packet recorded");
    let dtmf = stream["dtmf"].as_array().expect("streams[0].dtmf");
    let digits: Vec<(&str, u64, bool)> = dtmf
        .iter()
        .map(|e| {
            (
                e["digit"].as_str().unwrap(),
                e["duration_ms"].as_u64().unwrap(),
                e["ended"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        digits,
        [("1", 100, true), ("#", 60, true), ("9", 200, true)],
        "one entry per digit, end retransmissions folded"
    );
    assert_eq!(dtmf[0]["ssrc"], 0x4733);
    assert_eq!(meta["dropped"]["not_decoded"], 0);
    // Events are kept in the pcap like every other packet.
    assert_eq!(tshark_count(&dir.join("recording.pcap"), None) as u64, sent);
}
