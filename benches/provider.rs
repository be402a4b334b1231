//! The memory provider and the status lifecycle, in the same run:
//!
//! - `memory_provider`: the provider alone, as the broker drives it for each event: store it (one
//!   call per event, as publishers do), then its `processing` and `completed` updates in batches of
//!   256 (a worker's batch). Elements are events: the cost per event of store plus statuses, at the
//!   default bound (10 000 events, evicting from then on) and at 100 000.
//! - `provider_lifecycle`: events per second through the broker with the full lifecycle (stored,
//!   processing, completed), one shard:
//!   - `inline`: the default: publishers store and workers write statuses on their own threads;
//!   - `writer`: the same memory provider written through the writer thread (as a network provider
//!     is), batched up to 512 items or 1 ms;
//!   - `per-event writer`: the writer limited to one item per write;
//!   - `seed flow`: the Go seed's flow, without the broker's help: the publisher stores each event
//!     before publishing it, and the handler writes its two statuses, one call each.
//!
//! Run: `cargo bench --bench provider`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::prelude::*;
use eventbroker::{
    Broker, Capabilities, DeadLetter, DeadLetterFilter, DeadLetterId, Distribution, Event, EventFilter,
    EventId, EventSource, EventStatus, MemoryConfig, MemoryProvider, Pattern, ProviderError, ProviderStats,
    ReplayFrom, StatusUpdate, StoredEvent, WriterConfig,
};

const TYPE: &str = "public.users.create";

/// A copy of `template` with its own id, so the provider stores (and evicts) distinct events.
fn fresh(template: &Event) -> Event {
    Event { id: EventId::new(), ..template.clone() }
}

fn memory() -> Arc<MemoryProvider> {
    Arc::new(MemoryProvider::new(MemoryConfig { max_events: 100_000, ..MemoryConfig::default() }))
}

/// The memory provider as a network provider looks to the broker: written through the writer.
struct ThroughTheWriter(Arc<MemoryProvider>);

impl EventSink for ThroughTheWriter {
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError> {
        self.0.store_batch(events, origin)
    }
    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError> {
        self.0.update_status_batch(updates)
    }
    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError> {
        self.0.store_dead_letters(letters)
    }
    fn flush(&self) -> Result<(), ProviderError> {
        self.0.flush()
    }
}

impl EventStore for ThroughTheWriter {
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError> {
        self.0.get(id)
    }
    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.0.list(filter)
    }
    fn delete(&self, id: EventId) -> Result<bool, ProviderError> {
        self.0.delete(id)
    }
    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ProviderError> {
        self.0.replay(from, pattern, limit)
    }
    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError> {
        self.0.list_dead_letters(filter)
    }
    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError> {
        self.0.get_dead_letter(id)
    }
    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError> {
        self.0.delete_dead_letter(id)
    }
    fn stats(&self) -> Result<ProviderStats, ProviderError> {
        self.0.stats()
    }
}

impl Provider for ThroughTheWriter {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { inline_writes: false, ..self.0.capabilities() }
    }
    fn close(&self) -> Result<(), ProviderError> {
        self.0.close()
    }
}

fn broker(provider: Arc<dyn Provider>, writer: WriterConfig) -> (Broker, Arc<AtomicU64>) {
    let broker = Broker::builder()
        .workers(1)
        .provider(provider)
        .distribution(Distribution::Local)
        .writer(writer)
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe_infallible(TYPE, move |_: &Event| {
            h.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    (broker, handled)
}

fn memory_provider(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_provider");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");
    for max_events in [10_000, 100_000] {
        let provider = Arc::new(MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() }));
        let name =
            if max_events == MemoryConfig::default().max_events { "default bound" } else { "100k bound" };
        group.bench_function(BenchmarkId::new("store_and_two_statuses", name), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    // Built just before they are stored, as a publisher's are: the provider's cost
                    // is measured on events in cache, not on events built long before.
                    let n = left.min(256);
                    left -= n;
                    let chunk: Vec<Arc<Event>> = (0..n).map(|_| Arc::new(fresh(&template))).collect();
                    let started = Instant::now();
                    for event in &chunk {
                        provider.store_batch(std::slice::from_ref(event), None).unwrap();
                    }
                    let now = jiff::Timestamp::now();
                    let processing: Vec<StatusUpdate> = chunk
                        .iter()
                        .map(|e| StatusUpdate::new(e.id, EventStatus::Processing).with_processed_at(now))
                        .collect();
                    provider.update_status_batch(&processing).unwrap();
                    let completed: Vec<StatusUpdate> = chunk
                        .iter()
                        .map(|e| StatusUpdate::new(e.id, EventStatus::Completed).with_completed_at(now))
                        .collect();
                    provider.update_status_batch(&completed).unwrap();
                    spent += started.elapsed();
                }
                spent
            });
        });
    }
    group.finish();
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("provider_lifecycle");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");

    let contenders: [(&str, Arc<dyn Provider>, WriterConfig); 3] = [
        ("inline", memory(), WriterConfig::default()),
        ("writer", Arc::new(ThroughTheWriter(memory())), WriterConfig::default()),
        (
            "per-event writer",
            Arc::new(ThroughTheWriter(memory())),
            WriterConfig { max_batch: 1, max_delay: Duration::ZERO, ..WriterConfig::default() },
        ),
    ];
    for (name, provider, writer) in contenders {
        let (broker, handled) = broker(provider, writer);
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
        assert!(broker.shutdown(Duration::from_secs(30)).is_clean());
    }

    let seed = memory();
    let broker = Broker::builder().workers(1).track_status(false).build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let (h, p) = (Arc::clone(&handled), Arc::clone(&seed));
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
            Ok::<(), ProviderError>(())
        })
        .unwrap();
    group.bench_function(BenchmarkId::new("seed flow", "memory"), |b| {
        b.iter_custom(|iters| {
            let target = handled.load(Ordering::Relaxed) + iters;
            let started = Instant::now();
            for _ in 0..iters {
                let event = fresh(&template);
                // The seed stores the event as published; the copy is the price of this
                // crate's owned-event API for a baseline that stores outside the broker.
                seed.store_batch(&[Arc::new(event.clone())], None).unwrap();
                broker.publish(event).unwrap();
            }
            while handled.load(Ordering::Relaxed) < target {
                std::thread::yield_now();
            }
            started.elapsed()
        });
    });
    assert!(broker.shutdown(Duration::from_secs(30)).is_clean());
    group.finish();
}

criterion_group!(benches, memory_provider, lifecycle);
criterion_main!(benches);
