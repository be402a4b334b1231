//! loom models of the memory provider's status cells: a worker writing an event's status through
//! its slot while the holder of the shard's lock evicts the event, reuses the slot, or reads it.
#![cfg(eventbroker_loom)]

use eventbroker::__private::CellModel;
use eventbroker::EventStatus;
use loom::sync::Arc;
use loom::thread;

mod common;
use common::model;

/// A write through a slot whose event is evicted and whose slot is reused meanwhile either lands
/// on the evicted event (before the eviction) or not at all: never on the event after it.
#[test]
fn a_write_racing_eviction_never_reaches_the_next_event() {
    model(3, || {
        let cell = Arc::new(CellModel::new());
        let first = cell.store(EventStatus::Pending);
        let worker = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || cell.update(first, EventStatus::Completed, 1, 1_000))
        };
        cell.retire();
        let second = cell.store(EventStatus::Pending);
        let landed = worker.join().unwrap();
        assert_ne!(first, second);
        assert_eq!(cell.read(), (EventStatus::Pending, 0, None), "the next event is untouched");
        assert!(!cell.update(first, EventStatus::Failed, 0, 0), "a retired generation stays retired");
        let _ = landed; // Either outcome is allowed; what it may not do is checked above.
    });
}

/// A reader holding the shard's lock sees a write whole or not at all: the status, the retry count
/// and the time it carries arrive together.
#[test]
fn a_reader_sees_a_write_whole_or_not_at_all() {
    model(3, || {
        let cell = Arc::new(CellModel::new());
        let generation = cell.store(EventStatus::Processing);
        let worker = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || assert!(cell.update(generation, EventStatus::Completed, 2, 5_000)))
        };
        let seen = cell.read();
        assert!(
            seen == (EventStatus::Processing, 0, None) || seen == (EventStatus::Completed, 2, Some(5_000)),
            "a torn read: {seen:?}"
        );
        worker.join().unwrap();
        assert_eq!(cell.read(), (EventStatus::Completed, 2, Some(5_000)));
    });
}
