//! The packet stage: one thread per shard, owning the recordings the router gives it. It
//! encodes every packet into its recording's buffers in memory and hands full buffers, file
//! replacements and endings to its file thread ([`super::fileio`]); index rows go to the index
//! thread ([`super::indexer`]). It never waits for a file or the index, except when the file
//! thread is a bound behind (back-pressure) and for the rare syncs and handovers.

use std::{
    collections::{HashMap, VecDeque},
    sync::{atomic::Ordering::Relaxed, mpsc, Arc},
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::{
    encode::recording::{Recording, RecordingHandover, Start},
    fileio::FileQueue,
    indexer::{IndexJob, IndexQueue, Linked},
    metadata, repair,
    route::{OwnedPacket, PacketBatch, ShardQueue},
    slots::{FlowRoutes, Recordings, Route},
    ShardShared, Shared, WriterConfig, METADATA_WRITES_MIN, PENDING_AGE, PENDING_MAX,
    RECEPTION_INTERVAL,
};
use crate::{
    capture::CapturedPacket,
    contain::contain,
    events::{EndReason, SessionEvent},
    writer::encode::rtp::SsrcStats,
};

pub(crate) type Reply<T> = mpsc::SyncSender<T>;

pub(crate) enum Msg {
    Packets(PacketBatch),
    Event(Box<SessionEvent>),
    Linked(Linked),
    /// Hand every buffer to the file thread and wait for it (the files then hold everything).
    Sync(Reply<()>),
    Shutdown,
    /// Stop without ending the recordings; reply with their state.
    Handover(Reply<(u64, Vec<RecordingHandover>)>),
    /// Resume these recordings (from the previous writer's handover) before any packet.
    Resume(Vec<RecordingHandover>, u64),
    /// Hold the file thread until the returned sender is dropped (tests of back-pressure).
    HoldFiles(Reply<mpsc::Sender<()>>),
}

/// State of one shard's packet stage.
pub(crate) struct Shard {
    pub files: FileQueue,
    pub index: Option<IndexQueue>,
    pub config: WriterConfig,
    pub shared: Arc<Shared>,
    pub own: Arc<ShardShared>,
    pub queue: Arc<ShardQueue>,
    /// This shard's own inbox (for the index thread's link replies).
    pub inbox: mpsc::Sender<Msg>,
    pub recordings: Recordings,
    /// flow id -> (recording slot, stream index, is RTCP).
    pub flows: FlowRoutes,
    /// recording slot -> the flow ids routed to it, so that routing or ending one recording
    /// touches its own routes only.
    pub slot_flows: HashMap<usize, Vec<u64>>,
    /// Packets of flows newer than any routed yet, waiting for their event (arrival, packet).
    pub pending: VecDeque<(Instant, OwnedPacket)>,
    /// Highest flow id ever routed (signaling hands out flow ids in increasing order).
    pub max_routed_flow: u64,
    /// Recordings whose link lookup has not been answered yet ...
    pub awaiting_link: std::collections::HashSet<String>,
    /// ... and those of them that ended meanwhile: finished when the answer comes, so that
    /// their final metadata and index row carry the link.
    pub ended_unlinked: HashMap<String, EndedUnlinked>,
}

/// An ended recording waiting for its link: (recording, end time, reason, detail, ring drops).
pub(crate) type EndedUnlinked = (
    Recording,
    SystemTime,
    String,
    Option<String>,
    Vec<(u64, u64)>,
);

/// Packets taken from the queue and not stored yet. With thousands of live recordings, one
/// packet per recording in a row meant cold caches for every packet (its route, stream state,
/// pcap buffer and WAV window: a third of the packet stage's time). Stored together a
/// recording at a time, a recording's packets of the last [`GATHER_AGE`] share those misses.
#[derive(Default)]
struct Gather {
    batches: Vec<PacketBatch>,
    packets: usize,
    /// When the oldest packet held was taken.
    since: Option<Instant>,
    /// (recording slot, batch, index in batch), reused.
    order: Vec<(u32, u32, u32)>,
}

impl Gather {
    fn add(&mut self, batch: PacketBatch) {
        if batch.len() == 0 {
            return;
        }
        self.packets += batch.len();
        self.since.get_or_insert_with(Instant::now);
        self.batches.push(batch);
    }
}

/// Packets gathered at most before they are stored (well under the shard's queue bound, which
/// counts them until stored) ...
const GATHER_PACKETS: usize = 16_384;
/// ... and for at most this long (a fifth of a second at 50 packets/s per stream gives each
/// stream about ten packets in a row).
const GATHER_AGE: Duration = Duration::from_millis(200);
/// Packets ahead of the one being stored whose bytes are prefetched (their order is random
/// in memory once sorted by recording).
const PREFETCH_AHEAD: usize = 4;

/// Per-batch counts, added to the shared counters once per batch.
#[derive(Default)]
struct Tally {
    stored: u64,
    unknown_flow: u64,
    srtp_auth_failed: u64,
}

impl Shard {
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let interval = self.config.flush_interval.max(Duration::from_millis(10));
        // Each recording flushes once per interval at its own phase: ticks 16 times as often.
        let tick = interval / 16;
        let mut next_tick = Instant::now() + tick;
        let mut next_publish = Instant::now() + RECEPTION_INTERVAL;
        let mut handover = None;
        let mut gather = Gather::default();
        loop {
            let mut wait = next_tick
                .min(next_publish)
                .saturating_duration_since(Instant::now());
            if let Some(since) = gather.since {
                wait = wait.min((since + GATHER_AGE).saturating_duration_since(Instant::now()));
            }
            match rx.recv_timeout(wait) {
                Ok(Msg::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.store_gathered(&mut gather);
                    break;
                }
                Ok(Msg::Handover(reply)) => {
                    self.store_gathered(&mut gather);
                    handover = Some(reply);
                    break;
                }
                Ok(Msg::Packets(batch)) => {
                    gather.add(batch);
                    if gather.packets >= GATHER_PACKETS {
                        self.store_gathered(&mut gather);
                    }
                }
                Ok(msg) => {
                    // Whatever follows packets (an event, a sync) sees them stored first.
                    self.store_gathered(&mut gather);
                    self.handle(msg);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if gather.since.is_some_and(|t| t.elapsed() >= GATHER_AGE) {
                self.store_gathered(&mut gather);
            }
            let now = Instant::now();
            if now >= next_publish {
                self.publish_reception();
                next_publish = now + RECEPTION_INTERVAL;
            }
            if now >= next_tick {
                self.flush_due(now);
                next_tick = now + tick;
            }
        }
        // Drain what capture queued before the shutdown.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Shutdown => {}
                Msg::Handover(reply) => handover = handover.or(Some(reply)),
                msg => self.handle(msg),
            }
        }
        // Held packets whose session never started are unknown after all.
        self.shared
            .unknown_flow
            .fetch_add(self.pending.len() as u64, Relaxed);
        self.pending.clear();
        // Links not answered by now will not be: finish without them (before a handover too:
        // an ended recording is not handed over, the next daemon would never finish it).
        self.awaiting_link.clear();
        for (_, (rec, at, reason, detail, drops)) in std::mem::take(&mut self.ended_unlinked) {
            self.shared.ended_awaiting_link.fetch_sub(1, Relaxed);
            self.finish(rec, at, &reason, detail, &drops);
        }
        let now = SystemTime::now();
        if let Some(reply) = handover {
            let pending: Vec<_> = self
                .recordings
                .take_all()
                .into_iter()
                .map(|rec| rec.handover(now))
                .collect();
            self.flows.clear();
            self.slot_flows.clear();
            // One wait for every recording's files: their syncs go together.
            self.files.barrier();
            let recordings: Vec<RecordingHandover> =
                pending.into_iter().map(|p| p.done()).collect();
            let _ = reply.send((self.max_routed_flow, recordings));
            return;
        }
        for id in self.recordings.ids() {
            self.end(&id, now, "shutdown", None, &[]);
        }
        self.files.barrier();
    }

    /// Stores the gathered packets recording by recording (in arrival order within each), and
    /// those of unrouted flows last, in arrival order.
    fn store_gathered(&mut self, gather: &mut Gather) {
        if gather.packets == 0 {
            return;
        }
        let started = Instant::now();
        let mut tally = Tally::default();
        let order = &mut gather.order;
        order.clear();
        for (b, batch) in gather.batches.iter().enumerate() {
            for (i, flow) in batch.flow_ids().enumerate() {
                let slot = self.flows.get(&flow).map_or(u32::MAX, |r| r.slot as u32);
                order.push((slot, b as u32, i as u32));
            }
        }
        // (slot, batch, index) is unique: unstable sorting keeps each slot's arrival order.
        order.sort_unstable();
        for k in 0..order.len() {
            if let Some(&(_, b, i)) = order.get(k + PREFETCH_AHEAD) {
                gather.batches[b as usize].prefetch(i as usize);
            }
            let (_, b, i) = order[k];
            let p = gather.batches[b as usize].get(i as usize);
            contain("writer packet", || self.packet(&p, &mut tally));
        }
        self.queue.done(gather.packets);
        self.shared
            .write_latency
            .observe_batch(started.elapsed(), tally.stored);
        if tally.unknown_flow > 0 {
            self.shared
                .unknown_flow
                .fetch_add(tally.unknown_flow, Relaxed);
        }
        if tally.srtp_auth_failed > 0 {
            self.shared
                .srtp_auth_failed
                .fetch_add(tally.srtp_auth_failed, Relaxed);
        }
        for batch in gather.batches.drain(..) {
            self.shared.recycle(batch);
        }
        gather.packets = 0;
        gather.since = None;
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Packets(batch) => {
                let mut gather = Gather::default();
                gather.add(batch);
                self.store_gathered(&mut gather);
            }
            Msg::Event(ev) => {
                contain("writer event", || self.event(*ev));
            }
            Msg::Linked(l) => {
                self.awaiting_link.remove(&l.id);
                if let Some((mut rec, at, reason, detail, drops)) =
                    self.ended_unlinked.remove(&l.id)
                {
                    self.shared.ended_awaiting_link.fetch_sub(1, Relaxed);
                    if let Some((interaction, previous)) = l.link {
                        rec.link(interaction, previous);
                    }
                    self.finish(rec, at, &reason, detail, &drops);
                } else if let (Some(rec), Some((interaction, previous))) =
                    (self.recordings.get_mut(&l.id), l.link)
                {
                    rec.link(interaction, previous);
                    rec.write_metadata(SystemTime::now());
                }
            }
            Msg::Sync(reply) => {
                for (_, rec) in self.recordings.iter_mut() {
                    rec.sync_media();
                }
                self.files.barrier();
                let _ = reply.send(());
            }
            Msg::Resume(recordings, max_routed) => self.resume(recordings, max_routed),
            Msg::HoldFiles(reply) => {
                let _ = reply.send(self.files.hold());
            }
            Msg::Shutdown | Msg::Handover(_) => {}
        }
    }

    /// Goes on with the recordings of a handover (see [`super::start_resumed`]).
    fn resume(&mut self, recordings: Vec<RecordingHandover>, max_routed: u64) {
        self.max_routed_flow = self.max_routed_flow.max(max_routed);
        let floor = self.floor();
        for state in recordings {
            let id = state.meta.id.clone();
            let (dir, mut meta) = (state.dir.clone(), state.meta.clone());
            match Recording::resume(state, floor, Some(self.files.clone())) {
                Ok(mut rec) => {
                    rec.pcap_srtp = self.config.pcap_srtp;
                    self.schedule(&mut rec);
                    rec.write_metadata(SystemTime::now());
                    self.index_update(rec.metadata());
                    let slot = self.recordings.insert(rec);
                    self.route(slot);
                    self.shared.active.fetch_add(1, Relaxed);
                    info!(recording = %id, "recording resumed");
                }
                Err(e) => {
                    warn!(recording = %id, dir = %dir.display(), error = %e,
                        "cannot resume recording: marked interrupted");
                    self.shared.start_failed.fetch_add(1, Relaxed);
                    let detail = format!("could not be resumed after a restart: {e}");
                    match repair::repair_one(&dir, &mut meta, "resume_failed", Some(detail)) {
                        Ok(()) => self.index_update(&meta),
                        Err(e) => {
                            warn!(recording = %id, error = %e, "cannot repair recording");
                            if !dir.join(metadata::METADATA_FILE).exists() {
                                // Nothing left on disk to point at.
                                if let Some(index) = &self.index {
                                    index.send(IndexJob::Remove(id));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Replaces this shard's reception snapshot (ended recordings and removed streams drop out).
    fn publish_reception(&self) {
        if let Ok(mut reports) = self.own.sender_reports.lock() {
            reports.retain(|flow, _| self.flows.contains_key(flow));
        }
        let fresh: HashMap<u64, Vec<SsrcStats>> = self
            .recordings
            .values()
            .flat_map(|r| r.reception())
            .map(|(flow, s)| (flow, s.to_vec()))
            .collect();
        if let Ok(mut m) = self.own.reception.lock() {
            *m = fresh;
        }
        let auth: HashMap<u64, u64> = self
            .recordings
            .values()
            .flat_map(|r| r.auth_failures())
            .collect();
        if let Ok(mut m) = self.own.auth_failures.lock() {
            *m = auth;
        }
    }

    /// Holds a packet whose flow is newer than every routed one (its event is on the way).
    fn hold(&mut self, p: &CapturedPacket<'_>) {
        let now = Instant::now();
        while self.pending.len() >= PENDING_MAX
            || self
                .pending
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > PENDING_AGE)
        {
            self.pending.pop_front();
            self.shared.unknown_flow.fetch_add(1, Relaxed);
        }
        self.pending.push_back((now, OwnedPacket::new(p)));
    }

    /// Writes the held packets whose flows are routed now.
    fn replay_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut tally = Tally::default();
        for (at, p) in std::mem::take(&mut self.pending) {
            if self.flows.contains_key(&p.header.flow_id) {
                self.packet(&p.as_captured(), &mut tally);
            } else {
                self.pending.push_back((at, p));
            }
        }
        self.shared
            .write_latency
            .observe_batch(Duration::ZERO, tally.stored);
    }

    /// Stores one packet; the shared counters are updated per batch, from `tally`.
    fn packet(&mut self, p: &CapturedPacket<'_>, tally: &mut Tally) {
        let Some(&Route { slot, stream, rtcp }) = self.flows.get(&p.header.flow_id) else {
            if p.header.flow_id > self.max_routed_flow.max(self.shared.max_flow.load(Relaxed)) {
                self.hold(p);
            } else {
                tally.unknown_flow += 1;
            }
            return;
        };
        let Some(rec) = self.recordings.slot_mut(slot) else {
            tally.unknown_flow += 1;
            return;
        };
        if rtcp {
            self.own.note_sender_report(p);
        }
        rec.packet(stream, rtcp, p);
        tally.srtp_auth_failed += std::mem::take(&mut rec.srtp_auth_failed);
        rec.dirty = true;
        tally.stored += 1;
    }

    fn floor(&self) -> u64 {
        self.config
            .media_floor_bytes
            .min(self.config.min_free_bytes / 2)
    }

    fn event(&mut self, ev: SessionEvent) {
        let id = ev.recording_id().to_string();
        if let SessionEvent::Started {
            id,
            at,
            ids,
            streams,
            participants,
            metadata,
        } = &ev
        {
            if self.recordings.contains_key(id) {
                warn!(recording = %id, "duplicate Started ignored");
                self.shared.unknown_recording_events.fetch_add(1, Relaxed);
                self.index_forget(id, ids.call_uuid.is_some());
                return;
            }
            let start = Start {
                id,
                at: *at,
                ids,
                streams,
                participants,
                metadata: metadata.as_ref(),
                host: &self.config.host,
                floor: self.floor(),
                files: Some(self.files.clone()),
            };
            match Recording::create(&self.config.spool, start) {
                Ok(mut rec) => {
                    rec.pcap_srtp = self.config.pcap_srtp;
                    self.schedule(&mut rec);
                    rec.write_metadata(*at);
                    self.index_link(rec.metadata());
                    let slot = self.recordings.insert(rec);
                    self.route(slot);
                    self.replay_pending();
                    self.shared.active.fetch_add(1, Relaxed);
                    info!(recording = %id, "recording started");
                }
                Err(e) => {
                    self.shared.start_failed.fetch_add(1, Relaxed);
                    warn!(recording = %id, error = %e, "cannot create recording");
                    self.index_forget(id, ids.call_uuid.is_some());
                }
            }
            return;
        }
        if let SessionEvent::Ended {
            at,
            reason,
            ring_drops,
            ..
        } = &ev
        {
            let detail = match reason {
                EndReason::Bye { reason } => reason.clone(),
                EndReason::Error { detail } => Some(detail.clone()),
                _ => None,
            };
            if !self.end(&id, *at, reason.name(), detail, ring_drops) {
                self.shared.unknown_recording_events.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some(rec) = self.recordings.get_mut(&id) else {
            warn!(recording = %id, "event for an unknown recording");
            self.shared.unknown_recording_events.fetch_add(1, Relaxed);
            return;
        };
        let mut relink = false;
        let at = match ev {
            SessionEvent::MediaChanged { at, streams, .. } => {
                rec.media_changed(at, &streams);
                at
            }
            SessionEvent::ParticipantsChanged {
                at,
                participants,
                metadata,
                ids,
                ..
            } => {
                let had_uuid = rec.metadata().call_uuid.is_some();
                rec.set_ids(&ids);
                rec.set_participants(&participants);
                // The CallUUID came late (metadata in a re-INVITE): link now.
                relink = !had_uuid && rec.metadata().call_uuid.is_some();
                if let Some(m) = &metadata {
                    rec.add_metadata_version(m);
                }
                at
            }
            SessionEvent::Paused { at, label, .. } => {
                rec.set_paused(&label, true, at);
                at
            }
            SessionEvent::Resumed { at, label, .. } => {
                rec.set_paused(&label, false, at);
                at
            }
            SessionEvent::Started { .. } | SessionEvent::Ended { .. } => return,
        };
        rec.write_metadata(at);
        let meta = rec.metadata().clone();
        if relink {
            self.index_link(&meta);
        } else {
            self.index_update(&meta);
        }
        if let Some(slot) = self.recordings.slot_of(&id) {
            self.route(slot);
        }
        self.replay_pending();
    }

    /// (Re)registers the flow ids of the recording in `slot`.
    fn route(&mut self, slot: usize) {
        let Some(rec) = self.recordings.slot(slot) else {
            return;
        };
        let flows = rec.flows();
        self.unroute(slot);
        let ids = flows.iter().map(|(flow, _, _)| *flow).collect();
        for (flow, stream, rtcp) in flows {
            if let Some(other) = self.flows.get(&flow) {
                let name = |s| self.recordings.slot(s).map_or("?", |r| r.id());
                warn!(flow, recording = %name(slot), other = %name(other.slot),
                    "flow id reused; last one wins");
            }
            self.flows.insert(flow, Route { slot, stream, rtcp });
            self.max_routed_flow = self.max_routed_flow.max(flow);
        }
        self.slot_flows.insert(slot, ids);
    }

    /// Removes the routes of the recording in `slot` (not those another recording took over).
    fn unroute(&mut self, slot: usize) {
        for flow in self.slot_flows.remove(&slot).unwrap_or_default() {
            if self.flows.get(&flow).is_some_and(|r| r.slot == slot) {
                self.flows.remove(&flow);
            }
        }
    }

    fn end(
        &mut self,
        id: &str,
        at: SystemTime,
        reason: &str,
        detail: Option<String>,
        ring_drops: &[(u64, u64)],
    ) -> bool {
        let Some((slot, rec)) = self.recordings.remove(id) else {
            return false;
        };
        self.unroute(slot);
        if self.awaiting_link.contains(id) {
            self.shared.ended_awaiting_link.fetch_add(1, Relaxed);
            self.ended_unlinked.insert(
                id.to_string(),
                (rec, at, reason.to_string(), detail, ring_drops.to_vec()),
            );
        } else {
            self.finish(rec, at, reason, detail, ring_drops);
        }
        true
    }

    fn finish(
        &mut self,
        rec: Recording,
        at: SystemTime,
        reason: &str,
        detail: Option<String>,
        ring_drops: &[(u64, u64)],
    ) {
        let id = rec.id().to_string();
        rec.finish(at, reason, detail, ring_drops, self.index.clone());
        self.shared.active.fetch_sub(1, Relaxed);
        self.shared.completed.fetch_add(1, Relaxed);
        info!(recording = %id, reason, "recording ended");
    }

    /// Hands the buffers of the recordings whose turn it is to the file thread, and rewrites
    /// the metadata of those whose counters are due (urgent ones first).
    fn flush_due(&mut self, tick: Instant) {
        let now = SystemTime::now();
        let flush = self.config.flush_interval.max(Duration::from_millis(10));
        let interval = self.config.metadata_interval.max(Duration::from_millis(10));
        let mut due: Vec<(bool, Instant, usize)> = Vec::new();
        for (slot, rec) in self.recordings.iter_mut() {
            if tick >= rec.next_flush {
                rec.flush_media();
                rec.next_flush += flush;
                if rec.next_flush < tick {
                    rec.next_flush = tick + flush;
                }
            }
            if rec.urgent || (rec.dirty && tick >= rec.next_meta) {
                due.push((!rec.urgent, rec.next_meta, slot));
            }
        }
        // Twice the rate that refreshes every recording once per interval (per tick: 1/16 of
        // a flush interval): bursts spread over ticks.
        let average =
            self.recordings.len() as f64 * flush.as_secs_f64() / 16.0 / interval.as_secs_f64();
        let budget = (METADATA_WRITES_MIN / 16)
            .max(4)
            .max(2 * average.ceil() as usize);
        if due.len() > budget {
            due.sort_unstable();
            due.truncate(budget);
        }
        for (_, _, slot) in due {
            if let Some(rec) = self.recordings.slot_mut(slot) {
                rec.refresh_metadata(now);
                rec.next_meta = tick + interval;
            }
        }
    }

    /// Spreads a new (or resumed) recording's periodic work over the intervals, at a phase
    /// that depends on its id, so that recordings started together do not all flush and
    /// rewrite their metadata in the same tick.
    fn schedule(&self, rec: &mut Recording) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rec.id().hash(&mut h);
        let frac = (h.finish() % 1024) as f64 / 1024.0;
        let now = Instant::now();
        rec.next_meta = now + self.config.metadata_interval.mul_f64(frac);
        rec.next_flush = now + self.config.flush_interval.mul_f64(frac);
    }

    /// The handle announced a link for `id` that will not come (`announced`: it had a
    /// CallUUID): later links must not wait for it.
    fn index_forget(&self, id: &str, announced: bool) {
        if let (Some(index), true) = (&self.index, announced) {
            index.send(IndexJob::Forget(id.to_string()));
        }
    }

    fn index_update(&self, meta: &metadata::RecordingMetadata) {
        if let Some(index) = &self.index {
            index.send(IndexJob::Upsert(Box::new(meta.clone())));
        }
    }

    /// Upserts a recording after linking it to the earlier recordings of its CallUUID
    /// (`interaction` and `previous`, sent back here when found), so that a continuation at
    /// another site or after a REFER transfer is visible as part of the same interaction.
    fn index_link(&mut self, meta: &metadata::RecordingMetadata) {
        let Some(index) = self.index.clone() else {
            return;
        };
        if meta.call_uuid.is_none() {
            return self.index_update(meta);
        }
        self.awaiting_link.insert(meta.id.clone());
        let inbox = self.inbox.clone();
        index.send(IndexJob::Link {
            meta: Box::new(meta.clone()),
            reply: Box::new(move |linked| {
                let _ = inbox.send(Msg::Linked(linked));
            }),
        });
    }
}
