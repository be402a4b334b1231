//! Retention: completed and failed events created longer ago than
//! [`max_age`](super::PostgresConfig::max_age) are deleted, in statements of at most
//! [`cleanup_batch`](super::PostgresConfig::cleanup_batch) rows, by a background task on the
//! provider's runtime and by [`PostgresProvider::cleanup_now`](super::PostgresProvider::cleanup_now).
//! Claims whose event is gone (deleted, or expired while a group that stopped fetching held it)
//! are deleted the same way.

use std::sync::Weak;
use std::time::Duration;

use jiff::Timestamp;

use super::codec;
use super::schema::Names;
use super::{NAME, Shared};
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

/// Deletes what has expired by `now`; returns how many events were deleted.
pub(super) async fn cleanup(
    shared: &Shared,
    now: Timestamp,
    operation: &'static str,
) -> Result<u64, ProviderError> {
    let config = &shared.backend.config;
    let Some(max_age) = config.max_age else { return Ok(0) };
    let cutoff = now.saturating_sub(max_age).unwrap_or(Timestamp::MIN);
    let cutoff = codec::to_nanos(cutoff, "cleanup cutoff", operation).unwrap_or(i64::MIN);
    let batch = i64::try_from(config.cleanup_batch).unwrap_or(i64::MAX);
    let sql = &shared.retention_sql;
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES_PER_RUN {
        let n =
            shared.backend.execute(operation, &sql.events, &sql.delete_expired, &[&cutoff, &batch]).await?;
        deleted += n;
        if n < config.cleanup_batch as u64 {
            break;
        }
    }
    for _ in 0..MAX_BATCHES_PER_RUN {
        let n = shared.backend.execute(operation, &sql.events, &sql.delete_orphan_claims, &[&batch]).await?;
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
        let limit = shared.backend.config.operation_timeout.saturating_mul(4);
        match tokio::time::timeout(limit, cleanup(&shared, Timestamp::now(), "cleanup")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "{NAME} provider: cleanup failed; retrying next interval");
            }
            Err(_) => {
                tracing::warn!("{NAME} provider: cleanup took longer than {limit:?}; retrying next interval");
            }
        }
    }
}
