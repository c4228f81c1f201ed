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
//!   or participant change, pause, end), at the next flush after the first write failures, and
//!   otherwise every `metadata_interval` (30 s) while its counters move;
//! * `metadata-<n>.xml`: each SIPREC metadata body as received.
//!
//! # Pipeline (one file per stage)
//! ```text
//!             route.rs              shard.rs (xK)            fileio.rs (xK)      indexer.rs
//! rings ─> WriterSink ──batches──> packet stage ──chunks──> file thread ──rows──> index thread
//!            (by recording)        encode/: pcap records,    write(2)/pwrite,    SQLite or
//! signaling ─> WriterHandle ─events─^  PCM into buffers      fsync, metadata     PostgreSQL
//! ```
//! * **route** ([`WriterSink`], [`WriterHandle`]): a recording belongs to one of `shards`
//!   shards (default: one per CPU) by a hash of its id; its events and packets go to that
//!   shard's queue, so its packets are written in arrival order. When a shard has
//!   `queue_packets` packets queued, the sink says it has no room and the ring consumer stops
//!   draining: nothing is dropped in userspace, records wait in the BPF rings.
//! * **encode** (`encode/`, on the shard's packet thread): a packet becomes a pcap record in
//!   its recording's buffer and, for G.711 audio, samples in the recording's WAV window in
//!   memory. No file is touched per packet.
//! * **file I/O** (`fileio.rs`, one thread per shard): full buffers (32 KiB of pcap, 1 s of
//!   WAV frames older than the 1.5 s window) are written with `write(2)`/`pwrite(2)`; quiet
//!   recordings flush once per `flush_interval` at a phase of their own; `metadata.json`
//!   replacements, the end of a recording (final WAV length, fsyncs, final metadata) too. Bytes
//!   queued to it are bounded (`file_queue_bytes`): past that, the shard waits (back-pressure
//!   again, ending in the rings).
//! * **index** (`indexer.rs`, one thread): rows are upserted there, coalesced per recording.
//!
//! What a crash loses: what the buffers held (at most about `flush_interval` of a recording's
//! media); the repair pass on the next start keeps everything that reached the files.
//! [`WriterHandle::sync`] hands every buffer to the file threads and waits for them.
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
//! The index is written only by the index thread; readers (control API, CLI) open their own
//! [`crate::index::Index`] on the same file (SQLite WAL allows concurrent readers).
//!
//! # Disk full
//! Media writes stop (counted, per recording and in [`WriterStats`]) when they would leave
//! less than `media_floor_bytes` free; what is written stays whole (a pcap append that does
//! not fit is cut back; the WAV is positional), and the floor leaves room to finish the files
//! and replace `metadata.json`. No file descriptor stays open per recording: each write opens
//! and closes its file (10 000 live recordings would otherwise need 20 000 descriptors).

pub mod encode;
mod fileio;
mod indexer;
pub mod metadata;
mod repair;
mod retention;
mod route;
mod shard;
mod slots;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::HashMap,
    ffi::CString,
    hash::{Hash, Hasher},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use self::{
    encode::recording::RecordingHandover,
    fileio::{FileQueue, IoCounters},
    indexer::{IndexJob, IndexQueue},
    route::{PacketBatch, Room, Router, ShardQueue},
    shard::{Msg, Shard},
};
pub use self::{
    encode::{dtmf, dtmf::DtmfEvent, rtp::SsrcStats},
    metadata::{RecordingMetadata, RecordingState},
    repair::{repair_spool, repair_spool_except, Repaired},
    retention::{enforce_retention, RetentionPolicy},
    route::{WriterSink, BATCH_PACKETS},
};
use crate::{
    capture::CapturedPacket,
    events::SessionEvent,
    index::{Index, IndexError, IndexLocation},
};
/// Writer settings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Directory holding one directory per recording.
    pub spool: PathBuf,
    /// How often a recording's buffers go to its file thread whether or not they are full (each
    /// recording at a phase of its own), and how often urgent metadata changes are written.
    pub flush_interval: Duration,
    /// How often the counters in a live recording's `metadata.json` are refreshed (spread over
    /// the interval by recording).
    pub metadata_interval: Duration,
    /// Below this many free bytes in the spool, [`WriterHandle::can_accept_new_session`] is false.
    pub min_free_bytes: u64,
    pub retention_max_age: Option<Duration>,
    pub retention_max_bytes: Option<u64>,
    /// Packets queued to one shard before the sink says it has no room (the ring consumer
    /// then stops draining; nothing is dropped in userspace).
    pub queue_packets: usize,
    /// Packet-stage threads (each with its own file thread); recordings are spread over them.
    pub shards: usize,
    /// Bytes of media and metadata queued to one file thread before its shard waits.
    pub file_queue_bytes: usize,
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
    /// What the pcap holds of SRTP streams (see [`encode::media::PcapSrtp`]).
    pub pcap_srtp: encode::media::PcapSrtp,
    /// Recordings whose `metadata.json` is (re)read into the index at the start: what
    /// [`repair_spool_except`] repaired (refreshing the rows left `active` misses those the
    /// index never got, such as a recording whose metadata repair had to rebuild).
    pub reindex: Vec<String>,
}

impl WriterConfig {
    /// Defaults: flush every 2 s, refuse below 256 MiB free, stop media writes below 16 MiB free,
    /// no retention, 65536 queued packets and 64 MiB of file work per shard, one shard per
    /// CPU, no index, the machine's host name.
    pub fn new(spool: PathBuf) -> Self {
        Self {
            spool,
            flush_interval: Duration::from_secs(2),
            metadata_interval: Duration::from_secs(30),
            min_free_bytes: 256 * 1024 * 1024,
            retention_max_age: None,
            retention_max_bytes: None,
            queue_packets: 65536,
            shards: default_shards(),
            file_queue_bytes: 64 << 20,
            index: None,
            index_url: None,
            host: hostname(),
            media_floor_bytes: 16 * 1024 * 1024,
            pcap_srtp: encode::media::PcapSrtp::Received,
            reindex: Vec::new(),
        }
    }
}

/// One shard per CPU this process may run on.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        source: std::io::Error,
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
    /// Packets whose flow id belongs to no active recording (late after `Ended`, or unknown).
    pub unknown_flow: u64,
    /// Packets not written to a pcap (disk full or write error).
    pub pcap_write_failed: u64,
    /// WAV chunks (up to a second of a recording's audio each) not written (disk full or write
    /// error).
    pub wav_write_failed: u64,
    /// `Started` events whose recording could not be created (disk full, bad id).
    pub start_failed: u64,
    /// Events about a recording the writer does not have.
    pub unknown_recording_events: u64,
    /// Index updates that failed.
    pub index_errors: u64,
    pub active_recordings: u64,
    pub completed_recordings: u64,
    /// Ended recordings waiting for their index link before they finish (a backlog here is the
    /// index thread falling behind).
    pub ended_awaiting_link: u64,
    /// Jobs (rows, links, removals) waiting for the index thread.
    pub index_queued: u64,
    /// Packets waiting in the queues to the shards right now.
    pub queued_packets: u64,
    /// Shards (packet-stage threads).
    pub shards: u64,
    /// Bytes written to recording files (pcap records and WAV samples).
    pub bytes_written: u64,
    /// Time the packet stage spent storing each packet (pcap record and WAV samples into the
    /// recording's buffers): measured per batch, each packet counting as the batch's mean.
    pub write_latency: LatencyHistogram,
    /// `metadata.json` replacements that failed (the previous file stays).
    pub metadata_write_failed: u64,
    /// SRTP/SRTCP packets that failed authentication (kept in the pcap, never decoded).
    pub srtp_auth_failed: u64,
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
pub(crate) struct LatencyCells {
    buckets: [AtomicU64; WRITE_LATENCY_BOUNDS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyCells {
    /// `n` packets stored in `total`: each counts as the mean (packets are timed per batch,
    /// not one by one: two clock reads per packet cost more than storing a G.711 packet).
    pub(crate) fn observe_batch(&self, total: Duration, n: u64) {
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

/// Counters and pools every stage shares.
#[derive(Default)]
pub(crate) struct Shared {
    pub packets_in: AtomicU64,
    pub unknown_flow: AtomicU64,
    pub start_failed: AtomicU64,
    pub unknown_recording_events: AtomicU64,
    pub index_errors: Arc<AtomicU64>,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    /// Ended recordings whose index link has not come back yet (they finish when it does).
    pub ended_awaiting_link: AtomicU64,
    /// Highest flow id signaling has introduced (signaling hands them out in increasing order):
    /// a packet of an unrouted flow above it is early (its event is on the way), below it late.
    pub max_flow: AtomicU64,
    pub write_latency: LatencyCells,
    pub io: Arc<IoCounters>,
    pub srtp_auth_failed: AtomicU64,
    /// Emptied batches handed back by the shards for the sink to fill again (their buffers stay
    /// allocated: no malloc/free of a quarter megabyte per batch).
    spare_batches: Mutex<Vec<PacketBatch>>,
}

/// Emptied batches kept for reuse.
const SPARE_BATCHES: usize = 64;

impl Shared {
    pub(crate) fn spare_batch(&self) -> PacketBatch {
        self.spare_batches
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_else(PacketBatch::with_capacity)
    }

    pub(crate) fn recycle(&self, mut batch: PacketBatch) {
        if let Ok(mut spare) = self.spare_batches.lock() {
            if spare.len() < SPARE_BATCHES {
                batch.clear();
                spare.push(batch);
            }
        }
    }
}

/// What one shard publishes for the RTCP receiver reports.
#[derive(Default)]
pub(crate) struct ShardShared {
    /// Reception statistics per live RTP flow id, republished every [`RECEPTION_INTERVAL`].
    pub reception: Mutex<HashMap<u64, Vec<SsrcStats>>>,
    /// SRTP/SRTCP authentication failures per live RTP flow id (same schedule).
    pub auth_failures: Mutex<HashMap<u64, u64>>,
    /// The last sender report per RTCP flow id and sender SSRC: (middle 32 bits of its NTP
    /// timestamp, capture time), for the LSR/DLSR of our receiver reports.
    pub sender_reports: Mutex<HashMap<u64, SenderReports>>,
}

impl ShardShared {
    /// Remembers a sender report (RTCP packets are captured like RTP: no socket reads them).
    pub(crate) fn note_sender_report(&self, p: &CapturedPacket<'_>) {
        let payload = p
            .frame
            .get(p.header.payload_offset as usize..)
            .unwrap_or(&[]);
        if let Some((ssrc, lsr)) = crate::rtcp::parse_sender_report(payload) {
            if let Ok(mut reports) = self.sender_reports.lock() {
                reports
                    .entry(p.header.flow_id)
                    .or_default()
                    .insert(ssrc, (lsr, p.wall));
            }
        }
    }
}

/// How often the shards republish their reception statistics: far below the 5 s RTCP
/// interval, far above the per-packet rate.
const RECEPTION_INTERVAL: Duration = Duration::from_millis(250);

/// Per sender SSRC: the middle 32 bits of the NTP timestamp of its last SR, and when it was
/// captured.
type SenderReports = HashMap<u32, (u32, SystemTime)>;

/// Reads the writer's reception statistics (see [`WriterHandle::reception`]).
#[derive(Clone)]
pub struct ReceptionReader(Arc<Vec<Arc<ShardShared>>>);

impl ReceptionReader {
    /// SRTP/SRTCP packets of the stream with RTP flow `flow_id` that failed authentication.
    pub fn auth_failures(&self, flow_id: u64) -> u64 {
        self.0
            .iter()
            .find_map(|s| s.auth_failures.lock().ok()?.get(&flow_id).copied())
            .unwrap_or(0)
    }

    /// The last sender report of each SSRC on the RTCP flow `rtcp_flow_id`: (SSRC, middle 32
    /// bits of its NTP timestamp, when it was captured).
    pub fn sender_reports(&self, rtcp_flow_id: u64) -> Vec<(u32, u32, SystemTime)> {
        self.0
            .iter()
            .find_map(|s| {
                let m = s.sender_reports.lock().ok()?;
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
            .iter()
            .find_map(|s| s.reception.lock().ok()?.get(&flow_id).cloned())
            .unwrap_or_default()
    }
}

/// Which shard owns each live recording and flow id (a reused flow id: the last one wins).
#[derive(Default)]
struct Owners {
    recordings: HashMap<String, (usize, Vec<u64>)>,
    flows: HashMap<u64, String>,
}

impl Owners {
    fn take_flows(&mut self, id: &str, flows: &[u64]) {
        for f in flows {
            self.flows.insert(*f, id.to_string());
        }
    }

    /// Forgets a recording; returns its shard and the flows it still owned.
    fn remove(&mut self, id: &str) -> Option<(usize, Vec<u64>)> {
        let (shard, flows) = self.recordings.remove(id)?;
        let owned = flows
            .into_iter()
            .filter(|f| self.flows.get(f).is_some_and(|o| o == id))
            .collect::<Vec<_>>();
        for f in &owned {
            self.flows.remove(f);
        }
        Some((shard, owned))
    }
}

/// One shard as the handle sees it.
struct ShardLink {
    tx: mpsc::Sender<Msg>,
    queue: Arc<ShardQueue>,
    thread: Option<JoinHandle<()>>,
}

/// Control side of the writer (owned by the daemon/signaling).
pub struct WriterHandle {
    shards: Vec<ShardLink>,
    router: Arc<Router>,
    /// Live recordings: their shard and the flow ids routed for them.
    owners: Mutex<Owners>,
    index: IndexQueue,
    /// An index is kept (the index thread links new recordings).
    indexed: bool,
    shared: Arc<Shared>,
    reception: ReceptionReader,
    spool: PathBuf,
    min_free_bytes: u64,
    policy: Mutex<RetentionPolicy>,
}

/// Metadata files a shard may always rewrite per flush interval (more when many recordings
/// need it).
pub const METADATA_WRITES_MIN: usize = 64;

/// Packets held at most for flows whose event has not arrived yet.
pub const PENDING_MAX: usize = 4096;
/// How long such a packet is held before it counts as an unknown flow.
pub const PENDING_AGE: Duration = Duration::from_secs(1);

/// Creates the spool if needed, opens the index (rebuilding it if missing or corrupt, refreshing
/// the rows a previous run left active) and spawns the shards and their file threads and the
/// index thread. Run [`repair_spool`] before.
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

/// Upserts the rows of the recordings `ids` from their `metadata.json` (those repaired before
/// the start); a failure is logged (the recordings stay on disk, a rebuild finds them).
fn reindex(index: &mut Index, spool: &Path, ids: &[String]) {
    let metas: Vec<metadata::RecordingMetadata> = ids
        .iter()
        .filter_map(|id| metadata::RecordingMetadata::read(&spool.join(id)).ok())
        .collect();
    if metas.is_empty() {
        return;
    }
    if let Err(e) = index.upsert_many(&metas.iter().collect::<Vec<_>>()) {
        tracing::warn!(recordings = metas.len(), error = %e, "cannot index the repaired recordings");
    }
}

/// The shard of a recording: a hash of its id.
fn shard_of(id: &str, shards: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as usize
}

fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> WriterError + 'a {
    move |source| WriterError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn start_inner(
    config: WriterConfig,
    handover: Option<WriterHandover>,
) -> Result<(WriterHandle, WriterSink), WriterError> {
    std::fs::create_dir_all(&config.spool).map_err(io_error("create spool", &config.spool))?;
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
                reindex(&mut index, &config.spool, &config.reindex);
                Ok::<_, WriterError>(index)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?),
        None => None,
    };
    let indexed = index.is_some();
    let shared = Arc::new(Shared::default());
    shared
        .max_flow
        .store(handover.as_ref().map_or(0, |h| h.max_routed_flow), Relaxed);
    let index_queue = IndexQueue::spawn(index, config.spool.clone(), shared.index_errors.clone())
        .map_err(io_error("spawn index thread", &config.spool))?;
    let n = config.shards.max(1);
    let room = Arc::new(Room::default());
    let router = Arc::new(Router::default());
    let mut owners = Owners::default();
    // A handover's recordings go back to the shards their ids hash to.
    let mut resumed: Vec<Vec<RecordingHandover>> = (0..n).map(|_| Vec::new()).collect();
    let max_routed = handover.as_ref().map_or(0, |h| h.max_routed_flow);
    for rec in handover.map(|h| h.recordings).unwrap_or_default() {
        let shard = shard_of(&rec.meta.id, n);
        let flows = rec.flow_ids();
        router.set(flows.iter().copied(), Some(shard as u16));
        owners.take_flows(&rec.meta.id, &flows);
        owners
            .recordings
            .insert(rec.meta.id.clone(), (shard, flows));
        resumed[shard].push(rec);
    }
    let mut shards = Vec::with_capacity(n);
    let mut own = Vec::with_capacity(n);
    let open_files = fileio::open_files_share(n);
    for (i, recordings) in resumed.into_iter().enumerate() {
        let files = FileQueue::spawn(
            format!("rec-files-{i}"),
            config.file_queue_bytes,
            open_files,
            shared.io.clone(),
        )
        .map_err(io_error("spawn file thread", &config.spool))?;
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(ShardQueue::new(config.queue_packets, room.clone()));
        let shard_shared = Arc::new(ShardShared::default());
        own.push(shard_shared.clone());
        if !recordings.is_empty() || max_routed > 0 {
            let _ = tx.send(Msg::Resume(recordings, max_routed));
        }
        let shard = Shard {
            files,
            index: indexed.then(|| index_queue.clone()),
            config: config.clone(),
            shared: shared.clone(),
            own: shard_shared,
            queue: queue.clone(),
            inbox: tx.clone(),
            recordings: Default::default(),
            flows: Default::default(),
            slot_flows: HashMap::new(),
            pending: Default::default(),
            max_routed_flow: 0,
            awaiting_link: Default::default(),
            ended_unlinked: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("rec-shard-{i}"))
            .spawn(move || shard.run(rx))
            .map_err(io_error("spawn shard thread", &config.spool))?;
        shards.push(ShardLink {
            tx,
            queue,
            thread: Some(thread),
        });
    }
    let sink = WriterSink {
        shards: shards
            .iter()
            .map(|s| (s.tx.clone(), s.queue.clone()))
            .collect(),
        shared: shared.clone(),
        router: router.clone(),
        room,
        routes: Default::default(),
        max_routed,
        batches: (0..n).map(|_| PacketBatch::default()).collect(),
        pending: Default::default(),
        packets_in: 0,
    };
    let handle = WriterHandle {
        shards,
        router,
        owners: Mutex::new(owners),
        index: index_queue,
        indexed,
        shared,
        reception: ReceptionReader(Arc::new(own)),
        spool: config.spool.clone(),
        min_free_bytes: config.min_free_bytes,
        policy: Mutex::new(RetentionPolicy {
            max_age: config.retention_max_age,
            max_bytes: config.retention_max_bytes,
        }),
    };
    Ok((handle, sink))
}

impl WriterHandle {
    /// Replaces the retention limits (configuration reload); the next
    /// [`Self::enforce_retention`] applies them.
    pub fn set_retention(&self, max_age: Option<Duration>, max_bytes: Option<u64>) {
        if let Ok(mut p) = self.policy.lock() {
            *p = RetentionPolicy { max_age, max_bytes };
        }
    }

    /// Hands a signaling event to the shard of its recording (never blocks). The event goes
    /// to the shard before the router learns the recording's new flows, so that a packet of
    /// those flows always reaches the shard after the event.
    pub fn event(&self, ev: SessionEvent) {
        let id = ev.recording_id().to_string();
        let n = self.shards.len();
        let Ok(mut owners) = self.owners.lock() else {
            return;
        };
        let (shard, new_flows, gone) = match &ev {
            SessionEvent::Started { streams, .. } => {
                let shard = shard_of(&id, n);
                let flows = stream_flows(streams);
                owners.take_flows(&id, &flows);
                owners.recordings.insert(id.clone(), (shard, flows.clone()));
                (shard, flows, Vec::new())
            }
            SessionEvent::MediaChanged { streams, .. } => match owners.recordings.get_mut(&id) {
                Some((shard, known)) => {
                    let shard = *shard;
                    let added: Vec<u64> = stream_flows(streams)
                        .into_iter()
                        .filter(|f| !known.contains(f))
                        .collect();
                    known.extend(&added);
                    owners.take_flows(&id, &added);
                    (shard, added, Vec::new())
                }
                None => (shard_of(&id, n), Vec::new(), Vec::new()),
            },
            SessionEvent::Ended { .. } => match owners.remove(&id) {
                Some((shard, flows)) => (shard, Vec::new(), flows),
                None => (shard_of(&id, n), Vec::new(), Vec::new()),
            },
            _ => (
                owners
                    .recordings
                    .get(&id)
                    .map_or_else(|| shard_of(&id, n), |o| o.0),
                Vec::new(),
                Vec::new(),
            ),
        };
        drop(owners);
        if let Some(&max) = new_flows.iter().max() {
            self.shared.max_flow.fetch_max(max, Relaxed);
        }
        if let SessionEvent::Started { ids, .. } = &ev {
            if ids.call_uuid.is_some() && self.indexed {
                self.index.send(IndexJob::Expect(id.clone()));
            }
        }
        if self.shards[shard]
            .tx
            .send(Msg::Event(Box::new(ev)))
            .is_err()
        {
            warn!("writer shard stopped; event dropped");
        }
        if n > 1 {
            if !new_flows.is_empty() {
                self.router.set(new_flows, Some(shard as u16));
            }
            if !gone.is_empty() {
                self.router.set(gone, None);
            }
        }
    }

    /// Returns once everything sent before (events, packets) has been processed and every
    /// recording's buffers are in its files. Blocks: from async code, call it in
    /// `spawn_blocking` (as [`Self::enforce_retention`]).
    pub fn sync(&self) {
        // Twice: the index thread's link replies queued behind the first round are handled
        // (and their metadata written) in the second.
        for _ in 0..2 {
            self.each_shard(Msg::Sync);
            self.index.barrier();
        }
    }

    /// Sends a request to every shard and waits for each reply.
    fn each_shard<T>(&self, msg: impl Fn(shard::Reply<T>) -> Msg) -> Vec<T> {
        let waits: Vec<_> = self
            .shards
            .iter()
            .filter_map(|s| {
                let (tx, rx) = mpsc::sync_channel(1);
                s.tx.send(msg(tx)).ok().map(|()| rx)
            })
            .collect();
        waits.into_iter().filter_map(|rx| rx.recv().ok()).collect()
    }

    /// Holds every file thread until the returned guards are dropped. For tests of
    /// back-pressure: packets must then wait (in the queues, then in the rings), never drop.
    pub fn hold_file_threads(&self) -> Vec<mpsc::Sender<()>> {
        self.each_shard(Msg::HoldFiles)
    }

    pub fn stats(&self) -> WriterStats {
        let s = &self.shared;
        WriterStats {
            packets_in: s.packets_in.load(Relaxed),
            unknown_flow: s.unknown_flow.load(Relaxed),
            pcap_write_failed: s.io.pcap_write_failed.load(Relaxed),
            wav_write_failed: s.io.wav_write_failed.load(Relaxed),
            start_failed: s.start_failed.load(Relaxed) + s.io.start_failed.load(Relaxed),
            unknown_recording_events: s.unknown_recording_events.load(Relaxed),
            index_errors: s.index_errors.load(Relaxed),
            active_recordings: s.active.load(Relaxed),
            completed_recordings: s.completed.load(Relaxed),
            ended_awaiting_link: s.ended_awaiting_link.load(Relaxed),
            index_queued: self.index.queued(),
            queued_packets: self
                .shards
                .iter()
                .map(|q| q.queue.queued.load(Relaxed) as u64)
                .sum(),
            shards: self.shards.len() as u64,
            bytes_written: s.io.bytes_written.load(Relaxed),
            write_latency: s.write_latency.snapshot(),
            metadata_write_failed: s.io.metadata_write_failed.load(Relaxed),
            srtp_auth_failed: s.srtp_auth_failed.load(Relaxed),
        }
    }

    /// The reception statistics of a live stream, one per SSRC heard, by its RTP flow id
    /// (empty for an unknown or ended flow). At most `RECEPTION_INTERVAL` (250 ms) old.
    pub fn reception(&self, flow_id: u64) -> Vec<SsrcStats> {
        self.reception.reception(flow_id)
    }

    /// See [`ReceptionReader::auth_failures`].
    pub fn auth_failures(&self, flow_id: u64) -> u64 {
        self.reception.auth_failures(flow_id)
    }

    /// A cheap handle for reading [`WriterHandle::reception`] from another task.
    pub fn reception_reader(&self) -> ReceptionReader {
        self.reception.clone()
    }

    /// False when the spool's free space is below `min_free_bytes` (or cannot be read):
    /// signaling answers new recording INVITEs with 503.
    pub fn can_accept_new_session(&self) -> bool {
        free_bytes(&self.spool).is_some_and(|free| free >= self.min_free_bytes)
    }

    /// Applies the retention limits (on the index thread, which also removes the deleted
    /// recordings from the index). Returns the ids deleted. Blocks until done.
    pub fn enforce_retention(&self) -> Result<Vec<String>, WriterError> {
        // Retention reads the states in metadata.json: they must be current.
        self.each_shard(Msg::Sync);
        let policy = self.policy.lock().map(|p| *p).unwrap_or_default();
        let (tx, rx) = mpsc::sync_channel(1);
        self.index.send(IndexJob::Retention { policy, reply: tx });
        rx.recv().map_err(|_| WriterError::Stopped)?
    }

    /// Stops the writer without ending its recordings, for the next daemon to go on with them
    /// ([`start_resumed`]). Everything sent before (events, packets) is written first; then each
    /// active recording's pcap and WAV are written, synced and cut to their length (valid for
    /// any reader), its `metadata.json` is written (still `active`, index row too) and its state
    /// captured. Stop capture first: packets sent to the sink after this returns are lost.
    pub fn handover(mut self) -> Result<WriterHandover, WriterError> {
        let replies = self.each_shard(Msg::Handover);
        if replies.len() != self.shards.len() {
            self.join();
            return Err(WriterError::Stopped);
        }
        self.join();
        self.index.barrier();
        let mut max_routed_flow = 0;
        let mut recordings = Vec::new();
        for (max, recs) in replies {
            max_routed_flow = max_routed_flow.max(max);
            recordings.extend(recs);
        }
        info!(
            recordings = recordings.len(),
            "writer stopped for a handover"
        );
        Ok(WriterHandover {
            version: HANDOVER_VERSION,
            max_routed_flow,
            recordings,
        })
    }

    /// Ends every active recording (`end_reason: shutdown`), flushes and closes all files, and
    /// waits for the shards. Packets still queued are written first. Dropping the handle does
    /// the same.
    pub fn shutdown(mut self) -> WriterStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        for s in &self.shards {
            let _ = s.tx.send(Msg::Shutdown);
        }
        if self.join() {
            self.index.barrier();
            info!("writer stopped");
        }
    }

    /// Waits for the shard threads; false when there were none left to wait for.
    fn join(&mut self) -> bool {
        let mut joined = false;
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                joined = true;
                if t.join().is_err() {
                    warn!("writer shard panicked");
                }
            }
        }
        joined
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The flow ids (RTP and RTCP) of a stream list.
fn stream_flows(streams: &[crate::events::StreamInfo]) -> Vec<u64> {
    streams
        .iter()
        .flat_map(|s| std::iter::once(s.flow_id).chain(s.rtcp_flow_id))
        .collect()
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
