//! `Broker::publish_when_room`: publishing from async code that waits for room without blocking
//! its runtime's thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::{Backpressure, Broker, Event, PublishError};

mod common;
use common::{event, wait_until};

const WAIT: Duration = Duration::from_secs(10);

/// A one-worker broker with 4-slot shards whose handler of `slow` holds each event until the
/// returned gate opens; `handled` counts the events it took (each as it begins holding it).
fn held_broker(backpressure: Backpressure) -> (Broker, Arc<AtomicBool>, Arc<AtomicU64>) {
    let broker = Broker::builder().workers(1).buffer_size(4).backpressure(backpressure).build().unwrap();
    let open = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let (gate, count) = (Arc::clone(&open), Arc::clone(&handled));
    broker
        .subscribe("slow", move |_: &Event| {
            count.fetch_add(1, Ordering::Relaxed);
            // Bounded, so that a failing test does not hang.
            let until = Instant::now() + WAIT;
            while !gate.load(Ordering::Acquire) && Instant::now() < until {
                thread::sleep(Duration::from_millis(1));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    (broker, open, handled)
}

/// Fills the shard: one event the worker holds in its handler, then as many as the ring takes.
/// Returns how many it took in all.
fn fill(broker: &Broker, handled: &AtomicU64) -> u64 {
    broker.try_publish(event("slow")).unwrap();
    // Until the worker holds it, the ring may look full only because the worker has not taken
    // its batch yet.
    wait_until("the worker holds the first event", WAIT, || handled.load(Ordering::Relaxed) == 1);
    let mut accepted = 1;
    loop {
        match broker.try_publish(event("slow")) {
            Ok(()) => accepted += 1,
            Err(PublishError::Full(_)) => return accepted,
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(accepted < 100, "a 4-slot shard behind a held handler fills up");
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
}

#[test]
fn the_future_can_be_spawned_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send>(_: &T) {}
    let broker = Broker::builder().build().unwrap();
    let future = broker.publish_when_room(event("any.type"));
    assert_send(&future);
    drop(future);
    let confirmed = broker.publish_confirmed_when_room(event("any.type"), WAIT);
    assert_send(&confirmed);
    drop(confirmed);
    // Dropped before their first poll: nothing was published.
    broker.drain(WAIT).unwrap();
    assert_eq!(broker.stats().published, 0);
}

#[test]
fn a_full_shard_leaves_the_runtime_thread_free_and_queues_once_a_slot_frees() {
    let (broker, open, handled) = held_broker(Backpressure::Block(Duration::from_secs(60)));
    let accepted = fill(&broker, &handled);
    let waiting = event("slow");
    let id = waiting.id;
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let broker = broker.clone();
        let publish = tokio::spawn(async move { broker.publish_when_room(waiting).await });
        // The one thread of this runtime keeps running other tasks while the publish waits.
        let mut ticks = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(100) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            ticks += 1;
        }
        assert!(ticks >= 5, "the runtime's thread ran {ticks} ticks in 100 ms");
        assert!(!publish.is_finished(), "the shard is still full");

        let opened = Instant::now();
        open.store(true, Ordering::Release);
        let outcome = tokio::time::timeout(WAIT, publish).await.expect("woken when a slot frees");
        outcome.unwrap().unwrap();
        // A worker's batch frees slots as soon as its handlers return: far less than the 60 s
        // patience, and than any timer-driven poll would need to be lucky for.
        assert!(opened.elapsed() < Duration::from_secs(5), "{:?}", opened.elapsed());
    });
    broker.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), accepted + 1);
    assert_eq!(broker.provider().get(id).unwrap().map(|e| e.id), Some(id), "stored like any publish");
    assert_eq!(broker.stats().rejected, 1, "only the `try_publish` that found the shard full");
}

#[test]
fn the_event_comes_back_when_the_patience_runs_out() {
    let (broker, open, handled) = held_broker(Backpressure::Block(Duration::from_millis(100)));
    let accepted = fill(&broker, &handled);
    let waiting = event("slow").with_metadata("kept", "intact");
    let id = waiting.id;
    let started = Instant::now();
    let outcome = current_thread_runtime().block_on(broker.publish_when_room(waiting));
    let waited = started.elapsed();
    match outcome {
        Err(PublishError::Full(back)) => {
            assert_eq!((back.id, back.metadata["kept"].as_str()), (id, Some("intact")));
        }
        other => panic!("expected the event back as full, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(100), "gave up after {waited:?}");
    assert!(waited < WAIT, "gave up after {waited:?}");
    assert_eq!(broker.stats().rejected, 2);
    open.store(true, Ordering::Release);
    broker.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), accepted);
    assert!(broker.provider().get(id).unwrap().is_none(), "an event handed back is stored nowhere");
}

#[test]
fn under_the_reject_policy_it_does_not_wait() {
    let (broker, open, handled) = held_broker(Backpressure::Reject);
    fill(&broker, &handled);
    let started = Instant::now();
    let outcome = current_thread_runtime().block_on(broker.publish_when_room(event("slow")));
    assert!(matches!(outcome, Err(PublishError::Full(_))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    open.store(true, Ordering::Release);
    broker.drain(WAIT).unwrap();
}

#[test]
fn shutdown_wakes_a_waiting_publish_with_its_event() {
    let (broker, open, handled) = held_broker(Backpressure::Block(Duration::from_secs(60)));
    fill(&broker, &handled);
    let waiting = event("slow");
    let id = waiting.id;
    let publisher = {
        let broker = broker.clone();
        thread::spawn(move || current_thread_runtime().block_on(broker.publish_when_room(waiting)))
    };
    // The shard stays full until shutdown closes it (the gate opens once shutdown has begun), and
    // the publish is given a moment to reach its wait first: either way, it gets its event back.
    thread::sleep(Duration::from_millis(50));
    let closer = {
        let broker = broker.clone();
        thread::spawn(move || broker.shutdown(WAIT))
    };
    let started = Instant::now();
    let outcome = publisher.join().unwrap();
    assert!(started.elapsed() < WAIT, "woken by the close, not by its 60 s patience");
    match outcome {
        Err(PublishError::Closed(back)) => assert_eq!(back.id, id),
        other => panic!("expected the event back as closed, got {other:?}"),
    }
    open.store(true, Ordering::Release);
    assert!(closer.join().unwrap().is_clean());
}

#[test]
fn an_invalid_event_is_handed_back_before_any_wait() {
    let broker = Broker::builder().build().unwrap();
    let outcome = current_thread_runtime().block_on(broker.publish_when_room(event("bad..type")));
    assert!(matches!(outcome, Err(PublishError::InvalidType { .. })), "{outcome:?}");
}

#[test]
fn many_tasks_waiting_on_one_shard_all_get_through_in_time() {
    const TASKS: u64 = 64;
    let (broker, open, handled) = held_broker(Backpressure::Block(Duration::from_secs(60)));
    let accepted = fill(&broker, &handled);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let broker = broker.clone();
                tokio::spawn(async move { broker.publish_when_room(event("slow")).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.store(true, Ordering::Release);
        for task in tasks {
            tokio::time::timeout(WAIT, task).await.expect("every waiting task gets a slot").unwrap().unwrap();
        }
    });
    wait_until("every event handled", WAIT, || handled.load(Ordering::Relaxed) == accepted + TASKS);
    broker.drain(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn a_confirmed_publish_dropped_while_it_waits_for_room_publishes_nothing() {
    let (broker, open, handled) = held_broker(Backpressure::Block(Duration::from_secs(60)));
    let accepted = fill(&broker, &handled);
    let waiting = event("slow");
    let id = waiting.id;
    let runtime = current_thread_runtime();
    runtime.block_on(async {
        let publish = broker.publish_confirmed_when_room(waiting, WAIT);
        // Cancelled mid-wait, as a `select!` or a `timeout` does.
        let outcome = tokio::time::timeout(Duration::from_millis(50), publish).await;
        assert!(outcome.is_err(), "the shard is still full: {outcome:?}");
    });
    open.store(true, Ordering::Release);
    broker.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), accepted, "the dropped publish queued nothing");
    assert!(broker.provider().get(id).unwrap().is_none(), "nor stored anything");
    // The shard's waiters were left clean: a later publish waits and gets through as usual.
    let (first, then) = (event("slow"), event("slow"));
    runtime.block_on(async {
        broker.publish_confirmed_when_room(first, WAIT).await.unwrap();
        broker.publish_confirmed_when_room(then, WAIT).await.unwrap();
    });
    broker.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), accepted + 2);
    assert!(broker.shutdown(WAIT).is_clean());
}
