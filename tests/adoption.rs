//! What a newcomer reaches for: `drain`, `try_publish`, the CRUD hooks, infallible payloads.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{event, wait_until};
use eventbroker::hooks::{CrudHookConfig, CrudHooks, HookOutcome, UserContext};
use eventbroker::testing::{Fault, FaultyProvider, Operation};
use eventbroker::{
    Backpressure, Broker, BrokerError, Distribution, DrainError, Event, EventSource, EventStatus,
    MemoryProvider, PublishError, RetryPolicy,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// A broker whose handler on `pattern` counts events after sleeping `pause`.
fn counting(workers: usize, pause: Duration) -> (Broker, Arc<AtomicU64>) {
    let broker = Broker::builder().workers(workers).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    broker
        .subscribe_infallible("drain.>", move |_| {
            std::thread::sleep(pause);
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    (broker, handled)
}

#[test]
fn drain_waits_for_everything_published_before_it_and_its_statuses() {
    let (broker, handled) = counting(2, Duration::from_micros(200));
    let ids: Vec<_> = (0..300)
        .map(|i| {
            let e = event(&format!("drain.k{}", i % 7));
            let id = e.id;
            broker.publish(e).unwrap();
            id
        })
        .collect();
    broker.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), 300);
    assert_eq!(broker.stats().processed, 300);
    // The statuses were written: every event reads back completed, without a flush.
    for id in ids {
        let stored = broker.provider().get(id).unwrap().expect("stored");
        assert_eq!(stored.status, EventStatus::Completed, "{id}");
    }
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn drain_waits_for_retries() {
    let broker = Broker::builder()
        .workers(1)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(30),
            jitter: 0.0,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&attempts);
    broker
        .subscribe("drain.flaky", move |_| {
            // Every first attempt fails; the retry succeeds.
            if counter.fetch_add(1, Ordering::Relaxed) % 2 == 0 { Err("not yet") } else { Ok(()) }
        })
        .unwrap();
    for _ in 0..5 {
        broker.publish(event("drain.flaky")).unwrap();
        broker.drain(WAIT).unwrap();
    }
    let stats = broker.stats();
    assert_eq!((stats.completed, stats.retries, stats.pending_retries), (5, 5, 0));
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn drain_times_out_with_what_is_left_then_succeeds() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (release, gate) = crossbeam_channel::bounded::<()>(0);
    broker
        .subscribe_infallible("drain.gated", move |_| {
            let _ = gate.recv_timeout(WAIT);
        })
        .unwrap();
    for _ in 0..3 {
        broker.publish(event("drain.gated")).unwrap();
    }
    let started = Instant::now();
    match broker.drain(Duration::from_millis(50)) {
        Err(DrainError::TimedOut { unfinished, retrying, .. }) => assert_eq!((unfinished, retrying), (3, 0)),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(started.elapsed() < WAIT);
    for _ in 0..3 {
        release.send_timeout((), WAIT).unwrap();
    }
    broker.drain(WAIT).unwrap();
    assert_eq!(broker.stats().completed, 3);
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn drain_from_a_handler_and_after_shutdown_is_refused() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let weak = broker.downgrade();
    let (tx, rx) = crossbeam_channel::bounded(1);
    broker
        .subscribe_infallible("drain.inside", move |_| {
            if let Some(broker) = weak.upgrade() {
                let _ = tx.try_send(broker.drain(Duration::from_secs(1)));
            }
        })
        .unwrap();
    broker.publish(event("drain.inside")).unwrap();
    assert!(matches!(rx.recv_timeout(WAIT).unwrap(), Err(DrainError::InHandler)));
    // Run by a synchronous publish on this thread, it would wait for that publish.
    broker.publish_sync(event("drain.inside")).unwrap();
    assert!(matches!(rx.recv_timeout(WAIT).unwrap(), Err(DrainError::InHandler)));
    assert!(broker.shutdown(WAIT).is_clean());
    assert!(matches!(broker.drain(WAIT), Err(DrainError::Closed)));
}

/// A synchronous publish or a redrive running on another thread when `drain` is called holds it
/// until it returns, with its status written; one begun after the call does not.
#[test]
fn drain_waits_for_synchronous_publishes_and_redrives_on_other_threads() {
    let broker = Broker::builder().workers(1).retry_policy(RetryPolicy::none()).build().unwrap();
    let (fail, inside) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    let (f, i) = (Arc::clone(&fail), Arc::clone(&inside));
    broker
        .subscribe("drain.sync", move |_: &Event| {
            i.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            if f.load(Ordering::SeqCst) { Err("the ledger is down") } else { Ok(()) }
        })
        .unwrap();
    // A synchronous publish, failing: drain returns once it ended, dead-lettered.
    let failing = event("drain.sync");
    let caller = broker.clone();
    let publishing = std::thread::spawn(move || caller.publish_sync(failing));
    wait_until("the synchronous publish's handler", WAIT, || inside.load(Ordering::SeqCst) == 1);
    let timed_out = broker.drain(Duration::from_millis(50));
    assert!(matches!(timed_out, Err(DrainError::TimedOut { unfinished: 1, .. })), "{timed_out:?}");
    broker.drain(WAIT).unwrap();
    assert!(publishing.is_finished(), "drain returned before the publish did");
    assert!(publishing.join().unwrap().is_err());
    let letter = broker.dead_letters(&eventbroker::DeadLetterFilter::new()).unwrap().remove(0);

    // A redrive: drain returns once its handler ran and the letter is gone.
    fail.store(false, Ordering::SeqCst);
    let redriver = broker.clone();
    let redriving = std::thread::spawn(move || redriver.redrive(letter.id));
    wait_until("the redriven handler", WAIT, || inside.load(Ordering::SeqCst) == 2);
    broker.drain(WAIT).unwrap();
    assert!(redriving.is_finished(), "drain returned before the redrive did");
    assert_eq!(broker.provider().get(letter.event.id).unwrap().unwrap().status, EventStatus::Completed);
    assert!(broker.dead_letters(&eventbroker::DeadLetterFilter::new()).unwrap().is_empty());
    redriving.join().unwrap().unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn drain_covers_events_fetched_from_other_instances() {
    let bus = Arc::new(MemoryProvider::default());
    let sender = Broker::builder().provider(bus.clone()).instance_id("drain-a").workers(1).build().unwrap();
    let receiver = Broker::builder().provider(bus).instance_id("drain-b").workers(2).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    receiver
        .subscribe_infallible("drain.remote", move |_| {
            std::thread::sleep(Duration::from_micros(300));
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    for _ in 0..50 {
        sender.publish(event("drain.remote")).unwrap();
    }
    sender.drain(WAIT).unwrap();
    wait_until("the receiver to fetch every event", WAIT, || receiver.stats().inbound.fetched == 50);
    receiver.drain(WAIT).unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), 50);
    assert_eq!(receiver.stats().writer.acks, 50, "acknowledged once handled, before drain returned");
    assert!(receiver.shutdown(WAIT).is_clean());
    assert!(sender.shutdown(WAIT).is_clean());
}

#[test]
fn drain_reports_writes_the_provider_gave_up() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    faulty.inject(Operation::StoreBatch, Fault::permanent());
    let broker =
        Broker::builder().provider(faulty).distribution(Distribution::Local).workers(1).build().unwrap();
    broker.publish(event("drain.lost")).unwrap();
    match broker.drain(WAIT) {
        Err(DrainError::Write(BrokerError::WritesDropped { dropped, .. })) => assert!(dropped >= 1),
        other => panic!("expected Write(WritesDropped), got {other:?}"),
    }
    let _ = broker.shutdown(WAIT);
}

/// A broker of one two-slot shard that blocks publishers for 30 s when full, whose handler on
/// `pattern` waits until the returned sender is dropped (or `WAIT` passes): it fills at once.
fn full_broker(pattern: &str) -> (Broker, crossbeam_channel::Sender<()>) {
    let broker = Broker::builder()
        .workers(1)
        .buffer_size(2)
        .backpressure(Backpressure::Block(Duration::from_secs(30)))
        .build()
        .unwrap();
    let (release, gate) = crossbeam_channel::bounded::<()>(0);
    broker
        .subscribe_infallible(pattern, move |_| {
            let _ = gate.recv_timeout(WAIT);
        })
        .unwrap();
    (broker, release)
}

#[test]
fn try_publish_never_waits_whatever_the_policy() {
    let (broker, release) = full_broker("full.>");
    let started = Instant::now();
    let mut refused = None;
    for _ in 0..10 {
        if let Err(error) = broker.try_publish(event("full.x")) {
            refused = Some(error);
            break;
        }
    }
    assert!(matches!(refused, Some(PublishError::Full(_))), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "try_publish waited");
    drop(release);
    broker.drain(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn payload_values_keep_the_builder_chain_infallible() {
    let event =
        Event::new(EventSource::Internal, "a.b").with_user_id(5).with_payload_value(json!({"k": [1, 2]}));
    assert_eq!(event.payload_json(), Some(r#"{"k":[1,2]}"#));
    assert_eq!(Event::new(EventSource::Internal, "a.b").with_payload_value(json!(null)).payload, None);
}

fn user() -> UserContext {
    UserContext::new(42)
        .with_session_id("session-456")
        .with_user_name("ada")
        .with_email("ada@example.com")
        .with_roles(["admin", "billing"])
}

#[test]
fn hooks_publish_create_update_and_delete_with_the_seeds_fields() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_, events) = broker.subscribe_stream("public.users.*").unwrap();
    let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
    let user = user();
    let outcomes = [
        hooks.after_create(&user, "public", "users", &json!({"id": 7, "name": "Bob"})),
        hooks.after_update(&user, "public", "users", &7, &json!({"name": "Rob"})),
        hooks.after_delete(&user, "public", "users", "7"),
    ];
    assert_eq!(hooks.after_read(&user, "public", "users", &[7]), HookOutcome::Disabled);
    broker.drain(WAIT).unwrap();

    let got: Vec<Arc<Event>> = events.try_iter().collect();
    let published: Vec<HookOutcome> = got.iter().map(|e| HookOutcome::Published(e.id)).collect();
    assert_eq!(outcomes[..], published[..], "each outcome names its event");
    for e in &got {
        let stored = broker.provider().get(e.id).unwrap().expect("stored under the id the hook returned");
        assert_eq!(
            (stored.event_type.as_str(), stored.status),
            (e.event_type.as_str(), EventStatus::Completed)
        );
    }
    let types: Vec<&str> = got.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["public.users.create", "public.users.update", "public.users.delete"]);
    for e in &got {
        assert_eq!(e.source, EventSource::Database);
        assert_eq!((e.user_id, e.session_id.as_str()), (42, "session-456"));
        assert_eq!((e.schema.as_str(), e.entity.as_str()), ("public", "users"));
        assert_eq!(e.metadata["user_name"], "ada");
        assert_eq!(e.metadata["user_email"], "ada@example.com");
        assert_eq!(e.metadata["user_roles"], json!(["admin", "billing"]));
        assert_eq!(e.metadata["table_name"], "users");
    }
    assert_eq!(got[0].payload::<serde_json::Value>().unwrap(), json!({"id": 7, "name": "Bob"}));
    assert_eq!(got[1].payload::<serde_json::Value>().unwrap(), json!({"id": 7, "data": {"name": "Rob"}}));
    assert_eq!(got[2].payload::<serde_json::Value>().unwrap(), json!({"id": "7"}));
    assert_eq!(got[2].operation, "delete");
    let stats = hooks.stats();
    assert_eq!((stats.published, stats.disabled, stats.full, stats.closed, stats.invalid), (3, 1, 0, 0, 0));
    assert!(broker.shutdown(WAIT).is_clean());
}

/// A record's create, update and delete are handled in that order, whatever the number of
/// workers: one table's events share a shard.
#[test]
fn hooks_keep_each_records_operations_in_order() {
    // Room for every event: the hooks never wait for any.
    let broker = Broker::builder().workers(4).buffer_size(2048).build().unwrap();
    let seen: Arc<parking_lot::Mutex<HashMap<i64, Vec<String>>>> = Arc::default();
    {
        let seen = Arc::clone(&seen);
        broker
            .subscribe_infallible("public.*.*", move |event: &Event| {
                let payload: serde_json::Value = event.payload().unwrap();
                let id = payload["id"].as_i64().unwrap();
                seen.lock().entry(id).or_default().push(event.operation.to_string());
            })
            .unwrap();
    }
    let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
    let user = user();
    for (id, table) in (0..500_i64).zip(["users", "orders", "posts"].into_iter().cycle()) {
        assert!(matches!(
            hooks.after_create(&user, "public", table, &json!({ "id": id })),
            HookOutcome::Published(_)
        ));
        assert!(matches!(
            hooks.after_update(&user, "public", table, &id, &json!({})),
            HookOutcome::Published(_)
        ));
        assert!(matches!(hooks.after_delete(&user, "public", table, &id), HookOutcome::Published(_)));
    }
    broker.drain(WAIT).unwrap();
    let seen = seen.lock();
    assert_eq!(seen.len(), 500);
    for (id, operations) in seen.iter() {
        assert_eq!(operations, &["create", "update", "delete"], "record {id}");
    }
}

#[test]
fn hooks_publish_reads_when_asked() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let (_, events) = broker.subscribe_stream("*.*.read").unwrap();
    let hooks =
        CrudHooks::new(&broker, CrudHookConfig { read: true, create: false, ..CrudHookConfig::default() });
    assert!(matches!(
        hooks.after_read(&UserContext::new(1), "crm", "accounts", &[1, 2]),
        HookOutcome::Published(_)
    ));
    assert_eq!(hooks.after_create(&UserContext::new(1), "crm", "accounts", &1), HookOutcome::Disabled);
    let read = events.recv_timeout(WAIT).unwrap();
    assert_eq!(read.event_type, "crm.accounts.read");
    assert_eq!(read.payload_json(), Some("[1,2]"));
    assert!(!read.metadata.contains_key("user_name"), "empty user fields are left out");
    assert!(broker.shutdown(WAIT).is_clean());
}

#[test]
fn hooks_never_block_nor_fail_the_caller_when_the_broker_is_full() {
    let (broker, release) = full_broker("public.orders.*");
    let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
    let started = Instant::now();
    let outcomes: Vec<HookOutcome> =
        (0..20).map(|i| hooks.after_create(&UserContext::new(1), "public", "orders", &i)).collect();
    assert!(started.elapsed() < Duration::from_secs(5), "a hook waited for room");
    let full = outcomes.iter().filter(|o| **o == HookOutcome::Full).count() as u64;
    assert!(full >= 16, "{outcomes:?}");
    let stats = hooks.stats();
    assert_eq!((stats.full, stats.published + stats.full), (full, 20));
    drop(release);
    broker.drain(WAIT).unwrap();
    assert!(broker.shutdown(WAIT).is_clean());
    assert_eq!(hooks.after_delete(&UserContext::new(1), "public", "orders", &1), HookOutcome::Closed);
    assert_eq!(hooks.stats().closed, 1);
}

#[test]
fn hooks_count_what_cannot_become_an_event() {
    let broker = Broker::builder().workers(1).build().unwrap();
    let hooks = CrudHooks::new(&broker, CrudHookConfig::default());
    let user = UserContext::new(1);
    // A map with non-string keys has no JSON form.
    let record: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    assert_eq!(hooks.after_create(&user, "public", "pairs", &record), HookOutcome::Invalid);
    assert_eq!(hooks.after_create(&user, "public", "bad table", &1), HookOutcome::Invalid);
    assert_eq!(hooks.after_create(&user, "", "users", &1), HookOutcome::Invalid);
    // A dot would shift the type's segments: `public.*.delete` would not match.
    assert_eq!(hooks.after_delete(&user, "public", "audit.log", &1), HookOutcome::Invalid);
    assert_eq!(hooks.after_update(&user, "crm.eu", "accounts", &1, &2), HookOutcome::Invalid);
    // A record nested deeper than any decoder reads back.
    let deep = (0..Event::MAX_JSON_DEPTH).fold(serde_json::json!([1]), |inner, _| serde_json::json!([inner]));
    assert_eq!(hooks.after_create(&user, "public", "trees", &deep), HookOutcome::Invalid);
    // A record that serde_json's `Value` would read as another value.
    let reserved = serde_json::json!({"$serde_json::private::RawValue": "{}"});
    assert_eq!(hooks.after_create(&user, "public", "raw", &reserved), HookOutcome::Invalid);
    assert_eq!(hooks.stats().invalid, 7);
    assert_eq!(hooks.stats().published, 0);
    assert!(broker.shutdown(WAIT).is_clean());
}

/// Two brokers of one process receiving from one provider under one id would share a group and
/// skip each other's events as echoes: the second is refused, naming the setting; once the first
/// has shut down, its next incarnation may take the id; another id, another provider or local
/// distribution is no conflict.
#[test]
fn one_instance_id_receives_from_a_provider_once_per_process() {
    let bus = Arc::new(MemoryProvider::default());
    let receiving = |provider: &Arc<MemoryProvider>, id: &str| {
        Broker::builder()
            .provider(provider.clone())
            .instance_id(id)
            .distribution(Distribution::FanOut)
            .build()
    };
    let first = receiving(&bus, "orders-1").unwrap();
    let err = receiving(&bus, "orders-1").unwrap_err();
    assert!(
        matches!(&err, eventbroker::BuildError::Config(e) if e.key() == "instance_id" && e.reason().contains("orders-1")),
        "{err}"
    );
    let other_id = receiving(&bus, "orders-2").unwrap();
    let other_bus = receiving(&Arc::new(MemoryProvider::default()), "orders-1").unwrap();
    let local = Broker::builder()
        .provider(bus.clone())
        .instance_id("orders-1")
        .distribution(Distribution::Local)
        .build()
        .unwrap();
    assert!(first.shutdown(WAIT).is_clean());
    let next = receiving(&bus, "orders-1").expect("the id is free once its broker shut down");
    for broker in [next, other_id, other_bus, local] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
    drop(first);
    let after_drop = {
        let dropped = receiving(&bus, "orders-3").unwrap();
        drop(dropped);
        receiving(&bus, "orders-3")
    };
    assert!(after_drop.expect("a dropped broker frees its id").shutdown(WAIT).is_clean());
}

/// A shutdown that gives up on an inbound thread stuck in a fetch (a provider that stopped
/// answering) keeps the broker's id until that fetch returns: a next incarnation built meanwhile
/// would fetch from the same group beside it, each skipping what the other took.
#[test]
fn an_id_stays_taken_while_a_shut_down_brokers_fetch_hangs() {
    let faulty = FaultyProvider::new(Arc::new(MemoryProvider::default()));
    let receiving = || {
        Broker::builder()
            .provider(faulty.clone())
            .instance_id("hung-1")
            .distribution(Distribution::FanOut)
            .build()
    };
    let first = receiving().unwrap();
    first.subscribe_infallible("hung.>", |_| {}).unwrap();
    wait_until("the first fetch", WAIT, || faulty.calls(Operation::Fetch) > 0);
    faulty.inject(Operation::Fetch, Fault::Hang { at_most: Duration::from_secs(30) });
    let before = faulty.calls(Operation::Fetch);
    wait_until("a fetch hangs", WAIT, || faulty.calls(Operation::Fetch) > before);

    let report = first.shutdown(Duration::from_millis(200));
    assert!(report.timed_out, "the inbound thread is still in its fetch: {report:?}");
    let err = receiving().map(drop).unwrap_err();
    assert!(
        matches!(&err, eventbroker::BuildError::Config(e) if e.key() == "instance_id" && e.reason().contains("hung-1")),
        "{err}"
    );

    faulty.heal(Operation::Fetch);
    let mut next = None;
    wait_until("the id is free once the fetch returned", WAIT, || {
        next = receiving().ok();
        next.is_some()
    });
    assert!(next.unwrap().shutdown(WAIT).is_clean());
}

/// A provider that wraps another opens the inner one's groups: a broker on the wrapper and one on
/// the bus it wraps, under one id, would share a group, and the second is refused as on the bus
/// itself, naming where they meet.
#[test]
fn one_instance_id_receives_once_through_a_wrapping_provider() {
    let bus = Arc::new(MemoryProvider::default());
    let faulty = FaultyProvider::new(bus.clone());
    let receiving = |provider: Arc<dyn eventbroker::Provider>, id: &str| {
        Broker::builder().provider(provider).instance_id(id).distribution(Distribution::FanOut).build()
    };
    let direct = receiving(bus.clone(), "orders-1").unwrap();
    let err = receiving(faulty.clone(), "orders-1").map(drop).unwrap_err();
    assert!(
        matches!(&err, eventbroker::BuildError::Config(e) if e.key() == "instance_id"
            && e.reason().contains("orders-1")
            && e.reason().contains("memory provider object")),
        "{err}"
    );
    let wrapped = receiving(faulty, "orders-2").unwrap();
    for broker in [direct, wrapped] {
        assert!(broker.shutdown(WAIT).is_clean());
    }
}
