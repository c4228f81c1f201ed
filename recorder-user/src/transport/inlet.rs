//! The way from the socket tasks to the driver, with admission control.
//!
//! Two queues: messages of live dialogs and transactions ([`Class::Priority`]) and connection
//! changes wait for room (the socket task stops reading meanwhile, which is back-pressure, not
//! loss: these are few next to a flood); new INVITEs and other new requests go on a bounded
//! queue the driver serves only when nothing of priority is waiting. A new INVITE that finds
//! that queue full is answered 503 at once from the socket task, so overload is never silence
//! and the queue never grows; other new input is dropped and counted.

use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

use tokio::sync::{mpsc, Semaphore};

use super::driver::Input;
use crate::sip::{classify, Class, Endpoint, Incoming, Transmit};

/// New requests waiting for the driver at most (about a tenth of a second of work for it at
/// the rates it serves; beyond that a client is better told 503 than kept waiting).
pub const NEW_REQUEST_QUEUE: usize = 512;
/// Priority messages waiting for the driver at most before socket tasks pause reading.
pub const PRIORITY_QUEUE: usize = 1024;
/// Inbound TCP and TLS connections at once; more are closed on accept (each holds a buffer of
/// up to a message, 1 MiB of body at most, and a file descriptor).
pub const MAX_STREAM_CONNECTIONS: usize = 2048;

/// What admission did, for metrics and `recorder status`.
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// Messages queued as priority (responses, in-dialog requests but ACK, CANCEL, BYE).
    pub priority: AtomicU64,
    /// New INVITEs queued.
    pub new_invites: AtomicU64,
    /// Other input queued (ACKs, OPTIONS, unparseable input, ...).
    pub other: AtomicU64,
    /// New INVITEs answered 503 by the socket task because the queue was full.
    pub invites_shed: AtomicU64,
    /// New input dropped because the queue was full and no answer was possible or due.
    pub dropped: AtomicU64,
    /// The deepest the new-request queue has been.
    pub queue_peak: AtomicU64,
    /// Stream connections closed on accept (over [`MAX_STREAM_CONNECTIONS`]).
    pub connections_refused: AtomicU64,
    /// Stream connections closed because their bytes could not be framed.
    pub framing_errors: AtomicU64,
    /// Answers to stream peers dropped because the peer does not read.
    pub write_queue_full: AtomicU64,
}

/// A copy of [`TransportCounters`] with the gauges, for serialising.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    pub priority: u64,
    pub new_invites: u64,
    pub other: u64,
    pub invites_shed: u64,
    pub dropped: u64,
    pub queue_depth: u64,
    pub queue_peak: u64,
    pub queue_capacity: u64,
    pub connections_open: u64,
    pub connections_max: u64,
    pub connections_refused: u64,
    pub framing_errors: u64,
    pub write_queue_full: u64,
}

/// The counters and the gauges' sources, shared by the socket tasks, the driver and readers.
#[derive(Clone)]
pub struct TransportMonitor {
    pub(crate) counters: Arc<TransportCounters>,
    pub(crate) queue: mpsc::WeakSender<Input>,
    pub(crate) connections: Arc<Semaphore>,
}

impl TransportMonitor {
    pub fn stats(&self) -> TransportStats {
        let c = &self.counters;
        let queue_depth = self
            .queue
            .upgrade()
            .map_or(0, |q| (q.max_capacity() - q.capacity()) as u64);
        TransportStats {
            priority: c.priority.load(Relaxed),
            new_invites: c.new_invites.load(Relaxed),
            other: c.other.load(Relaxed),
            invites_shed: c.invites_shed.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            queue_depth,
            queue_peak: c.queue_peak.load(Relaxed).max(queue_depth),
            queue_capacity: NEW_REQUEST_QUEUE as u64,
            connections_open: (MAX_STREAM_CONNECTIONS - self.connections.available_permits())
                as u64,
            connections_max: MAX_STREAM_CONNECTIONS as u64,
            connections_refused: c.connections_refused.load(Relaxed),
            framing_errors: c.framing_errors.load(Relaxed),
            write_queue_full: c.write_queue_full.load(Relaxed),
        }
    }
}

/// The socket tasks' handle on the driver's two queues.
#[derive(Clone)]
pub(crate) struct Inlet {
    pub(crate) priority: mpsc::Sender<Input>,
    pub(crate) new_requests: mpsc::Sender<Input>,
    /// Builds the immediate 503s (its state is never used: a stateless answer needs config).
    pub(crate) shedder: Arc<Endpoint>,
    pub(crate) counters: Arc<TransportCounters>,
    pub(crate) connections: Arc<Semaphore>,
}

/// The driver went away: the socket task should end.
pub(crate) struct Gone;

impl Inlet {
    /// Connection changes and other input that must not be lost.
    pub(crate) async fn control(&self, input: Input) -> Result<(), Gone> {
        self.priority.send(input).await.map_err(|_| Gone)
    }

    /// Queues one message by its class; `reply` sends the 503 for a new INVITE that finds no
    /// room (it must not block: the socket task is reading a flood).
    pub(crate) async fn message(
        &self,
        incoming: Incoming,
        reply: impl FnOnce(Transmit),
    ) -> Result<(), Gone> {
        let class = classify(&incoming.bytes);
        if class == Class::Priority {
            self.counters.priority.fetch_add(1, Relaxed);
            return self.control(Input::Message(incoming)).await;
        }
        let answer = (class == Class::NewInvite).then(|| incoming.clone());
        match self.new_requests.try_send(Input::Message(incoming)) {
            Ok(()) => {
                let counter = match class {
                    Class::NewInvite => &self.counters.new_invites,
                    _ => &self.counters.other,
                };
                counter.fetch_add(1, Relaxed);
                let depth =
                    (self.new_requests.max_capacity() - self.new_requests.capacity()) as u64;
                self.counters.queue_peak.fetch_max(depth, Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Gone),
            Err(mpsc::error::TrySendError::Full(_)) => {
                match answer.and_then(|incoming| self.shedder.overload_answer(&incoming)) {
                    Some(transmit) => {
                        self.counters.invites_shed.fetch_add(1, Relaxed);
                        reply(transmit);
                    }
                    None => {
                        self.counters.dropped.fetch_add(1, Relaxed);
                    }
                }
                Ok(())
            }
        }
    }
}
