//! Evicted events whose memory is freed a few evictions late, in an order unlike their stores'.
//!
//! A thread whose events all go to one shard (any thread below [`SHARDED_FROM`] events, where
//! there is one shard) evicts, with each store, the event it stored a bound's worth of stores
//! before, in the order it stored them. Freed at once, each evicted event's allocations are the
//! ones the thread's next event is built in: the thread rebuilds its events in the same blocks, in
//! the same order, block after block, as it built them the time before. With the shard's worker
//! handling each event just behind the publisher, that order is what made one publisher and one
//! worker slow: on the workload bench (`cargo bench --bench workload -- profile default 1 1
//! 4095`, a Xeon host of model 167) one shard ran at 1.09–1.16 M events/s where the same publisher
//! spreading over two shards (a bound of 4 096) ran at 1.56–1.67, the extra time in the allocator,
//! the first read of each new event and the locked instructions after its copy. It is not the
//! provider's own work (a thread storing alone into one shard is faster than into two), nor the
//! depth of the eviction prefetches, nor lines shared between neighbouring events, nor glibc's
//! thread cache (all tried); it goes away when the evicted events are freed in a scrambled order.
//! Two shards interleave their evictions at random, which is why the sharded provider showed it
//! less, but not never: parking took the default settings (bound 10 000, sixteen shards) from
//! 1.49–1.56 to 1.58–1.64 at one publisher and one worker, and one shard from 1.04–1.09 to
//! 1.53–1.62, in alternating runs (eight slots; four did as well at the default bound and worse
//! at one shard, sixteen and thirty-two worse at both).
//!
//! So an eviction parks the evicted event in one of [`SLOTS`] slots, picked by the store's number
//! through a multiplicative hash, and frees the event it displaces. Only an event the provider
//! held the last reference to (and no weak one) is parked: nobody else can reach it, so parking is
//! invisible but for memory, at most [`SLOTS`] events a shard. An event somebody else still holds
//! (a stream, a retry, a caller's own `Arc`) is let go of by the time the store returns, as any
//! other.
//!
//! [`SHARDED_FROM`]: super::SHARDED_FROM

use std::sync::Arc;

use crate::event::Event;

/// Evicted events a shard parks at most.
pub(super) const SLOTS: usize = 8;
const _: () = assert!(SLOTS.is_power_of_two(), "a slot is the hash's top bits");

/// The slot an event evicted for the store numbered `number` is parked in: Fibonacci hashing, so
/// that consecutive numbers land far apart, in no order the stores had.
fn slot_of(number: u64) -> usize {
    #[allow(clippy::cast_possible_truncation, reason = "the hash's top bits, below `SLOTS`")]
    let slot = (number.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - SLOTS.trailing_zeros())) as usize;
    slot
}

/// One shard's parked events.
#[derive(Default)]
pub(super) struct Lingering {
    slots: [Option<Arc<Event>>; SLOTS],
}

impl Lingering {
    /// Parks `evicted`, evicted for the store numbered `number`, when it is the last reference to
    /// its event; returns what the caller drops (with the shard's lock released): the event it
    /// displaced, or `evicted` itself when somebody else holds the event too.
    pub(super) fn park(&mut self, evicted: Arc<Event>, number: u64) -> Option<Arc<Event>> {
        if Arc::strong_count(&evicted) != 1 || Arc::weak_count(&evicted) != 0 {
            return Some(evicted);
        }
        self.slots[slot_of(number)].replace(evicted)
    }

    /// Events parked.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::EventSource;

    fn event() -> Arc<Event> {
        Arc::new(Event::new(EventSource::System, "a.x"))
    }

    /// An event only the provider holds is parked, and handed back once displaced, each parked
    /// event exactly once; the shard never parks more than `SLOTS`; consecutive numbers spread
    /// over every slot.
    #[test]
    fn parks_unreferenced_events_and_hands_back_the_displaced() {
        let mut lingering = Lingering::default();
        let mut parked = HashSet::new();
        let mut handed_back = HashSet::new();
        // What comes back is kept alive, so that no later event is built in a freed block and
        // repeats its address.
        let mut kept = Vec::new();
        for number in 0..1000 {
            let e = event();
            parked.insert(Arc::as_ptr(&e));
            if let Some(out) = lingering.park(e, number) {
                assert_eq!(Arc::strong_count(&out), 1, "what comes back is the caller's to free");
                assert!(parked.contains(&Arc::as_ptr(&out)), "an event parked before");
                assert!(handed_back.insert(Arc::as_ptr(&out)), "handed back once");
                kept.push(out);
            }
            assert!(lingering.len() <= SLOTS);
        }
        assert_eq!(handed_back.len(), 1000 - SLOTS, "every park after the slots fill displaces one");
        assert_eq!(lingering.len(), SLOTS);
        for first in (0..1 << 20).step_by(997) {
            let slots: HashSet<usize> = (first..first + 16).map(slot_of).collect();
            assert_eq!(slots.len(), SLOTS, "any sixteen consecutive numbers take every slot");
            assert_ne!(slot_of(first), slot_of(first + 1), "consecutive numbers never share one");
        }
    }

    /// An event somebody else holds, strongly or weakly, is handed straight back.
    #[test]
    fn an_event_somebody_holds_is_not_parked() {
        let mut lingering = Lingering::default();
        let e = event();
        let back = lingering.park(Arc::clone(&e), 1).expect("held by the test");
        assert!(Arc::ptr_eq(&back, &e));
        let e = event();
        let weak = Arc::downgrade(&e);
        assert!(lingering.park(e, 2).is_some(), "a weak reference is somebody's");
        drop(weak);
        assert_eq!(lingering.len(), 0);
    }
}
