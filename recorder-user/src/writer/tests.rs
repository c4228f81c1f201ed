//! Writer tests on synthetic captured packets. Tests named `tool_*` shell out to tshark/soxi
//! (they fail with a clear message when the tool is missing); `tmpfs_*` mounts a tmpfs (root).

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
        assert!(held <= 8000 * 5 / 2, "packet {k}: {held} frames held");
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

#[test]
fn tool_crash_repair_keeps_everything_and_marks_interrupted() {
    let dir = TempDir::new("crash");
    let bytes = abandoned_recording(dir.path(), 300, 100);
    let rec = dir.path().join("crashed");
    // The metadata still has the counters of the flush at packet 100.
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().streams[0].packets,
        100
    );
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().state,
        RecordingState::Active
    );

    let repaired = repair_spool(dir.path()).unwrap();
    assert_eq!(repaired, vec!["crashed".to_string()]);
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (300, bytes));
    let (_, _, c) = read_wav(&rec.join(WAV_FILE));
    // All 300 packets (6 s) of audio are there, the last one included.
    assert_eq!(c[0].len(), 300 * 160);
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 47000, 48000, ul), Some(0));
    need("soxi");
    assert_eq!(
        run(Command::new("soxi").arg("-s").arg(rec.join(WAV_FILE))).trim(),
        "48000"
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.end_reason.as_deref(), Some("crash"));
    assert!(m.ended_at.is_some());
    // A second run finds nothing to do.
    assert!(repair_spool(dir.path()).unwrap().is_empty());
}

/// Set (to a spool path) in the child process of `tool_kill_9_then_repair`.
const CRASH_CHILD_ENV: &str = "RECORDER_WRITER_CRASH_CHILD_SPOOL";

/// The recorder side of `tool_kill_9_then_repair`: records 5 s of two streams, says READY with
/// what it sent, then waits to be killed. Does nothing unless started by that test.
#[test]
#[ignore = "child process of tool_kill_9_then_repair"]
fn crash_child() {
    let Ok(spool) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (h, mut sink) = start_writer(Path::new(&spool));
    h.event(started("killed", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 0);
    let (mut n, mut bytes) = (0u64, 0u64);
    for k in 0..250u64 {
        for s in [&mut a, &mut b] {
            let (f, off) = s.frame(k * 160, &noise);
            feed(&mut sink, s.flow_id, at_ms((k * 20) as i64), &f, off);
            n += 1;
            bytes += f.len() as u64;
        }
    }
    h.sync();
    println!("READY {n} {bytes}");
    loop {
        std::thread::park();
    }
}

#[test]
fn tool_kill_9_then_repair() {
    use std::io::BufRead;
    let dir = TempDir::new("kill9");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer::tests::crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the test binary as the recorder child");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("READY"));
    child.kill().expect("SIGKILL the child"); // Child::kill sends SIGKILL
    child.wait().unwrap();
    let ready = ready.expect("child reported READY");
    let mut it = ready
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().unwrap());
    let (n, bytes) = (it.next().unwrap(), it.next().unwrap());

    let rec = dir.path().join("killed");
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().state,
        RecordingState::Active
    );
    assert_eq!(
        repair_spool(dir.path()).unwrap(),
        vec!["killed".to_string()]
    );
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (n, bytes));
    assert_eq!(
        tshark_rtp_streams(&rec.join(PCAP_FILE)),
        vec![(0xA, 250, 0), (0xB, 250, 0)]
    );
    let (ch, _, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    // 5 s of audio on both channels (trailing samples that decode to 0 may be trimmed).
    assert!(
        (40000 - 160..=40000).contains(&c[0].len()),
        "{} frames",
        c[0].len()
    );
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    let al = |n: u64| g711::alaw(encode::alaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 100, 39000, ul), Some(0));
    assert_eq!(measured_offset(&c[1], 100, 39000, al), Some(0));
    need("soxi");
    let frames = run(Command::new("soxi").arg("-s").arg(rec.join(WAV_FILE)));
    assert_eq!(frames.trim(), c[0].len().to_string());
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.wav.frames, c[0].len() as u64);
}

/// A recording killed before its first metadata.json reached the disk: repair rebuilds one
/// from the pcap and the WAV, marks it interrupted, and the next writer indexes it.
/// Directories without a pcap or a WAV are not recordings and stay as they are.
#[test]
fn repair_rebuilds_metadata_never_written_and_the_writer_indexes_it() {
    let dir = TempDir::new("nometa");
    let mut config = indexed_writer_config(dir.path());
    std::fs::create_dir_all(&config.spool).unwrap();
    let bytes = abandoned_recording(&config.spool, 50, 0);
    let rec = config.spool.join("crashed");
    std::fs::remove_file(rec.join(METADATA_FILE)).unwrap();
    std::fs::create_dir(config.spool.join("empty")).unwrap();
    std::fs::create_dir(config.spool.join("other")).unwrap();
    std::fs::write(config.spool.join("other").join("notes.txt"), b"x").unwrap();
    // The index exists already and never got the recording's row (a new index is filled from
    // the spool, which would hide whether the writer indexes what repair rebuilt).
    drop(crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap());

    let repaired = repair_spool_except(&config.spool, &[]).unwrap();
    assert_eq!(
        repaired,
        vec![Repaired {
            id: "crashed".into(),
            local_ports: vec![40000],
            rebuilt: true,
        }]
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.id, "crashed");
    assert_eq!(m.state, RecordingState::Interrupted);
    assert_eq!(m.end_reason.as_deref(), Some("crash"));
    assert_eq!(
        m.started_at,
        metadata::rfc3339(at_ms(0)),
        "the first packet"
    );
    assert!(m.ended_at.is_some());
    assert_eq!(m.streams.len(), 1);
    let s = &m.streams[0];
    assert_eq!((s.local_port, s.packets, s.bytes), (40000, 50, bytes));
    assert_eq!((m.wav.sample_rate, m.wav.frames), (8000, 50 * 160));
    assert!(
        m.notes.iter().any(|n| n.contains("metadata rebuilt")),
        "{:?}",
        m.notes
    );
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)), (50, bytes));
    for other in ["empty", "other"] {
        assert!(!config.spool.join(other).join(METADATA_FILE).exists());
    }
    assert!(repair_spool_except(&config.spool, &[]).unwrap().is_empty());

    config.reindex = repaired.into_iter().map(|r| r.id).collect();
    let (h, _sink) = start(config.clone()).unwrap();
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("crashed").unwrap().unwrap().state, "interrupted");
    drop(h);
}

#[test]
fn repair_cuts_a_torn_pcap_record() {
    let dir = TempDir::new("torn");
    abandoned_recording(dir.path(), 10, 0);
    let pcap = dir.path().join("crashed").join(PCAP_FILE);
    let r = super::encode::pcap::repair(&pcap).unwrap();
    assert_eq!(r.records, 10);
    // Tear the last record: cut 5 bytes from its body.
    let f = std::fs::OpenOptions::new().write(true).open(&pcap).unwrap();
    f.set_len(r.new_len - 5).unwrap();
    let r2 = super::encode::pcap::repair(&pcap).unwrap();
    assert_eq!(r2.records, 9);
    assert_eq!(r2.new_len, r.new_len - (16 + 214));
}

#[test]
fn retention_deletes_oldest_finished_never_active() {
    let dir = TempDir::new("retention");
    let (h, _sink) = start_writer(dir.path());
    for (i, id) in ["old", "mid", "new"].iter().enumerate() {
        let mut ev = started(id, two_streams(), "u");
        if let SessionEvent::Started { at, .. } = &mut ev {
            *at = at_ms(i as i64 * 60_000);
        }
        h.event(ev);
        h.event(ended(id, i as i64 * 60_000 + 10_000));
    }
    // Started now: shutdown will end it now (not years after t0).
    h.event(started_at("live", SystemTime::now()));
    h.sync();
    let spool = dir.path();
    let size = |id: &str| super::retention::dir_size(&spool.join(id));
    let total: u64 = ["old", "mid", "new", "live"].iter().map(|i| size(i)).sum();
    // Room for everything but the oldest.
    let policy = RetentionPolicy {
        max_age: None,
        max_bytes: Some(total - size("old") + 1),
    };
    assert_eq!(
        enforce_retention(spool, policy, SystemTime::now()).unwrap(),
        vec!["old"]
    );
    // Age: everything finished is older than a minute; the live one stays.
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(60)),
        max_bytes: None,
    };
    assert_eq!(
        enforce_retention(spool, policy, SystemTime::now()).unwrap(),
        vec!["mid", "new"]
    );
    // Even a zero size limit never deletes an active recording.
    let policy = RetentionPolicy {
        max_age: None,
        max_bytes: Some(0),
    };
    assert!(enforce_retention(spool, policy, SystemTime::now())
        .unwrap()
        .is_empty());
    assert!(spool.join("live").join(METADATA_FILE).exists());
    h.shutdown();
}

#[test]
fn index_is_kept_by_the_writer_and_retention() {
    let dir = TempDir::new("windex");
    let spool = dir.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    c.retention_max_age = Some(Duration::from_secs(1));
    let (h, _sink) = start(c).unwrap();
    h.event(started("a", two_streams(), "U1"));
    h.sync();
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    let rows = index.by_call_uuid("U1").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "active");
    h.event(ended("a", 1000));
    h.sync();
    assert_eq!(index.by_call_uuid("U1").unwrap()[0].state, "complete");
    assert_eq!(h.enforce_retention().unwrap(), vec!["a"]);
    assert!(index.by_call_uuid("U1").unwrap().is_empty());
    h.shutdown();
}

/// A recording of a CallUUID already in the index is linked to its interaction (first id) and to
/// the latest earlier recording; a reused SIP Call-ID with another CallUUID links nothing.
#[test]
fn recordings_of_one_call_uuid_are_linked_and_a_reused_call_id_is_not() {
    let dir = TempDir::new("wlink");
    let spool = dir.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    let (h, _sink) = start(c).unwrap();
    let with = |id: &str, secs: u64, uuid: &str, call_id: &str| {
        let mut ev = started(id, two_streams(), uuid);
        if let SessionEvent::Started { at, ids, .. } = &mut ev {
            *at = t0() + Duration::from_secs(secs);
            ids.sip_call_id = call_id.into();
        }
        ev
    };
    h.event(with("first", 0, "U1", "same@sbc"));
    h.event(ended("first", 5_000));
    h.event(with("second", 10, "U1", "b@sbc"));
    h.event(ended("second", 15_000));
    // An unrelated session reusing the first one's Call-ID.
    h.event(with("unrelated", 20, "U2", "same@sbc"));
    h.event(with("third", 30, "U1", "c@sbc"));
    // The CallUUID of this one only arrives with metadata in a re-INVITE: linked then.
    let mut late = with("late", 40, "U1", "d@sbc");
    if let SessionEvent::Started { ids, .. } = &mut late {
        ids.call_uuid = None;
    }
    h.event(late);
    h.sync();
    assert_eq!(
        RecordingMetadata::read(&spool.join("late"))
            .unwrap()
            .interaction,
        None
    );
    h.event(SessionEvent::ParticipantsChanged {
        id: "late".into(),
        at: t0() + Duration::from_secs(41),
        participants: vec![],
        metadata: None,
        ids: CallIds {
            sip_call_id: "d@sbc".into(),
            call_uuid: Some("U1".into()),
            ..Default::default()
        },
    });
    h.sync();
    let meta = |id: &str| RecordingMetadata::read(&spool.join(id)).unwrap();
    assert_eq!(meta("first").interaction, None, "the first links nothing");
    assert_eq!(meta("second").interaction.as_deref(), Some("first"));
    assert_eq!(meta("second").previous.as_deref(), Some("first"));
    assert_eq!(meta("third").interaction.as_deref(), Some("first"));
    assert_eq!(meta("third").previous.as_deref(), Some("second"));
    assert_eq!(meta("unrelated").interaction, None);
    assert_eq!(meta("unrelated").previous, None);
    assert_eq!(meta("late").interaction.as_deref(), Some("first"));
    assert_eq!(meta("late").previous.as_deref(), Some("third"));
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    let rows = index.by_call_uuid("U1").unwrap();
    let links: Vec<(&str, Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.interaction.as_deref(),
                r.previous.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        links,
        vec![
            ("first", None, None),
            ("second", Some("first"), Some("first")),
            ("third", Some("first"), Some("second")),
            ("late", Some("first"), Some("third")),
        ]
    );
    assert_eq!(index.by_call_uuid("U2").unwrap().len(), 1);
    h.shutdown();
}

#[test]
fn shutdown_completes_active_recordings() {
    let dir = TempDir::new("shutdown");
    let (h, _sink) = start_writer(dir.path());
    h.event(started_at("r1", SystemTime::now()));
    let st = h.shutdown();
    assert_eq!((st.active_recordings, st.completed_recordings), (0, 1));
    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    assert_eq!(
        (m.state, m.end_reason.as_deref()),
        (RecordingState::Complete, Some("shutdown"))
    );
}

#[test]
fn bad_recording_id_is_refused_not_a_panic() {
    let dir = TempDir::new("badid");
    let (h, _sink) = start_writer(dir.path());
    h.event(started("../escape", two_streams(), "u"));
    h.sync();
    assert_eq!(h.stats().start_failed, 1);
    assert!(!dir.path().join("../escape").exists());
    h.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Disk full

/// A tmpfs mounted on a temp dir, unmounted on drop (also when the test panics).
/// The directory is made by the file thread, off the packet stage: when it cannot be made (here:
/// it exists, an earlier recording's), nothing of the earlier one is touched, and the new one's
/// packets are counted as not written, its index row removed at its end.
#[test]
fn a_recording_whose_directory_cannot_be_made_touches_nothing_and_is_counted() {
    let dir = TempDir::new("mkdir");
    let spool = dir.path().join("spool");
    let earlier = spool.join("r1");
    std::fs::create_dir_all(&earlier).unwrap();
    std::fs::write(earlier.join(PCAP_FILE), b"earlier pcap").unwrap();
    std::fs::write(earlier.join(METADATA_FILE), b"earlier metadata").unwrap();
    let mut c = WriterConfig::new(spool.clone());
    c.index = Some(dir.path().join("index.db"));
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    let (h, mut sink) = start(c).unwrap();
    h.event(started("r1", two_streams(), "U9"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    drop(sink);
    h.event(ended("r1", 1000));
    h.sync();
    let st = h.stats();
    assert_eq!(
        (st.start_failed, st.pcap_write_failed, st.unknown_flow),
        (1, 50, 0)
    );
    assert!(st.metadata_write_failed >= 1, "{st:?}");
    assert_eq!(
        std::fs::read(earlier.join(PCAP_FILE)).unwrap(),
        b"earlier pcap"
    );
    assert_eq!(
        std::fs::read(earlier.join(METADATA_FILE)).unwrap(),
        b"earlier metadata"
    );
    assert!(!earlier.join(WAV_FILE).exists());
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &spool).unwrap();
    assert!(index.by_call_uuid("U9").unwrap().is_empty());
    h.shutdown();
}

struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = TempDir::new("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn tmpfs_disk_full_refuses_new_sessions_and_corrupts_nothing() {
    let fs = Tmpfs::mount("1m");
    let spool = fs.0.path().join("spool");
    let mut c = WriterConfig::new(spool.clone());
    c.min_free_bytes = 200 * 1024;
    c.media_floor_bytes = 64 * 1024;
    c.host = "t".into();
    let (h, mut sink) = start(c).unwrap();
    assert!(h.can_accept_new_session());
    h.event(started("full", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 0);
    // ~2.2 MB of pcap (plus 32 kB/s of WAV): far more than the tmpfs holds.
    let mut sent = 0;
    for k in 0..5000u64 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
        sent += 2;
        if k % 500 == 0 {
            h.sync(); // keep the queue short (it is bounded)
        }
    }
    h.sync();
    assert!(
        !h.can_accept_new_session(),
        "free space below the threshold"
    );
    let st = h.stats();
    assert!(st.pcap_write_failed > 0, "{st:?}");
    h.event(ended("full", 100_000));
    h.sync();
    let rec = spool.join("full");
    let m = RecordingMetadata::read(&rec).expect("metadata.json intact");
    assert_eq!(m.state, RecordingState::Complete);
    assert!(m.dropped.pcap_write_failed > 0);
    let written = m.streams[0].packets + m.streams[1].packets;
    assert_eq!(written + m.dropped.pcap_write_failed, sent);
    // Whatever is in the files is whole and readable.
    assert_eq!(tshark_count_bytes(&rec.join(PCAP_FILE)).0, written);
    let (ch, _, _) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    need("soxi");
    run(Command::new("soxi").arg(rec.join(WAV_FILE)));
    h.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// The per-file cost at many live recordings: 20 000 files, each getting 32 KiB chunks round
/// robin: opened, appended and closed per chunk (the file threads before); kept open with one
/// `pwrite` per chunk (the file threads now); kept open with io_uring writes, 64 per
/// submission; and one mapping per file grown by `fallocate` (the writer before the file
/// threads: stores into the mapping, page faults and writeback instead of syscalls). Run with
/// `cargo test --release -p recorder-user --lib bench_file_io -- --ignored --nocapture`
/// (`BENCH_FILES=18000` where the hard descriptor limit is 20 000).
#[test]
#[ignore = "measurement, not a check"]
fn bench_file_io() {
    use std::{io::Write, os::fd::AsRawFd, time::Instant};
    let files: usize = std::env::var("BENCH_FILES").map_or(20_000, |v| v.parse().unwrap());
    // Two variants keep every file open (as the daemon under its unit's LimitNOFILE): the soft
    // limit goes to the hard one, and BENCH_FILES must fit under it (20 000 on the project
    // machines, so 18 000 there).
    // SAFETY: getrlimit/setrlimit on a valid struct; a failure shows up as EMFILE below.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    // Each variant writes less than the dirty limit (20 % of RAM here), after a sync: the
    // page cache, not the disk, is what the file threads see at these rates.
    let rounds = 4;
    let chunk = vec![0x5au8; 32 * 1024];
    let dir = TempDir::new("fileio");
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| dir.path().join(format!("f{i}")))
        .collect();
    for p in &paths {
        std::fs::write(p, [0u8; 24]).unwrap();
    }
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for p in &paths {
            let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&chunk).unwrap();
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    // What the file threads do now: descriptors kept open, one pwrite per chunk.
    let kept: Vec<(std::fs::File, u64)> = paths
        .iter()
        .map(|p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            (f, len)
        })
        .collect();
    let mut kept = kept;
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for (f, len) in &mut kept {
            std::os::unix::fs::FileExt::write_all_at(&*f, &chunk, *len).unwrap();
            *len += chunk.len() as u64;
        }
    }
    let pwrite_s = t.elapsed().as_secs_f64();
    // io_uring over the same kept descriptors: 64 writes per submission.
    let mut ring = io_uring::IoUring::new(256).unwrap();
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for batch in kept.chunks_mut(64) {
            for (i, (f, len)) in batch.iter().enumerate() {
                let sqe = io_uring::opcode::Write::new(
                    io_uring::types::Fd(f.as_raw_fd()),
                    chunk.as_ptr(),
                    chunk.len() as u32,
                )
                .offset(*len)
                .build()
                .user_data(i as u64);
                // SAFETY: `chunk` outlives the submission (waited for below).
                unsafe { ring.submission().push(&sqe).unwrap() };
            }
            ring.submit_and_wait(batch.len()).unwrap();
            for cqe in ring.completion() {
                assert_eq!(cqe.result(), chunk.len() as i32, "io_uring write");
            }
            for (_, len) in batch.iter_mut() {
                *len += chunk.len() as u64;
            }
        }
    }
    let uring_s = t.elapsed().as_secs_f64();
    drop(kept);
    let mmap_dir = TempDir::new("fileio-mmap");
    let mut maps: Vec<(std::fs::File, Option<memmap2::MmapMut>, u64)> = (0..files)
        .map(|i| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(mmap_dir.path().join(format!("f{i}")))
                .unwrap();
            (f, None, 0)
        })
        .collect();
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let t = Instant::now();
    for _ in 0..rounds {
        for (f, map, len) in &mut maps {
            let end = *len + chunk.len() as u64;
            if map.as_ref().is_none_or(|m| (m.len() as u64) < end) {
                // Grow in 64 KiB steps, as the previous writer's first steps did.
                let cap = end.div_ceil(65536) * 65536;
                // SAFETY: plain syscall on an open descriptor.
                unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, cap as libc::off_t) };
                *map = None;
                // SAFETY: the file is ours and not truncated while mapped.
                *map = Some(unsafe { memmap2::MmapMut::map_mut(&*f).unwrap() });
            }
            map.as_mut().unwrap()[*len as usize..end as usize].copy_from_slice(&chunk);
            *len = end;
        }
    }
    let mmap_s = t.elapsed().as_secs_f64();
    let mb = (files * rounds * chunk.len()) as f64 / 1e6;
    let per = |s: f64| s * 1e6 / (files * rounds) as f64;
    println!(
        "{files} files x {rounds} chunks of 32 KiB ({mb:.0} MB): open+write+close {write_s:.2} s \
         ({:.1} us per chunk, {:.0} MB/s); kept fd + pwrite {pwrite_s:.2} s ({:.1} us, {:.0} \
         MB/s); io_uring, kept fds, 64 per submit {uring_s:.2} s ({:.1} us, {:.0} MB/s); mmap \
         grown by fallocate {mmap_s:.2} s ({:.1} us per chunk, {:.0} MB/s)",
        per(write_s),
        mb / write_s,
        per(pwrite_s),
        mb / pwrite_s,
        per(uring_s),
        mb / uring_s,
        per(mmap_s),
        mb / mmap_s
    );
}

fn dtmf_frame(seq: u16, ts: u32, ssrc: u32, event: u8, end: bool, duration: u16) -> (Vec<u8>, u16) {
    let flags = if end { 0x80 } else { 0 } | 10; // volume -10 dBm0
    let d = duration.to_be_bytes();
    udp_frame(40000, &rtp(101, seq, ts, ssrc, &[event, flags, d[0], d[1]]))
}

#[test]
fn dtmf_events_are_listed_once_and_keep_the_audio_channel_silent() {
    let dir = TempDir::new("dtmf");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0x77, 1, 5000);
    let ta = tone(440.0, 10000.0);
    // 1 s of tone, then digit 5 (160 ms, end sent 3 times), then `#` (80 ms), then tone again.
    for k in 0..50u64 {
        a.send(&mut sink, k * 160, 0, &ta);
    }
    let mut seq = a.seq;
    let mut dtmf = |sink: &mut WriterSink, n: u64, event: u8, end: bool, dur: u16, ms: i64| {
        let (f, off) = dtmf_frame(seq, 5000 + n as u32, 0x77, event, end, dur);
        seq = seq.wrapping_add(1);
        feed(sink, 1, at_ms(ms), &f, off);
    };
    for (i, dur) in [160u16, 320, 480, 640, 800, 960, 1120]
        .into_iter()
        .enumerate()
    {
        dtmf(&mut sink, 8000, 5, false, dur, 1000 + 20 * i as i64);
    }
    for r in 0..3 {
        dtmf(&mut sink, 8000, 5, true, 1280, 1140 + 20 * r);
    }
    dtmf(&mut sink, 9600, 11, false, 320, 1200);
    for r in 0..3 {
        dtmf(&mut sink, 9600, 11, true, 640, 1240 + 20 * r);
    }
    // A payload too short to be an event.
    let (f, off) = udp_frame(40000, &rtp(101, seq, 5000 + 9600, 0x77, &[1, 2]));
    feed(&mut sink, 1, at_ms(1300), &f, off);
    a.seq = seq.wrapping_add(1);
    for k in 70..100u64 {
        a.send(&mut sink, k * 160, 0, &ta);
    }
    h.event(ended("r1", 2000));
    h.sync();

    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    let events = &m.streams[0].dtmf;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (
            events[0].digit.as_str(),
            events[0].event,
            events[0].duration_ms
        ),
        ("5", 5, 160)
    );
    assert!(events[0].ended);
    assert_eq!(events[0].offset_ms, 1000);
    assert_eq!(events[0].rtp_timestamp, 5000 + 8000);
    assert_eq!(events[0].volume, 10);
    assert_eq!(
        (
            events[1].digit.as_str(),
            events[1].duration_ms,
            events[1].ended
        ),
        ("#", 80, true)
    );
    assert_eq!(events[1].offset_ms, 1200);
    assert!(m.streams[1].dtmf.is_empty());
    assert_eq!(m.dropped.malformed, 1, "the short event payload");
    assert_eq!(m.dropped.not_decoded, 0, "events are not codec failures");
    assert_eq!(m.streams[0].packets, 50 + 14 + 1 + 30);

    // The WAV: tone before and after, silence while the digits were sent (1.0-1.4 s).
    let (_, _, c) = read_wav(&dir.path().join("r1").join(WAV_FILE));
    let part = |from: usize, to: usize| c[0][from..to].to_vec();
    assert!(rms(&part(800, 7900)) > 5000.0);
    assert_eq!(
        rms(&part(8000, 11_200)),
        0.0,
        "no audio decoded from events"
    );
    assert!(rms(&part(11_300, 15_900)) > 5000.0);
    h.shutdown();
}

#[test]
fn dtmf_digits_and_short_payloads() {
    let digits: Vec<String> = [0u8, 9, 10, 11, 12, 15, 16, 40]
        .into_iter()
        .map(dtmf::digit)
        .collect();
    assert_eq!(digits, ["0", "9", "*", "#", "A", "D", "flash", "event-40"]);
    assert_eq!(dtmf::parse(&[1, 2, 3]), None);
    let p = dtmf::parse(&[3, 0x8a, 0x01, 0x40, 0xff]).unwrap();
    assert_eq!((p.event, p.end, p.volume, p.duration), (3, true, 10, 320));
}

/// Two PCMU streams with rtcp-mux on flow ids `2k+1`, `2k+2` (unique per recording `k`).
fn mux_streams(k: u64) -> Vec<StreamInfo> {
    let mut a = stream(0, "caller", 2 * k + 1, "PCMU", 0, 40000);
    let mut b = stream(1, "callee", 2 * k + 2, "PCMU", 0, 40002);
    a.rtcp_flow_id = None;
    b.rtcp_flow_id = None;
    vec![a, b]
}

/// CPU seconds (user + system) of this process's threads named `name`.
/// CPU seconds of the calling thread (its own clock reads included: a few tens of ns).
fn own_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn thread_cpu(name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        // Fields after the comm: state is field 3; utime and stime are fields 14 and 15.
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tick;
    }
    total
}

/// Writer-thread CPU for many live recordings at G.711 rate. Run with `cargo test --release -p
/// recorder-user --lib bench_writer_cpu -- --ignored --nocapture`. Environment: BENCH_RECORDINGS
/// and BENCH_SECONDS (default 2000 x 10 s), BENCH_SPOOL (parent of the spool, e.g. /dev/shm to
/// take the disk out), BENCH_METADATA_INTERVAL_MS (2000 = the old rewrite-on-every-flush).
#[test]
#[ignore = "measurement, not a check"]
fn bench_writer_cpu() {
    use std::time::Instant;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("BENCH_RECORDINGS", 2000);
    let secs = env("BENCH_SECONDS", 10);
    let dir = match std::env::var("BENCH_SPOOL") {
        Ok(parent) => {
            let p = Path::new(&parent).join(format!("recorder-benchcpu-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        Err(_) => TempDir::new("benchcpu"),
    };
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    let interval_ms = env("BENCH_METADATA_INTERVAL_MS", 30_000);
    c.metadata_interval = Duration::from_millis(interval_ms);
    let (h, mut sink) = start(c).unwrap();
    let start_wall = SystemTime::now();
    for k in 0..n {
        let mut ev = started(&format!("r{k}"), mux_streams(k), "u");
        if let SessionEvent::Started { at, .. } = &mut ev {
            *at = start_wall;
        }
        h.event(ev);
    }
    h.sync();
    let cpu0 = thread_cpu("rec-shard");
    let files0 = thread_cpu("rec-files");
    let mut sink_cpu = 0.0;
    let t = Instant::now();
    let (mut frame, off) = udp_frame(40000, &rtp(0, 0, 0, 1, &[0xffu8; 160]));
    let payload = off as usize;
    let mut sent = 0u64;
    for tick in 0..secs * 50 {
        // One packet per recording (its caller stream) every 20 ms.
        let c0 = own_cpu();
        for k in 0..n {
            let seq = tick as u16;
            frame[payload + 2..payload + 4].copy_from_slice(&seq.to_be_bytes());
            frame[payload + 4..payload + 8].copy_from_slice(&((tick * 160) as u32).to_be_bytes());
            frame[payload + 8..payload + 12].copy_from_slice(&(k as u32).to_be_bytes());
            let wall = start_wall + Duration::from_millis(tick * 20);
            feed_batched(&mut sink, 2 * k + 1, wall, &frame, off);
            sent += 1;
        }
        sink.batch_end();
        sink_cpu += own_cpu() - c0;
        let due = Duration::from_millis((tick + 1) * 20);
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    h.sync();
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = thread_cpu("rec-shard") - cpu0;
    let files_cpu = thread_cpu("rec-files") - files0;
    let st = h.stats();
    let written = sent - st.pcap_write_failed;
    let lat = &st.write_latency;
    // Buckets are cumulative: index 6 is <= 1 ms.
    let slow = lat.count - lat.buckets[6];
    println!(
        "{n} recordings, metadata interval {interval_ms} ms, spool {}: {sent} packets in \
         {elapsed:.1} s ({:.0} pps); writer thread CPU {cpu:.2} s ({:.1}% of a core, {:.2} us \
         per written packet); sink (capture side, with building the frames) CPU {sink_cpu:.2} s ({:.2} us per packet); \
         file threads CPU {files_cpu:.2} s; not written {} ({:.1}%); packet writes > 1 ms: \
         {slow}, time in packet writes {:.2} s",
        dir.path().display(),
        sent as f64 / elapsed,
        100.0 * cpu / elapsed,
        cpu * 1e6 / written.max(1) as f64,
        sink_cpu * 1e6 / sent.max(1) as f64,
        st.pcap_write_failed,
        100.0 * st.pcap_write_failed as f64 / sent as f64,
        lat.sum_ns as f64 / 1e9,
    );
    h.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Handover (daemon restart without ending recordings)

/// (ssrc, seq) of every record of a pcap we wrote, in file order; checks the framing.
fn pcap_rtp_records(path: &Path) -> Vec<(u32, u16)> {
    let d = std::fs::read(path).expect("read pcap");
    assert_eq!(&d[0..4], &0xa1b2_3c4du32.to_le_bytes(), "our pcap magic");
    let mut at = 24;
    let mut out = Vec::new();
    while at < d.len() {
        let incl = u32::from_le_bytes(d[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &d[at + 16..at + 16 + incl];
        let rtp = &frame[42..];
        out.push((
            u32::from_be_bytes(rtp[8..12].try_into().unwrap()),
            u16::from_be_bytes([rtp[2], rtp[3]]),
        ));
        at += 16 + incl;
    }
    assert_eq!(at, d.len(), "no torn record, no tail");
    out
}

fn indexed_writer_config(dir: &Path) -> WriterConfig {
    let mut c = WriterConfig::new(dir.join("spool"));
    c.index = Some(dir.join("index.db"));
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.host = "test-host".into();
    c
}

/// Sends packets `from..to` (20 ms each) of both senders, `jitter_ms` late.
fn send_both(
    sink: &mut WriterSink,
    a: &mut Sender,
    b: &mut Sender,
    range: std::ops::Range<u64>,
    jitter_ms: i64,
) {
    for k in range {
        a.send(sink, k * 160, jitter_ms, &noise);
        b.send(sink, k * 160, jitter_ms, &noise);
    }
}

#[test]
fn tool_handover_then_resume_records_every_packet_once_in_one_recording() {
    let dir = TempDir::new("handover");
    let config = indexed_writer_config(dir.path());
    let rec = config.spool.join("r1");
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("r1", two_streams(), "uuid-h"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 7000);
    let mut b = Sender::new(2, 40002, 8, 0xB, 1, 9000);
    send_both(&mut sink, &mut a, &mut b, 0..150, 0);
    let handover = h.handover().expect("handover");
    drop(sink);

    // Between the two daemons: files valid as they are, recording still active everywhere.
    assert_eq!(handover.recording_ids(), vec!["r1".to_string()]);
    assert_eq!(pcap_rtp_records(&rec.join(PCAP_FILE)).len(), 300);
    let (_, _, c) = read_wav(&rec.join(WAV_FILE));
    assert!(c[0].len() >= 149 * 160, "{} frames", c[0].len());
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(
        (m.state, m.streams[0].packets),
        (RecordingState::Active, 150)
    );
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("r1").unwrap().unwrap().state, "active");
    let json = serde_json::to_string(&handover).unwrap();
    let handover: WriterHandover = serde_json::from_str(&json).unwrap();
    assert!(
        repair_spool_except(&config.spool, &handover.recording_ids())
            .unwrap()
            .is_empty()
    );

    let (h, mut sink) = start_resumed(config.clone(), handover).expect("resume");
    // The kernel kept capturing meanwhile: the next packets are drained before any event, and
    // arrive 30 ms late (the WAV must follow their timestamps, as before the restart).
    send_both(&mut sink, &mut a, &mut b, 150..300, 30);
    h.sync();
    assert_eq!(
        h.stats().unknown_flow,
        0,
        "resumed flows are routed at once"
    );
    h.event(ended("r1", 6000));
    h.sync();

    let records = pcap_rtp_records(&rec.join(PCAP_FILE));
    for ssrc in [0xA, 0xB] {
        let seqs: Vec<u16> = records
            .iter()
            .filter(|(s, _)| *s == ssrc)
            .map(|r| r.1)
            .collect();
        assert_eq!(seqs, (1..=300).collect::<Vec<u16>>(), "ssrc {ssrc:#x}");
    }
    assert_eq!(records.len(), 600);
    assert_eq!(
        tshark_rtp_streams(&rec.join(PCAP_FILE)),
        vec![(0xA, 300, 0), (0xB, 300, 0)]
    );
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.state, RecordingState::Complete);
    assert_eq!(m.end_reason.as_deref(), Some("bye"));
    for s in &m.streams {
        assert_eq!(
            (s.packets, s.lost, s.ssrcs.len()),
            (300, 0, 1),
            "{}",
            s.label
        );
        assert_eq!((s.ssrcs[0].packets, s.ssrcs[0].lost), (300, 0));
    }
    // 6 s of audio, time-aligned across the restart on both channels.
    let (ch, _, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(ch, 2);
    assert_eq!(c[0].len(), 48000);
    assert_eq!(m.wav.frames, 48000);
    let ul = |n: u64| g711::ulaw(encode::ulaw(noise(n)));
    let al = |n: u64| g711::alaw(encode::alaw(noise(n)));
    assert_eq!(measured_offset(&c[0], 100, 47900, ul), Some(0));
    assert_eq!(measured_offset(&c[1], 100, 47900, al), Some(0));
    let row = index.get("r1").unwrap().unwrap();
    assert_eq!(row.state, "complete");
    let st = h.shutdown();
    assert_eq!((st.completed_recordings, st.start_failed), (1, 0));
    let dirs = std::fs::read_dir(&config.spool).unwrap().count();
    assert_eq!(dirs, 1, "one recording directory");
}

#[test]
fn resume_marks_a_recording_with_a_missing_pcap_interrupted_and_goes_on_with_the_others() {
    let dir = TempDir::new("handover-bad");
    let config = indexed_writer_config(dir.path());
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("good", mux_streams(0), "u1"));
    h.event(started("bad", mux_streams(1), "u2"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    let mut b = Sender::new(3, 40000, 0, 0xB, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
    }
    let handover = h.handover().unwrap();
    let mut ids = handover.recording_ids();
    ids.sort();
    assert_eq!(ids, vec!["bad".to_string(), "good".to_string()]);
    std::fs::remove_file(config.spool.join("bad").join(PCAP_FILE)).unwrap();

    let (h, mut sink) = start_resumed(config.clone(), handover).unwrap();
    for k in 50..100 {
        a.send(&mut sink, k * 160, 0, &noise);
        b.send(&mut sink, k * 160, 0, &noise);
    }
    // A session started after the restart still gets packets that beat its Started.
    let mut c = Sender::new(5, 40000, 0, 0xC, 1, 0);
    c.send(&mut sink, 0, 0, &noise);
    h.event(started("new", mux_streams(2), "u3"));
    // The consumer's next drain (every tick) hands the packet held for it on.
    sink.batch_end();
    // Events about a resumed recording work as about any other: a re-INVITE drops "callee".
    h.event(SessionEvent::MediaChanged {
        id: "good".into(),
        at: at_ms(1500),
        streams: mux_streams(0)[..1].to_vec(),
    });
    h.event(ended("good", 2000));
    h.event(ended("new", 2000));
    h.sync();
    let st = h.stats();
    assert_eq!((st.start_failed, st.completed_recordings), (1, 2));
    assert_eq!(
        st.unknown_flow, 50,
        "packets of the interrupted recording are not written"
    );
    let good = RecordingMetadata::read(&config.spool.join("good")).unwrap();
    assert_eq!(good.state, RecordingState::Complete);
    assert_eq!((good.streams[0].packets, good.streams[0].lost), (100, 0));
    assert!(good.streams[0].removed_at.is_none());
    assert_eq!(
        good.streams[1].removed_at.as_deref(),
        Some(&*metadata::rfc3339(at_ms(1500)))
    );
    let bad = RecordingMetadata::read(&config.spool.join("bad")).unwrap();
    assert_eq!(bad.state, RecordingState::Interrupted);
    assert_eq!(bad.end_reason.as_deref(), Some("resume_failed"));
    assert!(bad.end_detail.as_deref().unwrap_or("").contains("resumed"));
    let new = RecordingMetadata::read(&config.spool.join("new")).unwrap();
    assert_eq!(new.streams[0].packets, 1);
    let mut index = crate::index::Index::open(&dir.path().join("index.db"), &config.spool).unwrap();
    assert_eq!(index.get("bad").unwrap().unwrap().state, "interrupted");
    assert_eq!(index.get("good").unwrap().unwrap().state, "complete");
    h.shutdown();
}

#[test]
fn handover_of_another_version_is_refused() {
    let dir = TempDir::new("handover-ver");
    let (h, _sink) = start_writer(dir.path());
    let mut v = serde_json::to_value(h.handover().unwrap()).unwrap();
    v["version"] = serde_json::json!(HANDOVER_VERSION + 1);
    let old: WriterHandover = serde_json::from_value(v).unwrap();
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    assert!(matches!(
        start_resumed(c, old),
        Err(WriterError::HandoverVersion { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// File descriptors

/// Set (to a spool path) in the child process of `many_recordings_hold_no_descriptors`.
const FD_CHILD_ENV: &str = "RECORDER_WRITER_FD_CHILD_SPOOL";
const FD_CHILD_RECORDINGS: u64 = 3000;
const FD_CHILD_LIMIT: u64 = 256;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The writer side of `many_recordings_hold_no_descriptors`, in a process of its own (the fd
/// count of the test process moves with the other tests): lowers its soft `RLIMIT_NOFILE`,
/// records one packet on every stream of many live recordings and prints what it saw.
#[test]
#[ignore = "child process of many_recordings_hold_no_descriptors"]
fn fd_child() {
    let Ok(spool) = std::env::var(FD_CHILD_ENV) else {
        return;
    };
    let lim = libc::rlimit {
        rlim_cur: FD_CHILD_LIMIT,
        rlim_max: FD_CHILD_LIMIT,
    };
    // SAFETY: plain syscall on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let (h, mut sink) = start_writer(Path::new(&spool));
    h.sync();
    let before = open_fds();
    let mut max_seen = before;
    for k in 0..FD_CHILD_RECORDINGS {
        let mut ev = started(&format!("r{k}"), mux_streams(k), "u");
        if let SessionEvent::Started { metadata, .. } = &mut ev {
            *metadata = None; // one file (and fsync) less per recording
        }
        h.event(ev);
        for flow in [2 * k + 1, 2 * k + 2] {
            let (f, off) = udp_frame(40000, &rtp(0, 1, 0, flow as u32, &[0xff; 160]));
            feed(&mut sink, flow, at_ms(20), &f, off);
        }
        if k % 500 == 499 {
            h.sync();
            max_seen = max_seen.max(open_fds());
        }
    }
    h.sync();
    let after = open_fds();
    let st = h.stats();
    println!(
        "FDS {before} {} {after} {} {} {} {}",
        max_seen.max(after),
        st.active_recordings,
        st.start_failed,
        st.pcap_write_failed,
        st.wav_write_failed
    );
    // Ending 3000 recordings costs ~10 000 fsyncs, and the parent removes the spool anyway.
    std::process::exit(0);
}

#[test]
fn many_recordings_hold_descriptors_only_up_to_a_share_of_the_limit() {
    let dir = TempDir::new("fds");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer::tests::fd_child",
            "--ignored",
            "--nocapture",
        ])
        .env(FD_CHILD_ENV, dir.path())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run the test binary as the writer child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FDS "))
        .unwrap_or_else(|| panic!("child printed no result: {stdout}"));
    let v: Vec<u64> = line[4..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let [before, max, after, active, start_failed, pcap_failed, wav_failed] = v[..] else {
        panic!("bad child line {line}");
    };
    assert_eq!(
        (active, start_failed, pcap_failed, wav_failed),
        (FD_CHILD_RECORDINGS, 0, 0, 0),
        "every recording created and written under a soft limit of {FD_CHILD_LIMIT} fds"
    );
    // The file threads keep at most a quarter of the limit open; the rest are opened per job.
    let kept = FD_CHILD_LIMIT / 4;
    assert!(
        max <= before + kept + 4 && after <= before + kept + 4,
        "descriptors grew with recordings: {before} before, {max} at most, {after} after (share {kept})"
    );
    assert!(
        max >= before + kept / 2,
        "the file threads kept no descriptors open: {before} before, {max} at most"
    );
}

// ---------------------------------------------------------------------------------------------
// Flush policy

/// Polls `metadata.json` of `rec` until `ok` holds (the writer's flush is asynchronous).
fn wait_metadata(rec: &Path, ok: impl Fn(&RecordingMetadata) -> bool) -> RecordingMetadata {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(m) = RecordingMetadata::read(rec) {
            if ok(&m) {
                return m;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metadata.json never got there"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn metadata_is_rewritten_on_news_and_counters_on_their_own_interval() {
    let dir = TempDir::new("metaflush");
    let mut c = WriterConfig::new(dir.path().to_path_buf());
    c.min_free_bytes = 0;
    c.media_floor_bytes = 0;
    c.flush_interval = Duration::from_millis(20);
    c.metadata_interval = Duration::from_secs(3600);
    let (h, mut sink) = start(c.clone()).unwrap();
    let rec = dir.path().join("r1");
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    h.sync();
    // Media flushes go on (the WAV header covers the new audio) ...
    let (_, _, chans) = wait_wav(&rec.join(WAV_FILE), 50 * 160);
    assert_eq!(chans[0].len(), 50 * 160);
    // (One more flush after that one, so that it has finished whatever it writes.)
    a.send(&mut sink, 50 * 160, 0, &noise);
    wait_wav(&rec.join(WAV_FILE), 51 * 160);
    // ... but counters alone do not rewrite metadata.json before their interval.
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!((m.streams[0].packets, m.media_received), (0, false));
    // An event does, at once.
    h.event(SessionEvent::Paused {
        id: "r1".into(),
        at: at_ms(1000),
        label: "callee".into(),
    });
    h.sync();
    assert_eq!(
        RecordingMetadata::read(&rec).unwrap().streams[0].packets,
        51
    );
    h.shutdown();

    // With a short interval the counters follow without any event.
    let dir = TempDir::new("metaflush2");
    c.spool = dir.path().to_path_buf();
    c.metadata_interval = Duration::from_millis(100);
    let (h, mut sink) = start(c).unwrap();
    let rec = dir.path().join("r1");
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0xA, 1, 0);
    for k in 0..50 {
        a.send(&mut sink, k * 160, 0, &noise);
    }
    wait_metadata(&rec, |m| m.streams[0].packets == 50);
    h.shutdown();
}

/// Polls the WAV until its header covers `frames` frames; returns it as [`read_wav`] does.
fn wait_wav(path: &Path, frames: usize) -> (u16, u32, Vec<Vec<i16>>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = std::fs::read(path).unwrap();
        let len = u32::from_le_bytes(d[40..44].try_into().unwrap()) as usize;
        let ch = u16::from_le_bytes([d[22], d[23]]).max(1) as usize;
        if len / (2 * ch) >= frames {
            // The header was flushed; the file itself is still the mapped (longer) one.
            let mut chans = vec![Vec::new(); ch];
            for (i, s) in d[44..44 + len].chunks(2).enumerate() {
                chans[i % ch].push(i16::from_le_bytes([s[0], s[1]]));
            }
            return (ch as u16, 8000, chans);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "WAV header never covered {frames} frames"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// SRTP and codecs

/// An SRTP stream across the sequence wrap and a handover: the rollover counter goes with the
/// handover (else every packet after the resume fails authentication), a tampered packet is
/// counted and not decoded, the tone fills the channel, and the key stays out of metadata.json.
#[test]
fn srtp_stream_is_decrypted_across_the_wrap_and_a_handover() {
    use crate::media::srtp::tests::{crypto, rtp as srtp_rtp, sender};
    let dir = TempDir::new("srtp");
    let mut config = indexed_writer_config(dir.path());
    config.index = None;
    let rec = config.spool.join("s1");
    let key: Vec<u8> = (0..30).map(|i| i * 7 + 1).collect();
    let c = crypto("AES_CM_128_HMAC_SHA1_32", &key, "");
    let mut info = stream(0, "caller", 1, "PCMU", 0, 40000);
    info.srtp = true;
    info.sdes = Some(c.clone());
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("s1", vec![info], "uuid-s"));
    let mut tx = sender(&c);
    let tone = tone(440.0, 8000.0);
    let mut send = |sink: &mut WriterSink, k: u16, tamper: bool| {
        let payload: Vec<u8> = (0..160)
            .map(|i| encode::ulaw(tone(u64::from(k) * 160 + i)))
            .collect();
        let plain = srtp_rtp(
            65_500u16.wrapping_add(k),
            u32::from(k) * 160,
            0x51,
            &payload,
        );
        let mut p = tx.rtp_protect(plain).unwrap();
        if tamper {
            p[30] ^= 1;
        }
        let (f, off) = udp_frame(40000, &p);
        feed(sink, 1, at_ms(i64::from(k) * 20), &f, off);
    };
    for k in 0..100 {
        send(&mut sink, k, k == 50);
    }
    let handover = h.handover().expect("handover");
    drop(sink);
    let json = serde_json::to_string(&handover).unwrap();
    let handover: WriterHandover = serde_json::from_str(&json).unwrap();
    let (h, mut sink) = start_resumed(config, handover).expect("resume");
    for k in 100..200 {
        send(&mut sink, k, false);
    }
    h.event(ended("s1", 4000));
    h.sync();
    let m = RecordingMetadata::read(&rec).unwrap();
    let s = &m.streams[0];
    assert_eq!(
        (s.packets, s.decode.decoded_packets, s.decode.auth_failures),
        (200, 199, 1)
    );
    assert_eq!(
        s.decode.srtp_suite.as_deref(),
        Some("AES_CM_128_HMAC_SHA1_32")
    );
    assert!(s.decoded);
    let text = std::fs::read_to_string(rec.join(METADATA_FILE)).unwrap();
    let b64 = crate::media::sdes::base64_encode(&key);
    assert!(!text.contains(&b64) && !text.contains("key_salt"), "{text}");
    let (_, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(rate, 8000);
    // Every 20 ms window carries the tone but the tampered packet's, which stays silent.
    let silent: Vec<usize> = c[0][..32000]
        .chunks(160)
        .enumerate()
        .filter(|(_, w)| goertzel(w, 440.0) < rms(w).powi(2) / 4.0 || rms(w) < 1000.0)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(silent, vec![50]);
    h.shutdown();
}

/// A G.722 stream makes a 16 kHz WAV; the PCMU stream beside it is resampled to it.
#[test]
fn g722_sets_the_wav_rate_and_pcmu_is_resampled() {
    let dir = TempDir::new("g722");
    let (h, mut sink) = start_writer(dir.path());
    let mut s = two_streams();
    s[1] = stream(1, "callee", 2, "G722", 9, 40002);
    h.event(started("g1", s, "u"));
    let mut enc = ezk_g722::libg722::encoder::Encoder::new(
        ezk_g722::libg722::Bitrate::Mode1_64000,
        false,
        false,
    );
    let low = tone(440.0, 8000.0);
    for k in 0..100u64 {
        let pcmu: Vec<u8> = (0..160).map(|i| encode::ulaw(low(k * 160 + i))).collect();
        // 16 kHz input: the 8 kHz tone function at half steps.
        let wide: Vec<i16> = (0..320)
            .map(|i| {
                let t = (k * 320 + i) as f64 / 16000.0;
                (8000.0 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin()) as i16
            })
            .collect();
        let g = enc.encode(&wide);
        let (f, off) = udp_frame(40000, &rtp(0, k as u16, k as u32 * 160, 0xA, &pcmu));
        feed(&mut sink, 1, at_ms(k as i64 * 20), &f, off);
        // RFC 3551: G.722's RTP clock runs at 8000 although it carries 16 kHz audio.
        let (f, off) = udp_frame(40002, &rtp(9, k as u16, k as u32 * 160, 0xB, &g));
        feed(&mut sink, 2, at_ms(k as i64 * 20), &f, off);
    }
    h.event(ended("g1", 2000));
    h.sync();
    let rec = dir.path().join("g1");
    let (ch, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!((ch, rate, c[0].len()), (2, 16000, 32000));
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.wav.sample_rate, 16000);
    assert_eq!(
        (
            m.streams[0].decode.sample_rate,
            m.streams[1].decode.sample_rate
        ),
        (Some(8000), Some(16000))
    );
    assert_eq!(m.streams[1].clock_rate, 8000);
    let share = |x: &[i16], f: f64| {
        // goertzel() assumes 8 kHz: at 16 kHz, f Hz sits where f/2 does at 8 kHz.
        goertzel(x, f / 2.0) / (rms(x).powi(2) / 4.0).max(1.0)
    };
    for w in 1..49 {
        let (a, b) = (&c[0][w * 640..(w + 1) * 640], &c[1][w * 640..(w + 1) * 640]);
        assert!(share(a, 440.0) > 0.8, "window {w}: PCMU tone resampled");
        assert!(share(b, 1000.0) > 0.8, "window {w}: G.722 tone");
        assert!(
            share(a, 1000.0) < 0.1 && share(b, 440.0) < 0.1,
            "window {w}"
        );
    }
    h.shutdown();
}

/// A re-INVITE moving an Opus stream to another dynamic payload type: packets still sent with
/// the old type after it are decoded as before, and the timeline goes on.
#[test]
fn dynamic_payload_type_change_keeps_decoding_both_types() {
    use audiopus::{coder::Encoder, Application, Channels, SampleRate};
    let dir = TempDir::new("dynpt");
    let (h, mut sink) = start_writer(dir.path());
    let opus = |pt: u8| Codec {
        payload_type: pt,
        name: "opus".into(),
        clock_rate: 48000,
        channels: 2,
        fmtp: None,
    };
    let mut info = stream(0, "caller", 1, "opus", 111, 40000);
    info.codec = opus(111);
    h.event(started("d1", vec![info.clone()], "u"));
    let enc = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
    let mut buf = [0u8; 1500];
    let mut send = |sink: &mut WriterSink, k: u32, pt: u8| {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                let t = f64::from(k * 960 + i) / 48000.0;
                (8000.0 * (2.0 * std::f64::consts::PI * 500.0 * t).sin()) as i16
            })
            .collect();
        let n = enc.encode(&pcm, &mut buf[..]).unwrap();
        let (f, off) = udp_frame(40000, &rtp(pt, k as u16, k * 960, 0xD, &buf[..n]));
        feed(sink, 1, at_ms(i64::from(k) * 20), &f, off);
    };
    for k in 0..50 {
        send(&mut sink, k, 111);
    }
    info.codec = opus(96);
    h.event(SessionEvent::MediaChanged {
        id: "d1".into(),
        at: at_ms(1000),
        streams: vec![info],
    });
    for k in 50..52 {
        send(&mut sink, k, 111); // sent before the client switched
    }
    for k in 52..100 {
        send(&mut sink, k, 96);
    }
    h.event(ended("d1", 2000));
    h.sync();
    let rec = dir.path().join("d1");
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(
        (m.streams[0].decode.decoded_packets, m.dropped.not_decoded),
        (100, 0)
    );
    assert_eq!(m.streams[0].payload_type, 96);
    let (_, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!((rate, c[0].len()), (48000, 96000));
    // goertzel() assumes 8 kHz: at 48 kHz, 500 Hz sits where 500/6 Hz does.
    for w in 1..99 {
        let x = &c[0][w * 960..(w + 1) * 960];
        assert!(
            goertzel(x, 500.0 / 6.0) > rms(x).powi(2) / 4.0 * 0.8,
            "window {w} lacks the tone"
        );
    }
    h.shutdown();
}
