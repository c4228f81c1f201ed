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
    encode::{pcap, wav},
    metadata::{
        parse_rfc3339, rfc3339, RecordingMetadata, RecordingState, METADATA_FILE, PCAP_FILE,
        WAV_FILE,
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
    let todo: Vec<(PathBuf, RecordingMetadata)> = entries
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            // Not a recording directory (or metadata never written: nothing to fix).
            let meta = RecordingMetadata::read(&dir).ok()?;
            (meta.state == RecordingState::Active && !keep.contains(&meta.id))
                .then_some((dir, meta))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let repaired = Mutex::new(Vec::with_capacity(todo.len()));
    std::thread::scope(|scope| {
        for _ in 0..REPAIR_THREADS.min(todo.len()) {
            scope.spawn(|| {
                while let Some((dir, meta)) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut meta = meta.clone();
                    match repair_one(dir, &mut meta, "crash", None) {
                        Ok(()) => {
                            info!(recording = %meta.id, "repaired interrupted recording");
                            let local_ports = meta.streams.iter().map(|s| s.local_port).collect();
                            if let Ok(mut r) = repaired.lock() {
                                r.push(Repaired {
                                    id: meta.id,
                                    local_ports,
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
