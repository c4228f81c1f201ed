//! The media part of `cargo xtask bench`: SIPREC calls with RTP against the real release daemon.
//!
//! Same namespaces and daemon as the SIP part (`sip.rs`: `rbench-sip-s` runs SIPp, trafgen and
//! tcpdump pinned to CPU 0; `rbench-sip-r` runs the daemon pinned to CPU 1, its XDP program on
//! `bsr0`, whose NAPI runs threaded and pinned to CPU 1 as in the data-path part). For each call
//! count N, on a fresh daemon:
//!
//! 1. SIPp (`tests/sipp/siprec_bench.xml`) opens N recording sessions, two PCMU streams each,
//!    and holds them; once all N are up it is paused (SIGSTOP: holding thousands of calls takes
//!    CPU the sender needs).
//! 2. The answered RTP ports come from the daemon's `recorder flows --json` (checked: 4 entries
//!    per call, RTP even with its RTCP at +1, all in the kernel map; contiguity is not assumed).
//! 3. trafgen sends 50 packets/s to each of the 2N ports for `secs` seconds: true per-stream RTP
//!    (sequence +1, timestamp +160, one SSRC per stream) from one template per process (see
//!    [`template`]). The ports are split into blocks; each block is sent by 50 processes, one
//!    per 20 ms slot of the second, each sending one packet per stream per second (trafgen's
//!    `-b` sends a second's budget at once), the blocks' slots staggered. Each stream thus gets
//!    a packet every 20 ms; the receiver sees a burst of 2N / blocks packets every
//!    20 / blocks ms. tcpdump captures the same traffic on `bsr0` (the baseline; its timestamps
//!    give the 10 ms peak arrival rate).
//! 4. SIPp resumes (SIGCONT) and ends the calls (BYE). Counted: what trafgen sent, what XDP
//!    matched and captured (`recorder status`), what every recording's pcap holds per stream
//!    (packets, sequence gaps, duplicates), WAV frames per channel against the call's
//!    duration, what tcpdump captured; the daemon's CPU per packet (process + NAPI thread).
//!
//! The sweep stops at the first call count with loss (or a failed run: a trafgen process that
//! overran its nominal time by more than a second, a failed call).

use std::{
    fmt::Write as _,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    cpu1_busy, napi_cpu, pin_napi, proc_cpu,
    sip::{Daemon, LogWatch, Sipp, SpoolFs, IF_R, IF_S, IP_R, IP_S, NS_R, NS_S, SPOOL_NOTE},
    stat, threaded_napi, Receiver, Select, VethNamespaces,
};
use crate::workspace_root;

pub mod faults;
mod files;
use files::{read_baseline, read_recordings};

const MAC_S: &str = "02:00:00:00:01:01";
const MAC_R: &str = "02:00:00:00:01:02";
/// PCMU at 20 ms per packet: 50 packets and 8 000 samples per second, 160 per packet.
const PACKETS_PER_SEC: u32 = 50;
const SAMPLES_PER_PACKET: u32 = 160;
const SLOT_US: u64 = 1_000_000 / PACKETS_PER_SEC as u64;
/// Every stream's SSRC is this plus its port.
const SSRC_BASE: u32 = 0x5eed_0000;
/// Calls per second while the sessions are set up (the SIP part holds 10 000 at this rate).
const RAMP_RATE: u32 = 200;
/// Ring bytes per CPU: 10 000 calls are 1 Mpps of 256-byte records, 256 MB/s; 64 MiB rings
/// buffer a quarter of a second of that (8 MiB, the default, 31 ms).
const RING_BYTES: u64 = 64 << 20;

/// What one media run does.
pub struct MediaPlan {
    /// Call counts, in order.
    pub calls: Vec<u32>,
    /// Stop at the first call count with loss (not when the counts were given explicitly).
    pub stop_at_loss: bool,
    /// Seconds of RTP.
    pub secs: u32,
    /// Port blocks: each is sent by 50 trafgen processes (one per 20 ms slot), the blocks'
    /// slots staggered by 20 ms / blocks.
    pub blocks: u32,
    pub ramp_rate: u32,
    /// `perf record -C 1` during each run's traffic (`--profile`).
    pub profile: bool,
}

impl MediaPlan {
    pub fn new(quick: bool, select: &Select) -> Self {
        let (calls, secs) = if quick {
            (vec![200], 10)
        } else {
            (vec![1000, 2000, 4000, 5000, 10_000], 60)
        };
        Self {
            stop_at_loss: select.calls.is_none(),
            calls: select.calls.clone().unwrap_or(calls),
            secs: select.media_secs.unwrap_or(secs).max(1),
            blocks: select.media_blocks.unwrap_or(2).clamp(1, 8),
            ramp_rate: RAMP_RATE,
            profile: select.profile,
        }
    }
}

/// The quick media check `cargo xtask test` runs after the cargo tests (200 calls, 10 s of
/// RTP): fails unless every packet was recorded. Its report goes to `target/bench-check/`.
pub fn check() -> Result<()> {
    let out = workspace_root().join("target/bench-check");
    std::fs::create_dir_all(&out)?;
    let started = Instant::now();
    let plan = MediaPlan::new(true, &Select::default());
    let mut commands = Vec::new();
    let media = run(&plan, &out, &mut commands)?;
    std::fs::write(
        out.join("media.json"),
        serde_json::to_string_pretty(&json!({ "media": media, "commands": commands }))?,
    )?;
    std::fs::write(out.join("media.md"), markdown(&media)?)?;
    eprintln!(
        "media check: {:.0} s, report in {}/media.md",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    assert_zero_loss(&media)
}

/// Fails unless every call count of the media part ran and lost nothing.
pub fn assert_zero_loss(media: &Value) -> Result<()> {
    if let Some(e) = media["error"].as_str() {
        bail!("media part failed: {e}");
    }
    let runs = media["runs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if runs.is_empty() {
        bail!("media part ran no call count");
    }
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| r["zero_loss"] != true)
        .map(|r| {
            format!(
                "{} calls: {}",
                r["calls"],
                r["result"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if !bad.is_empty() {
        bail!("media part did not record every packet: {}", bad.join("; "));
    }
    Ok(())
}

/// Runs every call count of the plan; returns the report's `media` section.
pub fn run(plan: &MediaPlan, out_dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    super::build_daemon()?;
    let dir = out_dir.join("media");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let spool_fs = SpoolFs::mount(&dir.join("spool"))?;
    let _net = VethNamespaces::create(
        [NS_S, NS_R],
        [IF_S, IF_R],
        [IP_S, IP_R],
        Some([MAC_S, MAC_R]),
    )?;
    threaded_napi([NS_S, NS_R], [IF_S, IF_R])?;
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut zero_loss: Option<u32> = None;
    for &n in &plan.calls {
        let r = run_calls(plan, n, &dir, commands).unwrap_or_else(|e| {
            eprintln!("bench: media calls={n} failed to run: {e:#}");
            json!({ "calls": n, "error": format!("{e:#}"), "zero_loss": false,
                    "result": format!("failed to run: {e:#}") })
        });
        let ok = r["zero_loss"] == true;
        if ok {
            zero_loss = Some(zero_loss.map_or(n, |z| z.max(n)));
        }
        runs.push(r);
        if !ok && plan.stop_at_loss {
            break;
        }
    }
    if std::env::var_os("BENCH_MEDIA_KEEP").is_some() {
        spool_fs.keep();
    }
    Ok(json!({
        "zero_loss_calls": zero_loss,
        "traffic_secs": plan.secs,
        "blocks": plan.blocks,
        "ramp_rate": plan.ramp_rate,
        "runs": runs,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "notes": [
            "SIPp, trafgen and tcpdump on CPU 0; the daemon and bsr0's threaded NAPI on CPU 1, on a 2-core machine shared with other builds: figures are noisy.",
            SPOOL_NOTE,
            "RTP: 214-byte frames (PCMU, 160 payload bytes), 50 packets/s per stream, sequence +1, timestamp +160 and one SSRC (0x5eed0000 + port) per stream. One trafgen template per process; the UDP and RTP headers are written through a second ipv4() header (trafgen has no RTP header and applies counters to header fields only; see xtask/src/bench/media.rs).",
            "Pacing: each port block is sent by 50 trafgen processes (-b <streams>pps: one packet per stream per second, sent at once), started 20 ms apart, the blocks staggered; every stream gets a packet every 20 ms.",
            "Loss = packets trafgen sent to answered ports that are not in the recordings' pcaps (per stream, by RTP sequence number); a trafgen process that overran its nominal time by more than 1 s fails the run (veth pushes back on the sender instead of dropping).",
            "Daemon CPU per packet = daemon process + bsr0 NAPI thread CPU over the traffic window / packets received on bsr0; the daemon drops the media in XDP (flow_action = drop, the default), so tcpdump's baseline is the same trafgen configuration sent again after the daemon stopped.",
        ],
    }))
}

/// A block of answered RTP ports `first, first + 2, ...` (`ports` of them) sent by one set of
/// trafgen processes, plus an unanswered filler port after them when `ports` is even (the
/// counters need an odd port count, see [`template`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Block {
    first: u16,
    ports: u32,
    filler: bool,
}

impl Block {
    /// Ports in the template's round robin (odd).
    fn round(&self) -> u32 {
        self.ports + u32::from(self.filler)
    }
    fn last(&self) -> u16 {
        self.first + 2 * (self.round() as u16 - 1)
    }
}

/// Maximal runs of ports `p, p + 2, ...` in sorted `ports`: (first, count).
fn runs_of(ports: &[u16]) -> Vec<(u16, u32)> {
    let mut runs: Vec<(u16, u32)> = Vec::new();
    for &p in ports {
        match runs.last_mut() {
            Some((first, n)) if u32::from(*first) + 2 * *n == u32::from(p) => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Splits the runs into about `target` blocks of odd size; only the last block of a run may
/// be even, with the port after the run (unanswered, since the run is maximal) as filler.
fn blocks_of(runs: &[(u16, u32)], target: u32) -> Vec<Block> {
    let total: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
    let mut out = Vec::new();
    for &(first, len) in runs {
        let share = (u64::from(target) * u64::from(len)).div_ceil(total.max(1));
        let m = (share.max(1) as u32).min(len);
        let mut q = len / m;
        if q % 2 == 0 {
            q = q.saturating_sub(1).max(1);
        }
        let mut p = first;
        for i in 0..m {
            let ports = if i + 1 < m { q } else { len - (m - 1) * q };
            out.push(Block {
                first: p,
                ports,
                filler: ports % 2 == 0,
            });
            p += 2 * ports as u16;
        }
    }
    out
}

/// Modular inverse of odd `a` modulo 2^bits (Newton's iteration).
fn inverse_pow2(a: u64, bits: u32) -> u64 {
    debug_assert!(a % 2 == 1);
    let mut x: u64 = 1;
    for _ in 0..6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
    }
    if bits >= 64 {
        x
    } else {
        x & ((1u64 << bits) - 1)
    }
}

/// The trafgen template of one process: block `b`, 20 ms slot `slot` of the second.
///
/// trafgen has no RTP header, and its counters (`dinc`) step header fields only, once per
/// packet: round robin over F ports moves a counter by F * step between two packets of the
/// same stream, so with `step = want * F^-1` (mod 2^k, F odd) each stream advances by `want`.
/// The only header trafgen lets follow `udp()` is `dns()`, whose fields are 16 bits (the
/// sequence would be a masked sub-field, the timestamp two unrelated 16-bit halves). So the
/// UDP and RTP headers are written as a second `ipv4()` header (trafgen does IP in IP), the
/// outer header saying UDP:
///
/// | bytes | inner ipv4 field | as UDP / RTP |
/// |---|---|---|
/// | 0-1 | ver 9, ihl 12, tos 64 | UDP source port 40000 |
/// | 2-3 | len: `dinc` over the block's ports | UDP destination port |
/// | 4-5 | id 180 | UDP length |
/// | 6-7 | flags, fragment offset 0 | UDP checksum 0 (none) |
/// | 8-9 | ttl 128, proto 0 | RTP V=2, PT 0 (PCMU) |
/// | 10-11 | csum: initial `slot`, `dinc(50 F^-1 mod 2^16)` | RTP sequence |
/// | 12-15 | saddr: initial `160 slot`, `dinc(8000 F^-1 mod 2^32)` | RTP timestamp |
/// | 16-19 | daddr: `dinc` in step with the port | RTP SSRC |
///
/// Each process sends one packet per stream per second (50 processes per block), so within
/// one process a stream's sequence advances by 50 and its timestamp by 8 000; the process of
/// slot s starts both s (x 160) ahead. A counter given only a step (`dinc(step)`) starts at the
/// field's value and wraps at 2^32 (trafgen computes `(val + step) mod (2^32 - 1)` in 32 bits,
/// which is the 2^32 wrap except for a sum of exactly 2^32 - 1). Setting `csum` also stops
/// trafgen from computing the inner header's checksum over the sequence number.
fn template(block: &Block, slot: u32) -> String {
    let f = u64::from(block.round());
    let seq_step = (u64::from(PACKETS_PER_SEC) * inverse_pow2(f, 16)) & 0xffff;
    let ts_step =
        (u64::from(PACKETS_PER_SEC * SAMPLES_PER_PACKET) * inverse_pow2(f, 32)) & 0xffff_ffff;
    let (first, last) = (u32::from(block.first), u32::from(block.last()));
    let (port, ssrc) = if f == 1 {
        (first.to_string(), (SSRC_BASE + first).to_string())
    } else {
        (
            format!("dinc({first}, {last}, 2)"),
            format!("dinc({}, {}, 2)", SSRC_BASE + first, SSRC_BASE + last),
        )
    };
    format!(
        "{{ eth(da={MAC_R}, sa={MAC_S}), ipv4(sa={IP_S}, da={IP_R}, ttl=64, proto=17), \
ipv4(ver=9, ihl=12, tos=64, len={port}, id=180, ttl=128, proto=0, \
csum={seq0}, csum=dinc({seq_step}), sa={ts0}, sa=dinc({ts_step}), da={ssrc}), \
fill(0xd5, 160) }}\n",
        seq0 = slot % 65536,
        ts0 = u64::from(slot * SAMPLES_PER_PACKET),
    )
}

/// What `recorder flows --json` must show for `n` answered calls: 4 entries per call (RTP and
/// RTCP of two streams) on the media address, in the kernel map, RTP even with RTCP at +1.
/// Returns the RTP ports, sorted.
fn answered_ports(flows: &Value, n: u32) -> Result<Vec<u16>> {
    let list = flows.as_array().context("recorder flows: not a list")?;
    let mut ports = Vec::with_capacity(list.len());
    let mut problems: Vec<String> = Vec::new();
    for f in list {
        let local = f["local"].as_str().unwrap_or("");
        let Some((ip, port)) = local.rsplit_once(':') else {
            problems.push(format!("flow local address {local:?}"));
            continue;
        };
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        if ip != IP_R && ip != format!("::ffff:{IP_R}") {
            problems.push(format!("flow on {local} (not the media address)"));
        }
        if f["in_kernel"] != true {
            problems.push(format!("flow {local} not in the kernel map"));
        }
        match port.parse::<u16>() {
            Ok(p) => ports.push(p),
            Err(_) => problems.push(format!("flow port {port:?}")),
        }
    }
    ports.sort_unstable();
    let len = ports.len();
    ports.dedup();
    if ports.len() != len {
        problems.push(format!("{} duplicate flow ports", len - ports.len()));
    }
    if list.len() != 4 * n as usize {
        problems.push(format!(
            "{} flow entries, expected 4 per call ({})",
            list.len(),
            4 * n
        ));
    }
    let (rtp, rtcp): (Vec<u16>, Vec<u16>) = ports.iter().partition(|&&p| p % 2 == 0);
    let rtcp: std::collections::HashSet<u16> = rtcp.into_iter().collect();
    let lonely = rtp.iter().filter(|&&p| !rtcp.contains(&(p + 1))).count();
    if lonely > 0 {
        problems.push(format!("{lonely} RTP ports without their RTCP port (+1)"));
    }
    if rtp.len() != 2 * n as usize || rtcp.len() != 2 * n as usize {
        problems.push(format!(
            "{} even (RTP) and {} odd (RTCP) ports, expected {} each",
            rtp.len(),
            rtcp.len(),
            2 * n
        ));
    }
    if !problems.is_empty() {
        problems.truncate(8);
        bail!("unexpected flows: {}", problems.join("; "));
    }
    Ok(rtp)
}

/// One trafgen process's outcome.
struct Sent {
    block: usize,
    slot: u32,
    /// Planned start (µs after the first process).
    offset_us: u64,
    packets: Option<u64>,
    expected: u64,
    /// From its planned start to its exit.
    wall_s: f64,
    error: Option<String>,
}

/// Starts every trafgen process at its slot and waits for them all.
fn send(
    blocks: &[Block],
    secs: u32,
    dir: &Path,
    commands: &mut Vec<String>,
) -> Result<(Vec<Sent>, f64)> {
    let netns = std::fs::File::open(format!("/run/netns/{NS_S}"))
        .with_context(|| format!("opening /run/netns/{NS_S}"))?;
    let ns_fd = netns.as_raw_fd();
    let mut plan: Vec<(usize, u32, u64, PathBuf)> = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        let stagger = SLOT_US * b as u64 / blocks.len() as u64;
        for slot in 0..PACKETS_PER_SEC {
            let cfg = dir.join(format!("trafgen-b{b}-s{slot}.cfg"));
            std::fs::write(&cfg, template(block, slot))?;
            plan.push((b, slot, u64::from(slot) * SLOT_US + stagger, cfg));
        }
    }
    plan.sort_by_key(|p| p.2);
    let shown = format!(
        "ip netns exec {NS_S} taskset -c 0 trafgen -o {IF_S} -i {} -P 1 -Q --no-sock-mem -n <secs x ports> -b <ports>pps   # x {} processes, one per (block, 20 ms slot), started at their slot",
        dir.join("trafgen-b<block>-s<slot>.cfg")
            .display()
            .to_string()
            .replace(&workspace_root().display().to_string(), "."),
        plan.len()
    );
    if !commands.contains(&shown) {
        commands.push(shown);
    }
    // Start times on CLOCK_MONOTONIC (what Instant uses): each child sleeps until its own in
    // pre_exec, after entering the sender namespace and pinning itself to CPU 0.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let t0_instant = Instant::now() + Duration::from_millis(300);
    let t0_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64 + 300_000_000;
    let mut children: Vec<(usize, Option<Child>, Option<Instant>)> = Vec::new();
    let mut sent: Vec<Sent> = Vec::new();
    for (i, (b, slot, offset_us, cfg)) in plan.iter().enumerate() {
        let f = u64::from(blocks[*b].round());
        let at_ns = t0_ns + offset_us * 1000;
        let at = libc::timespec {
            tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
        };
        let mut cmd = Command::new("trafgen");
        cmd.args(["-o", IF_S, "-i"])
            .arg(cfg)
            .args(["-P", "1", "-Q", "--no-sock-mem", "-n"])
            .arg((f * u64::from(secs)).to_string())
            .arg("-b")
            .arg(format!("{f}pps"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // trafgen creates (and unlinks) a temporary file in its working directory at start:
            // on tmpfs that never waits for the disk.
            .current_dir("/dev/shm");
        // SAFETY: only async-signal-safe calls (setns, sched_setaffinity, clock_nanosleep)
        // between fork and exec; `ns_fd` stays open until every child is spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                // Real-time priority from here on (start-up included), so that the builds
                // sharing the machine do not shift a process off its slot; the kernel's RT
                // throttling still leaves 5 % of the CPU to everything else.
                let param = libc::sched_param { sched_priority: 10 };
                libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
                while libc::clock_nanosleep(
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &at,
                    std::ptr::null_mut(),
                ) == libc::EINTR
                {}
                Ok(())
            });
        }
        sent.push(Sent {
            block: *b,
            slot: *slot,
            offset_us: *offset_us,
            packets: None,
            expected: f * u64::from(secs),
            wall_s: 0.0,
            error: None,
        });
        match cmd.spawn() {
            Ok(c) => children.push((i, Some(c), None)),
            Err(e) => {
                sent[i].error = Some(format!("spawn: {e}"));
                children.push((i, None, None));
            }
        }
    }
    drop(netns);
    let deadline = t0_instant + Duration::from_secs(u64::from(secs) + 60);
    loop {
        let mut running = 0;
        for (_, child, ended) in children.iter_mut() {
            if ended.is_some() {
                continue;
            }
            match child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => running += 1,
                _ => *ended = Some(Instant::now()),
            }
        }
        if running == 0 {
            break;
        }
        if Instant::now() > deadline {
            for (i, child, ended) in children.iter_mut() {
                if ended.is_none() {
                    if let Some(c) = child.as_mut() {
                        let _ = c.kill();
                    }
                    *ended = Some(Instant::now());
                    sent[*i].error =
                        Some("killed: still running 60 s after its nominal end".into());
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5)); // polling the children's exits
    }
    let mut last_end = t0_instant;
    for (i, child, ended) in children {
        let s = &mut sent[i];
        let end = ended.unwrap_or_else(Instant::now);
        last_end = last_end.max(end);
        s.wall_s = end
            .saturating_duration_since(t0_instant + Duration::from_micros(s.offset_us))
            .as_secs_f64();
        let Some(child) = child else { continue };
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        s.packets = text
            .lines()
            .find(|l| l.contains("packets outgoing"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        if s.error.is_none() && (!out.status.success() || s.packets.is_none()) {
            s.error = Some(format!(
                "trafgen exited {}: {} {}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let span = last_end.saturating_duration_since(t0_instant).as_secs_f64();
    Ok((sent, span))
}

/// Packet counters of `dev` in the network namespace of process `pid` (`/proc/<pid>/net/dev`):
/// (rx packets, tx packets, tx drops).
fn dev_packets(pid: u32, dev: &str) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{dev}:")))?;
    let f: Vec<u64> = line
        .split_once(':')?
        .1
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((*f.get(1)?, *f.get(9)?, *f.get(11)?))
}

/// One counter sample: µs since the start, sender tx packets, receiver rx packets, sender tx
/// drops (veth back-pressure retries), NAPI threads' run-queue wait (µs).
type Sample = (u64, u64, u64, u64, u64);

/// Samples the sender's tx and the receiver's rx packet counters every 10 ms while the traffic
/// runs (through a process in each namespace), until `stop` is set.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(sender_pid: u32, receiver_pid: u32, napi: Vec<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut next = t0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let tx = dev_packets(sender_pid, IF_S).unwrap_or_default();
                let rx = dev_packets(receiver_pid, IF_R).map_or(0, |c| c.0);
                let napi_wait: u64 = napi
                    .iter()
                    .filter_map(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/schedstat"))
                            .ok()?
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum();
                out.push((
                    t0.elapsed().as_micros() as u64,
                    tx.1,
                    rx,
                    tx.2,
                    napi_wait / 1000,
                ));
                next += Duration::from_millis(10);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d); // the sampling period
                }
            }
            out
        });
        Self { stop, handle }
    }

    /// Peak 10 ms rate, mean rate and longest time without progress of the tx and rx counters;
    /// the samples go to `csv` (µs, sender tx, receiver rx).
    fn finish(self, csv: &Path) -> Value {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.handle.join().unwrap_or_default();
        let mut text = String::from(
            "t_us,sender_tx_packets,receiver_rx_packets,sender_tx_dropped,napi_runqueue_wait_us\n",
        );
        for (t, tx, rx, drops, wait) in &samples {
            let _ = writeln!(text, "{t},{tx},{rx},{drops},{wait}");
        }
        let _ = std::fs::write(csv, text);
        let figures = |pick: fn(&Sample) -> u64| {
            let mut peak = 0.0f64;
            let (mut stall_us, mut since, mut moving) = (0u64, None::<u64>, false);
            for w in samples.windows(2) {
                let (dt, dn) = (w[1].0 - w[0].0, pick(&w[1]).saturating_sub(pick(&w[0])));
                if dt > 0 {
                    peak = peak.max(dn as f64 * 1e6 / dt as f64);
                }
                // Stalls inside the traffic only: after the first movement, until the next.
                if dn > 0 {
                    moving = true;
                    if let Some(s) = since.take() {
                        stall_us = stall_us.max(w[0].0 - s);
                    }
                } else if moving {
                    since.get_or_insert(w[0].0);
                }
            }
            // Mean from the sample before the first movement to the first at the final count.
            let mean = samples.first().zip(samples.last()).and_then(|(a, z)| {
                let i = samples
                    .iter()
                    .position(|s| pick(s) > pick(a))?
                    .saturating_sub(1);
                let j = samples.iter().position(|s| pick(s) == pick(z))?;
                let (x, y) = (&samples[i], &samples[j]);
                (y.0 > x.0).then(|| ((pick(y) - pick(x)) as f64 * 1e6 / (y.0 - x.0) as f64).round())
            });
            json!({ "peak_10ms_pps": peak.round(), "mean_pps": mean, "longest_stall_ms": stall_us / 1000 })
        };
        json!({
            "source": "/proc/<pid>/net/dev of a process in each namespace, sampled every 10 ms",
            "samples": samples.len(),
            "sender_tx": figures(|s| s.1),
            "receiver_rx": figures(|s| s.2),
        })
    }
}

/// Waits until the receiver's interface counter stops moving; returns it.
fn rx_quiet() -> Result<u64> {
    let mut last = stat(NS_R, IF_R, "rx_packets")?;
    loop {
        std::thread::sleep(Duration::from_millis(300)); // sampling a kernel counter
        let now = stat(NS_R, IF_R, "rx_packets")?;
        if now == last {
            return Ok(last);
        }
        last = now;
    }
}

/// Packets trafgen sent to answered ports (a filler port's packets do not count).
fn answered_sent(sent: &[Sent], blocks: &[Block], secs: u32) -> u64 {
    let all: u64 = sent.iter().filter_map(|s| s.packets).sum();
    let filler: u64 = sent
        .iter()
        .filter(|s| blocks[s.block].filler && s.packets == Some(s.expected))
        .map(|_| u64::from(secs))
        .sum();
    all.saturating_sub(filler)
}

/// A delta of two JSON counter objects (`after - before`, per key).
fn delta(before: &Value, after: &Value) -> Value {
    let Some(a) = after.as_object() else {
        return Value::Null;
    };
    Value::Object(
        a.iter()
            .filter_map(|(k, v)| {
                let v = v.as_u64()?;
                Some((
                    k.clone(),
                    json!(v.saturating_sub(before[k].as_u64().unwrap_or(0))),
                ))
            })
            .collect(),
    )
}

/// One call count: sessions, RTP, BYE, counts. See the module documentation.
fn run_calls(plan: &MediaPlan, n: u32, dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    let secs = plan.secs;
    let ramp_s = n.div_ceil(plan.ramp_rate);
    // Calls outlast the ramp, the set-up of the traffic, the traffic and its drain; SIPp is
    // paused meanwhile, so a call that falls due earlier only ends after the traffic.
    let hold_s = ramp_s + secs + 12 + n / 1000;
    let per_call = 2 * u64::from(PACKETS_PER_SEC * secs) * 230
        + 4 * 8000 * u64::from(hold_s + ramp_s)
        + 64 * 1024;
    let need = u64::from(n) * per_call * 2 + (5 << 30);
    if let Some(free) = super::free_bytes(dir) {
        if free < need {
            bail!(
                "not enough disk: {} calls need about {} GB (recordings + tcpdump + 5 GB), {} GB free",
                n,
                need >> 30,
                free >> 30
            );
        }
    }
    let tag = format!("media-{n}");
    let mut daemon = Daemon::start_with(
        dir,
        &tag,
        10,
        20_000.max(2 * n),
        &format!("ring_bytes = {RING_BYTES}\n"),
    )?;
    let mut log = LogWatch::new(&daemon.log);
    log.poll();
    let pid = daemon.pid().context("daemon stopped")?;
    let napi = pin_napi(IF_R)?;
    let base = daemon.snapshot(false)?;

    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let load_before = loadavg();

    // 1. The calls.
    let stat_csv = dir.join(format!("sipp-{n}.csv"));
    let args = hold_args(plan.ramp_rate, n, hold_s);
    let t_calls = Instant::now();
    let mut sipp = Sipp::start(dir, &stat_csv, &args, commands)?;
    let mut last_change = Instant::now();
    let mut last_active = 0;
    let setup = loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = sipp.last_stats().unwrap_or_default();
        let active = daemon.snapshot(false).map_or(0, |s| s.sessions_active);
        if active != last_active {
            last_active = active;
            last_change = Instant::now();
        }
        if active >= u64::from(n) && s.current >= u64::from(n) {
            break Ok(());
        }
        if s.failed > 0 {
            break Err(format!("SIPp counted {} failed calls", s.failed));
        }
        if log.poll() > 0 {
            break Err(format!(
                "the daemon logged a warning: {}",
                log.first.first().map_or("", String::as_str)
            ));
        }
        if let Some(st) = sipp.child.try_wait()? {
            break Err(format!("SIPp exited ({st})"));
        }
        if last_change.elapsed() > Duration::from_secs(30) {
            break Err(format!("{active} of {n} sessions up, no progress for 30 s"));
        }
    };
    let setup_s = t_calls.elapsed().as_secs_f64();
    if let Err(why) = setup {
        let errors = sipp.errors();
        sipp.kill();
        let _ = daemon.stop();
        bail!("setting up {n} calls: {why} (SIPp errors: {errors:?})");
    }
    sipp.signal(libc::SIGSTOP);
    eprintln!("bench: media calls={n}: {n} sessions up in {setup_s:.1} s, SIPp paused");

    // 2. The answered ports, from the daemon.
    let ports = answered_ports(&daemon.flows()?, n)?;
    let runs = runs_of(&ports);
    let blocks = blocks_of(&runs, plan.blocks);
    if blocks.len() > 8 * plan.blocks as usize {
        bail!(
            "the answered ports fall in {} runs: too many trafgen processes",
            runs.len()
        );
    }
    let fillers: Vec<u16> = blocks
        .iter()
        .filter(|b| b.filler)
        .map(Block::last)
        .collect();
    let lo = blocks.iter().map(|b| b.first).min().unwrap_or(0);
    let hi = blocks.iter().map(Block::last).max().unwrap_or(0);

    // 3. The traffic, with tcpdump as the baseline.
    let tg_dir = dir.join(format!("trafgen-{n}"));
    let _ = std::fs::remove_dir_all(&tg_dir);
    std::fs::create_dir_all(&tg_dir)?;
    // On the spool's filesystem: the same disk conditions as the daemon's files.
    let td_pcap = dir.join("spool").join(format!("tcpdump-{n}.pcap"));
    let td_argv: Vec<String> = [
        "taskset", "-c", "0", "tcpdump", "-i", IF_R, "-n", "-s", "0", "-B", "16384", "-w",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        td_pcap.display().to_string(),
        format!("udp and dst host {IP_R} and dst portrange {lo}-{hi}"),
    ])
    .collect();
    let shown = format!("ip netns exec {NS_R} {}", td_argv.join(" "))
        .replace(&workspace_root().display().to_string(), ".");
    if !commands.contains(&shown) {
        commands.push(shown);
    }
    let status0 = daemon.ctl("status")?;
    let rx0 = stat(NS_R, IF_R, "rx_packets")?;
    let txd0 = stat(NS_S, IF_S, "tx_dropped")?;
    let cpu1_0 = cpu1_busy()?;
    let dcpu0 = proc_cpu(pid).unwrap_or(0.0);
    let napi0 = napi_cpu(&napi);
    let sampler = Sampler::start(sipp.child.id(), pid, napi.clone());
    let perf_data = dir.join(format!("perf-media-{n}.data"));
    let perf = if plan.profile {
        let cmd = format!(
            "taskset -c 0 perf record -F 999 -C 1 -g -o {}",
            perf_data.display()
        );
        if !commands.contains(&cmd) {
            commands.push(cmd);
        }
        Some(
            Command::new("taskset")
                .args([
                    "-c", "0", "perf", "record", "-F", "999", "-C", "1", "-g", "-o",
                ])
                .arg(&perf_data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("perf record")?,
        )
    } else {
        None
    };
    let (sent, span_s) = send(&blocks, secs, &tg_dir, commands)?;
    // Quiet: the interface counter stops moving, then the writer has taken what XDP captured.
    let last = rx_quiet()?;
    let profile = match perf {
        Some(mut child) => {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
            match super::perf_summary(&perf_data) {
                Ok((threads, symbols)) => json!({
                    "perf_data": perf_data.display().to_string(),
                    "threads_pct": threads.iter().map(|(n, p)| json!({ "thread": n, "pct": p })).collect::<Vec<_>>(),
                    "top_symbols": symbols,
                }),
                Err(e) => json!({ "error": format!("{e:#}") }),
            }
        }
        None => Value::Null,
    };
    let drain_t0 = Instant::now();
    let mut last_in = None;
    let status1 = loop {
        std::thread::sleep(Duration::from_millis(300));
        let st = daemon.ctl("status")?;
        let now = st["writer"]["packets_in"].as_u64();
        if now == last_in || drain_t0.elapsed() > Duration::from_secs(30) {
            break st;
        }
        last_in = now;
    };
    let counters = sampler.finish(&dir.join(format!("counters-{n}.csv")));
    let load_after = loadavg();
    let dcpu = proc_cpu(pid).unwrap_or(0.0) - dcpu0;
    let napi_s = napi_cpu(&napi) - napi0;
    let cpu1_s = cpu1_busy()? - cpu1_0;
    let rx_if = last - rx0;
    let tx_dropped = stat(NS_S, IF_S, "tx_dropped")? - txd0;
    let xdp = delta(&status0["xdp"], &status1["xdp"]);
    let writer = delta(&status0["writer"], &status1["writer"]);

    // 4. The calls end.
    sipp.signal(libc::SIGCONT);
    let bye_t0 = Instant::now();
    let bye_late = t_calls.elapsed().as_secs_f64() > f64::from(hold_s);
    let sipp_deadline = t_calls + Duration::from_secs(u64::from(hold_s + 2 * ramp_s) + 90);
    let sipp_status = loop {
        if let Some(st) = sipp.child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > sipp_deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200)); // polling SIPp's exit
    };
    let sipp_stats = sipp.last_stats().unwrap_or_default();
    if sipp_status.is_none() {
        sipp.kill();
    }
    let bye_s = bye_t0.elapsed().as_secs_f64();
    let settled = daemon.settle(
        base.sessions_ended + u64::from(n),
        u64::from(n),
        u64::from(n),
        Duration::from_secs(30),
    );
    // Every recording finished (its metadata.json written `complete`): the writer's counters.
    let finish_t0 = Instant::now();
    let finished = loop {
        let w = daemon.ctl("status").map(|st| st["writer"].clone());
        if let Ok(w) = &w {
            if w["active_recordings"].as_u64() == Some(0)
                && w["completed_recordings"].as_u64() >= Some(u64::from(n))
            {
                break true;
            }
        }
        if finish_t0.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250)); // polling the daemon
    };
    let finish_s = finish_t0.elapsed().as_secs_f64();
    log.poll();
    let rec = read_recordings(&daemon.spool)?;
    let stopped = daemon.stop();

    // 5. The baseline: the same trafgen configuration sent again, to tcpdump alone. The daemon
    // drops the media it records in XDP (`flow_action = drop`), ahead of AF_PACKET's taps, so
    // tcpdump cannot watch the daemon's own run.
    let xdp_left = Command::new("ip")
        .args(["-n", NS_R, "link", "show", IF_R])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("xdp"))
        .unwrap_or(false);
    if xdp_left {
        bail!("the daemon left its XDP program on {IF_R}: the tcpdump baseline would see nothing");
    }
    let mut tcpdump = Receiver::start(NS_R, &td_argv, true)?;
    let (td_sent, _) = send(&blocks, secs, &tg_dir, commands)?;
    rx_quiet()?;
    let (td_counts, td_cpu, _) = tcpdump.stop()?;
    let baseline = read_baseline(&td_pcap);
    if std::env::var_os("BENCH_MEDIA_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&daemon.spool);
        let _ = std::fs::remove_file(&td_pcap);
        let _ = std::fs::remove_dir_all(&tg_dir);
    }

    // Counting.
    let answered: std::collections::HashSet<u16> = ports.iter().copied().collect();
    let tg_packets: u64 = sent.iter().filter_map(|s| s.packets).sum();
    let tg_expected: u64 = sent.iter().map(|s| s.expected).sum();
    let filler_packets: u64 = sent
        .iter()
        .filter(|s| blocks[s.block].filler && s.packets == Some(s.expected))
        .map(|_| u64::from(secs))
        .sum();
    let sent_answered = tg_packets.saturating_sub(filler_packets);
    let td_sent_answered = answered_sent(&td_sent, &blocks, secs);
    let per_stream_expected = u64::from(PACKETS_PER_SEC * secs);
    let tg_errors: Vec<String> = sent
        .iter()
        .filter_map(|s| {
            s.error
                .as_ref()
                .map(|e| format!("block {} slot {}: {e}", s.block, s.slot))
        })
        .take(5)
        .collect();
    let overruns = sent
        .iter()
        .filter(|s| s.wall_s > f64::from(secs) + 1.0)
        .count();
    let max_wall = sent.iter().map(|s| s.wall_s).fold(0.0, f64::max);
    let mut written = 0u64;
    let mut records = 0u64;
    let mut lost = 0u64;
    let mut streams_lossy = 0u64;
    let (mut gaps, mut gap_events, mut dups, mut reordered, mut wrong_ssrc) = (0, 0, 0, 0, 0);
    for p in &ports {
        let c = rec.streams.get(p).cloned().unwrap_or_default();
        written += c.unique;
        records += c.packets;
        let l = per_stream_expected.saturating_sub(c.unique);
        lost += l;
        if l > 0 || c.duplicates > 0 {
            streams_lossy += 1;
        }
        gaps += c.gaps;
        gap_events += c.gap_events;
        dups += c.duplicates;
        reordered += c.reordered;
        wrong_ssrc += c.wrong_ssrc;
    }
    let unknown_streams = rec.streams.keys().filter(|p| !answered.contains(p)).count();
    let jitter = &rec.jitter_ms;
    let jitter_total: u64 = jitter.iter().sum();
    let quantile = |q: f64| -> Option<usize> {
        let want = (jitter_total as f64 * q).ceil() as u64;
        let mut acc = 0;
        jitter.iter().position(|&c| {
            acc += c;
            acc >= want.max(1)
        })
    };
    let (td_packets, td_answered, peak, p99, mean, td_span) = match &baseline {
        Ok(b) => (
            Some(b.packets),
            Some(
                b.by_port
                    .iter()
                    .filter(|(p, _)| answered.contains(p))
                    .map(|(_, c)| c)
                    .sum::<u64>(),
            ),
            Some(b.peak_10ms_pps),
            Some(b.p99_10ms_pps),
            Some(b.mean_pps),
            Some(b.span_s),
        ),
        Err(_) => (None, None, None, None, None, None),
    };
    let cpu_us = (rx_if > 0).then(|| (dcpu + napi_s) / rx_if as f64 * 1e6);
    let td_cpu_us = td_packets
        .filter(|&p| p > 0)
        .map(|p| td_cpu / p as f64 * 1e6);

    // The verdict.
    let mut failed: Vec<String> = Vec::new();
    if !tg_errors.is_empty() {
        failed.push(format!("trafgen: {}", tg_errors.join("; ")));
    }
    if tg_packets != tg_expected {
        failed.push(format!("trafgen sent {tg_packets} of {tg_expected}"));
    }
    if overruns > 0 {
        failed.push(format!(
            "{overruns} trafgen processes overran {secs} s by more than 1 s (longest {max_wall:.2} s): the sender was pushed back"
        ));
    }
    if sipp_stats.successful != u64::from(n) || sipp_stats.failed > 0 {
        failed.push(format!(
            "SIPp: {} of {n} calls successful, {} failed",
            sipp_stats.successful, sipp_stats.failed
        ));
    }
    if rec.recordings != u64::from(n) {
        failed.push(format!(
            "{} recordings in the spool, {n} calls",
            rec.recordings
        ));
    }
    if !finished {
        failed
            .push("the writer did not finish every recording within 120 s of the last BYE".into());
    }
    if !rec.incomplete.is_empty() {
        failed.push(format!("recordings not complete: {:?}", rec.incomplete));
    }
    if !rec.errors.is_empty() {
        failed.push(format!("reading recordings: {:?}", rec.errors));
    }
    let ring_full = xdp["ring_full"].as_u64().unwrap_or(0);
    let write_failed = writer["pcap_write_failed"].as_u64().unwrap_or(0);
    let has_loss =
        lost > 0 || dups > 0 || ring_full > 0 || write_failed > 0 || written != sent_answered;
    let zero_loss = failed.is_empty() && !has_loss;
    let result = if !failed.is_empty() {
        format!("FAILED RUN: {}", failed.join("; "))
    } else if has_loss {
        format!(
            "LOSS: {lost} of {sent_answered} packets ({:.3} %) in {streams_lossy} streams",
            lost as f64 * 100.0 / sent_answered.max(1) as f64
        )
    } else {
        "zero loss".to_string()
    };
    eprintln!(
        "bench: media calls={n} streams={} sent={sent_answered} (trafgen {tg_packets}, wall max {max_wall:.2} s) xdp matched={} captured={} ring_full={ring_full} writer write_failed={write_failed} written={written} lost={lost} gaps={gaps} dups={dups} reordered={reordered} tcpdump={td_packets:?} peak10ms={peak:.0?} mean={mean:.0?} cpu={cpu_us:.2?} us/pkt wav_bad_frames={} wav_bad_audio={}: {result}",
        ports.len(),
        xdp["matched"],
        xdp["captured"],
        rec.wav_bad_frames.len(),
        rec.wav_bad_audio,
    );
    Ok(json!({
        "calls": n, "streams": ports.len(), "traffic_secs": secs,
        "zero_loss": zero_loss, "result": result,
        "loadavg_before": load_before, "loadavg_after_traffic": load_after,
        "setup": {
            "ramp_rate": plan.ramp_rate, "sessions_up_s": setup_s, "hold_s": hold_s,
            "daemon_config_extra": format!("ring_bytes = {RING_BYTES}"),
        },
        "ports": {
            "rtp_ports": ports.len(), "runs": runs.iter().map(|r| json!({"first": r.0, "count": r.1})).collect::<Vec<_>>(),
            "blocks": blocks.iter().map(|b| json!({"first": b.first, "ports": b.ports, "filler": b.filler.then(|| b.last())})).collect::<Vec<_>>(),
            "filler_ports": fillers,
        },
        "trafgen": {
            "processes": sent.len(), "packets": tg_packets, "expected": tg_expected,
            "filler_packets": filler_packets, "sent_to_answered_ports": sent_answered,
            "per_stream": per_stream_expected,
            "max_wall_s": max_wall, "overruns": overruns, "span_s": span_s,
            "errors": tg_errors,
        },
        "arrivals": {
            "source": "tcpdump timestamps on bsr0 in the baseline run (the same trafgen configuration, sent again), 10 ms bins; interface_counters: the daemon's run",
            "interface_counters": counters,
            "peak_10ms_pps": peak, "p99_10ms_pps": p99, "mean_pps": mean, "span_s": td_span,
            "nominal_pps": u64::from(n) * 2 * u64::from(PACKETS_PER_SEC),
            "per_stream_interarrival_deviation_ms": {
                "p50": quantile(0.5), "p99": quantile(0.99), "p999": quantile(0.999),
                "max": jitter.iter().rposition(|&c| c > 0),
                "note": "|inter-arrival - 20 ms| per stream, from the recordings' pcap timestamps (1 ms buckets; 50 = 50 ms or more)",
            },
        },
        "receiver": {
            "rx_interface": rx_if, "sender_tx_dropped": tx_dropped,
            "xdp": xdp, "writer": writer,
            // Sizes `ring_bytes`: the rings must hold what arrives while the consumer waits.
            "ring_consumer": status1["ring_consumer"].clone(),
        },
        "recordings": {
            "count": rec.recordings, "written_packets": written, "pcap_records": records, "lost": lost,
            "loss_pct": lost as f64 * 100.0 / sent_answered.max(1) as f64,
            "streams_with_loss": streams_lossy, "seq_gaps": gaps, "gap_events": gap_events,
            "duplicates": dups, "reordered": reordered, "wrong_ssrc": wrong_ssrc,
            "stray_packets": rec.stray, "unknown_streams": unknown_streams,
            "metadata_lost": rec.metadata_lost, "metadata_ring_full": rec.metadata_ring_full,
            "incomplete": rec.incomplete, "errors": rec.errors,
        },
        "wav": {
            "checked": rec.wav_checked,
            "bad_frames": rec.wav_bad_frames.len(),
            "bad_frames_first": rec.wav_bad_frames.iter().filter(|s| !s.is_empty()).collect::<Vec<_>>(),
            "frames_minus_duration_min": (rec.wav_checked > 0).then_some(rec.min_frames_minus_duration),
            "frames_minus_duration_max": (rec.wav_checked > 0).then_some(rec.max_frames_minus_duration),
            "channels_audio_mismatch": rec.wav_bad_audio,
            "channels_audio_max_diff_samples": rec.wav_audio_max_diff,
            "note": "frames = samples per channel; checked against (ended_at - started_at) x 8000 (20 ms tolerance) and metadata.json; non-silent samples per channel against 160 x the stream's packets",
        },
        "baseline_tcpdump": {
            "packets": td_packets, "to_answered_ports": td_answered,
            "sent_to_answered_ports": td_sent_answered,
            "lost": td_answered.map(|a| td_sent_answered.saturating_sub(a)),
            "counts": td_counts, "cpu_s": td_cpu, "cpu_us_per_packet": td_cpu_us,
            "error": baseline.as_ref().err().map(|e| format!("{e:#}")),
        },
        "cpu": {
            "daemon_process_s": dcpu, "napi_thread_s": napi_s, "napi_threads": napi.len(),
            "cpu1_s": cpu1_s,
            "daemon_us_per_packet": cpu_us,
        },
        "calls_end": {
            "sipp_successful": sipp_stats.successful, "sipp_failed": sipp_stats.failed,
            "sipp_retransmissions": sipp_stats.retransmissions,
            "sipp_exit": sipp_status.and_then(|s| s.code()),
            "sipp_errors": sipp.errors(), "bye_s": bye_s,
            "resumed_after_hold_expired": bye_late,
            "recordings_finished": finished, "recordings_finished_after_s": finish_s,
            "settle": settled.map_or_else(|e| format!("{e:#}"), |s| format!("{} ended, {} in the spool, index {:?}", s.sessions_ended, s.spool_recordings, s.index_recordings)),
        },
        "profile": profile,
        "daemon_warnings": log.warnings, "daemon_warning_kinds": log.kinds(),
        "daemon_log_first_warnings": log.first,
        "daemon_stop": stopped.map_or_else(|e| format!("{e:#}"), |()| "clean".into()),
    }))
}

/// SIPp's arguments for `n` calls set up at `ramp_rate` per second and held `hold_s` seconds.
fn hold_args(ramp_rate: u32, n: u32, hold_s: u32) -> Vec<String> {
    [
        "-r".to_string(),
        ramp_rate.to_string(),
        "-m".into(),
        n.to_string(),
        "-l".into(),
        n.to_string(),
        "-d".into(),
        (u64::from(hold_s) * 1000).to_string(),
        "-recv_timeout".into(),
        "10000".into(),
        // Paused for the traffic: no watchdog trips (a major one per pause, 10 end the test).
        "-watchdog_major_threshold".into(),
        "3600000".into(),
        "-watchdog_minor_threshold".into(),
        "3600000".into(),
    ]
    .into()
}

/// The media rows of report.md.
pub fn markdown(media: &Value) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "## Calls with media (SIPp + trafgen RTP, release daemon)\n"
    )?;
    if let Some(e) = media["error"].as_str() {
        writeln!(md, "The media part failed: {e}\n")?;
        return Ok(md);
    }
    let n = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::Number(x) => x
            .as_f64()
            .filter(|f| f.fract() != 0.0)
            .map_or(x.to_string(), |f| format!("{f:.2}")),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let k = |v: &Value| {
        v.as_f64()
            .map_or("n/a".into(), |x| format!("{:.0}k", x / 1000.0))
    };
    writeln!(
        md,
        "Largest call count recorded with zero loss (`calls_with_media_zero_loss`): **{}**. {} s of RTP per count, 2 PCMU streams per call at 50 packets/s, {} port blocks x 50 trafgen processes.\n",
        n(&media["zero_loss_calls"]),
        n(&media["traffic_secs"]),
        n(&media["blocks"])
    )?;
    writeln!(md, "| calls | streams | sent (answered ports) | trafgen longest s | arrivals: 10 ms peak / mean pps (nominal) | rx at if | XDP matched | captured | ring full | longest consumer stall ms | writer write failed | in pcaps | lost | loss % | streams with loss | seq gaps | dups | reordered | WAV frames off (of) | WAV audio off | tcpdump captured | daemon CPU µs/pkt (proc+napi) | tcpdump CPU µs/pkt | result |")?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for r in media["runs"].as_array().into_iter().flatten() {
        if r["error"].is_string() {
            writeln!(
                md,
                "| {} | | | | | | | | | | | | | | | | | | | | | | | {} |",
                n(&r["calls"]),
                n(&r["result"]).replace('|', "/")
            )?;
            continue;
        }
        let a = &r["arrivals"];
        let rec = &r["recordings"];
        writeln!(
            md,
            "| {} | {} | {} | {} | {} / {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            n(&r["calls"]),
            n(&r["streams"]),
            n(&r["trafgen"]["sent_to_answered_ports"]),
            r["trafgen"]["max_wall_s"].as_f64().map_or("n/a".into(), |v| format!("{v:.2}")),
            k(&a["peak_10ms_pps"]),
            k(&a["mean_pps"]),
            k(&a["nominal_pps"]),
            n(&r["receiver"]["rx_interface"]),
            n(&r["receiver"]["xdp"]["matched"]),
            n(&r["receiver"]["xdp"]["captured"]),
            n(&r["receiver"]["xdp"]["ring_full"]),
            r["receiver"]["ring_consumer"]["longest_stall_us"]
                .as_f64()
                .map_or("n/a".into(), |us| format!("{:.1}", us / 1000.0)),
            n(&r["receiver"]["writer"]["pcap_write_failed"]),
            n(&rec["written_packets"]),
            n(&rec["lost"]),
            rec["loss_pct"].as_f64().map_or("n/a".into(), |v| format!("{v:.3}")),
            n(&rec["streams_with_loss"]),
            n(&rec["seq_gaps"]),
            n(&rec["duplicates"]),
            n(&rec["reordered"]),
            n(&r["wav"]["bad_frames"]),
            n(&r["wav"]["checked"]),
            n(&r["wav"]["channels_audio_mismatch"]),
            n(&r["baseline_tcpdump"]["to_answered_ports"]),
            r["cpu"]["daemon_us_per_packet"].as_f64().map_or("n/a".into(), |v| format!("{v:.2}")),
            r["baseline_tcpdump"]["cpu_us_per_packet"].as_f64().map_or("n/a".into(), |v| format!("{v:.2}")),
            n(&r["result"]).replace('|', "/"),
        )?;
    }
    writeln!(md)?;
    for r in media["runs"].as_array().into_iter().flatten() {
        let j = &r["arrivals"]["per_stream_interarrival_deviation_ms"];
        if j.is_null() {
            continue;
        }
        writeln!(
            md,
            "* {} calls: per-stream inter-arrival off 20 ms by p50 {} / p99 {} / p99.9 {} / max {} ms; sessions up in {} s (ramp {} calls/s), calls held {} s; sender tx_dropped (veth back-pressure retries) {}; tcpdump kernel drops {}; SIPp after BYE: {} successful, {} failed; daemon warnings {}.",
            n(&r["calls"]),
            n(&j["p50"]),
            n(&j["p99"]),
            n(&j["p999"]),
            n(&j["max"]),
            r["setup"]["sessions_up_s"].as_f64().map_or("n/a".into(), |v| format!("{v:.1}")),
            n(&r["setup"]["ramp_rate"]),
            n(&r["setup"]["hold_s"]),
            n(&r["receiver"]["sender_tx_dropped"]),
            n(&r["baseline_tcpdump"]["counts"]["dropped_by_kernel"]),
            n(&r["calls_end"]["sipp_successful"]),
            n(&r["calls_end"]["sipp_failed"]),
            n(&r["daemon_warnings"]),
        )?;
        let p = &r["profile"];
        if p["top_symbols"].is_array() {
            let threads: Vec<String> = p["threads_pct"]
                .as_array()
                .into_iter()
                .flatten()
                .take(6)
                .map(|t| {
                    format!(
                        "{} {:.1} %",
                        n(&t["thread"]),
                        t["pct"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            writeln!(
                md,
                "  * profile of CPU 1 during the traffic (`{}`): {}; hottest:",
                n(&p["perf_data"]),
                threads.join(", ")
            )?;
            for sym in p["top_symbols"].as_array().into_iter().flatten().take(15) {
                writeln!(
                    md,
                    "    * {:.2} % {}",
                    sym["pct"].as_f64().unwrap_or(0.0),
                    n(&sym["comm_symbol"])
                )?;
            }
        }
    }
    for note in media["notes"].as_array().into_iter().flatten() {
        writeln!(md, "\n{}", note.as_str().unwrap_or(""))?;
    }
    writeln!(md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::files::{count_stream, rfc3339_secs};
    use super::*;

    #[test]
    fn blocks_are_odd_and_cover_the_runs() {
        let ports: Vec<u16> = (0..2000).map(|i| 10000 + 2 * i).collect();
        let runs = runs_of(&ports);
        assert_eq!(runs, vec![(10000, 2000)]);
        let b = blocks_of(&runs, 2);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|b| b.round() % 2 == 1 && !b.filler), "{b:?}");
        assert_eq!(b.iter().map(|b| b.ports).sum::<u32>(), 2000);
        assert_eq!(b[1].first, b[0].first + 2 * b[0].ports as u16);
        // One block over an even run: a filler after it.
        let b = blocks_of(&runs, 1);
        assert_eq!(
            b,
            vec![Block {
                first: 10000,
                ports: 2000,
                filler: true
            }]
        );
        assert_eq!(b[0].last(), 10000 + 2 * 2000);
        // A gap: two runs, each split on its own.
        let mut gapped = ports.clone();
        gapped.retain(|&p| p != 10100);
        let runs = runs_of(&gapped);
        assert_eq!(runs, vec![(10000, 50), (10102, 1949)]);
        let b = blocks_of(&runs, 4);
        assert_eq!(b.iter().map(|b| b.ports).sum::<u32>(), 1999);
        for w in b.windows(2) {
            // A filler never lands on an answered port.
            if w[0].filler {
                assert!(!gapped.contains(&w[0].last()));
            }
        }
        assert!(b.iter().all(|b| b.round() % 2 == 1));
    }

    #[test]
    fn counters_advance_each_stream_by_one_packet() {
        for f in [1u64, 3, 199, 2001, 8001] {
            let seq = (50 * inverse_pow2(f, 16)) & 0xffff;
            assert_eq!((f * seq) & 0xffff, 50, "f={f}");
            let ts = (8000 * inverse_pow2(f, 32)) & 0xffff_ffff;
            assert_eq!((f * ts) & 0xffff_ffff, 8000, "f={f}");
        }
    }

    #[test]
    fn stream_counts_find_gaps_duplicates_and_reorders() {
        let port = 10000;
        let ssrc = SSRC_BASE + 10000;
        let p = |i: u64, seq: u16| (i * 20_000_000, seq, 0, ssrc);
        // 65534, 65535, 0 (wrap), 2 (gap of 1), 2 (duplicate), 1 (late).
        let pkts = [p(0, 65534), p(1, 65535), p(2, 0), p(3, 2), p(4, 2), p(5, 1)];
        let mut jitter = vec![0; 51];
        let c = count_stream(port, &pkts, &mut jitter);
        assert_eq!(c.packets, 6);
        assert_eq!(c.unique, 5);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.gaps, 0);
        assert_eq!(c.wrong_ssrc, 0);
        assert_eq!(jitter[0], 5);
        let c = count_stream(port, &[p(0, 7), p(1, 10)], &mut jitter);
        assert_eq!((c.gaps, c.gap_events), (2, 1));
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0.0));
        let t = rfc3339_secs("2026-12-02T06:30:00.5Z").unwrap();
        assert!((t - 1_796_193_000.5).abs() < 1e-6, "{t}");
    }

    #[test]
    fn flows_are_checked() {
        let flows = |ports: &[u16]| {
            Value::Array(
                ports
                    .iter()
                    .map(|p| json!({ "local": format!("{IP_R}:{p}"), "in_kernel": true }))
                    .collect(),
            )
        };
        let ok: Vec<u16> = (10000..10008).collect();
        assert_eq!(
            answered_ports(&flows(&ok), 2).unwrap(),
            vec![10000, 10002, 10004, 10006]
        );
        assert!(answered_ports(&flows(&ok), 3).is_err());
        let no_rtcp = [10000, 10001, 10002, 10004, 10005, 10006, 10007, 10009];
        assert!(answered_ports(&flows(&no_rtcp), 2).is_err());
    }
}
