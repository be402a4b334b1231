//! Single-provider scenarios: writes, queries, dead letters, replay, stats and closing, each on
//! one provider handle.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};

use super::{EXCLUSIVE, Scope, assert_not_supported};
use crate::{
    ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId, Event, EventFilter, EventId, EventSource,
    EventStatus, InboundConfig, Pattern, Provider, ProviderError, ProviderErrorKind, ProviderStats,
    ReplayFrom, StatusUpdate, SubscriptionId,
};

/// Whether the provider lists; when it does not, checks it says so.
fn can_list(provider: &dyn Provider) -> bool {
    provider.capabilities().list || {
        assert_not_supported(provider.list(&EventFilter::new()), "list");
        false
    }
}

/// Whether the provider replays; when it does not, checks it says so.
fn can_replay(provider: &dyn Provider) -> bool {
    provider.capabilities().replay || {
        assert_not_supported(provider.replay(ReplayFrom::Beginning, None, 1), "replay");
        false
    }
}

/// Whether the provider deletes; when it does not, checks it says so.
fn can_delete(provider: &dyn Provider) -> bool {
    provider.capabilities().delete || {
        assert_not_supported(provider.delete(EventId::new()), "delete");
        false
    }
}

fn shared(events: &[Event]) -> Vec<Arc<Event>> {
    events.iter().cloned().map(Arc::new).collect()
}

fn ids(events: &[Event]) -> Vec<EventId> {
    events.iter().map(|e| e.id).collect()
}

/// Ids of `events` that satisfy `keep`, in `(created_at, id)` order: the reference for `list`.
fn expected(events: &[Event], keep: impl Fn(&Event) -> bool) -> Vec<EventId> {
    let mut kept: Vec<&Event> = events.iter().filter(|e| keep(e)).collect();
    kept.sort_by_key(|e| (e.created_at, e.id));
    kept.iter().map(|e| e.id).collect()
}

fn random_subscription() -> SubscriptionId {
    SubscriptionId::from_raw(EventId::new().as_uuid().as_u64_pair().1)
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

fn assert_closed<T: std::fmt::Debug>(result: Result<T, ProviderError>, operation: &str) {
    match result {
        Err(error) => assert_eq!(error.kind(), &ProviderErrorKind::Closed, "{operation}: {error}"),
        Ok(value) => panic!("{operation} after close returned Ok({value:?})"),
    }
}

fn stats(provider: &dyn Provider) -> ProviderStats {
    provider.stats().expect("stats")
}

/// `after - before` for one counter, which must not have gone down.
fn delta(before: u64, after: u64) -> u64 {
    after.checked_sub(before).unwrap_or_else(|| panic!("counter went down: {before} -> {after}"))
}

/// An event with every field set to something a lossy backend would get wrong.
fn full_event(scope: &Scope) -> Event {
    let mut event = Event::for_entity(EventSource::Websocket, "public", "users", "update")
        .with_user_id(9_007_199_254_740_993) // not representable as an f64
        .with_session_id("session-ß-42")
        .with_instance_id("instance-a")
        .with_metadata("trace", "00-abc-01")
        .with_metadata("nested", serde_json::json!({"k": [1, 2.5, null, "ü"]}))
        .with_partition_key("tenant-7");
    event.event_type = scope.ty("public.users.update").into();
    event.status = EventStatus::Failed;
    event.retry_count = 3;
    "handler \"mail\" failed: timeout ✉".clone_into(&mut event.error);
    event
        .set_payload_json("{ \"name\" : \"Zoë\",\n  \"n\": 1.50, \"big\": 12345678901234567890, \"l\": [1, {\"a\": null}] }")
        .expect("valid JSON");
    event.created_at = Timestamp::new(1_700_000_000, 123_456_789).expect("a valid time");
    event.processed_at = Some(Timestamp::new(1_700_000_001, 1).expect("a valid time"));
    event.completed_at = Some(Timestamp::new(1_700_000_002, 999_999_999).expect("a valid time"));
    event
}

/// Every field of an event survives a store and comes back equal, the payload text byte for byte.
pub fn round_trip_keeps_every_field(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let event = full_event(&scope);
    let payload = event.payload_json().expect("a payload").to_owned();
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");

    let got = provider.get(event.id).expect("get").expect("stored");
    assert_eq!(got, event);
    assert_eq!(got.payload_json(), Some(payload.as_str()), "payload text must be byte-exact");
    if can_list(provider) {
        assert_eq!(scope.list(provider), vec![event.clone()]);
    }
    if can_replay(provider) {
        let replayed = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
        assert_eq!(replayed.len(), 1);
        assert_eq!(replayed[0].event, event);
    }
}

/// `get` of an id never stored is `None`, not an error.
pub fn get_unknown_id_is_none(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    assert_eq!(provider.get(EventId::new()).expect("get"), None);
}

/// Empty batches are accepted and change nothing.
pub fn empty_batches_are_no_ops(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    provider.store_batch(&[], None).expect("empty store");
    provider.update_status_batch(&[]).expect("empty update");
    provider.store_dead_letters(&[]).expect("empty dead letters");
}

/// A re-store replaces the event, keeps its sequence number and is counted once.
pub fn store_again_replaces_without_double_count(provider: &dyn Provider) {
    if !(can_list(provider) && can_replay(provider)) {
        return;
    }
    let _exclusive = EXCLUSIVE.write();
    let scope = Scope::new();
    let before = stats(provider);

    let original = scope.event("orders.create");
    provider.store_batch(&[Arc::new(original.clone())], None).expect("store");
    let seq = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events[0].seq;

    let mut replacement = original.clone();
    replacement.status = EventStatus::Completed;
    replacement.set_payload_json(r#"{"v":2}"#).expect("valid JSON");
    replacement.created_at = original.created_at.checked_add(secs(1)).expect("in range");
    provider.store_batch(&[Arc::new(replacement.clone())], None).expect("store again");
    provider.store_batch(&[Arc::new(replacement.clone())], None).expect("store the same again");

    // Within one batch the later element wins.
    let first = scope.event("orders.create");
    let mut second = first.clone();
    second.status = EventStatus::Processing;
    provider.store_batch(&shared(&[first, second.clone()]), None).expect("batch with a repeated id");

    assert_eq!(provider.get(original.id).expect("get"), Some(replacement.clone()));
    assert_eq!(provider.get(second.id).expect("get"), Some(second.clone()));
    assert_eq!(ids(&scope.list(provider)), expected(&[replacement.clone(), second.clone()], |_| true));
    let replayed = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
    assert_eq!(replayed.len(), 2, "a re-store must not add a replay entry");
    assert_eq!((replayed[0].seq, &replayed[0].event), (seq, &replacement), "a re-store keeps its seq");
    assert!(replayed[1].seq > seq);

    let after = stats(provider);
    assert_eq!(delta(before.total_events, after.total_events), 2);
    assert_eq!(delta(before.pending_events, after.pending_events), 0);
    assert_eq!(delta(before.processing_events, after.processing_events), 1);
    assert_eq!(delta(before.completed_events, after.completed_events), 1);
    assert_eq!(delta(before.events_published, after.events_published), 2);
}

/// A re-store that changes the event's type is listed by its new type, and no longer by its old
/// one in `list` or `replay`; it keeps its sequence number. (NATS replays it only with a pattern
/// that also covers its first type, which the module docs say.)
pub fn a_re_store_with_another_type_is_found_by_that_type(provider: &dyn Provider) {
    if !(can_list(provider) && can_replay(provider)) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let original = scope.event("orders.create");
    provider.store_batch(&[Arc::new(original.clone())], None).expect("store");
    let seq = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events[0].seq;
    let mut renamed = original.clone();
    renamed.event_type = scope.ty("orders.cancel").into();
    provider.store_batch(&[Arc::new(renamed.clone())], None).expect("store again");

    assert_eq!(provider.get(original.id).expect("get"), Some(renamed.clone()));
    let list = |rest: &str| {
        ids(&provider.list(&EventFilter::new().with_event_type(scope.pattern(rest))).expect("list"))
    };
    assert_eq!(list("orders.cancel"), vec![renamed.id], "listed by its new type");
    assert_eq!(list("orders.create"), Vec::<EventId>::new(), "not by its old one");
    assert_eq!(list("orders.*"), vec![renamed.id]);
    let replay = |rest: &str| {
        provider.replay(ReplayFrom::Beginning, Some(&scope.pattern(rest)), 10).expect("replay").events
    };
    assert_eq!(replay("orders.create"), Vec::new(), "the old type no longer matches");
    let by_scope = replay(">");
    assert_eq!(by_scope.iter().map(|s| (s.seq, &s.event)).collect::<Vec<_>>(), vec![(seq, &renamed)]);
}

/// A batch of 1000 is stored whole, in slice (sequence) order.
pub fn store_batch_of_1000(provider: &dyn Provider) {
    if !(can_list(provider) && can_replay(provider)) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let events: Vec<Event> = (0..1000).map(|i| scope.event(&format!("bulk.t{}", i % 10))).collect();
    provider.store_batch(&shared(&events), None).expect("store 1000");

    assert_eq!(ids(&scope.list(provider)), expected(&events, |_| true));
    for i in [0, 499, 999] {
        assert_eq!(provider.get(events[i].id).expect("get").as_ref(), Some(&events[i]));
    }
    let replayed = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 2000).expect("replay").events;
    assert_eq!(
        replayed.iter().map(|s| s.event.id).collect::<Vec<_>>(),
        ids(&events),
        "seq order is batch order"
    );
    assert!(replayed.windows(2).all(|w| w[0].seq < w[1].seq));
}

const SCHEMAS: [&str; 2] = ["public", "audit"];
const ENTITIES: [&str; 3] = ["users", "posts", "orders"];
const OPERATIONS: [&str; 4] = ["create", "update", "delete", "read"];
const INSTANCES: [&str; 2] = ["instance-a", "instance-b"];

/// 24 events that differ in every filtered field, created over 12 seconds from `base` with two
/// events per second (so ties on `created_at` are broken by id), stored newest first.
fn list_fixture(provider: &dyn Provider, scope: &Scope, base: Timestamp) -> Vec<Event> {
    let events: Vec<Event> = (0..24_usize)
        .map(|i| {
            let (schema, entity, operation) = (SCHEMAS[i % 2], ENTITIES[i % 3], OPERATIONS[(i / 2) % 4]);
            let mut event =
                Event::new(EventSource::ALL[i % 5], scope.ty(&format!("{schema}.{entity}.{operation}")))
                    .with_entity(schema, entity, operation)
                    .with_user_id(i64::try_from(i % 3).expect("small") + 1)
                    .with_instance_id(INSTANCES[(i / 3) % 2]);
            event.status = EventStatus::ALL[i % 4];
            let second = i64::try_from((i * 7) % 12).expect("small");
            event.created_at = base.checked_add(secs(second)).expect("in range");
            event
        })
        .collect();
    let mut newest_first = events.clone();
    newest_first.sort_by_key(|e| std::cmp::Reverse((e.created_at, e.id)));
    provider.store_batch(&shared(&newest_first), None).expect("store fixture");
    events
}

/// `list` applies each filter of [`EventFilter`] alone and combined, against a reference.
pub fn list_each_filter_alone_and_combined(provider: &dyn Provider) {
    if !can_list(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let base = Timestamp::now().checked_sub(secs(3600)).expect("in range");
    let events = list_fixture(provider, &scope, base);
    let list = |filter: EventFilter| ids(&provider.list(&filter).expect("list"));
    let t = |s: i64| base.checked_add(secs(s)).expect("in range");

    assert_eq!(list(scope.filter()), expected(&events, |_| true));
    for source in EventSource::ALL {
        assert_eq!(
            list(scope.filter().with_source(source)),
            expected(&events, |e| e.source == source),
            "{source}"
        );
    }
    for status in EventStatus::ALL {
        assert_eq!(
            list(scope.filter().with_status(status)),
            expected(&events, |e| e.status == status),
            "{status}"
        );
    }
    for user in [1, 2, 3, 4] {
        assert_eq!(
            list(scope.filter().with_user_id(user)),
            expected(&events, |e| e.user_id == user),
            "user {user}"
        );
    }
    for schema in SCHEMAS {
        assert_eq!(list(scope.filter().with_schema(schema)), expected(&events, |e| e.schema == schema));
    }
    for entity in ENTITIES {
        assert_eq!(list(scope.filter().with_entity(entity)), expected(&events, |e| e.entity == entity));
    }
    for operation in OPERATIONS {
        assert_eq!(
            list(scope.filter().with_operation(operation)),
            expected(&events, |e| e.operation == operation)
        );
    }
    for instance in INSTANCES {
        assert_eq!(
            list(scope.filter().with_instance_id(instance)),
            expected(&events, |e| e.instance_id == instance)
        );
    }
    assert_eq!(list(scope.filter().with_start_time(t(5))), expected(&events, |e| e.created_at >= t(5)));
    assert_eq!(list(scope.filter().with_end_time(t(5))), expected(&events, |e| e.created_at < t(5)));
    assert_eq!(list(scope.filter().with_schema("nope")), Vec::<EventId>::new());

    // The type pattern on its own (the scope pattern is one too).
    let creates = scope.pattern("*.*.create");
    assert_eq!(
        list(EventFilter::new().with_event_type(creates.clone())),
        expected(&events, |e| e.operation == "create")
    );
    assert_eq!(
        list(EventFilter::new().with_event_type(scope.pattern("public.users.*"))),
        expected(&events, |e| e.schema == "public" && e.entity == "users")
    );
    assert_eq!(
        list(EventFilter::new().with_event_type(scope.pattern("audit.>"))),
        expected(&events, |e| e.schema == "audit")
    );
    assert_eq!(list(EventFilter::new().with_event_type(scope.pattern("public"))), Vec::<EventId>::new());

    // Combined.
    let combined = scope
        .filter()
        .with_status(EventStatus::Pending)
        .with_user_id(1)
        .with_schema("public")
        .with_start_time(t(0))
        .with_end_time(t(12));
    let reference = |e: &Event| {
        e.status == EventStatus::Pending && e.user_id == 1 && e.schema == "public" && e.created_at < t(12)
    };
    assert_eq!(list(combined), expected(&events, reference));
    let combined = EventFilter::new()
        .with_event_type(creates)
        .with_source(EventSource::Database)
        .with_instance_id("instance-a")
        .with_entity("users");
    assert_eq!(
        list(combined),
        expected(&events, |e| {
            e.operation == "create"
                && e.source == EventSource::Database
                && e.instance_id == "instance-a"
                && e.entity == "users"
        })
    );
    let public = expected(&events, |e| e.schema == "public" && e.created_at >= t(2));
    assert!(public.len() > 3);
    assert_eq!(
        list(scope.filter().with_schema("public").with_start_time(t(2)).with_offset(1).with_limit(2)),
        public[1..3].to_vec()
    );
}

/// `list` orders by `(created_at, id)`, then applies offset and limit.
pub fn list_order_limit_and_offset(provider: &dyn Provider) {
    if !can_list(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let base = Timestamp::now().checked_sub(secs(600)).expect("in range");
    let events = list_fixture(provider, &scope, base);
    let all = expected(&events, |_| true);
    let list = |filter: EventFilter| ids(&provider.list(&filter).expect("list"));

    assert_eq!(list(scope.filter()), all, "(created_at, id) order, whatever the store order");
    assert_eq!(list(scope.filter().with_limit(5)), all[..5].to_vec());
    assert_eq!(list(scope.filter().with_offset(5)), all[5..].to_vec());
    assert_eq!(list(scope.filter().with_offset(20).with_limit(10)), all[20..].to_vec());
    assert_eq!(list(scope.filter().with_offset(3).with_limit(4)), all[3..7].to_vec());
    assert_eq!(list(scope.filter().with_limit(0)), Vec::<EventId>::new());
    assert_eq!(list(scope.filter().with_offset(24)), Vec::<EventId>::new(), "offset at the end");
    assert_eq!(list(scope.filter().with_offset(25)), Vec::<EventId>::new(), "offset past the end");
    assert_eq!(list(scope.filter().with_offset(usize::MAX).with_limit(1)), Vec::<EventId>::new());

    // Pages of 5 cover the list exactly once.
    let paged: Vec<EventId> =
        (0..5).flat_map(|page| list(scope.filter().with_offset(page * 5).with_limit(5))).collect();
    assert_eq!(paged, all);
}

/// `list` time windows are `[start, end)`.
pub fn list_time_window_is_half_open(provider: &dyn Provider) {
    if !can_list(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let base = Timestamp::now().checked_sub(secs(60)).expect("in range");
    let events: Vec<Event> = (0..4)
        .map(|i| {
            let mut event = scope.event("window.tick");
            event.created_at = base.checked_add(secs(i)).expect("in range");
            event
        })
        .collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let t = |s: i64| base.checked_add(secs(s)).expect("in range");
    let window = |from: i64, to: i64| {
        ids(&provider.list(&scope.filter().with_start_time(t(from)).with_end_time(t(to))).expect("list"))
    };

    assert_eq!(window(1, 3), vec![events[1].id, events[2].id], "start inclusive, end exclusive");
    assert_eq!(window(0, 1), vec![events[0].id]);
    assert_eq!(window(2, 2), Vec::<EventId>::new());
    let mut consecutive = window(0, 2);
    consecutive.extend(window(2, 4));
    assert_eq!(consecutive, ids(&events), "consecutive windows neither overlap nor leave a gap");
}

/// Status updates set exactly the fields [`StatusUpdate`] describes.
pub fn status_updates_single_and_batch(provider: &dyn Provider) {
    if !can_list(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let mut events: Vec<Event> = (0..4).map(|_| scope.event("jobs.run")).collect();
    events[0].set_payload_json(r#"{"keep": "me"}"#).expect("valid JSON");
    provider.store_batch(&shared(&events), None).expect("store");
    let started = Timestamp::now();
    let ended = started.checked_add(secs(2)).expect("in range");

    // One update.
    provider
        .update_status_batch(&[
            StatusUpdate::new(events[0].id, EventStatus::Processing).with_processed_at(started)
        ])
        .expect("update");
    let mut expect0 = events[0].clone();
    expect0.status = EventStatus::Processing;
    expect0.processed_at = Some(started);
    assert_eq!(provider.get(events[0].id).expect("get"), Some(expect0.clone()));

    // A batch: timestamps, error text, retry count, an unknown id, two updates to one id.
    provider
        .update_status_batch(&[
            StatusUpdate::new(events[0].id, EventStatus::Completed).with_completed_at(ended),
            StatusUpdate::new(events[1].id, EventStatus::Failed)
                .with_error("smtp: 421 try later")
                .with_retry_count(3)
                .with_processed_at(started)
                .with_completed_at(ended),
            StatusUpdate::new(EventId::new(), EventStatus::Completed),
            StatusUpdate::new(events[2].id, EventStatus::Processing).with_processed_at(started),
            StatusUpdate::new(events[2].id, EventStatus::Completed).with_completed_at(ended),
        ])
        .expect("batch update");

    expect0.status = EventStatus::Completed;
    expect0.completed_at = Some(ended); // processed_at kept: the update carried none
    let mut expect1 = events[1].clone();
    expect1.status = EventStatus::Failed;
    "smtp: 421 try later".clone_into(&mut expect1.error);
    expect1.retry_count = 3;
    expect1.processed_at = Some(started);
    expect1.completed_at = Some(ended);
    let mut expect2 = events[2].clone();
    expect2.status = EventStatus::Completed;
    expect2.processed_at = Some(started);
    expect2.completed_at = Some(ended);
    assert_eq!(provider.get(events[0].id).expect("get"), Some(expect0.clone()));
    assert_eq!(provider.get(events[1].id).expect("get"), Some(expect1.clone()));
    assert_eq!(provider.get(events[2].id).expect("get"), Some(expect2.clone()));
    assert_eq!(provider.get(events[3].id).expect("get"), Some(events[3].clone()), "untouched");

    let by_status = |status| ids(&provider.list(&scope.filter().with_status(status)).expect("list"));
    assert_eq!(by_status(EventStatus::Completed), expected(&[expect0, expect2], |_| true));
    assert_eq!(by_status(EventStatus::Failed), vec![events[1].id]);
    assert_eq!(by_status(EventStatus::Pending), vec![events[3].id]);
    assert_eq!(by_status(EventStatus::Processing), Vec::<EventId>::new());

    // An empty error clears the stored one; the retry count is set, not added to.
    provider
        .update_status_batch(&[StatusUpdate::new(events[1].id, EventStatus::Pending).with_retry_count(1)])
        .expect("update");
    let got = provider.get(events[1].id).expect("get").expect("stored");
    assert_eq!((got.status, got.error.as_str(), got.retry_count), (EventStatus::Pending, "", 1));
    assert_eq!((got.processed_at, got.completed_at), (Some(started), Some(ended)));
}

/// An update for an unknown id is skipped, not an error, and creates nothing.
pub fn status_update_for_unknown_id_is_skipped(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    let unknown = StatusUpdate::new(EventId::new(), EventStatus::Failed).with_error("gone");
    provider.update_status_batch(std::slice::from_ref(&unknown)).expect("an unknown id is not an error");
    assert_eq!(provider.get(unknown.id).expect("get"), None, "an update does not create an event");
}

/// `delete` removes an event from `get`, `list` and `replay`.
pub fn delete_removes_everywhere(provider: &dyn Provider) {
    if !(can_delete(provider) && can_list(provider) && can_replay(provider)) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let events: Vec<Event> = (0..3).map(|_| scope.event("items.create")).collect();
    provider.store_batch(&shared(&events), None).expect("store");

    assert!(provider.delete(events[1].id).expect("delete"));
    assert_eq!(provider.get(events[1].id).expect("get"), None);
    assert_eq!(ids(&scope.list(provider)), vec![events[0].id, events[2].id]);
    let replayed = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
    assert_eq!(replayed.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![events[0].id, events[2].id]);

    assert!(!provider.delete(events[1].id).expect("delete again"), "a second delete finds nothing");
    assert!(!provider.delete(EventId::new()).expect("delete unknown"));
    provider
        .update_status_batch(&[StatusUpdate::new(events[1].id, EventStatus::Completed)])
        .expect("an update of a deleted id is skipped");
    assert_eq!(provider.get(events[1].id).expect("get"), None, "and does not bring it back");
}

/// Dead letters: stored, listed with every filter in order (an event's letters among them), read,
/// replaced and deleted.
pub fn dead_letters_store_list_filter_get_delete(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let (sub_a, sub_b) = (random_subscription(), random_subscription());
    let base = Timestamp::now().checked_sub(secs(300)).expect("in range");
    let t = |s: i64| base.checked_add(secs(s)).expect("in range");
    let mut letters: Vec<DeadLetter> = [
        (3, sub_a, "orders.create"),
        (1, sub_b, "users.create"),
        (4, sub_a, "orders.pay"),
        (1, sub_a, "users.delete"),
        (5, sub_b, "orders.create"),
    ]
    .into_iter()
    .map(|(second, sub, ty)| {
        let mut event = full_event(&scope);
        event.event_type = scope.ty(ty).into();
        let mut letter = DeadLetter::new(event, sub, scope.ty("*.create"), format!("failed at {second}"), 4);
        letter.failed_at = t(second);
        letter
    })
    .collect();
    // The first and the last are the same event, failed by two subscriptions.
    letters[4].event = letters[0].event.clone();
    provider.store_dead_letters(&letters).expect("store dead letters");

    let list = |filter: DeadLetterFilter| provider.list_dead_letters(&filter).expect("list dead letters");
    let scoped = || DeadLetterFilter::new().with_event_type(scope.all());
    let expect = |keep: &dyn Fn(&DeadLetter) -> bool| {
        let mut kept: Vec<DeadLetter> = letters.iter().filter(|l| keep(l)).cloned().collect();
        kept.sort_by_key(|l| (l.failed_at, l.id));
        kept
    };
    let all = expect(&|_| true);
    assert_eq!(list(scoped()), all, "every field kept, in (failed_at, id) order");
    assert_eq!(list(scoped().with_subscription_id(sub_a)), expect(&|l| l.subscription_id == sub_a));
    assert_eq!(
        list(DeadLetterFilter::new().with_subscription_id(sub_b)),
        expect(&|l| l.subscription_id == sub_b),
        "a random subscription id scopes on its own"
    );
    assert_eq!(
        list(scoped().with_start_time(t(1)).with_end_time(t(4))),
        expect(&|l| l.failed_at >= t(1) && l.failed_at < t(4))
    );
    assert_eq!(
        list(DeadLetterFilter::new().with_event_type(scope.pattern("orders.>"))),
        expect(&|l| l.event.event_type.contains(".orders."))
    );
    let twice = letters[0].event.id;
    assert_eq!(
        list(DeadLetterFilter::new().with_event_id(twice)),
        expect(&|l| l.event.id == twice),
        "an event's letters, each subscription's"
    );
    assert_eq!(list(DeadLetterFilter::new().with_event_id(twice)).len(), 2);
    assert_eq!(list(DeadLetterFilter::new().with_event_id(letters[1].event.id)).len(), 1);
    assert_eq!(list(DeadLetterFilter::new().with_event_id(EventId::new())), Vec::new());
    assert_eq!(list(scoped().with_offset(1).with_limit(2)), all[1..3].to_vec());
    assert_eq!(list(scoped().with_offset(5)), Vec::new());
    assert_eq!(list(scoped().with_limit(0)), Vec::new());

    // Storing an id again replaces the letter.
    let mut replaced = letters[0].clone();
    "replaced".clone_into(&mut replaced.error);
    provider.store_dead_letters(std::slice::from_ref(&replaced)).expect("store again");
    assert_eq!(list(scoped()).len(), 5);

    // Get reads without removing; delete removes; a second delete finds nothing.
    assert_eq!(provider.get_dead_letter(replaced.id).expect("get"), Some(replaced.clone()));
    assert_eq!(provider.get_dead_letter(replaced.id).expect("get again"), Some(replaced.clone()));
    assert_eq!(provider.get_dead_letter(DeadLetterId::new()).expect("get unknown"), None);
    assert!(provider.delete_dead_letter(replaced.id).expect("delete"));
    assert!(!provider.delete_dead_letter(replaced.id).expect("delete again"));
    assert!(!provider.delete_dead_letter(DeadLetterId::new()).expect("delete unknown"));
    assert_eq!(provider.get_dead_letter(replaced.id).expect("get after delete"), None);
    assert_eq!(list(scoped()), expect(&|l| l.id != replaced.id));
}

/// `replay` from the beginning, a sequence number and a time, in sequence order.
pub fn replay_from_beginning_sequence_and_time(provider: &dyn Provider) {
    if !can_replay(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let earlier = Timestamp::now().checked_sub(secs(60)).expect("in range");
    let old: Vec<Event> = ["x", "y", "x"]
        .into_iter()
        .map(|ty| {
            let mut event = scope.event(ty);
            event.created_at = earlier;
            event
        })
        .collect();
    provider.store_batch(&shared(&old), None).expect("store a batch");
    let mut later = scope.event("x");
    later.created_at = earlier;
    provider.store_batch(&[Arc::new(later.clone())], None).expect("store one more");

    let replay =
        |from, pattern: &Pattern, limit| provider.replay(from, Some(pattern), limit).expect("replay").events;
    let all = replay(ReplayFrom::Beginning, &scope.all(), 100);
    let mut in_store_order = ids(&old);
    in_store_order.push(later.id);
    assert_eq!(all.iter().map(|s| s.event.id).collect::<Vec<_>>(), in_store_order);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "strictly increasing seqs");
    assert!(all[0].seq >= 1);
    assert_eq!(all[3].event, later);

    let xs = replay(ReplayFrom::Beginning, &scope.pattern("x"), 100);
    assert_eq!(xs.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![old[0].id, old[2].id, later.id]);
    let from_second = replay(ReplayFrom::Sequence(all[1].seq), &scope.all(), 100);
    assert_eq!(from_second, all[1..].to_vec());
    assert_eq!(replay(ReplayFrom::Sequence(all[3].seq + 1), &scope.all(), 100), Vec::new());
    assert_eq!(replay(ReplayFrom::Beginning, &scope.all(), 0), Vec::new());
    assert_eq!(replay(ReplayFrom::Beginning, &scope.all(), 2), all[..2].to_vec());

    // By time: events created at or after `from`, in store order; a backdated event stored after
    // `from` does not qualify.
    let from = Timestamp::now();
    let fresh: Vec<Event> = (0..2).map(|_| scope.event("x")).collect();
    let mut backdated = scope.event("x");
    backdated.created_at = earlier;
    provider.store_batch(&shared(&[fresh[0].clone(), backdated, fresh[1].clone()]), None).expect("store");
    let by_time = replay(ReplayFrom::Time(from), &scope.all(), 100);
    assert_eq!(by_time.iter().map(|s| s.event.id).collect::<Vec<_>>(), ids(&fresh));
    assert!(by_time[0].seq > all[3].seq);
}

/// `replay` pages through history with a pattern, each event once.
pub fn replay_pages_with_a_pattern(provider: &dyn Provider) {
    if !can_replay(provider) {
        return;
    }
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let events: Vec<Event> =
        (0..25).map(|i| scope.event(if i % 3 == 0 { "pay.ok" } else { "pay.retry" })).collect();
    for chunk in events.chunks(7) {
        provider.store_batch(&shared(chunk), None).expect("store");
    }
    let pattern = scope.pattern("pay.ok");
    let mut from = ReplayFrom::Beginning;
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        let page = provider.replay(from, Some(&pattern), 2).expect("replay");
        assert!(page.events.len() <= 2);
        if page.events.is_empty() {
            assert!(page.end, "an empty page before the end passed over rows, and none is unreadable here");
            break;
        }
        from = ReplayFrom::Sequence(page.next.expect("a page that returned events read rows"));
        seen.extend(page.events.iter().map(|s| s.event.id));
        pages += 1;
        assert!(pages <= 5, "paging must end");
    }
    assert_eq!(
        seen,
        events.iter().filter(|e| e.event_type.ends_with("pay.ok")).map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(pages, 5); // 9 matches in pages of 2
}

/// `stats` follows every store, update, delete and dead letter.
pub fn stats_follow_every_change(provider: &dyn Provider) {
    if !can_delete(provider) {
        return;
    }
    let _exclusive = EXCLUSIVE.write();
    let scope = Scope::new();
    let before = stats(provider);
    assert_eq!(before.provider_type, provider.name());

    let events: Vec<Event> = (0..5).map(|_| scope.event("stats.tick")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    provider.store_batch(&shared(&events[..2]), None).expect("store some again");
    let stored = stats(provider);
    assert_eq!(delta(before.total_events, stored.total_events), 5);
    assert_eq!(delta(before.pending_events, stored.pending_events), 5);
    assert_eq!(
        delta(before.events_published, stored.events_published),
        5,
        "re-stores are not published again"
    );

    provider
        .update_status_batch(&[
            StatusUpdate::new(events[0].id, EventStatus::Processing),
            StatusUpdate::new(events[1].id, EventStatus::Completed),
            StatusUpdate::new(events[2].id, EventStatus::Failed),
            StatusUpdate::new(events[3].id, EventStatus::Failed),
            StatusUpdate::new(events[3].id, EventStatus::Completed),
        ])
        .expect("update");
    assert!(provider.delete(events[2].id).expect("delete"));
    let updated = stats(provider);
    assert_eq!(delta(before.total_events, updated.total_events), 4);
    assert_eq!(delta(before.pending_events, updated.pending_events), 1);
    assert_eq!(delta(before.processing_events, updated.processing_events), 1);
    assert_eq!(delta(before.completed_events, updated.completed_events), 2);
    assert_eq!(delta(before.failed_events, updated.failed_events), 0);
    assert_eq!(
        updated.total_events,
        updated.pending_events + updated.processing_events + updated.completed_events + updated.failed_events,
        "the per-status counts add up"
    );

    let letters: Vec<DeadLetter> = events[..3]
        .iter()
        .map(|e| DeadLetter::new(e.clone(), random_subscription(), "*", "boom", 1))
        .collect();
    provider.store_dead_letters(&letters).expect("dead letters");
    provider.delete_dead_letter(letters[0].id).expect("delete");
    assert_eq!(delta(before.dead_letters, stats(provider).dead_letters), 2);

    let json: serde_json::Value = serde_json::to_value(stats(provider)).expect("stats serialize");
    for field in ["provider_type", "total_events", "pending_events", "failed_events", "provider_specific"] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
}

/// Writes are visible after `flush`.
pub fn flush_keeps_writes_visible(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let event = scope.event("flush.tick");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Completed)]).expect("update");
    provider.flush().expect("flush");
    assert_eq!(provider.get(event.id).expect("get").map(|e| e.status), Some(EventStatus::Completed));
}

/// After `close`, every call fails with `Closed`; a second `close` is fine.
pub fn close_refuses_every_call(provider: &dyn Provider) {
    let _shared = EXCLUSIVE.read();
    let scope = Scope::new();
    let event = scope.event("close.tick");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    provider.close().expect("close");
    provider.close().expect("a second close is fine");

    let letter = DeadLetter::new(event.clone(), random_subscription(), "*", "boom", 1);
    assert_closed(provider.store_batch(&[Arc::new(event.clone())], None), "store_batch");
    assert_closed(
        provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Failed)]),
        "update_status_batch",
    );
    assert_closed(provider.get(event.id), "get");
    assert_closed(provider.list(&EventFilter::new()), "list");
    assert_closed(provider.delete(event.id), "delete");
    assert_closed(provider.store_dead_letters(std::slice::from_ref(&letter)), "store_dead_letters");
    assert_closed(provider.list_dead_letters(&DeadLetterFilter::new()), "list_dead_letters");
    assert_closed(provider.get_dead_letter(letter.id), "get_dead_letter");
    assert_closed(provider.delete_dead_letter(letter.id), "delete_dead_letter");
    assert_closed(provider.replay(ReplayFrom::Beginning, None, 10), "replay");
    assert_closed(provider.stats(), "stats");
    assert_closed(provider.flush(), "flush");
    if provider.capabilities().inbound {
        let config = InboundConfig::new(scope.name("closed"), ConsumerGroup::Instance(scope.name("closed")));
        assert_closed(provider.open_inbound(&config).map(drop), "open_inbound");
    }
}
