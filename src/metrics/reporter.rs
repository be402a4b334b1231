//! The reporter: one thread per broker that sets the gauges and engine-wide counters from the
//! broker's own counters every `report_interval`, and looks for a recorder.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use metrics::{Counter, Gauge, Key};

use super::MetricsConfig;
use super::recording::{EngineMetrics, Series, describe, recorder_installed, seconds};
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
            let epoch = self.next_epoch();
            let installed = recorder_installed();
            self.set_active(installed);
            if installed {
                let Some((stats, closed)) = source() else { return };
                handles.get_or_insert_with(|| EngineHandles::new(&self.config, epoch)).report(
                    epoch,
                    &stats,
                    closed,
                    self.take_folded(),
                );
            }
            match stop.recv_timeout(self.config.report_interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    // Looked for again: a recorder installed since the last report (its interval
                    // can be long) still gets the final one.
                    if (handles.is_some() || recorder_installed())
                        && let Some((stats, closed)) = source()
                    {
                        let epoch = self.next_epoch();
                        handles.get_or_insert_with(|| EngineHandles::new(&self.config, epoch)).report(
                            epoch,
                            &stats,
                            closed,
                            self.take_folded(),
                        );
                    }
                    return;
                }
            }
        }
    }
}

/// The engine-wide metrics' series, registered (at zero) with the first report.
struct EngineHandles {
    queue_size: Series<Gauge>,
    workers_active: Series<Gauge>,
    pending_retries: Series<Gauge>,
    awaiting_acks: Series<Gauge>,
    writer_backlog: Series<Gauge>,
    inbound_lag: Series<Gauge>,
    folded: Series<Counter>,
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
    fn new(config: &MetricsConfig, epoch: u64) -> Self {
        describe(config);
        let labels = config.constant_labels();
        let key = |n: &str| Key::from_parts(config.name(n), labels.clone());
        let gauge = |n: &str| Series::new(key(n), epoch);
        let counter = |n: &str| Series::new(key(n), epoch);
        let total = |n: &str| Total { counter: counter(n), reported: 0 };
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
    /// Sets every metric from `stats`, in report epoch `epoch`: each series is registered again
    /// as it is updated (see [`Series`]).
    fn report(&mut self, epoch: u64, stats: &BrokerStats, closed: bool, folded: u64) {
        let in_hand: u64 = stats.shards.iter().map(|s| s.in_hand).sum();
        self.queue_size.at(epoch).set(stats.queued as f64 + in_hand as f64);
        self.workers_active.at(epoch).set(if closed { 0.0 } else { stats.workers as f64 });
        self.pending_retries.at(epoch).set(stats.pending_retries as f64);
        self.awaiting_acks.at(epoch).set(stats.awaiting_acks as f64);
        self.writer_backlog.at(epoch).set(stats.writer.backlog as f64 + stats.writer.settle_backlog as f64);
        self.inbound_lag.at(epoch).set(seconds(stats.inbound.lag));
        if folded > 0 {
            self.folded.at(epoch).increment(folded);
        }
        self.rejected.to(epoch, stats.rejected);
        self.retries.to(epoch, stats.retries);
        self.handler_failures.to(epoch, stats.handler_failures);
        self.dead_letters.to(epoch, stats.dead_letters);
        self.unrouted.to(epoch, stats.unrouted);
        self.internal_errors.to(epoch, stats.internal_errors);
        self.writer_batches.to(epoch, stats.writer.batches);
        self.writer_errors.to(epoch, stats.writer.errors);
        self.writer_dropped.to(epoch, stats.writer.dropped);
        self.inbound_events.to(epoch, stats.inbound.fetched);
        self.inbound_fetch_errors.to(epoch, stats.inbound.fetch_errors);
    }
}

/// An engine-wide counter reported from the broker's running total: by increments, so that the
/// counters of brokers sharing a name and labels (one built after another, or side by side) add
/// up, as the per-type counters do, rather than the largest total hiding the others (an absolute
/// value is kept as a maximum).
struct Total {
    counter: Series<Counter>,
    /// The total reported so far.
    reported: u64,
}

impl Total {
    fn to(&mut self, epoch: u64, total: u64) {
        if total > self.reported {
            self.counter.at(epoch).increment(total - self.reported);
            self.reported = total;
        }
    }
}
