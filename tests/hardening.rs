//! The engine against misbehaving handlers, providers and settings: every blocking call has a
//! bound, nothing kills a worker or the writer, and reports tell the truth. One test per case of
//! the hardening review, numbered as there.

use std::panic::panic_any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::prelude::*;
use eventbroker::testing::{Fault, FaultyProvider, Operation};
use eventbroker::{
    Backpressure, Broker, BrokerError, CloseOutcome, ConfirmError, DeadLetterFilter, Distribution,
    DrainError, Event, EventStatus, HandlerFailures, MemoryProvider, Mode, ProviderErrorKind, PublishError,
    ReplayFrom, RetryPolicy, SyncPublishError, Timestamp, WriterConfig,
};

mod common;
use common::{event, quick_retries, wait_until};

const WAIT: Duration = Duration::from_secs(10);

/// A faulty memory provider held only through a weak reference, so a broker given it is its sole
/// owner (and closes it at shutdown).
fn sole_faulty() -> (Arc<FaultyProvider>, std::sync::Weak<FaultyProvider>) {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let weak = Arc::downgrade(&faulty);
    (faulty, weak)
}

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A gate handlers wait on, bounded so a failing test cannot hang.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn wait(&self) {
        let until = Instant::now() + WAIT;
        while !self.0.load(Ordering::Acquire) && Instant::now() < until {
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn open(&self) {
        self.0.store(true, Ordering::Release);
    }
}

// 1. A provider whose `close` never returns makes neither `shutdown` nor `Drop` hang.
#[test]
fn a_provider_whose_close_hangs_does_not_hang_shutdown_or_drop() {
    let (faulty, weak) = sole_faulty();
    faulty.inject(Operation::Close, Fault::Hang { at_most: Duration::from_secs(60) });
    let broker = Broker::builder().provider(faulty).build().unwrap();
    broker.publish(event("close.hang")).unwrap();
    let started = Instant::now();
    let report = broker.shutdown(Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    assert_eq!(report.provider_close, CloseOutcome::TimedOut);
    assert!(!report.is_clean());
    weak.upgrade().expect("the close is still running").heal_all();

    let (faulty, weak) = sole_faulty();
    faulty.inject(Operation::Close, Fault::Hang { at_most: Duration::from_secs(60) });
    let broker =
        Broker::builder().provider(faulty).drop_shutdown_timeout(Duration::from_millis(500)).build().unwrap();
    let started = Instant::now();
    drop(broker);
    assert!(started.elapsed() < Duration::from_secs(5), "drop took {:?}", started.elapsed());
    weak.upgrade().expect("the close is still running").heal_all();
}

// 2. `publish_confirmed` returns by its timeout when `store_batch` hangs.
#[test]
fn a_confirmed_publish_is_bounded_when_the_provider_hangs() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder().provider(faulty.clone()).build().unwrap();
    faulty.inject(Operation::StoreBatch, Fault::Hang { at_most: Duration::from_secs(60) });
    let started = Instant::now();
    let err = broker.publish_confirmed(event("confirm.hang"), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ConfirmError::TimedOut(t) if t == Duration::from_millis(300)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("300ms"), "the error names the timeout: {err}");
    faulty.heal_all();
    broker.flush(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

// 2, for async code: the wait for the write is bounded too, and leaves the runtime's thread free.
#[test]
fn an_async_confirmed_publish_is_bounded_when_the_provider_hangs() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder().provider(faulty.clone()).build().unwrap();
    faulty.inject(Operation::StoreBatch, Fault::Hang { at_most: Duration::from_secs(60) });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let started = Instant::now();
    let (outcome, ticks) = runtime.block_on(async {
        let publish = tokio::spawn({
            let broker = broker.clone();
            async move {
                broker.publish_confirmed_when_room(event("confirm.hang"), Duration::from_millis(300)).await
            }
        });
        let mut ticks = 0;
        while !publish.is_finished() && started.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ticks += 1;
        }
        (publish.await.unwrap(), ticks)
    });
    let err = outcome.unwrap_err();
    assert!(matches!(err, ConfirmError::TimedOut(t) if t == Duration::from_millis(300)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(ticks >= 10, "the runtime's one thread ran {ticks} ticks while the write hung");
    faulty.heal_all();
    broker.flush(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

/// A broker with one worker whose shard holds two events, blocking up to 5 s when full.
fn one_two_slot_shard() -> Broker {
    let broker = Broker::builder().workers(1).buffer_size(2);
    broker.backpressure(Backpressure::Block(Duration::from_secs(5))).build().unwrap()
}

/// What a handler publishing into its own shard saw: how long it took, how many publishes were
/// refused, and how its replay ended.
type SelfPublish = (Duration, usize, Result<u64, BrokerError>);

// 3. A handler publishing or replaying into its own full shard fails fast instead of waiting on
// itself.
#[test]
fn a_handler_never_waits_on_its_own_full_shard() {
    let broker = one_two_slot_shard();
    for i in 0..20 {
        broker.publish(event("history.x").with_user_id(i)).unwrap();
    }
    wait_until("history", WAIT, || broker.stats().processed == 20);
    broker.flush(WAIT).unwrap();

    let outcome: Arc<Mutex<Option<SelfPublish>>> = Arc::default();
    let (weak, out) = (broker.downgrade(), Arc::clone(&outcome));
    broker
        .subscribe_infallible("self.trigger", move |_| {
            let broker = weak.upgrade().expect("alive");
            let started = Instant::now();
            let mut full = 0;
            for _ in 0..10 {
                if let Err(PublishError::Full(_)) = broker.publish_async(event("self.echo")) {
                    full += 1;
                }
            }
            let replay = broker.replay(ReplayFrom::Beginning, Some("history.>")).map(|r| r.replayed);
            *out.lock().unwrap() = Some((started.elapsed(), full, replay));
        })
        .unwrap();
    broker.publish(event("self.trigger")).unwrap();
    wait_until("the handler", WAIT, || outcome.lock().unwrap().is_some());
    let (took, full, replay) = outcome.lock().unwrap().take().unwrap();
    assert!(took < Duration::from_secs(2), "the handler waited {took:?} on its own shard");
    assert!(full >= 8, "a 2-slot shard takes 2 of 10; the rest are handed back at once ({full})");
    assert!(matches!(replay, Err(BrokerError::ReplayFull { .. })), "{replay:?}");
    assert!(broker.shutdown(WAIT).is_clean());
}

// 3b. A replay from a time that a full shard interrupts resumes as the same replay: the events
// stored after the point it stopped at but created before its time stay left out.
#[test]
fn a_time_replay_resumed_after_a_full_shard_keeps_its_time() {
    let broker = one_two_slot_shard();
    let since = Timestamp::now();
    let an_hour_before = since - Duration::from_secs(3600);
    // Store order: four new, two created an hour before `since`, two new.
    let types =
        ["when.new", "when.new", "when.new", "when.new", "when.old", "when.old", "when.new", "when.new"];
    for event_type in types {
        let mut e = event(event_type);
        if event_type == "when.old" {
            e.created_at = an_hour_before;
        }
        broker.publish(e).unwrap();
    }
    wait_until("history", WAIT, || broker.stats().processed == 8);

    let replayed: Arc<Mutex<Vec<String>>> = Arc::default();
    let r = Arc::clone(&replayed);
    broker
        .subscribe_infallible("when.>", move |e: &Event| {
            if e.is_replay() {
                r.lock().unwrap().push(e.event_type.to_string());
            }
        })
        .unwrap();
    let stopped: Arc<Mutex<Option<Result<u64, BrokerError>>>> = Arc::default();
    let (weak, out) = (broker.downgrade(), Arc::clone(&stopped));
    broker
        .subscribe_infallible("replay.trigger", move |_| {
            let broker = weak.upgrade().expect("alive");
            let outcome = broker.replay(ReplayFrom::Time(since), Some("when.>")).map(|r| r.replayed);
            *out.lock().unwrap() = Some(outcome);
        })
        .unwrap();
    broker.publish(event("replay.trigger")).unwrap();
    wait_until("the handler", WAIT, || stopped.lock().unwrap().is_some());
    let Some(Err(BrokerError::ReplayFull { replayed: placed, resume_from })) = stopped.lock().unwrap().take()
    else {
        panic!("a 2-slot shard cannot take six events from its own handler");
    };
    assert!(placed < 4, "it stops among the first four new events ({placed})");
    assert_eq!(resume_from.not_before(), Some(since), "the cursor keeps the replay's time");

    let resumed = broker.replay(resume_from, Some("when.>")).unwrap();
    assert_eq!(placed + resumed.replayed, 6, "every new event once, the old ones never");
    assert_eq!(resumed.resume_from().not_before(), Some(since), "a later replay keeps the time too");
    wait_until("the replays", WAIT, || replayed.lock().unwrap().len() == 6);
    broker.drain(WAIT).unwrap();
    assert_eq!(*replayed.lock().unwrap(), vec!["when.new"; 6]);
    assert!(broker.shutdown(WAIT).is_clean());
}

// 3c. A replay that a provider error stops says how far it got and where to go on: resumed there
// once the provider answers, it places every remaining event once.
#[test]
fn a_replay_stopped_by_a_provider_error_resumes_where_it_stopped() {
    const STORED: u64 = 600; // more than one page of 512
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder().workers(1).buffer_size(64).provider(faulty.clone()).build().unwrap();
    for i in 0..STORED {
        broker.publish(event("page.x").with_user_id(i64::try_from(i).unwrap())).unwrap();
    }
    broker.drain(WAIT).unwrap();

    // The worker handles the first replayed event while the replay still places its first page
    // (the shard takes 64 of 512): the next page's read fails.
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let (s, f) = (Arc::clone(&seen), faulty.clone());
    broker
        .subscribe_infallible("page.>", move |e: &Event| {
            let mut seen = s.lock().unwrap();
            if seen.is_empty() {
                f.inject(Operation::Replay, Fault::unavailable());
            }
            seen.push(e.user_id);
        })
        .unwrap();
    let stopped = broker.replay(ReplayFrom::Beginning, Some("page.>"));
    let Err(BrokerError::ReplayInterrupted { replayed, resume_from, error }) = stopped else {
        panic!("the second page's read failed: {stopped:?}");
    };
    assert_eq!(replayed, 512, "the first page was placed");
    assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "{error}");

    faulty.heal(Operation::Replay);
    let resumed = broker.replay(resume_from, Some("page.>")).unwrap();
    assert_eq!(resumed.replayed, STORED - replayed, "the rest, and nothing twice");
    broker.drain(WAIT).unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    let every: Vec<i64> = (0..STORED).map(|i| i64::try_from(i).unwrap()).collect();
    assert_eq!(seen, every, "every stored event once");
    assert!(broker.shutdown(WAIT).is_clean());
}

// 3d. Replay pages that a provider error ends say where to try again: the failed page's start.
#[test]
fn replay_pages_ended_by_an_error_resume_at_the_failed_page() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    for i in 0..5 {
        faulty.store_one(&event("paged.x").with_user_id(i)).unwrap();
    }
    let mut pages = faulty.replay_pages(ReplayFrom::Beginning, None, 2);
    let first = pages.next().unwrap().unwrap();
    faulty.inject(Operation::Replay, Fault::unavailable_times(1));
    assert!(pages.next().unwrap().is_err());
    assert!(pages.next().is_none(), "the error ends the pages");
    let rest: Vec<i64> = faulty
        .replay_pages(pages.cursor(), None, 2)
        .flat_map(|page| page.unwrap())
        .map(|stored| stored.event.user_id)
        .collect();
    assert_eq!(first.iter().map(|stored| stored.event.user_id).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(rest, [2, 3, 4], "from the page that failed");
}

// 4a. A handler that calls `shutdown` does not wait for its own worker.
#[test]
fn shutdown_from_a_handler_is_deferred_not_deadlocked() {
    let broker = Broker::builder().workers(2).instance_id("self-stop").build().unwrap();
    let report = Arc::new(Mutex::new(None));
    let (weak, r) = (broker.downgrade(), Arc::clone(&report));
    broker
        .subscribe_infallible("stop", move |_| {
            let started = Instant::now();
            let got = weak.upgrade().expect("alive").shutdown(Duration::from_secs(30));
            *r.lock().unwrap() = Some((got, started.elapsed()));
        })
        .unwrap();
    broker.publish(event("stop")).unwrap();
    wait_until("the handler's shutdown", WAIT, || report.lock().unwrap().is_some());
    let (got, took) = report.lock().unwrap().take().unwrap();
    assert!(got.deferred && !got.timed_out, "{got:?}");
    assert!(took < Duration::from_secs(2), "shutdown from a handler took {took:?}");
    wait_until("the workers to exit", WAIT, || !thread_names().iter().any(|n| n.contains("self-stop")));
    assert!(broker.shutdown(WAIT).already_shut_down);
}

// 4b. A handler that drops the last handle does not wait for its own worker, and a handler
// holding only a weak handle does not keep the broker alive.
#[test]
fn the_last_handle_dropped_in_a_handler_or_held_weakly_shuts_the_broker_down() {
    let broker = Broker::builder().workers(1).instance_id("drop-in").build().unwrap();
    let slot: Arc<Mutex<Option<Broker>>> = Arc::new(Mutex::new(Some(broker.clone())));
    let took = Arc::new(Mutex::new(None));
    let (s, t) = (Arc::clone(&slot), Arc::clone(&took));
    broker
        .subscribe_infallible("drop", move |_| {
            let started = Instant::now();
            drop(s.lock().unwrap().take());
            *t.lock().unwrap() = Some(started.elapsed());
        })
        .unwrap();
    broker.publish(event("drop")).unwrap();
    drop(broker);
    wait_until("the handler", WAIT, || took.lock().unwrap().is_some());
    let took = took.lock().unwrap().unwrap();
    assert!(took < Duration::from_secs(2), "dropping the last handle in a handler took {took:?}");
    wait_until("the workers to exit", WAIT, || !thread_names().iter().any(|n| n.contains("drop-in")));

    let broker = Broker::builder().workers(1).instance_id("weak-cap").build().unwrap();
    let weak = broker.downgrade();
    broker.subscribe_infallible("x", move |_| drop(weak.upgrade())).unwrap();
    broker.publish(event("x")).unwrap();
    drop(broker);
    wait_until("the workers to exit", WAIT, || !thread_names().iter().any(|n| n.contains("weak-cap")));
}

// 4c. A handler that calls `shutdown` while another thread's shutdown waits for its worker
// returns at once; the running shutdown drains everything and reports it clean.
#[test]
fn a_handler_shutting_down_during_a_shutdown_neither_waits_nor_strands_the_shard() {
    let broker = Broker::builder().workers(1).instance_id("stop-during-stop").build().unwrap();
    let (in_handler, go) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let got = Arc::new(Mutex::new(None));
    let (weak, entered, proceed, g) = (broker.downgrade(), in_handler.clone(), go.clone(), got.clone());
    broker
        .subscribe_infallible("stop", move |_| {
            entered.store(true, Ordering::SeqCst);
            while !proceed.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            thread::sleep(Duration::from_millis(50)); // the other shutdown is waiting for this worker
            let started = Instant::now();
            let report = weak.upgrade().expect("alive").shutdown(Duration::from_secs(30));
            *g.lock().unwrap() = Some((report, started.elapsed()));
        })
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    broker
        .subscribe_infallible("work", move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    broker.publish(event("stop")).unwrap();
    for _ in 0..10 {
        broker.publish(event("work")).unwrap();
    }
    wait_until("the stopping handler", WAIT, || in_handler.load(Ordering::SeqCst));
    go.store(true, Ordering::SeqCst);
    let report = broker.shutdown(WAIT);
    assert!(report.is_clean() && report.drained == 10, "{report:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 10);
    let (in_handler_report, took) = got.lock().unwrap().take().expect("the handler's shutdown returned");
    assert!(in_handler_report.already_shut_down && in_handler_report.deferred, "{in_handler_report:?}");
    assert!(!in_handler_report.is_clean(), "it did not see the shutdown end: {in_handler_report:?}");
    assert!(took < Duration::from_secs(1), "the handler's shutdown waited {took:?}");
}

// 4d. After a handler's shutdown was deferred, a later `shutdown`, and the last handle's drop,
// wait for it to complete and report what it did; neither says clean while events wait.
#[test]
fn calls_after_a_deferred_shutdown_wait_for_it() {
    for by_drop in [false, true] {
        let broker = Broker::builder().workers(1).instance_id("after-deferred").build().unwrap();
        let (deferred, published) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (weak, d, all_in) = (broker.downgrade(), deferred.clone(), published.clone());
        broker
            .subscribe_infallible("stop", move |_| {
                while !all_in.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
                let report = weak.upgrade().expect("alive").shutdown(WAIT);
                d.store(report.deferred, Ordering::SeqCst);
            })
            .unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        let h = handled.clone();
        broker
            .subscribe_infallible("work", move |_| {
                thread::sleep(Duration::from_millis(5));
                h.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        broker.publish(event("stop")).unwrap();
        for _ in 0..40 {
            broker.publish(event("work")).unwrap();
        }
        published.store(true, Ordering::SeqCst);
        wait_until("the handler's shutdown", WAIT, || deferred.load(Ordering::SeqCst));
        if by_drop {
            drop(broker);
        } else {
            let report = broker.shutdown(WAIT);
            assert!(report.already_shut_down && report.is_clean() && report.drained == 40, "{report:?}");
        }
        assert_eq!(handled.load(Ordering::SeqCst), 40, "returned before the shard drained (drop: {by_drop})");
    }
}

// 4e. A handler that `publish_sync` runs on the caller's thread, calling `shutdown` (with no
// bound at all), does not wait for the publish it is inside of.
#[test]
fn shutdown_from_a_handler_run_by_publish_sync_is_deferred() {
    let broker = Broker::builder().mode(Mode::Sync).workers(1).build().unwrap();
    let got = Arc::new(Mutex::new(None));
    let (weak, g) = (broker.downgrade(), got.clone());
    broker
        .subscribe_infallible("stop", move |_| {
            let started = Instant::now();
            let report = weak.upgrade().expect("alive").shutdown(Duration::MAX);
            *g.lock().unwrap() = Some((report, started.elapsed()));
        })
        .unwrap();
    let caller = broker.clone();
    let published = thread::spawn(move || caller.publish(event("stop")));
    wait_until("the handler's shutdown", WAIT, || got.lock().unwrap().is_some());
    let (report, took) = got.lock().unwrap().take().unwrap();
    assert!(report.deferred && !report.timed_out, "{report:?}");
    assert!(took < Duration::from_secs(1), "waited {took:?} for its own publish");
    published.join().unwrap().unwrap();
    let last = broker.shutdown(WAIT);
    assert!(last.already_shut_down && last.is_clean(), "{last:?}");
}

// 4f. Shutdown waits for a redrive running its handlers on the caller's thread, as for a
// synchronous publish, and closes the provider only after the redrive wrote what it did.
#[test]
fn shutdown_waits_for_a_redrive_in_progress() {
    let broker = Broker::builder().workers(1).retry_policy(RetryPolicy::none()).build().unwrap();
    let (fixed, inside) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let finished = Arc::new(AtomicBool::new(false));
    let (f, i, done) = (fixed.clone(), inside.clone(), finished.clone());
    broker
        .subscribe("orders.*", move |_: &Event| {
            if !f.load(Ordering::SeqCst) {
                return Err("the ledger is down");
            }
            i.store(true, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(300));
            done.store(true, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    let failed = event("orders.paid");
    broker.publish(failed.clone()).unwrap();
    broker.drain(WAIT).unwrap();
    fixed.store(true, Ordering::SeqCst);
    let letter = broker.dead_letters(&DeadLetterFilter::new()).unwrap().remove(0);
    let redriver = broker.clone();
    let redrive = thread::spawn(move || redriver.redrive(letter.id));
    wait_until("the redriven handler", WAIT, || inside.load(Ordering::SeqCst));
    let report = broker.shutdown(WAIT);
    assert!(finished.load(Ordering::SeqCst), "shutdown returned while the redrive ran: {report:?}");
    assert!(report.is_clean(), "{report:?}");
    let outcome = redrive.join().unwrap().expect("the redrive completed before the provider closed");
    assert_eq!(outcome.status, Some(EventStatus::Completed));
}

// 4g. The last handle kept in a thread-local, dropped as its thread exits after the thread made a
// synchronous publish (whose bookkeeping is a thread-local too, destroyed first): the broker shuts
// down, and the process does not abort.
#[test]
fn the_last_handle_dropped_with_its_threads_locals_shuts_down() {
    thread_local! {
        static HELD: std::cell::RefCell<Option<Broker>> = const { std::cell::RefCell::new(None) };
    }
    let broker = Broker::builder().workers(1).instance_id("tls-held").build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    broker
        .subscribe_infallible("x", move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    thread::spawn(move || {
        HELD.with(|held| *held.borrow_mut() = Some(broker));
        HELD.with(|held| held.borrow().as_ref().expect("held").publish_sync(event("x")).unwrap());
    })
    .join()
    .expect("the thread and its locals ended cleanly");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    wait_until("the workers to exit", WAIT, || !thread_names().iter().any(|n| n.contains("tls-held")));
}

// 5. Endless zero-delay retries run once per turn, so the rest of the shard goes on.
#[test]
fn endless_zero_delay_retries_do_not_starve_the_shard() {
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(RetryPolicy {
            max_retries: u32::MAX,
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            backoff_factor: 1.0,
            jitter: 0.0,
        })
        .build()
        .unwrap();
    broker.subscribe("always.fails", |_: &Event| Err::<(), _>("no")).unwrap();
    let (_, good) = broker.subscribe_stream("then.good").unwrap();
    broker.publish(event("always.fails")).unwrap();
    broker.publish(event("then.good")).unwrap();
    assert!(good.recv_timeout(Duration::from_secs(5)).is_ok(), "the good event starved behind the retries");
    let report = broker.shutdown(Duration::from_millis(200));
    assert_eq!(report.dead_lettered, 1, "the endless retry is dead-lettered at shutdown: {report:?}");
}

// 6. A provider that panics does not kill the writer: a batch it panicked on once is narrowed down
// and written; writes it keeps panicking on are dropped and counted, the writer goes on, and the
// next flush says so.
#[test]
fn a_panicking_provider_does_not_kill_the_writer() {
    let memory = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(memory.clone());
    let broker = Broker::builder().provider(faulty.clone()).build().unwrap();
    let stored = |event_type: &str| {
        let filter = eventbroker::EventFilter::new().with_event_type(event_type.parse().unwrap());
        memory.list(&filter).unwrap().len()
    };
    faulty.inject(Operation::StoreBatch, Fault::Panic { times: Some(1) });
    for _ in 0..10 {
        broker.publish(event("panicky.once")).unwrap();
    }
    broker.flush(WAIT).expect("the writes it panicked on once were written again");
    assert_eq!(broker.stats().writer.panics, 1);
    assert_eq!(stored("panicky.once"), 10);

    let calls_before = faulty.calls(Operation::StoreBatch);
    faulty.inject(Operation::StoreBatch, Fault::Panic { times: None });
    for _ in 0..10 {
        broker.publish(event("panicky")).unwrap();
    }
    let err = broker.flush(WAIT).unwrap_err();
    let BrokerError::WritesDropped { dropped, .. } = err else { panic!("expected WritesDropped, got {err}") };
    assert_eq!(dropped, 10, "each event given up once");
    let stats = broker.stats().writer;
    assert_eq!(stats.panics, 1 + faulty.calls(Operation::StoreBatch) - calls_before, "{stats:?}");
    assert!(stats.dropped == 10 && stats.errors >= 1, "{stats:?}");

    faulty.heal(Operation::StoreBatch);
    for _ in 0..10 {
        broker.publish(event("after")).unwrap();
    }
    broker.flush(WAIT).unwrap();
    assert_eq!(stored("after"), 10);
    assert!(broker.shutdown(WAIT).is_clean());
}

// 6b. An event the provider cannot hold is given up alone, not with the batch it was written in:
// its neighbours are stored, a confirmed publisher among them is told so, and dead letters
// written beside one that cannot be held are kept.
#[test]
fn an_event_the_provider_refuses_drops_alone() {
    let memory = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(memory.clone());
    faulty.refuse_events(|e| e.event_type.starts_with("poison."));
    // Everything published within 50 ms is written in one batch.
    let writer = WriterConfig { max_delay: Duration::from_millis(50), ..WriterConfig::default() };
    let broker = Broker::builder()
        .provider(faulty.clone())
        .writer(writer)
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    let mut events: Vec<Event> = (0..99).map(|_| event("neighbour.x")).collect();
    events.insert(40, event("poison.x"));
    let poison = events[40].id;
    broker.publish_batch(events).unwrap();
    broker.publish_confirmed(event("confirmed.x"), WAIT).expect("stored beside the refused event");
    let err = broker.flush(WAIT).unwrap_err();
    let BrokerError::WritesDropped { dropped, .. } = err else { panic!("expected WritesDropped, got {err}") };
    assert_eq!(dropped, 1, "the refused event alone");
    assert_eq!(memory.list(&eventbroker::EventFilter::new()).unwrap().len(), 100);
    assert!(memory.get(poison).unwrap().is_none());

    broker.subscribe("failing.>", |_: &Event| Err::<(), _>("no")).unwrap();
    broker.subscribe("poison.>", |_: &Event| Err::<(), _>("no")).unwrap();
    faulty.refuse_events(|e| e.event_type == "poison.letter");
    broker.publish(event("failing.one")).unwrap();
    broker.publish(event("poison.letter")).unwrap();
    broker.publish(event("failing.two")).unwrap();
    // The refused event's store and its dead letter.
    let drained = broker.drain(WAIT);
    assert!(
        matches!(drained, Err(DrainError::Write(BrokerError::WritesDropped { dropped: 2, .. }))),
        "{drained:?}"
    );
    let letters = memory.list_dead_letters(&DeadLetterFilter::new()).unwrap();
    let mut kept: Vec<&str> = letters.iter().map(|letter| letter.event.event_type.as_str()).collect();
    kept.sort_unstable();
    assert_eq!(kept, ["failing.one", "failing.two"], "the letters written beside the refused one");
    assert!(broker.shutdown(WAIT).flush_error.is_none(), "reported by the flush before");
}

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("a panic payload that panics when dropped");
    }
}

// 7. No input kills a worker: `Duration::MAX` retry delays, and a panic payload whose own drop
// panics.
#[test]
fn no_input_kills_a_worker() {
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::MAX,
            max_delay: Duration::MAX,
            backoff_factor: 2.0,
            jitter: 0.5,
        })
        .build()
        .unwrap();
    broker.subscribe("far.retry", |_: &Event| Err::<(), _>("later")).unwrap();
    broker.subscribe_infallible("evil.payload", |_| panic_any(PanicsOnDrop)).unwrap();
    let (_, good) = broker.subscribe_stream("still.good").unwrap();
    broker.publish(event("far.retry")).unwrap();
    broker.publish(event("evil.payload")).unwrap();
    broker.publish(event("still.good")).unwrap();
    assert!(good.recv_timeout(Duration::from_secs(5)).is_ok(), "the worker died");
    wait_until("both failures counted", WAIT, || broker.stats().handler_failures == 2);
    assert_eq!(broker.stats().internal_errors, 0, "both were contained where they happened");
    let report = broker.shutdown(Duration::from_millis(200));
    assert_eq!(report.dead_lettered, 2, "both failed deliveries wait a near-eternity: {report:?}");
}

// 8. `Duration::MAX` is a valid timeout everywhere: shutdown, blocking backpressure, the writer's
// batching delay.
#[test]
fn duration_max_is_a_valid_timeout_everywhere() {
    let gate = Gate::default();
    let broker = Broker::builder()
        .workers(1)
        .buffer_size(2)
        .backpressure(Backpressure::Block(Duration::MAX))
        .writer(WriterConfig { max_delay: Duration::MAX, ..WriterConfig::default() })
        .build()
        .unwrap();
    let g = gate.clone();
    broker.subscribe_infallible("gated", move |_| g.wait()).unwrap();
    thread::scope(|s| {
        let publisher = s.spawn(|| {
            for _ in 0..10 {
                broker.publish(event("gated")).unwrap();
            }
        });
        thread::sleep(Duration::from_millis(100)); // The shard fills; the publisher blocks.
        gate.open();
        publisher.join().expect("no overflow while blocked");
    });
    broker.flush(WAIT).unwrap();
    assert!(broker.shutdown(Duration::MAX).is_clean());
}

// 10. A flush that covers a dropped write reports it — once.
#[test]
fn flush_reports_writes_given_up_once() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder().provider(faulty.clone()).build().unwrap();
    faulty.inject(Operation::StoreBatch, Fault::permanent());
    // One event first: its store is exactly one call, so a retry would show. (Several events may
    // reach the writer in one batch or in several, and their statuses with them or after.)
    broker.publish(event("dropped")).unwrap();
    wait_until("the first drop", WAIT, || broker.stats().writer.dropped >= 1);
    assert_eq!(faulty.calls(Operation::StoreBatch), 1, "a permanent error is not retried");
    for _ in 0..4 {
        broker.publish(event("dropped")).unwrap();
    }
    wait_until("the drops", WAIT, || broker.stats().writer.dropped >= 5);
    assert_eq!(broker.stats().writer.dropped, 5, "each event is given up once");
    let err = broker.flush(WAIT).unwrap_err();
    let BrokerError::WritesDropped { dropped, .. } = err else { panic!("expected WritesDropped, got {err}") };
    assert_eq!(dropped, 5, "the flush reports every write given up since the last report");
    broker.flush(WAIT).expect("reported once");

    faulty.inject(Operation::StoreBatch, Fault::permanent());
    broker.publish(event("dropped.again")).unwrap();
    let report = broker.shutdown(WAIT);
    assert!(report.flush_error.is_some(), "shutdown's flush reports what was dropped since: {report:?}");
    assert!(!report.is_clean());
}

// 11. The shutdown report counts events a worker took and never began, synchronous publishes cut
// off, and workers left running.
#[test]
fn the_shutdown_report_counts_what_a_timed_out_shutdown_left() {
    let (hold, gate) = (Gate::default(), Gate::default());
    let holding = Arc::new(AtomicBool::new(false));
    let broker = Broker::builder().workers(1).build().unwrap();
    let (h, inside) = (hold.clone(), Arc::clone(&holding));
    broker
        .subscribe_infallible("hold", move |_| {
            inside.store(true, Ordering::Release);
            h.wait();
        })
        .unwrap();
    let g = gate.clone();
    let slow_calls = Arc::new(AtomicU64::new(0));
    let calls = Arc::clone(&slow_calls);
    broker
        .subscribe_infallible("slow", move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            g.wait();
        })
        .unwrap();
    // The worker waits inside a first event while the five are published, so that it takes all
    // five in its next batch rather than whichever were published when it woke.
    broker.publish(event("hold")).unwrap();
    wait_until("the worker to hold", WAIT, || holding.load(Ordering::Acquire));
    for _ in 0..5 {
        broker.publish(event("slow")).unwrap();
    }
    hold.open();
    wait_until("the worker to take the batch", WAIT, || broker.stats().shards[0].in_hand == 4);
    for _ in 0..2 {
        broker.publish(event("slow")).unwrap();
    }
    let report = broker.shutdown(Duration::from_millis(200));
    assert!(report.timed_out, "{report:?}");
    assert_eq!(report.detached_workers, 1);
    assert_eq!(report.undelivered, 6, "taken by the worker and never begun, or in the ring: {report:?}");
    // The worker left running ends with the handler it was in: what the report counts as
    // undelivered is never handled.
    gate.open();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(slow_calls.load(Ordering::SeqCst), 1, "only the event begun before the deadline ran");

    let gate = Gate::default();
    let entered = Arc::new(AtomicBool::new(false));
    let broker = Broker::builder().mode(Mode::Sync).build().unwrap();
    let (g, inside) = (gate.clone(), Arc::clone(&entered));
    broker
        .subscribe_infallible("sync.slow", move |_| {
            inside.store(true, Ordering::Release);
            g.wait();
        })
        .unwrap();
    thread::scope(|s| {
        s.spawn(|| broker.publish(event("sync.slow")));
        wait_until("the synchronous publish in its handler", WAIT, || entered.load(Ordering::Acquire));
        let report = broker.shutdown(Duration::from_millis(200));
        assert_eq!(report.sync_in_flight, 1, "{report:?}");
        assert!(report.timed_out && !report.is_clean());
        gate.open();
    });
}

// 12. `published` counts the events in a worker's current batch.
#[test]
fn published_counts_events_the_worker_holds() {
    let gate = Gate::default();
    let inside = Arc::new(AtomicBool::new(false));
    let broker = Broker::builder().workers(1).build().unwrap();
    let (g, i) = (gate.clone(), Arc::clone(&inside));
    broker
        .subscribe_infallible("held", move |_| {
            i.store(true, Ordering::Release);
            g.wait();
        })
        .unwrap();
    for _ in 0..3 {
        broker.publish(event("held")).unwrap();
    }
    wait_until("the worker inside a handler", WAIT, || inside.load(Ordering::Acquire));
    assert_eq!(broker.stats().published, 3);
    gate.open();
    assert!(broker.shutdown(WAIT).is_clean());
}

// 13. The same event published twice is two jobs with their own deliveries.
#[test]
fn duplicate_ids_are_tracked_per_job() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(1)).build().unwrap();
    broker.subscribe("dup", |_: &Event| Err::<(), _>("always")).unwrap();
    let e = event("dup");
    broker.publish(e.clone()).unwrap();
    broker.publish(e).unwrap();
    wait_until("both settled", WAIT, || broker.stats().processed == 2);
    broker.flush(WAIT).unwrap();
    let stats = broker.stats();
    assert_eq!(
        (stats.published, stats.processed, stats.failed, stats.dead_letters, stats.retries),
        (2, 2, 2, 2, 2)
    );
    assert!(broker.shutdown(WAIT).is_clean());
}

/// A broker whose provider refuses every store until healed, with a writer backlog of `backlog`.
fn storeless_broker(backpressure: Backpressure, backlog: usize) -> (Arc<FaultyProvider>, Broker) {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder()
        .provider(faulty.clone())
        .backpressure(backpressure)
        .writer(WriterConfig { max_backlog: backlog, ..WriterConfig::default() })
        .build()
        .unwrap();
    faulty.inject(Operation::StoreBatch, Fault::unavailable());
    (faulty, broker)
}

// 14. The writer's backlog bound holds for `publish_sync` and `publish_batch` too. A synchronous
// publish also needs room for its statuses, which wait in the writer with its store: it may be
// refused before ten stores are held.
#[test]
fn sync_and_batch_publishes_respect_the_writer_backlog() {
    let (faulty, broker) = storeless_broker(Backpressure::Reject, 10);
    let mut accepted = 0_usize;
    for _ in 0..20 {
        match broker.publish_sync(event("sync.backlog")) {
            Ok(()) => accepted += 1,
            Err(SyncPublishError::Rejected(PublishError::Full(_))) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let writer = broker.stats().writer;
    assert!((1..=10).contains(&accepted), "{accepted} accepted");
    assert!(writer.backlog <= 10 && writer.settle_backlog <= 10 + 2, "{writer:?}");
    let batch = (0..20).map(|_| event("batch.backlog")).collect();
    let err = broker.publish_batch(batch).unwrap_err();
    assert_eq!(err.accepted, 10 - accepted, "the backlog fills");
    assert!(broker.stats().writer.backlog <= 10);
    faulty.heal_all();
    broker.flush(WAIT).unwrap();
    let err = broker.publish_batch((0..20).map(|_| event("batch.backlog")).collect()).unwrap_err();
    assert_eq!((err.accepted, err.rejected.len()), (10, 10), "a batch takes only what the backlog holds");
    assert!(broker.stats().writer.backlog <= 10);
    broker.flush(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

// 14: a `publish_sync` waiting for room in the writer's backlog when shutdown begins is told the
// broker closed, not that it was full.
#[test]
fn a_sync_publish_waiting_for_the_writer_backlog_is_closed_by_shutdown() {
    let (_faulty, broker) = storeless_broker(Backpressure::Block(Duration::from_secs(30)), 1);
    broker.publish_sync(event("sync.first")).unwrap();
    let waiting = thread::spawn({
        let broker = broker.clone();
        move || broker.publish_sync(event("sync.second"))
    });
    thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished(), "it waits for room");
    let _ = broker.shutdown(Duration::from_millis(500));
    let outcome = waiting.join().unwrap();
    assert!(matches!(outcome, Err(SyncPublishError::Rejected(PublishError::Closed(_)))), "{outcome:?}");
    assert_eq!(broker.stats().rejected, 0, "not counted as refused for room");
}

// 14, for async code: `publish_when_room` waits for room in the writer's backlog too, and gets in
// once the provider recovers.
#[test]
fn an_async_publish_waits_for_the_writer_backlog() {
    let (faulty, broker) = storeless_broker(Backpressure::Block(Duration::from_secs(60)), 10);
    let mut accepted = 0;
    while broker.try_publish(event("async.backlog")).is_ok() {
        accepted += 1;
        assert!(accepted <= 10, "the backlog holds 10");
    }
    assert_eq!(accepted, 10);
    let waiting = event("async.backlog");
    let id = waiting.id;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let publish = tokio::spawn({
            let broker = broker.clone();
            async move { broker.publish_when_room(waiting).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!publish.is_finished(), "the backlog is still full");
        faulty.heal_all();
        tokio::time::timeout(WAIT, publish).await.expect("in once the writer catches up").unwrap().unwrap();
    });
    broker.flush(WAIT).unwrap();
    assert!(broker.provider().get(id).unwrap().is_some());
    assert!(broker.shutdown(WAIT).is_clean());
}

// 16. An empty list of handler failures displays without panicking.
#[test]
fn an_empty_handler_failure_list_displays() {
    assert_eq!(HandlerFailures::new(Vec::new()).to_string(), "no delivery failed");
    let err = SyncPublishError::HandlerFailed(HandlerFailures::new(Vec::new()));
    assert_eq!(err.to_string(), "no delivery failed");
}

/// A local broker, without retries, on a memory provider behind a fault injector.
fn local_broker_on_faults() -> (Arc<FaultyProvider>, Broker) {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let broker = Broker::builder()
        .provider(faulty.clone())
        .distribution(Distribution::Local)
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    (faulty, broker)
}

// Recovery cannot lose what it starts from: a redrive whose replacement letter cannot be stored
// keeps the original.
#[test]
fn redrive_keeps_the_dead_letter_until_its_replacement_is_stored() {
    let (faulty, broker) = local_broker_on_faults();
    broker.subscribe("orders.paid", |_: &Event| Err::<(), _>("still broken")).unwrap();
    broker.publish(event("orders.paid")).unwrap();
    wait_until("the dead letter", WAIT, || broker.stats().dead_letters == 1);
    let letter = broker.dead_letters(&eventbroker::DeadLetterFilter::new()).unwrap().remove(0);
    faulty.inject(Operation::StoreDeadLetters, Fault::permanent());
    assert!(broker.redrive(letter.id).is_err());
    assert_eq!(faulty.get_dead_letter(letter.id).unwrap().map(|l| l.id), Some(letter.id), "kept");
    faulty.heal_all();
    assert_eq!(broker.redrive(letter.id).unwrap().failed.len(), 1);
    assert!(faulty.get_dead_letter(letter.id).unwrap().is_none(), "replaced once the new one is stored");
    assert!(broker.shutdown(WAIT).is_clean());
}

// ... nor until the event's status is written: a redrive that delivered, but could not write the
// status (or look for the event's other letters), keeps the letter, and the next one completes.
#[test]
fn redrive_keeps_the_dead_letter_until_the_events_status_is_written() {
    let (faulty, broker) = local_broker_on_faults();
    let fixed = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fixed);
    broker
        .subscribe(
            "orders.paid",
            move |_: &Event| if f.load(Ordering::SeqCst) { Ok(()) } else { Err("broken") },
        )
        .unwrap();
    let e = event("orders.paid");
    let id = e.id;
    broker.publish(e).unwrap();
    wait_until("the dead letter", WAIT, || broker.stats().dead_letters == 1);
    let letter = broker.dead_letters(&eventbroker::DeadLetterFilter::new()).unwrap().remove(0);
    fixed.store(true, Ordering::SeqCst);
    for operation in [Operation::ListDeadLetters, Operation::UpdateStatusBatch] {
        faulty.inject(operation, Fault::permanent());
        assert!(broker.redrive(letter.id).is_err(), "{operation:?}");
        faulty.heal_all();
        assert_eq!(faulty.get_dead_letter(letter.id).unwrap().map(|l| l.id), Some(letter.id), "kept");
        assert_eq!(faulty.get(id).unwrap().unwrap().status, EventStatus::Failed);
    }
    let outcome = broker.redrive(letter.id).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, Some(EventStatus::Completed)));
    assert!(faulty.get_dead_letter(letter.id).unwrap().is_none());
    assert_eq!(faulty.get(id).unwrap().unwrap().status, EventStatus::Completed);
    assert!(broker.shutdown(WAIT).is_clean());
}

// Two redrives of one dead letter at once deliver it once: the second is refused while the first
// runs (and the letter is kept until the first has replaced or deleted it).
#[test]
fn concurrent_redrives_of_one_dead_letter_deliver_it_once() {
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let (entered, second_returned) = (Gate::default(), Gate::default());
    let (c, e, r) = (Arc::clone(&calls), entered.clone(), second_returned.clone());
    broker
        .subscribe("orders.paid", move |_: &Event| match c.fetch_add(1, Ordering::SeqCst) {
            0 => Err("the ledger is down"),
            1 => {
                // The first redrive's delivery: it waits for the second redrive to return.
                e.open();
                r.wait();
                Ok(())
            }
            _ => Ok(()),
        })
        .unwrap();
    broker.publish(event("orders.paid")).unwrap();
    broker.drain(WAIT).unwrap();
    let letter = broker.dead_letters(&DeadLetterFilter::new()).unwrap().remove(0);

    let first = {
        let broker = broker.clone();
        thread::spawn(move || broker.redrive(letter.id))
    };
    entered.wait();
    let second = broker.redrive(letter.id);
    second_returned.open();
    let first = first.join().unwrap().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first handling and one redrive; the second got {second:?}"
    );
    assert!(matches!(second, Err(BrokerError::StillHandling { .. })), "{second:?}");
    assert_eq!((first.delivered, first.status), (1, Some(EventStatus::Completed)));
    assert!(broker.dead_letters(&DeadLetterFilter::new()).unwrap().is_empty());
    assert!(broker.shutdown(WAIT).is_clean());
}

// Two redrives at once of an event's two dead letters (two subscriptions failed it) leave it
// `completed` once both delivered: neither may read the other's letter as still waiting while
// that one is deleting it.
#[test]
fn concurrent_redrives_of_an_events_two_dead_letters_complete_it() {
    let (faulty, broker) = local_broker_on_faults();
    let fixed = Arc::new(AtomicBool::new(false));
    for pattern in ["orders.paid", "orders.*"] {
        let f = Arc::clone(&fixed);
        broker
            .subscribe(pattern, move |_: &Event| if f.load(Ordering::SeqCst) { Ok(()) } else { Err("down") })
            .unwrap();
    }
    let e = event("orders.paid");
    let id = e.id;
    broker.publish(e).unwrap();
    broker.drain(WAIT).unwrap();
    let letters = broker.dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap();
    assert_eq!(letters.len(), 2);
    fixed.store(true, Ordering::SeqCst);
    // Each redrive reads the other's letter, then takes a while to delete its own.
    faulty.inject(Operation::DeleteDeadLetter, Fault::Delay(Duration::from_millis(300)));
    let first = {
        let (broker, letter) = (broker.clone(), letters[0].id);
        thread::spawn(move || broker.redrive(letter))
    };
    thread::sleep(Duration::from_millis(100));
    let second = broker.redrive(letters[1].id);
    let first = first.join().unwrap();
    faulty.heal_all();
    for (letter, outcome) in letters.iter().zip([&first, &second]) {
        match outcome {
            Ok(_) => {}
            // Refused while the other ran: the letter was kept, and goes now.
            Err(BrokerError::StillHandling { .. }) => _ = broker.redrive(letter.id).unwrap(),
            Err(error) => panic!("{error}"),
        }
    }
    assert!(broker.dead_letters(&DeadLetterFilter::new()).unwrap().is_empty());
    assert_eq!(
        faulty.get(id).unwrap().unwrap().status,
        EventStatus::Completed,
        "first {first:?}, second {second:?}"
    );
    assert!(broker.shutdown(WAIT).is_clean());
}

// Replay delivers again without touching the stored events or their status history.
#[test]
fn replay_leaves_the_stored_history_alone() {
    let memory = Arc::new(MemoryProvider::default());
    let broker = Broker::builder().provider(memory.clone()).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe_infallible("history.x", move |_| {
            h.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    let e = event("history.x");
    let id = e.id;
    broker.publish(e).unwrap();
    wait_until("the first delivery", WAIT, || handled.load(Ordering::Relaxed) == 1);
    broker.flush(WAIT).unwrap();
    let before = memory.get(id).unwrap().unwrap();
    assert_eq!(before.status, EventStatus::Completed);
    let stored_before = memory.stats().unwrap().events_published;

    assert_eq!(broker.replay(ReplayFrom::Beginning, Some("history.>")).unwrap().replayed, 1);
    wait_until("the replayed delivery", WAIT, || handled.load(Ordering::Relaxed) == 2);
    broker.flush(WAIT).unwrap();
    assert_eq!(memory.get(id).unwrap().unwrap(), before, "status, timestamps and payload untouched");
    assert_eq!(memory.stats().unwrap().events_published, stored_before, "nothing stored again");
    assert!(broker.shutdown(WAIT).is_clean());
}

// A replay while publishers store faster than it replays ends: it looks at no more than about
// twice the events the store holds, and says where a later replay picks up.
#[test]
fn a_replay_under_steady_publishing_ends() {
    const HELD: usize = 1_000;
    let config = eventbroker::MemoryConfig { max_events: HELD, ..Default::default() };
    let memory = Arc::new(MemoryProvider::new(config));
    let faulty = FaultyProvider::new(memory);
    let broker = Broker::builder().provider(faulty.clone()).build().unwrap();
    broker.subscribe_infallible("steady.>", |_| {}).unwrap();
    for _ in 0..HELD {
        broker.publish(event("steady.before")).unwrap();
    }
    broker.flush(WAIT).unwrap();
    // Each page read takes a while, and the publisher stores more than a page meanwhile.
    faulty.inject(Operation::Replay, Fault::Delay(Duration::from_millis(20)));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (broker, stop) = (broker.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut published, started) = (0u64, Instant::now());
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(20) {
                if broker.publish(event("steady.during")).is_ok() {
                    published += 1;
                }
                if published % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            published
        })
    };
    let started = Instant::now();
    let report = broker.replay(ReplayFrom::Beginning, None).unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = publisher.join().unwrap();
    let bound = 2 * HELD as u64 + 512;
    assert!(report.replayed <= bound, "replayed {} of a store of {HELD}", report.replayed);
    assert!(took < Duration::from_secs(15), "took {took:?} while {during} events were published");
    let resume = report.resume_from();
    assert!(
        !faulty.inner().replay(resume.position(), None, 1).unwrap().events.is_empty(),
        "what was stored since is left for a later replay from {resume:?}"
    );
    assert!(broker.shutdown(WAIT).is_clean());
}

// ... and on a quiet store it replays everything asked for, whatever it counts past its first
// pages: with a pattern, from a time, and going on from an earlier replay's cursor.
#[test]
fn a_replay_of_a_quiet_store_past_its_count_replays_everything() {
    let broker = Broker::builder().build().unwrap();
    let replayed = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&replayed);
    broker
        .subscribe_infallible(">", move |e: &Event| {
            if e.is_replay() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    let since = Timestamp::now();
    let old = since - Duration::from_secs(3600);
    // 5 000 events, a third `quiet.b`, a fifth created before `since`.
    let (mut a, mut a_new) = (0u64, 0u64);
    for i in 0..5_000u32 {
        let mut e = event(if i % 3 == 0 { "quiet.b" } else { "quiet.a" });
        if i % 5 == 0 {
            e.created_at = old;
        }
        if i % 3 != 0 {
            a += 1;
            a_new += u64::from(i % 5 != 0);
        }
        broker.publish(e).unwrap();
    }
    broker.drain(WAIT).unwrap();
    let mut expected = 0;
    let all = broker.replay(ReplayFrom::Beginning, None).unwrap();
    assert_eq!(all.replayed, 5_000);
    expected += 5_000;
    assert_eq!(broker.replay(ReplayFrom::Beginning, Some("quiet.a")).unwrap().replayed, a);
    expected += a;
    let timed = broker.replay(ReplayFrom::Time(since), Some("quiet.a")).unwrap();
    assert_eq!(timed.replayed, a_new);
    expected += a_new;
    assert_eq!(broker.replay(timed.resume_from(), Some("quiet.a")).unwrap().replayed, 0, "caught up");
    for _ in 0..3_000 {
        broker.publish(event("quiet.a")).unwrap();
    }
    broker.drain(WAIT).unwrap();
    let resumed = broker.replay(timed.resume_from(), Some("quiet.a")).unwrap();
    assert_eq!(resumed.replayed, 3_000, "what was stored since, from the earlier replay's cursor");
    expected += 3_000;
    assert_eq!(broker.replay(all.resume_from(), None).unwrap().replayed, 3_000);
    expected += 3_000;
    wait_until("the replays", WAIT, || replayed.load(Ordering::Relaxed) == expected);
    assert!(broker.shutdown(WAIT).is_clean());
}

// A replay that shutdown interrupts while it reads a page says `Closed`, as documented, not that
// the provider (closed by that shutdown) failed.
#[test]
fn a_replay_interrupted_by_shutdown_while_reading_says_closed() {
    let (faulty, weak) = sole_faulty();
    let broker = Broker::builder().provider(faulty).build().unwrap();
    broker.subscribe_infallible("closing.>", |_| {}).unwrap();
    for _ in 0..10 {
        broker.publish(event("closing.x")).unwrap();
    }
    broker.flush(WAIT).unwrap();
    weak.upgrade().unwrap().inject(Operation::Replay, Fault::Delay(Duration::from_millis(500)));
    let replay = {
        let broker = broker.clone();
        thread::spawn(move || broker.replay(ReplayFrom::Beginning, None))
    };
    thread::sleep(Duration::from_millis(100));
    let report = broker.shutdown(WAIT);
    assert_eq!(report.provider_close, CloseOutcome::Closed, "{report:?}");
    let replay = replay.join().unwrap();
    assert!(matches!(replay, Err(BrokerError::Closed)), "{replay:?}");
}

// 18. A synchronous publish's retry waiting when its subscription ends is not made: the delivery
// fails with a dead letter saying so, as a worker's does, and the handler is not called again.
#[test]
fn a_sync_retry_is_not_made_after_unsubscribe() {
    let delay = Duration::from_millis(500);
    let broker = Broker::builder()
        .retry_policy(RetryPolicy { initial_delay: delay, max_delay: delay, ..quick_retries(3) })
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let id = broker
        .subscribe("sync.unsubscribed", move |_: &Event| {
            counted.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("down")
        })
        .unwrap();
    let published = event("sync.unsubscribed");
    let event_id = published.id;
    let outcome = thread::scope(|s| {
        let publish = s.spawn(|| broker.publish_sync(published));
        wait_until("the first attempt", WAIT, || calls.load(Ordering::SeqCst) == 1);
        assert!(broker.unsubscribe(id));
        publish.join().unwrap()
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a retry was made after the unsubscribe");
    let Err(SyncPublishError::HandlerFailed(failures)) = outcome else { panic!("{outcome:?}") };
    let failure = &failures.failures()[0];
    assert_eq!(failure.attempts, 1);
    assert!(failure.error.contains("unsubscribed before retry 1"), "{}", failure.error);
    let letters = broker.dead_letters(&DeadLetterFilter::new().with_event_id(event_id)).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(broker.stats().retries, 0, "no retry was made");
    assert!(broker.shutdown(WAIT).is_clean());
}

// 19. While `publish_sync` runs the handlers, the event's stored status is `processing`, as on a
// worker, not `pending`.
#[test]
fn a_synchronous_events_status_is_processing_while_its_handlers_run() {
    for mode in [Mode::Sync, Mode::Async] {
        let broker = Broker::builder().mode(mode).build().unwrap();
        let seen = Arc::new(Mutex::new(None));
        let (status, provider) = (Arc::clone(&seen), Arc::clone(broker.provider()));
        broker
            .subscribe_infallible("status.seen", move |e: &Event| {
                *status.lock().unwrap() = provider.get(e.id).unwrap().map(|e| e.status);
            })
            .unwrap();
        let published = event("status.seen");
        let id = published.id;
        broker.publish(published).unwrap();
        broker.drain(WAIT).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(EventStatus::Processing), "{mode:?}");
        let stored = broker.provider().get(id).unwrap().unwrap();
        assert_eq!(stored.status, EventStatus::Completed, "{mode:?}");
        assert!(stored.processed_at.is_some() && stored.completed_at.is_some(), "{mode:?}");
        assert!(broker.shutdown(WAIT).is_clean());
    }
}

// 20. A drain that times out counts an event accepted before it and waiting for a retry as
// unfinished, however many events published after the call ended meanwhile.
#[test]
fn a_timed_out_drain_counts_an_event_waiting_behind_later_ones() {
    let far = Duration::from_secs(30);
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(RetryPolicy { initial_delay: far, max_delay: far, ..quick_retries(1) })
        .build()
        .unwrap();
    broker.subscribe("drain.stuck", |_: &Event| Err::<(), _>("down")).unwrap();
    broker.subscribe_infallible("drain.fine", |_| {}).unwrap();
    broker.publish(event("drain.stuck")).unwrap();
    wait_until("the retry to wait", WAIT, || broker.stats().pending_retries == 1);
    let outcome = thread::scope(|s| {
        let drain = s.spawn(|| broker.drain(Duration::from_millis(500)));
        // Meant to come after the drain began; should they come before, the count is the same.
        thread::sleep(Duration::from_millis(50));
        for _ in 0..5 {
            broker.publish(event("drain.fine")).unwrap();
        }
        drain.join().unwrap()
    });
    match outcome {
        Err(DrainError::TimedOut { unfinished, retrying, .. }) => {
            assert_eq!((unfinished, retrying), (1, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(broker.stats().completed, 5);
    let report = broker.shutdown(Duration::from_millis(200));
    assert_eq!(report.dead_lettered, 1, "{report:?}");
}
