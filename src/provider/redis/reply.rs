//! Decoding what Redis and the scripts answer: stream entries, status hashes, and the events they
//! make up together.

use jiff::Timestamp;
use redis::Value;

use crate::event::{Event, EventStatus};

/// A reply that does not have the shape the provider expects (a key written by something else, or
/// a script out of step with this code).
#[derive(Debug)]
pub(super) struct Malformed(pub(super) String);

impl Malformed {
    pub(super) fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

pub(super) fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

pub(super) fn string(value: Value) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b).ok())
}

pub(super) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

pub(super) fn array(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// A flat `[field, value, …]` array as pairs.
pub(super) fn pairs(value: Value) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let items = array(value)?;
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let Some(field) = items.next() {
        out.push((bytes(field)?, bytes(items.next()?)?));
    }
    Some(out)
}

/// One stream entry: its id and fields.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// `[id, [field, value, …]]`; the fields of an entry deleted while pending come back empty.
    pub(super) fn decode(value: Value) -> Option<Self> {
        let mut parts = array(value)?.into_iter();
        let id = string(parts.next()?)?;
        let fields = parts.next().map_or(Some(Vec::new()), pairs)?;
        Some(Self { id, fields })
    }

    pub(super) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(field, _)| field == name.as_bytes()).map(|(_, value)| value.as_slice())
    }

    pub(super) fn take_field(&mut self, name: &str) -> Option<Vec<u8>> {
        let at = self.fields.iter().position(|(field, _)| field == name.as_bytes())?;
        Some(self.fields.swap_remove(at).1)
    }

    /// The event in the entry's `event` field, as its publisher wrote it.
    pub(super) fn event(&mut self) -> Result<Event, Malformed> {
        let body = self
            .take_field("event")
            .ok_or_else(|| Malformed::new(format!("stream entry {} has no `event` field", self.id)))?;
        decode_event(body).map_err(|reason| Malformed::new(format!("stream entry {}: {reason}", self.id)))
    }
}

/// Decodes an event's JSON (the seed's format), with simd-json: the bytes are ours to scramble.
pub(super) fn decode_event(mut body: Vec<u8>) -> Result<Event, String> {
    Event::from_json_simd(&mut body).map_err(|error| error.to_string())
}

/// An event's record, as the read scripts give it: its status hash (the link to its stream entry,
/// and what changed since it was stored), or for an event still pending without one, the link
/// alone.
#[derive(Debug, Default)]
pub(super) struct StatusHash {
    pub(super) entry: Option<String>,
    /// The body of a re-store, which replaces the entry's.
    pub(super) event: Option<Vec<u8>>,
    pub(super) status: Option<String>,
    pub(super) error: Option<String>,
    pub(super) retry_count: Option<String>,
    pub(super) processed_at: Option<String>,
    pub(super) completed_at: Option<String>,
}

impl StatusHash {
    pub(super) fn decode(value: Value) -> Option<Self> {
        let mut hash = Self::default();
        for (field, value) in pairs(value)? {
            let text = || String::from_utf8(value.clone()).ok();
            match field.as_slice() {
                b"entry" => hash.entry = text(),
                b"event" => hash.event = Some(value),
                b"status" => hash.status = text(),
                b"error" => hash.error = text(),
                b"retry_count" => hash.retry_count = text(),
                b"processed_at" => hash.processed_at = text(),
                b"completed_at" => hash.completed_at = text(),
                _ => {}
            }
        }
        Some(hash)
    }

    /// Whether this hash is the live record of stream entry `entry`.
    pub(super) fn is_record_of(&self, entry: &str) -> bool {
        self.entry.as_deref() == Some(entry)
    }

    /// The stored event: the re-stored body or the entry's, with the status fields applied.
    pub(super) fn into_event(self, entry_body: Option<Vec<u8>>) -> Result<Event, String> {
        let body = self.event.or(entry_body).ok_or("the event's stream entry is gone")?;
        let mut event = decode_event(body)?;
        if let Some(status) = self.status {
            event.status = status.parse::<EventStatus>().map_err(|e| format!("status {status:?}: {e}"))?;
        }
        if let Some(error) = self.error {
            event.error = error;
        }
        if let Some(count) = self.retry_count {
            event.retry_count =
                count.parse().map_err(|_| format!("retry_count {count:?} is not a number"))?;
        }
        if let Some(at) = self.processed_at {
            event.processed_at = Some(timestamp(&at)?);
        }
        if let Some(at) = self.completed_at {
            event.completed_at = Some(timestamp(&at)?);
        }
        Ok(event)
    }
}

fn timestamp(text: &str) -> Result<Timestamp, String> {
    text.parse().map_err(|e| format!("timestamp {text:?}: {e}"))
}

/// `{status hash, [entry]}` as the `get` and `list` scripts return a record; `None` when the event
/// is not stored (or no longer: its entry was trimmed).
pub(super) fn record(value: Value) -> Result<Option<Event>, Malformed> {
    let mut parts = match value {
        Value::Nil | Value::Boolean(false) => return Ok(None),
        other => array(other).ok_or_else(|| Malformed::new("a record is not an array"))?.into_iter(),
    };
    let hash = parts
        .next()
        .and_then(StatusHash::decode)
        .ok_or_else(|| Malformed::new("a record has no status hash"))?;
    let Some(entry_id) = hash.entry.clone() else { return Ok(None) };
    let entry = parts.next().and_then(array).unwrap_or_default().into_iter().next().and_then(Entry::decode);
    let body = match entry {
        Some(mut entry) if entry.id == entry_id => entry.take_field("event"),
        _ => None,
    };
    if hash.event.is_none() && body.is_none() {
        return Ok(None);
    }
    hash.into_event(body).map(Some).map_err(|reason| Malformed::new(format!("entry {entry_id}: {reason}")))
}
