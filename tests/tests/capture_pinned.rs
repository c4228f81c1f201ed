//! Capture survives a daemon restart: maps and the XDP link pinned in bpffs keep capturing while
//! no process holds them, and a new load adopts them and hands out exactly what was captured
//! meanwhile. Real XDP on a veth pair, run as root.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::Map,
    programs::{links::FdLink, Xdp, XdpMode},
    EbpfLoader,
};
use recorder::{
    capture::{
        loader::{
            layout_version, AttachMode, AttachedMode, Capture, CaptureConfig, CaptureError,
            Counters, EMBEDDED_OBJECT,
        },
        ring::{OwnedRecord, RingConsumer, VecSink},
    },
    flow::{maps::BpfFlowTable, FlowAction, FlowControl, FlowSpec},
};
use recorder_ebpf::abi::{self, counter};
use tests::net::{ensure_bpffs, VethPair};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique pin base directory on bpffs, removed (with every pin in it) on every path.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        ensure_bpffs();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/rec-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }

    fn config(&self, create_pins: bool) -> CaptureConfig {
        CaptureConfig {
            pin_dir: Some(self.0.clone()),
            create_pins,
            ..CaptureConfig::default()
        }
    }

    fn layout_dir(&self) -> PathBuf {
        self.0.join(layout_version())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Removing the link pins detaches XDP (no process holds the links any more).
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend([0xab; 164]);
    p
}

fn seq_of(r: &OwnedRecord) -> u64 {
    let p = &r.frame[r.header.payload_offset as usize..];
    u64::from_be_bytes(p[..8].try_into().unwrap())
}

/// Id of the XDP program attached to the recorder end, from `ip link` (None: nothing attached).
fn xdp_prog_id(pair: &VethPair) -> Option<u32> {
    let out = Command::new("ip")
        .args([
            "-n",
            &pair.recorder_ns,
            "link",
            "show",
            "dev",
            &pair.recorder_if,
        ])
        .output()
        .expect("ip link show");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| w.starts_with("prog/xdp"))?;
    assert_eq!(words.next(), Some("id"), "{text}");
    Some(words.next()?.parse().expect("program id"))
}

struct Loaded {
    capture: Capture,
    flows: BpfFlowTable,
    consumer: RingConsumer,
    counters: Counters,
}

fn load(pair: &VethPair, config: &CaptureConfig) -> (Loaded, AttachedMode) {
    load_in_mode(pair, config, AttachMode::Auto)
}

/// The RTP port range of the tests' flow array (at the recorder's address).
const PIN_PORTS: (u16, u16) = (43000, 47999);

fn load_in_mode(
    pair: &VethPair,
    config: &CaptureConfig,
    mode: AttachMode,
) -> (Loaded, AttachedMode) {
    let config = CaptureConfig {
        flow_addrs: vec![pair.recorder_v4.into()],
        flow_ports: config.flow_ports.or(Some(PIN_PORTS)),
        ..config.clone()
    };
    pair.in_recorder(|| {
        let mut capture = Capture::load(&config).expect("load XDP object");
        let mode = capture.attach(&pair.recorder_if, mode).expect("attach XDP");
        let flows = capture.take_flow_table().unwrap();
        let consumer = RingConsumer::new(capture.take_rings().unwrap()).unwrap();
        let counters = capture.take_counters().unwrap();
        (
            Loaded {
                capture,
                flows,
                consumer,
                counters,
            },
            mode,
        )
    })
}

impl Loaded {
    fn captured(&self) -> u64 {
        self.counters.read().unwrap()[counter::CAPTURED as usize]
    }

    /// Drains until `count` records arrived (the caller knows how many the kernel wrote),
    /// then checks no more come; returns them in kernel time order.
    fn drain_exactly(&mut self, count: usize) -> Vec<OwnedRecord> {
        let mut sink = VecSink::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.records.len() < count {
            self.consumer.drain(&mut sink);
            assert!(
                Instant::now() < deadline,
                "only {} of {count} records arrived",
                sink.records.len()
            );
            std::thread::yield_now();
        }
        self.consumer.drain(&mut sink);
        assert_eq!(sink.records.len(), count, "no extra record");
        // Rings are per CPU: a sender that migrated spreads its packets over several.
        sink.records.sort_by_key(|r| r.header.ts_ns);
        sink.records
    }
}

fn send(sender: &UdpSocket, to: SocketAddr, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        sender.send_to(&payload(seq), to).unwrap();
    }
}

/// Every sequence number of `expected` exactly once, in order, with `generation`.
fn assert_seqs(records: &[OwnedRecord], expected: std::ops::Range<u64>, generation: u32) {
    let got: Vec<u64> = records.iter().map(seq_of).collect();
    let want: Vec<u64> = expected.collect();
    assert_eq!(got, want, "sequence numbers one by one");
    for r in records {
        assert_eq!(r.header.flow_id, 11);
        assert_eq!(r.header.generation, generation, "seq {}", seq_of(r));
    }
}

#[test]
fn restart_with_pinned_objects_loses_no_packet() {
    let pair = VethPair::new("pin");
    let pins = PinDir::new("restart");
    let local: SocketAddr = (pair.recorder_v4, 43000).into();
    let spec = FlowSpec {
        flow_id: 11,
        local,
        remote: Some((pair.sender_v4, 0).into()),
        action: FlowAction::Drop,
    };
    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());

    // First daemon: creates the pins.
    let (mut first, mode) = load(&pair, &pins.config(true));
    assert_eq!(mode, AttachedMode::Native);
    assert!(!first.capture.adopted());
    assert!(first.capture.pinning());
    assert_eq!(first.flows.insert(spec).unwrap(), 1);
    assert!(first.flows.in_array(local), "found by array index");
    const K: u64 = 200;
    send(&sender, local, 0..K);
    let records = first.drain_exactly(K as usize);
    assert_seqs(&records, 0..K, 1);
    let first_prog = xdp_prog_id(&pair).expect("XDP attached");

    // Exit leaving capture running: nothing of ours stays open.
    first.capture.release_pinned().unwrap();
    drop((first.flows, first.consumer, first.counters));
    let layout = pins.layout_dir();
    for name in [
        format!("link-{}", pair.recorder_if),
        abi::MAP_FLOWS.into(),
        abi::MAP_FLOW_SLOTS.into(),
        abi::MAP_FLOW_VALUES.into(),
        abi::MAP_FLOW_STATS.into(),
        abi::MAP_FLOW_CTL.into(),
        abi::MAP_COUNTERS.into(),
        abi::RING_NAMES[0].into(),
    ] {
        assert!(layout.join(&name).exists(), "{name} pinned");
    }

    // No daemon: the kernel keeps capturing into the pinned rings.
    const M: u64 = 300;
    send(&sender, local, K..K + M);
    assert_eq!(
        xdp_prog_id(&pair),
        Some(first_prog),
        "XDP stays attached with no process holding it"
    );

    // Second daemon (create_pins off: existing pins are adopted anyway).
    let (mut second, mode) = load(&pair, &pins.config(false));
    assert!(second.capture.adopted());
    assert_eq!(mode, AttachedMode::Native, "mode read back from the kernel");
    let second_prog = xdp_prog_id(&pair).expect("XDP attached");
    assert_ne!(second_prog, first_prog, "program replaced in the link");
    assert!(second.capture.stale_links().is_empty());
    assert_eq!(second.flows.lookup(local), Some((spec, 1)));
    assert!(second.flows.in_array(local), "the adopted array");
    assert_eq!(second.flows.max_flow_id(), Some(11));
    assert_eq!(second.flows.list().len(), 1);
    assert_eq!(
        second.captured(),
        K + M,
        "adopted counters continue from the first daemon's"
    );
    assert_eq!(second.flows.stats(11).packets, K + M);

    // Exactly what arrived during the gap, none missing, none twice.
    let gap = second.drain_exactly(M as usize);
    assert_seqs(&gap, K..K + M, 1);

    // Capture carries on.
    const L: u64 = 100;
    send(&sender, local, K + M..K + M + L);
    let after = second.drain_exactly(L as usize);
    assert_seqs(&after, K + M..K + M + L, 1);

    // A rewrite of an adopted flow bumps its generation.
    assert_eq!(second.flows.rewrite(local, spec).unwrap(), 2);
    assert_eq!(second.flows.lookup(local), Some((spec, 2)));
    let start = K + M + L;
    send(&sender, local, start..start + 50);
    let rewritten = second.drain_exactly(50);
    assert_seqs(&rewritten, start..start + 50, 2);

    // Clean stop: pins gone, XDP detached, nothing counted any more.
    second.capture.detach_and_unpin().unwrap();
    assert!(!pins.0.exists(), "pin directory removed");
    assert_eq!(xdp_prog_id(&pair), None, "XDP detached");
    let seen = second.counters.read().unwrap()[counter::SEEN as usize];
    send(&sender, local, 0..50);
    assert_eq!(
        second.counters.read().unwrap()[counter::SEEN as usize],
        seen,
        "no program runs on the interface"
    );
    assert_eq!(second.consumer.drain(&mut VecSink::default()), 0);
}

#[test]
fn adoption_keeps_the_link_mode_and_retain_removes_flows_not_restored() {
    let pair = VethPair::new("ret");
    let pins = PinDir::new("retain");
    let keep: SocketAddr = (pair.recorder_v4, 44000).into();
    let stale: SocketAddr = (pair.recorder_v4, 44002).into();
    let (mut first, mode) = load_in_mode(&pair, &pins.config(true), AttachMode::Generic);
    assert_eq!(mode, AttachedMode::Generic);
    for (flow_id, local) in [(21, keep), (22, stale)] {
        first
            .flows
            .insert(FlowSpec {
                flow_id,
                local,
                remote: None,
                action: FlowAction::Drop,
            })
            .unwrap();
    }
    first.capture.release_pinned().unwrap();
    drop((first.flows, first.consumer, first.counters));

    // Auto would pick native for a fresh attach; the adopted link keeps its generic mode.
    let (mut second, mode) = load(&pair, &pins.config(false));
    assert!(second.capture.adopted());
    assert_eq!(
        mode,
        AttachedMode::Generic,
        "mode read back from the kernel"
    );
    assert_eq!(second.flows.max_flow_id(), Some(22));
    let removed = second.flows.retain(|spec, _| spec.flow_id == 21).unwrap();
    assert_eq!(
        removed.iter().map(|s| s.local).collect::<Vec<_>>(),
        vec![stale]
    );
    let kernel: Vec<SocketAddr> = second
        .flows
        .kernel_entries()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(kernel, vec![keep], "stale flow gone from the kernel map");
    assert!(second.flows.lookup(stale).is_none());
    assert_eq!(second.flows.lookup(keep).map(|(s, _)| s.flow_id), Some(21));
    second.capture.detach_and_unpin().unwrap();
    assert!(!pins.0.exists());
}

/// Pins an XDP link (and a map) for `interface` in `dir` the way an older build would have.
fn pin_foreign_layout(pair: &VethPair, dir: &Path, with_link: bool) {
    std::fs::create_dir_all(dir).unwrap();
    pair.in_recorder(|| {
        let mut loader = EbpfLoader::new();
        for name in abi::RING_NAMES {
            loader.map_max_entries(name, 4096);
        }
        let mut ebpf = loader.load(EMBEDDED_OBJECT).expect("load object");
        if with_link {
            let program: &mut Xdp = ebpf
                .program_mut(abi::PROGRAM_NAME)
                .unwrap()
                .try_into()
                .unwrap();
            program.load().unwrap();
            let id = program.attach(&pair.recorder_if, XdpMode::Driver).unwrap();
            let link = FdLink::try_from(program.take_link(id).unwrap()).unwrap();
            link.pin(dir.join(format!("link-{}", pair.recorder_if)))
                .unwrap();
        }
        let flows: &Map = ebpf.map(abi::MAP_FLOWS).unwrap();
        flows.pin(dir.join(abi::MAP_FLOWS)).unwrap();
    });
}

#[test]
fn pins_of_another_layout_are_removed_and_attach_works() {
    let pair = VethPair::new("old");
    let pins = PinDir::new("foreign");
    let old_with_link = pins.0.join("v0-0000000000000000");
    let old_maps_only = pins.0.join("v0-1111111111111111");
    pin_foreign_layout(&pair, &old_with_link, true);
    pin_foreign_layout(&pair, &old_maps_only, false);
    let old_prog = xdp_prog_id(&pair).expect("the old layout's link holds the interface");

    let (mut loaded, mode) = load(&pair, &pins.config(true));
    assert_eq!(mode, AttachedMode::Native);
    assert!(!loaded.capture.adopted(), "another layout is never adopted");
    assert!(!old_with_link.exists(), "old layout removed with its link");
    assert!(!old_maps_only.exists(), "old layout without links removed");
    assert!(pins
        .layout_dir()
        .join(format!("link-{}", pair.recorder_if))
        .exists());
    assert_ne!(xdp_prog_id(&pair), Some(old_prog));

    // The fresh attachment captures.
    let local: SocketAddr = (pair.recorder_v4, 45000).into();
    loaded
        .flows
        .insert(FlowSpec {
            flow_id: 11,
            local,
            remote: None,
            action: FlowAction::Drop,
        })
        .unwrap();
    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    send(&sender, local, 0..20);
    assert_seqs(&loaded.drain_exactly(20), 0..20, 1);
    loaded.capture.detach_and_unpin().unwrap();
    assert!(!pins.0.exists());
}

#[test]
fn pin_dir_off_bpffs_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("rec-pin-not-bpffs-{}", std::process::id()));
    let result = Capture::load(&CaptureConfig {
        pin_dir: Some(dir.clone()),
        create_pins: true,
        ..CaptureConfig::default()
    });
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Err(e @ CaptureError::NotBpffs(_)) => {
            assert!(e.to_string().contains("BPF file system"), "{e}")
        }
        Err(e) => panic!("expected NotBpffs, got {e}"),
        Ok(_) => panic!("expected NotBpffs, got a loaded capture"),
    }
}

#[test]
fn pins_are_not_left_behind_when_attaching_fails() {
    let pins = PinDir::new("fail");
    let mut capture = Capture::load(&pins.config(true)).expect("load");
    assert!(pins.layout_dir().join(abi::MAP_FLOWS).exists());
    let error = capture
        .attach("no-such-if0", AttachMode::Auto)
        .expect_err("unknown interface");
    assert!(error.to_string().contains("no-such-if0"), "{error}");
    drop(capture);
    assert!(
        !pins.layout_dir().exists(),
        "pins without a link captured nothing: removed"
    );
}

#[test]
fn adopted_rings_keep_their_size_when_the_config_changes() {
    let pair = VethPair::new("size");
    let pins = PinDir::new("size");
    let local: SocketAddr = (pair.recorder_v4, 46000).into();
    let small = CaptureConfig {
        ring_bytes: 128 << 10,
        max_flows: 1024,
        ..pins.config(true)
    };
    let (mut first, _) = load(&pair, &small);
    first
        .flows
        .insert(FlowSpec {
            flow_id: 11,
            local,
            remote: None,
            action: FlowAction::Drop,
        })
        .unwrap();
    first.capture.release_pinned().unwrap();
    drop((first.flows, first.consumer, first.counters));
    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    send(&sender, local, 0..100);

    // Larger sizes configured: the adopted maps keep theirs, and the rings are read with the
    // adopted size (a mapping sized from the config would misread or fail).
    let (mut second, _) = load(&pair, &pins.config(false));
    assert!(second.capture.adopted());
    let info = aya::maps::MapInfo::from_pin(pins.layout_dir().join(abi::RING_NAMES[0])).unwrap();
    assert_eq!(info.max_entries(), 128 << 10);
    let info = aya::maps::MapInfo::from_pin(pins.layout_dir().join(abi::MAP_FLOWS)).unwrap();
    assert_eq!(info.max_entries(), 1024);
    assert_seqs(&second.drain_exactly(100), 0..100, 1);
    send(&sender, local, 100..200);
    assert_seqs(&second.drain_exactly(100), 100..200, 1);
    second.capture.detach_and_unpin().unwrap();
    assert!(!pins.0.exists());
}

#[test]
fn restart_while_traffic_flows_loses_nothing() {
    use std::sync::{atomic::AtomicBool, Arc};

    let pair = VethPair::new("live");
    let pins = PinDir::new("live");
    let local: SocketAddr = (pair.recorder_v4, 47000).into();
    let (mut first, _) = load(&pair, &pins.config(true));
    first
        .flows
        .insert(FlowSpec {
            flow_id: 11,
            local,
            remote: None,
            action: FlowAction::Drop,
        })
        .unwrap();
    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    // Paced like a few hundred RTP streams (~20k packets/s), so the rings never fill.
    let traffic = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !stop_flag.load(Ordering::Relaxed) {
            for _ in 0..10 {
                sender.send_to(&payload(seq), local).unwrap();
                seq += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        seq
    });

    let mut records = Vec::new();
    let wait_captured = |loaded: &mut Loaded, target: u64, records: &mut Vec<OwnedRecord>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while loaded.captured() < target {
            let mut sink = VecSink::default();
            loaded.consumer.drain(&mut sink);
            records.extend(sink.records);
            assert!(Instant::now() < deadline, "traffic stalled");
            std::thread::yield_now();
        }
    };
    // Restart in the middle of the stream.
    wait_captured(&mut first, 2000, &mut records);
    first.capture.release_pinned().unwrap();
    drop((first.flows, first.consumer, first.counters));
    let (mut second, _) = load(&pair, &pins.config(false));
    assert!(second.capture.adopted());
    let at_adoption = second.captured();
    wait_captured(&mut second, at_adoption + 2000, &mut records);
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    let before = records.len();
    records.extend(second.drain_exactly((sent as usize).saturating_sub(before)));

    assert_eq!(
        second.counters.read().unwrap()[counter::RING_FULL as usize],
        0
    );
    assert_eq!(second.captured(), sent, "every packet sent was captured");
    records.sort_by_key(|r| r.header.ts_ns);
    assert_seqs(&records, 0..sent, 1);
    second.capture.detach_and_unpin().unwrap();
}

#[test]
fn adopted_array_keeps_its_layout_when_the_port_range_changes() {
    let pair = VethPair::new("lay");
    let pins = PinDir::new("layout");
    let in_first: SocketAddr = (pair.recorder_v4, 43010).into();
    let spec = FlowSpec {
        flow_id: 11,
        local: in_first,
        remote: None,
        action: FlowAction::Drop,
    };
    let (mut first, _) = load(&pair, &pins.config(true));
    first.flows.insert(spec).unwrap();
    let sender = pair.in_sender(|| UdpSocket::bind((pair.sender_v4, 0)).unwrap());
    send(&sender, in_first, 0..30);
    assert_seqs(&first.drain_exactly(30), 0..30, 1);
    first.capture.release_pinned().unwrap();
    drop((first.flows, first.consumer, first.counters));
    send(&sender, in_first, 30..60);

    // The next daemon is configured with another range: the pinned array keeps its layout (its
    // slots are where the previous daemon put them), so the adopted flow is still found.
    let moved = CaptureConfig {
        flow_ports: Some((50000, 50999)),
        ..pins.config(false)
    };
    let (mut second, _) = load(&pair, &moved);
    assert!(second.capture.adopted());
    assert_eq!(
        second.capture.flow_layout().port_base,
        u32::from(PIN_PORTS.0),
        "pinned layout kept"
    );
    assert_eq!(second.flows.lookup(in_first), Some((spec, 1)));
    assert!(second.flows.in_array(in_first));
    assert_seqs(&second.drain_exactly(30), 30..60, 1);
    // A flow of the new range is outside the adopted array: it goes to the fallback hash.
    let in_new: SocketAddr = (pair.recorder_v4, 50010).into();
    second
        .flows
        .insert(FlowSpec {
            flow_id: 12,
            local: in_new,
            ..spec
        })
        .unwrap();
    assert!(!second.flows.in_array(in_new));
    send(&sender, in_new, 0..20);
    let records = second.drain_exactly(20);
    assert!(records.iter().all(|r| r.header.flow_id == 12));
    send(&sender, in_first, 60..70);
    assert_seqs(&second.drain_exactly(10), 60..70, 1);
    assert_eq!(second.flows.stats(11).packets, 70);
    assert_eq!(second.flows.stats(12).packets, 20);
    second.capture.detach_and_unpin().unwrap();
    assert!(!pins.0.exists());
}
