//! Draining the XDP program's ring buffers.
//!
//! One task owns every ring. It sleeps on an epoll set holding all ring fds and on a short
//! periodic tick. The XDP program wakes it only when a ring's unread data crosses 1/8 of the
//! ring (a wake-up per record cost an IPI and a context switch each, a quarter of the receive
//! path at high rates); below that, the tick drains, which bounds the delay of a quiet ring.
//! Each wake-up drains every ring completely and hands the records on in kernel timestamp order.
//!
//! Back-pressure: records are handed to the sink only while it has room
//! ([`PacketSink::has_room`]). The rest stay staged here, and the rings are not read again until
//! they are handed on: the rings fill, and the XDP program counts what they cannot hold
//! (`ring_full`, per CPU and per flow). Nothing is dropped in userspace. How long the sink kept
//! the consumer waiting is counted ([`ConsumerStats`]): the longest stall sizes the rings.

use std::{
    collections::VecDeque,
    io,
    ops::Range,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use recorder_ebpf::abi::{RecordHeader, RECORD_HEADER_LEN};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{loader::CaptureError, CapturedPacket, MonoClock, PacketSink};

/// Counts kept by the consumer (the kernel-side counts are in `Counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records handed to the sink.
    pub records: u64,
    /// Records too short to hold their header or the bytes it announces (never expected).
    pub malformed: u64,
    /// Drain passes.
    pub wakeups: u64,
    /// Times the sink had no room and records waited (staged here, then in the rings).
    pub stalls: u64,
    /// Total and longest time spent waiting for the sink, in microseconds.
    pub stalled_us: u64,
    pub longest_stall_us: u64,
}

/// Back-pressure stalls as the metrics read them while the consumer runs (see
/// [`ConsumerStats`]).
#[derive(Debug, Default)]
pub struct StallStats {
    pub stalls: std::sync::atomic::AtomicU64,
    pub stalled_us: std::sync::atomic::AtomicU64,
    pub longest_stall_us: std::sync::atomic::AtomicU64,
}

/// A stall longer than this is logged (at the default 32 MiB rings, 200 000 packets/s on one
/// CPU fill a ring in about 160 ms).
const STALL_LOG: Duration = Duration::from_millis(250);

/// Owns the rings and drains them into a sink.
pub struct RingConsumer {
    rings: Vec<RingBuf<MapData>>,
    /// Epoll set of every ring fd (registered with tokio only while `run` runs, so `drain`
    /// works without a runtime).
    epoll: Option<OwnedFd>,
    clock: MonoClock,
    pub stats: ConsumerStats,
    /// Records of the current drain, copied out of the rings ...
    arena: Vec<u8>,
    /// ... and per ring, their timestamps and places in `arena`, oldest first. Records the
    /// sink had no room for stay here until the next drain.
    staged: Vec<VecDeque<(u64, Range<usize>)>>,
    /// Since when the sink has had no room (None: it has).
    stalled_since: Option<std::time::Instant>,
    shared: std::sync::Arc<StallStats>,
    /// The ring that held the most records at the last merge (read last, straight into the
    /// sink when the others are empty).
    busiest: usize,
    /// The sink ran out of room while records were read straight from a ring: some wait there.
    left_in_ring: bool,
}

impl RingConsumer {
    pub fn new(rings: Vec<RingBuf<MapData>>) -> Result<Self, CaptureError> {
        // SAFETY: plain syscall; the result is checked and owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(CaptureError::Epoll(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh epoll fd nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for ring in &rings {
            add_to_epoll(epoll.as_raw_fd(), ring.as_raw_fd()).map_err(CaptureError::Epoll)?;
        }
        Ok(Self {
            staged: vec![VecDeque::new(); rings.len()],
            arena: Vec::new(),
            rings,
            epoll: Some(epoll),
            clock: MonoClock::now(),
            stats: ConsumerStats::default(),
            stalled_since: None,
            shared: Default::default(),
            busiest: 0,
            left_in_ring: false,
        })
    }

    /// The stall counters, readable while [`Self::run`] owns the consumer.
    pub fn stall_stats(&self) -> std::sync::Arc<StallStats> {
        self.shared.clone()
    }

    /// Drains every ring once into `sink`, in kernel timestamp order; returns the number of
    /// records.
    ///
    /// The program writes to the ring of the CPU that received the packet, and one flow's
    /// packets can arrive on several CPUs (veth runs XDP on the sender's CPU; a NIC may change
    /// queues). Handing the rings on one after the other would then reorder a flow, badly so
    /// after a restart, when the rings hold seconds of traffic. So the records are copied out
    /// and merged by timestamp, which is monotonic within each ring; when only one ring holds
    /// records (one receive CPU, or RSS keeping every flow on its queue), they go to the sink
    /// straight from it, with nothing to merge.
    ///
    /// Records the sink has no room for stay staged, and the rings are read again only once
    /// everything staged was handed on ([`Self::backlogged`] says whether some wait).
    pub fn drain(&mut self, sink: &mut dyn PacketSink) -> usize {
        self.stats.wakeups += 1;
        let mut n = self.deliver(sink);
        if self.staged.iter().all(VecDeque::is_empty) {
            self.left_in_ring = false;
            self.arena.clear();
            n += self.read_rings(sink);
        }
        self.stats.records += n as u64;
        if n > 0 || self.backlogged() {
            // Also when backlogged: what the sink holds must reach the stages it waits for.
            sink.batch_end();
        }
        let now = std::time::Instant::now();
        match (self.backlogged(), self.stalled_since) {
            (true, None) => {
                self.stats.stalls += 1;
                self.stalled_since = Some(now);
            }
            (false, Some(since)) => {
                let took = now.duration_since(since);
                let us = took.as_micros() as u64;
                self.stats.stalled_us += us;
                self.stats.longest_stall_us = self.stats.longest_stall_us.max(us);
                self.stalled_since = None;
                use std::sync::atomic::Ordering::Relaxed;
                self.shared.stalls.fetch_add(1, Relaxed);
                self.shared.stalled_us.fetch_add(us, Relaxed);
                self.shared.longest_stall_us.fetch_max(us, Relaxed);
                if took >= STALL_LOG {
                    warn!(ms = us / 1000, "the writer held the ring consumer up; records waited in the rings (ring_full counts what did not fit)");
                }
            }
            _ => {}
        }
        n
    }

    /// Records staged that the sink had no room for yet.
    pub fn backlogged(&self) -> bool {
        self.left_in_ring || self.staged.iter().any(|q| !q.is_empty())
    }

    /// Takes the rings' records: every ring but the busiest one is copied into the arena
    /// (staged, oldest first). When none of them held any, the busiest ring's records go to
    /// the sink straight from the ring while it has room (no copy, nothing to merge; the rest
    /// wait in the ring); otherwise that ring is staged too and everything is merged.
    /// Returns the records handed to the sink.
    fn read_rings(&mut self, sink: &mut dyn PacketSink) -> usize {
        let busiest = self.busiest;
        let mut counts = vec![0usize; self.rings.len()];
        for index in (0..self.rings.len()).filter(|&i| i != busiest) {
            counts[index] = self.stage(index);
        }
        if counts.iter().all(|&c| c == 0) {
            let n = self.stream(busiest, sink);
            if n > 0 || self.left_in_ring {
                return n;
            }
        } else {
            counts[busiest] = self.stage(busiest);
        }
        if let Some((index, _)) = counts.iter().enumerate().max_by_key(|(_, c)| **c) {
            if counts[index] > 0 {
                self.busiest = index;
            }
        }
        self.deliver(sink)
    }

    /// Copies ring `index`'s records into the arena; returns how many.
    fn stage(&mut self, index: usize) -> usize {
        let mut n = 0;
        let staged = &mut self.staged[index];
        while let Some(item) = self.rings[index].next() {
            match parse_record(&item) {
                Some((header, _)) => {
                    let start = self.arena.len();
                    self.arena.extend_from_slice(&item);
                    staged.push_back((header.ts_ns, start..self.arena.len()));
                    n += 1;
                }
                None => {
                    self.stats.malformed += 1;
                    warn!(ring = index, len = item.len(), "malformed ring record");
                }
            }
        }
        n
    }

    /// Hands ring `index`'s records to the sink straight from the ring while it has room.
    fn stream(&mut self, index: usize, sink: &mut dyn PacketSink) -> usize {
        let mut n = 0;
        let clock = self.clock;
        loop {
            if !sink.has_room() {
                self.left_in_ring = true;
                break;
            }
            let Some(item) = self.rings[index].next() else {
                break;
            };
            match parse_record(&item) {
                Some((header, frame)) => {
                    let packet = CapturedPacket {
                        header,
                        frame,
                        wall: clock.to_wall(header.ts_ns),
                        ring: index,
                    };
                    crate::contain::contain("captured packet", || sink.packet(&packet));
                    n += 1;
                }
                None => {
                    self.stats.malformed += 1;
                    warn!(ring = index, len = item.len(), "malformed ring record");
                }
            }
        }
        n
    }

    /// Hands staged records to the sink in timestamp order while it has room.
    fn deliver(&mut self, sink: &mut dyn PacketSink) -> usize {
        let mut n = 0;
        while sink.has_room() {
            // At most RING_COUNT heads: a linear scan beats a heap here.
            let next = self
                .staged
                .iter()
                .enumerate()
                .filter_map(|(i, q)| q.front().map(|(ts, _)| (*ts, i)))
                .min();
            let Some((_, index)) = next else { break };
            let (_, range) = self.staged[index].pop_front().expect("head seen above");
            let (header, frame) = parse_record(&self.arena[range]).expect("checked when staged");
            let packet = CapturedPacket {
                header,
                frame,
                wall: self.clock.to_wall(header.ts_ns),
                ring: index,
            };
            crate::contain::contain("captured packet", || sink.packet(&packet));
            n += 1;
        }
        n
    }

    /// Drains until `shutdown` is cancelled, then drains once more so nothing already in the
    /// rings is lost.
    pub async fn run(
        self,
        sink: &mut dyn PacketSink,
        tick: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let (_never, events) = mpsc::unbounded_channel::<()>();
        self.run_with_events(sink, tick, shutdown, events, |_| false, |_, ()| {})
            .await
    }

    /// Like [`run`](Self::run), and also forwards `events` (from signaling) to `deliver`, in
    /// order with the packets. An event for which `drain_first` is true (a recording ended, its
    /// flows already removed from the map) is delivered only after the rings were drained, so
    /// the call's last packets reach the sink before it; since the XDP program may still be
    /// writing a record on another CPU when a flow is removed, the rings are drained again after
    /// [`EVENT_GRACE`]. Other events (a recording started, media changed) are delivered at once,
    /// before the packets of the flows they introduce.
    pub async fn run_with_events<E>(
        mut self,
        sink: &mut dyn PacketSink,
        tick: Duration,
        shutdown: CancellationToken,
        mut events: mpsc::UnboundedReceiver<E>,
        drain_first: impl Fn(&E) -> bool,
        mut deliver: impl FnMut(&mut dyn PacketSink, E),
    ) -> Self {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let fd = self.epoll.take().expect("epoll fd present outside run");
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open while registered.
        let epoll = match unsafe { AsyncFd::register(fd) } {
            Ok(epoll) => Some(epoll),
            Err(e) => {
                let (fd, error) = e.into_parts();
                warn!(%error, "cannot watch the rings with epoll; draining on the tick only");
                self.epoll = Some(fd);
                None
            }
        };
        let mut events_open = true;
        let room = sink.room();
        loop {
            let backlogged = self.backlogged();
            let room = room.clone();
            let readable = async {
                if backlogged {
                    // The rings fill meanwhile; new data changes nothing until there is room.
                    wait_for_room(room.as_deref(), tick).await;
                    return Ok(None);
                }
                match &epoll {
                    Some(epoll) => epoll.readable().await.map(Some),
                    None => std::future::pending().await,
                }
            };
            let event = async {
                if events_open {
                    events.recv().await
                } else {
                    std::future::pending().await
                }
            };
            // Biased: a pending event goes before a pending drain. Signaling queues Started
            // (which routes the new flows) before its 200 OK leaves, so the first RTP packets
            // can only be in the ring after the event is queued; draining them first (random
            // branch order, likely under load) dropped them as packets of an unknown flow.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                event = event => match event {
                    Some(event) => {
                        if drain_first(&event) {
                            self.drain_fully(sink, tick).await;
                            tokio::time::sleep(EVENT_GRACE).await;
                            self.drain_fully(sink, tick).await;
                        }
                        deliver(sink, event);
                        // Events queued meanwhile: the grace above covers them.
                        while let Ok(event) = events.try_recv() {
                            if drain_first(&event) {
                                self.drain_fully(sink, tick).await;
                            }
                            deliver(sink, event);
                        }
                    }
                    None => events_open = false,
                },
                guard = readable => {
                    match guard {
                        Ok(Some(mut guard)) => {
                            // Consume the epoll readiness, then drain.
                            clear_epoll(guard.get_inner().as_raw_fd());
                            guard.clear_ready();
                        }
                        Ok(None) => {}
                        Err(error) => warn!(%error, "ring epoll wait failed"),
                    }
                    self.drain(sink);
                }
                _ = interval.tick() => { self.drain(sink); }
            }
        }
        if let Some(epoll) = epoll {
            self.epoll = Some(epoll.into_inner());
        }
        self.drain_fully(sink, tick).await;
        while let Ok(event) = events.try_recv() {
            deliver(sink, event);
        }
        self
    }

    /// Drains until nothing is staged: waits for the sink's room as often as needed (an event
    /// that must follow a call's last packets, or the end of capture).
    pub async fn drain_fully(&mut self, sink: &mut dyn PacketSink, tick: Duration) {
        let room = sink.room();
        loop {
            self.drain(sink);
            if !self.backlogged() {
                break;
            }
            wait_for_room(room.as_deref(), tick).await;
        }
    }
}

/// Until the sink signals room, at most `tick` (a lost signal costs a tick, never a hang).
async fn wait_for_room(room: Option<&tokio::sync::Notify>, tick: Duration) {
    match room {
        Some(n) => {
            let _ = tokio::time::timeout(tick, n.notified()).await;
        }
        None => tokio::time::sleep(tick).await,
    }
}

/// How long after a signaling event the rings are drained once more before the event is
/// delivered: far longer than one XDP program run (microseconds) on another CPU.
pub const EVENT_GRACE: Duration = Duration::from_millis(2);

/// Splits a ring record into its header and frame bytes.
pub(crate) fn parse_record(bytes: &[u8]) -> Option<(RecordHeader, &[u8])> {
    let head = bytes.get(..RECORD_HEADER_LEN)?;
    // SAFETY: `head` has exactly size_of::<RecordHeader>() bytes, RecordHeader is plain old
    // data, and read_unaligned copes with any alignment.
    let header = unsafe { std::ptr::read_unaligned(head.as_ptr() as *const RecordHeader) };
    let frame = bytes.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.cap_len as usize)?;
    Some((header, frame))
}

fn add_to_epoll(epoll: RawFd, fd: RawFd) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: both fds are valid for the call; `event` outlives it.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads pending events without blocking so the epoll fd stops being readable until new data.
fn clear_epoll(epoll: RawFd) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
    // SAFETY: `events` is a valid buffer of 32 entries; timeout 0 never blocks.
    unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 0) };
}

/// A sink that keeps owned copies of every record (tests, demo).
#[derive(Debug, Default)]
pub struct VecSink {
    pub records: Vec<OwnedRecord>,
}

/// An owned copy of a captured record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRecord {
    pub header: RecordHeader,
    pub frame: Vec<u8>,
    pub ring: usize,
}

impl PacketSink for VecSink {
    fn packet(&mut self, packet: &CapturedPacket<'_>) {
        self.records.push(OwnedRecord {
            header: packet.header,
            frame: packet.frame.to_vec(),
            ring: packet.ring,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_record_checks_lengths() {
        let header = RecordHeader {
            flow_id: 7,
            cap_len: 3,
            ..Default::default()
        };
        let mut bytes = vec![0u8; RECORD_HEADER_LEN];
        // SAFETY: the buffer holds exactly one RecordHeader.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr() as *mut RecordHeader, header) };
        assert!(parse_record(&bytes).is_none(), "announces 3 bytes it lacks");
        bytes.extend_from_slice(&[1, 2, 3, 0, 0]); // ring records are padded to 8 bytes
        let (h, frame) = parse_record(&bytes).unwrap();
        assert_eq!(h.flow_id, 7);
        assert_eq!(frame, &[1, 2, 3]);
        assert!(parse_record(&bytes[..10]).is_none());
    }
}
