//! What metrics cost the publish → handler path, in one run: metrics off, metrics on with no
//! recorder installed, and metrics on with the Prometheus recorder installed. The recorder cannot
//! be uninstalled, so the cases run in that order.
//!
//! Workload, in the spirit of `benches/workload.rs`: 2 000 event types `svc<N>.entity<M>.<op>`
//! spread over the five sources, each event built per publish (a fresh `Event` with a user id and a
//! small JSON payload), 1 001 subscriptions (a catch-all that counts, 900 literal types and
//! wildcard patterns over the services), one shard, status tracking off, so the broker's own
//! per-event work is what is measured. The default `max_types` (256) holds: most types are
//! recorded as `other`, the worst case for the per-type table (a miss each).
//!
//! Criterion times each contender on its own; on this shared machine that drifts with the load, so
//! the bench also runs the contenders of each phase in interleaved rounds and prints their median
//! ns per event against "metrics off" measured in the same rounds.
//!
//! Run: `cargo bench --features metrics --bench metrics`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use eventbroker::metrics::MetricsConfig;
use eventbroker::{Backpressure, Broker, Event, EventSource};

mod common;

const TYPES: usize = 2_000;
const OPS: [&str; 4] = ["create", "update", "delete", "read"];

fn event_type(i: usize) -> String {
    format!("svc{}.entity{}.{}", i % 10, i / 4, OPS[i % 4])
}

/// 1 000 subscriptions: every fourth type literally, then wildcard patterns over the services.
fn patterns() -> Vec<String> {
    let mut patterns: Vec<String> = (0..TYPES).step_by(4).take(900).map(event_type).collect();
    for svc in 0..10 {
        patterns.push(format!("svc{svc}.*.create"));
        patterns.push(format!("svc{svc}.>"));
        for op in OPS {
            patterns.push(format!("svc{svc}.*.{op}"));
        }
        for entity in 0..4 {
            patterns.push(format!("*.entity{entity}.*"));
        }
    }
    patterns.truncate(1_000);
    patterns
}

struct Rig {
    broker: Broker,
    handled: Arc<AtomicU64>,
    types: Vec<String>,
    next: usize,
}

impl Rig {
    fn new(metrics: MetricsConfig) -> Self {
        let broker = Broker::builder()
            .workers(1)
            .buffer_size(4096)
            .track_status(false)
            .backpressure(Backpressure::Block(Duration::from_secs(60)))
            .metrics(metrics)
            .build()
            .expect("a broker");
        let handled = Arc::new(AtomicU64::new(0));
        // The catch-all counts each event once; the rest only look at it.
        let counter = Arc::clone(&handled);
        broker
            .subscribe_infallible("*", move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .expect("a pattern");
        for pattern in patterns() {
            broker
                .subscribe_infallible(&pattern, |e: &Event| {
                    black_box(e.user_id);
                })
                .expect("a pattern");
        }
        Self { broker, handled, types: (0..TYPES).map(event_type).collect(), next: 0 }
    }

    /// Publishes `n` fresh events and waits until all are handled.
    fn run(&mut self, n: u64) -> Duration {
        let target = self.handled.load(Ordering::Relaxed) + n;
        let started = Instant::now();
        for _ in 0..n {
            let i = self.next;
            self.next = (self.next + 1) % self.types.len();
            let event = Event::new(EventSource::ALL[i % 5], self.types[i].clone())
                .with_user_id(i64::try_from(i).unwrap_or(i64::MAX))
                .with_payload_value(serde_json::json!({ "id": i }));
            self.broker.publish(event).expect("accepted");
        }
        while self.handled.load(Ordering::Relaxed) < target {
            std::thread::yield_now();
        }
        started.elapsed()
    }
}

/// Events per timed round of the interleaved comparison.
const ROUND: u64 = 20_000;
/// Rounds per contender and phase.
const ROUNDS: usize = 15;

/// Runs `rigs` in interleaved rounds, the order rotating, and returns each one's median ns per
/// event: on a shared machine, load that comes and goes then hits every contender alike.
fn interleaved(rigs: &mut [&mut Rig]) -> Vec<f64> {
    for rig in rigs.iter_mut() {
        rig.run(ROUND); // warm the caches and the match tables
    }
    let by_round = common::interleaved(ROUNDS, rigs.len(), |i| {
        #[allow(clippy::cast_precision_loss, reason = "ns per event for a table")]
        let ns = rigs[i].run(ROUND).as_nanos() as f64 / ROUND as f64;
        ns
    });
    common::medians(&by_round)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` and `-- --test` only check that the
    // bench runs, which criterion does once per function.
    let quick = !std::env::args().any(|a| a == "--bench") || std::env::args().any(|a| a == "--test");
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("metrics_publish");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));

    // Phase 1, no recorder: metrics compiled and enabled, against metrics off.
    let mut off = Rig::new(MetricsConfig { enabled: false, ..MetricsConfig::default() });
    let mut none = Rig::new(MetricsConfig::default());
    group.bench_function("metrics off", |b| b.iter_custom(|n| off.run(n)));
    group.bench_function("no recorder", |b| b.iter_custom(|n| none.run(n)));
    let phase1 = if quick { Vec::new() } else { interleaved(&mut [&mut off, &mut none]) };

    // Phase 2, the Prometheus recorder installed (for good: it cannot be removed).
    metrics::set_global_recorder(metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder())
        .expect("the only recorder of this bench");
    let mut prometheus = Rig::new(MetricsConfig::default());
    let mut every = Rig::new(MetricsConfig { timing_sample: 1, ..MetricsConfig::default() });
    group.bench_function("prometheus recorder", |b| b.iter_custom(|n| prometheus.run(n)));
    group.bench_function("prometheus, every event timed", |b| b.iter_custom(|n| every.run(n)));
    let phase2 = if quick { Vec::new() } else { interleaved(&mut [&mut off, &mut prometheus, &mut every]) };
    group.finish();
    criterion.final_summary();

    if let ([off1, none], [off2, prometheus, every]) = (phase1.as_slice(), phase2.as_slice()) {
        println!("\ninterleaved, median of {ROUNDS} rounds of {ROUND} events, ns per event:");
        println!("| phase | contender | ns/event | ÷ metrics off |");
        println!("|---|---|---:|---:|");
        println!("| no recorder | metrics off | {off1:.0} | 1.000 |");
        println!("| no recorder | metrics on | {none:.0} | {:.3} |", none / off1);
        println!("| Prometheus | metrics off | {off2:.0} | 1.000 |");
        println!("| Prometheus | metrics on (1 in 16 timed) | {prometheus:.0} | {:.3} |", prometheus / off2);
        println!("| Prometheus | metrics on, every event timed | {every:.0} | {:.3} |", every / off2);
    }
}
