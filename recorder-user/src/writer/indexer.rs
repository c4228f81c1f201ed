//! The index thread: the only writer of the index (SQLite or PostgreSQL), fed by the shards'
//! packet stages (new recordings, changes) and file threads (finished recordings), so that no
//! shard waits for a database.
//!
//! Jobs waiting together are coalesced: only the last row of a recording is written, and all
//! the rows of one drain of the queue go in one transaction (a burst of thousands of starts
//! and ends costs one upsert per recording and one commit, not one commit per event: at 800
//! calls/s, a commit per new recording's link kept the index thread behind, and every ending
//! recording waits for its link).
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
use crate::{contain::contain, index::Index};

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
    /// Panics on the index thread (tests of panic containment).
    #[cfg(test)]
    Panic,
}

#[derive(Clone)]
pub(crate) struct IndexQueue {
    tx: mpsc::Sender<IndexJob>,
    /// Jobs sent and not yet done (`recorder status`: `index_queued`).
    queued: Arc<AtomicU64>,
}

impl IndexQueue {
    /// Spawns the thread. Without an index it still runs retention.
    pub(crate) fn spawn(
        index: Option<Index>,
        spool: PathBuf,
        errors: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        let done = queued.clone();
        std::thread::Builder::new()
            .name("rec-index".into())
            .spawn(move || run(index, spool, errors, rx, &done))?;
        Ok(Self { tx, queued })
    }

    pub(crate) fn send(&self, job: IndexJob) {
        self.queued.fetch_add(1, Relaxed);
        if self.tx.send(job).is_err() {
            self.queued.fetch_sub(1, Relaxed);
            warn!("index thread stopped; index update dropped");
        }
    }

    /// Jobs waiting for the index thread.
    pub(crate) fn queued(&self) -> u64 {
        self.queued.load(Relaxed)
    }

    pub(crate) fn barrier(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        self.queued.fetch_add(1, Relaxed);
        if self.tx.send(IndexJob::Barrier(done)).is_ok() {
            let _ = wait.recv();
        } else {
            self.queued.fetch_sub(1, Relaxed);
        }
    }
}

/// Rows waiting to be written in one transaction: the last version of each recording, in the
/// order first seen.
#[derive(Default)]
struct Unwritten {
    order: Vec<String>,
    rows: HashMap<String, Box<RecordingMetadata>>,
    /// Ids by CallUUID: a new recording's link counts the earlier ones still here.
    by_call_uuid: HashMap<String, Vec<String>>,
}

impl Unwritten {
    fn put(&mut self, m: Box<RecordingMetadata>) {
        if !self.rows.contains_key(&m.id) {
            self.order.push(m.id.clone());
            if let Some(uuid) = &m.call_uuid {
                self.by_call_uuid
                    .entry(uuid.clone())
                    .or_default()
                    .push(m.id.clone());
            }
        }
        self.rows.insert(m.id.clone(), m);
    }

    fn of_call_uuid<'a>(
        &'a self,
        uuid: Option<&str>,
    ) -> impl Iterator<Item = &'a RecordingMetadata> + 'a {
        uuid.and_then(|u| self.by_call_uuid.get(u))
            .into_iter()
            .flatten()
            .filter_map(|id| self.rows.get(id).map(|m| &**m))
    }

    /// Writes every row in one transaction; when that fails, each row on its own, so that one
    /// bad row costs only itself.
    fn flush(
        &mut self,
        index: &mut Option<Index>,
        failed: &mut dyn FnMut(&str, &str, &dyn std::fmt::Display),
    ) {
        if self.order.is_empty() {
            return;
        }
        // Taken out first: a panic writing them loses this batch, not the next ones too.
        let batch = std::mem::take(self);
        if let Some(ix) = index.as_mut() {
            let rows: Vec<&RecordingMetadata> = batch
                .order
                .iter()
                .filter_map(|id| batch.rows.get(id).map(|m| &**m))
                .collect();
            if let Err(e) = ix.upsert_many(&rows) {
                warn!(rows = rows.len(), error = %e, "index batch failed; writing its rows one by one");
                for m in rows {
                    if let Err(e) = ix.upsert_from_metadata(m) {
                        failed("update", &m.id, &e);
                    }
                }
            }
        }
    }
}

fn run(
    mut index: Option<Index>,
    spool: PathBuf,
    errors: Arc<AtomicU64>,
    rx: mpsc::Receiver<IndexJob>,
    queued: &AtomicU64,
) {
    let mut failed = |what: &str, id: &str, e: &dyn std::fmt::Display| {
        errors.fetch_add(1, Relaxed);
        warn!(recording = %id, error = %e, "index {what} failed");
    };
    // Ids of Started events in order, and links that arrived before the ones ahead of them.
    let mut expected: std::collections::VecDeque<String> = Default::default();
    let mut early: HashMap<String, IndexJob> = HashMap::new();
    let mut unwritten = Unwritten::default();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let drained = jobs.len() as u64;
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
        // Jobs of this batch taken off `queued` already (a barrier settles those before it).
        let mut settled = 0;
        for (n, job) in ready.into_iter().enumerate() {
            // A panic (a bug, in an index backend say) loses this job, not the index thread.
            if let IndexJob::Link { mut meta, reply } = job {
                let link = contain("index link lookup", || {
                    look_up_link(&mut index, &unwritten, &mut meta, &mut failed)
                })
                .flatten();
                // Always answered: the recording's shard may be holding its ending for it.
                reply(Linked {
                    id: meta.id.clone(),
                    link,
                });
                unwritten.put(meta);
                continue;
            }
            contain("index job", || match job {
                IndexJob::Expect(_) | IndexJob::Forget(_) | IndexJob::Link { .. } => {}
                IndexJob::Upsert(m) => unwritten.put(m),
                IndexJob::Remove(id) => {
                    unwritten.flush(&mut index, &mut failed);
                    if let Some(ix) = index.as_mut() {
                        if let Err(e) = ix.remove(&id) {
                            failed("removal", &id, &e);
                        }
                    }
                }
                IndexJob::Retention { policy, reply } => {
                    unwritten.flush(&mut index, &mut failed);
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
                    unwritten.flush(&mut index, &mut failed);
                    // Whoever waits on the barrier sees the jobs before it no longer queued.
                    // (Links held back from earlier batches may run in this one: at most
                    // the batch's own count is settled.)
                    let now_settled = (n as u64 + 1).min(drained);
                    queued.fetch_sub(now_settled - settled, Relaxed);
                    settled = now_settled;
                    let _ = done.send(());
                }
                #[cfg(test)]
                IndexJob::Panic => panic!("test index job"),
            });
        }
        contain("index flush", || unwritten.flush(&mut index, &mut failed));
        queued.fetch_sub(drained - settled, Relaxed);
    }
}

/// The link of a new recording to the earlier ones of its CallUUID, written into `meta`
/// (the earlier recordings count whether written already or in this batch).
fn look_up_link(
    index: &mut Option<Index>,
    unwritten: &Unwritten,
    meta: &mut RecordingMetadata,
    failed: &mut dyn FnMut(&str, &str, &dyn std::fmt::Display),
) -> Option<(String, String)> {
    let ix = index.as_mut()?;
    let batch = unwritten.of_call_uuid(meta.call_uuid.as_deref());
    match ix.link_for_with(meta, batch) {
        Ok(Some((interaction, previous))) => {
            info!(recording = %meta.id, %interaction, %previous, "continues an interaction");
            meta.interaction = Some(interaction.clone());
            meta.previous = Some(previous.clone());
            Some((interaction, previous))
        }
        Ok(None) => None,
        Err(e) => {
            failed("lookup for linking", &meta.id, &e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that panics on the index thread is counted and lost alone: the thread goes on
    /// with the jobs behind it (a barrier returns, a retention run answers).
    #[test]
    fn a_panicking_index_job_does_not_stop_the_index_thread() {
        let dir = crate::writer::tests::TempDir::new("panicindex");
        let q = IndexQueue::spawn(None, dir.path().to_path_buf(), Arc::default()).unwrap();
        let before = crate::contain::panics();
        q.send(IndexJob::Panic);
        q.barrier();
        q.send(IndexJob::Panic);
        let (tx, rx) = mpsc::sync_channel(1);
        q.send(IndexJob::Retention {
            policy: RetentionPolicy::default(),
            reply: tx,
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok(),
            "the job after the panic was done"
        );
        q.barrier();
        assert!(
            crate::contain::panics() >= before + 2,
            "both panics counted"
        );
    }

    /// Once a barrier returns, the jobs before it are no longer counted as queued (the gauge
    /// went down only after the whole batch before).
    #[test]
    fn a_barrier_returns_with_the_jobs_before_it_counted_done() {
        let dir = crate::writer::tests::TempDir::new("barrierq");
        let q = IndexQueue::spawn(None, dir.path().to_path_buf(), Arc::default()).unwrap();
        for i in 0..100 {
            q.send(IndexJob::Remove(format!("r{i}")));
        }
        q.barrier();
        assert_eq!(q.queued(), 0);
    }
}
