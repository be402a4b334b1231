//! Between events and rows: the binary `COPY` encoding of a batch, decoding rows back into events,
//! nanosecond timestamps, and type patterns as PostgreSQL regular expressions.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use jiff::Timestamp;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventId, EventSource, EventStatus, Metadata};
use crate::pattern::{Pattern, Segment};

use super::NAME;

/// The columns a store writes, in `COPY` order. `seq` and `tx` come from their defaults.
pub(super) const INSERT_COLUMNS: &str = "id, origin, source, \"type\", status, retry_count, error, payload, \
     user_id, session_id, instance_id, \"schema\", entity, operation, created_at_ns, processed_at_ns, \
     completed_at_ns, metadata, partition_key";

/// Number of columns in [`INSERT_COLUMNS`].
const INSERT_COLUMN_COUNT: i16 = 19;

/// The columns [`decode_event`] reads, from `column` on, in this order.
pub(super) const EVENT_COLUMNS: &str = "id, source, \"type\", status, retry_count, error, payload::text, \
     user_id, session_id, instance_id, \"schema\", entity, operation, created_at_ns, processed_at_ns, \
     completed_at_ns, metadata::text, partition_key";

/// The wake-up a write sends: on channel `$1`, the highest `seq` this session took in table `$2`
/// (a `"schema"."table"` name). Listeners treat it as a hint only.
pub(super) const NOTIFY: &str = "SELECT pg_notify($1, currval(pg_get_serial_sequence($2, 'seq'))::text)";

/// `PGCOPY\n\377\r\n\0`, then flags and header-extension length, both 0.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// A timestamp as nanoseconds since the Unix epoch, the form the tables keep (PostgreSQL's
/// `timestamptz` holds microseconds only). Fits years 1677 to 2262.
pub(super) fn to_nanos(at: Timestamp, field: &str, operation: &'static str) -> Result<i64, ProviderError> {
    i64::try_from(at.as_nanosecond()).map_err(|_| {
        invalid(
            operation,
            format!("{field} {at} is outside the range a row holds (1677-09-21 to 2262-04-11 UTC)"),
        )
    })
}

/// `at` as nanoseconds since the Unix epoch, or whether it lies before (`Less`) or after
/// (`Greater`) every time a row holds: what a time bound of a query compares with.
pub(super) fn nanos_bound(at: Timestamp) -> Result<i64, std::cmp::Ordering> {
    let nanos = at.as_nanosecond();
    i64::try_from(nanos).map_err(|_| nanos.cmp(&0))
}

/// The timestamp `nanos` nanoseconds after the Unix epoch.
pub(super) fn from_nanos(nanos: i64) -> Timestamp {
    // Every i64 of nanoseconds is within jiff's range (years -9999 to 9999).
    Timestamp::from_nanosecond(i128::from(nanos)).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `value` as a `text` column holds it: PostgreSQL refuses the NUL character in text, and one in
/// any field (a handler's error message, say) would fail the whole batch it is written in, so each
/// is written as U+FFFD. Borrows when there is none, the usual case.
pub(super) fn text(value: &str) -> Cow<'_, str> {
    if value.contains('\0') { Cow::Owned(value.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(value) }
}

/// The event's metadata as JSON text, for a `json` column.
pub(super) fn metadata_json(event: &Event, operation: &'static str) -> Result<String, ProviderError> {
    serde_json::to_string(&event.metadata)
        .map_err(|err| invalid(operation, format!("event {}: metadata does not serialize: {err}", event.id)))
}

pub(super) fn invalid(operation: &'static str, reason: String) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::InvalidInput(reason))
}

pub(super) fn corrupt(operation: &'static str, reason: String) -> ProviderError {
    ProviderError::new(NAME, operation, ProviderErrorKind::Backend(reason))
}

/// A batch of events in PostgreSQL's binary `COPY` format, columns as [`INSERT_COLUMNS`]. Built on
/// the caller's thread, so the runtime's thread only moves bytes.
pub(super) struct CopyBatch {
    buf: BytesMut,
}

impl CopyBatch {
    pub(super) fn new(events: usize) -> Self {
        let mut buf = BytesMut::with_capacity(COPY_HEADER.len() + 2 + events * 320);
        buf.put_slice(COPY_HEADER);
        Self { buf }
    }

    /// Appends `event`, published by `origin`.
    pub(super) fn push(&mut self, event: &Event, origin: Option<&str>) -> Result<(), ProviderError> {
        const OP: &str = "store_batch";
        let created = to_nanos(event.created_at, "created_at", OP)?;
        let processed = event.processed_at.map(|at| to_nanos(at, "processed_at", OP)).transpose()?;
        let completed = event.completed_at.map(|at| to_nanos(at, "completed_at", OP)).transpose()?;
        let metadata = metadata_json(event, OP)?;
        let buf = &mut self.buf;
        buf.put_i16(INSERT_COLUMN_COUNT);
        put_bytes(buf, event.id.as_uuid().as_bytes());
        put_opt_text(buf, origin);
        put_text(buf, event.source.as_str());
        put_text(buf, &event.event_type);
        put_text(buf, event.status.as_str());
        put_i64(buf, i64::from(event.retry_count));
        put_text(buf, &event.error);
        // The binary form of `json` is its text: the payload goes in byte for byte.
        put_opt_text(buf, event.payload_json());
        put_i64(buf, event.user_id);
        put_text(buf, &event.session_id);
        put_text(buf, &event.instance_id);
        put_text(buf, &event.schema);
        put_text(buf, &event.entity);
        put_text(buf, &event.operation);
        put_i64(buf, created);
        put_opt_i64(buf, processed);
        put_opt_i64(buf, completed);
        put_text(buf, &metadata);
        put_opt_text(buf, event.partition_key.as_deref());
        Ok(())
    }

    /// The encoded batch, with its trailer.
    pub(super) fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

fn put_bytes(buf: &mut BytesMut, value: &[u8]) {
    // A field longer than 2 GiB cannot be sent at all; PostgreSQL refuses fields over 1 GiB, and
    // says so, so the length saturates rather than wrapping.
    buf.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
    buf.put_slice(value);
}

fn put_text(buf: &mut BytesMut, value: &str) {
    put_bytes(buf, text(value).as_bytes());
}

fn put_opt_text(buf: &mut BytesMut, value: Option<&str>) {
    match value {
        Some(text) => put_text(buf, text),
        None => buf.put_i32(-1),
    }
}

fn put_i64(buf: &mut BytesMut, value: i64) {
    buf.put_i32(8);
    buf.put_i64(value);
}

fn put_opt_i64(buf: &mut BytesMut, value: Option<i64>) {
    match value {
        Some(v) => put_i64(buf, v),
        None => buf.put_i32(-1),
    }
}

/// An `INSERT` of the events bound as [`EventColumns::params`] (`$1` to `$18`) into `table`, in
/// array order, with `origin` (SQL: `NULL` or a placeholder) and ending with `tail` (the
/// `ON CONFLICT` clause and any `RETURNING`).
pub(super) fn insert_from_arrays(table: &str, origin: &str, tail: &str) -> String {
    format!(
        "INSERT INTO {table} ({INSERT_COLUMNS})
         SELECT id, {origin}, source, \"type\", status, retry_count, error, payload::json, user_id,
                session_id, instance_id, \"schema\", entity, operation, created_at_ns,
                processed_at_ns, completed_at_ns, metadata::json, partition_key
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                     $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[],
                     $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::text[])
             WITH ORDINALITY
             AS e(id, source, \"type\", status, retry_count, error, payload, user_id, session_id,
                  instance_id, \"schema\", entity, operation, created_at_ns, processed_at_ns,
                  completed_at_ns, metadata, partition_key, ord)
         ORDER BY ord
         {tail}"
    )
}

/// Events as one array per column, to bind to [`insert_from_arrays`]'s statement.
pub(super) struct EventColumns<'a> {
    ids: Vec<Uuid>,
    sources: Vec<&'static str>,
    types: Vec<Cow<'a, str>>,
    statuses: Vec<&'static str>,
    retries: Vec<i64>,
    errors: Vec<Cow<'a, str>>,
    payloads: Vec<Option<&'a str>>,
    users: Vec<i64>,
    sessions: Vec<Cow<'a, str>>,
    instances: Vec<Cow<'a, str>>,
    schemas: Vec<Cow<'a, str>>,
    entities: Vec<Cow<'a, str>>,
    operations: Vec<Cow<'a, str>>,
    created: Vec<i64>,
    processed: Vec<Option<i64>>,
    completed: Vec<Option<i64>>,
    metadata: Vec<String>,
    partition_keys: Vec<Option<Cow<'a, str>>>,
}

impl<'a> EventColumns<'a> {
    pub(super) fn of(events: &[&'a Event], operation: &'static str) -> Result<Self, ProviderError> {
        let n = events.len();
        let mut c = EventColumns {
            ids: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            retries: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            users: Vec::with_capacity(n),
            sessions: Vec::with_capacity(n),
            instances: Vec::with_capacity(n),
            schemas: Vec::with_capacity(n),
            entities: Vec::with_capacity(n),
            operations: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            processed: Vec::with_capacity(n),
            completed: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            partition_keys: Vec::with_capacity(n),
        };
        let nanos = |at: Option<Timestamp>, field| at.map(|at| to_nanos(at, field, operation)).transpose();
        for &event in events {
            c.ids.push(*event.id.as_uuid());
            c.sources.push(event.source.as_str());
            c.types.push(text(&event.event_type));
            c.statuses.push(event.status.as_str());
            c.retries.push(i64::from(event.retry_count));
            c.errors.push(text(&event.error));
            c.payloads.push(event.payload_json());
            c.users.push(event.user_id);
            c.sessions.push(text(&event.session_id));
            c.instances.push(text(&event.instance_id));
            c.schemas.push(text(&event.schema));
            c.entities.push(text(&event.entity));
            c.operations.push(text(&event.operation));
            c.created.push(to_nanos(event.created_at, "created_at", operation)?);
            c.processed.push(nanos(event.processed_at, "processed_at")?);
            c.completed.push(nanos(event.completed_at, "completed_at")?);
            c.metadata.push(metadata_json(event, operation)?);
            c.partition_keys.push(event.partition_key.as_deref().map(text));
        }
        Ok(c)
    }

    /// `$1` to `$18` of [`insert_from_arrays`]'s statement.
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 18] {
        [
            &self.ids,
            &self.sources,
            &self.types,
            &self.statuses,
            &self.retries,
            &self.errors,
            &self.payloads,
            &self.users,
            &self.sessions,
            &self.instances,
            &self.schemas,
            &self.entities,
            &self.operations,
            &self.created,
            &self.processed,
            &self.completed,
            &self.metadata,
            &self.partition_keys,
        ]
    }
}

/// The event a row holds, or why it holds none (a captured row whose JSON breaks the payload
/// rules, a status or source no event has): what a reader may pass over.
pub(super) type Decoded = Result<Event, ProviderError>;

/// Reads the event in `row`'s columns `at..` (laid out as [`EVENT_COLUMNS`]). The outer error is
/// a row without those columns (the table is not the provider's): no row of it can be read.
pub(super) fn decode_event(row: &Row, at: usize, operation: &'static str) -> Result<Decoded, ProviderError> {
    let fail = |err: tokio_postgres::Error| corrupt(operation, format!("unexpected event row: {err}"));
    let id: Uuid = row.try_get(at).map_err(fail)?;
    let source: &str = row.try_get(at + 1).map_err(fail)?;
    let event_type: &str = row.try_get(at + 2).map_err(fail)?;
    let status: &str = row.try_get(at + 3).map_err(fail)?;
    let retry_count: i64 = row.try_get(at + 4).map_err(fail)?;
    let error: String = row.try_get(at + 5).map_err(fail)?;
    let payload: Option<&str> = row.try_get(at + 6).map_err(fail)?;
    let user_id: i64 = row.try_get(at + 7).map_err(fail)?;
    let strings: [&str; 5] = [
        row.try_get(at + 8).map_err(fail)?,
        row.try_get(at + 9).map_err(fail)?,
        row.try_get(at + 10).map_err(fail)?,
        row.try_get(at + 11).map_err(fail)?,
        row.try_get(at + 12).map_err(fail)?,
    ];
    let created_at: i64 = row.try_get(at + 13).map_err(fail)?;
    let processed_at: Option<i64> = row.try_get(at + 14).map_err(fail)?;
    let completed_at: Option<i64> = row.try_get(at + 15).map_err(fail)?;
    let metadata: &str = row.try_get(at + 16).map_err(fail)?;
    let partition_key: Option<&str> = row.try_get(at + 17).map_err(fail)?;
    let [session_id, instance_id, schema, entity, operation_name] = strings;
    let bad =
        |what: &str, err: &dyn std::fmt::Display| corrupt(operation, format!("event {id}: {what}: {err}"));
    let decoded = (|| {
        let mut event = Event {
            id: EventId::from_uuid(id),
            source: source.parse::<EventSource>().map_err(|e| bad("source", &e))?,
            event_type: event_type.into(),
            status: status.parse::<EventStatus>().map_err(|e| bad("status", &e))?,
            retry_count: u32::try_from(retry_count).map_err(|e| bad("retry_count", &e))?,
            error,
            payload: None,
            user_id,
            session_id: session_id.into(),
            instance_id: instance_id.into(),
            schema: schema.into(),
            entity: entity.into(),
            operation: operation_name.into(),
            created_at: from_nanos(created_at),
            processed_at: processed_at.map(from_nanos),
            completed_at: completed_at.map(from_nanos),
            metadata: serde_json::from_str::<Metadata>(metadata).map_err(|e| bad("metadata", &e))?,
            partition_key: partition_key.map(Into::into),
        };
        if let Some(json) = payload {
            event.set_payload_json(json).map_err(|e| bad("payload", &e))?;
        }
        Ok(event)
    })();
    Ok(decoded)
}

/// A PostgreSQL regular expression (`~`) that matches exactly the types `pattern` matches, as
/// [`Pattern::matches`] defines it, so filters run inside the server.
pub(super) fn pattern_regex(pattern: &Pattern) -> String {
    if pattern.is_match_all() {
        return "^".to_owned();
    }
    let mut regex = String::with_capacity(pattern.as_str().len() * 2 + 2);
    regex.push('^');
    for (i, segment) in pattern.segments().iter().enumerate() {
        if i > 0 {
            regex.push_str("\\.");
        }
        match segment {
            // `matches` splits on '.', so one segment is any run without a dot (even an empty one).
            Segment::Star => regex.push_str("[^.]*"),
            // One or more remaining segments: after the separator just written, anything.
            Segment::Tail => {
                regex.push_str(".*");
                return regex;
            }
            Segment::Literal(literal) => {
                for ch in literal.chars() {
                    // In an ARE, a backslash before a non-alphanumeric ASCII character makes it
                    // literal; other characters are never special.
                    if ch.is_ascii() && !ch.is_ascii_alphanumeric() {
                        regex.push('\\');
                    }
                    regex.push(ch);
                }
            }
        }
    }
    regex.push('$');
    regex
}

/// One PostgreSQL regular expression that matches exactly the types one of `patterns` matches, or
/// `None` for no pattern (what matches nothing). One, not one per pattern: PostgreSQL keeps 32
/// compiled expressions per session, and a filter of more, each tried on every row, would compile
/// all of them again for every row it reads.
pub(super) fn patterns_regex(patterns: &[Pattern]) -> Option<String> {
    if patterns.iter().any(Pattern::is_match_all) {
        return Some("^".to_owned());
    }
    let mut alternatives: Vec<String> = patterns.iter().map(pattern_regex).collect();
    alternatives.sort_unstable();
    alternatives.dedup();
    match &alternatives[..] {
        [] => None,
        [one] => Some(one.clone()),
        // Each alternative anchored as `pattern_regex` anchors it, its leading `^` shared.
        many => Some(format!("^(?:{})", many.iter().map(|regex| &regex[1..]).collect::<Vec<_>>().join("|"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_follow_the_reference_matcher() {
        let cases = [
            ("*", "^"),
            ("a.b", "^a\\.b$"),
            ("a.*.c", "^a\\.[^.]*\\.c$"),
            ("a.>", "^a\\..*"),
            (">", "^.*"),
            ("ev+1.x(y)", "^ev\\+1\\.x\\(y\\)$"),
            ("zoë.*", "^zoë\\.[^.]*$"),
        ];
        for (pattern, regex) in cases {
            assert_eq!(pattern_regex(&Pattern::parse(pattern).expect("valid")), regex, "{pattern}");
        }
    }

    #[test]
    fn one_regex_for_many_patterns_matches_what_any_of_them_matches() {
        let parse = |patterns: &[&str]| -> Vec<Pattern> {
            patterns.iter().map(|p| Pattern::parse(p).expect("valid")).collect()
        };
        assert_eq!(patterns_regex(&[]), None);
        assert_eq!(patterns_regex(&parse(&["a.b"])), Some("^a\\.b$".to_owned()));
        assert_eq!(patterns_regex(&parse(&["a.b", "*", "c.>"])), Some("^".to_owned()));
        assert_eq!(
            patterns_regex(&parse(&["a.*.c", "a.>", "a.b", "a.b"])),
            Some("^(?:a\\..*|a\\.[^.]*\\.c$|a\\.b$)".to_owned())
        );
    }

    #[test]
    fn nanosecond_timestamps_round_trip_and_refuse_what_does_not_fit() {
        let at = Timestamp::new(1_700_000_000, 123_456_789).expect("valid");
        let nanos = to_nanos(at, "created_at", "store_batch").expect("fits");
        assert_eq!(nanos, 1_700_000_000_123_456_789);
        assert_eq!(from_nanos(nanos), at);
        let far = Timestamp::new(10_000_000_000, 0).expect("valid"); // 2286
        let err = to_nanos(far, "created_at", "store_batch").expect_err("does not fit");
        assert!(err.to_string().contains("outside the range"), "{err}");
    }
}
