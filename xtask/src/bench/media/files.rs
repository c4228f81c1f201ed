//! What a media run left behind, read back: every recording's pcap (per-stream packets, gaps,
//! duplicates) and WAV (frames against the call's duration, audio against packets), and
//! tcpdump's capture (the baseline and the arrival peaks).

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{SAMPLES_PER_PACKET, SLOT_US, SSRC_BASE};

/// Per-stream figures from the recordings' pcaps.
#[derive(Clone, Debug, Default)]
pub(super) struct StreamCount {
    pub(super) packets: u64,
    pub(super) unique: u64,
    /// Sequence numbers missing between the first and the last one seen.
    pub(super) gaps: u64,
    pub(super) gap_events: u64,
    pub(super) duplicates: u64,
    /// Packets with a lower sequence number than one already seen.
    pub(super) reordered: u64,
    pub(super) wrong_ssrc: u64,
}

/// Packets of one pcap file: (timestamp ns, frame), Ethernet link type; µs or ns magic.
pub(super) fn pcap_records(data: &[u8], mut f: impl FnMut(u64, &[u8])) -> Result<()> {
    if data.len() < 24 {
        bail!("pcap shorter than its header");
    }
    let magic = u32::from_le_bytes(data[0..4].try_into()?);
    let ns = match magic {
        0xa1b2_c3d4 => false,
        0xa1b2_3c4d => true,
        m => bail!("pcap magic {m:#x}"),
    };
    let mut off = 24;
    while off + 16 <= data.len() {
        let sec = u64::from(u32::from_le_bytes(data[off..off + 4].try_into()?));
        let frac = u64::from(u32::from_le_bytes(data[off + 4..off + 8].try_into()?));
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into()?) as usize;
        let start = off + 16;
        if start + incl > data.len() {
            break;
        }
        let t = sec * 1_000_000_000 + if ns { frac } else { frac * 1000 };
        f(t, &data[start..start + incl]);
        off = start + incl;
    }
    Ok(())
}

/// (destination port, RTP sequence, timestamp, SSRC) of an Ethernet/IPv4/UDP/RTP frame.
pub(super) fn rtp_fields(frame: &[u8]) -> Option<(u16, u16, u32, u32)> {
    if frame.get(12..14)? != [0x08, 0x00] || *frame.get(23)? != 17 {
        return None;
    }
    let udp = 14 + (frame.get(14)? & 0x0f) as usize * 4;
    let be16 = |o: usize| Some(u16::from_be_bytes(frame.get(o..o + 2)?.try_into().ok()?));
    let be32 = |o: usize| Some(u32::from_be_bytes(frame.get(o..o + 4)?.try_into().ok()?));
    let rtp = udp + 8;
    Some((
        be16(udp + 2)?,
        be16(rtp + 2)?,
        be32(rtp + 4)?,
        be32(rtp + 8)?,
    ))
}

/// Stream figures from one recording's packets of one port, in arrival order; adds the
/// deviations of its inter-arrival times from 20 ms (in ms) to `jitter`.
pub(super) fn count_stream(
    port: u16,
    pkts: &[(u64, u16, u32, u32)],
    jitter: &mut [u64],
) -> StreamCount {
    let mut c = StreamCount {
        packets: pkts.len() as u64,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::with_capacity(pkts.len());
    let (mut max_ext, mut last_ext): (Option<i64>, i64) = (None, 0);
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    let mut prev_t: Option<u64> = None;
    for &(t, seq, _ts, ssrc) in pkts {
        if ssrc != SSRC_BASE + u32::from(port) {
            c.wrong_ssrc += 1;
        }
        // Extended sequence number: the 16-bit one unwrapped next to the previous packet's.
        let ext = if prev_t.is_none() {
            i64::from(seq)
        } else {
            last_ext + i64::from(seq.wrapping_sub(last_ext as u16) as i16)
        };
        last_ext = ext;
        if let Some(p) = prev_t {
            let dev_ms =
                ((t.saturating_sub(p)) as i64 - (SLOT_US * 1000) as i64).unsigned_abs() / 1_000_000;
            jitter[(dev_ms as usize).min(jitter.len() - 1)] += 1;
        }
        prev_t = Some(t);
        if !seen.insert(ext) {
            c.duplicates += 1;
            continue;
        }
        if max_ext.is_some_and(|m| ext < m) {
            c.reordered += 1;
        }
        max_ext = Some(max_ext.map_or(ext, |m| m.max(ext)));
        lo = lo.min(ext);
        hi = hi.max(ext);
    }
    c.unique = seen.len() as u64;
    if c.unique > 0 {
        c.gaps = (hi - lo + 1) as u64 - c.unique;
        let mut sorted: Vec<i64> = seen.into_iter().collect();
        sorted.sort_unstable();
        c.gap_events = sorted.windows(2).filter(|w| w[1] - w[0] > 1).count() as u64;
    }
    c
}

/// Seconds since the epoch of an RFC 3339 UTC time as the daemon writes it
/// (`2026-12-02T06:30:00.123456789Z`).
pub(super) fn rfc3339_secs(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.strip_suffix('Z')?;
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86400 + h * 3600 + min * 60) as f64 + sec)
}

/// A WAV's channels, sample rate, frames and non-silent samples per channel.
pub(super) fn wav_figures(data: &[u8]) -> Result<(u16, u32, u64, Vec<u64>)> {
    if data.len() < 12 || &data[0..4] != b"RIFF" || &data[8..12] != b"WAVE" {
        bail!("not a WAV");
    }
    let (mut channels, mut rate, mut bits) = (0u16, 0u32, 0u16);
    let mut off = 12;
    while off + 8 <= data.len() {
        let id = &data[off..off + 4];
        let len = u32::from_le_bytes(data[off + 4..off + 8].try_into()?) as usize;
        let body = off + 8;
        if id == b"fmt " && body + 16 <= data.len() {
            channels = u16::from_le_bytes(data[body + 2..body + 4].try_into()?);
            rate = u32::from_le_bytes(data[body + 4..body + 8].try_into()?);
            bits = u16::from_le_bytes(data[body + 14..body + 16].try_into()?);
        } else if id == b"data" {
            if bits != 16 || channels == 0 {
                bail!("WAV format: {channels} channels, {bits} bits");
            }
            let samples = &data[body..(body + len).min(data.len())];
            let frame = 2 * channels as usize;
            let frames = (samples.len() / frame) as u64;
            let mut nonzero = vec![0u64; channels as usize];
            for fr in samples.chunks_exact(frame) {
                for (ch, s) in fr.chunks_exact(2).enumerate() {
                    if s != [0, 0] {
                        nonzero[ch] += 1;
                    }
                }
            }
            return Ok((channels, rate, frames, nonzero));
        }
        off = body + len + (len & 1);
    }
    bail!("WAV without a data chunk")
}

/// What the recordings in the spool hold: per-stream counts by port, and the WAV checks.
pub(super) struct Recorded {
    pub(super) recordings: u64,
    pub(super) incomplete: Vec<String>,
    pub(super) streams: HashMap<u16, StreamCount>,
    /// Packets in the pcaps not to a stream of their recording.
    pub(super) stray: u64,
    pub(super) metadata_lost: u64,
    pub(super) metadata_ring_full: u64,
    pub(super) wav_checked: u64,
    /// Recordings whose WAV frames differ from the call's duration by more than 20 ms, or
    /// from metadata.json's count.
    pub(super) wav_bad_frames: Vec<String>,
    /// Channels whose non-silent samples differ from 160 x the stream's packets.
    pub(super) wav_bad_audio: u64,
    pub(super) wav_audio_max_diff: u64,
    pub(super) max_frames_minus_duration: i64,
    pub(super) min_frames_minus_duration: i64,
    /// Inter-arrival deviation from 20 ms, 1 ms buckets (last: 50 ms and more).
    pub(super) jitter_ms: Vec<u64>,
    pub(super) errors: Vec<String>,
}

pub(super) fn read_recordings(spool: &Path) -> Result<Recorded> {
    let mut r = Recorded {
        recordings: 0,
        incomplete: Vec::new(),
        streams: HashMap::new(),
        stray: 0,
        metadata_lost: 0,
        metadata_ring_full: 0,
        wav_checked: 0,
        wav_bad_frames: Vec::new(),
        wav_bad_audio: 0,
        wav_audio_max_diff: 0,
        max_frames_minus_duration: i64::MIN,
        min_frames_minus_duration: i64::MAX,
        jitter_ms: vec![0; 51],
        errors: Vec::new(),
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(spool)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("metadata.json").exists())
        .collect();
    dirs.sort();
    for d in dirs {
        r.recordings += 1;
        let id = d
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        if let Err(e) = read_recording(&d, &id, &mut r) {
            if r.errors.len() < 10 {
                r.errors.push(format!("{id}: {e:#}"));
            }
        }
    }
    Ok(r)
}

pub(super) fn read_recording(d: &Path, id: &str, r: &mut Recorded) -> Result<()> {
    let meta: Value = serde_json::from_slice(&std::fs::read(d.join("metadata.json"))?)?;
    if meta["state"] != "complete" && r.incomplete.len() < 10 {
        r.incomplete.push(format!("{id}: {}", meta["state"]));
    }
    r.metadata_ring_full += meta["dropped"]["ring_full"].as_u64().unwrap_or(0);
    // port -> WAV channel
    let mut channel_of: HashMap<u16, Option<u64>> = HashMap::new();
    for s in meta["streams"].as_array().into_iter().flatten() {
        if let Some(p) = s["local_port"].as_u64() {
            channel_of.insert(p as u16, s["channel"].as_u64());
        }
        r.metadata_lost += s["lost"].as_u64().unwrap_or(0);
    }
    let mut by_port: HashMap<u16, Vec<(u64, u16, u32, u32)>> = HashMap::new();
    let pcap = std::fs::read(d.join("recording.pcap")).context("recording.pcap")?;
    let mut stray = 0;
    pcap_records(&pcap, |t, frame| match rtp_fields(frame) {
        Some((port, seq, ts, ssrc)) if channel_of.contains_key(&port) => {
            by_port.entry(port).or_default().push((t, seq, ts, ssrc));
        }
        _ => stray += 1,
    })?;
    drop(pcap);
    r.stray += stray;
    let mut unique_of: HashMap<u16, u64> = HashMap::new();
    for (port, pkts) in &by_port {
        let c = count_stream(*port, pkts, &mut r.jitter_ms);
        unique_of.insert(*port, c.unique);
        if r.streams.insert(*port, c).is_some() && r.errors.len() < 10 {
            r.errors
                .push(format!("{id}: port {port} in two recordings"));
        }
    }
    for port in channel_of.keys() {
        r.streams.entry(*port).or_default();
    }
    // WAV: frames against the call's duration and metadata.json; audio against packets.
    let wav = std::fs::read(d.join("recording.wav")).context("recording.wav")?;
    let (channels, rate, frames, nonzero) = wav_figures(&wav)?;
    drop(wav);
    r.wav_checked += 1;
    let start = meta["started_at"].as_str().and_then(rfc3339_secs);
    let end = meta["ended_at"].as_str().and_then(rfc3339_secs);
    let meta_frames = meta["wav"]["frames"].as_u64();
    let mut bad = Vec::new();
    if channels != 2 || rate != 8000 {
        bad.push(format!("{channels} channels at {rate} Hz"));
    }
    if meta_frames != Some(frames) {
        bad.push(format!(
            "{frames} frames, metadata.json says {meta_frames:?}"
        ));
    }
    match (start, end) {
        (Some(s), Some(e)) => {
            let want = ((e - s) * f64::from(rate.max(1))).round() as i64;
            let diff = frames as i64 - want;
            r.max_frames_minus_duration = r.max_frames_minus_duration.max(diff);
            r.min_frames_minus_duration = r.min_frames_minus_duration.min(diff);
            if diff.abs() > i64::from(rate / 50) {
                bad.push(format!(
                    "{frames} frames for {:.3} s ({want} frames)",
                    e - s
                ));
            }
        }
        _ => bad.push("no start or end time".into()),
    }
    if !bad.is_empty() && r.wav_bad_frames.len() < 10 {
        r.wav_bad_frames.push(format!("{id}: {}", bad.join(", ")));
    } else if !bad.is_empty() {
        r.wav_bad_frames.push(String::new());
    }
    for (port, ch) in &channel_of {
        let Some(ch) = ch.map(|c| c as usize) else {
            continue;
        };
        let want = unique_of.get(port).copied().unwrap_or(0) * u64::from(SAMPLES_PER_PACKET);
        let got = nonzero.get(ch).copied().unwrap_or(0);
        if got != want {
            r.wav_bad_audio += 1;
            r.wav_audio_max_diff = r.wav_audio_max_diff.max(got.abs_diff(want));
        }
    }
    Ok(())
}

/// tcpdump's capture: packets per destination port, and arrivals in 10 ms bins.
pub(super) struct Baseline {
    pub(super) packets: u64,
    pub(super) by_port: HashMap<u16, u64>,
    pub(super) peak_10ms_pps: f64,
    pub(super) p99_10ms_pps: f64,
    pub(super) mean_pps: f64,
    pub(super) span_s: f64,
}

pub(super) fn read_baseline(pcap: &Path) -> Result<Baseline> {
    let mut data = Vec::new();
    std::fs::File::open(pcap)
        .with_context(|| format!("opening {}", pcap.display()))?
        .read_to_end(&mut data)?;
    let mut by_port: HashMap<u16, u64> = HashMap::new();
    let mut times: Vec<u64> = Vec::new();
    pcap_records(&data, |t, frame| {
        if let Some((port, ..)) = rtp_fields(frame) {
            *by_port.entry(port).or_default() += 1;
            times.push(t);
        }
    })?;
    drop(data);
    let packets = times.len() as u64;
    let (Some(&first), Some(&last)) = (times.iter().min(), times.iter().max()) else {
        return Ok(Baseline {
            packets,
            by_port,
            peak_10ms_pps: 0.0,
            p99_10ms_pps: 0.0,
            mean_pps: 0.0,
            span_s: 0.0,
        });
    };
    let bin = 10_000_000u64;
    let mut bins = vec![0u64; ((last - first) / bin + 1) as usize];
    for t in &times {
        bins[((t - first) / bin) as usize] += 1;
    }
    let span_s = (last - first) as f64 / 1e9;
    let mut sorted = bins.clone();
    sorted.sort_unstable();
    let p99 = sorted[(sorted.len() - 1) * 99 / 100];
    Ok(Baseline {
        packets,
        by_port,
        peak_10ms_pps: *sorted.last().unwrap_or(&0) as f64 * 100.0,
        p99_10ms_pps: p99 as f64 * 100.0,
        mean_pps: if span_s > 0.0 {
            packets as f64 / span_s
        } else {
            0.0
        },
        span_s,
    })
}
