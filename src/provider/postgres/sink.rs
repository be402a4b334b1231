//! The writes: a batch of events in one transaction by binary `COPY`, status updates and dead
//! letters in one statement each.
//!
//! ## Storing a batch
//! A batch of up to 32 distinct events is one `INSERT … SELECT … FROM unnest(…) ON CONFLICT (id)
//! DO UPDATE`, pipelined with `BEGIN`, the notification and `COMMIT`: one round trip. A larger
//! batch is one transaction: `SAVEPOINT`, `COPY … FROM STDIN (FORMAT binary)` straight into the events
//! table, one `pg_notify` carrying the batch's highest `seq`, `COMMIT`. The `COPY` data is encoded
//! on the caller's thread. When an id is already stored (a batch retried after a lost commit
//! reply, or an event stored again) the `COPY` fails on the unique id; the transaction rolls back
//! to the savepoint and takes the upsert path instead: the same bytes into a temporary staging
//! table, then `INSERT … SELECT … ORDER BY ord ON CONFLICT (id) DO UPDATE`, which replaces the
//! event's fields and keeps its `seq`, `tx` and `origin`, so a re-store is never delivered again.
//! Ids repeated inside one batch are folded first (the later element's fields at the earlier
//! element's place), as a statement cannot touch a row twice.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use futures_util::SinkExt;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::backend::{Backend, Conn};
use super::codec::{self, CopyBatch, EventColumns, INSERT_COLUMNS};
use super::schema::Names;
use crate::error::ProviderError;
use crate::event::{Event, EventId};
use crate::provider::{DeadLetter, StatusUpdate};

/// Batches of up to this many distinct events are inserted with one statement of arrays; larger
/// ones are copied. Below it a `COPY`'s extra round trips cost more than it saves.
const SMALL_BATCH: usize = 32;

/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// The statements of the sink, built once from the validated names.
pub(super) struct SinkSql {
    events: String,
    insert_rows: String,
    copy: String,
    create_staging: String,
    copy_staging: String,
    upsert: String,
    notify: String,
    update_status: String,
    store_letters: String,
    dead_letters: String,
}

impl SinkSql {
    pub(super) fn new(names: &Names) -> Self {
        let events = names.events();
        let replaced = INSERT_COLUMNS
            .split(", ")
            .filter(|column| !matches!(*column, "id" | "origin"))
            .map(|column| format!("{column} = EXCLUDED.{column}"))
            .collect::<Vec<_>>()
            .join(", ");
        let insert_rows = codec::insert_from_arrays(
            &events,
            "$19",
            &format!("ON CONFLICT (id) DO UPDATE SET {replaced} RETURNING (xmax = 0) AS inserted"),
        );
        Self {
            insert_rows: format!("WITH stored AS ({insert_rows}) SELECT count(*) FILTER (WHERE inserted) FROM stored"),
            copy: format!("COPY {events} ({INSERT_COLUMNS}) FROM STDIN (FORMAT binary)"),
            // Per connection, emptied at every commit; `ord` keeps the batch order.
            create_staging: "CREATE TEMP TABLE IF NOT EXISTS eventbroker_staging (
                     ord bigint GENERATED ALWAYS AS IDENTITY,
                     id uuid, origin text, source text, \"type\" text, status text, retry_count bigint,
                     error text, payload json, user_id bigint, session_id text, instance_id text,
                     \"schema\" text, entity text, operation text, created_at_ns bigint,
                     processed_at_ns bigint, completed_at_ns bigint, metadata json, partition_key text
                 ) ON COMMIT DELETE ROWS"
                .to_owned(),
            copy_staging: format!("COPY pg_temp.eventbroker_staging ({INSERT_COLUMNS}) FROM STDIN (FORMAT binary)"),
            upsert: format!(
                "WITH stored AS (
                     INSERT INTO {events} ({INSERT_COLUMNS})
                     SELECT {INSERT_COLUMNS} FROM pg_temp.eventbroker_staging ORDER BY ord
                     ON CONFLICT (id) DO UPDATE SET {replaced}
                     RETURNING (xmax = 0) AS inserted
                 )
                 SELECT count(*) FILTER (WHERE inserted) FROM stored"
            ),
            notify: codec::NOTIFY.to_owned(),
            update_status: format!(
                "UPDATE {events} AS e SET status = u.status, error = u.error, retry_count = u.retry_count,
                     processed_at_ns = COALESCE(u.processed_at_ns, e.processed_at_ns),
                     completed_at_ns = COALESCE(u.completed_at_ns, e.completed_at_ns)
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
                     AS u(id, status, error, retry_count, processed_at_ns, completed_at_ns)
                 WHERE e.id = u.id"
            ),
            store_letters: format!(
                "INSERT INTO {dead_letters} AS d
                     (id, event_id, event_type, event, subscription_id, pattern, error, attempts, failed_at_ns)
                 SELECT id, event_id, event_type, event::json, subscription_id, pattern, error, attempts, failed_at_ns
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                     $8::bigint[], $9::bigint[])
                     AS l(id, event_id, event_type, event, subscription_id, pattern, error, attempts, failed_at_ns)
                 ON CONFLICT (id) DO UPDATE SET event_id = EXCLUDED.event_id, event_type = EXCLUDED.event_type,
                     event = EXCLUDED.event, subscription_id = EXCLUDED.subscription_id,
                     pattern = EXCLUDED.pattern, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
                     failed_at_ns = EXCLUDED.failed_at_ns",
                dead_letters = names.dead_letters(),
            ),
            dead_letters: names.dead_letters(),
            events,
        }
    }
}

/// What a stored batch did: events stored for the first time, and re-stores.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Stored {
    pub(super) inserted: u64,
    pub(super) replaced: u64,
}

/// Stores `events` as published by `origin`; see the module docs.
pub(super) fn store_batch(
    backend: &Backend,
    sql: &SinkSql,
    events: &[Arc<Event>],
    origin: Option<&str>,
) -> Result<Stored, ProviderError> {
    let unique = fold_repeated_ids(events);
    let batch = Batch { repeated: (events.len() - unique.len()) as u64, unique, origin };
    if batch.unique.len() <= SMALL_BATCH {
        insert_rows(backend, sql, &batch)
    } else {
        copy_rows(backend, sql, &batch)
    }
}

/// A batch to store, its repeated ids folded.
struct Batch<'a> {
    unique: Vec<&'a Event>,
    origin: Option<&'a str>,
    /// Elements folded into an earlier one with the same id.
    repeated: u64,
}

impl Batch<'_> {
    /// What storing it did, given how many of its ids were new.
    fn stored(&self, inserted: u64) -> Stored {
        Stored { inserted, replaced: self.unique.len() as u64 - inserted + self.repeated }
    }
}

/// A small batch: one `INSERT … ON CONFLICT DO UPDATE` of arrays, sent pipelined with `BEGIN`, the
/// notification and `COMMIT`, so the batch costs one round trip and one commit.
fn insert_rows(backend: &Backend, sql: &SinkSql, batch: &Batch<'_>) -> Result<Stored, ProviderError> {
    const OP: &str = "store_batch";
    let columns = EventColumns::of(&batch.unique, OP)?;
    let mut params = columns.params().to_vec();
    params.push(&batch.origin);
    let events_table = backend.names.events();
    let channel = backend.names.channel.as_str();
    let notify_params: [&(dyn ToSql + Sync); 2] = [&channel, &events_table];
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &sql.events, err);
        let conn = backend.conn(OP).await?;
        let insert = conn.prepare_cached(&sql.insert_rows).await.map_err(fail)?;
        let notify = conn.prepare_cached(&sql.notify).await.map_err(fail)?;
        // Should a statement fail, the ones after it fail too and the COMMIT rolls back.
        let (begun, inserted, notified, committed) = tokio::join!(
            conn.batch_execute("BEGIN"),
            conn.query_one(&insert, &params),
            conn.execute(&notify, &notify_params),
            conn.batch_execute("COMMIT"),
        );
        begun.map_err(fail)?;
        let inserted: i64 = inserted.and_then(|row| row.try_get(0)).map_err(fail)?;
        notified.map_err(fail)?;
        committed.map_err(fail)?;
        conn.release();
        Ok(batch.stored(inserted.unsigned_abs()))
    })
}

/// A larger batch: binary `COPY`; see the module docs.
fn copy_rows(backend: &Backend, sql: &SinkSql, batch: &Batch<'_>) -> Result<Stored, ProviderError> {
    const OP: &str = "store_batch";
    let mut copy = CopyBatch::new(batch.unique.len());
    for event in &batch.unique {
        copy.push(event, batch.origin)?;
    }
    let data = copy.finish();
    let events_table = backend.names.events();
    let channel = backend.names.channel.as_str();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &sql.events, err);
        // The transaction is driven by hand rather than through a `Transaction` guard so that
        // statements can share round trips; a connection left inside it is closed by `Conn`'s
        // drop, which rolls it back.
        let conn = backend.conn(OP).await?;
        conn.batch_execute("BEGIN; SAVEPOINT fresh").await.map_err(fail)?;
        let copy = conn.prepare_cached(&sql.copy).await.map_err(fail)?;
        let mut sink = Box::pin(conn.copy_in(&copy).await.map_err(fail)?);
        let copied = match sink.send(data.clone()).await {
            Ok(()) => sink.as_mut().finish().await,
            Err(err) => Err(err),
        };
        let stored = match copied {
            Ok(rows) => batch.stored(rows),
            Err(err) if err.code().is_some_and(|c| c.code() == UNIQUE_VIOLATION) => {
                batch.stored(upsert(&conn, sql, data).await.map_err(fail)?)
            }
            Err(err) => return Err(fail(err)),
        };
        if stored.inserted > 0 {
            let notify = conn.prepare_cached(&sql.notify).await.map_err(fail)?;
            // Pipelined: both go out before either reply is read. Should the notification fail,
            // the server answers the COMMIT of the failed transaction by rolling it back.
            let params: [&(dyn ToSql + Sync); 2] = [&channel, &events_table];
            let (notified, committed) =
                tokio::join!(conn.execute(&notify, &params), conn.batch_execute("COMMIT"));
            notified.map_err(fail)?;
            committed.map_err(fail)?;
        } else {
            conn.batch_execute("COMMIT").await.map_err(fail)?;
        }
        conn.release();
        Ok(stored)
    })
}

/// The path for a batch that stores ids already stored: back to the savepoint, the batch into
/// the staging table, then the upsert. Returns how many ids were new.
async fn upsert(conn: &Conn, sql: &SinkSql, data: bytes::Bytes) -> Result<u64, tokio_postgres::Error> {
    conn.batch_execute("ROLLBACK TO SAVEPOINT fresh").await?;
    conn.batch_execute(&sql.create_staging).await?;
    let copy = conn.prepare_cached(&sql.copy_staging).await?;
    let mut sink = Box::pin(conn.copy_in(&copy).await?);
    sink.send(data).await?;
    sink.as_mut().finish().await?;
    let upsert = conn.prepare_cached(&sql.upsert).await?;
    let inserted: i64 = conn.query_one(&upsert, &[]).await?.try_get(0)?;
    Ok(inserted.unsigned_abs())
}

/// `events` with ids repeated within the batch folded: each id once, at its first place, with the
/// fields of its last occurrence. Borrows without copying when nothing repeats (the usual case).
fn fold_repeated_ids(events: &[Arc<Event>]) -> Vec<&Event> {
    let mut places: HashMap<EventId, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(events.len(), foldhash::fast::RandomState::default());
    let mut unique: Vec<&Event> = Vec::with_capacity(events.len());
    for event in events {
        match places.entry(event.id) {
            Entry::Occupied(place) => unique[*place.get()] = event,
            Entry::Vacant(place) => {
                place.insert(unique.len());
                unique.push(event);
            }
        }
    }
    unique
}

/// Applies `updates` with the semantics of [`StatusUpdate::apply_to`], in one statement. Updates
/// of one id are folded first (the later wins; a timestamp the later one lacks is kept from the
/// earlier), and rows are updated in id order, so concurrent batches lock in one order.
pub(super) fn update_status_batch(
    backend: &Backend,
    sql: &SinkSql,
    updates: &[StatusUpdate],
) -> Result<(), ProviderError> {
    const OP: &str = "update_status_batch";
    let mut folded: HashMap<EventId, StatusUpdate, foldhash::fast::RandomState> = HashMap::default();
    for update in updates {
        match folded.entry(update.id) {
            Entry::Occupied(mut earlier) => {
                let earlier = earlier.get_mut();
                let processed_at = update.processed_at.or(earlier.processed_at);
                let completed_at = update.completed_at.or(earlier.completed_at);
                *earlier = StatusUpdate { processed_at, completed_at, ..update.clone() };
            }
            Entry::Vacant(place) => {
                place.insert(update.clone());
            }
        }
    }
    let mut folded: Vec<StatusUpdate> = folded.into_values().collect();
    folded.sort_unstable_by_key(|u| u.id);
    let nanos = |at: Option<jiff::Timestamp>, field| at.map(|at| codec::to_nanos(at, field, OP)).transpose();
    let mut columns = StatusColumns::with_capacity(folded.len());
    for update in &folded {
        columns.ids.push(*update.id.as_uuid());
        columns.statuses.push(update.status.as_str());
        columns.errors.push(codec::text(&update.error));
        columns.retries.push(i64::from(update.retry_count));
        columns.processed.push(nanos(update.processed_at, "processed_at")?);
        columns.completed.push(nanos(update.completed_at, "completed_at")?);
    }
    let c = &columns;
    let params: [&(dyn ToSql + Sync); 6] =
        [&c.ids, &c.statuses, &c.errors, &c.retries, &c.processed, &c.completed];
    backend.call(OP, backend.execute(OP, &sql.events, &sql.update_status, &params)).map(drop)
}

/// The columns of folded status updates, as arrays to bind.
struct StatusColumns<'a> {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    errors: Vec<Cow<'a, str>>,
    retries: Vec<i64>,
    processed: Vec<Option<i64>>,
    completed: Vec<Option<i64>>,
}

impl StatusColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            retries: Vec::with_capacity(n),
            processed: Vec::with_capacity(n),
            completed: Vec::with_capacity(n),
        }
    }
}

/// Upserts `letters` by id in one statement (a later letter with the same id wins).
pub(super) fn store_dead_letters(
    backend: &Backend,
    sql: &SinkSql,
    letters: &[DeadLetter],
) -> Result<(), ProviderError> {
    const OP: &str = "store_dead_letters";
    let mut last: HashMap<Uuid, &DeadLetter, foldhash::fast::RandomState> = HashMap::default();
    for letter in letters {
        last.insert(*letter.id.as_uuid(), letter);
    }
    let mut ids = Vec::with_capacity(last.len());
    let (mut event_ids, mut types, mut events, mut subscriptions) = (vec![], vec![], vec![], vec![]);
    let (mut patterns, mut errors, mut attempts, mut failed) = (vec![], vec![], vec![], vec![]);
    for (id, letter) in last {
        ids.push(id);
        event_ids.push(*letter.event.id.as_uuid());
        types.push(codec::text(&letter.event.event_type));
        events.push(letter.event.to_json());
        // Stored as the same 64 bits, signed: only compared for equality.
        subscriptions.push(i64::from_ne_bytes(letter.subscription_id.get().to_ne_bytes()));
        patterns.push(codec::text(&letter.pattern));
        errors.push(codec::text(&letter.error));
        attempts.push(i64::from(letter.attempts));
        failed.push(codec::to_nanos(letter.failed_at, "failed_at", OP)?);
    }
    let params: [&(dyn ToSql + Sync); 9] =
        [&ids, &event_ids, &types, &events, &subscriptions, &patterns, &errors, &attempts, &failed];
    backend.call(OP, backend.execute(OP, &sql.dead_letters, &sql.store_letters, &params)).map(drop)
}
