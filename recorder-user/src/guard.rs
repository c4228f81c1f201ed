//! Limits of the operator interfaces (control socket, HTTP API) and what they refused: a
//! script gone wrong or a hostile client there must not take memory, tasks or file
//! descriptors from recording.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Control connections served at once; more get an error line and are closed. High enough
/// that a thousand idle or stuck clients (each costs a task, a few KiB and a descriptor, and
/// is closed after [`CONTROL_READ_TIMEOUT`]) still leave room for the operator's `status`.
pub const CONTROL_MAX_CONNECTIONS: usize = 2048;
/// Longest control request line (requests are a few hundred bytes).
pub const CONTROL_MAX_LINE: usize = 64 * 1024;
/// A control client must finish a request line within this time of starting it (or of
/// connecting), and an idle connection is closed after it.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A control client that does not take its answer within this time is disconnected.
pub const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP connections served at once; more get 503 and are closed.
pub const HTTP_MAX_CONNECTIONS: usize = 512;
/// HTTP requests handled at once; more get 503 at once (`Retry-After: 1`).
pub const HTTP_MAX_IN_FLIGHT: usize = 64;
/// Largest HTTP request head (request line and headers): beyond it 431.
pub const HTTP_MAX_HEAD: usize = 64 * 1024;
/// Largest HTTP request body (no endpoint takes one today): beyond it 413.
pub const HTTP_MAX_BODY: usize = 64 * 1024;
/// A handler that has not produced its response head by then gets 503 (the stitching of a
/// long interaction is the slowest; a download's body streams after its head and is not cut).
pub const HTTP_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the limits refused, for metrics and `recorder status`.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub control_refused: AtomicU64,
    pub control_line_too_long: AtomicU64,
    pub control_timeouts: AtomicU64,
    pub http_connections_refused: AtomicU64,
    pub http_overloaded: AtomicU64,
    pub http_timeouts: AtomicU64,
}

/// A copy of [`ApiCounters`] for serialising.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApiStats {
    pub control_refused: u64,
    pub control_line_too_long: u64,
    pub control_timeouts: u64,
    pub http_connections_refused: u64,
    pub http_overloaded: u64,
    pub http_timeouts: u64,
}

impl ApiCounters {
    pub fn stats(&self) -> ApiStats {
        ApiStats {
            control_refused: self.control_refused.load(Relaxed),
            control_line_too_long: self.control_line_too_long.load(Relaxed),
            control_timeouts: self.control_timeouts.load(Relaxed),
            http_connections_refused: self.http_connections_refused.load(Relaxed),
            http_overloaded: self.http_overloaded.load(Relaxed),
            http_timeouts: self.http_timeouts.load(Relaxed),
        }
    }
}
