//! The PostgreSQL provider when the server misbehaves: connections terminated under load, a server
//! stopped and started again, a server that does not answer, a provider closed under a waiting
//! fetch. These terminate connections of their own (found by application name) and restart the
//! local server, so they run one at a time, and every test leaves the server running.

mod postgres_support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::provider::postgres::{PostgresConfig, PostgresProvider};
use eventbroker::testing::conformance::Scope;
use eventbroker::{Ack, Event, EventId, EventSink, EventStore, Inbound, Provider, ProviderErrorKind};
use parking_lot::Mutex;
use postgres_support::{PostgresBackend, Sql, shared, source};

/// Fault tests share one server they disturb: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fetches and acks until `expected` events have come, tolerating transient failures (as the
/// broker's inbound thread does); fails on a duplicate, a permanent error or after `within`.
fn take_all(source: &dyn Inbound, expected: usize, within: Duration) -> Vec<EventId> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while got.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} events arrived within {within:?}",
            got.len()
        );
        let batch = match source.fetch(64, Duration::from_millis(200)) {
            Ok(batch) => batch,
            Err(error) if error.is_transient() => continue,
            Err(error) => panic!("fetch failed for good: {error}"),
        };
        let acks: Vec<Ack> = batch.iter().map(|e| Ack::handled(e.token)).collect();
        while let Err(error) = source.ack(&acks) {
            assert!(error.is_transient(), "ack failed for good: {error}");
            assert!(Instant::now() < deadline, "ack kept failing: {error}");
        }
        for event in batch {
            assert!(seen.insert(event.event.id), "{} delivered twice", event.event.id);
            got.push(event.event.id);
        }
    }
    got
}

fn counter(provider: &PostgresProvider, key: &str) -> u64 {
    provider.stats().expect("stats").provider_specific[key].as_u64().expect("a count")
}

/// Polls `done` every 20 ms until it holds; fails after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The listener's connection is terminated three times while another provider writes: it
/// reconnects each time, and the source receives every event exactly once.
#[test]
fn a_listener_killed_while_events_are_written_reconnects_and_misses_none() {
    let _serial = SERIAL.lock();
    let backend = PostgresBackend::new();
    let (reader, writer) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let inbound = source(&reader, &scope, "reader");
    let sql = Sql::connect().expect("connect");
    wait_until("the listener to listen", Duration::from_secs(10), || {
        counter(&reader, "listener_sessions") >= 1
    });

    let events: Vec<Event> = (0..300).map(|i| scope.event(&format!("t{}", i % 5))).collect();
    let got = std::thread::scope(|s| {
        let writing = s.spawn(|| {
            for chunk in events.chunks(3) {
                writer.store_batch(&shared(chunk), None).expect("store");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let killing = s.spawn(|| {
            for round in 1..=3 {
                std::thread::sleep(Duration::from_millis(150));
                let killed = sql.terminate(&backend.application_name, "LISTEN").expect("terminate");
                assert_eq!(killed, 1, "round {round}: exactly the listener's connection");
                wait_until("the listener to come back", Duration::from_secs(10), || {
                    counter(&reader, "listener_sessions") > round
                });
            }
        });
        let got = take_all(&*inbound, events.len(), Duration::from_secs(30));
        writing.join().expect("writer");
        killing.join().expect("killer");
        got
    });
    let expected: HashSet<EventId> = events.iter().map(|e| e.id).collect();
    assert_eq!(got.iter().copied().collect::<HashSet<_>>(), expected, "every event, each once");
    assert!(counter(&reader, "listener_failures") >= 3);
    let quiet = inbound.fetch(16, Duration::from_millis(300)).expect("fetch");
    assert!(quiet.is_empty(), "nothing more: {quiet:?}");
}

/// The pool's connections are terminated mid-run: calls fail as transient at worst, and the next
/// ones reconnect.
#[test]
fn terminated_pool_connections_are_replaced() {
    let _serial = SERIAL.lock();
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let inbound = source(&provider, &scope, "reader");
    let sql = Sql::connect().expect("connect");
    let mut stored = Vec::new();
    for round in 0..5 {
        let batch: Vec<Event> = (0..10).map(|_| scope.event("job")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(error) = provider.store_batch(&shared(&batch), None) {
            assert!(error.is_transient(), "round {round}: {error}");
            assert!(Instant::now() < deadline, "round {round}: store kept failing: {error}");
        }
        stored.extend(batch.iter().map(|e| e.id));
        sql.terminate(&backend.application_name, "").expect("terminate");
    }
    let got = take_all(&*inbound, stored.len(), Duration::from_secs(30));
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), stored.into_iter().collect::<HashSet<_>>());
}

/// Stops the server and starts it again when dropped, so a failing test leaves it running.
struct StoppedServer;

impl StoppedServer {
    fn stop() -> Self {
        pg_ctlcluster("stop");
        Self
    }
}

impl Drop for StoppedServer {
    fn drop(&mut self) {
        pg_ctlcluster("start");
    }
}

/// Runs `pg_ctlcluster <version> main <action>` for the one cluster installed here.
fn pg_ctlcluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL is installed (/etc/postgresql)")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .expect("one cluster version");
    let mut command = Command::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", &version, "main", action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    let status = command.status().expect("pg_ctlcluster runs");
    assert!(status.success(), "pg_ctlcluster {action}: {status}");
}

/// While the server is down every call fails fast as `Unavailable`; once it is back the provider
/// reconnects by itself, writes go through and the source delivers what was stored.
#[test]
fn a_server_restart_fails_calls_as_unavailable_then_recovers() {
    let _serial = SERIAL.lock();
    let backend = PostgresBackend::new();
    let provider = postgres_support::connect(PostgresConfig {
        connect_timeout: Duration::from_secs(1),
        operation_timeout: Duration::from_secs(2),
        ..backend.config()
    });
    let scope = Scope::new();
    let inbound = source(&provider, &scope, "reader");
    let before: Vec<Event> = (0..5).map(|_| scope.event("before")).collect();
    provider.store_batch(&shared(&before), None).expect("store");
    take_all(&*inbound, before.len(), Duration::from_secs(10));

    let down = StoppedServer::stop();
    for _ in 0..3 {
        let started = Instant::now();
        let error =
            provider.store_batch(&[Arc::new(scope.event("lost"))], None).expect_err("the server is down");
        assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "failed within its bound: {:?}",
            started.elapsed()
        );
        let error = provider.get(EventId::new()).expect_err("the server is down");
        assert!(error.is_transient(), "{error}");
        let error = inbound.fetch(10, Duration::from_millis(50)).expect_err("the server is down");
        assert!(error.is_transient(), "{error}");
    }
    drop(down); // Starts the server.

    let after: Vec<Event> = (0..5).map(|_| scope.event("after")).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(error) = provider.store_batch(&shared(&after), None) {
        assert!(error.is_transient(), "{error}");
        assert!(Instant::now() < deadline, "the provider did not recover: {error}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = take_all(&*inbound, after.len(), Duration::from_secs(30));
    assert_eq!(got, after.iter().map(|e| e.id).collect::<Vec<_>>());
    wait_until("the listener to reconnect", Duration::from_secs(10), || {
        counter(&provider, "listener_sessions") >= 2
    });
}

/// A statement the server does not answer (the table is locked by another transaction) returns
/// `Unavailable` within the operation timeout, and the provider carries on once the lock is gone.
#[test]
fn a_call_the_server_does_not_answer_returns_within_its_timeout() {
    let _serial = SERIAL.lock();
    let backend = PostgresBackend::new();
    let timeout = Duration::from_millis(500);
    let provider =
        postgres_support::connect(PostgresConfig { operation_timeout: timeout, ..backend.config() });
    let scope = Scope::new();
    let event = Arc::new(scope.event("blocked"));
    let sql = Sql::connect().expect("connect");
    sql.batch(&format!("BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", backend.qualified("events")))
        .expect("lock the events table");

    for (operation, result) in [
        ("store_batch", provider.store_batch(std::slice::from_ref(&event), None).map(drop)),
        ("get", provider.get(event.id).map(drop)),
    ] {
        let started = Instant::now();
        let error = result.expect_err("blocked by the lock");
        assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "{operation}: {error}");
        assert!(started.elapsed() < timeout * 4, "{operation} took {:?}", started.elapsed());
    }
    sql.batch("ROLLBACK").expect("release the lock");
    // The timed-out calls closed their connections, so the next one connects afresh within the
    // same 500 ms; on a loaded host that can take longer. Such a call fails as `Unavailable`, the
    // transient kind the broker's writer retries: retried the same way, the store goes through.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        match provider.store_batch(std::slice::from_ref(&event), None) {
            Ok(()) => break,
            Err(error) => {
                assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "after the lock: {error}");
                assert!(started.elapsed() < timeout * 4, "store took {:?}", started.elapsed());
                assert!(Instant::now() < deadline, "no store went through once the lock was gone: {error}");
            }
        }
    }
    assert_eq!(provider.get(event.id).expect("get").map(|e| e.id), Some(event.id));
}

/// Closing the provider wakes a fetch that is waiting for events: it returns `Closed` at once,
/// not at the end of its wait.
#[test]
fn close_wakes_a_waiting_fetch() {
    let _serial = SERIAL.lock();
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let inbound = source(&provider, &scope, "reader");
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let started = Instant::now();
            (inbound.fetch(10, Duration::from_secs(30)), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        provider.close().expect("close");
        let (result, waited) = waiting.join().expect("the fetch does not panic");
        let error = result.expect_err("closed");
        assert_eq!(error.kind(), &ProviderErrorKind::Closed, "{error}");
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    });
    let error = provider.store_batch(&[Arc::new(scope.event("late"))], None).expect_err("closed");
    assert_eq!(error.kind(), &ProviderErrorKind::Closed);
}
