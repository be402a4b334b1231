//! What the provider traits exchange with their callers: status updates, the `list` filter,
//! replay positions, stored events and stats.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventId, EventSource, EventStatus};
use crate::pattern::Pattern;

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

/// Which stored events [`EventStore::list`](super::EventStore::list) returns: the seed's filters plus a type pattern, each
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
        self.matches_with_status(event, event.status)
    }

    /// [`matches`](Self::matches) with `status` in place of the event's own.
    pub(crate) fn matches_with_status(&self, event: &Event, status: EventStatus) -> bool {
        self.source.is_none_or(|s| s == event.source)
            && self.status.is_none_or(|s| s == status)
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

/// Where [`EventStore::replay`](super::EventStore::replay) starts.
///
/// ```
/// use eventbroker::{Event, EventSink, EventSource, EventStore, MemoryProvider, ReplayFrom};
/// use std::sync::Arc;
///
/// let provider = MemoryProvider::default();
/// let events: Vec<_> = (0..5).map(|_| Arc::new(Event::new(EventSource::System, "system.tick"))).collect();
/// provider.store_batch(&events, None)?;
///
/// // Page through history two events at a time.
/// let mut from = ReplayFrom::Beginning;
/// let mut seen = Vec::new();
/// loop {
///     let page = provider.replay(from, None, 2)?;
///     seen.extend(page.events.into_iter().map(|stored| stored.event.id));
///     match page.next {
///         Some(next) if !page.end => from = ReplayFrom::Sequence(next),
///         _ => break,
///     }
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
    /// Events created at or after this time ([`Timestamp`](crate::Timestamp)), still in sequence
    /// order. Paging on with [`ReplayFrom::Sequence`] includes every later-stored event, whenever
    /// it was created; a [`ReplayCursor`] (what [`ProviderExt::replay_pages`](super::ProviderExt::replay_pages)
    /// and [`Broker::replay`](crate::Broker::replay) page with) keeps the time.
    Time(Timestamp),
}

/// Where a paged replay goes on: the next position in sequence order, and for a replay that began
/// at a time, that time, since the pages after the first continue by sequence and must still leave
/// out the events created before it. [`ProviderExt::replay_pages`](super::ProviderExt::replay_pages)
/// and [`Broker::replay`](crate::Broker::replay) take one (a [`ReplayFrom`] converts into the
/// cursor that starts there), and [`BrokerError::ReplayFull`](crate::BrokerError::ReplayFull)
/// gives one to resume an interrupted replay with.
///
/// ```
/// use eventbroker::{ReplayCursor, ReplayFrom, Timestamp};
///
/// let an_hour_ago = Timestamp::now() - std::time::Duration::from_secs(3600);
/// let cursor = ReplayCursor::from(ReplayFrom::Time(an_hour_ago));
/// assert_eq!(cursor.not_before(), Some(an_hour_ago));
/// // Going on after sequence number 41 keeps the time.
/// let later = cursor.at_sequence(42);
/// assert_eq!((later.position(), later.not_before()), (ReplayFrom::Sequence(42), Some(an_hour_ago)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CursorFields")]
pub struct ReplayCursor {
    position: ReplayFrom,
    not_before: Option<Timestamp>,
}

/// A [`ReplayCursor`] as read: one at a time keeps that time, whatever `not_before` says.
#[derive(Deserialize)]
struct CursorFields {
    position: ReplayFrom,
    not_before: Option<Timestamp>,
}

impl From<CursorFields> for ReplayCursor {
    fn from(fields: CursorFields) -> Self {
        let start = Self::from(fields.position);
        Self { position: fields.position, not_before: fields.not_before.or(start.not_before) }
    }
}

impl ReplayCursor {
    /// Where the next page starts.
    pub fn position(&self) -> ReplayFrom {
        self.position
    }

    /// Of a replay that began at a time: that time; events created before it are left out.
    pub fn not_before(&self) -> Option<Timestamp> {
        self.not_before
    }

    /// The same replay, going on from sequence number `seq` (the one after the last event it
    /// returned).
    #[must_use]
    pub fn at_sequence(self, seq: u64) -> Self {
        Self { position: ReplayFrom::Sequence(seq), ..self }
    }

    /// Whether `event` belongs to this replay: created at or after its time, if it has one.
    pub(crate) fn admits(&self, event: &Event) -> bool {
        self.not_before.is_none_or(|at| event.created_at >= at)
    }
}

impl From<ReplayFrom> for ReplayCursor {
    fn from(position: ReplayFrom) -> Self {
        let not_before = match position {
            ReplayFrom::Time(at) => Some(at),
            ReplayFrom::Beginning | ReplayFrom::Sequence(_) => None,
        };
        Self { position, not_before }
    }
}

/// A stored event with its sequence number, as [`EventStore::replay`](super::EventStore::replay) returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The position in the provider's store order: assigned on the first store, starting at 1,
    /// strictly increasing, possibly with gaps.
    pub seq: u64,
    /// The event as stored now, status included.
    pub event: Event,
}

/// One page of [`EventStore::replay`](super::EventStore::replay): the events, where the next page
/// starts, and whether history went on past this page.
///
/// `next` can be past the last event returned: a backend that passes over rows holding no valid
/// event (PostgreSQL: a captured row whose JSON breaks the payload rules, a row written by hand)
/// reads at most so many of them per call, and a page can then hold fewer events than asked for,
/// or none, while history goes on. So the end of history is [`ReplayPage::end`], never the
/// page's length.
///
/// ```
/// use eventbroker::{Event, EventSource, MemoryProvider, EventStore, ProviderExt, ReplayFrom};
///
/// let provider = MemoryProvider::default();
/// for _ in 0..3 {
///     provider.store_one(&Event::new(EventSource::System, "system.tick"))?;
/// }
/// let mut from = ReplayFrom::Beginning;
/// let mut seen = 0;
/// loop {
///     let page = provider.replay(from, None, 2)?;
///     seen += page.events.len();
///     if let Some(next) = page.next {
///         from = ReplayFrom::Sequence(next);
///     }
///     if page.end {
///         break;
///     }
/// }
/// assert_eq!(seen, 3);
/// # Ok::<(), eventbroker::ProviderError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplayPage {
    /// At most the `limit` asked for, in sequence order.
    pub events: Vec<StoredEvent>,
    /// The sequence number the next page starts at: past every row this page read, the events it
    /// returns and the rows it passed over. `None` when it read none.
    pub next: Option<u64>,
    /// This page reached the end of history, for now: what is stored later comes at or after
    /// `next` (after the position asked for, when `next` is `None`).
    pub end: bool,
}

impl ReplayPage {
    /// The page of a backend that reads every row it steps over as an event: history goes on
    /// after the last event when the page holds `limit` of them, and has ended when it holds
    /// fewer.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource, ReplayPage, StoredEvent};
    ///
    /// let one = StoredEvent { seq: 7, event: Event::new(EventSource::System, "system.tick") };
    /// let page = ReplayPage::from_events(vec![one], 2);
    /// assert_eq!((page.next, page.end), (Some(8), true));
    /// ```
    pub fn from_events(events: Vec<StoredEvent>, limit: usize) -> Self {
        let next = events.last().map(|last| last.seq.saturating_add(1));
        let end = events.len() < limit;
        Self { events, next, end }
    }

    /// A page that read up to (not including) sequence number `next`, passing over rows that
    /// hold no valid event, and stopped there with history going on.
    pub fn continues_at(events: Vec<StoredEvent>, next: u64) -> Self {
        Self { events, next: Some(next), end: false }
    }
}

/// Counts a provider reports; [`ProviderStats::to_json`] gives the seed's JSON shape.
///
/// The stored-event counts (`total_events` and the four per status) and `dead_letters` describe
/// what the backend holds now, for every instance sharing it: exact, except where a backend says
/// they are estimates (PostgreSQL, on a large table, in `provider_specific`). The activity counts
/// (`events_published`, `events_consumed`, `active_subscribers`) describe this provider handle
/// since it was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderStats {
    /// [`Provider::name`](super::Provider::name) of the provider.
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
    /// Events this handle handed out: to the inbound sources opened on it (redeliveries
    /// included), and into its own [`EventStream`](super::EventStream)s (one per stream that
    /// received it). Not a broker's handler calls: see [`BrokerStats`](crate::BrokerStats).
    pub events_consumed: u64,
    /// The inbound sources open on this handle (one per broker receiving through it) and its
    /// streams whose receiver is still alive. Not a broker's subscriptions.
    pub active_subscribers: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Backend-specific figures, by name:
    ///
    /// | backend | keys |
    /// |---|---|
    /// | memory | `max_events`, `shards`, `evicted`, `expired`, `replaced`, `dead_letters_dropped`, `streams_missed`, `bus_pending`, `bus_logged`, `bus_redelivered`, `bus_echoes_skipped`, `bus_filtered`, `bus_lost` |
    /// | Redis | `key_prefix`, `stream`, `stream_length`, `max_len`, `trimmed`, `expired`, `replaced`, `dead_letters_dropped`, `reconnects`, `inbound_redelivered`, `inbound_echoes_skipped`, `inbound_filtered`, `inbound_lost`, `inbound_malformed` |
    /// | NATS | `server_version`, `stream_messages`, `stream_bytes`, `stream_first_seq`, `stream_last_seq`, `stream_consumers`, `dead_letter_bytes`, `replaced`, `echoes_skipped`, `filtered_after_fetch`, `undecodable`, `held_redeliveries`, `status_cache`, `disconnects`, `connects`, `multi_filter` |
    /// | PostgreSQL | `table`, `event_counts_exact` and `dead_letters_exact` (`false`: the count is an estimate from a sample, as on a table over 10 MiB), `replaced`, `expired`, `inbound_malformed`, `query_malformed`, `pool_size` (connections open now, at most the configured size), `pool_idle`, `listener_sessions`, `listener_failures`, `notifications` |
    ///
    /// Each provider's module docs say what its counts count.
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

    /// The stats as JSON, with the seed's field names: every field above under its own name,
    /// `provider_specific` as an object.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use eventbroker::{Event, EventSink, EventSource, EventStore, MemoryProvider};
    ///
    /// let provider = MemoryProvider::default();
    /// provider.store_batch(&[Arc::new(Event::new(EventSource::System, "system.tick"))], None)?;
    /// let json: serde_json::Value = serde_json::from_str(&provider.stats()?.to_json())?;
    /// assert_eq!(json["provider_type"], "memory");
    /// assert_eq!((json["total_events"].as_u64(), json["pending_events"].as_u64()), (Some(1), Some(1)));
    /// assert_eq!(json["provider_specific"]["max_events"], 10_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Panics
    /// Never: every map key is a string, so serialization cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("stats always serialize: their map keys are strings")
    }
}
