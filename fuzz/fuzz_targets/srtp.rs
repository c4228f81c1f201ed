//! SRTP and SRTCP: the SDES `a=crypto` value, and packets through the receiver. Packets our
//! own sender protected with the same key must come back as they were.
//!
//! Input: the crypto value up to the first newline, then packets `[op][length][bytes]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::{
    fuzz_api::srtp_sender,
    media::{
        sdes::{self, SdesCrypto},
        srtp::SrtpRx,
    },
};

fuzz_target!(|data: &[u8]| {
    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
        return;
    };
    let Ok(line) = std::str::from_utf8(&data[..nl]) else {
        return;
    };
    let Ok(crypto) = SdesCrypto::parse(line) else {
        return;
    };
    // Our answer to it is a value we read ourselves.
    let ours = sdes::answer(&crypto);
    let back = SdesCrypto::parse(&ours).unwrap_or_else(|e| panic!("{ours:?}: {e}"));
    assert_eq!(back.suite, crypto.suite);

    let mut rx = SrtpRx::default();
    if rx.set_key(&crypto).is_err() {
        return;
    }
    let mut tx = srtp_sender(&crypto);
    let mut rest = &data[nl + 1..];
    while let [op, len, tail @ ..] = rest {
        let (packet, next) = tail.split_at((*len as usize).min(tail.len()));
        rest = next;
        let rtcp = op & 1 == 1;
        if op & 2 == 0 {
            let _ = rx.unprotect(packet, rtcp);
            continue;
        }
        let Some(tx) = tx.as_mut() else {
            continue;
        };
        let mut plain = packet.to_vec();
        if let Some(b) = plain.first_mut() {
            *b = 0x80 | (*b & 0x3f);
        }
        if rtcp {
            if let Some(b) = plain.get_mut(1) {
                *b = 200 + *b % 5;
            }
        }
        let protected = if rtcp {
            tx.rtcp_protect(plain.clone())
        } else {
            tx.rtp_protect(plain.clone())
        };
        if let Ok(protected) = protected {
            if let Ok(out) = rx.unprotect(&protected, rtcp) {
                assert_eq!(out, plain, "round trip changed the packet");
            }
        }
    }
    // What a handover keeps of it reads back.
    let saved = serde_json::to_string(&rx).unwrap();
    let _: SrtpRx = serde_json::from_str(&saved).unwrap();
});
