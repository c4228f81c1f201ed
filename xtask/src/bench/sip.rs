//! The SIP part of `cargo xtask bench`: SIPREC sessions per second and concurrent sessions held,
//! SIPp (`tests/sipp/siprec_bench.xml`) against the real release daemon.
//!
//! Layout: namespace `rbench-sip-s` runs SIPp pinned to CPU 0 over one UDP socket (`-t u1`);
//! namespace `rbench-sip-r` runs `recorder run` pinned to CPU 1, its XDP program attached to the
//! veth end `bsr0` as in production. Each phase gets a fresh daemon and spool.
//!
//! 1. Rate sweep: at each call rate, `calls/s x secs` calls (INVITE with two sendonly audio
//!    m-lines + metadata, ACK, a short hold, BYE). A rate passes when SIPp counts every call
//!    successful and none failed, the daemon started and ended that many sessions, and the spool
//!    and the index hold that many recordings. The sweep stops at the first rate that fails.
//! 2. Held sessions: calls that hold for an hour, `-l target`, at a rate the sweep passed, until
//!    `target` sessions are up, a call fails or the count stops moving. At the peak: sessions,
//!    flows (`recorder flows`), the daemon's RSS and open fds, and the BPF maps' memlock.

use std::{
    fmt::Write as _,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{proc_cpu, sh, VethNamespaces};
use crate::workspace_root;

pub(super) const NS_S: &str = "rbench-sip-s";
/// The daemon's descriptor limit, as the packaged unit's `LimitNOFILE`.
const NOFILE: libc::rlim_t = 1 << 20;
pub(super) const NS_R: &str = "rbench-sip-r";
pub(super) const IF_S: &str = "bss0";
pub(super) const IF_R: &str = "bsr0";
pub(super) const IP_S: &str = "10.232.0.1";
pub(super) const IP_R: &str = "10.232.0.2";

/// What one SIP bench run does.
pub struct SipPlan {
    /// Call rates tried in order (calls per second).
    pub rates: Vec<u32>,
    /// Seconds of calls at each rate.
    pub secs_per_rate: u32,
    /// Milliseconds each sweep call is held between ACK and BYE.
    pub hold_ms: u32,
    /// Concurrent sessions aimed for in the hold phase.
    pub target_sessions: u32,
    /// Highest rate used to ramp the held sessions up.
    pub max_ramp_rate: u32,
    /// Share of the daemon's CPU the ramp may take, by the sweep's CPU per session: the rest is
    /// for what grows with the sessions held (RTCP reports, the writer's per-recording work)
    /// and for retransmissions, so that calls do not time out while the daemon catches up.
    pub ramp_cpu_share: f64,
    /// Run the hold phase after the sweep.
    pub hold: bool,
}

impl SipPlan {
    pub fn quick() -> Self {
        Self {
            rates: vec![50, 200],
            secs_per_rate: 4,
            hold_ms: 100,
            target_sessions: 500,
            max_ramp_rate: 200,
            ramp_cpu_share: 0.5,
            hold: true,
        }
    }

    pub fn full() -> Self {
        Self {
            rates: vec![50, 100, 150, 200, 300, 400, 800],
            // Longer than the 32 s UDP transactions linger: the transaction table reaches its
            // steady state within each rate.
            secs_per_rate: 40,
            hold_ms: 100,
            target_sessions: 10_000,
            max_ramp_rate: 500,
            ramp_cpu_share: 0.5,
            hold: true,
        }
    }
}

/// Runs both SIP phases; returns the report's `sip` section.
pub fn run(plan: &SipPlan, out_dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    super::build_daemon()?;
    let dir = out_dir.join("sip");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _spool_fs = SpoolFs::mount(&dir.join("spool"))?;
    let _net = VethNamespaces::create([NS_S, NS_R], [IF_S, IF_R], [IP_S, IP_R], None)?;
    let started = Instant::now();

    let sweep = sweep(plan, &dir, commands)?;
    let best = sweep
        .iter()
        .filter(|r| r["passed"] == true)
        .filter_map(|r| r["rate"].as_u64())
        .max();
    let achieved = sweep
        .iter()
        .filter(|r| r["passed"] == true && r["rate"].as_u64() == best)
        .find_map(|r| r["achieved_cps"].as_f64());
    let cpu_ms = sweep
        .iter()
        .filter(|r| r["passed"] == true && r["rate"].as_u64() == best)
        .find_map(|r| r["daemon_cpu_ms_per_session"].as_f64());
    let (ramp_rate, ramp_reason) = ramp_rate(plan, best.map(|b| b as u32), cpu_ms);
    eprintln!("bench: sip hold ramp {ramp_rate} calls/s: {ramp_reason}");
    let mut held = match plan.hold.then(|| hold(plan, ramp_rate, &dir, commands)) {
        None => json!({ "skipped": "--sip-rates given" }),
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            eprintln!("bench: sip hold phase failed: {e:#}");
            json!({ "error": format!("{e:#}") })
        }
    };
    held["ramp_rate"] = json!(ramp_rate);
    held["ramp_rate_reason"] = json!(ramp_reason);
    Ok(json!({
        "sessions_per_second": best,
        "sessions_per_second_achieved": achieved,
        "max_concurrent_sessions": held["max_held_zero_failures"],
        "sweep": sweep,
        "concurrent": held,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "notes": [
            "SIPp on CPU 0, the daemon on CPU 1, on a 2-core machine shared with other builds: figures are noisy.",
            SPOOL_NOTE,
            "Sweep calls: INVITE (multipart: SDP with 2 sendonly audio m-lines + rs-metadata), ACK, hold, BYE; no RTP.",
            "The sweep's daemon uses port_cooldown_secs = 2 so that the RTP port range (2 pairs per call, held cooldown + hold) does not cap the rate; each rate gets a fresh daemon.",
            "Over UDP every call leaves 2 server transactions (INVITE, timer L; BYE, timer J) lingering 64*T1 = 32 s; the daemon sizes its transaction table at 4 per allowed session (80 000 here), beyond which new INVITEs get 503 (requests in a dialog may use twice that).",
            "File-backed RSS is the recordings' mmapped pcap/WAV windows (page cache the kernel can write back and reclaim); anonymous RSS is the daemon's heap.",
        ],
    }))
}

/// The hold phase's call rate and why: the lowest of the best sweep rate, the plan's cap, and
/// the rate at which set-ups alone would take `ramp_cpu_share` of the daemon's CPU (by the
/// sweep's CPU per session at its best rate), rounded down to a multiple of 50 (at least 50).
fn ramp_rate(plan: &SipPlan, best: Option<u32>, cpu_ms_per_session: Option<f64>) -> (u32, String) {
    let Some(best) = best else {
        let r = plan.rates[0];
        return (
            r,
            format!("no sweep rate passed: the lowest rate tried, {r}/s"),
        );
    };
    let by_cpu = cpu_ms_per_session
        .filter(|ms| *ms > 0.0)
        .map(|ms| (plan.ramp_cpu_share * 1000.0 / ms) as u32);
    let mut limits = vec![
        (best, format!("the best sweep rate ({best}/s)")),
        (
            plan.max_ramp_rate,
            format!("the cap of {}/s", plan.max_ramp_rate),
        ),
    ];
    if let (Some(r), Some(ms)) = (by_cpu, cpu_ms_per_session) {
        limits.push((
            r,
            format!(
                "{:.0}% of one CPU at the sweep's {ms:.2} ms of daemon CPU per session ({r}/s)",
                plan.ramp_cpu_share * 100.0
            ),
        ));
    }
    let (limit, why) = limits
        .into_iter()
        .min_by_key(|(r, _)| *r)
        .expect("two limits at least");
    let rate = (limit / 50 * 50).max(50);
    (rate, format!("lowest of the best sweep rate, the cap and the CPU budget: {why}, rounded down to {rate}/s"))
}

fn sweep(plan: &SipPlan, dir: &Path, commands: &mut Vec<String>) -> Result<Vec<Value>> {
    let mut results = Vec::new();
    for &rate in &plan.rates {
        let r = sweep_rate(plan, rate, dir, commands).unwrap_or_else(|e| {
            eprintln!("bench: sip rate={rate}/s failed to run: {e:#}");
            json!({ "rate": rate, "error": format!("{e:#}"), "passed": false })
        });
        let passed = r["passed"] == true;
        results.push(r);
        if !passed {
            break;
        }
    }
    Ok(results)
}

/// One rate of the sweep, on a fresh daemon: transactions lingering from the previous rate
/// (64*T1 = 32 s over UDP) would otherwise count against this one.
fn sweep_rate(plan: &SipPlan, rate: u32, dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    let mut daemon = Daemon::start(dir, &format!("sweep-{rate}"), 2, 20_000)?;
    let mut log = LogWatch::new(&daemon.log);
    log.poll();
    let calls = u64::from(rate * plan.secs_per_rate);
    let before = daemon.snapshot(false)?;
    let stat = dir.join(format!("sweep-{rate}.csv"));
    let args: Vec<String> = [
        "-r".to_string(),
        rate.to_string(),
        "-m".into(),
        calls.to_string(),
        "-d".into(),
        plan.hold_ms.to_string(),
        // A call not answered within 5 s fails instead of hanging the run.
        "-recv_timeout".into(),
        "5000".into(),
        "-timeout".into(),
        format!("{}s", plan.secs_per_rate * 3 + 30),
        "-timeout_error".into(),
    ]
    .into();
    let t0 = Instant::now();
    let mut sipp = Sipp::start(dir, &stat, &args, commands)?;
    let status = sipp.child.wait()?;
    let wall = t0.elapsed().as_secs_f64();
    let s = sipp.final_stats()?;
    // Every successful call must end as a session and land as a recording in the spool and the
    // index (the writer and the index lag behind the signaling by seconds under load).
    let settle_t0 = Instant::now();
    let after = daemon.settle(
        before.sessions_ended + s.successful,
        s.successful,
        s.successful,
        // A control query alone may take its 10 s timeout when the daemon is busy.
        Duration::from_secs(30),
    )?;
    let settle_s = settle_t0.elapsed().as_secs_f64();
    let warnings = log.poll();
    let started = after.sessions_started - before.sessions_started;
    let ended = after.sessions_ended - before.sessions_ended;
    let cpu = after.cpu_s - before.cpu_s;
    let passed = s.failed == 0
        && s.successful == calls
        && started == calls
        && ended == calls
        && after.spool_recordings == calls
        && after.index_recordings == Some(calls)
        && warnings == 0;
    // Calls per second while calls were being placed: the last call starts after the hold and
    // its BYE transaction finished.
    let achieved = s.successful as f64 / (wall - plan.hold_ms as f64 / 1000.0).max(0.001);
    eprintln!(
        "bench: sip rate={rate}/s calls={calls} ok={} failed={} retrans={} daemon started={started} ended={ended} spool={} index={:?} achieved={achieved:.0}/s daemon_cpu={cpu:.2}s files_after={settle_s:.1}s warnings={warnings} {}",
        s.successful,
        s.failed,
        s.retransmissions,
        after.spool_recordings,
        after.index_recordings,
        if passed { "PASS" } else { "FAIL" }
    );
    let stopped = daemon.stop();
    let _ = std::fs::remove_dir_all(&daemon.spool);
    Ok(json!({
        "rate": rate, "calls": calls, "successful": s.successful, "failed": s.failed,
        "retransmissions": s.retransmissions, "sipp_exit": status.code(),
        "sipp_errors": sipp.errors(),
        "daemon_sessions_started": started, "daemon_sessions_ended": ended,
        "rejections": after.rejections, "endpoint_counters": after.endpoint,
        "spool_recordings": after.spool_recordings,
        // null: the daemon did not answer the index query in time.
        "index_recordings": after.index_recordings, "wall_s": wall, "achieved_cps": achieved,
        "daemon_cpu_s": cpu, "files_settled_after_s": settle_s,
        "daemon_warnings": warnings, "daemon_log_first_warnings": log.first,
        "daemon_cpu_ms_per_session": (started > 0).then(|| cpu * 1000.0 / started as f64),
        "rss_kib": after.rss_kib, "passed": passed,
        "daemon_stop": stopped.map_or_else(|e| format!("{e:#}"), |()| "clean".into()),
    }))
}

fn hold(plan: &SipPlan, rate: u32, dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    let target = plan.target_sessions;
    let mut daemon = Daemon::start(dir, "hold", 10, target * 2)?;
    let mut log = LogWatch::new(&daemon.log);
    log.poll();
    let base = daemon.snapshot(false)?;
    let rss_split_before = daemon.rss_split();
    let maps_before = bpf_maps().unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let nofile = daemon.nofile_limit();
    let fd_limit = nofile_soft(nofile.as_deref());
    // Peak figures need the control socket, i.e. one free fd: take them before the daemon runs
    // out (4 fds per session here at `rate` calls/s, 2 s of polling slack).
    let fd_margin = u64::from(rate) * 4 * 2 + 200;
    let stat = dir.join("hold.csv");
    let args: Vec<String> = [
        "-r".to_string(),
        rate.to_string(),
        "-m".into(),
        target.to_string(),
        "-l".into(),
        target.to_string(),
        "-d".into(),
        "3600000".into(),
        "-recv_timeout".into(),
        "10000".into(),
    ]
    .into();
    let t0 = Instant::now();
    let mut sipp = Sipp::start(dir, &stat, &args, commands)?;
    let mut peak = base.clone();
    let mut held_ok = 0u64;
    let mut last_change = Instant::now();
    let mut status_errors = 0;
    let mut at_peak: Option<Value> = None;
    // (sessions active, daemon CPU s) at each poll: CPU per new session against sessions held.
    let mut series: Vec<(u64, f64)> = vec![(base.sessions_active, base.cpu_s)];
    let stop_reason = loop {
        std::thread::sleep(Duration::from_secs(1));
        log.poll();
        if log.warnings > 0 {
            // Past this point the daemon may spin on EMFILE (writing its log at tens of MB/s).
            break format!(
                "the daemon logged {} warnings at about {} sessions, first: {}",
                log.warnings,
                peak.sessions_active,
                log.first.first().map_or("", String::as_str)
            );
        }
        if log.offset > 256 << 20 {
            break "the daemon's log passed 256 MiB".to_string();
        }
        let s = sipp.last_stats().unwrap_or_default();
        let snap = match daemon.snapshot(false) {
            Ok(snap) => {
                status_errors = 0;
                snap
            }
            Err(e) => {
                status_errors += 1;
                if status_errors >= 2 {
                    break format!("the daemon stopped answering its control socket ({e:#})");
                }
                continue;
            }
        };
        series.push((snap.sessions_active, snap.cpu_s));
        if snap.sessions_active > peak.sessions_active {
            peak = snap.clone();
            last_change = Instant::now();
        }
        // Counted only when the log shows nothing up to after this snapshot was taken.
        if log.poll() == 0 && s.failed == 0 {
            held_ok = held_ok.max(snap.sessions_active);
        }
        let fds = daemon.open_fds().unwrap_or(0);
        let near_fd_limit = fd_limit.is_some_and(|l| fds + fd_margin >= l);
        if at_peak.is_none() && (snap.sessions_active >= u64::from(target) || near_fd_limit) {
            // SIPp stopped meanwhile so that nothing moves while the daemon is inspected.
            sipp.signal(libc::SIGSTOP);
            at_peak = Some(daemon.inspect(&base, &rss_split_before, fds));
            sipp.signal(libc::SIGCONT);
        }
        if snap.sessions_active >= u64::from(target) {
            break format!("target of {target} sessions reached");
        }
        if s.failed > 0 {
            break format!("SIPp counted {} failed calls", s.failed);
        }
        if let Some(st) = sipp.child.try_wait()? {
            break format!("SIPp exited ({st})");
        }
        if last_change.elapsed() > Duration::from_secs(20) {
            break "the session count stopped moving for 20 s".to_string();
        }
    };
    let ramp_s = t0.elapsed().as_secs_f64();
    let ramp_cpu_ms = (peak.sessions_active > base.sessions_active).then(|| {
        (peak.cpu_s - base.cpu_s) * 1000.0 / (peak.sessions_active - base.sessions_active) as f64
    });
    let by_held = cpu_per_session_by_held(&series, u64::from(target) / 5);
    let at_peak = at_peak.unwrap_or_else(|| {
        daemon.inspect(&base, &rss_split_before, daemon.open_fds().unwrap_or(0))
    });
    let s = sipp.last_stats().unwrap_or_default();
    sipp.kill();
    log.poll();
    eprintln!(
        "bench: sip held: peak {} sessions ({held_ok} with zero failures), sipp current={} failed={}; at {} sessions: {} flow entries, {} B/session RSS, {} fds; {stop_reason}",
        peak.sessions_active,
        s.current,
        s.failed,
        at_peak["sessions"],
        at_peak["flow_entries"],
        at_peak["memory_per_session_bytes"],
        at_peak["open_fds"]
    );
    // A daemon out of fds may spin in its control accept loop (see the log): no clean stop.
    let stopped = if log.warnings > 0 {
        daemon.kill();
        Err(anyhow::anyhow!(
            "killed: out of file descriptors, it may spin logging accept errors"
        ))
    } else {
        daemon.stop()
    };
    log.poll();
    Ok(json!({
        "target_sessions": target, "ramp_rate": rate, "ramp_s": ramp_s,
        "ramp_cpu_ms_per_session": ramp_cpu_ms, "cpu_ms_per_session_by_held": by_held,
        "peak_sessions": peak.sessions_active, "max_held_zero_failures": held_ok,
        "sipp_current_calls": s.current, "sipp_failed": s.failed, "sipp_errors": sipp.errors(),
        "stop_reason": stop_reason, "rejections": peak.rejections,
        "daemon_warnings_after_sessions": (log.warnings > 0).then_some(peak.sessions_active),
        "rss_kib_before": base.rss_kib, "rss_split_before": rss_split_before,
        "nofile_limit": nofile, "at_peak": at_peak, "bpf_maps_before": maps_before,
        "flow_maps_bytes_per_session": flow_map_bytes_per_session(&maps_before, &at_peak),
        "daemon_warnings": log.warnings, "daemon_warning_kinds": log.kinds(),
        "daemon_log_first_warnings": log.first,
        "daemon_stop": stopped.map_or_else(|e| format!("{e:#}"), |()| "clean".into()),
    }))
}

/// Daemon CPU per new session while the sessions held went from `lo` to `lo + step`, for each
/// step: flat if a set-up costs the same with 0 or 9 000 sessions held, rising if some work is
/// proportional to the sessions held.
fn cpu_per_session_by_held(series: &[(u64, f64)], step: u64) -> Vec<Value> {
    let step = step.max(1);
    let mut out = Vec::new();
    let mut lo = 0;
    loop {
        let first = series.iter().find(|(n, _)| *n >= lo);
        let last = series.iter().find(|(n, _)| *n >= lo + step);
        let (Some(&(n0, c0)), Some(&(n1, c1))) = (first, last) else {
            break;
        };
        if n1 > n0 {
            out.push(json!({
                "held_from": n0, "held_to": n1,
                "cpu_ms_per_session": (c1 - c0) * 1000.0 / (n1 - n0) as f64,
            }));
        }
        lo += step;
    }
    out
}

/// Growth of the flow maps' memory (bpftool reports the kernel's usage) per session held.
fn flow_map_bytes_per_session(before: &Value, at_peak: &Value) -> Option<u64> {
    let b = before["flow_maps_bytes"].as_u64()?;
    let p = at_peak["bpf_maps"]["flow_maps_bytes"].as_u64()?;
    let n = at_peak["sessions"].as_u64().filter(|&n| n > 0)?;
    Some(p.saturating_sub(b) / n)
}

/// The soft limit from a `/proc/<pid>/limits` "Max open files" line.
fn nofile_soft(line: Option<&str>) -> Option<u64> {
    line?.split_whitespace().nth(3)?.parse().ok()
}

/// Follows the daemon's log, counting warnings and errors as they are written.
pub(super) struct LogWatch {
    path: PathBuf,
    pub(super) offset: u64,
    pub(super) warnings: u64,
    /// The first distinct warning lines (ANSI colours stripped).
    pub(super) first: Vec<String>,
    /// Warning count per message, numbers masked.
    by_kind: std::collections::BTreeMap<String, u64>,
}

impl LogWatch {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            warnings: 0,
            first: Vec::new(),
            by_kind: Default::default(),
        }
    }

    /// Reads what was appended (at most 4 MiB a call: a daemon spinning on an error can write
    /// tens of MB a second); returns the new warnings.
    pub(super) fn poll(&mut self) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return 0;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut buf = Vec::new();
        let _ = f.take(4 << 20).read_to_end(&mut buf);
        // Only whole lines; when more than 4 MiB was written, skip to the end.
        let used = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        self.offset = if len.saturating_sub(self.offset) > 4 << 20 {
            len
        } else {
            self.offset + used as u64
        };
        let mut new = 0;
        for line in String::from_utf8_lossy(&buf[..used]).lines() {
            let line = strip_ansi(line);
            if !(line.contains(" WARN ") || line.contains(" ERROR ")) {
                continue;
            }
            new += 1;
            let msg = line.split_once(' ').map_or(line.as_str(), |x| x.1).trim();
            let kind: String = msg
                .chars()
                .map(|c| if c.is_ascii_digit() { 'N' } else { c })
                .collect();
            let kind = kind.split("NNN").next().unwrap_or("").to_string();
            if !self.by_kind.contains_key(&kind) && self.first.len() < 10 {
                self.first.push(msg.to_string());
            }
            *self.by_kind.entry(kind).or_default() += 1;
        }
        self.warnings += new;
        new
    }

    pub(super) fn kinds(&self) -> Value {
        json!(self.by_kind)
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn recorder_bin() -> PathBuf {
    workspace_root().join("target/release/recorder")
}

/// Counters read from the daemon at one moment.
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshot {
    pub(super) sessions_active: u64,
    pub(super) sessions_started: u64,
    pub(super) sessions_ended: u64,
    pub(super) rejections: Value,
    /// The SIP endpoint's counters (its 503s for overload are not SIPREC rejections).
    pub(super) endpoint: Value,
    pub(super) spool_recordings: u64,
    /// None when the daemon did not answer the index query in time.
    pub(super) index_recordings: Option<u64>,
    pub(super) rss_kib: u64,
    pub(super) cpu_s: f64,
    /// The daemon's writer counters (`recorder status`).
    pub(super) writer: Value,
}

/// A bpffs mount for the daemon's pins: `ip netns exec` remounts /sys, which hides
/// /sys/fs/bpf from the daemon (it would run unpinned and warn).
fn bench_bpffs() -> Result<PathBuf> {
    let dir = PathBuf::from("/run/recorder-bench-bpffs");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.nth(1) == Some("/run/recorder-bench-bpffs") && fields.next() == Some("bpf")
    });
    if !mounted {
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .context("mount bpffs")?;
        if !status.success() {
            bail!("mount -t bpf bpf {} failed", dir.display());
        }
    }
    Ok(dir)
}

/// The spool of the daemons a bench part starts: a dedicated ext4 filesystem (default mkfs
/// options, journal included) on a loop device over a sparse image, as a recording host keeps
/// its spool on a filesystem of its own. Not the workspace's filesystem: on this VM that is
/// ext4 without a journal, aged by builds, where creating one file cost 0.7-1.3 ms of CPU
/// (the inode allocator skips the inodes deleted in the last minutes, one buffer lookup each);
/// at five files per recording that alone held the writer up for seconds at 2 000 calls, and
/// tcpdump, writing one file, never pays it. Unmounted and removed on drop.
pub(super) struct SpoolFs {
    mount: PathBuf,
    device: String,
    image: PathBuf,
}

impl SpoolFs {
    /// Mounts a fresh filesystem at `mount` (created), its image beside it; sized to the free
    /// space of the workspace's filesystem less 4 GiB (sparse: it takes what is written).
    pub(super) fn mount(mount: &Path) -> Result<Self> {
        let image = mount.with_extension("img");
        let _ = Command::new("umount").arg("-l").arg(mount).status();
        let _ = std::fs::remove_file(&image);
        std::fs::create_dir_all(mount)?;
        let parent = mount.parent().unwrap_or(Path::new("."));
        let free = super::free_bytes(parent).unwrap_or(0);
        let size = free.saturating_sub(4 << 30).min(128 << 30);
        if size < 4 << 30 {
            bail!(
                "not enough disk for the bench spool: {} GB free beside {}",
                free >> 30,
                mount.display()
            );
        }
        std::fs::File::create(&image)?.set_len(size)?;
        // One inode per 64 KiB (a recording's files are megabytes), the inode tables written
        // now rather than by ext4lazyinit during the runs.
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-i", "65536", "-E"])
            .arg("lazy_itable_init=0,lazy_journal_init=0")
            .arg(&image)
            .status()
            .context("mkfs.ext4 for the bench spool (e2fsprogs)")?;
        if !mkfs.success() {
            let _ = std::fs::remove_file(&image);
            bail!("mkfs.ext4 {} failed", image.display());
        }
        // Direct I/O to the image: no second copy of every page in the workspace's cache.
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&image)
            .output()
            .context("losetup")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&image);
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let fs = Self {
            mount: mount.to_path_buf(),
            device,
            image,
        };
        let mounted = Command::new("mount")
            .arg(&fs.device)
            .arg(&fs.mount)
            .status()
            .context("mount")?;
        if !mounted.success() {
            bail!("mount {} on {} failed", fs.device, fs.mount.display());
        }
        Ok(fs)
    }

    /// Keeps the filesystem mounted after the bench (`BENCH_MEDIA_KEEP`: files to look at).
    pub(super) fn keep(self) {
        eprintln!(
            "bench: spool kept mounted at {} ({} on {}); umount and losetup -d it when done",
            self.mount.display(),
            self.device,
            self.image.display()
        );
        std::mem::forget(self);
    }
}

/// What the reports say about the spool.
pub(super) const SPOOL_NOTE: &str = "The daemons' spool is a dedicated ext4 filesystem (mkfs.ext4 defaults, journal on) on a loop device with direct I/O to a sparse image, as a recording host keeps its spool; on this VM's own filesystem (ext4 without a journal, aged by builds) creating a file costs 0.7-1.3 ms of CPU.";

impl Drop for SpoolFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// `recorder run` in the receiver namespace, pinned to CPU 1.
pub(super) struct Daemon {
    child: Option<Child>,
    control: PathBuf,
    pub(super) spool: PathBuf,
    pub(super) log: PathBuf,
    /// The daemon's bpffs pins: a daemon that did not stop cleanly leaves its XDP link pinned
    /// there, attached to the bench interface, and the next daemon could not attach.
    pins: PathBuf,
    config: PathBuf,
}

/// `recorder run --config <config>` in the receiver namespace, pinned to CPU 1, its output
/// appended to `log`.
fn spawn_daemon(config: &Path, log: &Path) -> Result<Child> {
    let logf = std::fs::File::options()
        .append(true)
        .create(true)
        .open(log)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NS_R, "taskset", "-c", "1"])
        .arg(recorder_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::from(logf.try_clone()?))
        .stderr(Stdio::from(logf));
    // SAFETY: only setrlimit between fork and exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(|| {
            // As packaging/recorder.service (LimitNOFILE): the file threads keep the live
            // recordings' files open within a quarter of it.
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        })
    };
    cmd.spawn().context("starting recorder")
}

impl Daemon {
    fn start(dir: &Path, tag: &str, cooldown_secs: u32, max_sessions: u32) -> Result<Self> {
        Self::start_with(dir, tag, cooldown_secs, max_sessions, "")
    }

    /// Like [`Daemon::start`], with `extra` TOML lines appended to its configuration.
    pub(super) fn start_with(
        dir: &Path,
        tag: &str,
        cooldown_secs: u32,
        max_sessions: u32,
        extra: &str,
    ) -> Result<Self> {
        let spool = dir.join("spool").join(tag);
        let _ = std::fs::remove_dir_all(&spool);
        std::fs::create_dir_all(&spool)?;
        let control = dir.join(format!("control-{tag}.sock"));
        let log = dir.join(format!("recorder-{tag}.log"));
        let config = dir.join(format!("recorder-{tag}.toml"));
        let pins = bench_bpffs()?.join(tag);
        let _ = std::fs::remove_dir_all(&pins);
        // Two port pairs per session (RTP + RTCP each); 10000-64999 holds 27 500 pairs.
        let base = format!(
            "interfaces = [\"{IF_R}\"]\nsip_listen = [\"{IP_R}:5060\"]\nmedia_address = \"{IP_R}\"\n\
rtp_ports = \"10000-64999\"\nport_cooldown_secs = {cooldown_secs}\nspool = \"{}\"\n\
max_flows = 65536\nmax_sessions = {max_sessions}\nidle_timeout_secs = 7200\n\
control_socket = \"{}\"\nlog_level = \"warn\"\nmin_free_bytes = 1048576\npin_dir = \"{}\"\n",
            spool.display(),
            control.display(),
            pins.display(),
        );
        // A key in `extra` replaces the base line of that key (TOML refuses a key twice).
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        let overridden: Vec<String> = extra.lines().map(key).collect();
        let mut text: String = base
            .lines()
            .filter(|l| !overridden.contains(&key(l)))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(extra);
        std::fs::write(&config, text)?;
        std::fs::File::create(&log)?;
        let child = spawn_daemon(&config, &log)?;
        let mut d = Self {
            child: Some(child),
            control,
            spool,
            log,
            pins,
            config,
        };
        d.wait_ready(Duration::from_secs(30))?;
        Ok(d)
    }

    /// Waits until the daemon answers `recorder status` with its SIP side up.
    pub(super) fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("recorder exited at start ({st}):\n{}", self.log_text());
            }
            if self.ctl("status").is_ok_and(|v| !v["sip"].is_null()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("recorder not ready after {within:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(200)); // polling another process's socket
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(super) fn ctl(&self, what: &str) -> Result<Value> {
        let out = Command::new(recorder_bin())
            .args([what, "--json", "--socket"])
            .arg(&self.control)
            .output()?;
        if !out.status.success() {
            bail!(
                "recorder {what}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub(super) fn flows(&self) -> Result<Value> {
        self.ctl("flows")
    }

    /// The daemon's counters; `files` also counts recordings in the spool and the index (slow
    /// with thousands of recordings, so not while ramping up held sessions).
    pub(super) fn snapshot(&self, files: bool) -> Result<Snapshot> {
        let st = self.ctl("status")?;
        let siprec = &st["sip"]["siprec"];
        let ended = siprec["sessions_ended"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let index_recordings = if files {
            self.ctl("recordings")
                .ok()
                .and_then(|v| v.as_array().map(|a| a.len() as u64))
        } else {
            None
        };
        let pid = self.pid().context("daemon stopped")?;
        Ok(Snapshot {
            sessions_active: st["sip"]["sessions_active"].as_u64().unwrap_or(0),
            sessions_started: siprec["sessions_started"].as_u64().unwrap_or(0),
            sessions_ended: ended,
            rejections: siprec["rejections"].clone(),
            endpoint: st["sip"]["endpoint"].clone(),
            spool_recordings: if files {
                spool_recordings(&self.spool)
            } else {
                0
            },
            index_recordings,
            rss_kib: vm_rss_kib(pid),
            cpu_s: proc_cpu(pid).unwrap_or(0.0),
            writer: st["writer"].clone(),
        })
    }

    /// Waits until `ended` sessions have ended and the spool and the index hold `spool` and
    /// `index` recordings, or nothing moved for `idle`; returns the last snapshot either way.
    pub(super) fn settle(
        &self,
        ended: u64,
        spool: u64,
        index: u64,
        idle: Duration,
    ) -> Result<Snapshot> {
        let mut last = (0, 0, None);
        let mut moved = Instant::now();
        let mut good: Option<Snapshot> = None;
        let t0 = Instant::now();
        let give_up = t0 + 6 * idle;
        // When each part was first seen done: which stage lags the signalling.
        let mut reached: [Option<f64>; 3] = [None; 3];
        let mut last_progress = t0;
        loop {
            match self.snapshot(true) {
                Ok(s) => {
                    let parts = [
                        s.sessions_active == 0 && s.sessions_ended >= ended,
                        s.spool_recordings >= spool,
                        s.index_recordings.is_some_and(|i| i >= index),
                    ];
                    for (r, ok) in reached.iter_mut().zip(parts) {
                        if ok && r.is_none() {
                            *r = Some(t0.elapsed().as_secs_f64());
                        }
                    }
                    let done = parts.iter().all(|p| *p);
                    if !done && last_progress.elapsed() >= Duration::from_secs(5) {
                        last_progress = Instant::now();
                        let w = &s.writer;
                        eprintln!(
                            "bench: settling {:.0} s: sessions active {} ended {}/{ended}, writer active {} awaiting link {} index queue {}, spool {}/{spool}, index {:?}/{index}",
                            t0.elapsed().as_secs_f64(),
                            s.sessions_active,
                            s.sessions_ended,
                            w["active_recordings"],
                            w["ended_awaiting_link"],
                            w["index_queued"],
                            s.spool_recordings,
                            s.index_recordings,
                        );
                    }
                    if done {
                        eprintln!(
                            "bench: settled after {:.1} s: sessions ended {:.1} s, spool {:.1} s, index {:.1} s",
                            t0.elapsed().as_secs_f64(),
                            reached[0].unwrap_or(0.0),
                            reached[1].unwrap_or(0.0),
                            reached[2].unwrap_or(0.0)
                        );
                    }
                    let now = (s.sessions_ended, s.spool_recordings, s.index_recordings);
                    if now != last {
                        last = now;
                        moved = Instant::now();
                    }
                    if done {
                        return Ok(s);
                    }
                    good = Some(s);
                }
                // Busy: the status or index query timed out (a saturated daemon answers late).
                // Recordings still landing in the spool are progress all the same.
                Err(e) => {
                    let spool_now = spool_recordings(&self.spool);
                    if spool_now != last.1 {
                        last.1 = spool_now;
                        moved = Instant::now();
                    } else if good.is_none() && moved.elapsed() > idle {
                        return Err(e);
                    }
                }
            }
            if moved.elapsed() > idle || Instant::now() > give_up {
                return good.context("no answer from the daemon");
            }
            std::thread::sleep(Duration::from_millis(250)); // polling another process
        }
    }

    fn open_fds(&self) -> Option<u64> {
        let pid = self.pid()?;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|rd| rd.count() as u64)
    }

    /// Figures at the peak: sessions, flow entries (daemon and kernel), RSS, fds, BPF maps.
    fn inspect(&self, base: &Snapshot, base_split: &Value, fds: u64) -> Value {
        let snap = match self.snapshot(false) {
            Ok(s) => s,
            Err(e) => return json!({ "error": format!("{e:#}") }),
        };
        let flows = self.flows().unwrap_or(Value::Null);
        let entries = flows.as_array().map(|a| a.len() as u64);
        let in_kernel = flows
            .as_array()
            .map(|a| a.iter().filter(|f| f["in_kernel"] == true).count());
        let n = snap.sessions_active;
        let rss_delta = snap.rss_kib.saturating_sub(base.rss_kib) * 1024;
        let split = self.rss_split();
        let per = |k: &str| {
            let d = split[k].as_u64()?.saturating_sub(base_split[k].as_u64()?) * 1024;
            (n > 0).then(|| d / n)
        };
        json!({
            "sessions": n,
            "flow_entries": entries, "flow_entries_in_kernel": in_kernel,
            "flow_entries_per_session": entries.filter(|_| n > 0).map(|e| e as f64 / n as f64),
            "rss_kib": snap.rss_kib, "rss_split": split,
            "memory_per_session_bytes": (n > 0).then(|| rss_delta / n),
            "anon_memory_per_session_bytes": per("rss_anon_kib"),
            "file_memory_per_session_bytes": per("rss_file_kib"),
            "open_fds": fds, "open_fds_by_kind": self.fd_kinds(),
            "fds_per_session": (n > 0).then(|| fds as f64 / n as f64),
            "bpf_maps": bpf_maps().unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
        })
    }

    /// The daemon's open fds by what they point at: files per name in the spool, sockets, ...
    fn fd_kinds(&self) -> Value {
        let Some(pid) = self.pid() else {
            return Value::Null;
        };
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let kind = if target.starts_with(&self.spool) {
                let name = target
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                format!("spool file {name}")
            } else {
                let t = target.to_string_lossy();
                // "socket:[123]", "anon_inode:bpf-map", "/dev/null": keep the kind only.
                t.split([':', '[']).next().unwrap_or("").to_string()
            };
            *kinds.entry(kind).or_default() += 1;
        }
        json!(kinds)
    }

    /// Resident memory split: anonymous (heap) and file-backed (mmapped recording files).
    fn rss_split(&self) -> Value {
        let Some(pid) = self.pid() else {
            return Value::Null;
        };
        json!({
            "rss_anon_kib": status_kib(pid, "RssAnon:"),
            "rss_file_kib": status_kib(pid, "RssFile:"),
            "rss_shmem_kib": status_kib(pid, "RssShmem:"),
        })
    }

    fn nofile_limit(&self) -> Option<String> {
        let pid = self.pid()?;
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// SIGTERM and wait (ending thousands of recordings takes a while); SIGKILL after 120 s.
    pub(super) fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child (`ip netns exec` and taskset exec the daemon).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = child.try_wait()? {
                // A clean stop removed them; otherwise they keep XDP attached.
                let _ = std::fs::remove_dir_all(&self.pins);
                if !st.success() {
                    bail!("recorder exited with {st}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&self.pins);
                bail!("recorder did not exit within 120 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100)); // polling a child's exit
        }
    }
}

impl Daemon {
    /// `kill -9`: the daemon's pins stay (XDP keeps capturing into the pinned rings), as a
    /// crash leaves them.
    pub(super) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait, keeping the pins (with `detach_on_exit` the daemon leaves them, and
    /// its handover file, for the next one).
    pub(super) fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("daemon not running")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("recorder did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5)); // polling a child's exit
        }
    }

    /// Starts the daemon again on the same configuration, spool and pins (not waiting for it).
    pub(super) fn respawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("daemon still running");
        }
        self.child = Some(spawn_daemon(&self.config, &self.log)?);
        Ok(())
    }

    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_dir_all(&self.pins);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn spool_recordings(spool: &Path) -> u64 {
    std::fs::read_dir(spool).map_or(0, |rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().join("metadata.json").exists())
            .count() as u64
    })
}

fn vm_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// SIPp's counters from its statistics CSV.
#[derive(Clone, Debug, Default)]
pub(super) struct SippStats {
    pub(super) successful: u64,
    pub(super) failed: u64,
    pub(super) current: u64,
    pub(super) retransmissions: u64,
}

pub(super) struct Sipp {
    pub(super) child: Child,
    stat: PathBuf,
    errors: PathBuf,
}

impl Sipp {
    pub(super) fn start(
        dir: &Path,
        stat: &Path,
        extra: &[String],
        commands: &mut Vec<String>,
    ) -> Result<Self> {
        let scenario = workspace_root().join("tests/sipp/siprec_bench.xml");
        let errors = stat.with_extension("errors.log");
        let _ = std::fs::remove_file(stat);
        let _ = std::fs::remove_file(&errors);
        let mut argv: Vec<String> = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            NS_S.into(),
            "taskset".into(),
            "-c".into(),
            "0".into(),
            "sipp".into(),
            format!("{IP_R}:5060"),
            "-sf".into(),
            scenario.display().to_string(),
            "-t".into(),
            "u1".into(),
            "-i".into(),
            IP_S.into(),
            "-mi".into(),
            IP_S.into(),
            "-mp".into(),
            "40000".into(),
        ];
        argv.extend(extra.iter().cloned());
        argv.extend(
            ["-nostdin", "-trace_stat", "-fd", "1", "-trace_err", "-stf"]
                .iter()
                .map(|s| s.to_string()),
        );
        argv.push(stat.display().to_string());
        argv.push("-error_file".into());
        argv.push(errors.display().to_string());
        let shown = argv
            .iter()
            .map(|a| a.replace(&workspace_root().display().to_string(), "."))
            .collect::<Vec<_>>()
            .join(" ");
        if !commands.contains(&shown) {
            commands.push(shown);
        }
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sipp (install: cargo xtask setup)")?;
        Ok(Self {
            child,
            stat: stat.to_path_buf(),
            errors,
        })
    }

    /// The last line of the statistics CSV (SIPp writes one every `-fd` seconds and at exit).
    pub(super) fn last_stats(&self) -> Option<SippStats> {
        let text = std::fs::read_to_string(&self.stat).ok()?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines.next()?.split(';').collect();
        let last: Vec<&str> = lines.next_back()?.split(';').collect();
        let get = |name: &str| -> u64 {
            header
                .iter()
                .position(|h| *h == name)
                .and_then(|i| last.get(i))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Some(SippStats {
            successful: get("SuccessfulCall(C)"),
            failed: get("FailedCall(C)"),
            current: get("CurrentCall"),
            retransmissions: get("Retransmissions(C)"),
        })
    }

    pub(super) fn final_stats(&self) -> Result<SippStats> {
        self.last_stats()
            .with_context(|| format!("no SIPp statistics in {}", self.stat.display()))
    }

    /// The first lines of SIPp's error log.
    pub(super) fn errors(&self) -> Vec<String> {
        std::fs::read_to_string(&self.errors)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(10)
            .map(str::to_string)
            .collect()
    }

    pub(super) fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child (`ip netns exec` and taskset exec SIPp).
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Memory of the BPF maps of the XDP program attached to `bsr0` (bpftool's `bytes_memlock`).
fn bpf_maps() -> Result<Value> {
    let link: Value = serde_json::from_str(&sh(&[
        "ip", "-n", NS_R, "-j", "-d", "link", "show", "dev", IF_R,
    ])?)?;
    let prog_id = link[0]["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| link[0]["xdp"]["attached"][0]["prog"]["id"].as_u64())
        .context("no XDP program on the bench interface")?;
    let prog: Value = serde_json::from_str(&sh(&[
        "bpftool",
        "-j",
        "prog",
        "show",
        "id",
        &prog_id.to_string(),
    ])?)?;
    let mut maps = Vec::new();
    let (mut flow_bytes, mut total) = (0u64, 0u64);
    for id in prog["map_ids"].as_array().into_iter().flatten() {
        let Some(id) = id.as_u64() else { continue };
        let m: Value = serde_json::from_str(&sh(&[
            "bpftool",
            "-j",
            "map",
            "show",
            "id",
            &id.to_string(),
        ])?)?;
        let name = m["name"].as_str().unwrap_or("").to_string();
        let bytes = m["bytes_memlock"].as_u64().unwrap_or(0);
        total += bytes;
        if name == "FLOWS" || name == "FLOW_STATS" {
            flow_bytes += bytes;
        }
        maps.push(json!({
            "name": name, "type": m["type"], "max_entries": m["max_entries"], "bytes_memlock": bytes,
        }));
    }
    Ok(json!({ "flow_maps_bytes": flow_bytes, "all_maps_bytes": total, "maps": maps }))
}

/// The SIP rows of report.md.
pub fn markdown(sip: &Value) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## SIP (SIPREC sessions with SIPp)\n")?;
    if let Some(e) = sip["error"].as_str() {
        writeln!(md, "The SIP bench failed: {e}\n")?;
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
    let c = &sip["concurrent"];
    let p = &c["at_peak"];
    let mut row = |k: &str, v: String| writeln!(md, "| {k} | {v} |");
    row("figure", "value".into())?;
    row("---", "---".into())?;
    row(
        "sessions per second, zero failures (highest rate tried that passed)",
        format!(
            "{} (achieved {})",
            n(&sip["sessions_per_second"]),
            n(&sip["sessions_per_second_achieved"])
        ),
    )?;
    row(
        &format!(
            "concurrent sessions held, zero failures (target {})",
            n(&c["target_sessions"])
        ),
        n(&sip["max_concurrent_sessions"]),
    )?;
    row("peak sessions (failures or not)", n(&c["peak_sessions"]))?;
    row(
        "hold phase stopped because",
        format!(
            "{} (ramp {} calls/s, SIPp failed calls {})",
            n(&c["stop_reason"]),
            n(&c["ramp_rate"]),
            n(&c["sipp_failed"])
        ),
    )?;
    row("hold phase ramp rate chosen as", n(&c["ramp_rate_reason"]))?;
    if let Some(steps) = c["cpu_ms_per_session_by_held"].as_array() {
        let list: Vec<String> = steps
            .iter()
            .map(|s| {
                format!(
                    "{}-{}: {:.2}",
                    n(&s["held_from"]),
                    n(&s["held_to"]),
                    s["cpu_ms_per_session"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        row(
            "hold phase: daemon CPU ms per new session, by sessions held",
            list.join("; "),
        )?;
    }
    row(
        "hold phase: ramp time (s) / daemon CPU per session during the ramp (ms)",
        format!("{} / {}", n(&c["ramp_s"]), n(&c["ramp_cpu_ms_per_session"])),
    )?;
    row(
        "figures below measured at",
        format!("{} sessions", n(&p["sessions"])),
    )?;
    row(
        "flow entries (recorder flows; in kernel)",
        format!(
            "{} ({} per session; {} in the kernel map)",
            n(&p["flow_entries"]),
            n(&p["flow_entries_per_session"]),
            n(&p["flow_entries_in_kernel"])
        ),
    )?;
    row(
        "daemon RSS before calls / at that point (KiB)",
        format!("{} / {}", n(&c["rss_kib_before"]), n(&p["rss_kib"])),
    )?;
    row(
        "memory per session (RSS delta / sessions, bytes): anonymous + file-backed",
        format!(
            "{} = {} + {}",
            n(&p["memory_per_session_bytes"]),
            n(&p["anon_memory_per_session_bytes"]),
            n(&p["file_memory_per_session_bytes"])
        ),
    )?;
    row(
        "RSS anonymous / file-backed (mmapped recording files), before -> then (KiB)",
        format!(
            "{} -> {} / {} -> {}",
            n(&c["rss_split_before"]["rss_anon_kib"]),
            n(&p["rss_split"]["rss_anon_kib"]),
            n(&c["rss_split_before"]["rss_file_kib"]),
            n(&p["rss_split"]["rss_file_kib"])
        ),
    )?;
    row(
        "BPF flow maps FLOWS + FLOW_STATS (bpftool bytes_memlock), before -> then (bytes)",
        format!(
            "{} -> {} ({} per session)",
            n(&c["bpf_maps_before"]["flow_maps_bytes"]),
            n(&p["bpf_maps"]["flow_maps_bytes"]),
            n(&c["flow_maps_bytes_per_session"])
        ),
    )?;
    row(
        "BPF all maps memlock incl. ring buffers (bytes)",
        n(&p["bpf_maps"]["all_maps_bytes"]),
    )?;
    row(
        "daemon open fds (per session) / limit",
        format!(
            "{} ({}) / {}",
            n(&p["open_fds"]),
            n(&p["fds_per_session"]),
            n(&c["nofile_limit"])
        ),
    )?;
    if let Some(kinds) = p["open_fds_by_kind"].as_object() {
        let list: Vec<String> = kinds.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        row("daemon open fds by kind", list.join(", "))?;
    }
    if let Some(kinds) = c["daemon_warning_kinds"].as_object() {
        let list: Vec<String> = kinds.iter().map(|(k, v)| format!("{v} x `{k}`")).collect();
        if !list.is_empty() {
            row(
                "daemon warnings in the hold phase",
                list.join("; ").replace('|', "/"),
            )?;
        }
    }
    writeln!(md, "\n| rate (calls/s) | calls | successful | failed | retrans | daemon started | ended | spool | index | daemon warnings | achieved/s | daemon CPU ms/session | files settled after s | result |")?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for r in sip["sweep"].as_array().into_iter().flatten() {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            n(&r["rate"]),
            n(&r["calls"]),
            n(&r["successful"]),
            n(&r["failed"]),
            n(&r["retransmissions"]),
            n(&r["daemon_sessions_started"]),
            n(&r["daemon_sessions_ended"]),
            n(&r["spool_recordings"]),
            n(&r["index_recordings"]),
            n(&r["daemon_warnings"]),
            r["achieved_cps"]
                .as_f64()
                .map_or("n/a".into(), |v| format!("{v:.0}")),
            n(&r["daemon_cpu_ms_per_session"]),
            r["files_settled_after_s"]
                .as_f64()
                .map_or("n/a".into(), |v| format!("{v:.1}")),
            if r["passed"] == true { "pass" } else { "FAIL" },
        )?;
    }
    for note in sip["notes"].as_array().into_iter().flatten() {
        writeln!(md, "\n{}", note.as_str().unwrap_or(""))?;
    }
    writeln!(md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_rate_is_the_lowest_limit_rounded_down() {
        let plan = SipPlan::full();
        // 2 ms per session: half a CPU is 250/s, below the best rate and the cap.
        let (rate, why) = ramp_rate(&plan, Some(800), Some(2.0));
        assert_eq!(rate, 250, "{why}");
        assert!(why.contains("2.00 ms"), "{why}");
        // Cheap sessions: the cap.
        assert_eq!(ramp_rate(&plan, Some(800), Some(0.5)).0, 500);
        // The best sweep rate, when lower.
        assert_eq!(ramp_rate(&plan, Some(300), Some(0.5)).0, 300);
        // 3.4 ms: 147/s, rounded down to 100.
        assert_eq!(ramp_rate(&plan, Some(400), Some(3.4)).0, 100);
        // Never below 50; no CPU figure: the other limits.
        assert_eq!(ramp_rate(&plan, Some(400), Some(40.0)).0, 50);
        assert_eq!(ramp_rate(&plan, Some(400), None).0, 400);
        assert_eq!(ramp_rate(&plan, None, None).0, plan.rates[0]);
    }

    #[test]
    fn cpu_per_session_by_held_steps() {
        // 1 ms per session up to 1 000 held, 3 ms after.
        let series = [(0, 0.0), (500, 0.5), (1000, 1.0), (1500, 2.5), (2000, 4.0)];
        let steps = cpu_per_session_by_held(&series, 1000);
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0]["cpu_ms_per_session"].as_f64(), Some(1.0));
        assert_eq!(steps[1]["cpu_ms_per_session"].as_f64(), Some(3.0));
        assert!(cpu_per_session_by_held(&series[..1], 1000).is_empty());
    }
}
