//! Receiver side of `cargo xtask bench` (run in the recorder namespace, pinned to one CPU).
//!
//! `bench_rx noop <iface> <object>`: attaches the no-op XDP drop program (the ceiling).
//! `bench_rx recorder <iface> <object> <spool> <flows> <base-port> <rewrites>`: the recorder's
//! data path in process: loads the real XDP object with `Capture`, pins `flows` flows (even
//! ports from `base-port`, two streams per recording) with `BpfFlowTable`, drains the rings into
//! the real pcap/WAV writer, and optionally rewrites flows `rewrites` times while traffic runs.
//!
//! Both print `ready` once attached, run until a line arrives on stdin (or stdin closes), then
//! print one JSON object with their counts, CPU time and peak RSS. The recorder's `user_s` and
//! `sys_s` cover the traffic window (from `ready` until every packet is written); creating and
//! finishing the recordings are in `setup_cpu_s` and `shutdown_cpu_s`.

use std::{
    io::BufRead,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use recorder::{
    capture::{
        loader::{Capture, CaptureConfig},
        ring::RingConsumer,
    },
    events::{CallIds, Codec, SessionEvent, StreamInfo},
    flow::{FlowAction, FlowControl, FlowSpec},
    writer::{self, WriterConfig},
};
use recorder_ebpf::abi;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const RECORDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("noop") if args.len() == 3 => noop(&args[1], &args[2]),
        Some("recorder") if args.len() == 7 => recorder(
            &args[1],
            &args[2],
            PathBuf::from(&args[3]),
            args[4].parse().context("flows")?,
            args[5].parse().context("base port")?,
            args[6].parse().context("rewrites")?,
        ),
        _ => bail!(
            "usage: bench_rx noop <iface> <object> | recorder <iface> <object> <spool> <flows> <base-port> <rewrites>"
        ),
    }
}

/// Blocks until the controller says stop (a line on stdin, or EOF).
fn wait_for_stop() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn ready() {
    println!("ready");
}

/// This process' user and system CPU seconds and peak RSS in KiB.
fn self_usage() -> (f64, f64, u64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime), peak_rss_kib())
}

fn noop(iface: &str, object: &str) -> Result<()> {
    use aya::programs::{Xdp, XdpMode};
    let mut ebpf = aya::Ebpf::load_file(object).context("loading the no-op object")?;
    let prog: &mut Xdp = ebpf
        .program_mut("noop_drop")
        .context("noop_drop missing")?
        .try_into()?;
    prog.load()?;
    let mode = match prog.attach(iface, XdpMode::Driver) {
        Ok(_) => "native",
        Err(_) => {
            prog.attach(iface, XdpMode::Skb)?;
            "generic"
        }
    };
    ready();
    wait_for_stop();
    let (user, sys, rss) = self_usage();
    println!(
        "{}",
        json!({ "mode": mode, "user_s": user, "sys_s": sys, "max_rss_kib": rss })
    );
    Ok(())
}

fn recorder(
    iface: &str,
    object: &str,
    spool: PathBuf,
    flows: u32,
    base_port: u16,
    rewrites: u32,
) -> Result<()> {
    // The writer keeps a pcap and a WAV open per recording up to a quarter of the limit (the
    // daemon raises its own limit to the hard one).
    let lim = libc::rlimit {
        rlim_cur: 4 * flows as u64 + 1024,
        rlim_max: 4 * flows as u64 + 1024,
    };
    // SAFETY: valid rlimit struct; failure shows up later as EMFILE.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let bytes = std::fs::read(object).with_context(|| format!("reading {object}"))?;
    let config = CaptureConfig {
        max_flows: (flows * 2).max(abi::DEFAULT_MAX_FLOWS),
        // As the daemon: the flows' ports are the RTP port range at the media address.
        flow_addrs: vec![IpAddr::V4(RECORDER_ADDR)],
        flow_ports: Some((
            base_port,
            (u32::from(base_port) + 2 * flows).min(65535) as u16,
        )),
        ..CaptureConfig::default()
    };
    let mut capture = Capture::load_object(&bytes, &config)?;
    let mode = capture.attach(iface, recorder::capture::loader::AttachMode::Auto)?;
    let mut table = capture.take_flow_table()?;
    let counters = Arc::new(capture.take_counters()?);
    let consumer = RingConsumer::new(capture.take_rings()?)?;

    let mut wconfig = WriterConfig::new(spool);
    wconfig.min_free_bytes = 0;
    wconfig.media_floor_bytes = 0;
    wconfig.host = "bench".into();
    let (handle, mut sink) = writer::start(wconfig)?;

    // Two streams per recording, as a SIPREC session with two audio m-lines.
    let local = move |k: u32| SocketAddr::new(IpAddr::V4(RECORDER_ADDR), base_port + 2 * k as u16);
    let spec = move |k: u32, remote: Option<SocketAddr>| FlowSpec {
        flow_id: k as u64 + 1,
        local: local(k),
        remote,
        action: FlowAction::Drop,
    };
    let now = SystemTime::now();
    for first in (0..flows).step_by(2) {
        let streams: Vec<StreamInfo> = (first..(first + 2).min(flows))
            .map(|k| {
                table.insert(spec(k, None))?;
                Ok(StreamInfo {
                    index: (k - first) as usize,
                    label: (k - first).to_string(),
                    media: "audio".into(),
                    flow_id: k as u64 + 1,
                    rtcp_flow_id: None,
                    local_port: local(k).port(),
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
                    paused: false,
                    srtp: false,
                    sdes: None,
                })
            })
            .collect::<Result<_>>()?;
        handle.event(SessionEvent::Started {
            id: format!("bench-{first:05}"),
            at: now,
            ids: CallIds {
                sip_call_id: format!("bench-{first}"),
                ..CallIds::default()
            },
            streams,
            participants: Vec::new(),
            metadata: None,
        });
    }
    handle.sync();
    let setup_rss = self_usage().2;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let token = CancellationToken::new();
    let drain_token = token.clone();
    let drainer = std::thread::spawn(move || {
        runtime.block_on(async move {
            let consumer = consumer
                .run(&mut sink, Duration::from_millis(10), drain_token)
                .await;
            consumer.stats
        })
    });

    // Flow rewrites under load: each flips a flow between "any source" and "any port from the
    // sender address" (a re-INVITE changing the remote). Both accept the traffic, so every packet
    // lost is lost by the rewrite. Starts once traffic is seen, spread over ~1 s.
    let table = Arc::new(Mutex::new(table));
    let stop = Arc::new(AtomicBool::new(false));
    let rewriter = {
        let table = table.clone();
        let stop = stop.clone();
        let counters_seen = counters.clone();
        std::thread::spawn(move || -> Result<(u32, f64)> {
            if rewrites == 0 {
                return Ok((0, 0.0));
            }
            while counters_seen.read()?[abi::counter::MATCHED as usize] == 0 {
                if stop.load(Ordering::Relaxed) {
                    return Ok((0, 0.0));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let started = Instant::now();
            let mut done = 0;
            for i in 0..rewrites {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = i % flows;
                let remote = if (i / flows).is_multiple_of(2) {
                    Some(SocketAddr::new(IpAddr::V4(SENDER_ADDR), 0))
                } else {
                    None
                };
                table
                    .lock()
                    .expect("table")
                    .rewrite(local(k), spec(k, remote))?;
                done += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok((done, started.elapsed().as_secs_f64()))
        })
    };

    // CPU is reported for the traffic window only (from here until every packet is written):
    // creating the recordings before and finishing them after (an fsync per file) are per-call
    // costs, not per-packet ones, and with thousands of recordings and a few seconds of traffic
    // they outweighed the packets. They are reported apart (`setup_cpu_s`, `shutdown_cpu_s`).
    let (user0, sys0, _) = self_usage();
    ready();
    wait_for_stop();
    stop.store(true, Ordering::Relaxed);
    let (rewrites_done, rewrite_secs) = rewriter.join().expect("rewriter")?;
    token.cancel();
    let consumer_stats = drainer.join().expect("drainer");
    handle.sync();
    let (user1, sys1, _) = self_usage();
    let named = counters.named()?;
    let wstats = handle.shutdown();
    let (user2, sys2, rss) = self_usage();
    let (user, sys) = (user1 - user0, sys1 - sys0);
    let counters: serde_json::Map<String, serde_json::Value> = named
        .into_iter()
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect();
    println!(
        "{}",
        json!({
            "mode": mode.to_string(),
            "user_s": user, "sys_s": sys, "max_rss_kib": rss, "setup_rss_kib": setup_rss,
            "setup_cpu_s": user0 + sys0, "shutdown_cpu_s": (user2 + sys2) - (user1 + sys1),
            "xdp": counters,
            "consumer_records": consumer_stats.records,
            "consumer_wakeups": consumer_stats.wakeups,
            "consumer_stalls": consumer_stats.stalls,
            "consumer_stalled_us": consumer_stats.stalled_us,
            "consumer_longest_stall_us": consumer_stats.longest_stall_us,
            "writer_packets_in": wstats.packets_in,
            "writer_shards": wstats.shards,
            "writer_unknown_flow": wstats.unknown_flow,
            "writer_pcap_write_failed": wstats.pcap_write_failed,
            "rewrites_done": rewrites_done,
            "rewrite_secs": rewrite_secs,
        })
    );
    Ok(())
}

/// Peak RSS of this process image in KiB (`VmHWM`; `ru_maxrss` would also count the image of the
/// parent that forked us before `exec`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
