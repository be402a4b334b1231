//! loom model of the memory provider's mark lock: a flag taken with a swap and released with a
//! plain store (see `src/provider/memory/marks.rs`).
//!
//! loom fails the model on a data race on what the mark holds: two holders at once, or a holder
//! that does not see what the one before it wrote (a release or an acquire too weak). Each thread
//! tries the lock once instead of waiting for it: loom cannot explore a wait that needs another
//! thread to make progress (see `tests/ring.rs`).
#![cfg(eventbroker_loom)]

use eventbroker::__private::Mark;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, Ordering};
use loom::thread;

mod common;
use common::model;

/// Two writers and a reader, each trying once: every write that took the lock is seen by every
/// later holder, so the reader sees no more than were made, and the count after is exactly the
/// writes that took the lock.
#[test]
fn a_marks_lock_lets_one_holder_in_at_a_time() {
    model(3, || {
        let mark = Arc::new(Mark::new());
        let written = Arc::new(AtomicU32::new(0));
        let writer = {
            let (mark, written) = (Arc::clone(&mark), Arc::clone(&written));
            thread::spawn(move || {
                if mark.try_add_one() {
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let reader = {
            let mark = Arc::clone(&mark);
            thread::spawn(move || {
                if let Some(count) = mark.try_count() {
                    assert!(count <= 2);
                }
            })
        };
        if mark.try_add_one() {
            written.fetch_add(1, Ordering::Relaxed);
        }
        writer.join().unwrap();
        reader.join().unwrap();
        assert_eq!(
            mark.try_count(),
            Some(written.load(Ordering::Relaxed)),
            "the lock is free, and no write lost"
        );
    });
}
