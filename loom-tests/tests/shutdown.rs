//! loom models of shutdown racing publishers: the intake handshake that `publish_sync` and
//! shutdown share, and a reserved ring slot racing the ring's close.
#![cfg(eventbroker_loom)]

use eventbroker::__private::{Intake, PushBatchError, WaitOutcome, ring, try_reserve};
use eventbroker::WaitStrategy;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

mod common;
use common::model;

/// A synchronous publish racing shutdown: either the publish backs out, or shutdown, having
/// closed the intake and seen it idle, also sees the publish's work done. Never a publish that
/// runs after shutdown thinks everything is finished.
#[test]
fn sync_publish_racing_shutdown_is_waited_for_or_refused() {
    model(3, || {
        let intake = Arc::new(Intake::new());
        let work = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (intake, work, refused) = (Arc::clone(&intake), Arc::clone(&work), Arc::clone(&refused));
            thread::spawn(move || match intake.enter() {
                Some(entered) => {
                    work.store(1, Ordering::Relaxed);
                    drop(entered);
                }
                None => refused.store(true, Ordering::Relaxed),
            })
        };
        assert!(intake.close());
        while !intake.is_idle() {
            thread::yield_now();
        }
        // Shutdown proceeds here (flushes the writer): the publish is done or will never run.
        let done = work.load(Ordering::Relaxed) == 1;
        publisher.join().unwrap();
        let refused = refused.load(Ordering::Relaxed);
        assert!(done != refused, "done at shutdown: {done}, refused: {refused}");
    });
}

/// A two-phase publish (reserve, then commit) racing close: a reservation made before the close
/// is drained by the consumer after it commits; one after the close is refused. The consumer never
/// reports the ring drained while a reserved slot is still to come.
#[test]
fn a_reservation_racing_close_is_drained_or_refused() {
    model(2, || {
        let (producer, mut consumer) = ring::<Option<u32>>(2);
        let outcome = Arc::new(AtomicUsize::new(0)); // 1 = committed, 2 = refused
        let publisher = {
            let (producer, outcome) = (producer.clone(), Arc::clone(&outcome));
            thread::spawn(move || match try_reserve(&producer, 1) {
                Ok(reservation) => {
                    reservation.commit([Some(7)]);
                    outcome.store(1, Ordering::Relaxed);
                }
                Err(PushBatchError::Closed) => outcome.store(2, Ordering::Relaxed),
                Err(PushBatchError::Full) => unreachable!("the ring is empty"),
            })
        };
        let consumer = thread::spawn(move || {
            let mut seen = Vec::new();
            loop {
                if let Some(value) = consumer.pop() {
                    seen.push(value);
                } else if consumer.wait(WaitStrategy::Blocking { spins: 0, yields: 0 }, None)
                    == WaitOutcome::Closed
                {
                    return seen;
                }
            }
        });
        producer.close();
        publisher.join().unwrap();
        let seen = consumer.join().unwrap();
        match outcome.load(Ordering::Relaxed) {
            1 => assert_eq!(seen, [Some(7)]),
            2 => assert!(seen.is_empty()),
            other => unreachable!("outcome {other}"),
        }
    });
}
