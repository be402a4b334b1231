//! One shard of the memory provider's events: a recency list holding them, an index by id and an
//! index by sequence number.
//!
//! The event is kept as it was stored (shared, never copied), its status fields as stored with
//! it; status changes are written to the shard's [`Marks`], by slot, and every read here applies
//! them (see [`super::marks`]).

use std::collections::VecDeque;
use std::sync::Arc;

use jiff::Timestamp;

use super::index::IdIndex;
use super::lru::Lru;
use super::marks::Marks;
use crate::event::{Event, EventId, EventStatus};
use crate::pattern::Pattern;
#[cfg(test)]
use crate::provider::StatusUpdate;
use crate::provider::{EventFilter, ReplayFrom};

/// The status fields of a stored event: as stored, then with its marked changes applied.
#[derive(Debug, Clone)]
pub(super) struct Lifecycle {
    pub(super) status: EventStatus,
    /// The error text, empty for none.
    pub(super) error: Box<str>,
    pub(super) retry_count: u32,
    pub(super) processed_at: Option<Timestamp>,
    pub(super) completed_at: Option<Timestamp>,
}

impl Lifecycle {
    fn of(event: &Event) -> Self {
        Self {
            status: event.status,
            error: event.error.as_str().into(),
            retry_count: event.retry_count,
            processed_at: event.processed_at,
            completed_at: event.completed_at,
        }
    }

    /// The same semantics as [`StatusUpdate::apply_to`].
    #[cfg(test)]
    pub(super) fn apply(&mut self, update: &StatusUpdate) {
        self.status = update.status;
        if !(update.error.is_empty() && self.error.is_empty()) {
            self.error = update.error.as_str().into();
        }
        self.retry_count = update.retry_count;
        if let Some(at) = update.processed_at {
            self.processed_at = Some(at);
        }
        if let Some(at) = update.completed_at {
            self.completed_at = Some(at);
        }
    }
}

/// One stored event: as stored (its status fields as stored with it; the changes since are in
/// the shard's marks) and its sequence number.
pub(super) struct Entry {
    /// The event's id, kept beside it: evicting reads it without touching the event itself,
    /// which by then is cold in cache.
    pub(super) id: EventId,
    pub(super) event: Arc<Event>,
    pub(super) seq: u64,
    /// The number its latest store took: `seq` for its first store, a fresh one for a re-store.
    /// Only the marks written for this number apply to it.
    pub(super) stored_at: u64,
}

// With its two links, an entry's node in the recency list fills one cache line: a store writes
// it and an eviction reads it (prefetched), each one line.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Entry>() <= 48, "an entry and its two links fit in 64 bytes");

impl Entry {
    /// Its status now, the status field alone: for counting and filtering, without copying the
    /// rest (see [`Entry::status`]).
    fn current_status(&self, slot: usize, marks: &Marks) -> EventStatus {
        marks.status(slot, self.stored_at).unwrap_or(self.event.status)
    }

    /// Its status now: as stored, with what was marked for its latest store in `slot`.
    fn status(&self, slot: usize, marks: &Marks) -> Lifecycle {
        let mut status = Lifecycle::of(&self.event);
        marks.apply(slot, self.stored_at, &mut status);
        status
    }

    /// An owned copy of the event with its current status.
    fn to_event(&self, slot: usize, marks: &Marks) -> Event {
        let mut event = Event::clone(&self.event);
        let s = self.status(slot, marks);
        event.status = s.status;
        event.error = s.error.into();
        event.retry_count = s.retry_count;
        event.processed_at = s.processed_at;
        event.completed_at = s.completed_at;
        event
    }
}

/// Slot of a sequence index entry whose event is gone.
const GONE: usize = usize::MAX;

/// Sequence numbers of one shard, in increasing order (they are handed out under the shard's lock),
/// with the recency-list slot of each; removed events leave a tombstone until compaction, except at
/// the front, which is popped at once: eviction removes the oldest events, so in the broker's flow
/// (store, then status updates soon after) removal is O(1).
#[derive(Default)]
struct SeqIndex {
    entries: VecDeque<(u64, usize)>,
    gone: usize,
}

impl SeqIndex {
    fn push(&mut self, seq: u64, slot: usize) {
        debug_assert!(self.entries.back().is_none_or(|&(last, _)| last < seq), "sequence numbers increase");
        self.entries.push_back((seq, slot));
    }

    fn remove(&mut self, seq: u64) {
        if self.entries.front().is_some_and(|&(first, _)| first == seq) {
            self.entries.pop_front();
        } else if let Ok(i) = self.entries.binary_search_by_key(&seq, |&(s, _)| s) {
            self.entries[i].1 = GONE;
            self.gone += 1;
            if self.gone > 64 && self.gone * 2 > self.entries.len() {
                self.entries.retain(|&(_, slot)| slot != GONE);
                self.gone = 0;
            }
            return;
        }
        while self.entries.front().is_some_and(|&(_, slot)| slot == GONE) {
            self.entries.pop_front();
            self.gone -= 1;
        }
    }

    /// Hints the CPU to bring the entries that evictions pop a few from now into cache (four
    /// share a cache line; the oldest events were numbered long ago and are cold).
    fn prefetch_front(&self) {
        if let Some(ahead) = self.entries.get(8) {
            crate::prefetch::range(std::ptr::from_ref(ahead).cast(), size_of::<(u64, usize)>());
        }
    }

    /// `(seq, slot)` from `first` on, in order.
    fn from(&self, first: u64) -> impl Iterator<Item = (u64, usize)> + '_ {
        let start = self.entries.partition_point(|&(s, _)| s < first);
        self.entries.range(start..).copied().filter(|&(_, slot)| slot != GONE)
    }
}

/// One shard's events.
pub(super) struct EventTable {
    lru: Lru<Entry>,
    by_id: IdIndex,
    by_seq: SeqIndex,
}

/// Where a store put its event.
pub(super) struct Stored {
    /// Whether its id was not stored yet.
    pub(super) new: bool,
    /// Its slot, whose mark its status changes go to.
    pub(super) slot: usize,
}

/// Where `status` is counted in [`EventTable::counts`].
pub(super) const fn status_index(status: EventStatus) -> usize {
    match status {
        EventStatus::Pending => 0,
        EventStatus::Processing => 1,
        EventStatus::Completed => 2,
        EventStatus::Failed => 3,
    }
}

impl EventTable {
    pub(super) fn new() -> Self {
        Self { lru: Lru::new(), by_id: IdIndex::new(), by_seq: SeqIndex::default() }
    }

    pub(super) fn len(&self) -> usize {
        self.lru.len()
    }

    /// Stored events per status, pending, processing, completed and failed: a pass over them.
    pub(super) fn counts(&self, marks: &Marks) -> [u64; 4] {
        let mut counts = [0; 4];
        for (slot, entry) in self.lru.iter_slots() {
            counts[status_index(entry.current_status(slot, marks))] += 1;
        }
        counts
    }

    /// Stores `event` as the most recently used, with the number `next_seq()` gives (called
    /// once): a new id takes it as its sequence number; a re-store keeps its sequence number and
    /// takes the new event and its status (the marks of earlier stores no longer apply). Reserves
    /// the slot's mark in `marks`.
    pub(super) fn upsert(
        &mut self,
        event: &Arc<Event>,
        next_seq: impl FnOnce() -> u64,
        marks: &Marks,
    ) -> Stored {
        // Before the probe: the counter's locked instruction waits for every earlier load, and the
        // probe's is often a cache miss.
        let seq = next_seq();
        // One probe of the index either way.
        let hash = self.by_id.hash(event.id);
        let lru = &self.lru;
        match self.by_id.find_or_vacant(hash, |slot| lru.get(slot).id == event.id) {
            Ok(slot) => {
                let entry = self.lru.get_mut(slot);
                entry.event = Arc::clone(event);
                entry.stored_at = seq;
                self.lru.touch(slot);
                Stored { new: false, slot }
            }
            Err(vacant) => {
                let slot = self.lru.push_front(Entry {
                    id: event.id,
                    event: Arc::clone(event),
                    seq,
                    stored_at: seq,
                });
                marks.reserve(slot);
                self.by_id.insert(vacant, slot);
                self.by_seq.push(seq, slot);
                Stored { new: true, slot }
            }
        }
    }

    /// The event with `id`, with its status, now the most recently used.
    pub(super) fn touch(&mut self, id: EventId, marks: &Marks) -> Option<Event> {
        let slot = self.slot_of(id)?;
        self.lru.touch(slot);
        Some(self.lru.get(slot).to_event(slot, marks))
    }

    /// The slot of the event with `id` and the number its latest store took: where a status
    /// update of it goes. Reading it does not count as use: status updates are the broker's
    /// bookkeeping.
    pub(super) fn locate(&self, id: EventId) -> Option<(usize, u64)> {
        self.slot_of(id).map(|slot| (slot, self.lru.get(slot).stored_at))
    }

    /// The slot of the event with `id`.
    fn slot_of(&self, id: EventId) -> Option<usize> {
        self.by_id.find(self.by_id.hash(id), |slot| self.lru.get(slot).id == id)
    }

    /// Removes the event with `id` and returns it, for the caller to drop once it has released
    /// the shard (the last reference frees the event, whose memory is cold by then).
    pub(super) fn remove(&mut self, id: EventId) -> Option<Arc<Event>> {
        let slot = self.slot_of(id)?;
        Some(self.remove_slot(slot))
    }

    fn remove_slot(&mut self, slot: usize) -> Arc<Event> {
        // Found by slot, so no id is compared; the hash is computed from the entry's id, and the
        // entry is in cache already (eviction prefetched it; `remove` has just read it).
        let removed = self.by_id.remove(self.by_id.hash(self.lru.get(slot).id), slot);
        debug_assert!(removed, "every slot in the recency list has its index entry");
        let entry = self.lru.remove(slot);
        self.by_seq.remove(entry.seq);
        entry.event
    }

    /// Evicts the least recently used event and returns it (see [`EventTable::remove`]), `None`
    /// when there was none.
    pub(super) fn evict_least_recent(&mut self) -> Option<Arc<Event>> {
        let slot = self.lru.back()?;
        Some(self.remove_slot(slot))
    }

    /// Brings what the next evictions touch into cache ahead of them: the least recently used
    /// event was stored a bound's worth of events ago and is cold by now, and evicting it reads
    /// its list node and its index bucket, and dropping it the whole event and its payload's
    /// allocation, and popping its sequence number reads the front of the sequence index. Each
    /// call moves three victims one stage on, so by its eviction each has had its node fetched
    /// two stores before, its event one store before and its index bucket and payload now.
    pub(super) fn prefetch_evictions(&self) {
        let Some(next) = self.lru.back() else { return };
        self.by_id.prefetch(self.by_id.hash(self.lru.get(next).id));
        self.by_seq.prefetch_front();
        if let Some(payload) = self.lru.get(next).event.payload_json() {
            // From the allocator's header just before the text.
            crate::prefetch::range(payload.as_ptr().wrapping_sub(16), 16 + payload.len().min(48));
        }
        let Some(after) = self.lru.newer(next) else { return };
        let event = Arc::as_ptr(&self.lru.get(after).event).cast::<u8>();
        // With the reference counts before the event.
        crate::prefetch::range(event.wrapping_sub(16), 16 + size_of::<Event>());
        if let Some(third) = self.lru.newer(after) {
            self.lru.prefetch(third);
        }
    }

    /// Ids of completed and failed events created before `cutoff`.
    pub(super) fn finished_before(&self, cutoff: Timestamp, marks: &Marks) -> Vec<EventId> {
        self.lru
            .iter_slots()
            .filter(|(slot, entry)| {
                entry.event.created_at < cutoff && entry.current_status(*slot, marks).is_terminal()
            })
            .map(|(_, entry)| entry.id)
            .collect()
    }

    /// The first `take` events `filter` selects (offset and limit aside), in `(created_at, id)`
    /// order, with their keys: this shard's part of a `list`.
    pub(super) fn list(
        &self,
        filter: &EventFilter,
        take: usize,
        marks: &Marks,
    ) -> Vec<((Timestamp, EventId), Event)> {
        let mut keys: Vec<((Timestamp, EventId), usize)> = self
            .lru
            .iter_slots()
            .filter(|&(slot, entry)| {
                // The mark is read only when the filter asks for a status.
                let status = filter.status.map_or(entry.event.status, |_| entry.current_status(slot, marks));
                filter.matches_with_status(&entry.event, status)
            })
            .map(|(slot, entry)| ((entry.event.created_at, entry.event.id), slot))
            .collect();
        keys.sort_unstable_by_key(|(key, _)| *key);
        keys.into_iter()
            .take(take)
            .map(|(key, slot)| (key, self.lru.get(slot).to_event(slot, marks)))
            .collect()
    }

    /// Up to `limit` events from `from` on, whose type matches `pattern`, in sequence order.
    pub(super) fn replay(
        &self,
        from: ReplayFrom,
        pattern: Option<&Pattern>,
        limit: usize,
        marks: &Marks,
    ) -> Vec<(u64, Event)> {
        let (first_seq, not_before) = match from {
            ReplayFrom::Beginning => (0, None),
            ReplayFrom::Sequence(seq) => (seq, None),
            ReplayFrom::Time(at) => (0, Some(at)),
        };
        self.by_seq
            .from(first_seq)
            .map(|(seq, slot)| (seq, slot, self.lru.get(slot)))
            .filter(|(_, _, entry)| not_before.is_none_or(|at| entry.event.created_at >= at))
            .filter(|(_, _, entry)| pattern.is_none_or(|p| p.matches(&entry.event.event_type)))
            .take(limit)
            .map(|(seq, slot, entry)| (seq, entry.to_event(slot, marks)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use proptest::prelude::*;

    use super::*;
    use crate::EventSource;

    /// The status updates of one store, written to a mark, change an entry exactly as the updates
    /// themselves do, applied one by one: each timestamp alone, both, none, before 1970, the
    /// largest and smallest there are, with and without error text, over an entry that had an
    /// error, one update or two.
    #[test]
    fn a_mark_applies_as_its_updates_do() {
        let stamps = [
            Timestamp::UNIX_EPOCH,
            Timestamp::new(1_764_000_000, 123_456_789).unwrap(),
            Timestamp::new(-1, 1).unwrap(),
            Timestamp::new(-9_000_000_000, 999_999_999).unwrap(),
            Timestamp::MAX,
            Timestamp::MIN,
        ];
        let mut updates = vec![StatusUpdate::new(EventId::new(), EventStatus::Completed)];
        for &at in &stamps {
            for (processed_at, completed_at) in
                [(Some(at), None), (None, Some(at)), (Some(at), Some(stamps[1])), (None, None)]
            {
                for error in ["", "handler failed"] {
                    updates.push(StatusUpdate {
                        error: error.into(),
                        retry_count: 3,
                        processed_at,
                        completed_at,
                        ..StatusUpdate::new(EventId::new(), EventStatus::Failed)
                    });
                }
            }
        }
        let mut event = Event::new(EventSource::System, "model.x");
        event.error = "earlier".into();
        event.processed_at = Some(stamps[1]);
        let seen = |s: &Lifecycle| (s.status, s.error.clone(), s.retry_count, s.processed_at, s.completed_at);
        let mut store = 0;
        for first in &updates {
            for second in [None].into_iter().chain(updates.iter().step_by(5).map(Some)) {
                let mut expected = Lifecycle::of(&event);
                let marks = Marks::new(1);
                marks.reserve(0);
                store += 1;
                for update in std::iter::once(first).chain(second) {
                    expected.apply(update);
                    marks.write(0, store, update);
                }
                let mut kept = Lifecycle::of(&event);
                marks.apply(0, store, &mut kept);
                assert_eq!(seen(&kept), seen(&expected), "{first:?} then {second:?}");
                let mut other = Lifecycle::of(&event);
                marks.apply(0, store + 1, &mut other);
                assert_eq!(seen(&other), seen(&Lifecycle::of(&event)), "another store's mark does not apply");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Store,
        Restore(usize),
        Get(usize),
        Update(usize),
        /// An update written for an earlier store of the event, or of an event gone since (its
        /// slot maybe reused): it changes nothing.
        Late(usize),
        Remove(usize),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Store),
            1 => any::<usize>().prop_map(Op::Restore),
            4 => any::<usize>().prop_map(Op::Get),
            2 => any::<usize>().prop_map(Op::Update),
            2 => any::<usize>().prop_map(Op::Late),
            1 => any::<usize>().prop_map(Op::Remove),
            2 => Just(Op::Evict),
        ]
    }

    proptest! {
        /// The table and its marks agree with a model (a `VecDeque` in recency order of id,
        /// sequence number and status) after any mix of stores, re-stores, reads, status updates,
        /// late updates (for an earlier store of an event, or for an event removed or evicted),
        /// removals and evictions: recency order, each event's status, replay in sequence order,
        /// and the counts per status.
        #[test]
        fn matches_a_recency_model(ops in prop::collection::vec(op(), 0..600)) {
            let mut table = EventTable::new();
            let marks = Marks::new(601);
            let mut model: VecDeque<(EventId, u64, EventStatus)> = VecDeque::new();
            // Tickets (slot, store number) of stores that no longer hold.
            let mut late: Vec<(usize, u64)> = Vec::new();
            let mut next_seq = 1;
            let mut take = || {
                next_seq += 1;
                next_seq - 1
            };
            for op in ops {
                match op {
                    Op::Store => {
                        let event = Arc::new(Event::new(EventSource::System, "model.x"));
                        let mut seq = 0;
                        let stored = table.upsert(&event, || {
                            seq = take();
                            seq
                        }, &marks);
                        prop_assert!(stored.new);
                        prop_assert_eq!(table.locate(event.id), Some((stored.slot, seq)));
                        model.push_back((event.id, seq, EventStatus::Pending));
                    }
                    Op::Restore(i) if !model.is_empty() => {
                        let (id, seq, _) = model.remove(i % model.len()).unwrap();
                        late.push(table.locate(id).unwrap());
                        let event = Arc::new(Event { id, ..Event::new(EventSource::System, "model.y") });
                        let stored = table.upsert(&event, &mut take, &marks);
                        prop_assert!(!stored.new);
                        model.push_back((id, seq, EventStatus::Pending));
                    }
                    Op::Get(i) if !model.is_empty() => {
                        let entry = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(table.touch(entry.0, &marks).map(|e| (e.id, e.status)), Some((entry.0, entry.2)));
                        model.push_back(entry);
                    }
                    Op::Update(i) if !model.is_empty() => {
                        let at = i % model.len();
                        let status = [EventStatus::Processing, EventStatus::Completed, EventStatus::Failed][i % 3];
                        let (slot, stored_at) = table.locate(model[at].0).unwrap();
                        marks.write(slot, stored_at, &StatusUpdate::new(model[at].0, status));
                        model[at].2 = status;
                    }
                    Op::Late(i) if !late.is_empty() => {
                        let (slot, number) = late[i % late.len()];
                        marks.write(slot, number, &StatusUpdate::new(EventId::new(), EventStatus::Failed));
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (id, _, _) = model.remove(i % model.len()).unwrap();
                        late.push(table.locate(id).unwrap());
                        prop_assert_eq!(table.remove(id).map(|e| e.id), Some(id));
                        prop_assert!(table.remove(id).is_none());
                    }
                    Op::Evict => {
                        if let Some(&(id, _, _)) = model.front() {
                            late.push(table.locate(id).unwrap());
                        }
                        let evicted = table.evict_least_recent().map(|e| e.id);
                        prop_assert_eq!(evicted, model.pop_front().map(|(id, _, _)| id));
                    }
                    Op::Restore(_) | Op::Get(_) | Op::Update(_) | Op::Late(_) | Op::Remove(_) => {}
                }
                prop_assert_eq!(table.len(), model.len());
                let held: Vec<_> = std::iter::successors(table.lru.back(), |&slot| table.lru.newer(slot))
                    .map(|slot| {
                        let entry = table.lru.get(slot);
                        (entry.id, entry.seq, entry.status(slot, &marks).status)
                    })
                    .collect();
                prop_assert_eq!(held, model.iter().copied().collect::<Vec<_>>());
                let mut by_seq: Vec<_> = model.iter().map(|&(id, seq, status)| (seq, id, status)).collect();
                by_seq.sort_unstable_by_key(|&(seq, _, _)| seq);
                let replayed: Vec<_> = table
                    .replay(ReplayFrom::Beginning, None, usize::MAX, &marks)
                    .into_iter()
                    .map(|(seq, e)| (seq, e.id, e.status))
                    .collect();
                prop_assert_eq!(replayed, by_seq);
                let counts = table.counts(&marks);
                for status in [EventStatus::Pending, EventStatus::Processing, EventStatus::Completed, EventStatus::Failed] {
                    prop_assert_eq!(counts[status_index(status)], model.iter().filter(|e| e.2 == status).count() as u64);
                }
            }
        }
    }

    /// Two ids whose 32-bit hashes are equal share a probe sequence in the index; each is still
    /// located, updated, read, removed and evicted as itself.
    #[test]
    fn ids_with_the_same_hash_are_told_apart() {
        let mut table = EventTable::new();
        let marks = Marks::new(4);
        let mut seen = HashMap::new();
        let (a, b) = loop {
            let id = EventId::new();
            if let Some(other) = seen.insert(table.by_id.hash(id), id) {
                break (other, id);
            }
        };
        let mut seq = 0;
        for id in [a, b] {
            let event = Arc::new(Event { id, ..Event::new(EventSource::System, "collide.x") });
            let stored = table.upsert(
                &event,
                || {
                    seq += 1;
                    seq
                },
                &marks,
            );
            assert!(stored.new);
        }
        for (id, status) in [(b, EventStatus::Completed), (a, EventStatus::Failed)] {
            let (slot, stored_at) = table.locate(id).unwrap();
            marks.write(slot, stored_at, &StatusUpdate::new(id, status));
        }
        let status = |table: &mut EventTable, id| table.touch(id, &marks).map(|e| (e.id, e.status));
        assert_eq!(status(&mut table, a), Some((a, EventStatus::Failed)));
        assert_eq!(status(&mut table, b), Some((b, EventStatus::Completed)));
        let counts = table.counts(&marks);
        assert_eq!(
            (counts[status_index(EventStatus::Failed)], counts[status_index(EventStatus::Completed)]),
            (1, 1)
        );

        assert_eq!(table.remove(a).map(|e| e.id), Some(a));
        assert_eq!(status(&mut table, a), None);
        assert_eq!(status(&mut table, b), Some((b, EventStatus::Completed)));
        assert_eq!(table.evict_least_recent().map(|e| e.id), Some(b));
        assert_eq!((table.len(), table.counts(&marks)), (0, [0; 4]));
        assert_eq!(status(&mut table, b), None);
    }
}
