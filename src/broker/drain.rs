//! `drain`: wait until everything accepted so far has been handled and written, without shutting
//! down.
//!
//! It costs the hot path nothing: the call reads each ring's claimed positions once (every job
//! accepted before the call lies below them), then polls the counters the workers publish at the
//! end of each turn until each shard has ended that many jobs with no delivery waiting for a
//! retry, and finally flushes the provider writer, which by then holds every status, dead letter
//! and acknowledgement those jobs produced (a worker hands them over before it publishes its
//! counters).

use std::time::{Duration, Instant};

use super::engine::Engine;
use crate::dispatch::backpressure::Backoff;
use crate::dispatch::worker;
use crate::error::DrainError;

impl Engine {
    pub(crate) fn drain(&self, timeout: Duration) -> Result<(), DrainError> {
        if self.intake.is_closed() {
            return Err(DrainError::Closed);
        }
        if worker::current(self.id).is_some() {
            return Err(DrainError::InHandler);
        }
        let deadline = crate::deadline::from_now(timeout);
        let targets = self.shards.claimed();
        let mut backoff = Backoff::new();
        loop {
            let (unfinished, retrying) = targets
                .iter()
                .enumerate()
                .map(|(shard, &target)| self.shards.shortfall(shard, target))
                .fold((0, 0), |(u, r), (su, sr)| (u + su, r + sr));
            if unfinished == 0 && retrying == 0 {
                break;
            }
            if self.intake.is_closed() {
                return Err(DrainError::Closed);
            }
            if Instant::now() >= deadline {
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
