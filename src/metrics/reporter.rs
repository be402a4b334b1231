//! The reporter: one thread per broker that sets the gauges and engine-wide counters from the
//! broker's own counters every `report_interval`, and looks for a recorder.

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
    rejected: Counter,
    retries: Counter,
    handler_failures: Counter,
    dead_letters: Counter,
    unrouted: Counter,
    internal_errors: Counter,
    writer_batches: Counter,
    writer_errors: Counter,
    writer_dropped: Counter,
    inbound_events: Counter,
    inbound_fetch_errors: Counter,
}

impl EngineHandles {
    fn new(config: &MetricsConfig) -> Self {
        describe(config);
        let labels = config.constant_labels();
        let gauge = |n: &str| metrics::gauge!(config.name(n), labels.clone());
        let counter = |n: &str| metrics::counter!(config.name(n), labels.clone());
        Self {
            queue_size: gauge("queue_size"),
            workers_active: gauge("workers_active"),
            pending_retries: gauge("pending_retries"),
            awaiting_acks: gauge("awaiting_acks"),
            writer_backlog: gauge("writer_backlog"),
            inbound_lag: gauge("inbound_lag_seconds"),
            folded: counter("events_folded_total"),
            rejected: counter("events_rejected_total"),
            retries: counter("retries_total"),
            handler_failures: counter("handler_failures_total"),
            dead_letters: counter("dead_letters_total"),
            unrouted: counter("events_unrouted_total"),
            internal_errors: counter("internal_errors_total"),
            writer_batches: counter("writer_batches_total"),
            writer_errors: counter("writer_errors_total"),
            writer_dropped: counter("writer_dropped_total"),
            inbound_events: counter("inbound_events_total"),
            inbound_fetch_errors: counter("inbound_fetch_errors_total"),
        }
    }

    #[allow(clippy::cast_precision_loss, reason = "gauge values, exact below 2^53")]
    fn report(&self, stats: &BrokerStats, closed: bool, folded: u64) {
        let in_hand: u64 = stats.shards.iter().map(|s| s.in_hand).sum();
        self.queue_size.set(stats.queued as f64 + in_hand as f64);
        self.workers_active.set(if closed { 0.0 } else { stats.workers as f64 });
        self.pending_retries.set(stats.pending_retries as f64);
        self.awaiting_acks.set(stats.awaiting_acks as f64);
        self.writer_backlog.set(stats.writer.backlog as f64);
        self.inbound_lag.set(seconds(stats.inbound.lag));
        self.folded.increment(folded);
        self.rejected.absolute(stats.rejected);
        self.retries.absolute(stats.retries);
        self.handler_failures.absolute(stats.handler_failures);
        self.dead_letters.absolute(stats.dead_letters);
        self.unrouted.absolute(stats.unrouted);
        self.internal_errors.absolute(stats.internal_errors);
        self.writer_batches.absolute(stats.writer.batches);
        self.writer_errors.absolute(stats.writer.errors);
        self.writer_dropped.absolute(stats.writer.dropped);
        self.inbound_events.absolute(stats.inbound.fetched);
        self.inbound_fetch_errors.absolute(stats.inbound.fetch_errors);
    }
}
