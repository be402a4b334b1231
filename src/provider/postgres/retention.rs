//! Retention: completed and failed events created longer ago than
//! [`max_age`](super::PostgresConfig::max_age) are deleted, in statements of at most
//! [`cleanup_batch`](super::PostgresConfig::cleanup_batch) rows, by a background task on the
//! provider's runtime and by [`PostgresProvider::cleanup_now`](super::PostgresProvider::cleanup_now).
//! Claims whose event is gone (deleted, or expired while a group that stopped fetching held it)
//! are deleted the same way.
//!
//! A run, periodic or [`cleanup_now`](super::PostgresProvider::cleanup_now), is bounded by one
//! [`operation_timeout`](super::PostgresConfig::operation_timeout) (10 s) as a whole: it starts
//! statements during the first half of it and each must end by the end of it. What a run leaves
//! (a backlog after an outage, say) the next one continues.

use std::sync::Weak;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::backend::unavailable;
use super::codec;
use super::schema::Names;
use super::{NAME, Shared};
use crate::deadline;
use crate::error::ProviderError;
use crate::sync::Ordering;

/// Most statements one cleanup run makes, so a run ends even if events expire faster than it
/// deletes them; the next run continues.
const MAX_BATCHES_PER_RUN: usize = 1_000;

pub(super) struct RetentionSql {
    events: String,
    delete_expired: String,
    delete_orphan_claims: String,
}

impl RetentionSql {
    pub(super) fn new(names: &Names) -> Self {
        let events = names.events();
        Self {
            // SKIP LOCKED: rows a writer is updating right now wait for the next run.
            delete_expired: format!(
                "DELETE FROM {events} WHERE seq IN (
                     SELECT seq FROM {events}
                     WHERE created_at_ns < $1 AND status IN ('completed', 'failed')
                     ORDER BY created_at_ns
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 )"
            ),
            // Claims of events that are gone: a group that is no longer fetching (an instance that
            // never came back) would otherwise keep them for ever.
            delete_orphan_claims: format!(
                "DELETE FROM {claims} WHERE (group_key, seq) IN (
                     SELECT c.group_key, c.seq FROM {claims} AS c
                     WHERE NOT EXISTS (SELECT 1 FROM {events} AS e WHERE e.seq = c.seq)
                     LIMIT $1
                 )",
                claims = names.claims(),
            ),
            events,
        }
    }
}

/// Deletes what has expired by `now`; returns how many events were deleted. `started` is when the
/// caller's `limit` began: the run starts statements until half of it has passed, and fails with
/// [`Unavailable`](crate::ProviderErrorKind::Unavailable) when one has not ended by the end of it.
pub(super) async fn cleanup(
    shared: &Shared,
    now: Timestamp,
    operation: &'static str,
    started: Instant,
    limit: Duration,
) -> Result<u64, ProviderError> {
    let config = &shared.backend.config;
    let Some(max_age) = config.max_age else { return Ok(0) };
    let cutoff = now.saturating_sub(max_age).unwrap_or(Timestamp::MIN);
    let cutoff = codec::to_nanos(cutoff, "cleanup cutoff", operation).unwrap_or(i64::MIN);
    let batch = i64::try_from(config.cleanup_batch).unwrap_or(i64::MAX);
    let sql = &shared.retention_sql;
    let run = Run {
        operation,
        start_by: deadline::after(started, limit / 2),
        end_by: deadline::after(started, limit),
        limit,
    };
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES_PER_RUN {
        let Some(n) = run.step(shared, &sql.delete_expired, &[&cutoff, &batch], deleted).await? else {
            break;
        };
        deleted += n;
        if n < config.cleanup_batch as u64 {
            break;
        }
    }
    for _ in 0..MAX_BATCHES_PER_RUN {
        let Some(n) = run.step(shared, &sql.delete_orphan_claims, &[&batch], deleted).await? else { break };
        if n < config.cleanup_batch as u64 {
            break;
        }
    }
    // Relaxed: a counter, read for stats only.
    shared.expired.fetch_add(deleted, Ordering::Relaxed);
    if deleted > 0 {
        tracing::debug!(deleted, table = %sql.events, "{NAME} provider: deleted expired events");
    }
    Ok(deleted)
}

/// The time one cleanup run has: its statements share it, rather than each getting its own.
struct Run {
    operation: &'static str,
    /// No statement starts after this.
    start_by: Instant,
    /// Every statement has ended by this.
    end_by: Instant,
    limit: Duration,
}

impl Run {
    /// Runs one delete; its rows, or `None` when the run may start no more statements.
    async fn step(
        &self,
        shared: &Shared,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        deleted: u64,
    ) -> Result<Option<u64>, ProviderError> {
        if Instant::now() >= self.start_by {
            return Ok(None);
        }
        let table = &shared.retention_sql.events;
        let execute = shared.backend.execute(self.operation, table, statement, params);
        match tokio::time::timeout_at(self.end_by.into(), execute).await {
            Ok(rows) => rows.map(Some),
            Err(_) => Err(unavailable(
                self.operation,
                format!(
                    "{table}: deleted {deleted} expired events, then a delete did not end within the {:?} a cleanup may take",
                    self.limit
                ),
            )),
        }
    }
}

/// Runs [`cleanup`] every `interval` until the provider is gone or its runtime shuts down.
pub(super) async fn run_periodically(shared: Weak<Shared>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // The first tick is immediate; the first run waits one interval.
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        if shared.backend.is_closed() {
            return;
        }
        let limit = shared.backend.config.operation_timeout;
        if let Err(error) = cleanup(&shared, Timestamp::now(), "cleanup", Instant::now(), limit).await {
            tracing::warn!(%error, "{NAME} provider: cleanup failed; retrying next interval");
        }
    }
}
