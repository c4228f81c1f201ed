//! Retention: delete the oldest finished recordings beyond a maximum age or spool size.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{
    metadata::{parse_rfc3339, RecordingMetadata, RecordingState},
    WriterError,
};

/// Limits; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

/// Deletes finished (`complete` or `interrupted`) recordings of `spool`, oldest first (by end,
/// else start), while they are older than `max_age` or the spool is larger than `max_bytes`.
/// Active recordings and directories without readable metadata are never deleted (but count
/// towards the size). Returns the ids deleted.
pub fn enforce_retention(
    spool: &Path,
    policy: RetentionPolicy,
    now: SystemTime,
) -> Result<Vec<String>, WriterError> {
    if policy.max_age.is_none() && policy.max_bytes.is_none() {
        return Ok(Vec::new());
    }
    let entries = fs::read_dir(spool).map_err(|source| WriterError::Io {
        op: "read spool",
        path: spool.to_path_buf(),
        source,
    })?;
    let mut total = 0u64;
    // (end time, size, dir, id) of the deletable ones.
    let mut finished: Vec<(SystemTime, u64, PathBuf, String)> = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            // Other files in the spool (the index, by default) use the space too.
            total += entry.metadata().map_or(0, |m| m.len());
            continue;
        }
        let size = dir_size(&dir);
        total += size;
        let Ok(meta) = RecordingMetadata::read(&dir) else {
            continue;
        };
        if meta.state == RecordingState::Active {
            continue;
        }
        let end = meta
            .ended_at
            .as_deref()
            .and_then(parse_rfc3339)
            .or_else(|| parse_rfc3339(&meta.started_at))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        finished.push((end, size, dir, meta.id));
    }
    finished.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.3.cmp(&b.3)));
    let mut deleted = Vec::new();
    for (end, size, dir, id) in finished {
        let too_old = policy
            .max_age
            .is_some_and(|age| now.duration_since(end).unwrap_or_default() > age);
        let too_big = policy.max_bytes.is_some_and(|max| total > max);
        if !too_old && !too_big {
            // Sorted oldest first: nothing later is older, and the size is within the limit.
            break;
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                info!(recording = %id, too_old, too_big, "retention deleted recording");
                total = total.saturating_sub(size);
                deleted.push(id);
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "retention cannot delete"),
        }
    }
    Ok(deleted)
}

pub(crate) fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        // Allocated size: the reserved tails of active files use the disk too.
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.blocks() * 512).max(m.len())
        })
        .sum()
}
