//! Brokers sharing one backend, end to end: what [`Distribution`] promises.
//!
//! Each scenario builds brokers on handles from one [`TestBackend`] (two processes, as far as the
//! backend can tell), subscribes to its [`Scope`] only, and waits for what must arrive with a
//! bound. A backend without inbound sources is checked to refuse cross-instance brokers instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{EXCLUSIVE, Scope, TestBackend, wait_until};
use crate::testing::{Fault, FaultyProvider, Operation};
use crate::{Broker, BuildError, Distribution, Event, EventId, Provider, RetryPolicy, SubscriptionId};

/// How long a scenario waits for what must arrive.
const ARRIVE: Duration = Duration::from_secs(20);
/// How long a scenario watches for what must not arrive.
const QUIET: Duration = Duration::from_millis(500);
/// Claim idle time of the brokers: short, so a torn-down member's events move on quickly.
const CLAIM_IDLE: Duration = Duration::from_secs(1);
const SHUTDOWN: Duration = Duration::from_secs(10);

/// What a broker's handlers saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Arc<Event>>>>);

impl Seen {
    fn len(&self) -> usize {
        self.0.lock().len()
    }

    fn ids(&self) -> Vec<EventId> {
        self.0.lock().iter().map(|e| e.id).collect()
    }

    fn subscribe(&self, broker: &Broker, pattern: &str) {
        self.subscribe_slow(broker, pattern, Duration::ZERO);
    }

    /// [`Seen::subscribe`] with a handler that holds each event until `release` is set (at most
    /// [`ARRIVE`]).
    fn subscribe_held(&self, broker: &Broker, pattern: &str, release: &Arc<AtomicBool>) -> SubscriptionId {
        let (seen, release) = (self.clone(), Arc::clone(release));
        broker
            .subscribe_infallible(pattern, move |event| {
                seen.0.lock().push(Arc::new(event.clone()));
                let until = Instant::now() + ARRIVE;
                while !release.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("subscribe")
    }

    /// [`Seen::subscribe`] with a handler that takes `pause` for each event.
    fn subscribe_slow(&self, broker: &Broker, pattern: &str, pause: Duration) {
        let seen = self.clone();
        broker
            .subscribe_infallible(pattern, move |event| {
                seen.0.lock().push(Arc::new(event.clone()));
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            })
            .expect("subscribe");
    }
}

/// A broker on `provider` in `distribution`, or `None` (after checking it is refused) when the
/// backend cannot deliver across instances.
fn broker(provider: Arc<dyn Provider>, instance: &str, distribution: Distribution) -> Option<Broker> {
    broker_with(provider, instance, distribution, 1024)
}

/// [`broker`] with rings of `buffer_size` events per shard (two shards).
fn broker_with(
    provider: Arc<dyn Provider>,
    instance: &str,
    distribution: Distribution,
    buffer_size: usize,
) -> Option<Broker> {
    let caps = provider.capabilities();
    let supported = caps.inbound && (caps.work_queue || !matches!(distribution, Distribution::WorkQueue(_)));
    let built = Broker::builder()
        .provider(provider)
        .instance_id(instance)
        .distribution(distribution)
        .workers(2)
        .buffer_size(buffer_size)
        .claim_idle(CLAIM_IDLE)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            ..RetryPolicy::default()
        })
        .build();
    match built {
        Ok(broker) => Some(broker),
        Err(BuildError::Config(error)) if !supported => {
            assert_eq!(error.key(), "distribution", "{error}");
            None
        }
        Err(error) => panic!("building a broker for {instance}: {error}"),
    }
}

fn publish_all(broker: &Broker, events: &[Event]) {
    for event in events {
        broker.publish_async(event.clone()).expect("publish");
    }
}

fn set(ids: impl IntoIterator<Item = EventId>) -> HashSet<EventId> {
    ids.into_iter().collect()
}

fn assert_clean_shutdown(broker: &Broker) {
    let report = broker.shutdown(SHUTDOWN);
    assert!(report.is_clean(), "{report:?}");
}

/// Fan-out: each of two brokers publishes N; each broker's handlers see all 2N exactly once — its
/// own once (no echo), the other's once.
pub fn fan_out_each_broker_handles_every_event_once(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let Some(a) = broker(backend.connect(), &scope.name("a"), Distribution::FanOut) else { return };
    let b = broker(backend.connect(), &scope.name("b"), Distribution::FanOut).expect("a second broker");
    let (seen_a, seen_b) = (Seen::default(), Seen::default());
    seen_a.subscribe(&a, scope.all().as_str());
    seen_b.subscribe(&b, scope.all().as_str());

    let n = 50;
    let from_a: Vec<Event> = (0..n).map(|i| scope.event(&format!("a.t{}", i % 5))).collect();
    let from_b: Vec<Event> = (0..n).map(|i| scope.event(&format!("b.t{}", i % 5))).collect();
    publish_all(&a, &from_a);
    publish_all(&b, &from_b);
    let all = set(from_a.iter().chain(&from_b).map(|e| e.id));
    wait_until("a to see every event", ARRIVE, || seen_a.len() >= 2 * n);
    wait_until("b to see every event", ARRIVE, || seen_b.len() >= 2 * n);
    std::thread::sleep(QUIET);
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        let ids = seen.ids();
        assert_eq!(ids.len(), 2 * n, "{name} saw duplicates (an echo or a redelivery)");
        assert_eq!(set(ids), all, "{name} saw exactly the events of both");
    }
    assert_eq!(a.stats().inbound.fetched, n as u64, "a fetched b's events, not its own");
    assert_clean_shutdown(&a);
    assert_clean_shutdown(&b);
}

/// Work-queue: events a publisher outside the group publishes are each handled by exactly one
/// member; events a member publishes are handled by that member alone.
pub fn work_queue_each_event_is_handled_by_one_broker(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let group = Distribution::WorkQueue(scope.name("workers"));
    // Small rings and slow handlers: each member can take only a few events at a time, so both
    // take a share however fast the other fetches.
    let Some(w1) = broker_with(backend.connect(), &scope.name("w1"), group.clone(), 4) else { return };
    let w2 = broker_with(backend.connect(), &scope.name("w2"), group, 4).expect("a second member");
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");
    let (seen1, seen2) = (Seen::default(), Seen::default());
    for (broker, seen) in [(&w1, &seen1), (&w2, &seen2)] {
        seen.subscribe_slow(broker, scope.all().as_str(), Duration::from_millis(2));
    }

    let from_outside: Vec<Event> = (0..60).map(|i| scope.event(&format!("job.t{}", i % 6))).collect();
    let from_member: Vec<Event> = (0..10).map(|_| scope.event("job.local")).collect();
    publish_all(&publisher, &from_outside);
    publish_all(&w1, &from_member);
    let total = from_outside.len() + from_member.len();
    wait_until("the group to handle every event", ARRIVE, || seen1.len() + seen2.len() >= total);
    std::thread::sleep(QUIET);
    let (ids1, ids2) = (seen1.ids(), seen2.ids());
    assert_eq!(ids1.len() + ids2.len(), total, "an event was handled twice");
    assert!(set(ids1.iter().copied()).is_disjoint(&set(ids2.iter().copied())));
    let handled = set(ids1.iter().chain(&ids2).copied());
    assert_eq!(handled, set(from_outside.iter().chain(&from_member).map(|e| e.id)));
    let member_events = set(from_member.iter().map(|e| e.id));
    assert!(set(ids1).is_superset(&member_events), "a member's own events stay with it");
    assert!(!ids2.is_empty() && seen1.len() > from_member.len(), "both members took a share");
    for broker in [&w1, &w2, &publisher] {
        assert_clean_shutdown(broker);
    }
}

/// Work-queue members at their default settings (rings far larger than the burst) share a burst
/// of slow events: each holds only its prefetch at a time, so the first to fetch does not take
/// them all.
pub fn work_queue_members_share_a_burst(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let group = Distribution::WorkQueue(scope.name("workers"));
    let Some(w1) = broker(backend.connect(), &scope.name("w1"), group.clone()) else { return };
    let w2 = broker(backend.connect(), &scope.name("w2"), group).expect("a second member");
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");
    let (seen1, seen2) = (Seen::default(), Seen::default());
    for (broker, seen) in [(&w1, &seen1), (&w2, &seen2)] {
        seen.subscribe_slow(broker, scope.all().as_str(), Duration::from_millis(3));
    }
    // Both members fetching before the burst.
    std::thread::sleep(Duration::from_millis(200));
    let burst: Vec<Event> = (0..400).map(|i| scope.event(&format!("job.t{}", i % 6))).collect();
    publish_all(&publisher, &burst);
    wait_until("the group to handle the burst", ARRIVE, || seen1.len() + seen2.len() >= burst.len());
    let (one, two) = (seen1.len(), seen2.len());
    assert_eq!(one + two, burst.len());
    assert!(
        one >= burst.len() / 4 && two >= burst.len() / 4,
        "a member took most of the burst: {one} and {two}"
    );
    for broker in [&w1, &w2, &publisher] {
        assert_clean_shutdown(broker);
    }
}

/// A member that vanishes (its connection cut, as a crashed process) while holding fetched,
/// unacknowledged events: the survivor gets every one of them after the claim idle time — none
/// lost, and duplicates only of events the vanished member never acknowledged.
pub fn a_broker_torn_down_loses_nothing_it_fetched(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let group = Distribution::WorkQueue(scope.name("workers"));
    let faulty = FaultyProvider::new(backend.connect());
    let Some(doomed) = broker(faulty.clone(), &scope.name("doomed"), group.clone()) else { return };
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");

    // The doomed member's handler holds on to whatever it gets until released.
    let release = Arc::new(AtomicBool::new(false));
    let held = Seen::default();
    held.subscribe_held(&doomed, scope.all().as_str(), &release);
    let events: Vec<Event> = (0..40).map(|i| scope.event(&format!("job.t{}", i % 8))).collect();
    publish_all(&publisher, &events);
    wait_until("the doomed member to hold events", ARRIVE, || held.len() > 0);
    faulty.cut(&Fault::unavailable());
    release.store(true, Ordering::Relaxed);
    let report = doomed.shutdown(Duration::from_secs(1));
    assert!(!report.is_clean(), "nothing could be acknowledged through a cut connection: {report:?}");

    // The survivor joins the group once the doomed member holds events it will never acknowledge.
    let survivor = broker(backend.connect(), &scope.name("survivor"), group).expect("a second member");
    let survived = Seen::default();
    survived.subscribe(&survivor, scope.all().as_str());

    let all = set(events.iter().map(|e| e.id));
    wait_until("the survivor to handle every event", ARRIVE, || set(survived.ids()) == all);
    std::thread::sleep(QUIET);
    let ids = survived.ids();
    assert_eq!(ids.len(), all.len(), "the survivor handled an event twice");
    assert!(held.ids().iter().all(|id| all.contains(id)));
    assert_clean_shutdown(&survivor);
    assert_clean_shutdown(&publisher);
    faulty.heal_all();
}

/// Events of one partition key from one publisher are handled in publish order on another
/// instance, whatever its number of shards.
pub fn per_key_order_holds_across_instances(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let Some(publisher) = broker(backend.connect(), &scope.name("p"), Distribution::FanOut) else { return };
    let receiver = broker(backend.connect(), &scope.name("r"), Distribution::FanOut).expect("a receiver");
    let seen = Seen::default();
    seen.subscribe(&receiver, scope.all().as_str());

    let keys = 4;
    let per_key = 50;
    let events: Vec<Event> = (0..keys * per_key)
        .map(|i| {
            scope
                .event(&format!("order.t{}", i % 7))
                .with_partition_key(format!("k{}", i % keys))
                .with_metadata("n", i / keys)
        })
        .collect();
    publish_all(&publisher, &events);
    wait_until("every event", ARRIVE, || seen.len() >= events.len());
    let mut by_key: HashMap<crate::CompactString, Vec<u64>> = HashMap::new();
    for event in seen.0.lock().iter() {
        let key = event.partition_key.clone().expect("the key travels with the event");
        by_key.entry(key).or_default().push(event.metadata["n"].as_u64().expect("a number"));
    }
    assert_eq!(by_key.len(), keys);
    for (key, order) in by_key {
        let expected: Vec<u64> = (0..per_key as u64).collect();
        assert_eq!(order, expected, "key {key} out of order");
    }
    assert_clean_shutdown(&publisher);
    assert_clean_shutdown(&receiver);
}

/// An instance restarted under the same id receives what its group kept while it was down, for
/// every handler it subscribes at start-up, one after another; before it subscribes anything, it
/// passes nothing over.
pub fn a_restarted_instance_receives_what_it_missed_for_each_handler(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let Some(publisher) = broker(backend.connect(), &scope.name("p"), Distribution::FanOut) else { return };
    let (id, orders, users) = (scope.name("r"), scope.pattern("orders.>"), scope.pattern("users.>"));
    let first = broker(backend.connect(), &id, Distribution::FanOut).expect("a receiver");
    let seen = Seen::default();
    seen.subscribe(&first, orders.as_str());
    seen.subscribe(&first, users.as_str());
    let before = scope.event("orders.created");
    publish_all(&publisher, std::slice::from_ref(&before));
    wait_until("the first incarnation to receive", ARRIVE, || seen.len() == 1);
    assert_clean_shutdown(&first);

    // Down: both kinds published.
    let missed: Vec<Event> =
        (0..20).map(|i| scope.event(if i % 2 == 0 { "orders.paid" } else { "users.joined" })).collect();
    publish_all(&publisher, &missed);
    publisher.drain(ARRIVE).expect("the publisher's events stored");

    // Up again: nothing subscribed for a while, then two handlers, a moment apart.
    let second = broker(backend.connect(), &id, Distribution::FanOut).expect("the receiver again");
    std::thread::sleep(QUIET);
    let again = Seen::default();
    again.subscribe(&second, orders.as_str());
    std::thread::sleep(Duration::from_millis(10));
    again.subscribe(&second, users.as_str());
    let all = set(missed.iter().map(|e| e.id));
    let deadline = Instant::now() + ARRIVE;
    while !set(again.ids()).is_superset(&all) {
        let got = set(again.ids());
        assert!(
            Instant::now() < deadline,
            "the restarted instance received {} of the {} it missed, and {} others ({:?} the first \
             incarnation's) within {ARRIVE:?}; inbound {:?}",
            got.intersection(&all).count(),
            all.len(),
            got.difference(&all).count(),
            got.contains(&before.id),
            second.stats().inbound,
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(QUIET);
    assert_eq!(set(again.ids()), all, "nothing but what it missed");
    assert_eq!(again.len(), missed.len(), "each once: {:?}", again.ids());
    assert_clean_shutdown(&second);
    assert_clean_shutdown(&publisher);
}

/// Acknowledged deliveries across instances: an event is acknowledged to the backend only once its
/// delivery is settled, so what an instance's consumer left unsettled when it stopped comes back
/// to its next incarnation, and what it settled does not.
pub fn an_unsettled_delivery_comes_back_to_the_restarted_instance(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let Some(publisher) = broker(backend.connect(), &scope.name("p"), Distribution::FanOut) else { return };
    let (id, pattern) = (scope.name("r"), scope.all());
    let first = broker(backend.connect(), &id, Distribution::FanOut).expect("a receiver");
    let (_, deliveries) = first.subscribe_acked(pattern.as_str()).expect("subscribe");
    std::thread::sleep(QUIET); // The first fetch, once the subscription settled.
    let events: Vec<Event> = (0..10).map(|i| scope.event(&format!("orders.t{i}"))).collect();
    publish_all(&publisher, &events);
    let mut kept = Vec::new();
    let mut unsettled = HashSet::new();
    for _ in 0..events.len() {
        let delivery = deliveries.recv_timeout(ARRIVE).expect("every event delivered");
        if kept.len() < 4 {
            unsettled.insert(delivery.event().id);
            kept.push(delivery);
        } else {
            delivery.ack();
        }
    }
    wait_until("the settled six to complete", ARRIVE, || first.stats().completed == 6);
    let report = first.shutdown(Duration::from_secs(2));
    assert_eq!(report.returned, 4, "the unsettled four given back: {report:?}");
    drop(kept); // Settled too late: their incarnation is gone.

    let second = broker(backend.connect(), &id, Distribution::FanOut).expect("the receiver again");
    let (_, deliveries) = second.subscribe_acked(pattern.as_str()).expect("subscribe");
    let mut again = HashSet::new();
    while again.len() < unsettled.len() {
        let delivery = deliveries.recv_timeout(ARRIVE).expect("the unsettled events again");
        assert!(unsettled.contains(&delivery.event().id), "a settled event came back");
        again.insert(delivery.event().id);
        delivery.ack();
    }
    assert!(deliveries.recv_timeout(QUIET).is_err(), "nothing more comes back");
    assert_clean_shutdown(&second);
    assert_clean_shutdown(&publisher);
}

/// A work-queue member that holds an event for several claim idle times, its worker idle
/// meanwhile, keeps it: the worker extends the claim, and no other member gets the event.
pub fn a_member_holding_an_event_keeps_its_claim(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let group = Distribution::WorkQueue(scope.name("holders"));
    let Some(one) = broker(backend.connect(), &scope.name("m1"), group.clone()) else { return };
    let two = broker(backend.connect(), &scope.name("m2"), group).expect("a second member");
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");
    let pattern = scope.all();
    let (_, first) = one.subscribe_acked(pattern.as_str()).expect("subscribe");
    let (_, second) = two.subscribe_acked(pattern.as_str()).expect("subscribe");
    std::thread::sleep(QUIET); // The members' first fetches.
    let event = scope.event("orders.created");
    publish_all(&publisher, std::slice::from_ref(&event));

    let deadline = Instant::now() + ARRIVE;
    let (held, other) = loop {
        if let Ok(delivery) = first.try_recv() {
            break (delivery, &second);
        }
        if let Ok(delivery) = second.try_recv() {
            break (delivery, &first);
        }
        assert!(Instant::now() < deadline, "the event reached no member within {ARRIVE:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(held.event().id, event.id);
    let holding_for = CLAIM_IDLE * 3 + CLAIM_IDLE / 2;
    assert!(other.recv_timeout(holding_for).is_err(), "the other member got the event while it was held");
    held.ack();
    std::thread::sleep(QUIET);
    assert!(first.is_empty() && second.is_empty(), "the event came back after its acknowledgement");
    assert_eq!(one.stats().completed + two.stats().completed, 1);
    assert_clean_shutdown(&one);
    assert_clean_shutdown(&two);
    assert_clean_shutdown(&publisher);
}

/// A work-queue member that unsubscribes while events fetched for the subscription wait in its
/// shard gives them back to the group, and a member still subscribed handles them.
pub fn a_member_that_unsubscribes_gives_back_what_it_fetched(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let group = Distribution::WorkQueue(scope.name("leavers"));
    let Some(leaving) = broker(backend.connect(), &scope.name("leaving"), group.clone()) else { return };
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");
    let release = Arc::new(AtomicBool::new(false));
    let held = Seen::default();
    let id = held.subscribe_held(&leaving, scope.all().as_str(), &release);
    // One type, so one shard: its worker holds the first event while the rest wait behind it.
    let first = scope.event("jobs.run");
    publish_all(&publisher, std::slice::from_ref(&first));
    wait_until("the first event's handler", ARRIVE, || held.len() == 1);
    let rest: Vec<Event> = (0..12).map(|_| scope.event("jobs.run")).collect();
    publish_all(&publisher, &rest);
    wait_until("the leaving member to fetch the rest", ARRIVE, || leaving.stats().inbound.fetched == 13);
    // A second member joins, then the first leaves: where members share one consumer (NATS), the
    // leaving member's empty subscription set must not become the group's filter.
    let staying = broker(backend.connect(), &scope.name("staying"), group).expect("a second member");
    let handled = Seen::default();
    handled.subscribe(&staying, scope.all().as_str());
    assert!(leaving.unsubscribe(id));
    release.store(true, Ordering::Relaxed);
    // A fetch in flight at the unsubscribe may bring some of them back once more: they go back
    // again.
    wait_until("the leaving member to end what it fetched", ARRIVE, || {
        let stats = leaving.stats();
        stats.completed + stats.returned == stats.inbound.fetched
    });
    let stats = leaving.stats();
    assert_eq!(stats.completed, 1, "only the first handled: {stats:?}");
    assert!(stats.returned >= 12, "the twelve it had not begun go back: {stats:?}");

    std::thread::sleep(QUIET); // The leaving member's inbound thread has looked at its filter.
    let later: Vec<Event> = (0..5).map(|_| scope.event("jobs.run")).collect();
    publish_all(&publisher, &later);
    let all = set(rest.iter().chain(&later).map(|e| e.id));
    wait_until("the staying member to handle the rest and the later ones", ARRIVE, || {
        set(handled.ids()) == all
    });
    assert_eq!(held.ids(), [first.id], "the leaving member handled only the first");
    assert_clean_shutdown(&leaving);
    assert_clean_shutdown(&staying);
    assert_clean_shutdown(&publisher);
}

/// Events no subscription wants never reach the handlers; a backend that filters at the source
/// never even hands them to the broker.
pub fn events_nobody_wants_never_reach_the_handlers(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let Some(publisher) = broker(backend.connect(), &scope.name("p"), Distribution::FanOut) else { return };
    let provider = backend.connect();
    let filters_at_source = provider.capabilities().filter_at_source;
    let receiver = broker(provider, &scope.name("r"), Distribution::FanOut).expect("a receiver");
    let seen = Seen::default();
    seen.subscribe(&receiver, scope.pattern("billing.>").as_str());

    let billing: Vec<Event> = (0..10).map(|_| scope.event("billing.paid")).collect();
    let other: Vec<Event> = (0..10).map(|_| scope.event("users.created")).collect();
    for (b, o) in billing.iter().zip(&other) {
        publish_all(&publisher, &[o.clone(), b.clone()]);
    }
    wait_until("the wanted events", ARRIVE, || seen.len() >= billing.len());
    std::thread::sleep(QUIET);
    assert_eq!(set(seen.ids()), set(billing.iter().map(|e| e.id)));
    assert_eq!(seen.len(), billing.len());
    if filters_at_source {
        assert_eq!(receiver.stats().inbound.fetched, billing.len() as u64, "unwanted events were fetched");
    }
    assert_clean_shutdown(&publisher);
    assert_clean_shutdown(&receiver);
}

/// A source that fails to fetch does not stop local dispatch; once it recovers, fetching resumes
/// and nothing published meanwhile is lost.
pub fn a_fetch_error_does_not_stop_local_dispatch(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let faulty = FaultyProvider::new(backend.connect());
    let Some(receiver) = broker(faulty.clone(), &scope.name("r"), Distribution::FanOut) else { return };
    let publisher = broker(backend.connect(), &scope.name("p"), Distribution::FanOut).expect("a publisher");
    let seen = Seen::default();
    seen.subscribe(&receiver, scope.all().as_str());

    faulty.inject(Operation::Fetch, Fault::unavailable());
    // Once a fetch has failed, none begun before the fault is still waiting for events.
    wait_until("failed fetches", ARRIVE, || receiver.stats().inbound.fetch_errors > 0);
    let remote: Vec<Event> = (0..5).map(|_| scope.event("remote")).collect();
    publish_all(&publisher, &remote);
    let local: Vec<Event> = (0..10).map(|_| scope.event("local")).collect();
    publish_all(&receiver, &local);
    wait_until("local dispatch", ARRIVE, || seen.len() >= local.len());
    std::thread::sleep(QUIET);
    assert_eq!(set(seen.ids()), set(local.iter().map(|e| e.id)), "nothing remote while fetching fails");

    faulty.heal(Operation::Fetch);
    let all = set(local.iter().chain(&remote).map(|e| e.id));
    wait_until("the remote events after recovery", ARRIVE, || set(seen.ids()) == all);
    std::thread::sleep(QUIET);
    assert_eq!(seen.len(), all.len());
    assert_clean_shutdown(&receiver);
    assert_clean_shutdown(&publisher);
}
