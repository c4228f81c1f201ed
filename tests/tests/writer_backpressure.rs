//! The writer held up on purpose, on a real veth pair with the real XDP program: packets wait
//! in the writer's bounded queues and then in the BPF rings; what the rings cannot hold is
//! counted there (`ring_full`, per CPU and per flow) and reported in the recording's metadata.
//! Userspace drops nothing: every record the kernel captured is in the pcap.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use recorder::{
    capture::{
        loader::{AttachMode, Capture, CaptureConfig},
        ring::RingConsumer,
        PacketSink,
    },
    events::{CallIds, Codec, EndReason, SessionEvent, StreamInfo},
    flow::{FlowAction, FlowControl, FlowSpec},
    writer::{self, RecordingMetadata, WriterConfig},
};
use recorder_ebpf::abi::counter;
use tests::net::VethPair;

fn stream(index: usize, flow_id: u64, port: u16) -> StreamInfo {
    StreamInfo {
        index,
        label: (index + 1).to_string(),
        media: "audio".into(),
        flow_id,
        rtcp_flow_id: None,
        local_port: port,
        rtcp_port: None,
        remote: None,
        rtcp_remote: None,
        codec: Codec {
            payload_type: 0,
            name: "PCMU".into(),
            clock_rate: 8000,
            channels: 1,
            fmtp: None,
        },
        telephone_event_pt: None,
        srtp: false,
        sdes: None,
        paused: false,
    }
}

fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// (UDP destination port, RTP sequence number) of every record of a pcap, in file order.
fn pcap_records(path: &Path) -> Vec<(u16, u16)> {
    let d = std::fs::read(path).unwrap();
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= d.len() {
        let incl = u32::from_le_bytes(d[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &d[at + 16..at + 16 + incl];
        // Ethernet 14 + IPv4 20 + UDP 8, then RTP.
        let dport = u16::from_be_bytes([frame[36], frame[37]]);
        let seq = u16::from_be_bytes([frame[44], frame[45]]);
        out.push((dport, seq));
        at += 16 + incl;
    }
    assert_eq!(at, d.len(), "whole records only");
    out
}

struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_stalled_writer_loses_packets_only_to_counted_full_rings() {
    let pair = VethPair::new("wbp");
    let config = CaptureConfig {
        // 64 records of 256 bytes per CPU ring: the stall overflows them quickly.
        ring_bytes: 16 * 1024,
        ..CaptureConfig::default()
    };
    let (_capture, mut flows, mut consumer, counters) = pair.in_recorder(|| {
        let mut capture = Capture::load(&config).expect("load XDP object");
        capture
            .attach(&pair.recorder_if, AttachMode::Auto)
            .expect("attach XDP");
        let flows = capture.take_flow_table().unwrap();
        let consumer = RingConsumer::new(capture.take_rings().unwrap()).unwrap();
        let counters = capture.take_counters().unwrap();
        (capture, flows, consumer, counters)
    });
    let spool = Spool(std::env::temp_dir().join(format!("wbp-{}", std::process::id())));
    let mut wc = WriterConfig::new(spool.0.clone());
    wc.min_free_bytes = 0;
    wc.media_floor_bytes = 0;
    wc.host = "t".into();
    wc.shards = 2;
    wc.queue_packets = 64;
    wc.file_queue_bytes = 64 * 1024;
    let (writer, mut sink) = writer::start(wc).unwrap();

    let ip = pair.recorder_v4;
    let ports = [40000u16, 40002];
    for (i, port) in ports.iter().enumerate() {
        flows
            .insert(FlowSpec {
                flow_id: i as u64 + 1,
                local: SocketAddr::from((ip, *port)),
                remote: None,
                action: FlowAction::Drop,
            })
            .unwrap();
    }
    let started = SystemTime::now();
    writer.event(SessionEvent::Started {
        id: "held".into(),
        at: started,
        ids: CallIds {
            sip_call_id: "c".into(),
            ..Default::default()
        },
        streams: vec![stream(0, 1, ports[0]), stream(1, 2, ports[1])],
        participants: Vec::new(),
        metadata: None,
    });

    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    let held = writer.hold_file_threads();
    const N: u16 = 2000;
    const TAIL: u16 = 10;
    const SENT: u64 = 2 * (N + TAIL) as u64;
    for seq in 0..N {
        for (i, port) in ports.iter().enumerate() {
            sender
                .send_to(&rtp(seq, 0xA0 + i as u32), SocketAddr::from((ip, *port)))
                .unwrap();
        }
        if seq % 50 == 0 {
            consumer.drain(&mut sink);
        }
    }
    consumer.drain(&mut sink);
    let read = |i: u32| counters.read().unwrap()[i as usize];
    assert!(
        consumer.backlogged(),
        "the held writer stopped the consumer"
    );
    assert!(!sink.has_room());
    let ring_full = read(counter::RING_FULL);
    assert!(
        ring_full > 0,
        "the rings overflowed while the writer was held"
    );

    // Let the file threads go: the consumer catches up with everything the rings kept.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        consumer.drain(&mut sink);
        if !consumer.backlogged() && writer.stats().packets_in == read(counter::CAPTURED) {
            break;
        }
        assert!(Instant::now() < deadline, "consumer never caught up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A few more after the stall, so that drops at its end are sequence gaps too.
    for seq in N..N + TAIL {
        for (i, port) in ports.iter().enumerate() {
            sender
                .send_to(&rtp(seq, 0xA0 + i as u32), SocketAddr::from((ip, *port)))
                .unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer.stats().packets_in < read(counter::CAPTURED) || read(counter::MATCHED) < SENT {
        consumer.drain(&mut sink);
        assert!(Instant::now() < deadline, "tail never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let per_flow: Vec<u64> = (1..=2).map(|f| flows.ring_drops(f)).collect();
    writer.event(SessionEvent::Ended {
        id: "held".into(),
        at: started + Duration::from_secs(1),
        reason: EndReason::Bye { reason: None },
        ring_drops: (1..=2).zip(per_flow.iter().copied()).collect(),
    });
    writer.sync();

    let (matched, captured) = (read(counter::MATCHED), read(counter::CAPTURED));
    assert_eq!(matched, SENT, "every packet reached XDP");
    assert_eq!(
        read(counter::RING_FULL),
        ring_full,
        "no drop once the writer caught up"
    );
    assert_eq!(
        captured + ring_full,
        matched,
        "captured or counted, nothing else"
    );
    assert_eq!(
        per_flow.iter().sum::<u64>(),
        ring_full,
        "counted per flow too"
    );
    let st = writer.stats();
    assert_eq!((st.unknown_flow, st.pcap_write_failed), (0, 0), "{st:?}");

    let rec = spool.0.join("held");
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(
        m.dropped.ring_full, ring_full,
        "the metadata reports the loss"
    );
    let records = pcap_records(&rec.join("recording.pcap"));
    assert_eq!(
        records.len() as u64,
        captured,
        "every captured record is in the pcap"
    );
    for (i, port) in ports.iter().enumerate() {
        let s = &m.streams[i];
        assert_eq!(s.ring_drops, per_flow[i]);
        assert_eq!(s.packets + s.ring_drops, (N + TAIL) as u64);
        // Written in arrival order, and the only gaps are the ring's drops.
        let seqs: Vec<u16> = records
            .iter()
            .filter(|(p, _)| p == port)
            .map(|(_, s)| *s)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "stream {i} in order");
        assert_eq!(
            s.lost, per_flow[i],
            "stream {i}: sequence gaps = ring drops"
        );
    }
    writer.shutdown();
}
