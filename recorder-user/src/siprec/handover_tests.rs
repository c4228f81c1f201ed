//! A restarted daemon carries on the live sessions: handover, JSON round trip, restore into a
//! new recorder and a new endpoint over the same flow table, then SIP as usual.

use std::{net::SocketAddr, time::Duration};

use rsip::Method;

use super::tests::{
    ack, answer, body, config, final_response, m_ports, multipart, o_version, requests, sdp,
    snapshot_requests, spec_invite, Harness, Req, TestFlows, MEDIA, META_7, META_8, META_GHOST,
    SDP_8,
};
use super::{header_value, to_tag, EndReason, HandoverError, Recorder, RecorderHandover};
use crate::{
    events::SessionEvent,
    flow::{FlowAction, FlowSpec, MemoryFlows},
    sip::{Endpoint, EndpointConfig},
    siprec::session::SiprecConfig,
};

const CALL: &str = "rs-0c6e2b11@10.20.0.10";

fn endpoint() -> Endpoint {
    Endpoint::new(EndpointConfig {
        contact_host: "10.20.0.50".into(),
        contact_params: vec!["+sip.srs".into()],
        ..Default::default()
    })
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((MEDIA, port))
}

/// How the flow table looks to the new daemon.
struct Table {
    tamper: fn(&mut MemoryFlows),
    refuse: bool,
}

const SAME_TABLE: Table = Table {
    tamper: |_| {},
    refuse: false,
};

/// Hands the recorder over (the daemon was down `downtime`), through JSON, to a new recorder
/// and endpoint whose flow table holds what the old one left. Returns what was sent on the
/// way (the 503s, BYEs of sessions that could not go on) and the handover.
fn restart(
    h: &mut Harness,
    config: SiprecConfig,
    downtime: Duration,
    table: Table,
) -> (Vec<rsip::SipMessage>, RecorderHandover) {
    let mut handover = h.rec.handover(h.now, &mut h.ep);
    let mut sent = h.pump();
    handover.age(downtime);
    let json = serde_json::to_string(&handover).unwrap();
    let back: RecorderHandover = serde_json::from_str(&json).unwrap();
    let mut flows = MemoryFlows {
        flows: h.rec.flows().table.flows.clone(),
    };
    (table.tamper)(&mut flows);
    let flows = TestFlows {
        table: flows,
        refuse: table.refuse,
        ..Default::default()
    };
    let sink = h.events.clone();
    let mut ep = endpoint();
    h.rec = Recorder::restore(
        config,
        flows,
        Box::new(move |e| sink.lock().unwrap().push(e)),
        back,
        h.now,
        &mut ep,
    )
    .expect("restore");
    h.ep = ep;
    sent.extend(h.pump());
    (sent, handover)
}

fn cseq(req: &rsip::Request) -> u32 {
    let value = header_value(&req.headers, "CSeq").unwrap();
    value.split_whitespace().next().unwrap().parse().unwrap()
}

fn of_method(msgs: &[rsip::SipMessage], method: Method) -> Vec<rsip::Request> {
    requests(msgs)
        .into_iter()
        .filter(|r| r.method == method)
        .cloned()
        .collect()
}

fn sorted(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    v.sort();
    v
}

/// An INVITE with its own Call-ID and a session timer.
fn timed_invite<'a>(call_id: &'a str, ports: &[u16]) -> Req<'a> {
    let (ct, b) = multipart(&sdp(1, ports, "sendonly"), META_7);
    Req::new("INVITE", call_id)
        .siprec()
        .header("Session-Expires: 1800;refresher=uac")
        .body(&ct, &b)
}

#[test]
fn restored_session_takes_a_reinvite_and_a_bye_under_the_same_recording() {
    let mut h = Harness::new(config());
    let (resp, id) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let ports = m_ports(&body(&resp));
    let before = h.rec.flows().table.flows.clone();
    let summary = h.rec.sessions().remove(0);

    let (sent, handover) = restart(&mut h, config(), Duration::ZERO, SAME_TABLE);
    assert!(sent.is_empty(), "nothing sent for a kept session: {sent:?}");
    assert_eq!(handover.recording_ids(), vec![id.clone()]);
    assert!(
        h.take_events().is_empty(),
        "no Ended at the handover, no Started at the restore"
    );
    assert_eq!(h.rec.flows().table.flows, before, "flows untouched");
    assert_eq!(
        sorted(h.rec.flow_locals()),
        sorted(before.keys().copied().collect())
    );
    let restored = h.rec.sessions().remove(0);
    assert_eq!(restored.id, id);
    assert_eq!(restored.call_ids, summary.call_ids);
    assert_eq!(restored.participants, summary.participants);
    assert_eq!(restored.streams, summary.streams);
    assert_eq!(restored.started_at, summary.started_at);
    assert!(restored.confirmed);

    // The transfer re-INVITE of the spec: label 2 moves to a new source and G.729.
    let (ct, b) = multipart(SDP_8, META_8);
    let reinvite = Req::new("INVITE", CALL).in_dialog(&tag, 2).body(&ct, &b);
    let resp = final_response(&h.send(&reinvite));
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    assert_eq!(to_tag(&resp.headers).as_deref(), Some(tag.as_str()));
    let sdp = body(&resp);
    assert_eq!(m_ports(&sdp), ports, "our ports stay");
    assert_eq!(o_version(&sdp), 2, "the SDP version carries on");
    let moved = before[&local(ports[1])].0.flow_id;
    let (spec, generation) = h.rec.flows().table.flows[&local(ports[1])];
    assert_eq!((spec.flow_id, generation), (moved, 2), "rewritten in place");
    let events = h.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::MediaChanged { id: i, .. } if *i == id)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            SessionEvent::ParticipantsChanged { id: i, metadata: Some(m), .. }
                if *i == id && m.version == 2)),
        "metadata version carries on: {events:?}"
    );
    h.send(&ack(CALL, "sbc-7731", &tag, 2));

    let resp = final_response(&h.send(&Req::new("BYE", CALL).in_dialog(&tag, 3)));
    assert_eq!(resp.status_code.code(), 200);
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: i, reason: EndReason::Bye { .. }, .. }] if *i == id),
        "{events:?}"
    );
    assert!(h.rec.flows().table.flows.is_empty());
    assert_eq!(h.ep.dialog_count(), 0);
}

#[test]
fn operator_stop_after_restore_continues_the_dialog_cseq_and_route() {
    let mut h = Harness::new(config());
    let invite = spec_invite().header("Record-Route: <sip:10.20.0.99:5070;lr>");
    let (resp, id) = h.establish(invite);
    let tag = to_tag(&resp.headers).unwrap();
    // A metadata inconsistency makes us send an UPDATE; it is unanswered at the handover.
    let out = h.send(
        &Req::new("UPDATE", CALL)
            .in_dialog(&tag, 2)
            .body("application/rs-metadata+xml", META_GHOST),
    );
    let first = snapshot_requests(&out);
    assert_eq!(first.len(), 1, "{out:?}");
    let first = cseq(&first[0]);
    h.take_events();

    let (sent, _) = restart(&mut h, config(), Duration::ZERO, SAME_TABLE);
    assert!(sent.is_empty(), "{sent:?}");
    // The new daemon asks again (the old client transaction died with the process).
    let again = snapshot_requests(&h.advance(Duration::from_millis(1)));
    assert_eq!(again.len(), 1);
    assert_eq!(cseq(&again[0]), first + 1);
    answer(&mut h, &again[0], 200, "OK");

    let now = h.now;
    assert!(h.rec.stop(now, &id, &mut h.ep));
    let byes = of_method(&h.pump(), Method::Bye);
    let [bye] = &byes[..] else {
        panic!("one BYE expected: {byes:?}");
    };
    assert_eq!(cseq(bye), first + 2, "above every CSeq we sent before");
    assert!(header_value(&bye.headers, "CSeq").unwrap().ends_with("BYE"));
    assert_eq!(header_value(&bye.headers, "Call-ID").as_deref(), Some(CALL));
    let from = header_value(&bye.headers, "From").unwrap();
    assert!(from.ends_with(&format!("tag={tag}")), "{from}");
    let to = header_value(&bye.headers, "To").unwrap();
    assert!(to.ends_with("tag=sbc-7731"), "{to}");
    assert_eq!(
        header_value(&bye.headers, "Route").as_deref(),
        Some("<sip:10.20.0.99:5070;lr>")
    );
    assert_eq!(
        bye.uri.to_string(),
        "sip:src@10.20.0.10:5060",
        "remote target"
    );
    assert!(header_value(&bye.headers, "Reason")
        .unwrap()
        .contains("operator"));
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: i, reason: EndReason::Operator, .. }] if *i == id),
        "{events:?}"
    );
}

#[test]
fn new_session_after_restore_gets_fresh_flow_ids_and_free_ports() {
    let mut h = Harness::new(config());
    let (resp_a, _) = h.establish(timed_invite("a@src", &[31000, 31002]));
    let (resp_b, _) = h.establish(timed_invite("b@src", &[31004, 31006]));
    let ports_a = m_ports(&body(&resp_a));
    let ports_b = m_ports(&body(&resp_b));
    let ids_before: Vec<u64> = h
        .rec
        .flows()
        .table
        .flows
        .values()
        .map(|(s, _)| s.flow_id)
        .collect();
    // B ends: its ports cool down and its flow ids are spent.
    let tag_b = to_tag(&resp_b.headers).unwrap();
    let bye = Req::new("BYE", "b@src").in_dialog(&tag_b, 2);
    assert_eq!(final_response(&h.send(&bye)).status_code.code(), 200);
    h.take_events();

    restart(&mut h, config(), Duration::ZERO, SAME_TABLE);
    let (resp_c, _) = h.establish(timed_invite("c@src", &[31008, 31010]));
    let ports_c = m_ports(&body(&resp_c));
    for port in &ports_c {
        for taken in ports_a.iter().chain(&ports_b) {
            // Each port is an RTP/RTCP pair.
            assert!(
                port / 2 != taken / 2,
                "{ports_c:?} vs {ports_a:?} {ports_b:?}"
            );
        }
    }
    let highest = ids_before.iter().max().unwrap();
    let streams = &h.rec.sessions()[1].streams;
    assert_eq!(h.rec.sessions()[1].call_ids.sip_call_id, "c@src");
    for s in streams {
        assert!(s.flow_id > *highest, "{} <= {highest}", s.flow_id);
        assert!(s.rtcp_flow_id.unwrap() > *highest);
    }
    assert_eq!(h.rec.flows().table.flows.len(), 8, "A's and C's flows");
}

#[test]
fn pending_session_gets_503_and_an_answered_one_takes_its_ack_after_restore() {
    let delayed = SiprecConfig {
        answer_delay: Duration::from_secs(2),
        ..config()
    };
    let mut h = Harness::new(delayed.clone());
    let invite_a = timed_invite("a@src", &[31000, 31002]);
    assert!(h
        .send(&invite_a)
        .iter()
        .all(|m| matches!(m, rsip::SipMessage::Response(r) if r.status_code.code() == 100)));
    let ok = final_response(&h.advance(Duration::from_secs(3)));
    assert_eq!(ok.status_code.code(), 200);
    let tag_a = to_tag(&ok.headers).unwrap();
    h.send(&timed_invite("b@src", &[31004, 31006]));
    let started: Vec<String> = h
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Started { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    let [id_a, id_b] = &started[..] else {
        panic!("{started:?}");
    };

    let (sent, handover) = restart(&mut h, delayed, Duration::ZERO, SAME_TABLE);
    let refused = final_response(&sent);
    assert_eq!(refused.status_code.code(), 503);
    assert_eq!(
        header_value(&refused.headers, "Call-ID").as_deref(),
        Some("b@src")
    );
    assert_eq!(
        header_value(&refused.headers, "Retry-After").as_deref(),
        Some("30")
    );
    assert_eq!(handover.recording_ids(), vec![id_a.clone()]);
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id, reason: EndReason::Shutdown, .. }] if id == id_b),
        "{events:?}"
    );
    assert_eq!(h.rec.flows().table.flows.len(), 4, "B's flows removed");
    assert!(!h.rec.sessions()[0].confirmed);

    h.send(&ack("a@src", "sbc-7731", &tag_a, 1));
    assert!(
        h.rec.sessions()[0].confirmed,
        "the ACK reached the new daemon"
    );
    let out = h.advance(Duration::from_secs(40));
    assert!(of_method(&out, Method::Bye).is_empty(), "{out:?}");
    assert_eq!(h.rec.sessions().len(), 1);
    assert!(h.take_events().is_empty());
}

#[test]
fn restored_answer_without_ack_gets_its_retransmission_answered_then_times_out() {
    let mut h = Harness::new(config());
    let invite = timed_invite("a@src", &[31000, 31002]);
    let ok = final_response(&h.send(&invite));
    assert_eq!(ok.status_code.code(), 200);
    let id = match h.take_events().remove(0) {
        SessionEvent::Started { id, .. } => id,
        e => panic!("{e:?}"),
    };
    h.advance(Duration::from_secs(10));
    restart(&mut h, config(), Duration::from_secs(5), SAME_TABLE);
    // The client did not get our 200 and sends the INVITE again (same branch).
    let again = final_response(&h.send_raw(&invite.text(1)));
    assert_eq!(again.status_code.code(), 200);
    assert_eq!(to_tag(&again.headers), to_tag(&ok.headers));
    assert_eq!(body(&again), body(&ok));
    assert_eq!(h.rec.sessions().len(), 1, "no second session");
    // 64*T1 = 32 s in all: 10 s were spent before the restart, 5 s while down.
    assert!(h.advance(Duration::from_secs(16)).is_empty());
    let out = h.advance(Duration::from_secs(2));
    assert_eq!(of_method(&out, Method::Bye).len(), 1, "{out:?}");
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: i, reason: EndReason::TransactionTimeout, .. }] if *i == id),
        "{events:?}"
    );
}

#[test]
fn session_timer_runs_across_the_restart_and_a_refresh_after_it_works() {
    let patient = SiprecConfig {
        idle_timeout: Duration::from_secs(3 * 3600),
        ..config()
    };
    let mut h = Harness::new(patient.clone());
    let (resp_x, id_x) = h.establish(timed_invite("x@src", &[31000, 31002]));
    let (_, id_y) = h.establish(timed_invite("y@src", &[31004, 31006]));
    let tag_x = to_tag(&resp_x.headers).unwrap();
    h.advance(Duration::from_secs(1000));
    // Down for 50 s: 1800 - 1000 - 50 = 750 s are left for both.
    restart(&mut h, patient, Duration::from_secs(50), SAME_TABLE);

    h.advance(Duration::from_secs(100));
    let refresh = Req::new("INVITE", "x@src")
        .in_dialog(&tag_x, 2)
        .header("Session-Expires: 1800;refresher=uac")
        .body("application/sdp", &sdp(1, &[31000, 31002], "sendonly"));
    let resp = final_response(&h.send(&refresh));
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    assert_eq!(
        header_value(&resp.headers, "Session-Expires").as_deref(),
        Some("1800;refresher=uac")
    );
    assert_eq!(o_version(&body(&resp)), 2);
    h.send(&ack("x@src", "sbc-7731", &tag_x, 2));
    h.take_events();

    // Y expires 750 s after the restart (give or take the real time the test takes).
    assert!(h.advance(Duration::from_secs(648)).is_empty());
    let out = h.advance(Duration::from_secs(4));
    let byes = of_method(&out, Method::Bye);
    assert_eq!(byes.len(), 1, "{out:?}");
    assert_eq!(
        header_value(&byes[0].headers, "Call-ID").as_deref(),
        Some("y@src")
    );
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id, reason: EndReason::Timeout, .. }] if *id == id_y),
        "{events:?}"
    );
    // X was refreshed 100 s after the restart: 1800 s from then.
    assert!(h.advance(Duration::from_secs(1146)).is_empty());
    let byes = of_method(&h.advance(Duration::from_secs(2)), Method::Bye);
    assert_eq!(byes.len(), 1);
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id, reason: EndReason::Timeout, .. }] if *id == id_x),
        "{events:?}"
    );
}

#[test]
fn missing_or_foreign_flows_are_pinned_again_and_stale_ones_are_not_owned() {
    let mut h = Harness::new(config());
    let (resp, id) = h.establish(spec_invite());
    let ports = m_ports(&body(&resp));
    let before = h.rec.flows().table.flows.clone();
    let table = Table {
        tamper: |flows| {
            let mut ports: Vec<SocketAddr> = flows.flows.keys().copied().collect();
            ports.sort();
            // The first RTP flow vanished, the last RTCP one has another id, and a flow of a
            // session that is not in the state file is left over.
            flows.flows.remove(&ports[0]);
            let (spec, generation) = flows.flows.get_mut(&ports[3]).unwrap();
            spec.flow_id = 999;
            *generation = 5;
            let stale = local(40090);
            let spec = FlowSpec {
                flow_id: 777,
                local: stale,
                remote: None,
                action: FlowAction::Pass,
            };
            flows.flows.insert(stale, (spec, 1));
        },
        refuse: false,
    };
    let (sent, _) = restart(&mut h, config(), Duration::ZERO, table);
    assert!(sent.is_empty(), "{sent:?}");
    assert!(h.take_events().is_empty(), "the session goes on");
    let flows = &h.rec.flows().table.flows;
    let pinned = flows[&local(ports[0])];
    assert_eq!(pinned, before[&local(ports[0])], "pinned again as before");
    let rtcp = local(ports[1] + 1);
    assert_eq!(flows[&rtcp].0, before[&rtcp].0, "our flow id back");
    assert_eq!(flows[&rtcp].1, 6, "rewritten: generation + 1");
    assert_eq!(
        sorted(h.rec.flow_locals()),
        sorted(before.keys().copied().collect()),
        "the stale entry is not owned: the daemon removes it"
    );
    assert_eq!(h.rec.sessions()[0].id, id);
}

#[test]
fn session_whose_flows_cannot_be_pinned_is_ended_with_a_bye() {
    let mut h = Harness::new(config());
    let (resp, id) = h.establish(spec_invite());
    let tag = to_tag(&resp.headers).unwrap();
    let table = Table {
        tamper: |flows| flows.flows.clear(),
        refuse: true,
    };
    let (sent, _) = restart(&mut h, config(), Duration::ZERO, table);
    let byes = of_method(&sent, Method::Bye);
    assert_eq!(byes.len(), 1, "{sent:?}");
    let from = header_value(&byes[0].headers, "From").unwrap();
    assert!(from.ends_with(&format!("tag={tag}")), "{from}");
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: i, reason: EndReason::Error { detail }, .. }]
            if *i == id && detail.contains("flow table")),
        "{events:?}"
    );
    assert!(h.rec.sessions().is_empty());
    assert!(h.rec.flow_locals().is_empty());
}

#[test]
fn restore_refuses_another_layout_or_media_address() {
    let mut h = Harness::new(config());
    h.establish(spec_invite());
    let handover = h.rec.handover(h.now, &mut h.ep);
    let moved = SiprecConfig {
        media_address: [10, 20, 0, 51].into(),
        ..config()
    };
    let restore = |config: SiprecConfig, handover: RecorderHandover| {
        Recorder::restore(
            config,
            TestFlows::default(),
            Box::new(|_| {}),
            handover,
            h.now,
            &mut endpoint(),
        )
    };
    assert!(matches!(
        restore(moved, handover.clone()),
        Err(HandoverError::MediaAddress { .. })
    ));
    let mut json: serde_json::Value = serde_json::to_value(&handover).unwrap();
    json["version"] = 99.into();
    let future: RecorderHandover = serde_json::from_value(json).unwrap();
    assert!(matches!(
        restore(config(), future),
        Err(HandoverError::Version { found: 99, .. })
    ));
    assert!(restore(config(), handover).is_ok());
}

#[test]
fn session_whose_dialog_cannot_be_rebuilt_is_ended_and_unpinned() {
    let mut h = Harness::new(config());
    let (_, id) = h.establish(spec_invite());
    let (_, keep) = h.establish(timed_invite("b@src", &[31004, 31006]));
    let handover = h.rec.handover(h.now, &mut h.ep);
    let mut json = serde_json::to_value(&handover).unwrap();
    let sessions = json["sessions"].as_array_mut().unwrap();
    let broken = sessions
        .iter_mut()
        .find(|s| s["id"] == id.as_str())
        .unwrap();
    broken["dialog"]["remote_target"] = "sip:".into();
    let handover: RecorderHandover = serde_json::from_value(json).unwrap();
    let flows = TestFlows {
        table: MemoryFlows {
            flows: h.rec.flows().table.flows.clone(),
        },
        ..Default::default()
    };
    let sink = h.events.clone();
    let mut ep = endpoint();
    let rec = Recorder::restore(
        config(),
        flows,
        Box::new(move |e| sink.lock().unwrap().push(e)),
        handover,
        h.now,
        &mut ep,
    )
    .unwrap();
    let events = h.take_events();
    assert!(
        matches!(&events[..], [SessionEvent::Ended { id: i, reason: EndReason::Error { detail }, .. }]
            if *i == id && detail.contains("remote target")),
        "{events:?}"
    );
    assert_eq!(rec.sessions().len(), 1);
    assert_eq!(rec.sessions()[0].id, keep);
    assert_eq!(
        sorted(rec.flows().table.flows.keys().copied().collect()),
        sorted(rec.flow_locals()),
        "only the kept session's flows are left"
    );
    assert_eq!(rec.flow_locals().len(), 4);
    assert_eq!(ep.dialog_count(), 1);
}

/// The whole file a daemon leaves (two live sessions, one with a session timer) reads back
/// through [`crate::handover::Handover::from_json`]. With `RECORDER_FUZZ_SEEDS=<dir>` the file
/// is also written there: the seed of the `handover_file` fuzz target.
#[test]
fn handover_file_with_live_sessions_reads_back() {
    let mut h = Harness::new(config());
    let (_, first) = h.establish(spec_invite());
    let (_, second) = h.establish(timed_invite("rs-timed@10.20.0.10", &[31000, 31002]));
    let sessions = h.rec.handover(h.now, &mut h.ep);
    let dir = crate::writer::tests::TempDir::new("handover-seed");
    let (writer, _sink) =
        crate::writer::start(crate::writer::WriterConfig::new(dir.path().to_path_buf())).unwrap();
    let file = crate::handover::Handover::new(sessions, writer.handover().unwrap(), false);
    let json = serde_json::to_vec_pretty(&file).unwrap();
    let back = crate::handover::Handover::from_json(&json).unwrap();
    assert_eq!(back.recorder.recording_ids().len(), 2);
    let ids = back.recorder.recording_ids();
    assert!(ids.contains(&first) && ids.contains(&second), "{ids:?}");
    if let Some(seeds) = std::env::var_os("RECORDER_FUZZ_SEEDS") {
        std::fs::create_dir_all(&seeds).unwrap();
        std::fs::write(
            std::path::Path::new(&seeds).join("two-live-sessions.json"),
            &json,
        )
        .unwrap();
    }
}
