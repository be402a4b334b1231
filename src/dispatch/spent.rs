//! Events a worker has finished with, handed back for publishers to reuse their allocations.
//!
//! A publisher allocates each event's `Arc` (and the event's payload), and with status tracking
//! off the shard's worker holds the last reference once the handlers have run. Were the worker to
//! free them, glibc's malloc would serialise the two threads: the freed blocks fill the worker's
//! thread cache and then go back, one by one, to the publisher's arena under its lock, while the
//! publisher, whose own cache never refills, takes that same lock for every allocation. On the
//! realistic workload bench (one publisher, one shard, tracking off) that lock made the broker 2.3×
//! slower than under jemalloc, and slower than with tracking on, where the memory provider drops
//! its events on the publisher's thread when it evicts them.
//!
//! So a worker keeps the events it holds the last reference to and hands them over in groups of
//! [`GROUP`] to its shard's list; a publisher to the shard takes them when it runs low, and builds
//! its next events in them: [`reuse`] moves the new event into a spent one's `Arc`, dropping the
//! old event (its payload) on the publisher's thread. Neither side then calls malloc or free for
//! the `Arc`, and what is freed is freed where it was allocated. (Handing the events back only to
//! be freed by the publisher also cured the workload, but made a publisher whose worker was idle
//! slower: it then paid for the reference count and the free the worker used to pay.)
//!
//! A spent event's lines were last written by the worker (its reference count, as it let go), so a
//! publisher writing them waits for each to come from the worker's core, and its next locked
//! instruction (the `Arc`'s uniqueness check, the ring's claim) waits for those writes. [`reuse`]
//! therefore asks for the next spent event's lines, owned, one publish ahead
//! ([`prefetch::range_for_write`](crate::prefetch::range_for_write)): on the dispatch bench (one
//! publisher, one subscriber, events one at a time, tracking off) 6.3–7.4 → 7.2–9.0 M events/s
//! in alternating runs with both cores near; untracked on the workload bench (one publisher, one
//! shard) 0.97–1.38 → 1.31–2.44 with the cores far apart, and no change its noise lets through
//! near, where a publish does more besides.
//!
//! Both sides touch the shared list once per group; a publisher pays a thread-local access per
//! event. Bounds: at most as many events wait per shard as its ring holds (at least
//! [`MIN_WAITING`]), fewer than [`GROUP`] sit in the worker's hands, and at most [`MAX_SPARE`] in
//! a publishing thread's, until it publishes again (to any broker) or ends. When the list is full
//! or busy, the worker frees a group itself, as it would without this. An event somebody else
//! still references (a stream subscriber, the provider, a retry) is never handed over: the worker
//! drops its reference as usual.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::Event;

/// Events a worker gathers before handing them over.
pub(crate) const GROUP: usize = 32;

/// Events that may wait in the list of a shard whose ring is smaller than this.
pub(crate) const MIN_WAITING: usize = 8 * GROUP;

/// Most spent events a publishing thread keeps for its next events; it drops the rest.
pub(crate) const MAX_SPARE: usize = 4 * GROUP;

/// One shard's list of spent events waiting for a publisher.
pub(crate) struct SpentEvents {
    /// How many wait in `events`: what a publisher looks at before it takes the lock.
    waiting: AtomicUsize,
    events: parking_lot::Mutex<Vec<Arc<Event>>>,
    /// Most events that may wait.
    max_waiting: usize,
}

thread_local! {
    /// This thread's spent events, each the only reference to its event, for its next publishes.
    static SPARE: Cell<Vec<Arc<Event>>> = const { Cell::new(Vec::new()) };
}

impl SpentEvents {
    /// The list of a shard whose ring holds `capacity` events.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            events: parking_lot::Mutex::new(Vec::new()),
            max_waiting: capacity.max(MIN_WAITING),
        }
    }

    /// The worker's side: hands over `group` (emptied), or frees it here when the list is full or
    /// a publisher holds it.
    pub(crate) fn hand_over(&self, group: &mut Vec<Arc<Event>>) {
        if let Some(mut events) = self.events.try_lock() {
            if events.len() + group.len() <= self.max_waiting {
                events.append(group);
                self.waiting.store(events.len(), Relaxed);
                return;
            }
        }
        group.clear();
    }

    /// The publisher's side, after each publish to the shard: takes what waits, up to
    /// [`MAX_SPARE`] in hand, when this thread is low on spare events and a group has gathered.
    #[inline]
    pub(crate) fn restock(&self) {
        // Relaxed: a hint; the count is read again under the lock.
        if self.waiting.load(Relaxed) >= GROUP {
            self.take();
        }
    }

    #[cold]
    fn take(&self) {
        SPARE.with(|spare| {
            let mut events = spare.take();
            self.take_into(&mut events);
            spare.set(events);
        });
    }

    fn take_into(&self, spare: &mut Vec<Arc<Event>>) {
        if spare.len() < GROUP {
            if let Some(mut events) = self.events.try_lock() {
                // The most recently handed over: the rest wait for this thread's next call, or
                // another publisher's.
                let keep = events.len().saturating_sub(MAX_SPARE - spare.len());
                spare.extend(events.drain(keep..));
                self.waiting.store(events.len(), Relaxed);
            }
        }
    }

    /// Events waiting now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.events.lock().len()
    }
}

/// `event` on the heap, in a spent event's allocation when this thread has one.
#[inline]
pub(crate) fn reuse(event: Event) -> Arc<Event> {
    // One thread-local access; the `Cell` is only ever emptied for the moment of a call.
    let taken = SPARE.with(|spare| {
        let mut events = spare.take();
        let taken = events.pop();
        if let Some(next) = events.last() {
            prepare(next);
        }
        spare.set(events);
        taken
    });
    match taken {
        Some(mut arc) => match Arc::get_mut(&mut arc) {
            Some(old) => {
                // Drops the old event here, on the thread that will allocate the next ones.
                *old = event;
                arc
            }
            None => Arc::new(event),
        },
        None => Arc::new(event),
    }
}

/// Starts fetching, owned, what the next [`reuse`] writes: the spent event's reference counts and
/// fields. A worker on another core held them last; fetched one publish ahead, they arrive while
/// this one goes on. (Not its payload's allocation: finding it reads the event, a demand miss on
/// the worker's line that cost more than the hint saved.)
#[inline]
fn prepare(spent: &Arc<Event>) {
    // The reference counts are the 16 bytes before the event.
    crate::prefetch::range_for_write(
        Arc::as_ptr(spent).cast::<u8>().wrapping_sub(16),
        16 + size_of::<Event>(),
    );
}

/// Whether the worker's reference is the event's last: only then may it be handed over.
#[inline]
pub(crate) fn is_last_reference(event: &Arc<Event>) -> bool {
    // The broker makes no weak references to events; a user may (from a stream subscriber's
    // `Arc`), and upgrade it after this look. That only costs the reuse: a publisher reuses an
    // event's allocation through `Arc::get_mut`, which finds it shared and leaves it alone.
    Arc::strong_count(event) == 1
}

/// Spent events this thread holds.
#[cfg(test)]
fn spare_here() -> usize {
    let spare = SPARE.take();
    let len = spare.len();
    SPARE.set(spare);
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventSource;

    fn events(n: usize) -> Vec<Arc<Event>> {
        (0..n).map(|_| Arc::new(Event::new(EventSource::System, "a.b"))).collect()
    }

    #[test]
    fn a_publisher_builds_its_next_events_in_spent_ones() {
        std::thread::scope(|s| {
            s.spawn(|| {
                let spent = SpentEvents::new(16);
                let mut group = events(GROUP - 1);
                let first = Arc::as_ptr(&group[0]);
                spent.hand_over(&mut group);
                assert!(group.is_empty());
                spent.restock();
                assert_eq!((spent.len(), spare_here()), (GROUP - 1, 0), "fewer than a group wait for more");
                spent.hand_over(&mut events(1));
                spent.restock();
                assert_eq!((spent.len(), spare_here()), (0, GROUP));
                let mut reused = Vec::new();
                for _ in 0..GROUP {
                    reused.push(reuse(Event::new(EventSource::Internal, "c.d")));
                }
                assert_eq!(spare_here(), 0);
                assert!(reused.iter().all(|e| e.event_type == "c.d" && e.source == EventSource::Internal));
                assert!(reused.iter().any(|e| Arc::as_ptr(e) == first), "the allocation is reused");
                let fresh = reuse(Event::new(EventSource::Internal, "e.f"));
                assert_eq!(fresh.event_type, "e.f", "none spare: a new allocation");
            });
        });
    }

    #[test]
    fn a_publisher_keeps_a_bounded_few() {
        std::thread::scope(|s| {
            s.spawn(|| {
                let spent = SpentEvents::new(1024);
                for _ in 0..(MAX_SPARE / GROUP + 2) {
                    spent.hand_over(&mut events(GROUP));
                }
                spent.restock();
                assert_eq!((spent.len(), spare_here()), (2 * GROUP, MAX_SPARE), "the rest wait");
                spent.restock();
                assert_eq!(spare_here(), MAX_SPARE, "no more taken while this thread has plenty");
            });
        });
    }

    #[test]
    fn the_worker_frees_a_group_itself_when_the_list_is_full_or_busy() {
        let max_waiting = MIN_WAITING + 1;
        let spent = SpentEvents::new(max_waiting);
        for _ in 0..max_waiting / GROUP {
            spent.hand_over(&mut events(GROUP));
        }
        let mut group = events(GROUP);
        let watched = Arc::downgrade(&group[0]);
        spent.hand_over(&mut group);
        assert!(group.is_empty() && watched.upgrade().is_none());
        assert_eq!(spent.len(), max_waiting / GROUP * GROUP);
        let held = spent.events.lock();
        let mut group = events(1);
        let watched = Arc::downgrade(&group[0]);
        spent.hand_over(&mut group);
        assert!(watched.upgrade().is_none(), "the worker does not wait for a busy list");
        drop(held);
    }
}
