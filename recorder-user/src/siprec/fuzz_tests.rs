//! Property tests: the parsers never panic on arbitrary or mutated input, and what they accept
//! can be used (answers built from any parsed offer, metadata merged from any parsed document).

use std::{net::IpAddr, time::UNIX_EPOCH};

use proptest::prelude::*;

use super::{
    body::tests::{SPEC_INVITE_BODY, SPEC_REINVITE_BODY},
    build_answer, choose_codec, parse_metadata, parse_offer, split_body, Direction, MetadataState,
    StreamAnswer,
};

/// Byte-level edits applied to a valid input: (position, operation, byte).
fn mutations() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..4, any::<u8>()), 0..16)
}

fn mutate(base: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = base.to_vec();
    for &(pos, op, byte) in edits {
        let at = if out.is_empty() { 0 } else { pos % out.len() };
        match op {
            0 if !out.is_empty() => out[at] = byte,
            1 => out.insert(at, byte),
            2 if !out.is_empty() => {
                out.remove(at);
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn sdp_part(body: &str) -> &str {
    let start = body.find("v=0").unwrap();
    let end = body[start..].find("\r\n\r\n--").unwrap() + start + 2;
    &body[start..end]
}

fn xml_part(body: &str) -> &str {
    let start = body.find("<?xml").unwrap();
    let end = body.find("</recording>").unwrap() + "</recording>".len();
    &body[start..end]
}

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(options).prop_map(String::from),
        1 => "[a-z]=[ -~]{0,40}",
    ]
}

/// SDP built from lines real clients send, plus some broken and random ones.
fn sdp_text() -> impl Strategy<Value = String> {
    let session = prop::collection::vec(
        pick(&[
            "c=IN IP4 10.20.0.10",
            "c=IN IP6 2001:db8::1",
            "c=IN IP4 224.2.1.1/127/3",
            "b=AS:64",
            "a=sendonly",
            "a=inactive",
            "a=ptime:30",
        ]),
        0..3,
    );
    let media = prop::collection::vec(
        (
            pick(&[
                "m=audio 31000 RTP/AVP 8 0 101",
                "m=audio 31002 RTP/AVP 18 101 13",
                "m=video 0 RTP/AVP 97",
                "m=video 31004 RTP/AVP 97",
                "m=audio 1/2 RTP/SAVP 0",
                "m=audio 31006 RTP/SAVP 8",
                "m=audio 65535 UDP/TLS/RTP/SAVP 111",
                "m=audio 31008 RTP/AVP 96 111",
            ]),
            prop::collection::vec(
                pick(&[
                    "c=IN IP4 10.0.0.7",
                    "c=IN IP6 ::1",
                    "a=rtpmap:8 PCMA/8000",
                    "a=rtpmap:18 G729/8000",
                    "a=rtpmap:96 iLBC/8000",
                    "a=fmtp:96 mode=20",
                    "a=rtpmap:97 H264/90000",
                    "a=rtpmap:101 telephone-event/8000",
                    "a=rtpmap:111 opus/48000/2",
                    "a=rtpmap:300 x/-1/999",
                    "a=fmtp:101 0-15",
                    "a=fmtp:",
                    "a=ptime:20",
                    "a=ptime:1e40",
                    "a=maxptime:150",
                    "a=label:1",
                    "a=label:",
                    "a=sendonly",
                    "a=recvonly",
                    "a=inactive",
                    "a=direction:both",
                    "a=rtcp:53001 IN IP4 10.0.0.1",
                    "a=rtcp:",
                    "a=rtcp-mux",
                    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:abc",
                    "a=crypto:2 F8_128_HMAC_SHA1_80 inline:abc",
                    "a=",
                    "",
                ]),
                0..10,
            ),
        ),
        0..5,
    );
    (session, media, any::<bool>()).prop_map(|(session, media, lf)| {
        let mut lines = vec![
            "v=0".to_string(),
            "o=SRC 700100 1 IN IP4 10.20.0.10".to_string(),
            "s=-".to_string(),
            "t=0 0".to_string(),
        ];
        lines.extend(session);
        for (m, attrs) in media {
            lines.push(m);
            lines.extend(attrs);
        }
        lines.join(if lf { "\n" } else { "\r\n" })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn split_body_never_panics(ct in prop::option::of("[ -~]{0,60}"), body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = split_body(ct.as_deref(), &body);
        let _ = split_body(Some("multipart/mixed;boundary=rsb-42"), &body);
    }

    #[test]
    fn split_body_survives_mutated_spec_bodies(edits in mutations(), ct_edits in mutations()) {
        for (ct, body) in [
            ("multipart/mixed;boundary=rsb-42", SPEC_INVITE_BODY),
            ("multipart/mixed;boundary=rsb-43", SPEC_REINVITE_BODY),
        ] {
            let ct = String::from_utf8_lossy(&mutate(ct.as_bytes(), &ct_edits)).into_owned();
            let _ = split_body(Some(&ct), &mutate(body.as_bytes(), &edits));
        }
    }

    #[test]
    fn multipart_round_trips_part_content(content in "[^\\x00]{0,300}") {
        prop_assume!(!content.contains("--rsb-b") && !content.trim().is_empty());
        let body = format!(
            "--rsb-b\r\nContent-Type: application/sdp\r\n\r\n{content}\r\n--rsb-b\r\nContent-Type: application/rs-metadata\r\n\r\n<recording/>\r\n--rsb-b--\r\n"
        );
        let out = split_body(Some("multipart/mixed; boundary=\"rsb-b\""), body.as_bytes()).unwrap();
        prop_assert_eq!(out.sdp.as_deref(), Some(content.as_str()));
        prop_assert_eq!(out.metadata.as_deref(), Some("<recording/>"));
    }

    #[test]
    fn parse_offer_never_panics(text in "(?s).{0,1024}") {
        let _ = parse_offer(&text);
    }

    #[test]
    fn parse_offer_survives_mutated_spec_sdp(edits in mutations()) {
        let sdp = sdp_part(SPEC_INVITE_BODY);
        let text = String::from_utf8_lossy(&mutate(sdp.as_bytes(), &edits)).into_owned();
        let _ = parse_offer(&text);
    }

    /// Any offer we accept can be answered, and the answer is SDP we can read back with the same
    /// number of m-lines.
    #[test]
    fn accepted_offers_can_be_answered(text in sdp_text()) {
        if let Ok(offer) = parse_offer(&text) {
            let answers: Vec<StreamAnswer> = offer
                .streams
                .iter()
                .map(|s| match choose_codec(s) {
                    Some(codec) if s.is_usable() => StreamAnswer::Accept {
                        port: 40000,
                        rtcp_port: Some(40001),
                        codec,
                        telephone_event: s.telephone_event.clone(),
                        direction: s.direction.answer(false),
                        label: s.label.clone(),
                        crypto: None,
                    },
                    _ => StreamAnswer::Reject,
                })
                .collect();
            let answer = build_answer(&offer, &answers, IpAddr::from([127, 0, 0, 1]), 1, 1);
            let back = parse_offer(&answer);
            prop_assert!(back.is_ok(), "answer {answer:?} does not parse: {back:?}");
            let back = back.unwrap();
            prop_assert_eq!(back.streams.len(), offer.streams.len());
            for s in back.streams.iter().filter(|s| s.port != 0) {
                prop_assert!(matches!(s.direction, Direction::RecvOnly | Direction::Inactive));
            }
        }
    }

    #[test]
    fn parse_metadata_never_panics(text in "(?s).{0,1024}") {
        let _ = parse_metadata(&text);
    }

    #[test]
    fn parse_metadata_survives_mutated_spec_documents(edits in mutations()) {
        let mut state = MetadataState::default();
        for body in [SPEC_INVITE_BODY, SPEC_REINVITE_BODY] {
            let xml = String::from_utf8_lossy(&mutate(xml_part(body).as_bytes(), &edits)).into_owned();
            if let Ok(doc) = parse_metadata(&xml) {
                state.apply(doc, UNIX_EPOCH);
            }
        }
        let _ = state.participants();
        let _ = state.call_uuid();
        let _ = state.unresolved_refs();
    }
}
