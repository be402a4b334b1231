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
//! ## Across instances
//! Brokers that share a provider receive each other's events ([`Distribution`]): fan-out (every
//! instance gets every event) or work-queue (a group shares them). Inbound events enter the shards
//! like local ones (same ordering per partition key, same handlers, same retries) and are
//! acknowledged to the provider only once every delivery has ended, completed or dead-lettered
//! durably: at least once, never echoed back to their publisher.
//!
//! ## Backpressure
//! A shard's ring holds [`BrokerBuilder::buffer_size`] events (its worker may hold one more batch
//! of up to 256 it is working through). When the ring is full, [`Backpressure::Reject`] returns
//! [`PublishError::Full`] at once, with the event; [`Backpressure::Block`] (the default, 1 s)
//! waits for room up to its timeout first — except in a handler publishing into its own worker's
//! shard, which only that worker could empty: there it never waits. Nothing is dropped silently:
//! an event is either accepted, and then handled and tracked, or handed back.
//!
//! ## Delivery
//! Handlers run in subscription order. A handler that fails or panics is retried per the
//! [`RetryPolicy`], without delaying other handlers or other events; after the last retry the
//! delivery becomes a dead letter ([`Broker::dead_letters`], [`Broker::redrive`]). An event
//! published after [`Broker::unsubscribe`] returns never reaches that subscription.
//!
//! ## Handles and shutdown
//! [`Broker::shutdown`] stops fetching and accepting, drains every shard, runs the retries that
//! come due before its timeout (dead-lettering the rest), flushes the provider writer and closes
//! the provider — unless something else still holds it (other brokers on the same in-process bus,
//! or the application), which then closes it; every step is bounded by the timeout. Dropping the
//! last [`Broker`] handle does the same, with a 30 s timeout by default
//! ([`BrokerBuilder::drop_shutdown_timeout`]). A handler that needs the broker should capture a
//! [`WeakBroker`]
//! ([`Broker::downgrade`]): a strong handle inside a handler keeps the broker alive until an
//! explicit `shutdown`, which then drops the handlers and the cycle with them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::dispatch::acked::AckedChannel;
use crate::error::{
    BatchPublishError, BoxError, BrokerError, ConfirmError, DrainError, PublishError, SubscribeError,
    SyncPublishError,
};
use crate::provider::{DeadLetter, DeadLetterFilter, DeadLetterId, Provider, ReplayCursor};
use crate::subscription::{DeliveryError, Handler, StreamChannel, Target};
use crate::{Delivery, Event, Pattern, SubscriptionId};

mod builder;
mod claim;
mod drain;
mod engine;
mod recovery;
mod shutdown;
mod stats;

pub use self::builder::{
    BrokerBuilder, Distribution, MAX_BUFFER_SIZE, MAX_MATCH_CACHE_CAPACITY, MAX_WORKERS, Mode,
};
pub use self::recovery::{RedriveOutcome, ReplayReport};
pub use self::shutdown::{CloseOutcome, ShutdownReport};
pub use self::stats::BrokerStats;
pub use crate::dispatch::backpressure::Backpressure;

use self::engine::Engine;
use self::recovery::FLUSH_TIMEOUT;

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
/// broker.subscribe_infallible("public.users.*", move |event: &Event| {
///     assert_eq!(event.schema, "public");
///     counter.fetch_add(1, Ordering::Relaxed);
/// })?;
/// broker.publish(Event::for_entity(EventSource::Database, "public", "users", "create"))?;
/// let report = broker.shutdown(Duration::from_secs(5));
/// assert!(report.is_clean());
/// assert_eq!(seen.load(Ordering::Relaxed), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Broker {
    handle: Arc<Handle>,
}

/// What user handles share: its drop (the last handle gone) shuts the engine down.
struct Handle {
    engine: Arc<Engine>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Shutdown logs its report, at warn level when it is not clean; nobody is left to read it.
        let _report = self.engine.shutdown(self.engine.drop_timeout);
    }
}

/// A handle that does not keep the broker alive: what a handler should capture to publish or
/// subscribe from inside the broker. [`upgrade`](Self::upgrade) gives a [`Broker`] while any strong
/// handle exists.
///
/// ```
/// use std::time::Duration;
/// use eventbroker::{Broker, Event, EventSource};
///
/// let broker = Broker::builder().build()?;
/// let weak = broker.downgrade();
/// broker.subscribe_infallible("orders.created", move |event: &Event| {
///     if let Some(broker) = weak.upgrade() {
///         let _ = broker.publish(Event::new(EventSource::Internal, "orders.audited"));
///     }
/// })?;
/// let (_, audited) = broker.subscribe_stream("orders.audited")?;
/// broker.publish(Event::new(EventSource::Internal, "orders.created"))?;
/// assert!(audited.recv_timeout(Duration::from_secs(5)).is_ok());
/// drop(broker); // the handler's weak handle does not keep it alive
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct WeakBroker {
    handle: Weak<Handle>,
}

impl WeakBroker {
    /// A strong handle, unless every one is gone (the broker is shutting down or shut down).
    pub fn upgrade(&self) -> Option<Broker> {
        self.handle.upgrade().map(|handle| Broker { handle })
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("instance_id", &self.engine().instance_id).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("instance_id", &self.engine.instance_id).finish_non_exhaustive()
    }
}

impl Broker {
    /// A builder with the defaults: async, one worker per CPU, 1024 events per shard, the memory
    /// provider, the seed's retry policy, block up to 1 s when full.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.handle.engine
    }

    /// A handle that does not keep the broker alive; see [`WeakBroker`].
    pub fn downgrade(&self) -> WeakBroker {
        WeakBroker { handle: Arc::downgrade(&self.handle) }
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.engine().instance_id
    }

    /// The configured mode.
    pub fn mode(&self) -> Mode {
        self.engine().mode
    }

    /// The provider events are stored in.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.engine().provider
    }

    /// Subscribes `handler` to the types matching `pattern`. Handlers of one event run in
    /// subscription order; a returned error or a panic counts as a failed delivery.
    ///
    /// When the broker receives from other instances, the new pattern reaches the provider's
    /// filter before this returns, so events other instances publish from then on are delivered.
    ///
    /// The handler's error is any type that converts into a [`BoxError`]: a `String`, a `&str`,
    /// any `std::error::Error`. A handler that uses `?` on more than one error type, and so ends
    /// in a bare `Ok(())` the compiler cannot type, names [`BoxError`] (or one error type of its
    /// own) as its error:
    ///
    /// ```
    /// use eventbroker::{BoxError, Broker, Event};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Order {
    ///     id: u64,
    /// }
    ///
    /// let broker = Broker::builder().build()?;
    /// broker.subscribe("public.orders.*", |event: &Event| {
    ///     let order: Order = event.payload()?; // a `PayloadError`
    ///     let _ = std::fs::metadata(format!("/tmp/order-{}", order.id))?; // an `io::Error`
    ///     Ok::<(), BoxError>(())
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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

    /// Subscribes a handler that cannot fail (it may still panic, which counts as a failure).
    ///
    /// ```
    /// use eventbroker::{Broker, Event};
    ///
    /// let broker = Broker::builder().build()?;
    /// broker.subscribe_infallible("audit.>", |event: &Event| println!("{}", event.event_type))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_infallible<F>(&self, pattern: &str, handler: F) -> Result<SubscriptionId, SubscribeError>
    where
        F: Fn(&Event) + Send + Sync + 'static,
    {
        let handler: Box<Handler> = Box::new(move |event: &Arc<Event>| {
            handler(event);
            Ok(())
        });
        self.subscribe_handler(pattern, handler)
    }

    /// Subscribes a bounded channel: matching events arrive on the returned receiver (a
    /// [`flume::Receiver`], the crate re-exported as `eventbroker::flume`), from sync code
    /// (`recv`) or async code (`recv_async().await`); the id ends the subscription with
    /// [`Broker::unsubscribe`], which disconnects the receiver once it has read what the channel
    /// holds. The channel holds as many events as one shard
    /// ([`BrokerBuilder::buffer_size`]); a full receiver is a failed delivery, retried and then
    /// dead-lettered, as [`Broker::subscribe_stream_bounded`] says. A delivery ends once the event
    /// is in the channel (an event from another instance is then acknowledged, when its other
    /// deliveries ended too): what the consumer does with it afterwards is its own to retry.
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_stream(
        &self,
        pattern: &str,
    ) -> Result<(SubscriptionId, flume::Receiver<Arc<Event>>), SubscribeError> {
        self.subscribe_stream_bounded(pattern, self.engine().buffer_size)
    }

    /// Like [`Broker::subscribe_stream`] with a receiver of `capacity` events. A full receiver
    /// is a failed delivery (retried per the broker's policy, then dead-lettered, and the event's
    /// status `failed`), never a silent loss: size the receiver for the bursts its consumer must
    /// absorb, or subscribe a handler that decides itself what to drop. Dropping the receiver ends
    /// the subscription when the next matching event finds it gone, or, on a broker that receives
    /// other instances' events, within about a second, whichever comes first (until then it counts
    /// in [`BrokerStats::subscriptions`](crate::BrokerStats::subscriptions), and its pattern stays
    /// in the filter other instances' events are fetched by).
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// let broker = Broker::builder().build()?;
    /// let (id, events) = broker.subscribe_stream_bounded("audit.>", 16)?;
    /// broker.publish(Event::new(EventSource::System, "audit.login"))?;
    /// let event = events.recv_timeout(Duration::from_secs(5))?;
    /// assert_eq!(event.event_type, "audit.login");
    ///
    /// broker.unsubscribe(id);
    /// assert_eq!(events.recv_timeout(Duration::from_secs(5)), Err(eventbroker::flume::RecvTimeoutError::Disconnected));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_stream_bounded(
        &self,
        pattern: &str,
        capacity: usize,
    ) -> Result<(SubscriptionId, flume::Receiver<Arc<Event>>), SubscribeError> {
        let (channel, receiver) = StreamChannel::new(capacity);
        let id = self.subscribe_target(pattern, Target::Stream(channel))?;
        Ok((id, receiver))
    }

    /// Subscribes a channel of [`Delivery`] values that each end when their consumer says so:
    /// [`Delivery::ack`] when it is done, [`Delivery::fail`] when it could not be. The consumer may
    /// be sync or async code (`recv_async().await` on the [`flume::Receiver`]), settle deliveries
    /// in any order and hold many at once. Until a delivery is settled its event's handling has not
    /// ended: [`Broker::drain`] waits for it, the status this broker writes stays `processing`
    /// (it writes those of its own events, and of events no broker published, such as captured
    /// database changes; another instance's event has its statuses from its publisher), and an
    /// event from another instance is not acknowledged to the provider, so an instance that dies
    /// before its consumer finished gets the event again. That is what [`Broker::subscribe_stream`], whose
    /// delivery ends once the event is in the channel, cannot give async code.
    ///
    /// A failure, a delivery dropped unsettled, and one not settled within
    /// [`BrokerBuilder::ack_timeout`] (30 s by default) are retried per the broker's retry policy
    /// (a new [`Delivery`] with the next [`attempt`](Delivery::attempt) number), then
    /// dead-lettered, as a handler's failure is; a settle that comes after the timeout is ignored
    /// (a consumer that fell behind can tell such a delivery by [`Delivery::is_expired`]).
    /// The channel holds as many deliveries as one shard holds events; a full channel is a failed
    /// attempt, as for [`Broker::subscribe_stream`]. Dropping the receiver (every clone of it)
    /// ends the subscription within about 100 ms while deliveries wait, within about a second on a
    /// broker that receives other instances' events, or when the next matching event finds it
    /// gone: that event is not delivered to it, as after [`Broker::unsubscribe`]
    /// (in a work queue, another instance's event fetched for it and wanted by no other
    /// subscriber here goes back to its group for another member:
    /// [`BrokerStats::returned`](crate::BrokerStats::returned)). The deliveries left in the channel
    /// fail, and those the consumer still holds count when acked and fail when failed or
    /// dropped: with no retry (nobody is left to make it), a local event is dead-lettered, and,
    /// in a work queue, another instance's event goes back to its group, unless another of its
    /// deliveries was dead-lettered here (then it is dead-lettered too).
    ///
    /// Deliveries of one shard's events are made in order, but a consumer that settles them
    /// concurrently ends them in any order, as retries do. [`Broker::publish_sync`] and
    /// [`Broker::redrive`] deliver on the caller's thread and wait there for the settle (up to
    /// the timeout): call them from a thread the consumer does not need, never from the one
    /// thread of a current-thread runtime the consumer runs on.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource, EventStatus};
    ///
    /// let broker = Broker::builder().build()?;
    /// let (_id, deliveries) = broker.subscribe_acked("orders.>")?;
    /// let consumer = std::thread::spawn(move || {
    ///     // Or, in async code: `while let Ok(delivery) = deliveries.recv_async().await`.
    ///     while let Ok(delivery) = deliveries.recv() {
    ///         if delivery.event().payload_json().is_none() {
    ///             delivery.fail("an order without a body");
    ///         } else {
    ///             delivery.ack();
    ///         }
    ///     }
    /// });
    ///
    /// let event = Event::new(EventSource::System, "orders.created").with_payload(&serde_json::json!({"id": 1}))?;
    /// let id = event.id;
    /// broker.publish(event)?;
    /// broker.drain(Duration::from_secs(5))?;
    /// assert_eq!(broker.provider().get(id)?.map(|e| e.status), Some(EventStatus::Completed));
    ///
    /// broker.shutdown(Duration::from_secs(5));
    /// consumer.join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_acked(
        &self,
        pattern: &str,
    ) -> Result<(SubscriptionId, flume::Receiver<Delivery>), SubscribeError> {
        self.subscribe_acked_bounded(pattern, self.engine().buffer_size)
    }

    /// Like [`Broker::subscribe_acked`] with a channel of `capacity` deliveries (at least 1). It
    /// bounds the deliveries made and not yet received, not those received and not yet settled.
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_acked_bounded(
        &self,
        pattern: &str,
        capacity: usize,
    ) -> Result<(SubscriptionId, flume::Receiver<Delivery>), SubscribeError> {
        let (channel, receiver) = AckedChannel::new(capacity);
        let id = self.subscribe_target(pattern, Target::Acked(channel))?;
        Ok((id, receiver))
    }

    fn subscribe_handler(
        &self,
        pattern: &str,
        handler: Box<Handler>,
    ) -> Result<SubscriptionId, SubscribeError> {
        self.subscribe_target(pattern, Target::Handler(handler))
    }

    fn subscribe_target(&self, pattern: &str, target: Target) -> Result<SubscriptionId, SubscribeError> {
        let pattern = Pattern::parse(pattern)?;
        let engine = self.engine();
        if engine.intake.is_closed() {
            return Err(SubscribeError::Closed);
        }
        let id = engine.shared.table.subscribe(pattern, target);
        if engine.intake.is_closed() {
            // Shutdown may have ended every subscription just before this one came in, and
            // would leave this one's channel open for good: end it here.
            engine.shared.table.unsubscribe(id);
            return Err(SubscribeError::Closed);
        }
        if let Some(pump) = &engine.inbound {
            pump.sync_filter(&engine.shared.table);
        }
        Ok(id)
    }

    /// Ends a subscription; `false` when there was none with this id. Events published after this
    /// returns never reach it; events already in flight may, except through a channel: a
    /// stream's receiver ([`Broker::subscribe_stream`]) disconnects at once, once it has read the
    /// events its channel holds, and an event in flight is not put in it any more (as when its
    /// receiver is dropped), but for one a worker was putting in as this call ran, which may
    /// still arrive. An acknowledged subscription's receiver disconnects at once too: the
    /// deliveries left in its channel fail; those its consumer holds still count when acked, and
    /// fail when failed or dropped. A failed one is dead-lettered, or, in a work queue, given back
    /// to its group if it is another instance's and no other delivery of it was dead-lettered
    /// here (an event this member holds a dead letter of stays with it, its other letters beside).
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.engine().shared.table.unsubscribe(id)
    }

    /// Publishes per the broker's [`Mode`].
    ///
    /// # Errors
    /// As [`Broker::publish_async`] (wrapped in [`SyncPublishError::Rejected`]) or
    /// [`Broker::publish_sync`].
    #[inline]
    pub fn publish(&self, event: Event) -> Result<(), SyncPublishError> {
        self.engine().publish(event)
    }

    /// Queues the event on its shard and returns; the handlers run on the shard's worker. Not an
    /// `async fn`: when the shard is full it blocks the calling thread for as long as the
    /// [`Backpressure`] policy says (up to 1 s by default). On an async runtime's threads use
    /// [`Broker::publish_when_room`], which waits without blocking, or [`Broker::try_publish`],
    /// which never waits.
    ///
    /// # Errors
    /// [`PublishError::InvalidType`] or [`PublishError::InvalidMetadata`], [`PublishError::Full`]
    /// (per the [`Backpressure`] policy) or [`PublishError::Closed`], each handing the event back.
    #[inline]
    pub fn publish_async(&self, event: Event) -> Result<(), PublishError> {
        self.engine().publish_async(event)
    }

    /// Queues the event like [`Broker::publish_async`], for async code: where that blocks its
    /// thread while the shard is full, this future is pending, and the task is woken as soon as
    /// the shard's worker frees a slot. It waits as long as the [`Backpressure`] policy says (up to
    /// 1 s by default; not at all under [`Backpressure::Reject`]), timed without any particular
    /// runtime (by `futures-timer`'s one thread per process, started at the first wait): Tokio,
    /// async-std, smol or a plain executor. When there is room it queues the event
    /// before its first `.await` returns, as `publish_async` would. Dropping the future before it
    /// is ready leaves the event unpublished. Always asynchronous, whatever the [`Mode`], as
    /// `publish_async` is: the handlers run on the shard's worker. The future borrows the broker:
    /// to spawn it as a task of its own, move a clone of the handle in
    /// (`let b = broker.clone(); tokio::spawn(async move { b.publish_when_room(event).await })`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = Broker::builder().build()?;
    /// let (_, events) = broker.subscribe_stream("orders.>")?;
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    /// runtime.block_on(async {
    ///     broker.publish_when_room(Event::new(EventSource::Internal, "orders.created")).await?;
    ///     let event = events.recv_async().await?;
    ///     assert_eq!(event.event_type, "orders.created");
    ///     Ok::<_, Box<dyn std::error::Error>>(())
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Broker::publish_async`]: the event is handed back.
    pub async fn publish_when_room(&self, event: Event) -> Result<(), PublishError> {
        self.engine().publish_when_room(event).await
    }

    /// Queues the event on its shard without waiting for room, whatever the [`Backpressure`]
    /// policy: a full shard (or writer backlog) hands it back at once. For callers that must never
    /// wait, such as the [CRUD hooks](crate::hooks).
    ///
    /// ```
    /// use eventbroker::{Broker, Event, EventSource, PublishError};
    ///
    /// let broker = Broker::builder().build()?;
    /// match broker.try_publish(Event::new(EventSource::Internal, "cache.invalidated")) {
    ///     Ok(()) => {}
    ///     Err(PublishError::Full(event)) => eprintln!("busy; dropping {}", event.id),
    ///     Err(other) => return Err(other.into()),
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Broker::publish_async`], never waiting.
    #[inline]
    pub fn try_publish(&self, event: Event) -> Result<(), PublishError> {
        self.engine().publish_within(event, None)
    }

    /// Runs the matched handlers on this thread, in subscription order, retrying failures per the
    /// retry policy (sleeping between attempts), and returns once every delivery has ended. The
    /// event's status is `processing` while the handlers run; a retry whose subscription was
    /// ended ([`Broker::unsubscribe`]) while it waited is not made, and its delivery fails.
    ///
    /// # Errors
    /// [`SyncPublishError::HandlerFailed`] listing the deliveries that failed after their retries
    /// (the event was delivered to the others; the failures were dead-lettered);
    /// [`SyncPublishError::Rejected`] with the event when it was not accepted.
    pub fn publish_sync(&self, event: Event) -> Result<(), SyncPublishError> {
        self.engine().publish_sync(event)
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
    /// broker.drain(Duration::from_secs(5))?;
    /// assert_eq!(broker.stats().processed, 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`BatchPublishError`] with the events not accepted. An invalid type rejects the whole
    /// batch; a full shard rejects that shard's remaining events (a suffix per partition key, so
    /// republishing them keeps each key's order); after shutdown, the events not yet accepted.
    pub fn publish_batch(&self, events: Vec<Event>) -> Result<(), BatchPublishError> {
        self.engine().publish_batch(events)
    }

    /// Queues the event like [`Broker::publish_async`], then waits up to `timeout` until the
    /// provider has persisted the batch holding it. Concurrent confirmed publishes share one
    /// provider write (group commit), so the wait is about one writer period
    /// ([`WriterConfig::max_delay`](crate::WriterConfig::max_delay), 1 ms by default) plus the write.
    ///
    /// The event is dispatched to local subscribers either way; this is for callers that must not
    /// lose an event to a crash. It blocks the calling thread while it waits. The wait ends at the
    /// first write that holds the event, whether it succeeded or failed: a transient failure is
    /// reported at once as [`ConfirmError::NotPersisted`], not retried until `timeout`. The writer
    /// goes on retrying it; a later [`Broker::flush`] that returns `Ok` says it got through.
    ///
    /// # Errors
    /// [`ConfirmError::Rejected`] before anything was accepted; after the event was accepted and
    /// dispatched, [`ConfirmError::NotPersisted`] with the provider's error (the writer keeps
    /// retrying it when the error is transient) or [`ConfirmError::TimedOut`].
    pub fn publish_confirmed(&self, event: Event, timeout: Duration) -> Result<(), ConfirmError> {
        self.engine().publish_confirmed(event, timeout)
    }

    /// [`Broker::publish_confirmed`] for async code: waits for room as
    /// [`Broker::publish_when_room`] does, then up to `timeout` for the provider's write, both
    /// without blocking the thread (the future is pending while it waits). For a request handler
    /// that must not answer before its event is durable: the write is shared with the other
    /// confirmed publishes of the moment, about one writer period
    /// ([`WriterConfig::max_delay`](crate::WriterConfig::max_delay), 1 ms by default) plus the
    /// write. Dropping the future once the event is queued does not take it back: it is
    /// dispatched and written all the same, unconfirmed.
    ///
    /// `timeout` bounds the wait for the write alone: the wait for room comes first, up to the
    /// [`Backpressure`](crate::Backpressure) patience, so the whole call takes at most that plus
    /// `timeout`. With the memory provider and status tracking on (the defaults) the write is
    /// made at once, on the calling thread, and the future is ready at its first poll (with
    /// tracking off it goes through the writer, as with other providers); "durable" then means
    /// the process's memory. As for the blocking call, a
    /// [`ConfirmError::NotPersisted`] event was accepted, and the writer keeps retrying a
    /// transient failure: publishing it again would store and dispatch it twice.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventbroker::{Broker, Event, EventSource};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = Broker::builder().build()?;
    /// let order = Event::new(EventSource::Frontend, "orders.placed");
    /// let id = order.id;
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    /// runtime.block_on(broker.publish_confirmed_when_room(order, Duration::from_secs(5)))?;
    /// assert!(broker.provider().get(id)?.is_some(), "stored before the future was ready");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Broker::publish_confirmed`].
    pub async fn publish_confirmed_when_room(
        &self,
        event: Event,
        timeout: Duration,
    ) -> Result<(), ConfirmError> {
        self.engine().publish_confirmed_when_room(event, timeout).await
    }

    /// Writes everything handed to the provider writer so far and waits up to `timeout` for it.
    /// Reads through the provider see every event and status accepted before this call.
    ///
    /// # Errors
    /// [`BrokerError::WritesDropped`] when writes were given up after permanent provider errors
    /// since a flush last reported any (each is reported once); [`BrokerError::Provider`] when the
    /// write is failing now (the writer keeps retrying it); [`BrokerError::Timeout`];
    /// [`BrokerError::Closed`] after shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.engine().shared.writer.flush(timeout)
    }

    /// Waits until every event accepted before this call — published here (by
    /// [`Broker::publish_sync`] and [`Broker::redrive`] on other threads too, which it waits for to
    /// return), or fetched from other instances and placed into a shard — has been handled
    /// (completed, or failed and dead-lettered, retries included), and the statuses, dead letters
    /// and acknowledgements this
    /// produced are written to the provider. The broker keeps running: what tests and graceful
    /// handovers need. Events published while it waits are not waited for, though a delivery of
    /// theirs waiting for a retry holds it up (it waits until no retry is pending). Costs publishing
    /// nothing: it polls the counters the workers publish each turn.
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
    /// broker.subscribe_infallible("orders.*", move |_| {
    ///     counter.fetch_add(1, Ordering::Relaxed);
    /// })?;
    /// for _ in 0..100 {
    ///     broker.publish(Event::new(EventSource::Internal, "orders.created"))?;
    /// }
    /// broker.drain(Duration::from_secs(5))?;
    /// assert_eq!(seen.load(Ordering::Relaxed), 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`DrainError::TimedOut`] with what was left; [`DrainError::Write`] when the provider
    /// writer did not confirm the writes (as [`Broker::flush`]); [`DrainError::InHandler`] from a
    /// handler of this broker (on a worker, or run by `publish_sync` or `redrive` on the caller's
    /// thread: it would wait for itself); [`DrainError::Closed`] after shutdown.
    pub fn drain(&self, timeout: Duration) -> Result<(), DrainError> {
        self.engine().drain(timeout)
    }

    /// Dead letters in the provider, after flushing the writer so recent failures are included.
    /// After shutdown they can still be read from a provider others hold (left open).
    ///
    /// # Errors
    /// [`BrokerError::Provider`] when the provider fails; [`BrokerError::Closed`] once shutdown
    /// has closed the provider.
    pub fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, BrokerError> {
        let engine = self.engine();
        let shut_down = engine.intake.is_closed();
        if !shut_down {
            engine.shared.writer.flush_for_read(FLUSH_TIMEOUT)?;
        }
        engine.provider.list_dead_letters(filter).map_err(|error| {
            if shut_down && error.kind() == &crate::ProviderErrorKind::Closed {
                BrokerError::Closed
            } else {
                error.into()
            }
        })
    }

    /// Delivers a dead letter again, on this thread, to the subscription that failed it, or, when
    /// that subscription is gone or was another broker's (a letter of another instance sharing the
    /// provider, or of this service before a restart), to this broker's live subscriptions with the
    /// same pattern. Retries follow the broker's policy. The dead letter is deleted only after the
    /// delivery ran, its new dead letter (when it failed again) was stored and the event's status
    /// written: a failure in between keeps it (it may then be delivered twice, never lost).
    ///
    /// With status tracking on, the stored status of an event of this broker's (or of one no
    /// broker published, a captured row say; another instance's event's status is its
    /// publisher's) then tells how its latest handling went: `failed`, with the new error, when a delivery failed again; `completed` when none did
    /// and the event has no dead letter left (when two subscriptions failed it, it stays `failed`
    /// until both letters are redriven). Either way its `processed_at` and `completed_at` are this
    /// redrive's and `retry_count` the retries it took; [`RedriveOutcome::status`] says what was
    /// written. Handler failures, retries and new dead letters count in [`Broker::stats`] as any
    /// delivery's; `completed` and `failed` count each event once, at its first handling.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::time::Duration;
    /// use eventbroker::{Broker, DeadLetterFilter, Event, EventSource, EventStatus, RetryPolicy};
    ///
    /// let broker = Broker::builder().retry_policy(RetryPolicy::none()).build()?;
    /// let fixed = Arc::new(AtomicBool::new(false));
    /// let handler_fixed = Arc::clone(&fixed);
    /// broker.subscribe("orders.*", move |_| {
    ///     if handler_fixed.load(Ordering::Relaxed) { Ok(()) } else { Err("the ledger is down") }
    /// })?;
    /// let event = Event::new(EventSource::Internal, "orders.paid");
    /// let id = event.id;
    /// broker.publish(event)?;
    /// broker.drain(Duration::from_secs(5))?;
    ///
    /// fixed.store(true, Ordering::Relaxed);
    /// let letter = broker.dead_letters(&DeadLetterFilter::new().with_event_id(id))?.remove(0);
    /// let outcome = broker.redrive(letter.id)?;
    /// assert_eq!((outcome.delivered, outcome.status), (1, Some(EventStatus::Completed)));
    /// assert_eq!(broker.provider().get(id)?.unwrap().status, EventStatus::Completed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`BrokerError::NoSuchDeadLetter`]; [`BrokerError::NoSubscriber`] when no subscription can
    /// take it (the dead letter is kept); [`BrokerError::StillHandling`] while another delivery of
    /// the event waits for a retry or an acknowledgement, or another redrive of the event (of this
    /// letter or another of its) runs on another thread (the dead letter is kept);
    /// [`BrokerError::Provider`]; [`BrokerError::Closed`].
    pub fn redrive(&self, id: DeadLetterId) -> Result<RedriveOutcome, BrokerError> {
        self.engine().redrive(id)
    }

    /// Re-delivers stored events, oldest first, to the current subscribers: every event from
    /// `from` on (a [`ReplayFrom`](crate::ReplayFrom), or the [`ReplayCursor`] of an earlier
    /// replay: [`ReplayReport::resume_from`], or the `resume_from` of a replay that stopped with
    /// [`BrokerError::ReplayFull`] or [`BrokerError::ReplayInterrupted`]) whose type matches
    /// `pattern` (all when `None`) goes through the shards again with `"replay": true` in its
    /// metadata. The stored events and their status history are left as
    /// they are. Waits for room as needed (from a handler, only as long as the backpressure policy
    /// allows, and never for its own worker's shard). Events stored while it runs may be replayed
    /// too: it returns once it has caught up with the store, or once it has looked at about twice
    /// as many events as the store holds (counted once, after its first 2 048 events), so steady
    /// publishing cannot keep it running; and
    /// [`ReplayReport::resume_from`] says where a later replay picks up what came after.
    ///
    /// # Errors
    /// [`BrokerError::Pattern`]; [`BrokerError::Provider`] or [`BrokerError::Timeout`] when the
    /// writer's flush before it fails (nothing was replayed); [`BrokerError::ReplayFull`] and
    /// [`BrokerError::ReplayInterrupted`] (a provider error while reading the stored events), each
    /// with where to resume; [`BrokerError::Closed`] when shutdown interrupts the replay.
    pub fn replay(
        &self,
        from: impl Into<ReplayCursor>,
        pattern: Option<&str>,
    ) -> Result<ReplayReport, BrokerError> {
        self.engine().replay(from.into(), pattern)
    }

    /// Counters of the whole broker, each shard, the writer and the inbound thread.
    pub fn stats(&self) -> BrokerStats {
        self.engine().stats()
    }

    /// Stops fetching and accepting events, drains every shard, runs retries that come due before
    /// `timeout` and waits as long for [acknowledged deliveries](Broker::subscribe_acked) to be
    /// settled (dead-lettering the rest, or giving inbound ones back to their group: both stop
    /// early enough for that to be done and written by the deadline, 20 ms before it plus 100 µs
    /// for each delivery left, at most half of `timeout`), flushes the
    /// provider writer and closes the provider (unless others still hold it: see
    /// [`CloseOutcome::LeftOpen`]). Bounded by `timeout`, whatever the provider or the
    /// handlers do. One shutdown runs: a call while it runs waits for it (up to its own `timeout`),
    /// and any later call returns its report, marked [`ShutdownReport::already_shut_down`].
    /// Called from a handler of this broker, it does not wait for the thread the handler runs on
    /// (a worker, or the caller of [`Broker::publish_sync`] or [`Broker::redrive`]): see
    /// [`ShutdownReport::deferred`].
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.engine().shutdown(timeout)
    }
}
