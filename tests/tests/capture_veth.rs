//! End to end on a real veth pair: the XDP program attached in the recorder namespace captures
//! UDP sent from the sender namespace through the kernel stack.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use recorder::{
    capture::{
        loader::{AttachMode, AttachedMode, Capture, CaptureConfig, Counters},
        ring::{OwnedRecord, RingConsumer, VecSink},
    },
    flow::{maps::BpfFlowTable, FlowAction, FlowControl, FlowSpec},
};
use recorder_ebpf::abi::{self, counter};
use tests::net::VethPair;

/// Payload: 8-byte big-endian sequence number, then a tag byte per destination and filler, so
/// byte-exactness and order can both be checked.
fn payload(seq: u64, tag: u8, len: usize) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.push(tag);
    p.extend((0..len.saturating_sub(9)).map(|i| (i as u8) ^ tag));
    p
}

fn seq_of(frame_payload: &[u8]) -> u64 {
    u64::from_be_bytes(frame_payload[..8].try_into().unwrap())
}

struct Rig {
    pair: VethPair,
    capture: Capture,
    flows: BpfFlowTable,
    consumer: RingConsumer,
    counters: Counters,
}

fn rig(tag: &str) -> Rig {
    rig_with(tag, &CaptureConfig::default())
}

/// The rig's RTP port range at the recorder's address (the flow array); other ports go to the
/// fallback hash.
const RIG_PORTS: (u16, u16) = (40000, 42999);

fn rig_with(tag: &str, config: &CaptureConfig) -> Rig {
    let pair = VethPair::new(tag);
    let config = CaptureConfig {
        flow_addrs: vec![pair.recorder_v4.into()],
        flow_ports: Some(RIG_PORTS),
        ..config.clone()
    };
    let (capture, flows, consumer, counters) = pair.in_recorder(|| {
        let mut capture = Capture::load(&config).expect("load XDP object");
        let mode = capture
            .attach(&pair.recorder_if, AttachMode::Auto)
            .expect("attach XDP");
        assert_eq!(mode, AttachedMode::Native, "veth supports native XDP");
        let flows = capture.take_flow_table().unwrap();
        let consumer = RingConsumer::new(capture.take_rings().unwrap()).unwrap();
        let counters = capture.take_counters().unwrap();
        (capture, flows, consumer, counters)
    });
    Rig {
        pair,
        capture,
        flows,
        consumer,
        counters,
    }
}

impl Rig {
    /// Drains until the kernel's CAPTURED counter is reached: every record it wrote is read.
    fn drain_all(&mut self, sink: &mut VecSink) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.consumer.drain(sink);
            let captured = self.counters.read().unwrap()[counter::CAPTURED as usize];
            if sink.records.len() as u64 >= captured {
                assert_eq!(sink.records.len() as u64, captured, "no record read twice");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ring never delivered {captured} records"
            );
            std::thread::yield_now();
        }
    }

    fn counter(&self, index: u32) -> u64 {
        self.counters.read().unwrap()[index as usize]
    }
}

/// Records of one flow in kernel time order (rings are per CPU; a sender that migrates between
/// CPUs spreads one flow over several rings).
fn by_flow(records: &[OwnedRecord]) -> BTreeMap<u64, Vec<OwnedRecord>> {
    let mut map: BTreeMap<u64, Vec<OwnedRecord>> = BTreeMap::new();
    for r in records {
        map.entry(r.header.flow_id).or_default().push(r.clone());
    }
    for v in map.values_mut() {
        v.sort_by_key(|r| r.header.ts_ns);
    }
    map
}

fn udp_payload(r: &OwnedRecord) -> &[u8] {
    &r.frame[r.header.payload_offset as usize..]
}

#[test]
fn pinned_flows_are_captured_byte_exact_and_in_order() {
    let mut rig = rig("cap");
    let recorder_ip = rig.pair.recorder_v4;
    let pass_flow: SocketAddr = (recorder_ip, 40000).into();
    let drop_flow: SocketAddr = (recorder_ip, 40002).into();
    let unpinned: SocketAddr = (recorder_ip, 40004).into();
    rig.flows
        .insert(FlowSpec {
            flow_id: 1,
            local: pass_flow,
            remote: None,
            action: FlowAction::Pass,
        })
        .unwrap();
    rig.flows
        .insert(FlowSpec {
            flow_id: 2,
            local: drop_flow,
            remote: None,
            action: FlowAction::Drop,
        })
        .unwrap();

    let listeners: Vec<UdpSocket> = rig.pair.in_recorder(|| {
        [pass_flow, drop_flow, unpinned]
            .iter()
            .map(|a| {
                let s = UdpSocket::bind(a).unwrap();
                tests::net::big_receive_buffer(&s);
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s
            })
            .collect()
    });
    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());

    const N: u64 = 3000;
    let mut sent: BTreeMap<u8, Vec<Vec<u8>>> = BTreeMap::new();
    for seq in 0..N {
        for (tag, dest) in [(1u8, pass_flow), (2, drop_flow), (3, unpinned)] {
            // Vary sizes: 172-byte G.711 RTP up to 1200-byte video-like payloads.
            let len = if seq % 10 == 0 { 1200 } else { 172 };
            let p = payload(seq, tag, len);
            sender.send_to(&p, dest).unwrap();
            sent.entry(tag).or_default().push(p);
        }
    }

    let mut sink = VecSink::default();
    rig.drain_all(&mut sink);
    let flows = by_flow(&sink.records);
    assert_eq!(
        flows.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "only pinned flows"
    );
    for (flow_id, tag) in [(1u64, 1u8), (2, 2)] {
        let got = &flows[&flow_id];
        assert_eq!(got.len() as u64, N, "flow {flow_id}: every packet captured");
        for (i, (rec, expected)) in got.iter().zip(&sent[&tag]).enumerate() {
            assert_eq!(
                udp_payload(rec),
                expected.as_slice(),
                "flow {flow_id} packet {i}"
            );
            assert_eq!(
                rec.header.wire_len as usize,
                rec.frame.len(),
                "not truncated"
            );
            assert_eq!(rec.header.generation, 1);
            // The frame is what crossed the wire: Ethernet + IPv4 + UDP to the pinned port.
            assert_eq!(&rec.frame[12..14], &[0x08, 0x00]);
            let dport = u16::from_be_bytes([rec.frame[36], rec.frame[37]]);
            assert_eq!(dport, if flow_id == 1 { 40000 } else { 40002 });
        }
        let stats = rig.flows.stats(flow_id);
        assert_eq!(stats.packets, N);
        assert_eq!(stats.ring_drops, 0);
        let wire: u64 = got.iter().map(|r| r.header.wire_len as u64).sum();
        assert_eq!(stats.bytes, wire);
    }
    assert_eq!(rig.counter(counter::MATCHED), 2 * N);
    assert_eq!(rig.counter(counter::RING_FULL), 0);

    // Pass action and unpinned: the socket gets everything; drop action: nothing arrives.
    let mut buf = [0u8; 2048];
    for (i, expect) in [(0usize, N), (2, N)] {
        let mut count = 0;
        while let Ok(n) = listeners[i].recv(&mut buf) {
            assert_eq!(seq_of(&buf[..n]), count, "socket {i} in order");
            count += 1;
        }
        assert_eq!(count, expect, "listener {i}");
    }
    assert!(
        listeners[1].recv(&mut buf).is_err(),
        "drop action: nothing reaches the socket"
    );
    drop(rig.capture);
}

#[test]
fn rewrite_while_traffic_runs_loses_nothing_and_remove_stops_capture() {
    let mut rig = rig("rw");
    let recorder_ip = rig.pair.recorder_v4;
    let old: SocketAddr = (recorder_ip, 41000).into();
    let new: SocketAddr = (recorder_ip, 41010).into();
    let spec = FlowSpec {
        flow_id: 77,
        local: old,
        remote: None,
        action: FlowAction::Drop,
    };
    rig.flows.insert(spec).unwrap();
    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());

    // The client sends every sequence number to both the old and the new port, so whichever
    // key is live sees it. The rewrite happens in the middle of the run from another thread.
    const N: u64 = 4000;
    let rewrite_at = N / 2;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let send = std::thread::spawn(move || {
        for seq in 0..N {
            if seq == rewrite_at {
                tx.send(()).unwrap();
                done_rx.recv().unwrap();
            }
            sender.send_to(&payload(seq, 1, 172), old).unwrap();
            sender.send_to(&payload(seq, 2, 172), new).unwrap();
        }
        sender
    });
    rx.recv().unwrap();
    let generation = rig
        .flows
        .rewrite(old, FlowSpec { local: new, ..spec })
        .unwrap();
    assert_eq!(generation, 2);
    done_tx.send(()).unwrap();
    let sender = send.join().unwrap();

    let mut sink = VecSink::default();
    rig.drain_all(&mut sink);
    let records = &by_flow(&sink.records)[&77];
    let mut covered = vec![false; N as usize];
    for r in records {
        let p = udp_payload(r);
        let (seq, tag) = (seq_of(p), p[8]);
        covered[seq as usize] = true;
        // Generation tells which key captured it.
        assert_eq!(
            r.header.generation,
            if tag == 1 { 1 } else { 2 },
            "seq {seq}"
        );
        assert!(tag == 1 && seq < rewrite_at || tag == 2 && seq >= rewrite_at);
    }
    let missing: Vec<usize> = (0..N as usize).filter(|&i| !covered[i]).collect();
    assert!(
        missing.is_empty(),
        "sequence numbers lost across the rewrite: {missing:?}"
    );
    assert_eq!(
        records.len() as u64,
        N,
        "exactly one copy of each (old, then new)"
    );
    assert_eq!(
        rig.flows.stats(77).packets,
        N,
        "stats follow the flow across the rewrite"
    );

    // Remove: capture stops, the flow's packets go on to the stack (and reach a socket).
    let listener = rig.pair.in_recorder(|| UdpSocket::bind(new).unwrap());
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    rig.flows.remove(new).unwrap();
    let matched = rig.counter(counter::MATCHED);
    for seq in 0..100 {
        sender.send_to(&payload(seq, 2, 172), new).unwrap();
    }
    let mut buf = [0u8; 2048];
    for seq in 0..100 {
        let n = listener
            .recv(&mut buf)
            .expect("unpinned packet reaches the socket");
        assert_eq!(seq_of(&buf[..n]), seq);
    }
    assert_eq!(
        rig.counter(counter::MATCHED),
        matched,
        "removed flow no longer matches"
    );
    assert_eq!(rig.consumer.drain(&mut sink), 0);
    assert!(rig.flows.list().is_empty());
}

/// Counts records and publishes the count.
struct CountingSink {
    count: tokio::sync::watch::Sender<usize>,
}

impl recorder::capture::PacketSink for CountingSink {
    fn packet(&mut self, _packet: &recorder::capture::CapturedPacket<'_>) {
        self.count.send_modify(|n| *n += 1);
    }
}

/// Runs the async consumer with `tick` while `bursts` bursts of `per_burst` packets go to one
/// flow. After each burst, waits (10 s at most) until all but `below` of the packets sent so far
/// reached the sink. Returns the consumer and the sink's count once it stopped (its final drain
/// takes the rest).
fn run_async_consumer(
    rig: &mut Rig,
    tick: Duration,
    bursts: usize,
    per_burst: usize,
    below: usize,
) -> (RingConsumer, usize) {
    let local: SocketAddr = (rig.pair.recorder_v4, 42000).into();
    rig.flows
        .insert(FlowSpec {
            flow_id: 5,
            local,
            remote: None,
            action: FlowAction::Drop,
        })
        .unwrap();
    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let consumer = std::mem::replace(&mut rig.consumer, RingConsumer::new(Vec::new()).unwrap());
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let mut sink = CountingSink { count: count_tx };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let consumer = runtime.block_on(async {
        let run = consumer.run(&mut sink, tick, shutdown);
        let send = async {
            let mut sent = 0;
            for _ in 0..bursts {
                // The burst goes out without yielding: only a wake-up (or the tick) lets the
                // consumer see it afterwards.
                for _ in 0..per_burst {
                    sender.send_to(&payload(sent, 1, 172), local).unwrap();
                    sent += 1;
                }
                let want = (sent as usize).saturating_sub(below);
                let waited = tokio::time::timeout(
                    Duration::from_secs(10),
                    count_rx.wait_for(|n| *n >= want),
                )
                .await
                .is_ok();
                assert!(
                    waited,
                    "{want} of {sent} records delivered within 10 s ({} were)",
                    *count_rx.borrow()
                );
            }
            stop.cancel();
        };
        let (consumer, ()) = tokio::join!(run, send);
        consumer
    });
    let count = *sink.count.borrow();
    (consumer, count)
}

#[test]
fn async_consumer_is_woken_when_an_eighth_of_the_ring_fills() {
    // 64 KiB rings: the program wakes the consumer each time unread data crosses 8 KiB.
    let config = CaptureConfig {
        ring_bytes: 64 << 10,
        ..CaptureConfig::default()
    };
    let mut rig = rig_with("wake", &config);
    // Bursts of 100 records (~25 KiB, within the ring even if nobody drains during a burst).
    const BURSTS: usize = 5;
    const PER_BURST: usize = 100;
    const N: usize = BURSTS * PER_BURST;
    // A record (ring header + record header + 214-byte frame) is over 200 bytes, so at most
    // 8 KiB / 200 = 40 records can wait below the threshold.
    const BELOW: usize = 40;
    // An hour-long tick: only the ring's wake-ups can deliver the records in time.
    let (consumer, count) = run_async_consumer(
        &mut rig,
        Duration::from_secs(3600),
        BURSTS,
        PER_BURST,
        BELOW,
    );
    assert_eq!(
        count, N,
        "the final drain takes what stayed below the threshold"
    );
    assert_eq!(consumer.stats.records, N as u64);
    assert_eq!(rig.counter(counter::RING_FULL), 0);
    // The kernel's default wakes the consumer whenever it has caught up (up to once per
    // record); here: one drain for the interval's first tick, a few per burst.
    assert!(
        consumer.stats.wakeups <= 1 + 4 * BURSTS as u64 + 1,
        "{} drains for {N} records: woken per record?",
        consumer.stats.wakeups
    );
}

#[test]
fn async_consumer_drains_a_trickle_on_its_tick() {
    let mut rig = rig("trickle");
    // Three records never reach the wake-up threshold (1 MiB of the default 8 MiB ring): the
    // tick delivers them.
    let (consumer, count) = run_async_consumer(&mut rig, Duration::from_millis(50), 1, 3, 0);
    assert_eq!(count, 3);
    assert_eq!(consumer.stats.records, 3);
}

#[test]
fn flow_counters_go_with_their_flows() {
    let mut rig = rig("stats");
    let ip = rig.pair.recorder_v4;
    // More flows over the table's life than the stats map holds: a leak would refuse the last.
    let total = u64::from(abi::DEFAULT_MAX_FLOWS) + 1000;
    for flow_id in 1..=total {
        let spec = |port: u16| FlowSpec {
            flow_id,
            local: (ip, port).into(),
            remote: None,
            action: FlowAction::Pass,
        };
        rig.flows
            .insert(spec(40000))
            .unwrap_or_else(|e| panic!("flow {flow_id}: {e}"));
        if flow_id % 1000 == 0 {
            // A rewrite keeps the flow id and so its counters; removal then frees them.
            rig.flows.rewrite(spec(40000).local, spec(40002)).unwrap();
            assert_eq!(rig.flows.stats_entries(), 1, "one flow, one counter entry");
            rig.flows.remove(spec(40002).local).unwrap();
        } else {
            rig.flows.remove(spec(40000).local).unwrap();
        }
    }
    assert_eq!(rig.flows.stats_entries(), 0, "no counters left behind");
}

/// Waits until `flow_id`'s counters show `packets` (XDP runs in the receiver's NAPI, after
/// `send_to` returned).
fn wait_packets(rig: &Rig, flow_id: u64, packets: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.flows.stats(flow_id).packets < packets {
        assert!(
            Instant::now() < deadline,
            "flow {flow_id}: {} of {packets} packets counted",
            rig.flows.stats(flow_id).packets
        );
        std::thread::yield_now();
    }
}

#[test]
fn array_flows_at_the_range_ends_and_a_fallback_flow_are_counted_apart() {
    let mut rig = rig("arr");
    let ip = rig.pair.recorder_v4;
    let (lo, hi) = RIG_PORTS;
    let outside = hi + 1000;
    // (flow id, port, packets sent): both ends of the range, one inside, one outside (hash).
    let flows: [(u64, u16, u64); 4] = [
        (1, lo, 100),
        (2, hi, 200),
        (3, lo + 10, 300),
        (4, outside, 400),
    ];
    for &(flow_id, port, _) in &flows {
        rig.flows
            .insert(FlowSpec {
                flow_id,
                local: (ip, port).into(),
                remote: None,
                action: FlowAction::Drop,
            })
            .unwrap();
        assert_eq!(
            rig.flows.in_array((ip, port).into()),
            port != outside,
            "port {port}"
        );
    }
    let kernel: Vec<(SocketAddr, u64, u32)> = rig
        .flows
        .kernel_entries()
        .into_iter()
        .map(|(a, v)| (a, v.flow_id, v.generation))
        .collect();
    let mut want: Vec<(SocketAddr, u64, u32)> = flows
        .iter()
        .map(|&(id, port, _)| ((ip, port).into(), id, 1))
        .collect();
    want.sort();
    assert_eq!(kernel, want, "the kernel's view, array and hash");

    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());
    // Unpinned: in the range (a free slot), just outside both ends, outside near the hash key.
    let unpinned = [lo + 2, lo - 1, hi - 1, outside + 2];
    for &(_, port, n) in &flows {
        for seq in 0..n {
            sender.send_to(&payload(seq, 1, 172), (ip, port)).unwrap();
        }
    }
    for &port in &unpinned {
        for seq in 0..50 {
            sender.send_to(&payload(seq, 9, 172), (ip, port)).unwrap();
        }
    }
    let mut sink = VecSink::default();
    rig.drain_all(&mut sink);
    let by = by_flow(&sink.records);
    assert_eq!(by.len(), flows.len(), "records of pinned flows only");
    for &(flow_id, port, n) in &flows {
        let records = &by[&flow_id];
        assert_eq!(
            records.len() as u64,
            n,
            "flow {flow_id}: every packet, once"
        );
        for (i, r) in records.iter().enumerate() {
            assert_eq!(seq_of(udp_payload(r)), i as u64, "flow {flow_id} in order");
            assert_eq!(r.header.generation, 1);
            assert_eq!(u16::from_be_bytes([r.frame[36], r.frame[37]]), port);
        }
        let stats = rig.flows.stats(flow_id);
        assert_eq!(stats.packets, n, "flow {flow_id} counted alone");
        let wire: u64 = records.iter().map(|r| u64::from(r.header.wire_len)).sum();
        assert_eq!(stats.bytes, wire);
        assert_eq!((stats.ring_drops, stats.wrong_source), (0, 0));
    }
    let total: u64 = flows.iter().map(|f| f.2).sum();
    assert_eq!(rig.counter(counter::MATCHED), total);
    assert_eq!(rig.counter(counter::CAPTURED), total);

    // The hash's last entry goes: packets there are no longer looked up, the array's still are.
    rig.flows.remove((ip, outside).into()).unwrap();
    let matched = rig.counter(counter::MATCHED);
    sender.send_to(&payload(0, 1, 172), (ip, outside)).unwrap();
    sender.send_to(&payload(100, 1, 172), (ip, lo)).unwrap();
    wait_packets(&rig, 1, 101);
    assert_eq!(rig.counter(counter::MATCHED), matched + 1);
}

#[test]
fn a_slot_reused_by_new_flows_starts_with_zeroed_counters() {
    // A small table: its spare versions run out after a few hundred flows, so versions are
    // reclaimed (grace period, counters zeroed) and reused while the slot keeps changing hands.
    let config = CaptureConfig {
        max_flows: 16,
        ..CaptureConfig::default()
    };
    let mut rig = rig_with("reuse", &config);
    let local: SocketAddr = (rig.pair.recorder_v4, RIG_PORTS.0 + 100).into();
    assert!(rig.flows.in_array(local));
    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());
    let versions = abi::flow_versions(config.max_flows) as u64;
    let rounds = 2 * versions + 10;
    for flow_id in 1..=rounds {
        let spec = FlowSpec {
            flow_id,
            local,
            remote: None,
            action: FlowAction::Drop,
        };
        rig.flows.insert(spec).unwrap();
        assert_eq!(
            rig.flows.stats(flow_id),
            abi::FlowStats::default(),
            "flow {flow_id} starts at zero"
        );
        // Flow k gets 1 + k % 3 packets, so leftovers of an earlier flow would show.
        let n = 1 + flow_id % 3;
        for seq in 0..n {
            sender.send_to(&payload(seq, 1, 172), local).unwrap();
        }
        wait_packets(&rig, flow_id, n);
        let stats = rig.flows.stats(flow_id);
        assert_eq!((stats.packets, stats.bytes), (n, n * 214), "flow {flow_id}");
        rig.flows.remove(local).unwrap();
    }
    assert!(
        rig.flows.grace_periods() >= 1,
        "versions were reclaimed and reused"
    );
    let mut sink = VecSink::default();
    rig.drain_all(&mut sink);
    let by = by_flow(&sink.records);
    assert_eq!(
        by.len() as u64,
        rounds,
        "every flow's records under its own id"
    );
    for (flow_id, records) in by {
        assert_eq!(records.len() as u64, 1 + flow_id % 3, "flow {flow_id}");
    }
    assert_eq!(rig.flows.stats_entries(), 0);
}

#[test]
fn same_port_rewrites_under_traffic_lose_nothing_and_order_generations() {
    // Small table: versions are reclaimed and reused while traffic flows.
    let config = CaptureConfig {
        max_flows: 16,
        ..CaptureConfig::default()
    };
    let mut rig = rig_with("same", &config);
    let local: SocketAddr = (rig.pair.recorder_v4, RIG_PORTS.0 + 200).into();
    let any = FlowSpec {
        flow_id: 31,
        local,
        remote: None,
        action: FlowAction::Drop,
    };
    // Both versions accept the sender: any source, or any port from its address.
    let learned = FlowSpec {
        remote: Some((rig.pair.sender_v4, 0).into()),
        ..any
    };
    rig.flows.insert(any).unwrap();
    let sender = rig
        .pair
        .in_sender(|| UdpSocket::bind((rig.pair.sender_v4, 0)).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = stop.clone();
    let traffic = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
            sender.send_to(&payload(seq, 1, 172), local).unwrap();
            seq += 1;
            if seq.is_multiple_of(16) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        seq
    });
    // Rewrite until several grace periods went by (versions reused under traffic), capped.
    let versions = u64::from(abi::flow_versions(config.max_flows));
    let mut sink = VecSink::default();
    let mut generation = 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (u64::from(generation) < 3 * versions || rig.counter(counter::CAPTURED) < 20_000)
        && Instant::now() < deadline
    {
        let spec = if generation % 2 == 1 { learned } else { any };
        generation = rig.flows.rewrite(local, spec).unwrap();
        rig.consumer.drain(&mut sink);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    assert!(
        rig.flows.grace_periods() >= 2,
        "versions reused under traffic"
    );
    wait_packets(&rig, 31, sent);
    rig.drain_all(&mut sink);

    let records = &by_flow(&sink.records)[&31];
    assert_eq!(records.len() as u64, sent, "every packet captured once");
    let mut seen = vec![false; sent as usize];
    let mut last_generation = 1;
    for r in records {
        let seq = seq_of(udp_payload(r));
        assert!(!seen[seq as usize], "seq {seq} twice");
        seen[seq as usize] = true;
        // In time order the generations only go up, within what was written.
        assert!(
            r.header.generation >= last_generation && r.header.generation <= generation,
            "seq {seq}: generation {} after {last_generation}",
            r.header.generation
        );
        last_generation = r.header.generation;
    }
    assert!(last_generation > 1, "later packets carry later generations");
    let stats = rig.flows.stats(31);
    assert_eq!(
        stats.packets, sent,
        "counters follow the flow across every version"
    );
    assert_eq!((stats.wrong_source, stats.ring_drops), (0, 0));
    assert_eq!(rig.counter(counter::WRONG_SOURCE), 0);
}
