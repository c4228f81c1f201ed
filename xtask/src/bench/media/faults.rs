//! The faults part of `cargo xtask bench` (`--only faults`): faults with live calls carrying
//! RTP, against the real release daemon.
//!
//! Same namespaces, daemon, SIPp calls and trafgen traffic as the media part (see its module
//! doc). For each case, on a fresh daemon: N calls (two PCMU streams each) are set up and held
//! (SIPp paused), trafgen sends 50 packets/s to every answered port for `secs` seconds, and the
//! fault strikes at 40 % of the traffic:
//!
//! * `kill9`: SIGKILL of the daemon, and a new daemon started at once on the same spool and
//!   pins. Every recording must come back `interrupted`, its pcap readable by Wireshark's
//!   reader (`capinfos`) and its WAV by sox (`soxi`), and new calls must be answered within
//!   2 s of the start (an OPTIONS probe, then one SIPp call).
//! * `spool_full`: the spool is a tmpfs the calls fill at about 40 % of the traffic. New INVITEs
//!   must get 503 with Retry-After, every file must stay readable, and the counters must say
//!   what was not written.
//! * `detach_restart`: SIGTERM with `detach_on_exit`, and a new daemon at once: no packet lost
//!   (the pinned rings cover the gap), every recording `complete`, the calls' BYEs answered by
//!   the new daemon.
//! * `flood`: `sip_flood` (tests/src/bin) at 5 000 requests/s from three source addresses,
//!   malformed messages and valid INVITEs (30 %), from the fault to the end of the traffic.
//!   `max_sessions` is the number of calls, so every valid INVITE of the flood is overload.
//!   Every packet must be recorded, every call's BYE answered, and the flood must get 503s.
//!
//! Then the calls end (SIPp resumes), every recording is read (the media part's counting, per
//! stream by RTP sequence number) and every pcap and WAV goes through `capinfos` and `soxi`.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::UdpSocket,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    answered_ports, blocks_of, delta, rx_quiet, send, Block, Daemon, LogWatch, Sipp, IF_R, IP_R,
    IP_S, NS_R, NS_S, PACKETS_PER_SEC, RING_BYTES,
};
use crate::bench::media::files::{read_recordings, Recorded};

/// Calls per second while the sessions are set up.
const RAMP_RATE: u32 = 200;
/// Spool bytes a call fills per second: two streams of 214-byte frames at 50 packets/s with
/// their pcap record headers, and 8 kHz 16-bit stereo WAV.
const SPOOL_BYTES_PER_CALL_S: u64 = 2 * 50 * (214 + 16) + 32_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    Kill9,
    SpoolFull,
    DetachRestart,
    Flood,
}

impl Fault {
    pub const ALL: [Fault; 4] = [
        Self::Kill9,
        Self::SpoolFull,
        Self::DetachRestart,
        Self::Flood,
    ];

    fn key(self) -> &'static str {
        match self {
            Self::Kill9 => "kill9",
            Self::SpoolFull => "spool_full",
            Self::DetachRestart => "detach_restart",
            Self::Flood => "flood",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Kill9 => "`kill -9` of the daemon, restarted at once",
            Self::SpoolFull => "the spool (a tmpfs) fills up during the calls",
            Self::DetachRestart => "restart with `--detach-on-exit` (SIGTERM, new daemon at once)",
            Self::Flood => "a SIP flood (5 000 requests/s, malformed and valid INVITEs, three source addresses) beside the calls",
        }
    }
}

pub struct FaultPlan {
    pub calls: u32,
    pub secs: u32,
    pub blocks: u32,
    pub cases: Vec<Fault>,
}

/// Runs every case; returns the report's `faults` section.
pub fn run(plan: &FaultPlan, out_dir: &Path, commands: &mut Vec<String>) -> Result<Value> {
    crate::bench::build_daemon()?;
    if plan.cases.contains(&Fault::Flood) {
        crate::run(crate::cargo(None).args([
            "build",
            "--release",
            "--package",
            "tests",
            "--bin",
            "sip_flood",
        ]))?;
    }
    let dir = out_dir.join("faults");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let spool_fs = crate::bench::sip::SpoolFs::mount(&dir.join("spool"))?;
    let _net = crate::bench::VethNamespaces::create(
        [NS_S, NS_R],
        [super::IF_S, IF_R],
        [IP_S, IP_R],
        Some([super::MAC_S, super::MAC_R]),
    )?;
    crate::bench::threaded_napi([NS_S, NS_R], [super::IF_S, IF_R])?;
    let started = Instant::now();
    let mut cases = Vec::new();
    for &fault in &plan.cases {
        let r = run_case(fault, plan, &dir, commands).unwrap_or_else(|e| {
            eprintln!("bench: fault {} failed to run: {e:#}", fault.key());
            json!({ "fault": fault.key(), "what": fault.what(), "ok": false,
                    "result": format!("failed to run: {e:#}") })
        });
        eprintln!(
            "bench: fault {}: {}",
            fault.key(),
            r["result"].as_str().unwrap_or("?")
        );
        cases.push(r);
    }
    if std::env::var_os("BENCH_MEDIA_KEEP").is_some() {
        spool_fs.keep();
    }
    Ok(json!({
        "calls": plan.calls,
        "traffic_secs": plan.secs,
        "fault_at_s": fault_at(plan.secs).as_secs_f64(),
        "cases": cases,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "notes": [
            "Same set-up as the media part: SIPp, trafgen on CPU 0; the daemon and bsr0's threaded NAPI on CPU 1, on a 2-core machine shared with other work.",
            crate::bench::sip::SPOOL_NOTE,
            "Files invalid: a pcap that capinfos (Wireshark's reader) cannot read, or a WAV that soxi cannot read or whose sample count differs from metadata.json's.",
            "kill9: packets expected up to the kill = 50 per stream per second of traffic before it; a kill -9 loses at most the last flush_interval (2 s) of each recording.",
        ],
    }))
}

/// The quick faults `cargo xtask test` runs after the cargo tests (200 calls, 10 s of RTP,
/// every case): fails unless every case passed. Its report goes to `target/bench-check/`.
pub fn check() -> Result<()> {
    let out = crate::workspace_root().join("target/bench-check");
    std::fs::create_dir_all(&out)?;
    let plan = FaultPlan {
        calls: 200,
        secs: 10,
        blocks: 2,
        cases: Fault::ALL.to_vec(),
    };
    let mut commands = Vec::new();
    let faults = run(&plan, &out, &mut commands)?;
    std::fs::write(
        out.join("faults.json"),
        serde_json::to_string_pretty(&json!({ "faults": faults, "commands": commands }))?,
    )?;
    std::fs::write(out.join("faults.md"), markdown(&faults))?;
    let bad: Vec<String> = faults["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["ok"] != true)
        .map(|c| format!("{}: {}", c["fault"], c["result"].as_str().unwrap_or("?")))
        .collect();
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    Ok(())
}

fn fault_at(secs: u32) -> Duration {
    Duration::from_millis(u64::from(secs) * 400)
}

/// Unmounts the tmpfs spool when the case ends (after the daemon, declared before it).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_case(
    fault: Fault,
    plan: &FaultPlan,
    dir: &Path,
    commands: &mut Vec<String>,
) -> Result<Value> {
    let n = plan.calls;
    let secs = plan.secs;
    let ramp_s = n.div_ceil(RAMP_RATE);
    let hold_s = ramp_s + secs + 12 + n / 1000;
    let tag = format!("fault-{}", fault.key());
    let spool = dir.join("spool").join(&tag);
    std::fs::create_dir_all(&spool)?;
    let spool_bytes = u64::from(n) * SPOOL_BYTES_PER_CALL_S * u64::from(secs) * 2 / 5 + (64 << 20);
    let _unmount = if fault == Fault::SpoolFull {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={spool_bytes}"), "tmpfs"])
            .arg(&spool)
            .status()
            .context("mount tmpfs")?;
        if !status.success() {
            bail!("mount -t tmpfs on {} failed", spool.display());
        }
        Some(Unmount(spool.clone()))
    } else {
        None
    };
    let mut extra = format!("ring_bytes = {RING_BYTES}\n");
    if fault == Fault::DetachRestart {
        extra.push_str("detach_on_exit = true\n");
    }
    if fault == Fault::SpoolFull {
        // Refuse new sessions with 8 MiB left, as the full-disk test does.
        extra.push_str("min_free_bytes = 8388608\n");
    }
    if fault == Fault::Flood {
        // The live calls fill the daemon: every valid INVITE of the flood is overload (503),
        // and none becomes a recording beside the calls'.
        extra.push_str(&format!("max_sessions = {n}\n"));
    }
    // The media part's base configuration sets min_free_bytes itself; a second key would not
    // parse, so the full-spool case replaces it below.
    let mut daemon = start_daemon(dir, &tag, n, &extra)?;
    let mut log = LogWatch::new(&daemon.log);
    log.poll();

    // 1. The calls, held, SIPp paused.
    let stat_csv = dir.join(format!("sipp-{tag}.csv"));
    let args = super::hold_args(RAMP_RATE, n, hold_s);
    let t_calls = Instant::now();
    let mut sipp = Sipp::start(dir, &stat_csv, &args, commands)?;
    let mut last_change = Instant::now();
    let mut last_active = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500)); // polling SIPp and the daemon
        let s = sipp.last_stats().unwrap_or_default();
        let active = daemon.snapshot(false).map_or(0, |s| s.sessions_active);
        if active != last_active {
            last_active = active;
            last_change = Instant::now();
        }
        if active >= u64::from(n) && s.current >= u64::from(n) {
            break;
        }
        if s.failed > 0 || last_change.elapsed() > Duration::from_secs(30) {
            let errors = sipp.errors();
            sipp.kill();
            bail!(
                "setting up {n} calls: {active} up, {} failed (SIPp errors: {errors:?})",
                s.failed
            );
        }
    }
    sipp.signal(libc::SIGSTOP);
    eprintln!(
        "bench: fault {}: {n} sessions up in {:.1} s, SIPp paused",
        fault.key(),
        t_calls.elapsed().as_secs_f64()
    );
    let ports = answered_ports(&daemon.flows()?, n)?;
    let runs = super::runs_of(&ports);
    let blocks = blocks_of(&runs, plan.blocks);

    // 2. The traffic, and the fault at 40 % of it.
    let tg_dir = dir.join(format!("trafgen-{tag}"));
    let _ = std::fs::remove_dir_all(&tg_dir);
    std::fs::create_dir_all(&tg_dir)?;
    let status0 = daemon.ctl("status")?;
    let rss_before = daemon.snapshot(false).map_or(0, |s| s.rss_kib);
    let traffic = {
        let blocks: Vec<Block> = blocks.clone();
        let tg_dir = tg_dir.clone();
        std::thread::spawn(move || {
            let mut cmds = Vec::new();
            let r = send(&blocks, secs, &tg_dir, &mut cmds);
            (r, cmds)
        })
    };
    // trafgen's first slot starts 300 ms after `send` is called.
    let traffic_t0 = Instant::now() + Duration::from_millis(300);
    std::thread::sleep(Duration::from_millis(300) + fault_at(secs)); // the fault's scheduled time
                                                                     // The recordings of the N calls (a call made after a restart to see it serve again is
                                                                     // read apart).
    let call_dirs = recording_dirs(&spool);
    let fault_t = Instant::now();
    let traffic_before_fault_s = fault_t.duration_since(traffic_t0).as_secs_f64();
    let mut injected = json!({});
    match fault {
        Fault::Kill9 => {
            daemon.kill9();
            let killed_s = fault_t.elapsed().as_secs_f64();
            daemon.respawn()?;
            injected = serve_again(&mut daemon, fault_t, dir, commands)?;
            injected["killed_after_s"] = json!(killed_s);
        }
        Fault::DetachRestart => {
            let st = daemon.terminate(Duration::from_secs(60))?;
            let stopped_s = fault_t.elapsed().as_secs_f64();
            daemon.respawn()?;
            let mut serve = serve_again(&mut daemon, fault_t, dir, commands)?;
            serve["old_daemon_exit"] = json!(st.code());
            serve["old_daemon_stopped_after_s"] = json!(stopped_s);
            injected = serve;
        }
        Fault::SpoolFull => {}
        // For the rest of the traffic, less a second for the flood's answers to settle.
        Fault::Flood => {
            injected = flood(
                &daemon,
                secs.saturating_sub(fault_at(secs).as_secs() as u32 + 1)
                    .max(1),
            )?
        }
    }
    let (sent, cmds) = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?;
    for c in cmds {
        if !commands.contains(&c) {
            commands.push(c);
        }
    }
    let (sent, _span) = sent?;
    rx_quiet()?;
    // The writer has taken what XDP captured: its packet counter stops moving.
    let mut last_in = None;
    let drain_t0 = Instant::now();
    let status1 = loop {
        std::thread::sleep(Duration::from_millis(300)); // polling the daemon
        let st = daemon.ctl("status")?;
        let now = st["writer"]["packets_in"].as_u64();
        if now == last_in || drain_t0.elapsed() > Duration::from_secs(30) {
            break st;
        }
        last_in = now;
    };
    let rss_after_traffic = daemon.snapshot(false).map_or(0, |s| s.rss_kib);
    if fault == Fault::SpoolFull {
        injected = json!({
            "spool_tmpfs_bytes": spool_bytes,
            "options": probe(Probe::Options, Duration::from_secs(5))?,
            "new_invite": probe(Probe::Invite, Duration::from_secs(5))?,
        });
    }

    // 3. The calls end.
    sipp.signal(libc::SIGCONT);
    let sipp_deadline = t_calls + Duration::from_secs(u64::from(hold_s + 2 * ramp_s) + 90);
    while sipp.child.try_wait()?.is_none() && Instant::now() < sipp_deadline {
        std::thread::sleep(Duration::from_millis(200)); // polling SIPp's exit
    }
    let sipp_stats = sipp.last_stats().unwrap_or_default();
    sipp.kill();
    let finish_t0 = Instant::now();
    let finished = loop {
        if let Ok(st) = daemon.ctl("status") {
            if st["writer"]["active_recordings"].as_u64() == Some(0) {
                break true;
            }
        }
        if finish_t0.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250)); // polling the daemon
    };
    log.poll();
    let status_end = daemon.ctl("status")?;
    let rss_end = daemon.snapshot(false).map_or(0, |s| s.rss_kib);
    let stopped = daemon.stop();

    // 4. What is on disk.
    // Beside the spool, on its filesystem (a rename, not a copy).
    let probes = dir.join("spool").join(format!("probe-recordings-{tag}"));
    let _ = std::fs::remove_dir_all(&probes);
    std::fs::create_dir_all(&probes)?;
    for d in recording_dirs(&spool) {
        if !call_dirs.contains(&d) {
            if let Some(name) = d.file_name() {
                std::fs::rename(&d, probes.join(name))?;
            }
        }
    }
    let probe_files = check_files(&probes)?;
    // SIPp sends no RTP: a packet in the after-restart call's pcap is another call's media
    // landing on a reused port.
    let probe_rec = read_recordings(&probes)?;
    let probe_packets: u64 =
        probe_rec.streams.values().map(|c| c.packets).sum::<u64>() + probe_rec.stray;
    let rec = read_recordings(&spool)?;
    let files = check_files(&spool)?;
    if std::env::var_os("BENCH_MEDIA_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tg_dir);
    }
    let per_stream = u64::from(PACKETS_PER_SEC * secs);
    let tg_packets: u64 = sent.iter().filter_map(|s| s.packets).sum();
    let sent_answered = super::answered_sent(&sent, &blocks, secs);
    let (recorded, min_stream, max_stream) = stream_figures(&rec, &ports);
    let xdp = delta(&status0["xdp"], &status1["xdp"]);
    let writer_end = &status_end["writer"];
    let mut failed: Vec<String> = Vec::new();
    if probe_packets > 0 {
        failed.push(format!(
            "the call made after the restart recorded {probe_packets} packets of the old calls"
        ));
    }
    if files.invalid + probe_files.invalid > 0 {
        failed.push(format!("{} files invalid", files.invalid));
    }
    if rec.recordings != u64::from(n) {
        failed.push(format!("{} recordings for {n} calls", rec.recordings));
    }
    if !finished {
        failed.push("recordings still active 120 s after the calls ended".into());
    }
    let states = &files.states;
    let expect_state = |state: &str, failed: &mut Vec<String>| {
        let got = states.get(state).copied().unwrap_or(0);
        if got != u64::from(n) {
            failed.push(format!("{got} of {n} recordings `{state}` ({states:?})"));
        }
    };
    // The calls went through the fault whole: every recording complete with every packet, and
    // every call's BYE answered.
    let expect_whole = |failed: &mut Vec<String>| {
        expect_state("complete", failed);
        if recorded != sent_answered || min_stream != per_stream {
            failed.push(format!(
                "recorded {recorded} of {sent_answered} packets (a stream kept {min_stream} of {per_stream})"
            ));
        }
        if sipp_stats.failed > 0 || sipp_stats.successful != u64::from(n) {
            failed.push(format!(
                "SIPp: {} of {n} calls successful, {} failed",
                sipp_stats.successful, sipp_stats.failed
            ));
        }
    };
    let mut figures = json!({});
    match fault {
        Fault::Kill9 => {
            expect_state("interrupted", &mut failed);
            let expected_at_kill =
                (traffic_before_fault_s * f64::from(PACKETS_PER_SEC)).floor() as u64;
            // What each stream kept of what was sent before the kill (a crash loses at most
            // the last flush_interval of every recording).
            let window = u64::from(PACKETS_PER_SEC) * 2;
            if min_stream + window + u64::from(PACKETS_PER_SEC) / 2 < expected_at_kill {
                failed.push(format!(
                    "a stream kept {min_stream} packets, {expected_at_kill} were sent before the kill (more than flush_interval lost)"
                ));
            }
            check_serve(&injected, &mut failed);
            figures = json!({
                "expected_per_stream_before_kill": expected_at_kill,
                "lost_before_kill_max_per_stream": expected_at_kill.saturating_sub(min_stream),
            });
        }
        Fault::DetachRestart => {
            expect_whole(&mut failed);
            check_serve(&injected, &mut failed);
            let pps = f64::from(n * 2 * PACKETS_PER_SEC);
            figures = json!({
                // A G.711 record takes 256 ring bytes.
                "ring_covers_s_at_this_load": RING_BYTES as f64 / 256.0 / pps,
            });
        }
        Fault::SpoolFull => {
            // Kamailio's dispatcher stops sending before INVITEs fail.
            let options = &injected["options"];
            if options["status"] != 503 {
                failed.push(format!("OPTIONS on the full spool got {options}"));
            }
            let invite = &injected["new_invite"];
            if invite["status"] != 503 || invite["retry_after"].is_null() {
                failed.push(format!("a new INVITE on the full spool got {invite}"));
            }
            // Every packet is in a pcap or counted: not written (the disk was full) or not
            // taken from a full ring (the metadata's `dropped.ring_full`).
            let not_written = writer_end["pcap_write_failed"].as_u64().unwrap_or(0);
            let ring_full = status_end["xdp"]["ring_full"].as_u64().unwrap_or(0);
            if recorded + not_written + ring_full != sent_answered {
                failed.push(format!(
                    "recorded {recorded}, counted {not_written} not written and {ring_full} ring_full, of {sent_answered} packets sent"
                ));
            }
            if rec.metadata_ring_full != ring_full {
                failed.push(format!(
                    "metadata.json counts {} ring_full, the kernel {ring_full}",
                    rec.metadata_ring_full
                ));
            }
            figures = json!({
                "pcap_write_failed": writer_end["pcap_write_failed"],
                "wav_write_failed": writer_end["wav_write_failed"],
                "ring_full": status_end["xdp"]["ring_full"],
                "metadata_not_written": files.metadata_not_written,
            });
        }
        Fault::Flood => {
            // The live calls' BYEs come after the flood.
            expect_whole(&mut failed);
            let report = &injected["report"];
            let answered_503 = report["responses"]["503"].as_u64().unwrap_or(0);
            if answered_503 == 0 {
                failed.push(format!("no 503 to the flood: {}", report["responses"]));
            }
            let sent = report["sent_total"].as_u64().unwrap_or(0);
            let asked = injected["rate"].as_f64().unwrap_or(0.0)
                * injected["seconds"].as_f64().unwrap_or(0.0);
            figures = json!({
                "flood_sent": sent,
                "flood_asked": asked,
                "flood_responses": report["responses"],
                "flood_sent_by_kind": report["sent"],
                "rss_growth_kib": rss_after_traffic as i64 - rss_before as i64,
                "rejections": status_end["sip"]["siprec"]["rejections"],
                // Where the unanswered INVITEs went: shed by the inlet (503) or dropped
                // (non-INVITEs) when its queue was full, or dropped by the kernel before the
                // daemon read them (a full socket buffer, or fragments not reassembled).
                "admission": status_end["sip_admission"],
                "invites_unanswered": report["invites_unanswered"],
                "kernel_drops": injected["kernel_drops"],
            });
        }
    }
    let ok = failed.is_empty();
    let result = if ok {
        "ok".to_string()
    } else {
        format!("FAILED: {}", failed.join("; "))
    };
    Ok(json!({
        "fault": fault.key(), "what": fault.what(), "ok": ok, "result": result,
        "calls": n, "traffic_secs": secs, "fault_after_traffic_s": traffic_before_fault_s,
        "packets": {
            "trafgen": tg_packets, "sent_to_answered_ports": sent_answered,
            "recorded": recorded, "per_stream_min": min_stream, "per_stream_max": max_stream,
            "per_stream_sent": per_stream,
            "xdp_until_restart_or_end": xdp,
            "ring_full_end": status_end["xdp"]["ring_full"],
            "seq_gaps": rec.streams.values().map(|c| c.gaps).sum::<u64>(),
        },
        "recordings": {
            "count": rec.recordings, "states": states,
            "repaired": states.get("interrupted").copied().unwrap_or(0),
            "files_checked": files.checked, "files_invalid": files.invalid,
            "invalid_first": files.first_errors,
            "wav_frames_minus_duration_min": (rec.wav_checked > 0).then_some(rec.min_frames_minus_duration),
            "wav_frames_minus_duration_max": (rec.wav_checked > 0).then_some(rec.max_frames_minus_duration),
            "read_errors": rec.errors,
            "after_restart_calls": probe_files.states, "after_restart_files_invalid": probe_files.invalid,
            "after_restart_calls_packets": probe_packets,
        },
        "fault_figures": figures,
        // What the fault injected: after a restart, the serving again; for the flood, its run.
        "serve_again": (fault != Fault::Flood).then_some(&injected),
        "flood": (fault == Fault::Flood).then_some(&injected),
        "rss_kib": { "before_traffic": rss_before, "after_traffic": rss_after_traffic, "end": rss_end },
        "sipp": { "successful": sipp_stats.successful, "failed": sipp_stats.failed },
        "writer_end": writer_end,
        "daemon_warnings": log.warnings, "daemon_warning_kinds": log.kinds(),
        "daemon_log_first_warnings": log.first,
        "daemon_stop": stopped.map_or_else(|e| format!("{e:#}"), |()| "clean".into()),
    }))
}

/// The counters of the flood's datagrams the kernel of namespace `ns` dropped before the daemon
/// could read them: UDP `RcvbufErrors` (a full socket buffer) and IP `ReasmFails` (fragments of
/// large INVITEs it could not reassemble); `None` where /proc/net/snmp cannot be read.
fn kernel_drops(ns: &str) -> Option<[u64; 2]> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |proto: &str, name: &str| -> Option<u64> {
        let mut rows = text.lines().filter(|l| l.starts_with(proto));
        let (names, values) = (rows.next()?, rows.next()?);
        let column = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(column)?.parse().ok()
    };
    Some([
        field("Udp: ", "RcvbufErrors")?,
        field("Ip: ", "ReasmFails")?,
    ])
}

/// Source addresses of the flood in the sender namespace (IP_S and two more on its interface).
const FLOOD_SOURCES: [&str; 3] = [IP_S, "10.232.0.11", "10.232.0.12"];
/// The flood's rate (issue 16: 5 000 requests/s), 30 % of it valid INVITEs.
const FLOOD_RATE: u32 = 5000;

/// `sip_flood` (tests/src/bin) from the sender namespace at [`FLOOD_RATE`] for `seconds`,
/// pinned beside trafgen on CPU 0: `{rate, seconds, report}` with the tool's JSON report.
fn flood(daemon: &Daemon, seconds: u32) -> Result<Value> {
    let tool = crate::workspace_root().join("target/release/sip_flood");
    for ip in &FLOOD_SOURCES[1..] {
        // Already there from an earlier case: fine.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                NS_S,
                "ip",
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                super::IF_S,
            ])
            .status();
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NS_S, "taskset", "-c", "0"])
        .arg(&tool);
    cmd.args(["--target", &format!("{IP_R}:5060")]);
    for ip in FLOOD_SOURCES {
        cmd.args(["--source", ip]);
    }
    cmd.args([
        "--rate",
        &FLOOD_RATE.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])
    .args(["--sockets-per-source", "4", "--drain-secs", "10"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let rss = daemon.snapshot(false).map_or(0, |s| s.rss_kib);
    let drops_before = kernel_drops(NS_R);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        bail!("sip_flood failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: Value = serde_json::from_slice(&out.stdout).context("sip_flood's JSON")?;
    Ok(json!({
        "rate": FLOOD_RATE, "seconds": seconds, "report": report,
        "rss_kib_before_flood": rss,
        "rss_kib_after_flood": daemon.snapshot(false).map_or(0, |s| s.rss_kib),
        "kernel_drops": kernel_drops(NS_R).zip(drops_before).map(|(after, before)| json!({
            "udp_rcvbuf_errors": after[0] - before[0],
            "ip_reassembly_failures": after[1] - before[1],
        })),
    }))
}

/// The media part's daemon, with `extra` configuration lines replacing its keys of the same
/// name.
fn start_daemon(dir: &Path, tag: &str, n: u32, extra: &str) -> Result<Daemon> {
    // `BENCH_DAEMON_LOG=info` shows each step of a restart in the daemon's log.
    let mut extra = extra.to_string();
    if let Ok(level) = std::env::var("BENCH_DAEMON_LOG") {
        extra.push_str(&format!("log_level = \"{level}\"\n"));
    }
    // `BENCH_DAEMON_CONFIG='signaling_nice = 0'`: a configuration key to compare against.
    if let Ok(lines) = std::env::var("BENCH_DAEMON_CONFIG") {
        extra.push_str(&lines);
        extra.push('\n');
    }
    Daemon::start_with(dir, tag, 10, 20_000.max(2 * n), &extra)
}

/// After a restart: the first OPTIONS answered 200, then one new SIPREC call (SIPp) answered
/// and completed; times from the fault.
fn serve_again(
    daemon: &mut Daemon,
    fault_t: Instant,
    dir: &Path,
    commands: &mut Vec<String>,
) -> Result<Value> {
    let options = probe(Probe::Options, Duration::from_secs(30))?;
    let options_s = fault_t.elapsed().as_secs_f64();
    daemon.wait_ready(Duration::from_secs(30))?;
    let t = Instant::now();
    let stat = dir.join("sipp-probe.csv");
    let args: Vec<String> = [
        "-m",
        "1",
        "-l",
        "1",
        "-d",
        "0",
        "-p",
        "5071",
        "-mp",
        "42000",
        "-recv_timeout",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut one = Sipp::start(dir, &stat, &args, commands)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while one.child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20)); // polling SIPp's exit
    }
    let stats = one.last_stats().unwrap_or_default();
    let errors = one.errors();
    one.kill();
    Ok(json!({
        "options": options,
        "options_200_after_fault_s": options_s,
        "new_call_ok": stats.successful == 1,
        "new_call_s": t.elapsed().as_secs_f64(),
        "new_call_done_after_fault_s": fault_t.elapsed().as_secs_f64(),
        "new_call_errors": errors,
    }))
}

fn check_serve(serve: &Value, failed: &mut Vec<String>) {
    if serve["options"]["status"] != 200 {
        failed.push(format!(
            "no OPTIONS 200 after the restart: {}",
            serve["options"]
        ));
    }
    if serve["new_call_ok"] != true {
        failed.push(format!(
            "the new call after the restart failed: {}",
            serve["new_call_errors"]
        ));
    }
    if serve["options_200_after_fault_s"]
        .as_f64()
        .is_none_or(|s| s > 2.0)
    {
        failed.push(format!(
            "serving again {} s after the fault (goal: 2 s)",
            serve["options_200_after_fault_s"]
        ));
    }
}

#[derive(Clone, Copy)]
enum Probe {
    Options,
    /// A SIPREC INVITE without a body: 503 when the daemon refuses new sessions (checked before
    /// the body), 488 otherwise.
    Invite,
}

/// Sends the probe from the sender namespace every 50 ms until a final response arrives (or
/// `within` passes): `{status, retry_after, after_s}` or `{status: null}`.
fn probe(kind: Probe, within: Duration) -> Result<Value> {
    let ns = std::fs::File::open(format!("/run/netns/{NS_S}"))?;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Value> {
            // SAFETY: setns on this thread only, with an open namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let sock = UdpSocket::bind((IP_S, 0))?;
            let port = sock.local_addr()?.port();
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = vec![0u8; 65536];
            let mut attempt = 0u32;
            while t0.elapsed() < within {
                attempt += 1;
                let (method, extra) = match kind {
                    Probe::Options => ("OPTIONS", String::new()),
                    Probe::Invite => (
                        "INVITE",
                        format!("Contact: <sip:probe@{IP_S}:{port}>;+sip.src\r\nRequire: siprec\r\n"),
                    ),
                };
                let branch = format!("z9hG4bK-probe-{port}-{attempt}");
                let call_id = format!("probe-{port}-{attempt}@{IP_S}");
                let req = format!(
                    "{method} sip:srs@{IP_R}:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {IP_S}:{port};branch={branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:probe@{IP_S}>;tag=p{attempt}\r\nTo: <sip:srs@{IP_R}>\r\n\
Call-ID: {call_id}\r\nCSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
                );
                let _ = sock.send_to(req.as_bytes(), (IP_R, 5060));
                let deadline = Instant::now() + Duration::from_millis(50);
                while Instant::now() < deadline {
                    let Ok(len) = sock.recv(&mut buf) else { break };
                    let text = String::from_utf8_lossy(&buf[..len]);
                    let Some(status) = text
                        .strip_prefix("SIP/2.0 ")
                        .and_then(|r| r.get(..3))
                        .and_then(|c| c.parse::<u16>().ok())
                    else {
                        continue;
                    };
                    if status < 200 || !text.contains(&call_id) {
                        continue;
                    }
                    let header = |name: &str| {
                        text.lines()
                            .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                            .map(|l| l[name.len() + 1..].trim().to_string())
                    };
                    if let Probe::Invite = kind {
                        // The ACK of a non-2xx final response (same branch, the To tag).
                        let to = header("to").unwrap_or_default();
                        let ack = format!(
                            "ACK sip:srs@{IP_R}:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {IP_S}:{port};branch={branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:probe@{IP_S}>;tag=p{attempt}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
                        );
                        let _ = sock.send_to(ack.as_bytes(), (IP_R, 5060));
                    }
                    return Ok(json!({
                        "status": status,
                        "reason": text.lines().next().unwrap_or("").get(12..).unwrap_or(""),
                        "retry_after": header("retry-after"),
                        "after_s": t0.elapsed().as_secs_f64(),
                        "attempts": attempt,
                    }));
                }
            }
            Ok(json!({ "status": null, "attempts": attempt, "after_s": t0.elapsed().as_secs_f64() }))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}

/// The recording directories in `spool` (those with a metadata.json).
fn recording_dirs(spool: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(spool)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("metadata.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Recorded packets over the answered streams, and the least and most one stream kept.
fn stream_figures(rec: &Recorded, ports: &[u16]) -> (u64, u64, u64) {
    let counts: Vec<u64> = ports
        .iter()
        .map(|p| rec.streams.get(p).map_or(0, |c| c.unique))
        .collect();
    (
        counts.iter().sum(),
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    )
}

struct FileCheck {
    checked: u64,
    invalid: u64,
    first_errors: Vec<String>,
    states: BTreeMap<String, u64>,
    /// Recordings whose metadata.json says something was not written.
    metadata_not_written: u64,
}

/// Every recording's state, its pcap through `capinfos` and its WAV through `soxi` (sample
/// count against metadata.json's).
fn check_files(spool: &Path) -> Result<FileCheck> {
    let mut c = FileCheck {
        checked: 0,
        invalid: 0,
        first_errors: Vec::new(),
        states: BTreeMap::new(),
        metadata_not_written: 0,
    };
    let dirs = recording_dirs(spool);
    let bad = |c: &mut FileCheck, what: String| {
        c.invalid += 1;
        if c.first_errors.len() < 10 {
            c.first_errors.push(what);
        }
    };
    let mut pcaps = Vec::new();
    for d in &dirs {
        let meta: Value = match std::fs::read(d.join("metadata.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(m) => m,
            None => {
                bad(&mut c, format!("{}: metadata.json unreadable", d.display()));
                continue;
            }
        };
        *c.states
            .entry(meta["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        let not_written = meta["dropped"].as_object().is_some_and(|m| {
            m.iter()
                .any(|(k, v)| k != "ring_full" && v.as_u64() > Some(0))
        });
        if not_written {
            c.metadata_not_written += 1;
        }
        c.checked += 2;
        pcaps.push(d.join("recording.pcap"));
        let wav = d.join("recording.wav");
        let out = Command::new("soxi").arg("-s").arg(&wav).output()?;
        let samples: Option<u64> = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
        if !out.status.success() || samples.is_none() {
            bad(
                &mut c,
                format!(
                    "{}: soxi: {}",
                    wav.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
        } else if meta["wav"]["frames"]
            .as_u64()
            .is_some_and(|f| Some(f) != samples)
        {
            bad(
                &mut c,
                format!(
                    "{}: soxi {samples:?} samples, metadata.json {}",
                    wav.display(),
                    meta["wav"]["frames"]
                ),
            );
        }
    }
    // capinfos reads many files per run; a failed batch is checked file by file.
    for batch in pcaps.chunks(200) {
        let ok = Command::new("capinfos")
            .arg("-c")
            .args(batch)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            continue;
        }
        for p in batch {
            let out = Command::new("capinfos").arg("-c").arg(p).output()?;
            if !out.status.success() {
                bad(
                    &mut c,
                    format!(
                        "{}: capinfos: {}",
                        p.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                );
            }
        }
    }
    let _ = std::io::stderr().flush();
    Ok(c)
}

/// The faults rows of report.md.
pub fn markdown(faults: &Value) -> String {
    let mut out = String::from(
        "\n## Faults with live calls\n\n| fault | calls live | packets sent | packets recorded | recordings repaired | files invalid | RSS after traffic (MiB) | time to serve again | result |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in faults["cases"].as_array().into_iter().flatten() {
        let serve = c["serve_again"]["options_200_after_fault_s"]
            .as_f64()
            .map_or("n/a".to_string(), |s| format!("{s:.2} s"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c["what"].as_str().unwrap_or("?"),
            c["calls"],
            c["packets"]["sent_to_answered_ports"],
            c["packets"]["recorded"],
            c["recordings"]["repaired"],
            c["recordings"]["files_invalid"],
            c["rss_kib"]["after_traffic"]
                .as_u64()
                .map_or("?".into(), |k| (k / 1024).to_string()),
            serve,
            c["result"].as_str().unwrap_or("?"),
        ));
    }
    out
}
