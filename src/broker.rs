//! The broker: the public face of the engine.
//!
//! ## Modes
//! - [`Mode::Async`] (default): [`Broker::publish`] queues the event on its shard's ring and
//!   returns; the shard's worker thread runs the handlers. Events with the same partition key
//!   (the type, unless [`Event::partition_key`] is set) are handled in publish order.
//! - [`Mode::Sync`]: [`Broker::publish`] runs the matched handlers on the caller's thread, in
//!   subscription order, and returns their failures after retries.
//!
//! [`Broker::publish_sync`] and [`Broker::publish_async`] choose explicitly, whatever the mode.
//!
//! ## Backpressure
//! A shard's ring holds [`BrokerBuilder::buffer_size`] events (its worker may hold one more batch
//! of up to 256 it is working through). When the ring is full, [`Backpressure::Reject`]
//! returns [`PublishError::Full`] at once, with the event; [`Backpressure::Block`] (the default,
//! 1 s) waits for room up to its timeout first. Nothing is dropped silently: an event is either
//! accepted, and then handled and tracked, or handed back.
//!
//! ## Delivery
//! Handlers run in subscription order. A handler that fails or panics is retried per the
//! [`RetryPolicy`], without delaying other handlers or other events; after the last retry the
//! delivery becomes a dead letter ([`Broker::dead_letters`], [`Broker::redrive`]). An event
//! published after [`Broker::unsubscribe`] returns never reaches that subscription.
//!
//! ## Shutdown
//! [`Broker::shutdown`] stops accepting, drains every shard, runs the retries that come due
//! before its timeout (dead-lettering the rest), flushes the provider writer and closes the
//! provider. Dropping the last handle of a broker does the same with a 30 s timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::dispatch::backpressure::Backoff;
pub use crate::dispatch::backpressure::Backpressure;
use crate::dispatch::intake::Intake;
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::ring::{PushBatchError as ReserveError, Reservation};
use crate::dispatch::shard::{ShardSet, ShardStats};
use crate::dispatch::wait::WaitStrategy;
use crate::dispatch::worker::{self, CallerDelivery, Job, WorkerConfig, WorkerShared};
use crate::dispatch::writer::{ProviderWriter, WriterConfig, WriterStats};
use crate::error::{
    BatchPublishError, BatchRejection, BoxError, BrokerError, BuildError, ConfigError, DeliveryFailure,
    PublishError, SubscribeError,
};
use crate::provider::{
    DeadLetter, DeadLetterFilter, DeadLetterId, MemoryProvider, Provider, ReplayFrom, StatusUpdate,
};
use crate::subscription::{DeliveryError, Handler, SubscriptionTable};
use crate::{Event, EventStatus, Pattern, SubscriptionId, validate_event_type};

/// How [`Broker::publish`] delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// On the caller's thread, before `publish` returns.
    Sync,
    /// Queued to a shard's worker thread.
    #[default]
    Async,
}

/// Configures and starts a [`Broker`].
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Backpressure, Broker, Mode, RetryPolicy, WaitStrategy};
///
/// let broker = Broker::builder()
///     .mode(Mode::Async)
///     .workers(2)
///     .buffer_size(1024)
///     .instance_id("api-1")
///     .retry_policy(RetryPolicy { max_retries: 2, ..RetryPolicy::default() })
///     .backpressure(Backpressure::Reject)
///     .wait_strategy(WaitStrategy::default())
///     .build()?;
/// assert_eq!(broker.instance_id(), "api-1");
/// broker.shutdown(Duration::from_secs(5));
/// # Ok::<(), eventbroker::BuildError>(())
/// ```
#[must_use]
pub struct BrokerBuilder {
    mode: Mode,
    workers: usize,
    buffer_size: usize,
    instance_id: Option<String>,
    retry: RetryPolicy,
    backpressure: Backpressure,
    wait: WaitStrategy,
    provider: Option<Arc<dyn Provider>>,
    track_status: bool,
    writer: WriterConfig,
    cache_capacity: usize,
    max_batch: usize,
}

/// Most worker threads a broker may have.
pub const MAX_WORKERS: usize = 1024;
/// Largest ring, in events per shard.
pub const MAX_BUFFER_SIZE: usize = 1 << 24;

impl BrokerBuilder {
    /// [`Mode::Sync`] or [`Mode::Async`] (default).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Number of shards, each with one worker thread. Default: the number of CPUs.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Events each shard's ring holds, rounded up to a power of two. Default 1024.
    pub fn buffer_size(mut self, events: usize) -> Self {
        self.buffer_size = events;
        self
    }

    /// This instance's id, written into events published without one. Default: the host name.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Retry policy of every delivery. Default: [`RetryPolicy::default`].
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// What publishing does when a shard is full. Default: block up to 1 s.
    pub fn backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// How idle workers wait. Default: spin, then yield, then park.
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// Where events, statuses and dead letters are stored. Default: a [`MemoryProvider`].
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Whether every event and its status changes are written to the provider (default `true`).
    /// With `false` only dead letters and confirmed publishes reach it: the lowest-overhead
    /// setting for purely in-process use.
    pub fn track_status(mut self, track: bool) -> Self {
        self.track_status = track;
        self
    }

    /// How the provider writer batches. Default: [`WriterConfig::default`].
    pub fn writer(mut self, config: WriterConfig) -> Self {
        self.writer = config;
        self
    }

    /// Distinct event types each worker's match cache holds. Default 4096.
    pub fn match_cache_capacity(mut self, types: usize) -> Self {
        self.cache_capacity = types;
        self
    }

    /// Checks the settings and starts the worker and writer threads.
    ///
    /// # Errors
    /// [`BuildError::Config`] naming the bad setting; [`BuildError::Spawn`] when a thread cannot
    /// be started.
    pub fn build(self) -> Result<Broker, BuildError> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(ConfigError::new(
                "worker_count",
                format!("must be between 1 and {MAX_WORKERS}, got {}", self.workers),
            )
            .into());
        }
        if self.buffer_size < 2 || self.buffer_size > MAX_BUFFER_SIZE {
            return Err(ConfigError::new(
                "buffer_size",
                format!("must be between 2 and {MAX_BUFFER_SIZE}, got {}", self.buffer_size),
            )
            .into());
        }
        self.retry.validate()?;
        if self.writer.max_batch == 0 {
            return Err(ConfigError::new("writer.max_batch", "must be at least 1").into());
        }
        if self.writer.max_backlog == 0 {
            return Err(ConfigError::new("writer.max_backlog", "must be at least 1").into());
        }
        if self.cache_capacity == 0 {
            return Err(ConfigError::new("match_cache_capacity", "must be at least 1").into());
        }
        let instance_id = self.instance_id.filter(|id| !id.is_empty()).unwrap_or_else(default_instance_id);
        let provider = self.provider.unwrap_or_else(|| Arc::new(MemoryProvider::default()));
        let writer = ProviderWriter::spawn(Arc::clone(&provider), None, self.writer)
            .map_err(|source| BuildError::Spawn { thread: "eventbroker-writer".into(), source })?;
        let shared = Arc::new(WorkerShared {
            table: Arc::new(SubscriptionTable::new()),
            writer: Arc::new(writer),
            shutdown_deadline: parking_lot::Mutex::new(None),
        });
        let config = WorkerConfig {
            retry: self.retry,
            track_status: self.track_status,
            wait: self.wait,
            cache_capacity: self.cache_capacity,
            max_batch: self.max_batch,
        };
        let capacity = self.buffer_size.next_power_of_two();
        let shards = ShardSet::spawn(self.workers, capacity, &instance_id, &shared, config)?;
        Ok(Broker {
            inner: Arc::new(Inner {
                instance_id,
                mode: self.mode,
                retry: self.retry,
                backpressure: self.backpressure,
                track_status: self.track_status,
                buffer_size: capacity,
                provider,
                shared,
                shards,
                intake: Intake::new(),
                sync: SyncCounters::default(),
                rejected: AtomicU64::new(0),
                shutdown: parking_lot::Mutex::new(false),
            }),
        })
    }
}

fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("eventbroker-{}", std::process::id()))
}

/// Counts of `publish_sync` deliveries, kept apart from the shards'.
#[derive(Default)]
struct SyncCounters {
    published: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    unrouted: AtomicU64,
    handler_failures: AtomicU64,
    retries: AtomicU64,
    dead_letters: AtomicU64,
}

/// A broker's counters at one moment; see [`Broker::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// This instance's id.
    pub instance_id: String,
    /// The configured mode.
    pub mode: Mode,
    /// Number of shards (worker threads).
    pub workers: usize,
    /// Live subscriptions.
    pub subscriptions: usize,
    /// Events accepted: taken by workers, waiting in rings, or delivered synchronously.
    pub published: u64,
    /// Events whose handling ended (completed + failed).
    pub processed: u64,
    /// Events whose deliveries all succeeded, or that matched nothing.
    pub completed: u64,
    /// Events with a delivery that failed after its retries.
    pub failed: u64,
    /// Events that matched no subscription.
    pub unrouted: u64,
    /// Failed handler calls, retries included.
    pub handler_failures: u64,
    /// Retries scheduled (async) or made (sync).
    pub retries: u64,
    /// Deliveries dead-lettered.
    pub dead_letters: u64,
    /// Publishes refused with `Full`.
    pub rejected: u64,
    /// Events waiting in rings now.
    pub queued: usize,
    /// Deliveries waiting for a retry now.
    pub pending_retries: u64,
    /// The provider writer's counters.
    pub writer: WriterStats,
    /// Per-shard counters.
    pub shards: Vec<ShardStats>,
}

/// What [`Broker::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Events that were waiting in rings when shutdown began and were then handled.
    pub drained: u64,
    /// Retries that ran during shutdown.
    pub retries_run: u64,
    /// Retries not due before the deadline, dead-lettered instead.
    pub dead_lettered: u64,
    /// Events still in rings when the timeout expired (0 unless `timed_out`).
    pub undelivered: u64,
    /// Whether the timeout expired before every worker finished.
    pub timed_out: bool,
    /// The final provider flush's failure, if it failed.
    pub flush_error: Option<String>,
    /// How long shutdown took.
    pub elapsed: Duration,
    /// `true` when the broker was already shut down and this call did nothing.
    pub already_shut_down: bool,
}

/// An event broker. Cheap to clone: clones share one engine, which shuts down when the last is
/// dropped (or at [`Broker::shutdown`]).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
/// use eventbroker::{Broker, Event, EventSource};
///
/// let broker = Broker::builder().build()?;
/// let seen = Arc::new(AtomicUsize::new(0));
/// let counter = Arc::clone(&seen);
/// broker.subscribe("public.users.*", move |event: &Event| {
///     assert_eq!(event.schema, "public");
///     counter.fetch_add(1, Ordering::Relaxed);
///     Ok::<(), std::io::Error>(())
/// })?;
/// broker.publish(Event::for_entity(EventSource::Database, "public", "users", "create"))?;
/// let report = broker.shutdown(Duration::from_secs(5));
/// assert!(!report.timed_out);
/// assert_eq!(seen.load(Ordering::Relaxed), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    instance_id: String,
    mode: Mode,
    retry: RetryPolicy,
    backpressure: Backpressure,
    track_status: bool,
    buffer_size: usize,
    provider: Arc<dyn Provider>,
    shared: Arc<WorkerShared>,
    shards: ShardSet,
    /// Closed once by shutdown; `publish_sync` runs inside it.
    intake: Intake,
    sync: SyncCounters,
    rejected: AtomicU64,
    /// Whether shutdown has run; held while it runs so a second call waits for the first.
    shutdown: parking_lot::Mutex<bool>,
}

/// How long dropping the last handle waits for shutdown.
const DROP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown(DROP_SHUTDOWN_TIMEOUT);
    }
}

impl Broker {
    /// A builder with the defaults: async, one worker per CPU, 1024 events per shard, the memory
    /// provider, the seed's retry policy, block up to 1 s when full.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder {
            mode: Mode::Async,
            workers: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            buffer_size: 1024,
            instance_id: None,
            retry: RetryPolicy::default(),
            backpressure: Backpressure::default(),
            wait: WaitStrategy::default(),
            provider: None,
            track_status: true,
            writer: WriterConfig::default(),
            cache_capacity: 4096,
            max_batch: 256,
        }
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The configured mode.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// The provider events are stored in.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.inner.provider
    }

    /// Subscribes `handler` to the types matching `pattern`. Handlers of one event run in
    /// subscription order; a returned error or a panic counts as a failed delivery.
    ///
    /// # Errors
    /// [`SubscribeError::Pattern`] when the pattern does not parse; [`SubscribeError::Closed`]
    /// after shutdown.
    pub fn subscribe<F, E>(&self, pattern: &str, handler: F) -> Result<SubscriptionId, SubscribeError>
    where
        F: Fn(&Event) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        let handler: Box<Handler> = Box::new(move |event: &Arc<Event>| {
            handler(event).map_err(|e| DeliveryError::Failed(e.into().to_string()))
        });
        self.subscribe_handler(pattern, handler)
    }

    /// Subscribes a bounded channel: matching events arrive on the returned receiver, from sync
    /// code (`recv`) or async code (`recv_async().await`). It holds as many events as one shard
    /// ([`BrokerBuilder::buffer_size`]); see [`Broker::subscribe_stream_bounded`].
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_stream(&self, pattern: &str) -> Result<flume::Receiver<Arc<Event>>, SubscribeError> {
        self.subscribe_stream_bounded(pattern, self.inner.buffer_size)
    }

    /// Like [`Broker::subscribe_stream`] with a receiver of `capacity` events. A full receiver
    /// is a failed delivery (retried, then dead-lettered), never a silent loss. Dropping the
    /// receiver ends the subscription.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// let broker = Broker::builder().build()?;
    /// let events = broker.subscribe_stream_bounded("audit.>", 16)?;
    /// broker.publish(Event::new(EventSource::System, "audit.login"))?;
    /// let event = events.recv_timeout(Duration::from_secs(5))?;
    /// assert_eq!(event.event_type, "audit.login");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_stream_bounded(
        &self,
        pattern: &str,
        capacity: usize,
    ) -> Result<flume::Receiver<Arc<Event>>, SubscribeError> {
        let (tx, rx) = flume::bounded(capacity.max(1));
        let handler: Box<Handler> =
            Box::new(move |event: &Arc<Event>| match tx.try_send(Arc::clone(event)) {
                Ok(()) => Ok(()),
                Err(flume::TrySendError::Full(_)) => {
                    Err(DeliveryError::Failed(format!("stream receiver is full ({capacity} events)")))
                }
                Err(flume::TrySendError::Disconnected(_)) => Err(DeliveryError::Gone),
            });
        self.subscribe_handler(pattern, handler)?;
        Ok(rx)
    }

    fn subscribe_handler(
        &self,
        pattern: &str,
        handler: Box<Handler>,
    ) -> Result<SubscriptionId, SubscribeError> {
        let pattern = Pattern::parse(pattern)?;
        if self.inner.intake.is_closed() {
            return Err(SubscribeError::Closed);
        }
        Ok(self.inner.shared.table.subscribe(pattern, handler))
    }

    /// Ends a subscription; `false` when there was none with this id. Events published after this
    /// returns never reach it; events already in flight may.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.inner.shared.table.unsubscribe(id)
    }

    /// Publishes per the broker's [`Mode`].
    ///
    /// # Errors
    /// As [`Broker::publish_async`] or [`Broker::publish_sync`].
    #[inline]
    pub fn publish(&self, event: Event) -> Result<(), PublishError> {
        match self.inner.mode {
            Mode::Async => self.publish_async(event),
            Mode::Sync => self.publish_sync(event),
        }
    }

    /// Queues the event on its shard and returns.
    ///
    /// # Errors
    /// [`PublishError::InvalidType`], [`PublishError::Full`] (per the [`Backpressure`] policy) or
    /// [`PublishError::Closed`], each handing the event back.
    pub fn publish_async(&self, event: Event) -> Result<(), PublishError> {
        let event = self.inner.admit(event)?;
        let store = if self.inner.track_status { Store::Tracked } else { Store::Untracked };
        match self.inner.enqueue(event, self.inner.patience(), store) {
            Ok(()) => Ok(()),
            Err((error, event)) => Err(self.inner.rejected(error, event)),
        }
    }

    /// Runs the matched handlers on this thread, in subscription order, retrying failures per the
    /// retry policy (sleeping between attempts), and returns once every delivery has ended.
    ///
    /// # Errors
    /// [`PublishError::HandlerFailed`] listing the deliveries that failed after their retries (the
    /// event was delivered to the others; the failures were dead-lettered);
    /// [`PublishError::InvalidType`] or [`PublishError::Closed`] with the event.
    pub fn publish_sync(&self, event: Event) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let Some(_entered) = inner.intake.enter() else {
            // Closed: `admit` reports it (or an invalid type, which takes precedence).
            return Err(match inner.admit(event) {
                Err(error) => error,
                Ok(event) => PublishError::Closed(Box::new(unwrap_event(event))),
            });
        };
        let event = inner.admit(event)?;
        inner.sync.published.fetch_add(1, Ordering::Relaxed);
        if inner.track_status {
            inner.shared.writer.store(Arc::clone(&event));
            inner.shared.writer.status(vec![
                StatusUpdate::new(event.id, EventStatus::Processing)
                    .with_processed_at(jiff::Timestamp::now()),
            ]);
        }
        let set = inner.shared.table.load();
        let subscriptions: smallvec::SmallVec<[Arc<crate::subscription::Subscription>; 8]> =
            set.matches(&event.event_type).values().cloned().collect();
        drop(set);
        let mut failures = Vec::new();
        let mut retries_made = 0;
        for subscription in &subscriptions {
            let failed_attempts =
                match worker::deliver_on_caller(&inner.shared.table, subscription, &event, &inner.retry) {
                    CallerDelivery::Delivered { attempts } => attempts - 1,
                    CallerDelivery::Gone => 0,
                    CallerDelivery::Failed(failure) => {
                        let attempts = failure.attempts;
                        failures.push(failure);
                        attempts
                    }
                };
            let retries = failed_attempts.min(inner.retry.max_retries);
            inner.sync.handler_failures.fetch_add(u64::from(failed_attempts), Ordering::Relaxed);
            inner.sync.retries.fetch_add(u64::from(retries), Ordering::Relaxed);
            retries_made = retries_made.max(retries);
        }
        if subscriptions.is_empty() {
            inner.sync.unrouted.fetch_add(1, Ordering::Relaxed);
        }
        let status = if failures.is_empty() { EventStatus::Completed } else { EventStatus::Failed };
        if failures.is_empty() {
            inner.sync.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            inner.sync.failed.fetch_add(1, Ordering::Relaxed);
            inner.sync.dead_letters.fetch_add(failures.len() as u64, Ordering::Relaxed);
            inner
                .shared
                .writer
                .dead_letters(failures.iter().map(|f| worker::dead_letter(&event, f)).collect());
        }
        if inner.track_status {
            let error = failures.last().map(|f| f.error.clone()).unwrap_or_default();
            inner.shared.writer.status(vec![worker::finished(event.id, status, error, retries_made)]);
        }
        if failures.is_empty() { Ok(()) } else { Err(PublishError::HandlerFailed(failures)) }
    }

    /// Queues many events at once: events are grouped by shard and each group takes its ring
    /// slots with one atomic claim. Always asynchronous, whatever the mode.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// let broker = Broker::builder().build()?;
    /// let events = (0..100).map(|i| Event::new(EventSource::System, format!("batch.e{}", i % 7))).collect();
    /// broker.publish_batch(events)?;
    /// broker.shutdown(Duration::from_secs(5));
    /// assert_eq!(broker.stats().processed, 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`BatchPublishError`] with the events not accepted. An invalid type rejects the whole
    /// batch; a full shard rejects that shard's remaining events (a suffix per partition key, so
    /// republishing them keeps each key's order); after shutdown, the events not yet accepted.
    pub fn publish_batch(&self, events: Vec<Event>) -> Result<(), BatchPublishError> {
        let inner = &*self.inner;
        if let Some((index, error)) = events
            .iter()
            .enumerate()
            .find_map(|(i, e)| validate_event_type(&e.event_type).err().map(|err| (i, err)))
        {
            return Err(BatchPublishError {
                accepted: 0,
                rejected: events,
                reason: BatchRejection::InvalidType { index, error },
            });
        }
        // Each event keeps its position in the batch, to hand rejected ones back in order.
        let mut by_shard: Vec<Vec<(usize, Arc<Event>)>> = vec![Vec::new(); inner.shards.len()];
        for (position, mut event) in events.into_iter().enumerate() {
            if event.instance_id.is_empty() {
                event.instance_id.clone_from(&inner.instance_id);
            }
            by_shard[inner.shards.index_for(event.partition())].push((position, Arc::new(event)));
        }
        let mut accepted = 0;
        let mut rejected: Vec<(usize, Arc<Event>)> = Vec::new();
        let mut reason = None;
        for (shard, mut group) in by_shard.into_iter().enumerate() {
            while !group.is_empty() {
                match inner.reserve(shard, group.len(), inner.patience()) {
                    Ok(reservation) => {
                        let taken: Vec<Arc<Event>> =
                            group.drain(..reservation.len()).map(|(_, e)| e).collect();
                        accepted += taken.len();
                        if inner.track_status {
                            inner.shared.writer.store_many(taken.clone());
                        }
                        reservation.commit(taken.into_iter().map(Some));
                    }
                    Err(error) => {
                        reason.get_or_insert(match error {
                            ReserveError::Full => BatchRejection::Full,
                            ReserveError::Closed => BatchRejection::Closed,
                        });
                        if error == ReserveError::Full {
                            inner.rejected.fetch_add(group.len() as u64, Ordering::Relaxed);
                        }
                        rejected.append(&mut group);
                    }
                }
            }
        }
        match reason {
            None => Ok(()),
            Some(reason) => {
                rejected.sort_unstable_by_key(|(position, _)| *position);
                let rejected = rejected.into_iter().map(|(_, event)| unwrap_event(event)).collect();
                Err(BatchPublishError { accepted, rejected, reason })
            }
        }
    }

    /// Queues the event like [`Broker::publish_async`], then waits until the provider has
    /// persisted the batch holding it. Concurrent confirmed publishes share one provider write
    /// (group commit), so the wait is about one writer period ([`WriterConfig::max_delay`],
    /// 1 ms by default) plus the write.
    ///
    /// The event is dispatched to local subscribers either way; this is for callers that must not
    /// lose an event to a crash.
    ///
    /// # Errors
    /// As [`Broker::publish_async`], before anything was accepted; or
    /// [`PublishError::NotPersisted`] with the provider's error, after the event was accepted and
    /// dispatched (the writer keeps retrying it when the error is transient).
    pub fn publish_confirmed(&self, event: Event) -> Result<(), PublishError> {
        let event = self.inner.admit(event)?;
        let (reply, outcome) = crossbeam_channel::bounded(1);
        if let Err((error, event)) = self.inner.enqueue(event, self.inner.patience(), Store::Confirmed(reply))
        {
            return Err(self.inner.rejected(error, event));
        }
        match outcome.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(PublishError::NotPersisted(error)),
            Err(_) => Err(PublishError::NotPersisted(crate::ProviderError::new(
                self.inner.provider.name(),
                "store_batch",
                crate::ProviderErrorKind::Closed,
            ))),
        }
    }

    /// Writes everything handed to the provider writer so far and waits up to `timeout` for it.
    /// Reads through the provider see every event and status accepted before this call.
    ///
    /// # Errors
    /// [`BrokerError::Provider`] when the write failed; [`BrokerError::Timeout`];
    /// [`BrokerError::Closed`] after shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.inner.shared.writer.flush(timeout)
    }

    /// Dead letters in the provider, after flushing the writer so recent failures are included.
    ///
    /// # Errors
    /// [`BrokerError::Provider`] when the provider fails.
    pub fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, BrokerError> {
        if !self.inner.intake.is_closed() {
            self.flush(FLUSH_TIMEOUT)?;
        }
        Ok(self.inner.provider.list_dead_letters(filter)?)
    }

    /// Delivers a dead letter again, on this thread, to the subscription that failed it, or, when
    /// that subscription is gone, to the live subscriptions with the same pattern (as after a
    /// restart). Retries follow the broker's policy. The dead letter is removed when the delivery
    /// succeeds; a delivery that fails again becomes a new dead letter.
    ///
    /// # Errors
    /// [`BrokerError::NoSuchDeadLetter`]; [`BrokerError::NoSubscriber`] when no subscription can
    /// take it (the dead letter is kept); [`BrokerError::Provider`]; [`BrokerError::Closed`].
    pub fn redrive(&self, id: DeadLetterId) -> Result<RedriveOutcome, BrokerError> {
        let inner = &*self.inner;
        if inner.intake.is_closed() {
            return Err(BrokerError::Closed);
        }
        self.flush(FLUSH_TIMEOUT)?;
        let letter = inner
            .provider
            .get_dead_letter(id)?
            .ok_or_else(|| BrokerError::NoSuchDeadLetter(id.to_string()))?;
        let targets = match inner.shared.table.get(letter.subscription_id) {
            Some(subscription) => vec![subscription],
            None => inner.shared.table.live_with_pattern(&letter.pattern),
        };
        if targets.is_empty() {
            return Err(BrokerError::NoSubscriber { pattern: letter.pattern });
        }
        let mut event = letter.event.clone();
        event.status = EventStatus::Pending;
        event.error.clear();
        event.retry_count = 0;
        event.metadata.insert("redriven_from".into(), letter.id.to_string().into());
        let event = Arc::new(event);
        let mut outcome = RedriveOutcome { delivered: 0, failed: Vec::new() };
        for subscription in &targets {
            match worker::deliver_on_caller(&inner.shared.table, subscription, &event, &inner.retry) {
                CallerDelivery::Delivered { .. } | CallerDelivery::Gone => outcome.delivered += 1,
                CallerDelivery::Failed(failure) => outcome.failed.push(failure),
            }
        }
        if !outcome.failed.is_empty() {
            let letters: Vec<DeadLetter> =
                outcome.failed.iter().map(|f| worker::dead_letter(&event, f)).collect();
            inner.provider.store_dead_letters(&letters)?;
        }
        inner.provider.delete_dead_letter(id)?;
        Ok(outcome)
    }

    /// Re-delivers stored events, oldest first, to the current subscribers: every event from
    /// `from` on whose type matches `pattern` (all when `None`) is published again through the
    /// shards with `"replay": true` in its metadata. Blocks for room as needed, whatever the
    /// backpressure policy.
    ///
    /// # Errors
    /// [`BrokerError::Pattern`]; [`BrokerError::Provider`]; [`BrokerError::Closed`] when shutdown
    /// interrupts the replay.
    pub fn replay(&self, from: ReplayFrom, pattern: Option<&str>) -> Result<ReplayReport, BrokerError> {
        let pattern = pattern.map(Pattern::parse).transpose()?;
        self.flush(FLUSH_TIMEOUT)?;
        let mut report = ReplayReport::default();
        let mut cursor = from;
        loop {
            let page = self.inner.provider.replay(cursor, pattern.as_ref(), REPLAY_PAGE)?;
            let Some(last) = page.last() else { break };
            cursor = ReplayFrom::Sequence(last.seq + 1);
            report.last_seq = Some(last.seq);
            let full_page = page.len() == REPLAY_PAGE;
            for stored in page {
                let mut event = stored.event;
                event.status = EventStatus::Pending;
                event.metadata.insert("replay".into(), true.into());
                self.inner.publish_blocking(event)?;
                report.replayed += 1;
            }
            if !full_page {
                break;
            }
        }
        Ok(report)
    }

    /// Counters of the whole broker and of each shard.
    pub fn stats(&self) -> BrokerStats {
        let inner = &*self.inner;
        let shards = inner.shards.stats();
        let sum = |f: fn(&ShardStats) -> u64| shards.iter().map(f).sum::<u64>();
        let s = &inner.sync;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let queued: usize = shards.iter().map(|s| s.queued).sum();
        let completed = sum(|s| s.completed) + load(&s.completed);
        let failed = sum(|s| s.failed) + load(&s.failed);
        BrokerStats {
            instance_id: inner.instance_id.clone(),
            mode: inner.mode,
            workers: inner.shards.len(),
            subscriptions: inner.shared.table.len(),
            published: sum(|s| s.dispatched) + queued as u64 + load(&s.published),
            processed: completed + failed,
            completed,
            failed,
            unrouted: sum(|s| s.unrouted) + load(&s.unrouted),
            handler_failures: sum(|s| s.handler_failures) + load(&s.handler_failures),
            retries: sum(|s| s.retries) + load(&s.retries),
            dead_letters: sum(|s| s.dead_letters) + load(&s.dead_letters),
            rejected: load(&inner.rejected),
            queued,
            pending_retries: sum(|s| s.pending_retries),
            writer: inner.shared.writer.stats(),
            shards,
        }
    }

    /// Stops accepting events, drains every shard, runs retries that come due before `timeout`
    /// (dead-lettering the rest), flushes the provider writer and closes the provider. Bounded by
    /// `timeout`; a second call returns at once with [`ShutdownReport::already_shut_down`].
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.shutdown(timeout)
    }
}

/// How long broker operations that read through the provider wait for the writer to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replay waits for room in a shard: as long as it takes, in practice.
const REPLAY_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// Events fetched from the provider per replay call.
const REPLAY_PAGE: usize = 512;

/// What [`Broker::redrive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// Subscriptions the event was delivered to.
    pub delivered: usize,
    /// Deliveries that failed again (each is a new dead letter).
    pub failed: Vec<DeliveryFailure>,
}

/// What [`Broker::replay`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events published again.
    pub replayed: u64,
    /// Sequence of the last event replayed; resume from the next one.
    pub last_seq: Option<u64>,
}

/// How an enqueued event reaches the provider.
enum Store {
    /// Not at all (status tracking is off).
    Untracked,
    /// Through the writer, with its status changes.
    Tracked,
    /// Through the writer, reporting the write's outcome here.
    Confirmed(crate::dispatch::writer::Reply),
}

/// Takes back an event that was wrapped for publishing but not accepted. Nothing else holds it
/// then, so this does not copy.
fn unwrap_event(event: Arc<Event>) -> Event {
    Arc::try_unwrap(event).unwrap_or_else(|shared| (*shared).clone())
}

impl Inner {
    /// Checks an event can be published and fills in the instance id.
    /// Moves the event to the heap, once: it is 300-odd bytes, and the handlers share it.
    #[inline]
    fn admit(&self, mut event: Event) -> Result<Arc<Event>, PublishError> {
        if let Err(error) = validate_event_type(&event.event_type) {
            return Err(PublishError::InvalidType { event: Box::new(event), error });
        }
        if self.intake.is_closed() {
            return Err(PublishError::Closed(Box::new(event)));
        }
        if event.instance_id.is_empty() {
            event.instance_id.clone_from(&self.instance_id);
        }
        Ok(Arc::new(event))
    }

    /// How long a publish may wait for room, per the backpressure policy.
    fn patience(&self) -> Option<Duration> {
        match self.backpressure {
            Backpressure::Reject => None,
            Backpressure::Block(timeout) => Some(timeout),
        }
    }

    /// The two-phase publish of one event: reserve a slot on its shard, hand the event's store to
    /// the writer, then commit the slot. The writer therefore always has the store before the
    /// worker can send any status of the event, and an event refused for room is stored nowhere.
    /// A refused event comes back with the reason.
    fn enqueue(
        &self,
        event: Arc<Event>,
        patience: Option<Duration>,
        store: Store,
    ) -> Result<(), (ReserveError, Arc<Event>)> {
        let shard = self.shards.index_for(event.partition());
        let reservation = match self.reserve(shard, 1, patience) {
            Ok(reservation) => reservation,
            Err(error) => return Err((error, event)),
        };
        match store {
            Store::Untracked => {}
            Store::Tracked => self.shared.writer.store(Arc::clone(&event)),
            Store::Confirmed(reply) => self.shared.writer.store_confirmed(Arc::clone(&event), reply),
        }
        reservation.commit(std::iter::once(Some(event)));
        Ok(())
    }

    /// Reserves up to `want` consecutive slots of `shard` (at least one), waiting up to `patience`
    /// (not at all when `None`); the writer's backlog must have room too when statuses are
    /// tracked. The clock is read only once a first attempt fails.
    fn reserve(
        &self,
        shard: usize,
        want: usize,
        patience: Option<Duration>,
    ) -> Result<Reservation<'_, Job>, ReserveError> {
        let shard = self.shards.shard(shard);
        let producer = &shard.producer;
        let mut deadline = None;
        let mut backoff = Backoff::new();
        loop {
            let backlogged = self.track_status && !self.shared.writer.has_room(1);
            if !backlogged {
                match producer.try_reserve(want) {
                    Ok(reservation) => return Ok(reservation),
                    Err(ReserveError::Closed) => return Err(ReserveError::Closed),
                    Err(ReserveError::Full) => {}
                }
            } else if producer.is_closed() {
                return Err(ReserveError::Closed);
            }
            let Some(patience) = patience else { return Err(ReserveError::Full) };
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + patience);
            if Instant::now() >= deadline {
                return Err(ReserveError::Full);
            }
            if backoff.snooze() {
                continue;
            }
            if backlogged {
                // The writer signals nobody when it catches up: poll on a growing timer.
                backoff.sleep();
            } else {
                shard.space.wait_until(deadline, || !producer.is_full() || producer.is_closed());
            }
        }
    }

    fn rejected(&self, error: ReserveError, event: Arc<Event>) -> PublishError {
        let event = Box::new(unwrap_event(event));
        match error {
            ReserveError::Full => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                PublishError::Full(event)
            }
            ReserveError::Closed => PublishError::Closed(event),
        }
    }

    /// Publishes asynchronously, waiting for room however long it takes (replay).
    fn publish_blocking(&self, event: Event) -> Result<(), BrokerError> {
        let event = self.admit(event).map_err(|_| BrokerError::Closed)?;
        let store = if self.track_status { Store::Tracked } else { Store::Untracked };
        match self.enqueue(event, Some(REPLAY_WAIT), store) {
            Ok(()) => Ok(()),
            Err((ReserveError::Closed, _)) => Err(BrokerError::Closed),
            Err((ReserveError::Full, _)) => Err(BrokerError::Timeout(REPLAY_WAIT)),
        }
    }

    fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut done = self.shutdown.lock();
        if *done {
            return ShutdownReport { already_shut_down: true, ..ShutdownReport::default() };
        }
        *done = true;
        self.intake.close();
        let queued_at_start = self.shards.queued() as u64;
        *self.shared.shutdown_deadline.lock() = Some(deadline);
        self.shards.close();
        let mut backoff = Backoff::new();
        while !self.intake.is_idle() && Instant::now() < deadline {
            if !backoff.snooze() {
                backoff.sleep();
            }
        }
        let (reports, all_exited) = self.shards.join(deadline);
        let undelivered = if all_exited { 0 } else { self.shards.queued() as u64 };
        let flush = self.shared.writer.shutdown(deadline.saturating_duration_since(Instant::now()));
        let flush_error = flush.err().map(|e| e.to_string());
        if let Err(error) = self.provider.close() {
            tracing::warn!(%error, "closing the provider failed");
        }
        let report = ShutdownReport {
            drained: queued_at_start.saturating_sub(undelivered),
            retries_run: reports.iter().map(|r| r.retries_run).sum(),
            dead_lettered: reports.iter().map(|r| r.dead_lettered_at_shutdown).sum(),
            undelivered,
            timed_out: !all_exited,
            flush_error,
            elapsed: started.elapsed(),
            already_shut_down: false,
        };
        tracing::info!(?report, "event broker shut down");
        report
    }
}
