//! The worker: one dedicated OS thread per shard, the only consumer of its ring.
//!
//! Each turn it drains up to [`WorkerConfig::max_batch`] events with one ring update, loads the
//! subscription set once (one atomic load), and for each event runs the matched handlers in
//! subscription order, matching through its own [`MatchCache`]. A handler's failure or panic is
//! contained to its delivery: the delivery waits in the worker's [`DelayQueue`] for its retry and
//! the worker moves on, so a failing subscriber never stalls the events behind it. Status changes
//! and dead letters are handed to the provider writer once per turn, not once per event.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use jiff::Timestamp;

use crate::dispatch::backpressure::SpaceWaiters;
use crate::dispatch::retry::{DelayQueue, RetryPolicy};
use crate::dispatch::ring::Consumer;
use crate::dispatch::wait::{WaitOutcome, WaitStrategy};
use crate::dispatch::writer::ProviderWriter;
use crate::error::DeliveryFailure;
use crate::provider::{DeadLetter, StatusUpdate};
use crate::subscription::{DeliveryError, Subscription, SubscriptionSet, SubscriptionTable};
use crate::{Event, EventId, EventStatus, MatchCache, SubscriptionId};

/// The ring's item: `None` is a slot that was reserved and then abandoned.
pub(crate) type Job = Option<Arc<Event>>;

/// Settings every worker shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    pub(crate) retry: RetryPolicy,
    pub(crate) track_status: bool,
    pub(crate) wait: WaitStrategy,
    pub(crate) cache_capacity: usize,
    pub(crate) max_batch: usize,
}

/// What workers share with the broker.
pub(crate) struct WorkerShared {
    pub(crate) table: Arc<SubscriptionTable>,
    pub(crate) writer: Arc<ProviderWriter>,
    /// Set by shutdown: retries due before it still run; later ones are dead-lettered.
    pub(crate) shutdown_deadline: parking_lot::Mutex<Option<Instant>>,
}

/// Counters of one shard, written by its worker only (so plain stores suffice) and read by
/// `Broker::stats`. Relaxed throughout: they are statistics, and publish no other memory.
#[derive(Default)]
pub(crate) struct ShardCounters {
    pub(crate) dispatched: CachePadded<AtomicU64>,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) pending_retries: AtomicU64,
}

/// The same counts, kept locally by the worker and stored into [`ShardCounters`] once per turn.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    dispatched: u64,
    completed: u64,
    failed: u64,
    unrouted: u64,
    handler_failures: u64,
    retries: u64,
    dead_letters: u64,
}

/// What a worker did after shutdown began.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WorkerReport {
    pub(crate) retries_run: u64,
    pub(crate) dead_lettered_at_shutdown: u64,
}

/// Runs one handler, turning a panic into a failure.
pub(crate) fn deliver(subscription: &Subscription, event: &Arc<Event>) -> Result<(), DeliveryError> {
    match catch_unwind(AssertUnwindSafe(|| (subscription.handler)(event))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            Err(DeliveryError::Failed(format!("handler panicked: {message}")))
        }
    }
}

/// Builds the dead letter of a delivery that gave up.
pub(crate) fn dead_letter(event: &Event, failure: &DeliveryFailure) -> DeadLetter {
    let mut failed = event.clone();
    failed.status = EventStatus::Failed;
    failed.error.clone_from(&failure.error);
    failed.retry_count = failure.attempts.saturating_sub(1);
    DeadLetter::new(
        failed,
        failure.subscription_id,
        failure.pattern.clone(),
        failure.error.clone(),
        failure.attempts,
    )
}

/// A delivery waiting for its next attempt.
struct Retry {
    event: Arc<Event>,
    subscription: Arc<Subscription>,
    /// Attempts made so far.
    attempts: u32,
}

/// An event with deliveries still waiting for retries.
struct OpenEvent {
    outstanding: u32,
    failed: bool,
    error: String,
    retries: u32,
}

pub(crate) struct Worker {
    shared: Arc<WorkerShared>,
    counters: Arc<ShardCounters>,
    /// Publishers waiting for this shard to have room; signalled after every drained batch.
    space: Arc<SpaceWaiters>,
    config: WorkerConfig,
    consumer: Consumer<Job>,
    cache: MatchCache<Arc<Subscription>>,
    /// Generation of the set the cache was last used with.
    cache_generation: u64,
    retries: DelayQueue<Retry>,
    open: HashMap<EventId, OpenEvent>,
    batch: Vec<Job>,
    statuses: Vec<StatusUpdate>,
    dead: Vec<DeadLetter>,
    gone: Vec<SubscriptionId>,
    counts: Counts,
    /// The counts and pending retries as last stored into `counters`.
    published: (Counts, usize),
    rng: fastrand::Rng,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<WorkerShared>,
        counters: Arc<ShardCounters>,
        space: Arc<SpaceWaiters>,
        config: WorkerConfig,
        consumer: Consumer<Job>,
    ) -> Self {
        Self {
            shared,
            counters,
            space,
            config,
            consumer,
            cache: MatchCache::new(config.cache_capacity),
            cache_generation: 0,
            retries: DelayQueue::new(),
            open: HashMap::new(),
            batch: Vec::with_capacity(config.max_batch),
            statuses: Vec::with_capacity(config.max_batch * 2),
            dead: Vec::new(),
            gone: Vec::new(),
            counts: Counts::default(),
            published: (Counts::default(), 0),
            rng: fastrand::Rng::new(),
        }
    }

    pub(crate) fn run(mut self) -> WorkerReport {
        loop {
            let taken = self.consumer.pop_batch(&mut self.batch, self.config.max_batch);
            if taken > 0 {
                self.space.notify();
                self.dispatch_batch();
            }
            if !self.retries.is_empty() {
                self.run_due_retries(Instant::now());
            }
            self.end_turn();
            if taken > 0 {
                continue;
            }
            match self.consumer.wait(self.config.wait, self.retries.next_due()) {
                WaitOutcome::Ready | WaitOutcome::TimedOut => {}
                WaitOutcome::Closed => break,
            }
        }
        self.finish()
    }

    /// The ring is closed and drained: run retries that come due before the shutdown deadline,
    /// dead-letter the rest.
    fn finish(mut self) -> WorkerReport {
        let mut report = WorkerReport::default();
        let deadline = (*self.shared.shutdown_deadline.lock()).unwrap_or_else(Instant::now);
        while let Some(due) = self.retries.next_due() {
            if due > deadline {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            report.retries_run += self.run_due_retries(Instant::now());
            self.end_turn();
        }
        for retry in self.retries.drain_in_order() {
            let failure = DeliveryFailure {
                subscription_id: retry.subscription.id,
                pattern: retry.subscription.pattern.to_string(),
                error: format!("the broker shut down before retry {} was due", retry.attempts),
                attempts: retry.attempts,
            };
            self.give_up(&retry.event, &failure);
            report.dead_lettered_at_shutdown += 1;
        }
        self.end_turn();
        report
    }

    fn dispatch_batch(&mut self) {
        let set = self.shared.table.load();
        if set.generation() != self.cache_generation {
            // Drop the old set's subscriptions now rather than when their slots are reused, so an
            // unsubscribed handler (and what it owns) is released promptly.
            self.cache.clear();
            self.cache_generation = set.generation();
        }
        if self.config.track_status {
            let now = Timestamp::now();
            self.statuses.extend(
                self.batch
                    .iter()
                    .flatten()
                    .map(|event| StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(now)),
            );
            // Sent now, not with the completions, so a slow batch shows as processing.
            self.shared.writer.status(std::mem::take(&mut self.statuses));
        }
        let mut batch = std::mem::take(&mut self.batch);
        for event in batch.drain(..).flatten() {
            self.counts.dispatched += 1;
            self.dispatch_one(&set, &event);
        }
        self.batch = batch;
    }

    fn dispatch_one(&mut self, set: &SubscriptionSet, event: &Arc<Event>) {
        let subscriptions = self.cache.get_or_match(set, &event.event_type);
        if subscriptions.is_empty() {
            self.counts.unrouted += 1;
            self.counts.completed += 1;
            if self.config.track_status {
                self.statuses.push(finished(event.id, EventStatus::Completed, String::new(), 0));
            }
            return;
        }
        let mut open = OpenEvent { outstanding: 0, failed: false, error: String::new(), retries: 0 };
        for subscription in subscriptions {
            match deliver(subscription, event) {
                Ok(()) => {}
                Err(DeliveryError::Gone) => self.gone.push(subscription.id),
                Err(DeliveryError::Failed(error)) => {
                    self.counts.handler_failures += 1;
                    if self.config.retry.max_retries == 0 {
                        let failure = DeliveryFailure {
                            subscription_id: subscription.id,
                            pattern: subscription.pattern.to_string(),
                            error,
                            attempts: 1,
                        };
                        self.dead.push(dead_letter(event, &failure));
                        self.counts.dead_letters += 1;
                        open.failed = true;
                        open.error = failure.error;
                    } else {
                        let delay = self.config.retry.delay_for_retry(1, self.rng.f64());
                        self.retries.push(
                            Instant::now() + delay,
                            Retry {
                                event: Arc::clone(event),
                                subscription: Arc::clone(subscription),
                                attempts: 1,
                            },
                        );
                        self.counts.retries += 1;
                        open.outstanding += 1;
                        open.retries = 1;
                        open.error = error;
                    }
                }
            }
        }
        if open.outstanding > 0 {
            self.open.insert(event.id, open);
        } else {
            self.close_event(event.id, open);
        }
    }

    /// Runs the retries due at `now`; returns how many ran (rescheduled ones included).
    fn run_due_retries(&mut self, now: Instant) -> u64 {
        let mut ran = 0;
        while let Some(retry) = self.retries.pop_due(now) {
            ran += 1;
            if self.shared.table.get(retry.subscription.id).is_none() {
                // Unsubscribed while waiting: the event is kept as a dead letter, not dropped.
                let failure = DeliveryFailure {
                    subscription_id: retry.subscription.id,
                    pattern: retry.subscription.pattern.to_string(),
                    error: "unsubscribed before the retry was due".to_owned(),
                    attempts: retry.attempts,
                };
                self.give_up(&retry.event, &failure);
                continue;
            }
            match deliver(&retry.subscription, &retry.event) {
                Ok(()) => self.resolve(retry.event.id, None, retry.attempts),
                Err(DeliveryError::Gone) => {
                    self.gone.push(retry.subscription.id);
                    self.resolve(retry.event.id, None, retry.attempts);
                }
                Err(DeliveryError::Failed(error)) => {
                    self.counts.handler_failures += 1;
                    let attempts = retry.attempts + 1;
                    if attempts <= self.config.retry.max_retries {
                        let delay = self.config.retry.delay_for_retry(attempts, self.rng.f64());
                        if let Some(open) = self.open.get_mut(&retry.event.id) {
                            open.retries = open.retries.max(attempts);
                            open.error.clone_from(&error);
                        }
                        self.retries.push(now + delay, Retry { attempts, ..retry });
                        self.counts.retries += 1;
                    } else {
                        let failure = DeliveryFailure {
                            subscription_id: retry.subscription.id,
                            pattern: retry.subscription.pattern.to_string(),
                            error,
                            attempts,
                        };
                        self.give_up(&retry.event, &failure);
                    }
                }
            }
        }
        ran
    }

    /// Dead-letters a delivery and settles its event.
    fn give_up(&mut self, event: &Arc<Event>, failure: &DeliveryFailure) {
        self.dead.push(dead_letter(event, failure));
        self.counts.dead_letters += 1;
        self.resolve(event.id, Some(failure.error.clone()), failure.attempts);
    }

    /// One outstanding delivery of `id` ended, failed when `error` is set.
    fn resolve(&mut self, id: EventId, error: Option<String>, attempts: u32) {
        let Some(open) = self.open.get_mut(&id) else { return };
        open.outstanding -= 1;
        open.retries = open.retries.max(attempts.saturating_sub(1));
        if let Some(error) = error {
            open.failed = true;
            open.error = error;
        }
        if open.outstanding == 0 {
            let open = self.open.remove(&id).expect("present above");
            self.close_event(id, open);
        }
    }

    fn close_event(&mut self, id: EventId, open: OpenEvent) {
        let status = if open.failed { EventStatus::Failed } else { EventStatus::Completed };
        if open.failed {
            self.counts.failed += 1;
        } else {
            self.counts.completed += 1;
        }
        if self.config.track_status {
            let error = if open.failed { open.error } else { String::new() };
            self.statuses.push(finished(id, status, error, open.retries));
        }
    }

    /// Hands this turn's statuses and dead letters to the writer, ends gone subscriptions, and
    /// publishes the counters.
    fn end_turn(&mut self) {
        let now = (self.counts, self.retries.len());
        if now == self.published && self.statuses.is_empty() && self.dead.is_empty() && self.gone.is_empty() {
            return;
        }
        if !self.statuses.is_empty() {
            self.shared.writer.status(std::mem::take(&mut self.statuses));
        }
        if !self.dead.is_empty() {
            self.shared.writer.dead_letters(std::mem::take(&mut self.dead));
        }
        for id in self.gone.drain(..) {
            self.shared.table.unsubscribe(id);
        }
        let c = &self.counters;
        let n = self.counts;
        c.dispatched.store(n.dispatched, Ordering::Relaxed);
        c.completed.store(n.completed, Ordering::Relaxed);
        c.failed.store(n.failed, Ordering::Relaxed);
        c.unrouted.store(n.unrouted, Ordering::Relaxed);
        c.handler_failures.store(n.handler_failures, Ordering::Relaxed);
        c.retries.store(n.retries, Ordering::Relaxed);
        c.dead_letters.store(n.dead_letters, Ordering::Relaxed);
        c.pending_retries.store(self.retries.len() as u64, Ordering::Relaxed);
        self.published = now;
    }
}

/// The final status of an event.
pub(crate) fn finished(id: EventId, status: EventStatus, error: String, retries: u32) -> StatusUpdate {
    StatusUpdate::new(id, status)
        .with_error(error)
        .with_retry_count(retries)
        .with_completed_at(Timestamp::now())
}

/// How a delivery made on the caller's thread ended.
pub(crate) enum CallerDelivery {
    /// The handler succeeded, after this many attempts.
    Delivered { attempts: u32 },
    /// The subscriber is gone (a dropped stream); it has been unsubscribed.
    Gone,
    /// Every attempt failed.
    Failed(DeliveryFailure),
}

/// Delivers on the caller's thread (`publish_sync`, `redrive`), retrying per `policy` with the
/// backoff slept between attempts.
pub(crate) fn deliver_on_caller(
    table: &SubscriptionTable,
    subscription: &Subscription,
    event: &Arc<Event>,
    policy: &RetryPolicy,
) -> CallerDelivery {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match deliver(subscription, event) {
            Ok(()) => return CallerDelivery::Delivered { attempts },
            Err(DeliveryError::Gone) => {
                table.unsubscribe(subscription.id);
                return CallerDelivery::Gone;
            }
            Err(DeliveryError::Failed(error)) if attempts > policy.max_retries => {
                return CallerDelivery::Failed(DeliveryFailure {
                    subscription_id: subscription.id,
                    pattern: subscription.pattern.to_string(),
                    error,
                    attempts,
                });
            }
            Err(DeliveryError::Failed(_)) => {
                let delay = policy.delay_for_retry(attempts, fastrand::f64());
                if delay > Duration::ZERO {
                    std::thread::sleep(delay);
                }
            }
        }
    }
}
