//! A broker's counters: [`BrokerStats`], assembled from the shards, the caller-thread deliveries,
//! the writer and the inbound thread.

use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::Engine;
use crate::dispatch::delivery::{AtShutdown, Counts};
use crate::dispatch::inbound::InboundStats;
use crate::dispatch::shard::ShardStats;
use crate::{Distribution, Mode, WriterStats};

/// Counts of `publish_sync` deliveries, kept apart from the shards'. Relaxed: statistics.
#[derive(Default)]
pub(crate) struct SyncCounters {
    pub(crate) published: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    unrouted: AtomicU64,
    handler_failures: AtomicU64,
    retries: AtomicU64,
    dead_letters: AtomicU64,
    /// Acknowledged deliveries `publish_sync` and `redrive` wait for on their callers' threads.
    pub(crate) awaiting_acks: AtomicU64,
    /// What their deliveries did after shutdown began, for its report.
    pub(crate) at_shutdown: AtShutdown,
}

impl SyncCounters {
    pub(crate) fn add(&self, counts: &Counts) {
        let add = |a: &AtomicU64, n: u64| {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.completed, counts.completed);
        add(&self.failed, counts.failed);
        add(&self.unrouted, counts.unrouted);
        add(&self.handler_failures, counts.handler_failures);
        add(&self.retries, counts.retries);
        add(&self.dead_letters, counts.dead_letters);
    }
}

/// A broker's counters at one moment; see [`Broker::stats`](crate::Broker::stats).
///
/// Every count covers local and inbound events alike, except `published` (accepted here) and the
/// [`inbound`](Self::inbound) counts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// This instance's id.
    pub instance_id: String,
    /// The configured mode.
    pub mode: Mode,
    /// How this broker shares events with other instances.
    pub distribution: Distribution,
    /// Number of shards (worker threads).
    pub workers: usize,
    /// Live subscriptions.
    pub subscriptions: usize,
    /// Events accepted: waiting in rings, taken by workers (counted as they are taken), or
    /// delivered synchronously. Inbound events are counted in [`InboundStats::fetched`] instead.
    pub published: u64,
    /// Events whose handling ended (completed + failed).
    pub processed: u64,
    /// Events whose deliveries all succeeded, or that matched nothing.
    pub completed: u64,
    /// Events with a delivery that failed after its retries.
    pub failed: u64,
    /// Events that matched no subscription.
    pub unrouted: u64,
    /// Failed delivery attempts, retries included: handler calls that returned an error or
    /// panicked; for a stream subscription, deliveries its full channel refused; for an
    /// acknowledged subscription, deliveries failed, dropped unsettled, or not settled in time.
    pub handler_failures: u64,
    /// Retries scheduled (async) or made (sync).
    pub retries: u64,
    /// Deliveries dead-lettered.
    pub dead_letters: u64,
    /// Publishes refused with `Full`.
    pub rejected: u64,
    /// Events waiting in rings now.
    pub queued: usize,
    /// Events from other instances a work-queue member gave back to its group unhandled, fetched
    /// for a subscription that ended (see [`ShardStats::returned`]).
    pub returned: u64,
    /// Deliveries waiting for a retry on a worker now (those `publish_sync` and `redrive` retry
    /// sleep on their callers' threads and are not counted).
    pub pending_retries: u64,
    /// Acknowledged deliveries that wait for their consumer to settle them now (see
    /// [`Broker::subscribe_acked`](crate::Broker::subscribe_acked)): those the workers made, and
    /// those `publish_sync` and `redrive` wait for on their callers' threads.
    pub awaiting_acks: u64,
    /// Panics caught on workers outside any handler.
    pub internal_errors: u64,
    /// The provider writer's counters.
    pub writer: WriterStats,
    /// The inbound thread's counters (all zero when the broker receives nothing).
    pub inbound: InboundStats,
    /// Per-shard counters.
    pub shards: Vec<ShardStats>,
}

impl Engine {
    pub(crate) fn stats(&self) -> BrokerStats {
        let shards = self.shards.stats();
        let sum = |f: fn(&ShardStats) -> u64| shards.iter().map(f).sum::<u64>();
        let s = &self.sync;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let queued: usize = shards.iter().map(|s| s.queued).sum();
        let completed = sum(|s| s.completed) + load(&s.completed);
        let failed = sum(|s| s.failed) + load(&s.failed);
        // Acquire: an inbound job the rings' counts above include was counted as fetched before
        // it was placed (Release there), so `fetched` below includes it too.
        std::sync::atomic::fence(Ordering::Acquire);
        let inbound = self.inbound.as_ref().map(|pump| pump.stats()).unwrap_or_default();
        // Inbound jobs pass through the rings too; they are not this broker's publishes.
        let through_rings = sum(|s| s.dispatched) + queued as u64;
        let published = through_rings.saturating_sub(inbound.fetched) + load(&s.published);
        let published = self.published_reported.fetch_max(published, Ordering::Relaxed).max(published);
        BrokerStats {
            instance_id: self.instance_id.to_string(),
            mode: self.mode,
            distribution: self.distribution.clone(),
            workers: self.shards.len(),
            subscriptions: self.shared.table.len(),
            published,
            processed: completed + failed,
            completed,
            failed,
            unrouted: sum(|s| s.unrouted) + load(&s.unrouted),
            handler_failures: sum(|s| s.handler_failures) + load(&s.handler_failures),
            retries: sum(|s| s.retries) + load(&s.retries),
            dead_letters: sum(|s| s.dead_letters) + load(&s.dead_letters) + inbound.invalid,
            rejected: load(&self.rejected),
            queued,
            returned: sum(|s| s.returned),
            pending_retries: sum(|s| s.pending_retries),
            awaiting_acks: sum(|s| s.awaiting_acks) + load(&s.awaiting_acks),
            internal_errors: sum(|s| s.internal_errors),
            writer: self.shared.writer.stats(),
            inbound,
            shards,
        }
    }
}

impl Engine {
    /// Starts the thread that reports this broker's gauges and engine-wide counters, when it
    /// records metrics (see [`crate::metrics`]).
    #[cfg(feature = "metrics")]
    pub(crate) fn start_metrics_reporter(self: &std::sync::Arc<Self>) -> Result<(), crate::BuildError> {
        if let Some(metrics) = &self.metrics {
            let engine = std::sync::Arc::downgrade(self);
            let source = Box::new(move || engine.upgrade().map(|e| (e.stats(), e.intake.is_closed())));
            metrics.start_reporter(source).map_err(|source| crate::BuildError::Spawn {
                thread: format!("eb-metrics-{}", self.instance_id),
                source,
            })?;
        }
        Ok(())
    }
}
