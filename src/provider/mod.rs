//! Providers: where events are stored, how their status is tracked, and how they are read back.
//!
//! A [`Provider`] is one storage backend behind one batch-first trait. The broker feeds it from a
//! single dedicated writer thread that groups stores and status updates by size and by time (up to
//! about 512 events or 1 ms per batch), so one call — one round trip for a network backend —
//! carries many events. User code reaches the same provider through the broker for [`get`],
//! [`list`], dead letters and [`replay`].
//!
//! | backend | type | cargo feature |
//! |---|---|---|
//! | in-process, bounded, LRU | [`MemoryProvider`] | always compiled |
//! | Redis Streams | — | `redis` (reserved) |
//! | NATS JetStream | — | `nats` (reserved) |
//! | PostgreSQL | — | `postgres` (reserved) |
//!
//! Every provider passes the same conformance suite (`tests/conformance/`), so the contract below
//! is what a caller may rely on whichever backend is configured.
//!
//! ## Writes
//! - **Batches apply in slice order.** Within one [`store_batch`] or [`update_status_batch`],
//!   a later element for the same id wins.
//! - **Stores are idempotent upserts.** Storing an id that is already stored replaces the stored
//!   event: it is counted once in [`ProviderStats`], keeps the sequence number it got on its first
//!   store, and is not delivered to [`EventStream`]s a second time. Storing a batch twice therefore
//!   leaves the provider as storing it once, which is what makes retrying a failed batch safe.
//! - **Status updates are idempotent too** (they set fields, they do not add to them), and an
//!   update for an id that is not stored — never stored, deleted, evicted or expired — is skipped,
//!   not an error: updates trail stores, and a bounded provider may have evicted the event since.
//! - **A failed batch may be partly applied.** Retry the whole batch; the two rules above make that
//!   safe. [`ProviderError::is_transient`] says whether a retry can help.
//!
//! ## Reads
//! - [`list`] returns events in `(created_at, id)` order. Filters apply first, then
//!   [`EventFilter::offset`], then [`EventFilter::limit`]; an offset at or past the number of
//!   matches gives an empty list. `start_time` is inclusive and `end_time` exclusive, so
//!   consecutive windows `[t0, t1)`, `[t1, t2)` neither overlap nor leave a gap.
//! - [`replay`] returns events in sequence order. Each stored event gets a sequence number on its
//!   first store; numbers start at 1, strictly increase in store order (a batch in slice order) and
//!   may have gaps (a deleted or evicted event leaves one). Page through history with
//!   [`ReplayFrom::Sequence`]`(last.seq + 1)`.
//! - [`get`], [`list`] and [`replay`] return owned copies; changing one changes nothing stored.
//!
//! ## Streams
//! [`stream`] opens a bounded [`EventStream`] that receives every event stored through this
//! provider after the stream was opened and whose type matches its pattern, in store order. A
//! stream never slows the provider down: when its buffer (1024 events for the memory provider by
//! default) is full, the provider skips it and counts what it missed; the receiver then gets
//! [`StreamError::Lagged`]`(n)` at the place of the gap and carries on. See [`EventStream`] for
//! the details, and the numbers.
//!
//! ## Closing
//! [`close`] flushes what the provider buffers, ends every open stream (receivers first get what
//! is already buffered, then [`StreamError::Closed`]) and stops the provider's background work. It
//! never waits on a stream's receiver. After `close`, every method returns an error of kind
//! [`ProviderErrorKind::Closed`]; a second `close` returns `Ok(())`.
//!
//! ## Durability
//! The memory provider keeps nothing across [`close`] or a restart. A durable provider (Redis,
//! NATS, PostgreSQL) has stored a batch durably when [`store_batch`] returns `Ok`. Because the
//! writer retries a batch whose outcome it could not learn, an event may be written twice;
//! idempotent upserts make that invisible. Delivery of events to other instances is
//! at-least-once: an inbound event is acknowledged only after its handlers finished or it was
//! dead-lettered.
//!
//! [`get`]: Provider::get
//! [`list`]: Provider::list
//! [`replay`]: Provider::replay
//! [`stream`]: Provider::stream
//! [`close`]: Provider::close
//! [`store_batch`]: Provider::store_batch
//! [`update_status_batch`]: Provider::update_status_batch

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventId, EventSource, EventStatus};
use crate::pattern::Pattern;

mod dead_letter;
pub mod memory;
mod stream;
pub(crate) mod writer;

pub use self::dead_letter::{DeadLetter, DeadLetterFilter, DeadLetterId};
pub use self::memory::{MemoryConfig, MemoryProvider};
pub use self::stream::{EventStream, StreamDelivery, StreamError, StreamHub};
pub use self::writer::{WriterConfig, WriterStats};

/// A storage backend for events, their status and their dead letters.
///
/// Every method is blocking and may be called from any thread. The broker holds a provider as an
/// `Arc<dyn Provider>`. See the [module docs](self) for the contract every provider keeps:
/// ordering, idempotence, streams, closing and durability.
///
/// ```
/// use std::sync::Arc;
/// use eventbroker::{Event, EventFilter, EventSource, EventStatus, MemoryProvider, Provider, StatusUpdate};
///
/// let provider: Arc<dyn Provider> = Arc::new(MemoryProvider::default());
/// let event = Arc::new(Event::new(EventSource::System, "system.health.check"));
/// provider.store_batch(&[Arc::clone(&event)])?;
/// provider.update_status_batch(&[StatusUpdate::new(event.id, EventStatus::Completed)])?;
///
/// let stored = provider.get(event.id)?.expect("just stored");
/// assert_eq!(stored.status, EventStatus::Completed);
/// let completed = provider.list(&EventFilter::new().with_status(EventStatus::Completed))?;
/// assert_eq!(completed.len(), 1);
/// provider.close()?;
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
pub trait Provider: Send + Sync + 'static {
    /// The backend's short name (`"memory"`, `"redis"`, `"nats"`, `"postgres"`), as it appears in
    /// [`ProviderError`]s and [`ProviderStats::provider_type`].
    fn name(&self) -> &'static str;

    /// Stores `events`, in slice order.
    ///
    /// Upsert by id: storing an id again replaces the stored event, keeps its sequence number,
    /// counts once in [`ProviderStats`] and is not delivered to streams again. New events get
    /// increasing sequence numbers in slice order and are delivered to every open stream whose
    /// pattern matches. An empty slice is a no-op.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise, after
    /// which part of the batch may be stored (retrying the whole batch is safe).
    fn store_batch(&self, events: &[Arc<Event>]) -> Result<(), ProviderError>;

    /// Applies `updates` to the stored events, in slice order (a later update for the same id
    /// wins); see [`StatusUpdate`] for which fields change. An update whose id is not stored is
    /// skipped without error.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise, after
    /// which part of the batch may be applied (retrying the whole batch is safe).
    fn update_status_batch(&self, updates: &[StatusUpdate]) -> Result<(), ProviderError>;

    /// The stored event with `id`, or `None` when there is none.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn get(&self, id: EventId) -> Result<Option<Event>, ProviderError>;

    /// The stored events that match `filter`, in `(created_at, id)` order, with the filter's
    /// offset and then its limit applied after filtering.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError>;

    /// Removes the event with `id`; `true` when it was stored.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn delete(&self, id: EventId) -> Result<bool, ProviderError>;

    /// Stores dead letters, in slice order; storing an id again replaces the stored letter.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), ProviderError>;

    /// The stored dead letters that match `filter`, in `(failed_at, id)` order, with the filter's
    /// offset and then its limit applied after filtering.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn list_dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, ProviderError>;

    /// Removes the dead letter with `id` and returns it, so it can be redriven; `None` when there
    /// is none, such as on a second take of the same id.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn take_dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetter>, ProviderError>;

    /// Up to `limit` stored events from `from` on, whose type matches `pattern` when one is given,
    /// in sequence order. Continue with [`ReplayFrom::Sequence`]`(last.seq + 1)` for the next page;
    /// fewer than `limit` events means history is exhausted for now.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ProviderError>;

    /// Opens a stream of the events stored through this provider from now on whose type matches
    /// `pattern`. Events stored before the call are not delivered; use [`Provider::replay`] for
    /// those. Each new matching event is offered to the stream before the [`store_batch`] call
    /// that stored it returns, in store order; see [`EventStream`] for what happens when the
    /// stream is full.
    ///
    /// [`store_batch`]: Provider::store_batch
    ///
    /// This is local tailing of what this provider stores. Events that other instances store in
    /// a shared backend reach the broker through the provider's inbound subscription instead.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError>;

    /// Counts of what is stored and of what this provider handle has done; see [`ProviderStats`].
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn stats(&self) -> Result<ProviderStats, ProviderError>;

    /// Waits until every write that returned `Ok` is durable and visible to every reader of the
    /// backend. A no-op for providers that write through.
    ///
    /// # Errors
    /// [`ProviderErrorKind::Closed`] after [`Provider::close`]; a backend failure otherwise.
    fn flush(&self) -> Result<(), ProviderError>;

    /// Flushes, ends every open stream, stops background work and releases the backend. Never
    /// waits on a stream's receiver. Every later call of any method returns
    /// [`ProviderErrorKind::Closed`], except `close` itself, which returns `Ok(())` again.
    ///
    /// # Errors
    /// A backend failure while flushing; the provider is closed all the same.
    fn close(&self) -> Result<(), ProviderError>;
}

/// New status fields for one stored event, as the broker's writer sends them.
///
/// Applying an update sets `status`, `error` (empty clears it) and `retry_count`, and sets
/// `processed_at` / `completed_at` only when the update carries them: a `None` leaves the stored
/// timestamp unchanged.
///
/// ```
/// use eventbroker::{Event, EventSource, EventStatus, StatusUpdate};
/// use jiff::Timestamp;
///
/// let mut event = Event::new(EventSource::System, "system.job.run");
/// let started = Timestamp::now();
/// StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(started).apply_to(&mut event);
/// StatusUpdate::new(event.id, EventStatus::Failed)
///     .with_error("timeout")
///     .with_retry_count(3)
///     .with_completed_at(Timestamp::now())
///     .apply_to(&mut event);
///
/// assert_eq!((event.status, event.error.as_str(), event.retry_count), (EventStatus::Failed, "timeout", 3));
/// assert_eq!(event.processed_at, Some(started)); // kept: the second update carried none
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The event to update.
    pub id: EventId,
    /// Its new status.
    pub status: EventStatus,
    /// Its new error text; empty means no error.
    #[serde(default)]
    pub error: String,
    /// Its new retry count.
    #[serde(default)]
    pub retry_count: u32,
    /// When processing began; `None` keeps the stored value.
    #[serde(default)]
    pub processed_at: Option<Timestamp>,
    /// When processing ended; `None` keeps the stored value.
    #[serde(default)]
    pub completed_at: Option<Timestamp>,
}

impl StatusUpdate {
    /// An update to `status` with no error, no retries and no timestamps.
    pub fn new(id: EventId, status: EventStatus) -> Self {
        Self { id, status, error: String::new(), retry_count: 0, processed_at: None, completed_at: None }
    }

    /// The update that brings a stored copy of `event` to `event`'s status fields.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource, EventStatus, StatusUpdate};
    ///
    /// let mut event = Event::new(EventSource::System, "system.job.run");
    /// event.status = EventStatus::Completed;
    /// let update = StatusUpdate::from_event(&event);
    /// assert_eq!((update.id, update.status), (event.id, EventStatus::Completed));
    /// ```
    pub fn from_event(event: &Event) -> Self {
        Self {
            id: event.id,
            status: event.status,
            error: event.error.clone(),
            retry_count: event.retry_count,
            processed_at: event.processed_at,
            completed_at: event.completed_at,
        }
    }

    /// Sets the error text.
    #[must_use]
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = error.into();
        self
    }

    /// Sets the retry count.
    #[must_use]
    pub fn with_retry_count(mut self, retry_count: u32) -> Self {
        self.retry_count = retry_count;
        self
    }

    /// Sets when processing began.
    #[must_use]
    pub fn with_processed_at(mut self, at: Timestamp) -> Self {
        self.processed_at = Some(at);
        self
    }

    /// Sets when processing ended.
    #[must_use]
    pub fn with_completed_at(mut self, at: Timestamp) -> Self {
        self.completed_at = Some(at);
        self
    }

    /// Writes this update's fields into `event`, which is assumed to be the one with this id.
    /// Every provider applies updates with exactly these semantics.
    pub fn apply_to(&self, event: &mut Event) {
        event.status = self.status;
        event.error.clone_from(&self.error);
        event.retry_count = self.retry_count;
        if let Some(at) = self.processed_at {
            event.processed_at = Some(at);
        }
        if let Some(at) = self.completed_at {
            event.completed_at = Some(at);
        }
    }
}

/// Which stored events [`Provider::list`] returns: the seed's filters plus a type pattern, each
/// `None` meaning "any", all of them combined with AND.
///
/// Results come in `(created_at, id)` order; [`offset`](Self::offset) results are skipped and at
/// most [`limit`](Self::limit) are returned, both after filtering.
///
/// ```
/// use eventbroker::{EventFilter, EventSource, EventStatus, Pattern};
///
/// let filter = EventFilter::new()
///     .with_source(EventSource::Database)
///     .with_status(EventStatus::Failed)
///     .with_event_type(Pattern::parse("public.users.*")?)
///     .with_limit(50)
///     .with_offset(100);
/// assert_eq!(filter.limit, Some(50));
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    /// Only events from this source.
    pub source: Option<EventSource>,
    /// Only events with this status.
    pub status: Option<EventStatus>,
    /// Only events of this user.
    pub user_id: Option<i64>,
    /// Only events with this schema, compared exactly.
    pub schema: Option<String>,
    /// Only events with this entity, compared exactly.
    pub entity: Option<String>,
    /// Only events with this operation, compared exactly.
    pub operation: Option<String>,
    /// Only events published by this broker instance.
    pub instance_id: Option<String>,
    /// Only events whose type matches this pattern.
    pub event_type: Option<Pattern>,
    /// Only events created at or after this time (inclusive).
    pub start_time: Option<Timestamp>,
    /// Only events created before this time (exclusive).
    pub end_time: Option<Timestamp>,
    /// At most this many results; `None` means no limit, `Some(0)` returns nothing.
    pub limit: Option<usize>,
    /// Skip this many results first.
    pub offset: usize,
}

impl EventFilter {
    /// A filter that matches every event, with no limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps events from `source`.
    #[must_use]
    pub fn with_source(mut self, source: EventSource) -> Self {
        self.source = Some(source);
        self
    }

    /// Keeps events with `status`.
    #[must_use]
    pub fn with_status(mut self, status: EventStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Keeps events of `user_id`.
    #[must_use]
    pub fn with_user_id(mut self, user_id: i64) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// Keeps events with `schema`.
    #[must_use]
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Keeps events with `entity`.
    #[must_use]
    pub fn with_entity(mut self, entity: impl Into<String>) -> Self {
        self.entity = Some(entity.into());
        self
    }

    /// Keeps events with `operation`.
    #[must_use]
    pub fn with_operation(mut self, operation: impl Into<String>) -> Self {
        self.operation = Some(operation.into());
        self
    }

    /// Keeps events published by `instance_id`.
    #[must_use]
    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// Keeps events whose type matches `pattern`.
    #[must_use]
    pub fn with_event_type(mut self, pattern: Pattern) -> Self {
        self.event_type = Some(pattern);
        self
    }

    /// Keeps events created at or after `start` (inclusive).
    #[must_use]
    pub fn with_start_time(mut self, start: Timestamp) -> Self {
        self.start_time = Some(start);
        self
    }

    /// Keeps events created before `end` (exclusive).
    #[must_use]
    pub fn with_end_time(mut self, end: Timestamp) -> Self {
        self.end_time = Some(end);
        self
    }

    /// Returns at most `limit` events.
    #[must_use]
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Skips the first `offset` matching events.
    #[must_use]
    pub fn with_offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// Whether `event` passes every filter; [`limit`](Self::limit) and [`offset`](Self::offset)
    /// are not considered. This is the reference every provider's `list` agrees with.
    ///
    /// ```
    /// use eventbroker::{Event, EventFilter, EventSource};
    ///
    /// let event = Event::new(EventSource::Frontend, "chat.message").with_user_id(7);
    /// assert!(EventFilter::new().with_user_id(7).matches(&event));
    /// assert!(!EventFilter::new().with_source(EventSource::System).matches(&event));
    /// ```
    pub fn matches(&self, event: &Event) -> bool {
        self.source.is_none_or(|s| s == event.source)
            && self.status.is_none_or(|s| s == event.status)
            && self.user_id.is_none_or(|u| u == event.user_id)
            && self.schema.as_ref().is_none_or(|s| *s == event.schema)
            && self.entity.as_ref().is_none_or(|e| *e == event.entity)
            && self.operation.as_ref().is_none_or(|o| *o == event.operation)
            && self.instance_id.as_ref().is_none_or(|i| *i == event.instance_id)
            && self.event_type.as_ref().is_none_or(|p| p.matches(&event.event_type))
            && self.start_time.is_none_or(|t| event.created_at >= t)
            && self.end_time.is_none_or(|t| event.created_at < t)
    }
}

/// Where [`Provider::replay`] starts.
///
/// ```
/// use eventbroker::{Event, EventSource, MemoryProvider, Provider, ReplayFrom};
/// use std::sync::Arc;
///
/// let provider = MemoryProvider::default();
/// let events: Vec<_> = (0..5).map(|_| Arc::new(Event::new(EventSource::System, "system.tick"))).collect();
/// provider.store_batch(&events)?;
///
/// // Page through history two events at a time.
/// let mut from = ReplayFrom::Beginning;
/// let mut seen = Vec::new();
/// loop {
///     let page = provider.replay(from, None, 2)?;
///     let Some(last) = page.last() else { break };
///     from = ReplayFrom::Sequence(last.seq + 1);
///     seen.extend(page.into_iter().map(|stored| stored.event.id));
/// }
/// assert_eq!(seen, events.iter().map(|e| e.id).collect::<Vec<_>>());
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayFrom {
    /// The oldest stored event.
    Beginning,
    /// Events with a sequence number at or above this one.
    Sequence(u64),
    /// Events created at or after this time, still in sequence order. Continue paging with
    /// [`ReplayFrom::Sequence`], which from there on includes every later-stored event.
    Time(Timestamp),
}

/// A stored event with its sequence number, as [`Provider::replay`] returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The position in the provider's store order: assigned on the first store, starting at 1,
    /// strictly increasing, possibly with gaps.
    pub seq: u64,
    /// The event as stored now, status included.
    pub event: Event,
}

/// Counts a provider reports; [`ProviderStats::to_json`] gives the seed's JSON shape.
///
/// The stored-event counts (`total_events` and the four per status) and `dead_letters` describe
/// what the backend holds now, for every instance sharing it. The activity counts
/// (`events_published`, `events_consumed`, `active_subscribers`) describe this provider handle
/// since it was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderStats {
    /// [`Provider::name`] of the provider.
    pub provider_type: String,
    /// Events stored.
    pub total_events: u64,
    /// Stored events with status `pending`.
    pub pending_events: u64,
    /// Stored events with status `processing`.
    pub processing_events: u64,
    /// Stored events with status `completed`.
    pub completed_events: u64,
    /// Stored events with status `failed`.
    pub failed_events: u64,
    /// Events this handle stored for the first time (re-stores of an id are not counted).
    pub events_published: u64,
    /// Events this handle delivered into streams (one per stream that received it).
    pub events_consumed: u64,
    /// Streams open on this handle whose receiver is still alive.
    pub active_subscribers: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Backend-specific figures, by name (for the memory provider: `evicted`, `expired`, ...).
    pub provider_specific: BTreeMap<String, serde_json::Value>,
}

impl ProviderStats {
    /// Stats of `provider_type` with every count zero.
    pub fn new(provider_type: &str) -> Self {
        Self { provider_type: provider_type.to_owned(), ..Self::default() }
    }

    /// The stored-event count for `status`.
    ///
    /// ```
    /// use eventbroker::{EventStatus, ProviderStats};
    ///
    /// let mut stats = ProviderStats::new("memory");
    /// stats.failed_events = 2;
    /// assert_eq!(stats.count(EventStatus::Failed), 2);
    /// ```
    pub fn count(&self, status: EventStatus) -> u64 {
        match status {
            EventStatus::Pending => self.pending_events,
            EventStatus::Processing => self.processing_events,
            EventStatus::Completed => self.completed_events,
            EventStatus::Failed => self.failed_events,
        }
    }

    /// The stats as JSON, with the seed's field names.
    ///
    /// # Panics
    /// Never: every map key is a string, so serialization cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("stats always serialize: their map keys are strings")
    }
}

/// The error every provider returns once closed.
pub(crate) fn closed_error(provider: &'static str, operation: &'static str) -> ProviderError {
    ProviderError::new(provider, operation, ProviderErrorKind::Closed)
}
