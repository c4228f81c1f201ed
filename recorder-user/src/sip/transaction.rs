//! RFC 3261 §17.2 server transactions (with RFC 6026's Accepted state for 2xx to INVITE) and
//! the one client transaction kind we originate (in-dialog non-INVITE requests such as BYE,
//! §17.1.2).
//!
//! A transaction only keeps state and timers; the [`super::Endpoint`] decides what to do with
//! what it reports, and turns bytes into [`super::Transmit`]s along the transaction's `Route`.

use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{dialog::DialogId, endpoint::Transport, message::RequestFacts, SipError, T1, T2, T4};

/// Handle of a server transaction, given to the app with each request it must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub(crate) u64);

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "txn-{}", self.0)
    }
}

/// RFC 3261 §17.2.3 matching key: top Via branch, method (ACK counts as INVITE), sent-by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TxnKey {
    pub branch: String,
    pub method: String,
    pub sent_by: String,
}

impl TxnKey {
    pub fn new(facts: &RequestFacts, method: &rsip::Method) -> Self {
        let method = match method {
            rsip::Method::Ack => rsip::Method::Invite,
            m => *m,
        };
        Self {
            branch: facts.via.branch.clone(),
            method: method.to_string(),
            sent_by: facts.via.sent_by.clone(),
        }
    }
}

/// Where a transaction's messages go (RFC 3261 §18.2.2 / RFC 3581 for responses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub transport: Transport,
    pub destination: SocketAddr,
    pub connection: Option<u64>,
    /// Our address the request arrived on, so the answer leaves from it.
    pub local: Option<SocketAddr>,
}

impl Route {
    /// Reliable transports get no retransmissions and zero-length linger timers.
    pub fn reliable(&self) -> bool {
        self.transport != Transport::Udp
    }
}

/// The timers a transaction can run; indexes [`TimerTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// G (non-2xx), the 2xx retransmission of §13.3.1.4, or E (our BYE).
    Retransmit = 0,
    /// H (non-2xx ACK wait), L-like 2xx ACK wait (64*T1), or F (our BYE).
    Timeout = 1,
    /// I, J, or the tail that absorbs INVITE retransmissions after the ACK.
    Linger = 2,
    /// The application must have answered by then (a safety net, not an RFC timer).
    AppDeadline = 3,
}

const TIMERS: [Timer; 4] = [
    Timer::Retransmit,
    Timer::Timeout,
    Timer::Linger,
    Timer::AppDeadline,
];

#[derive(Clone, Debug, Default)]
pub(crate) struct TimerTable([Option<Instant>; 4]);

impl TimerTable {
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.0[timer as usize] = Some(at);
    }
    pub fn stop(&mut self, timer: Timer) {
        self.0[timer as usize] = None;
    }
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }
    pub fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
    /// Takes the earliest timer due at `now`, if any.
    pub fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let timer = TIMERS
            .into_iter()
            .filter(|t| self.0[*t as usize].is_some_and(|at| at <= now))
            .min_by_key(|t| self.0[*t as usize])?;
        self.stop(timer);
        Some(timer)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerState {
    /// No final response yet (Trying/Proceeding).
    Proceeding,
    /// 2xx to INVITE sent, waiting for the ACK (RFC 6026 Accepted).
    Accepted,
    /// ACK for our 2xx received; lingering to absorb retransmitted INVITEs.
    AcceptedAcked,
    /// Non-2xx final sent (INVITE: waiting for the ACK; non-INVITE: timer J).
    Completed,
    /// ACK for our non-2xx received (timer I).
    Confirmed,
}

/// What a server transaction reports from its timers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TxnOutput {
    /// Re-send the last response.
    Retransmit(Bytes),
    /// Our 2xx to an INVITE was never acknowledged (64*T1).
    AckTimeout,
    /// The application did not answer in time; the endpoint answers for it.
    AppDeadline,
    /// The transaction is over; forget it.
    Terminated,
}

pub(crate) struct ServerTransaction {
    pub key: TxnKey,
    pub route: Route,
    pub source: SocketAddr,
    pub request: rsip::Request,
    pub facts: RequestFacts,
    /// To-tag our responses carry when the request had none (generated once).
    pub local_tag: Option<String>,
    /// The dialog this request belongs to, or the one its 2xx created.
    pub dialog: Option<DialogId>,
    pub state: ServerState,
    pub last_response: Option<Bytes>,
    pub last_status: u16,
    timers: TimerTable,
    interval: Duration,
    final_at: Option<Instant>,
}

impl ServerTransaction {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: TxnKey,
        route: Route,
        source: SocketAddr,
        request: rsip::Request,
        facts: RequestFacts,
        local_tag: Option<String>,
        dialog: Option<DialogId>,
    ) -> Self {
        Self {
            key,
            route,
            source,
            request,
            facts,
            local_tag,
            dialog,
            state: ServerState::Proceeding,
            last_response: None,
            last_status: 0,
            timers: TimerTable::default(),
            interval: T1,
            final_at: None,
        }
    }

    pub fn is_invite(&self) -> bool {
        self.request.method == rsip::Method::Invite
    }

    /// The response to re-send for a retransmitted request (none before the first response:
    /// RFC 3261 §17.2.2 Trying state discards it).
    pub fn on_retransmitted_request(&self) -> Option<Bytes> {
        self.last_response.clone()
    }

    /// Starts the deadline by which the application must send a final response.
    pub fn start_app_deadline(&mut self, at: Instant) {
        self.timers.set(Timer::AppDeadline, at);
    }

    /// Records a response the endpoint is about to send and starts the matching timers.
    pub fn send(&mut self, now: Instant, status: u16, bytes: Bytes) -> Result<(), SipError> {
        if self.state != ServerState::Proceeding {
            return Err(SipError::AlreadyAnswered);
        }
        self.last_response = Some(bytes);
        self.last_status = status;
        if status < 200 {
            return Ok(());
        }
        self.final_at = Some(now);
        self.timers.stop(Timer::AppDeadline);
        let unreliable = !self.route.reliable();
        if self.is_invite() {
            self.state = if status < 300 {
                ServerState::Accepted
            } else {
                ServerState::Completed
            };
            if unreliable {
                self.interval = T1;
                self.timers.set(Timer::Retransmit, now + T1);
            }
            self.timers.set(Timer::Timeout, now + 64 * T1);
        } else {
            self.state = ServerState::Completed;
            let linger = if unreliable { 64 * T1 } else { Duration::ZERO };
            self.timers.set(Timer::Linger, now + linger);
        }
        Ok(())
    }

    /// How long this INVITE's 2xx still waits for its ACK (`None` unless in Accepted).
    pub fn ack_wait_left(&self, now: Instant) -> Option<Duration> {
        if self.state != ServerState::Accepted {
            return None;
        }
        let at = self.timers.get(Timer::Timeout)?;
        Some(at.saturating_duration_since(now))
    }

    /// Puts a transaction rebuilt from a previous daemon's state in Accepted: `response` (its
    /// 2xx) is retransmitted on UDP and the ACK awaited for `ack_wait` more.
    pub fn restore_accepted(&mut self, now: Instant, response: Bytes, ack_wait: Duration) {
        self.state = ServerState::Accepted;
        self.last_response = Some(response);
        self.last_status = 200;
        self.final_at = Some(now);
        self.timers = TimerTable::default();
        if !self.route.reliable() {
            self.interval = T1;
            self.timers.set(Timer::Retransmit, now + T1);
        }
        self.timers.set(Timer::Timeout, now + ack_wait);
    }

    /// An ACK matched this INVITE transaction. Returns true when it was the first one.
    pub fn on_ack(&mut self, now: Instant) -> bool {
        match self.state {
            ServerState::Accepted => {
                self.state = ServerState::AcceptedAcked;
                self.timers.stop(Timer::Retransmit);
                self.timers.stop(Timer::Timeout);
                // RFC 6026 timer L: keep absorbing retransmitted INVITEs for 64*T1.
                let start = self.final_at.unwrap_or(now);
                self.timers.set(Timer::Linger, start + 64 * T1);
                true
            }
            ServerState::Completed if self.is_invite() => {
                self.state = ServerState::Confirmed;
                self.timers.stop(Timer::Retransmit);
                self.timers.stop(Timer::Timeout);
                let linger = if self.route.reliable() {
                    Duration::ZERO
                } else {
                    T4
                };
                self.timers.set(Timer::Linger, now + linger);
                true
            }
            _ => false,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<TxnOutput>) {
        while let Some(timer) = self.timers.take_expired(now) {
            match timer {
                Timer::Retransmit => {
                    if let Some(bytes) = &self.last_response {
                        out.push(TxnOutput::Retransmit(bytes.clone()));
                    }
                    self.interval = (self.interval * 2).min(T2);
                    self.timers.set(Timer::Retransmit, now + self.interval);
                }
                Timer::Timeout => {
                    if self.state == ServerState::Accepted {
                        out.push(TxnOutput::AckTimeout);
                    }
                    out.push(TxnOutput::Terminated);
                    return;
                }
                Timer::Linger => {
                    out.push(TxnOutput::Terminated);
                    return;
                }
                Timer::AppDeadline => {
                    if self.state == ServerState::Proceeding {
                        out.push(TxnOutput::AppDeadline);
                    }
                }
            }
        }
    }
}

/// What our BYE client transaction reports.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClientOutput {
    Retransmit(Bytes),
    /// Timer F: no final response within 64*T1.
    TimedOut,
}

/// A non-INVITE client transaction (RFC 3261 §17.1.2), used for the requests we send.
pub(crate) struct ClientTransaction {
    pub route: Route,
    pub dialog: DialogId,
    pub method: rsip::Method,
    bytes: Bytes,
    timers: TimerTable,
    interval: Duration,
}

impl ClientTransaction {
    pub fn new(
        now: Instant,
        route: Route,
        dialog: DialogId,
        method: rsip::Method,
        bytes: Bytes,
    ) -> Self {
        let mut timers = TimerTable::default();
        if !route.reliable() {
            timers.set(Timer::Retransmit, now + T1);
        }
        timers.set(Timer::Timeout, now + 64 * T1);
        Self {
            route,
            dialog,
            method,
            bytes,
            timers,
            interval: T1,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// A provisional response: timer E keeps going, capped at T2 (§17.1.2.2 Proceeding).
    pub fn on_provisional(&mut self) {
        self.interval = T2;
    }

    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<ClientOutput>) {
        while let Some(timer) = self.timers.take_expired(now) {
            match timer {
                Timer::Retransmit => {
                    out.push(ClientOutput::Retransmit(self.bytes.clone()));
                    self.interval = (self.interval * 2).min(T2);
                    self.timers.set(Timer::Retransmit, now + self.interval);
                }
                Timer::Timeout | Timer::Linger | Timer::AppDeadline => {
                    out.push(ClientOutput::TimedOut);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_table_takes_the_earliest_expired() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        table.set(Timer::Linger, t0 + Duration::from_secs(2));
        table.set(Timer::Retransmit, t0 + Duration::from_secs(1));
        assert_eq!(table.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(table.take_expired(t0), None);
        assert_eq!(
            table.take_expired(t0 + Duration::from_secs(5)),
            Some(Timer::Retransmit)
        );
        assert_eq!(
            table.take_expired(t0 + Duration::from_secs(5)),
            Some(Timer::Linger)
        );
        assert_eq!(table.next(), None);
    }
}
