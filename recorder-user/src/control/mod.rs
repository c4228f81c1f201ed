//! The control API: JSON lines over a Unix socket, served by the daemon, used by the CLI.
//!
//! One request per line, one response per line: `{"ok":true,"data":...}` or
//! `{"ok":false,"error":"..."}`.

mod server;

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

pub(crate) use server::{live_sessions, parse_time, rfc3339, row_json, stop_session, DRIVER_GONE};
pub use server::{serve, ControlState, RestartInfo};

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Version, uptime, interfaces, counters, spool usage.
    Status,
    /// Live recording sessions.
    Sessions,
    /// The pinned flows as the kernel sees them, with counters.
    Flows,
    /// End a recording from the operator's side (BYE to the client).
    Stop { id: String },
    /// Recordings from the index.
    Recordings {
        call_uuid: Option<String>,
        aor: Option<String>,
        /// RFC 3339 time: recordings active at or after it.
        since: Option<String>,
    },
    /// One recording's metadata.
    Show { id: String },
    /// Stop taking new sessions (INVITEs and OPTIONS get 503) and let the live ones finish;
    /// `resume`: take new sessions again.
    Drain {
        #[serde(default)]
        resume: bool,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data: Some(data),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            data: None,
        }
    }
}

/// Errors talking to the daemon.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot connect to {path} (is the recorder running?): {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from the daemon: {0}")]
    BadResponse(String),
    #[error("the daemon did not answer in time")]
    Timeout,
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the response's data (an error when `ok` is false).
pub async fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ControlError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(request).expect("requests serialize");
        line.push('\n');
        write.write_all(line.as_bytes()).await?;
        let mut reader = BufReader::new(read);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| ControlError::BadResponse(format!("{e}: {answer:?}")))?;
        if response.ok {
            Ok(response.data.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ControlError::Refused(
                response.error.unwrap_or_else(|| "unknown error".into()),
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| ControlError::Timeout)?
}
