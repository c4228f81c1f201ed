//! SDP offers and the answer built from them: any offer we accept can be answered, and the
//! answer is SDP we read back with the same m-lines, none of them sending.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::siprec::{
    answer_crypto, build_answer, choose_codec, parse_offer, Direction, StreamAnswer,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(offer) = parse_offer(text) else {
        return;
    };
    let answers: Vec<StreamAnswer> = offer
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| match choose_codec(s) {
            Some(codec) if s.is_usable() => StreamAnswer::Accept {
                port: 40000 + 2 * i as u16,
                // Every other stream with a separate RTCP port, to write `a=rtcp`.
                rtcp_port: Some(40001 + 2 * i as u16 + (i as u16 % 2) * 100),
                codec,
                telephone_event: s.telephone_event.clone(),
                direction: s.direction.answer(i % 3 == 2),
                label: s.label.clone(),
                crypto: if s.is_srtp() {
                    answer_crypto(&s.crypto)
                } else {
                    None
                },
            },
            _ => StreamAnswer::Reject,
        })
        .collect();
    let answer = build_answer(&offer, &answers, [10, 20, 0, 50].into(), 7, 2);
    let back = match parse_offer(&answer) {
        Ok(back) => back,
        Err(e) => panic!("our answer {answer:?} does not parse: {e}"),
    };
    assert_eq!(back.streams.len(), offer.streams.len(), "{answer}");
    for (s, a) in back.streams.iter().zip(&answers) {
        match a {
            StreamAnswer::Accept { port, .. } => {
                assert_eq!(s.port, *port, "{answer}");
                assert!(
                    matches!(s.direction, Direction::RecvOnly | Direction::Inactive),
                    "{answer}"
                );
            }
            StreamAnswer::Reject => assert_eq!(s.port, 0, "{answer}"),
        }
    }
});
