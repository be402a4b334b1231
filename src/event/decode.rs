//! How an event's JSON is read: one visitor, driven by `serde_json` ([`Event::from_json`], and
//! `Event`'s `Deserialize`) and by `simd-json` ([`Event::from_json_simd`]), so that the two accept
//! the same documents and give the same events. The rules are stated on [`Event::from_json`];
//! [`Dialect`] is the one place where the two parsers differ. Metadata values are built and
//! unknown fields walked by visitors that count depth ([`ValueSeed`], [`Checked`]); the payload,
//! kept as text, is checked on its bytes by `raw_json::check_payload`, which is tested against
//! [`Checked`].

use std::fmt;
use std::marker::PhantomData;

use compact_str::CompactString;
use jiff::Timestamp;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_json::Value;

use super::{Event, EventId, EventSource, EventStatus, Metadata, Payload};

/// The names `deserialize_struct` is told about.
pub(super) const FIELDS: &[&str] = &[
    "id",
    "source",
    "type",
    "status",
    "retry_count",
    "error",
    "payload",
    "user_id",
    "session_id",
    "instance_id",
    "schema",
    "entity",
    "operation",
    "created_at",
    "processed_at",
    "completed_at",
    "metadata",
    "partition_key",
];

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Id,
    Source,
    #[serde(rename = "type")]
    Type,
    Status,
    RetryCount,
    Error,
    Payload,
    UserId,
    SessionId,
    InstanceId,
    Schema,
    Entity,
    Operation,
    CreatedAt,
    ProcessedAt,
    CompletedAt,
    Metadata,
    PartitionKey,
    #[serde(other)]
    Unknown,
}

/// Which parser drives the visitor. They report numbers alike (a non-negative integer through
/// `visit_u64`, a negative one through `visit_i64`, the rest through `visit_f64`) but for `-0`:
/// `serde_json` reports the float `-0.0`, `simd-json` the integer 0 through `visit_i64`, which no
/// other input reaches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// `serde_json`, or any other serde format: every number means what it is reported as.
    Serde,
    /// `simd-json`: `visit_i64(0)` means `-0`. The payload is skipped; the caller cuts its text
    /// out of the document before parsing.
    SimdJson,
}

/// An event read by the visitor, and whether the document had a `payload` field (the simd-json
/// dialect skips its value).
pub(super) struct Decoded {
    pub(super) event: Event,
    pub(super) has_payload: bool,
}

/// Reads one event object.
pub(super) struct EventVisitor(pub(super) Dialect);

impl<'de> Visitor<'de> for EventVisitor {
    type Value = Decoded;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decoded, A::Error> {
        let dialect = self.0;
        let mut f = Fields::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Id => once(&mut f.id, "id", || map.next_value())?,
                Field::Source => once(&mut f.source, "source", || map.next_value())?,
                Field::Type => once(&mut f.event_type, "type", || map.next_value())?,
                Field::Status => once(&mut f.status, "status", || map.next_value())?,
                Field::RetryCount => once(&mut f.retry_count, "retry_count", || integer(&mut map, dialect))?,
                Field::Error => once(&mut f.error, "error", || map.next_value())?,
                Field::Payload => once(&mut f.payload, "payload", || match dialect {
                    Dialect::Serde => map.next_value(),
                    Dialect::SimdJson => map.next_value::<IgnoredAny>().map(|_| None),
                })?,
                Field::UserId => once(&mut f.user_id, "user_id", || integer(&mut map, dialect))?,
                Field::SessionId => once(&mut f.session_id, "session_id", || map.next_value())?,
                Field::InstanceId => once(&mut f.instance_id, "instance_id", || map.next_value())?,
                Field::Schema => once(&mut f.schema, "schema", || map.next_value())?,
                Field::Entity => once(&mut f.entity, "entity", || map.next_value())?,
                Field::Operation => once(&mut f.operation, "operation", || map.next_value())?,
                Field::CreatedAt => once(&mut f.created_at, "created_at", || map.next_value())?,
                Field::ProcessedAt => once(&mut f.processed_at, "processed_at", || map.next_value())?,
                Field::CompletedAt => once(&mut f.completed_at, "completed_at", || map.next_value())?,
                Field::Metadata => {
                    once(&mut f.metadata, "metadata", || map.next_value_seed(MetadataSeed(dialect)))?;
                }
                Field::PartitionKey => once(&mut f.partition_key, "partition_key", || map.next_value())?,
                Field::Unknown => map.next_value_seed(Checked::ROOT)?,
            }
        }
        let has_payload = f.payload.is_some();
        let event = Event {
            id: f.id.ok_or_else(|| de::Error::missing_field("id"))?,
            source: f.source.ok_or_else(|| de::Error::missing_field("source"))?,
            event_type: f.event_type.ok_or_else(|| de::Error::missing_field("type"))?,
            status: f.status.ok_or_else(|| de::Error::missing_field("status"))?,
            retry_count: f.retry_count.ok_or_else(|| de::Error::missing_field("retry_count"))?,
            error: f.error.unwrap_or_default(),
            payload: f.payload.flatten(),
            user_id: f.user_id.unwrap_or_default(),
            session_id: f.session_id.unwrap_or_default(),
            instance_id: f.instance_id.unwrap_or_default(),
            schema: f.schema.unwrap_or_default(),
            entity: f.entity.unwrap_or_default(),
            operation: f.operation.unwrap_or_default(),
            created_at: f.created_at.ok_or_else(|| de::Error::missing_field("created_at"))?,
            processed_at: f.processed_at.flatten(),
            completed_at: f.completed_at.flatten(),
            metadata: f.metadata.unwrap_or_default(),
            partition_key: f.partition_key.flatten(),
        };
        Ok(Decoded { event, has_payload })
    }
}

/// The fields read so far; `None` until seen.
#[derive(Default)]
#[allow(
    clippy::option_option,
    reason = "the outer option says whether the field was seen (twice is refused), the inner one is its nullable value"
)]
struct Fields {
    id: Option<EventId>,
    source: Option<EventSource>,
    event_type: Option<CompactString>,
    status: Option<EventStatus>,
    retry_count: Option<u32>,
    error: Option<String>,
    payload: Option<Option<Payload>>,
    user_id: Option<i64>,
    session_id: Option<CompactString>,
    instance_id: Option<CompactString>,
    schema: Option<CompactString>,
    entity: Option<CompactString>,
    operation: Option<CompactString>,
    created_at: Option<Timestamp>,
    processed_at: Option<Option<Timestamp>>,
    completed_at: Option<Option<Timestamp>>,
    metadata: Option<Metadata>,
    partition_key: Option<Option<CompactString>>,
}

/// Fills `slot` with `read()`, refusing a field seen twice.
fn once<T, E: de::Error>(
    slot: &mut Option<T>,
    name: &'static str,
    read: impl FnOnce() -> Result<T, E>,
) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(read()?);
    Ok(())
}

/// Reads an integer field; under simd-json, refuses `-0` as `serde_json` does.
fn integer<'de, A, T>(map: &mut A, dialect: Dialect) -> Result<T, A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de> + TryFrom<u64> + TryFrom<i64>,
{
    match dialect {
        Dialect::Serde => map.next_value(),
        Dialect::SimdJson => map.next_value_seed(SimdInteger(PhantomData)),
    }
}

/// An integer as simd-json reports it, `-0` refused with `serde_json`'s words.
struct SimdInteger<T>(PhantomData<T>);

impl<'de, T: TryFrom<u64> + TryFrom<i64>> DeserializeSeed<'de> for SimdInteger<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<T: TryFrom<u64> + TryFrom<i64>> Visitor<'_> for SimdInteger<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::any::type_name::<T>())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v == 0 {
            return Err(E::invalid_type(Unexpected::Float(-0.0), &self));
        }
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }
}

/// The metadata object; `null` reads as empty.
struct MetadataSeed(Dialect);

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = Metadata;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Metadata, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed {
    type Value = Metadata;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a metadata object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Metadata, E> {
        Ok(Metadata::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Metadata, E> {
        Ok(Metadata::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Metadata, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
        let mut metadata = Metadata::new();
        while let Some(key) = map.next_key::<String>()? {
            let value =
                map.next_value_seed(ValueSeed { dialect: self.0, depth_left: Event::MAX_JSON_DEPTH })?;
            metadata.insert(key, value);
        }
        Ok(metadata)
    }
}

/// Refuses to enter an array or object when `depth_left` is 0.
fn enter<E: de::Error>(depth_left: usize) -> Result<usize, E> {
    depth_left.checked_sub(1).ok_or_else(|| {
        E::custom(format_args!("arrays and objects nest deeper than {}", Event::MAX_JSON_DEPTH))
    })
}

/// One metadata value, built as `serde_json::Value` builds itself but for the depth limit and
/// simd-json's `-0`.
#[derive(Clone, Copy)]
struct ValueSeed {
    dialect: Dialect,
    depth_left: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        if v == 0 && self.dialect == Dialect::SimdJson {
            return Ok(Value::from(-0.0));
        }
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = Self { depth_left: enter(self.depth_left)?, ..self };
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = Self { depth_left: enter(self.depth_left)?, ..self };
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            object.insert(key, map.next_value_seed(inner)?);
        }
        Ok(Value::Object(object))
    }
}

/// Checks one JSON value against the rules without building it: strings and numbers are decoded
/// (which is where a lone surrogate or an out-of-range number is refused), nesting is counted.
#[derive(Clone, Copy)]
struct Checked {
    depth_left: usize,
}

impl Checked {
    const ROOT: Self = Self { depth_left: Event::MAX_JSON_DEPTH };
}

/// Checks JSON text against the rules, as one value with nothing after it, through the visitor:
/// the reference `raw_json::check_payload` is tested against, for all but the payload's own rule
/// on reserved keys, which is tested on its own.
#[cfg(test)]
pub(super) fn check_json(text: &str) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Checked::ROOT.deserialize(&mut deserializer)?;
    deserializer.end()
}

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = Self { depth_left: enter(self.depth_left)? };
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = Self { depth_left: enter(self.depth_left)? };
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}
