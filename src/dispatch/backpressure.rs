//! What a publisher does when its shard is full, and how a blocked publisher learns there is
//! room again.
//!
//! Under [`Backpressure::Block`] a publisher facing a full ring spins briefly (about 1 µs), then
//! yields a few times, then parks on its shard's [`SpaceWaiters`] until the worker frees slots
//! (or the deadline passes). The worker signals after every batch it drains, at the cost of one
//! fence and one load when nobody waits. So a full shard hands its space to the publisher as soon
//! as there is some, instead of the publisher sleeping on a timer while the worker runs dry and
//! parks: the two would otherwise take turns sleeping.

use std::time::{Duration, Instant};

use crate::sync::Ordering::{Relaxed, SeqCst};
use crate::sync::{AtomicUsize, fence};

/// What publishing does when the event's shard (or the provider writer's backlog) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Return [`PublishError::Full`](crate::PublishError::Full) at once.
    Reject,
    /// Wait for room up to this long, then return [`PublishError::Full`](crate::PublishError::Full).
    Block(Duration),
}

impl Default for Backpressure {
    /// Block for up to 1 s.
    fn default() -> Self {
        Self::Block(Duration::from_secs(1))
    }
}

/// Publishers parked on a full shard, and the worker's signal that it freed slots.
///
/// The mutex and condvar are `parking_lot`'s and outside the loom shim: they only ever guard the
/// condvar's wait, and the lost-wake-up argument rests on the atomic handshake below.
pub(crate) struct SpaceWaiters {
    /// Publishers inside `wait_until`.
    waiting: AtomicUsize,
    lock: parking_lot::Mutex<()>,
    freed: parking_lot::Condvar,
}

impl SpaceWaiters {
    pub(crate) fn new() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            lock: parking_lot::Mutex::new(()),
            freed: parking_lot::Condvar::new(),
        }
    }

    /// Parks until `has_room()` holds or `deadline` passes; `has_room` also answers "closed", so
    /// the caller re-checks whichever it was.
    pub(crate) fn wait_until(&self, deadline: Instant, has_room: impl Fn() -> bool) {
        let mut guard = self.lock.lock();
        // Dekker with `notify`: we count ourselves, fence, then look at the ring; the worker
        // frees slots, fences, then looks at the count. The fences are totally ordered, so either
        // we see the freed slots or the worker sees us waiting, and then it takes the lock we
        // hold until the condvar wait releases it, so its notify cannot slip in before we wait.
        self.waiting.fetch_add(1, Relaxed);
        fence(SeqCst);
        while !has_room() {
            if self.freed.wait_until(&mut guard, deadline).timed_out() {
                break;
            }
        }
        self.waiting.fetch_sub(1, Relaxed);
    }

    /// Wakes every parked publisher, if there is one. Called by the worker after it frees slots,
    /// and by shutdown after it closes the ring.
    pub(crate) fn notify(&self) {
        // See `wait_until`: the slots were freed (or the ring closed) before this fence.
        fence(SeqCst);
        if self.waiting.load(Relaxed) > 0 {
            let _guard = self.lock.lock();
            self.freed.notify_all();
        }
    }
}

/// How a publisher waits between attempts: spin, then yield, then (the caller's choice) park.
pub(crate) struct Backoff {
    step: u32,
}

/// Steps that spin (2⁰ … 2⁶ hints: about 1 µs in all here).
const SPIN_STEPS: u32 = 7;
/// Steps that yield after the spinning.
const YIELD_STEPS: u32 = 4;

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { step: 0 }
    }

    /// Spins or yields once; `false` once both phases are used up and the caller should park.
    pub(crate) fn snooze(&mut self) -> bool {
        if self.step < SPIN_STEPS {
            for _ in 0..(1u32 << self.step) {
                std::hint::spin_loop();
            }
        } else if self.step < SPIN_STEPS + YIELD_STEPS {
            std::thread::yield_now();
        } else {
            return false;
        }
        self.step += 1;
        true
    }

    /// Sleeps for a growing while (10 µs doubling to 1 ms): for conditions nobody signals.
    pub(crate) fn sleep(&mut self) {
        let exponent = self.step.saturating_sub(SPIN_STEPS + YIELD_STEPS).min(7);
        std::thread::sleep(Duration::from_micros(10 << exponent));
        self.step = self.step.saturating_add(1);
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn a_parked_publisher_is_woken_by_notify_not_by_its_deadline() {
        let waiters = Arc::new(SpaceWaiters::new());
        let room = Arc::new(AtomicBool::new(false));
        let parked = {
            let (waiters, room) = (Arc::clone(&waiters), Arc::clone(&room));
            std::thread::spawn(move || {
                let started = Instant::now();
                waiters.wait_until(started + Duration::from_secs(30), || room.load(Relaxed));
                started.elapsed()
            })
        };
        while waiters.waiting.load(Relaxed) == 0 {
            std::thread::yield_now();
        }
        room.store(true, Relaxed);
        waiters.notify();
        assert!(parked.join().unwrap() < Duration::from_secs(10));
    }

    #[test]
    fn a_wait_ends_at_its_deadline() {
        let waiters = SpaceWaiters::new();
        let started = Instant::now();
        waiters.wait_until(started + Duration::from_millis(20), || false);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(waiters.waiting.load(Relaxed), 0);
    }

    #[test]
    fn backoff_spins_then_yields_then_gives_up() {
        let mut backoff = Backoff::new();
        let steps = std::iter::from_fn(|| backoff.snooze().then_some(())).count();
        assert_eq!(steps, (SPIN_STEPS + YIELD_STEPS) as usize);
    }
}
