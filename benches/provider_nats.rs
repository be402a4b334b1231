//! Events per second persisted by the NATS provider against the real server (file storage), batched
//! against one event per call, in the same run, with the raw client's publish as the floor.
//!
//! - `store_batch/N`: one `store_batch` of N events: both rounds (event messages, then status
//!   records) pipelined, one wait each.
//! - `store_batch/1`: one event per call, each waiting for its two acknowledgements: the
//!   one-synchronous-publish-per-event baseline.
//! - `lifecycle/1000`: `store_batch` of 1000 events, then their `processing` and `completed` status
//!   updates (one compare-and-set each), as a broker's writer drives them.
//! - `raw publish/…`: the client alone on a plain stream — one message awaited at a time, and 256
//!   acknowledgements in flight: what the server and client allow before the provider adds anything.
//!
//! Needs NATS with JetStream on 127.0.0.1:4222 (`EVENTBROKER_NATS_URL` overrides). Run:
//! `cargo bench --features nats --bench provider_nats`.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::provider::nats::{NatsConfig, NatsProvider};
use eventbroker::{Event, EventId, EventSink, EventSource, EventStatus, StatusUpdate};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

fn url() -> String {
    std::env::var("EVENTBROKER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn events(n: usize) -> Vec<Arc<Event>> {
    (0..n)
        .map(|i| {
            let event = Event::new(EventSource::Database, "public.users.create")
                .with_instance_id("bench")
                .with_user_id(i64::try_from(i).unwrap_or(0));
            Arc::new(event.with_payload(&serde_json::json!({"id": i, "name": "John Doe"})).unwrap())
        })
        .collect()
}

fn provider_writes(c: &mut Criterion) {
    let unique = EventId::new().as_uuid().simple().to_string();
    let config = NatsConfig {
        stream_name: format!("EBBENCH{unique}"),
        subject_prefix: format!("ebbench{unique}"),
        ..NatsConfig::new(url())
    };
    let provider = NatsProvider::connect(config.clone()).expect("NATS with JetStream on the bench URL");
    let mut group = c.benchmark_group("nats_provider");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));

    for batch in [1, 100, 1000] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("store_batch", batch), |b| {
            b.iter_custom(|iters| {
                let batches: Vec<Vec<Arc<Event>>> = (0..iters).map(|_| events(batch)).collect();
                let started = Instant::now();
                for events in &batches {
                    provider.store_batch(events, None).unwrap();
                }
                started.elapsed()
            });
        });
    }

    group.throughput(Throughput::Elements(1000));
    group.bench_function(BenchmarkId::new("lifecycle", 1000), |b| {
        b.iter_custom(|iters| {
            let batches: Vec<Vec<Arc<Event>>> = (0..iters).map(|_| events(1000)).collect();
            let started = Instant::now();
            for events in &batches {
                provider.store_batch(events, None).unwrap();
                for status in [EventStatus::Processing, EventStatus::Completed] {
                    let updates: Vec<StatusUpdate> =
                        events.iter().map(|e| StatusUpdate::new(e.id, status)).collect();
                    provider.update_status_batch(&updates).unwrap();
                }
            }
            started.elapsed()
        });
    });
    group.finish();
    provider.destroy().expect("remove the bench streams");
}

/// The client alone: JetStream publishes of the same event JSON to a plain stream.
fn raw_publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let name = format!("EBRAW{}", EventId::new().as_uuid().simple());
    let subject = format!("{}.public.users.create", name.to_lowercase());
    let js = runtime.block_on(async {
        let client = async_nats::connect(url().trim_start_matches("nats://")).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            ..Default::default()
        })
        .await
        .unwrap();
        js
    });
    let payload: bytes::Bytes = events(1)[0].to_json().into();
    let mut group = c.benchmark_group("nats_raw_publish");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1000));
    group.bench_function("await each/1000", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters * 1000 {
                    js.publish(subject.clone(), payload.clone()).await.unwrap().await.unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.bench_function("256 in flight/1000", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                let mut in_flight: FuturesUnordered<<PublishAckFuture as IntoFuture>::IntoFuture> =
                    FuturesUnordered::new();
                for _ in 0..iters * 1000 {
                    if in_flight.len() >= 256 {
                        in_flight.next().await.unwrap().unwrap();
                    }
                    in_flight.push(js.publish(subject.clone(), payload.clone()).await.unwrap().into_future());
                }
                while let Some(ack) = in_flight.next().await {
                    ack.unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    runtime.block_on(async { js.delete_stream(&name).await.unwrap() });
}

criterion_group!(benches, provider_writes, raw_publish);
criterion_main!(benches);
