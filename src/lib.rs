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
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod broker;
mod dispatch;
mod error;
mod event;
mod id;
pub mod pattern;
pub mod provider;
mod subscription;
mod sync;
#[cfg(feature = "test-util")]
pub mod testing;

pub use crate::broker::{
    Backpressure, Broker, BrokerBuilder, BrokerStats, MAX_BUFFER_SIZE, MAX_WORKERS, Mode, RedriveOutcome,
    ReplayReport, ShutdownReport,
};
pub use crate::dispatch::retry::RetryPolicy;
pub use crate::dispatch::shard::ShardStats;
pub use crate::dispatch::wait::WaitStrategy;
pub use crate::dispatch::writer::{WriterConfig, WriterStats};
pub use crate::error::{
    BatchPublishError, BatchRejection, BoxError, BrokerError, BuildError, ConfigError, DecodeError,
    DeliveryFailure, EventTypeError, PatternError, PayloadError, ProviderError, ProviderErrorKind,
    PublishError, SubscribeError, SyntaxErrorKind,
};
pub use crate::event::{
    Event, EventId, EventSource, EventStatus, Metadata, Payload, UnknownName, event_type,
};
pub use crate::pattern::{
    CacheStats, EntryId, MAX_NAME_LEN, MAX_SEGMENTS, MatchCache, Matches, Pattern, PatternSet,
    validate_event_type,
};
pub use crate::provider::{
    Ack, AckOutcome, AckToken, Capabilities, ConsumerGroup, DeadLetter, DeadLetterFilter, DeadLetterId,
    EventFilter, EventSink, EventStore, EventStream, Inbound, InboundConfig, InboundEvent, MemoryConfig,
    MemoryProvider, Provider, ProviderExt, ProviderStats, ReplayFrom, StatusUpdate, StoredEvent, StreamError,
};
#[cfg(feature = "nats")]
pub use crate::provider::{NatsConfig, NatsProvider};
pub use crate::subscription::SubscriptionId;

/// Not part of the API: internals re-exported for `loom-tests/` and `benches/` only. Anything here
/// may change or vanish in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::dispatch::ring::{Consumer, Producer, PushBatchError, PushError, Reservation, ring};
    pub use crate::dispatch::wait::WaitOutcome;

    #[cfg(eventbroker_loom)]
    pub use crate::dispatch::intake::{Entered, Intake};

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
            self.0.subscribe(pattern, Box::new(|_| Ok(())))
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
