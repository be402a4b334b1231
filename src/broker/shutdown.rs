//! Shutdown: stop fetching and accepting, drain, flush, acknowledge, close — all by a deadline.
//!
//! The order matters for "nothing lost": the inbound thread stops fetching first (what it holds
//! unplaced goes back to the group; in a work queue it goes on extending the claims of what the
//! shards hold until the workers are done), then intake closes and the rings drain through the
//! workers (retries due before the deadline run; later ones are dead-lettered, or given back when
//! inbound), then the writer writes every store, status, dead letter and acknowledgement, then the
//! inbound source and the provider close. Each wait is bounded by the one deadline; a provider that
//! hangs is left behind on a thread of its own and reported, never waited for past the deadline.
//!
//! Called from one of the broker's own workers (a handler calling `shutdown`, or dropping the last
//! handle), or from a handler that a synchronous publish or a redrive runs on the caller's thread,
//! shutdown cannot wait for that thread: it does what does not wait, returns a report marked
//! [`ShutdownReport::deferred`], and a thread of its own completes the rest.
//!
//! One shutdown runs; a call while it runs waits for it (up to the call's own deadline) without
//! holding anything the running one needs, and returns its report, marked
//! [`ShutdownReport::already_shut_down`]. A call from a thread the running shutdown waits for (a
//! handler again) returns at once.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::engine::Engine;

/// How closing the provider (or the inbound source) went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseOutcome {
    /// It closed.
    #[default]
    Closed,
    /// It returned an error (it counts as closed all the same).
    Failed(String),
    /// It had not returned by the deadline; it was left to finish on its own thread.
    TimedOut,
    /// Not closed: someone else still holds the provider (other brokers sharing it, or the
    /// application), and closes it when done with it; or the writer was still writing at the
    /// deadline ([`ShutdownReport::flush_error`] says so) and holds it until it is done.
    LeftOpen,
    /// Not attempted: shutdown completes in the background ([`ShutdownReport::deferred`]).
    Deferred,
}

/// What [`Broker::shutdown`](crate::Broker::shutdown) did. [`is_clean`](Self::is_clean) says
/// whether everything accepted was handled and written.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::Broker;
///
/// let broker = Broker::builder().build()?;
/// let report = broker.shutdown(Duration::from_secs(5));
/// assert!(report.is_clean(), "{report:?}");
/// assert!(broker.shutdown(Duration::from_secs(5)).already_shut_down);
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a shutdown that timed out may have left events unhandled or unwritten: check `is_clean()`"]
pub struct ShutdownReport {
    /// Events that were waiting in rings when shutdown began and were then handled.
    pub drained: u64,
    /// Retries that ran during shutdown: on workers, and on the threads of synchronous publishes
    /// and redrives.
    pub retries_run: u64,
    /// Retries not due before the deadline, and acknowledged deliveries not settled by it,
    /// dead-lettered instead (on workers, and on the threads of synchronous publishes and
    /// redrives): all of a local event's, and an inbound event's when another of its
    /// deliveries was dead-lettered already (it is not given back then).
    pub dead_lettered: u64,
    /// Inbound events given back to their group (unfinished retries or unsettled acknowledged
    /// deliveries, or fetched and not yet placed), to be redelivered to another member or this
    /// instance's next incarnation.
    pub returned: u64,
    /// Events accepted and never handled: in rings, or taken by a worker that had not begun them,
    /// when the deadline passed (0 unless `timed_out`). A worker still running then (see
    /// [`detached_workers`](Self::detached_workers)) begins none of them afterwards: those of other
    /// instances are redelivered by their group after its claim idle time, local ones are lost
    /// (their stored status stays `pending` or `processing`).
    pub undelivered: u64,
    /// Synchronous publishes and redrives still running at the deadline; their final statuses may
    /// be lost.
    pub sync_in_flight: u64,
    /// Workers still running at the deadline: in a handler that had not returned, or, after a
    /// timeout too short for what was left, still dead-lettering it. Each ends once that handler
    /// returns, without beginning another, and what it writes after the writer stopped is counted
    /// as [`WriterStats::late`](crate::WriterStats::late).
    pub detached_workers: usize,
    /// Whether the deadline passed before every worker, synchronous publish and the inbound thread
    /// finished.
    pub timed_out: bool,
    /// The final flush's failure: writes not written by the deadline, or given up after permanent
    /// errors since the last flush reported any.
    pub flush_error: Option<String>,
    /// How closing the provider went.
    pub provider_close: CloseOutcome,
    /// How long shutdown took.
    pub elapsed: Duration,
    /// `true` when another call shut the broker down, or was doing so, and this one did nothing.
    /// The report is then that shutdown's, once it ended; when it had not ended by this call's
    /// deadline, the report is not clean (`timed_out`), nor when this call came from a thread the
    /// running shutdown waits for (a handler: `deferred`, returned at once).
    pub already_shut_down: bool,
    /// `true` when shutdown was called on a thread it would wait for: one of the broker's own
    /// workers (a handler), or a handler that [`Broker::publish_sync`](crate::Broker::publish_sync)
    /// or [`Broker::redrive`](crate::Broker::redrive) runs on the caller's thread. Intake and
    /// fetching are stopped and the rings closed; draining, flushing and closing complete on a
    /// background thread (bounded by the same deadline), and the counts above are zero. A later
    /// call of `shutdown` (or the last handle's drop) waits for that thread and returns its report.
    pub deferred: bool,
}

impl ShutdownReport {
    /// Whether shutdown finished by its deadline with nothing left unhandled or unwritten. An
    /// event whose delivery failed and was dead-lettered counts as handled: its dead letter holds
    /// it (see [`Broker::dead_letters`](crate::Broker::dead_letters) and
    /// [`BrokerStats::dead_letters`](crate::BrokerStats::dead_letters)).
    pub fn is_clean(&self) -> bool {
        !self.timed_out
            && self.undelivered == 0
            && self.sync_in_flight == 0
            && self.detached_workers == 0
            && self.flush_error.is_none()
            && matches!(self.provider_close, CloseOutcome::Closed | CloseOutcome::LeftOpen)
    }
}

/// Whether shutdown has begun, and how it ended: one shutdown runs, and every other call returns
/// its report.
pub(crate) struct Stopping {
    phase: parking_lot::Mutex<Phase>,
    /// Signalled when the phase becomes [`Phase::Ended`].
    ended: parking_lot::Condvar,
}

enum Phase {
    Running,
    Begun,
    Ended(ShutdownReport),
}

impl Stopping {
    pub(crate) fn new() -> Self {
        Self { phase: parking_lot::Mutex::new(Phase::Running), ended: parking_lot::Condvar::new() }
    }

    fn end(&self, report: ShutdownReport) {
        *self.phase.lock() = Phase::Ended(report);
        self.ended.notify_all();
    }
}

thread_local! {
    /// The brokers whose calls this thread is inside of that shutdown waits for (see [`Busy`]).
    static BUSY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Marks the current thread, while held, as one that a shutdown of broker `engine` waits for: a
/// synchronous publish or a redrive running handlers on it, or shutdown's own completion (which
/// drops the handlers, and with them perhaps the last handle). A shutdown called on such a thread
/// (by a handler) never waits for it.
pub(crate) struct Busy {
    engine: u64,
}

impl Busy {
    // `try_with` throughout: the list is a thread-local with a destructor, and a handle kept in
    // another thread-local can be dropped, and shut its broker down, after the list is gone (a
    // panic there would abort the process). A thread whose locals are gone runs no handler.
    pub(crate) fn mark(engine: u64) -> Self {
        let _ = BUSY.try_with(|busy| busy.borrow_mut().push(engine));
        Self { engine }
    }

    pub(crate) fn here(engine: u64) -> bool {
        BUSY.try_with(|busy| busy.borrow().contains(&engine)).unwrap_or(false)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|busy| {
            let mut busy = busy.borrow_mut();
            if let Some(at) = busy.iter().rposition(|engine| *engine == self.engine) {
                busy.swap_remove(at);
            }
        });
    }
}

impl Engine {
    pub(crate) fn shutdown(self: &Arc<Self>, timeout: Duration) -> ShutdownReport {
        let started = Instant::now();
        let deadline = crate::deadline::after(started, timeout);
        let on_waited_thread = self.on_waited_thread();
        // What a call returns that does not complete a shutdown itself.
        let unfinished = || ShutdownReport {
            provider_close: CloseOutcome::Deferred,
            elapsed: started.elapsed(),
            ..ShutdownReport::default()
        };
        {
            let mut phase = self.shutdown.phase.lock();
            loop {
                match &*phase {
                    Phase::Running => break,
                    Phase::Ended(report) => {
                        return ShutdownReport { already_shut_down: true, ..report.clone() };
                    }
                    Phase::Begun if on_waited_thread => {
                        // The running shutdown waits for this thread: waiting for it would stall both.
                        return ShutdownReport { already_shut_down: true, deferred: true, ..unfinished() };
                    }
                    Phase::Begun => {
                        if self.shutdown.ended.wait_until(&mut phase, deadline).timed_out()
                            && !matches!(*phase, Phase::Ended(_))
                        {
                            return ShutdownReport {
                                already_shut_down: true,
                                timed_out: true,
                                ..unfinished()
                            };
                        }
                    }
                }
            }
            *phase = Phase::Begun;
        }
        if let Some(pump) = &self.inbound {
            pump.stop();
        }
        self.intake.close();
        let queued_at_start = self.shards.queued() as u64 + self.shards.in_hand();
        self.shared.shutdown.begin(started, deadline);
        self.shards.close();
        if on_waited_thread {
            let engine = Arc::clone(self);
            let spawned =
                std::thread::Builder::new().name(format!("eb-stop-{}", self.instance_id)).spawn(move || {
                    let report = engine.complete_shutdown(started, deadline, queued_at_start);
                    engine.shutdown.end(report);
                });
            let report = ShutdownReport { deferred: true, ..unfinished() };
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start the thread that completes a shutdown begun in a handler");
                // Nothing completes it: later calls must not take it for done.
                if let Some(pump) = &self.inbound {
                    pump.drained();
                }
                self.shutdown.end(ShutdownReport { timed_out: true, ..report.clone() });
            } else {
                tracing::info!(?report, "event broker shutting down from one of its own handlers");
            }
            return report;
        }
        let report = self.complete_shutdown(started, deadline, queued_at_start);
        self.shutdown.end(report.clone());
        report
    }

    /// The part of shutdown that waits: for the inbound thread, synchronous publishes, workers,
    /// the writer, the source and the provider, each until `deadline` at most.
    fn complete_shutdown(&self, started: Instant, deadline: Instant, queued_at_start: u64) -> ShutdownReport {
        // Dropping the handlers below may drop the last handle, whose shutdown must not wait for
        // this one.
        let _busy = Busy::mark(self.id);
        let mut backoff = crate::dispatch::backpressure::Backoff::new();
        while !self.intake.is_idle() && Instant::now() < deadline {
            if !backoff.snooze() {
                backoff.sleep();
            }
        }
        let sync_in_flight = self.intake.in_flight() as u64;
        let (reports, detached_workers) = self.shards.join(deadline);
        // The inbound thread, stopped, extended the claims of what the shards held until now.
        let inbound_exited = self.inbound.as_ref().is_none_or(|pump| {
            pump.drained();
            pump.join(deadline)
        });
        if detached_workers > 0 {
            // What the workers still running have not begun stays unhandled: counted below as
            // undelivered, it must not run after this report says so.
            self.shared.abandoned.store(true, Ordering::Relaxed);
        }
        let undelivered =
            if detached_workers == 0 { 0 } else { self.shards.queued() as u64 + self.shards.in_hand() };
        let flush = self.shared.writer.shutdown(deadline.saturating_duration_since(Instant::now()));
        if let Some(pump) = &self.inbound {
            let source = Arc::clone(pump.source());
            let outcome = close_bounded("eb-close-inbound", deadline, move || {
                source.close().map_err(|e| e.to_string())
            });
            if outcome != CloseOutcome::Closed {
                tracing::warn!(?outcome, "closing the inbound source did not go cleanly");
            }
        }
        // Shared providers (the in-process bus, or one the application keeps) stay open for the
        // others; the last holder closes it.
        let held_here = 1 + usize::from(self.shared.inline.is_some());
        let provider_close = if Arc::strong_count(&self.provider) == held_here {
            let provider = Arc::clone(&self.provider);
            close_bounded("eb-close-provider", deadline, move || provider.close().map_err(|e| e.to_string()))
        } else {
            CloseOutcome::LeftOpen
        };
        // Handlers (and whatever they captured, broker handles included) go now.
        self.shared.table.clear();
        // Its id is free for the next incarnation in this process, once nothing fetches under it:
        // an inbound thread left in a hung fetch keeps it until it returns.
        if let Some(claim) = self.claim.lock().take() {
            match &self.inbound {
                Some(pump) if !inbound_exited => pump.keep_until_exit(Box::new(claim)),
                _ => drop(claim),
            }
        }
        if let Some(metrics) = &self.metrics {
            // One last report: the drained queue, no workers.
            metrics.stop_reporter(deadline);
        }
        let returned = reports.iter().map(|r| r.returned_at_shutdown).sum::<u64>()
            + self.inbound.as_ref().map_or(0, |pump| pump.stats().returned);
        // Synchronous publishes and redrives count theirs as workers do; those still running at
        // the deadline are `sync_in_flight`.
        let on_callers = &self.sync.at_shutdown;
        let report = ShutdownReport {
            drained: queued_at_start.saturating_sub(undelivered),
            retries_run: reports.iter().map(|r| r.retries_run).sum::<u64>()
                + on_callers.retries_run.load(Ordering::Relaxed),
            dead_lettered: reports.iter().map(|r| r.dead_lettered_at_shutdown).sum::<u64>()
                + on_callers.dead_lettered.load(Ordering::Relaxed),
            returned,
            undelivered,
            sync_in_flight,
            detached_workers,
            timed_out: detached_workers > 0 || sync_in_flight > 0 || !inbound_exited,
            flush_error: flush.err().map(|e| e.to_string()),
            provider_close,
            elapsed: started.elapsed(),
            already_shut_down: false,
            deferred: false,
        };
        if report.is_clean() {
            tracing::info!(?report, "event broker shut down");
        } else {
            tracing::warn!(?report, "event broker shut down, not cleanly");
        }
        report
    }
}

/// Runs `close` on a thread of its own and waits for it until `deadline`; a close that hangs is
/// left to finish there.
fn close_bounded(
    name: &str,
    deadline: Instant,
    close: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> CloseOutcome {
    let (done, outcome) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let _ = done.send(close());
    });
    if let Err(error) = spawned {
        return CloseOutcome::Failed(format!("cannot start a thread to close on: {error}"));
    }
    match outcome.recv_deadline(deadline) {
        Ok(Ok(())) => CloseOutcome::Closed,
        Ok(Err(error)) => CloseOutcome::Failed(error),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => CloseOutcome::TimedOut,
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            CloseOutcome::Failed("the provider panicked while closing".to_owned())
        }
    }
}
