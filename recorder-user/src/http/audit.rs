//! The audit log of recording downloads (audio and pcap: personal data). With `audit_log` set,
//! one JSON object per line is appended to that file (and synced: the line is on disk before
//! the first byte of the recording leaves); without it, one `audit` line goes to the daemon
//! log. A download whose audit line cannot be written is refused (503).

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;

use super::HttpError;

/// Where audit lines go.
pub enum Audit {
    DaemonLog,
    File(Mutex<File>),
}

/// One download.
#[derive(Debug, Serialize)]
pub struct AuditEntry<'a> {
    pub time: String,
    /// The token's name.
    pub token: &'a str,
    pub recording: &'a str,
    /// `audio` or `pcap`.
    pub file: &'a str,
    pub client: SocketAddr,
    /// The `Range` asked for, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<&'a str>,
    pub status: u16,
}

impl AuditEntry<'_> {
    pub fn now() -> String {
        crate::control::rfc3339(SystemTime::now())
    }
}

impl Audit {
    pub fn open(path: &Path) -> Result<Self, HttpError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| HttpError::Audit {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::File(Mutex::new(file)))
    }

    /// Records one download (blocking: call from a blocking task).
    pub fn record(&self, entry: &AuditEntry) -> std::io::Result<()> {
        match self {
            Self::DaemonLog => {
                tracing::info!(
                    target: "recorder::audit",
                    token = entry.token,
                    recording = entry.recording,
                    file = entry.file,
                    client = %entry.client,
                    range = entry.range.unwrap_or("-"),
                    status = entry.status,
                    "audit: recording downloaded"
                );
                Ok(())
            }
            Self::File(file) => {
                let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
                line.push(b'\n');
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                // One write of the whole line: O_APPEND keeps concurrent lines apart.
                file.write_all(&line)?;
                file.sync_data()
            }
        }
    }
}
