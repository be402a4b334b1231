//! The broker with its provider: the batched writer, failures and recovery, confirmed publishing,
//! dead letters, redrive and replay.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use eventbroker::prelude::*;
use eventbroker::testing::{Fault, FaultyProvider, Operation};
use eventbroker::{
    Broker, BrokerError, ConfirmError, DeadLetterFilter, Event, EventId, EventStatus, MemoryProvider,
    ProviderErrorKind, PublishError, ReplayFrom, RetryPolicy, SubscriptionId,
};

mod common;
mod work_queue_support;
use common::{event, wait_until};

/// A memory provider behind a fault injector: the memory provider to look at what was stored, the
/// faulty one to give the broker.
fn flaky() -> (Arc<MemoryProvider>, Arc<FaultyProvider>) {
    let memory = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(memory.clone());
    (memory, faulty)
}

/// Makes every write of the writer fail with `fault` (reads still work).
fn outage(faulty: &FaultyProvider, fault: &Fault) {
    for op in [Operation::StoreBatch, Operation::UpdateStatusBatch, Operation::StoreDeadLetters] {
        faulty.inject(op, fault.clone());
    }
}

fn recover(faulty: &FaultyProvider) {
    faulty.heal_all();
}

/// A broker on `bus` that only publishes: no group of its own.
/// Subscription ids are counts per broker: the letter's id names another subscription in every
/// broker but the run that wrote it, and a redrive elsewhere goes by the letter's pattern.
#[test]
fn a_redrive_never_takes_another_brokers_subscription_with_the_same_id_for_the_one_that_failed() {
    let provider = Arc::new(MemoryProvider::default());
    let first = Broker::builder()
        .provider(provider.clone())
        .distribution(eventbroker::Distribution::Local)
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    first.subscribe("users.signed_up", |_: &Event| Err::<(), _>("smtp down")).unwrap();
    first.publish(event("users.signed_up")).unwrap();
    wait_until("the dead letter", Duration::from_secs(5), || first.stats().dead_letters == 1);
    first.drain(Duration::from_secs(5)).unwrap();
    let letter = first.dead_letters(&DeadLetterFilter::default()).unwrap().remove(0);

    // The next run subscribes in another order: its first subscription is not the one that failed.
    let report = first.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
    let next = Broker::builder()
        .provider(provider.clone())
        .distribution(eventbroker::Distribution::Local)
        .build()
        .unwrap();
    let audited = count_handled(&next, "audit.>");
    let err = next.redrive(letter.id).unwrap_err();
    assert!(
        matches!(err, BrokerError::NoSubscriber { ref pattern } if pattern == "users.signed_up"),
        "{err}"
    );
    assert_eq!(audited.load(Ordering::SeqCst), 0, "not the other pattern's handler");
    assert_eq!(next.dead_letters(&DeadLetterFilter::default()).unwrap().len(), 1, "kept");

    let mailed = count_handled(&next, "users.signed_up");
    let outcome = next.redrive(letter.id).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, Some(EventStatus::Completed)));
    assert_eq!((audited.load(Ordering::SeqCst), mailed.load(Ordering::SeqCst)), (0, 1));
    assert!(next.dead_letters(&DeadLetterFilter::default()).unwrap().is_empty());
    let report = next.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn brokers_draw_subscription_ids_from_ranges_of_their_own() {
    let (a, b) = (Broker::builder().build().unwrap(), Broker::builder().build().unwrap());
    let ids: Vec<_> = [&a, &b, &a, &b]
        .iter()
        .map(|broker| broker.subscribe_infallible("x.y", |_: &Event| {}).unwrap())
        .collect();
    assert!(ids[0] < ids[2] && ids[1] < ids[3], "in subscription order within a broker: {ids:?}");
    assert_ne!(ids[0], ids[1], "the first subscription of each broker: {ids:?}");
    assert!(ids[0].to_string().starts_with("sub-1."), "{}", ids[0]);
    assert!(ids[3].to_string().starts_with("sub-2."), "{}", ids[3]);
    for broker in [a, b] {
        assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    }
}

fn local_publisher(bus: &Arc<MemoryProvider>) -> Broker {
    let builder = Broker::builder().provider(bus.clone()).instance_id("publisher");
    builder.distribution(eventbroker::Distribution::Local).build().unwrap()
}

/// Subscribes a handler to `pattern` that counts the events it handles.
fn count_handled(broker: &Broker, pattern: &str) -> Arc<AtomicU64> {
    let handled = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&handled);
    broker
        .subscribe_infallible(pattern, move |_: &Event| {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    handled
}

fn stored_events(memory: &MemoryProvider) -> u64 {
    memory.stats().unwrap().events_published
}

#[test]
fn a_provider_outage_loses_nothing_and_local_dispatch_goes_on() {
    let (memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe("outage.*", move |_: &Event| {
            h.fetch_add(1, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
    outage(&provider, &Fault::unavailable());
    let mut ids = Vec::new();
    for i in 0..1000 {
        let e = event(if i % 2 == 0 { "outage.a" } else { "outage.b" });
        ids.push(e.id);
        broker.publish(e).unwrap();
    }
    wait_until("local dispatch during the outage", Duration::from_secs(10), || {
        handled.load(Ordering::Relaxed) == 1000
    });
    wait_until("the writer to hit the outage", Duration::from_secs(10), || broker.stats().writer.errors >= 2);
    assert_eq!(stored_events(&memory), 0);
    assert_eq!(broker.stats().writer.backlog, 1000, "every accepted event is held for the provider");
    assert!(matches!(broker.flush(Duration::from_secs(5)), Err(BrokerError::Provider(_))));

    recover(&provider);
    broker.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(stored_events(&memory), 1000);
    for id in ids {
        let stored = provider.get(id).unwrap().expect("every event reached the provider");
        assert_eq!(stored.status, EventStatus::Completed, "and its final status");
    }
    let stats = broker.stats();
    assert_eq!((stats.writer.backlog, stats.writer.dropped), (0, 0));
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

#[test]
fn a_long_outage_turns_into_backpressure_not_loss() {
    let (memory, provider) = flaky();
    let broker = Broker::builder()
        .provider(provider.clone())
        .backpressure(eventbroker::Backpressure::Reject)
        .writer(eventbroker::WriterConfig { max_backlog: 100, ..eventbroker::WriterConfig::default() })
        .build()
        .unwrap();
    outage(&provider, &Fault::unavailable());
    let mut accepted = 0;
    let rejected = loop {
        match broker.publish_async(event("backlog")) {
            Ok(()) => accepted += 1,
            Err(PublishError::Full(e)) => break e,
            Err(other) => panic!("unexpected {other}"),
        }
    };
    assert_eq!(accepted, 100);
    recover(&provider);
    broker.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(stored_events(&memory), 100);
    broker.publish(*rejected).unwrap();
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

/// Dead letters the provider keeps refusing for a while are held in a bounded backlog: past it the
/// worker takes no new events, its ring fills and publishing reports `Full`, instead of letters
/// piling up in memory for as long as the outage lasts. When it ends, every letter is written.
#[test]
fn unwritten_dead_letters_hold_the_workers_back_instead_of_piling_up() {
    const BACKLOG: usize = 64;
    const RING: usize = 64;
    let (memory, provider) = flaky();
    let broker = Broker::builder()
        .provider(provider.clone())
        .workers(1)
        .buffer_size(RING)
        .retry_policy(RetryPolicy { max_retries: 0, ..RetryPolicy::default() })
        .backpressure(eventbroker::Backpressure::Block(Duration::from_millis(500)))
        .writer(eventbroker::WriterConfig { max_backlog: BACKLOG, ..eventbroker::WriterConfig::default() })
        .build()
        .unwrap();
    broker.subscribe("fails.>", |_: &Event| Err::<(), _>("refused")).unwrap();
    provider.inject(Operation::StoreDeadLetters, Fault::unavailable());
    let mut accepted = 0_u64;
    let rejected = loop {
        match broker.publish_async(event("fails.now")) {
            Ok(()) => accepted += 1,
            Err(PublishError::Full(e)) => break e,
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(accepted < 5_000, "publishing never met the bound");
    };
    let writer = broker.stats().writer;
    // Past the bound a worker hands over what it has in hand: two ring batches of events, each
    // with its two statuses and its letter.
    let in_hand = 2 * RING * 3;
    assert!(writer.settle_backlog <= BACKLOG + in_hand, "{writer:?}");
    assert!(writer.settle_backlog >= BACKLOG, "the letters are what fills it: {writer:?}");
    assert!(writer.errors > 0 && writer.dead_letters == 0, "{writer:?}");

    recover(&provider);
    broker.flush(Duration::from_secs(10)).unwrap();
    broker.publish(*rejected).unwrap();
    broker.drain(Duration::from_secs(10)).unwrap();
    broker.flush(Duration::from_secs(10)).unwrap();
    let letters = memory.list_dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!(letters.len() as u64, accepted + 1, "every failed event has its letter");
    let writer = broker.stats().writer;
    assert_eq!((writer.settle_backlog, writer.backlog, writer.dropped), (0, 0, 0), "{writer:?}");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// Acknowledgements of other instances' events the provider keeps refusing for a while: the
/// receiver stops fetching once its writer holds a backlog of them, rather than fetching (and
/// holding acks for) everything the others publish; when the outage ends, every event is
/// acknowledged once, and none is handled twice.
#[test]
fn unwritten_acks_stop_the_receiver_fetching() {
    const BACKLOG: usize = 64;
    const RING: usize = 64;
    const EVENTS: u64 = 3_000;
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let receiver = Broker::builder()
        .provider(faulty.clone())
        .instance_id("acks-receiver")
        .workers(1)
        .buffer_size(RING)
        .writer(eventbroker::WriterConfig { max_backlog: BACKLOG, ..eventbroker::WriterConfig::default() })
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let handled = Arc::new(AtomicU64::new(0));
    let (s, h) = (Arc::clone(&seen), Arc::clone(&handled));
    receiver
        .subscribe_infallible("acks.>", move |event: &Event| {
            s.lock().unwrap().insert(event.id);
            h.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let publisher = local_publisher(&bus);
    thread::sleep(Duration::from_millis(300)); // The receiver's first fetch.
    faulty.inject(Operation::Ack, Fault::unavailable());
    for _ in 0..EVENTS {
        publisher.publish(event("acks.made")).unwrap();
    }
    wait_until("the receiver to hold back", Duration::from_secs(10), || {
        receiver.stats().writer.settle_backlog >= BACKLOG
    });
    let fetched = receiver.stats().inbound.fetched;
    thread::sleep(Duration::from_millis(300));
    let stats = receiver.stats();
    // The workers hand over what they have in hand (two ring batches), and the rings and the
    // fetch in flight hold the rest of what was fetched.
    assert!(stats.writer.settle_backlog <= BACKLOG + 2 * RING, "{:?}", stats.writer);
    assert!(stats.inbound.fetched < EVENTS / 2, "fetching stopped: {:?}", stats.inbound);
    assert!(stats.inbound.fetched <= fetched + RING as u64 * 2, "{fetched} then {:?}", stats.inbound);

    faulty.heal_all();
    wait_until("every event handled", Duration::from_secs(20), || handled.load(Ordering::SeqCst) >= EVENTS);
    // The last acks are handed over at the end of the worker's turn, after its handler returned.
    wait_until("every ack written", Duration::from_secs(10), || receiver.stats().writer.acks == EVENTS);
    let stats = receiver.stats();
    assert_eq!(handled.load(Ordering::SeqCst), EVENTS, "none handled twice");
    assert_eq!(seen.lock().unwrap().len() as u64, EVENTS);
    assert_eq!((stats.writer.acks, stats.writer.settle_backlog), (EVENTS, 0), "{:?}", stats.writer);
    for broker in [receiver, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

/// Claim extensions of inbound jobs waiting for a retry come again every `claim_idle / 3`; while
/// an earlier part of the writer's batch (an ack) is refused, each job's asks merge into one
/// rather than piling up for as long as the outage lasts.
#[test]
fn extensions_do_not_pile_up_while_acks_are_refused() {
    const BACKLOG: usize = 64;
    const RING: usize = 64;
    const WAITING: u64 = 100;
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let receiver = Broker::builder()
        .provider(faulty.clone())
        .instance_id("extends-receiver")
        .workers(1)
        .buffer_size(RING)
        .claim_idle(Duration::from_millis(300))
        .retry_policy(RetryPolicy {
            max_retries: 1,
            initial_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(60),
            backoff_factor: 1.0,
            jitter: 0.0,
        })
        .writer(eventbroker::WriterConfig { max_backlog: BACKLOG, ..eventbroker::WriterConfig::default() })
        .build()
        .unwrap();
    receiver.subscribe("later.>", |_: &Event| Err::<(), _>("not yet")).unwrap();
    let ok = count_handled(&receiver, "ok.>");
    let publisher = local_publisher(&bus);
    thread::sleep(Duration::from_millis(300)); // The receiver's first fetch.
    for _ in 0..WAITING {
        publisher.publish(event("later.made")).unwrap();
    }
    wait_until("the retries to be scheduled", Duration::from_secs(10), || {
        receiver.stats().pending_retries == WAITING
    });
    faulty.inject(Operation::Ack, Fault::unavailable());
    publisher.publish(event("ok.made")).unwrap();
    wait_until("the ok event", Duration::from_secs(10), || ok.load(Ordering::SeqCst) == 1);
    thread::sleep(Duration::from_secs(3));
    let writer = receiver.stats().writer;
    faulty.heal_all();
    // The ack, one ask a waiting job in the batch, and perhaps a worker's next asks on their way.
    assert!(writer.settle_backlog as u64 <= 1 + 2 * WAITING, "bounded: {writer:?}");
    for broker in [receiver, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

/// Status updates refused for a while: what waits for them stays bounded, and every status lands
/// once the provider is back.
#[test]
fn refused_status_updates_stay_bounded_and_land_once_healed() {
    const BACKLOG: usize = 64;
    const RING: usize = 64;
    let (memory, provider) = flaky();
    let broker = Broker::builder()
        .provider(provider.clone())
        .workers(1)
        .buffer_size(RING)
        .backpressure(eventbroker::Backpressure::Reject)
        .writer(eventbroker::WriterConfig { max_backlog: BACKLOG, ..eventbroker::WriterConfig::default() })
        .build()
        .unwrap();
    let handled = count_handled(&broker, "st.>");
    provider.inject(Operation::UpdateStatusBatch, Fault::unavailable());
    let mut ids = Vec::new();
    for round in 0..5 {
        loop {
            let e = event("st.x");
            let id = e.id;
            match broker.publish_async(e) {
                Ok(()) => ids.push(id),
                Err(PublishError::Full(_)) => break,
                Err(other) => panic!("unexpected {other}"),
            }
            assert!(ids.len() < 5_000, "never full");
        }
        thread::sleep(Duration::from_millis(100));
        let w = broker.stats().writer;
        assert!(w.settle_backlog <= BACKLOG + 2 * RING * 2, "round {round}: {w:?}");
        assert!(w.backlog <= BACKLOG, "{w:?}");
    }
    provider.heal_all();
    broker.drain(Duration::from_secs(10)).unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), ids.len() as u64);
    for id in &ids {
        assert_eq!(memory.get(*id).unwrap().expect("stored").status, EventStatus::Completed);
    }
    let w = broker.stats().writer;
    assert_eq!((w.settle_backlog, w.backlog, w.dropped), (0, 0, 0), "{w:?}");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// An event's first status folded into its store while another event's status waits for a
/// retry, and its later status arriving before that retry: the retry writes one merged update for
/// it, not two.
#[test]
fn a_status_after_one_folded_into_the_store_is_written_once() {
    let (memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).workers(1).build().unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    broker
        .subscribe("fold.slow", move |_: &Event| {
            released.lock().unwrap().recv_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())
        })
        .unwrap();
    provider.inject(Operation::UpdateStatusBatch, Fault::unavailable());
    let (first, second) = (event("fold.slow"), event("fold.slow"));
    broker.publish(first.clone()).unwrap();
    // Its `processing` folds into its store; its `completed` then waits, failing.
    wait_until("the first store", Duration::from_secs(10), || broker.stats().writer.stored == 1);
    release.send(()).unwrap();
    wait_until("the first handled", Duration::from_secs(10), || broker.stats().completed == 1);
    broker.publish(second.clone()).unwrap();
    wait_until("the second store", Duration::from_secs(10), || broker.stats().writer.stored == 2);
    release.send(()).unwrap();
    wait_until("the second handled", Duration::from_secs(10), || broker.stats().completed == 2);
    provider.heal_all();
    broker.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(broker.stats().writer.status_updates, 2, "one update an event");
    for id in [first.id, second.id] {
        assert_eq!(memory.get(id).unwrap().unwrap().status, EventStatus::Completed);
    }
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// After a long outage the writer's next try is a second away; a shutdown with a shorter deadline
/// does not wait for it: it tries at once, and the provider, back by then, gets every write.
#[test]
fn a_shutdown_after_a_long_outage_does_not_wait_out_the_backoff() {
    let (memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).build().unwrap();
    outage(&provider, &Fault::unavailable());
    for _ in 0..10 {
        broker.publish(event("outage.long")).unwrap();
    }
    // Tries 10, 20, … 640 ms apart: after the eighth failure the next is a second away.
    wait_until("the backoff to grow", Duration::from_secs(10), || broker.stats().writer.errors >= 8);
    recover(&provider);
    let report = broker.shutdown(Duration::from_millis(400));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(stored_events(&memory), 10);
}

#[test]
fn permanent_write_errors_are_counted_and_reported() {
    let (_memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).track_status(false).build().unwrap();
    let rejected =
        Fault::Fail { kind: ProviderErrorKind::InvalidInput("rejected by test".into()), times: None };
    outage(&provider, &rejected);
    let err = broker.publish_confirmed(event("perm"), Duration::from_secs(10)).unwrap_err();
    let ConfirmError::NotPersisted(error) = err else { panic!("expected NotPersisted, got {err}") };
    assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)));
    assert_eq!(broker.stats().writer.dropped, 1);
    assert_eq!(broker.stats().writer.backlog, 0);
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.flush_error.is_some(), "the write given up is reported: {report:?}");
}

#[test]
fn confirmed_publishes_share_provider_writes() {
    let (_memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).track_status(false).build().unwrap();
    let confirmed: Mutex<Vec<EventId>> = Mutex::default();
    thread::scope(|s| {
        for t in 0..8 {
            let (broker, confirmed) = (&broker, &confirmed);
            s.spawn(move || {
                for i in 0..50 {
                    let e = event("confirmed.x").with_user_id(t * 1000 + i);
                    let id = e.id;
                    broker.publish_confirmed(e, Duration::from_secs(10)).unwrap();
                    confirmed.lock().unwrap().push(id);
                }
            });
        }
    });
    let confirmed = confirmed.into_inner().unwrap();
    assert_eq!(confirmed.len(), 400);
    let writes = provider.calls(Operation::StoreBatch);
    assert!(writes < 400, "{writes} provider writes for 400 confirmed events: no group commit");
    for id in &confirmed {
        assert!(provider.get(*id).unwrap().is_some(), "a confirmed event is readable at once");
    }
    println!("400 confirmed events in {writes} provider writes");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn async_confirmed_publishes_share_provider_writes() {
    let (_memory, provider) = flaky();
    let broker = Broker::builder().provider(provider.clone()).track_status(false).build().unwrap();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
    let ids: Vec<EventId> = runtime.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let broker = broker.clone();
                tokio::spawn(async move {
                    let e = event("confirmed.async").with_user_id(i);
                    let id = e.id;
                    broker.publish_confirmed_when_room(e, Duration::from_secs(10)).await.map(|()| id)
                })
            })
            .collect();
        let mut ids = Vec::new();
        for task in tasks {
            ids.push(task.await.unwrap().unwrap());
        }
        ids
    });
    let writes = provider.calls(Operation::StoreBatch);
    assert!(writes < 200, "{writes} provider writes for 200 confirmed events: no group commit");
    for id in &ids {
        assert!(provider.get(*id).unwrap().is_some(), "a confirmed event is readable at once");
    }
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

/// A way to publish an event and wait for its write.
type ConfirmedPublish<'a> = dyn Fn(&Broker, Event) -> Result<(), ConfirmError> + 'a;

/// Blocking and awaited alike: the confirmed publish reports the outage, and the writer keeps
/// retrying the event until it is written.
#[test]
fn a_confirmed_publish_during_an_outage_reports_it_and_is_written_later() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let blocking = |broker: &Broker, e: Event| broker.publish_confirmed(e, Duration::from_secs(10));
    let awaited = |broker: &Broker, e: Event| {
        runtime.block_on(broker.publish_confirmed_when_room(e, Duration::from_secs(10)))
    };
    let publishes: [&ConfirmedPublish; 2] = [&blocking, &awaited];
    for publish in publishes {
        let (_memory, provider) = flaky();
        let broker = Broker::builder().provider(provider.clone()).track_status(false).build().unwrap();
        outage(&provider, &Fault::unavailable());
        let e = event("confirm.later");
        let id = e.id;
        let err = publish(&broker, e).unwrap_err();
        assert!(matches!(&err, ConfirmError::NotPersisted(e) if e.is_transient()), "{err}");
        recover(&provider);
        broker.flush(Duration::from_secs(10)).unwrap();
        assert!(provider.get(id).unwrap().is_some(), "the writer kept retrying");
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

#[test]
fn dead_letters_can_be_listed_and_redriven() {
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let (h, d) = (Arc::clone(&healthy), Arc::clone(&delivered));
    let sub = broker
        .subscribe("orders.*", move |e: &Event| {
            if !h.load(Ordering::SeqCst) {
                return Err(format!("cannot handle {}", e.event_type));
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    broker.publish(event("orders.paid").with_user_id(42)).unwrap();
    broker.publish(event("orders.shipped")).unwrap();
    wait_until("dead letters", Duration::from_secs(5), || broker.stats().dead_letters == 2);
    let letters = broker.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!(letters.len(), 2);
    let paid = letters.iter().find(|l| l.event.event_type == "orders.paid").unwrap();
    assert_eq!((paid.subscription_id, paid.pattern.as_str(), paid.attempts), (sub, "orders.*", 1));
    assert_eq!(paid.error, "cannot handle orders.paid");
    assert_eq!((paid.event.status, paid.event.user_id), (EventStatus::Failed, 42));

    // Still failing: the redrive fails again and the dead letter is replaced.
    let outcome = broker.redrive(paid.id).unwrap();
    assert_eq!((outcome.delivered, outcome.failed.len()), (0, 1));
    assert_eq!(broker.dead_letters(&DeadLetterFilter::default()).unwrap().len(), 2);

    healthy.store(true, Ordering::SeqCst);
    for letter in broker.dead_letters(&DeadLetterFilter::default()).unwrap() {
        let outcome = broker.redrive(letter.id).unwrap();
        assert_eq!((outcome.delivered, outcome.failed.len()), (1, 0));
    }
    assert_eq!(delivered.load(Ordering::SeqCst), 2);
    assert!(broker.dead_letters(&DeadLetterFilter::default()).unwrap().is_empty());
    assert!(matches!(broker.redrive(paid.id), Err(BrokerError::NoSuchDeadLetter(_))));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

/// A replay leaves the stored event's status alone, and so does the redrive of a dead letter a
/// replayed delivery left: the event's history stays what its first handling wrote.
#[test]
fn a_redrive_of_a_replays_dead_letter_writes_no_status() {
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    broker
        .subscribe("orders.*", |e: &Event| if e.is_replay() { Err("replays fail") } else { Ok(()) })
        .unwrap();
    let e = event("orders.paid");
    let id = e.id;
    broker.publish(e).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    let provider = broker.provider();
    let stored = || provider.get(id).unwrap().expect("stored");
    assert_eq!(stored().status, EventStatus::Completed);
    let first = stored();

    assert_eq!(broker.replay(ReplayFrom::Beginning, Some("orders.*")).unwrap().replayed, 1);
    broker.drain(Duration::from_secs(5)).unwrap();
    let letter = broker.dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap().remove(0);
    assert!(letter.event.is_replay());
    assert_eq!(stored(), first, "the replay wrote nothing over the stored event");

    let outcome = broker.redrive(letter.id).unwrap();
    assert_eq!((outcome.failed.len(), outcome.status), (1, None), "the redriven replay failed again");
    assert_eq!(stored(), first, "nor did its redrive");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A redrive writes the event's status as its deliveries end, and counts them: `failed` with the
/// new error while a delivery still fails (its new dead letter named in the outcome), nothing while
/// another subscription's dead letter of the event waits, `completed` once none is left. Without
/// status tracking it writes none.
#[test]
fn a_redrive_writes_the_events_status_and_counts_its_deliveries() {
    let policy = RetryPolicy {
        max_retries: 1,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        ..RetryPolicy::none()
    };
    let broker = Broker::builder().retry_policy(policy).build().unwrap();
    let healthy = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
    for (name, healthy) in ["a", "b"].into_iter().zip(&healthy) {
        let healthy = Arc::clone(healthy);
        broker
            .subscribe("orders.*", move |e: &Event| {
                if healthy.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(format!("{name} cannot take {}", e.id))
                }
            })
            .unwrap();
    }
    let e = event("orders.paid");
    let id = e.id;
    broker.publish(e).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    let provider = broker.provider();
    let stored = || provider.get(id).unwrap().expect("stored");
    assert_eq!((stored().status, stored().retry_count), (EventStatus::Failed, 1));
    let letters = |filter: DeadLetterFilter| broker.dead_letters(&filter).unwrap();
    let mine = letters(DeadLetterFilter::new().with_event_id(id));
    assert_eq!(mine.len(), 2, "one for each subscription");
    let before = broker.stats();

    // Still failing: `failed` again, with this redrive's error and times, and a new letter.
    let first = mine[0].clone();
    let outcome = broker.redrive(first.id).unwrap();
    assert_eq!((outcome.delivered, outcome.failed.len(), outcome.status), (0, 1, Some(EventStatus::Failed)));
    let after = broker.stats();
    assert_eq!(
        (after.handler_failures - before.handler_failures, after.retries - before.retries),
        (2, 1),
        "the redrive's two attempts and its retry are counted"
    );
    assert_eq!(after.dead_letters - before.dead_letters, 1);
    assert_eq!((after.completed, after.failed), (before.completed, before.failed), "the event counted once");
    let replacement = outcome.dead_letters[0];
    assert_eq!(outcome.dead_letters.len(), 1);
    let replaced = broker.provider().get_dead_letter(replacement).unwrap().expect("the new letter is stored");
    assert_eq!((replaced.event.id, replaced.subscription_id), (id, first.subscription_id));
    let failed = stored();
    assert_eq!(failed.status, EventStatus::Failed);
    assert_eq!(failed.error, outcome.failed[0].error);
    let (processed, completed) = (failed.processed_at.unwrap(), failed.completed_at.unwrap());
    assert!(replaced.failed_at >= processed && completed >= processed, "this redrive's times");

    // Delivered, but the other subscription's letter waits: the event stays `failed`.
    healthy[0].store(true, Ordering::SeqCst);
    healthy[1].store(true, Ordering::SeqCst);
    let outcome = broker.redrive(replacement).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, None));
    assert!(outcome.dead_letters.is_empty());
    assert_eq!(stored().status, EventStatus::Failed);

    // The last letter redriven: `completed`, the error cleared.
    let last = letters(DeadLetterFilter::new().with_event_id(id));
    assert_eq!(last.len(), 1);
    let outcome = broker.redrive(last[0].id).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, Some(EventStatus::Completed)));
    let done = stored();
    assert_eq!((done.status, done.error.as_str(), done.retry_count), (EventStatus::Completed, "", 0));
    assert!(done.completed_at.unwrap() >= done.processed_at.unwrap());
    assert!(done.processed_at.unwrap() >= completed, "the last redrive's times");
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");

    // Untracked: the redrive delivers and writes no status.
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).track_status(false).build().unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fixed);
    broker
        .subscribe("orders.*", move |_: &Event| if f.load(Ordering::SeqCst) { Ok(()) } else { Err("broken") })
        .unwrap();
    broker.publish(event("orders.paid")).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    fixed.store(true, Ordering::SeqCst);
    let letter = broker.dead_letters(&DeadLetterFilter::new()).unwrap().remove(0);
    let outcome = broker.redrive(letter.id).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, None));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_redrive_that_finds_its_stream_gone_keeps_the_dead_letter() {
    let broker = Broker::builder().workers(1).retry_policy(RetryPolicy::none()).build().unwrap();
    let (_, events) = broker.subscribe_stream_bounded("audit.>", 1).unwrap();
    broker.publish(event("audit.login")).unwrap();
    broker.publish(event("audit.logout")).unwrap();
    wait_until("the full stream's dead letter", Duration::from_secs(5), || broker.stats().dead_letters == 1);
    // The consumer goes away without reading; the subscription has not noticed yet.
    drop(events);
    assert_eq!(broker.stats().subscriptions, 1);
    let letter = broker.dead_letters(&DeadLetterFilter::default()).unwrap().remove(0);
    let err = broker.redrive(letter.id).unwrap_err();
    assert!(matches!(err, BrokerError::NoSubscriber { ref pattern } if pattern == "audit.>"), "{err}");
    assert_eq!(
        broker.dead_letters(&DeadLetterFilter::default()).unwrap().len(),
        1,
        "kept, not counted delivered"
    );
    assert_eq!(broker.stats().subscriptions, 0, "the redrive found the receiver gone");
    assert_eq!(broker.provider().get(letter.event.id).unwrap().map(|e| e.status), Some(EventStatus::Failed));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn redrive_finds_a_new_subscription_with_the_same_pattern() {
    let broker = Broker::builder().retry_policy(RetryPolicy::none()).build().unwrap();
    let old = broker.subscribe("audit.>", |_: &Event| Err::<(), _>("old handler broken")).unwrap();
    broker.publish(event("audit.login")).unwrap();
    wait_until("the dead letter", Duration::from_secs(5), || broker.stats().dead_letters == 1);
    broker.unsubscribe(old);
    let letter = broker.dead_letters(&DeadLetterFilter::default()).unwrap().remove(0);
    let err = broker.redrive(letter.id).unwrap_err();
    assert!(matches!(err, BrokerError::NoSubscriber { ref pattern } if pattern == "audit.>"), "{err}");
    assert_eq!(broker.dead_letters(&DeadLetterFilter::default()).unwrap().len(), 1, "kept");

    let got: Arc<Mutex<Vec<Event>>> = Arc::default();
    let g = Arc::clone(&got);
    broker
        .subscribe("audit.>", move |e: &Event| {
            g.lock().unwrap().push(e.clone());
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!(broker.redrive(letter.id).unwrap().delivered, 1);
    let got = got.lock().unwrap();
    assert_eq!(got[0].id, letter.event.id, "the same event");
    assert_eq!(got[0].metadata["redriven_from"], letter.id.to_string());
    assert_eq!(got[0].redriven_from(), Some(letter.id));
    assert!(!got[0].is_replay());
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn replay_redelivers_stored_events_in_order() {
    let broker = Broker::builder().workers(2).build().unwrap();
    let first_pass = Arc::new(AtomicU64::new(0));
    let f = Arc::clone(&first_pass);
    let sub = broker
        .subscribe("r.*", move |_: &Event| {
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<(), String>(())
        })
        .unwrap();
    let mut published = Vec::new();
    for i in 0..1200 {
        let e = event(if i % 3 == 0 { "r.a" } else { "r.b" }).with_user_id(i).with_partition_key("one");
        published.push((e.id, e.event_type.clone()));
        broker.publish(e).unwrap();
    }
    wait_until("the first pass", Duration::from_secs(10), || first_pass.load(Ordering::SeqCst) == 1200);
    broker.unsubscribe(sub);

    let replayed: Arc<Mutex<Vec<Event>>> = Arc::default();
    let r = Arc::clone(&replayed);
    broker
        .subscribe("r.*", move |e: &Event| {
            r.lock().unwrap().push(e.clone());
            Ok::<(), String>(())
        })
        .unwrap();
    let report = broker.replay(ReplayFrom::Beginning, Some("r.a")).unwrap();
    assert_eq!(report.replayed, 400);
    wait_until("the replay", Duration::from_secs(10), || replayed.lock().unwrap().len() == 400);
    let replayed = replayed.lock().unwrap();
    let expected: Vec<EventId> = published.iter().filter(|(_, t)| t == "r.a").map(|(id, _)| *id).collect();
    assert_eq!(replayed.iter().map(|e| e.id).collect::<Vec<_>>(), expected, "oldest first, r.a only");
    assert!(replayed.iter().all(|e| e.metadata["replay"] == true && e.is_replay()));

    assert_eq!(report.resume_from().position(), ReplayFrom::Sequence(report.last_seq.unwrap() + 1));
    let resumed = broker.replay(report.resume_from(), Some("r.a")).unwrap();
    assert_eq!(resumed.replayed, 0, "resuming after the last replayed sequence finds no more r.a");
    assert!(matches!(broker.replay(ReplayFrom::Beginning, Some("r..")), Err(BrokerError::Pattern(_))));
    let report = broker.shutdown(Duration::from_secs(5));
    assert!(report.is_clean(), "{report:?}");
}

/// A batch shows as `processing` while its handlers run, and its events keep that time once
/// completed: the batch a worker takes as it finishes another (its statuses written together with
/// the completions) as much as the first.
#[test]
fn a_batch_shows_as_processing_while_it_is_handled() {
    let memory = Arc::new(MemoryProvider::default());
    let broker = Broker::builder().provider(memory.clone()).workers(1).build().unwrap();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let inside = Arc::new(AtomicU64::new(0));
    let entered = Arc::clone(&inside);
    broker
        .subscribe_infallible("gated.*", move |_| {
            entered.fetch_add(1, Ordering::SeqCst);
            gate.lock().unwrap().recv_timeout(Duration::from_secs(10)).expect("released");
        })
        .unwrap();
    let status = |id: EventId| {
        let event = memory.get(id).unwrap().expect("stored");
        (event.status, event.processed_at, event.completed_at)
    };

    let first = event("gated.first");
    let first_id = first.id;
    broker.publish(first).unwrap();
    wait_until("the first handler", Duration::from_secs(5), || inside.load(Ordering::SeqCst) == 1);
    let (now, processed_at, completed_at) = status(first_id);
    assert_eq!((now, completed_at), (EventStatus::Processing, None));
    assert!(processed_at.is_some());

    // Two more wait while the first is held; the worker takes them as it finishes it.
    let (second, third) = (event("gated.second"), event("gated.third"));
    let ids = [second.id, third.id];
    broker.publish(second).unwrap();
    broker.publish(third).unwrap();
    assert_eq!(status(ids[0]).0, EventStatus::Pending);
    release.send(()).unwrap();
    wait_until("the second handler", Duration::from_secs(5), || inside.load(Ordering::SeqCst) == 2);
    let (now, _, completed_at) = status(first_id);
    assert_eq!(now, EventStatus::Completed);
    assert!(completed_at >= processed_at);
    assert_eq!(status(first_id).1, processed_at, "completion keeps the time processing began");
    for id in ids {
        let (now, processed_at, completed_at) = status(id);
        assert_eq!((now, completed_at), (EventStatus::Processing, None), "{id}");
        assert!(processed_at.is_some());
    }

    release.send(()).unwrap();
    release.send(()).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    for id in ids {
        assert_eq!(status(id).0, EventStatus::Completed);
    }
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A member holds at most its prefetch of other instances' events at a time: fetched, and not yet
/// acknowledged. It fetches more as they end.
#[test]
fn a_member_holds_at_most_its_prefetch() {
    let bus = Arc::new(MemoryProvider::default());
    let group = eventbroker::Distribution::WorkQueue("prefetch-workers".into());
    let member = Broker::builder()
        .provider(bus.clone())
        .instance_id("m")
        .distribution(group)
        .prefetch(3)
        .build()
        .unwrap();
    let publisher = Broker::builder().provider(bus.clone()).instance_id("p").build().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let (r, h) = (Arc::clone(&release), Arc::clone(&handled));
    member
        .subscribe_infallible("jobs.*", move |_: &Event| {
            while !r.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            h.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    for _ in 0..20 {
        publisher.publish(event("jobs.run")).unwrap();
    }
    wait_until("the member to hold its prefetch", Duration::from_secs(5), || {
        member.stats().inbound.fetched == 3
    });
    thread::sleep(Duration::from_millis(300));
    assert_eq!(member.stats().inbound.fetched, 3, "no more fetched while three are held");
    release.store(true, Ordering::SeqCst);
    wait_until("every job", Duration::from_secs(10), || handled.load(Ordering::SeqCst) == 20);
    assert!(matches!(
        Broker::builder().prefetch(0).build(),
        Err(eventbroker::BuildError::Config(e)) if e.key() == "prefetch"
    ));
    for broker in [member, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

/// An instance that only publishes, as `Distribution::Local`, reaches the instances that receive,
/// and opens no consumer group of its own.
#[test]
fn a_local_broker_that_only_publishes_reaches_the_receivers_without_a_group() {
    let bus = Arc::new(MemoryProvider::default());
    let receiver = Broker::builder().provider(bus.clone()).instance_id("receiver").build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    receiver
        .subscribe_infallible("orders.>", move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    let publisher = local_publisher(&bus);
    assert_eq!(bus.stats().unwrap().active_subscribers, 1, "the receiver's group alone");
    thread::sleep(Duration::from_millis(300)); // The receiver's first fetch.
    for _ in 0..5 {
        publisher.publish(event("orders.created")).unwrap();
    }
    wait_until("the receiver to get all five", Duration::from_secs(10), || {
        handled.load(Ordering::Relaxed) == 5
    });
    assert!(publisher.shutdown(Duration::from_secs(5)).is_clean());
    assert!(receiver.shutdown(Duration::from_secs(5)).is_clean());
}

/// A work-queue member that unsubscribes while events fetched for it wait in its shard gives them
/// back to the group, where a member still subscribed handles them: none counts as handled here.
#[test]
fn a_member_that_unsubscribes_gives_back_what_it_fetched_for_the_subscription() {
    let bus = Arc::new(MemoryProvider::default());
    let group = eventbroker::Distribution::WorkQueue("unsubscribing-workers".into());
    let member = |name: &str, prefetch: usize| {
        Broker::builder()
            .provider(bus.clone())
            .instance_id(name)
            .distribution(group.clone())
            .workers(1)
            .prefetch(prefetch)
            .build()
            .unwrap()
    };
    let leaving = member("leaving", 8);
    let release = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicU64::new(0));
    let (r, h) = (Arc::clone(&release), Arc::clone(&held));
    let id = leaving
        .subscribe_infallible("jobs.*", move |_: &Event| {
            h.fetch_add(1, Ordering::SeqCst);
            while !r.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
        })
        .unwrap();
    let publisher = Broker::builder().provider(bus.clone()).instance_id("publisher").build().unwrap();
    // The leaving member's worker is in its handler with the first event while the next seven
    // of its prefetch wait in its shard; then it unsubscribes.
    publisher.publish(event("jobs.run")).unwrap();
    wait_until("the first event's handler", Duration::from_secs(5), || held.load(Ordering::SeqCst) == 1);
    for _ in 0..19 {
        publisher.publish(event("jobs.run")).unwrap();
    }
    wait_until("the leaving member to hold its prefetch", Duration::from_secs(5), || {
        leaving.stats().inbound.fetched == 8
    });
    assert!(leaving.unsubscribe(id));
    release.store(true, Ordering::SeqCst);
    // A fetch in flight at the unsubscribe may bring some back once more: they go back again.
    wait_until("the leaving member to end what it fetched", Duration::from_secs(10), || {
        let stats = leaving.stats();
        stats.completed + stats.returned == stats.inbound.fetched
    });
    let stats = leaving.stats();
    assert_eq!(stats.completed, 1, "only the first handled: {stats:?}");
    assert!(stats.returned >= 7, "the seven it had not begun go back: {stats:?}");

    let staying = member("staying", 32);
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&handled);
    staying.subscribe_infallible("jobs.*", move |event: &Event| seen.lock().unwrap().push(event.id)).unwrap();
    wait_until("the staying member to handle the rest", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 19
    });
    for broker in [leaving, staying, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

#[test]
fn a_member_whose_stream_receiver_is_dropped_leaves_the_group_without_a_matching_event() {
    let bus = Arc::new(MemoryProvider::default());
    let group = eventbroker::Distribution::WorkQueue("abandoning-workers".into());
    let member = |name: &str| {
        Broker::builder().provider(bus.clone()).instance_id(name).distribution(group.clone()).build().unwrap()
    };
    let leaving = member("leaving");
    let (_, events) = leaving.subscribe_stream("jobs.*").unwrap();
    let staying = member("staying");
    let handled = count_handled(&staying, "jobs.*");

    // The consumer goes away. No event of its pattern comes; its inbound thread notices anyway,
    // and the member stops taking the group's events.
    drop(events);
    wait_until("the abandoned stream to end", Duration::from_secs(5), || leaving.stats().subscriptions == 0);
    let publisher = local_publisher(&bus);
    for _ in 0..20 {
        publisher.publish(event("jobs.run")).unwrap();
    }
    wait_until("the staying member to handle all", Duration::from_secs(10), || {
        handled.load(Ordering::SeqCst) == 20
    });
    let stats = leaving.stats();
    assert_eq!(
        (stats.inbound.fetched, stats.returned),
        (0, 0),
        "nothing fetched, nothing given back: {stats:?}"
    );
    for broker in [leaving, staying, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

/// A member whose stream receiver is dropped while the stream's event waits in its shard behind a
/// slow one, longer than an unsubscribe's give-back window: the event still goes back to the
/// group (the ending of abandoned subscriptions waits until the member holds nothing).
#[test]
fn an_event_waiting_for_an_abandoned_stream_goes_back_to_the_group_however_long_it_waited() {
    let bus = Arc::new(MemoryProvider::default());
    let group = eventbroker::Distribution::WorkQueue("slow-abandoning-workers".into());
    let member = |name: &str| {
        Broker::builder()
            .provider(bus.clone())
            .instance_id(name)
            .distribution(group.clone())
            .workers(1)
            .build()
            .unwrap()
    };
    let leaving = member("leaving");
    let (_, events) = leaving.subscribe_stream("jobs.*").unwrap();
    leaving.subscribe_infallible("slow.*", |_: &Event| thread::sleep(Duration::from_secs(4))).unwrap();
    let publisher = local_publisher(&bus);
    thread::sleep(Duration::from_millis(300)); // The leaving member's first fetch.
    publisher.publish(event("slow.job")).unwrap();
    publisher.publish(event("jobs.run")).unwrap();
    wait_until("the leaving member to hold both", Duration::from_secs(5), || {
        leaving.stats().inbound.fetched == 2
    });
    drop(events);
    let staying = member("staying");
    let handled = count_handled(&staying, "jobs.*");
    wait_until("the staying member to get the job", Duration::from_secs(10), || {
        handled.load(Ordering::SeqCst) == 1
    });
    let stats = leaving.stats();
    // Given back (perhaps more than once: fetched again before the stream ended), never consumed.
    assert!(stats.returned >= 1 && stats.unrouted == 0 && stats.completed == 1, "{stats:?}");
    for broker in [leaving, staying, publisher] {
        let report = broker.shutdown(Duration::from_secs(5));
        assert!(report.is_clean(), "{report:?}");
    }
}

/// `max_retries` retries, each `delay` after the attempt before it.
fn fixed_retries(max_retries: u32, delay: Duration) -> RetryPolicy {
    RetryPolicy { max_retries, initial_delay: delay, max_delay: delay, backoff_factor: 1.0, jitter: 0.0 }
}

/// A broker on `memory` whose one handler of `jobs.run` always fails with "boom", retried after
/// `delay` (three times at most), and one such event published and handled once; with the count
/// of handler calls and the event's id.
fn a_failing_job(
    memory: &Arc<MemoryProvider>,
    delay: Duration,
) -> (Broker, SubscriptionId, Arc<AtomicU64>, EventId) {
    let policy = fixed_retries(3, delay);
    let broker = Broker::builder().provider(memory.clone()).retry_policy(policy).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let subscription = broker
        .subscribe("jobs.run", move |_: &Event| {
            counter.fetch_add(1, Ordering::SeqCst);
            Err("boom")
        })
        .unwrap();
    let job = event("jobs.run");
    let id = job.id;
    broker.publish(job).unwrap();
    wait_until("the first attempt", Duration::from_secs(5), || calls.load(Ordering::SeqCst) >= 1);
    (broker, subscription, calls, id)
}

/// A delivery ended while its first retry waited (its subscription ended, or shutdown came
/// first) made no retry and failed with the handler's error: the letter and the stored event say
/// so alike.
#[test]
fn a_delivery_ended_before_its_retry_keeps_the_handlers_error_and_no_retry() {
    for shutdown in [false, true] {
        let memory = Arc::new(MemoryProvider::default());
        let delay = if shutdown { Duration::from_secs(10) } else { Duration::from_millis(300) };
        let (broker, subscription, calls, id) = a_failing_job(&memory, delay);
        if shutdown {
            let report = broker.shutdown(Duration::from_millis(300));
            assert_eq!(report.dead_lettered, 1, "{report:?}");
        } else {
            broker.unsubscribe(subscription);
            broker.drain(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry was made");
        let letter = memory.list_dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap().remove(0);
        let stored = memory.get(id).unwrap().unwrap();
        assert_eq!((letter.attempts, letter.event.retry_count), (1, 0), "shutdown: {shutdown}");
        assert_eq!((stored.status, stored.retry_count), (EventStatus::Failed, 0), "shutdown: {shutdown}");
        assert!(letter.error.contains("(last error: boom)"), "{}", letter.error);
        assert_eq!(stored.error, letter.error);
        if !shutdown {
            assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
        }
    }
}

/// A replayed event reaches its handlers as it was published: its first handling's status,
/// error, retries and times stay in the store.
#[test]
fn a_replayed_event_reaches_its_handlers_as_published() {
    let memory = Arc::new(MemoryProvider::default());
    let (broker, subscription, _, id) = a_failing_job(&memory, Duration::from_millis(1));
    broker.drain(Duration::from_secs(5)).unwrap();
    broker.unsubscribe(subscription);
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = Arc::clone(&seen);
    broker.subscribe_infallible("jobs.run", move |e: &Event| s.lock().unwrap().push(e.clone())).unwrap();
    assert_eq!(broker.replay(ReplayFrom::Beginning, None).unwrap().replayed, 1);
    broker.drain(Duration::from_secs(5)).unwrap();
    let seen = seen.lock().unwrap();
    let replayed = &seen[0];
    assert_eq!(replayed.id, id);
    assert_eq!(
        (replayed.status, replayed.error.as_str(), replayed.retry_count),
        (EventStatus::Pending, "", 0)
    );
    assert_eq!((replayed.processed_at, replayed.completed_at), (None, None));
    assert_eq!(memory.get(id).unwrap().unwrap().retry_count, 3, "the store keeps the first handling's");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A broker on a memory provider of the test's, with no retries, whose handler of `orders.*`
/// fails ("down") until the flag returned is set.
fn a_handler_to_fix() -> (Arc<MemoryProvider>, Broker, Arc<AtomicBool>) {
    let memory = Arc::new(MemoryProvider::default());
    let broker =
        Broker::builder().provider(memory.clone()).retry_policy(RetryPolicy::none()).build().unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fixed);
    broker
        .subscribe("orders.*", move |_: &Event| if f.load(Ordering::SeqCst) { Ok(()) } else { Err("down") })
        .unwrap();
    (memory, broker, fixed)
}

/// A redrive of an event the provider no longer holds writes no status, and says so.
#[test]
fn a_redrive_of_an_event_no_longer_stored_reports_no_status() {
    let (memory, broker, fixed) = a_handler_to_fix();
    let paid = event("orders.paid");
    let id = paid.id;
    broker.publish(paid).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    assert!(memory.delete(id).unwrap());
    fixed.store(true, Ordering::SeqCst);
    let letter = broker.dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap().remove(0);
    let outcome = broker.redrive(letter.id).unwrap();
    assert_eq!((outcome.delivered, outcome.status), (1, None));
    assert!(memory.get(id).unwrap().is_none(), "no status of an event it does not hold");
    assert!(broker.dead_letters(&DeadLetterFilter::new()).unwrap().is_empty());
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A redrive of a letter whose event is still being handled (another delivery of it waits, here
/// for an acknowledgement) is refused, the letter kept: the status written as the event's handling
/// ends would overwrite the redrive's. Once it has ended, the redrive goes through and its status
/// stays. The letter itself is stored at once, dated when its delivery gave up.
#[test]
fn a_redrive_waits_until_its_events_other_deliveries_end() {
    let (memory, broker, fixed) = a_handler_to_fix();
    let (_acked, deliveries) = broker.subscribe_acked("orders.*").unwrap();
    let paid = event("orders.paid");
    let id = paid.id;
    let published = eventbroker::Timestamp::now();
    broker.publish(paid).unwrap();
    let delivery = deliveries.recv_timeout(Duration::from_secs(5)).unwrap();
    let mut letters = Vec::new();
    wait_until("the dead letter", Duration::from_secs(5), || {
        letters = broker.dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap();
        !letters.is_empty()
    });
    let letter = letters.remove(0);
    assert!(letter.failed_at >= published && letter.failed_at <= eventbroker::Timestamp::now());
    fixed.store(true, Ordering::SeqCst);
    let err = broker.redrive(letter.id).unwrap_err();
    assert!(matches!(err, BrokerError::StillHandling { event } if event == id), "{err}");
    delivery.ack();
    broker.drain(Duration::from_secs(5)).unwrap();
    assert_eq!(memory.get(id).unwrap().unwrap().status, EventStatus::Failed);
    assert_eq!(broker.redrive(letter.id).unwrap().status, Some(EventStatus::Completed));
    broker.drain(Duration::from_secs(5)).unwrap();
    let stored = memory.get(id).unwrap().unwrap();
    assert_eq!((stored.status, stored.error.as_str()), (EventStatus::Completed, ""));
    assert!(broker.dead_letters(&DeadLetterFilter::new()).unwrap().is_empty());
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A failed event's stored retries and error are those of its delivery that failed, not of
/// another that succeeded after a retry.
#[test]
fn a_failed_events_retry_count_is_its_failed_deliverys() {
    let memory = Arc::new(MemoryProvider::default());
    let delay = Duration::from_millis(200);
    let policy = fixed_retries(3, delay);
    let broker = Broker::builder().provider(memory.clone()).workers(1).retry_policy(policy).build().unwrap();
    let flaky_calls = Arc::new(AtomicU64::new(0));
    let calls = Arc::clone(&flaky_calls);
    broker
        .subscribe(
            "jobs.run",
            move |_: &Event| if calls.fetch_add(1, Ordering::SeqCst) == 0 { Err("flaky") } else { Ok(()) },
        )
        .unwrap();
    let failing = broker.subscribe("jobs.run", |_: &Event| Err::<(), _>("boom")).unwrap();
    let job = event("jobs.run");
    let id = job.id;
    broker.publish(job).unwrap();
    wait_until("both first attempts", Duration::from_secs(5), || broker.stats().handler_failures == 2);
    assert!(broker.unsubscribe(failing));
    broker.drain(Duration::from_secs(5)).unwrap();
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2, "the flaky one succeeded on its retry");
    let letter = memory.list_dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap().remove(0);
    let stored = memory.get(id).unwrap().unwrap();
    assert_eq!((letter.attempts, letter.event.retry_count), (1, 0));
    assert_eq!((stored.status, stored.retry_count), (EventStatus::Failed, 0));
    assert_eq!(stored.error, letter.error);
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A delivery that gave up before shutdown has its letter stored even when the shutdown detaches
/// its worker (busy in another handler) while another delivery of the event still waits.
#[test]
fn a_dead_letter_made_before_shutdown_is_stored_when_its_worker_is_detached() {
    let memory = Arc::new(MemoryProvider::default());
    let broker = Broker::builder()
        .provider(memory.clone())
        .workers(1)
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    broker.subscribe("orders.*", |_: &Event| Err::<(), _>("down")).unwrap();
    let (_acked, deliveries) = broker.subscribe_acked("orders.*").unwrap();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let entered_tx = Mutex::new(entered_tx);
    broker
        .subscribe_infallible("slow.job", move |_| {
            let _ = entered_tx.lock().unwrap().send(());
            thread::sleep(Duration::from_millis(600));
        })
        .unwrap();
    let paid = event("orders.paid");
    let id = paid.id;
    broker.publish(paid).unwrap();
    let _delivery = deliveries.recv_timeout(Duration::from_secs(5)).unwrap();
    wait_until("the failure", Duration::from_secs(5), || broker.stats().dead_letters == 1);
    broker.publish(event("slow.job")).unwrap();
    entered.recv_timeout(Duration::from_secs(5)).unwrap();
    let report = broker.shutdown(Duration::from_millis(200));
    assert_eq!(report.detached_workers, 1, "{report:?}");
    let letters = memory.list_dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap();
    assert_eq!(letters.len(), 1, "{report:?}");
}

/// A receiving instance's redrive of its dead letter of another instance's event leaves the
/// event's stored status alone: it is the publisher's handling, as a receiver's worker leaves it.
#[test]
fn a_redrive_of_another_instances_event_leaves_its_status_to_the_publisher() {
    let bus = Arc::new(MemoryProvider::default());
    let receiver = Broker::builder()
        .provider(bus.clone())
        .instance_id("redriving-receiver")
        .retry_policy(RetryPolicy::none())
        .build()
        .unwrap();
    receiver.subscribe("orders.>", |_: &Event| Err::<(), _>("the ledger is down")).unwrap();
    let publisher = local_publisher(&bus);
    thread::sleep(Duration::from_millis(300)); // The receiver's first fetch.
    let sent = event("orders.created");
    let id = sent.id;
    publisher.publish(sent).unwrap();
    wait_until("the receiver's dead letter", Duration::from_secs(10), || receiver.stats().dead_letters == 1);
    publisher.drain(Duration::from_secs(5)).unwrap();
    receiver.drain(Duration::from_secs(5)).unwrap();
    assert_eq!(bus.get(id).unwrap().unwrap().status, EventStatus::Completed, "the publisher's: unrouted");
    let letter = receiver.dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap().remove(0);
    let outcome = receiver.redrive(letter.id).unwrap();
    assert_eq!((outcome.failed.len(), outcome.status), (1, None));
    assert_eq!(bus.get(id).unwrap().unwrap().status, EventStatus::Completed, "still the publisher's");
    for broker in [publisher, receiver] {
        assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    }
}

/// A write given up is reported by a flush that someone receives: one whose caller timed out and
/// left does not use the report up, and the next flush returns it.
#[test]
fn a_flush_that_timed_out_leaves_the_report_of_a_dropped_write_to_the_next() {
    let (memory, faulty) = flaky();
    let broker = Broker::builder()
        .provider(faulty.clone())
        .distribution(eventbroker::Distribution::Local)
        .build()
        .unwrap();
    faulty.inject(Operation::StoreBatch, Fault::permanent());
    let lost = event("orders.lost");
    let lost_id = lost.id;
    broker.publish(lost).unwrap();
    wait_until("the store given up", Duration::from_secs(5), || broker.stats().writer.dropped >= 1);
    // The provider stops answering: the writer sits in a store call, and a flush times out.
    faulty.inject(Operation::StoreBatch, Fault::Hang { at_most: Duration::from_secs(5) });
    let calls = faulty.calls(Operation::StoreBatch);
    broker.publish(event("orders.slow")).unwrap();
    wait_until("the writer in the hung call", Duration::from_secs(5), || {
        faulty.calls(Operation::StoreBatch) > calls
    });
    let first = broker.flush(Duration::from_millis(100));
    assert!(matches!(first, Err(BrokerError::Timeout(_))), "{first:?}");
    recover(&faulty);
    // A read through the writer waits for it to catch up, answering the abandoned flush first.
    broker.dead_letters(&DeadLetterFilter::new()).unwrap();
    let second = broker.flush(Duration::from_secs(5));
    assert!(matches!(second, Err(BrokerError::WritesDropped { dropped: 1, .. })), "{second:?}");
    assert!(memory.get(lost_id).unwrap().is_none());
    assert!(broker.flush(Duration::from_secs(5)).is_ok(), "reported once");
    let _ = broker.shutdown(Duration::from_secs(5));
}

/// A stopping writer keeps retrying a failing write while its next try comes by the shutdown's
/// deadline: a provider back half-way through the shutdown gets the write.
#[test]
fn shutdown_retries_a_failing_write_while_the_next_try_comes_by_its_deadline() {
    let (memory, faulty) = flaky();
    let broker = Broker::builder()
        .provider(faulty.clone())
        .distribution(eventbroker::Distribution::Local)
        .workers(1)
        .build()
        .unwrap();
    faulty.inject(Operation::StoreBatch, Fault::unavailable());
    let kept = event("orders.kept");
    let id = kept.id;
    broker.publish(kept).unwrap();
    wait_until("the first failed store", Duration::from_secs(5), || faulty.calls(Operation::StoreBatch) >= 1);
    let healer = {
        let faulty = Arc::clone(&faulty);
        // Tries at about 0, 10, 30, 70, 150 and 310 ms fail; the next, at about 630, comes by the
        // deadline and finds the provider back.
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(450));
            recover(&faulty);
        })
    };
    let report = broker.shutdown(Duration::from_millis(900));
    healer.join().unwrap();
    assert!(memory.get(id).unwrap().is_some(), "{report:?}");
    assert!(report.flush_error.is_none(), "{report:?}");
}

/// `stats().published` never goes back while events are published and taken, and a broker
/// that only receives never counts another instance's events as its own, even for a moment.
#[test]
fn stats_published_only_grows_and_counts_only_this_brokers_events() {
    let bus = Arc::new(MemoryProvider::default());
    let service = |id: &str| {
        Broker::builder().provider(bus.clone()).instance_id(id).workers(2).buffer_size(64).build().unwrap()
    };
    let (sender, receiver) = (service("stats-sender"), service("stats-receiver"));
    receiver.subscribe_infallible("orders.>", |_| {}).unwrap();
    sender.subscribe_infallible("orders.>", |_| {}).unwrap();
    thread::sleep(Duration::from_millis(300)); // The receiver's first fetch.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (sender, stop) = (sender.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let mut sent = 0_u64;
            while !stop.load(Ordering::Relaxed) && sent < 500_000 {
                sent += u64::from(sender.publish(event("orders.created")).is_ok());
            }
            sent
        })
    };
    let (mut last, mut backwards, mut received_as_published) = (0, Vec::new(), Vec::new());
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until && backwards.len() + received_as_published.len() < 5 {
        let now = sender.stats().published;
        if now < last {
            backwards.push((last, now));
        }
        last = last.max(now);
        let at_receiver = receiver.stats();
        if at_receiver.published != 0 {
            received_as_published.push((at_receiver.published, at_receiver.inbound.fetched));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().unwrap();
    assert!(backwards.is_empty(), "(before, after): {backwards:?}");
    assert!(received_as_published.is_empty(), "(published, fetched): {received_as_published:?}");
    sender.drain(Duration::from_secs(10)).unwrap();
    assert_eq!(sender.stats().published, sent);
    for broker in [sender, receiver] {
        let _ = broker.shutdown(Duration::from_secs(10));
    }
}

/// Dead letters can be read after shutdown from a provider others still hold; once shutdown has
/// closed the broker's own provider, the call says the broker is shut down.
#[test]
fn dead_letters_after_shutdown_read_a_shared_provider_and_say_closed_for_its_own() {
    let (memory, broker, _) = a_handler_to_fix();
    broker.publish(event("orders.paid")).unwrap();
    broker.drain(Duration::from_secs(5)).unwrap();
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    assert_eq!(
        broker.dead_letters(&DeadLetterFilter::new()).unwrap().len(),
        1,
        "left open: the test holds it"
    );
    drop(memory);
    let own = Broker::builder().build().unwrap();
    assert!(own.shutdown(Duration::from_secs(5)).is_clean());
    let err = own.dead_letters(&DeadLetterFilter::new()).unwrap_err();
    assert!(matches!(err, BrokerError::Closed), "{err}");
}

/// On the in-process bus too: events waiting in a work-queue member's shard behind slow handlers
/// keep their claims, and a partial unsubscribe gives back to the group (see
/// `work_queue_support`).
#[test]
fn work_queue_members_on_the_bus_keep_and_give_back_as_on_a_server() {
    let bus = Arc::new(MemoryProvider::default());
    let connect = || -> Arc<dyn eventbroker::Provider> { bus.clone() };
    work_queue_support::events_waiting_in_a_shard_keep_their_claims(&connect, "waiting");
    work_queue_support::a_partial_unsubscribe_gives_back_to_the_group(&connect, "partial");
}

// ---- Held inbound events and their claims (work queue, in-process bus) ----

/// A work-queue member of `group` on `provider`.
fn member(
    provider: Arc<dyn eventbroker::Provider>,
    instance: &str,
    group: &str,
    workers: usize,
    buffer: usize,
    claim_idle: Duration,
) -> Broker {
    Broker::builder()
        .provider(provider)
        .instance_id(instance)
        .distribution(eventbroker::Distribution::WorkQueue(group.to_owned()))
        .workers(workers)
        .buffer_size(buffer)
        .claim_idle(claim_idle)
        .build()
        .expect("member")
}

/// Subscribes a handler to `pattern` on `broker` that notes each event it handles and then takes
/// `takes`.
fn slow_handler(broker: &Broker, pattern: &str, takes: Duration, handled: &Arc<Mutex<Vec<EventId>>>) {
    let handled = Arc::clone(handled);
    broker
        .subscribe_infallible(pattern, move |event: &Event| {
            handled.lock().unwrap().push(event.id);
            thread::sleep(takes);
        })
        .expect("subscribe");
}

/// Publishes `n` events of `event_type` from a fan-out broker on `bus` and waits until the bus
/// holds them; returns their ids.
fn publish_burst(bus: &Arc<MemoryProvider>, tag: &str, event_type: &str, n: usize) -> (Broker, Vec<EventId>) {
    let publisher = Broker::builder()
        .provider(bus.clone())
        .instance_id(format!("{tag}-publisher"))
        .distribution(eventbroker::Distribution::FanOut)
        .build()
        .unwrap();
    let events: Vec<Event> = (0..n).map(|_| event(event_type)).collect();
    for e in &events {
        publisher.publish_async(e.clone()).unwrap();
    }
    publisher.flush(Duration::from_secs(5)).unwrap();
    (publisher, events.iter().map(|e| e.id).collect())
}

/// Waits until every one of `ids` was handled, then a claim idle time and a half more (for a
/// member that took one away to handle it again), shuts `brokers` down, and asserts that each
/// event was handled once.
fn assert_each_handled_once(
    handled: &Arc<Mutex<Vec<EventId>>>,
    ids: &[EventId],
    claim_idle: Duration,
    brokers: impl IntoIterator<Item = Broker>,
) {
    let all: std::collections::HashSet<EventId> = ids.iter().copied().collect();
    wait_until("every event handled", Duration::from_secs(30), || {
        handled.lock().unwrap().iter().copied().collect::<std::collections::HashSet<_>>() == all
    });
    thread::sleep(claim_idle + claim_idle / 2);
    let times = handled.lock().unwrap().len();
    for broker in brokers {
        let _ = broker.shutdown(Duration::from_secs(10));
    }
    assert_eq!(times, ids.len(), "handled {times} times for {} events", ids.len());
}

/// One fetch can bring more events of one shard than its ring takes at once (`room` counts every
/// shard's free slots): the inbound thread then waits to place the rest. Those fetched and not
/// yet placed are held as much as the placed ones, and must keep their claims too; else another
/// member takes them after the claim idle time and both handle them.
#[test]
fn events_of_a_fetch_waiting_to_be_placed_keep_their_claims() {
    let bus = Arc::new(MemoryProvider::default());
    let claim_idle = Duration::from_secs(1);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    // 4 shards of 4 slots: a fetch asks for up to 16, all of one type and so of one shard.
    let first = member(bus.clone(), "unplaced-first", "unplaced", 4, 4, claim_idle);
    let (publisher, ids) = publish_burst(&bus, "unplaced", "unplaced.jobs.run", 16);
    slow_handler(&first, "unplaced.jobs.>", Duration::from_millis(250), &handled);
    wait_until("the first member's first events", Duration::from_secs(5), || {
        !handled.lock().unwrap().is_empty()
    });
    let second = member(bus.clone(), "unplaced-second", "unplaced", 2, 1024, claim_idle);
    slow_handler(&second, "unplaced.jobs.>", Duration::from_millis(250), &handled);
    assert_each_handled_once(&handled, &ids, claim_idle, [first, second, publisher]);
}

/// Shutdown drains the shards through the workers, by its deadline: the events queued there are
/// still this member's, handled and acknowledged by it, and must keep their claims meanwhile (the
/// inbound thread, which extended them, stopped first). Another member takes a member's events
/// only once it stopped extending them: one that died, or shut down past its deadline.
#[test]
fn events_drained_at_shutdown_keep_their_claims() {
    let bus = Arc::new(MemoryProvider::default());
    let claim_idle = Duration::from_secs(1);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let first = member(bus.clone(), "drained-first", "drained", 2, 1024, claim_idle);
    slow_handler(&first, "drained.jobs.>", Duration::from_millis(150), &handled);
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let (publisher, ids) = publish_burst(&bus, "drained", "drained.jobs.run", 20);
    wait_until("the first member fetched the burst", Duration::from_secs(5), || {
        first.stats().inbound.fetched == 20
    });
    let second = member(bus.clone(), "drained-second", "drained", 2, 1024, claim_idle);
    slow_handler(&second, "drained.jobs.>", Duration::from_millis(150), &handled);
    thread::sleep(Duration::from_millis(500)); // The second member fetches (nothing, yet).
    let report = first.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
    assert_each_handled_once(&handled, &ids, claim_idle, [second, publisher]);
}

/// Fetching fails for a while (backing off up to 1 s): local dispatch goes on, and so does the
/// handling of the events the member holds, whose claims must go on being extended meanwhile.
#[test]
fn held_events_keep_their_claims_while_fetching_fails() {
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let claim_idle = Duration::from_millis(300);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let first = member(faulty.clone(), "fetchfail-first", "fetchfail", 1, 1024, claim_idle);
    slow_handler(&first, "fetchfail.jobs.>", Duration::from_millis(100), &handled);
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let (publisher, ids) = publish_burst(&bus, "fetchfail", "fetchfail.jobs.run", 20);
    wait_until("the first member fetched the burst", Duration::from_secs(5), || {
        first.stats().inbound.fetched == 20
    });
    faulty.inject(Operation::Fetch, Fault::unavailable());
    let second = member(bus.clone(), "fetchfail-second", "fetchfail", 1, 1024, claim_idle);
    slow_handler(&second, "fetchfail.jobs.>", Duration::from_millis(100), &handled);
    assert_each_handled_once(&handled, &ids, claim_idle, [first, second, publisher]);
    faulty.heal_all();
}

/// While fetching fails, the inbound lag grows with the time since the last fetch that succeeded:
/// an outage must not read as caught up (0) on a dashboard. It is back near 0 once a fetch
/// succeeds again.
#[test]
fn inbound_lag_grows_while_fetching_fails() {
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let receiver =
        Broker::builder().provider(faulty.clone()).instance_id("lagging-receiver").build().unwrap();
    receiver.subscribe_infallible("lagging.>", |_: &Event| {}).unwrap();
    let (publisher, _) = publish_burst(&bus, "lagging", "lagging.jobs.run", 3);
    wait_until("the receiver fetched the events", Duration::from_secs(5), || {
        receiver.stats().inbound.fetched == 3
    });
    wait_until("the receiver caught up", Duration::from_secs(5), || {
        receiver.stats().inbound.lag < Duration::from_millis(100)
    });

    faulty.inject(Operation::Fetch, Fault::unavailable());
    wait_until("a fetch failed", Duration::from_secs(5), || receiver.stats().inbound.fetch_errors > 0);
    let early = receiver.stats().inbound.lag;
    thread::sleep(Duration::from_millis(400));
    let late = receiver.stats().inbound.lag;
    assert!(
        late >= early + Duration::from_millis(400),
        "the lag grows during the outage: {early:?}, then {late:?}"
    );

    faulty.heal_all();
    wait_until("the lag is back near zero", Duration::from_secs(5), || {
        receiver.stats().inbound.lag < Duration::from_millis(100)
    });
    drop(publisher);
}

/// The provider refuses the writer's stores for a while (the writer keeps its batch and retries,
/// backing off up to 1 s) while its inbound side works: the claims of the events a member holds,
/// none of them handled yet, must still be extended every third of the claim idle time, or
/// another member takes and handles them too.
#[test]
fn held_events_keep_their_claims_while_the_writer_retries() {
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let claim_idle = Duration::from_millis(500);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let gate = Arc::new(AtomicBool::new(false));
    let first = member(faulty.clone(), "writerfail-first", "writerfail", 1, 1024, claim_idle);
    {
        let (handled, gate) = (Arc::clone(&handled), Arc::clone(&gate));
        first
            .subscribe_infallible("writerfail.jobs.>", move |event: &Event| {
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !gate.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    thread::sleep(Duration::from_millis(2));
                }
                handled.lock().unwrap().push(event.id);
                thread::sleep(Duration::from_millis(10));
            })
            .unwrap();
    }
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let (publisher, ids) = publish_burst(&bus, "writerfail", "writerfail.jobs.run", 20);
    wait_until("the first member fetched the burst", Duration::from_secs(5), || {
        first.stats().inbound.fetched == 20
    });
    // The provider refuses the first member's writes; it publishes one event of its own.
    outage(&faulty, &Fault::unavailable());
    first.publish(event("writerfail.local")).unwrap();
    let second = member(bus.clone(), "writerfail-second", "writerfail", 1, 1024, claim_idle);
    slow_handler(&second, "writerfail.jobs.>", Duration::from_millis(10), &handled);
    thread::sleep(claim_idle * 4);
    recover(&faulty);
    gate.store(true, Ordering::SeqCst);
    assert_each_handled_once(&handled, &ids, claim_idle, [first, second, publisher]);
}

/// A short claim idle time (at least 10 ms is allowed): the inbound thread, waiting up to 100 ms
/// in a fetch that finds nothing new, must still extend the claims of what it holds every third
/// of it.
#[test]
fn held_events_keep_a_short_claim_idle_time() {
    let bus = Arc::new(MemoryProvider::default());
    let claim_idle = Duration::from_millis(60);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let first = member(bus.clone(), "short-first", "short", 1, 1024, claim_idle);
    slow_handler(&first, "short.jobs.>", Duration::from_millis(30), &handled);
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let (publisher, ids) = publish_burst(&bus, "short", "short.jobs.run", 20);
    wait_until("the first member fetched the burst", Duration::from_secs(5), || {
        first.stats().inbound.fetched == 20
    });
    let second = member(bus.clone(), "short-second", "short", 1, 1024, claim_idle);
    slow_handler(&second, "short.jobs.>", Duration::from_millis(30), &handled);
    assert_each_handled_once(&handled, &ids, Duration::from_secs(1), [first, second, publisher]);
}

/// A member whose shutdown gives up on a handler at its deadline stops extending what its shards
/// still hold: the group redelivers those events to another member after the claim idle time.
#[test]
fn events_abandoned_at_a_shutdown_deadline_go_to_another_member() {
    let bus = Arc::new(MemoryProvider::default());
    let claim_idle = Duration::from_millis(500);
    let gate = Arc::new(AtomicBool::new(false));
    let first = member(bus.clone(), "abandon-first", "abandon", 1, 1024, claim_idle);
    {
        let gate = Arc::clone(&gate);
        first
            .subscribe_infallible("abandon.jobs.>", move |_: &Event| {
                let until = std::time::Instant::now() + Duration::from_secs(20);
                while !gate.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    thread::sleep(Duration::from_millis(2));
                }
            })
            .unwrap();
    }
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let (publisher, ids) = publish_burst(&bus, "abandon", "abandon.jobs.run", 5);
    wait_until("the first member fetched the burst", Duration::from_secs(5), || {
        first.stats().inbound.fetched == 5
    });
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let second = member(bus.clone(), "abandon-second", "abandon", 1, 1024, claim_idle);
    slow_handler(&second, "abandon.jobs.>", Duration::from_millis(1), &handled);
    let report = first.shutdown(Duration::from_millis(300));
    assert!(report.timed_out && report.detached_workers == 1, "{report:?}");
    // All five (the one in the handler too) come back to the group, and only the second member
    // is left to take them.
    let all: std::collections::HashSet<EventId> = ids.iter().copied().collect();
    wait_until("the second member handled the abandoned events", Duration::from_secs(10), || {
        handled.lock().unwrap().iter().copied().collect::<std::collections::HashSet<_>>() == all
    });
    gate.store(true, Ordering::SeqCst);
    for broker in [second, publisher] {
        let _ = broker.shutdown(Duration::from_secs(10));
    }
}

/// The provider refuses the writer's stores for a while, its inbound side working: the events a
/// member handled meanwhile wait for their acknowledgements behind the refused store, still this
/// member's; their claims must be extended until the acknowledgements are written, or another
/// member takes and handles them again.
#[test]
fn handled_events_keep_their_claims_until_acknowledged() {
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let claim_idle = Duration::from_millis(500);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let first = member(faulty.clone(), "unacked-first", "unacked", 1, 1024, claim_idle);
    slow_handler(&first, "unacked.jobs.>", Duration::from_millis(1), &handled);
    thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    // The provider refuses the first member's writes; it publishes one event of its own.
    outage(&faulty, &Fault::unavailable());
    first.publish(event("unacked.local")).unwrap();
    let (publisher, ids) = publish_burst(&bus, "unacked", "unacked.jobs.run", 20);
    wait_until("the first member handled the burst", Duration::from_secs(5), || {
        handled.lock().unwrap().len() >= 20
    });
    let second = member(bus.clone(), "unacked-second", "unacked", 1, 1024, claim_idle);
    slow_handler(&second, "unacked.jobs.>", Duration::from_millis(1), &handled);
    thread::sleep(claim_idle * 4);
    recover(&faulty);
    assert_each_handled_once(&handled, &ids, claim_idle, [first, second, publisher]);
}

/// A broker that falls more than the bus's bound behind its group's events sees what its group
/// lost in its own stats (`inbound.lost`), not only in the provider's `bus_lost`; a broker that
/// keeps up loses nothing, and its own events are never counted as lost to it.
#[test]
fn a_broker_left_behind_on_the_bus_sees_what_its_group_lost() {
    let bus = Arc::new(MemoryProvider::new(eventbroker::MemoryConfig {
        max_events: 16,
        cleanup_interval: None,
        ..eventbroker::MemoryConfig::default()
    }));
    // No subscription yet: its inbound thread fetches nothing, so its group falls behind.
    let behind = Broker::builder().provider(bus.clone()).instance_id("behind").build().unwrap();
    let publisher = Broker::builder().provider(bus.clone()).instance_id("publisher").build().unwrap();
    let handled = count_handled(&publisher, "never.>");
    for _ in 0..40 {
        publisher.publish(event("jobs.run")).unwrap();
        behind.publish(event("jobs.own")).unwrap();
    }
    publisher.drain(Duration::from_secs(5)).unwrap();
    behind.drain(Duration::from_secs(5)).unwrap();

    let lost = bus.stats().unwrap().provider_specific["bus_lost"].as_u64().unwrap();
    assert_eq!(behind.stats().inbound.lost, lost, "the behind broker's group is the only one that lost");
    // The log's last 16 hold 8 of the publisher's: 32 of them dropped before `behind` read them.
    assert_eq!(lost, 32);
    assert_eq!(publisher.stats().inbound.lost, 0, "its own events are not lost to it");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    for broker in [behind, publisher] {
        assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    }
}
