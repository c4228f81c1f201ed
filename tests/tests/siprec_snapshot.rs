//! Metadata snapshot request end to end: metadata whose associations name a stream that is
//! never described makes the real recorder send an in-dialog UPDATE asking for a snapshot.

use std::{net::IpAddr, time::Duration};

use tests::{
    client::{metadata_xml, offer_sdp, siprec_body, MetaParticipant, OfferedStream, SipClient},
    daemon::{Daemon, DaemonOptions},
    net::VethPair,
};

#[test]
fn unresolved_metadata_gets_a_snapshot_request() {
    let pair = VethPair::new("snap");
    let daemon = Daemon::start(&pair, DaemonOptions::default());
    let mut client = pair.in_sender(|| SipClient::tcp(daemon.sip));
    let sdp = offer_sdp(
        IpAddr::V4(pair.sender_v4),
        1,
        &[OfferedStream::sendonly("1", 31000, 0)],
    );
    // The agent sends stream `st-9`, which the metadata never describes.
    let participants = [
        MetaParticipant {
            id: "p-cust".into(),
            aor: "sip:cust@carrier.example".into(),
            name: "Customer".into(),
            sends: vec!["1".into()],
        },
        MetaParticipant {
            id: "p-agent".into(),
            aor: "sip:7002@cc.example".into(),
            name: "Agent".into(),
            sends: vec!["9".into()],
        },
    ];
    let xml = metadata_xml(None, &["1"], &participants, "2026-11-24T10:00:00Z");
    let (ctype, body) = siprec_body(&sdp, Some(&xml));
    let reply = client.invite(Some((&ctype, &body)), &[]);
    assert_eq!(reply.status, 200, "{}", reply.raw);

    let update = client
        .recv_request(Duration::from_secs(5))
        .expect("a snapshot request from the recorder");
    assert_eq!(update.method, rsip::Method::Update);
    let text = update.to_string();
    let header = |name: &str| {
        text.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    assert_eq!(header("Content-Type"), "application/rs-metadata-request");
    assert_eq!(header("Content-Disposition"), "recording-session");
    assert_eq!(header("Call-ID"), client.call_id);
    let xml = String::from_utf8_lossy(&update.body).into_owned();
    assert!(
        xml.contains(r#"<requestsnapshot xmlns="urn:ietf:params:xml:ns:recording:1">"#)
            && xml.contains("<requestreason")
            && xml.contains("st-9"),
        "{xml}"
    );
    // recv_request answered it 200; the session goes on and ends normally.
    assert_eq!(client.bye(&[]).status, 200);
    let (_, meta) = daemon.metadata_for(&client.call_id, true);
    assert_eq!(meta["end_reason"], "bye");
}
