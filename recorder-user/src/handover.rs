//! Handing the live recordings from one daemon to the next (restart or upgrade without loss).
//!
//! A daemon leaving with `detach_on_exit` keeps XDP capturing into the pinned ring buffers (see
//! `capture::loader`) and saves here what the kernel does not hold: the SIPREC sessions with
//! their SIP dialogs, and the writer's open recordings. The next daemon reads the file, adopts
//! the pinned objects, carries on the same recordings, and removes the file once it runs, so a
//! later crash never resurrects sessions that ended since.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{siprec::session::RecorderHandover, writer::WriterHandover};

/// Bumped whenever the file's shape changes incompatibly: a daemon never reads a format it does
/// not know (it starts fresh and says so).
pub const FORMAT: u32 = 1;

/// What one daemon leaves to the next.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    pub format: u32,
    /// Version of the daemon that wrote it.
    pub written_by: String,
    pub saved_at: SystemTime,
    /// Whether the writing daemon left its capture pinned (packets kept flowing into the rings).
    pub capture_pinned: bool,
    pub recorder: RecorderHandover,
    pub writer: WriterHandover,
}

/// Errors reading or writing the handover file.
#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a handover file this version understands: {message}")]
    Format { path: PathBuf, message: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HandoverError + 'a {
    move |source| HandoverError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Handover {
    pub fn new(recorder: RecorderHandover, writer: WriterHandover, capture_pinned: bool) -> Self {
        Self {
            format: FORMAT,
            written_by: env!("CARGO_PKG_VERSION").to_string(),
            saved_at: SystemTime::now(),
            capture_pinned,
            recorder,
            writer,
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename): the next daemon sees the
    /// whole handover or none.
    pub fn save(&self, path: &Path) -> Result<(), HandoverError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| HandoverError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        // Owner only: it holds SRTP keys and the participants' details.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.write_all(&json).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename", path))?;
        if let Some(dir) = path.parent() {
            // The rename itself must survive a power cut.
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", dir))?;
        }
        Ok(())
    }

    /// Reads the file if there is one. A file that cannot be used is moved aside (`.bad`) so it
    /// is reported once, not on every start.
    pub fn load(path: &Path) -> Result<Option<Self>, HandoverError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", path)(e)),
        };
        match Self::from_json(&bytes) {
            Ok(handover) => Ok(Some(handover)),
            Err(message) => {
                let _ = fs::rename(path, path.with_extension("json.bad"));
                Err(HandoverError::Format {
                    path: path.to_path_buf(),
                    message,
                })
            }
        }
    }

    /// Parses the file's contents: a format this daemon reads, or why not.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice::<Self>(bytes)
            .map_err(|e| e.to_string())
            .and_then(|h| match h.format {
                FORMAT => Ok(h),
                other => Err(format!("format {other}, this daemon reads {FORMAT}")),
            })
    }

    /// Removes the file once its sessions run again.
    pub fn remove(path: &Path) -> Result<(), HandoverError> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        flow::MemoryFlows,
        sip::{Endpoint, EndpointConfig},
        siprec::session::{Recorder, SiprecConfig},
        writer::{self, tests::TempDir, WriterConfig},
    };

    /// A real (empty) handover from a recorder and a writer.
    fn handover(spool: &Path) -> Handover {
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let mut recorder = Recorder::new(
            SiprecConfig::default(),
            MemoryFlows::default(),
            Box::new(|_| {}),
        );
        let sessions = recorder.handover(Instant::now(), &mut endpoint);
        let (writer, _sink) = writer::start(WriterConfig::new(spool.to_path_buf())).unwrap();
        Handover::new(sessions, writer.handover().unwrap(), true)
    }

    #[test]
    fn saved_file_reads_back_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("handover-save");
        let path = dir.path().join(".handover.json");
        assert!(
            Handover::load(&path).unwrap().is_none(),
            "no file: fresh start"
        );
        handover(dir.path()).save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "holds SRTP keys");
        let back = Handover::load(&path).unwrap().expect("saved");
        assert_eq!(back.format, FORMAT);
        assert!(back.capture_pinned);
        assert!(back.writer.recording_ids().is_empty());
        Handover::remove(&path).unwrap();
        assert!(!path.exists());
        Handover::remove(&path).unwrap();
    }

    #[test]
    fn unusable_file_is_an_error_once_and_moved_aside() {
        let dir = TempDir::new("handover-bad");
        let path = dir.path().join(".handover.json");
        fs::write(&path, b"{\"format\": 1, \"truncated").unwrap();
        let err = Handover::load(&path).unwrap_err();
        assert!(matches!(err, HandoverError::Format { .. }), "{err}");
        assert!(path.with_extension("json.bad").exists());
        assert!(Handover::load(&path).unwrap().is_none(), "reported once");

        let mut other = serde_json::to_value(handover(dir.path())).unwrap();
        other["format"] = (FORMAT + 1).into();
        fs::write(&path, other.to_string()).unwrap();
        let err = Handover::load(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("format {}", FORMAT + 1)), "{err}");
    }
}
