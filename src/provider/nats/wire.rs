//! What the provider writes on the server: event messages with their headers, status records, and
//! how they are read back.
//!
//! An event message's body is the event's JSON in the seed's format, exactly as stored, so any
//! client reads it; its headers say what a consumer needs without decoding the body.

use async_nats::HeaderMap;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::connection::{Publish, RawMessage};
use super::layout::Layout;
use super::subject::event_subject;
use crate::event::{Event, EventId, EventStatus};
use crate::provider::{DeadLetter, StatusUpdate};

/// JetStream's de-duplication header: the event id.
pub(super) const MSG_ID: &str = "Nats-Msg-Id";
/// The event id.
pub(super) const ID: &str = "Eventbroker-Id";
/// The event type, unencoded.
pub(super) const TYPE: &str = "Eventbroker-Type";
/// The event source.
pub(super) const SOURCE: &str = "Eventbroker-Source";
/// The publishing broker's instance id.
pub(super) const INSTANCE: &str = "Eventbroker-Instance";
/// The publishing broker's consumer group key (no echo); absent for events stored outside a broker.
pub(super) const ORIGIN: &str = "Eventbroker-Origin";
/// Compare-and-set on a subject's last sequence (0: the subject must have no message).
const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The KV operation of a record message: absent or `PUT` for a value, `DEL` / `PURGE` for a delete.
const KV_OPERATION: &str = "KV-Operation";

/// The message that stores `event`, de-duplicated by `msg_id` (normally the event id).
pub(super) fn event_message(layout: &Layout, event: &Event, origin: Option<&str>, msg_id: &str) -> Publish {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, msg_id);
    headers.insert(ID, event.id.to_string());
    headers.insert(TYPE, event.event_type.as_str());
    headers.insert(SOURCE, event.source.as_str());
    // A header value cannot carry a line break: written as it is, it would end the header early
    // (the client cannot parse the message) or add a header of its own (a forged origin). The
    // header is informational; the body keeps the instance id.
    if !event.instance_id.is_empty() && !event.instance_id.chars().any(char::is_control) {
        headers.insert(INSTANCE, event.instance_id.as_str());
    }
    if let Some(origin) = origin {
        headers.insert(ORIGIN, origin);
    }
    Publish {
        subject: event_subject(&layout.prefix, &event.event_type),
        headers,
        payload: event.to_json().into(),
    }
}

/// The event in a message body.
pub(super) fn decode_event(payload: &[u8]) -> Result<Event, String> {
    let text = std::str::from_utf8(payload).map_err(|error| format!("the body is not UTF-8: {error}"))?;
    Event::from_json(text).map_err(|error| error.to_string())
}

/// The id of the event a message stores: from its header, or else its body.
pub(super) fn event_id_of(message: &RawMessage) -> Option<EventId> {
    #[derive(Deserialize)]
    struct JustTheId {
        id: EventId,
    }
    if let Some(id) = message.header(ID).and_then(|id| id.parse().ok()) {
        return Some(id);
    }
    serde_json::from_slice::<JustTheId>(&message.payload).ok().map(|e| e.id)
}

/// The status record of one stored event, the value under its id in the status bucket.
///
/// It says where the event's message is and what its status fields are now; after a second store
/// of the id it also carries the replacing event, since the message itself never changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Record {
    /// The stream sequence of the event's message.
    pub(super) seq: u64,
    pub(super) status: EventStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) error: String,
    #[serde(default)]
    pub(super) retry_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) processed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) completed_at: Option<Timestamp>,
    /// The event as stored again, replacing the message's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) replaced_by: Option<Box<Event>>,
}

impl Record {
    /// The record of `event` stored at `seq`.
    pub(super) fn new(seq: u64, event: &Event) -> Self {
        Self {
            seq,
            status: event.status,
            error: event.error.clone(),
            retry_count: event.retry_count,
            processed_at: event.processed_at,
            completed_at: event.completed_at,
            replaced_by: None,
        }
    }

    /// The record of `event` stored again over the message at `seq`.
    pub(super) fn replacing(seq: u64, event: &Event) -> Self {
        Self { replaced_by: Some(Box::new(event.clone())), ..Self::new(seq, event) }
    }

    /// Applies `update` with [`StatusUpdate::apply_to`]'s semantics.
    pub(super) fn update(&mut self, update: &StatusUpdate) {
        self.status = update.status;
        self.error.clone_from(&update.error);
        self.retry_count = update.retry_count;
        self.processed_at = update.processed_at.or(self.processed_at);
        self.completed_at = update.completed_at.or(self.completed_at);
    }

    /// The event as stored now: the replacing one or `stored` (the message's), with this record's
    /// status fields.
    pub(super) fn current(&self, stored: Event) -> Event {
        self.replacement().unwrap_or_else(|| self.with_status(stored))
    }

    /// The replacing event with this record's status fields, when the id was stored again.
    pub(super) fn replacement(&self) -> Option<Event> {
        self.replaced_by.as_deref().map(|event| self.with_status(event.clone()))
    }

    fn with_status(&self, mut event: Event) -> Event {
        event.status = self.status;
        event.error.clone_from(&self.error);
        event.retry_count = self.retry_count;
        event.processed_at = self.processed_at;
        event.completed_at = self.completed_at;
        event
    }
}

/// What the status bucket holds under one id.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Slot {
    /// Nothing was ever stored under it (or it expired).
    Empty,
    /// The event was deleted; the delete marker is at `revision`.
    Deleted { revision: u64 },
    /// A record, written at `revision`.
    Live { revision: u64, record: Record },
}

impl Slot {
    /// The revision a compare-and-set over this slot expects.
    pub(super) fn revision(&self) -> u64 {
        match self {
            Self::Empty => 0,
            Self::Deleted { revision } | Self::Live { revision, .. } => *revision,
        }
    }

    /// The slot a record message (or its absence) describes.
    pub(super) fn read(message: Option<RawMessage>) -> Result<Self, String> {
        let Some(message) = message else { return Ok(Self::Empty) };
        if matches!(message.header(KV_OPERATION), Some("DEL" | "PURGE")) {
            return Ok(Self::Deleted { revision: message.seq });
        }
        let record = serde_json::from_slice(&message.payload)
            .map_err(|error| format!("status record {} is not valid: {error}", message.subject))?;
        Ok(Self::Live { revision: message.seq, record })
    }
}

/// The message that writes `record` for `id`, if the id's last revision is still `expected`.
pub(super) fn record_message(layout: &Layout, id: EventId, record: &Record, expected: u64) -> Publish {
    let mut headers = HeaderMap::new();
    headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string());
    Publish {
        subject: layout.status_subject(id),
        headers,
        // A record of plain fields always serializes.
        payload: serde_json::to_vec(record).unwrap_or_default().into(),
    }
}

/// The delete marker of `id`'s record.
pub(super) fn delete_marker(layout: &Layout, id: EventId) -> Publish {
    let mut headers = HeaderMap::new();
    headers.insert(KV_OPERATION, "DEL");
    Publish { subject: layout.status_subject(id), headers, payload: bytes::Bytes::new() }
}

/// The message that stores dead letter `letter`, replacing an earlier one with its id.
pub(super) fn letter_message(layout: &Layout, letter: &DeadLetter) -> Publish {
    Publish {
        subject: layout.letter_subject(letter.id),
        headers: HeaderMap::new(),
        // A dead letter serializes as an event does: always.
        payload: serde_json::to_vec(letter).unwrap_or_default().into(),
    }
}

/// The dead letter in a message body.
pub(super) fn decode_letter(message: &RawMessage) -> Result<DeadLetter, String> {
    serde_json::from_slice(&message.payload)
        .map_err(|error| format!("dead letter {} is not valid: {error}", message.subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventSource;

    #[test]
    fn a_record_applies_updates_as_status_updates_do() {
        let mut event = Event::new(EventSource::System, "a.b");
        let mut record = Record::new(7, &event);
        let started = Timestamp::now();
        let updates = [
            StatusUpdate::new(event.id, EventStatus::Processing).with_processed_at(started),
            StatusUpdate::new(event.id, EventStatus::Failed).with_error("boom").with_retry_count(2),
        ];
        for update in &updates {
            update.apply_to(&mut event);
            record.update(update);
        }
        let mut stored = event.clone();
        stored.status = EventStatus::Pending;
        stored.processed_at = None;
        assert_eq!(record.current(stored), event);
        assert_eq!(record.seq, 7);
    }

    #[test]
    fn a_replacing_record_carries_the_new_event() {
        let first = Event::new(EventSource::System, "a.b");
        let mut second = first.clone();
        second.event_type = "a.c".into();
        second.status = EventStatus::Completed;
        let record = Record::replacing(3, &second);
        assert_eq!(record.current(first), second);
        let json = serde_json::to_string(&Record::new(3, &second)).expect("serializes");
        assert!(!json.contains("replaced_by"), "{json}");
    }
}
