//! Writes to the real Redis on 127.0.0.1:6379, batched against one round trip per event, in the
//! same run; then events per second persisted with the full status lifecycle.
//!
//! `redis_writes` (512 events per iteration):
//! - `store_batch`: the provider's way, one script call (one round trip) for the batch;
//! - `store_one_at_a_time`: the same script, one call per event;
//! - `xadd_pipelined` / `xadd_one_at_a_time`: bare `XADD`s of the same JSON, pipelined or one
//!   round trip each (the Go seed's write): the floor and the baseline, without the provider's
//!   indexes;
//! - `store_batch_full_stream` / `store_one_at_a_time_full_stream`: the provider's two ways again,
//!   on a stream already at its `max_len` (20 000), as a long-running service's is: every store
//!   then also trims as many old events as it adds.
//!
//! `redis_lifecycle` (events per second, stored pending and then completed):
//! - `store+update batches`: `store_batch` then `update_status_batch` of 512;
//! - `broker local` / `broker fan-out`: a broker with the default writer, status tracking on, one
//!   no-op handler; fan-out also reads its own events back from the stream to skip them (echo).
//!
//! Then, with `--bench`, a table of the same writes in interleaved rounds on a stream at its
//! `max_len` (criterion runs its cases one after another, and this host's noise moves between
//! them): batched and one-per-call events/s, and the median of the rounds' ratios.
//!
//! Run: `scripts/ensure-service redis && cargo bench --features redis --bench provider_redis`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group};
use eventbroker::{
    Broker, Distribution, Event, EventId, EventSink, EventSource, EventStatus, Provider, RedisConfig,
    RedisProvider, StatusUpdate,
};

mod common;

const TYPE: &str = "public.users.create";
const BATCH: usize = 512;
/// `max_len` of the stream the `_full_stream` cases write to.
const FULL: usize = 20_000;

fn url() -> String {
    std::env::var("EVENTBROKER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(prefix: &str) -> RedisConfig {
    RedisConfig { key_prefix: prefix.into(), ..RedisConfig::new(url()) }
}

fn events(n: usize) -> Vec<Arc<Event>> {
    (0..n)
        .map(|i| {
            let mut event = Event::for_entity(EventSource::Database, "public", "users", "create")
                .with_instance_id("bench")
                .with_user_id(i64::try_from(i).unwrap_or(0));
            event.set_payload_json(r#"{"id":42,"name":"Zoë","email":"zoe@example.com"}"#).unwrap();
            Arc::new(event)
        })
        .collect()
}

fn raw() -> redis::Connection {
    redis::Client::open(url()).unwrap().get_connection_with_timeout(Duration::from_secs(5)).unwrap()
}

/// Deletes every key under `prefix:`.
fn delete_prefix(prefix: &str) {
    let mut conn = raw();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query(&mut conn)
            .unwrap();
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).exec(&mut conn).unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn prefix(name: &str) -> String {
    format!("ebbench:{name}:{}", EventId::new().as_uuid().simple())
}

/// A bare `XADD` of `event` with the seed's fields, as the Go seed wrote it, capped near `max_len`.
fn seed_xadd(stream: &str, max_len: usize, event: &Event) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("MAXLEN").arg("~").arg(max_len).arg("*");
    cmd.arg("event").arg(event.to_json()).arg("id").arg(event.id.to_string());
    cmd.arg("type").arg(event.event_type.as_str()).arg("source").arg(event.source.as_str());
    cmd.arg("status").arg(event.status.as_str()).arg("instance_id").arg(event.instance_id.as_str());
    cmd
}

/// The provider's two ways of storing: a batch in one script call, and one call per event.
fn stores(group: &mut BenchmarkGroup<'_, WallTime>, provider: &RedisProvider, suffix: &str) {
    group.bench_function(BenchmarkId::new(format!("store_batch{suffix}"), BATCH), |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| provider.store_batch(&batch, None).unwrap(),
            criterion::BatchSize::SmallInput,
        );
    });
    group.bench_function(BenchmarkId::new(format!("store_one_at_a_time{suffix}"), BATCH), |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| batch.iter().for_each(|e| provider.store_batch(std::slice::from_ref(e), None).unwrap()),
            criterion::BatchSize::SmallInput,
        );
    });
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("redis_writes");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));

    let ns = prefix("writes");
    let provider = RedisProvider::connect(config(&ns)).unwrap();
    stores(&mut group, &provider, "");

    let stream = format!("{ns}:raw");
    let mut conn = raw();
    let xadd = |event: &Event| seed_xadd(&stream, 100_000, event);
    group.bench_function(BenchmarkId::new("xadd_pipelined", BATCH), |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| {
                let mut pipe = redis::pipe();
                for event in &batch {
                    pipe.add_command(xadd(event)).ignore();
                }
                pipe.exec(&mut conn).unwrap();
            },
            criterion::BatchSize::SmallInput,
        );
    });
    group.bench_function(BenchmarkId::new("xadd_one_at_a_time", BATCH), |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| batch.iter().for_each(|e| xadd(e).exec(&mut conn).unwrap()),
            criterion::BatchSize::SmallInput,
        );
    });

    let full = prefix("full");
    drop(provider);
    delete_prefix(&ns);
    let provider = RedisProvider::connect(RedisConfig { max_len: FULL, ..config(&full) }).unwrap();
    for chunk in events(FULL + FULL / 100 + 1).chunks(BATCH) {
        provider.store_batch(chunk, None).unwrap();
    }
    stores(&mut group, &provider, "_full_stream");
    group.finish();
    drop(provider);
    delete_prefix(&full);
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("redis_lifecycle");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));

    let ns = prefix("lifecycle");
    let provider = RedisProvider::connect(config(&ns)).unwrap();
    group.bench_function(BenchmarkId::new("store+update batches", "redis"), |b| {
        b.iter_custom(|iters| {
            let batch = events(usize::try_from(iters).unwrap());
            let started = Instant::now();
            for chunk in batch.chunks(BATCH) {
                provider.store_batch(chunk, None).unwrap();
                let now = jiff::Timestamp::now();
                let updates: Vec<StatusUpdate> = chunk
                    .iter()
                    .map(|e| {
                        StatusUpdate::new(e.id, EventStatus::Completed)
                            .with_processed_at(now)
                            .with_completed_at(now)
                    })
                    .collect();
                provider.update_status_batch(&updates).unwrap();
            }
            started.elapsed()
        });
    });
    drop(provider);
    delete_prefix(&ns);

    for (name, distribution) in
        [("broker local", Distribution::Local), ("broker fan-out", Distribution::FanOut)]
    {
        let ns = prefix("broker");
        let provider: Arc<dyn Provider> = Arc::new(RedisProvider::connect(config(&ns)).unwrap());
        let broker = Broker::builder()
            .workers(1)
            .provider(provider)
            .distribution(distribution)
            .track_status(true)
            .instance_id("bench")
            .build()
            .unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&handled);
        broker
            .subscribe_infallible(TYPE, move |_| {
                h.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        group.bench_function(BenchmarkId::new(name, "redis"), |b| {
            b.iter_custom(|iters| {
                let batch = events(usize::try_from(iters).unwrap());
                let target = handled.load(Ordering::Relaxed) + iters;
                let started = Instant::now();
                for event in batch {
                    let mut event = Arc::unwrap_or_clone(event);
                    loop {
                        match broker.publish_async(event) {
                            Ok(()) => break,
                            Err(eventbroker::PublishError::Full(back)) => {
                                event = *back;
                                std::thread::yield_now();
                            }
                            Err(error) => panic!("{error}"),
                        }
                    }
                }
                while handled.load(Ordering::Relaxed) < target {
                    std::thread::yield_now();
                }
                broker.flush(Duration::from_secs(120)).unwrap();
                started.elapsed()
            });
        });
        let _ = broker.shutdown(Duration::from_secs(30));
        delete_prefix(&ns);
    }
    group.finish();
}

/// The writes `ratio_table` times.
#[derive(Clone, Copy)]
enum Write {
    /// `store_batch` of [`BATCH`] events, one script call each.
    StoreBatch,
    /// `store_batch` of one event per call.
    StoreOne,
    /// Bare `XADD`s, [`BATCH`] pipelined per round trip.
    XaddPipelined,
    /// One bare `XADD` per round trip (the Go seed's write).
    XaddOne,
}

/// Microseconds Redis has spent in `EVALSHA` since its statistics were last reset.
fn script_time(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:"))
        .and_then(|stats| stats.split(',').find_map(|field| field.strip_prefix("usec=")))
        .map_or(0, |usec| usec.parse().unwrap())
}

/// Batched against one call per event in interleaved rounds (the order rotating each round),
/// on a stream at its `max_len`, so every case trims as much as it adds: the median events/s of
/// each, and the median of the per-round ratios. The bare `XADD` floor runs in the same rounds.
/// Redis' own time in the store script is read from its command statistics around each run.
fn ratio_table(rounds: usize, batches_per_round: usize) {
    let ns = prefix("ratio");
    let provider = RedisProvider::connect(RedisConfig { max_len: FULL, ..config(&ns) }).unwrap();
    for chunk in events(FULL + FULL / 100 + 1).chunks(BATCH) {
        provider.store_batch(chunk, None).unwrap();
    }
    let stream = format!("{ns}:raw");
    let mut conn = raw();
    let xadd = |event: &Event| seed_xadd(&stream, FULL, event);
    let writes = [Write::StoreBatch, Write::StoreOne, Write::XaddPipelined, Write::XaddOne];
    let mut script_us = [(); 4].map(|()| Vec::with_capacity(rounds));
    let by_round = common::interleaved(rounds, writes.len(), |i| {
        let write = writes[i];
        let all = events(match write {
            Write::StoreBatch | Write::XaddPipelined => batches_per_round * BATCH,
            Write::StoreOne | Write::XaddOne => BATCH,
        });
        let scripts_before = script_time(&mut conn);
        let started = Instant::now();
        match write {
            Write::StoreBatch => {
                for chunk in all.chunks(BATCH) {
                    provider.store_batch(chunk, None).unwrap();
                }
            }
            Write::StoreOne => {
                for event in &all {
                    provider.store_batch(std::slice::from_ref(event), None).unwrap();
                }
            }
            Write::XaddPipelined => {
                for chunk in all.chunks(BATCH) {
                    let mut pipe = redis::pipe();
                    for event in chunk {
                        pipe.add_command(xadd(event)).ignore();
                    }
                    pipe.exec(&mut conn).unwrap();
                }
            }
            Write::XaddOne => {
                for event in &all {
                    xadd(event).exec(&mut conn).unwrap();
                }
            }
        }
        let spent = started.elapsed();
        let scripts = script_time(&mut conn) - scripts_before;
        #[allow(clippy::cast_precision_loss, reason = "rates for a table")]
        let (rate, us) = (all.len() as f64 / spent.as_secs_f64(), scripts as f64 / all.len() as f64);
        script_us[i].push(us);
        rate
    });
    let rates = common::medians(&by_round);
    let ratio = |a: usize, b: usize| common::median_ratio(&by_round, a, b);
    println!(
        "\nRedis writes to a stream at its max_len ({FULL}), interleaved rounds (events/s, median of {rounds})"
    );
    println!("| write | batched | one per round trip | batched ÷ one (median of the rounds' ratios) |");
    println!("|---|---:|---:|---:|");
    for (name, a, b) in [("the provider's store script", 0, 1), ("bare XADD (the seed's write)", 2, 3)] {
        println!("| {name} | {:.0} | {:.0} | {:.1}× |", rates[a], rates[b], ratio(a, b));
    }
    println!("| the provider's batch ÷ one bare XADD | | | {:.1}× |", ratio(0, 3));
    println!(
        "Redis' time in the store script (INFO commandstats): {:.1} µs per event batched, {:.1} µs per call of one",
        common::median(&mut script_us[0]),
        common::median(&mut script_us[1])
    );
    drop(provider);
    delete_prefix(&ns);
}

criterion_group!(benches, writes, lifecycle);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    benches();
    Criterion::default().configure_from_args().final_summary();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` (CI) does not: one short round.
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test") {
        ratio_table(7, 10);
    } else {
        ratio_table(1, 1);
    }
}
