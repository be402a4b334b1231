//! Dispatch throughput and publish→handler latency, against the channels people reach for today,
//! on the same workload in the same run.
//!
//! Workload: one event type (`public.users.create`); each published event is a clone of a template
//! `Event` (two short strings), handed to S handlers in order on one consumer thread; the last
//! handler counts it. Contenders:
//! - `broker`: this crate, async mode, one shard, status tracking off (matching on top of the
//!   handoff; the event is wrapped in an `Arc` by the broker). Default wait strategy
//!   (spin, yield, park) unless the name says `busy-spin`.
//! - `crossbeam`: `crossbeam_channel::bounded(1024)` carrying `Arc<Event>` to a thread that calls
//!   the S handlers (no matching). The receiver blocks when empty.
//! - `tokio-broadcast`: `tokio::sync::broadcast::channel(1024)`, one receiver thread
//!   (`blocking_recv`) calling the S handlers; broadcast has no backpressure, so publishers wait
//!   while the channel holds 1023 values rather than letting the receiver lag and lose events.
//! - `disruptor`: the `disruptor` crate, slots of `Option<Arc<Event>>`, busy-spin consumer.
//!
//! Run: `cargo bench --bench dispatch`. Throughput: the machine is shared and noisy, so the four
//! contenders of a case run in interleaved rounds (the order rotating each round), each built just
//! before its run and dropped after it (the disruptor's busy-spinning consumer would otherwise take
//! a core from the others); the table gives each one's median events/s and the median of the
//! per-round ratios of the broker to crossbeam, over the rounds run on near cores when there are
//! any ([`common::interleaved_near`]), with the core-to-core hop before and after the case. The
//! latency table (p50/p99/p99.9, hdrhistogram) follows. `cargo test --benches` runs one short
//! round. To profile one contender alone:
//! `cargo bench --bench dispatch -- profile broker 1 1 1` (the contender, publishers, subscribers,
//! batch) under `perf record`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use disruptor::{BusySpin, Producer as _};
use eventbroker::{Backpressure, Broker, Event, EventSource, WaitStrategy};
use hdrhistogram::Histogram;

mod common;

const TYPE: &str = "public.users.create";
/// Patterns of the 8-subscriber case: all match `TYPE`, in the realistic forms.
const PATTERNS: [&str; 8] = [
    "public.users.create",
    "public.*.create",
    "*.users.create",
    "public.>",
    "*.*.create",
    "public.users.*",
    ">",
    "*",
];
const CAPACITY: usize = 1024;

fn template() -> Event {
    Event::new(EventSource::Database, TYPE).with_instance_id("bench")
}

type Handler = Box<dyn Fn(&Event) + Send + Sync>;

/// S handlers; the last counts the event.
fn handlers(subscribers: usize, handled: &Arc<AtomicU64>) -> Vec<Handler> {
    (0..subscribers)
        .map(|i| -> Handler {
            if i + 1 == subscribers {
                let handled = Arc::clone(handled);
                Box::new(move |e: &Event| {
                    black_box(e.event_type.len());
                    handled.fetch_add(1, Ordering::Relaxed);
                })
            } else {
                Box::new(|e: &Event| {
                    black_box(e.event_type.len());
                })
            }
        })
        .collect()
}

fn wait_for(handled: &AtomicU64, target: u64) {
    while handled.load(Ordering::Acquire) < target {
        std::thread::yield_now();
    }
}

/// A contender: something events are published into by `publishers` threads.
trait Pipeline: Sync {
    /// Publishes `n` events, `batch` at a time, from the calling thread.
    fn publish(&self, n: u64, batch: usize);
    fn handled(&self) -> &AtomicU64;
}

struct BrokerPipeline {
    broker: Broker,
    handled: Arc<AtomicU64>,
    template: Event,
}

impl BrokerPipeline {
    fn new(subscribers: usize, wait: WaitStrategy) -> Self {
        let broker = Broker::builder()
            .workers(1)
            .buffer_size(CAPACITY)
            .track_status(false)
            .wait_strategy(wait)
            .backpressure(Backpressure::Block(Duration::from_secs(60)))
            .build()
            .unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        for (pattern, handler) in PATTERNS.iter().zip(handlers(subscribers, &handled)) {
            broker
                .subscribe(pattern, move |e: &Event| {
                    handler(e);
                    Ok::<(), std::convert::Infallible>(())
                })
                .unwrap();
        }
        Self { broker, handled, template: template() }
    }
}

impl Pipeline for BrokerPipeline {
    fn publish(&self, n: u64, batch: usize) {
        if batch == 1 {
            for _ in 0..n {
                self.broker.publish(self.template.clone()).unwrap();
            }
        } else {
            let mut left = n;
            while left > 0 {
                let k = left.min(batch as u64);
                self.broker.publish_batch((0..k).map(|_| self.template.clone()).collect()).unwrap();
                left -= k;
            }
        }
    }

    fn handled(&self) -> &AtomicU64 {
        &self.handled
    }
}

struct CrossbeamPipeline {
    tx: crossbeam_channel::Sender<Arc<Event>>,
    handled: Arc<AtomicU64>,
    template: Event,
}

impl CrossbeamPipeline {
    fn new(subscribers: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Arc<Event>>(CAPACITY);
        let handled = Arc::new(AtomicU64::new(0));
        let hs = handlers(subscribers, &handled);
        std::thread::spawn(move || {
            for e in rx {
                for h in &hs {
                    h(&e);
                }
            }
        });
        Self { tx, handled, template: template() }
    }
}

impl Pipeline for CrossbeamPipeline {
    fn publish(&self, n: u64, _batch: usize) {
        // No batch API: a batch is that many sends.
        for _ in 0..n {
            self.tx.send(Arc::new(self.template.clone())).unwrap();
        }
    }

    fn handled(&self) -> &AtomicU64 {
        &self.handled
    }
}

struct BroadcastPipeline {
    tx: tokio::sync::broadcast::Sender<Arc<Event>>,
    handled: Arc<AtomicU64>,
    template: Event,
}

impl BroadcastPipeline {
    fn new(subscribers: usize) -> Self {
        let (tx, mut rx) = tokio::sync::broadcast::channel::<Arc<Event>>(CAPACITY);
        let handled = Arc::new(AtomicU64::new(0));
        let hs = handlers(subscribers, &handled);
        std::thread::spawn(move || {
            while let Ok(e) = rx.blocking_recv() {
                for h in &hs {
                    h(&e);
                }
            }
        });
        Self { tx, handled, template: template() }
    }
}

impl Pipeline for BroadcastPipeline {
    fn publish(&self, n: u64, _batch: usize) {
        for _ in 0..n {
            while self.tx.len() >= CAPACITY - 1 {
                std::thread::yield_now();
            }
            self.tx.send(Arc::new(self.template.clone())).unwrap();
        }
    }

    fn handled(&self) -> &AtomicU64 {
        &self.handled
    }
}

type DisruptorProducer = disruptor::MultiProducer<Option<Arc<Event>>, disruptor::SingleConsumerBarrier>;

struct DisruptorPipeline {
    // The multi-producer handle is cloned per publishing thread.
    producer: parking_lot::Mutex<DisruptorProducer>,
    handled: Arc<AtomicU64>,
    template: Event,
}

impl DisruptorPipeline {
    fn new(subscribers: usize) -> Self {
        let handled = Arc::new(AtomicU64::new(0));
        let hs = handlers(subscribers, &handled);
        let producer = disruptor::build_multi_producer(CAPACITY, || None, BusySpin)
            .handle_events_with(move |slot: &Option<Arc<Event>>, _seq, _end| {
                if let Some(e) = slot {
                    for h in &hs {
                        h(e);
                    }
                }
            })
            .build();
        Self { producer: parking_lot::Mutex::new(producer), handled, template: template() }
    }
}

impl Pipeline for DisruptorPipeline {
    fn publish(&self, n: u64, batch: usize) {
        let mut producer = self.producer.lock().clone();
        let mut left = n;
        while left > 0 {
            let k = left.min(batch as u64);
            if k == 1 {
                producer.publish(|slot| *slot = Some(Arc::new(self.template.clone())));
            } else {
                producer.batch_publish(usize::try_from(k).unwrap(), |slots| {
                    for slot in slots {
                        *slot = Some(Arc::new(self.template.clone()));
                    }
                });
            }
            left -= k;
        }
    }

    fn handled(&self) -> &AtomicU64 {
        &self.handled
    }
}

/// Publishes `iters` events from `publishers` threads and waits until all are handled.
fn run(pipeline: &dyn Pipeline, publishers: u64, batch: usize, iters: u64) -> Duration {
    let target = pipeline.handled().load(Ordering::Acquire) + iters;
    let started = Instant::now();
    std::thread::scope(|s| {
        for p in 0..publishers {
            let share = iters / publishers + u64::from(p < iters % publishers);
            s.spawn(move || pipeline.publish(share, batch));
        }
    });
    wait_for(pipeline.handled(), target);
    started.elapsed()
}

const CONTENDERS: [&str; 4] = ["broker", "crossbeam", "tokio-broadcast", "disruptor"];

fn contender(name: &str, subscribers: usize) -> Box<dyn Pipeline> {
    match name {
        "broker" => Box::new(BrokerPipeline::new(subscribers, WaitStrategy::default())),
        "crossbeam" => Box::new(CrossbeamPipeline::new(subscribers)),
        "tokio-broadcast" => Box::new(BroadcastPipeline::new(subscribers)),
        _ => Box::new(DisruptorPipeline::new(subscribers)),
    }
}

fn throughput(rounds: usize, events: u64) {
    println!(
        "\ndispatch throughput, million events/s (median of {rounds} interleaved rounds of {events} events)"
    );
    println!(
        "| case | broker | crossbeam | tokio broadcast | disruptor (busy-spin) | broker ÷ crossbeam | hop, ns | near rounds |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for publishers in [1u64, 2] {
        for subscribers in [1usize, 8] {
            for batch in [1usize, 64] {
                let hop_before = common::core_hop();
                let (by_round, near) = common::interleaved_near(rounds, CONTENDERS.len(), |i| {
                    let pipeline = contender(CONTENDERS[i], subscribers);
                    run(pipeline.as_ref(), publishers, batch, events.min(10_000));
                    let took = run(pipeline.as_ref(), publishers, batch, events);
                    #[allow(clippy::cast_precision_loss, reason = "a rate for a table")]
                    let rate = events as f64 / took.as_secs_f64() / 1e6;
                    rate
                });
                let [broker, crossbeam, broadcast, disruptor] = common::medians(&by_round)[..] else {
                    unreachable!("four contenders")
                };
                println!(
                    "| p{publishers} s{subscribers} b{batch} | {broker:.2} | {crossbeam:.2} | {broadcast:.2} | {disruptor:.2} | {:.2} | {}/{} | {near}/{rounds} |",
                    common::median_ratio(&by_round, 0, 1),
                    hop_before.as_nanos(),
                    common::core_hop().as_nanos(),
                );
            }
        }
    }
}

/// `profile CONTENDER PUBLISHERS SUBSCRIBERS BATCH` (`broker 1 1 1` when left out): that contender
/// alone, 20 rounds of 1 000 000 events, each round's rate printed with the core-to-core hop just
/// after it, then the hop before and after all of them: a steady load for `perf record`.
fn profile(args: &[&str]) {
    const EVENTS: u64 = 1_000_000;
    let name = args.first().copied().unwrap_or("broker");
    assert!(CONTENDERS.contains(&name), "no contender {name:?}: one of {CONTENDERS:?}");
    let number = |i: usize| {
        args.get(i).map_or(1, |n| n.parse::<usize>().expect("publishers, subscribers and batch are numbers"))
    };
    let (publishers, subscribers, batch) = (number(1) as u64, number(2), number(3));
    let pipeline = contender(name, subscribers);
    run(pipeline.as_ref(), publishers, batch, EVENTS / 10);
    println!(
        "profile: {name}, p{publishers} s{subscribers} b{batch}, per round: million events/s, then the hop after it in ns"
    );
    common::profile_rounds(20, EVENTS, || run(pipeline.as_ref(), publishers, batch, EVENTS));
}

/// One publisher, one subscriber: publish, wait until handled, repeat (`gap` apart); the handler
/// records publish→handler time.
fn latency(name: &str, gap: Duration, samples: u64) -> Histogram<u64> {
    let epoch = Instant::now();
    let histogram = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let handled = Arc::new(AtomicU64::new(0));
    let record = {
        let (histogram, handled) = (Arc::clone(&histogram), Arc::clone(&handled));
        move |e: &Event| {
            let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap();
            let sent = u64::try_from(e.user_id).unwrap();
            histogram.lock().record(now.saturating_sub(sent).max(1)).unwrap();
            handled.fetch_add(1, Ordering::Release);
        }
    };
    let stamped = |t: &Event| {
        let mut e = t.clone();
        e.user_id = i64::try_from(epoch.elapsed().as_nanos()).unwrap();
        e
    };
    let t = template();
    let mut publish: Box<dyn FnMut()> = match name {
        "broker" | "broker busy-spin" => {
            let wait = if name == "broker" { WaitStrategy::default() } else { WaitStrategy::BusySpin };
            let broker =
                Broker::builder().workers(1).track_status(false).wait_strategy(wait).build().unwrap();
            broker
                .subscribe(TYPE, move |e: &Event| {
                    record(e);
                    Ok::<(), std::convert::Infallible>(())
                })
                .unwrap();
            Box::new(move || broker.publish(stamped(&t)).unwrap())
        }
        "crossbeam" => {
            let (tx, rx) = crossbeam_channel::bounded::<Arc<Event>>(CAPACITY);
            std::thread::spawn(move || {
                for e in rx {
                    record(&e);
                }
            });
            Box::new(move || tx.send(Arc::new(stamped(&t))).unwrap())
        }
        "tokio-broadcast" => {
            let (tx, mut rx) = tokio::sync::broadcast::channel::<Arc<Event>>(CAPACITY);
            std::thread::spawn(move || {
                while let Ok(e) = rx.blocking_recv() {
                    record(&e);
                }
            });
            Box::new(move || {
                tx.send(Arc::new(stamped(&t))).unwrap();
            })
        }
        "disruptor busy-spin" => {
            let mut producer = disruptor::build_single_producer(CAPACITY, || None, BusySpin)
                .handle_events_with(move |slot: &Option<Arc<Event>>, _, _| {
                    if let Some(e) = slot {
                        record(e);
                    }
                })
                .build();
            Box::new(move || producer.publish(|slot| *slot = Some(Arc::new(stamped(&t)))))
        }
        other => unreachable!("{other}"),
    };
    for i in 1..=samples {
        publish();
        wait_for(&handled, i);
        if !gap.is_zero() {
            let until = Instant::now() + gap;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
    drop(publish);
    histogram.lock().clone()
}

fn latency_report(test_mode: bool) {
    let samples = if test_mode { 500 } else { 100_000 };
    println!("\npublish→handler latency, 1 publisher, 1 subscriber, {samples} samples each (ns)");
    println!("{:<22} {:>12} {:>8} {:>8} {:>8} {:>8}", "contender", "gap", "p50", "p99", "p99.9", "max");
    for gap in [Duration::ZERO, Duration::from_micros(50)] {
        for name in ["broker", "broker busy-spin", "crossbeam", "tokio-broadcast", "disruptor busy-spin"] {
            let h = latency(name, gap, samples);
            println!(
                "{name:<22} {:>12} {:>8} {:>8} {:>8} {:>8}",
                format!("{gap:?}"),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max()
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` (CI) does not: a quick pass then.
    let test_mode = std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "profile") {
        let rest: Vec<&str> =
            args[at + 1..].iter().filter(|a| !a.starts_with("--")).map(String::as_str).collect();
        profile(&rest);
        return;
    }
    if test_mode {
        throughput(1, 2_000);
    } else {
        throughput(5, 200_000);
    }
    latency_report(test_mode);
}
