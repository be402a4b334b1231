//! The writes: event batches, status updates and dead letters.
//!
//! A batch of events is two pipelined rounds: every event message is published with the event id
//! as `Nats-Msg-Id` and the acknowledgements awaited together, then every status record is created
//! with a compare-and-set on "no record yet" and awaited together. What does not fit that path —
//! a second store of an id, a record that exists already, an id deleted before — is settled per
//! event by reading its record first; see the module docs for the cases.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use jiff::Timestamp;

use super::Shared;
use super::connection::{DirectGet, Publish, Published, api, direct_get, publish_all, unavailable};
use super::status::read_slots;
use super::wire::{Record, Slot, delete_marker, event_id_of, event_message, letter_message, record_message};
use crate::error::ProviderError;
use crate::event::{Event, EventId};
use crate::provider::{DeadLetter, StatusUpdate};

/// How often a compare-and-set that keeps losing to other writers is tried again.
const CAS_ROUNDS: usize = 5;

/// One distinct event of a batch, ready to publish.
pub(super) struct Outgoing {
    event: Arc<Event>,
    message: Publish,
    /// Its id was made recently enough that any earlier store of it falls within the server's
    /// duplicate window, so the server's de-duplication alone decides whether it is new.
    young: bool,
}

impl Outgoing {
    /// The event's id.
    pub(super) fn id(&self) -> EventId {
        self.event.id
    }

    /// What the server counts of its message against `max_payload`.
    pub(super) fn size(&self) -> usize {
        self.message.size()
    }
}

/// Turns `events` into messages: one per distinct id, at the place of its first occurrence, with
/// the content of its last (a later element for the same id wins).
pub(super) fn prepare(shared: &Shared, events: &[Arc<Event>], origin: Option<&str>) -> Vec<Outgoing> {
    let mut first_at: std::collections::HashMap<EventId, usize, foldhash::fast::RandomState> =
        std::collections::HashMap::default();
    let mut distinct: Vec<&Arc<Event>> = Vec::with_capacity(events.len());
    for event in events {
        if let Some(&at) = first_at.get(&event.id) {
            distinct[at] = event;
        } else {
            first_at.insert(event.id, distinct.len());
            distinct.push(event);
        }
    }
    let now = Timestamp::now();
    distinct
        .into_iter()
        .map(|event| Outgoing {
            message: event_message(&shared.layout, event, origin, &event.id.to_string()),
            young: is_young(event.id, now, shared.config.duplicate_window),
            event: Arc::clone(event),
        })
        .collect()
}

/// Margin for clocks that disagree between the host that made an id and this one.
const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Whether `id` is a UUID v7 made less than `window - 30 s` ago (and not in the future by more
/// than 30 s): then it cannot have been stored before the server's duplicate window began.
fn is_young(id: EventId, now: Timestamp, window: Duration) -> bool {
    let Some((secs, nanos)) = id.as_uuid().get_timestamp().map(|ts| ts.to_unix()) else { return false };
    let Ok(made) = Timestamp::new(i64::try_from(secs).unwrap_or(i64::MAX), i32::try_from(nanos).unwrap_or(0))
    else {
        return false;
    };
    let Ok(age) = Duration::try_from(now.duration_since(made).abs()) else { return false };
    let future = made > now;
    if future { age <= CLOCK_SKEW } else { age.saturating_add(CLOCK_SKEW) < window }
}

/// What the fast path decided for one event.
enum Step {
    /// Publish it; on a fresh store, create its record over `expected`.
    Publish { expected: u64 },
    /// Its record is live: replace the event in place, keeping its message and sequence.
    Replace { revision: u64, seq: u64 },
}

/// Stores `batch`: see the module docs.
pub(super) async fn store(shared: Arc<Shared>, batch: Vec<Outgoing>) -> Result<(), ProviderError> {
    const OPERATION: &str = "store_batch";
    let conn = &shared.conn;
    let layout = &shared.layout;

    // Ids that may have been stored before the duplicate window: look at their records first.
    let old: Vec<usize> = (0..batch.len()).filter(|&i| !batch[i].young).collect();
    let old_ids: Vec<EventId> = old.iter().map(|&i| batch[i].event.id).collect();
    let old_slots = read_slots(&conn.client, layout, OPERATION, conn.max_in_flight, &old_ids).await?;
    let mut steps: Vec<Step> = batch.iter().map(|_| Step::Publish { expected: 0 }).collect();
    // A live record whose message the stream's limits removed describes nothing stored.
    let mut stored = Vec::with_capacity(old.len());
    let mut checks = FuturesOrdered::new();
    for (&i, slot) in old.iter().zip(&old_slots) {
        if checks.len() >= conn.max_in_flight {
            if let Some(check) = checks.next().await {
                stored.push(check?);
            }
        }
        let live = match slot {
            Slot::Live { record, .. } => Some((record.seq, batch[i].id())),
            Slot::Deleted { .. } | Slot::Empty => None,
        };
        let shared = &*shared;
        checks.push_back(async move {
            match live {
                Some((seq, id)) => message_stored(shared, seq, id).await,
                None => Ok(false),
            }
        });
    }
    while let Some(check) = checks.next().await {
        stored.push(check?);
    }
    for ((&i, slot), stored) in old.iter().zip(old_slots).zip(stored) {
        steps[i] = match slot {
            Slot::Live { revision, record } if stored => Step::Replace { revision, seq: record.seq },
            other => Step::Publish { expected: other.revision() },
        };
    }

    let publishing: Vec<usize> =
        (0..batch.len()).filter(|&i| matches!(steps[i], Step::Publish { .. })).collect();
    let messages = publishing.iter().map(|&i| batch[i].message.clone()).collect();
    let acks = publish_all(&conn.js, OPERATION, &layout.events, conn.max_in_flight, messages).await?;
    let mut published: Vec<Option<Published>> = vec![None; batch.len()];
    for (&i, ack) in publishing.iter().zip(acks) {
        published[i] = Some(ack);
    }

    // Records of fresh stores and of replacements, all at once; the rest is settled one by one.
    let mut writes = Vec::new();
    let mut settle = Vec::new();
    for (i, item) in batch.iter().enumerate() {
        let record = match (&steps[i], published[i]) {
            (Step::Publish { expected }, Some(Published::Stored { seq, duplicate: false })) => {
                (Record::new(seq, &item.event), *expected, true)
            }
            (Step::Replace { revision, seq }, None) => {
                (Record::replacing(*seq, &item.event), *revision, false)
            }
            _ => {
                settle.push(i);
                continue;
            }
        };
        writes.push((i, record));
    }
    let messages = writes
        .iter()
        .map(|(i, (record, expected, _))| record_message(layout, batch[*i].event.id, record, *expected))
        .collect();
    let outcomes = publish_all(&conn.js, OPERATION, &layout.statuses, conn.max_in_flight, messages).await?;
    for ((i, (record, _, fresh)), outcome) in writes.into_iter().zip(outcomes) {
        match outcome {
            Published::Stored { seq: revision, .. } => {
                shared.writes.count_store(fresh);
                shared.cache.lock().put(batch[i].event.id, revision, record);
            }
            Published::Conflict => settle.push(i),
        }
    }

    let mut settling: FuturesUnordered<_> = settle
        .into_iter()
        .map(|i| {
            let first = match published[i] {
                Some(Published::Stored { seq, duplicate }) => Some((seq, duplicate)),
                _ => None,
            };
            settle_one(&shared, &batch[i], first)
        })
        .collect();
    while let Some(settled) = settling.next().await {
        settled?;
    }
    Ok(())
}

/// Settles one event the fast path could not: reads its record and acts on what is there.
/// `published` is the sequence its message got in this batch, and whether that was a duplicate.
async fn settle_one(
    shared: &Shared,
    item: &Outgoing,
    mut published: Option<(u64, bool)>,
) -> Result<(), ProviderError> {
    const OPERATION: &str = "store_batch";
    let conn = &shared.conn;
    let layout = &shared.layout;
    let id = item.event.id;
    for _ in 0..CAS_ROUNDS {
        let slot = read_slots(&conn.client, layout, OPERATION, 1, &[id]).await?.remove(0);
        let stored = match &slot {
            Slot::Live { record, .. } => message_stored(shared, record.seq, id).await?,
            Slot::Deleted { .. } | Slot::Empty => false,
        };
        let (record, fresh) = match &slot {
            Slot::Live { record, .. } if stored => {
                if let Some((seq, _)) = published.take().filter(|&(seq, _)| seq != record.seq) {
                    // Stored again after the duplicate window: the server took it as new. The
                    // record names the first message; the second must go.
                    delete_message(shared, OPERATION, seq).await?;
                }
                (Record::replacing(record.seq, &item.event), false)
            }
            Slot::Deleted { revision } | Slot::Live { revision, .. } => {
                // Stored, deleted (or removed by the stream's limits, its record left behind),
                // stored again: the duplicate's sequence names the removed message, so it is
                // published anew under a message id of its own.
                let seq = if let Some((seq, false)) = published {
                    seq
                } else {
                    let mut message = item.message.clone();
                    message.headers.insert(super::wire::MSG_ID, format!("{id}:{revision}"));
                    let acks = publish_all(&conn.js, OPERATION, &layout.events, 1, vec![message]).await?;
                    let Some(Published::Stored { seq, .. }) = acks.first().copied() else {
                        return Err(unavailable(OPERATION, format!("event {id} was not stored")));
                    };
                    published = Some((seq, false));
                    seq
                };
                (Record::new(seq, &item.event), true)
            }
            // A duplicate without a record: an earlier attempt stored the message and failed
            // before its record. The message may predate changes to the event, so the record
            // carries the event as stored now.
            Slot::Empty => match published {
                Some((seq, duplicate)) => (
                    if duplicate {
                        Record::replacing(seq, &item.event)
                    } else {
                        Record::new(seq, &item.event)
                    },
                    true,
                ),
                None => {
                    return Err(unavailable(OPERATION, format!("event {id} lost its record while stored")));
                }
            },
        };
        let message = record_message(layout, id, &record, slot.revision());
        let outcome = publish_all(&conn.js, OPERATION, &layout.statuses, 1, vec![message]).await?;
        if let Some(Published::Stored { seq: revision, .. }) = outcome.first().copied() {
            shared.writes.count_store(fresh);
            shared.cache.lock().put(id, revision, record);
            return Ok(());
        }
    }
    Err(unavailable(OPERATION, format!("the record of event {id} kept changing under other writers")))
}

/// Whether the event message at `seq` is still there and stores `id`: the stream's limits
/// (`max_age`, `max_bytes`) remove messages and leave their records.
async fn message_stored(shared: &Shared, seq: u64, id: EventId) -> Result<bool, ProviderError> {
    let message =
        direct_get(&shared.conn.client, "store_batch", &shared.layout.events, &DirectGet::seq(seq)).await?;
    Ok(message.is_some_and(|m| event_id_of(&m) == Some(id)))
}

/// Removes the event message at `seq`; a message already gone is fine.
pub(super) async fn delete_message(
    shared: &Shared,
    operation: &'static str,
    seq: u64,
) -> Result<(), ProviderError> {
    #[derive(serde::Serialize)]
    struct Delete {
        seq: u64,
        no_erase: bool,
    }
    #[derive(serde::Deserialize)]
    struct Deleted {}
    let stream = &shared.layout.events;
    let answer: Result<Deleted, _> = api(
        &shared.conn.js,
        operation,
        format!("STREAM.MSG.DELETE.{stream}"),
        &Delete { seq, no_erase: true },
    )
    .await?;
    match answer {
        Ok(Deleted {}) => Ok(()),
        Err(error) if error.error_code() == async_nats::jetstream::ErrorCode::SEQUENCE_NOT_FOUND => Ok(()),
        Err(error) if error.code() == 404 => Ok(()),
        Err(error) => Err(super::connection::refused(
            operation,
            &format!("delete message {seq} of stream {stream}"),
            &error,
        )),
    }
}

/// Updates grouped by event id, in the order the ids first appear; each group in slice order.
pub(super) fn group_updates(updates: &[StatusUpdate]) -> Vec<(EventId, Vec<StatusUpdate>)> {
    let mut at: std::collections::HashMap<EventId, usize, foldhash::fast::RandomState> =
        std::collections::HashMap::default();
    let mut groups: Vec<(EventId, Vec<StatusUpdate>)> = Vec::new();
    for update in updates {
        let i = *at.entry(update.id).or_insert_with(|| {
            groups.push((update.id, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(update.clone());
    }
    groups
}

/// Applies each group's updates to its record with one compare-and-set, reading the record first
/// unless the cache knows it; ids with no record are skipped.
pub(super) async fn update(
    shared: Arc<Shared>,
    groups: Vec<(EventId, Vec<StatusUpdate>)>,
) -> Result<(), ProviderError> {
    const OPERATION: &str = "update_status_batch";
    let conn = &shared.conn;
    let layout = &shared.layout;
    let mut known: Vec<Option<(u64, Record)>> = {
        let cache = shared.cache.lock();
        groups.iter().map(|(id, _)| cache.get(*id)).collect()
    };
    let mut pending: Vec<usize> = (0..groups.len()).collect();
    for _ in 0..CAS_ROUNDS {
        let unknown: Vec<usize> = pending.iter().copied().filter(|&i| known[i].is_none()).collect();
        let ids: Vec<EventId> = unknown.iter().map(|&i| groups[i].0).collect();
        let slots = read_slots(&conn.client, layout, OPERATION, conn.max_in_flight, &ids).await?;
        for (&i, slot) in unknown.iter().zip(slots) {
            if let Slot::Live { revision, record } = slot {
                known[i] = Some((revision, record));
            }
        }
        // Not stored, deleted or expired: skipped, as the contract says.
        pending.retain(|&i| known[i].is_some());

        let mut writes = Vec::with_capacity(pending.len());
        for &i in &pending {
            let Some((revision, mut record)) = known[i].clone() else { continue };
            for update in &groups[i].1 {
                record.update(update);
            }
            writes.push((i, revision, record));
        }
        let messages = writes
            .iter()
            .map(|(i, revision, record)| record_message(layout, groups[*i].0, record, *revision))
            .collect();
        let outcomes =
            publish_all(&conn.js, OPERATION, &layout.statuses, conn.max_in_flight, messages).await?;
        let mut cache = shared.cache.lock();
        let mut lost = Vec::new();
        for ((i, _, record), outcome) in writes.into_iter().zip(outcomes) {
            let id = groups[i].0;
            match outcome {
                Published::Stored { seq: revision, .. } => cache.put(id, revision, record),
                Published::Conflict => {
                    cache.forget(id);
                    known[i] = None;
                    lost.push(i);
                }
            }
        }
        drop(cache);
        pending = lost;
        if pending.is_empty() {
            return Ok(());
        }
    }
    Err(unavailable(OPERATION, format!("{} records kept changing under other writers", pending.len())))
}

/// Marks event `id` deleted: removes its message and writes a delete marker over its record.
/// `false` when it has no live record.
pub(super) async fn delete(shared: Arc<Shared>, id: EventId) -> Result<bool, ProviderError> {
    const OPERATION: &str = "delete";
    let conn = &shared.conn;
    let slot = read_slots(&conn.client, &shared.layout, OPERATION, 1, &[id]).await?.remove(0);
    shared.cache.lock().forget(id);
    let Slot::Live { record, .. } = slot else { return Ok(false) };
    delete_message(&shared, OPERATION, record.seq).await?;
    publish_all(&conn.js, OPERATION, &shared.layout.statuses, 1, vec![delete_marker(&shared.layout, id)])
        .await?;
    Ok(true)
}

/// Stores dead letters; a letter id stored again replaces the earlier letter (one message per
/// subject).
pub(super) async fn store_letters(
    shared: Arc<Shared>,
    letters: Vec<DeadLetter>,
) -> Result<(), ProviderError> {
    let conn = &shared.conn;
    let messages = letters.iter().map(|letter| letter_message(&shared.layout, letter)).collect();
    publish_all(&conn.js, "store_dead_letters", &shared.layout.letters, conn.max_in_flight, messages).await?;
    Ok(())
}

/// Counts of what this handle wrote.
#[derive(Debug, Default)]
pub(super) struct WriteCounters {
    /// Events stored for the first time.
    pub(super) published: std::sync::atomic::AtomicU64,
    /// Events stored again, replacing the stored one.
    pub(super) replaced: std::sync::atomic::AtomicU64,
}

impl WriteCounters {
    fn count_store(&self, fresh: bool) {
        // Relaxed: independent counters, read only for stats.
        if fresh {
            self.published.fetch_add(1, Ordering::Relaxed);
        } else {
            self.replaced.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventStatus;

    #[test]
    fn young_ids_are_recent_v7_ids() {
        let window = Duration::from_secs(120);
        let now = Timestamp::now();
        assert!(is_young(EventId::new(), now, window));
        let later = now.checked_add(jiff::SignedDuration::from_secs(95)).expect("in range");
        assert!(!is_young(EventId::new(), later, window), "95 s + 30 s of skew is past 120 s");
        let earlier = now.checked_sub(jiff::SignedDuration::from_secs(60)).expect("in range");
        assert!(!is_young(EventId::new(), earlier, window), "made a minute in the future");
        let v4 = EventId::from_uuid(uuid::Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef));
        assert!(!is_young(v4, now, window), "a v4 id tells no time");
    }

    #[test]
    fn updates_group_by_id_in_first_seen_order() {
        let (a, b) = (EventId::new(), EventId::new());
        let updates = [
            StatusUpdate::new(b, EventStatus::Processing),
            StatusUpdate::new(a, EventStatus::Processing),
            StatusUpdate::new(b, EventStatus::Completed),
        ];
        let groups = group_updates(&updates);
        assert_eq!(groups.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![b, a]);
        assert_eq!(
            groups[0].1.iter().map(|u| u.status).collect::<Vec<_>>(),
            vec![EventStatus::Processing, EventStatus::Completed]
        );
    }
}
