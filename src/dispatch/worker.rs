//! The worker: one dedicated OS thread per shard, the only consumer of its ring.
//!
//! Each turn it drains up to [`WorkerConfig::max_batch`] jobs with one ring update, loads the
//! subscription set once (one atomic load), and for each job runs the matched handlers in
//! subscription order, matching through its own [`MatchCache`]. A handler's failure or panic is
//! contained to its delivery: the delivery waits in the worker's [`DelayQueue`] for its retry and
//! the worker moves on, so a failing subscriber never stalls the jobs behind it. Status changes,
//! dead letters and acknowledgements go to the provider once per turn, not once per event: status
//! changes written by the worker itself when the provider takes inline writes (the memory
//! provider, [`Capabilities::inline_writes`](crate::Capabilities::inline_writes)), everything else
//! through the provider writer.
//!
//! ## Nothing kills a worker
//! Handler panics are caught per delivery. Anything else that panics on a worker — there is nothing
//! known to, but a worker must outlive the unknown — is caught per turn: the job it was handling
//! ends as failed (a local one) or is given back for redelivery (an inbound one), the panic is
//! counted in [`ShardStats::internal_errors`](crate::ShardStats::internal_errors) and logged, and
//! the worker carries on with the next job.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use smallvec::SmallVec;

use crate::dispatch::acked::{AckQueue, Awaited, Awaiting, Made, Outcome};
use crate::dispatch::backpressure::SpaceWaiters;
use crate::dispatch::delivery::{self, Attempt, Counts, InlineRules, Job, Origin, Outbox, Tally};
use crate::dispatch::inbound::Ends;
use crate::dispatch::retry::{DelayQueue, RetryPolicy};
use crate::dispatch::ring::Consumer;
use crate::dispatch::spent::{self, SpentEvents};
use crate::dispatch::wait::{WaitOutcome, WaitStrategy};
use crate::dispatch::writer::ProviderWriter;
use crate::error::ProviderError;
use crate::metrics::{EngineMetrics, Probe, WorkerMetrics};
use crate::provider::memory::StoreTicket;
use crate::provider::{AckToken, MemoryProvider, Provider, StatusUpdate};
use crate::subscription::{Subscription, SubscriptionSet, SubscriptionTable};
use crate::{Event, EventId, EventStatus, MatchCache};

/// Settings every worker shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    pub(crate) retry: RetryPolicy,
    pub(crate) track_status: bool,
    pub(crate) wait: WaitStrategy,
    pub(crate) cache_capacity: usize,
    pub(crate) max_batch: usize,
    /// How often inbound jobs waiting for retries have their claim extended (`None`: no inbound).
    pub(crate) extend_every: Option<Duration>,
    /// How long an acknowledged delivery may go unsettled before it counts as failed.
    pub(crate) ack_timeout: Duration,
    /// Whether an inbound event that matches nothing, but matched a subscription that just ended,
    /// goes back to its group (a work-queue member) rather than count as handled.
    pub(crate) give_back_unwanted: bool,
}

/// What workers share with the broker.
pub(crate) struct WorkerShared {
    pub(crate) table: Arc<SubscriptionTable>,
    pub(crate) writer: Arc<ProviderWriter>,
    /// Set by shutdown, when it began and its deadline: retries due before it still run; later
    /// ones are dead-lettered.
    pub(crate) shutdown: ShutdownSignal,
    /// Set by shutdown when its deadline passed with workers still running (a handler that has
    /// not returned): they begin no further job, so the events the report counts as undelivered
    /// stay so.
    pub(crate) abandoned: AtomicBool,
    /// Inbound jobs the workers ended, acknowledged or given back: with the inbound thread's
    /// count of those it placed, how many the broker holds (see `InboundPump`'s prefetch). A line
    /// of its own: every worker of a receiving broker adds to it each turn, and the fields beside
    /// it are read on every job.
    pub(crate) inbound_ended: CachePadded<Ends>,
    /// In a work queue, the tokens of the inbound events the broker holds (placed into its shards,
    /// not yet given back, or acknowledged with the acknowledgement not yet written): the inbound
    /// thread extends their claims, so that events waiting in a shard behind slow handlers are
    /// not taken by another member meanwhile. `None` otherwise: no other member claims a fan-out
    /// group's events.
    pub(crate) held_inbound: Option<crate::dispatch::writer::HeldInbound>,
    /// Which broker the workers belong to, for [`current`].
    pub(crate) engine: u64,
    /// The broker's metric state, when it records metrics.
    pub(crate) metrics: Option<Arc<EngineMetrics>>,
    /// The provider, when status changes are written inline by the workers (a provider with
    /// [`Capabilities::inline_writes`](crate::Capabilities::inline_writes)) rather than through
    /// the writer.
    pub(crate) inline: Option<InlineSink>,
    /// Events whose handling goes on with a delivery of them dead-lettered already.
    pub(crate) failing: Failing,
}

/// The events of open jobs a delivery of which was dead-lettered while others were still under
/// way (waiting for a retry or an acknowledgement), each with how many such jobs it has, and of
/// redrives running. A redrive of such a letter would run beside the event's handling (or the
/// other redrive), and the final status written as the job settles would overwrite the
/// redrive's: [`Broker::redrive`](crate::Broker::redrive) refuses them until then. An event
/// leaves once its final status was handed to the writer (or written inline), so a redrive that
/// finds it gone and then flushes the writer comes after it.
/// Only jobs with a dead letter and deliveries still open enter: the lock is off the common path.
#[derive(Debug, Default)]
pub(crate) struct Failing(parking_lot::Mutex<std::collections::HashMap<EventId, u32>>);

impl Failing {
    fn begin(&self, id: EventId) {
        *self.0.lock().entry(id).or_default() += 1;
    }

    fn end(&self, ids: impl Iterator<Item = EventId>) {
        let mut failing = self.0.lock();
        for id in ids {
            if let std::collections::hash_map::Entry::Occupied(mut entry) = failing.entry(id) {
                *entry.get_mut() -= 1;
                if *entry.get() == 0 {
                    entry.remove();
                }
            }
        }
    }

    /// Enters event `id` for a redrive of one of its dead letters, unless an open job of it has a
    /// delivery dead-lettered and others under way, or another redrive of it runs: two redrives at
    /// once would deliver one letter twice, or each read the other's letter as still waiting and
    /// leave the event `failed`. The guard takes it out again.
    pub(crate) fn claim(&self, id: EventId) -> Option<FailingClaim<'_>> {
        let mut failing = self.0.lock();
        if failing.contains_key(&id) {
            return None;
        }
        failing.insert(id, 1);
        Some(FailingClaim { failing: self, id })
    }
}

/// A redrive's entry in [`Failing`], taken out on drop.
pub(crate) struct FailingClaim<'a> {
    failing: &'a Failing,
    id: EventId,
}

impl Drop for FailingClaim<'_> {
    fn drop(&mut self) {
        self.failing.end(std::iter::once(self.id));
    }
}

/// A provider written inline, on the threads that publish and handle events.
pub(crate) enum InlineSink {
    /// The memory provider: each store's ticket travels with its event (in its [`Job`]'s
    /// [`Origin::Local`]) to the worker, which writes the event's statuses with it (see
    /// [`MemoryProvider::store_numbered`]).
    Memory(Arc<MemoryProvider>),
    /// Any other provider with [`Capabilities::inline_writes`](crate::Capabilities::inline_writes).
    Other(Arc<dyn Provider>),
}

impl InlineSink {
    pub(crate) fn new(provider: &Arc<dyn Provider>) -> Self {
        let any: Arc<dyn Any + Send + Sync> = Arc::clone(provider) as _;
        match any.downcast::<MemoryProvider>() {
            Ok(memory) => Self::Memory(memory),
            Err(_) => Self::Other(Arc::clone(provider)),
        }
    }

    /// Stores `events`, handing `ticket` each one's ticket in turn ([`StoreTicket::NONE`] when the
    /// provider gives none).
    pub(crate) fn store(
        &self,
        events: &[Arc<Event>],
        origin: Option<&str>,
        mut ticket: impl FnMut(StoreTicket),
    ) -> Result<(), ProviderError> {
        match self {
            Self::Memory(memory) => memory.store_numbered(events, origin, ticket),
            Self::Other(provider) => {
                provider.store_batch(events, origin)?;
                for _ in events {
                    ticket(StoreTicket::NONE);
                }
                Ok(())
            }
        }
    }

    /// Writes `updates`, each of an event stored with the ticket at its index in `tickets`.
    pub(crate) fn update_statuses(
        &self,
        updates: &[StatusUpdate],
        tickets: &[StoreTicket],
    ) -> Result<(), ProviderError> {
        match self {
            Self::Memory(memory) => memory.update_ticketed(updates, tickets),
            Self::Other(provider) => provider.update_status_batch(updates),
        }
    }
}

/// When shutdown began and its deadline, once it has; and a channel nothing is ever sent on,
/// disconnected then: a delivery waiting on a caller's thread waits on its receiver beside its
/// own wait, so that it sees shutdown begin at once.
pub(crate) struct ShutdownSignal {
    began: parking_lot::Mutex<Option<(Instant, Instant)>>,
    sender: parking_lot::Mutex<Option<flume::Sender<()>>>,
    receiver: flume::Receiver<()>,
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        let (sender, receiver) = flume::bounded(0);
        Self { began: parking_lot::Mutex::new(None), sender: parking_lot::Mutex::new(Some(sender)), receiver }
    }
}

impl ShutdownSignal {
    /// Shutdown began at `began`, to end by `deadline`: waits on the receiver end.
    pub(crate) fn begin(&self, began: Instant, deadline: Instant) {
        *self.began.lock() = Some((began, deadline));
        // After it is set: a wait this ends finds it.
        drop(self.sender.lock().take());
    }

    /// The receiver to wait on: disconnected once shutdown has begun.
    pub(crate) fn receiver(&self) -> &flume::Receiver<()> {
        &self.receiver
    }
}

impl WorkerShared {
    pub(crate) fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown.began.lock().map(|(_, deadline)| deadline)
    }

    /// When a delivery made on a caller's thread (`publish_sync`, `redrive`) stops waiting for a
    /// retry or a settle once shutdown has begun: early enough before the deadline for its dead
    /// letter to be written by then, as a worker's (see [`Worker::finish`]).
    pub(crate) fn caller_stop(&self) -> Option<Instant> {
        let (began, deadline) = (*self.shutdown.began.lock())?;
        Some(last_start(deadline, 1, deadline.saturating_duration_since(began)))
    }

    /// Whether shutdown gave up on the workers still running at its deadline (see `abandoned`).
    #[inline]
    fn is_abandoned(&self) -> bool {
        // Relaxed: a worker that reads it late begins one job more, which the report then counts
        // as undelivered though it runs; nothing else hangs on it.
        self.abandoned.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// The broker and shard this thread is the worker of.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
}

/// The shard this thread is the worker of, if it is a worker of broker `engine`: a publish from a
/// handler into its own worker's full shard must never wait for room only that worker can free.
pub(crate) fn current(engine: u64) -> Option<usize> {
    CURRENT.get().filter(|(e, _)| *e == engine).map(|(_, shard)| shard)
}

/// Counters of one shard, written by its worker only (so plain stores suffice) and read by
/// `Broker::stats`. Relaxed throughout: they are statistics, and publish no other memory.
#[derive(Default)]
pub(crate) struct ShardCounters {
    /// Jobs taken from the ring, stored as soon as they are taken.
    pub(crate) dispatched: CachePadded<AtomicU64>,
    /// Jobs whose handling began; `dispatched - started` are in the worker's hands, not started.
    pub(crate) started: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) pending_retries: AtomicU64,
    pub(crate) awaiting_acks: AtomicU64,
    pub(crate) internal_errors: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) returned: AtomicU64,
    /// The place in the shard's order (its `started` count when it began) of each job with
    /// deliveries waiting for a retry or an acknowledgement, as of the end of the worker's last
    /// turn that changed them: for `Broker::drain` to tell which of them it waits for. Written
    /// only by turns that open or end such a job, with that turn's changes alone.
    pub(crate) open_starts: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
}

/// What a worker did after shutdown began.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WorkerReport {
    pub(crate) retries_run: u64,
    pub(crate) dead_lettered_at_shutdown: u64,
    /// Inbound jobs with retries or acknowledgements still pending, given back for redelivery
    /// instead.
    pub(crate) returned_at_shutdown: u64,
}

/// How long before the shutdown deadline a worker stops running retries and dead-letters the rest.
const FINISH_MARGIN: Duration = Duration::from_millis(20);

/// What ending one delivery that shutdown left unfinished takes, its dead letter written, as
/// [`Worker::finish`] budgets it: generous (a release build takes about 2 µs with the memory
/// provider and Redis; PostgreSQL and NATS writes of dead letters took 25 µs each; a debug build
/// several times that).
const FINISH_PER_DELIVERY: Duration = Duration::from_micros(100);

/// When deliveries stop being retried or waited for, `left` of them still open, so that they
/// are dead-lettered and written by `deadline`: a margin that grows with what is left, at most
/// half of `window`, the time shutdown gave.
fn last_start(deadline: Instant, left: u32, window: Duration) -> Instant {
    let margin = FINISH_MARGIN.saturating_add(FINISH_PER_DELIVERY.saturating_mul(left)).min(window / 2);
    deadline.checked_sub(margin).unwrap_or(deadline)
}

/// How often a worker whose ring is closed looks for the outcomes of acknowledged deliveries.
const ACK_POLL: Duration = Duration::from_millis(1);

/// How often a worker holding back for the writer's settle backlog looks whether it has room.
const WRITER_POLL: Duration = Duration::from_millis(1);

/// A delivery waiting for its next attempt.
struct Retry {
    /// The job's entry in [`Worker::open`].
    job: usize,
    subscription: Arc<Subscription>,
    /// Attempts made so far.
    attempts: u32,
    /// The last attempt's error: what the delivery ends with if the retry is never made.
    last_error: String,
}

/// A job with deliveries waiting for retries or acknowledgements.
struct Open {
    job: Job,
    tally: Tally,
    /// Deliveries of this work-queue inbound job whose subscription ended before they did, each
    /// as it would be dead-lettered: once the job's other deliveries end, it goes back to its
    /// group, unless one of them was dead-lettered (see [`Worker::end_open`]).
    ended: Vec<crate::DeliveryFailure>,
    /// Whether the event is in [`WorkerShared::failing`]: a delivery of it was dead-lettered
    /// while others were still under way.
    failing: bool,
    /// Its place in the shard's order: the worker's `started` count when it began.
    start: u64,
}

/// The job being handled, by id and origin only (no reference count to move on the hot path),
/// for what to do with it should something on the worker panic.
#[derive(Clone, Copy)]
struct InFlight {
    id: EventId,
    origin: Origin,
    /// Whether it has an entry in `open` (then its retries settle it).
    registered: bool,
    /// Its metrics, begun: a panic ends them with the job's outcome.
    probe: Probe,
}

pub(crate) struct Worker {
    shared: Arc<WorkerShared>,
    counters: Arc<ShardCounters>,
    /// Publishers waiting for this shard to have room; signalled after every drained batch.
    space: Arc<SpaceWaiters>,
    /// Where the events this worker holds the last reference to go, for publishers to reuse.
    spent: Arc<SpentEvents>,
    /// Such events, gathered until there is a group of them.
    spent_group: Vec<Arc<Event>>,
    config: WorkerConfig,
    consumer: Consumer<Option<Job>>,
    index: usize,
    cache: MatchCache<Arc<Subscription>>,
    /// Generation of the set the cache was last used with.
    cache_generation: u64,
    retries: DelayQueue<Retry>,
    /// Acknowledged deliveries waiting for their outcome.
    awaiting: Awaiting,
    /// Those whose outcome came this turn, or whose time ran out.
    settled: Vec<(Awaited, Outcome)>,
    open: Slab<Open>,
    /// Events leaving [`WorkerShared::failing`] once this turn's final statuses are on their way.
    settled_failing: Vec<EventId>,
    /// The jobs taken this turn; `next` is the first not yet handled.
    batch: Vec<Option<Job>>,
    next: usize,
    in_flight: Option<InFlight>,
    outbox: Outbox,
    dispatched: u64,
    started: u64,
    internal_errors: u64,
    /// What was last stored into `counters`.
    published: Published,
    /// Jobs opened (`true`) and ended (`false`) this turn, by start, for `counters.open_starts`.
    open_changes: Vec<(u64, bool)>,
    last_extend: Instant,
    rng: fastrand::Rng,
    metrics: WorkerMetrics,
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
struct Published {
    counts: Counts,
    started: u64,
    pending_retries: usize,
    awaiting_acks: usize,
    internal_errors: u64,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<WorkerShared>,
        counters: Arc<ShardCounters>,
        space: Arc<SpaceWaiters>,
        spent: Arc<SpentEvents>,
        config: WorkerConfig,
        consumer: Consumer<Option<Job>>,
        index: usize,
    ) -> Self {
        let metrics = WorkerMetrics::new(shared.metrics.as_ref());
        let acks = Arc::new(AckQueue::new(consumer.nudge()));
        Self {
            shared,
            counters,
            space,
            spent,
            spent_group: Vec::with_capacity(spent::GROUP),
            config,
            consumer,
            index,
            cache: MatchCache::new(config.cache_capacity),
            cache_generation: 0,
            retries: DelayQueue::new(),
            awaiting: Awaiting::new(acks, config.ack_timeout),
            settled: Vec::new(),
            open: Slab::default(),
            settled_failing: Vec::new(),
            batch: Vec::with_capacity(config.max_batch),
            next: 0,
            in_flight: None,
            outbox: Outbox::default(),
            dispatched: 0,
            started: 0,
            internal_errors: 0,
            published: Published::default(),
            open_changes: Vec::new(),
            last_extend: Instant::now(),
            rng: fastrand::Rng::new(),
            metrics,
        }
    }

    pub(crate) fn run(mut self) -> WorkerReport {
        CURRENT.set(Some((self.shared.engine, self.index)));
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.turn())) {
                Ok(true) => {}
                Ok(false) => break,
                Err(payload) => self.contain(payload),
            }
        }
        let mut report = WorkerReport::default();
        while let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.finish(&mut report))) {
            self.contain(payload);
        }
        CURRENT.set(None);
        report
    }

    /// One turn: take a batch (or go on with the one a panic interrupted), handle it, run the
    /// retries due, hand the results over. `false` once the ring is closed and drained.
    fn turn(&mut self) -> bool {
        if self.shared.is_abandoned() {
            return false;
        }
        self.metrics.begin_turn();
        let mut took = self.take_outcomes();
        if self.next >= self.batch.len() && self.may_take() && self.take_batch() {
            took = true;
            // Before any of it is handled, so that a slow batch shows as processing.
            write_statuses(&self.shared, &mut self.outbox);
        }
        if self.next < self.batch.len() {
            took = true;
            self.dispatch_batch();
            if self.shared.is_abandoned() {
                self.end_turn();
                return false;
            }
        }
        if !self.retries.is_empty() {
            self.run_due_retries(Instant::now());
        }
        self.extend_waiting_inbound();
        // A worker that keeps up takes its next batch here, before this turn's results go out:
        // that batch's `processing` statuses and this turn's completions are then one write, one
        // provider call, instead of two.
        if self.next >= self.batch.len() && self.may_take() {
            took |= self.take_batch();
        }
        self.end_turn();
        if took {
            return true;
        }
        let due = [self.retries.next_due(), self.awaiting.next_wake(), self.next_extend()]
            .into_iter()
            .flatten()
            .min();
        if !self.may_take() {
            // The writer is behind and the ring may hold events this worker must leave there: a
            // wait on the ring would return at once. The writer signals nobody when it catches
            // up, so look again in a moment (or when something else is due).
            let now = Instant::now();
            let wake = due.map_or(WRITER_POLL, |due| due.saturating_duration_since(now).min(WRITER_POLL));
            std::thread::sleep(wake);
            return true;
        }
        match self.consumer.wait_or(self.config.wait, due, || self.awaiting.has_outcomes()) {
            WaitOutcome::Ready | WaitOutcome::TimedOut => true,
            WaitOutcome::Closed => false,
        }
    }

    /// Ends the acknowledged deliveries whose outcome came, or whose time ran out; `true` when
    /// any did. One load when none waits.
    fn take_outcomes(&mut self) -> bool {
        let known = self.outbox.gone.len();
        self.awaiting.sweep(&mut self.outbox.gone);
        // The swept subscriptions end now, before the deliveries their sweep failed are looked
        // at below: a delivery of an ended subscription is not retried (see `failed_attempt`).
        for &id in &self.outbox.gone[known..] {
            self.shared.table.unsubscribe(id);
        }
        self.awaiting.settle(&mut self.settled);
        if self.settled.is_empty() {
            return false;
        }
        let mut settled = std::mem::take(&mut self.settled);
        for (awaited, outcome) in settled.drain(..) {
            match self.outbox.outcome(outcome) {
                None => self.resolve(awaited.job, awaited.attempts),
                Some(error) => {
                    self.failed_attempt(awaited.job, awaited.subscription, awaited.attempts, error);
                }
            }
        }
        self.settled = settled;
        true
    }

    /// Whether this worker may take new events from its ring: while the writer has room for what
    /// they will produce (statuses, dead letters, acknowledgements), and always once the ring is
    /// closed, so that shutdown drains it whatever the provider does (what a closed ring holds is
    /// bounded by its capacity).
    #[inline]
    fn may_take(&self) -> bool {
        self.shared.writer.has_settle_room() || self.consumer.is_closed()
    }

    /// Takes the next batch from the ring, if any waits, and adds its `processing` statuses to the
    /// outbox, for the caller to send before the batch is handled; `true` when it took one.
    fn take_batch(&mut self) -> bool {
        self.batch.clear();
        self.next = 0;
        let taken = self.consumer.pop_batch(&mut self.batch, self.config.max_batch);
        if taken == 0 {
            return false;
        }
        self.space.notify();
        self.dispatched += taken as u64;
        // Release: after the ring's head moved on, so that `ShardSet::stats`, reading this with
        // Acquire and then the ring's length, never counts a taken job twice.
        self.counters.dispatched.store(self.dispatched, Ordering::Release);
        if self.config.track_status {
            let now = crate::clock::now();
            for job in self.batch.iter().flatten() {
                self.outbox.processing(job, now, true);
            }
        }
        true
    }

    fn dispatch_batch(&mut self) {
        let set = self.shared.table.load();
        if set.generation() != self.cache_generation {
            // Drop the old set's subscriptions now rather than when their slots are reused, so an
            // unsubscribed handler (and what it owns) is released promptly.
            self.cache.clear();
            self.cache_generation = set.generation();
        }
        while self.next < self.batch.len() {
            if self.shared.is_abandoned() {
                return;
            }
            let job = self.batch[self.next].take();
            self.next += 1;
            self.started += 1;
            // Relaxed: a statistic (see `ShardCounters`), stored per job so shutdown can tell the
            // jobs in hand apart from those begun.
            self.counters.started.store(self.started, Ordering::Relaxed);
            if let Some(job) = job {
                let probe = self.metrics.begin(&job, &self.outbox.counts);
                self.in_flight =
                    Some(InFlight { id: job.event.id, origin: job.origin, registered: false, probe });
                self.dispatch_one(&set, job);
                self.metrics.end(probe, &self.outbox.counts);
                self.in_flight = None;
            } else {
                self.outbox.counts.abandoned += 1;
            }
        }
    }

    fn dispatch_one(&mut self, set: &SubscriptionSet, job: Job) {
        let track = self.config.track_status;
        let subscriptions = self.cache.get_or_match(set, &job.event.event_type);
        if subscriptions.is_empty() {
            // Fetched, most likely, for a subscription that ended since: another member may want it.
            self.unrouted(job, SubscriptionTable::recently_wanted);
            return;
        }
        let mut tally = Tally::default();
        let mut retry_later: SmallVec<[(Arc<Subscription>, String); 2]> = SmallVec::new();
        let mut awaiting: SmallVec<[(Arc<Subscription>, Made); 1]> = SmallVec::new();
        let mut gone = 0;
        for subscription in subscriptions {
            let outcome = delivery::attempt(subscription, &job.event, 1, || self.awaiting.reply());
            match outcome {
                Attempt::Awaiting => {
                    awaiting.push((Arc::clone(subscription), self.awaiting.last()));
                    continue;
                }
                Attempt::Gone => gone += 1,
                Attempt::Delivered | Attempt::Failed(_) => {}
            }
            let Some(error) = self.outbox.record(subscription, outcome) else { continue };
            if self.config.retry.max_retries == 0 {
                self.outbox.give_up(&job, &delivery::failure(subscription, error, 1), &mut tally);
            } else {
                retry_later.push((Arc::clone(subscription), error));
            }
        }
        if retry_later.is_empty() && awaiting.is_empty() {
            if gone == subscriptions.len() {
                // Every subscriber it matched is gone (dropped receivers), each ending its
                // subscription at this turn's end: as if it had matched nothing after they ended.
                self.unrouted(job, |_, _| true);
                return;
            }
            self.outbox.settle(&job, tally, track);
            self.finished(job);
            return;
        }
        tally.outstanding = u32::try_from(retry_later.len() + awaiting.len()).unwrap_or(u32::MAX);
        let failing = tally.failed();
        if failing {
            self.shared.failing.begin(job.event.id);
        }
        self.open_changes.push((self.started, true));
        let key = self.open.insert(Open { job, tally, ended: Vec::new(), failing, start: self.started });
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.registered = true;
        }
        let now = Instant::now();
        for (subscription, made) in awaiting {
            self.awaiting.insert(made, key, subscription, 1);
        }
        for (subscription, last_error) in retry_later {
            let delay = self.config.retry.delay_for_retry(1, self.rng.f64());
            let retry = Retry { job: key, subscription, attempts: 1, last_error };
            self.retries.push(crate::deadline::after(now, delay), retry);
            self.outbox.retry_scheduled();
        }
    }

    /// `job` matched no live subscription. In a work queue, an inbound one that `ended` says (given
    /// the table and the event's type) was fetched for a subscription that has since ended goes
    /// back to its group, for a member still subscribed; any other completes, unrouted.
    fn unrouted(&mut self, job: Job, ended: fn(&SubscriptionTable, &str) -> bool) {
        match job.origin {
            Origin::Inbound(token)
                if self.config.give_back_unwanted && ended(&self.shared.table, &job.event.event_type) =>
            {
                self.give_back(token);
            }
            _ => self.outbox.unrouted(&job, self.config.track_status),
        }
        self.finished(job);
    }

    /// Gives the inbound job with ack token `token` back to its group, unhandled.
    fn give_back(&mut self, token: AckToken) {
        self.outbox.naks.push(token);
        self.outbox.counts.returned += 1;
    }

    /// Lets go of a job that is over: an event this worker holds the last reference to goes back
    /// to the publishers, who reuse its allocation (see [`spent`]).
    #[inline]
    fn finished(&mut self, job: Job) {
        // With status tracking on, the provider (or the writer, until it has written it) holds the
        // event too: looking at the count first would only add a transfer of its cache line.
        if !self.config.track_status && spent::is_last_reference(&job.event) {
            self.spent_group.push(job.event);
            if self.spent_group.len() >= spent::GROUP {
                self.spent.hand_over(&mut self.spent_group);
            }
        }
    }

    /// Runs the retries that were due at `now`, when the turn began; returns how many ran.
    /// A retry rescheduled with no delay waits for the next turn, so even `u32::MAX` retries
    /// without delay cannot keep a turn from ending.
    fn run_due_retries(&mut self, now: Instant) -> u64 {
        let mut due = Vec::new();
        while let Some(retry) = self.retries.pop_due(now) {
            due.push(retry);
        }
        let ran = due.len() as u64;
        for retry in due {
            self.run_retry(retry);
        }
        ran
    }

    fn run_retry(&mut self, retry: Retry) {
        let Some(open) = self.open.get(retry.job) else { return };
        let event = Arc::clone(&open.job.event);
        if self.shared.table.get(retry.subscription.id).is_none() {
            let error = delivery::unsubscribed_before_retry(retry.attempts, &retry.last_error);
            self.subscription_ended(retry.job, &retry.subscription, retry.attempts, error);
            return;
        }
        let attempts = retry.attempts.saturating_add(1);
        let outcome = delivery::attempt(&retry.subscription, &event, attempts, || self.awaiting.reply());
        match outcome {
            Attempt::Awaiting => {
                self.awaiting.insert(self.awaiting.last(), retry.job, retry.subscription, attempts);
                return;
            }
            Attempt::Gone => {
                // Gone while the retry waited (a dropped receiver): like an unsubscribe then.
                self.outbox.gone.push(retry.subscription.id);
                let error = delivery::gone_before_retry(retry.attempts, &retry.last_error);
                self.subscription_ended(retry.job, &retry.subscription, retry.attempts, error);
                return;
            }
            Attempt::Delivered | Attempt::Failed(_) => {}
        }
        match self.outbox.record(&retry.subscription, outcome) {
            None => self.resolve(retry.job, attempts),
            Some(error) => self.failed_attempt(retry.job, retry.subscription, attempts, error),
        }
    }

    /// Attempt `attempts` of a delivery of open job `key` failed with `error`: the delivery waits
    /// for its next attempt, or gives up after the last, or, when its subscription ended meanwhile
    /// (an acknowledged delivery's outcome can come long after it was made), ends as the
    /// subscription's end says, with this error.
    fn failed_attempt(&mut self, key: usize, subscription: Arc<Subscription>, attempts: u32, error: String) {
        if self.shared.table.get(subscription.id).is_none() {
            self.subscription_ended(key, &subscription, attempts, error);
        } else if attempts <= self.config.retry.max_retries {
            let delay = self.config.retry.delay_for_retry(attempts, self.rng.f64());
            let due = crate::deadline::from_now(delay);
            self.retries.push(due, Retry { job: key, subscription, attempts, last_error: error });
            self.outbox.retry_scheduled();
        } else {
            self.give_up(key, &delivery::failure(&subscription, error, attempts));
        }
    }

    /// Dead-letters a delivery of open job `key` and settles the job if it was its last.
    fn give_up(&mut self, key: usize, failure: &crate::DeliveryFailure) {
        if let Some(open) = self.open.get_mut(key) {
            self.outbox.give_up(&open.job, failure, &mut open.tally);
            if !open.failing && open.tally.outstanding > 1 {
                open.failing = true;
                self.shared.failing.begin(open.job.event.id);
            }
            self.resolve(key, failure.attempts);
        }
    }

    /// One outstanding delivery of open job `key` ended after `attempts`.
    fn resolve(&mut self, key: usize, attempts: u32) {
        let Some(open) = self.open.get_mut(key) else { return };
        open.tally.delivered(attempts);
        open.tally.outstanding = open.tally.outstanding.saturating_sub(1);
        if open.tally.outstanding == 0 {
            self.end_open(key);
        }
    }

    /// Open job `key`'s last delivery ended: it settles, or goes back to its group.
    ///
    /// A work-queue job some of whose subscriptions ended goes back whole, for a member still
    /// subscribed, unless a delivery of it was dead-lettered here: an event this member holds a
    /// dead letter of is never handled by the group too (a redrive would then handle it twice),
    /// so the deliveries whose subscription ended are dead-lettered beside it and the job settles.
    fn end_open(&mut self, key: usize) {
        let mut open = self.open.remove(key);
        self.open_changes.push((open.start, false));
        if open.failing {
            // Once the final status is on its way (see `end_turn`).
            self.settled_failing.push(open.job.event.id);
        }
        match open.job.origin {
            Origin::Inbound(token) if !open.ended.is_empty() && !open.tally.failed() => self.give_back(token),
            _ => {
                for failure in &open.ended {
                    self.outbox.give_up(&open.job, failure, &mut open.tally);
                }
                self.metrics.settled_late(&open.job.event, open.tally.failed());
                self.outbox.settle(&open.job, open.tally, self.config.track_status);
            }
        }
    }

    /// The subscription of a delivery of open job `key`, made `attempts` times, ended
    /// (unsubscribed, or its receiver gone) before its next attempt. In a work queue, an inbound
    /// job then goes back to its group, for a member still subscribed, once its other deliveries
    /// end (see [`Worker::end_open`]); otherwise the delivery is dead-lettered, with the error
    /// `error` makes of the job's last error.
    fn subscription_ended(
        &mut self,
        key: usize,
        subscription: &Arc<Subscription>,
        attempts: u32,
        error: String,
    ) {
        let Some(open) = self.open.get_mut(key) else { return };
        let failure = delivery::failure(subscription, error, attempts);
        if self.config.give_back_unwanted && matches!(open.job.origin, Origin::Inbound(_)) {
            open.ended.push(failure);
            open.tally.outstanding = open.tally.outstanding.saturating_sub(1);
            if open.tally.outstanding == 0 {
                self.end_open(key);
            }
            return;
        }
        self.give_up(key, &failure);
    }

    /// When the claims of waiting inbound jobs are next due for an extension, if any may wait: a
    /// worker with nothing else to do must still wake for it.
    fn next_extend(&self) -> Option<Instant> {
        let every = self.config.extend_every?;
        (self.open.len() > 0).then(|| crate::deadline::after(self.last_extend, every))
    }

    /// Restarts the claim idle time of inbound jobs waiting for retries or acknowledgements, so the
    /// group does not hand them to another member meanwhile.
    fn extend_waiting_inbound(&mut self) {
        let Some(every) = self.config.extend_every else { return };
        if self.open.len() == 0 || self.last_extend.elapsed() < every {
            return;
        }
        self.last_extend = Instant::now();
        self.outbox.extends.extend(self.open.iter().filter_map(|open| match open.job.origin {
            Origin::Inbound(token) => Some(token),
            Origin::Local { .. } | Origin::Replayed => None,
        }));
    }

    /// The ring is closed and drained: run retries that come due before the shutdown deadline;
    /// dead-letter the rest (local jobs) or give them back for redelivery (inbound jobs).
    fn finish(&mut self, report: &mut WorkerReport) {
        let deadline = self.shared.shutdown_deadline().unwrap_or_else(Instant::now);
        let window = deadline.saturating_duration_since(Instant::now());
        loop {
            self.take_outcomes();
            self.extend_waiting_inbound();
            // Retries stop, and deliveries stop waiting for their settle, early enough before the
            // deadline for what is left to be dead-lettered and written by then.
            let left = u32::try_from(self.retries.len() + self.awaiting.len()).unwrap_or(u32::MAX);
            let last_start = last_start(deadline, left, window);
            let now = Instant::now();
            let retry_due = self.retries.next_due().filter(|due| *due <= deadline);
            if now >= last_start || (retry_due.is_none() && self.awaiting.is_empty()) {
                break;
            }
            if retry_due.is_some_and(|due| due <= now) {
                report.retries_run += self.run_due_retries(now);
            } else {
                // With the ring closed, nothing wakes this thread for an outcome: while one is
                // awaited, look again every `ACK_POLL`.
                let mut wake = retry_due.map_or(last_start, |due| due.min(last_start));
                if let Some(extend) = self.next_extend() {
                    wake = wake.min(extend);
                }
                if !self.awaiting.is_empty() {
                    wake = wake.min(crate::deadline::after(now, ACK_POLL));
                }
                std::thread::sleep(wake.saturating_duration_since(now));
            }
            self.end_turn();
        }
        for awaited in self.awaiting.drain() {
            let error = || "the broker shut down before the delivery was acknowledged".to_owned();
            self.end_at_shutdown(awaited.job, &awaited.subscription, awaited.attempts, error, report);
        }
        for retry in self.retries.drain_in_order() {
            let error = || delivery::shut_down_before_retry(retry.attempts, &retry.last_error);
            self.end_at_shutdown(retry.job, &retry.subscription, retry.attempts, error, report);
        }
        self.end_turn();
    }

    /// Ends a delivery of open job `key` that shutdown left unfinished after `attempts`: an
    /// inbound job is given back for redelivery (once, whatever else of it was unfinished), a
    /// local one's delivery dead-lettered with `error`, as is an inbound one's when a delivery of
    /// the job was dead-lettered already (the event is then this member's, as in
    /// [`Worker::end_open`]).
    fn end_at_shutdown(
        &mut self,
        key: usize,
        subscription: &Subscription,
        attempts: u32,
        error: impl FnOnce() -> String,
        report: &mut WorkerReport,
    ) {
        let Some(open) = self.open.get(key) else { return };
        if let (Origin::Inbound(token), false) = (open.job.origin, open.tally.failed()) {
            // Another member, or this instance's next incarnation, gets it again.
            let start = self.open.remove(key).start;
            self.open_changes.push((start, false));
            self.outbox.naks.push(token);
            report.returned_at_shutdown += 1;
            return;
        }
        // The last of the job's deliveries brings the letters of those whose subscription ended
        // (kept for a give-back that a dead-lettered delivery rules out): counted here too.
        let with_ended = if open.tally.outstanding <= 1 { open.ended.len() as u64 } else { 0 };
        self.give_up(key, &delivery::failure(subscription, error(), attempts));
        report.dead_lettered_at_shutdown += 1 + with_ended;
    }

    /// A panic escaped a turn outside any handler: count it, log it, and settle the job it hit.
    fn contain(&mut self, payload: Box<dyn std::any::Any + Send>) {
        let message = delivery::panic_message(&*payload);
        delivery::drop_contained(payload);
        self.internal_errors += 1;
        tracing::error!(shard = self.index, %message, "a worker caught a panic outside any handler; it carries on");
        let Some(in_flight) = self.in_flight.take() else { return };
        if in_flight.registered {
            // Its retries settle it, and `settled_late` counts it then.
            self.metrics.end(in_flight.probe, &self.outbox.counts);
            return;
        }
        match in_flight.origin {
            Origin::Inbound(token) => self.outbox.naks.push(token),
            origin @ Origin::Local { .. } if self.config.track_status => self.outbox.push_status(
                StatusUpdate::new(in_flight.id, EventStatus::Failed)
                    .with_error(format!("internal error: {message}"))
                    .with_completed_at(crate::clock::now()),
                origin.ticket(),
            ),
            Origin::Local { .. } | Origin::Replayed => {}
        }
        self.outbox.counts.failed += 1;
        self.metrics.end(in_flight.probe, &self.outbox.counts);
    }

    /// Hands this turn's results to the writer, ends gone subscriptions, and publishes the
    /// counters.
    fn end_turn(&mut self) {
        if self.outbox.has_work() {
            for id in self.outbox.gone.drain(..) {
                self.shared.table.unsubscribe(id);
            }
            settle(&self.shared, &mut self.outbox);
        }
        if !self.settled_failing.is_empty() {
            self.shared.failing.end(self.settled_failing.drain(..));
        }
        self.metrics.end_turn();
        if !self.open_changes.is_empty() {
            let mut starts = self.counters.open_starts.lock();
            for (start, opened) in self.open_changes.drain(..) {
                if opened {
                    starts.insert(start);
                } else {
                    starts.remove(&start);
                }
            }
        }
        let now = Published {
            counts: self.outbox.counts,
            started: self.started,
            pending_retries: self.retries.len(),
            awaiting_acks: self.awaiting.len(),
            internal_errors: self.internal_errors,
        };
        if now == self.published {
            return;
        }
        let c = &self.counters;
        let n = now.counts;
        c.pending_retries.store(now.pending_retries as u64, Ordering::Relaxed);
        c.awaiting_acks.store(now.awaiting_acks as u64, Ordering::Relaxed);
        c.unrouted.store(n.unrouted, Ordering::Relaxed);
        c.handler_failures.store(n.handler_failures, Ordering::Relaxed);
        c.retries.store(n.retries, Ordering::Relaxed);
        c.dead_letters.store(n.dead_letters, Ordering::Relaxed);
        c.internal_errors.store(now.internal_errors, Ordering::Relaxed);
        // Release, the four that count ended jobs, after `pending_retries`: pairs with the Acquire
        // loads in `Engine::drain`, which then reads a `pending_retries` at least this current.
        c.abandoned.store(n.abandoned, Ordering::Release);
        c.returned.store(n.returned, Ordering::Release);
        c.completed.store(n.completed, Ordering::Release);
        c.failed.store(n.failed, Ordering::Release);
        self.published = now;
    }
}

/// Writes the outbox's status changes: inline when the provider is cheap enough, else through the
/// writer. Takes them out, keeping the buffers when they are written inline.
pub(crate) fn write_statuses(shared: &WorkerShared, outbox: &mut Outbox) {
    if outbox.statuses.is_empty() {
        return;
    }
    match &shared.inline {
        Some(sink) => {
            let _ = shared.writer.inline("update_status_batch", outbox.statuses.len(), || {
                sink.update_statuses(&outbox.statuses, &outbox.tickets)
            });
            outbox.statuses.clear();
            outbox.tickets.clear();
        }
        None => shared.writer.status(outbox.take_statuses()),
    }
}

/// Hands what deliveries produced to the provider: statuses inline when the provider is cheap
/// enough, the rest (dead letters and acknowledgements, which must keep their order) through the
/// writer.
pub(crate) fn settle(shared: &WorkerShared, outbox: &mut Outbox) {
    if shared.inline.is_some() {
        write_statuses(shared, outbox);
    }
    let ended = outbox.acks.len() + outbox.naks.len();
    if ended > 0 {
        // Given back: no longer this member's. Acknowledged ones stay until the writer has
        // written their acknowledgements (see `HeldInbound`).
        if let Some(held) = shared.held_inbound.as_ref().filter(|_| !outbox.naks.is_empty()) {
            let mut held = held.lock();
            for token in &outbox.naks {
                held.remove(token);
            }
        }
        shared.inbound_ended.add(ended as u64);
    }
    shared.writer.settle(outbox);
}

/// Values under stable keys: O(1) insert and remove, keys reused after removal.
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { entries: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        if let Some(key) = self.free.pop() {
            self.entries[key] = Some(value);
            key
        } else {
            self.entries.push(Some(value));
            self.entries.len() - 1
        }
    }

    fn get(&self, key: usize) -> Option<&T> {
        self.entries.get(key)?.as_ref()
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key)?.as_mut()
    }

    /// # Panics
    /// When `key` holds nothing: a caller out of step with its own keys, a bug.
    fn remove(&mut self, key: usize) -> T {
        let value = self.entries[key].take().expect("removing an empty slab entry");
        self.free.push(key);
        self.len -= 1;
        value
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().flatten()
    }
}

/// Delivers on the caller's thread, for `publish_sync`: `job`'s deliveries to the subscriptions
/// `set` matches, with inline retries, settled into `outbox`. Returns the failures.
pub(crate) fn deliver_on_caller(
    table: &SubscriptionTable,
    set: &SubscriptionSet,
    job: &Job,
    rules: InlineRules,
    track_status: bool,
    outbox: &mut Outbox,
    shutdown: impl Fn() -> Option<Instant>,
) -> Vec<crate::DeliveryFailure> {
    let subscriptions: SmallVec<[Arc<Subscription>; 8]> =
        set.matches(&job.event.event_type).values().cloned().collect();
    if subscriptions.is_empty() {
        outbox.unrouted(job, track_status);
        return Vec::new();
    }
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let mut gone = 0;
    for subscription in &subscriptions {
        match delivery::deliver_inline(table, subscription, &job.event, rules, outbox, &shutdown) {
            delivery::Inline::Delivered { attempts } => tally.delivered(attempts),
            delivery::Inline::Gone => gone += 1,
            delivery::Inline::Failed(failure) => {
                outbox.give_up(job, &failure, &mut tally);
                failures.push(failure);
            }
        }
    }
    if gone == subscriptions.len() {
        // Every subscriber it matched was gone (dropped receivers), their subscriptions ended
        // now: as if it had matched nothing, as on a worker.
        outbox.unrouted(job, track_status);
    } else {
        outbox.settle(job, tally, track_status);
    }
    failures
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::InlineSink;
    use crate::provider::{MemoryProvider, Provider};

    /// A broker writes the memory provider through its numbered path, found behind the
    /// `Arc<dyn Provider>` it was given: the same provider, not a copy.
    #[test]
    fn the_memory_provider_is_written_through_its_numbered_path() {
        let memory: Arc<dyn Provider> = Arc::new(MemoryProvider::default());
        match InlineSink::new(&memory) {
            InlineSink::Memory(found) => {
                let found: Arc<dyn Provider> = found;
                assert!(Arc::ptr_eq(&found, &memory));
            }
            InlineSink::Other(_) => panic!("the memory provider was not found"),
        }
    }

    /// Any other provider is written through the trait, even one wrapping a memory provider.
    #[cfg(feature = "test-util")]
    #[test]
    fn another_provider_is_written_through_the_trait() {
        let memory: Arc<dyn Provider> = Arc::new(MemoryProvider::default());
        let wrapped: Arc<dyn Provider> = crate::testing::FaultyProvider::new(memory);
        assert!(matches!(InlineSink::new(&wrapped), InlineSink::Other(_)));
    }
}
