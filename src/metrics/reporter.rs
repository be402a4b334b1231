//! The reporter: one thread per broker that sets the gauges and engine-wide counters from the
//! broker's own counters every `report_interval`, and looks for a recorder.

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use metrics::{Counter, Gauge};

use super::MetricsConfig;
use super::recording::{EngineMetrics, describe, recorder_installed, seconds};
use crate::BrokerStats;

/// What the reporter reads each time: the broker's counters and whether it is shut down, or
/// `None` once the broker is gone.
pub(crate) type Source = Box<dyn Fn() -> Option<(BrokerStats, bool)> + Send>;

/// The reporter thread, once started.
#[derive(Default)]
pub(crate) struct Reporter {
    thread: parking_lot::Mutex<Option<Running>>,
}

struct Running {
    handle: JoinHandle<()>,
    /// Dropped to stop the thread, after one last report.
    stop: Sender<()>,
    /// Told when the thread exits.
    exited: Receiver<()>,
}

impl EngineMetrics {
    /// Starts the reporter thread, which reads the broker through `source`.
    pub(crate) fn start_reporter(self: &Arc<Self>, source: Source) -> std::io::Result<()> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let (exited_tx, exited) = crossbeam_channel::bounded::<()>(1);
        let metrics = Arc::clone(self);
        let handle = std::thread::Builder::new().name(format!("eb-metrics-{}", self.instance_id)).spawn(
            move || {
                metrics.run_reporter(&source, &stopped);
                let _ = exited_tx.send(());
            },
        )?;
        *self.reporter.thread.lock() = Some(Running { handle, stop, exited });
        Ok(())
    }

    /// Stops the reporter after one last report, waiting for it until `deadline`; one that does
    /// not finish by then is left to finish on its own.
    pub(crate) fn stop_reporter(&self, deadline: Instant) {
        let Some(running) = self.reporter.thread.lock().take() else { return };
        drop(running.stop);
        if running.exited.recv_deadline(deadline).is_ok() {
            let _ = running.handle.join();
        }
    }

    fn run_reporter(&self, source: &Source, stop: &Receiver<()>) {
        let mut handles: Option<EngineHandles> = None;
        loop {
            let installed = recorder_installed();
            self.set_active(installed);
            if installed {
                let Some((stats, closed)) = source() else { return };
                handles.get_or_insert_with(|| EngineHandles::new(&self.config)).report(
                    &stats,
                    closed,
                    self.take_folded(),
                );
            }
            match stop.recv_timeout(self.config.report_interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    if let (Some(handles), Some((stats, closed))) = (&handles, source()) {
                        handles.report(&stats, closed, self.take_folded());
                    }
                    return;
                }
            }
        }
    }
}

/// The engine-wide metrics' handles, registered once.
struct EngineHandles {
    queue_size: Gauge,
    workers_active: Gauge,
    pending_retries: Gauge,
    awaiting_acks: Gauge,
    writer_backlog: Gauge,
    inbound_lag: Gauge,
    folded: Counter,
    rejected: Total,
    retries: Total,
    handler_failures: Total,
    dead_letters: Total,
    unrouted: Total,
    internal_errors: Total,
    writer_batches: Total,
    writer_errors: Total,
    writer_dropped: Total,
    inbound_events: Total,
    inbound_fetch_errors: Total,
}

impl EngineHandles {
    fn new(config: &MetricsConfig) -> Self {
        describe(config);
        let labels = config.constant_labels();
        let gauge = |n: &str| metrics::gauge!(config.name(n), labels.clone());
        let counter = |n: &str| metrics::counter!(config.name(n), labels.clone());
        let total = |n: &str| Total { counter: counter(n), reported: Cell::new(0) };
        Self {
            queue_size: gauge("queue_size"),
            workers_active: gauge("workers_active"),
            pending_retries: gauge("pending_retries"),
            awaiting_acks: gauge("awaiting_acks"),
            writer_backlog: gauge("writer_backlog"),
            inbound_lag: gauge("inbound_lag_seconds"),
            folded: counter("events_folded_total"),
            rejected: total("events_rejected_total"),
            retries: total("retries_total"),
            handler_failures: total("handler_failures_total"),
            dead_letters: total("dead_letters_total"),
            unrouted: total("events_unrouted_total"),
            internal_errors: total("internal_errors_total"),
            writer_batches: total("writer_batches_total"),
            writer_errors: total("writer_errors_total"),
            writer_dropped: total("writer_dropped_total"),
            inbound_events: total("inbound_events_total"),
            inbound_fetch_errors: total("inbound_fetch_errors_total"),
        }
    }

    #[allow(clippy::cast_precision_loss, reason = "gauge values, exact below 2^53")]
    fn report(&self, stats: &BrokerStats, closed: bool, folded: u64) {
        let in_hand: u64 = stats.shards.iter().map(|s| s.in_hand).sum();
        self.queue_size.set(stats.queued as f64 + in_hand as f64);
        self.workers_active.set(if closed { 0.0 } else { stats.workers as f64 });
        self.pending_retries.set(stats.pending_retries as f64);
        self.awaiting_acks.set(stats.awaiting_acks as f64);
        self.writer_backlog.set(stats.writer.backlog as f64 + stats.writer.settle_backlog as f64);
        self.inbound_lag.set(seconds(stats.inbound.lag));
        self.folded.increment(folded);
        self.rejected.to(stats.rejected);
        self.retries.to(stats.retries);
        self.handler_failures.to(stats.handler_failures);
        self.dead_letters.to(stats.dead_letters);
        self.unrouted.to(stats.unrouted);
        self.internal_errors.to(stats.internal_errors);
        self.writer_batches.to(stats.writer.batches);
        self.writer_errors.to(stats.writer.errors);
        self.writer_dropped.to(stats.writer.dropped);
        self.inbound_events.to(stats.inbound.fetched);
        self.inbound_fetch_errors.to(stats.inbound.fetch_errors);
    }
}

/// An engine-wide counter reported from the broker's running total: by increments, so that the
/// counters of brokers sharing a name and labels (one built after another, or side by side) add
/// up, as the per-type counters do, rather than the largest total hiding the others (an absolute
/// value is kept as a maximum).
struct Total {
    counter: Counter,
    /// The total reported so far.
    reported: Cell<u64>,
}

impl Total {
    fn to(&self, total: u64) {
        let reported = self.reported.get();
        if total > reported {
            self.counter.increment(total - reported);
            self.reported.set(total);
        }
    }
}
