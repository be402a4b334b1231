//! Faults of the real Redis on 127.0.0.1:6379, one at a time: the server stopped and started
//! again under a publishing broker, a hung server, killed connections. Each test leaves Redis
//! running (a guard restarts or resumes it even when the test fails) and deletes its keys.

mod redis_support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use eventbroker::testing::conformance::Scope;
use eventbroker::{
    Ack, Broker, ConsumerGroup, Event, EventId, EventSink, EventStore, InboundConfig, Provider,
    ProviderErrorKind, PublishError,
};
use redis_support::{RedisBackend, raw};

/// The tests stop, hang or cut off the one server: never two at once.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn answers() -> bool {
    let Ok(client) = redis::Client::open(redis_support::url()) else { return false };
    client
        .get_connection_with_timeout(Duration::from_millis(500))
        .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
        .is_ok()
}

fn ensure_service() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-service");
    let status = Command::new(script).arg("redis").status().expect("scripts/ensure-service runs");
    assert!(status.success(), "scripts/ensure-service redis failed: {status}");
}

/// Polls `done` every 20 ms; fails after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn stream_ids(backend: &RedisBackend) -> Vec<EventId> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(backend.stream()).arg("-").arg("+").query(&mut raw()).expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let id: String = entry.get("id").expect("an id field");
            id.parse().expect("an event id")
        })
        .collect()
}

/// Restarts Redis if it is down when dropped, and removes the snapshot the stop left behind, so
/// the server is as it was: running, without persistence.
struct Restarter;

impl Drop for Restarter {
    fn drop(&mut self) {
        if !answers() {
            ensure_service();
        }
        if let Ok(dir) = redis::cmd("CONFIG").arg("GET").arg("dir").query::<(String, String)>(&mut raw()) {
            let _ = std::fs::remove_file(std::path::Path::new(&dir.1).join("dump.rdb"));
        }
    }
}

/// Redis stops (saving its data, as a persistent deployment would) while a broker publishes, and
/// starts again: local handlers never stop, every accepted event ends up in the stream, none twice.
#[test]
fn redis_stopped_during_a_publish_loop_loses_and_duplicates_nothing() {
    let _serial = serial();
    let backend = RedisBackend::new();
    let provider: Arc<dyn Provider> = Arc::new(backend.provider());
    let broker = Broker::builder()
        .provider(Arc::clone(&provider))
        .instance_id("fault-publisher")
        .build()
        .expect("build");
    let scope = Scope::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    broker
        .subscribe_infallible(&scope.ty(">"), move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .expect("subscribe");
    let restarter = Restarter;

    let accepted = thread::scope(|s| {
        let publisher = s.spawn(|| {
            let mut accepted = Vec::new();
            for i in 0..3000 {
                let mut event = scope.event(&format!("loop.t{}", i % 5));
                for _ in 0..2000 {
                    match broker.publish_async(event) {
                        Ok(()) => break,
                        Err(PublishError::Full(back)) => {
                            event = *back;
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(error) => panic!("publish: {error}"),
                    }
                }
                accepted.push(i);
                thread::sleep(Duration::from_micros(700));
            }
            accepted.len()
        });
        thread::sleep(Duration::from_millis(600));
        let _ = redis::cmd("SHUTDOWN").arg("SAVE").exec(&mut raw()); // The reply never comes.
        wait_until("Redis to stop", Duration::from_secs(10), || !answers());
        let stopped_at = handled.load(Ordering::Relaxed);
        wait_until("local handlers to carry on while Redis is down", Duration::from_secs(10), || {
            handled.load(Ordering::Relaxed) > stopped_at + 200
        });
        ensure_service();
        publisher.join().expect("the publisher does not panic")
    });
    drop(restarter);

    broker.flush(Duration::from_secs(30)).expect("every write lands once Redis is back");
    let stored = stream_ids(&backend);
    let unique: HashSet<EventId> = stored.iter().copied().collect();
    assert_eq!(stored.len(), unique.len(), "an event was written twice");
    assert_eq!(stored.len(), accepted, "every accepted event is in the stream");
    assert_eq!(handled.load(Ordering::Relaxed), accepted);
    assert_eq!(provider.stats().expect("stats").total_events, accepted as u64);
    assert!(broker.shutdown(Duration::from_secs(10)).is_clean());
}

/// A namespace whose calls give up after 300 ms, a provider on it and a scope.
fn impatient() -> (RedisBackend, eventbroker::RedisProvider, Scope) {
    let backend = RedisBackend::with(|c| c.timeout = Duration::from_millis(300));
    let provider = backend.provider();
    (backend, provider, Scope::new())
}

/// Resumes a stopped (SIGSTOP) Redis when dropped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.0.to_string()).status();
    }
}

/// Stops the Redis process (SIGSTOP) until the guard is dropped: a server that accepts
/// connections and answers nothing.
fn hang() -> Resume {
    let pid = redis_pid();
    let status = Command::new("kill").arg("-STOP").arg(pid.to_string()).status().expect("kill runs");
    assert!(status.success(), "kill -STOP {pid}: {status}");
    Resume(pid)
}

fn redis_pid() -> u32 {
    let info: String = redis::cmd("INFO").arg("server").query(&mut raw()).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("INFO names the process")
}

/// A hung server costs each call one timeout, then `Unavailable`; the batch retried after the
/// server comes back lands once, even though the first attempt ran after its caller gave up.
#[test]
fn a_hung_server_times_out_and_the_retried_batch_lands_once() {
    let _serial = serial();
    let (backend, provider, scope) = impatient();
    let events: Vec<Arc<Event>> = (0..200).map(|_| Arc::new(scope.event("hung"))).collect();
    provider.ping().expect("Redis is up");

    let resume = hang();
    let started = Instant::now();
    let error = provider.store_batch(&events, Some("instance:a")).expect_err("a hung server");
    assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3), "gave up after {:?}", started.elapsed());
    let error = provider.get(events[0].id).expect_err("still hung");
    assert!(error.is_transient(), "{error}");
    drop(resume);

    wait_until("the retried batch to land", Duration::from_secs(10), || {
        provider.store_batch(&events, Some("instance:a")).is_ok()
    });
    let stored = stream_ids(&backend);
    assert_eq!(stored, events.iter().map(|e| e.id).collect::<Vec<_>>(), "each event once, in order");
    assert_eq!(provider.stats().expect("stats").total_events, 200);
}

/// Killed connections (`CLIENT KILL`) cost at most one failed call each; the next connects again,
/// and the inbound source loses and repeats nothing.
#[test]
fn killed_connections_are_replaced_without_loss() {
    let _serial = serial();
    let name = format!("eventbroker-fault-{}", &EventId::new().as_uuid().simple().to_string()[..12]);
    let backend = RedisBackend::with(|c| c.client_name = name.clone());
    let provider = backend.provider();
    let scope = Scope::new();
    let source = provider
        .open_inbound(&InboundConfig::new("killed", ConsumerGroup::Instance("killed".into())))
        .expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");

    let kill_ours = || {
        let mut conn = raw();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).expect("CLIENT LIST");
        let ours: Vec<String> = list
            .lines()
            .filter(|line| line.split(' ').any(|field| field == format!("name={name}")))
            .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
            .collect();
        for id in &ours {
            let _: i64 =
                redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query(&mut conn).expect("CLIENT KILL");
        }
        ours.len()
    };

    let mut delivered = Vec::new();
    let mut stored = Vec::new();
    for round in 0..3 {
        let batch: Vec<Arc<Event>> =
            (0..20).map(|_| Arc::new(scope.event(&format!("round{round}")))).collect();
        assert!(source.fetch(1, Duration::ZERO).expect("fetch").is_empty() || round > 0);
        assert!(kill_ours() >= 1, "round {round}: the provider's connections are named {name}");
        // At most one failure per call, then it reconnects.
        let mut failures = 0;
        wait_until("the store to go through", Duration::from_secs(10), || {
            let ok = provider.store_batch(&batch, None).is_ok();
            failures += usize::from(!ok);
            ok
        });
        assert!(failures <= 1, "{failures} failed stores");
        stored.extend(batch.iter().map(|e| e.id));
        let deadline = Instant::now() + Duration::from_secs(10);
        while delivered.len() < stored.len() {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} of {} delivered",
                delivered.len(),
                stored.len()
            );
            match source.fetch(64, Duration::from_millis(200)) {
                Ok(got) => {
                    source.ack(&got.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
                    delivered.extend(got.iter().map(|e| e.event.id));
                }
                Err(error) => assert!(error.is_transient(), "{error}"),
            }
        }
    }
    assert_eq!(delivered, stored, "every event once, in order");
    assert!(source.fetch(16, Duration::from_millis(300)).expect("fetch").is_empty());
    assert!(provider.stats().expect("stats").provider_specific["reconnects"].as_u64() >= Some(1));
    source.close().expect("close");
}

/// A fetch fails on a hung server, and its read may have moved entries into the member's pending
/// list without their reaching it (here made certain by reading them in the member's name behind
/// its back): the next fetch hands them out all the same: none lost, none twice.
#[test]
fn a_fetch_whose_reply_was_lost_loses_nothing() {
    let _serial = serial();
    let (backend, provider, scope) = impatient();
    let source = provider
        .open_inbound(&InboundConfig::new("lossy", ConsumerGroup::Instance("lossy".into())))
        .expect("open_inbound");
    source.set_filter(&[scope.all()]).expect("set_filter");
    assert!(source.fetch(16, Duration::ZERO).expect("a fetch while Redis answers").is_empty());
    let events: Vec<Arc<Event>> = (0..5).map(|_| Arc::new(scope.event("lost.reply"))).collect();
    provider.store_batch(&events, None).expect("store");

    let resume = hang();
    let error = source.fetch(16, Duration::ZERO).expect_err("a hung server");
    assert!(error.is_transient(), "{error}");
    drop(resume);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("instance:lossy")
        .arg("lossy")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(backend.stream())
        .arg(">")
        .query(&mut raw())
        .expect("a read whose reply nobody sees");

    let mut delivered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.len() < events.len() {
        assert!(Instant::now() < deadline, "{} of {} delivered", delivered.len(), events.len());
        if let Ok(got) = source.fetch(16, Duration::from_millis(200)) {
            source.ack(&got.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
            delivered.extend(got.iter().map(|e| e.event.id));
        }
    }
    let unique: HashSet<EventId> = delivered.iter().copied().collect();
    assert_eq!(unique, events.iter().map(|e| e.id).collect::<HashSet<_>>());
    assert_eq!(delivered.len(), events.len(), "none twice");
    assert!(source.fetch(16, Duration::from_millis(300)).expect("fetch").is_empty());
    source.close().expect("close");
}
