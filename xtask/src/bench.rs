//! `cargo xtask bench`: the recorder's data path against a no-op XDP ceiling, tcpdump and a
//! UDP-socket recorder, on one veth pair, in one run (see README "Benchmark").
//!
//! Layout: namespace `rbench-s` runs trafgen pinned to CPU 0; namespace `rbench-r` receives on
//! `br0`, whose NAPI runs threaded and pinned to CPU 1 with the receiver process, so CPU 1's
//! /proc/stat delta is the whole cost of receiving (XDP, stack, process).
//!
//! Files: this one runs the parts and the data path; `sip.rs` (calls per second), `media.rs`
//! (calls with RTP) and `media/faults.rs` (faults under live calls), `index.rs` (index
//! searches); `report.rs` writes report.md, report.json and the loss chart.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cargo, run as run_cmd, workspace_root};
use report::rate_label;

mod index;
mod media;
mod report;
mod sip;

pub use media::{check as media_check, faults::check as faults_check};

/// One part of the bench, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Datapath,
    Sip,
    /// SIPREC calls with RTP (SIPp + trafgen) against the release daemon.
    Media,
    /// Index searches (the HTTP API's) over 1 000 000 synthetic rows, SQLite and PostgreSQL.
    Index,
    /// Faults with live calls carrying RTP: kill -9, a full spool, a detach restart.
    Faults,
}

const NS_S: &str = "rbench-s";
const NS_R: &str = "rbench-r";
const IF_S: &str = "bs0";
const IF_R: &str = "br0";
const BASE_PORT: u16 = 20000;
const REWRITES: u32 = 1000;

/// Narrows the data-path plan to some points, for profiling one case (the report then covers
/// only those).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Select {
    /// Flow counts to run, e.g. `--flows 100,2000`.
    #[arg(long, value_delimiter = ',')]
    flows: Option<Vec<u32>>,
    /// Offered rates in packets/s, `max` for trafgen flat out, e.g. `--rates 150000,max`.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    rates: Option<Vec<Option<u64>>>,
    /// Contenders to run, e.g. `--contenders ceiling,recorder`.
    #[arg(long, value_delimiter = ',', value_enum)]
    contenders: Option<Vec<Contender>>,
    /// Skip the flow-rewrite run.
    #[arg(long)]
    no_rewrite: bool,
    /// Profile the recorder with perf also in `--quick` (a full run always does).
    #[arg(long)]
    profile: bool,
    /// Profile at this offered rate (packets/s) instead of trafgen flat out.
    #[arg(long)]
    profile_rate: Option<u64>,
    /// SIP part: only these session rates (calls/s), e.g. `--sip-rates 800`, and no hold phase.
    #[arg(long, value_delimiter = ',')]
    sip_rates: Option<Vec<u32>>,
    /// Media part: call counts to run, e.g. `--calls 1000,2000` (each one runs, whatever the
    /// one before lost; without it the sweep stops at the first count with loss).
    #[arg(long, value_delimiter = ',')]
    calls: Option<Vec<u32>>,
    /// Media part: seconds of RTP per call count (default 60; quick: 10).
    #[arg(long)]
    media_secs: Option<u32>,
    /// Media part: port blocks the streams are split into (default 2); each block is sent by
    /// 50 trafgen processes, one per 20 ms slot, and the blocks' slots are staggered.
    #[arg(long)]
    media_blocks: Option<u32>,
    /// Run the faults part alone (`--faults`, every case) or some of its cases (`--faults
    /// kill9,detach-restart`); its call count is the first `--calls` (default 1 000; quick:
    /// 200) and its traffic `--media-secs` (default 30; quick: 10).
    #[arg(long, value_delimiter = ',', value_enum, num_args = 0..)]
    faults: Option<Vec<media::faults::Fault>>,
}

fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    if s == "max" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| format!("{s}: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
enum Contender {
    Ceiling,
    Recorder,
    Tcpdump,
    Socket,
}

impl Contender {
    const ALL: [Contender; 4] = [Self::Ceiling, Self::Recorder, Self::Tcpdump, Self::Socket];
    fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling (no-op XDP drop)",
            Self::Recorder => "recorder (XDP + rings + pcap writer)",
            Self::Tcpdump => "tcpdump (AF_PACKET + BPF filter, pcap)",
            Self::Socket => "socket recorder (recvmmsg, pcap)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling",
            Self::Recorder => "recorder",
            Self::Tcpdump => "tcpdump",
            Self::Socket => "socket",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Sample {
    flows: u32,
    /// Requested rate (None = trafgen flat out).
    nominal_pps: Option<u64>,
    offered: u64,
    /// Offered packets / trafgen wall time.
    offered_pps: f64,
    rx_if: u64,
    sender_tx_dropped: u64,
    written: u64,
    lost: u64,
    gap_events: u64,
    flows_with_gaps: u64,
    cpu1_s: f64,
    proc_cpu_s: f64,
    napi_cpu_s: f64,
    rss_kib: u64,
    extra: Value,
}

impl Sample {
    fn cpu_per_mpkt(&self) -> Option<f64> {
        // The receiver's own CPU (process + pinned NAPI thread): CPU 1's /proc/stat delta also
        // holds whatever else the shared machine runs there.
        let n = self.rx_if.max(1) as f64;
        (self.rx_if > 0).then(|| (self.proc_cpu_s + self.napi_cpu_s) / n * 1e6)
    }
    fn loss_pct(&self) -> f64 {
        if self.offered == 0 {
            return 0.0;
        }
        self.lost as f64 * 100.0 / self.offered as f64
    }
    fn to_json(&self) -> Value {
        json!({
            "flows": self.flows, "nominal_pps": self.nominal_pps, "offered": self.offered,
            "offered_pps": self.offered_pps.round(), "rx_interface": self.rx_if,
            "sender_tx_dropped": self.sender_tx_dropped, "written": self.written,
            "lost": self.lost, "loss_pct": self.loss_pct(), "seq_gap_events": self.gap_events,
            "flows_with_gaps": self.flows_with_gaps, "cpu1_s": self.cpu1_s,
            "process_cpu_s": self.proc_cpu_s, "napi_thread_cpu_s": self.napi_cpu_s,
            "cpu_s_per_mpkt": self.cpu_per_mpkt(), "rss_kib": self.rss_kib, "detail": self.extra,
        })
    }
}

struct Plan {
    flows: Vec<u32>,
    rates: Vec<Option<u64>>,
    min_packets: u64,
    max_packets: u64,
    secs_per_run: u64,
}

pub fn run(quick: bool, only: Option<Part>, select: &Select) -> Result<()> {
    let only = only.or(select.faults.as_ref().map(|_| Part::Faults));
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let wants = |p: Part| only.is_none_or(|o| o == p);
    if wants(Part::Datapath) {
        build()?;
    }
    let started = Instant::now();
    let mut commands: Vec<String> = Vec::new();
    let datapath = if wants(Part::Datapath) {
        Some(datapath(quick, select, &out_dir, &mut commands)?)
    } else {
        None
    };
    let sip = if wants(Part::Sip) {
        let mut plan = if quick {
            sip::SipPlan::quick()
        } else {
            sip::SipPlan::full()
        };
        if let Some(rates) = &select.sip_rates {
            plan.rates.clone_from(rates);
            plan.hold = false;
        }
        Some(
            sip::run(&plan, &out_dir, &mut commands).unwrap_or_else(|e| {
                eprintln!("bench: SIP part failed: {e:#}");
                json!({ "error": format!("{e:#}") })
            }),
        )
    } else {
        None
    };
    let media = if wants(Part::Media) {
        let plan = media::MediaPlan::new(quick, select);
        Some(
            media::run(&plan, &out_dir, &mut commands).unwrap_or_else(|e| {
                eprintln!("bench: media part failed: {e:#}");
                json!({ "error": format!("{e:#}") })
            }),
        )
    } else {
        None
    };
    // Faults run only when asked for (`--only faults` or `--faults`): each case restarts or
    // fills the daemon under 1 000 calls, a part of its own.
    let faults = (only == Some(Part::Faults) || select.faults.is_some()).then(|| {
        let plan = media::faults::FaultPlan {
            calls: select
                .calls
                .as_ref()
                .and_then(|c| c.first().copied())
                .unwrap_or(if quick { 200 } else { 1000 }),
            secs: select
                .media_secs
                .unwrap_or(if quick { 10 } else { 30 })
                .max(5),
            blocks: select.media_blocks.unwrap_or(2).clamp(1, 8),
            cases: select
                .faults
                .clone()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| media::faults::Fault::ALL.to_vec()),
        };
        media::faults::run(&plan, &out_dir, &mut commands).unwrap_or_else(|e| {
            eprintln!("bench: faults part failed: {e:#}");
            json!({ "error": format!("{e:#}") })
        })
    });
    let index = wants(Part::Index).then(|| {
        index::run(quick, &out_dir, &mut commands).unwrap_or_else(|e| {
            eprintln!("bench: index part failed: {e:#}");
            json!({ "error": format!("{e:#}") })
        })
    });
    report::write(
        &out_dir,
        quick,
        datapath.as_ref(),
        report::Parts {
            sip: sip.as_ref(),
            media: media.as_ref(),
            index: index.as_ref(),
            faults: faults.as_ref(),
        },
        &commands,
        started.elapsed(),
    )?;
    // The quick run is a check: the media part must have recorded every packet.
    if quick {
        if let Some(m) = &media {
            media::assert_zero_loss(m)?;
        }
    }
    Ok(())
}

/// Builds the daemon under test, the release binary, so that a bench never measures a stale
/// one (the eBPF object it embeds is built first by the caller).
pub(crate) fn build_daemon() -> Result<()> {
    run_cmd(cargo(None).args([
        "build",
        "--release",
        "--package",
        "recorder-user",
        "--bin",
        "recorder",
    ]))
}

/// What the data-path part measured.
struct Datapath {
    plan: Plan,
    samples: HashMap<Contender, Vec<Sample>>,
    rewrite: Sample,
    /// Where the recorder's CPU goes, per flow count (see [`profile_run`]).
    profiles: Vec<Value>,
    failures: Vec<String>,
}

fn datapath(
    quick: bool,
    select: &Select,
    out_dir: &Path,
    commands: &mut Vec<String>,
) -> Result<Datapath> {
    let out_dir = out_dir.to_path_buf();
    let plan = if quick {
        Plan {
            flows: vec![100],
            rates: vec![Some(50_000), Some(150_000), None],
            min_packets: 100_000,
            max_packets: 300_000,
            secs_per_run: 2,
        }
    } else {
        Plan {
            flows: vec![1, 100, 2000, 20000],
            rates: vec![
                Some(50_000),
                Some(100_000),
                Some(200_000),
                Some(400_000),
                None,
            ],
            min_packets: 100_000,
            max_packets: 1_000_000,
            secs_per_run: 2,
        }
    };
    let mut plan = plan;
    if let Some(flows) = &select.flows {
        plan.flows.clone_from(flows);
    }
    if let Some(rates) = &select.rates {
        plan.rates.clone_from(rates);
    }
    let contenders: Vec<Contender> = select
        .contenders
        .clone()
        .unwrap_or_else(|| Contender::ALL.to_vec());
    let net = Net::create()?;
    let mut samples: HashMap<Contender, Vec<Sample>> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    let _ = std::fs::remove_file(out_dir.join("runs.jsonl"));
    for &flows in &plan.flows {
        let cfg = out_dir.join(format!("rtp-{flows}.cfg"));
        std::fs::write(&cfg, trafgen_config(flows))?;
        for &rate in &plan.rates {
            let count = match rate {
                Some(r) => (r * plan.secs_per_run).clamp(plan.min_packets, plan.max_packets),
                None => plan.max_packets,
            };
            // 20000 flows = 10000 recordings to set up per recorder run: fewer rates there.
            if flows >= 20000 && matches!(rate, Some(r) if r != 50_000 && r != 200_000) {
                continue;
            }
            for &c in &contenders {
                let s = match net.measure(c, flows, rate, count, &cfg, &out_dir, 0, None, commands)
                {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!(
                            "bench: {} flows={flows} rate={rate:?} failed: {e:#}",
                            c.key()
                        );
                        failures.push(format!(
                            "{} flows={flows} rate={}: {e:#}",
                            c.key(),
                            rate_label(rate)
                        ));
                        continue;
                    }
                };
                let mut line = s.to_json();
                line["contender"] = json!(c.key());
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out_dir.join("runs.jsonl"))?
                    .write_all(format!("{line}\n").as_bytes())?;
                eprintln!(
                    "bench: {:<9} flows={flows:<6} rate={:<8} offered={} ({:.0} pps) rx={} written={} lost={} ({:.3}%) cpu1={:.2}s",
                    c.key(),
                    rate.map_or("max".into(), |r| r.to_string()),
                    s.offered,
                    s.offered_pps,
                    s.rx_if,
                    s.written,
                    s.lost,
                    s.loss_pct(),
                    s.cpu1_s
                );
                samples.entry(c).or_default().push(s);
            }
        }
    }
    // Flow rewrite under load: the recorder at full rate while 1000 rewrites happen.
    let rewrite = if select.no_rewrite {
        failures.push("rewrite run skipped (--no-rewrite)".into());
        Sample::default()
    } else {
        rewrite_run(
            &net,
            &plan,
            samples
                .get(&Contender::Recorder)
                .map_or(&[][..], Vec::as_slice),
            quick,
            &out_dir,
            commands,
        )?
    };
    let mut profiles = Vec::new();
    if (!quick || select.profile) && contenders.contains(&Contender::Recorder) {
        for &flows in &plan.flows {
            match profile_run(&net, &plan, flows, select.profile_rate, &out_dir, commands) {
                Ok(p) => profiles.push(p),
                Err(e) => failures.push(format!("profile flows={flows}: {e:#}")),
            }
        }
    }
    drop(net);
    Ok(Datapath {
        plan,
        samples,
        rewrite,
        profiles,
        failures,
    })
}

/// One more flat-out recorder run, under `perf record` on the receiving CPU (not in the
/// tables: sampling costs a few percent): CPU share per thread and the hottest symbols.
fn profile_run(
    net: &Net,
    plan: &Plan,
    flows: u32,
    rate: Option<u64>,
    out_dir: &Path,
    commands: &mut Vec<String>,
) -> Result<Value> {
    let cfg = out_dir.join(format!("rtp-{flows}.cfg"));
    let data = out_dir.join(format!("perf-recorder-{flows}.data"));
    let count = rate.map_or(plan.max_packets, |r| {
        (r * plan.secs_per_run).clamp(plan.min_packets, plan.max_packets)
    });
    let s = net.measure(
        Contender::Recorder,
        flows,
        rate,
        count,
        &cfg,
        out_dir,
        0,
        Some(&data),
        commands,
    )?;
    let (threads, symbols) = perf_summary(&data)?;
    eprintln!(
        "bench: profile flows={flows}: {} pps, threads {threads:?}",
        s.offered_pps.round()
    );
    Ok(json!({
        "flows": flows, "nominal_pps": rate, "offered_pps": s.offered_pps.round(), "lost": s.lost,
        "perf_data": data.display().to_string(),
        "threads_pct": threads.iter().map(|(n, p)| json!({ "thread": n, "pct": p })).collect::<Vec<_>>(),
        "top_symbols": symbols,
    }))
}

/// Per-thread shares of the samples, and the hottest symbols as JSON.
pub(crate) type PerfSummary = (Vec<(String, f64)>, Vec<Value>);

/// Thread shares (names without their ids) and the 25 hottest (thread, symbol) pairs of a
/// `perf record` file.
pub(crate) fn perf_summary(data: &Path) -> Result<PerfSummary> {
    let report = |sort: &str| -> Result<Vec<(f64, String)>> {
        let out = Command::new("perf")
            .args([
                "report",
                "--no-children",
                "--stdio",
                "-g",
                "none",
                "--sort",
                sort,
                "-i",
            ])
            .arg(data)
            .output()
            .context("perf report")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (pct, rest) = l.trim().split_once('%')?;
                Some((
                    pct.trim().parse().ok()?,
                    rest.split_whitespace().collect::<Vec<_>>().join(" "),
                ))
            })
            .collect())
    };
    // Thread names without their ids (napi/br0-1914 -> napi/br0).
    let mut threads: Vec<(String, f64)> = Vec::new();
    for (pct, comm) in report("comm")? {
        let name = comm.rsplit_once('-').map_or(comm.as_str(), |(n, id)| {
            if id.chars().all(|c| c.is_ascii_digit()) {
                n
            } else {
                comm.as_str()
            }
        });
        match threads.iter_mut().find(|(n, _)| n == name) {
            Some((_, p)) => *p += pct,
            None => threads.push((name.to_string(), pct)),
        }
    }
    let symbols: Vec<Value> = report("comm,sym")?
        .into_iter()
        .take(25)
        .map(|(pct, what)| json!({ "pct": pct, "comm_symbol": what }))
        .collect();
    Ok((threads, symbols))
}

/// The recorder at full rate while [`REWRITES`] flow rewrites happen. "Full rate" is the highest
/// rate at which the recorder lost nothing in this run's sweep (trafgen flat out if that was
/// loss-free): above it, packets are lost to the writer whether or not flows move, which would
/// hide what the rewrites themselves cost. Without a loss-free sweep point, the plan's lowest rate.
fn rewrite_run(
    net: &Net,
    plan: &Plan,
    recorder: &[Sample],
    quick: bool,
    out_dir: &Path,
    commands: &mut Vec<String>,
) -> Result<Sample> {
    let rw_flows = *plan.flows.iter().find(|&&f| f >= 100).unwrap_or(&100);
    let cfg = out_dir.join(format!("rtp-{rw_flows}.cfg"));
    std::fs::write(&cfg, trafgen_config(rw_flows))?;
    let loss_free: Vec<Option<u64>> = recorder
        .iter()
        .filter(|s| s.flows == rw_flows && s.lost == 0)
        .map(|s| s.nominal_pps)
        .collect();
    let rate = if loss_free.contains(&None) {
        None
    } else {
        loss_free
            .into_iter()
            .flatten()
            .max()
            .or_else(|| plan.rates.iter().flatten().min().copied())
    };
    let rewrite = net.measure(
        Contender::Recorder,
        rw_flows,
        rate,
        if quick { 1_000_000 } else { 2_000_000 },
        &cfg,
        out_dir,
        REWRITES,
        None,
        commands,
    )?;
    eprintln!(
        "bench: rewrite run at {}: offered={} written={} lost={} rewrites={}",
        rate_label(rate),
        rewrite.offered,
        rewrite.written,
        rewrite.lost,
        rewrite.extra["rewrites_done"]
    );
    Ok(rewrite)
}

fn build() -> Result<()> {
    run_cmd(cargo(Some("nightly")).args([
        "build",
        "--package",
        "recorder-ebpf",
        "--bin",
        "recorder-noop",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]))?;
    run_cmd(cargo(None).args([
        "build",
        "--release",
        "--package",
        "tests",
        "--bin",
        "bench_rx",
        "--bin",
        "socket_recorder",
    ]))
}

/// One trafgen template: G.711-like RTP (214-byte frames) to `flows` even ports round robin.
/// trafgen's field functions only work on header fields, so per packet the destination port
/// steps through the flows and the RTP sequence number's low byte counts up (a byte counter):
/// within one flow consecutive packets differ by `flows mod 256`, which the gap check expects.
/// The SSRC is constant; flows are told apart by port.
fn trafgen_config(flows: u32) -> String {
    let last = BASE_PORT as u32 + 2 * (flows - 1);
    let dp = if flows == 1 {
        BASE_PORT.to_string()
    } else {
        format!("dinc({BASE_PORT}, {last}, 2)")
    };
    format!(
        "{{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), ipv4(sa=10.231.0.1, da=10.231.0.2, ttl=64), \
udp(sp=40000, dp={dp}, csum=0), c8(0x80), c8(0x00), c8(0x00), dinc(0, 255, 1), c32(0), \
c32(0x5eed0001), fill(0xd5, 160) }}\n"
    )
}

/// The data-path runs' network: a veth pair tuned so that every contender receives through
/// NAPI on CPU 1.
struct Net {
    _veth: VethNamespaces,
    /// TX_RING size (KiB) flat-out trafgen runs use: None = trafgen's default (512 KiB). Set
    /// smaller after a run failed to flush its ring (see [`Net::measure`]), for the rest.
    tx_ring_kib: std::cell::Cell<Option<u32>>,
}

/// trafgen gave up on a flat-out run: a non-blocking flush of its TX_RING got EAGAIN.
#[derive(Debug)]
struct TxRingFailed(String);

impl std::fmt::Display for TxRingFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trafgen: {}", self.0)
    }
}

impl std::error::Error for TxRingFailed {}

/// TX_RING sizes (KiB) tried, in order, after trafgen's default ring failed to flush.
const TX_RING_KIB: [u32; 4] = [256, 128, 64, 32];

/// A sender and a receiver namespace joined by a veth pair (addresses /24, links and loopbacks
/// up). Leftovers of an interrupted run are deleted first; both namespaces go on drop.
pub(crate) struct VethNamespaces {
    namespaces: [&'static str; 2],
}

impl VethNamespaces {
    /// `[sender, receiver]` namespaces, interfaces, addresses and (optionally) MACs.
    pub(crate) fn create(
        namespaces: [&'static str; 2],
        interfaces: [&str; 2],
        addresses: [&str; 2],
        macs: Option<[&str; 2]>,
    ) -> Result<Self> {
        // Built first: a failure below still deletes what was made.
        let this = Self { namespaces };
        for ns in namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
            sh(&["ip", "netns", "add", ns])?;
        }
        let end = |i: usize| {
            let mut end = vec![interfaces[i], "netns", namespaces[i]];
            if let Some(macs) = &macs {
                end.extend(["address", macs[i]]);
            }
            end
        };
        let mut link = vec!["ip", "link", "add"];
        link.extend(end(0));
        link.extend(["type", "veth", "peer", "name"]);
        link.extend(end(1));
        sh(&link)?;
        for i in 0..2 {
            let (ns, dev) = (namespaces[i], interfaces[i]);
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", addresses[i]),
                "dev",
                dev,
            ])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(this)
    }
}

impl Drop for VethNamespaces {
    fn drop(&mut self) {
        for ns in self.namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

fn stat(ns: &str, dev: &str, what: &str) -> Result<u64> {
    Ok(in_ns(
        ns,
        &["cat", &format!("/sys/class/net/{dev}/statistics/{what}")],
    )?
    .trim()
    .parse()?)
}

/// GRO on the receiver and no TSO on the sender make veth receive through NAPI for every
/// receiver (not only under XDP); threaded NAPI then lets [`pin_napi`] pin it to CPU 1 and
/// [`napi_cpu`] count its CPU. `[sender, receiver]` namespaces and interfaces.
pub(crate) fn threaded_napi(namespaces: [&str; 2], interfaces: [&str; 2]) -> Result<()> {
    let ([ns_s, ns_r], [if_s, if_r]) = (namespaces, interfaces);
    in_ns(ns_r, &["ethtool", "-K", if_r, "gro", "on"])?;
    in_ns(ns_s, &["ethtool", "-K", if_s, "tso", "off"])?;
    in_ns(
        ns_r,
        &[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{if_r}/threaded"),
        ],
    )?;
    Ok(())
}

impl Net {
    fn create() -> Result<Self> {
        let veth = VethNamespaces::create(
            [NS_S, NS_R],
            [IF_S, IF_R],
            ["10.231.0.1", "10.231.0.2"],
            Some(["02:00:00:00:00:01", "02:00:00:00:00:02"]),
        )?;
        threaded_napi([NS_S, NS_R], [IF_S, IF_R])?;
        Ok(Net {
            _veth: veth,
            tx_ring_kib: std::cell::Cell::new(None),
        })
    }

    /// [`Net::measure_once`], retried for flat-out runs whose trafgen failed to flush its
    /// TX_RING (`Flushing TX_RING failed: Resource temporarily unavailable`): with a receiver
    /// attached, the frames of the default 512 KiB ring stay in flight long enough to exhaust
    /// the packet socket's send buffer (wmem_default, which trafgen cannot raise inside a
    /// network namespace), and trafgen treats the EAGAIN of its non-blocking flush as fatal.
    /// Each retry is a fresh run (new receiver) with a smaller ring (`-S`), kept for the
    /// following flat-out runs. What was done is in the sample (`detail.trafgen_tx_ring`).
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        c: Contender,
        flows: u32,
        rate: Option<u64>,
        count: u64,
        cfg: &Path,
        out_dir: &Path,
        rewrites: u32,
        profile: Option<&Path>,
        commands: &mut Vec<String>,
    ) -> Result<Sample> {
        let mut failures: Vec<String> = Vec::new();
        loop {
            let ring = self.tx_ring_kib.get();
            match self.measure_once(
                c, flows, rate, count, cfg, out_dir, rewrites, profile, commands,
            ) {
                Ok(mut s) => {
                    if rate.is_none() {
                        s.extra["trafgen_tx_ring"] = json!({
                            "ring_kib": ring.map_or(json!("default (512)"), |k| json!(k)),
                            "failed_before": failures,
                        });
                    }
                    return Ok(s);
                }
                Err(e) => {
                    let Some(tx) = e.downcast_ref::<TxRingFailed>() else {
                        return Err(e);
                    };
                    let next = match ring {
                        None => Some(TX_RING_KIB[0]),
                        Some(k) => TX_RING_KIB.iter().copied().find(|&x| x < k),
                    };
                    let Some(next) = next else {
                        return Err(e.context(format!(
                            "trafgen TX_RING flush failed at every ring size tried ({})",
                            failures.join("; ")
                        )));
                    };
                    let label = ring.map_or("default ring".to_string(), |k| format!("{k} KiB"));
                    eprintln!(
                        "bench: {} flows={flows} flat out: {tx} with the {label}; retrying with -S {next}KiB",
                        c.key()
                    );
                    failures.push(format!("{label}: {}", tx.0));
                    self.tx_ring_kib.set(Some(next));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn measure_once(
        &self,
        c: Contender,
        flows: u32,
        rate: Option<u64>,
        count: u64,
        cfg: &Path,
        out_dir: &Path,
        rewrites: u32,
        profile: Option<&Path>,
        commands: &mut Vec<String>,
    ) -> Result<Sample> {
        let root = workspace_root();
        let bin = |name: &str| root.join("target/release").join(name);
        let run_dir = out_dir.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)?;
        let pcap = run_dir.join("capture.pcap");
        let spool = run_dir.join("spool");
        let last_port = BASE_PORT as u32 + 2 * (flows - 1);
        let mut argv: Vec<String> = vec!["taskset".into(), "-c".into(), "1".into()];
        match c {
            Contender::Ceiling => argv.extend([
                bin("bench_rx").display().to_string(),
                "noop".into(),
                IF_R.into(),
                root.join("target/bpfel-unknown-none/release/recorder-noop")
                    .display()
                    .to_string(),
            ]),
            Contender::Recorder => argv.extend([
                bin("bench_rx").display().to_string(),
                "recorder".into(),
                IF_R.into(),
                crate::ebpf_object().display().to_string(),
                spool.display().to_string(),
                flows.to_string(),
                BASE_PORT.to_string(),
                rewrites.to_string(),
            ]),
            Contender::Tcpdump => argv.extend([
                "tcpdump".into(),
                "-i".into(),
                IF_R.into(),
                "-n".into(),
                "-s".into(),
                "0".into(),
                "-B".into(),
                "16384".into(),
                "-w".into(),
                pcap.display().to_string(),
                format!("udp and dst portrange {BASE_PORT}-{last_port}"),
            ]),
            Contender::Socket => argv.extend([
                bin("socket_recorder").display().to_string(),
                "10.231.0.2".into(),
                BASE_PORT.to_string(),
                flows.to_string(),
                pcap.display().to_string(),
            ]),
        }
        let mut rx = Receiver::start(NS_R, &argv, c == Contender::Tcpdump)?;
        let napi = pin_napi(IF_R)?;
        let napi_before = napi_cpu(&napi);

        let rx0 = stat(NS_R, IF_R, "rx_packets")?;
        let txd0 = stat(NS_S, IF_S, "tx_dropped")?;
        let cpu0 = cpu1_busy()?;
        let mut targv: Vec<String> = [
            "ip", "netns", "exec", NS_S, "taskset", "-c", "0", "trafgen", "-o", IF_S, "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        targv.push(cfg.display().to_string());
        targv.extend(["-P", "1", "-Q", "-n"].iter().map(|s| s.to_string()));
        targv.push(count.to_string());
        if let Some(r) = rate {
            targv.push("-b".into());
            targv.push(format!("{r}pps"));
        } else if let Some(kib) = self.tx_ring_kib.get() {
            targv.push("-S".into());
            targv.push(format!("{kib}KiB"));
        }
        let cmdline = targv.join(" ");
        if !commands.contains(&cmdline) {
            commands.push(cmdline);
        }
        let rcmd = format!("ip netns exec {NS_R} {}", argv.join(" "));
        if !commands.contains(&rcmd) {
            commands.push(rcmd);
        }
        // perf on the receiving CPU for the traffic window (profile runs only).
        if let Some(data) = profile {
            let cmd = format!(
                "taskset -c 0 perf record -F 999 -C 1 -g -o {}",
                data.display()
            );
            if !commands.contains(&cmd) {
                commands.push(cmd);
            }
        }
        let perf = match profile {
            Some(data) => Some(
                Command::new("taskset")
                    .args([
                        "-c", "0", "perf", "record", "-F", "999", "-C", "1", "-g", "-o",
                    ])
                    .arg(data)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("perf record")?,
            ),
            None => None,
        };
        let t0 = Instant::now();
        let tg = Command::new(&targv[0])
            .args(&targv[1..])
            .stdin(Stdio::null())
            .output()
            .context("trafgen")?;
        let tg_secs = t0.elapsed().as_secs_f64();
        let tg_out = String::from_utf8_lossy(&tg.stdout);
        let tg_err = String::from_utf8_lossy(&tg.stderr);
        if let Some(l) = tg_out
            .lines()
            .chain(tg_err.lines())
            .find(|l| l.contains("Flushing TX_RING failed"))
        {
            bail!(TxRingFailed(l.trim().to_string()));
        }
        let offered = tg_out
            .lines()
            .find(|l| l.contains("packets outgoing"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| {
                format!(
                    "trafgen output: {tg_out} {}",
                    String::from_utf8_lossy(&tg.stderr)
                )
            })?;
        // Quiet: the interface counter stops moving.
        let mut last = stat(NS_R, IF_R, "rx_packets")?;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = stat(NS_R, IF_R, "rx_packets")?;
            if now == last {
                break;
            }
            last = now;
        }
        // Let the receiver empty its queues before CPU is read.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(mut perf) = perf {
            // SAFETY: plain kill(2) on our own child; perf writes its file on SIGINT.
            unsafe { libc::kill(perf.id() as libc::pid_t, libc::SIGINT) };
            perf.wait().context("perf record")?;
        }
        let cpu1 = cpu1_busy()? - cpu0;
        let napi_cpu_s = napi_cpu(&napi) - napi_before;
        let rx_if = last - rx0;
        let sender_tx_dropped = stat(NS_S, IF_S, "tx_dropped")? - txd0;
        let (detail, proc_cpu_s, rss_kib) = rx.stop()?;

        let (written, gaps, flows_with_gaps) = match c {
            Contender::Ceiling => (0, 0, 0),
            Contender::Recorder => count_pcaps(&spool, flows)?,
            Contender::Tcpdump | Contender::Socket => count_pcaps(&run_dir, flows)?,
        };
        let lost = match c {
            Contender::Ceiling => offered.saturating_sub(rx_if),
            _ => offered.saturating_sub(written),
        };
        let _ = std::fs::remove_dir_all(&run_dir);
        Ok(Sample {
            flows,
            nominal_pps: rate,
            offered,
            offered_pps: offered as f64 / tg_secs,
            rx_if,
            sender_tx_dropped,
            written,
            lost,
            gap_events: gaps,
            flows_with_gaps,
            cpu1_s: cpu1,
            proc_cpu_s,
            napi_cpu_s,
            rss_kib,
            extra: detail,
        })
    }
}

/// A receiver process in the recorder namespace.
struct Receiver {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    tcpdump: bool,
    /// tcpdump's stderr after "listening" (its closing counts: captured, dropped by kernel).
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Receiver {
    fn start(ns: &str, argv: &[String], tcpdump: bool) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if tcpdump {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .with_context(|| format!("starting {argv:?}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut stderr = None;
        if tcpdump {
            // tcpdump says "listening on ..." on stderr once its socket and filter are set.
            let mut err = BufReader::new(child.stderr.take().expect("piped"));
            let mut line = String::new();
            err.read_line(&mut line)?;
            if !line.contains("listening") {
                bail!("tcpdump did not start: {line}");
            }
            stderr = Some(std::thread::spawn(move || {
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut rest);
                rest
            }));
        } else {
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            if line.trim() != "ready" {
                let _ = child.kill();
                bail!("receiver did not start: {line:?}");
            }
        }
        Ok(Self {
            child,
            stdout: Some(stdout),
            tcpdump,
            stderr,
        })
    }

    /// Stops the receiver; returns its JSON report (tcpdump: its closing counts), CPU seconds
    /// and peak RSS (KiB).
    fn stop(&mut self) -> Result<(Value, f64, u64)> {
        let pid = self.child.id();
        if self.tcpdump {
            let (cpu, rss) = proc_usage(pid)?;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
            self.child.wait()?;
            let text = self
                .stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            // "N packets captured", "N packets received by filter", "N packets dropped by kernel"
            let count = |what: &str| {
                text.lines()
                    .find(|l| l.contains(what))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
            };
            return Ok((
                json!({
                    "captured": count("captured"),
                    "received_by_filter": count("received by filter"),
                    "dropped_by_kernel": count("dropped by kernel"),
                }),
                cpu,
                rss,
            ));
        }
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let mut line = String::new();
        self.stdout.take().expect("stdout").read_line(&mut line)?;
        self.child.wait()?;
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("receiver report: {line:?}"))?;
        let cpu = v["user_s"].as_f64().unwrap_or(0.0) + v["sys_s"].as_f64().unwrap_or(0.0);
        let rss = v["max_rss_kib"].as_u64().unwrap_or(0);
        Ok((v, cpu, rss))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime+stime (s) and VmHWM (KiB) of a process.
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let cpu = proc_cpu(pid).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((cpu, rss))
}

fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

/// Busy seconds of CPU 1 (user, nice, system, irq, softirq, steal).
fn cpu1_busy() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu1 "))
        .context("no cpu1 in /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok((v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / clk_tck())
}

/// Pins the receive NAPI kthreads of `dev` to CPU 1; returns their pids.
fn pin_napi(dev: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with(&format!("napi/{dev}-")) {
            let _ = sh(&["taskset", "-p", "-c", "1", &pid.to_string()]);
            pids.push(pid);
        }
    }
    Ok(pids)
}

fn napi_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| proc_cpu(p)).sum()
}

/// Counts pcap records under `dir` (recursively) and RTP sequence gaps per flow (port).
/// Returns (records, gap events, flows with gaps).
fn count_pcaps(dir: &Path, flows: u32) -> Result<(u64, u64, u64)> {
    let stride = (flows % 256) as u8;
    let mut last: HashMap<u16, u8> = HashMap::new();
    let mut gapped: HashMap<u16, u64> = HashMap::new();
    let mut records = 0;
    let mut files = Vec::new();
    collect_pcaps(dir, &mut files)?;
    for f in files {
        let data = std::fs::read(&f)?;
        if data.len() < 24 {
            continue;
        }
        let mut off = 24;
        while off + 16 <= data.len() {
            let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into()?) as usize;
            let start = off + 16;
            let end = start + incl;
            if end > data.len() {
                break;
            }
            records += 1;
            if let Some((port, seq)) = rtp_of(&data[start..end]) {
                if let Some(prev) = last.insert(port, seq) {
                    if seq != prev.wrapping_add(stride) {
                        *gapped.entry(port).or_default() += 1;
                    }
                }
            }
            off = end;
        }
    }
    Ok((records, gapped.values().sum(), gapped.len() as u64))
}

fn collect_pcaps(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd {
        let p = e?.path();
        if p.is_dir() {
            collect_pcaps(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "pcap") {
            out.push(p);
        }
    }
    Ok(())
}

/// Destination port and RTP sequence low byte of an Ethernet/IPv4/UDP frame.
fn rtp_of(frame: &[u8]) -> Option<(u16, u8)> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ihl = (frame.get(14)? & 0x0f) as usize * 4;
    if *frame.get(23)? != 17 {
        return None;
    }
    let udp = 14 + ihl;
    let port = u16::from_be_bytes(frame.get(udp + 2..udp + 4)?.try_into().ok()?);
    let seq_lo = *frame.get(udp + 8 + 3)?;
    Some((port, seq_lo))
}

/// Free bytes on the file system holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail * st.f_frsize)
}
