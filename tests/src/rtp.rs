//! RTP for tests and the demo: G.711 encoding of generated tones, and a paced RTP sender.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

/// ITU-T G.711 μ-law encoding of one 16-bit sample.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut s = sample as i32;
    let sign: u8 = if s < 0 { 0x80 } else { 0 };
    s = s.abs().min(CLIP) + BIAS;
    let mut exponent = 7;
    while exponent > 0 && s & (0x80 << exponent) == 0 {
        exponent -= 1;
    }
    let mantissa = ((s >> (exponent + 3)) & 0x0f) as u8;
    !(sign | ((exponent as u8) << 4) | mantissa)
}

/// ITU-T G.711 A-law encoding of one 16-bit sample.
pub fn linear_to_alaw(sample: i16) -> u8 {
    const SEGMENT_ENDS: [i32; 8] = [0x1f, 0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff];
    let mut pcm = (sample as i32) >> 3;
    let mask: u8 = if pcm >= 0 {
        0xd5
    } else {
        pcm = -pcm - 1;
        0x55
    };
    let Some(segment) = SEGMENT_ENDS.iter().position(|&end| pcm <= end) else {
        return 0x7f ^ mask;
    };
    let shift = if segment < 2 { 1 } else { segment };
    let value = ((segment as u8) << 4) | ((pcm >> shift) & 0x0f) as u8;
    value ^ mask
}

/// Samples of a sine tone at 8 kHz, starting at sample index `from`.
pub fn tone(freq: f64, amplitude: f64, from: u64, count: usize) -> Vec<i16> {
    (0..count as u64)
        .map(|i| {
            let t = (from + i) as f64 / 8000.0;
            (amplitude * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
        })
        .collect()
}

/// Encodes samples with payload type 0 (PCMU) or 8 (PCMA).
pub fn encode(pt: u8, samples: &[i16]) -> Vec<u8> {
    samples
        .iter()
        .map(|&s| {
            if pt == 8 {
                linear_to_alaw(s)
            } else {
                linear_to_ulaw(s)
            }
        })
        .collect()
}

/// One RTP stream (an SSRC) from a socket to a destination.
pub struct RtpStream {
    pub socket: UdpSocket,
    pub dest: SocketAddr,
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub pt: u8,
    /// Sample index of the tone (phase continuity across packets).
    pub sample: u64,
    /// Packets sent.
    pub sent: u64,
}

impl RtpStream {
    pub fn new(socket: UdpSocket, dest: SocketAddr, ssrc: u32, pt: u8) -> Self {
        Self {
            socket,
            dest,
            ssrc,
            seq: (ssrc & 0x7fff) as u16,
            timestamp: ssrc.rotate_left(7),
            pt,
            sample: 0,
            sent: 0,
        }
    }

    /// An RTP packet with this stream's header and `payload`; advances seq and timestamp.
    pub fn packet(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(12 + payload.len());
        p.push(0x80);
        p.push(self.pt & 0x7f);
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.timestamp.to_be_bytes());
        p.extend_from_slice(&self.ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(payload.len() as u32);
        p
    }

    /// Sends one 20 ms packet of a tone at `freq` Hz.
    pub fn send_tone_packet(&mut self, freq: f64) {
        let samples = tone(freq, 8000.0, self.sample, 160);
        self.sample += 160;
        let payload = encode(self.pt, &samples);
        let p = self.packet(&payload);
        self.socket.send_to(&p, self.dest).expect("send RTP");
        self.sent += 1;
    }

    /// Sends one RFC 4733 telephone event (`event` 0-9, 10 `*`, 11 `#`) of `packets` x 20 ms on
    /// payload type `pt`, as an SRC does: all packets carry the event's start timestamp, the
    /// first has the marker bit, the duration grows by 160 per packet, and the end packet is
    /// sent three times. The stream's timestamp then moves past the event. Returns the packets
    /// sent.
    pub fn send_dtmf(&mut self, pt: u8, event: u8, packets: u16) -> u64 {
        let start = self.timestamp;
        let mut sent = 0;
        let mut send = |s: &mut Self, marker: bool, end: bool, duration: u16| {
            let d = duration.to_be_bytes();
            let flags = if end { 0x80 } else { 0 } | 10;
            let mut p = vec![0x80, (pt & 0x7f) | if marker { 0x80 } else { 0 }];
            p.extend_from_slice(&s.seq.to_be_bytes());
            p.extend_from_slice(&start.to_be_bytes());
            p.extend_from_slice(&s.ssrc.to_be_bytes());
            p.extend_from_slice(&[event, flags, d[0], d[1]]);
            s.seq = s.seq.wrapping_add(1);
            s.socket.send_to(&p, s.dest).expect("send RTP event");
            sent += 1;
        };
        for i in 1..packets {
            send(self, i == 1, false, 160 * i);
        }
        for _ in 0..3 {
            send(self, false, true, 160 * packets);
        }
        self.timestamp = start.wrapping_add(160 * packets as u32);
        self.sample += 160 * packets as u64;
        self.sent += sent;
        sent
    }

    /// Skips `packets` packet times without sending (a pause or loss): seq and timestamp advance
    /// as the SRC's would if it dropped them.
    pub fn skip(&mut self, packets: u16) {
        self.seq = self.seq.wrapping_add(packets);
        self.timestamp = self.timestamp.wrapping_add(160 * packets as u32);
        self.sample += 160 * packets as u64;
    }
}

/// Sends 20 ms packets on every stream for `duration`, paced in real time (each stream sends
/// its own tone frequency). Returns when done.
pub fn send_paced(streams: &mut [(&mut RtpStream, f64)], duration: Duration) {
    let start = Instant::now();
    let packets = (duration.as_millis() / 20) as u32;
    for n in 0..packets {
        let due = start + Duration::from_millis(20 * n as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // pacing real-time media, not synchronisation
        }
        for (stream, freq) in streams.iter_mut() {
            stream.send_tone_packet(*freq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        // Reference points of G.711 μ-law.
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(linear_to_ulaw(-1), 0x7f);
        assert_eq!(linear_to_ulaw(32767), 0x80);
        assert_eq!(linear_to_ulaw(-32768), 0x00);
    }

    #[test]
    fn alaw_known_values() {
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(linear_to_alaw(-1), 0x55);
        assert_eq!(linear_to_alaw(32767), 0xaa);
        assert_eq!(linear_to_alaw(-32768), 0x2a);
    }
}
