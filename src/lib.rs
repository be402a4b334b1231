//! `eventbroker`: publish and subscribe to events in-process, and across instances through a
//! provider, with a lock-free dispatch engine.
//!
//! ```text
//! publish ─▶ shard ring buffers ─▶ dedicated OS worker threads ─▶ compiled pattern trie ─▶ handlers
//!                                           │
//!                                           └─▶ provider writer thread ─▶ batched writes
//! ```
//!
//! - [`Event`]: the seed's event, wire-compatible JSON, raw JSON payloads.
//! - [`Pattern`]: `public.*.create`, `audit.>`, `*`; see [`pattern`] for the language.
//! - [`PatternSet`]: subscriptions compiled into a persistent trie, matched in time independent of
//!   their number; [`MatchCache`]: a worker's cache of `type → matches`.
//! - [`Provider`]: the batch-first storage trait, with [`MemoryProvider`] always compiled; see
//!   [`provider`] for the contract every backend keeps.
//! - [`WaitStrategy`]: how an idle shard worker waits (spin, yield, park), trading latency for CPU.
//!
//! Subscribers: a handler ([`Broker::subscribe`]), whose return ends its delivery; a channel of
//! events ([`Broker::subscribe_stream`]), whose delivery ends in the channel; a channel of
//! [`Delivery`] values ([`Broker::subscribe_acked`]), each ended when its consumer, sync or async,
//! settles it.
//!
//! Around the engine, for adopting it:
//! - [`config`]: the seed's `event_broker:` YAML (feature `yaml`), `${VAR}` expansion,
//!   `EVENTBROKER_*` overrides, and the factory that builds a broker and its provider.
//! - [`init`], [`global`], [`publish`], [`subscribe`], [`shutdown`]: a process-wide default broker,
//!   as the seed's package-level API.
//! - [`hooks`]: CRUD hooks that publish `schema.entity.operation` events without ever blocking or
//!   failing the caller.
//! - [`metrics`]: the seed's metrics through the `metrics` facade (feature `metrics`).
//! - [`Broker::drain`]: wait until everything published so far is handled and written.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod broker;
mod clock;
pub mod config;
mod deadline;
mod dispatch;
mod error;
mod event;
mod global;
pub mod hooks;
mod id;
pub mod metrics;
pub mod pattern;
mod prefetch;
pub mod provider;
mod redact;
mod subscription;
mod sync;
#[cfg(feature = "test-util")]
pub mod testing;

pub use crate::broker::{
    Backpressure, Broker, BrokerBuilder, BrokerStats, CloseOutcome, Distribution, MAX_BUFFER_SIZE,
    MAX_MATCH_CACHE_CAPACITY, MAX_WORKERS, Mode, RedriveOutcome, ReplayReport, ShutdownReport, WeakBroker,
};
pub use crate::dispatch::acked::Delivery;
pub use crate::dispatch::inbound::InboundStats;
pub use crate::dispatch::retry::RetryPolicy;
pub use crate::dispatch::shard::ShardStats;
pub use crate::dispatch::wait::WaitStrategy;
pub use crate::dispatch::writer::{WriterConfig, WriterStats};
pub use crate::error::{
    BatchPublishError, BatchRejection, BoxError, BrokerError, BuildError, ConfigError, ConfirmError,
    DecodeError, DeliveryFailure, DrainError, EventTypeError, HandlerFailures, InitError, NotInitialized,
    PatternError, PayloadError, ProviderError, ProviderErrorKind, PublishError, SubscribeError,
    SyncPublishError, SyntaxErrorKind,
};
pub use crate::event::{
    Event, EventId, EventSource, EventStatus, Metadata, Payload, UnknownName, event_type,
};
pub use crate::global::{
    drain, global, init, init_builder, publish, publish_async, publish_sync, shutdown, subscribe,
    subscribe_infallible,
};
pub use crate::pattern::{
    CacheStats, EntryId, MAX_NAME_LEN, MAX_SEGMENTS, MatchCache, Matches, Pattern, PatternSet,
    validate_event_type,
};
pub use crate::provider::{
    Ack, AckOutcome, AckToken, Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId,
    EventFilter, EventSink, EventStore, EventStream, GroupNamespace, Inbound, InboundConfig, InboundEvent,
    MemoryConfig, MemoryProvider, Provider, ProviderExt, ProviderStats, ReplayCursor, ReplayFrom, ReplayPage,
    StatusUpdate, StoredEvent, StreamError,
};
#[cfg(feature = "nats")]
pub use crate::provider::{NatsConfig, NatsProvider};
#[cfg(feature = "postgres")]
pub use crate::provider::{PostgresConfig, PostgresProvider};
#[cfg(feature = "redis")]
pub use crate::provider::{RedisConfig, RedisProvider};
pub use crate::subscription::SubscriptionId;
/// The string type of an event's short fields (type, schema, entity, operation, session and
/// instance ids): a `String` that keeps up to 24 bytes inline, without allocating. It dereferences
/// to `&str` and converts from and into `String`.
pub use compact_str::CompactString;
/// The channel crate of [`Broker::subscribe_stream`]'s and [`Broker::subscribe_acked`]'s
/// receivers, re-exported so that a receiver can be named
/// (`eventbroker::flume::Receiver<Arc<Event>>`) without a dependency of one's own.
pub use flume;
/// The time type of an event's timestamps (`created_at`, `processed_at`, `completed_at`) and of
/// what filters or replays by time (`EventFilter`, `DeadLetterFilter`, [`ReplayFrom::Time`]):
/// `jiff`'s, re-exported so that using them takes no dependency of one's own. `Timestamp::now()`
/// reads the clock; `Timestamp::try_from(system_time)` converts a `SystemTime`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use eventbroker::{ReplayFrom, Timestamp};
///
/// let an_hour_ago = Timestamp::try_from(SystemTime::now() - Duration::from_secs(3600))?;
/// assert!(an_hour_ago < Timestamp::now());
/// let _from = ReplayFrom::Time(an_hour_ago);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub use jiff::Timestamp;

/// The provider traits, for `use eventbroker::prelude::*;`: their methods (`get`, `list`,
/// `store_batch`, ...) are callable on a concrete provider ([`MemoryProvider`], a network one)
/// and in code generic over providers once the traits are in scope. A `dyn Provider`, such as
/// [`Broker::provider`]'s, needs no import: a trait object's methods are always in scope.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::prelude::*;
/// use eventbroker::{Broker, Event, EventFilter, EventSource, MemoryProvider};
///
/// let memory = Arc::new(MemoryProvider::default());
/// memory.store_batch(&[Arc::new(Event::new(EventSource::Internal, "audit.login"))], None)?;
/// assert_eq!(memory.list(&EventFilter::new())?.len(), 1);
///
/// let broker = Broker::builder().build()?;
/// assert!(broker.provider().list(&EventFilter::new())?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub mod prelude {
    pub use crate::provider::{EventSink, EventStore, Inbound, Provider, ProviderExt};
}

/// Not part of the API: internals re-exported for `loom-tests/` and `benches/` only. Anything here
/// may change or vanish in any release.
///
/// Everything here is sound to use from safe code. The two-phase publish is not here outside loom
/// builds: a forgotten reservation would stall the ring's consumer for good.
///
/// ```compile_fail,E0624
/// let (producer, _consumer) = eventbroker::__private::ring::<Option<u8>>(2);
/// let _ = producer.try_reserve(1);
/// ```
#[doc(hidden)]
pub mod __private {
    pub use crate::dispatch::ring::{Consumer, Producer, PushBatchError, PushError, ring};
    pub use crate::dispatch::wait::WaitOutcome;

    #[cfg(eventbroker_loom)]
    pub use crate::dispatch::ring::Reservation;

    /// The memory provider's writes as the broker's own path makes them, for `benches/provider`:
    /// a store hands back its event's ticket, and the event's status updates are written with it,
    /// into the event's mark, without its shard's lock. `update_status_batch` writes by id instead.
    pub mod memory {
        use std::sync::Arc;

        use crate::provider::memory::StoreTicket;
        use crate::{Event, MemoryProvider, ProviderError, StatusUpdate};

        /// Where a store put its event.
        #[derive(Debug, Clone, Copy)]
        pub struct Ticket(StoreTicket);

        /// Stores `event` as a publisher's `publish` does, and returns its ticket.
        ///
        /// # Errors
        /// As `store_batch`.
        pub fn store(provider: &MemoryProvider, event: &Arc<Event>) -> Result<Ticket, ProviderError> {
            let mut stored = StoreTicket::NONE;
            provider.store_numbered(std::slice::from_ref(event), None, |ticket| stored = ticket)?;
            Ok(Ticket(stored))
        }

        /// Writes `update` of the event stored with `ticket`, as a worker does.
        ///
        /// # Errors
        /// As `update_status_batch`.
        pub fn update(
            provider: &MemoryProvider,
            update: &StatusUpdate,
            ticket: Ticket,
        ) -> Result<(), ProviderError> {
            provider.update_ticketed(std::slice::from_ref(update), &[ticket.0])
        }
    }

    /// The memory provider's mark of one slot (its lock and what it holds), for the loom model of
    /// the lock.
    #[cfg(eventbroker_loom)]
    pub struct Mark(crate::provider::memory::Mark);

    #[cfg(eventbroker_loom)]
    impl Mark {
        /// A mark with nothing written.
        #[allow(clippy::new_without_default, reason = "loom-tests only")]
        pub fn new() -> Self {
            Self(crate::provider::memory::Mark::default())
        }

        /// Adds one to what it holds (a read and a write) under its lock, if the lock is free;
        /// `false` when it was not.
        pub fn try_add_one(&self) -> bool {
            self.0.try_add_one()
        }

        /// What it holds, read under its lock, if the lock is free.
        pub fn try_count(&self) -> Option<u32> {
            self.0.try_count()
        }
    }

    /// [`Producer::try_reserve`](crate::dispatch::ring::Producer::try_reserve), for the loom
    /// models of the broker's two-phase publish.
    ///
    /// # Errors
    ///
    /// As `try_reserve`: the ring is full or closed.
    #[cfg(eventbroker_loom)]
    pub fn try_reserve<T: Send + Default>(
        producer: &Producer<T>,
        want: usize,
    ) -> Result<Reservation<'_, T>, PushBatchError> {
        producer.try_reserve(want)
    }

    #[cfg(eventbroker_loom)]
    pub use crate::dispatch::intake::{Entered, Intake};

    /// [`Consumer::wait_or`](crate::dispatch::ring::Consumer::wait_or) without a deadline, for the
    /// loom model of a worker woken for work that does not come through its ring.
    #[cfg(eventbroker_loom)]
    pub fn wait_or<T>(
        consumer: &mut Consumer<T>,
        strategy: crate::WaitStrategy,
        also: impl Fn() -> bool,
    ) -> WaitOutcome {
        consumer.wait_or(strategy, None, also)
    }

    /// Wakes a consumer waiting in [`wait_or`], as an acknowledged delivery's outcome wakes its
    /// worker.
    #[cfg(eventbroker_loom)]
    pub struct Nudge<T>(crate::dispatch::ring::Nudge<T>);

    #[cfg(eventbroker_loom)]
    impl<T> Nudge<T> {
        /// A nudge for `consumer`.
        pub fn new(consumer: &Consumer<T>) -> Self {
            Self(consumer.nudge())
        }

        /// Wakes the consumer if it sleeps: call after making its `also()` hold.
        pub fn wake(&self) {
            self.0.wake();
        }
    }

    /// A broker's subscription table with handlers that do nothing: what the loom model of the
    /// snapshot swap needs, and no more.
    #[cfg(eventbroker_loom)]
    pub struct Subscriptions(crate::subscription::SubscriptionTable);

    #[cfg(eventbroker_loom)]
    impl Subscriptions {
        /// An empty table.
        #[allow(clippy::new_without_default, reason = "loom-tests only")]
        pub fn new() -> Self {
            Self(crate::subscription::SubscriptionTable::new())
        }

        /// Subscribes a handler that does nothing.
        ///
        /// # Panics
        /// If `pattern` does not parse.
        pub fn subscribe(&self, pattern: &str) -> crate::SubscriptionId {
            let pattern = crate::Pattern::parse(pattern).expect("a valid pattern");
            self.0.subscribe(pattern, crate::subscription::Target::Handler(Box::new(|_| Ok(()))))
        }

        /// Removes a subscription.
        pub fn unsubscribe(&self, id: crate::SubscriptionId) -> bool {
            self.0.unsubscribe(id)
        }

        /// Loads the current snapshot once, as a worker does, and returns the ids it matches for
        /// `event_type`, in handler order, and the snapshot's size.
        pub fn matches(&self, event_type: &str) -> (Vec<crate::SubscriptionId>, usize) {
            let set = self.0.load();
            let ids = set.matches(event_type).values().map(|s| s.id).collect();
            (ids, set.len())
        }
    }
}
