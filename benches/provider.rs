//! The memory provider and the status lifecycle, in the same run:
//!
//! - `memory_provider`: the provider alone, as the broker drives it for each event: store it (one
//!   call per event, as publishers do), then its `processing` and `completed` updates in batches of
//!   256 (a worker's batch). Elements are events: the cost per event of store plus statuses, at the
//!   default bound (10 000 events, evicting from then on) and at 100 000; at the default bound
//!   with statuses written 8 at a time (a worker that keeps up takes a few events a turn and
//!   writes their statuses a few at a time, so a cost per call shows here; the bench writes each
//!   turn's two statuses in calls of their own, where the worker writes one turn's completions
//!   with the next turn's `processing`); and on either side of the bound from which the provider
//!   shards (4 095 events in one shard, 4 096 in 16), which shows what spreading events over
//!   shards costs a single thread. Those write their statuses by id, as any caller of
//!   `update_status_batch` does; `default bound, ticketed` writes them as the broker's workers
//!   do, each with the ticket its event's store handed back, into the event's mark.
//! - then a table: each event built just before its store, as a publisher builds it, with the
//!   statuses written with tickets and by id, against the same work without the provider: the
//!   provider's cost on the broker's path.
//! - then a table: the criterion lines' lifecycle on one thread and on two threads at once, each
//!   with events of its own (ns per event on each thread), at the default bound and at 100 000,
//!   the provider filled first: how the provider scales with the publishers and workers writing
//!   into it.
//! - then a table: events per second through the broker with the full lifecycle (stored,
//!   processing, completed), one shard, the contenders in interleaved rounds (the machine is
//!   shared and noisy), medians:
//!   - `inline`: the default: publishers store and workers write statuses on their own threads;
//!   - `writer`: the same memory provider written through the writer thread (as a network provider
//!     is), batched up to 512 items or 1 ms;
//!   - `per-event writer`: the writer limited to one item per write;
//!   - `seed flow`: the Go seed's flow, without the broker's help: the publisher stores each event
//!     before publishing it, and the handler writes its two statuses, one call each.
//!
//! Run: `cargo bench --bench provider`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use eventbroker::__private::memory;
use eventbroker::prelude::*;
use eventbroker::{
    Broker, Capabilities, DeadLetter, DeadLetterFilter, DeadLetterId, Distribution, Event, EventFilter,
    EventId, EventSource, EventStatus, MemoryConfig, MemoryProvider, Pattern, ProviderError, ProviderStats,
    ReplayFrom, ReplayPage, StatusUpdate, WriterConfig,
};

mod common;

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
    ) -> Result<ReplayPage, ProviderError> {
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

/// Stores each of `chunk` with a call of its own, as publishers do, then writes their `processing`
/// and their `completed` statuses, a batch each of up to `statuses_at_once`, as a worker does (a
/// full batch of 256 when it is behind, a few at a time when it keeps up).
fn lifecycle_by_id(provider: &MemoryProvider, chunk: &[Arc<Event>], statuses_at_once: usize) {
    for event in chunk {
        provider.store_batch(std::slice::from_ref(event), None).unwrap();
    }
    let now = jiff::Timestamp::now();
    for turn in chunk.chunks(statuses_at_once) {
        let processing: Vec<StatusUpdate> = turn
            .iter()
            .map(|e| StatusUpdate::new(e.id, EventStatus::Processing).with_processed_at(now))
            .collect();
        provider.update_status_batch(&processing).unwrap();
        let completed: Vec<StatusUpdate> = turn
            .iter()
            .map(|e| StatusUpdate::new(e.id, EventStatus::Completed).with_completed_at(now))
            .collect();
        provider.update_status_batch(&completed).unwrap();
    }
}

/// [`lifecycle_by_id`] as the broker's own path writes it: each store hands back a ticket, and
/// each status is written with its event's ticket, one call each.
fn lifecycle_ticketed(provider: &MemoryProvider, chunk: &[Arc<Event>]) {
    let tickets: Vec<memory::Ticket> =
        chunk.iter().map(|event| memory::store(provider, event).unwrap()).collect();
    let now = jiff::Timestamp::now();
    for (event, &ticket) in chunk.iter().zip(&tickets) {
        let update = StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(now);
        memory::update(provider, &update, ticket).unwrap();
    }
    for (event, &ticket) in chunk.iter().zip(&tickets) {
        let update = StatusUpdate::new(event.id, EventStatus::Completed).with_completed_at(now);
        memory::update(provider, &update, ticket).unwrap();
    }
}

/// Times `lifecycle` over `iters` events in chunks of 256, each built just before it is stored, as
/// a publisher's are: the provider's cost is measured on events in cache, not on events built long
/// before.
fn in_chunks(iters: u64, template: &Event, lifecycle: impl Fn(&[Arc<Event>])) -> Duration {
    let mut spent = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(256);
        left -= n;
        let chunk: Vec<Arc<Event>> = (0..n).map(|_| Arc::new(fresh(template))).collect();
        let started = Instant::now();
        lifecycle(&chunk);
        spent += started.elapsed();
    }
    spent
}

fn memory_provider(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_provider");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");
    let default_bound = MemoryConfig::default().max_events;
    for (max_events, statuses_at_once, name) in [
        (4_095, 256, "4095, one shard"),
        (4_096, 256, "4096, 16 shards"),
        (default_bound, 256, "default bound"),
        (default_bound, 8, "default bound, statuses 8 at once"),
        (100_000, 256, "100k bound"),
    ] {
        let provider = Arc::new(MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() }));
        group.bench_function(BenchmarkId::new("store_and_two_statuses", name), |b| {
            b.iter_custom(|iters| {
                in_chunks(iters, &template, |chunk| lifecycle_by_id(&provider, chunk, statuses_at_once))
            });
        });
    }
    let provider = MemoryProvider::new(MemoryConfig::default());
    group.bench_function(BenchmarkId::new("store_and_two_statuses", "default bound, ticketed"), |b| {
        b.iter_custom(|iters| in_chunks(iters, &template, |chunk| lifecycle_ticketed(&provider, chunk)));
    });
    group.finish();
}

/// One way of running the lifecycle: publishes `n` events and waits until each is handled and
/// its statuses are written.
type Lifecycle = Box<dyn Fn(u64)>;

fn through_broker(
    provider: Arc<dyn Provider>,
    writer: WriterConfig,
    template: &Event,
) -> (Lifecycle, Broker) {
    let (broker, handled) = broker(provider, writer);
    let (b, template) = (broker.clone(), template.clone());
    let run = Box::new(move |n: u64| {
        let target = handled.load(Ordering::Relaxed) + n;
        for _ in 0..n {
            b.publish(fresh(&template)).unwrap();
        }
        while handled.load(Ordering::Relaxed) < target {
            std::thread::yield_now();
        }
        b.flush(Duration::from_secs(60)).unwrap();
    });
    (run, broker)
}

/// The Go seed's flow, without the broker's help: the publisher stores each event before
/// publishing it, and the handler writes its two statuses, one call each.
fn seed_flow(template: &Event) -> (Lifecycle, Broker) {
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
    let (b, template) = (broker.clone(), template.clone());
    let run = Box::new(move |n: u64| {
        let target = handled.load(Ordering::Relaxed) + n;
        for _ in 0..n {
            let event = fresh(&template);
            // The seed stores the event as published; the copy is the price of this crate's
            // owned-event API for a baseline that stores outside the broker.
            seed.store_batch(&[Arc::new(event.clone())], None).unwrap();
            b.publish(event).unwrap();
        }
        while handled.load(Ordering::Relaxed) < target {
            std::thread::yield_now();
        }
    });
    (run, broker)
}

/// The memory provider's share of the default path (stores, then statuses by id) on one thread
/// and on two at once, each storing its own events: ns per event on each thread, the median of
/// `rounds`.
fn threads_table(rounds: usize, events: u64) {
    println!(
        "\nmemory provider, store + two statuses, threads at once (ns per event per thread, median of {rounds})"
    );
    println!("| bound | 1 thread | 2 threads | 2 threads ÷ 1 |");
    println!("|---|---:|---:|---:|");
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");
    for max_events in [MemoryConfig::default().max_events, 100_000] {
        let per_event = |threads: u64| {
            let mut runs: Vec<f64> = (0..rounds)
                .map(|_| {
                    let provider =
                        MemoryProvider::new(MemoryConfig { max_events, ..MemoryConfig::default() });
                    // Filled first, so every store of the run evicts.
                    let fill: Vec<Arc<Event>> = (0..max_events).map(|_| Arc::new(fresh(&template))).collect();
                    provider.store_batch(&fill, None).unwrap();
                    drop(fill);
                    let spent: Duration = std::thread::scope(|s| {
                        let handles: Vec<_> = (0..threads)
                            .map(|_| {
                                let (provider, template) = (&provider, &template);
                                s.spawn(move || {
                                    in_chunks(events, template, |chunk| lifecycle_by_id(provider, chunk, 256))
                                })
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap()).sum()
                    });
                    #[allow(clippy::cast_precision_loss, reason = "a mean for a table")]
                    let ns = spent.as_nanos() as f64 / (threads * events) as f64;
                    ns
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[runs.len() / 2]
        };
        let (one, two) = (per_event(1), per_event(2));
        println!("| {max_events} | {one:.0} | {two:.0} | {:.2} |", two / one);
    }
}

/// How [`as_published`] writes its status changes, when it has a provider.
#[derive(Clone, Copy)]
enum Writes {
    /// With each store's ticket, into its event's mark: as the broker's workers write them.
    Ticketed,
    /// By id, through `update_status_batch`: as any other caller writes them.
    ById,
}

/// The lifecycle of `iters` events as the broker's default path has it: a publisher builds each
/// event and stores it at once (so the event it evicts is freed between two built, where the
/// allocator reuses its memory at once), and every 256 events their `processing` and `completed`
/// statuses are written, a batch each. Without a provider, the harness's own cost: the same events
/// and status changes built, each dropped at once.
fn as_published(iters: u64, template: &Event, provider: Option<(&MemoryProvider, Writes)>) -> Duration {
    let started = Instant::now();
    let mut ids = Vec::with_capacity(256);
    let mut tickets = Vec::with_capacity(256);
    let mut left = iters;
    while left > 0 {
        let n = left.min(256);
        left -= n;
        for _ in 0..n {
            let event = Arc::new(fresh(template));
            ids.push(event.id);
            match provider {
                Some((provider, Writes::Ticketed)) => tickets.push(memory::store(provider, &event).unwrap()),
                Some((provider, Writes::ById)) => {
                    provider.store_batch(std::slice::from_ref(&event), None).unwrap();
                }
                None => {}
            }
            black_box(event);
        }
        let now = jiff::Timestamp::now();
        let processing: Vec<StatusUpdate> = ids
            .iter()
            .map(|&id| StatusUpdate::new(id, EventStatus::Processing).with_processed_at(now))
            .collect();
        let completed: Vec<StatusUpdate> = ids
            .iter()
            .map(|&id| StatusUpdate::new(id, EventStatus::Completed).with_completed_at(now))
            .collect();
        match provider {
            Some((provider, Writes::Ticketed)) => {
                for updates in [&processing, &completed] {
                    for (update, &ticket) in updates.iter().zip(&tickets) {
                        memory::update(provider, update, ticket).unwrap();
                    }
                }
            }
            Some((provider, Writes::ById)) => {
                provider.update_status_batch(&processing).unwrap();
                provider.update_status_batch(&completed).unwrap();
            }
            None => {}
        }
        black_box((processing, completed));
        ids.clear();
        tickets.clear();
    }
    started.elapsed()
}

/// The memory provider's cost per event on the default path's allocation pattern: the lifecycle
/// [`as_published`] without the provider, with it written as the broker writes it (tickets), and
/// with its statuses written by id, in interleaved rounds; each cost is the median of the
/// per-round differences.
fn as_published_table(rounds: usize, events: u64) {
    println!(
        "\nmemory provider, store + two statuses, each event built just before its store (ns per event, median of {rounds} interleaved rounds of {events} events)"
    );
    println!(
        "| bound | without the provider | with it, ticketed | the provider's cost, ticketed (the broker's path) | with it, by id | the provider's cost, by id |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");
    for bound in [MemoryConfig::default().max_events, 100_000] {
        let config = MemoryConfig { max_events: bound, ..MemoryConfig::default() };
        let (ticketed, by_id) = (MemoryProvider::new(config.clone()), MemoryProvider::new(config));
        let contenders = [None, Some((&ticketed, Writes::Ticketed)), Some((&by_id, Writes::ById))];
        // Filled first, so every event of a round evicts one.
        for contender in &contenders[1..] {
            as_published(bound as u64, &template, *contender);
        }
        let by_round = common::interleaved(rounds, contenders.len(), |i| {
            let spent = as_published(events, &template, contenders[i]);
            #[allow(clippy::cast_precision_loss, reason = "a mean for a table")]
            let ns = spent.as_nanos() as f64 / events as f64;
            ns
        });
        let ns = common::medians(&by_round);
        let cost = |i: usize| {
            common::median(&mut by_round.iter().map(|round| round[i] - round[0]).collect::<Vec<_>>())
        };
        println!(
            "| {bound} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            ns[0],
            ns[1],
            cost(1),
            ns[2],
            cost(2)
        );
    }
}

/// The lifecycle contenders in interleaved rounds (the order rotating each round): each one's
/// median events/s, and the median of the per-round ratios against the default.
fn lifecycle_table(rounds: usize, events: u64) {
    let template = Event::new(EventSource::Database, TYPE).with_instance_id("bench");
    let contenders: [(&str, (Lifecycle, Broker)); 4] = [
        ("inline (the default)", through_broker(memory(), WriterConfig::default(), &template)),
        (
            "through the writer, batched (512 items or 1 ms)",
            through_broker(Arc::new(ThroughTheWriter(memory())), WriterConfig::default(), &template),
        ),
        (
            "through the writer, one item per write",
            through_broker(
                Arc::new(ThroughTheWriter(memory())),
                WriterConfig { max_batch: 1, max_delay: Duration::ZERO, ..WriterConfig::default() },
                &template,
            ),
        ),
        ("the seed's flow", seed_flow(&template)),
    ];
    for (_, (run, _)) in &contenders {
        run(events.min(20_000));
    }
    let by_round = common::interleaved(rounds, contenders.len(), |i| {
        let started = Instant::now();
        (contenders[i].1.0)(events);
        #[allow(clippy::cast_precision_loss, reason = "a rate for a table")]
        let rate = events as f64 / started.elapsed().as_secs_f64() / 1e3;
        rate
    });
    let rates = common::medians(&by_round);
    println!(
        "\nfull lifecycle through the broker, memory provider (100 000 events bound), one shard: thousand events/s, median of {rounds} interleaved rounds of {events} events"
    );
    println!("| how | k events/s | inline ÷ this |");
    println!("|---|---:|---:|");
    for (i, (name, _)) in contenders.iter().enumerate() {
        println!("| {name} | {:.0} | {:.2} |", rates[i], common::median_ratio(&by_round, 0, i));
    }
    for (_, (_, broker)) in contenders {
        assert!(broker.shutdown(Duration::from_secs(30)).is_clean());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut criterion = Criterion::default().configure_from_args();
    memory_provider(&mut criterion);
    criterion.final_summary();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` (CI) does not: one short round.
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test") {
        as_published_table(15, 500_000);
        threads_table(5, 500_000);
        lifecycle_table(7, 100_000);
    } else {
        as_published_table(1, 1_000);
        threads_table(1, 1_000);
        lifecycle_table(1, 1_000);
    }
}
