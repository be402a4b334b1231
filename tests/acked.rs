//! Acknowledged deliveries (`Broker::subscribe_acked`): a delivery ends when its consumer settles
//! it, on any thread, and until then the event's handling has not ended.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::{
    Broker, BrokerBuilder, DeadLetterFilter, Delivery, Distribution, DrainError, Event, EventStatus,
    EventStore, MemoryProvider, Mode, RetryPolicy, SyncPublishError,
};

mod common;
use common::{event, quick_retries, wait_until};

const WAIT: Duration = Duration::from_secs(10);

fn status(broker: &Broker, event: &Event) -> Option<EventStatus> {
    broker.provider().get(event.id).unwrap().map(|stored| stored.status)
}

fn next(deliveries: &flume::Receiver<Delivery>) -> Delivery {
    deliveries.recv_timeout(WAIT).expect("a delivery within the wait")
}

/// A member of work queue `group` on the in-process `bus`, with one worker; `configure` adds the
/// rest of its settings.
fn member(
    bus: &Arc<MemoryProvider>,
    group: &str,
    name: &str,
    configure: impl FnOnce(BrokerBuilder) -> BrokerBuilder,
) -> Broker {
    let builder = Broker::builder()
        .provider(bus.clone())
        .instance_id(name)
        .distribution(Distribution::WorkQueue(group.into()))
        .workers(1);
    configure(builder).build().unwrap()
}

/// A broker on `bus` that only publishes: no group of its own.
fn publisher(bus: &Arc<MemoryProvider>, name: &str) -> Broker {
    let builder = Broker::builder().provider(bus.clone()).instance_id(name);
    builder.distribution(Distribution::Local).build().unwrap()
}

#[test]
fn an_event_is_processing_until_its_delivery_is_acknowledged() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let published = event("orders.created");
    broker.publish(published.clone()).unwrap();

    let delivery = next(&deliveries);
    assert_eq!(delivery.event().id, published.id);
    assert_eq!(delivery.attempt(), 1);
    // The drain cannot end while the delivery is open, and the event stays `processing`.
    assert!(matches!(broker.drain(Duration::from_millis(100)), Err(DrainError::TimedOut { .. })));
    assert_eq!(status(&broker, &published), Some(EventStatus::Processing));
    assert_eq!(broker.stats().awaiting_acks, 1);

    delivery.ack();
    broker.drain(WAIT).unwrap();
    let stored = broker.provider().get(published.id).unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Completed);
    assert!(stored.completed_at.is_some());
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.awaiting_acks), (1, 0, 0));
}

#[test]
fn a_failed_delivery_is_retried_with_the_next_attempt_number_then_dead_lettered() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(2)).build().unwrap();
    let (id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let published = event("orders.created");
    broker.publish(published.clone()).unwrap();

    for attempt in 1..=3 {
        let delivery = next(&deliveries);
        assert_eq!(delivery.event().id, published.id);
        assert_eq!(delivery.attempt(), attempt);
        delivery.fail(format!("attempt {attempt} failed"));
    }
    broker.drain(WAIT).unwrap();
    assert!(deliveries.try_recv().is_err(), "no fourth attempt");

    let stored = broker.provider().get(published.id).unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Failed);
    assert_eq!(stored.error, "attempt 3 failed");
    assert_eq!(stored.retry_count, 2);
    let letters = broker.dead_letters(&DeadLetterFilter::default().with_event_id(published.id)).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].subscription_id, id);
    assert_eq!(letters[0].attempts, 3);
    let stats = broker.stats();
    assert_eq!((stats.failed, stats.handler_failures, stats.retries, stats.dead_letters), (1, 3, 2, 1));
}

#[test]
fn a_delivery_dropped_unsettled_fails_and_a_retry_can_succeed() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(1)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let published = event("orders.created");
    broker.publish(published.clone()).unwrap();

    drop(next(&deliveries));
    let retried = next(&deliveries);
    assert_eq!(retried.attempt(), 2);
    retried.ack();
    broker.drain(WAIT).unwrap();
    assert_eq!(status(&broker, &published), Some(EventStatus::Completed));
    assert_eq!(broker.stats().handler_failures, 1);
}

#[test]
fn a_delivery_not_settled_in_time_fails_and_its_late_settle_is_ignored() {
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(quick_retries(0))
        .ack_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let published = event("orders.created");
    broker.publish(published.clone()).unwrap();

    let late = next(&deliveries);
    broker.drain(WAIT).unwrap();
    let stored = broker.provider().get(published.id).unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Failed);
    assert!(stored.error.starts_with("not acknowledged within"), "{}", stored.error);
    late.ack();
    thread::sleep(Duration::from_millis(50));
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.dead_letters, stats.awaiting_acks), (0, 1, 1, 0));
    assert_eq!(status(&broker, &published), Some(EventStatus::Failed));
}

#[test]
fn a_delivery_tells_its_deadline_and_one_read_after_it_is_expired() {
    // Long enough that neither delivery expires before this thread looks at it, however loaded
    // the machine.
    const TIMEOUT: Duration = Duration::from_secs(1);
    let broker =
        Broker::builder().workers(1).retry_policy(quick_retries(1)).ack_timeout(TIMEOUT).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let published = event("orders.created");
    let before = Instant::now();
    broker.publish(published.clone()).unwrap();
    let first = next(&deliveries);
    let read = Instant::now();
    assert!(first.deadline() >= before + TIMEOUT && first.deadline() <= read + TIMEOUT, "{first:?}");
    assert!(!first.is_expired());

    // The consumer falls behind: the delivery expires unsettled, and its retry waits unread.
    thread::sleep(first.deadline().saturating_duration_since(Instant::now()) + Duration::from_millis(20));
    assert!(first.is_expired());
    let retry = next(&deliveries);
    assert_eq!(retry.attempt(), 2);
    assert!(retry.deadline() > first.deadline());
    first.ack(); // Too late: ignored, as its expiry said.
    assert_eq!(status(&broker, &published), Some(EventStatus::Processing));
    retry.ack();
    broker.drain(WAIT).unwrap();
    assert_eq!(status(&broker, &published), Some(EventStatus::Completed));
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.retries), (1, 0, 1));
}

#[test]
fn a_settle_after_the_deadline_is_ignored_even_when_the_worker_looks_late() {
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(quick_retries(1))
        .ack_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    // Keeps the one worker busy well past the delivery's deadline.
    broker.subscribe_infallible("slow.>", |_| thread::sleep(Duration::from_millis(600))).unwrap();
    let published = event("orders.created");
    broker.publish(published.clone()).unwrap();
    let first = next(&deliveries);
    broker.publish(event("slow.job")).unwrap();
    wait_until("the delivery expires", WAIT, || first.is_expired());
    first.ack(); // Made after the deadline: the worker, busy until now, must not count it.

    let retry = next(&deliveries);
    assert_eq!(retry.attempt(), 2, "the expired delivery was retried");
    assert_eq!(status(&broker, &published), Some(EventStatus::Processing));
    retry.ack();
    broker.drain(WAIT).unwrap();
    assert_eq!(status(&broker, &published), Some(EventStatus::Completed));
    assert_eq!(broker.stats().retries, 1);
}

#[test]
fn publish_sync_counts_a_settle_by_when_it_was_made() {
    // `publish_sync` waits on the caller's thread in slices; an ack made in time counts however
    // late the thread gets to it, and one made after the deadline does not (the unit of both is
    // the settle's own time, as on a worker).
    let broker = Broker::builder()
        .mode(Mode::Sync)
        .retry_policy(RetryPolicy::none())
        .ack_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let consumer = thread::spawn(move || {
        next(&deliveries).ack();
        let late = next(&deliveries);
        thread::sleep(late.deadline().saturating_duration_since(Instant::now()) + Duration::from_millis(10));
        late.ack();
    });
    broker.publish(event("orders.created")).unwrap();
    let error = broker.publish(event("orders.created")).unwrap_err();
    let SyncPublishError::HandlerFailed(failures) = error else { panic!("{error:?}") };
    assert!(failures.failures()[0].error.starts_with("not acknowledged within"), "{failures:?}");
    consumer.join().unwrap();
}

#[test]
fn a_delivery_made_on_the_callers_thread_tells_its_deadline_too() {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let broker = Broker::builder().mode(Mode::Sync).ack_timeout(TIMEOUT).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let consumer = thread::spawn(move || {
        let delivery = next(&deliveries);
        let deadline = delivery.deadline();
        delivery.ack();
        deadline
    });
    let before = Instant::now();
    broker.publish(event("orders.created")).unwrap();
    let after = Instant::now();
    let deadline = consumer.join().unwrap();
    assert!(deadline >= before + TIMEOUT && deadline <= after + TIMEOUT);
}

#[test]
fn a_full_channel_is_a_failed_attempt() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(0)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked_bounded("orders.>", 1).unwrap();
    let first = event("orders.created");
    let second = event("orders.created");
    broker.publish(first.clone()).unwrap();
    broker.publish(second.clone()).unwrap();
    wait_until("the second event to fail", WAIT, || broker.stats().failed == 1);

    next(&deliveries).ack();
    broker.drain(WAIT).unwrap();
    assert_eq!(status(&broker, &first), Some(EventStatus::Completed));
    let failed = broker.provider().get(second.id).unwrap().unwrap();
    assert_eq!(failed.status, EventStatus::Failed);
    assert_eq!(failed.error, "acknowledged stream is full (1 deliveries)");
}

#[test]
fn deliveries_settled_out_of_order_from_many_threads_all_end() {
    const EVENTS: usize = 2_000;
    let broker = Broker::builder().workers(2).retry_policy(quick_retries(1)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked_bounded("load.>", EVENTS).unwrap();
    // Each consumer holds a handful before it settles them, newest first; every seventh fails once.
    // They run until shutdown ends the subscription.
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let deliveries = deliveries.clone();
            thread::spawn(move || {
                let mut held: Vec<Delivery> = Vec::new();
                let mut settled = 0;
                loop {
                    match deliveries.recv_timeout(Duration::from_millis(5)) {
                        Ok(delivery) => held.push(delivery),
                        Err(flume::RecvTimeoutError::Timeout) => {}
                        Err(flume::RecvTimeoutError::Disconnected) => return settled,
                    }
                    if held.len() >= 5 || deliveries.is_empty() {
                        while let Some(delivery) = held.pop() {
                            settled += 1;
                            let number: u64 = delivery.event().payload().unwrap();
                            if number % 7 == 0 && delivery.attempt() == 1 {
                                delivery.fail("the first try of every seventh");
                            } else {
                                delivery.ack();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    drop(deliveries);
    let mut ids = HashSet::new();
    for number in 0..EVENTS as u64 {
        let event = event(&format!("load.type{}", number % 13)).with_payload(&number).unwrap();
        ids.insert(event.id);
        broker.publish(event).unwrap();
    }
    broker.drain(WAIT).unwrap();
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.awaiting_acks), (EVENTS as u64, 0, 0));
    assert_eq!(stats.handler_failures, EVENTS.div_ceil(7) as u64);
    for id in ids {
        assert_eq!(broker.provider().get(id).unwrap().map(|e| e.status), Some(EventStatus::Completed));
    }
    assert!(broker.shutdown(WAIT).is_clean());
    let settled: usize = consumers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(settled, EVENTS + EVENTS.div_ceil(7));
}

#[test]
fn publish_sync_waits_for_the_acknowledgement_on_the_callers_thread() {
    let broker = Broker::builder().mode(Mode::Sync).retry_policy(quick_retries(1)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let consumer = thread::spawn(move || {
        let first = next(&deliveries);
        assert_eq!(first.attempt(), 1);
        first.fail("not yet");
        let second = next(&deliveries);
        assert_eq!(second.attempt(), 2);
        second.ack();
        // The second event: failed twice, so publish_sync reports it.
        next(&deliveries).fail("no");
        next(&deliveries).fail("still no");
    });
    let ok = event("orders.created");
    broker.publish(ok.clone()).unwrap();
    assert_eq!(status(&broker, &ok), Some(EventStatus::Completed));
    let error = broker.publish(event("orders.created")).unwrap_err();
    let SyncPublishError::HandlerFailed(failures) = error else { panic!("{error:?}") };
    let failures = failures.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].error, "still no");
    assert_eq!(failures[0].attempts, 2);
    consumer.join().unwrap();
}

#[test]
fn a_delivery_waited_for_on_the_callers_thread_counts_as_awaiting() {
    let broker = Broker::builder().mode(Mode::Sync).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let publisher = {
        let broker = broker.clone();
        thread::spawn(move || broker.publish(event("orders.created")))
    };
    let delivery = next(&deliveries);
    wait_until("the caller's wait counted", WAIT, || broker.stats().awaiting_acks == 1);
    delivery.ack();
    publisher.join().unwrap().unwrap();
    assert_eq!(broker.stats().awaiting_acks, 0);
}

#[test]
fn publish_sync_gives_up_on_an_acknowledgement_after_the_timeout() {
    let broker = Broker::builder()
        .mode(Mode::Sync)
        .retry_policy(quick_retries(0))
        .ack_timeout(Duration::from_millis(30))
        .build()
        .unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let error = broker.publish(event("orders.created")).unwrap_err();
    let SyncPublishError::HandlerFailed(failures) = error else { panic!("{error:?}") };
    let failures = failures.failures();
    assert!(failures[0].error.starts_with("not acknowledged within"), "{}", failures[0].error);
    // The late acknowledgement goes nowhere, harmlessly.
    next(&deliveries).ack();
}

#[test]
fn publish_sync_fails_a_delivery_whose_receiver_went_away_before_its_retry() {
    let broker = Broker::builder().mode(Mode::Sync).retry_policy(quick_retries(2)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let consumer = thread::spawn(move || {
        let delivery = next(&deliveries);
        drop(deliveries);
        delivery.fail("no");
    });
    let error = broker.publish(event("orders.created")).unwrap_err();
    consumer.join().unwrap();
    let SyncPublishError::HandlerFailed(failures) = error else { panic!("{error:?}") };
    let failures = failures.failures();
    assert_eq!(failures[0].error, "the subscriber went away before retry 1 (last error: no)");
    assert_eq!((failures[0].attempts, broker.stats().subscriptions), (1, 0));
}

#[test]
fn publish_sync_notices_a_receiver_dropped_with_its_delivery_unread() {
    let broker = Broker::builder().mode(Mode::Sync).retry_policy(quick_retries(1)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let dropping = thread::spawn(move || {
        wait_until("the delivery to be queued", WAIT, || deliveries.len() == 1);
        drop(deliveries);
    });
    let started = std::time::Instant::now();
    let error = broker.publish(event("orders.created")).unwrap_err();
    dropping.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "waited for the timeout");
    let SyncPublishError::HandlerFailed(failures) = error else { panic!("{error:?}") };
    assert_eq!(
        failures.failures()[0].error,
        "the subscriber went away before retry 1 (last error: the consumer's receiver was dropped \
         with the delivery unread)"
    );
}

#[test]
fn shutdown_dead_letters_what_is_still_unsettled_at_its_deadline() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let acked = event("orders.created");
    let unsettled = event("orders.created");
    broker.publish(acked.clone()).unwrap();
    broker.publish(unsettled.clone()).unwrap();
    let first = next(&deliveries);
    let _kept = next(&deliveries);
    // Settled while shutdown waits: it completes.
    let settle = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        first.ack();
    });
    let report = broker.shutdown(Duration::from_millis(400));
    settle.join().unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.dead_letters, stats.awaiting_acks), (1, 1, 1, 0));
}

/// Many deliveries left unsettled: shutdown stops waiting for them early enough to dead-letter
/// every one and write the letters by its deadline, and its report counts them.
#[test]
fn shutdown_has_time_to_dead_letter_many_unsettled_deliveries() {
    const HELD: usize = 5_000;
    let broker = Broker::builder().workers(2).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked_bounded("orders.>", HELD).unwrap();
    for number in 0..HELD {
        broker.publish(event(&format!("orders.t{}", number % 16))).unwrap();
    }
    wait_until("every delivery made", WAIT, || broker.stats().awaiting_acks == HELD as u64);
    let report = broker.shutdown(Duration::from_secs(2));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.dead_lettered, report.detached_workers), (HELD as u64, 0));
    assert_eq!(broker.stats().writer.dead_letters, HELD as u64);
    drop(deliveries);
}

/// A receiver dropped with a delivery unread: the next matching event finds it gone, or, when
/// none comes, the worker's sweep does. Either way the subscription ends, and the delivery is
/// dead-lettered with what happened to it, at once: no retry is scheduled for a subscription that
/// ended.
#[test]
fn a_dropped_receiver_ends_the_subscription_and_its_queued_deliveries_are_dead_lettered() {
    for another_event_comes in [true, false] {
        let broker = Broker::builder().workers(1).retry_policy(quick_retries(1)).build().unwrap();
        let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
        let queued = event("orders.created");
        broker.publish(queued.clone()).unwrap();
        wait_until("the delivery to be queued", WAIT, || deliveries.len() == 1);
        drop(deliveries);
        if another_event_comes {
            broker.publish(event("orders.created")).unwrap();
        }
        broker.drain(WAIT).unwrap();
        let failed = broker.provider().get(queued.id).unwrap().unwrap();
        assert_eq!(failed.status, EventStatus::Failed);
        assert_eq!(failed.error, "the consumer's receiver was dropped with the delivery unread");
        let stats = broker.stats();
        assert_eq!((stats.subscriptions, stats.retries), (0, 0), "another event: {another_event_comes}");
        let letters = broker.dead_letters(&DeadLetterFilter::default().with_event_id(queued.id)).unwrap();
        assert_eq!(letters.len(), 1);
    }
}

/// `unsubscribe` disconnects the consumer's receiver at once, on an idle broker too: what is left
/// in the channel fails and is dead-lettered, and what the consumer holds still counts when acked.
#[test]
fn unsubscribe_disconnects_the_receiver_and_fails_what_it_left_unread() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(1)).build().unwrap();
    let (id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let (held, unread) = (event("orders.created"), event("orders.created"));
    broker.publish(held.clone()).unwrap();
    broker.publish(unread.clone()).unwrap();
    let holding = next(&deliveries);
    assert_eq!(holding.event().id, held.id);
    wait_until("the second delivery to be queued", WAIT, || deliveries.len() == 1);
    assert!(broker.unsubscribe(id));
    assert!(matches!(
        deliveries.recv_timeout(Duration::from_secs(1)),
        Err(flume::RecvTimeoutError::Disconnected)
    ));
    holding.ack();
    broker.drain(WAIT).unwrap();
    assert_eq!(status(&broker, &held), Some(EventStatus::Completed));
    let failed = broker.provider().get(unread.id).unwrap().unwrap();
    assert_eq!(failed.status, EventStatus::Failed);
    assert!(failed.error.contains("the subscription ended with the delivery unread"), "{}", failed.error);
}

/// After shutdown the consumer's receiver disconnects, without handing out the deliveries
/// shutdown gave up on.
#[test]
fn after_shutdown_the_receiver_disconnects_without_stale_deliveries() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    for _ in 0..3 {
        broker.publish(event("orders.created")).unwrap();
    }
    wait_until("the deliveries to be queued", WAIT, || deliveries.len() == 3);
    let report = broker.shutdown(Duration::from_millis(200));
    assert_eq!(report.dead_lettered, 3, "{report:?}");
    assert!(matches!(deliveries.try_recv(), Err(flume::TryRecvError::Disconnected)));
}

/// A receiver dropped with deliveries unread, and no event after: the worker notices within a
/// sweep, long before the deliveries' timeout.
#[test]
fn deliveries_left_unread_fail_soon_after_their_receiver_is_dropped() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(1)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let events: Vec<Event> = (0..3).map(|_| event("orders.created")).collect();
    for event in &events {
        broker.publish(event.clone()).unwrap();
    }
    wait_until("the deliveries to be queued", WAIT, || deliveries.len() == 3);
    drop(deliveries);
    broker.drain(Duration::from_secs(2)).unwrap();
    for event in &events {
        let stored = broker.provider().get(event.id).unwrap().unwrap();
        assert_eq!(stored.status, EventStatus::Failed);
        assert!(stored.error.contains("receiver was dropped with the delivery unread"), "{}", stored.error);
    }
    assert_eq!(broker.stats().subscriptions, 0);
}

/// Deliveries a consumer still held when its receiver went away: failed or dropped, each is
/// dead-lettered once its retry finds nobody to deliver to, never counted as delivered.
#[test]
fn deliveries_held_when_the_receiver_goes_are_dead_lettered_not_completed() {
    let broker = Broker::builder().workers(1).retry_policy(quick_retries(2)).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let (first, second) = (event("orders.created"), event("orders.created"));
    broker.publish(first.clone()).unwrap();
    broker.publish(second.clone()).unwrap();
    let (failed, dropped) = (next(&deliveries), next(&deliveries));
    drop(deliveries);
    failed.fail("downstream refused it");
    drop(dropped);
    broker.drain(WAIT).unwrap();
    for (published, last) in
        [(&first, "downstream refused it"), (&second, "the delivery was dropped without being acknowledged")]
    {
        let stored = broker.provider().get(published.id).unwrap().unwrap();
        assert_eq!(stored.status, EventStatus::Failed);
        // Whichever noticed first: the retry (the subscriber went away), the worker's sweep (which
        // ends the subscription, so the retry finds it unsubscribed), or the sweep before the
        // outcome came (no retry is scheduled then).
        let went_away = format!("the subscriber went away before retry 1 (last error: {last})");
        let unsubscribed = format!("unsubscribed before retry 1 was due (last error: {last})");
        assert!([went_away, unsubscribed, last.to_owned()].contains(&stored.error), "{}", stored.error);
    }
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.failed, stats.dead_letters, stats.subscriptions), (0, 2, 2, 0));
}

/// While a delivery of another instance's event waits for its consumer, or for a retry, the
/// worker keeps the event's claim alive, idle or not: no other member of the group gets it. Each
/// wait lasts three claim idle times.
#[test]
fn a_work_queue_event_waiting_for_its_consumer_or_a_retry_stays_with_its_member() {
    let bus = Arc::new(MemoryProvider::default());
    let claiming = |name: &str| {
        member(&bus, "acked-claims", name, |builder| {
            builder.claim_idle(Duration::from_millis(250)).retry_policy(RetryPolicy {
                max_retries: 1,
                initial_delay: Duration::from_millis(800),
                max_delay: Duration::from_millis(800),
                backoff_factor: 1.0,
                jitter: 0.0,
            })
        })
    };
    let (one, two) = (claiming("acked-claims-1"), claiming("acked-claims-2"));
    let (_, first) = one.subscribe_acked("orders.>").unwrap();
    let (_, second) = two.subscribe_acked("orders.>").unwrap();
    let publisher = publisher(&bus, "acked-claims-publisher");
    thread::sleep(Duration::from_millis(300)); // The members' first fetches.
    publisher.publish(event("orders.created")).unwrap();

    let receive = || {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            for channel in [&first, &second] {
                if let Ok(delivery) = channel.try_recv() {
                    return delivery;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no delivery");
            thread::sleep(Duration::from_millis(2));
        }
    };
    // Held for many claim idle times, then failed: its retry waits as long again.
    let held = receive();
    let id = held.event().id;
    thread::sleep(Duration::from_millis(800));
    held.fail("not yet");
    let retried = receive();
    assert_eq!((retried.event().id, retried.attempt()), (id, 2));
    retried.ack();
    thread::sleep(Duration::from_millis(300));
    assert!(first.is_empty() && second.is_empty(), "another member got the event too");
    let completed = one.stats().completed + two.stats().completed;
    assert_eq!(completed, 1);
    for broker in [one, two, publisher] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
}

/// A work-queue member whose consumer dropped its receiver gives the events it fetched for it
/// back to the group, where the member still consuming handles them: none is acknowledged
/// unhandled.
#[test]
fn a_member_whose_receiver_is_gone_gives_the_groups_events_back() {
    const EVENTS: usize = 300;
    let bus = Arc::new(MemoryProvider::default());
    let live = member(&bus, "acked-gone", "acked-gone-live", |builder| builder);
    let gone = member(&bus, "acked-gone", "acked-gone-dropped", |builder| builder);
    let (_, deliveries) = live.subscribe_acked("orders.>").unwrap();
    let (_, dropped) = gone.subscribe_acked("orders.>").unwrap();
    drop(dropped);
    let publisher = publisher(&bus, "acked-gone-publisher");
    // In bursts, so that the dropped member fetches them over several batches: the first finds
    // the receiver gone, the later ones find the subscription ended.
    let mut sent = HashSet::new();
    for number in 0..EVENTS {
        let event = event("orders.created");
        sent.insert(event.id);
        publisher.publish(event).unwrap();
        if number % 10 == 9 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let mut handled = HashSet::new();
    while handled.len() < EVENTS {
        let delivery = next(&deliveries);
        handled.insert(delivery.event().id);
        delivery.ack();
    }
    assert_eq!(handled, sent);
    let stats = gone.stats();
    assert_eq!(stats.completed + stats.failed, 0, "the dropped member handled some: {stats:?}");
    for broker in [live, gone, publisher] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
}

/// A work-queue member whose consumer goes away holding deliveries, and with more unread in its
/// channel, gives those events back to the group too: the member still consuming handles every
/// event, and nothing is dead-lettered.
#[test]
fn a_member_whose_consumer_leaves_holding_deliveries_gives_them_back() {
    const EVENTS: usize = 60;
    let bus = Arc::new(MemoryProvider::default());
    let retrying =
        |name: &str| member(&bus, "acked-leaving", name, |builder| builder.retry_policy(quick_retries(3)));
    let (staying, leaving) = (retrying("acked-leaving-stays"), retrying("acked-leaving-goes"));
    let (_, left) = leaving.subscribe_acked("orders.>").unwrap();
    let publisher = publisher(&bus, "acked-leaving-publisher");
    let mut sent = HashSet::new();
    for _ in 0..EVENTS {
        let event = event("orders.created");
        sent.insert(event.id);
        publisher.publish(event).unwrap();
    }
    // The leaving member alone in the group fetches its prefetch; then the other subscribes.
    wait_until("the leaving member to hold some", WAIT, || left.len() >= 3);
    let (_, kept) = staying.subscribe_acked("orders.>").unwrap();
    let consumer = thread::spawn(move || {
        let mut handled = HashSet::new();
        while let Ok(delivery) = kept.recv_timeout(Duration::from_secs(3)) {
            handled.insert(delivery.event().id);
            delivery.ack();
        }
        handled
    });
    let held: Vec<Delivery> = (0..2).map(|_| next(&left)).collect();
    drop(left);
    drop(held);
    let handled = consumer.join().unwrap();
    assert!(handled == sent, "the member that stayed handled {} of {}", handled.len(), sent.len());
    let stats = leaving.stats();
    assert_eq!((stats.completed, stats.dead_letters), (0, 0), "{stats:?}");
    assert!(stats.returned >= 3, "{stats:?}");
    for broker in [staying, leaving, publisher] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
}

/// A work-queue member that dead-lettered one delivery of an event keeps the event when another
/// delivery's subscription ends: that delivery is dead-lettered beside it, rather than the event
/// going back to the group, where it would be handled again while its letter waits for a redrive.
#[test]
fn a_member_that_dead_lettered_a_delivery_keeps_the_event_when_another_subscription_ends() {
    let bus = Arc::new(MemoryProvider::default());
    let leaving =
        member(&bus, "acked-kept", "acked-kept-member", |builder| builder.retry_policy(RetryPolicy::none()));
    leaving.subscribe("orders.*", |_: &Event| Err("the ledger is down")).unwrap();
    let (acked, deliveries) = leaving.subscribe_acked("orders.*").unwrap();
    let publisher = publisher(&bus, "acked-kept-publisher");
    let sent = event("orders.created");
    publisher.publish(sent.clone()).unwrap();
    let held = next(&deliveries);
    assert_eq!(held.event().id, sent.id);
    wait_until("the failing delivery's dead letter", WAIT, || leaving.stats().dead_letters == 1);
    assert!(leaving.unsubscribe(acked));
    held.fail("the consumer is leaving");
    wait_until("the event to end at the member", WAIT, || {
        let stats = leaving.stats();
        stats.failed + stats.returned > 0
    });
    let stats = leaving.stats();
    assert_eq!((stats.failed, stats.returned, stats.dead_letters), (1, 0, 2), "{stats:?}");
    let letters = leaving.dead_letters(&DeadLetterFilter::new().with_event_id(sent.id)).unwrap();
    let mut errors: Vec<&str> = letters.iter().map(|letter| letter.error.as_str()).collect();
    errors.sort_unstable();
    assert_eq!(errors, ["the consumer is leaving", "the ledger is down"]);
    for broker in [leaving, publisher] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
}

/// Shutdown gives an inbound event it did not finish back for redelivery, unless a delivery of it
/// was dead-lettered already: the unfinished one is then dead-lettered too.
#[test]
fn shutdown_dead_letters_the_rest_of_an_inbound_event_it_dead_lettered_a_delivery_of() {
    let bus = Arc::new(MemoryProvider::default());
    let receiver = member(&bus, "acked-ending", "acked-ending-member", |builder| {
        builder.retry_policy(RetryPolicy::none())
    });
    receiver.subscribe("orders.*", |_: &Event| Err("the ledger is down")).unwrap();
    let (_, deliveries) = receiver.subscribe_acked("orders.*").unwrap();
    let publisher = publisher(&bus, "acked-ending-publisher");
    let sent = event("orders.created");
    publisher.publish(sent.clone()).unwrap();
    let held = next(&deliveries);
    wait_until("the failing delivery's dead letter", WAIT, || receiver.stats().dead_letters == 1);
    let report = receiver.shutdown(Duration::from_millis(300));
    assert_eq!((report.returned, report.dead_lettered), (0, 1), "{report:?}");
    drop(held);
    let letters = bus.list_dead_letters(&DeadLetterFilter::new().with_event_id(sent.id)).unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().any(|letter| letter.error.contains("shut down before the delivery was acknowledged")),
        "{letters:?}"
    );
    assert!(publisher.shutdown(WAIT).is_clean());
}

#[test]
fn async_code_receives_and_settles_deliveries() {
    let broker = Broker::builder().workers(2).build().unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let consumer = runtime.spawn(async move {
        let mut settled = 0;
        while let Ok(delivery) = deliveries.recv_async().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
            delivery.ack();
            settled += 1;
        }
        settled
    });
    let publisher = broker.clone();
    let publishing = thread::spawn(move || {
        for _ in 0..100 {
            publisher.publish(event("orders.created")).unwrap();
        }
        publisher.drain(WAIT).unwrap();
        publisher.shutdown(WAIT)
    });
    let settled = runtime.block_on(consumer).unwrap();
    let report = publishing.join().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(settled, 100);
    assert_eq!(broker.stats().completed, 100);
}

/// Across instances: an inbound event is acknowledged to the provider only once its delivery is
/// settled, so an instance that stops before its consumer settled gets it again under its id.
#[test]
fn an_inbound_event_left_unsettled_at_shutdown_is_received_again_by_the_next_incarnation() {
    let bus = Arc::new(MemoryProvider::default());
    let publisher = Broker::builder().provider(bus.clone()).instance_id("acked-publisher").build().unwrap();
    let receiving = |bus: &Arc<MemoryProvider>| {
        Broker::builder().provider(bus.clone()).instance_id("acked-receiver").workers(1).build().unwrap()
    };
    let receiver = receiving(&bus);
    let (_id, deliveries) = receiver.subscribe_acked("orders.>").unwrap();
    thread::sleep(Duration::from_millis(300)); // The inbound thread's first fetch.
    let acked = event("orders.created");
    let unsettled = event("orders.created");
    publisher.publish(acked.clone()).unwrap();
    publisher.publish(unsettled.clone()).unwrap();
    let first = next(&deliveries);
    let second = next(&deliveries);
    let (ack, keep) = if first.event().id == acked.id { (first, second) } else { (second, first) };
    assert_eq!(keep.event().id, unsettled.id);
    ack.ack();
    wait_until("the acknowledgement", WAIT, || receiver.stats().completed == 1);
    let report = receiver.shutdown(Duration::from_millis(300));
    assert_eq!(report.returned, 1, "{report:?}");
    drop(keep); // Too late: its incarnation is gone.
    drop(receiver);

    let again = receiving(&bus);
    let (_id, deliveries) = again.subscribe_acked("orders.>").unwrap();
    let redelivered = next(&deliveries);
    assert_eq!(redelivered.event().id, unsettled.id);
    redelivered.ack();
    again.drain(WAIT).unwrap();
    assert!(deliveries.recv_timeout(Duration::from_millis(300)).is_err(), "the acknowledged event came back");
    assert!(again.shutdown(WAIT).is_clean());
    assert!(publisher.shutdown(WAIT).is_clean());
}

/// A delivery `publish_sync` waits for on its caller's thread stops waiting early enough before
/// shutdown's deadline for its dead letter to be written, as a worker's does: the event is failed
/// with a letter to redrive, and the shutdown is clean.
#[test]
fn shutdown_stops_waiting_for_a_synchronous_publishs_settle_in_time_to_write_its_letter() {
    let memory = Arc::new(MemoryProvider::default());
    let broker = Broker::builder()
        .provider(memory.clone())
        .distribution(eventbroker::Distribution::Local)
        .retry_policy(quick_retries(0))
        .build()
        .unwrap();
    let (_id, deliveries) = broker.subscribe_acked("orders.>").unwrap();
    let sent = event("orders.created");
    let id = sent.id;
    let publisher = {
        let broker = broker.clone();
        thread::spawn(move || broker.publish_sync(sent))
    };
    let held = next(&deliveries);
    let report = broker.shutdown(Duration::from_millis(500));
    let outcome = publisher.join().unwrap();
    drop(held);
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.dead_lettered, 1, "counted as a worker's would be: {report:?}");
    assert_eq!(memory.get(id).unwrap().unwrap().status, EventStatus::Failed);
    let letters = memory.list_dead_letters(&DeadLetterFilter::new().with_event_id(id)).unwrap();
    assert_eq!(letters.len(), 1, "{report:?}");
}

/// Shutdown's count of the deliveries it dead-lettered includes those of an inbound event whose
/// subscription had ended, written beside the one it ended (the event had a delivery
/// dead-lettered already, so it is not given back).
#[test]
fn shutdown_counts_the_letters_of_ended_deliveries_it_writes() {
    let bus = Arc::new(MemoryProvider::default());
    let receiver = member(&bus, "acked-counted", "acked-counted-member", |builder| {
        builder.retry_policy(RetryPolicy {
            max_retries: 1,
            initial_delay: Duration::from_millis(300),
            max_delay: Duration::from_millis(300),
            backoff_factor: 1.0,
            jitter: 0.0,
        })
    });
    receiver.subscribe("orders.*", |_: &Event| Err("the ledger is down")).unwrap();
    let leaving = receiver.subscribe("orders.*", |_: &Event| Err("the mailer is down")).unwrap();
    let (_, deliveries) = receiver.subscribe_acked("orders.*").unwrap();
    let publisher = publisher(&bus, "acked-counted-publisher");
    let sent = event("orders.created");
    publisher.publish(sent.clone()).unwrap();
    let held = next(&deliveries);
    wait_until("both first attempts", WAIT, || receiver.stats().handler_failures == 2);
    assert!(receiver.unsubscribe(leaving));
    // The first handler's retry fails for good; the second's finds its subscription ended.
    wait_until("the retries", WAIT, || {
        let stats = receiver.stats();
        stats.dead_letters == 1 && stats.pending_retries == 0
    });
    let report = receiver.shutdown(Duration::from_millis(500));
    drop(held);
    let letters = bus.list_dead_letters(&DeadLetterFilter::new().with_event_id(sent.id)).unwrap();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!((report.returned, report.dead_lettered), (0, 2), "{report:?}");
    assert!(publisher.shutdown(WAIT).is_clean());
}
