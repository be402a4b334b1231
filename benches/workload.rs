//! The realistic workload: a CRUD service's events through the broker with its default settings,
//! beside the same broker with status tracking off, beside a crossbeam channel per shard doing the
//! same matching — in the same run.
//!
//! Workload: 8 000 event types (`schema.entity.op`: 10 schemas × 200 entities × 4 operations) and
//! 1 000 subscriptions of every form — 2 × `*`, 2 × `schema.>` per schema, `schema.*.*` per schema,
//! 200 `*.entity.op`, 748 exact types — so an event meets about 5.3 handlers. Each event is built at
//! publish as a CRUD hook builds it: `Event::for_entity` with a user id, a session id and a
//! ~100-byte JSON row. Handlers count their deliveries. Contenders:
//! - `default`: `Broker::builder().workers(S).build()`: status tracking on, the memory provider.
//! - `untracked`: the same with `track_status(false)`.
//! - `crossbeam`: S `crossbeam_channel::bounded(1024)` channels of `Arc<Event>`, routed by type
//!   hash, each drained by a thread that matches through a `PatternSet` and a `MatchCache` and runs
//!   the same handlers.
//!
//! P publishers, S shards. The machine is shared and noisy, so the three contenders of a case run
//! in interleaved rounds (the order rotating each round), each round publishing the same events
//! through each; the table gives each contender's median events/s and the median of the per-round
//! ratios. The latency tables (hdrhistogram) pace one publisher at 100 000 events/s for 2 s and
//! measure publish → the first matching handler, default and untracked alternating, three runs
//! each, the median of each percentile: with one worker (on two cores, a core for the publisher
//! and one for the worker) and with two. Then RSS after a million events.
//!
//! Every throughput row, latency table and profile run also gives the core-to-core hop before and
//! after it ([`common::core_hop`]): a run whose hop is several times the usual had its threads on
//! cores far apart, and compares only with runs that did too. A throughput row's medians are over
//! its near rounds (each run of the round followed by a near hop; "near rounds" says how many),
//! or over all of them when none was.
//!
//! Run: `cargo bench --bench workload` (`cargo test --benches` runs one short round of each case).
//! To profile one contender alone: `cargo bench --bench workload -- profile default 1 1` (the
//! contender, publishers, shards) under `perf record`. On a machine with more cores,
//! `cargo bench --bench workload -- scaling 8` gives the throughput table for publishers × shards
//! of 1, 2, 4 and 8 (up to the number given); `-- latency 1` gives the latency table alone, with
//! the number of workers given.

use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{
    Backpressure, Broker, Distribution, Event, EventSource, MatchCache, MemoryConfig, MemoryProvider,
    Pattern, PatternSet,
};
use hdrhistogram::Histogram;

mod common;

const SCHEMAS: usize = 10;
const ENTITIES: usize = 200;
const OPERATIONS: [&str; 4] = ["create", "update", "delete", "read"];
const CAPACITY: usize = 1024;

/// The event types and the subscription patterns of the workload.
struct Workload {
    types: Vec<(String, String, &'static str)>,
    patterns: Vec<String>,
    /// How many patterns each type matches, by type index.
    fan_out: Vec<u64>,
}

impl Workload {
    fn new() -> Self {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut types = Vec::new();
        for s in 0..SCHEMAS {
            for e in 0..ENTITIES {
                for op in OPERATIONS {
                    types.push((format!("schema{s}"), format!("entity{e}"), op));
                }
            }
        }
        let mut patterns = vec!["*".to_owned(), "*".to_owned()];
        for s in 0..SCHEMAS {
            patterns.push(format!("schema{s}.>"));
            patterns.push(format!("schema{s}.>"));
            patterns.push(format!("schema{s}.*.*"));
        }
        for _ in 0..200 {
            patterns.push(format!("*.entity{}.{}", rng.usize(..ENTITIES), OPERATIONS[rng.usize(..4)]));
        }
        while patterns.len() < 1000 {
            let (s, e, op) = &types[rng.usize(..types.len())];
            patterns.push(format!("{s}.{e}.{op}"));
        }
        let set: PatternSet<()> = patterns.iter().map(|p| (Pattern::parse(p).unwrap(), ())).collect();
        let fan_out =
            types.iter().map(|(s, e, op)| set.matches(&format!("{s}.{e}.{op}")).len() as u64).collect();
        Self { types, patterns, fan_out }
    }

    /// The order types are published in: uniform over every type, fixed by a seed.
    fn schedule(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.usize(..self.types.len())).collect()
    }

    /// The event of type `index`, built as a CRUD hook builds it.
    fn event(&self, index: usize, n: u64) -> Event {
        let (schema, entity, op) = &self.types[index];
        let mut event = Event::for_entity(EventSource::Database, schema, entity, op)
            .with_user_id(1000 + i64::try_from(n % 97).unwrap())
            .with_session_id("sess-4f2a9c1e");
        event
            .set_payload_json(format!(
                r#"{{"id":{n},"name":"customer {n}","email":"c{n}@example.com","plan":"pro","active":true}}"#
            ))
            .unwrap();
        event
    }

    fn deliveries(&self, schedule: &[usize]) -> u64 {
        schedule.iter().map(|&i| self.fan_out[i]).sum()
    }
}

type Handler = Arc<dyn Fn(&Event) + Send + Sync>;

fn handler(count: &Arc<AtomicU64>) -> Handler {
    let count = Arc::clone(count);
    Arc::new(move |e: &Event| {
        black_box(e.entity.len());
        count.fetch_add(1, Ordering::Relaxed);
    })
}

trait Contender: Sync {
    fn publish(&self, event: Event);
    fn delivered(&self) -> u64;
}

struct BrokerContender {
    broker: Broker,
    delivered: Arc<AtomicU64>,
}

impl BrokerContender {
    fn new(workload: &Workload, shards: usize, tracked: bool) -> Self {
        Self::with_provider(workload, shards, tracked, None)
    }

    /// With `own`, a memory provider of its bound given to the builder, with its distribution;
    /// else the builder's default provider.
    fn with_provider(workload: &Workload, shards: usize, tracked: bool, own: Option<&OwnProvider>) -> Self {
        let mut builder = Broker::builder()
            .workers(shards)
            .buffer_size(CAPACITY)
            .track_status(tracked)
            .backpressure(Backpressure::Block(Duration::from_secs(60)));
        if let Some(own) = own {
            let config = MemoryConfig { max_events: own.max_events, ..MemoryConfig::default() };
            builder = builder
                .provider(Arc::new(MemoryProvider::new(config)))
                .distribution(own.distribution.clone());
        }
        let broker = builder.build().unwrap();
        let delivered = Arc::new(AtomicU64::new(0));
        for pattern in &workload.patterns {
            let h = handler(&delivered);
            broker.subscribe_infallible(pattern, move |e| h(e)).unwrap();
        }
        Self { broker, delivered }
    }
}

impl Contender for BrokerContender {
    fn publish(&self, event: Event) {
        self.broker.publish_async(event).unwrap();
    }

    fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

struct CrossbeamContender {
    senders: Vec<crossbeam_channel::Sender<Arc<Event>>>,
    hasher: foldhash::fast::FixedState,
    delivered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CrossbeamContender {
    fn new(workload: &Workload, shards: usize) -> Self {
        let delivered = Arc::new(AtomicU64::new(0));
        let set: Arc<PatternSet<Handler>> = Arc::new(
            workload.patterns.iter().map(|p| (Pattern::parse(p).unwrap(), handler(&delivered))).collect(),
        );
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..shards {
            let (tx, rx) = crossbeam_channel::bounded::<Arc<Event>>(CAPACITY);
            let set = Arc::clone(&set);
            threads.push(std::thread::spawn(move || {
                let mut cache = MatchCache::new(4096);
                for event in rx {
                    for h in cache.get_or_match(&set, &event.event_type) {
                        h(&event);
                    }
                }
            }));
            senders.push(tx);
        }
        Self { senders, hasher: foldhash::fast::FixedState::with_seed(7), delivered, threads }
    }
}

impl Contender for CrossbeamContender {
    fn publish(&self, event: Event) {
        let shard =
            usize::try_from(self.hasher.hash_one(&event.event_type) % self.senders.len() as u64).unwrap();
        self.senders[shard].send(Arc::new(event)).unwrap();
    }

    fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

impl Drop for CrossbeamContender {
    fn drop(&mut self) {
        self.senders.clear();
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
    }
}

/// A memory provider a broker contender is given rather than the builder's default.
struct OwnProvider {
    max_events: usize,
    distribution: Distribution,
}

/// The contenders, in the order of the throughput table's columns.
const CONTENDERS: [&str; 3] = ["default", "untracked", "crossbeam"];

/// The contender called `name` (one of [`CONTENDERS`]) with `shards` shards; a broker's memory
/// provider is `own` when given (see [`BrokerContender::with_provider`]).
fn contender(
    name: &str,
    workload: &Workload,
    shards: usize,
    own: Option<&OwnProvider>,
) -> Box<dyn Contender> {
    match name {
        "default" => Box::new(BrokerContender::with_provider(workload, shards, true, own)),
        "untracked" => Box::new(BrokerContender::with_provider(workload, shards, false, own)),
        "crossbeam" => Box::new(CrossbeamContender::new(workload, shards)),
        other => unreachable!("no contender {other:?}"),
    }
}

/// Publishes `iters` events from `publishers` threads and waits until every delivery is made.
fn run(
    contender: &dyn Contender,
    workload: &Workload,
    schedule: &[usize],
    publishers: usize,
    iters: u64,
) -> Duration {
    let per = usize::try_from(iters).unwrap().div_ceil(publishers);
    let total: Vec<usize> = (0..publishers * per).map(|i| schedule[i % schedule.len()]).collect();
    let target = contender.delivered() + workload.deliveries(&total);
    let started = Instant::now();
    std::thread::scope(|s| {
        for chunk in total.chunks(per) {
            s.spawn(move || {
                for (n, &t) in chunk.iter().enumerate() {
                    contender.publish(workload.event(t, n as u64));
                }
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while contender.delivered() < target {
        assert!(Instant::now() < deadline, "deliveries did not complete");
        std::thread::yield_now();
    }
    started.elapsed()
}

/// Rounds per case, and events each contender publishes per round.
const ROUNDS: usize = 7;
const EVENTS_PER_ROUND: u64 = 200_000;

/// Publishers × shards: each contender's median events/s over interleaved rounds, and the median
/// of the per-round ratios.
fn throughput_table(workload: &Workload, rounds: usize, events: u64, counts: &[usize]) {
    let schedule = workload.schedule(1 << 16, 1);
    println!("\nthroughput, million events/s (median of {rounds} interleaved rounds of {events} events)");
    println!(
        "| case | default | untracked | crossbeam | default ÷ untracked | default ÷ crossbeam | hop, ns | near rounds |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for &shards in counts {
        for &publishers in counts {
            let hop_before = common::core_hop();
            let contenders = CONTENDERS.map(|name| contender(name, workload, shards, None));
            // A warm-up: caches filled, the provider at its bound.
            for contender in &contenders {
                run(&**contender, workload, &schedule, publishers, events.min(20_000));
            }
            let (by_round, near) = common::interleaved_near(rounds, contenders.len(), |i| {
                let took = run(&*contenders[i], workload, &schedule, publishers, events);
                #[allow(clippy::cast_precision_loss, reason = "a rate for a table")]
                let rate = events as f64 / took.as_secs_f64() / 1e6;
                rate
            });
            let rates = common::medians(&by_round);
            println!(
                "| p{publishers} s{shards} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {}/{} | {near}/{rounds} |",
                rates[0],
                rates[1],
                rates[2],
                common::median_ratio(&by_round, 0, 1),
                common::median_ratio(&by_round, 0, 2),
                hop_before.as_nanos(),
                common::core_hop().as_nanos(),
            );
        }
    }
}

/// Paces one publisher at `rate` events/s for `duration`, and records publish → first handler.
fn paced_latency(
    workload: &Workload,
    workers: usize,
    tracked: bool,
    rate: u32,
    duration: Duration,
) -> Histogram<u64> {
    let n = usize::try_from(u128::from(rate) * duration.as_millis() / 1000).unwrap();
    let broker = Broker::builder()
        .workers(workers)
        .track_status(tracked)
        .backpressure(Backpressure::Block(Duration::from_secs(60)))
        .build()
        .unwrap();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let histogram =
        Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap()));
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    {
        let (sent, histogram, delivered) =
            (Arc::clone(&sent), Arc::clone(&histogram), Arc::clone(&delivered));
        broker
            .subscribe_infallible("*", move |e| {
                let seq = usize::try_from(e.metadata["seq"].as_u64().unwrap()).unwrap();
                let at = sent[seq].load(Ordering::Acquire);
                let now = nanos_since(epoch);
                histogram.lock().record(now.saturating_sub(at).max(1)).unwrap();
                delivered.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
    }
    for pattern in &workload.patterns {
        let h = handler(&Arc::new(AtomicU64::new(0)));
        broker.subscribe_infallible(pattern, move |e| h(e)).unwrap();
    }
    let schedule = workload.schedule(n, 2);
    let gap = Duration::from_nanos(1_000_000_000 / u64::from(rate));
    let start = Instant::now();
    for (seq, &t) in schedule.iter().enumerate() {
        let due = start + gap * u32::try_from(seq).unwrap();
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let event = workload.event(t, seq as u64).with_metadata("seq", seq as u64);
        sent[seq].store(nanos_since(epoch), Ordering::Release);
        broker.publish_async(event).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = broker.shutdown(Duration::from_secs(30));
    histogram.lock().clone()
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The paced latency of default and untracked settings, alternating, with `workers` workers.
/// With one worker the paced publisher (which spins between events) and the worker have a core
/// each on the project's 2-core machine kind; with two, three busy threads share two cores and
/// the scheduler's time slices make the tail.
fn latency_table(workload: &Workload, workers: usize, runs: usize, duration: Duration) {
    const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];
    println!(
        "\npublish -> first handler at 100 000 events/s offered, {workers} worker{} (µs; median of {runs} runs of {duration:?}, alternating)",
        if workers == 1 { "" } else { "s" }
    );
    println!("| settings | p50 | p90 | p99 | p99.9 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    let hop_before = common::core_hop();
    let mut by_settings: [Vec<Vec<f64>>; 2] = [vec![Vec::new(); 5], vec![Vec::new(); 5]];
    for _ in 0..runs {
        for (settings, tracked) in [true, false].into_iter().enumerate() {
            let h = paced_latency(workload, workers, tracked, 100_000, duration);
            for (q, quantile) in QUANTILES.iter().enumerate() {
                #[allow(clippy::cast_precision_loss, reason = "microseconds for a table")]
                by_settings[settings][q].push(h.value_at_quantile(*quantile) as f64 / 1000.0);
            }
        }
    }
    for (name, mut quantiles) in ["default", "untracked"].into_iter().zip(by_settings) {
        let [p50, p90, p99, p999, max] = [0, 1, 2, 3, 4].map(|q| common::median(&mut quantiles[q]));
        println!("| {name} | {p50:.1} | {p90:.1} | {p99:.1} | {p999:.1} | {max:.1} |");
    }
    println!(
        "core-to-core hop before and after: {}/{} ns",
        hop_before.as_nanos(),
        common::core_hop().as_nanos()
    );
}

/// This process's resident set, in MiB (Linux).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// RSS of the default settings after a warm-up that fills the memory provider to its bound, and
/// after a million events more: what grows beyond what the provider holds.
fn rss_table(workload: &Workload) {
    let contender = BrokerContender::new(workload, 2, true);
    let schedule = workload.schedule(1 << 16, 3);
    run(&contender, workload, &schedule, 1, 50_000);
    contender.broker.drain(Duration::from_secs(60)).unwrap();
    let warm = rss_mib();
    run(&contender, workload, &schedule, 1, 1_000_000);
    contender.broker.drain(Duration::from_secs(60)).unwrap();
    let after = rss_mib();
    let held = contender.broker.provider().stats().unwrap().total_events;
    println!(
        "\nRSS, default settings, 2 workers: {warm:.1} MiB after 50 000 events (the provider holds {held}), {after:.1} MiB after 1 000 000 more: +{:.1} MiB",
        after - warm
    );
    assert!(contender.broker.shutdown(Duration::from_secs(30)).is_clean());
}

/// The cores this process may run on.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// `profile CONTENDER PUBLISHERS SHARDS [MAX_EVENTS [local|fan-out]]` (`default`, `untracked` or
/// `crossbeam`; 1 1 when left out; with a bound, a broker is given a memory provider of its own of
/// that bound, local unless `fan-out` follows): that contender alone, 20 rounds of
/// [`EVENTS_PER_ROUND`] events, each round's rate printed with the core-to-core hop just after it (a
/// round whose hop is far does not compare with near ones): a steady load for `perf record` on the
/// bench binary.
fn profile(workload: &Workload, args: &[String]) {
    let name = args.first().map_or("default", String::as_str);
    let number = |i: usize| args.get(i).map_or(1, |n| n.parse().expect("publishers and shards are numbers"));
    let (publishers, shards) = (number(1), number(2));
    let own = args.get(3).map(|n| OwnProvider {
        max_events: n.parse().expect("the bound is a number of events"),
        distribution: match args.get(4).map(String::as_str) {
            None | Some("local") => Distribution::Local,
            Some("fan-out") => Distribution::FanOut,
            Some(other) => panic!("no distribution {other:?}: local or fan-out"),
        },
    });
    assert!(CONTENDERS.contains(&name), "no contender {name:?}: one of {CONTENDERS:?}");
    let contender = contender(name, workload, shards, own.as_ref());
    let schedule = workload.schedule(1 << 16, 1);
    run(&*contender, workload, &schedule, publishers, 20_000);
    println!(
        "profile: {name}, p{publishers} s{shards}, per round: million events/s, then the hop after it in ns"
    );
    common::profile_rounds(20, EVENTS_PER_ROUND, || {
        run(&*contender, workload, &schedule, publishers, EVENTS_PER_ROUND)
    });
}

fn main() {
    let workload = Workload::new();
    #[allow(clippy::cast_precision_loss, reason = "an average for a log line")]
    let mean = workload.fan_out.iter().sum::<u64>() as f64 / workload.fan_out.len() as f64;
    println!(
        "workload: {} types, {} subscriptions, {mean:.2} handlers per event",
        workload.types.len(),
        workload.patterns.len()
    );
    // `cargo bench` passes `--bench`; `cargo test --benches` (CI) does not: it gets one short round.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "profile") {
        let rest: Vec<String> = args[at + 1..].iter().filter(|a| !a.starts_with("--")).cloned().collect();
        profile(&workload, &rest);
    } else if let Some(at) = args.iter().position(|a| a == "latency") {
        let workers = args.get(at + 1).map_or(1, |n| n.parse().expect("the number of workers is a number"));
        latency_table(&workload, workers, 3, Duration::from_secs(2));
    } else if let Some(at) = args.iter().position(|a| a == "scaling") {
        let most =
            args.get(at + 1).map_or(8, |n| n.parse().expect("the most publishers and shards is a number"));
        let counts: Vec<usize> = [1, 2, 4, 8, 16].into_iter().filter(|&n| n <= most).collect();
        println!("scaling: publishers × shards, each of {counts:?}, on {} cores", available_cores());
        throughput_table(&workload, ROUNDS, EVENTS_PER_ROUND, &counts);
    } else if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test") {
        throughput_table(&workload, ROUNDS, EVENTS_PER_ROUND, &[1, 2]);
        for workers in [1, 2] {
            latency_table(&workload, workers, 3, Duration::from_secs(2));
        }
        rss_table(&workload);
    } else {
        throughput_table(&workload, 1, 2_000, &[1, 2]);
        for workers in [1, 2] {
            latency_table(&workload, workers, 1, Duration::from_millis(20));
        }
    }
}
