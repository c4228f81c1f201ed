//! The index thread: the only writer of the index (SQLite or PostgreSQL), fed by the shards'
//! packet stages (new recordings, changes) and file threads (finished recordings), so that no
//! shard waits for a database.
//!
//! Jobs waiting together are coalesced: only the last row of a recording is written (a burst
//! of thousands of starts and ends costs one upsert per recording, not one per event).
//!
//! Links of new recordings are looked up in the order the handle saw their `Started` events
//! ([`IndexJob::Expect`]), whichever shard sends them first: a recording continuing a CallUUID
//! must find the one before it in the index.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc,
    },
    time::SystemTime,
};

use tracing::{info, warn};

use super::{
    metadata::RecordingMetadata,
    retention::{enforce_retention, RetentionPolicy},
    WriterError,
};
use crate::index::Index;

/// The answer to a link lookup, sent back to the recording's shard: `(interaction, previous)`
/// when the recording continues an interaction (always sent, so that a recording that ended
/// meanwhile can be finished with what was found).
pub(crate) struct Linked {
    pub id: String,
    pub link: Option<(String, String)>,
}

pub(crate) enum IndexJob {
    Upsert(Box<RecordingMetadata>),
    /// Upsert, after looking up the earlier recordings of its CallUUID: a link found is sent
    /// through `reply` (and written into the row).
    Link {
        meta: Box<RecordingMetadata>,
        reply: Box<dyn Fn(Linked) + Send>,
    },
    /// A `Started` with a CallUUID passed the handle: its `Link` (or `Forget`) comes from a
    /// shard; later links wait for it.
    Expect(String),
    /// The recording of an `Expect` was not created (its link will never come).
    Forget(String),
    Remove(String),
    Retention {
        policy: RetentionPolicy,
        reply: mpsc::SyncSender<Result<Vec<String>, WriterError>>,
    },
    Barrier(mpsc::SyncSender<()>),
}

#[derive(Clone)]
pub(crate) struct IndexQueue {
    tx: mpsc::Sender<IndexJob>,
}

impl IndexQueue {
    /// Spawns the thread. Without an index it still runs retention.
    pub(crate) fn spawn(
        index: Option<Index>,
        spool: PathBuf,
        errors: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("rec-index".into())
            .spawn(move || run(index, spool, errors, rx))?;
        Ok(Self { tx })
    }

    pub(crate) fn send(&self, job: IndexJob) {
        if self.tx.send(job).is_err() {
            warn!("index thread stopped; index update dropped");
        }
    }

    pub(crate) fn barrier(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(IndexJob::Barrier(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

fn run(
    mut index: Option<Index>,
    spool: PathBuf,
    errors: Arc<AtomicU64>,
    rx: mpsc::Receiver<IndexJob>,
) {
    let mut failed = |what: &str, id: &str, e: &dyn std::fmt::Display| {
        errors.fetch_add(1, Relaxed);
        warn!(recording = %id, error = %e, "index {what} failed");
    };
    // Ids of Started events in order, and links that arrived before the ones ahead of them.
    let mut expected: std::collections::VecDeque<String> = Default::default();
    let mut early: HashMap<String, IndexJob> = HashMap::new();
    while let Ok(first) = rx.recv() {
        // What else is waiting: upserts of one recording collapse to the last.
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut pending: HashMap<String, Box<RecordingMetadata>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let flush =
            |index: &mut Option<Index>,
             pending: &mut HashMap<String, Box<RecordingMetadata>>,
             order: &mut Vec<String>,
             failed: &mut dyn FnMut(&str, &str, &dyn std::fmt::Display)| {
                for id in order.drain(..) {
                    if let (Some(m), Some(index)) = (pending.remove(&id), index.as_mut()) {
                        if let Err(e) = index.upsert_from_metadata(&m) {
                            failed("update", &id, &e);
                        }
                    }
                }
            };
        // Links in Started order: an early one waits for those ahead of it.
        let mut ready = Vec::new();
        for job in jobs {
            match job {
                IndexJob::Expect(id) => expected.push_back(id),
                job @ (IndexJob::Link { .. } | IndexJob::Forget(_)) => {
                    let id = match &job {
                        IndexJob::Link { meta, .. } => meta.id.clone(),
                        IndexJob::Forget(id) => id.clone(),
                        _ => unreachable!(),
                    };
                    if expected.contains(&id) {
                        early.insert(id, job);
                    } else {
                        // Not ordered (a CallUUID learned later): at once.
                        ready.push(job);
                    }
                    while let Some(job) = expected.front().and_then(|id| early.remove(id)) {
                        expected.pop_front();
                        ready.push(job);
                    }
                }
                job => ready.push(job),
            }
        }
        for job in ready {
            match job {
                IndexJob::Expect(_) | IndexJob::Forget(_) => {}
                IndexJob::Upsert(m) => {
                    let id = m.id.clone();
                    if pending.insert(id.clone(), m).is_none() {
                        order.push(id);
                    }
                }
                IndexJob::Link { mut meta, reply } => {
                    // The earlier recordings must be in the index before looking them up.
                    flush(&mut index, &mut pending, &mut order, &mut failed);
                    let mut link = None;
                    if let Some(ix) = index.as_mut() {
                        match ix.link_for(&meta) {
                            Ok(Some((interaction, previous))) => {
                                info!(recording = %meta.id, %interaction, %previous, "continues an interaction");
                                meta.interaction = Some(interaction.clone());
                                meta.previous = Some(previous.clone());
                                link = Some((interaction, previous));
                            }
                            Ok(None) => {}
                            Err(e) => failed("lookup for linking", &meta.id, &e),
                        }
                        if let Err(e) = ix.upsert_from_metadata(&meta) {
                            failed("update", &meta.id, &e);
                        }
                    }
                    reply(Linked {
                        id: meta.id.clone(),
                        link,
                    });
                }
                IndexJob::Remove(id) => {
                    flush(&mut index, &mut pending, &mut order, &mut failed);
                    if let Some(ix) = index.as_mut() {
                        if let Err(e) = ix.remove(&id) {
                            failed("removal", &id, &e);
                        }
                    }
                }
                IndexJob::Retention { policy, reply } => {
                    flush(&mut index, &mut pending, &mut order, &mut failed);
                    let result = enforce_retention(&spool, policy, SystemTime::now());
                    if let (Ok(deleted), Some(ix)) = (&result, index.as_mut()) {
                        for id in deleted {
                            if let Err(e) = ix.remove(id) {
                                failed("removal", id, &e);
                            }
                        }
                    }
                    let _ = reply.send(result);
                }
                IndexJob::Barrier(done) => {
                    flush(&mut index, &mut pending, &mut order, &mut failed);
                    let _ = done.send(());
                }
            }
        }
        flush(&mut index, &mut pending, &mut order, &mut failed);
    }
}
