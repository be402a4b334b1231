//! Building events: the seed-shaped event a CRUD hook publishes (`Event::for_entity` with a user id,
//! a session id and a ~100-byte JSON row), alone and from several threads at once, beside a bare
//! `Event::new` and a clone of a finished event.
//!
//! - `build/crud`: one event, as above (what every publish pays).
//! - `build/new`: `Event::new(source, type)` only: the id, the clock and the struct.
//! - `build/clone`: cloning a finished CRUD event (the copy the seed's API made per handler).
//! - `threads/T`: T threads each building events: elements are events built by all of them, so
//!   throughput that grows with T means construction scales (no shared lock, no system call).
//!
//! - `parts/*`: the pieces of `build/crud` (the row's `format!`, the payload's check, the clock,
//!   the id), `set_payload` of the same row as a value, and `to_json` of the event (what a network
//!   provider pays per event).
//!
//! Run: `cargo bench --bench event`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventbroker::{Event, EventSource};

fn crud_event(n: u64) -> Event {
    let mut event = Event::for_entity(EventSource::Database, "public", "customers", "update")
        .with_user_id(1042)
        .with_session_id("sess-4f2a9c1e");
    event
        .set_payload_json(format!(r#"{{"id":{n},"name":"customer","email":"c@example.com","plan":"pro"}}"#))
        .unwrap();
    event
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let mut n = 0;
    group.bench_function("crud", |b| {
        b.iter(|| {
            n += 1;
            black_box(crud_event(n))
        });
    });
    group.bench_function("new", |b| b.iter(|| black_box(Event::new(EventSource::System, "system.tick"))));
    let template = crud_event(7);
    group.bench_function("clone", |b| b.iter(|| black_box(template.clone())));
    group.finish();

    let mut group = c.benchmark_group("threads");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    for threads in [1, 2, 4, 8].into_iter().filter(|&t| t <= cores.max(2)) {
        group.bench_function(BenchmarkId::from_parameter(threads), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let started = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(move || {
                            for n in 0..per {
                                black_box(crud_event(n));
                            }
                        });
                    }
                });
                started.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches, more);

/// The row of `crud_event`, as a value for `set_payload`.
#[derive(serde::Serialize)]
struct Row<'a> {
    id: u64,
    name: &'a str,
    email: &'a str,
    plan: &'a str,
}

fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parts");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let text = r#"{"id":42,"name":"customer","email":"c@example.com","plan":"pro"}"#;
    group.bench_function("format", |b| {
        b.iter(|| {
            black_box(format!(
                r#"{{"id":{},"name":"customer","email":"c@example.com","plan":"pro"}}"#,
                black_box(42)
            ))
        });
    });
    group.bench_function("raw_from_string", |b| {
        b.iter(|| black_box(serde_json::value::RawValue::from_string(black_box(text).to_owned()).unwrap()));
    });
    group.bench_function("set_payload_json", |b| {
        let mut e = Event::new(EventSource::System, "a.b");
        b.iter(|| e.set_payload_json(black_box(text).to_owned()).unwrap());
    });
    group.bench_function("set_payload", |b| {
        let mut e = Event::new(EventSource::System, "a.b");
        let row = Row { id: 42, name: "customer", email: "c@example.com", plan: "pro" };
        b.iter(|| e.set_payload(black_box(&row)).unwrap());
    });
    let crud = crud_event(42);
    group.bench_function("to_json", |b| b.iter(|| black_box(black_box(&crud).to_json())));
    group.bench_function("for_entity", |b| {
        b.iter(|| black_box(Event::for_entity(EventSource::Database, "public", "customers", "update")));
    });
    group.bench_function("timestamp_now", |b| b.iter(|| black_box(jiff::Timestamp::now())));
    group.bench_function("id", |b| b.iter(|| black_box(eventbroker::EventId::new())));
    group.finish();
}
criterion_group!(more, parts);
