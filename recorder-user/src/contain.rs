//! A panic is a bug, but one call's bug must not end the recordings of the others.
//!
//! The SIP driver (every call's signaling), the capture task (every packet), each writer
//! shard (a share of every recording), its file thread and sync threads, and the index thread
//! are single tasks or threads serving many calls: a panic left to unwind out of one would stop
//! all of them (a dead file thread also leaves its shard waiting on back-pressure forever).
//! [`contain`] runs one unit of their work (one message, one event, one packet, one file job,
//! ending or index job) and turns a panic into a log line and a count
//! (`recorder_panics_total`), so the unit is lost and the loop goes on.

use std::{
    any::Any,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// Panics caught by [`contain`] since the start.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Runs `work`; `None` when it panicked (logged with `what` and counted).
///
/// `AssertUnwindSafe`: after a panic the state `work` touched may be half updated. That state
/// belongs to the call being handled (its session, its recording); the others are left as
/// they were, which is the point.
pub fn contain<T>(what: &'static str, work: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(v) => Some(v),
        Err(payload) => {
            PANICS.fetch_add(1, Relaxed);
            tracing::error!(
                during = what,
                panic = message(&*payload),
                "panic contained: this unit of work is lost, the other calls go on (a bug: please report it)"
            );
            None
        }
    }
}

/// Panics contained so far.
pub fn panics() -> u64 {
    PANICS.load(Relaxed)
}

fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_counted_and_the_caller_goes_on() {
        let before = panics();
        let mut served = Vec::new();
        for call in 0..3 {
            contain("test", || {
                if call == 1 {
                    panic!("call {call} is broken");
                }
                served.push(call);
            });
        }
        assert_eq!(served, [0, 2]);
        assert!(panics() > before);
        assert_eq!(contain("test", || 7), Some(7));
    }
}
