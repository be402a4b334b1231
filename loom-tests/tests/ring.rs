//! loom models of the shard ring buffer and its park/unpark handshake.
//!
//! Each model explores every interleaving of a few threads (up to a preemption bound: 2 by
//! default, `LOOM_MAX_PREEMPTIONS` to override) over the very code in `src/dispatch/`. loom fails
//! a model on a data race on a slot, on a leaked `Arc` (a value the ring forgot to drop), and on a
//! deadlock: a consumer parked with nobody left to wake it is a lost wake-up.
//!
//! The consumer always runs on a spawned thread that joins nobody, and the main thread does the
//! joining: loom (0.7) lets an `unpark` wake a thread blocked in `JoinHandle::join`, and then fails
//! an internal assertion, so a late unpark — harmless with std, where it leaves a token for the
//! next `park` — must not reach a joining thread.
//!
//! No model retries a push in a loop: loom explores a yield-and-retry loop by running it again
//! and again, past its branch budget, even while the consumer could run. Each push is one attempt,
//! and the assertions check that a refusal was legitimate (the ring was full) instead.
#![cfg(eventbroker_loom)]

use std::collections::VecDeque;

use eventbroker::__private::{
    Consumer, Nudge, PushBatchError, PushError, WaitOutcome, ring, try_reserve, wait_or,
};
use eventbroker::WaitStrategy;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

mod common;
use common::model;

/// Straight to the park handshake: the phase under test. Spinning and yielding only poll, and their
/// many polls would exhaust loom's branch budget.
const PARK_AT_ONCE: WaitStrategy = WaitStrategy::Blocking { spins: 0, yields: 0 };

/// Pops `count` values, waiting by `strategy` between pops.
fn pop_n<T>(consumer: &mut Consumer<T>, count: usize, strategy: WaitStrategy) -> Vec<T> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let missing = count - seen.len();
        if consumer.pop_batch(&mut seen, missing) == 0 {
            assert_eq!(consumer.wait(strategy, None), WaitOutcome::Ready);
        }
    }
    seen
}

/// Pops everything until the ring reports closed and drained.
fn drain<T>(consumer: &mut Consumer<T>) -> Vec<T> {
    let mut seen = Vec::new();
    loop {
        if let Some(value) = consumer.pop() {
            seen.push(value);
        } else if consumer.wait(PARK_AT_ONCE, None) == WaitOutcome::Closed {
            assert!(consumer.is_drained());
            return seen;
        }
    }
}

/// Two producers, three values, two slots, starting one position in so that the claims wrap
/// around the end of the buffer (positions 1, 2, 3 land in slots 1, 0, 1). One attempt per value:
/// every accepted value comes out exactly once, each producer's in its order, and `Full` is only
/// reported when both slots were taken.
#[test]
fn two_producers_wrap_around_a_two_slot_ring() {
    model(2, || {
        let (producer, mut consumer) = ring::<(u8, u8)>(2);
        producer.try_push((9, 9)).unwrap();
        assert_eq!(consumer.pop(), Some((9, 9)));
        let consumer = thread::spawn(move || drain(&mut consumer));
        let other = producer.clone();
        let second = thread::spawn(move || accepted(other.try_push((1, 0))));
        let mut first = Vec::new();
        for seq in 0..2 {
            if !accepted(producer.try_push((0, seq))) {
                break;
            }
            first.push((0, seq));
        }

        let pushed_second = second.join().unwrap();
        assert!(producer.close());
        let seen = consumer.join().unwrap();
        // A refusal means both slots were taken then; the consumer may free one in between.
        assert!(first.len() + usize::from(pushed_second) >= 2, "seen: {seen:?}");
        let seen_first: Vec<_> = seen.iter().copied().filter(|(id, _)| *id == 0).collect();
        assert_eq!(seen_first, first);
        assert_eq!(seen.contains(&(1, 0)), pushed_second, "seen: {seen:?}");
        assert_eq!(seen.len(), first.len() + usize::from(pushed_second));
    });
}

/// A producer that finds room by another producer's look at the head writes its slot only after
/// the consumer has read the value before it. Two slots, both full. The second producer starts
/// first; the consumer takes both values on a thread of its own, which the first producer joins
/// before it loads the head and claims a slot; the second can then claim the next by the first's
/// look at the head alone (`seen_head`), without loading the head itself, and nothing else orders
/// the consumer's read of that slot before its write. loom reports a data race on the slot unless
/// the look carries the read over. One attempt each.
#[test]
fn room_found_by_another_producers_look_at_the_head() {
    model(2, || {
        let (producer, mut consumer) = ring::<u8>(2);
        producer.try_push(0).unwrap();
        producer.try_push(1).unwrap();
        let other = producer.clone();
        let second = thread::spawn(move || accepted(other.try_push(3)));
        let taker = thread::spawn(move || {
            let taken = pop_n(&mut consumer, 2, PARK_AT_ONCE);
            (taken, consumer)
        });
        let (taken, mut consumer) = taker.join().unwrap();
        assert_eq!(taken, [0, 1]);
        let pushed_first = accepted(producer.try_push(2));

        let pushed_second = second.join().unwrap();
        assert!(producer.close());
        let rest = drain(&mut consumer);
        assert!(pushed_first || pushed_second, "two slots were free for two pushes");
        assert_eq!(rest.contains(&2), pushed_first, "rest: {rest:?}");
        assert_eq!(rest.contains(&3), pushed_second, "rest: {rest:?}");
        assert_eq!(rest.len(), usize::from(pushed_first) + usize::from(pushed_second));
    });
}

/// Whether a single push attempt was accepted; `Full` is the only acceptable refusal.
fn accepted<T>(result: Result<(), PushError<T>>) -> bool {
    match result {
        Ok(()) => true,
        Err(PushError::Full(_)) => false,
        Err(PushError::Closed(_)) => panic!("nobody closed the ring yet"),
    }
}

/// A batch claim racing a single push across the end of the buffer, one attempt each: the batch takes what fits (all,
/// part, or nothing), the push succeeds or reports `Full`, and the consumer drains exactly what was
/// accepted, the batch's part contiguous and in order.
#[test]
fn a_batch_races_a_push_across_the_wrap() {
    model(2, || {
        let (producer, mut consumer) = ring::<u8>(2);
        // One lap's worth of offset: the claims below land in slot 1, then slot 0.
        producer.try_push(0).unwrap();
        assert_eq!(consumer.pop(), Some(0));
        let consumer = thread::spawn(move || drain(&mut consumer));
        let other = producer.clone();
        let single = thread::spawn(move || accepted(other.try_push(20)));
        let mut values: VecDeque<u8> = [10, 11].into();
        let taken = match producer.try_push_batch(&mut values) {
            Ok(taken) => taken,
            Err(PushBatchError::Full) => 0,
            Err(PushBatchError::Closed) => panic!("nobody closed the ring yet"),
        };

        let pushed_single = single.join().unwrap();
        assert!(producer.close());
        let seen = consumer.join().unwrap();
        let accepted = taken + usize::from(pushed_single);
        // A refusal means both slots were taken then; the consumer may free one in between.
        assert!(accepted >= 2, "only {accepted} accepted");
        let batch: Vec<_> = seen.iter().copied().filter(|v| (10..20).contains(v)).collect();
        assert_eq!(batch, [10, 11][..taken], "seen: {seen:?}");
        assert_eq!(seen.contains(&20), pushed_single, "seen: {seen:?}");
        assert_eq!(seen.len(), accepted);
    });
}

/// A push racing a close from another thread, with the consumer parked or about to park: the
/// value is either drained or handed back as `Closed` — never stranded, never lost, and the
/// close wakes the consumer.
#[test]
fn close_racing_a_push_strands_nothing() {
    model(3, || {
        let (producer, mut consumer) = ring::<u8>(2);
        let consumer = thread::spawn(move || drain(&mut consumer));
        let closer = producer.clone();
        let pusher = thread::spawn(move || match producer.try_push(7) {
            Ok(()) => true,
            Err(PushError::Closed(7)) => false,
            Err(other) => panic!("unexpected {other:?}"),
        });
        assert!(closer.close());

        let accepted = pusher.join().unwrap();
        let seen = consumer.join().unwrap();
        assert_eq!(seen, if accepted { vec![7] } else { vec![] });
    });
}

/// The park handshake: a consumer that parks is woken by each push (one single, one batch). A
/// lost wake-up leaves it parked forever, which loom reports as a deadlock.
#[test]
fn pushes_wake_a_parked_consumer() {
    model(3, || {
        let (producer, mut consumer) = ring::<u8>(2);
        let consumer = thread::spawn(move || pop_n(&mut consumer, 2, PARK_AT_ONCE));
        producer.try_push(1).unwrap();
        let mut values: VecDeque<u8> = [2].into();
        // Two slots, one taken at most: a batch of one always fits.
        assert_eq!(producer.try_push_batch(&mut values), Ok(1));

        assert_eq!(consumer.join().unwrap(), [1, 2]);
    });
}

/// Values still in the ring when its last handle goes are dropped (loom fails on a leaked `Arc`),
/// whichever end goes last.
#[test]
fn the_last_handle_drops_what_is_left() {
    model(2, || {
        let (producer, mut consumer) = ring::<Arc<u8>>(2);
        let consumer = thread::spawn(move || {
            let first = pop_n(&mut consumer, 1, PARK_AT_ONCE);
            assert_eq!(*first[0], 1);
        });
        producer.try_push(Arc::new(1)).unwrap();
        // Fits (two slots), unless the consumer has already gone: dropping it closes the ring, and
        // the refused value is dropped here.
        drop(producer.try_push(Arc::new(2)));
        drop(producer);

        consumer.join().unwrap();
    });
}

/// A reservation forgotten instead of committed (the broker never does this, and safe code outside
/// the crate cannot reach one): the value claimed after it, pushed while the consumer goes, is
/// dropped exactly once — with the ring or as a refused push — and the unwritten slot is never read.
#[test]
fn a_forgotten_reservation_is_skipped_when_the_ring_drops() {
    model(2, || {
        let (producer, consumer) = ring::<Option<Arc<u8>>>(2);
        std::mem::forget(try_reserve(&producer, 1).unwrap());
        let pusher = {
            let producer = producer.clone();
            thread::spawn(move || drop(producer.try_push(Some(Arc::new(1)))))
        };
        drop(consumer);
        pusher.join().unwrap();
        drop(producer);
    });
}

/// Work that does not come through the ring (an acknowledged delivery's outcome): the maker sets
/// a flag and nudges; the consumer, waiting with the flag as its `also`, wakes whichever comes
/// first, its last look before it parks or the nudge. A lost wake-up deadlocks the model.
#[test]
fn a_nudge_wakes_a_consumer_waiting_for_other_work() {
    model(3, || {
        let (producer, mut consumer) = ring::<u32>(2);
        let nudge = Nudge::new(&consumer);
        let ready = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&ready);
        let waiter = thread::spawn(move || {
            while !seen.load(Ordering::Relaxed) {
                let outcome = wait_or(&mut consumer, PARK_AT_ONCE, || seen.load(Ordering::Relaxed));
                assert_eq!(outcome, WaitOutcome::Ready);
            }
        });
        ready.store(true, Ordering::Release);
        nudge.wake();
        waiter.join().unwrap();
        drop(producer);
    });
}
