//! Recording writers: per-recording files in the spool, fed by captured packets and signaling
//! events.
//!
//! # Layout (a contract other tools rely on)
//! `<spool>/<recording-id>/` holds
//! * `recording.pcap`: every captured packet of every stream (RTP and RTCP) as received: classic
//!   pcap, `LINKTYPE_ETHERNET`, nanosecond wall-clock timestamps, `incl_len` = captured length,
//!   `orig_len` = wire length;
//! * `recording.wav`: 16-bit PCM at 8 kHz, one channel per audio stream in stream order (first
//!   label left), time-aligned: frame N of every channel is `started_at + N / 8000` s; silence
//!   for gaps, late starts, pauses and lost packets. PCMU and PCMA are decoded; other codecs
//!   (and SRTP) are kept in the pcap only and their channel is silent (said in `notes`);
//! * `metadata.json` ([`RecordingMetadata`]), replaced atomically on every event (start, media
//!   or participant change, pause, end), at the next flush after the first drop of a kind an
//!   operator must see (queue full, write failures), and otherwise every `metadata_interval`
//!   (30 s) while its counters move (packets, loss, DTMF, WAV frames, `media_received`). Each
//!   flush rewrites at most [`METADATA_WRITES_MIN`] files or twice the average rate, so that
//!   thousands of recordings do not stall packet writing with a burst of fsyncs;
//! * `metadata-<n>.xml`: each SIPREC metadata body as received.
//!
//! # Data flow
//! ```text
//! capture ring ──packets──> WriterSink ─┐ (one unbounded channel, packets bounded by a counter)
//! signaling  ──SessionEvent─> WriterHandle ─┴─> writer thread ─> files ─> index (SQLite)
//! ```
//! [`WriterSink::packet`] only copies the frame into the current batch (one buffer, sent as one
//! message at `batch_end`, i.e. after each ring drain, and every [`BATCH_PACKETS`] packets): it
//! never blocks and never touches a file; when `queue_packets` packets are waiting it drops and
//! counts (per flow, reported to the recording's `dropped.queue_full`). Events and packets share
//! the channel, so a packet sent after an event is handled after it (the capture task delivers
//! events between drains, when the sink holds no packet). Counters are published and the write
//! latency measured per batch: per-packet atomics and clock reads were a visible share of the
//! cost at 100 000 packets/s. The writer thread routes packets by `flow_id` (RTP port)
//! or `rtcp_flow_id` (RTCP: pcap only). A packet of a flow id above every id routed so far
//! belongs to a session whose `Started` (or `MediaChanged`) is still on its way: it is held, up
//! to [`PENDING_MAX`] packets for [`PENDING_AGE`], and written once its flow is routed. Other
//! unknown flow ids (late packets after `Ended`) are counted in [`WriterStats::unknown_flow`]
//! and dropped.
//!
//! # Daemon use
//! ```no_run
//! # use recorder::writer::*;
//! # fn main() -> Result<(), WriterError> {
//! let mut config = WriterConfig::new("/var/spool/recorder".into());
//! config.index = Some("/var/lib/recorder/index.db".into());
//! repair_spool(&config.spool)?; // before any writer runs: `active` -> `interrupted`
//! let (handle, sink) = start(config)?; // `sink` goes to the capture task (a PacketSink)
//! // signaling: handle.event(ev); before answering an INVITE: handle.can_accept_new_session()
//! // (false -> 503); every few minutes: handle.enforce_retention()?; metrics: handle.stats()
//! handle.shutdown(); // ends active recordings with end_reason "shutdown"
//! # Ok(()) }
//! ```
//!
//! # Restart without ending recordings
//! ```no_run
//! # use recorder::writer::*;
//! # fn main() -> Result<(), WriterError> {
//! # let config = WriterConfig::new("/var/spool/recorder".into());
//! # let (handle, _sink) = start(config.clone())?;
//! // Old daemon, after signaling and the ring consumer stopped:
//! let handover = handle.handover()?; // files synced and valid, recordings still `active`
//! let json = serde_json::to_vec(&handover).expect("serializable");
//! // New daemon, before the ring consumer starts:
//! let handover: WriterHandover = serde_json::from_slice(&json).expect("our own format");
//! repair_spool_except(&config.spool, &handover.recording_ids())?;
//! let (handle, sink) = start_resumed(config, handover)?; // flows routed before any packet
//! # Ok(()) }
//! ```
//! Files are reopened by path, so the spool must be the same; a recording whose files changed
//! in between ends `interrupted` (`end_reason: resume_failed`).
//!
//! The index is written only by the writer thread; readers (control API, CLI) open their own
//! [`crate::index::Index`] on the same file (SQLite WAL allows concurrent readers).
//!
//! # Disk full
//! Media files grow by `fallocate` and stop growing when the spool would have less than
//! `media_floor_bytes` free: packets that do not fit are counted (`dropped.pcap_write_failed`,
//! `dropped.wav_write_failed`, [`WriterStats`]) and logged once per recording; what is written
//! stays whole (a pcap record is written body first, header last; the WAV is positional), and
//! the floor leaves room to finish the files and replace `metadata.json`.
//! Files are written through `memmap2` mappings grown in large steps with space reserved by
//! `fallocate`, so a full disk is an error, not a `SIGBUS` (see `mmapfile.rs` for the measurement
//! against `write(2)`). No file descriptor stays open per recording: a mapping outlives its
//! descriptor, and files are reopened only to grow, cut or sync them (10 000 live recordings
//! would otherwise need 20 000 descriptors; each still holds two mappings, well below the
//! default `vm.max_map_count` of 65530).

pub mod dtmf;
mod files;
mod g711;
pub mod metadata;
mod mmapfile;
mod pcap;
mod recording;
mod repair;
mod retention;
mod rtp;
mod slots;
#[cfg(test)]
pub(crate) mod tests;
mod wav;

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

pub use self::{
    dtmf::DtmfEvent,
    metadata::{RecordingMetadata, RecordingState},
    repair::{repair_spool, repair_spool_except},
    retention::{enforce_retention, RetentionPolicy},
    rtp::SsrcStats,
};
use self::{
    files::FileQueue,
    recording::{Recording, RecordingHandover, Start},
    slots::{FlowRoutes, Recordings, Route},
};
use crate::{
    capture::{CapturedPacket, PacketSink, RecordHeader},
    events::SessionEvent,
    index::{Index, IndexError, IndexLocation},
};

/// Writer settings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Directory holding one directory per recording.
    pub spool: PathBuf,
    /// How often WAV headers and writeback are refreshed (and urgent metadata changes written).
    pub flush_interval: Duration,
    /// How often the counters in a live recording's `metadata.json` are refreshed. Each rewrite
    /// costs an fsync on the writer thread: with thousands of live recordings, rewriting every
    /// flush would stall packet writing (see `bench_writer_cpu`).
    pub metadata_interval: Duration,
    /// Below this many free bytes in the spool, [`WriterHandle::can_accept_new_session`] is false.
    pub min_free_bytes: u64,
    pub retention_max_age: Option<Duration>,
    pub retention_max_bytes: Option<u64>,
    /// Packets queued between capture and the writer thread before capture drops.
    pub queue_packets: usize,
    /// SQLite index kept up to date by the writer thread (None: no index).
    pub index: Option<PathBuf>,
    /// PostgreSQL connection string: a shared index used instead of the SQLite file `index`.
    pub index_url: Option<String>,
    /// Host (site) name written in metadata and the index.
    pub host: String,
    /// Media writes stop (counted as write failures) when they would leave less free space than
    /// this in the spool, so that files can still be finished and metadata written on a full
    /// disk. Capped at half of `min_free_bytes` (new sessions are refused before media stops).
    pub media_floor_bytes: u64,
}

impl WriterConfig {
    /// Defaults: flush every 2 s, refuse below 256 MiB free, stop media writes below 16 MiB free,
    /// no retention, 65536 queued packets, no index, the machine's host name.
    pub fn new(spool: PathBuf) -> Self {
        Self {
            spool,
            flush_interval: Duration::from_secs(2),
            metadata_interval: Duration::from_secs(30),
            min_free_bytes: 256 * 1024 * 1024,
            retention_max_age: None,
            retention_max_bytes: None,
            queue_packets: 65536,
            index: None,
            index_url: None,
            host: hostname(),
            media_floor_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Errors of the writer layer.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The index could not be opened.
    #[error("index: {0}")]
    Index(#[from] IndexError),
    /// The writer thread is gone.
    #[error("the writer thread has stopped")]
    Stopped,
    /// A handover written by another version of the writer.
    #[error("handover format {found} is not this writer's ({known})")]
    HandoverVersion { found: u32, known: u32 },
}

/// Version of the [`WriterHandover`] format; a writer refuses any other.
pub const HANDOVER_VERSION: u32 = 1;

/// What a writer hands to the next one (the daemon restarting without ending recordings): its
/// active recordings, each stopped with its files synced and valid, and the routing state.
/// Written by [`WriterHandle::handover`], taken by [`start_resumed`]; save it as JSON (serde).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WriterHandover {
    version: u32,
    /// Highest flow id routed (packets of newer flows are held for their `Started`).
    max_routed_flow: u64,
    recordings: Vec<RecordingHandover>,
}

impl WriterHandover {
    /// Ids of the recordings carried (still `active` on disk): pass them to
    /// [`repair_spool_except`].
    pub fn recording_ids(&self) -> Vec<String> {
        self.recordings.iter().map(|r| r.meta.id.clone()).collect()
    }
}

/// Counters of the writer (all recordings, since start).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriterStats {
    /// Packets handed to the sink.
    pub packets_in: u64,
    /// Packets dropped by the sink: the queue to the writer thread was full.
    pub queue_full: u64,
    /// Packets whose flow id belongs to no active recording (late after `Ended`, or unknown).
    pub unknown_flow: u64,
    /// Packets not written to a pcap (disk full or write error).
    pub pcap_write_failed: u64,
    /// Audio packets not written to a WAV (disk full or write error).
    pub wav_write_failed: u64,
    /// `Started` events whose recording could not be created (disk full, bad id).
    pub start_failed: u64,
    /// Events about a recording the writer does not have.
    pub unknown_recording_events: u64,
    /// Index updates that failed.
    pub index_errors: u64,
    pub active_recordings: u64,
    pub completed_recordings: u64,
    /// Packets waiting in the queue to the writer thread right now.
    pub queued_packets: u64,
    /// Bytes written to recording files (pcap records and WAV samples).
    pub bytes_written: u64,
    /// Time the writer thread spent storing each packet (pcap + WAV, into the mapped files):
    /// measured per batch, each packet of a batch counting as the batch's mean.
    pub write_latency: LatencyHistogram,
    /// `metadata.json` replacements that failed (the previous file stays).
    pub metadata_write_failed: u64,
}

/// Upper bounds (microseconds) of the write-latency buckets.
pub const WRITE_LATENCY_BOUNDS_US: [u64; 10] =
    [1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 100_000];

/// A latency histogram: `buckets[i]` counts observations at most `WRITE_LATENCY_BOUNDS_US[i]`
/// (cumulative, as Prometheus wants them); `count` includes those above the last bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencyHistogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_ns: u64,
}

/// Lock-free recorder of [`LatencyHistogram`] observations (one writer thread, many readers).
#[derive(Default)]
struct LatencyCells {
    buckets: [AtomicU64; WRITE_LATENCY_BOUNDS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyCells {
    /// `n` packets stored in `total`: each counts as the mean (packets are timed per batch,
    /// not one by one: two clock reads per packet cost more than storing a G.711 packet).
    fn observe_batch(&self, total: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = (total / n as u32).as_micros() as u64;
        if let Some(i) = WRITE_LATENCY_BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(n, Relaxed);
        }
        self.count.fetch_add(n, Relaxed);
        self.sum_ns.fetch_add(total.as_nanos() as u64, Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        let mut total = 0;
        LatencyHistogram {
            buckets: self
                .buckets
                .iter()
                .map(|b| {
                    total += b.load(Relaxed);
                    total
                })
                .collect(),
            count: self.count.load(Relaxed),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

#[derive(Default)]
struct Shared {
    queued: AtomicUsize,
    packets_in: AtomicU64,
    queue_full: AtomicU64,
    unknown_flow: AtomicU64,
    pcap_write_failed: AtomicU64,
    wav_write_failed: AtomicU64,
    start_failed: AtomicU64,
    unknown_recording_events: AtomicU64,
    index_errors: AtomicU64,
    active: AtomicU64,
    completed: AtomicU64,
    bytes_written: AtomicU64,
    write_latency: LatencyCells,
    metadata_write_failed: Arc<AtomicU64>,
    /// Reception statistics per live RTP flow id, republished every [`RECEPTION_INTERVAL`]
    /// (read by the RTCP receiver reports).
    reception: std::sync::Mutex<HashMap<u64, Vec<SsrcStats>>>,
    /// The last sender report per RTCP flow id and sender SSRC: (middle 32 bits of its NTP
    /// timestamp, capture time), for the LSR/DLSR of our receiver reports.
    sender_reports: std::sync::Mutex<HashMap<u64, SenderReports>>,
    /// Emptied batches handed back by the writer thread for the sink to fill again (their
    /// buffers stay allocated: no malloc/free of a quarter megabyte per batch).
    spare_batches: std::sync::Mutex<Vec<PacketBatch>>,
}

/// Packets per batch sent to the writer thread (a drain may hold far more, after a restart).
pub const BATCH_PACKETS: usize = 512;
/// Emptied batches kept for reuse.
const SPARE_BATCHES: usize = 16;

/// Packets copied out of the ring by the sink and sent to the writer thread together (one
/// channel message and one allocation-free copy per packet instead of a message and a boxed
/// frame each): frames back to back in one buffer.
#[derive(Default)]
pub(crate) struct PacketBatch {
    /// Header, arrival and end of the frame in `bytes` (it starts where the previous ends).
    packets: Vec<(RecordHeader, SystemTime, usize)>,
    bytes: Vec<u8>,
}

impl PacketBatch {
    fn with_capacity() -> Self {
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

    fn len(&self) -> usize {
        self.packets.len()
    }

    fn clear(&mut self) {
        self.packets.clear();
        self.bytes.clear();
    }

    fn iter(&self) -> impl Iterator<Item = CapturedPacket<'_>> {
        let mut start = 0;
        self.packets.iter().map(move |(header, wall, end)| {
            let frame = &self.bytes[start..*end];
            start = *end;
            CapturedPacket {
                header: *header,
                frame,
                wall: *wall,
                ring: 0,
            }
        })
    }
}

/// How often the writer republishes its reception statistics: far below the 5 s RTCP interval,
/// far above the per-packet rate.
const RECEPTION_INTERVAL: Duration = Duration::from_millis(250);

/// Per sender SSRC: the middle 32 bits of the NTP timestamp of its last SR, and when it was
/// captured.
type SenderReports = HashMap<u32, (u32, SystemTime)>;

/// Remembers a sender report (RTCP packets are captured like RTP: no socket reads them).
fn note_sender_report(shared: &Shared, p: &CapturedPacket<'_>) {
    let payload = p
        .frame
        .get(p.header.payload_offset as usize..)
        .unwrap_or(&[]);
    if let Some((ssrc, lsr)) = crate::rtcp::parse_sender_report(payload) {
        if let Ok(mut reports) = shared.sender_reports.lock() {
            reports
                .entry(p.header.flow_id)
                .or_default()
                .insert(ssrc, (lsr, p.wall));
        }
    }
}

/// A captured packet copied out of the ring (held while its flow is not routed yet).
pub(crate) struct OwnedPacket {
    pub header: RecordHeader,
    pub wall: SystemTime,
    pub frame: Box<[u8]>,
}

impl OwnedPacket {
    fn new(p: &CapturedPacket<'_>) -> Self {
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

type Reply<T> = mpsc::SyncSender<T>;

enum Msg {
    Packets(PacketBatch),
    Event(Box<SessionEvent>),
    /// Packets the sink dropped, per flow id.
    QueueDrops(Vec<(u64, u64)>),
    Sync(Reply<()>),
    Retention(Reply<Result<Vec<String>, WriterError>>),
    /// New retention limits (configuration reload).
    SetRetention(retention::RetentionPolicy),
    Shutdown,
    /// Stop without ending the recordings; reply with what the next writer needs.
    Handover(Reply<WriterHandover>),
}

/// Reads the writer's reception statistics (see [`WriterHandle::reception`]).
#[derive(Clone)]
pub struct ReceptionReader(Arc<Shared>);

impl ReceptionReader {
    /// The last sender report of each SSRC on the RTCP flow `rtcp_flow_id`: (SSRC, middle 32
    /// bits of its NTP timestamp, when it was captured).
    pub fn sender_reports(&self, rtcp_flow_id: u64) -> Vec<(u32, u32, SystemTime)> {
        self.0
            .sender_reports
            .lock()
            .ok()
            .and_then(|m| {
                m.get(&rtcp_flow_id).map(|r| {
                    r.iter()
                        .map(|(ssrc, (lsr, at))| (*ssrc, *lsr, *at))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    pub fn reception(&self, flow_id: u64) -> Vec<SsrcStats> {
        self.0
            .reception
            .lock()
            .ok()
            .and_then(|m| m.get(&flow_id).cloned())
            .unwrap_or_default()
    }
}

/// Control side of the writer (owned by the daemon/signaling).
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    spool: PathBuf,
    min_free_bytes: u64,
    thread: Option<JoinHandle<()>>,
}

/// The capture side: a [`PacketSink`] that queues packets to the writer thread. Clone it for
/// several capture tasks (they share the queue bound and the counters).
///
/// Packets are sent to the writer thread in batches: at every [`PacketSink::batch_end`] (the
/// ring consumer calls it after each drain, before it delivers an event) and every
/// [`BATCH_PACKETS`] packets; dropping the sink sends what it holds.
pub struct WriterSink {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    capacity: usize,
    /// Drops per flow id since the last `batch_end`.
    drops: HashMap<u64, u64>,
    /// Packets not sent yet.
    batch: PacketBatch,
    /// Packets taken and dropped since the counters were last published.
    packets_in: u64,
    queue_full: u64,
}

/// Creates the spool if needed, opens the index (rebuilding it if missing or corrupt, refreshing
/// the rows a previous run left active) and spawns the writer thread. Run [`repair_spool`] before.
pub fn start(config: WriterConfig) -> Result<(WriterHandle, WriterSink), WriterError> {
    start_inner(config, None)
}

/// [`start`], going on with the recordings of `handover` (from [`WriterHandle::handover`] of the
/// previous writer on this spool): their files are reopened and written after their last byte,
/// the WAV stays aligned to its start time, RTP loss and jitter accounting go on, and their
/// flows are routed before any packet is taken. A recording whose files are missing or were
/// changed is repaired and marked `interrupted` (`end_reason: resume_failed`, with a warning);
/// the others go on. Run [`repair_spool_except`] with [`WriterHandover::recording_ids`] before.
pub fn start_resumed(
    config: WriterConfig,
    handover: WriterHandover,
) -> Result<(WriterHandle, WriterSink), WriterError> {
    if handover.version != HANDOVER_VERSION {
        return Err(WriterError::HandoverVersion {
            found: handover.version,
            known: HANDOVER_VERSION,
        });
    }
    start_inner(config, Some(handover))
}

fn start_inner(
    config: WriterConfig,
    handover: Option<WriterHandover>,
) -> Result<(WriterHandle, WriterSink), WriterError> {
    std::fs::create_dir_all(&config.spool).map_err(|source| WriterError::Io {
        op: "create spool",
        path: config.spool.clone(),
        source,
    })?;
    let location = match (&config.index_url, &config.index) {
        (Some(url), _) => Some(IndexLocation::Postgres(url.clone())),
        (None, Some(db)) => Some(IndexLocation::Sqlite(db.clone())),
        (None, None) => None,
    };
    let index = match location {
        // On a thread of its own: the PostgreSQL client blocks on a runtime of its own, which
        // cannot be started on a thread of the daemon's runtime (start is called from there).
        Some(location) => Some(std::thread::scope(|s| {
            s.spawn(|| {
                let mut index = Index::open_location(&location, &config.spool, &config.host)?;
                index.refill_if_empty()?;
                // Rows left `active` by the previous run now say what repair_spool made of them.
                index.refresh_active()?;
                Ok::<_, WriterError>(index)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?),
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared::default());
    let files = FileQueue::spawn(shared.metadata_write_failed.clone()).map_err(|source| {
        WriterError::Io {
            op: "spawn file thread",
            path: config.spool.clone(),
            source,
        }
    })?;
    let mut writer = Writer {
        files,
        policy: RetentionPolicy {
            max_age: config.retention_max_age,
            max_bytes: config.retention_max_bytes,
        },
        config: config.clone(),
        shared: shared.clone(),
        recordings: Recordings::default(),
        flows: FlowRoutes::default(),
        slot_flows: HashMap::new(),
        index,
        pending: std::collections::VecDeque::new(),
        max_routed_flow: 0,
    };
    if let Some(h) = handover {
        writer.resume(h);
    }
    let thread = std::thread::Builder::new()
        .name("rec-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(|source| WriterError::Io {
            op: "spawn writer thread",
            path: config.spool.clone(),
            source,
        })?;
    let handle = WriterHandle {
        tx: tx.clone(),
        shared: shared.clone(),
        spool: config.spool.clone(),
        min_free_bytes: config.min_free_bytes,
        thread: Some(thread),
    };
    let sink = WriterSink {
        tx,
        shared,
        capacity: config.queue_packets.max(1),
        drops: HashMap::new(),
        batch: PacketBatch::default(),
        packets_in: 0,
        queue_full: 0,
    };
    Ok((handle, sink))
}

impl WriterHandle {
    /// Replaces the retention limits (configuration reload); the next
    /// [`Self::enforce_retention`] applies them.
    pub fn set_retention(&self, max_age: Option<Duration>, max_bytes: Option<u64>) {
        let policy = retention::RetentionPolicy { max_age, max_bytes };
        if self.tx.send(Msg::SetRetention(policy)).is_err() {
            warn!("writer thread stopped; retention change dropped");
        }
    }

    /// Hands a signaling event to the writer thread (never blocks).
    pub fn event(&self, ev: SessionEvent) {
        if self.tx.send(Msg::Event(Box::new(ev))).is_err() {
            warn!("writer thread stopped; event dropped");
        }
    }

    /// Returns once everything sent before (events, packets) has been processed. Blocks: from
    /// async code, call it in `spawn_blocking` (as [`Self::enforce_retention`]).
    pub fn sync(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    pub fn stats(&self) -> WriterStats {
        let s = &self.shared;
        WriterStats {
            packets_in: s.packets_in.load(Relaxed),
            queue_full: s.queue_full.load(Relaxed),
            unknown_flow: s.unknown_flow.load(Relaxed),
            pcap_write_failed: s.pcap_write_failed.load(Relaxed),
            wav_write_failed: s.wav_write_failed.load(Relaxed),
            start_failed: s.start_failed.load(Relaxed),
            unknown_recording_events: s.unknown_recording_events.load(Relaxed),
            index_errors: s.index_errors.load(Relaxed),
            active_recordings: s.active.load(Relaxed),
            completed_recordings: s.completed.load(Relaxed),
            queued_packets: s.queued.load(Relaxed) as u64,
            bytes_written: s.bytes_written.load(Relaxed),
            write_latency: s.write_latency.snapshot(),
            metadata_write_failed: s.metadata_write_failed.load(Relaxed),
        }
    }

    /// False when the spool's free space is below `min_free_bytes` (or cannot be read):
    /// signaling answers new recording INVITEs with 503.
    /// The reception statistics of a live stream, one per SSRC heard, by its RTP flow id
    /// (empty for an unknown or ended flow). At most [`RECEPTION_INTERVAL`] old.
    pub fn reception(&self, flow_id: u64) -> Vec<SsrcStats> {
        self.reception_reader().reception(flow_id)
    }

    /// A cheap handle for reading [`WriterHandle::reception`] from another task.
    pub fn reception_reader(&self) -> ReceptionReader {
        ReceptionReader(self.shared.clone())
    }

    pub fn can_accept_new_session(&self) -> bool {
        free_bytes(&self.spool).is_some_and(|free| free >= self.min_free_bytes)
    }

    /// Applies the retention limits of the config (on the writer thread, which also removes the
    /// deleted recordings from the index). Returns the ids deleted. Blocks until done.
    pub fn enforce_retention(&self) -> Result<Vec<String>, WriterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Retention(tx))
            .map_err(|_| WriterError::Stopped)?;
        rx.recv().map_err(|_| WriterError::Stopped)?
    }

    /// Stops the writer without ending its recordings, for the next daemon to go on with them
    /// ([`start_resumed`]). Everything sent before (events, packets) is written first; then each
    /// active recording's pcap and WAV are synced and cut to their length (valid for any reader),
    /// its `metadata.json` is written (still `active`, index row too) and its state captured.
    /// Stop capture first: packets sent to the sink after this returns are counted as dropped.
    pub fn handover(mut self) -> Result<WriterHandover, WriterError> {
        let Some(thread) = self.thread.take() else {
            return Err(WriterError::Stopped);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = self.tx.send(Msg::Handover(tx)).is_ok();
        let reply = if sent { rx.recv().ok() } else { None };
        if thread.join().is_err() {
            warn!("writer thread panicked");
        }
        reply.ok_or(WriterError::Stopped)
    }

    /// Ends every active recording (`end_reason: shutdown`), flushes and closes all files, and
    /// waits for the writer thread. Packets still queued are written first. Dropping the handle
    /// does the same.
    pub fn shutdown(mut self) -> WriterStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.tx.send(Msg::Shutdown);
            if t.join().is_err() {
                warn!("writer thread panicked");
            }
        }
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Clone for WriterSink {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            capacity: self.capacity,
            drops: HashMap::new(),
            batch: PacketBatch::default(),
            packets_in: 0,
            queue_full: 0,
        }
    }
}

impl WriterSink {
    /// Sends the packets held, then publishes the counters.
    fn send_batch(&mut self) {
        let n = self.batch.len();
        if n > 0 {
            let spare = self
                .shared
                .spare_batches
                .lock()
                .ok()
                .and_then(|mut v| v.pop())
                .unwrap_or_else(PacketBatch::with_capacity);
            let batch = std::mem::replace(&mut self.batch, spare);
            self.shared.queued.fetch_add(n, Relaxed);
            if self.tx.send(Msg::Packets(batch)).is_err() {
                // The writer thread has stopped (shutdown): nothing will take packets any more.
                self.shared.queued.fetch_sub(n, Relaxed);
                self.queue_full += n as u64;
            }
        }
        if self.packets_in > 0 {
            self.shared.packets_in.fetch_add(self.packets_in, Relaxed);
            self.packets_in = 0;
        }
        if self.queue_full > 0 {
            self.shared.queue_full.fetch_add(self.queue_full, Relaxed);
            self.queue_full = 0;
        }
    }
}

impl PacketSink for WriterSink {
    fn packet(&mut self, p: &CapturedPacket<'_>) {
        self.packets_in += 1;
        if self.shared.queued.load(Relaxed) + self.batch.len() >= self.capacity {
            self.queue_full += 1;
            *self.drops.entry(p.header.flow_id).or_default() += 1;
            return;
        }
        self.batch.push(p);
        if self.batch.len() >= BATCH_PACKETS {
            self.send_batch();
        }
    }

    fn batch_end(&mut self) {
        self.send_batch();
        if !self.drops.is_empty() {
            let _ = self.tx.send(Msg::QueueDrops(self.drops.drain().collect()));
        }
    }
}

impl Drop for WriterSink {
    fn drop(&mut self) {
        self.batch_end();
    }
}

/// Free bytes for unprivileged users on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail * st.f_frsize)
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// State of the writer thread.
struct Writer {
    /// The thread replacing `metadata.json` files (fsync off the packet path).
    files: FileQueue,
    config: WriterConfig,
    policy: RetentionPolicy,
    shared: Arc<Shared>,
    recordings: Recordings,
    /// flow id -> (recording slot, stream index, is RTCP).
    flows: FlowRoutes,
    /// recording slot -> the flow ids routed to it, so that routing or ending one recording
    /// touches its own routes only (a pass over all of them cost 5 % of the daemon's CPU per new
    /// session at 10 000 sessions).
    slot_flows: HashMap<usize, Vec<u64>>,
    index: Option<Index>,
    /// Packets of flows newer than any routed yet, waiting for their event (arrival, packet).
    pending: std::collections::VecDeque<(Instant, OwnedPacket)>,
    /// Highest flow id ever routed (signaling hands out flow ids in increasing order).
    max_routed_flow: u64,
}

/// Per-batch counts of the writer thread, added to the shared counters once per batch.
#[derive(Default)]
struct Tally {
    /// Packets handed to a recording.
    stored: u64,
    bytes: u64,
    unknown_flow: u64,
    pcap_write_failed: u64,
    wav_write_failed: u64,
}

impl Tally {
    fn publish(&self, shared: &Shared, elapsed: Duration) {
        shared.write_latency.observe_batch(elapsed, self.stored);
        for (cell, n) in [
            (&shared.bytes_written, self.bytes),
            (&shared.unknown_flow, self.unknown_flow),
            (&shared.pcap_write_failed, self.pcap_write_failed),
            (&shared.wav_write_failed, self.wav_write_failed),
        ] {
            if n > 0 {
                cell.fetch_add(n, Relaxed);
            }
        }
    }
}

/// Metadata files a flush may always rewrite (more when many recordings need it).
pub const METADATA_WRITES_MIN: usize = 64;

/// Packets held at most for flows whose event has not arrived yet.
pub const PENDING_MAX: usize = 4096;
/// How long such a packet is held before it counts as an unknown flow.
pub const PENDING_AGE: Duration = Duration::from_secs(1);

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let interval = self.config.flush_interval.max(Duration::from_millis(10));
        let mut next_flush = Instant::now() + interval;
        let mut next_publish = Instant::now() + RECEPTION_INTERVAL;
        let mut handover = None;
        loop {
            let wait = next_flush
                .min(next_publish)
                .saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Msg::Handover(reply)) => {
                    handover = Some(reply);
                    break;
                }
                Ok(msg) => self.handle(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_publish {
                self.publish_reception();
                next_publish = Instant::now() + RECEPTION_INTERVAL;
            }
            if Instant::now() >= next_flush {
                self.flush_all();
                next_flush = Instant::now() + interval;
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
        let now = SystemTime::now();
        if let Some(reply) = handover {
            let recordings: Vec<RecordingHandover> = self
                .recordings
                .take_all()
                .into_iter()
                .map(|rec| rec.handover(now))
                .collect();
            self.flows.clear();
            self.slot_flows.clear();
            self.files.barrier();
            info!(
                recordings = recordings.len(),
                "writer stopped for a handover"
            );
            let _ = reply.send(WriterHandover {
                version: HANDOVER_VERSION,
                max_routed_flow: self.max_routed_flow,
                recordings,
            });
            return;
        }
        let ids = self.recordings.ids();
        for id in ids {
            self.end(&id, now, "shutdown", None);
        }
        self.files.barrier();
        info!("writer stopped");
    }

    /// Goes on with the recordings of a handover (see [`start_resumed`]).
    fn resume(&mut self, h: WriterHandover) {
        self.max_routed_flow = self.max_routed_flow.max(h.max_routed_flow);
        let floor = self
            .config
            .media_floor_bytes
            .min(self.config.min_free_bytes / 2);
        for state in h.recordings {
            let id = state.meta.id.clone();
            let (dir, mut meta) = (state.dir.clone(), state.meta.clone());
            match Recording::resume(state, floor) {
                Ok(mut rec) => {
                    self.schedule_metadata(&mut rec);
                    rec.files = Some(self.files.clone());
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
                                if let Some(index) = self.index.as_mut() {
                                    let _ = index.remove(&id);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Replaces the shared reception snapshot (ended recordings and removed streams drop out).
    fn publish_reception(&self) {
        if let Ok(mut reports) = self.shared.sender_reports.lock() {
            reports.retain(|flow, _| self.flows.contains_key(flow));
        }
        let fresh: HashMap<u64, Vec<SsrcStats>> = self
            .recordings
            .values()
            .flat_map(|r| r.reception())
            .map(|(flow, s)| (flow, s.to_vec()))
            .collect();
        if let Ok(mut m) = self.shared.reception.lock() {
            *m = fresh;
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Packets(batch) => {
                self.shared.queued.fetch_sub(batch.len(), Relaxed);
                let started = Instant::now();
                let mut tally = Tally::default();
                for p in batch.iter() {
                    self.packet(&p, &mut tally);
                }
                tally.publish(&self.shared, started.elapsed());
                if let Ok(mut spare) = self.shared.spare_batches.lock() {
                    if spare.len() < SPARE_BATCHES {
                        let mut batch = batch;
                        batch.clear();
                        spare.push(batch);
                    }
                }
            }
            Msg::Event(ev) => self.event(*ev),
            Msg::QueueDrops(drops) => {
                for (flow, n) in drops {
                    if let Some(rec) = self
                        .flows
                        .get(&flow)
                        .and_then(|r| self.recordings.slot_mut(r.slot))
                    {
                        // The first drops are news; more of them wait for the next refresh.
                        rec.urgent |= rec.drops().queue_full == 0;
                        rec.drops().queue_full += n;
                        rec.dirty = true;
                    }
                }
            }
            Msg::Sync(reply) => {
                // Files queued before are written too (callers read them next).
                self.files.barrier();
                let _ = reply.send(());
            }
            Msg::Retention(reply) => {
                // Retention reads the states in metadata.json: they must be current.
                self.files.barrier();
                let _ = reply.send(self.retention());
            }
            Msg::SetRetention(policy) => self.policy = policy,
            Msg::Shutdown | Msg::Handover(_) => {}
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
        let started = Instant::now();
        let mut tally = Tally::default();
        for (at, p) in std::mem::take(&mut self.pending) {
            if self.flows.contains_key(&p.header.flow_id) {
                self.packet(&p.as_captured(), &mut tally);
            } else {
                self.pending.push_back((at, p));
            }
        }
        tally.publish(&self.shared, started.elapsed());
    }

    /// Stores one packet; the shared counters are updated per batch, from `tally`.
    fn packet(&mut self, p: &CapturedPacket<'_>, tally: &mut Tally) {
        let Some(&Route { slot, stream, rtcp }) = self.flows.get(&p.header.flow_id) else {
            if p.header.flow_id > self.max_routed_flow {
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
            note_sender_report(&self.shared, p);
        }
        let failed = rec.packet(stream, rtcp, p);
        rec.dirty = true;
        tally.stored += 1;
        tally.bytes += failed.bytes;
        tally.pcap_write_failed += u64::from(failed.pcap);
        tally.wav_write_failed += u64::from(failed.wav);
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
                floor: self
                    .config
                    .media_floor_bytes
                    .min(self.config.min_free_bytes / 2),
                files: Some(self.files.clone()),
            };
            match Recording::create(&self.config.spool, start) {
                Ok(mut rec) => {
                    self.schedule_metadata(&mut rec);
                    link(self.index.as_mut(), &self.shared, &mut rec);
                    rec.write_metadata(*at);
                    self.index_update(rec.metadata());
                    let slot = self.recordings.insert(rec);
                    self.route(slot);
                    self.replay_pending();
                    self.shared.active.fetch_add(1, Relaxed);
                    info!(recording = %id, "recording started");
                }
                Err(e) => {
                    self.shared.start_failed.fetch_add(1, Relaxed);
                    warn!(recording = %id, error = %e, "cannot create recording");
                }
            }
            return;
        }
        if let SessionEvent::Ended { at, reason, .. } = &ev {
            let detail = match reason {
                crate::events::EndReason::Bye { reason } => reason.clone(),
                crate::events::EndReason::Error { detail } => Some(detail.clone()),
                _ => None,
            };
            if !self.end(&id, *at, reason.name(), detail) {
                self.shared.unknown_recording_events.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some(rec) = self.recordings.get_mut(&id) else {
            warn!(recording = %id, "event for an unknown recording");
            self.shared.unknown_recording_events.fetch_add(1, Relaxed);
            return;
        };
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
                if !had_uuid && rec.metadata().call_uuid.is_some() {
                    // The CallUUID came late (metadata in a re-INVITE): link now.
                    link(self.index.as_mut(), &self.shared, rec);
                }
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
        let Some(slot) = self.recordings.slot_of(&id) else {
            return;
        };
        if let (Some(index), Some(rec)) = (self.index.as_mut(), self.recordings.slot(slot)) {
            if let Err(e) = index.upsert_from_metadata(rec.metadata()) {
                self.shared.index_errors.fetch_add(1, Relaxed);
                warn!(recording = %id, error = %e, "index update failed");
            }
        }
        self.route(slot);
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

    fn end(&mut self, id: &str, at: SystemTime, reason: &str, detail: Option<String>) -> bool {
        let Some((slot, rec)) = self.recordings.remove(id) else {
            return false;
        };
        self.unroute(slot);
        let meta = rec.finish(at, reason, detail);
        self.index_update(&meta);
        self.shared.active.fetch_sub(1, Relaxed);
        self.shared.completed.fetch_add(1, Relaxed);
        info!(recording = %id, reason, "recording ended");
        true
    }

    fn flush_all(&mut self) {
        let now = SystemTime::now();
        let tick = Instant::now();
        let interval = self.config.metadata_interval.max(Duration::from_millis(10));
        // (urgent first, then the most overdue) among the recordings whose metadata is due.
        let mut due: Vec<(bool, Instant, usize)> = Vec::new();
        for (slot, rec) in self.recordings.iter_mut() {
            if !(rec.dirty || rec.urgent) {
                continue;
            }
            rec.flush_media();
            if rec.urgent || tick >= rec.next_meta {
                due.push((!rec.urgent, rec.next_meta, slot));
            }
        }
        // Twice the rate that refreshes every recording once per interval: bursts (thousands
        // of recordings started together, or all hit by the same drops) spread over flushes.
        let flush = self.config.flush_interval.max(Duration::from_millis(10));
        let average = self.recordings.len() as f64 * flush.as_secs_f64() / interval.as_secs_f64();
        let budget = METADATA_WRITES_MIN.max(2 * average.ceil() as usize);
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

    /// First counter refresh of a new (or resumed) recording: at a point of the interval that
    /// depends on its id, so that recordings started together do not all rewrite their
    /// metadata (one fsync each) in the same flush.
    fn schedule_metadata(&self, rec: &mut Recording) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rec.id().hash(&mut h);
        let frac = (h.finish() % 1024) as f64 / 1024.0;
        let interval = self.config.metadata_interval;
        rec.next_meta = Instant::now() + interval.mul_f64(frac);
    }

    fn index_update(&mut self, meta: &RecordingMetadata) {
        if let Some(index) = self.index.as_mut() {
            if let Err(e) = index.upsert_from_metadata(meta) {
                self.shared.index_errors.fetch_add(1, Relaxed);
                warn!(recording = %meta.id, error = %e, "index update failed");
            }
        }
    }

    fn retention(&mut self) -> Result<Vec<String>, WriterError> {
        let deleted = enforce_retention(&self.config.spool, self.policy, SystemTime::now())?;
        if let Some(index) = self.index.as_mut() {
            for id in &deleted {
                if let Err(e) = index.remove(id) {
                    self.shared.index_errors.fetch_add(1, Relaxed);
                    warn!(recording = %id, error = %e, "index removal failed");
                }
            }
        }
        Ok(deleted)
    }
}

/// Links a recording to the earlier recordings of its CallUUID in the index (`interaction`
/// and `previous` in its metadata), so that a continuation at another site or after a
/// REFER transfer is visible as part of the same interaction.
fn link(index: Option<&mut Index>, shared: &Shared, rec: &mut Recording) {
    let Some(index) = index else {
        return;
    };
    match index.link_for(rec.metadata()) {
        Ok(Some((interaction, previous))) => {
            info!(recording = %rec.id(), %interaction, %previous, "continues an interaction");
            rec.link(interaction, previous);
        }
        Ok(None) => {}
        Err(e) => {
            shared.index_errors.fetch_add(1, Relaxed);
            warn!(recording = %rec.id(), error = %e, "index lookup for linking failed");
        }
    }
}
