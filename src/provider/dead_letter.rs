//! Dead letters: deliveries that failed after their last retry, kept so they can be inspected and
//! redriven.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventId};
use crate::pattern::Pattern;
use crate::subscription::SubscriptionId;

crate::id::uuid_v7_id! {
    /// A unique dead-letter id: a UUID v7, so ids sort by creation time.
    ///
    /// ```
    /// use eventbroker::DeadLetterId;
    ///
    /// let a = DeadLetterId::new();
    /// let b = DeadLetterId::new();
    /// assert!(a < b);
    /// assert_eq!(a.to_string().parse::<DeadLetterId>()?, a);
    /// # Ok::<(), uuid::Error>(())
    /// ```
    DeadLetterId
}

/// One delivery (an event to one subscription) that failed after its last retry.
///
/// ```
/// use eventbroker::{DeadLetter, Event, EventSource, SubscriptionId};
///
/// let event = Event::new(EventSource::Database, "public.users.create");
/// let letter = DeadLetter::new(event, SubscriptionId::from_raw(7), "public.users.*", "smtp timeout", 4);
/// assert_eq!((letter.attempts, letter.error.as_str()), (4, "smtp timeout"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique id.
    pub id: DeadLetterId,
    /// The event as its handlers saw it (as published), with the failure written in: `status`
    /// `failed`, `error`, and `retry_count` the retries this delivery took. Its `processed_at` and
    /// `completed_at` are not set; the stored event's are.
    pub event: Event,
    /// The subscription whose handler failed.
    pub subscription_id: SubscriptionId,
    /// That subscription's pattern, as text.
    pub pattern: String,
    /// The handler's last error.
    pub error: String,
    /// Attempts made: the first delivery plus its retries.
    pub attempts: u32,
    /// When the delivery gave up.
    pub failed_at: Timestamp,
}

impl DeadLetter {
    /// A dead letter with a fresh id, failed now.
    pub fn new(
        event: Event,
        subscription_id: SubscriptionId,
        pattern: impl Into<String>,
        error: impl Into<String>,
        attempts: u32,
    ) -> Self {
        Self {
            id: DeadLetterId::new(),
            event,
            subscription_id,
            pattern: pattern.into(),
            error: error.into(),
            attempts,
            failed_at: crate::clock::now(),
        }
    }
}

/// Which dead letters [`EventStore::list_dead_letters`](super::EventStore::list_dead_letters) returns;
/// each `None` means "any", all combined with AND.
///
/// Results come in `(failed_at, id)` order; [`offset`](Self::offset) results are skipped and at
/// most [`limit`](Self::limit) are returned, both after filtering.
///
/// ```
/// use eventbroker::{DeadLetterFilter, Pattern, SubscriptionId};
///
/// let filter = DeadLetterFilter::new()
///     .with_event_type(Pattern::parse("public.>")?)
///     .with_subscription_id(SubscriptionId::from_raw(7))
///     .with_limit(20);
/// assert_eq!(filter.offset, 0);
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetterFilter {
    /// Only letters of this event (each delivery of it that failed has one).
    pub event_id: Option<EventId>,
    /// Only letters whose event type matches this pattern.
    pub event_type: Option<Pattern>,
    /// Only letters of this subscription.
    pub subscription_id: Option<SubscriptionId>,
    /// Only letters that failed at or after this time (inclusive).
    pub start_time: Option<Timestamp>,
    /// Only letters that failed before this time (exclusive).
    pub end_time: Option<Timestamp>,
    /// At most this many results; `None` means no limit, `Some(0)` returns nothing.
    pub limit: Option<usize>,
    /// Skip this many results first.
    pub offset: usize,
}

impl DeadLetterFilter {
    /// A filter that matches every dead letter, with no limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps letters of the event `event_id`.
    #[must_use]
    pub fn with_event_id(mut self, event_id: EventId) -> Self {
        self.event_id = Some(event_id);
        self
    }

    /// Keeps letters whose event type matches `pattern`.
    #[must_use]
    pub fn with_event_type(mut self, pattern: Pattern) -> Self {
        self.event_type = Some(pattern);
        self
    }

    /// Keeps letters of `subscription_id`.
    #[must_use]
    pub fn with_subscription_id(mut self, subscription_id: SubscriptionId) -> Self {
        self.subscription_id = Some(subscription_id);
        self
    }

    /// Keeps letters that failed at or after `start` (inclusive).
    #[must_use]
    pub fn with_start_time(mut self, start: Timestamp) -> Self {
        self.start_time = Some(start);
        self
    }

    /// Keeps letters that failed before `end` (exclusive).
    #[must_use]
    pub fn with_end_time(mut self, end: Timestamp) -> Self {
        self.end_time = Some(end);
        self
    }

    /// Returns at most `limit` letters.
    #[must_use]
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Skips the first `offset` matching letters.
    #[must_use]
    pub fn with_offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// Whether `letter` passes every filter; limit and offset are not considered.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.event_id.is_none_or(|id| id == letter.event.id)
            && self.event_type.as_ref().is_none_or(|p| p.matches(&letter.event.event_type))
            && self.subscription_id.is_none_or(|s| s == letter.subscription_id)
            && self.start_time.is_none_or(|t| letter.failed_at >= t)
            && self.end_time.is_none_or(|t| letter.failed_at < t)
    }
}
