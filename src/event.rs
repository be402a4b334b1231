//! The event: what is published, stored and delivered.
//!
//! The JSON form is the seed's, field for field (`id`, `source`, `type`, `status`, `retry_count`,
//! `error`, `payload`, `user_id`, `session_id`, `instance_id`, `schema`, `entity`, `operation`,
//! `created_at`, `processed_at`, `completed_at`, `metadata`), so events cross between this crate
//! and the Go broker in both directions. One field is ours: `partition_key`, written only when set
//! and ignored by the Go decoder.
//!
//! - Ids are UUID v7: they sort by creation time.
//! - Times are RFC 3339 in UTC with nanoseconds; any RFC 3339 offset is accepted on input.
//! - The payload is raw JSON text. It is validated once when set and never parsed or re-encoded
//!   on its way through the broker or a provider; [`Event::payload`] decodes it on demand.
//!
//! ```
//! use eventbroker::{Event, EventSource};
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct User { id: u64, name: String }
//!
//! let event = Event::for_entity(EventSource::Database, "public", "users", "create")
//!     .with_user_id(123)
//!     .with_session_id("session-456")
//!     .with_payload(&User { id: 123, name: "John Doe".into() })?;
//!
//! assert_eq!(event.event_type, "public.users.create");
//! assert_eq!(event.payload::<User>()?.name, "John Doe");
//!
//! let json = event.to_json();
//! assert_eq!(Event::from_json(&json)?, event);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use compact_str::CompactString;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use self::decode::{Decoded, Dialect, EventVisitor};
use crate::error::{DecodeError, PayloadError};

mod decode;
mod raw_json;

/// Free-form context attached to an event: string keys, JSON values, kept in key order.
pub type Metadata = BTreeMap<String, serde_json::Value>;

crate::id::uuid_v7_id! {
    /// A unique event id: a UUID v7, so ids sort by creation time.
    ///
    /// ```
    /// use eventbroker::EventId;
    ///
    /// let a = EventId::new();
    /// let b = EventId::new();
    /// assert!(a < b);
    /// assert_eq!(a.to_string().parse::<EventId>()?, a);
    /// assert_eq!(format!("{a:?}"), format!("EventId({a})"));
    /// # Ok::<(), uuid::Error>(())
    /// ```
    EventId
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    /// A database change (the CRUD hooks and PostgreSQL capture use this).
    Database,
    /// A websocket connection.
    Websocket,
    /// A browser or other front end.
    Frontend,
    /// The system itself: health, maintenance, lifecycle.
    System,
    /// Internal plumbing between components.
    Internal,
}

impl EventSource {
    /// Every source, in declaration order.
    pub const ALL: [Self; 5] =
        [Self::Database, Self::Websocket, Self::Frontend, Self::System, Self::Internal];

    /// The JSON name: `database`, `websocket`, `frontend`, `system` or `internal`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Websocket => "websocket",
            Self::Frontend => "frontend",
            Self::System => "system",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An [`EventSource`] or [`EventStatus`] name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?}; expected one of {expected}")]
pub struct UnknownName {
    what: &'static str,
    given: String,
    expected: &'static str,
}

impl FromStr for EventSource {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownName {
            what: "event source",
            given: s.to_owned(),
            expected: "database, websocket, frontend, system, internal",
        })
    }
}

/// Where an event is in its life: `pending` on accept, `processing` when a worker takes it into
/// the batch it handles next, then `completed` (every handler succeeded, or none matched) or
/// `failed` (a handler gave up after its retries).
///
/// A worker takes up to 256 events at once (fewer when it keeps up), and
/// marks them all `processing` before it runs the first one's handlers: an event queued behind a
/// slow handler may show `processing` before its own handlers start. [`Event::processed_at`] is
/// when its batch was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Accepted, not yet taken by a worker.
    Pending,
    /// A worker is running its handlers.
    Processing,
    /// Every handler succeeded, or none matched.
    Completed,
    /// At least one handler failed after its last retry.
    Failed,
}

impl EventStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 4] = [Self::Pending, Self::Processing, Self::Completed, Self::Failed];

    /// The JSON name: `pending`, `processing`, `completed` or `failed`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Whether the event's life is over (`completed` or `failed`).
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

impl fmt::Display for EventStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventStatus {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownName {
            what: "event status",
            given: s.to_owned(),
            expected: "pending, processing, completed, failed",
        })
    }
}

/// An event's payload: one JSON value, kept as the exact text it was given or decoded from.
/// Equality compares the text.
///
/// Every payload decodes as a [`serde_json::Value`], and as the value its text says: besides being
/// JSON, its strings hold no lone surrogate (`"\ud800"`), its numbers fit an `f64` (not `1e400`),
/// its arrays and objects nest at most [`Event::MAX_JSON_DEPTH`] (100) deep, and no object in it
/// has one of the keys `serde_json` reserves first (`$serde_json::private::RawValue`,
/// `$serde_json::private::Number`): `serde_json`'s `Value` reads such an object as another value,
/// or not at all. Constructors and deserialization refuse the rest.
///
/// ```
/// use eventbroker::Payload;
///
/// let p = Payload::from_json(r#"{"id": 1}"#.to_owned())?;
/// assert_eq!(p.as_str(), r#"{"id": 1}"#);
/// assert!(Payload::from_json("1e400".to_owned()).is_err());
/// # Ok::<(), eventbroker::PayloadError>(())
/// ```
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// Wraps JSON text after checking that it is one JSON value that keeps the payload's rules.
    /// The check is one pass over the bytes, grammar and rules together; the text is not parsed.
    /// Whitespace around the value is dropped, as `serde_json`'s `RawValue` drops it.
    ///
    /// ```
    /// use eventbroker::Payload;
    ///
    /// assert_eq!(Payload::from_json(" [1, 2]\n".to_owned())?.as_str(), "[1, 2]");
    /// # Ok::<(), eventbroker::PayloadError>(())
    /// ```
    ///
    /// # Errors
    /// [`PayloadError::InvalidJson`] when it is not: `serde_json`'s error when the text is not
    /// JSON, else the rule it breaks first.
    pub fn from_json(json: String) -> Result<Self, PayloadError> {
        let value = raw_json::check_payload(&json).map_err(PayloadError::InvalidJson)?;
        Ok(Self::checked(json, value))
    }

    /// Serializes `value` to compact JSON, as `serde_json` writes it: a non-finite float (`NaN`,
    /// an infinity) is written as `null`, not refused (the Go seed's `json.Marshal` refuses it), so
    /// it does not decode back as a float.
    ///
    /// # Errors
    /// [`PayloadError::Serialize`] when `value` cannot be written as JSON, or nests deeper than
    /// [`Event::MAX_JSON_DEPTH`].
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, PayloadError> {
        let json = serde_json::to_string(value).map_err(PayloadError::Serialize)?;
        let value = raw_json::check_payload(&json).map_err(PayloadError::Serialize)?;
        Ok(Self::checked(json, value))
    }

    /// Wraps the text of `json` in `value`, a range that `raw_json::check_payload` returned for
    /// it. The text gets an allocation of its own size: copying it there costs less than shrinking
    /// the `String` (glibc's `realloc` splits the block and merges the rest back: about 270
    /// instructions against 100 for a 70-byte row from `format!`).
    fn checked(json: String, value: Range<usize>) -> Self {
        let json = if value.len() == json.capacity() { json } else { json[value].to_owned() };
        // SAFETY: `check_payload` accepts only text that is one JSON value as `serde_json` reads
        // it (fuzzed against `serde_json` by the `payload_diff` target), and `json` is now exactly
        // that value's text, without the whitespace around it: the contract of
        // `from_string_unchecked`.
        Self(unsafe { RawValue::from_string_unchecked(json) })
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Whether this is a value rather than JSON `null`; an event holds a `null` payload as `None`.
    fn is_value(&self) -> bool {
        self.as_str() != "null"
    }

    /// Decodes the JSON as `T`.
    ///
    /// # Errors
    /// [`PayloadError::Decode`] when the JSON does not have the shape of `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        serde_json::from_str(self.as_str())
            .map_err(|source| PayloadError::Decode { target: std::any::type_name::<T>(), source })
    }
}

/// Reads the value's text as it stands (JSON formats only), refusing what [`Payload::from_json`]
/// refuses.
impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        raw_json::check_payload(raw.get()).map_err(serde::de::Error::custom)?;
        Ok(Self(raw))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Payload").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type `schema.entity.operation`, as database events are named.
///
/// ```
/// assert_eq!(eventbroker::event_type("public", "users", "create"), "public.users.create");
/// ```
pub fn event_type(schema: &str, entity: &str, operation: &str) -> String {
    let mut t = String::with_capacity(schema.len() + entity.len() + operation.len() + 2);
    t.push_str(schema);
    t.push('.');
    t.push_str(entity);
    t.push('.');
    t.push_str(operation);
    t
}

/// [`event_type`] as a [`CompactString`], joined on the stack when it fits inline (24 bytes, as
/// `public.customers.update` does): one copy, no allocation.
fn entity_type(schema: &str, entity: &str, operation: &str) -> CompactString {
    let mut joined = [0u8; size_of::<CompactString>()];
    let len = schema.len() + entity.len() + operation.len() + 2;
    if len > joined.len() {
        return CompactString::from(event_type(schema, entity, operation));
    }
    let mut at = 0;
    for (i, part) in [schema, entity, operation].into_iter().enumerate() {
        if i > 0 {
            joined[at] = b'.';
            at += 1;
        }
        joined[at..at + part.len()].copy_from_slice(part.as_bytes());
        at += part.len();
    }
    // SAFETY: the bytes are three `str`s joined by ASCII dots, which is UTF-8. (Checking it again
    // costs a tenth of `for_entity`.)
    CompactString::from(unsafe { std::str::from_utf8_unchecked(&joined[..len]) })
}

/// Whether `value` opens more than `limit` arrays and objects one inside another (a top-level
/// array or object is at depth 1): the rule every decoder keeps, for a value already in memory.
/// Walked without recursion, so a value of any depth is safe to ask about; a value with no nested
/// array or object costs no allocation.
fn nests_deeper_than(value: &serde_json::Value, limit: usize) -> bool {
    use serde_json::Value;
    /// The arrays and objects directly inside `value`.
    fn containers(value: &Value) -> impl Iterator<Item = &Value> {
        let (items, members) = match value {
            Value::Array(items) => (items.as_slice(), None),
            Value::Object(members) => (&[][..], Some(members)),
            _ => (&[][..], None),
        };
        items
            .iter()
            .chain(members.into_iter().flat_map(serde_json::Map::values))
            .filter(|v| v.is_array() || v.is_object())
    }
    if !(value.is_array() || value.is_object()) {
        return false;
    }
    // The arrays and objects still to look into, each with its depth.
    let mut pending = Vec::new();
    let mut next = Some((value, 1));
    while let Some((value, depth)) = next.take().or_else(|| pending.pop()) {
        if depth > limit {
            return true;
        }
        pending.extend(containers(value).map(|v| (v, depth + 1)));
    }
    false
}

/// An event. Fields are public and named as in the seed's JSON; the `with_*` methods build one
/// up fluently. The broker validates `event_type` at publish and fills `instance_id` when empty.
///
/// Its `Deserialize` is [`Event::from_json`]'s, with the rules listed there.
// `repr(C)` keeps the fields in the order declared (the seed's JSON order), which puts what a
// worker reads of every event it takes (the id, for its statuses, and the type, to match it) in
// the event's first 48 bytes, beside the `Arc`'s two reference counts: a worker then fetches one
// or two cache lines of an event from the publisher's core before its handlers run, where the
// compiler's own order (id at byte 240, type at 72) made it three or four.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[repr(C)]
pub struct Event {
    /// Unique id.
    pub id: EventId,
    /// Where it came from.
    pub source: EventSource,
    /// Dot-separated type that subscriptions match, e.g. `public.users.create`.
    #[serde(rename = "type")]
    pub event_type: CompactString,
    /// Lifecycle status, as stored: a handler sees the event as it was published (`pending`).
    pub status: EventStatus,
    /// Retries made, as stored once the event's handling ends: of a failed event, those of the
    /// delivery that failed last; of a completed one, the most any delivery needed (0 when none
    /// was retried). Handlers see the event as it was published, 0 on every attempt;
    /// a handler that needs its attempt number counts its calls for the event's id.
    pub retry_count: u32,
    /// The last handler error, when it failed; empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Raw JSON payload; `None` is written as `null`.
    pub payload: Option<Payload>,
    /// Id of the user who caused the event; 0 when none.
    pub user_id: i64,
    /// Session that caused the event; empty when none.
    pub session_id: CompactString,
    /// Broker instance that published the event.
    pub instance_id: CompactString,
    /// Database schema, for database events.
    pub schema: CompactString,
    /// Database entity (table), for database events.
    pub entity: CompactString,
    /// `create`, `update`, `delete` or `read`, for database events.
    pub operation: CompactString,
    /// When the event was created.
    pub created_at: Timestamp,
    /// When a worker began processing it.
    pub processed_at: Option<Timestamp>,
    /// When processing ended, successfully or not.
    pub completed_at: Option<Timestamp>,
    /// Additional context; `null` in the JSON reads as empty.
    pub metadata: Metadata,
    /// Key that picks the shard; events with equal keys are handled in publish order. `None`
    /// means the event type. Not part of the seed's format; written only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<CompactString>,
}

const _: () = assert!(
    std::mem::offset_of!(Event, event_type) + size_of::<CompactString>() <= 48,
    "an event's id and type lie within the first 64 bytes of its `Arc`, with the reference counts"
);

impl Event {
    /// How deep arrays and objects may nest in an event's JSON: within the payload, within each
    /// metadata value, within the value of each field this version does not know; each counted
    /// from that value, so `[[1]]` is 2 deep. Both decoders and the payload setters refuse more.
    /// It is below `serde_json`'s own limit (128 for a whole document), so a payload at the limit
    /// still decodes with [`Event::payload`].
    pub const MAX_JSON_DEPTH: usize = 100;

    /// A pending event of `event_type` from `source`, with a fresh id and the current time.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource, EventStatus};
    ///
    /// let e = Event::new(EventSource::System, "system.health.check");
    /// assert_eq!(e.status, EventStatus::Pending);
    /// assert!(e.payload.is_none());
    /// ```
    pub fn new(source: EventSource, event_type: impl Into<CompactString>) -> Self {
        const NONE: CompactString = CompactString::const_new("");
        Self::pending(source, event_type.into(), [NONE; 3])
    }

    /// A database-style event: type `schema.entity.operation`, with those three fields set. The
    /// schema leads the type: subscribe with `public.users.*`, `*.users.*` or `public.>` to
    /// receive it (`users.*` matches two-part types only).
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    ///
    /// let e = Event::for_entity(EventSource::Database, "public", "users", "delete");
    /// assert_eq!((e.event_type.as_str(), e.entity.as_str()), ("public.users.delete", "users"));
    /// ```
    // Inlined into the caller, the event is built where the caller keeps it: not inlined, its
    // 330 bytes were copied out of the call and again through the `with_*` calls after it.
    #[inline]
    pub fn for_entity(source: EventSource, schema: &str, entity: &str, operation: &str) -> Self {
        let event_type = entity_type(schema, entity, operation);
        let entity =
            [CompactString::from(schema), CompactString::from(entity), CompactString::from(operation)];
        Self::pending(source, event_type, entity)
    }

    /// What [`Event::new`] and [`Event::for_entity`] build, in one struct expression: an event is
    /// large (about 330 bytes), and building it in place spares copies of it.
    #[inline(always)]
    #[allow(clippy::inline_always, reason = "inlined in both callers, the event is written in place")]
    fn pending(source: EventSource, event_type: CompactString, entity: [CompactString; 3]) -> Self {
        // One clock read serves both: the id takes the millisecond of `created_at`.
        let created_at = crate::clock::now();
        let millis = u64::try_from(created_at.as_millisecond()).unwrap_or(0);
        let [schema, entity, operation] = entity;
        Self {
            id: EventId::from_uuid(crate::id::next_v7_at(millis)),
            source,
            event_type,
            status: EventStatus::Pending,
            retry_count: 0,
            error: String::new(),
            payload: None,
            user_id: 0,
            session_id: CompactString::const_new(""),
            instance_id: CompactString::const_new(""),
            schema,
            entity,
            operation,
            created_at,
            processed_at: None,
            completed_at: None,
            metadata: Metadata::new(),
            partition_key: None,
        }
    }

    /// The key of the first metadata value that nests arrays and objects deeper than
    /// [`Event::MAX_JSON_DEPTH`]: an event holding one would be written, but no decoder would
    /// read it back, so the broker does not accept it.
    pub(crate) fn too_deep_metadata(&self) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(_, value)| nests_deeper_than(value, Self::MAX_JSON_DEPTH))
            .map(|(key, _)| key.as_str())
    }

    /// Clears what a handling wrote into the event (status back to `pending`, no error, no
    /// retries, no processing times), so that a stored or dead-lettered copy delivered again
    /// reaches its handlers as it was published.
    pub(crate) fn clear_lifecycle(&mut self) {
        self.status = EventStatus::Pending;
        self.error.clear();
        self.retry_count = 0;
        self.processed_at = None;
        self.completed_at = None;
    }

    /// The key that picks this event's shard: [`Event::partition_key`] when set, else the type.
    pub fn partition(&self) -> &str {
        self.partition_key.as_deref().unwrap_or(&self.event_type)
    }

    /// Serializes `value` as the payload. A value that serializes to `null` clears it; so does a
    /// bare non-finite float, which `serde_json` writes as `null` (inside a struct or a list it
    /// becomes `null` there, and [`Event::payload`] as the original type then fails). Check floats
    /// first where they may be `NaN` or infinite.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    ///
    /// let mut e = Event::new(EventSource::System, "sensor.read");
    /// e.set_payload(&[1.5, f64::NAN])?;
    /// assert_eq!(e.payload_json(), Some("[1.5,null]"));
    /// assert!(e.payload::<Vec<f64>>().is_err());
    /// # Ok::<(), eventbroker::PayloadError>(())
    /// ```
    ///
    /// # Errors
    /// [`PayloadError::Serialize`] when `value` cannot be written as JSON (a map with non-string
    /// keys, a failing `Serialize` impl) or nests deeper than [`Event::MAX_JSON_DEPTH`]. The event
    /// is left unchanged.
    pub fn set_payload<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PayloadError> {
        self.payload = Some(Payload::from_value(value)?).filter(Payload::is_value);
        Ok(())
    }

    /// Sets the payload from JSON text, which is validated and then kept byte for byte; `null`
    /// clears it.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    ///
    /// let mut e = Event::new(EventSource::Frontend, "chat.message");
    /// e.set_payload_json(r#"{"room": "lobby"}"#)?;
    /// assert_eq!(e.payload_json(), Some(r#"{"room": "lobby"}"#));
    /// assert!(e.set_payload_json("{oops").is_err());
    /// # Ok::<(), eventbroker::PayloadError>(())
    /// ```
    ///
    /// # Errors
    /// [`PayloadError::InvalidJson`] when the text is not one valid JSON value, or is one that no
    /// decoder would read back (see [`Payload`]: a lone surrogate, a number beyond `f64`, nesting
    /// deeper than [`Event::MAX_JSON_DEPTH`]). The event is left unchanged.
    pub fn set_payload_json(&mut self, json: impl Into<String>) -> Result<(), PayloadError> {
        self.payload = Some(Payload::from_json(json.into())?).filter(Payload::is_value);
        Ok(())
    }

    /// Decodes the payload as `T`.
    ///
    /// # Errors
    /// [`PayloadError::Empty`] when there is no payload (absent or `null`);
    /// [`PayloadError::Decode`] when it does not have the shape of `T`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        self.payload.as_ref().filter(|p| p.is_value()).ok_or(PayloadError::Empty)?.decode()
    }

    /// The payload's JSON text, or `None` when there is none. A JSON `null` counts as none.
    pub fn payload_json(&self) -> Option<&str> {
        self.payload.as_ref().filter(|p| p.is_value()).map(Payload::as_str)
    }

    /// Whether this is a delivery of [`Broker::replay`](crate::Broker::replay): its metadata holds
    /// `"replay": true`.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    ///
    /// let event = Event::new(EventSource::System, "audit.login");
    /// assert!(!event.is_replay());
    /// assert!(event.with_metadata("replay", true).is_replay());
    /// ```
    pub fn is_replay(&self) -> bool {
        self.metadata.get("replay").and_then(serde_json::Value::as_bool) == Some(true)
    }

    /// The dead letter a [`Broker::redrive`](crate::Broker::redrive) delivers this event from: its
    /// metadata's `redriven_from`.
    pub fn redriven_from(&self) -> Option<crate::DeadLetterId> {
        self.metadata.get("redriven_from")?.as_str()?.parse().ok()
    }

    /// Sets [`Event::user_id`].
    #[must_use]
    #[inline]
    pub fn with_user_id(mut self, user_id: i64) -> Self {
        self.user_id = user_id;
        self
    }

    /// Sets [`Event::session_id`].
    #[must_use]
    #[inline]
    pub fn with_session_id(mut self, session_id: impl Into<CompactString>) -> Self {
        self.session_id = session_id.into();
        self
    }

    /// Sets [`Event::instance_id`]. The broker fills it when left empty.
    #[must_use]
    #[inline]
    pub fn with_instance_id(mut self, instance_id: impl Into<CompactString>) -> Self {
        self.instance_id = instance_id.into();
        self
    }

    /// Sets [`Event::schema`], [`Event::entity`] and [`Event::operation`]; the type is left as is.
    #[must_use]
    #[inline]
    pub fn with_entity(mut self, schema: &str, entity: &str, operation: &str) -> Self {
        self.schema = CompactString::from(schema);
        self.entity = CompactString::from(entity);
        self.operation = CompactString::from(operation);
        self
    }

    /// Sets one metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the partition key: events with the same key are handled in publish order.
    #[must_use]
    #[inline]
    pub fn with_partition_key(mut self, key: impl Into<CompactString>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the payload from a serializable value; see [`Event::set_payload`].
    ///
    /// # Errors
    /// As [`Event::set_payload`].
    pub fn with_payload<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, PayloadError> {
        self.set_payload(value)?;
        Ok(self)
    }

    /// Sets the payload from a JSON value; `Value::Null` clears it. Unlike
    /// [`Event::with_payload`] this cannot fail, so it keeps a builder chain infallible: build the
    /// value with `serde_json::json!`, or convert a type whose serialization cannot fail with
    /// `serde_json::to_value` where its error is handled.
    ///
    /// `with_payload` stays fallible because `Serialize` is: a map with non-string keys, or a
    /// hand-written impl that returns an error, has no JSON form.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    /// use serde_json::json;
    ///
    /// let event = Event::new(EventSource::Database, "public.users.create")
    ///     .with_user_id(123)
    ///     .with_payload_value(json!({"id": 123, "name": "John Doe"}));
    /// assert_eq!(event.payload_json(), Some(r#"{"id":123,"name":"John Doe"}"#));
    /// ```
    ///
    /// # Panics
    /// When `value` nests arrays and objects deeper than [`Event::MAX_JSON_DEPTH`]: no decoder
    /// would read such a payload back, and this builder has no error to return. A `Value` built in
    /// code (`json!`) is far from it; for data from outside, [`Event::with_payload`] returns an
    /// error instead. Likewise when an object in it has one of the keys `serde_json` reserves
    /// first (`$serde_json::private::RawValue`, `$serde_json::private::Number`), which its `Value`
    /// reads as another value (see [`Payload`]). Otherwise never: a `Value`'s map keys are strings
    /// and its numbers finite, so it always serializes.
    #[must_use]
    #[allow(clippy::needless_pass_by_value, reason = "a builder takes what `json!` makes, by value")]
    pub fn with_payload_value(self, value: serde_json::Value) -> Self {
        self.try_with_payload_value(&value)
            .unwrap_or_else(|error| panic!("{error}; Event::with_payload returns an error for it instead"))
    }

    /// [`Event::with_payload_value`] for callers that handle the ways it fails.
    pub(crate) fn try_with_payload_value(mut self, value: &serde_json::Value) -> Result<Self, PayloadError> {
        // Before serializing, which recurses as deep as the value nests.
        if nests_deeper_than(value, Self::MAX_JSON_DEPTH) {
            return Err(PayloadError::Serialize(serde::ser::Error::custom(format_args!(
                "a payload value nests arrays and objects deeper than Event::MAX_JSON_DEPTH ({}), which \
                 no decoder reads back",
                Self::MAX_JSON_DEPTH
            ))));
        }
        // The text's check then refuses what else a payload may not hold (see `Payload`).
        self.payload = Some(Payload::from_value(value)?).filter(Payload::is_value);
        Ok(self)
    }

    /// The event as compact JSON in the seed's format.
    ///
    /// # Panics
    /// Never: every field serializes (the metadata's keys are strings, the payload is JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes: its map keys are strings")
    }

    /// Decodes an event from JSON text with `serde_json`.
    ///
    /// Both decoders, this one and [`Event::from_json_simd`], accept the same documents and give
    /// the same events. An event is one JSON object; each field at most once; fields this version
    /// does not know are skipped, but still checked. Beyond JSON's grammar, every value in it keeps
    /// these rules, whether it is read or skipped:
    ///
    /// - strings are Unicode: an escaped lone surrogate (`"\ud800"`) is refused, in the payload
    ///   too (no Rust string could hold it);
    /// - numbers fit an `f64`: `1e400` is refused, in the payload too; `1e-400` reads as 0, and
    ///   integers beyond 64 bits read as the nearest `f64`, as in `serde_json`;
    /// - arrays and objects nest at most [`Event::MAX_JSON_DEPTH`] (100) deep within the payload,
    ///   within each metadata value, and within each unknown field's value, counted from that value;
    /// - `-0` is the float `-0.0`, as `serde_json` reads it: refused for `retry_count` and
    ///   `user_id` (integers), kept as `-0.0` in metadata, kept as the text `-0` in the payload.
    ///
    /// The payload keeps one more, its own (see [`Payload`]): no object in it has one of the keys
    /// `serde_json` reserves first. So every payload an event holds decodes with
    /// [`Event::payload`] as a [`serde_json::Value`] at least, and as the value its text says.
    ///
    /// ```
    /// use eventbroker::Event;
    ///
    /// let doc = r#"{"id":"3f8e9a1c-5b2d-4e7f-9a1b-2c3d4e5f6a7b","source":"system","type":"a.b",
    ///     "status":"pending","retry_count":0,"created_at":"2025-01-27T10:15:30Z","payload":1e400}"#;
    /// assert!(Event::from_json(doc).is_err());
    /// assert!(Event::from_json_simd(&mut doc.as_bytes().to_vec()).is_err());
    /// ```
    ///
    /// # Errors
    /// [`DecodeError::Json`] when the text is not an event: invalid JSON, a missing required field
    /// (`id`, `source`, `type`, `status`, `retry_count`, `created_at`), an unknown source or status,
    /// a duplicate field, a value that breaks the rules above.
    pub fn from_json(json: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(json)?)
    }

    /// Decodes an event from JSON bytes with `simd-json`, giving the same event as
    /// [`Event::from_json`] for the same input, under the same rules. `json` is used as scratch
    /// space and left scrambled; pass a copy if the bytes are still needed.
    ///
    /// ```
    /// use eventbroker::{Event, EventSource};
    ///
    /// let event = Event::new(EventSource::System, "a.b").with_payload(&[1, 2, 3])?;
    /// let mut bytes = event.to_json().into_bytes();
    /// assert_eq!(Event::from_json_simd(&mut bytes)?, event);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`DecodeError::SimdJson`] or [`DecodeError::Payload`] for the same inputs
    /// [`Event::from_json`] rejects.
    pub fn from_json_simd(json: &mut [u8]) -> Result<Self, DecodeError> {
        // simd-json unescapes strings in place and has no raw-value support, so the payload's exact
        // bytes are copied out before parsing; the parse that follows validates the whole document.
        let payload = raw_json::top_level_value(json, "payload").map(|range| json[range].to_vec());
        let mut deserializer = simd_json::Deserializer::from_slice(json)?;
        let Decoded { mut event, has_payload } =
            deserializer.deserialize_struct("Event", decode::FIELDS, EventVisitor(Dialect::SimdJson))?;
        event.payload = match (has_payload, payload) {
            (false, _) => None,
            (true, Some(bytes)) if bytes == b"null" => None,
            (true, Some(bytes)) => {
                let text = String::from_utf8(bytes).map_err(|e| DecodeError::Payload(e.to_string()))?;
                Some(Payload::from_json(text).map_err(|e| DecodeError::Payload(e.to_string()))?)
            }
            // The scanner missed a payload simd-json parsed: refuse the event rather than drop it.
            (true, None) => {
                return Err(DecodeError::Payload("its text was not found in the document".into()));
            }
        };
        Ok(event)
    }
}

/// Reads the object [`Event::from_json`] describes, under its rules.
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let decoded =
            deserializer.deserialize_struct("Event", decode::FIELDS, EventVisitor(Dialect::Serde))?;
        Ok(decoded.event)
    }
}
