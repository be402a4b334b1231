//! The PostgreSQL provider against the server on 127.0.0.1:5432 (`scripts/ensure-service
//! postgres`): the conformance suite, then what only this provider promises — validated names,
//! idempotent re-stores, delivery that survives out-of-order commits, CRUD capture seen from
//! `psql`, the transactional outbox, retention and migrations. Each test works in its own schema.

mod instance_id_support;
mod postgres_support;
mod work_queue_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::provider::postgres::{CaptureStatus, PostgresConfig, PostgresProvider};
use eventbroker::testing::conformance::Scope;
use eventbroker::{
    Ack, ConsumerGroup, DeadLetter, DeadLetterFilter, Event, EventFilter, EventId, EventSink, EventSource,
    EventStatus, EventStore, Inbound, InboundConfig, InboundEvent, MemoryProvider, Pattern, Provider,
    ProviderErrorKind, ProviderExt, ReplayFrom, StatusUpdate, SubscriptionId,
};
use jiff::{SignedDuration, Timestamp};
use postgres_support::{PostgresBackend, Sql, shared, source};

eventbroker::conformance_suite!(postgres, crate::postgres_support::PostgresBackend::new);

/// How long a test waits for events that must arrive.
const ARRIVE: Duration = Duration::from_secs(10);

/// Fetches and acks until `n` events have come; fails after [`ARRIVE`].
fn take(source: &dyn Inbound, n: usize) -> Vec<InboundEvent> {
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} events arrived within {ARRIVE:?}", got.len());
        let batch = source.fetch(n - got.len(), Duration::from_millis(200)).expect("fetch");
        source.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
        got.extend(batch);
    }
    got
}

/// Fetches without acknowledging until a batch comes; fails after `within`.
fn first_batch(source: &dyn Inbound, within: Duration) -> Vec<InboundEvent> {
    let deadline = Instant::now() + within;
    loop {
        let batch = source.fetch(10, Duration::from_millis(200)).expect("fetch");
        if !batch.is_empty() {
            return batch;
        }
        assert!(Instant::now() < deadline, "nothing arrived within {within:?}");
    }
}

/// Fetches for `quiet` and asserts nothing came.
fn assert_quiet(source: &dyn Inbound, quiet: Duration, what: &str) {
    let got = source.fetch(16, quiet).expect("fetch");
    assert!(
        got.is_empty(),
        "{what}: unexpected {:?}",
        got.iter().map(|e| &e.event.event_type).collect::<Vec<_>>()
    );
}

fn ids(events: &[InboundEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event.id).collect()
}

#[test]
fn names_that_are_not_identifiers_are_refused_before_connecting() {
    for (config, needle) in [
        (
            PostgresConfig::default().with_table("events; drop table x"),
            "invalid table name \"events; drop table x\"",
        ),
        (PostgresConfig::default().with_schema("public\"--"), "invalid schema name"),
        (PostgresConfig::default().with_channel("wake up"), "invalid channel name"),
        (PostgresConfig::default().with_table("t".repeat(51)), "the limit is 50"),
        (
            PostgresConfig { operation_timeout: Duration::ZERO, ..PostgresConfig::default() },
            "operation_timeout",
        ),
    ] {
        let err = PostgresProvider::connect(config).expect_err("refused");
        assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} should say {needle}");
    }
}

/// A server that refuses the connection says why: its message and SQLSTATE, not the pool's
/// "db error"; a port nobody listens on names the socket's error.
#[test]
fn a_refused_connection_carries_the_servers_words() {
    let missing = PostgresConfig {
        connect_timeout: Duration::from_secs(5),
        ..PostgresConfig::new("host=127.0.0.1 port=5432 user=postgres dbname=eb_no_such_database")
    };
    let err = PostgresProvider::connect(missing).expect_err("no such database");
    let text = err.to_string();
    assert!(text.contains("eb_no_such_database") && text.contains("SQLSTATE 3D000"), "{text}");

    let closed = PostgresConfig {
        connect_timeout: Duration::from_secs(5),
        ..PostgresConfig::new("host=127.0.0.1 port=1 user=postgres dbname=test")
    };
    let err = PostgresProvider::connect(closed).expect_err("nobody listens on port 1");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
}

#[test]
fn a_capture_target_must_be_an_identifier_and_not_a_table_of_the_provider() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let err = provider.install_crud_capture("users; drop table x").expect_err("refused");
    assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(_)), "{err}");
    let err = provider.install_crud_capture(&backend.qualified("events")).expect_err("refused");
    assert!(err.to_string().contains("own tables"), "{err}");
    let err = provider.install_crud_capture(&backend.qualified("no_such_table")).expect_err("no table");
    assert!(
        matches!(err.kind(), ProviderErrorKind::Backend(_)) && err.to_string().contains("no_such_table"),
        "{err}"
    );
}

#[test]
fn migrations_apply_once_however_often_providers_connect() {
    let backend = PostgresBackend::new();
    let providers: Vec<PostgresProvider> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| backend.provider())).collect();
        handles.into_iter().map(|h| h.join().expect("connect does not panic")).collect()
    });
    let sql = Sql::connect().expect("connect");
    let versions = sql
        .numbers(&format!("SELECT version::bigint FROM {}", backend.qualified("events_migrations")), &[])
        .expect("versions");
    assert_eq!(versions, vec![1, 2]);
    drop(providers);
}

/// A schema an earlier release made (migration 1 alone) gets the later steps on the next connect:
/// the index of dead letters by event, which a redrive's look-up uses.
#[test]
fn a_schema_at_an_earlier_version_is_migrated_on_connect() {
    let backend = PostgresBackend::new();
    drop(backend.provider());
    let sql = Sql::connect().expect("connect");
    let index = backend.qualified("events_dl_event");
    sql.batch(&format!(
        "DROP INDEX {index}; DELETE FROM {} WHERE version > 1;",
        backend.qualified("events_migrations")
    ))
    .expect("back to version 1");
    let indexes = |sql: &Sql| {
        let query = format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexname = 'events_dl_event'",
            backend.schema
        );
        sql.numbers(&query, &[]).expect("indexes")
    };
    assert_eq!(indexes(&sql), vec![0]);

    let provider = backend.provider();
    let versions = sql
        .numbers(
            &format!(
                "SELECT version::bigint FROM {} ORDER BY version",
                backend.qualified("events_migrations")
            ),
            &[],
        )
        .expect("versions");
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(indexes(&sql), vec![1]);
    drop(provider);
}

/// A batch stored again after a lost commit reply, alone or mixed with new events, adds no row,
/// keeps every seq and is not delivered again.
#[test]
fn a_batch_retried_after_a_lost_commit_reply_duplicates_nothing() {
    let backend = PostgresBackend::new();
    let (writer, reader) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let inbound = source(&reader, &scope, "reader");
    let first: Vec<Event> = (0..5).map(|_| scope.event("orders.create")).collect();
    writer.store_batch(&shared(&first), None).expect("store");
    let seqs = |p: &PostgresProvider| -> Vec<(EventId, u64)> {
        p.replay(ReplayFrom::Beginning, Some(&scope.all()), 1000)
            .expect("replay")
            .events
            .into_iter()
            .map(|s| (s.event.id, s.seq))
            .collect()
    };
    let before = seqs(&writer);

    // The retry: the same batch, then the same batch with two new events around it.
    writer.store_batch(&shared(&first), None).expect("store again");
    let (new_a, new_b) = (scope.event("orders.create"), scope.event("orders.create"));
    let mut mixed = vec![new_a.clone()];
    mixed.extend(first.iter().cloned());
    mixed.push(new_b.clone());
    writer.store_batch(&shared(&mixed), None).expect("store mixed");

    let after = seqs(&writer);
    assert_eq!(&after[..5], &before[..], "re-stores keep their seqs");
    assert_eq!(after.iter().map(|(id, _)| *id).skip(5).collect::<Vec<_>>(), vec![new_a.id, new_b.id]);
    let stats = writer.stats().expect("stats");
    assert_eq!(stats.events_published, 7);
    assert_eq!(stats.provider_specific["replaced"], 10);
    let got = take(&*inbound, 7);
    assert_eq!(got.len(), 7);
    assert_quiet(&*inbound, Duration::from_millis(300), "re-stores are not delivered again");

    // The same with batches large enough to be copied: the retried COPY fails on the first stored
    // id and the batch goes through the staging table instead.
    let large: Vec<Event> = (0..100).map(|_| scope.event("orders.bulk")).collect();
    writer.store_batch(&shared(&large), None).expect("store a large batch");
    let before = seqs(&writer);
    let mut retried = large.clone();
    retried[50].status = EventStatus::Completed;
    let fresh = scope.event("orders.bulk");
    retried.insert(10, fresh.clone());
    writer.store_batch(&shared(&retried), None).expect("retry it with one new event");
    let after = seqs(&writer);
    assert_eq!(&after[..before.len()], &before[..], "re-stores keep their seqs");
    assert_eq!(after[before.len()..].iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![fresh.id]);
    assert_eq!(writer.get(large[50].id).expect("get").map(|e| e.status), Some(EventStatus::Completed));
    let stats = writer.stats().expect("stats");
    assert_eq!(stats.events_published, 7 + 101);
    assert_eq!(stats.provider_specific["replaced"], 10 + 100);
    assert_eq!(take(&*inbound, 101).len(), 101);
    assert_quiet(&*inbound, Duration::from_millis(300), "re-stores are not delivered again");
}

/// Two writers whose transactions commit out of seq order: the one holding the lower seq commits
/// last. A cursor on seq alone would have passed it; nothing is lost.
#[test]
fn concurrent_writers_committing_out_of_seq_order_lose_nothing() {
    let backend = PostgresBackend::new();
    let (writer, reader) = (backend.provider(), backend.provider());
    let scope = Scope::new();
    let inbound = source(&reader, &scope, "reader");
    let mut sql = Sql::connect().expect("connect");
    let outbox = writer.outbox();

    let slow = scope.event("slow");
    let fast = scope.event("fast");
    let runtime = sql.runtime().handle().clone();
    let client = sql.client();
    let tx = runtime.block_on(client.transaction()).expect("begin");
    // The slow writer takes its seq first and keeps its transaction open.
    runtime
        .block_on(outbox.publish(&tx, std::slice::from_ref(&slow)))
        .expect("publish in the open transaction");
    writer.store_batch(&[Arc::new(fast.clone())], None).expect("the fast writer commits");

    let open = writer.replay(ReplayFrom::Beginning, Some(&scope.all()), 10);
    assert!(
        open.as_ref().is_err_and(eventbroker::ProviderError::is_transient),
        "fast is committed, but a replay that returned it would step over slow's lower seq: {open:?}"
    );
    assert_quiet(&*inbound, Duration::from_millis(300), "fast, while a lower seq is still in flight");

    runtime.block_on(tx.commit()).expect("the slow writer commits");
    let stored = writer.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
    assert_eq!(stored.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![slow.id, fast.id]);
    assert!(stored[0].seq < stored[1].seq, "slow holds the lower seq yet committed last");
    let got = take(&*inbound, 2);
    assert_eq!(ids(&got), vec![slow.id, fast.id], "both, in commit order");
    assert_quiet(&*inbound, Duration::from_millis(300), "each once");

    // Many writers at once, from several providers: every event exactly once.
    let writers: Vec<PostgresProvider> = (0..3).map(|_| backend.provider()).collect();
    let stored: Vec<EventId> = std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter()
            .map(|w| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    for _ in 0..20 {
                        let batch: Vec<Event> = (0..5).map(|_| scope.event("burst")).collect();
                        w.store_batch(&shared(&batch), None).expect("store");
                        mine.extend(batch.iter().map(|e| e.id));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("writer")).collect()
    });
    let mut got = ids(&take(&*inbound, stored.len()));
    let mut expected = stored;
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected);
    assert_quiet(&*inbound, Duration::from_millis(300), "each once");
}

/// An event whose transaction took the lower seq and commits after a replay read past its place
/// is not stepped over: the replay waits for the open writer (1 s at most), then stops with where
/// to resume, and a replay resumed from there replays both.
#[test]
fn a_replay_resumed_from_its_cursor_sees_an_event_that_committed_late() {
    let backend = PostgresBackend::new();
    let provider = Arc::new(backend.provider());
    let broker = eventbroker::Broker::builder().provider(provider.clone()).build().expect("broker");
    let scope = Scope::new();
    let replayed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&replayed);
    broker
        .subscribe(&scope.ty(">"), move |event: &Event| {
            if event.metadata.get("replay") == Some(&serde_json::Value::Bool(true)) {
                seen.lock().expect("not poisoned").push(event.id);
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .expect("subscribe");
    let mut sql = Sql::connect().expect("connect");
    let (late, early) = (scope.event("late"), scope.event("early"));
    let runtime = sql.runtime().handle().clone();
    let tx = runtime.block_on(sql.client().transaction()).expect("begin");
    runtime
        .block_on(provider.outbox().publish(&tx, std::slice::from_ref(&late)))
        .expect("late takes its seq first and stays open");
    provider.store_batch(&shared(std::slice::from_ref(&early)), None).expect("early commits");

    let pattern = scope.ty(">");
    let started = Instant::now();
    let first = broker.replay(ReplayFrom::Beginning, Some(&pattern));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "a replay waits for an open writer 1 s at most, not {waited:?}");
    let Err(eventbroker::BrokerError::ReplayInterrupted { replayed: placed, resume_from, error }) = first
    else {
        panic!("the first replay may not replay early while late's lower seq is open: {first:?}");
    };
    assert_eq!(placed, 0);
    assert!(error.is_transient(), "{error}");
    runtime.block_on(tx.commit()).expect("late commits after the replay");
    let second = broker.replay(resume_from, Some(&pattern)).expect("resumed replay");
    assert_eq!(second.replayed, 2, "the resumed replay replays both");

    let deadline = Instant::now() + ARRIVE;
    while replayed.lock().expect("not poisoned").len() < 2 {
        assert!(Instant::now() < deadline, "the replayed events did not reach the handler");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got = replayed.lock().expect("not poisoned").clone();
    got.sort_unstable();
    let mut expected = vec![late.id, early.id];
    expected.sort_unstable();
    assert_eq!(got, expected, "each replayed once");
    let report = broker.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
}

/// The inbound horizon (rows whose `tx` is below every running transaction's) does not settle
/// `seq` order: a transaction that took its id before a younger one drew a lower seq, and draws
/// its own seq after, commits a row with an old `tx` above that lower seq. Replay still returns
/// nothing past the younger one's seq while it is open.
#[test]
fn a_replay_waits_for_a_younger_writer_under_an_older_ones_seq() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let (mut older, mut younger) = (Sql::connect().expect("connect"), Sql::connect().expect("connect"));
    let (older_rt, younger_rt) = (older.runtime().handle().clone(), younger.runtime().handle().clone());
    let outbox = provider.outbox();
    let (low, high) = (scope.event("low"), scope.event("high"));

    let old_tx = older_rt.block_on(older.client().transaction()).expect("begin");
    older_rt.block_on(old_tx.batch_execute("SELECT pg_current_xact_id()")).expect("take an id first");
    let young_tx = younger_rt.block_on(younger.client().transaction()).expect("begin");
    younger_rt.block_on(outbox.publish(&young_tx, std::slice::from_ref(&low))).expect("the lower seq");
    older_rt.block_on(outbox.publish(&old_tx, std::slice::from_ref(&high))).expect("the higher seq");
    older_rt.block_on(old_tx.commit()).expect("the older transaction commits first");

    let open = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10);
    assert!(
        open.as_ref().is_err_and(eventbroker::ProviderError::is_transient),
        "high is committed with an old tx, but the lower seq is still open: {open:?}"
    );
    younger_rt.block_on(young_tx.commit()).expect("the younger transaction commits");
    let page = provider.replay(ReplayFrom::Beginning, Some(&scope.all()), 10).expect("replay").events;
    assert_eq!(page.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![low.id, high.id]);
}

/// A run of rows that hold no valid event, far longer than one call can pass over within its
/// operation timeout, between readable events: every call returns within the timeout and moves
/// on past part of the run (never `Unavailable` at the same place again and again), no page
/// claims the end of history before the last event, and paging on reaches every event.
#[test]
fn a_replay_moves_on_past_any_run_of_unreadable_rows_in_bounded_calls() {
    let backend = PostgresBackend::new();
    let timeout = Duration::from_millis(500);
    let provider =
        postgres_support::connect(PostgresConfig { operation_timeout: timeout, ..backend.config() });
    let scope = Scope::new();
    let (first, last) = (scope.event("runs.first"), scope.event("runs.last"));
    provider.store_batch(&shared(std::slice::from_ref(&first)), None).expect("store");
    // 30 000 rows of a status no event has, and 3 000 captured-like rows whose payload breaks the
    // payload rules (a number beyond an `f64`), all matching the replay's pattern.
    Sql::connect()
        .expect("connect")
        .batch(&format!(
            "INSERT INTO {events} (id, source, \"type\", status, created_at_ns)
             SELECT gen_random_uuid(), 'system', '{bad}', 'nope', 0 FROM generate_series(1, 30000);
             INSERT INTO {events} (id, source, \"type\", status, payload, created_at_ns)
             SELECT gen_random_uuid(), 'database', '{bad}', 'pending', '{{\"v\": 1e400}}', 0
             FROM generate_series(1, 3000)",
            events = backend.qualified("events"),
            bad = scope.pattern("runs.bad").as_str(),
        ))
        .expect("insert unreadable rows");
    provider.store_batch(&shared(std::slice::from_ref(&last)), None).expect("store");

    let mut from = ReplayFrom::Beginning;
    let mut seen = Vec::new();
    let (mut calls, mut previous) = (0, None::<u64>);
    loop {
        calls += 1;
        assert!(calls <= 100, "paging must end; seen {seen:?}");
        let started = Instant::now();
        let page = provider.replay(from, None, 1).expect("no call times out");
        let took = started.elapsed();
        assert!(took < timeout + Duration::from_millis(500), "a call took {took:?}");
        assert!(page.events.len() <= 1);
        seen.extend(page.events.iter().map(|stored| stored.event.id));
        if page.end {
            assert_eq!(seen, [first.id, last.id], "the end came before the last event");
            break;
        }
        let next = page.next.expect("a page that is not the end read rows");
        assert!(previous.is_none_or(|previous| next > previous), "no progress past {previous:?}");
        previous = Some(next);
        from = ReplayFrom::Sequence(next);
    }
    assert!(calls > 2, "the run took more than one call to pass over");
    let passed_over = provider.stats().expect("stats").provider_specific["query_malformed"].clone();
    assert_eq!(passed_over, serde_json::json!(33_000), "each unreadable row counted once");

    // The pages of `replay_pages` go on past empty ones to the last event.
    let paged: Vec<EventId> = provider
        .replay_pages(ReplayFrom::Beginning, None, 1)
        .flat_map(|page| page.expect("replay page"))
        .map(|stored| stored.event.id)
        .collect();
    assert_eq!(paged, [first.id, last.id]);
}

/// Replays `pattern` from the beginning in pages of `page_size`, each call within `bound`: the
/// `seq`s returned, in order, and the sizes of the pages before the one that ended history.
fn replay_seqs(
    provider: &PostgresProvider,
    pattern: &Pattern,
    page_size: usize,
    bound: Duration,
) -> (Vec<i64>, Vec<usize>) {
    let (mut from, mut seen, mut sizes) = (ReplayFrom::Beginning, Vec::new(), Vec::new());
    loop {
        assert!(sizes.len() < 1_000, "paging must end; {} events seen", seen.len());
        let started = Instant::now();
        let page = provider.replay(from, Some(pattern), page_size).expect("no call times out");
        let took = started.elapsed();
        assert!(took < bound, "a call took {took:?}");
        seen.extend(page.events.iter().map(|stored| i64::try_from(stored.seq).expect("a seq")));
        if page.end {
            return (seen, sizes);
        }
        sizes.push(page.events.len());
        from = ReplayFrom::Sequence(page.next.expect("a page that is not the end read rows"));
    }
}

/// 200 000 rows, one in 1 000 of a sparse type and one in 2 of a dense one: every replay call
/// returns within a bound, a dense pattern fills every page before the last, and the pages
/// together hold exactly the matching rows, in order, the end coming only after the last.
#[test]
fn a_replay_with_a_pattern_over_a_long_table_returns_every_match_in_bounded_calls() {
    const ROWS: i64 = 200_000;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let (sparse, dense) = (scope.pattern("sparse.hit"), scope.pattern("dense.hit"));
    let events = backend.qualified("events");
    let sql = Sql::connect().expect("connect");
    sql.batch(&format!(
        "INSERT INTO {events} (id, source, \"type\", status, created_at_ns)
         SELECT gen_random_uuid(), 'system',
                CASE WHEN g % 1000 = 0 THEN '{sparse}' WHEN g % 2 = 1 THEN '{dense}' ELSE 'filler.tick' END,
                'pending', g
         FROM generate_series(1, {ROWS}) AS g;
         ANALYZE {events}",
        sparse = sparse.as_str(),
        dense = dense.as_str(),
    ))
    .expect("insert");
    let matching = |pattern: &Pattern| {
        let query = format!("SELECT seq FROM {events} WHERE \"type\" = $1 ORDER BY seq");
        sql.numbers(&query, &[&pattern.as_str()]).expect("matching rows")
    };
    let bound = Duration::from_secs(2);

    let (seen, _) = replay_seqs(&provider, &sparse, 100, bound);
    assert_eq!(seen, matching(&sparse), "the sparse pattern's rows, once each, in order");

    let (seen, sizes) = replay_seqs(&provider, &dense, 5_000, bound);
    assert_eq!(seen, matching(&dense), "the dense pattern's rows, once each, in order");
    assert!(sizes.iter().all(|&size| size == 5_000), "a dense pattern fills its pages: {sizes:?}");
}

/// Rows of the events table the server read since it was created, by any scan, as its statistics
/// count them once the provider's sessions (named `application_name`) have ended.
fn rows_read(sql: &Sql, backend: &PostgresBackend, table: &str) -> i64 {
    table_reads(sql, backend, table, "seq_tup_read + coalesce(idx_tup_fetch, 0)")
}

/// `counted` (columns of `pg_stat_user_tables`) of `table`, once the provider's sessions (named
/// `application_name`) have ended: a server process writes what it read to the statistics by the
/// time it exits.
fn table_reads(sql: &Sql, backend: &PostgresBackend, table: &str, counted: &str) -> i64 {
    let deadline = Instant::now() + ARRIVE;
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1";
    while sql.numbers(sessions, &[&backend.application_name]).expect("sessions") != [0] {
        assert!(Instant::now() < deadline, "the provider's sessions did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    sql.numbers(
        &format!("SELECT {counted} FROM pg_stat_user_tables WHERE relid = $1::text::regclass"),
        &[&table],
    )
    .expect("statistics")[0]
}

/// 150 000 rows of other types, then 150 000 of the replay's: one replay call reads at most the
/// windows' 110 000 rows, where one query for the page read either every row up to the first
/// match (through the primary key) or every match past the position, to sort them (through the
/// `type` index), 150 000 either way.
#[test]
fn one_replay_call_with_a_pattern_reads_a_bounded_number_of_rows() {
    const ROWS: i64 = 150_000;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let wanted = Scope::new().pattern("wanted.hit");
    let events = backend.qualified("events");
    let sql = Sql::connect().expect("connect");
    // Vacuumed, so the windows' bounds come from the primary key's entries alone and the count is
    // of the rows whose columns were read.
    sql.batch(&format!(
        "INSERT INTO {events} (id, source, \"type\", status, created_at_ns)
         SELECT gen_random_uuid(), 'system', CASE WHEN g <= {ROWS} THEN 'other.tick' ELSE '{wanted}' END,
                'pending', g
         FROM generate_series(1, 2 * {ROWS}) AS g",
        wanted = wanted.as_str(),
    ))
    .expect("insert");
    sql.batch(&format!("VACUUM ANALYZE {events}")).expect("vacuum");
    drop(provider);
    let before = rows_read(&sql, &backend, &events);
    let provider = backend.provider();
    let page = provider.replay(ReplayFrom::Beginning, Some(&wanted), 100).expect("replay");
    drop(provider);
    let read = rows_read(&sql, &backend, &events) - before;
    assert!(read <= 110_000, "one call read {read} rows");
    // 100 000 rows of other types, and then the call's budget is spent.
    assert_eq!((page.events.len(), page.end), (0, false), "the page goes on from {:?}", page.next);
}

/// A replay from a recent time over a long table starts at the rows created since, found in the
/// time index, instead of walking the table from its first row in bounded calls: the first call
/// returns the recent events, and says it reached the end; a time after every row ends at once.
#[test]
fn a_replay_from_a_recent_time_starts_at_the_rows_created_since() {
    const OLD: i64 = 120_000;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let events = backend.qualified("events");
    let sql = Sql::connect().expect("connect");
    // More old rows than one call looks at (100 000), created at the epoch's first nanoseconds.
    sql.batch(&format!(
        "INSERT INTO {events} (id, source, \"type\", status, created_at_ns)
         SELECT gen_random_uuid(), 'system', 'old.tick', 'pending', g FROM generate_series(1, {OLD}) AS g"
    ))
    .expect("insert");
    let since = Timestamp::now();
    let recent: Vec<Event> = (0..10).map(|_| scope.event("recent.tick")).collect();
    provider.store_batch(&shared(&recent), None).expect("store");

    let page = provider.replay(ReplayFrom::Time(since), None, 100).expect("replay");
    let got: Vec<EventId> = page.events.iter().map(|stored| stored.event.id).collect();
    assert_eq!(got, recent.iter().map(|e| e.id).collect::<Vec<_>>(), "the recent events, in one call");
    assert!(page.end, "and the end of history");

    let later = Timestamp::now().checked_add(SignedDuration::from_hours(1)).expect("in range");
    let page = provider.replay(ReplayFrom::Time(later), None, 100).expect("replay");
    assert!(page.events.is_empty() && page.end, "{page:?}");
    let after = page.next.expect("where a later replay goes on");
    let mut newest = scope.event("recent.tick");
    newest.created_at = later;
    provider.store_batch(&shared(std::slice::from_ref(&newest)), None).expect("store");
    let page = provider.replay(ReplayFrom::Sequence(after), None, 100).expect("replay");
    assert_eq!(page.events.iter().map(|stored| stored.event.id).collect::<Vec<_>>(), [newest.id]);
}

/// `psql`, a client that knows nothing of the broker, inserts, updates and deletes rows of a
/// captured table; the inbound source hands out the three events with their types and payloads.
#[test]
fn crud_capture_turns_psql_changes_into_events() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let users = backend.qualified("users");
    sql.batch(&format!("CREATE TABLE {users} (id bigint PRIMARY KEY, name text NOT NULL)")).expect("create");
    provider.install_crud_capture(&users).expect("install");
    provider.install_crud_capture(&users).expect("installing again replaces");

    let source = provider
        .open_inbound(&InboundConfig::new("capture", ConsumerGroup::Instance("capture".into())))
        .expect("open");
    source.set_filter(&[Pattern::parse(&format!("{users}.*")).expect("pattern")]).expect("filter");
    let script = format!(
        "INSERT INTO {users} VALUES (1, 'Zoë');
         UPDATE {users} SET name = 'Zoe' WHERE id = 1;
         DELETE FROM {users} WHERE id = 1;"
    );
    let status = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &postgres_support::url(), "-c", &script])
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql failed: {status}");

    let got = take(&*source, 3);
    let types: Vec<&str> = got.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(types, [format!("{users}.create"), format!("{users}.update"), format!("{users}.delete")]);
    let payload = |i: usize| -> serde_json::Value { got[i].event.payload().expect("a JSON payload") };
    assert_eq!(payload(0), serde_json::json!({"id": 1, "name": "Zoë"}));
    assert_eq!(
        payload(1),
        serde_json::json!({"old": {"id": 1, "name": "Zoë"}, "new": {"id": 1, "name": "Zoe"}})
    );
    assert_eq!(payload(2), serde_json::json!({"id": 1, "name": "Zoe"}));
    assert_eq!(
        got[1].event.payload_json(),
        Some(r#"{"old":{"id":1,"name":"Zoë"},"new":{"id":1,"name":"Zoe"}}"#),
        "an update's payload as compact as its rows"
    );
    for (event, operation) in got.iter().zip(["create", "update", "delete"]) {
        let e = &event.event;
        assert_eq!(
            (e.source, e.schema.as_str(), e.entity.as_str()),
            (EventSource::Database, &*backend.schema, "users")
        );
        assert_eq!(e.operation, operation);
        assert_eq!(e.id.as_uuid().get_version_num(), 7, "capture ids are UUID v7");
        assert_eq!(e.partition(), users, "one table's changes share a shard, in order");
    }

    assert!(provider.remove_crud_capture(&users).expect("remove"));
    assert!(!provider.remove_crud_capture(&users).expect("remove again"), "nothing left to remove");
    sql.batch(&format!("INSERT INTO {users} VALUES (2, 'after')")).expect("insert");
    assert_quiet(&*source, Duration::from_millis(300), "changes after the capture was removed");
}

/// A captured change has no publishing broker to write its lifecycle: the broker that handles it
/// does, so it ends `completed` or `failed` like a broker's own event, and retention can remove it.
#[test]
fn captured_changes_get_their_statuses_from_the_broker_that_handles_them() {
    let backend = PostgresBackend::new();
    let provider = Arc::new(postgres_support::connect(PostgresConfig {
        max_age: Some(Duration::from_millis(1)),
        ..backend.config()
    }));
    let sql = Sql::connect().expect("connect");
    let orders = backend.qualified("orders");
    sql.batch(&format!("CREATE TABLE {orders} (id bigint PRIMARY KEY, total numeric NOT NULL)"))
        .expect("create");
    provider.install_crud_capture(&orders).expect("install");
    let broker = eventbroker::Broker::builder()
        .provider(provider.clone())
        .instance_id(format!("{}-svc", backend.schema))
        .retry_policy(eventbroker::RetryPolicy::none())
        .build()
        .expect("broker");
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe(&format!("{orders}.*"), move |event: &Event| {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if event.operation == "delete" { Err("deletes are not allowed") } else { Ok(()) }
        })
        .expect("subscribe");
    std::thread::sleep(Duration::from_millis(300)); // The subscriptions settle before the first fetch.
    sql.batch(&format!(
        "INSERT INTO {orders} VALUES (1, 9.50); UPDATE {orders} SET total = 10 WHERE id = 1;
         DELETE FROM {orders} WHERE id = 1;"
    ))
    .expect("changes");
    let deadline = Instant::now() + ARRIVE;
    while handled.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the three changes were not handled");
        std::thread::sleep(Duration::from_millis(10));
    }
    broker.drain(ARRIVE).expect("drain");
    let mut captured = provider.list(&eventbroker::EventFilter::new()).expect("list");
    captured.sort_by_key(|e| e.created_at);
    let seen: Vec<(&str, EventStatus)> = captured.iter().map(|e| (e.operation.as_str(), e.status)).collect();
    assert_eq!(
        seen,
        [
            ("create", EventStatus::Completed),
            ("update", EventStatus::Completed),
            ("delete", EventStatus::Failed)
        ]
    );
    assert!(captured.iter().all(|e| e.completed_at >= e.processed_at && e.processed_at.is_some()));
    assert_eq!(captured[2].error, "deletes are not allowed");
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(provider.cleanup_now().expect("cleanup"), 3, "finished, so retention removes them");
    assert!(broker.shutdown(ARRIVE).is_clean());
}

/// An event published through the outbox exists iff the caller's transaction commits.
#[test]
fn the_outbox_delivers_once_on_commit_and_never_on_rollback() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let inbound = source(&provider, &scope, "reader");
    let outbox = provider.outbox();
    let mut sql = Sql::connect().expect("connect");
    let runtime = sql.runtime().handle().clone();
    let client = sql.client();

    let rolled_back = scope.event("billing.debited");
    let tx = runtime.block_on(client.transaction()).expect("begin");
    runtime.block_on(outbox.publish(&tx, std::slice::from_ref(&rolled_back))).expect("publish");
    runtime.block_on(tx.rollback()).expect("rollback");

    let mut committed = scope.event("billing.debited");
    committed.set_payload_json(r#"{ "amount" : 10.50 }"#).expect("json");
    let tx = runtime.block_on(client.transaction()).expect("begin");
    runtime.block_on(outbox.publish(&tx, std::slice::from_ref(&committed))).expect("publish");
    runtime.block_on(tx.commit()).expect("commit");

    let got = take(&*inbound, 1);
    assert_eq!(*got[0].event, committed, "every field, the payload byte for byte");
    assert_quiet(&*inbound, Duration::from_millis(400), "the rolled-back event, or a second delivery");
    assert_eq!(provider.get(rolled_back.id).expect("get"), None);

    // What a broker would refuse is refused before anything is written.
    let bad_type = scope.event("billing..debited");
    let too_deep = scope
        .event("billing.debited")
        .with_metadata("deep", (0..200).fold(serde_json::json!(1), |v, _| serde_json::json!([v])));
    for (event, needle) in [(&bad_type, "billing..debited"), (&too_deep, "\"deep\"")] {
        let tx = runtime.block_on(client.transaction()).expect("begin");
        let err =
            runtime.block_on(outbox.publish(&tx, &[committed.clone(), event.clone()])).expect_err("refused");
        assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("event 1") && err.to_string().contains(needle), "{err}");
        runtime.block_on(tx.rollback()).expect("rollback");
        assert_eq!(provider.get(event.id).expect("get"), None);
    }
}

/// The blocking outbox, through the `postgres` client's own transaction: the same guarantee,
/// and the same refusals, for a synchronous application.
#[test]
fn the_blocking_outbox_delivers_once_on_commit_and_never_on_rollback() {
    use eventbroker::provider::postgres::postgres;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let inbound = source(&provider, &scope, "reader");
    let outbox = provider.outbox();
    let mut client = postgres::Client::connect(&backend.config().url, postgres::NoTls).expect("connect");

    let rolled_back = scope.event("billing.debited");
    let mut tx = client.transaction().expect("begin");
    outbox.publish_blocking(&mut tx, std::slice::from_ref(&rolled_back)).expect("publish");
    tx.rollback().expect("rollback");

    let committed = scope.event("billing.debited");
    let mut tx = client.transaction().expect("begin");
    outbox.publish_blocking(&mut tx, std::slice::from_ref(&committed)).expect("publish");
    tx.commit().expect("commit");

    let got = take(&*inbound, 1);
    assert_eq!(*got[0].event, committed);
    assert_quiet(&*inbound, Duration::from_millis(400), "the rolled-back event, or a second delivery");
    assert_eq!(provider.get(rolled_back.id).expect("get"), None);

    let bad_type = scope.event("billing..debited");
    let mut tx = client.transaction().expect("begin");
    let err = outbox.publish_blocking(&mut tx, &[committed.clone(), bad_type]).expect_err("refused");
    assert!(matches!(err.kind(), ProviderErrorKind::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("event 1"), "{err}");
    outbox.publish_blocking(&mut tx, &[]).expect("nothing to publish");
}

/// Retention deletes finished events older than `max_age`, in bounded batches, and nothing else.
#[test]
fn retention_deletes_old_finished_events_in_bounded_batches() {
    let backend = PostgresBackend::new();
    let provider = postgres_support::connect(PostgresConfig {
        max_age: Some(Duration::from_secs(3600)),
        cleanup_batch: 7,
        ..backend.config()
    });
    let scope = Scope::new();
    // A member that fetches everything and never acknowledges: its claims must not outlive the
    // events they point at.
    let holder = source(&provider, &scope, "holder");
    let old = Timestamp::now().checked_sub(SignedDuration::from_hours(2)).expect("in range");
    let events: Vec<Event> = (0..40)
        .map(|i| {
            let mut event = scope.event("jobs.run");
            event.status = EventStatus::ALL[i % 4];
            if i < 30 {
                event.created_at = old;
            }
            event
        })
        .collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let mut held = 0;
    let deadline = Instant::now() + ARRIVE;
    while held < events.len() {
        assert!(Instant::now() < deadline, "only {held} of {} fetched", events.len());
        held += holder.fetch(64, Duration::from_millis(200)).expect("fetch").len();
    }
    let finished_and_old = events.iter().filter(|e| e.created_at == old && e.status.is_terminal()).count();
    assert_eq!(provider.cleanup_now().expect("cleanup"), finished_and_old as u64);
    let left: Vec<EventId> = scope.list(&provider).iter().map(|e| e.id).collect();
    let kept: Vec<EventId> = {
        let mut kept: Vec<&Event> =
            events.iter().filter(|e| e.created_at != old || !e.status.is_terminal()).collect();
        kept.sort_by_key(|e| (e.created_at, e.id));
        kept.iter().map(|e| e.id).collect()
    };
    assert_eq!(left, kept, "pending, processing and recent events stay");
    assert_eq!(provider.cleanup_now().expect("cleanup again"), 0);
    let claims = Sql::connect()
        .expect("connect")
        .numbers(&format!("SELECT count(*) FROM {}", backend.qualified("events_claims")), &[])
        .expect("count claims");
    assert_eq!(claims, vec![i64::try_from(kept.len()).expect("small")], "claims of deleted events are gone");
    assert_eq!(provider.stats().expect("stats").provider_specific["expired"], finished_and_old);
}

/// One `cleanup_now` keeps to one operation timeout, however many deletes a backlog needs: here
/// each delete takes 0.3 s and 20 are needed, against a timeout of 1 s. It deletes what it can
/// and the next call continues.
#[test]
fn cleanup_now_keeps_to_one_operation_timeout() {
    let backend = PostgresBackend::new();
    let timeout = Duration::from_secs(1);
    let provider = postgres_support::connect(PostgresConfig {
        max_age: Some(Duration::from_secs(3600)),
        cleanup_batch: 1,
        operation_timeout: timeout,
        ..backend.config()
    });
    let scope = Scope::new();
    let old = Timestamp::now().checked_sub(SignedDuration::from_hours(2)).expect("in range");
    let events: Vec<Event> = (0..20)
        .map(|_| {
            let mut event = scope.event("jobs.done");
            event.status = EventStatus::Completed;
            event.created_at = old;
            event
        })
        .collect();
    provider.store_batch(&shared(&events), None).expect("store");
    let (slow, events_table) = (backend.qualified("slow_delete"), backend.qualified("events"));
    Sql::connect()
        .expect("connect")
        .batch(&format!(
            "CREATE FUNCTION {slow}() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
             CREATE TRIGGER slow_delete BEFORE DELETE ON {events_table}
                 FOR EACH STATEMENT EXECUTE FUNCTION {slow}();"
        ))
        .expect("make every delete slow");

    let started = Instant::now();
    let deleted = provider.cleanup_now().expect("cleanup ends cleanly, with what it deleted");
    let took = started.elapsed();
    assert!(
        took < timeout + Duration::from_millis(500),
        "cleanup_now took {took:?}; the operation timeout is {timeout:?}"
    );
    assert!((1..20).contains(&deleted), "{deleted} of 20 deleted in the time one call has");
    let again = provider.cleanup_now().expect("the next call continues");
    assert!(again >= 1, "the next call deletes more");
    assert_eq!(scope.list(&provider).len() as u64, 20 - deleted - again);
}

/// Status updates of one batch fold per id, and the stored event follows `StatusUpdate::apply_to`.
#[test]
fn status_updates_fold_like_apply_to() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let event = provider.store_one(&scope.event("jobs.run")).expect("store");
    let started = Timestamp::new(1_700_000_000, 1).expect("valid");
    let updates = [
        StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(started),
        StatusUpdate::new(event.id, EventStatus::Failed).with_error("boom").with_retry_count(2),
    ];
    provider.update_status_batch(&updates).expect("update");
    let mut expected = Event::clone(&event);
    for update in &updates {
        update.apply_to(&mut expected);
    }
    assert_eq!(provider.get(event.id).expect("get"), Some(expected));
}

/// Time bounds outside the years a row holds (1677 to 2262), such as `Timestamp::MIN` for "from
/// the beginning", keep every row or none, as in memory, rather than failing the query.
#[test]
fn time_bounds_beyond_the_rows_range_keep_all_or_nothing_like_memory() {
    let backend = PostgresBackend::new();
    let postgres = backend.provider();
    let memory = MemoryProvider::default();
    let scope = Scope::new();
    let event = scope.event("jobs.run");
    let letter = DeadLetter::new(event.clone(), SubscriptionId::from_raw(7), scope.all().as_str(), "boom", 1);
    let providers: [&dyn Provider; 2] = [&postgres, &memory];
    let answers: Vec<Vec<usize>> = providers
        .iter()
        .map(|provider| {
            provider.store_batch(&shared(std::slice::from_ref(&event)), None).expect("store");
            provider.store_dead_letters(std::slice::from_ref(&letter)).expect("store letter");
            let list = |filter: EventFilter| provider.list(&filter).expect("list").len();
            let letters =
                |filter: DeadLetterFilter| provider.list_dead_letters(&filter).expect("letters").len();
            let replay = |at: Timestamp| {
                provider.replay(ReplayFrom::Time(at), Some(&scope.all()), 10).expect("replay").events.len()
            };
            vec![
                list(scope.filter().with_start_time(Timestamp::MIN)),
                list(scope.filter().with_start_time(Timestamp::MAX)),
                list(scope.filter().with_end_time(Timestamp::MAX)),
                list(scope.filter().with_end_time(Timestamp::MIN)),
                letters(
                    DeadLetterFilter::new().with_start_time(Timestamp::MIN).with_end_time(Timestamp::MAX),
                ),
                letters(DeadLetterFilter::new().with_start_time(Timestamp::MAX)),
                letters(DeadLetterFilter::new().with_end_time(Timestamp::MIN)),
                replay(Timestamp::MIN),
                replay(Timestamp::MAX),
            ]
        })
        .collect();
    assert_eq!(answers[0], vec![1, 0, 1, 0, 1, 0, 0, 1, 0], "postgres");
    assert_eq!(answers[0], answers[1], "postgres and memory agree");
}

/// PostgreSQL text cannot hold NUL. One in a field (a handler's error message, say) is stored as
/// U+FFFD rather than failing the whole batch, and with it the other events' writes.
#[test]
fn a_nul_in_a_text_field_fails_no_batch() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let plain = scope.event("jobs.run");
    let mut odd = scope.event("jobs.run").with_partition_key("k\0");
    odd.session_id = "s\0".into();
    odd.error = "e\0".into();
    provider.store_batch(&shared(&[plain.clone(), odd.clone()]), None).expect("store");
    let stored = provider.get(odd.id).expect("get").expect("stored");
    assert_eq!((stored.session_id.as_str(), stored.error.as_str()), ("s\u{FFFD}", "e\u{FFFD}"));
    assert_eq!(stored.partition_key.as_deref(), Some("k\u{FFFD}"));
    // A batch large enough to be copied rather than inserted.
    let mut copied: Vec<Event> = (0..40).map(|_| scope.event("jobs.copy")).collect();
    copied[20].instance_id = "i\0".into();
    provider.store_batch(&shared(&copied), None).expect("store by COPY");
    assert_eq!(
        provider.list(&EventFilter::new().with_event_type(scope.pattern("jobs.copy"))).expect("list").len(),
        40
    );

    provider
        .update_status_batch(&[
            StatusUpdate::new(plain.id, EventStatus::Completed),
            StatusUpdate::new(odd.id, EventStatus::Failed).with_error("bad byte \0 here"),
        ])
        .expect("update");
    let plain_status = provider.get(plain.id).expect("get").expect("stored").status;
    let odd_now = provider.get(odd.id).expect("get").expect("stored");
    assert_eq!(plain_status, EventStatus::Completed);
    assert_eq!((odd_now.status, odd_now.error.as_str()), (EventStatus::Failed, "bad byte \u{FFFD} here"));

    let letter = DeadLetter::new(odd.clone(), SubscriptionId::from_raw(1), scope.all().as_str(), "x\0", 3);
    provider.store_dead_letters(std::slice::from_ref(&letter)).expect("store letter");
    let stored = provider.get_dead_letter(letter.id).expect("get letter").expect("stored");
    assert_eq!(stored.error, "x\u{FFFD}");
    assert_eq!(stored.event.session_id, "s\0", "the event keeps its JSON escape");
}

/// A broker on the provider: what it publishes is stored through its batched writer and ends
/// completed, with the timestamps of its lifecycle.
#[test]
fn a_broker_persists_the_lifecycle_of_what_it_publishes() {
    let backend = PostgresBackend::new();
    let provider = Arc::new(backend.provider());
    let broker =
        eventbroker::Broker::builder().workers(2).provider(provider.clone()).build().expect("broker");
    let scope = Scope::new();
    broker.subscribe(&scope.ty(">"), |_: &Event| Ok::<(), std::convert::Infallible>(())).expect("subscribe");
    let published: Vec<Event> = (0..200).map(|i| scope.event(&format!("orders.t{}", i % 4))).collect();
    for event in &published {
        broker.publish(event.clone()).expect("publish");
    }
    broker.flush(Duration::from_secs(30)).expect("the writer persisted everything");
    let deadline = Instant::now() + ARRIVE;
    loop {
        let stored = scope.list(&*provider);
        let done = stored.iter().filter(|e| e.status == EventStatus::Completed).count();
        if done == published.len() {
            assert!(stored.iter().all(|e| e.processed_at.is_some() && e.completed_at.is_some()));
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {} completed", published.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = broker.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
}

/// An event whose time a row cannot hold (before 1677) is given up alone: the broker's writer
/// narrows the refused batch down, and the events written with it are stored.
#[test]
fn an_event_a_row_cannot_hold_drops_alone() {
    let backend = PostgresBackend::new();
    let provider = Arc::new(backend.provider());
    let broker = eventbroker::Broker::builder().provider(provider.clone()).build().expect("broker");
    let scope = Scope::new();
    let mut events: Vec<Event> = (0..60).map(|_| scope.event("old.neighbour")).collect();
    events[30].created_at = "1500-01-01T00:00:00Z".parse().expect("a time");
    let old = events[30].id;
    broker.publish_batch(events).expect("publish");
    let err = broker.flush(Duration::from_secs(30)).expect_err("one store was refused");
    let eventbroker::BrokerError::WritesDropped { dropped, error } = err else { panic!("{err}") };
    assert_eq!(dropped, 1, "the old event alone: {error}");
    assert!(matches!(error.kind(), ProviderErrorKind::InvalidInput(_)), "{error}");
    let stored = scope.list(&*provider);
    assert_eq!(stored.len(), 59);
    assert!(stored.iter().all(|e| e.id != old));
    assert!(broker.shutdown(Duration::from_secs(10)).flush_error.is_none(), "reported by the flush before");
}

/// A member whose claim lapsed and was taken over gives nothing back with a late `nak`: the event
/// stays the new owner's, not due again while that member handles it.
#[test]
fn a_late_nak_from_a_former_owner_leaves_the_new_owners_claim() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("queue"));
    let member = |name: &str| {
        let config =
            InboundConfig::new(scope.name(name), group.clone()).with_claim_idle(Duration::from_secs(1));
        let source = provider.open_inbound(&config).expect("open");
        source.set_filter(&[scope.all()]).expect("filter");
        source
    };
    let (former, taker) = (member("former"), member("taker"));
    let event = scope.event("lapsed");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    let first = first_batch(&*former, ARRIVE);
    assert_eq!(ids(&first), vec![event.id]);
    std::thread::sleep(Duration::from_millis(1100)); // The former member's claim lapses.
    assert_eq!(ids(&first_batch(&*taker, ARRIVE)), vec![event.id], "taken over");

    former.nak(&[first[0].token], Duration::ZERO).expect("nak");
    // Within the taker's claim idle time (1 s from the takeover).
    assert_quiet(&*taker, Duration::from_millis(300), "the event the taker holds");
    assert_quiet(&*former, Duration::from_millis(300), "the event the taker holds");
}

/// A source on `provider` of its own group, filtered to `pattern`.
fn capture_source(provider: &PostgresProvider, pattern: &str) -> Arc<dyn Inbound> {
    let name = format!("cap{}", fastrand::u32(..));
    let source = provider
        .open_inbound(&InboundConfig::new(&name, ConsumerGroup::Instance(name.clone())))
        .expect("open");
    source.set_filter(&[Pattern::parse(pattern).expect("pattern")]).expect("filter");
    source
}

fn event_types(got: &[InboundEvent]) -> Vec<String> {
    got.iter().map(|e| e.event.event_type.to_string()).collect()
}

/// Capture belongs to the table, not to its name. A table a migration drops and creates again
/// is not captured, and the status says so, until capture is installed again; a renamed one is
/// still captured, under its old name, and the status of that name gives the new one, and
/// removing by the old name removes it; a disabled trigger reads as altered.
#[test]
fn capture_status_finds_a_table_dropped_and_created_again_or_renamed() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let (t, renamed) = (backend.qualified("orders"), backend.qualified("orders_old"));
    let status = |table: &str| provider.crud_capture_status(table).expect("status");
    let create = format!("CREATE TABLE {t} (id bigint PRIMARY KEY)");
    sql.batch(&create).expect("create");
    assert_eq!(status(&t), CaptureStatus::NotInstalled);
    provider.install_crud_capture(&t).expect("install");
    assert_eq!(status(&t), CaptureStatus::Capturing);
    let source = capture_source(&provider, &format!("{t}.*"));

    sql.batch(&format!("DROP TABLE {t}")).expect("drop");
    assert_eq!(status(&t), CaptureStatus::NoTable);
    sql.batch(&create).expect("create again");
    assert_eq!(status(&t), CaptureStatus::NotInstalled, "the trigger went with the dropped table");
    sql.batch(&format!("INSERT INTO {t} VALUES (1)")).expect("insert");
    assert_quiet(&*source, Duration::from_millis(300), "a change to the table created again");
    provider.install_crud_capture(&t).expect("install again");
    assert_eq!(status(&t), CaptureStatus::Capturing);
    sql.batch(&format!("INSERT INTO {t} VALUES (2)")).expect("insert");
    assert_eq!(event_types(&take(&*source, 1)), [format!("{t}.create")]);

    sql.batch(&format!("ALTER TABLE {t} RENAME TO orders_old")).expect("rename");
    assert_eq!(status(&t), CaptureStatus::Renamed { now: renamed.clone() });
    assert_eq!(status(&renamed), CaptureStatus::Altered, "captured under another name");
    sql.batch(&format!("INSERT INTO {renamed} VALUES (3)")).expect("insert");
    assert_eq!(event_types(&take(&*source, 1)), [format!("{t}.create")], "named after the old name");
    assert!(provider.remove_crud_capture(&t).expect("remove by the old name"));
    assert_eq!(status(&renamed), CaptureStatus::NotInstalled);
    assert_eq!(status(&t), CaptureStatus::NoTable);

    provider.install_crud_capture(&renamed).expect("install under the new name");
    sql.batch(&format!("ALTER TABLE {renamed} DISABLE TRIGGER ALL")).expect("disable");
    assert_eq!(status(&renamed), CaptureStatus::Altered);
    provider.install_crud_capture(&renamed).expect("install puts it back");
    assert_eq!(status(&renamed), CaptureStatus::Capturing);
}

/// A captured row whose JSON the payload rules refuse (a `numeric` too large for an `f64`; a
/// lone surrogate or nesting past the depth limit do the same) is passed over, logged and counted:
/// it does not fail every later fetch of every group that wants the table's events. The fetch
/// marks it failed, with the reason, so stats count it and retention removes it; `list` and
/// `replay` pass over it too, and a replay page is still full while history lasts.
#[test]
fn a_captured_row_that_holds_no_valid_event_is_passed_over() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let t = backend.qualified("measures");
    sql.batch(&format!("CREATE TABLE {t} (id bigint PRIMARY KEY, v numeric)")).expect("create");
    provider.install_crud_capture(&t).expect("install");
    let source = capture_source(&provider, &format!("{t}.*"));
    sql.batch(&format!(
        "INSERT INTO {t} VALUES (1, 1); INSERT INTO {t} VALUES (2, 10::numeric ^ 400); INSERT INTO {t} VALUES (3, 3);"
    ))
    .expect("three inserts by another client");
    let deadline = Instant::now() + ARRIVE;
    let mut rows = Vec::new();
    while !rows.contains(&Some(3)) {
        assert!(Instant::now() < deadline, "row 3 never arrived (got {rows:?})");
        let batch = source.fetch(10, Duration::from_millis(200)).expect("no fetch fails");
        source.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
        rows.extend(
            batch.iter().map(|e| e.event.payload::<serde_json::Value>().expect("payload")["id"].as_i64()),
        );
    }
    assert_eq!(rows, [Some(1), Some(3)]);
    let stats = provider.stats().expect("stats");
    assert_eq!(stats.provider_specific.get("inbound_malformed"), Some(&serde_json::json!(1)));
    assert_eq!((stats.pending_events, stats.failed_events), (2, 1), "{stats:?}");

    let row_id = |event: &Event| event.payload::<serde_json::Value>().expect("payload")["id"].as_i64();
    let listed = provider.list(&eventbroker::EventFilter::default()).expect("list passes over the row");
    assert_eq!(listed.iter().map(row_id).collect::<Vec<_>>(), [Some(1), Some(3)]);
    let page = provider.replay(ReplayFrom::Beginning, None, 2).expect("replay passes over the row").events;
    assert_eq!(page.iter().map(|stored| row_id(&stored.event)).collect::<Vec<_>>(), [Some(1), Some(3)]);
    let after_first = ReplayFrom::Sequence(page[0].seq + 1);
    let rest = provider.replay(after_first, None, 1).expect("replay").events;
    assert_eq!(rest.iter().map(|stored| row_id(&stored.event)).collect::<Vec<_>>(), [Some(3)]);
    let passed_over = provider.stats().expect("stats").provider_specific["query_malformed"].clone();
    assert_eq!(passed_over, serde_json::json!(3), "one list and two replays each passed over it");

    let events = stats.provider_specific["table"].as_str().expect("the events table").to_owned();
    let failed = sql
        .numbers(
            &format!("SELECT count(*) FROM {events} WHERE status = 'failed' AND error LIKE 'holds no valid event: %payload%'"),
            &[],
        )
        .expect("count");
    assert_eq!(failed, [1]);
}

/// A fetch whose transaction commits on the server while its reply never reaches the client (a
/// timeout, here a slow commit) leaves its events claimed by this member, past its cursor; the
/// next fetch makes them due again, so they come back instead of staying claimed for as long as
/// the instance lives.
#[test]
fn events_claimed_by_a_fetch_whose_reply_was_lost_are_fetched_again() {
    let backend = PostgresBackend::new();
    let provider = postgres_support::connect(PostgresConfig {
        operation_timeout: Duration::from_millis(1500),
        ..backend.config()
    });
    let scope = Scope::new();
    let source = provider
        .open_inbound(
            &InboundConfig::new("a", scope.instance("a")).with_claim_idle(Duration::from_millis(500)),
        )
        .expect("open");
    source.set_filter(&[scope.all()]).expect("filter");
    let sql = Sql::connect().expect("connect");
    let claims = backend.qualified("events_claims");
    // A slow server, once: the claim statement and the commit take a second each, within the
    // server's statement timeout, together past the client's 1.5 s.
    sql.batch(&format!(
        "CREATE TABLE {s}.slow (armed boolean);
         INSERT INTO {s}.slow VALUES (true);
         CREATE FUNCTION {s}.slow_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT armed FROM {s}.slow) THEN PERFORM pg_sleep(1); END IF;
             RETURN NULL;
         END $$;
         CREATE FUNCTION {s}.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT armed FROM {s}.slow) THEN UPDATE {s}.slow SET armed = false; PERFORM pg_sleep(1); END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER a_slow AFTER INSERT ON {claims} FOR EACH STATEMENT EXECUTE FUNCTION {s}.slow_once();
         CREATE CONSTRAINT TRIGGER b_slow_commit AFTER INSERT ON {claims} DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {s}.slow_commit();",
        s = backend.schema,
    ))
    .expect("slow triggers");
    let event = scope.event("lost");
    provider.store_batch(&[Arc::new(event.clone())], None).expect("store");
    // Other sessions' transactions on the shared server may hold the event back for a moment.
    let deadline = Instant::now() + ARRIVE;
    loop {
        assert!(Instant::now() < deadline, "the event never became deliverable");
        match source.fetch(10, Duration::ZERO) {
            Ok(batch) if batch.is_empty() => std::thread::sleep(Duration::from_millis(50)),
            Ok(batch) => panic!("handed out without the slow commit: {}", batch.len()),
            Err(error) => {
                assert!(matches!(error.kind(), ProviderErrorKind::Unavailable(_)), "{error}");
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(1500)); // The server finishes the commit.
    assert_eq!(sql.numbers(&format!("SELECT count(*) FROM {claims}"), &[]).expect("count"), vec![1]);
    let got = take(&*source, 1);
    assert_eq!(ids(&got), vec![event.id], "the event claimed by the lost fetch comes again");
}

/// A claim idle time or a nak delay of `Duration::MAX` ("never", which `BrokerBuilder::claim_idle`
/// accepts) means about a century, as every other wait of the crate does: it fails no fetch and no
/// nak with an interval PostgreSQL cannot hold.
#[test]
fn durations_as_long_as_duration_max_fail_no_fetch_and_no_nak() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let config = InboundConfig::new(scope.name("a"), scope.instance("a")).with_claim_idle(Duration::MAX);
    let source = provider.open_inbound(&config).expect("open");
    source.set_filter(&[scope.all()]).expect("filter");
    let event = scope.event("never.reclaimed");
    provider.store_batch(&shared(std::slice::from_ref(&event)), None).expect("store");
    let got = first_batch(&*source, ARRIVE);
    assert_eq!(ids(&got), vec![event.id]);
    source.nak(&[got[0].token], Duration::MAX).expect("a nak for Duration::MAX");
    assert_quiet(&*source, Duration::from_millis(300), "an event given back for about a century");
}

/// A member filtered to `patterns` patterns made by `pattern` and to `wanted`, whose group has
/// `unwanted` events of another type to pass over, on a provider whose calls time out after
/// `timeout`.
struct Behind {
    _backend: PostgresBackend,
    provider: PostgresProvider,
    scope: Scope,
    source: Arc<dyn Inbound>,
}

impl Behind {
    fn new(timeout: Duration, unwanted: u32, pattern: impl Fn(usize) -> String, patterns: usize) -> Self {
        let backend = PostgresBackend::new();
        let provider =
            postgres_support::connect(PostgresConfig { operation_timeout: timeout, ..backend.config() });
        let scope = Scope::new();
        let source =
            provider.open_inbound(&InboundConfig::new(scope.name("a"), scope.instance("a"))).expect("open");
        let mut filter: Vec<Pattern> = (0..patterns).map(|i| scope.pattern(&pattern(i))).collect();
        filter.push(scope.pattern("wanted"));
        source.set_filter(&filter).expect("filter");
        Sql::connect()
            .expect("connect")
            .batch(&format!(
                "INSERT INTO {} (id, source, \"type\", status, created_at_ns)
                 SELECT gen_random_uuid(), 'system', 'metrics.tick', 'pending', 0 FROM generate_series(1, {unwanted})",
                backend.qualified("events")
            ))
            .expect("events nobody here wants");
        Self { _backend: backend, provider, scope, source }
    }
}

/// A member subscribed to many patterns (a service with a handler per event type) passes over
/// events of other types at the rate of one pattern: PostgreSQL keeps 32 compiled regular
/// expressions per session, and with one per pattern past that, every row recompiled each of them,
/// so a fetch over 20 000 unwanted events outlasted the operation timeout, every time: the member
/// never received anything again.
#[test]
fn a_member_with_many_patterns_passes_over_unwanted_events_quickly() {
    let behind = Behind::new(Duration::from_secs(2), 20_000, |i| format!("handler{i}.*"), 64);
    let (provider, scope, source) = (&behind.provider, &behind.scope, &*behind.source);
    let (wanted, matched) = (scope.event("wanted"), scope.event("handler63.x"));
    provider.store_batch(&shared(&[wanted.clone(), matched.clone()]), None).expect("store");
    let deadline = Instant::now() + ARRIVE;
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "only {} of 2 events arrived", got.len());
        got.extend(source.fetch(10, Duration::from_millis(200)).expect("no fetch fails"));
    }
    assert_eq!(ids(&got), vec![wanted.id, matched.id]);
}

/// However long the stretch of unwanted events behind a group's cursor, and however costly its
/// filter, a fetch looks at a bounded number of rows and moves the cursor past them: a read that
/// had to pass them all in one statement outlasted the operation timeout, failed, and was tried
/// again from the same cursor, for ever. (300 wildcard patterns cost PostgreSQL tens of
/// microseconds a row, so 100 000 rows stand here for the millions a cheaper filter takes.)
#[test]
fn a_group_far_behind_unwanted_events_catches_up_in_bounded_steps() {
    let behind = Behind::new(Duration::from_secs(1), 100_000, |i| format!("handler{i}.*.done"), 300);
    let (provider, scope, source) = (&behind.provider, &behind.scope, &*behind.source);
    let wanted = scope.event("wanted");
    provider.store_batch(&shared(std::slice::from_ref(&wanted)), None).expect("store");
    // Progress, not speed, is the point: a loaded host may take a while over 25 steps.
    let got = first_batch(source, 3 * ARRIVE);
    assert_eq!(ids(&got), vec![wanted.id]);
}

/// Capture of a partitioned table names the table in its events, not the partition a row lies in.
#[test]
fn capture_of_a_partitioned_table_names_the_table() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let s = &backend.schema;
    sql.batch(&format!(
        "CREATE TABLE {s}.orders (id int, region int) PARTITION BY RANGE (region);
         CREATE TABLE {s}.orders_a PARTITION OF {s}.orders FOR VALUES FROM (0) TO (10);
         CREATE TABLE {s}.orders_b PARTITION OF {s}.orders FOR VALUES FROM (10) TO (20);"
    ))
    .expect("create");
    provider.install_crud_capture(&format!("{s}.orders")).expect("install");
    assert_eq!(
        provider.crud_capture_status(&format!("{s}.orders")).expect("status"),
        CaptureStatus::Capturing,
        "the partitions' copies of the trigger are not captures of their own"
    );
    let all = capture_source(&provider, &format!("{s}.>"));
    sql.batch(&format!("INSERT INTO {s}.orders VALUES (1, 1)")).expect("insert");
    sql.batch(&format!("UPDATE {s}.orders SET region = 2")).expect("update within a partition");
    let got = event_types(&take(&*all, 2));
    assert_eq!(got, [format!("{s}.orders.create"), format!("{s}.orders.update")]);
    assert_quiet(&*all, Duration::from_millis(300), "events of the partitions");
}

/// Two providers in different schemas whose tables share a name (`events`, the default) capture
/// one table: each has a trigger of its own, and removing one leaves the other.
#[test]
fn two_providers_capture_one_table_side_by_side() {
    let (b1, b2) = (PostgresBackend::new(), PostgresBackend::new());
    let (p1, p2) = (b1.provider(), b2.provider());
    let sql = Sql::connect().expect("connect");
    let users = b1.qualified("users");
    sql.batch(&format!("CREATE TABLE {users} (id int)")).expect("create");
    p1.install_crud_capture(&users).expect("install 1");
    p2.install_crud_capture(&users).expect("install 2");
    let (s1, s2) = (capture_source(&p1, &format!("{users}.*")), capture_source(&p2, &format!("{users}.*")));
    sql.batch(&format!("INSERT INTO {users} VALUES (1)")).expect("insert");
    let (first, second) = (take(&*s1, 1), take(&*s2, 1));
    assert_eq!(event_types(&first), event_types(&second));
    assert!(p2.remove_crud_capture(&users).expect("remove 2"));
    sql.batch(&format!("INSERT INTO {users} VALUES (2)")).expect("insert");
    assert_eq!(take(&*s1, 1).len(), 1);
    assert_quiet(&*s2, Duration::from_millis(300), "changes after the second provider's capture was removed");
    assert_quiet(&*s1, Duration::from_millis(300), "a second copy");
}

/// Instances of a service starting together each install capture on the same tables (and on
/// others, through the same trigger function): every install succeeds, and each change is
/// captured once. PostgreSQL refuses concurrent replacements of one function ("tuple concurrently
/// updated", a unique violation on its first creation) unless they take turns.
#[test]
fn capture_installs_racing_from_several_instances_all_succeed() {
    let backend = PostgresBackend::new();
    let providers: Vec<PostgresProvider> = (0..4).map(|_| backend.provider()).collect();
    let sql = Sql::connect().expect("connect");
    let tables: Vec<String> = (0..4).map(|i| backend.qualified(&format!("t{i}"))).collect();
    for table in &tables {
        sql.batch(&format!("CREATE TABLE {table} (id int)")).expect("create");
    }
    for round in 0..6 {
        std::thread::scope(|s| {
            let installs: Vec<_> = providers
                .iter()
                .enumerate()
                .map(|(i, provider)| {
                    // Even rounds: all on one table; odd rounds: each on its own.
                    let table = &tables[if round % 2 == 0 { 0 } else { i }];
                    s.spawn(move || provider.install_crud_capture(table))
                })
                .collect();
            for install in installs {
                install.join().expect("no panic").expect("every racing install succeeds");
            }
        });
    }
    let source = capture_source(&providers[0], &format!("{}.>", backend.schema));
    for table in &tables {
        sql.batch(&format!("INSERT INTO {table} VALUES (1)")).expect("insert");
    }
    let mut got = event_types(&take(&*source, tables.len()));
    got.sort_unstable();
    assert_eq!(got, tables.iter().map(|t| format!("{t}.create")).collect::<Vec<_>>());
    assert_quiet(&*source, Duration::from_millis(300), "a second copy of a change");
}

/// Installing capture takes a lock on the table that every writer conflicts with, and while it
/// waits for one writer's open transaction every later writer queues behind it. Installing again
/// (what each start of a service does) finds the trigger in place and takes no such lock; a first
/// install waits for the lock 1 s at most, then fails as transient, so writers are held up for no
/// longer than that.
#[test]
fn installing_capture_does_not_hold_the_tables_writers_back() {
    let backend = PostgresBackend::new();
    let provider = postgres_support::connect(PostgresConfig {
        operation_timeout: Duration::from_secs(4),
        ..backend.config()
    });
    let orders = backend.qualified("orders");
    let mut long = Sql::connect().expect("connect");
    long.batch(&format!("CREATE TABLE {orders} (id int)")).expect("create");
    provider.install_crud_capture(&orders).expect("install");
    let source = capture_source(&provider, &format!("{orders}.*"));

    // A writer whose transaction stays open, and a second writer that must not wait on the
    // install: with the install queued for the table's lock, it would wait for the first.
    let open_writer = |long: &mut Sql| {
        let runtime = long.runtime().handle().clone();
        runtime.block_on(long.client().batch_execute(&format!("BEGIN; INSERT INTO {orders} VALUES (1)")))
    };
    let second_writer = |id: i32| {
        let other = Sql::connect().expect("connect");
        let started = Instant::now();
        other
            .batch(&format!("SET statement_timeout = '2s'; INSERT INTO {orders} VALUES ({id})"))
            .expect("a writer is not held up behind the install");
        started.elapsed()
    };
    open_writer(&mut long).expect("an open writer");
    std::thread::scope(|s| {
        let install = s.spawn(|| {
            let started = Instant::now();
            (provider.install_crud_capture(&orders), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        let waited = second_writer(2);
        let (installed, took) = install.join().expect("no panic");
        installed.expect("installing again while a writer is open");
        assert!(took < Duration::from_secs(1), "installing again took {took:?}");
        assert!(waited < Duration::from_secs(1), "the second writer waited {waited:?}");
    });
    long.batch("COMMIT").expect("the open writer commits");
    assert_eq!(event_types(&take(&*source, 2)), [format!("{orders}.create"), format!("{orders}.create")]);

    // A first install (after a removal) waits 1 s at most for the open writer, then fails as
    // transient; writers wait no longer than that, and the install succeeds once the table is free.
    assert!(provider.remove_crud_capture(&orders).expect("remove"));
    open_writer(&mut long).expect("an open writer");
    std::thread::scope(|s| {
        let install = s.spawn(|| {
            let started = Instant::now();
            (provider.install_crud_capture(&orders), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        let waited = second_writer(4);
        let (installed, took) = install.join().expect("no panic");
        let error = installed.expect_err("the table is locked by the open writer");
        assert!(error.is_transient(), "{error}");
        assert!(took < Duration::from_secs(2), "the failed install took {took:?}");
        assert!(waited < Duration::from_secs(2), "the second writer waited {waited:?}");
    });
    long.batch("ROLLBACK").expect("the open writer ends");
    provider.install_crud_capture(&orders).expect("install once the table is free");
    let sql = Sql::connect().expect("connect");
    sql.batch(&format!("INSERT INTO {orders} VALUES (5)")).expect("insert");
    assert_eq!(event_types(&take(&*source, 1)), [format!("{orders}.create")]);

    // A trigger that is in place but not as installing makes it (disabled by hand) is replaced.
    sql.batch(&format!("ALTER TABLE {orders} DISABLE TRIGGER USER")).expect("disable");
    provider.install_crud_capture(&orders).expect("install again");
    sql.batch(&format!("INSERT INTO {orders} VALUES (6)")).expect("insert");
    assert_eq!(event_types(&take(&*source, 1)), [format!("{orders}.create")]);
}

/// A trigger installed under the name earlier versions gave it (`<table>_capture`) is replaced
/// by installing again, not doubled, and removed by `remove_crud_capture`.
#[test]
fn capture_installed_under_an_earlier_name_is_replaced_not_doubled() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let users = backend.qualified("users");
    sql.batch(&format!("CREATE TABLE {users} (id int)")).expect("create");
    provider.install_crud_capture(&users).expect("install");
    assert!(provider.remove_crud_capture(&users).expect("remove"));
    let function = backend.qualified("events_capture");
    sql.batch(&format!(
        "CREATE TRIGGER events_capture AFTER INSERT OR UPDATE OR DELETE ON {users}
         FOR EACH ROW EXECUTE FUNCTION {function}()"
    ))
    .expect("a trigger as an earlier version installed it");
    provider.install_crud_capture(&users).expect("install again");
    let source = capture_source(&provider, &format!("{users}.*"));
    sql.batch(&format!("INSERT INTO {users} VALUES (1)")).expect("insert");
    assert_eq!(take(&*source, 1).len(), 1);
    assert_quiet(&*source, Duration::from_millis(300), "a second copy of the change");
    provider.install_crud_capture(&users).expect("install once more");
    sql.batch(&format!(
        "CREATE TRIGGER events_capture AFTER INSERT ON {users} FOR EACH ROW EXECUTE FUNCTION {function}()"
    ))
    .expect("the earlier trigger again");
    assert!(provider.remove_crud_capture(&users).expect("remove both"));
    sql.batch(&format!("INSERT INTO {users} VALUES (2)")).expect("insert");
    assert_quiet(&*source, Duration::from_millis(500), "changes after the capture was removed");
}

/// The trigger writes the provider's tables with the provider's rights: a client allowed to
/// write the captured table, and nothing in the provider's schema, still can. (The predefined
/// role `pg_read_all_data`, given INSERT on the captured table only, plays that client.)
#[test]
fn a_client_without_rights_on_the_provider_schema_writes_a_captured_table() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let t = backend.qualified("audited");
    sql.batch(&format!("CREATE TABLE {t} (id int); GRANT INSERT ON {t} TO pg_read_all_data;"))
        .expect("create");
    provider.install_crud_capture(&t).expect("install");
    let source = capture_source(&provider, &format!("{t}.*"));
    let result =
        sql.batch(&format!("BEGIN; SET LOCAL ROLE pg_read_all_data; INSERT INTO {t} VALUES (1); COMMIT;"));
    let _ = sql.batch("ROLLBACK");
    assert!(result.is_ok(), "the client's own insert failed: {:?}", result.err());
    assert_eq!(event_types(&take(&*source, 1)), [format!("{t}.create")]);
}

/// A user's table in the provider's schema whose name begins with the provider's table name
/// (`events_archive` beside `events`) can be captured; the provider's own tables cannot.
#[test]
fn a_user_table_named_like_the_providers_can_be_captured() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let archive = backend.qualified("events_archive");
    sql.batch(&format!("CREATE TABLE {archive} (id int)")).expect("create");
    provider.install_crud_capture(&archive).expect("a user table, not the provider's");
    for own in ["events", "events_claims", "events_groups", "events_dead_letters", "events_migrations"] {
        assert!(provider.install_crud_capture(&backend.qualified(own)).is_err(), "{own} is refused");
    }
}

/// Events waiting in a work-queue member's shard behind slow handlers keep their claims, and a
/// partial unsubscribe gives back to the group (see `work_queue_support`).
#[test]
fn work_queue_members_keep_what_waits_and_give_back_what_they_no_longer_want() {
    let backend = PostgresBackend::new();
    let connect = || -> Arc<dyn Provider> { Arc::new(backend.provider()) };
    work_queue_support::events_waiting_in_a_shard_keep_their_claims(&connect, "waiting");
    work_queue_support::a_partial_unsubscribe_gives_back_to_the_group(&connect, "partial");
}

/// A role of its own for one test, dropped (with the rights granted to it) when the test ends.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        let sql = Sql::connect().expect("connect");
        if let Err(error) = sql.batch(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.0)) {
            eprintln!("could not drop test role {}: {error}", self.0);
        }
    }
}

/// A service whose role may only read and write the provider's tables (the owner role migrated
/// them) connects, stores and reads: a schema already current is not touched, since PostgreSQL
/// refuses even `CREATE SCHEMA IF NOT EXISTS` to a role without the right to create.
#[test]
fn a_role_with_only_data_rights_connects_to_a_current_schema() {
    let backend = PostgresBackend::new();
    backend.provider().close().expect("migrated by the owner");
    let role = Role(format!("eb_test_role_{:016x}", fastrand::u64(..)));
    let schema = &backend.schema;
    Sql::connect()
        .expect("connect")
        .batch(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role};",
            role = role.0
        ))
        .expect("a role with data rights only");
    let url = postgres_support::url();
    assert!(!url.contains("://"), "this test names its role in a key=value connection string, not {url}");
    let service = postgres_support::connect(PostgresConfig {
        url: format!("{url} user={}", role.0),
        ..backend.config()
    });
    let event = Arc::new(Event::new(EventSource::System, "roles.checked"));
    service.store_batch(std::slice::from_ref(&event), None).expect("store");
    assert_eq!(service.get(event.id).expect("get").map(|e| e.id), Some(event.id));
    // Replay reads `pg_locks` to tell whether a lower seq may still commit: open to every role.
    let replayed = service.replay(ReplayFrom::Beginning, None, 10).expect("replay").events;
    assert_eq!(replayed.iter().map(|s| s.event.id).collect::<Vec<_>>(), vec![event.id]);
    service.close().expect("close");
}

/// A row whose status no event has (written by hand) is left out of stats and passed over by
/// `list`, instead of failing every call that reads it.
#[test]
fn a_row_with_no_valid_status_fails_neither_stats_nor_list() {
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let sql = Sql::connect().expect("connect");
    let events =
        shared(&[Event::new(EventSource::System, "odd.status"), Event::new(EventSource::System, "odd.fine")]);
    provider.store_batch(&events, None).expect("store");
    let table =
        provider.stats().expect("stats").provider_specific["table"].as_str().expect("table").to_owned();
    sql.batch(&format!("UPDATE {table} SET status = 'bogus' WHERE \"type\" = 'odd.status'"))
        .expect("update by hand");
    let stats = provider.stats().expect("stats leave the row out");
    assert_eq!((stats.total_events, stats.pending_events), (1, 1), "{stats:?}");
    let listed = provider.list(&eventbroker::EventFilter::default()).expect("list passes the row over");
    assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), [events[1].id]);
}

/// `stats` counts a small events table exactly; a large one it estimates from a sample, near the
/// truth, reading a bounded share of its rows where a count read every one of them (what the
/// server's statistics count as read by sequential and sample scans shows which).
#[test]
fn stats_count_a_small_table_and_estimate_a_large_one_from_a_sample() {
    const ROWS: i64 = 40_000;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let events: Vec<Event> = (0..3).map(|_| Event::new(EventSource::System, "stats.small")).collect();
    provider.store_batch(&shared(&events), None).expect("store");
    provider.update_status_batch(&[StatusUpdate::new(events[0].id, EventStatus::Completed)]).expect("update");
    let stats = provider.stats().expect("stats");
    assert_eq!((stats.total_events, stats.pending_events, stats.completed_events), (3, 2, 1), "{stats:?}");
    assert_eq!(stats.provider_specific["event_counts_exact"], serde_json::json!(true));
    assert_eq!(stats.provider_specific["dead_letters_exact"], serde_json::json!(true));
    let table = stats.provider_specific["table"].as_str().expect("the events table").to_owned();
    drop(provider);

    // 1.5 KB rows, five to an 8 KiB block: 8 000 blocks, 62 MiB; the statuses in turn.
    let sql = Sql::connect().expect("connect");
    sql.batch(&format!(
        "INSERT INTO {table} (id, source, \"type\", status, error, created_at_ns)
         SELECT gen_random_uuid(), 'system', 'stats.big',
                (ARRAY['pending', 'processing', 'completed', 'failed'])[g % 4 + 1], repeat('x', 1500), 0
         FROM generate_series(1, {ROWS}) AS g"
    ))
    .expect("insert");
    let rows_read = || table_reads(&sql, &backend, &table, "seq_tup_read");
    let before = rows_read();
    let provider = backend.provider();
    let stats = provider.stats().expect("stats");
    drop(provider);
    let read = rows_read() - before;
    assert!(read < ROWS / 4, "stats read {read} of the table's {ROWS} rows");
    assert_eq!(stats.provider_specific["event_counts_exact"], serde_json::json!(false), "{stats:?}");
    let near =
        |estimate: u64, truth: i64| estimate.abs_diff(truth.unsigned_abs()) <= truth.unsigned_abs() / 5;
    assert!(near(stats.total_events, ROWS + 3), "{stats:?}");
    for status in [EventStatus::Pending, EventStatus::Processing, EventStatus::Completed, EventStatus::Failed]
    {
        assert!(near(stats.count(status), ROWS / 4), "{status:?}: {stats:?}");
    }
}

/// Two brokers of this process built from one configuration (a pool each) under one instance id
/// would share one cursor in the table's groups: the second is refused, naming the table (see
/// `instance_id_support`); another table in the schema is another namespace.
#[test]
fn one_instance_id_receives_from_a_postgres_table_once_per_process() {
    let backend = PostgresBackend::new();
    let mut config = eventbroker::config::Config::default();
    config.provider = eventbroker::config::ProviderKind::Database;
    config.database.host = Some("127.0.0.1".into());
    config.database.port = Some(5432);
    config.database.user = Some("postgres".into());
    config.database.dbname = Some("test".into());
    config.database.schema = Some(backend.schema.clone());
    config.database.application_name = Some(backend.application_name.clone());
    let mut elsewhere = config.clone();
    elsewhere.database.table_name = Some("other_events".into());
    instance_id_support::one_instance_id_receives_from_a_namespace_once(&config, &backend.schema, &elsewhere);
}

/// A provider's group namespace is its servers and database as the connection string names them
/// (defaults filled in, either syntax), and the events table.
#[test]
fn the_group_namespace_names_the_server_database_and_table() {
    let backend = PostgresBackend::new();
    let namespace = |url: &str, table: &str| {
        let config = PostgresConfig { url: url.into(), table: table.into(), ..backend.config() };
        postgres_support::connect(config).group_namespace()
    };
    let words = namespace("host=127.0.0.1 user=postgres dbname=test", "events");
    assert_eq!(words, namespace("postgresql://postgres:hunter2@127.0.0.1:5432/test", "events"));
    let expected = format!(" 127.0.0.1:5432 database test, table \"{}\".\"events\"", backend.schema);
    assert!(words.to_string().ends_with(&expected), "{words}");
    assert_ne!(words, namespace("host=127.0.0.1 user=postgres dbname=test", "other_events"));
}

/// A group with nothing to fetch costs the server no transaction ids: an idle broker polls all
/// day, and each pass that took a row lock used one up (864 000 a day per broker at the default
/// poll), hastening the freezing that keeps the server clear of wraparound. Other tests on the
/// server use ids meanwhile, so the fewest of three runs counts.
#[test]
fn idle_fetches_use_no_transaction_ids() {
    const FETCHES: i64 = 200;
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let source = source(&provider, &scope, "a");
    provider.store_batch(&shared(&[scope.event("first")]), None).expect("store");
    take(&*source, 1);
    let sql = Sql::connect().expect("connect");
    // Each call is a transaction of its own, and uses one id itself.
    let next_xid = || sql.numbers("SELECT pg_current_xact_id()::text::bigint", &[]).expect("xid")[0];
    let used = (0..3)
        .map(|_| {
            let before = next_xid();
            for _ in 0..FETCHES {
                assert!(source.fetch(16, Duration::ZERO).expect("fetch").is_empty());
            }
            next_xid() - before - 1
        })
        .min()
        .expect("three runs");
    assert!(used < FETCHES / 4, "{FETCHES} idle fetches used {used} transaction ids");
}

/// A work-queue member that stalls inside its fetch, holding the group's row (its process
/// paused, or a network partition its TCP connection outlives), holds the other members back for
/// a bounded time: their fetches stop waiting for the row after 1 s (half the operation timeout
/// here) and return, without an error; the server ends the stalled session once it has been idle
/// in its transaction for the operation timeout (2 s), which undoes what it had claimed; the other
/// member then receives that event and the ones stored meanwhile. Before, the stalled member's
/// transaction stayed open for as long as its connection did, every other member's fetch failed
/// at its statement timeout, and no member of any group received anything newer.
#[test]
fn a_member_stalled_inside_a_fetch_holds_the_group_back_for_a_bounded_time() {
    let timeout = Duration::from_secs(2);
    let backend = PostgresBackend::new();
    let proxy = postgres_support::StallingProxy::start();
    let stalling_app = format!("{}-stalls", backend.application_name);
    let stalling = postgres_support::connect(PostgresConfig {
        url: proxy.url(),
        operation_timeout: timeout,
        application_name: stalling_app.clone(),
        ..backend.config()
    });
    let healthy =
        postgres_support::connect(PostgresConfig { operation_timeout: timeout, ..backend.config() });
    let scope = Scope::new();
    let group = ConsumerGroup::Shared(scope.name("queue"));
    let member = |provider: &PostgresProvider, name: &str| {
        let source =
            provider.open_inbound(&InboundConfig::new(scope.name(name), group.clone())).expect("open");
        source.set_filter(&[scope.all()]).expect("filter");
        source
    };
    let (stalled, other) = (member(&stalling, "stalled"), member(&healthy, "other"));
    // The stalling member's claim statement takes a while, so the test can cut it off while its
    // transaction holds the group's row.
    let sql = Sql::connect().expect("connect");
    sql.batch(&format!(
        "CREATE FUNCTION {s}.slow_claims() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF current_setting('application_name') = '{stalling_app}' THEN PERFORM pg_sleep(1.5); END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER slow_claims AFTER INSERT ON {claims} FOR EACH STATEMENT EXECUTE FUNCTION {s}.slow_claims();",
        s = backend.schema,
        claims = backend.qualified("events_claims"),
    ))
    .expect("slow claims");
    let first = scope.event("first");
    healthy.store_batch(&shared(std::slice::from_ref(&first)), None).expect("store");
    let fetching = std::thread::spawn(move || {
        let deadline = Instant::now() + ARRIVE;
        // Until the stall cuts a fetch off (other sessions may hold the event back a moment).
        while Instant::now() < deadline {
            match stalled.fetch(10, Duration::from_millis(100)) {
                Ok(batch) => assert!(batch.is_empty(), "the stalling member received {} events", batch.len()),
                Err(_) => break,
            }
        }
    });
    let deadline = Instant::now() + ARRIVE;
    while sql
        .numbers(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event = 'PgSleep'",
            &[&stalling_app],
        )
        .expect("activity")
        != [1]
    {
        assert!(Instant::now() < deadline, "the stalling member never claimed the event");
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.stall(true);
    let stalled_at = Instant::now();

    let second = scope.event("second");
    healthy.store_batch(&shared(std::slice::from_ref(&second)), None).expect("store");
    let mut got = Vec::new();
    while got.len() < 2 {
        let started = Instant::now();
        let batch = other.fetch(10, Duration::from_millis(100)).expect("the other member's fetch");
        assert!(started.elapsed() < timeout, "one fetch took {:?}", started.elapsed());
        other.ack(&batch.iter().map(|e| Ack::handled(e.token)).collect::<Vec<_>>()).expect("ack");
        got.extend(batch);
        // The stalled statement (1.5 s), the session idle in its transaction (2 s), and room.
        assert!(stalled_at.elapsed() < Duration::from_secs(7), "only {} of 2 events arrived", got.len());
    }
    let mut expected = vec![first.id, second.id];
    let mut got = ids(&got);
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, expected, "the event the stalled member had claimed, and the one after");
    proxy.stall(false);
    fetching.join().expect("the stalling member's fetch");
}

/// A database restored into another cluster keeps the old cluster's transaction ids in its
/// groups and events, past every id the new server assigns: a group would receive nothing,
/// silently. A fetch fails instead, naming the group and the numbers, with or without a pass
/// before it, until the groups are re-based as the provider's docs say; then the group receives
/// what it had not looked at, and what comes after.
#[test]
fn a_group_restored_from_another_cluster_fails_loudly_until_rebased() {
    const OLD_CLUSTER: i64 = 1_000_000_000_000; // Ids the old cluster had reached.
    let backend = PostgresBackend::new();
    let provider = backend.provider();
    let scope = Scope::new();
    let member = source(&provider, &scope, "a");
    let (seen, unseen, later) = (scope.event("seen"), scope.event("unseen"), scope.event("later"));
    provider.store_batch(&shared(std::slice::from_ref(&seen)), None).expect("store");
    take(&*member, 1);
    provider.store_batch(&shared(std::slice::from_ref(&unseen)), None).expect("store");
    let sql = Sql::connect().expect("connect");
    let (events, groups) = (backend.qualified("events"), backend.qualified("events_groups"));
    sql.batch(&format!(
        "UPDATE {events} SET tx = tx + {OLD_CLUSTER};
         UPDATE {groups} SET cursor_tx = cursor_tx + {OLD_CLUSTER}, start_xmax = start_xmax + {OLD_CLUSTER},
                             start_xip = ARRAY(SELECT x + {OLD_CLUSTER} FROM unnest(start_xip) AS x);"
    ))
    .expect("the old cluster's ids");
    let cursor = sql.numbers(&format!("SELECT cursor_tx FROM {groups}"), &[]).expect("cursor")[0];
    // One source after a pass that returned events, one fresh (it asks first whether there is work).
    let fresh = source(&provider, &scope, "a");
    for source in [&member, &fresh] {
        let error = source.fetch(10, Duration::from_millis(200)).expect_err("a cursor past the server's ids");
        assert!(matches!(error.kind(), ProviderErrorKind::Backend(_)), "{error}");
        let message = error.to_string();
        let at = format!("cursor at transaction {cursor}");
        for needle in [&scope.name("a"), &at, "restored into another cluster", "next transaction id is"] {
            assert!(message.contains(needle), "{needle:?} in {message}");
        }
    }

    // The re-base of the provider's docs.
    sql.batch(&format!(
        "BEGIN;
         UPDATE {groups} AS g
         SET cursor_tx = 0,
             cursor_seq = COALESCE((SELECT min(e.seq) - 1 FROM {events} AS e
                                    WHERE (e.tx, e.seq) > (g.cursor_tx, g.cursor_seq)),
                                   (SELECT max(seq) FROM {events}), 0),
             start_xmax = 0, start_xip = '{{}}';
         UPDATE {events} SET tx = 0;
         COMMIT;"
    ))
    .expect("re-base");
    assert_eq!(ids(&take(&*fresh, 1)), vec![unseen.id], "what the group had not looked at, alone");
    provider.store_batch(&shared(std::slice::from_ref(&later)), None).expect("store");
    assert_eq!(ids(&take(&*fresh, 1)), vec![later.id]);
    assert_quiet(&*member, Duration::from_millis(300), "nothing twice");
}
