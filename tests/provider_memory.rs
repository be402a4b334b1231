//! The memory provider: the conformance suite, then what only the memory provider promises
//! (LRU eviction, expiry, bounds, lagging streams, closing under load).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::testing::conformance::Scope;
use eventbroker::{
    DeadLetter, DeadLetterFilter, Event, EventFilter, EventId, EventSink, EventSource, EventStatus,
    EventStore, MemoryConfig, MemoryProvider, Pattern, Provider, ProviderErrorKind, ReplayFrom, StatusUpdate,
    StreamError, SubscriptionId,
};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

eventbroker::conformance_suite!(memory, eventbroker::testing::conformance::MemoryBackend::new);

/// A memory provider without the cleanup thread, so tests decide when cleanup runs.
fn provider(max_events: usize) -> MemoryProvider {
    MemoryProvider::new(MemoryConfig { max_events, cleanup_interval: None, ..MemoryConfig::default() })
}

fn event(ty: &str) -> Arc<Event> {
    Arc::new(Event::new(EventSource::System, ty))
}

fn ago(secs: i64) -> Timestamp {
    Timestamp::now().checked_sub(SignedDuration::from_secs(secs)).expect("in range")
}

fn specific(provider: &MemoryProvider, key: &str) -> u64 {
    provider.stats().expect("stats").provider_specific[key].as_u64().expect("a count")
}

fn stored(provider: &MemoryProvider, id: EventId) -> bool {
    provider.get(id).expect("get").is_some()
}

/// One status batch with several updates of each event in it, over one shard and over many, with
/// more updates per shard than the provider applies at once: every event ends with its last
/// update's status, keeps a timestamp only an earlier one set, and the counts agree.
#[test]
fn a_status_batch_applies_each_events_updates_in_order() {
    for max_events in [1_000, 10_000] {
        // One shard below 4 096 events, 16 from there.
        let provider = provider(max_events);
        let events: Vec<Arc<Event>> = (0..600).map(|_| event("batch.order")).collect();
        provider.store_batch(&events, None).expect("store");
        let at = Timestamp::now();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut updates = Vec::new();
        let mut last: HashMap<EventId, EventStatus> = HashMap::new();
        for round in 0..3 {
            for e in &events {
                let status = EventStatus::ALL[rng.usize(..4)];
                let mut update = StatusUpdate::new(e.id, status);
                if round == 0 {
                    update = update.with_processed_at(at);
                }
                last.insert(e.id, status);
                updates.push(update);
            }
            rng.shuffle(&mut updates[round * events.len()..]);
        }
        provider.update_status_batch(&updates).expect("update");
        let mut counts: HashMap<EventStatus, u64> = HashMap::new();
        for e in &events {
            let got = provider.get(e.id).expect("get").expect("stored");
            assert_eq!(
                (got.status, got.processed_at),
                (last[&e.id], Some(at)),
                "event {} ({max_events})",
                e.id
            );
            *counts.entry(got.status).or_default() += 1;
        }
        let stats = provider.stats().expect("stats");
        let count = |status| counts.get(&status).copied().unwrap_or(0);
        assert_eq!(
            (stats.pending_events, stats.processing_events, stats.completed_events, stats.failed_events),
            (
                count(EventStatus::Pending),
                count(EventStatus::Processing),
                count(EventStatus::Completed),
                count(EventStatus::Failed)
            ),
            "{max_events}"
        );
    }
}

fn status_of(provider: &MemoryProvider, id: EventId) -> EventStatus {
    provider.get(id).expect("get").expect("stored").status
}

fn write_status(provider: &MemoryProvider, id: EventId, status: EventStatus) {
    provider.update_status_batch(&[StatusUpdate::new(id, status)]).expect("update");
}

/// Status updates written a few at a time may wait inside the provider before they are applied,
/// but every read sees them, and they apply in the order written, also around a batch large
/// enough to be applied at once.
#[test]
fn small_status_writes_are_seen_by_every_read_in_the_order_written() {
    for max_events in [1_000, 10_000] {
        let provider = provider(max_events);
        let events: Vec<Arc<Event>> = (0..300).map(|_| event("small.writes")).collect();
        provider.store_batch(&events, None).expect("store");
        let (first, second) = (events[0].id, events[1].id);

        write_status(&provider, first, EventStatus::Processing);
        assert_eq!(status_of(&provider, first), EventStatus::Processing, "get ({max_events})");
        write_status(&provider, first, EventStatus::Completed);
        assert_eq!(provider.stats().expect("stats").completed_events, 1, "stats ({max_events})");
        write_status(&provider, first, EventStatus::Failed);
        let failed = provider.list(&EventFilter::new().with_status(EventStatus::Failed)).expect("list");
        assert_eq!(failed.iter().map(|e| e.id).collect::<Vec<_>>(), [first], "list ({max_events})");
        write_status(&provider, first, EventStatus::Processing);
        let replayed = provider.replay(ReplayFrom::Beginning, None, 1).expect("replay").events;
        assert_eq!(replayed[0].event.status, EventStatus::Processing, "replay ({max_events})");

        // A small write, then a batch of every event (applied at once), then a small write again.
        write_status(&provider, first, EventStatus::Failed);
        let all: Vec<StatusUpdate> =
            events.iter().map(|e| StatusUpdate::new(e.id, EventStatus::Completed)).collect();
        provider.update_status_batch(&all).expect("update");
        write_status(&provider, second, EventStatus::Failed);
        assert_eq!(status_of(&provider, first), EventStatus::Completed, "{max_events}");
        assert_eq!(status_of(&provider, second), EventStatus::Failed, "{max_events}");
        let stats = provider.stats().expect("stats");
        assert_eq!((stats.completed_events, stats.failed_events), (299, 1), "{max_events}");
        assert_recount(&provider);
    }
}

/// Thousands of small status writes with no read between them, first interleaved with stores
/// (which apply what waits), then with no store either (the writer applies what waits): at the
/// end every event has its last status, on one shard and on many.
#[test]
fn small_status_writes_apply_in_order_with_no_read_between() {
    for max_events in [3_000, 10_000] {
        let provider = provider(max_events);
        let events: Vec<Arc<Event>> = (0..2_000).map(|_| event("unread.writes")).collect();
        let mut last = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            provider.store_batch(std::slice::from_ref(e), None).expect("store");
            write_status(&provider, e.id, EventStatus::Processing);
            last.insert(e.id, EventStatus::Processing);
            if i > 0 {
                let before = events[i - 1].id;
                let status = if i % 7 == 0 { EventStatus::Failed } else { EventStatus::Completed };
                write_status(&provider, before, status);
                last.insert(before, status);
            }
        }
        // No stores now: 3 000 more writes, each event's status changing in turn.
        for round in 0..3 {
            for e in events.iter().skip(round * 500).take(1_000) {
                let status = EventStatus::ALL[(round + 1) % 4];
                write_status(&provider, e.id, status);
                last.insert(e.id, status);
            }
        }
        for e in &events {
            assert_eq!(status_of(&provider, e.id), last[&e.id], "event {} ({max_events})", e.id);
        }
        let stats = provider.stats().expect("stats");
        let count = |status| last.values().filter(|&&s| s == status).count() as u64;
        assert_eq!(
            [stats.pending_events, stats.processing_events, stats.completed_events, stats.failed_events],
            EventStatus::ALL.map(count),
            "{max_events}"
        );
    }
}

/// Updates a store took from the queue and has applied only in part (a store applies a few at a
/// time) come before those written after them, and every read sees all of them: an event's
/// `processing` taken with the first store, its `completed` written after, ends `completed`.
#[test]
fn updates_taken_by_a_store_and_applied_in_part_keep_their_order() {
    for max_events in [2_000, 10_000] {
        let provider = provider(max_events);
        // 1 000 events: over 256 waiting on one shard and on each of a thread's two of sixteen.
        let events: Vec<Arc<Event>> = (0..1_000).map(|_| event("backlog.order")).collect();
        for e in &events {
            provider.store_batch(std::slice::from_ref(e), None).expect("store");
        }
        for e in &events {
            write_status(&provider, e.id, EventStatus::Processing);
        }
        // Stores now take what waits and apply a little of it each; more updates queue behind.
        let later: Vec<Arc<Event>> = (0..40).map(|_| event("backlog.later")).collect();
        for (i, e) in later.iter().enumerate() {
            provider.store_batch(std::slice::from_ref(e), None).expect("store");
            write_status(&provider, events[i].id, EventStatus::Completed);
        }
        for (i, e) in events.iter().enumerate() {
            let expected = if i < later.len() { EventStatus::Completed } else { EventStatus::Processing };
            assert_eq!(status_of(&provider, e.id), expected, "event {i} ({max_events})");
        }
        let stats = provider.stats().expect("stats");
        assert_eq!(
            [stats.pending_events, stats.processing_events, stats.completed_events],
            [40, 960, 40],
            "{max_events}"
        );
    }
}

/// Small writes waiting to be applied in their shards' queues apply before a large batch written
/// after them, which is applied at once (from 1 024 updates): each event ends with the batch's
/// status.
#[test]
fn waiting_updates_apply_before_a_large_batch_written_after_them() {
    const EVENTS: usize = 1_500;
    for max_events in [2_000, 10_000] {
        let provider = provider(max_events);
        let events: Vec<Arc<Event>> = (0..EVENTS).map(|_| event("queue.then.batch")).collect();
        provider.store_batch(&events, None).expect("store");
        for e in &events {
            write_status(&provider, e.id, EventStatus::Failed);
        }
        let batch: Vec<StatusUpdate> =
            events.iter().map(|e| StatusUpdate::new(e.id, EventStatus::Completed)).collect();
        provider.update_status_batch(&batch).expect("one large batch");
        for e in &events {
            assert_eq!(status_of(&provider, e.id), EventStatus::Completed, "{max_events}");
        }
        let stats = provider.stats().expect("stats");
        assert_eq!((stats.completed_events, stats.failed_events), (EVENTS as u64, 0), "{max_events}");
    }
}

/// Every field of an update survives its wait in the provider: error text, retry count and both
/// timestamps, and an update without error text clears the one before it, as `apply_to` does.
#[test]
fn waiting_updates_keep_every_field() {
    let provider = provider(100);
    let e = event("fields.kept");
    provider.store_batch(&[Arc::clone(&e)], None).expect("store");
    let (processed, failed, completed) = (ago(30), ago(20), ago(10));
    let first = StatusUpdate {
        error: "handler `audit` failed: timeout".into(),
        retry_count: 2,
        processed_at: Some(processed),
        completed_at: Some(failed),
        ..StatusUpdate::new(e.id, EventStatus::Failed)
    };
    provider.update_status_batch(&[first]).expect("update");
    let read = provider.get(e.id).expect("get").expect("stored");
    assert_eq!(read.status, EventStatus::Failed);
    assert_eq!(read.error, "handler `audit` failed: timeout");
    assert_eq!((read.retry_count, read.processed_at, read.completed_at), (2, Some(processed), Some(failed)));

    let second = StatusUpdate { retry_count: 3, ..StatusUpdate::new(e.id, EventStatus::Processing) };
    let third = StatusUpdate::new(e.id, EventStatus::Completed).with_completed_at(completed);
    provider.update_status_batch(&[second]).expect("update");
    provider.update_status_batch(&[third]).expect("update");
    let read = provider.get(e.id).expect("get").expect("stored");
    assert_eq!(read.status, EventStatus::Completed);
    assert_eq!(read.error, "", "an update without error text clears it");
    assert_eq!(read.retry_count, 0, "the retry count is the latest update's");
    assert_eq!(
        (read.processed_at, read.completed_at),
        (Some(processed), Some(completed)),
        "absent times are kept"
    );
}

/// An update written before an event was stored, or before it was stored again, never applies to
/// what was stored after it, however long it waited to be applied.
#[test]
fn a_status_write_never_applies_to_a_later_store() {
    let provider = provider(100);
    let e = event("later.store");
    write_status(&provider, e.id, EventStatus::Completed);
    provider.store_batch(&[Arc::clone(&e)], None).expect("store");
    assert_eq!(status_of(&provider, e.id), EventStatus::Pending, "written before the first store");

    write_status(&provider, e.id, EventStatus::Failed);
    provider.store_batch(&[Arc::clone(&e)], None).expect("store again");
    assert_eq!(status_of(&provider, e.id), EventStatus::Pending, "written before the second store");

    write_status(&provider, e.id, EventStatus::Completed);
    assert_eq!(status_of(&provider, e.id), EventStatus::Completed, "written after it");
    assert_eq!(provider.stats().expect("stats").completed_events, 1);
}

/// A status written on one thread is seen by a read on another that learns of the write after it
/// returned, as a worker's `completed` is by a caller polling `get`.
#[test]
fn a_status_written_on_one_thread_is_read_on_another() {
    let provider = provider(10_000);
    let (written, read) = std::sync::mpsc::sync_channel::<(EventId, EventStatus)>(0);
    thread::scope(|s| {
        let provider = &provider;
        s.spawn(move || {
            for i in 0..2_000 {
                let e = event("cross.thread");
                provider.store_batch(&[Arc::clone(&e)], None).expect("store");
                let status = EventStatus::ALL[1 + i % 3];
                write_status(provider, e.id, status);
                written.send((e.id, status)).expect("reader alive");
            }
        });
        for (id, status) in read {
            assert_eq!(status_of(provider, id), status);
        }
    });
}

#[test]
fn defaults_are_as_documented() {
    let config = MemoryConfig::default();
    assert_eq!(config.max_events, 10_000);
    assert_eq!(config.max_age, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(config.cleanup_interval, Some(Duration::from_secs(60)));
    assert_eq!(config.stream_capacity, 1024);
    assert_eq!(config.max_dead_letters, 10_000);
    assert_eq!(MemoryProvider::default().config(), &config);
}

#[test]
#[allow(clippy::many_single_char_names)] // a to f name the events in the order they are stored.
fn eviction_is_least_recently_used_not_first_stored() {
    let provider = provider(3);
    let [a, b, c, d, e, f] = ["a", "b", "c", "d", "e", "f"].map(event);
    provider.store_batch(&[a.clone(), b.clone(), c.clone()], None).expect("store");

    // A get refreshes `a`: `b` is now the least recently used. (FIFO would evict `a`.)
    assert!(provider.get(a.id).expect("get").is_some());
    provider.store_batch(std::slice::from_ref(&d), None).expect("store");
    assert_eq!(provider.list(&EventFilter::new()).expect("list").len(), 3);
    assert!(!stored(&provider, b.id), "b was least recently used");
    // These checks are gets, so they refresh too: from least to most recent it is now a, c, d.
    assert!(stored(&provider, a.id) && stored(&provider, c.id) && stored(&provider, d.id));

    // A status update does not count as use: updating `a` leaves it the least recent, so it goes.
    provider.update_status_batch(&[StatusUpdate::new(a.id, EventStatus::Processing)]).expect("update");
    provider.store_batch(std::slice::from_ref(&e), None).expect("store");
    assert!(!stored(&provider, a.id), "a was least recently used, its status update aside");

    // Storing again counts as use: re-storing `c` leaves `d` the least recent.
    provider.store_batch(std::slice::from_ref(&c), None).expect("store again");
    provider.store_batch(std::slice::from_ref(&f), None).expect("store");
    let left: Vec<EventId> = provider.list(&EventFilter::new()).expect("list").iter().map(|e| e.id).collect();
    assert_eq!(left, vec![c.id, e.id, f.id]);

    let stats = provider.stats().expect("stats");
    assert_eq!(stats.total_events, 3);
    assert_eq!(specific(&provider, "evicted"), 3);
    assert_eq!(specific(&provider, "replaced"), 1);
    assert_eq!(stats.events_published, 6);
}

/// The provider lets go of what it evicts by the time the store returns, over one shard and over
/// many, one event per store and many (a batch evicting more than a store holds at once): it keeps
/// a reference to exactly the events it holds.
#[test]
fn an_evicted_event_is_released_when_the_store_returns() {
    for max_events in [3, 100, 5_000] {
        let provider = provider(max_events);
        let events: Vec<Arc<Event>> = (0..3 * max_events).map(|_| event("a.x")).collect();
        let (singly, batched) = events.split_at(max_events);
        for e in singly {
            provider.store_batch(std::slice::from_ref(e), None).expect("store one");
        }
        provider.store_batch(batched, None).expect("store many");
        let held = events.iter().filter(|e| Arc::strong_count(e) > 1).count();
        assert!(events.iter().all(|e| Arc::strong_count(e) <= 2));
        assert_eq!(held, max_events, "the provider holds its bound's worth");
        assert_eq!(provider.stats().expect("stats").total_events, held as u64);
        assert_eq!(specific(&provider, "evicted"), (events.len() - held) as u64, "each evicted one released");
        assert!(events.iter().filter(|e| Arc::strong_count(e) > 1).all(|e| stored(&provider, e.id)));
    }
}

/// Stores `count` new events on a thread of their own, one per store; returns them.
fn store_on_a_thread(provider: &MemoryProvider, count: usize) -> Vec<Arc<Event>> {
    thread::scope(|s| {
        s.spawn(|| {
            (0..count)
                .map(|_| {
                    let e = event("lane.x");
                    provider.store_batch(std::slice::from_ref(&e), None).expect("store");
                    e
                })
                .collect()
        })
        .join()
        .expect("storing thread")
    })
}

/// Whether the provider holds `e`, told without a `get` (which would count as use).
fn held(e: &Arc<Event>) -> bool {
    Arc::strong_count(e) > 1
}

/// Stores `count` new events whose ids are in `lane` (the lane a thread's ids carry in their low
/// bits, 0 to 7: two of the 16 shards), one per store; returns them.
fn store_in_lane(provider: &MemoryProvider, lane: u128, count: usize) -> Vec<Arc<Event>> {
    (0..count)
        .map(|i| {
            let id = EventId::new().as_uuid().as_u128() & !0xF | lane << 1 | (i as u128 & 1);
            let e = Arc::new(Event {
                id: EventId::from_uuid(uuid::Uuid::from_u128(id)),
                ..Event::new(EventSource::System, "lane.x")
            });
            provider.store_batch(std::slice::from_ref(&e), None).expect("store");
            e
        })
        .collect()
}

/// The ids one thread makes fall into two of the 16 shards, but the bound is the provider's: one
/// lane alone keeps `max_events` of its events, the most recent; a second lane takes half the
/// room while the first still counts as storing, and the rest once the first has stored nothing
/// for `max_events` stores.
#[test]
fn the_bound_is_shared_by_the_shards_and_a_stopped_lanes_events_go() {
    let max_events = 10_000;
    // Shards this close in size evict their own (a sixty-fourth of the bound); the split of one
    // lane's events between its two shards is random, so allow a few times that.
    let slack = 4 * (max_events / 64);
    let provider = provider(max_events);
    let held_of = |events: &[Arc<Event>]| events.iter().filter(|e| held(e)).count();
    let total = || usize::try_from(provider.stats().expect("stats").total_events).expect("a count");

    let first = store_in_lane(&provider, 3, max_events + 4_000);
    assert_full(total(), max_events);
    assert_eq!(held_of(&first), total());
    assert!(first[first.len() - (max_events - slack)..].iter().all(held), "one lane's most recent are kept");

    let second = store_in_lane(&provider, 6, max_events / 2);
    assert_full(total(), max_events);
    assert_eq!(held_of(&first) + held_of(&second), total());
    assert!(held_of(&second) >= max_events / 2 - slack, "the second lane took half: {}", held_of(&second));
    assert!(held_of(&first) >= max_events / 2 - slack, "the first lane kept half: {}", held_of(&first));

    let more = store_in_lane(&provider, 6, 2 * max_events);
    assert_full(total(), max_events);
    assert_eq!(held_of(&first), 0, "the first lane's events went once they were stale");
    assert!(more[more.len() - (max_events - slack)..].iter().all(held), "the latest are kept");
    let evicted = first.len() + second.len() + more.len() - total();
    assert_eq!(specific(&provider, "evicted"), evicted as u64);
}

/// A filled provider holds `max_events`, or up to 15 fewer just after a store took 16 events from
/// another shard at once (the next stores fill that room without evicting).
fn assert_full(total: usize, max_events: usize) {
    assert!(
        (max_events - 15..=max_events).contains(&total),
        "{total} events held; the bound is {max_events}"
    );
}

/// Threads storing at once never take the provider past its bound, and what deletes remove makes
/// room that stores take before evicting anything.
#[test]
fn concurrent_stores_keep_the_bound_and_removals_make_room() {
    let max_events = 8_000;
    let provider = provider(max_events);
    let total = || usize::try_from(provider.stats().expect("stats").total_events).expect("a count");
    let stored: Vec<Arc<Event>> = thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| store_on_a_thread(&provider, 5_000))).collect();
        handles.into_iter().flat_map(|h| h.join().expect("storing thread")).collect()
    });
    let before = total();
    assert_full(before, max_events);
    assert_eq!(stored.iter().filter(|e| held(e)).count(), before);
    let evicted = specific(&provider, "evicted");
    assert_eq!(evicted, (stored.len() - before) as u64);

    let deleted: Vec<EventId> = stored.iter().filter(|e| held(e)).take(100).map(|e| e.id).collect();
    for &id in &deleted {
        assert!(provider.delete(id).expect("delete"));
    }
    assert_eq!(total(), before - 100);
    let more = store_on_a_thread(&provider, 100 + max_events - before);
    assert!(more.iter().all(held));
    assert_eq!(specific(&provider, "evicted"), evicted, "the deletes made room");
    assert_eq!(total(), max_events);
    store_on_a_thread(&provider, 1);
    assert_full(total(), max_events);
    let now_evicted = specific(&provider, "evicted");
    assert!((evicted + 1..=evicted + 16).contains(&now_evicted), "full again: {now_evicted} evicted");
}

#[test]
fn list_and_replay_do_not_refresh_recency() {
    let provider = provider(2);
    let [a, b, c] = ["a", "b", "c"].map(event);
    provider.store_batch(&[a.clone(), b.clone()], None).expect("store");
    provider.list(&EventFilter::new()).expect("list");
    provider.replay(ReplayFrom::Beginning, None, 10).expect("replay");
    provider.store_batch(&[c], None).expect("store");
    assert!(!stored(&provider, a.id));
    assert!(stored(&provider, b.id));
}

#[test]
fn max_events_zero_keeps_nothing_but_streams_still_see_events() {
    let provider = provider(0);
    let mut stream = provider.stream(&Pattern::parse("*").expect("pattern")).expect("stream");
    let e = event("gone.at.once");
    provider.store_batch(std::slice::from_ref(&e), None).expect("store");
    assert!(!stored(&provider, e.id));
    assert_eq!(stream.try_recv().expect("delivered").id, e.id);
    assert_eq!(provider.stats().expect("stats").total_events, 0);

    // The bus's log shares the bound, as `MemoryConfig::max_events` says: groups get nothing.
    let group = eventbroker::ConsumerGroup::Instance("zero".into());
    let source = provider.open_inbound(&eventbroker::InboundConfig::new("zero", group)).expect("open");
    provider.store_batch(&[event("gone.for.groups")], None).expect("store");
    assert!(source.fetch(8, Duration::ZERO).expect("fetch").is_empty());
    assert_eq!(specific(&provider, "bus_lost"), 1);
}

#[test]
fn cleanup_now_removes_only_old_finished_events() {
    let provider = MemoryProvider::new(MemoryConfig {
        max_age: Some(Duration::from_secs(3600)),
        cleanup_interval: None,
        ..MemoryConfig::default()
    });
    let make = |status, created_at| {
        let mut e = Event::new(EventSource::System, "jobs.run");
        e.status = status;
        e.created_at = created_at;
        e
    };
    let old: Vec<Event> = EventStatus::ALL.into_iter().map(|s| make(s, ago(2 * 3600))).collect();
    let fresh: Vec<Event> = EventStatus::ALL.into_iter().map(|s| make(s, ago(60))).collect();
    let all: Vec<Arc<Event>> = old.iter().chain(&fresh).cloned().map(Arc::new).collect();
    provider.store_batch(&all, None).expect("store");

    assert_eq!(provider.cleanup_now().expect("cleanup"), 2);
    for (e, held) in old.iter().zip(&all) {
        assert_eq!(stored(&provider, e.id), !e.status.is_terminal(), "{}", e.status);
        let references = if e.status.is_terminal() { 1 } else { 2 };
        assert_eq!(Arc::strong_count(held), references, "an expired event is let go of");
    }
    assert!(fresh.iter().all(|e| stored(&provider, e.id)));
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.completed_events, stats.failed_events), (6, 1, 1));
    assert_eq!(specific(&provider, "expired"), 2);
    assert_eq!(provider.cleanup_now().expect("cleanup again"), 0);

    // An event finished later expires on the next pass.
    provider.update_status_batch(&[StatusUpdate::new(old[0].id, EventStatus::Completed)]).expect("update");
    assert_eq!(provider.cleanup_now().expect("cleanup"), 1);
    assert_eq!(Arc::strong_count(&all[0]), 1);

    // A deleted event is let go of too.
    assert!(provider.delete(fresh[0].id).expect("delete"));
    assert_eq!(Arc::strong_count(&all[old.len()]), 1);

    provider.close().expect("close");
    assert_eq!(provider.cleanup_now().expect_err("closed").kind(), &ProviderErrorKind::Closed);
}

#[test]
fn cleanup_without_max_age_removes_nothing() {
    let provider = MemoryProvider::new(MemoryConfig { max_age: None, ..MemoryConfig::default() });
    let mut e = Event::new(EventSource::System, "jobs.run");
    e.status = EventStatus::Completed;
    e.created_at = ago(365 * 24 * 3600);
    provider.store_batch(&[Arc::new(e)], None).expect("store");
    assert_eq!(provider.cleanup_now().expect("cleanup"), 0);
}

#[test]
fn the_cleanup_thread_expires_events_on_its_own() {
    let provider = MemoryProvider::new(MemoryConfig {
        max_age: Some(Duration::from_secs(3600)),
        cleanup_interval: Some(Duration::from_millis(10)),
        ..MemoryConfig::default()
    });
    let mut e = Event::new(EventSource::System, "jobs.run");
    e.status = EventStatus::Failed;
    e.created_at = ago(2 * 3600);
    provider.store_batch(&[Arc::new(e.clone())], None).expect("store");

    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.list(&EventFilter::new()).expect("list").len() == 1 {
        assert!(Instant::now() < deadline, "the cleanup thread did not run");
        thread::sleep(Duration::from_millis(5));
    }
    // The thread names itself once running; it is running now. Linux keeps 15 bytes of a name.
    #[cfg(target_os = "linux")]
    assert!(thread_names().iter().any(|name| name == "eventbroker-mem"), "{:?}", thread_names());
    assert_eq!(specific(&provider, "expired"), 1);
}

#[cfg(target_os = "linux")]
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

#[test]
fn close_and_drop_do_not_wait_for_the_cleanup_tick() {
    let config =
        MemoryConfig { cleanup_interval: Some(Duration::from_secs(3600)), ..MemoryConfig::default() };
    let started = Instant::now();
    let closed = MemoryProvider::new(config.clone());
    closed.close().expect("close");
    drop(closed);
    drop(MemoryProvider::new(config));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn dead_letters_are_bounded_dropping_the_earliest_failed() {
    let provider = MemoryProvider::new(MemoryConfig { max_dead_letters: 3, ..MemoryConfig::default() });
    let letters: Vec<DeadLetter> = (0..5)
        .map(|i| {
            let mut letter = DeadLetter::new(
                Event::new(EventSource::System, "mail.send"),
                SubscriptionId::from_raw(1),
                "mail.*",
                "boom",
                3,
            );
            letter.failed_at = ago(100 - i);
            letter
        })
        .collect();
    // Stored newest first, so the bound has to look at failed_at, not arrival.
    let newest_first: Vec<DeadLetter> = letters.iter().rev().cloned().collect();
    provider.store_dead_letters(&newest_first[..2]).expect("store");
    provider.store_dead_letters(&newest_first[2..]).expect("store");

    let kept = provider.list_dead_letters(&DeadLetterFilter::new()).expect("list");
    assert_eq!(kept, letters[2..].to_vec());
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.dead_letters, 3);
    assert_eq!(specific(&provider, "dead_letters_dropped"), 2);
}

#[test]
fn a_full_stream_lags_at_the_exact_place_of_the_gap() {
    let provider = MemoryProvider::new(MemoryConfig { stream_capacity: 2, ..MemoryConfig::default() });
    let mut stream = provider.stream(&Pattern::parse("t.>").expect("pattern")).expect("stream");
    let e: Vec<Arc<Event>> = (0..8).map(|_| event("t.x")).collect();

    provider.store_batch(&e[..3], None).expect("store"); // e2 does not fit
    assert_eq!(stream.recv().expect("e0").id, e[0].id);
    provider.store_batch(&e[3..5], None).expect("store"); // e3 fits, e4 does not
    assert_eq!(stream.recv().expect("e1").id, e[1].id);
    assert_eq!(stream.recv(), Err(StreamError::Lagged(1)), "e2 was missed before e3");
    assert_eq!(stream.recv().expect("e3").id, e[3].id);
    assert_eq!(stream.try_recv(), Err(StreamError::Lagged(1)), "e4 was missed at the end");
    assert_eq!(stream.try_recv(), Err(StreamError::Empty));
    provider.store_batch(&e[5..], None).expect("store"); // e5, e6 fit, e7 does not
    provider.close().expect("close");
    assert_eq!(stream.recv().expect("e5").id, e[5].id);
    assert_eq!(stream.recv().expect("e6").id, e[6].id);
    assert_eq!(stream.recv(), Err(StreamError::Lagged(1)), "a trailing gap is reported before the end");
    assert_eq!(stream.recv(), Err(StreamError::Closed));
}

#[test]
fn a_stream_nobody_reads_never_blocks_the_provider() {
    let provider = MemoryProvider::new(MemoryConfig { stream_capacity: 1, ..MemoryConfig::default() });
    let mut stream = provider.stream(&Pattern::parse("*").expect("pattern")).expect("stream");
    let events: Vec<Arc<Event>> = (0..10_000).map(|_| event("flood.x")).collect();
    let started = Instant::now();
    provider.store_batch(&events, None).expect("store");
    assert!(started.elapsed() < Duration::from_secs(5));

    assert_eq!(specific(&provider, "streams_missed"), 9_999);
    assert_eq!(provider.stats().expect("stats").events_consumed, 1);
    assert_eq!(stream.recv().expect("first").id, events[0].id);
    assert_eq!(stream.recv(), Err(StreamError::Lagged(9_999)));
    assert_eq!(stream.try_recv(), Err(StreamError::Empty));
}

#[test]
fn close_never_hangs_with_streams_in_every_state() {
    let provider =
        Arc::new(MemoryProvider::new(MemoryConfig { stream_capacity: 2, ..MemoryConfig::default() }));
    let all = Pattern::parse("*").expect("pattern");
    let mut full = provider.stream(&all).expect("stream");
    let mut blocked = provider.stream(&Pattern::parse("never.>").expect("pattern")).expect("stream");
    let mut awaiting = provider.stream(&Pattern::parse("never.>").expect("pattern")).expect("stream");
    let iterated = provider.stream(&all).expect("stream");
    drop(provider.stream(&all).expect("stream")); // a dropped receiver
    provider.store_batch(&(0..10).map(|_| event("load.x")).collect::<Vec<_>>(), None).expect("store");

    let blocked = thread::spawn(move || blocked.recv());
    let awaiting = thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(awaiting.recv_async())
    });
    let iterated = thread::spawn(move || iterated.count());
    thread::sleep(Duration::from_millis(50));

    let started = Instant::now();
    provider.close().expect("close");
    assert!(started.elapsed() < Duration::from_secs(1), "close took {:?}", started.elapsed());
    assert_eq!(blocked.join().expect("no panic"), Err(StreamError::Closed));
    assert_eq!(awaiting.join().expect("no panic"), Err(StreamError::Closed));
    assert_eq!(iterated.join().expect("no panic"), 3, "two events, one lag report, then the end");
    assert_eq!(full.recv().map(|e| e.event_type.to_string()), Ok("load.x".to_owned()));
    assert_eq!(full.recv().map(|e| e.event_type.to_string()), Ok("load.x".to_owned()));
    assert_eq!(full.recv(), Err(StreamError::Lagged(8)));
    assert_eq!(full.recv(), Err(StreamError::Closed));
}

#[test]
fn threads_storing_updating_and_reading_at_once_stay_consistent() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 200;
    let provider = MemoryProvider::new(MemoryConfig {
        max_events: 500,
        stream_capacity: THREADS * ROUNDS * 20,
        cleanup_interval: Some(Duration::from_millis(1)),
        max_age: Some(Duration::from_secs(60)),
        ..MemoryConfig::default()
    });
    let mut stream = provider.stream(&Pattern::parse("smoke.>").expect("pattern")).expect("stream");
    thread::scope(|s| {
        for t in 0..THREADS {
            let provider = &provider;
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let batch: Vec<Arc<Event>> = (0..20)
                        .map(|i| {
                            let mut e = Event::new(EventSource::System, format!("smoke.t{t}.r{}", round % 4));
                            e.user_id = i64::from(i);
                            if i % 5 == 0 {
                                e.created_at = ago(3600); // expires once finished
                            }
                            Arc::new(e)
                        })
                        .collect();
                    provider.store_batch(&batch, None).expect("store");
                    let updates: Vec<StatusUpdate> = batch
                        .iter()
                        .enumerate()
                        .map(|(i, e)| StatusUpdate::new(e.id, EventStatus::ALL[(i + round) % 4]))
                        .collect();
                    provider.update_status_batch(&updates).expect("update");
                    provider.get(batch[3].id).expect("get");
                    provider.delete(batch[7].id).expect("delete");
                    let listed = provider
                        .list(&EventFilter::new().with_status(EventStatus::Completed).with_limit(50))
                        .expect("list");
                    assert!(listed.iter().all(|e| e.status == EventStatus::Completed));
                    assert!(
                        listed.windows(2).all(|w| (w[0].created_at, w[0].id) < (w[1].created_at, w[1].id))
                    );
                    provider.stats().expect("stats");
                }
            });
        }
    });

    // The cleanup thread goes on expiring the last rounds' finished events: expire them all now,
    // so that nothing changes between the counts and the recount below.
    provider.cleanup_now().expect("cleanup");
    let stats = provider.stats().expect("stats");
    let all = provider.list(&EventFilter::new()).expect("list");
    assert!(all.len() <= 500);
    assert_recount(&provider);
    assert_eq!(stats.events_published, (THREADS * ROUNDS * 20) as u64);

    // The stream saw every event, each thread's in the order the provider sequenced them (the
    // documented order: store order per storing thread; two threads' stores may reach the stream
    // in either order).
    let streamed: Vec<Arc<Event>> = std::iter::from_fn(|| stream.try_recv().ok()).collect();
    assert_eq!(streamed.len(), THREADS * ROUNDS * 20);
    let seqs: HashMap<EventId, u64> = provider
        .replay(ReplayFrom::Beginning, None, usize::MAX)
        .expect("replay")
        .events
        .into_iter()
        .map(|s| (s.event.id, s.seq))
        .collect();
    for t in 0..THREADS {
        let thread_type = format!("smoke.t{t}.");
        let in_stream_order: Vec<u64> = streamed
            .iter()
            .filter(|e| e.event_type.starts_with(&thread_type))
            .filter_map(|e| seqs.get(&e.id).copied())
            .collect();
        assert!(in_stream_order.windows(2).all(|w| w[0] < w[1]), "thread {t}: stream order is store order");
    }
}

/// The stats' counts equal a recount of what `list` returns.
fn assert_recount(provider: &MemoryProvider) {
    let stats = provider.stats().expect("stats");
    let all = provider.list(&EventFilter::new()).expect("list");
    assert_eq!(stats.total_events, all.len() as u64);
    for status in EventStatus::ALL {
        let recount = all.iter().filter(|e| e.status == status).count() as u64;
        assert_eq!(stats.count(status), recount, "{status}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Store(usize, EventStatus),
    Update(usize, EventStatus),
    Get(usize),
    Delete(usize),
    Cleanup,
    /// Compares everything with the model. Only reads apply the status updates written before
    /// them (the provider may keep small writes waiting), so between checks they pile up.
    Check,
}

fn op() -> impl Strategy<Value = Op> {
    let status = prop::sample::select(EventStatus::ALL.to_vec());
    prop_oneof![
        4 => (0..POOL, status.clone()).prop_map(|(i, s)| Op::Store(i, s)),
        3 => (0..POOL, status).prop_map(|(i, s)| Op::Update(i, s)),
        2 => (0..POOL).prop_map(Op::Get),
        1 => (0..POOL).prop_map(Op::Delete),
        1 => Just(Op::Cleanup),
        2 => Just(Op::Check),
    ]
}

const POOL: usize = 12;
const MAX_EVENTS: usize = 5;

proptest! {
    /// Against a model (a recency-ordered list): after any sequence of operations the provider
    /// holds exactly the model's events with the model's statuses, evicts the model's least
    /// recently used, expires what the model expires, and its stats equal a recount. An update
    /// of an event not stored is ignored, even when the event is stored before anything reads.
    #[test]
    fn matches_an_lru_model(ops in prop::collection::vec(op(), 1..60)) {
        let provider = MemoryProvider::new(MemoryConfig {
            max_events: MAX_EVENTS,
            max_age: Some(Duration::from_secs(3600)),
            cleanup_interval: None,
            ..MemoryConfig::default()
        });
        let pool: Vec<Event> = (0..POOL)
            .map(|i| {
                let mut e = Event::new(EventSource::System, format!("model.e{i}"));
                e.created_at = ago(if i % 3 == 0 { 7200 } else { 60 });
                e
            })
            .collect();
        // Most recently used last.
        let mut model: Vec<Event> = Vec::new();
        let (mut evicted, mut expired) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Store(i, status) => {
                    let mut e = pool[i].clone();
                    e.status = status;
                    provider.store_batch(&[Arc::new(e.clone())], None).expect("store");
                    model.retain(|m| m.id != e.id);
                    model.push(e);
                    while model.len() > MAX_EVENTS {
                        model.remove(0);
                        evicted += 1;
                    }
                }
                Op::Update(i, status) => {
                    provider.update_status_batch(&[StatusUpdate::new(pool[i].id, status)]).expect("update");
                    // An update does not count as use: the event keeps its place.
                    if let Some(e) = model.iter_mut().find(|m| m.id == pool[i].id) {
                        e.status = status;
                    }
                }
                Op::Get(i) => {
                    let got = provider.get(pool[i].id).expect("get");
                    let at = model.iter().position(|m| m.id == pool[i].id);
                    prop_assert_eq!(got.as_ref(), at.map(|at| &model[at]));
                    if let Some(at) = at {
                        let e = model.remove(at);
                        model.push(e);
                    }
                }
                Op::Delete(i) => {
                    let existed = model.iter().any(|m| m.id == pool[i].id);
                    prop_assert_eq!(provider.delete(pool[i].id).expect("delete"), existed);
                    model.retain(|m| m.id != pool[i].id);
                }
                Op::Cleanup => {
                    let cutoff = ago(3600);
                    let before = model.len();
                    model.retain(|m| !(m.status.is_terminal() && m.created_at < cutoff));
                    let removed = before - model.len();
                    expired += removed as u64;
                    prop_assert_eq!(provider.cleanup_now().expect("cleanup"), removed);
                }
                Op::Check => check(&provider, &model, evicted, expired)?,
            }
        }
        check(&provider, &model, evicted, expired)?;
    }
}

fn check(
    provider: &MemoryProvider,
    model: &[Event],
    evicted: u64,
    expired: u64,
) -> Result<(), TestCaseError> {
    let mut expected = model.to_vec();
    expected.sort_by_key(|e| (e.created_at, e.id));
    prop_assert_eq!(provider.list(&EventFilter::new()).expect("list"), expected);
    assert_recount(provider);
    prop_assert_eq!(specific(provider, "evicted"), evicted);
    prop_assert_eq!(specific(provider, "expired"), expired);
    Ok(())
}

// Streams: local tailing of what this provider stores (`MemoryProvider::stream`).

const STREAM_WAIT: Duration = Duration::from_secs(5);

#[test]
fn a_stream_receives_matching_new_events_in_order() {
    let provider = &MemoryProvider::default();
    let scope = Scope::new();
    let before = scope.event("orders.created");
    provider.store_batch(&[Arc::new(before)], None).expect("store before the stream opens");

    let mut stream = provider.stream(&scope.pattern("orders.>")).expect("stream");
    let mut orders = vec![scope.event("orders.created"), scope.event("orders.paid.late")];
    orders[0].set_payload_json(r#"{"total": 10.50}"#).expect("valid JSON");
    let other = scope.event("users.created");
    provider.store_batch(&shared(&[orders[0].clone(), other, orders[1].clone()]), None).expect("store");
    orders.push(scope.event("orders.shipped"));
    provider.store_batch(&[Arc::new(orders[2].clone())], None).expect("store");
    // A re-store is not a new event; the stream does not see it again.
    provider.store_batch(&[Arc::new(orders[0].clone())], None).expect("store again");
    orders.push(scope.event("orders.closed"));
    provider.store_batch(&[Arc::new(orders[3].clone())], None).expect("store");

    for order in &orders {
        let got = stream.recv_timeout(STREAM_WAIT).expect("a matching event");
        assert_eq!(&*got, order);
    }
    assert_eq!(stream.recv_timeout(Duration::from_millis(200)), Err(StreamError::Timeout), "nothing else");
    assert_eq!(stream.try_recv(), Err(StreamError::Empty));
}

#[test]
fn a_stream_receives_in_async_code() {
    let provider = &MemoryProvider::default();
    let scope = Scope::new();
    let mut stream = provider.stream(&scope.all()).expect("stream");
    let event = scope.event("async.tick");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(50)); // Let the receiver wait first.
            provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
        });
        let got = runtime
            .block_on(async { tokio::time::timeout(STREAM_WAIT, stream.recv_async()).await })
            .expect("in time")
            .expect("an event");
        assert_eq!(*got, event);
    });
}

#[test]
fn close_ends_streams_after_what_they_buffered() {
    let provider = &MemoryProvider::default();
    let scope = Scope::new();
    let mut buffered = provider.stream(&scope.all()).expect("stream");
    let mut waiting = provider.stream(&scope.pattern("never")).expect("stream");
    let event = scope.event("close.tick");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");

    thread::scope(|s| {
        let blocked = s.spawn(move || waiting.recv());
        thread::sleep(Duration::from_millis(20)); // Usually blocked in `recv` by now.
        provider.close().expect("close");
        assert_eq!(
            blocked.join().expect("no panic"),
            Err(StreamError::Closed),
            "a blocked receiver wakes up"
        );
    });
    provider.close().expect("a second close is fine");
    assert_eq!(provider.stream(&scope.all()).map(drop).unwrap_err().kind(), &ProviderErrorKind::Closed);

    // Closing ends the open stream after what it had buffered.
    assert_eq!(buffered.recv_timeout(STREAM_WAIT).as_deref(), Ok(&event));
    assert_eq!(buffered.recv_timeout(STREAM_WAIT), Err(StreamError::Closed));
    assert_eq!(buffered.try_recv(), Err(StreamError::Closed), "and stays ended");
}

fn shared(events: &[Event]) -> Vec<Arc<Event>> {
    events.iter().cloned().map(Arc::new).collect()
}

/// The bus refuses to delete a group while a broker of it runs, and deletes it once that broker
/// has shut down.
#[test]
fn a_group_with_a_running_broker_is_not_deleted() {
    let bus = Arc::new(MemoryProvider::default());
    let group = eventbroker::ConsumerGroup::Instance("delete-me".into());
    let broker =
        eventbroker::Broker::builder().provider(bus.clone()).instance_id("delete-me").build().unwrap();
    let err = bus.delete_group(&group).expect_err("a member is open");
    assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(m) if m.contains("delete-me")), "{err}");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
    assert!(bus.delete_group(&group).unwrap());
    assert!(!bus.delete_group(&group).unwrap());
}

/// A member whose source was dropped without being closed vanished, as a crashed process does:
/// what it was handed stays its own until the claim lapses, and then goes to the next member,
/// but it no longer counts as open, and the group can be deleted.
#[test]
fn a_member_dropped_unclosed_no_longer_holds_its_group() {
    use eventbroker::{ConsumerGroup, InboundConfig};
    let provider = provider(1_000);
    let group = ConsumerGroup::Shared("vanishing".into());
    let config = InboundConfig::new("vanishing-1", group.clone()).with_claim_idle(Duration::from_millis(100));
    let vanished = provider.open_inbound(&config).expect("open");
    let news = event("news.x");
    provider.store_batch(std::slice::from_ref(&news), None).expect("store");
    assert_eq!(vanished.fetch(8, Duration::from_secs(5)).expect("fetch").len(), 1);
    drop(vanished);
    assert_eq!(provider.stats().expect("stats").active_subscribers, 0);

    let next = provider
        .open_inbound(
            &InboundConfig::new("vanishing-2", group.clone()).with_claim_idle(Duration::from_millis(100)),
        )
        .expect("open");
    let started = std::time::Instant::now();
    let got = next.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(got.iter().map(|e| e.event.id).collect::<Vec<_>>(), [news.id]);
    assert!(started.elapsed() >= Duration::from_millis(50), "taken over only once its claim lapsed");
    next.ack(&[eventbroker::Ack::handled(got[0].token)]).expect("ack");
    next.close().expect("close");
    assert!(provider.delete_group(&group).expect("no open member is left"));
}

/// Pages of a replay from a time hold the events created at or after it on every page, not only
/// on the first: an event created earlier but stored later is left out whatever the page size.
#[test]
fn replay_pages_from_a_time_filter_every_page() {
    use eventbroker::provider::ProviderExt;

    let provider = MemoryProvider::default();
    let at = Timestamp::now();
    let recent = |n: i64| Event {
        created_at: at + SignedDuration::from_secs(n),
        ..Event::new(EventSource::System, "paged.x")
    };
    let old = Event {
        created_at: at - SignedDuration::from_secs(60),
        ..Event::new(EventSource::System, "paged.x")
    };
    for event in [recent(1), recent(2), old.clone(), recent(3)] {
        provider.store_one(&event).unwrap();
    }
    for page_size in [1, 2, 3, 10] {
        let replayed: Vec<Event> = provider
            .replay_pages(ReplayFrom::Time(at), None, page_size)
            .flat_map(|page| page.unwrap())
            .map(|stored| stored.event)
            .collect();
        assert_eq!(replayed.len(), 3, "page size {page_size}: {replayed:?}");
        assert!(replayed.iter().all(|event| event.id != old.id), "page size {page_size}");
    }
}

/// An event of type `ty` whose id puts it in shard `shard` (of 16, from 4 096 events up).
fn in_shard(shard: u128, ty: &str) -> Arc<Event> {
    let id = EventId::new().as_uuid().as_u128() & !0xF | shard;
    Arc::new(Event {
        id: EventId::from_uuid(uuid::Uuid::from_u128(id)),
        ..Event::new(EventSource::System, ty)
    })
}

/// Paging by sequence while another thread stores never steps over an event: the shards are read
/// one after another, and a store into shard 0, read already, takes a lower number than the one
/// into shard 15 stored just after it and read later.
#[test]
fn replay_paging_while_events_are_stored_returns_every_event() {
    let provider = Arc::new(provider(1_000_000));
    // Events in a middle shard of another type, which the reader scans between shards 0 and 15.
    let filler: Vec<_> = (0..20_000).map(|_| in_shard(7, "b.x")).collect();
    provider.store_batch(&filler, None).unwrap();
    let pattern = Pattern::parse("a.x").unwrap();
    let writer = {
        let provider = Arc::clone(&provider);
        thread::spawn(move || {
            for _ in 0..3_000 {
                provider.store_batch(&[in_shard(0, "a.x"), in_shard(15, "a.x")], None).unwrap();
            }
        })
    };
    let mut seen = std::collections::HashSet::new();
    let mut from = ReplayFrom::Beginning;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let finished = writer.is_finished();
        let page = provider.replay(from, Some(&pattern), 64).unwrap();
        if let Some(next) = page.next {
            from = ReplayFrom::Sequence(next);
        }
        seen.extend(page.events.into_iter().map(|stored| stored.event.id));
        if finished && page.end {
            break;
        }
        assert!(Instant::now() < deadline, "paging did not catch up with 6 000 stores");
    }
    writer.join().unwrap();
    let all = provider.replay(ReplayFrom::Beginning, Some(&pattern), usize::MAX).unwrap().events;
    assert_eq!(all.len(), 6_000);
    let missed: Vec<u64> = all.iter().filter(|s| !seen.contains(&s.event.id)).map(|s| s.seq).collect();
    assert!(
        missed.is_empty(),
        "{} events never came in a page, at {:?}",
        missed.len(),
        &missed[..missed.len().min(8)]
    );
}

/// A list by status returns each event with the status it was selected by, while the broker's
/// workers write statuses (without the shard's lock) as it reads.
#[test]
fn a_list_by_status_returns_only_events_of_that_status_while_workers_write() {
    let memory = Arc::new(MemoryProvider::default());
    let broker = eventbroker::Broker::builder().provider(memory.clone()).build().unwrap();
    broker.subscribe_infallible("load.>", |_: &Event| {}).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (broker, stop) = (broker.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            for _ in 0..200_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let _ = broker.publish(Event::new(EventSource::Internal, "load.x"));
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(2);
    let (mut wrong, mut lists) = (0, 0);
    while Instant::now() < until && wrong == 0 {
        for status in [EventStatus::Pending, EventStatus::Processing] {
            let listed = memory.list(&EventFilter::new().with_status(status)).unwrap();
            wrong += listed.iter().filter(|e| e.status != status).count();
            lists += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().unwrap();
    assert_eq!(wrong, 0, "events listed under a status they did not have ({lists} lists)");
    assert!(broker.shutdown(Duration::from_secs(5)).is_clean());
}

/// A replay cursor kept as JSON reads back the same, and one read from a time keeps that time
/// even when the text leaves it out.
#[test]
fn a_replay_cursor_read_back_keeps_its_time() {
    let since = ago(60);
    let cursor = eventbroker::ReplayCursor::from(ReplayFrom::Time(since)).at_sequence(42);
    let json = serde_json::to_string(&cursor).unwrap();
    assert_eq!(serde_json::from_str::<eventbroker::ReplayCursor>(&json).unwrap(), cursor);
    let bare = serde_json::json!({ "position": { "time": since }, "not_before": null });
    let read: eventbroker::ReplayCursor = serde_json::from_value(bare).unwrap();
    assert_eq!((read.position(), read.not_before()), (ReplayFrom::Time(since), Some(since)));
}

/// A work-queue member that gives an event back for a pattern it no longer wants (it unsubscribed)
/// leaves it to the other members: its own fetches pass it over, another member's takes it, as a
/// redelivery. Taken back, it would be acknowledged as unwanted and lost to the group.
#[test]
fn a_work_queue_member_leaves_what_it_gave_back_unwanted_to_the_others() {
    use eventbroker::{ConsumerGroup, InboundConfig};
    let provider = provider(1_000);
    let group = ConsumerGroup::Shared("give-back".into());
    let open = |name: &str, patterns: &[&str]| {
        let source = provider.open_inbound(&InboundConfig::new(name, group.clone())).expect("open");
        let patterns: Vec<Pattern> = patterns.iter().map(|p| Pattern::parse(p).expect("pattern")).collect();
        source.set_filter(&patterns).expect("set_filter");
        source
    };
    let leaving = open("leaving", &["jobs.>", "other.>"]);
    let staying = open("staying", &["jobs.>"]);
    let job = event("jobs.run");
    provider.store_batch(std::slice::from_ref(&job), None).expect("store");
    let fetched = leaving.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(fetched.iter().map(|e| e.event.id).collect::<Vec<_>>(), [job.id]);

    leaving.set_filter(&[Pattern::parse("other.>").expect("pattern")]).expect("narrow");
    leaving.nak(&[fetched[0].token], Duration::ZERO).expect("give back");
    let again = leaving.fetch(8, Duration::from_millis(100)).expect("fetch");
    assert!(again.is_empty(), "the member that gave it back took it again: {again:?}");
    let taken = staying.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(taken.iter().map(|e| (e.event.id, e.deliveries)).collect::<Vec<_>>(), [(job.id, 2)]);
    staying.ack(&[eventbroker::Ack::handled(taken[0].token)]).expect("ack");

    // Still wanted: a give-back comes back to the member itself.
    let other = event("other.thing");
    provider.store_batch(std::slice::from_ref(&other), None).expect("store");
    let mine = leaving.fetch(8, Duration::from_secs(5)).expect("fetch");
    leaving.nak(&[mine[0].token], Duration::ZERO).expect("give back");
    let back = leaving.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(back.iter().map(|e| (e.event.id, e.deliveries)).collect::<Vec<_>>(), [(other.id, 2)]);
}

/// A member whose claim lapsed, and was taken over by another member, gives the event back: the
/// give-back is not honoured, since the other member is handling it now and a redelivery would
/// have it handled twice at once.
#[test]
fn a_give_back_after_another_member_took_the_event_over_leaves_it_with_that_member() {
    use eventbroker::{ConsumerGroup, InboundConfig};
    let provider = provider(1_000);
    let group = ConsumerGroup::Shared("taken-over".into());
    let open = |name: &str| {
        let config = InboundConfig::new(name, group.clone()).with_claim_idle(Duration::from_millis(200));
        provider.open_inbound(&config).expect("open")
    };
    let (slow, other) = (open("slow"), open("other"));
    let job = event("jobs.run");
    provider.store_batch(std::slice::from_ref(&job), None).expect("store");
    let first = slow.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(first.len(), 1);
    let taken = other.fetch(8, Duration::from_secs(5)).expect("fetch after the claim lapsed");
    assert_eq!(taken.iter().map(|e| (e.event.id, e.deliveries)).collect::<Vec<_>>(), [(job.id, 2)]);

    slow.nak(&[first[0].token], Duration::ZERO).expect("a late give-back");
    for source in [&slow, &other] {
        // Kept by its new owner, so only the give-back could make it due.
        other.extend(&[taken[0].token]).expect("extend");
        let again = source.fetch(8, Duration::ZERO).expect("fetch");
        assert!(again.is_empty(), "handed out again while its new owner handles it: {again:?}");
    }
    other.ack(&[eventbroker::Ack::handled(taken[0].token)]).expect("ack");
    assert_eq!(specific(&provider, "bus_pending"), 0);
}

/// A fan-out instance that joins its group again replaces its predecessor: the source it replaced
/// is handed nothing more, and the group can be deleted once the new one closes.
#[test]
fn a_fan_out_source_replaced_by_its_instance_joining_again_is_handed_nothing() {
    use eventbroker::{ConsumerGroup, InboundConfig};
    let provider = provider(1_000);
    let group = ConsumerGroup::Instance("rejoined".into());
    let config = InboundConfig::new("rejoined", group.clone());
    let before = provider.open_inbound(&config).expect("open");
    let after = provider.open_inbound(&config).expect("open again");
    let news = event("news.x");
    provider.store_batch(std::slice::from_ref(&news), None).expect("store");
    let stale = before.fetch(8, Duration::ZERO).expect("fetch");
    assert!(stale.is_empty(), "the replaced source was handed {stale:?}");
    let got = after.fetch(8, Duration::from_secs(5)).expect("fetch");
    assert_eq!(got.iter().map(|e| e.event.id).collect::<Vec<_>>(), [news.id]);
    after.ack(&[eventbroker::Ack::handled(got[0].token)]).expect("ack");
    let open = provider.stats().expect("stats").active_subscribers;
    assert_eq!(open, 1, "the replaced source is not counted");
    after.close().expect("close");
    assert!(provider.delete_group(&group).expect("no open member is left"));
}

/// A group that falls more than the bound behind counts as lost only what it would have been
/// handed: its own events are echoes and those none of its members wants are filtered, as a fetch
/// counts them; what is left of the log still comes, in order.
#[test]
fn a_group_left_behind_counts_only_what_it_would_have_received_as_lost() {
    use eventbroker::{ConsumerGroup, InboundConfig};
    let provider = provider(10);
    let group = ConsumerGroup::Instance("behind".into());
    let source = provider.open_inbound(&InboundConfig::new("behind", group.clone())).expect("open");
    source.set_filter(&[Pattern::parse("wanted.>").expect("pattern")]).expect("set_filter");
    let own: Vec<Arc<Event>> = (0..20).map(|_| event("wanted.mine")).collect();
    let unwanted: Vec<Arc<Event>> = (0..20).map(|_| event("other.x")).collect();
    let wanted: Vec<Arc<Event>> = (0..20).map(|_| event("wanted.x")).collect();
    provider.store_batch(&own, Some(&group.key())).expect("store");
    provider.store_batch(&unwanted, None).expect("store");
    provider.store_batch(&wanted, None).expect("store");

    assert_eq!(specific(&provider, "bus_lost"), 10, "the wanted events the log dropped");
    assert_eq!(specific(&provider, "bus_echoes_skipped"), 20);
    assert_eq!(specific(&provider, "bus_filtered"), 20);
    let got = source.fetch(64, Duration::ZERO).expect("fetch");
    let ids = |events: &[Arc<Event>]| events.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(got.iter().map(|e| e.event.id).collect::<Vec<_>>(), ids(&wanted[10..]));
    assert_eq!(specific(&provider, "bus_lost"), 10);
}
