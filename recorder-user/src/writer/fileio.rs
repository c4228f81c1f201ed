//! File I/O: the only code of the writer that touches recording files after they are created.
//!
//! Each shard's packet stage fills per-recording buffers in memory (pcap records, decoded PCM)
//! and hands full buffers to its file thread as [`Job`]s: appends to the pcap and positional
//! writes of WAV frames (`pwrite(2)`) with the header sizes,
//! `metadata.json` and SIPREC XML replacements, and the final `set_len` + fsync of a recording.
//! One FIFO per shard keeps the jobs of a recording in order.
//!
//! # Why write(2) from a thread, not a mapping
//! The mapped files of the previous writer put page faults, ext4 `page_mkwrite` and journal
//! waits on the packet thread: with thousands of recordings growing at once it stalled for
//! long enough to overflow its queue. Here the packet thread never enters the kernel for a
//! packet, and the file thread writes 0.5-1 s of a recording's media in one call.
//! `bench_file_io` in the tests measures the choices side by side at 18 000 files: a kept
//! descriptor + `pwrite` ~20 us per 32 KiB chunk, io_uring over kept descriptors the same (a
//! buffered write is the same page-cache copy), open + write + close per chunk ~10 % more, one
//! mapping per file grown by `fallocate` twice as much.
//!
//! # Back-pressure
//! Bytes queued to the file thread are bounded ([`FileQueue::new`]); a shard that would go past
//! the bound waits. Its own queue then fills, the ring consumer stops draining, and the BPF rings
//! are the only buffers that can overflow (counted per CPU and per flow by the XDP program).
//!
//! # Descriptors
//! A file thread keeps the descriptors of its live recordings' files open between chunks
//! ([`OpenFiles`]), up to a share of the process's descriptor limit: with thousands of live
//! recordings, opening each file per chunk (path walk, inode and dentry lookups) cost the file
//! thread more than writing the chunk. Past the share a file is opened and closed per job; a
//! file leaves the set when its recording finishes.
//!
//! # Disk full
//! A media job that would leave less than the floor free fails with `ENOSPC` as a whole: its
//! packets are counted (`pcap_write_failed` per stream, `wav_write_failed` per chunk), logged
//! once per recording, and what the files hold stays whole (a failed append is cut back to the
//! length before it; the WAV is positional, so a chunk not written reads as silence).

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc, Arc, Condvar, Mutex,
    },
};

use tracing::warn;

use super::{
    encode::recording::apply_failures,
    indexer::{IndexJob, IndexQueue},
    metadata::{replace_file, RecordingMetadata, PCAP_FILE, WAV_FILE},
};

/// Counters of all file threads, shared with [`super::WriterStats`].
#[derive(Default)]
pub(crate) struct IoCounters {
    pub pcap_write_failed: AtomicU64,
    pub wav_write_failed: AtomicU64,
    pub bytes_written: AtomicU64,
    pub metadata_write_failed: AtomicU64,
    /// Recordings whose directory or files could not be made ([`Job::Create`]).
    pub start_failed: AtomicU64,
}

/// What the file thread found writing one recording's media, read back by its packet stage
/// for `metadata.json`.
#[derive(Default)]
pub(crate) struct RecordingIo {
    /// Packets per stream whose pcap record was not written.
    pcap_failed: Mutex<Vec<u64>>,
    pcap_failed_total: AtomicU64,
    /// WAV chunks not written.
    wav_failed: AtomicU64,
    /// A media write error was logged for this recording (log once, count always).
    warned: AtomicBool,
    /// [`Job::Create`] failed: the recording has no files, and none of its jobs may touch
    /// the directory (it may be an earlier recording's).
    create_failed: AtomicBool,
}

impl RecordingIo {
    pub(crate) fn create_failed(&self) -> bool {
        self.create_failed.load(Relaxed)
    }

    fn count_pcap_failed(&self, per_stream: &[u32]) {
        if let Ok(mut failed) = self.pcap_failed.lock() {
            if failed.len() < per_stream.len() {
                failed.resize(per_stream.len(), 0);
            }
            for (f, n) in failed.iter_mut().zip(per_stream) {
                *f += u64::from(*n);
            }
        }
        let n: u64 = per_stream.iter().map(|&n| u64::from(n)).sum();
        self.pcap_failed_total.fetch_add(n, Relaxed);
    }

    pub(crate) fn pcap_failed_total(&self) -> u64 {
        self.pcap_failed_total.load(Relaxed)
    }

    pub(crate) fn pcap_failed(&self, stream: usize) -> u64 {
        self.pcap_failed
            .lock()
            .map(|v| v.get(stream).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub(crate) fn wav_failed(&self) -> u64 {
        self.wav_failed.load(Relaxed)
    }
}

/// Pcap records to append, with how many belong to each stream (for the failure counts).
pub(crate) struct PcapChunk {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub per_stream: Vec<u32>,
}

/// WAV frames to write at `offset`, and the header covering the frames written so far.
pub(crate) struct WavChunk {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub header: [u8; 44],
}

pub(crate) enum Job {
    /// Makes a new recording's directory (never an existing one: an earlier recording's files
    /// are never reused) with its pcap and WAV headers.
    Create {
        id: Arc<str>,
        io: Arc<RecordingIo>,
        dir: PathBuf,
        pcap_header: [u8; 24],
        wav_header: [u8; 44],
    },
    Media {
        id: Arc<str>,
        io: Arc<RecordingIo>,
        pcap: Option<PcapChunk>,
        wav: Option<WavChunk>,
        /// Free space the write must leave on the filesystem.
        floor: u64,
    },
    /// Cuts the WAV to `wav_len` bytes with its final header, and syncs both files.
    Finish {
        id: Arc<str>,
        io: Arc<RecordingIo>,
        pcap: Option<PathBuf>,
        wav: Option<(PathBuf, u64, [u8; 44])>,
    },
    /// Replaces a small file atomically (fsync before the rename when `sync`).
    Replace {
        path: PathBuf,
        bytes: Vec<u8>,
        id: Arc<str>,
        sync: bool,
        /// The recording the file belongs to (skipped when its directory was not created).
        io: Option<Arc<RecordingIo>>,
    },
    /// Writes the final `metadata.json` of an ended recording (after its `Finish`), with the
    /// failure counts of its last chunks, then its index row.
    Finalize {
        dir: PathBuf,
        meta: Box<RecordingMetadata>,
        io: Arc<RecordingIo>,
        index: Option<IndexQueue>,
    },
    Barrier(mpsc::SyncSender<()>),
    /// Holds the thread until the sender is dropped (tests of back-pressure).
    Hold(mpsc::Receiver<()>),
    /// Panics while it holds these bytes (tests of panic containment).
    #[cfg(test)]
    Panic(Vec<u8>),
}

impl Job {
    /// Bytes this job holds in memory while queued.
    fn weight(&self) -> usize {
        match self {
            Job::Media { pcap, wav, .. } => {
                pcap.as_ref().map_or(0, |p| p.bytes.len())
                    + wav.as_ref().map_or(0, |w| w.bytes.len())
            }
            Job::Replace { bytes, .. } => bytes.len(),
            #[cfg(test)]
            Job::Panic(bytes) => bytes.len(),
            _ => 0,
        }
    }
}

/// Bytes queued to a file thread, and a condition to wait for room.
#[derive(Default)]
struct InFlight {
    bytes: Mutex<usize>,
    room: Condvar,
}

/// Descriptors a file thread keeps open, by path: taken on first use while there is room, kept
/// until the recording finishes. No eviction: the chunks of thousands of recordings come round
/// robin, where a least-recently-used set smaller than the recordings would hit nothing.
#[derive(Default)]
pub(crate) struct OpenFiles {
    files: HashMap<PathBuf, File>,
    capacity: usize,
}

impl OpenFiles {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            files: HashMap::new(),
            capacity,
        }
    }

    /// Runs `f` on `path` opened for writing (kept open when there is room).
    fn with<T>(&mut self, path: &Path, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        if let Some(file) = self.files.get(path) {
            return f(file);
        }
        let file = OpenOptions::new().write(true).open(path)?;
        let out = f(&file);
        if self.files.len() < self.capacity {
            self.files.insert(path.to_path_buf(), file);
        }
        out
    }

    /// Adds a file just created (when there is room).
    fn keep(&mut self, path: PathBuf, file: File) {
        if self.files.len() < self.capacity {
            self.files.insert(path, file);
        }
    }

    /// Takes `path` out of the set: the open descriptor, if it was kept.
    fn take(&mut self, path: &Path) -> Option<File> {
        self.files.remove(path)
    }
}

/// Descriptors the file threads together keep open at most: a quarter of the soft limit (the
/// rest is for SIP connections, sockets and the files opened per job past the share).
pub(crate) fn open_files_share(threads: usize) -> usize {
    // SAFETY: getrlimit writes the struct it is given.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    let soft = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    (soft / 4 / threads.max(1)).min(MAX_OPEN_FILES)
}

/// Descriptors one file thread keeps open at most, whatever the limit.
const MAX_OPEN_FILES: usize = 1 << 16;

/// Where a shard queues its file work. Without a thread ([`FileQueue::inline`]: tests and
/// single-shot tools), jobs run on the calling thread.
#[derive(Clone)]
pub(crate) struct FileQueue {
    tx: Option<mpsc::Sender<Job>>,
    inflight: Arc<InFlight>,
    limit: usize,
    counters: Arc<IoCounters>,
    /// Emptied buffers handed back by the file thread for the packet stage to fill again.
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The file thread's open descriptors (used by that thread only; inline: none kept).
    open: Arc<Mutex<OpenFiles>>,
    /// Where the file thread hands recordings' endings (inline: run at once).
    endings: Arc<Endings>,
}

/// Synced replacements committed together at most.
const GROUP_MAX: usize = 512;
/// Threads that fsync one group's files at once: small files' fsyncs mostly wait on the
/// journal, so they overlap.
const GROUP_SYNC_THREADS: usize = 8;

/// Buffers kept for reuse per shard.
const POOL_MAX: usize = 256;

impl FileQueue {
    /// Spawns a file thread; at most `limit` bytes of jobs wait for it.
    /// It keeps up to `open_files` descriptors open ([`OpenFiles`]).
    pub(crate) fn spawn(
        name: String,
        limit: usize,
        open_files: usize,
        counters: Arc<IoCounters>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let queue = Self {
            tx: Some(tx),
            inflight: Arc::default(),
            limit: limit.max(1),
            endings: Endings::spawn(&name, counters.clone())?,
            counters,
            pool: Arc::default(),
            open: Arc::new(Mutex::new(OpenFiles::with_capacity(open_files))),
        };
        let worker = queue.clone_without_sender();
        std::thread::Builder::new().name(name).spawn(move || {
            // Ends when every queue (clone) is dropped.
            let mut next = None;
            while let Some(job) = next.take().or_else(|| rx.recv().ok()) {
                let mut weight = job.weight();
                // A panic loses this job (or group, or ending), not the thread: the bytes it
                // held are released below all the same, so the shards never wait forever.
                crate::contain::contain("file job", || {
                    worker.run_job(job, &rx, &mut next, &mut weight)
                });
                if weight > 0 {
                    let mut b = worker
                        .inflight
                        .bytes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    *b = b.saturating_sub(weight);
                    worker.inflight.room.notify_all();
                }
            }
            worker.endings.close();
        })?;
        Ok(queue)
    }

    /// What the file thread does with `job` taken off `rx` (with the jobs it takes along: a
    /// group of synced replacements, the Finalize behind a Finish); a job taken that does not
    /// belong goes to `next`, and the weight of the jobs taken along is added to `weight`.
    fn run_job(
        &self,
        job: Job,
        rx: &mpsc::Receiver<Job>,
        next: &mut Option<Job>,
        weight: &mut usize,
    ) {
        if matches!(job, Job::Replace { sync: true, .. }) {
            // Group commit: the synced replacements waiting in a row share one sync.
            let mut group = vec![job];
            while group.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(j @ Job::Replace { sync: true, .. }) => {
                        *weight += j.weight();
                        group.push(j);
                    }
                    Ok(other) => {
                        *next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.replace_group(group);
        } else if matches!(&job, Job::Finish { io, .. } if !io.create_failed()) {
            let Job::Finish { id, pcap, wav, .. } = job else {
                unreachable!("matched above")
            };
            let mut ending = {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                Ending::new(id.clone(), pcap, wav, &mut open)
            };
            // An ended recording's Finalize is queued right behind its Finish.
            match rx.recv_timeout(FINALIZE_WAIT) {
                Ok(Job::Finalize {
                    dir,
                    meta,
                    io,
                    index,
                }) if meta.id.as_str() == &*id && !io.create_failed() => {
                    ending.finalize = Some(Finalize {
                        dir,
                        meta,
                        io,
                        index,
                    });
                }
                Ok(other) => *next = Some(other),
                Err(_) => {}
            }
            self.endings.hand(ending, &self.counters);
        } else {
            self.execute(job);
        }
    }

    /// A queue that runs every job on the calling thread.
    pub(crate) fn inline(counters: Arc<IoCounters>) -> Self {
        Self {
            tx: None,
            inflight: Arc::default(),
            limit: usize::MAX,
            counters,
            pool: Arc::default(),
            open: Arc::default(),
            endings: Endings::inline(),
        }
    }

    fn clone_without_sender(&self) -> Self {
        Self {
            tx: None,
            inflight: self.inflight.clone(),
            limit: self.limit,
            counters: self.counters.clone(),
            pool: self.pool.clone(),
            open: self.open.clone(),
            endings: self.endings.clone(),
        }
    }

    /// A buffer to fill (from the pool when there is one).
    pub(crate) fn buffer(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        // Pooled buffers come in both sizes (pcap and WAV chunks): grow once, not by doubling.
        buf.reserve(capacity);
        buf
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < POOL_MAX {
                p.push(buf);
            }
        }
    }

    /// Queues a job; waits while the thread has `limit` bytes to write already. Runs it here
    /// when there is no thread (or it is gone).
    pub(crate) fn submit(&self, job: Job) {
        let Some(tx) = &self.tx else {
            self.execute(job);
            return;
        };
        let weight = job.weight();
        if weight > 0 {
            let mut b = self
                .inflight
                .bytes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            while *b > 0 && *b + weight > self.limit {
                b = self
                    .inflight
                    .room
                    .wait(b)
                    .unwrap_or_else(|e| e.into_inner());
            }
            *b += weight;
        }
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            self.execute(job);
        }
    }

    /// Replaces files durably as a group: every temporary file written, then fsynced by up to
    /// [`GROUP_SYNC_THREADS`] threads at once (one after another, thousands of new recordings'
    /// first `metadata.json` held the file thread up for seconds), then every rename. Not one
    /// `syncfs(2)`: that writes back every dirty page of the filesystem, the live recordings'
    /// media included (1 GB at 1 000 calls), and held the file thread, and through it the
    /// ring consumer, for 10-12 s in the faults bench. A file whose write fails keeps its
    /// previous version, as with one replacement.
    fn replace_group(&self, group: Vec<Job>) {
        if group.len() == 1 {
            return group.into_iter().for_each(|j| self.execute(j));
        }
        // The same file twice (two events of a recording): the later version only.
        let mut last = std::collections::HashMap::new();
        for (i, job) in group.iter().enumerate() {
            if let Job::Replace { path, .. } = job {
                last.insert(path.clone(), i);
            }
        }
        let mut written = Vec::with_capacity(group.len());
        for (i, job) in group.into_iter().enumerate() {
            if matches!(&job, Job::Replace { path, .. } if last.get(path) != Some(&i)) {
                continue;
            }
            let Job::Replace {
                path,
                bytes,
                id,
                io,
                ..
            } = job
            else {
                continue;
            };
            if io.is_some_and(|io| io.create_failed()) {
                self.counters.metadata_write_failed.fetch_add(1, Relaxed);
                continue;
            }
            let tmp = super::metadata::temp_path(&path);
            let write = File::create(&tmp).and_then(|mut f| {
                std::io::Write::write_all(&mut f, &bytes)?;
                Ok(f)
            });
            match write {
                Ok(f) => written.push((f, tmp, path, id)),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    self.counters.metadata_write_failed.fetch_add(1, Relaxed);
                    warn!(recording = %id, path = %path.display(), error = %e, "cannot write file");
                }
            }
        }
        write_back(written.iter().map(|(f, ..)| f));
        let threads = GROUP_SYNC_THREADS.min(written.len()).max(1);
        std::thread::scope(|scope| {
            if written.is_empty() {
                return;
            }
            for part in written.chunks(written.len().div_ceil(threads)) {
                scope.spawn(move || {
                    for (f, tmp, ..) in part {
                        if let Err(e) = f.sync_data() {
                            warn!(path = %tmp.display(), error = %e, "fsync failed; file replaced anyway");
                        }
                    }
                });
            }
        });
        for (_, tmp, path, id) in written {
            if let Err(e) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                self.counters.metadata_write_failed.fetch_add(1, Relaxed);
                warn!(recording = %id, path = %path.display(), error = %e, "cannot write file");
            }
        }
    }

    /// Returns once every job queued before is done.
    pub(crate) fn barrier(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = mpsc::sync_channel(1);
        if tx.send(Job::Barrier(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    fn execute(&self, job: Job) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let open = &mut *open;
        match job {
            Job::Create {
                id,
                io,
                dir,
                pcap_header,
                wav_header,
            } => {
                if let Err(e) = create_recording(&dir, &pcap_header, &wav_header, open) {
                    io.create_failed.store(true, Relaxed);
                    self.counters.start_failed.fetch_add(1, Relaxed);
                    warn!(recording = %id, dir = %dir.display(), error = %e, "cannot create recording; its media is counted as not written");
                }
            }
            Job::Media { io, pcap, wav, .. } if io.create_failed() => {
                if let Some(p) = pcap {
                    let n: u64 = p.per_stream.iter().map(|&n| u64::from(n)).sum();
                    io.count_pcap_failed(&p.per_stream);
                    self.counters.pcap_write_failed.fetch_add(n, Relaxed);
                    self.recycle(p.bytes);
                }
                if let Some(w) = wav {
                    io.wav_failed.fetch_add(1, Relaxed);
                    self.counters.wav_write_failed.fetch_add(1, Relaxed);
                    self.recycle(w.bytes);
                }
            }
            Job::Finish { io, .. } if io.create_failed() => {}
            Job::Replace { io: Some(io), .. } if io.create_failed() => {
                self.counters.metadata_write_failed.fetch_add(1, Relaxed);
            }
            Job::Finalize {
                io, meta, index, ..
            } if io.create_failed() => {
                // Nothing on disk: the row the start put in the index goes too.
                if let Some(index) = index {
                    index.send(IndexJob::Remove(meta.id.clone()));
                }
            }
            Job::Media {
                id,
                io,
                pcap,
                wav,
                floor,
            } => {
                if let Some(p) = pcap {
                    match open.with(&p.path, |f| append(f, &p.bytes, floor)) {
                        Ok(()) => {
                            self.counters
                                .bytes_written
                                .fetch_add(p.bytes.len() as u64, Relaxed);
                        }
                        Err(e) => {
                            let n: u64 = p.per_stream.iter().map(|&n| u64::from(n)).sum();
                            io.count_pcap_failed(&p.per_stream);
                            self.counters.pcap_write_failed.fetch_add(n, Relaxed);
                            if !io.warned.swap(true, Relaxed) {
                                warn!(recording = %id, error = %e, "pcap write failed; dropping packets");
                            }
                        }
                    }
                    self.recycle(p.bytes);
                }
                if let Some(w) = wav {
                    match open.with(&w.path, |f| write_wav(f, &w, floor)) {
                        Ok(()) => {
                            self.counters
                                .bytes_written
                                .fetch_add(w.bytes.len() as u64, Relaxed);
                        }
                        Err(e) => {
                            io.wav_failed.fetch_add(1, Relaxed);
                            self.counters.wav_write_failed.fetch_add(1, Relaxed);
                            if !io.warned.swap(true, Relaxed) {
                                warn!(recording = %id, error = %e, "wav write failed; dropping audio");
                            }
                        }
                    }
                    self.recycle(w.bytes);
                }
            }
            Job::Finish { id, pcap, wav, .. } => {
                Ending::new(id, pcap, wav, open).run(&self.counters)
            }
            Job::Replace {
                path,
                bytes,
                id,
                sync,
                ..
            } => {
                if let Err(e) = replace_file(&path, &bytes, sync) {
                    self.counters.metadata_write_failed.fetch_add(1, Relaxed);
                    warn!(recording = %id, path = %path.display(), error = %e, "cannot write file");
                }
            }
            Job::Finalize {
                dir,
                meta,
                io,
                index,
            } => finalize(dir, meta, &io, index, &self.counters),
            Job::Barrier(done) => {
                // Endings handed to the sync threads are part of what came before.
                self.endings.wait_idle();
                let _ = done.send(());
            }
            Job::Hold(release) => {
                let _ = release.recv();
            }
            #[cfg(test)]
            Job::Panic(bytes) => panic!("test job holding {} bytes", bytes.len()),
        }
    }

    /// Holds this queue's thread until the returned sender is dropped: jobs queue up behind it
    /// (tests of back-pressure: the packet stage must wait, never drop).
    pub(crate) fn hold(&self) -> mpsc::Sender<()> {
        let (release, held) = mpsc::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Hold(held));
        }
        release
    }
}

/// The failure counts of a recording's last chunks, in its final metadata.
fn final_counts(meta: &mut RecordingMetadata, io: &RecordingIo) {
    apply_failures(meta, io);
    if meta.dropped.pcap_write_failed + meta.dropped.wav_write_failed > 0 {
        meta.notes
            .push("some media was not written (disk full or write error)".to_string());
    }
}

/// Writes the final `metadata.json` of an ended recording with the failure counts of its last
/// chunks, then sends its index row.
fn finalize(
    dir: PathBuf,
    mut meta: Box<RecordingMetadata>,
    io: &RecordingIo,
    index: Option<IndexQueue>,
    counters: &IoCounters,
) {
    final_counts(&mut meta, io);
    if let Err(e) = meta.write(&dir) {
        counters.metadata_write_failed.fetch_add(1, Relaxed);
        warn!(recording = %meta.id, error = %e, "cannot write metadata.json");
    }
    if let Some(index) = index {
        index.send(IndexJob::Upsert(meta));
    }
}

/// The last file work of a recording ([`Job::Finish`], and the [`Job::Finalize`] queued right
/// behind it): the WAV cut to its length with its final header, both files synced, then the
/// final `metadata.json` and the index row. It waits on the disk (fsyncs), so the file
/// thread hands it to its sync threads ([`Endings`]): hundreds of calls ending per second then
/// have their fsyncs in flight together, sharing journal commits, while the file thread goes
/// on writing the live recordings' media.
struct Ending {
    id: Arc<str>,
    wav: Option<(PathBuf, u64, [u8; 44], Option<File>)>,
    pcap: Option<(PathBuf, Option<File>)>,
    finalize: Option<Finalize>,
}

/// The fields of a [`Job::Finalize`].
struct Finalize {
    dir: PathBuf,
    meta: Box<RecordingMetadata>,
    io: Arc<RecordingIo>,
    index: Option<IndexQueue>,
}

impl Ending {
    /// Takes the recording's files out of `open` (the descriptors go with the ending).
    fn new(
        id: Arc<str>,
        pcap: Option<PathBuf>,
        wav: Option<(PathBuf, u64, [u8; 44])>,
        open: &mut OpenFiles,
    ) -> Self {
        Self {
            id,
            wav: wav.map(|(path, len, header)| {
                let f = open.take(&path);
                (path, len, header, f)
            }),
            pcap: pcap.map(|path| {
                let f = open.take(&path);
                (path, f)
            }),
            finalize: None,
        }
    }

    fn run(self, counters: &IoCounters) {
        let id = self.id;
        #[cfg(test)]
        if &*id == PANICKING_ENDING {
            panic!("test ending");
        }
        if let Some((path, len, header, f)) = self.wav {
            let done = (|| {
                let f = match f {
                    Some(f) => f,
                    None => OpenOptions::new().write(true).open(&path)?,
                };
                f.set_len(len)?;
                f.write_all_at(&header, 0)?;
                f.sync_all()?;
                drop_cached(&f);
                Ok::<_, io::Error>(())
            })();
            if let Err(e) = done {
                warn!(recording = %id, error = %e, "cannot finish wav");
            }
        }
        if let Some((path, f)) = self.pcap {
            let f = f.map_or_else(|| File::open(&path), Ok);
            if let Err(e) = f.and_then(|f| f.sync_all().map(|()| drop_cached(&f))) {
                warn!(recording = %id, error = %e, "cannot finish pcap");
            }
        }
        if let Some(f) = self.finalize {
            finalize(f.dir, f.meta, &f.io, f.index, counters);
        }
    }
}

/// Endings taken together by a sync thread at most.
const ENDING_BATCH: usize = 512;

/// Runs endings together, in three passes: every WAV cut with its final header and every
/// final `metadata.json` written to its temporary file; then every file synced; then every
/// rename and index row. On a journaled filesystem the first fsync commits the changes of the
/// whole batch and the others find them committed: about one journal commit and disk flush
/// per batch instead of three per recording (at 800 calls/s the fsyncs one ending at a time left
/// the last files 2-3 minutes behind the last BYE). A recording's metadata still says
/// `complete` only once its media is on disk.
fn run_endings(batch: Vec<Ending>, counters: &IoCounters) {
    if batch.len() == 1 {
        return batch.into_iter().for_each(|e| e.run(counters));
    }
    /// The written temporary file, where it goes, and the index row.
    struct FinalMetadata(
        File,
        PathBuf,
        PathBuf,
        Box<RecordingMetadata>,
        Option<IndexQueue>,
    );
    struct Staged {
        id: Arc<str>,
        files: Vec<(&'static str, File)>,
        metadata: Option<FinalMetadata>,
    }
    let mut staged = Vec::with_capacity(batch.len());
    for ending in batch {
        let id = ending.id.clone();
        #[cfg(test)]
        if &*id == PANICKING_ENDING {
            panic!("test ending");
        }
        let mut files = Vec::with_capacity(2);
        if let Some((path, len, header, f)) = ending.wav {
            let cut = (|| {
                let f = match f {
                    Some(f) => f,
                    None => OpenOptions::new().write(true).open(&path)?,
                };
                f.set_len(len)?;
                f.write_all_at(&header, 0)?;
                Ok::<_, io::Error>(f)
            })();
            match cut {
                Ok(f) => files.push(("wav", f)),
                Err(e) => warn!(recording = %id, error = %e, "cannot finish wav"),
            }
        }
        if let Some((path, f)) = ending.pcap {
            match f.map_or_else(|| File::open(&path), Ok) {
                Ok(f) => files.push(("pcap", f)),
                Err(e) => warn!(recording = %id, error = %e, "cannot finish pcap"),
            }
        }
        let metadata = ending.finalize.and_then(|f| {
            let Finalize {
                dir,
                mut meta,
                io,
                index,
            } = f;
            final_counts(&mut meta, &io);
            let path = dir.join(super::metadata::METADATA_FILE);
            let tmp = super::metadata::temp_path(&path);
            let written = serde_json::to_vec_pretty(&meta)
                .map_err(io::Error::other)
                .and_then(|bytes| {
                    let mut f = File::create(&tmp)?;
                    f.write_all(&bytes)?;
                    Ok(f)
                });
            match written {
                Ok(file) => Some(FinalMetadata(file, tmp, path, meta, index)),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    counters.metadata_write_failed.fetch_add(1, Relaxed);
                    warn!(recording = %meta.id, error = %e, "cannot write metadata.json");
                    // The index still learns how the recording ended.
                    if let Some(index) = index {
                        index.send(IndexJob::Upsert(meta));
                    }
                    None
                }
            }
        });
        staged.push(Staged {
            id,
            files,
            metadata,
        });
    }
    // Delayed allocation: a file's blocks are allocated when its pages are written back, a
    // journal change of its own, and an fsync doing that writeback waited for a commit per
    // file. Written back first, every allocation lands in the transaction the first fsync
    // commits; the other fsyncs find theirs committed.
    write_back(staged.iter().flat_map(|s| {
        s.files
            .iter()
            .map(|(_, f)| f)
            .chain(s.metadata.as_ref().map(|m| &m.0))
    }));
    // One syncfs for the batch: an fsync per file also flushed the device's cache once per
    // file (three per recording; on the bench's loop device each flush is an fsync of the
    // image), and the data is written back already. The live recordings' media costs it
    // little: it is written behind a chunk at a time (see `write_behind`). Errors cannot be
    // told apart by file there: if it fails, every file is synced on its own and its error
    // logged.
    let first = staged
        .iter()
        .flat_map(|s| s.files.iter().map(|(_, f)| f))
        .next();
    // SAFETY: syncfs on a descriptor of a file the batch keeps open.
    let synced = first.is_some_and(|f| unsafe { libc::syncfs(f.as_raw_fd()) } == 0);
    let sync = |f: &File| if synced { Ok(()) } else { f.sync_all() };
    for s in &staged {
        for (what, f) in &s.files {
            match sync(f) {
                Ok(()) => drop_cached(f),
                Err(e) => warn!(recording = %s.id, error = %e, "cannot finish {what}"),
            }
        }
        if let Some(FinalMetadata(f, tmp, ..)) = &s.metadata {
            if let Err(e) = sync(f) {
                warn!(path = %tmp.display(), error = %e, "fsync failed; file replaced anyway");
            }
        }
    }
    for s in staged {
        let Some(FinalMetadata(_, tmp, path, meta, index)) = s.metadata else {
            continue;
        };
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            counters.metadata_write_failed.fetch_add(1, Relaxed);
            warn!(recording = %meta.id, error = %e, "cannot write metadata.json");
        }
        if let Some(index) = index {
            index.send(IndexJob::Upsert(meta));
        }
    }
}

/// Writes back the dirty pages of `files` (all submitted, then all waited for) ahead of their
/// fsyncs: see [`run_endings`].
fn write_back<'a>(files: impl Iterator<Item = &'a File>) {
    let fds: Vec<std::os::fd::RawFd> = files.map(std::os::fd::AsRawFd::as_raw_fd).collect();
    for flags in [
        libc::SYNC_FILE_RANGE_WRITE,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    ] {
        for &fd in &fds {
            // SAFETY: `fd` belongs to a file the caller keeps open; a failure only leaves the
            // work to the fsync after.
            unsafe { libc::sync_file_range(fd, 0, 0, flags) };
        }
    }
}

/// The id of a recording whose ending panics (tests of panic containment).
#[cfg(test)]
const PANICKING_ENDING: &str = "test-panicking-ending";

/// Sync threads of one file thread, and how many endings they hold.
pub(crate) struct Endings {
    tx: Mutex<Option<mpsc::Sender<Ending>>>,
    pending: Mutex<usize>,
    idle: Condvar,
}

/// How long the file thread waits for the Finalize behind a Finish (queued by the same call).
const FINALIZE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Endings in flight per file thread: fsyncs wait on the disk, not the CPU.
const SYNC_THREADS: usize = 4;

impl Endings {
    /// Without threads: endings run where they are handed in.
    fn inline() -> Arc<Self> {
        Arc::new(Self {
            tx: Mutex::new(None),
            pending: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    fn spawn(name: &str, counters: Arc<IoCounters>) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Ending>();
        let this = Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(0),
            idle: Condvar::new(),
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..SYNC_THREADS {
            let (rx, this, counters) = (rx.clone(), Arc::downgrade(&this), counters.clone());
            std::thread::Builder::new()
                .name(format!("{name}-sync{i}"))
                .spawn(move || loop {
                    // Every ending waiting, up to a batch: they share their syncs.
                    let batch = match rx.lock() {
                        Ok(r) => {
                            let Ok(first) = r.recv() else { return };
                            let mut batch = vec![first];
                            while batch.len() < ENDING_BATCH {
                                match r.try_recv() {
                                    Ok(e) => batch.push(e),
                                    Err(_) => break,
                                }
                            }
                            batch
                        }
                        Err(_) => return,
                    };
                    let done = batch.len();
                    // A panic loses these endings only; they still count as done below (else
                    // every barrier behind them would wait forever).
                    crate::contain::contain("recording endings", || run_endings(batch, &counters));
                    let Some(this) = this.upgrade() else { return };
                    let mut n = this.pending.lock().unwrap_or_else(|e| e.into_inner());
                    *n -= done;
                    if *n == 0 {
                        this.idle.notify_all();
                    }
                })?;
        }
        Ok(this)
    }

    fn hand(&self, ending: Ending, counters: &IoCounters) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            drop(tx);
            return ending.run(counters);
        };
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        if let Err(mpsc::SendError(ending)) = tx.send(ending) {
            *self.pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            ending.run(counters);
        }
    }

    /// Returns once every ending handed in has run.
    fn wait_idle(&self) {
        let mut n = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets the sync threads end once the endings queued are done, and waits for them.
    fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.wait_idle();
    }
}

/// Makes `dir` (an error if it exists) with the pcap and WAV holding their headers, kept open
/// in `open`; on an error nothing of it is left.
fn create_recording(dir: &Path, pcap: &[u8], wav: &[u8], open: &mut OpenFiles) -> io::Result<()> {
    fs::create_dir(dir)?;
    let made = (|| {
        let new = |name: &str, header: &[u8]| -> io::Result<(PathBuf, File)> {
            let path = dir.join(name);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(header)?;
            Ok((path, f))
        };
        Ok([new(PCAP_FILE, pcap)?, new(WAV_FILE, wav)?])
    })();
    match made {
        Ok(files) => {
            for (path, f) in files {
                open.keep(path, f);
            }
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

/// `ENOSPC` unless `len` bytes leave `floor` free on the filesystem of `file`.
fn check_floor(file: &File, len: usize, floor: u64) -> io::Result<()> {
    if floor == 0 {
        return Ok(());
    }
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `st` is a writable statvfs and the descriptor is open.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs succeeded and filled `st`.
    let st = unsafe { st.assume_init() };
    if st.f_bavail * st.f_frsize < len as u64 + floor {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}

/// Appends `bytes` whole, or not at all: a short write (disk full) is cut back.
fn append(f: &File, bytes: &[u8], floor: u64) -> io::Result<()> {
    check_floor(f, bytes.len(), floor)?;
    let before = f.metadata()?.len();
    if let Err(e) = f.write_all_at(bytes, before) {
        let _ = f.set_len(before);
        return Err(e);
    }
    write_behind(f, 0, before, bytes.len());
    Ok(())
}

fn write_wav(f: &File, w: &WavChunk, floor: u64) -> io::Result<()> {
    check_floor(f, w.bytes.len(), floor)?;
    f.write_all_at(&w.bytes, w.offset)?;
    f.write_all_at(&w.header, 0)?;
    // The header's page is rewritten with every chunk: it stays cached.
    write_behind(f, PAGE, w.offset, w.bytes.len());
    Ok(())
}

/// The page size the write path aligns to and drops by.
pub(crate) const PAGE: u64 = 4096;

/// Starts writing the chunk just written (`len` bytes at `at`) back to disk, and drops what
/// lies before it, from `keep_below` on, from the page cache.
///
/// A recording is written once and not read back while it runs. Left in the page cache, its
/// pages only age out when memory runs short (reclaim work), and every chunk takes a page
/// never used before. On a VM whose hypervisor takes freed guest memory back (virtio-balloon
/// free page reporting, as on this project's machines) each such page costs a host fault: in
/// the calls-with-media bench at 3 000 calls the first copy into fresh page-cache pages was a
/// third of the receive CPU (`copy_folio_from_iter_atomic`, `zero_user_segments`). Written
/// back at once and dropped a chunk later, the pages are freed and reused while still hot.
/// What is before `at` was written back when its own chunk came (pages still under writeback
/// are skipped and dropped with the next chunk); the partial page at `at` is kept.
fn write_behind(f: &File, keep_below: u64, at: u64, len: usize) {
    let fd = f.as_raw_fd();
    // SAFETY: plain syscalls on a descriptor the caller keeps open; both are hints whose
    // failure changes nothing but the cache.
    unsafe {
        libc::sync_file_range(
            fd,
            at as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        let end = at / PAGE * PAGE;
        if end > keep_below {
            libc::posix_fadvise(
                fd,
                keep_below as libc::off_t,
                (end - keep_below) as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Drops a finished (synced) file from the page cache (see [`write_behind`]).
fn drop_cached(f: &File) {
    // SAFETY: a hint on a descriptor the caller keeps open.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that panics on the file thread, and an ending that panics on a sync thread, are
    /// counted and lost alone: the bytes the job held are released (a shard at the queue
    /// bound goes on), barriers return, and the next jobs are written.
    #[test]
    fn a_panicking_job_or_ending_does_not_stop_the_file_thread() {
        let dir = crate::writer::tests::TempDir::new("panicjob");
        let counters = Arc::new(IoCounters::default());
        let q = FileQueue::spawn("t-panic".into(), 1000, 0, counters.clone()).unwrap();
        let before = crate::contain::panics();
        let (done, finished) = mpsc::channel();
        let (q2, path) = (q.clone(), dir.path().join("after.json"));
        std::thread::spawn(move || {
            // The whole bound: the replacement waits until the panicked job's bytes are freed.
            q2.submit(Job::Panic(vec![0; 1000]));
            q2.submit(Job::Replace {
                path: path.clone(),
                bytes: b"after the panic".to_vec(),
                id: Arc::from("r"),
                sync: true,
                io: None,
            });
            q2.submit(Job::Finish {
                id: Arc::from(PANICKING_ENDING),
                io: Arc::default(),
                pcap: None,
                wav: None,
            });
            // Waits for the endings too: the panicked one must count as done.
            q2.barrier();
            q2.submit(Job::Replace {
                path: path.with_file_name("last.json"),
                bytes: b"after the ending".to_vec(),
                id: Arc::from("r"),
                sync: false,
                io: None,
            });
            q2.barrier();
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the file thread went on after the panics");
        assert_eq!(
            std::fs::read(dir.path().join("after.json")).unwrap(),
            b"after the panic"
        );
        assert_eq!(
            std::fs::read(dir.path().join("last.json")).unwrap(),
            b"after the ending"
        );
        assert!(
            crate::contain::panics() >= before + 2,
            "both panics counted"
        );
        assert_eq!(*q.inflight.bytes.lock().unwrap(), 0, "no bytes left held");
    }

    /// Endings run as one batch: every WAV cut with its header, every final metadata.json in
    /// place, no temporary file left.
    #[test]
    fn endings_in_a_batch_finish_every_recording() {
        use crate::writer::metadata::{RecordingState, METADATA_FILE};
        let dir = crate::writer::tests::TempDir::new("endings");
        let counters = IoCounters::default();
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20 {
            let spool = dir.path().join(format!("s{i}"));
            fs::create_dir_all(&spool).unwrap();
            crate::writer::tests::abandoned_recording(&spool, 10 + i, 0);
            let rec = spool.join("crashed");
            let mut meta = RecordingMetadata::read(&rec).unwrap();
            meta.state = RecordingState::Complete;
            let wav = rec.join(WAV_FILE);
            let len = fs::metadata(&wav).unwrap().len() - 2 * (i % 3);
            let mut header = [0u8; 44];
            header.copy_from_slice(&fs::read(&wav).unwrap()[..44]);
            header[40] = i as u8; // marks this ending's header
            batch.push(Ending {
                id: Arc::from(format!("r{i}")),
                wav: Some((wav.clone(), len, header, None)),
                pcap: Some((rec.join(PCAP_FILE), None)),
                finalize: Some(Finalize {
                    dir: rec.clone(),
                    meta: Box::new(meta),
                    io: Arc::default(),
                    index: None,
                }),
            });
            expected.push((rec, wav, len, i as u8));
        }
        run_endings(batch, &counters);
        for (rec, wav, len, mark) in expected {
            let bytes = fs::read(&wav).unwrap();
            assert_eq!(
                (bytes.len() as u64, bytes[40]),
                (len, mark),
                "{}",
                wav.display()
            );
            let meta = RecordingMetadata::read(&rec).unwrap();
            assert_eq!(meta.state, RecordingState::Complete);
            let tmp = crate::writer::metadata::temp_path(&rec.join(METADATA_FILE));
            assert!(!tmp.exists(), "{} left", tmp.display());
        }
        assert_eq!(counters.metadata_write_failed.load(Relaxed), 0);
    }

    #[test]
    fn synced_replacements_in_a_row_are_committed_together_last_version_wins() {
        let dir = crate::writer::tests::TempDir::new("group");
        let counters = Arc::new(IoCounters::default());
        let q = FileQueue::spawn("t-files".into(), 1 << 20, 0, counters.clone()).unwrap();
        // Held: the 300 jobs queue up and are taken as groups.
        let release = q.hold();
        for round in 0..3 {
            for i in 0..100 {
                q.submit(Job::Replace {
                    path: dir.path().join(format!("m{i}.json")),
                    bytes: format!("{round}-{i}").into_bytes(),
                    id: Arc::from("r"),
                    sync: true,
                    io: None,
                });
            }
        }
        drop(release);
        q.barrier();
        for i in 0..100 {
            let got = std::fs::read_to_string(dir.path().join(format!("m{i}.json"))).unwrap();
            assert_eq!(got, format!("2-{i}"));
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 100, "no temporary file left: {names:?}");
        assert_eq!(counters.metadata_write_failed.load(Relaxed), 0);
    }

    /// Pages of `[at, at + len)` of `f` in the page cache.
    fn resident_pages(f: &File, at: u64, len: usize) -> usize {
        let page = PAGE as usize;
        // SAFETY: a read-only shared mapping of an open file (mapping faults nothing in),
        // unmapped before returning; mincore fills one byte per page of it.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                at as libc::off_t,
            );
            assert_ne!(map, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            let mut vec = vec![0u8; len.div_ceil(page)];
            let rc = libc::mincore(map, len, vec.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    /// A recording's media leave the page cache once on disk: what was before the chunk just
    /// written is dropped (it was written back), the chunk itself and the WAV's header page stay.
    #[test]
    fn written_chunks_leave_the_page_cache_once_on_disk() {
        let dir = crate::writer::tests::TempDir::new("write-behind");
        let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path and a writable statfs.
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) }, 0);
        // SAFETY: statfs succeeded.
        if unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC {
            eprintln!(
                "skipped: the temporary directory is on tmpfs, whose pages cannot be dropped"
            );
            return;
        }
        let chunk = vec![0xab_u8; 64 * 1024];
        let create = |name: &str| {
            File::options()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let pcap = create("recording.pcap");
        append(&pcap, &chunk, 0).unwrap();
        assert_eq!(resident_pages(&pcap, 0, chunk.len()), 16, "written: cached");
        pcap.sync_data().unwrap();
        append(&pcap, &chunk, 0).unwrap();
        assert_eq!(resident_pages(&pcap, 0, chunk.len()), 0, "on disk: dropped");
        assert_eq!(resident_pages(&pcap, 64 * 1024, chunk.len()), 16);
        assert_eq!(
            fs::read(dir.path().join("recording.pcap")).unwrap().len(),
            128 * 1024
        );

        let wav = create("recording.wav");
        let frames = |offset: u64| WavChunk {
            path: dir.path().join("recording.wav"),
            offset,
            bytes: chunk.clone(),
            header: [1; 44],
        };
        // As `create_recording` makes it: the header first, on a page of its own.
        wav.write_all_at(&[1; 44], 0).unwrap();
        write_wav(&wav, &frames(44), 0).unwrap();
        wav.sync_data().unwrap();
        write_wav(&wav, &frames(44 + 64 * 1024), 0).unwrap();
        assert_eq!(resident_pages(&wav, 0, 4096), 1, "the header's page stays");
        assert_eq!(resident_pages(&wav, 4096, 60 * 1024), 0, "on disk: dropped");
        let data = fs::read(dir.path().join("recording.wav")).unwrap();
        assert_eq!(&data[..44], &[1; 44]);
        assert!(data[44..].iter().all(|&b| b == 0xab));
    }
}
