//! The queries: get, list, replay, dead letters, stats.
//!
//! | query | at the server | after fetching |
//! |---|---|---|
//! | `get` | the record by id (a direct get), then the message by sequence | — |
//! | `list` | the type pattern (filter subject of the scan); the latest record per id | every other filter, the order, offset and limit |
//! | `replay` | the start (sequence, or time less the slack), the pattern | `created_at` for a start by time; the records of the page |
//! | dead letters | get and delete by id (last message of the letter's subject) | every `list` filter, the order, offset and limit |
//! | `stats` | message and byte counts of the streams | counts per status: one scan of the records |

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::stream;
use serde::Deserialize;

use super::Shared;
use super::connection::{DirectGet, Empty, RawMessage, api, backend, direct_get, refused};
use super::scan::{Scan, Start};
use super::status::read_slots;
use super::subject::Filter;
use super::wire::{Slot, decode_event, decode_letter, event_id_of};
use crate::error::ProviderError;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::provider::{DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, ReplayFrom, StoredEvent};

/// The stored event `id`, as stored now.
pub(super) async fn get(shared: Arc<Shared>, id: EventId) -> Result<Option<Event>, ProviderError> {
    const OPERATION: &str = "get";
    let conn = &shared.conn;
    let slot = read_slots(&conn.client, &shared.layout, OPERATION, 1, &[id]).await?.remove(0);
    let Slot::Live { record, .. } = slot else { return Ok(None) };
    let message =
        direct_get(&conn.client, OPERATION, &shared.layout.events, &DirectGet::seq(record.seq)).await?;
    // A record whose message is gone (expired before its record) describes nothing stored.
    let Some(message) = message.filter(|m| event_id_of(m) == Some(id)) else { return Ok(None) };
    if let Some(replacement) = record.replacement() {
        return Ok(Some(replacement));
    }
    let event = decode_event(&message.payload)
        .map_err(|error| backend(OPERATION, format!("event {id} at sequence {}: {error}", record.seq)))?;
    Ok(Some(record.current(event)))
}

/// Every live record, by event id; ids whose latest record is a delete marker map to `Deleted`.
async fn all_slots(
    shared: &Shared,
    operation: &'static str,
) -> Result<HashMap<EventId, Slot>, ProviderError> {
    let layout = &shared.layout;
    let mut scan = Scan::open(
        shared,
        operation,
        &layout.statuses,
        &format!("{}>", layout.status_prefix),
        Start::LastPerSubject,
    )
    .await?;
    let messages = scan.rest().await;
    scan.close().await;
    let mut slots = HashMap::new();
    for message in messages? {
        let Some(id) = message.subject.strip_prefix(&layout.status_prefix).and_then(|id| id.parse().ok())
        else {
            continue;
        };
        match Slot::read(Some(message)) {
            Ok(slot) => {
                slots.insert(id, slot);
            }
            Err(error) => tracing::warn!(%id, %error, "nats provider: skipping an unreadable status record"),
        }
    }
    Ok(slots)
}

/// The event `message` stores, as stored now according to `slot`; `None` when the message is
/// deleted, a leftover duplicate, or not an event.
fn current(message: &RawMessage, slot: Option<&Slot>) -> Option<Event> {
    let decoded = || match decode_event(&message.payload) {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::warn!(seq = message.seq, subject = %message.subject, %error, "nats provider: skipping a message that is not an event");
            None
        }
    };
    match slot {
        Some(Slot::Live { record, .. }) if record.seq == message.seq => {
            record.replacement().or_else(|| decoded().map(|event| record.current(event)))
        }
        Some(Slot::Live { .. } | Slot::Deleted { .. }) => None,
        // Published by another client, or by a store that failed before its record.
        Some(Slot::Empty) | None => decoded(),
    }
}

/// The stored events `filter` selects, in `(created_at, id)` order, paged.
pub(super) async fn list(shared: Arc<Shared>, filter: EventFilter) -> Result<Vec<Event>, ProviderError> {
    const OPERATION: &str = "list";
    if filter.limit == Some(0) {
        return Ok(Vec::new());
    }
    let slots = all_slots(&shared, OPERATION).await?;
    let layout = &shared.layout;
    let subject = filter.event_type.as_ref().map_or_else(Filter::all, Filter::of).subject(&layout.prefix);
    let mut scan = Scan::open(&shared, OPERATION, &layout.events, &subject, Start::All).await?;
    let messages = scan.rest().await;
    scan.close().await;
    let mut seen = std::collections::HashSet::new();
    let mut events: Vec<Event> = messages?
        .iter()
        .filter_map(|message| {
            let id = event_id_of(message)?;
            let event = current(message, slots.get(&id))?;
            // One event per id, even if a store after the duplicate window left a second message.
            // Counted once `current` takes the message: of an id with a record, only the message
            // the record names, which need not be the id's first.
            seen.insert(id).then_some(event)
        })
        .filter(|event| filter.matches(event))
        .collect();
    if filter.event_type.as_ref().is_some_and(|pattern| !pattern.is_match_all()) {
        // A second store that changed the type left the message on its first type's subject,
        // which the pattern's subject may not cover.
        events.extend(retyped(&shared, &slots, &seen, &filter).await?);
    }
    events.sort_by_key(|event| (event.created_at, event.id));
    Ok(events.into_iter().skip(filter.offset).take(filter.limit.unwrap_or(usize::MAX)).collect())
}

/// The events `filter` selects among those stored again under another type whose message the
/// scan of the pattern's subject did not hold (`seen`: the ids it found): their records carry them.
async fn retyped(
    shared: &Shared,
    slots: &HashMap<EventId, Slot>,
    seen: &std::collections::HashSet<EventId>,
    filter: &EventFilter,
) -> Result<Vec<Event>, ProviderError> {
    const OPERATION: &str = "list";
    let mut found = Vec::new();
    for (&id, slot) in slots {
        let Slot::Live { record, .. } = slot else { continue };
        let Some(event) = record.replacement().filter(|event| !seen.contains(&id) && filter.matches(event))
        else {
            continue;
        };
        // Only while its message is stored: a record may outlive a message the stream removed.
        let message =
            direct_get(&shared.conn.client, OPERATION, &shared.layout.events, &DirectGet::seq(record.seq))
                .await?;
        if message.is_some_and(|m| event_id_of(&m) == Some(id)) {
            found.push(event);
        }
    }
    Ok(found)
}

/// Up to `limit` stored events from `from`, matching `pattern`, in sequence order.
pub(super) async fn replay(
    shared: Arc<Shared>,
    from: ReplayFrom,
    pattern: Option<Pattern>,
    limit: usize,
) -> Result<Vec<StoredEvent>, ProviderError> {
    const OPERATION: &str = "replay";
    if limit == 0 {
        return Ok(Vec::new());
    }
    let layout = &shared.layout;
    let (start, not_before) = match from {
        ReplayFrom::Beginning => (Start::All, None),
        ReplayFrom::Sequence(seq) => (Start::Sequence(seq), None),
        ReplayFrom::Time(at) => {
            let slack = jiff::SignedDuration::try_from(shared.config.replay_time_slack)
                .unwrap_or(jiff::SignedDuration::MAX);
            (Start::Time(at.saturating_sub(slack).unwrap_or(jiff::Timestamp::MIN)), Some(at))
        }
    };
    let subject = pattern.as_ref().map_or_else(Filter::all, Filter::of).subject(&layout.prefix);
    let mut scan = Scan::open(&shared, OPERATION, &layout.events, &subject, start).await?;
    let page = replay_pages(&shared, &mut scan, not_before, pattern.as_ref(), limit).await;
    scan.close().await;
    page
}

async fn replay_pages(
    shared: &Shared,
    scan: &mut Scan<'_>,
    not_before: Option<jiff::Timestamp>,
    pattern: Option<&Pattern>,
    limit: usize,
) -> Result<Vec<StoredEvent>, ProviderError> {
    const OPERATION: &str = "replay";
    let conn = &shared.conn;
    let mut found = Vec::new();
    while found.len() < limit {
        let messages = scan.next(limit - found.len()).await?;
        if messages.is_empty() {
            break;
        }
        let ids: Vec<Option<EventId>> = messages.iter().map(event_id_of).collect();
        let known: Vec<EventId> = ids.iter().flatten().copied().collect();
        let mut slots = read_slots(&conn.client, &shared.layout, OPERATION, conn.max_in_flight, &known)
            .await?
            .into_iter();
        for (message, id) in messages.iter().zip(ids) {
            let slot = id.and_then(|_| slots.next());
            let Some(event) = current(message, slot.as_ref()) else { continue };
            // The subject is the type the message was first stored with; a second store may have
            // changed it.
            if not_before.is_some_and(|at| event.created_at < at)
                || pattern.is_some_and(|p| !p.matches(&event.event_type))
            {
                continue;
            }
            found.push(StoredEvent { seq: message.seq, event });
        }
    }
    found.truncate(limit);
    Ok(found)
}

/// The dead letter `id`.
pub(super) async fn get_letter(
    shared: Arc<Shared>,
    id: DeadLetterId,
) -> Result<Option<DeadLetter>, ProviderError> {
    const OPERATION: &str = "get_dead_letter";
    let layout = &shared.layout;
    let subject = layout.letter_subject(id);
    let message =
        direct_get(&shared.conn.client, OPERATION, &layout.letters, &DirectGet::last_on(&subject)).await?;
    message.map(|m| decode_letter(&m).map_err(|error| backend(OPERATION, error))).transpose()
}

/// Removes dead letter `id`; `true` when there was one.
pub(super) async fn delete_letter(shared: Arc<Shared>, id: DeadLetterId) -> Result<bool, ProviderError> {
    const OPERATION: &str = "delete_dead_letter";
    #[derive(serde::Serialize)]
    struct Purge {
        filter: String,
    }
    #[derive(Deserialize)]
    struct Purged {
        purged: u64,
    }
    let layout = &shared.layout;
    let purge = Purge { filter: layout.letter_subject(id) };
    let answer: Result<Purged, _> =
        api(&shared.conn.js, OPERATION, format!("STREAM.PURGE.{}", layout.letters), &purge).await?;
    let purged = answer.map_err(|error| refused(OPERATION, &format!("purge dead letter {id}"), &error))?;
    Ok(purged.purged > 0)
}

/// The dead letters `filter` selects, in `(failed_at, id)` order, paged.
pub(super) async fn list_letters(
    shared: Arc<Shared>,
    filter: DeadLetterFilter,
) -> Result<Vec<DeadLetter>, ProviderError> {
    const OPERATION: &str = "list_dead_letters";
    if filter.limit == Some(0) {
        return Ok(Vec::new());
    }
    let layout = &shared.layout;
    let mut scan =
        Scan::open(&shared, OPERATION, &layout.letters, &format!("{}*", layout.letter_prefix), Start::All)
            .await?;
    let messages = scan.rest().await;
    scan.close().await;
    let mut letters: Vec<DeadLetter> = messages?
        .iter()
        .filter_map(|message| match decode_letter(message) {
            Ok(letter) => Some(letter),
            Err(error) => {
                tracing::warn!(%error, "nats provider: skipping an unreadable dead letter");
                None
            }
        })
        .filter(|letter| filter.matches(letter))
        .collect();
    letters.sort_by_key(|letter| (letter.failed_at, letter.id));
    Ok(letters.into_iter().skip(filter.offset).take(filter.limit.unwrap_or(usize::MAX)).collect())
}

/// Server-side figures of one stream.
pub(super) async fn stream_state(
    shared: &Shared,
    operation: &'static str,
    name: &str,
) -> Result<stream::State, ProviderError> {
    let info: Result<stream::Info, _> =
        api(&shared.conn.js, operation, format!("STREAM.INFO.{name}"), &Empty {}).await?;
    info.map(|info| info.state).map_err(|error| refused(operation, &format!("stream {name} info"), &error))
}

/// What the status records say: live records per status, of messages at or after `first_seq`, the
/// event stream's first. The stream's limits (`max_age`, `max_bytes`) remove its oldest messages
/// and leave their records, which a later status change keeps alive longer still.
pub(super) async fn status_counts(shared: &Shared, first_seq: u64) -> Result<[u64; 4], ProviderError> {
    let mut counts = [0; 4];
    for slot in all_slots(shared, "stats").await?.values() {
        if let Slot::Live { record, .. } = slot
            && record.seq >= first_seq
        {
            let i = EventStatus::ALL.iter().position(|s| *s == record.status).unwrap_or(0);
            counts[i] += 1;
        }
    }
    Ok(counts)
}
