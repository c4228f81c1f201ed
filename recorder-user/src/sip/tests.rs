//! Deterministic tests of the endpoint on virtual time (quinn-proto `Pair`-style harness: feed
//! bytes, advance `now`, assert transmits and events). No sockets, no runtime.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rsip::{headers::UntypedHeader, prelude::HeadersExt};

use super::*;

const CLIENT: &str = "192.0.2.9:40000";
const LOCAL: &str = "192.0.2.1:5060";

struct Harness {
    ep: Endpoint,
    start: Instant,
    now: Instant,
    /// Transmits with the virtual time they were produced at.
    sent: Vec<(Duration, Transmit)>,
}

impl Harness {
    fn new() -> Self {
        let config = EndpointConfig {
            contact_host: "192.0.2.1".into(),
            contact_params: vec!["+sip.srs".into()],
            ..Default::default()
        };
        let now = Instant::now();
        Self {
            ep: Endpoint::new(config),
            start: now,
            now,
            sent: Vec::new(),
        }
    }

    fn feed(&mut self, transport: Transport, connection: Option<u64>, source: &str, text: &str) {
        self.ep.handle_incoming(
            self.now,
            Incoming {
                transport,
                source: source.parse().unwrap(),
                local: LOCAL.parse().unwrap(),
                connection,
                bytes: Bytes::copy_from_slice(text.as_bytes()),
            },
        );
        self.collect();
    }

    fn udp(&mut self, text: &str) {
        self.feed(Transport::Udp, None, CLIENT, text);
    }

    fn collect(&mut self) {
        while let Some(t) = self.ep.poll_transmit() {
            self.sent.push((self.now - self.start, t));
        }
    }

    /// Runs every timer up to `now + d`, one wake-up at a time.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(at) = self.ep.poll_timeout().filter(|at| *at <= target) {
            self.now = self.now.max(at);
            self.ep.handle_timeout(self.now);
            self.collect();
        }
        self.now = target;
    }

    fn take_sent(&mut self) -> Vec<(Duration, Transmit)> {
        self.collect();
        std::mem::take(&mut self.sent)
    }

    fn responses(&mut self) -> Vec<rsip::Response> {
        self.take_sent()
            .into_iter()
            .map(|(_, t)| parse_response(&t.bytes))
            .collect()
    }

    fn events(&mut self) -> Vec<SipEvent> {
        std::iter::from_fn(|| self.ep.poll_event()).collect()
    }

    /// Feeds an INVITE and returns the transaction the app got.
    fn invite(&mut self, branch: &str, call_id: &str) -> TxnId {
        self.udp(&invite(branch, call_id, 1));
        let events = self.events();
        match events.as_slice() {
            [SipEvent::Request {
                txn, dialog: None, ..
            }] => *txn,
            other => panic!("expected one new INVITE, got {other:?}"),
        }
    }

    /// INVITE, app 200, ACK: returns the dialog and the To header value with our tag.
    fn establish(&mut self, call_id: &str) -> (DialogId, String) {
        let txn = self.invite("z9hG4bKinv", call_id);
        let ok = self.ep.make_response(&txn, 200, None).unwrap();
        let to = ok.to_header().unwrap().value().to_string();
        self.ep.respond(self.now, &txn, ok).unwrap();
        self.take_sent();
        self.udp(&in_dialog("ACK", "z9hG4bKack", call_id, &to, 1));
        let dialog = match self.events().as_slice() {
            [SipEvent::Acked { dialog }] => dialog.clone(),
            other => panic!("expected Acked, got {other:?}"),
        };
        (dialog, to)
    }
}

fn parse_response(bytes: &[u8]) -> rsip::Response {
    match rsip::SipMessage::try_from(bytes).unwrap() {
        rsip::SipMessage::Response(r) => r,
        rsip::SipMessage::Request(r) => panic!("expected a response, got {r}"),
    }
}

fn invite(branch: &str, call_id: &str, cseq: u32) -> String {
    format!(
        "INVITE sip:srs@192.0.2.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.2:5062;branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"SRC\" <sip:src@10.0.0.2>;tag=src1\r\n\
         To: <sip:srs@192.0.2.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} INVITE\r\n\
         Contact: <sip:src@10.0.0.2:5062>;+sip.src\r\n\
         Require: siprec\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: 4\r\n\r\nv=0\n"
    )
}

fn in_dialog(method: &str, branch: &str, call_id: &str, to: &str, cseq: u32) -> String {
    format!(
        "{method} sip:srs@192.0.2.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.2:5062;branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"SRC\" <sip:src@10.0.0.2>;tag=src1\r\n\
         To: {to}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn options(branch: &str) -> String {
    format!(
        "OPTIONS sip:srs@192.0.2.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.2:5062;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:ping@10.0.0.2>;tag=p1\r\n\
         To: <sip:srs@192.0.2.1>\r\n\
         Call-ID: ping-{branch}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn header(r: &rsip::Response, name: &str) -> Option<String> {
    r.headers.iter().find_map(|h| {
        let text = h.to_string();
        let (n, v) = text.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn to_tag(r: &rsip::Response) -> Option<String> {
    use rsip::headers::ToTypedHeader;
    let to = r.to_header().unwrap().typed().unwrap();
    message::tag_param(&to.params)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn invite_gets_trying_then_app_ok_retransmitted_until_ack() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bK1", "call-1");
    let trying = h.responses();
    assert_eq!(trying.len(), 1);
    assert_eq!(trying[0].status_code.code(), 100);
    assert_eq!(to_tag(&trying[0]), None, "100 Trying carries no To-tag");

    let expected =
        h.ep.dialog_of(&txn)
            .expect("an initial INVITE knows its future dialog");
    let mut ok = h.ep.make_response(&txn, 200, None).unwrap();
    ok.body = b"v=0\r\n".to_vec();
    h.ep.respond(h.now, &txn, ok).unwrap();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let first = parse_response(&sent[0].1.bytes);
    assert_eq!(first.status_code.code(), 200);
    assert!(to_tag(&first).is_some());
    assert_eq!(header(&first, "Content-Length").as_deref(), Some("5"));
    let contact = header(&first, "Contact").unwrap();
    assert!(
        contact.contains("sip:srs@192.0.2.1:5060") && contact.ends_with(";+sip.srs"),
        "{contact}"
    );
    assert_eq!(h.ep.dialog_count(), 1);

    h.advance(secs(12.0));
    let times: Vec<f64> = h
        .take_sent()
        .iter()
        .map(|(t, tx)| {
            assert_eq!(tx.bytes, sent[0].1.bytes, "retransmission is the same 200");
            t.as_secs_f64()
        })
        .collect();
    // Intervals 0.5, 1, 2, 4, 4 s (T1 doubling, capped at T2).
    assert_eq!(times, vec![0.5, 1.5, 3.5, 7.5, 11.5]);

    let to = first.to_header().unwrap().value().to_string();
    h.udp(&in_dialog("ACK", "z9hG4bKack1", "call-1", &to, 1));
    assert!(matches!(h.events().as_slice(), [SipEvent::Acked { dialog }] if *dialog == expected));
    assert!(h.ep.has_dialog(&expected));
    assert!(h.take_sent().is_empty(), "ACK is never answered");
    h.advance(secs(40.0));
    assert!(h.take_sent().is_empty(), "no retransmission after the ACK");
    assert!(h.events().is_empty(), "no AckTimeout after the ACK");
    assert_eq!(h.ep.dialog_count(), 1);
    assert_eq!(
        h.ep.transaction_count(),
        0,
        "transactions are gone after timer L"
    );
}

#[test]
fn lost_ack_gives_ack_timeout_after_32s_and_a_bye() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bK2", "call-2");
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    h.ep.respond(h.now, &txn, ok).unwrap();
    h.take_sent();
    h.advance(secs(31.9));
    assert!(h.events().is_empty());
    assert_eq!(
        h.take_sent().len(),
        10,
        "retransmits at 0.5, 1.5, 3.5, 7.5 ... 31.5 s"
    );
    h.advance(secs(0.1));
    let events = h.events();
    assert!(
        matches!(events.as_slice(), [SipEvent::AckTimeout { dialog }] if dialog.call_id == "call-2"),
        "{events:?}"
    );
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let bye = String::from_utf8_lossy(&sent[0].1.bytes).into_owned();
    assert!(
        bye.starts_with("BYE sip:src@10.0.0.2:5062 SIP/2.0\r\n"),
        "{bye}"
    );
    assert!(bye.contains("Reason: SIP;cause=408"), "{bye}");
    assert_eq!(
        sent[0].1.destination,
        "10.0.0.2:5062".parse::<SocketAddr>().unwrap(),
        "BYE goes to the remote target"
    );
    assert_eq!(h.ep.dialog_count(), 0);
    assert_eq!(h.ep.counters().ack_timeouts, 1);
}

#[test]
fn retransmitted_invite_is_answered_from_the_transaction() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bK3", "call-3");
    h.take_sent();
    h.udp(&invite("z9hG4bK3", "call-3", 1));
    assert!(h.events().is_empty(), "the app sees the INVITE once");
    let again = h.responses();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].status_code.code(), 100);

    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    h.ep.respond(h.now, &txn, ok).unwrap();
    let ok_bytes = h.take_sent().remove(0).1.bytes;
    h.udp(&invite("z9hG4bK3", "call-3", 1));
    assert!(h.events().is_empty());
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].1.bytes, ok_bytes,
        "the last response is re-sent as is"
    );
    assert_eq!(h.ep.counters().retransmissions_absorbed, 2);
    assert_eq!(h.ep.counters().requests.get("INVITE"), Some(&3));
}

#[test]
fn to_tag_is_generated_once_per_dialog() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bK4", "call-4");
    h.take_sent();
    let ringing = h.ep.make_response(&txn, 180, None).unwrap();
    h.ep.respond(h.now, &txn, ringing).unwrap();
    let mut ok = h.ep.make_response(&txn, 200, None).unwrap();
    // Even if the app drops the tag, the endpoint restores the dialog's.
    let to = ok.to_header().unwrap().value().to_string();
    let bare = to.split(";tag=").next().unwrap().to_string();
    for hd in ok.headers.iter_mut() {
        if let rsip::Header::To(t) = hd {
            *t = rsip::headers::To::new(bare.clone());
        }
    }
    h.ep.respond(h.now, &txn, ok).unwrap();
    let tags: Vec<Option<String>> = h.responses().iter().map(to_tag).collect();
    assert_eq!(tags.len(), 2);
    assert!(tags[0].is_some());
    assert_eq!(tags[0], tags[1]);
}

#[test]
fn cancel_before_answer_gets_200_and_487() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bK5", "call-5");
    h.take_sent();
    let cancel = invite("z9hG4bK5", "call-5", 1)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    h.udp(&cancel);
    let responses = h.responses();
    let codes: Vec<(u16, String)> = responses
        .iter()
        .map(|r| {
            (
                r.status_code.code(),
                r.cseq_header().unwrap().value().to_string(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![(200, "1 CANCEL".into()), (487, "1 INVITE".into())]
    );
    assert_eq!(
        to_tag(&responses[0]),
        to_tag(&responses[1]),
        "same To-tag (RFC 3261 §9.2)"
    );
    assert!(matches!(h.events().as_slice(), [SipEvent::Cancelled { txn: t }] if *t == txn));
    let late = h.ep.make_response(&txn, 200, None).unwrap();
    assert!(matches!(
        h.ep.respond(h.now, &txn, late),
        Err(SipError::AlreadyAnswered)
    ));

    // 487 is retransmitted until the ACK (timer G), then nothing.
    h.advance(secs(0.6));
    assert_eq!(
        h.responses()
            .iter()
            .map(|r| r.status_code.code())
            .collect::<Vec<_>>(),
        vec![487]
    );
    let ack = invite("z9hG4bK5", "call-5", 1)
        .replace("INVITE sip:", "ACK sip:")
        .replace("1 INVITE", "1 ACK")
        .replace(
            "To: <sip:srs@192.0.2.1>",
            &format!(
                "To: <sip:srs@192.0.2.1>;tag={}",
                to_tag(&responses[1]).unwrap()
            ),
        );
    h.udp(&ack);
    h.advance(secs(10.0));
    let after: Vec<String> = h
        .take_sent()
        .iter()
        .map(|(t, x)| format!("{t:?} {}", String::from_utf8_lossy(&x.bytes)))
        .collect();
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(h.ep.dialog_count(), 0);
    assert_eq!(
        h.ep.transaction_count(),
        1,
        "the CANCEL's timer J (64*T1 on UDP) still runs"
    );
    h.advance(secs(30.0));
    assert_eq!(h.ep.transaction_count(), 0);
}

#[test]
fn unanswered_request_gets_500_from_the_endpoint() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bKslow", "call-slow");
    h.take_sent();
    h.advance(secs(31.9));
    assert!(h.take_sent().is_empty());
    h.advance(secs(0.1));
    let sent = h.take_sent();
    assert!(sent[0]
        .1
        .bytes
        .starts_with(b"SIP/2.0 500 No answer from the application\r\n"));
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 500, .. }]
    ));
    assert_eq!(h.ep.counters().rejections.get("app-timeout"), Some(&1));
    let late = h.ep.make_response(&txn, 200, None).unwrap();
    assert!(matches!(
        h.ep.respond(h.now, &txn, late),
        Err(SipError::AlreadyAnswered)
    ));
    assert_eq!(h.ep.dialog_count(), 0);
}

#[test]
fn networks_parse_and_match() {
    let net: Network = "10.1.0.0/16".parse().unwrap();
    assert!(net.contains("10.1.200.3".parse().unwrap()));
    assert!(!net.contains("10.2.0.1".parse().unwrap()));
    assert!(
        net.contains("::ffff:10.1.0.9".parse().unwrap()),
        "IPv4-mapped source"
    );
    let v6: Network = "2001:db8::/32".parse().unwrap();
    assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
    assert!(!v6.contains("10.1.0.1".parse().unwrap()));
    let host: Network = "192.0.2.9".parse().unwrap();
    assert!(host.contains("192.0.2.9".parse().unwrap()));
    assert!(!host.contains("192.0.2.8".parse().unwrap()));
    let all: Network = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("203.0.113.1".parse().unwrap()));
    assert!("10.0.0.0/33".parse::<Network>().is_err());
    assert!("nonsense/8".parse::<Network>().is_err());
}

#[test]
fn source_acl_rejects_new_invites_from_other_networks() {
    let mut h = Harness::new();
    h.ep = Endpoint::new(EndpointConfig {
        allowed_networks: vec!["10.0.0.0/8".parse().unwrap()],
        ..Default::default()
    });
    h.udp(&invite("z9hG4bKacl", "call-acl", 1)); // from 192.0.2.9
    assert_eq!(h.responses()[0].status_code.code(), 403);
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 403, .. }]
    ));
    h.udp(&options("z9hG4bKacl2"));
    assert_eq!(
        h.responses()[0].status_code.code(),
        200,
        "pings are still answered"
    );
    h.feed(
        Transport::Udp,
        None,
        "10.0.0.2:5062",
        &invite("z9hG4bKacl3", "call-acl3", 1),
    );
    assert!(matches!(h.events().as_slice(), [SipEvent::Request { .. }]));
}

#[test]
fn cancel_without_match_gets_481() {
    let mut h = Harness::new();
    let cancel = invite("z9hG4bKnone", "call-6", 1)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    h.udp(&cancel);
    let r = h.responses();
    assert_eq!(r[0].status_code.code(), 481);
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 481, .. }]
    ));
    assert_eq!(h.ep.counters().rejections.get("cancel-no-match"), Some(&1));
}

#[test]
fn options_is_answered_with_capabilities() {
    let mut h = Harness::new();
    h.udp(&options("z9hG4bKo1"));
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status_code.code(), 200);
    assert!(header(&r[0], "Allow").unwrap().contains("INVITE"));
    assert!(header(&r[0], "Allow").unwrap().contains("BYE"));
    assert!(header(&r[0], "Supported")
        .unwrap()
        .split(',')
        .any(|t| t.trim() == "siprec"));
    let accept = header(&r[0], "Accept").unwrap();
    for t in [
        "application/sdp",
        "application/rs-metadata+xml",
        "application/rs-metadata",
    ] {
        assert!(accept.split(',').any(|a| a.trim() == t), "{accept}");
    }
    assert!(h.events().is_empty(), "the app is not bothered by pings");
    // UDP without rport: to the source IP and the sent-by port.
    h.udp(&options("z9hG4bKo2"));
    let sent = h.take_sent();
    assert_eq!(
        sent[0].1.destination,
        "192.0.2.9:5062".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn non_invite_transaction_lingers_for_timer_j_on_udp() {
    let mut h = Harness::new();
    h.udp(&options("z9hG4bKj"));
    let first = h.take_sent().remove(0).1.bytes;
    h.advance(secs(10.0));
    h.udp(&options("z9hG4bKj"));
    assert_eq!(
        h.take_sent().remove(0).1.bytes,
        first,
        "answered from the transaction"
    );
    assert_eq!(h.ep.counters().retransmissions_absorbed, 1);
    h.advance(secs(23.0));
    assert_eq!(h.ep.transaction_count(), 0, "timer J (64*T1) ended it");
    h.udp(&options("z9hG4bKj"));
    let again = parse_response(&h.take_sent().remove(0).1.bytes);
    assert_ne!(
        Some(to_tag(&again)),
        Some(to_tag(&parse_response(&first))),
        "a new transaction"
    );
    // On TCP timer J is zero: the transaction is gone at once.
    h.feed(
        Transport::Tcp,
        Some(3),
        CLIENT,
        &options("z9hG4bKjt").replace("/UDP", "/TCP"),
    );
    h.advance(Duration::ZERO);
    assert_eq!(h.ep.transaction_count(), 1, "only the UDP one is left");
}

#[test]
fn bye_in_dialog_reaches_the_app_and_ends_the_dialog() {
    let mut h = Harness::new();
    let (dialog, to) = h.establish("call-7");
    h.udp(&in_dialog("BYE", "z9hG4bKbye", "call-7", &to, 2));
    let txn = match h.events().as_slice() {
        [SipEvent::Request {
            txn,
            dialog: Some(d),
            request,
            ..
        }] => {
            assert_eq!(d, &dialog);
            assert_eq!(request.method, rsip::Method::Bye);
            *txn
        }
        other => panic!("{other:?}"),
    };
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    assert_eq!(to_tag(&ok).as_deref(), Some(dialog.local_tag.as_str()));
    h.ep.respond(h.now, &txn, ok).unwrap();
    assert_eq!(h.responses()[0].status_code.code(), 200);
    assert_eq!(h.ep.dialog_count(), 0);
    // The dialog is gone: a later request in it is 481, answered without the app.
    h.udp(&in_dialog("INFO", "z9hG4bKinfo", "call-7", &to, 3));
    assert_eq!(h.responses()[0].status_code.code(), 481);
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 481, .. }]
    ));
}

#[test]
fn full_transaction_table_refuses_new_sessions_but_not_their_byes() {
    let mut h = Harness::new();
    h.ep = Endpoint::new(EndpointConfig {
        contact_host: "192.0.2.1".into(),
        max_transactions: 3,
        ..Default::default()
    });
    let (dialog, to) = h.establish("call-full");
    // OPTIONS transactions linger (Timer K/J) and fill the table.
    for n in 0..3 {
        h.udp(&options(&format!("z9hG4bKopt{n}")));
    }
    h.take_sent();
    assert!(h.ep.transaction_count() >= 3);
    h.udp(&invite("z9hG4bKnew", "call-new", 1));
    let refused = h.responses();
    assert_eq!(refused[0].status_code.code(), 503);
    assert!(header(&refused[0], "Retry-After").is_some());
    // The BYE of the live session still reaches the app.
    h.udp(&in_dialog("BYE", "z9hG4bKbye", "call-full", &to, 2));
    match h.events().as_slice() {
        [.., SipEvent::Request {
            dialog: Some(d),
            request,
            ..
        }] => {
            assert_eq!(d, &dialog);
            assert_eq!(request.method, rsip::Method::Bye);
        }
        other => panic!("BYE refused under load: {other:?}"),
    }
}

#[test]
fn bye_before_ack_stops_the_2xx_retransmissions() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bKba", "call-ba");
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    let to = ok.to_header().unwrap().value().to_string();
    h.ep.respond(h.now, &txn, ok).unwrap();
    h.take_sent();
    h.udp(&in_dialog("BYE", "z9hG4bKbb", "call-ba", &to, 2));
    let bye = match h.events().as_slice() {
        [SipEvent::Request { txn, .. }] => *txn,
        other => panic!("{other:?}"),
    };
    let ok = h.ep.make_response(&bye, 200, None).unwrap();
    h.ep.respond(h.now, &bye, ok).unwrap();
    h.take_sent();
    h.advance(secs(40.0));
    assert!(
        h.take_sent().is_empty(),
        "no 2xx retransmission, no BYE of our own"
    );
    assert!(
        h.events().is_empty(),
        "no AckTimeout for a dialog the client ended"
    );
}

#[test]
fn unknown_dialog_gets_481_and_never_reaches_the_app() {
    let mut h = Harness::new();
    h.udp(&in_dialog(
        "UPDATE",
        "z9hG4bKu",
        "nope",
        "<sip:srs@192.0.2.1>;tag=zzz",
        5,
    ));
    assert_eq!(h.responses()[0].status_code.code(), 481);
    let events = h.events();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, SipEvent::Request { .. })),
        "{events:?}"
    );
    assert_eq!(h.ep.counters().rejections.get("unknown-dialog"), Some(&1));
}

#[test]
fn cseq_must_increase_in_a_dialog() {
    let mut h = Harness::new();
    let (_, to) = h.establish("call-8");
    h.udp(&in_dialog("INFO", "z9hG4bKi1", "call-8", &to, 1));
    let r = h.responses();
    assert_eq!(r[0].status_code.code(), 500);
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 500, .. }]
    ));
    h.udp(&in_dialog("INFO", "z9hG4bKi2", "call-8", &to, 9));
    assert!(matches!(h.events().as_slice(), [SipEvent::Request { .. }]));
}

#[test]
fn reinvite_is_offered_in_dialog_and_acked() {
    let mut h = Harness::new();
    let (dialog, to) = h.establish("call-9");
    let reinvite =
        invite("z9hG4bKre", "call-9", 2).replace("To: <sip:srs@192.0.2.1>", &format!("To: {to}"));
    h.udp(&reinvite);
    let txn = match h.events().as_slice() {
        [SipEvent::Request {
            txn,
            dialog: Some(d),
            ..
        }] if *d == dialog => *txn,
        other => panic!("{other:?}"),
    };
    assert_eq!(h.responses()[0].status_code.code(), 100);
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    h.ep.respond(h.now, &txn, ok).unwrap();
    h.take_sent();
    h.udp(&in_dialog("ACK", "z9hG4bKack2", "call-9", &to, 2));
    assert!(matches!(h.events().as_slice(), [SipEvent::Acked { dialog: d }] if *d == dialog));
    h.advance(secs(40.0));
    assert!(h.take_sent().is_empty());
    assert_eq!(h.ep.dialog_count(), 1);
}

#[test]
fn overlapping_reinvite_gets_500_with_retry_after() {
    let mut h = Harness::new();
    let (_, to) = h.establish("call-ov");
    let reinvite = |branch: &str, cseq| {
        invite(branch, "call-ov", cseq).replace("To: <sip:srs@192.0.2.1>", &format!("To: {to}"))
    };
    h.udp(&reinvite("z9hG4bKov1", 2));
    assert!(matches!(h.events().as_slice(), [SipEvent::Request { .. }]));
    h.take_sent();
    h.udp(&reinvite("z9hG4bKov2", 3));
    let r = h.responses();
    assert_eq!(r[0].status_code.code(), 500);
    let retry: u32 = header(&r[0], "Retry-After").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry));
    assert_eq!(h.ep.counters().rejections.get("invite-pending"), Some(&1));
}

#[test]
fn ack_reusing_the_invite_branch_still_confirms_the_2xx() {
    let mut h = Harness::new();
    let txn = h.invite("z9hG4bKsame", "call-sb");
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    let to = ok.to_header().unwrap().value().to_string();
    h.ep.respond(h.now, &txn, ok).unwrap();
    h.take_sent();
    h.udp(&in_dialog("ACK", "z9hG4bKsame", "call-sb", &to, 1));
    assert!(
        matches!(h.events().as_slice(), [SipEvent::Acked { dialog }] if dialog.call_id == "call-sb")
    );
    h.advance(secs(40.0));
    assert!(h.take_sent().is_empty());
    assert!(h.events().is_empty());
}

#[test]
fn malformed_request_gets_400_with_a_reason() {
    let mut h = Harness::new();
    let broken =
        invite("z9hG4bKm", "call-m", 1).replace("Max-Forwards: 70\r\n", "Max-Forwards 70\r\n");
    h.udp(&broken);
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    // rsip maps a known code back to its standard phrase when parsing, so read the wire.
    let wire = String::from_utf8_lossy(&sent[0].1.bytes).into_owned();
    assert!(
        wire.starts_with("SIP/2.0 400 Malformed header line \"Max-Forwards 70\"\r\n"),
        "{wire}"
    );
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 400, .. }]
    ));

    let missing = invite("z9hG4bKm2", "call-m2", 1).replace("Call-ID: call-m2\r\n", "");
    h.udp(&missing);
    let sent = h.take_sent();
    assert!(sent[0]
        .1
        .bytes
        .starts_with(b"SIP/2.0 400 Missing Call-ID header\r\n"));
    assert_eq!(h.events().len(), 1);

    // Too broken to answer (no Via): dropped and reported.
    h.udp("INVITE sip:a@b SIP/2.0\r\nFrom: x\r\n\r\n");
    assert!(h.take_sent().is_empty());
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 0, .. }]
    ));
}

#[test]
fn max_forwards_zero_gets_483_and_unknown_require_gets_420() {
    let mut h = Harness::new();
    h.udp(&invite("z9hG4bKmf", "call-mf", 1).replace("Max-Forwards: 70", "Max-Forwards: 0"));
    assert_eq!(h.responses()[0].status_code.code(), 483);
    h.udp(&invite("z9hG4bKrq", "call-rq", 1).replace("Require: siprec", "Require: siprec, 100rel"));
    let r = h.responses();
    assert_eq!(r[0].status_code.code(), 420);
    assert_eq!(header(&r[0], "Unsupported").as_deref(), Some("100rel"));
    let events = h.events();
    assert!(events
        .iter()
        .all(|e| !matches!(e, SipEvent::Request { .. })));
}

#[test]
fn unknown_method_gets_501() {
    let mut h = Harness::new();
    h.udp(
        &options("z9hG4bKfoo")
            .replace("OPTIONS sip", "FROB sip")
            .replace("1 OPTIONS", "1 FROB"),
    );
    let r = h.responses();
    assert_eq!(r[0].status_code.code(), 501);
    assert_eq!(r[0].cseq_header().unwrap().value(), "1 FROB");
}

#[test]
fn responses_follow_rport_and_received() {
    let mut h = Harness::new();
    h.invite("z9hG4bKrp", "call-rp");
    let sent = h.take_sent();
    assert_eq!(sent[0].1.destination, CLIENT.parse::<SocketAddr>().unwrap());
    let r = parse_response(&sent[0].1.bytes);
    let via = header(&r, "Via").unwrap();
    assert!(via.contains(";rport=40000"), "{via}");
    assert!(via.contains(";received=192.0.2.9"), "{via}");
    assert!(via.contains("branch=z9hG4bKrp"), "{via}");

    // Sent-by equal to the source and no rport: Via left as it was.
    h.feed(
        Transport::Udp,
        None,
        "10.0.0.2:5062",
        &options("z9hG4bKsame"),
    );
    let r = h.responses();
    assert_eq!(
        header(&r[0], "Via").unwrap(),
        "SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKsame"
    );
}

#[test]
fn tcp_responses_use_the_connection_and_are_not_retransmitted() {
    let mut h = Harness::new();
    let text = invite("z9hG4bKtcp", "call-tcp", 1).replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    // Two messages in one TCP read: frame them, then feed each.
    let mut buf = BytesMut::new();
    buf.extend_from_slice(text.as_bytes());
    buf.extend_from_slice(
        options("z9hG4bKto")
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
            .as_bytes(),
    );
    while let Some(msg) = frame(&mut buf).unwrap() {
        h.feed(
            Transport::Tcp,
            Some(7),
            "10.0.0.2:33000",
            std::str::from_utf8(&msg).unwrap(),
        );
    }
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "100 Trying and the OPTIONS 200");
    for (_, t) in &sent {
        assert_eq!(t.connection, Some(7));
        assert_eq!(t.transport, Transport::Tcp);
        assert_eq!(
            t.destination,
            "10.0.0.2:5062".parse::<SocketAddr>().unwrap(),
            "fallback if the connection is gone: received address, sent-by port"
        );
        assert_eq!(
            t.local,
            Some(LOCAL.parse().unwrap()),
            "answers leave from where the request came"
        );
    }
    let txn = match h.events().as_slice() {
        [SipEvent::Request {
            txn,
            transport: Transport::Tcp,
            ..
        }] => *txn,
        other => panic!("{other:?}"),
    };
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    assert!(header(&ok, "Contact").unwrap().contains(";transport=tcp"));
    h.ep.respond(h.now, &txn, ok).unwrap();
    h.take_sent();
    h.advance(secs(10.0));
    assert!(h.take_sent().is_empty(), "no 2xx retransmission on TCP");
    h.advance(secs(23.0));
    assert!(
        h.events()
            .iter()
            .any(|e| matches!(e, SipEvent::AckTimeout { .. })),
        "the ACK is still required"
    );
    // The BYE that follows rides the same connection, addressed to the remote target should
    // the connection be gone.
    let bye = h.take_sent();
    assert_eq!(bye.len(), 1);
    assert!(bye[0]
        .1
        .bytes
        .starts_with(b"BYE sip:src@10.0.0.2:5062 SIP/2.0\r\nVia: SIP/2.0/TCP "));
    assert_eq!(bye[0].1.connection, Some(7));
    assert_eq!(
        bye[0].1.destination,
        "10.0.0.2:5062".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn our_bye_is_retransmitted_until_answered() {
    let mut h = Harness::new();
    let (dialog, _) = h.establish("call-b");
    h.ep.send_bye(h.now, &dialog, Some("SIP;cause=200;text=\"stopped\""))
        .unwrap();
    h.collect();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let bye = rsip::Request::try_from(&sent[0].1.bytes[..]).unwrap();
    assert_eq!(bye.method, rsip::Method::Bye);
    assert_eq!(bye.call_id_header().unwrap().value(), "call-b");
    assert!(bye
        .from_header()
        .unwrap()
        .value()
        .contains(&format!("tag={}", dialog.local_tag)));
    assert!(bye.to_header().unwrap().value().contains("tag=src1"));
    h.advance(secs(0.6));
    assert_eq!(h.take_sent().len(), 1, "timer E");
    // The client answers 200 with our Via.
    let via = bye.via_header().unwrap().value().to_string();
    let ok = format!(
        "SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: call-b\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
        bye.from_header().unwrap().value(),
        bye.to_header().unwrap().value(),
        bye.cseq_header().unwrap().value()
    );
    h.feed(Transport::Udp, None, "10.0.0.2:5062", &ok);
    assert!(
        matches!(h.events().as_slice(), [SipEvent::RequestCompleted { response: Some(r), dialog: d, method: rsip::Method::Bye }] if *d == dialog && r.status_code.code() == 200)
    );
    h.advance(secs(40.0));
    assert!(h.take_sent().is_empty());
    assert!(matches!(
        h.ep.send_bye(h.now, &dialog, None),
        Err(SipError::UnknownDialog(_))
    ));
}

#[test]
fn in_dialog_update_keeps_the_dialog_and_times_out_without_answer() {
    let mut h = Harness::new();
    let (dialog, _) = h.establish("call-up");
    let body = b"<requestsnapshot/>".to_vec();
    let ctype = rsip::Header::ContentType(rsip::headers::ContentType::new(
        "application/rs-metadata-request",
    ));
    h.ep.send_request(
        h.now,
        &dialog,
        rsip::Method::Update,
        vec![ctype],
        body.clone(),
    )
    .unwrap();
    let sent = h.take_sent();
    let update = rsip::Request::try_from(&sent[0].1.bytes[..]).unwrap();
    assert_eq!(update.method, rsip::Method::Update);
    assert_eq!(update.body, body);
    assert_eq!(header_of(&update, "Content-Length").as_deref(), Some("18"));
    assert!(
        header_of(&update, "Contact").is_some(),
        "UPDATE is a target refresh: Contact"
    );
    assert!(h.ep.has_dialog(&dialog));
    // CSeq grows per request.
    h.ep.send_request(h.now, &dialog, rsip::Method::Info, Vec::new(), Vec::new())
        .unwrap();
    let info = rsip::Request::try_from(&h.take_sent()[0].1.bytes[..]).unwrap();
    let seq = |r: &rsip::Request| r.cseq_header().unwrap().seq().unwrap();
    assert_eq!(seq(&info), seq(&update) + 1);
    // No answer: timer F reports both after 32 s.
    h.advance(secs(32.0));
    let done: Vec<rsip::Method> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SipEvent::RequestCompleted {
                response: None,
                method,
                ..
            } => Some(method),
            _ => None,
        })
        .collect();
    assert_eq!(done.len(), 2);
    assert!(matches!(
        h.ep.send_request(h.now, &dialog, rsip::Method::Invite, Vec::new(), Vec::new()),
        Err(SipError::UnsupportedMethod(rsip::Method::Invite))
    ));
}

fn header_of(r: &rsip::Request, name: &str) -> Option<String> {
    r.headers.iter().find_map(|h| {
        let text = h.to_string();
        let (n, v) = text.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[test]
fn ipv6_client_round_trip() {
    let mut h = Harness::new();
    let text = invite("z9hG4bK6", "call-v6", 1)
        .replace("10.0.0.2:5062;branch", "[2001:db8::2]:5062;branch")
        .replace("sip:srs@192.0.2.1 SIP", "sip:srs@[2001:db8::1] SIP");
    h.feed(Transport::Udp, None, "[2001:db8::2]:5062", &text);
    assert!(matches!(h.events().as_slice(), [SipEvent::Request { .. }]));
    let sent = h.take_sent();
    let wire = String::from_utf8_lossy(&sent[0].1.bytes).into_owned();
    assert!(
        wire.contains(
            "Via: SIP/2.0/UDP [2001:db8::2]:5062;branch=z9hG4bK6;rport=5062;received=2001:db8::2"
        ),
        "{wire}"
    );
    assert_eq!(
        sent[0].1.destination,
        "[2001:db8::2]:5062".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn compact_form_invite_is_handled() {
    let mut h = Harness::new();
    let text = "INVITE sip:srs@192.0.2.1 SIP/2.0\r\nv: SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKc\r\nf: <sip:src@10.0.0.2>;tag=a\r\nt: <sip:srs@192.0.2.1>\r\ni: compact-1\r\nCSeq: 1 INVITE\r\nm: <sip:src@10.0.0.2>\r\nl: 0\r\n\r\n";
    h.udp(text);
    assert!(matches!(h.events().as_slice(), [SipEvent::Request { .. }]));
    assert_eq!(h.responses()[0].status_code.code(), 100);
}

fn corpus() -> Vec<String> {
    vec![
        invite("z9hG4bKp", "prop", 1),
        options("z9hG4bKpo"),
        in_dialog("BYE", "z9hG4bKpb", "prop", "<sip:srs@192.0.2.1>;tag=x", 2),
        in_dialog("ACK", "z9hG4bKpa", "prop", "<sip:srs@192.0.2.1>;tag=x", 1),
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq\r\nContent-Length: 0\r\n\r\n"
            .into(),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), tcp in any::<bool>()) {
        let mut h = Harness::new();
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        let text = Bytes::from(bytes);
        h.ep.handle_incoming(h.now, Incoming { transport, source: CLIENT.parse().unwrap(), local: LOCAL.parse().unwrap(), connection: tcp.then_some(1), bytes: text });
        h.collect();
        h.advance(secs(40.0));
        let _ = h.events();
        prop_assert!(h.ep.poll_timeout().is_none());
    }

    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..5,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = corpus()[which].clone().into_bytes();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        let mut h = Harness::new();
        for _ in 0..2 {
            h.ep.handle_incoming(h.now, Incoming { transport: Transport::Udp, source: CLIENT.parse().unwrap(), local: LOCAL.parse().unwrap(), connection: None, bytes: Bytes::from(bytes.clone()) });
        }
        h.collect();
        // Whatever got through to the app can be answered without panicking either.
        for event in h.events() {
            if let SipEvent::Request { txn, .. } = event {
                let ok = h.ep.make_response(&txn, 200, None).unwrap();
                h.ep.respond(h.now, &txn, ok).unwrap();
            }
        }
        for (_, t) in h.take_sent() {
            prop_assert!(rsip::SipMessage::try_from(&t.bytes[..]).is_ok(), "we only send parseable messages: {:?}", t.bytes);
        }
        h.advance(secs(40.0));
    }
}

/// Client actions for the random-session property test.
#[derive(Debug, Clone)]
enum Op {
    Invite(u8),
    Reinvite(u8),
    Ack(u8),
    Cancel(u8),
    Bye(u8),
    Options,
    Retransmit,
    Advance(u16),
    Answer(usize),
    OurBye(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Invite),
        (0u8..3).prop_map(Op::Reinvite),
        (0u8..3).prop_map(Op::Ack),
        (0u8..3).prop_map(Op::Cancel),
        (0u8..3).prop_map(Op::Bye),
        Just(Op::Options),
        Just(Op::Retransmit),
        (0u16..6000).prop_map(Op::Advance),
        (0usize..4).prop_map(Op::Answer),
        (0u8..3).prop_map(Op::OurBye),
    ]
}

#[derive(Default, Clone)]
struct Call {
    cseq: u32,
    invite_branch: String,
    invite_cseq: u32,
    to: Option<String>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Any interleaving of client messages, retransmissions, app answers and time: the app sees
    /// each request once, everything sent parses, and all transactions end.
    #[test]
    fn random_sessions_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        let mut calls = vec![Call::default(); 3];
        let mut branch = 0u32;
        let mut last: Option<String> = None;
        let mut pending: Vec<TxnId> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut dialogs: std::collections::HashMap<u8, DialogId> = Default::default();
        let statuses = [180u16, 200, 486, 500];
        for op in ops {
            branch += 1;
            let b = format!("z9hG4bKr{branch}");
            let text = match op {
                Op::Invite(i) | Op::Reinvite(i) => {
                    let c = &mut calls[i as usize];
                    c.cseq += 1;
                    c.invite_branch = b.clone();
                    c.invite_cseq = c.cseq;
                    let mut t = invite(&b, &format!("rc{i}"), c.cseq);
                    if let (Op::Reinvite(_), Some(to)) = (&op, &c.to) {
                        t = t.replace("To: <sip:srs@192.0.2.1>", &format!("To: {to}"));
                    }
                    Some(t)
                }
                Op::Ack(i) => calls[i as usize].to.clone().map(|to| {
                    in_dialog("ACK", &b, &format!("rc{i}"), &to, calls[i as usize].invite_cseq)
                }),
                Op::Cancel(i) => {
                    let c = &calls[i as usize];
                    Some(invite(&c.invite_branch, &format!("rc{i}"), c.invite_cseq)
                        .replace("INVITE sip:", "CANCEL sip:")
                        .replace(" INVITE\r\n", " CANCEL\r\n"))
                }
                Op::Bye(i) => {
                    let c = &mut calls[i as usize];
                    c.cseq += 1;
                    c.to.clone().map(|to| in_dialog("BYE", &b, &format!("rc{i}"), &to, c.cseq))
                }
                Op::Options => Some(options(&b)),
                Op::Retransmit => last.clone(),
                Op::Advance(ms) => {
                    h.advance(Duration::from_millis(ms.into()));
                    None
                }
                Op::Answer(k) => {
                    if !pending.is_empty() {
                        let txn = pending.remove(0);
                        let status = statuses[k % statuses.len()];
                        if let Some(r) = h.ep.make_response(&txn, status, None) {
                            let dialog = h.ep.dialog_of(&txn);
                            if h.ep.respond(h.now, &txn, r).is_ok() {
                                if status < 200 {
                                    pending.push(txn);
                                } else if (200..300).contains(&status) {
                                    if let Some(d) = dialog {
                                        let i: u8 = d.call_id[2..].parse().unwrap();
                                        calls[i as usize].to = Some(format!("<sip:srs@192.0.2.1>;tag={}", d.local_tag));
                                        dialogs.insert(i, d);
                                    }
                                }
                            }
                        }
                    }
                    None
                }
                Op::OurBye(i) => {
                    if let Some(d) = dialogs.get(&i) {
                        let _ = h.ep.send_bye(h.now, d, None);
                    }
                    None
                }
            };
            if let Some(text) = text {
                h.udp(&text);
                last = Some(text);
            }
            for event in h.events() {
                if let SipEvent::Request { txn, request, .. } = event {
                    let via = message::top_via(&request.headers).unwrap();
                    prop_assert!(seen.insert((via.branch, request.method.to_string())), "delivered twice");
                    pending.push(txn);
                }
            }
            for (_, t) in h.take_sent() {
                prop_assert!(rsip::SipMessage::try_from(&t.bytes[..]).is_ok());
            }
        }
        for txn in std::mem::take(&mut pending) {
            if let Some(r) = h.ep.make_response(&txn, 486, None) {
                let _ = h.ep.respond(h.now, &txn, r);
            }
        }
        h.advance(secs(200.0));
        prop_assert_eq!(h.ep.transaction_count(), 0);
        prop_assert_eq!(h.ep.poll_timeout(), None);
    }
}

/// A dialog whose 2xx waits for its ACK moves to a new endpoint (daemon restart): the 2xx is
/// retransmitted from there, the ACK confirms it, and our BYE reaches the IPv6 remote target.
#[test]
fn exported_dialog_carries_on_in_a_new_endpoint() {
    let mut h = Harness::new();
    let text = invite("z9hG4bKv6", "call-x", 1)
        .replace("10.0.0.2:5062;branch", "[2001:db8::2]:5062;branch")
        .replace("<sip:src@10.0.0.2:5062>", "<sip:src@[2001:db8::2]:5062>");
    h.feed(Transport::Udp, None, "[2001:db8::2]:5062", &text);
    let txn = match h.events().as_slice() {
        [SipEvent::Request { txn, .. }] => *txn,
        other => panic!("{other:?}"),
    };
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    let to = ok.to_header().unwrap().value().to_string();
    h.ep.respond(h.now, &txn, ok).unwrap();
    let ok_bytes = h.take_sent().pop().unwrap().1.bytes;
    let dialog = h.ep.dialog_of(&txn).unwrap();
    h.advance(secs(2.0));
    h.take_sent();

    let snapshot = h.ep.export_dialog(h.now, &dialog).unwrap();
    let pending = snapshot.awaiting_ack.as_ref().expect("ACK still awaited");
    assert_eq!(pending.ack_wait, secs(30.0), "64*T1 less the 2 s spent");
    assert!(h.ep.forget_dialog(&dialog));
    assert!(!h.ep.has_dialog(&dialog));
    h.advance(secs(60.0));
    assert!(h.take_sent().is_empty(), "the old endpoint stays silent");
    assert!(h.events().is_empty());
    // A BYE still reaching the old daemon is left for the new one (no 481).
    let bye = in_dialog("BYE", "z9hG4bKbye", "call-x", &to, 2)
        .replace("10.0.0.2:5062;branch", "[2001:db8::2]:5062;branch");
    h.feed(Transport::Udp, None, "[2001:db8::2]:5062", &bye);
    assert!(h.take_sent().is_empty(), "no answer from the old endpoint");
    assert!(matches!(
        h.events().as_slice(),
        [SipEvent::Rejected { status: 0, .. }]
    ));

    let json = serde_json::to_string(&snapshot).unwrap();
    let mut new = Harness::new();
    new.now = h.now;
    let snapshot: DialogSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(
        new.ep.import_dialog(new.now, snapshot.clone()).unwrap(),
        dialog
    );
    assert!(matches!(
        new.ep.import_dialog(new.now, snapshot),
        Err(SipError::BadSnapshot { .. })
    ));
    new.advance(secs(0.6));
    let sent = new.take_sent();
    assert_eq!(sent.len(), 1, "2xx retransmitted on UDP");
    assert_eq!(sent[0].1.bytes, ok_bytes);
    assert_eq!(sent[0].1.destination, "[2001:db8::2]:5062".parse().unwrap());

    let ack = in_dialog("ACK", "z9hG4bKack2", "call-x", &to, 1)
        .replace("10.0.0.2:5062;branch", "[2001:db8::2]:5062;branch");
    new.feed(Transport::Udp, None, "[2001:db8::2]:5062", &ack);
    assert!(matches!(new.events().as_slice(), [SipEvent::Acked { dialog: d }] if *d == dialog));
    new.advance(secs(40.0));
    assert!(
        new.take_sent().is_empty(),
        "no retransmission after the ACK"
    );
    assert!(new.events().is_empty(), "no ACK timeout");

    new.ep.send_bye(new.now, &dialog, None).unwrap();
    let sent = new.take_sent();
    let wire = String::from_utf8_lossy(&sent[0].1.bytes).into_owned();
    assert!(
        wire.starts_with("BYE sip:src@[2001:db8::2]:5062 SIP/2.0"),
        "{wire}"
    );
    assert_eq!(sent[0].1.destination, "[2001:db8::2]:5062".parse().unwrap());
}

/// Stream connections do not survive a restart: an imported TCP dialog has none, so the
/// transport reaches the client afresh.
#[test]
fn imported_tcp_dialog_has_no_connection() {
    let mut h = Harness::new();
    let text = invite("z9hG4bKt", "call-t", 1).replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    h.feed(Transport::Tcp, Some(7), CLIENT, &text);
    let txn = match h.events().as_slice() {
        [SipEvent::Request { txn, .. }] => *txn,
        other => panic!("{other:?}"),
    };
    let ok = h.ep.make_response(&txn, 200, None).unwrap();
    h.ep.respond(h.now, &txn, ok).unwrap();
    let dialog = h.ep.dialog_of(&txn).unwrap();
    let snapshot = h.ep.export_dialog(h.now, &dialog).unwrap();
    assert_eq!(snapshot.transport, Transport::Tcp);

    let mut new = Harness::new();
    new.ep.import_dialog(new.now, snapshot).unwrap();
    new.ep.send_bye(new.now, &dialog, None).unwrap();
    let sent = new.take_sent();
    assert_eq!(sent[0].1.transport, Transport::Tcp);
    assert_eq!(sent[0].1.connection, None);
    assert_eq!(
        sent[0].1.destination,
        "10.0.0.2:5062".parse().unwrap(),
        "Contact"
    );
}
