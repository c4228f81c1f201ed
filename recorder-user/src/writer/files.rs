//! A thread of its own for replacing small files atomically (`metadata.json`, SIPREC metadata
//! XML). Each replacement ends with an fsync, which takes milliseconds on a busy disk: done on
//! the writer thread for thousands of recordings, it stalls packet writing until capture's
//! queue overflows. One thread and one FIFO keep the replacements of a file in order.
//!
//! `bench_writer_cpu` (release, 2 shared cores, ext4 on a virtual disk; 2000 recordings, one
//! G.711 stream each at 50 packets/s for 10 s = 1 M packets): before (every recording's
//! metadata rewritten with fsync on the writer thread every 2 s) 43 % of the packets were
//! dropped at the queue, 3.0 s writer CPU; rewriting every 2 s from this thread, 0-0.6 % drops,
//! writer 4.1-4.3 s + this thread 2.9 s CPU; counters every 30 s (the default) from this
//! thread, no drops, writer 3.6-3.8 s + this thread 0.4 s.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc,
    },
};

use tracing::warn;

use super::metadata::replace_file;

enum Job {
    Write {
        path: PathBuf,
        bytes: Vec<u8>,
        /// Recording the file belongs to (for the log).
        id: String,
        /// fsync before the rename (see [`FileQueue::write`]).
        sync: bool,
    },
    Barrier(mpsc::SyncSender<()>),
}

/// Where recordings queue their file replacements.
#[derive(Clone)]
pub(crate) struct FileQueue {
    tx: mpsc::Sender<Job>,
}

impl FileQueue {
    /// Spawns the thread; `failed` counts replacements that failed (logged, old file kept).
    pub(crate) fn spawn(failed: Arc<AtomicU64>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("rec-files".into())
            .spawn(move || {
                // Ends when every queue (clone) is dropped.
                for job in rx {
                    match job {
                        Job::Write {
                            path,
                            bytes,
                            id,
                            sync,
                        } => {
                            if let Err(e) = replace_file(&path, &bytes, sync) {
                                failed.fetch_add(1, Relaxed);
                                warn!(recording = %id, path = %path.display(), error = %e,
                                    "cannot write file");
                            }
                        }
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues the replacement of `path` by `bytes`, with an fsync when `sync` (events: start,
    /// media and participant changes, end). Counter refreshes go without: an fsync commits the
    /// filesystem journal, and thousands of them in a row stalled the writer thread's page
    /// faults on the recordings' mappings (which wait for the journal to update mtime). False
    /// when the thread is gone.
    pub(crate) fn write(&self, path: PathBuf, bytes: Vec<u8>, id: &str, sync: bool) -> bool {
        self.tx
            .send(Job::Write {
                path,
                bytes,
                id: id.to_string(),
                sync,
            })
            .is_ok()
    }

    /// Returns once every replacement queued before is on disk (or has failed).
    pub(crate) fn barrier(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(Job::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}
