//! Routing: the [`WriterSink`] the ring consumer feeds, which sends each packet to the shard
//! that owns its recording, in batches, and tells the consumer when a shard has no room.
//!
//! # Back-pressure, never a drop
//! Each shard has a bound on the packets queued to it (`queue_packets`). When a shard reaches
//! it, [`PacketSink::has_room`] turns false and the consumer stops taking records: they wait
//! in the BPF rings, the only buffers that may overflow (counted per CPU and per flow by the
//! XDP program, `ring_full`). Called anyway (tests), [`PacketSink::packet`] waits for room.
//!
//! # Shards
//! A recording belongs to one shard (by a hash of its id), so its packets are written in
//! arrival order by one thread. The [`WriterHandle`](super::WriterHandle) assigns recordings
//! to shards when their events pass, and logs each flow id's shard in the [`Router`]; the sink
//! applies the log before the next packet (one atomic load per packet when nothing changed).
//! A packet of a flow id above every id routed so far belongs to a session whose event is on
//! its way: the sink holds it (up to [`PENDING_MAX`] for [`PENDING_AGE`]) until its route is
//! known. Other unknown flow ids go to a fixed shard, which counts them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    time::{Instant, SystemTime},
};

use super::{shard::Msg, Shared, PENDING_AGE, PENDING_MAX};
use crate::capture::{CapturedPacket, PacketSink, RecordHeader};

/// Packets per batch sent to a shard (a drain may hold far more, after a restart).
pub const BATCH_PACKETS: usize = 512;

/// Packets copied out of the ring by the sink and sent to a shard together (one channel message
/// and one allocation-free copy per packet instead of a message and a boxed frame each): frames
/// back to back in one buffer.
#[derive(Default)]
pub(crate) struct PacketBatch {
    /// Header, arrival and end of the frame in `bytes` (it starts where the previous ends).
    packets: Vec<(RecordHeader, SystemTime, usize)>,
    bytes: Vec<u8>,
}

impl PacketBatch {
    pub(crate) fn with_capacity() -> Self {
        Self {
            packets: Vec::with_capacity(BATCH_PACKETS),
            bytes: Vec::with_capacity(BATCH_PACKETS * 256),
        }
    }

    fn push(&mut self, p: &CapturedPacket<'_>) {
        let cap = (p.header.cap_len as usize).min(p.frame.len());
        self.bytes.extend_from_slice(&p.frame[..cap]);
        self.packets.push((p.header, p.wall, self.bytes.len()));
    }

    pub(crate) fn len(&self) -> usize {
        self.packets.len()
    }

    pub(crate) fn clear(&mut self) {
        self.packets.clear();
        self.bytes.clear();
    }

    /// The flow ids of the packets, in order.
    pub(crate) fn flow_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.packets.iter().map(|(h, _, _)| h.flow_id)
    }

    /// Packet `i` (`i < len()`).
    pub(crate) fn get(&self, i: usize) -> CapturedPacket<'_> {
        let (header, wall, end) = self.packets[i];
        let start = if i == 0 { 0 } else { self.packets[i - 1].2 };
        CapturedPacket {
            header,
            frame: &self.bytes[start..end],
            wall,
            ring: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = CapturedPacket<'_>> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Asks the CPU to bring packet `i`'s bytes into the cache (a hint; `i < len()`).
    pub(crate) fn prefetch(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let start = if i == 0 { 0 } else { self.packets[i - 1].2 };
            let end = self.packets[i].2;
            let mut at = start;
            while at < end {
                // SAFETY: a prefetch is only a hint; the address is inside `bytes`.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(
                        self.bytes.as_ptr().add(at) as *const i8,
                        std::arch::x86_64::_MM_HINT_T0,
                    )
                };
                at += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }
}

/// A captured packet copied out of the ring (held while its flow is not routed yet).
pub(crate) struct OwnedPacket {
    pub header: RecordHeader,
    pub wall: SystemTime,
    pub frame: Box<[u8]>,
}

impl OwnedPacket {
    pub(crate) fn new(p: &CapturedPacket<'_>) -> Self {
        Self {
            header: p.header,
            wall: p.wall,
            frame: p.frame.into(),
        }
    }

    pub(crate) fn as_captured(&self) -> CapturedPacket<'_> {
        CapturedPacket {
            header: self.header,
            frame: &self.frame,
            wall: self.wall,
            ring: 0,
        }
    }
}

/// Packets queued to one shard, and the room signal the shards give.
pub(crate) struct ShardQueue {
    pub queued: AtomicUsize,
    pub capacity: usize,
    room: Arc<Room>,
}

/// Woken when a shard has worked through a batch: the consumer (async) and a sink waiting
/// in `packet` (blocking).
#[derive(Default)]
pub(crate) struct Room {
    pub notify: Arc<tokio::sync::Notify>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl ShardQueue {
    pub(crate) fn new(capacity: usize, room: Arc<Room>) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            capacity: capacity.max(1),
            room,
        }
    }

    /// `n` packets were taken off this shard's queue.
    pub(crate) fn done(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        if left < self.capacity {
            // A stored permit if nobody waits: cheap, and no wake-up is ever lost.
            self.room.notify.notify_one();
            let _guard = self.room.lock.lock();
            self.room.cv.notify_all();
        }
    }
}

/// Flow id -> shard changes, from the handle to the sink.
#[derive(Default)]
pub(crate) struct Router {
    changed: AtomicBool,
    log: Mutex<Vec<(u64, Option<u16>)>>,
}

impl Router {
    /// Routes `flows` to `shard` (None: forget them).
    pub(crate) fn set(&self, flows: impl IntoIterator<Item = u64>, shard: Option<u16>) {
        if let Ok(mut log) = self.log.lock() {
            log.extend(flows.into_iter().map(|f| (f, shard)));
        }
        self.changed.store(true, Ordering::Release);
    }
}

/// The capture side: a [`PacketSink`] that routes packets to the writer's shards.
///
/// Packets are sent in batches: at every [`PacketSink::batch_end`] (the ring consumer calls it
/// after each drain, before it delivers an event) and every [`BATCH_PACKETS`] packets to a
/// shard; dropping the sink sends what it holds.
pub struct WriterSink {
    pub(crate) shards: Vec<(mpsc::Sender<Msg>, Arc<ShardQueue>)>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) router: Arc<Router>,
    pub(crate) room: Arc<Room>,
    /// Flow id -> shard, as the router logged it.
    pub(crate) routes: HashMap<u64, u16, std::hash::BuildHasherDefault<super::slots::FlowIdHasher>>,
    pub(crate) max_routed: u64,
    /// Packets not sent yet, per shard.
    pub(crate) batches: Vec<PacketBatch>,
    /// Packets of flows not routed yet (several shards only).
    pub(crate) pending: VecDeque<(Instant, OwnedPacket)>,
    /// Packets taken since the counters were last published.
    pub(crate) packets_in: u64,
}

impl WriterSink {
    fn apply_routes(&mut self) {
        if !self.router.changed.swap(false, Ordering::Acquire) {
            return;
        }
        let log = self
            .router
            .log
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for (flow, shard) in log {
            match shard {
                Some(s) => {
                    self.routes.insert(flow, s);
                    self.max_routed = self.max_routed.max(flow);
                }
                None => {
                    self.routes.remove(&flow);
                }
            }
        }
        if !self.pending.is_empty() {
            self.replay_pending();
        }
    }

    fn replay_pending(&mut self) {
        let now = Instant::now();
        for (at, p) in std::mem::take(&mut self.pending) {
            let shard = self.routes.get(&p.header.flow_id).copied();
            match shard {
                Some(s) => self.push(s as usize, &p.as_captured()),
                // Never routed in time: its shard-to-be is unknown, the fixed one counts it.
                None if now.duration_since(at) > PENDING_AGE => {
                    self.push(self.fallback(p.header.flow_id), &p.as_captured())
                }
                None => self.pending.push_back((at, p)),
            }
        }
    }

    fn fallback(&self, flow: u64) -> usize {
        (flow % self.shards.len() as u64) as usize
    }

    fn push(&mut self, shard: usize, p: &CapturedPacket<'_>) {
        let batch = &mut self.batches[shard];
        if batch.packets.capacity() == 0 {
            *batch = self.shared.spare_batch();
        }
        batch.push(p);
        if batch.len() >= BATCH_PACKETS {
            self.send(shard);
        }
    }

    fn send(&mut self, shard: usize) {
        let n = self.batches[shard].len();
        if n == 0 {
            return;
        }
        let batch = std::mem::take(&mut self.batches[shard]);
        let (tx, queue) = &self.shards[shard];
        queue.queued.fetch_add(n, Ordering::AcqRel);
        if let Err(mpsc::SendError(msg)) = tx.send(Msg::Packets(batch)) {
            // The shard has stopped (shutdown): nothing will take packets any more.
            queue.queued.fetch_sub(n, Ordering::AcqRel);
            if let Msg::Packets(b) = msg {
                self.shared
                    .unknown_flow
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn shard_full(&self, shard: usize) -> bool {
        let q = &self.shards[shard].1;
        q.queued.load(Ordering::Acquire) + self.batches[shard].len() >= q.capacity
    }
}

impl PacketSink for WriterSink {
    fn packet(&mut self, p: &CapturedPacket<'_>) {
        self.packets_in += 1;
        let shard = if self.shards.len() == 1 {
            0
        } else {
            self.apply_routes();
            match self.routes.get(&p.header.flow_id) {
                Some(&s) => s as usize,
                None if p.header.flow_id > self.max_routed => {
                    let now = Instant::now();
                    while self.pending.len() >= PENDING_MAX
                        || self
                            .pending
                            .front()
                            .is_some_and(|(at, _)| now.duration_since(*at) > PENDING_AGE)
                    {
                        if let Some((_, old)) = self.pending.pop_front() {
                            self.push(self.fallback(old.header.flow_id), &old.as_captured());
                        }
                    }
                    self.pending.push_back((now, OwnedPacket::new(p)));
                    return;
                }
                None => self.fallback(p.header.flow_id),
            }
        };
        if self.shard_full(shard) {
            // The consumer checks `has_room` first; anyone else waits here, never drops.
            self.send(shard);
            let room = self.room.clone();
            let mut guard = room.lock.lock().unwrap_or_else(|e| e.into_inner());
            while self.shard_full(shard) {
                guard = room
                    .cv
                    .wait_timeout(guard, std::time::Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        self.push(shard, p);
    }

    fn batch_end(&mut self) {
        if self.shards.len() > 1 {
            // Held packets whose route came meanwhile go out even if no packet follows.
            self.apply_routes();
        }
        for shard in 0..self.shards.len() {
            self.send(shard);
        }
        if self.packets_in > 0 {
            self.shared
                .packets_in
                .fetch_add(self.packets_in, Ordering::Relaxed);
            self.packets_in = 0;
        }
    }

    fn has_room(&self) -> bool {
        (0..self.shards.len()).all(|s| !self.shard_full(s))
    }

    fn room(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.room.notify.clone())
    }
}

impl Drop for WriterSink {
    fn drop(&mut self) {
        // Held packets go to the fixed shards (counted there if never routed).
        let held: Vec<_> = self.pending.drain(..).collect();
        for (_, p) in held {
            let shard = self
                .routes
                .get(&p.header.flow_id)
                .map_or_else(|| self.fallback(p.header.flow_id), |&s| s as usize);
            self.push(shard, &p.as_captured());
        }
        self.batch_end();
    }
}
