//! One shard of the memory provider's events: a ring in recency order holding them, and an index
//! by id filled lazily.
//!
//! The event is kept as it was stored (shared, never copied), its status fields as stored with
//! it; status changes are written to the shard's [`Marks`], by slot, and every read here applies
//! them (see [`super::marks`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;

use super::index::IdIndex;
use super::log::Log;
use super::marks::{Marked, Marks};
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
/// the shard's marks) and its numbers.
pub(super) struct Entry {
    /// The event's id, kept beside it: evicting reads it without touching the event itself,
    /// which by then is cold in cache.
    pub(super) id: EventId,
    pub(super) event: Arc<Event>,
    /// Its sequence number: the number its first store took.
    pub(super) seq: u64,
    /// The number its latest store took: `seq` for its first store, a fresh one for a re-store.
    /// A ticket carries it; an update written for an earlier store does not apply.
    pub(super) stored_at: u64,
    /// The number its mark carries (see [`super::marks`]): `stored_at`, or a fresh one each time
    /// it moved to another slot since.
    pub(super) marked: u64,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Option<Entry>>() == 48, "a slot is an entry, its `None` a niche");

impl Entry {
    /// Its status now, the status field alone: for counting and filtering, without copying the
    /// rest (see [`Entry::status`]).
    fn current_status(&self, slot: usize, marks: &Marks) -> EventStatus {
        marks.status(slot, self.marked).unwrap_or(self.event.status)
    }

    /// Its status now: as stored, with what was marked for it in `slot`.
    fn status(&self, slot: usize, marks: &Marks) -> Lifecycle {
        let mut status = Lifecycle::of(&self.event);
        marks.apply(slot, self.marked, &mut status);
        status
    }

    /// An owned copy of the event with its current status.
    fn to_event(&self, slot: usize, marks: &Marks) -> Event {
        self.to_event_as(self.status(slot, marks))
    }

    /// An owned copy of the event with the status fields `s` (read once, and used for a filter).
    fn to_event_as(&self, s: Lifecycle) -> Event {
        let mut event = Event::clone(&self.event);
        event.status = s.status;
        event.error = s.error.into();
        event.retry_count = s.retry_count;
        event.processed_at = s.processed_at;
        event.completed_at = s.completed_at;
        event
    }
}

/// Slots of a shard's first ring: it doubles from there as the shard fills.
const FIRST_CAPACITY: usize = 16;

/// Slots a shard's ring may grow to for a provider bound of `max_events`: twice what a shard holds
/// at most (`max_events`, and one more while a store evicts), so a ring that fills at that size is
/// at least half holes. Only a limit: the ring grows to it as the shard fills.
pub(super) fn max_capacity(max_events: usize) -> usize {
    max_events
        .saturating_add(1)
        .saturating_mul(2)
        .checked_next_power_of_two()
        .unwrap_or(1 << (usize::BITS - 1))
        .max(2)
}

/// One shard's events: a [`Log`] in recency order (store order, but for the uses that move an
/// entry to the head), and an index by id that is filled lazily.
///
/// A store of an id greater than any this table has held (every store of the broker's own ids,
/// which increase on each thread, and each thread's ids go to shards of their own) is new without
/// a look at the index: it is pushed and nothing else. The index catches up (every entry pushed
/// since its last catch-up inserted) when something needs an event by id: a `get`, a `delete`, a
/// status update without a ticket, a store of an id not greater than all before. An eviction
/// removes an entry from the index only when it was put there. So the broker's flow never touches
/// the index, and what reads by id pays for the entries pushed since it last did, once.
pub(super) struct EventTable {
    log: Log<Entry>,
    by_id: IdIndex,
    /// Entries at positions below it are in `by_id`; those from it on are not yet.
    indexed_to: u64,
    /// The greatest id this table has held, as a number: a store of a greater one is new.
    greatest_id: u128,
    /// Slots the ring may grow to (see [`max_capacity`]).
    max_capacity: usize,
}

/// Where a store put its event.
pub(super) struct Stored {
    /// Whether its id was not stored yet.
    pub(super) new: bool,
    /// Its slot, whose mark its status changes go to.
    pub(super) slot: usize,
    /// The number its store took (its ticket's, and its mark's).
    pub(super) number: u64,
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
    /// An empty table whose ring grows to `max_capacity` slots at most (see [`max_capacity`]).
    pub(super) fn new(max_capacity: usize) -> Self {
        debug_assert!(max_capacity.is_power_of_two() && max_capacity >= 2);
        Self { log: Log::new(), by_id: IdIndex::new(), indexed_to: 0, greatest_id: 0, max_capacity }
    }

    pub(super) fn len(&self) -> usize {
        self.log.len()
    }

    /// Stored events per status, pending, processing, completed and failed: a pass over them.
    pub(super) fn counts(&self, marks: &Marks) -> [u64; 4] {
        let mut counts = [0; 4];
        for (_, slot, entry) in self.log.iter() {
            counts[status_index(entry.current_status(slot, marks))] += 1;
        }
        counts
    }

    /// Stores `event` as the most recently used, with the next number of `counter` (the
    /// provider's store counter, taken under the shard's lock): a new id takes it as its sequence
    /// number; a re-store keeps its sequence number and takes the new event and its status (what
    /// was marked for earlier stores no longer applies). Reserves the slot's mark in `marks`.
    pub(super) fn upsert(&mut self, event: &Arc<Event>, counter: &AtomicU64, marks: &Marks) -> Stored {
        self.make_room(counter, marks);
        let number = take_numbers(counter, 1);
        let id = event.id.as_uuid().as_u128();
        if id > self.greatest_id {
            // New, with no look at the index: the common case, and all of it.
            self.greatest_id = id;
            let slot = self.push(event, number);
            marks.reserve(slot);
            return Stored { new: true, slot, number };
        }
        self.catch_up();
        let hash = self.by_id.hash(event.id);
        let log = &self.log;
        match self.by_id.find_or_vacant(hash, |slot| log.get(slot).id == event.id) {
            Ok(slot) => {
                // Stored again: to the head, as stored now. Its old mark is left as it is: a late
                // write for the earlier store, applied there, is read by nobody.
                let mut entry = self.log.take(slot);
                entry.event = Arc::clone(event);
                entry.stored_at = number;
                let moved = self.move_to_head(entry, (hash, slot), number, None, marks);
                Stored { new: false, slot: moved, number }
            }
            Err(vacant) => {
                let slot = self.push(event, number);
                marks.reserve(slot);
                self.by_id.insert(vacant, slot);
                self.indexed_to = self.log.head();
                Stored { new: true, slot, number }
            }
        }
    }

    fn push(&mut self, event: &Arc<Event>, number: u64) -> usize {
        self.log.push(Entry {
            id: event.id,
            event: Arc::clone(event),
            seq: number,
            stored_at: number,
            marked: number,
        })
    }

    /// The event with `id`, with its status, now the most recently used: moved to the head, its
    /// mark with it, under a fresh number of `counter`.
    pub(super) fn touch(&mut self, id: EventId, counter: &AtomicU64, marks: &Marks) -> Option<Event> {
        self.make_room(counter, marks);
        let (hash, slot) = self.find(id)?;
        let slot = if self.log.is_newest(slot) {
            slot
        } else {
            let number = take_numbers(counter, 1);
            marks.moving(number);
            let entry = self.log.take(slot);
            let written = marks.close(slot, entry.marked);
            self.move_to_head(entry, (hash, slot), number, written, marks)
        };
        Some(self.log.get(slot).to_event(slot, marks))
    }

    /// Pushes `entry`, just taken from the indexed slot `from` (its id's hash, and the slot), to
    /// the head with its mark opened under `number` holding `written`; returns its slot. The index
    /// was caught up before the take, so it stays so.
    fn move_to_head(
        &mut self,
        mut entry: Entry,
        (hash, from): (u32, usize),
        number: u64,
        written: Option<Marked>,
        marks: &Marks,
    ) -> usize {
        entry.marked = number;
        let slot = self.log.push(entry);
        marks.reserve(slot);
        marks.open(slot, number, written);
        self.by_id.relocate(hash, from, slot);
        self.indexed_to = self.log.head();
        slot
    }

    /// Where a status update of the event with `id` goes: its slot, its mark's number, and the
    /// number its latest store took. Reading it does not count as use: status updates are the
    /// broker's bookkeeping.
    pub(super) fn locate(&mut self, id: EventId) -> Option<Located> {
        let (_, slot) = self.find(id)?;
        let entry = self.log.get(slot);
        Some(Located { slot, marked: entry.marked, stored_at: entry.stored_at })
    }

    /// The hash and slot of the event with `id`, the index caught up first.
    fn find(&mut self, id: EventId) -> Option<(u32, usize)> {
        self.catch_up();
        let hash = self.by_id.hash(id);
        self.by_id.find(hash, |slot| self.log.get(slot).id == id).map(|slot| (hash, slot))
    }

    /// Puts every entry pushed since the last catch-up into the index.
    fn catch_up(&mut self) {
        let from = self.indexed_to;
        let head = self.log.head();
        if from == head {
            return;
        }
        for (_, slot, entry) in self.log.iter_from(from) {
            let hash = self.by_id.hash(entry.id);
            let log = &self.log;
            match self.by_id.find_or_vacant(hash, |s| log.get(s).id == entry.id) {
                Err(vacant) => self.by_id.insert(vacant, slot),
                // A store looks up every id not above all before it, so each is held once.
                Ok(_) => debug_assert!(false, "an id held twice"),
            }
        }
        self.indexed_to = head;
    }

    /// Removes the event with `id` and returns it, for the caller to drop once it has released
    /// the shard (the last reference frees the event, whose memory is cold by then).
    pub(super) fn remove(&mut self, id: EventId) -> Option<Arc<Event>> {
        let (hash, slot) = self.find(id)?;
        let removed = self.by_id.remove(hash, slot);
        debug_assert!(removed, "just found");
        Some(self.log.take(slot).event)
    }

    /// Evicts the least recently used event and returns it (see [`EventTable::remove`]), `None`
    /// when there was none.
    pub(super) fn evict_least_recent(&mut self) -> Option<Arc<Event>> {
        let (position, slot) = self.log.oldest()?;
        if position < self.indexed_to {
            let removed = self.by_id.remove(self.by_id.hash(self.log.get(slot).id), slot);
            debug_assert!(removed, "every entry below `indexed_to` is in the index");
        }
        Some(self.log.take(slot).event)
    }

    /// Brings what the next evictions touch into cache ahead of them: the least recently used
    /// event was stored a bound's worth of events ago and is cold by now, and dropping it reads
    /// the whole event and its payload's allocation. Each call moves two victims one stage on, so
    /// by its eviction each has had its event fetched one store before and its payload (and its
    /// index bucket, when it is in the index) now; and it fetches the ring's slots a few stores
    /// ahead, at the tail and at the head (see [`Log::prefetch_ahead`]).
    pub(super) fn prefetch_evictions(&self) {
        self.log.prefetch_ahead();
        let Some((position, next)) = self.log.oldest() else { return };
        let entry = self.log.get(next);
        if position < self.indexed_to {
            self.by_id.prefetch(self.by_id.hash(entry.id));
        }
        if let Some(payload) = entry.event.payload_json() {
            // From the allocator's header just before the text.
            crate::prefetch::range(payload.as_ptr().wrapping_sub(16), 16 + payload.len().min(48));
        }
        let Some((_, after)) = self.log.after(position) else { return };
        let event = Arc::as_ptr(&self.log.get(after).event).cast::<u8>();
        // With the reference counts before the event.
        crate::prefetch::range(event.wrapping_sub(16), 16 + size_of::<Event>());
    }

    /// Ids of completed and failed events created before `cutoff`.
    pub(super) fn finished_before(&self, cutoff: Timestamp, marks: &Marks) -> Vec<EventId> {
        self.log
            .iter()
            .filter(|&(_, slot, entry)| {
                entry.event.created_at < cutoff && entry.current_status(slot, marks).is_terminal()
            })
            .map(|(_, _, entry)| entry.id)
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
        // The marks are read only when the filter asks for a status, and then once: workers
        // write them without the shard's lock, and an event must come back with the status it
        // was selected by.
        let mut keys: Vec<((Timestamp, EventId), usize, Option<Lifecycle>)> = self
            .log
            .iter()
            .filter_map(|(_, slot, entry)| {
                let lifecycle = filter.status.map(|_| entry.status(slot, marks));
                let status = lifecycle.as_ref().map_or(entry.event.status, |l| l.status);
                filter
                    .matches_with_status(&entry.event, status)
                    .then(|| ((entry.event.created_at, entry.event.id), slot, lifecycle))
            })
            .collect();
        keys.sort_unstable_by_key(|(key, _, _)| *key);
        keys.into_iter()
            .take(take)
            .map(|(key, slot, lifecycle)| {
                let entry = self.log.get(slot);
                (key, lifecycle.map_or_else(|| entry.to_event(slot, marks), |l| entry.to_event_as(l)))
            })
            .collect()
    }

    /// Up to `limit` events from `from` on, whose type matches `pattern`, in sequence order: a
    /// pass over the shard's events, then a sort of the first `limit` of those selected.
    /// Up to `limit` entries from `from` on whose numbers are below `before`, in number order.
    pub(super) fn replay(
        &self,
        from: ReplayFrom,
        before: u64,
        pattern: Option<&Pattern>,
        limit: usize,
        marks: &Marks,
    ) -> Vec<(u64, Event)> {
        let (first_seq, not_before) = match from {
            ReplayFrom::Beginning => (0, None),
            ReplayFrom::Sequence(seq) => (seq, None),
            ReplayFrom::Time(at) => (0, Some(at)),
        };
        let mut selected: Vec<(u64, usize)> = self
            .log
            .iter()
            .filter(|(_, _, entry)| (first_seq..before).contains(&entry.seq))
            .filter(|(_, _, entry)| not_before.is_none_or(|at| entry.event.created_at >= at))
            .filter(|(_, _, entry)| pattern.is_none_or(|p| p.matches(&entry.event.event_type)))
            .map(|(_, slot, entry)| (entry.seq, slot))
            .collect();
        if selected.len() > limit {
            if limit == 0 {
                return Vec::new();
            }
            selected.select_nth_unstable(limit - 1);
            selected.truncate(limit);
        }
        selected.sort_unstable();
        selected.into_iter().map(|(seq, slot)| (seq, self.log.get(slot).to_event(slot, marks))).collect()
    }

    /// Makes room for a push when the ring is full: its entries placed again from its start, at
    /// the same size when holes are at least half of it (always so at its largest), else twice
    /// the size. Each entry moved takes a fresh number of `counter` and its mark moves with it;
    /// ticketed writes to the marks they left are refused and go by id (see [`super::marks`]).
    /// The index starts again empty, to be caught up when next needed.
    #[cold]
    fn make_room(&mut self, counter: &AtomicU64, marks: &Marks) {
        if !self.log.is_full() {
            return;
        }
        let capacity = match self.log.capacity() {
            0 => FIRST_CAPACITY.min(self.max_capacity),
            full if self.log.len() * 2 <= full => full,
            full => full * 2,
        };
        // A shard holds at most `max_events + 1` events, half its largest ring: there, holes are
        // always at least half of it.
        debug_assert!(capacity <= self.max_capacity, "a shard holds at most half of its largest ring");
        let moved = self.log.rebuild(capacity);
        let first = take_numbers(counter, moved.len());
        if !moved.is_empty() {
            marks.moving(first + moved.len() as u64 - 1);
        }
        // Every mark closed before any is opened: an entry's new slot may be another's old one.
        let written: Vec<Option<Marked>> = moved
            .iter()
            .enumerate()
            .map(|(slot, &old)| marks.close(old, self.log.get(slot).marked))
            .collect();
        for (slot, (written, number)) in written.into_iter().zip(first..).enumerate() {
            self.log.get_mut(slot).marked = number;
            marks.reserve(slot);
            marks.open(slot, number, written);
        }
        self.by_id.clear();
        self.indexed_to = 0;
    }
}

/// Takes `count` numbers of the provider's store counter, under the lock of the shard that uses
/// them; returns the first.
fn take_numbers(counter: &AtomicU64, count: usize) -> u64 {
    // Release: the numbers need only be unique and increasing within the shard, whose lock is
    // held; but a reader that sees the counter past them (Acquire, in `replay`) must then find
    // the shard's lock taken by this store, so that it waits for the store to finish.
    counter.fetch_add(count as u64, Ordering::Release)
}

/// Where a status update of a stored event goes (see [`EventTable::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Located {
    pub(super) slot: usize,
    /// Its mark's number.
    pub(super) marked: u64,
    /// The number its latest store took.
    pub(super) stored_at: u64,
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
                let marks = Marks::new();
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
        /// A store of an id from elsewhere: not above all before it (a re-store when held).
        StoreForeign(u128),
        Restore(usize),
        Get(usize),
        Update(usize),
        /// An update written with the ticket of an earlier store of the event, or of an event
        /// gone since (its slot maybe reused): it changes nothing.
        Late(usize),
        Remove(usize),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Store),
            1 => any::<u128>().prop_map(Op::StoreForeign),
            1 => any::<usize>().prop_map(Op::Restore),
            4 => any::<usize>().prop_map(Op::Get),
            3 => any::<usize>().prop_map(Op::Update),
            2 => any::<usize>().prop_map(Op::Late),
            1 => any::<usize>().prop_map(Op::Remove),
            2 => Just(Op::Evict),
        ]
    }

    /// A ticket: the slot and number of a store.
    type Ticket = (usize, u64);

    /// Writes `update` as the broker's worker does (see `MemoryProvider::update_ticketed`): with
    /// its store's ticket, and by id when the mark refuses it and the event may have moved.
    fn write(table: &mut EventTable, marks: &Marks, (slot, number): Ticket, update: &StatusUpdate) {
        if !marks.write(slot, number, update)
            && let Some(found) = table.locate(update.id)
            && found.stored_at == number
        {
            marks.claim(found.slot, found.marked, update);
        }
    }

    /// Most events the model holds: a store beyond evicts, as the provider's bound does.
    const HELD: usize = 40;

    proptest! {
        /// The table and its marks agree with a model (a `VecDeque` in recency order of id,
        /// sequence number and status) after any mix of stores (of increasing ids and of others),
        /// re-stores, reads, status updates written with their store's ticket (which follow an
        /// event that moved), late updates (for an earlier store of an event, or for an event
        /// removed or evicted), removals and evictions, in a ring small enough to be placed again
        /// often: recency order, each event's status, replay in sequence order, and the counts
        /// per status.
        #[test]
        fn matches_a_recency_model(ops in prop::collection::vec(op(), 0..600)) {
            let mut table = EventTable::new(max_capacity(HELD));
            let marks = Marks::new();
            let counter = AtomicU64::new(1);
            // Recency order: (id, sequence number, status, ticket of its latest store).
            let mut model: VecDeque<(EventId, u64, EventStatus, Ticket)> = VecDeque::new();
            // (id, ticket) of stores that no longer hold.
            let mut late: Vec<(EventId, Ticket)> = Vec::new();
            // Events from elsewhere are stored as finished, as a writer stores an event whose
            // statuses came before its store.
            let store = |table: &mut EventTable, model: &mut VecDeque<_>, late: &mut Vec<_>, id, status| {
                let held = model.iter().position(|e: &(EventId, u64, EventStatus, Ticket)| e.0 == id);
                if held.is_none() && model.len() == HELD {
                    let (gone, _, _, ticket) = model.pop_front().unwrap();
                    prop_assert_eq!(table.evict_least_recent().map(|e| e.id), Some(gone));
                    late.push((gone, ticket));
                }
                let event = Arc::new(Event { id, status, ..Event::new(EventSource::System, "model.x") });
                let stored = table.upsert(&event, &counter, &marks);
                prop_assert_eq!(stored.new, held.is_none());
                let seq = match held {
                    Some(at) => {
                        let (_, seq, _, ticket) = model.remove(at).unwrap();
                        late.push((id, ticket));
                        seq
                    }
                    None => stored.number,
                };
                model.push_back((id, seq, status, (stored.slot, stored.number)));
                let found = table.locate(id).unwrap();
                prop_assert_eq!((found.slot, found.stored_at), (stored.slot, stored.number));
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Store => store(&mut table, &mut model, &mut late, EventId::new(), EventStatus::Pending)?,
                    Op::StoreForeign(bits) => {
                        let id = EventId::from_uuid(uuid::Uuid::from_u128(bits));
                        store(&mut table, &mut model, &mut late, id, EventStatus::Completed)?;
                    }
                    Op::Restore(i) if !model.is_empty() => {
                        let id = model[i % model.len()].0;
                        store(&mut table, &mut model, &mut late, id, EventStatus::Pending)?;
                    }
                    Op::Get(i) if !model.is_empty() => {
                        let entry = model.remove(i % model.len()).unwrap();
                        prop_assert_eq!(
                            table.touch(entry.0, &counter, &marks).map(|e| (e.id, e.status)),
                            Some((entry.0, entry.2))
                        );
                        model.push_back(entry);
                    }
                    Op::Update(i) if !model.is_empty() => {
                        let at = i % model.len();
                        let status = [EventStatus::Processing, EventStatus::Completed, EventStatus::Failed][i % 3];
                        write(&mut table, &marks, model[at].3, &StatusUpdate::new(model[at].0, status));
                        model[at].2 = status;
                    }
                    Op::Late(i) if !late.is_empty() => {
                        let (id, ticket) = late[i % late.len()];
                        write(&mut table, &marks, ticket, &StatusUpdate::new(id, EventStatus::Failed));
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (id, _, _, ticket) = model.remove(i % model.len()).unwrap();
                        late.push((id, ticket));
                        prop_assert_eq!(table.remove(id).map(|e| e.id), Some(id));
                        prop_assert!(table.remove(id).is_none());
                    }
                    Op::Evict => {
                        let evicted = table.evict_least_recent().map(|e| e.id);
                        let front = model.pop_front();
                        prop_assert_eq!(evicted, front.map(|e| e.0));
                        late.extend(front.map(|(id, _, _, ticket)| (id, ticket)));
                    }
                    Op::Restore(_) | Op::Get(_) | Op::Update(_) | Op::Late(_) | Op::Remove(_) => {}
                }
                prop_assert_eq!(table.len(), model.len());
                let held: Vec<_> = table
                    .log
                    .iter()
                    .map(|(_, slot, entry)| (entry.id, entry.seq, entry.status(slot, &marks).status))
                    .collect();
                prop_assert_eq!(held, model.iter().map(|&(id, seq, status, _)| (id, seq, status)).collect::<Vec<_>>());
                let mut by_seq: Vec<_> = model.iter().map(|&(id, seq, status, _)| (seq, id, status)).collect();
                by_seq.sort_unstable_by_key(|&(seq, _, _)| seq);
                let replayed: Vec<_> = table
                    .replay(ReplayFrom::Beginning, u64::MAX, None, usize::MAX, &marks)
                    .into_iter()
                    .map(|(seq, e)| (seq, e.id, e.status))
                    .collect();
                prop_assert_eq!(&replayed, &by_seq);
                if by_seq.len() > 2 {
                    let from = by_seq[1].0;
                    let page: Vec<_> = table
                        .replay(ReplayFrom::Sequence(from), u64::MAX, None, 2, &marks)
                        .into_iter()
                        .map(|(seq, e)| (seq, e.id, e.status))
                        .collect();
                    prop_assert_eq!(&page[..], &by_seq[1..3]);
                }
                let counts = table.counts(&marks);
                for status in [EventStatus::Pending, EventStatus::Processing, EventStatus::Completed, EventStatus::Failed] {
                    prop_assert_eq!(counts[status_index(status)], model.iter().filter(|e| e.2 == status).count() as u64);
                }
                prop_assert!(table.log.capacity() <= max_capacity(HELD));
            }
        }
    }

    /// A shard's broker flow (each store of an id above all before, evicting the oldest) never
    /// fills the index; a `get` catches it up, and the evictions after it take out what it put in.
    #[test]
    fn the_index_is_filled_only_when_something_reads_by_id() {
        let mut table = EventTable::new(max_capacity(100));
        let marks = Marks::new();
        let counter = AtomicU64::new(1);
        let mut ids = VecDeque::new();
        let store = |table: &mut EventTable, ids: &mut VecDeque<EventId>| {
            let event = Arc::new(Event::new(EventSource::System, "flow.x"));
            assert!(table.upsert(&event, &counter, &marks).new);
            ids.push_back(event.id);
            if ids.len() > 100 {
                assert_eq!(table.evict_least_recent().map(|e| e.id), ids.pop_front());
            }
        };
        for _ in 0..1_000 {
            store(&mut table, &mut ids);
        }
        assert_eq!((table.by_id.len(), table.indexed_to), (0, 0), "no store looked at the index");
        let held = *ids.front().unwrap();
        assert!(table.locate(held).is_some());
        assert_eq!(table.by_id.len(), 100, "caught up");
        for _ in 0..100 {
            store(&mut table, &mut ids);
        }
        assert_eq!(table.by_id.len(), 0, "each eviction took its entry out");
        assert!(table.locate(held).is_none());
    }

    /// A ring filled with holes (every event read once, each read moving it to the head) is
    /// placed again at the same size, and a ring filled with events doubles; either way a status
    /// written with the ticket of an event's store, before or after, lands on that event, and
    /// nowhere else.
    #[test]
    fn tickets_follow_events_the_ring_moves() {
        let mut table = EventTable::new(max_capacity(1_000));
        let marks = Marks::new();
        let counter = AtomicU64::new(1);
        let mut held = Vec::new();
        for i in 0..300 {
            let event = Arc::new(Event::new(EventSource::System, "move.x"));
            let stored = table.upsert(&event, &counter, &marks);
            let ticket = (stored.slot, stored.number);
            held.push((event.id, ticket));
            if i % 3 == 0 {
                write(&mut table, &marks, ticket, &StatusUpdate::new(event.id, EventStatus::Processing));
            }
            if i % 2 == 0 {
                let (id, _) = held[i / 2];
                table.touch(id, &counter, &marks).unwrap();
            }
        }
        assert!(table.log.capacity() >= 256, "grew");
        for (i, &(id, ticket)) in held.iter().enumerate() {
            if i % 5 == 0 {
                write(&mut table, &marks, ticket, &StatusUpdate::new(id, EventStatus::Completed));
            }
        }
        for (i, &(id, _)) in held.iter().enumerate() {
            let expected = match (i % 5, i % 3) {
                (0, _) => EventStatus::Completed,
                (_, 0) => EventStatus::Processing,
                _ => EventStatus::Pending,
            };
            assert_eq!(table.touch(id, &counter, &marks).map(|e| e.status), Some(expected), "event {i}");
        }
        assert_eq!(table.len(), 300);
    }

    /// Two ids whose 32-bit hashes are equal share a probe sequence in the index; each is still
    /// located, updated, read, removed and evicted as itself.
    #[test]
    fn ids_with_the_same_hash_are_told_apart() {
        let mut table = EventTable::new(max_capacity(4));
        let marks = Marks::new();
        let counter = AtomicU64::new(1);
        let mut seen = HashMap::new();
        let (a, b) = loop {
            let id = EventId::new();
            if let Some(other) = seen.insert(table.by_id.hash(id), id) {
                break (other, id);
            }
        };
        for id in [a, b] {
            let event = Arc::new(Event { id, ..Event::new(EventSource::System, "collide.x") });
            assert!(table.upsert(&event, &counter, &marks).new);
        }
        for (id, status) in [(b, EventStatus::Completed), (a, EventStatus::Failed)] {
            let found = table.locate(id).unwrap();
            marks.claim(found.slot, found.marked, &StatusUpdate::new(id, status));
        }
        let status = |table: &mut EventTable, id| table.touch(id, &counter, &marks).map(|e| (e.id, e.status));
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
