//! Events per second persisted by the PostgreSQL provider, batched against one write per event, in
//! the same run, against the server at `EVENTBROKER_POSTGRES_URL` (default 127.0.0.1:5432, database
//! `test`), in a schema of its own dropped at the end.
//!
//! - `store_batch/N`: [`EventSink::store_batch`] of N events, as the broker's writer calls it: one
//!   transaction, binary `COPY`, one `pg_notify`.
//! - `store_batch/1`: the same path one event at a time.
//! - `store_batch without secondary indexes/10000`: the same, into a table with only its primary
//!   key and unique id: what the indexes for delivery, `list` and type patterns cost.
//! - `insert autocommit/1`: the baseline of the Go seed's provider: one prepared single-row
//!   `INSERT` per event, each its own transaction, on a plain tokio-postgres client.
//!
//! Run: `cargo bench --features postgres --bench provider_postgres`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::provider::postgres::{PostgresConfig, PostgresProvider, tokio_postgres};
use eventbroker::{Event, EventSink, EventSource};

fn url() -> String {
    std::env::var("EVENTBROKER_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

/// A realistic event: a database change with a small payload and one metadata entry.
fn event() -> Event {
    Event::for_entity(EventSource::Database, "public", "users", "create")
        .with_user_id(42)
        .with_instance_id("bench")
        .with_metadata("trace", "00-abc-01")
        .with_payload(&serde_json::json!({"id": 42, "name": "Zoë", "email": "zoe@example.com"}))
        .expect("a JSON payload")
}

fn events(n: usize) -> Vec<Arc<Event>> {
    (0..n).map(|_| Arc::new(event())).collect()
}

/// A plain client for the baseline and for dropping the schema.
struct Plain {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Plain {
    fn connect() -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            client
        });
        Self { runtime, client }
    }
}

fn store(c: &mut Criterion) {
    let schema = format!("eb_bench_{:016x}", fastrand::u64(..));
    let config = PostgresConfig {
        cleanup_interval: None,
        ..PostgresConfig::new(url()).with_schema(&schema).with_application_name("eventbroker-bench")
    };
    let provider =
        PostgresProvider::connect(config).expect("the PostgreSQL server (scripts/ensure-service postgres)");
    let plain = Plain::connect();
    let insert = plain
        .runtime
        .block_on(plain.client.prepare(&format!(
            "INSERT INTO \"{schema}\".events (id, source, \"type\", status, payload, user_id, instance_id,
                 \"schema\", entity, operation, created_at_ns, metadata)
             VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $9, $10, $11, $12::text::json)"
        )))
        .unwrap();

    // A second schema whose events table keeps only its primary key and unique id.
    let bare_schema = format!("{schema}_bare");
    let bare = PostgresProvider::connect(PostgresConfig {
        schema: bare_schema.clone(),
        ..provider.config().clone()
    })
    .unwrap();
    plain
        .runtime
        .block_on(plain.client.batch_execute(&format!(
            "DROP INDEX \"{bare_schema}\".events_tx_seq, \"{bare_schema}\".events_created, \"{bare_schema}\".events_type"
        )))
        .unwrap();

    let mut group = c.benchmark_group("postgres_store");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for batch in [1, 100, 1_000, 10_000] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("store_batch", batch), &batch, |b, &n| {
            b.iter_batched(
                || events(n),
                |batch| provider.store_batch(&batch, None).unwrap(),
                BatchSize::PerIteration,
            );
        });
    }
    group.throughput(Throughput::Elements(10_000));
    group.bench_function(BenchmarkId::new("store_batch without secondary indexes", 10_000), |b| {
        b.iter_batched(
            || events(10_000),
            |batch| bare.store_batch(&batch, None).unwrap(),
            BatchSize::PerIteration,
        );
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("insert autocommit", 1), |b| {
        b.iter_batched(
            event,
            |e| {
                let metadata = serde_json::to_string(&e.metadata).unwrap();
                let created = i64::try_from(e.created_at.as_nanosecond()).unwrap();
                plain
                    .runtime
                    .block_on(plain.client.execute(
                        &insert,
                        &[
                            e.id.as_uuid(),
                            &e.source.as_str(),
                            &e.event_type.as_str(),
                            &e.status.as_str(),
                            &e.payload_json(),
                            &e.user_id,
                            &e.instance_id.as_str(),
                            &e.schema.as_str(),
                            &e.entity.as_str(),
                            &e.operation.as_str(),
                            &created,
                            &metadata,
                        ],
                    ))
                    .unwrap()
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();

    drop((provider, bare));
    let drop_schemas = format!("DROP SCHEMA \"{schema}\" CASCADE; DROP SCHEMA \"{bare_schema}\" CASCADE");
    plain.runtime.block_on(plain.client.batch_execute(&drop_schemas)).unwrap();
}

criterion_group!(benches, store);
criterion_main!(benches);
