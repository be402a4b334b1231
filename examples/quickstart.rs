//! The seed's quick start on the embedded memory provider: subscribe to `public.users.create` and
//! `*.*.delete`, publish asynchronously and synchronously, read the stored events back, print the
//! statistics, and shut down without losing anything.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, Event, EventFilter, EventSource, EventStatus, Mode, RetryPolicy};

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct User {
    id: i64,
    name: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::builder()
        .mode(Mode::Async)
        .workers(2)
        .buffer_size(1024)
        .instance_id("quickstart-1")
        .retry_policy(RetryPolicy { initial_delay: Duration::from_millis(10), ..RetryPolicy::default() })
        .build()?;

    let created = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&created);
    broker.subscribe("public.users.create", move |event: &Event| {
        let user: User = event.payload()?;
        if user.id <= 3 {
            println!("new user created: {} (id {})", user.name, user.id);
        }
        counter.fetch_add(1, Ordering::Relaxed);
        Ok::<(), eventbroker::PayloadError>(())
    })?;
    let deleted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&deleted);
    broker.subscribe("*.*.delete", move |event: &Event| {
        println!("deleted: {}.{} by user {}", event.schema, event.entity, event.user_id);
        counter.fetch_add(1, Ordering::Relaxed);
        Ok::<(), std::convert::Infallible>(())
    })?;

    // Async: queued on a shard, handled by its worker thread.
    let started = Instant::now();
    let n = 100_000;
    for id in 1..=n {
        let event = Event::for_entity(EventSource::Database, "public", "users", "create")
            .with_user_id(id)
            .with_session_id("session-456")
            .with_payload(&User { id, name: format!("user-{id}") })?;
        broker.publish_async(event)?;
    }
    println!("published {n} events asynchronously in {:?}", started.elapsed());

    // Sync: handlers run on this thread before publish_sync returns.
    let delete = Event::for_entity(EventSource::Database, "public", "posts", "delete").with_user_id(123);
    let delete_id = delete.id;
    broker.publish_sync(delete)?;
    println!("sync delete handled: {}", deleted.load(Ordering::Relaxed) == 1);

    // Stored events and their lifecycle, through the memory provider.
    broker.flush(Duration::from_secs(5))?;
    let stored = broker.provider().get(delete_id)?.expect("the sync event was stored");
    println!("stored delete event: status {}, completed at {:?}", stored.status, stored.completed_at);
    let recent = broker.provider().list(&EventFilter::default().with_entity("posts"))?;
    println!("events for entity posts: {}", recent.len());
    assert_eq!(stored.status, EventStatus::Completed);
    let held = broker.provider().stats()?;
    println!(
        "the memory provider holds {} events ({} completed), its bound; {} stored in all",
        held.total_events, held.completed_events, held.events_published
    );

    let report = broker.shutdown(Duration::from_secs(10));
    let stats = broker.stats();
    println!(
        "shutdown: drained {} queued events in {:?}, clean: {}",
        report.drained,
        report.elapsed,
        report.is_clean()
    );
    println!(
        "stats: published {}, processed {}, completed {}, failed {}, unrouted {}",
        stats.published, stats.processed, stats.completed, stats.failed, stats.unrouted
    );
    println!(
        "handled {} creates and {} deletes in {:?}",
        created.load(Ordering::Relaxed),
        deleted.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert_eq!(created.load(Ordering::Relaxed), u64::try_from(n)?);
    assert_eq!(stats.processed, u64::try_from(n)? + 1);
    Ok(())
}
