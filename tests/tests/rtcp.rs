//! RTCP receiver reports end to end: the client binds the RTCP port it offered (RTP + 1),
//! sends RTP with a deliberate gap, and receives from the recorder's RTCP port an RR whose
//! report block names its SSRC with the right cumulative loss and echoes the client's sender
//! report (LSR); after BYE the reports stop.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use tests::{
    client::{offer_sdp, siprec_body, OfferedStream, SipClient},
    daemon::{Daemon, DaemonOptions},
    net::VethPair,
    rtp::{send_paced, RtpStream},
};

/// A report block: (SSRC, cumulative lost, extended highest sequence number, LSR).
type Block = (u32, u32, u32, u32);

/// (sender SSRC, report blocks, has an SDES CNAME after the RR).
fn parse_rr(b: &[u8]) -> Option<(u32, Vec<Block>, bool)> {
    if b.len() < 8 || b[0] >> 6 != 2 || b[1] != 201 {
        return None;
    }
    let count = (b[0] & 0x1f) as usize;
    let len = (u16::from_be_bytes([b[2], b[3]]) as usize + 1) * 4;
    let word = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    if b.len() < len || len < 8 + 24 * count {
        return None;
    }
    let blocks = (0..count)
        .map(|k| {
            let o = 8 + 24 * k;
            (word(o), word(o + 4) & 0xff_ffff, word(o + 8), word(o + 16))
        })
        .collect();
    let sdes = &b[len..];
    let cname = sdes.len() >= 10 && sdes[1] == 202 && sdes[8] == 1;
    Some((word(4), blocks, cname))
}

#[test]
fn receiver_reports_name_the_ssrc_and_its_loss() {
    let pair = VethPair::new("rtcp");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let rtp_port = 31000;
    let rtcp = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, rtp_port + 1)).unwrap());
    let mut client = pair.in_sender(|| SipClient::tcp(daemon.sip));
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly("1", rtp_port, 0)],
    );
    let (ctype, body) = siprec_body(&sdp, None);
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let ours = reply.answer_ports()[0];

    let socket = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, rtp_port)).unwrap());
    let dest = SocketAddr::new(IpAddr::V4(pair.recorder_v4), ours);
    let mut stream = RtpStream::new(socket, dest, 0x5eed_0001, 0);
    let skipped = 7;
    send_paced(&mut [(&mut stream, 440.0)], Duration::from_millis(600));
    stream.skip(skipped);
    send_paced(&mut [(&mut stream, 440.0)], Duration::from_millis(600));
    let last_seq = stream.seq.wrapping_sub(1);
    // A sender report to our RTCP port: XDP captures it like RTP, and the next RR echoes the
    // middle of its NTP timestamp as LSR.
    let mut sr = vec![0x80, 200, 0, 6];
    sr.extend_from_slice(&stream.ssrc.to_be_bytes());
    sr.extend_from_slice(&[0xe9, 0x01, 0x5a, 0x5b, 0x5c, 0x5d, 0x00, 0x00]);
    sr.extend_from_slice(&stream.timestamp.to_be_bytes());
    sr.extend_from_slice(&(stream.sent as u32).to_be_bytes());
    sr.extend_from_slice(&((stream.sent * 160) as u32).to_be_bytes());
    rtcp.send_to(&sr, SocketAddr::new(IpAddr::V4(pair.recorder_v4), ours + 1))
        .unwrap();

    // Reports come every 2.5-7.5 s; the first may predate the last packets: wait for one that
    // has seen them all, and check it.
    rtcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1500];
    let mut reports = 0;
    let block = loop {
        assert!(
            Instant::now() < deadline,
            "no complete RR in 20 s ({reports} RRs)"
        );
        let Ok((n, from)) = rtcp.recv_from(&mut buf) else {
            continue;
        };
        let Some((_, blocks, cname)) = parse_rr(&buf[..n]) else {
            continue;
        };
        reports += 1;
        assert_eq!(
            from,
            SocketAddr::new(IpAddr::V4(pair.recorder_v4), ours + 1)
        );
        assert!(cname, "compound RR + SDES CNAME");
        if let Some(b) = blocks.iter().find(|b| b.0 == stream.ssrc) {
            if b.2 as u16 == last_seq && b.3 != 0 {
                break *b;
            }
        }
    };
    assert_eq!(block.1, u32::from(skipped), "cumulative lost");
    assert_eq!(
        block.3, 0x5a5b_5c5d,
        "LSR: middle 32 bits of the SR's NTP timestamp"
    );

    // After BYE the reports stop (the interval is at most 7.5 s).
    assert_eq!(client.bye(&[]).status, 200);
    let quiet_from = Instant::now() + Duration::from_millis(500);
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        if let Ok((n, _)) = rtcp.recv_from(&mut buf) {
            assert!(
                Instant::now() < quiet_from || parse_rr(&buf[..n]).is_none(),
                "an RR after the session ended"
            );
        }
    }
}
