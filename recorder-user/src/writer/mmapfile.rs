//! An append/positional file written through a `memmap2` mapping grown in large steps.
//!
//! Space is reserved with `fallocate(2)` before the mapping grows over it, so a full disk is an
//! `ENOSPC` error from [`MmapFile::reserve`] instead of a `SIGBUS` when a page of the mapping is
//! first touched. Bytes past the logical length are zero (the reserved tail); [`MmapFile::finish`]
//! cuts the file to its logical length, and the repair pass trims such tails after a crash.
//!
//! # Why a mapping, and what it costs
//! The WAV is written by position (channels interleaved, packets placed by RTP timestamp, late
//! packets into earlier frames): a mapping makes that a plain store with no read-back and no
//! in-memory window, and gaps are silence for free (the zero tail). The pcap uses the same type.
//!
//! Measured by `writer::tests::bench_mmap_vs_write` (`cargo test --release ... -- --ignored
//! --nocapture`; 2-core VM, ext4, 400 000 pcap records of 230 bytes = 92 MB, best of 3, three
//! runs): this type 0.063-0.065 s for the write loop (~1.4 GB/s; 0.073-0.081 s without the
//! `MADV_POPULATE_WRITE` below), 0.12-0.13 s including the final msync+fsync; `BufWriter<File>`
//! (64 KiB) 0.036-0.038 s (~2.4 GB/s), 0.08-0.10 s with fsync. So the mapping is *not* faster
//! than buffered `write(2)` for the append-only pcap (fresh pages are zeroed by the fault, then
//! overwritten); both are far above the load (one G.711 stream is 50 packets/s, ~11 kB/s of
//! pcap and 16 kB/s of WAV: 1.4 GB/s is ~50 000 streams), and the writer thread is never on the
//! capture path. Kept for the WAV's random access; a pcap-only `write(2)` path would be the
//! first optimisation if the writer thread ever became the bottleneck. Re-measured after files
//! stopped keeping a descriptor (reopened to grow) and the first step went to 64 KiB: 0.061 s
//! for the loop, 0.132 s with the final sync (unchanged).
//!
//! The spool belongs to the recorder: another process truncating a file under a live mapping would
//! make the writer fault (`SIGBUS`). That is the usual contract of mmap-based writers.

use std::{
    fs::{File, OpenOptions},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use memmap2::MmapMut;

/// Smallest growth step (and the first allocation). Small enough that 10 000 new recordings
/// (two files each) reserve 1.3 GB, not 5 GB; steps double from there.
const MIN_STEP: u64 = 64 * 1024;
/// Largest growth step: steps double with the file size up to this.
const MAX_STEP: u64 = 16 * 1024 * 1024;
const PAGE: u64 = 4096;
/// Pages are faulted in (`MADV_POPULATE_WRITE`) ahead of the writes, at most this much at a
/// time: one call per 64 pages instead of a fault per page, but not a whole growth step at once.
/// Steps reach 16 MiB, and recordings started together grow in step: populating whole steps
/// stalled the writer thread for long enough to fill the packet queue (`queue_full` in the bench
/// at 150 000 packets/s).
const POPULATE_CHUNK: u64 = 256 * 1024;
/// ... and at most this fraction of what the file already holds: a populated page is zeroed
/// (it lies over a fallocated, unwritten extent) whether or not it is ever written, and 10 000
/// recordings starting together with 256 KiB ahead in two files each zeroed 5 GB before their
/// first seconds of audio (a quarter of the receiving CPU in the bench at 2 000 flows).
const POPULATE_FRACTION: u64 = 8;

/// No file descriptor is kept between writes: a mapping stays valid after its descriptor is
/// closed, so the file is opened only to grow, cut or sync it. 10 000 live recordings would
/// otherwise hold 20 000 descriptors (the usual hard `RLIMIT_NOFILE`).
pub(crate) struct MmapFile {
    path: PathBuf,
    map: Option<MmapMut>,
    /// Bytes written (the file's length once finished).
    len: u64,
    /// Bytes allocated in the file (and mapped).
    cap: u64,
    /// End of the range faulted in ahead of the writes (see [`populate_ahead`]).
    populated: u64,
    /// Growth fails with `ENOSPC` when it would leave less free space than this on the
    /// filesystem (room kept to finish files and write metadata).
    floor: u64,
}

impl MmapFile {
    /// Creates (or truncates) `path`. Growing fails with `ENOSPC` once it would leave less than
    /// `floor` bytes free on the filesystem (0: no floor).
    pub(crate) fn create(path: &Path, floor: u64) -> io::Result<Self> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            map: None,
            len: 0,
            cap: 0,
            populated: 0,
            floor,
        })
    }

    /// Opens a file an earlier writer finished at exactly `len` bytes (a handover) to go on
    /// writing after it. A file of another length was changed since: `InvalidData`.
    pub(crate) fn open(path: &Path, len: u64, floor: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let actual = file.metadata()?.len();
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {actual} bytes, expected {len}", path.display()),
            ));
        }
        let map = if len > 0 {
            // SAFETY: as in `reserve`: the file is ours and never truncated while mapped.
            Some(map_without_readahead(&file)?)
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            map,
            len,
            cap: len,
            populated: len,
            floor,
        })
    }

    fn open_rw(&self) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(&self.path)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The bytes written so far (mapped).
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(map) => &map[..self.len as usize],
            None => &[],
        }
    }

    /// Makes sure `[0, end)` is allocated and mapped. On `ENOSPC` nothing changes.
    pub(crate) fn reserve(&mut self, end: u64) -> io::Result<()> {
        if end <= self.cap {
            return Ok(());
        }
        let file = self.open_rw()?;
        let step = self.cap.clamp(MIN_STEP, MAX_STEP);
        let wanted = round_up(end.max(self.cap + step));
        let needed = round_up(end);
        let new_cap = match self.allocate(&file, wanted) {
            Ok(()) => wanted,
            // A big step may not fit where the bytes we need still do.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && needed < wanted => {
                self.allocate(&file, needed)?;
                needed
            }
            Err(e) => return Err(e),
        };
        // Unmap before mapping the longer file (a single mapping of the whole file).
        self.map = None;
        let map = map_without_readahead(&file)?;
        self.map = Some(map);
        self.cap = new_cap;
        // `file` is closed here; the mapping keeps the pages.
        Ok(())
    }

    /// Faults in the pages of `[offset, end)` and up to [`populate_ahead`] after, in one call
    /// instead of one page fault per 4 KiB written; best effort (kernels before 5.14 do not
    /// have it). Pages skipped by a positional write (WAV silence) are not touched.
    fn populate(&mut self, offset: u64, end: u64) {
        if end <= self.populated {
            return;
        }
        let Some(map) = &self.map else {
            return;
        };
        let from = self.populated.max(offset / PAGE * PAGE);
        let to = self.cap.min(round_up(end.max(from + populate_ahead(end))));
        if to > from {
            let _ = map.advise_range(
                memmap2::Advice::PopulateWrite,
                from as usize,
                (to - from) as usize,
            );
        }
        self.populated = to;
    }

    fn allocate(&self, file: &File, new_cap: u64) -> io::Result<()> {
        let (off, len) = (self.cap as libc::off_t, (new_cap - self.cap) as libc::off_t);
        if self.floor > 0 && free_bytes(file)? < len as u64 + self.floor {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // SAFETY: plain syscall on a file descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // No fallocate (rare for a spool filesystem): a sparse extension; a full disk then
            // shows up as SIGBUS, so prefer a filesystem that supports it.
            return file.set_len(new_cap);
        }
        Err(err)
    }

    /// Writes `data` at `offset`, growing the file if needed; the logical length becomes at least
    /// `offset + data.len()`. On error nothing is written.
    pub(crate) fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        self.reserve(end)?;
        self.populate(offset, end);
        if let Some(map) = self.map.as_mut() {
            map[offset as usize..end as usize].copy_from_slice(data);
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// The mapped bytes `[offset, offset + len)`, allocated first. The logical length becomes at
    /// least `offset + len`.
    pub(crate) fn slice_mut(&mut self, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        let end = offset + len as u64;
        self.reserve(end)?;
        self.populate(offset, end);
        self.len = self.len.max(end);
        match self.map.as_mut() {
            Some(map) => Ok(&mut map[offset as usize..end as usize]),
            None => Ok(&mut []),
        }
    }

    /// Starts writeback of the mapping (does not wait).
    pub(crate) fn flush_async(&self) -> io::Result<()> {
        match &self.map {
            Some(map) => map.flush_async(),
            None => Ok(()),
        }
    }

    /// Flushes, unmaps and cuts the file to its logical length.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        if let Some(map) = self.map.take() {
            map.flush()?;
        }
        let file = self.open_rw()?;
        file.set_len(self.len)?;
        file.sync_all()
    }
}

/// Free bytes (for unprivileged users) on the filesystem of `file`.
fn free_bytes(file: &File) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `st` is a writable statvfs and the descriptor is open.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs succeeded and filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// Maps the whole file, without fault readahead.
///
/// A fault on a file mapping reads ahead (128 KiB by default) and every page read over a
/// fallocated, unwritten extent is zeroed: populating one page of each of 20 000 new files
/// zeroed 2.5 GB, most of the writer thread's time in the bench at 20 000 flows.
fn map_without_readahead(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the file is ours (created by this writer in its spool directory) and is never
    // truncated while mapped: `finish` drops the mapping before `set_len`.
    let map = unsafe { MmapMut::map_mut(file)? };
    // Best effort: without it, only slower.
    let _ = map.advise(memmap2::Advice::Random);
    Ok(map)
}

/// How far past a write at `end` pages are faulted in: 1/[`POPULATE_FRACTION`] of the file,
/// one page to [`POPULATE_CHUNK`].
fn populate_ahead(end: u64) -> u64 {
    (end / POPULATE_FRACTION).clamp(PAGE, POPULATE_CHUNK)
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_populated_ahead_in_proportion_to_the_file() {
        let dir = std::env::temp_dir().join(format!("mmapfile-populate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = MmapFile::create(&dir.join("f"), 0).unwrap();
        // A new file: only the page written, not 256 KiB of zeroed pages per file.
        f.slice_mut(0, 100).unwrap().fill(1);
        assert_eq!(f.populated, PAGE);
        // ... and no fault readahead zeroing the 31 pages after it: the mapping is `rr`.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let path = dir.join("f").display().to_string();
        let entry = smaps
            .split_inclusive("VmFlags:")
            .zip(smaps.split("VmFlags:").skip(1))
            .find(|(head, _)| head.lines().any(|l| l.ends_with(&path)))
            .map(|(_, flags)| flags.lines().next().unwrap_or_default().to_string())
            .expect("the file's mapping in smaps");
        assert!(
            entry.split_whitespace().any(|f| f == "rr"),
            "VmFlags:{entry}"
        );
        // A 1 MiB file: 1/8 of it ahead (space reserved beyond it, as after growth steps).
        f.reserve(80 << 20).unwrap();
        let at = 1 << 20;
        f.slice_mut(at, 100).unwrap().fill(1);
        assert_eq!(f.populated, round_up(at + (at + 100) / POPULATE_FRACTION));
        // Never more than POPULATE_CHUNK ahead.
        let at = 64 << 20;
        f.slice_mut(at, 100).unwrap().fill(1);
        assert_eq!(f.populated, at + POPULATE_CHUNK);
        drop(f);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
