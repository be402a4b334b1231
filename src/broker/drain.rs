//! `drain`: wait until everything accepted so far has been handled and written, without shutting
//! down.
//!
//! It costs the hot path nothing: the call reads each ring's claimed positions once (every job
//! accepted before the call lies below them), then polls the counters the workers publish at the
//! end of each turn until each shard has ended that many jobs with no delivery waiting for a
//! retry, and finally flushes the provider writer, which by then holds every status, dead letter
//! and acknowledgement those jobs produced (a worker hands them over before it publishes its
//! counters). Synchronous publishes and redrives, which handle their event on the caller's thread,
//! take a ticket as they begin ([`SyncCalls`]): drain also waits for those begun before it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::engine::Engine;
use super::shutdown::Busy;
use crate::dispatch::backpressure::Backoff;
use crate::dispatch::intake::Entered;
use crate::dispatch::worker;
use crate::error::DrainError;

/// The synchronous calls in progress (`publish_sync`, `redrive`), by ticket in the order they
/// began. They are the slow path (handlers run on the caller's thread), so a lock suffices.
#[derive(Default)]
pub(crate) struct SyncCalls {
    state: parking_lot::Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    next: u64,
    open: BTreeSet<u64>,
}

/// A synchronous call in progress ([`Engine::begin_sync_call`]); it ends when dropped, panics
/// included.
pub(crate) struct SyncCall<'a> {
    calls: &'a SyncCalls,
    ticket: u64,
    _busy: Busy,
    _entered: Entered<'a>,
}

impl SyncCalls {
    fn take_ticket(&self) -> u64 {
        let mut state = self.state.lock();
        let ticket = state.next;
        state.next += 1;
        state.open.insert(ticket);
        ticket
    }

    /// The ticket the next call will take: every call begun before now has a lower one.
    fn next(&self) -> u64 {
        self.state.lock().next
    }

    /// How many calls with a ticket below `ticket` are still in progress.
    fn open_before(&self, ticket: u64) -> u64 {
        self.state.lock().open.range(..ticket).count() as u64
    }
}

impl Drop for SyncCall<'_> {
    fn drop(&mut self) {
        self.calls.state.lock().open.remove(&self.ticket);
    }
}

impl Engine {
    /// Begins a synchronous call (`publish_sync`, `redrive`), whose handlers run on this thread:
    /// inside the intake, so shutdown waits for it; with a ticket, so a drain begun from now on
    /// does; and with the thread marked, so that neither, called by one of its handlers, waits for
    /// it. `None` once shutdown has begun.
    pub(crate) fn begin_sync_call(&self) -> Option<SyncCall<'_>> {
        let entered = self.intake.enter()?;
        let busy = Busy::mark(self.id);
        let ticket = self.sync_calls.take_ticket();
        Some(SyncCall { calls: &self.sync_calls, ticket, _busy: busy, _entered: entered })
    }

    /// Whether this thread is one the broker's drain or shutdown would wait for: one of its
    /// workers, or inside one of its synchronous calls (a handler calling back).
    pub(crate) fn on_waited_thread(&self) -> bool {
        worker::current(self.id).is_some() || Busy::here(self.id)
    }

    pub(crate) fn drain(&self, timeout: Duration) -> Result<(), DrainError> {
        if self.intake.is_closed() {
            return Err(DrainError::Closed);
        }
        if self.on_waited_thread() {
            return Err(DrainError::InHandler);
        }
        let deadline = crate::deadline::from_now(timeout);
        let sync_target = self.sync_calls.next();
        let targets = self.shards.claimed();
        let mut backoff = Backoff::new();
        loop {
            let (in_rings, retrying) = targets
                .iter()
                .enumerate()
                .map(|(shard, &target)| self.shards.shortfall(shard, target))
                .fold((0, 0), |(u, r), (su, sr)| (u + su, r + sr));
            let unfinished = in_rings + self.sync_calls.open_before(sync_target);
            if unfinished == 0 && retrying == 0 {
                break;
            }
            if self.intake.is_closed() {
                return Err(DrainError::Closed);
            }
            if Instant::now() >= deadline {
                let in_rings: u64 = targets
                    .iter()
                    .enumerate()
                    .map(|(shard, &target)| self.shards.unfinished(shard, target))
                    .sum();
                let unfinished = in_rings + self.sync_calls.open_before(sync_target);
                return Err(DrainError::TimedOut { timeout, unfinished, retrying });
            }
            if !backoff.snooze() {
                backoff.sleep();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.shared.writer.flush(left).map_err(DrainError::Write)
    }
}
