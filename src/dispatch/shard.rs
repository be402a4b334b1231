//! The shards: one ring and one worker thread each, and the routing of events to them.
//!
//! An event goes to the shard its partition key hashes to (the event type unless the event sets
//! [`Event::partition_key`](crate::Event::partition_key)); one shard has one worker, so events of
//! one key are handled in the order they were published.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::dispatch::backpressure::SpaceWaiters;
use crate::dispatch::delivery::Job;
use crate::dispatch::ring::{self, Producer};
use crate::dispatch::spent::SpentEvents;
use crate::dispatch::worker::{ShardCounters, Worker, WorkerConfig, WorkerReport, WorkerShared};
use crate::error::BuildError;

/// Counters of one shard, as reported by [`Broker::stats`](crate::Broker::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardStats {
    /// Events taken from the ring by the worker (counted as they are taken).
    pub dispatched: u64,
    /// Events taken by the worker whose handling has not begun yet (the rest of its batch).
    pub in_hand: u64,
    /// Events whose deliveries all succeeded (or that matched nothing).
    pub completed: u64,
    /// Events with a delivery that failed after its retries.
    pub failed: u64,
    /// Events no subscription matched (also counted as completed).
    pub unrouted: u64,
    /// Failed delivery attempts, retries included: handler calls that returned an error or
    /// panicked; for a stream subscription, deliveries its full channel refused; for an
    /// acknowledged subscription, deliveries failed, dropped unsettled, or not settled in time.
    pub handler_failures: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Deliveries dead-lettered.
    pub dead_letters: u64,
    /// Events from other instances a work-queue member gave back to its group unhandled: fetched
    /// for a subscription that ended before they were handled (unsubscribed, or its receiver
    /// dropped: a match for nothing else within 2 s of the end, or a pending delivery to it);
    /// another member gets them.
    pub returned: u64,
    /// Deliveries waiting in the delay queue now.
    pub pending_retries: u64,
    /// Acknowledged deliveries (see [`Broker::subscribe_acked`](crate::Broker::subscribe_acked))
    /// this shard's worker made that wait for their consumer to settle them now.
    pub awaiting_acks: u64,
    /// Panics the worker caught outside any handler (each ended the job it hit as failed, or gave
    /// an inbound one back); it carried on.
    pub internal_errors: u64,
    /// Events waiting in the ring now (approximate while publishers are active).
    pub queued: usize,
    /// Ring capacity.
    pub capacity: usize,
}

pub(crate) struct Shard {
    pub(crate) producer: Producer<Option<Job>>,
    /// Publishers parked on this shard while it is full.
    pub(crate) space: Arc<SpaceWaiters>,
    /// Events its worker has finished with, for publishers to build new ones in.
    pub(crate) spent: Arc<SpentEvents>,
    counters: Arc<ShardCounters>,
}

impl Shard {
    /// Closes the ring and wakes parked publishers, who then find it closed.
    fn close(&self) {
        self.producer.close();
        self.space.notify();
    }
}

pub(crate) struct ShardSet {
    shards: Box<[Shard]>,
    hasher: foldhash::fast::FixedState,
    workers: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    exited: Receiver<WorkerReport>,
}

impl ShardSet {
    /// Starts `count` shards of `capacity` slots, each with its worker thread.
    pub(crate) fn spawn(
        count: usize,
        capacity: usize,
        instance: &str,
        shared: &Arc<WorkerShared>,
        config: WorkerConfig,
    ) -> Result<Self, BuildError> {
        let (exit_tx, exited) = crossbeam_channel::unbounded();
        let mut shards = Vec::with_capacity(count);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let (producer, consumer) = ring::ring::<Option<Job>>(capacity);
            let counters = Arc::new(ShardCounters::default());
            let space = Arc::new(SpaceWaiters::new());
            let spent = Arc::new(SpentEvents::new(capacity));
            let worker = Worker::new(
                Arc::clone(shared),
                Arc::clone(&counters),
                Arc::clone(&space),
                Arc::clone(&spent),
                config,
                consumer,
                index,
            );
            let exit_tx = exit_tx.clone();
            // Linux shows 15 bytes of a thread name; the index comes first so it survives.
            let name = format!("eb-w{index}-{instance}");
            let spawned = std::thread::Builder::new().name(name.clone()).spawn(move || {
                let report = worker.run();
                let _ = exit_tx.send(report);
            });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(source) => {
                    producer.close();
                    // Stop the workers already started before reporting.
                    for started in &shards {
                        Shard::close(started);
                    }
                    return Err(BuildError::Spawn { thread: name, source });
                }
            }
            shards.push(Shard { producer, space, spent, counters });
        }
        Ok(Self {
            shards: shards.into_boxed_slice(),
            hasher: foldhash::fast::FixedState::with_seed(0x5eed_b10c),
            workers: parking_lot::Mutex::new(workers),
            exited,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The shard for a partition key.
    pub(crate) fn index_for(&self, key: &str) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        let hash = self.hasher.hash_one(key);
        // Lemire's multiply-shift maps the hash onto 0..len without a division.
        #[allow(clippy::cast_possible_truncation, reason = "the result is below len, a usize")]
        let index = ((u128::from(hash) * self.shards.len() as u128) >> 64) as usize;
        index
    }

    pub(crate) fn shard(&self, index: usize) -> &Shard {
        &self.shards[index]
    }

    /// Closes every ring: later pushes fail with `Closed`; workers drain what was accepted.
    pub(crate) fn close(&self) {
        for shard in &*self.shards {
            shard.close();
        }
    }

    /// Waits until every worker has exited or `deadline` passes. Returns the reports of the
    /// workers that exited and how many are still running.
    pub(crate) fn join(&self, deadline: Instant) -> (Vec<WorkerReport>, usize) {
        let mut workers = self.workers.lock();
        let mut reports = Vec::with_capacity(workers.len());
        while reports.len() < workers.len() {
            let Ok(report) = self.exited.recv_deadline(deadline) else {
                let running = workers.len() - reports.len();
                return (reports, running);
            };
            reports.push(report);
        }
        for handle in workers.drain(..) {
            let _ = handle.join();
        }
        (reports, 0)
    }

    /// Events waiting in every ring.
    pub(crate) fn queued(&self) -> usize {
        self.shards.iter().map(|s| s.producer.len()).sum()
    }

    /// Events taken by workers whose handling has not begun.
    pub(crate) fn in_hand(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                // Relaxed: statistics (see `ShardCounters`).
                let c = &s.counters;
                c.dispatched.load(Ordering::Relaxed).saturating_sub(c.started.load(Ordering::Relaxed))
            })
            .sum()
    }

    /// Ring positions claimed so far, per shard: every job accepted before this call (and maybe a
    /// few after).
    pub(crate) fn claimed(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.producer.claimed() as u64).collect()
    }

    /// How far shard `index` is from having ended its first `target` jobs: the jobs short of it,
    /// and the deliveries waiting for a retry or an acknowledgement (one of which may belong to an
    /// earlier job).
    pub(crate) fn shortfall(&self, index: usize, target: u64) -> (u64, u64) {
        let c = &self.shards[index].counters;
        // Acquire, the four: pair with the Release stores that end `Worker::end_turn`, so the
        // `pending_retries` and `awaiting_acks` read after them are from the same turn or a later
        // one. Jobs end in ring order except those waiting for retries or acknowledgements, so
        // "`target` ended and none waiting" in one turn means the first `target` all ended.
        let ended = c.completed.load(Ordering::Acquire)
            + c.failed.load(Ordering::Acquire)
            + c.abandoned.load(Ordering::Acquire)
            + c.returned.load(Ordering::Acquire);
        let waiting = c.pending_retries.load(Ordering::Relaxed) + c.awaiting_acks.load(Ordering::Relaxed);
        (target.saturating_sub(ended), waiting)
    }

    /// How many of shard `index`'s first `target` jobs have not ended (a snapshot, for a report):
    /// those not begun, those waiting for a retry or an acknowledgement, and the one in a handler.
    /// Jobs after the first `target` that ended do not hide those before them still open.
    pub(crate) fn unfinished(&self, index: usize, target: u64) -> u64 {
        let c = &self.shards[index].counters;
        let (short, _) = self.shortfall(index, target);
        // Relaxed: statistics (see `ShardCounters`).
        let not_begun = target.saturating_sub(c.started.load(Ordering::Relaxed));
        let open = c.open_starts.lock().range(..=target).count() as u64;
        // Both count only unfinished jobs; the first misses open ones when later jobs ended, the
        // second the one in a handler.
        short.max(not_begun + open)
    }

    /// Free slots over every ring (a snapshot).
    pub(crate) fn free_slots(&self) -> usize {
        self.shards.iter().map(|s| s.producer.capacity().saturating_sub(s.producer.len())).sum()
    }

    pub(crate) fn stats(&self) -> Vec<ShardStats> {
        self.shards
            .iter()
            .map(|shard| {
                let c = &shard.counters;
                // Acquire: pairs with the worker's Release store, made after the ring's head moved,
                // so the length read below leaves out what this counts (it may leave out more:
                // `published` is then low for a moment, never high).
                let dispatched = c.dispatched.load(Ordering::Acquire);
                ShardStats {
                    dispatched,
                    in_hand: dispatched.saturating_sub(c.started.load(Ordering::Relaxed)),
                    completed: c.completed.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    unrouted: c.unrouted.load(Ordering::Relaxed),
                    handler_failures: c.handler_failures.load(Ordering::Relaxed),
                    retries: c.retries.load(Ordering::Relaxed),
                    dead_letters: c.dead_letters.load(Ordering::Relaxed),
                    returned: c.returned.load(Ordering::Relaxed),
                    pending_retries: c.pending_retries.load(Ordering::Relaxed),
                    awaiting_acks: c.awaiting_acks.load(Ordering::Relaxed),
                    internal_errors: c.internal_errors.load(Ordering::Relaxed),
                    queued: shard.producer.len(),
                    capacity: shard.producer.capacity(),
                }
            })
            .collect()
    }
}
