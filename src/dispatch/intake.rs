//! Intake: whether the broker still accepts work, and how much synchronous work is in flight.
//!
//! Async publishes race shutdown through the rings themselves (a closed ring refuses every claim
//! ordered after its close). `publish_sync` runs handlers on the caller's thread and touches no
//! ring, so it enters the intake instead, and shutdown waits for it to leave before flushing the
//! provider writer: a synchronous publish either sees the broker closed and backs out, or is seen
//! by shutdown and waited for. Never both missed.
//!
//! Items are `pub` only so the hidden `__private` module can hand them to `loom-tests/`.

use crate::sync::Ordering::{Acquire, Relaxed, Release, SeqCst};
use crate::sync::{AtomicBool, AtomicUsize, fence};

/// The broker's intake; see the module docs.
pub struct Intake {
    closed: AtomicBool,
    /// Synchronous publishes inside, counting one that is about to find the intake closed.
    in_flight: AtomicUsize,
}

/// Held while a synchronous publish runs; leaving happens on drop, panics included.
pub struct Entered<'a>(&'a Intake);

impl Intake {
    /// An open intake with nothing inside.
    #[allow(clippy::new_without_default, reason = "internal; a default would hide the open state")]
    pub fn new() -> Self {
        Self { closed: AtomicBool::new(false), in_flight: AtomicUsize::new(0) }
    }

    /// Enters, unless the intake is closed.
    pub fn enter(&self) -> Option<Entered<'_>> {
        // A Dekker handshake with `close`: each side stores, issues a SeqCst fence, then loads
        // what the other stored. The fences are totally ordered, so at least one side sees the
        // other's store: either shutdown counts us (and waits), or we see it closed (and leave).
        self.in_flight.fetch_add(1, Relaxed);
        fence(SeqCst);
        if self.closed.load(Relaxed) {
            // Release: pairs with the Acquire load in `is_idle`, like a normal exit.
            self.in_flight.fetch_sub(1, Release);
            return None;
        }
        Some(Entered(self))
    }

    /// Whether [`Intake::close`] has been called (a snapshot; once true, always true).
    pub fn is_closed(&self) -> bool {
        // Relaxed: a snapshot; nothing is read on the strength of it.
        self.closed.load(Relaxed)
    }

    /// Refuses every later `enter`; `false` when already closed.
    pub fn close(&self) -> bool {
        // Relaxed store, then the fence: the other half of the handshake in `enter`. Every
        // `is_idle` after this reads `in_flight` after the fence.
        let was_open = !self.closed.swap(true, Relaxed);
        fence(SeqCst);
        was_open
    }

    /// How many synchronous publishes are inside now (a snapshot, for reports).
    pub fn in_flight(&self) -> usize {
        // Relaxed: a count for a report; nothing is read on the strength of it.
        self.in_flight.load(Relaxed)
    }

    /// Whether nothing is inside. After `close`, once true it stays true, and everything the
    /// publishes that were inside did happens before it.
    pub fn is_idle(&self) -> bool {
        // Acquire: pairs with the Release decrements in `Entered::drop` and `enter`.
        self.in_flight.load(Acquire) == 0
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        // Release: the publish's effects happen before an `is_idle` that reads this decrement.
        self.0.in_flight.fetch_sub(1, Release);
    }
}

#[cfg(all(test, not(eventbroker_loom)))]
mod tests {
    use super::*;

    #[test]
    fn closing_refuses_entry_and_waits_for_those_inside() {
        let intake = Intake::new();
        let inside = intake.enter().expect("open");
        assert!(intake.close());
        assert!(!intake.close(), "a second close reports it was closed");
        assert!(intake.enter().is_none());
        assert!(!intake.is_idle());
        drop(inside);
        assert!(intake.is_idle() && intake.is_closed());
    }
}
