//! Providers: where events are stored, and how the instances that share one receive each other's
//! events.
//!
//! A provider does two jobs. It **stores** events, their status and their dead letters, for
//! queries and replay. And it **connects instances**: every broker that shares one backend (one
//! Redis, one NATS, one PostgreSQL, or one [`MemoryProvider`] inside a process) receives the
//! events the others publish. The contract comes in three parts, each a trait:
//!
//! | part | trait | who calls it |
//! |---|---|---|
//! | the **sink** | [`EventSink`] | the broker's writer thread, in batches; with [`Capabilities::inline_writes`] (the memory provider), its publishing and worker threads store events and write statuses themselves |
//! | the **store** | [`EventStore`] | users, through [`Broker::provider`](crate::Broker::provider) or directly |
//! | the **source** | [`Inbound`], opened by [`Provider::open_inbound`] | the broker's inbound thread, and its writer for acks |
//!
//! [`Provider`] ties them together with a name, [`Capabilities`] and `close`; [`ProviderExt`]
//! adds conveniences every provider gets for free. Everything is synchronous: the callers are
//! OS threads. A backend with an async client runs its own small runtime on its own threads.
//!
//! | backend | type | cargo feature |
//! |---|---|---|
//! | in-process, bounded, LRU; an in-process bus | [`MemoryProvider`] | always compiled |
//! | Redis Streams | `RedisProvider` (module `redis`) | `redis` |
//! | NATS JetStream | `NatsProvider` (module `nats`) | `nats` |
//! | PostgreSQL, with CRUD capture and a transactional outbox | `PostgresProvider` (module `postgres`) | `postgres` |
//!
//! Every provider passes the same conformance suite (`eventbroker::testing::conformance`, feature
//! `test-util`), single-broker and two-broker scenarios alike, so the contract below is what a
//! caller may rely on whichever backend is configured.
//!
//! ## Writes (the sink)
//! The writer drives, per batch and in this order: [`store_batch`], [`update_status_batch`],
//! [`store_dead_letters`], then the acks of inbound events ([`Inbound::ack`]). An ack is written
//! only once the dead letters of its event are durable, so a crash loses nothing: it redelivers.
//! - **Batches apply in slice order.** Within one [`store_batch`] or [`update_status_batch`],
//!   a later element for the same id wins.
//! - **Stores are idempotent upserts.** Storing an id that is already stored replaces the stored
//!   event: it is counted once in [`ProviderStats`], keeps the sequence number it got on its first
//!   store, and is not delivered to other instances a second time. Storing a batch twice therefore
//!   leaves the provider as storing it once, which is what makes retrying a failed batch safe.
//! - **Status updates are idempotent too** (they set fields, they do not add to them), and an
//!   update for an id that is not stored — never stored, deleted, evicted or expired — is skipped,
//!   not an error: updates trail stores, and a bounded provider may have evicted the event since.
//! - **A failed batch may be partly applied.** Retry the whole batch; the two rules above make that
//!   safe. [`ProviderError::is_transient`] says whether a retry can help: the writer retries
//!   transient errors with backoff and gives up on the others at once.
//!
//! ## Reads (the store)
//! - [`list`] returns events in `(created_at, id)` order. Filters apply first, then
//!   [`EventFilter::offset`], then [`EventFilter::limit`]; an offset at or past the number of
//!   matches gives an empty list. `start_time` is inclusive and `end_time` exclusive, so
//!   consecutive windows `[t0, t1)`, `[t1, t2)` neither overlap nor leave a gap.
//! - [`replay`] returns events in sequence order. Each stored event gets a sequence number on its
//!   first store; numbers start at 1, strictly increase in store order (a batch in slice order) and
//!   may have gaps (a deleted or evicted event leaves one). Page through history with
//!   [`ReplayFrom::Sequence`]`(page.next)` until [`ReplayPage::end`], or let
//!   [`ProviderExt::replay_pages`] do it. A page shorter than its limit is not the end: a
//!   backend bounds the rows it passes over in one call (rows that hold no valid event), so a
//!   replay always moves on, in bounded time, past any number of them.
//! - [`get`], [`list`] and [`replay`] return owned copies; changing one changes nothing stored.
//! - A query a backend cannot serve fails with [`ProviderErrorKind::NotSupported`], never with a
//!   wrong answer; [`Capabilities`] says in advance which ones those are.
//!
//! ## Across instances (the source)
//! Each broker that takes part opens one [`Inbound`] with its [`InboundConfig`]: its instance id
//! and its [`ConsumerGroup`] — its own (fan-out: every instance receives every event) or one it
//! shares with others (work-queue: each event goes to one member). See [`Inbound`] for fetching,
//! acks, redelivery, filters, echo suppression and the numbers.
//! [`Provider::group_namespace`] says where a provider's groups live, so that two providers made
//! apart for one server and place (one stream, one table) are known to share them.
//!
//! ## Closing
//! [`close`] flushes what the provider buffers, ends its inbound sources and stops its background
//! work. After `close`, every method returns an error of kind [`ProviderErrorKind::Closed`]; a
//! second `close` returns `Ok(())`. A broker runs `close` on a thread of its own at shutdown and
//! stops waiting for it at the shutdown's deadline, so a backend that hangs cannot hang a broker.
//!
//! ## Durability
//! The memory provider keeps nothing across [`close`] or a restart. A durable provider (Redis,
//! NATS, PostgreSQL) has stored a batch durably when [`store_batch`] returns `Ok`. Because the
//! writer retries a batch whose outcome it could not learn, an event may be written twice;
//! idempotent upserts make that invisible. Delivery to other instances is at-least-once.
//!
//! [`get`]: EventStore::get
//! [`list`]: EventStore::list
//! [`replay`]: EventStore::replay
//! [`close`]: Provider::close
//! [`store_batch`]: EventSink::store_batch
//! [`update_status_batch`]: EventSink::update_status_batch
//! [`store_dead_letters`]: EventSink::store_dead_letters

use std::sync::Arc;

use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventId};
use crate::pattern::Pattern;

mod dead_letter;
mod inbound;
pub mod memory;
mod namespace;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
mod query;
#[cfg(feature = "redis")]
pub mod redis;
mod stream;

pub use self::dead_letter::{DeadLetter, DeadLetterFilter, DeadLetterId};
pub use self::inbound::{Ack, AckOutcome, AckToken, ConsumerGroup, Inbound, InboundConfig, InboundEvent};
pub use self::memory::{MemoryConfig, MemoryProvider};
pub use self::namespace::GroupNamespace;
#[cfg(feature = "nats")]
pub use self::nats::{NatsConfig, NatsProvider};
#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresConfig, PostgresProvider};
pub use self::query::{
    EventFilter, ProviderStats, ReplayCursor, ReplayFrom, ReplayPage, StatusUpdate, StoredEvent,
};
#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisProvider};
pub use self::stream::{EventStream, StreamDelivery, StreamError, StreamHub};

/// The writes a broker's writer thread makes, in batches: the minimum every backend implements.
///
/// Methods are blocking and may be called from any thread. A broker calls them from its one
/// writer thread, except for a provider with [`Capabilities::inline_writes`], whose stores and
/// status updates its publishing and worker threads make themselves. See the
/// [module docs](self) for ordering, idempotence and retries.
pub trait EventSink: Send + Sync {
    /// Stores `events`, in slice order.
    ///
    /// `origin` is the [`ConsumerGroup::key`] of the broker that published them: inbound sources
    /// never deliver an event to the group it came from (no echo). `None` — events stored by
    /// anything other than a broker taking part in delivery — reaches every group.
    ///
    /// Upsert by id: storing an id again replaces the stored event, keeps its sequence number and
    /// origin, counts once in [`ProviderStats`] and is not delivered again. New events get
    /// increasing sequence numbers in slice order. An empty slice is a no-op.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise, after
    /// which part of the batch may be stored (retrying the whole batch is safe).
    fn store_batch(&self, events: &[Arc<Event>], origin: Option<&str>) -> Result<(), ProviderError>;

    /// Applies `updates` to the stored events, in slice order (a later update for the same id
    /// wins); see [`StatusUpdate`] for which fields change. An update whose id is not stored is
    /// skipped without error.
    ///
    /// # Errors
    /// As [`EventSink::store_batch`].
    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError>;

    /// Stores dead letters, in slice order; storing an id again replaces the stored letter.
    ///
    /// # Errors
    /// As [`EventSink::store_batch`].
    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError>;

    /// Waits until every write that returned `Ok` is durable and visible to every reader of the
    /// backend. A no-op for providers that write through.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn flush(&self) -> Result<(), ProviderError>;
}

/// The queries users make: events, history and dead letters.
///
/// A query a backend cannot serve returns [`ProviderErrorKind::NotSupported`] (and
/// [`Capabilities`] says so beforehand); it never returns a wrong or partial answer.
pub trait EventStore: Send + Sync {
    /// The stored event with `id`, or `None` when there is none.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError>;

    /// The stored events that match `filter`, in `(created_at, id)` order, with the filter's
    /// offset and then its limit applied after filtering.
    ///
    /// # Errors
    /// [`ProviderErrorKind::NotSupported`] when [`Capabilities::list`] is false; otherwise as
    /// [`EventStore::get`].
    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError>;

    /// Removes the event with `id`; `true` when it was stored.
    ///
    /// # Errors
    /// [`ProviderErrorKind::NotSupported`] when [`Capabilities::delete`] is false; otherwise as
    /// [`EventStore::get`].
    fn delete(&self, id: EventId) -> Result<bool, ProviderError>;

    /// Up to `limit` stored events from `from` on, whose type matches `pattern` when one is given,
    /// in sequence order, as a [`ReplayPage`]. Continue with
    /// [`ReplayFrom::Sequence`]`(page.next)` for the next page, until [`ReplayPage::end`] says
    /// history is exhausted for now. A page may hold fewer than `limit` events, or none, before
    /// the end: a backend that passes over rows (holding no valid event, or of other types)
    /// bounds how many it reads per call, so every call returns within its timeout and the next
    /// one starts past them (PostgreSQL; see its module docs for the numbers). A backend that
    /// reads every row as an event returns [`ReplayPage::from_events`].
    ///
    /// # Errors
    /// [`ProviderErrorKind::NotSupported`] when [`Capabilities::replay`] is false; otherwise as
    /// [`EventStore::get`].
    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<ReplayPage, ProviderError>;

    /// The stored dead letters that match `filter`, in `(failed_at, id)` order, with the filter's
    /// offset and then its limit applied after filtering.
    ///
    /// # Errors
    /// As [`EventStore::get`].
    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError>;

    /// The dead letter with `id`, or `None` when there is none.
    ///
    /// # Errors
    /// As [`EventStore::get`].
    fn get_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError>;

    /// Removes the dead letter with `id`; `true` when it was stored. Redrive calls this only after
    /// the redelivery succeeded, so a failure in between keeps the letter.
    ///
    /// # Errors
    /// As [`EventStore::get`].
    fn delete_dead_letter(&self, id: DeadLetterId) -> Result<bool, ProviderError>;

    /// Counts of what is stored and of what this provider handle has done; see [`ProviderStats`].
    ///
    /// # Errors
    /// As [`EventStore::get`].
    fn stats(&self) -> Result<ProviderStats, ProviderError>;
}

/// What a backend can do beyond the minimum, so callers (and the conformance suite) know in
/// advance which calls return [`ProviderErrorKind::NotSupported`].
///
/// ```
/// use eventbroker::{Capabilities, MemoryProvider, Provider};
///
/// let caps = MemoryProvider::default().capabilities();
/// assert!(caps.inbound && caps.work_queue && caps.list && caps.replay);
/// assert!(!caps.durable);
///
/// // A backend of your own states what it supports; the rest stays `false`.
/// let mine = Capabilities { list: true, ..Capabilities::default() };
/// assert!(!mine.inbound);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools, reason = "independent yes/no flags, read one at a time")]
pub struct Capabilities {
    /// [`Provider::open_inbound`] works: brokers sharing the backend receive each other's events.
    pub inbound: bool,
    /// Inbound sources accept [`ConsumerGroup::Shared`] (work-queue delivery).
    pub work_queue: bool,
    /// [`Inbound::set_filter`] keeps unwanted events on the server: they are never fetched.
    /// Without it the source still honours the filter, after fetching.
    pub filter_at_source: bool,
    /// [`EventStore::list`] answers with every filter of [`EventFilter`].
    pub list: bool,
    /// [`EventStore::delete`] works.
    pub delete: bool,
    /// [`EventStore::replay`] works, by sequence and by time.
    pub replay: bool,
    /// What was stored survives a restart of the process (and of the backend, as configured).
    pub durable: bool,
    /// The sink's calls are in-process work that neither blocks nor fails but when closed (the
    /// memory provider): a broker then calls them on its publishing and worker threads as events
    /// go, instead of batching them through its writer thread, which keeps only retries.
    pub inline_writes: bool,
}

/// A storage backend, with its sink, its store and, where it connects instances, its inbound
/// sources.
///
/// A broker holds a provider as an `Arc<dyn Provider>` and may share it with other brokers: that
/// is the in-process bus (for [`MemoryProvider`]) and, for a network backend, simply what sharing a
/// server means. See the [module docs](self) for the contract.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::{
///     Event, EventFilter, EventSink, EventSource, EventStatus, EventStore, MemoryProvider, Provider,
///     StatusUpdate,
/// };
///
/// let provider: Arc<dyn Provider> = Arc::new(MemoryProvider::default());
/// let event = Arc::new(Event::new(EventSource::System, "system.health.check"));
/// provider.store_batch(&[Arc::clone(&event)], None)?;
/// provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Completed)])?;
///
/// let stored = provider.get(event.id)?.expect("just stored");
/// assert_eq!(stored.status, EventStatus::Completed);
/// let completed = provider.list(&EventFilter::new().with_status(EventStatus::Completed))?;
/// assert_eq!(completed.len(), 1);
/// provider.close()?;
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
///
/// `Any` is a supertrait (every `'static` type is `Any`, so it asks nothing of an implementor): a
/// broker finds the [`MemoryProvider`] behind its `Arc<dyn Provider>` by it, and writes to that
/// one through a path that carries each store's sequence number to the event's status updates.
pub trait Provider: EventSink + EventStore + std::any::Any {
    /// The backend's short name (`"memory"`, `"redis"`, `"nats"`, `"postgres"`), as it appears in
    /// [`ProviderError`]s and [`ProviderStats::provider_type`].
    fn name(&self) -> &'static str;

    /// What this backend supports beyond the minimum.
    fn capabilities(&self) -> Capabilities;

    /// Opens the inbound source of one broker: the events other groups publish, from now on (a
    /// group seen for the first time starts at the current end of history, not its beginning;
    /// a durable group that existed resumes where it left off).
    ///
    /// The default returns [`ProviderErrorKind::NotSupported`]: a backend that only stores.
    ///
    /// # Errors
    /// [`ProviderErrorKind::NotSupported`] without [`Capabilities::inbound`] (or a shared group
    /// without [`Capabilities::work_queue`]); [`ProviderErrorKind::InvalidInput`] for a group
    /// name the backend cannot use; otherwise as [`EventStore::get`].
    fn open_inbound(&self, config: &InboundConfig) -> Result<Arc<dyn Inbound>, ProviderError> {
        let _ = config;
        Err(ProviderError::not_supported(self.name(), "open_inbound"))
    }

    /// Where this provider's consumer groups live: providers of one [`GroupNamespace`] share
    /// their groups (their server and their place on it), so a group opened through either is one.
    /// A broker refuses to be built under an instance id another broker of this process receives
    /// under in the same namespace (see
    /// [`BrokerBuilder::instance_id`](crate::BrokerBuilder::instance_id)).
    ///
    /// The default is [`GroupNamespace::of_object`]: this provider object's groups are its own,
    /// which is right for a backend in the process (as the [`MemoryProvider`]'s bus). A backend on
    /// a server returns [`GroupNamespace::new`] with what names its groups there, so that
    /// providers made apart (two from one configuration) are found to share them; a provider that
    /// wraps another returns the inner one's.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use eventbroker::{MemoryProvider, Provider};
    ///
    /// let bus: Arc<dyn Provider> = Arc::new(MemoryProvider::default());
    /// let again = Arc::clone(&bus);
    /// assert_eq!(bus.group_namespace(), again.group_namespace(), "one object, one bus");
    /// ```
    fn group_namespace(&self) -> GroupNamespace {
        GroupNamespace::of_object(self.name(), self)
    }

    /// Deletes `group` from the backend: where it stands in the events and what its members
    /// fetched and left unacknowledged. A durable group outlives its brokers, so the group of an
    /// instance id retired for good (a pod that will not come back under its name) stays, and
    /// with some backends holds on to what it has not read; this lets it go. A broker that opens
    /// the group later starts it afresh, at the current end of history. `Ok(true)` when the group
    /// existed.
    ///
    /// No broker of the group should be running: a member that fetches after the deletion finds
    /// the group made again, after the last event it read (Redis, NATS) or at the end
    /// (PostgreSQL); the memory provider refuses while a member is open.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use eventbroker::{Broker, ConsumerGroup, MemoryProvider, Provider};
    ///
    /// let bus = Arc::new(MemoryProvider::default());
    /// let retired = Broker::builder().provider(bus.clone()).instance_id("pod-7").build()?;
    /// assert!(retired.shutdown(Duration::from_secs(5)).is_clean());
    /// assert!(bus.delete_group(&ConsumerGroup::Instance("pod-7".into()))?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// The default returns [`ProviderErrorKind::NotSupported`]: a backend that only stores.
    ///
    /// # Errors
    /// [`ProviderErrorKind::NotSupported`] without [`Capabilities::inbound`];
    /// [`ProviderErrorKind::InvalidInput`] for a group name the backend cannot use, or (memory) a
    /// group with an open member; otherwise as [`EventStore::get`].
    fn delete_group(&self, group: &ConsumerGroup) -> Result<bool, ProviderError> {
        let _ = group;
        Err(ProviderError::not_supported(self.name(), "delete_group"))
    }

    /// Flushes, ends every inbound source, stops background work and releases the backend. Every
    /// later call of any method returns [`ProviderErrorKind::Closed`], except `close` itself,
    /// which returns `Ok(())` again.
    ///
    /// # Errors
    /// A backend failure while flushing; the provider is closed all the same.
    fn close(&self) -> Result<(), ProviderError>;
}

/// Conveniences every [`Provider`] has, built on its required methods.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::{Event, EventSource, MemoryProvider, ProviderExt, ReplayFrom};
///
/// let provider = MemoryProvider::default();
/// for _ in 0..5 {
///     provider.store_one(&Event::new(EventSource::System, "system.tick"))?;
/// }
/// let mut seen = 0;
/// for page in provider.replay_pages(ReplayFrom::Beginning, None, 2) {
///     seen += page?.len();
/// }
/// assert_eq!(seen, 5);
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
pub trait ProviderExt: Provider {
    /// Stores one event, as nobody's ([`EventSink::store_batch`] with no origin), and returns it
    /// shared.
    ///
    /// # Errors
    /// As [`EventSink::store_batch`].
    fn store_one(&self, event: &Event) -> Result<Arc<Event>, ProviderError> {
        let event = Arc::new(event.clone());
        self.store_batch(std::slice::from_ref(&event), None)?;
        Ok(event)
    }

    /// Pages of [`EventStore::replay`] from `from` on (a [`ReplayFrom`], or the
    /// [`ReplayCursor`] an earlier replay stopped at), up to `page_size` events each (at least 1),
    /// one provider call per page, until [`ReplayPage::end`] says history is exhausted or a call
    /// fails (the error is the last item). A page may hold fewer events than `page_size`, or none,
    /// where the provider passed over rows holding no valid event. From [`ReplayFrom::Time`],
    /// every page holds only events created at or after that time (the pages after the first
    /// continue by sequence, and are filtered here), so which events come does not depend on the
    /// page size; this too may leave a page short, or empty.
    /// [`ReplayPages::cursor`] says where the next page starts, and once the pages end, where a
    /// later replay goes on.
    fn replay_pages<'a>(
        &'a self,
        from: impl Into<ReplayCursor>,
        pattern: Option<&'a Pattern>,
        page_size: usize,
    ) -> ReplayPages<'a, Self> {
        ReplayPages {
            provider: self,
            cursor: from.into(),
            ended: false,
            pattern,
            page_size: page_size.max(1),
        }
    }
}

impl<P: Provider + ?Sized> ProviderExt for P {}

/// The iterator of [`ProviderExt::replay_pages`].
#[derive(Debug)]
pub struct ReplayPages<'a, P: ?Sized> {
    provider: &'a P,
    /// Where the next page starts, or a later replay goes on once `ended`.
    cursor: ReplayCursor,
    /// History was exhausted, or a call failed.
    ended: bool,
    pattern: Option<&'a Pattern>,
    page_size: usize,
}

impl<P: ?Sized> ReplayPages<'_, P> {
    /// Where the next page starts; once the pages have ended, where a later replay goes on: after
    /// the last event returned when history was exhausted (to pick up what is stored since), at
    /// the page that failed when a call failed (to try it again). Passed to
    /// [`ProviderExt::replay_pages`] or [`Broker::replay`](crate::Broker::replay), it goes on with
    /// the same replay (its time included).
    ///
    /// ```
    /// use eventbroker::{Event, EventSource, MemoryProvider, ProviderExt, ReplayFrom};
    ///
    /// let provider = MemoryProvider::default();
    /// provider.store_one(&Event::new(EventSource::System, "system.tick"))?;
    /// let mut pages = provider.replay_pages(ReplayFrom::Beginning, None, 10);
    /// assert_eq!(pages.by_ref().map(|page| page.map(|p| p.len())).sum::<Result<usize, _>>()?, 1);
    ///
    /// provider.store_one(&Event::new(EventSource::System, "system.tock"))?;
    /// let since: Vec<_> = provider.replay_pages(pages.cursor(), None, 10).collect::<Result<_, _>>()?;
    /// assert_eq!(since.concat()[0].event.event_type, "system.tock");
    /// # Ok::<(), eventbroker::ProviderError>(())
    /// ```
    pub fn cursor(&self) -> ReplayCursor {
        self.cursor
    }
}

impl<P: Provider + ?Sized> Iterator for ReplayPages<'_, P> {
    type Item = Result<Vec<StoredEvent>, ProviderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        let cursor = self.cursor;
        match self.provider.replay(cursor.position(), self.pattern, self.page_size) {
            Ok(page) if page.end && page.events.is_empty() => {
                self.ended = true;
                if let Some(next) = page.next {
                    self.cursor = cursor.at_sequence(next);
                }
                None
            }
            Ok(page) => {
                if let Some(next) = page.next {
                    self.cursor = cursor.at_sequence(next);
                }
                // Not the page's length: a page may be short, or empty, past rows passed over. A
                // page that read nothing cannot say where to go on: going on would ask again.
                self.ended = page.end || page.next.is_none();
                let mut events = page.events;
                events.retain(|stored| cursor.admits(&stored.event));
                Some(Ok(events))
            }
            Err(error) => {
                self.ended = true;
                Some(Err(error))
            }
        }
    }
}

/// The error every provider returns once closed.
pub(crate) fn closed_error(provider: &'static str, operation: &'static str) -> ProviderError {
    ProviderError::new(provider, operation, ProviderErrorKind::Closed)
}
