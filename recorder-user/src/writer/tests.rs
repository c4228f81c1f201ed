//! Writer tests on synthetic captured packets. Tests named `tool_*` shell out to tshark/soxi
//! (they fail with a clear message when the tool is missing); `tmpfs_*` mounts a tmpfs (root).
//!
//! This file: the fixtures, and routing, sharding, pcap and WAV contents. By topic in `tests/`:
//! `repair` (crashes, retention, the index, shutdown), `disk_full`, `handover`, `fds`, `flush`,
//! `srtp_codecs`, `telephone_events`, and `measure` (ignored measurements).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    encode::{
        g711::{self, encode},
        recording::{Recording, Start},
    },
    metadata::{RecordingMetadata, RecordingState, METADATA_FILE, PCAP_FILE, WAV_FILE},
    route::OwnedPacket,
    *,
};
use crate::{
    capture::{CapturedPacket, PacketSink, RecordHeader},
    events::{CallIds, Codec, EndReason, MetadataVersion, Participant, SessionEvent, StreamInfo},
};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "recorder-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn at_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        t0() + Duration::from_millis(ms as u64)
    } else {
        t0() - Duration::from_millis((-ms) as u64)
    }
}

fn stream(index: usize, label: &str, flow_id: u64, codec: &str, pt: u8, port: u16) -> StreamInfo {
    StreamInfo {
        index,
        label: label.into(),
        media: "audio".into(),
        flow_id,
        rtcp_flow_id: Some(flow_id + 1000),
        local_port: port,
        rtcp_port: Some(port + 1),
        remote: None,
        rtcp_remote: None,
        codec: Codec {
            payload_type: pt,
            name: codec.into(),
            clock_rate: 8000,
            channels: 1,
            fmtp: None,
        },
        telephone_event_pt: Some(101),
        paused: false,
        srtp: false,
        sdes: None,
    }
}

fn two_streams() -> Vec<StreamInfo> {
    vec![
        stream(0, "caller", 1, "PCMU", 0, 40000),
        stream(1, "callee", 2, "PCMA", 8, 40002),
    ]
}

fn started(id: &str, streams: Vec<StreamInfo>, call_uuid: &str) -> SessionEvent {
    SessionEvent::Started {
        id: id.into(),
        at: t0(),
        ids: CallIds {
            sip_call_id: format!("{id}@client"),
            call_uuid: Some(call_uuid.into()),
            call_uuid_source: Some("extensiondata".into()),
            connection_id: Some("conn-1".into()),
            extra: vec![],
        },
        streams,
        participants: vec![Participant {
            id: "p1".into(),
            name: Some("Alice".into()),
            aor: Some("sip:alice@example.com".into()),
            joined_at: Some(t0()),
            left_at: None,
            sends: vec!["caller".into()],
            receives: vec!["callee".into()],
        }],
        metadata: Some(MetadataVersion {
            version: 1,
            received_at: t0(),
            method: "INVITE".into(),
            xml: "<recording xmlns='urn:ietf:params:xml:ns:recording:1'/>".into(),
        }),
    }
}

fn started_at(id: &str, at: SystemTime) -> SessionEvent {
    let mut ev = started(id, two_streams(), "u");
    if let SessionEvent::Started { at: t, .. } = &mut ev {
        *t = at;
    }
    ev
}

fn ended(id: &str, ms: i64) -> SessionEvent {
    SessionEvent::Ended {
        id: id.into(),
        at: at_ms(ms),
        reason: EndReason::Bye { reason: None },
        ring_drops: Vec::new(),
    }
}

/// Builds an Ethernet/IPv4/UDP frame carrying `payload` to `dport`; returns (frame, UDP payload
/// offset).
fn udp_frame(dport: u16, payload: &[u8]) -> (Vec<u8>, u16) {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[192, 0, 2, 10]);
    ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&30000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    (f, 42)
}

fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Feeds one frame to a sink as a captured packet of `flow_id`.
fn feed(sink: &mut impl PacketSink, flow_id: u64, wall: SystemTime, frame: &[u8], off: u16) {
    feed_batched(sink, flow_id, wall, frame, off);
    // As the ring consumer does after a drain (the writer's sink sends packets per batch).
    sink.batch_end();
}

/// [`feed`] without ending the batch (the bench: many packets per drain).
fn feed_batched(
    sink: &mut impl PacketSink,
    flow_id: u64,
    wall: SystemTime,
    frame: &[u8],
    off: u16,
) {
    sink.packet(&CapturedPacket {
        header: header(flow_id, frame, off),
        frame,
        wall,
        ring: 0,
    });
}

/// The ring record header of a whole `frame` of `flow_id` (UDP payload at `off`).
fn header(flow_id: u64, frame: &[u8], off: u16) -> RecordHeader {
    RecordHeader {
        flow_id,
        ts_ns: 0,
        generation: 0,
        wire_len: frame.len() as u32,
        cap_len: frame.len() as u32,
        payload_offset: off,
        flags: 0,
    }
}

fn owned(flow_id: u64, wall: SystemTime, frame: &[u8], off: u16) -> OwnedPacket {
    OwnedPacket {
        header: header(flow_id, frame, off),
        wall,
        frame: frame.into(),
    }
}

/// An RTP sender: G.711 packets of 20 ms whose audio is `signal(absolute sample index)`.
struct Sender {
    flow_id: u64,
    port: u16,
    pt: u8,
    ssrc: u32,
    seq: u16,
    /// RTP timestamp of absolute sample 0.
    ts_base: u32,
}

impl Sender {
    fn new(flow_id: u64, port: u16, pt: u8, ssrc: u32, seq: u16, ts_base: u32) -> Self {
        Self {
            flow_id,
            port,
            pt,
            ssrc,
            seq,
            ts_base,
        }
    }

    fn encode(&self, s: i16) -> u8 {
        if self.pt == 8 {
            encode::alaw(s)
        } else {
            encode::ulaw(s)
        }
    }

    /// The frame of the packet starting at absolute sample `n`; advances the sequence number.
    fn frame(&mut self, n: u64, signal: &dyn Fn(u64) -> i16) -> (Vec<u8>, u16) {
        let payload: Vec<u8> = (n..n + 160).map(|i| self.encode(signal(i))).collect();
        let p = rtp(
            self.pt,
            self.seq,
            self.ts_base.wrapping_add(n as u32),
            self.ssrc,
            &payload,
        );
        self.seq = self.seq.wrapping_add(1);
        udp_frame(self.port, &p)
    }

    /// Sends the packet starting at absolute sample `n`, arriving `jitter_ms` late.
    fn send(
        &mut self,
        sink: &mut impl PacketSink,
        n: u64,
        jitter_ms: i64,
        signal: &dyn Fn(u64) -> i16,
    ) {
        let (f, off) = self.frame(n, signal);
        let wall = at_ms((n * 1000 / 8000) as i64 + jitter_ms);
        feed(sink, self.flow_id, wall, &f, off);
    }
}

fn tone(freq: f64, amp: f64) -> impl Fn(u64) -> i16 {
    move |n| (amp * (2.0 * std::f64::consts::PI * freq * n as f64 / 8000.0).sin()) as i16
}

/// Deterministic noise: every absolute sample index has its own value, so a channel's offset
/// from the call's time can be measured exactly.
fn noise(n: u64) -> i16 {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    ((x % 16000) as i64 - 8000) as i16
}

fn start_writer(spool: &Path) -> (WriterHandle, WriterSink) {
    let mut c = WriterConfig::new(spool.to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.host = "test-host".into();
    start(c).expect("start writer")
}

/// (channels, rate, samples per channel) of a WAV we wrote, from its header; checks the sizes.
fn read_wav(path: &Path) -> (u16, u32, Vec<Vec<i16>>) {
    let d = std::fs::read(path).expect("read wav");
    assert_eq!(&d[0..4], b"RIFF");
    assert_eq!(&d[8..16], b"WAVEfmt ");
    assert_eq!(&d[36..40], b"data");
    let ch = u16::from_le_bytes([d[22], d[23]]);
    let rate = u32::from_le_bytes(d[24..28].try_into().unwrap());
    let riff = u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(d[40..44].try_into().unwrap()) as usize;
    assert_eq!(len + 44, d.len(), "data size in header = file size - 44");
    assert_eq!(riff + 8, d.len(), "RIFF size = file size - 8");
    assert_eq!(len % (ch as usize * 2), 0, "whole frames");
    let mut chans = vec![Vec::new(); ch as usize];
    for (i, s) in d[44..].chunks(2).enumerate() {
        chans[i % ch as usize].push(i16::from_le_bytes([s[0], s[1]]));
    }
    (ch, rate, chans)
}

/// Power of `freq` in `x` (Goertzel), normalised by length.
fn goertzel(x: &[i16], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
    let c = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in x {
        let s = v as f64 + c * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    (s1 * s1 + s2 * s2 - c * s1 * s2) / (x.len() as f64 * x.len() as f64)
}

fn rms(x: &[i16]) -> f64 {
    (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

fn need(tool: &str) {
    let ok = Command::new(tool).arg("--help").output().is_ok();
    assert!(
        ok,
        "`{tool}` is not installed: install it (apt-get install tshark sox) to run this test"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packet count and total captured bytes as tshark reads them.
fn tshark_count_bytes(pcap: &Path) -> (u64, u64) {
    need("tshark");
    let out = run(Command::new("tshark").arg("-r").arg(pcap).args([
        "-T",
        "fields",
        "-e",
        "frame.cap_len",
        "-e",
        "frame.len",
    ]));
    let mut n = 0;
    let mut bytes = 0;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line
            .split_whitespace()
            .map(|v| v.parse::<u64>().expect("number"));
        let (cap, len) = (it.next().unwrap(), it.next().unwrap());
        assert_eq!(cap, len, "frame not truncated");
        n += 1;
        bytes += cap;
    }
    (n, bytes)
}

/// (ssrc, packets, lost) of every RTP stream tshark finds.
fn tshark_rtp_streams(pcap: &Path) -> Vec<(u32, u64, i64)> {
    need("tshark");
    let out = run(Command::new("tshark").arg("-r").arg(pcap).args([
        "-q",
        "-o",
        "rtp.heuristic_rtp:TRUE",
        "-z",
        "rtp,streams",
    ]));
    let mut v = Vec::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = cols.iter().position(|c| c.starts_with("0x")) else {
            continue;
        };
        // ... SSRC Payload Pkts Lost ... ; Lost is "N (x%)".
        let ssrc = u32::from_str_radix(cols[i].trim_start_matches("0x"), 16).expect("ssrc");
        let nums: Vec<&str> = cols[i + 1..].to_vec();
        let pkts_at = nums
            .iter()
            .position(|c| c.parse::<u64>().is_ok())
            .expect("packet column");
        let pkts = nums[pkts_at].parse().unwrap();
        let lost = nums[pkts_at + 1].parse().expect("lost column");
        v.push((ssrc, pkts, lost));
    }
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn packets_ahead_of_their_started_event_are_held_then_written() {
    let dir = TempDir::new("ahead");
    let (h, mut sink) = start_writer(dir.path());
    // Capture drained the call's first packets before signaling's Started reached the writer.
    let mut a = Sender::new(1, 40000, 0, 0x2222, 1, 0);
    let sig = tone(440.0, 8000.0);
    for k in 0..5 {
        a.send(&mut sink, k * 160, 0, &sig);
    }
    // A packet of a flow newer than any routed, whose session never starts.
    let (f, off) = udp_frame(41000, &rtp(0, 1, 0, 0x3333, &[0xff; 160]));
    feed(&mut sink, 99, at_ms(10), &f, off);
    h.event(started("r1", two_streams(), "uuid-ahead"));
    for k in 5..10 {
        a.send(&mut sink, k * 160, 0, &sig);
    }
    h.event(ended("r1", 1000));
    h.sync();
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(
        m.streams[0].packets, 10,
        "held packets written once the flow was routed"
    );
    assert_eq!(m.streams[0].lost, 0);
    assert_eq!(h.stats().unknown_flow, 0, "flow 99 is still held");
    // Held by the sink (several shards: its shard is not known yet) or its shard.
    drop(sink);
    let stats = h.shutdown();
    assert_eq!(stats.unknown_flow, 1, "never routed: counted at shutdown");
}

#[test]
fn packets_routed_by_flow_rtcp_to_pcap_only_late_packets_counted() {
    let dir = TempDir::new("route");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    let mut a = Sender::new(1, 40000, 0, 0x1111, 1, 0);
    let sig = tone(440.0, 8000.0);
    for k in 0..10 {
        a.send(&mut sink, k * 160, 0, &sig);
    }
    // RTCP on its own flow, and a frame for a flow nobody owns.
    let (f, off) = udp_frame(40001, &[0x81, 200, 0, 6, 0, 0, 0x11, 0x11, 0, 0, 0, 0]);
    feed(&mut sink, 1001, at_ms(100), &f, off);
    feed(&mut sink, 77, at_ms(100), &f, off);
    h.event(ended("r1", 1000));
    // After Ended: late.
    a.send(&mut sink, 1600, 0, &sig);
    h.sync();
    let st = h.stats();
    assert_eq!(st.unknown_flow, 2);
    assert_eq!(st.completed_recordings, 1);
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.state, RecordingState::Complete);
    assert_eq!(m.end_reason.as_deref(), Some("bye"));
    assert_eq!(m.streams[0].packets, 10);
    assert_eq!(m.streams[0].rtcp_packets, 1);
    assert_eq!(m.streams[0].ssrcs[0].ssrc, 0x1111);
    assert_eq!(m.streams[1].packets, 0);
    assert_eq!(m.metadata_versions[0].file, "metadata-1.xml");
    let xml = std::fs::read_to_string(dir.path().join("r1/metadata-1.xml")).unwrap();
    assert!(xml.contains("recording"));
    // 10 RTP + 1 RTCP records: header 24 + 11 * 16 + frame bytes.
    let pcap_len = std::fs::metadata(dir.path().join("r1").join(PCAP_FILE))
        .unwrap()
        .len();
    assert_eq!(pcap_len, 24 + 10 * (16 + 42 + 172) + 16 + 42 + 12);
    h.shutdown();
}

#[test]
fn ending_a_recording_keeps_the_routes_another_took_over() {
    let dir = TempDir::new("reroute");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    // r2 takes flow 2 over (a flow id reused: last one wins) and has flow 3 of its own.
    h.event(started(
        "r2",
        vec![
            stream(0, "caller", 2, "PCMA", 8, 40002),
            stream(1, "callee", 3, "PCMU", 0, 40004),
        ],
        "uuid-2",
    ));
    h.event(ended("r1", 500));
    let mut b = Sender::new(2, 40002, 8, 0x2222, 1, 0);
    let mut c = Sender::new(3, 40004, 0, 0x3333, 1, 0);
    let sig = tone(440.0, 8000.0);
    for k in 0..5 {
        b.send(&mut sink, k * 160, 0, &sig);
        c.send(&mut sink, k * 160, 0, &sig);
    }
    h.sync();
    assert_eq!(h.stats().unknown_flow, 0, "r1's end left r2's routes alone");
    h.event(ended("r2", 1000));
    b.send(&mut sink, 5 * 160, 0, &sig);
    c.send(&mut sink, 5 * 160, 0, &sig);
    h.sync();
    assert_eq!(
        h.stats().unknown_flow,
        2,
        "r2's end removed both of its routes"
    );
    let m = RecordingMetadata::read(&dir.path().join("r2")).unwrap();
    assert_eq!(m.streams[0].packets, 5);
    assert_eq!(m.streams[1].packets, 5);
    h.shutdown();
}

#[test]
fn tool_reinvite_keeps_the_recording_and_channels_metadata_versions_are_kept() {
    let dir = TempDir::new("reinvite");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    h.event(started(
        "other",
        vec![stream(0, "x", 50, "PCMU", 0, 41000)],
        "uuid-2",
    ));
    let sig = tone(440.0, 8000.0);
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut o = Sender::new(50, 41000, 0, 0x0, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &sig);
        o.send(&mut sink, k * 160, 0, &sig);
    }
    // Re-INVITE at 1 s: the caller's stream moves to a new flow (new port), the callee's is
    // removed; a transfer brings new metadata and a new participant.
    let mut streams = vec![stream(0, "caller", 11, "PCMU", 0, 40010)];
    streams[0].rtcp_flow_id = None;
    h.event(SessionEvent::MediaChanged {
        id: "r1".into(),
        at: at_ms(1000),
        streams,
    });
    h.event(SessionEvent::ParticipantsChanged {
        id: "r1".into(),
        at: at_ms(1000),
        participants: vec![Participant {
            id: "p2".into(),
            name: Some("Bob".into()),
            aor: Some("sip:bob@example.com".into()),
            ..Default::default()
        }],
        metadata: Some(MetadataVersion {
            version: 2,
            received_at: at_ms(1000),
            method: "UPDATE".into(),
            xml: "<recording>v2</recording>".into(),
        }),
        ids: CallIds {
            sip_call_id: String::new(),
            connection_id: Some("conn-2".into()),
            ..Default::default()
        },
    });
    let mut a2 = Sender::new(11, 40010, 0, 0xA2, 1, 0);
    for k in 50..100 {
        a2.send(&mut sink, k * 160, 0, &sig);
        o.send(&mut sink, k * 160, 0, &sig);
    }
    a.send(&mut sink, 100 * 160, 0, &sig); // old flow: no longer routed
                                           // Packets during a pause are kept in the pcap only.
    h.event(SessionEvent::Paused {
        id: "r1".into(),
        at: at_ms(2000),
        label: "caller".into(),
    });
    for k in 100..110 {
        a2.send(&mut sink, k * 160, 0, &sig);
    }
    h.event(ended("r1", 3000));
    h.event(ended("other", 3000));
    h.sync();
    assert_eq!(h.stats().unknown_flow, 1);
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.streams[0].packets, 110);
    assert_eq!(m.streams[0].local_port, 40010);
    assert_eq!(m.streams[0].ssrcs.len(), 2);
    assert!(m.streams[1].removed_at.is_some());
    assert_eq!(m.dropped.while_paused, 10);
    assert_eq!(m.streams[0].paused.len(), 1);
    assert_eq!(m.participants[0].name.as_deref(), Some("Bob"));
    assert_eq!(
        m.call_uuid.as_deref(),
        Some("uuid-1"),
        "kept when a later message omits it"
    );
    assert_eq!(m.connection_id.as_deref(), Some("conn-2"));
    let files: Vec<_> = m
        .metadata_versions
        .iter()
        .map(|v| (v.version, v.method.as_str(), v.file.as_str()))
        .collect();
    assert_eq!(
        files,
        [
            (1, "INVITE", "metadata-1.xml"),
            (2, "UPDATE", "metadata-2.xml")
        ]
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("r1/metadata-2.xml")).unwrap(),
        "<recording>v2</recording>"
    );
    // Both flows landed on the caller's channel, seamlessly; the pause is silent.
    let (_, _, c) = read_wav(&dir.path().join("r1").join(WAV_FILE));
    let ul = |n: u64| g711::ulaw(encode::ulaw(sig(n)));
    assert_eq!(measured_offset(&c[0], 0, 16_000, ul), Some(0));
    assert_eq!(rms(&c[0][16_000..]), 0.0);
    // The other recording only has its own packets.
    let other = RecordingMetadata::read(&dir.path().join("other")).unwrap();
    assert_eq!(other.streams[0].packets, 100);
    assert_eq!(
        tshark_count_bytes(&dir.path().join("other").join(PCAP_FILE)).0,
        100
    );
    h.shutdown();
}

/// A sink with its shards' unread queues (receivers and bounds) and its router.
type BareSink = (
    WriterSink,
    Vec<std::sync::mpsc::Receiver<shard::Msg>>,
    Vec<Arc<ShardQueue>>,
    Arc<Router>,
);

/// A sink over `shards` queues of `capacity` packets that nobody reads (their receivers are
/// returned), routing by the router it returns.
fn bare_sink(shards: usize, capacity: usize) -> BareSink {
    let room = Arc::new(Room::default());
    let router = Arc::new(Router::default());
    let (mut links, mut rxs, mut queues) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..shards {
        let (tx, rx) = std::sync::mpsc::channel();
        let q = Arc::new(ShardQueue::new(capacity, room.clone()));
        links.push((tx, q.clone()));
        rxs.push(rx);
        queues.push(q);
    }
    let sink = WriterSink {
        shards: links,
        shared: Arc::new(Shared::default()),
        router: router.clone(),
        room,
        routes: Default::default(),
        max_routed: 0,
        batches: (0..shards).map(|_| PacketBatch::default()).collect(),
        pending: Default::default(),
        packets_in: 0,
    };
    (sink, rxs, queues, router)
}

fn batch_lens(rx: &std::sync::mpsc::Receiver<shard::Msg>) -> Vec<usize> {
    rx.try_iter()
        .filter_map(|m| match m {
            shard::Msg::Packets(b) => Some(b.len()),
            _ => None,
        })
        .collect()
}

#[test]
fn sink_at_its_bound_has_no_room_and_waits_instead_of_dropping() {
    // A shard that does not read: at its bound the sink says so, and a packet pushed anyway
    // waits until the shard has worked through its queue. Nothing is dropped.
    let (mut sink, rxs, queues, _) = bare_sink(1, 3);
    let (f, off) = udp_frame(40000, &rtp(0, 1, 0, 1, &[0xff; 160]));
    for _ in 0..3 {
        assert!(sink.has_room());
        feed_batched(&mut sink, 9, at_ms(0), &f, off);
    }
    assert!(!sink.has_room(), "3 packets queued or held: at the bound");
    sink.batch_end();
    assert!(!sink.has_room());
    assert_eq!(batch_lens(&rxs[0]), vec![3], "one batch per drain");
    let queue = queues[0].clone();
    let shard = std::thread::spawn(move || {
        // The shard works through its queue a moment later.
        std::thread::sleep(Duration::from_millis(100));
        queue.done(3);
    });
    let waited = std::time::Instant::now();
    feed(&mut sink, 9, at_ms(20), &f, off);
    assert!(
        waited.elapsed() >= Duration::from_millis(50),
        "waited for room"
    );
    shard.join().unwrap();
    sink.batch_end();
    assert_eq!(batch_lens(&rxs[0]), vec![1]);
    assert_eq!(sink.shared.packets_in.load(Relaxed), 4);
    assert_eq!(sink.shared.unknown_flow.load(Relaxed), 0);
}

#[test]
fn sink_routes_each_recordings_flows_to_its_shard_and_holds_unrouted_ones() {
    let (mut sink, rxs, _, router) = bare_sink(4, 1000);
    let (f, off) = udp_frame(40000, &rtp(0, 1, 0, 1, &[0xff; 160]));
    router.set([1, 2], Some(2));
    router.set([3, 4], Some(1));
    for flow in [1, 3, 2, 4, 7] {
        feed_batched(&mut sink, flow, at_ms(0), &f, off);
    }
    sink.batch_end();
    let lens: Vec<Vec<usize>> = rxs.iter().map(batch_lens).collect();
    assert_eq!(
        lens,
        vec![vec![], vec![2], vec![2], vec![]],
        "flow 7 is held"
    );
    // Its route arrives: it goes out with the next batch.
    router.set([7], Some(3));
    feed_batched(&mut sink, 1, at_ms(20), &f, off);
    sink.batch_end();
    let lens: Vec<Vec<usize>> = rxs.iter().map(batch_lens).collect();
    assert_eq!(lens, vec![vec![], vec![], vec![1], vec![1]]);
}

/// One deterministic capture of many calls: events and packets (with reordering, a loss, a
/// duplicate, an SSRC change, a re-INVITE and late audio), fed to a writer of `shards` shards
/// in drains of 37 packets. Returns every recording's pcap and WAV bytes.
fn record_calls(shards: usize) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let dir = TempDir::new(&format!("shards{shards}"));
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.host = "t".into();
    c.shards = shards;
    // Small bounds: back-pressure (the sink waiting) happens during the run too.
    c.queue_packets = 600;
    c.file_queue_bytes = 256 * 1024;
    let (h, mut sink) = start(c).unwrap();
    let calls = 24u64;
    let ids: Vec<String> = (0..calls).map(|k| format!("call{k:02}")).collect();
    let mut senders: Vec<[Sender; 2]> = Vec::new();
    for k in 0..calls {
        let (fa, fb) = (2 * k + 1, 2 * k + 2);
        let port = 40000 + 4 * k as u16;
        let mut ev = started(
            &ids[k as usize],
            vec![
                stream(0, "caller", fa, "PCMU", 0, port),
                stream(1, "callee", fb, "PCMA", 8, port + 2),
            ],
            &format!("uuid-{k}"),
        );
        if let SessionEvent::Started { at, .. } = &mut ev {
            *at = at_ms(k as i64 * 7);
        }
        h.event(ev);
        senders.push([
            Sender::new(fa, port, 0, 0x1000 + k as u32, 1, 0),
            Sender::new(fb, port + 2, 8, 0x2000 + k as u32, 1, 0),
        ]);
    }
    let mut in_drain = 0;
    let mut held: Option<(u64, SystemTime, Vec<u8>, u16)> = None;
    for round in 0..300u64 {
        if round == 150 {
            // A re-INVITE of call03 moves its callee to a new flow id (a transfer).
            h.event(SessionEvent::MediaChanged {
                id: ids[3].clone(),
                at: at_ms(3000),
                streams: vec![
                    stream(0, "caller", 7, "PCMU", 0, 40012),
                    stream(1, "callee", 1000, "PCMA", 8, 40100),
                ],
            });
            senders[3][1] = Sender::new(1000, 40100, 8, 0x7777, 500, 99);
        }
        for (k, pair) in senders.iter_mut().enumerate() {
            if round >= 250 && k % 5 == 0 {
                continue; // these calls ended at round 250
            }
            for (i, s) in pair.iter_mut().enumerate() {
                if round == 100 && k == 1 && i == 0 {
                    s.ssrc = 0xABCD; // a new SSRC mid-call
                }
                let n = round * 160;
                let (f, off) = s.frame(n, &noise);
                if round == 40 && k == 2 && i == 1 {
                    continue; // lost
                }
                let wall = at_ms((n / 8) as i64 + (k as i64 % 3));
                if round % 13 == 5 && k == 4 && i == 0 {
                    held = Some((s.flow_id, wall, f, off)); // arrives after the next one
                    continue;
                }
                feed_batched(&mut sink, s.flow_id, wall, &f, off);
                if round == 60 && k == 6 {
                    feed_batched(&mut sink, s.flow_id, wall, &f, off); // duplicate
                }
                if k == 4 && i == 1 {
                    if let Some((flow, w, f, off)) = held.take() {
                        feed_batched(&mut sink, flow, w + Duration::from_millis(5), &f, off);
                    }
                }
                in_drain += 1;
                if in_drain == 37 {
                    sink.batch_end();
                    in_drain = 0;
                }
            }
        }
        if round == 249 {
            sink.batch_end();
            for k in (0..calls as usize).step_by(5) {
                h.event(ended(&ids[k], 5000));
            }
        }
    }
    sink.batch_end();
    for (k, id) in ids.iter().enumerate() {
        if k % 5 != 0 {
            h.event(ended(id, 6100));
        }
    }
    h.sync();
    assert_eq!(h.stats().shards, shards as u64);
    assert_eq!(h.stats().completed_recordings, calls);
    h.shutdown();
    ids.iter()
        .map(|id| {
            let rec = dir.path().join(id);
            (
                id.clone(),
                std::fs::read(rec.join(PCAP_FILE)).unwrap(),
                std::fs::read(rec.join(WAV_FILE)).unwrap(),
            )
        })
        .collect()
}

#[test]
fn four_shards_write_the_same_files_as_one() {
    let one = record_calls(1);
    let four = record_calls(4);
    assert_eq!(one.len(), four.len());
    for ((id, pcap1, wav1), (_, pcap4, wav4)) in one.iter().zip(&four) {
        assert!(
            pcap1.len() > 24 + 200 * 230,
            "{id}: pcap of {} bytes",
            pcap1.len()
        );
        assert!(
            wav1.len() > 44 + 4 * 8000 * 4,
            "{id}: wav of {} bytes",
            wav1.len()
        );
        assert!(
            pcap1 == pcap4,
            "{id}: pcap differs ({} vs {} bytes)",
            pcap1.len(),
            pcap4.len()
        );
        assert!(
            wav1 == wav4,
            "{id}: wav differs ({} vs {} bytes)",
            wav1.len(),
            wav4.len()
        );
    }
}

#[test]
fn sink_sends_batches_at_batch_end_when_full_and_on_drop() {
    let (mut sink, rxs, _, _) = bare_sink(1, 100_000);
    let rx = &rxs[0];
    let frames: Vec<(Vec<u8>, u16)> = (0..3u16)
        .map(|k| udp_frame(40000, &rtp(0, k, 0, 1, &vec![k as u8; 10 + k as usize])))
        .collect();
    let n = BATCH_PACKETS + 2;
    for i in 0..n {
        let (f, off) = &frames[i % 3];
        feed_batched(&mut sink, i as u64, at_ms(i as i64), f, *off);
    }
    assert_eq!(
        batch_lens(rx),
        vec![BATCH_PACKETS],
        "a full batch leaves at once"
    );
    sink.batch_end();
    let msgs: Vec<shard::Msg> = rx.try_iter().collect();
    let Some(shard::Msg::Packets(last)) = msgs.first() else {
        panic!("the rest leaves at batch_end");
    };
    // Frames come back whole and in order, with their headers and times.
    let got: Vec<(u64, SystemTime, Vec<u8>)> = last
        .iter()
        .map(|p| (p.header.flow_id, p.wall, p.frame.to_vec()))
        .collect();
    let want: Vec<(u64, SystemTime, Vec<u8>)> = (BATCH_PACKETS..n)
        .map(|i| (i as u64, at_ms(i as i64), frames[i % 3].0.clone()))
        .collect();
    assert_eq!(got, want);
    let shared = sink.shared.clone();
    assert_eq!(shared.packets_in.load(Relaxed), n as u64);
    feed_batched(&mut sink, 1, at_ms(0), &frames[0].0, frames[0].1);
    drop(sink);
    assert_eq!(
        batch_lens(rx),
        vec![1],
        "dropping the sink sends what it held"
    );
}

#[test]
fn tool_tshark_reads_pcap_with_exact_count_bytes_and_no_loss() {
    let dir = TempDir::new("tshark");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    let mut a = Sender::new(1, 40000, 0, 0xA1A1, 100, 5000);
    let mut b = Sender::new(2, 40002, 8, 0xB2B2, 65500, 77);
    let (mut n, mut bytes) = (0u64, 0u64);
    for k in 0..150u64 {
        for s in [&mut a, &mut b] {
            let (f, off) = s.frame(k * 160, &noise);
            feed(&mut sink, s.flow_id, at_ms((k * 20) as i64), &f, off);
            n += 1;
            bytes += f.len() as u64;
        }
    }
    h.event(ended("r1", 3000));
    h.sync();
    let pcap = dir.path().join("r1").join(PCAP_FILE);
    assert_eq!(tshark_count_bytes(&pcap), (n, bytes));
    let streams = tshark_rtp_streams(&pcap);
    assert_eq!(streams, vec![(0xA1A1, 150, 0), (0xB2B2, 150, 0)]);
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.streams[0].lost + m.streams[1].lost, 0);
    assert_eq!(m.streams[1].bytes, bytes / 2);
    h.shutdown();
}

#[test]
fn tool_tshark_reports_the_loss_the_test_made() {
    let dir = TempDir::new("loss");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    let mut a = Sender::new(1, 40000, 0, 0xA1A1, 65530, 0);
    let dropped = [3u64, 4, 10, 50, 51, 52, 99];
    let mut sent = 0;
    for k in 0..100u64 {
        let (f, off) = a.frame(k * 160, &noise);
        if !dropped.contains(&k) {
            feed(&mut sink, 1, at_ms((k * 20) as i64), &f, off);
            sent += 1;
        }
    }
    // The last packet is lost too: tshark (like RFC 3550) cannot see loss after the last one.
    let seen_loss = dropped.len() as i64 - 1;
    h.event(ended("r1", 2000));
    h.sync();
    let pcap = dir.path().join("r1").join(PCAP_FILE);
    assert_eq!(tshark_count_bytes(&pcap).0, sent);
    assert_eq!(tshark_rtp_streams(&pcap), vec![(0xA1A1, sent, seen_loss)]);
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.streams[0].lost as i64, seen_loss);
    h.shutdown();
}

#[test]
fn tool_wav_tones_on_the_right_channels_at_the_right_times() {
    let dir = TempDir::new("tones");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    let mut a = Sender::new(1, 40000, 0, 0x1, 1, 1234);
    let mut b = Sender::new(2, 40002, 8, 0x2, 1, 999_999);
    let (ta, tb) = (tone(440.0, 10000.0), tone(1000.0, 10000.0));
    // Caller (PCMU 440 Hz) talks 0-3 s; callee (PCMA 1000 Hz) starts 1 s late, talks to 4 s.
    // Arrival jitter up to 15 ms and reordering inside pairs must not matter.
    for k in 0..200u64 {
        let j = (k % 4) as i64 * 5;
        if k < 150 {
            a.send(&mut sink, k * 160, j, &ta);
        }
        if k >= 50 {
            b.send(&mut sink, k * 160, 15 - j, &tb);
        }
    }
    h.event(ended("r1", 5000));
    h.sync();
    let wav = dir.path().join("r1").join(WAV_FILE);
    let (ch, rate, c) = read_wav(&wav);
    assert_eq!((ch, rate), (2, 8000));
    assert_eq!(c[0].len(), 40000, "WAV covers the whole 5 s call");
    let sec = |x: &[i16], from: f64, to: f64| {
        x[(from * 8000.0) as usize..(to * 8000.0) as usize].to_vec()
    };
    // Left: 440 Hz from 0 to 3 s, silence after.
    let l = sec(&c[0], 0.1, 0.9);
    assert!(goertzel(&l, 440.0) > 100.0 * goertzel(&l, 1000.0));
    assert!(rms(&l) > 5000.0);
    // Edges are exact to within one packet (20 ms): the anchoring packet's arrival jitter.
    assert_eq!(rms(&sec(&c[0], 3.02, 5.0)), 0.0);
    // Right: silence for the first second, 1000 Hz from 1 to 4 s.
    assert_eq!(rms(&sec(&c[1], 0.0, 0.98)), 0.0);
    let r = sec(&c[1], 1.1, 3.9);
    assert!(goertzel(&r, 1000.0) > 100.0 * goertzel(&r, 440.0));
    assert!(rms(&r) > 5000.0);
    assert_eq!(rms(&sec(&c[1], 4.02, 5.0)), 0.0);
    // Sample values: the decoded G.711 of the tone at its time. The left stream's first packet
    // arrived on time (exact); the right one's 5 ms late, which may shift it by < 1 packet.
    let ul = |n: u64| g711::ulaw(encode::ulaw(ta(n)));
    let al = |n: u64| g711::alaw(encode::alaw(tb(n)));
    assert_eq!(measured_offset(&c[0], 100, 23_000, ul), Some(0));
    let r_off = measured_offset(&c[1], 8_500, 31_000, al).expect("right carries the 1000 Hz tone");
    assert!(r_off.abs() < 160, "right offset {r_off}");
    // soxi agrees with the header.
    need("soxi");
    let soxi = |flag: &str| {
        run(Command::new("soxi").arg(flag).arg(&wav))
            .trim()
            .to_string()
    };
    assert_eq!(soxi("-c"), "2");
    assert_eq!(soxi("-r"), "8000");
    assert_eq!(soxi("-s"), "40000");
    assert_eq!(soxi("-b"), "16");
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.wav.channels, vec!["caller", "callee"]);
    assert_eq!(m.wav.frames, 40000);
    h.shutdown();
}

/// Offset (in samples) between a channel and the call's time over `[from, to)` samples: the
/// shift `k` for which the channel equals `expected(n + k)` (a signal of absolute time). None if
/// no shift in +-400 matches.
fn measured_offset(
    x: &[i16],
    from: usize,
    to: usize,
    expected: impl Fn(u64) -> i16,
) -> Option<i64> {
    // Smallest shift first (a periodic tone also matches at whole periods).
    (0i64..=400).flat_map(|k| [k, -k]).find(|&k| {
        (from..to).all(|n| {
            let t = n as i64 + k;
            t >= 0 && x[n] == expected(t as u64)
        })
    })
}

#[test]
fn tool_pause_and_ssrc_change_keep_channels_aligned() {
    let dir = TempDir::new("align");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "uuid-1"));
    // Caller: one SSRC for 8 s, but paused 2-4 s (its timestamps keep running, RFC 3550).
    // Callee: SSRC X for 0-3 s, then after a 2 s gap a new SSRC with unrelated seq/timestamps
    // (a transfer to a new device) from 5 to 8 s.
    let mut a = Sender::new(1, 40000, 0, 0xAAAA, 10, 4_000_000_000);
    let mut b1 = Sender::new(2, 40002, 8, 0xB1, 500, 123);
    let mut b2 = Sender::new(2, 40002, 8, 0xB2, 40000, 3_000_000);
    for k in 0..400u64 {
        let n = k * 160;
        let j = ((k * 7) % 13) as i64; // up to 12 ms late
        if k == 100 {
            h.event(SessionEvent::Paused {
                id: "r1".into(),
                at: at_ms(2000),
                label: "caller".into(),
            });
        }
        if k == 200 {
            h.event(SessionEvent::Resumed {
                id: "r1".into(),
                at: at_ms(4000),
                label: "caller".into(),
            });
        }
        if !(100..200).contains(&k) {
            a.send(&mut sink, n, j, &noise);
        }
        if k < 150 {
            b1.send(&mut sink, n, 12 - j, &noise);
        } else if k >= 250 {
            b2.send(&mut sink, n, 12 - j, &noise);
        }
    }
    h.event(ended("r1", 8000));
    h.sync();
    let (_, _, c) = read_wav(&dir.path().join("r1").join(WAV_FILE));
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    let al = |n: u64| g711::alaw(encode::alaw(noise(n)));
    let packet = 160;
    let segs = [
        (
            0,
            measured_offset(&c[0], 1000, 15000, ul),
            measured_offset(&c[1], 1000, 23000, al),
        ),
        (
            1,
            measured_offset(&c[0], 33000, 63000, ul),
            measured_offset(&c[1], 41000, 63000, al),
        ),
    ];
    for (seg, l, r) in segs {
        let (l, r) = (
            l.expect("left matches the call's audio"),
            r.expect("right matches"),
        );
        assert!(
            l.abs() < packet && r.abs() < packet,
            "segment {seg}: offsets {l} {r}"
        );
        assert!(
            (l - r).abs() < packet,
            "segment {seg}: channels apart by {}",
            l - r
        );
    }
    // Paused and gap spans are silence (give or take the one packet of anchoring jitter).
    assert_eq!(
        rms(&c[0][16000 + packet as usize..32000 - packet as usize]),
        0.0
    );
    assert_eq!(
        rms(&c[1][24000 + packet as usize..40000 - packet as usize]),
        0.0
    );
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(m.streams[0].paused.len(), 1);
    assert!(m.streams[0].paused[0].to.is_some());
    assert_eq!(
        m.streams[1]
            .ssrcs
            .iter()
            .map(|s| s.ssrc)
            .collect::<Vec<_>>(),
        vec![0xB1, 0xB2]
    );
    assert_eq!(m.streams[1].lost, 0);
    h.shutdown();
}

#[test]
fn tool_recording_without_rtp_gets_its_files() {
    let dir = TempDir::new("nortp");
    let (h, _sink) = start_writer(dir.path());
    h.event(started("quiet", two_streams(), "uuid-q"));
    h.event(ended("quiet", 3000));
    h.sync();
    let rec = dir.path().join("quiet");
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (0, 0));
    let (ch, _, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!((ch, c[0].len()), (2, 24000));
    assert_eq!(rms(&c[0]) + rms(&c[1]), 0.0);
    need("soxi");
    assert_eq!(
        run(Command::new("soxi").arg("-s").arg(rec.join(WAV_FILE))).trim(),
        "24000"
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert!(!m.media_received);
    assert!(m.notes.iter().any(|n| n == "no media arrived"));
    assert_eq!(m.ended_at.as_deref(), Some("2023-11-14T22:13:23Z"));
    h.shutdown();
}

#[test]
fn undecodable_streams_are_kept_in_pcap_and_said_so() {
    let dir = TempDir::new("amr");
    let (h, mut sink) = start_writer(dir.path());
    let mut s = two_streams();
    s[1].codec = Codec {
        payload_type: 111,
        name: "AMR".into(),
        clock_rate: 8000,
        channels: 1,
        fmtp: None,
    };
    h.event(started("r1", s, "u"));
    let (f, off) = udp_frame(40002, &rtp(111, 1, 0, 5, &[1, 2, 3]));
    feed(&mut sink, 2, at_ms(10), &f, off);
    h.event(ended("r1", 1000));
    h.sync();
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert!(!m.streams[1].decoded);
    assert!(m.streams[0].decoded);
    assert_eq!((m.streams[1].packets, m.dropped.not_decoded), (1, 1));
    assert!(m
        .notes
        .iter()
        .any(|n| n.contains("AMR") && n.contains("pcap only")));
    h.shutdown();
}

/// Writes a recording and abandons it without finishing, after its buffers reached the files (as
/// a crash would: WAV header sizes behind the data and `active` metadata left behind).
pub(crate) fn abandoned_recording(spool: &Path, packets: u64, flush_after: u64) -> u64 {
    let streams = two_streams();
    let ids = CallIds {
        sip_call_id: "c".into(),
        ..Default::default()
    };
    let mut rec = Recording::create(
        spool,
        Start {
            id: "crashed",
            at: t0(),
            ids: &ids,
            streams: &streams,
            participants: &[],
            metadata: None,
            host: "h",
            floor: 0,
            files: None,
        },
    )
    .unwrap();
    rec.write_metadata(t0());
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut bytes = 0;
    for k in 0..packets {
        let (f, off) = a.frame(k * 160, &noise);
        bytes += f.len() as u64;
        rec.packet(
            0,
            false,
            &owned(1, at_ms((k * 20) as i64), &f, off).as_captured(),
        );
        if k + 1 == flush_after {
            rec.flush(at_ms((k * 20) as i64));
        }
    }
    // What a crash keeps: what the file thread wrote (here: everything, WAV window included).
    rec.sync_media();
    std::mem::forget(rec);
    bytes
}

#[test]
fn audio_starting_late_holds_no_silence_in_memory() {
    // First audio 10 s after the start (a late or held-up stream): the 10 s before it are a
    // hole in the file, not 10 s of zeros per recording in memory (3 GB at 10 000 recordings).
    let dir = TempDir::new("late");
    let streams = two_streams();
    let ids = CallIds::default();
    let mut rec = Recording::create(
        dir.path(),
        Start {
            id: "late",
            at: t0(),
            ids: &ids,
            streams: &streams,
            participants: &[],
            metadata: None,
            host: "h",
            floor: 0,
            files: None,
        },
    )
    .unwrap();
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..100u64 {
        let n = 80_000 + k * 160;
        let (f, off) = a.frame(n, &noise);
        rec.packet(
            0,
            false,
            &owned(1, at_ms((n / 8) as i64), &f, off).as_captured(),
        );
        let held = rec.wav_window_frames();
        // The window behind the newest packet and the chunk being gathered, and the frames
        // of less than a page the last chunk left (chunks end on page boundaries), no more.
        let bound = (super::encode::wav::WINDOW_MS + super::encode::wav::CHUNK_MS) * 8 + 1024;
        assert!(held <= bound, "packet {k}: {held} frames held");
    }
    rec.finish(at_ms(12_000), "bye", None, &[], None);
    let (_, _, c) = read_wav(&dir.path().join("late").join(WAV_FILE));
    assert_eq!(c[0].len(), 96_000, "the WAV spans the whole call");
    assert!(
        c[0][..80_000].iter().all(|&x| x == 0),
        "silence before the audio"
    );
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 80_100, 95_000, ul), Some(0));
}

/// Two PCMU streams with rtcp-mux on flow ids `2k+1`, `2k+2` (unique per recording `k`).
fn mux_streams(k: u64) -> Vec<StreamInfo> {
    let mut a = stream(0, "caller", 2 * k + 1, "PCMU", 0, 40000);
    let mut b = stream(1, "callee", 2 * k + 2, "PCMU", 0, 40002);
    a.rtcp_flow_id = None;
    b.rtcp_flow_id = None;
    vec![a, b]
}

fn indexed_writer_config(dir: &Path) -> WriterConfig {
    let mut c = WriterConfig::new(dir.join("spool"));
    c.index = Some(dir.join("index.db"));
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.host = "test-host".into();
    c
}

mod disk_full;
mod fds;
mod flush;
mod handover;
mod measure;
mod repair;
mod srtp_codecs;
mod telephone_events;
