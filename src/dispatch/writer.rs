//! The provider writer: one thread per broker that turns stores, status changes, dead letters and
//! the acknowledgements of inbound events into batched provider calls.
//!
//! A provider whose writes are cheap in-process work ([`Capabilities::inline_writes`], the memory
//! provider) is not written through this thread: publishers store their events and workers write
//! status changes inline, as events go, so no event waits for one thread. Dead letters and
//! acknowledgements still come here, where their order is kept, and failures of inline writes are
//! counted and reported here like the writer's own.
//!
//! [`Capabilities::inline_writes`]: crate::Capabilities::inline_writes
//!
//! ## Batching
//! Work is gathered until the batch holds [`WriterConfig::max_batch`] items (512 by default) or
//! [`WriterConfig::max_delay`] (1 ms) has passed since its first item, then written in this order:
//! `store_batch`, `update_status_batch`, `store_dead_letters`, then the inbound source's `ack`,
//! `nak` and `extend`. Status changes of one event within a batch are merged into one update, so an
//! event accepted and completed within a millisecond costs one stored row, not three writes.
//!
//! ## Ordering
//! An event's store is always sent before any of its status changes (the publisher sends it
//! before committing the ring slot the worker takes it from), and a batch writes stores before
//! statuses, so the provider never sees a status for an event it has not been given. An inbound
//! event's acknowledgement is written after its dead letters are stored: if they cannot be stored,
//! the event is given back (`nak`) instead, to be redelivered — nothing is lost.
//!
//! ## Failures
//! A transient provider error ([`ProviderError::is_transient`]) keeps the batch and retries it with
//! exponential backoff (10 ms doubling to 1 s) while new work keeps arriving; nothing is dropped. A
//! shutdown tries again at once, and from then on as often as at an outage's start, until its
//! deadline. A permanent refusal of a batch that may be one item's (an event a backend cannot hold,
//! say a PostgreSQL row's timestamp before 1677) is narrowed down by writing each half again, so
//! that the bad items are given up alone, not the up to `max_batch` others written with them; at
//! most 64 calls more a batch part. Memory stays bounded: publishers are admitted only while fewer
//! than [`WriterConfig::max_backlog`] stored events are unwritten (past that, publishing reports
//! `Full`), and workers take new events from their rings only while fewer than as many status
//! changes, dead letters and acknowledgements are unwritten (past that, the rings fill and
//! publishing reports `Full` too; the inbound thread stops fetching). A worker may hand over what
//! it has in hand past the bound, so it holds within a batch per worker. A permanent error (invalid
//! input, a closed provider, a panic inside the provider) cannot be fixed by retrying: the writes
//! it still affects once narrowed down are logged, counted in [`WriterStats::dropped`], reported to
//! any confirmed publisher waiting on them, and reported by the next flush. A provider that panics
//! is caught; the writer thread never dies of it. A provider that hangs holds the writer, but not
//! the broker: the backlog bound turns into `Full` for publishers, and shutdown stops waiting at
//! its deadline.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::dispatch::delivery::{self, Outbox};
use crate::error::{BrokerError, ProviderError, ProviderErrorKind};
use crate::provider::{Ack, AckToken, DeadLetter, DeadLetterId, Inbound, Provider, StatusUpdate};
use crate::{Event, EventId};

/// How the writer batches.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::WriterConfig;
///
/// let config = WriterConfig { max_delay: Duration::from_millis(5), ..WriterConfig::default() };
/// assert_eq!((config.max_batch, config.max_backlog), (512, 65_536));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Most items (stores, status changes, dead letters, acknowledgements) per batch.
    pub max_batch: usize,
    /// Longest time the first item of a batch waits before the batch is written.
    pub max_delay: Duration,
    /// Most stored events accepted but not yet written; publishing past it reports `Full`. Also
    /// the most status changes, dead letters and acknowledgements unwritten before workers stop
    /// taking new events (see [`WriterStats::settle_backlog`]).
    pub max_backlog: usize,
}

impl Default for WriterConfig {
    /// 512 items or 1 ms per batch; a backlog of 65 536 events.
    fn default() -> Self {
        Self { max_batch: 512, max_delay: Duration::from_millis(1), max_backlog: 65_536 }
    }
}

/// What the writer has done, as counted by the writer thread. Writes a provider takes inline (see
/// the module docs) are not counted here, except when they fail: the provider's own stats count
/// them. So with the memory provider, whose stores and status changes the publishing and worker
/// threads write themselves, `stored` and `status_updates` stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Batches written (each is one to six provider calls).
    pub batches: u64,
    /// Events stored.
    pub stored: u64,
    /// Status updates written, after merging.
    pub status_updates: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Inbound events acknowledged.
    pub acks: u64,
    /// Inbound events given back for redelivery (unfinished at shutdown, or whose dead letters
    /// could not be stored).
    pub naks: u64,
    /// Claim extensions of inbound events waiting for retries.
    pub extends: u64,
    /// Provider calls that failed (each failure of a retried batch counts).
    pub errors: u64,
    /// Writes given up after a permanent provider error.
    pub dropped: u64,
    /// Provider calls that panicked (caught; counted in `errors` and `dropped` too).
    pub panics: u64,
    /// Writes that arrived after the writer had stopped (a shutdown that timed out), discarded.
    pub late: u64,
    /// Stored events accepted but not yet written.
    pub backlog: usize,
    /// Status changes, dead letters and acknowledgements (acks, naks, extensions) handed to the
    /// writer and not yet written. While it is at [`WriterConfig::max_backlog`], workers take no
    /// new events (a worker hands over what it has in hand, so it can pass the bound by a batch
    /// per worker).
    pub settle_backlog: usize,
}

/// A waiting caller's answer channel: flume's, which async callers can await
/// (`Broker::publish_confirmed_when_room`).
pub(crate) type Reply = flume::Sender<Result<(), ProviderError>>;

/// What workers and caller-thread deliveries settle in one go: it lands in one batch, so an
/// event's acknowledgement is never written before its dead letters.
struct Settlement {
    statuses: Vec<StatusUpdate>,
    dead_letters: Vec<DeadLetter>,
    letter_tokens: Vec<(DeadLetterId, AckToken)>,
    acks: Vec<Ack>,
    naks: Vec<AckToken>,
    extends: Vec<AckToken>,
}

impl Settlement {
    /// Its items, as counted in the writer's settle backlog.
    fn len(&self) -> usize {
        self.statuses.len() + self.dead_letters.len() + self.acks.len() + self.naks.len() + self.extends.len()
    }
}

enum WriteOp {
    /// One event: the common case, without a `Vec` to allocate.
    StoreOne(Arc<Event>, Option<Reply>),
    Store(Vec<Arc<Event>>),
    Status(Vec<StatusUpdate>),
    Settle(Settlement),
    /// Write everything gathered so far now, then answer; `true` to be told of writes given up
    /// (which then count as reported).
    Flush(Sender<Result<(), BrokerError>>, bool),
    /// Write everything, retrying until the deadline, then stop.
    Shutdown(Sender<Result<(), BrokerError>>, Instant),
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    stored: AtomicU64,
    status_updates: AtomicU64,
    dead_letters: AtomicU64,
    acks: AtomicU64,
    naks: AtomicU64,
    extends: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    panics: AtomicU64,
    late: AtomicU64,
}

/// Writes given up since a flush last reported any: how many, and the last error. Shared by the
/// writer thread and the threads that write inline.
type Unreported = Arc<parking_lot::Mutex<Option<(u64, ProviderError)>>>;

/// The broker's handle on its writer thread.
pub(crate) struct ProviderWriter {
    tx: Sender<WriteOp>,
    provider_name: &'static str,
    unreported: Unreported,
    /// Stored events admitted and not yet written. Raised by publishers' admission before sending,
    /// lowered by the writer after `store_batch` settles. Relaxed everywhere: it is an admission
    /// count; no memory is published through it.
    backlog: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    /// Status changes, dead letters and acknowledgements handed over and not yet written: raised
    /// by the threads that hand them over, lowered by the writer as each part of a batch settles.
    /// Relaxed, like `backlog`.
    settle_backlog: Arc<AtomicUsize>,
    max_backlog: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ProviderWriter {
    /// Starts the writer thread. `origin` tags every store (the broker's consumer group key, when
    /// it takes part in delivery); `inbound` receives the acknowledgements.
    pub(crate) fn spawn(
        provider: Arc<dyn Provider>,
        inbound: Option<Arc<dyn Inbound>>,
        origin: Option<String>,
        config: WriterConfig,
        held: Option<HeldInbound>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let backlog = Arc::new(AtomicUsize::new(0));
        let settle_backlog = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let unreported = Unreported::default();
        let provider_name = provider.name();
        let thread = WriterThread {
            provider,
            inbound,
            held,
            origin,
            rx,
            config,
            backlog: Arc::clone(&backlog),
            settle_backlog: Arc::clone(&settle_backlog),
            counters: Arc::clone(&counters),
            batch: Batch::default(),
            poisoned: HashSet::new(),
            unreported: Arc::clone(&unreported),
            backoff: FIRST_BACKOFF,
            retry_at: None,
            stopping: None,
        };
        let handle =
            std::thread::Builder::new().name("eventbroker-writer".into()).spawn(move || thread.run())?;
        Ok(Self {
            tx,
            provider_name,
            unreported,
            backlog,
            counters,
            settle_backlog,
            max_backlog: config.max_backlog,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Admits up to `n` more stored events into the backlog; returns how many (0 when full). Each
    /// admitted event must then be sent with `store*`, or given back with [`release`](Self::release).
    pub(crate) fn try_admit(&self, n: usize) -> usize {
        // Relaxed: see `backlog`.
        let mut current = self.backlog.load(Ordering::Relaxed);
        loop {
            let take = self.max_backlog.saturating_sub(current).min(n);
            if take == 0 {
                return 0;
            }
            match self.backlog.compare_exchange_weak(
                current,
                current + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => current = now,
            }
        }
    }

    /// Gives back `n` admitted events that will not be sent after all.
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.backlog.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Whether the writer has room for more status changes, dead letters and acknowledgements:
    /// workers (and the inbound thread) take new events only while it has.
    #[inline]
    pub(crate) fn has_settle_room(&self) -> bool {
        // Relaxed: see `settle_backlog`.
        self.settle_backlog.load(Ordering::Relaxed) < self.max_backlog
    }

    /// Queues an admitted event to store.
    pub(crate) fn store(&self, event: Arc<Event>) {
        self.send(WriteOp::StoreOne(event, None), 1, 0);
    }

    /// Queues admitted events to store.
    pub(crate) fn store_many(&self, events: Vec<Arc<Event>>) {
        let n = events.len();
        if n > 0 {
            self.send(WriteOp::Store(events), n, 0);
        }
    }

    /// Queues an admitted event to store; the write's outcome is sent to `reply`.
    pub(crate) fn store_confirmed(&self, event: Arc<Event>, reply: Reply) {
        self.send(WriteOp::StoreOne(event, Some(reply)), 1, 0);
    }

    pub(crate) fn status(&self, updates: Vec<StatusUpdate>) {
        if !updates.is_empty() {
            let n = updates.len();
            self.send(WriteOp::Status(updates), 0, n);
        }
    }

    /// Takes what `outbox` has for the writer (statuses, dead letters, acknowledgements), leaving
    /// its counts.
    pub(crate) fn settle(&self, outbox: &mut Outbox) {
        let empty = outbox.statuses.is_empty()
            && outbox.dead_letters.is_empty()
            && outbox.acks.is_empty()
            && outbox.naks.is_empty()
            && outbox.extends.is_empty();
        if empty {
            // Nothing to send: the outbox keeps its buffers for the next turn.
            return;
        }
        let settlement = Settlement {
            statuses: outbox.take_statuses(),
            dead_letters: std::mem::take(&mut outbox.dead_letters),
            letter_tokens: std::mem::take(&mut outbox.letter_tokens),
            acks: std::mem::take(&mut outbox.acks),
            naks: std::mem::take(&mut outbox.naks),
            extends: std::mem::take(&mut outbox.extends),
        };
        let n = settlement.len();
        self.send(WriteOp::Settle(settlement), 0, n);
    }

    /// Writes everything queued so far and waits up to `timeout` for the outcome.
    ///
    /// `Ok` means every write queued before the call is with the provider, and no write was given
    /// up since the previous flush reported one: a flush reports each write given up once.
    pub(crate) fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.flush_inner(timeout, true)
    }

    /// Writes everything queued so far, so reads through the provider see it; does not report
    /// (nor count as reporting) writes given up, which are the user's flush's to report.
    pub(crate) fn flush_for_read(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.flush_inner(timeout, false)
    }

    fn flush_inner(&self, timeout: Duration, report: bool) -> Result<(), BrokerError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        if self.tx.send(WriteOp::Flush(reply, report)).is_err() {
            return Err(BrokerError::Closed);
        }
        match outcome.recv_deadline(crate::deadline::from_now(timeout)) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(BrokerError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(BrokerError::Closed),
        }
    }

    /// Writes everything queued, stops the thread and waits for it, up to `timeout`. Returns the
    /// outcome of the final flush (a write given up and not yet reported makes it fail). Safe to
    /// call twice. On timeout the thread is left to finish on its own.
    pub(crate) fn shutdown(&self, timeout: Duration) -> Result<(), BrokerError> {
        let Some(handle) = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
        else {
            return Ok(());
        };
        let deadline = crate::deadline::from_now(timeout);
        let (reply, outcome) = crossbeam_channel::bounded(1);
        if self.tx.send(WriteOp::Shutdown(reply, deadline)).is_err() {
            return Err(BrokerError::Closed);
        }
        let result = match outcome.recv_deadline(deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => return Err(BrokerError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(BrokerError::Closed),
        };
        let _ = handle.join();
        result
    }

    pub(crate) fn stats(&self) -> WriterStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStats {
            batches: load(&c.batches),
            stored: load(&c.stored),
            status_updates: load(&c.status_updates),
            dead_letters: load(&c.dead_letters),
            acks: load(&c.acks),
            naks: load(&c.naks),
            extends: load(&c.extends),
            errors: load(&c.errors),
            dropped: load(&c.dropped),
            panics: load(&c.panics),
            late: load(&c.late),
            backlog: self.backlog.load(Ordering::Relaxed),
            settle_backlog: self.settle_backlog.load(Ordering::Relaxed),
        }
    }

    /// Runs one provider call on the calling thread (an inline write), catching a panic; a failure
    /// is counted and reported like the writer's own, by the next flush.
    pub(crate) fn inline<T>(
        &self,
        operation: &'static str,
        items: usize,
        f: impl FnOnce() -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let result = guarded(self.provider_name, operation, &self.counters, f);
        if let Err(error) = &result {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            self.counters.dropped.fetch_add(items as u64, Ordering::Relaxed);
            tracing::error!(%error, operation, items, "an inline provider write failed; the items are dropped");
            record_drop(&self.unreported, items, error);
        }
        result
    }

    /// Sends `op`, which carries `stores` admitted events and `settles` status changes, dead letters
    /// and acknowledgements.
    fn send(&self, op: WriteOp, stores: usize, settles: usize) {
        if settles > 0 {
            // Before the send: the writer lowers it once it has written them.
            self.settle_backlog.fetch_add(settles, Ordering::Relaxed);
        }
        // The writer outlives every sender except after a timed-out shutdown, when late work from
        // a worker still draining has nowhere to go: it is counted, and the report says so.
        if self.tx.send(op).is_err() {
            self.release(stores);
            if settles > 0 {
                self.settle_backlog.fetch_sub(settles, Ordering::Relaxed);
            }
            self.counters.late.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("provider writer is stopped; a late write was discarded");
        }
    }
}

/// In a work queue, the tokens of the inbound events a broker holds: fetched and not yet given
/// back, or acknowledged and the acknowledgement not yet written. The inbound thread extends their
/// claims (see `InboundPump`); the writer lets go of each once its acknowledgement is written, as
/// the event is this member's until then.
pub(crate) type HeldInbound = Arc<parking_lot::Mutex<HashSet<AckToken>>>;

/// Work gathered for the next write.
#[derive(Default)]
struct Batch {
    stores: Vec<Arc<Event>>,
    /// Confirmed publishers waiting, each on its event's store.
    store_replies: Vec<(EventId, Reply)>,
    /// Status changes merged per event; `order` keeps first-seen order for the provider call.
    statuses: HashMap<EventId, StatusUpdate>,
    order: Vec<EventId>,
    dead_letters: Vec<DeadLetter>,
    letter_tokens: Vec<(DeadLetterId, AckToken)>,
    acks: Vec<Ack>,
    naks: Vec<AckToken>,
    extends: Vec<AckToken>,
    /// The tokens in `extends`: a worker asks again every `claim_idle / 3` for each job it still
    /// holds, and while an earlier part of the batch is refused its asks would pile up.
    extending: HashSet<AckToken>,
    /// Flushes waiting, and whether each wants writes given up reported.
    flush_replies: Vec<(Sender<Result<(), BrokerError>>, bool)>,
    /// When the first item arrived.
    opened: Option<Instant>,
}

impl Batch {
    fn len(&self) -> usize {
        self.stores.len()
            + self.statuses.len()
            + self.dead_letters.len()
            + self.acks.len()
            + self.naks.len()
            + self.extends.len()
    }

    fn has_writes(&self) -> bool {
        self.len() > 0
    }

    /// Adds a status change, merged into an earlier one of the same event; `true` when merged,
    /// so that it holds no room of its own.
    fn add_status(&mut self, update: StatusUpdate) -> bool {
        match self.statuses.entry(update.id) {
            std::collections::hash_map::Entry::Occupied(mut merged) => {
                merge(merged.get_mut(), update);
                true
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                self.order.push(update.id);
                slot.insert(update);
                false
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

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long an inbound event whose dead letters could not be stored waits before it is redelivered.
const WITHHELD_ACK_REDELIVERY: Duration = Duration::from_secs(1);

struct WriterThread {
    provider: Arc<dyn Provider>,
    inbound: Option<Arc<dyn Inbound>>,
    /// The tokens whose claims the inbound thread extends, in a work queue: an acknowledged one
    /// leaves once its acknowledgement is written (or given up).
    held: Option<HeldInbound>,
    /// The consumer group key stores are tagged with, when the broker takes part in delivery.
    origin: Option<String>,
    rx: Receiver<WriteOp>,
    config: WriterConfig,
    backlog: Arc<AtomicUsize>,
    settle_backlog: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    batch: Batch,
    /// Inbound events whose dead letters were given up: their acks become naks.
    poisoned: HashSet<AckToken>,
    /// The last write given up since a flush reported one, and how many were.
    unreported: Unreported,
    backoff: Duration,
    /// When a failed batch may be tried again.
    retry_at: Option<Instant>,
    /// Set when asked to stop: who to answer, and until when a failing write is retried.
    stopping: Option<(Sender<Result<(), BrokerError>>, Instant)>,
}

/// Whether the writer goes on after a step.
enum Step {
    Continue,
    Stop,
}

impl WriterThread {
    fn run(mut self) {
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.step())) {
                Ok(Step::Continue) => {}
                Ok(Step::Stop) => return,
                Err(payload) => {
                    let message = delivery::panic_message(&*payload);
                    delivery::drop_contained(payload);
                    self.counters.panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%message, "the provider writer caught a panic; it carries on");
                }
            }
        }
    }

    /// Waits for work (or a due write), gathers what is queued, and writes when the batch is due.
    fn step(&mut self) -> Step {
        let deadline = match (self.batch.opened, self.retry_at) {
            (_, Some(at)) => Some(at),
            (Some(opened), None) => Some(crate::deadline::after(opened, self.config.max_delay)),
            (None, None) => None,
        };
        let op = match deadline {
            None => self.rx.recv().ok(),
            Some(at) => match self.rx.recv_deadline(at) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.stopping.get_or_insert_with(orphan_stop);
                    None
                }
            },
        };
        let mut urgent = false;
        if let Some(op) = op {
            urgent |= self.take(op);
            // Drain what is already queued without waiting: this is where batches grow.
            while self.batch.len() < self.config.max_batch {
                match self.rx.try_recv() {
                    Ok(op) => urgent |= self.take(op),
                    Err(_) => break,
                }
            }
        } else if deadline.is_none() {
            // Every sender is gone: write what is left and stop.
            self.stopping.get_or_insert_with(orphan_stop);
        }

        let now = Instant::now();
        let due = self.batch.len() >= self.config.max_batch
            || self
                .batch
                .opened
                .is_some_and(|opened| now >= crate::deadline::after(opened, self.config.max_delay))
            || urgent
            || self.stopping.is_some();
        let retry_due = self.retry_at.is_none_or(|at| now >= at);
        if due && retry_due {
            match self.write() {
                Ok(()) => {
                    self.backoff = FIRST_BACKOFF;
                    self.retry_at = None;
                }
                Err(error) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?self.backoff, "provider write failed; the batch is kept");
                    for (reply, _) in self.batch.flush_replies.drain(..) {
                        let _ = reply.send(Err(BrokerError::Provider(error.clone())));
                    }
                    let next_try = crate::deadline::after(now, self.backoff);
                    self.retry_at = Some(next_try);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    // A stopping writer tries again as long as the next try comes by its deadline.
                    if let Some((reply, until)) = self.stopping.take_if(|(_, until)| next_try > *until) {
                        tracing::error!(%error, ?until, "provider writer stopped with writes unwritten");
                        let _ = reply.send(Err(BrokerError::Provider(error)));
                        return Step::Stop;
                    }
                }
            }
        }
        if !self.batch.has_writes() {
            self.batch.opened = None;
            let replies = std::mem::take(&mut self.batch.flush_replies);
            let stop = self.stopping.take();
            if !replies.is_empty() || stop.is_some() {
                let reporting = stop.is_some() || replies.iter().any(|(_, report)| *report);
                let outcome = if reporting { self.report() } else { Ok(()) };
                // A report goes once, to whoever still waits: callers whose flush timed out have
                // gone, and if none is left it stays for the next flush.
                let mut reported = false;
                for (reply, report) in replies {
                    let sent = reply.send(if report { outcome.clone() } else { Ok(()) }).is_ok();
                    reported |= report && sent;
                }
                if let Some((reply, _)) = &stop {
                    reported |= reply.send(outcome.clone()).is_ok();
                }
                if let (false, Err(BrokerError::WritesDropped { dropped, error })) = (reported, outcome) {
                    self.keep_report(dropped, error);
                }
                if stop.is_some() {
                    return Step::Stop;
                }
            }
        }
        Step::Continue
    }

    /// Puts back a report nobody received, merged with what was given up since.
    fn keep_report(&self, dropped: u64, error: ProviderError) {
        let mut unreported = self.unreported.lock();
        *unreported = Some(match unreported.take() {
            Some((since, latest)) => (dropped + since, latest),
            None => (dropped, error),
        });
    }

    /// A flush's answer: the writes given up since a flush last reported them, once.
    fn report(&mut self) -> Result<(), BrokerError> {
        match self.unreported.lock().take() {
            None => Ok(()),
            Some((dropped, error)) => Err(BrokerError::WritesDropped { dropped, error }),
        }
    }

    /// Adds one operation to the batch; `true` when it asks for an immediate write.
    fn take(&mut self, op: WriteOp) -> bool {
        self.batch.opened.get_or_insert_with(Instant::now);
        let batch = &mut self.batch;
        // Status changes merged into one already held, and extensions already asked for, take no
        // room of their own.
        let mut merged = 0;
        match op {
            WriteOp::StoreOne(event, reply) => {
                batch.store_replies.extend(reply.map(|reply| (event.id, reply)));
                batch.stores.push(event);
            }
            WriteOp::Store(events) => batch.stores.extend(events),
            WriteOp::Status(updates) => {
                for update in updates {
                    merged += usize::from(batch.add_status(update));
                }
            }
            WriteOp::Settle(settlement) => {
                for update in settlement.statuses {
                    merged += usize::from(batch.add_status(update));
                }
                batch.dead_letters.extend(settlement.dead_letters);
                batch.letter_tokens.extend(settlement.letter_tokens);
                batch.acks.extend(settlement.acks);
                batch.naks.extend(settlement.naks);
                for token in settlement.extends {
                    if batch.extending.insert(token) {
                        batch.extends.push(token);
                    } else {
                        // Already asked for in this batch: it takes no room of its own.
                        merged += 1;
                    }
                }
            }
            WriteOp::Flush(reply, report) => {
                batch.flush_replies.push((reply, report));
                return true;
            }
            WriteOp::Shutdown(reply, until) => {
                self.stopping = Some((reply, until));
                // A failing batch's next try may lie past the deadline, after a long outage: a
                // stop tries at once, and then as often as at the outage's start, so that a
                // provider back by now gets every write before the broker stops.
                if self.retry_at.is_some() {
                    self.retry_at = Some(Instant::now());
                    self.backoff = FIRST_BACKOFF;
                }
                return true;
            }
        }
        self.settled_items(merged);
        false
    }

    /// Runs one provider call, turning a panic inside it into a permanent error.
    fn call<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce() -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        guarded(self.provider.name(), operation, &self.counters, f)
    }

    /// Settles a call's outcome: counted when written, kept for a retry when transient, given up
    /// (counted, logged, remembered for the next flush) when permanent.
    fn settle(&mut self, result: Result<(), ProviderError>, what: &'static str, n: usize) -> Settled {
        match result {
            Ok(()) => Settled::Written,
            Err(error) if error.is_transient() => Settled::Retry(error),
            Err(error) => {
                self.give_up(&error, what, n);
                Settled::Dropped
            }
        }
    }

    /// Counts, logs and remembers for the next flush `n` items of `what` given up with `error`.
    fn give_up(&self, error: &ProviderError, what: &'static str, n: usize) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
        let closed = matches!(error.kind(), ProviderErrorKind::Closed);
        tracing::error!(%error, what, items = n, closed, "provider write failed permanently; the items are dropped");
        record_drop(&self.unreported, n, error);
    }

    /// Writes a part of the batch with `write`, isolating what the provider refuses (see
    /// [`isolate`]): gives up only the items refused alone, and returns them, each run of them
    /// with its error. A transient error leaves the whole part for the next attempt, with nothing
    /// given up or counted yet.
    fn write_part<T>(
        &self,
        what: &'static str,
        items: &[T],
        write: impl Fn(&[T]) -> Result<(), ProviderError>,
    ) -> Result<Vec<Refused>, ProviderError> {
        let (mut refused, mut budget) = (Vec::new(), ISOLATION_CALLS);
        let mut call = |part: &[T]| self.call(what, || write(part));
        isolate(items, 0, &mut call, &mut budget, &mut refused)?;
        for (range, error) in &refused {
            self.give_up(error, what, range.len());
        }
        Ok(refused)
    }

    /// Writes the batch part by part; a part that succeeds is cleared, so a retry redoes only
    /// what failed. Permanent failures drop their part.
    fn write(&mut self) -> Result<(), ProviderError> {
        let mut wrote = false;
        self.fold_statuses_into_stores();
        if !self.batch.stores.is_empty() {
            let n = self.batch.stores.len();
            let written = self.write_part("store_batch", &self.batch.stores, |part| {
                self.provider.store_batch(part, self.origin.as_deref())
            });
            let refused = match written {
                Ok(refused) => refused,
                Err(error) => {
                    // Waiters learn of the failure now; the stores stay for the next attempt.
                    for (_, reply) in self.batch.store_replies.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                    return Err(error);
                }
            };
            let stored = n - refused.iter().map(|(range, _)| range.len()).sum::<usize>();
            if stored > 0 {
                self.counters.stored.fetch_add(stored as u64, Ordering::Relaxed);
                wrote = true;
            }
            let errors: HashMap<EventId, &ProviderError> = refused
                .iter()
                .flat_map(|(range, error)| {
                    self.batch.stores[range.clone()].iter().map(move |e| (e.id, error))
                })
                .collect();
            // Counters settle before anyone waiting is answered, so they see them current.
            self.backlog.fetch_sub(n, Ordering::Relaxed);
            for (id, reply) in self.batch.store_replies.drain(..) {
                let _ = reply.send(errors.get(&id).map_or(Ok(()), |error| Err((*error).clone())));
            }
            self.batch.stores.clear();
        }
        if self.batch.statuses.is_empty() {
            self.batch.order.clear();
        } else {
            let updates: Vec<StatusUpdate> =
                self.batch.order.iter().filter_map(|id| self.batch.statuses.get(id).cloned()).collect();
            let refused = self.write_part("update_status_batch", &updates, |part| {
                self.provider.update_status_batch(part)
            })?;
            let written = updates.len() - refused.iter().map(|(range, _)| range.len()).sum::<usize>();
            if written > 0 {
                self.counters.status_updates.fetch_add(written as u64, Ordering::Relaxed);
                wrote = true;
            }
            self.settled_items(self.batch.statuses.len());
            self.batch.statuses.clear();
            self.batch.order.clear();
        }
        if !self.batch.dead_letters.is_empty() {
            let n = self.batch.dead_letters.len();
            let refused = self.write_part("store_dead_letters", &self.batch.dead_letters, |part| {
                self.provider.store_dead_letters(part)
            })?;
            let lost: HashSet<DeadLetterId> = refused
                .iter()
                .flat_map(|(range, _)| self.batch.dead_letters[range.clone()].iter().map(|letter| letter.id))
                .collect();
            if lost.len() < n {
                self.counters.dead_letters.fetch_add((n - lost.len()) as u64, Ordering::Relaxed);
                wrote = true;
            }
            let poisoned = self.batch.letter_tokens.iter().filter(|(letter, _)| lost.contains(letter));
            self.poisoned.extend(poisoned.map(|(_, token)| *token));
            self.batch.dead_letters.clear();
            self.settled_items(n);
        }
        self.batch.letter_tokens.clear();
        wrote |= self.write_acknowledgements()?;
        if wrote {
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the acks, naks and extensions of inbound events, after everything they depend on.
    /// An ack whose event's dead letters were given up becomes a nak: the event comes back rather
    /// than being lost.
    fn write_acknowledgements(&mut self) -> Result<bool, ProviderError> {
        let Some(inbound) = self.inbound.clone() else {
            self.settled_items(self.batch.acks.len() + self.batch.naks.len() + self.batch.extends.len());
            self.batch.acks.clear();
            self.batch.naks.clear();
            self.batch.extends.clear();
            self.batch.extending.clear();
            return Ok(false);
        };
        let mut wrote = false;
        if !self.poisoned.is_empty() {
            let poisoned = &mut self.poisoned;
            let mut withheld = Vec::new();
            self.batch.acks.retain(|ack| {
                let keep = !poisoned.remove(&ack.token);
                if !keep {
                    withheld.push(ack.token);
                }
                keep
            });
            if !withheld.is_empty() {
                tracing::warn!(
                    events = withheld.len(),
                    "inbound events whose dead letters were lost are given back"
                );
                self.let_go(withheld.iter().copied());
                let result = self.call("nak", || inbound.nak(&withheld, WITHHELD_ACK_REDELIVERY));
                if let Settled::Written = self.settle(result, "nak", withheld.len()) {
                    self.counters.naks.fetch_add(withheld.len() as u64, Ordering::Relaxed);
                }
                self.settled_items(withheld.len());
            }
        }
        if !self.batch.acks.is_empty() {
            let n = self.batch.acks.len();
            let result = self.call("ack", || inbound.ack(&self.batch.acks));
            match self.settle(result, "ack", n) {
                Settled::Written => {
                    self.counters.acks.fetch_add(n as u64, Ordering::Relaxed);
                    wrote = true;
                }
                Settled::Dropped => {}
                Settled::Retry(error) => return Err(error),
            }
            self.let_go(self.batch.acks.iter().map(|ack| ack.token));
            self.batch.acks.clear();
            self.settled_items(n);
        }
        if !self.batch.naks.is_empty() {
            let n = self.batch.naks.len();
            let result = self.call("nak", || inbound.nak(&self.batch.naks, Duration::ZERO));
            match self.settle(result, "nak", n) {
                Settled::Written => {
                    self.counters.naks.fetch_add(n as u64, Ordering::Relaxed);
                    wrote = true;
                }
                Settled::Dropped => {}
                Settled::Retry(error) => return Err(error),
            }
            self.batch.naks.clear();
            self.settled_items(n);
        }
        if !self.batch.extends.is_empty() {
            let n = self.batch.extends.len();
            let result = self.call("extend", || inbound.extend(&self.batch.extends));
            match self.settle(result, "extend", n) {
                Settled::Written => {
                    self.counters.extends.fetch_add(n as u64, Ordering::Relaxed);
                    wrote = true;
                }
                // An extension is only worth its moment: a failed one is not retried.
                Settled::Dropped | Settled::Retry(_) => {}
            }
            self.batch.extends.clear();
            self.batch.extending.clear();
            self.settled_items(n);
        }
        Ok(wrote)
    }

    /// Stops extending the claims of `tokens`, whose acknowledgements are written or given up.
    fn let_go(&self, tokens: impl IntoIterator<Item = AckToken>) {
        if let Some(held) = &self.held {
            let mut held = held.lock();
            for token in tokens {
                held.remove(&token);
            }
        }
    }

    /// Lowers the settle backlog by `n` items written or given up.
    fn settled_items(&self, n: usize) {
        if n > 0 {
            self.settle_backlog.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// An event stored and updated within one batch is stored once, already updated: one
    /// provider call instead of two. The copy is made only when someone else still shares the
    /// event (a handler or a worker), which is the cost the provider would pay on update anyway.
    fn fold_statuses_into_stores(&mut self) {
        if self.batch.statuses.is_empty() {
            return;
        }
        let mut folded = 0;
        for event in &mut self.batch.stores {
            if let Some(update) = self.batch.statuses.remove(&event.id) {
                update.apply_to(Arc::make_mut(event));
                folded += 1;
            }
        }
        if folded > 0 {
            // Out of the order too: a later change of a folded event comes as a new entry.
            let statuses = &self.batch.statuses;
            self.batch.order.retain(|id| statuses.contains_key(id));
        }
        // They live on in their events' stores, which the backlog counts.
        self.settled_items(folded);
    }
}

/// Runs one provider call, turning a panic inside it into a permanent error.
fn guarded<T>(
    provider: &'static str,
    operation: &'static str,
    counters: &Counters,
    f: impl FnOnce() -> Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = delivery::panic_message(&*payload);
            delivery::drop_contained(payload);
            counters.panics.fetch_add(1, Ordering::Relaxed);
            Err(ProviderError::new(provider, operation, ProviderErrorKind::Panicked(message)))
        }
    }
}

/// Items of one part of a batch given up together, by position, with the provider's error.
type Refused = (Range<usize>, ProviderError);

/// Calls a part's isolation may make beyond its first: enough to single out 3 bad items among
/// 512, and a bound on what a provider refusing everything (a dropped table) costs per batch.
const ISOLATION_CALLS: u32 = 64;

/// Writes `items` (at `offset` in their part) in one `call`. When the provider refuses them for
/// good, and the refusal may be one item's (invalid input, a backend's refusal, a panic; not a
/// closed provider or an unsupported call), writes each half again, down to single items: one bad
/// event drops alone, not with the up to [`WriterConfig::max_batch`] others of its batch. `k` bad
/// items among `n` cost at most `2·k·log2(n)` calls more, and never more than `budget`: past it,
/// what still fails is given up as it is. Writing a written item again is harmless (providers take
/// a re-store, as after a transient error). Returns the first transient error, which leaves the
/// whole part to be retried.
fn isolate<T>(
    items: &[T],
    offset: usize,
    call: &mut impl FnMut(&[T]) -> Result<(), ProviderError>,
    budget: &mut u32,
    refused: &mut Vec<Refused>,
) -> Result<(), ProviderError> {
    let error = match call(items) {
        Ok(()) => return Ok(()),
        Err(error) if error.is_transient() => return Err(error),
        Err(error) => error,
    };
    let may_be_one_items =
        !matches!(error.kind(), ProviderErrorKind::Closed | ProviderErrorKind::NotSupported);
    if items.len() == 1 || !may_be_one_items || *budget < 2 {
        refused.push((offset..offset + items.len(), error));
        return Ok(());
    }
    *budget -= 2;
    let (first, second) = items.split_at(items.len() / 2);
    isolate(first, offset, call, budget, refused)?;
    isolate(second, offset + first.len(), call, budget, refused)
}

/// Remembers `items` writes given up with `error`, for the next flush to report.
fn record_drop(unreported: &Unreported, items: usize, error: &ProviderError) {
    let mut unreported = unreported.lock();
    let dropped = unreported.as_ref().map_or(0, |(d, _)| *d) + items as u64;
    *unreported = Some((dropped, error.clone()));
}

/// A stop nobody waits for (every sender dropped): retried for a short grace period.
fn orphan_stop() -> (Sender<Result<(), BrokerError>>, Instant) {
    (crossbeam_channel::bounded(1).0, crate::deadline::from_now(Duration::from_secs(5)))
}

enum Settled {
    Written,
    Retry(ProviderError),
    Dropped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusing(bad: &[usize]) -> impl FnMut(&[usize]) -> Result<(), ProviderError> + '_ {
        move |part: &[usize]| match part.iter().find(|item| bad.contains(item)) {
            Some(item) => Err(ProviderError::new(
                "test",
                "store_batch",
                ProviderErrorKind::InvalidInput(format!("item {item}")),
            )),
            None => Ok(()),
        }
    }

    fn isolated(
        items: &[usize],
        call: &mut impl FnMut(&[usize]) -> Result<(), ProviderError>,
    ) -> (Vec<Range<usize>>, u32) {
        let (mut refused, mut budget) = (Vec::new(), ISOLATION_CALLS);
        isolate(items, 0, call, &mut budget, &mut refused).expect("no transient error");
        (refused.into_iter().map(|(range, _)| range).collect(), ISOLATION_CALLS - budget)
    }

    #[test]
    fn bad_items_are_given_up_alone() {
        let items: Vec<usize> = (0..512).collect();
        let mut calls = 0;
        let mut call = |part: &[usize]| {
            calls += 1;
            refusing(&[7, 300, 301])(part)
        };
        let (refused, extra) = isolated(&items, &mut call);
        assert_eq!(refused, vec![7..8, 300..301, 301..302]);
        assert!(extra <= ISOLATION_CALLS && calls <= 1 + 2 * 3 * 9, "{calls} calls");
    }

    #[test]
    fn a_provider_refusing_everything_costs_a_bounded_number_of_calls() {
        let items: Vec<usize> = (0..512).collect();
        let mut calls = 0u32;
        let mut call = |_: &[usize]| {
            calls += 1;
            Err(ProviderError::new(
                "test",
                "store_batch",
                ProviderErrorKind::Backend("the table is gone".into()),
            ))
        };
        let (refused, _) = isolated(&items, &mut call);
        assert_eq!(calls, 1 + ISOLATION_CALLS);
        let mut covered: Vec<usize> = refused.into_iter().flatten().collect();
        covered.sort_unstable();
        assert_eq!(covered, items, "every item given up, once");
    }

    #[test]
    fn a_closed_provider_or_a_transient_error_is_not_narrowed_down() {
        let items: Vec<usize> = (0..64).collect();
        let mut calls = 0;
        let mut closed = |_: &[usize]| {
            calls += 1;
            Err(ProviderError::new("test", "store_batch", ProviderErrorKind::Closed))
        };
        assert_eq!(isolated(&items, &mut closed).0, vec![0..64]);
        assert_eq!(calls, 1);

        // A transient error met while narrowing down leaves the whole part for a retry.
        let mut first = true;
        let mut flaky = |_: &[usize]| {
            let kind = if std::mem::take(&mut first) {
                ProviderErrorKind::InvalidInput("one bad".into())
            } else {
                ProviderErrorKind::Unavailable("gone".into())
            };
            Err(ProviderError::new("test", "store_batch", kind))
        };
        let (mut refused, mut budget) = (Vec::new(), ISOLATION_CALLS);
        let outcome = isolate(&items, 0, &mut flaky, &mut budget, &mut refused);
        assert!(outcome.is_err_and(|error| error.is_transient()));
    }
}
