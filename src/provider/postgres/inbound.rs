//! The inbound source: consumer groups over the events table, with cursors and claims stored in
//! the database, so every process sharing the tables shares the groups.
//!
//! ## Tables
//! - `<table>_groups`: one row per group with its cursor `(cursor_tx, cursor_seq)`: every event
//!   at or before it in `(tx, seq)` order has been looked at by the group.
//! - `<table>_claims`: one row per event handed to the group and not yet acknowledged: its owner
//!   (one opened source), when it was claimed, when it is due again (after a nak, a departure or a
//!   restart), and how many times it was handed out. An ack deletes the row.
//!
//! ## One fetch
//! One transaction: first the claims that are due (`FOR UPDATE SKIP LOCKED`, so two members
//! never take the same one and neither waits for the other), given to this member; then, if
//! there is room, the group's row is locked (`FOR UPDATE`: members of a shared group take turns,
//! each waiting for the other's short transaction, then reading on from where it left the
//! cursor; see below for one that does not end) and new events past the cursor are read, claimed
//! and the cursor advanced. A member takes only as many as it has room for, so members with room
//! share the stream. The type filter, and the origin check that keeps a group's own events from
//! it, run in the server: unwanted events never cross the network, and the cursor passes them, so
//! they count as handled for the group. The filter applied is the fetching member's own: members of a
//! shared group are expected to subscribe alike, and an event only another member would want is
//! passed over when this member reads it.
//!
//! ## A member that stalls inside a fetch
//! A member can stop half-way through its pass, holding the group's row: its process paused, or
//! a network partition its TCP connection outlives. Two bounds keep the group going:
//! - A pass waits for the group's row at most 1 s (`lock_timeout`; half the operation timeout
//!   when that is under 2 s). It then takes nothing (its transaction is rolled back, so the due
//!   claims it took are due again at once), a pass for due claims alone follows at once, and the
//!   fetch goes on as one that found nothing: the others' fetches keep returning, without an
//!   error, within their wait plus about 1 s.
//! - The server ends a provider session idle inside a transaction for the operation timeout (10 s
//!   by default; `idle_in_transaction_session_timeout` on every pooled connection): the stalled
//!   member's transaction rolls back, so its claims and its cursor move vanish, and the events it
//!   had read go to the next member that reads, none skipped.
//!
//! Until then the stalled transaction is also the oldest running one, so no group on the server
//! receives anything newer (see the horizon below): new events flow again within the operation
//! timeout of the stall, plus the poll interval. The test measures 3.5 s from a stall in a
//! 1.5 s statement to the other member holding both events, with a 2 s operation timeout.
//!
//! ## An idle group costs no transaction ids
//! A row lock assigns the transaction an id even when nothing comes of it, so a pass that locks
//! the group's row uses one up: a broker polling an idle group every 250 ms would use 864 000 a
//! day, and every id used brings the server's anti-wraparound freezing closer. After a pass that
//! found nothing, the next one first asks, in one statement without a lock, whether there is a
//! claim it would take or a row past the cursor below the horizon (see below), and ends there when
//! there is none: a caught-up group's polls assign no transaction id (200 idle fetches: 0 ids,
//! against 200 before). The question reads the cursor without locking it; the cursor and the
//! horizon only move forward, so a stale answer is a needless pass, never a missed event. A pass
//! that finds work goes on as above, its guarantees unchanged.
//!
//! ## Why the cursor is `(tx, seq)`, not `seq`
//! `seq` values are taken when rows are inserted, but rows become visible when their transaction
//! commits, and transactions commit in any order: while a transaction holding `seq` 10 is still
//! open, one holding 11 may commit. A cursor that moved to 11 would skip 10 for good when it
//! commits. Every row therefore records its transaction (`tx`, the top-level transaction id), and
//! a fetch reads only rows whose transaction is older than the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`, the technique Watermill's SQL adapter uses): no
//! such row can still appear, since every transaction below that horizon has ended. Rows are read
//! in `(tx, seq)` order and the cursor is that pair, so it only ever passes rows that are final.
//!
//! A read looks at [`MAX_SCAN`] (4096) rows past the cursor at most, wanted or not: a group far
//! behind a long stretch of events its filter passes over (an instance back from hours away, a
//! narrow filter on a busy table) then moves through it in bounded steps, where one statement
//! passing it all could outlast the operation timeout, fail, and be tried again from the same
//! cursor for ever. When a read returns fewer rows than asked, every row up to the end of what it
//! looked at has been seen, and the cursor jumps there (to `(horizon - 1, max)` when it looked
//! at everything below the horizon), so skipped rows are never scanned twice; a waiting fetch
//! then reads on at once.
//!
//! The price: an event becomes deliverable only once every transaction that started before it
//! committed has ended. A transaction left open anywhere on the server (idle in transaction)
//! holds delivery back until it ends; `idle_in_transaction_session_timeout` bounds that.
//!
//! ## Restored into another cluster
//! Cursors, creation snapshots and every event's `tx` are transaction ids of the server that
//! assigned them. A dump restored into another cluster (or a server whose ids were otherwise
//! reset) assigns ids from a lower count, so each group's cursor lies past every new event, and
//! the group would receive nothing, silently, until the new server caught up with the old ids.
//! A fetch therefore checks the cursor it reads: one at or past the server's next transaction id
//! (or a group created after it) fails the fetch with
//! [`ProviderErrorKind::Backend`](crate::ProviderErrorKind::Backend), naming the groups table,
//! the group and the three numbers; the broker counts and logs it and tries again with backoff,
//! so the group stays stopped, loudly, until re-based. Nothing can re-base it safely on its own:
//! the restored rows' `tx` are in the old count too, and would be delivered again once the new
//! count passed them. After such a restore, before any broker publishes to the database, re-base
//! every group and event once (names as in the provider's layout):
//!
//! ```sql
//! BEGIN;
//! -- Each group keeps its place by seq: just before the first event it had not looked at.
//! UPDATE "schema"."events_groups" AS g
//! SET cursor_tx = 0,
//!     cursor_seq = COALESCE((SELECT min(e.seq) - 1 FROM "schema"."events" AS e
//!                            WHERE (e.tx, e.seq) > (g.cursor_tx, g.cursor_seq)),
//!                           (SELECT max(seq) FROM "schema"."events"), 0),
//!     start_xmax = 0, start_xip = '{}';
//! -- Every restored event had committed before the dump.
//! UPDATE "schema"."events" SET tx = 0;
//! COMMIT;
//! ```
//!
//! Events written since then get the new server's ids, all past `(0, cursor_seq)`: each group
//! receives what it had not looked at before the dump (and, at worst, a few events it had, that
//! committed out of `seq` order then) and everything after.
//!
//! ## Where a new group starts
//! A group is created with its cursor at `(xmin - 1, max)` of the creating snapshot and that
//! snapshot's `xmax` and in-progress list: of the rows above the cursor, only those the snapshot
//! did not see (written by a transaction still running then, or started since) are new to it.
//! History stored before the group existed is never delivered, and an event whose transaction was
//! running when the group was created is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::backend::Backend;
use super::codec::{self, EVENT_COLUMNS, patterns_regex};
use super::schema::Names;
use super::{NAME, Shared};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::event::{Event, EventStatus};
use crate::pattern::Pattern;
use crate::provider::{Ack, AckToken, ConsumerGroup, Inbound, InboundConfig, InboundEvent, closed_error};
use crate::sync::{AtomicBool, Ordering};

/// Most events one fetch hands out, whatever the caller asks for.
const MAX_PER_FETCH: usize = 4096;

/// Most rows past the group's cursor one read looks at (see the module docs).
const MAX_SCAN: i64 = 4096;

/// Longest a pass waits for the group's row, held by another member's pass (see the module
/// docs); at most half the operation timeout, so the wait ends before the statement's.
const GROUP_LOCK_WAIT: Duration = Duration::from_secs(1);

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// It read everything it could.
    Done,
    /// Its read of new events stopped at the end of its window, with rows past it.
    More,
    /// Another member's pass held the group's row past [`GROUP_LOCK_WAIT`]; this one was rolled
    /// back and took nothing.
    Busy,
}

/// The statements of the inbound sources, built once from the validated names.
pub(super) struct InboundSql {
    claims: String,
    groups: String,
    create_group: String,
    release_group: String,
    has_work: String,
    take_due: String,
    drop_lost: String,
    lock_group: String,
    scan_end: String,
    read_new: String,
    claim_new: String,
    move_cursor: String,
    ack: String,
    nak: String,
    extend: String,
    leave: String,
    release_unheld: String,
    fail_malformed: String,
    delete_group: String,
}

impl InboundSql {
    pub(super) fn new(names: &Names) -> Self {
        let (events, groups, claims) = (names.events(), names.groups(), names.claims());
        Self {
            create_group: format!(
                "INSERT INTO {groups} (group_key, cursor_tx, cursor_seq, start_xmax, start_xip)
                 SELECT $1, pg_snapshot_xmin(snap)::text::bigint - 1, 9223372036854775807,
                        pg_snapshot_xmax(snap)::text::bigint,
                        ARRAY(SELECT xip::text::bigint FROM pg_snapshot_xip(snap) AS xip)
                 FROM (SELECT pg_current_snapshot() AS snap) AS now
                 ON CONFLICT (group_key) DO NOTHING"
            ),
            release_group: format!("UPDATE {claims} SET due_at = now() WHERE group_key = $1"),
            // Its claims and its cursor, in one statement: a data-modifying WITH runs to completion.
            delete_group: format!(
                "WITH released AS (DELETE FROM {claims} WHERE group_key = $1)
                 DELETE FROM {groups} WHERE group_key = $1"
            ),
            take_due: format!(
                "WITH due AS (
                     SELECT c.seq FROM {claims} AS c
                     WHERE {due}
                     ORDER BY c.seq
                     LIMIT $4
                     FOR UPDATE SKIP LOCKED
                 ), taken AS (
                     UPDATE {claims} AS c
                     SET owner = $2, claimed_at = now(), due_at = NULL, deliveries = c.deliveries + 1
                     FROM due WHERE c.group_key = $1 AND c.seq = due.seq
                     RETURNING c.seq, c.deliveries
                 )
                 SELECT taken.seq, taken.deliveries, e.seq IS NOT NULL, {columns}
                 FROM taken LEFT JOIN {events} AS e ON e.seq = taken.seq
                 ORDER BY taken.seq",
                columns = prefixed("e", EVENT_COLUMNS),
                due = due_claim(&events, "$5", "$6"),
            ),
            // Whether a pass would find anything to do: a claim `take_due` would take, or a row
            // past the cursor below the horizon; and what `check_cursor` checks. Read without a
            // lock, so it assigns no transaction id; a cursor moved on meanwhile makes it answer
            // yes needlessly, never no wrongly, as the cursor only moves forward and the horizon
            // too. The first row past the cursor is asked for in index order, not with EXISTS:
            // the planner strips an EXISTS of its order and, expecting many rows, scans the whole
            // table for none.
            has_work: format!(
                "SELECT g.cursor_tx, g.start_xmax, pg_snapshot_xmax(now.snap)::text::bigint,
                        EXISTS (SELECT 1 FROM {claims} AS c WHERE {due})
                        OR (SELECT e.seq FROM {events} AS e
                            WHERE (e.tx, e.seq) > (g.cursor_tx, g.cursor_seq)
                              AND e.tx < pg_snapshot_xmin(now.snap)::text::bigint
                            ORDER BY e.tx, e.seq LIMIT 1) IS NOT NULL
                 FROM {groups} AS g, (SELECT pg_current_snapshot() AS snap) AS now
                 WHERE g.group_key = $1",
                due = due_claim(&events, "$4", "$5"),
            ),
            drop_lost: format!("DELETE FROM {claims} WHERE group_key = $1 AND seq = ANY($2)"),
            lock_group: format!(
                "SELECT g.cursor_tx, g.cursor_seq, g.start_xmax, g.start_xip,
                        pg_snapshot_xmin(now.snap)::text::bigint, pg_snapshot_xmax(now.snap)::text::bigint
                 FROM {groups} AS g, (SELECT pg_current_snapshot() AS snap) AS now
                 WHERE g.group_key = $1 FOR UPDATE OF g"
            ),
            // The row that ends a read's window: the last of the first `$4 + 1` past the cursor
            // and below the horizon; none when there are no more.
            scan_end: format!(
                "SELECT tx, seq FROM {events}
                 WHERE (tx, seq) > ($1, $2) AND tx < $3
                 ORDER BY tx, seq
                 OFFSET $4 LIMIT 1"
            ),
            read_new: format!(
                "SELECT seq, tx, {EVENT_COLUMNS} FROM {events}
                 WHERE (tx, seq) > ($1, $2) AND (tx, seq) <= ($3, $4)
                   AND (tx >= $5 OR tx = ANY($6))
                   AND origin IS DISTINCT FROM $7
                   AND ($8 OR \"type\" ~ ANY($9))
                 ORDER BY tx, seq
                 LIMIT $10"
            ),
            claim_new: format!(
                "INSERT INTO {claims} (group_key, seq, owner, claimed_at)
                 SELECT $1, seq, $2, now() FROM unnest($3::bigint[]) AS seq
                 ON CONFLICT (group_key, seq) DO NOTHING"
            ),
            move_cursor: format!("UPDATE {groups} SET cursor_tx = $2, cursor_seq = $3 WHERE group_key = $1"),
            ack: format!("DELETE FROM {claims} WHERE group_key = $1 AND seq = ANY($2)"),
            // Only the member's own claims: one that lapsed and was taken over is the new
            // owner's, and a late nak would hand it out again while that member handles it.
            nak: format!(
                "UPDATE {claims} SET due_at = now() + $3::bigint * interval '1 millisecond'
                 WHERE group_key = $1 AND seq = ANY($2) AND owner = $4"
            ),
            extend: format!(
                "UPDATE {claims} SET claimed_at = now() WHERE group_key = $1 AND owner = $2 AND seq = ANY($3)"
            ),
            leave: format!("UPDATE {claims} SET due_at = now() WHERE group_key = $1 AND owner = $2"),
            // After a fetch whose outcome is unknown: what it may have claimed for this member
            // without handing it out is due again at once.
            release_unheld: format!(
                "UPDATE {claims} SET due_at = now()
                 WHERE group_key = $1 AND owner = $2 AND due_at IS NULL AND NOT (seq = ANY($3))"
            ),
            // A row no event can be made of can never be handled: it is marked failed, with the
            // reason, so stats count it and retention removes it in time.
            fail_malformed: format!(
                "UPDATE {events} AS e SET status = 'failed', error = m.error
                 FROM unnest($1::bigint[], $2::text[]) AS m(seq, error)
                 WHERE e.seq = m.seq AND e.status = 'pending'"
            ),
            claims,
            groups,
        }
    }
}

/// The condition on a claim `c` of group `$1` that `take_due` takes for member `$2` with claim
/// idle time `$3` (milliseconds), the member's filter being `everything` or the regexes
/// `regexes` (parameter names): due, or lapsed in another member's hands. A claim this member
/// gave back whose event it no longer wants (it unsubscribed the pattern) is left for the other
/// members: taken back, it would be acknowledged as unwanted, and a work queue's event goes to a
/// member that wants it.
fn due_claim(events: &str, everything: &str, regexes: &str) -> String {
    format!(
        "c.group_key = $1
         AND (c.due_at <= now()
              OR (c.due_at IS NULL AND c.owner <> $2
                  AND c.claimed_at <= now() - $3::bigint * interval '1 millisecond'))
         AND (c.owner <> $2 OR {everything}
              OR NOT EXISTS (SELECT 1 FROM {events} AS w
                             WHERE w.seq = c.seq AND NOT (w.\"type\" ~ ANY({regexes}))))"
    )
}

/// `columns` (a comma-separated list, casts included) each prefixed with `alias.`.
fn prefixed(alias: &str, columns: &str) -> String {
    columns.split(", ").map(|column| format!("{alias}.{}", column.trim())).collect::<Vec<_>>().join(", ")
}

/// Creates the group of `config` if it is new (at the current end of history), and, for a
/// fan-out group, makes what a predecessor of this instance left unacknowledged due at once.
/// Deletes `group`'s cursor and claims; `false` when it had none.
pub(super) fn delete(shared: &Shared, group: &ConsumerGroup) -> Result<bool, ProviderError> {
    const OP: &str = "delete_group";
    let (backend, sql) = (&shared.backend, &shared.inbound_sql);
    let key = group.key();
    let deleted = backend.call(OP, backend.execute(OP, &sql.claims, &sql.delete_group, &[&key]))?;
    Ok(deleted > 0)
}

pub(super) fn open(shared: &Arc<Shared>, config: &InboundConfig) -> Result<PostgresInbound, ProviderError> {
    const OP: &str = "open_inbound";
    let backend = &shared.backend;
    let sql = &shared.inbound_sql;
    let group = config.group().key();
    backend.call(OP, async {
        let fail = |err| Backend::error(OP, &sql.claims, err);
        let conn = backend.conn(OP).await?;
        let create = conn.prepare_cached(&sql.create_group).await.map_err(fail)?;
        conn.execute(&create, &[&group]).await.map_err(fail)?;
        if !config.group().is_shared() {
            let release = conn.prepare_cached(&sql.release_group).await.map_err(fail)?;
            conn.execute(&release, &[&group]).await.map_err(fail)?;
        }
        conn.release();
        Ok(())
    })?;
    shared.start_listener();
    // Relaxed: a gauge, read for stats only.
    shared.open_sources.fetch_add(1, Ordering::Relaxed);
    Ok(PostgresInbound {
        shared: Arc::clone(shared),
        owner: format!("{}/{:016x}", config.consumer(), fastrand::u64(..)),
        group,
        claim_idle_ms: millis(config.claim_idle()),
        filter: Mutex::new(Filter::Everything),
        held: Mutex::new(std::collections::HashSet::new()),
        unsure: AtomicBool::new(false),
        idle: AtomicBool::new(true),
        lock_wait: format!(
            "SET LOCAL lock_timeout = {}",
            GROUP_LOCK_WAIT.min(backend.config.operation_timeout / 2).as_millis().max(1)
        ),
        closed: AtomicBool::new(false),
    })
}

/// The rows one fetch passed over because they hold no valid event, with why, to be marked failed.
#[derive(Default)]
struct Malformed {
    seqs: Vec<i64>,
    errors: Vec<String>,
}

/// What a member wants.
#[derive(Debug, Clone)]
enum Filter {
    /// Before the first `set_filter`: every type.
    Everything,
    /// The types matching one of these regular expressions (none: nothing): one, made of every
    /// pattern, or none.
    Matching(Vec<String>),
}

/// One opened membership of a consumer group. Dropped without [`Inbound::close`], it is a member
/// that vanished: its claims stay until the claim idle time passes, as for a crashed process.
pub(super) struct PostgresInbound {
    shared: Arc<Shared>,
    /// The group's key: what the group's rows and its members' events' origin say.
    group: String,
    /// This source's name in the claims: the instance id and a random suffix, so a restarted
    /// instance is a different owner from its predecessor.
    owner: String,
    claim_idle_ms: i64,
    filter: Mutex<Filter>,
    /// The seqs handed out by this source and not yet acknowledged or given back.
    held: Mutex<std::collections::HashSet<i64>>,
    /// Set while a fetch runs and left set when it did not return its events (an error, a
    /// timeout): its transaction may have committed claims nobody was handed.
    unsure: AtomicBool,
    /// Whether this source's last pass found nothing to do: its next pass asks first, without a
    /// lock, whether there is anything (see [`PostgresInbound::fetch_once`]).
    idle: AtomicBool,
    /// Bounds the wait for the group's row: `SET LOCAL lock_timeout` to [`GROUP_LOCK_WAIT`].
    lock_wait: String,
    closed: AtomicBool,
}

impl PostgresInbound {
    fn check_open(&self, operation: &'static str) -> Result<(), ProviderError> {
        // Relaxed: a flag with no data behind it; calls racing `close` may run once more.
        if self.closed.load(Ordering::Relaxed) { Err(closed_error(NAME, operation)) } else { Ok(()) }
    }

    /// The filter as query parameters: whether every type passes, else the patterns' regexes.
    fn filter_params(&self) -> (bool, Vec<String>) {
        match &*self.filter.lock() {
            Filter::Everything => (true, Vec::new()),
            Filter::Matching(regexes) => (false, regexes.clone()),
        }
    }

    /// One pass: due claims, then, when `read_new`, new events; one transaction. The events
    /// fetched, and how the pass ended. `unsure`: whether the previous pass did not return its
    /// events.
    ///
    /// After a pass that found nothing, this one first asks without a lock whether there is
    /// anything to do, and ends there when there is not: the locks of a pass would assign its
    /// transaction an id even when nothing comes of it (see the module docs).
    async fn fetch_once(
        &self,
        max: usize,
        unsure: bool,
        read_new: bool,
    ) -> Result<(Vec<InboundEvent>, Pass), ProviderError> {
        const OP: &str = "fetch";
        let sql = &self.shared.inbound_sql;
        let fail = |err| Backend::error(OP, &sql.claims, err);
        let mut conn = self.shared.backend.conn(OP).await?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let (everything, regexes) = self.filter_params();
        // Relaxed: read and written by the fetching thread only.
        if self.idle.load(Ordering::Relaxed) && !unsure {
            let has_work = conn.prepare_cached(&sql.has_work).await.map_err(fail)?;
            let row = conn
                .query_opt(&has_work, &[&self.group, &self.owner, &self.claim_idle_ms, &everything, &regexes])
                .await
                .map_err(fail)?;
            let Some(row) = row else {
                conn.release();
                return Ok((Vec::new(), Pass::Done)); // The group is gone, with its claims.
            };
            self.check_cursor(
                row.try_get(0).map_err(fail)?,
                row.try_get(1).map_err(fail)?,
                row.try_get(2).map_err(fail)?,
            )?;
            if !row.try_get::<_, bool>(3).map_err(fail)? {
                conn.release();
                return Ok((Vec::new(), Pass::Done));
            }
        }
        let tx = conn.transaction().await.map_err(fail)?;
        let mut fetched = Vec::new();

        if unsure {
            let held: Vec<i64> = self.held.lock().iter().copied().collect();
            let release = tx.prepare_cached(&sql.release_unheld).await.map_err(fail)?;
            tx.execute(&release, &[&self.group, &self.owner, &held]).await.map_err(fail)?;
        }

        let take_due = tx.prepare_cached(&sql.take_due).await.map_err(fail)?;
        let due = tx
            .query(&take_due, &[&self.group, &self.owner, &self.claim_idle_ms, &limit, &everything, &regexes])
            .await
            .map_err(fail)?;
        let mut lost = Vec::new();
        let mut malformed = Malformed::default();
        for row in &due {
            let seq: i64 = row.try_get(0).map_err(fail)?;
            if !row.try_get::<_, bool>(2).map_err(fail)? {
                lost.push(seq); // Deleted since it was handed out: retention, or a user's delete.
                continue;
            }
            let deliveries: i32 = row.try_get(1).map_err(fail)?;
            let Some(event) = self.decodable(row, 3, seq, &mut malformed)? else {
                lost.push(seq); // It can never be handed out: its claim goes.
                continue;
            };
            fetched.push(InboundEvent {
                event: Arc::new(as_published(event)),
                token: AckToken::new(seq.unsigned_abs()),
                deliveries: deliveries.unsigned_abs(),
            });
        }
        if !lost.is_empty() {
            let drop_lost = tx.prepare_cached(&sql.drop_lost).await.map_err(fail)?;
            tx.execute(&drop_lost, &[&self.group, &lost]).await.map_err(fail)?;
        }

        let room = max - fetched.len();
        let pass = if room > 0 && read_new {
            self.take_new(&tx, room, &mut fetched, &mut malformed).await?
        } else {
            Pass::Done
        };
        if pass == Pass::Busy {
            // Nothing of this pass stays: the due claims it took are due again.
            tx.rollback().await.map_err(fail)?;
            conn.release();
            return Ok((Vec::new(), Pass::Busy));
        }
        if !malformed.seqs.is_empty() {
            let mark = tx.prepare_cached(&sql.fail_malformed).await.map_err(fail)?;
            tx.execute(&mark, &[&malformed.seqs, &malformed.errors]).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        conn.release();
        // Relaxed: see above.
        self.idle.store(fetched.is_empty() && pass == Pass::Done, Ordering::Relaxed);
        Ok((fetched, pass))
    }

    /// Reads up to `room` new events past the group's cursor, claims them and moves the cursor.
    /// Returns [`Pass::More`] when the read stopped short at the end of its window, with rows
    /// past it, and [`Pass::Busy`], having taken nothing and left `tx` failed, when another
    /// member held the group's row past [`GROUP_LOCK_WAIT`].
    async fn take_new(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        room: usize,
        fetched: &mut Vec<InboundEvent>,
        malformed: &mut Malformed,
    ) -> Result<Pass, ProviderError> {
        const OP: &str = "fetch";
        let sql = &self.shared.inbound_sql;
        let fail = |err| Backend::error(OP, &sql.claims, err);
        // A member stalled inside its pass holds the row until the server ends its session (the
        // pool's `idle_in_transaction_session_timeout`): the others stop waiting for it sooner.
        tx.batch_execute(&self.lock_wait).await.map_err(fail)?;
        let lock = tx.prepare_cached(&sql.lock_group).await.map_err(fail)?;
        let group = match tx.query_opt(&lock, &[&self.group]).await {
            Ok(Some(group)) => group,
            Ok(None) => return Ok(Pass::Done), // The group is gone: its tables were emptied under it.
            Err(err) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => return Ok(Pass::Busy),
            Err(err) => return Err(fail(err)),
        };
        let cursor: (i64, i64) = (group.try_get(0).map_err(fail)?, group.try_get(1).map_err(fail)?);
        let start_xmax: i64 = group.try_get(2).map_err(fail)?;
        let start_xip: Vec<i64> = group.try_get(3).map_err(fail)?;
        let horizon: i64 = group.try_get(4).map_err(fail)?;
        self.check_cursor(cursor.0, start_xmax, group.try_get(5).map_err(fail)?)?;
        let scan_end = tx.prepare_cached(&sql.scan_end).await.map_err(fail)?;
        let window = tx
            .query_opt(&scan_end, &[&cursor.0, &cursor.1, &horizon, &(MAX_SCAN - 1)])
            .await
            .map_err(fail)?;
        let end: (i64, i64) = match &window {
            Some(row) => (row.try_get(0).map_err(fail)?, row.try_get(1).map_err(fail)?),
            None => (horizon - 1, i64::MAX), // Everything below the horizon.
        };
        let (everything, regexes) = self.filter_params();
        let limit = i64::try_from(room).unwrap_or(i64::MAX);
        let read = tx.prepare_cached(&sql.read_new).await.map_err(fail)?;
        let rows = tx
            .query(
                &read,
                &[
                    &cursor.0,
                    &cursor.1,
                    &end.0,
                    &end.1,
                    &start_xmax,
                    &start_xip,
                    &self.group,
                    &everything,
                    &regexes,
                    &limit,
                ],
            )
            .await
            .map_err(fail)?;
        let mut seqs = Vec::with_capacity(rows.len());
        let mut last = cursor;
        for row in &rows {
            let seq: i64 = row.try_get(0).map_err(fail)?;
            last = (row.try_get(1).map_err(fail)?, seq);
            // A row no event can be made of is passed over (the cursor moves past it), not
            // allowed to fail this fetch and every one after it.
            let Some(event) = self.decodable(row, 2, seq, malformed)? else { continue };
            seqs.push(seq);
            fetched.push(InboundEvent {
                event: Arc::new(as_published(event)),
                token: AckToken::new(seq.unsigned_abs()),
                deliveries: 1,
            });
        }
        // A short read saw everything in its window: the cursor may pass all of it.
        let short = rows.len() < room;
        let next = if short { last.max(end) } else { last };
        if !seqs.is_empty() {
            let claim = tx.prepare_cached(&sql.claim_new).await.map_err(fail)?;
            tx.execute(&claim, &[&self.group, &self.owner, &seqs]).await.map_err(fail)?;
        }
        if next > cursor {
            let advance = tx.prepare_cached(&sql.move_cursor).await.map_err(fail)?;
            tx.execute(&advance, &[&self.group, &next.0, &next.1]).await.map_err(fail)?;
        }
        Ok(if short && window.is_some() { Pass::More } else { Pass::Done })
    }

    /// Fails when the group's cursor (`cursor_tx`) or creation snapshot (`start_xmax`) lies past
    /// `next_xid`, the server's next transaction id: both are taken from transaction ids this
    /// server assigned, so the database was restored into another cluster (or its ids otherwise
    /// reset), and reading on would deliver nothing for as long as it takes the server to catch
    /// up with the old ids (see the module docs).
    fn check_cursor(&self, cursor_tx: i64, start_xmax: i64, next_xid: i64) -> Result<(), ProviderError> {
        if cursor_tx < next_xid && start_xmax <= next_xid {
            return Ok(());
        }
        let message = format!(
            "{}: group {:?} has its cursor at transaction {cursor_tx} and was created when the next was \
             {start_xmax}, but the server's next transaction id is {next_xid}: the database was \
             restored into another cluster, or its transaction ids were reset, and the group would \
             receive nothing; re-base the groups as the postgres provider's docs say (\"Restored \
             into another cluster\")",
            self.shared.inbound_sql.groups, self.group
        );
        Err(ProviderError::new(NAME, "fetch", ProviderErrorKind::Backend(message)))
    }

    /// The event in `row` from column `at`, or `None`, logged, counted and added to `malformed`,
    /// for a row that holds no valid event (a captured row whose JSON breaks the payload rules, a
    /// row written by hand).
    ///
    /// # Errors
    /// A row without the event columns: the table is not the provider's.
    fn decodable(
        &self,
        row: &tokio_postgres::Row,
        at: usize,
        seq: i64,
        malformed: &mut Malformed,
    ) -> Result<Option<Event>, ProviderError> {
        match codec::decode_event(row, at, "fetch")? {
            Ok(event) => Ok(Some(event)),
            Err(error) => {
                // Relaxed: a counter, read for stats only.
                self.shared.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq, group = %self.group, %error, "{NAME} provider: skipping a row that holds no valid event");
                malformed.seqs.push(seq);
                malformed.errors.push(format!("holds no valid event: {error}"));
                Ok(None)
            }
        }
    }

    /// No longer held: acknowledged or given back.
    fn forget(&self, seqs: &[i64]) {
        let mut held = self.held.lock();
        for seq in seqs {
            held.remove(seq);
        }
    }

    /// Runs `statement` with the group, then `extra` parameters, as one call of `operation`.
    fn update_claims(
        &self,
        operation: &'static str,
        statement: &str,
        extra: &[&(dyn ToSql + Sync)],
    ) -> Result<(), ProviderError> {
        self.check_open(operation)?;
        let backend = &self.shared.backend;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.group];
        params.extend_from_slice(extra);
        backend
            .call(operation, backend.execute(operation, &self.shared.inbound_sql.claims, statement, &params))
            .map(drop)
    }
}

impl Drop for PostgresInbound {
    /// A source dropped without `close` is a member that vanished: its claims stay, to be taken
    /// over after the claim idle time; it only stops counting as open.
    fn drop(&mut self) {
        // Relaxed: see `check_open`.
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.shared.open_sources.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The event as its publisher stored it: later status changes are the publisher's bookkeeping,
/// not part of what other instances receive.
fn as_published(mut event: Event) -> Event {
    event.status = EventStatus::Pending;
    event.error.clear();
    event.retry_count = 0;
    event.processed_at = None;
    event.completed_at = None;
    event
}

fn tokens(tokens: impl Iterator<Item = AckToken>) -> Vec<i64> {
    tokens.map(|t| i64::try_from(t.get()).unwrap_or(i64::MAX)).collect()
}

/// `duration` in milliseconds, for an interval: at most about a century (what "no deadline"
/// saturates to everywhere), as PostgreSQL refuses an interval past about 292 000 years and would
/// fail every statement given `Duration::MAX`.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.min(crate::deadline::FAR).as_millis()).unwrap_or(i64::MAX)
}

impl Inbound for PostgresInbound {
    fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<InboundEvent>, ProviderError> {
        const OP: &str = "fetch";
        self.check_open(OP)?;
        let backend = &self.shared.backend;
        let max = max.min(MAX_PER_FETCH);
        let limit = wait.saturating_add(backend.config.operation_timeout);
        backend.run(OP, limit, async {
            let started = Instant::now();
            let deadline = started.checked_add(wait).unwrap_or(started + Duration::from_secs(86_400));
            let mut read_new = true;
            loop {
                // Subscribed before looking, so a wake-up that comes during the query is not lost.
                let mut wake: watch::Receiver<u64> = backend.wake_ups();
                wake.borrow_and_update();
                self.check_open(OP)?;
                if backend.is_closed() {
                    return Err(closed_error(NAME, OP));
                }
                // Relaxed: read and written by the fetching thread only.
                let unsure = self.unsure.swap(true, Ordering::Relaxed);
                let (fetched, pass) = self.fetch_once(max, unsure, read_new).await?;
                self.held
                    .lock()
                    .extend(fetched.iter().map(|e| i64::try_from(e.token.get()).unwrap_or(i64::MAX)));
                self.unsure.store(false, Ordering::Relaxed);
                // Relaxed: a counter, read for stats only.
                self.shared.consumed.fetch_add(fetched.len() as u64, Ordering::Relaxed);
                if !fetched.is_empty() || max == 0 {
                    return Ok(fetched);
                }
                // Kept from the new events by a member holding the group's row: the next pass
                // takes what fell due without them, at once; the one after tries them again.
                read_new = pass != Pass::Busy;
                if !read_new {
                    continue;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok(Vec::new());
                }
                if pass == Pass::More {
                    continue; // The cursor moved through a stretch of unwanted rows: read on.
                }
                let nap = (deadline - now).min(backend.config.poll_interval);
                // Woken by a notification, a reconnected listener or `close`; else the poll.
                let _ = tokio::time::timeout(nap, wake.changed()).await;
            }
        })
    }

    fn ack(&self, acks: &[Ack]) -> Result<(), ProviderError> {
        if acks.is_empty() {
            return self.check_open("ack");
        }
        let seqs = tokens(acks.iter().map(|a| a.token));
        self.update_claims("ack", &self.shared.inbound_sql.ack, &[&seqs])?;
        self.forget(&seqs);
        Ok(())
    }

    fn nak(&self, tokens_: &[AckToken], delay: Duration) -> Result<(), ProviderError> {
        if tokens_.is_empty() {
            return self.check_open("nak");
        }
        let seqs = tokens(tokens_.iter().copied());
        let delay = millis(delay);
        self.update_claims("nak", &self.shared.inbound_sql.nak, &[&seqs, &delay, &self.owner])?;
        self.forget(&seqs);
        self.shared.backend.wake_all(); // A nak without delay is due at once.
        Ok(())
    }

    fn extend(&self, tokens_: &[AckToken]) -> Result<(), ProviderError> {
        if tokens_.is_empty() {
            return self.check_open("extend");
        }
        let seqs = tokens(tokens_.iter().copied());
        self.update_claims("extend", &self.shared.inbound_sql.extend, &[&self.owner, &seqs])
    }

    fn set_filter(&self, patterns: &[Pattern]) -> Result<(), ProviderError> {
        self.check_open("set_filter")?;
        *self.filter.lock() = Filter::Matching(patterns_regex(patterns).into_iter().collect());
        Ok(())
    }

    fn close(&self) -> Result<(), ProviderError> {
        // Relaxed: see `check_open`.
        if self.closed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.shared.open_sources.fetch_sub(1, Ordering::Relaxed);
        if self.shared.backend.is_closed() {
            return Ok(());
        }
        let sql = &self.shared.inbound_sql;
        let backend = &self.shared.backend;
        let released = backend
            .call("close", backend.execute("close", &sql.claims, &sql.leave, &[&self.group, &self.owner]));
        backend.wake_all(); // Other members may take what this one gave back.
        released.map(drop)
    }
}
