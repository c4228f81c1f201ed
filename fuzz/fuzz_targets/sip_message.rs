//! SIP message parsing and everything behind it: the endpoint (transactions, dialogs, stateless
//! answers) and the SIPREC recorder (multipart, SDP offer/answer, metadata, sessions), on
//! virtual time with an in-memory flow table.
//!
//! Input: a flags byte, then messages separated by NUL. Flags bit 0: TCP (the messages are one
//! byte stream, framed as the connection task frames it), else UDP datagrams. `@TAG@` in a
//! message becomes the To tag of our last 2xx: our tags are random, and without them the
//! fuzzer would never get past the dialog lookup to re-INVITEs, UPDATEs and BYEs.
#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use recorder::{
    flow::MemoryFlows,
    sip::{frame, Endpoint, EndpointConfig, Incoming, Transport},
    siprec::session::{Recorder, SiprecConfig},
    transport::driver::SipApp,
};

struct Pair {
    rec: Recorder<MemoryFlows>,
    ep: Endpoint,
    now: Instant,
    /// The To tag of the last 2xx we sent.
    tag: Vec<u8>,
}

/// The `tag` parameter of the To header of a response we sent.
fn to_tag(response: &[u8]) -> Option<&[u8]> {
    let to = response
        .split(|b| *b == b'\n')
        .find(|l| l.starts_with(b"To:") || l.starts_with(b"t:"))?;
    let at = to.windows(5).position(|w| w == b";tag=")? + 5;
    let tag = &to[at..];
    let end = tag
        .iter()
        .position(|b| matches!(b, b';' | b'\r' | b'>' | b' '))
        .unwrap_or(tag.len());
    Some(&tag[..end])
}

/// `message` with every `@TAG@` replaced by `tag`.
fn with_tag(message: &[u8], tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.windows(5).position(|w| w == b"@TAG@") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(tag);
        rest = &rest[at + 5..];
    }
    out.extend_from_slice(rest);
    out
}

impl Pair {
    fn pump(&mut self) {
        // Bounded: a loop between the two would be a bug, and must not hang the fuzzer.
        for _ in 0..1000 {
            let mut busy = false;
            while let Some(event) = self.ep.poll_event() {
                busy = true;
                self.rec.handle_event(self.now, event, &mut self.ep);
            }
            while let Some(t) = self.ep.poll_transmit() {
                busy = true;
                assert!(!t.bytes.is_empty(), "empty transmit");
                if t.bytes.starts_with(b"SIP/2.0 2") {
                    if let Some(tag) = to_tag(&t.bytes) {
                        self.tag = tag.to_vec();
                    }
                }
            }
            if !busy {
                return;
            }
        }
        panic!("endpoint and recorder keep each other busy");
    }

    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        for _ in 0..500 {
            let next = [self.ep.poll_timeout(), self.rec.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= target => {
                    self.now = self.now.max(at);
                    self.ep.handle_timeout(self.now);
                    self.rec.handle_timeout(self.now, &mut self.ep);
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = self.now.max(target);
    }

    fn deliver(&mut self, transport: Transport, bytes: Bytes) {
        self.ep.handle_incoming(
            self.now,
            Incoming {
                transport,
                source: "10.20.0.10:5060".parse().unwrap(),
                local: "10.20.0.50:5060".parse().unwrap(),
                connection: (transport == Transport::Tcp).then_some(1),
                bytes,
            },
        );
        self.pump();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut pair = Pair {
        rec: Recorder::new(
            SiprecConfig {
                media_address: [10, 20, 0, 50].into(),
                // Small: the fuzzer can run out of ports.
                rtp_ports: (40000, 40011),
                ..SiprecConfig::default()
            },
            MemoryFlows::default(),
            Box::new(|_| {}),
        ),
        ep: Endpoint::new(EndpointConfig {
            contact_host: "10.20.0.50".into(),
            contact_params: vec!["+sip.srs".into()],
            ..Default::default()
        }),
        now: Instant::now(),
        tag: Vec::new(),
    };
    if flags & 1 == 1 {
        let mut stream = BytesMut::new();
        for read in rest.split(|b| *b == 0) {
            stream.extend_from_slice(&with_tag(read, &pair.tag));
            loop {
                match frame(&mut stream) {
                    Ok(Some(message)) => pair.deliver(Transport::Tcp, message),
                    Ok(None) => break,
                    // The connection is closed: nothing more arrives on it.
                    Err(_) => return,
                }
            }
            pair.advance(Duration::from_millis(200));
        }
    } else {
        for datagram in rest.split(|b| *b == 0) {
            let datagram = with_tag(datagram, &pair.tag);
            pair.deliver(Transport::Udp, Bytes::from(datagram));
            pair.advance(Duration::from_millis(200));
        }
    }
    // Retransmissions, ACK timeouts, session timers, the idle timeout.
    pair.advance(Duration::from_secs(40));
    pair.advance(Duration::from_secs(4000));
    let _ = pair.rec.sessions();
});
