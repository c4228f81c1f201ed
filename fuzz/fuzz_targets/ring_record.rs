//! Ring records as the consumer reads them: header and frame, the UDP payload, the frame
//! rebuilt around a decrypted payload (`pcap_srtp = "decrypted"`), and the RTP header in it.
//!
//! Input: records back to back, each padded to 8 bytes as in a BPF ring buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::{
    capture::{CapturedPacket, MonoClock},
    fuzz_api::{decrypted_frame, ring_record, rtp_parse, RtpPacket, RECORD_HEADER_LEN},
};

fuzz_target!(|data: &[u8]| {
    let clock = MonoClock::now();
    let mut rest = data;
    while let Some((header, frame)) = ring_record(rest) {
        assert_eq!(frame.len(), header.cap_len as usize);
        let packet = CapturedPacket {
            header,
            frame,
            wall: clock.to_wall(header.ts_ns),
            ring: 0,
        };
        let payload = packet.payload();
        assert!(payload.len() <= frame.len());
        let _ = packet.truncated();
        if let RtpPacket::Rtp { payload: media, .. } = rtp_parse(payload) {
            // An SRTP tag of 10 bytes gone, as after authentication.
            let plain = &payload[..payload.len().saturating_sub(10).max(media.start)];
            if let Some(out) = decrypted_frame(frame, header.payload_offset as usize, plain) {
                assert_eq!(out.len(), header.payload_offset as usize + plain.len());
                assert_eq!(&out[header.payload_offset as usize..], plain);
            }
        }
        let used = (RECORD_HEADER_LEN + frame.len()).next_multiple_of(8);
        rest = rest.get(used..).unwrap_or(&[]);
    }
});
