//! Tests of the recording sessions: idle and session timers, in-dialog requests, snapshots.

use super::*;

#[test]
fn idle_session_gets_bye_unless_rtp_flows() {
    let mut h = Harness::new(SiprecConfig {
        idle_timeout: Duration::from_secs(60),
        ..config()
    });
    let (resp, id) = h.establish(
        Req::new("INVITE", "idle@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
    );
    let flow_id = h.flow(m_ports(&body(&resp))[0]).unwrap().0;
    // RTP keeps it alive across two idle periods.
    h.rec.flows_mut().packets.insert(flow_id, 10);
    assert!(requests(&h.advance(Duration::from_secs(61))).is_empty());
    h.rec.flows_mut().packets.insert(flow_id, 20);
    assert!(requests(&h.advance(Duration::from_secs(61))).is_empty());
    assert_eq!(h.rec.sessions().len(), 1);
    // Then silence: the last RTP was seen after 61 s, so the BYE comes within a quarter of
    // the idle timeout after 61 + 60 s.
    let sent = h.advance(Duration::from_secs(15));
    let byes = requests(&sent);
    assert_eq!(byes.len(), 1, "{sent:?}");
    assert_eq!(byes[0].method, Method::Bye);
    assert!(h.rec.sessions().is_empty() && h.rec.flows().table.flows.is_empty());
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: e, reason: EndReason::Timeout, .. }] if *e == id),
        "{events:?}"
    );
}

#[test]
fn session_timer_expiry_sends_bye_and_refresh_extends_it() {
    let mut h = Harness::new(config());
    let req = Req::new("INVITE", "timer@src")
        .header("Supported: timer")
        .header("Session-Expires: 120;refresher=uac")
        .body("application/sdp", &sdp(1, &[20000], "sendonly"));
    let (resp, _) = h.establish(req);
    assert!(header_tokens(&resp.headers, "Require").contains(&"timer".to_string()));
    let tag = to_tag(&resp.headers).unwrap();
    h.advance(Duration::from_secs(100));
    // Refresh: an UPDATE without body.
    let (code, resp) = status(
        &mut h,
        &Req::new("UPDATE", "timer@src")
            .in_dialog(&tag, 2)
            .header("Session-Expires: 120;refresher=uac"),
    );
    assert_eq!(code, 200);
    assert!(resp.body.is_empty());
    assert!(
        requests(&h.advance(Duration::from_secs(100))).is_empty(),
        "refreshed at 100 s"
    );
    let sent = h.advance(Duration::from_secs(30));
    let byes = requests(&sent);
    assert_eq!(byes.len(), 1, "{sent:?}");
    assert_eq!(byes[0].method, Method::Bye);
    let events = h.take_events();
    assert!(matches!(
        events.last(),
        Some(SessionEvent::Ended {
            reason: EndReason::Timeout,
            ..
        })
    ));
}

#[test]
fn in_dialog_methods_and_metadata_only_update() {
    let mut h = Harness::new(config());
    let (resp, _) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let call = "rs-0c6e2b11@10.20.0.10";
    let (code, resp) = status(
        &mut h,
        &Req::new("UPDATE", call)
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", META_8),
    );
    assert_eq!(code, 200, "{resp}");
    assert!(resp.body.is_empty());
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::ParticipantsChanged { metadata: Some(m), .. }] if m.version == 2 && m.method == "UPDATE"),
        "{events:?}"
    );
    assert_eq!(
        status(&mut h, &Req::new("INFO", call).in_dialog(&tag, 3)).0,
        200
    );
    let (code, resp) = status(&mut h, &Req::new("REFER", call).in_dialog(&tag, 4));
    assert_eq!(code, 405);
    assert!(header_value(&resp.headers, "Allow").is_some());
    // re-INVITE without SDP: our current SDP again, version bumped, same ports.
    let ports = h.rec.sessions()[0]
        .streams
        .iter()
        .map(|s| s.local_port)
        .collect::<Vec<_>>();
    let (code, resp) = status(&mut h, &Req::new("INVITE", call).in_dialog(&tag, 5));
    assert_eq!(code, 200);
    let sdp = body(&resp);
    assert_eq!(m_ports(&sdp), ports);
    assert_eq!(o_version(&sdp), 2);
    assert!(h.take_events().is_empty(), "a refresh changes nothing");
}

#[test]
fn src_tag_variants_and_missing_tag_are_accepted() {
    let mut h = Harness::new(config());
    let offer = sdp(1, &[20000], "sendonly");
    for (call, contact) in [
        ("legacy@src", "Contact: <sip:192.168.241.44:5060>;src"),
        (
            "quoted@src",
            "Contact: <sip:src@10.20.0.10:5060>;\"+sip.src\"",
        ),
        ("none@src", "Contact: <sip:src@10.20.0.10:5060>"),
    ] {
        let req = Req::new("INVITE", call)
            .header(contact)
            .header("Require: siprec")
            .body("application/sdp", &offer);
        let (code, resp) = status(&mut h, &req);
        assert_eq!(code, 200, "{call}: {resp}");
        assert!(header_tokens(&resp.headers, "Require").contains(&"siprec".to_string()));
    }
    assert_eq!(h.rec.sessions().len(), 3);
}

#[test]
fn pinned_source_follows_the_offer() {
    let mut h = Harness::new(SiprecConfig {
        pin_source: true,
        ..config()
    });
    let (resp, _) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let ports = m_ports(&body(&resp));
    assert_eq!(
        h.flow(ports[1]).unwrap().2,
        Some("10.20.0.10:31002".parse().unwrap())
    );
    assert_eq!(
        h.flow(ports[1] + 1).unwrap().2,
        Some("10.20.0.10:31003".parse().unwrap())
    );
    let (ct, b) = multipart(SDP_8, META_8);
    let reinvite = Req::new("INVITE", "rs-0c6e2b11@10.20.0.10")
        .in_dialog(&tag, 2)
        .body(&ct, &b);
    assert_eq!(status(&mut h, &reinvite).0, 200);
    assert_eq!(
        h.flow(ports[1]).unwrap().2,
        Some("10.20.0.10:31010".parse().unwrap())
    );
    assert_eq!(
        h.flow(ports[0]).unwrap().2,
        Some("10.20.0.10:31000".parse().unwrap())
    );
}

#[test]
fn call_id_reuse_with_another_from_tag_is_another_session() {
    let mut h = Harness::new(config());
    let (resp, first) = h.establish(
        Req::new("INVITE", "reused@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
    );
    let tag = to_tag(&resp.headers).unwrap();
    let mut second =
        Req::new("INVITE", "reused@src").body("application/sdp", &sdp(1, &[20002], "sendonly"));
    second.from_tag = "other-1";
    let (_, other) = h.establish(second);
    assert_ne!(first, other);
    assert_eq!(h.rec.sessions().len(), 2);
    status(&mut h, &Req::new("BYE", "reused@src").in_dialog(&tag, 2));
    let sessions = h.rec.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].id, other);
}

#[test]
fn stop_and_shutdown_send_bye() {
    let mut h = Harness::new(config());
    let (_, a) = h.establish(
        Req::new("INVITE", "a@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
    );
    h.establish(Req::new("INVITE", "b@src").body("application/sdp", &sdp(1, &[20002], "sendonly")));
    h.establish(Req::new("INVITE", "c@src").body("application/sdp", &sdp(1, &[20004], "sendonly")));
    assert!(!h.rec.stop(h.now, "nosuch", &mut h.ep));
    assert!(h.rec.stop(h.now, &a, &mut h.ep));
    let sent = h.pump();
    assert_eq!(requests(&sent).len(), 1);
    assert!(matches!(
        h.take_events()[..],
        [SessionEvent::Ended {
            reason: EndReason::Operator,
            ..
        }]
    ));
    h.rec.shutdown(h.now, &mut h.ep);
    let sent = h.pump();
    assert_eq!(
        requests(&sent)
            .iter()
            .filter(|r| r.method == Method::Bye)
            .count(),
        2
    );
    assert!(h.rec.flows().table.flows.is_empty());
    assert_eq!(h.rec.counters().sessions_ended.get("shutdown"), Some(&2));
}

#[test]
fn src_feature_tag_is_recognised() {
    let parse = |contact: &str| {
        let text = Req::new("INVITE", "x").header(contact).text(1);
        has_src_feature(&Request::try_from(text.as_str()).unwrap())
    };
    assert!(parse("Contact: <sip:src@10.20.0.10:5060>;+sip.src"));
    assert!(parse("Contact: <sip:192.168.241.44:5060>;src"));
    assert!(parse(
        "Contact: <sip:src@10.20.0.10>;\"+sip.src\";expires=60"
    ));
    assert!(!parse("Contact: <sip:src@10.20.0.10:5060;src>"));
    assert!(!parse("Contact: <sip:src@10.20.0.10:5060>;+sip.srs"));
}

#[test]
fn acl_matches_prefixes() {
    let acl = vec![
        (IpAddr::from([10, 20, 0, 0]), 16),
        (IpAddr::from([192, 0, 2, 128]), 25),
        ("2001:db8::".parse().unwrap(), 32),
    ];
    let ok = |ip: &str| acl_allows(&acl, ip.parse().unwrap());
    assert!(ok("10.20.255.1") && !ok("10.21.0.1"));
    assert!(ok("192.0.2.200") && !ok("192.0.2.127"));
    assert!(ok("2001:db8:1::5") && !ok("2001:db9::1"));
    assert!(ok("::ffff:10.20.0.9"), "v4-mapped");
    assert!(
        acl_allows(&[], "203.0.113.9".parse().unwrap()),
        "empty ACL allows all"
    );
}

#[test]
fn bye_with_final_metadata_reports_it_then_ends() {
    let mut h = Harness::new(config());
    let (resp, id) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let bye = Req::new("BYE", "rs-0c6e2b11@10.20.0.10")
        .in_dialog(&tag, 2)
        .body("application/rs-metadata+xml", META_8);
    assert_eq!(status(&mut h, &bye).0, 200);
    let events = h.take_events();
    assert!(
        matches!(
            &events[..],
            [
                SessionEvent::ParticipantsChanged { metadata: Some(m), .. },
                SessionEvent::Ended { id: e, reason: EndReason::Bye { reason: None }, .. },
            ] if m.method == "BYE" && m.version == 2 && *e == id
        ),
        "{events:?}"
    );
}

#[test]
fn missing_ack_ends_with_transaction_timeout() {
    let mut h = Harness::new(config());
    let resp = final_response(&h.send(&spec_invite()));
    assert_eq!(resp.status_code.code(), 200);
    h.take_events();
    h.advance(Duration::from_secs(40));
    assert!(h.rec.sessions().is_empty());
    assert!(h.rec.flows().table.flows.is_empty());
    let events = h.take_events();
    assert!(
        matches!(
            &events[..],
            [SessionEvent::Ended {
                reason: EndReason::TransactionTimeout,
                ..
            }]
        ),
        "{events:?}"
    );
}

#[test]
fn srtp_stream_gets_a_stable_crypto_answer() {
    let mut h = Harness::new(config());
    let offer = |v: u32| {
        format!(
            "v=0\r\no=SRC 1 {v} IN IP4 10.20.0.10\r\ns=-\r\nc=IN IP4 10.20.0.10\r\nt=0 0\r\n\
m=audio 20000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\na=sendonly\r\n"
        )
    };
    let req = Req::new("INVITE", "srtp@src").body("application/sdp", &offer(1));
    let (resp, _) = h.establish(req);
    let crypto = |sdp: &str| {
        m_section(sdp, 0)
            .into_iter()
            .find(|l| l.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"))
            .unwrap_or_else(|| panic!("no crypto answer in {sdp}"))
    };
    let first = crypto(&body(&resp));
    assert!(h.rec.sessions()[0].streams[0].srtp);
    let tag = to_tag(&resp.headers).unwrap();
    let reinvite = Req::new("INVITE", "srtp@src")
        .in_dialog(&tag, 2)
        .body("application/sdp", &offer(2));
    let (code, resp2) = status(&mut h, &reinvite);
    assert_eq!(code, 200);
    assert_eq!(crypto(&body(&resp2)), first);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Arbitrary bodies and header values never panic; a rejection leaves nothing behind.
    #[test]
    fn malformed_input_is_answered_not_panicked_on(
        ct in proptest::sample::select(vec![
            "application/sdp",
            "multipart/mixed;boundary=rsb-42",
            "application/rs-metadata+xml",
            "text/plain",
        ]),
        body in "[ -~\r\n]{0,400}",
        sdp_tail in "[ -~\r\n]{0,120}",
        session_expires in "[0-9a-z;= ]{0,12}",
        reinvite in proptest::bool::ANY,
    ) {
        let mut h = Harness::new(config());
        let body = if ct.starts_with("application/sdp") {
            format!("{}{sdp_tail}", sdp(1, &[20000], "sendonly"))
        } else {
            body
        };
        let mut req = Req::new("INVITE", "fuzz@src").body(ct, &body);
        if !session_expires.is_empty() {
            req = req.header(&format!("Session-Expires: {session_expires}"));
        }
        let (code, resp) = if reinvite {
            let (first, _) = h.establish(
                Req::new("INVITE", "fuzz@src").body("application/sdp", &sdp(1, &[20000], "sendonly")),
            );
            let tag = to_tag(&first.headers).unwrap();
            status(&mut h, &req.in_dialog(&tag, 2))
        } else {
            status(&mut h, &req)
        };
        proptest::prop_assert!(code >= 200, "{}", resp);
        let sessions = h.rec.sessions();
        if reinvite {
            // The session survives a bad re-INVITE, with its flows.
            proptest::prop_assert_eq!(sessions.len(), 1);
            let pinned: usize = sessions[0]
                .streams
                .iter()
                .map(|s| 1 + usize::from(s.rtcp_port.is_some()))
                .sum();
            proptest::prop_assert_eq!(h.rec.flows().table.flows.len(), pinned);
        } else if code != 200 {
            proptest::prop_assert!(sessions.is_empty());
            proptest::prop_assert!(h.rec.flows().table.flows.is_empty());
        }
    }
}

#[test]
fn ports_of_a_refused_offer_are_reusable_at_once() {
    // Three pairs; four streams cannot fit, but that must not block the next calls.
    let mut h = Harness::new(SiprecConfig {
        rtp_ports: (40000, 40005),
        ..config()
    });
    let four = sdp(1, &[20000, 20002, 20004, 20006], "sendonly");
    let (code, _) = status(
        &mut h,
        &Req::new("INVITE", "four@src").body("application/sdp", &four),
    );
    assert_eq!(code, 503);
    assert!(h.rec.flows().table.flows.is_empty());
    for call in ["a@src", "b@src", "c@src"] {
        let one = sdp(1, &[20000], "sendonly");
        let (code, resp) = status(
            &mut h,
            &Req::new("INVITE", call).body("application/sdp", &one),
        );
        assert_eq!(code, 200, "{call}: {resp}");
    }
    let ports: std::collections::BTreeSet<u16> = h
        .rec
        .sessions()
        .iter()
        .map(|s| s.streams[0].local_port)
        .collect();
    assert_eq!(ports.len(), 3, "three distinct pairs");
}

#[test]
fn invite_without_from_tag_is_recorded_and_ended() {
    let mut h = Harness::new(config());
    let mut req =
        Req::new("INVITE", "rfc2543@src").body("application/sdp", &sdp(1, &[20000], "sendonly"));
    req.from_tag = "";
    let text = req.text(1).replace(";tag=\r\n", "\r\n");
    assert!(text.contains("From: <sip:src@sbc1.cc.example>\r\n"));
    let resp = final_response(&h.send_raw(&text));
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    let tag = to_tag(&resp.headers).unwrap();
    let bye = Req::new("BYE", "rfc2543@src")
        .in_dialog(&tag, 2)
        .text(2)
        .replace(";tag=sbc-7731", "");
    let codes: Vec<u16> = responses(&h.send_raw(&bye))
        .iter()
        .map(|r| r.status_code.code())
        .collect();
    assert_eq!(codes, [200]);
    assert!(h.rec.sessions().is_empty());
}

fn assert_snapshot_request(req: &rsip::Request) {
    assert_eq!(
        header_value(&req.headers, "Content-Type").as_deref(),
        Some("application/rs-metadata-request")
    );
    assert_eq!(
        header_value(&req.headers, "Content-Disposition").as_deref(),
        Some("recording-session")
    );
    let xml = String::from_utf8(req.body.clone()).unwrap();
    assert!(
        xml.contains(r#"<requestsnapshot xmlns="urn:ietf:params:xml:ns:recording:1">"#),
        "{xml}"
    );
    assert!(xml.contains(r#"<requestreason xml:lang="en">"#), "{xml}");
    assert!(xml.contains("p-ghost") && xml.contains("s-ghost"), "{xml}");
}

#[test]
fn unresolved_metadata_refs_get_one_snapshot_request_per_inconsistency() {
    let mut h = Harness::new(config());
    let (resp, _) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let call = "rs-0c6e2b11@10.20.0.10";
    assert_eq!(
        h.rec.counters().snapshot_requests,
        0,
        "META_7 is consistent"
    );

    let ghost = Req::new("UPDATE", call)
        .in_dialog(&tag, 2)
        .body("application/rs-metadata+xml", META_GHOST);
    let out = h.send(&ghost);
    assert_eq!(final_response(&out).status_code.code(), 200);
    let sent = snapshot_requests(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    assert_snapshot_request(&sent[0]);
    assert_eq!(h.rec.counters().snapshot_requests, 1);

    // The same inconsistency again (the SRC repeats itself): no second request.
    let again = Req::new("UPDATE", call)
        .in_dialog(&tag, 3)
        .body("application/rs-metadata+xml", META_GHOST);
    assert!(snapshot_requests(&h.send(&again)).is_empty());
    // The SRC refuses: counted and logged, the recording goes on.
    answer(&mut h, &sent[0], 488, "Not Acceptable Here");
    assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
    assert_eq!(h.rec.sessions().len(), 1);

    // A complete snapshot resolves it; a later inconsistency is a new one.
    let (ct, b) = multipart(SDP_7, META_7);
    let complete = Req::new("INVITE", call).in_dialog(&tag, 4).body(&ct, &b);
    let out = h.send(&complete);
    assert_eq!(final_response(&out).status_code.code(), 200);
    assert!(snapshot_requests(&out).is_empty());
    h.send(&ack(call, "sbc-7731", &tag, 4));
    let out = h.send(
        &Req::new("UPDATE", call)
            .in_dialog(&tag, 5)
            .body("application/rs-metadata+xml", META_GHOST),
    );
    let sent = snapshot_requests(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(h.rec.counters().snapshot_requests, 2);
    answer(&mut h, &sent[0], 200, "OK");
    assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
    // Unanswered requests time out (64*T1) and count as failed too.
    let out = h.send(&Req::new("UPDATE", call).in_dialog(&tag, 6).body(
        "application/rs-metadata+xml",
        &META_GHOST.replace("ghost", "phantom"),
    ));
    assert_eq!(snapshot_requests(&out).len(), 1);
    h.advance(Duration::from_secs(40));
    assert_eq!(h.rec.counters().snapshot_requests_failed, 2);
    assert_eq!(h.rec.sessions().len(), 1);
}

#[test]
fn snapshot_request_met_with_491_is_retried_once_after_the_back_off() {
    let mut h = Harness::new(config());
    let (resp, _) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let call = "rs-0c6e2b11@10.20.0.10";
    let out = h.send(
        &Req::new("UPDATE", call)
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", META_GHOST),
    );
    let first = snapshot_requests(&out);
    assert_eq!(first.len(), 1, "{out:?}");

    // Glare: the client answers 491. Nothing goes out at once (`answer` checks that);
    // the retry is due within the UAS back-off window of 0-2 s.
    let t0 = h.now;
    answer(&mut h, &first[0], 491, "Request Pending");
    let due = h.rec.poll_timeout().expect("a retry is scheduled");
    assert!(
        due >= t0 && due <= t0 + Duration::from_secs(2),
        "{:?}",
        due - t0
    );
    assert_eq!(h.rec.counters().snapshot_requests_failed, 0);
    let out = h.advance(Duration::from_secs(2));
    let retry = snapshot_requests(&out);
    assert_eq!(retry.len(), 1, "{out:?}");
    assert_snapshot_request(&retry[0]);
    assert_eq!(retry[0].body, first[0].body);
    let cseq = |r: &rsip::Request| header_value(&r.headers, "CSeq").unwrap();
    assert_ne!(cseq(&retry[0]), cseq(&first[0]), "a new transaction");
    assert_eq!(h.rec.counters().snapshot_retries, 1);
    assert_eq!(h.rec.counters().snapshot_requests, 1);

    // A second 491: given up, counted as failed, no third attempt.
    answer(&mut h, &retry[0], 491, "Request Pending");
    assert_eq!(h.rec.counters().snapshot_requests_failed, 1);
    assert!(snapshot_requests(&h.advance(Duration::from_secs(5))).is_empty());
    assert_eq!(h.rec.counters().snapshot_retries, 1);
    assert_eq!(h.rec.sessions().len(), 1);
}

#[test]
fn snapshot_request_for_an_initial_invite_waits_for_the_ack() {
    let mut h = Harness::new(config());
    let call = "ghost@10.20.0.10";
    let (ct, b) = multipart(SDP_7, META_GHOST);
    let out = h.send(&Req::new("INVITE", call).siprec().body(&ct, &b));
    let ok = final_response(&out);
    assert_eq!(ok.status_code.code(), 200);
    assert!(snapshot_requests(&out).is_empty(), "not before the ACK");
    let tag = to_tag(&ok.headers).unwrap();
    let out = h.send(&ack(call, "sbc-7731", &tag, 1));
    let sent = snapshot_requests(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    assert_snapshot_request(&sent[0]);
    assert_eq!(
        header_value(&sent[0].headers, "Call-ID").as_deref(),
        Some(call)
    );
}

#[test]
fn call_leaving_a_persistent_recording_ends_its_participants_not_the_recording() {
    let mut h = Harness::new(config());
    let (resp, id) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let call = "rs-0c6e2b11@10.20.0.10";
    let cs_ends = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
  <sessionrecordingassoc session_id="mT0b4zR8Sxq1dQm5n9VqKw=="><disassociate-time>2025-03-04T10:25:00Z</disassociate-time></sessionrecordingassoc>
</recording>"#;
    let (code, _) = status(
        &mut h,
        &Req::new("UPDATE", call)
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", cs_ends),
    );
    assert_eq!(code, 200);
    let events = h.take_events();
    let [SessionEvent::ParticipantsChanged {
        id: changed,
        participants,
        ..
    }] = &events[..]
    else {
        panic!("one ParticipantsChanged, no Ended: {events:?}");
    };
    assert_eq!(changed, &id);
    let end = crate::siprec::metadata::parse_time("2025-03-04T10:25:00Z");
    assert_eq!(participants.len(), 2);
    assert!(
        participants.iter().all(|p| p.left_at == end),
        "{participants:?}"
    );
    assert_eq!(h.rec.sessions().len(), 1, "the recording session goes on");
    assert!(h.flow(h.rec.sessions()[0].streams[0].local_port).is_some());
}

/// Many sessions with session timers set at different times: each expires at its own
/// deadline (the timer heap keeps them in order), the others go on.
#[test]
fn session_timers_of_many_sessions_fire_in_order_and_only_when_due() {
    let mut h = Harness::new(SiprecConfig {
        rtp_ports: (40000, 49999),
        ..config()
    });
    let call_ids: Vec<String> = (0..40).map(|i| format!("many-{i}@src")).collect();
    for call_id in &call_ids {
        h.establish(
            Req::new("INVITE", call_id)
                .header("Supported: timer")
                .header("Session-Expires: 120;refresher=uac")
                .body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        h.advance(Duration::from_secs(1));
    }
    // Session i was set up at i s and expires at i + 120 s; it is now 40 s.
    let sent = h.advance(Duration::from_millis(89_500));
    let byes: Vec<String> = requests(&sent)
        .iter()
        .filter(|r| r.method == Method::Bye)
        .map(|r| header_value(&r.headers, "Call-ID").unwrap())
        .collect();
    assert_eq!(byes, call_ids[..10], "the first ten, in order");
    assert_eq!(h.rec.sessions().len(), 30);
    assert_eq!(h.rec.session_count(), 30);
    let sent = h.advance(Duration::from_secs(30));
    assert_eq!(requests(&sent).len(), 30);
    assert!(h.rec.sessions().is_empty());
    // Every timer entry went with its session: no wake-ups for sessions that are gone.
    assert_eq!(h.rec.poll_timeout(), None);
}

/// A refresh that shortens the session timer moves the deadline earlier, not only later.
#[test]
fn refresh_with_a_shorter_session_timer_ends_the_session_sooner() {
    let mut h = Harness::new(config());
    let req = Req::new("INVITE", "shorter@src")
        .header("Supported: timer")
        .header("Session-Expires: 1800;refresher=uac")
        .body("application/sdp", &sdp(1, &[20000], "sendonly"));
    let (resp, _) = h.establish(req);
    let tag = to_tag(&resp.headers).unwrap();
    h.advance(Duration::from_secs(10));
    let (code, _) = status(
        &mut h,
        &Req::new("UPDATE", "shorter@src")
            .in_dialog(&tag, 2)
            .header("Session-Expires: 120;refresher=uac"),
    );
    assert_eq!(code, 200);
    assert_eq!(h.rec.poll_timeout(), Some(h.now + Duration::from_secs(120)));
    let sent = h.advance(Duration::from_secs(121));
    assert_eq!(requests(&sent).len(), 1, "{sent:?}");
    assert!(h.rec.sessions().is_empty());
}

/// Sessions set up and ended by the thousand leave no timer entries behind.
#[test]
fn ended_sessions_leave_no_timer_entries_behind() {
    let mut h = Harness::new(SiprecConfig {
        rtp_ports: (40000, 49999),
        port_cooldown: Duration::ZERO,
        ..config()
    });
    let held =
        Req::new("INVITE", "held@src").body("application/sdp", &sdp(1, &[20000], "sendonly"));
    h.establish(held);
    for i in 0..1000 {
        let call_id = format!("churn-{i}@src");
        let (resp, _) = h.establish(
            Req::new("INVITE", &call_id).body("application/sdp", &sdp(1, &[20000], "sendonly")),
        );
        let tag = to_tag(&resp.headers).unwrap();
        let (code, _) = status(&mut h, &Req::new("BYE", &call_id).in_dialog(&tag, 2));
        assert_eq!(code, 200);
        h.take_events();
        assert!(
            h.rec.timers.len() <= 2 * h.rec.sessions.len() + 64,
            "{}",
            h.rec.timers.len()
        );
    }
    assert_eq!(h.rec.sessions().len(), 1);
    // The held session's idle check is the only deadline.
    let deadline = h.rec.poll_timeout().expect("the held session's idle check");
    assert!(deadline > h.now, "{deadline:?}");
}
