//! Events per second from one broker's publish to another broker's handler over the in-process bus
//! (one shared `MemoryProvider`), beside the same publish handled locally, in the same run.
//!
//! - `local`: publish on A, handled by A's own subscriber (fan-out on, nobody else listening).
//! - `bus`: publish on A, handled by B's subscriber: A's writer stores the event, B's inbound
//!   thread fetches it, B's worker handles it and B's writer acknowledges it.
//! - `work_queue`: as `bus`, with B the one member of a work queue, and so its default prefetch
//!   of 32 events a worker: B's inbound thread, holding its prefetch, waits for B's worker to end
//!   some.
//!
//! Both brokers run with default settings (status tracking on, one worker each).
//!
//! Run: `cargo bench --bench cross_instance`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::{Broker, Distribution, Event, EventSource, MemoryConfig, MemoryProvider};

const TYPE: &str = "orders.created";

fn broker(bus: &Arc<MemoryProvider>, id: &str, distribution: Distribution) -> Broker {
    Broker::builder()
        .provider(bus.clone())
        .instance_id(id)
        .distribution(distribution)
        .workers(1)
        .build()
        .unwrap()
}

fn count(broker: &Broker) -> Arc<AtomicU64> {
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    broker
        .subscribe_infallible(TYPE, move |_: &Event| {
            h.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    handled
}

fn across(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_instance");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let template = Event::new(EventSource::Internal, TYPE);

    for route in ["local", "bus", "work_queue"] {
        // Room for every event a run publishes: the bus evicts its oldest events past its bound,
        // fetched or not, and a sample of a fast route publishes hundreds of thousands.
        let bus =
            Arc::new(MemoryProvider::new(MemoryConfig { max_events: 2_000_000, ..MemoryConfig::default() }));
        let a = broker(&bus, "bench-a", Distribution::FanOut);
        let b = match route {
            "work_queue" => broker(&bus, "bench-b", Distribution::WorkQueue("bench".into())),
            _ => broker(&bus, "bench-b", Distribution::FanOut),
        };
        let handled = if route == "local" { count(&a) } else { count(&b) };
        group.bench_function(BenchmarkId::new(route, "memory"), |bench| {
            bench.iter_custom(|iters| {
                let target = handled.load(Ordering::Relaxed) + iters;
                let started = Instant::now();
                for _ in 0..iters {
                    let mut event = template.clone();
                    event.id = eventbroker::EventId::new();
                    a.publish_async(event).unwrap();
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                while handled.load(Ordering::Relaxed) < target {
                    assert!(Instant::now() < deadline, "events did not arrive");
                    std::thread::yield_now();
                }
                started.elapsed()
            });
        });
        let _ = a.shutdown(Duration::from_secs(30));
        let _ = b.shutdown(Duration::from_secs(30));
    }
    group.finish();
}

criterion_group!(benches, across);
criterion_main!(benches);
