//! Consumer-group scenarios on the provider itself, without a broker: what
//! [`Inbound`] promises about delivery, acks, redelivery and filters.
//!
//! Every source opened here filters to its scenario's [`Scope`], so events other tests store in a
//! shared backend never reach it. Waits are bounded: a scenario fails, it never hangs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{EXCLUSIVE, Scope, TestBackend, assert_not_supported};
use crate::{
    Ack, ConsumerGroup, Event, EventId, Inbound, InboundConfig, InboundEvent, Pattern, Provider,
    ProviderErrorKind,
};

/// Claim idle time of the scenarios that wait for it: short, but long enough for a network
/// backend's timers.
const CLAIM_IDLE: Duration = Duration::from_secs(1);
/// How long a scenario waits for events that must arrive.
const ARRIVE: Duration = Duration::from_secs(10);
/// How long a scenario watches for events that must not arrive.
const QUIET: Duration = Duration::from_millis(400);

/// Opens a source of `consumer` in `group`, filtered to `filter`; `None` (after checking the
/// backend says so) when the backend has no inbound sources.
fn open(
    provider: &dyn Provider,
    consumer: &str,
    group: &ConsumerGroup,
    filter: &Pattern,
) -> Option<Arc<dyn Inbound>> {
    let caps = provider.capabilities();
    let config = InboundConfig::new(consumer, group.clone()).with_claim_idle(CLAIM_IDLE);
    if !caps.inbound || (group.is_shared() && !caps.work_queue) {
        assert_not_supported(provider.open_inbound(&config).map(drop), "open_inbound");
        return None;
    }
    let source = provider.open_inbound(&config).expect("open_inbound");
    source.set_filter(std::slice::from_ref(filter)).expect("set_filter");
    Some(source)
}

/// Fetches until `n` events have come or [`ARRIVE`] passes.
fn take(source: &dyn Inbound, n: usize) -> Vec<InboundEvent> {
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.len() < n {
        let now = Instant::now();
        assert!(now < deadline, "only {} of {n} events arrived within {ARRIVE:?}", got.len());
        let wait = (deadline - now).min(Duration::from_millis(250));
        got.extend(source.fetch(n - got.len(), wait).expect("fetch"));
    }
    got
}

/// Fetches for [`QUIET`] and asserts nothing came.
fn assert_quiet(source: &dyn Inbound, what: &str) {
    let deadline = Instant::now() + QUIET;
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        let got = source.fetch(16, left).expect("fetch");
        assert!(got.is_empty(), "{what}: unexpected {:?}", ids(&got));
    }
}

fn ids(events: &[InboundEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event.id).collect()
}

fn ack_all(source: &dyn Inbound, events: &[InboundEvent]) {
    let acks: Vec<Ack> = events.iter().map(|e| Ack::handled(e.token)).collect();
    source.ack(&acks).expect("ack");
}

fn store(provider: &dyn Provider, events: &[Event], origin: Option<&ConsumerGroup>) {
    let shared: Vec<Arc<Event>> = events.iter().cloned().map(Arc::new).collect();
    let origin = origin.map(ConsumerGroup::key);
    provider.store_batch(&shared, origin.as_deref()).expect("store_batch");
}

fn events(scope: &Scope, ty: &str, n: usize) -> Vec<Event> {
    (0..n).map(|_| scope.event(ty)).collect()
}

fn id_set(ids: impl IntoIterator<Item = EventId>) -> HashSet<EventId> {
    ids.into_iter().collect()
}

/// A group seen for the first time starts at the current end of history, not its beginning.
pub fn a_new_group_starts_at_the_end(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    store(&*provider, &events(&scope, "before", 3), None);
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &scope.all()) else { return };
    let after = events(&scope, "after", 1);
    store(&*provider, &after, None);

    let got = take(&*source, 1);
    assert_eq!(ids(&got), vec![after[0].id]);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(*got[0].event, after[0], "the event as stored");
    ack_all(&*source, &got);
    assert_quiet(&*source, "history before the group existed");
    source.close().expect("close");
}

/// Fan-out: each group receives every event other groups (and non-brokers) stored, once, and never
/// its own.
pub fn fan_out_delivers_every_other_group_event_once_without_echo(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let (pa, pb) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let (ga, gb) = (scope.instance("a"), scope.instance("b"));
    let Some(a) = open(&*pa, &scope.name("a"), &ga, &scope.all()) else { return };
    let b = open(&*pb, &scope.name("b"), &gb, &scope.all()).expect("a second group");

    let from_a = events(&scope, "from.a", 3);
    let from_b = events(&scope, "from.b", 3);
    let from_nobody = events(&scope, "from.nobody", 2);
    store(&*pa, &from_a, Some(&ga));
    store(&*pb, &from_b, Some(&gb));
    store(&*pa, &from_nobody, None);

    let got_a = take(&*a, 5);
    let got_b = take(&*b, 5);
    let expect_a: Vec<EventId> = from_b.iter().chain(&from_nobody).map(|e| e.id).collect();
    let expect_b: Vec<EventId> = from_a.iter().chain(&from_nobody).map(|e| e.id).collect();
    assert_eq!(ids(&got_a), expect_a, "a receives b's and nobody's, in store order");
    assert_eq!(ids(&got_b), expect_b, "b receives a's and nobody's, in store order");
    ack_all(&*a, &got_a);
    ack_all(&*b, &got_b);
    assert_quiet(&*a, "a after acking everything");
    assert_quiet(&*b, "b after acking everything");
    a.close().expect("close");
    b.close().expect("close");
}

/// Work-queue: the members of a shared group split the events, each to exactly one member.
pub fn work_queue_members_share_the_events(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let (p1, p2) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("workers"));
    let Some(m1) = open(&*p1, &scope.name("m1"), &group, &scope.all()) else { return };
    let m2 = open(&*p2, &scope.name("m2"), &group, &scope.all()).expect("a second member");
    let stored = events(&scope, "job", 20);
    store(&*p1, &stored, None);

    let (mut got1, mut got2) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + ARRIVE;
    while got1.len() + got2.len() < stored.len() {
        assert!(Instant::now() < deadline, "only {} of 20 events arrived", got1.len() + got2.len());
        let batch = m1.fetch(3, Duration::from_millis(100)).expect("fetch");
        ack_all(&*m1, &batch);
        got1.extend(batch);
        let batch = m2.fetch(3, Duration::from_millis(100)).expect("fetch");
        ack_all(&*m2, &batch);
        got2.extend(batch);
    }
    let all: Vec<EventId> = ids(&got1).into_iter().chain(ids(&got2)).collect();
    assert_eq!(all.len(), 20, "no event went to both members");
    assert_eq!(id_set(all), id_set(stored.iter().map(|e| e.id)));
    assert!(!got1.is_empty() && !got2.is_empty(), "both members took a share");
    assert_quiet(&*m1, "m1 after everything was acked");
    assert_quiet(&*m2, "m2 after everything was acked");
    m1.close().expect("close");
    m2.close().expect("close");
}

/// A shared group never receives what its own members published; other groups do.
pub fn a_work_queue_group_never_receives_its_own_events(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let (p1, p2) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let other = scope.instance("x");
    let Some(member) = open(&*p1, &scope.name("m1"), &queue, &scope.all()) else { return };
    let outsider = open(&*p2, &scope.name("x"), &other, &scope.all()).expect("an instance group");

    let from_queue = events(&scope, "from.queue", 3);
    let from_other = events(&scope, "from.other", 2);
    store(&*p1, &from_queue, Some(&queue));
    store(&*p2, &from_other, Some(&other));

    let got = take(&*member, 2);
    assert_eq!(ids(&got), from_other.iter().map(|e| e.id).collect::<Vec<_>>());
    ack_all(&*member, &got);
    assert_quiet(&*member, "the queue's own events");
    let got = take(&*outsider, 3);
    assert_eq!(ids(&got), from_queue.iter().map(|e| e.id).collect::<Vec<_>>());
    ack_all(&*outsider, &got);
    member.close().expect("close");
    outsider.close().expect("close");
}

/// One member receives events in store order, across batches.
pub fn events_come_in_store_order(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &scope.all()) else { return };
    let stored: Vec<Event> = (0..50).map(|i| scope.event(&format!("t{}", i % 7))).collect();
    for chunk in stored.chunks(10) {
        store(&*provider, chunk, None);
    }
    let got = take(&*source, 50);
    assert_eq!(ids(&got), stored.iter().map(|e| e.id).collect::<Vec<_>>());
    ack_all(&*source, &got);
    source.close().expect("close");
}

/// What a member fetched and never acknowledged goes to another member once the claim idle time
/// has passed; what it acknowledged never does.
pub fn unacked_events_go_to_another_member_after_the_claim_idle_time(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let (p1, p2) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("workers"));
    let Some(doomed) = open(&*p1, &scope.name("m1"), &group, &scope.all()) else { return };
    let stored = events(&scope, "job", 4);
    store(&*p1, &stored, None);
    let fetched = take(&*doomed, 4);
    ack_all(&*doomed, &fetched[..1]);
    let fetched_at = Instant::now();
    drop(doomed); // Vanishes without closing: a crashed member.

    let survivor = open(&*p2, &scope.name("m2"), &group, &scope.all()).expect("a second member");
    let got = take(&*survivor, 3);
    assert!(fetched_at.elapsed() >= CLAIM_IDLE.mul_f32(0.9), "claimed before the idle time passed");
    assert_eq!(id_set(ids(&got)), id_set(ids(&fetched[1..])), "the unacked ones, and only those");
    assert!(got.iter().all(|e| e.deliveries >= 2), "redeliveries say so: {got:?}");
    ack_all(&*survivor, &got);
    assert_quiet(&*survivor, "after the claimed events were acked");
    survivor.close().expect("close");
}

/// `extend` restarts the claim idle time: an event extended in time is not claimed by another
/// member, while its unextended neighbour is.
pub fn extend_keeps_an_event_from_being_claimed(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let (p1, p2) = (backend.connect(), backend.connect());
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("workers"));
    let Some(slow) = open(&*p1, &scope.name("m1"), &group, &scope.all()) else { return };
    let stored = events(&scope, "job", 2);
    store(&*p1, &stored, None);
    let fetched = take(&*slow, 2);
    let other = open(&*p2, &scope.name("m2"), &group, &scope.all()).expect("a second member");

    let mut claimed = Vec::new();
    let until = Instant::now() + CLAIM_IDLE * 3;
    while Instant::now() < until {
        slow.extend(&[fetched[0].token]).expect("extend");
        claimed.extend(other.fetch(4, CLAIM_IDLE / 4).expect("fetch"));
    }
    assert_eq!(ids(&claimed), vec![fetched[1].event.id], "only the unextended event was claimed");
    ack_all(&*other, &claimed);
    ack_all(&*slow, &fetched[..1]);
    assert_quiet(&*other, "the extended event, once acked");
    slow.close().expect("close");
    other.close().expect("close");
}

/// A nak gives an event back: it comes again, to the same member, no sooner than the delay.
pub fn a_nak_redelivers_after_its_delay(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &scope.all()) else { return };
    let stored = events(&scope, "job", 1);
    store(&*provider, &stored, None);
    let first = take(&*source, 1);
    let delay = Duration::from_millis(500);
    let naked_at = Instant::now();
    source.nak(&[first[0].token], delay).expect("nak");

    let again = take(&*source, 1);
    assert!(naked_at.elapsed() >= delay.mul_f32(0.8), "redelivered after {:?}", naked_at.elapsed());
    assert_eq!(again[0].event.id, stored[0].id);
    assert!(again[0].deliveries >= 2);
    ack_all(&*source, &again);
    assert_quiet(&*source, "after the redelivery was acked");
    source.close().expect("close");
}

/// A fan-out instance restarted under the same id gets what its predecessor left unacknowledged,
/// then carries on with what came since; nothing acknowledged comes back.
pub fn a_restarted_instance_resumes_where_it_left_off(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let first_life = backend.connect();
    let Some(before) = open(&*first_life, &scope.name("a"), &scope.instance("a"), &scope.all()) else {
        return;
    };
    let stored = events(&scope, "job", 5);
    store(&*first_life, &stored, None);
    let fetched = take(&*before, 3);
    ack_all(&*before, &fetched[..1]);
    drop(before); // Crashed: never closed, two events unacknowledged.

    let second_life = backend.connect();
    let after = open(&*second_life, &scope.name("a"), &scope.instance("a"), &scope.all()).expect("reopen");
    let got = take(&*after, 4);
    let expected = id_set(stored[1..].iter().map(|e| e.id));
    assert_eq!(id_set(ids(&got)), expected, "the unacked and the unfetched, not the acked");
    assert_eq!(got.len(), 4, "each once");
    ack_all(&*after, &got);
    assert_quiet(&*after, "after everything was acked");
    after.close().expect("close");
}

/// A deleted group is gone with what its member left: deleting it again finds nothing, and a
/// source that opens it later starts at the end of history, without the old group's unacknowledged
/// or unfetched events. A backend without inbound sources says it cannot delete groups.
pub fn a_deleted_group_starts_afresh(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let provider = backend.connect();
    let group = scope.instance("a");
    let Some(first) = open(&*provider, &scope.name("a"), &group, &scope.all()) else {
        assert_not_supported(provider.delete_group(&group).map(drop), "delete_group");
        return;
    };
    let stored = events(&scope, "job", 4);
    store(&*provider, &stored, None);
    let fetched = take(&*first, 2);
    ack_all(&*first, &fetched[..1]);
    first.close().expect("close"); // One event unacknowledged, two never fetched.

    assert!(provider.delete_group(&group).expect("delete_group"), "the group existed");
    assert!(!provider.delete_group(&group).expect("delete_group again"), "and is gone");
    assert!(!provider.delete_group(&scope.instance("never")).expect("delete_group of none"));

    let again = open(&*provider, &scope.name("a"), &group, &scope.all()).expect("reopen");
    let later = events(&scope, "later", 1);
    store(&*provider, &later, None);
    let got = take(&*again, 1);
    assert_eq!(ids(&got), vec![later[0].id], "only what was stored after it was made again");
    ack_all(&*again, &got);
    assert_quiet(&*again, "the deleted group's events");
    again.close().expect("close");
}

/// The filter keeps unwanted events back for good; widening it lets later ones through.
pub fn the_filter_keeps_unwanted_events_back(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    let billing = scope.pattern("billing.>");
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &billing) else { return };
    let stored = [scope.event("billing.paid"), scope.event("users.created"), scope.event("billing.refunded")];
    store(&*provider, &stored, None);
    let got = take(&*source, 2);
    assert_eq!(ids(&got), vec![stored[0].id, stored[2].id]);
    ack_all(&*source, &got);
    assert_quiet(&*source, "an event no pattern wants");

    source.set_filter(&[scope.all()]).expect("widen the filter");
    let later = scope.event("users.deleted");
    store(&*provider, std::slice::from_ref(&later), None);
    let got = take(&*source, 1);
    assert_eq!(ids(&got), vec![later.id], "the earlier unwanted event stays skipped");
    ack_all(&*source, &got);
    source.set_filter(&[]).expect("want nothing");
    store(&*provider, &[scope.event("billing.paid")], None);
    assert_quiet(&*source, "an empty filter");
    source.close().expect("close");
}

/// A fetch waiting for events returns as soon as one arrives, not at the end of its wait.
pub fn a_waiting_fetch_wakes_when_an_event_arrives(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &scope.all()) else { return };
    let event = scope.event("wake");
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let started = Instant::now();
            let got = source.fetch(10, Duration::from_secs(20)).expect("fetch");
            (got, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        store(&*provider, std::slice::from_ref(&event), None);
        let (got, waited) = waiting.join().expect("the fetch does not panic");
        assert_eq!(ids(&got), vec![event.id]);
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
        ack_all(&*source, &got);
    });
    source.close().expect("close");
}

/// A closed source refuses every call with `Closed`; closing again is fine.
pub fn a_closed_source_refuses_every_call(backend: &dyn TestBackend) {
    let _shared = EXCLUSIVE.read();
    let provider = backend.connect();
    let scope = Scope::new();
    let Some(source) = open(&*provider, &scope.name("a"), &scope.instance("a"), &scope.all()) else { return };
    store(&*provider, &events(&scope, "job", 1), None);
    let got = take(&*source, 1);
    source.close().expect("close");
    source.close().expect("a second close is fine");
    let closed = |result: Result<(), crate::ProviderError>, operation: &str| match result {
        Err(error) => assert_eq!(error.kind(), &ProviderErrorKind::Closed, "{operation}: {error}"),
        Ok(()) => panic!("{operation} after close returned Ok"),
    };
    closed(source.fetch(1, Duration::ZERO).map(drop), "fetch");
    closed(source.ack(&[Ack::handled(got[0].token)]), "ack");
    closed(source.nak(&[got[0].token], Duration::ZERO), "nak");
    closed(source.extend(&[got[0].token]), "extend");
    closed(source.set_filter(&[scope.all()]), "set_filter");
}
