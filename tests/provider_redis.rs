//! The Redis provider against the real server on 127.0.0.1:6379: the whole conformance suite
//! (single-provider, consumer groups and two brokers), then what only this backend promises.

mod instance_id_support;
mod redis_support;
mod work_queue_support;

eventbroker::conformance_suite!(conformance, crate::redis_support::RedisBackend::new);

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::testing::conformance::Scope;
use eventbroker::{
    Ack, ConsumerGroup, Event, EventFilter, EventId, EventSink, EventSource, EventStatus, EventStore,
    Inbound, InboundConfig, InboundEvent, Provider, ProviderErrorKind, RedisConfig, RedisProvider,
    ReplayFrom, StatusUpdate,
};
use redis_support::{RedisBackend, raw};

fn shared(events: &[Event]) -> Vec<Arc<Event>> {
    events.iter().cloned().map(Arc::new).collect()
}

fn stream_ids(backend: &RedisBackend) -> Vec<(String, EventId)> {
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(backend.stream())
        .arg("-")
        .arg("+")
        .query::<redis::streams::StreamRangeReply>(&mut raw())
        .expect("XRANGE")
        .ids
        .into_iter()
        .map(|entry| {
            let fields = entry
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<String>(v).expect("a string field")))
                .collect();
            (entry.id, fields)
        })
        .collect();
    entries.into_iter().map(|(entry, fields)| (entry, fields["id"].parse().expect("an event id"))).collect()
}

fn specific(provider: &RedisProvider, key: &str) -> u64 {
    provider.stats().expect("stats").provider_specific[key].as_u64().expect("a count")
}

/// Fetches from `source` until `n` events came (bounded by 20 s), acknowledging each batch.
fn take_acked(source: &dyn Inbound, n: usize) -> Vec<InboundEvent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} events arrived", got.len());
        let batch = source.fetch(256, Duration::from_millis(200)).expect("fetch");
        let acks: Vec<Ack> = batch.iter().map(|e| Ack::handled(e.token)).collect();
        source.ack(&acks).expect("ack");
        got.extend(batch);
    }
    got
}

fn open(provider: &RedisProvider, consumer: &str, group: ConsumerGroup, scope: &Scope) -> Arc<dyn Inbound> {
    let source = provider
        .open_inbound(&InboundConfig::new(consumer, group).with_claim_idle(Duration::from_secs(30)))
        .expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");
    source
}

/// The Go seed's `Store` wrote entries with the fields `event` (its JSON), `id`, `type`, `source`,
/// `status` and `instance_id`. One written by `redis-cli` reaches every group, as the seed wrote it.
#[test]
fn a_seed_shaped_entry_written_by_redis_cli_is_delivered() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let source = open(&provider, "api-1", ConsumerGroup::Instance("api-1".into()), &scope);

    let id = "5f0c6a2e-8f4b-4c1d-9a7e-3b2d1c0f9e8a";
    let ty = scope.ty("public.users.create");
    let json = format!(
        r#"{{"id":"{id}","source":"database","type":"{ty}","status":"pending","retry_count":0,"payload":{{"id":42,"name":"Zoë"}},"user_id":7,"session_id":"s-1","instance_id":"go-seed-1","schema":"public","entity":"users","operation":"create","created_at":"2024-05-01T10:20:30.123456789Z","processed_at":null,"completed_at":null,"metadata":{{"trace":"abc"}}}}"#
    );
    let status = Command::new("redis-cli")
        .args(["-u", &redis_support::url(), "XADD", &backend.stream(), "MAXLEN", "~", "10000", "*"])
        .args(["event", &json, "id", id, "type", &ty, "source", "database", "status", "pending"])
        .args(["instance_id", "go-seed-1"])
        .status()
        .expect("redis-cli runs");
    assert!(status.success(), "redis-cli XADD failed: {status}");

    let got = take_acked(&*source, 1);
    let event = &got[0].event;
    assert_eq!(event.id.to_string(), id);
    assert_eq!(
        (event.event_type.as_str(), event.source, event.status),
        (ty.as_str(), EventSource::Database, EventStatus::Pending)
    );
    assert_eq!((event.user_id, event.instance_id.as_str(), event.entity.as_str()), (7, "go-seed-1", "users"));
    assert_eq!(event.payload_json(), Some(r#"{"id":42,"name":"Zoë"}"#));
    assert_eq!(event.metadata["trace"], "abc");
    assert_eq!(got[0].deliveries, 1);
    source.close().expect("close");
}

/// A batch whose reply was lost is retried whole: every id stays one stream entry, with its first
/// sequence number, counted once.
#[test]
fn a_retried_batch_adds_no_second_entry() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..300).map(|i| scope.event(&format!("retry.t{}", i % 3))).collect();
    provider.store_batch(&shared(&events), Some("instance:a")).expect("store");
    let first = stream_ids(&backend);
    for _ in 0..3 {
        provider.store_batch(&shared(&events), Some("instance:a")).expect("store again");
    }
    assert_eq!(stream_ids(&backend), first, "the same entries, no more");
    assert_eq!(
        first.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        events.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.events_published), (300, 300));
    assert_eq!(stats.provider_specific["replaced"], 900);
}

/// A Redis that lost its scripts (`SCRIPT FLUSH`, or a restart without persistence) gets them
/// loaded again by the first call that needs each, which then succeeds.
#[test]
fn scripts_are_loaded_again_when_the_server_forgot_them() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let first = scope.event("reload");
    provider.store_batch(&shared(std::slice::from_ref(&first)), None).expect("store");
    redis::cmd("SCRIPT").arg("FLUSH").exec(&mut raw()).expect("SCRIPT FLUSH");
    let second = scope.event("reload");
    provider.store_batch(&shared(std::slice::from_ref(&second)), None).expect("store after the flush");
    redis::cmd("SCRIPT").arg("FLUSH").exec(&mut raw()).expect("SCRIPT FLUSH");
    provider
        .update_status_batch(&[StatusUpdate::new(first.id, EventStatus::Completed)])
        .expect("update after the flush");
    redis::cmd("SCRIPT").arg("FLUSH").exec(&mut raw()).expect("SCRIPT FLUSH");
    assert_eq!(provider.get(second.id).expect("get").map(|e| e.id), Some(second.id));
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.completed_events, stats.pending_events), (2, 1, 1));
}

/// A call far larger than the buffer a thread keeps between calls (4 MiB) goes through whole, and
/// the calls after it still do.
#[test]
fn a_batch_larger_than_the_kept_buffer_is_written_whole() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let text = "é".repeat(400_000);
    let big: Vec<Event> = (0..6)
        .map(|i| {
            let mut event = scope.event("big");
            event.set_payload_json(format!(r#"{{"n":{i},"text":"{text}"}}"#)).expect("payload");
            event
        })
        .collect();
    provider.store_batch(&shared(&big), None).expect("store the big batch");
    let small: Vec<Event> = (0..3).map(|_| scope.event("small")).collect();
    provider.store_batch(&shared(&small), None).expect("store after it");
    for event in big.iter().chain(&small) {
        let got = provider.get(event.id).expect("get").expect("stored");
        assert_eq!(got.to_json(), event.to_json());
    }
}

/// Replay's sequence numbers are the stream entry ids, packed: `ms << 20 | n`.
#[test]
fn sequence_numbers_are_the_entry_ids() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..50).map(|_| scope.event("seq")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let replayed = provider.replay(ReplayFrom::Beginning, None, 100).expect("replay").events;
    let entries = stream_ids(&backend);
    assert_eq!(replayed.len(), entries.len());
    for (stored, (entry, id)) in replayed.iter().zip(&entries) {
        let (ms, n) = entry.split_once('-').expect("ms-n");
        let packed = ms.parse::<u64>().expect("ms") << 20 | n.parse::<u64>().expect("n");
        assert_eq!((stored.seq, stored.event.id), (packed, *id));
    }
}

/// One replay call looks at no more than 4096 stream entries (16 round trips of 256): a rare
/// pattern over a long run of other types gets a short page, not the end, whose `next` lies past
/// the entries it passed over, and paging on reaches the rare event after them.
#[test]
fn a_replay_call_looks_at_a_bounded_number_of_entries() {
    const NOISE: usize = 10_000;
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let noise: Vec<Event> = (0..NOISE).map(|_| scope.event("noise")).collect();
    provider.store_batch(&shared(&noise), None).expect("store the noise");
    let rare = scope.event("rare");
    provider.store_batch(&shared(std::slice::from_ref(&rare)), None).expect("store the rare one");
    let seqs: Vec<u64> = stream_ids(&backend)
        .into_iter()
        .map(|(entry, _)| {
            let (ms, n) = entry.split_once('-').expect("ms-n");
            ms.parse::<u64>().expect("ms") << 20 | n.parse::<u64>().expect("n")
        })
        .collect();
    let pattern = scope.pattern("rare");
    let first = provider.replay(ReplayFrom::Beginning, Some(&pattern), 10).expect("replay");
    assert!(first.events.is_empty() && !first.end, "one call read on to the rare event: {first:?}");
    let next = first.next.expect("a call that looked at entries says where to go on");
    assert!(next > seqs[0] && next <= seqs[4095] + 1, "looked at more than 4096 entries: next {next}");
    let (mut from, mut calls, mut found) = (ReplayFrom::Sequence(next), 1, Vec::new());
    loop {
        let page = provider.replay(from, Some(&pattern), 10).expect("replay");
        calls += 1;
        found.extend(page.events.iter().map(|stored| stored.event.id));
        from = ReplayFrom::Sequence(page.next.expect("a page that read entries"));
        if page.end {
            break;
        }
        assert!(calls <= NOISE, "the pages do not move on");
    }
    assert_eq!(found, [rare.id]);
    assert!(calls >= NOISE.div_ceil(4096), "{} entries in {calls} calls", NOISE + 1);
    let after = provider.replay(from, Some(&pattern), 10).expect("replay after the end");
    assert!(after.events.is_empty() && after.end, "{after:?}");
}

/// Entry ids map to sequence numbers only while their sequence part stays below 2²⁰, so the store
/// script moves to the next millisecond once it reaches 2¹⁹. A foreign entry at a time ahead of
/// the server's clock, with a sequence part past 2¹⁹, makes the next `XADD *` continue from it.
#[test]
fn entry_sequence_parts_move_to_the_next_millisecond_past_two_to_the_nineteen() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let ahead = jiff::Timestamp::now().as_millisecond() + 3_600_000;
    redis::cmd("XADD")
        .arg(backend.stream())
        .arg(format!("{ahead}-524290"))
        .arg("id")
        .arg(EventId::new().to_string())
        .exec(&mut raw())
        .expect("XADD");
    let events: Vec<Event> = (0..3).map(|_| scope.event("seq.wrap")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let entries: Vec<String> = stream_ids(&backend).into_iter().map(|(entry, _)| entry).collect();
    let next = ahead + 1;
    let expected =
        [format!("{ahead}-524290"), format!("{ahead}-524291"), format!("{next}-0"), format!("{next}-1")];
    assert_eq!(entries, expected);
    let replayed = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events;
    let seqs: Vec<u64> = replayed.iter().map(|stored| stored.seq).collect();
    let ahead = u64::try_from(ahead).expect("positive");
    assert_eq!(seqs, [(ahead << 20) + 524_291, (ahead + 1) << 20, ((ahead + 1) << 20) + 1]);
}

/// Statuses live in hashes, never in the stream; finished ones carry the TTL, others none.
#[test]
fn statuses_are_hashes_with_a_ttl_once_finished() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..3).map(|_| scope.event("jobs.run")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    provider
        .update_status_batch(&[
            StatusUpdate::new(events[0].id, EventStatus::Processing),
            StatusUpdate::new(events[1].id, EventStatus::Completed),
            StatusUpdate::new(events[2].id, EventStatus::Failed).with_error("boom"),
        ])
        .expect("update");
    assert_eq!(stream_ids(&backend).len(), 3, "status changes add no entries");
    let mut conn = raw();
    let ttl = |conn: &mut redis::Connection, id: EventId| -> i64 {
        redis::cmd("PTTL").arg(format!("{}:status:{id}", backend.prefix())).query(conn).expect("PTTL")
    };
    let status = |conn: &mut redis::Connection, id: EventId| -> String {
        redis::cmd("HGET")
            .arg(format!("{}:status:{id}", backend.prefix()))
            .arg("status")
            .query(conn)
            .expect("HGET")
    };
    assert_eq!(status(&mut conn, events[0].id), "processing");
    assert_eq!(ttl(&mut conn, events[0].id), -1, "an unfinished event does not expire");
    let week = 7 * 24 * 3600 * 1000;
    assert!((week - 60_000..=week).contains(&ttl(&mut conn, events[1].id)));
    assert!((week - 60_000..=week).contains(&ttl(&mut conn, events[2].id)));

    // Back to pending (a redrive): the TTL goes.
    provider.update_status_batch(&[StatusUpdate::new(events[2].id, EventStatus::Pending)]).expect("update");
    assert_eq!(ttl(&mut conn, events[2].id), -1);
}

/// Finished events expire after the status TTL, and every count follows.
#[test]
fn finished_events_expire_with_exact_counts() {
    let backend = RedisBackend::with(|c| c.status_ttl = Some(Duration::from_millis(300)));
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..4).map(|_| scope.event("expire")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    provider
        .update_status_batch(&[
            StatusUpdate::new(events[0].id, EventStatus::Completed),
            StatusUpdate::new(events[1].id, EventStatus::Failed),
        ])
        .expect("update");
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.stats().expect("stats").total_events > 2 {
        assert!(Instant::now() < deadline, "finished events did not expire");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = provider.stats().expect("stats");
    assert_eq!(
        (stats.total_events, stats.pending_events, stats.completed_events, stats.failed_events),
        (2, 2, 0, 0)
    );
    assert_eq!(stats.provider_specific["expired"], 2);
    assert_eq!(
        scope.list(&provider).iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![events[2].id, events[3].id]
    );
    assert_eq!(provider.get(events[0].id).expect("get"), None);
    let replayed = provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events;
    assert_eq!(replayed.len(), 2, "expired events leave replay too");
}

/// The stream stays near `max_len`: the oldest entries go, with their events, and counts stay exact.
#[test]
fn the_stream_is_trimmed_with_its_events() {
    let backend = RedisBackend::with(|c| c.max_len = 100);
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..350).map(|_| scope.event("trim")).collect();
    for chunk in events.chunks(50) {
        provider.store_batch(&shared(chunk), None).expect("store");
    }
    provider
        .update_status_batch(&[StatusUpdate::new(events[349].id, EventStatus::Completed)])
        .expect("update");
    let kept = stream_ids(&backend);
    assert!(kept.len() <= 101, "{} entries kept", kept.len());
    let listed: Vec<EventId> = scope.list(&provider).iter().map(|e| e.id).collect();
    let kept_ids: Vec<EventId> = kept.iter().map(|(_, id)| *id).collect();
    assert_eq!(listed, kept_ids, "list holds exactly the events still in the stream");
    assert_eq!(kept_ids.last(), Some(&events[349].id), "the newest stay");
    assert_eq!(provider.get(events[0].id).expect("get"), None, "the oldest went");
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.total_events, kept.len() as u64);
    assert_eq!(stats.pending_events + stats.completed_events, stats.total_events);
    assert_eq!(stats.provider_specific["trimmed"], 350 - kept.len() as u64);
}

/// Trimming and expiry in one script call: a store that trims the oldest (pending) events and then
/// purges the expired (completed) ones leaves exact counts, and indexes that hold exactly what is
/// stored.
#[test]
fn trimming_and_expiry_in_one_call_count_each_event_once() {
    let backend = RedisBackend::with(|c| {
        c.max_len = 200;
        c.status_ttl = Some(Duration::from_millis(1));
    });
    let provider = backend.provider();
    let scope = Scope::new();
    let old: Vec<Event> = (0..150).map(|_| scope.event("trim-expire")).collect();
    provider.store_batch(&shared(&old), None).expect("store");
    let done: Vec<StatusUpdate> =
        old[20..].iter().map(|e| StatusUpdate::new(e.id, EventStatus::Completed)).collect();
    provider.update_status_batch(&done).expect("update");
    std::thread::sleep(Duration::from_millis(20));
    // 220 entries: the store trims the 20 oldest, still pending, then purges the 130 completed ones,
    // all expired by now.
    let new: Vec<Event> = (0..70).map(|_| scope.event("trim-expire")).collect();
    provider.store_batch(&shared(&new), None).expect("store");

    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events, stats.completed_events), (70, 70, 0), "{stats:?}");
    let count = |name: &str| stats.provider_specific[name].as_u64().expect("a count");
    let (trimmed, expired) = (count("trimmed"), count("expired"));
    assert_eq!(trimmed + expired, 150, "trimmed {trimmed} + expired {expired}");
    assert_eq!(trimmed, 20);
    let listed: Vec<EventId> = scope.list(&provider).iter().map(|e| e.id).collect();
    assert_eq!(listed, new.iter().map(|e| e.id).collect::<Vec<_>>());
    let mut conn = raw();
    let prefix = backend.prefix();
    let time_index: usize =
        redis::cmd("ZCARD").arg(format!("{prefix}:time")).query(&mut conn).expect("zcard");
    let expiry_index: usize =
        redis::cmd("ZCARD").arg(format!("{prefix}:expiry")).query(&mut conn).expect("zcard");
    let pending_index: usize =
        redis::cmd("HLEN").arg(format!("{prefix}:pending")).query(&mut conn).expect("HLEN");
    assert_eq!(
        (time_index, expiry_index, pending_index),
        (70, 0, 70),
        "the indexes hold exactly the stored events"
    );
}

/// A stored event still pending has no status hash: its record is a field of the pending index
/// until its first status change, which moves it to a hash. Reads, deletes, re-stores and trimming
/// find it in either place, and the index holds exactly the events pending without a hash.
#[test]
fn a_pending_event_has_no_status_hash_until_its_status_changes() {
    let backend = RedisBackend::with(|c| c.max_len = 100);
    let provider = backend.provider();
    let scope = Scope::new();
    let mut conn = raw();
    let prefix = backend.prefix().to_owned();
    let hashes = |conn: &mut redis::Connection, ids: &[EventId]| -> usize {
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}:status:{id}")).collect();
        redis::cmd("EXISTS").arg(keys).query(conn).expect("EXISTS")
    };
    let pending_index = |conn: &mut redis::Connection| -> usize {
        redis::cmd("HLEN").arg(format!("{prefix}:pending")).query(conn).expect("HLEN")
    };
    let events: Vec<Event> = (0..4).map(|_| scope.event("pend")).collect();
    let ids: Vec<EventId> = events.iter().map(|e| e.id).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    assert_eq!((hashes(&mut conn, &ids), pending_index(&mut conn)), (0, 4));
    let got = provider.get(ids[0]).expect("get").expect("stored");
    assert_eq!((got.status, got.processed_at), (EventStatus::Pending, None));
    assert_eq!(scope.list(&provider).len(), 4);
    assert_eq!(provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events.len(), 4);

    // The first status change makes the hash, with the entry and time the index held.
    let at = jiff::Timestamp::now();
    provider
        .update_status_batch(&[
            StatusUpdate::new(ids[0], EventStatus::Processing).with_processed_at(at),
            StatusUpdate::new(ids[0], EventStatus::Completed).with_completed_at(at),
        ])
        .expect("update");
    assert_eq!((hashes(&mut conn, &ids[..1]), pending_index(&mut conn)), (1, 3));
    let got = provider.get(ids[0]).expect("get").expect("stored");
    assert_eq!(
        (got.status, got.processed_at, got.completed_at),
        (EventStatus::Completed, Some(at), Some(at))
    );
    assert_eq!(provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events[0].event.id, ids[0]);

    // Deleting a pending event removes its index field and its entry.
    assert!(provider.delete(ids[1]).expect("delete"));
    assert!(!provider.delete(ids[1]).expect("delete"), "deleted once");
    assert_eq!(provider.get(ids[1]).expect("get"), None);
    assert_eq!(pending_index(&mut conn), 2);
    assert_eq!(stream_ids(&backend).len(), 3);

    // Re-storing a pending event puts its new body in a hash; the entry stays.
    let changed = events[2].clone().with_payload_value(serde_json::json!({"changed": true}));
    provider.store_batch(&[Arc::new(changed)], None).expect("re-store");
    assert_eq!((hashes(&mut conn, &ids[2..3]), pending_index(&mut conn)), (1, 1));
    let got = provider.get(ids[2]).expect("get").expect("stored");
    assert_eq!(got.payload_json(), Some(r#"{"changed":true}"#));
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events, stats.completed_events), (3, 2, 1));
    assert_eq!(stats.provider_specific["replaced"], 1);

    // A store and a re-store of one id in one batch: one entry, one hash, no index field.
    let twice = scope.event("pend");
    provider.store_batch(&shared(&[twice.clone(), twice.clone()]), None).expect("store");
    assert_eq!((hashes(&mut conn, &[twice.id]), pending_index(&mut conn)), (1, 1));
    assert_eq!(stream_ids(&backend).len(), 4);

    // Trimming takes pending events from the index and the others from their hashes.
    let more: Vec<Event> = (0..150).map(|_| scope.event("pend")).collect();
    for chunk in more.chunks(50) {
        provider.store_batch(&shared(chunk), None).expect("store");
    }
    let kept: Vec<EventId> = stream_ids(&backend).into_iter().map(|(_, id)| id).collect();
    assert!(!kept.contains(&ids[0]) && !kept.contains(&ids[3]), "the oldest went");
    assert_eq!(hashes(&mut conn, &ids), 0, "trimmed events leave no hash");
    assert_eq!(pending_index(&mut conn), kept.len(), "the index holds exactly the pending events kept");
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events), (kept.len() as u64, kept.len() as u64));
}

/// Trimming finds the oldest events through the order list, and reads the stream itself for the
/// entries older than any the list names: another writer's (the Go seed's), or those of a stream
/// written before the list existed. Either way the oldest go first, with exact counts.
#[test]
fn trimming_covers_entries_the_order_list_does_not_name() {
    let backend = RedisBackend::with(|c| c.max_len = 100);
    let provider = backend.provider();
    let scope = Scope::new();
    let mut conn = raw();
    let order = format!("{}:order", backend.prefix());
    let store = |events: &[Event]| {
        for chunk in events.chunks(20) {
            provider.store_batch(&shared(chunk), None).expect("store");
        }
    };
    let batch = |n: usize| (0..n).map(|_| scope.event("order")).collect::<Vec<Event>>();

    let first = batch(80);
    store(&first);
    redis::cmd("DEL").arg(&order).exec(&mut conn).expect("DEL"); // A stream from before the list.
    for _ in 0..10 {
        let id = EventId::new();
        let json = format!(r#"{{"id":"{id}","source":"system","type":"seed.x","status":"pending"}}"#);
        redis::cmd("XADD")
            .arg(backend.stream())
            .arg("*")
            .arg("event")
            .arg(json)
            .arg("id")
            .arg(id.to_string())
            .arg("type")
            .arg("seed.x")
            .exec(&mut conn)
            .expect("XADD");
    }
    let (second, third, fourth) = (batch(60), batch(40), batch(20));
    store(&second); // Trims 50 of `first`, read from the stream: the list names none of them.
    store(&third); // The other 30 of `first`, then the seed's 10.
    store(&fourth); // 20 of `second`, named by the list.

    let kept: Vec<EventId> = stream_ids(&backend).into_iter().map(|(_, id)| id).collect();
    let expected: Vec<EventId> = second[20..].iter().chain(&third).chain(&fourth).map(|e| e.id).collect();
    assert_eq!(kept, expected, "the oldest went first, the seed's entries with them");
    let listed: Vec<EventId> = scope.list(&provider).iter().map(|e| e.id).collect();
    assert_eq!(listed, expected);
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.total_events, 100);
    assert_eq!(specific(&provider, "trimmed"), 100, "first's 80 and second's 20");
    let elements: Vec<String> =
        redis::cmd("LRANGE").arg(&order).arg(0).arg(-1).query(&mut conn).expect("LRANGE");
    let named: Vec<EventId> = elements
        .iter()
        .map(|n| n.split_once(' ').expect("<entry> <id>").1.parse().expect("an event id"))
        .collect();
    assert_eq!(named, expected, "the list names exactly the entries left, in order");
}

/// Two key prefixes on one server are two worlds: nothing stored or published in one shows in the
/// other.
#[test]
fn key_prefixes_keep_services_apart() {
    let (one, two) = (RedisBackend::new(), RedisBackend::new());
    let (p1, p2) = (one.provider(), two.provider());
    let scope = Scope::new();
    let listener = open(&p2, "b", ConsumerGroup::Instance("b".into()), &scope);
    let event = scope.event("apart");
    p1.store_batch(&[Arc::new(event.clone())], Some("instance:a")).expect("store");
    assert_eq!(p2.get(event.id).expect("get"), None);
    assert!(p2.list(&EventFilter::new()).expect("list").is_empty());
    assert_eq!(p2.stats().expect("stats").total_events, 0);
    assert!(listener.fetch(16, Duration::from_millis(300)).expect("fetch").is_empty());
    assert_eq!(p1.get(event.id).expect("get").map(|e| e.id), Some(event.id));
    listener.close().expect("close");
}

/// Reads never block, whatever the stream holds: at its end, empty, or absent.
#[test]
fn reads_never_block() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let started = Instant::now();
    assert_eq!(provider.get(EventId::new()).expect("get"), None);
    assert!(provider.list(&EventFilter::new()).expect("list").is_empty());
    assert!(provider.replay(ReplayFrom::Sequence(1 << 60), None, 10).expect("replay").events.is_empty());
    assert!(provider.replay(ReplayFrom::Beginning, None, 10).expect("replay").events.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2), "reads took {:?}", started.elapsed());
}

/// Fan-out and work-queue at volume, between two providers (two processes as far as Redis can
/// tell): 2 × 1000 events, each to every other group exactly once, and to one member of a queue.
#[test]
fn two_providers_fan_out_and_share_a_queue_at_volume() {
    let backend = RedisBackend::new();
    let (pa, pb) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let (ga, gb) = (ConsumerGroup::Instance(scope.name("a")), ConsumerGroup::Instance(scope.name("b")));
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let a = open(&pa, &scope.name("a"), ga.clone(), &scope);
    let b = open(&pb, &scope.name("b"), gb.clone(), &scope);
    let qa = open(&pa, &scope.name("a"), queue.clone(), &scope);
    let qb = open(&pb, &scope.name("b"), queue, &scope);

    let from_a: Vec<Event> = (0..1000).map(|_| scope.event("from.a")).collect();
    let from_b: Vec<Event> = (0..1000).map(|_| scope.event("from.b")).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            from_a.chunks(100).for_each(|c| pa.store_batch(&shared(c), Some(&ga.key())).expect("store"));
        });
        s.spawn(|| {
            from_b.chunks(100).for_each(|c| pb.store_batch(&shared(c), Some(&gb.key())).expect("store"));
        });
    });

    let ids = |events: &[InboundEvent]| events.iter().map(|e| e.event.id).collect::<Vec<_>>();
    let got_a = take_acked(&*a, 1000);
    let got_b = take_acked(&*b, 1000);
    assert_eq!(ids(&got_a), from_b.iter().map(|e| e.id).collect::<Vec<_>>(), "a: b's events, once, in order");
    assert_eq!(ids(&got_b), from_a.iter().map(|e| e.id).collect::<Vec<_>>(), "b: a's events, once, in order");

    let (mut first_member, mut second_member) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while first_member.len() + second_member.len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} of 2000 reached the queue",
            first_member.len() + second_member.len()
        );
        for (source, into) in [(&qa, &mut first_member), (&qb, &mut second_member)] {
            let batch = source.fetch(64, Duration::from_millis(50)).expect("fetch");
            source.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
            into.extend(batch);
        }
    }
    let all: Vec<EventId> = ids(&first_member).into_iter().chain(ids(&second_member)).collect();
    assert_eq!(all.len(), 2000, "no event reached both members");
    let unique: HashSet<EventId> = all.into_iter().collect();
    assert_eq!(unique, from_a.iter().chain(&from_b).map(|e| e.id).collect::<HashSet<_>>());
    for source in [a, b, qa, qb] {
        assert!(source.fetch(16, Duration::from_millis(200)).expect("fetch").is_empty(), "nothing twice");
        source.close().expect("close");
    }
    assert_eq!(specific(&pa, "inbound_echoes_skipped") + specific(&pb, "inbound_echoes_skipped"), 2000);
}

/// A member of a shared group that closes hands what it held to the others at once, long before
/// the claim idle time (30 s here).
#[test]
fn a_closing_queue_member_releases_its_events_at_once() {
    let backend = RedisBackend::new();
    let (p1, p2) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let leaving = open(&p1, "m1", queue.clone(), &scope);
    let staying = open(&p2, "m2", queue, &scope);
    let events: Vec<Event> = (0..5).map(|_| scope.event("job")).collect();
    p1.store_batch(&shared(&events), None).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = Vec::new();
    while held.len() < 5 {
        assert!(Instant::now() < deadline, "the first member got only {}", held.len());
        held.extend(leaving.fetch(5, Duration::from_millis(100)).expect("fetch"));
    }
    leaving.close().expect("close");
    let started = Instant::now();
    let got = take_acked(&*staying, 5);
    assert!(started.elapsed() < Duration::from_secs(5), "released after {:?}", started.elapsed());
    assert!(got.iter().all(|e| e.deliveries == 2), "{got:?}");
    staying.close().expect("close");
}

/// A group whose stream vanished (Redis restarted without persistence, or the key was deleted) is
/// created again, and delivery carries on with what is stored from then on.
#[test]
fn a_lost_group_is_created_again() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let source = open(&provider, "a", ConsumerGroup::Instance("a".into()), &scope);
    provider.store_batch(&[Arc::new(scope.event("before"))], None).expect("store");
    take_acked(&*source, 1);
    let _: i64 = redis::cmd("DEL").arg(backend.stream()).query(&mut raw()).expect("DEL");
    // The first fetch finds the group gone and creates it again at the (new) end.
    assert!(source.fetch(16, Duration::from_millis(100)).expect("fetch").is_empty());
    let after = scope.event("after");
    provider.store_batch(&[Arc::new(after.clone())], None).expect("store");
    let got = take_acked(&*source, 1);
    assert_eq!(got[0].event.id, after.id);
    source.close().expect("close");
}

/// Usernames and passwords go into the URL; a wrong one is reported, not retried forever; a TLS
/// URL against a plain server fails its handshake within the timeout.
#[test]
fn credentials_and_tls_urls() {
    let user = format!("ebtest-{}", EventId::new().as_uuid().simple());
    let mut conn = raw();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">s3cret-pw")
        .arg("~ebtest:*")
        .arg("+@all")
        .exec(&mut conn)
        .expect("ACL SETUSER");
    let with_url = |url: String| {
        RedisBackend::with(|c| {
            c.url = url;
            c.timeout = Duration::from_secs(2);
        })
    };
    let good = with_url(format!("redis://{user}:s3cret-pw@127.0.0.1:6379/0"));
    let provider = good.provider();
    provider.ping().expect("the right password connects");
    provider.store_batch(&[Arc::new(Event::new(EventSource::System, "auth.ok"))], None).expect("store");
    assert_eq!(provider.stats().expect("stats").total_events, 1);

    let bad = with_url(format!("redis://{user}:wrong@127.0.0.1:6379/0")).provider();
    let error = bad.ping().expect_err("a wrong password");
    assert!(!error.to_string().contains("wrong"), "the password is not in the error: {error}");

    let tls = with_url("rediss://127.0.0.1:6379".into()).provider();
    let started = Instant::now();
    let error = tls.ping().expect_err("a TLS handshake with a plain server");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(
        matches!(error.kind(), ProviderErrorKind::Unavailable(_) | ProviderErrorKind::Backend(_)),
        "{error}"
    );
    redis::cmd("ACL").arg("DELUSER").arg(&user).exec(&mut conn).expect("ACL DELUSER");
}

/// Configuration mistakes are caught when the provider is built, with the value in the message.
#[test]
fn invalid_settings_are_refused() {
    for config in [
        RedisConfig { key_prefix: "a b".into(), ..RedisConfig::default() },
        RedisConfig { stream: "x*".into(), ..RedisConfig::default() },
        RedisConfig { timeout: Duration::ZERO, ..RedisConfig::default() },
        RedisConfig::new("mysql://127.0.0.1"),
    ] {
        let error = RedisProvider::connect(config).expect_err("invalid");
        assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}");
    }
    let provider = RedisBackend::new().provider();
    let group = ConsumerGroup::Shared("has space".into());
    let error = provider.open_inbound(&InboundConfig::new("m", group)).map(drop).expect_err("invalid group");
    assert!(error.to_string().contains("has space"), "{error}");
}

/// A work-queue member that unsubscribes one of its patterns gives what it fetched for it back to
/// the group: the other member gets every one (see `work_queue_support`).
#[test]
fn a_partial_unsubscribe_gives_back_to_the_group() {
    let backend = RedisBackend::new();
    let connect = || -> Arc<dyn Provider> { Arc::new(backend.provider()) };
    work_queue_support::a_partial_unsubscribe_gives_back_to_the_group(&connect, "partial");
}

/// Events waiting in a work-queue member's shard behind slow handlers keep their claims: no other
/// member takes them, and none is handled twice (see `work_queue_support`).
#[test]
fn events_waiting_in_a_shard_keep_their_claims() {
    let backend = RedisBackend::new();
    let connect = || -> Arc<dyn Provider> { Arc::new(backend.provider()) };
    work_queue_support::events_waiting_in_a_shard_keep_their_claims(&connect, "waiting");
}

/// Two brokers of this process built from one configuration (a provider object each) under one
/// instance id would be one consumer of one group on the stream: the second is refused, naming the
/// stream (see `instance_id_support`); another stream under the prefix is another namespace.
#[test]
fn one_instance_id_receives_from_a_redis_stream_once_per_process() {
    let backend = RedisBackend::new();
    let mut config = eventbroker::config::Config::default();
    config.provider = eventbroker::config::ProviderKind::Redis;
    config.redis.url = Some(redis_support::url());
    config.redis.key_prefix = Some(backend.prefix().to_owned());
    let mut elsewhere = config.clone();
    elsewhere.redis.stream_name = Some("other".into());
    instance_id_support::one_instance_id_receives_from_a_namespace_once(
        &config,
        &backend.stream(),
        &elsewhere,
    );
}

/// A provider's group namespace is the server as its URL names it (defaults filled in, no
/// password), the database and the stream's key, however prefix and name split it.
#[test]
fn the_group_namespace_names_the_server_database_and_stream() {
    let namespace = |url: &str, prefix: &str, stream: &str| {
        let config =
            RedisConfig { key_prefix: prefix.into(), stream: stream.into(), ..RedisConfig::new(url) };
        RedisProvider::connect(config).expect("a valid configuration").group_namespace()
    };
    let plain = namespace("redis://127.0.0.1", "ns_a:b", "c");
    assert_eq!(plain, namespace("redis://:hunter2@127.0.0.1:6379/0", "ns_a", "b:c"));
    assert!(plain.to_string().contains("127.0.0.1:6379 db 0, stream ns_a:b:c"), "{plain}");
    assert!(
        !format!("{:?}", namespace("redis://:hunter2@127.0.0.1:6379/0", "ns_a", "b:c")).contains("hunter2")
    );
    assert_ne!(plain, namespace("redis://127.0.0.1/1", "ns_a:b", "c"), "another database");
    assert_ne!(plain, namespace("redis://127.0.0.1:6380", "ns_a:b", "c"), "another server");
    assert_ne!(plain, namespace("redis://127.0.0.1", "ns_a", "c"), "another stream");
}

/// An event re-stored after its status hash expired, before anything purged the expiry, is a new
/// event: `list` finds it like `get` does, and the counts hold it once.
#[test]
fn an_event_stored_again_after_its_status_expired_is_listed() {
    let backend = RedisBackend::with(|c| c.status_ttl = Some(Duration::from_millis(200)));
    let provider = backend.provider();
    let scope = Scope::new();
    let event = scope.event("expired.again");
    provider.store_batch(&shared(std::slice::from_ref(&event)), None).expect("store");
    provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Completed)]).expect("update");
    std::thread::sleep(Duration::from_millis(400));
    // The hash is gone (Redis expired it); nothing has purged the expiry yet.
    provider.store_batch(&shared(std::slice::from_ref(&event)), None).expect("store again");
    assert_eq!(provider.get(event.id).expect("get").map(|e| e.status), Some(EventStatus::Pending));
    assert_eq!(scope.list(&provider).iter().map(|e| e.id).collect::<Vec<_>>(), vec![event.id]);
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events, stats.completed_events), (1, 1, 0));
}

/// Providers on one namespace with different `max_len` (a rolling change of the setting): the
/// entries of one that keeps everything are not in the order list, and trimming, when it takes
/// the named entries around them, takes their events from every index too.
#[test]
fn trimming_past_entries_the_order_list_does_not_name_forgets_their_events() {
    let trimming = RedisBackend::with(|c| c.max_len = 100);
    let keeping = RedisProvider::connect(RedisConfig { max_len: 0, ..trimming.config() }).expect("connect");
    let provider = trimming.provider();
    let scope = Scope::new();
    for _ in 0..4 {
        let named: Vec<Event> = (0..20).map(|_| scope.event("mixed")).collect();
        provider.store_batch(&shared(&named), None).expect("store");
        let unnamed: Vec<Event> = (0..20).map(|_| scope.event("mixed")).collect();
        keeping.store_batch(&shared(&unnamed), None).expect("store");
    }
    let more: Vec<Event> = (0..100).map(|_| scope.event("mixed")).collect();
    for chunk in more.chunks(20) {
        provider.store_batch(&shared(chunk), None).expect("store");
    }
    let kept: Vec<EventId> = stream_ids(&trimming).into_iter().map(|(_, id)| id).collect();
    let listed: Vec<EventId> = scope.list(&provider).iter().map(|e| e.id).collect();
    assert_eq!(listed, kept, "list holds exactly the events still in the stream");
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.total_events, kept.len() as u64, "{stats:?}");
    let pending_index: usize =
        redis::cmd("HLEN").arg(format!("{}:pending", trimming.prefix())).query(&mut raw()).expect("HLEN");
    assert_eq!(pending_index, kept.len());
}

/// Another writer that trims the stream (the Go seed's `XADD … MAXLEN ~ 10000`, shorter than our
/// `max_len`) removes entries of ours: their events leave every index and count with them, at the
/// next store, though the stream never grows past `max_len`.
#[test]
fn entries_another_writer_trimmed_take_their_events_with_them() {
    let backend = RedisBackend::with(|c| c.max_len = 1000);
    let provider = backend.provider();
    let scope = Scope::new();
    let old: Vec<Event> = (0..50).map(|_| scope.event("foreign.trim")).collect();
    provider.store_batch(&shared(&old), None).expect("store");
    provider.update_status_batch(&[StatusUpdate::new(old[0].id, EventStatus::Processing)]).expect("update");
    let _: i64 =
        redis::cmd("XTRIM").arg(backend.stream()).arg("MAXLEN").arg(10).query(&mut raw()).expect("XTRIM");
    let new: Vec<Event> = (0..5).map(|_| scope.event("foreign.trim")).collect();
    provider.store_batch(&shared(&new), None).expect("store");

    let kept: Vec<EventId> = stream_ids(&backend).into_iter().map(|(_, id)| id).collect();
    let expected: Vec<EventId> = old[40..].iter().chain(&new).map(|e| e.id).collect();
    assert_eq!(kept, expected);
    assert_eq!(scope.list(&provider).iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events, stats.processing_events), (15, 15, 0), "{stats:?}");
    assert_eq!(specific(&provider, "trimmed"), 40);
    let mut conn = raw();
    let prefix = backend.prefix();
    let time_index: usize =
        redis::cmd("ZCARD").arg(format!("{prefix}:time")).query(&mut conn).expect("ZCARD");
    let pending_index: usize =
        redis::cmd("HLEN").arg(format!("{prefix}:pending")).query(&mut conn).expect("HLEN");
    let order: usize = redis::cmd("LLEN").arg(format!("{prefix}:order")).query(&mut conn).expect("LLEN");
    assert_eq!(
        (time_index, pending_index, order),
        (15, 15, 15),
        "the indexes hold exactly the stored events"
    );
    let hash: bool =
        redis::cmd("EXISTS").arg(format!("{prefix}:status:{}", old[0].id)).query(&mut conn).expect("EXISTS");
    assert!(!hash, "the trimmed event's status hash went too");
}

/// `stats` counts what is stored when it is called, however many finished events expired since
/// the last write: more than one script call purges.
#[test]
fn stats_purge_every_expired_event_first() {
    let backend = RedisBackend::with(|c| c.status_ttl = Some(Duration::from_millis(300)));
    let provider = backend.provider();
    let scope = Scope::new();
    let events: Vec<Event> = (0..3000).map(|_| scope.event("expire.many")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let done: Vec<StatusUpdate> =
        events.iter().map(|e| StatusUpdate::new(e.id, EventStatus::Completed)).collect();
    provider.update_status_batch(&done).expect("update");
    std::thread::sleep(Duration::from_millis(600));
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.completed_events), (0, 0), "{stats:?}");
    assert_eq!(stats.provider_specific["expired"], 3000);
}

/// Redis restarted without persistence: the stream and every group are gone, and other instances'
/// writers store what they held (their retried batches) as soon as it answers, typically before a
/// member's next fetch. The member's group, made again, starts where the member was, so those
/// events reach it: the new stream holds nothing it has seen.
#[test]
fn a_group_made_again_receives_what_was_stored_after_its_stream_vanished() {
    let backend = RedisBackend::with(|_| {});
    let (receiver, publisher) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let source = open(&receiver, "a", ConsumerGroup::Instance("a".into()), &scope);
    let b = ConsumerGroup::Instance("b".into()).key();
    publisher.store_batch(&[Arc::new(scope.event("before"))], Some(&b)).expect("store");
    take_acked(&*source, 1);
    let _: i64 = redis::cmd("DEL").arg(backend.stream()).query(&mut raw()).expect("DEL");
    let during = scope.event("during");
    publisher.store_batch(&[Arc::new(during.clone())], Some(&b)).expect("store after the loss");
    let got = take_acked(&*source, 1);
    assert_eq!(got[0].event.id, during.id);
    assert!(source.fetch(16, Duration::from_millis(200)).expect("fetch").is_empty(), "nothing twice");
    source.close().expect("close");
}

/// Durations at their maximum mean "never" and work as such, or are refused when the provider is
/// built: a `timeout` of `Duration::MAX` does not make a fetch panic, a claim idle time of
/// `Duration::MAX` does not make every fetch fail, and a `status_ttl` longer than the scripts can
/// compute with is refused rather than failing every status update that finishes an event.
#[test]
fn durations_at_their_maximum_neither_panic_nor_fail_every_call() {
    let scope = Scope::new();
    let backend = RedisBackend::with(|c| c.timeout = Duration::MAX);
    let provider = backend.provider();
    let source = provider
        .open_inbound(
            &InboundConfig::new("a", ConsumerGroup::Shared(scope.name("q"))).with_claim_idle(Duration::MAX),
        )
        .expect("open_inbound");
    let event = scope.event("never");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    let got = take_acked(&*source, 1);
    assert_eq!(got[0].event.id, event.id);
    let again = scope.event("never");
    provider.store_batch(&[Arc::new(again.clone())], None).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let batch = source.fetch(1, Duration::from_millis(200)).expect("fetch");
        if let Some(first) = batch.into_iter().next() {
            break first;
        }
        assert!(Instant::now() < deadline, "the second event never came");
    };
    source.nak(&[held.token], Duration::ZERO).expect("nak");
    source.extend(&[held.token]).expect("extend");
    assert_eq!(take_acked(&*source, 1)[0].event.id, again.id, "handed out again after the nak");
    source.close().expect("close");

    let config = RedisConfig { status_ttl: Some(Duration::MAX), ..backend.config() };
    let error = RedisProvider::connect(config).expect_err("a TTL Redis cannot express");
    assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}");
    assert!(error.to_string().contains("status_ttl"), "{error}");
}

/// A closing queue member releases everything it held, however much: more than one call's worth
/// (1024 entries) included.
#[test]
fn a_closing_queue_member_releases_more_than_a_thousand_events() {
    let backend = RedisBackend::with(|_| {});
    let (p1, p2) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let leaving = open(&p1, "m1", queue.clone(), &scope);
    let staying = open(&p2, "m2", queue, &scope);
    let events: Vec<Event> = (0..1100).map(|_| scope.event("job")).collect();
    p1.store_batch(&shared(&events), None).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = 0;
    while held < events.len() {
        assert!(Instant::now() < deadline, "the first member got only {held}");
        held += leaving.fetch(256, Duration::from_millis(100)).expect("fetch").len();
    }
    leaving.close().expect("close");
    let started = Instant::now();
    let got = take_acked(&*staying, events.len());
    assert!(started.elapsed() < Duration::from_secs(10), "released after {:?}", started.elapsed());
    assert_eq!(got.len(), events.len());
    staying.close().expect("close");
}

/// The consumers of `group` on the backend's stream, each with how many entries it holds.
fn consumers(backend: &RedisBackend, group: &ConsumerGroup) -> Vec<(String, u64)> {
    let rows: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(backend.stream())
        .arg(group.key())
        .query(&mut raw())
        .expect("XINFO CONSUMERS");
    rows.into_iter()
        .map(|row| {
            let name: String = redis::from_redis_value(row["name"].clone()).expect("a name");
            let pending: u64 = redis::from_redis_value(row["pending"].clone()).expect("a count");
            (name, pending)
        })
        .collect()
}

/// A source that closes holding nothing removes its consumer from the group, so instances that
/// come and go leave no trace there; one that closes holding entries stays, for its next
/// incarnation to take them over, and leaves once that one closes holding nothing.
#[test]
fn a_member_that_closes_holding_nothing_leaves_its_group() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let other = ConsumerGroup::Instance(scope.name("other")).key();
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let member = open(&provider, "m1", queue.clone(), &scope);
    provider.store_batch(&[Arc::new(scope.event("job"))], Some(&other)).expect("store");
    take_acked(&*member, 1);
    assert_eq!(consumers(&backend, &queue), [("m1".to_owned(), 0)]);
    member.close().expect("close");
    assert_eq!(consumers(&backend, &queue), [], "a queue member holding nothing leaves");

    let group = ConsumerGroup::Instance(scope.name("a"));
    let instance = open(&provider, "a", group.clone(), &scope);
    provider.store_batch(&[Arc::new(scope.event("held"))], Some(&other)).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    while instance.fetch(1, Duration::from_millis(100)).expect("fetch").is_empty() {
        assert!(Instant::now() < deadline, "the event never came");
    }
    instance.close().expect("close");
    assert_eq!(consumers(&backend, &group), [("a".to_owned(), 1)], "one holding an entry stays");
    let next = open(&provider, "a", group.clone(), &scope);
    assert_eq!(take_acked(&*next, 1)[0].deliveries, 2, "its next incarnation takes it over");
    next.close().expect("close");
    assert_eq!(consumers(&backend, &group), [], "and leaves holding nothing");
}

/// A member that vanished (dropped without closing, as a crashed process) stays a consumer until
/// the others have claimed what it held and it has been idle for `max(10 × claim_idle, 1 s)`; then
/// a sweep of a live member removes it. The sweeping member stays.
#[test]
fn members_sweep_away_consumers_that_are_gone() {
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let config =
        |name: &str| InboundConfig::new(name, queue.clone()).with_claim_idle(Duration::from_millis(100));
    let crashed = provider.open_inbound(&config("gone")).expect("open_inbound");
    provider.store_batch(&[Arc::new(scope.event("job"))], None).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    while crashed.fetch(1, Duration::from_millis(100)).expect("fetch").is_empty() {
        assert!(Instant::now() < deadline, "the event never came");
    }
    drop(crashed);
    let went = Instant::now();
    let alive = provider.open_inbound(&config("alive")).expect("open_inbound");
    assert_eq!(take_acked(&*alive, 1)[0].deliveries, 2, "claimed from the member that vanished");
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let names: Vec<String> = consumers(&backend, &queue).into_iter().map(|(name, _)| name).collect();
        if names == ["alive"] {
            break;
        }
        assert!(Instant::now() < deadline, "still consumers after {:?}: {names:?}", went.elapsed());
        assert!(alive.fetch(16, Duration::from_millis(100)).expect("fetch").is_empty());
    }
    assert!(went.elapsed() >= Duration::from_secs(1), "removed after only {:?}", went.elapsed());
    alive.close().expect("close");
}

/// A nak longer than the claim idle time holds: neither another member's claim scan, nor the next
/// incarnation of an instance taking over what its predecessor left, hands the event out before the
/// delay has passed (Redis' idle times cannot go below 0, so the delay is recorded beside them).
#[test]
fn a_nak_longer_than_the_claim_idle_time_holds_for_every_member() {
    const DELAY: Duration = Duration::from_millis(1200);
    // Redis keeps the due time in whole milliseconds of its clock.
    const EARLIEST: Duration = DELAY.saturating_sub(Duration::from_millis(2));
    let backend = RedisBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let config = |name: &str, group: &ConsumerGroup| {
        InboundConfig::new(name, group.clone()).with_claim_idle(Duration::from_millis(100))
    };
    let fetch_one = |source: &dyn Inbound| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(event) = source.fetch(1, Duration::from_millis(50)).expect("fetch").pop() {
                return event;
            }
            assert!(Instant::now() < deadline, "the event never came");
        }
    };

    let queue = ConsumerGroup::Shared(scope.name("q"));
    let first = provider.open_inbound(&config("m1", &queue)).expect("open_inbound");
    let second = provider.open_inbound(&config("m2", &queue)).expect("open_inbound");
    provider.store_batch(&[Arc::new(scope.event("job"))], None).expect("store");
    let held = fetch_one(&*first);
    // Stamped before the nak: Redis stamps it on arrival, to its clock's millisecond.
    let naked = Instant::now();
    first.nak(&[held.token], DELAY).expect("nak");
    // Only the other member fetches: its claim scans run every 25 ms.
    let again = fetch_one(&*second);
    assert!(naked.elapsed() >= EARLIEST, "taken over {:?} after a nak of {DELAY:?}", naked.elapsed());
    assert_eq!((again.event.id, again.deliveries), (held.event.id, 2));
    second.ack(&[Ack::handled(again.token)]).expect("ack");
    for source in [first, second] {
        source.close().expect("close");
    }

    let group = ConsumerGroup::Instance(scope.name("a"));
    let instance = provider.open_inbound(&config("a", &group)).expect("open_inbound");
    provider.store_batch(&[Arc::new(scope.event("job"))], None).expect("store");
    let held = fetch_one(&*instance);
    let naked = Instant::now();
    instance.nak(&[held.token], DELAY).expect("nak");
    instance.close().expect("close");
    let next = provider.open_inbound(&config("a", &group)).expect("open_inbound");
    let again = fetch_one(&*next);
    assert!(naked.elapsed() >= EARLIEST, "redelivered {:?} after a nak of {DELAY:?}", naked.elapsed());
    assert_eq!(again.event.id, held.event.id);
    next.ack(&[Ack::handled(again.token)]).expect("ack");
    next.close().expect("close");
}

/// Entries trimmed before a lagging group read them are lost to it, and `Inbound::lost` says how
/// many, exactly (counted from Redis' `entries-added` and the group's `entries-read`), once; every
/// member of the group reports the group's count.
#[test]
fn entries_trimmed_before_a_group_read_them_are_counted_lost() {
    let backend = RedisBackend::with(|c| c.max_len = 10);
    let provider = backend.provider();
    let scope = Scope::new();
    let other = ConsumerGroup::Instance(scope.name("other")).key();
    let store = |n: usize| {
        let events: Vec<Event> = (0..n).map(|_| scope.event("job")).collect();
        provider.store_batch(&shared(&events), Some(&other)).expect("store");
        events
    };
    let queue = ConsumerGroup::Shared(scope.name("q"));
    let member = open(&provider, "m1", queue.clone(), &scope);
    let idle = open(&provider, "m2", queue, &scope);
    store(5);
    take_acked(&*member, 5);
    assert_eq!(member.lost(), 0);
    // 30 more, while the group reads nothing: the stream keeps the last 10 of the 35.
    let kept: Vec<EventId> = store(30).into_iter().skip(20).map(|e| e.id).collect();
    let got: Vec<EventId> = take_acked(&*member, 10).into_iter().map(|e| e.event.id).collect();
    assert_eq!(got, kept, "what the stream still held, in order");
    assert_eq!(member.lost(), 20, "the 20 unread entries trimmed");
    store(3);
    take_acked(&*member, 3);
    assert_eq!(member.lost(), 20, "counted once");
    assert!(idle.fetch(16, Duration::from_millis(50)).expect("fetch").is_empty());
    assert_eq!(idle.lost(), 20, "the group's count, as every member reports it");
    for source in [member, idle] {
        source.close().expect("close");
    }
}

/// Deleting an event a group has not read yet loses the group nothing: `delete` credits the
/// group's read counter, so `Inbound::lost` stays 0 when the group reads past the gap, and once
/// trimming takes entries around a deleted one, only the unread trimmed ones count.
#[test]
fn an_entry_deleted_before_a_group_read_it_is_not_counted_lost() {
    let backend = RedisBackend::with(|c| c.max_len = 10);
    let provider = backend.provider();
    let scope = Scope::new();
    let other = ConsumerGroup::Instance(scope.name("other")).key();
    let store = |n: usize| {
        let events: Vec<Event> = (0..n).map(|_| scope.event("job")).collect();
        provider.store_batch(&shared(&events), Some(&other)).expect("store");
        events
    };
    let ids =
        |events: Vec<InboundEvent>| -> Vec<EventId> { events.into_iter().map(|e| e.event.id).collect() };
    // A claim scan every 100 ms: each one looks for lost entries once the group read the last.
    let member = provider
        .open_inbound(
            &InboundConfig::new("m1", ConsumerGroup::Shared(scope.name("q")))
                .with_claim_idle(Duration::from_millis(400)),
        )
        .expect("open_inbound");
    member.set_filter(&[scope.all()]).expect("set_filter");
    store(3);
    take_acked(&*member, 3);
    let behind = store(3);
    assert!(provider.delete(behind[0].id).expect("delete"), "the next entry the group reads");
    assert_eq!(ids(take_acked(&*member, 2)), [behind[1].id, behind[2].id]);
    let looking = Instant::now();
    while looking.elapsed() < Duration::from_millis(500) {
        assert!(member.fetch(16, Duration::from_millis(50)).expect("fetch").is_empty());
    }
    assert_eq!(member.lost(), 0, "a deleted entry is no loss");
    // 4 more, the first deleted, then 30, while the group reads nothing: trimming keeps about
    // the last 10, and the group lost the other 33 it had not read.
    let ahead = store(4);
    assert!(provider.delete(ahead[0].id).expect("delete"));
    let unread: Vec<EventId> = ahead[1..].iter().chain(&store(30)).map(|e| e.id).collect();
    let held: HashSet<EventId> = stream_ids(&backend).into_iter().map(|(_, id)| id).collect();
    let kept: Vec<EventId> = unread.iter().copied().filter(|id| held.contains(id)).collect();
    assert!((10..20).contains(&kept.len()), "trimmed to {} entries", kept.len());
    assert_eq!(ids(take_acked(&*member, kept.len())), kept, "what the stream still held, in order");
    assert_eq!(member.lost(), (unread.len() - kept.len()) as u64, "the unread entries trimmed");
    member.close().expect("close");
}

/// A replay from a late time over a long stream starts where the events created since are,
/// found from the time index, rather than reading the stream from its first entry (4096 entries a
/// call, so 5 calls of empty pages here, hundreds over a production stream): one call returns
/// them all, an event stored earlier than the others but created after the time included.
#[test]
fn a_replay_from_a_late_time_starts_where_the_time_is() {
    let backend = RedisBackend::with(|c| c.max_len = 0);
    let provider = backend.provider();
    let scope = Scope::new();
    let base = jiff::Timestamp::now();
    let at = |i: u64| base + Duration::from_millis(i);
    let mut events: Vec<Event> = (0..20_000)
        .map(|i| {
            let mut event = scope.event("tick");
            event.created_at = at(i);
            event
        })
        .collect();
    // Stored at position 19 000 but created after the replay's time: out of creation order.
    events[19_000].created_at = at(19_950) + Duration::from_nanos(1);
    for batch in events.chunks(1000) {
        provider.store_batch(&shared(batch), None).expect("store");
    }
    let from = at(19_900);
    let page = provider.replay(ReplayFrom::Time(from), None, 500).expect("replay");
    let got: Vec<EventId> = page.events.iter().map(|e| e.event.id).collect();
    let want: Vec<EventId> = events.iter().filter(|e| e.created_at >= from).map(|e| e.id).collect();
    assert_eq!(want.len(), 101);
    assert_eq!(got, want, "every event created since, in stream order, in one call");
    assert!(page.end, "the stream's end, in the same call");
    // Nothing created since: one call, ending past the last entry.
    let later = provider.replay(ReplayFrom::Time(at(30_000)), None, 500).expect("replay");
    assert!(later.events.is_empty() && later.end);
    let last = stream_ids(&backend).last().map(|(entry, _)| entry.clone()).expect("entries");
    let (ms, n) = last.split_once('-').expect("an entry id");
    let after = (ms.parse::<u64>().expect("ms") << 20) | (n.parse::<u64>().expect("n") + 1);
    assert_eq!(later.next, Some(after), "a later replay goes on past the last entry");
}

/// Deleted events' names stay in the order list until trimming reaches them, and count towards
/// nothing: a store trims the stream to `max_len` exactly (with `max_len` 10 there is no slack),
/// taking further names when some it took were deleted. (A deleted name at the list's head is
/// dropped before trimming, as one older than the stream's first entry; one behind a live name
/// was counted as trimmed, and the stream kept 11.)
#[test]
fn trimming_after_deletes_keeps_max_len_exactly() {
    let backend = RedisBackend::with(|c| c.max_len = 10);
    let provider = backend.provider();
    let scope = Scope::new();
    let store = |n: usize| {
        let events: Vec<Event> = (0..n).map(|_| scope.event("job")).collect();
        provider.store_batch(&shared(&events), None).expect("store");
        events
    };
    let len = || -> usize { redis::cmd("XLEN").arg(backend.stream()).query(&mut raw()).expect("XLEN") };
    let stored = store(20);
    assert_eq!(len(), 10, "the last 10 of 20");
    // The second and third oldest kept.
    for event in &stored[11..13] {
        assert!(provider.delete(event.id).expect("delete"));
    }
    store(4);
    assert_eq!(len(), 10, "8 + 4, trimmed past the deleted names");
    for n in 0..5 {
        store(1);
        assert_eq!(len(), 10, "after store {n}");
    }
    assert_eq!(provider.stats().expect("stats").total_events, 10, "counts stay exact");
}
