//! The queries: get, list, delete, replay, dead letters and stats, each one statement with every
//! value bound.
//!
//! `list` builds its `WHERE` from the filter's fields that are set (a type pattern becomes an
//! anchored regular expression, so a literal prefix uses the `type` index), then orders by
//! `(created_at_ns, id)` and applies `OFFSET` and `LIMIT`. `replay` reads in `seq` order, only as
//! far as every `seq` is settled (below), in windows (below): one call looks at most at
//! [`LOOK_MAX`] (100 000) rows, passes over at most [`PASS_OVER_MAX`] (5 000) rows that hold no
//! valid event, and starts no window once three quarters of the operation timeout are gone: the
//! page then says where the next one starts, past what it looked at, rather than reading on until
//! it is full and timing out at the same place on every call. A time bound outside the years a
//! row holds (1677 to 2262) keeps every row or none.
//!
//! ## Why a replay reads in windows
//! `WHERE "type" ~ '^orders\.' ORDER BY seq LIMIT 100` leaves the planner two plans, each
//! unbounded: the `type` index (the pattern's literal prefix), then a sort of every matching row
//! past the position, on every page (paging through a type of a million rows 100 at a time reads
//! 5 billion rows); or the primary key in `seq` order, filtering, through every row of other
//! types up to the next match. On 430 000 rows: 37 ms for a page of a type of 400 rows sorted,
//! 270 ms for one through 400 000 rows of other types; which one it takes depends on statistics
//! that lag the table.
//!
//! So a call reads the table in windows of consecutive rows through the primary key: first the
//! last `seq` of the next window of `n` rows (the key's entries only), then the rows of that
//! `seq` range whose type matches, with the pattern (and a replay's time) written as expressions
//! no index serves, so the plan can only be the key's range, never more than `n` rows. `n` starts
//! at what the page lacks (a pattern matching every row reads no row past the page) and doubles
//! up to [`WINDOW_MAX`] (10 000 rows, 3 to 15 ms to read), so a sparse pattern moves on by
//! 100 000 rows per call in 16 windows or so, finding a page of 100 in a type of one row in
//! 1 000, and one matching no row still makes the same progress, returning an empty page that
//! says where to go on. A row is read twice at most (its key entry checks the heap until vacuum
//! marks its block visible to all): on 300 000 rows, vacuumed, a call passing over 150 000 of
//! other types read 102 700, where the single query read 150 100 (and would read a million on a
//! table of a million).
//!
//! A replay from a time starts its windows at the first `seq` among the rows created since, read
//! from the time index, when there are at most [`TIME_START_MAX`] (4 096) of them: a replay of
//! the last hour of a long table reads the last hour, and one from a time after every row ends at
//! once. With more, the windows start at the table's first row, as `seq` order and creation times
//! need not agree (a publisher's clock, an event stored again later).
//!
//! ## Why a replay page waits for writers
//! `seq` is drawn when a row is inserted, but the row appears when its transaction commits, and
//! transactions commit in any order: a page read while a transaction holding `seq` 10 is open may
//! hold 11, and a replay resumed from 12 would never see 10. The inbound source's horizon (rows
//! whose `tx` is below the oldest running transaction) does not settle `seq` order: a batch, an
//! outbox or a captured transaction that took its transaction id early and draws its `seq`s late
//! commits rows with an old `tx` above the `seq` of a younger transaction still open.
//!
//! What does settle it: every transaction that draws a `seq` holds a `RowExclusiveLock` on the
//! events table from before its first insert until it ends, and the sequence hands out increasing
//! numbers (`bigserial` caches 1). So a replay call first reads, in one statement, the highest
//! committed `seq` and the transactions holding that lock (from `pg_locks`, read after the
//! statement's snapshot was taken). Once those have ended, every row at or below that `seq` has
//! either committed or never will, and the pages of the call read no further than it. Writes take
//! milliseconds, so the wait is short; it is bounded by [`WRITERS_WAIT`] (1 s, or half the
//! operation timeout when that is shorter). A writer still open then (idle in transaction, a
//! prepared transaction) holds the replay back: the call fails with `Unavailable`, naming the
//! writers' process ids, as history is not yet settled past its position; a replay from the same
//! position once they end reads what they committed (`Broker::replay` stops with
//! `ReplayInterrupted` and where to resume). `idle_in_transaction_session_timeout` bounds such a wait on
//! the server's side, as it bounds the inbound source's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::NAME;
use super::backend::{Backend, Conn};
use super::codec::{self, EVENT_COLUMNS, pattern_regex};
use super::schema::Names;
use crate::error::ProviderError;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
use crate::provider::{
    DeadLetter, DeadLetterFilter, DeadLetterId, EventFilter, ReplayFrom, ReplayPage, StoredEvent,
};
use crate::sync::{AtomicU64, Ordering};

/// The statements of the store, built once from the validated names.
pub(super) struct StoreSql {
    events: String,
    dead_letters: String,
    get: String,
    delete: String,
    get_letter: String,
    delete_letter: String,
    table_blocks: String,
    count_by_status: String,
    sample_by_status: String,
    count_letters: String,
    sample_letters: String,
    settled: String,
    writers_left: String,
    window_end: String,
    time_start: String,
}

/// Most a replay call waits for the transactions writing the events table when it began to end;
/// half the operation timeout when that is shorter, so the pages are read within it.
const WRITERS_WAIT: Duration = Duration::from_secs(1);

/// First pause between two looks at whether those writers ended; doubled after each look.
const WRITERS_FIRST_POLL: Duration = Duration::from_millis(2);

/// Longest pause between two looks.
const WRITERS_MAX_POLL: Duration = Duration::from_millis(50);

/// Most rows one replay call passes over (rows holding no valid event) before it returns the page
/// it has, with where the next one starts: a run of them of any length takes calls of bounded
/// time, never one that times out at the same place again and again.
const PASS_OVER_MAX: u64 = 5_000;

/// Most rows one window of a replay covers: the primary key reads 10 000 in 3 to 15 ms, whatever
/// the pattern (measured on 430 000 rows of 150 bytes, in shared buffers), so the window started
/// last ends within the quarter of the operation timeout left, and a sparse pattern costs two
/// round trips per 10 000 rows.
const WINDOW_MAX: usize = 10_000;

/// Rows the windows of one replay call cover at most (the last window may end up to
/// [`WINDOW_MAX`] past), before it returns the page it has: about 0.1 to 0.3 s, so a pattern that
/// matches one row in 1 000 still fills a page of 100 per call, and one that matches none moves
/// on by 100 000 rows per call.
const LOOK_MAX: u64 = 100_000;

/// Most rows created since a replay's time that its first call reads from the time index to find
/// the first `seq` among them: when there are fewer, the windows start there, exactly, instead of
/// at the table's first row (a replay of the last hour of a long table reads the last hour); when
/// there are more, they start at the first row, as `seq` and creation times need not agree.
const TIME_START_MAX: i64 = 4_096;

/// Rows read per round trip while passing over: 500 of a few hundred bytes each are a fraction of
/// a millisecond to decode.
const PASS_OVER_CHUNK: usize = 500;

/// The granted `RowExclusiveLock`s other sessions (prepared transactions included) hold on the
/// events table (`$1`): the transactions that may hold a `seq` not yet committed.
const WRITER_LOCKS: &str = "FROM pg_locks
     WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND relation = $1::text::regclass
       AND pid IS DISTINCT FROM pg_backend_pid()";

impl StoreSql {
    pub(super) fn new(names: &Names) -> Self {
        let events = names.events();
        let dead_letters = names.dead_letters();
        Self {
            get: format!("SELECT {EVENT_COLUMNS} FROM {events} WHERE id = $1"),
            delete: format!("DELETE FROM {events} WHERE id = $1"),
            get_letter: format!("SELECT {LETTER_COLUMNS} FROM {dead_letters} WHERE id = $1"),
            delete_letter: format!("DELETE FROM {dead_letters} WHERE id = $1"),
            // The size of the tables' files: no row is read.
            table_blocks:
                "SELECT pg_relation_size($1::text::regclass) / b, pg_relation_size($2::text::regclass) / b
                           FROM (SELECT current_setting('block_size')::bigint AS b) AS size"
                    .to_owned(),
            count_by_status: format!("SELECT status, count(*) FROM {events} GROUP BY status"),
            sample_by_status: format!(
                "SELECT status, count(*) FROM {events} TABLESAMPLE SYSTEM ($1) GROUP BY status"
            ),
            count_letters: format!("SELECT count(*) FROM {dead_letters}"),
            sample_letters: format!("SELECT count(*) FROM {dead_letters} TABLESAMPLE SYSTEM ($1)"),
            // The snapshot is taken before `pg_locks` is read: a writer in flight then that drew a
            // `seq` below the highest one seen is either listed or has ended by the read.
            settled: format!(
                "SELECT (SELECT max(seq) FROM {events}),
                        ARRAY(SELECT DISTINCT virtualtransaction {WRITER_LOCKS})"
            ),
            writers_left: format!("SELECT pid {WRITER_LOCKS} AND virtualtransaction = ANY($2)"),
            // The last `seq` of the next window of at most `$3` rows from `$1` up to `$2`, and how
            // many it holds: the primary key's entries alone, so it reads the window's rows, never
            // more, and a gap in `seq` (rows deleted by retention) costs nothing.
            window_end: format!(
                "SELECT max(seq), count(*)
                   FROM (SELECT seq FROM {events} WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3)
                        AS next_window"
            ),
            // The first `seq` among the first `$3` rows created at or after `$1` up to the settled
            // `$2`, and how many those are: the time index's entries, bounded by the limit.
            time_start: format!(
                "SELECT min(seq), count(*)
                   FROM (SELECT seq FROM {events} WHERE created_at_ns >= $1 AND seq <= $2
                         ORDER BY created_at_ns, id LIMIT $3) AS since"
            ),
            events,
            dead_letters,
        }
    }
}

/// A query with a `WHERE` built from optional conditions, each value bound as `$n`.
struct Query<'a> {
    conditions: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send + 'a>>,
}

impl<'a> Query<'a> {
    fn new() -> Self {
        Self { conditions: Vec::new(), params: Vec::new() }
    }

    /// Adds `condition`, in which `$?` stands for `value`'s placeholder.
    fn and(&mut self, condition: &str, value: impl ToSql + Sync + Send + 'a) {
        self.params.push(Box::new(value));
        self.conditions.push(condition.replace("$?", &format!("${}", self.params.len())));
    }

    /// Adds `column >= at`. A time outside the range a row holds (1677 to 2262) is before every
    /// row or after every row, so it keeps all of them or none, as it does in memory.
    fn at_or_after(&mut self, column: &str, at: Timestamp) {
        match codec::nanos_bound(at) {
            Ok(nanos) => self.and(&format!("{column} >= $?"), nanos),
            Err(std::cmp::Ordering::Less) => {}
            Err(_) => self.conditions.push("false".to_owned()),
        }
    }

    /// Adds `column < at`, a time outside the range a row holds as for [`Query::at_or_after`].
    fn before(&mut self, column: &str, at: Timestamp) {
        match codec::nanos_bound(at) {
            Ok(nanos) => self.and(&format!("{column} < $?"), nanos),
            Err(std::cmp::Ordering::Greater) => {}
            Err(_) => self.conditions.push("false".to_owned()),
        }
    }

    /// A placeholder for `value`, for `LIMIT` and `OFFSET`.
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'a) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    /// `OFFSET $n LIMIT $m` for a page of `offset` results on and at most `limit` of them.
    fn page(&mut self, offset: usize, limit: Option<usize>) -> String {
        let offset = self.bind(bigint(offset));
        match limit {
            Some(limit) => format!("OFFSET {offset} LIMIT {}", self.bind(bigint(limit))),
            None => format!("OFFSET {offset}"),
        }
    }

    fn where_clause(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
    }
}

/// `LIMIT`/`OFFSET` values: PostgreSQL takes `bigint`, so anything larger means "all".
fn bigint(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn get(backend: &Backend, sql: &StoreSql, id: EventId) -> Result<Option<Event>, ProviderError> {
    const OP: &str = "get";
    let id = *id.as_uuid();
    let rows = backend.call(OP, backend.query(OP, &sql.events, &sql.get, &[&id]))?;
    rows.first().map(|row| codec::decode_event(row, 0, OP).and_then(|decoded| decoded)).transpose()
}

/// `event`, or `None` for a row that holds no valid event, logged and counted in `passed_over`:
/// one such row (a captured row whose JSON breaks the payload rules) must not fail every `list`
/// and `replay` that covers it.
fn readable(decoded: codec::Decoded, passed_over: &AtomicU64, operation: &'static str) -> Option<Event> {
    match decoded {
        Ok(event) => Some(event),
        Err(error) => {
            // Relaxed: a counter, read for stats only.
            passed_over.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(operation, %error, "{NAME} provider: passing over a row that holds no valid event");
            None
        }
    }
}

pub(super) fn list(
    backend: &Backend,
    sql: &StoreSql,
    filter: &EventFilter,
    passed_over: &AtomicU64,
) -> Result<Vec<Event>, ProviderError> {
    const OP: &str = "list";
    if filter.limit == Some(0) {
        return backend.call(OP, async { Ok(Vec::new()) });
    }
    let mut query = Query::new();
    if let Some(source) = filter.source {
        query.and("source = $?", source.as_str());
    }
    if let Some(status) = filter.status {
        query.and("status = $?", status.as_str());
    }
    if let Some(user_id) = filter.user_id {
        query.and("user_id = $?", user_id);
    }
    for (column, value) in [
        ("\"schema\"", &filter.schema),
        ("entity", &filter.entity),
        ("operation", &filter.operation),
        ("instance_id", &filter.instance_id),
    ] {
        if let Some(value) = value {
            query.and(&format!("{column} = $?"), codec::text(value));
        }
    }
    if let Some(pattern) = &filter.event_type {
        query.and("\"type\" ~ $?", pattern_regex(pattern));
    }
    if let Some(start) = filter.start_time {
        query.at_or_after("created_at_ns", start);
    }
    if let Some(end) = filter.end_time {
        query.before("created_at_ns", end);
    }
    let page = query.page(filter.offset, filter.limit);
    let statement = format!(
        "SELECT {EVENT_COLUMNS} FROM {} {} ORDER BY created_at_ns, id {page}",
        sql.events,
        query.where_clause()
    );
    let rows = backend.call(OP, backend.query(OP, &sql.events, &statement, &query.params()))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        events.extend(readable(codec::decode_event(row, 0, OP)?, passed_over, OP));
    }
    Ok(events)
}

pub(super) fn delete(backend: &Backend, sql: &StoreSql, id: EventId) -> Result<bool, ProviderError> {
    const OP: &str = "delete";
    let id = *id.as_uuid();
    execute(backend, OP, &sql.events, &sql.delete, id).map(|n| n > 0)
}

/// Runs a statement that takes one id, returning the rows it affected.
fn execute(
    backend: &Backend,
    operation: &'static str,
    table: &str,
    statement: &str,
    id: Uuid,
) -> Result<u64, ProviderError> {
    backend.call(operation, backend.execute(operation, table, statement, &[&id]))
}

pub(super) fn replay(
    backend: &Backend,
    sql: &StoreSql,
    from: ReplayFrom,
    pattern: Option<&Pattern>,
    limit: usize,
    passed_over: &AtomicU64,
) -> Result<ReplayPage, ProviderError> {
    const OP: &str = "replay";
    if limit == 0 {
        return backend.call(OP, async { Ok(ReplayPage { events: Vec::new(), next: None, end: false }) });
    }
    let fail = |err| Backend::error(OP, &sql.events, err);
    // Reads stop starting once three quarters of the timeout are gone (the wait for writers takes
    // half at most), so the last window, of at most `WINDOW_MAX` rows, ends within it.
    let read_until = crate::deadline::from_now(backend.config.operation_timeout / 4 * 3);
    // The first `seq` a window may hold; a time is filtered inside the windows, from the first row.
    let first = match from {
        ReplayFrom::Sequence(seq) => i64::try_from(seq).unwrap_or(i64::MAX),
        ReplayFrom::Beginning | ReplayFrom::Time(_) => i64::MIN,
    };
    // `$1` to `$3` are the window's first and last `seq` and the most rows to return, set for each
    // window; the conditions on its rows are written so that no index serves them (see the
    // module docs), and the plan is the primary key's, bounded by the window.
    let mut filter = Query::new();
    filter.params.extend([0_i64; 3].map(|n| Box::new(n) as Box<dyn ToSql + Sync + Send>));
    filter.conditions.extend(["seq >= $1".to_owned(), "seq <= $2".to_owned()]);
    if let ReplayFrom::Time(at) = from {
        filter.at_or_after("(created_at_ns + 0)", at);
    }
    if let Some(pattern) = pattern {
        filter.and("(\"type\" || '') ~ $?", pattern_regex(pattern));
    }
    let statement = format!(
        "SELECT seq, {EVENT_COLUMNS} FROM {} {} ORDER BY seq LIMIT $3",
        sql.events,
        filter.where_clause()
    );
    // One call, so one operation timeout bounds the wait for writers and every window read below.
    backend.call(OP, async {
        let conn = backend.conn(OP).await?;
        let patience = WRITERS_WAIT.min(backend.config.operation_timeout / 2);
        let settled = match settled_seq(&conn, sql, patience).await? {
            Settled::UpTo(seq) => seq,
            Settled::Empty => {
                conn.release();
                return Ok(ReplayPage { events: Vec::new(), next: None, end: true });
            }
            // The connection is sound: another session's transaction keeps history open.
            Settled::Open(error) => {
                conn.release();
                return Err(error);
            }
        };
        let Some(first) = start(&conn, sql, from, first, settled).await? else {
            // Nothing created since the replay's time, up to the settled `seq`: what comes later
            // is past it.
            conn.release();
            let next = settled.saturating_add(1).max(0).unsigned_abs();
            return Ok(ReplayPage { events: Vec::new(), next: Some(next), end: true });
        };
        let window_end = conn.prepare_cached(&sql.window_end).await.map_err(fail)?;
        let mut events = Vec::new();
        let mut skipped = Skipped::default();
        // The last row read, returned or passed over, or the end of the last window read whole:
        // the next page starts after it.
        let mut past = None::<i64>;
        let (mut window, mut looked_at) = (0_usize, 0_u64);
        loop {
            let want = limit - events.len();
            // Rows passed over are made up for by reading on, in larger reads once some were
            // found: a run of them is usually long (a table's captured rows), and one round trip
            // per row would pass over a few thousand a second.
            let chunk = if skipped.rows == 0 { want } else { want.max(PASS_OVER_CHUNK) };
            // As many rows as the page lacks first, so a dense pattern reads little past it; twice
            // the last window after, so a sparse one reaches `WINDOW_MAX` in a few round trips.
            window = window.saturating_mul(2).max(chunk).min(WINDOW_MAX);
            let start = past.map_or(first, |seq| seq.saturating_add(1));
            let bounds =
                conn.query_one(&window_end, &[&start, &settled, &bigint(window)]).await.map_err(fail)?;
            let (last, rows): (Option<i64>, i64) =
                (bounds.try_get(0).map_err(fail)?, bounds.try_get(1).map_err(fail)?);
            let Some(last) = last else {
                // No row from `start` up to the settled `seq`.
                conn.release();
                skipped.report(passed_over, &sql.events);
                let next = past.map(|seq| seq.unsigned_abs().saturating_add(1));
                return Ok(ReplayPage { events, next, end: true });
            };
            looked_at = looked_at.saturating_add(rows.unsigned_abs());
            for (param, value) in filter.params.iter_mut().zip([start, last, bigint(chunk)]) {
                *param = Box::new(value);
            }
            let prepared = conn.prepare_cached(&statement).await.map_err(fail)?;
            let matched = conn.query(&prepared, &filter.params()).await.map_err(fail)?;
            for row in &matched {
                let seq: i64 = row.try_get(0).map_err(fail)?;
                past = Some(seq);
                match codec::decode_event(row, 1, OP)? {
                    Ok(event) => events.push(StoredEvent { seq: seq.unsigned_abs(), event }),
                    Err(error) => skipped.add(seq, error),
                }
                if events.len() == limit {
                    break;
                }
            }
            // Fewer matches than asked for: none is left in the window, read whole.
            let whole = matched.len() < chunk && events.len() < limit;
            if whole {
                past = Some(last);
            }
            // A window shorter than asked for ended at the settled `seq`.
            let end = whole && usize::try_from(rows).is_ok_and(|rows| rows < window);
            let bounded =
                skipped.rows >= PASS_OVER_MAX || looked_at >= LOOK_MAX || Instant::now() >= read_until;
            if end || events.len() == limit || bounded {
                conn.release();
                skipped.report(passed_over, &sql.events);
                let next = past.map(|seq| seq.unsigned_abs().saturating_add(1));
                return Ok(ReplayPage { events, next, end });
            }
        }
    })
}

/// Rows a replay call passed over because they hold no valid event: counted and logged once per
/// call, as a run of them may be thousands long.
#[derive(Default)]
struct Skipped {
    rows: u64,
    /// The first and last `seq` passed over.
    span: Option<(i64, i64)>,
    first_error: Option<ProviderError>,
}

impl Skipped {
    fn add(&mut self, seq: i64, error: ProviderError) {
        self.rows += 1;
        self.span = Some(self.span.map_or((seq, seq), |(first, _)| (first, seq)));
        self.first_error.get_or_insert(error);
    }

    fn report(self, passed_over: &AtomicU64, table: &str) {
        let (Some((first, last)), Some(error)) = (self.span, self.first_error) else { return };
        // Relaxed: a counter, read for stats only.
        passed_over.fetch_add(self.rows, Ordering::Relaxed);
        tracing::warn!(
            operation = "replay",
            rows = self.rows,
            first_seq = first,
            last_seq = last,
            %table,
            %error,
            "{NAME} provider: passing over rows that hold no valid event (the error is the first one's)"
        );
    }
}

/// The first `seq` a replay from `from` reads, `first` unless it is from a time: then, from the
/// time index, the first `seq` among the rows created since up to `settled` when they are few
/// enough to tell (see [`TIME_START_MAX`]), or `None` when there are none.
async fn start(
    conn: &Conn,
    sql: &StoreSql,
    from: ReplayFrom,
    first: i64,
    settled: i64,
) -> Result<Option<i64>, ProviderError> {
    let ReplayFrom::Time(at) = from else { return Ok(Some(first)) };
    // A time outside the years a row holds keeps every row or none, as the windows' filter does.
    let at = match codec::nanos_bound(at) {
        Ok(nanos) => nanos,
        Err(std::cmp::Ordering::Less) => return Ok(Some(first)),
        Err(_) => return Ok(None),
    };
    let fail = |err| Backend::error("replay", &sql.events, err);
    let time_start = conn.prepare_cached(&sql.time_start).await.map_err(fail)?;
    let since = conn.query_one(&time_start, &[&at, &settled, &TIME_START_MAX]).await.map_err(fail)?;
    let (lowest, rows): (Option<i64>, i64) =
        (since.try_get(0).map_err(fail)?, since.try_get(1).map_err(fail)?);
    Ok(if rows < TIME_START_MAX { lowest } else { Some(first) })
}

/// How far a replay may read.
enum Settled {
    /// Every row at or below this `seq` has committed or never will.
    UpTo(i64),
    /// The table holds no row.
    Empty,
    /// A writer that was open when the replay began is still open after its wait: history past
    /// the replay's position is not settled yet, and a later call from the same position may
    /// read on. An [`Unavailable`](crate::ProviderErrorKind::Unavailable) error that says so.
    Open(ProviderError),
}

/// How far a replay may read (see the module docs), waiting up to `wait` for the writers open
/// when it began.
async fn settled_seq(conn: &Conn, sql: &StoreSql, wait: Duration) -> Result<Settled, ProviderError> {
    const OP: &str = "replay";
    let fail = |err| Backend::error(OP, &sql.events, err);
    let settled = conn.prepare_cached(&sql.settled).await.map_err(fail)?;
    let row = conn.query_one(&settled, &[&sql.events]).await.map_err(fail)?;
    let Some(highest) = row.try_get::<_, Option<i64>>(0).map_err(fail)? else { return Ok(Settled::Empty) };
    let writers: Vec<String> = row.try_get(1).map_err(fail)?;
    if writers.is_empty() {
        return Ok(Settled::UpTo(highest));
    }
    let writers_left = conn.prepare_cached(&sql.writers_left).await.map_err(fail)?;
    let deadline = crate::deadline::from_now(wait);
    let mut pause = WRITERS_FIRST_POLL;
    loop {
        let left = conn.query(&writers_left, &[&sql.events, &writers]).await.map_err(fail)?;
        if left.is_empty() {
            return Ok(Settled::UpTo(highest));
        }
        let now = Instant::now();
        if now >= deadline {
            // A prepared transaction has no process: 0 stands for it.
            let pids = left
                .iter()
                .map(|row| row.try_get::<_, Option<i32>>(0).map(Option::unwrap_or_default))
                .collect::<Result<Vec<i32>, _>>()
                .map_err(fail)?;
            return Ok(Settled::Open(super::backend::unavailable(
                OP,
                format!(
                    "{} of the {} transactions writing {} when the replay began are still open after {wait:?} \
                     (process ids {pids:?}, 0 for a prepared transaction), and one may hold an event \
                     before the rest: replay again from the same position once they end",
                    left.len(),
                    writers.len(),
                    sql.events,
                ),
            )));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = pause.saturating_mul(2).min(WRITERS_MAX_POLL);
    }
}

/// The columns of a dead letter, as `get_letter` and `list_dead_letters` select them.
const LETTER_COLUMNS: &str = "event::text, subscription_id, pattern, error, attempts, failed_at_ns, id";

fn decode_letter(row: &tokio_postgres::Row, operation: &'static str) -> Result<DeadLetter, ProviderError> {
    let fail =
        |err: tokio_postgres::Error| codec::corrupt(operation, format!("unexpected dead letter row: {err}"));
    let id: Uuid = row.try_get(6).map_err(fail)?;
    let event: &str = row.try_get(0).map_err(fail)?;
    let subscription: i64 = row.try_get(1).map_err(fail)?;
    let attempts: i64 = row.try_get(4).map_err(fail)?;
    let bad = |what: &str, err: &dyn std::fmt::Display| {
        codec::corrupt(operation, format!("dead letter {id}: {what}: {err}"))
    };
    Ok(DeadLetter {
        id: DeadLetterId::from_uuid(id),
        event: Event::from_json(event).map_err(|e| bad("event", &e))?,
        subscription_id: crate::SubscriptionId::from_raw(u64::from_ne_bytes(subscription.to_ne_bytes())),
        pattern: row.try_get(2).map_err(fail)?,
        error: row.try_get(3).map_err(fail)?,
        attempts: u32::try_from(attempts).map_err(|e| bad("attempts", &e))?,
        failed_at: codec::from_nanos(row.try_get(5).map_err(fail)?),
    })
}

pub(super) fn list_dead_letters(
    backend: &Backend,
    sql: &StoreSql,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>, ProviderError> {
    const OP: &str = "list_dead_letters";
    if filter.limit == Some(0) {
        return backend.call(OP, async { Ok(Vec::new()) });
    }
    let mut query = Query::new();
    if let Some(id) = filter.event_id {
        query.and("event_id = $?", *id.as_uuid());
    }
    if let Some(pattern) = &filter.event_type {
        query.and("event_type ~ $?", pattern_regex(pattern));
    }
    if let Some(subscription) = filter.subscription_id {
        query.and("subscription_id = $?", i64::from_ne_bytes(subscription.get().to_ne_bytes()));
    }
    if let Some(start) = filter.start_time {
        query.at_or_after("failed_at_ns", start);
    }
    if let Some(end) = filter.end_time {
        query.before("failed_at_ns", end);
    }
    let page = query.page(filter.offset, filter.limit);
    let statement = format!(
        "SELECT {LETTER_COLUMNS} FROM {} {} ORDER BY failed_at_ns, id {page}",
        sql.dead_letters,
        query.where_clause()
    );
    let rows = backend.call(OP, backend.query(OP, &sql.dead_letters, &statement, &query.params()))?;
    rows.iter().map(|row| decode_letter(row, OP)).collect()
}

pub(super) fn get_dead_letter(
    backend: &Backend,
    sql: &StoreSql,
    id: DeadLetterId,
) -> Result<Option<DeadLetter>, ProviderError> {
    const OP: &str = "get_dead_letter";
    let id = *id.as_uuid();
    let rows = backend.call(OP, backend.query(OP, &sql.dead_letters, &sql.get_letter, &[&id]))?;
    rows.first().map(|row| decode_letter(row, OP)).transpose()
}

pub(super) fn delete_dead_letter(
    backend: &Backend,
    sql: &StoreSql,
    id: DeadLetterId,
) -> Result<bool, ProviderError> {
    const OP: &str = "delete_dead_letter";
    execute(backend, OP, &sql.dead_letters, &sql.delete_letter, *id.as_uuid()).map(|n| n > 0)
}

/// A table `stats` counts whole up to this many blocks (10 MiB at PostgreSQL's usual 8 KiB): a
/// scan of that takes milliseconds. A larger one is sampled.
const EXACT_COUNT_BLOCKS: i64 = 1_280;

/// Blocks a sample of a larger table reads, about: `TABLESAMPLE SYSTEM` picks each block with the
/// probability this over the table's blocks, so the work stays the same however large the table,
/// and the counts (each scaled by the inverse of that probability) are off by about
/// `1 / sqrt(1280)`, 3 %, when rows of each status spread over many blocks.
const SAMPLE_BLOCKS: f64 = 1_280.0;

/// What `stats` reports of the tables: events per status and dead letters, each exact or an
/// estimate from a sample.
pub(super) struct Counts {
    pub(super) by_status: BTreeMap<EventStatus, u64>,
    pub(super) dead_letters: u64,
    /// The per-status counts (and so their total) were counted, not estimated.
    pub(super) events_exact: bool,
    pub(super) dead_letters_exact: bool,
}

/// How `stats` reads a table of `blocks` blocks: `None` to count it whole, or the percentage of
/// its blocks to sample, as `TABLESAMPLE SYSTEM` takes it.
fn sample_percent(blocks: i64) -> Option<f32> {
    if blocks <= EXACT_COUNT_BLOCKS {
        return None;
    }
    // Precision: a share of a table of more than 1 280 blocks, so between 0 and 100.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        reason = "a share, kept to f32's precision"
    )]
    let percent = (SAMPLE_BLOCKS * 100.0 / blocks as f64) as f32;
    Some(percent)
}

/// `count` rows of a sample of `percent` of the blocks, as the table's estimate.
fn scale(count: i64, percent: f32) -> u64 {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an estimate, rounded; counts are never negative"
    )]
    let estimate = (count as f64 * 100.0 / f64::from(percent)).round() as u64;
    estimate
}

/// Stored events per status, and stored dead letters: counted on a table of at most
/// [`EXACT_COUNT_BLOCKS`] (10 MiB), estimated from a sample of about [`SAMPLE_BLOCKS`] blocks on
/// a larger one, so a call costs the same on a table of millions of rows, where a count would
/// read all of them (the status column has no index, on purpose: see the module docs of the
/// provider).
pub(super) fn counts(backend: &Backend, sql: &StoreSql) -> Result<Counts, ProviderError> {
    const OP: &str = "stats";
    let (by_status, letters, events_sample, letters_sample) = backend.call(OP, async {
        let blocks =
            backend.query(OP, &sql.events, &sql.table_blocks, &[&sql.events, &sql.dead_letters]).await?;
        let blocks = |at| blocks.first().map_or(0, |row| row.get::<_, i64>(at));
        let (events_sample, letters_sample) = (sample_percent(blocks(0)), sample_percent(blocks(1)));
        let by_status = match events_sample {
            None => backend.query(OP, &sql.events, &sql.count_by_status, &[]).await?,
            Some(percent) => backend.query(OP, &sql.events, &sql.sample_by_status, &[&percent]).await?,
        };
        let letters = match letters_sample {
            None => backend.query(OP, &sql.dead_letters, &sql.count_letters, &[]).await?,
            Some(percent) => backend.query(OP, &sql.dead_letters, &sql.sample_letters, &[&percent]).await?,
        };
        Ok((by_status, letters, events_sample, letters_sample))
    })?;
    let estimate = |count: i64, sample: Option<f32>| match sample {
        None => count.unsigned_abs(),
        Some(percent) => scale(count, percent),
    };
    let mut counts = BTreeMap::new();
    for row in &by_status {
        let status: &str = row.get(0);
        let count: i64 = row.get(1);
        // A status no event has (a row written by hand) is left out, as `list` passes such a
        // row over, rather than failing every stats call.
        match status.parse::<EventStatus>() {
            Ok(status) => {
                counts.insert(status, estimate(count, events_sample));
            }
            Err(error) => {
                tracing::warn!(%error, rows = count, table = %sql.events, "{NAME} provider: stats leave out rows with no valid status");
            }
        }
    }
    let letters: i64 = letters.first().map_or(0, |row| row.get(0));
    Ok(Counts {
        by_status: counts,
        dead_letters: estimate(letters, letters_sample),
        events_exact: events_sample.is_none(),
        dead_letters_exact: letters_sample.is_none(),
    })
}
