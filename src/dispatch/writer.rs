//! The provider writer: one thread per broker that turns stores, status changes and dead letters
//! into batched provider calls.
//!
//! ## Batching
//! Work is gathered until the batch holds [`WriterConfig::max_batch`] events (512 by default) or
//! [`WriterConfig::max_delay`] (1 ms) has passed since its first item, then written with at most
//! three calls, in this order: `store_batch`, `update_status_batch`, `store_dead_letters`. Status
//! changes of one event within a batch are merged into one update, so an event accepted and
//! completed within a millisecond costs one stored row and one update, not three writes.
//!
//! ## Ordering
//! An event's store is always sent before any of its status changes (the publisher sends it
//! before committing the ring slot the worker takes it from), and a batch writes stores before
//! statuses, so the provider never sees a status for an event it has not been given.
//!
//! ## Failures
//! A transient provider error ([`ProviderError::is_transient`]) keeps the batch and retries it
//! with exponential backoff (10 ms doubling to 1 s) while new work keeps arriving; nothing is
//! dropped. Memory stays bounded because publishers are admitted only while fewer than
//! [`WriterConfig::max_backlog`] stored events are unwritten; past that, `publish` reports
//! `Full`. A permanent error (invalid input, a closed provider) cannot be fixed by retrying:
//! the affected writes are logged, counted in [`WriterStats::dropped`], and reported to any
//! confirmed publisher waiting on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::error::{BrokerError, ProviderError, ProviderErrorKind};
use crate::provider::{DeadLetter, Provider, StatusUpdate};
use crate::{Event, EventId};

/// How the writer batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Most events (stores plus status changes) per batch.
    pub max_batch: usize,
    /// Longest time the first item of a batch waits before the batch is written.
    pub max_delay: Duration,
    /// Most stored events accepted but not yet written; publishing past it reports `Full`.
    pub max_backlog: usize,
}

impl Default for WriterConfig {
    /// 512 events or 1 ms per batch; a backlog of 65 536 events.
    fn default() -> Self {
        Self { max_batch: 512, max_delay: Duration::from_millis(1), max_backlog: 65_536 }
    }
}

/// What the writer has done, as counted by the writer thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches written (each is one to three provider calls).
    pub batches: u64,
    /// Events stored.
    pub stored: u64,
    /// Status updates written, after merging.
    pub status_updates: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Provider calls that failed (each failure of a retried batch counts).
    pub errors: u64,
    /// Writes given up after a permanent provider error.
    pub dropped: u64,
    /// Stored events accepted but not yet written.
    pub backlog: usize,
}

/// A waiting caller's answer channel.
pub(crate) type Reply = Sender<Result<(), ProviderError>>;

enum WriteOp {
    /// One event: the common case, without a `Vec` to allocate.
    StoreOne(Arc<Event>, Option<Reply>),
    Store(Vec<Arc<Event>>),
    Status(Vec<StatusUpdate>),
    DeadLetters(Vec<DeadLetter>),
    /// Write everything gathered so far now, then answer.
    Flush(Reply),
    /// Write everything, retrying until the deadline, then stop.
    Shutdown(Reply, Instant),
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    stored: AtomicU64,
    status_updates: AtomicU64,
    dead_letters: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// The broker's handle on its writer thread.
pub(crate) struct ProviderWriter {
    tx: Sender<WriteOp>,
    /// Stored events sent and not yet written. Incremented by publishers before sending,
    /// decremented by the writer after `store_batch` succeeds (or the store is dropped). Relaxed
    /// everywhere: it is an admission estimate; no memory is published through it.
    backlog: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    max_backlog: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ProviderWriter {
    pub(crate) fn spawn(
        provider: Arc<dyn Provider>,
        origin: Option<String>,
        config: WriterConfig,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let backlog = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let thread = WriterThread {
            provider,
            origin,
            rx,
            config,
            backlog: Arc::clone(&backlog),
            counters: Arc::clone(&counters),
            batch: Batch::default(),
        };
        let handle =
            std::thread::Builder::new().name("eventbroker-writer".into()).spawn(move || thread.run())?;
        Ok(Self { tx, backlog, counters, max_backlog: config.max_backlog, thread: Mutex::new(Some(handle)) })
    }

    /// Whether `n` more stored events fit in the backlog.
    pub(crate) fn has_room(&self, n: usize) -> bool {
        self.backlog.load(Ordering::Relaxed) + n <= self.max_backlog
    }

    /// Queues an event to store. The caller checked [`ProviderWriter::has_room`].
    pub(crate) fn store(&self, event: Arc<Event>) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        self.send(WriteOp::StoreOne(event, None));
    }

    /// Queues events to store. The caller checked [`ProviderWriter::has_room`].
    pub(crate) fn store_many(&self, events: Vec<Arc<Event>>) {
        self.backlog.fetch_add(events.len(), Ordering::Relaxed);
        self.send(WriteOp::Store(events));
    }

    /// Queues an event to store; the write's outcome is sent to `reply`.
    pub(crate) fn store_confirmed(&self, event: Arc<Event>, reply: Reply) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        self.send(WriteOp::StoreOne(event, Some(reply)));
    }

    pub(crate) fn status(&self, updates: Vec<StatusUpdate>) {
        if !updates.is_empty() {
            self.send(WriteOp::Status(updates));
        }
    }

    pub(crate) fn dead_letters(&self, letters: Vec<DeadLetter>) {
        if !letters.is_empty() {
            self.send(WriteOp::DeadLetters(letters));
        }
    }

    /// Writes everything queued so far and waits up to `timeout` for the outcome.
    pub(crate) fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        if self.tx.send(WriteOp::Flush(reply)).is_err() {
            return Err(BrokerError::Closed);
        }
        match outcome.recv_timeout(timeout) {
            Ok(result) => result.map_err(BrokerError::Provider),
            Err(RecvTimeoutError::Timeout) => Err(BrokerError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(BrokerError::Closed),
        }
    }

    /// Writes everything queued, stops the thread and waits for it, up to `timeout`. Returns the
    /// outcome of the final flush. Safe to call twice.
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<(), BrokerError> {
        let Some(handle) = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
        else {
            return Ok(());
        };
        let (reply, outcome) = crossbeam_channel::bounded(1);
        if self.tx.send(WriteOp::Shutdown(reply, Instant::now() + timeout)).is_err() {
            return Err(BrokerError::Closed);
        }
        let result = match outcome.recv_timeout(timeout) {
            Ok(result) => result.map_err(BrokerError::Provider),
            Err(RecvTimeoutError::Timeout) => return Err(BrokerError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(BrokerError::Closed),
        };
        let _ = handle.join();
        result
    }

    pub(crate) fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            stored: c.stored.load(Ordering::Relaxed),
            status_updates: c.status_updates.load(Ordering::Relaxed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            backlog: self.backlog.load(Ordering::Relaxed),
        }
    }

    fn send(&self, op: WriteOp) {
        // The writer outlives every sender except after a timed-out shutdown, when late work from
        // a worker still draining has nowhere to go; the shutdown report counts it as undelivered.
        if self.tx.send(op).is_err() {
            tracing::warn!("provider writer is stopped; a late write was discarded");
        }
    }
}

/// Work gathered for the next write.
#[derive(Default)]
struct Batch {
    stores: Vec<Arc<Event>>,
    store_replies: Vec<Reply>,
    /// Status changes merged per event; `order` keeps first-seen order for the provider call.
    statuses: HashMap<EventId, StatusUpdate>,
    order: Vec<EventId>,
    dead_letters: Vec<DeadLetter>,
    flush_replies: Vec<Reply>,
    /// When the first item arrived.
    opened: Option<Instant>,
}

impl Batch {
    fn len(&self) -> usize {
        self.stores.len() + self.statuses.len() + self.dead_letters.len()
    }

    fn has_writes(&self) -> bool {
        !(self.stores.is_empty() && self.statuses.is_empty() && self.dead_letters.is_empty())
    }

    fn add_status(&mut self, update: StatusUpdate) {
        match self.statuses.entry(update.id) {
            std::collections::hash_map::Entry::Occupied(mut merged) => merge(merged.get_mut(), update),
            std::collections::hash_map::Entry::Vacant(slot) => {
                self.order.push(update.id);
                slot.insert(update);
            }
        }
    }
}

/// Folds a later change of the same event into an earlier one: the later status and error win,
/// timestamps already known are kept unless the later change sets them.
fn merge(earlier: &mut StatusUpdate, later: StatusUpdate) {
    earlier.status = later.status;
    earlier.error = later.error;
    earlier.retry_count = earlier.retry_count.max(later.retry_count);
    earlier.processed_at = later.processed_at.or(earlier.processed_at);
    earlier.completed_at = later.completed_at.or(earlier.completed_at);
}

struct WriterThread {
    provider: Arc<dyn Provider>,
    /// The consumer group key stores are tagged with, when the broker takes part in delivery.
    origin: Option<String>,
    rx: Receiver<WriteOp>,
    config: WriterConfig,
    backlog: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    batch: Batch,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl WriterThread {
    fn run(mut self) {
        let mut backoff = FIRST_BACKOFF;
        let mut retry_at: Option<Instant> = None;
        // Set when asked to stop: who to answer, and until when a failing write is retried.
        let mut stopping: Option<(Reply, Instant)> = None;
        loop {
            let deadline = match (self.batch.opened, retry_at) {
                (_, Some(at)) => Some(at),
                (Some(opened), None) => Some(opened + self.config.max_delay),
                (None, None) => None,
            };
            let op = match deadline {
                None => self.rx.recv().ok(),
                Some(at) => match self.rx.recv_deadline(at) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        stopping.get_or_insert_with(orphan_stop);
                        None
                    }
                },
            };
            let mut urgent = false;
            if let Some(op) = op {
                urgent |= self.take(op, &mut stopping);
                // Drain what is already queued without waiting: this is where batches grow.
                while self.batch.len() < self.config.max_batch {
                    match self.rx.try_recv() {
                        Ok(op) => urgent |= self.take(op, &mut stopping),
                        Err(_) => break,
                    }
                }
            } else if deadline.is_none() {
                // Every sender is gone: write what is left and stop.
                stopping.get_or_insert_with(orphan_stop);
            }

            let now = Instant::now();
            let due = self.batch.len() >= self.config.max_batch
                || self.batch.opened.is_some_and(|opened| now >= opened + self.config.max_delay)
                || urgent
                || stopping.is_some();
            let retry_due = retry_at.is_none_or(|at| now >= at);
            if due && retry_due {
                match self.write() {
                    Ok(()) => {
                        backoff = FIRST_BACKOFF;
                        retry_at = None;
                    }
                    Err(error) => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%error, retry_in = ?backoff, "provider write failed; the batch is kept");
                        for reply in self.batch.flush_replies.drain(..) {
                            let _ = reply.send(Err(error.clone()));
                        }
                        retry_at = Some(now + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        if let Some((reply, until)) = stopping.take_if(|(_, until)| now + backoff > *until) {
                            tracing::error!(%error, ?until, "provider writer stopped with writes unwritten");
                            let _ = reply.send(Err(error));
                            return;
                        }
                    }
                }
            }
            if !self.batch.has_writes() {
                self.batch.opened = None;
                for reply in self.batch.flush_replies.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                if let Some((reply, _)) = stopping.take() {
                    let _ = reply.send(Ok(()));
                    return;
                }
            }
        }
    }

    /// Adds one operation to the batch; `true` when it asks for an immediate write.
    fn take(&mut self, op: WriteOp, stopping: &mut Option<(Reply, Instant)>) -> bool {
        self.batch.opened.get_or_insert_with(Instant::now);
        match op {
            WriteOp::StoreOne(event, reply) => {
                self.batch.stores.push(event);
                self.batch.store_replies.extend(reply);
                false
            }
            WriteOp::Store(events) => {
                self.batch.stores.extend(events);
                false
            }
            WriteOp::Status(updates) => {
                for update in updates {
                    self.batch.add_status(update);
                }
                false
            }
            WriteOp::DeadLetters(letters) => {
                self.batch.dead_letters.extend(letters);
                false
            }
            WriteOp::Flush(reply) => {
                self.batch.flush_replies.push(reply);
                true
            }
            WriteOp::Shutdown(reply, until) => {
                *stopping = Some((reply, until));
                true
            }
        }
    }

    /// Writes the batch part by part; a part that succeeds is cleared, so a retry redoes only
    /// what failed. Permanent failures drop their part with a log line.
    fn write(&mut self) -> Result<(), ProviderError> {
        let mut wrote = false;
        self.fold_statuses_into_stores();
        if !self.batch.stores.is_empty() {
            let result = self.provider.store_batch(&self.batch.stores, self.origin.as_deref());
            let n = self.batch.stores.len();
            let outcome = match settle(result, "store_batch", n, &self.counters) {
                Settled::Retry(error) => {
                    // Waiters learn of the failure now; the stores stay for the next attempt.
                    for reply in self.batch.store_replies.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                    return Err(error);
                }
                Settled::Written => {
                    self.counters.stored.fetch_add(n as u64, Ordering::Relaxed);
                    wrote = true;
                    Ok(())
                }
                Settled::Dropped(error) => Err(error),
            };
            // Counters settle before anyone waiting is answered, so they see them current.
            self.backlog.fetch_sub(n, Ordering::Relaxed);
            self.batch.stores.clear();
            for reply in self.batch.store_replies.drain(..) {
                let _ = reply.send(outcome.clone());
            }
        }
        if self.batch.statuses.is_empty() {
            self.batch.order.clear();
        } else {
            let updates: Vec<StatusUpdate> =
                self.batch.order.iter().filter_map(|id| self.batch.statuses.get(id).cloned()).collect();
            let result = self.provider.update_status_batch(&updates);
            match settle(result, "update_status_batch", updates.len(), &self.counters) {
                Settled::Written => {
                    self.counters.status_updates.fetch_add(updates.len() as u64, Ordering::Relaxed);
                    wrote = true;
                }
                Settled::Dropped(_) => {}
                Settled::Retry(error) => return Err(error),
            }
            self.batch.statuses.clear();
            self.batch.order.clear();
        }
        if !self.batch.dead_letters.is_empty() {
            let result = self.provider.store_dead_letters(&self.batch.dead_letters);
            let n = self.batch.dead_letters.len();
            match settle(result, "store_dead_letters", n, &self.counters) {
                Settled::Written => {
                    self.counters.dead_letters.fetch_add(n as u64, Ordering::Relaxed);
                    wrote = true;
                }
                Settled::Dropped(_) => {}
                Settled::Retry(error) => return Err(error),
            }
            self.batch.dead_letters.clear();
        }
        if wrote {
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A stop nobody waits for (every sender dropped): retried for a short grace period.
fn orphan_stop() -> (Reply, Instant) {
    (crossbeam_channel::bounded(1).0, Instant::now() + Duration::from_secs(5))
}

impl WriterThread {
    /// An event stored and updated within one batch is stored once, already updated: one
    /// provider call instead of two. The copy is made only when someone else still shares the
    /// event (a handler or a worker), which is the cost the provider would pay on update anyway.
    fn fold_statuses_into_stores(&mut self) {
        if self.batch.statuses.is_empty() {
            return;
        }
        for event in &mut self.batch.stores {
            if let Some(update) = self.batch.statuses.remove(&event.id) {
                update.apply_to(Arc::make_mut(event));
            }
        }
    }
}

enum Settled {
    Written,
    Retry(ProviderError),
    Dropped(ProviderError),
}

fn settle(result: Result<(), ProviderError>, what: &str, n: usize, counters: &Counters) -> Settled {
    match result {
        Ok(()) => Settled::Written,
        Err(error) if error.is_transient() => Settled::Retry(error),
        Err(error) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
            let closed = matches!(error.kind(), ProviderErrorKind::Closed);
            tracing::error!(%error, what, items = n, closed, "provider write failed permanently; the items are dropped");
            Settled::Dropped(error)
        }
    }
}
