//! The broker's behaviour: ordering, backpressure, failure handling, shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::prelude::*;
use eventbroker::{
    Backpressure, BatchRejection, Broker, CloseOutcome, DeadLetterFilter, Event, EventFilter, EventId,
    EventStatus, MemoryConfig, MemoryProvider, Mode, PublishError, RetryPolicy, SubscribeError,
    SyncPublishError,
};
use serde_json::json;

mod common;
use common::{event, quick_retries, wait_until};

fn failing(message: &'static str) -> impl Fn(&Event) -> Result<(), String> + Send + Sync + 'static {
    move |_| Err(message.to_owned())
}

#[test]
fn events_of_one_key_are_handled_in_publish_order_per_publisher() {
    const KEYS: u64 = 16;
    const PER_PUBLISHER: u64 = 20_000;
    let broker = Broker::builder().workers(4).buffer_size(256).track_status(false).build().unwrap();
    // (key, publisher) -> last sequence seen
    let last: Arc<Mutex<HashMap<(String, u64), u64>>> = Arc::default();
    let violations = Arc::new(AtomicU64::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    let (l, v, h) = (Arc::clone(&last), Arc::clone(&violations), Arc::clone(&handled));
    broker
        .subscribe("order.>", move |e: &Event| {
            let publisher = e.metadata["publisher"].as_u64().unwrap();
            let seq = e.metadata["seq"].as_u64().unwrap();
            let mut last = l.lock().unwrap();
            let previous = last.insert((e.partition().to_owned(), publisher), seq);
            if previous.is_some_and(|p| p >= seq) {
                v.fetch_add(1, Ordering::Relaxed);
            }
            h.fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    thread::scope(|s| {
        for publisher in 0..2u64 {
            let broker = &broker;
            s.spawn(move || {
                for seq in 0..PER_PUBLISHER {
                    let key = format!("account-{}", seq % KEYS);
                    let e = event(&format!("order.t{}", seq % 5))
                        .with_partition_key(key)
                        .with_metadata("publisher", publisher)
                        .with_metadata("seq", seq);
                    broker.publish(e).unwrap();
                }
            });
        }
    });
    let report = broker.shutdown(Duration::from_secs(30));
    assert!(!report.timed_out);
    assert_eq!(handled.load(Ordering::Relaxed), 2 * PER_PUBLISHER);
    assert_eq!(violations.load(Ordering::Relaxed), 0, "per-key order broken");
    let used_shards = broker.stats().shards.iter().filter(|s| s.dispatched > 0).count();
    assert!(used_shards > 1, "16 keys should spread over the 4 shards");
}

#[test]
fn a_full_shard_hands_the_event_back_and_stores_nothing() {
    let provider = Arc::new(MemoryProvider::default());
    let broker = Broker::builder()
        .workers(1)
        .buffer_size(4)
        .backpressure(Backpressure::Reject)
        .provider(provider.clone())
        .build()
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&release);
    broker
        .subscribe("slow", move |_: &Event| {
            while !r.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(1));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    let mut accepted = Vec::new();
    let mut rejected = None;
    for i in 0..100 {
        let e = event("slow").with_metadata("i", i);
        let id = e.id;
        match broker.publish_async(e) {
            Ok(()) => accepted.push(id),
            Err(PublishError::Full(e)) => {
                rejected = Some(*e);
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let rejected = rejected.expect("a 4-slot shard behind a stuck handler fills up");
    // 4 in the ring, and up to one drained batch (4) in the worker's hands.
    assert!((4..=8).contains(&accepted.len()), "{}", accepted.len());
    assert_eq!(broker.stats().rejected, 1);
    release.store(true, Ordering::Release);
    broker.flush(Duration::from_secs(5)).unwrap();
    assert!(
        provider.get(rejected.id).unwrap().is_none(),
        "a rejected event must not be stored (seed pitfall 12)"
    );
    let report = broker.shutdown(Duration::from_secs(10));
    assert!(!report.timed_out);
    assert_eq!(broker.stats().processed, accepted.len() as u64);
}

#[test]
fn blocking_backpressure_waits_for_room_then_times_out() {
    let broker = Broker::builder()
        .workers(1)
        .buffer_size(2)
        .backpressure(Backpressure::Block(Duration::from_millis(200)))
        .build()
        .unwrap();
    let open = Arc::new(AtomicBool::new(false));
    let o = Arc::clone(&open);
    broker
        .subscribe("gate", move |_: &Event| {
            while !o.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(1));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    // The worker holds what it drained (one batch) in the stuck handler; the ring then fills.
    let mut accepted = 0;
    let timed_out = loop {
        let started = Instant::now();
        match broker.publish_async(event("gate")) {
            Ok(()) => accepted += 1,
            Err(PublishError::Full(_)) => break started.elapsed(),
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(accepted <= 2 + 256, "the ring and one worker batch hold at most 258");
    };
    assert!(timed_out >= Duration::from_millis(200), "gave up after {timed_out:?}, before the timeout");
    // A publisher blocked on a full shard gets in as soon as the worker makes room.
    thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(50));
            open.store(true, Ordering::Release);
        });
        broker.publish(event("gate")).unwrap();
    });
    assert!(!broker.shutdown(Duration::from_secs(10)).timed_out);
    assert_eq!(broker.stats().processed, accepted + 1);
}

#[test]
fn a_million_events_are_each_handled_exactly_once() {
    const N: usize = 1_000_000;
    let broker = Broker::builder().workers(2).buffer_size(4096).track_status(false).build().unwrap();
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let s = Arc::clone(&seen);
    broker
        .subscribe("bulk.*", move |e: &Event| {
            let i = usize::try_from(e.user_id).unwrap();
            s[i].fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    for i in 0..N {
        broker
            .publish(
                event(if i % 2 == 0 { "bulk.even" } else { "bulk.odd" })
                    .with_user_id(i64::try_from(i).unwrap()),
            )
            .unwrap();
    }
    let report = broker.shutdown(Duration::from_secs(120));
    assert!(!report.timed_out);
    let wrong: Vec<usize> = (0..N).filter(|&i| seen[i].load(Ordering::Relaxed) != 1).take(5).collect();
    assert!(wrong.is_empty(), "events not handled exactly once: {wrong:?}");
    let stats = broker.stats();
    assert_eq!((stats.published, stats.processed, stats.completed), (N as u64, N as u64, N as u64));
}

#[test]
fn a_panicking_handler_fails_its_delivery_and_the_worker_lives() {
    let broker = Broker::builder().workers(1).retry_policy(RetryPolicy::none()).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe("p", move |e: &Event| {
            assert!(e.user_id % 10 != 0, "every 10th event panics");
            h.fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    for i in 1..=1000 {
        broker.publish(event("p").with_user_id(i)).unwrap();
    }
    wait_until("processing", Duration::from_secs(10), || broker.stats().processed == 1000);
    assert_eq!(handled.load(Ordering::Relaxed), 900);
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.dead_letters), (900, 100, 100));
    let letters = broker.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!(letters.len(), 100);
    let error = &letters[0].error;
    assert!(error.starts_with("handler panicked: every 10th event panics"), "{error}");
    broker.publish(event("p").with_user_id(1001)).unwrap();
    let report = broker.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(handled.load(Ordering::Relaxed), 901, "the worker survived 100 panics");
}

#[test]
fn retries_follow_the_policy_per_delivery() {
    let policy = RetryPolicy {
        max_retries: 3,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(60),
        backoff_factor: 2.0,
        jitter: 0.0,
    };
    let broker = Broker::builder().workers(1).retry_policy(policy).build().unwrap();
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let a = Arc::clone(&attempts);
    broker
        .subscribe("flaky", move |_: &Event| {
            a.lock().unwrap().push(Instant::now());
            Err::<(), _>("down")
        })
        .unwrap();
    let ok_calls = Arc::new(AtomicU64::new(0));
    let o = Arc::clone(&ok_calls);
    broker
        .subscribe("flaky", move |_: &Event| {
            o.fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    broker.publish(event("flaky")).unwrap();
    wait_until("the dead letter", Duration::from_secs(10), || broker.stats().dead_letters == 1);
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 4, "1 attempt + 3 retries");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, expected) in gaps.iter().zip([20, 40, 60].map(Duration::from_millis)) {
        assert!(*gap >= expected, "retry came after {gap:?}, before its delay {expected:?}");
        assert!(*gap < expected + Duration::from_millis(500), "retry came {gap:?} late for {expected:?}");
    }
    assert_eq!(ok_calls.load(Ordering::Relaxed), 1, "the healthy subscription is not retried");
    broker.flush(Duration::from_secs(5)).unwrap();
    let letters = broker.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!((letters.len(), letters[0].attempts, letters[0].error.as_str()), (1, 4, "down"));
    assert_eq!(letters[0].event.retry_count, 3, "retry count of this delivery only");
    let stored = broker.provider().list(&EventFilter::default()).unwrap();
    assert_eq!(stored[0].status, EventStatus::Failed);
    assert_eq!(stored[0].retry_count, 3);
    assert_eq!(stored[0].error, "down");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn jitter_only_shortens_retry_delays() {
    let policy = RetryPolicy {
        max_retries: 2,
        initial_delay: Duration::from_millis(40),
        max_delay: Duration::from_millis(40),
        backoff_factor: 1.0,
        jitter: 0.5,
    };
    let broker = Broker::builder().workers(1).retry_policy(policy).build().unwrap();
    let attempts: Arc<Mutex<HashMap<i64, Vec<Instant>>>> = Arc::default();
    let a = Arc::clone(&attempts);
    broker
        .subscribe("j", move |e: &Event| {
            a.lock().unwrap().entry(e.user_id).or_default().push(Instant::now());
            Err::<(), _>("no")
        })
        .unwrap();
    for i in 0..20 {
        broker.publish(event("j").with_user_id(i)).unwrap();
    }
    wait_until("all dead letters", Duration::from_secs(10), || broker.stats().dead_letters == 20);
    for times in attempts.lock().unwrap().values() {
        for gap in times.windows(2).map(|w| w[1] - w[0]) {
            assert!(gap >= Duration::from_millis(20), "jitter shortened a delay below half: {gap:?}");
        }
    }
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_pending_retry_does_not_stall_its_shard() {
    let policy = RetryPolicy {
        initial_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(30),
        ..quick_retries(1)
    };
    let broker = Broker::builder().workers(1).retry_policy(policy).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe("same.key", move |e: &Event| {
            if e.user_id == 0 {
                return Err("first one fails".to_owned());
            }
            h.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    for i in 0..100 {
        broker.publish(event("same.key").with_user_id(i)).unwrap();
    }
    wait_until("the events behind the failure", Duration::from_secs(5), || {
        handled.load(Ordering::Relaxed) == 99
    });
    assert_eq!(broker.stats().pending_retries, 1);
    // The retry is not due before the deadline: shutdown dead-letters it instead of waiting 30 s.
    let report = broker.shutdown(Duration::from_millis(500));
    assert_eq!(report.dead_lettered, 1);
    assert!(report.elapsed < Duration::from_secs(5));
    let stats = broker.stats();
    assert_eq!(
        (stats.failed, stats.dead_letters, stats.writer.dead_letters),
        (1, 1, 1),
        "written before closing"
    );
}

#[test]
fn retries_due_before_the_deadline_run_during_shutdown() {
    // Retries due 50 ms and 100 ms after the first attempt: still pending when shutdown begins.
    let policy = RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(50),
        ..quick_retries(2)
    };
    let broker = Broker::builder().workers(1).retry_policy(policy).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    broker
        .subscribe(
            "eventually",
            move |_: &Event| {
                if c.fetch_add(1, Ordering::Relaxed) < 2 { Err("not yet") } else { Ok(()) }
            },
        )
        .unwrap();
    broker.publish(event("eventually")).unwrap();
    let report = broker.shutdown(Duration::from_secs(5));
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    assert_eq!(
        (report.retries_run, report.dead_lettered),
        (2, 0),
        "a failed retry that was rescheduled counts too"
    );
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.retries), (1, 0, 2));
}

/// A `publish_sync` retrying on its caller's thread when shutdown begins: the report counts the
/// retries it made meanwhile, and the delivery whose retry shutdown did not wait for, as it counts
/// a worker's.
#[test]
fn the_shutdown_report_counts_what_a_synchronous_publish_did_meanwhile() {
    let failing_twice = |calls: &Arc<AtomicU64>| {
        let c = Arc::clone(calls);
        move |_: &Event| if c.fetch_add(1, Ordering::Relaxed) < 2 { Err("not yet") } else { Ok(()) }
    };
    // Retries due 50 ms and 100 ms after the first attempt: both run while shutdown waits.
    let soon = RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(50),
        ..quick_retries(2)
    };
    // A retry due in a minute: shutdown does not wait for it.
    let late = RetryPolicy {
        initial_delay: Duration::from_secs(60),
        max_delay: Duration::from_secs(60),
        ..quick_retries(2)
    };
    for (policy, counted) in [(soon, (2, 0)), (late, (0, 1))] {
        let memory = Arc::new(MemoryProvider::default());
        let broker = Broker::builder().provider(memory.clone()).retry_policy(policy).build().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        broker.subscribe("eventually", failing_twice(&calls)).unwrap();
        thread::scope(|s| {
            let publish = s.spawn(|| broker.publish_sync(event("eventually")));
            wait_until("the first attempt", Duration::from_secs(5), || calls.load(Ordering::Relaxed) > 0);
            let report = broker.shutdown(Duration::from_secs(1));
            let outcome = publish.join().unwrap();
            assert!(report.is_clean(), "{report:?}");
            assert_eq!((report.retries_run, report.dead_lettered), counted, "{report:?}, {outcome:?}");
            assert_eq!(outcome.is_ok(), counted.1 == 0, "{outcome:?}");
        });
        assert_eq!(broker.stats().dead_letters, counted.1);
        let stored = memory.list_dead_letters(&DeadLetterFilter::new()).unwrap();
        assert_eq!(stored.len() as u64, counted.1, "the letter is written by the deadline");
    }
}

#[test]
fn max_retries_zero_turns_retries_off() {
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    broker
        .subscribe("once", move |_: &Event| {
            c.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>("no")
        })
        .unwrap();
    broker.publish(event("once")).unwrap();
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    assert_eq!(broker.stats().dead_letters, 1);
}

#[test]
fn unsubscribing_under_heavy_publishing_is_safe() {
    let broker = Broker::builder().workers(2).buffer_size(1024).track_status(false).build().unwrap();
    let stop = AtomicBool::new(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let after_unsubscribe = Arc::new(AtomicU64::new(0));
    thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                broker.publish(event("churn.a").with_user_id(i)).unwrap();
                i += 1;
            }
        });
        for round in 0..200 {
            let d = Arc::clone(&delivered);
            let id = broker
                .subscribe("churn.*", move |_: &Event| {
                    d.fetch_add(1, Ordering::Relaxed);
                    Ok::<(), String>(())
                })
                .unwrap();
            thread::sleep(Duration::from_micros(200));
            assert!(broker.unsubscribe(id), "round {round}");
            assert!(!broker.unsubscribe(id), "a second unsubscribe finds nothing");
        }
        // An event published after the last unsubscribe returned never reaches a removed handler.
        let gate = Arc::new(AtomicBool::new(true));
        let (g, a) = (Arc::clone(&gate), Arc::clone(&after_unsubscribe));
        let probe = broker
            .subscribe("churn.probe", move |_: &Event| {
                if !g.load(Ordering::SeqCst) {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
            .unwrap();
        broker.unsubscribe(probe);
        gate.store(false, Ordering::SeqCst);
        for _ in 0..1000 {
            broker.publish(event("churn.probe")).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let report = broker.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
    assert!(delivered.load(Ordering::Relaxed) > 0);
    assert_eq!(after_unsubscribe.load(Ordering::Relaxed), 0);
    assert_eq!(broker.stats().subscriptions, 0);
}

#[test]
fn handlers_run_in_subscription_order_on_one_shared_event() {
    for mode in [Mode::Sync, Mode::Async] {
        let broker = Broker::builder().mode(mode).workers(1).build().unwrap();
        let order: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
        for (i, pattern) in ["a.b.c", "*", "a.>", "a.*.c", "*.b.*"].into_iter().enumerate() {
            let o = Arc::clone(&order);
            broker
                .subscribe(pattern, move |e: &Event| {
                    o.lock().unwrap().push((i, std::ptr::from_ref(e).addr()));
                    Ok::<(), String>(())
                })
                .unwrap();
        }
        for _ in 0..20 {
            broker.publish(event("a.b.c")).unwrap();
        }
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 100);
        for chunk in order.chunks(5) {
            assert_eq!(chunk.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3, 4], "{mode:?}");
            assert!(chunk.iter().all(|(_, p)| *p == chunk[0].1), "one event shared by every handler");
        }
    }
}

#[test]
fn sync_publish_returns_failures_after_retries() {
    let broker = Broker::builder().mode(Mode::Sync).retry_policy(quick_retries(2)).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let good = broker
        .subscribe("s.*", move |_: &Event| {
            c.fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    let bad = broker.subscribe("s.x", failing("nope")).unwrap();
    let err = broker.publish(event("s.x")).unwrap_err();
    let SyncPublishError::HandlerFailed(failures) = err else { panic!("expected HandlerFailed, got {err}") };
    let failures = failures.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].subscription_id, failures[0].attempts, failures[0].error.as_str()),
        (bad, 3, "nope")
    );
    assert_ne!(good, bad);
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    broker.publish(event("s.y")).unwrap();
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.retries, stats.dead_letters), (1, 1, 2, 1));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn the_status_lifecycle_reaches_the_provider() {
    let provider = Arc::new(MemoryProvider::default());
    let broker =
        Broker::builder().provider(provider.clone()).retry_policy(RetryPolicy::none()).build().unwrap();
    broker.subscribe("life.ok", |_: &Event| Ok::<(), String>(())).unwrap();
    broker.subscribe("life.bad", failing("broken")).unwrap();
    let before = jiff::Timestamp::now();
    let ok = event("life.ok");
    let bad = event("life.bad");
    let nobody = event("life.nobody");
    let ids = [ok.id, bad.id, nobody.id];
    for e in [ok, bad, nobody] {
        broker.publish(e).unwrap();
    }
    wait_until("processing", Duration::from_secs(5), || broker.stats().processed == 3);
    broker.flush(Duration::from_secs(5)).unwrap();
    let [ok, bad, nobody] = ids.map(|id| provider.get(id).unwrap().expect("stored"));
    assert_eq!(ok.status, EventStatus::Completed);
    assert_eq!(nobody.status, EventStatus::Completed, "unrouted events complete (seed pitfall 17)");
    assert_eq!((bad.status, bad.error.as_str()), (EventStatus::Failed, "broken"));
    for e in [&ok, &bad, &nobody] {
        let processed = e.processed_at.expect("processed_at set");
        let completed = e.completed_at.expect("completed_at set");
        assert!(before <= e.created_at && e.created_at <= processed && processed <= completed);
        assert_eq!(e.instance_id, broker.instance_id(), "the broker fills instance_id");
    }
    assert_eq!(broker.stats().unrouted, 1);
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

/// Under load, with batches forming and retries running between them, each event's timestamps
/// bracket its handling: `processed_at` is no later than its first handler call began, and
/// `completed_at` no earlier than its last one returned.
#[test]
fn timestamps_bracket_each_events_handling_under_load() {
    const EVENTS: i64 = 4_000;
    let provider = Arc::new(MemoryProvider::default());
    let broker = Broker::builder()
        .provider(provider.clone())
        .workers(1)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            ..quick_retries(1)
        })
        .build()
        .unwrap();
    // Per event: when its first call began, when its last call returned.
    let seen: Arc<Mutex<HashMap<EventId, (jiff::Timestamp, jiff::Timestamp)>>> = Arc::default();
    let record = |fail_first: bool| {
        let seen = Arc::clone(&seen);
        let failed = Mutex::new(std::collections::HashSet::new());
        move |e: &Event| {
            let began = jiff::Timestamp::now();
            seen.lock().unwrap().entry(e.id).or_insert((began, began));
            if fail_first && e.user_id % 7 == 0 && failed.lock().unwrap().insert(e.id) {
                return Err("once".to_owned());
            }
            seen.lock().unwrap().get_mut(&e.id).unwrap().1 = jiff::Timestamp::now();
            Ok::<(), String>(())
        }
    };
    broker.subscribe("load.*", record(false)).unwrap();
    broker.subscribe("load.flaky", record(true)).unwrap();
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let e = event(if n % 3 == 0 { "load.flaky" } else { "load.steady" }).with_user_id(n);
        ids.push(e.id);
        broker.publish(e).unwrap();
        if n % 500 == 499 {
            // Lets the worker catch up, so that batches of every size form.
            thread::sleep(Duration::from_millis(1));
        }
    }
    wait_until("handling", Duration::from_secs(20), || broker.stats().processed == EVENTS.unsigned_abs());
    broker.flush(Duration::from_secs(5)).unwrap();
    let seen = seen.lock().unwrap();
    for id in ids {
        let e = provider.get(id).unwrap().expect("stored");
        assert_eq!(e.status, EventStatus::Completed, "{id}");
        let (began, returned) = seen[&id];
        let processed = e.processed_at.expect("processed_at set");
        let completed = e.completed_at.expect("completed_at set");
        assert!(
            e.created_at <= processed,
            "{id}: created {} after processing began {processed}",
            e.created_at
        );
        assert!(processed <= began, "{id}: processing began {processed} after its first call {began}");
        assert!(
            returned <= completed,
            "{id}: completed {completed} before its last call returned {returned}"
        );
    }
    assert!(broker.stats().retries > 0, "some deliveries were retried");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn async_counts_are_kept() {
    // Seed pitfall 10: processed/failed were never updated in async mode.
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    broker.subscribe("c.ok", |_: &Event| Ok::<(), String>(())).unwrap();
    broker.subscribe("c.bad", failing("x")).unwrap();
    for i in 0..30 {
        broker.publish(event(if i % 3 == 0 { "c.bad" } else { "c.ok" })).unwrap();
    }
    wait_until("processing", Duration::from_secs(5), || broker.stats().processed == 30);
    let stats = broker.stats();
    assert_eq!((stats.published, stats.completed, stats.failed, stats.queued), (30, 20, 10, 0));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn queue_size_reflects_the_rings() {
    // Seed pitfall 13: the queue gauge was set before each enqueue and went stale.
    let broker = Broker::builder().workers(1).buffer_size(64).build().unwrap();
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (e, r) = (Arc::clone(&entered), Arc::clone(&release));
    broker
        .subscribe("q", move |_: &Event| {
            e.store(true, Ordering::Release);
            while !r.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(1));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    broker.publish(event("q")).unwrap();
    wait_until("the first event in the handler", Duration::from_secs(5), || entered.load(Ordering::Acquire));
    for _ in 0..10 {
        broker.publish(event("q")).unwrap();
    }
    assert_eq!(broker.stats().queued, 10);
    release.store(true, Ordering::Release);
    wait_until("the drain", Duration::from_secs(5), || broker.stats().queued == 0);
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn publishing_racing_shutdown_never_panics_or_loses_an_accepted_event() {
    // Seed pitfall 14: publish racing shutdown could send on a closed channel and panic.
    for _ in 0..20 {
        let broker = Broker::builder().workers(2).buffer_size(64).track_status(false).build().unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&handled);
        broker
            .subscribe(">", move |_: &Event| {
                h.fetch_add(1, Ordering::Relaxed);
                Ok::<(), String>(())
            })
            .unwrap();
        let accepted = AtomicU64::new(0);
        let closed = AtomicU64::new(0);
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    loop {
                        match broker.publish_async(event("race.x")) {
                            Ok(()) => accepted.fetch_add(1, Ordering::Relaxed),
                            Err(PublishError::Closed(_)) => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(other) => panic!("unexpected {other}"),
                        };
                    }
                });
            }
            s.spawn(|| {
                thread::sleep(Duration::from_millis(2));
                assert!(!broker.shutdown(Duration::from_secs(10)).timed_out);
            });
        });
        assert_eq!(closed.load(Ordering::Relaxed), 2);
        assert_eq!(handled.load(Ordering::Relaxed), accepted.load(Ordering::Relaxed));
    }
}

#[test]
fn shutdown_is_idempotent_and_later_calls_are_refused() {
    let broker = Broker::builder().build().unwrap();
    let clone = broker.clone();
    assert!(!broker.shutdown(Duration::from_secs(5)).already_shut_down);
    assert!(clone.shutdown(Duration::from_secs(5)).already_shut_down);
    assert!(matches!(broker.publish_async(event("a")), Err(PublishError::Closed(_))));
    assert!(matches!(broker.publish(event("a")), Err(SyncPublishError::Rejected(PublishError::Closed(_)))));
    assert!(matches!(
        broker.publish_sync(event("a")),
        Err(SyncPublishError::Rejected(PublishError::Closed(_)))
    ));
    assert!(matches!(broker.subscribe("a", |_: &Event| Ok::<(), String>(())), Err(SubscribeError::Closed)));
    let batch = broker.publish_batch(vec![event("a"), event("b")]).unwrap_err();
    assert_eq!((batch.accepted, batch.rejected.len(), batch.reason), (0, 2, BatchRejection::Closed));
    drop(broker);
    drop(clone);
}

#[test]
fn dropping_the_last_handle_drains() {
    let handled = Arc::new(AtomicU64::new(0));
    {
        let broker = Broker::builder().workers(1).build().unwrap();
        let h = Arc::clone(&handled);
        broker
            .subscribe("d", move |_: &Event| {
                thread::sleep(Duration::from_micros(50));
                h.fetch_add(1, Ordering::Relaxed);
                Ok::<(), String>(())
            })
            .unwrap();
        for _ in 0..500 {
            broker.publish(event("d")).unwrap();
        }
    }
    assert_eq!(handled.load(Ordering::Relaxed), 500);
}

#[test]
fn invalid_types_are_refused_with_the_event() {
    let broker = Broker::builder().build().unwrap();
    let err = broker.publish(event("bad..type")).unwrap_err();
    assert_eq!(err.to_string(), "invalid event type \"bad..type\" at byte 4: a segment is empty");
    assert_eq!(err.into_event().unwrap().event_type, "bad..type");
    let batch = broker.publish_batch(vec![event("ok"), event("not ok")]).unwrap_err();
    assert_eq!(batch.accepted, 0);
    assert_eq!(batch.rejected.len(), 2);
    assert!(matches!(batch.reason, BatchRejection::InvalidType { index: 1, .. }));
    assert!(matches!(
        broker.subscribe("a.>.b", |_: &Event| Ok::<(), String>(())),
        Err(SubscribeError::Pattern(_))
    ));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn metadata_too_deep_to_read_back_is_refused_with_the_event() {
    let limit = Event::MAX_JSON_DEPTH;
    let nested = |depth: usize| (1..depth).fold(json!([1]), |inner, _| json!([inner]));
    for mode in [Mode::Async, Mode::Sync] {
        let broker = Broker::builder().mode(mode).build().unwrap();
        let (_, seen) = broker.subscribe_stream("a.>").unwrap();
        let too_deep =
            event("a.b").with_metadata("ok", "x").with_metadata("deep", json!({ "k": nested(limit) }));
        let err = broker.publish(too_deep.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "metadata \"deep\" nests arrays and objects deeper than 100, which no decoder reads back"
        );
        assert_eq!(err.into_event().unwrap(), too_deep, "the event comes back unchanged");
        let err = broker.try_publish(too_deep.clone()).unwrap_err();
        assert!(matches!(&err, PublishError::InvalidMetadata { key, .. } if key == "deep"), "{err:?}");

        let batch = broker.publish_batch(vec![event("a.c"), too_deep.clone(), event("a.d")]).unwrap_err();
        assert_eq!((batch.accepted, batch.rejected.len()), (0, 3));
        assert_eq!(batch.reason, BatchRejection::InvalidMetadata { index: 1, key: "deep".into() });

        // At the limit the event is published, stored and read back.
        let deepest = event("a.b").with_metadata("deep", nested(limit));
        broker.publish(deepest.clone()).unwrap();
        let delivered = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(delivered.metadata["deep"], deepest.metadata["deep"]);
        assert!(seen.try_recv().is_err(), "nothing refused was delivered");
        broker.drain(Duration::from_secs(5)).unwrap();
        let stored = broker.provider().get(deepest.id).unwrap().expect("stored");
        assert_eq!(Event::from_json(&stored.to_json()).unwrap().metadata["deep"], deepest.metadata["deep"]);
        assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    }
}

#[test]
fn a_partly_full_batch_hands_back_each_keys_suffix_in_order() {
    let broker =
        Broker::builder().workers(1).buffer_size(8).backpressure(Backpressure::Reject).build().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&release);
    broker
        .subscribe("b", move |_: &Event| {
            while !r.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(1));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    let events: Vec<Event> = (0..20).map(|i| event("b").with_user_id(i)).collect();
    let err = broker.publish_batch(events).unwrap_err();
    assert_eq!(err.reason, BatchRejection::Full);
    assert_eq!(err.accepted + err.rejected.len(), 20);
    // The ring holds 8; the worker may have drained 8 more into its hands before its handler stuck.
    assert!((8..=16).contains(&err.accepted), "{}", err.accepted);
    let ids: Vec<i64> = err.rejected.iter().map(|e| e.user_id).collect();
    let first = i64::try_from(err.accepted).unwrap();
    assert_eq!(ids, (first..20).collect::<Vec<_>>(), "the rejected suffix, in order");
    release.store(true, Ordering::Release);
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn streams_deliver_to_sync_and_async_receivers() {
    // One shard: the two types are then handled in publish order.
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_, sync_rx) = broker.subscribe_stream("st.*").unwrap();
    let (_, async_rx) = broker.subscribe_stream_bounded("st.b", 8).unwrap();
    broker.publish(event("st.a")).unwrap();
    broker.publish(event("st.b")).unwrap();
    let a = sync_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let b = sync_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((a.event_type.as_str(), b.event_type.as_str()), ("st.a", "st.b"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let got = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async_rx.recv_async()).await.unwrap().unwrap()
    });
    assert!(Arc::ptr_eq(&got, &b), "streams share the event, not a copy");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_full_stream_is_a_failed_delivery_and_a_dropped_one_unsubscribes() {
    let broker = Broker::builder().workers(1).retry_policy(RetryPolicy::none()).build().unwrap();
    let (_, rx) = broker.subscribe_stream_bounded("full", 2).unwrap();
    for _ in 0..5 {
        broker.publish(event("full")).unwrap();
    }
    wait_until("processing", Duration::from_secs(5), || broker.stats().processed == 5);
    assert_eq!(rx.len(), 2);
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.dead_letters), (2, 3, 3));
    let letters = broker.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert!(letters.iter().all(|l| l.error == "stream receiver is full (2 events)"));
    drop(rx);
    assert_eq!(broker.stats().subscriptions, 1);
    broker.publish(event("full")).unwrap();
    wait_until("the gone receiver to unsubscribe", Duration::from_secs(5), || {
        broker.stats().subscriptions == 0
    });
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn an_event_whose_only_stream_is_gone_counts_as_unrouted_in_either_mode() {
    for mode in [Mode::Async, Mode::Sync] {
        let broker = Broker::builder().mode(mode).workers(1).build().unwrap();
        let (_, rx) = broker.subscribe_stream("gone.>").unwrap();
        drop(rx);
        broker.publish(event("gone.away")).unwrap();
        broker.drain(Duration::from_secs(5)).unwrap();
        let stats = broker.stats();
        assert_eq!((stats.completed, stats.unrouted, stats.subscriptions), (1, 1, 0), "{mode:?}");
    }
}

#[test]
fn unsubscribing_a_stream_disconnects_its_receiver_after_what_it_holds() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (id, rx) = broker.subscribe_stream("st.>").unwrap();
    broker.publish(event("st.one")).unwrap();
    broker.publish(event("st.two")).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    // The broker is idle now, its worker's match cache still holding the subscription.
    assert!(broker.unsubscribe(id));
    broker.publish(event("st.three")).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    let types: Vec<_> = rx.try_iter().map(|e| e.event_type.to_string()).collect();
    assert_eq!(types, ["st.one", "st.two"], "what was delivered before, nothing after");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(flume::RecvTimeoutError::Disconnected),
        "a consumer's loop over the receiver ends"
    );
    assert_eq!(broker.stats().subscriptions, 0);
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.unrouted), (3, 1));
}

#[test]
fn configuration_errors_name_the_setting() {
    let key = |b: eventbroker::BrokerBuilder| match b.build() {
        Err(eventbroker::BuildError::Config(e)) => e.key().to_owned(),
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(key(Broker::builder().workers(0)), "worker_count");
    assert_eq!(key(Broker::builder().buffer_size(1)), "buffer_size");
    let bad_retry = RetryPolicy { jitter: 2.0, ..RetryPolicy::default() };
    assert_eq!(key(Broker::builder().retry_policy(bad_retry)), "retry_policy.jitter");
    let broker = Broker::builder().buffer_size(1000).build().unwrap();
    assert_eq!(broker.stats().shards[0].capacity, 1024, "rounded up to a power of two");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn stored_events_respect_the_memory_bound_and_a_shared_provider_stays_open() {
    let provider = Arc::new(MemoryProvider::new(MemoryConfig { max_events: 100, ..MemoryConfig::default() }));
    let broker = Broker::builder().provider(provider.clone()).build().unwrap();
    for i in 0..1000 {
        broker.publish(event("m").with_user_id(i)).unwrap();
    }
    wait_until("processing", Duration::from_secs(10), || broker.stats().processed == 1000);
    broker.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(provider.stats().unwrap().total_events, 100);
    assert_eq!(provider.list(&EventFilter::default()).unwrap().len(), 100);
    let report = broker.shutdown(Duration::from_secs(10));
    assert_eq!(report.provider_close, CloseOutcome::LeftOpen, "the test still holds the provider");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(provider.stats().unwrap().total_events, 100, "readable after the broker is gone");
}

#[test]
fn shutdown_closes_a_provider_nobody_else_holds() {
    let broker = Broker::builder().build().unwrap();
    broker.publish(event("solo")).unwrap();
    let report = broker.shutdown(Duration::from_secs(10));
    assert_eq!(report.provider_close, CloseOutcome::Closed);
    assert_eq!(broker.provider().stats().unwrap_err().kind(), &eventbroker::ProviderErrorKind::Closed);
}

#[test]
fn events_held_by_a_subscriber_are_never_reused_while_held() {
    // Without tracking, spent events go back to the publisher, which builds new events in them:
    // only those nobody else holds.
    let broker = Broker::builder().workers(2).track_status(false).build().unwrap();
    let (_, held) = broker.subscribe_stream_bounded("held.>", 4096).unwrap();
    broker.subscribe_infallible("held.>", |_: &Event| {}).unwrap();
    broker.subscribe_infallible("spent.>", |_: &Event| {}).unwrap();
    let mut sent = Vec::new();
    for round in 0..20 {
        for i in 0..100 {
            let e = event("held.a")
                .with_partition_key(format!("k{}", i % 7))
                .with_payload_value(json!({ "round": round, "i": i }));
            sent.push((e.id, e.payload_json().unwrap().to_owned()));
            broker.publish(e).unwrap();
            // Events nobody keeps, whose allocations are handed back and reused.
            broker.publish(event("spent.b").with_payload_value(json!({ "filler": i }))).unwrap();
        }
    }
    broker.drain(Duration::from_secs(10)).unwrap();
    let received: Vec<Arc<Event>> = held.try_iter().collect();
    assert_eq!(received.len(), sent.len());
    let mut by_id: HashMap<_, _> =
        received.iter().map(|e| (e.id, e.payload_json().unwrap().to_owned())).collect();
    for (id, payload) in &sent {
        assert_eq!(by_id.remove(id).as_deref(), Some(payload.as_str()), "event {id} changed while held");
    }
    assert!(received.iter().all(|e| e.event_type == "held.a"));
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}
