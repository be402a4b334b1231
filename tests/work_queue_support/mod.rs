//! A work-queue scenario run against each network provider by its test binary.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, Distribution, Event, EventId, EventSource, Provider};
use parking_lot::Mutex;

const ARRIVE: Duration = Duration::from_secs(20);

fn broker(provider: Arc<dyn Provider>, instance: &str, distribution: Distribution) -> Broker {
    Broker::builder()
        .provider(provider)
        .instance_id(instance)
        .distribution(distribution)
        .workers(2)
        .claim_idle(Duration::from_secs(1))
        .build()
        .expect("broker")
}

fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A member subscribed to `<tag>.jobs.>` and `<tag>.other.>` unsubscribes the first while
/// events fetched for it wait in its shard: it gives them back to the group, and the other
/// member, still subscribed to `<tag>.jobs.>`, handles every one, rather than the leaving member
/// taking them back and acknowledging them as unwanted.
pub fn a_partial_unsubscribe_gives_back_to_the_group(connect: &dyn Fn() -> Arc<dyn Provider>, tag: &str) {
    let group = Distribution::WorkQueue(format!("{tag}-leavers"));
    let leaving = broker(connect(), &format!("{tag}-leaving"), group.clone());
    let publisher = broker(connect(), &format!("{tag}-p"), Distribution::FanOut);
    let release = Arc::new(AtomicBool::new(false));
    let held = Arc::new(Mutex::new(Vec::<EventId>::new()));
    let jobs = {
        let (held, release) = (Arc::clone(&held), Arc::clone(&release));
        leaving
            .subscribe_infallible(&format!("{tag}.jobs.>"), move |event: &Event| {
                held.lock().push(event.id);
                let until = Instant::now() + ARRIVE;
                while !release.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("subscribe")
    };
    leaving.subscribe_infallible(&format!("{tag}.other.>"), |_: &Event| {}).expect("subscribe");
    let job = || Event::new(EventSource::System, format!("{tag}.jobs.run"));
    publisher.publish_async(job()).expect("publish");
    assert!(wait_for(ARRIVE, || held.lock().len() == 1), "the first job reached the leaving member");
    let rest: Vec<Event> = (0..12).map(|_| job()).collect();
    for event in &rest {
        publisher.publish_async(event.clone()).expect("publish");
    }
    assert!(
        wait_for(ARRIVE, || leaving.stats().inbound.fetched == 13),
        "the leaving member fetched the rest"
    );
    let staying = broker(connect(), &format!("{tag}-staying"), group);
    let handled = Arc::new(Mutex::new(HashSet::<EventId>::new()));
    {
        let handled = Arc::clone(&handled);
        staying
            .subscribe_infallible(&format!("{tag}.jobs.>"), move |event: &Event| {
                handled.lock().insert(event.id);
            })
            .expect("subscribe");
    }
    std::thread::sleep(Duration::from_millis(500)); // The staying member's first fetch.
    assert!(leaving.unsubscribe(jobs));
    release.store(true, Ordering::Relaxed);
    let all: HashSet<EventId> = rest.iter().map(|e| e.id).collect();
    let arrived = wait_for(Duration::from_secs(10), || *handled.lock() == all);
    let got = handled.lock().len();
    for broker in [leaving, staying, publisher] {
        let _ = broker.shutdown(Duration::from_secs(5));
    }
    assert!(arrived, "the staying member handled {got} of the {} given-back events", all.len());
}

/// A member fetches a burst for a handler that takes 150 ms an event, all of one type (one shard),
/// with a claim idle time of 1 s; a second member joins. No handler call outlives the claim idle
/// time, so no event is handled twice: the events waiting in the first member's shard keep their
/// claims, and the second member does not take them.
pub fn events_waiting_in_a_shard_keep_their_claims(connect: &dyn Fn() -> Arc<dyn Provider>, tag: &str) {
    let group = Distribution::WorkQueue(format!("{tag}-slow"));
    let first = broker(connect(), &format!("{tag}-first"), group.clone());
    let publisher = broker(connect(), &format!("{tag}-p"), Distribution::FanOut);
    let handled: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let slow = |broker: &Broker| {
        let handled = Arc::clone(&handled);
        broker
            .subscribe_infallible(&format!("{tag}.jobs.>"), move |event: &Event| {
                handled.lock().push(event.id);
                std::thread::sleep(Duration::from_millis(150));
            })
            .expect("subscribe");
    };
    slow(&first);
    std::thread::sleep(Duration::from_millis(500)); // The first member's first fetch.
    let events: Vec<Event> =
        (0..20).map(|_| Event::new(EventSource::System, format!("{tag}.jobs.run"))).collect();
    for event in &events {
        publisher.publish_async(event.clone()).expect("publish");
    }
    assert!(wait_for(ARRIVE, || first.stats().inbound.fetched == 20), "the first member fetched the burst");
    let second = broker(connect(), &format!("{tag}-second"), group);
    slow(&second);
    let all: HashSet<EventId> = events.iter().map(|e| e.id).collect();
    let arrived = wait_for(ARRIVE, || handled.lock().iter().copied().collect::<HashSet<_>>() == all);
    // Past a claim idle time more, for a member that took an event away to handle it.
    std::thread::sleep(Duration::from_millis(1500));
    let times = handled.lock().len();
    for broker in [first, second, publisher] {
        let _ = broker.shutdown(Duration::from_secs(5));
    }
    assert!(arrived, "every event handled");
    assert_eq!(times, all.len(), "handled {times} times for {} events", all.len());
}
