//! RTP and RTCP as the writer reads them: the header parser, per-SSRC loss and jitter, the
//! timeline position, the RTCP sender-report parser, and the audio decoders on the payload.
//!
//! Input: packets, each `[length][arrival step][bytes]`; the first byte picks the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::{
    fuzz_api::{rtp_parse, RtpPacket, RtpTrack},
    media::codec::{Decoder, Kind},
    rtcp::{parse_sender_report, receiver_report, ReportBlock},
};

const KINDS: [Kind; 6] = [
    Kind::Pcmu,
    Kind::Pcma,
    Kind::G722,
    Kind::Opus { channels: 1 },
    Kind::Opus { channels: 2 },
    Kind::G729,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let kind = KINDS[pick as usize % KINDS.len()];
    let Ok(mut decoder) = Decoder::new(kind) else {
        return;
    };
    let (clock, rate) = (8000, kind.sample_rate());
    let mut track = RtpTrack::default();
    let mut arrival = 0u32;
    let mut pcm = Vec::new();
    while let [len, step, tail @ ..] = rest {
        let (packet, next) = tail.split_at((*len as usize).min(tail.len()));
        rest = next;
        arrival = arrival.wrapping_add(u32::from(*step) * 20);
        match rtp_parse(packet) {
            RtpPacket::Rtp { payload, .. } => {
                assert!(payload.start <= payload.end && payload.end <= packet.len());
                let wall = i64::from(arrival) * i64::from(rate) / i64::from(clock);
                assert!(track.push(packet, arrival, clock, rate, wall).is_some());
                pcm.clear();
                if decoder.decode(&packet[payload], &mut pcm).is_err() {
                    let _ = decoder.conceal(&mut pcm);
                }
            }
            RtpPacket::Rtcp | RtpPacket::Malformed => {
                assert!(track.push(packet, arrival, clock, rate, 0).is_none());
                let _ = parse_sender_report(packet);
            }
        }
    }
    // The receiver reports built from what was counted are RTCP we read as such.
    let blocks: Vec<ReportBlock> = track
        .summary()
        .iter()
        .map(|s| ReportBlock {
            ssrc: s.ssrc,
            cumulative_lost: s.lost.min(u64::from(u32::MAX)) as u32,
            extended_highest_seq: s.extended_highest_seq,
            jitter: s.jitter,
            ..Default::default()
        })
        .take(31)
        .collect();
    let rr = receiver_report(1, &blocks, "recorder");
    assert_eq!(rtp_parse(&rr), RtpPacket::Rtcp);
    assert_eq!(parse_sender_report(&rr), None);
});
