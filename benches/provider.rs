//! Events per second through the broker and the memory provider with the full status lifecycle
//! (store, processing, completed), batched writer against per-event writes, in the same run.
//!
//! - `batched`: the default writer (up to 512 events or 1 ms per batch).
//! - `per-event writer`: the same writer limited to one item per write (`max_batch: 1`), so each
//!   store and each status change is its own provider call.
//! - `inline per-event`: the Go seed's flow, without the writer: the publisher stores each event
//!   before publishing it, and the handler, on the worker, writes the processing and completed
//!   statuses; one provider call each, on the hot threads.
//!
//! Run: `cargo bench --bench provider`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::{
    Broker, Distribution, Event, EventId, EventSink, EventSource, EventStatus, MemoryConfig, MemoryProvider,
    StatusUpdate, WriterConfig,
};

const TYPE: &str = "public.users.create";

/// A copy of `template` with its own id, so the provider stores (and evicts) distinct events.
fn fresh(template: &Event) -> Event {
    Event { id: EventId::new(), ..template.clone() }
}

fn provider() -> Arc<MemoryProvider> {
    Arc::new(MemoryProvider::new(MemoryConfig { max_events: 100_000, ..MemoryConfig::default() }))
}

fn broker(writer: WriterConfig) -> (Broker, Arc<MemoryProvider>, Arc<AtomicU64>) {
    let provider = provider();
    let broker = Broker::builder()
        .workers(1)
        .provider(provider.clone())
        .distribution(Distribution::Local)
        .writer(writer)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe(TYPE, move |_: &Event| {
            h.fetch_add(1, Ordering::Relaxed);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
    (broker, provider, handled)
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("provider_lifecycle");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");

    for (name, writer) in [
        ("batched", WriterConfig::default()),
        (
            "per-event writer",
            WriterConfig { max_batch: 1, max_delay: Duration::ZERO, ..WriterConfig::default() },
        ),
    ] {
        let (broker, _provider, handled) = broker(writer);
        group.bench_function(BenchmarkId::new(name, "memory"), |b| {
            b.iter_custom(|iters| {
                let target = handled.load(Ordering::Relaxed) + iters;
                let started = Instant::now();
                for _ in 0..iters {
                    broker.publish(fresh(&template)).unwrap();
                }
                while handled.load(Ordering::Relaxed) < target {
                    std::thread::yield_now();
                }
                broker.flush(Duration::from_secs(60)).unwrap();
                started.elapsed()
            });
        });
        broker.shutdown(Duration::from_secs(30));
    }

    let inline = provider();
    let broker = Broker::builder().workers(1).track_status(false).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let (h, p) = (Arc::clone(&handled), Arc::clone(&inline));
    broker
        .subscribe(TYPE, move |event: &Event| {
            for status in [EventStatus::Processing, EventStatus::Completed] {
                let now = jiff::Timestamp::now();
                let mut update = StatusUpdate::new(event.id, status).with_processed_at(now);
                if status == EventStatus::Completed {
                    update = update.with_completed_at(now);
                }
                p.update_status_batch(std::slice::from_ref(&update))?;
            }
            h.fetch_add(1, Ordering::Relaxed);
            Ok::<(), eventbroker::ProviderError>(())
        })
        .unwrap();
    group.bench_function(BenchmarkId::new("inline per-event", "memory"), |b| {
        b.iter_custom(|iters| {
            let target = handled.load(Ordering::Relaxed) + iters;
            let started = Instant::now();
            for _ in 0..iters {
                let event = fresh(&template);
                // The seed stores the event as published; the copy is the price of this
                // crate's owned-event API for a baseline that stores outside the broker.
                inline.store_batch(&[Arc::new(event.clone())], None).unwrap();
                broker.publish(event).unwrap();
            }
            while handled.load(Ordering::Relaxed) < target {
                std::thread::yield_now();
            }
            started.elapsed()
        });
    });
    broker.shutdown(Duration::from_secs(30));
    group.finish();
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
