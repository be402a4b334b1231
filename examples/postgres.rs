//! What only the PostgreSQL provider does: plain SQL on an application table becomes events (CRUD
//! capture), and events written in the application's own transaction exist if and only if it
//! commits (the outbox). A broker receives both, and writes their statuses.
//!
//! Needs a server; the example works in a schema of its own and drops it at the end.
//!
//! ```text
//! cargo run --example postgres --features postgres                  # 127.0.0.1:5432, database test
//! cargo run --example postgres --features postgres -- "host=db.internal user=app dbname=app"
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventbroker::provider::postgres::tokio_postgres;
use eventbroker::{Broker, Event, EventFilter, EventSource, EventStore, PostgresConfig, PostgresProvider};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let url =
        std::env::args().nth(1).unwrap_or_else(|| "host=127.0.0.1 user=postgres dbname=test".to_owned());
    let schema = format!("eb_example_{:08x}", fastrand::u32(..));
    let provider = Arc::new(PostgresProvider::connect(PostgresConfig::new(&url).with_schema(&schema))?);

    // The application's own connection: the outbox is async, so a synchronous program runs it on
    // a runtime of its own.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut client, connection) = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))?;
    runtime.spawn(connection);
    let result = run(&provider, &runtime, &mut client, &schema);
    runtime.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))?;
    result
}

fn run(
    provider: &Arc<PostgresProvider>,
    runtime: &tokio::runtime::Runtime,
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<(), Error> {
    let orders = format!("{schema}.orders");
    runtime
        .block_on(client.batch_execute(&format!(
            "CREATE TABLE {orders} (id bigint PRIMARY KEY, total numeric NOT NULL)"
        )))?;
    provider.install_crud_capture(&orders)?;

    // One worker, so that the output follows the order of the changes: with more, events of
    // different types run on different shards, side by side.
    let broker =
        Broker::builder().provider(provider.clone()).instance_id("example-orders").workers(1).build()?;
    let handled = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&handled);
    // Captured types start with the schema: `<schema>.orders.create`.
    broker.subscribe_infallible(&format!("{schema}.orders.*"), move |event| {
        println!("captured {}: {}", event.event_type, event.payload_json().unwrap_or("null"));
        count.fetch_add(1, Ordering::Relaxed);
    })?;
    let count = Arc::clone(&handled);
    broker.subscribe_infallible("billing.>", move |event| {
        println!("from the outbox: {} for user {}", event.event_type, event.user_id);
        count.fetch_add(1, Ordering::Relaxed);
    })?;

    // Plain SQL, as any client would run it.
    runtime.block_on(client.batch_execute(&format!(
        "INSERT INTO {orders} VALUES (1, 9.50);
         UPDATE {orders} SET total = 10 WHERE id = 1;
         DELETE FROM {orders} WHERE id = 1;"
    )))?;

    // The outbox: one transaction commits its event, one rolls back and leaves none.
    let outbox = provider.outbox();
    runtime.block_on(async {
        for (order, commit) in [(2_i64, true), (3, false)] {
            let tx = client.transaction().await?;
            tx.execute(&format!("INSERT INTO {orders} VALUES ($1, 20)"), &[&order]).await?;
            let event = Event::new(EventSource::Database, "billing.invoice.issued").with_user_id(order);
            outbox.publish(&tx, &[event]).await?;
            if commit { tx.commit().await? } else { tx.rollback().await? }
        }
        Ok::<(), Error>(())
    })?;

    // Order 1's three changes, order 2's insert and its invoice; order 3 rolled back, with its
    // invoice.
    let expected = 5;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    broker.drain(Duration::from_secs(10))?;
    let mut stored = provider.list(&EventFilter::new())?;
    stored.sort_by_key(|event| event.created_at);
    for event in &stored {
        println!("stored {}: {}", event.event_type, event.status);
    }
    println!("handled {} of {expected}", handled.load(Ordering::Relaxed));
    let report = broker.shutdown(Duration::from_secs(10));
    println!("shutdown clean: {}", report.is_clean());
    Ok(())
}
