//! Crash repair: recordings left `active` by a writer that died (kill -9, power loss).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::SystemTime,
};

use tracing::{info, warn};

use super::{
    encode::{pcap, recording::WAV_RATE, wav},
    metadata::{
        parse_rfc3339, rfc3339, DropCounters, RecordingMetadata, RecordingState, StreamMeta,
        WavMeta, METADATA_FILE, PCAP_FILE, WAV_FILE,
    },
    WriterError,
};

/// Repairs every recording of `spool` whose metadata says `active`. Run before [`super::start`]
/// (no writer may be using the spool). Returns the ids repaired.
///
/// For each: the pcap is cut to its last whole record, the WAV to its last written frame with
/// its header sizes corrected (the zero tails of the mmap growth are trimmed), and the metadata
/// says `state: interrupted`, `end_reason: crash`, `ended_at` = the last media written (or the
/// last metadata update). Nothing that was written is dropped. A recording that cannot be
/// repaired is logged and skipped; the others are still repaired.
///
/// A recording killed before its first `metadata.json` reached the disk (a directory with its
/// pcap or WAV and no metadata) gets one rebuilt from its files (`rebuilt_metadata`) and is
/// repaired the same way. Directories with neither file are not recordings: left alone.
pub fn repair_spool(spool: &Path) -> Result<Vec<String>, WriterError> {
    Ok(repair_spool_except(spool, &[])?
        .into_iter()
        .map(|r| r.id)
        .collect())
}

/// A recording [`repair_spool_except`] marked `interrupted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    pub id: String,
    /// Its streams' local RTP ports. The crashed call's sender may still be sending there, so
    /// a restarted daemon lets them cool down before it hands them to a new call.
    pub local_ports: Vec<u16>,
    /// Its `metadata.json` was missing and was rebuilt from its files.
    pub rebuilt: bool,
}

/// Recordings repaired at once: each repair is mostly fsyncs, which overlap (with 1 000 calls
/// cut by a crash, one at a time kept the restarted daemon from answering for seconds).
const REPAIR_THREADS: usize = 16;

/// [`repair_spool`] for every recording but those in `keep`: the recordings a handover carries
/// ([`super::WriterHandover::recording_ids`]), still `active` on purpose, which
/// [`super::start_resumed`] goes on writing. Returns what it repaired, sorted by id.
pub fn repair_spool_except(spool: &Path, keep: &[String]) -> Result<Vec<Repaired>, WriterError> {
    let entries = fs::read_dir(spool).map_err(|source| WriterError::Io {
        op: "read spool",
        path: spool.to_path_buf(),
        source,
    })?;
    // `None`: a recording whose metadata never reached the disk.
    let todo: Vec<(PathBuf, Option<RecordingMetadata>)> = entries
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            match RecordingMetadata::read(&dir) {
                Ok(meta) => (meta.state == RecordingState::Active && !keep.contains(&meta.id))
                    .then_some((dir, Some(meta))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let id = recording_id(&dir)?;
                    (!keep.iter().any(|k| k == id)).then_some((dir, None))
                }
                // Not a recording directory, or metadata that cannot be read: not ours to fix.
                Err(_) => None,
            }
        })
        .collect();
    let next = AtomicUsize::new(0);
    let repaired = Mutex::new(Vec::with_capacity(todo.len()));
    std::thread::scope(|scope| {
        for _ in 0..REPAIR_THREADS.min(todo.len()) {
            scope.spawn(|| {
                while let Some((dir, meta)) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let rebuilt = meta.is_none();
                    let mut meta = match meta {
                        Some(meta) => meta.clone(),
                        None => match rebuilt_metadata(dir) {
                            Ok(meta) => meta,
                            Err(e) => {
                                warn!(dir = %dir.display(), error = %e, "cannot rebuild the metadata of a recording");
                                continue;
                            }
                        },
                    };
                    match repair_one(dir, &mut meta, "crash", None) {
                        Ok(()) => {
                            if rebuilt {
                                warn!(recording = %meta.id, "repaired interrupted recording whose metadata.json was never written; rebuilt it from its files");
                            } else {
                                info!(recording = %meta.id, "repaired interrupted recording");
                            }
                            let local_ports = meta.streams.iter().map(|s| s.local_port).collect();
                            if let Ok(mut r) = repaired.lock() {
                                r.push(Repaired {
                                    id: meta.id,
                                    local_ports,
                                    rebuilt,
                                });
                            }
                        }
                        Err(e) => {
                            warn!(dir = %dir.display(), error = %e, "cannot repair recording")
                        }
                    }
                }
            });
        }
    });
    let mut repaired = repaired.into_inner().unwrap_or_else(|p| p.into_inner());
    repaired.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(repaired)
}

/// Makes the files of a recording that will not be written any more whole, and marks it
/// `interrupted` with `reason` (and `detail`).
pub(crate) fn repair_one(
    dir: &Path,
    meta: &mut RecordingMetadata,
    reason: &str,
    detail: Option<String>,
) -> Result<(), WriterError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriterError::Io { op, path, source }
    };
    let mut last: Option<SystemTime> = parse_rfc3339(&meta.updated_at);
    let started = parse_rfc3339(&meta.started_at);
    let pcap_path = dir.join(PCAP_FILE);
    if pcap_path.exists() {
        let r = pcap::repair(&pcap_path).map_err(io("repair pcap", &pcap_path))?;
        last = last.max(r.last);
        meta.notes.push(format!(
            "repaired ({reason}): pcap cut from {} to {} bytes ({} records)",
            r.old_len, r.new_len, r.records
        ));
    }
    let wav_path = dir.join(WAV_FILE);
    if wav_path.exists() {
        let r = wav::repair(&wav_path).map_err(io("repair wav", &wav_path))?;
        meta.wav.frames = r.frames;
        if meta.wav.sample_rate == 0 {
            // Rebuilt metadata: the rate is the WAV's.
            meta.wav.sample_rate = r.rate;
        }
        if let (Some(s), true) = (started, r.rate > 0) {
            let wav_end =
                s + std::time::Duration::from_nanos(r.frames * 1_000_000_000 / r.rate as u64);
            last = last.max(Some(wav_end));
        }
        meta.notes.push(format!(
            "repaired ({reason}): wav cut from {} to {} bytes ({} frames)",
            r.old_len, r.new_len, r.frames
        ));
    }
    // A metadata.json replacement the crash cut short.
    let _ = fs::remove_file(dir.join(format!(".{METADATA_FILE}.tmp")));
    meta.state = RecordingState::Interrupted;
    meta.end_reason = Some(reason.to_string());
    if detail.is_some() {
        meta.end_detail = detail;
    }
    meta.ended_at = last.map(rfc3339);
    meta.updated_at = rfc3339(SystemTime::now());
    meta.write(dir).map_err(io("write metadata", dir))
}

/// The id of a directory that holds a recording's pcap or WAV (the directory name, as
/// `Recording::create` makes it), if it is one.
fn recording_id(dir: &Path) -> Option<&str> {
    let id = dir.file_name()?.to_str()?;
    let files = dir.join(PCAP_FILE).is_file() || dir.join(WAV_FILE).is_file();
    (!id.starts_with('.') && dir.is_dir() && files).then_some(id)
}

/// A `metadata.json` for a recording killed before its first one reached the disk (the file
/// thread makes the directory and the files' headers first): `active` (for [`repair_one`] to
/// mark `interrupted`), started at the pcap's first record (else the directory's mtime), with
/// one stream per UDP port the pcap holds RTP for. Signaling (Call-ID, participants, SIPREC
/// metadata) was never on disk: left empty, and a note says so. A file too short for its
/// header gets an empty header (a recording killed before any was written).
pub(crate) fn rebuilt_metadata(dir: &Path) -> std::io::Result<RecordingMetadata> {
    let id = recording_id(dir)
        .ok_or_else(|| std::io::Error::other("not a recording directory"))?
        .to_string();
    let pcap_path = dir.join(PCAP_FILE);
    let mut summary = pcap::PcapSummary::default();
    if pcap_path.is_file() {
        if fs::metadata(&pcap_path)?.len() < pcap::GLOBAL_HEADER_LEN {
            fs::write(&pcap_path, pcap::global_header())?;
        }
        summary = pcap::summary(&pcap_path)?;
    }
    let wav_path = dir.join(WAV_FILE);
    let mut channels = 0;
    if wav_path.is_file() {
        let bytes = fs::read(&wav_path)?;
        if bytes.len() < 44 {
            fs::write(&wav_path, wav::header(1, WAV_RATE, 0))?;
            channels = 1;
        } else {
            channels = u16::from_le_bytes([bytes[22], bytes[23]]);
        }
    }
    let started = summary
        .first
        .or_else(|| fs::metadata(dir).and_then(|m| m.modified()).ok())
        .unwrap_or_else(SystemTime::now);
    let started_at = rfc3339(started);
    let streams: Vec<StreamMeta> = summary
        .ports
        .iter()
        .filter(|p| p.rtp_packets > 0)
        .map(|p| {
            let rtcp = summary
                .ports
                .iter()
                .find(|r| Some(r.port) == p.port.checked_add(1) && r.rtcp_packets > 0);
            StreamMeta {
                label: format!("port-{}", p.port),
                media: "unknown".into(),
                codec: "unknown".into(),
                payload_type: p.payload_type.unwrap_or(0),
                local_port: p.port,
                rtcp_port: rtcp.map(|r| r.port),
                packets: p.rtp_packets,
                bytes: p.rtp_bytes,
                rtcp_packets: rtcp.map_or(0, |r| r.rtcp_packets),
                added_at: started_at.clone(),
                ..Default::default()
            }
        })
        .collect();
    Ok(RecordingMetadata {
        id,
        sip_call_id: String::new(),
        call_uuid: None,
        call_uuid_source: None,
        connection_id: None,
        extra_ids: Vec::new(),
        host: super::hostname(),
        interaction: None,
        previous: None,
        state: RecordingState::Active,
        end_reason: None,
        end_detail: None,
        started_at: started_at.clone(),
        ended_at: None,
        updated_at: started_at,
        media_received: !streams.is_empty(),
        participants: Vec::new(),
        streams,
        metadata_versions: Vec::new(),
        wav: WavMeta {
            sample_rate: 0,
            channels: Vec::new(),
            frames: 0,
        },
        dropped: DropCounters::default(),
        notes: vec![format!(
            "metadata rebuilt from the files after a crash: the recorder was killed before it \
             first wrote metadata.json; signaling (Call-ID, participants, SIPREC metadata) is \
             unknown, streams are the UDP ports of the pcap's RTP, started_at is {}, the WAV \
             has {channels} channel(s)",
            if summary.first.is_some() {
                "the pcap's first packet"
            } else {
                "the directory's modification time"
            }
        )],
    })
}
