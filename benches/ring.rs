//! Shard ring buffer throughput: producer threads hand 1,000,000 items to one consumer thread
//! through a 1024-slot queue; our ring against `crossbeam-channel`, `std::sync::mpsc` and the
//! `disruptor` crate, in the same criterion groups (`Throughput::Elements`, so criterion reports
//! items per second; ns per item = 1e9 / that).
//!
//! - `ring-spsc`: one producer thread (the benchmark's own), one consumer thread.
//! - `ring-2-producers`: two producer threads, 500,000 items each, one consumer thread. The two
//!   threads are spawned inside the timed section (≈ 50 µs of a multi-millisecond run).
//!
//! How each side waits, so the figures compare like with like:
//! - Our ring's consumer drains with `pop_batch` (up to 1024 at a time) and waits with
//!   [`WaitStrategy::BusySpin`] (it burns its core), except `ring/*/blocking-wait`, which uses the
//!   broker's default (spin, yield, park). Our producers spin briefly, then yield, on `Full`.
//! - `disruptor` runs its own busy-spinning consumer thread; its producers spin on a full ring.
//! - The channels use their blocking `send` / `recv` (which spin a little before sleeping).
//!
//! Items are built before the clock starts; `Arc<u64>` is the pointer-sized case (the broker moves
//! `Arc<Event>`s), its drop on the consumer included. On 2 cores, two producers and a spinning
//! consumer oversubscribe the machine: compare the 2-producer figures with each other only.
//!
//! `cargo bench --bench ring` takes about a minute; `cargo bench --bench ring -- --test` (CI) runs
//! every contender once.

use std::collections::VecDeque;
use std::hint::{black_box, spin_loop};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_utils::CachePadded;
use disruptor::BusySpin;
use eventbroker::__private::{Consumer, Producer, PushBatchError, PushError, WaitOutcome, ring};
use eventbroker::WaitStrategy;

/// Items handed over per measured iteration.
const ITEMS: u64 = 1_000_000;
/// Slots in every queue.
const CAPACITY: usize = 1024;
/// Items per batch publish.
const BATCH: usize = 64;

/// What travels through the queues.
trait Item: Send + 'static {
    const NAME: &'static str;
    fn new(index: u64) -> Self;
    fn value(&self) -> u64;
}

impl Item for u64 {
    const NAME: &'static str = "u64";
    fn new(index: u64) -> Self {
        index
    }
    fn value(&self) -> u64 {
        *self
    }
}

impl Item for Arc<u64> {
    const NAME: &'static str = "Arc<u64>";
    fn new(index: u64) -> Self {
        Arc::new(index)
    }
    fn value(&self) -> u64 {
        **self
    }
}

/// How many items the consumer thread has taken so far; the producer side waits on it.
type Received = Arc<CachePadded<AtomicU64>>;

/// Times `iters` hand-overs of `ITEMS` items: builds `producers` equal shares (untimed), lets
/// `send` push them, and waits until the consumer has counted them all.
fn measure<T: Item>(
    iters: u64,
    producers: u64,
    received: &AtomicU64,
    mut send: impl FnMut(Vec<Vec<T>>),
) -> Duration {
    let share = ITEMS / producers;
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let shares = (0..producers).map(|p| (p * share..(p + 1) * share).map(T::new).collect()).collect();
        let target = received.load(Ordering::Acquire) + ITEMS;
        let start = Instant::now();
        send(shares);
        while received.load(Ordering::Acquire) < target {
            spin_loop();
        }
        total += start.elapsed();
    }
    total
}

/// Runs `send` for each share: on this thread if there is one, else on one scoped thread each.
fn run_producers<P, T>(mut shares: Vec<Vec<T>>, producer: &P, send: impl Fn(&P, Vec<T>) + Sync)
where
    P: Clone + Send + Sync,
    T: Item,
{
    if shares.len() == 1 {
        send(producer, shares.pop().expect("one share"));
        return;
    }
    let send = &send;
    thread::scope(|scope| {
        for share in shares {
            let producer = producer.clone();
            scope.spawn(move || send(&producer, share));
        }
    });
}

/// Spins 64 times, then yields: a full queue waits for the consumer, which may need our core.
fn backoff(retries: &mut u32) {
    if *retries < 64 {
        spin_loop();
    } else {
        thread::yield_now();
    }
    *retries += 1;
}

fn ring_push_each<T: Item>(producer: &Producer<T>, items: Vec<T>) {
    for mut item in items {
        let mut retries = 0;
        loop {
            match producer.try_push(item) {
                Ok(()) => break,
                Err(PushError::Full(back)) => {
                    item = back;
                    backoff(&mut retries);
                }
                Err(PushError::Closed(_)) => unreachable!("closed only after the benchmark"),
            }
        }
    }
}

fn ring_push_batches<T: Item>(producer: &Producer<T>, items: Vec<T>) {
    let mut items = items.into_iter();
    let mut batch = VecDeque::with_capacity(BATCH);
    loop {
        batch.extend(items.by_ref().take(BATCH));
        if batch.is_empty() {
            return;
        }
        let mut retries = 0;
        while !batch.is_empty() {
            match producer.try_push_batch(&mut batch) {
                Ok(_) => {}
                Err(PushBatchError::Full) => backoff(&mut retries),
                Err(PushBatchError::Closed) => unreachable!("closed only after the benchmark"),
            }
        }
    }
}

/// The shard worker's loop, minus the handlers.
fn ring_consumer<T: Item>(mut consumer: Consumer<T>, strategy: WaitStrategy, received: &AtomicU64) {
    let mut batch = Vec::with_capacity(CAPACITY);
    let (mut count, mut sum) = (0u64, 0u64);
    loop {
        let taken = consumer.pop_batch(&mut batch, CAPACITY);
        if taken == 0 {
            if consumer.wait(strategy, None) == WaitOutcome::Closed {
                break;
            }
            continue;
        }
        for item in batch.drain(..) {
            sum = sum.wrapping_add(item.value());
        }
        count += taken as u64;
        received.store(count, Ordering::Release);
    }
    black_box(sum);
}

fn bench_ring<T: Item>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    producers: u64,
    strategy: WaitStrategy,
    push: fn(&Producer<T>, Vec<T>),
) {
    let received = Received::default();
    let (producer, consumer) = ring::<T>(CAPACITY);
    let worker = {
        let received = Arc::clone(&received);
        thread::spawn(move || ring_consumer(consumer, strategy, &received))
    };
    group.bench_function(BenchmarkId::new(name, T::NAME), |b| {
        b.iter_custom(|iters| {
            measure(iters, producers, &received, |shares| run_producers(shares, &producer, push))
        });
    });
    producer.close();
    worker.join().expect("the consumer panicked");
}

/// A channel baseline: `rx` drained on its own thread, `send` pushing one item (blocking while
/// full), the consumer stopping when every sender is gone.
fn bench_channel<T, S, R>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    producers: u64,
    (tx, rx): (S, R),
    send: fn(&S, T),
) where
    T: Item,
    S: Clone + Send + Sync,
    R: IntoIterator<Item = T> + Send + 'static,
{
    let received = Received::default();
    let worker = {
        let received = Arc::clone(&received);
        thread::spawn(move || {
            let (mut count, mut sum) = (0u64, 0u64);
            for item in rx {
                sum = sum.wrapping_add(item.value());
                count += 1;
                received.store(count, Ordering::Release);
            }
            black_box(sum);
        })
    };
    group.bench_function(BenchmarkId::new(name, T::NAME), |b| {
        b.iter_custom(|iters| {
            measure(iters, producers, &received, |shares| {
                run_producers(shares, &tx, |tx, items| items.into_iter().for_each(|item| send(tx, item)));
            })
        });
    });
    drop(tx);
    worker.join().expect("the consumer panicked");
}

fn bench_crossbeam<T: Item>(group: &mut BenchmarkGroup<'_, WallTime>, producers: u64) {
    let channel = crossbeam_channel::bounded::<T>(CAPACITY);
    bench_channel(group, "crossbeam-channel", producers, channel, |tx, item| {
        tx.send(item).expect("the consumer is alive");
    });
}

fn bench_std<T: Item>(group: &mut BenchmarkGroup<'_, WallTime>, producers: u64) {
    let channel = std::sync::mpsc::sync_channel::<T>(CAPACITY);
    bench_channel(group, "std-sync-channel", producers, channel, |tx, item| {
        tx.send(item).expect("the consumer is alive");
    });
}

/// The disruptor's event handler: sums, and publishes the count at the end of each batch.
fn disruptor_handler(received: Received) -> impl FnMut(&u64, i64, bool) + Send + 'static {
    let mut sum = 0u64;
    move |item, sequence, end_of_batch| {
        sum = sum.wrapping_add(*item);
        if end_of_batch {
            black_box(sum);
            let count = u64::try_from(sequence + 1).expect("sequences start at 0");
            received.store(count, Ordering::Release);
        }
    }
}

/// Publishes `items` one by one, or in batches of `BATCH` when `batch` is set.
fn disruptor_publish(producer: &mut impl disruptor::Producer<u64>, items: &[u64], batch: bool) {
    if batch {
        for chunk in items.chunks(BATCH) {
            producer.batch_publish(chunk.len(), |slots| {
                for (slot, item) in slots.zip(chunk) {
                    *slot = *item;
                }
            });
        }
    } else {
        for &item in items {
            producer.publish(|slot| *slot = item);
        }
    }
}

fn disruptor_name(batch: bool) -> &'static str {
    if batch { "disruptor/batch-publish-64" } else { "disruptor/publish-each" }
}

fn bench_disruptor_spsc(group: &mut BenchmarkGroup<'_, WallTime>, batch: bool) {
    let received = Received::default();
    let mut producer = disruptor::build_single_producer(CAPACITY, || 0u64, BusySpin)
        .handle_events_with(disruptor_handler(Arc::clone(&received)))
        .build();
    group.bench_function(BenchmarkId::new(disruptor_name(batch), u64::NAME), |b| {
        b.iter_custom(|iters| {
            measure(iters, 1, &received, |shares: Vec<Vec<u64>>| {
                for share in shares {
                    disruptor_publish(&mut producer, &share, batch);
                }
            })
        });
    });
    // Dropping the producer stops and joins the consumer thread.
}

fn bench_disruptor_mpsc(group: &mut BenchmarkGroup<'_, WallTime>, producers: u64, batch: bool) {
    let received = Received::default();
    let producer = disruptor::build_multi_producer(CAPACITY, || 0u64, BusySpin)
        .handle_events_with(disruptor_handler(Arc::clone(&received)))
        .build();
    group.bench_function(BenchmarkId::new(disruptor_name(batch), u64::NAME), |b| {
        b.iter_custom(|iters| {
            measure(iters, producers, &received, |shares| {
                run_producers(shares, &producer, |producer, items| {
                    disruptor_publish(&mut producer.clone(), &items, batch);
                });
            })
        });
    });
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    // One iteration moves a million items (milliseconds); ten samples settle well on 2 cores.
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

fn spsc(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring-spsc");
    configure(&mut group);
    let spin = WaitStrategy::BusySpin;
    bench_ring::<u64>(&mut group, "ring/push-each", 1, spin, ring_push_each);
    bench_ring::<u64>(&mut group, "ring/push-batch-64", 1, spin, ring_push_batches);
    bench_ring::<u64>(&mut group, "ring/push-each/blocking-wait", 1, WaitStrategy::default(), ring_push_each);
    bench_crossbeam::<u64>(&mut group, 1);
    bench_std::<u64>(&mut group, 1);
    bench_disruptor_spsc(&mut group, false);
    bench_disruptor_spsc(&mut group, true);
    bench_ring::<Arc<u64>>(&mut group, "ring/push-each", 1, spin, ring_push_each);
    bench_ring::<Arc<u64>>(&mut group, "ring/push-batch-64", 1, spin, ring_push_batches);
    bench_crossbeam::<Arc<u64>>(&mut group, 1);
    group.finish();
}

fn two_producers(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring-2-producers");
    configure(&mut group);
    let spin = WaitStrategy::BusySpin;
    bench_ring::<u64>(&mut group, "ring/push-each", 2, spin, ring_push_each);
    bench_ring::<u64>(&mut group, "ring/push-batch-64", 2, spin, ring_push_batches);
    bench_crossbeam::<u64>(&mut group, 2);
    bench_std::<u64>(&mut group, 2);
    bench_disruptor_mpsc(&mut group, 2, false);
    bench_disruptor_mpsc(&mut group, 2, true);
    group.finish();
}

criterion_group!(benches, spsc, two_producers);
criterion_main!(benches);
